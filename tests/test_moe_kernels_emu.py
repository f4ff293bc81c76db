"""The GPU MoE code without a GPU: the CUDA kernels compiled for the CPU
(tests/moe_emu.py) drive GpuExpertParallel and FabricGpuExpertParallel end to
end, several ranks in one process, and must equal the reference bit for bit.
Also: the kernels' parameter lists match the Python launch signatures, and a
rank that never signals makes synchronize() raise, not hang."""
from __future__ import annotations

import asyncio
import re
import time

import numpy as np
import pytest
from conftest import bounded

import _moe_peer
import aiofabric as af
from aiofabric.moe import MoEConfig
from aiofabric.moe.gpu import SIGNATURES, FabricGpuExpertParallel, GpuExpertParallel
from aiofabric.moe.host import Dispatched
from aiofabric.moe.kernels import NAMES, SOURCE

moe_emu = pytest.importorskip("moe_emu")
WHY = moe_emu.available()
pytestmark = [pytest.mark.asyncio, pytest.mark.skipif(bool(WHY), reason=WHY or "emulator")]


def _code(ctype: str) -> str:
    ctype = ctype.replace("const ", "").strip()
    if "*" in ctype:
        return "p"
    return {"int": "i", "long long": "q", "u32": "u", "u64": "Q"}[ctype]


async def test_launch_signatures_match_the_kernels():
    for name in NAMES:
        m = re.search(r"void\s+" + name + r"\s*\((.*?)\)\s*\{", SOURCE, re.S)
        assert m, name
        params = [p.strip() for p in m.group(1).split(",")]
        codes = "".join(_code(re.sub(r"\s*\b\w+$", "", p)) for p in params)
        assert codes == SIGNATURES[name], name


def group(cfg: MoEConfig, **kw):
    lib = moe_emu.build()
    eps = [GpuExpertParallel(None, r, cfg, backend=moe_emu.EmuBackend(lib), threads=32, timeout=0.3, **kw)
           for r in range(cfg.ranks)]
    infos = [ep.info() for ep in eps]
    for ep in eps:
        ep.connect(infos)
    return eps


def as_dispatched(cfg: MoEConfig, d) -> Dispatched:
    counts = d.counts.astype(np.int64)
    offs = np.concatenate([[0], np.cumsum(counts)])
    xs = np.concatenate([d.x[e, :counts[e]] for e in range(cfg.experts_per_rank)])
    sc = None if d.scales is None else np.concatenate([d.scales[e, :counts[e]] for e in range(cfg.experts_per_rank)])
    src = np.concatenate([d.src[e, :counts[e]] for e in range(cfg.experts_per_rank)])
    return Dispatched(xs, sc, src[:, 0], src[:, 1], counts, offs)


def run_round(eps, seed, ydtype=np.float32):
    cfg = eps[0].config
    tokens, idx, w = _moe_peer.problem(cfg, seed)
    for r, ep in enumerate(eps):
        ep.dispatch_send(tokens[r], idx[r].astype(np.int32 if r % 2 else np.int64), w[r])
    ds = [as_dispatched(cfg, ep.dispatch_recv()) for ep in eps]
    for r, (ep, d) in enumerate(zip(eps, ds)):
        y = np.zeros((cfg.experts_per_rank, cfg.capacity, cfg.hidden), np.float32)
        out = _moe_peer.experts(cfg, r, d.x, d.scales, d.offsets)
        for e in range(cfg.experts_per_rank):
            y[e, :d.counts[e]] = out[d.offsets[e]:d.offsets[e + 1]]
        if ydtype == np.uint16:
            from aiofabric.moe.numerics import f32_to_bf16
            y = f32_to_bf16(y)  # BF16 expert outputs: the reference sees the same rounded values
        ep.combine_send(y)
    outs = [ep.combine_recv().copy() for ep in eps]
    for ep in eps:
        ep.synchronize()
    return ds, outs


@pytest.mark.parametrize("ranks, epr, k, mode, cdt", [
    (2, 3, 4, "fp8", "bf16"),
    (3, 2, 3, "bf16", "float32"),
    (2, 2, 4, "float32", "bf16"),
])
async def test_gpu_kernels_equal_reference(ranks, epr, k, mode, cdt):
    cfg = MoEConfig(ranks * epr, ranks, 256, k, 6, mode=mode, combine_dtype=cdt)
    eps = group(cfg)
    for seed in (1, 2):
        ds, outs = run_round(eps, seed)
        for r in range(ranks):
            assert _moe_peer.check(cfg, r, seed, ds[r], outs[r]) is None


async def test_gpu_kernels_bf16_expert_outputs():
    cfg = MoEConfig(4, 2, 128, 2, 5, mode="bf16")
    eps = group(cfg)
    ds, outs = run_round(eps, 5, ydtype=np.uint16)
    for r in range(2):
        assert _moe_peer.check(cfg, r, 5, ds[r], outs[r], ybf16=True) is None


async def test_silent_rank_times_out_not_hangs():
    cfg = MoEConfig(4, 2, 128, 2, 3)
    eps = group(cfg)
    t = np.zeros((1, 128), np.float32)
    eps[0].dispatch_send(t, np.array([[0, 3]], np.int64), np.ones((1, 2), np.float32))
    t0 = time.monotonic()
    eps[0].dispatch_recv()  # rank 1 never sends
    with pytest.raises(af.BrokenResourceError, match="rank 1"):
        eps[0].synchronize()
    assert time.monotonic() - t0 < 5
    with pytest.raises(RuntimeError, match="out of turn"):
        eps[0].dispatch_send(t, np.array([[0, 3]], np.int64), np.ones((1, 2), np.float32))


async def test_gpu_bad_input_names_the_argument():
    cfg = MoEConfig(4, 2, 128, 2, 3)
    eps = group(cfg)
    ep = eps[0]
    t = np.zeros((2, 128), np.float32)
    i = np.array([[0, 3], [1, -1]], np.int64)
    w = np.ones((2, 2), np.float32)
    for args, exc, name in [
        (([[0.0]], i, w), TypeError, "x"),
        ((t.astype(np.float64), i, w), TypeError, "x"),
        ((np.zeros((4, 128), np.float32), np.zeros((4, 2), np.int64), np.ones((4, 2), np.float32)), ValueError, "x"),
        ((t, i.astype(np.int16), w), TypeError, "topk_idx"),
        ((t, i[:1], w), ValueError, "topk_idx"),
        ((t, np.array([[0, 4], [1, 2]]), w), ValueError, "topk_idx"),
        ((t, np.array([[1, 1], [1, 2]]), w), ValueError, "topk_idx"),
        ((t, i, w.astype(np.float64)), TypeError, "topk_weights"),
        ((t, i, np.ones((2, 2), np.float32)[:, ::1].T.copy().T), ValueError, "topk_weights"),
    ]:
        with pytest.raises(exc, match=name):
            ep.dispatch_send(*args)
    with pytest.raises(RuntimeError, match="out of turn"):
        ep.combine_recv()
    with pytest.raises(ValueError, match="rank"):
        GpuExpertParallel(None, 2, cfg, backend=object())
    with pytest.raises(af.ProtocolError):
        ep.connect([eps[1].info(), ep.info()])


async def test_fabric_gpu_path_equals_reference(loop_errors):
    cfg = MoEConfig(6, 2, 256, 3, 7, mode="fp8", combine_dtype="bf16")
    lib = moe_emu.build()
    engines = [await af.open_engine("shm") for _ in range(2)]
    eps = [FabricGpuExpertParallel(e, r, cfg, backend=moe_emu.EmuBackend(lib)) for r, e in enumerate(engines)]
    try:
        await bounded(asyncio.gather(*(ep.join([e.address for e in engines]) for ep in eps)))
        for seed in (3, 4):
            tokens, idx, w = _moe_peer.problem(cfg, seed)
            for r, ep in enumerate(eps):
                ep.dispatch_send(tokens[r], idx[r], w[r])
            ds = await bounded(asyncio.gather(*(ep.dispatch_recv() for ep in eps)))
            for r, (ep, d) in enumerate(zip(eps, ds)):
                ep.combine_send(_moe_peer.experts(cfg, r, d.x, d.scales, d.offsets))
            outs = await bounded(asyncio.gather(*(ep.combine_recv() for ep in eps)))
            for r in range(2):
                assert _moe_peer.check(cfg, r, seed, ds[r], outs[r]) is None
    finally:
        for ep in eps:
            ep.close()
        for e in reversed(engines):
            await e.aclose()


@pytest.mark.parametrize("T, ranks, epr, k, idx_dtype", [(100, 4, 16, 6, np.int64), (65, 3, 33, 8, np.int32),
                                                         (0, 2, 2, 2, np.int64)])
async def test_route_kernel_equals_layout_route(T, ranks, epr, k, idx_dtype):
    """Several 32-token chunks and several warps per pass (the small rounds above use one of each)."""
    from aiofabric.moe import layout

    cfg = MoEConfig(ranks * epr, ranks, 128, k, max(T, 1))
    rng = np.random.default_rng(T)
    idx = np.stack([rng.permutation(cfg.num_experts)[:k] for _ in range(T)]) if T else np.zeros((0, k), int)
    idx = np.where(rng.random(idx.shape) < 0.2, -1, idx).astype(idx_dtype)
    ep = group(MoEConfig(ranks * epr, ranks, 128, k, max(T, 1)))[0]
    b, p = ep._b, ep._b.ptr
    assert ep._route_threads == 32 * min(32, -(-cfg.num_experts // 32))
    b.launch("moe_route", (1,), ep._route_threads,
             (p(idx), idx.dtype == np.int64, T, k, epr, ranks, p(ep._idx32), p(ep._pos), p(ep._rowidx),
              p(ep._nrows), p(ep._counts)))
    want = layout.route(cfg, idx.astype(np.int32))
    assert np.array_equal(ep._pos[:T * k].reshape(T, k), want.pos)
    assert np.array_equal(ep._rowidx[:T * ranks].reshape(T, ranks), want.rowidx)
    assert np.array_equal(ep._nrows, want.rows)
    assert np.array_equal(ep._counts.reshape(ranks, epr), want.counts)
