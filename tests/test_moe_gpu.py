"""MoE dispatch/combine on real GPUs: the intra-host kernels (ranks as GPUs of
one process and as separate processes exchanging CUDA IPC handles over the
engine), the fabric GPU proxy, a silent rank, and the DeepSeek-V3 shape.
EP = number of visible GPUs, up to 4.  Results must equal the NumPy
reference bit for bit (FP8 included: the kernels round exactly as numerics.py).
Marked ``gpu``; skipped with the reason without CuPy or with fewer than 2 GPUs."""
from __future__ import annotations

import asyncio
import multiprocessing as mp

import _moe_peer
import numpy as np
import pytest
from conftest import bounded, cuda_devices

import aiofabric as af
from aiofabric.moe import MoEConfig
from aiofabric.moe.host import Dispatched

pytestmark = pytest.mark.asyncio
CTX = mp.get_context("spawn")


def _gpus() -> tuple[int, str]:
    n, why = cuda_devices()
    return n, why if n == 0 else "" if n >= 2 else f"needs 2 GPUs, found {n}"


N_GPUS, WHY = _gpus()
EP = min(N_GPUS, 4)
_skip = pytest.mark.skipif(N_GPUS < 2, reason=WHY or "needs 2 GPUs")


def needs_gpus(f):
    return pytest.mark.gpu(_skip(f))


def to_host(cfg: MoEConfig, d) -> Dispatched:
    """A GpuDispatched (padded device arrays) as the host backend's packed Dispatched."""
    counts = d.counts.get().astype(np.int64)
    x, src = d.x.get(), d.src.get()
    sc = None if d.scales is None else d.scales.get()
    offs = np.concatenate([[0], np.cumsum(counts)])
    e_range = range(cfg.experts_per_rank)
    xs = np.concatenate([x[e, :counts[e]] for e in e_range])
    s = np.concatenate([src[e, :counts[e]] for e in e_range])
    scs = None if sc is None else np.concatenate([sc[e, :counts[e]] for e in e_range])
    return Dispatched(xs, scs, s[:, 0].copy(), s[:, 1].copy(), counts, offs)


def expert_outputs(cfg: MoEConfig, rank: int, d: Dispatched):
    import cupy as cp

    y = np.zeros((cfg.experts_per_rank, cfg.capacity, cfg.hidden), np.float32)
    out = _moe_peer.experts(cfg, rank, d.x, d.scales, d.offsets)
    for e in range(cfg.experts_per_rank):
        y[e, :d.counts[e]] = out[d.offsets[e]:d.offsets[e + 1]]
    return cp.asarray(y)


def one_process_group(cfg: MoEConfig, **kw):
    from aiofabric.moe.gpu import GpuExpertParallel

    eps = [GpuExpertParallel(None, r, cfg, device=r, **kw) for r in range(cfg.ranks)]
    infos = [ep.info() for ep in eps]
    for ep in eps:
        ep.connect(infos)
    return eps


def run_round(eps, seed: int):
    """Every rank's half-steps enqueued in turn (the kernels spin on each other
    across GPUs), then the results checked against the reference."""
    import cupy as cp

    cfg = eps[0].config
    tokens, idx, w = _moe_peer.problem(cfg, seed)
    for r, ep in enumerate(eps):
        with cp.cuda.Device(r):
            ep.dispatch_send(cp.asarray(tokens[r]), cp.asarray(idx[r]), cp.asarray(w[r]))
    gds = [ep.dispatch_recv() for ep in eps]
    ds = []
    for r, (ep, gd) in enumerate(zip(eps, gds)):
        with cp.cuda.Device(r):
            ds.append(to_host(cfg, gd))
            ep.combine_send(expert_outputs(cfg, r, ds[-1]))
    outs = []
    for r, ep in enumerate(eps):
        with cp.cuda.Device(r):
            outs.append(ep.combine_recv().get())
    for ep in eps:
        ep.synchronize()
    return [_moe_peer.check(cfg, r, seed, ds[r], outs[r]) for r in range(cfg.ranks)]


@needs_gpus
@pytest.mark.parametrize("mode, cdt, epr, k", [("fp8", "bf16", 4, 4), ("bf16", "float32", 3, 3),
                                               ("float32", "bf16", 2, 2)])
async def test_nvlink_ranks_in_one_process(mode, cdt, epr, k):
    cfg = MoEConfig(EP * epr, EP, 512, k, 24, mode=mode, combine_dtype=cdt)
    eps = one_process_group(cfg, timeout=20)
    try:
        for seed in range(3):
            assert run_round(eps, seed) == [None] * EP
    finally:
        for ep in eps:
            ep.close()


@needs_gpus
@pytest.mark.timeout(300)
async def test_deepseek_v3_shape():
    """hidden 7168, 256 experts, top-8, FP8 dispatch, BF16 combine, 128 tokens per rank."""
    cfg = MoEConfig(256, EP, 7168, 8, 128, mode="fp8", combine_dtype="bf16")
    eps = one_process_group(cfg, timeout=20, validate=False)
    try:
        assert run_round(eps, 42) == [None] * EP
    finally:
        for ep in eps:
            ep.close()


@needs_gpus
async def test_silent_rank_times_out():
    import cupy as cp

    cfg = MoEConfig(2 * EP, EP, 256, 2, 4)
    eps = one_process_group(cfg, timeout=0.5)
    try:
        with cp.cuda.Device(0):
            eps[0].dispatch_send(cp.zeros((1, 256), cp.float32), cp.asarray([[0, 1]]),
                                 cp.ones((1, 2), cp.float32))
            eps[0].dispatch_recv()
            with pytest.raises(af.BrokenResourceError, match="rank 1"):
                eps[0].synchronize()
    finally:
        for ep in eps:
            ep.close()


def _rank_proc(rank: int, cfg_dict: dict, seeds: list, conn) -> None:
    import cupy as cp

    from aiofabric.moe.gpu import GpuExpertParallel

    async def main() -> None:
        cfg = MoEConfig.from_dict(cfg_dict)
        async with af.open_engine("shm", peer_timeout=5.0) as eng:
            conn.send(eng.address.to_bytes())
            peers = [af.Address.from_bytes(b) for b in await asyncio.to_thread(conn.recv)]
            ep = GpuExpertParallel(eng, rank, cfg, device=rank, timeout=20)
            await asyncio.wait_for(ep.join(peers), 60)
            for seed in seeds:
                try:
                    res = run_round_single(ep, seed)
                except Exception as e:  # noqa: BLE001 - reported to the test
                    res = f"{type(e).__name__}: {e}"
                conn.send(res)
            await asyncio.to_thread(conn.recv)
            ep.close()

    def run_round_single(ep, seed):
        cfg = ep.config
        r = ep.rank
        tokens, idx, w = _moe_peer.problem(cfg, seed)
        with cp.cuda.Device(r):
            ep.dispatch_send(cp.asarray(tokens[r]), cp.asarray(idx[r]), cp.asarray(w[r]))
            d = to_host(cfg, ep.dispatch_recv())
            ep.combine_send(expert_outputs(cfg, r, d))
            out = ep.combine_recv().get()
            ep.synchronize()
        return _moe_peer.check(cfg, r, seed, d, out)

    asyncio.run(main())


@needs_gpus
@pytest.mark.timeout(300)
async def test_nvlink_ranks_as_processes():
    """One process per GPU; inboxes mapped through CUDA IPC handles sent over the engine."""
    cfg = MoEConfig(EP * 4, EP, 1024, 4, 32, mode="fp8")
    seeds = [7, 8]
    procs, conns = [], []
    for r in range(EP):
        here, there = CTX.Pipe()
        p = CTX.Process(target=_rank_proc, args=(r, cfg.to_dict(), seeds, there), daemon=True)
        p.start()
        procs.append(p)
        conns.append(here)
    try:
        def recv(c):
            assert c.poll(120), "a rank did not answer"
            return c.recv()

        addrs = [await asyncio.to_thread(recv, c) for c in conns]
        for c in conns:
            c.send(addrs)
        for _ in seeds:
            res = [await asyncio.to_thread(recv, c) for c in conns]
            assert res == [None] * EP, res
        for c in conns:
            c.send("bye")
        for p in procs:
            await asyncio.to_thread(p.join, 60)
            assert p.exitcode == 0
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()


@needs_gpus
async def test_fabric_gpu_proxy(loop_errors):
    """GPU groups that talk only through the engine (pack on GPU, host writes)."""
    import cupy as cp

    from aiofabric.moe.gpu import FabricGpuExpertParallel

    cfg = MoEConfig(4 * EP, EP, 512, 4, 16, mode="fp8")
    engines = [await af.open_engine("shm") for _ in range(EP)]
    eps = [FabricGpuExpertParallel(e, r, cfg, device=r) for r, e in enumerate(engines)]
    try:
        await bounded(asyncio.gather(*(ep.join([e.address for e in engines]) for ep in eps)), 60)
        tokens, idx, w = _moe_peer.problem(cfg, 9)
        for r, ep in enumerate(eps):
            with cp.cuda.Device(r):
                ep.dispatch_send(cp.asarray(tokens[r]), cp.asarray(idx[r]), cp.asarray(w[r]))
        ds = await bounded(asyncio.gather(*(ep.dispatch_recv() for ep in eps)), 60)
        hs = []
        for r, (ep, d) in enumerate(zip(eps, ds)):
            with cp.cuda.Device(r):
                h = Dispatched(d.x.get(), None if d.scales is None else d.scales.get(), d.src_rank.get(),
                               d.src_token.get(), d.counts, d.offsets)
                hs.append(h)
                ep.combine_send(cp.asarray(_moe_peer.experts(cfg, r, h.x, h.scales, h.offsets)))
        outs = await bounded(asyncio.gather(*(ep.combine_recv() for ep in eps)), 60)
        for r in range(EP):
            assert _moe_peer.check(cfg, r, 9, hs[r], outs[r].get()) is None
    finally:
        for ep in eps:
            ep.close()
        for e in reversed(engines):
            await e.aclose()


async def test_gpu_module_imports_without_cupy():
    import aiofabric.moe.gpu as g

    assert g.GpuExpertParallel and g.SIGNATURES
    if N_GPUS == 0 and "CuPy" in WHY:
        with pytest.raises(af.UnavailableError, match="CuPy"):
            g.GpuExpertParallel(None, 0, MoEConfig(2, 1, 128, 1, 1))
