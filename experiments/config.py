"""Run configuration: one typed object, built from flags, validated before any
jax work, written into every summary.

Importing this module does not import jax: the CLI must set the number of
virtual CPU devices (``--workers``) before jax initialises.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import re
import sys
from typing import NamedTuple, Optional, Union

from experiments.names import (CPU_DEVICES, DATASETS, DEFAULT_COMPARE, DTYPES, WORKER_LOOPS, LR_SCHEDULES, MAX_QSGD_LEVELS, METHODS,  # noqa: F401
                               MODELS, OUTER_DEFAULTS, OUTER_OPTIMIZERS, PLUGIN_FORM, SCHEDULES, STRATEGIES, is_plugin,
                               method_parts)

# Per-dataset defaults: the usual CIFAR ResNet recipe, and the digits setting
# of the prototype in docs/algorithm.md (MLP, plain SGD, batch 16 per worker, 30 epochs).
DATASET_DEFAULTS = {
    "cifar10": dict(model="resnet18", epochs=200, batch_size=128, lr=0.1, momentum=0.9, weight_decay=5e-4,
                    augment="crop-flip"),
    "cifar100": dict(model="resnet18", epochs=200, batch_size=128, lr=0.1, momentum=0.9, weight_decay=5e-4,
                     augment="crop-flip"),
    "digits": dict(model="mlp", epochs=30, batch_size=16, lr=0.1, momentum=0.0, weight_decay=0.0, augment="none"),
    "synthetic": dict(model="resnet18", epochs=1, batch_size=128, lr=0.1, momentum=0.9, weight_decay=5e-4,
                      augment="none"),
}
# Any other tfds image-classification dataset (``tfds:NAME``; tfds:cifar10 and
# tfds:cifar100 take CIFAR's defaults). Not augmented by default: many are
# digits or characters, which a mirror image turns into another class.
TFDS_PREFIX = "tfds:"
TFDS_DEFAULTS = dict(model="cnn", epochs=20, batch_size=64, lr=0.05, momentum=0.9, weight_decay=5e-4, augment="none")
_TFDS_NAME = re.compile(r"[a-z0-9_]+(/[A-Za-z0-9_.-]+)?(:[0-9]+\.[0-9]+\.[0-9]+)?")
# --augment: random crops (zero padding of an eighth of the shorter side, 4
# pixels on 32x32) and / or horizontal flips of the training batches.
AUGMENT_MODES = ("crop-flip", "crop", "flip", "none")
AUGMENTATIONS = ("auto", *AUGMENT_MODES)
# Seeds: jax.random.PRNGKey keeps only the low 32 bits of a seed (without x64), so seed 2**32 would be seed 0.
SEED_LIMIT = 2**32
# --partition dirichlet:ALPHA. Below the floor numpy's Dirichlet draw gives each class to a single worker
# almost always (no more skew to gain); above the ceiling the shards are iid to many digits, and near
# float64's top the draw returns zeros.
DIRICHLET_ALPHA_RANGE = (1e-3, 1e6)


# Config fields that may differ on --resume without changing results.
HARMLESS_ON_RESUME = ("data_dir",)
# What post_local's warm-up synchronises: "gradient", full-sync steps as in PyTorch's
# post-local SGD (docs/pytorch.md). Before issue #19 it averaged parameters after each
# warm-up step and averaged one step later; post_local runs saved then lack the field
# and are read as "parameters", so that --resume refuses them.
POST_LOCAL_WARMUP = "gradient"
POST_LOCAL_WARMUP_BEFORE = "parameters"
# What qsr computes: "reference", the rule of the QSR paper's code (plain int() of the power, init_h and
# min_h apart, every sync of the rule kept in the budgeted form). qsr runs saved before it lack the field
# and are read as "tolerance-capped" (a floor with a 1e-9 tolerance, one base period, the budgeted rule cut
# at C syncs), so that --resume refuses them; their qsr_base_period is read as both periods.
QSR_RULE = "reference"
QSR_RULE_BEFORE = "tolerance-capped"
CHANGED_MEANING = "the configuration changed meaning"  # in a difference that no flag can undo


class ConfigError(ValueError):
    """A bad flag value; the message names the flag and the accepted values."""


@dataclasses.dataclass(frozen=True)
class Config:
    """Everything that determines a run's results; compared field by field on --resume."""

    method: str = "adpsgd"
    dataset: str = "cifar10"
    data_dir: Optional[str] = None
    model: str = "resnet18"
    partition: str = "iid"
    workers: int = 8
    devices: Optional[int] = None  # devices carrying the workers; None = setup.default_devices
    worker_loop: str = "auto"  # how a device's workers run (WORKER_LOOPS or a chunk size); setup resolves auto
    batch_size: int = 128  # per worker
    epochs: int = 200
    lr: float = 0.1
    lr_schedule: str = "step"
    lr_decay_epochs: tuple = ()  # step decay points; empty = 50% and 75% of the run
    lr_decay_factor: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    avg_period: int = 8  # the communication budget: an average period p_bar
    local_warmup_epochs: float = 0.0  # post-local SGD's full-sync phase; 0 = 10% of the run
    post_local_warmup: str = POST_LOCAL_WARMUP  # the meaning of that phase; saved runs may hold an older one
    qsgd_levels: int = 127
    qsgd_bucket_size: int = 512
    qsr_alpha: Optional[float] = None  # QSR's alpha: the published rule, no budget (0 = constant); None = searched
    qsr_init_period: int = 1  # QSR's init_h: the period of a warm-up, and the constant period at alpha 0
    qsr_min_period: int = 1  # QSR's min_h: the floor of the period
    qsr_power: float = 2.0  # QSR's exponent p of alpha / lr
    qsr_rule: str = QSR_RULE  # the meaning of qsr; saved runs may hold an older one
    group_size: Union[int, str] = 1  # workers per group (two-level averaging); "host" = devices per process
    outer_optimizer: str = "none"  # none | sgd | nesterov, applied to the averaged change at each sync
    outer_lr: Optional[float] = None  # None when outer_optimizer is none
    outer_momentum: Optional[float] = None
    seed: int = 0
    dtype: str = "float32"
    synthetic_size: int = 10_000
    augment: str = "auto"  # from AUGMENTATIONS; from_args stores the dataset's choice for auto

    def replace(self, **kw) -> "Config":
        return dataclasses.replace(self, **kw)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @property
    def averaging(self) -> bool:
        """Whether the method averages parameters (the only methods with groups and outer optimizers)."""
        return method_parts(self.method)[0] == "average"

    @property
    def label(self) -> str:
        """The method with its options, e.g. ``adpsgd+nesterov-group2``: names the run's folder and table row."""
        name = self.method if self.outer_optimizer == "none" else f"{self.method}+{self.outer_optimizer}"
        if self.group_size == "host":
            return f"{name}-hostgroups"
        return name if self.group_size == 1 else f"{name}-group{self.group_size}"


@dataclasses.dataclass(frozen=True)
class RunOptions:
    """How runs are executed and saved; none of it changes their results."""

    out: str = "results"
    checkpoint_every: Optional[int] = None  # steps; None = whole epochs of >= 200 steps; 0 = only at the end
    keep_checkpoints: int = 3
    resume: bool = False
    progress: bool = True
    plots: bool = True
    # Multi-process runs (jax.distributed); "auto" = jax's cluster detection (SLURM, ...).
    coordinator: Optional[str] = None
    num_processes: Optional[int] = None
    process_id: Optional[int] = None
    distributed_timeout: int = 60  # seconds to reach the coordinator; also bounds a dead peer's detection

    @property
    def distributed(self) -> bool:
        return self.coordinator is not None


def default_cpu_devices(workers: int, processes: int = 1, limit: int = CPU_DEVICES) -> int:
    """Devices for ``workers`` workers without --devices: the most, up to
    ``limit`` (virtual CPU devices: ``names.CPU_DEVICES``), that divides the
    workers and is whole per process."""
    return max(d for d in range(processes, max(limit, processes) + 1, processes) if workers % d == 0)


def cpu_devices_per_process(config: "Config", processes: int = 1) -> int:
    """The virtual CPU devices each process asks jax for (before jax starts)."""
    return (config.devices or default_cpu_devices(config.workers, processes)) // processes


def config_differences(saved: dict, current: Config) -> list[str]:
    """The result-changing fields where a saved run's config differs from ``current``.

    A field missing from ``saved`` (a run saved before the field existed) counts
    as its default, except where its absence records an older meaning
    (``post_local_warmup`` of a post_local run, ``qsr_rule`` of a qsr run; an old
    ``qsr_base_period`` is read as both QSR periods), and ``augment`` is compared
    after resolving ``auto``.
    """
    now = current.to_dict()
    saved = {**{k: v for k, v in Config().to_dict().items() if k != "dataset"}, **_older_meaning(saved),
             **_renamed(saved)}
    diffs = []
    for key in sorted(set(saved) | set(now)):
        if key in HARMLESS_ON_RESUME:
            continue
        old, new = saved.get(key), now.get(key)
        if isinstance(old, list):
            old = tuple(old)
        if key == "augment":
            old, new = augmentation(saved.get("dataset"), old), augmentation(current.dataset, new)
        if old != new:
            diffs.append(f"{key}: {old!r} -> {new!r}")
            if key == "post_local_warmup":
                diffs[-1] += (f" ({CHANGED_MEANING}: post_local's warm-up now all-reduces gradients and its "
                              "averages follow PyTorch's step count, docs/pytorch.md)")
            if key == "qsr_rule":
                diffs[-1] += (f" ({CHANGED_MEANING}: qsr now computes the reference implementation's rule and "
                              "keeps every sync of it, docs/algorithm.md)")
    return diffs


def _older_meaning(saved: dict) -> dict:
    """The fields whose absence from ``saved`` records an older meaning rather than the default."""
    older = {}
    if saved.get("method") == "post_local" and "post_local_warmup" not in saved:
        older["post_local_warmup"] = POST_LOCAL_WARMUP_BEFORE
    if saved.get("method") == "qsr" and "qsr_rule" not in saved:
        older["qsr_rule"] = QSR_RULE_BEFORE
    return older


def _renamed(saved: dict) -> dict:
    """``saved`` with an old ``qsr_base_period`` (one period for both roles) as both QSR periods."""
    saved = dict(saved)
    if "qsr_base_period" in saved:
        base = saved.pop("qsr_base_period")
        saved.setdefault("qsr_init_period", base)
        saved.setdefault("qsr_min_period", base)
    return saved


def from_saved(saved: dict) -> Config:
    """The Config a summary or config.json recorded (an old post_local run's with its old warm-up)."""
    return Config(**{**_older_meaning(saved), **_renamed(saved),
                     "lr_decay_epochs": tuple(saved.get("lr_decay_epochs", ()))})


def is_tfds(dataset: str) -> bool:
    """Whether ``dataset`` names a tfds dataset: ``tfds:NAME`` (NAME may carry ``/CONFIG`` and ``:VERSION``)."""
    return dataset.startswith(TFDS_PREFIX) and bool(_TFDS_NAME.fullmatch(dataset[len(TFDS_PREFIX):]))


def dataset_defaults(dataset: str) -> dict:
    """The per-dataset flag defaults of ``dataset`` (a ``--dataset`` value)."""
    if dataset in DATASET_DEFAULTS:
        return DATASET_DEFAULTS[dataset]
    return DATASET_DEFAULTS.get(dataset[len(TFDS_PREFIX):], TFDS_DEFAULTS) if is_tfds(dataset) else TFDS_DEFAULTS


def augmentation(dataset: Optional[str], augment: Optional[str]) -> Optional[str]:
    """The augmentation ``augment`` means on ``dataset``: ``auto`` (or None) is the dataset's default."""
    if augment in (None, "auto"):
        return dataset_defaults(dataset or "")["augment"]
    return augment


class PartitionScheme(NamedTuple):
    """A parsed ``--partition`` value: kind "iid" or "dirichlet" (with its alpha)."""

    kind: str
    alpha: Optional[float] = None


def parse_partition(text: str) -> PartitionScheme:
    """Parse ``iid`` or ``dirichlet:ALPHA`` (ALPHA within ``DIRICHLET_ALPHA_RANGE``); ValueError otherwise."""
    value = text.strip()
    if value == "iid":
        return PartitionScheme("iid")
    low, high = DIRICHLET_ALPHA_RANGE
    if value.startswith("dirichlet:"):
        try:
            alpha = float(value[len("dirichlet:"):])
        except ValueError:
            alpha = math.nan
        if low <= alpha <= high:
            return PartitionScheme("dirichlet", alpha)
    raise ValueError(
        f"--partition: invalid value {text!r}; accepted forms are 'iid' and 'dirichlet:ALPHA' "
        f"with {low:g} <= ALPHA <= {high:g} (e.g. 'dirichlet:0.1'; smaller ALPHA = more label skew)"
    )


def _ints(text: str, flag: str) -> tuple:
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise ConfigError(f"{flag} takes comma-separated integers, got {text!r}") from None


def _seeds(seeds: Optional[str], seed: Optional[int]) -> tuple:
    """The run's seeds from --seeds or --seed (default 0), each in [0, SEED_LIMIT)."""
    if seeds is not None and seed is not None:
        raise ConfigError("--seed and --seeds are both given: --seeds lists every seed of the run; drop --seed")
    flag = "--seeds" if seeds is not None else "--seed"
    values = _ints(seeds, flag) if seeds is not None else (Config.seed if seed is None else seed,)
    if not values:
        raise ConfigError(f"--seeds needs at least one seed (comma-separated integers in [0, 2**32)), got {seeds!r}")
    for value in values:
        if not 0 <= value < SEED_LIMIT:
            raise ConfigError(f"{flag} takes integers in [0, 2**32), got {value}")
    twice = sorted({v for v in values if values.count(v) > 1})
    if twice:
        raise ConfigError(f"--seeds names {', '.join(map(str, twice))} twice: give distinct seeds")
    return values


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


def parser() -> argparse.ArgumentParser:
    # Flags that only some runs read default to None here, so that from_args can tell whether they were
    # given (and refuse them where no run reads them); from_args puts in Config's defaults.
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
                   help=f"one of {', '.join(MODELS)} (default: resnet18 for CIFAR, mlp for digits, cnn for other "
                        "tfds:NAME). Every model takes any image size and channel count: resnet18 and vgg16 (built for "
                        "32x32) pool any size down to one 512-vector; cnn and mlp flatten the image, so their first "
                        "dense layer grows with height x width (fine up to about 64x64)")
    p.add_argument("--augment", default="auto",
                   help=f"one of {', '.join(AUGMENTATIONS)}: random crops of the zero-padded training images (padding "
                        "an eighth of the shorter side, 4 pixels on 32x32) and / or horizontal flips. auto: crop-flip "
                        "for cifar10 / cifar100 (and tfds:cifar10 / tfds:cifar100), none for the rest")
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
    p.add_argument("--batch-size", type=int, help="per-worker batch size")
    p.add_argument("--epochs", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--lr-schedule", default="step", help=f"one of {', '.join(LR_SCHEDULES)}")
    p.add_argument("--lr-decay-epochs", help="step decay epochs, e.g. 100,150 (default: 50%% and 75%% of the run); "
                                             "--lr-schedule step only")
    p.add_argument("--lr-decay-factor", type=float, help="step decay factor in (0, 1] (default 0.1); --lr-schedule step only")
    p.add_argument("--momentum", type=float)
    p.add_argument("--weight-decay", type=float)
    p.add_argument("--avg-period", type=int, help="communication budget as an average period (default 8); read by "
                                                   "the averaging methods other than full_sync")
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
    p.add_argument("--qsr-base-period", type=int, help=argparse.SUPPRESS)  # refused: see from_args
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
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _method(strategy: Optional[str], schedule: Optional[str]) -> str:
    if strategy is not None and strategy not in STRATEGIES:
        raise ConfigError(f"--strategy {strategy!r} is unknown; accepted values: {', '.join(STRATEGIES)}")
    if schedule is not None and schedule not in SCHEDULES and not is_plugin(schedule):
        raise ConfigError(f"--schedule {schedule!r} is unknown; accepted values: {', '.join(SCHEDULES)}, "
                          f"or {PLUGIN_FORM} for a schedule of your own")
    strategy = strategy or "average"
    if strategy != "average":
        if schedule is not None:
            raise ConfigError(f"--schedule applies to --strategy average only, not {strategy}")
        return strategy
    return {"constant": "cpsgd"}.get(schedule or "adpsgd", schedule or "adpsgd")


def from_args(args: argparse.Namespace) -> tuple[list[Config], RunOptions]:
    """Turn parsed flags into the list of run configs (methods x seeds) and the
    run options. Raises ConfigError for any bad value, before jax starts."""
    dataset = args.dataset or "cifar10"
    if dataset not in DATASETS and not is_tfds(dataset):
        raise ConfigError(f"--dataset {dataset!r} is unknown; accepted values: {', '.join(DATASETS)}, or tfds:NAME "
                          "for a tfds image-classification dataset (e.g. tfds:mnist)")
    if args.augment not in AUGMENTATIONS:
        raise ConfigError(f"--augment {args.augment!r} is unknown; accepted values: {', '.join(AUGMENTATIONS)}")
    defaults = dataset_defaults(dataset)
    if args.compare is not None:
        if args.strategy or args.schedule:
            raise ConfigError("--compare takes the methods itself; drop --strategy / --schedule")
        methods = [m.strip() for m in args.compare.split(",") if m.strip()]
        for m in methods:
            if m not in METHODS and not is_plugin(m):
                raise ConfigError(f"--compare: unknown method {m!r}; accepted values: {', '.join(METHODS)}, "
                                  f"or {PLUGIN_FORM} for a schedule of your own")
        if not methods:
            raise ConfigError(f"--compare needs at least one method; accepted values: {', '.join(METHODS)}")
        twice = sorted({m for m in methods if methods.count(m) > 1})
        if twice:
            raise ConfigError(f"--compare names {', '.join(twice)} twice: each method runs once per seed")
    else:
        methods = [_method(args.strategy, args.schedule)]
    _load_plugins(methods, "--compare" if args.compare is not None else "--schedule")
    seeds = _seeds(args.seeds, args.seed)
    if args.qsr_base_period is not None:
        raise ConfigError(_QSR_BASE_PERIOD_GONE)
    for warning in unread_flags(args, methods, dataset):
        print(f"warning: {warning}", file=sys.stderr)
    group_size = _group_size(args.group_size or str(Config.group_size))
    outer = _outer(args.outer_optimizer or Config.outer_optimizer, args.outer_lr, args.outer_momentum)
    given = lambda value, default: default if value is None else value  # noqa: E731
    base = Config(
        dataset=dataset,
        data_dir=args.data_dir,
        model=args.model or defaults["model"],
        partition=args.partition,
        workers=args.workers,
        devices=args.devices,
        batch_size=args.batch_size if args.batch_size is not None else defaults["batch_size"],
        epochs=args.epochs if args.epochs is not None else defaults["epochs"],
        lr=args.lr if args.lr is not None else defaults["lr"],
        lr_schedule=args.lr_schedule,
        lr_decay_epochs=_ints(args.lr_decay_epochs, "--lr-decay-epochs") if args.lr_decay_epochs else (),
        lr_decay_factor=given(args.lr_decay_factor, Config.lr_decay_factor),
        momentum=args.momentum if args.momentum is not None else defaults["momentum"],
        weight_decay=args.weight_decay if args.weight_decay is not None else defaults["weight_decay"],
        avg_period=given(args.avg_period, Config.avg_period),
        local_warmup_epochs=given(args.local_warmup_epochs, Config.local_warmup_epochs),
        qsgd_levels=given(args.qsgd_levels, Config.qsgd_levels),
        qsgd_bucket_size=given(args.qsgd_bucket_size, Config.qsgd_bucket_size),
        qsr_alpha=args.qsr_alpha,
        qsr_init_period=given(args.qsr_init_period, Config.qsr_init_period),
        qsr_min_period=given(args.qsr_min_period, Config.qsr_min_period),
        qsr_power=given(args.qsr_power, Config.qsr_power),
        group_size=group_size,
        **outer,
        dtype=args.dtype, worker_loop=args.worker_loop,
        synthetic_size=given(args.synthetic_size, Config.synthetic_size),
        augment=augmentation(dataset, args.augment),
    )
    validate(base)
    check_writable(args.out)
    if args.checkpoint_every is not None and args.checkpoint_every < 0:
        raise ConfigError(f"--checkpoint-every must be >= 0 steps, got {args.checkpoint_every}")
    if args.keep_checkpoints < 1:
        raise ConfigError(f"--keep-checkpoints must be >= 1, got {args.keep_checkpoints}")
    if args.resume and not os.path.isdir(args.out):
        raise ConfigError(f"--resume: the output folder {args.out!r} does not exist")
    _check_distributed(args, base.workers)
    options = RunOptions(out=args.out, checkpoint_every=args.checkpoint_every, keep_checkpoints=args.keep_checkpoints,
                         resume=args.resume, progress=not args.quiet, plots=not args.no_plots,
                         coordinator=args.coordinator, num_processes=args.num_processes, process_id=args.process_id,
                         distributed_timeout=args.distributed_timeout)
    flat = dict(group_size=1, outer_optimizer="none", outer_lr=None, outer_momentum=None)
    # Groups and outer optimizers belong to parameter averaging; allreduce and qsgd run without them.
    runs = [base.replace(method=m, seed=s) for s in seeds for m in methods]
    return [c if c.averaging else c.replace(**flat) for c in runs], options


_QSR_BASE_PERIOD_GONE = ("--qsr-base-period is no longer accepted: QSR's periods are --qsr-init-period (warm-up "
                         "and --qsr-alpha 0) and --qsr-min-period (the shortest period)")


def _load_plugins(methods: list[str], flag: str) -> None:
    """Import every plug-in schedule's factory now, so that a bad name is refused with the other flags
    (the factory itself is called in ``setup.prepare``, once the run's steps are known)."""
    from experiments import plugins  # imports this module

    for method in methods:
        if is_plugin(method):
            plugins.load(method, flag)


def unread_flags(args: argparse.Namespace, methods: list[str], dataset: str) -> list[str]:
    """Refuse (ConfigError) a flag that was given (is not None) but that no run of ``methods`` on
    ``dataset`` reads; returns one-line warnings for the flags that are only warned about.

    ``--avg-period`` is only warned about: scripts that sweep methods pass the budget to every run
    (``experiments.net`` does), and refusing it would break them.
    """
    schedule = args.lr_schedule or "step"
    plugins = [m for m in methods if is_plugin(m)]  # a schedule of one's own averages and reads the budget
    averaging = [m for m, (strategy, _) in METHODS.items() if strategy == "average"] + plugins
    with_period = [m for m, (_, name) in METHODS.items() if name not in (None, "full_sync")] + plugins
    trains = f"this run trains {', '.join(methods)}"
    on_schedule = (schedule == "step", "--lr-schedule step", f"this run has --lr-schedule {schedule}")
    with_groups = (bool(set(methods) & set(averaging)), f"the averaging methods ({', '.join(averaging)})", trains)
    # flag: (its value, whether this run reads it, who reads it, what this run has instead)
    rules = {
        "--lr-decay-epochs": (args.lr_decay_epochs, *on_schedule),
        "--lr-decay-factor": (args.lr_decay_factor, *on_schedule),
        "--local-warmup-epochs": (args.local_warmup_epochs, "post_local" in methods, "post_local", trains),
        "--qsgd-levels": (args.qsgd_levels, "qsgd" in methods, "qsgd", trains),
        "--qsgd-bucket-size": (args.qsgd_bucket_size, "qsgd" in methods, "qsgd", trains),
        "--qsr-alpha": (args.qsr_alpha, "qsr" in methods, "qsr", trains),
        "--qsr-init-period": (args.qsr_init_period, "qsr" in methods, "qsr", trains),
        "--qsr-min-period": (args.qsr_min_period, "qsr" in methods, "qsr", trains),
        "--qsr-power": (args.qsr_power, "qsr" in methods, "qsr", trains),
        "--synthetic-size": (args.synthetic_size, dataset == "synthetic", "--dataset synthetic",
                             f"this run has --dataset {dataset}"),
        "--data-dir": (args.data_dir, dataset in ("cifar10", "cifar100") or is_tfds(dataset),
                       "--dataset cifar10, cifar100 and tfds:NAME", f"this run has --dataset {dataset}"),
        "--group-size": (args.group_size, *with_groups),
        "--outer-optimizer": (args.outer_optimizer, *with_groups),
    }
    for flag, (value, read, readers, instead) in rules.items():
        if value is not None and not read:
            raise ConfigError(f"{flag} is read only by {readers}, and {instead}: drop {flag}")
    if args.avg_period is not None and not set(methods) & set(with_period):
        return [f"--avg-period is read only by {', '.join(with_period)}, and {trains}: it changes nothing"]
    return []


def _group_size(text: str) -> Union[int, str]:
    if text == "host":
        return text
    try:
        return int(text)
    except ValueError:
        raise ConfigError(f"--group-size takes an integer dividing --workers, or host; got {text!r}") from None


def _outer(name: str, lr: Optional[float], momentum: Optional[float]) -> dict:
    """The outer optimizer's Config fields, with DiLoCo's defaults for nesterov."""
    if name not in OUTER_OPTIMIZERS:
        raise ConfigError(f"--outer-optimizer {name!r} is unknown; accepted values: {', '.join(OUTER_OPTIMIZERS)}")
    if name == "none":
        if lr is not None or momentum is not None:
            raise ConfigError("--outer-lr / --outer-momentum need --outer-optimizer sgd or nesterov")
        return dict(outer_optimizer=name, outer_lr=None, outer_momentum=None)
    default_lr, default_momentum = OUTER_DEFAULTS[name]
    return dict(outer_optimizer=name, outer_lr=default_lr if lr is None else lr,
                outer_momentum=default_momentum if momentum is None else momentum)


def _check_distributed(args: argparse.Namespace, workers: int) -> None:
    """Refuse incomplete or inconsistent multi-process flags before start-up."""
    coordinator, count, pid = args.coordinator, args.num_processes, args.process_id
    if args.distributed_timeout < 1:
        raise ConfigError(f"--distributed-timeout must be >= 1 second, got {args.distributed_timeout}")
    if coordinator is None:
        if count is not None or pid is not None:
            raise ConfigError("--num-processes / --process-id need --coordinator HOST:PORT (or --coordinator auto)")
        return
    if coordinator == "auto":
        if count is not None or pid is not None:
            raise ConfigError("--coordinator auto takes the process count and id from the cluster; drop "
                              "--num-processes / --process-id")
        return
    host, _, port = coordinator.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"--coordinator must be HOST:PORT (or auto), got {coordinator!r}")
    if count is None or pid is None:
        raise ConfigError("--coordinator HOST:PORT needs both --num-processes and --process-id")
    if count < 1:
        raise ConfigError(f"--num-processes must be >= 1, got {count}")
    if not 0 <= pid < count:
        raise ConfigError(f"--process-id must be in [0, --num-processes={count}), got {pid}")
    if workers % count:
        raise ConfigError(f"--workers {workers} must be a multiple of --num-processes {count} (workers per process)")
    if args.devices is not None and args.devices % count:
        raise ConfigError(f"--devices {args.devices} must be a multiple of --num-processes {count} "
                          "(devices per process)")


def validate(c: Config) -> None:
    """Checks that need no jax and no data. Checks against the devices come
    later, in ``setup.prepare``, still before any compilation."""
    def need(ok: bool, message: str):
        if not ok:
            raise ConfigError(message)

    need(c.dataset in DATASETS or is_tfds(c.dataset),
         f"--dataset {c.dataset!r} is unknown; accepted values: {', '.join(DATASETS)}, or tfds:NAME")
    need(c.augment in AUGMENTATIONS, f"--augment {c.augment!r} is unknown; accepted values: {', '.join(AUGMENTATIONS)}")
    need(c.method in METHODS or is_plugin(c.method),
         f"method {c.method!r} is unknown; accepted values: {', '.join(METHODS)}, or {PLUGIN_FORM}")
    need(c.model in MODELS, f"--model {c.model!r} is unknown; accepted values: {', '.join(MODELS)}")
    need(c.lr_schedule in LR_SCHEDULES, f"--lr-schedule {c.lr_schedule!r} is unknown; accepted values: {', '.join(LR_SCHEDULES)}")
    need(c.dtype in DTYPES, f"--dtype {c.dtype!r} is unknown; accepted values: {', '.join(DTYPES)}")
    need(c.worker_loop in WORKER_LOOPS or (str(c.worker_loop).isdigit() and int(c.worker_loop) >= 1),
         f"--worker-loop {c.worker_loop!r} is unknown; accepted values: {', '.join(WORKER_LOOPS)}, or a chunk size >= 1")
    need(c.workers >= 1, f"--workers must be >= 1, got {c.workers}")
    need(c.devices is None or c.devices >= 1, f"--devices must be >= 1, got {c.devices}")
    need(c.devices is None or c.workers % c.devices == 0,
         f"--devices {c.devices} must divide --workers {c.workers} (accepted: "
         f"{', '.join(str(d) for d in range(1, c.workers + 1) if c.workers % d == 0)})")
    need(c.batch_size >= 1, f"--batch-size must be >= 1, got {c.batch_size}")
    need(c.epochs >= 1, f"--epochs must be >= 1, got {c.epochs}")
    need(math.isfinite(c.lr) and c.lr > 0, f"--lr must be a finite number > 0, got {c.lr}")
    need(0 < c.lr_decay_factor <= 1, f"--lr-decay-factor must be in (0, 1], got {c.lr_decay_factor}")
    need(all(0 < e < c.epochs for e in c.lr_decay_epochs) and list(c.lr_decay_epochs) == sorted(set(c.lr_decay_epochs)),
         f"--lr-decay-epochs must be increasing epochs in (0, {c.epochs}), got {c.lr_decay_epochs}")
    need(0 <= c.momentum < 1, f"--momentum must be in [0, 1), got {c.momentum}")
    need(math.isfinite(c.weight_decay) and c.weight_decay >= 0,
         f"--weight-decay must be a finite number >= 0, got {c.weight_decay}")
    need(c.avg_period >= 1, f"--avg-period must be >= 1, got {c.avg_period}")
    need(0 <= c.local_warmup_epochs < c.epochs, f"--local-warmup-epochs must be in [0, {c.epochs}), got {c.local_warmup_epochs}")
    need(c.post_local_warmup == POST_LOCAL_WARMUP,
         f"post_local_warmup {c.post_local_warmup!r} is no longer implemented: post_local's warm-up is "
         f"{POST_LOCAL_WARMUP!r} (full-sync steps)")
    need(1 <= c.qsgd_levels <= MAX_QSGD_LEVELS, f"--qsgd-levels must be in [1, {MAX_QSGD_LEVELS}], got {c.qsgd_levels}")
    need(c.qsgd_bucket_size >= 1, f"--qsgd-bucket-size must be >= 1, got {c.qsgd_bucket_size}")
    need(c.qsr_alpha is None or (math.isfinite(c.qsr_alpha) and c.qsr_alpha >= 0),
         f"--qsr-alpha must be a finite number >= 0 (0: a constant period), got {c.qsr_alpha}")
    need(c.qsr_init_period >= 1, f"--qsr-init-period must be an integer >= 1, got {c.qsr_init_period}")
    need(c.qsr_min_period >= 1, f"--qsr-min-period must be an integer >= 1, got {c.qsr_min_period}")
    need(math.isfinite(c.qsr_power) and c.qsr_power > 0, f"--qsr-power must be a finite number > 0, got {c.qsr_power}")
    need(c.qsr_rule == QSR_RULE, f"qsr_rule {c.qsr_rule!r} is no longer implemented: qsr is {QSR_RULE!r} "
                                 "(the reference implementation's rule, docs/algorithm.md)")
    need(c.synthetic_size >= 1, f"--synthetic-size must be >= 1, got {c.synthetic_size}")
    need(type(c.seed) is int and 0 <= c.seed < SEED_LIMIT, f"--seed must be an integer in [0, 2**32), got {c.seed!r}")
    try:
        parse_partition(c.partition)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    need(c.group_size == "host" or (type(c.group_size) is int and c.group_size >= 1 and c.workers % c.group_size == 0),
         f"--group-size must divide --workers {c.workers} (accepted: "
         f"{', '.join(str(d) for d in range(1, c.workers + 1) if c.workers % d == 0)} or host), got {c.group_size!r}")
    need(c.outer_optimizer in OUTER_OPTIMIZERS,
         f"--outer-optimizer {c.outer_optimizer!r} is unknown; accepted values: {', '.join(OUTER_OPTIMIZERS)}")
    if c.outer_optimizer != "none":
        need(c.outer_lr is not None and math.isfinite(c.outer_lr) and c.outer_lr > 0,
             f"--outer-lr must be > 0, got {c.outer_lr}")
        need(c.outer_momentum is not None and 0 <= c.outer_momentum < 1,
             f"--outer-momentum must be in [0, 1), got {c.outer_momentum}")
        need(c.outer_optimizer != "nesterov" or c.outer_momentum > 0,
             "--outer-optimizer nesterov needs --outer-momentum > 0 (use sgd for none)")


def check_writable(out: str) -> None:
    """Raise ConfigError unless ``out`` can be created or written. Creates nothing."""
    path = os.path.abspath(out)
    if os.path.exists(path) and not os.path.isdir(path):
        raise ConfigError(f"--out {out!r} cannot be written: it is a file, not a folder")
    probe = path
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        raise ConfigError(f"--out {out!r} cannot be written: {probe!r} is a file, not a folder")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ConfigError(f"--out {out!r} cannot be written: no write permission in {probe!r}")
