"""Every bad input the CLI is known to refuse, run through ``cifar.main`` in this process: exit 2, one
line ``error: ...`` naming the flag, nothing written in --out. The outcomes make docs/bad_input.md;
the test fails when that table differs from what the cases give now, so it stays true.
``UPDATE_BAD_INPUT_TABLE=1 pytest tests/test_bad_input.py`` rewrites it.
"""

import contextlib
import io
import os
import shlex
import subprocess
import sys
from typing import NamedTuple

import pytest

from experiments import cifar, translate
from experiments.config import ConfigError
from experiments.flags import parser

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TABLE = os.path.join(ROOT, "docs", "bad_input.md")
# (flags, the flag the message must name). --dataset digits is added where no --dataset is given, and
# every command ends in --out OUT --quiet; {file} is an existing plain file, {tmp} a fresh folder.
CASES = [
    # Names and choices
    (["--dataset", "imagenet"], "--dataset"),
    (["--dataset", "tfds:Not A Name"], "--dataset"),
    (["--model", "transformer"], "--model"),
    (["--strategy", "gossip"], "--strategy"),
    (["--schedule", "sometimes"], "--schedule"),
    (["--schedule", "no_such_module_anywhere:ramp"], "--schedule"),
    (["--compare", "cpsgd,my schedules:ramp"], "--compare"),
    (["--strategy", "qsgd", "--schedule", "adpsgd"], "--schedule"),
    (["--compare", "cpsgd,magic"], "--compare"),
    (["--compare", "cpsgd,cpsgd"], "--compare"),
    (["--compare", ","], "--compare"),
    (["--compare", "cpsgd", "--strategy", "average"], "--compare"),
    (["--lr-schedule", "linear"], "--lr-schedule"),
    (["--dtype", "float16"], "--dtype"),
    (["--worker-loop", "scan"], "--worker-loop"),
    (["--augment", "rotate"], "--augment"),
    (["--partition", "random"], "--partition"),
    (["--outer-optimizer", "adam"], "--outer-optimizer"),
    # Numbers out of range
    (["--workers", "0"], "--workers"),
    (["--epochs", "0"], "--epochs"),
    (["--epochs", "-3"], "--epochs"),
    (["--batch-size", "0"], "--batch-size"),
    (["--lr", "0"], "--lr"),
    (["--lr", "inf"], "--lr"),
    (["--lr", "nan"], "--lr"),
    (["--momentum", "1"], "--momentum"),
    (["--weight-decay", "-1"], "--weight-decay"),
    (["--weight-decay", "inf"], "--weight-decay"),
    (["--lr-decay-factor", "0"], "--lr-decay-factor"),
    (["--lr-decay-epochs", "20,10"], "--lr-decay-epochs"),
    (["--lr-decay-epochs", "5,x"], "--lr-decay-epochs"),
    (["--avg-period", "0"], "--avg-period"),
    (["--avg-period", "10000"], "--avg-period"),
    (["--schedule", "post_local", "--local-warmup-epochs", "30"], "--local-warmup-epochs"),
    (["--strategy", "qsgd", "--qsgd-levels", "0"], "--qsgd-levels"),
    (["--strategy", "qsgd", "--qsgd-bucket-size", "0"], "--qsgd-bucket-size"),
    (["--schedule", "qsr", "--qsr-alpha", "-0.1"], "--qsr-alpha"),
    (["--schedule", "qsr", "--qsr-alpha", "nan"], "--qsr-alpha"),
    (["--schedule", "qsr", "--qsr-init-period", "0"], "--qsr-init-period"),
    (["--schedule", "qsr", "--qsr-min-period", "0"], "--qsr-min-period"),
    (["--schedule", "qsr", "--qsr-min-period", "16"], "--qsr-min-period"),
    (["--schedule", "qsr", "--qsr-power", "0"], "--qsr-power"),
    (["--schedule", "qsr", "--qsr-power", "inf"], "--qsr-power"),
    (["--schedule", "qsr", "--qsr-base-period", "2"], "--qsr-base-period"),
    (["--dataset", "synthetic", "--synthetic-size", "0"], "--synthetic-size"),
    (["--partition", "dirichlet:0"], "--partition"),
    (["--partition", "dirichlet:1e-300"], "--partition"),
    (["--partition", "dirichlet:inf"], "--partition"),
    (["--partition", "dirichlet:0.01", "--workers", "16"], "--partition"),
    (["--group-size", "3"], "--group-size"),
    (["--group-size", "0"], "--group-size"),
    (["--group-size", "some"], "--group-size"),
    (["--outer-optimizer", "nesterov", "--outer-lr", "-0.7"], "--outer-lr"),
    (["--outer-optimizer", "sgd", "--outer-momentum", "1.5"], "--outer-momentum"),
    (["--outer-optimizer", "nesterov", "--outer-momentum", "0"], "--outer-momentum"),
    (["--outer-lr", "0.5"], "--outer-lr"),
    (["--fragments", "0"], "--fragments"),
    (["--fragments", "3"], "--fragments"),
    (["--fragments", "2", "--fragment-delay", "8"], "--fragment-delay"),
    (["--fragments", "2", "--fragment-delay", "-1"], "--fragment-delay"),
    (["--fragments", "2", "--fragment-alpha", "1.5"], "--fragment-alpha"),
    # Seeds
    (["--seeds", ","], "--seeds"),
    (["--seeds", " "], "--seeds"),
    (["--seeds", "1,1"], "--seeds"),
    (["--seeds", "1,x"], "--seeds"),
    (["--seeds=-1,2"], "--seeds"),
    (["--seed", "-1"], "--seed"),
    (["--seed", "4294967296"], "--seed"),
    (["--seed", "1", "--seeds", "2,3"], "--seed"),
    # Flags that no run of the command reads
    (["--lr-schedule", "cosine", "--lr-decay-epochs", "10"], "--lr-decay-epochs"),
    (["--lr-schedule", "constant", "--lr-decay-factor", "0.5"], "--lr-decay-factor"),
    (["--local-warmup-epochs", "2"], "--local-warmup-epochs"),
    (["--qsgd-levels", "4"], "--qsgd-levels"),
    (["--compare", "cpsgd,adpsgd", "--qsgd-bucket-size", "64"], "--qsgd-bucket-size"),
    (["--qsr-alpha", "0.2"], "--qsr-alpha"),
    (["--compare", "cpsgd,trigger", "--qsr-min-period", "2"], "--qsr-min-period"),
    (["--qsr-power", "3"], "--qsr-power"),
    (["--synthetic-size", "100"], "--synthetic-size"),
    (["--data-dir", "{tmp}"], "--data-dir"),
    (["--dataset", "synthetic", "--data-dir", "{tmp}"], "--data-dir"),
    (["--strategy", "allreduce", "--group-size", "2"], "--group-size"),
    (["--strategy", "qsgd", "--outer-optimizer", "sgd"], "--outer-optimizer"),
    (["--strategy", "allreduce", "--fragments", "2"], "--fragments"),
    (["--strategy", "qsgd", "--fragment-delay", "1"], "--fragment-delay"),
    # Devices (checked against the 8 CPU devices this test session runs on)
    (["--devices", "0"], "--devices"),
    (["--devices", "3"], "--devices"),
    (["--workers", "8", "--devices", "2", "--worker-loop", "5"], "--worker-loop"),
    (["--workers", "16", "--devices", "16"], "--devices"),
    (["--batch-size", "1000"], "--batch-size"),
    # Output, checkpoints, resume
    (["--out", "{file}/sub"], "--out"),
    (["--checkpoint-every", "-1"], "--checkpoint-every"),
    (["--keep-checkpoints", "0"], "--keep-checkpoints"),
    (["--resume", "--out", "{tmp}/absent"], "--resume"),
    # Several processes
    (["--process-id", "0"], "--process-id"),
    (["--num-processes", "2"], "--num-processes"),
    (["--coordinator", "127.0.0.1:9999", "--num-processes", "2", "--process-id", "2"], "--process-id"),
    (["--coordinator", "127.0.0.1:9999", "--num-processes", "2", "--process-id", "-1"], "--process-id"),
    (["--coordinator", "127.0.0.1:9999", "--num-processes", "2"], "--process-id"),
    (["--coordinator", "127.0.0.1", "--num-processes", "2", "--process-id", "0"], "--coordinator"),
    (["--coordinator", "127.0.0.1:0", "--num-processes", "2", "--process-id", "0"], "--coordinator"),
    (["--coordinator", "auto", "--process-id", "0"], "--process-id"),
    (["--coordinator", "127.0.0.1:9999", "--num-processes", "3", "--process-id", "0"], "--num-processes"),
    (["--coordinator", "127.0.0.1:9999", "--num-processes", "0", "--process-id", "0"], "--num-processes"),
    (["--coordinator", "127.0.0.1:9999", "--num-processes", "2", "--process-id", "0", "--devices", "1"], "--devices"),
    (["--distributed-timeout", "0"], "--distributed-timeout"),
    # What argparse itself refuses
    (["--workers", "x"], "--workers"),
    (["--epochs", "1.5"], "--epochs"),
    (["--lr"], "--lr"),
    (["--no-such-flag"], "--no-such-flag"),
]
# The cases that need the devices or the data: refused by setup.prepare, after jax starts but before
# anything compiles. All others are refused by translate.from_args, which imports no jax.
LATE = ["--avg-period 10000", "--schedule qsr --qsr-min-period 16", "--partition dirichlet:0.01 --workers 16",
        "--workers 8 --devices 2 --worker-loop 5", "--workers 16 --devices 16", "--batch-size 1000"]
# Given explicitly but read by no run: only warned about (a sweep passes the budget to every method).
WARNED = [["--strategy", "allreduce", "--avg-period", "4"]]


def command(flags, tmp, file):
    """The argv of a case, with its placeholders filled in."""
    flags = [f.replace("{tmp}", tmp).replace("{file}", file) for f in flags]
    head = [] if any(f.startswith("--dataset") for f in flags) else ["--dataset", "digits"]
    out = [] if "--out" in flags else ["--out", os.path.join(tmp, "out")]
    return head + flags + out + ["--quiet"]


def shown(text, tmp, file):
    return text.replace(file, "FILE").replace(tmp, "TMP")


class Outcome(NamedTuple):
    flags: list
    flag: str  # the flag the message must name
    code: int
    err: str  # stderr, placeholders put back
    early: bool  # refused by translate.from_args, which imports no jax: before jax starts
    written: list  # what the case left in its folder besides the plain file it was given


def refused_early(argv) -> bool:
    try:
        translate.from_args(parser().parse_args(argv))
    except ConfigError:
        return True
    return False


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory):
    """Every case's outcome, each in a folder of its own."""
    rows = []
    for i, (flags, flag) in enumerate(CASES):
        display = [f.replace("{tmp}", "TMP").replace("{file}", "FILE") for f in flags]
        tmp = str(tmp_path_factory.mktemp(f"case{i}"))
        file = os.path.join(tmp, "a-file")
        with open(file, "w") as f:
            f.write("x")
        argv = command(flags, tmp, file)
        with contextlib.redirect_stderr(io.StringIO()) as err:
            early = refused_early(argv)
            err.truncate(0)
            code = cifar.main(argv)
        written = sorted(set(os.listdir(tmp)) - {"a-file"})
        rows.append(Outcome(display, flag, code, shown(err.getvalue().strip(), tmp, file), early, written))
    return rows


@pytest.mark.parametrize("i", range(len(CASES)), ids=[" ".join(f) for f, _ in CASES])
def test_bad_input_is_one_line_error_naming_the_flag_and_nothing_written(outcomes, i):
    o = outcomes[i]
    assert o.code == 2, o
    assert o.err.startswith("error: ") and "\n" not in o.err and "Traceback" not in o.err, o.err
    assert o.flag in o.err, o.err
    assert o.written == [], o.written


def test_at_least_40_cases_all_but_six_before_jax(outcomes):
    assert len(outcomes) >= 40
    assert [shlex.join(o.flags) for o in outcomes if not o.early] == LATE


def test_flag_read_by_no_run_but_documented_is_warned_about_in_one_line(capsys):
    for flags in WARNED:
        configs, _ = translate.from_args(parser().parse_args(command(flags, "/tmp/never", "/tmp/never/f")))
        err = capsys.readouterr().err.strip()
        assert configs and err.startswith("warning: --avg-period is read only by cpsgd") and "\n" not in err, err


def table(outcomes, warned) -> str:
    def cell(text):
        return text.replace("|", "\\|")

    lines = [
        "# Bad input and what the CLI says",
        "",
        "Generated by `tests/test_bad_input.py` (`UPDATE_BAD_INPUT_TABLE=1 pytest tests/test_bad_input.py`), which runs",
        "every case through `experiments.cifar.main` and fails when this file differs from what the cases give.",
        "Each command is `python -m experiments.cifar --dataset digits FLAGS --out OUT --quiet` (no `--dataset digits`",
        "where FLAGS name a dataset; TMP is a fresh folder, FILE a plain file in it). Every one exits with the status",
        "shown, prints the one line shown and writes nothing. *Before jax*: refused by `experiments.translate.from_args`,",
        "which imports no jax; the others need the devices or the data and are refused by `experiments.setup.prepare`,",
        "before anything compiles. The test runs with 8 virtual CPU devices.",
        "",
        "| # | flags | exit | before jax | message |",
        "|---|---|---|---|---|",
    ]
    for i, o in enumerate(outcomes, 1):
        lines.append(f"| {i} | `{cell(shlex.join(o.flags))}` | {o.code} | {'yes' if o.early else 'no'} | {cell(o.err)} |")
    lines += ["", "Given but read by no run of the command, and only warned about (the run goes on):", "",
              "| flags | message |", "|---|---|"]
    lines += [f"| `{shlex.join(flags)}` | {cell(message)} |" for flags, message in warned]
    return "\n".join(lines) + "\n"


def test_the_table_in_docs_is_what_the_cases_give(outcomes, capsys):
    warned = []
    for flags in WARNED:
        translate.from_args(parser().parse_args(command(flags, "/tmp/never", "/tmp/never/f")))
        warned.append((flags, capsys.readouterr().err.strip()))
    text = table(outcomes, warned)
    if os.environ.get("UPDATE_BAD_INPUT_TABLE"):
        with open(TABLE, "w") as f:
            f.write(text)
    with open(TABLE) as f:
        assert f.read() == text, f"{TABLE} is out of date: rerun with UPDATE_BAD_INPUT_TABLE=1"


def test_a_fresh_process_refuses_before_importing_jax(tmp_path):
    # The in-process cases run where jax has started; here a new process checks that the early ones
    # are refused before jax is imported at all (it is what sets the CPU device count).
    (tmp_path / "f").write_text("x")
    early = [command(flags, str(tmp_path), str(tmp_path / "f")) for flags, _ in CASES if shlex.join(flags) not in LATE]
    code = ("import sys; from experiments import cifar; "
            f"codes = [cifar.main(argv) for argv in {early!r}]; print(codes, 'jax' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert proc.stdout.strip() == f"{[2] * len(early)} False", proc.stdout + proc.stderr
    assert len(proc.stderr.strip().splitlines()) == len(early) and "Traceback" not in proc.stderr
