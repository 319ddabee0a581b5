"""The network benchmark's launches: training processes in the namespaces of a ``ns.Lab``.

For each link setting (``unshaped`` or a rate in Mbit/s) ``measure`` shapes
the lab's links, probes them, and trains every method as P processes of
``experiments.net.worker`` (jax.distributed, gloo CPU collectives over TCP,
one CPU device each), one in each namespace, on the same data order,
``--repeats`` times in one launch: repeat r runs the methods in their order
rotated by r (``worker.rotated``), so each method runs first, second, ...
equally often when the repeats are a multiple of the methods. It returns one
record per setting, with one entry per repeat, for ``model.summarise``. The workloads and what they
measure: ``experiments/net/__main__.py``.
"""

from __future__ import annotations

import functools
import os
import subprocess
import sys
import time
from typing import Optional

from experiments.net import model, ns, worker

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the clone: cwd of the workers

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


def launch(lab: ns.Lab, cifar_args: list[str], out: str, deadline: float) -> None:
    """Run ``experiments.net.worker`` as ``lab.workers`` processes, one per namespace;
    raise on failure or timeout."""
    env = dict(os.environ)  # cifar asks for one CPU device per process
    env.update(JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
    os.makedirs(out, exist_ok=True)
    procs, logs = [], []
    try:
        for i in range(lab.workers):
            logs.append(open(os.path.join(out, f"process{i}.log"), "w+"))
            argv = [sys.executable, "-m", "experiments.net.worker", *cifar_args, "--out", out,
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
    """(arrays all-reduced per allreduce step, per averaging sync) for a workload's model:
    the gradients and model state, or the parameters, model state and the (variance, loss) pair."""
    import jax

    from experiments import data, models

    flags = dict(zip(workload[::2], workload[1::2]))
    dataset = data.load(flags["--dataset"], synthetic_size=int(flags.get("--synthetic-size", 1)))
    net = models.create(flags["--model"], dataset.num_classes)
    shapes = jax.eval_shape(lambda key: models.init(net, key, dataset.train_images.shape[1:]),
                            jax.random.PRNGKey(0))
    leaves = len(jax.tree.leaves(shapes))
    return leaves, leaves + 1


def _wait_until_quiet(max_busy: Optional[float], until: float) -> Optional[float]:
    """Wait while other work keeps the CPUs busier than ``max_busy``; the last busy fraction seen."""
    if max_busy is None:
        return None
    while (busy := cpu_busy()) > max_busy and time.monotonic() + 20 < until:
        time.sleep(15)
    return busy


def _label(method: str, args) -> str:
    """The run folder's method label: an averaging method's carries ``-fragP`` with --fragments P > 1."""
    return f"{method}-frag{args.fragments}" if args.fragments > 1 and method not in ("allreduce", "qsgd") else method


def measure(lab: ns.Lab, workload: str, settings: list[Optional[float]], args, folder: str,
            deadline: float) -> list[dict]:
    """Train every method ``args.repeats`` times on every link setting (one launch per setting); returns
    one record per setting, with one entry per repeat ({order, runs}) under ``repeats``."""
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    cifar_args = [*WORKLOADS[workload], *(["--epochs", str(args.epochs)] if args.epochs else []),
                  "--workers", str(lab.workers), "--repeats", str(args.repeats),
                  "--compile-cache", os.path.join(folder, "compile-cache"),
                  "--avg-period", str(args.avg_period), "--compare", ",".join(methods), "--quiet", "--no-plots",
                  "--checkpoint-every", "0", *(["--fragments", str(args.fragments)] if args.fragments > 1 else [])]
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
        repeats = [{"order": worker.rotated(methods, r),
                    "runs": {m: model.Run(os.path.join(worker.repeat_folder(out, r), f"{_label(m, args)}-seed0"),
                                          lab.workers)
                             for m in methods}} for r in range(args.repeats)]
        records.append({"workload": workload, "rate_mbit": rate, "mtu": lab.mtu, "probe": probe,
                        "arrays": arrays_per_round(tuple(WORKLOADS[workload])),
                        "to_target": workload not in THROUGHPUT_ONLY, "cpu_busy_before": busy,
                        "load_1min": [load_before, load_average()], "repeats": repeats})
    return records
