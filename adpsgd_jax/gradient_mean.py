"""The strategies that communicate every step: a mean gradient, then one
optimizer update on every worker (docs/algorithm.md, "Strategies").

* ``allreduce``: full-sync SGD; gradients (and model state) are averaged
  every step before one optimizer update.
* ``qsgd``: like ``allreduce`` with each worker's gradient stochastically
  quantised to s levels and all-gathered packed (4-bit, int8 or int16).

Both are ``_gradient_mean_step`` over a ``_GradientMean``: the fixed parts
and the function that turns the workers' gradients into their mean.
"""

from __future__ import annotations

import functools
from typing import Callable, NamedTuple, Optional

import jax.numpy as jnp
import optax

from adpsgd_jax import collectives, comm
from adpsgd_jax.collectives import tree_pmean
from adpsgd_jax.limits import MAX_QSGD_LEVELS
from adpsgd_jax.state import StepMetrics, Strategy, TrainState, initial_state
from adpsgd_jax.step import (AxisName, LossFn, WorkerAxes, _apply, _aux, _check_axes, _check_loss, _check_optimizer,
                             _float_bytes, _grad_fn, _local_grads, _named, _payload)


class _GradientMean(NamedTuple):
    """What a gradient-mean step is built from, fixed when it is constructed."""

    grad_fn: Callable  # value_and_grad of the loss, looped over a device's workers
    optimizer: optax.GradientTransformation
    workers: tuple  # every worker axis: the mean spans them all
    mean_grads: Callable  # (grads, key) -> (mean gradient tree, bytes one worker sends)


def _gradient_mean_step(spec: _GradientMean, state: TrainState, batch) -> tuple[TrainState, StepMetrics]:
    """g = ``mean_grads`` of the workers' gradients, the mean model state, then one optimizer update."""
    workers = spec.workers
    loss, model_state, aux, grads, comm_rng = _local_grads(spec.grad_fn, state, batch, workers)
    model_state = tree_pmean(model_state, workers)
    grads, grad_bytes = spec.mean_grads(grads, comm_rng)
    params, opt_state = _apply(spec.optimizer, state.params, grads, state.opt_state)
    counter = state.comm.add(jnp.int32(1), _payload(grad_bytes + _float_bytes(model_state), workers))
    new_state = state._replace(step=state.step + 1, params=params, model_state=model_state, opt_state=opt_state,
                               comm=counter)
    return new_state, StepMetrics(loss.astype(jnp.float32), _aux(aux), jnp.asarray(True), jnp.zeros((), jnp.float32),
                                  jnp.ones((), jnp.int32), counter, state.group_comm)


def _gradient_mean_strategy(name: str, loss_fn: LossFn, optimizer, axes: WorkerAxes,
                            mean_grads: Callable) -> Strategy:
    """A strategy that communicates every step over all of ``axes``: ``mean_grads(grads, key) ->
    (mean gradient tree, bytes one worker sends)`` then one optimizer update; its step is named ``name``."""
    _check_loss(loss_fn)
    _check_optimizer("optimizer", optimizer)
    spec = _GradientMean(_grad_fn(loss_fn, axes.loop), optimizer, axes.all, mean_grads)
    return Strategy(functools.partial(initial_state, optimizer, None, None), _named(_gradient_mean_step, name, spec))


def _exact_mean(workers: tuple, grads, key) -> tuple:
    """(1/N) sum_i g_i over ``workers``, and its bytes."""
    del key
    return tree_pmean(grads, workers), _float_bytes(grads)


def _quantised_mean(workers: tuple, levels: int, bucket_size: Optional[int], grads, key) -> tuple:
    """(1/N) sum_i Q_s(g_i) over ``workers`` (``collectives.qsgd_mean``), and the bytes gathered."""
    mean = collectives.qsgd_mean(grads, key, levels, workers, bucket_size)
    return mean, comm.qsgd_bytes(collectives.float_leaves(grads), levels, bucket_size)


def allreduce(loss_fn: LossFn, optimizer: optax.GradientTransformation, *, workers=None,
              axis_name: Optional[AxisName] = None) -> Strategy:
    """Full-sync SGD: g = (1/N) sum_i g_i (one all-reduce of the gradient and
    model-state bytes every step), then one optimizer update on every worker.

    ``workers`` (a ``distributed.Layout``) or ``axis_name`` (default "batch")
    as for ``averaging.local_sgd``; the mean spans every worker axis, group axes included."""
    axes = _check_axes(axis_name, None, workers)
    return _gradient_mean_strategy("allreduce_step", loss_fn, optimizer, axes,
                                   functools.partial(_exact_mean, axes.all))


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
    return _gradient_mean_strategy("qsgd_step", loss_fn, optimizer, axes,
                                   functools.partial(_quantised_mean, axes.all, levels, bucket_size))
