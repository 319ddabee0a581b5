"""Train one configured run and write its results: ``train_and_evaluate``.

The CLI (``experiments/cifar.py``), the notebooks and the tests all call
this function: ``setup.prepare`` (experiments/setup.py) checks a ``Config``
before anything compiles, then a run reads as build (``Run``), iterate
(``train``), summarise (``summarise``).
"""

from __future__ import annotations

import contextlib
import os
import platform
import signal
import sys
import threading
import time
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

import adpsgd_jax as A
from adpsgd_jax import collectives, comm, distributed
from experiments import checkpoint, compute, curves, methods, models, results
from experiments.config import Config, RunOptions
from experiments.loader import eval_batches, prefetch
from experiments.setup import Setup


def _eval_set(images, labels, layout: distributed.Layout, per_worker_batch: int):
    """The whole set as one sharded batch [N, K, B, ...] with a padding mask."""
    n = layout.num_workers
    chunks = list(eval_batches(images, labels, n * per_worker_batch, n))
    stacked = {k: np.stack([c[k] for c in chunks], axis=1) for k in chunks[0]}
    return distributed.shard_batch(stacked, layout)


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


class Run:
    """One run in progress: its compiled steps, replicated state, files and
    counters, built by ``Run(setup, options)`` (fresh, or restored from its
    checkpoint) and advanced by ``train``."""

    def __init__(self, setup: Setup, options: RunOptions):
        config, layout = setup.config, setup.layout
        self.setup, self.options, self.started = setup, options, time.perf_counter()
        model, loss_fn, eval_fn = methods.model_fns(config, setup.dataset)
        params, model_state = models.init(model, jax.random.PRNGKey(config.seed), setup.dataset.train_images.shape[1:])
        self.num_params, self.param_bytes = int(sum(x.size for x in jax.tree.leaves(params))), comm.tree_bytes(params)
        # An evaluation averages the parameters and model state across the workers once (make_eval_step).
        self.eval_round_bytes = (comm.tree_bytes(collectives.float_leaves((params, model_state)))
                                 if layout.num_workers > 1 else 0)
        strategy = methods.make_strategy(config, loss_fn, setup.lr_fn, setup.schedule, layout)
        # shard_map over the layout's devices: one code path for one process or many, one worker per device or K.
        self.p_train_step = distributed.shard_map_step(strategy.step, layout)
        self.p_eval_step = distributed.shard_map_step(A.make_eval_step(eval_fn, per_example=("correct",), workers=layout), layout,
                                                      donate_state=False)
        self.state = distributed.replicate(strategy.init(params, model_state, jax.random.PRNGKey(config.seed)), layout)
        # Compile the check that guards every checkpoint now: compiled at the first save, it made that save
        # 2-4x slower (0.3-0.4 s instead of 0.1 s for the digits MLP on 2 busy cores), and a kill then loses the run.
        _all_finite(self.state.params)
        self.primary = jax.process_index() == 0  # writes the shared files; every process writes checkpoint shards
        self.start, self.timed_s, self.timed_steps, self.last = 0, 0.0, 0, {}
        self.eval_rounds, self.final_test = 0, None  # evaluations so far; (loss, accuracy) of the last test one
        self.final_correct = None  # the final test evaluation per example (results.pack_correct)
        name = results.run_name(config.label, config.seed)
        if setup.resume_from is None:  # a fresh run clears its folder first
            self.writer = curves.CurveWriter(options.out, name, config.to_dict(), enabled=self.primary,
                                             tensorboard=options.tensorboard)
            _barrier("run folder ready")
            self.checkpoints = checkpoint.RunCheckpoints(setup.run_dir, options.keep_checkpoints)
        else:  # restore before touching the logs, so a bad checkpoint changes nothing
            self.checkpoints = checkpoint.RunCheckpoints(setup.run_dir, options.keep_checkpoints)
            self.state, meta = self.checkpoints.restore(self.state, setup.resume_from)
            self.start, self.timed_s, self.timed_steps = meta["step"], meta["timed_s"], meta["timed_steps"]
            self.last = meta["last"]
            # Checkpoints from before these were saved: one evaluation per epoch end so far, none kept.
            self.eval_rounds = meta.get("eval_rounds", self.start // setup.loader.steps_per_epoch)
            self.final_test = tuple(meta["final_test"]) if meta.get("final_test") else None
            self.final_correct = meta.get("final_correct")  # None in checkpoints from before it was kept
            self.writer = curves.CurveWriter(options.out, name, config.to_dict(), resume_step=self.start,
                                             enabled=self.primary, tensorboard=options.tensorboard)
        ds = setup.dataset
        eval_batch = max(1, min(256, len(ds.test_labels) // layout.num_workers))
        self.test_set = _eval_set(ds.test_images, ds.test_labels, layout, eval_batch)
        self.train_set = _eval_set(ds.train_images, ds.train_labels, layout, eval_batch)
        every = options.checkpoint_every
        self.every = default_checkpoint_every(setup.loader.steps_per_epoch) if every is None else every
        self.saved = setup.resume_from  # the last checkpoint's step

    def evaluate(self, split, keep_correct: bool = False) -> tuple[float, float]:
        """(mean loss, accuracy) of the averaged model on a whole split (one round of averaging, counted).
        ``keep_correct``: also keep its per-example correctness in ``final_correct`` (the test split)."""
        self.eval_rounds += 1
        out = self.p_eval_step(self.state, split)
        per_example = out.pop("per_example")
        sums = jax.tree.map(lambda x: float(distributed.local_rows(x)[0]), out)
        if keep_correct:
            self.final_correct = results.pack_correct(_in_order(per_example["correct"], int(sums["count"])))
        return sums["loss"] / sums["count"], sums["correct"] / sums["count"]

    def log(self, t: int, metrics: A.StepMetrics) -> dict:
        """Check and write the metrics row of step t + 1; returns it."""
        # Loss and accuracy average this process's workers (all of them in a
        # one-process run): logging adds no communication between syncs.
        synced = bool(distributed.local_rows(metrics.synced)[0])
        row = {"loss": distributed.local_rows(metrics.loss).mean(),
               **{k: distributed.local_rows(v).mean() for k, v in metrics.aux.items()},
               "synced": int(synced),
               "variance": distributed.local_rows(metrics.variance)[0] if synced else float("nan"),
               "period": distributed.local_rows(metrics.period)[0]}
        if metrics.variance_bound is not None:  # a drift schedule's per-step bound of V (schedules.variance_trigger)
            row["variance_bound"] = distributed.local_rows(metrics.variance_bound)[0]
        folder = self.checkpoints.dir
        if not np.isfinite(row["loss"]):
            raise NonFiniteError(t + 1, "loss", row["loss"], self.saved, folder)
        if synced and not np.isfinite(row["variance"]):
            raise NonFiniteError(t + 1, "variance", row["variance"], self.saved, folder)
        self.last.update({k: v.item() if hasattr(v, "item") else v for k, v in sorted(row.items())})
        self.last["syncs"], self.last["bytes"] = _counted(metrics.comm)
        if self.setup.layout.group_axis_name:  # two-level: the every-step mean inside the groups
            self.last["group_syncs"], self.last["group_bytes"] = _counted(metrics.group_comm)
        if metrics.monitor_comm is not None:  # the drift schedule's scalar-pair all-reduce, every step
            self.last["monitor_rounds"], self.last["monitor_bytes"] = _counted(metrics.monitor_comm)
        spe = self.setup.loader.steps_per_epoch
        row = {"step": t + 1, "epoch": (t + 1) / spe, "lr": float(self.setup.lr_fn(t)), **self.last}
        self.writer.metrics(row)
        return row

    def save(self, step: int) -> None:
        if not bool(_all_finite(self.state.params)):
            raise NonFiniteError(step, "parameters", float("nan"), self.saved, self.checkpoints.dir)
        self.writer.flush()
        meta = {"step": step, "timed_s": self.timed_s, "timed_steps": self.timed_steps, "last": self.last,
                "eval_rounds": self.eval_rounds, "final_test": self.final_test, "final_correct": self.final_correct}
        self.checkpoints.save(step, self.state, meta)
        self.saved = step

    def close(self) -> None:
        self.writer.close()
        self.checkpoints.close()


def train(run: Run, on_step: Optional[Callable[[int, dict], None]] = None) -> None:
    """Steps ``run.start`` .. T - 1: log every step, evaluate at epoch ends,
    checkpoint when due, stop with a checkpoint on SIGTERM / SIGINT.

    A step's metrics are pulled after the next step is dispatched, so the
    device never waits for Python; steps that compiled are not timed.
    ``on_step(step, row)`` runs after each metrics row is written.
    """
    setup, T, spe = run.setup, run.setup.total_steps, run.setup.loader.steps_per_epoch
    batches = prefetch(  # each process builds and sends only its own workers' rows
        ({"image": b[0], "label": b[1]} for _, _, b in setup.loader.iterate(run.start)),
        size=2, put=lambda b: distributed.shard_local_batch(b, setup.layout),
    )
    bar = _progress_bar(T, run.start, setup.config, run.options.progress and run.primary)
    first_epoch = [] if run.start == 0 and run.primary else None  # its losses, for the check after it

    def log(t, metrics):
        row = run.log(t, metrics)
        if first_epoch is not None and t < spe:
            first_epoch.append(row["loss"])
            if t + 1 == spe:
                warn_if_stuck(setup, first_epoch)
        bar.update(1)
        bar.set_postfix(epoch=f"{(t + 1) / spe:.1f}", loss=f"{row['loss']:.3f}",
                        acc=f"{row.get('accuracy', float('nan')):.3f}", syncs=row["syncs"], refresh=False)
        if on_step is not None:
            on_step(t + 1, row)

    pending, segment_start, t = None, None, run.start
    try:
        with _stop_on_signals() as caught:
            for t in range(run.start, T):
                run.state, metrics = run.p_train_step(run.state, next(batches))
                if segment_start is None:
                    jax.block_until_ready(metrics)  # this step compiled: not compute time
                    segment_start, first = time.perf_counter(), t
                if pending is not None:
                    log(*pending)  # pull the previous step's metrics after dispatching this one
                pending = (t, metrics)
                epoch_end = (t + 1) % spe == 0 or t + 1 == T
                due = (run.every and (t + 1) % run.every == 0) or t + 1 == T
                if not (epoch_end or due or caught["signum"]):
                    continue
                log(*pending)
                pending = None
                run.timed_s += time.perf_counter() - segment_start
                run.timed_steps += t - first
                if epoch_end:
                    run.final_test = test_loss, test_acc = run.evaluate(run.test_set, keep_correct=t + 1 == T)
                    run.writer.evaluation({"epoch": (t + 1) / spe, "step": t + 1, "test_loss": test_loss,
                                           "test_accuracy": test_acc})
                if due or caught["signum"]:
                    run.save(t + 1)
                if caught["signum"]:
                    raise Interrupted(caught["signum"], t + 1, run.checkpoints.dir)
                segment_start, first = time.perf_counter(), t
    except jax.errors.JaxRuntimeError as err:
        if jax.process_count() == 1:
            raise
        raise PeerFailure(t + 1, err) from err
    finally:
        batches.close()  # stops and joins the prefetch thread before anything else ends
        bar.close()
        run.close()


STUCK = 0.02  # a first epoch whose loss has not fallen 2% below the first step's has not learned


def warn_if_stuck(setup: Setup, losses: list) -> None:
    """One warning line on stderr when the mean training loss of the first epoch's second half has not
    fallen ``STUCK`` (2%) below the first step's loss (within 2% of it, or above): the run is not
    learning, most often for its learning rate."""
    tail = losses[len(losses) // 2:]
    start, now = losses[0], sum(tail) / len(tail)
    if now > (1 - STUCK) * start:
        c = setup.config
        print(f"warning: {c.label} seed {c.seed}: the training loss of epoch 1 ({now:.4f}, the mean of its second "
              f"half) is not {STUCK:.0%} below its first step's ({start:.4f}): the run is not learning; its "
              f"learning rate is {c.lr} (--lr)", file=sys.stderr, flush=True)


def summarise(run: Run) -> dict:
    """Evaluate the final averaged model, probe one worker's compute per step
    (``compute.step_seconds``) and write summary.json; returns it."""
    setup, config, last, T = run.setup, run.setup.config, run.last, run.setup.total_steps
    train_loss, train_acc = run.evaluate(run.train_set)
    # Step T is an epoch end, so the loop evaluated the final state already
    # (a resume at T restored that evaluation from the checkpoint).
    if run.final_test is None:
        run.final_test = run.evaluate(run.test_set, keep_correct=True)
    test_loss, test_acc = run.final_test
    layout, wall_clock_s = setup.layout, time.perf_counter() - run.started
    step_s, program = compute.step_seconds(setup, distributed.unreplicate(run.state.params),
                                  distributed.unreplicate(run.state.model_state))
    summary = {
        "final_train_loss": train_loss,
        "final_train_accuracy": train_acc,
        "test_loss": test_loss,
        "test_accuracy": test_acc,
        # Per example of the test set, in its order: packed bits (results.pack_correct; null from an older checkpoint).
        "test_correct": run.final_correct,
        "last_minibatch_loss": last["loss"],
        "syncs": last["syncs"],
        "bytes": last["bytes"],
        # The evaluations' averaging of parameters and model state (each epoch's test split, the final train split).
        "eval_rounds": run.eval_rounds,
        "eval_bytes": run.eval_rounds * run.eval_round_bytes,
        # Two-level averaging: syncs / bytes above cross groups; these stay inside them.
        "group_size": methods.group_size(config),
        "group_syncs": last.get("group_syncs", 0),
        "group_bytes": last.get("group_bytes", 0),
        # A drift schedule (trigger) all-reduces a float32 pair after every step, besides its syncs.
        "monitor_rounds": last.get("monitor_rounds", 0),
        "monitor_bytes": last.get("monitor_bytes", 0),
        "data_source": setup.dataset.source,
        "num_train_examples": setup.dataset.num_train,
        "num_test_examples": setup.dataset.num_test,
        "steps": T,
        "steps_per_epoch": setup.loader.steps_per_epoch,
        "num_params": run.num_params,
        "param_bytes": run.param_bytes,
        "wall_clock_s": wall_clock_s,  # the run so far, the compute probe excluded
        # The time model's compute: one worker's local step (the run's own, its averaging gate shut), alone on
        # one device, no communication.
        "compute_step_s": step_s,
        # The probe's program (a hash of its text): runs that share it do the same local arithmetic.
        "compute_program": program,
        # The run's own seconds per step here (compiling steps left out): its K workers per device and
        # its in-process collectives included; null when no step was timed.
        "measured_step_s": run.timed_s / run.timed_steps if run.timed_steps else None,
        "config": config.to_dict(),
        "versions": versions(),
        "device_kind": layout.mesh.devices.flat[0].device_kind,
        "num_workers": layout.num_workers,
        "num_devices": layout.mesh.devices.size,
        "workers_per_device": layout.workers_per_device,
        "worker_loop": layout.loop.name,
    }
    run.writer.summary(summary)
    return summary


def train_and_evaluate(setup: Setup, options: RunOptions = RunOptions(),
                       on_step: Optional[Callable[[int, dict], None]] = None) -> dict:
    """Train ``setup.config`` (or continue it from its checkpoint) and write
    metrics.jsonl, eval.jsonl, checkpoints and summary.json under
    ``options.out/<label>-seed<k>``. Returns the summary.

    ``on_step(step, row)`` is called on the host after the metrics row of
    each step (1-based) is written. Raises NonFiniteError when the loss, a
    sync's variance or the parameters stop being finite, and Interrupted
    after writing a checkpoint when SIGTERM / SIGINT arrives.
    """
    if setup.finished:
        return results.read_json(os.path.join(setup.run_dir, results.SUMMARY))
    run = Run(setup, options)
    train(run, on_step)
    return summarise(run)


def _in_order(values: jax.Array, count: int) -> np.ndarray:
    """Per-example booleans in the split's order from the eval step's per-worker [N, K, B] values (chunk k,
    worker w, slot b is example (k N + w) B + b; ``_eval_set``), the padding after the last example cut
    off. Every process gathers all the workers' rows."""
    if values.is_fully_addressable:
        rows = np.asarray(values)
    else:
        from jax.experimental import multihost_utils

        rows = np.asarray(multihost_utils.process_allgather(values, tiled=True))
    return np.transpose(rows, (1, 0, 2)).reshape(-1)[:count] > 0.5


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
