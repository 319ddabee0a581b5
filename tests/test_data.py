"""Tests for experiments/data.py and experiments/loader.py: datasets and their augmentation, worker shards,
loaders, prefetch. Reading the data is tested in test_sources.py and test_cifar_release.py."""

import dataclasses
import hashlib
import threading
import time

import jax
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from experiments import cifar, data, datasets, resume, results, translate
from experiments import loader as xp_loader
from experiments.config import ConfigError
from experiments.flags import parser


def make_dataset(n=240, hw=8, channels=3, augment=False, seed=0):
    """A small dataset whose label is the example index (so batches reveal which examples they hold)."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, hw, hw, channels), dtype=np.uint8)
    labels = np.arange(n, dtype=np.int32)
    mean, std = data.channel_stats(images)
    return data.Dataset("toy", images, labels, images[:10], labels[:10], n, mean, std, augment)


def padded_crop_reference(image, dy, dx, flip, pad):
    """Loop-free-of-tricks reference: pad one image, slice the window, mirror it."""
    h, w = image.shape[:2]
    padded = np.zeros((h + 2 * pad, w + 2 * pad, image.shape[2]), image.dtype)
    padded[pad : pad + h, pad : pad + w] = image
    window = padded[dy : dy + h, dx : dx + w]
    return window[:, ::-1] if flip else window


# ----------------------------------------------------------------------------- partitions


def test_parse_partition():
    assert datasets.parse_partition("iid") == ("iid", None)
    assert datasets.parse_partition("dirichlet:0.5") == ("dirichlet", 0.5)
    for bad in ["dirichlet:0", "dirichlet:x", "foo", "dirichlet:-1", "dirichlet:", "dirichlet:nan", "dirichlet:inf"]:
        with pytest.raises(ValueError, match="--partition.*iid.*dirichlet:ALPHA"):
            datasets.parse_partition(bad)
    with pytest.raises(ValueError, match="--partition"):
        data.partition(np.zeros(10, int), 2, "foo", 0)


def test_partition_iid():
    labels = np.repeat(np.arange(10), 103)  # 1030 examples, 4 workers: 257 each, 2 unused.
    shards = data.partition(labels, 4, "iid", seed=3)
    assert [len(s) for s in shards] == [257] * 4
    flat = np.concatenate(shards)
    assert len(np.unique(flat)) == len(flat) and flat.min() >= 0 and flat.max() < 1030
    for a, b in zip(shards, data.partition(labels, 4, "iid", seed=3)):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(shards[0], data.partition(labels, 4, "iid", seed=4)[0])


def dominant_fraction(labels, shards):
    return float(np.mean([np.bincount(labels[s]).max() / len(s) for s in shards]))


def test_partition_dirichlet_disjoint_covering_and_skewed():
    labels = np.repeat(np.arange(10), 200)
    skewed = data.partition(labels, 8, "dirichlet:0.05", seed=0)
    flat = np.concatenate(skewed)
    np.testing.assert_array_equal(np.sort(flat), np.arange(len(labels)))  # Disjoint and covering.
    assert len({len(s) for s in skewed}) > 1  # Unequal sizes.
    iid = data.partition(labels, 8, "iid", seed=0)
    mild = data.partition(labels, 8, "dirichlet:1000", seed=0)
    # A balanced shard has a dominant-class fraction near 1/10; small alpha concentrates classes.
    assert dominant_fraction(labels, skewed) > 0.4
    assert dominant_fraction(labels, iid) < 0.16 and dominant_fraction(labels, mild) < 0.16
    # min_size is enforced by redrawing, and impossible requests fail naming the option.
    assert min(len(s) for s in data.partition(labels, 8, "dirichlet:0.05", 0, min_size=50)) >= 50
    with pytest.raises(ValueError, match="--partition"):
        data.partition(labels[:10], 20, "dirichlet:0.1", 0)


# ----------------------------------------------------------------------------- training loader


def test_loader_iid_epoch_sees_each_example_once_from_own_shard():
    ds = make_dataset(n=243)
    shards = data.partition(ds.train_labels, 4, "iid", seed=1)
    loader = xp_loader.TrainLoader(ds, shards, batch_size=6, seed=7)
    assert loader.steps_per_epoch == 243 // 24
    seen = []
    for i in range(loader.steps_per_epoch):
        images, labels = loader.batch(0, i)
        assert images.shape == (4, 6, 8, 8, 3) and images.dtype == np.uint8
        assert labels.shape == (4, 6) and labels.dtype == np.int32
        np.testing.assert_array_equal(images, ds.train_images[labels])  # No augmentation here.
        for w in range(4):
            assert np.isin(labels[w], shards[w]).all()
        seen.append(labels)
    seen = np.concatenate([s.ravel() for s in seen])
    assert len(np.unique(seen)) == len(seen) == 10 * 24
    # The next epoch uses a different order.
    assert not np.array_equal(loader.batch(1, 0)[1], loader.batch(0, 0)[1])


def test_loader_dirichlet_small_shard_cycles_fresh_permutations():
    ds = make_dataset(n=200)
    shards = [np.arange(0, 10), np.arange(10, 200)]
    loader = xp_loader.TrainLoader(ds, shards, batch_size=5, seed=0)
    assert loader.steps_per_epoch == 20  # Same as for IID shards of 100.
    drawn = np.stack([loader.indices(0, i) for i in range(20)], axis=1).reshape(2, -1)
    small, large = drawn
    assert np.isin(small, shards[0]).all() and np.isin(large, shards[1]).all()
    passes = small.reshape(10, 10)  # The 10-example shard is read 10 times per epoch.
    for p in passes:
        np.testing.assert_array_equal(np.sort(p), shards[0])
    assert len({tuple(p) for p in passes}) > 1  # Fresh permutations, not one repeated order.
    assert len(np.unique(large)) == len(large)


def test_loader_batch_is_pure_and_matches_resumed_iterate():
    ds = make_dataset(n=240, augment=True)
    shards = data.partition(ds.train_labels, 4, "iid", seed=0)
    loader = xp_loader.TrainLoader(ds, shards, batch_size=5, seed=11)
    fresh = xp_loader.TrainLoader(ds, shards, batch_size=5, seed=11)
    spe = loader.steps_per_epoch
    for epoch, index in [(0, 0), (0, spe - 1), (2, 3)]:
        it = fresh.iterate(start_step=epoch * spe + index)
        e, i, (images, labels) = next(it)
        assert (e, i) == (epoch, index)
        ref_images, ref_labels = loader.batch(epoch, index)
        np.testing.assert_array_equal(images, ref_images)
        np.testing.assert_array_equal(labels, ref_labels)
        e2, i2, _ = next(it)
        assert (e2, i2) == ((epoch, index + 1) if index + 1 < spe else (epoch + 1, 0))
    other_seed = xp_loader.TrainLoader(ds, shards, batch_size=5, seed=12)
    assert not np.array_equal(other_seed.batch(0, 0)[1], loader.batch(0, 0)[1])


def test_augmentation_deterministic_and_real_crops():
    ds = make_dataset(n=240, hw=16, augment=True)
    pad = xp_loader.crop_pad(ds.image_shape)
    assert pad == 2
    loader = xp_loader.TrainLoader(ds, data.partition(ds.train_labels, 4, "iid", 0), batch_size=8, seed=5)
    images, labels = loader.batch(0, 1)
    again, _ = loader.batch(0, 1)
    np.testing.assert_array_equal(images, again)
    assert not np.array_equal(images, loader.batch(0, 2)[0])
    # Every output image is some padded crop (optionally flipped) of its own source image,
    # and the batch uses several different crops/flips.
    used = set()
    for img, label in zip(images.reshape(-1, 16, 16, 3), labels.ravel()):
        matches = [
            (dy, dx, flip)
            for dy in range(2 * pad + 1)
            for dx in range(2 * pad + 1)
            for flip in (False, True)
            if np.array_equal(img, padded_crop_reference(ds.train_images[label], dy, dx, flip, pad))
        ]
        assert matches
        used.add(matches[0])
    assert len(used) > 5
    # Same (epoch, index) but the images themselves differ from the raw ones for most examples.
    assert np.mean([not np.array_equal(a, ds.train_images[y]) for a, y in zip(images.reshape(-1, 16, 16, 3), labels.ravel())]) > 0.5


def test_augmentation_differs_across_index_and_epoch_for_identical_images():
    """All examples share one image, so any difference between batches is the augmentation."""
    base = make_dataset(n=240, augment=True)
    same = data.Dataset("same", np.repeat(base.train_images[:1], 240, axis=0), base.train_labels,
                        base.test_images, base.test_labels, 240, base.mean, base.std, True)
    loader = xp_loader.TrainLoader(same, data.partition(same.train_labels, 4, "iid", 0), batch_size=8, seed=5)
    reference = loader.batch(0, 1)[0]
    np.testing.assert_array_equal(reference, xp_loader.TrainLoader(same, loader.shards, 8, seed=5).batch(0, 1)[0])
    for other in [loader.batch(0, 2)[0], loader.batch(1, 1)[0], xp_loader.TrainLoader(same, loader.shards, 8, 6).batch(0, 1)[0]]:
        assert np.mean(np.any(other != reference, axis=(2, 3, 4))) > 0.8  # Most images cropped differently.


def test_crop_flip_known_offsets():
    image = np.arange(6 * 5 * 2, dtype=np.uint8).reshape(1, 6, 5, 2)
    # Offset (0, 0): the image moves down-right by pad=2 with zeros filling the top-left.
    shifted = np.zeros_like(image[0])
    shifted[2:, 2:] = image[0, :4, :3]
    np.testing.assert_array_equal(xp_loader.crop_flip(image, np.array([[0, 0]]), np.array([False]), pad=2)[0], shifted)
    # Offset (pad, pad) is the identity; with flip it is the mirror image.
    np.testing.assert_array_equal(xp_loader.crop_flip(image, np.array([[2, 2]]), np.array([False]), pad=2), image)
    np.testing.assert_array_equal(xp_loader.crop_flip(image, np.array([[2, 2]]), np.array([True]), pad=2), image[:, :, ::-1])
    # Offset (4, 1), flipped: rows 2..5 then 2 zero rows; columns shifted right by 1 then mirrored.
    expected = np.zeros_like(image[0])
    expected[:4, 1:] = image[0, 2:, :4]
    np.testing.assert_array_equal(
        xp_loader.crop_flip(image, np.array([[4, 1]]), np.array([True]), pad=2)[0], expected[:, ::-1]
    )
    with pytest.raises(ValueError):
        xp_loader.crop_flip(image, np.array([[5, 0]]), np.array([False]), pad=2)


def test_drawn_crops_and_flips_with_fixed_rng():
    images = np.random.default_rng(0).integers(0, 256, (64, 6, 6, 1), dtype=np.uint8)
    offsets, flips = xp_loader.draw_crop_flip(np.random.default_rng(42), len(images), pad=2)
    again = xp_loader.draw_crop_flip(np.random.default_rng(42), len(images), pad=2)
    np.testing.assert_array_equal(offsets, again[0])
    np.testing.assert_array_equal(flips, again[1])
    out = xp_loader.crop_flip(images, offsets, flips, pad=2)
    assert out.shape == images.shape and out.dtype == np.uint8
    mirrored = 0
    for src, got in zip(images, out):
        options = [(dy, dx, f) for dy in range(5) for dx in range(5) for f in (0, 1)
                   if np.array_equal(got, padded_crop_reference(src, dy, dx, f, 2))]
        assert options
        mirrored += all(f for _, _, f in options)
    assert 10 < mirrored < 54  # Roughly half are mirrored.


def test_loader_rejects_batch_too_large():
    ds = make_dataset(n=100)
    with pytest.raises(ValueError, match="--batch-size"):
        xp_loader.TrainLoader(ds, [np.arange(0, 3), np.arange(3, 100)], batch_size=4, seed=0)
    with pytest.raises(ValueError, match="--batch-size"):
        xp_loader.TrainLoader(ds, data.partition(ds.train_labels, 4, "iid", 0), batch_size=26, seed=0)
    loader = xp_loader.TrainLoader(ds, data.partition(ds.train_labels, 4, "iid", 0), batch_size=25, seed=0)
    with pytest.raises(ValueError):
        loader.batch(0, loader.steps_per_epoch)


# ----------------------------------------------------------------------------- eval, normalize, prefetch


def test_eval_batches_cover_each_example_once():
    n, workers, global_batch = 23, 4, 8
    images = (np.arange(n, dtype=np.uint8)[:, None, None, None] * np.ones((1, 2, 2, 1), np.uint8))
    labels = np.arange(n, dtype=np.int32) + 100
    batches = list(xp_loader.eval_batches(images, labels, global_batch, workers))
    assert len(batches) == 3
    found = []
    for b in batches:
        assert b["image"].shape == (4, 2, 2, 2, 1) and b["image"].dtype == np.uint8
        assert b["label"].shape == (4, 2) and b["mask"].shape == (4, 2) and b["mask"].dtype == bool
        found.extend(b["label"][b["mask"]].tolist())
        np.testing.assert_array_equal(b["image"][b["mask"]][:, 0, 0, 0], b["label"][b["mask"]] - 100)
    assert sorted(found) == list(range(100, 100 + n))
    assert batches[-1]["mask"].sum() == n - 16 and batches[0]["mask"].all()
    with pytest.raises(ValueError, match="global_batch 10 must be a positive multiple of num_workers"):
        next(xp_loader.eval_batches(images, labels, 10, 4))


def test_normalize_matches_numpy():
    x = np.random.default_rng(0).integers(0, 256, (2, 3, 4, 4, 3), dtype=np.uint8)
    mean, std = np.array([125.3, 123.0, 113.9], np.float32), np.array([63.0, 62.1, 66.7], np.float32)
    expected = (x.astype(np.float32) - mean) / std
    got = jax.jit(data.normalize)(x, mean, std)
    assert got.dtype == np.float32 and got.shape == x.shape
    np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-6, atol=1e-6)


def wait_for_prefetch_threads(timeout=60.0):  # a guard against a hang: returns at once when they end
    deadline = time.monotonic() + timeout
    for t in [t for t in threading.enumerate() if t.name == "adpsgd-prefetch"]:
        t.join(max(0.0, deadline - time.monotonic()))
    return [t for t in threading.enumerate() if t.name == "adpsgd-prefetch"]


def test_prefetch_order_and_put_to_device():
    assert list(xp_loader.prefetch(iter(range(10)), size=3, put=lambda x: x * 10)) == [x * 10 for x in range(10)]
    mesh = Mesh(np.array(jax.devices()[:8]), ("batch",))
    sharding = NamedSharding(mesh, PartitionSpec("batch"))
    ds = make_dataset(n=240)
    loader = xp_loader.TrainLoader(ds, data.partition(ds.train_labels, 8, "iid", 0), batch_size=3, seed=0)
    batches = (b for _, _, b in loader.iterate())
    for step, (images, labels) in enumerate(xp_loader.prefetch(batches, put=lambda b: jax.device_put(b, sharding))):
        assert images.sharding == sharding and images.shape == (8, 3, 8, 8, 3)
        np.testing.assert_array_equal(np.asarray(labels), loader.batch(0, step)[1])
        if step == 3:
            break
    assert wait_for_prefetch_threads() == []


def test_prefetch_propagates_producer_exception():
    def source():
        yield 1
        yield 2
        raise RuntimeError("producer broke")

    it = xp_loader.prefetch(source())
    assert next(it) == 1 and next(it) == 2
    with pytest.raises(RuntimeError, match="producer broke"):
        next(it)
    with pytest.raises(ZeroDivisionError):
        list(xp_loader.prefetch(iter([1, 0]), put=lambda x: 1 // x))


def test_prefetch_stops_when_consumer_breaks_early():
    closed = threading.Event()
    produced = []

    def endless():
        try:
            i = 0
            while True:
                produced.append(i)
                yield i
                i += 1
        finally:
            closed.set()

    for item in xp_loader.prefetch(endless(), size=2):
        if item == 2:
            break
    assert closed.wait(5), "producer thread did not stop after the consumer broke out"
    assert wait_for_prefetch_threads() == []
    assert len(produced) <= 3 + 2 + 1  # Bounded queue: it never ran far ahead.
    # A prefetcher that is never iterated also stops once dropped.
    closed.clear()
    xp_loader.prefetch(endless(), size=1)
    assert closed.wait(5)
    assert wait_for_prefetch_threads() == []


def test_loader_worker_subset_gets_exactly_its_rows_of_the_augmented_batch():
    # A process of a multi-host run builds only its workers' rows; they must
    # equal those rows of the full batch, augmentation included.
    import dataclasses

    ds = dataclasses.replace(data.load("synthetic", synthetic_size=512), augment=True)
    shards = data.partition(ds.train_labels, 4, "iid", seed=3)
    full = xp_loader.TrainLoader(ds, shards, 8, seed=3)
    part = xp_loader.TrainLoader(ds, shards, 8, seed=3, workers=[1, 3])
    for epoch, index in [(0, 0), (2, 5)]:
        images, labels = full.batch(epoch, index)
        sub_images, sub_labels = part.batch(epoch, index)
        np.testing.assert_array_equal(sub_images, images[[1, 3]])
        np.testing.assert_array_equal(sub_labels, labels[[1, 3]])
    assert not np.array_equal(images[1], ds.train_images[full.indices(2, 5)[1]])  # augmented for real
    with pytest.raises(ValueError, match="workers"):
        xp_loader.TrainLoader(ds, shards, 8, seed=3, workers=[4])


# ----------------------------------------------------------------------------- augmentation modes


def test_crop_pad_is_an_eighth_of_the_shorter_side():
    assert xp_loader.crop_pad((32, 32, 3)) == xp_loader.CIFAR_PAD == 4
    assert [xp_loader.crop_pad(s) for s in [(28, 28, 1), (8, 8, 1), (2, 2, 1), (64, 48, 3), (96, 96, 3)]] == [3, 1, 1, 6, 12]


def test_crop_and_flip_modes_use_the_draws_of_crop_flip():
    base = make_dataset(n=240, hw=16)
    shards = data.partition(base.train_labels, 4, "iid", 0)
    batches = {mode: xp_loader.TrainLoader(dataclasses.replace(base, augment=mode), shards, 8, seed=5).batch(1, 2)
               for mode in ("crop-flip", "crop", "flip", "none")}
    raw = base.train_images[batches["none"][1]].reshape(-1, 16, 16, 3)
    np.testing.assert_array_equal(batches["none"][0].reshape(raw.shape), raw)
    offsets, flips = xp_loader.draw_crop_flip(np.random.default_rng([5, xp_loader._AUG_STREAM, 1, 2]), 32, pad=2)
    expected = {"crop-flip": xp_loader.crop_flip(raw, offsets, flips, 2),
                "crop": xp_loader.crop_flip(raw, offsets, np.zeros(32, bool), 2),
                "flip": xp_loader.crop_flip(raw, np.full((32, 2), 2), flips, 2)}
    for mode, images in expected.items():
        np.testing.assert_array_equal(batches[mode][0].reshape(raw.shape), images, err_msg=mode)
        np.testing.assert_array_equal(batches[mode][1], batches["none"][1])  # same examples, whatever the mode
    assert 0 < flips.sum() < 32 and not np.array_equal(expected["crop"], raw)


def test_dataset_augment_values():
    ds = make_dataset()
    assert ds.augment == "none" and dataclasses.replace(ds, augment=True).augment == "crop-flip"  # older callers
    assert make_dataset(augment=True).augment == "crop-flip" and dataclasses.replace(ds, augment=False).augment == "none"
    assert (ds.num_train, ds.num_test, ds.image_shape, ds.source) == (240, 10, (8, 8, 3), "")
    for bad in ("auto", "rotate"):
        with pytest.raises(ValueError, match="--augment.*crop-flip, crop, flip, none"):
            dataclasses.replace(ds, augment=bad)
    assert data.load("digits").augment == "none" and data.load("digits", augment="flip").augment == "flip"
    assert data.load("synthetic", synthetic_size=10, augment="auto").augment == "none"


def batches_digest(loader, steps) -> str:
    digest = hashlib.sha256()
    for epoch, index in steps:
        images, labels = loader.batch(epoch, index)
        digest.update(images.tobytes())
        digest.update(labels.tobytes())
    return digest.hexdigest()[:16]


def test_default_batches_are_byte_identical_to_before_augment_became_a_flag():
    """Digests of batches written by the loader before --augment existed (augment was a bool,
    CIFAR-shaped data padded by CIFAR_PAD): CIFAR's crop-flip and digits' raw batches must not move."""
    cifar_like = data.load("synthetic", synthetic_size=512, augment="crop-flip")
    loader = xp_loader.TrainLoader(cifar_like, data.partition(cifar_like.train_labels, 4, "iid", 3), 8, seed=3)
    assert batches_digest(loader, [(0, 0), (2, 5)]) == "c8afcba40960e7cf", "CIFAR's crop-flip batches changed"
    digits = data.load("digits")
    loader = xp_loader.TrainLoader(digits, data.partition(digits.train_labels, 8, "iid", 0), 16, seed=0)
    assert batches_digest(loader, [(0, 0), (1, 3)]) == "6cc8b5826b6b1b35", "digits' batches changed"


def flags(*argv):
    return translate.from_args(parser().parse_args([*argv, "--out", "/tmp/never-written"]))[0][0]


def test_augment_flag_defaults_per_dataset_and_resume():
    assert [flags("--dataset", d).augment for d in ("cifar10", "cifar100", "digits", "synthetic")] == [
        "crop-flip", "crop-flip", "none", "none"]
    mnist, tfds_cifar = flags("--dataset", "tfds:mnist"), flags("--dataset", "tfds:cifar10")
    assert (mnist.augment, mnist.model, tfds_cifar.augment, tfds_cifar.model) == ("none", "cnn", "crop-flip", "resnet18")
    assert flags("--dataset", "digits", "--augment", "crop").augment == "crop"
    assert flags("--dataset", "tfds:svhn_cropped/x:1.0.0").dataset == "tfds:svhn_cropped/x:1.0.0"
    with pytest.raises(ConfigError, match="--augment 'rotate' is unknown; accepted values: auto, crop-flip"):
        flags("--dataset", "digits", "--augment", "rotate")
    # A run saved before --augment existed resumes under the default, and only under it.
    digits = flags("--dataset", "digits")
    old = {k: v for k, v in digits.to_dict().items() if k != "augment"}
    assert resume.config_differences(old, digits) == []
    assert resume.config_differences(old, digits.replace(augment="flip")) == ["augment: 'none' -> 'flip'"]
    cifar10 = flags("--dataset", "cifar10")
    assert resume.config_differences({**cifar10.to_dict(), "augment": "auto"}, cifar10) == []
    assert resume.from_saved(old).augment == "auto"


def test_augment_flag_reaches_the_training_batches(tmp_path):
    def run(*extra):
        out = tmp_path / "-".join(extra or ("default",))
        argv = ["--dataset", "digits", "--epochs", "1", "--avg-period", "2", "--out", str(out), "--quiet", "--no-plots"]
        assert cifar.main(argv + list(extra)) == 0
        (r,) = results.finished_runs(str(out))
        return [row["loss"] for row in r.metrics], r.summary["config"]["augment"]

    default, flipped = run(), run("--augment", "flip")
    assert default[1] == "none" and flipped[1] == "flip"
    assert default[0] != flipped[0]
