"""ADPSGD's forecasts of the growth rate ahead, ``ema_forecast`` (the
default) and ``trend_forecast`` (docs/algorithm.md, "The trend forecast").

A forecast is a ``Forecast`` of pure functions over the schedule's
``planned.PlannedConfig``: host tables computed once at construction, its
own first state, and the weight W that a plan uses at each sync.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, NamedTuple

import jax.numpy as jnp
import numpy as np

from adpsgd_jax.schedules.base import Array, _f32, _i32

if TYPE_CHECKING:
    from adpsgd_jax.schedules.planned import PlannedConfig, PlannedState


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
