"""Performance benchmarks: ``python -m experiments.bench [--quick] [--out FILE]``.

Every figure is measured in this one process, on the machine it runs on,
after warm-up, as the median over ``--repeats`` repetitions of
``--steps-per-repeat`` steps each, ending with ``jax.block_until_ready``.
The two sides of a ratio are timed in alternation (A, B, A, B, ...) so that
drift of the machine falls on both. Items:

1. gate overhead: a local (non-sync) step of the gated ``average`` step over
   the same local step compiled with no collective and no gate. Target <= 1.02.
2. sync cost: a step that averages (schedule ``constant(1)``) over a
   full-sync ``allreduce`` step of the same model. Target <= 1.05.
3. compilations of the train step over a whole run of every method, counted
   from jax's backend-compile events while the run's steps execute. Target 1.
4. throughput, images/s/device: ADPSGD's local step, the full-sync step and
   a plain single-device flax loop (``flax.training.train_state``, jitted,
   state donated). Target: ADPSGD local >= 0.98x the plain loop. The host
   input pipeline's rate is measured on its own to show whether it could be
   the bottleneck (the training loop prefetches it in a thread).
5. device memory of the compiled step versus the plain loop, from XLA's
   compiled memory analysis (arguments + outputs - aliased + temporaries),
   which every backend reports; extra memory is given in parameter copies.
6. syncs, bytes and predicted time to a target test accuracy on digits for
   each strategy, from real training runs; predicted wall-clock for
   ``--predict-workers`` workers at 10 and 100 Gbps by ALGORITHM.md's time
   model with measured compute time, and the speedup over full sync.
7. claim C2: bytes of ADPSGD versus QSGD at 8 bits (s = 127) and 4 bits
   (s = 7) to reach the same training loss.

On CPU, items 1-2 use every (virtual) device, and items 4-5 a single device:
virtual CPU devices share the same cores, so a per-device rate measured on
several of them would measure the sharing, not the step.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time
from typing import Any, Callable, Optional

from adpsgd_jax import timemodel
from adpsgd_jax.timemodel import Link
from experiments import cifar, config as cfg  # none imports jax
from experiments.names import BANDWIDTHS_GBPS, GBPS

TARGETS = {  # name -> (comparison, target)
    "gate_overhead_ratio": ("<=", 1.02),
    "sync_over_allreduce_ratio": ("<=", 1.05),
    "throughput_ratio_vs_plain": (">=", 0.98),
}
MODELS = ("resnet18", "vgg16", "cnn", "mlp")
DATASETS = ("digits", "cifar10", "cifar100")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m experiments.bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="small model, few repetitions, one short training run "
                                                        "per method (the CI smoke test)")
    p.add_argument("--out", default="results/bench.json", help="JSON results; the Markdown table goes beside it (.md)")
    p.add_argument("--model", help=f"model of items 1, 2, 4, 5: one of {', '.join(MODELS)} "
                                   "(default resnet18; cnn with --quick)")
    p.add_argument("--batch-size", type=int, help="per-device batch of items 1, 2, 4, 5 (default 128; 16 with --quick; "
                                                  "32 for ResNet-18 / VGG-16 on CPU)")
    p.add_argument("--repeats", type=int, help="timed repetitions per variant (default 20; 5 with --quick)")
    p.add_argument("--steps-per-repeat", type=int, help="steps per repetition (default 5; 2 with --quick)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per variant after compiling")
    p.add_argument("--dataset", default="digits", help=f"data of items 6-7: one of {', '.join(DATASETS)}")
    p.add_argument("--data-dir", help="tfds data directory for CIFAR (items 6-7)")
    p.add_argument("--epochs", type=int, help="training epochs of items 6-7 (default: the dataset's; 3 with --quick)")
    p.add_argument("--seeds", default=None, help="comma-separated seeds of items 6-7 (default 0,1,2; 0 with --quick)")
    p.add_argument("--avg-period", type=int, default=8, help="communication budget of CPSGD / ADPSGD (items 6-7)")
    p.add_argument("--predict-workers", type=int, default=16, help="worker count of the time model (item 6)")
    p.add_argument("--latency-us", type=float, default=10.0, help="per-message latency of the time model (item 6)")
    p.add_argument("--skip-training", action="store_true", help="skip items 6 and 7")
    return p


def check_args(args: argparse.Namespace) -> None:
    """Refuse bad values before jax starts (one line naming the flag)."""
    def need(ok, message):
        if not ok:
            raise ValueError(message)

    need(args.model is None or args.model in MODELS, f"--model {args.model!r} is unknown; accepted values: "
                                                     f"{', '.join(MODELS)}")
    need(args.dataset in DATASETS, f"--dataset {args.dataset!r} is unknown; accepted values: {', '.join(DATASETS)}")
    for flag in ("batch_size", "repeats", "steps_per_repeat", "epochs"):
        value = getattr(args, flag)
        need(value is None or value >= 1, f"--{flag.replace('_', '-')} must be >= 1, got {value}")
    need(args.warmup >= 1, f"--warmup must be >= 1 (the first step compiles), got {args.warmup}")
    need(args.avg_period >= 1, f"--avg-period must be >= 1, got {args.avg_period}")
    need(args.predict_workers >= 2, f"--predict-workers must be >= 2, got {args.predict_workers}")
    need(args.latency_us >= 0, f"--latency-us must be >= 0, got {args.latency_us}")
    if args.seeds is not None:
        try:
            seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
        except ValueError:
            seeds = []
        need(seeds and len(set(seeds)) == len(seeds), f"--seeds takes distinct comma-separated integers, "
                                                      f"got {args.seeds!r}")
    need(not os.path.isdir(args.out), f"--out {args.out!r} is a folder; give a file name such as bench.json")
    cfg.check_writable(os.path.dirname(os.path.abspath(args.out)))  # ConfigError, a ValueError


# ---------------------------------------------------------------- timing


def time_alternating(variants: dict[str, tuple[Callable, Any]], batches: dict[str, Any], repeats: int, steps: int,
                     warmup: int) -> dict[str, list[float]]:
    """Seconds per step of each variant: ``repeats`` samples of ``steps`` steps each.

    ``variants`` maps a name to ``(step_fn, state)``; ``step_fn(state, batch)
    -> (state, metrics)`` may donate ``state``. Variants are timed in turn
    within every repetition, each ending with ``block_until_ready``.
    """
    import jax

    states = {name: state for name, (_, state) in variants.items()}

    def run(name, n):
        fn, state = variants[name][0], states[name]
        start = time.perf_counter()
        for _ in range(n):
            state, metrics = fn(state, batches[name])
        jax.block_until_ready((state, metrics))
        states[name] = state
        return (time.perf_counter() - start) / n

    for name in variants:
        run(name, warmup)
    samples = {name: [] for name in variants}
    for _ in range(repeats):
        for name in variants:
            samples[name].append(run(name, steps))
    return samples


@contextlib.contextmanager
def counting_compiles():
    """Collect jax's backend compilations (one event per XLA executable built)."""
    import jax
    from jax._src import dispatch

    events: list[str] = []

    def listener(event, duration, **kwargs):
        if event == dispatch.BACKEND_COMPILE_EVENT:
            events.append(kwargs.get("fun_name", "?"))

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        yield events
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)


# ---------------------------------------------------------------- the steps


def _image_task(model_name: str, per_device_batch: int, num_devices: int):
    """The training run's model, loss and optimizer (``train.model_fns`` / ``make_optimizer``, CIFAR recipe:
    lr 0.1, momentum 0.9, weight decay 5e-4) on the synthetic CIFAR-shaped set, and a fixed batch
    [D, B, 32, 32, 3] of it."""
    import jax

    from experiments import data, models, train

    config = cfg.Config(dataset="synthetic", model=model_name)
    dataset = data.load("synthetic", synthetic_size=num_devices * per_device_batch)
    model, loss_fn, _ = train.model_fns(config, dataset)
    params, model_state = models.init(model, jax.random.PRNGKey(0), dataset.train_images.shape[1:])
    shape = (num_devices, per_device_batch)
    batch = {"image": dataset.train_images.reshape(shape + dataset.train_images.shape[1:]),
             "label": dataset.train_labels.reshape(shape)}
    optimizer = train.make_optimizer(config, config.lr)
    return model, params, model_state, loss_fn, optimizer, batch, (dataset.mean, dataset.std)


def local_only_step(loss_fn, optimizer):
    """The local step with no gate and no collective: the reference of item 1.

    Same gradient, optimizer update and step counter as ``make_train_step``'s
    local path; no ``should_sync``, no ``lax.cond``, no byte counter.
    """
    import jax
    import optax

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def step(state, batch):
        rng = jax.random.fold_in(state.rng, state.step)
        (loss, (model_state, aux)), grads = grad_fn(state.params, state.model_state, batch, rng)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        return state._replace(step=state.step + 1, params=params, model_state=model_state, opt_state=opt_state), \
            {"loss": loss, **aux}

    return step


def plain_flax_loop(model, params, model_state, optimizer, stats):
    """A single-device training step written the usual flax way (the practical limit).

    ``flax.training.train_state.TrainState`` with the batch statistics beside
    it, ``jax.jit`` with the state donated.
    """
    import jax
    import jax.numpy as jnp
    import optax
    from flax.training import train_state

    from experiments import data

    class State(train_state.TrainState):
        model_state: Any

    mean, std = stats

    @jax.jit
    def plain_step(state, batch):
        def loss(params):
            x = data.normalize(batch["image"], mean, std)
            variables = {"params": params, **state.model_state}
            if state.model_state:
                logits, updates = state.apply_fn(variables, x, train=True, mutable=list(state.model_state))
            else:
                logits, updates = state.apply_fn(variables, x, train=True), {}
            ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()
            return ce, (logits, updates)

        (value, (logits, updates)), grads = jax.value_and_grad(loss, has_aux=True)(state.params)
        state = state.apply_gradients(grads=grads, model_state={**state.model_state, **updates})
        return state, {"loss": value, "accuracy": jnp.mean(jnp.argmax(logits, -1) == batch["label"])}

    state = State.create(apply_fn=model.apply, params=params, tx=optimizer, model_state=model_state)
    return jax.jit(plain_step, donate_argnums=(0,)), state


# ---------------------------------------------------------------- items 1, 2, 4, 5


def step_benchmarks(model_name: str, batch_size: int, repeats: int, steps: int, warmup: int) -> dict:
    import jax
    import numpy as np

    import adpsgd_jax as A
    from adpsgd_jax import comm, distributed, schedules

    devices = jax.devices()
    cpu = devices[0].platform == "cpu"
    out: dict[str, Any] = {}

    def built(devs, step_fn, schedule, optimizer, params, model_state, images):
        mesh = distributed.worker_mesh("batch", devs)
        state = A.TrainState.create(params, model_state, optimizer, schedule, jax.random.PRNGKey(0))
        return distributed.shard_map_step(step_fn, mesh), distributed.replicate(state, mesh), \
            distributed.shard_batch(images, mesh)

    # Items 1 and 2: every device.
    model, params, model_state, loss_fn, optimizer, batch, stats = _image_task(model_name, batch_size, len(devices))
    never = schedules.constant(10**9)  # gated, and the gate stays shut for the whole benchmark
    variants, batches = {}, {}
    for name, fn, schedule in [
        ("local_gated", A.make_train_step(loss_fn, optimizer, never), never),
        ("local_plain", local_only_step(loss_fn, optimizer), never),
        ("sync", A.make_train_step(loss_fn, optimizer, schedules.constant(1)), schedules.constant(1)),
        ("allreduce", A.make_train_step(loss_fn, optimizer, None, strategy="allreduce"), None),
    ]:
        step_fn, state, b = built(devices, fn, schedule, optimizer, params, model_state, batch)
        variants[name], batches[name] = (step_fn, state), b
    pairs = (("local_gated", "local_plain"), ("sync", "allreduce"))
    times = {}
    for a, b in pairs:
        samples = time_alternating({a: variants[a], b: variants[b]}, {a: batches[a], b: batches[b]},
                                   repeats, steps, warmup)
        times.update({k: statistics.median(v) for k, v in samples.items()})
        for k in (a, b):
            variants.pop(k)
    out["step_devices"] = len(devices)
    out["step_seconds"] = times
    out["gate_overhead_ratio"] = times["local_gated"] / times["local_plain"]
    out["sync_over_allreduce_ratio"] = times["sync"] / times["allreduce"]
    out["param_bytes"] = comm.tree_bytes(params)
    out["num_params"] = int(sum(np.prod(x.shape) for x in jax.tree.leaves(params)))

    # Items 4 and 5: one device on CPU (virtual devices share the cores).
    tdevs = devices[:1] if cpu else devices
    model, params, model_state, loss_fn, optimizer, batch, stats = _image_task(model_name, batch_size, len(tdevs))
    adp = schedules.adpsgd(10**6, 10**5, lr_schedule=lambda t: 0.1)  # first sync far beyond the benchmark
    runs = {}
    for name, fn, schedule in [
        ("adpsgd_local", A.make_train_step(loss_fn, optimizer, adp), adp),
        ("allreduce", A.make_train_step(loss_fn, optimizer, None, strategy="allreduce"), None),
    ]:
        step_fn, state, b = built(tdevs, fn, schedule, optimizer, params, model_state, batch)
        runs[name], batches[name] = (step_fn, state), b
    plain_step, plain_state = plain_flax_loop(model, params, model_state, optimizer, stats)
    batches["plain"] = jax.device_put(jax.tree.map(lambda x: x[0], batch), tdevs[0])
    # A copy of its own: the donated plain state must not share buffers with ``params``.
    runs["plain"] = (plain_step, jax.device_put(jax.tree.map(np.array, plain_state), tdevs[0]))
    memory = {name: _compiled_memory(runs[name][0], runs[name][1], batches[name]) for name in runs}
    samples = time_alternating(runs, batches, repeats, steps, warmup)
    per_step = {k: statistics.median(v) for k, v in samples.items()}
    out["throughput_devices"] = len(tdevs)
    out["throughput_images_per_s_per_device"] = {k: batch_size / v for k, v in per_step.items()}
    out["throughput_ratio_vs_plain"] = per_step["plain"] / per_step["adpsgd_local"]
    out["allreduce_throughput_ratio_vs_plain"] = per_step["plain"] / per_step["allreduce"]
    out["step_compute_s"] = per_step["adpsgd_local"]
    out["memory_bytes"] = memory
    if memory["plain"]["total"] and memory["adpsgd_local"]["total"]:
        extra = memory["adpsgd_local"]["total"] - memory["plain"]["total"]
        out["memory_ratio_vs_plain"] = memory["adpsgd_local"]["total"] / memory["plain"]["total"]
        out["memory_extra_in_param_copies"] = extra / comm.tree_bytes(params)
    out["input_pipeline_images_per_s"] = _input_pipeline_rate(batch_size, len(tdevs), repeats)
    return out


def _compiled_memory(step_fn, state, batch) -> dict:
    """XLA's memory analysis of the compiled step, per device, in bytes."""
    compiled = getattr(step_fn, "compiled", step_fn)
    try:
        stats = compiled.lower(state, batch).compile().memory_analysis()
    except Exception as err:  # a backend without memory analysis
        return {"total": None, "error": f"{type(err).__name__}: {err}"[:200]}
    if stats is None:
        return {"total": None}
    fields = ("argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes", "temp_size_in_bytes",
              "generated_code_size_in_bytes")
    row = {f.replace("_size_in_bytes", ""): int(getattr(stats, f)) for f in fields}
    row["total"] = row["argument"] + row["output"] - row["alias"] + row["temp"]
    return row


def _input_pipeline_rate(batch_size: int, workers: int, repeats: int) -> float:
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


# ---------------------------------------------------------------- item 3


def compilation_counts(methods: list[str], epochs: int, runs_dir: str) -> dict[str, dict]:
    """Compilations of the train step over a whole digits run of each method.

    Each run is a real ``train_and_evaluate`` run; jax's backend-compile
    events are counted while it executes, by the name of the step function
    (``shard_map_step`` names the program after the step). ``all`` counts
    every XLA program the run built (evaluation, finiteness check, ...).
    """
    import jax
    import optax

    import adpsgd_jax as A
    from experiments import data, train

    dataset = data.load("digits")
    os.makedirs(runs_dir, exist_ok=True)
    counts = {}
    for method in methods:
        c = cfg.Config(method=method, dataset="digits", model="mlp", workers=min(8, len(jax.devices())),
                       batch_size=16, epochs=epochs, lr=0.1, momentum=0.0, weight_decay=0.0, avg_period=4)
        options = cfg.RunOptions(out=runs_dir, checkpoint_every=0, keep_checkpoints=1, progress=False, plots=False)
        setup = train.prepare(c, dataset, options)
        name = A.make_train_step(lambda *a: None, optax.identity(), setup.schedule, strategy=setup.strategy).__name__
        with counting_compiles() as events:
            summary = train.train_and_evaluate(setup, options)
        counts[method] = {"compilations": sum(e == f"jit({name})" for e in events), "all": len(events),
                          "steps": summary["steps"], "syncs": summary["syncs"]}
    return counts


# ---------------------------------------------------------------- items 6, 7


def training_comparison(args, seeds: list[int], epochs: Optional[int], runs_dir: str) -> dict:
    """Train every strategy on ``args.dataset`` and measure syncs / bytes / time to targets."""
    import jax

    from experiments import data, report, results, train

    defaults = cfg.DATASET_DEFAULTS[args.dataset]
    base = cfg.Config(dataset=args.dataset, data_dir=args.data_dir, model=defaults["model"],
                      workers=min(8, len(jax.devices())), batch_size=defaults["batch_size"],
                      epochs=epochs or defaults["epochs"], lr=defaults["lr"], momentum=defaults["momentum"],
                      weight_decay=defaults["weight_decay"], avg_period=args.avg_period)
    variants = {"allreduce": base.replace(method="allreduce"), "cpsgd": base.replace(method="cpsgd"),
                "adpsgd": base.replace(method="adpsgd"), "qsgd_8bit": base.replace(method="qsgd", qsgd_levels=127),
                "qsgd_4bit": base.replace(method="qsgd", qsgd_levels=7)}
    dataset = data.load(args.dataset, args.data_dir)
    runs: dict[str, list] = {}
    for label, config in variants.items():
        options = cfg.RunOptions(out=os.path.join(runs_dir, label), checkpoint_every=0, keep_checkpoints=1,
                                 progress=False, plots=False)
        os.makedirs(options.out, exist_ok=True)
        for seed in seeds:
            train.train_and_evaluate(train.prepare(config.replace(seed=seed), dataset, options), options)
        runs[label] = list(results.finished_runs(options.out))

    target_acc = min(r.summary["test_accuracy"] for rs in runs.values() for r in rs)
    latency = args.latency_us * 1e-6
    n = args.predict_workers
    accuracy = {}
    for label, rs in runs.items():
        reach = [report.first_step_reaching(r, target_acc) for r in rs]
        row = {"steps": _mean(reach),
               "syncs": _mean([r.metrics[s - 1]["syncs"] for r, s in zip(rs, reach)]),
               "bytes": _mean([r.metrics[s - 1]["bytes"] for r, s in zip(rs, reach)]),
               "final_test_accuracy": _mean([r.summary["test_accuracy"] for r in rs]),
               "compute_s_per_step": _mean([r.summary["compute_s"] / r.summary["steps"] for r in rs])}
        for gbps in (10, 100):
            row[f"time_to_target_s_{gbps}gbps"] = _mean(
                [report.simulated_time(r, n, gbps, latency, s) for r, s in zip(rs, reach)])
            if label == "allreduce":
                row[f"time_to_target_s_{gbps}gbps_ideal_overlap"] = _mean(
                    [report.simulated_time(r, n, gbps, latency, s, overlap=True) for r, s in zip(rs, reach)])
        accuracy[label] = row
    for label, row in accuracy.items():
        for gbps in (10, 100):
            row[f"speedup_{gbps}gbps"] = accuracy["allreduce"][f"time_to_target_s_{gbps}gbps"] / \
                row[f"time_to_target_s_{gbps}gbps"]
    c = runs["adpsgd"][0].summary
    return {"dataset": args.dataset, "model": c["config"]["model"], "workers": c["config"]["workers"],
            "epochs": c["config"]["epochs"], "seeds": seeds, "avg_period": args.avg_period,
            "target_test_accuracy": target_acc, "predict_workers": n, "latency_s": latency,
            "device_kind": c["device_kind"], "to_target": accuracy, "runs": runs}


def _mean(values) -> float:
    values = list(values)
    return float(sum(values) / len(values)) if values else float("nan")


def projection(acc: dict, step: dict, latency: float) -> dict:
    """Item 6 for the benchmark model: the digits runs' steps and syncs to the
    target, with the benchmark model's bytes per round and measured step time,
    by ``timemodel.simulated_wall_clock`` (as ``report.simulated_time`` times a run):

    time = steps * t_step + syncs * t_allreduce(param_bytes, N)   (full sync: every step)
    """
    n, t_step, nbytes = acc["predict_workers"], step["step_compute_s"], step["param_bytes"]
    links = {gbps: Link(gbps * GBPS, latency) for gbps in BANDWIDTHS_GBPS}
    rows = {}
    for label in ("allreduce", "cpsgd", "adpsgd"):
        r, row = acc["to_target"][label], {}
        for gbps, link in links.items():
            row[f"time_s_{gbps}gbps"] = timemodel.simulated_wall_clock(r["steps"] * t_step, r["syncs"], nbytes, n, link)
            if label == "allreduce":
                row[f"time_s_{gbps}gbps_ideal_overlap"] = timemodel.simulated_wall_clock(
                    r["steps"] * t_step, r["steps"], nbytes, n, link, steps=r["steps"], overlap=True)
        rows[label] = row
    full, slowest = rows["allreduce"], BANDWIDTHS_GBPS[0]
    for row in rows.values():
        for gbps in links:
            row[f"speedup_{gbps}gbps"] = full[f"time_s_{gbps}gbps"] / row[f"time_s_{gbps}gbps"]
            row[f"speedup_{gbps}gbps_vs_ideal_overlap"] = \
                full[f"time_s_{gbps}gbps_ideal_overlap"] / row[f"time_s_{gbps}gbps"]
        per_step_comm = timemodel.allreduce_time(nbytes, n, links[slowest])
        row[f"comm_over_compute_full_sync_{slowest}gbps"] = per_step_comm / t_step
    return rows


def qsgd_comparison(runs: dict) -> dict:
    """Bytes of ADPSGD and QSGD (8 and 4 bits) to the same training loss.

    The loss of a run at an epoch is the mean minibatch loss over that epoch;
    the target is the highest final-epoch loss of the compared runs, so each
    reaches it; bytes are read at the end of the first epoch at or below it.
    """
    import numpy as np

    labels = ("adpsgd", "qsgd_8bit", "qsgd_4bit")

    def epoch_losses(run):
        spe = run.summary["steps_per_epoch"]
        losses = np.array([row["loss"] for row in run.metrics])
        return losses[: len(losses) // spe * spe].reshape(-1, spe).mean(axis=1), spe

    target = max(epoch_losses(r)[0][-1] for label in labels for r in runs[label])
    out = {"target_train_loss": float(target)}
    for label in labels:
        sent = []
        for r in runs[label]:
            losses, spe = epoch_losses(r)
            epoch = int(np.argmax(losses <= target + 1e-12))
            sent.append(r.metrics[(epoch + 1) * spe - 1]["bytes"])
        out[label] = {"bytes_to_target": _mean(sent)}
    for label in ("qsgd_8bit", "qsgd_4bit"):
        out[f"adpsgd_over_{label}_bytes"] = out["adpsgd"]["bytes_to_target"] / out[label]["bytes_to_target"]
    return out


# ---------------------------------------------------------------- report


def markdown(res: dict) -> str:
    """The Markdown table of a results dict (targets beside the measured figures)."""
    def verdict(key):
        op, target = TARGETS[key]
        value = res.get(key)
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
    worst = max(comp.values())
    lines.append(f"| 3. compilations of the train step over a run, per method ({', '.join(f'{k} {v}' for k, v in comp.items())}) "
                 f"| max {worst} | 1 | {'met' if worst == 1 else 'missed'} |")
    ips = s["throughput_images_per_s_per_device"]
    lines.append(f"| 4. throughput, images/s/device ({s['throughput_devices']} device): ADPSGD local "
                 f"{ips['adpsgd_local']:.1f}, full sync {ips['allreduce']:.1f}, plain flax loop {ips['plain']:.1f}; "
                 f"ADPSGD / plain | {res['throughput_ratio_vs_plain']:.3f} | >= 0.98 | "
                 f"{verdict('throughput_ratio_vs_plain')} |")
    lines.append(f"| 4b. host input pipeline (crop+flip, uint8), images/s | {s['input_pipeline_images_per_s']:.0f} | "
                 f"> step's {ips['adpsgd_local'] * s['throughput_devices']:.0f} | "
                 f"{'not the bottleneck' if s['input_pipeline_images_per_s'] > ips['adpsgd_local'] * s['throughput_devices'] else 'BOTTLENECK'} |")
    mem = s["memory_bytes"]
    if s.get("memory_ratio_vs_plain") is not None:
        lines.append(f"| 5. compiled step memory, ADPSGD / plain ({mem['adpsgd_local']['total'] / 2**20:.1f} vs "
                     f"{mem['plain']['total'] / 2**20:.1f} MiB; extra = {s['memory_extra_in_param_copies']:.2f} "
                     f"parameter copies) | {s['memory_ratio_vs_plain']:.3f} | extra <= 1 parameter copy | "
                     f"{'met' if s['memory_extra_in_param_copies'] <= 1.0 else 'missed'} |")
    else:
        lines.append("| 5. compiled step memory | not reported by this backend | | |")
    acc = res.get("accuracy")
    if acc:
        lines += ["", f"Time to test accuracy {acc['target_test_accuracy']:.4f} on {acc['dataset']} "
                  f"({acc['model']}, {acc['workers']} workers, {acc['epochs']} epochs, seeds {acc['seeds']}, "
                  f"budget avg_period {acc['avg_period']}); predicted for {acc['predict_workers']} workers, "
                  f"latency {acc['latency_s'] * 1e6:.0f} us, with the runs' measured compute per step; full sync "
                  "without overlap (ideal overlap in brackets):", "",
                  "| strategy | steps | syncs | MB / worker | s @10 Gbps | speedup @10 | s @100 Gbps | speedup @100 |",
                  "|---|---|---|---|---|---|---|---|"]
        for label, r in acc["to_target"].items():
            extra = {g: (f" ({r[f'time_to_target_s_{g}gbps_ideal_overlap']:.3f})" if label == "allreduce" else "")
                     for g in (10, 100)}
            lines.append(f"| {label} | {r['steps']:.0f} | {r['syncs']:.0f} | {r['bytes'] / 1e6:.3f} | "
                         f"{r['time_to_target_s_10gbps']:.3f}{extra[10]} | {r['speedup_10gbps']:.3f} | "
                         f"{r['time_to_target_s_100gbps']:.3f}{extra[100]} | {r['speedup_100gbps']:.3f} |")
        proj = res.get("projection")
        if proj:
            lines += ["", f"Projection: the steps and syncs to target above, with {res['model']}'s "
                      f"{s['param_bytes'] / 1e6:.1f} MB per round and its measured {s['step_compute_s'] * 1e3:.1f} ms "
                      f"per step (batch {res['batch_size']}, one device of item 4) (comm / compute of a full-sync step at 10 Gbps: "
                      f"{proj['adpsgd']['comm_over_compute_full_sync_10gbps']:.2f}). Paper: 1.46-1.95x @10 Gbps, "
                      "1.14-1.27x @100 Gbps.", "",
                      "| strategy | speedup @10 Gbps (vs ideal overlap) | speedup @100 Gbps (vs ideal overlap) |",
                      "|---|---|---|"]
            for label, r in proj.items():
                lines.append(f"| {label} | {r['speedup_10gbps']:.3f} ({r['speedup_10gbps_vs_ideal_overlap']:.3f}) | "
                             f"{r['speedup_100gbps']:.3f} ({r['speedup_100gbps_vs_ideal_overlap']:.3f}) |")
        q = res.get("qsgd")
        if q:
            lines += ["", f"Claim C2: bytes per worker to training loss {q['target_train_loss']:.4f} (epoch mean):", "",
                      "| strategy | MB / worker | ADPSGD / this |", "|---|---|---|"]
            for label in ("adpsgd", "qsgd_8bit", "qsgd_4bit"):
                ratio = q.get(f"adpsgd_over_{label}_bytes", 1.0)
                lines.append(f"| {label} | {q[label]['bytes_to_target'] / 1e6:.3f} | {ratio:.3f} |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- main


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    try:
        check_args(args)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    cifar.set_virtual_devices(8)  # when jax runs on the CPU
    import jax

    devices = jax.devices()
    cpu = devices[0].platform == "cpu"
    model = args.model or ("cnn" if args.quick else "resnet18")
    big = model in ("resnet18", "vgg16")
    batch = args.batch_size or (16 if args.quick else (32 if cpu and big else 128))
    repeats = args.repeats or (5 if args.quick else 20)
    steps = args.steps_per_repeat or (2 if args.quick else 5)
    seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else ([0] if args.quick else [0, 1, 2])
    epochs = args.epochs or (3 if args.quick else None)

    kind = f"CPU, {os.cpu_count()} cores" if cpu else devices[0].device_kind
    res: dict[str, Any] = {"device": f"{kind} x {len(devices)}" + (" (virtual devices)" if cpu else ""),
                           "platform": devices[0].platform,
                           "num_devices": len(devices), "jax_version": jax.__version__, "model": model,
                           "batch_size": batch, "repeats": repeats, "steps_per_repeat": steps, "quick": args.quick}
    started = time.perf_counter()
    res["steps"] = step_benchmarks(model, batch, repeats, steps, args.warmup)
    for key in ("gate_overhead_ratio", "sync_over_allreduce_ratio", "throughput_ratio_vs_plain"):
        res[key] = res["steps"][key]
    runs_dir = os.path.splitext(args.out)[0] + "_runs"
    compile_runs = compilation_counts(list(cfg.METHODS), 2 if args.quick else 3, os.path.join(runs_dir, "compile"))
    res["compilation_runs"] = compile_runs
    res["compilations"] = {k: v["compilations"] for k, v in compile_runs.items()}
    if not args.skip_training and len(devices) >= 2:
        acc = training_comparison(args, seeds, epochs, runs_dir)
        runs = acc.pop("runs")
        res["accuracy"] = acc
        res["projection"] = projection(acc, res["steps"], args.latency_us * 1e-6)
        res["qsgd"] = qsgd_comparison(runs)
    elif not args.skip_training:
        res["accuracy_skipped"] = f"items 6-7 need >= 2 devices; {len(devices)} visible"
    res["benchmark_s"] = time.perf_counter() - started
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    text = markdown(res)
    from experiments import results

    results.write_json_atomic(args.out, res)
    with open(os.path.splitext(args.out)[0] + ".md", "w") as f:
        f.write(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
