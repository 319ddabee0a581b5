"""The time model (docs/algorithm.md, "Time model"): ring collectives, run times, two-level clusters."""

import os
import subprocess
import sys

import pytest

from adpsgd_jax import timemodel as tm
from adpsgd_jax.timemodel import Link

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_allreduce_time_formula():
    # 2(N-1) lambda + 2(N-1)/N * B / beta
    assert tm.allreduce_time(1e9, 8, Link(1.25e9, 5e-6)) == pytest.approx(14 * 5e-6 + 1.75 * 0.8)
    assert tm.allreduce_time(123.0, 1, Link(1e9, 1e-3)) == 0.0  # one worker: nothing to send
    # Bandwidth term tends to 2 B / beta for large N.
    assert tm.allreduce_time(1e9, 10**6, Link(1e9)) == pytest.approx(2.0, rel=1e-5)


def test_allgather_time_formula():
    assert tm.allgather_time(1e6, 8, Link(1e9, 1e-5)) == pytest.approx(7 * 1e-5 + 7 * 1e-3)
    # Per-array cost: (N-1)(lambda + k lambda_a).
    assert tm.allgather_time(1e6, 8, Link(1e9, 1e-5, 2e-6), arrays=3) == pytest.approx(7 * (1e-5 + 6e-6) + 7e-3)


def test_per_array_latency_is_the_gloo_aware_model_of_netbench():
    """experiments/netmodel.py's two models, as they were written before they moved to ``Link``:
    docs/algorithm.md's, one latency per round, ``allreduce_time(B, N, rate, latency)``, and the
    gloo-aware one, one ring per array, ``allreduce_time(B, N, rate, latency * arrays)``."""
    def old_allreduce_time(nbytes, n, bandwidth, latency):
        return 2 * (n - 1) * latency + 2 * (n - 1) / n * nbytes / bandwidth

    cases = [(40_000, 2, 11.8e6, 0.3e-3, 4), (605_000, 4, 8e8, 1.7e-4, 9), (1.0, 3, 1e9, 1e-6, 1)]
    for nbytes, n, rate, lam, k in cases:
        gloo = tm.allreduce_time(nbytes, n, Link(rate, 0.0, per_array_latency=lam), arrays=k)
        assert gloo == old_allreduce_time(nbytes, n, rate, lam * k)  # exactly: the same float operations
        model = tm.allreduce_time(nbytes, n, Link(rate, lam), arrays=k)  # no per-array term: k does not count
        assert model == old_allreduce_time(nbytes, n, rate, lam)
    # Both terms together: 2(N-1)(lambda + k lambda_a) + 2(N-1)/N B / beta.
    both = tm.allreduce_time(1e6, 4, Link(1e8, 1e-5, 2e-6), arrays=5)
    assert both == pytest.approx(6 * (1e-5 + 1e-5) + 1.5 * 1e-2)


def test_simulated_wall_clock():
    link = Link(1.25e9)
    t = tm.simulated_wall_clock(10.0, rounds=100, nbytes_per_round=4e6, num_workers=8, link=link)
    assert t == pytest.approx(10.0 + 100 * tm.allreduce_time(4e6, 8, link))
    # Ideal overlap: per step max(compute, comm).
    t_ov = tm.simulated_wall_clock(10.0, rounds=100, nbytes_per_round=4e6, num_workers=8, link=link,
                                   steps=100, overlap=True)
    assert t_ov == pytest.approx(100 * max(0.1, tm.allreduce_time(4e6, 8, link)))
    with pytest.raises(ValueError, match="overlap"):
        tm.simulated_wall_clock(1.0, 10, 1.0, 8, Link(1e9), steps=100, overlap=True)
    assert tm.simulated_wall_clock(0.0, 1, 1e6, 8, Link(1e9), gather=True) == pytest.approx(7e-3)
    slow = Link(1e9, 0.0, 1e-4)
    assert tm.simulated_wall_clock(1.0, 10, 1e6, 2, slow, arrays=7) == pytest.approx(1.0 + 10 * (2 * 7e-4 + 1e-3))


def test_two_level_time_formulas():
    B, H, L = 4e6, 4, 8
    fast, slow = Link(300e9, 1e-6), Link(1.25e9, 1e-5)
    # Hierarchical all-reduce: 2(L-1) lf + 2(L-1)/L B/fast + 2(H-1) ls + 2(H-1)/H B/slow.
    expected = 2 * 7 * 1e-6 + 2 * 7 / 8 * B / 300e9 + 2 * 3 * 1e-5 + 2 * 3 / 4 * B / 1.25e9
    hierarchical = tm.hierarchical_allreduce_time
    assert hierarchical(B, H, L, fast, slow) == pytest.approx(expected)
    # One device per host: the flat ring across hosts; one host: the ring inside it.
    assert hierarchical(B, H, 1, fast, slow) == pytest.approx(tm.allreduce_time(B, H, slow))
    assert hierarchical(B, 1, L, fast, slow) == pytest.approx(tm.allreduce_time(B, L, fast))
    # Averaging identical copies across hosts skips the reduction inside: ring across + shard all-gather inside.
    expected = 2 * 3 * 1e-5 + 2 * 3 / 4 * B / 1.25e9 + 7 * 1e-6 + 7 / 8 * B / 300e9
    assert tm.group_average_time(B, H, L, fast, slow) == pytest.approx(expected)
    assert tm.group_average_time(B, H, L, fast, slow) < hierarchical(B, H, L, fast, slow)
    gathered = tm.hierarchical_allgather_time(B, H, L, fast, slow)
    assert gathered == pytest.approx(7 * 1e-6 + 7 * B / 300e9 + 3 * 1e-5 + 3 * 8 * B / 1.25e9)


def test_two_level_wall_clock():
    B, Bg, H, L = 4e6, 4e6, 4, 8
    fast, slow = Link(300e9), Link(1.25e9)
    grouped = tm.two_level_wall_clock(10.0, 12, B, H, L, fast, slow, group_rounds=100, group_nbytes_per_round=Bg,
                                      grouped=True)
    inside, across = tm.allreduce_time(Bg, L, fast), tm.group_average_time(B, H, L, fast, slow)
    assert grouped == pytest.approx(10.0 + 100 * inside + 12 * across)
    flat = tm.two_level_wall_clock(10.0, 100, B, H, L, fast, slow)
    assert flat == pytest.approx(10.0 + 100 * tm.hierarchical_allreduce_time(B, H, L, fast, slow))
    overlapped = tm.two_level_wall_clock(10.0, 100, B, H, L, fast, slow, steps=100, overlap=True)
    assert overlapped == pytest.approx(100 * max(0.1, tm.hierarchical_allreduce_time(B, H, L, fast, slow)))
    # Keeping the gradient mean on the fast links: the two-level run crosses hosts 12 times instead of 100.
    assert grouped < flat


def test_importing_the_time_model_starts_no_jax():
    code = "import sys, adpsgd_jax.timemodel; print('jax' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "False"
