"""End to end: ``python -m experiments.cifar`` on digits, every method, and
the one-line errors for bad input."""

import json
import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from experiments import cifar, config as cfg, report, results, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METHODS = list(cfg.METHODS)
SUMMARY_KEYS = {"final_train_loss", "test_accuracy", "syncs", "bytes", "wall_clock_s", "compute_s", "config",
                "versions", "device_kind"}


@pytest.fixture(scope="module")
def compare_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("compare")
    argv = ["--dataset", "digits", "--compare", ",".join(METHODS), "--epochs", "2", "--avg-period", "4",
            "--out", str(out), "--quiet"]
    assert cifar.main(argv) == 0
    return out


def replay(run: results.Run) -> list:
    """The sync flags the run's schedule gives when fed the logged variances and losses."""
    c = cfg.from_saved(run.summary["config"])
    T, spe = run.summary["steps"], run.summary["steps_per_epoch"]
    schedule = train.make_schedule(c, T, spe, train.lr_schedule(c, spe, T))
    if schedule is None:
        return [1] * T
    state, flags = schedule.init(), []
    for t, row in enumerate(run.metrics):
        sync = bool(schedule.should_sync(state, jnp.int32(t)))
        flags.append(int(sync))
        if sync:
            state = schedule.update(state, jnp.int32(t), jnp.float32(row["variance"]), jnp.float32(row["loss"]))
    return flags


def test_every_method_writes_parseable_results(compare_dir):
    runs = {r.method: r for r in results.finished_runs(str(compare_dir))}
    assert set(runs) == set(METHODS)
    steps = 2 * (1437 // (8 * 16))
    for method, run in runs.items():
        assert SUMMARY_KEYS <= set(run.summary), method
        assert run.summary["steps"] == steps and len(run.metrics) == steps
        assert [e["epoch"] for e in run.evals] == [1.0, 2.0]
        synced = [row["synced"] for row in run.metrics]
        assert run.summary["syncs"] == sum(synced) == run.metrics[-1]["syncs"], method
        assert synced == replay(run), method  # the summary's syncs are the schedule's
        assert 0.0 < run.summary["test_accuracy"] <= 1.0 and np.isfinite(run.summary["final_train_loss"])
        assert run.summary["config"]["method"] == method
    assert runs["cpsgd"].summary["syncs"] == steps // 4
    assert runs["allreduce"].summary["syncs"] == runs["full_sync"].summary["syncs"] == steps
    budget = steps // 4
    assert 0.9 * budget <= runs["adpsgd"].summary["syncs"] <= budget
    # Parameter averaging sends parameters + the 8-byte scalar pair per sync.
    cp = runs["cpsgd"].summary
    assert cp["bytes"] == cp["syncs"] * (cp["param_bytes"] + 8)
    variances = [row["variance"] for row in runs["cpsgd"].metrics]
    assert all((v is None) == (s == 0) for v, s in zip(variances, (r["synced"] for r in runs["cpsgd"].metrics)))


def test_report_table_and_plots(compare_dir):
    text = (compare_dir / "report.md").read_text()
    for method in METHODS:
        assert f"| {method} |" in text
    assert "allreduce (ideal overlap)" in text and "@10 Gbps" in text and "@100 Gbps" in text
    for name in report.PLOTS:
        data = (compare_dir / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000, name
    # The standalone report command reads the same folder.
    assert report.main([str(compare_dir), "--no-plots", "--predict-workers", "64"]) == 0


def test_time_model_in_report_matches_formula(compare_dir):
    run = next(r for r in results.finished_runs(str(compare_dir)) if r.method == "cpsgd")
    s = run.summary
    per_round = s["bytes"] / s["syncs"]
    bw = 10e9 / 8
    expected = s["compute_s"] + s["syncs"] * (2 * 7 * 10e-6 + 2 * 7 / 8 * per_round / bw)
    assert report.simulated_time(run, 8, 10, 10e-6) == pytest.approx(expected)


BAD = [
    (["--dataset", "imagenet"], "--dataset"),
    (["--dataset", "digits", "--schedule", "sometimes"], "--schedule"),
    (["--dataset", "digits", "--strategy", "gossip"], "--strategy"),
    (["--dataset", "digits", "--compare", "cpsgd,magic"], "--compare"),
    (["--dataset", "digits", "--epochs", "0"], "--epochs"),
    (["--dataset", "digits", "--epochs", "-3"], "--epochs"),
    (["--dataset", "digits", "--batch-size", "1000"], "--batch-size"),
    (["--dataset", "digits", "--workers", "16"], "--workers"),
    (["--dataset", "digits", "--avg-period", "0"], "--avg-period"),
    (["--dataset", "digits", "--partition", "dirichlet:0"], "--partition"),
    (["--dataset", "digits", "--model", "transformer"], "--model"),
    (["--dataset", "digits", "--strategy", "qsgd", "--schedule", "adpsgd"], "--schedule"),
]


@pytest.mark.parametrize("argv,flag", BAD, ids=[" ".join(a[2:]) or a[1] for a, _ in BAD])
def test_bad_input_is_one_line_error_before_training(tmp_path, capsys, argv, flag):
    out = tmp_path / "out"
    assert cifar.main(argv + ["--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and flag in err and "\n" not in err and "Traceback" not in err
    assert not out.exists()  # nothing written


def test_unwritable_output_folder(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert cifar.main(["--dataset", "digits", "--out", str(blocker / "sub"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --out") and "\n" not in err


def test_cifar_without_data_stops_at_once_with_advice(tmp_path):
    # A real subprocess: the CLI sets the virtual devices itself; no traceback.
    proc = subprocess.run(
        [sys.executable, "-m", "experiments.cifar", "--data-dir", str(tmp_path / "tfds"), "--out", str(tmp_path / "o"),
         "--epochs", "1"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    assert "--dataset digits" in proc.stderr and "--data-dir" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "o").exists()


def test_summary_is_valid_json_with_config_roundtrip(compare_dir):
    path = compare_dir / results.run_name("adpsgd", 0) / results.SUMMARY
    summary = json.loads(path.read_text())
    c = cfg.from_saved(summary["config"])
    assert c.method == "adpsgd" and c.dataset == "digits" and c.avg_period == 4
