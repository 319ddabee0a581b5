"""Tests for experiments/sources.py through ``data.load`` and the CLI: tfds builds
(array_record, tfrecord, any image-classification dataset by name), digits,
synthetic, and the one-line refusals."""

import importlib
import io
import json
import os
import socket
import struct
import sys
import types

import numpy as np
import pytest

from experiments import cifar, data, results, sources


def tensorflow_importable():
    try:
        importlib.import_module("tensorflow")
        return True
    except ImportError:
        return False


@pytest.fixture
def fixed_mock_getitems(monkeypatch):
    """tfds 4.9.10's mock sets ``__getitems__`` to a functools.partial on a MagicMock, which is
    not bound like the magic ``__getitem__`` is, so it is called without ``self``; shim that."""
    mocking = importlib.import_module("tensorflow_datasets.testing.mocking")
    original = mocking._getitems

    def getitems(*args, generator, serialized=False):
        return original(None, args[-1], generator=generator, serialized=serialized)

    monkeypatch.setattr(mocking, "_getitems", getitems)


@pytest.fixture
def mock_tfds(fixed_mock_getitems):
    """tfds mocked from the datasets' code: 96 random examples a split, shapes and classes from the metadata."""
    import tensorflow_datasets as tfds

    with tfds.testing.mock_data(num_examples=96, policy=tfds.testing.MockPolicy.USE_CODE):
        yield


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    return err


# ----------------------------------------------------------------------------- tfds: CIFAR


@pytest.mark.parametrize("name,num_classes", [("cifar10", 10), ("cifar100", 100)])
def test_load_cifar_through_tfds_mock(name, num_classes, fixed_mock_getitems, monkeypatch, tmp_path):
    import tensorflow_datasets as tfds

    monkeypatch.setattr(sources, "_READ_CHUNK", 8)  # 37 examples: 5 chunks, the last partial.
    with tfds.testing.mock_data(num_examples=37, policy=tfds.testing.MockPolicy.USE_CODE):
        ds = data.load(name, data_dir=str(tmp_path))
        source = tfds.data_source(name, split="train", data_dir=str(tmp_path), download=False)
        expected = np.stack([source[i]["image"] for i in range(37)])
        expected_labels = np.array([source[i]["label"] for i in range(37)])
    assert ds.name == name and ds.num_classes == num_classes and ds.augment == "crop-flip"
    assert ds.source.startswith("tfds array_record: ") and (ds.num_train, ds.num_test) == (37, 37)
    assert ds.train_images.shape == (37, 32, 32, 3) and ds.test_images.shape == (37, 32, 32, 3)
    assert ds.train_images.dtype == np.uint8 and ds.test_images.dtype == np.uint8
    assert ds.train_labels.dtype == np.int32 and ds.test_labels.dtype == np.int32
    assert ds.train_labels.min() >= 0 and ds.train_labels.max() < num_classes
    np.testing.assert_array_equal(ds.train_images, expected)  # Order survives chunked reads.
    np.testing.assert_array_equal(ds.train_labels, expected_labels)
    assert ds.mean.shape == (3,) and ds.std.shape == (3,)
    assert ds.mean.dtype == np.float32 and ds.std.dtype == np.float32
    pixels = ds.train_images.reshape(-1, 3).astype(np.float64)
    np.testing.assert_allclose(ds.mean, pixels.mean(0), rtol=1e-5)
    np.testing.assert_allclose(ds.std, pixels.std(0), rtol=1e-4)
    # Mock pixels are uniform on 0..255: mean ~127.5, std ~73.9.
    assert np.all(np.abs(ds.mean - 127.5) < 5) and np.all(np.abs(ds.std - 73.9) < 5)


def build_fake_cifar10(monkeypatch, tmp_path, file_format):
    """Build a tiny real cifar10 with tfds' own builder (download and the TF-only steps patched).

    Returns (tfds data_dir, {raw file name: records uint8 [n, 3073]}).
    """
    import tensorflow_datasets as tfds

    try:
        importlib.import_module("importlib_resources")
    except ImportError:
        monkeypatch.setitem(sys.modules, "importlib_resources", importlib.import_module("importlib.resources"))
    from PIL import Image
    from tensorflow_datasets.core.features import image_feature
    from tensorflow_datasets.image_classification import cifar as tfds_cifar

    raw_dir = tmp_path / "raw" / "cifar-10-batches-bin"
    raw_dir.mkdir(parents=True)
    rng = np.random.default_rng(1)
    written = {}
    for fname, n in [(f"data_batch_{i}.bin", 4) for i in range(1, 6)] + [("test_batch.bin", 6)]:
        records = rng.integers(0, 256, (n, 3073), dtype=np.uint8)
        records[:, 0] %= 10
        records.tofile(raw_dir / fname)
        written[fname] = records
    (raw_dir / "batches.meta.txt").write_text("\n".join(f"class{i}" for i in range(10)))

    def read_binary(path, num_labels):
        for r in np.fromfile(path, np.uint8).reshape(-1, 3073):
            yield [int(r[0])], r[1:].reshape(3, 32, 32).transpose(1, 2, 0)

    def encode_png(self, array):
        buf = io.BytesIO()
        Image.fromarray(np.asarray(array)).save(buf, format="PNG")
        return buf.getvalue()

    # This leans on tfds internals (of the pinned tensorflow-datasets): when they move, the build fails here
    # and says so, rather than the two tests that read real tfds files skipping without a word.
    data_dir = str(tmp_path / "tfds")
    with monkeypatch.context() as m:
        m.setattr(tfds.download.DownloadManager, "download_and_extract", lambda self, url: str(raw_dir.parent))
        m.setattr(tfds_cifar, "_load_data", read_binary)
        m.setattr(image_feature.Image, "encode_example", encode_png)
        builder = tfds.builder("cifar10", data_dir=data_dir, file_format=file_format)
        builder.download_and_prepare(download_config=tfds.download.DownloadConfig(try_download_gcs=False))
    return data_dir, written


def assert_matches_raw(ds, written):
    def as_set(images, labels):
        return sorted((int(y), x.tobytes()) for x, y in zip(images, labels))

    def raw_set(files):
        recs = np.concatenate([written[f] for f in files])
        return as_set(recs[:, 1:].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), recs[:, 0])

    assert ds.train_images.shape == (20, 32, 32, 3) and ds.test_images.shape == (6, 32, 32, 3)
    assert as_set(ds.train_images, ds.train_labels) == raw_set([f"data_batch_{i}.bin" for i in range(1, 6)])
    assert as_set(ds.test_images, ds.test_labels) == raw_set(["test_batch.bin"])


def test_load_cifar10_from_real_array_record_files(monkeypatch, tmp_path):
    """A tiny real cifar10 in array_record format, read back through the real tfds file reader."""
    data_dir, written = build_fake_cifar10(monkeypatch, tmp_path, "array_record")
    ds = data.load("cifar10", data_dir=data_dir)
    assert_matches_raw(ds, written)
    assert ds.source == f"tfds array_record: {data_dir}/cifar10/3.0.2"


@pytest.mark.skipif(not tensorflow_importable(), reason="TensorFlow is not installed: the refusal is tested instead")
def test_load_cifar10_from_real_tfrecord_files_with_tensorflow(monkeypatch, tmp_path):
    data_dir, written = build_fake_cifar10(monkeypatch, tmp_path, "tfrecord")
    ds = data.load("cifar10", data_dir=data_dir)
    assert_matches_raw(ds, written)
    assert ds.source == f"tfds tfrecord: {data_dir}/cifar10/3.0.2"


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_cifar_missing_raises_at_once_without_the_network(name, tmp_path, monkeypatch):
    # "At once": without trying the network (a download would hang on a machine without internet). The
    # attempts are recorded rather than timed, so a busy machine cannot fail this.
    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args[1:] or args)
        raise OSError("no network in this test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    for data_dir in (tmp_path, tmp_path / "does-not-exist"):
        with pytest.raises(sources.DataUnavailableError) as info:
            data.load(name, data_dir=str(data_dir))
        assert attempts == []
        message = str(info.value)
        assert "--dataset digits" in message and "--data-dir" in message and f"tfds build {name}" in message
        assert f"{name.replace('cifar', 'cifar-')}-python.tar.gz" in message  # the python release is offered too
        assert isinstance(info.value, RuntimeError) and "\n" not in message
    assert not (tmp_path / "does-not-exist").exists()  # Nothing was written.


# ----------------------------------------------------------------------------- tfds: tfrecord builds


def masked_crc32c(payload: bytes) -> int:
    crc = 0xFFFFFFFF
    for byte in payload:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
    crc ^= 0xFFFFFFFF
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def write_tfrecord_build(data_dir, name="cifar10", version="3.0.2", splits=(("train", 3), ("test", 2))):
    """The files ``tfds build NAME`` leaves with its default format: dataset_info.json (fileFormat
    tfrecord) and one TFRecord-framed shard a split. Returns the build's folder."""
    folder = os.path.join(data_dir, name, version)
    os.makedirs(folder)
    info = {"name": name, "version": version, "fileFormat": "tfrecord",
            "moduleName": f"tensorflow_datasets.image_classification.{'cifar' if 'cifar' in name else name}",
            "splits": [{"name": s, "filepathTemplate": "{DATASET}-{SPLIT}.{FILEFORMAT}-{SHARD_X_OF_Y}",
                        "shardLengths": [str(n)], "numBytes": "0"} for s, n in splits],
            "supervisedKeys": {"tuple": {"items": [{"featureKey": "image"}, {"featureKey": "label"}]}}}
    with open(os.path.join(folder, "dataset_info.json"), "w") as f:
        json.dump(info, f)
    for split, n in splits:
        with open(os.path.join(folder, f"{name}-{split}.tfrecord-00000-of-00001"), "wb") as f:
            for i in range(n):
                record = b"example %d" % i
                length = struct.pack("<Q", len(record))
                f.write(length + struct.pack("<I", masked_crc32c(length)) + record
                        + struct.pack("<I", masked_crc32c(record)))
    return folder


@pytest.mark.skipif(tensorflow_importable(), reason="TensorFlow is installed: tfrecord builds are read")
@pytest.mark.parametrize("dataset,build", [("cifar10", "cifar10"), ("tfds:mnist", "mnist")])
def test_tfrecord_build_without_tensorflow_is_refused_in_one_line(tmp_path, capsys, dataset, build):
    import tensorflow_datasets as tfds

    folder = write_tfrecord_build(str(tmp_path / "tfds"), build, "3.0.2" if build == "cifar10" else "3.0.1")
    builder = tfds.builder(build, data_dir=str(tmp_path / "tfds"))  # tfds itself sees a prepared tfrecord build
    assert builder.is_prepared() and builder.info.file_format == tfds.core.FileFormat.TFRECORD
    out = tmp_path / "out"
    assert cifar.main(["--dataset", dataset, "--data-dir", str(tmp_path / "tfds"), "--out", str(out), "--quiet"]) == 2
    err = one_line_error(capsys)
    assert f"--data-dir: {folder} holds {build} as tfrecord files" in err and "TensorFlow is not installed" in err
    assert "pip install tensorflow" in err and f"tfds build {build} --file_format=array_record" in err
    assert not out.exists()


def test_tfrecord_build_read_through_tf_data_when_tensorflow_imports(tmp_path, monkeypatch):
    """With TensorFlow importable (faked here), a tfrecord build is read split by split through
    ``builder.as_dataset`` in shard order, batch by batch."""
    import tensorflow_datasets as tfds

    write_tfrecord_build(str(tmp_path), "mnist", "3.0.1", splits=(("train", 5), ("test", 3)))
    rng = np.random.default_rng(0)
    stored = {s: (rng.integers(0, 256, (n, 28, 28, 1), dtype=np.uint8), rng.integers(0, 10, n)) for s, n in
              (("train", 5), ("test", 3))}
    calls = []

    class FakeDataset:
        def __init__(self, split):
            self.split = split

        def batch(self, size):
            x, y = stored[self.split]
            return [{"image": x[i : i + size], "label": y[i : i + size]} for i in range(0, len(y), size)]

    def as_dataset(self, split, shuffle_files, read_config):
        calls.append((split, shuffle_files, read_config.interleave_cycle_length))
        return FakeDataset(split)

    monkeypatch.setitem(sys.modules, "tensorflow", types.ModuleType("tensorflow"))
    monkeypatch.setattr(tfds.core.DatasetBuilder, "as_dataset", as_dataset)
    monkeypatch.setattr(tfds, "as_numpy", lambda batches: iter(batches))
    monkeypatch.setattr(tfds, "ReadConfig", lambda **kw: types.SimpleNamespace(**kw))  # the real one builds tf.data.Options
    monkeypatch.setattr(sources, "_READ_CHUNK", 2)  # 5 examples: batches of 2, 2, 1
    ds = data.load("tfds:mnist", str(tmp_path))
    assert calls == [("train", False, 1), ("test", False, 1)]
    np.testing.assert_array_equal(ds.train_images, stored["train"][0])
    np.testing.assert_array_equal(ds.test_labels, stored["test"][1])
    assert ds.train_labels.dtype == np.int32 and ds.image_shape == (28, 28, 1) and ds.num_classes == 10
    assert ds.source == f"tfds tfrecord: {tmp_path}/mnist/3.0.1"


# ----------------------------------------------------------------------------- tfds: any image dataset


def test_tfds_dataset_shape_and_classes_from_its_metadata(mock_tfds, tmp_path):
    for name, shape, classes in [("mnist", (28, 28, 1), 10), ("fashion_mnist", (28, 28, 1), 10),
                                 ("svhn_cropped", (32, 32, 3), 10), ("cifar100", (32, 32, 3), 100)]:
        ds = data.load(f"tfds:{name}", str(tmp_path))
        assert ds.name == f"tfds:{name}" and ds.image_shape == shape and ds.num_classes == classes
        assert ds.train_images.shape == (96, *shape) and ds.test_labels.shape == (96,)
        assert ds.train_labels.max() < classes and ds.mean.shape == (shape[-1],)
        assert ds.augment == ("crop-flip" if name == "cifar100" else "none")  # auto: CIFAR only
        assert ds.source.startswith("tfds array_record: ")
    assert data.load("tfds:mnist", str(tmp_path), augment="crop").augment == "crop"


@pytest.mark.parametrize("model", ["mlp", "cnn"])
def test_cli_trains_on_tfds_mnist(mock_tfds, tmp_path, model):
    out = tmp_path / "out"
    argv = ["--dataset", "tfds:mnist", "--data-dir", str(tmp_path / "tfds"), "--model", model, "--workers", "2",
            "--batch-size", "8", "--epochs", "2", "--avg-period", "2", "--out", str(out), "--quiet", "--no-plots"]
    assert cifar.main(argv) == 0
    (run,) = results.finished_runs(str(out))
    assert run.summary["steps_per_epoch"] == 96 // 16 and len(run.metrics) == 2 * (96 // 16)
    config = run.summary["config"]
    assert config["dataset"] == "tfds:mnist" and config["model"] == model and config["augment"] == "none"
    assert 0.0 <= run.summary["test_accuracy"] <= 1.0 and np.isfinite(run.summary["final_train_loss"])
    # The first dense layer sees 28x28x1 inputs: mlp 784*128+128+1290, cnn (14*14*64)*128+128 after the convs.
    assert run.summary["num_params"] == {"mlp": 784 * 128 + 128 + 1290,
                                         "cnn": 320 + 18_496 + 14 * 14 * 64 * 128 + 128 + 1290}[model]


@pytest.mark.parametrize("dataset,expected", [
    ("tfds:no_such_dataset", "tfds has no dataset 'no_such_dataset'"),
    ("tfds:imdb_reviews", "not an image-classification dataset"),
    ("tfds:cats_vs_dogs", "of shape (None, None, 3); accepted are uint8 images of one fixed shape"),
])
def test_tfds_datasets_that_cannot_train_are_refused_in_one_line(tmp_path, capsys, dataset, expected):
    out = tmp_path / "out"
    assert cifar.main(["--dataset", dataset, "--data-dir", str(tmp_path), "--out", str(out), "--quiet"]) == 2
    err = one_line_error(capsys)
    assert err.startswith(f"error: --dataset {dataset}: ") and expected in err, err
    assert not out.exists()


def test_tfds_dataset_not_prepared_says_how_to_build_it(tmp_path, capsys):
    assert cifar.main(["--dataset", "tfds:mnist", "--data-dir", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    err = one_line_error(capsys)
    assert "Dataset 'mnist' is not prepared" in err and "tfds build mnist --file_format=array_record" in err


def test_bad_tfds_name_is_a_config_error(tmp_path, capsys):
    for dataset in ("tfds:", "tfds:Bad Name", "mnist"):
        assert cifar.main(["--dataset", dataset, "--out", str(tmp_path / "o")]) == 2
        err = one_line_error(capsys)
        assert f"--dataset {dataset!r} is unknown" in err and "tfds:NAME" in err, err


# ----------------------------------------------------------------------------- digits, synthetic, checks


def test_load_digits():
    ds = data.load("digits")
    again = data.load("digits")
    assert ds.train_images.shape == (1437, 8, 8, 1) and ds.test_images.shape == (360, 8, 8, 1)
    assert ds.train_images.dtype == np.uint8 and ds.train_labels.dtype == np.int32
    assert ds.train_images.max() == 255 and ds.train_images.min() == 0  # 0..16 rescaled.
    assert ds.num_classes == 10 and ds.augment == "none" and ds.source == "scikit-learn digits"
    np.testing.assert_array_equal(ds.train_images, again.train_images)
    np.testing.assert_array_equal(ds.test_labels, again.test_labels)
    # Stratified: every class has ~20% of its examples in the test split.
    for c in range(10):
        share = np.sum(ds.test_labels == c) / (np.sum(ds.test_labels == c) + np.sum(ds.train_labels == c))
        assert 0.17 < share < 0.23
    np.testing.assert_allclose(ds.mean, [ds.train_images.astype(np.float64).mean()], rtol=1e-5)


def test_load_synthetic():
    ds = data.load("synthetic", synthetic_size=100)
    again = data.load("synthetic", synthetic_size=100)
    assert ds.train_images.shape == (100, 32, 32, 3) and ds.test_images.shape == (20, 32, 32, 3)
    assert ds.train_images.dtype == np.uint8 and ds.train_labels.dtype == np.int32
    assert ds.num_classes == 10 and ds.augment == "none" and set(np.unique(ds.train_labels)) <= set(range(10))
    assert ds.source == "synthetic (seed 0, 100 examples)" and (ds.num_train, ds.num_test) == (100, 20)
    np.testing.assert_array_equal(ds.train_images, again.train_images)
    np.testing.assert_array_equal(ds.train_labels, again.train_labels)


def test_load_unknown_name():
    with pytest.raises(ValueError, match="--dataset.*cifar10, cifar100, digits, synthetic, tfds:NAME"):
        data.load("mnist")
    with pytest.raises(ValueError, match="--augment.*auto, crop-flip, crop, flip, none"):
        data.load("digits", augment="rotate")


def test_check_refuses_arrays_a_model_cannot_train_on():
    good = sources.read_synthetic(10)
    checked = sources.check(good._replace(train_labels=good.train_labels.astype(np.int64)), "synthetic")
    assert checked.train_labels.dtype == np.int32 and checked.source == good.source
    np.testing.assert_array_equal(checked.train_labels, good.train_labels)
    bad = {
        "labels in 10..10, outside 0..9": good._replace(test_labels=np.full(2, 10)),
        "images of shape (16, 16, 3), the train split (32, 32, 3)": good._replace(
            test_images=np.zeros((2, 16, 16, 3), np.uint8)),
        "expected uint8 [N, H, W, C] and [N]": good._replace(train_images=good.train_images.astype(np.float32)),
        "no examples": good._replace(test_images=good.test_images[:0], test_labels=good.test_labels[:0]),
    }
    for problem, arrays in bad.items():
        with pytest.raises(sources.DataUnavailableError, match="--dataset synthetic: the (train|test) split read from "
                                                            r"synthetic \(seed 0, 10 examples\) has") as info:
            sources.check(arrays, "synthetic")
        assert problem in str(info.value)
