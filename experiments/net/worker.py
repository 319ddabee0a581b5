"""One training process of the network benchmark, started by ``bench.launch`` inside a namespace:
``python -m experiments.net.worker [--repeats R] [--compile-cache DIR] <experiments.cifar flags>``.

It trains the runs that ``python -m experiments.cifar`` would with the same
flags (``train.train_and_evaluate``, the distributed start-up of
``experiments.cifar``), R times (default 1): repeat r trains them in the
order of ``--compare`` rotated by r (``rotated``) into ``<--out>/r<r>``.
``--compile-cache DIR``: jax's persistent compilation cache in DIR, so that
later repeats (and launches) load the programs the first compiled; the step
clocks start after the compiling step, so this changes no measurement. Each
run gets a step clock on the training loop's ``on_step`` hook, written beside
its results (``model.STEP_TIMES``). No report: the benchmark reads the run
folders.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Optional

from experiments.net import model


class StepClock:
    """The ``on_step(step, row)`` hook: perf_counter seconds when each step's metrics row is written.

    The clock starts at the first (compiling) step's row, after a barrier, so
    every process starts it together; ``model.Run`` reads what the entries
    mark and takes the evaluations out.
    """

    def __init__(self):
        self.start: Optional[float] = None
        self.rows: list[dict] = []

    def __call__(self, step: int, row: dict) -> None:
        if self.start is None:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices("netbench: start the clock")
            self.start = time.perf_counter()
        self.rows.append({"step": step, "time_s": time.perf_counter() - self.start})

    def write(self, path: str) -> None:
        with open(path + ".tmp", "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in self.rows)
        os.replace(path + ".tmp", path)


def rotated(items: list, r: int) -> list:
    """The order of repeat r: ``items`` rotated left by r (r = 1: the second one first)."""
    k = r % len(items)
    return items[k:] + items[:k]


def repeat_folder(out: str, r: int) -> str:
    """Where repeat r's runs go."""
    return os.path.join(out, f"r{r}")


def main(argv: list[str]) -> int:
    import argparse
    import dataclasses

    from experiments import cifar, translate
    from experiments.config import ConfigError
    from experiments.flags import parser

    own = argparse.ArgumentParser(add_help=False)
    own.add_argument("--repeats", type=int, default=1)
    own.add_argument("--compile-cache", help="jax's persistent compilation cache folder")
    mine, argv = own.parse_known_args(argv)
    try:
        configs, options = translate.from_args(parser().parse_args(argv))
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if mine.compile_cache:  # set before anything compiles; jax writes it from process 0, every process reads it
        import jax

        jax.config.update("jax_compilation_cache_dir", mine.compile_cache)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    cifar.request_cpu_devices(configs[0], options)
    failure = cifar.start_distributed(options)  # the launch always gives --coordinator
    if failure:
        print(f"error: {failure}", file=sys.stderr)
        return 2

    import jax

    from experiments import train
    from experiments.setup import prepare

    for r in range(mine.repeats):
        options_r = dataclasses.replace(options, out=repeat_folder(options.out, r))
        for config in rotated(configs, r):
            setup = prepare(config, options=options_r)
            clock = StepClock()
            try:
                train.train_and_evaluate(setup, options_r, on_step=clock)
            except train.PeerFailure as err:  # as experiments.cifar: leave before jax's exit-time barrier
                print(f"error: {err}", file=sys.stderr, flush=True)
                os._exit(4)
            clock.write(os.path.join(setup.run_dir, model.STEP_TIMES.format(jax.process_index())))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
