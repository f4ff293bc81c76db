"""Who we are, for peers on the same host: a host identity (kernel boot and
PID namespace), our pid and our process start time.  A peer that shares the
host identity can tell in microseconds that we exited (the pid is gone or
now belongs to a younger process), without waiting for a probe to time out.
"""
from __future__ import annotations

import functools
import hashlib
import os

__all__ = ["host_identity", "process_start", "process_alive"]


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
