"""The NumPy reference of MoE dispatch and combine: the definition that every
backend (host fabric, GPU NVLink) must reproduce bit for bit.

Inputs per source rank ``s``: ``tokens[s]`` ``[T_s, H]`` (BF16 bits as
``uint16``, or ``float32``), ``topk_idx[s]`` ``[T_s, k]`` (global expert ids,
``-1`` = masked slot) and ``topk_weights[s]`` ``[T_s, k]`` (float32).
Experts are spread evenly: rank ``r`` owns experts
``r * E/ranks .. (r+1) * E/ranks - 1`` (local ids ``0 .. E/ranks - 1``).

**Dispatch.** Rank ``r`` receives, for each local expert, every token routed
to it, **ordered by source rank, then by token index** in the source (a token
appears once per expert: duplicate expert ids in one row are refused).  The
payload is the token in the dispatch format (``mode``): ``"bf16"`` (uint16
bits; float32 input is rounded to nearest even), ``"float32"``, or ``"fp8"``
(E4M3 codes plus one float32 scale per 128 channels, see numerics.py).

**Deduplication.** A token routed to several experts of the same rank crosses
the wire **once per (token, rank)**, as in DeepEP and pplx-kernels: one row
carrying the payload and the token's slots on that rank; the receiver expands
it to each of its experts.  ``RankDispatch.rows[s]`` is the number of such
rows rank ``r`` received from ``s``.

**Combine.** Each expert rank reduces its own experts' outputs for a token
first (``partial_r = sum over the token's slots j on rank r, in slot order,
of w_j * y``, float32 multiply then add), rounds that partial to the combine
dtype (BF16 or float32: what crosses the wire, once per (token, rank)), and
the source sums the partials in ascending rank order in float32 and rounds
the result to the combine dtype.  A token with every slot masked combines to
zeros.  (With float32 throughout this is the plain weighted sum up to
float32 rounding.)
"""
from __future__ import annotations

from typing import Any, NamedTuple, Sequence

import numpy as np

from .layout import check_routing, check_tokens, check_weights, MODES, COMBINE_DTYPES
from .numerics import bf16_to_f32, f32_to_bf16, fp8_quantize

__all__ = ["RankDispatch", "dispatch", "combine", "encode_tokens", "decode_tokens", "wire_round"]


class RankDispatch(NamedTuple):
    """What one rank receives from a dispatch."""

    x: list[np.ndarray]                  #: per local expert ``[n_e, H]`` payload (uint16 / uint8 / float32)
    scales: list[np.ndarray] | None      #: per local expert ``[n_e, H/128]`` float32 (FP8 only)
    src_rank: list[np.ndarray]           #: per local expert ``[n_e]`` int32: the token's source rank
    src_token: list[np.ndarray]          #: per local expert ``[n_e]`` int32: its index at the source
    counts: np.ndarray                   #: ``[E/ranks]`` int64: n_e
    rows: np.ndarray                     #: ``[ranks]`` int64: rows (deduplicated tokens) from each source


def encode_tokens(tokens: np.ndarray, mode: str) -> tuple[np.ndarray, np.ndarray | None]:
    """Tokens ``[T, H]`` (uint16 BF16 bits or float32) in the dispatch format:
    (payload, scales or None)."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    t = np.asarray(tokens)
    if mode == "bf16":
        return (t if t.dtype == np.uint16 else f32_to_bf16(t)), None
    f = bf16_to_f32(t) if t.dtype == np.uint16 else t.astype(np.float32)
    if mode == "float32":
        return f, None
    return fp8_quantize(f)


def decode_tokens(x: np.ndarray, scales: np.ndarray | None, mode: str) -> np.ndarray:
    """The float32 values of a dispatch payload."""
    from .numerics import fp8_dequantize

    if mode == "bf16":
        return bf16_to_f32(x)
    if mode == "float32":
        return np.asarray(x, np.float32)
    assert scales is not None
    return fp8_dequantize(x, scales)


def wire_round(x: np.ndarray, dtype: str) -> np.ndarray:
    """float32 values rounded to the combine dtype, back as float32."""
    return bf16_to_f32(f32_to_bf16(x)) if dtype == "bf16" else np.asarray(x, np.float32)


def _owner(e: int, epr: int) -> tuple[int, int]:
    return e // epr, e % epr


def dispatch(tokens: Sequence[Any], topk_idx: Sequence[Any], num_experts: int, ranks: int, *,
             mode: str = "bf16") -> list[RankDispatch]:
    """Per destination rank, what it receives (see the module docstring)."""
    epr = _epr(num_experts, ranks)
    if len(tokens) != ranks or len(topk_idx) != ranks:
        raise ValueError(f"tokens and topk_idx need one entry per rank ({ranks})")
    enc = []
    idx = []
    for s in range(ranks):
        t = check_tokens("tokens", tokens[s])
        i = check_routing("topk_idx", topk_idx[s], num_experts, len(t))
        enc.append(encode_tokens(t, mode))
        idx.append(i)
    out = []
    for r in range(ranks):
        lists: list[list[tuple[int, int]]] = [[] for _ in range(epr)]
        rows = np.zeros(ranks, np.int64)
        for s in range(ranks):
            for t in range(len(idx[s])):
                hit = False
                for e in idx[s][t]:
                    if e >= 0 and _owner(int(e), epr)[0] == r:
                        lists[_owner(int(e), epr)[1]].append((s, t))
                        hit = True
                rows[s] += hit
        xs, ss, sr, st = [], [], [], []
        for e in range(epr):
            src = lists[e]
            sr.append(np.array([s for s, _ in src], np.int32))
            st.append(np.array([t for _, t in src], np.int32))
            h = enc[0][0].shape[1]
            payload = [enc[s][0][t] for s, t in src]
            xs.append(np.stack(payload) if payload else np.zeros((0, h), enc[0][0].dtype))
            if mode == "fp8":
                sc = [enc[s][1][t] for s, t in src]  # type: ignore[index]
                ss.append(np.stack(sc) if sc else np.zeros((0, h // 128), np.float32))
        counts = np.array([len(x) for x in xs], np.int64)
        out.append(RankDispatch(xs, ss if mode == "fp8" else None, sr, st, counts, rows))
    return out


def combine(expert_out: Sequence[Sequence[Any]], topk_idx: Sequence[Any], topk_weights: Sequence[Any],
            num_experts: int, ranks: int, *, combine_dtype: str = "bf16") -> list[np.ndarray]:
    """Per source rank, ``[T_s, H]`` combined tokens (uint16 BF16 bits or
    float32).  ``expert_out[r][e]`` is ``[n_e, H]`` (uint16 BF16 bits or
    float32), in the order dispatch delivered them."""
    if combine_dtype not in COMBINE_DTYPES:
        raise ValueError(f"combine_dtype must be one of {COMBINE_DTYPES}, got {combine_dtype!r}")
    epr = _epr(num_experts, ranks)
    idx = [check_routing("topk_idx", topk_idx[s], num_experts) for s in range(ranks)]
    w = [check_weights("topk_weights", topk_weights[s], idx[s].shape) for s in range(ranks)]
    # Where (s, t) sits in each expert's list: dispatch order.
    where: dict[tuple[int, int, int], int] = {}
    fill = np.zeros((ranks, epr), np.int64)
    for s in range(ranks):
        for t in range(len(idx[s])):
            for e in idx[s][t]:
                if e >= 0:
                    r, le = _owner(int(e), epr)
                    where[(s, t, int(e))] = int(fill[r, le])
                    fill[r, le] += 1
    y = [[_as_f32(expert_out[r][e], f"expert_out[{r}][{e}]", int(fill[r, e])) for e in range(epr)]
         for r in range(ranks)]
    h = next((a.shape[1] for ys in y for a in ys if a.ndim == 2), 0)
    out = []
    for s in range(ranks):
        res = np.zeros((len(idx[s]), h), np.float32)
        for t in range(len(idx[s])):
            acc = np.zeros(h, np.float32)
            for r in range(ranks):
                partial = np.zeros(h, np.float32)
                hit = False
                for j, e in enumerate(idx[s][t]):
                    if e >= 0 and _owner(int(e), epr)[0] == r:
                        partial = partial + w[s][t, j] * y[r][int(e) % epr][where[(s, t, int(e))]]
                        hit = True
                if hit:
                    acc = acc + wire_round(partial, combine_dtype)
            res[t] = acc
        out.append(f32_to_bf16(res) if combine_dtype == "bf16" else res)
    return out


def _as_f32(a: Any, name: str, n: int) -> np.ndarray:
    arr = np.asarray(a)
    if arr.dtype == np.uint16:
        arr = bf16_to_f32(arr)
    elif arr.dtype != np.float32:
        raise TypeError(f"{name} must be uint16 (BF16 bits) or float32, not {arr.dtype}")
    if arr.ndim != 2 or len(arr) < n:
        raise ValueError(f"{name} must be [>= {n}, H], got shape {arr.shape}")
    return arr


def _epr(num_experts: int, ranks: int) -> int:
    if type(ranks) is not int or ranks < 1:
        raise ValueError(f"ranks must be a positive int, got {ranks!r}")
    if type(num_experts) is not int or num_experts < 1 or num_experts % ranks:
        raise ValueError(f"num_experts must be a positive multiple of ranks ({ranks}), got {num_experts!r}")
    return num_experts // ranks
