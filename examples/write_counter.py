"""Two processes, one-sided writes, immediates counted at the target.

The target registers a buffer and hands its descriptor to the initiator
(here through a pipe; in a real system through your control plane).  The
initiator writes chunks of it with ``imm=7``; the target learns that they
landed only by awaiting its ImmCounter, never from ordering.  Then they
trade one message each way.

    python examples/write_counter.py [--provider shm] [--chunks 64] [--chunk-size 65536]
"""
from __future__ import annotations

import argparse
import asyncio
import hashlib
import multiprocessing as mp
import os
import time

for _k in ("FI_TCP_IFACE", "FI_UDP_IFACE", "FI_SOCKETS_IFACE"):
    os.environ.setdefault(_k, "lo")  # keep the example on loopback

import aiofabric as af  # noqa: E402

IMM_DATA = 7


def target(provider: str, nbytes: int, chunks: int, conn) -> None:
    async def main() -> None:
        async with af.open_engine(provider) as engine:
            buf = bytearray(nbytes)
            region = engine.register(buf)
            conn.send((engine.address.to_bytes(), region.descriptor().to_bytes()))
            counter = engine.imm_counter(IMM_DATA)
            async with asyncio.timeout(60):
                await counter.wait(chunks)          # every chunk has landed
            digest = hashlib.sha256(buf).hexdigest()[:16]
            print(f"[target]    {chunks} immediates counted; region sha256 {digest}")
            msg = await engine.recv()
            await engine.send(msg.sender, f"got {chunks} chunks, sha256 {digest}".encode())
            conn.recv()  # stay up until the initiator is done

    asyncio.run(main())


async def initiator(provider: str, nbytes: int, chunks: int, conn) -> bool:
    addr_bytes, desc_bytes = conn.recv()
    peer = af.Address.from_bytes(addr_bytes)
    remote = af.RegionDescriptor.from_bytes(desc_bytes)
    async with af.open_engine(provider) as engine:
        print(f"[initiator] provider {engine.provider} ({engine.domain}), libfabric {af.fabric_version()}")
        data = bytearray(os.urandom(nbytes))
        region = engine.register(data)
        size = nbytes // chunks
        t0 = time.perf_counter()
        # Posted on call; gather the local completions.  Order of arrival is not assumed.
        await asyncio.gather(*(
            engine.write(region[i * size:(i + 1) * size], remote[i * size:(i + 1) * size], imm=IMM_DATA)
            for i in range(chunks)
        ))
        dt = time.perf_counter() - t0
        print(f"[initiator] {chunks} writes of {size} bytes completed locally in {dt * 1e3:.1f} ms")
        await engine.send(peer, b"done?")
        reply = await asyncio.wait_for(engine.recv(), 60)
        expect = hashlib.sha256(data).hexdigest()[:16]
        print(f"[initiator] reply: {reply.data.decode()}")
        st = engine.statistics()
        print(f"[initiator] statistics: writes={st.writes_posted} bytes={st.bytes_posted} errors={st.errors}")
        return reply.data.decode().endswith(expect)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--provider", default="shm", help="libfabric provider (see `aiofabric info`)")
    ap.add_argument("--chunks", type=int, default=64)
    ap.add_argument("--chunk-size", type=int, default=1 << 16)
    args = ap.parse_args()
    if args.chunks < 1 or args.chunk_size < 1:
        ap.error("--chunks and --chunk-size must be positive")
    nbytes = args.chunks * args.chunk_size
    ctx = mp.get_context("spawn")
    here, there = ctx.Pipe()
    proc = ctx.Process(target=target, args=(args.provider, nbytes, args.chunks, there), daemon=True)
    proc.start()
    try:
        ok = asyncio.run(initiator(args.provider, nbytes, args.chunks, here))
        here.send("bye")
    finally:
        proc.join(30)
        if proc.is_alive():
            proc.kill()
    print("OK: the target's bytes match" if ok and proc.exitcode == 0 else "FAILED")
    return 0 if ok and proc.exitcode == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
