"""Parsed flags to run configs: ``from_args(flags.parser().parse_args(argv))``
returns one ``Config`` per method and seed, and the ``RunOptions``.

Defaults that depend on the data set and the model come from
``datasets.defaults``, the others from ``Config``. Every bad value, a flag
that no run of the command reads (``unread_flags``) and an inconsistent
multi-process start (``check_distributed``) raise ``ConfigError`` naming the
flag, before jax starts: this module imports no jax.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Optional, Union

from experiments import plugins
from experiments.config import SEED_LIMIT, Config, ConfigError, RunOptions, check_writable, validate
from experiments.datasets import AUGMENTATIONS, TRAINING_FIELDS, augmentation, defaults, is_tfds
from experiments.names import (DATASETS, METHODS, OUTER_DEFAULTS, OUTER_OPTIMIZERS, PLUGIN_FORM, SCHEDULES, STRATEGIES,
                               is_plugin)

QSR_BASE_PERIOD_GONE = ("--qsr-base-period is no longer accepted: QSR's periods are --qsr-init-period (warm-up "
                        "and --qsr-alpha 0) and --qsr-min-period (the shortest period)")


def from_args(args: argparse.Namespace) -> tuple[list[Config], RunOptions]:
    """Turn parsed flags into the list of run configs (methods x seeds) and the
    run options. Raises ConfigError for any bad value, before jax starts."""
    dataset = args.dataset or "cifar10"
    if dataset not in DATASETS and not is_tfds(dataset):
        raise ConfigError(f"--dataset {dataset!r} is unknown; accepted values: {', '.join(DATASETS)}, or tfds:NAME "
                          "for a tfds image-classification dataset (e.g. tfds:mnist)")
    if args.augment not in AUGMENTATIONS:
        raise ConfigError(f"--augment {args.augment!r} is unknown; accepted values: {', '.join(AUGMENTATIONS)}")
    methods = _methods(args)
    _load_plugins(methods, "--compare" if args.compare is not None else "--schedule")
    seeds = _seeds(args.seeds, args.seed)
    if args.qsr_base_period is not None:
        raise ConfigError(QSR_BASE_PERIOD_GONE)
    for warning in unread_flags(args, methods, dataset):
        print(f"warning: {warning}", file=sys.stderr)
    group_size = _group_size(args.group_size or str(Config.group_size))
    outer = _outer(args.outer_optimizer or Config.outer_optimizer, args.outer_lr, args.outer_momentum)
    given = lambda value, default: default if value is None else value  # noqa: E731
    recipe = defaults(dataset, args.model)
    training = {field: given(getattr(args, field), recipe[field]) for field in TRAINING_FIELDS}
    base = Config(
        dataset=dataset,
        data_dir=args.data_dir,
        model=recipe["model"],
        partition=args.partition,
        workers=args.workers,
        devices=args.devices,
        **training,
        lr_schedule=args.lr_schedule,
        lr_decay_epochs=_ints(args.lr_decay_epochs, "--lr-decay-epochs") if args.lr_decay_epochs else (),
        lr_decay_factor=given(args.lr_decay_factor, Config.lr_decay_factor),
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
        fragments=given(args.fragments, Config.fragments),
        fragment_delay=given(args.fragment_delay, Config.fragment_delay),
        fragment_alpha=given(args.fragment_alpha, Config.fragment_alpha),
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
    check_distributed(args, base.workers)
    options = RunOptions(out=args.out, checkpoint_every=args.checkpoint_every, keep_checkpoints=args.keep_checkpoints,
                         resume=args.resume, progress=not args.quiet, plots=not args.no_plots,
                         coordinator=args.coordinator, num_processes=args.num_processes, process_id=args.process_id,
                         distributed_timeout=args.distributed_timeout, tensorboard=not args.no_tensorboard)
    flat = dict(group_size=1, outer_optimizer="none", outer_lr=None, outer_momentum=None, fragments=1,
                fragment_delay=0, fragment_alpha=0.0)
    # Groups, outer optimizers and fragments belong to parameter averaging; allreduce and qsgd run without them.
    runs = [base.replace(method=m, seed=s) for s in seeds for m in methods]
    return [c if c.averaging else c.replace(**flat) for c in runs], options


def _methods(args: argparse.Namespace) -> list[str]:
    """The methods of the run: the ``--compare`` list, or the one of ``--strategy`` / ``--schedule``."""
    if args.compare is None:
        return [_method(args.strategy, args.schedule)]
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
    return methods


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


def _load_plugins(methods: list[str], flag: str) -> None:
    """Import every plug-in schedule's factory now, so that a bad name is refused with the other flags
    (the factory itself is called in ``setup.prepare``, once the run's steps are known)."""
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
    with_period = [m for m, (_, name) in METHODS.items() if name not in (None, "every_step")] + plugins
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
        "--fragments": (args.fragments, *with_groups),
        "--fragment-delay": (args.fragment_delay, *with_groups),
        "--fragment-alpha": (args.fragment_alpha, *with_groups),
    }
    for flag, (value, read, readers, instead) in rules.items():
        if value is not None and not read:
            raise ConfigError(f"{flag} is read only by {readers}, and {instead}: drop {flag}")
    if args.avg_period is not None and not set(methods) & set(with_period):
        return [f"--avg-period is read only by {', '.join(with_period)}, and {trains}: it changes nothing"]
    return []


def check_distributed(args: argparse.Namespace, workers: int) -> None:
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
