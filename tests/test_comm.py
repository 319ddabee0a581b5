"""Byte counting: the bytes of a tree and the exact counter (QSGD's sizes: test_collectives.py)."""

import jax
import jax.numpy as jnp

from adpsgd_jax import comm


def test_tree_bytes_counts_every_leaf():
    tree = {"w": jnp.zeros((3, 4), jnp.float32), "h": jnp.zeros((5,), jnp.bfloat16), "s": jax.ShapeDtypeStruct((2,), jnp.int32)}
    assert comm.tree_bytes(tree) == 48 + 10 + 8


def test_counter_is_exact_beyond_int32():
    counter = comm.CommCounter.zeros()
    add = jax.jit(lambda c, r: c.add(r, 3_000_000_123))  # ~2.8 GiB per round
    for _ in range(5):
        counter = add(counter, jnp.int32(1))
    counter = add(counter, jnp.int32(0))
    assert int(counter.rounds) == 5
    assert comm.total_bytes(counter) == 5 * 3_000_000_123
    assert all(x.dtype == jnp.int32 for x in counter)
