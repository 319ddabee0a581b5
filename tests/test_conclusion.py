"""The closing sentences of a comparison (``experiments.conclusion``), on hand-made summaries."""

import types

import pytest

from experiments import conclusion


def run(label, seed, loss, sent):
    return types.SimpleNamespace(label=label, seed=seed, summary={"final_train_loss": loss, "bytes": sent})


def runs(losses: dict, sent: dict):
    return [run(label, k, loss, sent[label]) for label, per_seed in losses.items() for k, loss in enumerate(per_seed)]


def test_best_below_allreduce_its_bytes_and_a_difference_outside_the_noise():
    text = conclusion.sentences(runs({"allreduce": [0.10, 0.11, 0.12], "cpsgd": [0.20, 0.22, 0.21],
                                      "adpsgd": [0.18, 0.20, 0.19]},
                                     {"allreduce": 8e6, "cpsgd": 1e6, "adpsgd": 1e6}), plot="out/loss_vs_bytes.png")
    first, second, third, plot = text.strip().split("\n")
    assert first == ("Of the methods that send less than allreduce, adpsgd reached the lowest final training loss, "
                     "0.1900 (mean of 3 seeds); allreduce (full-sync SGD) reached 0.1100.")
    assert second == "It sent 1.000 MB per worker, 12.5% of allreduce's 8.000 MB."
    # d = -0.02 on every seed: sd 0, so the interval is the point and lies below 0.
    assert third.startswith("Its difference from the runner-up, cpsgd, is -0.0200 [-0.0200, -0.0200]")
    assert third.endswith("outside the seeds' noise.") and plot.endswith("out/loss_vs_bytes.png")


def test_a_difference_inside_the_noise_is_inconclusive():
    text = conclusion.sentences(runs({"cpsgd": [0.20, 0.22, 0.21], "adpsgd": [0.19, 0.23, 0.20]},
                                     {"cpsgd": 1e6, "adpsgd": 1e6}))
    assert text.startswith("Of the methods run, adpsgd reached")
    assert "(add allreduce to compare with its bytes)" in text
    assert text.strip().endswith("inside the seeds' noise (inconclusive).") and "Plot" not in text


@pytest.mark.parametrize("losses, words", [
    ({"adpsgd": [0.2]}, "With one method there is no difference to test."),
    ({"adpsgd": [0.2], "cpsgd": [0.3]}, "With 1 seed in common"),
])
def test_too_little_to_test_is_said(losses, words):
    assert words in conclusion.sentences(runs(losses, dict.fromkeys(losses, 1e6)))
