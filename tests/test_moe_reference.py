"""The NumPy reference of MoE dispatch/combine and its numerics: properties
that hold for any routing (hypothesis), FP8 E4M3 against an independent
bit-level decoder, and the sans-IO layout against the reference."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aiofabric.moe import layout, reference
from aiofabric.moe.layout import MoEConfig
from aiofabric.moe.numerics import (FP8_TABLE, bf16_to_f32, f32_to_bf16, fp8_decode, fp8_dequantize, fp8_encode,
                                    fp8_quantize)

SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def routing(rng: np.random.Generator, t: int, k: int, e: int, masked: float = 0.2) -> np.ndarray:
    idx = np.stack([rng.permutation(e)[:k] for _ in range(t)]) if t else np.zeros((0, k), np.int64)
    idx = np.where(rng.random((t, k)) < masked, -1, idx)
    return idx.astype(np.int64)


@st.composite
def problems(draw, modes=("bf16", "fp8", "float32")):
    ranks = draw(st.integers(1, 4))
    epr = draw(st.integers(1, 3))
    e = ranks * epr
    k = draw(st.integers(1, min(e, 4)))
    hidden = draw(st.sampled_from([128, 256]))
    mode = draw(st.sampled_from(modes))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    ts = [draw(st.integers(0, 6)) for _ in range(ranks)]
    tokens = [rng.standard_normal((t, hidden)).astype(np.float32) for t in ts]
    idx = [routing(rng, t, k, e, draw(st.sampled_from([0.0, 0.3, 1.0]))) for t in ts]
    w = [rng.random((t, k)).astype(np.float32) for t in ts]
    return ranks, e, k, hidden, mode, tokens, idx, w


# -- numerics ---------------------------------------------------------------------

def e4m3_bits(code: int) -> float:
    """An independent decoder from the definition (sign, 4-bit exponent bias 7, 3-bit mantissa)."""
    s, ex, m = code >> 7, (code >> 3) & 15, code & 7
    if ex == 15 and m == 7:
        return float("nan")
    v = m / 8 * 2.0**-6 if ex == 0 else (1 + m / 8) * 2.0 ** (ex - 7)
    return -v if s else v


def test_fp8_table_matches_definition_and_known_values():
    for c in range(256):
        want = e4m3_bits(c)
        got = float(FP8_TABLE[c])
        assert (np.isnan(want) and np.isnan(got)) or want == got, c
    assert FP8_TABLE[0x7E] == 448 and FP8_TABLE[0x01] == 2.0**-9 and FP8_TABLE[0x38] == 1.0
    assert fp8_decode(fp8_encode(np.float32([448, 1000, -1e9, 0.0, 1.0, -2.0]))).tolist() == [
        448, 448, -448, 0.0, 1.0, -2.0]
    assert fp8_encode(np.float32([np.nan]))[0] & 0x7F == 0x7F


def test_fp8_encode_is_round_to_nearest_even_on_every_code():
    codes = np.arange(0, 126, dtype=np.uint8)  # consecutive positive codes
    lo, hi = FP8_TABLE[codes].astype(np.float64), FP8_TABLE[codes + 1].astype(np.float64)
    mid = ((lo + hi) / 2).astype(np.float32)
    assert np.all(mid.astype(np.float64) == (lo + hi) / 2)  # midpoints are exact in float32
    got = fp8_encode(mid)
    even = np.where(codes % 2 == 0, codes, codes + 1)
    assert np.array_equal(got, even)
    assert np.array_equal(fp8_encode(-mid), even | 0x80)
    # just off the midpoint goes to the nearer side
    assert np.array_equal(fp8_encode(np.nextafter(mid, np.float32(0))), codes)
    assert np.array_equal(fp8_encode(np.nextafter(mid, np.float32(1e9))), codes + 1)
    assert np.array_equal(fp8_encode(FP8_TABLE[:127]), np.arange(127, dtype=np.uint8))


@SETTINGS
@given(st.integers(0, 2**32 - 1), st.sampled_from([1.0, 1e-3, 1e3, 1e-8]))
def test_fp8_round_trip_error_bound(seed, mag):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((5, 256)) * mag).astype(np.float32)
    x[0, :128] = 0  # an all-zero group
    x[1, 3] = 0
    q, s = fp8_quantize(x)
    assert q.dtype == np.uint8 and s.dtype == np.float32 and s.shape == (5, 2)
    y = fp8_dequantize(q, s)
    assert np.array_equal(y[0, :128], np.zeros(128, np.float32))
    bound = np.abs(x) * 2.0**-4 + np.repeat(s, 128, axis=1) * 2.0**-10
    assert np.all(np.abs(y - x) <= bound * (1 + 1e-5)), float(np.max(np.abs(y - x) / bound))
    amax = np.abs(x.reshape(5, 2, 128)).max(axis=2)
    assert np.array_equal(fp8_decode(q).reshape(5, 2, 128).__abs__().max(axis=2) == 448, amax > 0)


def test_bf16_round_to_nearest_even():
    x = np.float32([1.0, 1.0 + 2**-8, 1.0 + 3 * 2**-8, -2.5, np.inf, 3.0e38])
    b = f32_to_bf16(x)
    assert bf16_to_f32(b).tolist()[:4] == [1.0, 1.0, 1.0 + 2**-6, -2.5]
    assert bf16_to_f32(b)[4] == np.inf
    assert np.isnan(bf16_to_f32(f32_to_bf16(np.float32([np.nan])))[0])
    allbits = np.arange(1 << 16, dtype=np.uint16)
    finite = np.isfinite(bf16_to_f32(allbits))
    assert np.array_equal(f32_to_bf16(bf16_to_f32(allbits))[finite], allbits[finite])
    with pytest.raises(TypeError):
        bf16_to_f32(np.zeros(2, np.int16))


# -- dispatch / combine ---------------------------------------------------------------

@SETTINGS
@given(problems())
def test_dispatch_counts_order_and_dedup(p):
    ranks, e, _, hidden, mode, tokens, idx, _ = p
    epr = e // ranks
    got = reference.dispatch(tokens, idx, e, ranks, mode=mode)
    assert len(got) == ranks
    for r, rd in enumerate(got):
        for le in range(epr):
            ge = r * epr + le
            want = [(s, t) for s in range(ranks) for t in range(len(idx[s])) if ge in idx[s][t]]
            assert list(zip(rd.src_rank[le].tolist(), rd.src_token[le].tolist())) == want  # order
            assert rd.counts[le] == len(want) == len(rd.x[le])
            x, sc = reference.encode_tokens(np.stack([tokens[s][t] for s, t in want]) if want
                                            else np.zeros((0, hidden), np.float32), mode)
            assert np.array_equal(rd.x[le], x)
            if mode == "fp8":
                assert np.array_equal(rd.scales[le], sc)
        for s in range(ranks):  # one row per (token, rank), however many of its experts live there
            on_r = [(idx[s][t] >= 0) & (idx[s][t] // epr == r) for t in range(len(idx[s]))]
            assert rd.rows[s] == sum(bool(m.any()) for m in on_r)
    total = sum(int((i >= 0).sum()) for i in idx)
    assert sum(int(rd.counts.sum()) for rd in got) == total  # masked slots go nowhere


@SETTINGS
@given(problems())
def test_identity_experts_combine_to_weighted_sum(p):
    ranks, e, _, hidden, mode, tokens, idx, w = p
    got = reference.dispatch(tokens, idx, e, ranks, mode=mode)
    ys = [[reference.decode_tokens(rd.x[le], None if rd.scales is None else rd.scales[le], mode)
           for le in range(e // ranks)] for rd in got]
    for cd in ("float32", "bf16"):
        out = reference.combine(ys, idx, w, e, ranks, combine_dtype=cd)
        for s in range(ranks):
            x = reference.decode_tokens(*reference.encode_tokens(tokens[s], mode), mode)
            want = ((idx[s] >= 0) * w[s]).sum(axis=1, keepdims=True) * x if len(x) else x
            o = out[s] if cd == "float32" else bf16_to_f32(out[s])
            assert o.shape == (len(tokens[s]), hidden)
            # float32: re-association only; bf16: one rounding per rank partial plus the final one
            tol = 1e-5 if cd == "float32" else 2.0**-7 * (ranks + 1)
            scale = ((idx[s] >= 0) * w[s]).sum(axis=1, keepdims=True) * np.abs(x) + 1e-30
            assert np.all(np.abs(o - want) <= tol * scale + 1e-6), cd
            masked = (idx[s] < 0).all(axis=1)
            assert not o[masked].any()


def test_bad_input_names_the_argument():
    t = [np.zeros((2, 128), np.float32)]
    with pytest.raises(ValueError, match="topk_idx"):
        reference.dispatch(t, [np.array([[0, 4], [1, 2]])], 4, 1)
    with pytest.raises(ValueError, match="twice"):
        reference.dispatch(t, [np.array([[1, 1], [0, -1]])], 4, 1)
    with pytest.raises(TypeError, match="topk_idx"):
        reference.dispatch(t, [np.array([[0.0, 1.0], [0, 1]])], 4, 1)
    with pytest.raises(TypeError, match="tokens"):
        reference.dispatch([np.zeros((2, 128), np.float64)], [np.array([[0, 1], [0, 1]])], 4, 1)
    with pytest.raises(ValueError, match="num_experts"):
        reference.dispatch(t, [np.array([[0, 1], [0, 1]])], 3, 2)
    with pytest.raises(ValueError, match="mode"):
        reference.dispatch(t, [np.array([[0, 1], [0, 1]])], 4, 1, mode="fp4")
    with pytest.raises(ValueError, match="fp8"):
        MoEConfig(8, 2, 104, 2, 4, mode="fp8")
    with pytest.raises(TypeError, match="ranks"):
        MoEConfig(8, 2.0, 128, 2, 4)


# -- the sans-IO layout reproduces the reference --------------------------------------------

@SETTINGS
@given(problems())
def test_layout_pack_expand_combine_equal_reference(p):
    ranks, e, k, hidden, mode, tokens, idx, w = p
    cfg = MoEConfig(e, ranks, hidden, k, max(7, 1), mode=mode, combine_dtype="bf16")
    epr = e // ranks
    ref = reference.dispatch(tokens, idx, e, ranks, mode=mode)
    rts = [layout.route(cfg, layout.check_routing("i", idx[s], e).astype(np.int32)) for s in range(ranks)]
    # every source packs its rows for every destination; destinations expand
    drows = np.zeros((ranks, ranks, cfg.max_tokens, cfg.row_bytes), np.uint8)  # [dst, src, ...]
    meta = np.zeros((ranks, ranks), layout.meta_dtype(cfg))
    for s in range(ranks):
        body = layout.payload(cfg, tokens[s])
        for r in range(ranks):
            n = layout.pack_rows(cfg, drows[r, s], r, body, idx[s].astype(np.int32), w[s], rts[s])
            assert n == rts[s].rows[r] == ref[r].rows[s]
            meta["rows"][r, s], meta["count"][r, s] = n, rts[s].counts[r]
    ys, bases = [], []
    for r in range(ranks):
        counts = meta["count"][r].astype(np.int64).sum(axis=0)
        assert np.array_equal(counts, ref[r].counts)
        base = np.concatenate([[0], np.cumsum(counts)])
        body = cfg.payload_bytes + cfg.scale_bytes
        xb = np.zeros((base[-1], body), np.uint8)
        src = np.zeros((base[-1], 2), np.int32)
        layout.expand(cfg, drows[r], meta[r], base[:-1], xb, src)
        for le in range(epr):
            a, b = base[le], base[le + 1]
            assert np.array_equal(xb[a:b, :cfg.payload_bytes], np.ascontiguousarray(ref[r].x[le]).view(np.uint8)
                                  .reshape(b - a, cfg.payload_bytes))
            assert np.array_equal(src[a:b, 0], ref[r].src_rank[le])
            assert np.array_equal(src[a:b, 1], ref[r].src_token[le])
        # deterministic "experts": scale each expert's tokens by (expert + 1) / 4
        y = np.concatenate([reference.decode_tokens(ref[r].x[le], None if mode != "fp8" else ref[r].scales[le],
                                                    mode) * np.float32((r * epr + le + 1) / 4)
                            for le in range(epr)]) if base[-1] else np.zeros((0, hidden), np.float32)
        ys.append(y)
        bases.append(base)
    want = reference.combine([[ys[r][bases[r][le]:bases[r][le + 1]] for le in range(epr)] for r in range(ranks)],
                             idx, w, e, ranks, combine_dtype="bf16")
    for s in range(ranks):
        crows = np.zeros((ranks, cfg.max_tokens, hidden), np.uint16)
        for r in range(ranks):
            n = int(meta["rows"][r, s])
            off = layout.offsets(cfg, meta[r])[s]
            crows[r, :n] = f32_to_bf16(layout.partials(cfg, drows[r, s], n, bases[r][:-1] + off, ys[r]))
        got = layout.gather_combine(cfg, crows, rts[s].rowidx)
        assert np.array_equal(got, want[s])  # bit for bit
