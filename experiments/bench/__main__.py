"""Performance benchmarks: ``python -m experiments.bench [--quick] [--out FILE]``.

The command line: flags, their checks (before jax starts), the defaults
that ``--quick`` changes, and the order of the items (see the package
docstring for what each measures). Writes the results as JSON to ``--out``
and the Markdown table beside it (.md), and prints the table.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any

from experiments import config as cfg, names, results  # none imports jax
from experiments.bench import render, runs, simulation, stats, steps

BENCH_DATASETS = [d for d in names.DATASETS if d != "synthetic"]  # items 6-7: labels a model can learn
SIM_LOOPS = ("vmap", "map", "unroll")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m experiments.bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="small model, few repetitions, one short training run "
                                                        "per method (the CI smoke test)")
    p.add_argument("--out", default="results/bench.json", help="JSON results; the Markdown table goes beside it (.md)")
    p.add_argument("--model", help=f"model of items 1, 2, 4, 5: one of {', '.join(names.MODELS)} "
                                   "(default resnet18; cnn with --quick)")
    p.add_argument("--batch-size", type=int, help="per-device batch of items 1, 2, 4, 5 (default 128; 16 with --quick; "
                                                  "32 for ResNet-18 / VGG-16 on CPU)")
    p.add_argument("--repeats", type=int, help="timed repetitions per variant, each giving one sample of every "
                                               "ratio (default 20; 9 for ResNet-18 / VGG-16 on CPU; 9 with --quick; "
                                               ">= 6 for a 95%% interval, hence a verdict)")
    p.add_argument("--steps-per-repeat", type=int, help="steps per repetition (default 5; 1 for ResNet-18 / VGG-16 "
                                                        "on CPU and with --quick)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per variant after compiling")
    p.add_argument("--gpu-suite", action="store_true",
                   help="the GPU run: items 1-5 on resnet18 at batch 128, item 8 for 16 resnet18 workers on one "
                        "device under every worker loop, and items 6-7 (one seed) with the projection from the "
                        "device's measured step; other flags still apply")
    p.add_argument("--sim-models", help="comma-separated models of items 1b (the first) and 8, workers simulated on "
                                        "one device (default: --model's on a GPU; mlp,cnn on CPU; mlp with --quick)")
    p.add_argument("--sim-workers", help="comma-separated worker counts K of item 8, for every model (default: 8,32,64 "
                                         "for the mlp, 8 for the cnn, 4 for resnet18 / vgg16 on CPU and 16 on a GPU; "
                                         "4,8 with --quick)")
    p.add_argument("--sim-loops", default=",".join(SIM_LOOPS),
                   help=f"comma-separated worker loops of items 1b and 8 (default {','.join(SIM_LOOPS)}; "
                        "adpsgd_jax.loops)")
    p.add_argument("--sim-batch-size", type=int, help="per-worker batch of items 1b and 8 (default 128; on CPU 16 "
                                                      "for the cnn and 8 for resnet18 / vgg16; 16 with --quick)")
    p.add_argument("--dataset", default="digits", help=f"data of items 6-7: one of {', '.join(BENCH_DATASETS)}")
    p.add_argument("--data-dir", help="tfds data directory for CIFAR (items 6-7)")
    p.add_argument("--epochs", type=int, help="training epochs of items 6-7 (default: the dataset's; 2 with --quick)")
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

    need(args.model is None or args.model in names.MODELS,
         f"--model {args.model!r} is unknown; accepted values: {', '.join(names.MODELS)}")
    for model in _items(args.sim_models) or []:
        need(model in names.MODELS, f"--sim-models {model!r} is unknown; accepted values: {', '.join(names.MODELS)}")
    for loop in _items(args.sim_loops):
        need(loop in SIM_LOOPS or (loop.isdigit() and int(loop) >= 1),
             f"--sim-loops {loop!r} is unknown; accepted values: {', '.join(SIM_LOOPS)}, or a chunk size >= 1")
    need(not args.quick or not args.gpu_suite, "--quick and --gpu-suite are two different runs: give one")
    need(args.dataset in BENCH_DATASETS, f"--dataset {args.dataset!r} is unknown; accepted values: "
                                         f"{', '.join(BENCH_DATASETS)}")
    for flag in ("batch_size", "sim_batch_size", "repeats", "steps_per_repeat", "epochs"):
        value = getattr(args, flag)
        need(value is None or value >= 1, f"--{flag.replace('_', '-')} must be >= 1, got {value}")
    need(args.warmup >= 1, f"--warmup must be >= 1 (the first step compiles), got {args.warmup}")
    need(args.avg_period >= 1, f"--avg-period must be >= 1, got {args.avg_period}")
    need(args.predict_workers >= 2, f"--predict-workers must be >= 2, got {args.predict_workers}")
    need(args.latency_us >= 0, f"--latency-us must be >= 0, got {args.latency_us}")
    seeds, workers = _ints(args.seeds), _ints(args.sim_workers)
    need(args.seeds is None or (seeds and len(set(seeds)) == len(seeds)),
         f"--seeds takes distinct comma-separated integers, got {args.seeds!r}")
    need(args.sim_workers is None or (workers and len(set(workers)) == len(workers) and min(workers) >= 1),
         f"--sim-workers takes distinct comma-separated integers >= 1, got {args.sim_workers!r}")
    need(not os.path.isdir(args.out), f"--out {args.out!r} is a folder; give a file name such as bench.json")
    cfg.check_writable(os.path.dirname(os.path.abspath(args.out)))  # ConfigError, a ValueError


def _items(text):
    """The comma-separated items of a flag's value (None for None)."""
    return None if text is None else [s.strip() for s in text.split(",") if s.strip()]


def _ints(text):
    """The comma-separated integers of a flag's value ([] when one is not an integer; None for None)."""
    if text is None:
        return None
    try:
        return [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        return []


def default_sim_workers(model: str, cpu: bool, quick: bool) -> list[int]:
    """Item 8's worker counts K for ``model`` (``--sim-workers``'s default)."""
    if quick:
        return [4, 8]
    if model in ("resnet18", "vgg16"):
        return [4] if cpu else [16]
    return [8] if model == "cnn" else [8, 32, 64]


def default_sim_batch(model: str, cpu: bool, quick: bool) -> int:
    """Items 1b and 8's images per worker for ``model`` (``--sim-batch-size``'s default)."""
    if quick:
        return 16
    if cpu and model != "mlp":
        return 8 if model in ("resnet18", "vgg16") else 16
    return 128


GPU_SUITE = {"model": "resnet18", "batch_size": 128, "sim_models": "resnet18", "sim_workers": "16", "repeats": 9,
             "steps_per_repeat": 2}  # 9 repetitions of 2 steps (a GPU run otherwise takes 20 of 5)


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    if args.gpu_suite:  # its settings, where no flag overrides them
        for key, value in GPU_SUITE.items():
            setattr(args, key, getattr(args, key) or value)
    try:
        check_args(args)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    from adpsgd_jax import distributed

    distributed.set_cpu_devices(8)  # when jax runs on the CPU (unless it has started already)
    import jax

    devices = jax.devices()
    cpu = devices[0].platform == "cpu"
    model = args.model or ("cnn" if args.quick else "resnet18")
    big = model in ("resnet18", "vgg16")
    batch = args.batch_size or (16 if args.quick else (32 if cpu and big else 128))
    repeats = args.repeats or (9 if args.quick or (cpu and big) else 20)
    per_repeat = args.steps_per_repeat or (1 if args.quick or (cpu and big) else 5)
    seeds = _ints(args.seeds) or ([0] if args.quick or args.gpu_suite else [0, 1, 2])
    sim_models = _items(args.sim_models) or (["mlp"] if args.quick else ["mlp", "cnn"] if cpu else [model])
    sim_workers = {m: _ints(args.sim_workers) or default_sim_workers(m, cpu, args.quick) for m in sim_models}
    sim_loops = [int(x) if x.isdigit() else x for x in _items(args.sim_loops)]
    sim_batch = {m: args.sim_batch_size or default_sim_batch(m, cpu, args.quick) for m in sim_models}
    epochs = args.epochs or (2 if args.quick else None)

    kind = f"CPU, {os.cpu_count()} cores" if cpu else devices[0].device_kind
    res: dict[str, Any] = {"device": f"{kind} x {len(devices)}" + (" (virtual devices)" if cpu else ""),
                           "platform": devices[0].platform,
                           "num_devices": len(devices), "jax_version": jax.__version__, "model": model,
                           "batch_size": batch, "repeats": repeats, "steps_per_repeat": per_repeat, "quick": args.quick,
                           "interval": {"method": stats.METHOD, "level": stats.LEVEL}}
    started = time.perf_counter()
    seconds = res["seconds"] = {}  # per part of the benchmark, compilations included

    def done(part):
        seconds[part] = time.perf_counter() - started - sum(seconds.values())

    res["steps"] = steps.step_benchmarks(model, batch, repeats, per_repeat, args.warmup)
    done("items 1-5")
    # The GPU suite counts item 1b under its timed loop only (4 unrolled ResNet-18 workers took 17.5 s to compile on
    # the 2-core CPU; item 8 compiles 16 of them).
    res["simulation"] = simulation.simulation_benchmarks(sim_models, sim_batch, sim_workers, sim_loops, repeats,
                                                         per_repeat, args.warmup, [] if args.gpu_suite else None)
    done("items 1b, 8")
    res.update(stats.judged({**res["steps"]["ratios"], **res["simulation"]["ratios"]}, render.TARGETS))
    runs_dir = os.path.splitext(args.out)[0] + "_runs"
    counted = None
    if not args.skip_training:
        acc = runs.training_comparison(args, seeds, epochs, runs_dir)
        finished, counted = acc.pop("runs"), acc.pop("counted")
        res["accuracy"] = acc
        where = f"{kind}, one device" + (f" of {len(devices)} virtual" if cpu else "")
        res["projection_compute"] = steps.projection_compute(where, repeats, 1, args.warmup)
        res["projection"] = runs.projection(acc, res["projection_compute"], args.latency_us * 1e-6)
        res["qsgd"] = runs.qsgd_comparison(finished)
        done("items 6-7")
    compile_epochs = 2 if args.quick else 3
    # The GPU suite counts the methods item 6 trained (none with --skip-training; its time goes to the GPU's own
    # figures); else every method.
    methods = list(counted or {}) if args.gpu_suite else list(names.METHODS)
    compile_runs = runs.compilation_counts(methods, compile_epochs, os.path.join(runs_dir, "compile"), counted)
    res["compilation_runs"] = compile_runs
    res["compilations"] = {k: v["compilations"] for k, v in compile_runs.items()}
    done("item 3")
    res["benchmark_s"] = time.perf_counter() - started
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    text = render.markdown(res)
    results.write_json_atomic(args.out, res)
    with open(os.path.splitext(args.out)[0] + ".md", "w") as f:
        f.write(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
