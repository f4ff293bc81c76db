"""RL weight update on one host: trainer GPUs -> inference GPUs over the NVLink
path, against gathering to one rank and broadcasting with NCCL.

Half the GPUs are trainer ranks (FSDP shards of BF16 weights), half inference
ranks (one tensor/expert-parallel group); one process per rank.  Weights:
a real architecture's shapes (default Qwen3-235B-A22B: its embedding, head and
the first few layers, ``--gb`` of BF16 in all), random.  Three ways, each run
``--reps`` times after a warm-up, every result verified bit for bit:

- ``aiofabric``: the planned update, BF16 -> BF16 (``run_source`` /
  ``run_destination``: CUDA buffers registered with the engine, provider
  ``shm`` for the control plane and the immediates);
- ``aiofabric-fp8``: the same with the cast to FP8 (128-element block scales)
  on the trainer GPUs;
- ``nccl``: trainer rank 0 gathers every parameter (NCCL send/recv), then
  broadcasts it to the inference ranks, which copy out their shard (BF16).

Prints the median times, the ratio, and the achieved GB/s of the plan's
busiest link.  Needs PyTorch, CuPy and 2 or 4 GPUs.

    python3 -m benchmarks.weights_bw [--gpus 4] [--gb 12] [--reps 3] [--json out.json]
    python3 -m benchmarks.weights_bw --dry-run     # the plans only (no GPU)
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from datetime import timedelta
from typing import Any

import numpy as np

from aiofabric.weights import Layout, ParamSpec, Plan, plan
from aiofabric.weights.models import inference_dim, model, quantized

MODES = ("aiofabric", "aiofabric-fp8", "nccl")


def log(who: str, msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {who}: {msg}", flush=True)


def configure(model_name: str, gb: float, n_src: int, n_dst: int) -> tuple[list[ParamSpec], Plan, Plan, int]:
    """(params, BF16 plan, FP8 plan, layers): as many layers as fit ``gb`` GB of BF16 with the ends."""
    m = model(model_name)
    ends = sum(p.numel * p.itemsize for p in m.params(0))
    per_layer = (sum(p.numel * p.itemsize for p in m.params(2)) - ends) / 2
    layers = max(1, round((gb * 1e9 - ends) / per_layer))
    params = m.params(layers)
    src = Layout.fsdp(params, n_src)
    dst16 = Layout.tensor_parallel(params, n_dst, dims=inference_dim)
    dst8 = Layout.tensor_parallel([p._replace(dtype="fp8_e4m3") if quantized(p) else p for p in params], n_dst,
                                  dims=inference_dim)
    return params, plan(src, dst16), plan(src, dst8), layers


def _commit() -> str:
    try:
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], text=True,
                                       stderr=subprocess.DEVNULL).strip()
    except Exception:  # noqa: BLE001 - no git: say so
        return "unknown"


def busiest(pl: Plan) -> int:
    s, _, d = pl.link_bytes()
    return int(max(s.max(), d.max()))


# -- one rank ---------------------------------------------------------------------------------


class Rank:
    def __init__(self, rank: int, world: int, args: Any) -> None:
        import torch

        self.torch = torch
        self.rank, self.world, self.args = rank, world, args
        self.n_src = world // 2
        self.is_src = rank < self.n_src
        self.r = rank if self.is_src else rank - self.n_src  # rank within its side
        self.who = f"{'trainer' if self.is_src else 'inference'} {self.r} (GPU {rank})"
        self.params, self.p16, self.p8, self.layers = configure(args.model, args.gb, self.n_src, world - self.n_src)
        self.dt = {"bf16": torch.bfloat16, "fp32": torch.float32}

    def alloc(self, n: int) -> Any:
        import cupy as cp

        with cp.cuda.Device(self.rank):
            arr = cp.zeros(n, dtype=cp.uint8)
            cp.cuda.Device(self.rank).synchronize()
        return arr

    def zero(self, arr: Any) -> None:
        import cupy as cp

        with cp.cuda.Device(self.rank):
            arr.fill(0)
            cp.cuda.Device(self.rank).synchronize()

    def full(self, i: int, seed: int) -> Any:
        """Parameter i's full tensor (the same on every rank: seeded on the device)."""
        torch = self.torch
        p = self.params[i]
        g = torch.Generator(device="cuda")
        g.manual_seed(seed * 100003 + i)
        return torch.randn(p.shape, generator=g, device="cuda", dtype=torch.float32).to(self.dt[p.dtype])

    @staticmethod
    def part(t: Any, shard: Any) -> Any:
        if shard.dim is None:
            return t
        return t.narrow(shard.dim, shard.start, shard.stop - shard.start)

    def view(self, buf: Any, off: int, shape: tuple[int, ...], dtype: Any) -> Any:
        n = int(np.prod(shape)) * self.torch.empty(0, dtype=dtype).element_size()
        return buf[off:off + n].view(dtype).view(shape)

    def fill_src(self, buf: Any, seed: int) -> None:
        pl = self.p16
        for i, p in enumerate(self.params):
            s = pl.src.shards[i][self.r]
            if s is not None:
                off = pl._src_off[self.r][i]
                self.view(buf, off, s.shape_of(p.shape), self.dt[p.dtype]).copy_(self.part(self.full(i, seed), s))
        self.torch.cuda.synchronize()

    def verify(self, pl: Plan, buf: Any, seed: int) -> list[str]:
        """Names of the parameters whose bytes in ``buf`` differ from what the update must deliver."""
        torch = self.torch
        bad = []
        for i, p in enumerate(self.params):
            s = pl.dst.shards[i][self.r]
            if s is None:
                continue
            want = self.part(self.full(i, seed), s).contiguous()
            off, soff = pl._dst_off[self.r][i]
            shape = s.shape_of(p.shape)
            if not pl.cast(i):
                got = self.view(buf, off, shape, self.dt[p.dtype])
                ok = torch.equal(got.view(torch.uint8) if got.dtype != torch.uint8 else got,
                                 want.view(torch.uint8))
            else:
                codes, scales = self._quantize(want, pl.options.fp8_block)
                n, ns = codes.numel(), scales.numel()  # both in bytes
                ok = torch.equal(buf[off:off + n], codes) and torch.equal(buf[soff:soff + ns], scales)
            if not ok:
                bad.append(p.name)
        return bad

    def _quantize(self, t: Any, block: int) -> tuple[Any, Any]:
        """Reference FP8 codes and scale bytes of a contiguous BF16 shard (the CUDA kernel, one row per piece)."""
        from aiofabric.weights.cast_gpu import quantize_runs_gpu

        torch = self.torch
        cols = t.shape[-1]
        rows = t.numel() // cols
        nb = -(-cols // block)
        codes = torch.empty(rows * cols, dtype=torch.uint8, device="cuda")
        scales = torch.empty(rows * nb * 4, dtype=torch.uint8, device="cuda")
        torch.cuda.synchronize()
        quantize_runs_gpu(t.data_ptr(), (np.arange(rows, dtype=np.int64) * cols).reshape(rows, 1), 1, cols,
                          codes.data_ptr(), scales.data_ptr(), block=block, device=torch.cuda.current_device())
        torch.cuda.synchronize()
        return codes, scales


async def _rank_main(rank: int, world: int, args: Any, port: int, out_path: str) -> None:
    import torch
    import torch.distributed as dist

    import aiofabric as af
    from aiofabric.weights.execute import DoubleBuffer, run_destination, run_source

    torch.cuda.set_device(rank)
    me = Rank(rank, world, args)
    log(me.who, f"{args.model}, {me.layers} layers, {len(me.params)} params; joining the process group")
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=args.timeout), device_id=torch.device("cuda", rank))
    cpu = dist.new_group(backend="gloo", timeout=timedelta(seconds=args.timeout))
    bcast = dist.new_group([0] + list(range(me.n_src, world)))
    warm = torch.ones(1, device="cuda")
    dist.all_reduce(warm)  # NCCL's first collective sets up its rings
    torch.cuda.synchronize()
    seed = 7
    nbytes_src = me.p16.src_layout_bytes(me.r) if me.is_src else 0
    nbytes_dst = 0 if me.is_src else max(me.p16.dst_layout_bytes(me.r), me.p8.dst_layout_bytes(me.r))
    results: dict[str, Any] = {}
    async with af.open_engine("shm", peer_timeout=30.0) as eng:
        # Buffers come from CuPy (plain cudaMalloc: CUDA IPC works whatever PyTorch's allocator
        # settings) and are seen by PyTorch through __cuda_array_interface__, without a copy.
        if me.is_src:
            log(me.who, f"filling {nbytes_src / 1e9:.2f} GB of BF16 shards")
            buf_cp = me.alloc(max(nbytes_src, 1))
            buf = torch.as_tensor(buf_cp, device="cuda")
            me.fill_src(buf, seed)
            region = eng.register(buf_cp, remote_write=False)
        else:
            log(me.who, f"allocating 2 x {nbytes_dst / 1e9:.2f} GB (double buffer)")
            bufs = DoubleBuffer(eng, me.alloc(nbytes_dst), me.alloc(nbytes_dst))
        version = 0
        for mode in MODES:
            pl = me.p8 if mode == "aiofabric-fp8" else me.p16
            times = []
            for rep in range(args.warmup + args.reps):
                if not me.is_src:
                    me.zero(bufs.shadow)  # so a verified result is this update's doing
                if mode == "nccl":
                    dist.barrier(group=cpu)
                    torch.cuda.synchronize()
                    t0 = time.perf_counter()
                    _nccl_update(me, dist, bcast, buf if me.is_src else torch.as_tensor(bufs.shadow, device="cuda"), pl)
                    torch.cuda.synchronize()
                    took = time.perf_counter() - t0
                else:
                    info = (eng.address.to_bytes(), None if me.is_src else bufs.shadow_descriptor().to_bytes())
                    everyone: list[Any] = [None] * world
                    dist.all_gather_object(everyone, info, group=cpu)
                    srcs = [af.Address.from_bytes(everyone[s][0]) for s in range(me.n_src)]
                    descs = [af.RegionDescriptor.from_bytes(everyone[me.n_src + d][1]) for d in range(world - me.n_src)]
                    dist.barrier(group=cpu)
                    t0 = time.perf_counter()
                    async with asyncio.timeout(args.timeout):
                        if me.is_src:
                            await run_source(eng, pl, me.r, region, descs, version=version)
                        else:
                            await run_destination(eng, pl, me.r, srcs, version=version, buffers=bufs)
                    took = time.perf_counter() - t0
                    version += 1
                every: list[Any] = [None] * world
                dist.all_gather_object(every, took, group=cpu)
                if rep >= args.warmup:
                    times.append(max(every))
                if rank == 0:
                    log("rank 0", f"{mode} rep {rep}{' (warm-up)' if rep < args.warmup else ''}: {max(every) * 1e3:.1f} ms")
            bad: list[str] = []
            if not me.is_src:
                target = bufs.shadow if mode == "nccl" else bufs.live
                bad = me.verify(pl, torch.as_tensor(target, device="cuda"), seed)
                log(me.who, f"{mode}: {'verified' if not bad else 'MISMATCH in ' + ', '.join(bad[:5])}")
            all_bad: list[Any] = [None] * world
            dist.all_gather_object(all_bad, bad, group=cpu)
            results[mode] = {"times_s": times, "median_s": statistics.median(times),
                             "verified": not any(all_bad), "busiest_link_bytes": busiest(pl),
                             "total_bytes": int(pl.link_bytes()[2].sum())}
            dist.barrier(group=cpu)
        if me.is_src:
            region.close()
        else:
            bufs.close()
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump({"layers": me.layers, "params": len(me.params), "modes": results,
                       "card": torch.cuda.get_device_name(0)}, f)
    dist.barrier(group=cpu)
    dist.destroy_process_group()


def _nccl_update(me: Rank, dist: Any, bcast: Any, buf: Any, pl: Plan) -> None:
    """Gather every parameter on trainer rank 0 (send/recv), broadcast it to the
    inference ranks, each copying out its shard of ``pl``'s destination layout."""
    torch = me.torch
    for i, p in enumerate(me.params):
        dtype = me.dt[p.dtype]
        in_bcast = me.rank == 0 or not me.is_src
        full = torch.empty(p.shape, dtype=dtype, device="cuda") if in_bcast else None
        if me.is_src:
            s = pl.src.shards[i][me.r]
            mine = me.view(buf, pl._src_off[me.r][i], s.shape_of(p.shape), dtype) if s is not None else None
            if me.rank == 0:
                if mine is not None:
                    me.part(full, s).copy_(mine)
                for other in range(1, me.n_src):
                    so = pl.src.shards[i][other]
                    if so is None:
                        continue
                    tmp = torch.empty(so.shape_of(p.shape), dtype=dtype, device="cuda")
                    dist.recv(tmp, src=other)
                    me.part(full, so).copy_(tmp)
            elif mine is not None:
                dist.send(mine.contiguous(), dst=0)
        if in_bcast:
            dist.broadcast(full, src=0, group=bcast)
        if not me.is_src:
            s = pl.dst.shards[i][me.r]
            if s is not None:
                off = pl._dst_off[me.r][i][0]
                me.view(buf, off, s.shape_of(p.shape), dtype).copy_(me.part(full, s))


def _worker(rank: int, world: int, args: Any, port: int, out_path: str) -> None:
    for k in ("FI_TCP_IFACE", "FI_UDP_IFACE", "FI_SOCKETS_IFACE"):
        os.environ[k] = "lo"
    try:
        asyncio.run(_rank_main(rank, world, args, port, out_path))
    except BaseException:
        log(f"rank {rank}", "FAILED:\n" + traceback.format_exc())
        raise


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python3 -m benchmarks.weights_bw", description=__doc__.split("\n\n")[0])
    ap.add_argument("--gpus", type=int, default=None, help="GPUs to use: 2 (1 -> 1) or 4 (2 -> 2); default 4 if present")
    ap.add_argument("--model", default="qwen3-235b-a22b", choices=("qwen3-235b-a22b", "deepseek-v3", "kimi-k2"))
    ap.add_argument("--gb", type=float, default=12.0, help="BF16 gigabytes of weights (whole layers plus the ends)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--timeout", type=float, default=240.0, help="seconds any one step may take")
    ap.add_argument("--json", default=None)
    ap.add_argument("--dry-run", action="store_true", help="print the plans and exit (no GPU needed)")
    a = ap.parse_args(argv)
    world = a.gpus or 4
    if a.dry_run:
        for w in ((world,) if a.gpus else (2, 4)):
            params, p16, p8, layers = configure(a.model, a.gb, w // 2, w - w // 2)
            for name, pl in (("bf16", p16), ("fp8", p8)):
                s, _, _d = pl.link_bytes()
                print(f"{w} GPUs {name}: {layers} layers, {len(params)} params, {len(pl)} routes, "
                      f"{int(pl.expected().sum())} writes, sent {s.sum() / 1e9:.2f} GB, busiest link "
                      f"{busiest(pl) / 1e9:.2f} GB, dst buffer {max(pl.dst_layout_bytes(r) for r in range(w // 2)) / 1e9:.2f} GB")
        return 0
    import torch
    import torch.multiprocessing as tmp

    have = torch.cuda.device_count()
    if a.gpus is None:
        world = 4 if have >= 4 else 2
    if world not in (2, 4) or have < world:
        print(f"need 2 or 4 GPUs (asked for {world}, {have} present)", file=sys.stderr)
        return 2
    log("main", f"{world} GPUs ({torch.cuda.get_device_name(0)}), {a.model}, {a.gb} GB, {a.reps} reps")
    with tempfile.TemporaryDirectory() as tmpdir:
        out = os.path.join(tmpdir, "result.json")
        tmp.spawn(_worker, args=(world, a, _free_port(), out), nprocs=world, join=True)
        with open(out) as f:
            res = json.load(f)
    import aiofabric as af

    base = res["modes"]["nccl"]["median_s"]
    print(f"\n{res['card']} x{world}: {a.model}, {res['layers']} layers ({res['params']} params), "
          f"{world // 2} trainer -> {world - world // 2} inference GPUs")
    print(f"{'mode':>14} {'median ms':>10} {'busiest link GB':>16} {'GB/s':>8} {'vs nccl':>8} {'verified':>9}")
    for mode, m in res["modes"].items():
        gbps = m["busiest_link_bytes"] / m["median_s"] / 1e9
        m["busiest_link_GBps"] = gbps
        m["speedup_vs_nccl"] = base / m["median_s"]
        print(f"{mode:>14} {m['median_s'] * 1e3:>10.1f} {m['busiest_link_bytes'] / 1e9:>16.2f} {gbps:>8.1f} "
              f"{base / m['median_s']:>7.2f}x {m['verified']!s:>9}")
    res.update({"gpus": world, "model": a.model, "gb": a.gb, "reps": a.reps, "commit": _commit(),
                "libfabric": af.fabric_version()})
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1)
    ok = all(m["verified"] for m in res["modes"].values())
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
