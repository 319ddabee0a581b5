"""Live training curves: TensorBoard event files beside a run's logs.

``CurveWriter`` is the ``results.RunWriter`` that the runs use: every row it
writes to metrics.jsonl and eval.jsonl it also writes, as one TensorBoard
event of scalars, to ``<run>/tensorboard/``. Open them with
``tensorboard --logdir OUT`` (one TensorBoard run per folder, e.g.
``adpsgd-seed0/tensorboard``); ``--no-tensorboard`` (``RunOptions.tensorboard``)
turns them off.

* Train tags, at every logged step (``TRAIN_TAGS``): ``train/loss``,
  ``train/accuracy``, ``train/lr``, ``train/syncs``, ``train/bytes``,
  ``train/period``, ``train/variance`` (only at a sync, where metrics.jsonl
  has a number), and where a run logs them ``train/variance_bound``
  (``trigger``), ``train/group_syncs`` / ``train/group_bytes`` (two-level)
  and ``train/monitor_bytes`` (``trigger``).
* Test tags, at each evaluation (``EVAL_TAGS``): ``test/loss``,
  ``test/accuracy``.

The step of each event is the row's ``step``; values are stored as float32
(TensorBoard's scalar), so byte counts above 2**24 are rounded.

The writer is tensorboardX's (no TensorFlow), used through its synchronous
``EventsWriter``: ``SummaryWriter.flush`` does not drain the queue its
background thread reads (the last 10 events then reach the file at the next
120-second tick), whereas here ``flush`` puts every event written so far on
disk. Events are flushed at every evaluation and before every checkpoint,
so a running job's curves are live and a checkpoint's step is on disk
before the checkpoint.

Resume. A killed run may have written events past its last checkpoint,
which the resumed run computes again. So a resumed run deletes the event
files and replays the rows that ``results.RunWriter`` kept (metrics.jsonl
and eval.jsonl cut back to the checkpoint's step) into a fresh file, then
appends: every tag then holds each step once, with the values of the logs.
Replayed events keep the wall time the earlier files gave their step (the
Wall and Relative axes show the real gap of the restart); a step no event
file holds (a run started with ``--no-tensorboard``) gets the time of the
resume. A resume with ``--no-tensorboard`` deletes the earlier event files,
which would no longer match the logs. Only process 0 of a multi-process run
writes (``RunWriter``'s ``enabled``).
"""

from __future__ import annotations

import glob
import math
import os
import shutil
import time
from typing import Optional

from experiments import results

FOLDER = "tensorboard"
# metrics.jsonl field -> tag; a field a row lacks, or holds no finite number for, is left out of its event.
TRAIN_TAGS = {"loss": "train/loss", "accuracy": "train/accuracy", "lr": "train/lr", "syncs": "train/syncs",
              "bytes": "train/bytes", "period": "train/period", "variance": "train/variance",
              "variance_bound": "train/variance_bound", "group_syncs": "train/group_syncs",
              "group_bytes": "train/group_bytes", "monitor_bytes": "train/monitor_bytes"}
EVAL_TAGS = {"test_loss": "test/loss", "test_accuracy": "test/accuracy"}
LOGS = {results.METRICS: TRAIN_TAGS, results.EVAL: EVAL_TAGS}  # each log's tags, in the order a step writes them


class EventFile:
    """One TensorBoard event file in ``folder``, written synchronously."""

    def __init__(self, folder: str):
        from tensorboardX.event_file_writer import EventsWriter
        from tensorboardX.proto import event_pb2, summary_pb2

        self._event, self._summary = event_pb2.Event, summary_pb2.Summary
        os.makedirs(folder, exist_ok=True)
        self._writer = EventsWriter(os.path.join(folder, "events"))

    def scalars(self, step: int, values: dict, wall_time: Optional[float] = None) -> None:
        """One event at ``step`` holding each tag -> value of ``values``."""
        summary = self._summary(value=[self._summary.Value(tag=tag, simple_value=v) for tag, v in values.items()])
        self._writer.write_event(self._event(wall_time=time.time() if wall_time is None else wall_time,
                                             step=step, summary=summary))

    def flush(self) -> None:
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


def tagged(row: dict, tags: dict) -> dict:
    """tag -> float of the fields of ``row`` named in ``tags`` that hold a finite number."""
    values = {tag: results.clean(row.get(key)) for key, tag in tags.items()}
    return {tag: float(v) for tag, v in values.items() if isinstance(v, (int, float)) and math.isfinite(v)}


def wall_times(folder: str) -> dict:
    """(step, first tag) -> wall time of the events in ``folder``'s event files (``train/loss`` for a
    metrics row, ``test/loss`` for an evaluation), read with tensorboard's own loader, which stops at a
    file's incomplete last record (a killed run's)."""
    from tensorboard.backend.event_processing.event_file_loader import LegacyEventFileLoader

    times = {}
    for path in sorted(glob.glob(os.path.join(folder, "events.out.tfevents.*"))):
        for event in LegacyEventFileLoader(path).Load():
            if event.summary.value:
                times.setdefault((event.step, event.summary.value[0].tag), event.wall_time)
    return times


class CurveWriter(results.RunWriter):
    """A ``results.RunWriter`` that also writes each metrics and evaluation row as TensorBoard scalars in
    ``<run>/tensorboard/`` (``tensorboard=False``: none); a resume rewrites them from the kept rows."""

    def __init__(self, out_dir: str, name: str, config: dict, resume_step: Optional[int] = None,
                 enabled: bool = True, tensorboard: bool = True):
        super().__init__(out_dir, name, config, resume_step, enabled)
        self.events: Optional[EventFile] = None
        if not enabled:
            return
        folder = os.path.join(self.dir, FOLDER)
        earlier = wall_times(folder) if resume_step is not None and tensorboard else {}
        shutil.rmtree(folder, ignore_errors=True)  # a fresh run's folder is new; a resumed run's is replayed
        if not tensorboard:
            return
        self.events = EventFile(folder)
        if resume_step is not None:
            self._replay(earlier)

    def _replay(self, earlier: dict) -> None:
        """The kept rows of metrics.jsonl and eval.jsonl (cut back to the checkpoint) in the order the run
        wrote them (a step's metrics, then its evaluation), with their steps' earlier wall times."""
        rows = [(row["step"], order, row, tags) for order, (log, tags) in enumerate(LOGS.items())
                for row in results.read_jsonl(os.path.join(self.dir, log))]
        for step, _, row, tags in sorted(rows, key=lambda r: r[:2]):
            values = tagged(row, tags)
            self.events.scalars(step, values, earlier.get((step, next(iter(values), None))))
        self.events.flush()

    def metrics(self, row: dict) -> None:
        super().metrics(row)
        if self.events is not None:
            self.events.scalars(row["step"], tagged(row, TRAIN_TAGS))

    def evaluation(self, row: dict) -> None:
        super().evaluation(row)
        if self.events is not None:
            self.events.scalars(row["step"], tagged(row, EVAL_TAGS))
            self.events.flush()  # live: the curves so far are on disk after each evaluation

    def flush(self) -> None:
        super().flush()
        if self.events is not None:
            self.events.flush()

    def close(self) -> None:
        super().close()
        if self.events is not None:
            self.events.close()
            self.events = None
