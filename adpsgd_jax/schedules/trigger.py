"""Variance-triggered averaging: sync when a per-step bound of V crosses a
threshold that follows the optimal sync density.

The schedule is ``_trigger_init`` / ``_trigger_should_sync`` /
``_trigger_update`` (and ``_observe``, its ``Drift`` hook) over a
``TriggerConfig`` fixed at construction.
"""

from __future__ import annotations

import functools
from typing import NamedTuple, Optional

import jax.numpy as jnp
import numpy as np

from adpsgd_jax.schedules.base import (Array, Drift, Schedule, ScheduleFn, _check_growth, _check_int, _f32, _i32,
                                       _lr_tables, _period_bounds, resolve_budget)


class TriggerState(NamedTuple):
    """State of ``variance_trigger`` (docs/algorithm.md, "variance_trigger")."""

    period: Array  # int32[]: the last completed period (before the first sync: the planned first one).
    last_sync: Array  # int32[]: position of the last sync (0 at the start).
    syncs: Array  # int32[]: syncs used.
    a_hat: Array  # float32[]: growth of the bound per unit gamma^2, EMA(B / (tau^alpha mean gamma^2)); 0 = none yet.
    scale: Array  # float32[]: s of the threshold s * gamma(t)^kappa (0 before the first sync).
    bound: Array  # float32[]: the bound B of the latest step (``Drift.observe``; 0 right after a sync).
    previous: Array  # float32[]: B of the step before it.


MAX_SHARE = 3.0


class TriggerConfig(NamedTuple):
    """What ``variance_trigger`` fixes at construction, validated on the host."""

    total_steps: int  # T
    budget: int  # C
    min_period: int  # p_min
    max_period: int  # p_max
    alpha: float  # growth exponent of the variance within a period
    ema: float  # weight of the newest measurement in a_hat
    direction: bool  # keep u (``Drift.direction``)
    first: int  # the first period, W(0) / C clipped
    lr_at: Array  # float32 [T + 1]: gamma(t)
    lr_kappa: Array  # float32 [T + 1]: gamma(t)^kappa
    suffix: Array  # float32 [T + 1]: S(u) = W(u) gamma(u)^kappa = sum_{t >= u} gamma(t)^kappa


def _check_trigger(total_steps, avg_period, num_syncs, lr_schedule, alpha, ema, min_period, max_period,
                   direction) -> TriggerConfig:
    """The validated ``TriggerConfig`` of ``variance_trigger``'s arguments (ValueError otherwise)."""
    T = _check_int("total_steps", total_steps, 1)
    C = resolve_budget(T, avg_period, num_syncs)
    _check_growth(alpha, ema)
    p_min, p_max = _period_bounds(T, min_period, max_period)
    if C * p_min > T:
        raise ValueError(f"min_period={p_min} leaves room for only {T // p_min} syncs, fewer than the budget {C}")
    kappa = 2.0 / (alpha + 1.0)
    lr_at, weights = _lr_tables(T, lr_schedule, kappa)
    lr_kappa = lr_at**kappa  # gamma(t)^kappa, t = 0 .. T (float32)
    first = int(np.clip(round(float(weights[0]) / C), p_min, min(p_max, T - (C - 1) * p_min)))
    return TriggerConfig(T, C, p_min, p_max, alpha, ema, direction, first, lr_at, lr_kappa, weights * lr_kappa)


def _trigger_init(config: TriggerConfig) -> TriggerState:
    return TriggerState(period=_i32(config.first), last_sync=_i32(0), syncs=_i32(0), a_hat=_f32(0.0),
                        scale=_f32(0.0), bound=_f32(0.0), previous=_f32(0.0))


def _observe(state: TriggerState, step, bound) -> TriggerState:
    """``Drift.observe``: the step's bound B becomes the latest, the latest the previous."""
    del step
    return state._replace(bound=jnp.asarray(bound, jnp.float32), previous=state.bound)


def _threshold(config: TriggerConfig, state: TriggerState, step):
    """s * gamma(t)^kappa."""
    return state.scale * config.lr_kappa[step]


def _trigger_should_sync(config: TriggerConfig, state: TriggerState, step):
    """B crossed the threshold (the planned first period before the first sync), the owed syncs no
    longer fit a step later, the period used ``MAX_SHARE`` times its share, or it reached p_max;
    never before p_min steps, never past the budget."""
    T, C, p_min = config.total_steps, config.budget, config.min_period
    position = step + 1
    taken, owed = position - state.last_sync, C - state.syncs
    crossed = jnp.where(state.syncs > 0, state.bound >= _threshold(config, state, step), position == config.first)
    room = T - position < (owed - 1) * p_min + 1  # waiting a step would leave too few steps for the owed syncs
    # The period has used max_share times the learning-rate mass the plan gives one of the owed syncs.
    suffix = config.suffix
    used = suffix[state.last_sync] - suffix[position]
    late = (state.syncs > 0) & (used >= MAX_SHARE * suffix[state.last_sync] / jnp.maximum(owed, 1))
    return (owed > 0) & (taken >= p_min) & (crossed | room | late | (taken >= config.max_period))


def _trigger_update(config: TriggerConfig, state: TriggerState, step, variance, loss) -> TriggerState:
    """After a sync at position u: a_hat <- EMA(B / (tau^alpha g2)) and s = a_hat * (S(u) / R)^alpha."""
    del loss
    alpha, ema, lr_at = config.alpha, config.ema, config.lr_at
    position = (step + 1).astype(jnp.int32)
    taken = jnp.maximum(position - state.last_sync, 1)
    lr_sq = 0.5 * (lr_at[state.last_sync] ** 2 + lr_at[position - 1] ** 2)
    # The first sync, with no direction yet, measures the exact V: B then holds all of the mean drift
    # (3x V on digits), where later bounds, with u, hold little of it.
    first = jnp.asarray(variance, jnp.float32) if config.direction else state.bound
    # Where B crossed the threshold during this step, the crossing is placed between the
    # steps by linear interpolation, so that a period rounded up to whole steps does not bias a_hat.
    level, prev = _threshold(config, state, step), state.previous
    crossed = (state.syncs > 0) & (prev < level) & (level <= state.bound)
    fraction = jnp.clip((level - prev) / jnp.where(crossed, state.bound - prev, 1.0), 0.0, 1.0)
    tau = jnp.where(crossed, jnp.maximum(taken - 1 + fraction, 0.5), taken.astype(jnp.float32))
    measured = jnp.where(state.syncs > 0, jnp.where(crossed, level, state.bound), first)
    growth = jnp.maximum(measured, 0.0) / tau**alpha / lr_sq
    a_hat = jnp.where(state.a_hat > 0, (1.0 - ema) * state.a_hat + ema * growth, growth)
    syncs = state.syncs + 1
    left = jnp.maximum(config.budget - syncs, 1).astype(jnp.float32)
    scale = a_hat * (config.suffix[jnp.minimum(position, config.total_steps)] / left) ** alpha
    return TriggerState(period=taken.astype(jnp.int32), last_sync=position, syncs=syncs.astype(jnp.int32),
                        a_hat=a_hat.astype(jnp.float32), scale=scale.astype(jnp.float32), bound=_f32(0.0),
                        previous=_f32(0.0))


def _trigger(config: TriggerConfig) -> Schedule:
    return Schedule(functools.partial(_trigger_init, config), functools.partial(_trigger_should_sync, config),
                    functools.partial(_trigger_update, config), drift=Drift(_observe, config.direction))


def variance_trigger(
    total_steps: int,
    avg_period: Optional[int] = None,
    *,
    num_syncs: Optional[int] = None,
    lr_schedule: Optional[ScheduleFn] = None,
    alpha: float = 1.0,
    ema: float = 0.5,
    min_period: int = 1,
    max_period: Optional[int] = None,
    direction: bool = True,
) -> Schedule:
    """Variance-triggered averaging in the manner of federated dynamic averaging
    (Theologitis et al., 2024), under a budget of C syncs; docs/algorithm.md,
    "variance_trigger".

    After every local step the train step computes, with Delta_i = x_i - x_s
    (x_s the parameters after the last sync) and u the unit direction of the
    last sync's change of x_s (zero before the first sync), one all-reduce of
    the pair (||Delta_i||^2, <Delta_i, u>) and the bound

        B = mean_i ||Delta_i||^2 - (mean_i <Delta_i, u>)^2  >=  V

    (``Drift``). The workers sync after step t when B >= s * gamma(t)^kappa,
    kappa = 2 / (alpha + 1): the pre-sync variance of the optimal density,
    a^(1/(alpha+1)) with a ~ gamma^2. At each sync at position u, after tau
    local steps: a_hat <- EMA(B / (tau^alpha g2)) (g2 the period's mean
    gamma^2, as in ``adpsgd``; tau interpolated to where B crossed the
    threshold; the exact V instead of B at the first sync, before u exists) and

        s = a_hat * (S(u) / R)^alpha,    S(u) = sum_{t >= u} gamma(t)^kappa,

    R the syncs still owed: the threshold at which growth a(t) = a_hat
    gamma(t)^2 would spend the R syncs over the rest of the run. Spending
    ahead of the plan shrinks R and raises s; falling behind lowers it.

    The first period is the plan's, W(0) / C, as in ``lr_proportional``. A
    sync is also forced when the period reaches ``max_period`` and when the
    owed syncs would otherwise no longer fit at ``min_period`` each; no sync
    comes sooner than ``min_period`` steps after the last, and never more
    than C are made. Exactly C are made in every run, whatever B: the first
    sync comes at the latest at W(0) / C (clipped to leave (C - 1) *
    ``min_period`` steps), and each forced sync at the latest position that
    leaves ``min_period`` steps per owed sync, which is at least
    ``min_period`` steps after the previous sync.

    Args:
      total_steps: T.
      avg_period: the budget as an average period p_bar (give this or ``num_syncs``).
      num_syncs: the budget as a sync count C.
      lr_schedule: step -> learning rate; None is a constant rate.
      alpha: growth exponent of the variance within a period, V ~ a tau^alpha.
      ema: weight of the newest measurement in a_hat.
      direction: keep u (one more parameter copy per worker); False uses
        B = mean_i ||Delta_i||^2.
    """
    return _trigger(_check_trigger(total_steps, avg_period, num_syncs, lr_schedule, alpha, ema, min_period,
                                   max_period, direction))
