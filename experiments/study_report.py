"""The study's table and plot, from the finished runs of ``experiments.study``.

Per setting and method, against the baseline (CPSGD in the preset), over
the seeds both ran (runs of one seed share data order and initialisation,
so the differences are paired):

* seeds won: seeds on which the method's final training loss (of the
  averaged model, whole training set) is below the baseline's;
* d_k = (method - baseline) on seed k, for the final training loss and the
  test accuracy: the mean of d_k with the 95% t-interval
  mean +- t_{0.975, n-1} * sd(d) / sqrt(n) over the n seeds;
* verdict on the training loss: ``lower`` when the whole interval is below
  0, ``higher`` when it is above, ``inconclusive`` otherwise (always with
  one seed).

``loss_vs_bytes.png``: the seed-mean training loss (minibatch, one-epoch
running mean) against the bytes each worker sent, one panel per setting.
"""

from __future__ import annotations

import math
import os
from typing import Optional

import numpy as np
from scipy import stats

from experiments import results

VERDICTS = ("lower", "higher", "inconclusive")
STUDY_MD, STUDY_JSON, STUDY_PLOT = "study.md", "study.json", "loss_vs_bytes.png"


def paired(differences) -> tuple[float, float, float]:
    """(mean, low, high): the mean of paired differences with its 95% t-interval
    mean +- t_{0.975, n-1} sd / sqrt(n) (NaN bounds with fewer than 2 pairs)."""
    d = np.asarray(differences, float)
    mean = float(d.mean()) if d.size else math.nan
    if d.size < 2:
        return mean, math.nan, math.nan
    half = float(stats.t.ppf(0.975, d.size - 1) * d.std(ddof=1) / math.sqrt(d.size))
    return mean, mean - half, mean + half


def verdict(low: float, high: float) -> str:
    """``lower`` / ``higher`` when the whole interval is below / above 0, else ``inconclusive``."""
    if high < 0:
        return "lower"
    if low > 0:
        return "higher"
    return "inconclusive"  # also NaN bounds (one seed)


def _runs(folder: str) -> dict:
    """{label: {seed: results.Run}} of the finished runs in one setting's folder."""
    by_label: dict = {}
    if os.path.isdir(folder):
        for r in results.finished_runs(folder):
            by_label.setdefault(r.label, {})[r.seed] = r
    return by_label


def compare(runs: dict, method: str, baseline: str) -> Optional[dict]:
    """One row of the table: ``method`` against ``baseline`` over the seeds both finished."""
    mine, base = runs.get(method, {}), runs.get(baseline, {})
    seeds = sorted(set(mine) & set(base))
    if not seeds:
        return None
    loss = [mine[k].summary["final_train_loss"] - base[k].summary["final_train_loss"] for k in seeds]
    acc = [mine[k].summary["test_accuracy"] - base[k].summary["test_accuracy"] for k in seeds]
    d_loss, d_acc = paired(loss), paired(acc)
    return {
        "method": method,
        "seeds": seeds,
        "final_train_loss": float(np.mean([mine[k].summary["final_train_loss"] for k in seeds])),
        "test_accuracy": float(np.mean([mine[k].summary["test_accuracy"] for k in seeds])),
        "syncs": float(np.mean([mine[k].summary["syncs"] for k in seeds])),
        "bytes": float(np.mean([mine[k].summary["bytes"] for k in seeds])),
        "seeds_won": int(sum(d < 0 for d in loss)) if method != baseline else None,
        "loss_diff": d_loss[0], "loss_ci": [d_loss[1], d_loss[2]],
        "acc_diff": d_acc[0], "acc_ci": [d_acc[1], d_acc[2]],
        "verdict": verdict(d_loss[1], d_loss[2]) if method != baseline else None,
    }


def rows(grid, out: str) -> list[dict]:
    """Every (setting, method) row, the baseline first in each setting."""
    table = []
    for setting in grid.settings:
        runs = _runs(os.path.join(out, setting.name))
        order = [grid.baseline] + [m for m in grid.methods if m != grid.baseline]
        for method in order:
            row = compare(runs, method, grid.baseline)
            if row is not None:
                table.append({"setting": setting.name, **row})
    return table


def _interval(mean: float, ci: list, digits: int) -> str:
    if math.isnan(ci[0]):
        return f"{mean:+.{digits}f}"
    return f"{mean:+.{digits}f} [{ci[0]:+.{digits}f}, {ci[1]:+.{digits}f}]"


def markdown(table: list[dict], baseline: str) -> str:
    """The per-setting table and, per method, how many settings each verdict got."""
    head = ["setting", "method", "syncs", "MB / worker", "train loss", f"seeds won vs {baseline}",
            "Δ train loss [95% CI]", "verdict", "Δ test acc [95% CI]"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in table:
        ours = r["method"] != baseline
        lines.append("| " + " | ".join([
            r["setting"], r["method"], f"{r['syncs']:.0f}", f"{r['bytes'] / 1e6:.2f}", f"{r['final_train_loss']:.4f}",
            f"{r['seeds_won']} / {len(r['seeds'])}" if ours else "—",
            _interval(r["loss_diff"], r["loss_ci"], 4) if ours else "—",
            r["verdict"] if ours else "—",
            _interval(r["acc_diff"], r["acc_ci"], 4) if ours else "—"]) + " |")
    counts: dict = {}
    for r in table:
        if r["method"] != baseline:
            counts.setdefault(r["method"], dict.fromkeys(VERDICTS, 0))[r["verdict"]] += 1
    summary = [f"\nTraining loss against {baseline}, settings per verdict:\n",
               "| method | " + " | ".join(VERDICTS) + " |", "|---|" + "---|" * len(VERDICTS)]
    summary += [f"| {m} | " + " | ".join(str(c[v]) for v in VERDICTS) + " |" for m, c in counts.items()]
    return "\n".join(lines + summary) + "\n"


def pivot(table: list[dict], baseline: str) -> str:
    """One row per setting, one column per method: the mean paired difference in final training
    loss against the baseline x 1000, its 95% interval, and * where the verdict is lower / + higher."""
    methods = list(dict.fromkeys(r["method"] for r in table if r["method"] != baseline))
    settings = list(dict.fromkeys(r["setting"] for r in table))
    cell = {(r["setting"], r["method"]): r for r in table}
    mark = {"lower": " **↓**", "higher": " **↑**", "inconclusive": ""}
    lines = [f"Δ final training loss against {baseline} × 1000, mean [95% CI] over seed pairs "
             f"(↓ / ↑: the whole interval below / above 0):\n",
             "| setting | " + " | ".join(methods) + " |", "|---|" + "---|" * len(methods)]
    for name in settings:
        row = [name]
        for m in methods:
            r = cell.get((name, m))
            if r is None:
                row.append("")
            elif math.isnan(r["loss_ci"][0]):
                row.append(f"{1e3 * r['loss_diff']:+.2f}")
            else:
                lo, hi = 1e3 * r["loss_ci"][0], 1e3 * r["loss_ci"][1]
                row.append(f"{1e3 * r['loss_diff']:+.2f} [{lo:+.2f}, {hi:+.2f}]{mark[r['verdict']]}")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def _curve(rs: list, key: str, n: int) -> np.ndarray:
    return np.mean([[row[key] for row in r.metrics[:n]] for r in rs], axis=0)


def plot(grid, out: str, path: str) -> None:
    """Seed-mean training loss against bytes sent per worker, one panel per setting."""
    from matplotlib.figure import Figure

    cols = len(grid.settings) // len({s.partition for s in grid.settings})
    nrows = math.ceil(len(grid.settings) / cols)
    fig = Figure(figsize=(3.2 * cols, 2.6 * nrows))
    axes = fig.subplots(nrows, cols, squeeze=False)
    for ax, setting in zip(axes.flat, grid.settings):
        runs = _runs(os.path.join(out, setting.name))
        for index, method in enumerate(grid.methods):
            rs = list(runs.get(method, {}).values())
            if not rs:
                continue
            n = min(len(r.metrics) for r in rs)
            width = max(1, rs[0].summary["steps_per_epoch"])
            loss = np.convolve(_curve(rs, "loss", n), np.ones(width) / width, mode="valid")
            sent = np.maximum(_curve(rs, "bytes", n)[width - 1:], 1) / 1e6
            ax.plot(sent, loss, label=method, color=f"C{index % 10}", linewidth=0.9)
        ax.set_xscale("log")
        ax.set_title(setting.name, fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    for ax in axes[-1]:
        ax.set_xlabel("MB sent per worker (log)", fontsize=7)
    for ax in axes[:, 0]:
        ax.set_ylabel("training loss", fontsize=7)
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper center", ncol=len(labels), fontsize=7)
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    fig.savefig(path, dpi=110)


def write(grid, out: str, plots: bool = True) -> str:
    """Write study.md, study.json (and the plot) under ``out``; returns the Markdown."""
    table = rows(grid, out)
    text = pivot(table, grid.baseline) + "\n" + markdown(table, grid.baseline)
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, STUDY_MD), "w") as f:
        f.write(text)
    clean = [{k: [results.clean(x) for x in v] if isinstance(v, list) else results.clean(v) for k, v in r.items()}
             for r in table]  # NaN bounds (one seed) as null
    results.write_json_atomic(os.path.join(out, STUDY_JSON), {"baseline": grid.baseline, "rows": clean})
    if plots and table:
        plot(grid, out, os.path.join(out, STUDY_PLOT))
    return text
