"""Items 1, 2, 4 and 5: the train step timed against its references, and its compiled memory.

Items 1-2 run on every (virtual) device, items 4-5 on one device on CPU,
where virtual devices share the cores (see the package docstring).
"""

from __future__ import annotations

import time
from typing import Any

from experiments.bench import harness, references


def step_benchmarks(model_name: str, batch_size: int, repeats: int, steps: int, warmup: int) -> dict:
    """Items 1, 2, 4 and 5 for ``model_name`` at ``batch_size`` per device (the ``steps`` dict of the results)."""
    import jax

    devices = jax.devices()
    out = gate_and_sync(model_name, batch_size, devices, repeats, steps, warmup)
    tdevs = devices[:1] if devices[0].platform == "cpu" else devices
    out.update(throughput_and_memory(model_name, batch_size, tdevs, repeats, steps, warmup))
    return out


def built(layout, strategy, params, model_state, images, step_fn=None):
    """(compiled step, replicated state, sharded batch) of ``strategy`` (or of
    ``step_fn`` on the strategy's state) on ``layout``'s workers."""
    import jax

    from adpsgd_jax import distributed

    state = strategy.init(params, model_state, jax.random.PRNGKey(0))
    return distributed.shard_map_step(step_fn or strategy.step, layout), distributed.replicate(state, layout), \
        distributed.shard_batch(images, layout)


def gate_and_sync(model_name: str, batch_size: int, devices: list, repeats: int, steps: int, warmup: int) -> dict:
    """Items 1 and 2: the gated local step over the step with no gate, and a syncing step over
    full sync, each pair timed in alternation on ``devices``."""
    import jax
    import numpy as np

    import adpsgd_jax as A
    from adpsgd_jax import comm, distributed, schedules

    model, params, model_state, loss_fn, optimizer, batch, stats = references.image_task(model_name, batch_size,
                                                                                         len(devices))
    layout = distributed.workers(devices=devices)
    gated = A.local_sgd(loss_fn, optimizer, schedules.constant(10**9))  # the gate stays shut throughout
    variants, batches = {}, {}
    for name, strategy, step_fn in [
        ("local_gated", gated, None),
        ("local_plain", gated, references.local_only_step(loss_fn, optimizer)),
        ("sync", A.local_sgd(loss_fn, optimizer, schedules.constant(1)), None),
        ("allreduce", A.allreduce(loss_fn, optimizer), None),
    ]:
        step, state, b = built(layout, strategy, params, model_state, batch, step_fn)
        variants[name], batches[name] = (step, state), b
    pairs = (("local_gated", "local_plain"), ("sync", "allreduce"))
    times = {}
    for a, b in pairs:
        samples = harness.time_alternating({a: variants[a], b: variants[b]}, {a: batches[a], b: batches[b]},
                                           repeats, steps, warmup)
        times.update(harness.medians(samples))
        for k in (a, b):
            variants.pop(k)
    return {"step_devices": len(devices), "step_seconds": times,
            "gate_overhead_ratio": times["local_gated"] / times["local_plain"],
            "sync_over_allreduce_ratio": times["sync"] / times["allreduce"],
            "param_bytes": comm.tree_bytes(params),
            "num_params": int(sum(np.prod(x.shape) for x in jax.tree.leaves(params)))}


def throughput_and_memory(model_name: str, batch_size: int, tdevs: list, repeats: int, steps: int,
                          warmup: int) -> dict:
    """Items 4 and 5: images/s of ADPSGD's local step, the full-sync step and the plain flax loop,
    timed in alternation on ``tdevs``, their compiled memory, and the host input pipeline's rate."""
    import jax
    import numpy as np

    import adpsgd_jax as A
    from adpsgd_jax import comm, distributed, schedules

    model, params, model_state, loss_fn, optimizer, batch, stats = references.image_task(model_name, batch_size,
                                                                                         len(tdevs))
    layout = distributed.workers(devices=tdevs)
    adp = schedules.adpsgd(10**6, 10**5, lr_schedule=lambda t: 0.1)  # first sync far beyond the benchmark
    runs, batches = {}, {}
    for name, strategy in [("adpsgd_local", A.local_sgd(loss_fn, optimizer, adp)),
                           ("allreduce", A.allreduce(loss_fn, optimizer))]:
        step, state, b = built(layout, strategy, params, model_state, batch)
        runs[name], batches[name] = (step, state), b
    plain_step, plain_state = references.plain_flax_loop(model, params, model_state, optimizer, stats)
    batches["plain"] = jax.device_put(jax.tree.map(lambda x: x[0], batch), tdevs[0])
    # A copy of its own: the donated plain state must not share buffers with ``params``.
    runs["plain"] = (plain_step, jax.device_put(jax.tree.map(np.array, plain_state), tdevs[0]))
    memory = {name: harness.compiled_memory(runs[name][0], runs[name][1], batches[name]) for name in runs}
    samples = harness.time_alternating(runs, batches, repeats, steps, warmup)
    per_step = harness.medians(samples)
    out: dict[str, Any] = {
        "throughput_devices": len(tdevs),
        "throughput_images_per_s_per_device": {k: batch_size / v for k, v in per_step.items()},
        "throughput_ratio_vs_plain": per_step["plain"] / per_step["adpsgd_local"],
        "allreduce_throughput_ratio_vs_plain": per_step["plain"] / per_step["allreduce"],
        "step_compute_s": per_step["adpsgd_local"], "memory_bytes": memory}
    if memory["plain"]["total"] and memory["adpsgd_local"]["total"]:
        extra = memory["adpsgd_local"]["total"] - memory["plain"]["total"]
        out["memory_ratio_vs_plain"] = memory["adpsgd_local"]["total"] / memory["plain"]["total"]
        out["memory_extra_in_param_copies"] = extra / comm.tree_bytes(params)
    out["input_pipeline_images_per_s"] = input_pipeline_rate(batch_size, len(tdevs), repeats)
    return out


def input_pipeline_rate(batch_size: int, workers: int, repeats: int) -> float:
    """Images/s of the host pipeline (index, crop-and-flip augmentation, uint8 batch) on CIFAR-shaped data."""
    import dataclasses

    from experiments import data

    ds = dataclasses.replace(data.load("synthetic", synthetic_size=max(4 * batch_size * workers, 512)), augment=True)
    shards = data.partition(ds.train_labels, workers, data.parse_partition("iid"), 0, min_size=batch_size)
    loader = data.TrainLoader(ds, shards, batch_size, 0)
    n = max(4, repeats)
    start = time.perf_counter()
    for i in range(n):
        loader.batch(0, i % loader.steps_per_epoch)
    return n * batch_size * workers / (time.perf_counter() - start)
