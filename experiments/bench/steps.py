"""Items 1, 2, 4 and 5: the train step timed against its references, and its compiled memory;
and item 6's compute: one worker's step of the projection's model.

Items 1-2 run on every (virtual) device, items 4-5 and item 6's compute on
one device on CPU, where virtual devices share the cores (see the package
docstring).
"""

from __future__ import annotations

import time
from typing import Any

from experiments.bench import harness, hlo, references, stats


def step_benchmarks(model_name: str, batch_size: int, repeats: int, steps: int, warmup: int) -> dict:
    """Items 1, 2, 4 and 5 for ``model_name`` at ``batch_size`` per device (the ``steps`` dict of the results)."""
    import jax

    devices = jax.devices()
    out = gate_and_sync(model_name, batch_size, devices, repeats, steps, warmup)
    tdevs = devices[:1] if devices[0].platform == "cpu" else devices
    more = throughput_and_memory(model_name, batch_size, tdevs, repeats, steps, warmup)
    out["ratios"].update(more.pop("ratios"))
    out.update(more)
    return out


PROJECTION_MODEL, PROJECTION_BATCH = "resnet18", 32  # item 6's projection (claim C3): the paper's model


def projection_compute(device_name: str, repeats: int, steps: int, warmup: int) -> dict:
    """Item 6's compute: seconds of one worker's local step of ResNet-18 at batch 32, with no gate
    and no collective (``references.local_only_step``), on the first device, measured here.

    The projection charges it to every method alike, per step, beside the
    modelled communication. Variables from ``references.stand_in_variables``
    (a step's time does not depend on them). ``step_s`` is the median of
    ``repeats`` samples of ``steps`` steps, ``step_s_ci`` its interval
    (``stats.median_interval``).
    """
    import jax

    import adpsgd_jax as A
    from adpsgd_jax import comm, distributed, schedules

    device = jax.devices()[0]
    task = references.image_task(PROJECTION_MODEL, PROJECTION_BATCH, 1, stand_in=True)
    _, params, model_state, loss_fn, optimizer, batch, _ = task
    layout = distributed.workers(devices=[device])
    strategy = A.local_sgd(loss_fn, optimizer, schedules.constant(10**9))  # its state; the step has no gate
    step, state, b = built(layout, strategy, params, model_state, batch, references.local_only_step(loss_fn, optimizer))
    samples = harness.time_alternating({"local": (step, state)}, {"local": b}, repeats, steps, warmup)["local"]
    median, low, high, covered = stats.median_interval(samples)
    return {"model": PROJECTION_MODEL, "batch_size": PROJECTION_BATCH, "device": device_name,
            "param_bytes": comm.tree_bytes(params), "step_s": median, "step_s_ci": [low, high],
            "coverage": covered, "samples": samples}


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
    allreduce, the four timed in alternation on ``devices`` (one block, so that the four
    medians compare too)."""
    import jax
    import numpy as np

    import adpsgd_jax as A
    from adpsgd_jax import comm, distributed, schedules

    model, params, model_state, loss_fn, optimizer, batch, _ = references.image_task(model_name, batch_size,
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
    # The sync step's path takes the averaging branch (branch -1); the others have none or stay local.
    counts = {name: hlo.program_counts(harness.compile_step(*variants[name], batches[name]),
                                       branch=-1 if name == "sync" else 0) for name in variants}
    samples = harness.time_alternating(variants, batches, repeats, steps, warmup)
    param_bytes = comm.tree_bytes(params)
    sync_bytes = counts["sync"]["bytes"] / counts["allreduce"]["bytes"]
    return {"step_devices": len(devices), "step_seconds": harness.medians(samples), "step_samples": samples,
            "ratios": {"gate_overhead": stats.ratio(samples["local_gated"], samples["local_plain"]),
                       "sync_over_allreduce": stats.ratio(samples["sync"], samples["allreduce"])},
            "step_counts": counts,
            "gate_count": hlo.count_ratio(counts["local_gated"], counts["local_plain"], param_bytes),
            "sync_count": {"bytes_ratio": sync_bytes, "verdict": "met" if sync_bytes <= 1.05 else "missed"},
            "param_bytes": param_bytes,
            "num_params": int(sum(np.prod(x.shape) for x in jax.tree.leaves(params)))}


def throughput_and_memory(model_name: str, batch_size: int, tdevs: list, repeats: int, steps: int,
                          warmup: int) -> dict:
    """Items 4 and 5: images/s of ADPSGD's local step, the allreduce step and the plain flax loop,
    timed in alternation on ``tdevs``, their compiled memory, and the host input pipeline's rate."""
    import jax
    import numpy as np

    import adpsgd_jax as A
    from adpsgd_jax import comm, distributed, schedules

    model, params, model_state, loss_fn, optimizer, batch, mean_std = references.image_task(model_name, batch_size,
                                                                                            len(tdevs))
    layout = distributed.workers(devices=tdevs)
    adp = schedules.adpsgd(10**6, 10**5, lr_schedule=lambda t: 0.1)  # first sync far beyond the benchmark
    runs, batches = {}, {}
    for name, strategy in [("adpsgd_local", A.local_sgd(loss_fn, optimizer, adp)),
                           ("allreduce", A.allreduce(loss_fn, optimizer))]:
        step, state, b = built(layout, strategy, params, model_state, batch)
        runs[name], batches[name] = (step, state), b
    plain_step, plain_state = references.plain_flax_loop(model, params, model_state, optimizer, mean_std)
    batches["plain"] = jax.device_put(jax.tree.map(lambda x: x[0], batch), tdevs[0])
    # A copy of its own: the donated plain state must not share buffers with ``params``.
    runs["plain"] = (plain_step, jax.device_put(jax.tree.map(np.array, plain_state), tdevs[0]))
    executables = {name: harness.compile_step(runs[name][0], runs[name][1], batches[name]) for name in runs}
    memory = {name: harness.compiled_memory(*runs[name], batches[name], executable=e) for name, e in executables.items()}
    counts = {name: hlo.program_counts(e) for name, e in executables.items()}
    samples = harness.time_alternating(runs, batches, repeats, steps, warmup)
    per_step = harness.medians(samples)
    out: dict[str, Any] = {
        "throughput_devices": len(tdevs),
        "throughput_images_per_s_per_device": {k: batch_size / v for k, v in per_step.items()},
        "throughput_samples": samples,
        # images/s of A over those of the plain loop = the plain loop's step time over A's, per repetition
        "ratios": {"throughput_vs_plain": stats.ratio(samples["plain"], samples["adpsgd_local"]),
                   "allreduce_throughput_vs_plain": stats.ratio(samples["plain"], samples["allreduce"])},
        "memory_bytes": memory, "throughput_counts": counts,
        "plain_count": hlo.count_ratio(counts["adpsgd_local"], counts["plain"], comm.tree_bytes(params))}
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
    from experiments.loader import TrainLoader

    ds = dataclasses.replace(data.load("synthetic", synthetic_size=max(4 * batch_size * workers, 512)), augment=True)
    shards = data.partition(ds.train_labels, workers, "iid", 0, min_size=batch_size)
    loader = TrainLoader(ds, shards, batch_size, 0)
    n = max(4, repeats)
    start = time.perf_counter()
    for i in range(n):
        loader.batch(0, i % loader.steps_per_epoch)
    return n * batch_size * workers / (time.perf_counter() - start)
