"""Try a multi-host run on one machine: ``python -m experiments.launch
--num-processes 2 -- <experiments.cifar flags>``.

Starts that many local processes of ``experiments.cifar`` joined through
jax.distributed on 127.0.0.1 (CPU collectives through gloo), each with
``--workers / --num-processes`` virtual CPU devices. Their output goes to
this terminal; process 0 prints the table. When one process fails, the
others are stopped after ``--grace`` seconds (they normally stop by
themselves once the distributed runtime notices), and the launcher exits
with the first failure's status. SIGINT / SIGTERM are passed on, so every
process writes its checkpoint shards.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import time


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m experiments.launch", description=__doc__.split("\n\n")[0])
    p.add_argument("--num-processes", type=int, default=2)
    p.add_argument("--port", type=int, help="coordinator port on 127.0.0.1 (default: a free one)")
    p.add_argument("--grace", type=float, default=60.0, help="seconds the others get to stop after a failure")
    p.add_argument("cifar_args", nargs=argparse.REMAINDER, help="-- then the flags of experiments.cifar")
    args = p.parse_args(argv)
    rest = args.cifar_args[1:] if args.cifar_args[:1] == ["--"] else args.cifar_args
    if args.num_processes < 1:
        print(f"error: --num-processes must be >= 1, got {args.num_processes}", file=sys.stderr)
        return 2
    for flag in ("--coordinator", "--num-processes", "--process-id"):
        if any(a == flag or a.startswith(flag + "=") for a in rest):
            print(f"error: the launcher sets {flag} itself; drop it from the experiments.cifar flags", file=sys.stderr)
            return 2
    coordinator = f"127.0.0.1:{args.port or free_port()}"
    env = dict(os.environ)  # each process asks for its own CPU devices (jax_num_cpu_devices overrides XLA_FLAGS)
    env.setdefault("JAX_PLATFORMS", "cpu")
    procs = [
        subprocess.Popen([sys.executable, "-m", "experiments.cifar", *rest, "--coordinator", coordinator,
                          "--num-processes", str(args.num_processes), "--process-id", str(i)], env=env)
        for i in range(args.num_processes)
    ]

    def forward(signum, frame):
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signum)

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, forward)
    failed_at, status = None, 0
    while any(proc.poll() is None for proc in procs):
        codes = [proc.poll() for proc in procs]
        if failed_at is None and any(c not in (None, 0) for c in codes):
            failed_at = time.monotonic()
            status = next(c for c in codes if c not in (None, 0))
        if failed_at is not None and time.monotonic() - failed_at > args.grace:
            for proc in procs:
                if proc.poll() is None:
                    proc.kill()
        time.sleep(0.1)
    codes = [proc.returncode for proc in procs]
    return status or next((c for c in codes if c), 0)


if __name__ == "__main__":
    sys.exit(main())
