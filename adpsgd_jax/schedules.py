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
  with ``warmup_steps``) also has ``full_sync_step``: on those steps the
  train step averages gradients before one optimizer update instead of
  stepping locally (docs/algorithm.md, "Warm-up: full-sync steps").
* ``variance_trigger`` also has ``drift``: the train step gives it a bound of
  the variance after every local step, before ``should_sync``.

Budgeted schedules (``adpsgd``, ``lr_proportional``, ``qsr``,
``variance_trigger``) take the run length and the learning-rate schedule at
construction and validate all arguments there, before anything is compiled.
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Optional, Sequence

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
        local step (full-sync steps included), with the same bound on every worker.
      direction: keep u, the direction of the last sync's change of x_s. Without
        it the bound is mean_i ||x_i - x_s||^2, looser by ||mean_i x_i - x_s||^2.
    """

    observe: Callable[[NamedTuple, Array, Array], NamedTuple]
    direction: bool = True


class Schedule(NamedTuple):
    """A parameter-averaging schedule: pure ``init``, ``should_sync``, ``update``
    and, for a warm-up, ``full_sync_step``; for a per-step statistic, ``drift``.

    Attributes:
      init: ``() -> state``.
      should_sync: ``(state, step: int32[]) -> bool[]``; true when the workers
        average after local step ``step``. False on full-sync steps.
      update: ``(state, step: int32[], variance: float32[], loss: float32[])
        -> state``; called after each sync (never after a full-sync step).
      full_sync_step: ``(state, step: int32[]) -> bool[]``, or None (the
        default: no step is). True when step ``step`` is a full-sync step:
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
    full_sync_step: Optional[Callable[[NamedTuple, Array], Array]] = None
    drift: Optional[Drift] = None


def _warmup(warmup_steps: int) -> Optional[Callable[[NamedTuple, Array], Array]]:
    """``full_sync_step`` of a warm-up of ``warmup_steps`` steps: steps 0 .. warmup_steps - 1."""
    if warmup_steps == 0:
        return None

    def full_sync_step(state, step):
        del state
        return step < warmup_steps

    return full_sync_step


def _i32(x) -> Array:
    return jnp.asarray(x, jnp.int32)


def _f32(x) -> Array:
    return jnp.asarray(x, jnp.float32)


def _check_int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or int(value) != value or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


# --------------------------------------------------------------------------
# Open-loop schedules.


class PeriodState(NamedTuple):
    """State of schedules whose period depends only on the step."""

    period: Array  # int32[]: the period in force.


def full_sync() -> Schedule:
    """Average after every local step (period 1)."""

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
    full-sync steps, then parameter averages every ``period`` steps.

    Steps 0 .. W-1 (W = ``warmup_steps``) are full-sync steps: the gradient
    mean feeds one optimizer update, so parameters and optimizer state (the
    momentum buffers) stay identical on every worker. Parameters are averaged
    after step t iff t >= W and (t - W) mod p = 0, i.e. after steps W, W+p,
    W+2p, ...: PyTorch's ``PeriodicModelAverager(period=p, warmup_steps=W)``
    behind DDP's ``post_localSGD_hook`` with ``start_localSGD_iter=W``
    (docs/pytorch.md). A run of T > W steps makes W full-sync rounds and
    floor((T - W - 1) / p) + 1 averages; W >= T is full-sync SGD throughout.
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


# --------------------------------------------------------------------------
# Budgeted schedules: ADPSGD and its open-loop plan.


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


# --------------------------------------------------------------------------
# QSR: the period grows with the inverse square of the learning rate.


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


# --------------------------------------------------------------------------
# Variance-triggered averaging: sync when a per-step bound of V crosses a threshold.


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

    (``Drift``). The workers sync after step t when B > s * gamma(t)^kappa,
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
    than C are made.

    Args:
      total_steps: T.
      avg_period / num_syncs: the budget (give one).
      lr_schedule: step -> learning rate; None is a constant rate.
      alpha: growth exponent of the variance within a period, V ~ a tau^alpha.
      ema: weight of the newest measurement in a_hat.
      direction: keep u (one more parameter copy per worker); False uses
        B = mean_i ||Delta_i||^2.
    """
    T = _check_int("total_steps", total_steps, 1)
    C = resolve_budget(T, avg_period, num_syncs)
    _check_growth(alpha, ema)
    p_min, p_max = _period_bounds(T, min_period, max_period)
    if C * p_min > T:
        raise ValueError(f"min_period={p_min} leaves room for only {T // p_min} syncs, fewer than the budget {C}")
    kappa = 2.0 / (alpha + 1.0)
    lr_at, weights = _lr_tables(T, lr_schedule, kappa)
    lr_kappa = lr_at**kappa  # gamma(t)^kappa, t = 0 .. T (float32)
    suffix = weights * lr_kappa  # S(u) = W(u) gamma(u)^kappa
    first = int(np.clip(round(float(weights[0]) / C), p_min, min(p_max, T - (C - 1) * p_min)))

    def init():
        return TriggerState(period=_i32(first), last_sync=_i32(0), syncs=_i32(0), a_hat=_f32(0.0),
                            scale=_f32(0.0), bound=_f32(0.0), previous=_f32(0.0))

    def observe(state, step, bound):
        del step
        return state._replace(bound=jnp.asarray(bound, jnp.float32), previous=state.bound)

    def threshold(state, step):
        return state.scale * lr_kappa[step]

    def should_sync(state, step):
        position = step + 1
        taken, owed = position - state.last_sync, C - state.syncs
        crossed = jnp.where(state.syncs > 0, state.bound >= threshold(state, step), position == first)
        room = T - position < (owed - 1) * p_min + 1  # waiting a step would leave too few steps for the owed syncs
        # The period has used max_share times the learning-rate mass the plan gives one of the owed syncs.
        used = suffix[state.last_sync] - suffix[position]
        late = (state.syncs > 0) & (used >= MAX_SHARE * suffix[state.last_sync] / jnp.maximum(owed, 1))
        return (owed > 0) & (taken >= p_min) & (crossed | room | late | (taken >= p_max))

    def update(state, step, variance, loss):
        del loss
        position = (step + 1).astype(jnp.int32)
        taken = jnp.maximum(position - state.last_sync, 1)
        lr_sq = 0.5 * (lr_at[state.last_sync] ** 2 + lr_at[position - 1] ** 2)
        # The first sync, with no direction yet, measures the exact V: B then holds all of the mean drift
        # (3x V on digits), where later bounds, with u, hold little of it.
        first = jnp.asarray(variance, jnp.float32) if direction else state.bound
        # Where B crossed the threshold during this step, the crossing is placed between the
        # steps by linear interpolation, so that a period rounded up to whole steps does not bias a_hat.
        level, prev = threshold(state, step), state.previous
        crossed = (state.syncs > 0) & (prev < level) & (level <= state.bound)
        fraction = jnp.clip((level - prev) / jnp.where(crossed, state.bound - prev, 1.0), 0.0, 1.0)
        tau = jnp.where(crossed, jnp.maximum(taken - 1 + fraction, 0.5), taken.astype(jnp.float32))
        measured = jnp.where(state.syncs > 0, jnp.where(crossed, level, state.bound), first)
        growth = jnp.maximum(measured, 0.0) / tau**alpha / lr_sq
        a_hat = jnp.where(state.a_hat > 0, (1.0 - ema) * state.a_hat + ema * growth, growth)
        syncs = state.syncs + 1
        left = jnp.maximum(C - syncs, 1).astype(jnp.float32)
        scale = a_hat * (suffix[jnp.minimum(position, T)] / left) ** alpha
        return TriggerState(period=taken.astype(jnp.int32), last_sync=position, syncs=syncs.astype(jnp.int32),
                            a_hat=a_hat.astype(jnp.float32), scale=scale.astype(jnp.float32), bound=_f32(0.0),
                            previous=_f32(0.0))

    return Schedule(init, should_sync, update, drift=Drift(observe, direction))
