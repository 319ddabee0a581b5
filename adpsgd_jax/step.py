"""The train state and the pure train / eval steps.

The step is built once and is a pure function of (state, batch) that runs
per device under ``jax.pmap`` or ``jax.shard_map`` over ``axis_name``:

    train_step = make_train_step(loss_fn, optimizer, constant(8))
    p_train_step = jax.pmap(train_step, axis_name="batch", donate_argnums=(0,))
    state, metrics = p_train_step(state, batch)

``loss_fn(params, model_state, batch, rng) -> (loss, (model_state, aux))``
where ``aux`` is a dict of scalar metrics (e.g. accuracy) computed on the
worker's own batch.

Strategies (ALGORITHM.md, "Baselines"):

* ``average``: local optimizer step, then, when the schedule says so,
  ``lax.cond``-gated averaging of parameters and model state (optionally the
  optimizer state) with the pre-sync variance measured on the way. Between
  syncs nothing is communicated, not even metrics.
* ``allreduce``: full-sync SGD; gradients (and model state) are averaged
  every step before one optimizer update.
* ``qsgd``: like ``allreduce`` with each worker's gradient stochastically
  quantised to s levels and all-gathered as int8/int16.

Two options of ``average`` (both off by default):

* two-level averaging (``group_axis_name``): the workers form groups along a
  second mesh axis (e.g. the devices of one host, on fast links). Inside a
  group the gradients and model state are averaged every step, so a group's
  replicas stay identical; across groups the schedule averages parameters
  over ``axis_name`` (the slow links) as above, with the variance measured
  across groups. Mesh ("group", "local") under ``shard_map``:

      train_step = make_train_step(loss_fn, opt, adpsgd(...), axis_name="group",
                                   group_axis_name="local")

* an outer optimizer (``outer_optimizer``, DiLoCo): at a sync the averaged
  change since the previous sync, Delta = x_s - xbar, is treated as a
  gradient for any optax transformation, and every worker continues from
  x_s + outer_update(Delta). ``optax.sgd(1.0)`` gives plain averaging.

Metrics are per replica (the host averages them over devices): ``loss``,
the ``aux`` entries, ``synced`` (0/1), ``variance`` (pre-sync V at syncs, NaN
otherwise; 0 for the full-sync strategies, whose replicas never differ),
``period``, ``comm`` (the cumulative ``CommCounter`` of the averaging, or of
the every-step mean of the full-sync strategies) and, with two-level
averaging, ``group_comm`` (the every-step mean inside the groups).
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax
from jax import lax

from adpsgd_jax import collectives, comm
from adpsgd_jax.collectives import tree_pmean
from adpsgd_jax.schedules import Schedule

STRATEGIES = ("average", "allreduce", "qsgd")
LossFn = Callable[[Any, Any, Any, jax.Array], tuple]


class TrainState(NamedTuple):
    """Everything a worker carries between steps (a pytree).

    Under ``pmap`` every leaf has a leading device axis; replicas may differ
    between syncs.
    """

    step: jnp.ndarray  # int32[]: local steps taken.
    params: Any
    model_state: Any  # Non-trainable state, e.g. batch-norm statistics.
    opt_state: Any
    sched_state: Any  # The schedule's state (None for allreduce / qsgd).
    rng: jax.Array  # Base key; per-step, per-device keys are folded in.
    comm: comm.CommCounter  # Cumulative rounds and bytes (across groups in two-level averaging).
    group_comm: Optional[comm.CommCounter] = None  # Every-step mean inside the groups (zero unless two-level).
    anchor: Any = None  # x_s, the parameters after the last sync (outer optimizer only, else None).
    outer_opt_state: Any = None  # The outer optimizer's state, identical on every worker (or None).

    @classmethod
    def create(cls, params, model_state, optimizer: optax.GradientTransformation,
               schedule: Optional[Schedule], rng: jax.Array,
               outer_optimizer: Optional[optax.GradientTransformation] = None) -> "TrainState":
        """A single (unreplicated) state; replicate it with ``distributed.replicate``.

        With ``outer_optimizer`` the state also holds the anchor x_s (a copy
        of ``params``) and ``outer_optimizer.init(params)``; without it both
        are None, so plain averaging carries no extra parameter copy.
        """
        outer = outer_optimizer is not None
        return cls(
            step=jnp.zeros((), jnp.int32),
            params=params,
            model_state=model_state,
            opt_state=optimizer.init(params),
            sched_state=None if schedule is None else schedule.init(),
            rng=rng,
            comm=comm.CommCounter.zeros(),
            group_comm=comm.CommCounter.zeros(),
            anchor=jax.tree.map(jnp.array, params) if outer else None,  # a copy: no buffer held twice
            outer_opt_state=outer_optimizer.init(params) if outer else None,
        )


def _validate(strategy: str, schedule: Optional[Schedule], qsgd_levels: int, qsgd_bucket_size: Optional[int],
              axis_name, group_axis_name: Optional[str], outer_optimizer):
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; accepted values: {', '.join(STRATEGIES)}")
    if strategy == "average" and schedule is None:
        raise ValueError("strategy 'average' needs a schedule (e.g. adpsgd_jax.schedules.constant(8))")
    if strategy != "average" and schedule is not None:
        raise ValueError(f"strategy {strategy!r} communicates every step and takes no schedule (pass schedule=None)")
    if isinstance(qsgd_levels, bool) or int(qsgd_levels) != qsgd_levels or not 1 <= qsgd_levels <= collectives.MAX_QSGD_LEVELS:
        raise ValueError(f"qsgd_levels must be an integer in [1, {collectives.MAX_QSGD_LEVELS}], got {qsgd_levels!r}")
    if qsgd_bucket_size is not None and (int(qsgd_bucket_size) != qsgd_bucket_size or qsgd_bucket_size < 1):
        raise ValueError(f"qsgd_bucket_size must be None or an integer >= 1, got {qsgd_bucket_size!r}")
    if group_axis_name is not None and strategy != "average":
        raise ValueError(f"group_axis_name (two-level averaging) applies to strategy 'average', not {strategy!r}")
    if group_axis_name is not None and group_axis_name == axis_name:
        raise ValueError(f"group_axis_name must differ from axis_name, both are {axis_name!r}")
    if outer_optimizer is not None and strategy != "average":
        raise ValueError(f"outer_optimizer applies to strategy 'average', not {strategy!r}")
    if outer_optimizer is not None and not (callable(getattr(outer_optimizer, "init", None))
                                            and callable(getattr(outer_optimizer, "update", None))):
        raise ValueError("outer_optimizer must be an optax.GradientTransformation, got "
                         f"{type(outer_optimizer).__name__}")


def _payload(nbytes: int, axis_name: str) -> int:
    """Bytes one worker sends in a mean over ``axis_name``: none when the axis has one member."""
    return nbytes if lax.axis_size(axis_name) > 1 else 0


def make_train_step(
    loss_fn: LossFn,
    optimizer: optax.GradientTransformation,
    schedule: Optional[Schedule] = None,
    *,
    axis_name: str = "batch",
    strategy: str = "average",
    average_opt_state: bool = False,
    qsgd_levels: int = 127,
    qsgd_bucket_size: Optional[int] = None,
    group_axis_name: Optional[str] = None,
    outer_optimizer: Optional[optax.GradientTransformation] = None,
) -> Callable[[TrainState, Any], tuple]:
    """Build the per-device train step ``(state, batch) -> (state, metrics)``.

    Args:
      loss_fn: ``(params, model_state, batch, rng) -> (loss, (model_state, aux))``.
      optimizer: any optax GradientTransformation, applied locally.
      schedule: averaging schedule (strategy ``average`` only).
      axis_name: the pmap / mesh axis the workers live on; with
        ``group_axis_name``, the axis across groups, over which the schedule
        averages parameters.
      strategy: ``average``, ``allreduce`` or ``qsgd``.
      average_opt_state: also average the optimizer state's floating leaves
        at each sync (``average`` only; counted in the bytes).
      qsgd_levels: s, the number of quantisation levels (``qsgd``).
      qsgd_bucket_size: coordinates per QSGD norm; None = one per leaf.
      group_axis_name: two-level averaging (``average`` only): the mesh axis
        inside a group. Every step, before the local optimizer update, the
        gradients and the model state are averaged over it (counted in
        ``group_comm``), so the L replicas of a group stay identical; syncs
        average over ``axis_name`` across the G groups. Worker n = g * L + l
        (group g, position l) draws its own batch and key. G = 1 is full-sync
        SGD, L = 1 is flat averaging.
      outer_optimizer: an optax GradientTransformation applied at each sync
        (``average`` only; the state must be made with
        ``TrainState.create(..., outer_optimizer=...)``). With x_s the anchor
        (parameters after the previous sync) and xbar the workers' mean:
        Delta = x_s - xbar; (u, outer_state) = outer.update(Delta, outer_state,
        x_s); every worker and the anchor become x_s + u. ``optax.sgd(1.0)``
        is plain averaging (up to float rounding); DiLoCo uses
        ``optax.sgd(0.7, momentum=0.9, nesterov=True)``. The variance that
        feeds the schedule is still the pre-sync V around xbar. Computed
        identically on every worker: it adds no communication.

    All arguments are validated here, before anything is traced.
    """
    _validate(strategy, schedule, qsgd_levels, qsgd_bucket_size, axis_name, group_axis_name, outer_optimizer)
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    # Every mesh axis of the step: a pmean over all of them reaches every worker.
    axes = (axis_name,) if group_axis_name is None else (axis_name, group_axis_name)

    def local_grads(state, batch):
        worker = lax.axis_index(axis_name if group_axis_name is None else axes)  # g * L + l
        rng = jax.random.fold_in(jax.random.fold_in(state.rng, worker), state.step)
        loss_rng, comm_rng = jax.random.split(rng)
        (loss, (model_state, aux)), grads = grad_fn(state.params, state.model_state, batch, loss_rng)
        return loss, model_state, aux, grads, comm_rng

    def apply(state, grads, opt_state):
        updates, opt_state = optimizer.update(grads, opt_state, state.params)
        return optax.apply_updates(state.params, updates), opt_state

    def metrics(loss, aux, synced, variance, period, counter, group_counter=None):
        return {
            "loss": loss.astype(jnp.float32),
            **{k: jnp.asarray(v, jnp.float32) for k, v in aux.items()},
            "synced": jnp.asarray(synced, jnp.int32),
            "variance": jnp.asarray(variance, jnp.float32),
            "period": jnp.asarray(period, jnp.int32),
            "comm": counter,
            **({"group_comm": group_counter} if group_counter is not None else {}),
        }

    def outer_step(params_avg, anchor, outer_state):
        """x_new = x_s + outer.update(x_s - xbar); the new anchor is x_new."""
        delta = jax.tree.map(jnp.subtract, anchor, params_avg)  # the "outer gradient"
        updates, outer_state = outer_optimizer.update(delta, outer_state, anchor)
        params = optax.apply_updates(anchor, updates)
        return params, params, outer_state

    def average_step(state, batch):
        if outer_optimizer is not None and state.anchor is None:
            raise ValueError("outer_optimizer needs a state made with TrainState.create(..., outer_optimizer=...)")
        loss, model_state, aux, grads, _ = local_grads(state, batch)
        group_counter = state.group_comm
        if group_axis_name is not None:  # inside a group: a full-sync step
            grads = tree_pmean(grads, group_axis_name)
            model_state = tree_pmean(model_state, group_axis_name)
            group_bytes = sum(comm.tree_bytes(collectives.float_leaves(t)) for t in (grads, model_state))
            group_counter = group_counter.add(jnp.int32(1), _payload(group_bytes, group_axis_name))
        params, opt_state = apply(state, grads, state.opt_state)
        sync = schedule.should_sync(state.sched_state, state.step)
        synced_trees = (params, model_state) + ((opt_state,) if average_opt_state else ())
        round_bytes = sum(comm.tree_bytes(collectives.float_leaves(t)) for t in synced_trees) + 8

        def average(operand):
            params, model_state, opt_state, sched_state, anchor, outer_state = operand
            params_avg = tree_pmean(params, axis_name)
            sq = collectives.squared_distance(params, params_avg)
            # Over every worker: the mean over groups, as a group's replicas are identical.
            variance, loss_avg = lax.pmean(jnp.stack([sq, loss.astype(jnp.float32)]), axes)
            model_state = tree_pmean(model_state, axis_name)
            if average_opt_state:
                opt_state = tree_pmean(opt_state, axis_name)
            if outer_optimizer is not None:
                params_avg, anchor, outer_state = outer_step(params_avg, anchor, outer_state)
            sched_state = schedule.update(sched_state, state.step, variance, loss_avg)
            out = (params_avg, model_state, opt_state, sched_state, anchor, outer_state)
            return collectives.to_varying(out, axes), collectives.to_varying(variance, axes)

        def keep(operand):  # (the in-group means are invariant across "local"; the cond's types must match)
            nan = jnp.full((), jnp.nan, jnp.float32)
            return collectives.to_varying(operand, axes), collectives.to_varying(nan, axes)

        operand = (params, model_state, opt_state, state.sched_state, state.anchor, state.outer_opt_state)
        (params, model_state, opt_state, sched_state, anchor, outer_state), variance = lax.cond(
            sync, average, keep, operand)
        counter = state.comm.add(sync.astype(jnp.int32), _payload(round_bytes, axis_name))
        new_state = state._replace(step=state.step + 1, params=params, model_state=model_state, opt_state=opt_state,
                                   sched_state=sched_state, comm=counter, group_comm=group_counter, anchor=anchor,
                                   outer_opt_state=outer_state)
        return new_state, metrics(loss, aux, sync, variance, sched_state.period, counter,
                                  group_counter if group_axis_name is not None else None)

    def every_step(state, batch):
        loss, model_state, aux, grads, comm_rng = local_grads(state, batch)
        model_state = tree_pmean(model_state, axis_name)
        state_bytes = comm.tree_bytes(collectives.float_leaves(model_state))
        if strategy == "qsgd":
            grads = collectives.qsgd_mean(grads, comm_rng, qsgd_levels, axis_name, qsgd_bucket_size)
            round_bytes = comm.qsgd_bytes(collectives.float_leaves(grads), qsgd_levels, qsgd_bucket_size)
        else:
            grads = tree_pmean(grads, axis_name)
            round_bytes = comm.tree_bytes(collectives.float_leaves(grads))
        params, opt_state = apply(state, grads, state.opt_state)
        counter = state.comm.add(jnp.int32(1), _payload(round_bytes + state_bytes, axis_name))
        new_state = state._replace(step=state.step + 1, params=params, model_state=model_state, opt_state=opt_state,
                                   comm=counter)
        return new_state, metrics(loss, aux, 1, 0.0, 1, counter)

    return average_step if strategy == "average" else every_step


def make_eval_step(eval_fn: Callable[[Any, Any, Any], dict], axis_name="batch"):
    """Build ``(state, batch) -> sums`` evaluating the averaged model.

    ``axis_name``: the workers' axis, or a tuple of axes (("group", "local")
    for the mesh of two-level averaging).

    The replicas' parameters and model state are averaged once per call
    (xbar = (1/N) sum_i x_i), then ``eval_fn(params, model_state, chunk) ->
    {name: float[B]}`` (per-example values) is scanned over the chunks of the
    worker's batch. Batch leaves are [K, B, ...] per device (K chunks of B);
    an optional boolean ``batch["mask"]`` [K, B] marks padding.

    Returns {name: float32[] global sum over unmasked examples, "count":
    float32[] number of them}, identical on every replica.
    """

    def eval_step(state: TrainState, batch: dict):
        params = tree_pmean(state.params, axis_name)
        model_state = tree_pmean(state.model_state, axis_name)

        def chunk_sums(chunk):
            values = eval_fn(params, model_state, chunk)
            batch_size = next(iter(values.values())).shape[0]
            mask = chunk.get("mask", jnp.ones((batch_size,), bool)).astype(jnp.float32)
            sums = {k: jnp.sum(v.astype(jnp.float32) * mask) for k, v in values.items()}
            return {**sums, "count": jnp.sum(mask)}

        def body(totals, chunk):
            return jax.tree.map(jnp.add, totals, chunk_sums(chunk)), None

        shapes = jax.eval_shape(chunk_sums, jax.tree.map(lambda x: x[0], batch))
        zeros = collectives.to_varying(jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes), axis_name)
        totals, _ = lax.scan(body, zeros, batch)
        return lax.psum(totals, axis_name)

    return eval_step
