"""A study: ``python -m experiments.study [--preset offline | --grid FILE] [--out DIR]``.

Runs a grid of methods x data partitions x learning-rate schedules x
worker counts x seeds at one communication budget, then writes one table
(``study.md``, ``study.json``) comparing every method with the grid's
baseline (CPSGD by default) per setting, and ``loss_vs_bytes.png``.
``--baseline a,b,...`` writes one table per baseline instead:
``study.md`` for the grid's, ``study_vs_<baseline>.md`` / ``.json`` for the
others (experiments/study_report.py: the tests and the correction), e.g.
``--report-only --baseline cpsgd,lr_proportional,adpsgd``.

A setting is one (partition, lr schedule, workers) triple; its runs are
``experiments.cifar`` runs (every method, every seed) in ``OUT/<setting>/``.
The study is resumable: finished runs (those with a summary.json and the
same config) are skipped, an interrupted run continues from its checkpoint,
so a killed study restarted with the same command loses at most what it had
not checkpointed. Every setting's flags are checked before the first run
starts; a grid with a bad value stops with one line naming it.

A grid file is TOML (every key optional except ``methods``; the preset is
the example)::

    dataset = "digits"
    methods = ["cpsgd", "adpsgd", "lr_proportional"]
    baseline = "cpsgd"          # one of methods; every other method is compared with it
    partitions = ["iid", "dirichlet:0.5"]
    lr_schedules = ["step", "cosine"]
    workers = [8, 32]
    seeds = 5                   # seeds 0 .. 4, or a list of seeds
    total_batch = 128           # examples per step over all workers (batch per worker = total_batch / workers)
    args = ["--avg-period", "8"]   # any other experiments.cifar flags, the same for every setting
    fragments = [1, 2, 4]       # streaming averaging, per setting: --fragments P (default [1])
    fragment_delays = [0, 1]    # --fragment-delay per setting (default [0])
    fragment_alphas = [0.0]     # --fragment-alpha per setting (default [0.0])

``total_batch`` keeps the examples per step, hence the steps and the
learning-rate schedule, the same at every worker count; the budget
(``--avg-period``) is then the same number of syncs in every setting. The
fragment keys multiply the settings too (``-frag2-delay1`` in their names):
every P and tau of the grid at the same total bytes (docs/fragments.md).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import tomllib
from typing import NamedTuple

from experiments.executor import CLUSTERS, EXECUTORS
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
CACHE = ".jax_cache"  # under --out
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


def plan(grid: Grid, out: str) -> list:
    """[(setting, configs, options)] for every setting, every flag checked (no jax, nothing written).
    A run of several processes is checked as its process 0 (the executor gives each its id)."""
    from experiments import translate
    from experiments.config import ConfigError, cpu_devices_per_process
    from experiments.flags import parser

    planned = []
    joined = ["--coordinator", "127.0.0.1:1", "--num-processes", str(grid.processes), "--process-id", "0"]
    for setting in grid.settings:
        argv = setting_argv(grid, setting, out) + (joined if grid.processes > 1 else [])
        try:
            configs, options = translate.from_args(parser().parse_args(argv))
        except ConfigError as err:
            raise StudyError(f"setting {setting.name}: {err}") from None
        planned.append((setting, configs, dataclasses.replace(options, resume=True)))
    devices = {cpu_devices_per_process(configs[0]) for _, configs, _ in planned}
    if len(devices) > 1:
        raise StudyError(f"the settings need different CPU device counts ({sorted(devices)}); give one "
                         "'--devices D' in the grid's args that divides every worker count")
    return planned


def _start(planned: list):
    """jax on the devices the grid needs; the data set."""
    from experiments import cifar, data

    first = planned[0][1][0]
    cifar.request_cpu_devices(first, planned[0][2])
    return data.load(first.dataset, first.data_dir, synthetic_size=first.synthetic_size, augment=first.augment)


def check_runs(planned: list, dataset) -> None:
    """Set up (compile nothing, write nothing) one run of every method in every setting, so that a
    setting or a schedule of one's own that ``prepare`` refuses stops the study before any run trains.
    ConfigError as ``prepare`` raises it."""
    from experiments.setup import prepare

    for _, configs, options in planned:
        for config in {c.method: c for c in reversed(configs)}.values():  # each method's first seed
            prepare(config, dataset, dataclasses.replace(options, resume=False))


def run(planned: list, progress: bool = True) -> None:
    """Train every run of every setting that is not finished yet (one process, data loaded once), each
    method of each setting checked first (``check_runs``).

    Raises what ``train.train_and_evaluate`` raises (``train.Interrupted`` after a checkpoint on SIGTERM /
    SIGINT, ``train.NonFiniteError``) and ConfigError when a saved run's config differs from the grid's."""
    from tqdm import tqdm

    from experiments import results, train
    from experiments.setup import prepare
    from experiments.study_jobs import finished_line

    import jax

    dataset = _start(planned)
    check_runs(planned, dataset)
    # The seeds of a setting compile the same programs (keys and data are inputs): XLA's persistent cache
    # compiles each once. It changes no result, only the time to the first step.
    jax.config.update("jax_compilation_cache_dir", os.path.join(os.path.dirname(planned[0][2].out), CACHE))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    total = sum(len(configs) for _, configs, _ in planned)
    with tqdm(total=total, disable=not progress, unit="run", desc="study") as bar:
        for setting, configs, options in planned:
            os.makedirs(options.out, exist_ok=True)
            for config in configs:
                setup = prepare(config, dataset, options)
                done = setup.finished
                train.train_and_evaluate(setup, options)
                run_dir = os.path.join(options.out, results.run_name(config.label, config.seed))
                bar.write(finished_line(run_dir, before=done), file=sys.stdout)
                bar.update(1)


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


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m experiments.study", description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="offline", choices=sorted(PRESETS), help="the grid to run (default offline)")
    p.add_argument("--grid", help="a TOML grid file instead of the preset (keys: " + ", ".join(GRID_KEYS) + ")")
    p.add_argument("--seeds", type=int, help="override the grid's seeds with 0 .. N-1")
    p.add_argument("--baseline", help="the baselines to write tables against, comma-separated (each one of "
                                      "the grid's methods; default the grid's baseline): study.md for the "
                                      "grid's, study_vs_<baseline>.md / .json for the others")
    p.add_argument("--out", default="results/study", help="output folder (default results/study)")
    p.add_argument("--report-only", action="store_true", help="only write the table from the finished runs")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    jobs = p.add_argument_group("cluster jobs (--executor submitit, experiments/executor.py)")
    jobs.add_argument("--executor", default="local", choices=EXECUTORS,
                      help="local: every run in this process, one after another (default); submitit: one job "
                           "per run on a SLURM cluster, or local processes (--cluster)")
    jobs.add_argument("--cluster", default="auto", choices=CLUSTERS,
                      help="submitit's cluster: auto (SLURM where it is installed, else local; default), "
                           "slurm, or local processes")
    jobs.add_argument("--retries", type=int, default=2,
                      help="submit a run again this many times after a failed or killed job (default 2); it "
                           "continues from its checkpoint")
    jobs.add_argument("--max-jobs", type=int, default=0,
                      help="at most this many jobs unfinished at once (default 0: every run at once)")
    jobs.add_argument("--processes", type=int,
                      help="processes of each run, one job of that many tasks (jax.distributed; overrides "
                           "the grid's 'processes', default 1)")
    jobs.add_argument("--gpus", type=int, help="GPUs per node of each job (grid: resources.gpus; default 0)")
    jobs.add_argument("--cpus", type=int, help="CPUs per task (grid: resources.cpus; default 1)")
    jobs.add_argument("--time-min", type=int, help="time limit of one attempt in minutes (grid: "
                                                   "resources.time_min; default 60)")
    jobs.add_argument("--slurm-partition", help="SLURM partition (grid: resources.partition; default the "
                                                "cluster's)")
    jobs.add_argument("--tasks-per-node", type=int, help="processes of a multi-process run per node (grid: "
                                                         "resources.tasks_per_node; default 1)")
    return p


def baseline_list(flag, grid: Grid) -> list:
    """The baselines of ``--baseline a,b,...`` (default: the grid's), each checked against the grid's methods."""
    if flag is None:
        return [grid.baseline]
    names = [b.strip() for b in flag.split(",") if b.strip()]
    if not names:
        raise StudyError("--baseline needs one or more of the grid's methods, comma-separated")
    for name in names:
        if name not in grid.methods:
            raise StudyError(f"--baseline {name!r} must be one of the grid's methods ({', '.join(grid.methods)})")
    return list(dict.fromkeys(names))


def main(argv=None) -> int:
    from experiments import study_report, study_streaming
    from experiments.study_jobs import check_job_flags, submit

    p = parser()
    args = p.parse_args(argv)
    try:
        grid = dict(load_grid(args))
        if args.seeds is not None:
            if args.seeds < 1:
                raise StudyError(f"--seeds must be >= 1, got {args.seeds}")
            grid["seeds"] = args.seeds
        parsed = check_job_flags(args, parse_grid(grid))
        baselines = baseline_list(args.baseline, parsed)
        planned = plan(parsed, args.out)
    except StudyError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    from experiments.config import ConfigError
    from experiments.sources import DataUnavailableError

    failures = []
    try:
        if args.executor == "submitit" and not args.report_only:
            if any(is_plugin(m) for m in parsed.methods):  # a schedule of one's own is checked here, once
                check_runs(planned, _start(planned))
            failures = submit(parsed, planned, args)
    except (StudyError, ConfigError, DataUnavailableError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for failure in failures:
        print(f"failed: {failure.job.name} after {failure.attempts} attempt{'s' if failure.attempts > 1 else ''} "
              f"({failure.reason}); log: {failure.log}", file=sys.stderr)
    if not args.report_only and args.executor == "local":
        from experiments import train

        try:
            run(planned, progress=not args.quiet)
        except (ConfigError, DataUnavailableError) as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        except train.NonFiniteError as err:
            print(f"error: {err}", file=sys.stderr)
            return 3
        except train.Interrupted as err:
            print(f"stopped: {err}; the same command continues the study", file=sys.stderr)
            return 128 + err.signum
    for index, baseline in enumerate(baselines):
        print(study_report.write(parsed, args.out, plots=index == 0, baseline=baseline))
    streamed = study_streaming.write(parsed, args.out)
    if streamed:
        print(streamed)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
