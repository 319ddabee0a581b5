"""Streaming averaging: ``local_sgd(..., fragments=P)`` averages one fragment of
the parameters per sync, in turn (docs/algorithm.md, "Streaming averaging").

The schedule's syncs are rounds; round k averages fragment p = k mod P (the
partition: ``adpsgd_jax.fragments``), so each round sends 1/P of the
parameters. With delay tau the fragment's mean (or its outer step) is taken
at the round and applied tau local steps later; with weight alpha the
fragment's local parameters then become alpha * local + (1 - alpha) * global.

Inside the step: ``apply_due`` (after the local update, a ``lax.cond`` on a
worker-invariant bool and a ``lax.switch`` over the P fragments, no
collective) and ``sync_round`` (inside the schedule's ``lax.cond`` gate, a
``lax.switch`` whose branch p all-reduces fragment p only).
"""

from __future__ import annotations

import functools
import numbers
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
from jax import lax

from adpsgd_jax import collectives, fragments
from adpsgd_jax.collectives import tree_pmean
from adpsgd_jax.step import _float_bytes, _payload


class Streaming(NamedTuple):
    """The fixed parts of streaming averaging, checked by ``check``."""

    count: int  # P
    delay: int  # tau: local steps between taking a fragment's average and applying it
    alpha: float  # the local parameters' weight when the average is applied
    partition: Any  # None (``fragments.contiguous`` by bytes) or the user's pytree of fragment indices


class FragmentState(NamedTuple):
    """What streaming averaging adds to the train state (``TrainState.fragments``); worker-invariant."""

    round: jnp.ndarray  # int32[]: rounds so far; the next averages fragment round mod P.
    pending: Any = None  # params-shaped: each fragment's taken global value awaiting application (tau > 0).
    due: Any = None  # int32[P]: the step after whose update fragment p's pending value is applied; -1 none (tau > 0).


def _check_count(value) -> tuple:
    """(P, the user's partition or None) from ``fragments``: an int >= 1 or a pytree of indices."""
    if value is None:
        return 1, None
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        if value < 1:
            raise ValueError(f"fragments must be an integer P >= 1 or a pytree of fragment indices, got {value!r}")
        return int(value), None
    return fragments.check_user_partition(value), value


def check(fragments_arg, delay, alpha, schedule, average_opt_state: bool) -> Optional[Streaming]:
    """The ``Streaming`` spec of ``local_sgd``'s three options, or None where they
    ask for plain averaging (P = 1, tau = 0, alpha = 0: the unfragmented step).

    ValueError, before anything is traced, for: P < 1 or a bad partition; tau not
    an integer >= 0; alpha outside [0, 1]; tau >= P * p0 with p0 the schedule's
    first period (for ``constant(H)``, tau >= P H: the average would land after
    the fragment's next sync); ``average_opt_state`` with P > 1.
    """
    count, partition = _check_count(fragments_arg)
    if isinstance(delay, bool) or not isinstance(delay, numbers.Integral) or delay < 0:
        raise ValueError(f"fragment_delay must be an integer >= 0 (local steps), got {delay!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real) or not 0.0 <= float(alpha) <= 1.0:
        raise ValueError(f"fragment_alpha must be a number in [0, 1], got {alpha!r}")
    if count == 1 and delay == 0 and alpha == 0:
        return None
    if average_opt_state and count > 1:
        raise ValueError(f"average_opt_state cannot be combined with fragments={count}: give fragments=1 or "
                         f"average_opt_state=False")
    first = int(schedule.init().period)
    if delay >= count * first:
        raise ValueError(f"fragment_delay must be < fragments * period = {count} * {first} = {count * first} "
                         f"(a fragment's average must land before its next sync), got {delay}")
    return Streaming(count, int(delay), float(alpha), partition)


def _masked(leaves: list, treedef, members: tuple) -> Any:
    """The parameter tree with only the given leaf positions kept (the others None: empty subtrees)."""
    keep = set(members)
    return treedef.unflatten([x if j in keep else None for j, x in enumerate(leaves)])


def _replaced(tree: Any, members: tuple, new: list) -> Any:
    """``tree`` with its leaves at positions ``members`` replaced by ``new`` (in that order)."""
    leaves, treedef = jax.tree.flatten(tree)
    for j, x in zip(members, new):
        leaves[j] = x
    return treedef.unflatten(leaves)


def _picked(tree: Any, members: tuple) -> list:
    leaves = jax.tree.leaves(tree)
    return [leaves[j] for j in members]


def init_state(stream: Streaming, outer_optimizer, base_init: Callable, params, model_state, rng):
    """``base_init``'s train state with ``FragmentState`` and, with an outer optimizer, one
    outer state per fragment: a tuple of P states, state p over the parameter tree
    masked to fragment p's leaves. ValueError for a partition that does not fit ``params``."""
    state = base_init(params, model_state, rng)
    index = fragments.assign(params, stream.partition, stream.count)
    groups = fragments.members(index, stream.count)
    leaves, treedef = jax.tree.flatten(params)
    outer = None if outer_optimizer is None else tuple(outer_optimizer.init(_masked(leaves, treedef, g)) for g in groups)
    pending, due = None, None
    if stream.delay > 0:
        pending, due = jax.tree.map(jnp.array, params), jnp.full((stream.count,), -1, jnp.int32)
    return state._replace(outer_opt_state=outer, fragments=FragmentState(jnp.zeros((), jnp.int32), pending, due))


def with_fragments(stream: Optional[Streaming], outer_optimizer, base_init: Callable) -> Callable:
    """A strategy's ``init``: ``base_init`` itself without streaming, else ``init_state`` over it."""
    return base_init if stream is None else functools.partial(init_state, stream, outer_optimizer, base_init)


def _mix(alpha: float, local: list, global_: list) -> list:
    """alpha * local + (1 - alpha) * global per floating leaf (alpha = 0: global exactly); other leaves stay local."""
    def one(x, g):
        if not jnp.issubdtype(x.dtype, jnp.floating):
            return x
        return g if alpha == 0 else (alpha * x + (1.0 - alpha) * g).astype(x.dtype)
    return [one(x, g) for x, g in zip(local, global_)]


def _groups(stream: Streaming, params) -> tuple:
    """(leaf positions of each fragment, d_p of each fragment), from the parameters' shapes (at trace time)."""
    index = fragments.assign(params, stream.partition, stream.count)
    return fragments.members(index, stream.count), fragments.sizes_of(jax.tree.leaves(params), index, stream.count)


def _land(stream: Streaming, group: tuple, params, fstate: FragmentState, when) -> tuple:
    """(params, due): fragment ``group``'s pending value mixed in where ``when`` (bool[]), its due step cleared."""
    local = _picked(params, group)
    mixed = _mix(stream.alpha, local, _picked(fstate.pending, group))
    chosen = [jnp.where(when, m, x) for m, x in zip(mixed, local)]
    return _replaced(params, group, chosen), fstate.due


def apply_due(stream: Streaming, params, fstate: FragmentState, step) -> tuple:
    """(params, FragmentState) after landing the fragment due after step ``step``:
    x_p <- alpha * x_p + (1 - alpha) * pending_p where due_p = step (at most one p is).
    A ``lax.cond`` on a worker-invariant bool around a ``lax.switch``; no collective."""
    if fstate.due is None:
        return params, fstate
    now = fstate.due == step
    groups, _ = _groups(stream, params)

    def land(p, operand):
        params, due = operand
        params, _ = _land(stream, groups[p], params, fstate, jnp.asarray(True))
        return params, due.at[p].set(-1)

    branches = [functools.partial(land, p) for p in range(stream.count)]
    params, due = lax.cond(jnp.any(now), lambda op: lax.switch(jnp.argmax(now), branches, op), lambda op: op,
                           (params, fstate.due))
    return params, fstate._replace(due=due)


class Round(NamedTuple):
    """The operand of a streaming round: the ``local_sgd`` replica, the fragments' state and the comm counter."""

    replica: Any  # averaging's replica: params, model_state, sched_state, anchor, outer_opt_state, monitor
    fstate: FragmentState
    counter: Any  # comm.CommCounter


class RoundSpec(NamedTuple):
    """What a round reads from ``local_sgd``'s fixed parts."""

    stream: Streaming
    schedule: Any
    axes: Any  # step.WorkerAxes
    outer_optimizer: Any
    outer_step: Callable  # (outer, params_avg, anchor, outer_state) -> (x_new, anchor, outer_state)


def _global(spec: RoundSpec, p: int, group: tuple, mean: list, replica) -> tuple:
    """(global values of fragment p's leaves, new anchor, new outer states): the mean, or
    with an outer optimizer x_s,p + outer.update(x_s,p - xbar_p) on fragment p's own outer state."""
    anchor, outer = replica.anchor, replica.outer_opt_state
    if spec.outer_optimizer is not None:
        leaves, treedef = jax.tree.flatten(replica.anchor)
        means = list(leaves)
        for j, x in zip(group, mean):
            means[j] = x
        new, _, outer_p = spec.outer_step(spec.outer_optimizer, _masked(means, treedef, group),
                                          _masked(leaves, treedef, group), outer[p])
        mean = jax.tree.leaves(new)
        outer = outer[:p] + (outer_p,) + outer[p + 1:]
    if anchor is not None:
        anchor = _replaced(anchor, group, mean)
    return mean, anchor, outer


def _take(spec: RoundSpec, p: int, layout: tuple, loss, step, operand: Round) -> tuple:
    """Round on fragment p: (Round, V-hat). A still-pending value of p lands first; then xbar_p,
    V_p = (1/N) sum_i ||x_i,p - xbar_p||^2 and V-hat = V_p d / d_p, the mean model state, the
    global value (mean or outer step), applied now (tau = 0) or held until step + tau."""
    (groups, sizes), (replica, fstate, counter) = layout, operand
    stream, group = spec.stream, groups[p]
    across, workers, drift = spec.axes.across, spec.axes.all, spec.schedule.drift
    params = replica.params
    if fstate.due is not None:
        params, _ = _land(stream, group, params, fstate, fstate.due[p] >= 0)
        fstate = fstate._replace(due=fstate.due.at[p].set(-1))
    local = _picked(params, group)
    mean = tree_pmean(local, across)
    sq = collectives.squared_distance(local, mean)
    v_p, loss_avg = lax.pmean(jnp.stack([sq, loss.astype(jnp.float32)]), workers)
    variance = v_p * jnp.float32(sum(sizes) / sizes[p])
    global_, anchor, outer = _global(spec, p, group, mean, replica)
    if stream.delay == 0:
        params = _replaced(params, group, _mix(stream.alpha, local, global_))
    else:
        fstate = fstate._replace(pending=_replaced(fstate.pending, group, global_),
                                 due=fstate.due.at[p].set(step + stream.delay))
    monitor = replica.monitor
    if drift is not None and drift.direction:  # u: this round's change of the anchor (fragment p's part)
        direction, norm = collectives.unit_direction(anchor, replica.anchor)
        monitor = monitor._replace(direction=direction, direction_norm=norm)
    model_state = tree_pmean(replica.model_state, across)
    sched_state = spec.schedule.update(replica.sched_state, step, variance, loss_avg)
    nbytes = _float_bytes(local, model_state) + 8
    counter = counter.add(jnp.int32(1), _payload(nbytes, across))
    replica = replica._replace(params=params, model_state=model_state, sched_state=sched_state, anchor=anchor,
                               outer_opt_state=outer, monitor=monitor)
    return Round(replica, fstate._replace(round=fstate.round + 1), counter), variance


def sync_round(spec: RoundSpec, loss, step, sync, operand: Round) -> tuple:
    """(Round, V-hat): where ``sync`` (a worker-invariant bool[]), the round on fragment
    round mod P (``lax.switch`` over the P fragments, each branch all-reducing its own
    fragment); else the operand unchanged and V-hat = 0."""
    layout = _groups(spec.stream, operand.replica.params)
    branches = [functools.partial(_take, spec, p, layout, loss, step) for p in range(spec.stream.count)]

    def average(op):
        return lax.switch(op.fstate.round % spec.stream.count, branches, op)

    return lax.cond(sync, average, lambda op: (op, jnp.zeros((), jnp.float32)), operand)
