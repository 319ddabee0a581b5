"""QSR, the Quadratic Synchronization Rule: the period grows with the inverse
square of the learning rate, published or solved for a sync budget."""

from __future__ import annotations

from typing import NamedTuple, Optional

import jax.numpy as jnp
import numpy as np

from adpsgd_jax.schedules.base import Array, Schedule, ScheduleFn, _check_int, _lr_values, resolve_budget


class QSRState(NamedTuple):
    """State of ``qsr``: its periods are fixed on the host, so two scalars suffice."""

    period: Array  # int32[]: the period in force (the last one once the budget is spent).
    next_sync: Array  # int32[]: position of the next sync; T + 1 = none.


_FLOOR_TOLERANCE = 1e-9  # relative: floor((0.3 / 0.1)^2) is 9, though float64 computes 8.999999999999998


def _qsr_periods(lrs: np.ndarray, alpha: float, base_period: int, warmup_steps: int) -> np.ndarray:
    """QSR's period after a sync at position u, for u = 0, ..., T - 1 (int64 [T]):
    H(u) = max(H_base, floor((alpha / gamma(u))^2)), H_base for u < warmup_steps, at most T."""
    T = len(lrs)
    with np.errstate(divide="ignore", over="ignore"):
        ratio = np.square(alpha / lrs)  # gamma(u) = 0 gives inf: the period runs to the end
    periods = np.maximum(np.floor(np.minimum(ratio * (1.0 + _FLOOR_TOLERANCE), T)), base_period).astype(np.int64)
    periods[:warmup_steps] = base_period
    return periods


def _qsr_positions(periods: np.ndarray) -> list:
    """Positions of the syncs the rule makes from position 0: u <- min(u + H(u), T) until u = T."""
    T, position, positions = len(periods), 0, []
    while position < T:
        position = min(position + int(periods[position]), T)
        positions.append(position)
    return positions


def _qsr_solve(lrs: np.ndarray, budget: int, base_period: int, warmup_steps: int) -> float:
    """The largest alpha (to 1e-9 relative) whose rule makes at least ``budget`` syncs."""
    def count(alpha):
        return len(_qsr_positions(_qsr_periods(lrs, alpha, base_period, warmup_steps)))

    positive = lrs[lrs > 0]
    lo = 0.5 * np.sqrt(base_period) * positive.min()  # every period is H_base: the most syncs
    hi = 2.0 * np.sqrt(len(lrs)) * positive.max()  # every period after the warm-up runs to the end: the fewest
    most, fewest = count(lo), count(hi)
    if budget > most:
        raise ValueError(f"the sync budget {budget} is more than the {most} syncs QSR makes at "
                         f"base_period={base_period} (every period H_base): give a smaller base_period or budget")
    if budget <= fewest:
        if budget < fewest:
            raise ValueError(f"the sync budget {budget} is less than the {fewest} syncs QSR makes with any alpha: "
                             f"the warm-up (warmup_steps={warmup_steps}) alone syncs every base_period="
                             f"{base_period} steps; give a shorter warm-up or a larger budget")
        return float(hi)
    while hi / lo > 1.0 + 1e-9:  # count(lo) >= budget > count(hi)
        mid = np.sqrt(lo * hi)
        lo, hi = (mid, hi) if count(mid) >= budget else (lo, mid)
    return float(lo)


def _qsr_arguments(total_steps, avg_period, num_syncs, alpha, base_period, lr_schedule, warmup_steps):
    """Validated (T, budget C or None, alpha or None, H_base, T_w, learning rates)."""
    T = _check_int("total_steps", total_steps, 1)
    budgeted = avg_period is not None or num_syncs is not None
    if alpha is None and not budgeted:
        raise ValueError("qsr needs alpha (the published rule) or a budget (avg_period or num_syncs)")
    budget = resolve_budget(T, avg_period, num_syncs) if budgeted else None
    if alpha is not None and (isinstance(alpha, bool) or not np.isfinite(alpha) or not alpha > 0):
        raise ValueError(f"alpha must be a finite number > 0, got {alpha!r}")
    base_period = _check_int("base_period", base_period, 1)
    warmup_steps = _check_int("warmup_steps", warmup_steps, 0)
    if warmup_steps > T:
        raise ValueError(f"warmup_steps must be in [0, total_steps={T}], got {warmup_steps}")
    return T, budget, alpha, base_period, warmup_steps, _lr_values(T, lr_schedule)


def qsr_alpha(total_steps: int, avg_period: Optional[int] = None, *, num_syncs: Optional[int] = None,
              base_period: int = 1, lr_schedule: Optional[ScheduleFn] = None, warmup_steps: int = 0) -> float:
    """The alpha of ``qsr``'s budgeted form: the largest alpha whose rule makes at
    least C syncs over the known learning rates (bisection on the host, to 1e-9
    relative; docs/algorithm.md, "qsr"). Raises ValueError when no alpha
    reaches C (H_base too long) or every alpha exceeds it (a long warm-up)."""
    if avg_period is None and num_syncs is None:
        raise ValueError("qsr_alpha needs a budget: avg_period or num_syncs")
    _, budget, _, base_period, warmup_steps, lrs = _qsr_arguments(
        total_steps, avg_period, num_syncs, None, base_period, lr_schedule, warmup_steps)
    return _qsr_solve(lrs, budget, base_period, warmup_steps)


def qsr(
    total_steps: int,
    avg_period: Optional[int] = None,
    *,
    num_syncs: Optional[int] = None,
    alpha: Optional[float] = None,
    base_period: int = 1,
    lr_schedule: Optional[ScheduleFn] = None,
    warmup_steps: int = 0,
) -> Schedule:
    """QSR, the Quadratic Synchronization Rule (Gu, Lyu, Arora, Zhang, Huang,
    ICLR 2024), docs/algorithm.md "qsr".

    After each sync at position u (and at the start, u = 0) the next period is

        H(u) = max(H_base, floor((alpha / gamma(u))^2))     (H_base while u < T_w)

    with gamma(u) the learning rate of the step that follows and T_w =
    ``warmup_steps`` (the learning-rate warm-up, during which the period is
    H_base). The next sync is at min(u + H(u), T): never past the end, so the
    published rule always syncs after the last step.

    Two forms:

    * published: give ``alpha`` and no budget.
    * budgeted: give ``avg_period`` or ``num_syncs`` (C syncs) and no alpha;
      alpha is solved on the host (``qsr_alpha``) as the largest alpha whose
      rule makes at least C syncs, and the schedule stops at C. The rule's
      count is a step function of alpha (under a constant rate it is
      ceil(T / H)), so it may overshoot C: the cap drops its last syncs, the
      ones nearest the end of the run. Exactly C syncs are made.

    With both ``alpha`` and a budget the rule at that alpha is capped at C.
    Every period is computed once, in float64, into a table of length T + 1
    indexed by the traced position: the step compiles once.
    """
    T, budget, alpha, base_period, warmup_steps, lrs = _qsr_arguments(
        total_steps, avg_period, num_syncs, alpha, base_period, lr_schedule, warmup_steps)
    if alpha is None:
        alpha = _qsr_solve(lrs, budget, base_period, warmup_steps)
    periods = _qsr_periods(lrs, alpha, base_period, warmup_steps)
    positions = _qsr_positions(periods)
    last = positions[min(len(positions), budget or len(positions)) - 1]  # the final sync's position
    # Period from position u, clipped at the end of the run; index T (after the final sync) is unused.
    clipped = np.minimum(periods, T - np.arange(T))
    period_at = jnp.asarray(np.concatenate([clipped, [1]]), jnp.int32)

    def init():
        return QSRState(period=period_at[0], next_sync=period_at[0])

    def should_sync(state, step):
        return step + 1 == state.next_sync

    def update(state, step, variance, loss):
        del variance, loss
        position = (step + 1).astype(jnp.int32)
        more = position < last
        period = jnp.where(more, period_at[jnp.minimum(position, T)], state.period)
        return QSRState(period=period.astype(jnp.int32),
                        next_sync=jnp.where(more, position + period, T + 1).astype(jnp.int32))

    return Schedule(init, should_sync, update)
