"""python -m experiments.net: training processes in network namespaces over shaped links.

The tests that build namespaces are skipped, with the reason, where this
process may not create them (not root, or no CAP_SYS_ADMIN / CAP_NET_ADMIN).
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from experiments.net import ns

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REASON = ns.missing_rights()
needs_namespaces = pytest.mark.skipif(REASON is not None, reason=f"cannot create network namespaces: {REASON}")


def env():
    return {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONUNBUFFERED": "1"}  # the CLI asks for its own devices


@needs_namespaces
def test_a_shaped_link_is_slower_than_an_unshaped_one(tmp_path):
    """Full sync of the CNN (605 KB of gradients a step) for 2 epochs of 11 steps,
    2 processes, on the unshaped link and at 100 Mbit/s."""
    assert ns.leftovers() == [], "namespaces of another run are present"
    out = tmp_path / "netbench.json"
    proc = subprocess.run(
        [sys.executable, "-m", "experiments.net", "--quick", "--workloads", "cnn", "--methods", "allreduce",
         "--epochs", "2", "--bandwidths", "unshaped,100", "--timeout", "150", "--out", str(out)],
        cwd=ROOT, env=env(), capture_output=True, text=True, timeout=200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert ns.leftovers() == []
    unshaped, shaped = json.loads(out.read_text())["links"]
    assert (unshaped["bandwidth"], shaped["bandwidth"]) == ("unshaped", "100 Mbit/s")
    # The link itself: a 1 MiB TCP transfer runs at the shaped rate (less the headers), and far faster unshaped.
    assert 85e6 / 8 < shaped["probe"]["goodput_Bps"] < 101e6 / 8
    assert unshaped["probe"]["goodput_Bps"] > 5 * shaped["probe"]["goodput_Bps"]
    # The training step: each full-sync step moves the gradients once each way, B / beta = 49 ms at 100 Mbit/s.
    nbytes = shaped["methods"]["allreduce"]["bytes_per_round"]
    wire = nbytes / (100e6 / 8)
    assert nbytes == unshaped["methods"]["allreduce"]["bytes_per_round"] > 600_000
    assert shaped["full_sync_step_s"] > unshaped["full_sync_step_s"] + 0.5 * wire, (shaped, unshaped)


@needs_namespaces
def test_sigterm_removes_the_namespaces(tmp_path):
    assert ns.leftovers() == [], "namespaces of another run are present"
    proc = subprocess.Popen([sys.executable, "-m", "experiments.net", "--quick", "--keep", str(tmp_path)],
                            cwd=ROOT, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not any(name.endswith("-w1") for name in ns.leftovers()):  # the network is up
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read() if proc.stderr else ""
        time.sleep(0.05)
    time.sleep(2)  # training processes starting inside
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 128 + signal.SIGTERM
    assert ns.leftovers() == []


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None, reason="needs root and setpriv "
                                                                                  "to drop the rights")
def test_without_the_rights_it_says_so_and_exits():
    proc = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable, "-m",
                           "experiments.net", "--quick"], cwd=ROOT, env=env(), capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: netbench needs root to create network namespaces"), proc.stderr
    assert proc.stderr.count("\n") == 1
