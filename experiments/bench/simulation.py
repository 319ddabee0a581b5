"""Items 1b and 8: the cost of simulating many workers on one device (K workers on the layout's
named worker axis inside one device program, ``distributed.workers(K, [device], loop=...)``).

1b. the gate with workers: a local step of K = 8 workers on one device, with a
    schedule whose gate stays shut (``constant(10**9)``), over the same local
    step compiled with no gate and no collective (``references.local_only_step``
    through ``shard_map_step`` on the same layout), timed with the model's
    ``auto`` loop. Target <= 1.02. Counted for every loop (``hlo``): the bytes
    on the local path of the gated program over the reference's (<= 1.01) and
    the bytes it copies beyond the reference's (< 0.01 parameter copy). The
    gated program is also checked to keep its ``conditional``.
8.  simulation throughput, for each model, worker count K and worker loop
    (``adpsgd_jax.loops``: vmap, map, unroll): images/s of K workers on one
    device (local step, gate shut) over ONE worker whose batch is K times
    larger, the same strategy on the same device: the physical limit of
    simulation (target >= 0.8); and over K single-worker steps run one after
    another (``over_sequential``, target >= 0.95). The loops of one K, the big
    batch and the single worker are timed in alternation. Beside them, what each
    program does (``hlo.program_counts``: bytes on its path, copies, grouped
    convolutions; its path bytes over the big batch's, count target <= 1.25,
    the inverse of the time target for a step bound by memory traffic) and
    XLA's compiled memory per worker. ``auto`` is the loop ``loops.choose``
    picks for the model on this platform; ``auto_meets`` says whether it
    reaches one of the two targets.

Both run on the first device only, with their own models and per-worker batch
(``--sim-models``, ``--sim-batch-size``, ``--sim-workers``, ``--sim-loops``).

Every timed variant's per-repetition samples are kept in the results; each
ratio is the median of the per-repetition ratios with its interval
(``stats.ratio``).
"""

from __future__ import annotations

from typing import Any, Optional

from experiments.bench import harness, hlo, references, stats
from experiments.bench.steps import built

GATE_WORKERS = 8  # K of item 1b
COUNT_TARGET = 1.25  # item 8: path bytes of K workers over one worker with K x the batch


def simulation_benchmarks(models: list[str], batch_size: dict, worker_counts: dict, loop_names: list, repeats: int,
                          steps: int, warmup: int, gate_loops: Optional[list] = None) -> dict:
    """Items 1b (the first model; counted under ``gate_loops``, default ``loop_names``, and the timed
    auto loop) and 8 (every model, its worker counts ``worker_counts[model]``, every loop of
    ``loop_names``) at ``batch_size[model]`` images per worker (the ``simulation`` dict of the
    results), on the first device."""
    import jax
    import numpy as np

    device = jax.devices()[0]
    out: dict[str, Any] = {"models": list(models), "batch_size_per_worker": dict(batch_size), "loops": list(loop_names),
                           "model": models[0], "throughput": {}, "ratios": {}}
    for i, model in enumerate(models):
        task = references.image_task(model, batch_size[model], max(GATE_WORKERS if i == 0 else 1, *worker_counts[model]),
                                     stand_in=model in ("resnet18", "vgg16"))
        if i == 0:
            out["num_params"] = int(sum(np.prod(x.shape) for x in jax.tree.leaves(task[1])))
            gate = gate_with_workers(task, GATE_WORKERS, device, loop_names if gate_loops is None else gate_loops,
                                     repeats, steps, warmup)
            out["ratios"]["gate_with_workers"] = gate.pop("ratio")
            out.update(gate)
        out["throughput"][model] = simulation_throughput(task, worker_counts[model], device, loop_names, repeats,
                                                         steps, warmup)
    flat = {f"{m}/K={k}/{loop}": row for m, res in out["throughput"].items() for k, rows in res["per_k"].items()
            for loop, row in rows["loops"].items()}
    out["ratios"]["simulation_throughput"] = {key: row["ratio"] for key, row in flat.items()}
    out["ratios"]["simulation_over_sequential"] = {key: row["over_sequential"] for key, row in flat.items()}
    return out


def auto_loop(task, device) -> str:
    """The name of the loop ``auto`` picks for the task's model on ``device`` (``loops.choose`` on one worker's
    batch)."""
    import jax

    from adpsgd_jax import loops

    _, params, model_state, loss_fn, _, batch, _ = task
    one = {key: x[0] for key, x in batch.items()}
    return loops.choose(loss_fn, params, model_state, one, jax.random.PRNGKey(0), platform=device.platform).name


def _gated(task, layout):
    """``local_sgd`` with a gate that stays shut throughout, on ``layout``'s workers."""
    import adpsgd_jax as A
    from adpsgd_jax import schedules

    _, _, _, loss_fn, optimizer, _, _ = task
    return A.local_sgd(loss_fn, optimizer, schedules.constant(10**9), workers=layout)


def gate_with_workers(task, k: int, device, loop_names: list, repeats: int, steps: int, warmup: int) -> dict:
    """Item 1b: K workers' gated local step over their step with no gate and no collective: timed with the
    model's auto loop, counted for each loop of ``loop_names``."""
    from adpsgd_jax import comm, distributed
    from experiments.setup import loop_named

    _, params, model_state, loss_fn, optimizer, batch, _ = task
    timed_loop, counts, programs = auto_loop(task, device), {}, {}
    for loop in dict.fromkeys([timed_loop, *loop_names]):
        layout = distributed.workers(k, [device], loop=loop_named(loop))
        strategy = _gated(task, layout)
        pair = {}
        for name, step_fn in (("local_gated", None),
                              ("local_plain", references.local_only_step(loss_fn, optimizer, layout.loop))):
            pair[name] = built(layout, strategy, params, model_state, _rows(batch, k), step_fn)
        compiled = {name: harness.compile_step(*p) for name, p in pair.items()}
        row = {name: hlo.program_counts(c) for name, c in compiled.items()}
        counts[loop] = {**row, **hlo.count_ratio(row["local_gated"], row["local_plain"], comm.tree_bytes(params))}
        if loop == timed_loop:
            programs = pair
            kept = "conditional" in compiled["local_gated"].as_text()
    samples = harness.time_alternating({n: p[:2] for n, p in programs.items()}, {n: p[2] for n, p in programs.items()},
                                       repeats, steps, warmup)
    return {"gate_workers": k, "gate_loop": timed_loop, "gate_step_seconds": harness.medians(samples),
            "gate_samples": samples, "ratio": stats.ratio(samples["local_gated"], samples["local_plain"]),
            "gate_counts": counts, "gate_conditional_in_program": kept}


def simulation_throughput(task, worker_counts: list[int], device, loop_names: list, repeats: int, steps: int,
                          warmup: int) -> dict:
    """Item 8 for one model: for each K, the K workers under each loop, one worker with a K times larger
    batch and one worker at the per-worker batch, timed in alternation; their images/s, path counts and
    compiled memory. Keyed by K (a string)."""
    import jax

    from adpsgd_jax import distributed
    from experiments.setup import loop_named

    _, params, model_state, _, _, batch, _ = task
    auto = auto_loop(task, device)
    one = distributed.workers(1, [device])
    one_strategy = _gated(task, one)
    small = built(one, one_strategy, params, model_state, _rows(batch, 1))
    one_memory = harness.compiled_memory(*small)
    per_k = {}
    for k in worker_counts:
        rows = _rows(batch, k)
        big = {key: x.reshape((1, -1) + x.shape[2:]) for key, x in rows.items()}
        fresh = distributed.replicate(one_strategy.init(params, model_state, jax.random.PRNGKey(0)), one)
        programs = {"big_batch": built(one, one_strategy, params, model_state, big),
                    "one_worker": (small[0], fresh, small[2])}  # a fresh state: the timed steps donate it
        names = {}
        for loop in loop_names:
            layout = distributed.workers(k, [device], loop=loop_named(loop))
            names[loop] = f"workers_{layout.loop.name}"
            programs.setdefault(names[loop], built(layout, _gated(task, layout), params, model_state, rows))
        executables = {name: harness.compile_step(*p) for name, p in programs.items() if name != "one_worker"}
        counts = {name: hlo.program_counts(e) for name, e in executables.items()}
        memory = {name: harness.compiled_memory(*programs[name], executable=e) for name, e in executables.items()}
        samples = harness.time_alternating({n: p[:2] for n, p in programs.items()},
                                           {n: p[2] for n, p in programs.items()}, repeats, steps, warmup)
        t, per_worker = harness.medians(samples), rows["label"].shape[1]
        sequential = [k * x for x in samples["one_worker"]]
        loops_out = {}
        for loop, name in names.items():
            total = memory[name]["total"]
            bytes_ratio = counts[name]["bytes"] / counts["big_batch"]["bytes"]
            loops_out[loop] = {
                "program": name, "step_seconds": t[name], "images_per_s": k * per_worker / t[name],
                "ratio": stats.ratio(samples["big_batch"], samples[name]),
                "over_sequential": stats.ratio(sequential, samples[name]),
                "counts": counts[name], "bytes_over_big_batch": bytes_ratio,
                "count_verdict": "met" if bytes_ratio <= COUNT_TARGET else "missed",
                "memory_bytes": memory[name], "memory_per_worker": total / k if total is not None else None}
        per_k[str(k)] = {"loops": loops_out, "samples": samples, "step_seconds": t,
                         "images_per_s": {"big_batch": k * per_worker / t["big_batch"],
                                          "one_worker": per_worker / t["one_worker"]},
                         "big_batch_counts": counts["big_batch"], "big_batch_memory_bytes": memory["big_batch"],
                         "auto": auto, "auto_meets": _meets(loops_out.get(auto))}
    return {"per_k": per_k, "auto": auto, "one_worker_memory_bytes": one_memory}


def _meets(row) -> str:
    """Whether a loop's row reaches >= 0.8 of the big batch or >= 0.95 of the sequential steps (its intervals)."""
    if row is None:
        return "not measured"
    verdicts = (stats.verdict(row["ratio"]["ci"], ">=", 0.8, row["ratio"]["coverage"]),
                stats.verdict(row["over_sequential"]["ci"], ">=", 0.95, row["over_sequential"]["coverage"]))
    return "met" if "met" in verdicts else "missed" if verdicts == ("missed", "missed") else "inconclusive"


def _rows(batch: dict, k: int) -> dict:
    """The first ``k`` workers' rows [k, B, ...] of the task's batch."""
    return {key: x[:k] for key, x in batch.items()}
