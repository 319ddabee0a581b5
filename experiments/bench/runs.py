"""Items 3, 6 and 7, from real training runs (``train.train_and_evaluate``): compilations of
the step over a run, time to a target accuracy (and its projection onto the benchmark model),
and bytes of ADPSGD against QSGD to the same training loss."""

from __future__ import annotations

import os
from typing import Optional

from adpsgd_jax import timemodel
from adpsgd_jax.timemodel import Link
from experiments import config as cfg
from experiments.bench import harness
from experiments.datasets import defaults
from experiments.names import BANDWIDTHS_GBPS, GBPS


def counted_run(config: cfg.Config, dataset, options: cfg.RunOptions) -> dict:
    """One real ``train_and_evaluate`` run of ``config``, counting jax's backend-compile events while it
    executes: ``compilations`` of the train step, by the name of its program (``shard_map_step`` names
    the program after the step function), and ``all``, every XLA program the run built (evaluation,
    finiteness check, ...); with the run's steps and syncs."""
    from experiments import methods as registry, train
    from experiments.setup import prepare

    setup = prepare(config, dataset, options)
    # The step's program name, read from the strategy the run builds (jax names the program after it).
    name = registry.make_strategy(config, lambda *a: None, setup.lr_fn, setup.schedule, setup.layout).step.__name__
    with harness.counting_compiles() as events:
        summary = train.train_and_evaluate(setup, options)
    return {"compilations": sum(e == f"jit({name})" for e in events), "all": len(events),
            "steps": summary["steps"], "syncs": summary["syncs"]}


def _options(out: str) -> cfg.RunOptions:
    os.makedirs(out, exist_ok=True)
    return cfg.RunOptions(out=out, checkpoint_every=0, keep_checkpoints=1, progress=False, plots=False)


def compilation_counts(methods: list[str], epochs: int, runs_dir: str, counted: Optional[dict] = None) -> dict:
    """Compilations of the train step over a whole digits run of each method (``counted_run``).

    ``counted``: method -> counts of runs made already (item 6's), the most
    compilations of any of them; the other methods get a run of their own.
    """
    import jax

    from experiments import data

    dataset, counts = data.load("digits"), {}
    for method in methods:
        if counted and method in counted:
            counts[method] = counted[method]
            continue
        c = cfg.Config(method=method, dataset="digits", model="mlp", workers=min(8, len(jax.devices())),
                       batch_size=16, epochs=epochs, lr=0.1, momentum=0.0, weight_decay=0.0, avg_period=4)
        counts[method] = counted_run(c, dataset, _options(runs_dir))
    return counts


def training_comparison(args, seeds: list[int], epochs: Optional[int], runs_dir: str) -> dict:
    """Train every strategy on ``args.dataset`` and measure syncs / bytes / time to targets; ``counted``:
    the compilations of each method's runs (``counted_run``; the most of any run of that method)."""
    import jax

    from experiments import data, report, results

    recipe = defaults(args.dataset)
    base = cfg.Config(dataset=args.dataset, data_dir=args.data_dir, model=recipe["model"],
                      workers=8, devices=max(d for d in (1, 2, 4, 8) if d <= len(jax.devices())),
                      batch_size=recipe["batch_size"],
                      epochs=epochs or recipe["epochs"], lr=recipe["lr"], momentum=recipe["momentum"],
                      weight_decay=recipe["weight_decay"], avg_period=args.avg_period)
    variants = {"allreduce": base.replace(method="allreduce"), "cpsgd": base.replace(method="cpsgd"),
                "adpsgd": base.replace(method="adpsgd"), "qsgd_8bit": base.replace(method="qsgd", qsgd_levels=127),
                "qsgd_4bit": base.replace(method="qsgd", qsgd_levels=7)}
    dataset = data.load(args.dataset, args.data_dir)
    runs: dict[str, list] = {}
    counted: dict[str, dict] = {}
    for label, config in variants.items():
        options = _options(os.path.join(runs_dir, label))
        for seed in seeds:
            count = counted_run(config.replace(seed=seed), dataset, options)
            if count["compilations"] >= counted.get(config.method, {"compilations": -1})["compilations"]:
                counted[config.method] = count
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
               "compute_s_per_step": _mean([r.compute_step_s for r in rs])}
        for gbps in BANDWIDTHS_GBPS:
            row[f"time_to_target_s_{gbps}gbps"] = _mean(
                [report.simulated_time(r, n, gbps, latency, s) for r, s in zip(rs, reach)])
            if label == "allreduce":
                row[f"time_to_target_s_{gbps}gbps_ideal_overlap"] = _mean(
                    [report.simulated_time(r, n, gbps, latency, s, overlap=True) for r, s in zip(rs, reach)])
        accuracy[label] = row
    for label, row in accuracy.items():
        for gbps in BANDWIDTHS_GBPS:
            row[f"speedup_{gbps}gbps"] = accuracy["allreduce"][f"time_to_target_s_{gbps}gbps"] / \
                row[f"time_to_target_s_{gbps}gbps"]
    c = runs["adpsgd"][0].summary
    return {"dataset": args.dataset, "model": c["config"]["model"], "workers": c["config"]["workers"],
            "epochs": c["config"]["epochs"], "seeds": seeds, "avg_period": args.avg_period,
            "target_test_accuracy": target_acc, "predict_workers": n, "latency_s": latency,
            "device_kind": c["device_kind"], "to_target": accuracy, "runs": runs, "counted": counted}


def _mean(values) -> float:
    values = list(values)
    return float(sum(values) / len(values)) if values else float("nan")


# Claim C3 (docs/algorithm.md, "Claims and properties"): ADPSGD over allreduce, to the same accuracy, on the
# paper's GPU cluster, per link rate in Gbps.
PAPER_C3_SPEEDUP = {10: (1.46, 1.95), 100: (1.14, 1.27)}


def projection(acc: dict, compute: dict, latency: float) -> dict:
    """Item 6 projected onto ResNet-18: the digits runs' steps and syncs to the target, ResNet-18's
    bytes per round and its measured local step (``steps.projection_compute``: no communication),
    the same compute charged to every method, by ``timemodel.simulated_wall_clock``
    (as ``report.simulated_time`` times a run):

    time = steps * t_step + syncs * t_allreduce(param_bytes, N)   (allreduce: every step)

    A speedup is monotone in t_step, so the speedups at the ends of t_step's
    interval bound it (``*_ci``); ``paper_*`` is PAPER_C3_SPEEDUP's range and
    where ADPSGD's interval lies against it (below / inside / above / overlaps).
    """
    n, nbytes = acc["predict_workers"], compute["param_bytes"]
    links = {gbps: Link(gbps * GBPS, latency) for gbps in BANDWIDTHS_GBPS}

    def times(t_step):  # label -> link -> seconds to the target
        out = {}
        for label in ("allreduce", "cpsgd", "adpsgd"):
            r, row = acc["to_target"][label], {}
            for gbps, link in links.items():
                row[gbps] = timemodel.simulated_wall_clock(r["steps"] * t_step, r["syncs"], nbytes, n, link)
                if label == "allreduce":
                    row[f"{gbps}_ideal_overlap"] = timemodel.simulated_wall_clock(
                        r["steps"] * t_step, r["steps"], nbytes, n, link, steps=r["steps"], overlap=True)
            out[label] = row
        return out

    t_step, (t_low, t_high) = compute["step_s"], compute["step_s_ci"]
    at, ends = times(t_step), (times(t_low), times(t_high))
    rows = {}
    for label in at:
        row = rows[label] = {}
        for gbps in links:
            row[f"time_s_{gbps}gbps"] = at[label][gbps]
            row[f"speedup_{gbps}gbps"] = at["allreduce"][gbps] / at[label][gbps]
            bounds = [t["allreduce"][gbps] / t[label][gbps] for t in ends]
            row[f"speedup_{gbps}gbps_ci"] = [min(bounds), max(bounds)]
            row[f"speedup_{gbps}gbps_vs_ideal_overlap"] = at["allreduce"][f"{gbps}_ideal_overlap"] / at[label][gbps]
            row[f"comm_over_compute_allreduce_{gbps}gbps"] = timemodel.allreduce_time(nbytes, n, links[gbps]) / t_step
    for gbps, (low, high) in PAPER_C3_SPEEDUP.items():
        ci = rows["adpsgd"][f"speedup_{gbps}gbps_ci"]
        rows["adpsgd"][f"paper_{gbps}gbps"] = [low, high]
        rows["adpsgd"][f"against_paper_{gbps}gbps"] = ("below" if ci[1] < low else "above" if ci[0] > high else
                                                       "inside" if low <= ci[0] and ci[1] <= high else "overlaps")
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
