"""The benchmark's Markdown: the table of items 1-5, 1b and 8 with their targets, then items 6-7."""

from __future__ import annotations

from experiments.bench.runs import PAPER_C3_SPEEDUP
from experiments.names import BANDWIDTHS_GBPS

TARGETS = {  # name -> (comparison, target) of the results' <name>_ratio, <name>_ci, <name>_verdict
    "gate_overhead": ("<=", 1.02),
    "sync_over_allreduce": ("<=", 1.05),
    "throughput_vs_plain": (">=", 0.98),
    "gate_with_workers": ("<=", 1.02),
    "simulation_throughput": (">=", 0.8),  # one ratio per model, worker count K and loop: "mlp/K=8/vmap"
    "simulation_over_sequential": (">=", 0.95),
}


def markdown(res: dict) -> str:
    """The Markdown of a results dict: items 1-5, 1b and 8 with their targets, then items 6-7 where they ran."""
    lines = _items(res)
    if res.get("accuracy"):
        lines += _time_to_target(res["accuracy"])
        if res.get("projection"):
            lines += _projection(res)
        if res.get("qsgd"):
            lines += _qsgd(res["qsgd"])
    return "\n".join(lines) + "\n"


def _row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def _measured(res: dict, name: str, key=None) -> tuple[str, str, str]:
    """(measured, target, verdict) cells of ratio ``name`` (of worker count ``key``): the median ratio
    with its interval, the target, and the verdict of the interval (``stats.verdict``)."""
    op, target = TARGETS[name]
    pick = (lambda v: v) if key is None else (lambda v: v[key])
    if f"{name}_ratio" not in res:
        return "not measured", f"{op} {target}", ""
    (low, high), verdict = pick(res[f"{name}_ci"]), pick(res[f"{name}_verdict"])
    return f"{pick(res[f'{name}_ratio']):.3f} [{low:.3f}, {high:.3f}]", f"{op} {target}", verdict


def _interval_note(res: dict) -> str:
    """How each ratio and its interval were computed, from any ratio's coverage."""
    r = res["steps"]["ratios"]["gate_overhead"]
    return (f"Each ratio: the median of {r['repeats']} per-repetition ratios (variants timed in alternation, the "
            f"order reversed every other repetition), in brackets its distribution-free interval for the median "
            f"(order statistics, coverage {r['coverage'] * 100:.1f}%); met / missed only when the whole interval "
            "is inside / outside the target, else inconclusive.")


def _items(res: dict) -> list[str]:
    """The lines of the table of items 1-5 (1b and 8 where they ran), with the targets beside the measured figures."""
    s = res["steps"]
    lines = [f"Device: {res['device']}; model {res['model']} ({s['num_params']:,} parameters), "
             f"batch {res['batch_size']} per device; {res['repeats']} repetitions x "
             f"{res['steps_per_repeat']} steps; jax {res['jax_version']}.", "", _interval_note(res), "",
             "| item | measured [95% interval] | target | verdict |", "|---|---|---|---|"]
    t = s["step_seconds"]
    lines.append(_row([f"1. gate overhead: gated local step / step with no collective ({s['step_devices']} devices; "
                       f"{t['local_gated'] * 1e3:.2f} vs {t['local_plain'] * 1e3:.2f} ms)",
                       *_measured(res, "gate_overhead")]))
    if "gate_count" in s:
        lines.append(_count_row("1, counted", s["gate_count"]))
    lines.append(_row([f"2. sync step / allreduce step ({s['step_devices']} devices; {t['sync'] * 1e3:.2f} vs "
                       f"{t['allreduce'] * 1e3:.2f} ms)", *_measured(res, "sync_over_allreduce")]))
    if "sync_count" in s:
        c = s["step_counts"]
        lines.append(_row([f"2, counted: bytes on the path of the syncing step / the allreduce step "
                           f"({c['sync']['bytes'] / 1e6:.1f} vs {c['allreduce']['bytes'] / 1e6:.1f} MB; collectives "
                           f"{c['sync']['collectives']} vs {c['allreduce']['collectives']})",
                           f"{s['sync_count']['bytes_ratio']:.4f}", "<= 1.05", s["sync_count"]["verdict"]]))
    comp = res["compilations"]
    if comp:
        worst, per_method = max(comp.values()), ", ".join(f"{k} {v}" for k, v in comp.items())
        lines.append(f"| 3. compilations of the train step over a run, per method ({per_method}) "
                     f"| max {worst} | 1 | {'met' if worst == 1 else 'missed'} |")
    else:
        lines.append("| 3. compilations of the train step over a run | not measured (no training run) | 1 | |")
    ips = s["throughput_images_per_s_per_device"]
    lines.append(_row([f"4. throughput, images/s/device ({s['throughput_devices']} device): ADPSGD local "
                       f"{ips['adpsgd_local']:.1f}, allreduce {ips['allreduce']:.1f}, plain flax loop "
                       f"{ips['plain']:.1f}; ADPSGD / plain", *_measured(res, "throughput_vs_plain")]))
    pipeline, step_rate = s["input_pipeline_images_per_s"], ips["adpsgd_local"] * s["throughput_devices"]
    lines.append(f"| 4b. host input pipeline (crop+flip, uint8), images/s | {pipeline:.0f} | "
                 f"> step's {step_rate:.0f} | {'not the bottleneck' if pipeline > step_rate else 'BOTTLENECK'} |")
    mem = s["memory_bytes"]
    if s.get("memory_ratio_vs_plain") is not None:
        lines.append(f"| 5. compiled step memory, ADPSGD / plain ({mem['adpsgd_local']['total'] / 2**20:.1f} vs "
                     f"{mem['plain']['total'] / 2**20:.1f} MiB; extra = {s['memory_extra_in_param_copies']:.2f} "
                     f"parameter copies) | {s['memory_ratio_vs_plain']:.3f} | extra <= 1 parameter copy | "
                     f"{'met' if s['memory_extra_in_param_copies'] <= 1.0 else 'missed'} |")
    else:
        lines.append("| 5. compiled step memory | not reported by this backend | | |")
    if "plain_count" in s:
        lines.append(_count_row("4-5, counted: ADPSGD local step / plain flax loop", s["plain_count"], plain=True))
    if res.get("simulation"):
        gate, throughput = _simulation(res)
        item_1 = max(i for i, line in enumerate(lines) if line.startswith(("| 1. ", "| 1, ")))
        lines = lines[:item_1 + 1] + [gate] + lines[item_1 + 1:] + throughput
    return lines


def _count_row(label: str, c: dict, plain: bool = False) -> str:
    """A count verdict's row (``hlo.count_ratio``): bytes on the local path and extra copies."""
    what = label if plain else f"{label}: bytes on the local path, gated / no collective"
    return _row([f"{what} (copies {c['copies'][0]} vs {c['copies'][1]}; extra bytes copied = "
                 f"{c['extra_copies_in_param_copies']:.4f} parameter copies)", f"{c['bytes_ratio']:.4f}",
                 "<= 1.01, extra copies < 0.01", c["verdict"]])


def _simulation(res: dict) -> tuple[str, list[str]]:
    """The rows of item 1b and the table of item 8: K workers simulated on one device."""
    sim = res["simulation"]
    batch = sim["batch_size_per_worker"]
    first = sim["models"][0]
    t = sim["gate_step_seconds"]
    kept = "the cond kept" if sim["gate_conditional_in_program"] else "NO conditional left in the program"
    gate = [_row([f"1b. gate with workers: gated local step / step with no collective, K = {sim['gate_workers']} "
                  f"workers ({first}, {batch[first]} images per worker, 1 device, loop {sim['gate_loop']}; "
                  f"{t['local_gated'] * 1e3:.2f} vs {t['local_plain'] * 1e3:.2f} ms; {kept})",
                  *_measured(res, "gate_with_workers")])]
    gate += [_count_row(f"1b, counted, loop {loop}", c) for loop, c in sim["gate_counts"].items()]
    lines = ["", "Item 8, simulation: K workers on one device (gate shut) against one worker with K x the batch "
             "(target >= 0.8) and against K single-worker steps one after another (target >= 0.95); path bytes "
             f"of the K workers over the big batch's (count target <= {1.25}); copies and grouped convolutions "
             "of the K-worker program; XLA's compiled memory per worker. `auto`: the loop the run picks.", "",
             "| model | K | loop | vs big batch [95% interval] | verdict | vs sequential [95% interval] | verdict "
             "| path bytes / big batch | copied MB | grouped convs | MiB / worker |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for model, per_model in sim["throughput"].items():
        for k, row in per_model["per_k"].items():
            for loop, r in row["loops"].items():
                key = f"{model}/K={k}/{loop}"
                big, big_v = _measured(res, "simulation_throughput", key)[::2]
                seq, seq_v = _measured(res, "simulation_over_sequential", key)[::2]
                mem = r["memory_per_worker"]
                name = f"{loop} (auto)" if loop == per_model["auto"] else str(loop)
                lines.append(_row([f"{model} ({batch[model]} / worker)", k, name, big, big_v, seq, seq_v,
                                   f"{r['bytes_over_big_batch']:.3f} ({r['count_verdict']})",
                                   f"{r['counts']['copy_bytes'] / 1e6:.1f}", str(r["counts"]["grouped_convolutions"]),
                                   "n/a" if mem is None else f"{mem / 2**20:.2f}"]))
            lines.append(f"| {model} | {k} | auto = {per_model['auto']} | reaches a target: "
                         f"{row['auto_meets']} | | | | | | | |")
    return "\n".join(gate), lines


def _time_to_target(acc: dict) -> list[str]:
    """Item 6: steps, syncs, bytes and predicted time to the target accuracy per strategy."""
    lines = ["", f"Time to test accuracy {acc['target_test_accuracy']:.4f} on {acc['dataset']} "
             f"({acc['model']}, {acc['workers']} workers, {acc['epochs']} epochs, seeds {acc['seeds']}, "
             f"budget avg_period {acc['avg_period']}); predicted for {acc['predict_workers']} workers, "
             f"latency {acc['latency_s'] * 1e6:.0f} us, with one worker's probed compute per step "
             "(compute_step_s, no communication); allreduce "
             "without overlap (ideal overlap in brackets):", "",
             _row(["strategy", "steps", "syncs", "MB / worker"]
                  + [c for g in BANDWIDTHS_GBPS for c in (f"s @{g} Gbps", f"speedup @{g}")]),
             "|" + "---|" * (4 + 2 * len(BANDWIDTHS_GBPS))]
    for label, r in acc["to_target"].items():
        cells = [label, f"{r['steps']:.0f}", f"{r['syncs']:.0f}", f"{r['bytes'] / 1e6:.3f}"]
        for g in BANDWIDTHS_GBPS:
            extra = f" ({r[f'time_to_target_s_{g}gbps_ideal_overlap']:.3f})" if label == "allreduce" else ""
            cells += [f"{r[f'time_to_target_s_{g}gbps']:.3f}{extra}", f"{r[f'speedup_{g}gbps']:.3f}"]
        lines.append(_row(cells))
    return lines


def _projection(res: dict) -> list[str]:
    """Item 6 projected onto ResNet-18's bytes and its step measured here, beside the paper's ranges."""
    c, proj, slowest = res["projection_compute"], res["projection"], BANDWIDTHS_GBPS[0]
    t_low, t_high = c["step_s_ci"]
    adp = proj["adpsgd"]
    paper = ", ".join(f"{low}-{high}x @{g} Gbps" for g, (low, high) in PAPER_C3_SPEEDUP.items())
    lines = ["", f"Projection (claim C3): the steps and syncs to target above, with {c['model']}'s "
             f"{c['param_bytes'] / 1e6:.1f} MB per round and its local step without communication measured here, "
             f"{c['step_s'] * 1e3:.1f} ms [{t_low * 1e3:.1f}, {t_high * 1e3:.1f}] (median of {len(c['samples'])}, "
             f"interval coverage {c['coverage'] * 100:.1f}%; batch {c['batch_size']}, {c['device']}), charged to "
             f"every method alike (comm / compute of an allreduce step at {slowest} Gbps: "
             f"{adp[f'comm_over_compute_allreduce_{slowest}gbps']:.2f}). Paper (ADPSGD over allreduce): {paper}.",
             "", _row(["strategy"] + [f"speedup @{g} Gbps [interval] (vs ideal overlap)" for g in BANDWIDTHS_GBPS]),
             "|" + "---|" * (1 + len(BANDWIDTHS_GBPS))]
    def cell(r, g):
        (low, high), overlap = r[f"speedup_{g}gbps_ci"], r[f"speedup_{g}gbps_vs_ideal_overlap"]
        return f"{r[f'speedup_{g}gbps']:.3f} [{low:.3f}, {high:.3f}] ({overlap:.3f})"

    for label, r in proj.items():
        lines.append(_row([label] + [cell(r, g) for g in BANDWIDTHS_GBPS]))
    lines += ["", "ADPSGD against the paper's range: " + "; ".join(
        f"@{g} Gbps {adp[f'against_paper_{g}gbps']} ({low}-{high}x)" for g, (low, high) in PAPER_C3_SPEEDUP.items())
        + "."]
    return lines


def _qsgd(q: dict) -> list[str]:
    """Item 7 (claim C2): bytes per worker of ADPSGD and QSGD to the same training loss."""
    lines = ["", f"Claim C2: bytes per worker to training loss {q['target_train_loss']:.4f} (epoch mean):", "",
             "| strategy | MB / worker | ADPSGD / this |", "|---|---|---|"]
    for label in ("adpsgd", "qsgd_8bit", "qsgd_4bit"):
        ratio = q.get(f"adpsgd_over_{label}_bytes", 1.0)
        lines.append(f"| {label} | {q[label]['bytes_to_target'] / 1e6:.3f} | {ratio:.3f} |")
    return lines
