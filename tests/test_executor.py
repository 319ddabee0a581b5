"""A study's runs as submitit jobs on submitit's local cluster (each job a process of its own): the same
runs as the in-process study, a job killed with SIGKILL retried from its checkpoint, a setting that fails
for good reported while the rest finish, and a run of 2 processes as one job of 2 tasks."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from experiments import executor, results, study

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GRID = dict(dataset="digits", methods=["cpsgd", "adpsgd"], partitions=["iid"], lr_schedules=["cosine"], workers=[4],
            seeds=[0], total_batch=32, args=["--epochs", "2", "--avg-period", "4"])
JOBS = ["--executor", "submitit", "--cluster", "local", "--quiet", "--max-jobs", "2"]
SETTING = "iid-cosine-n4"


def write_grid(folder, **change) -> str:
    path = os.path.join(folder, "grid.toml")
    with open(path, "w") as f:
        f.write("\n".join(f"{k} = {json.dumps(v)}" for k, v in {**GRID, **change}.items()) + "\n")
    return path


def same_run(a: str, b: str) -> None:
    """Two run folders hold the same run: its logs byte for byte, and its loss, syncs and bytes."""
    for name in (results.METRICS, results.EVAL):
        with open(os.path.join(a, name), "rb") as fa, open(os.path.join(b, name), "rb") as fb:
            assert fa.read() == fb.read(), (a, b, name)
    sa, sb = (results.read_json(os.path.join(d, results.SUMMARY)) for d in (a, b))
    assert [sa[k] for k in ("final_train_loss", "syncs", "bytes")] == [sb[k] for k in ("final_train_loss", "syncs",
                                                                                       "bytes")]


@pytest.fixture(scope="module")
def in_process(tmp_path_factory):
    """The grid's runs by the in-process study (--executor local)."""
    folder = str(tmp_path_factory.mktemp("in-process"))
    assert study.main(["--grid", write_grid(folder), "--out", os.path.join(folder, "out"), "--quiet"]) == 0
    return os.path.join(folder, "out", SETTING)


def test_jobs_give_the_in_process_runs_and_a_failing_setting_is_reported(in_process, tmp_path, capsys):
    # Two settings: n4 runs as jobs; n8's folders hold runs of another configuration, which every attempt
    # refuses to resume: reported in one line each, the rest finish, the report covers what finished.
    out = str(tmp_path / "out")
    for method in GRID["methods"]:
        stale = os.path.join(out, "iid-cosine-n8", f"{method}-seed0")
        os.makedirs(stale)
        shutil.copy(os.path.join(in_process, f"{method}-seed0", results.CONFIG), stale)
    grid = write_grid(str(tmp_path), workers=[4, 8])
    assert study.main(["--grid", grid, "--out", out, "--retries", "0", *JOBS]) == 1
    captured = capsys.readouterr()
    for method in GRID["methods"]:
        same_run(os.path.join(in_process, f"{method}-seed0"), os.path.join(out, SETTING, f"{method}-seed0"))
        assert f"{SETTING} {method} seed 0: final loss " in captured.out
    failed = [line for line in captured.err.splitlines() if line.startswith("failed: ")]
    assert len(failed) == 2 and all("iid-cosine-n8" in line and "after 1 attempt (" in line and
                                    "--resume refused" in line for line in failed), failed
    assert all(os.path.isfile(line.rsplit("log: ", 1)[1]) for line in failed)
    rows = json.load(open(os.path.join(out, "study.json")))["rows"]
    assert [(r["setting"], r["method"]) for r in rows] == [(SETTING, "cpsgd"), (SETTING, "adpsgd")]
    assert study.main(["--grid", grid, "--out", out, "--retries", "0", *JOBS]) == 1  # finished runs: not again
    assert captured.out.count("final loss") == 2 and "finished before" in capsys.readouterr().out


def task_pids(out: str) -> list:
    """The processes of submitit jobs writing under ``out``."""
    pids = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                command = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if "submitit.core._submit" in command and out in command:
            pids.append(int(pid))
    return pids


def test_a_job_killed_with_sigkill_is_retried_and_ends_as_the_uninterrupted_run(in_process, tmp_path):
    out = str(tmp_path / "out")
    grid = write_grid(str(tmp_path), methods=["cpsgd"], args=GRID["args"] + ["--checkpoint-every", "4"])
    study_cmd = [sys.executable, "-m", "experiments.study", "--grid", grid, "--out", out, *JOBS]
    run = os.path.join(out, SETTING, "cpsgd-seed0")
    proc = subprocess.Popen(study_cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    killed, deadline = [], time.monotonic() + 240
    while not killed and proc.poll() is None and time.monotonic() < deadline:
        checkpoints = os.path.join(run, "checkpoints")
        if os.path.isdir(checkpoints) and any(n.isdigit() for n in os.listdir(checkpoints)) and \
                not os.path.exists(os.path.join(run, results.SUMMARY)):
            for pid in task_pids(out):
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
        time.sleep(0.02)
    stdout, stderr = proc.communicate(timeout=300)
    assert killed, (stdout, stderr)
    assert proc.returncode == 0, stderr
    assert len(os.listdir(os.path.join(out, executor.FOLDER))) - 1 == 2  # two jobs ("%j" is the folder pattern)
    same_run(os.path.join(in_process, "cpsgd-seed0"), run)
    assert "cpsgd seed 0: final loss" in stdout


def test_a_run_of_two_processes_is_one_job_of_two_tasks(in_process, tmp_path, capsys):
    out = str(tmp_path / "out")
    grid = write_grid(str(tmp_path), methods=["cpsgd"], processes=2)
    assert study.main(["--grid", grid, "--out", out, *JOBS]) == 0
    jobs = [d for d in os.listdir(os.path.join(out, executor.FOLDER)) if d.isdigit()]
    assert len(jobs) == 1
    logs = sorted(n for n in os.listdir(os.path.join(out, executor.FOLDER, jobs[0])) if n.endswith("_log.out"))
    assert len(logs) == 2  # task 0 and task 1
    with open(os.path.join(out, executor.FOLDER, jobs[0], logs[0])) as f:
        assert "workers: 4 on 2 CPU devices, 2 per device" in f.read()  # process 0 speaks for the run
    two, one = (results.read_json(os.path.join(d, results.SUMMARY)) for d in (os.path.join(out, SETTING, "cpsgd-seed0"),
                                                                             os.path.join(in_process, "cpsgd-seed0")))
    assert two["syncs"] == one["syncs"] and two["bytes"] == one["bytes"]
    assert two["final_train_loss"] == pytest.approx(one["final_train_loss"], rel=1e-5)
    assert study.main(["--grid", grid, "--out", out, "--quiet"]) == 2  # in this process: refused
    assert "needs --executor submitit" in capsys.readouterr().err
