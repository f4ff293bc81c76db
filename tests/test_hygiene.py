"""Resource hygiene: opening and closing engines, and registering and
deregistering memory, many times over leaves no file descriptors, threads or
memory behind.  Measured in this process from /proc/self (Linux only).

Every test prints what it measured: run with ``-s`` (or ``-rP``) to see it.
"""
from __future__ import annotations

import ctypes
import functools
import gc
import json
import os
import random
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass
from typing import Any

import pytest

import aiofabric as af
from conftest import bounded

pytestmark = pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="reads /proc/self (Linux)")

KiB, MiB = 1 << 10, 1 << 20
PAGE = os.sysconf("SC_PAGE_SIZE")

try:  # glibc caches freed heap pages; trimming first makes RSS track memory in use
    _malloc_trim: Any = ctypes.CDLL("libc.so.6").malloc_trim
except (OSError, AttributeError):  # pragma: no cover - not glibc
    _malloc_trim = None


@dataclass(frozen=True)
class Usage:
    fds: int
    threads: int
    rss: int  #: bytes

    @classmethod
    def now(cls) -> Usage:
        gc.collect()
        if _malloc_trim is not None:
            _malloc_trim(0)
        with open("/proc/self/statm") as f:
            rss = int(f.read().split()[1]) * PAGE
        return cls(len(os.listdir("/proc/self/fd")), len(os.listdir("/proc/self/task")), rss)

    def __str__(self) -> str:
        return f"fds={self.fds} threads={self.threads} rss={self.rss / MiB:.2f} MiB"


def report(what: str, before: Usage, after: Usage, cycles: int, seconds: float) -> None:
    growth = after.rss - before.rss
    print(f"\n[hygiene] {what}: {cycles} cycles in {seconds:.2f} s ({seconds / cycles * 1000:.2f} s per 1000); "
          f"before {before}; after {after}; rss growth {growth / KiB:+.0f} KiB ({growth / cycles:+.0f} B/cycle)")


def assert_no_growth(before: Usage, after: Usage, rss_bound: int) -> None:
    # <=, not ==: a thread or fd left by an earlier test module may go away meanwhile
    assert after.fds <= before.fds, f"file descriptors leaked: {before.fds} -> {after.fds}"
    assert after.threads <= before.threads, f"threads leaked: {before.threads} -> {after.threads}"
    assert after.rss - before.rss < rss_bound, (
        f"RSS grew by {(after.rss - before.rss) / KiB:.0f} KiB (bound {rss_bound / KiB:.0f} KiB)")


# ----------------------------------------------------------- engine cycles
#
# Time per cycle on the 2-core test VM (noisy): shm 7-15 ms, udp;ofi_rxd
# 3-10 ms, tcp;ofi_rxm 60-90 ms.  So shm runs 1000 cycles, rxd 200, rxm 40 by
# default and 200 under `slow` (note: nothing deselects `slow` by default,
# neither pyproject.toml nor scripts/test.sh; pass -m "not slow" to skip it).
ENGINE_RUNS = [
    pytest.param("shm", 1000, id="shm-1000"),
    pytest.param("udp;ofi_rxd", 200, id="rxd-200"),
    pytest.param("tcp;ofi_rxm", 40, id="rxm-40"),
    pytest.param("tcp;ofi_rxm", 200, id="rxm-200", marks=pytest.mark.slow),
]
WARMUP_CYCLES = 20

# The RSS bound after warm-up: 1 MiB of slack plus 1 KiB per cycle.
# Evidence (malloc_trim'd RSS and glibc's mallinfo2 over thousands of cycles):
# udp;ofi_rxd and tcp;ofi_rxm stay flat after warm-up; shm grows ~0.2-0.4 KiB
# per engine opened, and its heap in use grows by exactly 280 B per engine,
# which heaptrack pins on libfabric 1.17 itself ("280.00K leaked over 1000
# calls" from fi_enable inside libfabric.so, never freed, not even at exit),
# not on aiofabric.  What the bound must catch is an engine kept alive: a
# closed TransferEngine still referenced costs ~23 KiB of RSS per cycle
# (measured), over 20x the allowance, while the shm leak stays well below it.
# (The 40-cycle rxm run is too short for RSS to see one kept engine per
# cycle, 40 x 23 KiB < 1 MiB; the 200-cycle runs see it, and an engine left
# open shows in the fd and thread counts however short the run.)
RSS_SLACK = 1 * MiB
RSS_PER_ENGINE_CYCLE = 1 * KiB


async def _one_write(a: af.TransferEngine, provider: str) -> None:
    """Register, write 4 KiB with an immediate into a second engine, check it landed."""
    b = await af.open_engine(provider)
    try:
        src = bytearray(random.randbytes(4096))
        dst = bytearray(4096)
        rb, ra = b.register(dst), a.register(src)
        await bounded(a.write(ra, rb.descriptor(), imm=1))
        await bounded(b.imm_counter(1).wait(1))
        assert dst == src
    finally:
        await b.aclose()  # the receiver first (see conftest.pair)


async def _engine_cycles(provider: str, cycles: int, write_every: int) -> None:
    for i in range(cycles):
        async with af.open_engine(provider) as a:
            if write_every and i % write_every == write_every - 1:
                await _one_write(a, provider)


@pytest.mark.asyncio
@pytest.mark.parametrize("writes", [False, True], ids=["idle", "writes"])
@pytest.mark.parametrize("provider,cycles", ENGINE_RUNS)
async def test_engine_open_close_cycles(provider: str, cycles: int, writes: bool, loop_errors) -> None:
    """``async with open_engine(...)`` many times: nothing accumulates.  With
    ``writes``, every 100th cycle (every 10th in short runs) also registers a
    region and writes with an immediate into a second engine."""
    write_every = (100 if cycles >= 200 else 10) if writes else 0
    await _engine_cycles(provider, WARMUP_CYCLES, 10 if writes else 0)
    before = Usage.now()
    t = time.perf_counter()
    await _engine_cycles(provider, cycles, write_every)
    seconds = time.perf_counter() - t
    after = Usage.now()
    report(f"{provider} open/close{f' + write every {write_every}' if writes else ''}",
           before, after, cycles, seconds)
    assert_no_growth(before, after, RSS_SLACK + RSS_PER_ENGINE_CYCLE * cycles)


# ----------------------------------------------------- registration cycles
#
# 10 000 registrations of fresh 4 KiB..1 MiB buffers.  The RSS bound is 1 MiB
# of slack plus 100 B per cycle (2 MiB in all): measured growth after warm-up
# is within a page or two on every provider; a kept buffer (227 KiB on
# average) would exceed it at once, and a leaked MemoryRegion (a slotted
# object, its cffi buffer handle, key tuple and the provider's MR record,
# each well over 100 B together) within the run.
REGISTER_CYCLES = 10_000
RSS_PER_REGISTRATION = 100


@pytest.mark.asyncio
@pytest.mark.parametrize("provider,descriptors", [
    ("shm", False), ("shm", True), ("tcp;ofi_rxm", True), ("udp;ofi_rxd", True),
])
async def test_register_close_cycles(provider: str, descriptors: bool, loop_errors) -> None:
    rng = random.Random(20240611)
    async with af.open_engine(provider) as e:
        start_regions = e.statistics().regions

        def cycles(n: int) -> None:
            for _ in range(n):
                r = e.register(bytearray(4096 << rng.randrange(9)))  # 4 KiB .. 1 MiB
                if descriptors:
                    d = r.descriptor()
                    assert af.RegionDescriptor.from_bytes(d.to_bytes()) == d
                r.close()

        cycles(200)
        before = Usage.now()
        t = time.perf_counter()
        cycles(REGISTER_CYCLES)
        seconds = time.perf_counter() - t
        after = Usage.now()
        report(f"{provider} register/close{' + descriptor round trip' if descriptors else ''}",
               before, after, REGISTER_CYCLES, seconds)
        assert e.statistics().regions == start_regions
        assert e.statistics().pending_futures == 0
        assert_no_growth(before, after, RSS_SLACK + RSS_PER_REGISTRATION * REGISTER_CYCLES)


# ---------------------------------------------------------- unclosed engines
#
# Run in a child process: a leaked worker thread must not keep running inside
# the test process.  The child opens an engine (with a region) in one event
# loop and never closes it; the loop ends; the engine is garbage-collected.

_UNCLOSED = textwrap.dedent("""
    import asyncio, gc, json, os, sys, weakref
    import aiofabric as af

    def usage():
        gc.collect()
        return [len(os.listdir("/proc/self/fd")), len(os.listdir("/proc/self/task"))]

    async def leak():
        e = await af.open_engine(sys.argv[1])
        e.register(bytearray(4096))
        return weakref.ref(e), usage()

    async def drop_in_running_loop():
        e = await af.open_engine(sys.argv[1])
        ref = weakref.ref(e)
        del e
        gc.collect()
        alive = ref() is not None
        if alive:
            await ref().aclose()
        return alive

    before = usage()
    ref, opened = asyncio.run(leak())
    after = usage()
    out = {"before": before, "opened": opened, "after": after, "collected": ref() is None,
           "alive_while_loop_runs": asyncio.run(drop_in_running_loop())}
    print(json.dumps(out), flush=True)
""")


@functools.cache
def _unclosed(provider: str) -> tuple[int, dict[str, Any]]:
    proc = subprocess.run([sys.executable, "-c", _UNCLOSED, provider], capture_output=True, text=True,
                          check=False, timeout=60, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    lines = proc.stdout.strip().splitlines()
    result = json.loads(lines[-1]) if lines else {}
    print(f"\n[hygiene] {provider} unclosed engine: rc={proc.returncode} {result} {proc.stderr[-2000:]}")
    return proc.returncode, result


@pytest.mark.parametrize("provider", ["shm", "tcp;ofi_rxm", "udp;ofi_rxd"])
def test_unclosed_engine_is_collected_and_exit_is_clean(provider: str) -> None:
    rc, result = _unclosed(provider)
    assert rc == 0 and result, "the child crashed or printed nothing"
    assert result["collected"], "an unclosed engine stays reachable after its loop closed"
    # (Not asserted, only printed: while its loop runs, the loop's reader, the
    # eventfd callback, keeps a dropped engine reachable, so it is not collected.)


# Found here: engines had no finalizer, so an engine collected unclosed kept its
# worker thread and fds until exit.  TransferEngine.__del__ now releases them
# (and warns with ResourceWarning).
@pytest.mark.parametrize("provider", ["shm", "tcp;ofi_rxm", "udp;ofi_rxd"])
def test_unclosed_engine_releases_thread_and_fds(provider: str) -> None:
    rc, result = _unclosed(provider)
    assert rc == 0 and result
    assert result["collected"]
    (fds0, threads0), (fds1, threads1) = result["before"], result["after"]
    assert threads1 == threads0, f"worker thread leaked: {threads0} -> {threads1} threads"
    assert fds1 == fds0, f"file descriptors leaked: {fds0} -> {fds1}"
