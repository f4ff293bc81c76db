"""NumPy views of a rank's packed buffer: each parameter shard (and the
scales of quantized ones) as an array of its shape (sans-IO)."""
from __future__ import annotations

from typing import Any

import numpy as np

from .plan import Plan

__all__ = ["NP_DTYPES", "src_views", "dst_views"]

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
