"""Measured speedups over shaped links: ``python -m experiments.net [--quick] [--out FILE]``.

Runs the multi-host path for real on one machine: P training processes
(``worker.py``: jax.distributed, gloo CPU collectives over TCP, one CPU
device each), each in its own network namespace, joined by veth links and a
bridge whose every link ``tc`` shapes to the chosen rate (``ns.py``). For
each link setting (``unshaped`` or a rate in Mbit/s) the processes train
``allreduce`` (full-sync SGD), CPSGD and ADPSGD at one budget on the same data
order (``bench.py``), ``--repeats`` times (default and minimum 3) in one
launch, repeat r running the methods in their order rotated by r. ``model.py``
sets the measured wall-clock against the time model (docs/algorithm.md, "Time
model"), and a gloo-aware one, for the same rate, latency, worker count and
measured compute time. Every row gives the median over the repeats and the
range (min-max); a prediction "agrees" when its range overlaps the measured
one. Each shaped link also gets two checks that load cannot fail (transfers
and allreduce steps no faster than the wire; ``model.wire_checks``), with a
verdict.

Measured: the training loop's wall-clock per step, taken in every process as
each step's metrics reach the host (the loop's ``on_step`` hook), leaving
out the compiling first step and the evaluations. "To target" ends at the first evaluation reaching the
lowest final test accuracy of the methods.

Workloads: ``mlp`` (digits, MLP, 9,610 parameters, batch 16 per worker, 30
epochs), ``cnn`` (digits, small CNN, 151,306 parameters, batch 64, lr 0.05,
30 epochs) and ``cnn32`` (the CNN on synthetic 32x32x3 images with random
labels, 2.1 M parameters, batch 32, 2 epochs: throughput only). ``--quick``:
mlp, 3 epochs, unshaped and 100 Mbit/s, which checks the harness only (and says so):
runs that short are too short for the speedups. Needs root for the namespaces;
without it says so and exits with status 2. Removes its namespaces at the
end, on SIGINT / SIGTERM and on errors; ``--timeout`` bounds the whole run
(exit 5 when it runs out). ``--cleanup`` removes what a SIGKILLed run left.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sys
import tempfile
import time
from typing import Optional

from experiments.net import bench, model, ns
from experiments.net.bench import WORKLOADS, Timeout

REPEATS = 3  # runs of every method per link: the fewest that give a median and a spread
QUICK_NOTE = ("note: --quick checks the harness only (its runs are too short for the speedups, which the model "
              "need not match); run without --quick for the benchmark's figures")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m experiments.net", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="mlp, 3 epochs, unshaped and 100 Mbit/s: checks the harness")
    p.add_argument("--workloads", help=f"comma-separated, from {', '.join(WORKLOADS)} (default all; quick: mlp)")
    p.add_argument("--bandwidths", help="link settings: 'unshaped' and rates in Mbit/s (default unshaped,1000,100; "
                                        "quick: unshaped,100); the first unshaped one calibrates model+gloo")
    p.add_argument("--repeats", type=int, default=REPEATS, help=f"runs of every method per link, repeat r in the "
                                                                f"order rotated by r (default and minimum {REPEATS})")
    p.add_argument("--processes", type=int, default=2, help="training processes = workers, one CPU device each")
    p.add_argument("--methods", default="allreduce,cpsgd,adpsgd",
                   help="experiments.cifar methods; allreduce (full-sync SGD) is the reference and must be first")
    p.add_argument("--epochs", type=int, help="default: the workload's (30; cnn32: 2); quick: 3")
    p.add_argument("--avg-period", type=int, default=8, help="budget of the averaging methods")
    p.add_argument("--fragments", type=int, default=1,
                   help="streaming averaging: each round of the averaging methods sends 1 / P of the parameters, "
                        "P times as many rounds (experiments.cifar --fragments; default 1)")
    p.add_argument("--mtu", type=int, help="link MTU (default: 1500 below 1 Gbit/s, 9000 from 1 Gbit/s and unshaped)")
    p.add_argument("--timeout", type=float, help="seconds for the whole benchmark (default 3600; quick: 600)")
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


def _raise_on_sigterm(signum, frame):
    raise SystemExit(128 + signum)


def _workloads(args: argparse.Namespace) -> list[str]:
    """The workloads to run; ValueError naming the flag when a flag is off."""
    workloads = [w.strip() for w in args.workloads.split(",") if w.strip()]
    unknown = [w for w in workloads if w not in WORKLOADS]
    if unknown or not workloads:
        raise ValueError(f"--workloads: unknown {unknown}; accepted values: {', '.join(WORKLOADS)}")
    if args.methods.split(",")[0].strip() != "allreduce":
        raise ValueError("--methods must start with allreduce (full-sync SGD, the reference)")
    if not 2 <= args.processes <= 4:
        raise ValueError(f"--processes must be in [2, 4], got {args.processes}")
    if args.fragments < 1 or args.avg_period % args.fragments:
        raise ValueError(f"--fragments must be an integer >= 1 that divides --avg-period {args.avg_period}, "
                         f"got {args.fragments}")
    if args.repeats < REPEATS:
        raise ValueError(f"--repeats must be >= {REPEATS} (a median and a spread), got {args.repeats}")
    return workloads


def main(argv: Optional[list[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parser().parse_args(argv)
    if args.cleanup:
        print("removed: " + (", ".join(ns.remove_leftovers()) or "nothing"))
        return 0
    args.workloads = args.workloads or ("mlp" if args.quick else ",".join(WORKLOADS))
    args.bandwidths = args.bandwidths or ("unshaped,100" if args.quick else "unshaped,1000,100")
    args.epochs = args.epochs or (3 if args.quick else None)
    timeout = args.timeout or (600 if args.quick else 3600)
    try:
        settings, workloads = _settings(args.bandwidths), _workloads(args)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    reason = ns.missing_rights()
    if reason:
        print(f"error: netbench {reason}", file=sys.stderr)
        return 2
    deadline = time.monotonic() + timeout
    # absolute: the workers run in the clone (bench.ROOT), not in this cwd
    folder = os.path.abspath(args.keep) if args.keep else tempfile.mkdtemp(prefix="netbench-")
    previous = signal.signal(signal.SIGTERM, _raise_on_sigterm)
    try:
        with ns.Lab(args.processes, args.mtu) as lab:
            records = [r for w in workloads for r in bench.measure(lab, w, settings, args, folder, deadline)]
        links, rows = model.summarise(records, args.processes)
    except Timeout as err:
        print(f"error: {err} ({timeout:g} s); the namespaces are removed", file=sys.stderr)
        return 5
    except KeyboardInterrupt:
        print("stopped: SIGINT; the namespaces are removed", file=sys.stderr)
        return 130
    except (RuntimeError, ns.LabError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    finally:
        signal.signal(signal.SIGTERM, previous)
        if not args.keep:
            shutil.rmtree(folder, ignore_errors=True)
    print(model.table(links, rows))
    if args.quick:
        print(QUICK_NOTE)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump({"processes": args.processes, "cpus": os.cpu_count(), "epochs": args.epochs or "per workload",
                       "avg_period": args.avg_period, "repeats": args.repeats, "mtu": args.mtu or "auto",
                       "command": ["python", "-m", "experiments.net", *argv], "delay": ns.missing_delay_support() or "available",
                       "links": links, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
