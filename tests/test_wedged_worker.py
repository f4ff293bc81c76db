"""A worker stuck inside a provider call must not hang the event loop.

libfabric 1.17's shm can spin for ever inside fi_send to a peer killed while
it held a queue lock; the worker then holds the engine's provider lock for
good.  The test hook ``_debug_wedge(ms)`` makes the worker hold that lock for
``ms`` milliseconds, as if stuck.  Meanwhile failure detection and
statistics must answer at once, calls that need the lock (register, a new
peer, deregister) must fail with ProviderStuckError after ``lock_timeout``,
writes must still be accepted (queued), and ``aclose()`` must return within
its bounds, abandoning the engine with a warning.  Once the hold ends the
engine works normally."""
from __future__ import annotations

import asyncio
import time
import warnings

import pytest

import aiofabric as af
from aiofabric._lib import lib
from conftest import bounded

pytestmark = pytest.mark.asyncio

PROMPT_S = 1.0  # what "at once" must beat (the calls take microseconds)


@pytest.fixture(params=("shm", "tcp;ofi_rxm"))
def provider(request) -> str:
    return request.param


async def wedge(eng: af.TransferEngine, ms: int) -> None:
    """Start a hold and wait until the worker really holds the lock."""
    eng._debug_wedge(ms)
    async with asyncio.timeout(5):
        while not lib.afc_debug_wedged(eng._h):
            await asyncio.sleep(0.001)


async def unwedge(handle) -> None:
    lib.afc_debug_wedge(handle, 0)
    async with asyncio.timeout(5):
        while lib.afc_debug_wedged(handle):
            await asyncio.sleep(0.001)


class LoopLag:
    """The longest gap between two runs of a 5 ms timer: how long the event
    loop was blocked."""

    def __init__(self) -> None:
        self.worst = 0.0
        self._last = time.monotonic()
        self._task = asyncio.ensure_future(self._run())

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(0.005)
            now = time.monotonic()
            self.worst = max(self.worst, now - self._last)
            self._last = now

    def stop(self) -> float:
        self._task.cancel()
        return self.worst


def elapsed(t0: float) -> float:
    return time.monotonic() - t0


async def test_failure_detection_and_statistics_do_not_wait(provider, loop_errors):
    async with af.open_engine(provider, peer_timeout=0.6) as a, af.open_engine(provider) as b, \
            af.open_engine(provider) as c:
        data, landed = bytearray(b"\x5a" * 4096), bytearray(4096)
        src = a.register(data, remote_write=False)
        dst_b, dst_c = b.register(bytearray(4096)), c.register(landed)
        await bounded(a.write(src, dst_b.descriptor(), imm=1))  # b is a known, working peer
        await wedge(a, 20_000)
        lag = LoopLag()
        try:
            t0 = time.monotonic()
            st = a.statistics()
            assert elapsed(t0) < PROMPT_S
            assert st.ops_in_flight == 0
            # Accepted (queued) while stuck; it makes no progress, so the
            # detector probes b and, unanswered, declares it failed: that is
            # where afc_peer_fail once waited for the lock for ever.
            stuck = a.write(src, dst_b.descriptor(), imm=2)
            t0 = time.monotonic()
            with pytest.raises(af.BrokenResourceError, match="no answer to a probe"):
                await bounded(stuck, 5)
            detected = elapsed(t0)
            assert detected < 0.6 + 1.0 + PROMPT_S, f"detection took {detected:.2f} s"
            assert isinstance(a.peer_failed(b.address), af.BrokenResourceError)
            assert a.statistics().failed_peers == 1
            assert lib.afc_debug_wedged(a._h), "the hold ended before the checks: they prove nothing"
        finally:
            worst = lag.stop()
            await unwedge(a._h)
        assert worst < 0.5, f"the event loop was blocked for {worst:.2f} s"
        # The worker serves what the failure asked for and moves on.
        await bounded(a.write(src, dst_c.descriptor(), imm=3))
        await bounded(c.imm_counter(3).wait(1))
        assert landed == data
        with pytest.raises(af.BrokenResourceError):
            a.write(src, dst_b.descriptor())
        async with asyncio.timeout(5):
            while a.statistics().ops_in_flight or a.statistics().pending_futures:
                await asyncio.sleep(0.01)


async def test_calls_that_need_the_lock_fail_after_the_bound(provider, loop_errors):
    async with af.open_engine(provider, lock_timeout=0.3) as a, af.open_engine(provider) as b, \
            af.open_engine(provider) as c:
        src = a.register(bytearray(b"\x33" * 8192), remote_write=False)
        spare = a.register(bytearray(4096))
        dst = b.register(bytearray(8192))
        d = dst.descriptor()
        await bounded(a.write(src, d))
        regions = a.statistics().regions
        await wedge(a, 20_000)
        try:
            t0 = time.monotonic()
            with pytest.raises(af.ProviderStuckError, match="stuck inside the provider"):
                a.register(bytearray(4096))
            took = elapsed(t0)
            assert 0.25 <= took < 0.3 + PROMPT_S, f"register gave up after {took:.2f} s"
            # A new peer needs the provider's address vector: same bound, same error.
            t0 = time.monotonic()
            with pytest.raises(af.ProviderStuckError):
                a.write(src[0:64], c.register(bytearray(64)).descriptor())
            assert elapsed(t0) < 0.3 + PROMPT_S
            # Deregistering too; the region stays registered until the engine closes.
            with pytest.raises(af.ProviderStuckError):
                spare.close()
            assert a.statistics().regions == regions
            # It is a BrokenResourceError: code that handles a broken transport handles it.
            assert issubclass(af.ProviderStuckError, af.BrokenResourceError)
            # Writes to known peers are still accepted: they wait in the queue.
            t0 = time.monotonic()
            held = [a.write(src[k * 1024:(k + 1) * 1024], d[k * 1024:(k + 1) * 1024], imm=4) for k in range(8)]
            paged = a.write_pages(src, d, 1024, [0, 1], [7, 6], imm=5)
            assert elapsed(t0) < PROMPT_S
            await asyncio.sleep(0.1)
            assert not any(f.done() for f in held) and not paged.done()
            assert lib.afc_debug_wedged(a._h), "the hold ended before the checks: they prove nothing"
        finally:
            await unwedge(a._h)
        # The hold is over: the engine works as before.
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)  # no abandonment warning
            await bounded(asyncio.gather(*held, paged))
            await bounded(b.imm_counter(4).wait(8))
            await bounded(b.imm_counter(5).wait(2))
            again = a.register(bytearray(4096))
            again.close()
            await bounded(a.write(src[0:64], c.register(bytearray(64)).descriptor()))
            await a.aclose()
        assert a.closed


async def test_direct_post_falls_back_to_queueing(provider, loop_errors):
    async with af.open_engine(provider, direct_post=True) as a, af.open_engine(provider) as b:
        data, landed = bytearray(range(256)) * 16, bytearray(4096)
        src = a.register(data, remote_write=False)
        dst = b.register(landed)
        d = dst.descriptor()
        await bounded(a.write(src[0:8], d[0:8]))
        await wedge(a, 20_000)
        try:
            t0 = time.monotonic()
            futs = [a.write(src[k * 512:(k + 1) * 512], d[k * 512:(k + 1) * 512], imm=6) for k in range(8)]
            assert elapsed(t0) < PROMPT_S
            await asyncio.sleep(0.1)
            assert not any(f.done() for f in futs)
        finally:
            await unwedge(a._h)
        await bounded(asyncio.gather(*futs))
        await bounded(b.imm_counter(6).wait(8))
        assert landed == data


async def test_close_abandons_a_stuck_worker(provider, loop_errors):
    b = await af.open_engine(provider)
    a = await af.open_engine(provider, lock_timeout=0.3, close_timeout=0.5)
    handle = a._h
    try:
        src = a.register(bytearray(4096), remote_write=False)
        d = b.register(bytearray(4096)).descriptor()
        await bounded(a.write(src, d))
        await wedge(a, 20_000)
        pending = a.write(src, d, imm=7)
        t0 = time.monotonic()
        with pytest.warns(RuntimeWarning, match="stuck inside the provider.*abandoned"):
            await bounded(a.aclose(), 5)
        took = elapsed(t0)
        # close_timeout for the work in flight, lock_timeout for the worker to stop.
        assert took < 0.5 + 0.3 + PROMPT_S, f"aclose took {took:.2f} s"
        assert a.closed
        with pytest.raises(af.ClosedResourceError):
            await pending
        with pytest.raises(af.ClosedResourceError):
            a.register(bytearray(64))
        assert a.statistics().pending_futures == 0
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)
            await a.aclose()  # idempotent, and warns only once
        assert lib.afc_debug_wedged(handle), "the worker stopped by itself: nothing was abandoned"
    finally:
        # The abandoned engine is never freed, so its hook can still end the
        # hold: the detached worker sees the stop and exits.
        await unwedge(handle)
        await b.aclose()


async def test_the_hook_refuses_bad_input():
    async with af.open_engine("shm") as a:
        for bad in (-1, 600_001, 1.5, True, None):
            with pytest.raises(ValueError):
                a._debug_wedge(bad)
        for bad in (-1, -(1 << 40), 600_001):
            assert lib.afc_debug_wedge(a._h, bad) == -lib.FI_EINVAL
        assert lib.afc_debug_wedge(a._h, 0) == 0  # ends nothing: a no-op
        await asyncio.sleep(0.05)
        assert not lib.afc_debug_wedged(a._h)
        src = a.register(bytearray(64))  # the lock is free
        src.close()
    with pytest.raises(af.ClosedResourceError):
        a._debug_wedge(10)


@pytest.mark.parametrize("bad", [0, -1, float("nan"), float("inf"), 7200])
async def test_lock_timeout_must_be_a_sane_number_of_seconds(bad):
    with pytest.raises(ValueError, match="lock_timeout"):
        await af.open_engine("shm", lock_timeout=bad)
