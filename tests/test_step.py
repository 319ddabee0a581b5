"""The train and eval steps on 8 virtual CPU devices, on the regression of tests/helpers.py.

The model is linear regression with a per-worker target, y = x . w_i + noise,
w_i = w* + drift * delta_i: each worker's data pulls its replica elsewhere,
so the parameter variance is real and grows with the period.
"""

import chex
import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import adpsgd_jax as A
from adpsgd_jax import comm, distributed as D, schedules as S
from helpers import (BATCH, DIM, N, SCHEDULES, Data, init_params, loss_fn, pmap_step, replicas, run, start,
                     strategy_for, traced_run)


@pytest.mark.parametrize("momentum", [None, 0.9])
def test_average_every_step_equals_allreduce(mesh, momentum):
    # Plain SGD: exact identity. With momentum the update is linear in the
    # gradients too, so the averaged trajectory is the all-reduce one.
    opt = optax.sgd(0.05, momentum=momentum)
    avg, _ = run(mesh, opt, S.constant(1), 20)
    full, _ = run(mesh, opt, None, 20, strategy="allreduce")
    chex.assert_trees_all_close(avg.params, full.params, rtol=1e-5, atol=1e-6)
    chex.assert_trees_all_close(avg.model_state, full.model_state, rtol=1e-5, atol=1e-6)


def test_replicas_identical_after_every_sync_and_apart_between(mesh):
    opt = optax.sgd(0.05)
    data = Data()
    built = A.local_sgd(loss_fn, opt, S.constant(3))
    state, step = start(mesh, built), pmap_step(built.step, mesh)
    for t in range(9):
        state, metrics = step(state, D.shard_batch(data.batch(), mesh))
        copies = replicas((state.params, state.model_state))
        if (t + 1) % 3 == 0:
            assert metrics.synced.tolist() == [True] * N
            chex.assert_trees_all_equal(*copies)
        else:
            assert metrics.synced.tolist() == [False] * N
            assert not np.allclose(copies[0][0]["w"], copies[1][0]["w"])


def test_single_step_golden_value(mesh):
    # One SGD step (lr 0.5) from w = 0, b = 0 on a batch where every worker
    # sees x = e_0 and y = worker index, then averaging:
    # grad_w0 = -(mean y_i over the batch) = -i, so w0 = 0.5 * mean_i(i) = 1.75.
    opt = optax.sgd(0.5)
    built = A.local_sgd(loss_fn, opt, S.constant(1))
    state = start(mesh, built)
    x = np.zeros((N, BATCH, DIM), np.float32)
    x[..., 0] = 1.0
    y = np.broadcast_to(np.arange(N, dtype=np.float32)[:, None], (N, BATCH))
    step = pmap_step(built.step, mesh)
    state, metrics = step(state, D.shard_batch({"x": x, "y": np.ascontiguousarray(y)}, mesh))
    w, b = D.unreplicate(state.params)["w"], D.unreplicate(state.params)["b"]
    assert w[0] == pytest.approx(1.75), "the averaged SGD step changed: check apply / pmean order"
    assert b == pytest.approx(1.75), "the bias gradient has the same form as w0's"
    np.testing.assert_array_equal(w[1:], 0.0)
    # Pre-sync variance: replica i has w0 = b = 0.5 i, so V = mean_i 2 (0.5 i - 1.75)^2.
    expected_v = np.mean(2 * (0.5 * np.arange(N) - 1.75) ** 2)
    assert metrics.variance[0] == pytest.approx(expected_v, rel=1e-6)
    np.testing.assert_allclose(metrics.loss, 0.5 * np.arange(N) ** 2)


@pytest.mark.parametrize("period,steps", [(1, 12), (4, 18), (5, 23)])
def test_sync_and_byte_counts(mesh, period, steps):
    opt = optax.sgd(0.05)
    state, history = run(mesh, opt, S.constant(period), steps)
    params, model_state = init_params()
    assert int(state.comm.rounds[0]) == steps // period
    assert sum(int(m.synced[0]) for m in history) == steps // period
    # Per sync: parameters + model state + the (variance, loss) scalar pair.
    per_sync = comm.tree_bytes(params) + comm.tree_bytes(model_state) + 8
    assert comm.tree_bytes(params) == 4 * (DIM + 1)
    assert comm.total_bytes(state.comm) == (steps // period) * per_sync


def test_every_step_schedule_and_allreduce_counts(mesh):
    opt = optax.sgd(0.05)
    state, _ = run(mesh, opt, S.every_step(), 7)
    assert int(state.comm.rounds[0]) == 7
    state, history = run(mesh, opt, None, 7, strategy="allreduce")
    params, model_state = init_params()
    assert int(state.comm.rounds[0]) == 7
    assert comm.total_bytes(state.comm) == 7 * (comm.tree_bytes(params) + comm.tree_bytes(model_state))
    assert all(m.variance[0] == 0.0 and m.synced[0] for m in history)


def test_qsgd_counts_compressed_bytes(mesh):
    opt = optax.sgd(0.05)
    state, _ = run(mesh, opt, None, 5, strategy="qsgd", qsgd_levels=7, qsgd_bucket_size=4)
    # w: 6 coords in 2 buckets of 4 -> 8 nibbles = 4 bytes + 2 norms of 4 bytes;
    # b: 1 coord -> 1 byte + 1 norm; model state: 4 bytes.
    assert comm.total_bytes(state.comm) == 5 * ((4 + 8) + (1 + 4) + 4)


def collective_operands(jaxpr, primitive: str) -> list:
    """Avals of the operands of every ``primitive`` equation in ``jaxpr`` and the jaxprs inside it."""
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == primitive:
            found += [v.aval for v in eqn.invars]
        for param in eqn.params.values():
            for sub in param if isinstance(param, (tuple, list)) else (param,):
                if isinstance(sub, jax.extend.core.ClosedJaxpr):
                    found += collective_operands(sub.jaxpr, primitive)
                elif isinstance(sub, jax.extend.core.Jaxpr):
                    found += collective_operands(sub, primitive)
    return found


@pytest.mark.parametrize("levels,bucket", [(7, 4), (100, 4), (1000, 4)])
def test_qsgd_counter_equals_the_bytes_its_collectives_send(mesh, levels, bucket):
    # The step as traced for one of N workers: what its all-gathers (the QSGD messages) and its
    # all-reduce (the model-state mean) take as operands is what one step adds to the counter.
    built = strategy_for(optax.sgd(0.05), strategy="qsgd", qsgd_levels=levels, qsgd_bucket_size=bucket)
    state = built.init(*init_params(), jax.random.PRNGKey(0))
    batch = jax.tree.map(lambda x: x[0], Data().batch())
    jaxpr = jax.make_jaxpr(built.step, axis_env=[("batch", N)])(state, batch).jaxpr
    gathered = collective_operands(jaxpr, "all_gather")
    assert any(a.dtype == (jnp.uint8 if levels <= 7 else jnp.int8 if levels <= 127 else jnp.int16) for a in gathered)
    sent = sum(a.size * a.dtype.itemsize for a in gathered + collective_operands(jaxpr, "psum"))
    state, _ = run(mesh, optax.sgd(0.05), None, 3, strategy="qsgd", qsgd_levels=levels, qsgd_bucket_size=bucket)
    assert comm.total_bytes(state.comm) == 3 * sent


@pytest.mark.parametrize("name", sorted(SCHEDULES) + ["allreduce", "qsgd"])
def test_no_retrace_over_a_whole_run(mesh, name):
    T = 40
    lr = optax.piecewise_constant_schedule(0.05, {T // 2: 0.1})
    schedule = SCHEDULES[name](T, lr) if name in SCHEDULES else None
    strategy = name if name in ("allreduce", "qsgd") else "average"
    traces, periods = traced_run(mesh, optax.sgd(lr), schedule, T, strategy=strategy)
    assert traces == 1
    if name == "adpsgd":
        assert len(set(periods)) > 2, periods  # the period changed without a retrace


@pytest.mark.parametrize("lr_name", ["step", "cosine"])
def test_adpsgd_budget_and_front_loading_with_real_replicas(mesh, lr_name):
    # P1 and P2 of docs/algorithm.md on the regression with per-worker drift.
    T, avg_period = 240, 6
    lr = {
        "step": optax.piecewise_constant_schedule(0.05, {T // 2: 0.1, 3 * T // 4: 0.1}),
        "cosine": optax.cosine_decay_schedule(0.05, T),
    }[lr_name]
    state, history = run(mesh, optax.sgd(lr), S.adpsgd(T, avg_period, lr_schedule=lr), T)
    synced = np.array([m.synced[0] for m in history])
    budget = T // avg_period
    assert 0.9 * budget <= synced.sum() <= budget
    assert synced[: T // 4].sum() > synced[-T // 4 :].sum()
    variance = np.array([m.variance[0] for m in history])
    assert np.all(variance[~synced] == 0) and np.all(variance[synced] > 0)


def test_variance_metric_matches_float64_on_gathered_replicas(mesh):
    opt = optax.sgd(0.05)
    data = Data(seed=3, drift=2.0)
    built = A.local_sgd(loss_fn, opt, S.constant(5))
    state = start(mesh, built)
    sync_step = pmap_step(built.step, mesh, donate_state=False)
    local_step = pmap_step(A.local_sgd(loss_fn, opt, S.constant(10**6)).step, mesh, donate_state=False)
    for _ in range(4):
        state, _ = sync_step(state, D.shard_batch(data.batch(), mesh))
    batch = D.shard_batch(data.batch(), mesh)
    pre_sync, _ = local_step(state, batch)  # same update, no averaging
    _, metrics = sync_step(state, batch)
    assert metrics.synced[0]
    x = np.concatenate([np.asarray(pre_sync.params["b"], np.float64)[:, None],
                        np.asarray(pre_sync.params["w"], np.float64)], axis=1)
    expected = np.mean(np.sum((x - x.mean(axis=0)) ** 2, axis=1))
    assert expected > 1e-3
    np.testing.assert_allclose(metrics.variance, expected, rtol=1e-5)


def test_average_opt_state_option(mesh):
    opt = optax.sgd(0.05, momentum=0.9)
    plain, _ = run(mesh, opt, S.constant(4), 8)
    averaged, _ = run(mesh, opt, S.constant(4), 8, average_opt_state=True)
    momenta = replicas(averaged.opt_state)
    chex.assert_trees_all_close(*momenta)
    assert not np.allclose(np.asarray(plain.opt_state[0].trace["w"])[0], np.asarray(plain.opt_state[0].trace["w"])[1])
    params, model_state = init_params()
    per_sync = 2 * comm.tree_bytes(params) + comm.tree_bytes(model_state) + 8  # momentum is params-shaped
    assert comm.total_bytes(averaged.comm) == 2 * per_sync


def test_shard_map_equals_pmap(mesh):
    T = 30
    lr = optax.cosine_decay_schedule(0.05, T)
    sched = S.adpsgd(T, 4, lr_schedule=lr)
    a, ha = run(mesh, optax.sgd(lr, momentum=0.9), sched, T, wrap=pmap_step)
    b, hb = run(mesh, optax.sgd(lr, momentum=0.9), sched, T, wrap=D.shard_map_step)
    chex.assert_trees_all_close(a.params, b.params, rtol=1e-5, atol=1e-6)
    assert [m.synced[0] for m in ha] == [m.synced[0] for m in hb]
    assert int(a.comm.rounds[0]) == int(b.comm.rounds[0])


@pytest.mark.parametrize("wrap", ["pmap", "shard_map"])
def test_eval_step_evaluates_the_averaged_model_with_masking(mesh, wrap):
    opt = optax.sgd(0.05)
    state, _ = run(mesh, opt, S.constant(100), 3)  # replicas differ
    params = jax.tree.map(lambda x: np.asarray(x).mean(axis=0), state.params)

    def eval_fn(params, model_state, chunk):
        return {"sq_err": (chunk["x"] @ params["w"] + params["b"] - chunk["y"]) ** 2}

    rng = np.random.default_rng(1)
    x = rng.normal(size=(N, 2, 3, DIM)).astype(np.float32)  # [devices, chunks, B, ...]
    y = rng.normal(size=(N, 2, 3)).astype(np.float32)
    mask = rng.random(size=(N, 2, 3)) > 0.3
    if wrap == "pmap":
        eval_step = jax.pmap(A.make_eval_step(eval_fn), axis_name="batch")
    else:
        eval_step = D.shard_map_step(A.make_eval_step(eval_fn), mesh, donate_state=False)
    out = eval_step(state, D.shard_batch({"x": x, "y": y, "mask": mask}, mesh))
    err = (x @ params["w"] + params["b"] - y) ** 2
    assert out["count"][0] == mask.sum()
    np.testing.assert_allclose(out["sq_err"], (err * mask).sum(), rtol=1e-5)


@pytest.mark.parametrize(
    "build,match",
    [
        (lambda: A.qsgd(loss_fn, optax.sgd(0.1), levels=0), "qsgd levels"),
        (lambda: A.qsgd(loss_fn, optax.sgd(0.1), levels=40000), r"qsgd levels must be an integer in \[1, 32767\]"),
        (lambda: A.qsgd(loss_fn, optax.sgd(0.1), bucket_size=0), "qsgd bucket_size"),
        (lambda: A.local_sgd(loss_fn, optax.sgd(0.1), None), "schedule must be an adpsgd_jax.schedules.Schedule"),
        (lambda: A.local_sgd(loss_fn, optax.sgd, S.constant(2)), "optimizer must be an optax.GradientTransformation"),
        (lambda: A.allreduce(loss_fn, optax.sgd(0.1), axis_name=3), "axis_name must be a name or a tuple of names"),
    ],
)
def test_bad_step_arguments(build, match):
    with pytest.raises(ValueError, match=match):
        build()


def test_batch_leading_dim_must_equal_device_count(mesh):
    wrap = D.shard_map_step
    opt = optax.sgd(0.1)
    traces = []

    built = A.local_sgd(loss_fn, opt, S.constant(2))

    def counted(state, batch):
        traces.append(1)
        return built.step(state, batch)

    state = start(mesh, built)
    bad = {k: v.reshape(4, 2 * BATCH, *v.shape[2:]) for k, v in Data().batch().items()}
    with pytest.raises(ValueError, match=r"leading dimension must equal the number of workers \(8\)"):
        wrap(counted, mesh)(state, bad)
    with pytest.raises(ValueError, match="number of workers"):
        D.shard_batch(bad, mesh)
    assert traces == []  # refused before anything was traced or compiled
