"""The study's table of streaming averaging: every setting with fragments, a delay or a mixing weight
against the same method in the setting without them (P = 1, tau = 0, alpha = 0), paired by seed.

Written as ``study_fragments.md`` / ``.json`` beside the study's own tables when the grid varies
``fragments``, ``fragment_delays`` or ``fragment_alphas``. The comparison and the tests are the study
table's (``study_report.compare``: the paired t-test of the final training loss, the stratified
per-example test of the accuracy); the family is this table's rows, one for the loss and one for the
accuracy, each Holm-adjusted. At equal ``--avg-period`` every setting sends the same bytes to within
the rounding of T / (H / P) rounds.
"""

from __future__ import annotations

import os
from typing import Optional

from experiments import paired_tests, results, study_report

STREAMING_MD, STREAMING_JSON = "study_fragments.md", "study_fragments.json"
_REFERENCE = "P=1"  # the name the reference run takes in a row's comparison


def _plain(setting):
    """The setting's counterpart without streaming averaging."""
    return setting._replace(fragments=1, fragment_delay=0, fragment_alpha=0.0)


def rows(grid, out: str) -> list[dict]:
    """One row per (streamed setting, method) whose counterpart finished runs of the same seeds, with
    Holm-adjusted p-values and verdicts over the table."""
    table = []
    for setting in grid.settings:
        if setting == _plain(setting):
            continue
        mine = study_report.setting_runs(os.path.join(out, setting.name))
        base = study_report.setting_runs(os.path.join(out, _plain(setting).name))
        for method in grid.methods:
            row = study_report.compare({method: mine.get(method, {}), _REFERENCE: base.get(method, {})}, method,
                                       _REFERENCE)
            if row is not None:
                reference = [base[method][k].summary["final_train_loss"] for k in row["seeds"]]
                table.append({"setting": setting.name, "reference": _plain(setting).name, "fragments": setting.fragments,
                              "fragment_delay": setting.fragment_delay, "fragment_alpha": setting.fragment_alpha,
                              "reference_train_loss": sum(reference) / len(reference), **row})
    study_report.adjust(table, _REFERENCE)
    return table


def markdown(table: list[dict]) -> str:
    head = ["setting", "method", "P", "τ", "α", "rounds", "bytes / round", "MB / worker", "train loss",
            "train loss at P=1, τ=0", "seeds won", "Δ train loss [95% t-CI, unadjusted]", "p", "p (Holm)",
            "verdict (Holm)", "raw verdict", "Δ test acc [95% Wald CI]", "b / c", "p acc", "p acc (Holm)",
            "acc verdict (Holm)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in table:
        lines.append("| " + " | ".join([
            r["setting"], r["method"], str(r["fragments"]), str(r["fragment_delay"]), f"{r['fragment_alpha']:g}",
            f"{r['syncs']:.0f}", f"{r['bytes'] / max(r['syncs'], 1):.0f}", f"{r['bytes'] / 1e6:.3f}",
            f"{r['final_train_loss']:.4f}", f"{r['reference_train_loss']:.4f}", *study_report.compared_cells(r)]) + " |")
    return "\n".join(lines) + "\n"


def write(grid, out: str) -> Optional[str]:
    """Write study_fragments.md / .json under ``out`` when the grid has streamed settings; returns the
    Markdown (None when the grid has none)."""
    if all(s == _plain(s) for s in grid.settings):
        return None
    table = rows(grid, out)
    scope = (f"Streaming averaging against the same method without it (P = 1, τ = 0, α = 0) in the same "
             f"partition, learning-rate schedule and worker count, paired by seed. Family: the {len(table)} rows "
             f"of this table, one for the final training loss and one for the test accuracy, each Holm-adjusted "
             f"(family-wise error rate {paired_tests.ALPHA}). Bytes are per worker; a round sends one fragment.\n\n")
    text = scope + markdown(table)
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, STREAMING_MD), "w") as f:
        f.write(text)
    results.write_json_atomic(os.path.join(out, STREAMING_JSON), {"family_size": len(table), "correction": "holm",
                                                                   "alpha": paired_tests.ALPHA,
                                                                   "rows": study_report.clean_rows(table)})
    return text
