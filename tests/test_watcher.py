"""The watcher: slots a producer raises, transfers pre-armed on them and fired
by the native watcher thread, changes reported to asyncio."""
from __future__ import annotations

import asyncio
import os
import threading
import time

import numpy as np
import pytest

import aiofabric as af
from conftest import bounded

pytestmark = pytest.mark.asyncio

SHM = pytest.mark.parametrize("provider", ["shm"])


def _threads() -> int:
    return len(os.listdir("/proc/self/task"))


def _thread_names() -> list[str]:
    names = []
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/comm") as f:
                names.append(f.read().strip())
        except OSError:
            pass
    return names


async def test_layers_fire_in_order_to_another_engine(pair):
    """KV streaming in miniature: a producer thread finishes one layer at a
    time (slot L -> 1); the write_pages of layer L, armed up front, fires as
    soon as its slot is bumped and only then."""
    a, b = pair
    layers, pages, page = 6, 8, 1024
    rng = np.random.default_rng(3)
    src = rng.integers(1, 256, size=layers * pages * page, dtype=np.uint8)
    dst = np.zeros_like(src)
    ra, rb = a.register(src), b.register(dst)
    d = rb.descriptor()
    w = a.watcher(slots=layers)
    futs = []
    for layer in range(layers):
        sidx = np.arange(layer * pages, (layer + 1) * pages)
        didx = sidx[::-1].copy()  # a permutation within the layer's pages
        futs.append(w.arm_pages(layer, 1, ra, d, page, sidx, didx, imm=100 + layer))
    assert w.statistics().armed == layers
    go = [threading.Event() for _ in range(layers)]

    def producer() -> None:
        for layer in range(layers):
            if not go[layer].wait(30):
                return
            time.sleep(0.002)  # "compute" the layer
            w.bump(layer, 1)

    t = threading.Thread(target=producer)
    t.start()
    try:
        for layer in range(layers):
            await asyncio.sleep(0.01)
            lo = layer * pages * page
            assert not dst[lo:].any(), "a layer landed before its slot was bumped"
            assert not futs[layer].done()
            go[layer].set()
            await bounded(b.imm_counter(100 + layer).wait(pages), 30)  # one immediate per page
            await bounded(futs[layer], 30)
            for k in range(pages):
                s, dd = layer * pages + k, (layer + 1) * pages - 1 - k
                assert np.array_equal(dst[dd * page:(dd + 1) * page], src[s * page:(s + 1) * page])
    finally:
        for ev in go:
            ev.set()
        t.join()
    await asyncio.sleep(0.02)
    assert all(b.imm_counter(100 + k).available == 0 for k in range(layers))  # exactly one per page
    st = w.statistics()
    assert (st.fired, st.armed, st.failed, st.active_slots) == (layers, 0, 0, 0)
    w.close()


@SHM
async def test_arms_on_one_slot_fire_in_value_order(pair):
    a, b = pair
    ra = a.register(bytearray(4096))
    d = b.register(bytearray(4096)).descriptor()
    w = a.watcher(slots=2)
    w.trace(64)
    values = [5, 1, 3, 2, 4, 3]  # two arms at 3: they fire in arming order
    futs = [w.arm_write(1, v, ra[0:16], d[16 * k:16 * (k + 1)], imm=7) for k, v in enumerate(values)]
    w.bump(1, 2)
    await bounded(asyncio.gather(futs[1], futs[3]))
    await asyncio.sleep(0.02)
    assert [f.done() for f in futs] == [False, True, False, True, False, False]
    w.bump(1, 9)  # skips to past every value: the rest fire in one pass, in order
    await bounded(asyncio.gather(*futs))
    await bounded(b.imm_counter(7).wait(len(values)))
    s = w.trace_samples()
    assert list(s["target"]) == [1, 2, 3, 3, 4, 5]
    assert list(s["value"]) == [2, 2, 9, 9, 9, 9]
    assert np.all(s["seen_ns"] <= s["posted_ns"]) and np.all(s["bump_ns"] <= s["seen_ns"])
    w.close()


@SHM
async def test_arm_already_reached_fires_at_once_and_notify(pair):
    a, b = pair
    w = a.watcher()
    w.bump(0, 10)
    await bounded(w.arm_notify(0, 3, b.address, 21))
    await bounded(b.imm_counter(21).wait(1))
    assert w.value(0) == 10 and int(w.buffer[0]) == 10
    w.close()


@SHM
async def test_watch_reports_changes_skips_and_the_last_value(pair):
    a, _ = pair
    w = a.watcher(slots=4)
    n = 3000
    seen: list[tuple[int, int]] = []

    async def consume() -> None:
        async for old, new in w.watch(2):
            seen.append((old, new))
            if new == n:
                return

    task = asyncio.create_task(consume())
    await asyncio.sleep(0.01)
    t = threading.Thread(target=lambda: [w.bump(2, v) for v in range(1, n + 1)])
    t.start()
    await bounded(task, 30)
    t.join()
    assert seen[-1][1] == n  # the last value is always reported
    assert seen[0][0] == 0
    assert all(prev[1] == cur[0] for prev, cur in zip(seen, seen[1:]))  # old is the previous new
    assert all(o < nv for o, nv in seen)
    assert len(seen) < n  # several bumps between two looks are reported once
    assert w.statistics().waiters == 0 and w.statistics().active_slots == 0
    w.close()


@SHM
async def test_wait_and_watch_end_at_close(pair):
    a, _ = pair
    w = a.watcher(slots=2)
    assert await bounded(w.wait(0, 0)) == 0  # already there
    waiter = asyncio.create_task(w.wait(0, 5))
    changes: list[tuple[int, int]] = []

    async def consume() -> None:
        async for change in w.watch(1):
            changes.append(change)

    watcher_task = asyncio.create_task(consume())
    await asyncio.sleep(0.01)
    w.bump(0, 3)
    await asyncio.sleep(0.01)
    assert not waiter.done()
    w.bump(0, 7)
    assert await bounded(waiter) == 7
    later = asyncio.create_task(w.wait(0, 100))
    await asyncio.sleep(0.01)
    w.bump(1, 4)
    w.close()  # the change of slot 1 is still reported, then the iteration ends
    await bounded(watcher_task)
    assert changes == [(0, 4)]
    with pytest.raises(af.ClosedResourceError):
        await bounded(later)
    with pytest.raises(af.ClosedResourceError):
        await w.wait(0, 100)
    assert await w.wait(0, 7) == 7  # reached: no need to wait
    assert [c async for c in w.watch(1)] == []


@SHM
async def test_cancelled_wait_stops_polling(pair):
    a, _ = pair
    w = a.watcher(slots=1)
    t = asyncio.create_task(w.wait(0, 1))
    await asyncio.sleep(0.01)
    assert w.statistics().active_slots == 1
    t.cancel()
    with pytest.raises(asyncio.CancelledError):
        await t
    st = w.statistics()
    assert (st.active_slots, st.waiters) == (0, 0)
    w.close()


@SHM
async def test_disarm_and_cancel(pair):
    a, b = pair
    dst = bytearray(4096)
    ra = a.register(bytearray(b"\x05" * 4096))
    rb = b.register(dst)
    d = rb.descriptor()
    w = a.watcher(slots=2)
    f1 = w.arm_write(0, 1, ra[0:1024], d[0:1024], imm=3)
    f2 = w.arm_pages(0, 1, ra, d, 1024, [1], [1], imm=3)
    f3 = w.arm_write(0, 2, ra[2048:3072], d[2048:3072], imm=3)
    assert a.statistics().pending_futures == 3
    assert w.disarm(f1) is True and f1.cancelled()
    assert w.disarm(f1) is False
    f2.cancel()  # cancelling before it fires disarms too
    await asyncio.sleep(0)
    assert w.statistics().armed == 1 and a.statistics().pending_futures == 1
    w.bump(0, 5)
    await bounded(f3)
    assert w.disarm(f3) is False  # fired already
    await bounded(b.imm_counter(3).wait(1))
    await asyncio.sleep(0.02)
    assert b.imm_counter(3).available == 0
    assert dst[2048:3072] == b"\x05" * 1024 and not any(dst[:2048]) and not any(dst[3072:])
    assert a.statistics().writes_posted == 1
    st = w.statistics()
    assert (st.armed, st.fired, st.active_slots) == (0, 1, 0)
    w.close()


@SHM
async def test_closed_region_is_released_when_its_arm_is_disarmed(pair):
    a, b = pair
    ra = a.register(bytearray(4096))
    d = b.register(bytearray(4096)).descriptor()
    w = a.watcher()
    f = w.arm_write(0, 1, ra, d)
    ra.close()  # deregistration waits for the arm
    assert a.statistics().regions == 1
    with pytest.raises(af.ClosedResourceError):
        w.arm_write(0, 1, ra, d)
    assert w.disarm(f)
    assert a.statistics().regions == 0 and a.statistics().pending_futures == 0
    w.close()


@SHM
async def test_bad_input(pair):
    a, b = pair
    ra = a.register(bytearray(4096))
    rb_ = b.register(bytearray(4096))
    d = rb_.descriptor()
    w = a.watcher(slots=4)
    for bad, exc in ((4, ValueError), (-1, ValueError), (1.0, TypeError), ("0", TypeError), (True, TypeError)):
        with pytest.raises(exc, match="slot"):
            w.arm_write(bad, 1, ra, d)
        with pytest.raises(exc, match="slot"):
            w.bump(bad, 1)
        with pytest.raises(exc, match="slot"):
            w.value(bad)
        with pytest.raises(exc, match="slot"):
            w.watch(bad)
    for bad, exc in ((-1, ValueError), (1 << 64, ValueError), (1.5, TypeError), (None, TypeError),
                     (False, TypeError)):
        with pytest.raises(exc, match="value"):
            w.arm_write(0, bad, ra, d)
        with pytest.raises(exc, match="value"):
            w.bump(0, bad)
        with pytest.raises(exc, match="value"):
            await w.wait(0, bad)
    w.bump(0, np.uint64((1 << 64) - 1))  # the whole range, numpy integers too
    assert w.value(np.int32(0)) == (1 << 64) - 1
    with pytest.raises(ValueError, match="bytes"):
        w.arm_write(1, 1, ra[0:16], d[0:32])
    with pytest.raises(TypeError, match="dst"):
        w.arm_write(1, 1, ra, b"not a descriptor")
    with pytest.raises(TypeError, match="src"):
        w.arm_write(1, 1, bytearray(16), d)
    with pytest.raises(ValueError, match="another engine"):
        w.arm_write(1, 1, rb_, d)
    with pytest.raises(ValueError, match="imm"):
        w.arm_write(1, 1, ra, d, imm=1 << 32)
    with pytest.raises(ValueError, match="dst_pages"):
        w.arm_pages(1, 1, ra, d, 1024, [0], [4])
    with pytest.raises(TypeError, match="page_size"):
        w.arm_pages(1, 1, ra, d, 10.0, [0], [0])
    with pytest.raises(TypeError, match="peer"):
        w.arm_notify(1, 1, "nobody", 3)
    with pytest.raises(TypeError, match="imm"):
        w.arm_notify(1, 1, b.address, None)
    assert w.statistics().armed == 0 and a.statistics().pending_futures == 0
    assert (await bounded(w.arm_pages(1, 1, ra, d, 1024, [], []))) is None  # nothing to write
    for bad, exc in ((0, ValueError), (1 << 30, ValueError), (2.0, TypeError)):
        with pytest.raises(exc, match="slots"):
            a.watcher(slots=bad)
    with pytest.raises(ValueError, match="poll_ns"):
        a.watcher(poll_ns=-1)
    w.close()
    w.close()  # idempotent
    with pytest.raises(af.ClosedResourceError):
        w.arm_write(0, 1, ra, d)
    with pytest.raises(af.ClosedResourceError):
        w.bump(0, 1)
    assert w.disarm(asyncio.get_running_loop().create_future()) is False


async def test_engine_close_fails_unfired_arms(provider, loop_errors):
    a = await af.open_engine(provider)
    b = await af.open_engine(provider)
    dst = bytearray(4096)
    try:
        ra = a.register(bytearray(b"\x09" * 4096))
        d = b.register(dst).descriptor()
        w = a.watcher(slots=2)
        fired = w.arm_write(0, 1, ra[0:64], d[0:64], imm=2)
        unfired = [w.arm_write(1, 1, ra[64:128], d[64:128], imm=2), w.arm_notify(0, 99, b.address, 2)]
        waiter = asyncio.create_task(w.wait(1, 1))
        w.bump(0, 1)
        await bounded(fired)
        await bounded(b.imm_counter(2).wait(1))
        await b.aclose()  # the receiving side first (libfabric 1.17 shm, see conftest)
        await a.aclose()  # the watcher stops before the worker
        assert w.closed
        for f in unfired:
            with pytest.raises(af.ClosedResourceError, match="before the armed transfer fired"):
                await bounded(f)
        with pytest.raises(af.ClosedResourceError):
            await bounded(waiter)
        with pytest.raises(af.ClosedResourceError):
            w.arm_write(0, 5, ra[0:64], d[0:64])
        with pytest.raises(af.ClosedResourceError):
            a.watcher()
        assert dst[:64] == b"\x09" * 64 and not any(dst[64:])
    finally:
        await b.aclose()
        await a.aclose()


@SHM
async def test_arming_with_a_closed_engine(pair):
    a, b = pair
    c = await af.open_engine("shm")
    rc = c.register(bytearray(64))
    d = b.register(bytearray(64)).descriptor()
    w, wc = a.watcher(), c.watcher()
    await c.aclose()
    assert wc.closed
    with pytest.raises(af.ClosedResourceError):
        c.watcher()
    with pytest.raises(af.ClosedResourceError):
        wc.arm_write(0, 1, rc, d)  # a watcher (and region) of a closed engine
    with pytest.raises(af.ClosedResourceError):
        wc.arm_notify(0, 1, b.address, 1)
    with pytest.raises(ValueError, match="another engine"):
        w.arm_write(0, 1, rc, d)  # not a's region, closed or not
    w.close()


@SHM
async def test_one_thread_per_engine_blocks_when_idle_and_leaves_nothing(provider, loop_errors):
    # Library-wide threads (if a provider starts any) are made by the first engine: warm up first.
    async with af.open_engine(provider) as e:
        e.watcher().close()
    base = _threads()
    a = await af.open_engine(provider)
    b = await af.open_engine(provider)
    try:
        with_engines = _threads()
        assert "af-watcher" not in _thread_names()  # made on first use only
        ws = [a.watcher(slots=8) for _ in range(3)]
        assert _threads() == with_engines + 1  # one thread per engine, shared by its watchers
        # Nothing armed or awaited: the thread blocks (no poll passes).
        await asyncio.sleep(0.05)
        p0 = ws[0].statistics().passes
        await asyncio.sleep(0.2)
        assert ws[0].statistics().passes == p0 and ws[0].statistics().sleeps >= 1
        ra = a.register(bytearray(64))
        d = b.register(bytearray(64)).descriptor()
        f = ws[1].arm_write(3, 1, ra, d)
        await asyncio.sleep(0.05)
        assert ws[0].statistics().passes > p0  # armed: it polls
        ws[2].bump(3, 1)  # another watcher's slot 3: f does not fire
        await asyncio.sleep(0.02)
        assert not f.done()
        ws[1].bump(3, 1)
        await bounded(f)
        for w in ws:
            w.close()
    finally:
        await b.aclose()
        await a.aclose()
    assert _threads() == base
    assert "af-watcher" not in _thread_names()


@SHM
async def test_trigger_latency(pair, capsys):
    """Bump -> the watcher thread posts the armed write (native timestamps);
    printed, not asserted (the benchmark is benchmarks/watcher_latency.py)."""
    a, b = pair
    n = 300
    ra = a.register(bytearray(64))
    d = b.register(bytearray(64)).descriptor()
    w = a.watcher(slots=1)
    w.trace(n)
    futs = [w.arm_write(0, k, ra, d, imm=5) for k in range(1, n + 1)]
    for k in range(1, n + 1):
        w.bump(0, k)
        await bounded(futs[k - 1])
    await bounded(b.imm_counter(5).wait(n))
    s = w.trace_samples()
    assert len(s) == n and list(s["target"]) == list(range(1, n + 1))
    lat = (s["posted_ns"] - s["bump_ns"]) / 1000
    with capsys.disabled():
        print(f"\nwatcher trigger latency (bump -> posted), {n} bumps: p50 {np.percentile(lat, 50):.1f} us, "
              f"p99 {np.percentile(lat, 99):.1f} us, max {lat.max():.1f} us")
    w.close()


@SHM
async def test_full_submission_queue_is_retried(provider, loop_errors):
    """200 arms fire in one pass into a 2-entry submission queue: the thread
    keeps the ones that do not fit and submits them on later passes."""
    b = await af.open_engine(provider)
    a = await af.open_engine(provider, sq_slots=2)
    try:
        n = 200
        ra = a.register(bytearray(64))
        d = b.register(bytearray(64)).descriptor()
        w = a.watcher()
        futs = [w.arm_write(0, 1, ra, d, imm=4) for _ in range(n)]
        w.bump(0, 1)
        await bounded(asyncio.gather(*futs), 30)
        await bounded(b.imm_counter(4).wait(n), 30)
        st = w.statistics()
        assert (st.fired, st.armed) == (n, 0) and st.eagain > 0
        w.close()
    finally:
        await b.aclose()
        await a.aclose()


@SHM
async def test_arm_whose_submission_fails(pair):
    """A submission the engine refuses (here: an unknown peer number, which
    the public API cannot produce) fails the arm's future; others still fire."""
    from aiofabric._lib import check, lib

    a, b = pair
    ra = a.register(bytearray(64))
    d = b.register(bytearray(64)).descriptor()
    w = a.watcher()
    aid = a._next_id()
    check(lib.afc_watcher_arm_write(w._h, 0, 1, aid, ra._ptr, 64, ra._mr, a.config.max_peers - 1, d.addr,
                                    a._keybuf(d.keys), len(d.keys), -1), "arm")
    bad = w._track(aid, 0, ra, -1)
    good = w.arm_write(0, 1, ra, d, imm=6)
    w.bump(0, 1)
    with pytest.raises(af.CompletionError, match="could not be posted"):
        await bounded(bad)
    await bounded(good)
    await bounded(b.imm_counter(6).wait(1))
    st = w.statistics()
    assert (st.failed, st.fired, st.armed) == (1, 1, 0)
    assert a.statistics().pending_futures == 0
    w.close()


@pytest.mark.parametrize("provider", ["tcp;ofi_rxm"])
async def test_arm_fails_and_is_disarmed_when_its_peer_dies(provider, loop_errors):
    import multiprocessing as mp
    import signal

    import _peer

    ctx = mp.get_context("spawn")
    here, there = ctx.Pipe()
    proc = ctx.Process(target=_peer.victim, args=(provider, 1 << 16, there), daemon=True)
    proc.start()
    try:
        assert await asyncio.to_thread(here.poll, 60), "victim did not start"
        addr, blob = here.recv()
        desc = af.RegionDescriptor.from_bytes(blob)
        async with af.open_engine(provider, peer_timeout=2.0) as eng:
            src = eng.register(bytearray(4096), remote_write=False)
            await bounded(eng.write(src[0:64], desc[0:64]))  # the peer works
            w = eng.watcher()
            fut = w.arm_write(0, 1, src, desc[0:4096], imm=1)
            os.kill(proc.pid, signal.SIGKILL)
            with pytest.raises(af.BrokenResourceError):
                await bounded(fut, 15)
            await asyncio.sleep(0)
            st = w.statistics()
            assert (st.armed, st.fired, st.active_slots) == (0, 0, 0)  # disarmed, never fired
            w.bump(0, 1)
            await asyncio.sleep(0.02)
            assert w.statistics().fired == 0
            assert eng.statistics().pending_futures == 0
            src.close()
            assert eng.statistics().regions == 0  # the arm's hold on the region is gone
    finally:
        proc.kill()
        await asyncio.to_thread(proc.join, 10)
