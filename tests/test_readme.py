"""The README's library example, run as it stands on test_step's regression
(16 workers on the 8 virtual devices, two on each)."""

import pathlib
import re

import numpy as np

from helpers import BATCH, DIM, init_params, loss_fn

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"


def example() -> str:
    text = README.read_text()
    block = re.search(r"<!-- library example: begin -->\n```python\n(.*?)```\n<!-- library example: end -->", text, re.S)
    assert block, "README.md lost its library example markers"
    return block.group(1)


def batches(steps, workers=16, seed=0):
    rng = np.random.default_rng(seed)
    w = rng.normal(size=DIM) + 0.5 * rng.normal(size=(workers, DIM))  # each worker's data pulls elsewhere
    for _ in range(steps):
        x = rng.normal(size=(workers, BATCH, DIM)).astype(np.float32)
        y = np.einsum("nbd,nd->nb", x, w) + 0.3 * rng.normal(size=(workers, BATCH))
        yield {"x": x, "y": y.astype(np.float32)}


def test_the_readme_library_example_runs_and_spends_its_budget(capsys):
    params, model_state = init_params()
    scope = {"loss_fn": loss_fn, "params": params, "model_state": model_state, "batches": batches}
    exec(compile(example(), str(README), "exec"), scope)
    state, metrics, T = scope["state"], scope["metrics"], scope["T"]
    assert state.params["w"].shape == (16, DIM) and scope["layout"].workers_per_device == 2
    syncs = int(metrics.comm.rounds[0])
    assert 0.9 * (T // 8) <= syncs <= T // 8  # P1: the budget, spent
    assert capsys.readouterr().out.startswith(f"{syncs} syncs,")
    first_loss = float(loss_fn(params, model_state, next(batches(1)), None)[0])
    assert float(np.mean(metrics.loss)) < 0.5 * first_loss  # it learned
