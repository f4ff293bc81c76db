"""The non-default posting and polling modes move the same bytes."""
from __future__ import annotations

import asyncio
import random

import pytest

import aiofabric as af
from conftest import bounded

pytestmark = pytest.mark.asyncio

MODES = [
    {"direct_post": True},
    {"loop_spin_us": 200},
    {"direct_post": True, "loop_spin_us": 200},
    {"spin_us": 0, "idle_ms": 1},
]


@pytest.mark.parametrize("settings", MODES, ids=lambda s: ",".join(f"{k}={v}" for k, v in s.items()))
async def test_modes_move_the_same_bytes(provider, settings, loop_errors):
    async with af.open_engine(provider, **settings) as a, af.open_engine(provider, **settings) as b:
        n, size = 300, 1000
        src = bytearray(random.randbytes(n * size))
        dst = bytearray(n * size)
        ra, rb = a.register(src), b.register(dst)
        d = rb.descriptor()
        futs = [a.write(ra[i * size:(i + 1) * size], d[i * size:(i + 1) * size], imm=8) for i in range(n)]
        futs.append(a.notify(b.address, 9))
        futs.append(a.send(b.address, b"mode"))
        await bounded(asyncio.gather(*futs), 60)
        await bounded(asyncio.gather(b.imm_counter(8).wait(n), b.imm_counter(9).wait(1)), 60)
        assert (await bounded(b.recv())).data == b"mode"
        assert dst == src
        for e in (a, b):
            assert e.statistics().pending_futures == 0
