"""Worker loops: how the K workers that share one device run their local computation.

Inside a device program the K workers of a device live on named ``vmap``
axes (``distributed.shard_map_step``), so that every collective of the step
spans all workers. The expensive part of a step, one worker's forward and
backward pass, need not be batched the same way. A loop says how it runs:

* ``"vmap"``: batched, as the rest of the step. A dense layer over K
  per-worker weight matrices becomes one batched matmul; a convolution over
  K per-worker kernels becomes one convolution with ``feature_group_count =
  K`` (its kernel gradient one with ``batch_group_count = K``), which XLA
  runs far slower than K plain convolutions on CPU and on CUDA.
* ``"map"``: ``lax.map`` over the K workers, one worker's program at a time
  in a ``while`` loop, each with its own plain convolutions; the program
  holds one worker's computation whatever K is.
* ``"unroll"``: the K workers' programs one after another, unrolled: plain
  convolutions again, with no loop around them (XLA schedules them freely);
  the program, and its compilation time, grow with K.
* an integer B (1 <= B <= K): ``lax.map`` over chunks of B workers, each
  chunk batched (``lax.map(..., batch_size=B)``); B = 1 is ``"map"`` and B =
  K is ``"vmap"``. With nested worker axes (two-level averaging with several
  groups on a device) ``"map"`` loops over every axis and B chunks the
  innermost one.

The loop is applied with ``jax.custom_batching.custom_vmap`` to the function
it wraps (``looped``): unbatched, the function is unchanged; under the
workers' ``vmap`` its batching rule runs it as the loop says. A wrapped
function must contain no collective (the step's collectives stay outside, on
the vmapped axes). Every loop computes the same values up to the order of
floating-point reductions.

``choose`` is the rule that ``"auto"`` stands for, from the benchmark's
item 8 (docs/scale.md has the figures): ``"vmap"`` for a function without
convolutions; with convolutions, ``"unroll"`` on CPU (where XLA runs the
convolutions inside a ``while`` loop slowly) and ``"map"`` on other
platforms.
"""

from __future__ import annotations

from typing import Any, Callable, Union

import jax
import jax.extend.core as jax_core
import jax.numpy as jnp
from jax import lax

Loop = Union[str, int]
LOOPS = ("vmap", "map", "unroll")  # and an integer chunk size


def check(loop: Any, workers_per_device: int) -> Loop:
    """``loop`` validated against K workers per device: "vmap", "map",
    "unroll" or an integer B with 1 <= B <= K, returned in its plainest form
    (B = 1 is "map", B = K "vmap").

    Raises ValueError naming the accepted values.
    """
    if isinstance(loop, str) and loop in LOOPS:
        return loop
    if isinstance(loop, bool) or not isinstance(loop, int) or not 1 <= loop <= workers_per_device:
        raise ValueError(f"loop must be 'vmap', 'map', 'unroll' or an integer chunk size in [1, {workers_per_device}] "
                         f"(the workers per device), got {loop!r}")
    return "map" if loop == 1 else "vmap" if loop == workers_per_device else int(loop)


def looped(fn: Callable, loop: Loop) -> Callable:
    """``fn`` unchanged when called plainly; under ``vmap``, run over the
    mapped axis as ``loop`` says (see the module docstring).

    ``fn`` takes and returns pytrees of arrays; under vmap its outputs are
    batched (leading axis K). Unbatched arguments are passed to every call
    as they are.
    """
    if loop == "vmap":
        return fn

    @jax.custom_batching.custom_vmap
    def wrapped(*args):
        return fn(*args)

    @wrapped.def_vmap
    def rule(axis_size, in_batched, *args):
        leaves, tree = jax.tree.flatten(args)
        flags = jax.tree.leaves(in_batched)

        def call(f):
            def one(xs):
                xs = iter(xs)
                return f(*jax.tree.unflatten(tree, [next(xs) if b else x for x, b in zip(leaves, flags)]))
            return one

        mapped = [x for x, b in zip(leaves, flags) if b]
        # ``wrapped`` inside "map" and "unroll": an outer vmap (nested worker axes) is looped as well.
        if loop == "map":
            out = lax.map(call(wrapped), mapped)
        elif loop == "unroll":
            one = call(wrapped)
            outs = [one([x[i] for x in mapped]) for i in range(axis_size)]
            out = jax.tree.map(lambda *xs: jnp.stack(xs), *outs)
        else:  # chunks, each one vmap of ``fn`` (``wrapped`` there would apply this rule without end)
            out = lax.map(call(fn), mapped, batch_size=min(loop, axis_size))
        return out, jax.tree.map(lambda _: True, out)

    return wrapped


_CONVOLUTIONS = ("conv_general_dilated",)


def has_convolution(fn: Callable, *args) -> bool:
    """Whether ``fn(*args)`` (traced, not run) performs a convolution, in any nested jaxpr."""
    def walk(jaxpr) -> bool:
        for eqn in jaxpr.eqns:
            if eqn.primitive.name in _CONVOLUTIONS:
                return True
            for sub in jax_core.jaxprs_in_params(eqn.params):
                if walk(sub):
                    return True
        return False

    return walk(jax.make_jaxpr(fn)(*args).jaxpr)


def choose(fn: Callable, *args, platform: str = "cpu") -> str:
    """The loop ``"auto"`` picks for ``fn`` at these arguments (one worker's) on ``platform``
    ("cpu", "gpu", ...): ``"vmap"`` without convolutions; with them ``"unroll"`` on CPU, else ``"map"``."""
    if not has_convolution(fn, *args):
        return "vmap"
    return "unroll" if platform == "cpu" else "map"
