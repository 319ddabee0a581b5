"""The train state, the three training strategies and the eval step.

Each strategy is a constructor that takes the loss, the optimizer and (for
periodic averaging) the schedule once, and returns an optax-style pair
``Strategy(init, step)``:

    layout = distributed.workers(16)                    # 16 workers over the devices
    strategy = local_sgd(loss_fn, optax.sgd(0.1), schedules.constant(8), workers=layout)
    state = strategy.init(params, model_state, rng)     # one worker's state
    state = distributed.replicate(state, layout)        # [N, ...] per leaf
    p_train_step = distributed.shard_map_step(strategy.step, layout)
    state, metrics = p_train_step(state, batch)         # metrics: StepMetrics

``step(state, batch) -> (state, StepMetrics)`` is a pure per-worker function
whose collectives name the workers' axes: ``workers=layout`` (a
``distributed.Layout``, flat or two-level, any number of workers per device,
with its worker loop) gives them in one argument; ``axis_name`` (and
``group_axis_name``) name them explicitly, e.g. under ``jax.pmap``. The step
runs under ``jax.pmap``, under ``jax.shard_map`` and, with several workers
per device, under a named ``jax.vmap`` inside the device program
(``distributed.shard_map_step``). An axis may be a name or a tuple of names
(all of them together are the workers).

``loss_fn(params, model_state, batch, rng) -> (loss, (model_state, aux))``
where ``aux`` is a dict of scalar metrics (e.g. accuracy) computed on the
worker's own batch.

Strategies (docs/algorithm.md, "Strategies"):

* ``local_sgd``: local optimizer step, then, when the schedule says so,
  ``lax.cond``-gated averaging of parameters and model state (optionally the
  optimizer state) with the pre-sync variance measured on the way. Between
  syncs nothing is communicated, except a float32 pair every step for a
  schedule that watches the drift (``variance_trigger``). A schedule's warm-up steps
  (``full_sync_step``) are full-sync steps, a branch of the same program.
  Two options: two-level averaging (``group_axis_name``) and an outer
  optimizer on the averaged change (DiLoCo).
* ``allreduce``: full-sync SGD; gradients (and model state) are averaged
  every step before one optimizer update.
* ``qsgd``: like ``allreduce`` with each worker's gradient stochastically
  quantised to s levels and all-gathered packed (4-bit, int8 or int16).
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import optax
from jax import lax

from adpsgd_jax import collectives, comm, loops
from adpsgd_jax.collectives import tree_pmean
from adpsgd_jax.limits import MAX_QSGD_LEVELS
from adpsgd_jax.schedules import Schedule

LossFn = Callable[[Any, Any, Any, jax.Array], tuple]
AxisName = Union[str, Sequence[str]]


class Monitor(NamedTuple):
    """What a schedule with ``Schedule.drift`` adds to the train state
    (docs/algorithm.md, "variance_trigger")."""

    direction: Any  # u, parameter-shaped: the last sync's change of the anchor, normalised (zeros until then;
    # None when the schedule asks for no direction). The same on every worker.
    direction_norm: jnp.ndarray  # float32[]: ||u|| as stored (1 up to its dtype's rounding; 0 = no direction yet).
    comm: comm.CommCounter  # The scalar-pair all-reduce of every step (same on every worker).


class TrainState(NamedTuple):
    """Everything a worker carries between steps (a pytree).

    Replicated, every leaf has a leading worker axis [N, ...]; the workers'
    parameters, model and optimizer states differ between syncs. The fields
    marked "same on every worker" are computed from worker-invariant values
    only; the sync decision is read from them, so it is one scalar per device
    program however many workers a device carries.
    """

    step: jnp.ndarray  # int32[]: local steps taken (same on every worker).
    params: Any
    model_state: Any  # Non-trainable state, e.g. batch-norm statistics.
    opt_state: Any
    sched_state: Any  # The schedule's state (same on every worker; None for the full-sync strategies).
    rng: jax.Array  # Base key; per-step, per-worker keys are folded in.
    comm: comm.CommCounter  # Rounds and bytes of the strategy's collective (same on every worker).
    group_comm: comm.CommCounter  # Every-step mean inside the groups: two-level averaging only, else zero.
    anchor: Any = None  # x_s, the parameters after the last sync (outer optimizer or a drift schedule, else None).
    outer_opt_state: Any = None  # The outer optimizer's state, identical on every worker (or None).
    monitor: Optional[Monitor] = None  # A schedule's drift monitor (``Schedule.drift``), else None.

    def worker_axes(self) -> "TrainState":
        """A prefix pytree for ``jax.vmap``'s in_axes: 0 where workers differ,
        None where every worker holds the same value (the decision inputs)."""
        return TrainState(step=None, params=0, model_state=0, opt_state=0, sched_state=None, rng=0, comm=None,
                          group_comm=None, anchor=None if self.anchor is None else 0,
                          outer_opt_state=None if self.outer_opt_state is None else 0,
                          monitor=None if self.monitor is None else Monitor(
                              direction=None if self.monitor.direction is None else 0, direction_norm=0, comm=None))


class StepMetrics(NamedTuple):
    """What one step reports, per worker (a pytree of scalars).

    ``loss`` and ``aux`` are the worker's own mini-batch values; the other
    fields are the same on every worker. A full-sync step of ``local_sgd``
    (a schedule's warm-up, docs/algorithm.md "Warm-up: full-sync steps")
    reports what ``allreduce`` reports: synced True, variance 0, period 1.
    """

    loss: jnp.ndarray  # float32[]
    aux: dict  # {name: float32[]} from loss_fn
    synced: jnp.ndarray  # bool[]: the workers averaged parameters, or gradients on a full-sync step
    variance: jnp.ndarray  # float32[]: pre-sync V = (1/N) sum_i ||x_i - xbar||^2 at an average; 0 otherwise
    period: jnp.ndarray  # int32[]: the schedule's period in force (1 on full-sync steps and strategies)
    comm: comm.CommCounter  # cumulative rounds and bytes of the strategy's collective
    group_comm: comm.CommCounter  # cumulative in-group mean (two-level averaging; zero otherwise)
    variance_bound: Optional[jnp.ndarray] = None  # float32[]: the drift monitor's bound B >= V (else None)
    monitor_comm: Optional[comm.CommCounter] = None  # cumulative per-step scalar-pair all-reduce (else None)


class Strategy(NamedTuple):
    """An optax-style pair: ``init(params, model_state, rng) -> TrainState`` (one
    worker's state, to be replicated) and the per-worker
    ``step(state, batch) -> (TrainState, StepMetrics)``."""

    init: Callable[[Any, Any, jax.Array], TrainState]
    step: Callable[[TrainState, Any], tuple]


def _names(axis: Optional[AxisName]) -> tuple:
    if axis is None:
        return ()
    if isinstance(axis, str):
        return (axis,)
    if not isinstance(axis, (tuple, list)):
        raise ValueError(f"axis_name must be a name or a tuple of names, got {axis!r}")
    return tuple(axis)


def _axis_size(axes: tuple) -> int:
    size = 1
    for name in axes:
        size *= lax.axis_size(name)
    return size


def _payload(nbytes: int, axes: tuple) -> int:
    """Bytes one worker sends in a mean over ``axes``: none when they hold one worker."""
    return nbytes if _axis_size(axes) > 1 else 0


def _check_loss(loss_fn) -> None:
    if not callable(loss_fn):
        raise ValueError(f"loss_fn must be callable as (params, model_state, batch, rng) -> (loss, (model_state, aux)), "
                         f"got {type(loss_fn).__name__}")


def _check_optimizer(name: str, optimizer) -> None:
    if not (callable(getattr(optimizer, "init", None)) and callable(getattr(optimizer, "update", None))):
        raise ValueError(f"{name} must be an optax.GradientTransformation, got {type(optimizer).__name__}")


class WorkerAxes(NamedTuple):
    """Where a strategy's workers live, as its collectives name them.

    across: the axes a sync averages over (every worker, or across groups);
    inside: the axes inside a group (two-level averaging), else ();
    loop: how the workers of one device run their gradient (``loops``).
    """

    across: tuple
    inside: tuple = ()
    loop: Union[str, int] = "vmap"

    @property
    def all(self) -> tuple:
        """Every worker axis, worker index major to minor."""
        return self.across + self.inside


def _check_axes(axis_name=None, group_axis_name=None, workers=None) -> WorkerAxes:
    """The worker axes from ``workers`` (a ``distributed.Layout``) or from explicit axis names."""
    if workers is not None:
        if axis_name is not None or group_axis_name is not None:
            raise ValueError("give workers (a distributed.Layout) or axis_name / group_axis_name, not both")
        if not all(hasattr(workers, a) for a in ("axis_name", "group_axis_name", "loop")):
            raise ValueError(f"workers must be an adpsgd_jax.distributed.Layout (distributed.workers(...)), "
                             f"got {type(workers).__name__}")
        axis_name, group_axis_name, loop = workers.axis_name, workers.group_axis_name or None, workers.loop
    else:
        axis_name, loop = ("batch" if axis_name is None else axis_name), "vmap"
    axes, group = _names(axis_name), _names(group_axis_name)
    if not axes or not all(isinstance(a, str) for a in axes + group):
        raise ValueError(f"axis_name must be a name or a tuple of names, got {axis_name!r}")
    if set(axes) & set(group):
        raise ValueError(f"group_axis_name must not share a name with axis_name, got {group_axis_name!r} and "
                         f"{axis_name!r}")
    return WorkerAxes(axes, group, loop)


def _grad_fn(loss_fn, loop):
    """value_and_grad of ``loss_fn``, run over a device's workers as ``loop`` says."""
    return loops.looped(jax.value_and_grad(loss_fn, has_aux=True), loop)


def _monitor(params, drift) -> Optional[Monitor]:
    """A fresh drift monitor: no direction yet, nothing counted."""
    if drift is None:
        return None
    direction = jax.tree.map(jnp.zeros_like, params) if drift.direction else None
    return Monitor(direction, jnp.zeros((), jnp.float32), comm.CommCounter.zeros())


def _init(optimizer, schedule: Optional[Schedule], outer_optimizer=None):
    def init(params, model_state, rng) -> TrainState:
        outer = outer_optimizer is not None
        drift = None if schedule is None else schedule.drift
        return TrainState(
            step=jnp.zeros((), jnp.int32),
            params=params,
            model_state=model_state,
            opt_state=optimizer.init(params),
            sched_state=None if schedule is None else schedule.init(),
            rng=rng,
            comm=comm.CommCounter.zeros(),
            group_comm=comm.CommCounter.zeros(),
            # A copy: no buffer held twice.
            anchor=jax.tree.map(jnp.array, params) if outer or drift is not None else None,
            outer_opt_state=outer_optimizer.init(params) if outer else None,
            monitor=_monitor(params, drift),
        )

    return init


def _local_grads(grad_fn, state: TrainState, batch, workers: tuple):
    """The worker's loss, new model state, aux, gradients and a spare key.

    Worker n (its index over ``workers``, major to minor) folds n and the step
    into the base key, so every worker draws its own randomness.
    """
    worker = lax.axis_index(workers)
    rng = jax.random.fold_in(jax.random.fold_in(state.rng, worker), state.step)
    loss_rng, comm_rng = jax.random.split(rng)
    (loss, (model_state, aux)), grads = grad_fn(state.params, state.model_state, batch, loss_rng)
    return loss, model_state, aux, grads, comm_rng


def _apply(optimizer, params, grads, opt_state):
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state


def _over(local, average, variance):
    """``average``, written over ``local``'s buffers once ``variance`` (read from
    both) is known: select(V >= 0, average, local), V >= 0 unless it is NaN.

    Its dependence on V orders the write after the last read of ``local``, so
    XLA writes the averaged parameters in place and the conditional's two
    branches return them in one buffer: without it the local branch copies
    every parameter each step (XLA cannot reuse a buffer that the averaging
    branch still reads after its all-reduce)."""
    return jax.tree.map(lambda a, x: jnp.where(variance >= 0, a, x), average, local)


def _float_bytes(*trees) -> int:
    return sum(comm.tree_bytes(collectives.float_leaves(t)) for t in trees)


def _aux(aux: dict) -> dict:
    return {k: jnp.asarray(v, jnp.float32) for k, v in aux.items()}


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
) -> Strategy:
    """Periodic parameter averaging gated by ``schedule`` (CPSGD, ADPSGD, ...).

    Each step: g_i = grad loss_fn(x_i); x_i <- optimizer(x_i, g_i) locally; then
    if ``schedule.should_sync(sched_state, step)``: V = (1/N) sum_i
    ||x_i - xbar||^2 is measured, every x_i (and model state) becomes
    xbar = (1/N) sum_i x_i, and ``schedule.update(sched_state, step, V,
    mean loss)`` runs. The gate is a ``lax.cond`` on a worker-invariant
    scalar, so a local step runs no collective at all.

    A full-sync step (``schedule.full_sync_step(sched_state, step)``, a
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
    workers, across, inside = axes.all, axes.across, axes.inside
    grad_fn = _grad_fn(loss_fn, axes.loop)
    drift = schedule.drift

    def outer_step(params_avg, anchor, outer_state):
        """x_new = x_s + outer.update(x_s - xbar); the new anchor is x_new."""
        delta = jax.tree.map(jnp.subtract, anchor, params_avg)  # the "outer gradient"
        updates, outer_state = outer_optimizer.update(delta, outer_state, anchor)
        params = optax.apply_updates(anchor, updates)
        return params, params, outer_state

    def optimizer_step(state: TrainState, grads, model_state, warm):
        """(params, model_state, opt_state, anchor, group_comm) after the optimizer update: local
        (after the in-group mean of two-level averaging), or, where ``warm``, after every worker's mean."""
        group_bytes = _payload(_float_bytes(grads, model_state), inside) if inside else 0

        def local(grads, model_state, anchor, group_counter):
            if inside:  # inside a group: a full-sync step
                grads = tree_pmean(grads, inside)
                model_state = tree_pmean(model_state, inside)
                group_counter = group_counter.add(jnp.int32(1), group_bytes)
            params, opt_state = _apply(optimizer, state.params, grads, state.opt_state)
            return params, model_state, opt_state, anchor, group_counter

        def full_sync(grads, model_state, anchor, group_counter):
            grads = tree_pmean(grads, workers)
            model_state = tree_pmean(model_state, workers)
            params, opt_state = _apply(optimizer, state.params, grads, state.opt_state)
            # The workers agree after this step: the outer optimizer's next change starts here.
            return params, model_state, opt_state, None if anchor is None else params, group_counter

        operand = (grads, model_state, state.anchor, state.group_comm)
        if warm is None:  # the schedule has no full-sync steps: no branch at all
            return local(*operand)
        return lax.cond(warm, full_sync, local, *operand)

    def local_sgd_step(state: TrainState, batch) -> tuple[TrainState, StepMetrics]:
        loss, model_state, aux, grads, _ = _local_grads(grad_fn, state, batch, workers)
        full_bytes = _payload(_float_bytes(grads, model_state), workers)  # one round of a full-sync step
        warm = None
        if schedule.full_sync_step is not None:
            warm = jnp.asarray(schedule.full_sync_step(state.sched_state, state.step), bool)
        params, model_state, opt_state, anchor, group_counter = optimizer_step(state, grads, model_state, warm)
        sched_state, monitor, bound = state.sched_state, state.monitor, None
        if drift is not None:  # every step: one all-reduce of a float32 pair, then the schedule sees the bound
            bound = collectives.variance_bound(params, anchor, monitor.direction, monitor.direction_norm, workers)
            sched_state = drift.observe(sched_state, state.step, bound)
            monitor = monitor._replace(comm=monitor.comm.add(jnp.int32(1), _payload(8, workers)))
        sync = schedule.should_sync(sched_state, state.step)
        if warm is not None:
            sync = sync & ~warm  # a full-sync step does not average parameters as well
        round_bytes = _float_bytes(params, model_state, *((opt_state,) if average_opt_state else ())) + 8

        def average(operand):
            params, model_state, opt_state, sched_state, anchor, outer_state, monitor = operand
            params_avg = tree_pmean(params, across)
            sq = collectives.squared_distance(params, params_avg)
            # Over every worker: the mean over groups, as a group's replicas are identical.
            variance, loss_avg = lax.pmean(jnp.stack([sq, loss.astype(jnp.float32)]), workers)
            params_avg = _over(params, params_avg, variance)
            model_state = tree_pmean(model_state, across)
            if average_opt_state:
                opt_state = tree_pmean(opt_state, across)
            previous = anchor
            if outer_optimizer is not None:
                params_avg, anchor, outer_state = outer_step(params_avg, anchor, outer_state)
            elif drift is not None:
                anchor = params_avg
            if drift is not None and drift.direction:  # u: this sync's change of the anchor, the same on every worker
                direction, norm = collectives.unit_direction(anchor, previous)
                monitor = monitor._replace(direction=direction, direction_norm=norm)
            sched_state = schedule.update(sched_state, state.step, variance, loss_avg)
            return (params_avg, model_state, opt_state, sched_state, anchor, outer_state, monitor), variance

        def keep(operand):
            return operand, jnp.zeros((), jnp.float32)

        operand = (params, model_state, opt_state, sched_state, anchor, state.outer_opt_state, monitor)
        (params, model_state, opt_state, sched_state, anchor, outer_state, monitor), variance = lax.cond(
            sync, average, keep, operand)
        counter = state.comm.add(sync.astype(jnp.int32), _payload(round_bytes, across))
        synced, period = jnp.asarray(sync, bool), jnp.asarray(sched_state.period, jnp.int32)
        if warm is not None:  # a full-sync step reports as allreduce does: synced, V = 0, period 1
            counter = counter.add(warm.astype(jnp.int32), full_bytes)
            synced, period = synced | warm, jnp.where(warm, 1, period).astype(jnp.int32)
        new_state = state._replace(step=state.step + 1, params=params, model_state=model_state, opt_state=opt_state,
                                   sched_state=sched_state, comm=counter, group_comm=group_counter, anchor=anchor,
                                   outer_opt_state=outer_state, monitor=monitor)
        return new_state, StepMetrics(loss.astype(jnp.float32), _aux(aux), synced, variance, period, counter,
                                      group_counter, bound, None if monitor is None else monitor.comm)

    return Strategy(_init(optimizer, schedule, outer_optimizer), local_sgd_step)


def _full_sync(name: str, loss_fn: LossFn, optimizer, axes: WorkerAxes, mean_grads: Callable) -> Strategy:
    """A strategy that communicates every step over all of ``axes``: ``mean_grads(grads, key) ->
    (mean gradient tree, bytes one worker sends)`` then one optimizer update."""
    _check_loss(loss_fn)
    _check_optimizer("optimizer", optimizer)
    workers = axes.all
    grad_fn = _grad_fn(loss_fn, axes.loop)

    def step(state: TrainState, batch) -> tuple[TrainState, StepMetrics]:
        loss, model_state, aux, grads, comm_rng = _local_grads(grad_fn, state, batch, workers)
        model_state = tree_pmean(model_state, workers)
        grads, grad_bytes = mean_grads(grads, comm_rng)
        params, opt_state = _apply(optimizer, state.params, grads, state.opt_state)
        counter = state.comm.add(jnp.int32(1), _payload(grad_bytes + _float_bytes(model_state), workers))
        new_state = state._replace(step=state.step + 1, params=params, model_state=model_state, opt_state=opt_state,
                                   comm=counter)
        return new_state, StepMetrics(loss.astype(jnp.float32), _aux(aux), jnp.asarray(True), jnp.zeros((), jnp.float32),
                                      jnp.ones((), jnp.int32), counter, state.group_comm)

    step.__name__ = step.__qualname__ = name  # jax's compile events name the program after the step
    return Strategy(_init(optimizer, None), step)


def allreduce(loss_fn: LossFn, optimizer: optax.GradientTransformation, *, workers=None,
              axis_name: Optional[AxisName] = None) -> Strategy:
    """Full-sync SGD: g = (1/N) sum_i g_i (one all-reduce of the gradient and
    model-state bytes every step), then one optimizer update on every worker.

    ``workers`` (a ``distributed.Layout``) or ``axis_name`` (default "batch")
    as for ``local_sgd``; the mean spans every worker axis, group axes included."""
    axes = _check_axes(axis_name, None, workers)

    def mean_grads(grads, key):
        del key
        return tree_pmean(grads, axes.all), _float_bytes(grads)

    return _full_sync("allreduce_step", loss_fn, optimizer, axes, mean_grads)


def qsgd(loss_fn: LossFn, optimizer: optax.GradientTransformation, *, levels: int = 127,
         bucket_size: Optional[int] = None, workers=None, axis_name: Optional[AxisName] = None) -> Strategy:
    """QSGD: g = (1/N) sum_i Q_s(g_i), each worker's gradient quantised to
    s = ``levels`` levels per bucket of ``bucket_size`` coordinates (None: one
    bucket per leaf) and all-gathered in its wire form, two 4-bit levels per
    byte for s <= 7, int8 for s <= 127, int16 above (``collectives.qsgd_mean``);
    counted as exactly the bytes gathered (``comm.qsgd_bytes``)."""
    if isinstance(levels, bool) or int(levels) != levels or not 1 <= levels <= MAX_QSGD_LEVELS:
        raise ValueError(f"qsgd levels must be an integer in [1, {MAX_QSGD_LEVELS}], got {levels!r}")
    if bucket_size is not None and (isinstance(bucket_size, bool) or int(bucket_size) != bucket_size
                                    or bucket_size < 1):
        raise ValueError(f"qsgd bucket_size must be None or an integer >= 1, got {bucket_size!r}")

    axes = _check_axes(axis_name, None, workers)

    def mean_grads(grads, key):
        mean = collectives.qsgd_mean(grads, key, levels, axes.all, bucket_size)
        return mean, comm.qsgd_bytes(collectives.float_leaves(grads), levels, bucket_size)

    return _full_sync("qsgd_step", loss_fn, optimizer, axes, mean_grads)


def make_eval_step(eval_fn: Callable[[Any, Any, Any], dict], axis_name: Optional[AxisName] = None,
                   per_example: Sequence[str] = (), *, workers=None):
    """Build ``(state, batch) -> sums`` evaluating the averaged model.

    ``workers``: the ``distributed.Layout`` (its axes and worker loop), or
    ``axis_name``: every axis the workers live on (default "batch";
    ("group", "local") for the mesh of two-level averaging).

    The replicas' parameters and model state are averaged once per call
    (xbar = (1/N) sum_i x_i), then ``eval_fn(params, model_state, chunk) ->
    {name: float[B]}`` (per-example values) is scanned over the chunks of the
    worker's batch. Batch leaves are [K, B, ...] per worker (K chunks of B);
    an optional boolean ``batch["mask"]`` [K, B] marks padding.

    Returns {name: float32[] global sum over unmasked examples, "count":
    float32[] number of them}, identical on every worker. With
    ``per_example`` names, also "per_example": {name: float32[K, B]} the
    worker's own unsummed values of those names, 0 on padding.
    """
    worker_axes, keep = _check_axes(axis_name, None, workers), tuple(per_example)
    axes, evaluate = worker_axes.all, loops.looped(eval_fn, worker_axes.loop)

    def eval_step(state: TrainState, batch: dict):
        params = tree_pmean(state.params, axes)
        model_state = tree_pmean(state.model_state, axes)

        def chunk_sums(chunk):
            values = evaluate(params, model_state, chunk)
            batch_size = next(iter(values.values())).shape[0]
            mask = chunk.get("mask", jnp.ones((batch_size,), bool)).astype(jnp.float32)
            sums = {k: jnp.sum(v.astype(jnp.float32) * mask) for k, v in values.items()}
            return {**sums, "count": jnp.sum(mask)}, {k: values[k].astype(jnp.float32) * mask for k in keep}

        def body(totals, chunk):
            sums, kept = chunk_sums(chunk)
            return jax.tree.map(jnp.add, totals, sums), kept

        shapes = jax.eval_shape(chunk_sums, jax.tree.map(lambda x: x[0], batch))[0]
        zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
        totals, kept = lax.scan(body, zeros, batch)
        totals = lax.psum(totals, axes)
        return {**totals, "per_example": kept} if keep else totals

    return eval_step
