"""Running a planned update: :func:`run_source` on every trainer rank,
:func:`run_destination` on every inference rank.

Immediates (32 bits): ``0xB`` in bits 31..28, the update's ``version`` mod
4096 in bits 27..16, bit 15 clear for data and set for acknowledgements, a
rank in bits 14..0.  Source ``s`` tags every write of update ``v`` with
``update_imm(v, s)``; destination ``d`` expects exactly
``plan.expected()[s, d]`` of them from each ``s`` (one per piece, two per
quantized piece), then acknowledges with one ``ack_imm(v, d)`` to every
source that wrote to it.  Counting per source lets the destination watch each
source: if one fails, its wait raises BrokenResourceError.

Failure semantics: a destination writes each update into the *shadow* buffer
of a :class:`DoubleBuffer` and flips it live only once every expected
immediate has arrived; a failed update leaves the live weights as they were
(the shadow holds a partial update, overwritten whole by the next one).
"""
from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from ..memory import Address, MemoryRegion, RegionDescriptor
from .plan import Plan
from .stage import Stager

__all__ = [
    "MAX_RANKS",
    "VERSIONS",
    "DoubleBuffer",
    "UpdateStats",
    "ack_imm",
    "run_destination",
    "run_source",
    "split_imm",
    "update_imm",
]

TAG = 0xB
VERSIONS = 4096
MAX_RANKS = 1 << 15

Progress = Callable[[int, int], None]


def update_imm(version: int, src_rank: int) -> int:
    """The immediate of every data write of ``src_rank`` in update ``version``."""
    return TAG << 28 | (version % VERSIONS) << 16 | _rank(src_rank)


def ack_imm(version: int, dst_rank: int) -> int:
    """The immediate a destination acknowledges update ``version`` with."""
    return TAG << 28 | (version % VERSIONS) << 16 | 1 << 15 | _rank(dst_rank)


def split_imm(imm: int) -> tuple[int, bool, int] | None:
    """(version mod 4096, is_ack, rank) of a weight-update immediate, else None."""
    if imm >> 28 != TAG:
        return None
    return imm >> 16 & 0xFFF, bool(imm >> 15 & 1), imm & 0x7FFF


def _rank(r: int) -> int:
    if type(r) is not int or not 0 <= r < MAX_RANKS:
        raise ValueError(f"rank must be in 0..{MAX_RANKS - 1}, got {r!r}")
    return r


class UpdateStats(dict):
    """What one side did: ``bytes``, ``writes`` (immediates), ``seconds``."""


class DoubleBuffer:
    """Two equal buffers of one destination rank, both registered:
    ``live`` (what inference reads) and ``shadow`` (what the next update
    writes).  :meth:`flip` swaps them; :func:`run_destination` flips only
    after a complete update.  Hand ``shadow_descriptor()`` to the sources for
    each update (it changes at every flip)."""

    def __init__(self, engine: Any, a: Any, b: Any) -> None:
        self.buffers = (a, b)
        self.regions = (engine.register(a), engine.register(b))
        if self.regions[0].nbytes != self.regions[1].nbytes:
            raise ValueError(f"buffers differ in size ({self.regions[0].nbytes} and {self.regions[1].nbytes})")
        self._live = 0
        self.flips = 0

    @property
    def live(self) -> Any:
        return self.buffers[self._live]

    @property
    def shadow(self) -> Any:
        return self.buffers[1 - self._live]

    def shadow_descriptor(self) -> RegionDescriptor:
        return self.regions[1 - self._live].descriptor()

    def flip(self) -> None:
        self._live = 1 - self._live
        self.flips += 1

    def close(self) -> None:
        for r in self.regions:
            r.close()


def _check_rank(name: str, rank: Any, n: int) -> int:
    if type(rank) is not int:
        raise TypeError(f"{name} must be an int, not {type(rank).__name__}")
    if not 0 <= rank < n:
        raise ValueError(f"{name} must be in 0..{n - 1}, got {rank}")
    return rank


def _retrieve(fut: asyncio.Future[Any]) -> None:
    if not fut.cancelled():
        fut.exception()


async def run_source(engine: Any, plan: Plan, rank: int, src: MemoryRegion,
                     dst_descriptors: Sequence[RegionDescriptor | None], *, version: int = 0,
                     scratch_bytes: int = 256 << 20, window_bytes: int = 1 << 30,
                     progress: Progress | None = None, wait_ack: bool = True) -> UpdateStats:
    """Write source ``rank``'s part of an update from ``src`` (its packed
    buffer, :meth:`Plan.src_layout_bytes`) into the destinations' buffers
    (``dst_descriptors[d]``: destination d's shadow buffer, None where this
    rank writes nothing to d).

    Copies go straight from ``src``; quantized parameters are cast into a
    registered scratch buffer of ``scratch_bytes`` (two halves: one is cast
    into while the other is on the wire).  At most ``window_bytes`` are in
    flight.  With ``wait_ack`` it returns once every destination it wrote to
    has acknowledged the whole update.  ``progress(bytes_done, total)`` is
    called as writes complete.  Raises TypeError/ValueError on bad arguments,
    BrokenResourceError when a destination fails (writes in flight still
    complete or fail on their own; nothing is retried)."""
    rank = _check_rank("rank", rank, plan.src.ranks)
    if not isinstance(src, MemoryRegion):
        raise TypeError(f"src must be a MemoryRegion, not {type(src).__name__}")
    if src.nbytes < plan.src_layout_bytes(rank):
        raise ValueError(f"src has {src.nbytes} bytes, source rank {rank} needs {plan.src_layout_bytes(rank)}")
    dsts = list(dst_descriptors)
    if len(dsts) != plan.dst.ranks:
        raise ValueError(f"dst_descriptors has {len(dsts)} entries for {plan.dst.ranks} destination ranks")
    counts = plan.expected()[rank]
    for d, desc in enumerate(dsts):
        if counts[d] == 0:
            continue
        if not isinstance(desc, RegionDescriptor):
            raise TypeError(f"dst_descriptors[{d}] must be a RegionDescriptor, not {type(desc).__name__}")
        if desc.nbytes < plan.dst_layout_bytes(d):
            raise ValueError(f"dst_descriptors[{d}] covers {desc.nbytes} bytes, destination {d} needs "
                             f"{plan.dst_layout_bytes(d)}")
    imm = update_imm(version, rank)
    t0 = time.perf_counter()
    total = int(plan.link_bytes()[0][rank])
    done = [0]
    inflight: deque[tuple[asyncio.Future[Any], int]] = deque()
    futs: list[asyncio.Future[Any]] = []
    window = [0]

    def track(fut: asyncio.Future[Any], nbytes: int) -> None:
        fut.add_done_callback(_retrieve)

        def landed(f: asyncio.Future[Any]) -> None:
            if not f.cancelled() and f.exception() is None:
                done[0] += nbytes
                if progress is not None:
                    progress(done[0], total)

        fut.add_done_callback(landed)
        futs.append(fut)
        inflight.append((fut, nbytes))
        window[0] += nbytes

    async def drain(limit: int) -> None:
        while inflight and window[0] > limit:
            fut, n = inflight.popleft()
            await fut
            window[0] -= n

    stager = None
    soffs = plan._src_off[rank]
    try:
        for i, _k, d, pieces in plan.source_work(rank):
            desc = dsts[d]
            soff = soffs[i]
            doff, sc_off = plan._dst_off[d][i]
            if plan.cast(i):
                if stager is None:
                    stager = Stager(engine, src, scratch_bytes, plan.options.fp8_block)
                cols = plan.dst.shards[i][d].shape_of(plan.params[i].shape)[-1]  # type: ignore[union-attr]
                for piece in pieces:
                    for sel in stager.batches(piece):
                        for fut, n in await stager.send(piece, sel, soff, desc, doff, sc_off, cols, imm):
                            track(fut, n)
                        await drain(window_bytes)
                continue
            item = plan.params[i].itemsize
            for piece in pieces:
                n = piece.length * item
                if len(piece.src) == 1:
                    s0, d0 = soff + int(piece.src[0]) * item, doff + int(piece.dst[0]) * item
                    fut = engine.write(src[s0:s0 + n], desc[d0:d0 + n], imm=imm)
                else:
                    fut = engine.write_pages(src, desc, n, soff + piece.src * item, doff + piece.dst * item,
                                             src_stride=1, dst_stride=1, imm=imm)
                track(fut, n * len(piece.src))
                await drain(window_bytes)
        await drain(0)
        if wait_ack:
            peers = [(d, dsts[d].owner) for d in range(plan.dst.ranks) if counts[d]]  # type: ignore[union-attr]
            await _gather_failfast([engine.imm_counter(ack_imm(version, d)).wait(1, peer=a) for d, a in peers])
    finally:
        if stager is not None:
            await stager.aclose()
    return UpdateStats(bytes=total, writes=int(counts.sum()), seconds=time.perf_counter() - t0)


async def _gather_failfast(aws: list[Any]) -> None:
    """Await all; on the first failure cancel the rest and raise it."""
    tasks = [asyncio.ensure_future(a) for a in aws]
    if not tasks:
        return
    try:
        done, _pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        for t in done:
            if t.exception() is not None:
                raise t.exception()  # type: ignore[misc]
    finally:
        for t in tasks:
            if not t.done():
                t.cancel()
        for t in tasks:
            try:
                await t
            except BaseException:  # noqa: BLE001 - reaped; the first failure is raised above
                pass


async def run_destination(engine: Any, plan: Plan, rank: int, sources: Sequence[Address], *,
                          version: int = 0, buffers: DoubleBuffer | None = None, flip: bool = True,
                          progress: Progress | None = None) -> UpdateStats:
    """Wait until every source has delivered its part of update ``version``
    to destination ``rank`` (``sources[s]``: source s's engine address),
    acknowledge it to each, then flip ``buffers`` (unless ``flip=False``:
    e.g. to flip a whole tensor-parallel group together).

    Counts exactly ``plan.expected()[s, rank]`` immediates from each source
    s.  Raises BrokenResourceError if a source fails first (``buffers`` is
    then not flipped: the live weights are the old ones); cancelling it
    abandons the wait.  ``progress(bytes_done, total)`` after each source."""
    rank = _check_rank("rank", rank, plan.dst.ranks)
    srcs = list(sources)
    if len(srcs) != plan.src.ranks:
        raise ValueError(f"sources has {len(srcs)} entries for {plan.src.ranks} source ranks")
    counts = plan.expected()[:, rank]
    for s in np.nonzero(counts)[0]:
        if not isinstance(srcs[s], Address):
            raise TypeError(f"sources[{s}] must be an Address, not {type(srcs[s]).__name__}")
    t0 = time.perf_counter()
    per_src = _bytes_from(plan, rank)
    total = int(per_src.sum())
    done = [0]

    async def one(s: int) -> None:
        await engine.imm_counter(update_imm(version, s)).wait(int(counts[s]), peer=srcs[s])
        done[0] += int(per_src[s])
        if progress is not None:
            progress(done[0], total)

    active = [int(s) for s in np.nonzero(counts)[0]]
    await _gather_failfast([one(s) for s in active])
    if active:
        await engine.barrier([srcs[s] for s in active], ack_imm(version, rank))
    if buffers is not None and flip:
        buffers.flip()
    return UpdateStats(bytes=total, writes=int(counts.sum()), seconds=time.perf_counter() - t0)


def _bytes_from(plan: Plan, rank: int) -> np.ndarray:
    out = np.zeros(plan.src.ranks, np.int64)
    for i, t in enumerate(plan.tables):
        m = t.dst == rank
        if m.any():
            np.add.at(out, t.src[m], plan.route_stats(i)["bytes"][m])
    return out

