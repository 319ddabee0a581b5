"""The typed run configuration: ``Config`` (what decides a run's results),
``RunOptions`` (how runs are executed and saved) and ``validate``, the checks
that need no jax and no data.

A run's ``Config`` is written into its summary; ``experiments/translate.py``
builds it from the flags, ``experiments/resume.py`` compares it with a saved
one. Importing this module does not import jax: the CLI must set the number
of virtual CPU devices (``--workers``) before jax initialises.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Optional, Union

from adpsgd_jax.limits import MAX_QSGD_LEVELS
from experiments.datasets import AUGMENTATIONS, is_tfds, parse_partition
from experiments.names import (CPU_DEVICES, DATASETS, DTYPES, LR_SCHEDULES, METHODS, MODELS, OUTER_OPTIMIZERS,
                               PLUGIN_FORM, WORKER_LOOPS, is_plugin, method_parts)

# Seeds: jax.random.PRNGKey keeps only the low 32 bits of a seed (without x64), so seed 2**32 would be seed 0.
SEED_LIMIT = 2**32
# What post_local's warm-up synchronises: "gradient", full-sync steps as in PyTorch's post-local SGD
# (docs/pytorch.md); experiments/resume.py reads older runs' meaning.
POST_LOCAL_WARMUP = "gradient"
# What qsr computes: "reference", the rule of the QSR paper's code (plain int() of the power, init_h and
# min_h apart, every sync of the rule kept in the budgeted form); experiments/resume.py reads older runs'.
QSR_RULE = "reference"


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
    fragments: int = 1  # streaming averaging: P fragments, one averaged per round (schedule at period avg_period / P)
    fragment_delay: int = 0  # tau: local steps between taking a fragment's average and applying it
    fragment_alpha: float = 0.0  # alpha: the local parameters' weight when a fragment's average is applied
    seed: int = 0
    dtype: str = "float32"
    synthetic_size: int = 10_000
    augment: str = "auto"  # from AUGMENTATIONS; translate.from_args stores the dataset's choice for auto

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
        name += f"-frag{self.fragments}" if self.fragments != 1 else ""
        name += (f"-delay{self.fragment_delay}" if self.fragment_delay else "") + \
            (f"-alpha{self.fragment_alpha:g}" if self.fragment_alpha else "")
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
    tensorboard: bool = True  # TensorBoard event files in each run's tensorboard/ (experiments/curves.py)
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
    _validate_fragments(c, need)
    if c.outer_optimizer != "none":
        need(c.outer_lr is not None and math.isfinite(c.outer_lr) and c.outer_lr > 0,
             f"--outer-lr must be > 0, got {c.outer_lr}")
        need(c.outer_momentum is not None and 0 <= c.outer_momentum < 1,
             f"--outer-momentum must be in [0, 1), got {c.outer_momentum}")
        need(c.outer_optimizer != "nesterov" or c.outer_momentum > 0,
             "--outer-optimizer nesterov needs --outer-momentum > 0 (use sgd for none)")


def _validate_fragments(c: Config, need) -> None:
    """--fragments P >= 1 dividing --avg-period H (the schedule runs at H / P), --fragment-delay in [0, H),
    --fragment-alpha in [0, 1]."""
    need(type(c.fragments) is int and c.fragments >= 1, f"--fragments must be an integer >= 1, got {c.fragments!r}")
    need(type(c.fragment_delay) is int and c.fragment_delay >= 0,
         f"--fragment-delay must be an integer >= 0 (local steps), got {c.fragment_delay!r}")
    need(math.isfinite(c.fragment_alpha) and 0 <= c.fragment_alpha <= 1,
         f"--fragment-alpha must be a number in [0, 1], got {c.fragment_alpha}")
    if method_parts(c.method)[1] in (None, "every_step"):
        return  # no budget to translate (``methods.make_schedule`` checks the delay against the schedule)
    need(c.avg_period % c.fragments == 0,
         f"--fragments {c.fragments} must divide --avg-period {c.avg_period} (the schedule runs at period "
         f"{c.avg_period} / P; accepted: {', '.join(str(d) for d in range(1, c.avg_period + 1) if c.avg_period % d == 0)})")
    need(c.fragment_delay < c.avg_period,
         f"--fragment-delay must be in [0, --avg-period {c.avg_period}) (each fragment is averaged every "
         f"{c.avg_period} steps), got {c.fragment_delay}")


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
