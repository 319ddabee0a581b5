"""Placing workers on devices: jax.distributed start-up, worker layouts,
replication, batch sharding, and the shard_map wrapper of a
per-worker step.

N workers live on D devices, K = N / D per device (``workers`` builds the
``Layout``): a mesh of the devices and, inside each device's program, the K
workers on named ``vmap`` axes, so every collective of the step spans the
workers of all devices. Per-worker values (the train state, the batch) carry
one leading axis of size N, sharded over the mesh in blocks of K, exactly as
``jax.pmap`` returns them with K = 1, so the first call and every later call
see the same input sharding and nothing retraces. In a multi-process run
these are global arrays: each process holds the rows of its own devices.

Two-level averaging lays G groups of L workers over the same N rows: worker
n = g * L + l is row n whatever K is.
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from adpsgd_jax import loops


def set_cpu_devices(count: int) -> bool:
    """Ask jax for ``count`` CPU devices (``jax_num_cpu_devices``; it overrides
    XLA_FLAGS' --xla_force_host_platform_device_count). Takes effect only
    before jax's first operation: returns False, changing nothing, once jax's
    backends have started (a notebook or test that set them already)."""
    try:
        jax.config.update("jax_num_cpu_devices", int(count))
    except RuntimeError:
        return False
    return True


def initialize(
    coordinator_address: Optional[str] = None,
    num_processes: Optional[int] = None,
    process_id: Optional[int] = None,
    *,
    initialization_timeout: int = 60,
    heartbeat_timeout: int = 20,
    cpu_collectives: str = "gloo",
) -> None:
    """Start ``jax.distributed`` before any other jax call.

    With explicit arguments, process ``process_id`` of ``num_processes``
    joins the coordinator at ``coordinator_address`` ("host:port"; process 0
    runs it). With no arguments, jax's own cluster detection (SLURM, Open
    MPI, TPU pods, ...) supplies them. CPU collectives between processes go
    through ``cpu_collectives`` (gloo). A coordinator that cannot be reached
    fails after ``initialization_timeout`` seconds; a process whose peer
    stops sending heartbeats for ``heartbeat_timeout`` seconds is stopped by
    the distributed runtime instead of hanging.
    """
    explicit = (coordinator_address, num_processes, process_id)
    if any(v is not None for v in explicit) and any(v is None for v in explicit):
        raise ValueError("give coordinator_address, num_processes and process_id together, or none of them")
    if num_processes is not None and not 0 <= process_id < num_processes:
        raise ValueError(f"process_id must be in [0, num_processes={num_processes}), got {process_id}")
    jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)
    jax.distributed.initialize(
        coordinator_address, num_processes, process_id,
        initialization_timeout=initialization_timeout, heartbeat_timeout_seconds=heartbeat_timeout,
    )


WORKER_AXIS = "worker"  # the vmapped axis of the workers that share one device
_GROUP_WORKER_AXIS = "group_worker"  # with several groups on one device: the groups' vmapped axis


class Layout(NamedTuple):
    """Where N workers live: a mesh of D devices and, inside each device's
    program, K = N / D workers on vmapped named axes.

    Per-worker arrays have one leading axis of N rows, sharded over every mesh
    axis: device d (in ``mesh.devices.flat`` order) holds workers
    d K, ..., d K + K - 1. Worker n's index over ``axes`` (major to minor) is n.

    Attributes:
      mesh: the device mesh.
      vmap_axes: ((name, size), ...), outer to inner, of the workers inside a
        device program; () with one worker per device.
      axis_name: the axes a sync averages over (all workers, or across groups).
      group_axis_name: the axes inside a group (two-level averaging), else ().
      loop: how a device's workers run their forward and backward passes
        (a ``loops.Loop``: ``VMAP``, ``MAP``, ``UNROLL`` or ``chunks(B)``);
        ``VMAP`` with one worker per device.
    """

    mesh: Mesh
    vmap_axes: tuple = ()
    axis_name: tuple = ("batch",)
    group_axis_name: tuple = ()
    loop: loops.Loop = loops.VMAP

    @property
    def workers_per_device(self) -> int:
        return math.prod(size for _, size in self.vmap_axes)

    @property
    def num_workers(self) -> int:
        return self.mesh.devices.size * self.workers_per_device

    @property
    def axes(self) -> tuple:
        """Every worker axis, major to minor (the workers' index runs over these)."""
        return self.axis_name + self.group_axis_name


def workers(num_workers: Optional[int] = None, devices: Optional[Sequence[jax.Device]] = None, *,
            group_size: int = 1, axis_name: str = "batch", loop: loops.Loop = loops.VMAP) -> Layout:
    """Lay ``num_workers`` workers (default: one per device) over ``devices``
    (default: every device of every process), K = N / D on each device, whose
    forward and backward passes run as ``loop`` says (``loops.VMAP``,
    ``MAP``, ``UNROLL`` or ``chunks(B)``, B in [1, K]; with one worker per
    device, ``VMAP``).

    Flat (``group_size`` 1): mesh (axis_name,), the K workers of a device on
    the vmapped axis ``WORKER_AXIS``; syncs average over both.

    Two-level, groups of L = ``group_size`` consecutive workers: when K
    divides L a group spans L / K devices (mesh ("group", "local"), groups
    across "group", in-group axes ("local", WORKER_AXIS)); when L divides K a
    device holds K / L whole groups (mesh ("group",), vmapped axes
    (``_GROUP_WORKER_AXIS``, "local")).

    Raises ValueError, naming the argument and the accepted values, when D does
    not divide N, L does not divide N, neither of K and L divides the other,
    or ``loop`` is not one of the loops.
    """
    devices = jax.devices() if devices is None else list(devices)
    d = len(devices)
    n = d if num_workers is None else num_workers
    if isinstance(n, bool) or int(n) != n or n < 1 or n % d:
        raise ValueError(f"num_workers must be a positive multiple of the number of devices ({d}), got {n!r}")
    k = n // d
    loop = loops.check(loop, k) if k > 1 else loops.VMAP
    if isinstance(group_size, bool) or int(group_size) != group_size or group_size < 1 or n % group_size:
        raise ValueError(f"group_size must be an integer >= 1 that divides the number of workers ({n}), "
                         f"got {group_size!r}")
    worker = ((WORKER_AXIS, k),) if k > 1 else ()
    grid = np.asarray(devices)
    if group_size == 1:
        return Layout(Mesh(grid, (axis_name,)), worker, (axis_name,) + tuple(a for a, _ in worker), (), loop)
    if group_size % k == 0:
        mesh = Mesh(grid.reshape(n // group_size, group_size // k), ("group", "local"))
        return Layout(mesh, worker, ("group",), ("local",) + tuple(a for a, _ in worker), loop)
    if k % group_size == 0:
        groups = ((_GROUP_WORKER_AXIS, k // group_size),) if k > group_size else ()
        return Layout(Mesh(grid, ("group",)), groups + (("local", group_size),),
                      ("group",) + tuple(a for a, _ in groups), ("local",), loop)
    raise ValueError(f"group_size {group_size} and the {k} workers per device: one must divide the other "
                     f"(accepted group sizes: {', '.join(str(g) for g in range(1, n + 1) if not n % g and (g % k == 0 or k % g == 0))})")


def as_layout(where: Union[Layout, Mesh]) -> Layout:
    """A Layout, or a Mesh read as one worker per device (its first axis across
    groups, a second axis inside them)."""
    if isinstance(where, Layout):
        return where
    names = tuple(where.axis_names)
    return Layout(where, (), names[:1], names[1:])


def local_workers(where: Union[Layout, Mesh]) -> list[int]:
    """Indices of this process's workers, in order."""
    layout = as_layout(where)
    k = layout.workers_per_device
    return [i * k + j for i, dev in enumerate(layout.mesh.devices.flat) if dev.process_index == jax.process_index()
            for j in range(k)]


def _local_devices(mesh: Mesh) -> list:
    """This process's devices of the mesh, in worker order."""
    return [d for d in mesh.devices.flat if d.process_index == jax.process_index()]


def local_rows(x: jax.Array) -> np.ndarray:
    """This process's rows of a per-worker array [N, ...], in worker order."""
    shards = sorted(x.addressable_shards, key=lambda s: s.index[0].start or 0)
    return np.concatenate([np.asarray(s.data) for s in shards])


def worker_spec(mesh: Mesh) -> P:
    """PartitionSpec of a per-worker array: the leading axis split over every mesh axis."""
    names = tuple(mesh.axis_names)
    return P(names[0] if len(names) == 1 else names)


def worker_sharding(where: Union[Layout, Mesh]) -> NamedSharding:
    """Sharding of a per-worker array: leading axis split over the mesh axes."""
    mesh = as_layout(where).mesh
    return NamedSharding(mesh, worker_spec(mesh))


def replicate(tree: Any, where: Union[Layout, Mesh]) -> Any:
    """Copy every leaf of ``tree`` onto each worker: [...] -> [N, ...].

    Each process supplies the copies on its own devices, so this also builds
    global arrays in a multi-process run.
    """
    layout = as_layout(where)
    sharding, k, n = worker_sharding(layout), layout.workers_per_device, layout.num_workers
    local = _local_devices(layout.mesh)

    def put(x):
        x = np.asarray(x) if not isinstance(x, jax.Array) else x
        block = jnp.broadcast_to(x[None], (k,) + tuple(x.shape))
        shards = [jax.device_put(block, d) for d in local]
        return jax.make_array_from_single_device_arrays((n,) + tuple(x.shape), sharding, shards)

    return jax.tree.map(put, tree)


def shard_local_batch(batch: Any, where: Union[Layout, Mesh]) -> Any:
    """Put this process's rows [W, per_worker, ...] (W = its workers, in
    ``local_workers`` order) onto its devices as global arrays [N, ...]."""
    layout = as_layout(where)
    devices, k = _local_devices(layout.mesh), layout.workers_per_device
    check_leading_dim(batch, len(devices) * k, what="local batch")
    sharding, n = worker_sharding(layout), layout.num_workers

    def put(x):
        x = np.asarray(x)
        rows = [jax.device_put(x[j * k: (j + 1) * k], d) for j, d in enumerate(devices)]
        return jax.make_array_from_single_device_arrays((n,) + x.shape[1:], sharding, rows)

    return jax.tree.map(put, batch)


def unreplicate(tree: Any) -> Any:
    """Worker 0's copy of every leaf: [N, ...] -> [...] (a host NumPy array)."""
    return jax.tree.map(lambda x: np.asarray(x.addressable_shards[0].data)[0], tree)


def check_leading_dim(tree: Any, num_workers: int, what: str = "batch") -> None:
    """Raise ValueError unless every leaf of ``tree`` has leading dimension N."""
    for path, x in jax.tree_util.tree_leaves_with_path(tree):
        shape = getattr(x, "shape", ())
        if len(shape) == 0 or shape[0] != num_workers:
            name = jax.tree_util.keystr(path) or "<leaf>"
            raise ValueError(
                f"{what} leaf {name} has shape {tuple(shape)}: its leading dimension must equal the number of "
                f"workers ({num_workers}); lay the batch out as [{num_workers}, per_worker_batch, ...] "
                f"(adpsgd_jax.distributed.shard_batch)"
            )


def shard_batch(batch: Any, where: Union[Layout, Mesh]) -> Any:
    """Put a host batch laid out [N, per_worker, ...] onto the workers.

    Raises ValueError naming the leaf when the leading dimension is not N.
    In a multi-process run each process passes the full global batch and
    only its own devices' rows are transferred.
    """
    layout = as_layout(where)
    check_leading_dim(batch, layout.num_workers)
    sharding = worker_sharding(layout)

    def put(x):
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])

    return jax.tree.map(put, batch)


def _checked(compiled: Callable, num_workers: int) -> Callable:
    def run(state, batch):
        check_leading_dim(batch, num_workers)
        check_leading_dim(state, num_workers, what="state")
        return compiled(state, batch)

    run.compiled = compiled
    return run


def _in_axes(state) -> Any:
    """vmap in_axes of a state: its own ``worker_axes()`` (worker-invariant
    fields unbatched), else every leaf batched."""
    return state.worker_axes() if hasattr(state, "worker_axes") else 0


def shard_map_step(step: Callable, where: Union[Layout, Mesh], donate_state: bool = True) -> Callable:
    """A per-worker ``step(state, batch)`` as one ``jax.jit(jax.shard_map(...))``
    program over the layout's devices, its K workers per device vmapped
    over the layout's named worker axes inside.

    Inputs and outputs are per-worker arrays [N, ...] sharded over the mesh.
    Worker-invariant fields of the state (``TrainState.worker_axes``: the
    step, the schedule's state, the counters) enter the device program once,
    unbatched, so the schedule's ``lax.cond`` predicate stays one scalar and
    remains a branch: a step that does not sync runs no collective (under
    ``vmap`` a batched predicate would turn the cond into a select that runs
    both branches). ``step`` names the layout's axes in its collectives
    (``layout.axes``).

    Shard_map's varying-axes check is off (``check_vma=False``): the averaged
    and the local branch of the cond differ in which axes they vary over, and
    mean over vmapped and mesh axes together is not expressible under it.
    """
    layout = as_layout(where)
    spec, k = worker_spec(layout.mesh), layout.workers_per_device
    levels = layout.vmap_axes or ((None, 1),)  # with one worker per device, vmap the unit axis away
    sizes = tuple(size for _, size in levels)

    def per_device(state, batch):
        # The unit (or K) axis is vmapped away rather than indexed away: with
        # x[0] / x[None] around the step, XLA (CPU at least) can no longer
        # update the donated parameters and optimizer state in place.
        axes = (_in_axes(state), 0)
        def block(a, subtree):  # [K, ...] -> [...] (invariant) or [K1, K2, ..., ...] (per worker)
            return jax.tree.map(lambda x: x[0] if a is None else x.reshape(sizes + x.shape[1:]), subtree)

        mapped = jax.tree.map(block, axes, (state, batch), is_leaf=lambda a: a is None)
        fn = step
        for name, _ in reversed(levels):
            fn = jax.vmap(fn, in_axes=axes, out_axes=0, axis_name=name)
        out = fn(*mapped)
        return jax.tree.map(lambda x: x.reshape((k,) + x.shape[len(sizes):]), out)

    per_device.__name__ = getattr(step, "__name__", "step")  # jax's compile logs and events name the step

    mapped = jax.shard_map(per_device, mesh=layout.mesh, in_specs=(spec, spec), out_specs=spec, check_vma=False)
    compiled = jax.jit(mapped, donate_argnums=(0,) if donate_state else ())
    return _checked(compiled, layout.num_workers)
