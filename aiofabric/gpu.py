"""GPU memory: CUDA buffers as regions, and the NVLink path between the GPUs
of one host.

A CUDA buffer (a CuPy array, a torch tensor, anything with
``__cuda_array_interface__`` or a CUDA ``__dlpack__``) registers as a region
whose descriptor carries a CUDA IPC handle and the owner's host identity.
A write whose target is such a descriptor on the same host is a device copy:
the copy engine for a single write, one kernel for a page list; the write's
immediate is posted (as a notify over the fabric) only once the copy has
completed on the device, so a counter that ticks means the bytes are there.

Across hosts GPU memory would need libfabric's FI_HMEM (CUDA) support, which
the providers of Debian's libfabric lack: such writes raise
UnavailableError.  CuPy is optional (``pip install 'aiofabric[gpu]'``); the
module imports without it.
"""
from __future__ import annotations

import asyncio
import ctypes
import functools
import os
import time
from collections import deque
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from .errors import FabricError, UnavailableError

if TYPE_CHECKING:
    from .engine import TransferEngine
    from .memory import MemoryRegion, RegionDescriptor

__all__ = ["CudaBuffer", "GpuHandle", "GpuPath", "cuda_buffer"]

_KDL_CUDA = 2
_IPC_HANDLE_BYTES = 64
_COPY_PAGES = r"""
/* One warp copies one 4 KiB chunk of one page per step: every lane keeps eight
 * 16-byte loads in flight before its stores, whatever the page size, so small
 * pages get the same memory-level parallelism as large ones.  The arguments
 * and both index lists are one buffer (see PageLauncher.pack), read from
 * pinned host memory or from a device copy: one launch parameter. */
extern "C" __global__ void copy_pages(const long long* __restrict__ args)
{
    const char* src = (const char*)args[0];
    char* dst = (char*)args[1];
    const long long n = args[2], page = args[3], sstride = args[4], dstride = args[5];
    const long long* sidx = args + 8;
    const long long* didx = args + 8 + n;
    const int lane = threadIdx.x & 31;
    const long long warp = ((long long)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    const long long warps = ((long long)gridDim.x * blockDim.x) >> 5;
    const long long per = (page + 4095) >> 12;  /* chunks per page */
    const long long units = n * per;
    for (long long u = warp; u < units; u += warps) {
        const long long p = u / per;
        const long long lo = (u - p * per) << 12;
        const long long len = page - lo < 4096 ? page - lo : 4096;
        const char* s = src + sidx[p] * sstride + lo;
        char* d = dst + didx[p] * dstride + lo;
        if ((((unsigned long long)s | (unsigned long long)d | (unsigned long long)len) & 15) == 0) {
            const uint4* s4 = (const uint4*)s;
            uint4* d4 = (uint4*)d;
            const int nv = (int)(len >> 4);
            uint4 r[8];
#pragma unroll
            for (int j = 0; j < 8; j++)
                if (lane + 32 * j < nv) r[j] = s4[lane + 32 * j];
#pragma unroll
            for (int j = 0; j < 8; j++)
                if (lane + 32 * j < nv) d4[lane + 32 * j] = r[j];
        } else {
            for (long long i = lane; i < len; i += 32)
                d[i] = s[i];
        }
    }
}
"""


_BUMP = r"""
extern "C" __global__ void bump_slot(unsigned long long* slot, unsigned long long value)
{
    /* Everything this stream did before is complete (stream order); make it
     * visible system-wide, then publish the value with a release store. */
    __threadfence_system();
    asm volatile("st.release.sys.u64 [%0], %1;" :: "l"(slot), "l"(value) : "memory");
}
"""


class CudaBuffer(NamedTuple):
    ptr: int
    nbytes: int
    device: int
    keep: Any  #: objects that must stay alive while the memory is in use


class GpuHandle(NamedTuple):
    """What a descriptor carries for GPU memory: the owner's device number,
    the CUDA IPC handle of the allocation, and the allocation's base address
    in the owner's address space (so slices map to offsets)."""

    device: int
    ipc: bytes
    base: int


@functools.lru_cache(maxsize=1)
def _cupy() -> Any:
    try:
        import cupy
    except ImportError:
        raise UnavailableError("GPU buffers need CuPy: pip install 'aiofabric[gpu]'") from None
    return cupy


def _contiguous_nbytes(cai: dict[str, Any]) -> int:
    shape = tuple(cai["shape"])
    itemsize = int(np.dtype(cai["typestr"]).itemsize)
    strides = cai.get("strides")
    if strides is not None:
        expect = []
        step = itemsize
        for dim in reversed(shape):
            expect.append(step)
            step *= dim
        if tuple(strides) != tuple(reversed(expect)) and int(np.prod(shape)) > 1:
            raise TypeError("register() needs a C-contiguous CUDA buffer")
    return int(np.prod(shape)) * itemsize


def cuda_buffer(obj: Any) -> CudaBuffer | None:
    """The CUDA memory behind ``obj``, or None when it is not a CUDA buffer."""
    cai = getattr(obj, "__cuda_array_interface__", None)
    keep: Any = obj
    if cai is None:
        dev = getattr(obj, "__dlpack_device__", None)
        if dev is None:
            return None
        try:
            kind, _ = dev()
        except Exception:  # noqa: BLE001 - a foreign object's method: anything means "not CUDA"
            return None
        if kind != _KDL_CUDA:
            return None
        arr = _cupy().from_dlpack(obj)
        cai, keep = arr.__cuda_array_interface__, (obj, arr)
    ptr, readonly = cai["data"]
    nbytes = _contiguous_nbytes(cai)
    if nbytes == 0 or not ptr:
        raise ValueError("cannot register an empty buffer")
    if readonly:
        raise ValueError("read-only CUDA buffer")
    cp = _cupy()
    device = int(cp.cuda.runtime.pointerGetAttributes(ptr).device)
    return CudaBuffer(int(ptr), nbytes, device, keep)


@functools.lru_cache(maxsize=1)
def _libcuda() -> Any:
    lib = ctypes.CDLL("libcuda.so.1")
    lib.cuMemGetAddressRange_v2.argtypes = [ctypes.POINTER(ctypes.c_uint64), ctypes.POINTER(ctypes.c_size_t),
                                            ctypes.c_uint64]
    return lib


def gpu_handle(buf: CudaBuffer) -> GpuHandle:
    """The IPC handle of the allocation that holds ``buf``."""
    cp = _cupy()
    with cp.cuda.Device(buf.device):
        base, size = ctypes.c_uint64(), ctypes.c_size_t()
        rc = _libcuda().cuMemGetAddressRange_v2(ctypes.byref(base), ctypes.byref(size), buf.ptr)
        if rc != 0:
            raise UnavailableError(f"cuMemGetAddressRange failed (CUresult {rc})")
        ipc = bytes(cp.cuda.runtime.ipcGetMemHandle(base.value))
        # Work already queued on the device (say the zeroing of a fresh array)
        # completes before anyone can learn the descriptor and write into it.
        cp.cuda.get_current_stream().synchronize()
    return GpuHandle(buf.device, ipc, int(base.value))


class PageLauncher:
    """The page-copy kernel on one device, launched through the driver API
    (``cuLaunchKernel`` via ctypes, a few microseconds less per call than a
    CuPy launch).  Its arguments and both index lists travel in one buffer:
    a 64-byte header then the source and the destination indices."""

    HEADER = 64

    def __init__(self, cp: Any, device: int) -> None:
        with cp.cuda.Device(device):
            self.kernel = cp.RawKernel(_COPY_PAGES, "copy_pages")
            self._fn = ctypes.c_void_p(self.kernel.kernel.ptr)
        lib = _libcuda()
        self._launch = lib.cuLaunchKernel
        self._launch.argtypes = [ctypes.c_void_p] + [ctypes.c_uint] * 7 + [ctypes.c_void_p] * 3
        self._arg = ctypes.c_uint64()
        self._params = (ctypes.c_void_p * 1)(ctypes.addressof(self._arg))

    @classmethod
    def nbytes(cls, n: int) -> int:
        return cls.HEADER + 16 * n

    @staticmethod
    def pack(host: Any, src: int, dst: int, sidx: np.ndarray, didx: np.ndarray, page: int,
             sstride: int, dstride: int) -> None:
        """Fill ``host`` (an int64 array or a buffer of at least ``nbytes(n)``
        bytes) with a launch's arguments: the header, then both index lists."""
        n = len(sidx)
        a = host[: 8 + 2 * n] if type(host) is np.ndarray else np.frombuffer(host, np.int64, 8 + 2 * n)
        a[:6] = (src, dst, n, page, sstride, dstride)
        a[8:8 + n] = sidx
        a[8 + n:] = didx

    def launch(self, stream: int, dev: int, n: int, page: int) -> None:
        """Launch on ``stream`` (a handle) over the arguments at ``dev``: eight
        warps a block, one warp per 4 KiB chunk (the grid strides beyond 32768
        blocks).  The driver copies the parameter at launch."""
        chunks = n * ((page + 4095) >> 12)
        blocks = max(1, min((chunks + 7) // 8, 32768))
        self._arg.value = dev
        rc = self._launch(self._fn, blocks, 1, 1, 256, 1, 1, 0, stream, self._params, None)
        if rc:
            raise FabricError(f"cuLaunchKernel failed with CUDA error {rc}")


class GpuPath:
    """The NVLink path of one engine: streams per device, mapped peer
    allocations, the page-copy kernel, and the transfers in flight."""

    def __init__(self, engine: TransferEngine) -> None:
        self._engine = engine
        self._loop = engine._loop
        self._cp = _cupy()
        self._streams: dict[int, Any] = {}
        self._kernels: dict[int, Any] = {}
        self._mapped: dict[tuple[int, bytes], int] = {}  # (our device, handle) -> mapped base
        self._peer_enabled: set[tuple[int, int]] = set()
        self.pending: set[asyncio.Future[None]] = set()
        self._keep: dict[int, Any] = {}
        self._next = 0
        self._inflight: deque[tuple[Any, int, asyncio.Future[None], RegionDescriptor, int, int, float]] = deque()
        self._polling = False
        self._staging: dict[tuple[int, int], list[tuple[Any, Any]]] = {}
        self._events: dict[int, list[Any]] = {}
        self._mapped_host: dict[int, int] = {}
        self._order: dict[int, Any] = {}  # device -> event ordering our stream after the current one
        #: page lists: the kernel reads its arguments and indices from a device
        #: copy uploaded first (False), or straight from pinned host memory
        #: (True); measured taking turns, the upload was as fast or faster (docs/gpu.md)
        self.mapped_args = False

    # -- where to write ------------------------------------------------------

    def _stream(self, device: int) -> Any:
        s = self._streams.get(device)
        if s is None:
            with self._cp.cuda.Device(device):
                s = self._streams[device] = self._cp.cuda.Stream(non_blocking=True)
        return s

    def _target(self, dst: RegionDescriptor, device: int) -> int:
        """The address, in this process on ``device``, of ``dst``'s first byte."""
        gpu = dst.gpu
        assert gpu is not None
        rt = self._cp.cuda.runtime
        if dst.owner._body.pid == os.getpid() and dst.owner._body.host == self._engine.address._body.host:
            if gpu.device != device and (device, gpu.device) not in self._peer_enabled:
                with self._cp.cuda.Device(device):
                    try:
                        rt.deviceEnablePeerAccess(gpu.device)
                    except rt.CUDARuntimeError as e:  # already enabled is fine
                        if "PeerAccessAlreadyEnabled" not in str(e):
                            raise
                self._peer_enabled.add((device, gpu.device))
            return dst.addr
        key = (device, gpu.ipc)
        base = self._mapped.get(key)
        if base is None:
            with self._cp.cuda.Device(device):
                base = self._mapped[key] = int(rt.ipcOpenMemHandle(gpu.ipc))
        return base + (dst.addr - gpu.base)

    def check(self, region: MemoryRegion, dst: RegionDescriptor) -> None:
        """Raise UnavailableError unless this pair can use the NVLink path."""
        if dst.gpu is None:
            raise UnavailableError(
                "writing GPU memory into host memory of a peer needs FI_HMEM (CUDA) support, which this "
                f"libfabric's {self._engine.provider} lacks; copy to host memory first")
        if dst.owner._body.host != self._engine.address._body.host or not dst.owner._body.host:
            raise UnavailableError(
                "the target GPU is on another host: GPU memory over the fabric needs FI_HMEM (CUDA) support, "
                f"which this libfabric's {self._engine.provider} lacks")

    # -- transfers -------------------------------------------------------------

    def _after_current(self, device: int, stream: Any) -> None:
        """Order ``stream`` after the work already queued on the device's
        current stream (what produced the source bytes).  One event per
        device, re-recorded each time: a wait takes the record it sees."""
        cur = self._cp.cuda.get_current_stream()
        if cur.ptr == stream.ptr:
            return
        ev = self._order.get(device)
        if ev is None:
            ev = self._order[device] = self._cp.cuda.Event(block=False, disable_timing=True)
        ev.record(cur)
        stream.wait_event(ev)

    def write(self, region: MemoryRegion, off: int, n: int, dst: RegionDescriptor, imm: int) -> asyncio.Future[None]:
        self.check(region, dst)
        rt = self._cp.cuda.runtime
        device = region.device if region.device is not None else dst.gpu.device  # type: ignore[union-attr]
        stream = self._stream(device)
        with self._cp.cuda.Device(device):
            self._after_current(device, stream)
            target = self._target(dst, device)
            if region.device is not None and dst.owner._body.pid == os.getpid():
                # Both ends in this process: a peer copy names both devices (the copy engines' path).
                rt.memcpyPeerAsync(target, dst.gpu.device, region.address + off, device, n,  # type: ignore[union-attr]
                                   stream.ptr)
            else:
                rt.memcpyAsync(target, region.address + off, n, rt.memcpyDefault, stream.ptr)
        return self._after(device, stream, region, dst, imm, 1, None, n)

    def write_pages(self, region: MemoryRegion, off: int, dst: RegionDescriptor, page: int, sstride: int,
                    dstride: int, sidx: np.ndarray, didx: np.ndarray, imm: int) -> asyncio.Future[None]:
        self.check(region, dst)
        if region.device is None:
            raise UnavailableError("paged writes into GPU memory need a GPU source region")
        cp = self._cp
        device = region.device
        stream = self._stream(device)
        n = len(sidx)
        with cp.cuda.Device(device):
            self._after_current(device, stream)
            launcher = self._kernels.get(device)
            if launcher is None:
                launcher = self._kernels[device] = PageLauncher(cp, device)
            # Arguments and both index lists go up in one asynchronous copy from
            # a reused pinned buffer (a pageable copy would stall until the stream drains).
            nbytes = PageLauncher.nbytes(n)
            stage = self._stage(device, nbytes)
            PageLauncher.pack(stage[2], region.address + off, self._target(dst, device), sidx, didx, page,
                              sstride, dstride)
            if self.mapped_args:  # the kernel reads them from pinned host memory
                dev = self._host_mapped(stage[0].ptr)
            else:
                dev = stage[1].data.ptr
                cp.cuda.runtime.memcpyAsync(dev, stage[0].ptr, nbytes, 1, stream.ptr)  # host to device
            launcher.launch(stream.ptr, dev, n, page)
        return self._after(device, stream, region, dst, imm, n, (device, stage), n * page)

    def _host_mapped(self, host: int) -> int:
        """The device's address of pinned host memory at ``host``."""
        dev = self._mapped_host.get(host)
        if dev is None:
            out = ctypes.c_uint64()
            rc = _libcuda().cuMemHostGetDevicePointer_v2(ctypes.byref(out), ctypes.c_void_p(host), 0)
            if rc:
                raise FabricError(f"cuMemHostGetDevicePointer failed with CUDA error {rc}")
            dev = self._mapped_host[host] = out.value
        return dev

    def _stage(self, device: int, nbytes: int) -> tuple[Any, Any, np.ndarray]:
        """A pinned host buffer, a device buffer of at least ``nbytes`` and an
        int64 view of the first, reused once the transfer that used them has completed."""
        size = 1 << max(12, (nbytes - 1).bit_length())
        free = self._staging.setdefault((device, size), [])
        if free:
            return free.pop()
        host = self._cp.cuda.alloc_pinned_memory(size)
        return (host, self._cp.empty(size, dtype=self._cp.uint8), np.frombuffer(host, np.int64, size // 8))

    def _after(self, device: int, stream: Any, region: MemoryRegion, dst: RegionDescriptor, imm: int, count: int,
               keep: Any, nbytes: int) -> asyncio.Future[None]:
        """A future that resolves once the stream's work so far is done and,
        with an immediate, once the message delivering ``count`` of them
        (one per write or page, as on the fabric) has been sent."""
        fut: asyncio.Future[None] = self._loop.create_future()
        token = self._next
        self._next += 1
        region._inflight += 1
        self.pending.add(fut)
        free = self._events.setdefault(device, [])
        if free:
            event = free.pop()
        else:
            with self._cp.cuda.Device(device):
                event = self._cp.cuda.Event(block=False, disable_timing=True)
        event.record(stream)
        self._keep[token] = (region, (keep, device, event))
        # Poll between the loop's callbacks until well past when the copy
        # should be done (at 100 GB/s), then once a millisecond (the loop's
        # timers are no finer than that).
        spin_until = time.monotonic() + 0.002 + nbytes / 100e9
        self._inflight.append((event, token, fut, dst, imm, count, spin_until))
        if not self._polling:
            self._polling = True
            self._loop.call_soon(self._poll)
        return fut

    def _poll(self) -> None:
        """Resolve the transfers whose copies are done.  The loop polls the
        events (a cudaEventQuery each, ~1 µs) between its other callbacks
        while a copy may still be running at full speed, then every
        millisecond: a host callback from CUDA's own thread costs tens of
        microseconds more per transfer, and the loop's timers cannot wait less
        than a millisecond (the reason a copy must not fall back to them)."""
        q = self._inflight
        while q and q[0][0].done:
            _, token, fut, dst, imm, count, _ = q.popleft()
            self._landed(token, fut, dst, imm, count)
        # Events of different streams may finish out of order: check the rest too.
        if q:
            for item in [x for x in q if x[0].done]:
                q.remove(item)
                self._landed(*item[1:6])
        if not q:
            self._polling = False
        elif time.monotonic() < max(x[6] for x in q):
            self._loop.call_soon(self._poll)
        else:
            self._loop.call_later(0.001, self._poll)

    def _landed(self, token: int, fut: asyncio.Future[None], dst: RegionDescriptor, imm: int, count: int) -> None:
        region, (keep, device, event) = self._keep.pop(token)
        self._events[device].append(event)  # its work is done: both can be reused
        if keep is not None:
            sdev, stage = keep
            self._staging[(sdev, len(stage[1]))].append(stage)
        region._inflight -= 1
        if region._closed and region._inflight == 0:
            self._engine._release_region(region)
        if imm < 0 or self._engine.closed:
            self._finish(fut, None)
            return
        try:
            note = self._engine._credit(dst.owner, imm, count)
        except FabricError as exc:  # the peer failed, or the engine closed
            self._finish(fut, exc)
            return
        note.add_done_callback(lambda f: self._finish(fut, None if f.cancelled() else f.exception()))

    def _finish(self, fut: asyncio.Future[None], exc: BaseException | None) -> None:
        self.pending.discard(fut)
        if not fut.done():
            if exc is None:
                fut.set_result(None)
            else:
                fut.set_exception(exc)

    def close(self) -> None:
        """Wait for the device work, then unmap every peer allocation."""
        rt = self._cp.cuda.runtime
        for s in self._streams.values():
            s.synchronize()
        for (device, _), base in self._mapped.items():
            with self._cp.cuda.Device(device):
                try:
                    rt.ipcCloseMemHandle(base)
                except rt.CUDARuntimeError:
                    pass
        self._mapped.clear()


# -- the watcher on a GPU ------------------------------------------------------

_attached: dict[int, int] = {}  # watcher address -> device it was registered for
_bump_kernels: dict[int, Any] = {}


def attach_watcher(watcher: Any, device: int = 0) -> None:
    """Make a :class:`~aiofabric.Watcher`'s slots writable by GPU kernels:
    page-locks and maps its memory (``cudaHostRegister``, mapped and portable).
    On Hopper with unified addressing the device uses the host address as is.
    Idempotent.  Raises UnavailableError without CuPy or where the device
    cannot use host pointers for registered memory."""
    cp = _cupy()
    rt = cp.cuda.runtime
    if watcher.address in _attached:
        return
    with cp.cuda.Device(device):
        if not rt.deviceGetAttribute(rt.cudaDevAttrCanUseHostPointerForRegisteredMem, device):
            raise UnavailableError(f"GPU {device} cannot use host pointers for registered memory")
        rt.hostRegister(watcher.address, watcher.nbytes, 1 | 2)  # portable | mapped
    _attached[watcher.address] = device


def detach_watcher(watcher: Any) -> None:
    """Undo :func:`attach_watcher` (before the watcher's memory goes away)."""
    if _attached.pop(watcher.address, None) is not None:
        _cupy().cuda.runtime.hostUnregister(watcher.address)


def bump(watcher: Any, slot: int, value: int, stream: Any = None) -> None:
    """Enqueue, on ``stream`` (default: CuPy's current stream), a one-thread
    kernel that stores ``value`` into ``slot`` once the stream's earlier work
    is done: the GPU producer's ``watcher.bump``.  Transfers armed on the slot
    fire when the watcher thread sees it (docs/watcher.md)."""
    cp = _cupy()
    device = _attached.get(watcher.address)
    if device is None:
        raise ValueError("attach_watcher(watcher) first")
    i = watcher._slot(slot)
    v = watcher._value(value)
    with cp.cuda.Device(device):
        k = _bump_kernels.get(device)
        if k is None:
            k = _bump_kernels[device] = cp.RawKernel(_BUMP, "bump_slot")
        k((1,), (1,), (np.uint64(watcher.slot_address(i)), np.uint64(v)),
          stream=stream if stream is not None else cp.cuda.get_current_stream())
