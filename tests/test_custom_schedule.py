"""docs/custom_schedule.md as it stands: its schedule in a user's own module, run through the library,
the command line and a study grid; and every refusal of a plug-in schedule, one line naming the flag."""

import json
import math
import os
import pathlib
import re

import numpy as np
import pytest

from experiments import cifar, study
from helpers import simulate

PAGE = pathlib.Path(__file__).resolve().parent.parent / "docs" / "custom_schedule.md"
SPEC = "my_schedules:linear_ramp"


def page_module() -> str:
    block = re.search(r"<!-- custom schedule: begin -->\n```python\n(.*?)```\n<!-- custom schedule: end -->",
                      PAGE.read_text(), re.S)
    assert block, "docs/custom_schedule.md lost its example markers"
    return block.group(1)


BROKEN = '''
from typing import NamedTuple
import jax.numpy as jnp
from adpsgd_jax.schedules import Schedule

class NoPeriod(NamedTuple):
    count: jnp.ndarray

def raises(total_steps, avg_period, lr_schedule):
    raise ValueError("avg_period must be even")

def not_a_schedule(total_steps, avg_period, lr_schedule):
    return {"period": avg_period}

def integer_flag(total_steps, avg_period, lr_schedule):
    return Schedule(lambda: NoPeriod(jnp.int32(0)), lambda s, t: t % avg_period, lambda s, t, v, l: s)

def no_period(total_steps, avg_period, lr_schedule):
    return Schedule(lambda: NoPeriod(jnp.int32(0)), lambda s, t: t % avg_period == 0, lambda s, t, v, l: s)

def untraceable(total_steps, avg_period, lr_schedule):
    return Schedule(lambda: NoPeriod(jnp.int32(0)), lambda s, t: bool(t > 3), lambda s, t, v, l: s)

NOT_CALLABLE = 3
'''


@pytest.fixture(scope="module")
def user_dir(tmp_path_factory):
    """A user's folder holding the page's my_schedules.py and a module of broken factories, on sys.path."""
    folder = tmp_path_factory.mktemp("user")
    (folder / "my_schedules.py").write_text(page_module())
    (folder / "broken_schedules.py").write_text(BROKEN)
    with pytest.MonkeyPatch.context() as patch:
        patch.syspath_prepend(str(folder))
        yield folder


def expected_positions(T: int, p: int) -> list:
    """The page's rule, worked out independently: u_k = ceil(T k^2 / C^2) in exact fractions, each at least
    one step after the one before."""
    C, positions = T // p, []
    for k in range(1, C + 1):
        u = math.ceil(T * k * k / (C * C)) if (T * k * k) % (C * C) else T * k * k // (C * C)
        positions.append(max(u, positions[-1] + 1) if positions else u)
    return positions


@pytest.mark.parametrize("T, p", [(100, 8), (330, 8), (64, 1), (50, 50), (1000, 7)])
def test_the_pages_schedule_makes_its_positions_in_a_jitted_scan(user_dir, T, p):
    import my_schedules

    synced, periods = simulate(my_schedules.linear_ramp(total_steps=T, avg_period=p), T)
    positions = (np.nonzero(synced)[0] + 1).tolist()
    assert positions == expected_positions(T, p)
    assert len(positions) == T // p and positions[-1] == T  # the budget exactly, the last sync at the end
    gaps = np.diff([0] + positions)
    # The period reported at the step of each sync is the gap to the next one.
    assert [int(periods[u - 1]) for u in positions[:-1]] == gaps[1:].tolist()


def summary(folder) -> dict:
    return json.load(open(os.path.join(folder, "summary.json")))


def test_the_pages_schedule_trains_from_the_command_line(user_dir, tmp_path):
    out = tmp_path / "ramp"
    argv = ["--dataset", "digits", "--compare", f"cpsgd,{SPEC}", "--epochs", "6", "--avg-period", "8",
            "--out", str(out), "--quiet", "--no-plots"]
    assert cifar.main(argv) == 0
    ramp, cpsgd = summary(out / f"{SPEC}-seed0"), summary(out / "cpsgd-seed0")
    T = ramp["steps"]
    assert ramp["syncs"] == cpsgd["syncs"] == T // 8 and ramp["bytes"] == cpsgd["bytes"]
    assert ramp["config"]["method"] == SPEC and ramp["final_train_loss"] < 1.0
    rows = [json.loads(line) for line in open(out / f"{SPEC}-seed0" / "metrics.jsonl")]
    assert [t + 1 for t, row in enumerate(rows) if row["synced"]] == expected_positions(T, 8)


def test_the_pages_schedule_in_a_study_grid(user_dir, tmp_path):
    grid = tmp_path / "grid.toml"
    grid.write_text(f'dataset = "digits"\nmethods = ["cpsgd", "{SPEC}"]\nworkers = [4]\ntotal_batch = 32\n'
                    'seeds = 1\nlr_schedules = ["cosine"]\nargs = ["--epochs", "1", "--avg-period", "4"]\n')
    out = tmp_path / "study"
    assert study.main(["--grid", str(grid), "--out", str(out), "--quiet"]) == 0
    rows = json.load(open(out / "study.json"))["rows"]
    assert [r["method"] for r in rows] == ["cpsgd", SPEC] and rows[1]["syncs"] == rows[0]["syncs"]


@pytest.mark.parametrize("spec, words", [
    ("my schedules:linear_ramp", "is named PACKAGE.MODULE:FUNCTION"),
    ("no_such_module_anywhere:ramp", "cannot import no_such_module_anywhere (ModuleNotFoundError"),
    ("my_schedules:nothing_here", "my_schedules has no function nothing_here"),
    ("broken_schedules:NOT_CALLABLE", "broken_schedules has no function NOT_CALLABLE"),
    ("broken_schedules:raises", "the factory raised ValueError: avg_period must be even"),
    ("broken_schedules:not_a_schedule", "returned dict, not an adpsgd_jax.schedules.Schedule"),
    ("broken_schedules:integer_flag", "should_sync must return a bool scalar, got int32"),
    ("broken_schedules:no_period", "must return a state with a 'period' field"),
    ("broken_schedules:untraceable", "the schedule does not trace"),
])
@pytest.mark.parametrize("flag", ["--schedule", "--compare"])
def test_a_bad_plug_in_is_refused_in_one_line_naming_the_flag(user_dir, tmp_path, capsys, spec, words, flag):
    out = tmp_path / "out"
    given = [flag, spec] if flag == "--schedule" else [flag, f"cpsgd,{spec}"]
    assert cifar.main(["--dataset", "digits", *given, "--epochs", "1", "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    named = flag if spec.split(":")[0] != "broken_schedules" or spec.endswith("NOT_CALLABLE") else "--schedule / --compare"
    assert err.startswith(f"error: {named} ") and words in err and "\n" not in err, err
    assert not out.exists() or not any(out.iterdir())


@pytest.mark.parametrize("executor", ["local", "submitit"])
def test_a_bad_plug_in_in_a_study_grid_stops_it_before_any_run(user_dir, tmp_path, capsys, executor):
    grid = tmp_path / "grid.toml"
    grid.write_text('dataset = "digits"\nmethods = ["cpsgd", "broken_schedules:raises"]\nworkers = [4]\n'
                    'seeds = 1\nargs = ["--epochs", "1"]\n')
    out = tmp_path / "study"
    assert study.main(["--grid", str(grid), "--out", str(out), "--quiet", "--executor", executor,
                       *(["--cluster", "local"] if executor == "submitit" else [])]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "error: --schedule / --compare broken_schedules:raises: the factory raised ValueError: avg_period must be even", err
    assert not out.exists()  # no run trained, nothing written
