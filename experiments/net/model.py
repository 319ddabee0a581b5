"""Measured run times against the time model, for ``python -m experiments.net``.

A ``Run`` reads one finished run of a multi-process launch: its result
files and the step clock every process recorded (``STEP_TIMES``, written by
``experiments/net/worker.py``). The analysis sets the measured wall-clock
against two predictions of ``adpsgd_jax.timemodel`` (docs/algorithm.md,
"Time model"):

    predicted = T * t_compute + sum over rounds of t_round

* t_compute: the mean duration of the steps without a sync in the averaging
  runs of the same launch, of the slowest process (the others wait for it
  at each sync).
* ``model``: the time model as written (``timemodel.simulated_wall_clock``,
  no overlap, as the measured runs have none; allreduce with ideal overlap is
  given beside it): t_round = t_allreduce(B, N, Link(beta, lambda)) with beta
  the link rate and lambda half the measured round trip of a 1-byte message.
* ``model+gloo`` (``gloo``): what the measurements showed the model misses.
  gloo runs one ring all-reduce per array (XLA's CPU all-reduce thunk loops
  over the operands of its combined all-reduce), each with a fixed cost far
  above the wire's latency, and that cost differs between a sync after local
  steps and an allreduce step in lock-step. So a round of k arrays costs
  k * 2(N - 1) * lambda_a + 2(N - 1)/N * B / beta_eff, the same function
  with ``Link(beta_eff, 0, lambda_a)``: lambda_a calibrated on an unshaped
  link, once from the allreduce run and once from the averaging runs
  (``calibrate``; the shaped links are then predicted, not fitted), and
  beta_eff the TCP payload rate of the link (``ns.payload_rate``).
* comm/compute: per allreduce step, measured (step - t_compute) / t_compute,
  and the model's t_allreduce / t_compute.

Each link setting runs every method several times (repeats, ``bench.measure``);
every figure is computed per repeat and reported as the median over the
repeats with its range, min to max (``spread``). A prediction agrees with the
measurement when the two ranges overlap (``agrees``). t_compute, and so each
prediction, is measured per repeat too; model+gloo's lambda_a is the median of
the fits of the unshaped repeats.
"""

from __future__ import annotations

import os
import statistics
from typing import Optional

from adpsgd_jax import timemodel
from adpsgd_jax.timemodel import Link
from experiments import report, results
from experiments.net import ns

# Beside summary.json: per process, one row per step, {"step": s, "time_s": t}, t on that process's
# perf_counter clock when step s's metrics row was written, from the first row (after a barrier).
STEP_TIMES = "step_times-{}.jsonl"


def link_label(rate_mbit: Optional[float]) -> str:
    if rate_mbit is None:
        return "unshaped"
    return f"{rate_mbit / 1000:g} Gbit/s" if rate_mbit >= 1000 else f"{rate_mbit:g} Mbit/s"


class Run:
    """One finished run: counts from its result files, loop times from its step clocks.

    Entry t of a clock is taken when step t's metrics reach the host: on the
    CPU client that copy waits for the step dispatched after it, so entry t
    marks the end of step t + 1, except at an epoch's last step, whose
    metrics are read before anything else is dispatched. ``loop_s[i]`` is
    process i's clock with the evaluations (after each epoch's last entry)
    taken out; see ``_without_evaluations``.
    """

    def __init__(self, folder: str, processes: int):
        self.result = results.Run(folder)
        summary, metrics = self.result.summary, self.result.metrics
        self.evals = [(r["step"], r["test_accuracy"]) for r in self.result.evals]
        self.synced = [bool(r["synced"]) for r in metrics]
        self.syncs_upto = [r["syncs"] for r in metrics]
        self.steps, self.syncs = summary["steps"], summary["syncs"]
        self.steps_per_epoch = summary["steps_per_epoch"]
        self.bytes_per_round = summary["bytes"] / max(self.syncs, 1)
        clocks = [results.read_jsonl(os.path.join(folder, STEP_TIMES.format(i))) for i in range(processes)]
        if any([r["step"] for r in c] != list(range(1, self.steps + 1)) for c in clocks) \
                or len(self.synced) != self.steps:
            raise RuntimeError(f"{folder}: {[len(c) for c in clocks]} timed steps, {self.steps} expected")
        self.loop_s = [self._without_evaluations([r["time_s"] for r in c]) for c in clocks]

    # The clocks start at the end of step 2 (step 1 compiles): measurements and
    # predictions both cover steps 3 to T (to a target: steps 3 to its step).
    @property
    def timed_steps(self) -> int:
        return self.steps - 2

    @property
    def timed_syncs(self) -> int:
        return self.syncs - self.syncs_upto[1]

    @property
    def measured_s(self) -> float:
        """Process 0's loop wall-clock over the timed steps."""
        return self.loop_s[0][-1]

    @property
    def step_s(self) -> float:
        return self.measured_s / self.timed_steps

    @property
    def epoch_s(self) -> float:
        return self.step_s * self.steps_per_epoch

    def time_to(self, step: int) -> float:
        """Measured loop time from the end of step 2 to the end of ``step``, an epoch's last step."""
        return self.loop_s[0][step - 1]

    def syncs_to(self, step: int) -> int:
        """Syncs among steps 3 to ``step``."""
        return self.syncs_upto[step - 1] - self.syncs_upto[1]

    def _epoch_end(self, step: int) -> bool:
        return step % self.steps_per_epoch == 0 or step == self.steps

    def _durations(self, clock: list[float], synced: bool) -> list[float]:
        """Durations of the steps with both ends on ``clock`` and no evaluation between them:
        step s ends at entry s - 1 (index s - 2) unless step s - 1 ended an epoch."""
        return [clock[s - 2] - clock[s - 3] for s in range(3, self.steps + 1)
                if not self._epoch_end(s - 1) and not self._epoch_end(s - 2) and self.synced[s - 1] == synced]

    def durations(self, process: int, synced: bool) -> list[float]:
        """Durations of process ``process``'s steps with (``synced``) or without a sync, as measured."""
        return self._durations(self.loop_s[process], synced)

    def _without_evaluations(self, clock: list[float]) -> list[float]:
        """The loop clock less the evaluations: from entry 1, the sum of the intervals between entries.

        After an epoch's last entry t the process evaluates, so the interval
        to entry t + 1, which ends step t + 1 (t + 2 unless t + 1 ends an
        epoch too), is replaced by the mean durations of those steps' kinds
        (with or without a sync; the mean of all steps where a kind has none)
        of this clock: the hook that records the clock sees no evaluation end.
        """
        kinds = {synced: self._durations(clock, synced) for synced in (True, False)}
        every = kinds[True] + kinds[False]
        mean = {k: statistics.fmean(d or every) for k, d in kinds.items()} if every else {}
        out = [0.0]
        for s in range(2, self.steps + 1):
            interval = clock[s - 1] - clock[s - 2]
            if self._epoch_end(s - 1) and mean:
                ended = range(s, s + 1 if self._epoch_end(s) else s + 2)  # steps ended between entries s - 1, s
                interval = sum(mean[self.synced[c - 1]] for c in ended)
            out.append(out[-1] + interval)
        return out

    def first_reaching(self, accuracy: float) -> Optional[int]:
        return report.first_step_reaching(self.result, accuracy)


def predicted_s(link: Link, run: Run, t_compute: float, workers: int, arrays: int, overlap: bool = False) -> float:
    """The timed steps of ``run`` by ``timemodel.simulated_wall_clock``, ``t_compute`` per step."""
    return timemodel.simulated_wall_clock(run.timed_steps * t_compute, run.timed_syncs, run.bytes_per_round, workers,
                                          link, arrays, steps=run.timed_steps, overlap=overlap)


def compute_step_s(runs: dict[str, Run], processes: int) -> Optional[float]:
    """t_compute: the mean step without a sync in the averaging runs, of the slowest
    process (which the others wait for at each sync); None without an averaging run."""
    local = [[d for m, r in runs.items() if m != "allreduce" for d in r.durations(i, synced=False)]
             for i in range(processes)]
    return max(statistics.fmean(x) for x in local) if local[0] else None


def analyse(runs: dict[str, Run], workers: int, models: dict[str, tuple[Link, Link]],
            arrays: tuple[int, int], to_target: bool = True) -> dict:
    """Measured and predicted times of one launch; predictions need an averaging run (for t_compute).
    ``to_target``: also the times to the lowest final test accuracy of the runs."""
    full, t_c = runs["allreduce"], compute_step_s(runs, workers)
    target = min(r.evals[-1][1] for r in runs.values()) if to_target else None
    out = {"compute_s_per_step": t_c, "target_accuracy": target, "allreduce_step_s": full.step_s,
           "steps": full.steps, "timed_steps": full.timed_steps, "methods": {}}
    if t_c is not None:
        out["comm_compute_ratio"] = (full.step_s - t_c) / t_c
        model_round = timemodel.allreduce_time(full.bytes_per_round, workers, models["model"][0], arrays[0])
        out["comm_compute_ratio_model"] = model_round / t_c
    for method, run in runs.items():
        k = arrays[0] if method == "allreduce" else arrays[1]
        row = out["methods"][method] = {
            "steps": run.steps, "syncs": run.syncs, "bytes_per_round": run.bytes_per_round,
            "measured_s": run.measured_s, "epoch_s": run.epoch_s, "final_test_accuracy": run.evals[-1][1],
            # what each round cost beyond the compute, on average: the quantity the models predict
            "measured_sync_s": beyond_compute(run, t_c) if t_c is not None else None}
        if to_target:
            step = row["target_step"] = run.first_reaching(target)
            row["measured_to_target_s"] = run.time_to(step)
        for name, (lockstep, after_local) in models.items():
            if t_c is None:
                continue
            link = lockstep if method == "allreduce" else after_local
            sync = timemodel.allreduce_time(run.bytes_per_round, workers, link, k)
            row[f"{name}_sync_s"] = sync
            row[f"{name}_s"] = predicted_s(link, run, t_c, workers, k)
            if to_target:
                row[f"{name}_to_target_s"] = (step - 2) * t_c + run.syncs_to(step) * sync
            if method == "allreduce":
                row[f"{name}_overlap_s"] = predicted_s(link, run, t_c, workers, k, overlap=True)
    return out


def beyond_compute(run: Run, t_compute: float) -> float:
    """What a round cost on average beyond the compute: (measured - steps x t_compute) / rounds, timed steps."""
    return (run.measured_s - run.timed_steps * t_compute) / run.timed_syncs


def calibrate(runs: dict[str, Run], t_compute: float, workers: int, rate_Bps: float,
              arrays: tuple[int, int]) -> tuple[float, float]:
    """(lambda_a of an allreduce step, lambda_a of an averaging sync): gloo's fixed cost per array
    and ring step, from runs on a link of ``rate_Bps``. Per round, what the run took beyond its
    compute = arrays * 2(N - 1) * lambda_a + 2(N - 1)/N * B / rate."""
    def per_array(run: Run, k: int) -> float:
        wire = timemodel.allreduce_time(run.bytes_per_round, workers, Link(rate_Bps))
        return max(0.0, beyond_compute(run, t_compute) - wire) / (k * 2 * (workers - 1))

    averaging = [per_array(r, arrays[1]) for m, r in runs.items() if m != "allreduce"]
    return per_array(runs["allreduce"], arrays[0]), statistics.fmean(averaging)


def models_for(record: dict, per_array_s: Optional[tuple[float, float]]) -> dict[str, tuple[Link, Link]]:
    """name -> (link of an allreduce step, link of an averaging sync) as each model sees the record's
    link: the time model as written (one latency per round), and model+gloo when calibrated
    (``calibrate``: a latency per array instead)."""
    rate, probe = record["rate_mbit"], record["probe"]
    nominal = probe["goodput_Bps"] if rate is None else rate * 1e6 / 8
    model = Link(nominal, probe["rtt_s"] / 2)
    models = {"model": (model, model)}
    if per_array_s is not None:
        payload = probe["goodput_Bps"] if rate is None else ns.payload_rate(rate, record["mtu"])
        models["gloo"] = tuple(Link(payload, 0.0, per_array_latency=lam) for lam in per_array_s)
    return models


def spread(values: list) -> dict:
    """{"median", "range": [min, max]} of one figure over the repeats (None when any repeat has none)."""
    if not values or any(v is None for v in values):
        return {"median": None, "range": None}
    return {"median": statistics.median(values), "range": [min(values), max(values)]}


def agrees(predicted: dict, measured: dict) -> Optional[bool]:
    """Whether a prediction and a measurement agree within their spread: their ranges over the repeats
    (``spread``) overlap. None when either is missing."""
    if predicted["range"] is None or measured["range"] is None:
        return None
    return predicted["range"][0] <= measured["range"][1] and measured["range"][0] <= predicted["range"][1]


def wire_checks(record: dict, analyses: list[dict]) -> dict:
    """What a shaped link must show whatever the machine's load (load makes transfers and steps slower,
    never faster than the wire): the probe's transfer (``nbytes`` / goodput + rtt, its round trip) takes
    at least ``nbytes`` / rate, and the fastest repeat's allreduce step at least half the wire time of
    its round, B / rate (each step sends the round once; tbf's bucket lets two frames through early).
    name -> {"measured_s", "bound_s", "verdict": met / missed}; {} on an unshaped link."""
    rate = record["rate_mbit"]
    if rate is None:
        return {}
    beta, probe = rate * 1e6 / 8, record["probe"]
    nbytes = probe.get("nbytes", 1 << 20)
    full = analyses[0]["methods"]["allreduce"]["bytes_per_round"]
    pairs = {"probe_transfer_at_least_wire_time": (nbytes / probe["goodput_Bps"] + probe["rtt_s"], nbytes / beta),
             "allreduce_step_at_least_half_wire_time": (min(a["allreduce_step_s"] for a in analyses),
                                                        0.5 * full / beta)}
    return {name: {"measured_s": m, "bound_s": b, "verdict": "met" if m >= b else "missed"}
            for name, (m, b) in pairs.items()}


def _speedups(analysis: dict, method: str) -> dict:
    """The figures of one repeat's row for ``method``: speedups over allreduce, and Δ = predicted / measured - 1."""
    full, m = analysis["methods"]["allreduce"], analysis["methods"][method]
    speedup = lambda key: full[key] / m[key] if key in m else None  # noqa: E731
    row = {"comm_compute_ratio": analysis["comm_compute_ratio"],
           "comm_compute_ratio_model": analysis["comm_compute_ratio_model"],
           "epoch_s": m["epoch_s"], "allreduce_epoch_s": full["epoch_s"],
           "measured_speedup": speedup("measured_s"), "predicted_speedup": speedup("model_s"),
           "predicted_speedup_gloo": speedup("gloo_s"),
           "predicted_speedup_vs_overlapped_allreduce": full["model_overlap_s"] / m["model_s"],
           "measured_speedup_to_target": speedup("measured_to_target_s"),
           "predicted_speedup_to_target": speedup("model_to_target_s"),
           "predicted_speedup_to_target_gloo": speedup("gloo_to_target_s")}
    for key in ("", "_gloo"):
        predicted = row[f"predicted_speedup{key}"]
        row[f"disagreement{key}_pct"] = 100 * (predicted / row["measured_speedup"] - 1) if predicted is not None \
            else None
    return row


def _calibrated(records: list[dict], workers: int) -> dict:
    """workload -> (lambda_a of an allreduce step, of an averaging sync): ``calibrate`` on each repeat of
    the workload's first unshaped record, the median of each over its repeats."""
    per_array = {}
    for record in records:
        if record["rate_mbit"] is not None or record["workload"] in per_array:
            continue
        fits = []
        for rep in record["repeats"]:
            t_c = compute_step_s(rep["runs"], workers)
            if t_c is not None:
                fits.append(calibrate(rep["runs"], t_c, workers, record["probe"]["goodput_Bps"], record["arrays"]))
        if fits:
            per_array[record["workload"]] = tuple(statistics.median(f[i] for f in fits) for i in range(2))
    return per_array


LINK_FIGURES = ("compute_s_per_step", "allreduce_step_s", "comm_compute_ratio", "comm_compute_ratio_model")


def summarise(records: list[dict], workers: int) -> tuple[list[dict], list[dict]]:
    """(links, rows): per-setting analyses, and one row per averaging method and setting.

    A record is one setting: workload, rate_mbit (None: unshaped), mtu, probe
    ({rtt_s, goodput_Bps, nbytes}), arrays (per allreduce step, per sync),
    to_target, what else to pass on (loads), and repeats: one entry per repeat,
    {order, runs (method -> Run, allreduce among them)}. The first unshaped
    record of a workload calibrates its model+gloo. Every figure of a row is
    the median over the repeats, with its range (min, max) beside it as
    ``<figure>_range``; ``agrees`` / ``agrees_gloo``: whether the model's
    speedup and the measured one agree within their spread (``agrees``).
    """
    links, rows, per_array = [], [], _calibrated(records, workers)
    for record in records:
        workload, rate, arrays = record["workload"], record["rate_mbit"], record["arrays"]
        models = models_for(record, per_array.get(workload))
        analyses = [analyse(rep["runs"], workers, models, arrays, to_target=record["to_target"])
                    for rep in record["repeats"]]
        passed_on = {k: v for k, v in record.items() if k not in ("workload", "rate_mbit", "arrays", "repeats")}
        label = {"workload": workload, "bandwidth": link_label(rate), "bandwidth_mbit": rate}
        link = {**label, **passed_on, "arrays_per_round": arrays, "gloo_per_array_s": per_array.get(workload),
                "methods": analyses[0]["methods"], "checks": wire_checks(record, analyses),
                "repeats": [{**{k: v for k, v in rep.items() if k != "runs"}, **analysis}
                            for rep, analysis in zip(record["repeats"], analyses)]}
        for key in LINK_FIGURES:
            figure = spread([a.get(key) for a in analyses])
            link[key], link[f"{key}_range"] = figure["median"], figure["range"]
        links.append(link)
        for method in analyses[0]["methods"]:
            if method == "allreduce" or "model_s" not in analyses[0]["methods"][method]:
                continue
            per_repeat = [_speedups(a, method) for a in analyses]
            row = {**label, "strategy": method, "repeats": len(per_repeat)}
            for key in per_repeat[0]:
                figure = spread([r[key] for r in per_repeat])
                row[key], row[f"{key}_range"] = figure["median"], figure["range"]
            for key in ("", "_gloo"):
                row[f"agrees{key}"] = agrees({"range": row[f"predicted_speedup{key}_range"]},
                                             {"range": row["measured_speedup_range"]})
            rows.append(row)
    return links, rows


PREDICTED_BY = {"": "the time model as written (timemodel.simulated_wall_clock, docs/algorithm.md)",
                "_gloo": "the time model with gloo's per-array cost fitted on the unshaped link (model.calibrate)"}


def table(links: list[dict], rows: list[dict]) -> str:
    """Markdown: one line per averaging method and link setting, each figure the median over the repeats
    with its range (min-max) in brackets; then one note per link (its probe, medians, loads and wire checks)."""
    def cell(row, key, unit="x", digits=2):
        if row[key] is None:
            return "—"
        low, high = row[f"{key}_range"]
        return f"{row[key]:.{digits}f}{unit} ({low:.{digits}f}-{high:.{digits}f})"

    def delta(row, key):
        if row[f"disagreement{key}_pct"] is None:
            return "—"
        return f"{row[f'disagreement{key}_pct']:+.0f}% ({'agrees' if row[f'agrees{key}'] else 'differs'})"

    repeats = sorted({r["repeats"] for r in rows}) or sorted({len(link["repeats"]) for link in links})
    lines = [f"Each figure: the median over {', '.join(map(str, repeats))} repeats, in brackets its range (min-max); "
             "Δ = predicted / measured - 1 (median), 'agrees' when the two ranges overlap. Predicted by: "
             + "; ".join(f"{name} = {what}" for name, what in (("model", PREDICTED_BY[""]),
                                                                ("model+gloo", PREDICTED_BY["_gloo"]))) + ".", "",
             "| workload | link | comm/compute measured (model) | method | s/epoch (allreduce) | measured speedup | "
             "predicted: model | Δ | predicted: model+gloo | Δ | to target: measured | model | model+gloo |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['workload']} | {r['bandwidth']} | {r['comm_compute_ratio']:.2f} ({r['comm_compute_ratio_model']:.2f}) "
            f"| {r['strategy']} | {r['epoch_s']:.3f} ({r['allreduce_epoch_s']:.3f}) | {cell(r, 'measured_speedup')} "
            f"| {cell(r, 'predicted_speedup')} | {delta(r, '')} | {cell(r, 'predicted_speedup_gloo')} "
            f"| {delta(r, '_gloo')} | {cell(r, 'measured_speedup_to_target')} "
            f"| {cell(r, 'predicted_speedup_to_target')} | {cell(r, 'predicted_speedup_to_target_gloo')} |")
    return "\n".join(lines + [""] + [_link_note(link) for link in links])


def _link_note(link: dict) -> str:
    """One line per link setting: probe, median allreduce step and compute, loads, and the wire checks."""
    t_c, probe = link["compute_s_per_step"], link["probe"]
    checks = "; ".join(f"{name.replace('_', ' ')}: {c['verdict']} ({c['measured_s'] * 1e3:.2f} >= "
                       f"{c['bound_s'] * 1e3:.2f} ms)" for name, c in link["checks"].items())
    return (f"{link['workload']} @ {link['bandwidth']}: rtt {probe['rtt_s'] * 1e6:.0f} us, 1 MiB at "
            f"{probe['goodput_Bps'] * 8 / 1e6:.0f} Mbit/s, allreduce step {link['allreduce_step_s'] * 1e3:.2f} ms"
            + (f", compute {t_c * 1e3:.2f} ms" if t_c else "")
            + f", load {link['load_1min'][0]:.2f}/{link['load_1min'][1]:.2f}"
            + (f"; {checks}" if checks else ""))
