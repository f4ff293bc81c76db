"""BF16 and FP8 (E4M3) in NumPy, bit for bit what the GPU kernels do.

NumPy has no bfloat16 or float8 types, so both travel as raw bits: BF16 as
``uint16`` (the upper half of an IEEE float32), FP8 E4M3 as ``uint8`` (the OCP
"E4M3FN" variant of ``__nv_fp8_e4m3``: bias 7, no infinities, one NaN code per
sign, largest finite value 448).

Every conversion to a narrower type rounds to nearest, ties to even;
conversion to FP8 saturates to +-448 (CUDA's ``__NV_SATFINITE``).

Block-scaled FP8 (what DeepSeek-V3 dispatches): one float32 scale per group
of 128 channels, ``scale = amax / 448`` of the group (1.0 for an all-zero
group), payload ``e4m3(x / scale)``; ``x ~ decode(payload) * scale``.
"""
from __future__ import annotations

import numpy as np

__all__ = ["FP8_MAX", "GROUP", "bf16_to_f32", "f32_to_bf16", "fp8_decode", "fp8_encode",
           "fp8_quantize", "fp8_dequantize", "FP8_TABLE"]

FP8_MAX = 448.0
GROUP = 128  #: channels per FP8 scale


def bf16_to_f32(bits: np.ndarray) -> np.ndarray:
    """BF16 bits (uint16) -> float32 (exact)."""
    b = np.asarray(bits)
    if b.dtype != np.uint16:
        raise TypeError(f"BF16 values travel as uint16 bits, not {b.dtype}")
    return (b.astype(np.uint32) << 16).view(np.float32)


def f32_to_bf16(x: np.ndarray) -> np.ndarray:
    """float32 -> BF16 bits (uint16), round to nearest even; NaN stays NaN."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounded = ((u + (((u >> 16) & 1) + 0x7FFF)) >> 16).astype(np.uint16)
    nan = np.isnan(u.view(np.float32))
    if nan.any():
        rounded = np.where(nan, ((u >> 16) | 0x40).astype(np.uint16), rounded)
    return rounded


def _table() -> np.ndarray:
    codes = np.arange(256, dtype=np.int64)
    sign = np.where(codes >> 7, -1.0, 1.0)
    exp = (codes >> 3) & 0xF
    man = codes & 7
    mag = np.where(exp == 0, man / 8.0 * 2.0**-6, (1 + man / 8.0) * np.exp2(exp - 7.0))
    val = (sign * mag).astype(np.float32)
    val[(exp == 15) & (man == 7)] = np.nan
    return val


#: float32 value of every E4M3 code (codes 0x7F and 0xFF are NaN)
FP8_TABLE = _table()
_POS = FP8_TABLE[:127].astype(np.float64)  # codes 0..126: 0 .. 448, strictly increasing


def fp8_decode(codes: np.ndarray) -> np.ndarray:
    """E4M3 codes (uint8) -> float32 (exact)."""
    c = np.asarray(codes)
    if c.dtype != np.uint8:
        raise TypeError(f"FP8 values travel as uint8 codes, not {c.dtype}")
    return FP8_TABLE[c]


def fp8_encode(x: np.ndarray) -> np.ndarray:
    """float32 -> E4M3 codes (uint8): nearest value, ties to the even code,
    saturating at +-448; NaN -> 0x7F (0xFF if negative)."""
    x = np.asarray(x, dtype=np.float32)
    a = np.minimum(np.abs(x).astype(np.float64), FP8_MAX)
    hi = np.clip(np.searchsorted(_POS, a, side="left"), 0, 126)
    lo = np.maximum(hi - 1, 0)
    d_lo = a - _POS[lo]
    d_hi = _POS[hi] - a
    pick_hi = (d_hi < d_lo) | ((d_hi == d_lo) & (hi % 2 == 0))
    code = np.where(pick_hi, hi, lo).astype(np.uint8)
    code = np.where(np.isnan(x), np.uint8(0x7F), code)
    return code | np.where(np.signbit(x), np.uint8(0x80), np.uint8(0))


def fp8_quantize(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """float32 ``[..., H]`` (H a multiple of 128) -> (codes uint8 ``[..., H]``,
    scales float32 ``[..., H/128]``)."""
    x = np.asarray(x, dtype=np.float32)
    h = x.shape[-1]
    if h % GROUP:
        raise ValueError(f"FP8 needs the hidden size to be a multiple of {GROUP}, got {h}")
    g = x.reshape(*x.shape[:-1], h // GROUP, GROUP)
    amax = np.abs(g).max(axis=-1)
    scale = np.where(amax > 0, amax / np.float32(FP8_MAX), np.float32(1.0)).astype(np.float32)
    q = fp8_encode(g / scale[..., None])
    return q.reshape(x.shape), scale


def fp8_dequantize(codes: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """(codes ``[..., H]``, scales ``[..., H/128]``) -> float32 ``[..., H]``."""
    v = fp8_decode(codes)
    h = v.shape[-1]
    g = v.reshape(*v.shape[:-1], h // GROUP, GROUP) * np.asarray(scales, np.float32)[..., None]
    return g.reshape(v.shape).astype(np.float32)
