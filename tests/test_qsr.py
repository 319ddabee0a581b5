"""QSR, the Quadratic Synchronization Rule: the compiled schedule against an independent
transcription of the reference implementation's loop (hmgxr128/QSR, localopt.py ``adjust_h`` and
``step``), hand-computed runs, and the budgeted form against closed forms. One compilation per run
and the equality on 8 / 4 / 2 / 1 devices are in test_step.py and test_workers.py (``SCHEDULES``)."""

import math

import numpy as np
import pytest

from adpsgd_jax import schedules as S
from helpers import simulate


def sync_positions(schedule, total_steps):
    """Positions (step + 1) of the syncs ``schedule`` makes in ``total_steps`` steps."""
    synced, _ = simulate(schedule, total_steps)
    return (np.nonzero(synced)[0] + 1).tolist()


def reference_run(lr, total, alpha, init_h, min_h, power, warmup):
    """The reference's training loop, step by step: after every optimizer step the step counter
    and the local counter grow; the workers average when the local counter reaches h; after the
    scheduler has set the rate of the next step, h is recomputed (also once before training).
    Returns (positions of the averages, h after each of them)."""
    def adjust_h(step_ctr):
        if step_ctr < warmup or alpha == 0:
            return init_h
        rate = float(lr(step_ctr))
        remaining = total - step_ctr
        return max(min(max(int((alpha / rate) ** power), min_h), remaining), 1)

    h, local, positions, hs = adjust_h(0), 0, [], []
    for step_ctr in range(1, total + 1):
        local += 1
        if local >= h:
            local = 0
            positions.append(step_ctr)
            h = adjust_h(step_ctr) if step_ctr < total else h  # the last h is never used
            hs.append(h)
    return positions, hs


T = 240
WARMUP = 24


def warmup_cosine(s):
    """Linear warm-up from 0.01 to 0.1 over WARMUP steps, then cosine decay to 0.001 (never 0)."""
    if s < WARMUP:
        return 0.01 + 0.09 * s / WARMUP
    return 0.001 + 0.5 * 0.099 * (1 + math.cos(math.pi * (s - WARMUP) / (T - WARMUP)))


LRS = {
    "constant": lambda s: 0.1,
    "step": lambda s: 0.1 if s < T // 2 else 0.01 if s < 3 * T // 4 else 0.001,
    "cosine": lambda s: 0.001 + 0.5 * 0.099 * (1 + math.cos(math.pi * s / T)),
    "warmup-cosine": warmup_cosine,
}
# (alpha, init_h, min_h, power, warm-up): with init_h / min_h apart, alpha = 0, and powers 1, 1.5, 2, 3.
RULES = [(0.3, 1, 1, 2.0, 0), (0.15, 4, 2, 2.0, WARMUP), (0.0, 7, 1, 2.0, 0),
         (0.05, 2, 3, 1.0, WARMUP), (0.2, 3, 1, 1.5, 10), (0.25, 5, 2, 3.0, 0)]


@pytest.mark.parametrize("rule", RULES, ids=[f"a{a}-i{i}-m{m}-p{p}-w{w}" for a, i, m, p, w in RULES])
@pytest.mark.parametrize("lr_name", sorted(LRS))
def test_compiled_schedule_is_the_reference_loop(lr_name, rule):
    # 4 learning-rate schedules x 6 rules = 24 configurations; positions and periods identical.
    alpha, init_h, min_h, power, warmup = rule
    lr = LRS[lr_name]
    schedule = S.qsr(T, alpha=alpha, init_h=init_h, min_h=min_h, power=power, warmup_steps=warmup, lr_schedule=lr)
    synced, periods = simulate(schedule, T)
    positions, hs = reference_run(lr, T, alpha, init_h, min_h, power, warmup)
    assert (np.nonzero(synced)[0] + 1).tolist() == positions
    # The period in force after each average is the reference's h (reported from the step after it).
    assert [int(periods[u]) for u in positions if u < T] == [h for u, h in zip(positions, hs) if u < T]


def hand_lr(step):
    """Warm-up (steps 0-3, rising), then 0.2, 0.1, 0.05 and 0.02."""
    return 0.01 * (step + 1) if step < 4 else 0.2 if step < 12 else 0.1 if step < 28 else 0.05 if step < 44 else 0.02


def test_reference_rule_on_a_hand_computed_run():
    # alpha = 0.2, init_h = 2, min_h = 3, warm-up of 4 steps, T = 70:
    #   u = 0, 2 (warm-up)      H = init_h = 2              (the rule alone would give (0.2/0.01)^2 = 400)
    #   u = 4 .. 10, lr 0.2     H = max(int(1.0), min_h) = 3: 4, 7, 10, 13
    #   u = 13 .. 25, lr 0.1    H = int((0.2/0.1)^2) = 4: 17, 21, 25, 29
    #   u = 29, lr 0.05         H = int(16.0) = 16: 45
    #   u = 45, lr 0.02         H = int(99.99999999999999) = 99, cut to the end: the last sync at T = 70
    T = 70
    schedule = S.qsr(T, alpha=0.2, init_h=2, min_h=3, warmup_steps=4, lr_schedule=hand_lr)
    synced, periods = simulate(schedule, T)
    positions = (np.nonzero(synced)[0] + 1).tolist()
    assert positions == [2, 4, 7, 10, 13, 17, 21, 25, 29, 45, 70]
    # The period planned at each sync (reported from the step of the sync on): 45 plans 70 - 45 = 25.
    assert [int(periods[u - 1]) for u in positions[:-1]] == [2, 3, 3, 3, 4, 4, 4, 4, 16, 25]
    assert periods[0] == 2  # the first period, decided at position 0 in the warm-up


def test_plain_int_floor_alpha_zero_and_the_end_of_the_run():
    # (0.3 / 0.1)^2 is 8.999999999999998 in float64: the reference's int() gives 8.
    assert (0.3 / 0.1) ** 2 < 9 and int((0.3 / 0.1) ** 2) == 8
    assert sync_positions(S.qsr(20, alpha=0.3, lr_schedule=lambda s: 0.1), 20) == [8, 16, 20]
    # No learning-rate schedule: lr = 1, so H = max(int(alpha^p), min_h), cut at the end.
    assert sync_positions(S.qsr(10, alpha=1.5, min_h=3), 10) == [3, 6, 9, 10]
    assert sync_positions(S.qsr(10, alpha=1.5, power=3.0), 10) == [3, 6, 9, 10]  # int(3.375) = 3
    # alpha = 0: the constant period init_h, not cut at the end (the reference's last 2 steps stay unsynced).
    assert sync_positions(S.qsr(20, alpha=0.0, init_h=6, min_h=2), 20) == [6, 12, 18]
    # A warm-up period is not cut either; after the warm-up the rule ends the run with a sync.
    assert sync_positions(S.qsr(10, alpha=5.0, init_h=4, warmup_steps=9), 10) == [4, 8]
    assert sync_positions(S.qsr(10, alpha=5.0, init_h=4, warmup_steps=8), 10) == [4, 8, 10]
    # A zero rate after the warm-up: the period runs to the end (the reference would divide by zero).
    assert sync_positions(S.qsr(10, alpha=0.1, lr_schedule=lambda s: 0.1 if s < 4 else 0.0), 10) == [1, 2, 3, 4, 10]


def budgeted(total, budget, lr, **kw):
    """(alpha, sync positions) of the budgeted form at ``budget`` syncs."""
    alpha = S.qsr_alpha(total, num_syncs=budget, lr_schedule=lr, **kw)
    return alpha, sync_positions(S.qsr(total, num_syncs=budget, lr_schedule=lr, **kw), total)


@pytest.mark.parametrize("total,budget,gamma", [(100, 10, 0.1), (100, 7, 0.1), (330, 37, 0.05), (97, 13, 0.2)])
def test_budget_under_a_constant_rate_is_the_closed_form(total, budget, gamma):
    # H = int((alpha / gamma)^2) and the count is ceil(T / H): C syncs exactly when
    # H in [ceil(T / C), ceil(T / (C - 1)) - 1]; the search takes the smallest such alpha,
    # so H = ceil(T / C), alpha = gamma * sqrt(H) (to the search's 1e-13) and positions H, 2H, ..., T.
    alpha, positions = budgeted(total, budget, lambda s: gamma)
    H = -(-total // budget)
    assert -(-total // H) == budget
    assert alpha == pytest.approx(gamma * math.sqrt(H), rel=1e-12) and int((alpha / gamma) ** 2) == H
    assert positions == list(range(H, total, H)) + [total]


def test_budget_under_a_constant_rate_where_no_alpha_gives_c():
    # T = 100: H = 3 makes 34 syncs, H = 4 makes 25; C = 31 is 3 from 34 and 6 from 25: 34 syncs, every 3 steps.
    alpha, positions = budgeted(100, 31, lambda s: 0.1)
    assert len(positions) == 34 and positions == list(range(3, 100, 3)) + [100]
    assert int((alpha / 0.1) ** 2) == 3
    # C = 29 is 5 from 34 and 4 from 25: 25 syncs. A tie (C = 29.5 cannot be asked) would go to the fewer.
    assert len(budgeted(100, 29, lambda s: 0.1)[1]) == 25
    # The digits budget: T = 330, C = 41: H = 8 makes 42, H = 9 makes 37; 42 syncs.
    assert budgeted(330, 41, lambda s: 0.05)[1] == list(range(8, 330, 8)) + [330]


def step_decay(s):
    """0.1 for steps [0, 100), 0.01 after: a x0.1 decay at T / 2 of T = 200."""
    return 0.1 if s < 100 else 0.01


def test_budget_under_a_step_decay_is_hand_computed():
    # With alpha = 0.1 * sqrt(H) (H the first stage's period), the second stage's period is 100 H >= 100:
    # one sync at the end. Count = ceil(100 / H) + 1 (if H divides 100 the sync at 100 plans 100 more).
    # C = 21: H = 5 gives 20 + 1 = 21 exactly; positions 5, ..., 100, 200.
    alpha, positions = budgeted(200, 21, step_decay)
    assert positions == list(range(5, 101, 5)) + [200]
    assert alpha == pytest.approx(0.1 * math.sqrt(5), rel=1e-12)
    # C = 18: H = 6 gives 17 + 1 = 18, the syncs at 6, ..., 96 and 102: lr(96) = 0.1 plans 6 steps, and at
    # 102 the rate is 0.01: (0.1 sqrt 6 / 0.01)^2 = 600 > 98 steps left, so the end.
    assert budgeted(200, 18, step_decay)[1] == list(range(6, 97, 6)) + [102, 200]
    # C = 16: H = 7 gives 15 + 1 = 16 (7, ..., 98, 105, 200); C = 17 is reached by no H (H = 6: 18, 7: 16):
    # 18 and 16 tie at distance 1, and the tie goes to the fewer syncs.
    assert budgeted(200, 16, step_decay)[1] == list(range(7, 99, 7)) + [105, 200]
    assert len(budgeted(200, 17, step_decay)[1]) == 16


def one_low_step(s):
    """0.1 everywhere but step 50, where the rate is 0.001: u + H(u) is not monotone."""
    return 0.001 if s == 50 else 0.1


def test_budget_with_a_non_monotone_rate_searches_the_whole_range():
    # Under 0.1, H = int((alpha/0.1)^2); a sync landing on 50 plans (alpha/0.001)^2 = 10^4 H steps: to the
    # end. The count by H: 1: 51, 2: 26, 3: 34, 4: 25, 5: 11 (5, ..., 50, 100), 6: 17, 7: 15, 8: 13, 9: 12,
    # 10: 6 (10, ..., 50, 100): not monotone in alpha. The old bisection for "the largest alpha making at
    # least C" answered C = 11 with H = 9 (12 syncs, the last one, at T, dropped); H = 5 makes exactly 11.
    T = 100
    alpha, positions = budgeted(T, 11, one_low_step)
    assert positions == [5, 10, 15, 20, 25, 30, 35, 40, 45, 50, 100]
    assert int((alpha / 0.1) ** 2) == 5
    assert budgeted(T, 12, one_low_step)[1] == list(range(9, 100, 9)) + [100]  # H = 9
    assert budgeted(T, 6, one_low_step)[1] == [10, 20, 30, 40, 50, 100]  # H = 10, the smallest alpha making 6
    # No H makes 14: 13 (H = 8) and 15 (H = 7) tie at distance 1, and the tie goes to the fewer syncs.
    assert budgeted(T, 14, one_low_step)[1] == list(range(8, 100, 8)) + [100]


@pytest.mark.parametrize("lr_name", sorted(LRS))
@pytest.mark.parametrize("avg_period", [6, 20])
def test_budgeted_form_is_the_published_rule_at_its_alpha(lr_name, avg_period):
    # The budgeted schedule keeps every sync of the rule at the searched alpha (checked with the reference
    # loop), and its count is within one round of the budget's stage jumps: here within 15% of C.
    lr = LRS[lr_name]
    budget = T // avg_period
    alpha = S.qsr_alpha(T, avg_period, lr_schedule=lr, init_h=2, min_h=1)
    positions = sync_positions(S.qsr(T, avg_period, lr_schedule=lr, init_h=2, min_h=1), T)
    assert positions == reference_run(lr, T, alpha, 2, 1, 2.0, 0)[0]
    assert positions[-1] == T and abs(len(positions) - budget) <= 0.15 * budget


@pytest.mark.parametrize(
    "build,match",
    [
        (lambda: S.qsr(100), "alpha .* or a budget"),
        (lambda: S.qsr(100, 4, alpha=0.2), "not both"),
        (lambda: S.qsr(100, alpha=-0.1), "alpha must be a finite number >= 0"),
        (lambda: S.qsr(100, alpha=float("nan")), "alpha must be a finite number >= 0"),
        (lambda: S.qsr(100, alpha=0.1, min_h=0), "min_h"),
        (lambda: S.qsr(100, alpha=0.1, init_h=0), "init_h"),
        (lambda: S.qsr(100, alpha=0.1, power=0.0), "power must be a finite number > 0"),
        (lambda: S.qsr(100, alpha=0.1, power=float("inf")), "power must be a finite number > 0"),
        (lambda: S.qsr(100, alpha=0.1, warmup_steps=101), "warmup_steps"),
        (lambda: S.qsr(100, 0), "avg_period"),
        (lambda: S.qsr(100, 4, min_h=5), r"budget 25 is more than the 20 syncs QSR makes at min_h=5"),
        (lambda: S.qsr(100, num_syncs=2, init_h=2, warmup_steps=10), "warmup_steps=10"),
        (lambda: S.qsr(100, 4, lr_schedule=lambda s: -0.1), "lr_schedule"),
        (lambda: S.qsr_alpha(100, min_h=2), "needs a budget"),
    ],
)
def test_bad_arguments_raise_value_error(build, match):
    with pytest.raises(ValueError, match=match):
        build()


def old_saved(config):
    """``config`` as a run of the earlier qsr saved it: one qsr_base_period, no qsr_rule / periods / power."""
    new = ("qsr_rule", "qsr_init_period", "qsr_min_period", "qsr_power")
    return {**{k: v for k, v in config.to_dict().items() if k not in new}, "qsr_base_period": 1}


def test_resume_of_a_qsr_run_saved_before_the_reference_rule_is_refused(tmp_path, capsys):
    import json

    from experiments import cifar, flags, resume, results, translate

    argv = ["--dataset", "digits", "--epochs", "2", "--quiet", "--no-plots", "--out", str(tmp_path)]
    (new,), _ = translate.from_args(flags.parser().parse_args(argv + ["--schedule", "qsr"]))
    run_dir = tmp_path / results.run_name("qsr", 0)
    run_dir.mkdir()
    (run_dir / results.CONFIG).write_text(json.dumps(old_saved(new)))
    assert cifar.main(argv + ["--schedule", "qsr", "--resume"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --resume refused for qsr-seed0") and "\n" not in err
    assert "qsr_rule: 'tolerance-capped' -> 'reference' (the configuration changed meaning" in err
    old = resume.from_saved(old_saved(new))  # an old summary still reads, its base period as both periods
    assert (old.qsr_rule, old.qsr_init_period, old.qsr_min_period) == ("tolerance-capped", 1, 1)
    # Old runs of every other method (whose configs held qsr_base_period = 1 too) resume as before.
    for method in ("cpsgd", "adpsgd", "post_local"):
        other = new.replace(method=method)
        assert resume.config_differences(old_saved(other), other) == []
    assert resume.config_differences(new.to_dict(), new) == []  # a qsr run of this version resumes
