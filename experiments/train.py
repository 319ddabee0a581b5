"""Train one configured run and write its results: ``train_and_evaluate``.

The CLI (``experiments/cifar.py``), the notebooks and the tests all call
this function. Everything that decides a run is in its ``Config``; every
check of the config against this machine and the data happens in
``prepare`` before anything is compiled.
"""

from __future__ import annotations

import dataclasses
import platform
import time
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

import adpsgd_jax as A
from adpsgd_jax import comm, distributed, schedules
from experiments import data, models, results
from experiments.config import METHODS, Config, ConfigError


@dataclasses.dataclass
class Setup:
    """Everything a run needs, built and checked before compilation."""

    config: Config
    dataset: data.Dataset
    loader: data.TrainLoader
    mesh: Any
    total_steps: int
    lr_fn: Any
    schedule: Optional[schedules.Schedule]
    strategy: str


def lr_schedule(config: Config, steps_per_epoch: int, total_steps: int):
    """Learning rate per step: step decay at epochs (default 50% and 75%), cosine, or constant."""
    if config.lr_schedule == "cosine":
        return optax.cosine_decay_schedule(config.lr, total_steps)
    if config.lr_schedule == "constant":
        return optax.constant_schedule(config.lr)
    epochs = config.lr_decay_epochs or (config.epochs // 2, (3 * config.epochs) // 4)
    boundaries = {int(e * steps_per_epoch): config.lr_decay_factor for e in epochs if 0 < e < config.epochs}
    return optax.piecewise_constant_schedule(config.lr, boundaries)


def decay_steps(config: Config, steps_per_epoch: int) -> list[int]:
    if config.lr_schedule != "step":
        return []
    epochs = config.lr_decay_epochs or (config.epochs // 2, (3 * config.epochs) // 4)
    return sorted({int(e * steps_per_epoch) for e in epochs if 0 < e < config.epochs})


def stagewise_base_period(total_steps: int, boundaries: list[int], budget: int, factor: float = 2.0) -> int:
    """The base period whose stagewise run spends closest to ``budget`` syncs."""

    def count(p0):
        t, n = 0, 0
        while True:
            stage = sum(t >= b for b in boundaries)
            t += max(1, round(p0 * factor**stage))
            if t > total_steps:
                return n
            n += 1

    return min(range(1, max(2, total_steps + 1)), key=lambda p0: (abs(count(p0) - budget), p0))


def make_schedule(config: Config, total_steps: int, steps_per_epoch: int, lr_fn) -> Optional[schedules.Schedule]:
    """The schedule of ``config.method`` at budget ``avg_period`` (None for allreduce / qsgd)."""
    _, name = METHODS[config.method]
    p = config.avg_period
    if name is None:
        return None
    if name == "constant":
        return schedules.constant(p)
    if name == "full_sync":
        return schedules.full_sync()
    if name == "post_local":
        warmup = round(config.local_warmup_epochs * steps_per_epoch) or total_steps // 10
        return schedules.post_local(warmup, p)
    if name == "stagewise":
        bounds = decay_steps(config, steps_per_epoch) or [total_steps // 2, (3 * total_steps) // 4]
        return schedules.stagewise(stagewise_base_period(total_steps, bounds, total_steps // p), bounds, 2.0)
    if name == "adacomm":
        # Start at twice the budget's period, revised once an epoch.
        return schedules.adacomm(period=2 * p, interval=steps_per_epoch)
    if name == "adpsgd":
        return schedules.adpsgd(total_steps, p, lr_schedule=lr_fn)
    if name == "lr_proportional":
        return schedules.lr_proportional(total_steps, p, lr_schedule=lr_fn)
    raise AssertionError(name)


def prepare(config: Config, dataset: Optional[data.Dataset] = None) -> Setup:
    """Check the config against the devices and the data; build loader, mesh and schedule.

    Raises ConfigError (flag named) or data.DataUnavailableError; compiles nothing.
    """
    devices = jax.devices()
    if config.workers > len(devices):
        raise ConfigError(
            f"--workers {config.workers} needs {config.workers} devices; {len(devices)} "
            f"{devices[0].platform.upper()} device(s) are visible (on CPU, --workers sets the number of virtual devices "
            "only when jax has not started yet)"
        )
    try:
        scheme = data.parse_partition(config.partition)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    if dataset is None:
        dataset = data.load(config.dataset, config.data_dir, synthetic_size=config.synthetic_size)
    try:
        shards = data.partition(dataset.train_labels, config.workers, scheme, config.seed, min_size=config.batch_size)
        loader = data.TrainLoader(dataset, shards, config.batch_size, config.seed)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    total = config.epochs * loader.steps_per_epoch
    if total < config.avg_period:
        raise ConfigError(f"--avg-period {config.avg_period} exceeds the run's {total} steps")
    lr_fn = lr_schedule(config, loader.steps_per_epoch, total)
    try:
        schedule = make_schedule(config, total, loader.steps_per_epoch, lr_fn)
    except ValueError as err:
        raise ConfigError(f"{config.method}: {err}") from None
    mesh = distributed.worker_mesh("batch", devices[: config.workers])
    return Setup(config, dataset, loader, mesh, total, lr_fn, schedule, METHODS[config.method][0])


def _model_fns(config: Config, dataset: data.Dataset):
    dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[config.dtype]
    model = models.create(config.model, dataset.num_classes, dtype)
    mean, std = dataset.mean, dataset.std

    def loss_fn(params, model_state, batch, rng):
        del rng
        x = data.normalize(batch["image"], mean, std)
        logits, model_state = models.apply(model, params, model_state, x, train=True)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()
        accuracy = jnp.mean(jnp.argmax(logits, -1) == batch["label"])
        return loss, (model_state, {"accuracy": accuracy})

    def eval_fn(params, model_state, chunk):
        x = data.normalize(chunk["image"], mean, std)
        logits, _ = models.apply(model, params, model_state, x, train=False)
        return {
            "loss": optax.softmax_cross_entropy_with_integer_labels(logits, chunk["label"]),
            "correct": (jnp.argmax(logits, -1) == chunk["label"]).astype(jnp.float32),
        }

    return model, loss_fn, eval_fn


def _eval_set(images, labels, mesh, per_worker_batch: int):
    """The whole set as one sharded batch [W, K, B, ...] with a padding mask."""
    w = mesh.devices.size
    chunks = list(data.eval_batches(images, labels, w * per_worker_batch, w))
    stacked = {k: np.stack([c[k] for c in chunks], axis=1) for k in chunks[0]}
    return distributed.shard_batch(stacked, mesh)


def versions() -> dict:
    import flax

    return {"python": platform.python_version(), "jax": jax.__version__, "flax": flax.__version__,
            "optax": optax.__version__, "numpy": np.__version__, "adpsgd_jax": A.__version__}


def train_and_evaluate(setup: Setup, out_dir: str, progress: bool = True) -> dict:
    """Train ``setup.config`` and write metrics.jsonl, eval.jsonl and summary.json
    under ``out_dir/<method>-seed<k>``. Returns the summary."""
    config, loader, mesh, T = setup.config, setup.loader, setup.mesh, setup.total_steps
    started = time.perf_counter()
    model, loss_fn, eval_fn = _model_fns(config, setup.dataset)
    params, model_state = models.init(model, jax.random.PRNGKey(config.seed), setup.dataset.train_images.shape[1:])
    optimizer = optax.chain(
        optax.add_decayed_weights(config.weight_decay),
        optax.sgd(setup.lr_fn, momentum=config.momentum or None),
    )
    step_fn = A.make_train_step(loss_fn, optimizer, setup.schedule, axis_name="batch", strategy=setup.strategy,
                                qsgd_levels=config.qsgd_levels, qsgd_bucket_size=config.qsgd_bucket_size)
    p_train_step = distributed.pmap_step(step_fn, mesh)
    p_eval_step = jax.pmap(A.make_eval_step(eval_fn, "batch"), axis_name="batch", devices=list(mesh.devices.flat))
    state = distributed.replicate(
        A.TrainState.create(params, model_state, optimizer, setup.schedule, jax.random.PRNGKey(config.seed)), mesh
    )
    ds = setup.dataset
    eval_batch = max(1, min(256, len(ds.test_labels) // mesh.devices.size))
    test_set = _eval_set(ds.test_images, ds.test_labels, mesh, eval_batch)
    train_set = _eval_set(ds.train_images, ds.train_labels, mesh, eval_batch)
    writer = results.RunWriter(out_dir, results.run_name(config.method, config.seed))

    def evaluate(split):
        sums = jax.tree.map(lambda x: float(np.asarray(x)[0]), p_eval_step(state, split))
        return sums["loss"] / sums["count"], sums["correct"] / sums["count"]

    spe = loader.steps_per_epoch
    batches = data.prefetch(
        ({"image": b[0], "label": b[1]} for _, _, b in loader.iterate(0)),
        size=2, put=lambda b: distributed.shard_batch(b, mesh),
    )
    bar = _progress_bar(T, config, progress)
    compute_s, segment_start, pending, last = 0.0, None, None, {}

    def log(t, metrics):
        row = {k: (np.asarray(v).mean() if k in ("loss", "accuracy") else np.asarray(v)[0])
               for k, v in metrics.items() if k != "comm"}
        counter = metrics["comm"]
        last.update(row, syncs=int(np.asarray(counter.syncs)[0]), bytes=comm.total_bytes(counter))
        writer.metrics({"step": t + 1, "epoch": (t + 1) / spe, "lr": float(setup.lr_fn(t)), **last})
        bar.update(1)
        bar.set_postfix(epoch=f"{(t + 1) / spe:.1f}", loss=f"{last['loss']:.3f}",
                        acc=f"{last.get('accuracy', float('nan')):.3f}", syncs=last["syncs"], refresh=False)

    for t in range(T):
        state, metrics = p_train_step(state, next(batches))
        if t == 0:
            jax.block_until_ready(metrics)  # the first step compiles: not compute time
            segment_start = time.perf_counter()
        if pending is not None:
            log(*pending)  # pull the previous step's metrics after dispatching this one
        pending = (t, metrics)
        if (t + 1) % spe == 0 or t + 1 == T:
            log(*pending)
            pending = None
            compute_s += time.perf_counter() - segment_start
            test_loss, test_acc = evaluate(test_set)
            writer.evaluation({"epoch": (t + 1) / spe, "step": t + 1, "test_loss": test_loss, "test_accuracy": test_acc})
            segment_start = time.perf_counter()
    bar.close()
    train_loss, train_acc = evaluate(train_set)
    test_loss, test_acc = evaluate(test_set)
    compute_s *= T / max(T - 1, 1)  # the first (compiling) step is timed as an average step
    param_bytes = comm.tree_bytes(params)
    summary = {
        "final_train_loss": train_loss,
        "final_train_accuracy": train_acc,
        "test_loss": test_loss,
        "test_accuracy": test_acc,
        "last_minibatch_loss": last["loss"],
        "syncs": last["syncs"],
        "bytes": last["bytes"],
        "steps": T,
        "steps_per_epoch": spe,
        "num_params": int(sum(x.size for x in jax.tree.leaves(params))),
        "param_bytes": param_bytes,
        "wall_clock_s": time.perf_counter() - started,
        "compute_s": compute_s,
        "config": config.to_dict(),
        "versions": versions(),
        "device_kind": mesh.devices.flat[0].device_kind,
        "num_devices": mesh.devices.size,
    }
    writer.summary(summary)
    return summary


def _progress_bar(total: int, config: Config, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=f"{config.method} seed {config.seed}", disable=not enabled,
                leave=True, dynamic_ncols=True)
