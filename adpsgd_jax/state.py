"""What a strategy's step carries and reports: ``TrainState``, ``StepMetrics``
and the optax-style pair ``Strategy(init, step)`` (docs/algorithm.md, "Strategies").

Every strategy (``averaging.local_sgd``, ``gradient_mean.allreduce``,
``gradient_mean.qsgd``) returns a ``Strategy``; its ``init`` builds one
worker's ``TrainState``, to be replicated with a leading worker axis [N, ...]
(``distributed.replicate``).
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp

from adpsgd_jax import comm
from adpsgd_jax.schedules import Drift, Schedule


class Monitor(NamedTuple):
    """What a schedule with ``Schedule.drift`` adds to the train state
    (docs/algorithm.md, "variance_trigger")."""

    direction: Any  # u, parameter-shaped: the last sync's change of the anchor, normalised (zeros until then;
    # None when the schedule asks for no direction). The same on every worker.
    direction_norm: jnp.ndarray  # float32[]: ||u|| as stored (1 up to its dtype's rounding; 0 = no direction yet).
    comm: comm.CommCounter  # The scalar-pair all-reduce of every step (same on every worker).


class TrainState(NamedTuple):
    """Everything a worker carries between steps (a pytree).

    Replicated, every leaf has a leading worker axis [N, ...]; the workers'
    parameters, model and optimizer states differ between syncs. The fields
    marked "same on every worker" are computed from worker-invariant values
    only; the sync decision is read from them, so it is one scalar per device
    program however many workers a device carries.
    """

    step: jnp.ndarray  # int32[]: local steps taken (same on every worker).
    params: Any
    model_state: Any  # Non-trainable state, e.g. batch-norm statistics.
    opt_state: Any
    sched_state: Any  # The schedule's state (same on every worker; None for the gradient-mean strategies).
    rng: jax.Array  # Base key; per-step, per-worker keys are folded in.
    comm: comm.CommCounter  # Rounds and bytes of the strategy's collective (same on every worker).
    group_comm: comm.CommCounter  # Every-step mean inside the groups: two-level averaging only, else zero.
    anchor: Any = None  # x_s, the parameters after the last sync (outer optimizer or a drift schedule, else None).
    outer_opt_state: Any = None  # The outer optimizer's state, identical on every worker (or None).
    monitor: Optional[Monitor] = None  # A schedule's drift monitor (``Schedule.drift``), else None.
    fragments: Any = None  # Streaming averaging's ``streaming.FragmentState`` (same on every worker but its
    # pending values), else None.

    def worker_axes(self) -> "TrainState":
        """A prefix pytree for ``jax.vmap``'s in_axes: 0 where workers differ,
        None where every worker holds the same value (the decision inputs)."""
        return TrainState(step=None, params=0, model_state=0, opt_state=0, sched_state=None, rng=0, comm=None,
                          group_comm=None, anchor=None if self.anchor is None else 0,
                          outer_opt_state=None if self.outer_opt_state is None else 0,
                          monitor=None if self.monitor is None else Monitor(
                              direction=None if self.monitor.direction is None else 0, direction_norm=0, comm=None),
                          fragments=None if self.fragments is None else type(self.fragments)(
                              round=None, pending=None if self.fragments.pending is None else 0,
                              due=None))


class StepMetrics(NamedTuple):
    """What one step reports, per worker (a pytree of scalars).

    ``loss`` and ``aux`` are the worker's own mini-batch values; the other
    fields are the same on every worker. An allreduce step of ``local_sgd``
    (a schedule's warm-up, docs/algorithm.md "Warm-up: allreduce steps")
    reports what ``allreduce`` reports: synced True, variance 0, period 1.
    """

    loss: jnp.ndarray  # float32[]
    aux: dict  # {name: float32[]} from loss_fn
    synced: jnp.ndarray  # bool[]: the workers averaged parameters, or gradients on an allreduce step
    variance: jnp.ndarray  # float32[]: pre-sync V = (1/N) sum_i ||x_i - xbar||^2 at an average; 0 otherwise
    period: jnp.ndarray  # int32[]: the schedule's period in force (1 on allreduce steps and strategies)
    comm: comm.CommCounter  # cumulative rounds and bytes of the strategy's collective
    group_comm: comm.CommCounter  # cumulative in-group mean (two-level averaging; zero otherwise)
    variance_bound: Optional[jnp.ndarray] = None  # float32[]: the drift monitor's bound B >= V (else None)
    monitor_comm: Optional[comm.CommCounter] = None  # cumulative per-step scalar-pair all-reduce (else None)


class Strategy(NamedTuple):
    """An optax-style pair: ``init(params, model_state, rng) -> TrainState`` (one
    worker's state, to be replicated) and the per-worker
    ``step(state, batch) -> (TrainState, StepMetrics)``."""

    init: Callable[[Any, Any, jax.Array], TrainState]
    step: Callable[[TrainState, Any], tuple]


def _monitor(params, drift: Optional[Drift]) -> Optional[Monitor]:
    """A fresh drift monitor: no direction yet, nothing counted."""
    if drift is None:
        return None
    direction = jax.tree.map(jnp.zeros_like, params) if drift.direction else None
    return Monitor(direction, jnp.zeros((), jnp.float32), comm.CommCounter.zeros())


def initial_state(optimizer, schedule: Optional[Schedule], outer_optimizer, params, model_state, rng) -> TrainState:
    """One worker's state before the first step: step 0, nothing counted, the
    schedule's (None without one) and the outer optimizer's first states, and
    the anchor x_s = the parameters where an outer optimizer or a drift
    schedule needs one. A strategy's ``init`` binds the first three arguments."""
    outer = outer_optimizer is not None
    drift = None if schedule is None else schedule.drift
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        model_state=model_state,
        opt_state=optimizer.init(params),
        sched_state=None if schedule is None else schedule.init(),
        rng=rng,
        comm=comm.CommCounter.zeros(),
        group_comm=comm.CommCounter.zeros(),
        # A copy: no buffer held twice.
        anchor=jax.tree.map(jnp.array, params) if outer or drift is not None else None,
        outer_opt_state=outer_optimizer.init(params) if outer else None,
        monitor=_monitor(params, drift),
    )
