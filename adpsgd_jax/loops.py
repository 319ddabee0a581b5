"""Worker loops: how the K workers that share one device run their local computation.

Inside a device program the K workers of a device live on named ``vmap``
axes (``distributed.shard_map_step``), so that every collective of the step
spans all workers. The expensive part of a step, one worker's forward and
backward pass, need not be batched the same way. A loop says how it runs:

* ``VMAP``: batched, as the rest of the step. A dense layer over K
  per-worker weight matrices becomes one batched matmul; a convolution over
  K per-worker kernels becomes one convolution with ``feature_group_count =
  K`` (its kernel gradient one with ``batch_group_count = K``), which XLA
  runs far slower than K plain convolutions on CPU and on CUDA.
* ``MAP``: ``lax.map`` over the K workers, one worker's program at a time
  in a ``while`` loop, each with its own plain convolutions; the program
  holds one worker's computation whatever K is.
* ``UNROLL``: the K workers' programs one after another, unrolled: plain
  convolutions again, with no loop around them (XLA schedules them freely);
  the program, and its compilation time, grow with K.
* ``chunks(B)`` (1 <= B <= K): ``lax.map`` over chunks of B workers, each
  chunk batched (``lax.map(..., batch_size=B)``); B = 1 is ``MAP`` and B =
  K is ``VMAP``. With nested worker axes (two-level averaging with several
  groups on a device) ``MAP`` loops over every axis and B chunks the
  innermost one.

Each is a ``Loop``: its name (as the CLI's ``--worker-loop`` spells it) and
the function that runs the K calls. The loop is applied with ``jax.custom_batching.custom_vmap`` to the function
it wraps (``looped``): unbatched, the function is unchanged; under the
workers' ``vmap`` its batching rule runs it as the loop says. A wrapped
function must contain no collective (the step's collectives stay outside, on
the vmapped axes). Every loop computes the same values up to the order of
floating-point reductions.

``choose`` is the rule that the CLI's ``--worker-loop auto`` stands for,
from the benchmark's item 8 (docs/scale.md has the figures): ``VMAP`` for
a function without convolutions; with convolutions, ``UNROLL`` on CPU
(where XLA runs the convolutions inside a ``while`` loop slowly) and
``MAP`` on other platforms.
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Optional

import jax
import jax.extend.core as jax_core
import jax.numpy as jnp
from jax import lax


class Loop(NamedTuple):
    """How the K workers of a device run a ``looped`` function under their ``vmap``.

    ``run(loop, nested, plain, xs, k)`` returns the K outputs stacked on a
    leading axis, from ``xs`` (the batched arguments, leading axis K),
    ``nested`` (one worker's call that loops an outer vmap too) and
    ``plain`` (one worker's call that is batched again under vmap); None
    leaves the function batched.
    """

    name: str  # as the CLI's --worker-loop spells it: "vmap", "map", "unroll", or the chunk size
    run: Optional[Callable] = None
    size: int = 0  # the chunk size B (``chunks`` only)


def _mapped(loop: Loop, nested, plain, xs, k):
    """One worker at a time, in a ``while`` loop."""
    return lax.map(nested, xs)


def _unrolled(loop: Loop, nested, plain, xs, k):
    """The K workers' calls one after another, unrolled."""
    outs = [nested([x[i] for x in xs]) for i in range(k)]
    return jax.tree.map(lambda *ys: jnp.stack(ys), *outs)


def _chunked(loop: Loop, nested, plain, xs, k):
    """Chunks of B workers, each chunk batched (``plain``: ``nested`` there would loop without end)."""
    return lax.map(plain, xs, batch_size=min(loop.size, k))


VMAP = Loop("vmap")
MAP = Loop("map", _mapped)
UNROLL = Loop("unroll", _unrolled)


def chunks(size: int) -> Loop:
    """Chunks of ``size`` workers, each chunk batched (``lax.map(..., batch_size=size)``)."""
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"chunks takes a chunk size >= 1, got {size!r}")
    return Loop(str(size), _chunked, size)


def check(loop: Loop, workers_per_device: int) -> Loop:
    """``loop`` validated against K workers per device, in its plainest form
    (``chunks(1)`` is ``MAP``, ``chunks(K)`` is ``VMAP``).

    Raises ValueError naming the accepted values.
    """
    if loop in (VMAP, MAP, UNROLL) or (isinstance(loop, Loop) and loop.run is _chunked
                                       and 1 <= loop.size <= workers_per_device):
        return MAP if loop.size == 1 else VMAP if loop.size == workers_per_device else loop
    raise ValueError(f"loop must be loops.VMAP, loops.MAP, loops.UNROLL or loops.chunks(B) with B in "
                     f"[1, {workers_per_device}] (the workers per device), got {loop!r}")


def looped(fn: Callable, loop: Loop) -> Callable:
    """``fn`` unchanged when called plainly; under ``vmap``, run over the
    mapped axis as ``loop`` says (see the module docstring).

    ``fn`` takes and returns pytrees of arrays; under vmap its outputs are
    batched (leading axis K). Unbatched arguments are passed to every call
    as they are.
    """
    if loop.run is None:
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
        # ``wrapped`` as the nested call: an outer vmap (nested worker axes) is looped as well.
        out = loop.run(loop, call(wrapped), call(fn), mapped, axis_size)
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


def choose(fn: Callable, *args, platform: str = "cpu") -> Loop:
    """The loop for ``fn`` at these arguments (one worker's) on ``platform``
    ("cpu", "gpu", ...): ``VMAP`` without convolutions; with them ``UNROLL`` on CPU, else ``MAP``."""
    if not has_convolution(fn, *args):
        return VMAP
    return UNROLL if platform == "cpu" else MAP
