"""Result files of a run and how to read them back.

A results folder holds one sub-folder per run, named ``<label>-seed<k>``
(the label is the method, plus ``+<outer optimizer>`` and ``-group<L>`` when
those options are on):

* ``metrics.jsonl``: one JSON object per train step: step, epoch, lr, loss,
  accuracy (worker means of the minibatch values), synced (0/1), variance
  (pre-sync V, null where no sync), period, syncs and bytes (cumulative;
  across groups in a two-level run, which adds group_syncs and group_bytes,
  the every-step mean inside the groups).
* ``eval.jsonl``: one object per evaluation of the averaged model: epoch,
  step, test_loss, test_accuracy.
* ``tensorboard/``: the rows of both logs as TensorBoard event files
  (``experiments/curves.py``; none with ``--no-tensorboard``).
* ``config.json``: the run's config, written when it starts (``--resume``
  compares it with the flags).
* ``summary.json``: written last and atomically; a folder without it holds
  an unfinished run. Besides the outcomes and counts (``syncs`` and
  ``bytes`` of training, ``eval_rounds`` and ``eval_bytes`` of the
  evaluations' averaging) it holds three timings (``TIMINGS``):
  ``wall_clock_s``, ``measured_step_s`` (the run's own seconds per step,
  all its workers and collectives included) and ``compute_step_s`` (one
  worker's step alone, without communication: the time model's compute).
  ``test_correct`` is the final test evaluation per example: ``count``
  examples in the test set's order, ``packbits`` the base64 text of
  ``numpy.packbits`` of their correctness (1 = right; 1,250 bytes, 1,668
  characters for CIFAR's 10,000). ``unpack_correct`` reads it back.

A resumed run cuts both logs back to the rows of its checkpoint's step and
appends from there, so the files end as those of an uninterrupted run.
"""

from __future__ import annotations

import base64
import json
import math
import os
import shutil
from typing import Any, Iterator, Optional

import numpy as np

from experiments.resume import from_saved

SUMMARY = "summary.json"
CONFIG = "config.json"
METRICS = "metrics.jsonl"
EVAL = "eval.jsonl"
# The summary's timings, which differ between two runs of one config (a resumed run and an uninterrupted one);
# every other field is equal.
TIMINGS = ("wall_clock_s", "compute_step_s", "measured_step_s")


def run_name(label: str, seed: int) -> str:
    """Folder of a run: its ``Config.label`` (the method, plus any outer optimizer and group size) and seed."""
    return f"{label}-seed{seed}"


def clean(value: Any) -> Any:
    """JSON-safe: NaN / inf become null, numpy scalars become Python numbers."""
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def pack_correct(correct) -> dict:
    """Per-example correctness (booleans, the test set's order) as JSON: its count and its bits
    (``numpy.packbits``, first example in the high bit of the first byte) in base64."""
    bits = np.asarray(correct, bool).ravel()
    return {"count": int(bits.size), "packbits": base64.b64encode(np.packbits(bits).tobytes()).decode("ascii")}


def unpack_correct(packed: Optional[dict]) -> Optional[np.ndarray]:
    """The boolean array ``pack_correct`` packed (None for None: a summary without it)."""
    if packed is None:
        return None
    raw = np.frombuffer(base64.b64decode(packed["packbits"]), np.uint8)
    return np.unpackbits(raw, count=packed["count"]).astype(bool)


def write_json_atomic(path: str, obj: Any) -> None:
    """Write ``obj`` as JSON to ``path`` through a temporary file and a rename."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(tmp, path)


def read_json(path: str) -> Any:
    with open(path) as f:
        return json.load(f)


def _truncate_jsonl(path: str, last_step: int) -> None:
    """Keep the rows of ``path`` with step <= last_step (drops a torn last line)."""
    kept = []
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    break
                if row["step"] > last_step:
                    break
                kept.append(line if line.endswith("\n") else line + "\n")
    with open(path + ".tmp", "w") as f:
        f.write("".join(kept))
    os.replace(path + ".tmp", path)


class RunWriter:
    """Writes one run's files.

    A fresh run clears the run's folder and writes config.json; a resumed
    run (``resume_step``) keeps the logs up to that step and appends.
    """

    def __init__(self, out_dir: str, name: str, config: dict, resume_step: Optional[int] = None,
                 enabled: bool = True):
        self.dir = os.path.join(out_dir, name)
        self.enabled = enabled  # False on the processes other than 0 of a multi-process run
        if not enabled:
            return
        if resume_step is None:
            if os.path.isdir(self.dir):
                shutil.rmtree(self.dir)
            os.makedirs(self.dir)
            write_json_atomic(os.path.join(self.dir, CONFIG), config)
        else:
            for log in (METRICS, EVAL):
                _truncate_jsonl(os.path.join(self.dir, log), resume_step)
        self._metrics = open(os.path.join(self.dir, METRICS), "a")
        self._eval = open(os.path.join(self.dir, EVAL), "a")

    def flush(self) -> None:
        """Hand both logs to the OS (before a checkpoint, so they cover its step)."""
        if not self.enabled:
            return
        self._metrics.flush()
        self._eval.flush()

    def metrics(self, row: dict) -> None:
        if not self.enabled:
            return
        self._metrics.write(json.dumps({k: clean(v) for k, v in row.items()}) + "\n")

    def evaluation(self, row: dict) -> None:
        if not self.enabled:
            return
        self._eval.write(json.dumps({k: clean(v) for k, v in row.items()}) + "\n")

    def summary(self, summary: dict) -> None:
        """Close the logs, then write summary.json atomically (tmp + rename)."""
        if not self.enabled:
            return
        self.close()
        cleaned = {k: clean(v) if not isinstance(v, dict) else v for k, v in summary.items()}
        write_json_atomic(os.path.join(self.dir, SUMMARY), cleaned)

    def close(self) -> None:
        if not self.enabled:
            return
        for f in (self._metrics, self._eval):
            if not f.closed:
                f.close()


def read_jsonl(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


class StaleSummary(ValueError):
    """A summary.json written by an older version, without a field a reader needs."""


class Run:
    """A finished run read back from its folder."""

    def __init__(self, path: str):
        self.path = path
        self.summary = read_json(os.path.join(path, SUMMARY))
        self.metrics = read_jsonl(os.path.join(path, METRICS))
        self.evals = read_jsonl(os.path.join(path, EVAL))
        self.pooled_step_s: Optional[float] = None  # set by pool_compute

    @property
    def method(self) -> str:
        return self.summary["config"]["method"]

    @property
    def label(self) -> str:
        """The method with its options (outer optimizer, group size): one table row per label."""
        return from_saved(self.summary["config"]).label

    @property
    def group_size(self) -> int:
        """Workers per group of a two-level run (1 for a flat one)."""
        return self.summary.get("group_size", 1)

    @property
    def seed(self) -> int:
        return self.summary["config"]["seed"]

    @property
    def compute_step_s(self) -> float:
        """One worker's compute per step, measured without communication (the time model's compute term):
        the run's own probe, or after ``pool_compute`` the median probe of the runs sharing its program."""
        if self.summary.get("compute_step_s") is None:
            raise StaleSummary(f"{self.path}: summary.json has no compute_step_s (an older version's run, whose "
                               "compute_s included the run's own communication and all its workers): run it again")
        return self.summary["compute_step_s"] if self.pooled_step_s is None else self.pooled_step_s


def pool_compute(runs: list[Run]) -> None:
    """Give every run the median ``compute_step_s`` of the runs whose probe is the same program (the
    summary's ``compute_program``; older summaries: dataset, model, per-worker batch, dtype): methods
    that do the same local arithmetic then pay the same compute, and one probe's load spike (a busy
    machine) moves no method against another."""
    groups: dict = {}
    for r in runs:
        c = r.summary["config"]
        key = (c["dataset"], c["model"], c["batch_size"], c.get("dtype"), r.summary.get("compute_program"))
        groups.setdefault(key, []).append(r)
    for group in groups.values():
        median = float(np.median([r.compute_step_s for r in group]))
        for r in group:
            r.pooled_step_s = median


def finished_runs(out_dir: str) -> Iterator[Run]:
    """Every sub-folder of ``out_dir`` with a summary.json, in name order."""
    for name in sorted(os.listdir(out_dir)):
        path = os.path.join(out_dir, name)
        if os.path.isfile(os.path.join(path, SUMMARY)):
            yield Run(path)
