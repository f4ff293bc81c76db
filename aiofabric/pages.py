"""Validation of paged writes (sans-IO): every index is checked against both
regions before anything is posted."""
from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["check_pages"]


def _indices(name: str, value: Any) -> np.ndarray:
    if type(value) is np.ndarray and value.dtype == np.int64 and value.ndim == 1 and value.flags.c_contiguous:
        return value  # the common case, without numpy's slower type queries
    arr = np.asarray(value)
    if arr.size == 0 and arr.ndim == 1:
        return np.zeros(0, dtype=np.int64)  # [] arrives as float64
    if arr.dtype.kind not in "iu":
        raise TypeError(f"{name} must hold integers, not {arr.dtype}")
    if arr.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional, got shape {arr.shape}")
    return np.ascontiguousarray(arr, dtype=np.int64)


def _positive(name: str, value: Any) -> int:
    if type(value) is not int and not isinstance(value, np.integer):
        raise TypeError(f"{name} must be an int, not {type(value).__name__}")
    if value <= 0:
        raise ValueError(f"{name} must be positive, got {value}")
    return int(value)


def check_pages(page_size: Any, src_pages: Any, dst_pages: Any, src_stride: Any, dst_stride: Any,
                src_nbytes: int, dst_nbytes: int) -> tuple[int, int, int, np.ndarray, np.ndarray]:
    """Return (page_size, src_stride, dst_stride, src_idx, dst_idx) as validated
    values, or raise TypeError/ValueError naming the argument at fault."""
    page = _positive("page_size", page_size)
    sstride = page if src_stride is None else _positive("src_stride", src_stride)
    dstride = page if dst_stride is None else _positive("dst_stride", dst_stride)
    src = _indices("src_pages", src_pages)
    dst = _indices("dst_pages", dst_pages)
    if len(src) != len(dst):
        raise ValueError(f"src_pages has {len(src)} entries but dst_pages has {len(dst)}")
    for name, idx, stride, limit in (("src_pages", src, sstride, src_nbytes), ("dst_pages", dst, dstride, dst_nbytes)):
        if len(idx) == 0:
            continue
        # One reduction in the common case: as unsigned, a negative index is
        # larger than any valid one.
        if int(idx.view(np.uint64).max()) * stride + page <= limit:
            continue
        lo, hi = int(idx.min()), int(idx.max())
        if lo < 0:
            raise ValueError(f"{name} holds a negative index ({lo})")
        if hi * stride + page > limit:
            raise ValueError(
                f"{name} index {hi} reaches byte {hi * stride + page}, beyond the {limit} bytes of the region"
            )
    return page, sstride, dstride, src, dst
