"""Engines in two processes: random writes verified byte for byte."""
from __future__ import annotations

import asyncio
import multiprocessing as mp
import random

import pytest

import _peer
import aiofabric as af
from conftest import bounded

pytestmark = pytest.mark.asyncio


async def test_two_processes(provider, loop_errors):
    size = 1 << 22
    ctx = mp.get_context("spawn")
    here, there = ctx.Pipe()
    proc = ctx.Process(target=_peer.target, args=(provider, size, there), daemon=True)
    proc.start()
    loop = asyncio.get_running_loop()
    try:
        addr_b, desc_b = await bounded(loop.run_in_executor(None, here.recv), 60)
        peer, desc = af.Address.from_bytes(addr_b), af.RegionDescriptor.from_bytes(desc_b)
        rng = random.Random(7)
        src = bytearray(rng.randbytes(size))
        expect = bytearray(size)
        async with af.open_engine(provider) as eng:
            region = eng.register(src)
            n, slot = 64, size // 64
            futs = []
            for k in range(n):
                ln = rng.randint(1, slot)
                so, do = rng.randint(0, size - ln), k * slot + rng.randint(0, slot - ln)
                futs.append(eng.write(region[so:so + ln], desc[do:do + ln], imm=1))
                expect[do:do + ln] = src[so:so + ln]
            here.send(n)
            await bounded(asyncio.gather(*futs), 60)
            await bounded(eng.send(peer, b"done"))
            reply = await bounded(eng.recv(), 60)
            assert reply.data == b"ack:done" and reply.sender == peer
            image = await bounded(loop.run_in_executor(None, here.recv), 60)
            assert image == bytes(expect)
        here.send("bye")
    finally:
        proc.join(30)
        if proc.is_alive():
            proc.kill()
    assert proc.exitcode == 0
