"""Measured speedups over shaped links: ``python -m experiments.netbench [--quick] [--out FILE]``.

Runs the multi-host path for real on one machine: P processes of
``experiments.cifar`` (jax.distributed, gloo CPU collectives over TCP, one
CPU device each), each in its own network namespace, joined by veth links
and a bridge whose every link ``tc`` shapes to the chosen rate
(``experiments/netns.py``). For each link setting (``unshaped`` or a rate in
Mbit/s) the processes train full sync (``allreduce``), CPSGD and ADPSGD at
one budget on the same data order, and ``experiments/netmodel.py`` sets the
measured wall-clock against ALGORITHM.md's time model, and an improved one,
for the same rate, latency, worker count and measured compute time.

Measured: the training loop's wall-clock per step, taken in every process as
each step's metrics reach the host (the processes wrap ``RunWriter`` to
record it; ``train.py`` is unchanged), leaving out the compiling first step
and the evaluations. "To target" ends at the first evaluation reaching the
lowest final test accuracy of the methods.

Workloads: ``mlp`` (digits, MLP, 9,610 parameters, batch 16 per worker, 30
epochs), ``cnn`` (digits, small CNN, 151,306 parameters, batch 64, lr 0.05,
30 epochs) and ``cnn32`` (the CNN on synthetic 32x32x3 images with random
labels, 2.1 M parameters, batch 32, 2 epochs: throughput only). ``--quick``:
mlp, 3 epochs, unshaped and 100 Mbit/s. Needs root for the namespaces;
without it says so and exits with status 2. Removes its namespaces at the
end, on SIGINT / SIGTERM and on errors; ``--timeout`` bounds the whole run
(exit 5 when it runs out). ``--cleanup`` removes what a SIGKILLed run left.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from typing import Optional

from experiments import netmodel, netns

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKLOADS = {
    "mlp": ["--dataset", "digits", "--model", "mlp", "--epochs", "30"],
    "cnn": ["--dataset", "digits", "--model", "cnn", "--batch-size", "64", "--lr", "0.05", "--epochs", "30"],
    "cnn32": ["--dataset", "synthetic", "--synthetic-size", "2048", "--model", "cnn", "--batch-size", "32",
              "--lr", "0.05", "--epochs", "2"],
}
THROUGHPUT_ONLY = ("cnn32",)  # random labels: no accuracy to reach
PORT = 47311  # coordinator port on worker 0's address (in its own namespace: nothing else there)


class Timeout(RuntimeError):
    """--timeout ran out."""


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m experiments.netbench", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="mlp, 3 epochs, unshaped and 100 Mbit/s (about a minute)")
    p.add_argument("--workloads", help=f"comma-separated, from {', '.join(WORKLOADS)} (default all; quick: mlp)")
    p.add_argument("--bandwidths", help="link settings: 'unshaped' and rates in Mbit/s (default unshaped,1000,100; "
                                        "quick: unshaped,100); the first unshaped one calibrates model+gloo")
    p.add_argument("--processes", type=int, default=2, help="training processes = workers, one CPU device each")
    p.add_argument("--methods", default="allreduce,cpsgd,adpsgd",
                   help="experiments.cifar methods; allreduce (full sync) is the reference and must be first")
    p.add_argument("--epochs", type=int, help="default: the workload's (30; cnn32: 2); quick: 3")
    p.add_argument("--avg-period", type=int, default=8, help="budget of the averaging methods")
    p.add_argument("--mtu", type=int, help="link MTU (default: 1500 below 1 Gbit/s, 9000 from 1 Gbit/s and unshaped)")
    p.add_argument("--timeout", type=float, help="seconds for the whole benchmark (default 1200; quick: 300)")
    p.add_argument("--max-busy", type=float, help="before each launch wait (up to a third of the time left) until "
                                                  "the CPUs, measured over 5 s, are busy at most this fraction "
                                                  "(other work on the machine), e.g. 0.2")
    p.add_argument("--keep", help="keep the training runs' folders here (default: a temporary folder, removed)")
    p.add_argument("--out", help="write the results as JSON here")
    p.add_argument("--cleanup", action="store_true", help="remove namespaces left by a killed run, then exit")
    return p


def _settings(text: str) -> list[Optional[float]]:
    out = []
    for item in (s.strip() for s in text.split(",") if s.strip()):
        try:
            rate = None if item == "unshaped" else float(item)
        except ValueError:
            raise ValueError(f"--bandwidths takes 'unshaped' and rates in Mbit/s, got {item!r}") from None
        if rate is not None and not 1 <= rate <= 100_000:
            raise ValueError(f"--bandwidths: {item} Mbit/s is outside [1, 100000]")
        out.append(rate)
    if not out:
        raise ValueError("--bandwidths is empty")
    return out


def load_average() -> float:
    with open("/proc/loadavg") as f:
        return float(f.read().split()[0])


def cpu_busy(seconds: float = 5.0) -> float:
    """Fraction of all CPUs' time spent busy over the next ``seconds`` (from /proc/stat)."""
    def sample():
        with open("/proc/stat") as f:
            ticks = [int(x) for x in f.readline().split()[1:9]]
        return sum(ticks), ticks[3] + ticks[4]  # total, idle + iowait

    (total0, idle0), _, (total1, idle1) = sample(), time.sleep(seconds), sample()
    return 1.0 - (idle1 - idle0) / max(total1 - total0, 1)


# --- the training processes ---------------------------------------------------------------------------------

def _install_step_clock() -> None:
    """Make every process's RunWriter record the loop time at each step (the TIMING files).

    The clock starts when the first (compiling) step's metrics arrive, after
    a barrier, so every process starts it together; it restarts after each
    evaluation, which it leaves out. Entry t is taken when step t's metrics
    reach the host: on the CPU client, that copy waits for the step
    dispatched after it, so entry t marks the end of step t + 1, except at an
    epoch's last step, whose metrics are read before anything else is
    dispatched (``Run.durations`` sorts this out).
    """
    import jax
    from jax.experimental import multihost_utils

    from experiments import results

    cls = results.RunWriter
    init, metrics, evaluation, summary = cls.__init__, cls.metrics, cls.evaluation, cls.summary

    def timed_init(self, *args, **kwargs):
        init(self, *args, **kwargs)
        self.clock = {"last": None, "total": 0.0, "loop_s": []}

    def timed_metrics(self, row):
        metrics(self, row)
        clock = self.clock
        if clock["last"] is None:
            multihost_utils.sync_global_devices("netbench: start the clock")
        else:
            clock["total"] += time.perf_counter() - clock["last"]
        clock["last"] = time.perf_counter()
        clock["loop_s"].append(clock["total"])

    def timed_evaluation(self, row):
        evaluation(self, row)
        self.clock["last"] = time.perf_counter()

    def timed_summary(self, row):
        summary(self, row)
        path = os.path.join(self.dir, netmodel.TIMING.format(jax.process_index()))
        results.write_json_atomic(path, {"loop_s": self.clock["loop_s"]})

    cls.__init__, cls.metrics, cls.evaluation, cls.summary = timed_init, timed_metrics, timed_evaluation, timed_summary


def _worker(argv: list[str]) -> int:
    _install_step_clock()
    from experiments import cifar

    return cifar.main(argv)


def launch(lab: netns.Lab, cifar_args: list[str], out: str, deadline: float) -> None:
    """Run experiments.cifar as ``lab.workers`` processes, one per namespace; raise on failure or timeout."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # cifar sets one device per process
    env.update(JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
    os.makedirs(out, exist_ok=True)
    procs, logs = [], []
    try:
        for i in range(lab.workers):
            logs.append(open(os.path.join(out, f"process{i}.log"), "w+"))
            argv = [sys.executable, "-m", "experiments.netbench", "_worker", *cifar_args, "--out", out,
                    "--coordinator", f"{lab.address(0)}:{PORT}", "--num-processes", str(lab.workers),
                    "--process-id", str(i), "--distributed-timeout", "60"]
            procs.append(lab.spawn(i, argv, cwd=ROOT, env=env, stdout=logs[-1], stderr=subprocess.STDOUT))
        while any(p.poll() is None for p in procs) and not any(p.returncode for p in procs):
            if time.monotonic() > deadline:
                raise Timeout("--timeout ran out during a training launch")
            time.sleep(0.2)
        lab.stop(grace=10)  # the others, once one failed
        bad = next((i for i, p in enumerate(procs) if p.returncode), None)
        if bad is not None:
            logs[bad].seek(0)
            raise RuntimeError(f"training process {bad} exited with {procs[bad].returncode}:\n"
                               f"{logs[bad].read()[-2000:]}")
    finally:
        lab.stop()
        for log in logs:
            log.close()


@functools.lru_cache(maxsize=None)
def arrays_per_round(workload: tuple[str, ...]) -> tuple[int, int]:
    """(arrays all-reduced per full-sync step, per averaging sync) for a workload's model:
    the gradients and model state, or the parameters, model state and the (variance, loss) pair."""
    import jax

    from experiments import data, models

    flags = dict(zip(workload[::2], workload[1::2]))
    dataset = data.load(flags["--dataset"], synthetic_size=int(flags.get("--synthetic-size", 1)))
    model = models.create(flags["--model"], dataset.num_classes)
    shapes = jax.eval_shape(lambda key: models.init(model, key, dataset.train_images.shape[1:]),
                            jax.random.PRNGKey(0))
    leaves = len(jax.tree.leaves(shapes))
    return leaves, leaves + 1


# --- the benchmark ------------------------------------------------------------------------------------------

def _wait_until_quiet(max_busy: Optional[float], until: float) -> Optional[float]:
    """Wait while other work keeps the CPUs busier than ``max_busy``; the last busy fraction seen."""
    if max_busy is None:
        return None
    while (busy := cpu_busy()) > max_busy and time.monotonic() + 20 < until:
        time.sleep(15)
    return busy


def measure(lab: netns.Lab, workload: str, settings: list[Optional[float]], args, folder: str,
            deadline: float) -> list[dict]:
    """Train every method on every link setting; returns one record per setting, with its Runs."""
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    cifar_args = [*WORKLOADS[workload], *(["--epochs", str(args.epochs)] if args.epochs else []),
                  "--workers", str(lab.workers),
                  "--avg-period", str(args.avg_period), "--compare", ",".join(methods), "--quiet", "--no-plots",
                  "--checkpoint-every", "0"]
    records = []
    for rate in settings:
        if time.monotonic() > deadline:
            raise Timeout("--timeout ran out between launches")
        busy = _wait_until_quiet(args.max_busy, time.monotonic() + (deadline - time.monotonic()) / 3)
        lab.shape(rate)
        probe = lab.probe()
        out = os.path.join(folder, f"{workload}-{'unshaped' if rate is None else f'{rate:g}mbit'}")
        load_before = load_average()
        launch(lab, cifar_args, out, deadline)
        records.append({"workload": workload, "rate_mbit": rate, "mtu": lab.mtu, "probe": probe,
                        "arrays": arrays_per_round(tuple(WORKLOADS[workload])),
                        "to_target": workload not in THROUGHPUT_ONLY, "cpu_busy_before": busy,
                        "load_1min": [load_before, load_average()],
                        "runs": {m: netmodel.Run(os.path.join(out, f"{m}-seed0"), lab.workers) for m in methods}})
    return records


def _raise_on_sigterm(signum, frame):
    raise SystemExit(128 + signum)


def main(argv: Optional[list[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_worker"]:  # one training process, started by ``launch``
        return _worker(argv[1:])
    args = parser().parse_args(argv)
    if args.cleanup:
        print("removed: " + (", ".join(netns.remove_leftovers()) or "nothing"))
        return 0
    args.workloads = args.workloads or ("mlp" if args.quick else ",".join(WORKLOADS))
    args.bandwidths = args.bandwidths or ("unshaped,100" if args.quick else "unshaped,1000,100")
    args.epochs = args.epochs or (3 if args.quick else None)
    timeout = args.timeout or (300 if args.quick else 1200)
    try:
        settings = _settings(args.bandwidths)
        workloads = [w.strip() for w in args.workloads.split(",") if w.strip()]
        unknown = [w for w in workloads if w not in WORKLOADS]
        if unknown or not workloads:
            raise ValueError(f"--workloads: unknown {unknown}; accepted values: {', '.join(WORKLOADS)}")
        if args.methods.split(",")[0].strip() != "allreduce":
            raise ValueError("--methods must start with allreduce (full sync, the reference)")
        if not 2 <= args.processes <= 4:
            raise ValueError(f"--processes must be in [2, 4], got {args.processes}")
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    reason = netns.missing_rights()
    if reason:
        print(f"error: netbench {reason}", file=sys.stderr)
        return 2
    deadline = time.monotonic() + timeout
    folder = args.keep or tempfile.mkdtemp(prefix="netbench-")
    previous = signal.signal(signal.SIGTERM, _raise_on_sigterm)
    try:
        with netns.Lab(args.processes, args.mtu) as lab:
            records = [r for w in workloads for r in measure(lab, w, settings, args, folder, deadline)]
        links, rows = netmodel.summarise(records, args.processes)
    except Timeout as err:
        print(f"error: {err} ({timeout:g} s); the namespaces are removed", file=sys.stderr)
        return 5
    except KeyboardInterrupt:
        print("stopped: SIGINT; the namespaces are removed", file=sys.stderr)
        return 130
    except (RuntimeError, netns.LabError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    finally:
        signal.signal(signal.SIGTERM, previous)
        if not args.keep:
            shutil.rmtree(folder, ignore_errors=True)
    print(netmodel.table(links, rows))
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump({"processes": args.processes, "cpus": os.cpu_count(), "epochs": args.epochs or "per workload",
                       "avg_period": args.avg_period, "mtu": args.mtu or "auto", "command": ["python", "-m",
                       "experiments.netbench", *argv], "delay": netns.missing_delay_support() or "available",
                       "links": links, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
