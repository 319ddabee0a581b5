"""The GPU suite of the benchmark (``python -m experiments.bench --gpu-suite``), run on CPU with tiny
settings: it runs, picks its settings and writes its JSON and table (no timing is asserted)."""

import json

from experiments.bench.__main__ import main


def test_the_gpu_suite_runs_its_items_on_cpu_with_tiny_settings(tmp_path):
    """``--gpu-suite`` with its settings made tiny by flags (on a GPU its defaults: resnet18 at batch 128,
    16 resnet18 workers under every loop, 9 x 2 steps): items 1-5 on the model, item 8 for every loop, JSON
    and Markdown. Its items 6-7 and projection are the quick benchmark's (tests/test_bench.py), here skipped;
    item 3 then has no run to count."""
    out = tmp_path / "gpu.json"
    argv = ["--gpu-suite", "--out", str(out), "--model", "mlp", "--batch-size", "8", "--sim-models", "mlp,cnn",
            "--sim-workers", "2", "--sim-batch-size", "2", "--repeats", "1", "--warmup", "1", "--skip-training"]
    assert main(argv) == 0
    res = json.loads(out.read_text())
    assert (res["model"], res["batch_size"], res["steps_per_repeat"], res["compilations"]) == ("mlp", 8, 2, {})
    assert set(res["simulation"]["gate_counts"]) == {"vmap"}  # item 1b counted under its timed loop only
    cnn = res["simulation"]["throughput"]["cnn"]
    assert cnn["auto"] == "unroll" and set(cnn["per_k"]["2"]["loops"]) == {"vmap", "map", "unroll"}
    assert cnn["per_k"]["2"]["loops"]["vmap"]["counts"]["grouped_convolutions"] > 0
    assert cnn["per_k"]["2"]["loops"]["unroll"]["counts"]["grouped_convolutions"] == 0
    assert out.with_suffix(".md").read_text().count("| cnn (2 / worker) | 2 |") == 3
