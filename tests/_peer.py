"""The other process of the two-process tests (spawned by multiprocessing)."""
from __future__ import annotations

import asyncio
import os

for _k in ("FI_TCP_IFACE", "FI_UDP_IFACE", "FI_SOCKETS_IFACE"):
    os.environ[_k] = "lo"

import aiofabric as af  # noqa: E402


def target(provider: str, size: int, conn) -> None:
    """Register `size` bytes, publish address and descriptor, wait for
    `n` immediates of value 1, send back a digest of the region."""

    async def main() -> None:
        async with af.open_engine(provider) as eng:
            buf = bytearray(size)
            region = eng.register(buf)
            conn.send((eng.address.to_bytes(), region.descriptor().to_bytes()))
            n = conn.recv()
            async with asyncio.timeout(60):
                await eng.imm_counter(1).wait(n)
                msg = await eng.recv()
            await eng.send(msg.sender, b"ack:" + msg.data)
            conn.send(bytes(buf))
            conn.recv()  # stay open until told

    asyncio.run(main())


def victim(provider: str, size: int, conn) -> None:
    """Register `size` bytes, publish address and descriptor, then serve
    until killed (the peer-failure tests SIGKILL this process)."""

    async def main() -> None:
        async with af.open_engine(provider) as eng:
            region = eng.register(bytearray(size))
            conn.send((eng.address.to_bytes(), region.descriptor().to_bytes()))
            await asyncio.sleep(3600)

    asyncio.run(main())
