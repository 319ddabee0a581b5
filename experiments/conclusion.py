"""Three plain sentences that close a comparison: ``sentences(runs)``.

1. Which method reached the lowest final training loss (seed mean), among
   the methods that send less than ``allreduce`` (full-sync SGD) when it ran;
   allreduce's own loss beside it.
2. What that method sent per worker, against allreduce's bytes.
3. Whether its difference from the runner-up is outside the seeds' noise:
   the paired differences d_k = loss(best, seed k) - loss(runner-up, seed k)
   over the seeds both ran, their mean and 95% t-interval
   (``paired_tests.paired``); "outside the seeds' noise" when the whole
   interval is below 0, "inside the seeds' noise (inconclusive)" otherwise.
   The best is picked after the fact, so the interval is optimistic; the
   study (``experiments.study``) tests whole families with a correction.
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from experiments import results
from experiments.paired_tests import paired

ALLREDUCE = "allreduce"


def _by_seed(runs: list[results.Run]) -> dict[str, dict[int, results.Run]]:
    groups: dict = {}
    for run in runs:
        groups.setdefault(run.label, {})[run.seed] = run
    return groups


def _mean(group: dict, key: str) -> float:
    return float(np.mean([run.summary[key] for run in group.values()]))


def sentences(runs: list[results.Run], plot: Optional[str] = None) -> str:
    """The three sentences (and the plot's path) for the finished ``runs`` of one folder."""
    groups = _by_seed(runs)
    reference = groups.get(ALLREDUCE)
    candidates = [label for label in groups if label != ALLREDUCE] or list(groups)
    ranked = sorted(candidates, key=lambda label: _mean(groups[label], "final_train_loss"))
    best = ranked[0]
    loss, sent = _mean(groups[best], "final_train_loss"), _mean(groups[best], "bytes") / 1e6
    seeds = len(groups[best])
    among = "Of the methods that send less than allreduce" if reference and best != ALLREDUCE else "Of the methods run"
    first = (f"{among}, {best} reached the lowest final training loss, {loss:.4f} (mean of {seeds} seed"
             f"{'s' if seeds > 1 else ''})")
    first += f"; {ALLREDUCE} (full-sync SGD) reached {_mean(reference, 'final_train_loss'):.4f}." if reference else "."
    if reference and best != ALLREDUCE:
        full = _mean(reference, "bytes") / 1e6
        second = f"It sent {sent:.3f} MB per worker, {100 * sent / full:.1f}% of {ALLREDUCE}'s {full:.3f} MB."
    else:
        second = f"It sent {sent:.3f} MB per worker" + ("." if reference else f" (add {ALLREDUCE} to compare with "
                                                                                "its bytes).")
    lines = [first, second, _noise(groups, ranked)]
    if plot:
        lines.append(f"Plot of training loss against bytes: {plot}")
    return "\n".join(lines) + "\n"


def _noise(groups: dict, ranked: list[str]) -> str:
    """The third sentence: the best against the runner-up over their common seeds."""
    if len(ranked) < 2:
        return "With one method there is no difference to test."
    best, runner = ranked[0], ranked[1]
    common = sorted(set(groups[best]) & set(groups[runner]))
    d = [groups[best][k].summary["final_train_loss"] - groups[runner][k].summary["final_train_loss"] for k in common]
    if len(d) < 2:
        return (f"With {len(d)} seed in common, whether its difference from the runner-up, {runner}, is outside the "
                "seeds' noise cannot be told (run --seeds 0,1,2).")
    mean, low, high = paired(d)
    where = "outside the seeds' noise" if high < 0 else "inside the seeds' noise (inconclusive)"
    return (f"Its difference from the runner-up, {runner}, is {mean:+.4f} [{low:+.4f}, {high:+.4f}] in final "
            f"training loss (95% t-interval over {len(d)} paired seeds): {where}.")
