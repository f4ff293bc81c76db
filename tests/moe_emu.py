"""A CPU emulator for the MoE CUDA kernels (aiofabric/moe/kernels.py): the
same source compiled as C++ (``-DMOE_EMU``), blocks run one after another,
the threads of a block as real threads meeting at a barrier for
``__syncthreads``; ``__shared__`` variables are per-block statics.  With it
the GPU classes run end to end on the CPU (several ranks in one process,
NumPy arrays as device memory), so the kernels' logic, their parameter lists
and the Python around them are checked against the reference without a GPU.
What it cannot check: CUDA itself (IPC, streams, the memory model)."""
from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
from typing import Any, Sequence

import numpy as np

from aiofabric.moe.gpu import SIGNATURES, kernel_args
from aiofabric.moe.kernels import NAMES, SOURCE

PRELUDE = r"""
#include <atomic>
#include <barrier>
#include <memory>
#include <chrono>
#include <cstring>
#include <math.h>
#include <thread>
#include <utility>
#include <vector>
#define MOE_EMU 1
typedef unsigned long long u64;
struct dim3 { unsigned x = 1, y = 1, z = 1; };
struct uint4 { unsigned x, y, z, w; };
struct uint2 { unsigned x, y; };
static thread_local dim3 threadIdx, blockIdx;
static dim3 blockDim, gridDim;
static std::barrier<>* emu_bar;
alignas(16) static unsigned char emu_shared[1 << 16];
#define __global__
#define __device__
#define __forceinline__ inline
#define __shared__ static
#define DYN_SHARED(T, name) T* name = reinterpret_cast<T*>(emu_shared)
#define PAUSE() std::this_thread::yield()
static inline void __syncthreads() { emu_bar->arrive_and_wait(); }
static std::vector<std::barrier<>*> emu_warp_bars;  /* one per warp of the running block */
static unsigned emu_votes[32][32];
static inline unsigned __ballot_sync(unsigned, int pred)
{
    const unsigned w = threadIdx.x >> 5, l = threadIdx.x & 31;
    emu_votes[w][l] = pred ? 1u : 0u;
    emu_warp_bars[w]->arrive_and_wait();
    unsigned m = 0;
    for (unsigned i = 0; i < 32; ++i)
        m |= emu_votes[w][i] << i;
    emu_warp_bars[w]->arrive_and_wait();
    return m;
}
static float emu_lanes[32][32];
static inline float __shfl_xor_sync(unsigned, float v, int m)
{
    const unsigned w = threadIdx.x >> 5, l = threadIdx.x & 31;
    emu_lanes[w][l] = v;
    emu_warp_bars[w]->arrive_and_wait();
    const float r = emu_lanes[w][l ^ (unsigned)m];
    emu_warp_bars[w]->arrive_and_wait();
    return r;
}
static inline int __popc(unsigned v) { return __builtin_popcount(v); }
static int emu_ints[32][32];
static inline int __shfl_sync(unsigned, int v, int src)
{
    const unsigned w = threadIdx.x >> 5, l = threadIdx.x & 31;
    emu_ints[w][l] = v;
    emu_warp_bars[w]->arrive_and_wait();
    const int r = emu_ints[w][src];
    emu_warp_bars[w]->arrive_and_wait();
    return r;
}
static inline void __syncwarp() { emu_warp_bars[threadIdx.x >> 5]->arrive_and_wait(); }
static inline void __threadfence_system() { std::atomic_thread_fence(std::memory_order_seq_cst); }
static inline unsigned atomicAdd(unsigned* p, unsigned v) { return __atomic_fetch_add(p, v, __ATOMIC_SEQ_CST); }
static inline int atomicAdd(int* p, int v) { return __atomic_fetch_add(p, v, __ATOMIC_SEQ_CST); }
static inline int atomicCAS(int* p, int cmp, int v)
{
    __atomic_compare_exchange_n(p, &cmp, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);
    return cmp;
}
static inline u64 ld_acquire(const u64* p) { return __atomic_load_n(p, __ATOMIC_ACQUIRE); }
static inline void st_release(u64* p, u64 v) { __atomic_store_n(p, v, __ATOMIC_RELEASE); }
static inline u64 ld_relaxed(const u64* p) { return __atomic_load_n(p, __ATOMIC_RELAXED); }
static inline void st_relaxed(u64* p, u64 v) { __atomic_store_n(p, v, __ATOMIC_RELAXED); }
static inline void fence_sys() { std::atomic_thread_fence(std::memory_order_acq_rel); }
static inline u64 now_ns()
{
    return (u64)std::chrono::duration_cast<std::chrono::nanoseconds>(
        std::chrono::steady_clock::now().time_since_epoch()).count();
}
static inline float __uint_as_float(unsigned u) { float f; memcpy(&f, &u, 4); return f; }
static inline unsigned __float_as_uint(float f) { unsigned u; memcpy(&u, &f, 4); return u; }
static inline float __fadd_rn(float a, float b) { return a + b; }
static inline float __fmul_rn(float a, float b) { return a * b; }
static inline float __fdiv_rn(float a, float b) { return a / b; }
static inline int __float2int_rn(float a) { return (int)nearbyintf(a); }  /* default mode: to nearest even */
"""

LAUNCHER = r"""
template <class... A, std::size_t... I>
static void emu_call(void (*f)(A...), void** args, std::index_sequence<I...>)
{
    f(*static_cast<A*>(args[I])...);
}

/* blocks first..last-1 (x fastest) of a gx x gy grid, one after another */
template <class... A>
static void emu_launch(void (*f)(A...), unsigned gx, unsigned gy, unsigned bx, unsigned first, unsigned last,
                       void** args)
{
    gridDim = dim3{gx, gy, 1};
    blockDim = dim3{bx, 1, 1};
    for (unsigned b = first; b < last; ++b) {
            const unsigned by = b / gx, bxi = b % gx;
            std::barrier<> bar(bx);
            emu_bar = &bar;
            std::vector<std::unique_ptr<std::barrier<>>> warps;
            emu_warp_bars.clear();
            for (unsigned w = 0; w * 32 < bx; ++w) {
                warps.emplace_back(new std::barrier<>(bx - 32 * w < 32 ? bx - 32 * w : 32));
                emu_warp_bars.push_back(warps.back().get());
            }
            std::vector<std::thread> ts;
            for (unsigned t = 0; t < bx; ++t)
                ts.emplace_back([=] {
                    threadIdx = dim3{t, 0, 0};
                    blockIdx = dim3{bxi, by, 0};
                    emu_call(f, args, std::index_sequence_for<A...>{});
                });
            for (auto& th : ts)
                th.join();
    }
}
"""


def build(tmp: str | None = None) -> ctypes.CDLL:
    """Compile the kernels for the CPU (cached by source hash)."""
    exports = "".join(
        f'extern "C" void emu_{n}(unsigned gx, unsigned gy, unsigned bx, unsigned first, unsigned last, void** a) '
        f'{{ emu_launch({n}, gx, gy, bx, first, last, a); }}\n'
        for n in NAMES)
    src = PRELUDE + SOURCE + LAUNCHER + exports
    key = hashlib.sha256(src.encode()).hexdigest()[:16]
    d = tmp or os.path.join(tempfile.gettempdir(), f"aiofabric-moe-emu-{os.getuid()}")
    os.makedirs(d, exist_ok=True)
    so = os.path.join(d, f"moe_emu_{key}.so")
    if not os.path.exists(so):
        cpp = os.path.join(d, f"moe_emu_{key}.cpp")
        with open(cpp, "w") as f:
            f.write(src)
        tmp_so = f"{so}.{os.getpid()}"
        subprocess.run(["g++", "-std=c++20", "-O1", "-ffp-contract=off", "-fno-fast-math", "-pthread", "-shared",
                        "-fPIC", "-Wall", "-Wno-unused-function", "-o", tmp_so, cpp], check=True,
                       capture_output=True, text=True)
        os.replace(tmp_so, so)
    lib = ctypes.CDLL(so)
    for n in NAMES:
        fn = getattr(lib, f"emu_{n}")
        fn.argtypes = [ctypes.c_uint] * 5 + [ctypes.POINTER(ctypes.c_void_p)]
        fn.restype = None
    return lib


def available() -> str:
    """'' when the emulator can be built here, else why not."""
    if shutil.which("g++") is None:
        return "no g++"
    try:
        build()
    except subprocess.CalledProcessError as e:
        return f"g++ failed: {e.stderr[-2000:]}"
    return ""


class EmuBackend:
    """The backend interface of aiofabric.moe.gpu.CudaBackend, on the CPU."""

    xp = np

    def __init__(self, lib: ctypes.CDLL) -> None:
        self._lib = lib
        self.device = 0
        self.pid = os.getpid()
        self.launches: list[str] = []
        self._waiting: list[Any] = []  # blocks of fused kernels that wait for other ranks: run at end()

    def ctx(self) -> Any:
        return contextlib.nullcontext()

    def is_array(self, a: Any) -> bool:
        return isinstance(a, np.ndarray)

    def on_device(self, a: Any) -> bool:
        return True

    def zeros(self, shape: Any, dtype: Any) -> np.ndarray:
        # poison instead of zeros where the kernels must not rely on zeroed memory
        return np.zeros(shape, dtype)

    def ptr(self, a: np.ndarray) -> int:
        return int(a.__array_interface__["data"][0])

    def resident(self, name: str, block: int, shared: int = 0) -> int:
        return 16

    def launch(self, name: str, grid: tuple[int, ...], block: int, values: Sequence[Any], shared: int = 0,
               wait_from: int | None = None) -> None:
        """Run the kernel's blocks in order; with ``wait_from`` (a fused
        kernel), the blocks from there on, which wait for other ranks, run at
        the next end() (when every rank's senders have run)."""
        assert shared <= 1 << 16, "dynamic shared memory"
        assert 1 <= block <= 1024
        args = kernel_args(name, values)
        store = [ctypes.create_string_buffer(a.tobytes(), a.nbytes) for a in args]
        argv = (ctypes.c_void_p * len(store))(*[ctypes.addressof(s) for s in store])
        gx, gy = (tuple(grid) + (1,))[:2]
        total = gx * gy
        split = total if wait_from is None else min(total, wait_from)
        self.launches.append(name)
        fn = getattr(self._lib, f"emu_{name}")
        fn(gx, gy, block, 0, split, argv)
        if split < total:
            self._waiting.append((fn, gx, gy, block, split, total, argv, store))

    def begin(self) -> None:
        pass

    def end(self) -> None:
        waiting, self._waiting = self._waiting, []
        for fn, gx, gy, block, first, last, argv, _store in waiting:
            fn(gx, gy, block, first, last, argv)

    def synchronize(self) -> None:
        self.end()

    def to_host(self, a: np.ndarray) -> np.ndarray:
        return np.array(a, copy=True)

    def to_device(self, a: np.ndarray) -> np.ndarray:
        return np.array(a, copy=True)

    def settle(self) -> None:
        pass

    def put(self, dst: np.ndarray, a: np.ndarray) -> None:
        dst[...] = a

    def handle(self, a: np.ndarray) -> dict[str, Any]:
        p = self.ptr(a)
        return {"device": 0, "ipc": b"", "base": p, "ptr": p}

    def map_peer(self, info: dict[str, Any]) -> int:
        assert info["pid"] == self.pid
        return int(info["ptr"])

    def close(self) -> None:
        pass


__all__ = ["EmuBackend", "available", "build", "SIGNATURES"]
