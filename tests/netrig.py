"""A two-"host" network rig for tests: two network namespaces joined by 1..N
veth pairs ("rails", one NIC per rail on each host), optionally rate-limited
with ``tc tbf``.  See docs/netrig.md.

    from netrig import NetRig, rig_unavailable

    with NetRig(rails=2, rate_mbit=[200, None]) as rig:
        rig.rails[0].addr_a            # "198.18.0.1" (host A side of rail 0)
        proc = rig.popen("b", ["python", "-c", "..."], stdout=subprocess.PIPE)
        rig.set_rate(1, 50)           # shape rail 1 at run time (both ends)

Rules it keeps: addresses only from 198.18.0.0/15 (rail i is 198.18.(4i)/30,
A = .1, B = .2 of the /30); each namespace has ``lo`` and its rail interfaces,
no default route, nothing routed outside.  Namespaces are named
``afnr<pid>x<seq>a``/``...b`` so parallel runs never collide; deleting a
namespace deletes its veths.  Rigs are closed by ``close()``, the context
manager, and at interpreter exit; rigs left by killed processes (their pid is
gone) are removed by :func:`cleanup_stale`, which every new rig runs first.
Needs root, iproute2 (``ip``, ``tc``), veth and sch_tbf in the kernel.
"""
from __future__ import annotations

import atexit
import functools
import ipaddress
import os
import re
import select
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from aiofabric.liveness import process_alive

__all__ = [
    "BASE",
    "PREFIX",
    "NetRig",
    "Rail",
    "RigError",
    "cleanup_stale",
    "readline",
    "rig_unavailable",
    "tbf_params",
]

#: Every namespace this module creates starts with this (then ``<pid>x<seq>``).
PREFIX = "afnr"
#: The only addresses the rig hands out (RFC 2544 benchmarking range).
BASE = ipaddress.IPv4Network("198.18.0.0/15")
MAX_RAILS = 64
_NS_RE = re.compile(rf"^{PREFIX}(\d+)x(\d+)[ab]$")
_TIMEOUT = 30.0


class RigError(RuntimeError):
    """An ``ip``/``tc`` command failed while building or changing the rig."""


@dataclass(frozen=True)
class Rail:
    """One rail: a veth pair, one end in each namespace, with a /30 subnet."""

    index: int
    if_a: str         #: interface name in namespace A (also the libfabric domain name)
    if_b: str         #: interface name in namespace B
    addr_a: str       #: IPv4 address of the A end, e.g. "198.18.0.1"
    addr_b: str       #: IPv4 address of the B end, e.g. "198.18.0.2"
    prefixlen: int    #: 30
    subnet: str       #: "198.18.0.0/30": also the libfabric fabric name of the rail

    def iface(self, host: str) -> str:
        return self.if_a if _host(host) == "a" else self.if_b

    def addr(self, host: str) -> str:
        return self.addr_a if _host(host) == "a" else self.addr_b


def _host(host: str) -> str:
    if host not in ("a", "b", "A", "B"):
        raise ValueError(f"host must be 'a' or 'b', not {host!r}")
    return host.lower()


def _cmd(argv: Sequence[str], stdin: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
    p = subprocess.run(list(argv), input=stdin, capture_output=True, text=True, timeout=_TIMEOUT)
    if check and p.returncode != 0:
        what = " ".join(argv) + (f" <<< {stdin.strip()!r}" if stdin else "")
        raise RigError(f"{what}: exit {p.returncode}: {p.stderr.strip() or p.stdout.strip()}")
    return p


def tbf_params(mbit: float) -> tuple[str, str, str]:
    """(rate, burst, latency) arguments of ``tc ... tbf`` for ``mbit`` Mbit/s.

    burst: 4 ms of traffic at the rate, at least 32 KiB -- big enough that the
    token bucket does not need a timer wake-up per packet (a 2-core VM then
    falls short of the rate), small enough that a 0.5 s measurement is off by
    at most ~1% (200 Mbit/s: 100 kB).  GSO packets bigger than the burst are
    segmented by tbf, not dropped.  latency 50 ms bounds the queue
    (rate x 50 ms + burst bytes); TCP's small-queues keep it mostly empty.
    """
    if not (mbit > 0):
        raise ValueError(f"rate must be a positive number of Mbit/s, got {mbit!r}")
    burst = max(32 * 1024, int(mbit * 1e6 / 8 * 0.004))
    return f"{round(mbit * 1000)}kbit", str(burst), "50ms"


def _alive(pid: int) -> bool:
    return process_alive(pid, 0)  # the library's check (exited and zombie processes are dead)


def _list_netns() -> list[str]:
    p = _cmd(["ip", "netns", "list"], check=False)
    return [line.split()[0] for line in p.stdout.splitlines() if line.strip()]


def cleanup_stale(all_of_them: bool = False) -> list[str]:
    """Delete rig namespaces whose creating process is gone (``all_of_them``:
    every namespace with our prefix, live rigs of other processes too -- only
    for manual use).  Returns the names deleted."""
    gone = []
    for name in _list_netns():
        m = _NS_RE.match(name)
        if not m:
            continue
        pid = int(m.group(1))
        if all_of_them or (pid != os.getpid() and not _alive(pid)):
            if _cmd(["ip", "netns", "del", name], check=False).returncode == 0:
                gone.append(name)
    return gone


@functools.cache
def rig_unavailable() -> str | None:
    """Why a NetRig cannot be built here, or None when it can (cached)."""
    if not sys.platform.startswith("linux"):
        return "network namespaces need Linux"
    if os.geteuid() != 0:
        return "the network rig needs root (ip netns, veth, tc)"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"the network rig needs iproute2: {tool!r} not found"
    probe = f"{PREFIX}{os.getpid()}x0a"
    try:
        p = _cmd(["ip", "netns", "add", probe], check=False)
        if p.returncode != 0:
            return f"'ip netns add' fails: {p.stderr.strip()}"
        p = _cmd(["ip", "-n", probe, "link", "add", "p0", "type", "veth", "peer", "name", "p1"], check=False)
        if p.returncode != 0:
            return f"cannot create veth pairs: {p.stderr.strip()}"
        rate, burst, lat = tbf_params(100)
        p = _cmd(["tc", "-n", probe, "qdisc", "add", "dev", "p0", "root", "tbf",
                  "rate", rate, "burst", burst, "latency", lat], check=False)
        if p.returncode != 0:
            return f"tc tbf is not available (sch_tbf): {p.stderr.strip()}"
    finally:
        _cmd(["ip", "netns", "del", probe], check=False)
    return None


_live: dict[int, NetRig] = {}
_live_lock = threading.Lock()
_seq = iter(range(1, 1 << 62))


@atexit.register
def _close_all() -> None:
    with _live_lock:
        rigs = list(_live.values())
    for rig in rigs:
        rig.close()


class NetRig:
    """Two namespaces ("hosts" A and B) joined by ``rails`` veth pairs.

    ``rate_mbit[i]``: shape rail i to that many Mbit/s on both ends (tbf;
    None: unshaped).  Attributes: ``ns_a``, ``ns_b`` (namespace names),
    ``rails`` (list of :class:`Rail`), ``rates`` (current shaping per rail),
    ``setup_s`` (seconds the construction took).
    """

    def __init__(self, rails: int = 2, rate_mbit: Sequence[float | None] | None = None) -> None:
        if type(rails) is not int or not 1 <= rails <= MAX_RAILS:
            raise ValueError(f"rails must be an int in 1..{MAX_RAILS}, got {rails!r}")
        rates = list(rate_mbit) if rate_mbit is not None else [None] * rails
        if len(rates) != rails:
            raise ValueError(f"rate_mbit has {len(rates)} entries for {rails} rails")
        for r in rates:
            if r is not None:
                tbf_params(r)  # validates
        why = rig_unavailable()
        if why:
            raise RigError(why)
        t0 = time.perf_counter()
        cleanup_stale()
        seq = next(_seq)
        self.ns_a = f"{PREFIX}{os.getpid()}x{seq}a"
        self.ns_b = f"{PREFIX}{os.getpid()}x{seq}b"
        self.rails: list[Rail] = []
        self.rates: list[float | None] = [None] * rails
        self._procs: list[subprocess.Popen] = []
        self._made: list[str] = []
        self._closed = False
        nets = BASE.subnets(new_prefix=30)
        for i in range(rails):
            net = next(nets)
            a, b = list(net.hosts())
            self.rails.append(Rail(i, f"r{i}", f"r{i}", str(a), str(b), net.prefixlen, str(net)))
        with _live_lock:
            _live[id(self)] = self
        try:
            for ns in (self.ns_a, self.ns_b):
                _cmd(["ip", "netns", "add", ns])
                self._made.append(ns)
            # The veths are created straight inside the namespaces: the names
            # never exist in the root namespace, so parallel rigs cannot clash.
            # The two ends get different ifindexes (A 100+i, B 200+i): with
            # equal ones (both would be 2 in fresh namespaces) the kernel's
            # linkwatch takes the carrier change for non-urgent and sets the
            # operational state up to 1 s late -- libfabric ignores the rail
            # until then.
            _cmd(["ip", "-batch", "-"], stdin="".join(
                f"link add {r.if_a} index {100 + r.index} netns {self.ns_a} type veth "
                f"peer name {r.if_b} index {200 + r.index} netns {self.ns_b}\n"
                for r in self.rails))
            for host, ns in (("a", self.ns_a), ("b", self.ns_b)):
                lines = ["link set lo up"]
                for r in self.rails:
                    # No IPv6 link-local address on rails: libfabric would list
                    # a second (fe80::/64) fabric per rail domain.
                    lines += [f"link set {r.iface(host)} addrgenmode none",
                              f"addr add {r.addr(host)}/{r.prefixlen} dev {r.iface(host)}",
                              f"link set {r.iface(host)} up"]
                _cmd(["ip", "-n", ns, "-batch", "-"], stdin="".join(x + "\n" for x in lines))
            for i, rate in enumerate(rates):
                if rate is not None:
                    self.set_rate(i, rate)
            self._wait_carrier()
        except BaseException:
            self.close()
            raise
        self.setup_s = time.perf_counter() - t0

    # -- helpers --------------------------------------------------------------

    def ns(self, host: str) -> str:
        """The namespace name of host "a" or "b"."""
        return self.ns_a if _host(host) == "a" else self.ns_b

    def _wait_carrier(self, timeout: float = 10.0) -> None:
        """Wait until every rail end is operationally up."""
        deadline = time.monotonic() + timeout
        want = {r.if_a for r in self.rails}
        while True:
            up = set()
            for ns in (self.ns_a, self.ns_b):
                out = _cmd(["ip", "-n", ns, "-o", "link", "show", "up"]).stdout
                # Operational state UP (IFF_RUNNING), not just carrier: the
                # kernel sets it a little after LOWER_UP, and libfabric's tcp
                # and udp providers skip interfaces that are not RUNNING.
                up |= {f"{ns}/{m.group(1)}"
                       for m in re.finditer(r"^\d+: ([^:@]+)[@:].*LOWER_UP.* state UP ", out, re.MULTILINE)}
            if all(f"{ns}/{w}" in up for w in want for ns in (self.ns_a, self.ns_b)):
                return
            if time.monotonic() > deadline:
                raise RigError(f"rails did not come up within {timeout} s: {sorted(up)}")
            time.sleep(0.01)

    def _check_open(self) -> None:
        if self._closed:
            raise RigError("the rig is closed")

    # -- shaping --------------------------------------------------------------

    def set_rate(self, rail: int, mbit: float | None) -> None:
        """Shape ``rail`` to ``mbit`` Mbit/s on both ends (``tc qdisc replace``
        ... tbf), or remove the shaping (``mbit=None``: ``tc qdisc del``)."""
        self._check_open()
        r = self.rails[rail]
        for host in ("a", "b"):
            dev = r.iface(host)
            if mbit is None:
                if self.rates[rail] is not None:
                    _cmd(["tc", "-n", self.ns(host), "qdisc", "del", "dev", dev, "root"])
            else:
                rate, burst, lat = tbf_params(mbit)
                _cmd(["tc", "-n", self.ns(host), "qdisc", "replace", "dev", dev, "root", "tbf",
                      "rate", rate, "burst", burst, "latency", lat])
        self.rates[rail] = mbit

    # -- processes ------------------------------------------------------------

    def argv(self, host: str, argv: Sequence[str]) -> list[str]:
        """``argv`` prefixed to run inside the namespace of ``host``."""
        return ["ip", "netns", "exec", self.ns(host), *argv]

    def popen(self, host: str, argv: Sequence[str], **kw: Any) -> subprocess.Popen:
        """Start ``argv`` inside host "a" or "b" (``subprocess.Popen`` keywords
        pass through).  Processes still running at ``close()`` are killed."""
        self._check_open()
        proc = subprocess.Popen(self.argv(host, argv), **kw)
        self._procs.append(proc)
        return proc

    def run(self, host: str, argv: Sequence[str], **kw: Any) -> subprocess.CompletedProcess:
        """``subprocess.run`` inside host "a" or "b"; defaults: check=True,
        capture_output=True, text=True, timeout=60 (override by keyword)."""
        self._check_open()
        kw.setdefault("check", True)
        kw.setdefault("text", True)
        kw.setdefault("timeout", 60)
        if "stdout" not in kw and "stderr" not in kw:
            kw.setdefault("capture_output", True)
        return subprocess.run(self.argv(host, argv), **kw)

    # -- teardown -------------------------------------------------------------

    def close(self) -> None:
        """Kill the rig's processes still running, delete both namespaces
        (and with them the veths).  Idempotent; errors are collected and
        raised after everything was tried."""
        if self._closed:
            return
        self._closed = True
        t0 = time.perf_counter()
        errors = []
        for p in self._procs:
            if p.poll() is None:
                p.kill()
            try:
                p.wait(10)
            except subprocess.TimeoutExpired as e:  # pragma: no cover
                errors.append(f"process {p.pid} did not die: {e}")
        for ns in reversed(self._made):
            p = _cmd(["ip", "netns", "del", ns], check=False)
            if p.returncode != 0:
                errors.append(f"ip netns del {ns}: {p.stderr.strip()}")
        self._made.clear()
        with _live_lock:
            _live.pop(id(self), None)
        self.teardown_s = time.perf_counter() - t0
        if errors:
            raise RigError("; ".join(errors))

    def __enter__(self) -> NetRig:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        rails = ", ".join(f"{r.if_a}:{r.subnet}@{self.rates[r.index] or 'unshaped'}" for r in self.rails)
        return f"<NetRig {self.ns_a}/{self.ns_b} {state} [{rails}]>"


def readline(proc: subprocess.Popen, timeout: float = 30.0) -> str:
    """One line of ``proc``'s stdout (opened with ``stdout=PIPE``), without the
    newline, waiting at most ``timeout`` s.  Reads the pipe's fd directly, so
    never mix it with reads through ``proc.stdout``.  Raises TimeoutError, or
    EOFError when the process closed its stdout."""
    assert proc.stdout is not None, "popen with stdout=subprocess.PIPE"
    fd = proc.stdout.fileno()
    deadline = time.monotonic() + timeout
    out = bytearray()
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"no line from pid {proc.pid} within {timeout} s (got {bytes(out)!r})")
        ready, _, _ = select.select([fd], [], [], left)
        if not ready:
            continue
        b = os.read(fd, 1)
        if not b:
            raise EOFError(f"pid {proc.pid} closed stdout (exit {proc.poll()}), partial line {bytes(out)!r}")
        if b == b"\n":
            return out.decode(errors="replace")
        out += b


if __name__ == "__main__":  # python tests/netrig.py cleanup [--all]
    if sys.argv[1:2] == ["cleanup"]:
        print("\n".join(cleanup_stale(all_of_them="--all" in sys.argv)) or "nothing to clean")
    else:
        print(rig_unavailable() or "rig available")
