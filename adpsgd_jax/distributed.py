"""Placing workers on devices: jax.distributed start-up, meshes,
replication, batch sharding, and the pmap / shard_map wrappers of a
per-device step.

One worker is one device along a named mesh axis, across every process of a
multi-host run. Per-worker values (the train state, the batch) carry a
leading axis of size N = number of workers, sharded along that axis, exactly
as ``jax.pmap`` returns them, so the first call and every later call see the
same input sharding and nothing retraces. In a multi-process run these are
global arrays: each process holds the rows of its own devices.

Two-level averaging uses a 2-D mesh ("group", "local") of G groups of L
workers (``group_mesh``). Per-worker arrays keep their one leading axis of
N = G * L rows, sharded over both mesh axes (PartitionSpec(("group",
"local"))): worker n = g * L + l is row n, as on the 1-D mesh.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P


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


def local_workers(mesh: Mesh) -> list[int]:
    """Indices (positions along the mesh axis) of this process's workers."""
    return [i for i, d in enumerate(mesh.devices.flat) if d.process_index == jax.process_index()]


def _local_devices(mesh: Mesh) -> list:
    """This process's devices of the mesh, in worker order."""
    return [mesh.devices.flat[i] for i in local_workers(mesh)]


def local_rows(x: jax.Array) -> np.ndarray:
    """This process's rows of a per-worker array [N, ...], in worker order."""
    shards = sorted(x.addressable_shards, key=lambda s: s.index[0].start or 0)
    return np.concatenate([np.asarray(s.data) for s in shards])


def worker_mesh(axis_name: str = "batch", devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
    """A 1-D mesh of ``devices`` (default: every device of every process)."""
    devices = jax.devices() if devices is None else list(devices)
    return Mesh(np.asarray(devices), (axis_name,))


def group_mesh(group_size: int, devices: Optional[Sequence[jax.Device]] = None,
               axis_names: tuple[str, str] = ("group", "local")) -> Mesh:
    """A 2-D mesh [G, L] of ``devices`` for two-level averaging: G = N / L groups
    of L = ``group_size`` consecutive devices (default: every device).

    With ``jax.devices()`` ordered process by process, L = devices per process
    makes each group one host. Raises ValueError unless L divides N.
    """
    devices = jax.devices() if devices is None else list(devices)
    n = len(devices)
    if isinstance(group_size, bool) or int(group_size) != group_size or group_size < 1 or n % group_size:
        raise ValueError(f"group_size must be an integer >= 1 that divides the number of devices ({n}), "
                         f"got {group_size!r}")
    return Mesh(np.asarray(devices).reshape(n // group_size, group_size), tuple(axis_names))


def worker_spec(mesh: Mesh) -> P:
    """PartitionSpec of a per-worker array: the leading axis split over every mesh axis."""
    names = tuple(mesh.axis_names)
    return P(names[0] if len(names) == 1 else names)


def worker_sharding(mesh: Mesh) -> NamedSharding:
    """Sharding of a per-worker array: leading axis split over the mesh axes."""
    return NamedSharding(mesh, worker_spec(mesh))


def replicate(tree: Any, mesh: Mesh) -> Any:
    """Copy every leaf of ``tree`` onto each worker: [...] -> [N, ...].

    Each process supplies the copies on its own devices, so this also builds
    global arrays in a multi-process run.
    """
    sharding = worker_sharding(mesh)
    local = _local_devices(mesh)
    n = mesh.devices.size

    def put(x):
        x = np.asarray(x) if not isinstance(x, jax.Array) else x
        shards = [jax.device_put(x[None], d) for d in local]
        return jax.make_array_from_single_device_arrays((n,) + tuple(x.shape), sharding, shards)

    return jax.tree.map(put, tree)


def shard_local_batch(batch: Any, mesh: Mesh) -> Any:
    """Put this process's rows [L, per_device, ...] (L = its workers, in
    ``local_workers`` order) onto its devices as global arrays [N, ...]."""
    devices = _local_devices(mesh)
    check_leading_dim(batch, len(devices), what="local batch")
    sharding, n = worker_sharding(mesh), mesh.devices.size

    def put(x):
        x = np.asarray(x)
        rows = [jax.device_put(x[j : j + 1], d) for j, d in enumerate(devices)]
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
                f"devices ({num_workers}); lay the batch out as [{num_workers}, per_device_batch, ...] "
                f"(adpsgd_jax.distributed.shard_batch)"
            )


def shard_batch(batch: Any, mesh: Mesh) -> Any:
    """Put a host batch laid out [N, per_device, ...] onto the workers.

    Raises ValueError naming the leaf when the leading dimension is not N.
    In a multi-process run each process passes the full global batch and
    only its own devices' rows are transferred.
    """
    n = mesh.devices.size
    check_leading_dim(batch, n)
    sharding = worker_sharding(mesh)

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


def pmap_step(step: Callable, mesh: Mesh, donate_state: bool = True) -> Callable:
    """``jax.pmap`` a per-device ``step(state, batch)`` over the mesh's axis.

    The returned function checks, before dispatching (and so before the
    first compilation), that state and batch have leading dimension N.
    ``.compiled`` is the raw pmapped function.

    Read a step's outputs (e.g. its metrics) within a few steps of
    dispatching it: on many virtual CPU devices, hundreds of steps in flight
    can stall XLA's CPU all-reduce ("Expected N threads ... arrived").
    """
    if mesh.devices.ndim != 1:
        raise ValueError(f"pmap_step maps one axis; the mesh has axes {mesh.axis_names}: use shard_map_step")
    devices = list(mesh.devices.flat)
    compiled = jax.pmap(step, axis_name=mesh.axis_names[0], devices=devices,
                        donate_argnums=(0,) if donate_state else ())
    return _checked(compiled, len(devices))


def shard_map_step(step: Callable, mesh: Mesh, donate_state: bool = True) -> Callable:
    """The same per-device ``step`` under ``jax.jit(jax.shard_map(...))``.

    Each shard sees its block [1, ...]; the wrapper hides that unit axis so
    ``step`` sees exactly what it sees under ``pmap``. Inputs
    and outputs are per-worker arrays [N, ...] sharded along the axis (both
    axes of a ``group_mesh``, whose collectives ``step`` names itself).
    """
    spec = worker_spec(mesh)

    def per_shard(state, batch):
        # The unit axis is vmapped away rather than indexed away: with x[0] /
        # x[None] around the step, XLA (CPU at least) can no longer update the
        # donated parameters and optimizer state in place and copies them every
        # step (+1.5 parameter copies of memory, ~25% of a small CNN's step).
        # Per-worker scalars ([1] blocks: step, schedule state, counters) go
        # in unbatched, so the schedule's lax.cond stays a branch, not a select.
        axes = jax.tree.map(lambda x: None if x.ndim <= 1 else 0, (state, batch))
        args = jax.tree.map(lambda x: x[0] if x.ndim <= 1 else x, (state, batch))
        return jax.vmap(step, in_axes=axes, out_axes=0)(*args)

    per_shard.__name__ = getattr(step, "__name__", "step")  # jax's compile logs and events name the step

    mapped = jax.shard_map(per_shard, mesh=mesh, in_specs=(spec, spec), out_specs=spec)
    compiled = jax.jit(mapped, donate_argnums=(0,) if donate_state else ())
    return _checked(compiled, mesh.devices.size)
