"""The notebooks run top to bottom.

Every notebook in ``notebooks/`` is executed, cell by cell, in a fresh
kernel of this virtualenv (nbclient, kernel ``python3`` started with this
interpreter) with its small default settings. The kernel gets no jax or XLA
device settings from the test: each notebook asks for the CPU and 8 virtual
devices itself (``distributed.set_cpu_devices``, before jax's first
operation), as it must in a plain Jupyter kernel. Any cell error fails the
test. The executed copies are kept in pytest's temp folder; the stored
notebooks carry no outputs.

Checks beyond "no error": each notebook's plots arrive as image/png outputs,
and the quickstart prints the CLI's comparison table (same header line as
``python -m experiments.cifar``, rows for allreduce, cpsgd and adpsgd).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time

import nbformat
import pytest
from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel
from jupyter_client.manager import KernelManager
from nbclient import NotebookClient

from experiments import report
from experiments.config import default_cpu_devices

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK_DIR = os.path.join(ROOT, "notebooks")
KERNEL = "python3"
CELL_TIMEOUT = 300  # seconds per cell
# Notebook -> the number of plots it draws (each must arrive as an image/png output).
NOTEBOOKS = {
    "01_quickstart.ipynb": 2,
    "02_schedules.ipynb": 6,
    "03_paper_reproduction.ipynb": len(report.PLOTS) + 1,  # report.build's PNGs, and the time-to-target bars
}
QUICKSTART_METHODS = ("allreduce", "cpsgd", "adpsgd")
_PROBE = ("# test_notebooks: which interpreter ran the kernel, on which devices\nimport sys\nimport jax\n"
          "print('KERNEL-PREFIX=' + sys.prefix)\n"
          "print(f'KERNEL-DEVICES={jax.devices()[0].platform}:{jax.device_count()}')")
_JAX_USE = re.compile(r"(?<![\w.])(import jax|from jax|jax\.)")  # a cell that imports jax or calls it (not adpsgd_jax)


def test_every_notebook_is_listed():
    on_disk = sorted(f for f in os.listdir(NOTEBOOK_DIR) if f.endswith(".ipynb"))
    assert on_disk == sorted(NOTEBOOKS)


@pytest.mark.parametrize("name", sorted(NOTEBOOKS))
def test_stored_without_outputs(name):
    nb = nbformat.read(os.path.join(NOTEBOOK_DIR, name), as_version=4)
    nbformat.validate(nb)
    assert nb.metadata["kernelspec"]["name"] == KERNEL
    code = [c for c in nb.cells if c.cell_type == "code"]
    for cell in code:
        assert cell.outputs == [] and cell.execution_count is None, f"{name}: stored with outputs: {cell.source[:60]!r}"
    assert not any("XLA_FLAGS" in c.source or "xla_force_host_platform_device_count" in c.source for c in code), (
        f"{name}: sets XLA_FLAGS; use adpsgd_jax.distributed.set_cpu_devices")
    install = next((i for i, c in enumerate(code) if "%pip install" in c.source and "requirements" in c.source), None)
    assert install is not None, f"{name}: no install cell"
    # The platform and the virtual devices are set in the first cell that touches jax, before anything else does.
    devices = next(i for i, c in enumerate(code) if "set_cpu_devices(" in c.source)
    first_jax = next(i for i, c in enumerate(code) if _JAX_USE.search(c.source))
    assert install < devices == first_jax, name
    source = code[devices].source
    platform = source.index('jax.config.update("jax_platforms", "cpu")')
    calls = [i for i in (source.find("jax.device", platform), source.find("jnp.", platform)) if i >= 0]
    assert platform < source.index("set_cpu_devices(") < min(calls, default=len(source)), name


def test_reproduction_notebook_has_a_parameters_cell():
    nb = nbformat.read(os.path.join(NOTEBOOK_DIR, "03_paper_reproduction.ipynb"), as_version=4)
    tagged = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1 and 'SIZE = "small"' in tagged[0].source


@pytest.fixture(scope="session")
def kernel_name():
    """The ``python3`` kernel of this virtualenv, installed into sys.prefix when missing."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("JUPYTER_PREFER_ENV_PATH", "1")  # sys.prefix's kernels before the user's own
        try:
            KernelSpecManager().get_kernel_spec(KERNEL)
        except NoSuchKernel:
            subprocess.run([sys.executable, "-m", "ipykernel", "install", "--sys-prefix", "--name", KERNEL],
                           check=True, capture_output=True)
        command = KernelManager(kernel_name=KERNEL).format_kernel_cmd()
        assert os.path.dirname(os.path.abspath(command[0])) == os.path.dirname(os.path.abspath(sys.executable)), (
            f"kernel {KERNEL!r} starts {command[0]}, not this virtualenv's interpreter {sys.executable}")
        yield KERNEL


def _kernel_env() -> dict:
    """The test's environment for the kernel, without jax's platform or device count (the notebooks set
    both) and without a matplotlib backend."""
    env = dict(os.environ)
    env.pop("MPLBACKEND", None)  # ipykernel then picks the inline backend, as under a notebook server
    env.pop("JAX_PLATFORMS", None)
    env.pop("JAX_NUM_CPU_DEVICES", None)
    flags = [f for f in env.get("XLA_FLAGS", "").split() if "xla_force_host_platform_device_count" not in f]
    if flags:
        env["XLA_FLAGS"] = " ".join(flags)
    else:
        env.pop("XLA_FLAGS", None)
    return env


@pytest.fixture(scope="session")
def executed(kernel_name, tmp_path_factory):
    """``executed(name)``: the notebook run top to bottom (once per session), and its seconds."""
    cache: dict = {}
    out_dir = tmp_path_factory.mktemp("executed_notebooks")

    def run(name):
        if name not in cache:
            nb = nbformat.read(os.path.join(NOTEBOOK_DIR, name), as_version=4)
            nb.cells.append(nbformat.v4.new_code_cell(_PROBE))
            client = NotebookClient(nb, kernel_name=kernel_name, timeout=CELL_TIMEOUT, allow_errors=False,
                                    resources={"metadata": {"path": NOTEBOOK_DIR}})  # cwd: notebooks/
            start = time.perf_counter()
            try:
                client.execute(env=_kernel_env())
            finally:
                nbformat.write(nb, str(out_dir / name))
            cache[name] = nb, time.perf_counter() - start
        return cache[name]

    return run


def _outputs(nb):
    for cell in nb.cells:
        if cell.cell_type == "code":
            yield from cell.outputs


def _stdout(nb) -> str:
    return "".join(o.text for o in _outputs(nb) if o.output_type == "stream" and o.name == "stdout")


@pytest.mark.parametrize("name", sorted(NOTEBOOKS))
def test_notebook_runs_top_to_bottom(name, executed, record_property):
    nb, seconds = executed(name)
    record_property("seconds", round(seconds, 1))
    print(f"{name}: {seconds:.1f} s")
    assert not [o for o in _outputs(nb) if o.output_type == "error"]
    assert f"KERNEL-PREFIX={sys.prefix}\n" in _stdout(nb), "the kernel did not run this virtualenv's python"
    # 01 and 02 ask for 8 CPU devices; 03 follows the CLI's default for its 8 workers.
    devices = default_cpu_devices(8) if name.startswith("03") else 8
    assert f"KERNEL-DEVICES=cpu:{devices}\n" in _stdout(nb), f"{name}: the notebook did not set up {devices} CPU devices"
    images = [o for o in _outputs(nb) if "image/png" in o.get("data", {})]
    assert len(images) >= NOTEBOOKS[name], f"{name}: {len(images)} PNG outputs, expected {NOTEBOOKS[name]}"


def _table_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("|")]


def test_quickstart_prints_the_cli_table(executed, tmp_path, capsys):
    from experiments import cifar

    out = tmp_path / "cli"
    argv = ["--dataset", "digits", "--compare", "allreduce", "--epochs", "1", "--out", str(out), "--quiet",
            "--no-plots", "--checkpoint-every", "0"]
    assert cifar.main(argv) == 0
    cli_header = _table_lines(capsys.readouterr().out)[0]
    assert cli_header.startswith("| method |")

    nb, _ = executed("01_quickstart.ipynb")
    lines = _table_lines(_stdout(nb))
    assert cli_header in lines, "the quickstart does not print the CLI's table header"
    table = lines[lines.index(cli_header):]
    columns = cli_header.count("|")
    for method in QUICKSTART_METHODS:
        rows = [line for line in table if line.startswith(f"| {method} |")]
        assert len(rows) == 1, f"no row for {method}"
        assert rows[0].count("|") == columns
