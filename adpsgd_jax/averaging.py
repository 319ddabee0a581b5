"""``local_sgd``: local optimizer steps and periodic parameter averaging gated by a schedule.

    layout = distributed.workers(16)                    # 16 workers over the devices
    strategy = local_sgd(loss_fn, optax.sgd(0.1), schedules.constant(8), workers=layout)
    state = strategy.init(params, model_state, rng)     # one worker's state
    state = distributed.replicate(state, layout)        # [N, ...] per leaf
    p_train_step = distributed.shard_map_step(strategy.step, layout)
    state, metrics = p_train_step(state, batch)         # metrics: StepMetrics

Each step: the local optimizer update, then, when the schedule says so, a
``lax.cond``-gated average of parameters and model state (optionally the
optimizer state) with the pre-sync variance measured on the way
(docs/algorithm.md, "Strategies"). Between syncs nothing is communicated,
except a float32 pair every step for a schedule that watches the drift
(``variance_trigger``). A schedule's warm-up steps (``allreduce_step``) are
allreduce steps, a branch of the same program. Three options: two-level
averaging (``group_axis_name``), an outer optimizer on the averaged
change (DiLoCo) and streaming averaging, one fragment of the parameters
per sync (``fragments``; the rounds live in ``streaming``).

The step is ``_local_sgd_step`` over the constructor's fixed parts
(``_Averaging``); each of its stages is a module-level function over
NamedTuple operands.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax
from jax import lax

from adpsgd_jax import collectives, comm, streaming
from adpsgd_jax.collectives import tree_pmean
from adpsgd_jax.schedules import Schedule
from adpsgd_jax.state import Monitor, StepMetrics, Strategy, TrainState, initial_state
from adpsgd_jax.step import (AxisName, LossFn, WorkerAxes, _apply, _aux, _check_axes, _check_loss, _check_optimizer,
                             _float_bytes, _grad_fn, _local_grads, _named, _payload)


class _Averaging(NamedTuple):
    """What a ``local_sgd`` step is built from, fixed when it is constructed."""

    grad_fn: Callable  # value_and_grad of the loss, looped over a device's workers
    optimizer: optax.GradientTransformation
    schedule: Schedule
    axes: WorkerAxes
    average_opt_state: bool
    outer_optimizer: Optional[optax.GradientTransformation]
    streaming: Optional[streaming.Streaming] = None  # fragments (``streaming``), or None: every sync averages all


class _Gradients(NamedTuple):
    """What the optimizer update reads: one worker's gradients and new model
    state, with the two fields that an allreduce step also writes."""

    grads: Any
    model_state: Any
    anchor: Any  # x_s (or None)
    group_comm: comm.CommCounter


class _Updated(NamedTuple):
    """One worker after its optimizer update, before the gated average."""

    params: Any
    model_state: Any
    opt_state: Any
    anchor: Any
    group_comm: comm.CommCounter


class _Replica(NamedTuple):
    """What the averaging branch reads and writes (the ``lax.cond`` operand): one
    worker's values after its update; averaged where the workers sync, else kept."""

    params: Any
    model_state: Any
    opt_state: Any
    sched_state: Any
    anchor: Any
    outer_opt_state: Any
    monitor: Optional[Monitor]


def _local_update(spec: _Averaging, state: TrainState, group_bytes: int, inputs: _Gradients) -> _Updated:
    """The local optimizer update; under two-level averaging after the mean of
    the gradients and model state inside the group (an allreduce step there)."""
    grads, model_state, group_counter = inputs.grads, inputs.model_state, inputs.group_comm
    inside = spec.axes.inside
    if inside:
        grads = tree_pmean(grads, inside)
        model_state = tree_pmean(model_state, inside)
        group_counter = group_counter.add(jnp.int32(1), group_bytes)
    params, opt_state = _apply(spec.optimizer, state.params, grads, state.opt_state)
    return _Updated(params, model_state, opt_state, inputs.anchor, group_counter)


def _allreduce_update(spec: _Averaging, state: TrainState, inputs: _Gradients) -> _Updated:
    """An allreduce step's update: g = (1/N) sum_i g_i and the mean model state
    over every worker, then the optimizer, as ``allreduce`` does."""
    workers = spec.axes.all
    grads = tree_pmean(inputs.grads, workers)
    model_state = tree_pmean(inputs.model_state, workers)
    params, opt_state = _apply(spec.optimizer, state.params, grads, state.opt_state)
    # The workers agree after this step: the outer optimizer's next change starts here.
    return _Updated(params, model_state, opt_state, None if inputs.anchor is None else params, inputs.group_comm)


def _optimizer_step(spec: _Averaging, state: TrainState, inputs: _Gradients, warm) -> _Updated:
    """The update, local or (where ``warm``, a worker-invariant bool[]) an allreduce step's."""
    inside = spec.axes.inside
    group_bytes = _payload(_float_bytes(inputs.grads, inputs.model_state), inside) if inside else 0
    local = functools.partial(_local_update, spec, state, group_bytes)
    if warm is None:  # the schedule has no allreduce steps: no branch at all
        return local(inputs)
    return lax.cond(warm, functools.partial(_allreduce_update, spec, state), local, inputs)


def _observe_drift(spec: _Averaging, state: TrainState, updated: _Updated) -> tuple:
    """(schedule state, monitor, bound B or None): with a drift schedule, one
    all-reduce of a float32 pair gives B >= V, which ``drift.observe`` sees."""
    drift, monitor = spec.schedule.drift, state.monitor
    if drift is None:
        return state.sched_state, monitor, None
    workers = spec.axes.all
    bound = collectives.variance_bound(updated.params, updated.anchor, monitor.direction, monitor.direction_norm,
                                       workers)
    sched_state = drift.observe(state.sched_state, state.step, bound)
    monitor = monitor._replace(comm=monitor.comm.add(jnp.int32(1), _payload(8, workers)))
    return sched_state, monitor, bound


def _over(local, average, variance):
    """``average``, written over ``local``'s buffers once ``variance`` (read from
    both) is known: select(V >= 0, average, local), V >= 0 unless it is NaN.

    Its dependence on V orders the write after the last read of ``local``, so
    XLA writes the averaged parameters in place and the conditional's two
    branches return them in one buffer: without it the local branch copies
    every parameter each step (XLA cannot reuse a buffer that the averaging
    branch still reads after its all-reduce)."""
    return jax.tree.map(lambda a, x: jnp.where(variance >= 0, a, x), average, local)


def _outer_step(outer_optimizer, params_avg, anchor, outer_state) -> tuple:
    """(x_new, new anchor, outer state): x_new = x_s + outer.update(x_s - xbar); the new anchor is x_new."""
    delta = jax.tree.map(jnp.subtract, anchor, params_avg)  # the "outer gradient"
    updates, outer_state = outer_optimizer.update(delta, outer_state, anchor)
    params = optax.apply_updates(anchor, updates)
    return params, params, outer_state


def _average(spec: _Averaging, loss, step, replica: _Replica) -> tuple:
    """The sync branch: (averaged ``_Replica``, pre-sync V). xbar over the groups,
    V = (1/N) sum_i ||x_i - xbar||^2 and the mean loss over every worker, the
    outer step or the new anchor, the monitor's direction, the schedule's update."""
    across, workers, drift = spec.axes.across, spec.axes.all, spec.schedule.drift
    params_avg = tree_pmean(replica.params, across)
    sq = collectives.squared_distance(replica.params, params_avg)
    # Over every worker: the mean over groups, as a group's replicas are identical.
    variance, loss_avg = lax.pmean(jnp.stack([sq, loss.astype(jnp.float32)]), workers)
    params_avg = _over(replica.params, params_avg, variance)
    model_state = tree_pmean(replica.model_state, across)
    opt_state = tree_pmean(replica.opt_state, across) if spec.average_opt_state else replica.opt_state
    anchor, outer_state, monitor = replica.anchor, replica.outer_opt_state, replica.monitor
    if spec.outer_optimizer is not None:
        params_avg, anchor, outer_state = _outer_step(spec.outer_optimizer, params_avg, anchor, outer_state)
    elif drift is not None:
        anchor = params_avg
    if drift is not None and drift.direction:  # u: this sync's change of the anchor, the same on every worker
        direction, norm = collectives.unit_direction(anchor, replica.anchor)
        monitor = monitor._replace(direction=direction, direction_norm=norm)
    sched_state = spec.schedule.update(replica.sched_state, step, variance, loss_avg)
    return _Replica(params_avg, model_state, opt_state, sched_state, anchor, outer_state, monitor), variance


def _keep(replica: _Replica) -> tuple:
    """The branch without a sync: the replica as it is, V = 0."""
    return replica, jnp.zeros((), jnp.float32)


def _counted(spec: _Averaging, state: TrainState, replica: _Replica, sync, warm, allreduce_bytes: int) -> tuple:
    """(comm counter, synced, period) after the step: a sync counts one round of
    the averaged bytes (+ 8 for V and the loss); an allreduce step counts one
    round of gradient + model-state bytes and reports as ``allreduce`` does
    (synced, period 1)."""
    averaged = (replica.params, replica.model_state, *((replica.opt_state,) if spec.average_opt_state else ()))
    counter = state.comm.add(sync.astype(jnp.int32), _payload(_float_bytes(*averaged) + 8, spec.axes.across))
    return _warm_counted(counter, replica, sync, warm, allreduce_bytes)


def _warm_counted(counter: comm.CommCounter, replica: _Replica, sync, warm, allreduce_bytes: int) -> tuple:
    """(comm counter, synced, period) once an allreduce step's round is added to the syncs' ``counter``."""
    synced, period = jnp.asarray(sync, bool), jnp.asarray(replica.sched_state.period, jnp.int32)
    if warm is not None:
        counter = counter.add(warm.astype(jnp.int32), allreduce_bytes)
        synced, period = synced | warm, jnp.where(warm, 1, period).astype(jnp.int32)
    return counter, synced, period


def _local_sgd_step(spec: _Averaging, state: TrainState, batch) -> tuple[TrainState, StepMetrics]:
    """One ``local_sgd`` step: the update (local, or an allreduce step's), the
    drift bound, the schedule's decision, then the gated average."""
    schedule, workers = spec.schedule, spec.axes.all
    loss, model_state, aux, grads, _ = _local_grads(spec.grad_fn, state, batch, workers)
    allreduce_bytes = _payload(_float_bytes(grads, model_state), workers)  # one round of an allreduce step
    warm = None
    if schedule.allreduce_step is not None:
        warm = jnp.asarray(schedule.allreduce_step(state.sched_state, state.step), bool)
    updated = _optimizer_step(spec, state, _Gradients(grads, model_state, state.anchor, state.group_comm), warm)
    fragment_state = state.fragments
    if spec.streaming is not None:  # the fragment whose average is due lands first
        params, fragment_state = streaming.apply_due(spec.streaming, updated.params, fragment_state, state.step)
        updated = updated._replace(params=params)
    sched_state, monitor, bound = _observe_drift(spec, state, updated)
    sync = schedule.should_sync(sched_state, state.step)
    if warm is not None:
        sync = sync & ~warm  # an allreduce step does not average parameters as well
    replica = _Replica(updated.params, updated.model_state, updated.opt_state, sched_state, updated.anchor,
                       state.outer_opt_state, monitor)
    if spec.streaming is None:
        replica, variance = lax.cond(sync, functools.partial(_average, spec, loss, state.step), _keep, replica)
        counter, synced, period = _counted(spec, state, replica, sync, warm, allreduce_bytes)
    else:  # one fragment per sync (docs/algorithm.md, "Streaming averaging")
        rounds = streaming.RoundSpec(spec.streaming, schedule, spec.axes, spec.outer_optimizer, _outer_step)
        (replica, fragment_state, counter), variance = streaming.sync_round(
            rounds, loss, state.step, sync, streaming.Round(replica, fragment_state, state.comm))
        counter, synced, period = _warm_counted(counter, replica, sync, warm, allreduce_bytes)
    new_state = state._replace(step=state.step + 1, params=replica.params, model_state=replica.model_state, opt_state=replica.opt_state,
                               sched_state=replica.sched_state, comm=counter, group_comm=updated.group_comm,
                               anchor=replica.anchor, outer_opt_state=replica.outer_opt_state, monitor=replica.monitor,
                               fragments=fragment_state)
    return new_state, StepMetrics(loss.astype(jnp.float32), _aux(aux), synced, variance, period, counter,
                                  updated.group_comm, bound, None if replica.monitor is None else replica.monitor.comm)


def local_sgd(
    loss_fn: LossFn,
    optimizer: optax.GradientTransformation,
    schedule: Schedule,
    *,
    workers=None,
    axis_name: Optional[AxisName] = None,
    average_opt_state: bool = False,
    group_axis_name: Optional[AxisName] = None,
    outer_optimizer: Optional[optax.GradientTransformation] = None,
    fragments=None, fragment_delay: int = 0, fragment_alpha: float = 0.0,
) -> Strategy:
    """Periodic parameter averaging gated by ``schedule`` (CPSGD, ADPSGD, ...).

    Each step: g_i = grad loss_fn(x_i); x_i <- optimizer(x_i, g_i) locally; then
    if ``schedule.should_sync(sched_state, step)``: V = (1/N) sum_i
    ||x_i - xbar||^2 is measured, every x_i (and model state) becomes
    xbar = (1/N) sum_i x_i, and ``schedule.update(sched_state, step, V,
    mean loss)`` runs. The gate is a ``lax.cond`` on a worker-invariant
    scalar, so a local step runs no collective at all.

    An allreduce step (``schedule.allreduce_step(sched_state, step)``, a
    warm-up) instead takes g = (1/N) sum_i g_i and the mean model state
    before the optimizer update, exactly as ``allreduce`` does, and does not
    average parameters: a second ``lax.cond`` on a worker-invariant scalar
    in the same program. It counts one round of gradient + model-state bytes
    in ``comm`` (not in ``group_comm``) and sets the outer optimizer's anchor
    to the new parameters.

    A schedule with ``drift`` (``variance_trigger``) makes the state keep the
    anchor x_s (one parameter copy) and a ``Monitor`` (the direction u, a
    second copy). After every local update one ``lax.pmean`` of a float32
    pair gives the bound B >= V (``collectives.variance_bound``), which
    ``drift.observe`` sees before ``should_sync``; it is counted in
    ``monitor_comm``, one round of 8 bytes per step, apart from ``comm``. Each
    sync sets the anchor to the new parameters and u to their change.

    Args:
      loss_fn: ``(params, model_state, batch, rng) -> (loss, (model_state, aux))``.
      optimizer: any optax GradientTransformation, applied locally.
      schedule: when to average (``adpsgd_jax.schedules``).
      workers: the ``distributed.Layout`` the step runs on (flat or two-level,
        any number of workers per device): its axes, group axes and worker
        loop. The alternative to naming the axes (under ``jax.pmap``, say).
      axis_name: the axis (or tuple of axes) the workers live on (default
        "batch"); with ``group_axis_name``, the axis across groups, over
        which the schedule averages parameters.
      average_opt_state: also average the optimizer state's floating leaves
        at each sync (counted in the bytes).
      group_axis_name: two-level averaging: the axis (or axes) inside a
        group. Every step, before the local optimizer update, the gradients
        and the model state are averaged over it (counted in ``group_comm``),
        so the L replicas of a group stay identical; syncs average over
        ``axis_name`` across the G groups, with V measured across groups.
        Worker n = g * L + l draws its own batch and key. G = 1 is full-sync
        SGD, L = 1 is flat averaging.
      outer_optimizer: an optax GradientTransformation applied at each sync.
        With x_s the anchor (parameters after the previous sync) and xbar the
        workers' mean: Delta = x_s - xbar; (u, outer_state) =
        outer.update(Delta, outer_state, x_s); every worker and the anchor
        become x_s + u. ``optax.sgd(1.0)`` is plain averaging (up to float
        rounding); DiLoCo uses ``optax.sgd(0.7, momentum=0.9, nesterov=True)``.
        Computed identically on every worker: it adds no communication.
      fragments, fragment_delay, fragment_alpha: P fragments (or a pytree of indices), tau, alpha:
        streaming averaging, one fragment per sync (``adpsgd_jax.streaming``).

    All arguments are validated here, before anything is traced.
    """
    _check_loss(loss_fn)
    _check_optimizer("optimizer", optimizer)
    if not isinstance(schedule, Schedule):
        raise ValueError(f"schedule must be an adpsgd_jax.schedules.Schedule (e.g. schedules.constant(8)), "
                         f"got {type(schedule).__name__}")
    if outer_optimizer is not None:
        _check_optimizer("outer_optimizer", outer_optimizer)
    axes = _check_axes(axis_name, group_axis_name, workers)
    stream = streaming.check(fragments, fragment_delay, fragment_alpha, schedule, average_opt_state)
    spec = _Averaging(_grad_fn(loss_fn, axes.loop), optimizer, schedule, axes, average_opt_state, outer_optimizer, stream)
    init = functools.partial(initial_state, optimizer, schedule, outer_optimizer)
    return Strategy(streaming.with_fragments(stream, outer_optimizer, init), _named(_local_sgd_step, "local_sgd_step", spec))
