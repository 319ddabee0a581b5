"""A run's set-up, checked before anything compiles: ``prepare(config) -> Setup``.

Everything that decides a run is in its ``Config``; every check of the
config against this machine (devices, processes), the data and (with
``--resume``) the saved run happens here, raising ``ConfigError`` with the
flag named.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from typing import Any, Optional

import jax

from adpsgd_jax import distributed, loops, schedules
from experiments import checkpoint, data, methods, models, results
from experiments.config import Config, ConfigError, RunOptions, default_cpu_devices
from experiments.datasets import parse_partition
from experiments.loader import TrainLoader
from experiments.resume import CHANGED_MEANING, config_differences, former_defaults


@dataclasses.dataclass
class Setup:
    """Everything a run needs, built and checked before compilation."""

    config: Config
    dataset: data.Dataset
    loader: TrainLoader
    layout: distributed.Layout  # the devices and the workers on each
    total_steps: int
    lr_fn: Any
    schedule: Optional[schedules.Schedule]
    run_dir: str
    resume_from: Optional[int] = None  # checkpoint step to continue from
    finished: bool = False  # --resume found this run complete: nothing to do


def default_devices(config: Config, available: list) -> int:
    """Devices that carry the workers when --devices is not given:
    accelerators, the most of the available devices that divides the workers
    (and is whole per process); CPU, ``config.default_cpu_devices``."""
    if available[0].platform == "cpu":
        return min(default_cpu_devices(config.workers, jax.process_count()), len(available))
    return default_cpu_devices(config.workers, jax.process_count(), limit=len(available))


def _layout(config: Config, available: list) -> distributed.Layout:
    """The run's layout: --workers over --devices, flat or in groups."""
    count = config.devices or default_devices(config, available)
    if count > len(available):
        raise ConfigError(
            f"--devices {count} is more than the {len(available)} {available[0].platform.upper()} device(s) visible "
            "(on CPU the CLI makes --devices virtual devices only when jax has not started yet)")
    if config.workers % count:
        raise ConfigError(f"--devices {count} must divide --workers {config.workers} (accepted: "
                          f"{', '.join(str(d) for d in range(1, len(available) + 1) if config.workers % d == 0)})")
    if (count // jax.process_count()) * jax.process_count() != count:
        raise ConfigError(f"--devices {count} must be a multiple of the {jax.process_count()} processes")
    try:
        layout = distributed.workers(config.workers, available[:count], group_size=methods.group_size(config))
    except ValueError as err:
        raise ConfigError(f"--group-size: {err}") from None
    grid = layout.mesh.devices
    if config.group_size == "host" and grid.ndim == 2 and any(len({d.process_index for d in row}) > 1 for row in grid):
        raise ConfigError("--group-size host: the devices are not ordered process by process; give a number instead")
    return layout


def loop_named(name) -> loops.Loop:
    """The ``loops.Loop`` a --worker-loop name stands for: "vmap", "map", "unroll" or a chunk size."""
    named = {loop.name: loop for loop in (loops.VMAP, loops.MAP, loops.UNROLL)}
    text = str(name)
    if text in named:
        return named[text]
    if text.isdigit() and int(text) >= 1:
        return loops.chunks(int(text))
    raise ValueError(f"loop {name!r} is unknown; accepted values: {', '.join(named)}, or a chunk size >= 1")


def worker_loop(config: Config, dataset: data.Dataset, layout: distributed.Layout) -> distributed.Layout:
    """``layout`` with the run's worker loop: --worker-loop, or for ``auto`` ``loops.choose`` of
    the run's loss on one worker's batch (traced on shapes only, nothing compiled)."""
    k = layout.workers_per_device
    if k == 1:
        return layout
    if config.worker_loop == "auto":
        model, loss_fn, _ = methods.model_fns(config, dataset)
        shape = dataset.train_images.shape[1:]
        params, model_state = jax.eval_shape(lambda key: models.init(model, key, shape), jax.random.PRNGKey(0))
        batch = {"image": jax.ShapeDtypeStruct((config.batch_size,) + shape, dataset.train_images.dtype),
                 "label": jax.ShapeDtypeStruct((config.batch_size,), dataset.train_labels.dtype)}
        loop = loops.choose(loss_fn, params, model_state, batch, jax.random.PRNGKey(0),
                            platform=layout.mesh.devices.flat[0].platform)
    else:
        loop = loop_named(config.worker_loop)
    if loop.size > k:
        raise ConfigError(f"--worker-loop {config.worker_loop}: a chunk size must be in [1, {k}] (the workers per "
                          f"device) or one of vmap, map, unroll")
    return layout._replace(loop=loops.check(loop, k))


def _resume_point(config: Config, run_dir: str) -> tuple[Optional[int], bool]:
    """(checkpoint step, finished) of a run to resume; (None, False) when it starts from step 0.

    A run with no complete checkpoint (it never started, was killed before or during its first save,
    or its checkpoints were deleted) starts over, saying so in one line: a preempted job requeued with
    the same command then simply starts again. ConfigError when the run folder's config.json differs
    from ``config`` or cannot be read, whatever the checkpoints.
    """
    if not os.path.isdir(run_dir):
        return None, False  # never started: it starts now
    name = os.path.basename(run_dir)
    config_path, saved = os.path.join(run_dir, results.CONFIG), None
    if os.path.exists(config_path):  # written when the run starts; missing only if it was killed right then
        try:
            saved = results.read_json(config_path)
        except (OSError, ValueError) as err:
            raise ConfigError(f"--resume: {run_dir} has no readable {results.CONFIG} ({err}); "
                              "drop --resume to start the run over") from None
        diffs = config_differences(saved, config)
        if diffs:
            advice = ("This version cannot continue it: start it over in another --out"
                      if any(CHANGED_MEANING in d for d in diffs) else "Use the same flags, or another --out")
            raise ConfigError(f"--resume refused for {name}: the configuration differs from the checkpointed run in "
                              f"{'; '.join(diffs)}. {advice}")
        if os.path.isfile(os.path.join(run_dir, results.SUMMARY)):
            return None, True
    try:
        step = checkpoint.check_resumable(run_dir)
    except checkpoint.CheckpointError as err:
        if jax.process_index() == 0:
            print(f"--resume: {name} has {err}: starting it from step 0", file=sys.stderr, flush=True)
        return None, False
    if saved is None:
        raise ConfigError(f"--resume: {run_dir} has checkpoints but no {results.CONFIG} to compare the flags with; "
                          "drop --resume to start the run over")
    return step, False


def _saved_defaults(config: Config, run_dir: str) -> Config:
    """``config`` with the former defaults that the saved run in ``run_dir`` trained with (said in one
    line); ``config`` itself when there is none, or no readable config.json (``_resume_point`` says so)."""
    try:
        saved = results.read_json(os.path.join(run_dir, results.CONFIG))
    except (OSError, ValueError):
        return config
    kept = former_defaults(saved, config)
    if kept and jax.process_index() == 0:
        print(f"--resume: {os.path.basename(run_dir)} continues with {', '.join(f'{k} {v}' for k, v in kept.items())}, "
              f"the default of {config.model} on {config.dataset} when it was saved", file=sys.stderr, flush=True)
    return config.replace(**kept)


def prepare(config: Config, dataset: Optional[data.Dataset] = None, options: RunOptions = RunOptions()) -> Setup:
    """Check the config against the devices, the data and (with ``--resume``)
    the saved run; build loader, layout and schedule.

    Raises ConfigError (flag named) or sources.DataUnavailableError; compiles nothing. A run resumed
    without a flag whose default changed since it was saved continues with the default it was saved
    with (``resume.former_defaults``), so ``setup.config`` may differ from ``config`` there.
    """
    run_dir = os.path.join(options.out, results.run_name(config.label, config.seed))
    if options.resume:
        config = _saved_defaults(config, run_dir)
    layout = _layout(config, jax.devices())  # every process's devices in a multi-process run
    try:
        scheme = parse_partition(config.partition)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    if dataset is None:
        dataset = data.load(config.dataset, config.data_dir, synthetic_size=config.synthetic_size,
                            augment=config.augment)
    layout = worker_loop(config, dataset, layout)
    try:
        shards = data.partition(dataset.train_labels, config.workers, scheme, config.seed, min_size=config.batch_size)
        loader = TrainLoader(dataset, shards, config.batch_size, config.seed,
                             workers=distributed.local_workers(layout))
    except ValueError as err:
        raise ConfigError(str(err)) from None
    total = config.epochs * loader.steps_per_epoch
    if total < config.avg_period:
        raise ConfigError(f"--avg-period must be in [1, {total}] (the run's steps), got {config.avg_period}")
    lr_fn = methods.lr_schedule(config, loader.steps_per_epoch, total)
    try:
        schedule = methods.make_schedule(config, total, loader.steps_per_epoch, lr_fn)
    except ConfigError:  # a plug-in schedule's refusal names its flag already
        raise
    except ValueError as err:
        raise ConfigError(f"{config.method}: {err}") from None
    resume_from, finished = _resume_point(config, run_dir) if options.resume else (None, False)
    return Setup(config, dataset, loader, layout, total, lr_fn, schedule, run_dir, resume_from, finished)
