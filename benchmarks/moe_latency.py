"""MoE dispatch and combine latency on the GPUs of one host (the NVLink
kernels of aiofabric.moe.gpu) against NCCL all_to_all carrying the same
bytes, in the same run.

DeepSeek-V3 shape: hidden 7168, 256 experts, top-8, FP8 dispatch (E4M3 with
one float32 scale per 128 channels), BF16 combine; 1, 32 and 128 tokens per
rank; EP2 and EP4 where the GPUs are there.  One process per GPU.  Every
iteration all GPUs are released together by a gate kernel spinning on a
host flag in shared memory (so host launch skew is not measured); the calls are made with
the group's own stream current (``ep.stream``), as a layer running on that
stream would, so they enqueue no cross-stream event waits; each phase
(dispatch, combine) is timed with CUDA events on every rank and the
iteration's latency is the slowest rank's.  p50/p99 over ``--iters``
iterations after ``--warmup``.

The NCCL baseline (torch.distributed, ``all_to_all_single``) moves exactly
the deduplicated rows the kernels move (7168 FP8 bytes + 56 scales per
(token, rank) for dispatch, 7168 BF16 values back for combine) with the
split sizes known in advance; it gets no routing, packing, count exchange or
reduction, so it is a lower bound for an NCCL-based MoE layer.

    python -m benchmarks.moe_latency [--iters 1000] [--warmup 50] [--ep 2 4] [--tokens 1 32 128]
                                     [--no-nccl] [--trace] [--json out.json]

What an interval contains: ``dispatch`` runs from an event recorded on the
group's stream right after the gate kernel has finished to an event after
``dispatch_recv``: the fused kernel's launch and run, including the wait for
the slowest peer (so the skew with which the peers left their gates, about a
host-memory poll, lands in it), nothing queued by the host in between (the
calls enqueue no events or cross-stream waits: the loop runs with
``ep.stream`` current).  ``combine`` likewise, after a second gate.  On H200
the event after the gate alone delays the next kernel's first block by about
3 us (``benchmarks/nvlink_probe.py``: 4.6 us from a kernel's end to the next
one's start with an event between, 1.6 us without); NCCL's intervals are
measured the same way and carry the same cost.

``--trace`` compiles the kernels with timing probes (``MOE_TRACE``): every
block of the fused kernels stores ``%globaltimer`` at fixed points, and the
table gives, per phase, when the first and last blocks started, when the
senders had stored and tagged their rows and when the receivers had seen
their first rows and ended, in us after the GPU left its gate (p50 of the
slowest rank).  ``--define NAME=VALUE`` and ``--set ATTR=VALUE`` compile
the kernels with a macro (``PAUSE_NS``, ``COPY_LOADS``) or override a launch
shape of ``GpuExpertParallel`` (``_recv_d``, ``_send_c``, ``_recv_c``) for
experiments.
"""
from __future__ import annotations

import argparse
import json
import mmap
import os
import platform
import socket
import subprocess
import tempfile
import time

import numpy as np

HIDDEN, EXPERTS, TOPK = 7168, 256, 8
FLAG_BYTES = 4096

GATE = r"""
extern "C" __global__ void moe_bench_gate(const unsigned long long* go, unsigned long long want,
                                          unsigned long long* stamp)
{
    unsigned long long t0, t;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t0));
    while (true) {
        unsigned long long v;
        asm volatile("ld.acquire.sys.u64 %0, [%1];" : "=l"(v) : "l"(go) : "memory");
        if (v >= want) {
            asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
            *stamp = t;  /* when this GPU left the gate (--trace) */
            return;
        }
        asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
        if (t - t0 > 30000000000ull)  /* 30 s: never hang the GPU */
            return;
    }
}
"""


def _problem(ep: int, tokens: int, rank: int) -> tuple[np.ndarray, list[np.ndarray], np.ndarray]:
    """Tokens (BF16 bits) and weights of ``rank``; top-k ids of every rank."""
    from aiofabric.moe.numerics import f32_to_bf16

    rng = np.random.default_rng(1000 + tokens)
    idx = [np.stack([rng.permutation(EXPERTS)[:TOPK] for _ in range(tokens)]).astype(np.int32) for _ in range(ep)]
    rng = np.random.default_rng(7 + rank)
    x = f32_to_bf16(rng.standard_normal((tokens, HIDDEN)).astype(np.float32))
    w = rng.random((tokens, TOPK)).astype(np.float32)
    return x, idx, w


def _rank(rank: int, ep: int, flag_path: str, port: int, tokens_list: list[int], iters: int, warmup: int,
          nccl: bool, conn, trace: bool = False, defines: tuple = (), sets: tuple = ()) -> None:
    try:
        conn.send(("ok", _rank_main(rank, ep, flag_path, port, tokens_list, iters, warmup, nccl, trace, defines,
                                    sets)))
    except BaseException as e:  # noqa: BLE001 - reported to the parent
        import traceback

        conn.send(("error", f"rank {rank}: {type(e).__name__}: {e}\n{traceback.format_exc()}"))


def _rank_main(rank: int, ep: int, flag_path: str, port: int, tokens_list: list[int], iters: int, warmup: int,
               nccl: bool, trace: bool = False, defines: tuple = (), sets: tuple = ()) -> dict:
    import cupy as cp

    from aiofabric.moe import MoEConfig
    from aiofabric.moe.gpu import GpuExpertParallel

    dist = None
    if nccl:
        import torch
        import torch.distributed as dist

        torch.cuda.set_device(rank)
        dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=ep)
    cp.cuda.Device(rank).use()
    rt = cp.cuda.runtime
    fd = os.open(flag_path, os.O_RDWR)
    mm = mmap.mmap(fd, FLAG_BYTES)
    flags = np.frombuffer(mm, np.uint64)
    fptr = flags.ctypes.data
    if not rt.deviceGetAttribute(rt.cudaDevAttrCanUseHostPointerForRegisteredMem, rank):
        raise RuntimeError(f"GPU {rank} cannot use host pointers for registered memory (gate flag)")
    rt.hostRegister(fptr, FLAG_BYTES, 1 | 2)  # portable | mapped
    gate = cp.RawKernel(GATE, "moe_bench_gate")

    def sync_point(v: int) -> None:
        """Every rank has queued up to phase v: rank 0 opens the gate."""
        flags[8 + rank] = v
        if rank == 0:
            deadline = time.monotonic() + 60
            while int(flags[8:8 + ep].min()) < v:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"ranks did not reach phase {v}: {flags[8:8 + ep]}")
            flags[0] = v

    cfg = MoEConfig(EXPERTS, ep, HIDDEN, TOPK, max(tokens_list), mode="fp8", combine_dtype="bf16")
    backend = None
    if trace or defines:
        from aiofabric.moe.cuda import CudaBackend

        backend = CudaBackend(rank, options=(("-DMOE_TRACE",) if trace else ()) + tuple(f"-D{d}" for d in defines))
    moe = GpuExpertParallel(None, rank, cfg, device=rank, validate=False, timeout=30, backend=backend)
    for item in sets:  # launch-shape experiments: --set _recv_d=32
        name, value = item.split("=", 1)
        if not hasattr(moe, name):
            raise ValueError(f"--set: GpuExpertParallel has no attribute {name}")
        setattr(moe, name, type(getattr(moe, name))(value))
    if rank == 0 and (trace or defines):
        for name in ("moe_dispatch", "moe_combine"):
            a = moe._b._k[name].attributes
            print(f"{name}: {a['num_regs']} registers, {a['local_size_bytes']} B local, "
                  f"{a['shared_size_bytes']} B static shared; resident {moe._b.resident(name, moe._threads)}", flush=True)
    stamps = cp.zeros(2, cp.uint64)
    if trace:
        tr_mem = backend.module.get_global("moe_trace")
        tr = cp.ndarray((2, 1024, 12), cp.uint64, tr_mem)
    # the handle exchange: through a file next to the flag (no engine needed in this benchmark)
    info_path = f"{flag_path}.{rank}"
    with open(info_path + ".tmp", "wb") as f:
        f.write(moe.info())
    os.replace(info_path + ".tmp", info_path)
    deadline = time.monotonic() + 120
    while not all(os.path.exists(f"{flag_path}.{r}") for r in range(ep)):
        if time.monotonic() > deadline:
            raise TimeoutError("ranks did not publish their handles")
        time.sleep(0.01)
    infos = []
    for r in range(ep):
        with open(f"{flag_path}.{r}", "rb") as f:
            infos.append(f.read())
    moe.connect(infos)
    stream = moe._b.stream
    y = cp.zeros((cfg.experts_per_rank, cfg.capacity, HIDDEN), cp.uint16)
    ev = [cp.cuda.Event() for _ in range(4)]
    step = int(flags[8 + rank])  # phases continue across configs
    out: dict = {}
    for tokens in tokens_list:
        x_h, idx_h, w_h = _problem(ep, tokens, rank)
        x, idx, w = cp.asarray(x_h), cp.asarray(idx_h[rank]), cp.asarray(w_h)
        cp.cuda.Device(rank).synchronize()  # inputs (and y) made on the null stream are ready
        ours_d, ours_c = [], []
        traces: dict = {}
        stream.use()  # the caller runs on the group's stream: no cross-stream event waits in the calls
        for it in range(warmup + iters):
            step += 2
            if trace:
                tr.fill(0)  # on the current stream: ours
            gate((1,), (1,), (np.uint64(fptr), np.uint64(step - 1), stamps[0:1]), stream=stream)
            ev[0].record(stream)
            moe.dispatch_send(x, idx, w)
            moe.dispatch_recv()
            ev[1].record(stream)
            gate((1,), (1,), (np.uint64(fptr), np.uint64(step), stamps[1:2]), stream=stream)
            ev[2].record(stream)
            moe.combine_send(y)
            moe.combine_recv()
            ev[3].record(stream)
            sync_point(step - 1)
            ev[1].synchronize()
            sync_point(step)
            ev[3].synchronize()
            if it >= warmup:
                ours_d.append(cp.cuda.get_elapsed_time(ev[0], ev[1]) * 1e3)
                ours_c.append(cp.cuda.get_elapsed_time(ev[2], ev[3]) * 1e3)
                if trace:
                    for key, v in _trace_points(tr.get(), stamps.get(), tokens, moe._send_c).items():
                        traces.setdefault(key, []).append(v)
        cp.cuda.Stream.null.use()
        moe.synchronize()
        res = {"aiofabric_dispatch_us": ours_d, "aiofabric_combine_us": ours_c}
        res.update({f"trace_{k}_us": v for k, v in traces.items()})
        if nccl:
            try:
                res.update(_nccl(rank, ep, cfg, idx_h, gate, fptr, sync_point, step, iters, warmup))
                step = res.pop("step")
            except Exception as e:  # noqa: BLE001 - the baseline failing must not lose our numbers
                res["nccl_error"] = f"{type(e).__name__}: {e}"
                nccl = False
        out[tokens] = res
    moe.close()
    rt.hostUnregister(fptr)  # the mapping itself goes with the process
    os.close(fd)
    if dist is not None:
        dist.destroy_process_group()
    return out


#: the kernels' extra probe points (kernels.py, trace(kernel, point)), by phase
POINTS = {"dispatch": {7: "own_slots", 8: "staged", 9: "looked_up", 10: "counted", 4: "routed", 5: "headers",
                       6: "payload"},
          "combine": {4: "started_rows", 5: "first_row"}}


def _trace_points(tr: np.ndarray, stamps: np.ndarray, tokens: int, senders_c: int) -> dict:
    """The fused kernels' probes of one iteration, us after this GPU left the
    gate: when blocks started, when the senders had stored and then tagged,
    when the receivers had seen the metas / first rows and when they ended."""
    out = {}
    for k, (name, g, ns) in enumerate((("dispatch", stamps[0], tokens + 1), ("combine", stamps[1], senders_c))):
        t = tr[k].astype(np.int64)
        live = t[:, 0] != 0
        rel = (t - np.int64(g)) / 1e3
        snd, rcv = rel[:ns][live[:ns]], rel[ns:][live[ns:]]
        out[f"{name}_first_start"] = float(rel[live, 0].min())
        out[f"{name}_last_start"] = float(rel[live, 0].max())
        if len(snd):
            out[f"{name}_senders_stored"] = float(snd[:, 1].max())
            out[f"{name}_senders_tagged"] = float(snd[:, 2].max())
            for p, label in POINTS[name].items():
                got = t[:ns][live[:ns], p] != 0
                if got.any():
                    out[f"{name}_senders_{label}"] = float(snd[got, p].max())
        if len(rcv):
            out[f"{name}_receivers_saw_first"] = float(rcv[:, 1].max())
            out[f"{name}_receivers_end"] = float(rcv[:, 3].max())
    return out


def _nccl(rank, ep, cfg, idx_h, gate, fptr, sync_point, step, iters, warmup) -> dict:
    """The NCCL all_to_all_single baseline of one token count (same gates)."""
    import cupy as cp
    import torch
    import torch.distributed as dist

    from aiofabric.moe.layout import route

    body = cfg.payload_bytes + cfg.scale_bytes
    rows = np.array([route(cfg, i).rows for i in idx_h])  # [src, dst]
    d_in = [int(rows[rank, r]) * body for r in range(ep)]
    d_out = [int(rows[s, rank]) * body for s in range(ep)]
    c_in = [int(rows[s, rank]) * HIDDEN for s in range(ep)]  # BF16 elements back to each source
    c_out = [int(rows[rank, r]) * HIDDEN for r in range(ep)]
    dev = torch.device("cuda", rank)
    ds, dr = torch.empty(sum(d_in), dtype=torch.uint8, device=dev), torch.empty(sum(d_out), dtype=torch.uint8,
                                                                                 device=dev)
    cs, cr = torch.empty(sum(c_in), dtype=torch.bfloat16, device=dev), torch.empty(sum(c_out),
                                                                                  dtype=torch.bfloat16,
                                                                                  device=dev)
    ts = torch.cuda.Stream(device=dev)  # NCCL's calls and their gate run on this stream
    try:
        gs = cp.cuda.ExternalStream(ts.cuda_stream, rank)
    except TypeError:  # a CuPy whose ExternalStream takes the pointer only
        gs = cp.cuda.ExternalStream(ts.cuda_stream)
    tev = [torch.cuda.Event(enable_timing=True) for _ in range(4)]
    stamp = cp.zeros(1, cp.uint64)
    nd, nc = [], []
    with torch.cuda.stream(ts):  # connect NCCL's peers outside the gated loop
        dist.all_to_all_single(dr, ds, d_out, d_in)
        dist.all_to_all_single(cr, cs, c_out, c_in)
    torch.cuda.synchronize(dev)
    with torch.cuda.stream(ts):
        for it in range(warmup + iters):
            step += 2
            gate((1,), (1,), (np.uint64(fptr), np.uint64(step - 1), stamp), stream=gs)
            tev[0].record(ts)
            dist.all_to_all_single(dr, ds, d_out, d_in)
            tev[1].record(ts)
            gate((1,), (1,), (np.uint64(fptr), np.uint64(step), stamp), stream=gs)
            tev[2].record(ts)
            dist.all_to_all_single(cr, cs, c_out, c_in)
            tev[3].record(ts)
            sync_point(step - 1)
            tev[1].synchronize()
            sync_point(step)
            tev[3].synchronize()
            if it >= warmup:
                nd.append(tev[0].elapsed_time(tev[1]) * 1e3)
                nc.append(tev[2].elapsed_time(tev[3]) * 1e3)
    return {"nccl_dispatch_us": nd, "nccl_combine_us": nc, "rows_sent": [int(v) for v in rows[rank]], "step": step}


def run_ep(ep: int, tokens_list: list[int], iters: int, warmup: int, nccl: bool, limit_s: float,
           trace: bool = False, defines: tuple = (), sets: tuple = ()) -> dict:
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    tmp = tempfile.mkdtemp(prefix="aiofabric-moe-bench-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
    flag_path = os.path.join(tmp, "flags")
    with open(flag_path, "wb") as f:
        f.write(bytes(FLAG_BYTES))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs, conns = [], []
    for r in range(ep):
        here, there = ctx.Pipe()
        p = ctx.Process(target=_rank, args=(r, ep, flag_path, port, tokens_list, iters, warmup, nccl, there, trace,
                                tuple(defines), tuple(sets)),
                        daemon=True)
        p.start()
        procs.append(p)
        conns.append(here)
    results = []
    try:
        deadline = time.monotonic() + limit_s
        for c in conns:
            if not c.poll(max(1.0, deadline - time.monotonic())):
                raise TimeoutError(f"EP{ep}: a rank did not finish within {limit_s:.0f} s")
            kind, val = c.recv()
            if kind != "ok":
                raise RuntimeError(val)
            results.append(val)
    finally:
        for p in procs:
            p.join(5)
            if p.is_alive():
                p.kill()
        for name in os.listdir(tmp):
            os.unlink(os.path.join(tmp, name))
        os.rmdir(tmp)
    return summarize(ep, tokens_list, results)


def summarize(ep: int, tokens_list: list[int], results: list[dict]) -> dict:
    """Per token count: p50/p99 of the slowest rank per iteration, per series."""
    summary = {}
    for tokens in tokens_list:
        row: dict = {"ep": ep, "tokens": tokens}
        errors = [r[tokens]["nccl_error"] for r in results if "nccl_error" in r[tokens]]
        if errors:
            row["nccl_error"] = errors[0]
        for key in results[0][tokens]:
            if not key.endswith("_us") or not all(len(r[tokens].get(key, ())) == len(results[0][tokens][key])
                                                  for r in results):
                continue
            worst = np.max(np.array([r[tokens][key] for r in results]), axis=0)  # slowest rank per iteration
            row[key] = {"p50": float(np.percentile(worst, 50)), "p99": float(np.percentile(worst, 99)),
                        "iters": int(len(worst))}
        summary[tokens] = row
    return summary


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--iters", type=int, default=1000)
    ap.add_argument("--warmup", type=int, default=50)
    ap.add_argument("--ep", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--tokens", type=int, nargs="+", default=[1, 32, 128])
    ap.add_argument("--no-nccl", action="store_true", help="skip the torch.distributed baseline")
    ap.add_argument("--limit", type=float, default=300, help="seconds allowed per EP size")
    ap.add_argument("--trace", action="store_true",
                    help="compile the kernels with timing probes and print when each role reached each point")
    ap.add_argument("--define", action="append", default=[], metavar="NAME[=VALUE]",
                    help="compile the kernels with -DNAME[=VALUE] (kernel experiments)")
    ap.add_argument("--set", action="append", default=[], metavar="ATTR=VALUE",
                    help="override a launch shape of GpuExpertParallel, e.g. _recv_d=32 (kernel experiments)")
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    import cupy as cp

    n = cp.cuda.runtime.getDeviceCount()
    card = cp.cuda.runtime.getDeviceProperties(0)["name"].decode()
    nccl = not args.no_nccl
    if nccl:
        try:
            import torch.distributed  # noqa: F401
        except ImportError:
            print("torch is not installed: no NCCL baseline")
            nccl = False
    eps = [e for e in args.ep if 2 <= e <= n]
    for e in args.ep:
        if e not in eps:
            print(f"EP{e} skipped: needs 2 <= EP <= the {n} visible GPUs")
    out = {"benchmark": "moe_latency", "card": card, "gpus": n, "commit": _commit(), "host": platform.node(),
           "shape": {"hidden": HIDDEN, "experts": EXPERTS, "topk": TOPK, "dispatch": "fp8 e4m3 + f32 scale/128",
                     "combine": "bf16"},
           "iters": args.iters, "warmup": args.warmup, "trace": args.trace, "defines": args.define, "sets": args.set,
           "rows": []}
    if not eps:
        print(f"needs 2 or more GPUs for EP{args.ep}, found {n}")
        return 1
    failed = []
    for ep in eps:
        try:
            res = run_ep(ep, args.tokens, args.iters, args.warmup, nccl, args.limit, args.trace,
                         tuple(args.define), tuple(args.set))
        except (RuntimeError, TimeoutError) as e:
            print(f"EP{ep} failed: {e}")
            failed.append({"ep": ep, "error": str(e)})
            continue
        out["rows"].extend(res.values())
        for row in res.values():
            if "nccl_error" in row:
                print(f"EP{ep} {row['tokens']} tokens: NCCL baseline failed: {row['nccl_error']}")
    out["failed"] = failed
    print_table(out)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return 1 if failed else 0


def print_table(out: dict) -> None:
    print(f"MoE latency, {out['card']} x{out['gpus']}, DeepSeek-V3 shape (hidden {HIDDEN}, {EXPERTS} experts, "
          f"top-{TOPK}, FP8 dispatch, BF16 combine); slowest rank per iteration, {out['iters']} iterations, us")
    hdr = f"{'EP':>3} {'tokens':>6} | {'op':>8} | {'aiofabric p50':>13} {'p99':>7} | {'NCCL a2a p50':>12} {'p99':>7} | " \
          f"{'NCCL/ours':>9}"
    print(hdr)
    for row in out["rows"]:
        for op in ("dispatch", "combine"):
            a = row[f"aiofabric_{op}_us"]
            b = row.get(f"nccl_{op}_us")
            nccl_s = f"{b['p50']:12.1f} {b['p99']:7.1f}" if b else f"{'-':>12} {'-':>7}"
            ratio = f"{b['p50'] / a['p50']:9.2f}" if b else f"{'-':>9}"
            print(f"{row['ep']:>3} {row['tokens']:>6} | {op:>8} | {a['p50']:13.1f} {a['p99']:7.1f} | {nccl_s} | "
                  f"{ratio}")
    points = sorted({k for row in out["rows"] for k in row if k.startswith("trace_")})
    if points:
        print("probes (--trace): p50 us after the GPU left its gate, slowest rank per iteration")
        for row in out["rows"]:
            for phase in ("dispatch", "combine"):
                cells = [(k[7 + len(phase):-3], row[k]["p50"]) for k in points
                         if k in row and k.startswith(f"trace_{phase}_")]
                print(f"EP{row['ep']} {row['tokens']:>4} tokens {phase:>8}: " +
                      ", ".join(f"{name} {v:.1f}" for name, v in sorted(cells, key=lambda c: c[1])))


if __name__ == "__main__":
    raise SystemExit(main())
