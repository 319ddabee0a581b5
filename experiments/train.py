"""Train one configured run and write its results: ``train_and_evaluate``.

The CLI (``experiments/cifar.py``), the notebooks and the tests all call
this function. Everything that decides a run is in its ``Config``; every
check of the config against this machine and the data happens in
``prepare`` before anything is compiled.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import platform
import signal
import threading
import time
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

import adpsgd_jax as A
from adpsgd_jax import comm, distributed, schedules
from experiments import checkpoint, data, models, results
from experiments.config import METHODS, Config, ConfigError, RunOptions, config_differences


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
    run_dir: str
    resume_from: Optional[int] = None  # checkpoint step to continue from
    finished: bool = False  # --resume found this run complete: nothing to do

    @property
    def strategy(self) -> str:
        return METHODS[self.config.method][0]

    @property
    def two_level(self) -> bool:
        """Groups of several workers: the 2-D mesh ("group", "local")."""
        return len(self.mesh.axis_names) == 2


def lr_schedule(config: Config, steps_per_epoch: int, total_steps: int):
    """Learning rate per step: step decay at epochs (default 50% and 75%), cosine, or constant."""
    if config.lr_schedule == "cosine":
        return optax.cosine_decay_schedule(config.lr, total_steps)
    if config.lr_schedule == "constant":
        return optax.constant_schedule(config.lr)
    boundaries = {step: config.lr_decay_factor for step in decay_steps(config, steps_per_epoch)}
    return optax.piecewise_constant_schedule(config.lr, boundaries)


def decay_steps(config: Config, steps_per_epoch: int) -> list[int]:
    """Steps of the step-decay boundaries (default epochs: 50% and 75% of the run)."""
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


def make_optimizer(config: Config, lr) -> optax.GradientTransformation:
    """The local optimizer: weight decay added to the gradient, then SGD with momentum at ``lr`` (schedule or float)."""
    return optax.chain(optax.add_decayed_weights(config.weight_decay),
                       optax.sgd(lr, momentum=config.momentum or None))


def make_outer_optimizer(config: Config) -> Optional[optax.GradientTransformation]:
    """The outer optimizer of ``config`` (None for plain averaging)."""
    if config.outer_optimizer == "none":
        return None
    nesterov = config.outer_optimizer == "nesterov"
    return optax.sgd(config.outer_lr, momentum=config.outer_momentum or None, nesterov=nesterov)


def group_size(config: Config) -> int:
    """Workers per group: ``host`` is the devices of one process among the run's workers."""
    return config.workers // jax.process_count() if config.group_size == "host" else config.group_size


def _worker_mesh(config: Config, devices: list):
    """The 1-D worker mesh, or for groups of L > 1 workers the 2-D mesh ("group", "local")."""
    size = group_size(config)
    if size == 1:
        return distributed.worker_mesh("batch", devices)
    mesh = distributed.group_mesh(size, devices)
    if config.group_size == "host" and any(len({d.process_index for d in row}) > 1 for row in mesh.devices):
        raise ConfigError("--group-size host: the devices are not ordered process by process; give a number instead")
    return mesh


def _resume_point(config: Config, run_dir: str) -> tuple[Optional[int], bool]:
    """(checkpoint step, finished) of a run to resume; ConfigError if it cannot be."""
    if not os.path.isdir(run_dir):
        return None, False  # never started: it starts now
    name = os.path.basename(run_dir)
    try:
        saved = results.read_json(os.path.join(run_dir, results.CONFIG))
    except (OSError, ValueError) as err:
        raise ConfigError(f"--resume: {run_dir} has no readable {results.CONFIG} ({err}); "
                          "drop --resume to start the run over") from None
    diffs = config_differences(saved, config)
    if diffs:
        raise ConfigError(f"--resume refused for {name}: the configuration differs from the checkpointed run in "
                          f"{'; '.join(diffs)}. Use the same flags, or another --out")
    if os.path.isfile(os.path.join(run_dir, results.SUMMARY)):
        return None, True
    try:
        return checkpoint.check_resumable(run_dir), False
    except checkpoint.CheckpointError as err:
        raise ConfigError(f"--resume: {name}: {err}; drop --resume to start the run over") from None


def prepare(config: Config, dataset: Optional[data.Dataset] = None, options: RunOptions = RunOptions()) -> Setup:
    """Check the config against the devices, the data and (with ``--resume``)
    the saved run; build loader, mesh and schedule.

    Raises ConfigError (flag named) or data.DataUnavailableError; compiles nothing.
    """
    devices = jax.devices()  # every process's devices in a multi-process run
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
        mesh = _worker_mesh(config, devices[: config.workers])
        loader = data.TrainLoader(dataset, shards, config.batch_size, config.seed,
                                  workers=distributed.local_workers(mesh))
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
    run_dir = os.path.join(options.out, results.run_name(config.label, config.seed))
    resume_from, finished = _resume_point(config, run_dir) if options.resume else (None, False)
    return Setup(config, dataset, loader, mesh, total, lr_fn, schedule, run_dir, resume_from, finished)


def model_fns(config: Config, dataset: data.Dataset):
    """(model, loss_fn, eval_fn) of ``config.model`` on ``dataset``: normalised uint8 inputs, cross-entropy, accuracy."""
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


class NonFiniteError(RuntimeError):
    """A non-finite loss, variance or parameter: the run stops at that step."""

    def __init__(self, step: int, metric: str, value: float, last_checkpoint: Optional[int], folder: str):
        self.step, self.metric = step, metric
        where = f"step {last_checkpoint} in {folder}" if last_checkpoint is not None else "none yet"
        super().__init__(f"non-finite {metric} ({value}) at step {step}; the last good checkpoint is {where}")


class Interrupted(RuntimeError):
    """SIGTERM or SIGINT arrived; a checkpoint of the current step was written."""

    def __init__(self, signum: int, step: int, folder: str):
        self.signum, self.step = signum, step
        name = signal.Signals(signum).name
        super().__init__(f"{name} at step {step}: checkpoint written in {folder}; continue with --resume")


class PeerFailure(RuntimeError):
    """A collective failed in a multi-process run: a peer process died or hung up."""

    def __init__(self, step: int, err: Exception):
        first = str(err).strip().splitlines()[0][:300] if str(err).strip() else type(err).__name__
        super().__init__(f"a collective failed at step {step} (another process stopped?): {first}")


@contextlib.contextmanager
def _stop_on_signals():
    """Record SIGTERM / SIGINT instead of dying; yields a dict whose 'signum' is set."""
    caught = {"signum": None}
    if threading.current_thread() is not threading.main_thread():
        yield caught  # signal handlers can only be installed from the main thread
        return
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    for sig in previous:
        signal.signal(sig, lambda signum, frame: caught.update(signum=signum))
    try:
        yield caught
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


@jax.jit
def _all_finite(tree) -> jax.Array:
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
                              if jnp.issubdtype(x.dtype, jnp.floating)]))


def train_and_evaluate(setup: Setup, options: RunOptions = RunOptions()) -> dict:
    """Train ``setup.config`` (or continue it from its checkpoint) and write
    metrics.jsonl, eval.jsonl, checkpoints and summary.json under
    ``options.out/<method>-seed<k>``. Returns the summary.

    Raises NonFiniteError when the loss, a sync's variance or the parameters
    stop being finite, and Interrupted after writing a checkpoint when
    SIGTERM / SIGINT arrives.
    """
    if setup.finished:
        return results.read_json(os.path.join(setup.run_dir, results.SUMMARY))
    config, loader, mesh, T = setup.config, setup.loader, setup.mesh, setup.total_steps
    started = time.perf_counter()
    model, loss_fn, eval_fn = model_fns(config, setup.dataset)
    params, model_state = models.init(model, jax.random.PRNGKey(config.seed), setup.dataset.train_images.shape[1:])
    optimizer = make_optimizer(config, setup.lr_fn)
    outer = make_outer_optimizer(config)
    # Two-level: the schedule averages across groups ("group"); gradients are averaged inside them ("local").
    step_fn = A.make_train_step(loss_fn, optimizer, setup.schedule, axis_name=mesh.axis_names[0],
                                strategy=setup.strategy, qsgd_levels=config.qsgd_levels,
                                qsgd_bucket_size=config.qsgd_bucket_size,
                                group_axis_name=mesh.axis_names[1] if setup.two_level else None, outer_optimizer=outer)
    # shard_map over the worker mesh: one code path for one process or many.
    p_train_step = distributed.shard_map_step(step_fn, mesh)
    p_eval_step = distributed.shard_map_step(A.make_eval_step(eval_fn, tuple(mesh.axis_names)), mesh,
                                             donate_state=False)
    primary = jax.process_index() == 0  # writes the shared files; every process writes its checkpoint shards
    state = distributed.replicate(
        A.TrainState.create(params, model_state, optimizer, setup.schedule, jax.random.PRNGKey(config.seed),
                            outer_optimizer=outer), mesh
    )
    name = results.run_name(config.label, config.seed)
    start, timed_s, timed_steps, last = 0, 0.0, 0, {}
    if setup.resume_from is None:  # a fresh run clears its folder first
        writer = results.RunWriter(options.out, name, config.to_dict(), enabled=primary)
        _barrier("run folder ready")
        checkpoints = checkpoint.RunCheckpoints(setup.run_dir, options.keep_checkpoints)
    else:  # restore before touching the logs, so a bad checkpoint changes nothing
        checkpoints = checkpoint.RunCheckpoints(setup.run_dir, options.keep_checkpoints)
        state, meta = checkpoints.restore(state, setup.resume_from)
        start, timed_s, timed_steps, last = meta["step"], meta["timed_s"], meta["timed_steps"], meta["last"]
        writer = results.RunWriter(options.out, name, config.to_dict(), resume_step=start, enabled=primary)
    ds, spe = setup.dataset, loader.steps_per_epoch
    eval_batch = max(1, min(256, len(ds.test_labels) // mesh.devices.size))
    test_set = _eval_set(ds.test_images, ds.test_labels, mesh, eval_batch)
    train_set = _eval_set(ds.train_images, ds.train_labels, mesh, eval_batch)
    every = default_checkpoint_every(spe) if options.checkpoint_every is None else options.checkpoint_every
    saved = [setup.resume_from]

    def evaluate(split):
        sums = jax.tree.map(lambda x: float(distributed.local_rows(x)[0]), p_eval_step(state, split))
        return sums["loss"] / sums["count"], sums["correct"] / sums["count"]

    def log(t, metrics):
        # Loss and accuracy average this process's workers (all of them in a
        # one-process run): logging adds no communication between syncs.
        row = {k: (distributed.local_rows(v).mean() if k in ("loss", "accuracy") else distributed.local_rows(v)[0])
               for k, v in metrics.items() if not isinstance(v, comm.CommCounter)}
        if not np.isfinite(row["loss"]):
            raise NonFiniteError(t + 1, "loss", row["loss"], saved[0], checkpoints.dir)
        if row["synced"] and not np.isfinite(row["variance"]):
            raise NonFiniteError(t + 1, "variance", row["variance"], saved[0], checkpoints.dir)
        last.update({k: v.item() for k, v in row.items()})
        last["syncs"], last["bytes"] = _counted(metrics["comm"])
        if "group_comm" in metrics:  # two-level: the every-step mean inside the groups
            last["group_syncs"], last["group_bytes"] = _counted(metrics["group_comm"])
        writer.metrics({"step": t + 1, "epoch": (t + 1) / spe, "lr": float(setup.lr_fn(t)), **last})
        bar.update(1)
        bar.set_postfix(epoch=f"{(t + 1) / spe:.1f}", loss=f"{last['loss']:.3f}",
                        acc=f"{last.get('accuracy', float('nan')):.3f}", syncs=last["syncs"], refresh=False)

    def save(step):
        if not bool(_all_finite(state.params)):
            raise NonFiniteError(step, "parameters", float("nan"), saved[0], checkpoints.dir)
        writer.flush()
        meta = {"step": step, "timed_s": timed_s, "timed_steps": timed_steps, "last": last}
        checkpoints.save(step, state, meta)
        saved[0] = step

    batches = data.prefetch(  # each process builds and sends only its own workers' rows
        ({"image": b[0], "label": b[1]} for _, _, b in loader.iterate(start)),
        size=2, put=lambda b: distributed.shard_local_batch(b, mesh),
    )
    bar = _progress_bar(T, start, config, options.progress and primary)
    pending, segment_start, t, final_test = None, None, start, None
    try:
        with _stop_on_signals() as caught:
            for t in range(start, T):
                state, metrics = p_train_step(state, next(batches))
                if segment_start is None:
                    jax.block_until_ready(metrics)  # this step compiled: not compute time
                    segment_start, first = time.perf_counter(), t
                if pending is not None:
                    log(*pending)  # pull the previous step's metrics after dispatching this one
                pending = (t, metrics)
                epoch_end = (t + 1) % spe == 0 or t + 1 == T
                due = (every and (t + 1) % every == 0) or t + 1 == T
                if not (epoch_end or due or caught["signum"]):
                    continue
                log(*pending)
                pending = None
                timed_s += time.perf_counter() - segment_start
                timed_steps += t - first
                if epoch_end:
                    final_test = test_loss, test_acc = evaluate(test_set)
                    writer.evaluation({"epoch": (t + 1) / spe, "step": t + 1, "test_loss": test_loss,
                                       "test_accuracy": test_acc})
                if due or caught["signum"]:
                    save(t + 1)
                if caught["signum"]:
                    raise Interrupted(caught["signum"], t + 1, checkpoints.dir)
                segment_start, first = time.perf_counter(), t
    except jax.errors.JaxRuntimeError as err:
        if jax.process_count() == 1:
            raise
        raise PeerFailure(t + 1, err) from err
    finally:
        batches.close()  # stops and joins the prefetch thread before anything else ends
        bar.close()
        writer.close()
        checkpoints.close()
    train_loss, train_acc = evaluate(train_set)
    # Step T is an epoch end, so the loop evaluated the final state already
    # (unless a resume started at T, when the loop did not run).
    test_loss, test_acc = final_test if final_test is not None else evaluate(test_set)
    summary = {
        "final_train_loss": train_loss,
        "final_train_accuracy": train_acc,
        "test_loss": test_loss,
        "test_accuracy": test_acc,
        "last_minibatch_loss": last["loss"],
        "syncs": last["syncs"],
        "bytes": last["bytes"],
        # Two-level averaging: syncs / bytes above cross groups; these stay inside them.
        "group_size": group_size(config),
        "group_syncs": last.get("group_syncs", 0),
        "group_bytes": last.get("group_bytes", 0),
        "steps": T,
        "steps_per_epoch": spe,
        "num_params": int(sum(x.size for x in jax.tree.leaves(params))),
        "param_bytes": comm.tree_bytes(params),
        "wall_clock_s": time.perf_counter() - started,
        # Steps that compiled are left out of the timing; the rest stand for all T.
        "compute_s": timed_s / max(timed_steps, 1) * T,
        "config": config.to_dict(),
        "versions": versions(),
        "device_kind": mesh.devices.flat[0].device_kind,
        "num_devices": mesh.devices.size,
    }
    writer.summary(summary)
    return summary


def _counted(counter: comm.CommCounter) -> tuple[int, int]:
    """(rounds, exact bytes) of a per-worker ``CommCounter``, as read on the host."""
    return int(distributed.local_rows(counter.rounds)[0]), comm.total_bytes(counter)


def default_checkpoint_every(steps_per_epoch: int, min_steps: int = 200) -> int:
    """Whole epochs covering at least ``min_steps`` steps (saves cost ~0.1 s each)."""
    return steps_per_epoch * -(-min_steps // steps_per_epoch)


def _barrier(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def _progress_bar(total: int, done: int, config: Config, enabled: bool):
    if enabled:
        from tqdm.auto import tqdm
    else:
        from tqdm import tqdm  # tqdm.auto warns in notebooks without ipywidgets, even when disabled

    return tqdm(total=total, initial=done, desc=f"{config.label} seed {config.seed}", disable=not enabled,
                leave=True, dynamic_ncols=True)
