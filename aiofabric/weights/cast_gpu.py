"""BF16 -> FP8 (E4M3) block quantization on the GPU (CuPy RawKernel): the
same bits as :func:`aiofabric.weights.cast.quantize_runs` (same rounding,
same ``amax / 448`` scale, IEEE division).  Imports without CuPy; the first
call needs it (UnavailableError otherwise)."""
from __future__ import annotations

import functools
from typing import Any

import numpy as np

__all__ = ["QUANT_SRC", "kernel", "quantize_runs_gpu"]

QUANT_SRC = r"""
__device__ __forceinline__ unsigned char f32_to_e4m3(float f)
{
    unsigned int u = __float_as_uint(f);
    unsigned int sign = (u >> 24) & 0x80u;
    unsigned int a = u & 0x7FFFFFFFu;
    if (a > 0x7F800000u) return (unsigned char)(sign | 0x7Fu);   /* NaN */
    if (a >= 0x43E00000u) return (unsigned char)(sign | 0x7Eu);  /* >= 448, inf: saturate */
    int e = (int)(a >> 23) - 127;
    unsigned int code;
    if (e < -6) {                                                 /* subnormal: multiples of 2^-9 */
        code = (unsigned int)rintf(__uint_as_float(a) * 512.0f);
    } else {
        unsigned int mant = a & 0x7FFFFFu, keep = mant >> 20, rest = mant & 0xFFFFFu;
        unsigned int up = (rest > 0x80000u) || (rest == 0x80000u && (keep & 1u));
        code = ((unsigned int)(e + 7) << 3) + keep + up;
        if (code > 0x7Eu) code = 0x7Eu;
    }
    return (unsigned char)(sign | code);
}

/* One thread block per quantization block: piece p, row r, column block c.
 * Row r of piece p is width bf16 elements at src + row_starts[p*rows + r];
 * the piece's codes go to codes + p*rows*width, its scales to scales + p*rows*nb. */
extern "C" __global__ void quant_fp8(const unsigned short* __restrict__ src, const long long* __restrict__ row_starts,
                                     unsigned char* __restrict__ codes, float* __restrict__ scales,
                                     long long total, long long rows, long long width, long long nb, long long blk)
{
    __shared__ float wmax[32];
    const long long b = blockIdx.x;
    if (b >= total) return;
    const long long p = b / (rows * nb), rem = b % (rows * nb);
    const long long r = rem / nb, c = rem % nb;
    /* blk columns per quantization block; the launch rounds threads up to whole warps */
    const long long col = c * blk + threadIdx.x;
    const bool valid = threadIdx.x < blk && col < width;
    const long long e = r * width + col;
    float x = 0.0f;
    if (valid) x = __uint_as_float(((unsigned int)src[row_starts[p * rows + r] + col]) << 16);
    float a = fabsf(x);
    for (int o = 16; o > 0; o >>= 1) a = fmaxf(a, __shfl_xor_sync(0xffffffffu, a, o));
    if ((threadIdx.x & 31) == 0) wmax[threadIdx.x >> 5] = a;
    __syncthreads();
    if (threadIdx.x < 32) {
        float v = threadIdx.x < (blockDim.x >> 5) ? wmax[threadIdx.x] : 0.0f;
        for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
        if (threadIdx.x == 0) wmax[0] = v;
    }
    __syncthreads();
    const float amax = wmax[0];
    const float scale = amax > 0.0f ? __fdiv_rn(amax, 448.0f) : 1.0f;  /* IEEE division, fast-math or not */
    if (valid) codes[p * rows * width + e] = f32_to_e4m3(__fdiv_rn(x, scale));
    if (threadIdx.x == 0) scales[b] = scale;
}
"""


@functools.cache
def kernel(device: int) -> Any:
    """The compiled kernel for ``device`` (CuPy compiles and caches it)."""
    from ..gpu import _cupy

    cp = _cupy()
    with cp.cuda.Device(device):
        return cp.RawKernel(QUANT_SRC, "quant_fp8")


def quantize_runs_gpu(src_ptr: int, row_starts: np.ndarray, rows: int, width: int, codes_ptr: int, scales_ptr: int,
                      *, block: int = 128, device: int = 0, stream: Any = None) -> None:
    """Enqueue the quantization of pieces (see :func:`~aiofabric.weights.cast.quantize_runs`)
    on ``stream``: ``src_ptr`` points at bf16 elements (``row_starts``, one per
    row of every piece, are element offsets from it), ``codes_ptr``/``scales_ptr``
    at the packed outputs.
    ``block`` (columns per scale) is 1..1024."""
    from ..gpu import _cupy

    if type(block) is not int or not 1 <= block <= 1024:
        raise ValueError(f"block must be an int in 1..1024 on the GPU, got {block!r}")
    cp = _cupy()
    starts = np.ascontiguousarray(row_starts, np.int64).reshape(-1)
    n = len(starts) // rows
    if n == 0:
        return
    nb = -(-width // block)
    total = n * rows * nb
    stream = stream if stream is not None else cp.cuda.get_current_stream()
    with cp.cuda.Device(device), stream:
        # allocated, filled and (when dropped) freed in this stream's order: CuPy's pool
        # hands the memory out again only behind the kernel that reads it
        dstarts = cp.asarray(starts)
        threads = -(-block // 32) * 32
        kernel(device)((int(total),), (threads,), (np.uint64(src_ptr), dstarts, np.uint64(codes_ptr),
                                                    np.uint64(scales_ptr), np.int64(total), np.int64(rows),
                                                    np.int64(width), np.int64(nb), np.int64(block)), stream=stream)
