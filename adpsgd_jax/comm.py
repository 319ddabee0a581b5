"""Communication accounting: bytes per round and the ring all-reduce time model.

Byte counts are the payload one worker contributes to a collective (B in the
time model), not the traffic the ring moves; ``allreduce_time`` turns B into
seconds (ALGORITHM.md, "Communication cost model").

What each strategy sends per communication round:

* ``average``: every parameter and model-state leaf (and optimizer-state leaf
  when it is averaged), plus one 8-byte pair of scalars (the variance term
  and the loss, reduced together).
* ``allreduce``: every gradient leaf (same bytes as the parameters) and the
  model state.
* ``qsgd``: per bucket of ``bucket_size`` coordinates, a 32-bit norm and
  ``1 + ceil(log2(s + 1))`` bits per coordinate, rounded up to whole bytes
  per leaf; plus the model state. These are the bit-packed sizes of
  ALGORITHM.md; the collective itself moves int8 (or int16) levels with
  signs, which equals the packed size for s = 127.
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


def allreduce_time(nbytes: float, num_workers: int, bandwidth: float, latency: float = 0.0) -> float:
    """Ring all-reduce time: t = 2(N - 1) * latency + 2 (N - 1) / N * B / bandwidth.

    Args:
      nbytes: B, the payload per worker in bytes.
      num_workers: N.
      bandwidth: link bandwidth beta in bytes per second.
      latency: per-message latency lambda in seconds.
    """
    n = num_workers
    return 2 * (n - 1) * latency + 2 * (n - 1) / n * nbytes / bandwidth


def allgather_time(nbytes: float, num_workers: int, bandwidth: float, latency: float = 0.0) -> float:
    """Ring all-gather time: t = (N - 1) * latency + (N - 1) * B / bandwidth.

    QSGD's quantised messages cannot be summed in the ring, so each worker
    receives all N - 1 others (the model this library's ``qsgd`` strategy runs).
    """
    n = num_workers
    return (n - 1) * latency + (n - 1) * nbytes / bandwidth


class CommCounter(NamedTuple):
    """Cumulative communication, exact in int32 arithmetic.

    Bytes are held as ``gib * 2^30 + low`` so the count is exact far beyond
    the 2 GiB an int32 holds; read it on the host with ``total_bytes``.
    """

    syncs: jnp.ndarray  # int32[]: communication rounds so far.
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
            syncs=self.syncs + rounds,
            gib=self.gib + rounds * hi + carry,
            low=low & ((1 << _LOW_BITS) - 1),
        )


def total_bytes(counter: CommCounter) -> int:
    """Host-side exact byte count of a (possibly replicated) ``CommCounter``."""
    def first(x):  # works on per-worker arrays of a multi-process run too
        x = x.addressable_shards[0].data if hasattr(x, "addressable_shards") else x
        return int(np.asarray(x).reshape(-1)[0])

    return (first(counter.gib) << _LOW_BITS) + first(counter.low)


def simulated_wall_clock(
    compute_s: float,
    rounds: int,
    nbytes_per_round: float,
    num_workers: int,
    bandwidth: float,
    latency: float = 0.0,
    steps: Optional[int] = None,
    overlap: bool = False,
    gather: bool = False,
) -> float:
    """Simulated run time = sum of compute + sum over rounds of the collective time.

    Args:
      compute_s: total measured compute time of the run (all steps).
      rounds: number of communication rounds.
      nbytes_per_round: payload per worker per round.
      steps: number of steps (needed with ``overlap``).
      overlap: ideal overlap of communication with the backward pass, for a
        strategy that communicates every step: each step costs
        max(t_compute, t_comm) instead of their sum.
      gather: use the all-gather model (QSGD) instead of all-reduce.
    """
    per_round = (allgather_time if gather else allreduce_time)(nbytes_per_round, num_workers, bandwidth, latency)
    if not overlap:
        return compute_s + rounds * per_round
    if not steps or rounds != steps:
        raise ValueError("overlap applies to strategies that communicate every step (rounds == steps)")
    return steps * max(compute_s / steps, per_round)
