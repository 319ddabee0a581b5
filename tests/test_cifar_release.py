"""Tests for experiments/cifar_release.py: CIFAR's python release in every layout
researchers have it in, end to end through the CLI, and damaged copies refused
in one line before anything is compiled or written."""

import dataclasses
import io
import json
import os
import pickle
import struct
import tarfile

import numpy as np
import pytest

from experiments import cifar, cifar_release, data, resume, results, translate
from experiments.config import ConfigError
from experiments.flags import parser
from experiments.setup import prepare

TRAIN, TEST = {"cifar10": 300, "cifar100": 300}, {"cifar10": 60, "cifar100": 100}


class Py2Pickler(pickle._Pickler):
    """Writes bytes as Python 2 ``str`` (BINSTRING), as the release's 2009 pickles hold keys, strings and
    the arrays' raw data; numpy names are turned into numpy 1's (``numpy.core.multiarray``) in ``dumps``."""

    dispatch = dict(pickle._Pickler.dispatch)

    def save_py2_str(self, obj):
        head = pickle.SHORT_BINSTRING + bytes([len(obj)]) if len(obj) < 256 else pickle.BINSTRING + struct.pack(
            "<i", len(obj))
        self.write(head + obj)
        self.memoize(obj)

    dispatch[bytes] = save_py2_str


def dumps(obj, py2=True) -> bytes:
    if not py2:
        return pickle.dumps({k.decode(): v for k, v in obj.items()}, protocol=4)
    buf = io.BytesIO()
    Py2Pickler(buf, protocol=2).dump(obj)
    return buf.getvalue().replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n")


def write_release(root, name, *, tarball=False, py2=True, seed=0, edit=None):
    """Write a small release of ``name`` in its official layout under ``root``.

    Returns (path given to --data-dir's parent: the folder or the tarball,
    expected (x_train, y_train, x_test, y_test) in HWC). ``edit(file, batch)``
    may change a batch dict before it is written (for damaged copies).
    """
    layout = cifar_release.LAYOUTS[name]
    rng = np.random.default_rng(seed)
    folder = os.path.join(root, layout.folder)
    os.makedirs(folder)
    files = {}
    if name == "cifar10":
        per = TRAIN[name] // 5
        files["batches.meta"] = {b"num_cases_per_batch": per, b"label_names": [b"c%d" % i for i in range(10)],
                                 b"num_vis": 3072}
        splits = [(f"data_batch_{i}", per) for i in range(1, 6)] + [("test_batch", TEST[name])]
    else:
        files["meta"] = {b"fine_label_names": [b"f%d" % i for i in range(100)],
                         b"coarse_label_names": [b"k%d" % i for i in range(20)]}
        splits = [("train", TRAIN[name]), ("test", TEST[name])]
    for fname, n in splits:
        batch = {b"batch_label": fname.encode(), b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                 b"filenames": [b"img%d.png" % i for i in range(n)]}
        if name == "cifar10":
            batch[b"labels"] = [int(v) for v in rng.integers(0, 10, n)]
        else:
            batch[b"fine_labels"] = [int(v) for v in rng.integers(0, 100, n)]
            batch[b"coarse_labels"] = [int(v) for v in rng.integers(0, 20, n)]
        files[fname] = batch
    expected = []
    for group in ([f for f, _ in splits[:-1]], [splits[-1][0]]):
        x = np.concatenate([files[f][b"data"] for f in group]).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
        y = np.concatenate([files[f][b"labels" if name == "cifar10" else b"fine_labels"] for f in group])
        expected += [x, y]
    for fname, obj in files.items():
        blob = dumps(obj, py2) if edit is None else edit(fname, obj)
        with open(os.path.join(folder, fname), "wb") as f:
            f.write(blob if blob is not None else dumps(obj, py2))
    if not tarball:
        return folder, expected
    path = os.path.join(root, layout.tarballs[0])
    with tarfile.open(path, "w:gz") as tar:
        tar.add(folder, arcname=layout.folder)
    for fname in os.listdir(folder):
        os.remove(os.path.join(folder, fname))
    os.rmdir(folder)
    return path, expected


@pytest.fixture
def small(monkeypatch):
    """Releases of a few hundred examples: the count check expects the test's sizes."""
    monkeypatch.setattr(cifar_release, "SIZES", {n: (TRAIN[n], TEST[n]) for n in TRAIN})


def assert_same(ds, expected):
    x_train, y_train, x_test, y_test = expected
    assert ds.train_images.dtype == np.uint8 and ds.train_labels.dtype == np.int32
    assert ds.train_images.shape == (len(y_train), 32, 32, 3) and ds.test_images.shape == (len(y_test), 32, 32, 3)
    np.testing.assert_array_equal(ds.train_images, x_train)
    np.testing.assert_array_equal(ds.train_labels, y_train)
    np.testing.assert_array_equal(ds.test_images, x_test)
    np.testing.assert_array_equal(ds.test_labels, y_test)


# ----------------------------------------------------------------------------- the accepted layouts


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
@pytest.mark.parametrize("where", ["holds-folder", "is-folder", "holds-tarball", "is-tarball", "holds-both"])
def test_every_layout_reads_the_same_examples(small, tmp_path, name, where):
    path, expected = write_release(str(tmp_path), name, tarball="tarball" in where)
    if where == "holds-both":  # torchvision's root: the tarball and the folder it extracted
        write_release(str(tmp_path / "t"), name, tarball=True)
        os.rename(tmp_path / "t" / cifar_release.LAYOUTS[name].tarballs[0],
                  tmp_path / cifar_release.LAYOUTS[name].tarballs[0])
    data_dir = path if where.startswith("is-") else str(tmp_path)
    ds = data.load(name, data_dir)
    assert_same(ds, expected)
    assert ds.num_classes == {"cifar10": 10, "cifar100": 100}[name] and ds.augment == "crop-flip"
    assert ds.source == f"cifar python release: {path}"  # holds-both: the folder wins over the tarball beside it
    assert (ds.num_train, ds.num_test) == (TRAIN[name], TEST[name])
    if "tarball" in where:  # read in place: nothing was extracted
        assert os.listdir(tmp_path) == [cifar_release.LAYOUTS[name].tarballs[0]]


def test_keras_tarball_name_and_python3_pickles(small, tmp_path):
    path, expected = write_release(str(tmp_path), "cifar10", tarball=True, py2=False)
    keras = tmp_path / "cifar-10-batches-py.tar.gz"  # keras.datasets.cifar10 names its download so
    os.rename(path, keras)
    assert_same(data.load("cifar10", str(tmp_path)), expected)


def test_channel_major_rows_become_hwc_pixels(small, tmp_path):
    """data[n, c*1024 + y*32 + x] is pixel (y, x) of channel c: red plane, green plane, blue plane."""
    folder, _ = write_release(str(tmp_path), "cifar10")
    with open(os.path.join(folder, "data_batch_1"), "rb") as f:
        raw = pickle.load(f, encoding="latin1")["data"]
    ds = data.load("cifar10", folder)
    for n, y, x, c in [(0, 0, 0, 0), (3, 5, 7, 1), (59, 31, 30, 2), (11, 0, 31, 2)]:
        assert ds.train_images[n, y, x, c] == raw[n, c * 1024 + y * 32 + x]


def test_tfds_build_in_the_folder_comes_first(small, tmp_path):
    write_release(str(tmp_path), "cifar10", tarball=True)
    (tmp_path / "cifar10").mkdir()  # a tfds data_dir: the build wins, as before the release was read
    assert cifar_release.locate("cifar10", str(tmp_path)) is None
    assert cifar_release.locate("cifar10", str(tmp_path / "nowhere")) is None
    assert cifar_release.locate("cifar100", str(tmp_path)) is None  # a cifar10 tarball is not cifar100's


def cli(argv, out):
    return cifar.main(argv + ["--workers", "2", "--batch-size", "8", "--epochs", "1", "--avg-period", "2",
                              "--model", "mlp", "--out", str(out), "--quiet", "--no-plots"])


@pytest.mark.parametrize("name,tarball", [("cifar10", True), ("cifar10", False), ("cifar100", True),
                                          ("cifar100", False)])
def test_cli_trains_on_the_release(small, tmp_path, name, tarball):
    path, _ = write_release(str(tmp_path / "data"), name, tarball=tarball)
    out = tmp_path / "out"
    assert cli(["--dataset", name, "--data-dir", str(tmp_path / "data")], out) == 0
    (run,) = results.finished_runs(str(out))
    assert run.summary["steps_per_epoch"] == TRAIN[name] // 16 and len(run.metrics) == TRAIN[name] // 16
    assert run.summary["config"]["dataset"] == name and run.summary["config"]["augment"] == "crop-flip"
    assert 0.0 <= run.summary["test_accuracy"] <= 1.0 and np.isfinite(run.summary["final_train_loss"])


def test_a_resumed_run_keeps_the_former_default_it_was_saved_with(small, tmp_path, capsys):
    # Runs saved while every model of a data set took its lr trained CIFAR's mlp at 0.1; today's default is 0.02.
    write_release(str(tmp_path / "data"), "cifar10")
    argv = ["--dataset", "cifar10", "--data-dir", str(tmp_path / "data"), "--model", "mlp", "--workers", "2",
            "--batch-size", "8", "--epochs", "1", "--avg-period", "2", "--out", str(tmp_path / "out")]
    (config,), options = translate.from_args(parser().parse_args(argv))
    assert config.lr == 0.02
    saved = {**config.to_dict(), "lr": 0.1}
    assert resume.config_differences(saved, config) == ["lr: 0.1 -> 0.02"]
    assert resume.former_defaults(saved, config) == {"lr": 0.1}
    assert resume.former_defaults({**saved, "lr": 0.3}, config) == {}  # not the former default: a flag gave it
    assert resume.former_defaults(saved, config.replace(lr=0.05)) == {}  # a flag gives another lr now
    assert resume.former_defaults({**saved, "model": "cnn"}, config) == {}  # another run
    run_dir = tmp_path / "out" / results.run_name(config.label, config.seed)
    run_dir.mkdir(parents=True)
    (run_dir / results.CONFIG).write_text(json.dumps(saved))
    resuming = dataclasses.replace(options, resume=True)
    capsys.readouterr()
    setup = prepare(config, options=resuming)
    assert setup.config.lr == 0.1 and float(setup.lr_fn(0)) == 0.1
    assert ("--resume: adpsgd-seed0 continues with lr 0.1, the default of mlp on cifar10 when it was saved"
            in capsys.readouterr().err)
    assert prepare(config.replace(seed=1), options=resuming).config.lr == 0.02  # no saved run: today's default
    with pytest.raises(ConfigError, match=r"differs from the checkpointed run in lr: 0.1 -> 0.05"):
        prepare(config.replace(lr=0.05), options=resuming)


# ----------------------------------------------------------------------------- damaged copies


def drop(fname):
    return lambda f, batch: b"" if f == fname else None


def change(fname, key, fn):
    def edit(f, batch):
        if f == fname:
            batch = {**batch, key: fn(batch[key])}
        return dumps(batch)
    return edit


def truncated(fname):
    return lambda f, batch: dumps(batch)[: len(dumps(batch)) // 2] if f == fname else None


class Evil:
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


DAMAGED = {
    # id: (dataset, tarball, edit, what the one line must name)
    "missing-batch": ("cifar10", False, "remove data_batch_3", "lacks data_batch_3"),
    "missing-batch-in-tarball": ("cifar10", True, "remove data_batch_3", "lacks cifar-10-batches-py/data_batch_3"),
    "truncated-pickle": ("cifar10", False, truncated("data_batch_2"), "data_batch_2 is damaged"),
    "truncated-pickle-in-tarball": ("cifar100", True, truncated("train"), "cifar-100-python/train is damaged"),
    "empty-file": ("cifar100", False, drop("test"), "test is damaged"),
    "wrong-width": ("cifar10", False, change("data_batch_4", b"data", lambda x: x[:, :3071]), "uint8 [n, 3072]"),
    "wrong-dtype": ("cifar100", False, change("train", b"data", lambda x: x.astype(np.int32)), "int32"),
    "flat-data": ("cifar10", False, change("test_batch", b"data", lambda x: x.ravel()), "test_batch"),
    "label-10": ("cifar10", False, change("data_batch_1", b"labels", lambda y: y[:-1] + [10]), "outside 0..9"),
    "label-negative": ("cifar10", False, change("test_batch", b"labels", lambda y: [-1] + y[1:]), "outside 0..9"),
    "fine-label-100": ("cifar100", False, change("test", b"fine_labels", lambda y: y[:-1] + [100]), "outside 0..99"),
    "coarse-label-20": ("cifar100", False, change("train", b"coarse_labels", lambda y: [20] + y[1:]), "outside 0..19"),
    "labels-short": ("cifar10", False, change("data_batch_5", b"labels", lambda y: y[:-1]), "expected 60 integers"),
    "labels-floats": ("cifar100", False, change("train", b"fine_labels", lambda y: [0.5] * len(y)), "integers"),
    "batch-size-vs-meta": ("cifar10", False, change("batches.meta", b"num_cases_per_batch", lambda n: n + 1),
                           "batches.meta says 61"),
    "meta-class-names": ("cifar100", False, change("meta", b"fine_label_names", lambda n: n[:10]), "100 class names"),
    "not-a-dict": ("cifar10", False, lambda f, b: pickle.dumps([1, 2]) if f == "data_batch_1" else None,
                   "not a CIFAR batch"),
    "code-in-pickle": ("cifar10", False, lambda f, b: pickle.dumps(Evil()) if f == "data_batch_1" else None,
                       "posix.system"),
}


@pytest.mark.parametrize("case", list(DAMAGED), ids=list(DAMAGED))
def test_damaged_copies_refused_in_one_line_before_anything_runs(small, tmp_path, capsys, monkeypatch, case):
    name, tarball, edit, expected = DAMAGED[case]
    root = tmp_path / "data"
    monkeypatch.chdir(tmp_path)
    if edit == "remove data_batch_3":
        path, _ = write_release(str(root), name)
        os.remove(os.path.join(path, "data_batch_3"))
        if tarball:
            with tarfile.open(root / "cifar-10-python.tar.gz", "w:gz") as tar:
                tar.add(path, arcname="cifar-10-batches-py")
            for f in os.listdir(path):
                os.remove(os.path.join(path, f))
            os.rmdir(path)
    else:
        write_release(str(root), name, tarball=tarball, edit=edit)
    out = tmp_path / "out"
    assert cli(["--dataset", name, "--data-dir", str(root)], out) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --data-dir: ") and expected in err, err
    assert "\n" not in err and "Traceback" not in err
    assert not out.exists() and not (tmp_path / "PWNED").exists()


def test_counts_checked_against_the_official_release(tmp_path, capsys):
    """Without the test's smaller SIZES, a few hundred examples are a partial copy."""
    write_release(str(tmp_path / "data"), "cifar100")
    assert cli(["--dataset", "cifar100", "--data-dir", str(tmp_path / "data")], tmp_path / "out") == 2
    err = capsys.readouterr().err.strip()
    assert "hold 300 examples" in err and "python release has 50000" in err and "\n" not in err
    assert cifar_release.SIZES == {"cifar10": (50_000, 10_000), "cifar100": (50_000, 10_000)}


@pytest.mark.parametrize("content", ["other-tarball", "not-a-tarball", "empty", "partial-download"])
def test_a_tarball_of_something_else_is_refused(small, tmp_path, capsys, content):
    root = tmp_path / "data"
    root.mkdir()
    path = root / "cifar-10-python.tar.gz"
    if content == "partial-download":
        whole, _ = write_release(str(root), "cifar10", tarball=True)
        blob = open(whole, "rb").read()
        path.write_bytes(blob[: len(blob) // 2])
    elif content == "other-tarball":
        (tmp_path / "notes.txt").write_text("not cifar")
        with tarfile.open(path, "w:gz") as tar:
            tar.add(tmp_path / "notes.txt", arcname="cifar-100-python/notes.txt")
    else:
        path.write_bytes(b"" if content == "empty" else os.urandom(4096))
    for data_dir in (root, path):  # the folder holding it, and the tarball itself
        assert cli(["--dataset", "cifar10", "--data-dir", str(data_dir)], tmp_path / "out") == 2
        err = capsys.readouterr().err.strip()
        expected = "is not CIFAR-10's python release" if content == "other-tarball" else "is not a readable tar archive"
        assert err.startswith(f"error: --data-dir: {path}") and expected in err and "\n" not in err, err
    assert not (tmp_path / "out").exists()
