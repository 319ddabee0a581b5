"""The outer optimizer at each sync (DiLoCo's outer step) on 8 virtual CPU devices.

Model and data are test_step's per-worker linear regression.
"""

import chex
import jax
import numpy as np
import optax
import pytest

import adpsgd_jax as A
from adpsgd_jax import distributed as D, schedules as S
from helpers import SCHEDULES, Data, init_params, loss_fn, pmap_step, replicas, run, start, two_level_mesh

DILOCO = dict(learning_rate=0.7, momentum=0.9)


@pytest.mark.parametrize("name", sorted(SCHEDULES) + ["adpsgd, two-level"])
def test_outer_sgd_with_lr_1_equals_plain_averaging(mesh, name):
    # x_s + 1 * (xbar - x_s) = xbar: the same trajectory, up to float32 rounding.
    T = 24
    lr = optax.piecewise_constant_schedule(0.05, {T // 2: 0.1})
    schedule = SCHEDULES[name.split(",")[0]](T, lr)
    kw = dict(wrap=D.shard_map_step, axis_name="group", group_axis_name="local") if "two-level" in name else {}
    where = two_level_mesh(2) if kw else mesh
    plain, hp = run(where, optax.sgd(lr, momentum=0.9), schedule, T, **kw)
    outer, ho = run(where, optax.sgd(lr, momentum=0.9), schedule, T, outer=optax.sgd(1.0), **kw)
    chex.assert_trees_all_close(outer.params, plain.params, rtol=1e-5, atol=1e-6)
    chex.assert_trees_all_close(outer.model_state, plain.model_state, rtol=1e-5, atol=1e-6)
    assert [m.synced[0] for m in ho] == [m.synced[0] for m in hp]
    assert sum(m.synced[0] for m in hp) > 0
    if hp[-1].synced[0]:  # just synced: the anchor is the new parameters
        chex.assert_trees_all_equal(outer.anchor, outer.params)


def test_nesterov_outer_step_matches_the_formula(mesh):
    # At each sync: Delta = x_s - xbar; v <- m v + Delta; x_new = x_s - lr (Delta + m v) (optax's Nesterov).
    opt, period = optax.sgd(0.05), 3
    outer = optax.sgd(**DILOCO, nesterov=True)
    built = A.local_sgd(loss_fn, opt, S.constant(period), outer_optimizer=outer)
    sync_step = pmap_step(built.step, mesh, donate_state=False)
    local_step = pmap_step(A.local_sgd(loss_fn, opt, S.constant(10**6), outer_optimizer=outer).step, mesh,
                             donate_state=False)
    state, data = start(mesh, built), Data(drift=2.0)
    anchor = jax.tree.map(np.asarray, init_params()[0])
    velocity = jax.tree.map(np.zeros_like, anchor)
    for t in range(3 * period):
        batch = D.shard_batch(data.batch(), mesh)
        pre_sync, _ = local_step(state, batch)  # the same local update, no averaging
        state, metrics = sync_step(state, batch)
        if (t + 1) % period:
            continue
        assert metrics.synced[0]
        mean = jax.tree.map(lambda x: np.asarray(x, np.float64).mean(axis=0), pre_sync.params)
        delta = jax.tree.map(np.subtract, anchor, mean)
        velocity = jax.tree.map(lambda v, d: DILOCO["momentum"] * v + d, velocity, delta)
        anchor = jax.tree.map(lambda a, d, v: a - DILOCO["learning_rate"] * (d + DILOCO["momentum"] * v),
                              anchor, delta, velocity)
        for copy in replicas((state.params, state.anchor)):
            chex.assert_trees_all_close(copy, (anchor, anchor), rtol=1e-5, atol=1e-6)
        chex.assert_trees_all_close(*replicas(state.outer_opt_state))  # identical on every worker
        trace = jax.tree.map(lambda x: np.asarray(x)[0], state.outer_opt_state[0].trace)
        chex.assert_trees_all_close(trace, velocity, rtol=1e-5, atol=1e-6)
    assert not np.allclose(anchor["w"], mean["w"])  # the outer step moved past the mean


def test_state_carries_no_anchor_without_an_outer_optimizer():
    params, model_state = init_params()
    plain = A.local_sgd(loss_fn, optax.sgd(0.1), S.constant(2)).init(params, model_state, jax.random.PRNGKey(0))
    assert plain.anchor is None and plain.outer_opt_state is None
    outer = A.local_sgd(loss_fn, optax.sgd(0.1), S.constant(2), outer_optimizer=optax.sgd(0.7, momentum=0.9, nesterov=True))
    state = outer.init(params, model_state, jax.random.PRNGKey(0))
    chex.assert_trees_all_equal(state.anchor, params)
    chex.assert_trees_all_equal(state.outer_opt_state[0].trace, jax.tree.map(np.zeros_like, params))


def test_bad_outer_arguments():
    with pytest.raises(TypeError, match="outer_optimizer"):  # the gradient-mean strategies take none
        A.allreduce(loss_fn, optax.sgd(0.1), outer_optimizer=optax.sgd(1.0))
    with pytest.raises(ValueError, match="outer_optimizer must be an optax.GradientTransformation, got float"):
        A.local_sgd(loss_fn, optax.sgd(0.1), S.constant(2), outer_optimizer=0.7)
