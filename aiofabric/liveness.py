"""Who we are, for peers on the same host: a host identity (kernel boot and
PID namespace), our pid and our process start time.  A peer that shares the
host identity can tell in microseconds that we exited (the pid is gone or
now belongs to a younger process), without waiting for a probe to time out.
"""
from __future__ import annotations

import functools
import hashlib
import os
import re

__all__ = ["host_identity", "process_start", "process_alive", "remove_stale_shm_regions"]


@functools.lru_cache(maxsize=1)
def host_identity() -> int:
    """64 bits naming this kernel boot and PID namespace (0 when unknown).
    Processes in different containers on one kernel get different values,
    because their pids are not comparable."""
    try:
        with open("/proc/sys/kernel/random/boot_id", "rb") as f:
            boot = f.read().strip()
        pidns = os.readlink("/proc/self/ns/pid").encode()
    except OSError:
        return 0
    return int.from_bytes(hashlib.blake2b(boot + b"/" + pidns, digest_size=8).digest(), "little") or 1


def process_start(pid: int) -> int:
    """Start time of ``pid`` in clock ticks since boot (0 when unknown, -1
    when the process has exited: a zombie not yet reaped counts as exited)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except FileNotFoundError:
        return -1
    except OSError:
        return 0
    # Fields 3 (state) and 22 (start time); the command name (field 2) may
    # contain spaces and parentheses, so split after its closing one.
    try:
        rest = stat[stat.rindex(b")") + 2 :].split()
        return -1 if rest[0] in (b"Z", b"X") else int(rest[19])
    except (ValueError, IndexError):
        return 0


def process_alive(pid: int, start: int) -> bool:
    """Whether process ``pid`` started at ``start`` still runs (here)."""
    if pid <= 0:
        return True  # unknown: cannot tell
    now = process_start(pid)
    if now < 0:
        return False
    if now == 0:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True  # exists but /proc unreadable: assume it is the same one
    return start == 0 or now == start


def _boot_time() -> float:
    with open("/proc/stat", "rb") as f:
        for line in f:
            if line.startswith(b"btime "):
                return float(line.split()[1])
    raise OSError("no btime in /proc/stat")


def remove_stale_shm_regions(shm_dir: str = "/dev/shm") -> list[str]:
    """Remove libfabric shm regions that carry this process's pid but are
    older than this process; return their names.

    libfabric's shm provider names an endpoint's region ``<pid>:<n>:<k>`` and
    unlinks it only when the endpoint closes, so a SIGKILLed process leaves
    its regions behind.  When the pid comes round again, the new process
    cannot create its own region (``fi_enable``: EBUSY).  A region modified
    before this process started cannot be ours: its owner is gone (it held
    the pid before us)."""
    pid = os.getpid()
    start = process_start(pid)
    if start <= 0:
        return []
    try:
        started = _boot_time() + start / os.sysconf("SC_CLK_TCK")
        names = os.listdir(shm_dir)
    except OSError:
        return []
    pattern = re.compile(rf"{pid}:\d+:\d+")
    removed = []
    for name in names:
        if not pattern.fullmatch(name):
            continue
        path = os.path.join(shm_dir, name)
        try:
            if os.stat(path).st_mtime < started - 0.02:  # start times have 10 ms ticks
                os.unlink(path)
                removed.append(name)
        except OSError:
            continue
    return removed
