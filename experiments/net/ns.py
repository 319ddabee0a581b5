"""A small network on one machine: worker namespaces joined by shaped links.

``Lab(P)`` makes P Linux network namespaces ``adpnb<tag>-w<i>`` and one hub
namespace ``adpnb<tag>-hub`` holding a bridge. Worker i has one veth link to
the bridge, address 10.213.S.(i + 1)/24 (S random; the addresses exist only
inside these namespaces, nothing is added to the machine's own namespace).
``shape(rate_mbit)`` puts a token-bucket filter (``tc tbf``) on both ends of
every link, so each worker sends and receives at that rate, as through one
switch port; ``shape(None)`` removes it (veth at memory speed). The bucket
holds two frames (less lets timer delays cut the rate), so after a silence
two frames pass at memory speed; the MTU is therefore chosen with the rate,
1500 bytes below 1 Gbit/s and 9000 (jumbo frames) from 1 Gbit/s, so those
two frames take at most about 0.25 ms at the rate. ``spawn``
starts a command inside a worker's namespace with its own UTS namespace whose
host name is the worker's address: gloo, which jax uses for CPU collectives,
binds the address its host name resolves to (gloo's ``tcp::CreateDevice``
with no interface: ``gethostname`` then ``getaddrinfo``), so the collectives
go over the shaped link and not through the machine's own name.

Added delay is not offered: it needs the ``netem`` qdisc (or ``fq`` with
departure times), and ``missing_delay_support`` says whether this kernel has
either. Everything made is removed by ``close`` (and on leaving the ``with``
block), processes first; ``remove_leftovers`` clears what a killed run left.
Needs root (CAP_SYS_ADMIN and CAP_NET_ADMIN): ``missing_rights`` says why not.
"""

from __future__ import annotations

import gzip
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from typing import Optional, Sequence

PREFIX = "adpnb"  # every namespace and interface made here starts with this
TOOLS = ("ip", "tc", "unshare")
HEADER_BYTES = 14 + 20 + 32  # Ethernet (counted by tbf) + IPv4 + TCP with timestamps, per packet


class LabError(RuntimeError):
    """A command that builds or shapes the network failed."""


def _run(*argv: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    if check and proc.returncode:
        raise LabError(f"`{' '.join(argv)}` failed: {(proc.stderr or proc.stdout).strip()}")
    return proc


def missing_rights() -> Optional[str]:
    """Why this process cannot build a ``Lab`` (None when it can).

    Checks the tools, then creates and deletes one namespace: the only
    reliable test of the rights (capabilities, seccomp, a read-only /run).
    """
    absent = [t for t in TOOLS if shutil.which(t) is None]
    if absent:
        return f"needs the command(s) {', '.join(absent)} (iproute2, util-linux)"
    probe = f"{PREFIX}{secrets.token_hex(3)}-probe"
    made = _run("ip", "netns", "add", probe, check=False)
    if made.returncode:
        who = "root" if os.geteuid() else "CAP_SYS_ADMIN and CAP_NET_ADMIN"
        return f"needs {who} to create network namespaces (`ip netns add`: {made.stderr.strip()})"
    _run("ip", "netns", "del", probe, check=False)
    return None


def missing_delay_support() -> str:
    """Why links cannot get an added delay on this kernel ('' if they could)."""
    try:
        with gzip.open("/proc/config.gz", "rt") as f:
            config = f.read()
    except OSError:
        return "the kernel configuration is unreadable (/proc/config.gz)"
    have = {name: f"CONFIG_NET_SCH_{name}=" in config for name in ("NETEM", "FQ", "ETF")}
    if have["NETEM"] or have["FQ"] or have["ETF"]:
        return ""
    return "the kernel has neither the netem qdisc nor fq / etf (which honour departure times set by BPF)"


def leftovers() -> list[str]:
    """Namespaces (and interfaces of this namespace) named with ``PREFIX``."""
    names = _run("ip", "netns", "list", check=False).stdout.split()
    links = _run("ip", "-o", "link", "show", check=False).stdout.splitlines()
    ifaces = [line.split(":")[1].strip().split("@")[0] for line in links if ":" in line]
    return sorted({n for n in names if n.startswith(PREFIX)} | {i for i in ifaces if i.startswith(PREFIX)})


def remove_leftovers() -> list[str]:
    """Delete every namespace named with ``PREFIX`` (runs killed with SIGKILL leave them)."""
    gone = leftovers()
    for name in gone:
        _run("ip", "netns", "del", name, check=False)
        _run("ip", "link", "del", name, check=False)
    return gone


def payload_rate(rate_mbit: float, mtu: int) -> float:
    """TCP payload bytes per second on a link of ``rate_mbit`` (tbf counts whole Ethernet frames)."""
    return rate_mbit * 1e6 / 8 * (mtu - HEADER_BYTES + 14) / (mtu + 14)


def mtu_for(rate_mbit: Optional[float]) -> int:
    """The MTU for a link rate: jumbo frames from 1 Gbit/s (and unshaped), Ethernet's 1500 below."""
    return 9000 if rate_mbit is None or rate_mbit >= 1000 else 1500


class Lab:
    """P worker namespaces on one bridge; see the module docstring.

    Args:
      workers: P, 2 to 16.
      mtu: link MTU in bytes; None: ``mtu_for`` the rate of each ``shape``.
    """

    def __init__(self, workers: int, mtu: Optional[int] = None):
        if not 2 <= workers <= 16:
            raise ValueError(f"workers must be in [2, 16], got {workers}")
        self.workers, self.fixed_mtu, self.mtu = workers, mtu, mtu or 1500
        self.tag = f"{PREFIX}{secrets.token_hex(3)}"
        self.subnet = f"10.213.{secrets.randbelow(254) + 1}"
        self.hub = f"{self.tag}-hub"
        self.namespaces: list[str] = []
        self.processes: list[subprocess.Popen] = []
        self.rate_mbit: Optional[float] = None

    def ns(self, i: int) -> str:
        return f"{self.tag}-w{i}"

    def address(self, i: int) -> str:
        return f"{self.subnet}.{i + 1}"

    def _ends(self) -> list[tuple[str, str]]:
        """(namespace, interface) of both ends of every link."""
        return [(self.ns(i), f"{self.tag}w{i}") for i in range(self.workers)] + [
            (self.hub, f"{self.tag}p{i}") for i in range(self.workers)]

    def __enter__(self) -> "Lab":
        try:
            self.open()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def open(self) -> None:
        bridge = f"{self.tag}b"
        for name in [self.hub] + [self.ns(i) for i in range(self.workers)]:
            _run("ip", "netns", "add", name)
            self.namespaces.append(name)
        _run("ip", "-n", self.hub, "link", "add", bridge, "type", "bridge")
        for i in range(self.workers):
            inside, port = f"{self.tag}w{i}", f"{self.tag}p{i}"
            # Both ends are made directly inside their namespaces.
            _run("ip", "link", "add", inside, "netns", self.ns(i), "type", "veth", "peer", "name", port,
                 "netns", self.hub)
            _run("ip", "-n", self.hub, "link", "set", port, "master", bridge, "up")
            _run("ip", "-n", self.ns(i), "link", "set", inside, "up")
            _run("ip", "-n", self.ns(i), "addr", "add", f"{self.address(i)}/24", "dev", inside)
            _run("ip", "-n", self.ns(i), "link", "set", "lo", "up")
        _run("ip", "-n", self.hub, "link", "set", bridge, "up")

    def shape(self, rate_mbit: Optional[float]) -> None:
        """Limit every link to ``rate_mbit`` Mbit/s each way (None: unshaped).

        tbf with a bucket of two frames and a queue of 0.2 s (at least 1 MB),
        so nothing is dropped; the MTU of every end set first.
        """
        self.mtu = self.fixed_mtu or mtu_for(rate_mbit)
        for ns, dev in self._ends():
            _run("ip", "-n", ns, "link", "set", dev, "mtu", str(self.mtu))
        for ns, dev in self._ends():
            if rate_mbit is None:
                _run("tc", "-n", ns, "qdisc", "del", "dev", dev, "root", check=False)
                continue
            burst = 2 * (self.mtu + 14)
            limit = max(1 << 20, int(rate_mbit * 1e6 / 8 * 0.2))
            _run("tc", "-n", ns, "qdisc", "replace", "dev", dev, "root", "tbf", "rate", f"{rate_mbit}mbit",
                 "burst", str(burst), "limit", str(limit))
        self.rate_mbit = rate_mbit

    def command(self, i: int, argv: Sequence[str]) -> list[str]:
        """``argv`` run in worker i's namespace, host name = its address."""
        return ["ip", "netns", "exec", self.ns(i), "unshare", "--uts", "--", "sh", "-c",
                'hostname "$0" && exec "$@"', self.address(i), *argv]

    def spawn(self, i: int, argv: Sequence[str], **popen) -> subprocess.Popen:
        """Start ``argv`` in worker i's namespace (own session); ``close`` stops it."""
        proc = subprocess.Popen(self.command(i, argv), start_new_session=True, **popen)
        self.processes.append(proc)
        return proc

    def stop(self, grace: float = 5.0) -> None:
        """SIGTERM every live process started here, SIGKILL after ``grace`` seconds."""
        live = [p for p in self.processes if p.poll() is None]
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for p in live:
                try:
                    os.killpg(p.pid, sig)
                except ProcessLookupError:
                    pass
            end = time.monotonic() + grace
            while time.monotonic() < end and any(p.poll() is None for p in live):
                time.sleep(0.05)
            live = [p for p in live if p.poll() is None]
            if not live:
                break
        for p in self.processes:
            if p.poll() is None:
                p.wait(timeout=grace)
        self.processes = []

    def close(self) -> None:
        """Stop the processes, delete the namespaces (their links go with them)."""
        try:
            self.stop()
        finally:
            for name in reversed(self.namespaces):
                _run("ip", "netns", "del", name, check=False)
            self.namespaces = []

    def probe(self, src: int = 0, dst: int = 1, nbytes: int = 1 << 20, pings: int = 200) -> dict:
        """Round-trip time of 1-byte TCP messages and payload rate of ``nbytes``
        transfers from worker ``src`` to ``dst`` (medians): {'rtt_s', 'goodput_Bps', 'nbytes'}."""
        server = self.spawn(dst, [sys.executable, "-c", _PROBE, "serve", self.address(dst)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        client = subprocess.run(self.command(src, [sys.executable, "-c", _PROBE, "ping", self.address(dst),
                                                   str(nbytes), str(pings)]),
                                capture_output=True, text=True, timeout=120)
        server.wait(timeout=10)
        self.processes.remove(server)
        if client.returncode:
            raise LabError(f"link probe failed: {client.stderr.strip()[-500:]}")
        rtt, transfer = (float(x) for x in client.stdout.split())
        return {"rtt_s": rtt, "goodput_Bps": nbytes / max(transfer - rtt, 1e-9), "nbytes": nbytes}


# Ping-pong over one TCP connection: "serve ADDR" answers each length-prefixed
# message with one byte; "ping ADDR NBYTES PINGS" prints the median round trip
# of 1-byte messages and of NBYTES messages, each sent after 5 ms of silence.
_PROBE = r"""
import socket, sys, time
mode, host, port = sys.argv[1], sys.argv[2], 45111
if mode == "serve":
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); s.bind((host, port)); s.listen(1)
    c, _ = s.accept(); c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    while (head := c.recv(8, socket.MSG_WAITALL)) and len(head) == 8:
        left = int.from_bytes(head, "little")
        while left:
            left -= len(c.recv(min(left, 1 << 20)))
        c.sendall(b"k")
    sys.exit(0)
nbytes, pings = int(sys.argv[3]), int(sys.argv[4])
end = time.monotonic() + 10
while True:
    try:
        c = socket.create_connection((host, port), timeout=1); break
    except OSError:
        if time.monotonic() > end: raise
        time.sleep(0.05)
c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
def median(n, k):
    times = []
    for _ in range(k):
        time.sleep(0.005)  # an idle link, as between the syncs of a training run
        t = time.perf_counter(); c.sendall(n.to_bytes(8, "little") + b"x" * n); c.recv(1)
        times.append(time.perf_counter() - t)
    return sorted(times)[k // 2]
print(median(1, pings), median(nbytes, 7))
"""
