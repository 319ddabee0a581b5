"""Saved configs read back: what a run's ``config.json`` (or summary) means in
this version, and where it differs from the flags of a ``--resume``.

A saved config records the values the run used. Fields added since it was
saved count as their defaults, except where their absence records an older
meaning of the method, which no flag can restore (``CHANGED_MEANING``); a
default that changed since (``FORMER_DEFAULTS``) is the saved run's to keep.
``experiments/setup.py`` applies both when it checks a run to resume.
Imports no jax.
"""

from __future__ import annotations

from experiments.config import Config
from experiments.datasets import augmentation, defaults, recipe_name

# Config fields that may differ on --resume without changing results.
HARMLESS_ON_RESUME = ("data_dir",)
# post_local's warm-up once averaged parameters after each warm-up step and averaged one step later
# (now: full-sync steps, config.POST_LOCAL_WARMUP); post_local runs saved then lack the field and are
# read as "parameters", so that --resume refuses them.
POST_LOCAL_WARMUP_BEFORE = "parameters"
# qsr once computed its period with a floor of 1e-9 tolerance and one base period, and cut the budgeted
# rule at C syncs (now: config.QSR_RULE); qsr runs saved then lack the field and are read as
# "tolerance-capped", so that --resume refuses them; their qsr_base_period is read as both periods.
QSR_RULE_BEFORE = "tolerance-capped"
CHANGED_MEANING = "the configuration changed meaning"  # in a difference that no flag can undo
# Defaults that changed, by (datasets.RECIPES key, model): the value the runs saved before trained with.
# The training defaults were once per data set alone, so cnn and mlp on CIFAR took ResNet-18's lr.
FORMER_DEFAULTS = {(dataset, model): {"lr": 0.1} for dataset in ("cifar10", "cifar100") for model in ("cnn", "mlp")}


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


def former_defaults(saved: dict, current: Config) -> dict:
    """The fields of ``current`` to take from ``saved``: those of ``FORMER_DEFAULTS`` where ``current``
    has today's default and the saved run, of the same data set and model, the former one."""
    if (saved.get("dataset"), saved.get("model")) != (current.dataset, current.model):
        return {}
    now = defaults(current.dataset, current.model)
    return {field: old for field, old in FORMER_DEFAULTS.get((recipe_name(current.dataset), current.model), {}).items()
            if saved.get(field) == old and getattr(current, field) == now[field]}


def _older_meaning(saved: dict) -> dict:
    """The fields whose absence from ``saved`` records an older meaning rather than the default."""
    older = {}
    if saved.get("method") == "post_local" and "post_local_warmup" not in saved:
        older["post_local_warmup"] = POST_LOCAL_WARMUP_BEFORE
    if saved.get("method") == "qsr" and "qsr_rule" not in saved:
        older["qsr_rule"] = QSR_RULE_BEFORE
    return older


def _renamed(saved: dict) -> dict:
    """``saved`` under today's names: an old ``qsr_base_period`` (one period for both roles) as both QSR
    periods, and the method ``full_sync`` (parameters averaged every step) as ``every_step``."""
    saved = dict(saved)
    if saved.get("method") == "full_sync":
        saved["method"] = "every_step"
    if "qsr_base_period" in saved:
        base = saved.pop("qsr_base_period")
        saved.setdefault("qsr_init_period", base)
        saved.setdefault("qsr_min_period", base)
    return saved


def from_saved(saved: dict) -> Config:
    """The Config a summary or config.json recorded (an old post_local run's with its old warm-up)."""
    return Config(**{**_older_meaning(saved), **_renamed(saved),
                     "lr_decay_epochs": tuple(saved.get("lr_decay_epochs", ()))})
