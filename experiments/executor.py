"""A study's runs as cluster jobs, through submitit: one job per run.

``python -m experiments.study ... --executor submitit`` submits every run of
the grid that has not finished as its own job: the run's own
``experiments.cifar`` command (one method, one seed, ``--resume``), with the
per-job resources of ``Resources``. submitit is the engine: on a machine with
SLURM it writes and submits ``sbatch`` scripts, elsewhere (``--cluster local``)
it runs each job as a local process with the same interface, which is what
the tests use. It is chosen because SLURM is what research clusters run, and
submitit is how the field's codebases (hydra's launcher, fairseq, detectron2,
dora) submit Python work to it; it needs no server of its own.

The study's folder layout is the ledger. A run with a summary.json and the
grid's config is finished and not submitted again; one that differs stops the
study before anything is submitted. A job that ends without its summary
(killed, preempted, timed out, or a failure) is submitted again up to
``retries`` times; with ``--resume`` it continues from its last checkpoint,
so a retried run ends as an uninterrupted one would. A run that fails for
good is reported in one line with its log's path while the others finish.

A run of several processes (``processes`` > 1: one training run over several
hosts through ``jax.distributed``) is one job of that many tasks. On SLURM
each task finds its process id and the coordinator itself (``--coordinator
auto``: jax reads the SLURM variables); on the local cluster they are given
explicitly (``--coordinator 127.0.0.1:PORT --num-processes P --process-id
RANK``), the port derived from the job id.

This module imports neither jax nor submitit at import time: a job imports
what its run needs, in its own process.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Callable, NamedTuple, Optional

EXECUTORS = ("local", "submitit")  # local: every run in this process, one after another (study.run)
CLUSTERS = ("auto", "slurm", "local")  # submitit's: auto is SLURM where sbatch exists, else local processes
FOLDER = ".submitit"  # under the study's --out: the jobs' scripts, pickles and logs
POLL_S = 2.0


class Resources(NamedTuple):
    """What each job asks the cluster for (submitit's parameter names in brackets)."""

    gpus: int = 0  # GPUs per node (gpus_per_node)
    cpus: int = 1  # CPUs per task (cpus_per_task)
    time_min: int = 60  # wall-clock limit of one attempt (timeout_min)
    partition: Optional[str] = None  # SLURM partition (slurm_partition); None: the cluster's default
    tasks_per_node: int = 1  # processes of a multi-process run on each node (the rest on other nodes)

    def parameters(self, processes: int, cluster: str) -> dict:
        """submitit's ``update_parameters`` keywords for a run of ``processes`` processes: on SLURM,
        ``tasks_per_node`` of them on each of ceil(processes / tasks_per_node) nodes; on the local
        cluster, all of them on this machine."""
        tasks = processes if cluster == "local" else min(self.tasks_per_node, processes)
        params = dict(timeout_min=self.time_min, gpus_per_node=self.gpus, cpus_per_task=self.cpus,
                      tasks_per_node=tasks, nodes=-(-processes // tasks))
        if self.partition:
            params["slurm_partition"] = self.partition
        return params


class RunJob(NamedTuple):
    """One run of the grid: where it writes and the command that trains it."""

    name: str  # its folder, OUT/<setting>/<method>-seed<seed>
    argv: tuple  # experiments.cifar flags, --resume included
    processes: int = 1


class Failure(NamedTuple):
    job: RunJob
    attempts: int
    reason: str
    log: str


def coordinator_port(job_id: str) -> int:
    """A port for a local multi-process job's coordinator, the same in every task: from its job id."""
    digits = "".join(c for c in job_id if c.isdigit()) or "0"
    return 20000 + int(digits) % 20000


def train_run(argv: list, processes: int = 1) -> int:
    """What a job runs, in its own process: ``experiments.cifar`` on ``argv``; with several processes,
    joined to the run's other tasks first. Raises RuntimeError naming the exit status unless it is 0."""
    argv = list(argv)
    if processes > 1:
        import submitit

        env = submitit.JobEnvironment()
        if env.cluster == "slurm":
            argv += ["--coordinator", "auto"]
        else:
            argv += ["--coordinator", f"127.0.0.1:{coordinator_port(env.job_id)}", "--num-processes",
                     str(env.num_tasks), "--process-id", str(env.global_rank)]
    from experiments import cifar

    status = cifar.main(argv)
    sys.stdout.flush()
    if status != 0:
        raise RuntimeError(f"experiments.cifar exited with status {status}")
    return status


def make_executor(out: str, cluster: str):
    """A submitit executor on ``cluster`` (auto: SLURM where it is installed, else local processes) that
    writes its jobs' scripts, pickles and logs under ``out``/.submitit/JOB_ID."""
    import submitit

    executor = submitit.AutoExecutor(folder=os.path.join(out, FOLDER, "%j"), cluster=None if cluster == "auto"
                                     else cluster)
    executor.update_parameters(name="adpsgd-study")
    return executor


def state(job) -> str:
    """queued, running or ended: submitit's job state in three words."""
    if job.done():
        return "ended"
    raw = str(job.state).upper()
    return "running" if raw in ("RUNNING", "COMPLETING") else "queued"


def _outcome(job) -> Optional[str]:
    """None when the job's run finished, else why not, in one line: the run's own last ``error:`` or
    ``stopped:`` line from the job's log, else the last line of submitit's exception."""
    try:
        job.results()  # every task's (one per process)
        return None
    except Exception as err:  # the job's exception, or submitit's for a job killed before its result
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        fallback = next((line for line in reversed(lines) if "Error" in line.split(":")[0]),
                        lines[-1] if lines else type(err).__name__)
    try:
        with open(job.paths.stderr, errors="replace") as f:
            said = [line.strip() for line in f if line.startswith(("error: ", "stopped: "))]
    except OSError:
        said = []
    return (said[-1] if said else fallback)[:300]


def execute(jobs: list, executor, resources: Resources, retries: int = 2, max_jobs: int = 0,
            on_done: Optional[Callable] = None, on_counts: Optional[Callable] = None,
            poll_s: float = POLL_S) -> list:
    """Run ``jobs`` (``RunJob``) on ``executor``, at most ``max_jobs`` unfinished at once (0: all), each
    submitted again after a failure up to ``retries`` times. ``on_done(job)`` after each run that
    finished, ``on_counts(dict)`` with the queued / running / done / failed counts whenever they change.
    Returns the ``Failure`` of every run that failed for good."""
    waiting, running, failures, done, attempts = list(jobs), {}, [], 0, {}
    last = None
    while waiting or running:
        while waiting and (max_jobs <= 0 or len(running) < max_jobs):
            job = waiting.pop(0)
            executor.update_parameters(**resources.parameters(job.processes, executor.cluster))
            running[job.name] = (job, executor.submit(train_run, list(job.argv), job.processes))
            attempts[job.name] = attempts.get(job.name, 0) + 1
        for name, (job, handle) in list(running.items()):
            if not handle.done():
                continue
            del running[name]
            reason = _outcome(handle)
            if reason is None:
                done += 1
                if on_done:
                    on_done(job)
            elif attempts[name] <= retries:
                waiting.insert(0, job)  # again, from its checkpoint
            else:
                failures.append(Failure(job, attempts[name], reason, str(handle.paths.stderr)))
        states = [state(handle) for _, handle in running.values()]
        counts = {"queued": len(waiting) + states.count("queued"), "running": states.count("running"),
                  "done": done, "failed": len(failures)}
        if on_counts and counts != last:
            on_counts(counts)
        last = counts
        if running:
            time.sleep(poll_s)
    return failures
