"""The benchmark's statistics: a median ratio with a distribution-free interval, and its verdict.

Each timed repetition gives one sample of every variant, so a ratio A / B
has one value per repetition: r_i = a_i / b_i, taken from the same
repetition (the two sides share that repetition's load). The benchmark
reports the median of the r_i and a 95% interval for the population median,
from order statistics (the interval of the sign test): with the n values
sorted, r_(1) <= ... <= r_(n),

    P(r_(k) <= m <= r_(n+1-k)) = 1 - 2 * sum_{i < k} C(n, i) / 2^n

for n independent draws of a continuous distribution with median m,
whatever that distribution is. ``median_interval`` takes the largest k whose
coverage is at least the level. No distribution is assumed (the timings of
a shared machine have long right tails), nothing is resampled, and one
outlying repetition moves the interval by one order statistic at most.
95% needs n >= 6 (k = 1: the minimum and maximum, 96.9%); with fewer
repetitions the interval is the minimum to the maximum, its coverage below
95%, and no verdict is drawn from it. Coverage just above 95% comes at
n = 6, 9, 12, 15, 17, 20 (96.9, 96.1, 96.1, 96.5, 95.1, 95.9%).

A verdict compares the whole interval with the target: ``met`` when every
value in it meets the target, ``missed`` when none does, ``inconclusive``
otherwise (or when the interval covers less than the level).
"""

from __future__ import annotations

import math
import statistics
from typing import Optional, Sequence

LEVEL = 0.95
VERDICTS = ("met", "missed", "inconclusive")
METHOD = ("median of the per-repetition ratios; 95% distribution-free interval for the median from order "
          "statistics (sign test)")


def coverage(n: int, k: int) -> float:
    """P(x_(k) <= median <= x_(n+1-k)) for n independent continuous draws: 1 - 2 P(Binomial(n, 1/2) < k)."""
    return 1.0 - 2.0 * sum(math.comb(n, i) for i in range(k)) / 2.0 ** n


def median_interval(values: Sequence[float], level: float = LEVEL) -> tuple[float, float, float, float]:
    """(median, low, high, coverage) of ``values``: the sample median and the order-statistic interval
    [x_(k), x_(n+1-k)] of the largest k (1 <= k <= n / 2) whose ``coverage(n, k)`` >= ``level``; the
    minimum to the maximum (k = 1), with its lower coverage, when no k reaches the level."""
    x = sorted(float(v) for v in values)
    n = len(x)
    if n == 0:
        raise ValueError("median_interval needs at least one value")
    k = 1
    while k + 1 <= n // 2 and coverage(n, k + 1) >= level:
        k += 1
    return statistics.median(x), x[k - 1], x[n - k], coverage(n, k)


def verdict(interval: Sequence[float], op: str, target: float, covered: float = 1.0, level: float = LEVEL) -> str:
    """``met`` / ``missed`` / ``inconclusive`` of an interval [low, high] against ``op`` ("<=" or ">=") ``target``.

    met: the whole interval meets the target (high <= target, or low >= target);
    missed: none of it does (low > target, or high < target); inconclusive: it
    straddles the target, or it covers less than ``level`` (``covered``).
    """
    if op not in ("<=", ">="):
        raise ValueError(f"op {op!r} is unknown; accepted values: <=, >=")
    low, high = interval
    if covered < level:
        return "inconclusive"
    if (high <= target) if op == "<=" else (low >= target):
        return "met"
    if (low > target) if op == "<=" else (high < target):
        return "missed"
    return "inconclusive"


def ratio(numerator: Sequence[float], denominator: Sequence[float], op: Optional[str] = None,
          target: Optional[float] = None) -> dict:
    """A ratio of two variants' paired per-repetition samples: {"ratio": median of a_i / b_i, "ci": [low, high],
    "coverage", "repeats", and "verdict" when a target is given (``verdict``)}."""
    if len(numerator) != len(denominator):
        raise ValueError(f"paired samples differ in length: {len(numerator)} and {len(denominator)}")
    median, low, high, covered = median_interval([a / b for a, b in zip(numerator, denominator)])
    out = {"ratio": median, "ci": [low, high], "coverage": covered, "repeats": len(numerator)}
    if op is not None:
        out["verdict"] = verdict((low, high), op, target, covered)
    return out


def judged(ratios: dict, targets: dict) -> dict:
    """The flat results of the ratios with a target: ``<name>_ratio``, ``<name>_ci`` and ``<name>_verdict``.

    ``ratios`` maps a name to a ``ratio`` dict, or to {key: ``ratio`` dict}
    (one per worker count, say), whose results are then dicts by key too;
    ``targets`` maps a name to (op, target). Names without a ratio are skipped.
    """
    def one(r, op, target):
        return r["ratio"], r["ci"], verdict(r["ci"], op, target, r["coverage"])

    out = {}
    for name, (op, target) in targets.items():
        if name not in ratios:
            continue
        r = ratios[name]
        if "ratio" in r:
            values = one(r, op, target)
        else:
            per_key = {key: one(v, op, target) for key, v in r.items()}
            values = tuple({key: v[i] for key, v in per_key.items()} for i in range(3))
        out[f"{name}_ratio"], out[f"{name}_ci"], out[f"{name}_verdict"] = values
    return out
