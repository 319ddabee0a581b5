"""Items 1b and 8: the cost of simulating many workers on one device (K workers vmapped on
the layout's named worker axis inside one device program, ``distributed.workers(K, [device])``).

1b. the gate with workers: a local step of K = 8 workers on one device, with a
    schedule whose gate stays shut (``constant(10**9)``), over the same vmapped
    local step compiled with no gate and no collective
    (``references.local_only_step`` through ``shard_map_step`` on the same
    layout). Target <= 1.02. The gated program is also checked to keep its
    ``conditional`` after XLA's passes (``gate_conditional_in_program``).
8.  simulation throughput: images/s of K workers on one device (local step,
    gate shut) over ONE worker whose batch is K times larger, the same strategy
    on the same device: the physical limit of simulation. Target >= 0.8. Beside
    it, K times one worker at the per-worker batch over the K workers
    (``over_sequential``: what vmapping gains on running the workers one after
    the other), and XLA's compiled memory of each program: the K-worker program
    per worker against the big-batch worker and the one worker at the
    per-worker batch (each worker holds its own parameters and optimizer state).

Both run on the first device only, with their own model and per-worker batch
(``--sim-model``, ``--sim-batch-size``, ``--sim-workers``). The default model is
the benchmark's ``--model`` on a GPU (ResNet-18, 16 workers) and the MLP on CPU:
the CNN's convolutions, vmapped over per-worker weights, become grouped
convolutions that XLA's CPU backend runs slowly (1.4 s per step of 8 workers x
16 images here, against 0.56 s for one worker x 128), so 64 workers of it
would not fit the ~10 minutes ``make bench`` has on the 2-core machine; the MLP
(3072-128-10, CIFAR-shaped synthetic images, 128 per worker) at 8, 32, 64
workers adds 50 s with the README's flags (--repeats 5 --steps-per-repeat 2).

Every timed variant's per-repetition samples are kept in the results
(``gate_samples``, ``throughput[K]["samples"]``); each ratio is the median of
the per-repetition ratios with its interval (``stats.ratio``, in ``ratios``).
"""

from __future__ import annotations

from typing import Any

from experiments.bench import harness, references, stats
from experiments.bench.steps import built

GATE_WORKERS = 8  # K of item 1b


def simulation_benchmarks(model_name: str, batch_size: int, worker_counts: list[int], repeats: int, steps: int,
                          warmup: int) -> dict:
    """Items 1b and 8 for ``model_name`` at ``batch_size`` images per worker (the ``simulation``
    dict of the results), on the first device."""
    import jax
    import numpy as np

    device = jax.devices()[0]
    task = references.image_task(model_name, batch_size, max(GATE_WORKERS, *worker_counts))
    params = task[1]
    out: dict[str, Any] = {"model": model_name, "batch_size_per_worker": batch_size,
                           "num_params": int(sum(np.prod(x.shape) for x in jax.tree.leaves(params)))}
    gate = gate_with_workers(task, GATE_WORKERS, device, repeats, steps, warmup)
    throughput = simulation_throughput(task, worker_counts, device, repeats, steps, warmup)
    out["ratios"] = {"gate_with_workers": gate.pop("ratio"), "simulation_throughput": throughput.pop("ratios")}
    out.update(gate)
    out.update(throughput)
    return out


def _gated(task, layout):
    """``local_sgd`` with a gate that stays shut throughout, on ``layout``'s worker axes."""
    import adpsgd_jax as A
    from adpsgd_jax import schedules

    _, _, _, loss_fn, optimizer, _, _ = task
    return A.local_sgd(loss_fn, optimizer, schedules.constant(10**9), workers=layout)


def gate_with_workers(task, k: int, device, repeats: int, steps: int, warmup: int) -> dict:
    """Item 1b: K workers' gated local step over their vmapped step with no gate and no collective."""
    from adpsgd_jax import distributed

    _, params, model_state, loss_fn, optimizer, batch, _ = task
    layout = distributed.workers(k, [device])
    strategy = _gated(task, layout)
    variants, batches = {}, {}
    for name, step_fn in (("local_gated", None), ("local_plain", references.local_only_step(loss_fn, optimizer))):
        step, state, b = built(layout, strategy, params, model_state, _rows(batch, k), step_fn)
        variants[name], batches[name] = (step, state), b
    program = harness.compile_step(*variants["local_gated"], batches["local_gated"]).as_text()
    samples = harness.time_alternating(variants, batches, repeats, steps, warmup)
    return {"gate_workers": k, "gate_step_seconds": harness.medians(samples), "gate_samples": samples,
            "ratio": stats.ratio(samples["local_gated"], samples["local_plain"]),
            "gate_conditional_in_program": "conditional" in program}


def simulation_throughput(task, worker_counts: list[int], device, repeats: int, steps: int, warmup: int) -> dict:
    """Item 8: for each K, the K workers, one worker with a K times larger batch and one worker
    at the per-worker batch, timed in alternation; their images/s and compiled memory."""
    import jax

    from adpsgd_jax import distributed

    _, params, model_state, _, _, batch, _ = task
    one = distributed.workers(1, [device])
    one_strategy = _gated(task, one)
    one_step, _, one_batch = small = built(one, one_strategy, params, model_state, _rows(batch, 1))
    one_worker_memory = harness.compiled_memory(*small)
    per_k = {}
    for k in worker_counts:
        layout = distributed.workers(k, [device])
        rows = _rows(batch, k)
        big = {key: x.reshape((1, -1) + x.shape[2:]) for key, x in rows.items()}
        fresh = distributed.replicate(one_strategy.init(params, model_state, jax.random.PRNGKey(0)), one)
        programs = {"workers": built(layout, _gated(task, layout), params, model_state, rows),
                    "big_batch": built(one, one_strategy, params, model_state, big),
                    "one_worker": (one_step, fresh, one_batch)}  # a fresh state: the timed steps donate it
        memory = {name: harness.compiled_memory(*programs[name]) for name in ("workers", "big_batch")}
        samples = harness.time_alternating({name: p[:2] for name, p in programs.items()},
                                           {name: p[2] for name, p in programs.items()}, repeats, steps, warmup)
        t = harness.medians(samples)
        per_worker = rows["label"].shape[1]
        images = {name: k * per_worker / t[name] for name in ("workers", "big_batch")}
        images["one_worker"] = per_worker / t["one_worker"]
        workers_total = memory["workers"]["total"]
        sequential = [k * x for x in samples["one_worker"]]
        per_k[str(k)] = {"step_seconds": t, "samples": samples, "images_per_s": images,
                         "ratio": stats.ratio(samples["big_batch"], samples["workers"]),
                         "over_sequential": stats.ratio(sequential, samples["workers"]), "memory_bytes": memory,
                         "memory_per_worker": workers_total / k if workers_total is not None else None}
    return {"throughput": per_k, "one_worker_memory_bytes": one_worker_memory,
            "ratios": {k: row["ratio"] for k, row in per_k.items()}}


def _rows(batch: dict, k: int) -> dict:
    """The first ``k`` workers' rows [k, B, ...] of the task's batch."""
    return {key: x[:k] for key, x in batch.items()}
