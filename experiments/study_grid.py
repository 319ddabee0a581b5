"""A study's grid: its TOML keys (``GRID_KEYS``) and the offline preset, checked and expanded into
settings (``parse_grid -> Grid``), and one setting's ``experiments.cifar`` flags (``setting_argv``).

The grid format is ``experiments.study``'s docstring; docs/schedule_study.md has examples.
"""

from __future__ import annotations

import argparse
import os
import tomllib
from typing import NamedTuple

from experiments.names import LR_SCHEDULES, METHODS, PLUGIN_FORM, is_plugin

# The offline preset: digits (ships with scikit-learn), the paper's budget (--avg-period 8), 330 steps a run.
PRESETS = {
    "offline": dict(
        dataset="digits",
        methods=["cpsgd", "adpsgd", "lr_proportional", "qsr", "trigger", "post_local", "allreduce", "adpsgd_trend"],
        baseline="cpsgd",
        partitions=["iid", "dirichlet:0.5", "dirichlet:0.1"],
        lr_schedules=["step", "cosine"],
        workers=[8, 32],
        seeds=5,
        total_batch=128,
        args=["--avg-period", "8"],
    ),
}
GRID_KEYS = ("dataset", "methods", "baseline", "partitions", "lr_schedules", "workers", "seeds", "total_batch",
             "batch_size", "args", "processes", "resources", "fragments", "fragment_delays", "fragment_alphas")
# Flags the grid sets itself, per setting: refused in ``args``.
GRID_FLAGS = ("--dataset", "--compare", "--strategy", "--schedule", "--partition", "--lr-schedule", "--workers",
              "--batch-size", "--seeds", "--seed", "--out", "--resume", "--quiet", "--no-plots", "--coordinator",
              "--num-processes", "--process-id", "--fragments", "--fragment-delay", "--fragment-alpha")
# A grid's [resources] table: what each job of --executor submitit asks for (experiments/executor.py).
RESOURCE_KEYS = ("gpus", "cpus", "time_min", "partition", "tasks_per_node")


class StudyError(ValueError):
    """A bad grid or flag; the message names the key and the accepted values."""


class Setting(NamedTuple):
    """One cell of the grid: every method and seed is run on it."""

    partition: str
    lr_schedule: str
    workers: int
    batch_size: int  # per worker
    fragments: int = 1  # streaming averaging's P, tau and alpha (--fragments, --fragment-delay, --fragment-alpha)
    fragment_delay: int = 0
    fragment_alpha: float = 0.0

    @property
    def name(self) -> str:
        """Folder name, e.g. ``dirichlet0.5-cosine-n32`` (``-frag4-delay1-alpha0.5`` where they are not 1, 0, 0)."""
        name = f"{self.partition.replace(':', '')}-{self.lr_schedule}-n{self.workers}"
        name += f"-frag{self.fragments}" if self.fragments != 1 else ""
        name += f"-delay{self.fragment_delay}" if self.fragment_delay else ""
        return name + (f"-alpha{self.fragment_alpha:g}" if self.fragment_alpha else "")

    @property
    def fragment_flags(self) -> list:
        """The experiments.cifar flags of the setting's streaming options (none at 1, 0, 0)."""
        flags = ["--fragments", str(self.fragments)] if self.fragments != 1 else []
        flags += ["--fragment-delay", str(self.fragment_delay)] if self.fragment_delay else []
        return flags + (["--fragment-alpha", repr(self.fragment_alpha)] if self.fragment_alpha else [])


class Grid(NamedTuple):
    dataset: str
    methods: tuple
    baseline: str
    settings: tuple  # of Setting
    seeds: tuple
    args: tuple
    processes: int = 1  # processes of each run (jax.distributed; --executor submitit only)
    resources: dict = {}  # the grid's [resources] table, checked (RESOURCE_KEYS)


def _list(grid: dict, key: str, kind: type, default=None) -> list:
    value = grid.get(key, default)
    if not isinstance(value, list) or not value or not all(isinstance(v, kind) and not isinstance(v, bool)
                                                           for v in value):
        raise StudyError(f"grid key {key!r} must be a non-empty list of {getattr(kind, '__name__', 'number')}s, got {value!r}")
    if len(set(value)) != len(value):
        raise StudyError(f"grid key {key!r} names a value twice: {value!r}")
    return value


def parse_grid(grid: dict) -> Grid:
    """Check a grid (a preset or a parsed TOML file) and expand its settings; StudyError names the bad key."""
    unknown = sorted(set(grid) - set(GRID_KEYS))
    if unknown:
        raise StudyError(f"unknown grid key(s) {', '.join(unknown)}; accepted keys: {', '.join(GRID_KEYS)}")
    methods = _list(grid, "methods", str)
    for m in methods:
        if m not in METHODS and not is_plugin(m):
            raise StudyError(f"grid key 'methods': unknown method {m!r}; accepted values: {', '.join(METHODS)}, "
                             f"or {PLUGIN_FORM} for a schedule of your own")
    baseline = grid.get("baseline", "cpsgd")
    if baseline not in methods:
        raise StudyError(f"grid key 'baseline' must be one of the grid's methods ({', '.join(methods)}), "
                         f"got {baseline!r}")
    partitions = _list(grid, "partitions", str, ["iid"])
    lr_schedules = _list(grid, "lr_schedules", str, ["step"])
    for s in lr_schedules:
        if s not in LR_SCHEDULES:
            raise StudyError(f"grid key 'lr_schedules': unknown schedule {s!r}; accepted values: "
                             f"{', '.join(LR_SCHEDULES)}")
    workers = _list(grid, "workers", int, [8])
    seeds = grid.get("seeds", 5)
    if isinstance(seeds, int) and not isinstance(seeds, bool):
        if seeds < 1:
            raise StudyError(f"grid key 'seeds' must be a count >= 1 or a list of seeds, got {seeds!r}")
        seeds = list(range(seeds))
    seeds = _list({"seeds": seeds}, "seeds", int)
    if "total_batch" in grid and "batch_size" in grid:
        raise StudyError("give one of grid keys 'total_batch' (examples per step over all workers) and "
                         "'batch_size' (per worker), not both")
    batches = {}
    for n in workers:
        if n < 1:
            raise StudyError(f"grid key 'workers' takes counts >= 1, got {n}")
        if "batch_size" in grid:
            size = grid["batch_size"]
            if isinstance(size, bool) or not isinstance(size, int) or size < 1:
                raise StudyError(f"grid key 'batch_size' must be an integer >= 1 (per worker), got {size!r}")
            batches[n] = size
        else:
            total = grid.get("total_batch", 128)
            if isinstance(total, bool) or not isinstance(total, int) or total < n or total % n:
                raise StudyError(f"grid key 'total_batch' must be a multiple of every worker count "
                                 f"({', '.join(map(str, workers))}), got {total!r}")
            batches[n] = total // n
    args = grid.get("args", [])
    if not isinstance(args, list) or not all(isinstance(a, str) for a in args):
        raise StudyError(f"grid key 'args' must be a list of strings (experiments.cifar flags), got {args!r}")
    clash = sorted({a.split("=")[0] for a in args} & set(GRID_FLAGS))
    if clash:
        raise StudyError(f"grid key 'args' must not set {', '.join(clash)}: the grid sets them per setting "
                         f"(keys {', '.join(GRID_KEYS[:-1])})")
    dataset = grid.get("dataset", "digits")
    if not isinstance(dataset, str):
        raise StudyError(f"grid key 'dataset' must be a string, got {dataset!r}")
    streams = _fragment_keys(grid)
    settings = tuple(Setting(p, s, n, batches[n], *f) for p in partitions for s in lr_schedules for n in workers
                     for f in streams)
    return Grid(dataset, tuple(methods), baseline, settings, tuple(seeds), tuple(args), *_job_keys(grid))


def _fragment_keys(grid: dict) -> list:
    """(P, tau, alpha) of every setting from the grid's ``fragments``, ``fragment_delays``, ``fragment_alphas``
    (their values are checked with the other flags, by ``plan``)."""
    counts = _list(grid, "fragments", int, [1])
    delays = _list(grid, "fragment_delays", int, [0])
    alphas = _list(grid, "fragment_alphas", (int, float), [0.0])
    return [(p, d, float(a)) for p in counts for d in delays for a in alphas]


def positive_int(value, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise StudyError(f"{what} must be an integer >= 1, got {value!r}")
    return value


def _job_keys(grid: dict) -> tuple:
    """The grid's ``processes`` and ``resources``, checked."""
    processes = positive_int(grid.get("processes", 1), "grid key 'processes'")
    resources = grid.get("resources", {})
    if not isinstance(resources, dict):
        raise StudyError(f"grid key 'resources' must be a table of {', '.join(RESOURCE_KEYS)}, got {resources!r}")
    unknown = sorted(set(resources) - set(RESOURCE_KEYS))
    if unknown:
        raise StudyError(f"grid key 'resources': unknown key(s) {', '.join(unknown)}; accepted keys: "
                         f"{', '.join(RESOURCE_KEYS)}")
    for key, value in resources.items():
        if key == "partition":
            if not isinstance(value, str) or not value:
                raise StudyError(f"grid key 'resources.partition' must be a SLURM partition's name, got {value!r}")
        elif key == "gpus" and value == 0 and not isinstance(value, bool):
            continue
        else:
            positive_int(value, f"grid key 'resources.{key}'")
    return processes, dict(resources)


def setting_argv(grid: Grid, setting: Setting, out: str, methods=None, seeds=None) -> list:
    """The experiments.cifar flags of one setting's runs (without --resume): every method and seed of
    the grid, or ``methods`` and ``seeds``."""
    return ["--dataset", grid.dataset, "--compare", ",".join(methods or grid.methods), "--partition",
            setting.partition, "--lr-schedule", setting.lr_schedule, "--workers", str(setting.workers),
            "--batch-size", str(setting.batch_size), "--seeds", ",".join(map(str, seeds or grid.seeds)), "--out",
            os.path.join(out, setting.name), "--quiet", "--no-plots", *setting.fragment_flags, *grid.args]


def load_grid(args: argparse.Namespace) -> dict:
    if args.grid is None:
        return PRESETS[args.preset]
    try:
        with open(args.grid, "rb") as f:
            return tomllib.load(f)
    except OSError as err:
        raise StudyError(f"--grid: cannot read {args.grid!r} ({err.strerror})") from None
    except tomllib.TOMLDecodeError as err:
        raise StudyError(f"--grid: {args.grid!r} is not valid TOML ({err})") from None
