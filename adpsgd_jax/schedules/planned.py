"""ADPSGD and its open-loop plan ``lr_proportional`` (docs/algorithm.md,
"The ADPSGD controller"), with ADPSGD's two forecasts of the growth rate."""

from __future__ import annotations

from typing import NamedTuple, Optional

import jax.numpy as jnp
import numpy as np

from adpsgd_jax.schedules.base import (Array, Schedule, ScheduleFn, _check_growth, _check_int, _f32, _i32,
                                       _lr_tables, _period_bounds, _warmup, resolve_budget)


class PlannedState(NamedTuple):
    """State of ``adpsgd`` and ``lr_proportional`` (docs/algorithm.md, "The ADPSGD controller")."""

    period: Array  # int32[]: current period p.
    next_sync: Array  # int32[]: position (step + 1) of the next sync.
    last_sync: Array  # int32[]: position of the last sync (0 at the start).
    syncs: Array  # int32[]: syncs used.
    since_plan: Array  # int32[]: syncs since the last plan.
    a_hat: Array  # float32[]: growth per unit gamma^2, EMA(V / (p^alpha mean gamma^2)); 0 = not measured.
    q: Array  # float32[]: density scale Q.
    plan_lr: Array  # float32[]: learning rate at the last plan.


class TrendState(NamedTuple):
    """State of ``adpsgd(forecast="trend")``: the plan's state and an online
    least-squares fit of log g against position over the current
    learning-rate phase (Welford's updates; reset when a phase starts)."""

    planned: PlannedState
    phase_start: Array  # int32[]: position where the current phase's fit began.
    fits: Array  # int32[]: measurements in the fit.
    mean_pos: Array  # float32[]: mean position of those measurements (period midpoints, from phase_start).
    mean_log: Array  # float32[]: mean log g.
    c_pp: Array  # float32[]: sum of squared position deviations.
    c_pl: Array  # float32[]: sum of position x log g deviation products.

    @property
    def period(self) -> Array:
        return self.planned.period


FORECASTS = ("ema", "trend")  # adpsgd's forecast of the growth rate beyond the last measurement


def _phase_ends(total_steps: int, lr_at, factor: float) -> np.ndarray:
    """int32 [T + 1]: the end of each position's learning-rate phase.

    Phases are cut greedily from position 0: a phase starting at b ends at
    the first s > b where |log(gamma(s) / gamma(b))| >= log(factor) (T if
    none). ``ends[u]`` is the end of the phase holding u. One pass on the host.
    """
    log_lr, limit = np.log(np.asarray(lr_at, np.float64)[:total_steps]), np.log(factor)
    ends = np.empty(total_steps + 1, np.int32)
    start = 0
    for s in range(1, total_steps + 1):
        if s == total_steps or abs(log_lr[s] - log_lr[start]) >= limit:
            ends[start:s] = s
            start = s
    ends[total_steps] = total_steps
    return ends


def _planned(
    total_steps: int,
    avg_period: Optional[int],
    num_syncs: Optional[int],
    lr_schedule: Optional[ScheduleFn],
    alpha: float,
    ema: float,
    replan_every: int,
    replan_lr_factor: float,
    min_period: int,
    max_period: Optional[int],
    warmup_steps: int,
    feedback: bool,
    forecast: str = "ema",
) -> Schedule:
    T = _check_int("total_steps", total_steps, 1)
    if forecast not in FORECASTS:
        raise ValueError(f"forecast must be one of {', '.join(FORECASTS)}, got {forecast!r}")
    trend = forecast == "trend"
    C = resolve_budget(T, avg_period, num_syncs)
    _check_growth(alpha, ema)
    replan_every = _check_int("replan_every", replan_every, 1)
    if not replan_lr_factor > 1.0:
        raise ValueError(f"replan_lr_factor must be > 1, got {replan_lr_factor!r}")
    p_min, p_max = _period_bounds(T, min_period, max_period)
    warmup = _check_int("warmup_steps", warmup_steps, 0)
    if warmup and C * p_min > T - warmup:
        raise ValueError(f"warmup_steps={warmup} leaves {max(T - warmup, 0)} of the {T} steps for the sync budget {C} "
                         f"(at min_period={p_min}): the warm-up's full-sync steps are not syncs of the budget")
    if C * p_min > T:
        raise ValueError(f"min_period={p_min} leaves room for only {T // p_min} syncs, fewer than the budget {C}")

    kappa = 2.0 / (alpha + 1.0)
    root = 1.0 / (alpha + 1.0)
    lr_at, weights = _lr_tables(T, lr_schedule, kappa)
    log_factor = float(np.log(replan_lr_factor))
    if trend:
        ends_np = _phase_ends(T, lr_at, replan_lr_factor)
        starts_np = np.zeros(T + 1, np.int32)  # start of the phase holding each position
        for u in range(1, T + 1):
            starts_np[u] = u if ends_np[u - 1] == u else starts_np[u - 1]
        ends, starts = jnp.asarray(ends_np), jnp.asarray(starts_np)
        powered = jnp.asarray(np.asarray(lr_at, np.float64)[:T] ** kappa, jnp.float32)
        positions = jnp.arange(T, dtype=jnp.int32)

    def trend_weight(position, slope):
        """W_b(u) = sum_{s >= u} (gamma(s)/gamma(u))^kappa exp(b/(alpha+1) (min(s, e(u)) - u)):
        the forecast a(s) = a(u) (gamma(s)/gamma(u))^2 exp(b (min(s, e(u)) - u)), with b the fitted
        log-slope of g over the current phase, held from the phase's end e(u) on."""
        u = jnp.minimum(position, T)
        ahead = jnp.minimum(positions, ends[u]) - u
        exponent = jnp.clip(slope * root * ahead.astype(jnp.float32), -30.0, 10.0)
        terms = jnp.where(positions >= u, powered / (lr_at[u] ** kappa) * jnp.exp(exponent), 0.0)
        return jnp.sum(terms)

    def fit_update(state, position, growth):
        """Welford's update of the phase's least-squares fit of log g against the period's midpoint."""
        mid = (state.planned.last_sync + position) // 2
        phase = starts[mid]
        fresh = phase != state.phase_start
        fits = jnp.where(fresh, 0, state.fits) + 1
        x = (mid - phase).astype(jnp.float32)
        y = jnp.log(jnp.maximum(growth, 1e-30))
        mean_pos, mean_log = jnp.where(fresh, 0.0, state.mean_pos), jnp.where(fresh, 0.0, state.mean_log)
        c_pp, c_pl = jnp.where(fresh, 0.0, state.c_pp), jnp.where(fresh, 0.0, state.c_pl)
        dx = x - mean_pos
        mean_pos = mean_pos + dx / fits
        mean_log = mean_log + (y - mean_log) / fits
        c_pp, c_pl = c_pp + dx * (x - mean_pos), c_pl + dx * (y - mean_log)
        slope = jnp.where((fits >= 3) & (c_pp > 0), c_pl / jnp.maximum(c_pp, 1e-30), 0.0)
        fit = dict(phase_start=phase.astype(jnp.int32), fits=fits.astype(jnp.int32),
                   mean_pos=mean_pos.astype(jnp.float32), mean_log=mean_log.astype(jnp.float32),
                   c_pp=c_pp.astype(jnp.float32), c_pl=c_pl.astype(jnp.float32))
        return fit, slope

    def choose_period(position, syncs_left, raw):
        """Round and clip a planned period so the owed syncs still fit."""
        room = T - position - (syncs_left - 1) * p_min
        p = jnp.clip(jnp.round(raw), p_min, p_max)
        p = jnp.clip(p, p_min, jnp.maximum(room, p_min))
        return p.astype(jnp.int32)

    def init():
        # First period from the plan with no measurement: W(T_w) / C at the
        # end of the warm-up (T_w = 0 without one), where the workers are
        # identical and the budget's C syncs start.
        period = choose_period(warmup, C, weights[warmup] / C)
        planned = PlannedState(
            period=period,
            next_sync=(warmup + period).astype(jnp.int32),
            last_sync=_i32(warmup),
            syncs=_i32(0),
            since_plan=_i32(0),
            a_hat=_f32(0.0),
            q=_f32(0.0),
            plan_lr=lr_at[warmup],
        )
        if not trend:
            return planned
        return TrendState(planned, phase_start=_i32(-1), fits=_i32(0), mean_pos=_f32(0.0), mean_log=_f32(0.0),
                          c_pp=_f32(0.0), c_pl=_f32(0.0))

    def should_sync(state, step):
        state = state.planned if trend else state
        return (step + 1 == state.next_sync) & (state.syncs < C)

    def update(state, step, variance, loss):
        del loss
        whole, state = state, (state.planned if trend else state)
        position = (step + 1).astype(jnp.int32)
        taken = jnp.maximum(position - state.last_sync, 1).astype(jnp.float32)
        # Growth per unit squared learning rate: V / p^alpha over the period's
        # mean gamma^2 (trapezoid of its first and last step), so that
        # a(t) = a_hat * gamma(t)^2 is the forecast of docs/algorithm.md and a learning-rate
        # decay does not leave a stale estimate behind.
        lr_sq = 0.5 * (lr_at[state.last_sync] ** 2 + lr_at[position - 1] ** 2)
        growth = jnp.maximum(variance.astype(jnp.float32), 0.0) / taken**alpha / lr_sq
        measured = state.a_hat > 0
        a_hat = jnp.where(measured, (1.0 - ema) * state.a_hat + ema * growth, growth)
        syncs = state.syncs + 1
        left = C - syncs
        lr_now = lr_at[jnp.minimum(position, T)]
        lr_moved = jnp.abs(jnp.log(lr_now / state.plan_lr)) >= log_factor
        plan = (~measured) | (state.since_plan + 1 >= replan_every) | lr_moved
        if not feedback:
            plan = jnp.asarray(True)
        a_root = jnp.maximum(a_hat * lr_now**2, 1e-30) ** root  # a(t)^(1/(alpha+1))
        if trend:
            fit, slope = fit_update(whole, position, growth)
            w_over_r = trend_weight(position, slope) / jnp.maximum(left, 1)
        else:
            w_over_r = weights[jnp.minimum(position, T)] / jnp.maximum(left, 1)
        q = jnp.where(plan, a_root * w_over_r, state.q)
        raw = w_over_r if not feedback else q / a_root
        # Once the budget is spent no period is in force; keep reporting the last one.
        period = jnp.where(left > 0, choose_period(position, left, raw), state.period)
        next_sync = jnp.where(left > 0, position + period, T + 1)
        planned = PlannedState(
            period=period.astype(jnp.int32),
            next_sync=next_sync.astype(jnp.int32),
            last_sync=position,
            syncs=syncs.astype(jnp.int32),
            since_plan=jnp.where(plan, 0, state.since_plan + 1).astype(jnp.int32),
            a_hat=a_hat.astype(jnp.float32),
            q=q.astype(jnp.float32),
            plan_lr=jnp.where(plan, lr_now, state.plan_lr).astype(jnp.float32),
        )
        return TrendState(planned, **fit) if trend else planned

    return Schedule(init, should_sync, update, _warmup(warmup))


def adpsgd(
    total_steps: int,
    avg_period: Optional[int] = None,
    *,
    num_syncs: Optional[int] = None,
    lr_schedule: Optional[ScheduleFn] = None,
    alpha: float = 1.0,
    ema: float = 0.5,
    replan_every: int = 8,
    replan_lr_factor: float = 1.5,
    min_period: int = 1,
    max_period: Optional[int] = None,
    warmup_steps: int = 0,
    forecast: str = "ema",
) -> Schedule:
    """ADPSGD: adaptive periodic averaging driven by the measured variance.

    Implements docs/algorithm.md, "The ADPSGD controller". With budget C syncs over T steps and
    kappa = 2 / (alpha + 1):

    * at each sync after p local steps: a_hat <- EMA(V / (p^alpha g2)),
      g2 the period's mean squared learning rate, and the growth rate now is
      a(u) = a_hat * gamma(u)^2 (the forecast a ~ gamma^2; keeping
      a_hat per unit gamma^2 means a learning-rate decay changes a(u) at
      once instead of through the EMA's lag);
    * plan (first sync, every ``replan_every`` syncs, after a learning-rate
      change by ``replan_lr_factor``, end of warm-up):
      Q = a(u)^(1/(alpha+1)) * W(u) / R, where
      W(u) = sum_{s >= u} (gamma(s)/gamma(u))^kappa and R the syncs left;
    * next period p = clip(round(Q / a(u)^(1/(alpha+1))), min_period,
      max_period), never so long that the owed syncs no longer fit.

    The first period is W(T_w) / C. ``warmup_steps`` = T_w > 0 makes steps
    0 .. T_w - 1 full-sync steps (gradients averaged before one optimizer
    update, as in ``post_local``); they are not syncs of the budget, which
    is spent over the remaining T - T_w steps. Never more than C syncs are
    made.

    Args:
      total_steps: T, the number of train steps of the run.
      avg_period: budget as an average period p_bar (C = floor(T / p_bar)).
      num_syncs: budget as a sync count C (give this or ``avg_period``).
      lr_schedule: step -> learning rate (e.g. an optax schedule); None means
        a constant learning rate.
      alpha: variance growth exponent, V(p) ~ a p^alpha.
      ema: weight of the newest measurement in a_hat.
      forecast: how a plan sees the growth rate ahead. ``"ema"``: a(s) =
        a_hat * gamma(s)^2 for every s >= u, the rule above. ``"trend"``:
        the measurements g of the current learning-rate phase (cut where the
        rate moves by ``replan_lr_factor``) are fitted by least squares,
        log g ~ b * position, and a plan uses W_b(u) = sum_{s >= u}
        (gamma(s)/gamma(u))^kappa * exp(b / (alpha + 1) * (min(s, e(u)) - u))
        in place of W(u), with e(u) the phase's end: the trend continues to
        the end of the phase and is held after it (b = 0 until 3
        measurements). O(T) work per sync, inside the sync branch.
    """
    return _planned(total_steps, avg_period, num_syncs, lr_schedule, alpha, ema, replan_every,
                    replan_lr_factor, min_period, max_period, warmup_steps, feedback=True, forecast=forecast)


def lr_proportional(
    total_steps: int,
    avg_period: Optional[int] = None,
    *,
    num_syncs: Optional[int] = None,
    lr_schedule: Optional[ScheduleFn] = None,
    alpha: float = 1.0,
    min_period: int = 1,
    max_period: Optional[int] = None,
    warmup_steps: int = 0,
) -> Schedule:
    """ADPSGD's open-loop plan without variance feedback: after every sync the
    next period is p = W(u) / R (docs/algorithm.md, "The ADPSGD controller"), i.e. sync density
    proportional to gamma^kappa with the remaining budget spent exactly."""
    return _planned(total_steps, avg_period, num_syncs, lr_schedule, alpha, 0.5, 1, 1.5,
                    min_period, max_period, warmup_steps, feedback=False)
