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

Two-level averaging counts two streams: the every-step mean of gradients and
model state inside a group (``TrainState.group_comm``, on fast links) and the
averaging across groups (``TrainState.comm``, on slow links).
``two_level_wall_clock`` times both on a cluster of H hosts of L devices.
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
    return _total(compute_s, rounds, per_round, steps, overlap)


def _total(compute_s: float, rounds: int, per_round: float, steps: Optional[int], overlap: bool) -> float:
    """compute + rounds * per_round, or with ideal overlap steps * max(compute / step, per_round)."""
    if not overlap:
        return compute_s + rounds * per_round
    if not steps or rounds != steps:
        raise ValueError("overlap applies to strategies that communicate every step (rounds == steps)")
    return steps * max(compute_s / steps, per_round)


def hierarchical_allreduce_time(nbytes: float, hosts: int, per_host: int, intra_bandwidth: float, inter_bandwidth: float,
                                intra_latency: float = 0.0, inter_latency: float = 0.0) -> float:
    """All-reduce of B bytes per worker over H hosts x L devices on a two-level network.

    Reduce-scatter inside each host (fast links beta_f, lambda_f), then L
    rings across hosts, one per shard of B / L, sharing each host's link
    (beta_s, lambda_s; the host's link carries 2(H - 1)/H * B in all), then
    all-gather inside the host:

        t = 2(L - 1) lambda_f + 2(L - 1)/L * B/beta_f + 2(H - 1) lambda_s + 2(H - 1)/H * B/beta_s
          = allreduce_time(B, L, beta_f, lambda_f) + allreduce_time(B, H, beta_s, lambda_s)

    Full sync's gradient mean and flat averaging (all N = H L replicas differ)
    pay this per round.
    """
    return (allreduce_time(nbytes, per_host, intra_bandwidth, intra_latency)
            + allreduce_time(nbytes, hosts, inter_bandwidth, inter_latency))


def hierarchical_allgather_time(nbytes: float, hosts: int, per_host: int, intra_bandwidth: float, inter_bandwidth: float,
                                intra_latency: float = 0.0, inter_latency: float = 0.0) -> float:
    """All-gather of B bytes per worker over H hosts x L devices (QSGD's messages):
    gather inside the host, then hosts exchange their L messages:

        t = allgather_time(B, L, beta_f, lambda_f) + allgather_time(L B, H, beta_s, lambda_s)

    (the copies of the other hosts' messages inside a host, at the fast rate,
    are left out).
    """
    return (allgather_time(nbytes, per_host, intra_bandwidth, intra_latency)
            + allgather_time(per_host * nbytes, hosts, inter_bandwidth, inter_latency))


def group_average_time(nbytes: float, hosts: int, per_host: int, intra_bandwidth: float, inter_bandwidth: float,
                       intra_latency: float = 0.0, inter_latency: float = 0.0) -> float:
    """Averaging B bytes across H hosts whose L devices hold identical copies
    (a two-level sync, groups = hosts).

    No reduction inside a host is needed: each device all-reduces one shard
    of B / L with its counterparts on the other hosts (L rings sharing the
    host's link), then the host all-gathers the averaged shards:

        t = allreduce_time(B, H, beta_s, lambda_s) + allgather_time(B / L, L, beta_f, lambda_f)
          = 2(H - 1) lambda_s + 2(H - 1)/H * B/beta_s + (L - 1) lambda_f + (L - 1)/L * B/beta_f
    """
    return (allreduce_time(nbytes, hosts, inter_bandwidth, inter_latency)
            + allgather_time(nbytes / per_host, per_host, intra_bandwidth, intra_latency))


def two_level_wall_clock(
    compute_s: float,
    rounds: int,
    nbytes_per_round: float,
    hosts: int,
    per_host: int,
    intra_bandwidth: float,
    inter_bandwidth: float,
    intra_latency: float = 0.0,
    inter_latency: float = 0.0,
    *,
    group_rounds: int = 0,
    group_nbytes_per_round: float = 0.0,
    grouped: bool = False,
    steps: Optional[int] = None,
    overlap: bool = False,
    gather: bool = False,
) -> float:
    """Simulated run time on H = ``hosts`` hosts of L = ``per_host`` devices:
    fast links inside a host (``intra_*``), slow ones between hosts (``inter_*``).

    A flat run (``grouped`` False: every replica differs) pays a hierarchical
    all-reduce (all-gather with ``gather``) per round:

        time = compute + rounds * hierarchical_allreduce_time(B, H, L)

    A two-level run (``grouped``: its groups are the hosts) pays the
    every-step mean inside the host and the averaging across hosts:

        time = compute + group_rounds * allreduce_time(B_g, L, beta_f, lambda_f)
                       + rounds * group_average_time(B, H, L)

    Args:
      compute_s: total measured compute time (all steps).
      rounds, nbytes_per_round: rounds and payload per worker per round of
        ``TrainState.comm`` (across groups for a two-level run).
      group_rounds, group_nbytes_per_round: the same for ``group_comm``.
      steps, overlap: ideal overlap of a flat every-step strategy's
        communication with its compute, as in ``simulated_wall_clock``.
    """
    links = (intra_bandwidth, inter_bandwidth, intra_latency, inter_latency)
    if grouped:
        inside = allreduce_time(group_nbytes_per_round, per_host, intra_bandwidth, intra_latency)
        across = group_average_time(nbytes_per_round, hosts, per_host, *links)
        return compute_s + group_rounds * inside + rounds * across
    collective = hierarchical_allgather_time if gather else hierarchical_allreduce_time
    return _total(compute_s, rounds, collective(nbytes_per_round, hosts, per_host, *links), steps, overlap)
