"""The command line's flags: the argparse parser of ``python -m experiments.cifar``,
its help text and its usage errors.

``translate.from_args(parser().parse_args(argv))`` turns them into run
configs. Flags that only some runs read default to None here, so that
``from_args`` can tell whether they were given (and refuse them where no run
reads them); the defaults that depend on the data set and the model are
stated in the help from ``datasets.RECIPES`` and ``datasets.MODEL_DEFAULTS``.
Imports no jax.
"""

from __future__ import annotations

import argparse
import re

from adpsgd_jax.limits import MAX_QSGD_LEVELS
from experiments.config import ConfigError
from experiments.datasets import AUGMENTATIONS, MODEL_DEFAULTS, RECIPES
from experiments.names import (CPU_DEVICES, DATASETS, DEFAULT_COMPARE, LR_SCHEDULES, METHODS, MODELS, OUTER_OPTIMIZERS,
                               PLUGIN_FORM, SCHEDULES, STRATEGIES)


class _Parser(argparse.ArgumentParser):
    """argparse whose usage errors are one-line ``ConfigError``s naming the flag (the CLI prints ``error: ...``)."""

    def error(self, message: str):
        raise ConfigError(_usage_message(message))


def _usage_message(message: str) -> str:
    """argparse's message, said as the other flag errors are."""
    bad_value = re.fullmatch(r"argument (\S+): invalid (int|float) value: (.*)", message)
    if bad_value:
        flag, kind, value = bad_value.groups()
        return f"{flag.split('/')[-1]} takes {'an integer' if kind == 'int' else 'a number'}, got {value}"
    missing = re.fullmatch(r"argument (\S+): expected one argument", message)
    if missing:
        flag = missing.group(1).split("/")[-1]
        return f"{flag} needs a value (one starting with '-' goes as {flag}=VALUE)"
    if message.startswith("unrecognized arguments: "):
        return f"unknown argument(s) {message.split(': ', 1)[1]}; python -m experiments.cifar --help lists the flags"
    return message


def _by_recipe(field: str) -> str:
    """``field``'s defaults over the data sets, as the help states them: e.g. ``200 on cifar10, cifar100;
    30 on digits``, then the models that differ (``MODEL_DEFAULTS``): ``0.02 with cnn, mlp on cifar10``."""
    said = lambda value: f"{value:g}" if isinstance(value, (int, float)) else str(value)  # noqa: E731
    groups: dict = {}
    for recipe, values in RECIPES.items():
        groups.setdefault(said(values[field]), []).append(recipe)
    parts = [f"{value} on {', '.join(recipes)}" for value, recipes in groups.items()]
    by_value: dict = {}
    for (recipe, model), values in MODEL_DEFAULTS.items():
        if field in values:
            by_value.setdefault(said(values[field]), {}).setdefault(recipe, []).append(model)
    for value, models in by_value.items():
        on = {}
        for recipe, names in models.items():
            on.setdefault(", ".join(names), []).append(recipe)
        parts += [f"{value} with {names} on {', '.join(recipes)}" for names, recipes in on.items()]
    return "; ".join(parts)


def parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="python -m experiments.cifar",
        description="Train with ADPSGD or a baseline on CIFAR-10/100 or digits; compare methods.",
    )
    p.add_argument("--dataset", choices=None,
                   help=f"one of {', '.join(DATASETS)} (default cifar10), or tfds:NAME for any tfds image-classification "
                        "dataset with images of one size (e.g. tfds:mnist, tfds:fashion_mnist, tfds:svhn_cropped); "
                        "its image shape and class count come from the dataset's metadata")
    p.add_argument("--data-dir",
                   help="where the data is. cifar10 / cifar100: a folder holding CIFAR's python release "
                        "(cifar-10-python.tar.gz / cifar-100-python.tar.gz, or their extracted cifar-10-batches-py / "
                        "cifar-100-python, as torchvision and keras leave them), that folder or tarball itself, or a "
                        "tfds data directory; tfds:NAME: a tfds data directory. tfds builds in array_record are read "
                        "without TensorFlow, tfrecord builds need it (default: ~/tensorflow_datasets or $TFDS_DATA_DIR)")
    p.add_argument("--model",
                   help=f"one of {', '.join(MODELS)} (default {_by_recipe('model')}; tfds:cifar10 and "
                        "tfds:cifar100 as cifar10 and cifar100). Every model takes any image size and channel count: resnet18 and vgg16 (built for "
                        "32x32) pool any size down to one 512-vector; cnn and mlp flatten the image, so their first "
                        "dense layer grows with height x width (fine up to about 64x64)")
    p.add_argument("--augment", default="auto",
                   help=f"one of {', '.join(AUGMENTATIONS)}: random crops of the zero-padded training images (padding "
                        "an eighth of the shorter side, 4 pixels on 32x32) and / or horizontal flips. auto: "
                        f"{_by_recipe('augment')}")
    _method_flags(p)
    _run_flags(p)
    return p


def _method_flags(p: argparse.ArgumentParser) -> None:
    """The flags of what is trained: methods, seeds, workers and devices, optimisation, budget, options."""
    p.add_argument("--strategy", help=f"one of {', '.join(STRATEGIES)} (default average)")
    p.add_argument("--schedule", help=f"averaging schedule for --strategy average: one of {', '.join(SCHEDULES)} "
                                      f"(constant is CPSGD; default adpsgd), or a schedule of your own, {PLUGIN_FORM}: "
                                      "a factory called with total_steps, avg_period and lr_schedule that returns "
                                      "an adpsgd_jax.schedules.Schedule (docs/custom_schedule.md)")
    p.add_argument("--compare", nargs="?", const=",".join(DEFAULT_COMPARE),
                   help=f"comma-separated methods to run on the same data order and seed, from "
                        f"{', '.join(METHODS)} or {PLUGIN_FORM} (default list: {','.join(DEFAULT_COMPARE)})")
    p.add_argument("--seeds", help="comma-separated seeds in [0, 2**32): every method runs once per seed "
                                   "(default: --seed); not with --seed")
    p.add_argument("--partition", default="iid", help="iid or dirichlet:ALPHA (non-identical data per worker)")
    p.add_argument("--workers", type=int, default=8, help="number of workers N (any number: several may share a device)")
    p.add_argument("--devices", type=int,
                   help="devices that carry the workers, K = N / D each (must divide --workers). Default: all "
                        f"local accelerators on GPU/TPU (the most that divides --workers); on CPU {CPU_DEVICES} virtual "
                        "device(s) per process, the count measured fastest for the digits demo on a 2-core machine "
                        "(docs/scale.md)")
    p.add_argument("--worker-loop", default="auto",
                   help="how the K workers of one device run their forward and backward passes: vmap (batched), "
                        "map (lax.map, one at a time), unroll (one after another, unrolled), an integer chunk size "
                        "in [1, K], or auto (default: vmap for the mlp; unroll for the convolutional models on CPU, "
                        "map on GPU; docs/scale.md)")
    recipe = " (default per data set and model, the table in docs/cli.md: {})".format
    p.add_argument("--batch-size", type=int, help="per-worker batch size" + recipe(_by_recipe("batch_size")))
    p.add_argument("--epochs", type=int, help="epochs" + recipe(_by_recipe("epochs")))
    p.add_argument("--lr", type=float, help="initial learning rate, before the --lr-schedule decays it" + recipe(_by_recipe("lr")))
    p.add_argument("--lr-schedule", default="step", help=f"one of {', '.join(LR_SCHEDULES)}")
    p.add_argument("--lr-decay-epochs", help="step decay epochs, e.g. 100,150 (default: 50%% and 75%% of the run); "
                                             "--lr-schedule step only")
    p.add_argument("--lr-decay-factor", type=float, help="step decay factor in (0, 1] (default 0.1); --lr-schedule step only")
    p.add_argument("--momentum", type=float, help="SGD momentum" + recipe(_by_recipe("momentum")))
    p.add_argument("--weight-decay", type=float, help="weight decay, added to the gradient" + recipe(_by_recipe("weight_decay")))
    p.add_argument("--avg-period", type=int, help="communication budget as an average period (default 8); read by "
                                                   "the averaging methods other than every_step")
    p.add_argument("--local-warmup-epochs", type=float,
                   help="post_local's warm-up in epochs: full-sync steps (gradients all-reduced, as in PyTorch's "
                        "post-local SGD), then averages every --avg-period steps (default 0: 10%% of the run); "
                        "post_local only")
    p.add_argument("--qsgd-levels", type=int, help=f"QSGD's levels s in [1, {MAX_QSGD_LEVELS}] (default 127); qsgd only")
    p.add_argument("--qsgd-bucket-size", type=int, help="coordinates per QSGD bucket (default 512); qsgd only")
    p.add_argument("--qsr-alpha", type=float,
                   help="QSR's alpha >= 0: the published rule H = max(int((alpha / lr)^power), min period), cut at "
                        "the end of the run, with no budget; 0 = every --qsr-init-period steps (default: alpha "
                        "searched so that the rule's own sync count is nearest the --avg-period budget); qsr only")
    p.add_argument("--qsr-init-period", type=int,
                   help="QSR's init_h: the period during a learning-rate warm-up and at --qsr-alpha 0 (default 1); "
                        "qsr only")
    p.add_argument("--qsr-min-period", type=int, help="QSR's min_h, the shortest period (default 1); qsr only")
    p.add_argument("--qsr-power", type=float, help="QSR's exponent of alpha / lr, > 0 (default 2); qsr only")
    p.add_argument("--qsr-base-period", type=int, help=argparse.SUPPRESS)  # refused: translate.from_args
    p.add_argument("--group-size",
                   help="two-level averaging: workers per group, whose gradients are averaged every step while the "
                        "schedule averages parameters across groups; an integer dividing --workers, or 'host' (the "
                        "devices of one process). Default 1: flat averaging. Averaging methods only")
    p.add_argument("--outer-optimizer",
                   help=f"one of {', '.join(OUTER_OPTIMIZERS)}: at each sync, treat the averaged change since the "
                        "last sync as a gradient of this optimizer (nesterov: DiLoCo). Averaging methods only")
    p.add_argument("--outer-lr", type=float,
                   help="outer learning rate (default 0.7 for nesterov, 1.0 for sgd; sgd at 1.0 = plain averaging)")
    p.add_argument("--outer-momentum", type=float, help="outer momentum (default 0.9 for nesterov, 0 for sgd)")
    p.add_argument("--fragments", type=int,
                   help="streaming averaging: cut the parameters into P fragments (contiguous groups of leaves "
                        "balanced by bytes) and average one per round, in turn. --avg-period H (and its budget "
                        "C = steps / H) counts full-model syncs: with --fragments P the schedule runs at period "
                        "H / P, C * P rounds of 1/P of the bytes each, the same total bytes; P must divide H "
                        "(default 1). Averaging methods only")
    p.add_argument("--fragment-delay", type=int,
                   help="streaming averaging: a fragment's average is applied this many local steps after it is "
                        "taken, in [0, --avg-period) (default 0). Averaging methods only")
    p.add_argument("--fragment-alpha", type=float,
                   help="streaming averaging: an applied fragment becomes alpha * local + (1 - alpha) * average, "
                        "alpha in [0, 1] (default 0: replaced). Averaging methods only")
    p.add_argument("--seed", type=int, help="the seed, in [0, 2**32) (default 0); not with --seeds")
    p.add_argument("--dtype", default="float32", help="computation dtype: float32 or bfloat16")
    p.add_argument("--synthetic-size", type=int, help="examples in the synthetic dataset (default 10000); "
                                                       "--dataset synthetic only")


def _run_flags(p: argparse.ArgumentParser) -> None:
    """The flags of how runs are executed and saved: output, checkpoints, processes, display."""
    p.add_argument("--out", default="results", help="output folder")
    p.add_argument("--checkpoint-every", type=int,
                   help="checkpoint interval in steps (default: whole epochs covering >= 200 steps; 0: only at the end)")
    p.add_argument("--keep-checkpoints", type=int, default=3, help="how many checkpoints to keep per run")
    p.add_argument("--coordinator", help="multi-process run: HOST:PORT of process 0's coordinator, or 'auto' for "
                                         "jax's cluster detection (SLURM, Open MPI)")
    p.add_argument("--num-processes", type=int, help="multi-process run: number of processes")
    p.add_argument("--process-id", type=int, help="multi-process run: this process's index in [0, --num-processes)")
    p.add_argument("--distributed-timeout", type=int, default=60,
                   help="seconds to wait for the coordinator; a dead peer is detected within about this time too")
    p.add_argument("--resume", action="store_true",
                   help="continue every run in --out from its latest checkpoint (finished runs are kept; a run "
                        "with no complete checkpoint starts from step 0; a changed configuration is refused)")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.add_argument("--no-tensorboard", action="store_true",
                   help="write no TensorBoard event files (by default each run writes its curves to "
                        "<run>/tensorboard/: tensorboard --logdir OUT)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")

