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
from experiments.net.__main__ import QUICK_NOTE, main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REASON = ns.missing_rights()
needs_namespaces = pytest.mark.skipif(REASON is not None, reason=f"cannot create network namespaces: {REASON}")


def env():
    return {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONUNBUFFERED": "1"}  # the CLI asks for its own devices


@needs_namespaces
def test_every_method_runs_three_times_in_rotated_order(tmp_path):
    """allreduce and CPSGD (two fragments: rounds of about half the MLP's 38 KB) for 1 epoch of 44 steps,
    2 processes, at 100 Mbit/s, 3 repeats. Only what load cannot change is asserted: repeats, the order they ran in, files, keys and
    byte counts. How fast the link runs, and whether its transfers and steps are no faster than the wire,
    is the benchmark's output (its checks and their verdicts), not a test's."""
    assert ns.leftovers() == [], "namespaces of another run are present"
    out, runs = tmp_path / "netbench.json", tmp_path / "runs" / "mlp-100mbit"
    proc = subprocess.run(
        [sys.executable, "-m", "experiments.net", "--quick", "--methods", "allreduce,cpsgd", "--epochs", "1",
         "--fragments", "2", "--bandwidths", "100", "--timeout", "300", "--out", str(out), "--keep", str(tmp_path / "runs")],
        cwd=ROOT, env=env(), capture_output=True, text=True, timeout=350)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert ns.leftovers() == []
    assert proc.stdout.strip().splitlines()[-1] == QUICK_NOTE
    res = json.loads(out.read_text())
    (link,) = res["links"]
    assert res["repeats"] == 3 and link["bandwidth"] == "100 Mbit/s"
    orders = [["allreduce", "cpsgd"], ["cpsgd", "allreduce"], ["allreduce", "cpsgd"]]
    assert [r["order"] for r in link["repeats"]] == orders
    for r, order in enumerate(orders):  # each repeat's runs, in the order they finished, with their step clocks
        folders = [runs / f"r{r}" / f"{method}{'-frag2' if method == 'cpsgd' else ''}-seed0" for method in order]
        assert all({"summary.json", "step_times-0.jsonl", "step_times-1.jsonl"} <= set(os.listdir(f))
                   for f in folders)
        finished = [os.stat(f / "summary.json").st_mtime_ns for f in folders]
        assert finished == sorted(finished), (r, order)
    assert [x["methods"]["allreduce"]["steps"] for x in link["repeats"]] == [44, 44, 44]
    nbytes = link["methods"]["allreduce"]["bytes_per_round"]
    assert nbytes == 4 * 9_610  # the MLP's float32 gradients
    assert [x["methods"]["cpsgd"]["syncs"] for x in link["repeats"]] == [11, 11, 11]  # 44 steps at period 8 / 2
    assert link["methods"]["cpsgd"]["bytes_per_round"] < 0.75 * nbytes  # one of two fragments a round
    # The link's checks are computed; their verdicts are measurements, not asserted here.
    assert set(link["checks"]) == {"probe_transfer_at_least_wire_time", "allreduce_step_at_least_half_wire_time"}
    assert link["checks"]["allreduce_step_at_least_half_wire_time"]["bound_s"] == pytest.approx(
        0.5 * nbytes / (100e6 / 8))
    assert all(c["verdict"] in ("met", "missed") for c in link["checks"].values())
    # One row for CPSGD: medians over the 3 repeats with their ranges.
    (row,) = res["rows"]
    assert (row["bandwidth"], row["strategy"], row["repeats"]) == ("100 Mbit/s", "cpsgd", 3)
    low, high = row["measured_speedup_range"]
    assert low <= row["measured_speedup"] <= high and row["agrees"] in (True, False)


def test_fewer_than_three_repeats_are_refused(capsys):
    assert main(["--repeats", "2"]) == 2
    err = capsys.readouterr().err
    assert err == "error: --repeats must be >= 3 (a median and a spread), got 2\n"
    assert main(["--fragments", "3"]) == 2
    assert capsys.readouterr().err == ("error: --fragments must be an integer >= 1 that divides --avg-period 8, "
                                       "got 3\n")


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
