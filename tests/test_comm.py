"""Byte counting and the ring all-reduce time model."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from adpsgd_jax import comm


def test_tree_bytes_counts_every_leaf():
    tree = {"w": jnp.zeros((3, 4), jnp.float32), "h": jnp.zeros((5,), jnp.bfloat16), "s": jax.ShapeDtypeStruct((2,), jnp.int32)}
    assert comm.tree_bytes(tree) == 48 + 10 + 8


def test_allreduce_time_formula():
    # 2(N-1) lambda + 2(N-1)/N * B / beta
    assert comm.allreduce_time(1e9, 8, 1.25e9, 5e-6) == pytest.approx(14 * 5e-6 + 1.75 * 0.8)
    assert comm.allreduce_time(123.0, 1, 1e9, 1e-3) == 0.0  # one worker: nothing to send
    # Bandwidth term tends to 2 B / beta for large N.
    assert comm.allreduce_time(1e9, 10**6, 1e9) == pytest.approx(2.0, rel=1e-5)


def test_allgather_time_formula():
    assert comm.allgather_time(1e6, 8, 1e9, 1e-5) == pytest.approx(7 * 1e-5 + 7 * 1e-3)


def test_counter_is_exact_beyond_int32():
    counter = comm.CommCounter.zeros()
    add = jax.jit(lambda c, r: c.add(r, 3_000_000_123))  # ~2.8 GiB per round
    for _ in range(5):
        counter = add(counter, jnp.int32(1))
    counter = add(counter, jnp.int32(0))
    assert int(counter.rounds) == 5
    assert comm.total_bytes(counter) == 5 * 3_000_000_123
    assert all(x.dtype == jnp.int32 for x in counter)


def test_simulated_wall_clock():
    t = comm.simulated_wall_clock(10.0, rounds=100, nbytes_per_round=4e6, num_workers=8, bandwidth=1.25e9)
    assert t == pytest.approx(10.0 + 100 * comm.allreduce_time(4e6, 8, 1.25e9))
    # Ideal overlap: per step max(compute, comm).
    t_ov = comm.simulated_wall_clock(10.0, rounds=100, nbytes_per_round=4e6, num_workers=8,
                                     bandwidth=1.25e9, steps=100, overlap=True)
    assert t_ov == pytest.approx(100 * max(0.1, comm.allreduce_time(4e6, 8, 1.25e9)))
    with pytest.raises(ValueError, match="overlap"):
        comm.simulated_wall_clock(1.0, 10, 1.0, 8, 1e9, steps=100, overlap=True)
    gathered = comm.simulated_wall_clock(0.0, 1, 1e6, 8, 1e9, gather=True)
    assert gathered == pytest.approx(comm.allgather_time(1e6, 8, 1e9))
    assert np.isfinite(gathered)


def test_two_level_time_formulas():
    B, H, L, fast, slow, lf, ls = 4e6, 4, 8, 300e9, 1.25e9, 1e-6, 1e-5
    # Hierarchical all-reduce: 2(L-1) lf + 2(L-1)/L B/fast + 2(H-1) ls + 2(H-1)/H B/slow.
    expected = 2 * 7 * lf + 2 * 7 / 8 * B / fast + 2 * 3 * ls + 2 * 3 / 4 * B / slow
    assert comm.hierarchical_allreduce_time(B, H, L, fast, slow, lf, ls) == pytest.approx(expected)
    # One device per host: the flat ring across hosts; one host: the ring inside it.
    hierarchical = comm.hierarchical_allreduce_time
    assert hierarchical(B, H, 1, fast, slow, lf, ls) == pytest.approx(comm.allreduce_time(B, H, slow, ls))
    assert hierarchical(B, 1, L, fast, slow, lf, ls) == pytest.approx(comm.allreduce_time(B, L, fast, lf))
    # Averaging identical copies across hosts skips the reduction inside: ring across + shard all-gather inside.
    expected = 2 * 3 * ls + 2 * 3 / 4 * B / slow + 7 * lf + 7 / 8 * B / fast
    assert comm.group_average_time(B, H, L, fast, slow, lf, ls) == pytest.approx(expected)
    assert comm.group_average_time(B, H, L, fast, slow, lf, ls) < hierarchical(B, H, L, fast, slow, lf, ls)
    gathered = comm.hierarchical_allgather_time(B, H, L, fast, slow, lf, ls)
    assert gathered == pytest.approx(7 * lf + 7 * B / fast + 3 * ls + 3 * 8 * B / slow)


def test_two_level_wall_clock():
    B, Bg, H, L, fast, slow = 4e6, 4e6, 4, 8, 300e9, 1.25e9
    grouped = comm.two_level_wall_clock(10.0, 12, B, H, L, fast, slow, group_rounds=100, group_nbytes_per_round=Bg,
                                        grouped=True)
    inside, across = comm.allreduce_time(Bg, L, fast), comm.group_average_time(B, H, L, fast, slow)
    assert grouped == pytest.approx(10.0 + 100 * inside + 12 * across)
    flat = comm.two_level_wall_clock(10.0, 100, B, H, L, fast, slow)
    assert flat == pytest.approx(10.0 + 100 * comm.hierarchical_allreduce_time(B, H, L, fast, slow))
    overlapped = comm.two_level_wall_clock(10.0, 100, B, H, L, fast, slow, steps=100, overlap=True)
    assert overlapped == pytest.approx(100 * max(0.1, comm.hierarchical_allreduce_time(B, H, L, fast, slow)))
    # Keeping the gradient mean on the fast links: the two-level run crosses hosts 12 times instead of 100.
    assert grouped < flat
