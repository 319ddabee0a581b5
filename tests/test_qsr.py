"""QSR, the Quadratic Synchronization Rule: the published rule on a hand-computed run, and the budgeted
form, whose alpha is solved on the host, spending its budget exactly. One compilation per run and the
equality on 8 / 4 / 2 / 1 devices are in test_step.py and test_workers.py (``SCHEDULES``)."""

import numpy as np
import optax
import pytest

from adpsgd_jax import schedules as S
from adpsgd_jax.schedules import base
from adpsgd_jax.schedules import quadratic
from test_schedules import simulate


def sync_positions(schedule, total_steps):
    """Positions (step + 1) of the syncs ``schedule`` makes in ``total_steps`` steps."""
    synced, _ = simulate(schedule, total_steps)
    return (np.nonzero(synced)[0] + 1).tolist()


def hand_lr(step):
    """Warm-up (steps 0-3, rising), then 0.2, 0.1, 0.05 and 0.02."""
    return 0.01 * (step + 1) if step < 4 else 0.2 if step < 12 else 0.1 if step < 28 else 0.05 if step < 44 else 0.02


def test_published_rule_on_a_hand_computed_run():
    # H(u) = max(H_base, floor((alpha / lr(u))^2)) with alpha = 0.2, H_base = 2, warm-up of 4 steps, T = 70:
    #   u = 0, 2 (warm-up)      H = H_base = 2              (the rule alone would give (0.2/0.01)^2 = 400)
    #   u = 4 .. 10, lr 0.2     H = max(2, 1) = 2
    #   u = 12 .. 24, lr 0.1    H = (0.2/0.1)^2 = 4
    #   u = 28, lr 0.05         H = (0.2/0.05)^2 = 16
    #   u = 44, lr 0.02         H = (0.2/0.02)^2 = 100, cut to the end: the last sync at T = 70
    T = 70
    schedule = S.qsr(T, alpha=0.2, base_period=2, warmup_steps=4, lr_schedule=hand_lr)
    synced, periods = simulate(schedule, T)
    positions = (np.nonzero(synced)[0] + 1).tolist()
    assert positions == [2, 4, 6, 8, 10, 12, 16, 20, 24, 28, 44, 70]
    # The period in force after each sync (reported from the step after it): 2 x 5, 4 x 4, 16, then 70 - 44.
    assert [int(periods[u - 1]) for u in positions[:-1]] == [2] * 5 + [4] * 4 + [16, 26]
    assert periods[0] == 2  # the first period, decided at position 0 in the warm-up


def test_published_rule_floors_without_float_artefacts_and_ends_at_the_last_step():
    # (0.3 / 0.1)^2 is 8.999999999999998 in float64: the rule's floor is 9.
    assert sync_positions(S.qsr(20, alpha=0.3, lr_schedule=lambda s: 0.1), 20) == [9, 18, 20]
    # No learning-rate schedule: lr = 1, so H = max(H_base, floor(alpha^2)).
    assert sync_positions(S.qsr(10, alpha=1.5, base_period=3), 10) == [3, 6, 9, 10]


T = 600
WARMUP = 30


def rule_positions(lr, alpha, kw):
    """The published rule's sync positions over T steps, from the host's table of periods."""
    periods = quadratic._qsr_periods(base._lr_values(T, lr), alpha, kw["base_period"], kw.get("warmup_steps", 0))
    return quadratic._qsr_positions(periods)


def with_warmup(schedule):
    """Linear warm-up from 0.01 to 0.1 over WARMUP steps, then ``schedule`` over the rest."""
    return lambda s: 0.01 + 0.09 * s / WARMUP if s < WARMUP else schedule(s - WARMUP)


LRS = {
    "constant": optax.constant_schedule(0.1),
    "step": optax.piecewise_constant_schedule(0.1, {T // 2: 0.1, 3 * T // 4: 0.1}),
    "cosine": optax.cosine_decay_schedule(0.1, T),
}


@pytest.mark.parametrize("avg_period", [8, 20])
@pytest.mark.parametrize("warmup", [False, True], ids=["no-warmup", "warmup"])
@pytest.mark.parametrize("lr_name", sorted(LRS))
def test_budgeted_form_spends_exactly_its_budget(lr_name, warmup, avg_period):
    lr = with_warmup(LRS[lr_name]) if warmup else LRS[lr_name]
    kw = dict(warmup_steps=WARMUP, base_period=4) if warmup else dict(base_period=1)
    budget = T // avg_period
    alpha = S.qsr_alpha(T, avg_period, lr_schedule=lr, **kw)
    positions = sync_positions(S.qsr(T, avg_period, lr_schedule=lr, **kw), T)
    assert len(positions) == budget  # within 2% asked; the cap makes it exact
    # alpha is the largest whose rule makes at least C syncs (to the solver's 1e-9; counted here with the
    # host's own simulation of the rule), and the budgeted schedule is that rule cut after its C-th sync.
    rule = rule_positions(lr, alpha, kw)
    assert len(rule) >= budget and rule[:budget] == positions
    assert len(rule_positions(lr, alpha * (1 + 1e-6), kw)) < budget
    if warmup:  # every period of the warm-up is H_base
        assert [u for u in positions if u <= WARMUP] == list(range(4, WARMUP + 1, 4))


def test_budget_as_a_sync_count_and_the_cap_with_a_given_alpha():
    lr = LRS["cosine"]
    assert len(sync_positions(S.qsr(T, num_syncs=47, lr_schedule=lr), T)) == 47
    rule = sync_positions(S.qsr(T, alpha=0.2, lr_schedule=lr), T)
    assert len(rule) > 30 and sync_positions(S.qsr(T, num_syncs=30, alpha=0.2, lr_schedule=lr), T) == rule[:30]


@pytest.mark.parametrize(
    "build,match",
    [
        (lambda: S.qsr(100), "alpha .* or a budget"),
        (lambda: S.qsr(100, alpha=0.0), "alpha must be a finite number > 0"),
        (lambda: S.qsr(100, alpha=float("nan")), "alpha must be a finite number > 0"),
        (lambda: S.qsr(100, alpha=0.1, base_period=0), "base_period"),
        (lambda: S.qsr(100, alpha=0.1, warmup_steps=101), "warmup_steps"),
        (lambda: S.qsr(100, 0), "avg_period"),
        (lambda: S.qsr(100, 4, base_period=5), r"budget 25 is more than the 20 syncs QSR makes at base_period=5"),
        (lambda: S.qsr(100, num_syncs=2, base_period=2, warmup_steps=10), "warmup_steps=10"),
        (lambda: S.qsr(100, 4, lr_schedule=lambda s: -0.1), "lr_schedule"),
        (lambda: S.qsr_alpha(100, base_period=2), "needs a budget"),
    ],
)
def test_bad_arguments_raise_value_error(build, match):
    with pytest.raises(ValueError, match=match):
        build()
