"""ADPSGD and its open-loop plan ``lr_proportional`` (docs/algorithm.md,
"The ADPSGD controller"), with ADPSGD's two forecasts of the growth rate,
``ema_forecast`` and ``trend_forecast``.

Both schedules are ``_planned_init`` / ``_planned_should_sync`` /
``_planned_update`` over a ``PlannedConfig`` fixed at construction; a
forecast is a ``Forecast`` of pure functions over that config.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple, Optional

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
    """State of ``adpsgd(forecast=trend_forecast())``: the plan's state and an online
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


class PlannedConfig(NamedTuple):
    """What ``adpsgd`` and ``lr_proportional`` fix at construction, validated on the host."""

    total_steps: int  # T
    budget: int  # C, the syncs to spend after the warm-up
    min_period: int  # p_min
    max_period: int  # p_max
    warmup_steps: int  # T_w: steps 0 .. T_w - 1 are allreduce steps
    alpha: float  # growth exponent, V(p) ~ a p^alpha
    ema: float  # weight of the newest measurement in a_hat
    replan_every: int  # syncs between plans
    replan_lr_factor: float  # a learning-rate move by this factor forces a plan
    feedback: bool  # ADPSGD (the measured variance sets Q) rather than lr_proportional
    lr_at: Array  # float32 [T + 1]: gamma(u)
    weights: Array  # float32 [T + 1]: W(u) = sum_{s >= u} (gamma(s)/gamma(u))^kappa

    @property
    def kappa(self) -> float:
        return 2.0 / (self.alpha + 1.0)

    @property
    def root(self) -> float:
        """1 / (alpha + 1), the exponent of a(u) in Q."""
        return 1.0 / (self.alpha + 1.0)


class Forecast(NamedTuple):
    """How ``adpsgd`` sees the growth rate ahead when it plans, as pure
    functions (``ema_forecast()``, ``trend_forecast()``; docs/algorithm.md,
    "The trend forecast").

    Attributes:
      tables: ``(config: PlannedConfig) -> tables``, computed once on the host
        at construction (None when the forecast needs none).
      init: ``(tables) -> fit``: the forecast's own first state (None when it keeps none).
      weight: ``(config, tables, fit, planned: PlannedState, position: int32[],
        growth: float32[]) -> (W: float32[], fit)``: at a sync at position u, with
        the growth g just measured (per unit gamma^2), the weight that stands for
        W(u) in the plan Q = a(u)^(1/(alpha+1)) * W / R, and the new fit.
      state: ``(planned, fit) -> state``: the schedule's state.
      parts: ``(state) -> (planned, fit)``.
    """

    tables: Callable[[PlannedConfig], Any]
    init: Callable[[Any], Any]
    weight: Callable[..., tuple]
    state: Callable[[PlannedState, Any], NamedTuple]
    parts: Callable[[NamedTuple], tuple]


def _no_tables(config: PlannedConfig) -> None:
    del config


def _no_fit(tables) -> None:
    del tables


def _ema_weight(config: PlannedConfig, tables, fit, planned: PlannedState, position, growth) -> tuple:
    """W(u): the growth a(s) = a_hat * gamma(s)^2 for every s >= u."""
    del tables, planned, growth
    return config.weights[jnp.minimum(position, config.total_steps)], fit


def _plan_only(planned: PlannedState, fit) -> PlannedState:
    del fit
    return planned


def _as_parts(state: PlannedState) -> tuple:
    return state, None


def ema_forecast() -> Forecast:
    """ADPSGD's default forecast: a(s) = a_hat * gamma(s)^2 for every s >= u,
    so a plan uses W(u). Its state is the plan's, ``PlannedState``."""
    return Forecast(_no_tables, _no_fit, _ema_weight, _plan_only, _as_parts)


class _TrendTables(NamedTuple):
    """The trend forecast's host tables, indexed by position."""

    ends: Array  # int32 [T + 1]: e(u), the end of u's learning-rate phase
    starts: Array  # int32 [T + 1]: the start of u's phase
    powered: Array  # float32 [T]: gamma(s)^kappa
    positions: Array  # int32 [T]: s = 0 .. T - 1


class _Fit(NamedTuple):
    """The trend forecast's part of ``TrendState``: the phase's least-squares fit."""

    phase_start: Array
    fits: Array
    mean_pos: Array
    mean_log: Array
    c_pp: Array
    c_pl: Array


def _trend_tables(config: PlannedConfig) -> _TrendTables:
    T = config.total_steps
    ends_np = _phase_ends(T, config.lr_at, config.replan_lr_factor)
    starts_np = np.zeros(T + 1, np.int32)  # start of the phase holding each position
    for u in range(1, T + 1):
        starts_np[u] = u if ends_np[u - 1] == u else starts_np[u - 1]
    powered = jnp.asarray(np.asarray(config.lr_at, np.float64)[:T] ** config.kappa, jnp.float32)
    return _TrendTables(jnp.asarray(ends_np), jnp.asarray(starts_np), powered, jnp.arange(T, dtype=jnp.int32))


def _no_phase(tables) -> _Fit:
    del tables
    return _Fit(phase_start=_i32(-1), fits=_i32(0), mean_pos=_f32(0.0), mean_log=_f32(0.0), c_pp=_f32(0.0),
                c_pl=_f32(0.0))


def _fit_update(tables: _TrendTables, fit: _Fit, last_sync, position, growth) -> tuple:
    """(fit, slope b): Welford's update of the phase's least-squares fit of log g
    against the period's midpoint; b = 0 until 3 measurements."""
    mid = (last_sync + position) // 2
    phase = tables.starts[mid]
    fresh = phase != fit.phase_start
    fits = jnp.where(fresh, 0, fit.fits) + 1
    x = (mid - phase).astype(jnp.float32)
    y = jnp.log(jnp.maximum(growth, 1e-30))
    mean_pos, mean_log = jnp.where(fresh, 0.0, fit.mean_pos), jnp.where(fresh, 0.0, fit.mean_log)
    c_pp, c_pl = jnp.where(fresh, 0.0, fit.c_pp), jnp.where(fresh, 0.0, fit.c_pl)
    dx = x - mean_pos
    mean_pos = mean_pos + dx / fits
    mean_log = mean_log + (y - mean_log) / fits
    c_pp, c_pl = c_pp + dx * (x - mean_pos), c_pl + dx * (y - mean_log)
    slope = jnp.where((fits >= 3) & (c_pp > 0), c_pl / jnp.maximum(c_pp, 1e-30), 0.0)
    fit = _Fit(phase_start=phase.astype(jnp.int32), fits=fits.astype(jnp.int32),
               mean_pos=mean_pos.astype(jnp.float32), mean_log=mean_log.astype(jnp.float32),
               c_pp=c_pp.astype(jnp.float32), c_pl=c_pl.astype(jnp.float32))
    return fit, slope


def _trend_weight(config: PlannedConfig, tables: _TrendTables, fit: _Fit, planned: PlannedState, position,
                  growth) -> tuple:
    """W_b(u) = sum_{s >= u} (gamma(s)/gamma(u))^kappa exp(b/(alpha+1) (min(s, e(u)) - u)):
    the forecast a(s) = a(u) (gamma(s)/gamma(u))^2 exp(b (min(s, e(u)) - u)), with b the fitted
    log-slope of g over the current phase, held from the phase's end e(u) on."""
    fit, slope = _fit_update(tables, fit, planned.last_sync, position, growth)
    u = jnp.minimum(position, config.total_steps)
    ahead = jnp.minimum(tables.positions, tables.ends[u]) - u
    exponent = jnp.clip(slope * config.root * ahead.astype(jnp.float32), -30.0, 10.0)
    terms = jnp.where(tables.positions >= u, tables.powered / (config.lr_at[u] ** config.kappa) * jnp.exp(exponent),
                      0.0)
    return jnp.sum(terms), fit


def _trend_state(planned: PlannedState, fit: _Fit) -> TrendState:
    return TrendState(planned, *fit)


def _trend_parts(state: TrendState) -> tuple:
    return state.planned, _Fit(*state[1:])


def trend_forecast() -> Forecast:
    """The trend forecast: the measurements g of the current learning-rate
    phase (cut where the rate moves by ``replan_lr_factor``) are fitted by
    least squares, log g ~ b * position, and a plan uses W_b(u) =
    sum_{s >= u} (gamma(s)/gamma(u))^kappa * exp(b / (alpha + 1) * (min(s,
    e(u)) - u)) in place of W(u), with e(u) the phase's end: the trend
    continues to the end of the phase and is held after it (b = 0 until 3
    measurements). O(T) work per sync, inside the sync branch. Its state is
    a ``TrendState``."""
    return Forecast(_trend_tables, _no_phase, _trend_weight, _trend_state, _trend_parts)


def _check_planned(total_steps, avg_period, num_syncs, lr_schedule, alpha, ema, replan_every, replan_lr_factor,
                   min_period, max_period, warmup_steps, feedback) -> PlannedConfig:
    """The validated ``PlannedConfig`` of ``adpsgd`` / ``lr_proportional``'s arguments (ValueError otherwise)."""
    T = _check_int("total_steps", total_steps, 1)
    C = resolve_budget(T, avg_period, num_syncs)
    _check_growth(alpha, ema)
    replan_every = _check_int("replan_every", replan_every, 1)
    if not replan_lr_factor > 1.0:
        raise ValueError(f"replan_lr_factor must be > 1, got {replan_lr_factor!r}")
    p_min, p_max = _period_bounds(T, min_period, max_period)
    warmup = _check_int("warmup_steps", warmup_steps, 0)
    if warmup and C * p_min > T - warmup:
        raise ValueError(f"warmup_steps={warmup} leaves {max(T - warmup, 0)} of the {T} steps for the sync budget {C} "
                         f"(at min_period={p_min}): the warm-up's allreduce steps are not syncs of the budget")
    if C * p_min > T:
        raise ValueError(f"min_period={p_min} leaves room for only {T // p_min} syncs, fewer than the budget {C}")
    lr_at, weights = _lr_tables(T, lr_schedule, 2.0 / (alpha + 1.0))
    return PlannedConfig(T, C, p_min, p_max, warmup, alpha, ema, replan_every, replan_lr_factor, feedback, lr_at,
                         weights)


def _choose_period(config: PlannedConfig, position, syncs_left, raw):
    """Round and clip a planned period so the owed syncs still fit."""
    room = config.total_steps - position - (syncs_left - 1) * config.min_period
    p = jnp.clip(jnp.round(raw), config.min_period, config.max_period)
    p = jnp.clip(p, config.min_period, jnp.maximum(room, config.min_period))
    return p.astype(jnp.int32)


def _planned_init(config: PlannedConfig, forecast: Forecast, tables):
    """The first period from the plan with no measurement: W(T_w) / C at the
    end of the warm-up (T_w = 0 without one), where the workers are identical
    and the budget's C syncs start."""
    warmup, C = config.warmup_steps, config.budget
    period = _choose_period(config, warmup, C, config.weights[warmup] / C)
    planned = PlannedState(
        period=period,
        next_sync=(warmup + period).astype(jnp.int32),
        last_sync=_i32(warmup),
        syncs=_i32(0),
        since_plan=_i32(0),
        a_hat=_f32(0.0),
        q=_f32(0.0),
        plan_lr=config.lr_at[warmup],
    )
    return forecast.state(planned, forecast.init(tables))


def _planned_should_sync(config: PlannedConfig, forecast: Forecast, state, step):
    planned = forecast.parts(state)[0]
    return (step + 1 == planned.next_sync) & (planned.syncs < config.budget)


def _measured_growth(config: PlannedConfig, state: PlannedState, position, variance):
    """Growth per unit squared learning rate: V / p^alpha over the period's mean
    gamma^2 (trapezoid of its first and last step), so that a(t) = a_hat *
    gamma(t)^2 is the forecast of docs/algorithm.md and a learning-rate decay
    does not leave a stale estimate behind."""
    taken = jnp.maximum(position - state.last_sync, 1).astype(jnp.float32)
    lr_sq = 0.5 * (config.lr_at[state.last_sync] ** 2 + config.lr_at[position - 1] ** 2)
    return jnp.maximum(variance.astype(jnp.float32), 0.0) / taken**config.alpha / lr_sq


def _planned_update(config: PlannedConfig, forecast: Forecast, tables, state, step, variance, loss):
    """After a sync: a_hat <- EMA(g), a plan where one is due, the next period (``adpsgd``'s docstring)."""
    del loss
    T, ema = config.total_steps, config.ema
    state, fit = forecast.parts(state)
    position = (step + 1).astype(jnp.int32)
    growth = _measured_growth(config, state, position, variance)
    measured = state.a_hat > 0
    a_hat = jnp.where(measured, (1.0 - ema) * state.a_hat + ema * growth, growth)
    syncs = state.syncs + 1
    left = config.budget - syncs
    lr_now = config.lr_at[jnp.minimum(position, T)]
    lr_moved = jnp.abs(jnp.log(lr_now / state.plan_lr)) >= float(np.log(config.replan_lr_factor))
    plan = (~measured) | (state.since_plan + 1 >= config.replan_every) | lr_moved
    if not config.feedback:
        plan = jnp.asarray(True)
    a_root = jnp.maximum(a_hat * lr_now**2, 1e-30) ** config.root  # a(t)^(1/(alpha+1))
    weight, fit = forecast.weight(config, tables, fit, state, position, growth)
    w_over_r = weight / jnp.maximum(left, 1)
    q = jnp.where(plan, a_root * w_over_r, state.q)
    raw = w_over_r if not config.feedback else q / a_root
    # Once the budget is spent no period is in force; keep reporting the last one.
    period = jnp.where(left > 0, _choose_period(config, position, left, raw), state.period)
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
    return forecast.state(planned, fit)


def _planned(config: PlannedConfig, forecast: Forecast) -> Schedule:
    """The schedule of ``config`` whose plans see the growth ahead as ``forecast`` says."""
    tables = forecast.tables(config)
    return Schedule(functools.partial(_planned_init, config, forecast, tables),
                    functools.partial(_planned_should_sync, config, forecast),
                    functools.partial(_planned_update, config, forecast, tables),
                    _warmup(config.warmup_steps))


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
    forecast: Optional[Forecast] = None,
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
    0 .. T_w - 1 allreduce steps (gradients averaged before one optimizer
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
      forecast: how a plan sees the growth rate ahead, a ``Forecast``.
        None or ``ema_forecast()``: a(s) = a_hat * gamma(s)^2 for every s >=
        u, the rule above. ``trend_forecast()``: the growth's trend over the
        current learning-rate phase is extrapolated to the phase's end
        (the formula is ``trend_forecast``'s).
    """
    forecast = ema_forecast() if forecast is None else forecast
    if not isinstance(forecast, Forecast):
        raise ValueError(f"forecast must be a schedules.Forecast (schedules.ema_forecast() or "
                         f"schedules.trend_forecast()), got {forecast!r}")
    return _planned(_check_planned(total_steps, avg_period, num_syncs, lr_schedule, alpha, ema, replan_every,
                                   replan_lr_factor, min_period, max_period, warmup_steps, feedback=True), forecast)


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
    return _planned(_check_planned(total_steps, avg_period, num_syncs, lr_schedule, alpha, 0.5, 1, 1.5, min_period,
                                   max_period, warmup_steps, feedback=False), ema_forecast())
