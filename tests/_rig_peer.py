"""One side of a multi-NIC transfer across the namespace rig (tests/netrig.py).
Run inside a namespace by tests/test_netrig_fabric.py and benchmarks/multinic_bw.py;
talks to its parent over stdin/stdout, one line per step.

    target    PROVIDER NICS SIZE            -> READY <descriptor hex>; then commands:
        watch IMM COUNT PARTS   wait for COUNT immediates IMM while sampling which of PARTS equal
                                ranges of the buffer have landed; -> WATCHED <json>
        bye                     exit
    initiator PROVIDER NICS                 <- descriptor hex; then commands:
        write SIZE IMM          one write of SIZE bytes (striped when large); -> DONE <json>
        pages PAGE N IMM        N pages of PAGE bytes, shuffled; -> DONE <json>
        bench SIZE INFLIGHT SECONDS  keep INFLIGHT writes of SIZE in flight; -> DONE <json>
        benchpages PAGE N INFLIGHT SECONDS  the same with write_pages calls of N pages
        waitpeer IMM            wait for IMM naming the target while writing to it every 50 ms,
                                until both fail; -> DONE <json> with the errors
        bye                     exit

NICS is a comma-separated list of interface names.  The data written is the
pattern ``1 + i % 251`` (never zero), so a zero byte at the target means
"not landed yet".
"""
from __future__ import annotations

import asyncio
import hashlib
import json
import sys
import time

import numpy as np

import aiofabric as af


def pattern(size: int) -> np.ndarray:
    return (np.arange(size, dtype=np.int64) % 251 + 1).astype(np.uint8)


async def _line() -> str:
    return (await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)).strip()


def _say(*words: object) -> None:
    print(*words, flush=True)


async def target(provider: str, nics: list[str], size: int) -> None:
    async with af.open_engine(provider, nics=nics) as eng:
        buf = np.zeros(size, np.uint8)
        region = eng.register(buf)
        _say("READY", region.descriptor().to_bytes().hex())
        while (cmd := (await _line()).split()) and cmd[0] != "bye":
            imm, count, parts = map(int, cmd[1:])
            counter = eng.imm_counter(imm)
            bounds = [(size * k // parts, size * (k + 1) // parts) for k in range(parts)]
            landed_at: list[float | None] = [None] * parts
            started_at: list[float | None] = [None] * parts
            waiter = asyncio.ensure_future(counter.wait(count))
            t0 = time.perf_counter()
            while not waiter.done():
                now = time.perf_counter() - t0
                for k, (lo, hi) in enumerate(bounds):
                    if started_at[k] is None and buf[lo]:
                        started_at[k] = now
                    if landed_at[k] is None and buf[lo:hi].all():
                        landed_at[k] = now
                await asyncio.sleep(0.0005)
            await asyncio.wait_for(waiter, 60)
            fired = time.perf_counter() - t0
            for k, (lo, hi) in enumerate(bounds):  # what landed since the last sample
                if started_at[k] is None and buf[lo]:
                    started_at[k] = fired
                if landed_at[k] is None and buf[lo:hi].all():
                    landed_at[k] = fired
            complete_when_fired = bool(buf.all())
            digest = hashlib.sha256(buf).hexdigest()
            await asyncio.sleep(0.2)
            _say("WATCHED", json.dumps({
                "fired_s": fired, "complete_when_fired": complete_when_fired, "sha256": digest,
                "extra_imms": counter.available, "landed_s": landed_at, "started_s": started_at,
            }))
            buf[:] = 0


async def initiator(provider: str, nics: list[str]) -> None:
    desc = af.RegionDescriptor.from_bytes(bytes.fromhex(await _line()))
    async with af.open_engine(provider, nics=nics) as eng:
        src = pattern(len(desc))
        region = eng.register(src, remote_write=False)
        while (cmd := (await _line()).split()) and cmd[0] != "bye":
            t0 = time.perf_counter()
            before = eng.statistics().bytes_per_nic
            if cmd[0] == "write":
                size, imm = int(cmd[1]), int(cmd[2])
                await asyncio.wait_for(eng.write(region[0:size], desc[0:size], imm=imm), 120)
                moved = size
            elif cmd[0] == "pages":
                page, n, imm = map(int, cmd[1:])
                idx = np.random.default_rng(n).permutation(n).astype(np.int64)
                await asyncio.wait_for(eng.write_pages(region, desc, page, idx, idx, imm=imm), 120)
                moved = page * n
            elif cmd[0] == "bench":
                size, inflight, seconds = int(cmd[1]), int(cmd[2]), float(cmd[3])
                moved = await _bench(eng, region, desc, size, inflight, seconds)
            elif cmd[0] == "waitpeer":
                _say("WAITING")

                async def keep_writing() -> None:
                    while True:
                        await eng.write(region[0:65536], desc[0:65536])
                        await asyncio.sleep(0.05)

                res = await asyncio.gather(eng.imm_counter(int(cmd[1])).wait(1, peer=desc.owner),
                                           keep_writing(), return_exceptions=True)
                _say("DONE", json.dumps({"errors": [type(r).__name__ for r in res],
                                         "messages": [str(r) for r in res]}))
                continue
            else:  # benchpages
                page, n, inflight, seconds = int(cmd[1]), int(cmd[2]), int(cmd[3]), float(cmd[4])
                moved = await _bench(eng, region, desc, page * n, inflight, seconds, page)
            elapsed = time.perf_counter() - t0
            after = eng.statistics().bytes_per_nic
            _say("DONE", json.dumps({
                "seconds": elapsed, "bytes": moved, "gbit_s": moved * 8 / elapsed / 1e9,
                "bytes_per_nic": [a - b for a, b in zip(after, before)],
                "paths": eng.paths(desc.owner), "fence_unconfirmed": eng.statistics().fence_unconfirmed,
            }))


async def _bench(eng, region, desc, size: int, inflight: int, seconds: float, page: int = 0) -> int:
    slots = len(desc) // size
    if page:
        idx = np.random.default_rng(0).permutation(size // page).astype(np.int64)
    deadline = time.perf_counter() + seconds
    moved = 0
    pending: set[asyncio.Future] = set()
    k = 0
    while True:
        while len(pending) < inflight and time.perf_counter() < deadline:
            s = (k % slots) * size
            if page:
                pending.add(eng.write_pages(region[s:s + size], desc[s:s + size], page, idx, idx))
            else:
                pending.add(eng.write(region[s:s + size], desc[s:s + size]))
            k += 1
        if not pending:
            return moved
        done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
        for f in done:
            f.result()
            moved += size


if __name__ == "__main__":
    role, provider, nics, *rest = sys.argv[1:]
    if role == "target":
        asyncio.run(target(provider, nics.split(","), int(rest[0])))
    else:
        asyncio.run(initiator(provider, nics.split(",")))
