"""A study: ``python -m experiments.study [--preset offline | --grid FILE] [--out DIR]``.

Runs a grid of methods x data partitions x learning-rate schedules x
worker counts x seeds at one communication budget, then writes one table
(``study.md``, ``study.json``) comparing every method with the grid's
baseline (CPSGD by default) per setting, and ``loss_vs_bytes.png``.
``--baseline a,b,...`` writes one table per baseline instead:
``study.md`` for the grid's, ``study_vs_<baseline>.md`` / ``.json`` for the
others (experiments/study_report.py; the tests and the correction in experiments/paired_tests.py), e.g.
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

from experiments.executor import CLUSTERS, EXECUTORS
from experiments.names import is_plugin
from experiments.study_grid import GRID_KEYS, PRESETS, Grid, StudyError, load_grid, parse_grid, setting_argv

CACHE = ".jax_cache"  # under --out


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
