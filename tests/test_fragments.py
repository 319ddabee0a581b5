"""Streaming averaging (``local_sgd(..., fragments=P)``) on 8 virtual CPU devices.

References: P independent single-fragment ``local_sgd`` runs on a loss that
separates over fragments; a step-by-step run without syncs whose fragments
are averaged by hand in numpy; closed forms on a constant-gradient model.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import adpsgd_jax as A
from adpsgd_jax import comm, distributed as D, fragments as F, schedules as S
from adpsgd_jax.schedules.periodic import PeriodState
from helpers import (N, Data, assert_all_reduces_inside_conditionals, flat_mesh, init_params, loss_fn, pmap_step,
                     replicas, run, start, traced_run, two_level_mesh)

DIM = 3
NAMES = ("a", "b")


def separable_loss(names):
    """sum over the fragments' leaves of a per-worker regression loss on that leaf's own data."""
    def loss(params, model_state, batch, rng):
        del rng
        total = sum(0.5 * jnp.mean((batch["x" + k] @ params[k] - batch["y" + k]) ** 2) for k in names)
        return total, (model_state, {})
    return loss


def separable_batches(steps, seed=0):
    rng = np.random.default_rng(seed)
    w = {k: rng.normal(size=(N, DIM)) for k in NAMES}
    out = []
    for _ in range(steps):
        batch = {}
        for k in NAMES:
            x = rng.normal(size=(N, 4, DIM)).astype(np.float32)
            batch["x" + k], batch["y" + k] = x, np.einsum("nbd,nd->nb", x, w[k]).astype(np.float32)
        out.append(batch)
    return out


def offset_constant(period, offset):
    """Averages after steps t with (t + 1) mod period = offset (offset in [1, period])."""
    return S.Schedule(lambda: PeriodState(period=jnp.int32(period)),
                      lambda state, step: (step + 1) % period == offset % period,
                      lambda state, step, variance, loss: state)


def drive(mesh, strategy, params, batches, names):
    state = D.replicate(strategy.init(params, {}, jax.random.PRNGKey(0)), mesh)
    step, history = pmap_step(strategy.step, mesh), []
    for batch in batches:
        sub = {key: v for key, v in batch.items() if key[1:] in names}
        state, metrics = step(state, D.shard_batch(sub, mesh))
        history.append(jax.tree.map(np.asarray, metrics))
    return state, history


@pytest.mark.parametrize("outer", [None, optax.sgd(0.7, momentum=0.9, nesterov=True)], ids=["plain", "diloco"])
def test_separable_loss_equals_independent_runs_per_fragment(mesh, outer):
    # Round k averages fragment k mod 2 after steps H-1, 2H-1, ...: fragment 0 every 2H steps from H-1,
    # fragment 1 every 2H from 2H-1, each an independent local_sgd on its own leaf (DiLoCo with an outer step).
    H, T, opt = 3, 18, optax.sgd(0.05, momentum=0.9)
    params = {k: jnp.zeros((DIM,), jnp.float32) for k in NAMES}
    batches = separable_batches(T)
    joint = A.local_sgd(separable_loss(NAMES), opt, S.constant(H), fragments=2, outer_optimizer=outer)
    state, history = drive(mesh, joint, params, batches, NAMES)
    for p, k in enumerate(NAMES):
        alone = A.local_sgd(separable_loss((k,)), opt, offset_constant(2 * H, (p + 1) * H), outer_optimizer=outer)
        ref, ref_history = drive(mesh, alone, {k: params[k]}, batches, (k,))
        chex.assert_trees_all_close(state.params[k], ref.params[k], rtol=1e-6, atol=1e-7)
        synced = [t for t in range(T) if ref_history[t].synced[0]]
        assert synced == list(range((p + 1) * H - 1, T, 2 * H))
        for t in synced:  # V-hat = V_p d / d_p, d / d_p = 2
            np.testing.assert_allclose(history[t].variance, 2 * ref_history[t].variance, rtol=1e-5)
    assert [bool(m.synced[0]) for m in history] == [(t + 1) % H == 0 for t in range(T)]


def host(tree):
    return jax.tree.map(lambda x: np.asarray(x, np.float64), tree)


@pytest.mark.parametrize("delay,alpha", [(0, 0.0), (2, 0.5)])
def test_non_separable_model_matches_hand_averaging(mesh, delay, alpha):
    # test_step's regression (leaves b, w; the default partition puts b in fragment 0 and w in 1), against local
    # steps without syncs whose fragment means are taken in numpy at each round and mixed in `delay` steps later.
    H, T, opt = 2, 13, optax.sgd(0.05)
    built = A.local_sgd(loss_fn, opt, S.constant(H), fragments=2, fragment_delay=delay, fragment_alpha=alpha)
    never = A.local_sgd(loss_fn, opt, S.constant(10**6))
    state, ref, data = start(mesh, built), start(mesh, never), Data(drift=2.0)
    step, ref_step = pmap_step(built.step, mesh), pmap_step(never.step, mesh)
    pending = {}  # step it lands after -> (leaf name, its taken mean)
    for t in range(T):
        batch = D.shard_batch(data.batch(), mesh)
        state, _ = step(state, batch)
        ref, _ = ref_step(ref, batch)
        params, model_state = host(ref.params), host(ref.model_state)
        if t in pending:
            name, mean = pending.pop(t)
            params[name] = alpha * params[name] + (1 - alpha) * mean
        if (t + 1) % H == 0:
            name = ("b", "w")[((t + 1) // H - 1) % 2]
            pending[t + delay] = name, params[name].mean(axis=0)
            model_state = jax.tree.map(lambda x: np.broadcast_to(x.mean(axis=0), x.shape), model_state)
            if delay == 0:
                name, mean = pending.pop(t)
                params[name] = alpha * params[name] + (1 - alpha) * mean
        ref = ref._replace(params=jax.tree.map(lambda x, old: jax.device_put(x.astype(np.float32), old.sharding),
                                               params, ref.params),
                           model_state=jax.tree.map(lambda x, old: jax.device_put(x.astype(np.float32), old.sharding),
                                                    model_state, ref.model_state))
        chex.assert_trees_all_close(host(state.params), host(ref.params), rtol=1e-5, atol=1e-6)
    assert pending == {} if delay == 0 else len(pending) == 1


def constant_gradient_loss(params, model_state, batch, rng):
    """loss_i = g_i (u + v): every step moves both leaves by -lr g_i."""
    del rng
    return batch["g"][0] * (params["u"] + params["v"]), (model_state, {})


G = np.arange(N, dtype=np.float32)  # g_i = i, mean 3.5, mean squared deviation 5.25
LR = 0.125


def constant_run(mesh, steps, **kw):
    built = A.local_sgd(constant_gradient_loss, optax.sgd(LR), S.constant(4), fragments=2, **kw)
    params = {"u": jnp.float32(1.0), "v": jnp.float32(1.0)}
    state = D.replicate(built.init(params, {}, jax.random.PRNGKey(0)), mesh)
    step, history = pmap_step(built.step, mesh), []
    batch = D.shard_batch({"g": G[:, None]}, mesh)
    for _ in range(steps):
        state, metrics = step(state, batch)
        history.append(metrics)
    return state, history


def test_delay_and_alpha_in_closed_form(mesh):
    # H = 4, P = 2, tau = 2, alpha = 0.5; x_i(t) = 1 - lr t g_i locally, gbar = 3.5.
    # u (fragment 0): mean taken after step 3 (1 - 4 lr gbar), landed after step 5 on 1 - 6 lr g_i:
    # 1 - 3 lr g_i - 2 lr gbar; taken again after step 11, landed after 13: 1 - 5.5 lr g_i - 6.5 lr gbar.
    # v (fragment 1): taken after step 7 (1 - 8 lr gbar), landed after 9 on 1 - 10 lr g_i: 1 - 5 lr g_i - 4 lr gbar.
    g, gbar = G, G.mean()
    state, history = constant_run(mesh, 6, fragment_delay=2, fragment_alpha=0.5)
    np.testing.assert_allclose(state.params["u"], 1 - 3 * LR * g - 2 * LR * gbar, rtol=1e-6)
    np.testing.assert_allclose(state.params["v"], 1 - 6 * LR * g, rtol=1e-6)
    # V-hat at the first round: V_u = (1/N) sum_i (4 lr (g_i - gbar))^2, times d / d_u = 2.
    np.testing.assert_allclose(history[3].variance, 2 * 16 * LR**2 * np.mean((g - gbar) ** 2), rtol=1e-5)
    state, _ = constant_run(mesh, 14, fragment_delay=2, fragment_alpha=0.5)
    np.testing.assert_allclose(state.params["u"], 1 - 5.5 * LR * g - 6.5 * LR * gbar, rtol=1e-5)
    np.testing.assert_allclose(state.params["v"], 1 - 5 * LR * g - 4 * LR * gbar - 4 * LR * g, rtol=1e-5)


def test_outer_step_per_fragment_in_closed_form(mesh):
    # outer sgd(2): x_new = x_s - 2 (x_s - xbar) = 2 xbar - x_s. u after step 3: 2 (1 - 4 lr gbar) - 1, then local.
    gbar = G.mean()
    state, _ = constant_run(mesh, 4, outer_optimizer=optax.sgd(2.0))
    np.testing.assert_allclose(state.params["u"], np.full(N, 1 - 8 * LR * gbar), rtol=1e-6)
    np.testing.assert_allclose(state.params["v"], 1 - 4 * LR * G, rtol=1e-6)
    np.testing.assert_allclose(state.anchor["u"], np.full(N, 1 - 8 * LR * gbar), rtol=1e-6)
    assert len(state.outer_opt_state) == 2  # one outer state per fragment


def test_bytes_per_round_are_the_fragments(mesh):
    # Fragment 0 = b (4 bytes), fragment 1 = w (6 float32 = 24 bytes); each round adds the model state (4) and 8.
    _, history = run(mesh, optax.sgd(0.05), S.constant(2), 8, fragments=2)
    totals = [comm.total_bytes(m.comm) for m in history]
    assert totals == [0, 16, 16, 16 + 36, 52, 52 + 16, 68, 68 + 36]
    assert [int(m.comm.rounds[0]) for m in history] == [0, 1, 1, 2, 2, 3, 3, 4]


@pytest.mark.parametrize("name", ["adpsgd", "variance_trigger", "post_local", "qsr"])
def test_one_compilation_with_every_kind_of_schedule(mesh, name):
    from helpers import SCHEDULES
    T = 20
    traces, periods = traced_run(mesh, optax.sgd(0.05), SCHEDULES[name](T, None), T, fragments=2, fragment_delay=1)
    assert traces == 1 and len(periods) == T


def test_all_reduces_stay_inside_the_conditionals():
    hlo = assert_all_reduces_inside_conditionals(S.constant(3), fragments=2, fragment_delay=1, fragment_alpha=0.5,
                                                 outer_optimizer=optax.sgd(0.7, momentum=0.9))
    assert hlo.count("conditional") >= 3  # the gate, the switch over the fragments, the landing


def test_two_level_groups_stay_identical_and_rounds_reach_every_group():
    where = two_level_mesh(2)
    state, history = run(where, optax.sgd(0.05), S.constant(2), 6, wrap=D.shard_map_step, axis_name="group",
                         group_axis_name="local", fragments=2)
    copies = replicas(state.params)
    for g in range(0, N, 2):
        chex.assert_trees_all_equal(copies[g], copies[g + 1])
    # The last round (round 2, after step 5) averaged fragment 0, b, across the groups; w still differs.
    chex.assert_trees_all_equal(*[c["b"] for c in copies])
    assert not np.allclose(copies[0]["w"], copies[2]["w"])
    assert int(history[-1].comm.rounds[0]) == 3


def test_one_fragment_is_todays_step_and_state():
    params, model_state = init_params()
    rng = jax.random.PRNGKey(0)
    plain = A.local_sgd(loss_fn, optax.sgd(0.1), S.constant(2))
    for same in (dict(fragments=1), dict(fragments={"b": 0, "w": 0}), dict(fragments=None, fragment_delay=0)):
        built = A.local_sgd(loss_fn, optax.sgd(0.1), S.constant(2), **same)
        state = built.init(params, model_state, rng)
        assert state.fragments is None
        chex.assert_trees_all_equal_structs(state, plain.init(params, model_state, rng))
    mesh = flat_mesh()
    a, _ = run(mesh, optax.sgd(0.05), S.constant(2), 6)
    b, _ = run(mesh, optax.sgd(0.05), S.constant(2), 6, fragments=1, fragment_delay=0, fragment_alpha=0.0)
    chex.assert_trees_all_equal(a, b)


def test_default_partition_rule():
    assert F.contiguous([4, 24], 2) == (0, 1)
    assert F.contiguous([1] * 8, 4) == (0, 0, 1, 1, 2, 2, 3, 3)
    assert F.contiguous([10, 10, 10, 30], 2) == (0, 0, 0, 1)  # cut at S_3 = 30 = B / 2
    assert F.contiguous([100, 1, 1, 1], 4) == (0, 1, 2, 3)  # every fragment keeps a leaf
    assert F.contiguous([1, 1, 1, 1], 3) == (0, 1, 1, 2)  # cuts nearest 4/3 and 8/3
    assert F.contiguous([2, 1, 1], 2) == (0, 1, 1)  # |2 - 2| = 0 at c = 1
    assert F.contiguous([1, 2, 1], 2) == (0, 1, 1)  # tie |1 - 2| = |3 - 2|: the smaller c
    with pytest.raises(ValueError, match="fragments=3 needs at least 3 parameter leaves"):
        F.contiguous([1, 1], 3)


@pytest.mark.parametrize("kw,message", [
    (dict(fragments=0), "fragments must be an integer P >= 1"),
    (dict(fragments={"b": 0, "w": 2}), r"must use every index 0 .. 2; missing \[1\]"),
    (dict(fragments={"b": -1, "w": 0}), "fragments must be an integer P >= 1 or a pytree"),
    (dict(fragments=2, fragment_delay=-1), "fragment_delay must be an integer >= 0"),
    (dict(fragments=2, fragment_delay=1.5), "fragment_delay must be an integer >= 0"),
    (dict(fragments=2, fragment_delay=6), r"fragment_delay must be < fragments \* period = 2 \* 3 = 6"),
    (dict(fragments=2, fragment_alpha=1.5), r"fragment_alpha must be a number in \[0, 1\]"),
    (dict(fragments=2, average_opt_state=True), "average_opt_state cannot be combined with fragments=2"),
])
def test_refusals_at_construction(kw, message):
    with pytest.raises(ValueError, match=message):
        A.local_sgd(loss_fn, optax.sgd(0.1), S.constant(3), **kw)


@pytest.mark.parametrize("fragments,message", [
    (3, "fragments=3 needs at least 3 parameter leaves, the model has 2"),
    ({"w": 0, "b": {"x": 1}}, "the partition's structure"),
])
def test_refusals_at_init(fragments, message):
    built = A.local_sgd(loss_fn, optax.sgd(0.1), S.constant(3), fragments=fragments)
    with pytest.raises(ValueError, match=message):
        built.init(*init_params(), jax.random.PRNGKey(0))
