"""Batches for data-parallel workers: augmentation, resumable training batches, evaluation
batches and prefetching.

* ``TrainLoader.batch(epoch, index)`` is a pure function of (seed, epoch,
  index), so a run resumed at global step s continues with exactly the batch
  it would have seen (``TrainLoader.iterate(start_step=s)``).
* ``crop_flip`` / ``draw_crop_flip`` are the random crops and flips of the
  training batches (``Dataset.augment``).
* ``eval_batches`` pads and masks the last batch; ``prefetch`` overlaps
  host-to-device copies with compute.

Batches are laid out [W, B, ...]: worker w gets row w.
"""

from __future__ import annotations

import queue
import threading
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import numpy as np

from experiments.data import Dataset

CIFAR_PAD = 4  # Zero padding (pixels per side) of the random crops on 32x32 images: an eighth of the side.
# Tags keeping the permutation and augmentation random streams apart.
_PERM_STREAM, _AUG_STREAM = 0, 1


def crop_flip(images: np.ndarray, offsets: np.ndarray, flips: np.ndarray, pad: int = CIFAR_PAD) -> np.ndarray:
    """Crop zero-padded images at given offsets, then optionally flip them.

    ``images`` [N, H, W, C] is padded with ``pad`` zeros per side; image n is
    cropped to rows ``offsets[n, 0] + 0..H-1`` and columns ``offsets[n, 1] +
    0..W-1`` of the padded image (offsets int [N, 2] in 0..2*pad; pad, pad is
    the identity) and mirrored left-right where ``flips`` (bool [N]).
    Vectorised; returns the same shape and dtype as ``images``.
    """
    n, h, w = images.shape[:3]
    offsets = np.asarray(offsets)
    if offsets.shape != (n, 2) or offsets.min(initial=0) < 0 or offsets.max(initial=0) > 2 * pad:
        raise ValueError(f"offsets must be int [{n}, 2] in 0..{2 * pad}")
    padded = np.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    rows = offsets[:, :1] + np.arange(h)[None, :]  # [N, H]
    cols = offsets[:, 1:] + np.arange(w)[None, :]  # [N, W]
    cols = np.where(np.asarray(flips, bool)[:, None], cols[:, ::-1], cols)
    return padded[np.arange(n)[:, None, None], rows[:, :, None], cols[:, None, :]]


def crop_pad(image_shape: Sequence[int]) -> int:
    """Zero padding per side of the random crops of (H, W, C) images: an eighth of the shorter
    side, at least 1 (``CIFAR_PAD`` = 4 on 32x32, 3 on 28x28, 1 on 8x8)."""
    return max(1, min(image_shape[0], image_shape[1]) // 8)


def draw_crop_flip(rng: np.random.Generator, n: int, pad: int = CIFAR_PAD) -> tuple[np.ndarray, np.ndarray]:
    """The random part of an augmentation (``crop_flip``'s arguments): offsets int [n, 2] uniform in 0..2*pad,
    flips bool [n] with probability 1/2."""
    offsets = rng.integers(0, 2 * pad + 1, size=(n, 2))
    return offsets, rng.random(n) < 0.5


class TrainLoader:
    """Training batches for W workers, a pure function of (seed, epoch, index).

    Worker w reads shard ``shards[w]`` in the order of a permutation drawn
    from (seed, epoch, w); when its shard runs out within an epoch (possible
    with Dirichlet shards) it continues with a fresh permutation of the
    shard. With IID shards an epoch never repeats an example across workers.
    ``batch_size`` is per worker; ``steps_per_epoch = N // (W * batch_size)``
    whatever the partition.
    """

    def __init__(self, dataset: Dataset, shards: Sequence[np.ndarray], batch_size: int, seed: int,
                 workers: Sequence[int] | None = None):
        n = len(dataset.train_labels)
        self.dataset, self.batch_size, self.seed = dataset, int(batch_size), int(seed)
        self.shards = tuple(np.asarray(s, dtype=np.int64) for s in shards)
        self.num_workers = len(self.shards)
        # The workers whose rows this process builds (all of them in a one-process run).
        self.workers = tuple(range(self.num_workers)) if workers is None else tuple(int(w) for w in workers)
        if not self.workers or min(self.workers) < 0 or max(self.workers) >= self.num_workers:
            raise ValueError(f"workers must be indices in 0..{self.num_workers - 1}, got {workers}")
        if self.num_workers < 1 or self.seed < 0:
            raise ValueError(f"need at least one shard and --seed >= 0, got {self.num_workers} shards, seed {seed}")
        if self.batch_size < 1 or n < self.num_workers * self.batch_size:
            raise ValueError(
                f"--batch-size: {batch_size} per worker x {self.num_workers} workers must be between 1 and the "
                f"{n} training examples; use a smaller --batch-size"
            )
        self.steps_per_epoch = n // (self.num_workers * self.batch_size)
        for w, shard in enumerate(self.shards):
            if len(shard) < self.batch_size:
                raise ValueError(
                    f"--batch-size: worker {w}'s shard has {len(shard)} examples, fewer than the per-worker "
                    f"batch size {self.batch_size}; use a smaller --batch-size (or a larger dirichlet ALPHA)"
                )
            if shard.min() < 0 or shard.max() >= n:
                raise ValueError(f"shard {w} has indices outside 0..{n - 1}")

    def indices(self, epoch: int, index: int) -> np.ndarray:
        """Example indices of batch (epoch, index) for ``self.workers``: int64 [len(workers), B]."""
        if epoch < 0 or not 0 <= index < self.steps_per_epoch:
            raise ValueError(f"need epoch >= 0 and 0 <= index < {self.steps_per_epoch}, got ({epoch}, {index})")
        out = np.empty((len(self.workers), self.batch_size), np.int64)
        for row, w in enumerate(self.workers):
            shard = self.shards[w]
            size, pos, filled = len(shard), index * self.batch_size, 0
            while filled < self.batch_size:
                cycle, offset = divmod(pos, size)
                order = np.random.default_rng([self.seed, _PERM_STREAM, epoch, w, cycle]).permutation(size)
                take = min(self.batch_size - filled, size - offset)
                out[row, filled : filled + take] = shard[order[offset : offset + take]]
                filled, pos = filled + take, pos + take
        return out

    def batch(self, epoch: int, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Batch ``index`` of ``epoch``: (images uint8 [W, B, H, W', C], labels int32 [W, B]),
        W = len(self.workers).

        Augmented as ``dataset.augment`` says (crops of ``crop_pad`` padding
        and / or flips), seeded by (seed, epoch, index); the same arguments
        always give the same arrays, and a subset of workers gets exactly its
        rows of the full batch. crop and flip use the draws of crop-flip, with
        the flips or the offsets left out.
        """
        idx = self.indices(epoch, index)
        images = self.dataset.train_images[idx]
        labels = self.dataset.train_labels[idx]
        mode = self.dataset.augment
        if mode != "none":
            pad = crop_pad(self.dataset.image_shape)
            rng = np.random.default_rng([self.seed, _AUG_STREAM, epoch, index])
            offsets, flips = draw_crop_flip(rng, self.num_workers * self.batch_size, pad)  # drawn for every worker
            if mode == "flip":
                offsets = np.full_like(offsets, pad)  # (pad, pad): the uncropped image
            elif mode == "crop":
                flips = np.zeros_like(flips)
            rows = (np.asarray(self.workers)[:, None] * self.batch_size + np.arange(self.batch_size)).ravel()
            flat = images.reshape(-1, *images.shape[2:])
            images = crop_flip(flat, offsets[rows], flips[rows], pad).reshape(images.shape)
        return images, labels

    def iterate(self, start_step: int = 0) -> Iterator[tuple[int, int, tuple[np.ndarray, np.ndarray]]]:
        """Yield (epoch, index, batch(epoch, index)) forever, from global step ``start_step``.

        Global step s is batch (s // steps_per_epoch, s % steps_per_epoch), so
        a run resumed at step s continues with exactly the batch it stopped at.
        """
        if start_step < 0:
            raise ValueError(f"start_step must be >= 0, got {start_step}")
        step = start_step
        while True:
            epoch, index = divmod(step, self.steps_per_epoch)
            yield epoch, index, self.batch(epoch, index)
            step += 1


def eval_batches(images: np.ndarray, labels: np.ndarray, global_batch: int, num_workers: int) -> Iterator[dict]:
    """Yield every example exactly once in [W, B] batches, B = global_batch // W.

    Each item is ``{"image": [W, B, H, W', C] (images' dtype), "label": [W, B],
    "mask": bool [W, B]}``; example j of a batch sits at (j // B, j % B). The
    last batch is zero-padded and its padding has ``mask`` False.
    """
    if num_workers < 1 or global_batch < 1 or global_batch % num_workers:
        raise ValueError(
            f"eval_batches: global_batch {global_batch} must be a positive multiple of num_workers ({num_workers})"
        )
    per_worker, n = global_batch // num_workers, len(images)
    for start in range(0, n, global_batch):
        count = min(global_batch, n - start)
        image = np.zeros((global_batch, *images.shape[1:]), images.dtype)
        label = np.zeros((global_batch, *labels.shape[1:]), labels.dtype)
        image[:count], label[:count] = images[start : start + count], labels[start : start + count]
        mask = np.arange(global_batch) < count
        yield {
            "image": image.reshape(num_workers, per_worker, *images.shape[1:]),
            "label": label.reshape(num_workers, per_worker, *labels.shape[1:]),
            "mask": mask.reshape(num_workers, per_worker),
        }


_ITEM, _END, _ERROR = "item", "end", "error"


def _offer(q: queue.Queue, stop: threading.Event, message: tuple) -> bool:
    """Put ``message`` unless the consumer has stopped; True when it was put."""
    while not stop.is_set():
        try:
            q.put(message, timeout=0.05)
            return True
        except queue.Full:
            pass
    return False


def _produce(source: Iterator, q: queue.Queue, stop: threading.Event, put: Callable | None) -> None:
    try:
        for item in source:
            if not _offer(q, stop, (_ITEM, item if put is None else put(item))):
                return
        _offer(q, stop, (_END, None))
    except BaseException as exc:  # Forwarded to the consumer, which re-raises it.
        _offer(q, stop, (_ERROR, exc))
    finally:
        close = getattr(source, "close", None)
        if stop.is_set() and close is not None:
            close()  # The consumer stopped early: let the source clean up.


def _consume(q: queue.Queue, stop: threading.Event, producer: threading.Thread) -> Iterator:
    try:
        while True:
            kind, payload = q.get()
            if kind == _END:
                return
            if kind == _ERROR:
                raise payload
            yield payload
    finally:
        stop.set()
        # Wait for the producer to leave ``put`` (a device transfer in C++): a
        # daemon thread still inside it when the interpreter exits aborts the
        # process ("FATAL: exception not rethrown").
        producer.join(timeout=60)
        while not q.empty():  # Drop buffered items (e.g. device arrays) now; we are the only reader.
            q.get_nowait()


def prefetch(iterator: Iterable, size: int = 2, put: Callable[[Any], Any] | None = None) -> Iterator:
    """Iterate ``iterator`` in a background thread, ``size`` items ahead.

    ``put`` (e.g. ``lambda b: jax.device_put(b, sharding)``) is applied to
    each item in that thread, so the next batch is transferred while the
    current step runs. Items come out in order; an exception raised by the
    source (or ``put``) is re-raised to the consumer. The thread is a daemon
    blocked on a bounded queue; it exits (closing the source) once the
    returned iterator is closed, exhausted or garbage collected, e.g. after a
    ``break``; closing the iterator waits for it to finish its current item.
    """
    if size < 1:
        raise ValueError(f"prefetch size must be >= 1, got {size}")
    q: queue.Queue = queue.Queue(maxsize=size)
    stop = threading.Event()
    thread = threading.Thread(target=_produce, args=(iter(iterator), q, stop, put), name="adpsgd-prefetch", daemon=True)
    out = _consume(q, stop, thread)
    weakref.finalize(out, stop.set)  # Also stops a producer whose consumer never started.
    thread.start()
    return out
