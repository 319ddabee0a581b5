"""The study's tables and plot, from the finished runs of ``experiments.study``.

One table per baseline: ``study.md`` / ``study.json`` against the grid's
baseline, ``study_vs_<baseline>.md`` / ``.json`` against any other. Per
setting and method, against the baseline, over the seeds both ran (runs of
one seed share data order and initialisation, so they pair):

* seeds won: seeds on which the method's final training loss (of the
  averaged model, whole training set) is below the baseline's;
* final training loss and test accuracy: the paired tests, intervals and
  Holm's correction of ``experiments/paired_tests.py``, the family of a
  table being every one of its rows (all methods x all settings against its
  baseline), one family for the training loss and one for the accuracy.

``loss_vs_bytes.png``: the seed-mean training loss (minibatch, one-epoch
running mean) against the bytes each worker sent, one panel per setting.
"""

from __future__ import annotations

import math
import os
from typing import Optional

import numpy as np

from experiments import results
from experiments.paired_tests import ALPHA, VERDICTS, decide, holm, paired, paired_p, per_example

STUDY_MD, STUDY_JSON, STUDY_PLOT = "study.md", "study.json", "loss_vs_bytes.png"
NO_CORRECT = "n/a: a summary.json without test_correct (an older run): no per-example test"


def outputs(baseline: str, grid_baseline: str) -> tuple[str, str]:
    """(Markdown, JSON) file names of the table against ``baseline``: study.* for the grid's own."""
    if baseline == grid_baseline:
        return STUDY_MD, STUDY_JSON
    return f"study_vs_{baseline}.md", f"study_vs_{baseline}.json"


def setting_runs(folder: str) -> dict:
    """{method: {seed: results.Run}} of the finished runs in one setting's folder (a setting's runs share
    their options, e.g. its fragments, which their labels carry)."""
    by_method: dict = {}
    if os.path.isdir(folder):
        for r in results.finished_runs(folder):
            by_method.setdefault(r.summary["config"]["method"], {})[r.seed] = r
    return by_method


def _accuracy(mine: dict, base: dict, seeds: list) -> dict:
    """The per-example accuracy test of one row, or n/a with the reason."""
    pairs = [(results.unpack_correct(mine[k].summary.get("test_correct")),
              results.unpack_correct(base[k].summary.get("test_correct"))) for k in seeds]
    if any(m is None or o is None for m, o in pairs):
        return {"acc_diff": None, "acc_ci": [None, None], "acc_p": None, "acc_b": None, "acc_c": None,
                "acc_n": None, "acc_note": NO_CORRECT}
    if len({len(m) for pair in pairs for m in pair}) != 1:
        return {"acc_diff": None, "acc_ci": [None, None], "acc_p": None, "acc_b": None, "acc_c": None,
                "acc_n": None, "acc_note": "n/a: the runs' test sets differ in size"}
    t = per_example(pairs)
    return {"acc_diff": t["diff"], "acc_ci": t["ci"], "acc_p": t["p"], "acc_b": t["b"], "acc_c": t["c"],
            "acc_n": t["n"], "acc_note": None}


def compare(runs: dict, method: str, baseline: str) -> Optional[dict]:
    """One row of the table: ``method`` against ``baseline`` over the seeds both finished (raw p-values;
    ``adjust`` adds the adjusted ones and the verdicts)."""
    mine, base = runs.get(method, {}), runs.get(baseline, {})
    seeds = sorted(set(mine) & set(base))
    if not seeds:
        return None
    loss = [mine[k].summary["final_train_loss"] - base[k].summary["final_train_loss"] for k in seeds]
    d_loss, ours = paired(loss), method != baseline
    row = {
        "method": method,
        "seeds": seeds,
        "final_train_loss": float(np.mean([mine[k].summary["final_train_loss"] for k in seeds])),
        "test_accuracy": float(np.mean([mine[k].summary["test_accuracy"] for k in seeds])),
        "syncs": float(np.mean([mine[k].summary["syncs"] for k in seeds])),
        "bytes": float(np.mean([mine[k].summary["bytes"] for k in seeds])),
        "seeds_won": int(sum(d < 0 for d in loss)) if ours else None,
        "loss_diff": d_loss[0], "loss_ci": [d_loss[1], d_loss[2]],
        "loss_p": paired_p(loss) if ours else None,
    }
    if ours:
        row.update(_accuracy(mine, base, seeds))
    return row


def adjust(table: list[dict], baseline: str) -> None:
    """Holm-adjust each family (the loss rows, the accuracy rows) over the whole table and set the verdicts."""
    ours = [r for r in table if r["method"] != baseline]
    for key, prefix in (("loss_p", "loss"), ("acc_p", "acc")):
        raw = [math.nan if r.get(key) is None else r[key] for r in ours]
        for r, p_raw, p_adj in zip(ours, raw, holm(raw)):
            mean = r["loss_diff"] if prefix == "loss" else r["acc_diff"]
            r[f"{key}_holm"] = None if math.isnan(p_adj) else p_adj
            r[f"{prefix}_raw_verdict"] = decide(mean, p_raw) if mean is not None else None
            r[f"{prefix}_verdict"] = decide(mean, p_adj) if mean is not None else None
    for r in table:
        r["verdict"], r["raw_verdict"] = r.pop("loss_verdict", None), r.pop("loss_raw_verdict", None)


def rows(grid, out: str, baseline: Optional[str] = None) -> list[dict]:
    """Every (setting, method) row against ``baseline`` (default the grid's), the baseline first in each
    setting, with Holm-adjusted p-values and verdicts over the whole table."""
    baseline = baseline or grid.baseline
    table = []
    for setting in grid.settings:
        runs = setting_runs(os.path.join(out, setting.name))
        order = [baseline] + [m for m in grid.methods if m != baseline]
        for method in order:
            row = compare(runs, method, baseline)
            if row is not None:
                table.append({"setting": setting.name, **row})
    adjust(table, baseline)
    return table


def _interval(mean, ci: list, digits: int, scale: float = 1.0) -> str:
    if mean is None:
        return "n/a"
    if ci[0] is None or math.isnan(ci[0]):
        return f"{scale * mean:+.{digits}f}"
    return f"{scale * mean:+.{digits}f} [{scale * ci[0]:+.{digits}f}, {scale * ci[1]:+.{digits}f}]"


def _p(p) -> str:
    return "n/a" if p is None or math.isnan(p) else f"{p:.2g}" if p >= 1e-4 else f"{p:.1e}"


def compared_cells(r: dict) -> list[str]:
    """The compared columns of one method's row."""
    if r.get("acc_b") is None:
        acc = ["n/a"] * 5
    else:
        acc = [_interval(r["acc_diff"], r["acc_ci"], 4), f"{r['acc_b']} / {r['acc_c']}", _p(r["acc_p"]), _p(r["acc_p_holm"]),
               r["acc_verdict"]]
    return [f"{r['seeds_won']} / {len(r['seeds'])}", _interval(r["loss_diff"], r["loss_ci"], 4), _p(r["loss_p"]),
            _p(r["loss_p_holm"]), r["verdict"], r["raw_verdict"], *acc]


def _changed(table: list[dict], baseline: str, prefix: str) -> tuple[int, int]:
    """(verdicts the correction changed, verdicts) of one family."""
    key = "verdict" if prefix == "loss" else "acc_verdict"
    raw = "raw_verdict" if prefix == "loss" else "acc_raw_verdict"
    ours = [r for r in table if r["method"] != baseline and r.get(key) is not None]
    return sum(r[key] != r[raw] for r in ours), len(ours)


def markdown(table: list[dict], baseline: str) -> str:
    """The per-setting table and, per method, how many settings each (adjusted) verdict got."""
    head = ["setting", "method", "syncs", "MB / worker", "train loss", f"seeds won vs {baseline}",
            "Δ train loss [95% t-CI, unadjusted]", "p", "p (Holm)", "verdict (Holm)", "raw verdict",
            "Δ test acc [95% Wald CI]", "b / c", "p acc", "p acc (Holm)", "acc verdict (Holm)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in table:
        cells = compared_cells(r) if r["method"] != baseline else ["—"] * 11
        lines.append("| " + " | ".join([r["setting"], r["method"], f"{r['syncs']:.0f}", f"{r['bytes'] / 1e6:.2f}",
                                        f"{r['final_train_loss']:.4f}", *cells]) + " |")
    counts: dict = {}
    for r in table:
        if r["method"] != baseline:
            counts.setdefault(r["method"], dict.fromkeys(VERDICTS, 0))[r["verdict"]] += 1
    summary = [f"\nTraining loss against {baseline}, settings per verdict (Holm-adjusted):\n",
               "| method | " + " | ".join(VERDICTS) + " |", "|---|" + "---|" * len(VERDICTS)]
    summary += [f"| {m} | " + " | ".join(str(c[v]) for v in VERDICTS) + " |" for m, c in counts.items()]
    (loss_changed, loss_n), (acc_changed, acc_n) = _changed(table, baseline, "loss"), _changed(table, baseline, "acc")
    summary.append(f"\nThe correction changes {loss_changed} of {loss_n} training-loss verdicts and {acc_changed} of "
                   f"{acc_n} test-accuracy verdicts (against the raw p < {ALPHA}).")
    missing = sum(r["method"] != baseline and r.get("acc_b") is None for r in table)
    if missing:
        summary.append(f"\nAccuracy n/a in {missing} rows: {NO_CORRECT}.")
    return "\n".join(lines + summary) + "\n"


def pivot(table: list[dict], baseline: str) -> str:
    """One row per setting, one column per method: the mean paired difference in final training
    loss against the baseline x 1000, its unadjusted 95% interval, and ↓ / ↑ where the Holm verdict
    is lower / higher."""
    methods = list(dict.fromkeys(r["method"] for r in table if r["method"] != baseline))
    settings = list(dict.fromkeys(r["setting"] for r in table))
    cell = {(r["setting"], r["method"]): r for r in table}
    mark = {"lower": " **↓**", "higher": " **↑**", "inconclusive": ""}
    lines = [f"Δ final training loss against {baseline} × 1000, mean [95% t-CI, unadjusted] over seed pairs "
             f"(↓ / ↑: lower / higher at Holm-adjusted p < {ALPHA} over the whole table):\n",
             "| setting | " + " | ".join(methods) + " |", "|---|" + "---|" * len(methods)]
    for name in settings:
        row = [name]
        for m in methods:
            r = cell.get((name, m))
            row.append("" if r is None else _interval(r["loss_diff"], r["loss_ci"], 2, 1e3) + mark[r["verdict"]])
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def _config(grid, out: str) -> Optional[dict]:
    """The saved config of one finished run of the grid (the flags every setting shares), or None."""
    for setting in grid.settings:
        for by_seed in setting_runs(os.path.join(out, setting.name)).values():
            for r in by_seed.values():
                return r.summary["config"]
    return None


def scope(grid, out: str, baseline: str, table: list[dict]) -> str:
    """The paragraph that opens a page: the family, the tests, the correction and what the table rests on."""
    ours = sum(r["method"] != baseline for r in table)
    c = _config(grid, out) or {}
    model = c.get("model", "?")
    run = (f"model {model}, {c.get('epochs', '?')} epochs, lr {c.get('lr', '?')}, budget --avg-period "
           f"{c.get('avg_period', '?')}" if c else "no finished run")
    return (f"Against **{baseline}**. Scope: dataset {grid.dataset}; {run}; partitions "
            f"{', '.join(dict.fromkeys(s.partition for s in grid.settings))}; lr schedules "
            f"{', '.join(dict.fromkeys(s.lr_schedule for s in grid.settings))}; workers "
            f"{', '.join(str(n) for n in dict.fromkeys(s.workers for s in grid.settings))} (batch per worker "
            f"{', '.join(str(b) for b in dict.fromkeys(s.batch_size for s in grid.settings))}); seeds "
            f"{', '.join(map(str, grid.seeds))}; extra flags `{' '.join(grid.args) or '(none)'}`. "
            f"Family: the {ours} rows of this table (every method × every setting against {baseline}), one "
            f"family for the final training loss and one for the test accuracy. Tests: the paired t-test over "
            f"seeds of the training loss; for the accuracy, the exact binomial test of the discordant examples "
            f"pooled over seeds (stratified McNemar) with a Wald interval. Correction: Holm over each family "
            f"(family-wise error rate {ALPHA}); the verdicts and arrows are Holm's, the raw verdict uses the "
            f"unadjusted p. Nothing here speaks for other data, models, worker counts or budgets.\n")


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
        runs = setting_runs(os.path.join(out, setting.name))
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


def clean_rows(table: list[dict]) -> list[dict]:
    """The rows for JSON: NaN (the bounds of one seed) as null."""
    return [{k: [results.clean(x) for x in v] if isinstance(v, list) else results.clean(v) for k, v in r.items()}
            for r in table]


def write(grid, out: str, plots: bool = True, baseline: Optional[str] = None) -> str:
    """Write the table against ``baseline`` (default the grid's) under ``out``, as study.md / study.json
    for the grid's baseline and study_vs_<baseline>.md / .json for another, and the plot; returns the
    Markdown."""
    baseline = baseline or grid.baseline
    table = rows(grid, out, baseline)
    text = scope(grid, out, baseline, table) + "\n" + pivot(table, baseline) + "\n" + markdown(table, baseline)
    os.makedirs(out, exist_ok=True)
    md, js = outputs(baseline, grid.baseline)
    with open(os.path.join(out, md), "w") as f:
        f.write(text)
    results.write_json_atomic(os.path.join(out, js), {"baseline": baseline, "family_size": sum(
        r["method"] != baseline for r in table), "correction": "holm", "alpha": ALPHA, "rows": clean_rows(table)})
    if plots and table:
        plot(grid, out, os.path.join(out, STUDY_PLOT))
    return text
