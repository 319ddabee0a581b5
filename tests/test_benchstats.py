"""experiments.bench.stats: the median ratio, its distribution-free interval and its verdict, fed
synthetic timings (no clock is read)."""

import math

import numpy as np
import pytest

from experiments.bench import stats


def test_coverage_of_order_statistics_matches_the_binomial():
    assert stats.coverage(5, 1) == pytest.approx(1 - 2 / 32)  # min..max of 5: 93.75%, short of 95%
    assert stats.coverage(6, 1) == pytest.approx(1 - 2 / 64)
    assert stats.coverage(9, 2) == pytest.approx(1 - 2 * (1 + 9) / 512)
    # Simulated: the interval of 12 draws covers the true median about as often as it says.
    rng = np.random.default_rng(0)
    median, low, high, covered = zip(*(stats.median_interval(rng.lognormal(0.0, 0.3, 12)) for _ in range(4000)))
    hits = np.mean([lo <= 1.0 <= hi for lo, hi in zip(low, high)])  # the lognormal's median is e^0 = 1
    assert covered[0] == pytest.approx(stats.coverage(12, 3)) and abs(hits - covered[0]) < 0.015


@pytest.mark.parametrize("n, k", [(6, 1), (9, 2), (12, 3), (20, 6), (5, 1), (2, 1)])
def test_interval_takes_the_largest_k_that_reaches_the_level(n, k):
    values = list(range(n, 0, -1))  # n, ..., 1: unsorted on purpose
    median, low, high, covered = stats.median_interval(values)
    assert (low, high) == (k, n + 1 - k) and median == pytest.approx((n + 1) / 2)
    assert covered == pytest.approx(stats.coverage(n, k))
    assert (covered >= 0.95) is (n >= 6)
    if n >= 6:
        assert stats.coverage(n, k + 1) < 0.95


def timings(ratios, base=0.1):
    """Paired per-repetition seconds of A and B whose ratios A / B are ``ratios`` (B drifts)."""
    b = [base * (1 + 0.05 * math.sin(i)) for i in range(len(ratios))]
    return [r * x for r, x in zip(ratios, b)], b


UPPER, LOWER = ("<=", 1.02), (">=", 0.98)


@pytest.mark.parametrize("ratios, target, expected", [
    ([1.000, 1.005, 0.995, 1.010, 1.000, 0.990, 1.003, 1.007, 0.998], UPPER, "met"),  # wholly <= 1.02
    ([1.10, 1.12, 1.08, 1.11, 1.09, 1.13, 1.10, 1.12, 1.07], UPPER, "missed"),          # wholly > 1.02
    ([1.00, 1.04, 0.99, 1.03, 1.01, 1.05, 1.00, 1.03, 1.02], UPPER, "inconclusive"),     # straddles 1.02
    ([1.00, 1.01, 0.99, 1.02, 1.00, 0.995, 1.01, 1.00, 0.99], LOWER, "met"),             # wholly >= 0.98
    ([0.90, 0.91, 0.89, 0.92, 0.90, 0.88, 0.91, 0.90, 0.93], LOWER, "missed"),           # wholly < 0.98
    ([0.97, 0.99, 0.96, 1.00, 0.98, 0.95, 0.99, 0.97, 1.01], LOWER, "inconclusive"),     # straddles 0.98
])
def test_verdict_of_synthetic_timings(ratios, target, expected):
    a, b = timings(ratios)
    r = stats.ratio(a, b, *target)
    assert r["ratio"] == pytest.approx(float(np.median(ratios)))
    low, high = r["ci"]
    assert low == pytest.approx(sorted(ratios)[1]) and high == pytest.approx(sorted(ratios)[-2])  # n = 9: k = 2
    assert r["repeats"] == 9 and r["verdict"] == expected


@pytest.mark.parametrize("op, target", [UPPER, LOWER])
def test_an_interval_straddling_the_target_is_never_met(op, target):
    for width in (1e-9, 0.001, 0.1):
        assert stats.verdict((target - width, target + width), op, target) == "inconclusive"
    inside = (target - 0.03, target) if op == "<=" else (target, target + 0.03)  # the boundary belongs to the target
    outside = (target + 0.001, target + 0.03) if op == "<=" else (target - 0.03, target - 0.001)
    assert stats.verdict(inside, op, target) == "met"
    assert stats.verdict(outside, op, target) == "missed"
    # Too few repetitions for the level: no verdict, however far the interval lies from the target.
    assert stats.verdict(inside, op, target, covered=0.9375) == "inconclusive"
    assert stats.verdict(outside, op, target, covered=0.5) == "inconclusive"


def test_judged_flattens_ratios_with_targets_and_keeps_per_worker_counts():
    tight = stats.ratio(*timings([1.0] * 6))
    wide = stats.ratio(*timings([0.5, 0.6, 0.9, 1.2, 1.3, 0.7]))
    out = stats.judged({"gate": tight, "sim": {"4": tight, "8": wide}, "untargeted": tight},
                       {"gate": ("<=", 1.02), "sim": (">=", 0.8), "absent": ("<=", 1.0)})
    assert set(out) == {f"{n}_{p}" for n in ("gate", "sim") for p in ("ratio", "ci", "verdict")}
    assert out["gate_verdict"] == "met" and out["gate_ci"] == pytest.approx([1.0, 1.0])
    assert out["sim_verdict"] == {"4": "met", "8": "inconclusive"}
    assert out["sim_ci"]["8"] == pytest.approx([0.5, 1.3])


def test_bad_input():
    with pytest.raises(ValueError, match="paired samples differ in length: 2 and 3"):
        stats.ratio([1.0, 2.0], [1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="op '<' is unknown; accepted values: <=, >="):
        stats.verdict((1.0, 1.0), "<", 1.0)
    with pytest.raises(ValueError, match="at least one value"):
        stats.median_interval([])
