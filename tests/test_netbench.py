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
import tempfile
import time

import pytest

from experiments.net import ns

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REASON = ns.missing_rights()
needs_namespaces = pytest.mark.skipif(REASON is not None, reason=f"cannot create network namespaces: {REASON}")


def env():
    return {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONUNBUFFERED": "1"}  # the CLI asks for its own devices


@needs_namespaces
def test_a_shaped_link_holds_transfers_and_steps_to_its_rate(tmp_path):
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
    # Only bounds that a busy machine cannot break: load makes transfers and steps slower, never faster
    # than the wire. How fast each link is (and the unshaped one against the shaped) is the benchmark's
    # to measure and report, not a test's to assert.
    # The link itself: the probe's 1 MiB transfer (its round trip: nbytes / goodput + rtt) takes at
    # least the wire time at 100 Mbit/s (tbf counts headers too, and its bucket holds two frames).
    probe = shaped["probe"]
    assert (1 << 20) / probe["goodput_Bps"] + probe["rtt_s"] >= (1 << 20) / (100e6 / 8), probe
    # The training step: each full-sync step moves the gradients once each way, B / beta = 49 ms at
    # 100 Mbit/s, and the steps are serialised (each needs the last one's average).
    nbytes = shaped["methods"]["allreduce"]["bytes_per_round"]
    wire = nbytes / (100e6 / 8)
    assert nbytes == unshaped["methods"]["allreduce"]["bytes_per_round"] > 600_000
    assert shaped["full_sync_step_s"] >= 0.5 * wire, (shaped, wire)


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


NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]


def as_nobody(argv, cwd):
    return subprocess.run([*NOBODY, *argv], cwd=cwd, env=env(), capture_output=True, text=True, timeout=60)


@pytest.fixture
def code_for_nobody():
    """A world-readable copy of the code, in the system's temporary folder: the clone (and pytest's own
    temporary folders, which are 0700) may lie under a folder that only its owner can enter, such as a
    ``mktemp -d``, where the unprivileged user could not import it."""
    folder = tempfile.mkdtemp(prefix="netbench-nobody-")
    try:
        for package in ("adpsgd_jax", "experiments"):
            shutil.copytree(os.path.join(ROOT, package), os.path.join(folder, package),
                            ignore=shutil.ignore_patterns("__pycache__"))
        subprocess.run(["chmod", "-R", "a+rX", folder], check=True)
        yield folder
    finally:
        shutil.rmtree(folder)


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None, reason="needs root and setpriv "
                                                                                  "to drop the rights")
def test_without_the_rights_it_says_so_and_exits(code_for_nobody):
    # The interpreter and its packages (a virtualenv inside the clone, say) must be readable by that user
    # too, or there is nothing to test as that user: say why instead of failing on an import.
    interpreter = as_nobody([sys.executable, "-c", "import numpy"], cwd="/")
    if interpreter.returncode:
        pytest.skip(f"user 65534 cannot run {sys.executable} with its packages (under a folder it cannot enter?): "
                    f"{(interpreter.stderr.strip().splitlines() or ['no output'])[-1]}")
    code = as_nobody([sys.executable, "-c", "import experiments.net.ns"], cwd=code_for_nobody)
    if code.returncode:
        pytest.skip(f"user 65534 cannot read the copy of the code in {code_for_nobody} (TMPDIR under a private "
                    f"folder?): {(code.stderr.strip().splitlines() or ['no output'])[-1]}")
    proc = as_nobody([sys.executable, "-m", "experiments.net", "--quick"], cwd=code_for_nobody)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("error: netbench needs root to create network namespaces"), proc.stderr
    assert proc.stderr.count("\n") == 1
