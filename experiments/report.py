"""Tables and plots from a results folder: ``python -m experiments.report DIR``.

The table has one row per method (mean ± standard deviation over seeds):
final training loss and test accuracy of the averaged model, syncs, bytes
sent per worker, and the simulated wall-clock of the time model
at 10 and 100 Gbps for ``--predict-workers`` workers (docs/algorithm.md, "Time model"):

    time = sum_steps t_compute + sum_rounds t_comm(B, N)

with t_compute the summary's ``compute_step_s`` (one worker's local step,
measured alone on one device of the machine that ran it, no communication:
the run's own local step with its averaging gate shut, experiments/compute.py;
``build`` gives every run the median probe of the runs sharing its probe's
program, ``results.pool_compute``) and t_comm the ring all-reduce time (all-gather for
QSGD, whose quantised messages cannot be summed in the ring). ``allreduce``
assumes no overlap of communication with the backward pass; its row
"allreduce (ideal overlap)" shows max(t_compute, t_comm) per step. "Time to
target" is the simulated time until the averaged model first reaches the
target test accuracy (default: the lowest final accuracy of any run, so
every run reaches it), at the epoch granularity of the evaluations. Rows
are run labels: the method, plus ``+<outer optimizer>`` and ``-group<L>``.
A two-level run (groups of L) is timed with its every-step mean inside the
groups and its averaging across them, every link at the one bandwidth.

A second table predicts the same runs on a two-level cluster
(``--hosts`` H x ``--devices-per-host`` L, ``--intra-gbps`` inside a host,
10 and 100 Gbps between hosts; ``timemodel.two_level_wall_clock``): rounds of
flat runs are hierarchical all-reduces (all-gathers for QSGD); a two-level
run's groups become the hosts, its every-step mean runs on the fast links
and only its syncs cross hosts. Counts and compute come from the runs as
measured, whatever their own group size.

Plots: loss_vs_steps.png, loss_vs_bytes.png, test_accuracy.png,
period.png, variance.png.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections import defaultdict
from typing import Callable, NamedTuple, Optional

import numpy as np

from adpsgd_jax import timemodel
from adpsgd_jax.timemodel import Link
from experiments import conclusion, results
from experiments.names import BANDWIDTHS_GBPS, GBPS

# The two-level prediction: NVLink-class 300 GB/s inside a host; payload and compute per step as measured
# unless given (a what-if for a larger model: its parameter bytes and an assumed compute time per step).
CLUSTER = dict(hosts=4, per_host=8, intra_gbps=2400.0, payload_bytes=None, step_s=None)
PLOTS = ("loss_vs_steps.png", "loss_vs_bytes.png", "test_accuracy.png", "period.png", "variance.png")


class _Counts(NamedTuple):
    """What a run communicated up to a step, for the time models."""

    steps: int
    compute_s: float  # steps x t_compute
    rounds: int
    per_round: float  # bytes per worker per round of the averaging (across groups) or allreduce
    group_rounds: int
    group_per_round: float  # bytes per worker per every-step mean inside a group (two-level runs)


def _counts(run: results.Run, upto_step: Optional[int], payload_bytes: Optional[float] = None,
            step_s: Optional[float] = None) -> _Counts:
    """The run's counts up to ``upto_step``; with ``payload_bytes`` every message scaled by
    payload_bytes / the run's parameter bytes, with ``step_s`` that compute time per step."""
    s = run.summary
    steps = s["steps"] if upto_step is None else upto_step
    row = s if upto_step is None else run.metrics[upto_step - 1]
    group_syncs = s.get("group_syncs", 0)
    scale = payload_bytes / s["param_bytes"] if payload_bytes else 1.0
    per_step = run.compute_step_s if step_s is None else step_s
    return _Counts(steps, per_step * steps, row["syncs"], scale * s["bytes"] / s["syncs"] if s["syncs"] else 0.0,
                   row.get("group_syncs", 0), scale * s["group_bytes"] / group_syncs if group_syncs else 0.0)


def _monitor_s(run: results.Run, upto_step: Optional[int], round_s: Callable[[float], float]) -> float:
    """Seconds of a drift schedule's every-step all-reduce of a float32 pair (schedules.variance_trigger) up to
    ``upto_step``: ``monitor_rounds`` x ``round_s(bytes per round)``; 0 for every other run. Never overlapped:
    the sync decision waits for it."""
    s = run.summary
    rounds = (s if upto_step is None else run.metrics[upto_step - 1]).get("monitor_rounds", 0)
    return rounds * round_s(s["monitor_bytes"] / s["monitor_rounds"]) if rounds else 0.0


def simulated_time(run: results.Run, workers: int, gbps: float, latency: float = 10e-6, upto_step: Optional[int] = None,
                   overlap: bool = False) -> float:
    """Simulated seconds of ``run`` up to ``upto_step`` (default: the whole run),
    by ``timemodel.simulated_wall_clock`` with the run's ``compute_step_s`` per step;
    a two-level run by ``timemodel.two_level_wall_clock`` with every link at ``gbps``."""
    c, link = _counts(run, upto_step), Link(gbps * GBPS, latency)
    # The monitor's rounds are charged as time the steps take beyond their compute.
    monitor_s = _monitor_s(run, upto_step, lambda b: timemodel.allreduce_time(b, workers, link))
    c = c._replace(compute_s=c.compute_s + monitor_s)
    if run.group_size > 1:
        size = run.group_size
        return timemodel.two_level_wall_clock(c.compute_s, c.rounds, c.per_round, max(1, workers // size), size,
                                              link, link, group_rounds=c.group_rounds,
                                              group_nbytes_per_round=c.group_per_round, grouped=True)
    return timemodel.simulated_wall_clock(c.compute_s, c.rounds, c.per_round, workers, link, steps=c.steps,
                                          overlap=overlap, gather=run.method == "qsgd")


def cluster_time(run: results.Run, hosts: int, per_host: int, intra_gbps: float, gbps: float,
                 latency: float = 10e-6, upto_step: Optional[int] = None, overlap: bool = False,
                 payload_bytes: Optional[float] = None, step_s: Optional[float] = None) -> float:
    """Simulated seconds of ``run`` on ``hosts`` x ``per_host`` devices, ``intra_gbps``
    inside a host and ``gbps`` between hosts (``timemodel.two_level_wall_clock``;
    ``latency`` per message on both levels). ``payload_bytes`` / ``step_s``:
    a what-if with another model's parameter bytes and compute per step."""
    c = _counts(run, upto_step, payload_bytes, step_s)
    monitor_s = _monitor_s(run, upto_step, lambda b: timemodel.hierarchical_allreduce_time(  # unscaled in a what-if
        b, hosts, per_host, Link(intra_gbps * GBPS, latency), Link(gbps * GBPS, latency)))
    c = c._replace(compute_s=c.compute_s + monitor_s)
    return timemodel.two_level_wall_clock(c.compute_s, c.rounds, c.per_round, hosts, per_host,
                                          Link(intra_gbps * GBPS, latency), Link(gbps * GBPS, latency),
                                          group_rounds=c.group_rounds, group_nbytes_per_round=c.group_per_round,
                                          grouped=run.group_size > 1, steps=c.steps, overlap=overlap,
                                          gather=run.method == "qsgd")


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


def _by_label(runs: list[results.Run]) -> dict[str, list[results.Run]]:
    """Runs grouped by label, allreduce first."""
    groups: dict[str, list[results.Run]] = defaultdict(list)
    for run in runs:
        groups[run.label].append(run)
    return {k: groups[k] for k in sorted(groups, key=lambda m: (m != "allreduce", m))}


def _lowest_final_accuracy(runs: list[results.Run]) -> float:
    """The default target: the lowest final accuracy of any run, so every run reaches it."""
    return min(r.summary["test_accuracy"] for r in runs)


def _times(rs: list[results.Run], timer: Callable, target: float, overlap: bool = False) -> tuple[float, float]:
    """Mean simulated (total, to target) seconds of ``rs`` by ``timer(run, upto_step, overlap)``;
    NaN to target when a run never reaches it."""
    total = np.mean([timer(r, None, overlap) for r in rs])
    reach = [first_step_reaching(r, target) for r in rs]
    if any(s is None for s in reach):
        return total, float("nan")
    return total, np.mean([timer(r, s, overlap) for r, s in zip(rs, reach)])


def _seconds(x: float) -> str:
    return "not reached" if np.isnan(x) else f"{x:.2f}"


def _row(cells: list) -> str:
    return "| " + " | ".join(cells) + " |"


def _mean_of(rs: list[results.Run], key: str) -> float:
    return float(np.mean([r.summary.get(key, 0) for r in rs]))


def _placement(summary: dict) -> str:
    """" (8 workers on 1 device)", from a summary that records it (older ones do not)."""
    if "num_devices" not in summary or "workers_per_device" not in summary:
        return ""
    d = summary["num_devices"]
    return f" ({d * summary['workers_per_device']} workers on {d} device{'s' if d > 1 else ''})"


def table(runs: list[results.Run], workers: Optional[int] = None, latency: float = 10e-6,
          target: Optional[float] = None) -> str:
    """Markdown comparison table of ``runs`` grouped by label (method and options)."""
    groups = _by_label(runs)
    workers = workers or runs[0].summary["config"]["workers"]
    target = _lowest_final_accuracy(runs) if target is None else target
    base = groups.get("allreduce")
    base_bytes = _mean_of(base, "bytes") if base else None

    def time_cols(rs, overlap=False):
        cols = []
        for gbps in BANDWIDTHS_GBPS:
            timer = lambda r, upto, ov: simulated_time(r, workers, gbps, latency, upto, ov)  # noqa: E731
            cols += [_seconds(t) for t in _times(rs, timer, target, overlap)]
        return cols

    header = ["method", "seeds", "final train loss", "test accuracy", "syncs", "MB sent / worker", "bytes vs allreduce",
              "MB in group / worker", "compute s (T x 1 worker)"]
    header += [f"{k} @{g} Gbps (s)" for g in BANDWIDTHS_GBPS for k in ("time", "to target")]
    lines = [_row(header), "|" + "---|" * len(header)]
    for label, rs in groups.items():
        sent = _mean_of(rs, "bytes")
        ratio = f"{sent / base_bytes:.3f}" if base_bytes else "n/a"
        row = [label, str(len(rs)), _mean_sd([r.summary["final_train_loss"] for r in rs]),
               _mean_sd([r.summary["test_accuracy"] for r in rs]), f"{_mean_of(rs, 'syncs'):.0f}",
               f"{sent / 1e6:.3f}", ratio, f"{_mean_of(rs, 'group_bytes') / 1e6:.3f}",
               f"{np.mean([r.compute_step_s * r.summary['steps'] for r in rs]):.3f}"] + time_cols(rs)
        lines.append(_row(row))
        if label == "allreduce":
            lines.append(_row(["allreduce (ideal overlap)", str(len(rs))] + [""] * 7 + time_cols(rs, overlap=True)))
    c = runs[0].summary["config"]
    notes = (f"\n{c['dataset']}, {c['model']}, {c['workers']} workers x batch {c['batch_size']}, {c['epochs']} epochs, "
             f"lr {c['lr']} ({c['lr_schedule']}), partition {c['partition']}, budget avg_period {c['avg_period']}; "
             f"device {runs[0].summary['device_kind']}{_placement(runs[0].summary)}. Time model: {workers} workers, "
             f"latency {latency * 1e6:.0f} us, "
             f"compute = steps x one worker's local step measured alone on one device (compute_step_s; the median "
             f"over the runs of one model and batch when the table is built from a folder), the same for every "
             f"method, no communication in it; target test accuracy {target:.4f}.\n")
    return "\n".join(lines) + "\n" + notes


def cluster_table(runs: list[results.Run], hosts: int = CLUSTER["hosts"], per_host: int = CLUSTER["per_host"],
                  intra_gbps: float = CLUSTER["intra_gbps"], latency: float = 10e-6,
                  target: Optional[float] = None, payload_bytes: Optional[float] = None,
                  step_s: Optional[float] = None) -> str:
    """Markdown table of ``runs`` predicted on a two-level cluster: ``hosts`` x
    ``per_host`` devices, ``intra_gbps`` inside a host, 10 / 100 Gbps between
    hosts. Speedups are against allreduce without overlap, where it ran.
    ``payload_bytes`` / ``step_s``: see ``cluster_time``."""
    groups = _by_label(runs)
    target = _lowest_final_accuracy(runs) if target is None else target

    def timer_at(gbps):
        return lambda r, upto, ov: cluster_time(r, hosts, per_host, intra_gbps, gbps, latency, upto, ov,
                                                payload_bytes, step_s)

    bases = ({g: _times(groups["allreduce"], timer_at(g), target) for g in BANDWIDTHS_GBPS}
             if "allreduce" in groups else {})

    def time_cols(rs, overlap=False):
        cols = []
        for gbps in BANDWIDTHS_GBPS:
            total, to_target = _times(rs, timer_at(gbps), target, overlap)
            base = bases.get(gbps)
            cols += [_seconds(total), f"{base[0] / total:.2f}x" if base else "n/a",
                     _seconds(to_target), f"{base[1] / to_target:.2f}x" if base else "n/a"]
        return cols

    header = ["method", "seeds", "syncs across hosts", "MB across hosts / worker", "MB inside host / worker"] + [
        f"{k} @{g} Gbps" for g in BANDWIDTHS_GBPS
        for k in ("time (s)", "speedup", "to target (s)", "speedup to target")]
    lines = [_row(header), "|" + "---|" * len(header)]
    def megabytes(rs, key):  # per worker, scaled like the messages in a what-if
        return np.mean([r.summary.get(key, 0) * (payload_bytes / r.summary["param_bytes"] if payload_bytes else 1)
                        for r in rs]) / 1e6

    for label, rs in groups.items():
        row = [label, str(len(rs)), f"{_mean_of(rs, 'syncs'):.0f}", f"{megabytes(rs, 'bytes'):.3f}",
               f"{megabytes(rs, 'group_bytes'):.3f}"] + time_cols(rs)
        lines.append(_row(row))
        if label == "allreduce":
            lines.append(_row(["allreduce (ideal overlap)", str(len(rs))] + [""] * 3 + time_cols(rs, overlap=True)))
    what_if = "" if payload_bytes is None else f"messages scaled to a {payload_bytes / 1e6:g} MB model; "
    compute = ("one worker's compute per step as probed (compute_step_s, pooled as above)" if step_s is None
               else f"compute {step_s * 1e3:g} ms per step (assumed)")
    notes = (f"\nPredicted on {hosts} hosts x {per_host} devices: {intra_gbps:g} Gbps inside a host, 10 / 100 Gbps "
             f"between hosts, latency {latency * 1e6:.0f} us per message; flat runs pay hierarchical all-reduces, "
             f"a two-level run's groups are the hosts; {what_if}{compute}; speedup vs allreduce without "
             f"overlap; target test accuracy {target:.4f}.\n")
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

    groups = _by_label(runs)
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
          target: Optional[float] = None, cluster: Optional[dict] = None) -> str:
    """Read every finished run in ``out_dir``; write report.md (and plots); return the tables and the
    closing sentences (``conclusion.sentences``).

    ``cluster``: hosts, per_host, intra_gbps of the two-level prediction (default ``CLUSTER``).
    """
    runs = list(results.finished_runs(out_dir))
    results.pool_compute(runs)
    if not runs:
        raise FileNotFoundError(f"no finished runs (sub-folders with {results.SUMMARY}) in {out_dir!r}")
    text = table(runs, workers, latency, target) + "\n" + cluster_table(runs, **{**CLUSTER, **(cluster or {})},
                                                                         latency=latency, target=target)
    text += "\n" + conclusion.sentences(runs, os.path.join(out_dir, "loss_vs_bytes.png") if plots else None)
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
    p.add_argument("--hosts", type=int, default=CLUSTER["hosts"], help="two-level prediction: number of hosts")
    p.add_argument("--devices-per-host", type=int, default=CLUSTER["per_host"],
                   help="two-level prediction: devices per host")
    p.add_argument("--intra-gbps", type=float, default=CLUSTER["intra_gbps"],
                   help="two-level prediction: link rate inside a host in Gbps (default: NVLink-class 300 GB/s)")
    p.add_argument("--payload-mb", type=float,
                   help="two-level what-if: scale every message to a model of this many MB of parameters")
    p.add_argument("--step-ms", type=float,
                   help="two-level what-if: compute time per step in ms (default: each run's compute_step_s)")
    p.add_argument("--no-plots", action="store_true")
    args = p.parse_args(argv)
    if args.hosts < 1 or args.devices_per_host < 1 or args.intra_gbps <= 0:
        print("error: --hosts and --devices-per-host must be >= 1 and --intra-gbps > 0", file=sys.stderr)
        return 2
    if (args.payload_mb is not None and args.payload_mb <= 0) or (args.step_ms is not None and args.step_ms < 0):
        print("error: --payload-mb must be > 0 and --step-ms >= 0", file=sys.stderr)
        return 2
    cluster = dict(hosts=args.hosts, per_host=args.devices_per_host, intra_gbps=args.intra_gbps,
                   payload_bytes=None if args.payload_mb is None else args.payload_mb * 1e6,
                   step_s=None if args.step_ms is None else args.step_ms * 1e-3)
    try:
        print(build(args.out, workers=args.predict_workers, latency=args.latency_us * 1e-6,
                    target=args.target_accuracy, plots=not args.no_plots, cluster=cluster))
    except (FileNotFoundError, results.StaleSummary) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
