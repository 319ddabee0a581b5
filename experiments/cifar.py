"""The command line: ``python -m experiments.cifar``.

Parses flags into ``Config`` objects (one per method and seed), checks them
all, then trains each run with ``train.train_and_evaluate`` on the same data
order and seed, and ends with the comparison table and plots of
``experiments/report.py``.

Bad input ends the program with one line ``error: ...`` naming the flag and
exit status 2, before any training. A non-finite loss, variance or parameter
stops it with the step and exit status 3; SIGTERM / SIGINT writes a
checkpoint and exits with 128 + the signal number; ``--resume`` continues. On a CPU-only machine ``--workers``
sets the number of virtual devices, which must happen before jax starts, so
jax is imported only after the flags are parsed.
"""

from __future__ import annotations

import os
import sys


def _set_virtual_devices(workers: int) -> None:
    if "jax" in sys.modules:
        return  # jax already started (a test or a notebook): use its devices
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if "xla_force_host_platform_device_count" not in f]
    flags.append(f"--xla_force_host_platform_device_count={workers}")
    os.environ["XLA_FLAGS"] = " ".join(flags)


def main(argv=None) -> int:
    from experiments import config as cfg

    parser = cfg.parser()
    args = parser.parse_args(argv)
    try:
        configs, options = cfg.from_args(args)
    except cfg.ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    _set_virtual_devices(configs[0].workers)

    from experiments import checkpoint, data, report, train

    try:
        dataset = data.load(configs[0].dataset, configs[0].data_dir, synthetic_size=configs[0].synthetic_size)
        setups = [train.prepare(c, dataset, options) for c in configs]
    except (cfg.ConfigError, data.DataUnavailableError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    os.makedirs(options.out, exist_ok=True)
    for setup in setups:
        try:
            train.train_and_evaluate(setup, options)
        except train.NonFiniteError as err:
            print(f"error: {err}", file=sys.stderr)
            return 3
        except train.Interrupted as err:
            print(f"stopped: {err}", file=sys.stderr)
            return 128 + err.signum
        except checkpoint.CheckpointError as err:
            print(f"error: --resume: {err}", file=sys.stderr)
            return 2
    print(report.build(options.out, plots=options.plots))
    return 0


if __name__ == "__main__":
    sys.exit(main())
