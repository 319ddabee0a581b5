"""Open-loop schedules: the period depends only on the step (and, for
AdaComm, on the losses at the syncs): every_step, constant (CPSGD),
post_local, stagewise, adacomm."""

from __future__ import annotations

from typing import NamedTuple, Sequence

import jax.numpy as jnp
import numpy as np

from adpsgd_jax.schedules.base import Array, Schedule, _check_int, _f32, _i32, _warmup


class PeriodState(NamedTuple):
    """State of schedules whose period depends only on the step."""

    period: Array  # int32[]: the period in force.


def every_step() -> Schedule:
    """Average the parameters after every local step (period 1). With plain
    SGD this is the ``allreduce`` strategy's step, up to float rounding."""

    def init():
        return PeriodState(period=_i32(1))

    def should_sync(state, step):
        del state, step
        return jnp.asarray(True)

    def update(state, step, variance, loss):
        del step, variance, loss
        return state

    return Schedule(init, should_sync, update)


def constant(period: int) -> Schedule:
    """CPSGD: average every ``period`` steps, i.e. after steps p-1, 2p-1, ...

    In T steps this performs exactly floor(T / period) syncs.
    """
    period = _check_int("period", period, 1)

    def init():
        return PeriodState(period=_i32(period))

    def should_sync(state, step):
        del state
        return (step + 1) % period == 0

    def update(state, step, variance, loss):
        del step, variance, loss
        return state

    return Schedule(init, should_sync, update)


def post_local(warmup_steps: int, period: int) -> Schedule:
    """Post-local SGD (Lin et al., 2020) as PyTorch runs it: ``warmup_steps``
    allreduce steps, then parameter averages every ``period`` steps.

    Steps 0 .. W-1 (W = ``warmup_steps``) are allreduce steps: the gradient
    mean feeds one optimizer update, so parameters and optimizer state (the
    momentum buffers) stay identical on every worker. Parameters are averaged
    after step t iff t >= W and (t - W) mod p = 0, i.e. after steps W, W+p,
    W+2p, ...: PyTorch's ``PeriodicModelAverager(period=p, warmup_steps=W)``
    behind DDP's ``post_localSGD_hook`` with ``start_localSGD_iter=W``
    (docs/pytorch.md). A run of T > W steps makes W allreduce rounds and
    floor((T - W - 1) / p) + 1 averages; W >= T is full-sync SGD (``allreduce``) throughout.
    """
    warmup_steps = _check_int("warmup_steps", warmup_steps, 0)
    period = _check_int("period", period, 1)

    def init():
        return PeriodState(period=_i32(period))

    def should_sync(state, step):
        del state
        after = step - warmup_steps
        return (after >= 0) & (after % period == 0)

    def update(state, step, variance, loss):
        del step, variance, loss
        return state

    return Schedule(init, should_sync, update, _warmup(warmup_steps))


class NextSyncState(NamedTuple):
    """State of schedules that decide the next sync step at each sync."""

    period: Array  # int32[]: the period in force.
    next_sync: Array  # int32[]: sync after the step whose index + 1 equals this.


def stagewise(period: int, boundaries: Sequence[int], factor: float = 2.0) -> Schedule:
    """Stagewise increasing period (STL-SGD; LUPA-SGD's adaptive variant).

    The period in force at step t is ``round(period * factor**k)`` where k is
    the number of ``boundaries`` (step indices, usually the learning-rate
    decay steps) that are <= t. Each sync schedules the next one with the
    period in force after it.
    """
    period = _check_int("period", period, 1)
    bounds = sorted(_check_int("boundaries", b, 1) for b in boundaries)
    if not factor > 0:
        raise ValueError(f"factor must be > 0, got {factor!r}")
    periods = [max(1, round(period * factor**k)) for k in range(len(bounds) + 1)]
    bounds_arr = np.asarray(bounds, np.int32)
    periods_arr = np.asarray(periods, np.int32)

    def period_at(position):
        stage = jnp.sum(position >= bounds_arr) if len(bounds) else 0
        return jnp.asarray(periods_arr)[stage]

    def init():
        return NextSyncState(period=_i32(periods[0]), next_sync=_i32(periods[0]))

    def should_sync(state, step):
        return step + 1 == state.next_sync

    def update(state, step, variance, loss):
        del variance, loss
        p = period_at(step + 1)
        return NextSyncState(period=p, next_sync=(step + 1 + p).astype(jnp.int32))

    return Schedule(init, should_sync, update)


class AdaCommState(NamedTuple):
    period: Array  # int32[]
    next_sync: Array  # int32[]
    loss0: Array  # float32[]: F_0, the loss at the first sync (NaN before it).
    loss_sum: Array  # float32[]: sum of sync losses in the current interval.
    loss_count: Array  # int32[]
    next_adapt: Array  # int32[]: step position at which the period is next revised.


def adacomm(period: int, interval: int, min_period: int = 1) -> Schedule:
    """AdaComm (Wang & Joshi, 2019): start with a long period, shorten it as
    the loss falls.

    Every ``interval`` steps the period is revised to
    ``tau_l = ceil(sqrt(F_l / F_0) * tau_0)``, clipped to [min_period, tau_0],
    where tau_0 = ``period``, F_0 is the worker-mean loss at the first sync
    and F_l the mean of the worker-mean losses at the syncs of the interval
    just ended (a cheap estimate of the training loss at its end).
    """
    period = _check_int("period", period, 1)
    interval = _check_int("interval", interval, 1)
    min_period = _check_int("min_period", min_period, 1)
    if min_period > period:
        raise ValueError(f"min_period ({min_period}) must be <= period ({period})")

    def init():
        return AdaCommState(
            period=_i32(period),
            next_sync=_i32(period),
            loss0=_f32(jnp.nan),
            loss_sum=_f32(0.0),
            loss_count=_i32(0),
            next_adapt=_i32(interval),
        )

    def should_sync(state, step):
        return step + 1 == state.next_sync

    def update(state, step, variance, loss):
        del variance
        position = step + 1
        loss = loss.astype(jnp.float32)
        loss0 = jnp.where(jnp.isnan(state.loss0), loss, state.loss0)
        loss_sum = state.loss_sum + loss
        loss_count = state.loss_count + 1
        revise = position >= state.next_adapt
        ratio = (loss_sum / loss_count) / loss0
        tau = jnp.ceil(jnp.sqrt(jnp.maximum(ratio, 0.0)) * period)
        tau = jnp.clip(jnp.nan_to_num(tau, nan=period), min_period, period).astype(jnp.int32)
        new_period = jnp.where(revise, tau, state.period)
        return AdaCommState(
            period=new_period,
            next_sync=(position + new_period).astype(jnp.int32),
            loss0=loss0,
            loss_sum=jnp.where(revise, 0.0, loss_sum).astype(jnp.float32),
            loss_count=jnp.where(revise, 0, loss_count).astype(jnp.int32),
            next_adapt=jnp.where(revise, state.next_adapt + interval, state.next_adapt).astype(jnp.int32),
        )

    return Schedule(init, should_sync, update)
