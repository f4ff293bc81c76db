"""Watcher: slots of 64-bit values that a producer raises, and transfers
pre-armed on them.

``w = engine.watcher(slots=64)`` allocates page-aligned memory for the slots
(``w.address``, ``w.nbytes``: what a GPU integration registers with
``cudaHostRegister``).  A producer stores increasing values into them (here a
CPU thread with :meth:`Watcher.bump`; later a CUDA stream with
``cuStreamWriteValue64``).  The engine's native watcher thread polls the slots
that something depends on and

* submits a pre-armed transfer (:meth:`Watcher.arm_write`,
  :meth:`Watcher.arm_pages`, :meth:`Watcher.arm_notify`) the moment its slot
  reaches its value, with no Python in between;
* tells the event loop when a slot that a task awaits has changed
  (:meth:`Watcher.watch`, :meth:`Watcher.wait`).

Values may skip: several bumps between two polls are seen once, as the last
value.  See docs/watcher.md.
"""
from __future__ import annotations

import asyncio
import functools
import mmap
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from ._lib import check, ffi, lib, strerror
from .errors import ClosedResourceError, completion_error
from .memory import Address, RegionDescriptor

if TYPE_CHECKING:
    from .engine import TransferEngine
    from .memory import MemoryRegion, RegionView

__all__ = ["Watcher", "SlotChanges", "WatcherStatistics", "DEFAULT_POLL_NS"]

_U32 = (1 << 32) - 1
_U64 = (1 << 64) - 1
_MAX_SLOTS = 1 << 24
_FAIL_BATCH = 64
#: pause of the watcher thread between two polls while something is armed or watched
DEFAULT_POLL_NS = 2000

#: one fired arm, as recorded by :meth:`Watcher.trace` (CLOCK_MONOTONIC nanoseconds)
SAMPLE_DTYPE = np.dtype([("bump_ns", "<u8"), ("seen_ns", "<u8"), ("posted_ns", "<u8"), ("value", "<u8"),
                         ("target", "<u8"), ("slot", "<u4"), ("pad", "<u4")])


@dataclass(frozen=True)
class WatcherStatistics:
    """A snapshot of a watcher's counts (``watcher.statistics()``)."""

    slots: int
    armed: int          #: arms waiting for their value
    fired: int          #: arms submitted by the watcher thread
    failed: int         #: arms whose submission failed (their futures failed)
    changes: int        #: changes of awaited slots signalled to the loop
    eagain: int         #: submissions retried because the engine's queue was full
    active_slots: int   #: slots the thread polls now (armed or awaited)
    waiters: int        #: tasks awaiting a change
    passes: int         #: the engine's watcher thread: poll passes
    sleeps: int         #: ... times it blocked because nothing was armed or awaited


def _int(name: str, value: Any) -> int:
    if type(value) is bool or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, not {type(value).__name__}")
    return int(value)


class Watcher:
    """Slots of 64-bit values polled by the engine's watcher thread.

    Made by :meth:`TransferEngine.watcher`.  Closing it (or the engine) fails
    every arm that has not fired with ClosedResourceError and ends every
    :meth:`watch` iteration after its last change; arms that fired complete
    normally.  ``async with`` closes it on exit.
    """

    def __init__(self, engine: TransferEngine, slots: int, poll_ns: int | None = None) -> None:
        n = _int("slots", slots)
        if not 0 < n <= _MAX_SLOTS:
            raise ValueError(f"slots must be between 1 and {_MAX_SLOTS}, got {n}")
        pause = DEFAULT_POLL_NS if poll_ns is None else _int("poll_ns", poll_ns)
        if not 0 <= pause < 1_000_000_000:
            raise ValueError(f"poll_ns must be between 0 and 999999999, got {pause}")
        if engine.closed:
            raise ClosedResourceError("engine is closed")
        self.engine = engine
        self.slots = n
        self.poll_ns = pause
        self._loop = engine._loop
        #: bytes of the slot memory (whole pages, zero-filled)
        self.nbytes = -(-8 * n // mmap.PAGESIZE) * mmap.PAGESIZE
        self._mem = mmap.mmap(-1, self.nbytes)  # page-aligned; outlives the native watcher
        self._base = ffi.from_buffer("uint64_t[]", self._mem, require_writable=True)
        #: base address of the slots (page-aligned): what a GPU integration registers
        self.address = int(ffi.cast("uintptr_t", self._base))
        #: the slots as a numpy uint64 array (slot i is ``buffer[i]``)
        self.buffer = np.frombuffer(self._mem, dtype=np.uint64, count=n)
        self._stamps: np.ndarray | None = None
        self._cstamps: Any = ffi.NULL
        out = ffi.new("afc_watcher **")
        check(lib.afc_watcher_new(engine._h, self._base, n, pause, out), "watcher")
        self._h: Any = out[0]
        self._fd = lib.afc_watcher_fd(self._h)
        self._closed = False
        self._arms: dict[int, tuple[int, asyncio.Future[None]]] = {}  # id -> (slot, future)
        self._by_fut: dict[asyncio.Future[None], int] = {}
        self._waiting: dict[int, list[list[Any]]] = {}  # slot -> [[future, value seen], ...]
        self._fail_ids = ffi.new("uint64_t[]", _FAIL_BATCH)
        self._fail_errs = ffi.new("int32_t[]", _FAIL_BATCH)
        self._loop.add_reader(self._fd, self._on_ready)

    # -- slots ----------------------------------------------------------------

    def _slot(self, slot: Any) -> int:
        i = _int("slot", slot)
        if not 0 <= i < self.slots:
            raise ValueError(f"slot {i} is out of range: this watcher has slots 0..{self.slots - 1}")
        return i

    @staticmethod
    def _value(value: Any) -> int:
        v = _int("value", value)
        if not 0 <= v <= _U64:
            raise ValueError(f"value must be an unsigned 64-bit integer, got {v}")
        return v

    def slot_address(self, slot: int) -> int:
        """The address of one slot (what ``cuStreamWriteValue64`` would target,
        through its device-mapped alias)."""
        return self.address + 8 * self._slot(slot)

    def value(self, slot: int) -> int:
        """The slot's current value (an acquire load)."""
        return int(lib.afc_slot_load(self._base, self._slot(slot)))

    def bump(self, slot: int, value: int) -> None:
        """Store ``value`` into ``slot`` with release semantics: a CPU producer's
        stand-in for a GPU stream's ``cuStreamWriteValue64``.  Safe to call from
        any thread.  Values are meant to increase; arms fire at ``>=``.
        Raises ClosedResourceError once the watcher is closed."""
        if self._closed:
            raise ClosedResourceError("watcher is closed")
        lib.afc_slot_store(self._base, self._cstamps, self._slot(slot), self._value(value))

    # -- watching -------------------------------------------------------------

    def watch(self, slot: int) -> SlotChanges:
        """An async iterator of ``(old, new)`` for every change of ``slot`` seen
        from now on.  Values may skip (several bumps between two looks are
        reported once, as the latest); the last value is always reported.  The
        iteration ends when the watcher closes, after its last change.  The
        thread polls the slot only while the iterator is awaited; breaking out
        of the loop needs no cleanup."""
        return SlotChanges(self, self._slot(slot))

    async def wait(self, slot: int, value: int) -> int:
        """Wait until ``slot`` holds at least ``value``; returns the value seen.
        Raises ClosedResourceError if the watcher closes first; cancelling it
        abandons the wait."""
        i, target = self._slot(slot), self._value(value)
        while True:
            v = int(lib.afc_slot_load(self._base, i))
            if v >= target:
                return v
            if self._closed:
                raise ClosedResourceError("watcher is closed")
            await self._changed(i, v)

    async def _changed(self, i: int, seen: int) -> None:
        """Return once slot i may differ from ``seen`` (or the watcher closed)."""
        fut: asyncio.Future[None] = self._loop.create_future()
        entry = [fut, seen]
        waiting = self._waiting.get(i)
        if waiting is None:
            waiting = self._waiting[i] = []
            check(lib.afc_watcher_watch(self._h, i, 1), "watch")
        waiting.append(entry)
        try:
            # The thread compares against the value it had when the watch
            # began: a change between our read and that moment is seen here.
            if int(lib.afc_slot_load(self._base, i)) == seen:
                await fut
        finally:
            waiting.remove(entry)
            if not waiting:
                del self._waiting[i]
                if not self._closed:
                    lib.afc_watcher_watch(self._h, i, -1)

    def _on_ready(self) -> None:
        if self._closed:
            return
        try:
            os.read(self._fd, 8)
        except BlockingIOError:
            pass
        self._drain_failed()
        load, base = lib.afc_slot_load, self._base
        for i, waiting in self._waiting.items():
            v = int(load(base, i))
            for fut, seen in waiting:
                if v != seen and not fut.done():
                    fut.set_result(None)

    # -- arms -----------------------------------------------------------------

    def _check_open(self) -> TransferEngine:
        if self._closed:
            raise ClosedResourceError("watcher is closed")
        if self.engine.closed:
            raise ClosedResourceError("engine is closed")
        return self.engine

    def arm_write(self, slot: int, value: int, src: MemoryRegion | RegionView, dst: RegionDescriptor, *,
                  imm: int | None = None) -> asyncio.Future[None]:
        """Arm ``engine.write(src, dst, imm=imm)`` to be submitted by the watcher
        thread once ``slot`` holds at least ``value`` (at once if it already
        does).  Everything is checked now, as write() checks it (TypeError,
        ValueError, ClosedResourceError; nothing is armed then).  The future
        resolves like write()'s; cancelling it before the arm fires disarms it,
        after that it abandons the wait only."""
        eng = self._check_open()
        i, v = self._slot(slot), self._value(value)
        region, off, immv = eng._check_write(src, dst, imm)
        dest = eng._peer(dst.owner)
        aid = eng._next_id()
        check(lib.afc_watcher_arm_write(self._h, i, v, aid, region._ptr + off, src.nbytes, region._mr, dest,
                                        dst.addr, eng._keybuf(dst.keys), len(dst.keys), immv), "arm_write")
        return self._track(aid, i, region, dest)

    def arm_pages(self, slot: int, value: int, src: MemoryRegion | RegionView, dst: RegionDescriptor,
                  page_size: int, src_pages: Any, dst_pages: Any, *, src_stride: int | None = None,
                  dst_stride: int | None = None, imm: int | None = None) -> asyncio.Future[None]:
        """Arm ``engine.write_pages(...)`` (same arguments, same checks, one
        immediate per page) to be submitted once ``slot`` holds at least
        ``value``.  The index arrays are copied now.  An empty page list
        resolves at once, as write_pages() does."""
        eng = self._check_open()
        i, v = self._slot(slot), self._value(value)
        region, off, immv, page, sstride, dstride, sidx, didx = eng._pages_args(
            src, dst, page_size, src_pages, dst_pages, src_stride, dst_stride, imm)
        if len(sidx) == 0:
            fut: asyncio.Future[None] = self._loop.create_future()
            fut.set_result(None)
            return fut
        dest = eng._peer(dst.owner)
        aid = eng._next_id()
        check(lib.afc_watcher_arm_pages(
            self._h, i, v, aid, region._ptr + off, region._mr, dest, dst.addr, eng._keybuf(dst.keys),
            len(dst.keys), page, sstride, dstride, ffi.from_buffer("int64_t[]", sidx),
            ffi.from_buffer("int64_t[]", didx), len(sidx), immv), "arm_pages")
        return self._track(aid, i, region, dest)

    def arm_notify(self, slot: int, value: int, peer: Address, imm: int) -> asyncio.Future[None]:
        """Arm ``engine.notify(peer, imm)`` (one immediate, no data) to be
        submitted once ``slot`` holds at least ``value``."""
        eng = self._check_open()
        i, v = self._slot(slot), self._value(value)
        if type(peer) is not Address:
            raise TypeError(f"peer must be an Address, not {type(peer).__name__}")
        immv = eng._imm_value(imm)
        if immv < 0:
            raise TypeError("imm must be an int, not NoneType")
        dest = eng._peer(peer)
        nics = peer._body.nics
        aid = eng._next_id()
        check(lib.afc_watcher_arm_write(self._h, i, v, aid, eng._doorbell_ptr, 0, eng._doorbell[0], dest,
                                        nics[0].doorbell_addr, eng._keybuf(tuple(n.doorbell_key for n in nics)),
                                        len(nics), immv), "arm_notify")
        return self._track(aid, i, None, dest)

    def _track(self, aid: int, slot: int, region: Any, dest: int) -> asyncio.Future[None]:
        eng = self.engine
        fut: asyncio.Future[None] = self._loop.create_future()
        # Pending at the engine from now on: its completion (or the peer's
        # failure) resolves it like any write's; the engine's failure
        # detection watches the peer while the arm waits.
        eng._pending[aid] = (fut, region, dest)
        if region is not None:
            region._inflight += 1
        if eng._ticker is None:
            eng._arm_ticker()
        self._arms[aid] = (slot, fut)
        self._by_fut[fut] = aid
        fut.add_done_callback(functools.partial(self._arm_done, aid))
        return fut

    def _arm_done(self, aid: int, fut: asyncio.Future[None]) -> None:
        entry = self._arms.pop(aid, None)
        if entry is None:
            return
        del self._by_fut[fut]
        if (fut.cancelled() or fut.exception() is not None) and not self._closed:
            # Cancelled, or failed with its peer, before it fired: disarm.
            if lib.afc_watcher_disarm(self._h, entry[0], aid) == 0:
                self._forget(aid)

    def _forget(self, aid: int) -> asyncio.Future[None] | None:
        """The arm is gone natively and never fires: drop the engine's record."""
        eng = self.engine
        entry = eng._pending.pop(aid, None)
        region = entry[1] if entry is not None else eng._orphans.pop(aid, None)
        if region is not None:
            region._inflight -= 1
            if region._closed and region._inflight == 0:
                eng._release_region(region)
        return entry[0] if entry is not None else None

    def disarm(self, fut: asyncio.Future[None]) -> bool:
        """Disarm the transfer ``fut`` belongs to.  True: it had not fired and
        never will (its future is cancelled); False: it fired already (or is
        not this watcher's), and completes as usual."""
        aid = self._by_fut.get(fut)
        if aid is None or self._closed:
            return False
        slot = self._arms[aid][0]
        if lib.afc_watcher_disarm(self._h, slot, aid) != 0:
            return False
        del self._arms[aid], self._by_fut[fut]
        self._forget(aid)
        fut.cancel()
        return True

    def _drain_failed(self) -> None:
        ids, errs = self._fail_ids, self._fail_errs
        while True:
            n = lib.afc_watcher_failed(self._h, ids, errs, _FAIL_BATCH)
            for k in range(n):
                aid, err = int(ids[k]), int(errs[k])
                entry = self._arms.pop(aid, None)
                if entry is not None:
                    del self._by_fut[entry[1]]
                fut = self._forget(aid)
                if fut is not None and not fut.done():
                    if err == lib.FI_ESHUTDOWN:
                        fut.set_exception(ClosedResourceError("engine closed before the armed transfer fired"))
                    else:
                        fut.set_exception(completion_error("armed transfer could not be posted", err, 0,
                                                           strerror(err)))
            if n < _FAIL_BATCH:
                return

    # -- measurement -----------------------------------------------------------

    def trace(self, capacity: int) -> None:
        """Record the timing of the next ``capacity`` fired arms (0 stops):
        :meth:`bump` then stamps each store, and the thread records when it saw
        the slot reach the value and when the submission returned.  For
        benchmarks; costs a clock read per bump and per fired arm."""
        cap = _int("capacity", capacity)
        if not 0 <= cap <= _U32:
            raise ValueError(f"capacity must be between 0 and {_U32}, got {cap}")
        if self._closed:
            raise ClosedResourceError("watcher is closed")
        if cap and self._stamps is None:
            self._stamps = np.zeros(self.slots, dtype=np.uint64)
        stamps = ffi.from_buffer("uint64_t[]", self._stamps) if cap else ffi.NULL
        check(lib.afc_watcher_trace(self._h, stamps, cap), "trace")
        self._cstamps = stamps

    def trace_samples(self) -> np.ndarray:
        """The samples recorded since the last call (a structured array with
        fields bump_ns, seen_ns, posted_ns, value (the slot's, as seen),
        target (the arm's value) and slot), in the order the arms fired."""
        if self._closed:
            return np.zeros(0, dtype=SAMPLE_DTYPE)
        cap = 1 << 16
        buf = ffi.new("struct afc_watch_sample[]", cap)
        parts = []
        while True:
            n = lib.afc_watcher_samples(self._h, buf, cap)
            parts.append(np.frombuffer(ffi.buffer(buf, n * ffi.sizeof("struct afc_watch_sample")),
                                       dtype=SAMPLE_DTYPE).copy())
            if n < cap:
                return np.concatenate(parts)

    def last_bump_ns(self, slot: int) -> int:
        """When :meth:`bump` last stored into ``slot`` while tracing (0 if never)."""
        i = self._slot(slot)
        return 0 if self._stamps is None else int(self._stamps[i])

    # -- lifetime --------------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self._closed

    def statistics(self) -> WatcherStatistics:
        s = ffi.new("struct afc_watch_stats *")
        if not self._closed:
            lib.afc_watcher_stats(self._h, s)
        return WatcherStatistics(
            slots=self.slots, armed=int(s.armed), fired=int(s.fired), failed=int(s.failed),
            changes=int(s.changes), eagain=int(s.eagain), active_slots=int(s.active_slots),
            waiters=sum(len(w) for w in self._waiting.values()), passes=int(s.passes), sleeps=int(s.sleeps))

    def close(self) -> None:
        """Stop watching: arms that have not fired are disarmed and their
        futures fail with ClosedResourceError; waits raise it; watch()
        iterations end after reporting their last change.  Idempotent."""
        self._close("watcher closed before the armed transfer fired")

    def _close(self, why: str) -> None:
        if self._closed:
            return
        self._closed = True
        lib.afc_watcher_detach(self._h)  # the thread no longer looks at it
        self._loop.remove_reader(self._fd)
        self._drain_failed()
        arms = list(self._arms.items())
        self._arms.clear()
        self._by_fut.clear()
        for aid, (slot, fut) in arms:
            if lib.afc_watcher_disarm(self._h, slot, aid) == 0:  # never fired
                self._forget(aid)
                if not fut.done():
                    fut.set_exception(ClosedResourceError(why))
            # else it was submitted: its completion resolves it
        lib.afc_watcher_free(self._h)
        self._h = None
        from . import gpu

        if self.address in gpu._attached:  # page-locked for a GPU producer: unlock before the memory goes
            gpu.detach_watcher(self)
        for waiting in self._waiting.values():
            for fut, _ in waiting:
                if not fut.done():
                    fut.set_result(None)
        watchers = self.engine._slot_watchers
        if watchers is not None:
            watchers.discard(self)

    async def aclose(self) -> None:
        self.close()

    async def __aenter__(self) -> Watcher:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"{len(self._arms)} armed"
        return f"<Watcher {self.slots} slots at {self.address:#x} {state}>"


class SlotChanges:
    """``async for old, new in watcher.watch(slot)``: see :meth:`Watcher.watch`."""

    __slots__ = ("_w", "_slot", "_last")

    def __init__(self, watcher: Watcher, slot: int) -> None:
        self._w = watcher
        self._slot = slot
        self._last = int(lib.afc_slot_load(watcher._base, slot))

    def __aiter__(self) -> SlotChanges:
        return self

    async def __anext__(self) -> tuple[int, int]:
        w, i = self._w, self._slot
        while True:
            v = int(lib.afc_slot_load(w._base, i))
            if v != self._last:
                old, self._last = self._last, v
                return old, v
            if w._closed:
                raise StopAsyncIteration
            await w._changed(i, v)


def shutdown(engine: TransferEngine) -> None:
    """Close the engine's watchers and stop its watcher thread (engine close,
    before the worker stops): arms that have not fired fail with
    ClosedResourceError."""
    watchers = engine._slot_watchers
    if watchers is None:
        return
    for w in list(watchers):
        w._close("engine closed before the armed transfer fired")
    lib.afc_watch_shutdown(engine._h)  # every watcher is freed: it cannot be busy
