"""Averaging schedules: when the workers average their parameters.

Every schedule follows optax's pattern: a NamedTuple of pure functions over a
state that is a NamedTuple of jnp scalars, so the decision to synchronise is
a traced boolean and the train step compiles once.

    sched = constant(period=8)
    state = sched.init()
    flag = sched.should_sync(state, step)           # bool[], after local step `step`
    state = sched.update(state, step, variance, loss)  # call only after a sync

Conventions shared by every schedule:

* ``step`` is the 0-based index of the local step just taken; a sync "at step
  t" averages the parameters produced by t + 1 local updates.
* ``update`` is called only on steps where ``should_sync`` was true, with the
  pre-sync parameter variance V = (1/N) sum_i ||x_i - xbar||^2 and the
  worker-mean training loss of that step (docs/algorithm.md, "Setting").
* Every state has an int32 ``period`` field: the period in force, which the
  train step reports as a metric.
* A schedule with a warm-up (``post_local``; ``adpsgd`` / ``lr_proportional``
  with ``warmup_steps``) also has ``allreduce_step``: on those steps the
  train step averages gradients before one optimizer update instead of
  stepping locally (docs/algorithm.md, "Warm-up: allreduce steps").
* ``adpsgd``'s forecast of the growth rate is a ``Forecast`` of pure
  functions: ``ema_forecast()`` (the default) or ``trend_forecast()``.
* ``variance_trigger`` also has ``drift``: the train step gives it a bound of
  the variance after every local step, before ``should_sync``.

Budgeted schedules (``adpsgd``, ``lr_proportional``, ``qsr``,
``variance_trigger``) take the run length and the learning-rate schedule at
construction and validate all arguments there, before anything is compiled.
"""

from adpsgd_jax.schedules.base import Drift, Schedule, resolve_budget
from adpsgd_jax.schedules.periodic import (AdaCommState, NextSyncState, PeriodState, adacomm, constant, every_step,
                                           post_local, stagewise)
from adpsgd_jax.schedules.forecasts import Forecast, TrendState, ema_forecast, trend_forecast
from adpsgd_jax.schedules.planned import PlannedConfig, PlannedState, adpsgd, lr_proportional
from adpsgd_jax.schedules.quadratic import QSRState, qsr, qsr_alpha
from adpsgd_jax.schedules.trigger import MAX_SHARE, TriggerState, variance_trigger

__all__ = ["Drift", "Schedule", "resolve_budget", "PeriodState", "NextSyncState", "AdaCommState", "every_step",
           "constant", "post_local", "stagewise", "adacomm", "Forecast", "PlannedConfig", "PlannedState", "TrendState",
           "adpsgd", "ema_forecast", "trend_forecast", "lr_proportional", "QSRState", "qsr", "qsr_alpha",
           "TriggerState", "MAX_SHARE", "variance_trigger"]
