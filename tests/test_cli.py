"""End to end: ``python -m experiments.cifar`` on digits, every method. The one-line errors for bad
flags are in test_bad_input.py."""

import json
import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from adpsgd_jax import timemodel
from experiments import cifar, datasets, methods, names, report, resume, results, translate
from experiments.flags import parser

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METHODS = list(names.METHODS)
SUMMARY_KEYS = {"final_train_loss", "test_accuracy", "syncs", "bytes", "eval_rounds", "eval_bytes", "wall_clock_s",
                "compute_step_s", "measured_step_s", "config", "versions", "device_kind"}


# compare_dir's runs: 2 epochs, budget 4, the 8 workers on one device (the CLI's default on CPU).
COMPARE = ["--dataset", "digits", "--epochs", "2", "--avg-period", "4", "--quiet"]


@pytest.fixture(scope="module")
def compare_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("compare")
    assert cifar.main(COMPARE + ["--compare", ",".join(METHODS), "--out", str(out)]) == 0
    return out


def replay(run: results.Run) -> list:
    """The sync flags (an average or an allreduce step) the run's schedule gives when fed the
    logged variances and losses (and, for the trigger, the logged per-step bounds)."""
    c = resume.from_saved(run.summary["config"])
    T, spe = run.summary["steps"], run.summary["steps_per_epoch"]
    schedule = methods.make_schedule(c, T, spe, methods.lr_schedule(c, spe, T))
    if schedule is None:
        return [1] * T
    state, flags = schedule.init(), []
    for t, row in enumerate(run.metrics):
        if schedule.drift is not None:
            state = schedule.drift.observe(state, jnp.int32(t), jnp.float32(row["variance_bound"]))
        sync = bool(schedule.should_sync(state, jnp.int32(t)))
        warm = schedule.allreduce_step is not None and bool(schedule.allreduce_step(state, jnp.int32(t)))
        flags.append(int(sync or warm))
        if sync:
            state = schedule.update(state, jnp.int32(t), jnp.float32(row["variance"]), jnp.float32(row["loss"]))
    return flags


def test_every_method_writes_parseable_results(compare_dir):
    runs = {r.method: r for r in results.finished_runs(str(compare_dir))}
    assert set(runs) == set(METHODS)
    steps = 2 * (1437 // (8 * 16))
    for method, run in runs.items():
        assert SUMMARY_KEYS <= set(run.summary), method
        assert run.summary["steps"] == steps and len(run.metrics) == steps
        assert [e["epoch"] for e in run.evals] == [1.0, 2.0]
        synced = [row["synced"] for row in run.metrics]
        assert run.summary["syncs"] == sum(synced) == run.metrics[-1]["syncs"], method
        assert synced == replay(run), method  # the summary's syncs are the schedule's
        assert run.summary["config"]["method"] == method
    assert runs["cpsgd"].summary["syncs"] == steps // 4
    assert runs["allreduce"].summary["syncs"] == runs["every_step"].summary["syncs"] == steps
    budget = steps // 4
    assert 0.9 * budget <= runs["adpsgd"].summary["syncs"] <= budget
    assert runs["qsr"].summary["syncs"] == budget  # the rule at the searched alpha makes C here: 3, 6, 9, 12, 22
    # The trigger: its syncs, and an 8-byte pair all-reduced after every step, counted apart.
    tr = runs["trigger"].summary
    assert 0.9 * budget <= tr["syncs"] <= budget and tr["bytes"] == tr["syncs"] * (tr["param_bytes"] + 8)
    assert tr["monitor_rounds"] == steps and tr["monitor_bytes"] == 8 * steps
    assert [r["monitor_rounds"] for r in runs["trigger"].metrics] == list(range(1, steps + 1))
    assert all(r["variance_bound"] >= r["variance"] for r in runs["trigger"].metrics if r["synced"])
    assert runs["cpsgd"].summary["monitor_rounds"] == 0 and "variance_bound" not in runs["cpsgd"].metrics[0]
    # Parameter averaging sends parameters + the 8-byte scalar pair per sync.
    cp = runs["cpsgd"].summary
    assert cp["bytes"] == cp["syncs"] * (cp["param_bytes"] + 8)
    # post_local: a warm-up of T // 10 allreduce steps (gradient bytes), then averages after W, W + 4, ...
    pl, warmup = runs["post_local"].summary, steps // 10
    averages, periods = len(range(warmup, steps, 4)), [r["period"] for r in runs["post_local"].metrics]
    assert pl["syncs"] == warmup + averages and periods[:warmup + 1] == [1] * warmup + [4]
    assert pl["bytes"] == warmup * pl["param_bytes"] + averages * (pl["param_bytes"] + 8)
    variances = [row["variance"] for row in runs["cpsgd"].metrics]
    assert all((v is None) == (s == 0) for v, s in zip(variances, (r["synced"] for r in runs["cpsgd"].metrics)))


# Measured on compare_dir's runs (digits, seed 0, 2 epochs = 22 steps, budget 4): every method's averaged
# model scores 0.808-0.814 on the test set (chance: 0.1) and ends at a training loss of 1.12-1.14 from
# 2.45 at the first step. The bars leave a margin for other platforms and versions.
LEARNED_TEST_ACCURACY = 0.70
LEARNED_LOSS_RATIO = 0.6


def test_every_method_learns(compare_dir):
    runs = {r.method: r for r in results.finished_runs(str(compare_dir))}
    assert set(runs) == set(METHODS)
    for method, run in runs.items():
        assert run.summary["test_accuracy"] >= LEARNED_TEST_ACCURACY, (method, run.summary["test_accuracy"])
        first_loss = run.metrics[0]["loss"]
        assert run.summary["final_train_loss"] <= LEARNED_LOSS_RATIO * first_loss, (method, run.summary)


def test_report_table_and_plots(compare_dir):
    text = (compare_dir / "report.md").read_text()
    for method in METHODS:
        assert f"| {method} |" in text
    assert "allreduce (ideal overlap)" in text and "@10 Gbps" in text and "@100 Gbps" in text
    for name in report.PLOTS:
        data = (compare_dir / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000, name
    # The standalone report command reads the same folder.
    assert report.main([str(compare_dir), "--no-plots", "--predict-workers", "64"]) == 0


def test_time_model_in_report_matches_formula(compare_dir):
    run = next(r for r in results.finished_runs(str(compare_dir)) if r.method == "cpsgd")
    s = run.summary
    per_round = s["bytes"] / s["syncs"]
    bw = 10e9 / 8
    expected = s["compute_step_s"] * s["steps"] + s["syncs"] * (2 * 7 * 10e-6 + 2 * 7 / 8 * per_round / bw)
    assert report.simulated_time(run, 8, 10, 10e-6) == pytest.approx(expected)
    # The trigger also pays a ring all-reduce of its 8-byte pair after every step: latency, mostly.
    run = next(r for r in results.finished_runs(str(compare_dir)) if r.method == "trigger")
    s = run.summary
    pair = s["steps"] * (2 * 7 * 10e-6 + 2 * 7 / 8 * 8 / bw)
    compute = s["compute_step_s"] * s["steps"]
    expected = compute + s["syncs"] * (2 * 7 * 10e-6 + 2 * 7 / 8 * s["bytes"] / s["syncs"] / bw) + pair
    assert report.simulated_time(run, 8, 10, 10e-6) == pytest.approx(expected)
    fast, slow = timemodel.Link(2400e9 / 8, 10e-6), timemodel.Link(bw, 10e-6)
    hierarchical = lambda b: timemodel.hierarchical_allreduce_time(b, 4, 8, fast, slow)  # noqa: E731
    expected = compute + s["syncs"] * hierarchical(s["bytes"] / s["syncs"]) + s["steps"] * hierarchical(8)
    assert report.cluster_time(run, 4, 8, 2400, 10, 10e-6) == pytest.approx(expected)


def test_cifar_without_data_stops_at_once_with_advice(tmp_path):
    # A real subprocess: the CLI sets the virtual devices itself; no traceback.
    proc = subprocess.run(
        [sys.executable, "-m", "experiments.cifar", "--data-dir", str(tmp_path / "tfds"), "--out", str(tmp_path / "o"),
         "--epochs", "1"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    assert "--dataset digits" in proc.stderr and "--data-dir" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "o").exists()


def test_summary_is_valid_json_with_config_roundtrip(compare_dir):
    path = compare_dir / results.run_name("adpsgd", 0) / results.SUMMARY
    summary = json.loads(path.read_text())
    c = resume.from_saved(summary["config"])
    assert c.method == "adpsgd" and c.dataset == "digits" and c.avg_period == 4


@pytest.fixture(scope="module")
def two_level_dir(tmp_path_factory):
    """allreduce, and CPSGD with groups of 4 and DiLoCo's outer step, on digits for 2 epochs."""
    out = tmp_path_factory.mktemp("two_level")
    argv = ["--dataset", "digits", "--compare", "allreduce,cpsgd", "--group-size", "4", "--outer-optimizer", "nesterov",
            "--epochs", "2", "--avg-period", "4", "--out", str(out), "--quiet", "--no-plots"]
    assert cifar.main(argv) == 0
    return out


def test_two_level_outer_run_counts_both_levels(two_level_dir):
    runs = {r.label: r for r in results.finished_runs(str(two_level_dir))}
    assert set(runs) == {"allreduce", "cpsgd+nesterov-group4"}  # the options apply to averaging methods only
    s = runs["cpsgd+nesterov-group4"].summary
    c = resume.from_saved(s["config"])
    assert (c.group_size, c.outer_optimizer, c.outer_lr, c.outer_momentum) == (4, "nesterov", 0.7, 0.9)
    assert s["group_size"] == 4 and s["group_syncs"] == s["steps"]
    assert s["group_bytes"] == s["steps"] * s["param_bytes"]  # the gradient mean inside the group, every step
    assert s["syncs"] == s["steps"] // 4 and s["bytes"] == s["syncs"] * (s["param_bytes"] + 8)
    rows = runs["cpsgd+nesterov-group4"].metrics
    assert [r["group_syncs"] for r in rows] == list(range(1, s["steps"] + 1))
    assert runs["allreduce"].summary["group_bytes"] == 0 and runs["allreduce"].summary["config"]["group_size"] == 1


def test_two_level_time_models_match_the_formulas(two_level_dir):
    runs = {r.label: r for r in results.finished_runs(str(two_level_dir))}
    run, full = runs["cpsgd+nesterov-group4"], runs["allreduce"]
    s, lat, slow, fast = run.summary, 10e-6, 10e9 / 8, 2400e9 / 8

    def expected(compute_s, scale=1.0):
        grads, sync = scale * s["param_bytes"], scale * (s["param_bytes"] + 8)
        inside = 2 * 7 * lat + 2 * 7 / 8 * grads / fast  # every step, among a host's 8 devices
        # Across the 4 hosts (ring of the sync payload), then the host all-gathers its 8 shards.
        across = 2 * 3 * lat + 2 * 3 / 4 * sync / slow + 7 * lat + 7 / 8 * sync / fast
        return compute_s + s["steps"] * inside + s["syncs"] * across

    assert report.cluster_time(run, 4, 8, 2400, 10, lat) == pytest.approx(expected(s["compute_step_s"] * s["steps"]))
    what_if = report.cluster_time(run, 4, 8, 2400, 10, lat, payload_bytes=4e7, step_s=0.05)
    assert what_if == pytest.approx(expected(0.05 * s["steps"], 4e7 / s["param_bytes"]))
    f = full.summary
    per_round = f["bytes"] / f["syncs"]
    hierarchical = 2 * 7 * lat + 2 * 7 / 8 * per_round / fast + 2 * 3 * lat + 2 * 3 / 4 * per_round / slow
    assert report.cluster_time(full, 4, 8, 2400, 10, lat) == pytest.approx(f["compute_step_s"] * f["steps"]
                                                                           + f["syncs"] * hierarchical)
    # One bandwidth everywhere (the first table): the run's 2 groups of 4.
    link = timemodel.Link(slow, lat)
    flat_links = (s["compute_step_s"] * s["steps"] + s["steps"] * timemodel.allreduce_time(s["param_bytes"], 4, link)
                  + s["syncs"] * timemodel.group_average_time(s["param_bytes"] + 8, 2, 4, link, link))
    assert report.simulated_time(run, 8, 10, lat) == pytest.approx(flat_links)
    text = report.build(str(two_level_dir), plots=False)
    assert "| cpsgd+nesterov-group4 | 1 |" in text and "Predicted on 4 hosts x 8 devices" in text
    what_if = ["--hosts", "2", "--devices-per-host", "4", "--payload-mb", "44.7", "--step-ms", "50"]
    assert report.main([str(two_level_dir), "--no-plots", *what_if]) == 0


def test_eight_workers_on_one_device_equal_eight_devices(compare_dir, tmp_path, capsys):
    # compare_dir's ADPSGD and QSGD runs (one device), run again on 8 devices.
    argv = COMPARE + ["--compare", "adpsgd,qsgd", "--devices", "8", "--no-plots", "--out", str(tmp_path)]
    capsys.readouterr()
    assert cifar.main(argv) == 0
    first = capsys.readouterr().out.splitlines()[0]  # the run says how its workers run
    assert first == "workers: 8 on 8 CPU devices, 1 per device, worker loop vmap (--worker-loop auto)", first
    for method in ("adpsgd", "qsgd"):
        one, eight = (results.read_json(d / results.run_name(method, 0) / results.SUMMARY)
                      for d in (compare_dir, tmp_path))
        assert (one["num_workers"], one["num_devices"], one["workers_per_device"]) == (8, 1, 8)
        assert (eight["num_workers"], eight["num_devices"], eight["workers_per_device"]) == (8, 8, 1)
        assert one["worker_loop"] == eight["worker_loop"] == "vmap"  # the MLP: auto keeps vmap
        np.testing.assert_allclose(one["final_train_loss"], eight["final_train_loss"], rtol=1e-5)
        assert one["syncs"] == eight["syncs"] > 0 and one["bytes"] == eight["bytes"]


def resolved(*argv):
    """The first run config of ``argv``, as the CLI builds it (no jax, no data)."""
    return translate.from_args(parser().parse_args([*argv, "--out", "/tmp/never-written"]))[0][0]


def test_defaults_depend_on_the_data_set_and_the_model():
    # The cnn and the mlp have no batch norm: on CIFAR they start at lr 0.02, not ResNet-18's 0.1.
    for dataset in ("cifar10", "cifar100", "tfds:cifar10"):
        assert resolved("--dataset", dataset).lr == 0.1 and resolved("--dataset", dataset).model == "resnet18"
        assert resolved("--dataset", dataset, "--model", "vgg16").lr == 0.1
        for model in ("cnn", "mlp"):
            c = resolved("--dataset", dataset, "--model", model)
            assert (c.lr, c.momentum, c.batch_size, c.epochs) == (0.02, 0.9, 128, 200), (dataset, model)
    assert resolved("--dataset", "cifar10", "--model", "cnn", "--lr", "0.1").lr == 0.1  # a given flag wins
    assert [resolved("--dataset", "digits", "--model", m).lr for m in names.MODELS] == [0.1] * 4
    mnist = resolved("--dataset", "tfds:mnist")
    assert (mnist.model, mnist.lr, mnist.epochs, mnist.batch_size) == ("cnn", 0.05, 20, 64)
    assert "0.02 with cnn, mlp on cifar10, cifar100" in " ".join(parser().format_help().split())


def test_the_defaults_table_of_docs_cli_md_is_the_code_s():
    text = open(os.path.join(ROOT, "docs", "cli.md")).read()
    section = text.split("## Defaults per data set and model", 1)[1].split("\n## ", 1)[0]
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in section.splitlines()
            if line.startswith("| `") and not line.startswith("| `--")]  # the rows, not the header
    covered = set()
    for sets, models, epochs, batch, lr, momentum, decay, augment in rows:
        for dataset in sets.replace("`", "").split(", "):
            for model in models.split(", "):
                name = model.strip("*`")
                want = datasets.defaults(dataset, name)
                got = dict(epochs=int(epochs), batch_size=int(batch), lr=float(lr), momentum=float(momentum),
                           weight_decay=float(decay), augment=augment)
                assert got == {k: want[k] for k in got}, (dataset, name)
                assert model.startswith("**") == (datasets.defaults(dataset)["model"] == name), (dataset, name)
                covered.add((dataset, name))
    assert covered == {(d, m) for d in datasets.RECIPES for m in names.MODELS}
