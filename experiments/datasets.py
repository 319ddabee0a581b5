"""What a ``--dataset``, ``--augment`` and ``--partition`` value means, known
before any data is read: the tfds names, each (data set, model)'s training
defaults, the augmentation modes and the partition schemes.

Imports no jax, like ``experiments/names.py`` beside it: flags are checked
before jax starts.
"""

from __future__ import annotations

import math
import re
from typing import NamedTuple, Optional

from experiments.names import DATASETS

# ``--dataset tfds:NAME``: any tfds image-classification data set (NAME may carry /CONFIG and :VERSION).
TFDS_PREFIX = "tfds:"
_TFDS_NAME = re.compile(r"[a-z0-9_]+(/[A-Za-z0-9_.-]+)?(:[0-9]+\.[0-9]+\.[0-9]+)?")
OTHER_TFDS = "tfds:NAME"  # the recipe of a tfds data set other than tfds:cifar10 / tfds:cifar100
# --augment: random crops (zero padding of an eighth of the shorter side, 4
# pixels on 32x32) and / or horizontal flips of the training batches.
AUGMENT_MODES = ("crop-flip", "crop", "flip", "none")
AUGMENTATIONS = ("auto", *AUGMENT_MODES)
# --partition dirichlet:ALPHA. Below the floor numpy's Dirichlet draw gives each class to a single worker
# almost always (no more skew to gain); above the ceiling the shards are iid to many digits, and near
# float64's top the draw returns zeros.
DIRICHLET_ALPHA_RANGE = (1e-3, 1e6)

# Each data set's recipe: the model it trains without --model, its augmentation, and the training
# defaults of that model. CIFAR's is the usual ResNet recipe; digits' the setting of the prototype in
# docs/algorithm.md (MLP, plain SGD, batch 16 per worker, 30 epochs). Other tfds data sets are not
# augmented by default: many are digits or characters, which a mirror image turns into another class.
RECIPES = {
    "cifar10": dict(model="resnet18", augment="crop-flip", epochs=200, batch_size=128, lr=0.1, momentum=0.9,
                    weight_decay=5e-4),
    "cifar100": dict(model="resnet18", augment="crop-flip", epochs=200, batch_size=128, lr=0.1, momentum=0.9,
                     weight_decay=5e-4),
    "digits": dict(model="mlp", augment="none", epochs=30, batch_size=16, lr=0.1, momentum=0.0, weight_decay=0.0),
    "synthetic": dict(model="resnet18", augment="none", epochs=1, batch_size=128, lr=0.1, momentum=0.9,
                      weight_decay=5e-4),
    OTHER_TFDS: dict(model="cnn", augment="none", epochs=20, batch_size=64, lr=0.05, momentum=0.9, weight_decay=5e-4),
}
# Where a model trains with other defaults than its data set's recipe. The models without batch norm
# take a smaller lr on CIFAR's 32x32x3 images: at 0.1 with momentum 0.9 the cnn dies within the first
# steps (its test loss stays at ln(classes), its accuracy at chance) and the mlp's test loss grows
# tenfold; at 0.02 both learn (docs/cli.md).
MODEL_DEFAULTS = {(dataset, model): dict(lr=0.02) for dataset in ("cifar10", "cifar100") for model in ("cnn", "mlp")}
TRAINING_FIELDS = ("epochs", "batch_size", "lr", "momentum", "weight_decay")  # the fields the recipes set


def is_tfds(dataset: str) -> bool:
    """Whether ``dataset`` names a tfds dataset: ``tfds:NAME`` (NAME may carry ``/CONFIG`` and ``:VERSION``)."""
    return dataset.startswith(TFDS_PREFIX) and bool(_TFDS_NAME.fullmatch(dataset[len(TFDS_PREFIX):]))


def recipe_name(dataset: str) -> str:
    """The ``RECIPES`` key of a ``--dataset`` value: tfds:cifar10 and tfds:cifar100 take CIFAR's, any
    other tfds:NAME (or an unknown name, refused later) ``OTHER_TFDS``."""
    if dataset in DATASETS:
        return dataset
    name = dataset[len(TFDS_PREFIX):] if is_tfds(dataset) else ""
    return name if name in ("cifar10", "cifar100") else OTHER_TFDS


def defaults(dataset: str, model: Optional[str] = None) -> dict:
    """The flag defaults of ``dataset`` trained with ``model`` (None: the data set's own model):
    model, augment and ``TRAINING_FIELDS``."""
    recipe = recipe_name(dataset)
    model = model or RECIPES[recipe]["model"]
    return {**RECIPES[recipe], **MODEL_DEFAULTS.get((recipe, model), {}), "model": model}


def augmentation(dataset: Optional[str], augment: Optional[str]) -> Optional[str]:
    """The augmentation ``augment`` means on ``dataset``: ``auto`` (or None) is the dataset's default."""
    if augment in (None, "auto"):
        return defaults(dataset or "")["augment"]
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
