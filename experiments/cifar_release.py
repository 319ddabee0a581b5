"""CIFAR-10 / CIFAR-100 from the python release its authors publish, read
without TensorFlow or torch.

https://www.cs.toronto.edu/~kriz/cifar.html publishes ``cifar-10-python.tar.gz``
(folder ``cifar-10-batches-py/``: ``data_batch_1`` .. ``data_batch_5``,
``test_batch``, ``batches.meta``) and ``cifar-100-python.tar.gz`` (folder
``cifar-100-python/``: ``train``, ``test``, ``meta``); torchvision leaves the
tarball and the folder in its root, keras the folder (its tarball is named
``cifar-10-batches-py.tar.gz``). Each batch is a pickled dict: ``data``
uint8 [n, 3072] (per image the red, green, then blue 32x32 plane, rows
first), ``labels`` (CIFAR-10) or ``fine_labels`` / ``coarse_labels``
(CIFAR-100) of n ints.

``locate`` finds the release in a ``--data-dir``; ``read`` checks every file
strictly and returns ``sources.Arrays``. A missing or damaged file, wrong
shapes, dtypes or counts, labels out of range, or a tarball of something else
raise ``DataUnavailableError`` in one line naming the file. The pickles are
read by an unpickler that builds only numpy arrays, lists, ints and strings:
a crafted file cannot run code.

Counts are checked against the release's own: 50,000 train / 10,000 test
(``SIZES``), and for CIFAR-10 every batch against ``num_cases_per_batch`` of
``batches.meta``. Tests that write a few hundred examples shrink ``SIZES``.
"""

from __future__ import annotations

import codecs
import io
import os
import pickle
import tarfile
import zlib
from typing import NamedTuple

import numpy as np

from experiments.sources import Arrays, DataUnavailableError, first_line

HOME = "https://www.cs.toronto.edu/~kriz/cifar.html"
SIDE, CHANNELS = 32, 3
PIXELS = SIDE * SIDE * CHANNELS  # 3072 bytes an image


class Layout(NamedTuple):
    """The files of one python release and the keys inside them."""

    title: str
    folder: str
    tarballs: tuple  # the official name first
    train: tuple
    test: tuple
    meta: str
    label_key: str
    names_key: str  # the meta file's list of class names
    num_classes: int
    extra_labels: tuple = ()  # (key, number of classes) of other label lists each batch holds


LAYOUTS = {
    "cifar10": Layout("CIFAR-10", "cifar-10-batches-py", ("cifar-10-python.tar.gz", "cifar-10-batches-py.tar.gz"),
                      tuple(f"data_batch_{i}" for i in range(1, 6)), ("test_batch",), "batches.meta", "labels",
                      "label_names", 10),
    "cifar100": Layout("CIFAR-100", "cifar-100-python", ("cifar-100-python.tar.gz",), ("train",), ("test",), "meta",
                       "fine_labels", "fine_label_names", 100, (("coarse_labels", 20),)),
}
SIZES = {"cifar10": (50_000, 10_000), "cifar100": (50_000, 10_000)}  # (train, test) examples of each release


def locate(name: str, data_dir: str | None) -> str | None:
    """The python release of ``name`` in ``data_dir``: its folder or tarball, or None.

    ``data_dir`` may be the tarball or the extracted folder itself, or hold
    either (the folder is preferred). A tfds build of ``name`` in ``data_dir``
    (a ``data_dir/name`` folder) wins over both, as it did before the python
    release was read. A folder counts as the release when it has the
    release's folder name or holds its meta file.
    """
    if not data_dir or name not in LAYOUTS:
        return None
    layout, root = LAYOUTS[name], os.path.abspath(os.path.expanduser(data_dir))
    if os.path.isfile(root):
        return root
    if not os.path.isdir(root) or os.path.isdir(os.path.join(root, name)):
        return None
    if os.path.basename(root) == layout.folder or os.path.isfile(os.path.join(root, layout.meta)):
        return root
    folder = os.path.join(root, layout.folder)
    if os.path.isdir(folder):
        return folder
    return next((os.path.join(root, t) for t in layout.tarballs if os.path.isfile(os.path.join(root, t))), None)


def hint(name: str) -> str:
    """Where ``--data-dir`` could point instead, for the message that says ``name`` was not found."""
    layout = LAYOUTS[name]
    return (f"CIFAR's python release is read too: pass `--data-dir` the folder holding {layout.tarballs[0]} or "
            f"{layout.folder}/ (or that tarball or folder itself). ")


def read(name: str, path: str) -> Arrays:
    """Read and check the release of ``name`` at ``path`` (a folder or tarball from ``locate``).

    Returns ``Arrays`` with images uint8 [N, 32, 32, 3] (HWC) and int32
    labels, train batches in file order. Raises DataUnavailableError.
    """
    layout = LAYOUTS[name]
    files = layout.train + layout.test + (layout.meta,)
    if os.path.isfile(path):
        blobs, where = _read_tarball(layout, path, files), lambda f: f"{path}:{layout.folder}/{f}"
    else:
        blobs, where = _read_folder(layout, path, files), lambda f: os.path.join(path, f)
    meta = _unpickle(blobs[layout.meta], where(layout.meta))
    _check_meta(layout, meta, where(layout.meta))
    per_batch = meta.get("num_cases_per_batch")
    splits = []
    for split, names, expected in (("train", layout.train, SIZES[name][0]), ("test", layout.test, SIZES[name][1])):
        # pop: each file's bytes are dropped once its arrays are built
        batches = [_check_batch(layout, _unpickle(blobs.pop(f), where(f)), where(f), per_batch) for f in names]
        count = sum(len(y) for _, y in batches)
        if count != expected:
            raise DataUnavailableError(
                f"--data-dir: the {split} batches of {path} ({', '.join(names)}) hold {count} examples; "
                f"{layout.title}'s python release has {expected}: a partial or altered copy? Re-download it from {HOME}")
        images = np.concatenate([x for x, _ in batches]).reshape(-1, CHANNELS, SIDE, SIDE).transpose(0, 2, 3, 1)
        splits.append((np.ascontiguousarray(images), np.concatenate([y for _, y in batches])))
    (x_train, y_train), (x_test, y_test) = splits
    return Arrays(x_train, y_train, x_test, y_test, layout.num_classes, f"cifar python release: {path}")


def _read_folder(layout: Layout, folder: str, files: tuple) -> dict:
    missing = [f for f in files if not os.path.isfile(os.path.join(folder, f))]
    if missing:
        raise DataUnavailableError(
            f"--data-dir: {folder} lacks {', '.join(missing)} ({layout.title}'s python release has "
            f"{', '.join(files)}); extract {layout.tarballs[0]} from {HOME} again")
    blobs = {}
    for f in files:
        with open(os.path.join(folder, f), "rb") as fh:
            blobs[f] = fh.read()
    return blobs


def _read_tarball(layout: Layout, path: str, files: tuple) -> dict:
    """The release's files from the tarball, read in one pass without extracting anything."""
    wanted, blobs = {f"{layout.folder}/{f}": f for f in files}, {}
    try:
        with tarfile.open(path, "r:*") as tar:
            for member in tar:
                key = wanted.get(member.name[2:] if member.name.startswith("./") else member.name)
                if key is not None and member.isfile():
                    blobs[key] = tar.extractfile(member).read()
    except (tarfile.TarError, EOFError, OSError, zlib.error) as err:
        raise DataUnavailableError(f"--data-dir: {path} is not a readable tar archive ({first_line(err)}); "
                                   f"download {layout.tarballs[0]} from {HOME} again") from None
    if not blobs:
        raise DataUnavailableError(
            f"--data-dir: {path} is not {layout.title}'s python release: it holds none of "
            f"{layout.folder}/{{{','.join(files)}}}; the release is {layout.tarballs[0]} from {HOME}")
    missing = [f for f in files if f not in blobs]
    if missing:
        raise DataUnavailableError(f"--data-dir: {path} lacks {', '.join(f'{layout.folder}/{f}' for f in missing)}: "
                                   f"a partial download? Download {layout.tarballs[0]} from {HOME} again")
    return blobs


class _BatchUnpickler(pickle.Unpickler):
    """Builds only what CIFAR batches hold: numpy arrays (and scalars), containers, numbers, strings."""

    _GLOBALS = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): codecs.encode,  # bytes pickled by Python 3 at protocol 2
        # numpy's array and scalar constructors, under numpy 1's (the release's) and numpy 2's module names.
        **{(m, "_reconstruct"): np.array(0).__reduce__()[0] for m in ("numpy.core.multiarray", "numpy._core.multiarray")},
        **{(m, "scalar"): np.int64(0).__reduce__()[0] for m in ("numpy.core.multiarray", "numpy._core.multiarray")},
    }

    def find_class(self, module, name):
        if (module, name) in self._GLOBALS:
            return self._GLOBALS[module, name]
        raise pickle.UnpicklingError(f"refers to {module}.{name}, which no CIFAR batch holds")


def _unpickle(blob: bytes, where: str) -> dict:
    """A batch's dict with str keys (the release's Python 2 pickles give str or bytes keys)."""
    try:
        obj = _BatchUnpickler(io.BytesIO(blob), encoding="latin1").load()
    except Exception as err:  # EOFError, UnpicklingError, ValueError, ... from a damaged file
        raise DataUnavailableError(f"--data-dir: {where} is damaged: it does not unpickle as a CIFAR batch "
                                   f"({first_line(err)[:200]}); download the release from {HOME} again") from None
    if not isinstance(obj, dict):
        raise DataUnavailableError(f"--data-dir: {where} is not a CIFAR batch: it holds a {type(obj).__name__}, "
                                   "not a dict")
    return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in obj.items()}


def _check_meta(layout: Layout, meta: dict, where: str) -> None:
    names = meta.get(layout.names_key)
    if not isinstance(names, (list, tuple)) or len(names) != layout.num_classes:
        raise DataUnavailableError(f"--data-dir: {where} is not {layout.title}'s meta file: its {layout.names_key!r} "
                                   f"should list {layout.num_classes} class names")
    per_batch = meta.get("num_cases_per_batch")
    if layout.meta == "batches.meta" and (not isinstance(per_batch, int) or per_batch < 1):
        raise DataUnavailableError(f"--data-dir: {where} lacks a positive 'num_cases_per_batch'")


def _check_batch(layout: Layout, batch: dict, where: str, per_batch: int | None) -> tuple[np.ndarray, np.ndarray]:
    """(data uint8 [n, 3072], labels int32 [n]) of one batch, or DataUnavailableError naming what is wrong."""
    def refuse(problem: str):
        raise DataUnavailableError(f"--data-dir: {where} is not a valid {layout.title} batch: {problem}")

    x = batch.get("data")
    if not isinstance(x, np.ndarray):
        refuse(f"no 'data' array (keys: {', '.join(map(str, batch))})")
    if x.dtype != np.uint8 or x.ndim != 2 or x.shape[1] != PIXELS:
        refuse(f"'data' is {x.dtype} {list(x.shape)}, expected uint8 [n, {PIXELS}]")
    if per_batch is not None and len(x) != per_batch:
        refuse(f"{len(x)} images, but batches.meta says {per_batch} a batch")
    labels = {}
    for key, classes in ((layout.label_key, layout.num_classes), *layout.extra_labels):
        if key not in batch:
            refuse(f"no {key!r} list")
        y = np.asarray(batch[key])
        if y.ndim != 1 or len(y) != len(x) or (len(y) and not np.issubdtype(y.dtype, np.integer)):
            refuse(f"{key!r} is {y.dtype} {list(y.shape)}, expected {len(x)} integers (one per image)")
        if len(y) and (y.min() < 0 or y.max() >= classes):
            refuse(f"{key!r} holds labels in {y.min()}..{y.max()}, outside 0..{classes - 1}")
        labels[key] = y
    return x, labels[layout.label_key].astype(np.int32)
