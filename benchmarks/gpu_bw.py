"""The NVLink path against CUDA's own copies, in one process and one run.

Single writes GPU0 -> GPU1 (aiofabric ``engine.write`` awaited, i.e. copy
done and the completion back in asyncio) against ``cudaMemcpyPeerAsync`` +
synchronize; paged writes (one kernel per page list) against one contiguous
peer copy of the same bytes (the ceiling) and against one
``cudaMemcpyPeerAsync`` per page (what naive code does); and the latency
from ``write(imm=...)`` to the target's counter.  Alternating repetitions,
medians.  Needs CuPy and a GPU (two for NVLink; one runs GPU0 -> GPU0).

    python -m benchmarks.gpu_bw [--reps 5] [--json out.json]
"""
from __future__ import annotations

import argparse
import asyncio
import cProfile
import io
import json
import pstats
import statistics
import time

import numpy as np

import aiofabric as af
from aiofabric.gpu import PageLauncher


def _median(xs: list[float]) -> float:
    return statistics.median(xs)


async def run(reps: int) -> dict:
    import cupy as cp

    rt = cp.cuda.runtime
    n_gpus = rt.getDeviceCount()
    s_dev, d_dev = (0, 1) if n_gpus >= 2 else (0, 0)
    name = rt.getDeviceProperties(0)["name"].decode()
    out: dict = {"card": name, "gpus": n_gpus, "src": s_dev, "dst": d_dev, "single": [], "pages": []}
    big = 1 << 30
    async with af.open_engine("shm") as a, af.open_engine("shm") as b:
        with cp.cuda.Device(s_dev):
            src = cp.random.default_rng(0).integers(0, 256, big, dtype=cp.uint8)
            stream = cp.cuda.Stream(non_blocking=True)
        with cp.cuda.Device(d_dev):
            dst = cp.zeros(big + (64 << 20), dtype=cp.uint8)
        if s_dev != d_dev:
            with cp.cuda.Device(s_dev):
                try:
                    rt.deviceEnablePeerAccess(d_dev)
                except rt.CUDARuntimeError:
                    pass
        rs, rd = a.register(src, remote_write=False), b.register(dst)
        desc = rd.descriptor()

        def peer_copy(dst_ptr: int, src_ptr: int, n: int) -> None:
            rt.memcpyPeerAsync(dst_ptr, d_dev, src_ptr, s_dev, n, stream.ptr)

        for size in (1 << 20, 64 << 20, big):
            fab, raw = [], []
            await a.write(rs[0:size], desc[0:size])  # warm up (maps, streams)
            for _ in range(reps):
                t0 = time.perf_counter()
                await a.write(rs[0:size], desc[0:size])
                fab.append(time.perf_counter() - t0)
                with cp.cuda.Device(s_dev):
                    t0 = time.perf_counter()
                    peer_copy(dst.data.ptr, src.data.ptr, size)
                    stream.synchronize()
                    raw.append(time.perf_counter() - t0)
            row = {"bytes": size, "aiofabric_GBps": size / _median(fab) / 1e9,
                   "memcpy_peer_GBps": size / _median(raw) / 1e9}
            row["ratio"] = row["aiofabric_GBps"] / row["memcpy_peer_GBps"]
            out["single"].append(row)
        with cp.cuda.Device(d_dev):
            dst.fill(0)
            cp.cuda.Device(d_dev).synchronize()
        await a.write(rs, desc[0:big])
        with cp.cuda.Device(d_dev):
            out["single_verified"] = bool(cp.array_equal(dst[0:big], cp.asarray(src)))

        rng = np.random.default_rng(1)
        for page, n in ((4096, 4096), (16384, 4096), (32768, 2048), (65536, 4096)):
            slots = big // page
            sidx = rng.choice(slots, n, replace=False).astype(np.int64)
            didx = rng.choice(slots, n, replace=False).astype(np.int64)
            total = page * n
            await a.write_pages(rs, desc, page, sidx, didx)
            a._gpu.mapped_args = True
            await a.write_pages(rs, desc, page, sidx, didx)
            # aiofabric in both argument modes and the contiguous copy, taking
            # turns (the order rotates each repetition); the per-page loop apart,
            # after them (2048+ calls: it would disturb whatever follows it).
            fab, mapped, ceil, naive = [], [], [], []

            async def one_call(host_args: bool, page: int = page, sidx: np.ndarray = sidx,
                               didx: np.ndarray = didx) -> float:
                a._gpu.mapped_args = host_args
                t0 = time.perf_counter()
                await a.write_pages(rs, desc, page, sidx, didx)
                return time.perf_counter() - t0

            def contiguous(total: int = total) -> float:
                with cp.cuda.Device(s_dev):
                    t0 = time.perf_counter()
                    peer_copy(dst.data.ptr, src.data.ptr, total)
                    stream.synchronize()
                    return time.perf_counter() - t0

            for i in range(reps):
                for step in ((0, 1, 2), (1, 2, 0), (2, 0, 1))[i % 3]:
                    if step == 0:
                        fab.append(await one_call(False))
                    elif step == 1:
                        mapped.append(await one_call(True))
                    else:
                        ceil.append(contiguous())
            a._gpu.mapped_args = False
            with cp.cuda.Device(s_dev):
                for _ in range(3):
                    t0 = time.perf_counter()
                    for k in range(n):
                        peer_copy(dst.data.ptr + int(didx[k]) * page, src.data.ptr + int(sidx[k]) * page, page)
                    stream.synchronize()
                    naive.append(time.perf_counter() - t0)
            # Where the time goes: the kernel alone (device events), and the call's host cost.
            launcher = a._gpu._kernels[s_dev]
            with cp.cuda.Device(s_dev):
                nb = PageLauncher.nbytes(n)
                host, args = cp.cuda.alloc_pinned_memory(nb), cp.empty(nb, dtype=cp.uint8)
                PageLauncher.pack(host, src.data.ptr, dst.data.ptr, sidx, didx, page, page, page)
                rt.memcpy(args.data.ptr, host.ptr, nb, 1)
            ev0, ev1 = cp.cuda.Event(), cp.cuda.Event()
            ktimes, calls, device_wait, detect = [], [], [], []
            with cp.cuda.Device(s_dev):
                for _ in range(reps):
                    ev0.record(stream)
                    launcher.launch(stream.ptr, args.data.ptr, n, page)
                    ev1.record(stream)
                    ev1.synchronize()
                    ktimes.append(cp.cuda.get_elapsed_time(ev0, ev1) / 1e3)
            own = a._gpu._stream(s_dev)
            for _ in range(reps):  # the call, then the device, then noticing the end
                t0 = time.perf_counter()
                f = a.write_pages(rs, desc, page, sidx, didx)
                t1 = time.perf_counter()
                own.synchronize()
                t2 = time.perf_counter()
                await f
                t3 = time.perf_counter()
                calls.append(t1 - t0)
                device_wait.append(t2 - t1)
                detect.append(t3 - t2)
            piped = []  # four calls in flight, as a layer-by-layer sender issues them
            for _ in range(reps):
                t0 = time.perf_counter()
                await asyncio.gather(*(a.write_pages(rs, desc, page, sidx, didx) for _ in range(4)))
                piped.append(time.perf_counter() - t0)
            if page == 32768:  # where a call's host time goes (top functions by own time)
                prof = cProfile.Profile()
                prof.enable()
                for _ in range(200):
                    f = a.write_pages(rs, desc, page, sidx, didx)
                    prof.disable()
                    await f
                    prof.enable()
                prof.disable()
                text = io.StringIO()
                pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(25)
                out["call_profile"] = text.getvalue()
            row = {"page": page, "pages": n, "aiofabric_GBps": total / _median(fab) / 1e9,
                   "kernel_GBps": total / _median(ktimes) / 1e9, "call_us": _median(calls) * 1e6,
                   "device_wait_us": _median(device_wait) * 1e6, "detect_us": _median(detect) * 1e6,
                   "pipelined_GBps": 4 * total / _median(piped) / 1e9,
                   "contiguous_GBps": total / _median(ceil) / 1e9, "per_page_copies_GBps": total / _median(naive) / 1e9,
                   "aiofabric_Mpages_s": n / _median(fab) / 1e6}
            row["ratio_to_contiguous"] = row["aiofabric_GBps"] / row["contiguous_GBps"]
            row["mapped_args_GBps"] = total / _median(mapped) / 1e9
            row["mapped_args_ratio"] = row["mapped_args_GBps"] / row["contiguous_GBps"]
            row["pipelined_ratio"] = row["pipelined_GBps"] / row["contiguous_GBps"]
            out["pages"].append(row)
        with cp.cuda.Device(d_dev):
            dst.fill(0)
            cp.cuda.Device(d_dev).synchronize()
        await a.write_pages(rs, desc, page, sidx, didx)
        with cp.cuda.Device(d_dev):
            got = cp.asnumpy(dst[: slots * page].reshape(slots, page)[didx])
            untouched = dst[: slots * page].reshape(slots, page).sum(axis=1) == 0
            out["pages_outside_untouched"] = int(untouched.sum()) == slots - n
        with cp.cuda.Device(s_dev):
            want = cp.asnumpy(src[: slots * page].reshape(slots, page)[sidx])
        out["pages_verified"] = bool(np.array_equal(got, want))

        out["watcher"] = await _watcher_latency(a, b, s_dev)

        counter = b.imm_counter(77)
        lat = []
        for i in range(300):
            t0 = time.perf_counter()
            a.write(rs[0:4096], desc[0:4096], imm=77)
            await counter.wait(1)
            if i >= 50:
                lat.append(time.perf_counter() - t0)
        lat.sort()
        out["imm_latency_us"] = {"p50": lat[len(lat) // 2] * 1e6, "p99": lat[int(len(lat) * 0.99)] * 1e6,
                                 "max": lat[-1] * 1e6}
    return out


_SPIN_BUMP = r"""
extern "C" __global__ void spin_bump(unsigned long long* out, const unsigned long long* go, long long n)
{
    /* Round k: wait until the host raises `go` to k, then bump `out` to k. */
    for (long long k = 1; k <= n; k++) {
        unsigned long long v;
        do {
            asm volatile("ld.acquire.sys.u64 %0, [%1];" : "=l"(v) : "l"(go) : "memory");
        } while (v < (unsigned long long)k);
        asm volatile("st.release.sys.u64 [%0], %1;" :: "l"(out), "l"((unsigned long long)k) : "memory");
    }
}
"""


async def _watcher_latency(a, b, device: int, rounds: int = 2000) -> dict:
    """A kernel bumps slot 0 when the host raises slot 1; an arm on slot 0
    notifies the peer.  Host clock (CLOCK_MONOTONIC) from raising slot 1 to
    the watcher seeing / posting, and to the peer's counter: upper bounds of
    the kernel's bump to post (they include the ~1.5 µs the go flag takes to
    reach the GPU)."""
    import cupy as cp

    from aiofabric import gpu as afgpu

    w = a.watcher(slots=2)
    afgpu.attach_watcher(w, device)
    w.trace(rounds)
    counter = b.imm_counter(99)
    with cp.cuda.Device(device):
        k = cp.RawKernel(_SPIN_BUMP, "spin_bump")
        stream = cp.cuda.Stream(non_blocking=True)
        k((1,), (1,), (np.uint64(w.slot_address(0)), np.uint64(w.slot_address(1)), np.int64(rounds)), stream=stream)
    go, to_counter = [], []
    try:
        for i in range(1, rounds + 1):
            fut = w.arm_notify(0, i, b.address, 99)
            t0 = time.monotonic_ns()
            w.buffer[1] = i  # raise the go flag (a plain store: the GPU polls it)
            go.append(t0)
            await asyncio.wait_for(fut, 10)
            await asyncio.wait_for(counter.wait(1), 10)
            to_counter.append(time.monotonic_ns() - t0)
    finally:
        w.buffer[1] = rounds  # never leave the kernel spinning
        with cp.cuda.Device(device):
            stream.synchronize()
    samples = w.trace_samples()
    w.close()
    seen = np.array([s["seen_ns"] for s in samples], dtype=np.int64) - np.array(go[: len(samples)], dtype=np.int64)
    posted = np.array([s["posted_ns"] for s in samples], dtype=np.int64) - np.array(go[: len(samples)], dtype=np.int64)

    def pct(x, q):
        return float(np.percentile(np.asarray(x[100:], dtype=np.float64), q)) / 1e3  # skip warm-up

    return {"rounds": rounds, "samples": len(samples),
            "go_to_seen_us": {"p50": pct(seen, 50), "p99": pct(seen, 99)},
            "go_to_posted_us": {"p50": pct(posted, 50), "p99": pct(posted, 99)},
            "go_to_counter_us": {"p50": pct(to_counter, 50), "p99": pct(to_counter, 99)}}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    res = asyncio.run(run(args.reps))
    print(f"NVLink path, {res['card']} x{res['gpus']}, GPU{res['src']} -> GPU{res['dst']}, medians of {args.reps}")
    print(f"{'single write':>14} {'aiofabric GB/s':>15} {'cudaMemcpyPeer GB/s':>20} {'ratio':>6}")
    for r in res["single"]:
        print(f"{r['bytes'] >> 20:>10} MiB {r['aiofabric_GBps']:15.1f} {r['memcpy_peer_GBps']:20.1f} {r['ratio']:6.2f}")
    print(f"{'page list':>14} {'aiofabric GB/s':>15} {'Mpages/s':>9} {'contiguous GB/s':>16} {'per-page copies':>16} "
          f"{'ratio':>6} {'kernel GB/s':>12} {'call us':>8} {'device us':>9} {'detect us':>9} {'4 in flight':>12} "
          f"{'ratio':>6}")
    for r in res["pages"]:
        print(f"{r['pages']:>5}x{r['page'] >> 10:>3} KiB {r['aiofabric_GBps']:15.1f} {r['aiofabric_Mpages_s']:9.2f} "
              f"{r['contiguous_GBps']:16.1f} {r['per_page_copies_GBps']:16.1f} {r['ratio_to_contiguous']:6.2f} "
              f"{r['kernel_GBps']:12.1f} {r['call_us']:8.1f} {r['device_wait_us']:9.1f} {r['detect_us']:9.1f} {r['pipelined_GBps']:12.1f} {r['pipelined_ratio']:6.2f}")
    print("page lists, the kernel reading its arguments from pinned host memory (the other mode): "
          + ", ".join(f"{r['page'] >> 10} KiB {r['mapped_args_GBps']:.1f} GB/s ({r['mapped_args_ratio']:.2f})"
                      for r in res["pages"]))
    lat = res["imm_latency_us"]
    print(f"write(4 KiB, imm) -> target counter: p50 {lat['p50']:.1f} us, p99 {lat['p99']:.1f} us, max {lat['max']:.1f} us")
    wl = res["watcher"]
    print(f"watcher, kernel bump (upper bound: from the host's go flag): seen p50 {wl['go_to_seen_us']['p50']:.1f} "
          f"p99 {wl['go_to_seen_us']['p99']:.1f} us; posted p50 {wl['go_to_posted_us']['p50']:.1f} "
          f"p99 {wl['go_to_posted_us']['p99']:.1f} us; target counter p50 {wl['go_to_counter_us']['p50']:.1f} "
          f"p99 {wl['go_to_counter_us']['p99']:.1f} us ({wl['samples']} samples)")
    print(f"bytes verified: single {res['single_verified']}, pages {res['pages_verified']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)
    return 0 if res["single_verified"] and res["pages_verified"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
