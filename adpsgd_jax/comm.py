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
* ``qsgd``: exactly the arrays its all-gather sends, per leaf: the signed
  levels of every bucket, the last bucket's zero padding included, packed
  two per byte for s <= 7 (4 bits), as int8 for s <= 127 and int16 above;
  and one float32 norm per bucket. Plus the model state. 1 sign bit and
  ``ceil(log2(s + 1))`` level bits per coordinate (QSGD's bit count) fit in
  these containers, and fill them at s = 7 and s = 127.

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


# QSGD's wire format (``collectives.qsgd_pack``): the largest s of each container of the signed levels.
NIBBLE_MAX_LEVELS = 7  # two levels per uint8, each offset by +7 into a 4-bit nibble 0..14
INT8_MAX_LEVELS = 127  # one int8 per level; larger s (up to limits.MAX_QSGD_LEVELS) one int16


def qsgd_level_bits(levels: int) -> int:
    """Bits a signed level in [-s, s] takes on the wire: 4 (s <= 7), 8 (s <= 127) or 16."""
    return 4 if levels <= NIBBLE_MAX_LEVELS else 8 if levels <= INT8_MAX_LEVELS else 16


def qsgd_buckets(size: int, bucket_size: Optional[int]) -> tuple[int, int]:
    """(rows, width) of a leaf of ``size`` > 0 coordinates cut into buckets: width =
    min(bucket_size, size) (size when None), rows = ceil(size / width); the last row is zero-padded."""
    width = size if bucket_size is None else min(bucket_size, size)
    return -(-size // width), width


def qsgd_leaf_bytes(size: int, levels: int, bucket_size: Optional[int]) -> int:
    """Bytes one worker all-gathers for a quantised leaf of ``size`` coordinates:

    ceil(rows * width * level_bits / 8) (the levels, padding included) + 4 * rows (float32 norms).
    """
    if size == 0:
        return 0
    rows, width = qsgd_buckets(size, bucket_size)
    return math.ceil(rows * width * qsgd_level_bits(levels) / 8) + 4 * rows


def qsgd_bytes(tree: Any, levels: int, bucket_size: Optional[int] = None) -> int:
    """Bytes of one worker's QSGD message for gradient tree ``tree``: the sum of ``qsgd_leaf_bytes``."""
    return sum(qsgd_leaf_bytes(int(np.prod(x.shape)), levels, bucket_size) for x in jax.tree.leaves(tree))


class CommCounter(NamedTuple):
    """Cumulative communication, exact in int32 arithmetic.

    Bytes are held as ``gib * 2^30 + low`` so the count is exact far beyond
    the 2 GiB an int32 holds; read it on the host with ``total_bytes``.
    """

    rounds: jnp.ndarray  # int32[]: communication rounds so far (syncs, or every step of a gradient-mean strategy).
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
