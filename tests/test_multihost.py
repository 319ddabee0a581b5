"""Multi-host training through jax.distributed: real processes on 127.0.0.1,
CPU collectives through gloo."""

import os
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from jax.sharding import SingleDeviceSharding

from experiments import checkpoint, results

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# 4 workers x batch 16 on digits: 22 steps per epoch; 3 epochs = 66 steps.
RUN = ["--dataset", "digits", "--workers", "4", "--epochs", "3", "--quiet", "--no-plots"]


def env():
    return {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONUNBUFFERED": "1"}  # the CLI asks for its own devices


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def read_state(run_dir):
    """The latest checkpoint's state as host arrays, whatever device count saved it."""
    folder = os.path.join(run_dir, checkpoint.FOLDER)
    step = max(int(d) for d in os.listdir(folder) if d.isdigit())
    path = os.path.join(folder, str(step), "state")
    reader = ocp.PyTreeCheckpointer()
    tree = reader.metadata(path).item_metadata.tree
    one = SingleDeviceSharding(jax.devices()[0])
    args = jax.tree.map(lambda m: ocp.ArrayRestoreArgs(sharding=one), tree, is_leaf=lambda m: hasattr(m, "shape"))
    return step, jax.tree.map(np.asarray, reader.restore(path, args=ocp.args.PyTreeRestore(restore_args=args)))


def test_two_processes_of_one_device_and_4_workers_equal_one_process_of_8_devices(tmp_path):
    methods = ["--compare", "adpsgd,cpsgd", "--workers", "8"]  # 11 steps per epoch: 33 steps
    single = subprocess.run([sys.executable, "-m", "experiments.cifar", *RUN, *methods, "--devices", "8",
                             "--out", str(tmp_path / "one")],
                            cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr[-3000:]
    launched = subprocess.run([sys.executable, "-m", "experiments.launch", "--num-processes", "2", "--", *RUN, *methods,
                               "--devices", "2", "--out", str(tmp_path / "two")],
                              cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300)
    assert launched.returncode == 0, launched.stderr[-3000:]
    assert "| adpsgd |" in launched.stdout  # process 0 printed the table
    for method in ("adpsgd", "cpsgd"):
        name = results.run_name(method, 0)
        step_a, a = read_state(tmp_path / "one" / name)
        step_b, b = read_state(tmp_path / "two" / name)
        assert step_a == step_b == 33
        assert a["params"]["fc1"]["kernel"].shape[0] == 8  # every worker's replica was saved
        jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6), a["params"], b["params"])
        sa = results.read_json(tmp_path / "one" / name / results.SUMMARY)
        sb = results.read_json(tmp_path / "two" / name / results.SUMMARY)
        assert sa["syncs"] == sb["syncs"] > 0 and sa["bytes"] == sb["bytes"]
        assert (sa["num_devices"], sa["workers_per_device"]) == (8, 1)
        assert (sb["num_workers"], sb["num_devices"], sb["workers_per_device"]) == (8, 2, 4)
        np.testing.assert_allclose(sa["final_train_loss"], sb["final_train_loss"], rtol=1e-4)
    # Only process 0 wrote the shared files.
    assert sorted(os.listdir(tmp_path / "two")) == ["adpsgd-seed0", "cpsgd-seed0", "report.md"]


def test_host_groups_across_two_processes_equal_groups_of_two_in_one(tmp_path):
    # Two-level averaging with each process's 2 devices as one group, and DiLoCo's outer step.
    flags = ["--compare", "adpsgd", "--outer-optimizer", "nesterov"]
    single = subprocess.run([sys.executable, "-m", "experiments.cifar", *RUN, *flags, "--group-size", "2",
                             "--out", str(tmp_path / "one")], cwd=ROOT, env=env(), capture_output=True, text=True,
                            timeout=300)
    assert single.returncode == 0, single.stderr[-3000:]
    launched = subprocess.run([sys.executable, "-m", "experiments.launch", "--num-processes", "2", "--", *RUN, *flags,
                               "--group-size", "host", "--out", str(tmp_path / "two")],
                              cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300)
    assert launched.returncode == 0, launched.stderr[-3000:]
    one, two = tmp_path / "one" / "adpsgd+nesterov-group2-seed0", tmp_path / "two" / "adpsgd+nesterov-hostgroups-seed0"
    (step_a, a), (step_b, b) = read_state(one), read_state(two)
    assert step_a == step_b == 66
    for key in ("params", "anchor", "outer_opt_state"):
        jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6), a[key], b[key])
    sa, sb = (results.read_json(d / results.SUMMARY) for d in (one, two))
    assert sb["group_size"] == 2 and (sa["syncs"], sa["bytes"], sa["group_bytes"]) == (sb["syncs"], sb["bytes"],
                                                                                      sb["group_bytes"])


def start(out, pid, port, *extra):
    log = open(os.path.join(str(out), f"process{pid}.log"), "w+")
    proc = subprocess.Popen(
        [sys.executable, "-m", "experiments.cifar", *RUN, "--epochs", "300", "--compare", "adpsgd", "--out", str(out),
         "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", str(pid),
         "--distributed-timeout", "30", *extra],
        cwd=ROOT, env=env(), stdout=subprocess.DEVNULL, stderr=log)
    return proc, log


@pytest.mark.parametrize("victim", [1, 0])
def test_killing_one_process_stops_the_other(tmp_path, victim):
    port = free_port()
    procs = [start(tmp_path, pid, port) for pid in (0, 1)]
    metrics = tmp_path / results.run_name("adpsgd", 0) / results.METRICS
    deadline = time.monotonic() + 120
    while not (metrics.exists() and metrics.stat().st_size > 0):  # training is under way
        assert time.monotonic() < deadline and all(p.poll() is None for p, _ in procs)
        time.sleep(0.1)
    procs[victim][0].send_signal(signal.SIGKILL)
    survivor, log = procs[1 - victim]
    code = survivor.wait(timeout=120)  # a guard against a hang, not a measurement: a busy machine is slower
    assert code != 0
    log.seek(0)
    text = log.read()
    # Whichever comes first: the survivor's next collective fails (our one-line
    # error, exit 4), or the distributed runtime's heartbeat check stops it
    # (jax's fatal message). Process 1 always gets the latter when process 0,
    # which hosts the coordinator, dies.
    ours, runtime = "a collective failed at step", "another task died"
    assert (ours in text and code == 4) or runtime in text, text[-2000:]
    if victim == 0:
        assert runtime in text


def test_unreachable_coordinator_fails_within_the_timeout(tmp_path):
    port = free_port()  # nothing listens there
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "experiments.cifar", *RUN, "--out", str(tmp_path / "o"), "--coordinator",
         f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", "1", "--distributed-timeout", "4"],
        cwd=ROOT, env=env(), capture_output=True, text=True, timeout=120)
    # It waited the timeout out (a lower bound, which load cannot break), then said so.
    assert proc.returncode == 2 and time.monotonic() - started >= 4
    assert f"error: --coordinator: nothing answers at 127.0.0.1:{port} after 4 s" in proc.stderr
    assert not (tmp_path / "o").exists()
