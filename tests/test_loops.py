"""The same engine code under uvloop and under anyio's asyncio backend."""
from __future__ import annotations

import asyncio

import anyio
import pytest

import aiofabric as af


async def _exchange(provider: str) -> bytes:
    async with af.open_engine(provider) as a, af.open_engine(provider) as b:
        dst = bytearray(64)
        d = b.register(dst).descriptor()
        r = a.register(bytearray(b"q" * 64))
        await a.write(r, d, imm=3)
        await b.imm_counter(3).wait(1)
        await a.send(b.address, b"ping")
        assert (await b.recv()).data == b"ping"
        return bytes(dst)


@pytest.mark.parametrize("provider", ["shm", "tcp;ofi_rxm"])
def test_uvloop(provider):
    uvloop = pytest.importorskip("uvloop", reason="uvloop not installed")
    async def main():
        async with asyncio.timeout(20):
            return await _exchange(provider)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        assert runner.run(main()) == b"q" * 64


@pytest.mark.parametrize("provider", ["shm", "tcp;ofi_rxm"])
def test_anyio_asyncio_backend(provider):
    async def main():
        with anyio.fail_after(20):
            return await _exchange(provider)
    assert anyio.run(main, backend="asyncio") == b"q" * 64
