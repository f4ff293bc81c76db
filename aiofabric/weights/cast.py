"""BF16 -> FP8 (E4M3, "fn": no infinities, max 448) with one float32 scale per
block of 128 elements of a row, in NumPy (the CPU path; the GPU kernels in
:mod:`aiofabric.weights.cast_gpu` compute the same bits).

NumPy has neither type: bf16 values are ``uint16`` (the top half of a
float32), fp8 values ``uint8`` codes.  Conversions round to nearest, ties to
even; float32 -> E4M3 saturates to +-448 (infinities too) and maps NaN to
0x7F/0xFF.

Quantizing a block: ``scale = amax / 448`` (1.0 for an all-zero block),
``code = e4m3(x / scale)``; ``dequantize`` gives ``e4m3_value(code) * scale``.
"""
from __future__ import annotations

import numpy as np

__all__ = [
    "BLOCK",
    "FP8_MAX",
    "bf16_to_f32",
    "dequantize_blocks",
    "e4m3_to_f32",
    "f32_to_bf16",
    "f32_to_e4m3",
    "quantize_blocks",
    "quantize_runs",
]

FP8_MAX = 448.0
BLOCK = 128


def f32_to_bf16(x: np.ndarray) -> np.ndarray:
    """float32 -> bf16 bits (uint16), round to nearest even; NaN stays NaN."""
    u = np.ascontiguousarray(x, np.float32).view(np.uint32)
    nan = (u & 0x7FFFFFFF) > 0x7F800000
    r = (u + (0x7FFF + ((u >> 16) & 1))) >> 16
    r = np.where(nan, (u >> 16) | 0x40, r)
    return r.astype(np.uint16)


def bf16_to_f32(b: np.ndarray) -> np.ndarray:
    """bf16 bits (uint16) -> float32 (exact)."""
    return (np.asarray(b, np.uint16).astype(np.uint32) << 16).view(np.float32)


def f32_to_e4m3(x: np.ndarray) -> np.ndarray:
    """float32 -> E4M3 codes (uint8): nearest, ties to even, saturating."""
    u = np.ascontiguousarray(x, np.float32).view(np.uint32)
    sign = ((u >> 24) & 0x80).astype(np.uint8)
    a = u & 0x7FFFFFFF
    exp = (a >> 23).astype(np.int32) - 127
    # normal range of E4M3: exponent -6..8; keep 3 of the 23 mantissa bits
    mant = a & 0x7FFFFF
    keep = mant >> 20
    rest = mant & 0xFFFFF
    up = (rest > 0x80000) | ((rest == 0x80000) & ((keep & 1) == 1))
    normal = ((np.clip(exp, -6, 8) + 7).astype(np.uint32) << 3) + keep + up
    # subnormals (|x| < 2^-6): multiples of 2^-9, codes 0..8 (8 is the smallest normal)
    f = np.where(exp < -6, a, 0).astype(np.uint32).view(np.float32)
    sub = np.rint(f * np.float32(512.0)).astype(np.uint32)
    code = np.where(exp < -6, sub, np.minimum(normal, 0x7E))
    code = np.where(a >= 0x43E00000, 0x7E, code)   # >= 448 (and inf): saturate
    code = np.where(a > 0x7F800000, 0x7F, code)     # NaN
    return (code.astype(np.uint8) | sign)


def _e4m3_table() -> np.ndarray:
    codes = np.arange(256)
    s = np.where(codes & 0x80, -1.0, 1.0)
    e = (codes >> 3) & 0xF
    m = codes & 7
    v = np.where(e == 0, m / 8.0 * 2.0 ** -6, (1 + m / 8.0) * 2.0 ** (e - 7.0))
    v = np.where((codes & 0x7F) == 0x7F, np.nan, v)
    return (s * v).astype(np.float32)


_E4M3 = _e4m3_table()


def e4m3_to_f32(c: np.ndarray) -> np.ndarray:
    """E4M3 codes -> float32 (exact)."""
    return _E4M3[np.asarray(c, np.uint8)]


def quantize_blocks(x_bf16: np.ndarray, block: int = BLOCK) -> tuple[np.ndarray, np.ndarray]:
    """Quantize ``[..., w]`` bf16 bits per ``block`` elements of each row:
    returns (codes ``[..., w]`` uint8, scales ``[..., ceil(w / block)]`` float32)."""
    x = bf16_to_f32(x_bf16)
    w = x.shape[-1]
    nb = -(-w // block)
    pad = nb * block - w
    xp = np.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, pad)]) if pad else x
    xb = xp.reshape(x.shape[:-1] + (nb, block))
    amax = np.max(np.abs(xb), axis=-1).astype(np.float32)
    scale = np.where(amax > 0, amax / np.float32(FP8_MAX), np.float32(1.0)).astype(np.float32)
    q = f32_to_e4m3((xb / scale[..., None]).astype(np.float32))
    q = q.reshape(x.shape[:-1] + (nb * block,))[..., :w]
    return np.ascontiguousarray(q), scale


def dequantize_blocks(codes: np.ndarray, scales: np.ndarray, block: int = BLOCK) -> np.ndarray:
    """The float32 values that ``codes`` with per-block ``scales`` stand for."""
    w = codes.shape[-1]
    rep = np.repeat(scales, block, axis=-1)[..., :w]
    return e4m3_to_f32(codes) * rep


def quantize_runs(src: np.ndarray, row_starts: np.ndarray, rows: int, width: int, out_codes: np.ndarray,
                  out_scales: np.ndarray, block: int = BLOCK) -> None:
    """Quantize pieces gathered row by row from a flat bf16 array: piece k
    is ``rows`` rows of ``width`` elements, row r at
    ``src[row_starts[k * rows + r]:]`` (``row_starts`` may be ``[n, rows]``).
    Codes go to ``out_codes`` (piece k at ``k * rows * width``), scales to
    ``out_scales`` (piece k at ``k * rows * ceil(width / block)``)."""
    starts = np.asarray(row_starts, np.int64).reshape(-1)
    idx = starts[:, None] + np.arange(width, dtype=np.int64)
    q, s = quantize_blocks(src[idx], block)
    out_codes[: q.size] = q.reshape(-1)
    out_scales[: s.size] = s.reshape(-1)
