"""TensorBoard curves (experiments/curves.py), read back with TensorBoard's own event reader: the tags
and steps of metrics.jsonl and eval.jsonl with their values, live after each evaluation, rewritten on
--resume without a duplicated step, and none with --no-tensorboard."""

import os

import numpy as np
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

from experiments import cifar, curves, results, train

# 2 epochs of 11 steps, a checkpoint every 10 steps (10, 20 and the last, 22), evaluations at 11 and 22.
ARGS = ["--dataset", "digits", "--epochs", "2", "--checkpoint-every", "10", "--quiet", "--no-plots",
        "--compare", "adpsgd"]
NAME = results.run_name("adpsgd", 0)
TRAIN = {"train/loss", "train/accuracy", "train/lr", "train/syncs", "train/bytes", "train/period", "train/variance"}
TEST = {"test/loss", "test/accuracy"}


def events(run_dir) -> dict:
    """tag -> [(step, value, wall time)] of the run's event files, every event kept."""
    reader = EventAccumulator(os.path.join(run_dir, curves.FOLDER), size_guidance={"scalars": 0})
    reader.Reload()
    return {tag: [(e.step, e.value, e.wall_time) for e in reader.Scalars(tag)] for tag in reader.Tags()["scalars"]}


def curve(points) -> list:
    return [(step, value) for step, value, _ in points]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted")
    assert cifar.main(ARGS + ["--out", str(out)]) == 0
    return out / NAME


def test_the_curves_are_the_logs_rows(uninterrupted):
    tags = events(uninterrupted)
    assert set(tags) == TRAIN | TEST
    rows = results.read_jsonl(uninterrupted / results.METRICS)
    assert [r["step"] for r in rows] == list(range(1, 23))
    for key, tag in curves.TRAIN_TAGS.items():
        if tag not in TRAIN:
            continue
        logged = [(r["step"], np.float32(r[key])) for r in rows if r[key] is not None]
        assert curve(tags[tag]) == logged, tag  # every step (variance: each sync's), values to float32
    synced = [r["step"] for r in rows if r["synced"]]
    assert synced and [step for step, _ in curve(tags["train/variance"])] == synced
    evals = results.read_jsonl(uninterrupted / results.EVAL)
    assert [e["step"] for e in evals] == [11, 22]
    for key, tag in curves.EVAL_TAGS.items():
        assert curve(tags[tag]) == [(e["step"], np.float32(e[key])) for e in evals], tag


class Crash(RuntimeError):
    """The run dies after writing the metrics row of a step (as a kill would, but at a fixed step)."""


def test_live_then_resumed_curves_have_each_step_once_and_equal_the_uninterrupted(uninterrupted, tmp_path,
                                                                                  monkeypatch):
    logged, live = train.Run.log, {}

    def log(self, t, metrics):
        row = logged(self, t, metrics)
        if t + 1 == 15:  # read while the run is under way, then die past the checkpoint of step 10
            live.update(events(self.writer.dir))
            raise Crash(t + 1)
        return row

    monkeypatch.setattr(train.Run, "log", log)
    with pytest.raises(Crash):
        cifar.main(ARGS + ["--out", str(tmp_path)])
    # Live: the evaluation of step 11 flushed the curves up to it.
    assert [step for step, _ in curve(live["train/loss"])][:11] == list(range(1, 12))
    first_eval = results.read_jsonl(uninterrupted / results.EVAL)[0]
    assert curve(live["test/loss"]) == [(11, np.float32(first_eval["test_loss"]))]
    run_dir = tmp_path / NAME
    killed = events(run_dir)  # what the crashed run left: steps past its checkpoint, 10
    assert [s for s, _, _ in killed["train/loss"]] == list(range(1, 16))
    assert [s for s, _, _ in killed["test/loss"]] == [11]
    monkeypatch.undo()
    assert cifar.main(ARGS + ["--out", str(tmp_path), "--resume"]) == 0
    resumed, reference = events(run_dir), events(uninterrupted)
    assert set(resumed) == set(reference) == TRAIN | TEST
    for tag, points in resumed.items():
        steps = [s for s, _, _ in points]
        assert len(steps) == len(set(steps)) and steps == sorted(steps), tag  # each step once, in order
        assert curve(points) == curve(reference[tag]), tag
    # The replayed steps keep the wall times the crashed run wrote; steps 11 on are new.
    before = {s: t for s, _, t in killed["train/loss"]}
    after = {s: t for s, _, t in resumed["train/loss"]}
    assert all(after[s] == before[s] for s in range(1, 11)) and all(after[s] > before[15] for s in range(11, 23))
    assert len(os.listdir(run_dir / curves.FOLDER)) == 1


def test_no_tensorboard_writes_no_event_file(tmp_path):
    assert cifar.main(ARGS + ["--no-tensorboard", "--out", str(tmp_path)]) == 0
    run_dir = tmp_path / NAME
    assert (run_dir / results.SUMMARY).exists() and not (run_dir / curves.FOLDER).exists()
    assert not [p for p in tmp_path.rglob("*") if "tfevents" in p.name]


def test_a_torn_last_record_ends_the_read_and_a_process_other_than_0_writes_nothing(tmp_path):
    events_file = curves.EventFile(str(tmp_path / "tb"))
    for step in (1, 2, 3):
        events_file.scalars(step, {"train/loss": 1.0 / step}, wall_time=100.0 + step)
    events_file.close()
    (path,) = (tmp_path / "tb").iterdir()
    path.write_bytes(path.read_bytes()[:-7])  # the last record cut in the middle, as a kill leaves it
    assert curves.wall_times(str(tmp_path / "tb")) == {(1, "train/loss"): 101.0, (2, "train/loss"): 102.0}
    writer = curves.CurveWriter(str(tmp_path / "out"), NAME, {}, enabled=False)
    writer.metrics({"step": 1, "loss": 1.0})
    writer.close()
    assert not (tmp_path / "out").exists()


def test_a_resume_replays_the_kept_rows_in_the_order_written_with_their_wall_times(tmp_path):
    # A killed run's folder by hand: 8 steps logged, evaluations at 3 and 6, events for all of them; the
    # checkpoint is step 4.
    run_dir = tmp_path / NAME
    writer = curves.CurveWriter(str(tmp_path), NAME, {})
    for step in range(1, 9):
        writer.metrics({"step": step, "loss": 1.0 / step, "variance": float("nan") if step % 2 else 0.5})
        if step % 3 == 0:
            writer.evaluation({"step": step, "test_loss": 2.0 / step, "test_accuracy": 0.1 * step})
    writer.close()
    killed = curves.wall_times(str(run_dir / curves.FOLDER))
    resumed = curves.CurveWriter(str(tmp_path), NAME, {}, resume_step=4)
    resumed.metrics({"step": 5, "loss": 0.2})
    resumed.close()
    (path,) = (run_dir / curves.FOLDER).iterdir()
    written = [(e.step, [v.tag for v in e.summary.value]) for e in EventFileLoader(str(path)).Load() if e.summary.value]
    assert written == [(1, ["train/loss"]), (2, ["train/loss", "train/variance"]), (3, ["train/loss"]),
                       (3, ["test/loss", "test/accuracy"]), (4, ["train/loss", "train/variance"]), (5, ["train/loss"])]
    again = curves.wall_times(str(run_dir / curves.FOLDER))
    assert {k: again[k] for k in killed if k[0] <= 4} == {k: t for k, t in killed.items() if k[0] <= 4}
    assert again[5, "train/loss"] >= killed[8, "train/loss"]
    # A resume with --no-tensorboard leaves no event file that the logs no longer match.
    curves.CurveWriter(str(tmp_path), NAME, {}, resume_step=4, tensorboard=False).close()
    assert not (run_dir / curves.FOLDER).exists() and (run_dir / results.METRICS).exists()
