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

Metrics are per replica (the host averages them over devices): ``loss``,
the ``aux`` entries, ``synced`` (0/1), ``variance`` (pre-sync V at syncs, NaN
otherwise; 0 for the full-sync strategies, whose replicas never differ),
``period`` and ``comm`` (the cumulative ``CommCounter``).
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
    comm: comm.CommCounter  # Cumulative rounds and bytes.

    @classmethod
    def create(cls, params, model_state, optimizer: optax.GradientTransformation,
               schedule: Optional[Schedule], rng: jax.Array) -> "TrainState":
        """A single (unreplicated) state; replicate it with ``distributed.replicate``."""
        return cls(
            step=jnp.zeros((), jnp.int32),
            params=params,
            model_state=model_state,
            opt_state=optimizer.init(params),
            sched_state=None if schedule is None else schedule.init(),
            rng=rng,
            comm=comm.CommCounter.zeros(),
        )


def _validate(strategy: str, schedule: Optional[Schedule], qsgd_levels: int, qsgd_bucket_size: Optional[int]):
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
) -> Callable[[TrainState, Any], tuple]:
    """Build the per-device train step ``(state, batch) -> (state, metrics)``.

    Args:
      loss_fn: ``(params, model_state, batch, rng) -> (loss, (model_state, aux))``.
      optimizer: any optax GradientTransformation, applied locally.
      schedule: averaging schedule (strategy ``average`` only).
      axis_name: the pmap / mesh axis the workers live on.
      strategy: ``average``, ``allreduce`` or ``qsgd``.
      average_opt_state: also average the optimizer state's floating leaves
        at each sync (``average`` only; counted in the bytes).
      qsgd_levels: s, the number of quantisation levels (``qsgd``).
      qsgd_bucket_size: coordinates per QSGD norm; None = one per leaf.

    All arguments are validated here, before anything is traced.
    """
    _validate(strategy, schedule, qsgd_levels, qsgd_bucket_size)
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def local_grads(state, batch):
        worker = lax.axis_index(axis_name)
        rng = jax.random.fold_in(jax.random.fold_in(state.rng, worker), state.step)
        loss_rng, comm_rng = jax.random.split(rng)
        (loss, (model_state, aux)), grads = grad_fn(state.params, state.model_state, batch, loss_rng)
        return loss, model_state, aux, grads, comm_rng

    def apply(state, grads, opt_state):
        updates, opt_state = optimizer.update(grads, opt_state, state.params)
        return optax.apply_updates(state.params, updates), opt_state

    def metrics(loss, aux, synced, variance, period, counter):
        return {
            "loss": loss.astype(jnp.float32),
            **{k: jnp.asarray(v, jnp.float32) for k, v in aux.items()},
            "synced": jnp.asarray(synced, jnp.int32),
            "variance": jnp.asarray(variance, jnp.float32),
            "period": jnp.asarray(period, jnp.int32),
            "comm": counter,
        }

    def average_step(state, batch):
        loss, model_state, aux, grads, _ = local_grads(state, batch)
        params, opt_state = apply(state, grads, state.opt_state)
        sync = schedule.should_sync(state.sched_state, state.step)
        synced_trees = (params, model_state) + ((opt_state,) if average_opt_state else ())
        round_bytes = sum(comm.tree_bytes(collectives.float_leaves(t)) for t in synced_trees) + 8

        def average(operand):
            params, model_state, opt_state, sched_state = operand
            params_avg = tree_pmean(params, axis_name)
            sq = collectives.squared_distance(params, params_avg)
            variance, loss_avg = lax.pmean(jnp.stack([sq, loss.astype(jnp.float32)]), axis_name)
            model_state = tree_pmean(model_state, axis_name)
            if average_opt_state:
                opt_state = tree_pmean(opt_state, axis_name)
            sched_state = schedule.update(sched_state, state.step, variance, loss_avg)
            out = (params_avg, model_state, opt_state, sched_state)
            return collectives.to_varying(out, axis_name), collectives.to_varying(variance, axis_name)

        def keep(operand):
            return operand, collectives.to_varying(jnp.full((), jnp.nan, jnp.float32), axis_name)

        operand = (params, model_state, opt_state, state.sched_state)
        (params, model_state, opt_state, sched_state), variance = lax.cond(sync, average, keep, operand)
        counter = state.comm.add(sync.astype(jnp.int32), round_bytes)
        new_state = TrainState(state.step + 1, params, model_state, opt_state, sched_state, state.rng, counter)
        return new_state, metrics(loss, aux, sync, variance, sched_state.period, counter)

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
        counter = state.comm.add(jnp.int32(1), round_bytes + state_bytes)
        new_state = TrainState(state.step + 1, params, model_state, opt_state, state.sched_state, state.rng, counter)
        return new_state, metrics(loss, aux, 1, 0.0, 1, counter)

    return average_step if strategy == "average" else every_step


def make_eval_step(eval_fn: Callable[[Any, Any, Any], dict], axis_name: str = "batch"):
    """Build ``(state, batch) -> sums`` evaluating the averaged model.

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
