"""TransferEngine: the asyncio face of one native worker (one DomainGroup).

Every transfer is posted when the method is called and returns an
``asyncio.Future``; the worker thread reports completions through an eventfd
that the running loop watches (``loop.add_reader``), and this module resolves
the futures in the loop's thread.  Nothing here blocks the loop.
"""
from __future__ import annotations

import asyncio
import itertools
import os
import warnings
import time
from collections import deque
from dataclasses import fields
from typing import Any, Callable

from . import gpu, wire
from ._lib import check, ffi, lib, strerror
from .config import EngineConfig, EngineStatistics, Message
from .counters import ImmCounter
from .errors import BrokenResourceError, ClosedResourceError, ProtocolError, completion_error
from .liveness import host_identity, process_alive, process_start
from .memory import Address, MemoryRegion, RegionDescriptor, RegionView
from .pages import check_pages

__all__ = ["TransferEngine"]

_U32 = (1 << 32) - 1
_OK_BATCH = 1024
_EV_BATCH = 256

#: Engines abandoned at close because their worker was stuck inside the
#: provider: what the stuck thread (or the provider, on the peer's behalf) may
#: still touch is kept here for the life of the process, never freed.
_ABANDONED: list[tuple[Any, ...]] = []


class TransferEngine:
    """One native worker driving a DomainGroup of 1–4 NICs.

    Open it with :func:`open_engine`; use it from the event loop that opened it.
    ``nics`` names the NICs (libfabric domains) in rail order.
    """

    def __init__(self, handle: Any, loop: asyncio.AbstractEventLoop, config: EngineConfig) -> None:
        self._h = handle
        self._loop = loop
        self.config = config
        info = ffi.new("struct afc_info *")
        domains, names, waits = [], [], []
        for r in range(lib.afc_n_rails(handle)):
            lib.afc_get_info(handle, r, info)
            domains.append(ffi.string(info.domain).decode())
            waits.append(bool(info.wait_fd))
            name = ffi.new("char[]", lib.AFC_ADDR_MAX)
            size = ffi.new("size_t *", lib.AFC_ADDR_MAX)
            check(lib.afc_local_addr(handle, r, name, size), "fi_getname")
            names.append(bytes(ffi.buffer(name, size[0])))
        lib.afc_get_info(handle, 0, info)
        self.provider = ffi.string(info.provider).decode()
        self.fabric = ffi.string(info.fabric).decode()
        #: the NICs (libfabric domain names) of this engine's DomainGroup, in rail order
        self.nics: tuple[str, ...] = tuple(domains)
        self.domain = domains[0]
        self.mr_mode = int(info.mr_mode)
        self.blocking_wait = all(waits)
        self._closed = False
        self._next_id = itertools.count(1).__next__
        # id -> (future, source region or None, peer number or -1)
        self._pending: dict[int, tuple[asyncio.Future[None], Any, int]] = {}
        # Failure detection (see _tick): ops whose future failed early but whose
        # native operation is still out (id -> region kept alive), probes in
        # flight (id -> (peer, sent at)), failed peers, waits naming a peer.
        self._orphans: dict[int, Any] = {}
        self._probes: dict[int, tuple[int, float]] = {}
        self._probing: dict[int, int] = {}
        self._failed: dict[int, BrokenResourceError] = {}
        self._watchers: dict[int, list[asyncio.Future[Any]]] = {}
        self._peer_addr: dict[int, Address] = {}
        self._stuck: dict[int, int] = {}
        self._ticker: asyncio.TimerHandle | None = None
        self._tick_s = max(0.05, config.peer_timeout / 6)
        self._peers: dict[Address, int] = {}
        self._keybufs: dict[tuple[int, ...], Any] = {}
        self._counters: dict[int, ImmCounter] = {}
        self._messages: deque[Message] = deque()
        self._recv_waiters: deque[tuple[asyncio.Future[Message], Address | None]] = deque()
        self._send_backlog: deque[tuple[int, bytes, int, bytes]] = deque()
        # Strong references: a registered buffer must outlive its registration
        # even if the caller drops the region object without closing it.
        self._regions: set[MemoryRegion] = set()
        self._gpu: gpu.GpuPath | None = None  # the NVLink path, made on first use
        self._remote_errors = 0
        self._expecting = 0
        self._polling = False
        self._last_activity = 0.0
        self._spin_s = config.loop_spin_us / 1e6
        self._ok = ffi.new("uint64_t[]", _OK_BATCH)
        self._ev = ffi.new("struct afc_event[]", _EV_BATCH)
        self._nev = ffi.new("int *")
        # The doorbell: a tiny region notifies write zero bytes into.
        self._doorbell_buf = bytearray(64)
        incarnation = ffi.new("uint64_t *")
        check(lib.afc_random_u64(incarnation), "getrandom")
        db_cdata = ffi.from_buffer(self._doorbell_buf, require_writable=True)
        self._doorbell = self._register_raw(db_cdata, 64, lib.FI_REMOTE_WRITE | lib.FI_WRITE)
        db_mr, db_keys, db_base = self._doorbell
        self._doorbell_ptr = int(ffi.cast("uintptr_t", db_cdata))
        self._doorbell_cdata = db_cdata
        self.address = Address(
            wire.AddressBody(self.provider, incarnation[0],
                             tuple(wire.NicAddress(n, db_base, k) for n, k in zip(names, db_keys)),
                             config.msg_size, host_identity(), os.getpid(), max(0, process_start(os.getpid())))
        )
        self._msg_header = wire.encode_msg_header(self.address.to_bytes())
        self._credit_header = wire.encode_credit_header(self.address.to_bytes())
        self.max_message_size = config.msg_size - len(self._msg_header)
        self._fd = lib.afc_event_fd(handle)
        loop.add_reader(self._fd, self._on_events)

    # -- memory -------------------------------------------------------------

    def _register_raw(self, cdata: Any, nbytes: int, access: int) -> tuple[Any, tuple[int, ...], int]:
        """Register on every NIC: (handle, one key per NIC, remote base address)."""
        out = ffi.new("afc_mr **")
        keys = ffi.new("uint64_t[]", lib.AFC_MAX_RAILS)
        base = ffi.new("uint64_t *")
        check(lib.afc_mr_reg(self._h, cdata, nbytes, access, out, keys, base), f"register({nbytes} bytes)")
        return out[0], tuple(int(k) for k in keys[0 : len(self.nics)]), int(base[0])

    def register(self, buf: Any, *, remote_write: bool = True, remote_read: bool = False) -> MemoryRegion:
        """Register a buffer-protocol object (bytearray, mmap, numpy array, ...).

        Read-only buffers (``bytes``) can only be registered for local use, as
        the source of writes.  Raises TypeError for objects without a
        contiguous buffer, ValueError for empty or read-only-but-remote-writable
        buffers, RegistrationError when the provider refuses (the message says
        how to raise the locked-memory limit when that is the cause).
        """
        self._check_open()
        cuda = gpu.cuda_buffer(buf)
        if cuda is not None:
            return self._register_gpu(buf, cuda, bool(remote_write), bool(remote_read))
        try:
            cdata = ffi.from_buffer(buf, require_writable=True)
            readonly = False
        except (TypeError, BufferError, ValueError):
            try:
                cdata = ffi.from_buffer(buf)
            except (TypeError, BufferError, ValueError):
                raise TypeError(
                    f"register() needs a C-contiguous buffer-protocol object, not {type(buf).__name__}"
                ) from None
            readonly = True
        nbytes = len(cdata)
        if nbytes == 0:
            raise ValueError("cannot register an empty buffer")
        if readonly and (remote_write or remote_read):
            raise ValueError(
                "read-only buffer: register it with remote_write=False (it can only be a write source)"
            )
        access = lib.FI_WRITE | lib.FI_READ | lib.FI_SEND | lib.FI_RECV
        if remote_write:
            access |= lib.FI_REMOTE_WRITE
        if remote_read:
            access |= lib.FI_REMOTE_READ
        ptr = int(ffi.cast("uintptr_t", cdata))
        region = MemoryRegion(self, buf, cdata, ptr, nbytes, readonly, bool(remote_write), bool(remote_read))
        region._mr, region._keys, base = self._register_raw(cdata, nbytes, access)
        region._remote_base = base
        self._regions.add(region)
        return region

    def _register_gpu(self, buf: Any, cuda: gpu.CudaBuffer, remote_write: bool,
                      remote_read: bool) -> MemoryRegion:
        """GPU memory: no libfabric registration here (no FI_HMEM in this
        libfabric); peers on this host write it over NVLink through the CUDA
        IPC handle its descriptor carries."""
        region = MemoryRegion(self, buf, cuda.keep, cuda.ptr, cuda.nbytes, False, remote_write, remote_read)
        region.device = cuda.device
        region._keys = (0,) * len(self.nics)
        region._remote_base = cuda.ptr
        if remote_write or remote_read:
            h = gpu.gpu_handle(cuda)
            region._gpu = wire.GpuBody(h.device, h.ipc, h.base)
        self._regions.add(region)
        return region

    def _gpu_path(self) -> gpu.GpuPath:
        if self._gpu is None:
            self._gpu = gpu.GpuPath(self)
        return self._gpu

    def _release_region(self, region: MemoryRegion, strict: bool = False) -> None:
        """Deregister a closed region once nothing is in flight from it.  When
        the worker is stuck in the provider the region stays registered (and
        referenced) until the engine closes; ``strict`` (region.close()) then
        raises ProviderStuckError, the completion paths stay quiet."""
        if region._inflight == 0 and region._mr is not None and not self._closed:
            rc = lib.afc_mr_close(region._mr)
            if rc == -lib.AFC_EWEDGED:
                if strict:
                    check(rc, "deregister")
                return
            region._mr = None
            self._regions.discard(region)
            check(rc, "fi_close(mr)")

    # -- addressing ---------------------------------------------------------

    def _peer(self, owner: Address) -> int:
        """The native peer number of ``owner`` (inserting its NICs' addresses
        into ours on first use)."""
        p = self._peers.get(owner)
        if p is None:
            if owner.provider != self.provider:
                raise ValueError(f"peer uses provider {owner.provider!r}, this engine {self.provider!r}")
            names = [nic.name for nic in owner._body.nics]
            out = ffi.new("uint32_t *")
            rc = lib.afc_peer_add(self._h, b"".join(names), [len(n) for n in names], len(names), out)
            if rc == -lib.AFC_EWEDGED:
                check(rc, "adding a peer")
            if rc == -lib.FI_ENOSPC:
                raise ValueError(f"more than max_peers={self.config.max_peers} peers")
            if rc < 0:
                raise ProtocolError(f"peer address rejected by {self.provider}: {strerror(-rc)}")
            p = self._peers[owner] = int(out[0])
            self._peer_addr[p] = owner
        if self._failed and p in self._failed:
            raise self._failed[p]
        return p

    def _keybuf(self, keys: tuple[int, ...]) -> Any:
        """The C array of a descriptor's keys (cached: writes reuse descriptors)."""
        kb = self._keybufs.get(keys)
        if kb is None:
            if len(self._keybufs) >= 1 << 16:
                self._keybufs.clear()
            kb = self._keybufs[keys] = ffi.new("uint64_t[]", keys)
        return kb

    def paths(self, peer: Address) -> int:
        """How many NIC paths lead to ``peer``: max(our NICs, its NICs).  A
        striped write or paged write is spread over these."""
        if type(peer) is not Address:
            raise TypeError(f"peer must be an Address, not {type(peer).__name__}")
        self._check_open()
        return int(lib.afc_peer_paths(self._h, self._peer(peer)))

    # -- transfers ----------------------------------------------------------

    def write(self, src: MemoryRegion | RegionView, dst: RegionDescriptor, *, imm: int | None = None) -> asyncio.Future[None]:
        """Write ``src`` into the peer's ``dst`` (same length), one-sided.

        Posted before it returns.  The future resolves at local completion;
        the target learns of arrival only from ``imm`` (counted by its
        ImmCounter).  Raises TypeError/ValueError on bad arguments (nothing is
        posted), ClosedResourceError if the engine or region is closed; the
        future fails with CompletionError/RemoteAccessError/BrokenResourceError.
        Cancelling the future abandons the wait, not the transfer.
        """
        # The hot path: the checks of _check_write, inlined (each call costs).
        if self._closed:
            raise ClosedResourceError("engine is closed")
        t = type(src)
        if t is RegionView:
            region = src.region
            off = src.offset
        elif t is MemoryRegion:
            region = src
            off = 0
        else:
            raise TypeError(f"src must be a MemoryRegion or a slice of one, not {t.__name__}")
        if type(dst) is not RegionDescriptor:
            raise TypeError(f"dst must be a RegionDescriptor, not {type(dst).__name__}")
        n = src.nbytes
        if n != dst.nbytes:
            raise ValueError(f"src has {n} bytes but dst has {dst.nbytes}")
        if region.engine is not self:
            raise ValueError("src is registered with another engine")
        if region._closed:
            raise ClosedResourceError("src region is closed")
        if imm is None:
            v = -1
        elif type(imm) is int and 0 <= imm <= _U32:
            v = imm
        else:
            raise _bad_imm(imm)
        if region.device is not None or dst.gpu is not None:
            return self._gpu_path().write(region, off, n, dst, v)
        dest = self._peers.get(dst.owner)
        if dest is None or self._failed:
            dest = self._peer(dst.owner)
        kb = self._keybufs.get(dst.keys)
        if kb is None:
            kb = self._keybuf(dst.keys)
        i = self._next_id()
        rc = lib.afc_write(self._h, i, region._ptr + off, n, region._mr, dest, dst.addr, kb, v)
        if rc:
            check(rc, "write")
        fut = self._loop.create_future()
        self._pending[i] = (fut, region, dest)
        region._inflight += 1
        if self._ticker is None:
            self._arm_ticker()
        return fut

    def write_pages(self, src: MemoryRegion | RegionView, dst: RegionDescriptor, page_size: int,
                    src_pages: Any, dst_pages: Any, *, src_stride: int | None = None,
                    dst_stride: int | None = None, imm: int | None = None) -> asyncio.Future[None]:
        """Write many pages in one call: page k copies ``page_size`` bytes from
        ``src`` at ``src_stride * src_pages[k]`` to ``dst`` at
        ``dst_stride * dst_pages[k]`` (strides default to ``page_size``).

        The native core posts every page; Python never loops over them. Every
        index is checked against both ranges first (TypeError/ValueError,
        nothing posted). ``imm`` is delivered **once per page**. The future
        resolves when every page has completed locally, or fails with the
        first page's error. An empty page list resolves at once.
        """
        region, off, v, page, sstride, dstride, sidx, didx = self._pages_args(
            src, dst, page_size, src_pages, dst_pages, src_stride, dst_stride, imm)
        if len(sidx) and (region.device is not None or dst.gpu is not None):
            return self._gpu_path().write_pages(region, off, dst, page, sstride, dstride, sidx, didx, v)
        fut = self._loop.create_future()
        if len(sidx) == 0:
            fut.set_result(None)
            return fut
        dest = self._peer(dst.owner)
        i = self._next_id()
        check(lib.afc_write_pages(
            self._h, i, region._ptr + off, region._mr, dest, dst.addr, self._keybuf(dst.keys), page, sstride,
            dstride,
            ffi.from_buffer("int64_t[]", sidx), ffi.from_buffer("int64_t[]", didx), len(sidx), v), "write_pages")
        self._pending[i] = (fut, region, dest)
        region._inflight += 1
        if self._ticker is None:
            self._arm_ticker()
        return fut

    def _pages_args(self, src: Any, dst: Any, page_size: Any, src_pages: Any, dst_pages: Any, src_stride: Any,
                    dst_stride: Any, imm: Any) -> tuple[MemoryRegion, int, int, int, int, int, Any, Any]:
        """The checks of a paged write (shared with Watcher.arm_pages):
        (region, offset, imm value, page, src stride, dst stride, src indices, dst indices)."""
        region, off = self._src(src)
        if type(dst) is not RegionDescriptor:
            raise TypeError(f"dst must be a RegionDescriptor, not {type(dst).__name__}")
        v = self._imm_value(imm)
        page, sstride, dstride, sidx, didx = check_pages(
            page_size, src_pages, dst_pages, src_stride, dst_stride, src.nbytes, dst.nbytes)
        return region, off, v, page, sstride, dstride, sidx, didx

    def scatter(self, pairs: Any, *, imm: int | None = None) -> asyncio.Future[list[None]]:
        """One write per ``(src, dst)`` pair, to any number of peers; every pair
        is validated before the first is posted. ``imm`` is delivered once per
        pair (at that pair's target). The future resolves when all complete."""
        pairs = list(pairs)
        for k, pair in enumerate(pairs):
            if not isinstance(pair, tuple) or len(pair) != 2:
                raise TypeError(f"pairs[{k}] must be a (src, dst) tuple")
            self._check_write(*pair, imm)
            self._peer(pair[1].owner)
        return asyncio.gather(*(self.write(s, d, imm=imm) for s, d in pairs))

    def barrier(self, peers: Any, imm: int) -> asyncio.Future[list[None]]:
        """Notify every peer in ``peers`` with ``imm`` (one immediate each); all
        are validated before the first is posted."""
        peers = list(peers)
        self._imm_value(imm)
        for k, p in enumerate(peers):
            if type(p) is not Address:
                raise TypeError(f"peers[{k}] must be an Address, not {type(p).__name__}")
            self._peer(p)
        return asyncio.gather(*(self.notify(p, imm) for p in peers))

    def _src(self, src: Any) -> tuple[MemoryRegion, int]:
        if self._closed:
            raise ClosedResourceError("engine is closed")
        t = type(src)
        if t is RegionView:
            region, off = src.region, src.offset
        elif t is MemoryRegion:
            region, off = src, 0
        else:
            raise TypeError(f"src must be a MemoryRegion or a slice of one, not {t.__name__}")
        if region.engine is not self:
            raise ValueError("src is registered with another engine")
        if region._closed:
            raise ClosedResourceError("src region is closed")
        return region, off

    @staticmethod
    def _imm_value(imm: Any) -> int:
        if imm is None:
            return -1
        if type(imm) is int and 0 <= imm <= _U32:
            return imm
        raise _bad_imm(imm)

    def _check_write(self, src: Any, dst: Any, imm: Any) -> tuple[MemoryRegion, int, int]:
        region, off = self._src(src)
        if type(dst) is not RegionDescriptor:
            raise TypeError(f"dst must be a RegionDescriptor, not {type(dst).__name__}")
        if src.nbytes != dst.nbytes:
            raise ValueError(f"src has {src.nbytes} bytes but dst has {dst.nbytes}")
        return region, off, self._imm_value(imm)

    def notify(self, peer: Address, imm: int) -> asyncio.Future[None]:
        """Deliver one immediate to ``peer`` (a zero-byte write to its doorbell)."""
        if self._closed:
            raise ClosedResourceError("engine is closed")
        if type(peer) is not Address:
            raise TypeError(f"peer must be an Address, not {type(peer).__name__}")
        if type(imm) is not int or not 0 <= imm <= _U32:
            raise _bad_imm(imm)
        nics = peer._body.nics
        dest = self._peers.get(peer)
        if dest is None or self._failed:
            dest = self._peer(peer)
        i = self._next_id()
        check(lib.afc_write(self._h, i, self._doorbell_ptr, 0, self._doorbell[0], dest, nics[0].doorbell_addr,
                            self._keybuf(tuple(n.doorbell_key for n in nics)), imm), "notify")
        fut = self._loop.create_future()
        self._pending[i] = (fut, None, dest)
        if self._ticker is None:
            self._arm_ticker()
        return fut

    def send(self, peer: Address, data: bytes | bytearray | memoryview) -> asyncio.Future[None]:
        """Send a message (at most ``max_message_size`` bytes) to ``peer``'s
        :meth:`recv`.  The data is copied before this returns."""
        if self._closed:
            raise ClosedResourceError("engine is closed")
        if type(peer) is not Address:
            raise TypeError(f"peer must be an Address, not {type(peer).__name__}")
        data = bytes(memoryview(data))
        limit = min(self.max_message_size, peer._body.max_frame - len(self._msg_header))
        if len(data) > limit:
            raise ValueError(
                f"message of {len(data)} bytes exceeds the limit of {limit} (max_message_size here "
                f"{self.max_message_size}, the peer receives frames of up to {peer._body.max_frame}); "
                "write large payloads into a registered region instead"
            )
        return self._message(peer, data, self._msg_header)

    def _credit(self, peer: Address, imm: int, count: int) -> asyncio.Future[None]:
        """Deliver ``count`` immediates of value ``imm`` to ``peer`` in one
        message (the NVLink path's way to keep "one immediate per page")."""
        return self._message(peer, wire.encode_credit(imm, count), self._credit_header)

    def _message(self, peer: Address, data: bytes, hdr: bytes) -> asyncio.Future[None]:
        """Post (or queue behind earlier ones) one message frame to ``peer``."""
        dest = self._peer(peer)
        i = self._next_id()
        fut = self._loop.create_future()
        self._pending[i] = (fut, None, dest)
        if self._ticker is None:
            self._arm_ticker()
        if self._send_backlog or not self._post_send(i, data, dest, hdr):
            self._send_backlog.append((i, data, dest, hdr))
        return fut

    def _post_send(self, i: int, data: bytes, dest: int, hdr: bytes) -> bool:
        rc = lib.afc_send(self._h, i, hdr, len(hdr), data, len(data), dest)
        if rc == -lib.FI_EAGAIN:
            return False
        if rc:
            fut, _, _ = self._pending.pop(i)
            fut.set_exception(completion_error("send", -rc, 0, strerror(-rc)))
        return True

    async def recv(self, peer: Address | None = None) -> Message:
        """The next message from any peer, or only from ``peer``.

        Naming a peer also watches it: if it fails (see ``peer_timeout``) the
        call raises BrokenResourceError.  Cancelling loses no message.
        """
        if peer is not None and type(peer) is not Address:
            raise TypeError(f"peer must be an Address or None, not {type(peer).__name__}")
        for k, msg in enumerate(self._messages):
            if peer is None or msg.sender == peer:
                del self._messages[k]
                return msg
        self._check_open()
        fut: asyncio.Future[Message] = self._loop.create_future()
        unwatch = self._watch(peer, fut) if peer is not None else None
        entry = (fut, peer)
        self._recv_waiters.append(entry)
        self._expect(1)
        try:
            return await fut
        except BaseException:
            if fut.done() and not fut.cancelled() and fut.exception() is None:
                self._messages.appendleft(fut.result())  # delivered, then cancelled: keep it
            else:
                try:
                    self._recv_waiters.remove(entry)
                except ValueError:
                    pass
            raise
        finally:
            self._expect(-1)
            if unwatch is not None:
                unwatch()

    def _expect(self, delta: int) -> None:
        if not self._closed:
            self._expecting += delta
            lib.afc_expect(self._h, delta)  # the worker polls longer for us
            if delta > 0 and self._spin_s and not self._polling:
                self._start_polling()

    def _start_polling(self) -> None:
        self._polling = True
        self._last_activity = time.monotonic()
        self._loop.call_soon(self._poll)

    def _poll(self) -> None:
        if self._closed:
            self._polling = False
            return
        now = time.monotonic()
        lib.afc_progress(self._h)
        if self._on_events():
            self._last_activity = now
        if self._expecting and now - self._last_activity < self._spin_s:
            self._loop.call_soon(self._poll)
        else:
            self._polling = False

    def imm_counter(self, imm: int) -> ImmCounter:
        """The counter of immediate value ``imm`` (one object per value; arrivals
        before this call are already counted)."""
        if type(imm) is not int or not 0 <= imm <= _U32:
            raise _bad_imm(imm)
        c = self._counters.get(imm)
        if c is None:
            c = self._counters[imm] = ImmCounter(imm, self._loop, self._expect, self._watch)
            if self._closed:
                c._close(ClosedResourceError("engine is closed"))
        return c

    # -- watcher (aiofabric/watcher.py) ---------------------------------------

    _slot_watchers: set[Any] | None = None  # this engine's open Watchers, once it has one

    def watcher(self, slots: int = 64, *, poll_ns: int | None = None) -> Any:
        """A :class:`~aiofabric.Watcher`: ``slots`` 64-bit values in page-aligned
        memory that a producer raises, polled by the engine's native watcher
        thread (every ``poll_ns`` nanoseconds while something is armed or
        awaited; it blocks otherwise), which fires transfers pre-armed on them.
        Raises TypeError/ValueError on bad arguments, ClosedResourceError when
        the engine is closed.  See docs/watcher.md."""
        from .watcher import Watcher

        self._check_open()
        w = Watcher(self, slots, poll_ns)
        if self._slot_watchers is None:
            self._slot_watchers = set()
        self._slot_watchers.add(w)
        return w

    # -- completions --------------------------------------------------------

    def _on_events(self) -> int:
        h, ok, ev, nev = self._h, self._ok, self._ev, self._nev
        pending = self._pending
        total = 0
        while True:
            n = lib.afc_drain(h, ok, _OK_BATCH, ev, _EV_BATCH, nev)
            total += n + nev[0]
            if n:
                for i in ffi.unpack(ok, n):
                    entry = pending.pop(i, None)
                    if entry is None:
                        self._on_orphan(i, None)
                        continue
                    fut, region, _ = entry
                    if region is not None:
                        region._inflight -= 1
                        if region._closed and region._inflight == 0:
                            self._release_region(region)
                    if not fut.done():
                        fut.set_result(None)
            ne = nev[0]
            for j in range(ne):
                self._on_event(ev[j])
            if n < _OK_BATCH and ne < _EV_BATCH:
                break
        while self._send_backlog:
            i, data, dest, hdr = self._send_backlog[0]
            if not self._post_send(i, data, dest, hdr):
                break
            self._send_backlog.popleft()
        return total

    def _on_event(self, e: Any) -> None:
        kind = e.kind
        if kind == lib.AFC_EV_IMM:
            v = int(e.data)
            c = self._counters.get(v)
            if c is None:
                c = self._counters[v] = ImmCounter(v, self._loop, self._expect, self._watch)
            c._add(int(e.aux))
        elif kind == lib.AFC_EV_RECV:
            self._on_message(int(e.id), int(e.data))
        elif kind == lib.AFC_EV_ERROR:
            exc = completion_error("transfer failed", e.err, int(ffi.cast("int64_t", e.data)), strerror(e.err))
            i = int(e.id)
            entry = self._pending.pop(i, None)
            if entry is None:
                self._on_orphan(i, exc)
                return
            fut, region, peer = entry
            if region is not None:
                region._inflight -= 1
                if region._closed and region._inflight == 0:
                    self._release_region(region)
            if peer >= 0 and peer in self._failed:
                exc = self._failed[peer]
            if not fut.done():
                fut.set_exception(exc)
            if isinstance(exc, BrokenResourceError) and peer >= 0 and peer not in self._failed:
                self._fail_peer(peer, str(exc))
        elif kind == lib.AFC_EV_RERROR:
            self._remote_errors += 1

    def _on_message(self, slot: int, length: int) -> None:
        frame = bytes(ffi.buffer(lib.afc_recv_buf(self._h, slot), length))
        check(lib.afc_recv_release(self._h, slot), "repost receive")
        try:
            credit = wire.decode_credit(frame)
            if credit is not None:
                _, imm, count = credit
                c = self._counters.get(imm)
                if c is None:
                    c = self._counters[imm] = ImmCounter(imm, self._loop, self._expect, self._watch)
                c._add(count)
                return
            sender_bytes, off = wire.decode_msg_header(frame)
            msg = Message(Address.from_bytes(sender_bytes), frame[off:])
        except ProtocolError:
            self._remote_errors += 1  # a malformed frame is dropped, never delivered
            return
        for k, (fut, want) in enumerate(self._recv_waiters):
            if fut.done() or (want is not None and want != msg.sender):
                continue
            del self._recv_waiters[k]
            fut.set_result(msg)
            return
        self._messages.append(msg)

    # -- peer failure detection ----------------------------------------------
    #
    # Nothing here costs anything while all is well: the ticker runs only while
    # operations are pending or waits name a peer, and looks at the oldest
    # pending operation per peer once per tick (peer_timeout / 6).  A peer is
    # declared failed when (1) an operation to it fails with a connection
    # error, (2) it runs on this host and its process has exited, or (3) its
    # oldest operation made no progress for a tick and a zero-byte probe
    # write is not answered within peer_timeout.  See docs/failures.md.

    def _arm_ticker(self) -> None:
        if not self._closed and self.config.peer_timeout != float("inf"):
            self._ticker = self._loop.call_later(self._tick_s, self._tick)

    def _tick(self) -> None:
        self._ticker = None
        if self._closed:
            return
        now = self._loop.time()
        oldest: dict[int, int] = {}
        for i, entry in self._pending.items():  # ids ascend: the first per peer is its oldest
            peer = entry[2]
            if peer >= 0 and peer not in oldest:
                oldest[peer] = i
        me = self.address._body
        for peer in set(oldest) | set(self._watchers):
            if peer in self._failed:
                continue
            body = self._peer_addr[peer]._body
            if body.host and body.host == me.host and not process_alive(body.pid, body.pstart):
                self._fail_peer(peer, f"its process {body.pid} on this host has exited")
                continue
            probe = self._probing.get(peer)
            if probe is not None:
                if now - self._probes[probe][1] > self.config.peer_timeout:
                    self._fail_peer(peer, f"no answer to a probe within peer_timeout={self.config.peer_timeout:g} s")
            elif peer in self._watchers or self._stuck.get(peer) == oldest.get(peer):
                self._probe(peer, now)
        self._stuck = oldest
        if self._pending or self._watchers or self._probes:
            self._arm_ticker()

    def _probe(self, peer: int, now: float) -> None:
        """A zero-byte write without an immediate into the peer's doorbell:
        its completion proves the peer's NIC and provider still answer."""
        nics = self._peer_addr[peer]._body.nics
        i = self._next_id()
        rc = lib.afc_write(self._h, i, self._doorbell_ptr, 0, self._doorbell[0], peer, nics[0].doorbell_addr,
                           self._keybuf(tuple(n.doorbell_key for n in nics)), -1)
        if rc == 0:
            self._probes[i] = (peer, now)
            self._probing[peer] = i

    def _on_orphan(self, i: int, exc: BaseException | None) -> None:
        """The completion of a probe, or of an operation whose future already
        failed with its peer."""
        probe = self._probes.pop(i, None)
        if probe is not None:
            peer = probe[0]
            self._probing.pop(peer, None)
            if exc is not None and peer not in self._failed:
                self._fail_peer(peer, f"a probe failed: {exc}")
            return
        region = self._orphans.pop(i, None)
        if region is not None:
            region._inflight -= 1
            if region._closed and region._inflight == 0:
                self._release_region(region)

    def _fail_peer(self, peer: int, reason: str) -> None:
        addr = self._peer_addr[peer]
        exc = BrokenResourceError(f"peer {addr!r} failed: {reason}")
        self._failed[peer] = exc
        # Queued work to it never reaches the provider.  Never waits: the
        # worker may be stuck in the provider on this very peer.
        lib.afc_peer_fail(self._h, peer, lib.FI_EHOSTUNREACH)
        for i in [i for i, entry in self._pending.items() if entry[2] == peer]:
            fut, region, _ = self._pending.pop(i)
            if region is not None:
                self._orphans[i] = region  # its buffer stays registered until the real completion
            if not fut.done():
                fut.set_exception(exc)
        for fut in self._watchers.pop(peer, ()):
            if not fut.done():
                fut.set_exception(exc)

    def _watch(self, peer: Address, fut: asyncio.Future[Any]) -> Callable[[], None]:
        """Fail ``fut`` if ``peer`` fails; returns the function that stops watching."""
        if type(peer) is not Address:
            raise TypeError(f"peer must be an Address, not {type(peer).__name__}")
        self._check_open()
        p = self._peer(peer)  # raises BrokenResourceError if it already failed
        self._watchers.setdefault(p, []).append(fut)
        if self._ticker is None:
            self._arm_ticker()

        def unwatch() -> None:
            futs = self._watchers.get(p)
            if futs is not None:
                try:
                    futs.remove(fut)
                except ValueError:
                    pass
                if not futs:
                    del self._watchers[p]

        return unwatch

    def peer_failed(self, peer: Address) -> BrokenResourceError | None:
        """The error ``peer`` failed with, or None while it is not known to have failed."""
        p = self._peers.get(peer)
        return None if p is None else self._failed.get(p)

    # -- lifetime -----------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise ClosedResourceError("engine is closed")

    @property
    def closed(self) -> bool:
        return self._closed

    def statistics(self) -> EngineStatistics:
        s = ffi.new("struct afc_stats *")
        if not self._closed:  # takes no lock: prompt even while the worker is stuck
            lib.afc_get_stats(self._h, s)
        vals = {f.name: int(getattr(s, f.name)) for f in fields(EngineStatistics) if hasattr(s, f.name)}
        return EngineStatistics(
            provider=self.provider,
            bytes_per_nic=tuple(int(s.rail_bytes[r]) for r in range(len(self.nics))),
            queued=int(s.sq_depth) + len(self._send_backlog),
            pending_futures=len(self._pending),
            failed_peers=len(self._failed),
            regions=len(self._regions),
            messages_waiting=len(self._messages),
            **{**vals, "fence_unconfirmed": bool(s.fence_unconfirmed)},
        )

    async def aclose(self) -> None:
        """Close: refuse new work, let operations in flight finish for up to
        ``config.close_timeout`` seconds, then fail whatever is still pending
        (futures, counter waits, recv) with ClosedResourceError, deregister
        every region and release the provider's resources.  Idempotent;
        cancelling it skips the graceful wait, not the release."""
        if self._closed:
            return
        self._closed = True  # no new work from here on
        if self._slot_watchers is not None:  # the watcher thread stops first: no arm fires from here on
            from .watcher import shutdown

            shutdown(self)
        try:
            # Graceful part: let operations in flight finish normally (their
            # futures succeed), bounded by close_timeout.  Some providers
            # (libfabric 1.17 shm) crash a peer when an endpoint closes under
            # work in flight, so this is not merely cosmetic.
            deadline = self._loop.time() + self.config.close_timeout
            while (self._pending or (self._gpu and self._gpu.pending)) and self._loop.time() < deadline:
                await asyncio.sleep(0.001)
        finally:
            self._hard_close()

    def _hard_close(self) -> None:
        self._loop.remove_reader(self._fd)
        if self._gpu is not None:
            self._gpu.close()  # waits for device copies, unmaps peer allocations
            for fut in list(self._gpu.pending):
                self._gpu._finish(fut, ClosedResourceError("engine closed with the operation in flight"))
        self._stop_worker()  # nothing touches buffers after this (or the engine is abandoned)
        exc = ClosedResourceError("engine closed with the operation in flight")
        for fut, _, _ in self._pending.values():
            if not fut.done():
                fut.set_exception(exc)
        self._pending.clear()
        self._orphans.clear()
        self._probes.clear()
        if self._ticker is not None:
            self._ticker.cancel()
            self._ticker = None
        self._send_backlog.clear()
        for c in self._counters.values():
            c._close(ClosedResourceError("engine is closed"))
        while self._recv_waiters:
            fut, _ = self._recv_waiters.popleft()
            if not fut.done():
                fut.set_exception(ClosedResourceError("engine is closed"))
        self._release_native()

    def _stop_worker(self) -> bool:
        """Stop the worker, waiting at most lock_timeout.  False when it is
        stuck inside the provider: the engine is then abandoned."""
        if self._h is None:
            return False
        ms = max(1, round(self.config.lock_timeout * 1000))
        if lib.afc_stop(self._h, ms) == -lib.AFC_EWEDGED:
            self._abandon()
            return False
        return True

    def _abandon(self) -> None:
        """The worker did not stop: it may return from the provider some day
        and use the native engine, and the provider may still write into our
        registered buffers.  Leak all of it on purpose, and say so once."""
        _ABANDONED.append((self._h, self._doorbell, self._doorbell_buf, self._doorbell_cdata, list(self._regions)))
        for region in self._regions:
            region._closed = True
            region._mr = None  # never deregistered: it stays valid for the stuck thread
        self._regions.clear()
        self._h = None
        warnings.warn(
            f"{self!r}: its worker thread is stuck inside the provider and did not stop within "
            f"lock_timeout={self.config.lock_timeout:g} s; the engine is abandoned (its thread, memory, "
            "registered buffers and provider objects are leaked on purpose)",
            RuntimeWarning, stacklevel=2,
        )

    def _release_native(self) -> None:
        """Deregister everything and free the native engine (no event-loop calls)."""
        if not self._stop_worker():
            return
        for region in list(self._regions):
            region._closed = True
            if region._mr is not None:
                lib.afc_mr_close(region._mr)
                region._mr = None
        self._regions.clear()
        lib.afc_mr_close(self._doorbell[0])
        lib.afc_close(self._h)
        self._h = None

    def _debug_wedge(self, ms: int) -> None:
        """Test hook: the worker holds the provider lock for ``ms`` milliseconds
        (1 to 600000) from its next pass, as if stuck inside a provider call;
        0 ends a hold early."""
        if type(ms) is not int or not 0 <= ms <= 600_000:
            raise ValueError(f"ms must be an int from 0 to 600000, got {ms!r}")
        if self._h is None:
            raise ClosedResourceError("engine is closed")
        check(lib.afc_debug_wedge(self._h, ms), "debug wedge")

    def __del__(self) -> None:
        # Dropped without aclose() (its loop has ended, or it would still be
        # reachable through the loop's reader): free the worker thread, the
        # fds and the registrations now, then say so.
        if getattr(self, "_h", None) is None:
            return
        self._closed = True
        self._release_native()
        warnings.warn(f"unclosed {self!r}: use 'async with open_engine(...)' or 'await engine.aclose()'",
                      ResourceWarning, source=self, stacklevel=1)

    async def __aenter__(self) -> TransferEngine:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"<TransferEngine {self.provider} {'+'.join(self.nics)} {state}>"




def _bad_imm(imm: object) -> Exception:
    if type(imm) is not int:
        return TypeError(f"imm must be an int, not {type(imm).__name__}")
    return ValueError(f"imm must be an unsigned 32-bit value, got {imm}")
