"""Smoke test of ``python -m experiments.bench --quick``: it runs, writes its
JSON and its table. No timing is asserted (timings are the benchmark's
output, not a test's); compilation counts are, being exact, and so is the
arithmetic from the recorded samples to the ratios, intervals and verdicts."""

import json
import os

import pytest

from experiments import names
from experiments.bench import render
from experiments.bench.__main__ import main


def test_quick_benchmark_writes_json_and_table(tmp_path):
    out = tmp_path / "bench.json"
    assert main(["--quick", "--out", str(out), "--repeats", "2", "--warmup", "1"]) == 0
    res = json.loads(out.read_text())
    for key in ("compilations", "device", "platform", "accuracy", "projection", "projection_compute", "qsgd"):
        assert key in res, key
    # Every ratio with a target: the median of the per-repetition ratios, its interval and its verdict. Two
    # repetitions cover the median with probability 1/2 only, so no verdict is drawn from them.
    assert res["interval"]["level"] == 0.95
    for name in render.TARGETS:
        ratios, cis, verdicts = (res[f"{name}_{part}"] for part in ("ratio", "ci", "verdict"))
        if name.startswith("simulation_"):  # one per model, worker count K and loop
            assert set(ratios) == set(cis) == set(verdicts) == {f"mlp/K={k}/{loop}" for k in (4, 8)
                                                                for loop in ("vmap", "map", "unroll")}
        else:
            ratios, cis, verdicts = {"": ratios}, {"": cis}, {"": verdicts}
        for k, ratio in ratios.items():
            low, high = cis[k]
            assert 0 < low <= ratio <= high and verdicts[k] == "inconclusive", (name, k)
    steps = res["steps"]
    assert set(steps["step_samples"]) == {"local_gated", "local_plain", "sync", "allreduce"}
    a, b = steps["step_samples"]["local_gated"], steps["step_samples"]["local_plain"]
    assert res["gate_overhead_ratio"] == pytest.approx((a[0] / b[0] + a[1] / b[1]) / 2)  # per-repetition pairs
    # Counts beside the clocks: the gated local step moves what the step without gate moves (items 1, 1b
    # under every loop, 4-5); a syncing step runs its collectives, the local paths none.
    assert steps["gate_count"]["verdict"] == "met" and steps["plain_count"]["verdict"] == "met"
    assert steps["step_counts"]["local_gated"]["collectives"] == 0 < steps["step_counts"]["sync"]["collectives"]
    # Items 1b and 8: K = 4 and 8 MLP workers on one device under each loop (--quick); the gate stays a conditional.
    sim = res["simulation"]
    assert sim["gate_workers"] == 8 and sim["gate_conditional_in_program"] is True and sim["gate_loop"] == "vmap"
    assert {loop: c["verdict"] for loop, c in sim["gate_counts"].items()} == {"vmap": "met", "map": "met",
                                                                             "unroll": "met"}
    mlp = sim["throughput"]["mlp"]
    assert mlp["auto"] == "vmap"
    for k in ("4", "8"):
        row = mlp["per_k"][k]
        assert row["auto_meets"] in ("met", "missed", "inconclusive")
        assert all(len(v) == 2 and min(v) > 0 for v in row["samples"].values())  # per-repetition samples kept
        for loop, r in row["loops"].items():
            assert r["memory_per_worker"] > 0 and r["over_sequential"]["repeats"] == 2
            assert r["counts"]["bytes"] > 0 and r["counts"]["collectives"] == 0 and r["count_verdict"] in ("met", "missed")
    # One compilation of the train step per whole run, for every method.
    assert res["compilations"] == {m: 1 for m in names.METHODS}
    assert set(res["accuracy"]["to_target"]) == {"allreduce", "cpsgd", "adpsgd", "qsgd_8bit", "qsgd_4bit"}
    assert res["accuracy"]["to_target"]["allreduce"]["speedup_10gbps"] == pytest.approx(1.0)
    # Item 6's projection: ResNet-18's bytes and its step measured here (2 samples), whatever --model is.
    compute = res["projection_compute"]
    assert (compute["model"], compute["batch_size"], len(compute["samples"])) == ("resnet18", 32, 2)
    assert compute["param_bytes"] == 4 * 11_173_962 and "CPU" in compute["device"]
    adp = res["projection"]["adpsgd"]
    for gbps in (10, 100):
        low, high = adp[f"speedup_{gbps}gbps_ci"]
        assert low <= adp[f"speedup_{gbps}gbps"] <= high
        assert adp[f"against_paper_{gbps}gbps"] in ("below", "inside", "overlaps", "above")
    assert res["projection"]["allreduce"]["speedup_10gbps_ci"] == pytest.approx([1.0, 1.0])
    table = (tmp_path / "bench.md").read_text()
    assert "| item | measured [95% interval] | target | verdict |" in table
    assert "gate overhead" in table and "Claim C2" in table and "Paper (ADPSGD over allreduce): 1.46-1.95x" in table
    assert "gate with workers" in table and "| mlp (16 / worker) | 8 | unroll |" in table and "auto = vmap" in table


@pytest.mark.parametrize("argv, message", [
    (["--model", "resnet50"], "--model 'resnet50' is unknown; accepted values: resnet18, vgg16, cnn, mlp"),
    (["--repeats", "0"], "--repeats must be >= 1"),
    (["--dataset", "mnist"], "--dataset 'mnist' is unknown; accepted values: cifar10, cifar100, digits"),
    (["--seeds", "1,1"], "--seeds takes distinct comma-separated integers"),
    (["--sim-workers", "8,0"], "--sim-workers takes distinct comma-separated integers >= 1, got '8,0'"),
    (["--sim-models", "mlp,vit"], "--sim-models 'vit' is unknown; accepted values: resnet18, vgg16, cnn, mlp"),
    (["--sim-loops", "vmap,scan"], "--sim-loops 'scan' is unknown; accepted values: vmap, map, unroll, or a chunk"),
    (["--quick", "--gpu-suite"], "--quick and --gpu-suite are two different runs: give one"),
])
def test_bad_flags_are_refused_before_anything_runs(tmp_path, capsys, argv, message):
    out = tmp_path / "sub" / "bench.json"
    assert main(argv + ["--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err
    assert not os.path.exists(tmp_path / "sub")


def test_the_compute_probe_is_not_counted_as_the_train_step(tmp_path):
    """Item 3 counts the compilations of a run's train step by its program's name. Every run also
    compiles its compute probe (experiments/compute.py), a local_sgd step, as every_step's step is:
    the probe's program has a name of its own, so a run compiling both counts 1."""
    from experiments import compute, config as cfg, data
    from experiments.bench import runs

    compute._COMPILED.clear()  # the probe is compiled in this run, not reused from an earlier test's
    c = cfg.Config(method="every_step", dataset="digits", model="mlp", workers=8, batch_size=24, epochs=2, lr=0.1,
                   momentum=0.0, weight_decay=0.0)
    count = runs.counted_run(c, data.load("digits"), runs._options(str(tmp_path)))
    assert count["compilations"] == 1 and count["all"] >= 3, count  # the step, the probe, the evaluation at least

