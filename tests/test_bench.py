"""Smoke test of ``python -m experiments.bench --quick``: it runs, writes its
JSON and its table. No timing is asserted (timings are the benchmark's
output, not a test's); compilation counts are, being exact."""

import json
import os

import pytest

from experiments import names
from experiments.bench.__main__ import main


def test_quick_benchmark_writes_json_and_table(tmp_path):
    out = tmp_path / "bench.json"
    assert main(["--quick", "--out", str(out), "--repeats", "2"]) == 0
    res = json.loads(out.read_text())
    for key in ("gate_overhead_ratio", "sync_over_allreduce_ratio", "throughput_ratio_vs_plain", "compilations",
                "device", "platform", "accuracy", "projection", "qsgd"):
        assert key in res, key
    for key in ("gate_overhead_ratio", "sync_over_allreduce_ratio", "throughput_ratio_vs_plain",
                "gate_with_workers_ratio"):
        assert res[key] > 0
    # Items 1b and 8: K = 4 and 8 workers on one device (--quick); the gate stays a conditional.
    sim = res["simulation"]
    assert sim["gate_workers"] == 8 and sim["gate_conditional_in_program"] is True
    assert set(res["simulation_throughput_ratio"]) == {"4", "8"}
    for k, ratio in res["simulation_throughput_ratio"].items():
        row = sim["throughput"][k]
        assert ratio > 0 and row["memory_per_worker"] > 0
        assert all(len(v) == 2 and min(v) > 0 for v in row["samples"].values())  # per-repetition samples kept
    # One compilation of the train step per whole run, for every method.
    assert res["compilations"] == {m: 1 for m in names.METHODS}
    assert set(res["accuracy"]["to_target"]) == {"allreduce", "cpsgd", "adpsgd", "qsgd_8bit", "qsgd_4bit"}
    assert res["accuracy"]["to_target"]["allreduce"]["speedup_10gbps"] == pytest.approx(1.0)
    table = (tmp_path / "bench.md").read_text()
    assert "| item | measured | target | verdict |" in table
    assert "gate overhead" in table and "Claim C2" in table
    assert "gate with workers" in table and "K = 8 workers / 1 worker with 8x the batch" in table


@pytest.mark.parametrize("argv, message", [
    (["--model", "resnet50"], "--model 'resnet50' is unknown; accepted values: resnet18, vgg16, cnn, mlp"),
    (["--repeats", "0"], "--repeats must be >= 1"),
    (["--dataset", "mnist"], "--dataset 'mnist' is unknown; accepted values: cifar10, cifar100, digits"),
    (["--seeds", "1,1"], "--seeds takes distinct comma-separated integers"),
    (["--sim-workers", "8,0"], "--sim-workers takes distinct comma-separated integers >= 1, got '8,0'"),
    (["--sim-model", "vit"], "--sim-model 'vit' is unknown; accepted values: resnet18, vgg16, cnn, mlp"),
])
def test_bad_flags_are_refused_before_anything_runs(tmp_path, capsys, argv, message):
    out = tmp_path / "sub" / "bench.json"
    assert main(argv + ["--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err
    assert not os.path.exists(tmp_path / "sub")
