"""The time model: counted bytes and rounds turned into seconds (docs/algorithm.md, "Time model").

Pure Python (no jax), so a report or a benchmark can predict without a device.

A link is a ``Link(bandwidth, latency, per_array_latency)``: bandwidth beta
in bytes per second, lambda the latency of one message, lambda_a a fixed cost
per all-reduced array and ring step. B is the payload one worker contributes
to a collective (what ``comm`` counts), N the number of workers, k the
number of arrays in one round. A ring all-reduce of B bytes costs

    t_allreduce = 2(N - 1) (lambda + k lambda_a) + 2(N - 1)/N * B / beta

and a ring all-gather (QSGD's messages, which the ring cannot sum)

    t_allgather = (N - 1) (lambda + k lambda_a) + (N - 1) * B / beta.

lambda_a is 0 in the model as written (one latency per message of the
round); a runtime that runs one ring per array, as gloo does, pays it per
array (``experiments/net/model.py`` calibrates it on a measured link and
then uses ``Link(rate, 0.0, lambda_a)``). Run times add compute and rounds:

    time = compute + rounds * t_round

and two-level clusters (H hosts of L devices, fast links inside a host,
slow ones between hosts) combine the two rings (``two_level_wall_clock``).
"""

from __future__ import annotations

from typing import NamedTuple, Optional


class Link(NamedTuple):
    """One kind of link: ``bandwidth`` beta in bytes/s, ``latency`` lambda per message in s,
    ``per_array_latency`` lambda_a per all-reduced array and ring step in s."""

    bandwidth: float
    latency: float = 0.0
    per_array_latency: float = 0.0

    def step_latency(self, arrays: int) -> float:
        """lambda + k lambda_a: the fixed cost of one ring step of a round of ``arrays`` arrays."""
        return self.latency + arrays * self.per_array_latency


def allreduce_time(nbytes: float, num_workers: int, link: Link, arrays: int = 1) -> float:
    """Ring all-reduce time: t = 2(N - 1) (lambda + k lambda_a) + 2(N - 1)/N * B / beta.

    Args:
      nbytes: B, the payload per worker in bytes.
      num_workers: N.
      link: beta, lambda, lambda_a.
      arrays: k, the arrays all-reduced in the round (counts only with lambda_a).
    """
    n = num_workers
    return 2 * (n - 1) * link.step_latency(arrays) + 2 * (n - 1) / n * nbytes / link.bandwidth


def allgather_time(nbytes: float, num_workers: int, link: Link, arrays: int = 1) -> float:
    """Ring all-gather time: t = (N - 1) (lambda + k lambda_a) + (N - 1) * B / beta.

    QSGD's quantised messages cannot be summed in the ring, so each worker
    receives all N - 1 others (the model this library's ``qsgd`` strategy runs).
    """
    n = num_workers
    return (n - 1) * link.step_latency(arrays) + (n - 1) * nbytes / link.bandwidth


def simulated_wall_clock(
    compute_s: float,
    rounds: int,
    nbytes_per_round: float,
    num_workers: int,
    link: Link,
    arrays: int = 1,
    steps: Optional[int] = None,
    overlap: bool = False,
    gather: bool = False,
) -> float:
    """Simulated run time = compute + rounds * t_round (all-reduce, or all-gather with ``gather``).

    Args:
      compute_s: total measured compute time of the run (all steps).
      rounds: number of communication rounds.
      nbytes_per_round: B, payload per worker per round.
      num_workers, link, arrays: as in ``allreduce_time``.
      steps: number of steps (needed with ``overlap``).
      overlap: ideal overlap of communication with the backward pass, for a
        strategy that communicates every step: each step costs
        max(t_compute, t_round) instead of their sum.
      gather: use the all-gather model (QSGD) instead of all-reduce.
    """
    collective = allgather_time if gather else allreduce_time
    return _total(compute_s, rounds, collective(nbytes_per_round, num_workers, link, arrays), steps, overlap)


def _total(compute_s: float, rounds: int, per_round: float, steps: Optional[int], overlap: bool) -> float:
    """compute + rounds * per_round, or with ideal overlap steps * max(compute / step, per_round)."""
    if not overlap:
        return compute_s + rounds * per_round
    if not steps or rounds != steps:
        raise ValueError("overlap applies to strategies that communicate every step (rounds == steps)")
    return steps * max(compute_s / steps, per_round)


def hierarchical_allreduce_time(nbytes: float, hosts: int, per_host: int, intra: Link, inter: Link,
                                arrays: int = 1) -> float:
    """All-reduce of B bytes per worker over H hosts x L devices on a two-level network.

    Reduce-scatter inside each host (fast links ``intra``: beta_f, lambda_f),
    then L rings across hosts, one per shard of B / L, sharing each host's
    link (``inter``: beta_s, lambda_s; the host's link carries 2(H - 1)/H * B
    in all), then all-gather inside the host:

        t = 2(L - 1) lambda_f + 2(L - 1)/L * B/beta_f + 2(H - 1) lambda_s + 2(H - 1)/H * B/beta_s
          = allreduce_time(B, L, intra) + allreduce_time(B, H, inter)

    allreduce's gradient mean and flat averaging (all N = H L replicas differ)
    pay this per round.
    """
    return allreduce_time(nbytes, per_host, intra, arrays) + allreduce_time(nbytes, hosts, inter, arrays)


def hierarchical_allgather_time(nbytes: float, hosts: int, per_host: int, intra: Link, inter: Link,
                                arrays: int = 1) -> float:
    """All-gather of B bytes per worker over H hosts x L devices (QSGD's messages):
    gather inside the host, then hosts exchange their L messages:

        t = allgather_time(B, L, intra) + allgather_time(L B, H, inter)

    (the copies of the other hosts' messages inside a host, at the fast rate,
    are left out).
    """
    return allgather_time(nbytes, per_host, intra, arrays) + allgather_time(per_host * nbytes, hosts, inter, arrays)


def group_average_time(nbytes: float, hosts: int, per_host: int, intra: Link, inter: Link, arrays: int = 1) -> float:
    """Averaging B bytes across H hosts whose L devices hold identical copies
    (a two-level sync, groups = hosts).

    No reduction inside a host is needed: each device all-reduces one shard
    of B / L with its counterparts on the other hosts (L rings sharing the
    host's link), then the host all-gathers the averaged shards:

        t = allreduce_time(B, H, inter) + allgather_time(B / L, L, intra)
          = 2(H - 1) lambda_s + 2(H - 1)/H * B/beta_s + (L - 1) lambda_f + (L - 1)/L * B/beta_f
    """
    return allreduce_time(nbytes, hosts, inter, arrays) + allgather_time(nbytes / per_host, per_host, intra, arrays)


def two_level_wall_clock(
    compute_s: float,
    rounds: int,
    nbytes_per_round: float,
    hosts: int,
    per_host: int,
    intra: Link,
    inter: Link,
    *,
    arrays: int = 1,
    group_rounds: int = 0,
    group_nbytes_per_round: float = 0.0,
    grouped: bool = False,
    steps: Optional[int] = None,
    overlap: bool = False,
    gather: bool = False,
) -> float:
    """Simulated run time on H = ``hosts`` hosts of L = ``per_host`` devices:
    fast links inside a host (``intra``), slow ones between hosts (``inter``).

    A flat run (``grouped`` False: every replica differs) pays a hierarchical
    all-reduce (all-gather with ``gather``) per round:

        time = compute + rounds * hierarchical_allreduce_time(B, H, L)

    A two-level run (``grouped``: its groups are the hosts) pays the
    every-step mean inside the host and the averaging across hosts:

        time = compute + group_rounds * allreduce_time(B_g, L, intra)
                       + rounds * group_average_time(B, H, L)

    Args:
      compute_s: total measured compute time (all steps).
      rounds, nbytes_per_round: rounds and payload per worker per round of
        ``TrainState.comm`` (across groups for a two-level run).
      group_rounds, group_nbytes_per_round: the same for ``group_comm``.
      arrays: k of every round (see ``allreduce_time``).
      steps, overlap: ideal overlap of a flat every-step strategy's
        communication with its compute, as in ``simulated_wall_clock``.
    """
    if grouped:
        inside = allreduce_time(group_nbytes_per_round, per_host, intra, arrays)
        across = group_average_time(nbytes_per_round, hosts, per_host, intra, inter, arrays)
        return compute_s + group_rounds * inside + rounds * across
    collective = hierarchical_allgather_time if gather else hierarchical_allreduce_time
    return _total(compute_s, rounds, collective(nbytes_per_round, hosts, per_host, intra, inter, arrays), steps,
                  overlap)
