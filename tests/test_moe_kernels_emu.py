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
        m = re.search(r"void\s+(?:[A-Z_]+\s+)?" + name + r"\s*\((.*?)\)\s*\{", SOURCE, re.S)
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
    (2, 24, 40, "bf16", "bf16"),  # topk > 32: combine_send compacts the slots in two ballots
])
async def test_gpu_kernels_equal_reference(ranks, epr, k, mode, cdt):
    cfg = MoEConfig(ranks * epr, ranks, 256, k, 6, mode=mode, combine_dtype=cdt)
    eps = group(cfg)
    for seed in (1, 2):
        ds, outs = run_round(eps, seed)
        for r in range(ranks):
            assert _moe_peer.check(cfg, r, seed, ds[r], outs[r]) is None


@pytest.mark.parametrize("hidden", [1024, 1608])
async def test_gpu_kernels_long_rows(hidden):
    """Rows long enough for dispatch_recv's eight-loads-a-lane copy, its
    four-load step and its tail (float32 payloads of 256 and 402 uint4)."""
    cfg = MoEConfig(4, 2, hidden, 2, 3, mode="float32", combine_dtype="float32")
    eps = group(cfg)
    ds, outs = run_round(eps, 31)
    for r in range(2):
        assert _moe_peer.check(cfg, r, 31, ds[r], outs[r]) is None


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
            await _moe_peer.one_round(eps, seed)
    finally:
        for ep in eps:
            ep.close()
        for e in reversed(engines):
            await e.aclose()


@pytest.mark.parametrize("T, ranks, epr, k, idx_dtype, threads", [(100, 4, 16, 6, np.int64, 32),
                                                                  (65, 3, 33, 8, np.int32, 64),
                                                                  (0, 2, 2, 2, np.int64, 32)])
async def test_dispatch_send_routes_like_layout_route(T, ranks, epr, k, idx_dtype, threads):
    """The in-kernel routing (each token's block counts over the tokens before
    it; one block writes the metas) against layout.route, with many blocks,
    masked slots and ids out of range (validate=False counts them as masked)."""
    from aiofabric.moe import layout

    cfg = MoEConfig(ranks * epr, ranks, 128, k, max(T, 1))
    rng = np.random.default_rng(T)
    idx = np.stack([rng.permutation(cfg.num_experts)[:k] for _ in range(T)]) if T else np.zeros((0, k), int)
    idx = np.where(rng.random(idx.shape) < 0.2, -1, idx)
    bad = np.where(rng.random(idx.shape) < 0.05, cfg.num_experts + 3, idx).astype(idx_dtype)
    lib = moe_emu.build()
    eps = [GpuExpertParallel(None, r, cfg, backend=moe_emu.EmuBackend(lib), threads=threads, timeout=0.3,
                             validate=False) for r in range(ranks)]
    infos = [ep.info() for ep in eps]
    for ep in eps:
        ep.connect(infos)
    x = rng.standard_normal((T, 128)).astype(np.float32)
    eps[1].dispatch_send(x, bad, np.ones((T, k), np.float32))
    want = layout.route(cfg, np.where(bad >= cfg.num_experts, -1, bad).astype(np.int32))
    ep = eps[1]
    assert ep._b.launches == ["moe_dispatch"]  # one launch for the whole phase
    assert np.array_equal(ep._rowidx[:T * ranks].reshape(T, ranks), want.rowidx)
    mdt = layout.meta_dtype(cfg)
    hdt = layout.header_dtype(cfg)
    for r in range(ranks):
        inbox = eps[r].inbox
        meta = inbox[cfg.meta_offset:cfg.meta_offset + ranks * cfg.meta_bytes].view(mdt)[1]
        assert meta["seq"] == 1 and meta["rows"] == want.rows[r]
        assert np.array_equal(meta["count"], want.counts[r])
        flag = int(inbox[:8 * ranks].view(np.uint64)[1])
        parts = 1 + (flag >> 28 & 7)
        assert flag & ~(7 << 28) == (1 << 32 | int(want.rows[r]))
        rows = inbox[cfg.drows_offset:cfg.crows_offset].reshape(ranks, cfg.max_tokens, cfg.row_bytes)[1]
        tags = inbox[cfg.dtag_offset:cfg.ctag_offset].view(np.uint64).reshape(ranks, cfg.max_tokens, -1)[1]
        assert np.array_equal(tags[:want.rows[r], :parts], np.ones((want.rows[r], parts), np.uint64))  # every part
        assert not tags[want.rows[r]:].any() and not tags[:, parts:].any()
        for t in range(T):
            i = want.rowidx[t, r]
            if i < 0:
                continue
            h = rows[i, :cfg.header_bytes].view(hdt)[0]
            assert h["token"] == t
            on = want.pos[t] >= 0
            on &= np.where(bad[t] >= cfg.num_experts, -1, bad[t]) // epr == r
            assert np.array_equal(h["pos"], np.where(on, want.pos[t], -1))
            assert np.array_equal(h["expert"], np.where(on, bad[t] % epr, -1))
            body = rows[i, cfg.header_bytes:cfg.header_bytes + cfg.payload_bytes].view(np.uint16)
            from aiofabric.moe import reference
            assert np.array_equal(body, reference.encode_tokens(x[t:t + 1], "bf16")[0][0])


async def test_gpu_kernels_many_tokens_and_blocks():
    """Rows wider than a block's two chunks a thread (several passes), many tokens."""
    cfg = MoEConfig(12, 3, 2048, 5, 40, mode="fp8", combine_dtype="bf16")
    lib = moe_emu.build()
    eps = [GpuExpertParallel(None, r, cfg, backend=moe_emu.EmuBackend(lib), threads=64, timeout=0.3)
           for r in range(cfg.ranks)]
    infos = [ep.info() for ep in eps]
    for ep in eps:
        ep.connect(infos)
    for seed in (11, 12):
        ds, outs = run_round(eps, seed)
        for r in range(cfg.ranks):
            assert _moe_peer.check(cfg, r, seed, ds[r], outs[r]) is None
    # one kernel per phase, nothing else queued
    assert eps[0]._b.launches == ["moe_dispatch", "moe_combine"] * 2


@pytest.mark.parametrize("mode", ["fp8", "bf16"])
@pytest.mark.parametrize("max_parts", [2, 3, 8])
async def test_dispatch_splits_a_token_over_parts(mode, max_parts):
    """A token's payload split over several sending blocks (whole FP8
    groups each, every part tagged, the receivers waiting for all of them)
    equals the reference; the meta flag tells receivers the split."""
    cfg = MoEConfig(6, 2, 2048, 3, 4, mode=mode, combine_dtype="bf16")
    eps = group(cfg)
    for ep in eps:
        ep._room_d, ep._max_parts = 10_000, max_parts  # room for every part
    for seed in (31, 32):
        ds, outs = run_round(eps, seed)
        for r in range(cfg.ranks):
            assert _moe_peer.check(cfg, r, seed, ds[r], outs[r]) is None
    flags = eps[0].inbox[:8 * cfg.ranks].view(np.uint64)
    assert {1 + (int(f) >> 28 & 7) for f in flags} == {max_parts}


async def test_gpu_path_refuses_tables_beyond_shared_memory():
    with pytest.raises(ValueError, match="48 KiB"):
        GpuExpertParallel(None, 0, MoEConfig(12288, 2, 128, 2, 4), backend=object())


async def test_fused_kernels_any_split_of_senders_and_receivers():
    """However many blocks each role gets (fewer than the work: blocks loop;
    more: blocks without work return), every round equals the reference,
    and each launch takes exactly its grid's tickets."""
    cfg = MoEConfig(6, 2, 256, 3, 7, mode="fp8", combine_dtype="bf16")
    eps = group(cfg)
    for seed, recv_d, send_c, recv_c in ((21, 1, 1, 1), (22, 3, 2, 5), (23, 40, 64, 2), (24, 2, 1, 64)):
        for ep in eps:
            ep._recv_d, ep._send_c, ep._recv_c = recv_d, send_c, recv_c
        ds, outs = run_round(eps, seed)
        for r in range(cfg.ranks):
            assert _moe_peer.check(cfg, r, seed, ds[r], outs[r]) is None
        for ep in eps:
            assert list(ep._tickets) == ep._taken
    # a rank with no tokens at all: its peers' combine_send has no unit for it
    lib_eps = eps
    empty = np.zeros((0, cfg.hidden), np.float32)
    none_i, none_w = np.zeros((0, cfg.topk), np.int64), np.zeros((0, cfg.topk), np.float32)
    x1 = np.ones((2, cfg.hidden), np.float32)
    i1 = np.array([[0, 3, -1], [4, 5, 1]], np.int64)
    w1 = np.full((2, cfg.topk), 0.5, np.float32)
    lib_eps[0].dispatch_send(empty, none_i, none_w)
    lib_eps[1].dispatch_send(x1, i1, w1)
    for ep in lib_eps:
        ep.dispatch_recv()
    for ep in lib_eps:
        ep.combine_send(np.ones((cfg.experts_per_rank, cfg.capacity, cfg.hidden), np.float32))
    outs = [ep.combine_recv().copy() for ep in lib_eps]
    for ep in lib_eps:
        ep.synchronize()
        assert list(ep._tickets) == ep._taken
    assert outs[0].shape == (0, cfg.hidden)
    from aiofabric.moe.numerics import bf16_to_f32
    assert np.array_equal(bf16_to_f32(outs[1]), np.full((2, cfg.hidden), [[1.0], [1.5]], np.float32))


@pytest.mark.parametrize("in_dtype", [np.float32, np.uint16])
async def test_pack_fp8_every_code_and_tie(in_dtype):
    """moe_pack's FP8 codes against numerics on every code, the midpoints
    between codes (ties to even), one float32 ulp either side, subnormals,
    saturation, signed zeros and infinities; each 128-group leads with 448
    so its scale is 1."""
    from aiofabric.moe import numerics, reference

    pos = numerics.fp8_decode(np.arange(127, dtype=np.uint8)).astype(np.float32)
    mids = ((pos[:-1].astype(np.float64) + pos[1:]) / 2).astype(np.float32)
    vals = np.concatenate([pos, mids, np.nextafter(mids, np.float32(0)), np.nextafter(mids, np.float32(1000)),
                           np.float32([448, 460, 464, 470, 1e9, np.inf, 2.0 ** -10, 2.0 ** -11, 3 * 2.0 ** -10,
                                       1e-30, 0.0, 0.015625, 0.0156249])])
    vals = np.concatenate([vals, -vals])
    if in_dtype == np.uint16:  # BF16 inputs: the values BF16 can hold
        vals = numerics.bf16_to_f32(numerics.f32_to_bf16(vals))
    per = 127
    groups = -(-len(vals) // per)
    x = np.zeros((groups, 128), np.float32)
    x[:, 0] = 448.0
    flat = np.zeros(groups * per, np.float32)
    flat[:len(vals)] = vals
    x[:, 1:] = np.minimum(np.abs(flat.reshape(groups, per)), 448) * np.sign(flat.reshape(groups, per))
    x[:, 1:] = np.where(np.signbit(flat.reshape(groups, per)) & (x[:, 1:] == 0), np.float32(-0.0), x[:, 1:])
    x = x.reshape(1, -1)
    xin = numerics.f32_to_bf16(x) if in_dtype == np.uint16 else x
    H = x.shape[1]
    cfg = MoEConfig(2, 1, H, 1, 1, mode="fp8")
    b = moe_emu.EmuBackend(moe_emu.build())
    stride = cfg.row_bytes - cfg.header_bytes
    packed = np.zeros((1, stride), np.uint8)
    b.launch("moe_pack", (1, 2), 64, (b.ptr(xin), in_dtype == np.uint16, 1, H, 1, b.ptr(packed), stride))
    codes, scales = reference.encode_tokens(xin, "fp8")
    assert np.array_equal(packed[0, H:H + cfg.scale_bytes].view(np.float32), scales.reshape(-1))
    assert (scales == 1).all()
    assert np.array_equal(packed[0, :H], codes.reshape(-1))


async def test_duplicate_expert_without_validation_gets_the_token_once():
    """validate=False: an expert named twice in a row receives the token once,
    and combine adds both weighted outputs in slot order."""
    cfg = MoEConfig(4, 2, 128, 3, 2, mode="float32", combine_dtype="float32")
    eps = group(cfg, validate=False)
    rng = np.random.default_rng(3)
    x = [rng.standard_normal((2, 128)).astype(np.float32) for _ in range(2)]
    idx = [np.array([[1, 1, 2], [-1, -1, -1]], np.int64), np.zeros((0, 3), np.int64)]
    w = [np.float32([[0.25, 0.5, 0.125], [1, 1, 1]]), np.zeros((0, 3), np.float32)]
    x[1] = x[1][:0]
    for r, ep in enumerate(eps):
        ep.dispatch_send(x[r], idx[r], w[r])
    ds = [ep.dispatch_recv() for ep in eps]
    assert list(ds[0].counts) == [0, 1] and list(ds[1].counts) == [1, 0]
    assert np.array_equal(ds[0].x[1, 0], x[0][0]) and np.array_equal(ds[1].x[0, 0], x[0][0])
    for ep, d in zip(eps, ds):
        ep.combine_send(np.ascontiguousarray(d.x * np.float32(2)))
    outs = [ep.combine_recv().copy() for ep in eps]
    for ep in eps:
        ep.synchronize()
    y = x[0][0] * np.float32(2)
    p0 = np.float32(0.25) * y + np.float32(0.5) * y  # rank 0's partial, slot order
    p1 = np.float32(0.125) * y
    assert np.array_equal(outs[0][0], p0 + p1)
    assert not outs[0][1].any() and outs[1].shape == (0, 128)


async def test_cuda_backend_skips_events_on_its_own_stream():
    """begin()/end() enqueue an event record and a cross-stream wait only when
    the caller's current stream is not the group's (a fake CuPy, no GPU)."""
    import contextlib
    import types

    from aiofabric.moe.cuda import CudaBackend

    log = []

    class S:
        def __init__(self, ptr):
            self.ptr = ptr

        def wait_event(self, ev):
            log.append(("wait", self.ptr))

    class Ev:
        def record(self, s):
            log.append(("record", s.ptr))

    cur = [S(0)]
    b = object.__new__(CudaBackend)
    b.stream, b._ev_in, b._ev_out = S(7), Ev(), Ev()
    b.xp = types.SimpleNamespace(cuda=types.SimpleNamespace(get_current_stream=lambda: cur[0]))
    b.ctx = contextlib.nullcontext
    b.begin()
    b.end()
    assert log == [("record", 0), ("wait", 7), ("record", 7), ("wait", 0)]
    log.clear()
    cur[0] = S(7)
    b.begin()
    b.end()
    assert log == []
