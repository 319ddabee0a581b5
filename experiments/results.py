"""Result files of a run and how to read them back.

A results folder holds one sub-folder per run, named ``<method>-seed<k>``:

* ``metrics.jsonl``: one JSON object per train step: step, epoch, lr, loss,
  accuracy (worker means of the minibatch values), synced (0/1), variance
  (pre-sync V, null where no sync), period, syncs and bytes (cumulative).
* ``eval.jsonl``: one object per evaluation of the averaged model: epoch,
  step, test_loss, test_accuracy.
* ``summary.json``: written last and atomically; a folder without it holds
  an unfinished run.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from typing import Any, Iterator

SUMMARY = "summary.json"
METRICS = "metrics.jsonl"
EVAL = "eval.jsonl"


def run_name(method: str, seed: int) -> str:
    return f"{method}-seed{seed}"


def _clean(value: Any) -> Any:
    """JSON-safe: NaN / inf become null, numpy scalars become Python numbers."""
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class RunWriter:
    """Writes one run's files; starting a run clears that run's old files."""

    def __init__(self, out_dir: str, name: str):
        self.dir = os.path.join(out_dir, name)
        if os.path.isdir(self.dir):
            shutil.rmtree(self.dir)
        os.makedirs(self.dir)
        self._metrics = open(os.path.join(self.dir, METRICS), "w")
        self._eval = open(os.path.join(self.dir, EVAL), "w")

    def metrics(self, row: dict) -> None:
        self._metrics.write(json.dumps({k: _clean(v) for k, v in row.items()}) + "\n")

    def evaluation(self, row: dict) -> None:
        self._eval.write(json.dumps({k: _clean(v) for k, v in row.items()}) + "\n")
        self._eval.flush()

    def summary(self, summary: dict) -> None:
        """Close the logs, then write summary.json atomically (tmp + rename)."""
        self.close()
        tmp = os.path.join(self.dir, SUMMARY + ".tmp")
        with open(tmp, "w") as f:
            json.dump({k: _clean(v) if not isinstance(v, dict) else v for k, v in summary.items()}, f, indent=2)
        os.replace(tmp, os.path.join(self.dir, SUMMARY))

    def close(self) -> None:
        for f in (self._metrics, self._eval):
            if not f.closed:
                f.close()


def read_jsonl(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


class Run:
    """A finished run read back from its folder."""

    def __init__(self, path: str):
        self.path = path
        with open(os.path.join(path, SUMMARY)) as f:
            self.summary = json.load(f)
        self.metrics = read_jsonl(os.path.join(path, METRICS))
        self.evals = read_jsonl(os.path.join(path, EVAL))

    @property
    def method(self) -> str:
        return self.summary["config"]["method"]

    @property
    def seed(self) -> int:
        return self.summary["config"]["seed"]


def finished_runs(out_dir: str) -> Iterator[Run]:
    """Every sub-folder of ``out_dir`` with a summary.json, in name order."""
    for name in sorted(os.listdir(out_dir)):
        path = os.path.join(out_dir, name)
        if os.path.isfile(os.path.join(path, SUMMARY)):
            yield Run(path)
