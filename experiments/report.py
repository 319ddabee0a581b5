"""Tables and plots from a results folder: ``python -m experiments.report DIR``.

The table has one row per method (mean ± standard deviation over seeds):
final training loss and test accuracy of the averaged model, syncs, bytes
sent per worker, and the simulated wall-clock of ALGORITHM.md's time model
at 10 and 100 Gbps for ``--predict-workers`` workers:

    time = sum_steps t_compute + sum_rounds t_comm(B, N)

with t_compute the measured compute time per step of the run itself (on the
machine that ran it) and t_comm the ring all-reduce time (all-gather for
QSGD, whose quantised messages cannot be summed in the ring). Full sync
assumes no overlap of communication with the backward pass; its row
"allreduce (ideal overlap)" shows max(t_compute, t_comm) per step. "Time to
target" is the simulated time until the averaged model first reaches the
target test accuracy (default: the lowest final accuracy of any run, so
every run reaches it), at the epoch granularity of the evaluations.

Plots: loss_vs_steps.png, loss_vs_bytes.png, test_accuracy.png,
period.png, variance.png.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections import defaultdict
from typing import Optional

import numpy as np

from adpsgd_jax import comm
from experiments import results

GBPS = 1e9 / 8  # bytes per second in one gigabit per second
BANDWIDTHS = (10, 100)
PLOTS = ("loss_vs_steps.png", "loss_vs_bytes.png", "test_accuracy.png", "period.png", "variance.png")


def simulated_time(run: results.Run, workers: int, gbps: float, latency: float = 10e-6, upto_step: Optional[int] = None,
                   overlap: bool = False) -> float:
    """Simulated seconds of ``run`` up to ``upto_step`` (default: the whole run),
    by ``comm.simulated_wall_clock`` with the run's own compute time per step."""
    s = run.summary
    steps = s["steps"] if upto_step is None else upto_step
    rounds = s["syncs"] if upto_step is None else run.metrics[upto_step - 1]["syncs"]
    per_round = s["bytes"] / s["syncs"] if s["syncs"] else 0.0
    return comm.simulated_wall_clock(s["compute_s"] / s["steps"] * steps, rounds, per_round, workers, gbps * GBPS,
                                     latency, steps=steps, overlap=overlap, gather=run.method == "qsgd")


def first_step_reaching(run: results.Run, accuracy: float) -> Optional[int]:
    for row in run.evals:
        if row["test_accuracy"] is not None and row["test_accuracy"] >= accuracy - 1e-12:
            return row["step"]
    return None


def _mean_sd(values) -> str:
    values = np.asarray(values, float)
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{values.mean():.4f} ± {values.std(ddof=1):.4f}"


def table(runs: list[results.Run], workers: Optional[int] = None, latency: float = 10e-6,
          target: Optional[float] = None) -> str:
    """Markdown comparison table of ``runs`` grouped by method."""
    groups: dict[str, list[results.Run]] = defaultdict(list)
    for run in runs:
        groups[run.method].append(run)
    workers = workers or runs[0].summary["config"]["workers"]
    if target is None:  # the lowest final accuracy of any run: every run reaches it
        target = min(r.summary["test_accuracy"] for r in runs)
    base = groups.get("allreduce")
    base_bytes = np.mean([r.summary["bytes"] for r in base]) if base else None

    def time_cols(rs, overlap=False):
        cols = []
        for gbps in BANDWIDTHS:
            total = np.mean([simulated_time(r, workers, gbps, latency, overlap=overlap) for r in rs])
            reach = [first_step_reaching(r, target) for r in rs]
            to_target = (np.mean([simulated_time(r, workers, gbps, latency, s, overlap) for r, s in zip(rs, reach)])
                         if all(s is not None for s in reach) else float("nan"))
            cols += [f"{total:.2f}", "not reached" if np.isnan(to_target) else f"{to_target:.2f}"]
        return cols

    header = ["method", "seeds", "final train loss", "test accuracy", "syncs", "MB sent / worker", "bytes vs allreduce",
              "compute s"] + [f"{k} @{g} Gbps (s)" for g in BANDWIDTHS for k in ("time", "to target")]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    order = sorted(groups, key=lambda m: (m != "allreduce", m))
    for method in order:
        rs = groups[method]
        sent = np.mean([r.summary["bytes"] for r in rs])
        ratio = f"{sent / base_bytes:.3f}" if base_bytes else "n/a"
        row = [method, str(len(rs)), _mean_sd([r.summary["final_train_loss"] for r in rs]),
               _mean_sd([r.summary["test_accuracy"] for r in rs]), f"{np.mean([r.summary['syncs'] for r in rs]):.0f}",
               f"{sent / 1e6:.3f}", ratio, f"{np.mean([r.summary['compute_s'] for r in rs]):.2f}"] + time_cols(rs)
        lines.append("| " + " | ".join(row) + " |")
        if method == "allreduce":
            extra = ["allreduce (ideal overlap)", str(len(rs))] + [""] * 6 + time_cols(rs, overlap=True)
            lines.append("| " + " | ".join(extra) + " |")
    c = runs[0].summary["config"]
    notes = (f"\n{c['dataset']}, {c['model']}, {c['workers']} workers x batch {c['batch_size']}, {c['epochs']} epochs, "
             f"lr {c['lr']} ({c['lr_schedule']}), partition {c['partition']}, budget avg_period {c['avg_period']}; "
             f"device {runs[0].summary['device_kind']}. Time model: {workers} workers, latency {latency * 1e6:.0f} us, "
             f"measured compute per step; target test accuracy {target:.4f}.\n")
    return "\n".join(lines) + "\n" + notes


def _mean_curve(rs: list[results.Run], key: str, source: str = "metrics"):
    rows = [getattr(r, source) for r in rs]
    n = min(len(x) for x in rows)
    x = np.array([row.get("step") for row in rows[0][:n]], float)
    ys = np.array([[np.nan if row.get(key) is None else row[key] for row in rr[:n]] for rr in rows], float)
    return x, np.nanmean(ys, axis=0) if ys.size else ys


def _smooth(y, width):
    if len(y) < width or width <= 1:
        return y
    return np.convolve(y, np.ones(width) / width, mode="valid")


def write_plots(runs: list[results.Run], out_dir: str) -> list[str]:
    """Write the five PNG plots; return their paths."""
    from matplotlib.figure import Figure  # no pyplot: leaves the caller's backend (e.g. a notebook's) alone

    groups: dict[str, list[results.Run]] = defaultdict(list)
    for run in runs:
        groups[run.method].append(run)
    spe = runs[0].summary["steps_per_epoch"]
    width = max(1, spe)
    figures = {}
    for name in PLOTS:
        fig = Figure(figsize=(6.4, 4.2))
        figures[name] = (fig, fig.add_subplot())
    for index, (method, rs) in enumerate(sorted(groups.items())):
        color = f"C{index % 10}"  # one colour per method across all plots
        step, loss = _mean_curve(rs, "loss")
        sm = _smooth(loss, width)
        figures["loss_vs_steps.png"][1].plot(step[len(step) - len(sm):], sm, label=method, color=color)
        _, sent = _mean_curve(rs, "bytes")
        figures["loss_vs_bytes.png"][1].plot(np.maximum(sent[len(sent) - len(sm):], 1) / 1e6, sm, label=method, color=color)
        epochs = [row["epoch"] for row in rs[0].evals]
        acc = np.mean([[row["test_accuracy"] for row in r.evals[: len(epochs)]] for r in rs], axis=0)
        figures["test_accuracy.png"][1].plot(epochs, acc, label=method, color=color)
        _, period = _mean_curve(rs[:1], "period")
        figures["period.png"][1].step(step, period, where="post", label=method, color=color)
        var = [(row["step"], row["variance"]) for row in rs[0].metrics if row.get("variance")]
        if var:
            figures["variance.png"][1].plot(*zip(*var), marker=".", linestyle="-", linewidth=0.7, label=method, color=color)
    labels = {
        "loss_vs_steps.png": ("step", f"training loss (minibatch, {width}-step mean)"),
        "loss_vs_bytes.png": ("MB sent per worker (log)", f"training loss ({width}-step mean)"),
        "test_accuracy.png": ("epoch", "test accuracy of the averaged model"),
        "period.png": ("step", "averaging period (seed 0)"),
        "variance.png": ("step", "pre-sync parameter variance V (seed 0, log)"),
    }
    paths = []
    for name, (fig, ax) in figures.items():
        ax.set_xlabel(labels[name][0])
        ax.set_ylabel(labels[name][1])
        if name == "loss_vs_bytes.png":
            ax.set_xscale("log")
        if name == "variance.png" and ax.lines:
            ax.set_yscale("log")
        if ax.lines:
            ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        path = os.path.join(out_dir, name)
        fig.savefig(path, dpi=110)
        paths.append(path)
    return paths


def build(out_dir: str, plots: bool = True, workers: Optional[int] = None, latency: float = 10e-6,
          target: Optional[float] = None) -> str:
    """Read every finished run in ``out_dir``; write report.md (and plots); return the table."""
    runs = list(results.finished_runs(out_dir))
    if not runs:
        raise FileNotFoundError(f"no finished runs (sub-folders with {results.SUMMARY}) in {out_dir!r}")
    text = table(runs, workers, latency, target)
    with open(os.path.join(out_dir, "report.md"), "w") as f:
        f.write(text)
    if plots:
        write_plots(runs, out_dir)
    return text


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m experiments.report", description=__doc__.split("\n\n")[0])
    p.add_argument("out", help="results folder of experiments.cifar")
    p.add_argument("--predict-workers", type=int, help="worker count of the time model (default: the runs')")
    p.add_argument("--latency-us", type=float, default=10.0, help="per-message latency of the time model")
    p.add_argument("--target-accuracy", type=float, help="accuracy for 'time to target' (default: lowest final)")
    p.add_argument("--no-plots", action="store_true")
    args = p.parse_args(argv)
    try:
        print(build(args.out, workers=args.predict_workers, latency=args.latency_us * 1e-6,
                    target=args.target_accuracy, plots=not args.no_plots))
    except FileNotFoundError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
