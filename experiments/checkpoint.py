"""Checkpoints of a run with orbax: the whole TrainState and the run's position.

Replicas differ between syncs, so the state is saved as it lives on the
devices, with its leading worker axis: params, model state, optimizer
state, schedule state (ADPSGD's growth estimate, density scale, next sync),
step, rng and the communication counters of every replica. Beside it a JSON
item holds what the host needs to continue: the step (which fixes the data
position, since ``TrainLoader`` is a pure function of the step), the compute
time so far and the last logged metrics.

orbax writes each checkpoint into a temporary folder and renames it when
complete, so a crash during a save leaves the previous checkpoints intact;
the last ``keep`` are kept. Saves are synchronous: when ``save`` returns the
checkpoint is on disk.
"""

from __future__ import annotations

import os
from typing import Any, Optional

import jax
import orbax.checkpoint as ocp

FOLDER = "checkpoints"


class CheckpointError(RuntimeError):
    """A checkpoint folder that is missing, empty or unreadable."""


class RunCheckpoints:
    """The checkpoints of one run, in ``run_dir/checkpoints``."""

    def __init__(self, run_dir: str, keep: int = 3, create: bool = True):
        self.dir = os.path.abspath(os.path.join(run_dir, FOLDER))
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, enable_async_checkpointing=False, create=create, cleanup_tmp_directories=True
        )
        self._manager = ocp.CheckpointManager(self.dir, options=options)

    def save(self, step: int, state: Any, meta: dict) -> None:
        """Write checkpoint ``step`` (state pytree of sharded arrays, JSON-able meta)."""
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
        self._manager.save(step, args=args, force=True)
        self._manager.wait_until_finished()

    def latest_step(self) -> Optional[int]:
        return self._manager.latest_step()

    def restore(self, like: Any, step: Optional[int] = None) -> tuple[Any, dict]:
        """Restore ``step`` (default: the latest) into arrays shaped and sharded like ``like``."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise CheckpointError(f"no checkpoint in {self.dir}")
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), like)
        args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore())
        try:
            restored = self._manager.restore(step, args=args)
        except Exception as err:  # orbax raises many types for unreadable files
            raise CheckpointError(f"checkpoint {step} in {self.dir} cannot be read: {type(err).__name__}: {err}") from err
        return restored.state, restored.meta

    def close(self) -> None:
        self._manager.close()


def check_resumable(run_dir: str) -> int:
    """The latest step of a run's checkpoints, or CheckpointError saying why there is none.

    Reads only the folder listing and metadata; restoring happens later.
    """
    folder = os.path.join(run_dir, FOLDER)
    if not os.path.isdir(folder):
        raise CheckpointError(f"no checkpoint folder ({folder})")
    manager = RunCheckpoints(run_dir, create=False)
    try:
        step = manager.latest_step()
    finally:
        manager.close()
    if step is None:
        raise CheckpointError(f"no complete checkpoint (in {folder})")
    return step
