"""The weight-update planner (sans-IO): every destination byte written
exactly once, every replica written, balance, determinism, the msgpack form,
and refusals; the BF16/FP8 conversions against independent references."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
from _weights_peer import PARAMS, layouts, make_plan, tensors
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import aiofabric as af
from aiofabric.weights import FULL, Layout, ParamSpec, Plan, Shard, plan
from aiofabric.weights.cast import (
    bf16_to_f32,
    dequantize_blocks,
    e4m3_to_f32,
    f32_to_bf16,
    f32_to_e4m3,
    quantize_blocks,
    quantize_runs,
)
from aiofabric.weights.views import dst_views, fill_src, matches, reference_dst

# -- a sans-IO run of a plan: what run_source writes, done with NumPy ---------------------------


def apply(pl: Plan, src_bufs: list[np.ndarray]) -> list[np.ndarray]:
    """Carry out every piece of the plan between NumPy buffers; count writes per (src, dst)."""
    dst = [np.zeros(pl.dst_layout_bytes(d), np.uint8) for d in range(pl.dst.ranks)]
    counts = np.zeros((pl.src.ranks, pl.dst.ranks), np.int64)
    blk = pl.options.fp8_block
    for i, t in enumerate(pl.tables):
        for k in range(len(t.src)):
            s, d = int(t.src[k]), int(t.dst[k])
            soff = pl._src_off[s][i]
            doff, sc = pl._dst_off[d][i]
            sitem, ditem = pl.src.params[i].itemsize, pl.dst.params[i].itemsize
            for pc in pl.pieces(i, k):
                if pl.cast(i):
                    m = len(pc.src)
                    nsc = pc.rows * -(-pc.width // blk)
                    codes = np.zeros(m * pc.length, np.uint8)
                    scales = np.zeros(m * nsc, np.float32)
                    quantize_runs(src_bufs[s][soff:soff + (len(src_bufs[s]) - soff) // 2 * 2].view(np.uint16), pc.src, pc.rows, pc.width, codes, scales, blk)
                    cols = pl.dst.shards[i][d].shape_of(pl.params[i].shape)[-1]
                    nb = -(-cols // blk)
                    for j in range(m):
                        e = int(pc.dst[j])
                        dst[d][doff + e:doff + e + pc.length] = codes[j * pc.length:(j + 1) * pc.length]
                        si = (e // cols) * nb + (e % cols) // blk
                        dst[d][sc + 4 * si:sc + 4 * (si + nsc)] = scales[j * nsc:(j + 1) * nsc].view(np.uint8)
                    counts[s, d] += 2 * m
                else:
                    n = pc.length * sitem
                    for a, b in zip(pc.src, pc.dst):
                        dst[d][doff + int(b) * ditem:doff + int(b) * ditem + n] = \
                            src_bufs[s][soff + int(a) * sitem:soff + int(a) * sitem + n]
                    counts[s, d] += len(pc.src)
    assert np.array_equal(counts, pl.expected()), "plan.expected() differs from the writes its pieces make"
    return dst


def check_exact(pl: Plan, seed: int = 0) -> None:
    """Every destination shard equals the reference after applying the plan, and
    each of its elements is covered by exactly one route."""
    pl.validate()
    full = tensors(seed, pl.src.params)
    src = [np.zeros(pl.src_layout_bytes(r), np.uint8) for r in range(pl.src.ranks)]
    for r in range(pl.src.ranks):
        fill_src(pl, r, src[r], full)
    dst = apply(pl, src)
    for d in range(pl.dst.ranks):
        assert not matches(dst_views(pl, d, dst[d]), reference_dst(pl, d, full))
    for i, p in enumerate(pl.params):
        t = pl.tables[i]
        for d, s in enumerate(pl.dst.shards[i]):
            if s is None:
                continue
            cover = np.zeros(p.shape, np.int32)
            for k in np.nonzero(t.dst == d)[0]:
                cover[tuple(slice(a, b) for a, b in zip(t.lo[k], t.hi[k]))] += 1
            lo, hi = s.bounds(p.shape)
            inside = cover[tuple(slice(a, b) for a, b in zip(lo, hi))]
            assert (inside == 1).all() and cover.sum() == inside.size, (p.name, d)


# -- examples ------------------------------------------------------------------------------------


@pytest.mark.parametrize("n_src, tp, replicas", [(1, 1, 1), (2, 2, 1), (3, 2, 2), (4, 1, 3), (2, 4, 1)])
@pytest.mark.parametrize("fp8", [True, False])
def test_small_model_exact(n_src, tp, replicas, fp8):
    pl = make_plan(n_src, tp, replicas, fp8)
    check_exact(pl)
    # every replica of every destination shard is written
    assert (pl.expected().sum(axis=0) > 0).all()


def test_immediate_counts_documented():
    """One immediate per piece, two per quantized piece; max_write_bytes cuts runs."""
    pl = make_plan(2, 2, 1, True, max_write_bytes=1 << 30)
    coarse = pl.expected().sum()
    fine = make_plan(2, 2, 1, True, max_write_bytes=64).expected().sum()
    assert fine > coarse
    for i in range(len(pl.params)):
        st_ = pl.route_stats(i)
        assert (st_["writes"] == st_["runs"] * st_["pieces"] * (2 if pl.cast(i) else 1)).all()


def test_offsets_are_aligned_and_disjoint():
    pl = make_plan(2, 2, 2, True, align=512)
    for d in range(pl.dst.ranks):
        spans = []
        for (off, shape, dt, soff, sshape) in pl.dst_offsets(d).values():
            n = int(np.prod(shape)) * af.weights.DTYPES[dt]
            spans.append((off, off + n))
            assert off % 512 == 0
            if soff >= 0:
                assert soff % 512 == 0
                spans.append((soff, soff + 4 * int(np.prod(sshape))))
        spans.sort()
        assert all(a[1] <= b[0] for a, b in itertools.pairwise(spans))
        assert spans[-1][1] <= pl.dst_layout_bytes(d)


def test_non_leading_dim_runs_are_merged():
    """Rows from FSDP, columns at the destination: one write per row of the box;
    with whole rows on both sides the box is one run."""
    p = [ParamSpec("w", (8, 64), "bf16")]
    rows = plan(Layout.fsdp(p, 2), Layout.tensor_parallel(p, 2, dims={"w": 1}))
    assert [int(x) for x in rows.route_stats(0)["runs"]] == [4, 4, 4, 4]
    whole = plan(Layout.fsdp(p, 2), Layout.tensor_parallel(p, 2, dims={"w": 0}))
    assert [int(x) for x in whole.route_stats(0)["runs"]] == [1, 1]
    check_exact(rows)


def test_lpt_balances_replicated_sources():
    params = [ParamSpec(f"p{i}", (int(n), 32), "bf16") for i, n in enumerate([5, 40, 7, 33, 12, 90, 3, 64, 18])]
    pl = plan(Layout.replicated(params, 4), Layout.tensor_parallel(params, 1, replicas=2), split_bytes=1 << 30)
    src, _nic, _dst = pl.link_bytes()
    biggest = max(int(b.max()) for b in (pl.route_stats(i)["bytes"] for i in range(len(params))))
    assert src.max() <= src.sum() / 4 + biggest
    # a second run gives the same plan, byte for byte
    assert plan(Layout.replicated(params, 4), Layout.tensor_parallel(params, 1, replicas=2),
                split_bytes=1 << 30).to_bytes() == pl.to_bytes()


def test_nics_are_balanced():
    params = [ParamSpec(f"p{i}", (16 * (i + 1), 32), "bf16") for i in range(8)]
    pl = plan(Layout.fsdp(params, 2), Layout.tensor_parallel(params, 2), nics_per_rank=2)
    _, nic, _ = pl.link_bytes()
    sizes = [int(b) for i in range(len(params)) for b in pl.route_stats(i)["bytes"]]
    assert (nic.max(axis=1) - nic.min(axis=1) <= max(sizes)).all()
    assert set(np.unique(np.concatenate([t.nic for t in pl.tables]))) == {0, 1}


# -- properties ------------------------------------------------------------------------------------


@st.composite
def cases(draw):
    n = draw(st.integers(1, 3))
    params, cast, sdims, ddims = [], set(), {}, {}
    for i in range(n):
        ndim = draw(st.integers(1, 3))
        shape = tuple(draw(st.integers(1, 9)) for _ in range(ndim - 1)) + (draw(st.sampled_from([4, 8, 12, 7])),)
        dtype = draw(st.sampled_from(["bf16", "bf16", "fp32"]))
        params.append(ParamSpec(f"p{i}", shape, dtype))
        if dtype == "bf16" and ndim >= 2 and draw(st.booleans()):
            cast.add(f"p{i}")
        # quantized: the trainer must not cut a block of the last dim
        sdims[f"p{i}"] = draw(st.integers(0, max(0, ndim - 2) if f"p{i}" in cast else ndim - 1))
        ddims[f"p{i}"] = draw(st.one_of(st.none(), st.integers(0, ndim - 1)))
    n_src = draw(st.integers(1, 4))
    replicas_src = draw(st.integers(1, 2))
    tp, replicas = draw(st.integers(1, 3)), draw(st.integers(1, 2))
    mode = draw(st.sampled_from(["fsdp", "replicated"]))
    src = Layout.fsdp(params, n_src, replicas=replicas_src, dims=sdims) if mode == "fsdp" else \
        Layout.replicated(params, n_src)
    dparams = [p._replace(dtype="fp8_e4m3") if p.name in cast else p for p in params]
    dst = Layout.tensor_parallel(dparams, tp, replicas=replicas, dims=ddims, block=4)
    opts = {"fp8_block": 4, "max_write_bytes": draw(st.sampled_from([8, 64, 1 << 20])),
                "split_bytes": draw(st.sampled_from([16, 1 << 20])), "nics_per_rank": draw(st.integers(1, 2))}
    return src, dst, opts


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cases())
def test_every_destination_byte_exactly_once(case):
    src, dst, opts = case
    pl = plan(src, dst, **opts)
    check_exact(pl, seed=3)
    # every replica holding a shard receives it
    for i in range(len(pl.params)):
        for d, s in enumerate(pl.dst.shards[i]):
            assert s is None or (pl.tables[i].dst == d).any()
    # deterministic and carried intact
    blob = pl.to_bytes()
    assert plan(src, dst, **opts).to_bytes() == blob
    again = Plan.from_bytes(blob)
    assert again.to_bytes() == blob and np.array_equal(again.expected(), pl.expected())
    # balance: where every source holds everything, LPT's bound
    if all(s is FULL or s == FULL for row in src.shards for s in row):
        sb = pl.link_bytes()[0]
        biggest = max((int(b.max()) for i in range(len(pl.params)) if len(pl.tables[i].src)
                       for b in [pl.route_stats(i)["bytes"]]), default=0)
        assert sb.max() <= sb.sum() / len(sb) + biggest + 4 * len(pl.params)


@settings(max_examples=40, deadline=None)
@given(st.binary(max_size=200))
def test_garbage_is_a_protocol_error(blob):
    with pytest.raises(af.ProtocolError):
        Plan.from_bytes(blob)


# -- refusals ----------------------------------------------------------------------------------------


def test_bad_bytes():
    import msgpack

    blob = make_plan().to_bytes()
    for bad in (blob[:-1], blob[:10], b"\x93\x01\x02\x03", msgpack.packb(["af.wplan", 99, 0, 0, 0, 0]),
                msgpack.packb(["other", 1, 0, 0, 0, 0])):
        with pytest.raises(af.ProtocolError):
            Plan.from_bytes(bad)
    data = msgpack.unpackb(blob)
    data[5][0][0] = data[5][0][0][:-1]  # a truncated column
    with pytest.raises(af.ProtocolError):
        Plan.from_bytes(msgpack.packb(data))
    data = msgpack.unpackb(blob)
    t = data[5][0]
    lo = np.frombuffer(t[3], "<i8").copy()
    lo[0] += 1  # a gap
    t[3] = lo.tobytes()
    with pytest.raises(af.ProtocolError, match="gap"):
        Plan.from_bytes(msgpack.packb(data))
    with pytest.raises(TypeError):
        Plan.from_bytes("text")


def test_validate_names_overlaps_and_gaps():
    pl = make_plan()
    t = pl.tables[0]
    t.src, t.dst, t.nic = (np.concatenate([a, a[:1]]) for a in (t.src, t.dst, t.nic))
    t.lo, t.hi = np.concatenate([t.lo, t.lo[:1]]), np.concatenate([t.hi, t.hi[:1]])
    with pytest.raises(ValueError, match="overlap"):
        pl.validate()
    pl = make_plan()
    t = pl.tables[2]
    t.src, t.dst, t.nic, t.lo, t.hi = t.src[1:], t.dst[1:], t.nic[1:], t.lo[1:], t.hi[1:]
    with pytest.raises(ValueError, match="gap"):
        pl.validate()
    pl = make_plan()
    pl.tables[1].src[0] = 1 - pl.tables[1].src[0]
    with pytest.raises(ValueError, match="outside source rank"):
        pl.validate()


def test_bad_input_names_the_argument():
    src, dst = layouts()
    with pytest.raises(TypeError, match="src_layout"):
        plan("x", dst)
    with pytest.raises(TypeError, match="dst_layout"):
        plan(src, None)
    for kw in ("nics_per_rank", "max_write_bytes", "split_bytes", "fp8_block", "align"):
        with pytest.raises(ValueError, match=kw):
            plan(src, dst, **{kw: 0})
        with pytest.raises(TypeError, match=kw):
            plan(src, dst, **{kw: 1.5})
    other = Layout.fsdp(PARAMS[:-1], 2)
    with pytest.raises(ValueError, match="dst_layout"):
        plan(src, other)
    with pytest.raises(ValueError, match="dst_layout.*shape"):
        plan(src, Layout.replicated([p._replace(shape=(3,)) if p.name == "norm" else p for p in PARAMS], 2))
    with pytest.raises(ValueError, match="no cast"):
        plan(src, Layout.replicated([p._replace(dtype="fp16") if p.name == "norm" else p for p in PARAMS], 2))
    p = [ParamSpec("w", (8, 64), "bf16")]
    holes = Layout(tuple(p), ((Shard(0, 0, 4), None),))
    with pytest.raises(ValueError, match="src_layout: no source rank holds"):
        plan(holes, Layout.replicated(p, 1))
    two_dims = Layout(tuple(p), ((Shard(0, 0, 8), Shard(1, 0, 64)),))
    with pytest.raises(ValueError, match="src_layout.*several dims|dims"):
        plan(two_dims, Layout.replicated(p, 1))
    q = [ParamSpec("w", (8, 64), "fp8_e4m3")]
    with pytest.raises(ValueError, match="cuts a block"):
        plan(Layout.fsdp(p, 3, dims={"w": 1}), Layout.replicated(q, 1))


@pytest.mark.parametrize("params, shards, exc, match", [
    ([], (), ValueError, "params"),
    ([ParamSpec("a", (4,), "bf16"), ParamSpec("a", (4,), "bf16")], ((None,), (None,)), ValueError, "duplicate"),
    ([ParamSpec("a", (0,), "bf16")], ((None,),), ValueError, "shape"),
    ([ParamSpec("a", (4,), "bf17")], ((None,),), ValueError, "dtype"),
    ([ParamSpec("a", (4,), "bf16")], ((Shard(1, 0, 2),),), ValueError, "dim 1"),
    ([ParamSpec("a", (4,), "bf16")], ((Shard(0, 2, 2),),), ValueError, "empty"),
    ([ParamSpec("a", (4,), "bf16")], ((Shard(0, 0, 5),),), ValueError, "outside"),
    ([ParamSpec("a", (4,), "bf16")], ((FULL,), (FULL,)), ValueError, "rows"),
    ([ParamSpec("a", (4,), "bf16")], (("x",),), TypeError, "Shard"),
])
def test_bad_layouts(params, shards, exc, match):
    with pytest.raises(exc, match=match):
        Layout(tuple(params), shards)


# -- conversions ---------------------------------------------------------------------------------------


def _e4m3_reference(x: np.ndarray) -> np.ndarray:
    """Nearest finite E4M3 value by exhaustive search, ties to the even code, saturating."""
    vals = e4m3_to_f32(np.arange(0x7F, dtype=np.uint8)).astype(np.float64)
    a = np.abs(x.astype(np.float64))
    dist = np.abs(a[:, None] - vals[None, :])
    best = dist.min(axis=1, keepdims=True)
    tie = dist == best
    even = tie & (np.arange(0x7F)[None, :] % 2 == 0)
    code = np.where(tie.sum(axis=1) > 1, np.argmax(even, axis=1), np.argmin(dist, axis=1))
    code = np.where(a > 448, 0x7E, code)
    return (code | np.where(np.signbit(x), 0x80, 0)).astype(np.uint8)


def test_e4m3_against_exhaustive_reference():
    vals = e4m3_to_f32(np.arange(0x7F, dtype=np.uint8)).astype(np.float64)
    mids = (vals[:-1] + vals[1:]) / 2
    rng = np.random.default_rng(5)
    x = np.concatenate([vals, mids, np.nextafter(mids, 0), np.nextafter(mids, 1e9),
                        rng.standard_normal(20000) * 40, rng.standard_normal(5000) * 1e-2,
                        [448, 449, 464, 465, 1e6, 2.0 ** -10, 2.0 ** -9 * 1.5]]).astype(np.float32)
    x = np.concatenate([x, -x])
    assert np.array_equal(f32_to_e4m3(x), _e4m3_reference(x))
    special = f32_to_e4m3(np.array([np.inf, -np.inf, np.nan], np.float32))
    assert special.tolist() == [0x7E, 0xFE, 0x7F]
    # decoding is exact and round-trips every finite code
    codes = np.array([c for c in range(256) if c & 0x7F != 0x7F], np.uint8)
    assert np.array_equal(f32_to_e4m3(e4m3_to_f32(codes)), np.where(codes == 0x80, 0x80, codes))


def test_bf16_rounding():
    rng = np.random.default_rng(6)
    x = (rng.standard_normal(50000) * 10.0 ** rng.integers(-30, 30, 50000)).astype(np.float32)
    b = f32_to_bf16(x)
    back = bf16_to_f32(b).astype(np.float64)
    # nearest: no other bf16 value is closer; ties to even bits
    lo = bf16_to_f32((x.view(np.uint32) >> 16).astype(np.uint16)).astype(np.float64)
    hi = bf16_to_f32(((x.view(np.uint32) >> 16) + 1).astype(np.uint16)).astype(np.float64)
    xd = x.astype(np.float64)
    best = np.minimum(np.abs(xd - lo), np.abs(xd - hi))
    assert (np.abs(xd - back) == best).all()
    tie = np.abs(xd - lo) == np.abs(xd - hi)
    assert (b[tie] % 2 == 0).all()
    assert np.array_equal(bf16_to_f32(f32_to_bf16(back.astype(np.float32))), back.astype(np.float32))
    assert np.isnan(bf16_to_f32(f32_to_bf16(np.array([np.nan], np.float32))))[0]


def test_block_quantization():
    rng = np.random.default_rng(7)
    x = f32_to_bf16((rng.standard_normal((5, 300)) * rng.uniform(0.001, 100, (5, 1))).astype(np.float32))
    x[2, :128] = 0  # an all-zero block: scale 1
    q, s = quantize_blocks(x)
    assert q.shape == (5, 300) and s.shape == (5, 3) and s.dtype == np.float32
    assert s[2, 0] == 1.0 and (q[2, :128] == 0).all()
    f = bf16_to_f32(x).astype(np.float64)
    amax = np.stack([np.abs(f[:, a:a + 128]).max(axis=1) for a in (0, 128, 256)], axis=1)
    assert np.allclose(np.where(amax > 0, amax / 448, 1), s, rtol=1e-6)
    # the largest element of each block maps to +-448; the error is within half a step (2^-4 relative + subnormals)
    err = np.abs(dequantize_blocks(q, s) - f)
    bound = np.maximum(np.abs(f) * 2.0 ** -4, np.repeat(s, 128, axis=1)[:, :300] * 2.0 ** -10)
    assert (err <= bound + 1e-30).all()


# -- the simulator and the benchmark's configuration (no GPU) -----------------------------------------


def test_model_shapes():
    from aiofabric.weights.models import MODELS

    # parameter counts of the published configs (multi-token-prediction layers left out)
    assert abs(MODELS["deepseek-v3"].numel() / 1e9 - 671.0) < 0.5
    assert abs(MODELS["qwen3-235b-a22b"].numel() / 1e9 - 235.1) < 0.5
    assert abs(MODELS["kimi-k2"].numel() / 1e12 - 1.03) < 0.01
    kimi = MODELS["kimi-k2"].params(2)
    assert any(p.name == "layers.1.mlp.experts.gate_proj" and p.shape == (384, 2048, 7168) for p in kimi)


def test_simulator_cli(capsys):
    from aiofabric.weights.simulator import main, simulate

    assert main(["--model", "qwen3-235b-a22b", "--src", "8", "--dst", "8", "--dst-group", "4", "8",
                 "--gbps", "400"]) == 0
    out = capsys.readouterr().out
    assert "predicted_s" in out and out.count("qwen3-235b-a22b") == 2
    r = simulate("qwen3-235b-a22b", 8, 8, 400, dst_group=8)
    # one replica of 8: every inference rank receives about an eighth of the FP8 model
    assert 25 < r["dst_GB_max"] < 40 and r["predicted_s"] >= r["ingress_s"]
    with pytest.raises(ValueError, match="model"):
        simulate("gpt-2")
    with pytest.raises(ValueError, match="dst_group"):
        simulate("qwen3-235b-a22b", 8, 6, dst_group=4)


def test_benchmark_configuration():
    from benchmarks.weights_bw import configure

    for world in (2, 4):
        params, p16, p8, layers = configure("qwen3-235b-a22b", 12, world // 2, world // 2)
        assert layers == 2
        assert 11e9 < sum(p.numel * p.itemsize for p in params) < 14e9
        p16.validate()
        p8.validate()
        assert p8.link_bytes()[2].sum() < p16.link_bytes()[2].sum()
