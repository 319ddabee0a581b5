"""The eval step: the workers' averaged model evaluated on every example of a sharded batch."""

from __future__ import annotations

import functools
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
from jax import lax

from adpsgd_jax import loops
from adpsgd_jax.collectives import tree_pmean
from adpsgd_jax.state import TrainState
from adpsgd_jax.step import AxisName, _check_axes, _named


def _chunk_sums(evaluate: Callable, keep: tuple, params, model_state, chunk) -> tuple:
    """({name: sum over the chunk's unmasked examples, "count": their number}, {name: masked values} of ``keep``)."""
    values = evaluate(params, model_state, chunk)
    batch_size = next(iter(values.values())).shape[0]
    mask = chunk.get("mask", jnp.ones((batch_size,), bool)).astype(jnp.float32)
    sums = {k: jnp.sum(v.astype(jnp.float32) * mask) for k, v in values.items()}
    return {**sums, "count": jnp.sum(mask)}, {k: values[k].astype(jnp.float32) * mask for k in keep}


def _accumulate(chunk_sums: Callable, totals, chunk) -> tuple:
    """The scan's body: the running sums plus one chunk's, and the chunk's kept values."""
    sums, kept = chunk_sums(chunk)
    return jax.tree.map(jnp.add, totals, sums), kept


def _eval_step(evaluate: Callable, axes: tuple, keep: tuple, state: TrainState, batch: dict):
    """xbar and the mean model state once, then ``_chunk_sums`` scanned over the K chunks and summed over the workers."""
    params = tree_pmean(state.params, axes)
    model_state = tree_pmean(state.model_state, axes)
    chunk_sums = functools.partial(_chunk_sums, evaluate, keep, params, model_state)
    shapes = jax.eval_shape(chunk_sums, jax.tree.map(lambda x: x[0], batch))[0]
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
    totals, kept = lax.scan(functools.partial(_accumulate, chunk_sums), zeros, batch)
    totals = lax.psum(totals, axes)
    return {**totals, "per_example": kept} if keep else totals


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
    evaluate = loops.looped(eval_fn, worker_axes.loop)
    return _named(_eval_step, "eval_step", evaluate, worker_axes.all, keep)
