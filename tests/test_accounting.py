"""What the summary counts and times: one worker's compute per step without communication
(``compute_step_s``, experiments/compute.py), the time model built on it, and the evaluations'
averaging (``eval_rounds``, ``eval_bytes``) kept apart from training's bytes."""

import dataclasses
import shutil

import jax
import numpy as np
import pytest

from adpsgd_jax import timemodel
from experiments import cifar, compute, config as cfg, data, methods, models, report, resume, results
from experiments.names import GBPS
from experiments.setup import prepare

ARGS = ["--dataset", "digits", "--epochs", "2", "--avg-period", "4", "--checkpoint-every", "0", "--quiet", "--no-plots"]


@pytest.fixture(scope="module")
def out(tmp_path_factory):
    """allreduce and CPSGD on digits: 8 workers (on one CPU device), 2 epochs of 11 steps."""
    folder = tmp_path_factory.mktemp("accounting")
    assert cifar.main(ARGS + ["--compare", "allreduce,cpsgd", "--out", str(folder)]) == 0
    return folder


def finished(folder) -> dict:
    return {r.method: r for r in results.finished_runs(str(folder))}


def probe(run: results.Run, dataset) -> compute.Probe:
    """A fresh probe of ``run``'s config, from its initial parameters."""
    return probe_of(resume.from_saved(run.summary["config"]), dataset, str(run.path) + "-probe")


def probe_of(config, dataset, folder: str) -> compute.Probe:
    setup = prepare(config, dataset, cfg.RunOptions(out=folder))
    model, _, _ = methods.model_fns(config, dataset)
    return compute.Probe(setup, *models.init(model, jax.random.PRNGKey(0), dataset.train_images.shape[1:]))


def flops(probe: compute.Probe) -> float:
    cost = probe.step.cost_analysis()
    return (cost[0] if isinstance(cost, list) else cost)["flops"]


def test_allreduce_and_averaging_are_charged_the_same_compute(out):
    runs = finished(out)
    for run in runs.values():
        s = run.summary
        assert 0 < s["compute_step_s"] < 1 and np.isfinite(s["measured_step_s"]), s
    assert runs["allreduce"].summary["compute_program"] == runs["cpsgd"].summary["compute_program"]
    dataset = data.load("digits")
    probes = {m: probe(runs[m], dataset) for m in ("allreduce", "cpsgd")}
    # One program for both: the compiled probe is shared by its program text, so the two are identical
    # (the same local arithmetic; which then times faster is only the machine's load of the moment).
    assert probes["allreduce"].step is probes["cpsgd"].step
    assert probes["allreduce"].program == runs["cpsgd"].summary["compute_program"]


def test_the_triggers_probe_holds_its_per_step_monitor(out):
    # The trigger's own local step, its gate shut: the squared distance to the anchor, the projection on u
    # and the pmean of the pair (one worker) are in its program; no sync is (no conditional is left).
    runs, dataset = finished(out), data.load("digits")
    config = dataclasses.replace(resume.from_saved(runs["cpsgd"].summary["config"]), method="trigger")
    trigger, cpsgd = probe_of(config, dataset, str(out) + "-trigger"), probe(runs["cpsgd"], dataset)
    assert trigger.program != cpsgd.program and trigger.step is not cpsgd.step
    text, plain = trigger.step.as_text(), cpsgd.step.as_text()
    assert "all-reduce" in text and "all-reduce" not in plain  # the pair's mean over the one worker
    assert "conditional" not in text and "conditional" not in plain
    assert flops(trigger) > flops(cpsgd)
    before = int(trigger.state.monitor.comm.rounds[0])  # the probe's first steps, after compiling
    state, _ = trigger.step(trigger.state, trigger.batch)  # (the old state is donated)
    assert int(state.comm.rounds[0]) == 0 and int(state.monitor.comm.rounds[0]) == before + 1  # the gate stayed shut


@pytest.mark.parametrize("workers,gbps", [(8, 10), (64, 100)])
def test_time_model_is_one_workers_compute_plus_the_counted_rounds(out, workers, gbps):
    runs, link = finished(out), timemodel.Link(gbps * GBPS, 10e-6)
    full, cp = runs["allreduce"].summary, runs["cpsgd"].summary
    T = full["steps"]
    assert full["syncs"] == T and cp["syncs"] == T // 4
    # allreduce: T rounds of its bytes on top of T x one worker's compute, and nothing else.
    per_round = timemodel.allreduce_time(full["bytes"] / T, workers, link)
    assert report_time(runs["allreduce"], workers, gbps) == full["compute_step_s"] * T + T * per_round
    overlapped = report_time(runs["allreduce"], workers, gbps, overlap=True)
    assert overlapped == pytest.approx(T * max(full["compute_step_s"], per_round), rel=1e-12)
    sync = timemodel.allreduce_time(cp["bytes"] / cp["syncs"], workers, link)
    assert report_time(runs["cpsgd"], workers, gbps) == cp["compute_step_s"] * T + cp["syncs"] * sync


def report_time(run, workers, gbps, overlap=False):
    return report.simulated_time(run, workers, gbps, 10e-6, overlap=overlap)


def test_evaluations_are_counted_apart_from_training(out):
    for method, run in finished(out).items():
        s = run.summary
        # One average of the parameters (the MLP has no model state) per evaluation: each epoch's
        # test split, then the final train split.
        assert s["eval_rounds"] == len(run.evals) + 1 == s["config"]["epochs"] + 1, method
        assert s["eval_bytes"] == s["eval_rounds"] * s["param_bytes"], method
    cp = finished(out)["cpsgd"].summary
    assert cp["bytes"] == cp["syncs"] * (cp["param_bytes"] + 8)  # training's bytes hold no evaluation


def test_resume_at_the_last_step_counts_the_evaluations_once(out, tmp_path):
    # A run cut off after its last checkpoint (step T) but before its summary: the resumed run
    # trains no step and reuses the saved test evaluation, so its summary is the uninterrupted one.
    name = results.run_name("cpsgd", 0)
    shutil.copytree(out / name, tmp_path / name)
    (tmp_path / name / results.SUMMARY).unlink()
    assert cifar.main(ARGS + ["--compare", "cpsgd", "--out", str(tmp_path), "--resume"]) == 0
    a, b = (results.read_json(d / name / results.SUMMARY) for d in (out, tmp_path))
    assert {k: v for k, v in a.items() if k not in results.TIMINGS} == \
        {k: v for k, v in b.items() if k not in results.TIMINGS}
    assert b["compute_step_s"] > 0  # probed again


def test_one_worker_averages_nothing_at_evaluation(tmp_path):
    argv = ["--dataset", "digits", "--epochs", "1", "--workers", "1", "--compare", "cpsgd", "--checkpoint-every", "0",
            "--quiet", "--no-plots", "--out", str(tmp_path)]  # batch 16, as in `out`: its compiled probe is reused
    assert cifar.main(argv) == 0
    s = results.read_json(tmp_path / results.run_name("cpsgd", 0) / results.SUMMARY)
    assert s["eval_rounds"] == 2 and s["eval_bytes"] == 0 and s["bytes"] == 0


def test_report_refuses_a_summary_without_one_workers_compute(out, tmp_path, capsys):
    # A run written before compute_step_s existed: its compute_s held the run's own collectives.
    name = results.run_name("cpsgd", 0)
    shutil.copytree(out / name, tmp_path / name)
    summary = results.read_json(tmp_path / name / results.SUMMARY)
    summary["compute_s"] = summary.pop("compute_step_s") * summary["steps"]
    results.write_json_atomic(str(tmp_path / name / results.SUMMARY), summary)
    assert report.main([str(tmp_path), "--no-plots"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "no compute_step_s" in err and err.endswith("run it again")


def test_pooled_compute_is_the_median_of_runs_sharing_the_probe():
    def run(model, step_s):
        r = object.__new__(results.Run)
        r.path, r.pooled_step_s = model, None
        r.summary = {"compute_step_s": step_s, "config": {"dataset": "digits", "model": model, "batch_size": 16,
                                                          "dtype": "float32"}}
        return r

    mlp = [run("mlp", s) for s in (1e-4, 3e-4, 2e-4)]
    cnn = [run("cnn", 5e-3)]
    assert [r.compute_step_s for r in mlp] == [1e-4, 3e-4, 2e-4]  # each run's own probe until pooled
    results.pool_compute(mlp + cnn)
    assert [r.compute_step_s for r in mlp] == [2e-4] * 3 and cnn[0].compute_step_s == 5e-3
    plain, trigger = [run("mlp", s) for s in (1e-4, 3e-4)], run("mlp", 9e-4)
    for r in plain:
        r.summary["compute_program"] = "a"
    trigger.summary["compute_program"] = "b"  # another program (the trigger's monitor): pooled apart
    results.pool_compute(plain + [trigger])
    assert [r.compute_step_s for r in plain] == pytest.approx([2e-4] * 2) and trigger.compute_step_s == 9e-4
