"""Disaggregated prefill/decode over two engines: a full request, many at once,
confirmed abort, prefill killed mid-request, decode joining late."""
from __future__ import annotations

import asyncio
import multiprocessing as mp
import os
import signal
import time

import numpy as np
import pytest

import _kv_peer
import aiofabric as af
from aiofabric.disagg import (FINAL, KVDecoder, KVPrefill, RequestAborted, RequestRejected, kv_imm,
                              split_kv_imm)
from aiofabric.kv import KVLayout
from conftest import bounded

pytestmark = pytest.mark.asyncio
CTX = mp.get_context("spawn")
LAYERS, BS, H, D = 4, 4, 2, 8
HB = 64


def layouts(kind: str):
    if kind == "mla":
        return KVLayout.mla(LAYERS, 80, BS, 32), KVLayout.mla(LAYERS, 64, BS, 32)
    return (KVLayout(kind, LAYERS, 80, BS, H, D, 2), KVLayout(kind, LAYERS, 64, BS, H, D, 2))


async def test_imm_encoding():
    imm = kv_imm(4095, 255, FINAL)
    assert imm <= 0xFFFFFFFF and imm >> 28 == 0xA
    assert split_kv_imm(imm) == (4095, 255, 255)
    assert split_kv_imm(kv_imm(3, 1, 7)) == (3, 1, 7)
    assert split_kv_imm(7) is None
    with pytest.raises(ValueError):
        kv_imm(4096, 0, 0)


class Pair:
    """Prefill and decode engines in this process with the protocol objects."""

    def __init__(self, provider, kind="separate"):
        self.provider, self.kind = provider, kind

    async def __aenter__(self):
        self.lp, self.ld = layouts(self.kind)
        self.pe = await af.open_engine(self.provider)
        self.de = await af.open_engine(self.provider)
        self.src = np.frombuffer(np.random.default_rng(3).bytes(self.lp.nbytes), np.uint8).copy()
        self.dst = np.zeros(self.ld.nbytes, np.uint8)
        self.pre = KVPrefill(self.pe, self.lp, self.pe.register(self.src, remote_write=False), hidden_bytes=HB)
        self.dec = KVDecoder(self.de, self.ld, self.de.register(self.dst), hidden_bytes=HB)
        self.pre.start()
        self.dec.start()
        await self.pre.join(self.de.address)
        for _ in range(200):
            if self.dec.prefills:
                break
            await asyncio.sleep(0.01)
        assert self.pe.address in self.dec.prefills
        return self

    async def __aexit__(self, *exc):
        await self.pre.aclose()
        await self.dec.aclose()
        await self.de.aclose()
        await self.pe.aclose()

    def check(self, src_blocks, dst_blocks, layers=range(LAYERS)):
        for layer in layers:
            for s, d in zip(self.lp.layer_pages(layer, src_blocks), self.ld.layer_pages(layer, dst_blocks)):
                for i, j in zip(s.indices, d.indices):
                    a = self.src[s.offset + s.stride * i:][:s.page_size]
                    b = self.dst[d.offset + d.stride * j:][:d.page_size]
                    assert np.array_equal(a, b), (layer, i, j)

    async def serve(self, delay=0.0, stop_after=None):
        """Prefill's loop: stream each request layer by layer."""
        while True:
            req = await self.pre.next_request()
            asyncio.ensure_future(self._one(req, delay))

    async def _one(self, req, delay):
        src = self.pre.pool.alloc(len(req.dst_blocks))
        req.src_blocks = src
        try:
            for layer in range(LAYERS):
                await asyncio.sleep(delay)
                req.send_layer(layer, src)
            await req.finish(np.full(HB, req.id % 256, np.uint8))
        except RequestAborted:
            pass
        finally:
            self.pre.pool.free(src)


@pytest.mark.parametrize("kind", ["separate", "interleaved", "mla"])
async def test_full_request(kind, loop_errors):
    async with Pair("shm", kind) as p:
        server = asyncio.ensure_future(p.serve())
        try:
            req = await bounded(p.dec.submit(range(37)))  # 10 blocks
            assert len(req.blocks) == 10
            for layer in range(LAYERS):
                await bounded(req.layer(layer))
                assert layer in req.landed
            hidden = await bounded(req.result())
            assert hidden == bytes([req.id % 256]) * HB
            assert req.state == "done"
        finally:
            server.cancel()
        # Prefill used blocks 0..9 of its pool for the first request.
        p.check(np.arange(10), req.blocks)
        free = p.dec.pool.available
        req.release()
        assert p.dec.pool.available == free + 10 and not p.dec.requests


async def test_many_concurrent_requests(provider, loop_errors):
    async with Pair(provider) as p:
        server = asyncio.ensure_future(p.serve(delay=0.001))
        try:
            reqs = await asyncio.gather(*(p.dec.submit(range(1 + 3 * k)) for k in range(12)))
            hidden = await bounded(asyncio.gather(*(r.result() for r in reqs)), 30)
            assert [h[0] for h in hidden] == [r.id % 256 for r in reqs]
            assert len({int(b) for r in reqs for b in r.blocks}) == sum(len(r.blocks) for r in reqs)
            for r in reqs:
                r.release()
            assert p.dec.pool.available == p.ld.num_blocks
        finally:
            server.cancel()


async def test_abort_is_confirmed(loop_errors):
    async with Pair("shm") as p:
        server = asyncio.ensure_future(p.serve(delay=0.02))
        try:
            req = await p.dec.submit(range(4 * BS))
            await bounded(req.layer(0))
            await bounded(req.abort())       # returns after ABORTED
            assert req.state == "aborted"
            with pytest.raises(RequestAborted):
                await req.layer(LAYERS - 1)
            assert p.dec.pool.available == p.ld.num_blocks  # blocks reclaimed
            # Poison the blocks: nothing may write them after ABORTED.
            for layer in range(LAYERS):
                for d in p.ld.layer_pages(layer, req.blocks):
                    for j in d.indices:
                        p.dst[d.offset + d.stride * j:][:d.page_size] = 0xEE
            snap = p.dst.copy()
            await asyncio.sleep(0.3)  # prefill would have written the remaining layers by now
            assert np.array_equal(p.dst, snap), "pages written after ABORTED"
            # The slot and the blocks serve a new request normally.
            req2 = await p.dec.submit(range(4 * BS))
            assert await bounded(req2.result()) == bytes([req2.id % 256]) * HB
            req2.release()
        finally:
            server.cancel()


async def test_abort_before_prefill_sees_request(loop_errors):
    async with Pair("shm") as p:
        req = await p.dec.submit(range(8))  # nobody serves: the request sits in the queue
        await bounded(req.abort())
        assert req.state == "aborted" and p.dec.pool.available == p.ld.num_blocks


async def test_rejected_incompatible_layout(loop_errors):
    async with Pair("shm") as p:
        p.dec.layout = KVLayout("separate", LAYERS, 64, BS, H, 2 * D, 2)  # a mismatch prefill refuses
        p.dec.pool.num_blocks = 64
        req = await p.dec.submit(range(8))
        with pytest.raises(RequestRejected):
            await bounded(req.result())
        assert req.state == "failed" and not p.dec.requests


def start_prefill(provider, layout, decoder, delay):
    here, there = CTX.Pipe()
    proc = CTX.Process(target=_kv_peer.prefill, args=(provider, layout.to_dict(), decoder, delay, there),
                       daemon=True)
    proc.start()
    if not here.poll(60):
        proc.kill()
        raise AssertionError("prefill did not start")
    return proc, af.Address.from_bytes(here.recv())


@pytest.mark.parametrize("provider", ["shm", "tcp;ofi_rxm"])
async def test_prefill_killed_mid_request(provider, loop_errors):
    """Two prefill processes; one is SIGKILLed mid-request: its requests fail
    with BrokenResourceError within a bound, blocks come back, the other's
    requests complete (and a late prefill that joins takes new work)."""
    lay = KVLayout.vllm_flash_attn(LAYERS, 64, BS, H, D)
    dst = np.zeros(lay.nbytes, np.uint8)
    async with af.open_engine(provider, peer_timeout=1.0) as de:
        dec = KVDecoder(de, lay, de.register(dst), hidden_bytes=64)
        async with dec:
            slow, a_slow = await asyncio.to_thread(start_prefill, provider, lay, de.address.to_bytes(), 0.5)
            fast, a_fast = await asyncio.to_thread(start_prefill, provider, lay, de.address.to_bytes(), 0.01)
            late = None
            try:
                async with asyncio.timeout(20):
                    while len(dec.prefills) < 2:
                        await asyncio.sleep(0.02)
                doomed = [await dec.submit(range(20), prefill=a_slow) for _ in range(3)]
                await bounded(doomed[0].layer(0))
                os.kill(slow.pid, signal.SIGKILL)
                t0 = time.monotonic()
                ok = [await dec.submit(range(20), prefill=a_fast) for _ in range(3)]
                res = await bounded(asyncio.gather(*(r.result() for r in doomed), return_exceptions=True), 15)
                took = time.monotonic() - t0
                assert all(isinstance(r, af.BrokenResourceError) for r in res), res
                assert took < 1.0 + 3.0, took
                assert all(r.state == "failed" for r in doomed)
                assert dec.pick_prefill() == a_fast
                for r in ok:
                    assert await bounded(r.result()) == bytes([r.id % 256]) * 64
                    r.release()
                assert dec.pool.available == lay.num_blocks
                # A prefill joining at run time takes work.
                late, a_late = await asyncio.to_thread(start_prefill, provider, lay, de.address.to_bytes(), 0.0)
                async with asyncio.timeout(20):
                    while a_late not in dec.prefills:
                        await asyncio.sleep(0.02)
                r = await dec.submit(range(9), prefill=a_late)
                assert await bounded(r.result()) == bytes([r.id % 256]) * 64
                r.release()
                print(f"\n{provider}: 3 requests failed {took:.2f} s after the kill: {res[0]}")
            finally:
                for proc in (slow, fast, late):
                    if proc is not None:
                        proc.kill()
                        await asyncio.to_thread(proc.join, 10)


async def test_decode_joining_late(loop_errors):
    """A decode instance opened after prefill is running registers by itself
    being joined; prefill serves both decoders."""
    async with Pair("shm") as p:
        server = asyncio.ensure_future(p.serve())
        de2 = await af.open_engine("shm")
        try:
            dst2 = np.zeros(p.ld.nbytes, np.uint8)
            async with KVDecoder(de2, p.ld, de2.register(dst2), hidden_bytes=HB) as dec2:
                await p.pre.join(de2.address)
                async with asyncio.timeout(10):
                    while not dec2.prefills:
                        await asyncio.sleep(0.01)
                r1, r2 = await p.dec.submit(range(12)), await dec2.submit(range(12))
                await bounded(asyncio.gather(r1.result(), r2.result()))
                r1.release()
                r2.release()
        finally:
            server.cancel()
            await de2.aclose()
