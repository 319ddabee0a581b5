"""Two-level averaging on the 2-D mesh ("group", "local") of 8 virtual CPU devices.

Inside a group the gradients are averaged every step; across groups the
schedule averages parameters. Model and data are test_step's per-worker
linear regression.
"""

import chex
import jax
import numpy as np
import optax
import pytest

import adpsgd_jax as A
from adpsgd_jax import comm, distributed as D, schedules as S
from helpers import (BATCH, DIM, N, Data, flat_mesh, init_params, loss_fn, replicas, run, start, traced_run,
                     two_level_mesh)

TWO_LEVEL = dict(axis_name="group", group_axis_name="local")


def run_grouped(group_size, optimizer, schedule, steps, **kw):
    return run(two_level_mesh(group_size), optimizer, schedule, steps, wrap=D.shard_map_step, **TWO_LEVEL, **kw)


def group_copies(tree, group_size):
    """Per group, the list of its replicas' copies of ``tree``."""
    copies = replicas(tree)
    return [copies[g * group_size:(g + 1) * group_size] for g in range(N // group_size)]


def test_group_size_one_equals_flat_averaging():
    T = 30
    lr = optax.cosine_decay_schedule(0.05, T)
    opt, sched = optax.sgd(lr, momentum=0.9), S.adpsgd(T, 4, lr_schedule=lr)
    flat, hf = run(flat_mesh(), opt, sched, T, wrap=D.shard_map_step)
    two, ht = run_grouped(1, opt, sched, T)
    chex.assert_trees_all_close(two.params, flat.params, rtol=1e-6, atol=1e-7)
    chex.assert_trees_all_close(two.model_state, flat.model_state, rtol=1e-6, atol=1e-7)
    assert [m.synced[0] for m in ht] == [m.synced[0] for m in hf]
    assert comm.total_bytes(two.comm) == comm.total_bytes(flat.comm) > 0
    assert comm.total_bytes(two.group_comm) == 0  # groups of one send nothing inside


@pytest.mark.parametrize("schedule", [S.constant(3), S.every_step()], ids=["constant", "every_step"])
def test_one_group_holding_every_device_equals_allreduce(schedule):
    opt = optax.sgd(0.05, momentum=0.9)
    two, history = run_grouped(N, opt, schedule, 12)
    full, _ = run(flat_mesh(), opt, None, 12, strategy="allreduce", wrap=D.shard_map_step)
    chex.assert_trees_all_close(two.params, full.params, rtol=1e-6, atol=1e-7)
    chex.assert_trees_all_close(two.model_state, full.model_state, rtol=1e-6, atol=1e-7)
    assert all(m.variance[0] == 0.0 for m in history if m.synced[0])
    # The gradient mean inside the one group is allreduce's traffic; nothing crosses groups.
    assert comm.total_bytes(two.group_comm) == comm.total_bytes(full.comm)
    assert comm.total_bytes(two.comm) == 0


@pytest.mark.parametrize("group_size", [2, 4])
def test_replicas_identical_within_groups_after_every_step(group_size):
    opt, period = optax.sgd(0.05), 3
    mesh = two_level_mesh(group_size)
    built = A.local_sgd(loss_fn, opt, S.constant(period), **TWO_LEVEL)
    state, data = start(mesh, built), Data()
    step = D.shard_map_step(built.step, mesh)
    for t in range(2 * period + 1):
        state, metrics = step(state, D.shard_batch(data.batch(), mesh))
        groups = group_copies((state.params, state.model_state, state.opt_state), group_size)
        for copies in groups:
            chex.assert_trees_all_equal(*copies)
        firsts = [copies[0] for copies in groups]
        if (t + 1) % period == 0:
            assert metrics.synced.tolist() == [True] * N
            chex.assert_trees_all_equal(*firsts)
        else:
            assert not np.allclose(firsts[0][0]["w"], firsts[1][0]["w"])  # groups drift apart between syncs


def test_variance_is_measured_across_groups():
    group_size, opt = 2, optax.sgd(0.05)
    mesh = two_level_mesh(group_size)
    built = A.local_sgd(loss_fn, opt, S.constant(4), **TWO_LEVEL)
    sync_step = D.shard_map_step(built.step, mesh, donate_state=False)
    local_step = D.shard_map_step(A.local_sgd(loss_fn, opt, S.constant(10**6), **TWO_LEVEL).step, mesh,
                                  donate_state=False)
    state, data = start(mesh, built), Data(seed=3, drift=2.0)
    for _ in range(3):
        state, _ = sync_step(state, D.shard_batch(data.batch(), mesh))
    batch = D.shard_batch(data.batch(), mesh)
    pre_sync, _ = local_step(state, batch)
    _, metrics = sync_step(state, batch)
    assert metrics.synced[0]
    x = np.concatenate([np.asarray(pre_sync.params["b"], np.float64)[:, None],
                        np.asarray(pre_sync.params["w"], np.float64)], axis=1)[::group_size]  # one row per group
    expected = np.mean(np.sum((x - x.mean(axis=0)) ** 2, axis=1))
    assert expected > 1e-3
    np.testing.assert_allclose(metrics.variance, expected, rtol=1e-5)


def test_intra_and_inter_group_bytes_are_counted_apart():
    state, history = run_grouped(2, optax.sgd(0.05), S.constant(4), 12)
    params, model_state = init_params()
    assert int(state.group_comm.rounds[0]) == 12
    assert comm.total_bytes(state.group_comm) == 12 * (comm.tree_bytes(params) + comm.tree_bytes(model_state))
    assert int(state.comm.rounds[0]) == 3
    assert comm.total_bytes(state.comm) == 3 * (comm.tree_bytes(params) + comm.tree_bytes(model_state) + 8)
    assert comm.total_bytes(history[-1].group_comm) == comm.total_bytes(state.group_comm)


@pytest.mark.parametrize("options", ["two-level", "outer", "two-level + outer"])
def test_no_retrace_over_a_whole_run_with_either_option(options):
    T = 40
    lr = optax.piecewise_constant_schedule(0.05, {T // 2: 0.1})
    outer = optax.sgd(0.7, momentum=0.9, nesterov=True) if "outer" in options else None
    grouped = "two-level" in options
    traces, periods = traced_run(two_level_mesh(2) if grouped else flat_mesh(), optax.sgd(lr),
                                 S.adpsgd(T, 3, lr_schedule=lr), T, wrap=D.shard_map_step, outer=outer,
                                 **(TWO_LEVEL if grouped else {}))
    assert traces == 1
    assert len(set(periods)) > 1, periods  # ADPSGD changed its period without a retrace


def test_eval_step_over_both_axes_evaluates_the_mean_model():
    state, _ = run_grouped(2, optax.sgd(0.05), S.constant(100), 3)  # the groups differ
    params = jax.tree.map(lambda x: np.asarray(x).mean(axis=0), state.params)
    mesh = two_level_mesh(2)

    def eval_fn(params, model_state, chunk):
        return {"sq_err": (chunk["x"] @ params["w"] + params["b"] - chunk["y"]) ** 2}

    rng = np.random.default_rng(1)
    x = rng.normal(size=(N, 2, 3, DIM)).astype(np.float32)
    y = rng.normal(size=(N, 2, 3)).astype(np.float32)
    eval_step = D.shard_map_step(A.make_eval_step(eval_fn, ("group", "local")), mesh, donate_state=False)
    out = eval_step(state, D.shard_batch({"x": x, "y": y}, mesh))
    np.testing.assert_allclose(out["sq_err"], ((x @ params["w"] + params["b"] - y) ** 2).sum(), rtol=1e-5)
    assert out["count"][0] == N * 2 * 3


def test_bad_two_level_arguments():
    with pytest.raises(ValueError, match=r"group_size must be .* divides the number of workers \(8\), got 3"):
        D.workers(group_size=3)
    with pytest.raises(TypeError, match="group_axis_name"):  # the gradient-mean strategies have no groups
        A.allreduce(loss_fn, optax.sgd(0.1), **TWO_LEVEL)
    with pytest.raises(ValueError, match="must not share a name with axis_name"):
        A.local_sgd(loss_fn, optax.sgd(0.1), S.constant(2), axis_name="x", group_axis_name=("x", "y"))


def test_group_rows_are_consecutive_workers():
    mesh = D.workers(group_size=4).mesh
    assert mesh.axis_names == ("group", "local") and mesh.devices.shape == (2, 4)
    assert [d.id for d in mesh.devices.flat] == [d.id for d in jax.devices()]
    batch = D.shard_batch({"x": np.arange(N * BATCH, dtype=np.float32).reshape(N, BATCH)}, mesh)
    for shard in batch["x"].addressable_shards:  # worker n = g * L + l holds row n
        n = list(mesh.devices.flat).index(shard.device)
        np.testing.assert_array_equal(np.asarray(shard.data)[0], np.arange(n * BATCH, (n + 1) * BATCH))
