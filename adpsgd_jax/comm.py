"""Communication accounting: the bytes each strategy sends per round, and an
exact in-jit counter of them.

Byte counts are the payload one worker contributes to a collective (B of the
time model, docs/algorithm.md, "Time model"), not the traffic the ring moves;
``adpsgd_jax.timemodel`` turns B and the counted rounds into seconds.

What each strategy sends per communication round:

* ``average``: every parameter and model-state leaf (and optimizer-state leaf
  when it is averaged), plus one 8-byte pair of scalars (the variance term
  and the loss, reduced together).
* ``allreduce``: every gradient leaf (same bytes as the parameters) and the
  model state.
* ``qsgd``: per bucket of ``bucket_size`` coordinates, a 32-bit norm and
  ``1 + ceil(log2(s + 1))`` bits per coordinate, rounded up to whole bytes
  per leaf; plus the model state. These are the bit-packed sizes of
  docs/algorithm.md; the collective itself moves int8 (or int16) levels with
  signs, which equals the packed size for s = 127.

Two-level averaging counts two streams: the every-step mean of gradients and
model state inside a group (``TrainState.group_comm``, on fast links) and the
averaging across groups (``TrainState.comm``, on slow links);
``timemodel.two_level_wall_clock`` times both.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

_LOW_BITS = 30  # The exact byte counter keeps bytes mod 2^30 in one int32 word.


def tree_bytes(tree: Any) -> int:
    """Total bytes of the array leaves of ``tree`` (arrays or ShapeDtypeStructs)."""
    return sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def qsgd_leaf_bits(size: int, levels: int, bucket_size: Optional[int]) -> int:
    """Bits to send one quantised leaf of ``size`` coordinates with s = ``levels``.

    bits = 32 * num_buckets + size * (1 + ceil(log2(s + 1))).
    """
    if size == 0:
        return 0
    buckets = 1 if bucket_size is None else math.ceil(size / bucket_size)
    return 32 * buckets + size * (1 + math.ceil(math.log2(levels + 1)))


def qsgd_bytes(tree: Any, levels: int, bucket_size: Optional[int] = None) -> int:
    """Compressed bytes of one worker's QSGD message for gradient tree ``tree``."""
    return sum(
        math.ceil(qsgd_leaf_bits(int(np.prod(x.shape)), levels, bucket_size) / 8) for x in jax.tree.leaves(tree)
    )


class CommCounter(NamedTuple):
    """Cumulative communication, exact in int32 arithmetic.

    Bytes are held as ``gib * 2^30 + low`` so the count is exact far beyond
    the 2 GiB an int32 holds; read it on the host with ``total_bytes``.
    """

    rounds: jnp.ndarray  # int32[]: communication rounds so far (syncs, or every step of a full-sync strategy).
    gib: jnp.ndarray  # int32[]: whole GiB.
    low: jnp.ndarray  # int32[]: remaining bytes, in [0, 2^30).

    @classmethod
    def zeros(cls) -> "CommCounter":
        zero = jnp.zeros((), jnp.int32)
        return cls(zero, zero, zero)

    def add(self, rounds, nbytes: int) -> "CommCounter":
        """Add ``rounds`` (int32[], 0 or 1 in a step) rounds of ``nbytes`` each."""
        hi, lo = divmod(int(nbytes), 1 << _LOW_BITS)
        low = self.low + rounds * lo
        carry = low >> _LOW_BITS
        return CommCounter(
            rounds=self.rounds + rounds,
            gib=self.gib + rounds * hi + carry,
            low=low & ((1 << _LOW_BITS) - 1),
        )


def total_bytes(counter: CommCounter) -> int:
    """Host-side exact byte count of a (possibly replicated) ``CommCounter``."""
    def first(x):  # works on per-worker arrays of a multi-process run too
        x = x.addressable_shards[0].data if hasattr(x, "addressable_shards") else x
        return int(np.asarray(x).reshape(-1)[0])

    return (first(counter.gib) << _LOW_BITS) + first(counter.low)
