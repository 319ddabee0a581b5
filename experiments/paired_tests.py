"""Paired statistics of two methods run on the same seeds (runs of one seed
share data order and initialisation, so they pair), as the study's tables
and the demo's closing sentences use them:

* final training loss, d_k = (method - baseline) on seed k: the mean of d_k,
  its 95% t-interval mean +- t_{0.975, n-1} sd(d) / sqrt(n) (unadjusted),
  and the two-sided p-value of the paired t-test, t = mean / (sd / sqrt(n))
  on n - 1 degrees of freedom (no p with one seed; p = 0 when every d_k is
  the same non-zero value, 1 when all are 0);
* test accuracy, tested per example: the same test set is evaluated by both
  models, so each example of seed k is a pair (method right?, baseline
  right?). With b_k = examples the method gets right and the baseline
  wrong, c_k the reverse, the stratified McNemar test pooled over the seeds
  is the exact binomial test of sum b of sum (b + c) discordant pairs at
  1/2 (two-sided; p = 1 without a discordant pair). The difference is
  D = sum_k (b_k - c_k) / (n S) over S seeds of n examples, with the Wald
  interval D +- 1.96 sqrt(sum_k v_k) / S, v_k = ((b_k + c_k)/n - d_k^2) / n
  the paired-proportion variance of d_k = (b_k - c_k) / n. Both treat the
  seeds' trained models as fixed strata: they measure how far the test
  set's sampling explains the difference, not the spread over seeds.
  Summaries without the per-example array (``test_correct``, older runs)
  give n/a.

Multiple comparisons: the p-values of a family (a study table's rows,
``experiments/study_report.py``) are Holm-adjusted together (step-down:
the i-th smallest of m is multiplied by m - i + 1, capped at 1, made
monotone). Holm controls the family-wise error
rate: the chance that any verdict of the table is wrong is at most 5%,
which a claim over the whole table ("lower in every setting", "higher
nowhere") needs; Benjamini-Hochberg would bound only the expected share of
wrong verdicts among the significant ones (FDR). The verdict is ``lower``
/ ``higher`` (by the sign of the mean difference) when the adjusted p is
below 0.05, else ``inconclusive``; the raw verdict, from the unadjusted p,
is kept beside it, and the page counts the verdicts the correction changes.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import stats

VERDICTS = ("lower", "higher", "inconclusive")
ALPHA = 0.05  # the family-wise error rate of a table's verdicts


def paired(differences) -> tuple[float, float, float]:
    """(mean, low, high): the mean of paired differences with its 95% t-interval
    mean +- t_{0.975, n-1} sd / sqrt(n) (NaN bounds with fewer than 2 pairs)."""
    d = np.asarray(differences, float)
    mean = float(d.mean()) if d.size else math.nan
    if d.size < 2:
        return mean, math.nan, math.nan
    half = float(stats.t.ppf(0.975, d.size - 1) * d.std(ddof=1) / math.sqrt(d.size))
    return mean, mean - half, mean + half


def paired_p(differences) -> float:
    """Two-sided p of the paired t-test of mean(d) = 0 (NaN with fewer than 2 pairs)."""
    d = np.asarray(differences, float)
    if d.size < 2:
        return math.nan
    sd = d.std(ddof=1)
    if sd == 0:
        return 1.0 if d.mean() == 0 else 0.0
    t = d.mean() / (sd / math.sqrt(d.size))
    return float(2 * stats.t.sf(abs(t), d.size - 1))


def holm(pvalues) -> list[float]:
    """Holm's step-down adjustment of a family of p-values (NaN entries stay NaN, outside the family)."""
    p = np.asarray(pvalues, float)
    adjusted = np.full(p.shape, math.nan)
    finite = np.flatnonzero(~np.isnan(p))
    order = finite[np.argsort(p[finite], kind="stable")]
    m, running = len(order), 0.0
    for i, index in enumerate(order):
        running = max(running, min(1.0, (m - i) * p[index]))
        adjusted[index] = running
    return [float(x) for x in adjusted]


def decide(mean: float, p: float, alpha: float = ALPHA) -> str:
    """``lower`` / ``higher`` by the sign of the mean when p < alpha, else ``inconclusive`` (also NaN p)."""
    if not p < alpha or mean == 0:
        return "inconclusive"
    return "lower" if mean < 0 else "higher"


def verdict(low: float, high: float) -> str:
    """``lower`` / ``higher`` when the whole interval is below / above 0, else ``inconclusive``."""
    if high < 0:
        return "lower"
    if low > 0:
        return "higher"
    return "inconclusive"  # also NaN bounds (one seed)


def per_example(pairs: list) -> dict:
    """The stratified paired test of accuracy: ``pairs`` [(mine, base)] boolean correctness arrays, one
    pair per seed over the same examples. Returns b, c (summed), n (examples per seed), the difference
    D, its 95% Wald interval and the exact two-sided binomial p of b in b + c."""
    n = len(pairs[0][0])
    b = np.array([int(np.sum(m & ~o)) for m, o in pairs])
    c = np.array([int(np.sum(~m & o)) for m, o in pairs])
    d = (b - c) / n
    var = np.maximum((b + c) / n - d**2, 0.0) / n
    diff, half = float(d.mean()), 1.959963984540054 * math.sqrt(var.sum()) / len(pairs)
    B, C = int(b.sum()), int(c.sum())
    p = float(stats.binomtest(B, B + C, 0.5).pvalue) if B + C else 1.0
    return {"b": B, "c": C, "n": n, "diff": diff, "ci": [diff - half, diff + half], "p": p}
