"""Where a dataset's examples are read from: tfds builds, scikit-learn digits, synthetic images.

Each reader returns ``Arrays``: uint8 images [N, H, W, C], int32 labels [N]
for the train and test splits, the class count and a one-line ``source``
saying what was read (it goes into the run's summary). CIFAR's own python
release is read by ``experiments/cifar_release.py``; ``data.load`` chooses.

tfds builds (``read_tfds``) are read by format:

* array_record: through ``tfds.data_source``, without TensorFlow.
* tfrecord (tfds' default format): through ``builder.as_dataset`` when
  TensorFlow is importable; otherwise ``DataUnavailableError`` in one line
  naming both ways out (install TensorFlow, or rebuild as array_record).

Image shape, channel count and class count come from the build's metadata
(``builder.info``); any image-classification dataset whose images share one
size is accepted. tensorflow_datasets is imported only here, and only when a
tfds dataset is asked for.
"""

from __future__ import annotations

import importlib
from typing import NamedTuple

import numpy as np

_READ_CHUNK = 4096  # Examples per ``__getitems__`` call (and per tf.data batch) when reading tfds.
_SYNTHETIC_SEED = 0
_TEST_SPLITS = ("test", "validation")  # The first of these a build has is its test split.


class DataUnavailableError(RuntimeError):
    """The requested data is missing, damaged or unreadable here; the message is one line."""


class Arrays(NamedTuple):
    """One dataset's examples as read: uint8 images [N, H, W, C], int32 labels [N]."""

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    num_classes: int
    source: str  # e.g. "tfds array_record: /data/cifar10/3.0.2"


def first_line(err: BaseException) -> str:
    """``Type: first line of the message`` of an exception, for one-line errors."""
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0]}" if text else type(err).__name__


def _where(data_dir: str | None) -> str:
    return repr(data_dir) if data_dir else "the default tfds data_dir (~/tensorflow_datasets or $TFDS_DATA_DIR)"


def not_prepared(name: str, data_dir: str | None, err: Exception | None, *, downloaded: bool = False,
                 hint: str = "") -> DataUnavailableError:
    """The one-line error for a dataset that is not in ``data_dir``, with the recipes that put it there."""
    failed = " and could not be downloaded and built" if downloaded else ""
    cause = f" (tfds: {first_line(err)})" if err is not None else ""
    return DataUnavailableError(
        f"Dataset {name!r} is not prepared in {_where(data_dir)}{failed}{cause}. {hint}Building it with tfds needs "
        f"internet access and TensorFlow: on such a machine run `tfds build {name} --file_format=array_record "
        f"--data_dir DIR`, copy DIR here and pass `--data-dir DIR` (reading it needs tensorflow-datasets only, not "
        f"TensorFlow). To run without it, use `--dataset digits` (or `--dataset synthetic` for throughput runs)."
    )


def read_tfds(name: str, data_dir: str | None, download: bool = False, *, dataset: str | None = None,
              hint: str = "") -> Arrays:
    """Read the train and test splits of tfds dataset ``name`` (``NAME[/CONFIG][:VERSION]``).

    ``data_dir``: the tfds data directory (tfds' default when None). With
    ``download=False`` nothing touches the network and a missing build fails
    at once; ``download=True`` first lets tfds download and build it (needs
    internet and TensorFlow). ``dataset`` is the ``--dataset`` value that
    messages name (``tfds:NAME`` by default); ``hint`` is added to the
    not-prepared message.
    Raises ``DataUnavailableError`` (one line) for a missing or unreadable
    build, an unknown name, or a dataset that is not image classification.
    """
    import tensorflow_datasets as tfds  # Imported lazily: only tfds datasets need it.

    flag = f"--dataset {dataset or 'tfds:' + name}"
    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError as err:
        raise DataUnavailableError(f"{flag}: tfds has no dataset {name!r} ({first_line(err)[:200]}); "
                                   "`tfds.list_builders()` lists the names it knows") from None
    except Exception as err:  # A build tfds cannot read, a bad config or version, ...
        raise not_prepared(name, data_dir, err, hint=hint) from err
    image_key, label_key, num_classes = image_classification_keys(builder.info, flag)
    splits = ["train", _test_split(builder.info, flag)]
    if builder.is_prepared() and builder.info.file_format == tfds.core.FileFormat.TFRECORD and (
            tfds.core.FileFormat.ARRAY_RECORD not in builder.info.alternative_file_formats):
        return _read_tfrecord(builder, name, splits, image_key, label_key, num_classes)
    kwargs = dict(split=splits, data_dir=data_dir, builder_kwargs={"file_format": "array_record"})
    try:  # download=False never touches the network: missing files fail in milliseconds.
        split_sources = tfds.data_source(name, download=False, **kwargs)
    except Exception as err:
        if not download:
            raise not_prepared(name, data_dir, err, hint=hint) from err
        try:
            split_sources = tfds.data_source(name, download=True, **kwargs)
        except Exception as err2:
            raise not_prepared(name, data_dir, err2, downloaded=True, hint=hint) from err2
    (x_train, y_train), (x_test, y_test) = (_read_source(s, image_key, label_key) for s in split_sources)
    return Arrays(x_train, y_train, x_test, y_test, num_classes, f"tfds array_record: {builder.data_path}")


def image_classification_keys(info, flag: str) -> tuple[str, str, int]:
    """(image feature key, label feature key, number of classes) of a tfds ``DatasetInfo``.

    Needs a uint8 Image feature of one fixed shape and a ClassLabel feature
    (the supervised keys when the dataset names them); DataUnavailableError otherwise.
    """
    import tensorflow_datasets as tfds

    features = dict(info.features.items())
    keys = info.supervised_keys
    if keys and len(keys) == 2 and all(isinstance(k, str) for k in keys):
        image_key, label_key = keys
    else:  # no supervised keys: the one Image and the one ClassLabel feature
        images = [k for k, v in features.items() if isinstance(v, tfds.features.Image)]
        labels = [k for k, v in features.items() if isinstance(v, tfds.features.ClassLabel)]
        image_key, label_key = (images[0], labels[0]) if len(images) == len(labels) == 1 else (None, None)
    image, label = features.get(image_key), features.get(label_key)
    if not isinstance(image, tfds.features.Image) or not isinstance(label, tfds.features.ClassLabel):
        raise DataUnavailableError(
            f"{flag}: not an image-classification dataset: accepted datasets have one Image and one ClassLabel "
            f"feature, this one has {', '.join(f'{k} ({type(v).__name__})' for k, v in features.items())}")
    shape, dtype = tuple(image.shape), np.dtype(image.np_dtype)
    if None in shape or len(shape) != 3 or dtype != np.uint8:
        raise DataUnavailableError(f"{flag}: its images are {dtype} of shape {shape}; accepted are uint8 images of "
                                   "one fixed shape (height, width, channels)")
    return image_key, label_key, int(label.num_classes)


def _test_split(info, flag: str) -> str:
    """The build's test split: ``test``, else ``validation`` (``test`` when tfds does not list splits)."""
    names = list(info.splits or ())
    if not names:
        return "test"
    if "train" not in names or not any(s in names for s in _TEST_SPLITS):
        raise DataUnavailableError(f"{flag}: needs a train split and a test (or validation) split; this build has "
                                   f"{', '.join(names)}")
    return next(s for s in _TEST_SPLITS if s in names)


def _read_source(source, image_key: str = "image", label_key: str = "label") -> tuple[np.ndarray, np.ndarray]:
    """All examples of a tfds data source -> (uint8 [N, H, W, C], int32 [N])."""
    n = len(source)
    if n == 0:
        raise DataUnavailableError(f"tfds data source {source!r} is empty")
    images = labels = None
    for start in range(0, n, _READ_CHUNK):
        keys = list(range(start, min(n, start + _READ_CHUNK)))
        examples = source.__getitems__(keys)
        chunk = np.stack([np.asarray(ex[image_key], dtype=np.uint8) for ex in examples])
        if images is None:
            images = np.empty((n, *chunk.shape[1:]), np.uint8)
            labels = np.empty((n,), np.int32)
        images[start : start + len(keys)] = chunk
        labels[start : start + len(keys)] = [int(ex[label_key]) for ex in examples]
    return images, labels


def _read_tfrecord(builder, name: str, splits: list, image_key: str, label_key: str, num_classes: int) -> Arrays:
    """A tfds build in tfrecord format, read through tf.data (needs TensorFlow), shards in file order."""
    try:
        importlib.import_module("tensorflow")  # only to know whether tf.data can run
    except ImportError:
        raise DataUnavailableError(
            f"--data-dir: {builder.data_path} holds {name} as tfrecord files, which only TensorFlow can read, and "
            f"TensorFlow is not installed: either `pip install tensorflow`, or rebuild it in the format read without "
            f"TensorFlow (`tfds build {name} --file_format=array_record --data_dir DIR`, then `--data-dir DIR`)"
        ) from None
    import tensorflow_datasets as tfds

    read_config = tfds.ReadConfig(interleave_cycle_length=1)  # one shard after another: a fixed order
    out = []
    for split in splits:
        ds = builder.as_dataset(split=split, shuffle_files=False, read_config=read_config)
        parts = [(np.asarray(b[image_key], np.uint8), np.asarray(b[label_key], np.int32))
                 for b in tfds.as_numpy(ds.batch(_READ_CHUNK))]
        if not parts:
            raise DataUnavailableError(f"--data-dir: the {split} split of {builder.data_path} is empty")
        out.append((np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])))
    (x_train, y_train), (x_test, y_test) = out
    return Arrays(x_train, y_train, x_test, y_test, num_classes, f"tfds tfrecord: {builder.data_path}")


def read_digits() -> Arrays:
    """scikit-learn's 8x8x1 digits, 0..16 rescaled to uint8 0..255; stratified 80/20 split (1437 / 360)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = np.rint(digits.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
    labels = digits.target.astype(np.int32)
    train, test = map(np.sort, train_test_split(np.arange(len(labels)), test_size=0.2, stratify=labels, random_state=0))
    return Arrays(images[train], labels[train], images[test], labels[test], 10, "scikit-learn digits")


def read_synthetic(size: int) -> Arrays:
    """Uniform random uint8 32x32x3 images with random labels in 10 classes, ``size`` train and
    ``max(1, size // 5)`` test examples, always the same (fixed seed)."""
    if size < 1:
        raise ValueError(f"synthetic_size must be >= 1, got {size}")
    rng = np.random.default_rng(_SYNTHETIC_SEED)
    n_test = max(1, size // 5)
    x_train = rng.integers(0, 256, (size, 32, 32, 3), dtype=np.uint8)
    y_train = rng.integers(0, 10, size).astype(np.int32)
    x_test = rng.integers(0, 256, (n_test, 32, 32, 3), dtype=np.uint8)
    y_test = rng.integers(0, 10, n_test).astype(np.int32)
    return Arrays(x_train, y_train, x_test, y_test, 10, f"synthetic (seed {_SYNTHETIC_SEED}, {size} examples)")


def check(arrays: Arrays, name: str) -> Arrays:
    """Refuse arrays a model cannot train on: wrong dtypes or ranks, train / test shapes that differ,
    empty splits or labels outside 0..num_classes-1 (one-line DataUnavailableError)."""
    x_train, y_train, x_test, y_test, num_classes, source = arrays
    for split, x, y in (("train", x_train, y_train), ("test", x_test, y_test)):
        problem = None
        if x.dtype != np.uint8 or x.ndim != 4 or y.ndim != 1 or len(x) != len(y):
            problem = f"images {x.dtype} {x.shape} and labels {y.shape}; expected uint8 [N, H, W, C] and [N]"
        elif len(y) == 0:
            problem = "no examples"
        elif x.shape[1:] != x_train.shape[1:]:
            problem = f"images of shape {x.shape[1:]}, the train split {x_train.shape[1:]}"
        elif y.min() < 0 or y.max() >= num_classes:
            problem = f"labels in {y.min()}..{y.max()}, outside 0..{num_classes - 1}"
        if problem:
            raise DataUnavailableError(f"--dataset {name}: the {split} split read from {source} has {problem}")
    return arrays._replace(train_labels=y_train.astype(np.int32), test_labels=y_test.astype(np.int32))
