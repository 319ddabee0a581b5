"""The command line: ``python -m experiments.cifar``.

Parses flags into ``Config`` objects (one per method and seed), checks them
all, then trains each run with ``train.train_and_evaluate`` on the same data
order and seed, and ends with the comparison table and plots of
``experiments/report.py``.

Bad input ends the program with one line ``error: ...`` naming the flag and
exit status 2, before any training. A non-finite loss, variance or parameter
stops it with the step and exit status 3; SIGTERM / SIGINT writes a
checkpoint and exits with 128 + the signal number; ``--resume`` continues.
On a CPU-only machine the devices that carry the ``--workers`` are virtual
(``--devices``), which must be set before jax's first operation, so that
happens right after the flags are parsed.
"""

from __future__ import annotations

import os
import socket
import sys
import time
from typing import Optional


def _reachable(address: str, timeout: float) -> bool:
    """Whether a TCP connection to HOST:PORT opens within ``timeout`` seconds (retrying)."""
    host, _, port = address.rpartition(":")
    end = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host, int(port)), timeout=max(0.1, min(2.0, end - time.monotonic()))):
                return True
        except OSError:
            if time.monotonic() >= end:
                return False
            time.sleep(0.2)


def start_distributed(options) -> Optional[str]:
    """Join the multi-process run; an error message if that fails."""
    from adpsgd_jax import distributed

    explicit = options.coordinator != "auto"
    # jax aborts the whole process (no Python exception) when it cannot register
    # with the coordinator, so processes other than 0 first check that it answers.
    if explicit and options.process_id != 0 and not _reachable(options.coordinator, options.distributed_timeout):
        return (f"--coordinator: nothing answers at {options.coordinator} after {options.distributed_timeout} s; "
                "start process 0 there first, or check the address and port")
    try:
        distributed.initialize(
            options.coordinator if explicit else None,
            options.num_processes if explicit else None,
            options.process_id if explicit else None,
            initialization_timeout=options.distributed_timeout,
            heartbeat_timeout=max(5, options.distributed_timeout // 3),
        )
    except Exception as err:  # jax raises RuntimeError / XlaRuntimeError with a long status text
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        return (f"--coordinator: could not join the run at {options.coordinator} within "
                f"{options.distributed_timeout} s ({first[:300]})")
    return None


def request_cpu_devices(config, options) -> None:
    """On CPU the devices are virtual: ask for this process's share of the
    run's devices before jax's first operation. A caller that chose the CPU
    device count already (a test, a notebook: ``jax_num_cpu_devices`` set, or
    jax started) keeps its own devices."""
    import jax  # starts nothing

    from adpsgd_jax import distributed
    from experiments.config import cpu_devices_per_process

    if jax.config.jax_num_cpu_devices == -1:  # jax's "not chosen"
        distributed.set_cpu_devices(cpu_devices_per_process(config, options.num_processes or 1))


def main(argv=None) -> int:
    from experiments import translate
    from experiments.config import ConfigError
    from experiments.flags import parser

    try:
        configs, options = translate.from_args(parser().parse_args(argv))
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    request_cpu_devices(configs[0], options)
    if options.distributed:
        failure = start_distributed(options)
        if failure:
            print(f"error: {failure}", file=sys.stderr)
            return 2

    import jax

    from experiments import checkpoint, data, report, results, train
    from experiments.setup import prepare
    from experiments.sources import DataUnavailableError

    try:
        first = configs[0]
        dataset = data.load(first.dataset, first.data_dir, synthetic_size=first.synthetic_size, augment=first.augment)
        setups = [prepare(c, dataset, options) for c in configs]
    except (ConfigError, DataUnavailableError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if jax.process_index() == 0:
        layout = setups[0].layout
        print(f"workers: {layout.num_workers} on {layout.mesh.devices.size} {jax.devices()[0].platform.upper()} "
              f"device{'s' if layout.mesh.devices.size > 1 else ''}, {layout.workers_per_device} per device, worker loop {layout.loop.name}"
              + (" (--worker-loop auto)" if first.worker_loop == "auto" else ""), flush=True)
        print(f"data: {dataset.source} ({dataset.num_train} train, {dataset.num_test} test examples)", flush=True)
    os.makedirs(options.out, exist_ok=True)
    for setup in setups:
        try:
            train.train_and_evaluate(setup, options)
        except train.NonFiniteError as err:
            print(f"error: {err}", file=sys.stderr)
            return 3
        except train.PeerFailure as err:
            print(f"error: {err}", file=sys.stderr)
            sys.stderr.flush()
            sys.stdout.flush()
            # jax.distributed's exit-time shutdown barrier cannot succeed without the
            # peer and would abort with a fatal log: leave at once instead.
            os._exit(4)
        except train.Interrupted as err:
            print(f"stopped: {err}", file=sys.stderr)
            return 128 + err.signum
        except checkpoint.CheckpointError as err:
            print(f"error: --resume: {err}", file=sys.stderr)
            return 2
    if jax.process_index() == 0:
        try:
            print(report.build(options.out, plots=options.plots))
        except results.StaleSummary as err:  # an older version's run in the same --out
            print(f"error: report: {err}", file=sys.stderr)
            return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
