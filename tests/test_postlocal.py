"""post_local is PyTorch's post-local SGD, checked against a reference built
from this library's own steps (no PyTorch needed).

PyTorch's recipe (DDP with ``post_localSGD_hook`` at ``start_localSGD_iter=W``
and ``PeriodicModelAverager(period=p, warmup_steps=W)``, docs/pytorch.md) is,
step for step: W ``allreduce`` steps, then local steps with the parameters
averaged after steps W, W+p, W+2p, ... The reference runs exactly that as two
programs one after the other; ``post_local(W, p)`` runs it as one. Model and
data are test_step's per-worker linear regression, which has a model state.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import adpsgd_jax as A
from adpsgd_jax import comm, distributed as D, schedules as S
from helpers import (Data, assert_all_reduces_inside_conditionals, init_params, loss_fn, pmap_step, replicas, start,
                     traced_run, two_level_mesh)

T = 20
CASES = [(0, 3), (1, 4), (5, 4), (6, 1), (7, 5), (T, 3), (T + 7, 2)]  # (W, p), W = 0 and W >= T included


def averaging_after(steps, period):
    """A schedule that averages after exactly the step indices ``steps`` (reporting ``period``)."""
    steps = jnp.asarray(sorted(steps), jnp.int32)
    return S.Schedule(init=lambda: S.PeriodState(period=jnp.int32(period)),
                      should_sync=lambda state, step: jnp.isin(step, steps),
                      update=lambda state, step, variance, loss: state)


def snapshot(state, metrics):
    """Every worker's parameters, optimizer and model state, and the step's metrics, as numpy."""
    return jax.tree.map(np.asarray, ((state.params, state.opt_state, state.model_state), metrics))


def pytorch_recipe(mesh, optimizer, warmup, period, steps=T):
    """W ``allreduce`` steps, then ``local_sgd`` averaging after steps W, W+p, ...; a snapshot per step."""
    full = A.allreduce(loss_fn, optimizer)
    local = A.local_sgd(loss_fn, optimizer, averaging_after(range(warmup, steps, period), period))
    state, step, data, snaps = start(mesh, full), pmap_step(full.step, mesh), Data(), []
    for t in range(steps):
        if t == warmup:  # the hook's last global all-reduce is behind: continue with the same workers
            state = start(mesh, local)._replace(step=state.step, params=state.params, opt_state=state.opt_state,
                                                model_state=state.model_state, comm=state.comm)
            step = pmap_step(local.step, mesh)
        state, metrics = step(state, D.shard_batch(data.batch(), mesh))
        snaps.append(snapshot(state, metrics))
    return snaps


def one_program(mesh, optimizer, schedule, steps=T, **kw):
    built = A.local_sgd(loss_fn, optimizer, schedule, **kw)
    state, step, data, snaps = start(mesh, built), pmap_step(built.step, mesh), Data(), []
    for _ in range(steps):
        state, metrics = step(state, D.shard_batch(data.batch(), mesh))
        snaps.append(snapshot(state, metrics))
    return snaps


def round_bytes():
    """(bytes of an allreduce round: gradients + model state, of an average: parameters + model state + 8)."""
    params, model_state = init_params()
    grads = comm.tree_bytes(params) + comm.tree_bytes(model_state)
    return grads, grads + 8


@pytest.mark.parametrize("momentum", [None, 0.9], ids=["sgd", "momentum0.9"])
@pytest.mark.parametrize("warmup,period", CASES)
def test_post_local_equals_allreduce_then_averaging_at_every_step(mesh, warmup, period, momentum):
    optimizer = optax.sgd(0.05, momentum=momentum)
    ours = one_program(mesh, optimizer, S.post_local(warmup, period))
    reference = pytorch_recipe(mesh, optimizer, warmup, period)
    averages = set(range(warmup, T, period))
    for t, ((state, metrics), (ref_state, ref_metrics)) in enumerate(zip(ours, reference)):
        # Every worker's parameters, momentum buffers and model state.
        chex.assert_trees_all_close(state, ref_state, rtol=1e-6, atol=1e-6)
        assert bool(metrics.synced[0]) == (t < warmup or t in averages) == bool(ref_metrics.synced[0]), t
        assert int(metrics.period[0]) == int(ref_metrics.period[0]) == (1 if t < warmup else period), t
        np.testing.assert_allclose(metrics.variance, ref_metrics.variance, rtol=1e-5, atol=1e-12)
        assert int(metrics.comm.rounds[0]) == int(ref_metrics.comm.rounds[0])
        assert comm.total_bytes(metrics.comm) == comm.total_bytes(ref_metrics.comm)
        if t < warmup:  # an allreduce step: identical workers, buffers included, and V = 0
            chex.assert_trees_all_equal(*replicas(state))
            assert metrics.variance[0] == 0.0
    final = ours[-1][1].comm
    full_round, average_round = round_bytes()
    warm = min(warmup, T)
    assert int(final.rounds[0]) == warm + len(averages)
    assert comm.total_bytes(final) == warm * full_round + len(averages) * average_round


def test_averaging_parameters_in_the_warmup_leaves_the_momentum_buffers_apart(mesh):
    # The old post_local (parameters averaged after each warm-up step) reaches the same
    # parameters, but each worker's buffer holds its own gradients: the two runs then split.
    optimizer, warmup, period = optax.sgd(0.05, momentum=0.9), 5, 4
    ours = one_program(mesh, optimizer, S.post_local(warmup, period))
    averaged = one_program(mesh, optimizer, averaging_after(range(T), 1))
    (params, opt_state, _), _ = ours[warmup - 1]
    (params_avg, opt_state_avg, _), _ = averaged[warmup - 1]
    chex.assert_trees_all_close(params_avg, params, rtol=1e-5, atol=1e-6)
    chex.assert_trees_all_equal(*replicas(opt_state))
    buffers = replicas(opt_state_avg)
    assert not np.allclose(buffers[0][0].trace["w"], buffers[1][0].trace["w"])


@pytest.mark.parametrize("name", ["post_local", "adpsgd", "lr_proportional"])
def test_one_compilation_and_warmup_bytes_of_the_budgeted_schedules(mesh, name):
    steps, warmup, avg_period = 30, 6, 3
    lr = optax.cosine_decay_schedule(0.05, steps)
    schedule = {"post_local": S.post_local(warmup, avg_period),
                "adpsgd": S.adpsgd(steps, avg_period, lr_schedule=lr, warmup_steps=warmup),
                "lr_proportional": S.lr_proportional(steps, avg_period, lr_schedule=lr, warmup_steps=warmup)}[name]
    traces, periods = traced_run(mesh, optax.sgd(lr, momentum=0.9), schedule, steps)
    assert traces == 1
    assert periods[:warmup] == [1] * warmup and min(periods[warmup:]) >= 1
    snaps = one_program(mesh, optax.sgd(lr, momentum=0.9), schedule, steps)
    synced = [bool(m.synced[0]) for _, m in snaps]
    averages = sum(synced[warmup:])
    assert all(synced[:warmup])
    if name != "post_local":  # the budget C = T / p_bar is spent after the warm-up, which it does not count
        assert averages == steps // avg_period
    full_round, average_round = round_bytes()
    final = snaps[-1][1].comm
    assert int(final.rounds[0]) == warmup + averages
    assert comm.total_bytes(final) == warmup * full_round + averages * average_round


def test_the_warmup_all_reduce_sits_inside_a_conditional():
    # 4 workers per device: the warm-up's gradient mean, like the average, is inside a branch.
    hlo = assert_all_reduces_inside_conditionals(S.post_local(3, 4))
    assert hlo.count("conditional(") >= 2


def test_two_level_warmup_averages_over_every_worker_and_sets_the_anchor():
    # Groups of 4 and DiLoCo's outer step: the warm-up's mean spans both groups (counted in
    # comm, not group_comm), and the outer optimizer's first change starts from its end.
    mesh, warmup, period, steps = two_level_mesh(4), 4, 3, 11
    built = A.local_sgd(loss_fn, optax.sgd(0.05, momentum=0.9), S.post_local(warmup, period), axis_name="group",
                        group_axis_name="local", outer_optimizer=optax.sgd(0.7, momentum=0.9, nesterov=True))
    state, step, data = start(mesh, built), D.shard_map_step(built.step, mesh), Data()
    for t in range(steps):
        state, metrics = step(state, D.shard_batch(data.batch(), mesh))
        if t == warmup - 1:
            chex.assert_trees_all_equal(*replicas((state.params, state.opt_state, state.model_state)))
            chex.assert_trees_all_equal(state.anchor, state.params)
    full_round, average_round = round_bytes()
    averages = len(range(warmup, steps, period))
    assert int(state.comm.rounds[0]) == warmup + averages
    assert comm.total_bytes(state.comm) == warmup * full_round + averages * average_round
    assert int(state.group_comm.rounds[0]) == steps - warmup
    assert comm.total_bytes(state.group_comm) == (steps - warmup) * full_round
