"""Running weight updates over real engines: in one process (two sources, two
destinations), across processes, and with a source killed mid-update (the
destination fails cleanly and keeps its live weights)."""
from __future__ import annotations

import asyncio
import multiprocessing as mp
import os
import signal

import numpy as np
import pytest
from _weights_peer import make_plan, source, tensors
from conftest import bounded

import aiofabric as af
from aiofabric.weights.execute import (
    DoubleBuffer,
    ack_imm,
    run_destination,
    run_source,
    split_imm,
    update_imm,
)
from aiofabric.weights.views import dst_views, fill_src, matches, reference_dst

pytestmark = pytest.mark.asyncio
CTX = mp.get_context("spawn")


async def test_immediates_encode_version_rank_and_kind():
    assert split_imm(update_imm(5, 3)) == (5, False, 3)
    assert split_imm(ack_imm(4097, 7)) == (1, True, 7)
    assert split_imm(0x12345678) is None
    with pytest.raises(ValueError):
        update_imm(0, 1 << 15)


async def _update(srcs, dsts, pl, seed, version=0, **kw):
    full = tensors(seed)
    sbufs = [np.zeros(pl.src_layout_bytes(r), np.uint8) for r in range(pl.src.ranks)]
    for r, b in enumerate(sbufs):
        fill_src(pl, r, b, full)
    regions = [e.register(b, remote_write=False) for e, b in zip(srcs, sbufs)]
    dbs = [DoubleBuffer(e, np.zeros(pl.dst_layout_bytes(d), np.uint8), np.zeros(pl.dst_layout_bytes(d), np.uint8))
           for d, e in enumerate(dsts)]
    descs = [db.shadow_descriptor() for db in dbs]
    seen: list[tuple[int, int]] = []
    res = await bounded(asyncio.gather(
        *(run_source(e, pl, r, regions[r], descs, version=version, progress=lambda a, b: seen.append((a, b)), **kw)
          for r, e in enumerate(srcs)),
        *(run_destination(e, pl, d, [s.address for s in srcs], version=version, buffers=dbs[d])
          for d, e in enumerate(dsts))), 30)
    for d, db in enumerate(dbs):
        assert db.flips == 1
        assert not matches(dst_views(pl, d, db.live), reference_dst(pl, d, full))
        assert not db.shadow.any()  # nothing landed anywhere else
    total = sum(int(x) for x in pl.link_bytes()[0])
    assert sum(r["bytes"] for r in res[:len(srcs)]) == total
    assert sum(r["writes"] for r in res[len(srcs):]) == int(pl.expected().sum())
    assert seen and max(a for a, _ in seen) <= total
    return res


@pytest.mark.parametrize("provider", ["shm", "tcp;ofi_rxm"])
@pytest.mark.parametrize("fp8", [True, False])
async def test_two_sources_two_destinations_in_one_process(provider, fp8, loop_errors):
    pl = make_plan(2, 2, 1, fp8)
    engines = [await af.open_engine(provider) for _ in range(4)]
    try:
        await _update(engines[:2], engines[2:], pl, seed=11, version=3, scratch_bytes=8192, window_bytes=8192)
        for e in engines:
            assert e.statistics().pending_futures == 0
    finally:
        for e in reversed(engines):
            await e.aclose()


async def test_replicas_and_a_source_with_nothing_to_send(loop_errors):
    """Three sources (FSDP), one TP group of 2 in two replicas: every replica gets its shards."""
    pl = make_plan(3, 2, 2, True)
    engines = [await af.open_engine("shm") for _ in range(7)]
    try:
        await _update(engines[:3], engines[3:], pl, seed=5)
    finally:
        for e in reversed(engines):
            await e.aclose()


async def test_bad_arguments(loop_errors):
    pl = make_plan()
    async with af.open_engine("shm") as e:
        buf = np.zeros(pl.src_layout_bytes(0), np.uint8)
        region = e.register(buf, remote_write=False)
        small = e.register(np.zeros(16, np.uint8), remote_write=False)
        d = e.register(np.zeros(pl.dst_layout_bytes(0), np.uint8)).descriptor()
        with pytest.raises(ValueError, match="rank"):
            await run_source(e, pl, 2, region, [d, d])
        with pytest.raises(TypeError, match="rank"):
            await run_source(e, pl, "0", region, [d, d])
        with pytest.raises(TypeError, match="src"):
            await run_source(e, pl, 0, buf, [d, d])
        with pytest.raises(ValueError, match="src has 16 bytes"):
            await run_source(e, pl, 0, small, [d, d])
        with pytest.raises(ValueError, match="dst_descriptors"):
            await run_source(e, pl, 0, region, [d])
        with pytest.raises(TypeError, match=r"dst_descriptors\[1\]"):
            await run_source(e, pl, 0, region, [d, None])
        with pytest.raises(ValueError, match=r"dst_descriptors\[0\] covers 8"):
            await run_source(e, pl, 0, region, [d[0:8], d])
        with pytest.raises(ValueError, match="sources"):
            await run_destination(e, pl, 0, [e.address])
        with pytest.raises(TypeError, match=r"sources\[0\]"):
            await run_destination(e, pl, 0, [b"x", e.address])
        with pytest.raises(ValueError, match="scratch_bytes too small"):
            await run_source(e, pl, 0, region, [d, d], scratch_bytes=600)


# -- across processes -----------------------------------------------------------------------------


def _start(provider, blob, rank, seed, stall):
    here, there = CTX.Pipe()
    proc = CTX.Process(target=source, args=(provider, blob, rank, None, seed, stall, there), daemon=True)
    proc.start()
    if not here.poll(60):
        proc.kill()
        raise AssertionError("source did not start")
    return proc, here, af.Address.from_bytes(here.recv())


async def _sources(provider, blob, seed, stall=(False, False)):
    return [await asyncio.to_thread(_start, provider, blob, r, seed, stall[r]) for r in range(2)]


async def _stop(procs):
    for proc, conn, _ in procs:
        try:
            conn.send("exit")
        except (OSError, ValueError):
            pass
        await asyncio.to_thread(proc.join, 5)
        if proc.is_alive():
            proc.kill()
            await asyncio.to_thread(proc.join, 5)


@pytest.mark.parametrize("provider", ["shm", "tcp;ofi_rxm"])
async def test_across_processes_then_a_source_killed_mid_update(provider, loop_errors):
    pl = make_plan(2, 2, 1, True, max_write_bytes=256)
    blob = pl.to_bytes()
    async with af.open_engine(provider, peer_timeout=1.0) as d0, af.open_engine(provider, peer_timeout=1.0) as d1:
        dsts = [d0, d1]
        dbs = [DoubleBuffer(e, np.zeros(pl.dst_layout_bytes(d), np.uint8), np.zeros(pl.dst_layout_bytes(d), np.uint8))
               for d, e in enumerate(dsts)]
        # update 0: two healthy source processes
        procs = await _sources(provider, blob, seed=21)
        try:
            addrs = [a for _, _, a in procs]
            waits = [asyncio.ensure_future(run_destination(e, pl, d, addrs, version=0, buffers=dbs[d]))
                     for d, e in enumerate(dsts)]
            for _, conn, _ in procs:
                conn.send((0, [db.shadow_descriptor().to_bytes() for db in dbs]))
            await bounded(asyncio.gather(*waits), 30)
            for _, conn, _ in procs:
                msg = await asyncio.to_thread(conn.recv)
                assert msg[0] == "done", msg
        finally:
            await _stop(procs)
        old = reference_dst(pl, 0, tensors(21)), reference_dst(pl, 1, tensors(21))
        for d, db in enumerate(dbs):
            assert db.flips == 1 and not matches(dst_views(pl, d, db.live), old[d])
        live_before = [bytes(db.live) for db in dbs]
        # update 1: source 1 stalls half way and is killed
        procs = await _sources(provider, blob, seed=22, stall=(False, True))
        try:
            addrs = [a for _, _, a in procs]
            waits = [asyncio.ensure_future(run_destination(e, pl, d, addrs, version=1, buffers=dbs[d]))
                     for d, e in enumerate(dsts)]
            for _, conn, _ in procs:
                conn.send((1, [db.shadow_descriptor().to_bytes() for db in dbs]))
            assert await asyncio.to_thread(procs[1][1].poll, 30), "source 1 did not reach its stall"
            assert procs[1][1].recv() == "stalled"
            os.kill(procs[1][0].pid, signal.SIGKILL)
            res = await bounded(asyncio.gather(*waits, return_exceptions=True), 15)
            assert all(isinstance(r, af.BrokenResourceError) for r in res), res
        finally:
            await _stop(procs)
        for d, db in enumerate(dbs):
            assert db.flips == 1, "a failed update must not flip"
            assert bytes(db.live) == live_before[d]
            assert not matches(dst_views(pl, d, db.live), old[d])


@pytest.mark.parametrize("provider", ["shm", "tcp;ofi_rxm"])
async def test_destination_killed_mid_update(provider, loop_errors):
    """One source, two destinations; destination 1's process dies once the
    update is under way: run_source raises BrokenResourceError, destination 0
    (in this process) still receives its whole part."""
    from _weights_peer import destination

    pl = make_plan(1, 2, 1, True, max_write_bytes=256)
    here, there = CTX.Pipe()
    proc = CTX.Process(target=destination, args=(provider, pl.to_bytes(), 1, there), daemon=True)
    proc.start()
    try:
        assert await asyncio.to_thread(here.poll, 60), "destination did not start"
        _, d1 = here.recv()
        async with af.open_engine(provider, peer_timeout=1.0) as se, af.open_engine(provider, peer_timeout=1.0) as de:
            full = tensors(3)
            sbuf = np.zeros(pl.src_layout_bytes(0), np.uint8)
            fill_src(pl, 0, sbuf, full)
            region = se.register(sbuf, remote_write=False)
            db = DoubleBuffer(de, np.zeros(pl.dst_layout_bytes(0), np.uint8), np.zeros(pl.dst_layout_bytes(0), np.uint8))
            killed = []

            def progress(done, total):
                if not killed:
                    os.kill(proc.pid, signal.SIGKILL)
                    killed.append(done)

            wait0 = asyncio.ensure_future(run_destination(de, pl, 0, [se.address], buffers=db))
            with pytest.raises(af.BrokenResourceError):
                await bounded(run_source(se, pl, 0, region, [db.shadow_descriptor(), af.RegionDescriptor.from_bytes(d1)],
                                         scratch_bytes=4096, window_bytes=2048, progress=progress), 15)
            assert killed
            # destination 0 is on its own: it either got everything (and flipped) or is still waiting
            await asyncio.sleep(0.2)
            if wait0.done():
                await wait0
                assert db.flips == 1 and not matches(dst_views(pl, 0, db.live), reference_dst(pl, 0, full))
            else:
                wait0.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await wait0
                assert db.flips == 0
    finally:
        proc.kill()
        await asyncio.to_thread(proc.join, 10)
