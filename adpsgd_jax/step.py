"""What every strategy's train step is made of: the workers' axes, the
per-worker gradient, the optimizer update and the byte counts.

A step ``step(state, batch) -> (TrainState, StepMetrics)`` is a pure
per-worker function whose collectives name the workers' axes: ``workers=layout``
(a ``distributed.Layout``, flat or two-level, any number of workers per
device, with its worker loop) gives them in one argument; ``axis_name`` (and
``group_axis_name``) name them explicitly, e.g. under ``jax.pmap``. The step
runs under ``jax.pmap``, under ``jax.shard_map`` and, with several workers
per device, under a named ``jax.vmap`` inside the device program
(``distributed.shard_map_step``). An axis may be a name or a tuple of names
(all of them together are the workers).

``loss_fn(params, model_state, batch, rng) -> (loss, (model_state, aux))``
where ``aux`` is a dict of scalar metrics (e.g. accuracy) computed on the
worker's own batch.

The strategies built from these parts (docs/algorithm.md, "Strategies"):
``averaging.local_sgd`` (periodic parameter averaging gated by a schedule),
``gradient_mean.allreduce`` and ``gradient_mean.qsgd`` (a gradient mean every
step); ``evaluation.make_eval_step`` evaluates the averaged model.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import optax
from jax import lax

from adpsgd_jax import collectives, comm, loops

LossFn = Callable[[Any, Any, Any, jax.Array], tuple]
AxisName = Union[str, Sequence[str]]


class WorkerAxes(NamedTuple):
    """Where a strategy's workers live, as its collectives name them.

    across: the axes a sync averages over (every worker, or across groups);
    inside: the axes inside a group (two-level averaging), else ();
    loop: how the workers of one device run their gradient (``loops``).
    """

    across: tuple
    inside: tuple = ()
    loop: loops.Loop = loops.VMAP

    @property
    def all(self) -> tuple:
        """Every worker axis, worker index major to minor."""
        return self.across + self.inside


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
        axis_name, loop = ("batch" if axis_name is None else axis_name), loops.VMAP
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


def _local_grads(grad_fn, state, batch, workers: tuple):
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


def _float_bytes(*trees) -> int:
    return sum(comm.tree_bytes(collectives.float_leaves(t)) for t in trees)


def _aux(aux: dict) -> dict:
    return {k: jnp.asarray(v, jnp.float32) for k, v in aux.items()}


def _named(fn: Callable, name: str, *static) -> Callable:
    """``fn`` with its leading (static) arguments ``static`` bound, as a function named ``name``:
    jax's compile events and logs name the compiled program after it."""

    def bound(*args):
        return fn(*static, *args)

    bound.__name__ = bound.__qualname__ = name
    return bound
