"""The benchmark's Markdown: the table of items 1-5, 1b and 8 with their targets, then items 6-7."""

from __future__ import annotations

from experiments.names import BANDWIDTHS_GBPS

TARGETS = {  # name -> (comparison, target)
    "gate_overhead_ratio": ("<=", 1.02),
    "sync_over_allreduce_ratio": ("<=", 1.05),
    "throughput_ratio_vs_plain": (">=", 0.98),
    "gate_with_workers_ratio": ("<=", 1.02),
    "simulation_throughput_ratio": (">=", 0.8),  # one ratio per worker count K
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


def _items(res: dict) -> list[str]:
    """The lines of the table of items 1-5 (1b and 8 where they ran), with the targets beside the measured figures."""
    def verdict(key, value=None):
        op, target = TARGETS[key]
        value = res.get(key) if value is None else value
        if value is None:
            return "not measured"
        ok = value <= target if op == "<=" else value >= target
        return "met" if ok else f"missed by {abs(value - target) / target * 100:.1f}%"

    s = res["steps"]
    lines = [f"Device: {res['device']}; model {res['model']} ({s['num_params']:,} parameters), "
             f"batch {res['batch_size']} per device; median of {res['repeats']} repetitions x "
             f"{res['steps_per_repeat']} steps; jax {res['jax_version']}.", "",
             "| item | measured | target | verdict |", "|---|---|---|---|"]
    t = s["step_seconds"]
    lines.append(f"| 1. gate overhead: gated local step / step with no collective ({s['step_devices']} devices; "
                 f"{t['local_gated'] * 1e3:.2f} vs {t['local_plain'] * 1e3:.2f} ms) | "
                 f"{res['gate_overhead_ratio']:.3f} | <= 1.02 | {verdict('gate_overhead_ratio')} |")
    lines.append(f"| 2. sync step / allreduce step ({s['step_devices']} devices; {t['sync'] * 1e3:.2f} vs "
                 f"{t['allreduce'] * 1e3:.2f} ms) | {res['sync_over_allreduce_ratio']:.3f} | <= 1.05 | "
                 f"{verdict('sync_over_allreduce_ratio')} |")
    comp = res["compilations"]
    worst, per_method = max(comp.values()), ", ".join(f"{k} {v}" for k, v in comp.items())
    lines.append(f"| 3. compilations of the train step over a run, per method ({per_method}) "
                 f"| max {worst} | 1 | {'met' if worst == 1 else 'missed'} |")
    ips = s["throughput_images_per_s_per_device"]
    lines.append(f"| 4. throughput, images/s/device ({s['throughput_devices']} device): ADPSGD local "
                 f"{ips['adpsgd_local']:.1f}, full sync {ips['allreduce']:.1f}, plain flax loop {ips['plain']:.1f}; "
                 f"ADPSGD / plain | {res['throughput_ratio_vs_plain']:.3f} | >= 0.98 | "
                 f"{verdict('throughput_ratio_vs_plain')} |")
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
    if res.get("simulation"):
        gate, throughput = _simulation(res, verdict)
        item_1 = next(i for i, line in enumerate(lines) if line.startswith("| 1. "))
        lines = lines[:item_1 + 1] + [gate] + lines[item_1 + 1:] + throughput
    return lines


def _simulation(res: dict, verdict) -> tuple[str, list[str]]:
    """The row of item 1b and the rows of item 8: K workers simulated on one device."""
    sim = res["simulation"]
    where = f"{sim['model']}, {sim['batch_size_per_worker']} images per worker, 1 device"
    t = sim["gate_step_seconds"]
    kept = "the cond kept" if sim["gate_conditional_in_program"] else "NO conditional left in the program"
    gate = (f"| 1b. gate with workers: gated local step / step with no collective, K = {sim['gate_workers']} "
            f"workers ({where}; {t['local_gated'] * 1e3:.2f} vs {t['local_plain'] * 1e3:.2f} ms; {kept}) | "
            f"{res['gate_with_workers_ratio']:.3f} | <= 1.02 | {verdict('gate_with_workers_ratio')} |")
    one, lines = sim["one_worker_memory_bytes"]["total"], []
    for k, row in sim["throughput"].items():
        ips, ratio = row["images_per_s"], res["simulation_throughput_ratio"][k]
        lines.append(f"| 8. simulation throughput: K = {k} workers / 1 worker with {k}x the batch ({where}; "
                     f"{ips['workers']:.0f} vs {ips['big_batch']:.0f} images/s; the {k} workers one after another take "
                     f"{row['over_sequential']:.2f}x as long) | {ratio:.3f} | >= 0.8 | "
                     f"{verdict('simulation_throughput_ratio', ratio)} |")
        big = row["memory_bytes"]["big_batch"]["total"]
        if row["memory_per_worker"] is not None and big and one:
            lines.append(f"| 8b. compiled memory per worker, K = {k}: K-worker program / K "
                         f"({row['memory_per_worker'] / 2**20:.2f} MiB; 1 worker with {k}x the batch "
                         f"{big / 2**20:.2f} MiB in all, 1 worker at the per-worker batch {one / 2**20:.2f} MiB); "
                         f"per worker / 1 worker | {row['memory_per_worker'] / one:.3f} | (no target) | |")
    return gate, lines


def _time_to_target(acc: dict) -> list[str]:
    """Item 6: steps, syncs, bytes and predicted time to the target accuracy per strategy."""
    lines = ["", f"Time to test accuracy {acc['target_test_accuracy']:.4f} on {acc['dataset']} "
             f"({acc['model']}, {acc['workers']} workers, {acc['epochs']} epochs, seeds {acc['seeds']}, "
             f"budget avg_period {acc['avg_period']}); predicted for {acc['predict_workers']} workers, "
             f"latency {acc['latency_s'] * 1e6:.0f} us, with the runs' measured compute per step; full sync "
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
    """Item 6 projected onto the benchmark model's bytes and step time."""
    s, proj, slowest = res["steps"], res["projection"], BANDWIDTHS_GBPS[0]
    lines = ["", f"Projection: the steps and syncs to target above, with {res['model']}'s "
             f"{s['param_bytes'] / 1e6:.1f} MB per round and its measured {s['step_compute_s'] * 1e3:.1f} ms "
             f"per step (batch {res['batch_size']}, one device of item 4) (comm / compute of a full-sync step at "
             f"{slowest} Gbps: {proj['adpsgd'][f'comm_over_compute_full_sync_{slowest}gbps']:.2f}). "
             "Paper: 1.46-1.95x @10 Gbps, 1.14-1.27x @100 Gbps.", "",
             _row(["strategy"] + [f"speedup @{g} Gbps (vs ideal overlap)" for g in BANDWIDTHS_GBPS]),
             "|" + "---|" * (1 + len(BANDWIDTHS_GBPS))]
    for label, r in proj.items():
        lines.append(_row([label] + [f"{r[f'speedup_{g}gbps']:.3f} ({r[f'speedup_{g}gbps_vs_ideal_overlap']:.3f})"
                                     for g in BANDWIDTHS_GBPS]))
    return lines


def _qsgd(q: dict) -> list[str]:
    """Item 7 (claim C2): bytes per worker of ADPSGD and QSGD to the same training loss."""
    lines = ["", f"Claim C2: bytes per worker to training loss {q['target_train_loss']:.4f} (epoch mean):", "",
             "| strategy | MB / worker | ADPSGD / this |", "|---|---|---|"]
    for label in ("adpsgd", "qsgd_8bit", "qsgd_4bit"):
        ratio = q.get(f"adpsgd_over_{label}_bytes", 1.0)
        lines.append(f"| {label} | {q[label]['bytes_to_target'] / 1e6:.3f} | {ratio:.3f} |")
    return lines
