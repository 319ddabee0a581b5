"""ADPSGD and its open-loop plan ``lr_proportional`` (docs/algorithm.md,
"The ADPSGD controller").

Both schedules are ``_planned_init`` / ``_planned_should_sync`` /
``_planned_update`` over a ``PlannedConfig`` fixed at construction; ADPSGD's
forecast of the growth rate is a ``forecasts.Forecast`` of pure functions
over that config.
"""

from __future__ import annotations

import functools
from typing import NamedTuple, Optional

import jax.numpy as jnp
import numpy as np

from adpsgd_jax.schedules.base import (Array, Schedule, ScheduleFn, _check_growth, _check_int, _f32, _i32,
                                       _lr_tables, _period_bounds, _warmup, resolve_budget)
from adpsgd_jax.schedules.forecasts import Forecast, ema_forecast


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
