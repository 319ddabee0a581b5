"""Data sets for data-parallel workers: what they hold and how they are split.

* ``load`` returns a ``Dataset`` of uint8 images held in host memory, read
  by ``experiments/cifar_release.py`` (CIFAR's own python release) or
  ``experiments/sources.py`` (tfds builds of CIFAR or of any tfds image
  dataset, ``tfds:NAME``; scikit-learn digits; synthetic), with the
  augmentation ``--augment`` chose.
* ``partition`` splits the training examples among W workers (``iid`` or
  label-skewed ``dirichlet:ALPHA``).
* ``normalize`` runs on the device inside the jitted step.

The batches of a run come from ``experiments/loader.py``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp
import numpy as np

from experiments import cifar_release, sources
from experiments.datasets import (AUGMENT_MODES, AUGMENTATIONS, TFDS_PREFIX, PartitionScheme, augmentation, is_tfds,
                                  parse_partition)
from experiments.names import DATASETS


_MAX_DIRICHLET_DRAWS = 100


@dataclasses.dataclass(frozen=True, eq=False)
class Dataset:
    """An image-classification dataset held in host memory.

    Images are uint8 [N, H, W, C]; labels int32 [N] in [0, num_classes).
    ``mean`` / ``std`` are float32 [C] per-channel statistics of the train
    images in 0..255 pixel units. ``augment`` is what training batches get:
    ``crop-flip`` (random crops of the image zero-padded by ``crop_pad``
    pixels, and horizontal flips), ``crop``, ``flip`` or ``none`` (True and
    False, as older callers pass, mean crop-flip and none). ``source`` says
    what was read, e.g. ``cifar python release: /data/cifar-10-batches-py``.
    """

    name: str
    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    num_classes: int
    mean: np.ndarray
    std: np.ndarray
    augment: str = "none"
    source: str = ""

    def __post_init__(self):
        if isinstance(self.augment, (bool, np.bool_)):
            object.__setattr__(self, "augment", "crop-flip" if self.augment else "none")
        if self.augment not in AUGMENT_MODES:
            raise ValueError(f"--augment {self.augment!r} is unknown; accepted values: {', '.join(AUGMENT_MODES)}")

    @property
    def num_train(self) -> int:
        return len(self.train_labels)

    @property
    def num_test(self) -> int:
        return len(self.test_labels)

    @property
    def image_shape(self) -> tuple:
        """(H, W, C) of one image."""
        return tuple(self.train_images.shape[1:])


def load(name: str, data_dir: str | None = None, *, download: bool = False, synthetic_size: int = 50_000,
         augment: str = "auto") -> Dataset:
    """Load dataset ``name`` (a ``--dataset`` value) into host memory.

    * ``cifar10`` / ``cifar100``: 32x32x3, 50000 train / 10000 test. From
      CIFAR's python release when ``data_dir`` is, or holds, its tarball or
      extracted folder (``cifar_release.locate``; a tfds build in
      ``data_dir/name`` comes first); otherwise from the tfds build in
      ``data_dir`` (tfds' default when None), as ``tfds:NAME`` below.
    * ``tfds:NAME``: any tfds image-classification dataset with images of one
      size (``NAME[/CONFIG][:VERSION]``, e.g. ``tfds:mnist``); shape and class
      count from its metadata; test split ``test`` (else ``validation``).
      array_record builds are read without TensorFlow, tfrecord builds need
      it. With ``download=False`` (default) a missing build raises
      ``sources.DataUnavailableError`` at once; ``download=True`` lets tfds try to
      download and build it (needs internet and TensorFlow).
    * ``digits``: scikit-learn's 8x8x1 digits, values 0..16 rescaled to uint8
      0..255; a stratified 80/20 train/test split with
      ``train_test_split(random_state=0)`` (1437 / 360 examples).
    * ``synthetic``: uniform random uint8 32x32x3 images with random labels in
      10 classes, ``synthetic_size`` train and ``max(1, synthetic_size // 5)``
      test examples, always the same (fixed seed); for throughput runs.

    ``augment``: one of ``datasets.AUGMENTATIONS``; ``auto`` is crop-flip for
    CIFAR (also through tfds) and none for the rest.

    Returns a ``Dataset`` (uint8 images, int32 labels, float32 [C] mean/std).
    Raises ValueError for an unknown ``name`` or ``augment`` and
    ``sources.DataUnavailableError`` (one line) when the data cannot be read.
    """
    if augment not in AUGMENTATIONS:
        raise ValueError(f"--augment {augment!r} is unknown; accepted values: {', '.join(AUGMENTATIONS)}")
    if name in cifar_release.LAYOUTS:
        release = cifar_release.locate(name, data_dir)
        if release is not None:
            arrays = cifar_release.read(name, release)
        else:
            arrays = sources.read_tfds(name, data_dir, download, dataset=name, hint=cifar_release.hint(name))
    elif is_tfds(name):
        arrays = sources.read_tfds(name[len(TFDS_PREFIX):], data_dir, download)
    elif name == "digits":
        arrays = sources.read_digits()
    elif name == "synthetic":
        arrays = sources.read_synthetic(synthetic_size)
    else:
        raise ValueError(f"--dataset: unknown dataset {name!r}; accepted values: {', '.join(DATASETS)}, tfds:NAME")
    x_train, y_train, x_test, y_test, num_classes, source = sources.check(arrays, name)
    mean, std = channel_stats(x_train)
    return Dataset(name, x_train, y_train, x_test, y_test, num_classes, mean, std, augmentation(name, augment), source)


def channel_stats(images: np.ndarray, chunk: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and std of uint8 images [N, H, W, C] -> two float32 [C].

    Accumulated in float64 over chunks of images (no full-size float copy).
    """
    channels = images.shape[-1]
    total, total_sq, count = np.zeros(channels), np.zeros(channels), 0
    for start in range(0, len(images), chunk):
        x = images[start : start + chunk].reshape(-1, channels).astype(np.float64)
        total, total_sq, count = total + x.sum(0), total_sq + np.square(x).sum(0), count + len(x)
    mean = total / count
    std = np.sqrt(np.maximum(total_sq / count - np.square(mean), 0.0))
    return mean.astype(np.float32), std.astype(np.float32)


def partition(
    labels: np.ndarray, num_workers: int, scheme: str | PartitionScheme, seed: int, *, min_size: int = 1
) -> list[np.ndarray]:
    """Split example indices 0..N-1 among ``num_workers`` workers.

    ``labels``: int [N]. ``scheme``: ``"iid"`` gives disjoint equal shards of
    N // W examples from a seeded permutation (the N % W left over are
    unused); ``"dirichlet:ALPHA"`` splits each class's examples among the
    workers with proportions drawn from Dirichlet(ALPHA), giving disjoint,
    unequal, label-skewed shards covering all N examples (redrawn, up to 100
    times, until every shard has at least ``min_size`` examples).

    Returns W sorted int64 index arrays. Deterministic in ``seed``.
    """
    labels = np.asarray(labels)
    spec = scheme if isinstance(scheme, PartitionScheme) else parse_partition(scheme)
    if num_workers < 1:
        raise ValueError(f"--workers: need at least one worker, got {num_workers}")
    rng = np.random.default_rng(seed)
    n = len(labels)
    if spec.kind == "iid":
        per = n // num_workers
        if per < min_size:
            raise ValueError(
                f"--batch-size / --workers: {n} examples over {num_workers} workers give {per} per worker, fewer than "
                f"the per-worker batch size {min_size}; use a smaller --batch-size or fewer --workers"
            )
        perm = rng.permutation(n)
        return [np.sort(perm[w * per : (w + 1) * per]).astype(np.int64) for w in range(num_workers)]
    by_class = [rng.permutation(np.flatnonzero(labels == c)) for c in np.unique(labels)]
    for _ in range(_MAX_DIRICHLET_DRAWS):
        pieces: list[list[np.ndarray]] = [[] for _ in range(num_workers)]
        for idx in by_class:
            proportions = rng.dirichlet(np.full(num_workers, spec.alpha))
            cuts = np.rint(np.cumsum(proportions)[:-1] * len(idx)).astype(np.int64)
            for w, piece in enumerate(np.split(idx, cuts)):
                pieces[w].append(piece)
        shards = [np.sort(np.concatenate(p)).astype(np.int64) for p in pieces]
        if min(len(s) for s in shards) >= min_size:
            return shards
    raise ValueError(
        f"--partition: dirichlet:{spec.alpha} left some of the {num_workers} workers with fewer than "
        f"{min_size} of the {n} examples in {_MAX_DIRICHLET_DRAWS} draws; use a larger ALPHA or fewer workers"
    )



def normalize(images: jnp.ndarray, mean: Any, std: Any) -> jnp.ndarray:
    """(images - mean) / std as float32; images uint8 [..., C], mean/std [C] in pixel units."""
    x = jnp.asarray(images).astype(jnp.float32)
    shape = (1,) * (x.ndim - 1) + (-1,)
    return (x - jnp.asarray(mean, jnp.float32).reshape(shape)) / jnp.asarray(std, jnp.float32).reshape(shape)
