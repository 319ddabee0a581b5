"""Schedules alone: sync counts, budgets, front-loading, stability, purity.

A schedule is driven here by ``simulate``: a jitted scan over T steps that
feeds the schedule a synthetic pre-sync variance V = a(t) * tau^alpha, with
growth a(t) proportional to the squared learning rate (docs/algorithm.md's model),
optionally saturating. The train-step tests check the same properties with
real replicas.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from adpsgd_jax import schedules as S
from adpsgd_jax.schedules import forecasts
from helpers import simulate

T = 800


@pytest.mark.parametrize("period,total", [(1, 37), (3, 37), (8, 800), (7, 50), (50, 49)])
def test_constant_syncs_floor_t_over_p(period, total):
    synced, periods = simulate(S.constant(period), total)
    assert synced.sum() == total // period
    np.testing.assert_array_equal(np.nonzero(synced)[0], np.arange(period - 1, total, period))
    assert set(periods.tolist()) == {period}


def test_every_step_averages_after_every_step():
    synced, periods = simulate(S.every_step(), 25)
    assert synced.sum() == 25 and set(periods.tolist()) == {1}


def allreduce_steps(schedule, total_steps):
    """The steps ``schedule.allreduce_step`` marks, as a bool numpy array."""
    state, steps = schedule.init(), jnp.arange(total_steps)
    if schedule.allreduce_step is None:
        return np.zeros(total_steps, bool)
    return np.asarray(jax.vmap(lambda s: schedule.allreduce_step(state, s))(steps))


@pytest.mark.parametrize("warmup,period,total", [(10, 4, 50), (0, 4, 21), (3, 1, 12), (7, 5, 7), (9, 3, 5)])
def test_post_local_is_pytorchs_warmup_then_averager(warmup, period, total):
    # PyTorch's PeriodicModelAverager(period, warmup_steps) averages after the
    # steps t >= W with (t - W) % p == 0; the hook's warm-up is steps 0 .. W-1.
    synced, periods = simulate(S.post_local(warmup_steps=warmup, period=period), total)
    np.testing.assert_array_equal(np.nonzero(synced)[0], np.arange(warmup, total, period))
    np.testing.assert_array_equal(allreduce_steps(S.post_local(warmup, period), total), np.arange(total) < warmup)
    assert set(periods.tolist()) == {period}  # the state's period; the step reports 1 on allreduce steps
    if warmup == 0:
        assert S.post_local(0, period).allreduce_step is None  # no warm-up branch in the step


def test_stagewise_multiplies_period_at_boundaries():
    synced, periods = simulate(S.stagewise(period=2, boundaries=[20, 40], factor=2), 80)
    gaps = np.diff(np.concatenate([[-1], np.nonzero(synced)[0]]))
    sync_steps = np.nonzero(synced)[0]
    # Periods chosen after syncs before step 20 are 2, then 4 until 40, then 8.
    assert set(gaps[sync_steps < 20].tolist()) == {2}
    assert set(gaps[(sync_steps > 24) & (sync_steps < 40)].tolist()) == {4}
    assert set(gaps[sync_steps > 48].tolist()) == {8}
    assert periods[-1] == 8


def test_adacomm_period_follows_sqrt_loss_ratio():
    # Loss halves every 100 steps; tau_l = ceil(sqrt(F_l / F_0) * tau_0).
    tau0, interval = 16, 100
    loss = lambda s: 2.0 ** (-s.astype(jnp.float32) / 100.0)  # noqa: E731
    synced, periods = simulate(S.adacomm(period=tau0, interval=interval), 600, loss_fn=loss)
    sync_steps = np.nonzero(synced)[0]
    assert sync_steps[0] == tau0 - 1
    assert periods[0] == tau0 and periods[-1] < periods[150] < tau0  # shrinks as the loss falls
    # First revision: F_l is the mean loss at the syncs in (0, 100], F_0 the first one.
    first = sync_steps[sync_steps + 1 <= 112][:7]
    f0 = 2.0 ** (-first[0] / 100.0)
    fl = np.mean(2.0 ** (-first / 100.0))
    expected = int(np.ceil(np.sqrt(fl / f0) * tau0))
    assert periods[first[-1]] == expected
    assert periods.min() >= 1


LR_SCHEDULES = {
    "step": optax.piecewise_constant_schedule(0.1, {T // 2: 0.1, 3 * T // 4: 0.1}),
    "cosine": optax.cosine_decay_schedule(0.1, T),
}


@pytest.mark.parametrize("make", [S.adpsgd, S.lr_proportional], ids=["adpsgd", "lr_proportional"])
@pytest.mark.parametrize("lr_name", sorted(LR_SCHEDULES))
@pytest.mark.parametrize("avg_period", [4, 8, 20])
def test_budgeted_schedules_spend_budget_and_front_load(make, lr_name, avg_period):
    lr = LR_SCHEDULES[lr_name]
    budget = T // avg_period
    synced, _ = simulate(make(T, avg_period, lr_schedule=lr), T, lr=lr)
    assert 0.9 * budget <= synced.sum() <= budget  # P1
    quarter = T // 4
    assert synced[:quarter].sum() > synced[-quarter:].sum()  # P2


def test_adpsgd_budget_as_sync_count_and_alpha_two():
    lr = LR_SCHEDULES["step"]
    synced, _ = simulate(S.adpsgd(T, num_syncs=60, lr_schedule=lr, alpha=2.0), T, lr=lr, alpha=2.0)
    assert 54 <= synced.sum() <= 60


def test_adpsgd_never_exceeds_budget_when_variance_explodes():
    # Variance growing ever faster would ask for ever shorter periods.
    lr = lambda s: jnp.exp(s.astype(jnp.float32) / 100.0)  # noqa: E731
    synced, _ = simulate(S.adpsgd(T, 16), T, lr=lr)
    assert synced.sum() <= T // 16


@pytest.mark.parametrize("saturation", [None, 0.5, 5.0])
def test_adpsgd_stable_with_constant_lr(saturation):
    # P3: after the first plan the periods stay within a factor 2 of p_bar.
    avg_period = 8
    synced, periods = simulate(S.adpsgd(T, avg_period), T, saturation=saturation)
    first_sync = np.nonzero(synced)[0][0]
    after = periods[first_sync + 1 :]
    assert after.min() >= avg_period / 2 and after.max() <= 2 * avg_period, (after.min(), after.max())
    assert 0.9 * (T // avg_period) <= synced.sum() <= T // avg_period


def test_lr_proportional_density_tracks_learning_rate():
    # Step decay x0.1: syncs per step after the drop ~ 1/10 of before (alpha = 1, density ~ lr).
    lr = optax.piecewise_constant_schedule(0.1, {T // 2: 0.1})
    synced, _ = simulate(S.lr_proportional(T, 8, lr_schedule=lr), T)
    before, after = synced[: T // 2].sum(), synced[T // 2 :].sum()
    assert 7 <= before / max(after, 1) <= 14


@pytest.mark.parametrize("make", [S.adpsgd, S.lr_proportional], ids=["adpsgd", "lr_proportional"])
def test_warmup_is_allreduce_steps_outside_the_budget(make):
    # docs/algorithm.md, "Warm-up: allreduce steps": the first T_w steps are
    # allreduce steps; the budget's C averages are planned over the T - T_w
    # steps after them, the first at W(T_w) / C.
    lr, warmup, budget = LR_SCHEDULES["step"], 200, T // 8
    schedule = make(T, 8, lr_schedule=lr, warmup_steps=warmup)
    synced, _ = simulate(schedule, T, lr=lr)
    np.testing.assert_array_equal(allreduce_steps(schedule, T), np.arange(T) < warmup)
    assert not synced[:warmup].any()
    assert 0.9 * budget <= synced.sum() <= budget
    plain, _ = simulate(make(T - warmup, num_syncs=budget, lr_schedule=lambda s: lr(s + warmup)), T - warmup,
                        lr=lambda s: lr(s + warmup))
    if make is S.lr_proportional:  # the open-loop plan of the shorter run, shifted by T_w
        np.testing.assert_array_equal(synced[warmup:], plain)
    tight, _ = simulate(make(T, 8, lr_schedule=lr, warmup_steps=T - budget), T, lr=lr)
    assert tight[T - budget:].all() and tight.sum() == budget  # the C syncs just fit, at period 1


def test_adpsgd_feedback_shortens_periods_after_variance_rises():
    # Between plans the period follows the measured growth (docs/algorithm.md,
    # "The ADPSGD controller"): growth rising 16x (not announced by the lr schedule) shortens
    # the next periods about 4x (alpha = 1) until the next plan; the open-loop
    # plan does not react.
    growth = lambda s: jnp.where(s < T // 2, 1.0, 4.0)  # noqa: E731  (V ~ growth^2)
    s_fb, p_fb = simulate(S.adpsgd(T, 8), T, lr=growth)
    s_ol, p_ol = simulate(S.lr_proportional(T, 8), T, lr=growth)
    syncs_fb = np.nonzero(s_fb)[0]
    before = p_fb[syncs_fb[(syncs_fb > T // 4) & (syncs_fb < T // 2)]]
    after = p_fb[syncs_fb[syncs_fb >= T // 2][:4]]
    assert before.min() >= 6 and after.min() <= 3, (before, after)
    assert set(p_ol[T // 4 : 3 * T // 4].tolist()) <= {7, 8, 9}
    assert 0.9 * 100 <= s_fb.sum() <= 100


def test_adpsgd_follows_the_plan_after_a_learning_rate_decay():
    # Variance growth exactly proportional to lr^2 (the model the plan
    # assumes): after the decay the measured growth per unit lr^2 does not
    # change, so the periods stay at the plan instead of drifting longer
    # between plans and squeezing the owed syncs into the last steps.
    lr = optax.piecewise_constant_schedule(0.1, {T // 2: 0.1})
    synced, periods = simulate(S.adpsgd(T, 8, lr_schedule=lr), T, lr=lr)
    _, planned = simulate(S.lr_proportional(T, 8, lr_schedule=lr), T, lr=lr)
    steps = np.nonzero(synced)[0]
    late = periods[steps[(steps > T // 2 + 10) & (steps < T - 40)]]
    late_plan = planned[T // 2 + 10 : T - 40]
    assert late.max() <= 1.25 * late_plan.max() and late.min() >= 0.75 * late_plan.min(), (late, set(late_plan))
    assert periods[steps[-1] - 1] > 1  # no squeeze at the end
    assert 90 <= synced.sum() <= 100


SCHEDULES = {
    "every_step": lambda: S.every_step(),
    "constant": lambda: S.constant(4),
    "post_local": lambda: S.post_local(8, 4),
    "stagewise": lambda: S.stagewise(2, [30], 2.0),
    "adacomm": lambda: S.adacomm(8, 20),
    "adpsgd": lambda: S.adpsgd(100, 5, lr_schedule=optax.cosine_decay_schedule(0.1, 100)),
    "adpsgd_trend": lambda: S.adpsgd(100, 5, lr_schedule=optax.cosine_decay_schedule(0.1, 100),
                                     forecast=S.trend_forecast()),
    "lr_proportional": lambda: S.lr_proportional(100, 5),
    "qsr": lambda: S.qsr(100, 5, lr_schedule=optax.cosine_decay_schedule(0.1, 100)),
    "variance_trigger": lambda: S.variance_trigger(100, 5, lr_schedule=optax.cosine_decay_schedule(0.1, 100)),
}


@pytest.mark.parametrize("name", sorted(SCHEDULES))
def test_state_is_jnp_scalars_with_stable_types(name):
    sched = SCHEDULES[name]()
    state = sched.init()
    for leaf in jax.tree.leaves(state):
        assert isinstance(leaf, jax.Array) and leaf.shape == ()
    new = jax.jit(sched.update)(state, jnp.int32(9), jnp.float32(0.3), jnp.float32(1.5))
    # Same dtypes and weak types after an update: the step never retraces.
    chex.assert_trees_all_equal_dtypes(state, new)
    assert [x.weak_type for x in jax.tree.leaves(state)] == [x.weak_type for x in jax.tree.leaves(new)]


def driven(sched, syncs, scale):
    """The state after ``syncs`` syncs, one every 3 steps, with variances and losses that grow with ``scale``."""
    state = sched.init()
    for k in range(syncs):
        t = jnp.int32(3 * k + 2)
        state = sched.update(state, t, jnp.float32(scale * (k + 1)), jnp.float32(2.0 / (k + scale)))
    return state


@pytest.mark.parametrize("name", sorted(SCHEDULES))
def test_vmap_over_distinct_states(name):
    # Three different states (a vmap that mixed up batch elements would fail), each compared with the
    # unbatched function on its own state.
    sched = SCHEDULES[name]()
    singles = [driven(sched, syncs, scale) for syncs, scale in [(0, 1.0), (3, 0.5), (7, 4.0)]]
    states = jax.tree.map(lambda *xs: jnp.stack(xs), *singles)
    steps = jnp.array([3, 25, 40], jnp.int32)
    variances, losses = jnp.array([0.1, 2.0, 30.0]), jnp.array([1.5, 0.7, 0.2])
    flags = jax.vmap(sched.should_sync)(states, steps)
    assert flags.tolist() == [bool(sched.should_sync(x, t)) for x, t in zip(singles, steps)]
    new = jax.vmap(sched.update)(states, steps, variances, losses)
    for i, x in enumerate(singles):
        chex.assert_trees_all_close(jax.tree.map(lambda leaf: leaf[i], new),
                                    sched.update(x, steps[i], variances[i], losses[i]))
    # How many of the three states differ: constant, every_step and post_local keep only their period
    # (post_local's warm-up is decided from the step alone); every other schedule's three states differ.
    kinds = {tuple(np.asarray(leaf)[i].item() for leaf in jax.tree.leaves(states)) for i in range(3)}
    assert len(kinds) == {"constant": 1, "every_step": 1, "post_local": 1}.get(name, 3), kinds


@pytest.mark.parametrize(
    "build,match",
    [
        (lambda: S.constant(0), "period"),
        (lambda: S.constant(2.5), "period"),
        (lambda: S.post_local(-1, 4), "warmup_steps"),
        (lambda: S.stagewise(4, [10], factor=0), "factor"),
        (lambda: S.adacomm(4, 10, min_period=8), "min_period"),
        (lambda: S.adpsgd(100, 101), "avg_period"),
        (lambda: S.adpsgd(100, 0), "avg_period"),
        (lambda: S.adpsgd(100, num_syncs=101), "num_syncs"),
        (lambda: S.adpsgd(100, num_syncs=0), "num_syncs"),
        (lambda: S.adpsgd(100, num_syncs=-3), "num_syncs"),
        (lambda: S.adpsgd(100), "exactly one budget"),
        (lambda: S.adpsgd(100, 4, num_syncs=25), "exactly one budget"),
        (lambda: S.adpsgd(100, 4, warmup_steps=80), "warmup_steps=80 leaves 20 of the 100 steps"),
        (lambda: S.lr_proportional(100, 4, warmup_steps=100), "warmup_steps"),
        (lambda: S.adpsgd(100, 4, min_period=5), "min_period"),
        (lambda: S.adpsgd(100, 4, lr_schedule=lambda s: -1.0), "lr_schedule"),
        (lambda: S.lr_proportional(0, 1), "total_steps"),
    ],
)
def test_bad_arguments_raise_value_error(build, match):
    with pytest.raises(ValueError, match=match):
        build()


def _syncs_under(sched, T, lr, growth):
    """Sync positions of ``sched`` when the pre-sync variance is growth(t) * period * lr(t)^2 (alpha = 1)."""
    update, should_sync = jax.jit(sched.update), jax.jit(sched.should_sync)
    state, last, syncs = sched.init(), 0, []
    for t in range(T):
        if should_sync(state, jnp.int32(t)):
            variance = growth(t) * (t + 1 - last) * float(lr(t)) ** 2
            state, last = update(state, jnp.int32(t), jnp.float32(variance), jnp.float32(0.0)), t + 1
            syncs.append(t + 1)
    return syncs


def test_trend_forecast_moves_syncs_towards_a_falling_growth_rate():
    # The growth per unit lr^2 falls 7x over the first phase, then holds: the trend forecast sees the
    # fall and spends more of the budget early in the phase than the EMA forecast, which expects the
    # last measurement to hold. Both spend the budget exactly; with a constant growth rate the fit's
    # slope is 0 and the trend forecast is the EMA forecast.
    T, lr = 330, optax.piecewise_constant_schedule(0.1, {165: 0.1, 242: 0.1})
    falling = lambda t: 3.0 * np.exp(-0.012 * min(t, 165))  # noqa: E731
    ema = _syncs_under(S.adpsgd(T, 8, lr_schedule=lr), T, lr, falling)
    trend = _syncs_under(S.adpsgd(T, 8, lr_schedule=lr, forecast=S.trend_forecast()), T, lr, falling)
    assert len(ema) == len(trend) == T // 8
    assert sum(s <= 100 for s in trend) > sum(s <= 100 for s in ema) + 3
    flat = lambda t: 2.0  # noqa: E731
    assert _syncs_under(S.adpsgd(T, 8, lr_schedule=lr, forecast=S.trend_forecast()), T, lr, flat) == \
        _syncs_under(S.adpsgd(T, 8, lr_schedule=lr, forecast=S.ema_forecast()), T, lr, flat)


def test_phase_ends_cut_where_the_rate_moves():
    lr = np.array([0.1] * 5 + [0.01] * 3 + [0.009] * 2 + [0.001] * 2, np.float64)
    ends = forecasts._phase_ends(len(lr), lr, 1.5)
    assert ends.tolist() == [5] * 5 + [10] * 5 + [12] * 2 + [12]
    with pytest.raises(ValueError, match=r"forecast must be a schedules.Forecast \(schedules.ema_forecast\(\)"):
        S.adpsgd(100, 5, forecast="trend")  # a name is not a forecast: the CLI maps names to forecasts
