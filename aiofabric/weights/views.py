"""NumPy views of a rank's packed buffer: each parameter shard (and the
scales of quantized ones) as an array of its shape (sans-IO)."""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from .plan import Plan

__all__ = ["NP_DTYPES", "dst_views", "fill_src", "matches", "reference_dst", "src_views"]

#: how each plan dtype is stored in NumPy (bf16 as its bits, fp8 as its codes)
NP_DTYPES = {"bf16": np.uint16, "fp16": np.float16, "fp32": np.float32, "fp8_e4m3": np.uint8, "u8": np.uint8,
             "i32": np.int32, "i64": np.int64}


def _bytes(buf: Any, need: int, what: str) -> np.ndarray:
    arr = np.frombuffer(buf, np.uint8) if not isinstance(buf, np.ndarray) else buf.reshape(-1).view(np.uint8)
    if arr.size < need:
        raise ValueError(f"{what} has {arr.size} bytes, the plan needs {need}")
    return arr


def _view(arr: np.ndarray, off: int, shape: tuple[int, ...], dtype: Any) -> np.ndarray:
    n = int(np.prod(shape)) * np.dtype(dtype).itemsize
    return arr[off:off + n].view(dtype).reshape(shape)


def src_views(plan: Plan, rank: int, buf: Any) -> dict[str, np.ndarray]:
    """name -> the shard source ``rank`` holds, viewed in ``buf`` (writable if ``buf`` is)."""
    arr = _bytes(buf, plan.src_layout_bytes(rank), "buf")
    return {n: _view(arr, off, shape, NP_DTYPES[dt]) for n, (off, shape, dt) in plan.src_offsets(rank).items()}


def dst_views(plan: Plan, rank: int, buf: Any) -> dict[str, np.ndarray | tuple[np.ndarray, np.ndarray]]:
    """name -> destination ``rank``'s shard in ``buf``; for a quantized
    parameter a pair (codes, float32 scales)."""
    arr = _bytes(buf, plan.dst_layout_bytes(rank), "buf")
    out: dict[str, Any] = {}
    for n, (off, shape, dt, soff, sshape) in plan.dst_offsets(rank).items():
        v = _view(arr, off, shape, NP_DTYPES[dt])
        out[n] = (v, _view(arr, soff, sshape, np.float32)) if soff >= 0 else v
    return out


def _part(full: np.ndarray, shard: Any) -> np.ndarray:
    lo, hi = shard.bounds(full.shape)
    return full[tuple(slice(a, b) for a, b in zip(lo, hi))]


def fill_src(plan: Plan, rank: int, buf: Any, tensors: Mapping[str, np.ndarray]) -> None:
    """Copy source ``rank``'s shards of the full ``tensors`` (name -> array in
    the plan's NumPy dtype) into its packed buffer."""
    for i, p in enumerate(plan.src.params):
        s = plan.src.shards[i][rank]
        if s is not None:
            src_views(plan, rank, buf)[p.name][...] = _part(tensors[p.name], s)


def reference_dst(plan: Plan, rank: int, tensors: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """What destination ``rank``'s buffer must hold after an update of the
    full ``tensors`` (quantized parameters as (codes, scales) pairs)."""
    from .cast import quantize_blocks

    out: dict[str, Any] = {}
    for i, p in enumerate(plan.dst.params):
        s = plan.dst.shards[i][rank]
        if s is None:
            continue
        part = _part(tensors[p.name], s)
        out[p.name] = quantize_blocks(part, plan.options.fp8_block) if plan.cast(i) else part
    return out


def matches(got: Mapping[str, Any], want: Mapping[str, Any]) -> list[str]:
    """Names whose contents differ (bitwise) between two :func:`dst_views`-style dicts."""
    bad = []
    for n, w in want.items():
        g = got[n]
        if isinstance(w, tuple):
            if not (np.array_equal(g[0], w[0]) and np.array_equal(g[1].view(np.uint32), w[1].view(np.uint32))):
                bad.append(n)
        elif not np.array_equal(np.asarray(g).view(np.uint8), np.ascontiguousarray(w).view(np.uint8)):
            bad.append(n)
    return bad
