"""The study's statistics: Holm's adjustment, the paired t-test's p, the per-example accuracy test
(stratified McNemar, exact binomial), and the per-example correctness a summary keeps (its packing and
its order)."""

import itertools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

import adpsgd_jax as A
from adpsgd_jax import distributed
from experiments import data, paired_tests, results, train


def test_holm_on_a_hand_computed_family():
    # Sorted: 0.005 x 4 = 0.02, 0.01 x 3 = 0.03, 0.03 x 2 = 0.06, 0.04 x 1 = 0.04 -> 0.06 (monotone).
    assert paired_tests.holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert paired_tests.holm([0.5, 0.9]) == [1.0, 1.0]  # capped at 1
    adjusted = paired_tests.holm([0.02, math.nan, 0.01])  # NaN (one seed) is outside the family: m = 2
    assert adjusted[0] == pytest.approx(0.02) and math.isnan(adjusted[1]) and adjusted[2] == pytest.approx(0.02)


def holm_by_closed_testing(p):
    """Holm as the closed test of Bonferroni: H_i is rejected at level a iff every intersection of
    hypotheses containing i has min p * |set| <= a, so its adjusted p is the largest of those minima."""
    m = len(p)
    adjusted = []
    for i in range(m):
        worst = 0.0
        for size in range(1, m + 1):
            for subset in itertools.combinations(range(m), size):
                if i in subset:
                    worst = max(worst, min(1.0, size * min(p[j] for j in subset)))
        adjusted.append(worst)
    return adjusted


def test_holm_agrees_with_the_closed_bonferroni_test():
    rng = np.random.default_rng(0)
    for _ in range(20):
        p = list(rng.uniform(0, 0.2, size=int(rng.integers(1, 8))) ** 2)
        assert paired_tests.holm(p) == pytest.approx(holm_by_closed_testing(p), abs=1e-12)


def test_paired_p_is_scipys_paired_t_test():
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=5), rng.normal(size=5) + 0.5
    assert paired_tests.paired_p(a - b) == pytest.approx(stats.ttest_rel(a, b).pvalue, rel=1e-10)
    assert math.isnan(paired_tests.paired_p([0.1]))
    assert paired_tests.paired_p([0.2, 0.2]) == 0.0 and paired_tests.paired_p([0.0, 0.0]) == 1.0
    assert paired_tests.decide(-0.1, 0.01) == "lower" and paired_tests.decide(0.1, 0.049) == "higher"
    assert paired_tests.decide(-0.1, 0.05) == "inconclusive" and paired_tests.decide(-0.1, math.nan) == "inconclusive"


def seed_pair(n, b, c, both, rng):
    """Correctness arrays over n examples: b right only for the method, c only for the baseline, ``both``
    right for both, the rest wrong for both, shuffled."""
    kinds = np.array([0] * b + [1] * c + [2] * both + [3] * (n - b - c - both))
    rng.shuffle(kinds)
    return (kinds == 0) | (kinds == 2), (kinds == 1) | (kinds == 2)


def test_per_example_test_on_known_counts():
    rng, n = np.random.default_rng(2), 360
    counts = [(9, 3), (7, 2), (8, 4)]  # (b_k, c_k) per seed
    pairs = [seed_pair(n, b, c, 300, rng) for b, c in counts]
    t = paired_tests.per_example(pairs)
    assert (t["b"], t["c"], t["n"]) == (24, 9, n)
    assert t["p"] == pytest.approx(stats.binomtest(24, 33, 0.5).pvalue, rel=1e-12)
    d = np.array([(b - c) / n for b, c in counts])
    assert t["diff"] == pytest.approx(15 / (3 * n)) == pytest.approx(d.mean())
    var = sum(((b + c) / n - dk**2) / n for (b, c), dk in zip(counts, d))
    half = stats.norm.ppf(0.975) * math.sqrt(var) / 3
    assert t["ci"] == pytest.approx([d.mean() - half, d.mean() + half])
    same = paired_tests.per_example([seed_pair(n, 0, 0, 200, rng)])  # no discordant pair
    assert (same["b"], same["c"], same["p"], same["diff"]) == (0, 0, 1.0, 0.0)


@pytest.mark.parametrize("n", [1, 7, 8, 360, 10_000])
def test_pack_and_unpack_round_trip(n):
    correct = np.random.default_rng(n).random(n) < 0.9
    packed = results.pack_correct(correct)
    assert packed["count"] == n and len(packed["packbits"]) == 4 * math.ceil(math.ceil(n / 8) / 3)
    np.testing.assert_array_equal(results.unpack_correct(packed), correct)
    assert results.unpack_correct(None) is None


class Replicas(NamedTuple):
    params: Any
    model_state: Any


@pytest.mark.parametrize("workers,devices", [(7, 1), (8, 4)])
def test_per_example_values_come_back_in_the_test_sets_order_once_each(workers, devices):
    # An eval_fn whose "correct" is a function of the label alone: what comes back must be that function
    # of the labels in the set's order, each example once, whatever the workers, devices and padding.
    ds = data.load("digits")
    layout = distributed.workers(workers, jax.devices()[:devices])
    split = train._eval_set(ds.test_images, ds.test_labels, layout, 16)  # 360 = 3 chunks, the last padded

    def eval_fn(params, model_state, chunk):
        return {"loss": jnp.zeros(chunk["label"].shape), "correct": (chunk["label"] % 3 == 0).astype(jnp.float32)}

    state = distributed.replicate(Replicas({"w": jnp.zeros(2)}, {}), layout)
    step = distributed.shard_map_step(A.make_eval_step(eval_fn, layout.axes, ("correct",)), layout, donate_state=False)
    out = step(state, split)
    got = train._in_order(out["per_example"]["correct"], len(ds.test_labels))
    np.testing.assert_array_equal(got, ds.test_labels % 3 == 0)
    assert float(distributed.local_rows(out["correct"])[0]) == got.sum()
