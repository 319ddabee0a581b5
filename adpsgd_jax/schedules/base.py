"""The schedule interface and what the budgeted schedules share.

``Schedule`` (and the optional ``Drift`` hook), the state helpers, the sync
budget C and the learning-rate tables computed once on the host.
"""

from __future__ import annotations

import functools
from typing import Callable, NamedTuple, Optional

import jax.numpy as jnp
import numpy as np

Array = jnp.ndarray
ScheduleFn = Callable[[Array], Array]


class Drift(NamedTuple):
    """What a schedule that watches the workers drift apart asks of the train step.

    With ``Schedule.drift`` set, ``step.local_sgd`` keeps the anchor x_s (the
    parameters after the last sync: one parameter copy per worker) and, with
    ``direction``, a unit direction u shared by every worker (a second copy).
    After every local step it all-reduces one float32 pair,
    (||x_i - x_s||^2, <x_i - x_s, u>), and passes the resulting upper bound
    of the parameter variance to ``observe`` before ``should_sync`` is asked
    (docs/algorithm.md, "variance_trigger").

    Attributes:
      observe: ``(state, step: int32[], bound: float32[]) -> state``, on every
        local step (allreduce steps included), with the same bound on every worker.
      direction: keep u, the direction of the last sync's change of x_s. Without
        it the bound is mean_i ||x_i - x_s||^2, looser by ||mean_i x_i - x_s||^2.
    """

    observe: Callable[[NamedTuple, Array, Array], NamedTuple]
    direction: bool = True


class Schedule(NamedTuple):
    """A parameter-averaging schedule: pure ``init``, ``should_sync``, ``update``
    and, for a warm-up, ``allreduce_step``; for a per-step statistic, ``drift``.

    Attributes:
      init: ``() -> state``.
      should_sync: ``(state, step: int32[]) -> bool[]``; true when the workers
        average after local step ``step``. False on allreduce steps.
      update: ``(state, step: int32[], variance: float32[], loss: float32[])
        -> state``; called after each sync (never after an allreduce step).
      allreduce_step: ``(state, step: int32[]) -> bool[]``, or None (the
        default: no step is). True when step ``step`` is an allreduce step:
        the workers' gradients and model state are averaged before one
        optimizer update, so workers that start it identical (parameters
        and optimizer state) end it identical. A schedule places these
        steps where the workers agree: a warm-up from the start.
      drift: a ``Drift``, or None (the default: the step computes nothing
        between syncs). With it the step reports a bound of the variance
        after every local step, at the cost of one scalar-pair all-reduce.
    """

    init: Callable[[], NamedTuple]
    should_sync: Callable[[NamedTuple, Array], Array]
    update: Callable[[NamedTuple, Array, Array, Array], NamedTuple]
    allreduce_step: Optional[Callable[[NamedTuple, Array], Array]] = None
    drift: Optional[Drift] = None


def _before(warmup_steps: int, state, step) -> Array:
    """True on steps 0 .. warmup_steps - 1: the allreduce steps of a warm-up."""
    del state
    return step < warmup_steps


def _warmup(warmup_steps: int) -> Optional[Callable[[NamedTuple, Array], Array]]:
    """``allreduce_step`` of a warm-up of ``warmup_steps`` steps: steps 0 .. warmup_steps - 1."""
    return None if warmup_steps == 0 else functools.partial(_before, warmup_steps)


def _i32(x) -> Array:
    return jnp.asarray(x, jnp.int32)


def _f32(x) -> Array:
    return jnp.asarray(x, jnp.float32)


def _check_int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or int(value) != value or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)



def resolve_budget(total_steps: int, avg_period: Optional[int] = None, num_syncs: Optional[int] = None) -> int:
    """The sync budget C: ``num_syncs``, or floor(T / avg_period) (the count
    CPSGD with period ``avg_period`` performs). Exactly one must be given."""
    total_steps = _check_int("total_steps", total_steps, 1)
    if (avg_period is None) == (num_syncs is None):
        raise ValueError("give exactly one budget: avg_period (an average period) or num_syncs (a sync count)")
    if avg_period is not None:
        avg_period = _check_int("avg_period", avg_period, 1)
        if avg_period > total_steps:
            raise ValueError(f"avg_period must be in [1, total_steps={total_steps}], got {avg_period}")
        return total_steps // avg_period
    num_syncs = _check_int("num_syncs", num_syncs, 1)
    if num_syncs > total_steps:
        raise ValueError(f"num_syncs must be in [1, total_steps={total_steps}], got {num_syncs}")
    return num_syncs


def _lr_values(total_steps: int, lr_schedule: Optional[ScheduleFn]) -> np.ndarray:
    """The learning rates gamma(0), ..., gamma(T - 1) as float64 on the host (None: all 1);
    ValueError unless they are finite, >= 0 and not all zero."""
    steps = np.arange(total_steps)
    if lr_schedule is None:
        lrs = np.ones(total_steps)
    else:
        lrs = np.asarray([float(lr_schedule(int(s))) for s in steps], np.float64)
    if not np.all(np.isfinite(lrs)) or np.any(lrs < 0) or not np.any(lrs > 0):
        raise ValueError("lr_schedule must give finite learning rates >= 0, not all zero, over [0, total_steps)")
    return lrs


def _lr_tables(total_steps: int, lr_schedule: Optional[ScheduleFn], kappa: float):
    """Learning rates gamma(s) and W(u) = sum_{s >= u} (gamma(s)/gamma(u))^kappa.

    Returns float32 arrays of length T + 1 indexed by position u (W[T] = 0),
    computed once in float64 on the host so planning inside the step is O(1).
    """
    lrs = _lr_values(total_steps, lr_schedule)
    tiny = lrs[lrs > 0].min() * 1e-6
    lrs = np.maximum(lrs, tiny)
    powered = lrs**kappa
    suffix = np.concatenate([np.cumsum(powered[::-1])[::-1], [0.0]])
    lr_at = np.concatenate([lrs, lrs[-1:]])
    weights = suffix / lr_at**kappa
    return jnp.asarray(lr_at, jnp.float32), jnp.asarray(weights, jnp.float32)


def _check_growth(alpha: float, ema: float) -> None:
    """The growth exponent alpha in (0, 4] and the EMA weight in (0, 1] of a measured schedule."""
    if not 0.0 < alpha <= 4.0:
        raise ValueError(f"alpha must be in (0, 4], got {alpha!r}")
    if not 0.0 < ema <= 1.0:
        raise ValueError(f"ema must be in (0, 1], got {ema!r}")


def _period_bounds(total_steps: int, min_period: int, max_period: Optional[int]) -> tuple[int, int]:
    """(p_min, p_max): ``min_period`` >= 1 and ``max_period`` >= p_min (None: T)."""
    p_min = _check_int("min_period", min_period, 1)
    return p_min, total_steps if max_period is None else _check_int("max_period", max_period, p_min)
