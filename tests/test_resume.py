"""Checkpoints, exact resume and failure handling (real processes, real signals)."""

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from experiments import checkpoint, cifar, results

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMING = set(results.TIMINGS)
# 10 epochs x 11 steps = 110, a checkpoint every 3 steps; the 8 workers share one device (K = 8).
EVERY, STEPS = 3, 110
ARGS = ["--dataset", "digits", "--epochs", "10", "--checkpoint-every", str(EVERY), "--devices", "1", "--quiet",
        "--no-plots"]


class Run:
    """The CLI in a subprocess; its output goes to files (a full pipe would block it)."""

    def __init__(self, out, *extra):
        env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONUNBUFFERED": "1"}
        self.log = open(os.path.join(str(out), f".log-{time.monotonic_ns()}"), "w+")
        self.proc = subprocess.Popen([sys.executable, "-m", "experiments.cifar", *ARGS, "--out", str(out), *extra],
                                     cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=self.log, text=True)

    def send_signal(self, signum):
        self.proc.send_signal(signum)

    def wait(self, timeout=300):
        return self.proc.wait(timeout=timeout)

    def stderr(self):
        self.log.seek(0)
        return self.log.read()


cli = Run


def in_process(out, *extra) -> int:
    """The CLI in this process (the uninterrupted reference, and the runs that resume a killed one): its
    exit status."""
    return cifar.main([*ARGS, "--out", str(out), *extra])


def wait_for(predicate, timeout=120.0, poll=0.002):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(poll)
    return False


def final_state(run_dir):
    steps = sorted(int(d) for d in os.listdir(os.path.join(run_dir, checkpoint.FOLDER)) if d.isdigit())
    tree = ocp.PyTreeCheckpointer().restore(os.path.join(run_dir, checkpoint.FOLDER, str(steps[-1]), "state"))
    return steps[-1], jax.tree.map(np.asarray, tree)


def assert_same_run(a, b):
    step_a, state_a = final_state(a)
    step_b, state_b = final_state(b)
    assert step_a == step_b
    jax.tree.map(np.testing.assert_array_equal, state_a, state_b)  # bit-identical, every replica
    for name in (results.METRICS, results.EVAL):
        with open(os.path.join(a, name)) as fa, open(os.path.join(b, name)) as fb:
            assert fa.read() == fb.read(), name
    sa = results.read_json(os.path.join(a, results.SUMMARY))
    sb = results.read_json(os.path.join(b, results.SUMMARY))
    assert {k: v for k, v in sa.items() if k not in TIMING} == {k: v for k, v in sb.items() if k not in TIMING}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """ADPSGD and CPSGD uninterrupted, checkpointed only at the end (saves cost ~0.1 s each): the runs they
    are compared with save every few steps, so saving is also shown to leave a run as it is."""
    out = tmp_path_factory.mktemp("reference")
    assert in_process(out, "--compare", "adpsgd,cpsgd", "--checkpoint-every", "0") == 0
    return out


def checkpoint_steps(run_dir):
    folder = os.path.join(run_dir, checkpoint.FOLDER)
    return sorted(int(d) for d in os.listdir(folder) if d.isdigit()) if os.path.isdir(folder) else []


def mid_period_target(reference_run, rng):
    """A checkpoint step inside a period, whose next 3 checkpoints are inside periods too
    (so the process is killed, and resumed, where the replicas differ)."""
    synced = {row["step"]: row["synced"] for row in results.read_jsonl(os.path.join(reference_run, results.METRICS))}
    candidates = [s for s in range(4 * EVERY, STEPS - 20, EVERY) if not any(synced[s + k * EVERY] for k in range(4))]
    assert candidates
    return int(rng.choice(candidates)), synced


@pytest.mark.parametrize("method,seed", [("adpsgd", 11), ("cpsgd", 12)])
def test_kill_9_then_resume_equals_uninterrupted(reference, tmp_path, method, seed):
    reference_run = reference / results.run_name(method, 0)
    target, synced = mid_period_target(reference_run, np.random.default_rng(seed))
    run_dir = tmp_path / results.run_name(method, 0)
    proc = cli(tmp_path, "--compare", method)
    assert wait_for(lambda: max(checkpoint_steps(run_dir), default=0) >= target, poll=0.0005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (run_dir / results.SUMMARY).exists(), "the run finished before the kill; nothing was tested"
    resumed_from = checkpoint_steps(run_dir)[-1]
    assert synced[resumed_from] == 0, resumed_from  # the kill and the resume point are mid-period
    _, state = final_state(run_dir)
    kernel = state["params"]["fc1"]["kernel"]
    assert not np.array_equal(kernel[0], kernel[1])  # the replicas saved there differ
    assert in_process(tmp_path, "--compare", method, "--resume") == 0
    assert_same_run(reference_run, run_dir)


SIGNAL_AT_STEP = textwrap.dedent("""
    import os, sys
    sys.path.insert(0, {root!r})
    from experiments import cifar, train

    logged = train.Run.log

    def log(self, t, metrics):  # the signal comes from outside the loop, at a step fixed in advance
        row = logged(self, t, metrics)
        if t + 1 == {step}:
            os.kill(os.getpid(), {signum})
        return row

    train.Run.log = log
    sys.exit(cifar.main(sys.argv[1:]))
""")


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_sigterm_or_sigint_writes_checkpoint_and_exits_cleanly(reference, tmp_path, signum):
    # A real signal to the process, sent at step 50 from inside it. Sent from the test process once it
    # saw the run under way, it depended on timing: on a busy machine it can arrive after the loop (which
    # alone handles it), as it likely did when this test once aborted under load.
    run_dir = tmp_path / results.run_name("adpsgd", 0)
    argv = [*ARGS, "--compare", "adpsgd", "--checkpoint-every", "1000", "--out", str(tmp_path)]
    script = SIGNAL_AT_STEP.format(root=ROOT, step=50, signum=int(signum))
    proc = subprocess.run([sys.executable, "-c", script, *argv], env={**os.environ, "JAX_PLATFORMS": "cpu"},
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 128 + signum, proc.stderr
    name = signal.Signals(signum).name
    assert f"stopped: {name} at step 51: checkpoint written in " in proc.stderr and "--resume" in proc.stderr
    assert "Traceback" not in proc.stderr and checkpoint_steps(run_dir) == [51]
    assert in_process(tmp_path, "--compare", "adpsgd", "--checkpoint-every", "1000", "--resume") == 0  # saves: 0.1 s
    assert_same_run(reference / results.run_name("adpsgd", 0), run_dir)


CRASHING_SAVE = textwrap.dedent("""
    import os, sys
    import jax.numpy as jnp
    sys.path.insert(0, {root!r})
    from experiments import checkpoint
    saver = checkpoint.RunCheckpoints(sys.argv[1])
    saver.save(1, {{"x": jnp.arange(4.0)}}, {{"step": 1}})
    saver.save(2, {{"x": jnp.ones((100_000_000,))}}, {{"step": 2}})  # killed while this is written
""")


def test_crash_during_save_leaves_previous_checkpoint_loadable(tmp_path):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.Popen([sys.executable, "-c", CRASHING_SAVE.format(root=ROOT), str(tmp_path)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    folder = tmp_path / checkpoint.FOLDER
    in_progress = lambda: folder.exists() and any(p.name.startswith("2.") for p in folder.iterdir())  # noqa: E731
    assert wait_for(in_progress, poll=0.0005), "the save of step 2 was never seen in progress"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (folder / "2").exists()
    saver = checkpoint.RunCheckpoints(str(tmp_path))
    assert saver.latest_step() == 1
    state, meta = saver.restore({"x": jax.numpy.zeros(4)})
    np.testing.assert_array_equal(state["x"], np.arange(4.0))
    assert meta == {"step": 1}


KILLED_IN_FIRST_SAVE = textwrap.dedent("""
    import os, signal, sys
    sys.path.insert(0, {root!r})
    from orbax.checkpoint._src.path import atomicity
    from experiments import cifar

    async def killed(self, *args, **kwargs):  # the first save's files are written, its renames never happen
        os.kill(os.getpid(), signal.SIGKILL)

    atomicity.AtomicRenameTemporaryPath.finalize = killed
    sys.exit(cifar.main(sys.argv[1:]))
""")


def test_kill_during_the_first_save_then_resume_starts_over_and_equals_uninterrupted(reference, tmp_path, capsys):
    # The kill lands inside orbax's first save on every run, not at a moment a poll may miss; an interval of
    # 5 epochs of 11 steps puts that save at step 55, half-way through the run.
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    interval = ["--checkpoint-every", "55"]
    argv = [*ARGS, *interval, "--compare", "cpsgd", "--out", str(tmp_path)]
    killed = subprocess.run([sys.executable, "-c", KILLED_IN_FIRST_SAVE.format(root=ROOT), *argv], env=env,
                            capture_output=True, text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    run_dir = tmp_path / results.run_name("cpsgd", 0)
    left = sorted(p.name for p in (run_dir / checkpoint.FOLDER).iterdir())
    assert left == ["55.orbax-checkpoint-tmp"] and checkpoint_steps(run_dir) == [], left  # only the partial save
    capsys.readouterr()
    assert in_process(tmp_path, *interval, "--compare", "cpsgd", "--resume") == 0
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("--resume")]
    assert lines == [f"--resume: cpsgd-seed0 has no complete checkpoint (in {run_dir / checkpoint.FOLDER}): "
                     "starting it from step 0"], err
    assert_same_run(reference / results.run_name("cpsgd", 0), run_dir)


def snapshot(folder):
    """Every file under ``folder``: its bytes and modification time."""
    return {str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def short_run(out, *extra):
    return cifar.main(["--dataset", "digits", "--epochs", "2", "--checkpoint-every", "4", "--quiet", "--no-plots",
                       "--compare", "cpsgd", "--out", str(out), *extra])


def test_resume_with_changed_budget_is_refused(tmp_path, capsys):
    assert short_run(tmp_path) == 0
    capsys.readouterr()
    before = snapshot(tmp_path)
    assert short_run(tmp_path, "--resume", "--avg-period", "4", "--lr", "0.05") == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --resume refused for cpsgd-seed0") and "avg_period: 8 -> 4" in err
    assert "lr: 0.1 -> 0.05" in err and "\n" not in err
    assert snapshot(tmp_path) == before  # nothing touched: every file's bytes and mtime
    # Harmless differences (verbosity, plots) are allowed: the finished run is kept as it is.
    assert cifar.main(["--dataset", "digits", "--epochs", "2", "--compare", "cpsgd", "--out", str(tmp_path),
                       "--resume"]) == 0
    run_files = {k: v for k, v in before.items() if k.startswith("cpsgd-seed0/")}
    assert snapshot(tmp_path / "cpsgd-seed0") == {k.split("/", 1)[1]: v for k, v in run_files.items()}
    # A run with no checkpoint to continue from starts over, but a changed config is refused before that.
    shutil.rmtree(tmp_path / "cpsgd-seed0" / checkpoint.FOLDER)
    (tmp_path / "cpsgd-seed0" / results.SUMMARY).unlink()
    before = snapshot(tmp_path)
    assert short_run(tmp_path, "--resume", "--avg-period", "4") == 2
    assert "avg_period: 8 -> 4" in capsys.readouterr().err and snapshot(tmp_path) == before


def test_resume_with_corrupt_or_missing_checkpoints(tmp_path, capsys):
    assert short_run(tmp_path) == 0
    run_dir = tmp_path / "cpsgd-seed0"
    uninterrupted = results.read_json(run_dir / results.SUMMARY)
    (run_dir / results.SUMMARY).unlink()  # pretend the run was cut off
    latest = checkpoint_steps(run_dir)[-1]
    for path in (run_dir / checkpoint.FOLDER / str(latest) / "state").rglob("*"):
        if path.is_file() and path.stat().st_size > 0 and "metadata" not in path.name:
            path.write_bytes(b"garbage" * 10)
    before = snapshot(tmp_path)
    capsys.readouterr()
    assert short_run(tmp_path, "--resume") == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: --resume: checkpoint {latest}") and "cannot be read" in err
    assert snapshot(tmp_path) == before  # nothing rewritten
    # No checkpoint left: the run starts over, says so, and ends as the uninterrupted run.
    shutil.rmtree(run_dir / checkpoint.FOLDER)
    assert short_run(tmp_path, "--resume") == 0
    err = capsys.readouterr().err
    assert f"--resume: cpsgd-seed0 has no checkpoint folder ({run_dir / checkpoint.FOLDER}): starting it from step 0" in err
    resumed = results.read_json(run_dir / results.SUMMARY)
    assert {k: v for k, v in resumed.items() if k not in TIMING} == {k: v for k, v in uninterrupted.items()
                                                                     if k not in TIMING}


def test_nan_stops_with_step_and_metric_and_keeps_last_good_checkpoint(tmp_path, capsys):
    code = cifar.main(["--dataset", "digits", "--epochs", "3", "--checkpoint-every", "2", "--quiet", "--no-plots",
                       "--compare", "adpsgd", "--lr", "1e6", "--out", str(tmp_path)])
    err = capsys.readouterr().err.strip()
    assert code == 3
    assert err.startswith("error: non-finite ") and " at step " in err and "last good checkpoint" in err
    run_dir = tmp_path / "adpsgd-seed0"
    assert not (run_dir / results.SUMMARY).exists()
    bad_step = int(err.split(" at step ")[1].split(";")[0])
    good = checkpoint_steps(run_dir)
    assert all(s < bad_step for s in good)
    if good:  # every kept checkpoint holds finite parameters
        _, state = final_state(run_dir)
        assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(state["params"]))
    rows = [json.loads(line) for line in (run_dir / results.METRICS).read_text().splitlines()]
    assert all(np.isfinite(r["loss"]) for r in rows) and rows[-1]["step"] < bad_step


def test_resume_restores_the_outer_state_and_anchor_of_two_level_runs(tmp_path):
    # Two-level ADPSGD with DiLoCo's outer step, cut back to a checkpoint inside a period after a few
    # syncs (the outer momentum is non-zero there), then resumed: it ends as the uninterrupted run (a copy
    # of the finished one).
    args = ["--dataset", "digits", "--epochs", "3", "--checkpoint-every", "5", "--keep-checkpoints", "10", "--quiet",
            "--no-plots", "--compare", "adpsgd", "--group-size", "2", "--outer-optimizer", "nesterov"]
    name = results.run_name("adpsgd+nesterov-group2", 0)
    assert cifar.main(args + ["--out", str(tmp_path / "cut")]) == 0
    run_dir = tmp_path / "cut" / name
    shutil.copytree(run_dir, tmp_path / "reference" / name)
    rows = {r["step"]: r for r in results.read_jsonl(os.path.join(run_dir, results.METRICS))}
    target = max(s for s in checkpoint_steps(run_dir) if s < 30 and not rows[s]["synced"] and rows[s]["syncs"] >= 2)
    for step in checkpoint_steps(run_dir):
        if step > target:
            shutil.rmtree(run_dir / checkpoint.FOLDER / str(step))
    (run_dir / results.SUMMARY).unlink()
    _, state = final_state(run_dir)
    trace = state["outer_opt_state"][0]["trace"]["fc1"]["kernel"]
    assert np.abs(trace).max() > 0 and not np.array_equal(state["anchor"]["fc1"]["kernel"][0],
                                                          state["params"]["fc1"]["kernel"][0])
    assert cifar.main(args + ["--out", str(tmp_path / "cut"), "--resume"]) == 0
    assert_same_run(tmp_path / "reference" / name, run_dir)


def test_resume_of_a_post_local_run_saved_before_issue_19_is_refused(tmp_path, capsys):
    # A run folder as the old post_local (parameters averaged in the warm-up) left it: its
    # config.json has no post_local_warmup. Only the config is read before the refusal.
    from experiments import flags, resume, translate

    argv = ["--dataset", "digits", "--epochs", "2", "--quiet", "--no-plots", "--out", str(tmp_path)]
    (new,), _ = translate.from_args(flags.parser().parse_args(argv + ["--schedule", "post_local"]))
    old = {k: v for k, v in new.to_dict().items() if k != "post_local_warmup"}
    run_dir = tmp_path / results.run_name("post_local", 0)
    run_dir.mkdir()
    (run_dir / results.CONFIG).write_text(json.dumps(old))
    assert cifar.main(argv + ["--schedule", "post_local", "--resume"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --resume refused for post_local-seed0") and "\n" not in err
    assert "post_local_warmup: 'parameters' -> 'gradient' (the configuration changed meaning" in err
    assert err.endswith("This version cannot continue it: start it over in another --out")
    assert resume.from_saved(old).post_local_warmup == "parameters"
    # Old runs of every other method mean what they meant: nothing to refuse.
    for method in ("cpsgd", "adpsgd", "lr_proportional"):
        other = new.replace(method=method)
        assert resume.config_differences({k: v for k, v in other.to_dict().items() if k != "post_local_warmup"},
                                         other) == []
    assert resume.config_differences(new.to_dict(), new) == []  # a post_local run of this version resumes


def test_resume_inside_the_post_local_warmup_equals_uninterrupted(tmp_path):
    # A post_local run of this version, cut back to a checkpoint inside its allreduce warm-up
    # (11 steps here), resumes into the same run (a copy of the finished one): both phases follow from
    # the checkpointed step.
    args = ["--dataset", "digits", "--epochs", "2", "--local-warmup-epochs", "1", "--avg-period", "4",
            "--checkpoint-every", "4", "--keep-checkpoints", "10", "--quiet", "--no-plots", "--schedule", "post_local"]
    name = results.run_name("post_local", 0)
    assert cifar.main(args + ["--out", str(tmp_path / "cut")]) == 0
    run_dir = tmp_path / "cut" / name
    shutil.copytree(run_dir, tmp_path / "reference" / name)
    rows = {r["step"]: r for r in results.read_jsonl(os.path.join(run_dir, results.METRICS))}
    assert [rows[s]["period"] for s in (1, 11, 12)] == [1, 1, 4] and rows[12]["synced"] == 1
    for step in checkpoint_steps(run_dir):
        if step > 8:
            shutil.rmtree(run_dir / checkpoint.FOLDER / str(step))
    (run_dir / results.SUMMARY).unlink()
    assert cifar.main(args + ["--out", str(tmp_path / "cut"), "--resume"]) == 0
    assert_same_run(tmp_path / "reference" / name, run_dir)


def test_resume_restores_the_trigger_s_anchor_direction_and_bound(tmp_path):
    # variance_trigger, cut back to a checkpoint inside a period after two syncs (anchor, direction,
    # the last bound and the per-step counter all in the state), then resumed: the same run as a copy
    # of the finished one.
    args = ["--dataset", "digits", "--epochs", "2", "--avg-period", "4", "--checkpoint-every", "3",
            "--keep-checkpoints", "10", "--quiet", "--no-plots", "--schedule", "trigger"]
    name = results.run_name("trigger", 0)
    assert cifar.main(args + ["--out", str(tmp_path / "cut")]) == 0
    run_dir = tmp_path / "cut" / name
    shutil.copytree(run_dir, tmp_path / "reference" / name)
    rows = {r["step"]: r for r in results.read_jsonl(os.path.join(run_dir, results.METRICS))}
    target = min(s for s in checkpoint_steps(run_dir) if not rows[s]["synced"] and rows[s]["syncs"] >= 2)
    for step in checkpoint_steps(run_dir):
        if step > target:
            shutil.rmtree(run_dir / checkpoint.FOLDER / str(step))
    (run_dir / results.SUMMARY).unlink()
    _, state = final_state(run_dir)
    assert np.abs(state["monitor"]["direction"]["fc1"]["kernel"]).max() > 0  # a direction after two syncs
    assert cifar.main(args + ["--out", str(tmp_path / "cut"), "--resume"]) == 0
    assert_same_run(tmp_path / "reference" / name, run_dir)


def test_a_config_saved_without_the_fragment_fields_resumes_as_one_fragment():
    # Runs saved before streaming averaging have no fragments / fragment_delay / fragment_alpha: they read as
    # P = 1, tau = 0, alpha = 0 and resume; a --fragments 2 resume of them is refused, naming the field.
    from experiments import flags, resume, translate

    argv = ["--dataset", "digits", "--epochs", "2", "--quiet", "--out", "/tmp/never", "--schedule", "constant"]
    (new,), _ = translate.from_args(flags.parser().parse_args(argv))
    old = {k: v for k, v in new.to_dict().items() if not k.startswith("fragment")}
    assert resume.config_differences(old, new) == []
    saved = resume.from_saved(old)
    assert (saved.fragments, saved.fragment_delay, saved.fragment_alpha) == (1, 0, 0.0)
    (streamed,), _ = translate.from_args(flags.parser().parse_args(argv + ["--fragments", "2"]))
    assert resume.config_differences(old, streamed) == ["fragments: 1 -> 2"]
