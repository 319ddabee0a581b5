"""QSR, the Quadratic Synchronization Rule: the period grows with a power of the
inverse learning rate, as in the reference implementation, given alpha or
searched for a sync budget."""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

import jax.numpy as jnp
import numpy as np

from adpsgd_jax.schedules.base import Array, Schedule, ScheduleFn, _check_int, _lr_values, resolve_budget

SEARCH_GRID = 128  # log-spaced alphas of the budget search
SEARCH_REFINED = 8  # grid brackets refined per predicate (the ones whose counts are nearest C)
SEARCH_RTOL = 1e-13  # relative width at which a refinement stops


class QSRState(NamedTuple):
    """State of ``qsr``: its periods are fixed on the host, so two scalars suffice."""

    period: Array  # int32[]: the period in force (the one planned at the last sync).
    next_sync: Array  # int32[]: position of the next sync; T + 1 = none.


class _Rule(NamedTuple):
    """The arguments of the rule that do not depend on alpha."""

    init_h: int  # the period while u < warmup_steps, and the constant period when alpha = 0
    min_h: int  # the floor of the period after the warm-up
    power: float  # the exponent p of alpha / gamma
    warmup_steps: int


def _period(lr: float, position: int, total: int, alpha: float, rule: _Rule) -> int:
    """The reference's period after a sync at ``position`` u (python floats, no tolerance):

        H(u) = init_h                                                  if u < T_w or alpha = 0
        H(u) = max(min(max(int((alpha / gamma(u))^p), min_h), T - u), 1)    otherwise

    gamma(u) is the rate of the next step. gamma(u) = 0 (the reference divides by zero) and an
    overflowing power both count as an infinite ratio: the period runs to the end of the run."""
    if position < rule.warmup_steps or alpha == 0:
        return rule.init_h
    remaining = total - position
    try:
        ratio = (alpha / lr) ** rule.power if lr > 0 else math.inf
    except OverflowError:
        ratio = math.inf
    rounded = remaining if ratio >= remaining else int(ratio)  # int(min(x, n)) = min(int(x), n) for integer n
    return max(min(max(rounded, rule.min_h), remaining), 1)


def _qsr_rounds(lrs: np.ndarray, alpha: float, rule: _Rule, cap: Optional[int] = None) -> tuple:
    """The rule's rounds from position 0: (sync positions, the period planned at 0 and at each sync).

    u <- u + H(u) while u + H(u) <= T; a period that would pass T (only ``init_h``, in the warm-up
    or with alpha = 0) leaves the last steps without a sync, as in the reference. ``cap``: stop
    after that many syncs (a count of ``cap`` then means "at least cap")."""
    total, position, positions = len(lrs), 0, []
    periods = [_period(float(lrs[0]), 0, total, alpha, rule)]
    while position + periods[-1] <= total and (cap is None or len(positions) < cap):
        position += periods[-1]
        positions.append(position)
        if position == total:
            break
        periods.append(_period(float(lrs[position]), position, total, alpha, rule))
    return positions, periods


def _count(lrs, alpha, rule, cap) -> int:
    return len(_qsr_rounds(lrs, alpha, rule, cap)[0])


def _refine(lrs, rule, cap, a: tuple, b: tuple, flag) -> list:
    """Bisect (on log alpha) between the (alpha, count) pairs a and b, where flag(count)
    differs, to a flip of ``flag``: returns the final bracket's two (alpha, count) pairs."""
    (a, ca), (b, cb) = a, b
    while b / a - 1 > SEARCH_RTOL:
        mid = math.sqrt(a * b)
        if not a < mid < b:
            break
        cm = _count(lrs, mid, rule, cap)
        if flag(cm) == flag(ca):
            a, ca = mid, cm
        else:
            b, cb = mid, cm
    return [(a, ca), (b, cb)]


def _alpha_range(lrs: np.ndarray, rule: _Rule) -> tuple:
    """(lo, hi): at lo every period after the warm-up is min_h (the most syncs), at hi every
    period after the warm-up runs to the end (the fewest)."""
    positive = lrs[lrs > 0]
    lo = 0.5 * positive.min() * rule.min_h ** (1.0 / rule.power)
    hi = 2.0 * positive.max() * len(lrs) ** (1.0 / rule.power)
    return float(lo), float(hi)


def _qsr_search(lrs: np.ndarray, budget: int, rule: _Rule) -> float:
    """The alpha whose rule's own sync count is nearest ``budget`` C among a log grid of
    SEARCH_GRID alphas over ``_alpha_range`` and the refinements of the SEARCH_REFINED
    grid brackets (nearest C first) where count > C flips and where count >= C flips.
    Ties: the fewer syncs, then the smaller alpha. ValueError when C is outside the
    counts the rule can make (above the count at lo, below the count at hi)."""
    lo, hi = _alpha_range(lrs, rule)
    cap = 2 * budget + 1  # counts beyond it are farther from C than the count at hi
    most, fewest = _count(lrs, lo, rule, None), _count(lrs, hi, rule, None)
    if budget > most:
        raise ValueError(f"the sync budget {budget} is more than the {most} syncs QSR makes at "
                         f"min_h={rule.min_h}, init_h={rule.init_h} (every period min_h after the warm-up): "
                         "give a smaller min_h or budget")
    if budget < fewest:
        raise ValueError(f"the sync budget {budget} is less than the {fewest} syncs QSR makes with any alpha: "
                         f"the warm-up (warmup_steps={rule.warmup_steps}) alone syncs every init_h="
                         f"{rule.init_h} steps; give a shorter warm-up, a larger init_h or a larger budget")
    grid = np.exp(np.linspace(np.log(lo), np.log(hi), SEARCH_GRID))
    grid[0], grid[-1] = lo, hi
    found = [(float(a), _count(lrs, float(a), rule, cap)) for a in grid]
    for flag in (lambda c: c > budget, lambda c: c >= budget):
        brackets = [i for i in range(SEARCH_GRID - 1) if flag(found[i][1]) != flag(found[i + 1][1])]
        brackets.sort(key=lambda i: min(abs(found[i][1] - budget), abs(found[i + 1][1] - budget)))
        for i in brackets[:SEARCH_REFINED]:
            found += _refine(lrs, rule, cap, found[i], found[i + 1], flag)
    return min(found, key=lambda ac: (abs(ac[1] - budget), ac[1], ac[0]))[0]


def _qsr_arguments(total_steps, avg_period, num_syncs, alpha, init_h, min_h, power, lr_schedule, warmup_steps):
    """Validated (T, budget C or None, alpha or None, _Rule, learning rates float64 [T])."""
    T = _check_int("total_steps", total_steps, 1)
    budgeted = avg_period is not None or num_syncs is not None
    if alpha is None and not budgeted:
        raise ValueError("qsr needs alpha (the published rule) or a budget (avg_period or num_syncs)")
    if alpha is not None and budgeted:
        raise ValueError("qsr takes alpha (the published rule) or a budget (avg_period or num_syncs), not both: "
                         "capping the rule at a budget would leave the end of the run without its syncs")
    budget = resolve_budget(T, avg_period, num_syncs) if budgeted else None
    if alpha is not None and (isinstance(alpha, bool) or not np.isfinite(alpha) or alpha < 0):
        raise ValueError(f"alpha must be a finite number >= 0 (0: the constant period init_h), got {alpha!r}")
    if isinstance(power, bool) or not np.isfinite(power) or not power > 0:
        raise ValueError(f"power must be a finite number > 0, got {power!r}")
    warmup_steps = _check_int("warmup_steps", warmup_steps, 0)
    if warmup_steps > T:
        raise ValueError(f"warmup_steps must be in [0, total_steps={T}], got {warmup_steps}")
    rule = _Rule(_check_int("init_h", init_h, 1), _check_int("min_h", min_h, 1), float(power), warmup_steps)
    return T, budget, None if alpha is None else float(alpha), rule, _lr_values(T, lr_schedule)


def qsr_alpha(total_steps: int, avg_period: Optional[int] = None, *, num_syncs: Optional[int] = None,
              init_h: int = 1, min_h: int = 1, power: float = 2.0, lr_schedule: Optional[ScheduleFn] = None,
              warmup_steps: int = 0) -> float:
    """The alpha of ``qsr``'s budgeted form: the alpha whose rule's own sync count is
    nearest the budget C (docs/algorithm.md, "qsr"; ``_qsr_search`` on the host).

    Guarantee: the count is the one nearest C among the grid and refined alphas (ties:
    fewer syncs, then the smaller alpha); it is exactly C whenever the search meets an
    alpha making C. When the learning rate does not increase after the warm-up, the
    count falls with alpha and the refinements reach both sides of every jump, so the
    result is C whenever any alpha makes C, else the count just above or below C.
    Raises ValueError when C is more than the rule makes with every period min_h, or
    fewer than it makes with every period after the warm-up running to the end."""
    if avg_period is None and num_syncs is None:
        raise ValueError("qsr_alpha needs a budget: avg_period or num_syncs")
    _, budget, _, rule, lrs = _qsr_arguments(total_steps, avg_period, num_syncs, None, init_h, min_h, power,
                                             lr_schedule, warmup_steps)
    return _qsr_search(lrs, budget, rule)


def qsr(
    total_steps: int,
    avg_period: Optional[int] = None,
    *,
    num_syncs: Optional[int] = None,
    alpha: Optional[float] = None,
    init_h: int = 1,
    min_h: int = 1,
    power: float = 2.0,
    lr_schedule: Optional[ScheduleFn] = None,
    warmup_steps: int = 0,
) -> Schedule:
    """QSR, the Quadratic Synchronization Rule (Gu, Lyu, Arora, Zhang, Huang,
    ICLR 2024), as its reference implementation computes it (docs/algorithm.md, "qsr").

    After each sync at position u (and at the start, u = 0) the next period is

        H(u) = init_h                                                   if u < T_w or alpha = 0
        H(u) = max(min(max(int((alpha / gamma(u))^p), min_h), T - u), 1)     otherwise

    in python floats, with gamma(u) the learning rate of the step that follows,
    T_w = ``warmup_steps``, p = ``power`` and ``int`` the plain truncation
    (no tolerance: (0.3 / 0.1)^2 is 8.999999999999998 and H is 8). The next sync
    is at u + H(u). After the warm-up a period never passes the end, so the run
    ends with a sync; an ``init_h`` period that would pass T (warm-up, alpha = 0)
    leaves the last steps unsynced, as the reference does. One departure: where
    gamma(u) = 0 (the reference divides by zero) the period runs to the end.

    Two forms:

    * published: give ``alpha`` (>= 0; 0 = the constant period ``init_h``).
    * budgeted: give ``avg_period`` or ``num_syncs`` (C syncs) and no alpha:
      alpha is searched on the host (``qsr_alpha``) for the rule whose own count
      is nearest C, and the schedule is that rule, every one of its syncs kept
      (its count may differ from C where no searched alpha gives C).

    Every period is computed once on the host into an int32 table of length
    T + 1 indexed by the traced position: the step compiles once.
    """
    T, budget, alpha, rule, lrs = _qsr_arguments(total_steps, avg_period, num_syncs, alpha, init_h, min_h, power,
                                                 lr_schedule, warmup_steps)
    if alpha is None:
        alpha = _qsr_search(lrs, budget, rule)
    positions, periods = _qsr_rounds(lrs, alpha, rule)
    table = np.zeros(T + 1, np.int64)  # the period planned at each sync position (0 elsewhere: never read)
    table[[0] + positions[:len(periods) - 1]] = periods
    period_at = jnp.asarray(np.minimum(table, T + 1), jnp.int32)  # beyond T + 1 - u, no more sync either way

    def init():
        first = period_at[0]
        return QSRState(period=first, next_sync=jnp.where(first <= T, first, T + 1).astype(jnp.int32))

    def should_sync(state, step):
        return step + 1 == state.next_sync

    def update(state, step, variance, loss):
        del variance, loss
        position = (step + 1).astype(jnp.int32)
        more = position < T
        period = jnp.where(more, period_at[jnp.minimum(position, T)], state.period)
        following = position + period
        return QSRState(period=period.astype(jnp.int32),
                        next_sync=jnp.where(more & (following <= T), following, T + 1).astype(jnp.int32))

    return Schedule(init, should_sync, update)
