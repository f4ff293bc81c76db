"""The costs the MoE kernels are built from, measured on the GPUs of one host:
what a kernel launch, a system-scope fence, a flag over NVLink, remote and
local stores cost.  docs/moe.md explains the kernels' design with these.

    python -m benchmarks.nvlink_probe [--reps 200] [--json out.json]

* ``launch``: CUDA events around an empty kernel (1 block; 132x512) and around
  two empty kernels back to back: what a kernel boundary adds to a phase.
* ``pingpong``: one-way latency of a flag stored into a peer GPU's memory
  (``st.release.sys``) and seen by a kernel spinning there (``ld.acquire.sys``),
  half a round trip, averaged over 1000 round trips inside one launch.
* ``fence``: ``fence.acq_rel.sys`` by thread 0 after the block's 512 threads
  stored N bytes into a peer (N = 0, 4 KiB, 64 KiB), the fence alone timed with
  ``%globaltimer``; and the same fence with no remote stores before it.
* ``remote_store``: a kernel of G blocks x 512 threads storing B bytes (16-byte
  stores) into one peer, or B bytes into each of all peers at once; event-timed
  (launch included) and the GB/s that makes.
* ``local_copy``: the same kernel copying within one GPU (the receive side's
  expansion).
"""
from __future__ import annotations

import argparse
import json
import statistics

SRC = r"""
typedef unsigned long long u64;
__device__ __forceinline__ u64 now_ns() { u64 t; asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t)); return t; }
extern "C" __global__ void empty() {}

/* spins ~us microseconds, then stores when it ended */
extern "C" __global__ void busy(u64 us, u64* stamp)
{
    const u64 t0 = now_ns();
    u64 t;
    do { t = now_ns(); } while (t - t0 < us * 1000);
    stamp[0] = t;
}
/* stores when its first block started (blocks x threads, shared bytes of static shared memory used) */
extern "C" __global__ void starts(u64* stamp)
{
    __shared__ int big[4096];
    const u64 t = now_ns();
    big[threadIdx.x] = threadIdx.x;
    __syncthreads();
    if (threadIdx.x == 0 && big[1] == 1) atomicMin(stamp + 1, t);
}

extern "C" __global__ void ping(u64* mine, u64* theirs, int n, int first)
{
    for (int i = 1; i <= n; ++i) {
        if (first) asm volatile("st.release.sys.u64 [%0], %1;" :: "l"(theirs), "l"((u64)i) : "memory");
        u64 v;
        do { asm volatile("ld.acquire.sys.u64 %0, [%1];" : "=l"(v) : "l"(mine) : "memory"); } while (v < (u64)i);
        if (!first) asm volatile("st.release.sys.u64 [%0], %1;" :: "l"(theirs), "l"((u64)i) : "memory");
    }
}

/* block 0 stores n16 uint4 into dst, then thread 0 fences; out[0] = fence ns */
extern "C" __global__ void fence_cost(uint4* dst, long long n16, u64* out)
{
    uint4 v; v.x = v.y = v.z = v.w = 1u;
    for (long long i = threadIdx.x; i < n16; i += blockDim.x) dst[i] = v;
    __syncthreads();
    if (threadIdx.x == 0) {
        const u64 t0 = now_ns();
        asm volatile("fence.acq_rel.sys;" ::: "memory");
        const u64 t1 = now_ns();
        out[0] = t1 - t0;
    }
}

/* block b stores n16 uint4 (or 2 * n16 uint2) at dst + b * n16; out[3b..3b+2] = start, stores issued, fenced */
extern "C" __global__ void block_store(uint4* dst, long long n16, int narrow, u64* out)
{
    const u64 t0 = now_ns();
    uint4* d = dst + blockIdx.x * n16;
    if (narrow) {
        uint2 v; v.x = v.y = 1u;
        for (long long i = threadIdx.x; i < 2 * n16; i += blockDim.x) ((uint2*)d)[i] = v;
    } else {
        uint4 v; v.x = v.y = v.z = v.w = 1u;
        for (long long i = threadIdx.x; i < n16; i += blockDim.x) d[i] = v;
    }
    __syncthreads();
    const u64 t1 = now_ns();
    if (threadIdx.x == 0) {
        asm volatile("fence.acq_rel.sys;" ::: "memory");
        out[3 * blockIdx.x] = t0; out[3 * blockIdx.x + 1] = t1; out[3 * blockIdx.x + 2] = now_ns();
    }
}

/* every block copies its share of n16 uint4 from src to dst[k] for k < nd (nd destinations) */
extern "C" __global__ void spray(const uint4* src, uint4** dst, int nd, long long n16)
{
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n16; i += stride) {
        const uint4 v = src[i];
        for (int k = 0; k < nd; ++k) dst[k][i] = v;
    }
}
"""


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=200)
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    import cupy as cp
    import numpy as np

    rt = cp.cuda.runtime
    n = rt.getDeviceCount()
    card = rt.getDeviceProperties(0)["name"].decode()
    sms = rt.getDeviceProperties(0)["multiProcessorCount"]
    mods = []
    for d in range(n):
        with cp.cuda.Device(d):
            m = cp.RawModule(code=SRC)
            mods.append({k: m.get_function(k) for k in ("empty", "ping", "fence_cost", "spray", "busy", "starts", "block_store")})
            for p in range(n):
                if p != d:
                    try:
                        rt.deviceEnablePeerAccess(p)
                    except rt.CUDARuntimeError:
                        pass
    out: dict = {"card": card, "gpus": n, "sms": sms}
    print(f"{card} x{n}, {sms} SMs")

    def timed(d: int, fn, reps: int = args.reps) -> float:
        with cp.cuda.Device(d):
            s = cp.cuda.Stream(non_blocking=True)
            a, b = cp.cuda.Event(), cp.cuda.Event()
            ts = []
            for _ in range(reps):
                a.record(s)
                fn(s)
                b.record(s)
                b.synchronize()
                ts.append(cp.cuda.get_elapsed_time(a, b) * 1e3)
            return statistics.median(ts[reps // 10:])

    e = mods[0]["empty"]
    out["launch_1block_us"] = timed(0, lambda s: e((1,), (32,), (), stream=s))
    out["launch_grid_us"] = timed(0, lambda s: e((sms,), (512,), (), stream=s))
    out["launch_two_us"] = timed(0, lambda s: (e((1,), (32,), (), stream=s), e((1,), (32,), (), stream=s)))
    print(f"launch: empty kernel {out['launch_1block_us']:.2f} us, {sms}x512 {out['launch_grid_us']:.2f} us, "
          f"two back to back {out['launch_two_us']:.2f} us (event to event, host launch included)")
    # the gap between one kernel's end and the next one's first block, both queued in advance
    with cp.cuda.Device(0):
        s0 = cp.cuda.Stream(non_blocking=True)
        st = cp.zeros(2, cp.uint64)
        ev = cp.cuda.Event()
        busy, starts = mods[0]["busy"], mods[0]["starts"]
        out["gap_us"] = {}
        for label, grid, block, with_event in (("1x32", 1, 32, False), ("1x32 + event", 1, 32, True),
                                               (f"{2 * sms}x512", 2 * sms, 512, False),
                                               (f"{2 * sms}x512 + event", 2 * sms, 512, True)):
            gaps = []
            for _ in range(50):
                st.fill(0)
                st[1:2].fill(np.uint64(2**63))
                cp.cuda.Device(0).synchronize()
                busy((1,), (1,), (np.uint64(30), st), stream=s0)
                if with_event:
                    ev.record(s0)
                starts((grid,), (block,), (st,), stream=s0)
                s0.synchronize()
                a, b = (int(v) for v in st.get())
                gaps.append((b - a) / 1e3)
            out["gap_us"][label] = statistics.median(gaps)
        print("kernel end -> next kernel's first block (queued): " +
              ", ".join(f"{k} {v:.2f} us" for k, v in out["gap_us"].items()))

    if n >= 2:
        flags = []
        for d in (0, 1):
            with cp.cuda.Device(d):
                flags.append(cp.zeros(1, cp.uint64))
        rounds = 1000
        ss = []
        for d in (0, 1):
            with cp.cuda.Device(d):
                ss.append(cp.cuda.Stream(non_blocking=True))
        with cp.cuda.Device(0):
            a, b = cp.cuda.Event(), cp.cuda.Event()
        res = []
        for _ in range(5):
            for d in (0, 1):
                with cp.cuda.Device(d):
                    flags[d].fill(0)
                    cp.cuda.Device(d).synchronize()
            with cp.cuda.Device(1):
                mods[1]["ping"]((1,), (1,), (flags[1], flags[0], np.int32(rounds), np.int32(0)), stream=ss[1])
            with cp.cuda.Device(0):
                a.record(ss[0])
                mods[0]["ping"]((1,), (1,), (flags[0], flags[1], np.int32(rounds), np.int32(1)), stream=ss[0])
                b.record(ss[0])
            b.synchronize()
            ss[1].synchronize()
            res.append(cp.cuda.get_elapsed_time(a, b) * 1e3 / (2 * rounds))
        out["flag_one_way_us"] = statistics.median(res)
        print(f"pingpong: flag one way over NVLink {out['flag_one_way_us']:.2f} us")

        with cp.cuda.Device(1):
            peer_buf = cp.zeros(64 << 20, cp.uint8)
        with cp.cuda.Device(0):
            own_buf = cp.zeros(64 << 20, cp.uint8)
            res_d = cp.zeros(1, cp.uint64)
            f = mods[0]["fence_cost"]
            out["fence_ns"] = {}
            for label, buf, nbytes in (("local 0", own_buf, 0), ("local 64K", own_buf, 65536), ("peer 0", peer_buf, 0),
                                        ("peer 4K", peer_buf, 4096), ("peer 64K", peer_buf, 65536)):
                vals = []
                for _ in range(50):
                    f((1,), (512,), (buf, np.int64(nbytes // 16), res_d))
                    vals.append(int(res_d.get()[0]))
                out["fence_ns"][label] = statistics.median(vals)
            print("fence.acq_rel.sys after stores: " + ", ".join(f"{k} {v:.0f} ns" for k, v in out["fence_ns"].items()))
            bs = mods[0]["block_store"]
            stamp = cp.zeros(3 * 64, cp.uint64)
            out["block_store"] = []
            for where, buf in (("peer", peer_buf), ("local", own_buf)):
                for blocks in (1, 8, 64):
                    for narrow in (0, 1):
                        for kib in (8, 32):
                            issued, fenced = [], []
                            for _ in range(30):
                                bs((blocks,), (512,), (buf, np.int64(kib * 1024 // 16), np.int32(narrow), stamp))
                                v = stamp.get().astype(np.int64).reshape(64, 3)[:blocks]
                                issued.append(float((v[:, 1] - v[:, 0]).max()) / 1e3)
                                fenced.append(float((v[:, 2] - v[:, 0]).max()) / 1e3)
                            row = {"to": where, "blocks": blocks, "bytes_per_store": 8 if narrow else 16,
                                   "KiB_per_block": kib, "issued_us": statistics.median(issued),
                                   "fenced_us": statistics.median(fenced)}
                            out["block_store"].append(row)
                            print(f"{blocks:3d} block(s) x {kib:2d} KiB to {where:5s} in {row['bytes_per_store']:2d}-byte "
                                  f"stores: issued {row['issued_us']:.2f} us, fenced {row['fenced_us']:.2f} us "
                                  f"({kib * 1024 / row['fenced_us'] / 1e3:.1f} GB/s a block)")

        sp = mods[0]["spray"]
        out["remote_store"] = []
        with cp.cuda.Device(0):
            src = cp.ones(8 << 20, cp.uint8)
            dsts_all = []
            for p in range(1, n):
                with cp.cuda.Device(p):
                    dsts_all.append(cp.zeros(8 << 20, cp.uint8))
            local_dst = cp.zeros(8 << 20, cp.uint8)
        for nbytes in (256 << 10, 1 << 20, 2 << 20, 4 << 20):
            for grid in (sms // 2, sms, 2 * sms):
                for label, targets in (("1 peer", dsts_all[:1]), (f"{n - 1} peers", dsts_all), ("local", [local_dst])):
                    if label.endswith("peers") and n == 2:
                        continue
                    with cp.cuda.Device(0):
                        ptrs = cp.asarray(np.array([t.data.ptr for t in targets], np.uint64))
                    us = timed(0, lambda s: sp((grid,), (512,), (src, ptrs, np.int32(len(targets)),
                                                                 np.int64(nbytes // 16)), stream=s), reps=50)
                    gbs = nbytes * len(targets) / us / 1e3
                    out["remote_store"].append({"bytes": nbytes, "grid": grid, "to": label, "us": us, "GBps": gbs})
                    print(f"store {nbytes >> 10:5d} KiB x {label:8s} grid {grid:4d}: {us:7.2f} us {gbs:7.1f} GB/s")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
