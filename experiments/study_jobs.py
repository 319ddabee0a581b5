"""The study's side of ``--executor submitit`` (experiments/executor.py): its flags checked, the grid's
unfinished runs as jobs, their progress, and one line per finished run."""

from __future__ import annotations

import argparse
import os
import sys

from experiments.study_grid import Grid, StudyError, positive_int, setting_argv


def finished_line(run_dir: str, before: bool = False) -> str:
    """One line for a finished run: its setting, method and seed, final training loss and time
    (``before``: finished before this study started)."""
    from experiments import results
    from experiments.resume import from_saved

    summary = results.read_json(os.path.join(run_dir, results.SUMMARY))
    config = from_saved(summary["config"])
    took = "finished before" if before else f"{summary['wall_clock_s']:.1f} s"
    return (f"{os.path.basename(os.path.dirname(run_dir))} {config.label} seed {config.seed}: final loss "
            f"{summary['final_train_loss']:.4f}, {took}")


def pending_jobs(grid: Grid, planned: list, out: str) -> tuple:
    """(jobs, finished): a ``executor.RunJob`` for every run of the grid without its summary, and the
    folders of those with one. StudyError for a finished run whose config is not the grid's."""
    from experiments import executor, results
    from experiments.resume import config_differences

    jobs, finished = [], []
    for setting, configs, options in planned:
        for config in configs:
            folder = os.path.join(options.out, results.run_name(config.label, config.seed))
            if os.path.isfile(os.path.join(folder, results.SUMMARY)):
                diffs = config_differences(results.read_json(os.path.join(folder, results.SUMMARY))["config"],
                                               config)
                if diffs:
                    raise StudyError(f"{folder} finished with another configuration ({'; '.join(diffs)}): "
                                     "move it away or give another --out")
                finished.append(folder)
                continue
            os.makedirs(options.out, exist_ok=True)  # --resume continues, or starts, a run in a folder that exists
            argv = setting_argv(grid, setting, out, [config.method], [config.seed]) + ["--resume"]
            jobs.append(executor.RunJob(folder, tuple(argv), grid.processes))
    return jobs, finished


def submit(grid: Grid, planned: list, args: argparse.Namespace) -> list:
    """Every unfinished run as a submitit job (experiments/executor.py), a progress bar with the jobs'
    counts and one line per finished run; returns the runs that failed for good."""
    from tqdm import tqdm

    from experiments import executor

    jobs, finished = pending_jobs(grid, planned, args.out)
    resources = executor.Resources(**{**grid.resources, **{k: v for k, v in resource_flags(args).items()
                                                           if v is not None}})
    engine = executor.make_executor(args.out, args.cluster)
    with tqdm(total=len(jobs) + len(finished), initial=len(finished), disable=args.quiet, unit="run",
              desc=f"study ({engine.cluster})") as bar:
        for folder in finished:
            bar.write(finished_line(folder, before=True), file=sys.stdout)

        def done(job):
            bar.write(finished_line(job.name), file=sys.stdout)
            bar.update(1)

        return executor.execute(jobs, engine, resources, retries=args.retries, max_jobs=args.max_jobs,
                                on_done=done, on_counts=lambda counts: bar.set_postfix(counts))


def resource_flags(args: argparse.Namespace) -> dict:
    return {"gpus": args.gpus, "cpus": args.cpus, "time_min": args.time_min, "partition": args.slurm_partition,
            "tasks_per_node": args.tasks_per_node}


def check_job_flags(args: argparse.Namespace, grid: Grid) -> Grid:
    """``grid`` with ``--processes``, the --executor flags refused in one line naming the flag when bad,
    before anything runs."""
    for flag, value in (("--retries", args.retries), ("--max-jobs", args.max_jobs)):
        if value < 0:
            raise StudyError(f"{flag} must be >= 0, got {value}")
    for key, value in resource_flags(args).items():
        if value is not None and key != "partition" and (value < 0 if key == "gpus" else value < 1):
            raise StudyError(f"--{key.replace('_', '-')} must be >= {0 if key == 'gpus' else 1}, got {value}")
    if args.processes is not None:
        grid = grid._replace(processes=positive_int(args.processes, "--processes"))
    if args.executor == "local" and grid.processes > 1:
        raise StudyError(f"a run of {grid.processes} processes needs --executor submitit (one job of that "
                         "many tasks); --executor local runs one process")
    return grid
