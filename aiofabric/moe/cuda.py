"""The CUDA side of the GPU MoE path: CuPy arrays, the kernels compiled with
NVRTC, one non-blocking stream per rank, CUDA IPC for peers in other
processes.  ``GpuExpertParallel`` talks to the device only through a backend
with this interface (the tests drive the same class with a CPU emulator)."""
from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from ..errors import UnavailableError
from .kernels import NAMES, SOURCE

__all__ = ["SIGNATURES", "THREADS", "CudaBackend", "kernel_args"]

#: kernel parameter types: p pointer, i int32, q int64, u uint32, Q uint64
SIGNATURES = {
    "moe_pack": "piiiipq",
    "moe_dispatch": "pipipiiipiiiiuqqqqqqqipqqppppppqQppui",
    "moe_combine": "piqipiiiiuppqqqqiipipQppui",
}
_NP = {"p": np.uint64, "i": np.int32, "q": np.int64, "u": np.uint32, "Q": np.uint64}
THREADS = 256


def kernel_args(name: str, values: Sequence[Any]) -> tuple[Any, ...]:
    """``values`` as the numpy scalars the kernel's parameters take (a
    mismatch would silently shift every later parameter)."""
    sig = SIGNATURES[name]
    if len(sig) != len(values):
        raise AssertionError(f"{name} takes {len(sig)} parameters, got {len(values)}")
    return tuple(_NP[c](int(v)) for c, v in zip(sig, values))


def _cupy() -> Any:
    try:
        import cupy
    except ImportError:
        raise UnavailableError("GPU MoE needs CuPy: pip install 'aiofabric[gpu]'") from None
    return cupy


class CudaBackend:
    """The real device: CuPy arrays, NVRTC-compiled kernels, one
    non-blocking stream, CUDA IPC for peers in other processes."""

    def __init__(self, device: int, options: tuple[str, ...] = ()) -> None:
        cp = self.xp = _cupy()
        self.device = device
        self.pid = os.getpid()
        with cp.cuda.Device(device):
            self.module = mod = cp.RawModule(code=SOURCE, options=tuple(options))
            self._k = {n: mod.get_function(n) for n in NAMES}
            for k in self._k.values():
                try:
                    _ = k.kernel  # compile and load for this device now, not in the middle of a round
                except AttributeError:  # a CuPy without the property compiles at the first launch
                    break
            self._props = cp.cuda.runtime.getDeviceProperties(device)
            self.sms = int(self._props["multiProcessorCount"])
            self.stream = cp.cuda.Stream(non_blocking=True)
            self._ev_in = cp.cuda.Event(block=False, disable_timing=True)
            self._ev_out = cp.cuda.Event(block=False, disable_timing=True)
        self._mapped: list[int] = []

    def ctx(self) -> Any:
        return self.xp.cuda.Device(self.device)

    def is_array(self, a: Any) -> bool:
        return isinstance(a, self.xp.ndarray)

    def on_device(self, a: Any) -> bool:
        return int(a.device.id) == self.device

    def zeros(self, shape: Any, dtype: Any) -> Any:
        with self.ctx():
            return self.xp.zeros(shape, dtype)

    def ptr(self, a: Any) -> int:
        return int(a.data.ptr)

    def resident(self, name: str, block: int, shared: int = 0) -> int:
        """How many blocks of ``name`` (``block`` threads, ``shared`` bytes of
        dynamic shared memory) the device runs at once: registers, threads
        and shared memory per SM, times the SMs."""
        p = self._props
        try:
            with self.ctx():
                a = self._k[name].attributes
            regs, static = max(1, int(a["num_regs"])), int(a["shared_size_bytes"])
        except (AttributeError, KeyError):  # a CuPy without kernel attributes: one block per SM
            return self.sms
        per_warp = -(-regs * 32 // 256) * 256  # registers are allocated per warp, 256 at a time
        fits = min(int(p["regsPerMultiprocessor"]) // (per_warp * (block // 32)),
                   int(p["maxThreadsPerMultiProcessor"]) // block,
                   int(p["sharedMemPerMultiprocessor"]) // (static + shared + 1024),
                   int(p.get("maxBlocksPerMultiProcessor", 32)))
        return self.sms * max(1, fits)

    def launch(self, name: str, grid: tuple[int, ...], block: int, values: Sequence[Any], shared: int = 0,
               wait_from: int | None = None) -> None:
        """Enqueue a kernel on our stream.  ``wait_from``: blocks from this
        ticket on wait for other ranks (the emulator runs them at end())."""
        with self.ctx():
            self._k[name](grid, (block,), kernel_args(name, values), shared_mem=shared, stream=self.stream)

    def _foreign(self) -> Any:
        """The caller's current stream, or None when it is ours (already in order)."""
        cur = self.xp.cuda.get_current_stream()
        return None if cur.ptr == self.stream.ptr else cur

    def begin(self) -> None:
        """Our stream waits for the work the caller queued on its current stream
        (nothing to do when the caller runs on our stream)."""
        with self.ctx():
            cur = self._foreign()
            if cur is not None:
                self._ev_in.record(cur)
                self.stream.wait_event(self._ev_in)

    def end(self) -> None:
        """The caller's current stream waits for our work (unless it is ours)."""
        with self.ctx():
            cur = self._foreign()
            if cur is not None:
                self._ev_out.record(self.stream)
                cur.wait_event(self._ev_out)

    def synchronize(self) -> None:
        self.stream.synchronize()

    def to_host(self, a: Any) -> np.ndarray:
        """A host copy of ``a`` once our stream's work is done (the copy runs
        on the caller's current stream, where inputs were made)."""
        self.stream.synchronize()
        with self.ctx():
            return self.xp.asnumpy(a) if a.size else np.zeros(a.shape, a.dtype)

    def to_device(self, a: np.ndarray) -> Any:
        with self.ctx():
            out = self.xp.empty(a.shape, a.dtype)
            out.set(a, stream=self.stream)
            return out

    def settle(self) -> None:
        """Wait for everything queued on the device (e.g. the zeroing of new buffers)."""
        with self.ctx():
            self.xp.cuda.Device(self.device).synchronize()

    def put(self, dst: Any, a: np.ndarray) -> None:
        """Copy host ``a`` into device ``dst`` and wait for it."""
        with self.ctx():
            dst.set(a)
            self.xp.cuda.Device(self.device).synchronize()

    def handle(self, a: Any) -> dict[str, Any]:
        from .. import gpu as afgpu

        buf = afgpu.cuda_buffer(a)
        assert buf is not None
        h = afgpu.gpu_handle(buf)
        return {"device": self.device, "ipc": h.ipc, "base": h.base, "ptr": buf.ptr}

    def map_peer(self, info: dict[str, Any]) -> int:
        rt = self.xp.cuda.runtime
        with self.ctx():
            if info["pid"] == self.pid:
                peer = int(info["device"])
                if peer != self.device:
                    if not rt.deviceCanAccessPeer(self.device, peer):
                        raise UnavailableError(f"GPU {self.device} cannot access GPU {peer} (no P2P/NVLink)")
                    try:
                        rt.deviceEnablePeerAccess(peer)
                    except rt.CUDARuntimeError as e:
                        if "PeerAccessAlreadyEnabled" not in str(e):
                            raise
                return int(info["ptr"])
            base = int(rt.ipcOpenMemHandle(bytes(info["ipc"])))
            self._mapped.append(base)
            return base + int(info["ptr"]) - int(info["base"])

    def close(self) -> None:
        rt = self.xp.cuda.runtime
        self.stream.synchronize()
        with self.ctx():
            for base in self._mapped:
                try:
                    rt.ipcCloseMemHandle(base)
                except rt.CUDARuntimeError:
                    pass
        self._mapped.clear()
