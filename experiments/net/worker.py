"""One training process of the network benchmark, started by ``bench.launch`` inside a namespace:
``python -m experiments.net.worker <experiments.cifar flags>``.

It trains the runs that ``python -m experiments.cifar`` would with the same
flags (``train.train_and_evaluate``, the distributed start-up of
``experiments.cifar``), with a step clock on the training loop's ``on_step``
hook, and writes that clock beside each run's results
(``model.STEP_TIMES``). No report: the benchmark reads the run folders.
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


def main(argv: list[str]) -> int:
    from experiments import cifar, config as cfg

    try:
        configs, options = cfg.from_args(cfg.parser().parse_args(argv))
    except cfg.ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    cifar.request_cpu_devices(configs[0], options)
    failure = cifar._start_distributed(options)  # the launch always gives --coordinator
    if failure:
        print(f"error: {failure}", file=sys.stderr)
        return 2

    import jax

    from experiments import train

    for config in configs:
        setup = train.prepare(config, options=options)
        clock = StepClock()
        try:
            train.train_and_evaluate(setup, options, on_step=clock)
        except train.PeerFailure as err:  # as experiments.cifar: leave before jax's exit-time barrier
            print(f"error: {err}", file=sys.stderr, flush=True)
            os._exit(4)
        clock.write(os.path.join(setup.run_dir, model.STEP_TIMES.format(jax.process_index())))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
