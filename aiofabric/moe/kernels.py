"""CUDA source of the intra-host MoE kernels (compiled by CuPy's NVRTC).

They write the same bytes as layout.py and compute the same numbers as
reference.py: BF16 and FP8 E4M3 rounding to nearest even (FP8 saturating,
found by binary search over the 127 positive codes, as numerics.py does),
float32 sums with explicit ``__fmul_rn``/``__fadd_rn`` (no fused
multiply-add) in the reference's order.

Kernels (one CUDA stream, in this order per round):

``moe_route``         one block: per expert and per destination rank, a warp
                      walks the tokens with ballots (positions in token order)
``moe_pack``          one block of 128 threads per token: the dispatch
                      payload (BF16 / float32 / FP8 with a scale per 128)
``moe_dispatch_send`` grid (ranks, C): writes header + payload rows straight
                      into each peer's inbox (CUDA IPC mapping); the last
                      block per destination writes the meta (round, rows,
                      per-expert counts) and then the flag
                      ``seq << 32 | rows`` with a system-scope release store
``moe_dispatch_recv`` grid (ranks, C): block (s, .) spins (acquire loads,
                      bounded by a timeout) on the flags of sources 0..s,
                      then expands source s's rows into the per-expert arrays
``moe_combine_send``  grid (ranks, C): weighted partial sums over this
                      rank's experts for each row of source s, written into
                      s's inbox; last block raises s's combine flag
``moe_combine_recv``  grid C: spins on every rank's combine flag, then sums
                      the partials in rank order

Under ``MOE_EMU`` the same source compiles as C++ for the CPU emulator that
the tests use (tests/moe_emu.h): the spin and fences become host atomics.
"""
from __future__ import annotations

__all__ = ["SOURCE", "NAMES", "MODE"]

MODE = {"bf16": 0, "fp8": 1, "float32": 2}
NAMES = ("moe_route", "moe_pack", "moe_dispatch_send", "moe_dispatch_recv", "moe_combine_send",
         "moe_combine_recv")

SOURCE = r"""
typedef unsigned long long u64;
typedef unsigned int u32;
typedef unsigned short u16;
typedef unsigned char u8;

#ifndef MOE_EMU
#define DYN_SHARED(T, name) extern __shared__ T name[]
__device__ __forceinline__ u64 ld_acquire(const u64* p)
{
    u64 v;
    asm volatile("ld.acquire.sys.u64 %0, [%1];" : "=l"(v) : "l"(p) : "memory");
    return v;
}
__device__ __forceinline__ void st_release(u64* p, u64 v)
{
    asm volatile("st.release.sys.u64 [%0], %1;" :: "l"(p), "l"(v) : "memory");
}
__device__ __forceinline__ u64 now_ns()
{
    u64 t;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
    return t;
}
#define PAUSE() __nanosleep(64)
#endif

#define MODE_BF16 0
#define MODE_FP8 1
#define MODE_F32 2

__device__ __forceinline__ float bf16_f32(u16 b) { return __uint_as_float(((u32)b) << 16); }

__device__ __forceinline__ u16 f32_bf16(float f)
{
    const u32 u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u)
        return (u16)((u >> 16) | 0x40u);
    return (u16)((u + (((u >> 16) & 1u) + 0x7fffu)) >> 16);
}

/* value of the positive E4M3 code c (0..126): exact products by powers of two */
__device__ __forceinline__ float e4m3_val(int c)
{
    const int e = c >> 3, m = c & 7;
    return e == 0 ? (float)m * __uint_as_float(118u << 23)           /* m * 2^-9 */
                  : (float)(8 + m) * __uint_as_float((u32)(e + 117) << 23); /* (8+m) * 2^(e-10) */
}

__device__ __forceinline__ u8 f32_e4m3(float x)
{
    const u32 sign = (__float_as_uint(x) >> 31) ? 0x80u : 0u;
    if (x != x)
        return (u8)(0x7fu | sign);
    const float a = fminf(fabsf(x), 448.0f);
    int lo = 0, hi = 126;                 /* first code whose value >= a */
    while (lo < hi) {
        const int mid = (lo + hi) >> 1;
        if (e4m3_val(mid) >= a) hi = mid; else lo = mid + 1;
    }
    const int h = lo, l = h > 0 ? h - 1 : 0;
    const float dl = a - e4m3_val(l), dh = e4m3_val(h) - a;   /* exact (Sterbenz) */
    const int code = (dh < dl || (dh == dl && (h & 1) == 0)) ? h : l;
    return (u8)(code | sign);
}

/* thread 0: wait until flags[from..to) carry round seq; 0 on timeout (err set) */
__device__ int wait_flags(const u64* flags, int from, int to, u32 seq, u64 timeout_ns, int* err)
{
    const u64 start = now_ns();
    for (int s = from; s < to; ++s) {
        while ((u32)(ld_acquire(flags + s) >> 32) != seq) {
            if (now_ns() - start > timeout_ns) {
                atomicCAS(err, 0, 1 + s);
                return 0;
            }
            PAUSE();
        }
    }
    return 1;
}

/* one block, blockDim.x a multiple of 32: one warp per expert, then one warp
 * per destination rank, each walking the tokens 32 at a time with a ballot
 * (positions in token order without atomics) */
extern "C" __global__ void moe_route(const void* idx, int idx64, int T, int k, int epr, int ranks,
                                     int* idx32, int* pos, int* rowidx, int* nrows, int* counts)
{
    const int E = ranks * epr;
    for (int i = threadIdx.x; i < T * k; i += blockDim.x) {
        const long long e = idx64 ? ((const long long*)idx)[i] : (long long)((const int*)idx)[i];
        idx32[i] = (e >= 0 && e < E) ? (int)e : -1;
    }
    __syncthreads();
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    const unsigned below = (1u << lane) - 1u;
    for (int e = warp; e < E; e += warps) {
        int n = 0;
        for (int base = 0; base < T; base += 32) {
            const int t = base + lane;
            int hit = 0;
            if (t < T)
                for (int j = 0; j < k; ++j)
                    hit |= idx32[t * k + j] == e;
            const unsigned m = __ballot_sync(0xffffffffu, hit);
            if (hit) {
                const int p = n + __popc(m & below);
                for (int j = 0; j < k; ++j)
                    if (idx32[t * k + j] == e)
                        pos[t * k + j] = p;
            }
            n += __popc(m);
        }
        if (lane == 0)
            counts[e] = n;
    }
    for (int i = threadIdx.x; i < T * k; i += blockDim.x)
        if (idx32[i] < 0)
            pos[i] = -1;
    for (int r = warp; r < ranks; r += warps) {
        int n = 0;
        for (int base = 0; base < T; base += 32) {
            const int t = base + lane;
            int hit = 0;
            if (t < T)
                for (int j = 0; j < k; ++j) {
                    const int e = idx32[t * k + j];
                    hit |= e >= 0 && e / epr == r;
                }
            const unsigned m = __ballot_sync(0xffffffffu, hit);
            if (t < T)
                rowidx[t * ranks + r] = hit ? n + __popc(m & below) : -1;
            n += __popc(m);
        }
        if (lane == 0)
            nrows[r] = n;
    }
}

/* blockDim.x must be 128 (one FP8 scale group per pass) */
extern "C" __global__ void moe_pack(const void* x, int in_bf16, int T, int H, int mode, u8* packed,
                                    long long stride)
{
    __shared__ float red[128];
    const int t = blockIdx.x;
    if (t >= T)
        return;
    u8* out = packed + (long long)t * stride;
    const u16* xb = (const u16*)x + (long long)t * H;
    const float* xf = (const float*)x + (long long)t * H;
    if (mode == MODE_BF16) {
        u16* o = (u16*)out;
        for (int h = threadIdx.x; h < H; h += blockDim.x)
            o[h] = in_bf16 ? xb[h] : f32_bf16(xf[h]);
    } else if (mode == MODE_F32) {
        float* o = (float*)out;
        for (int h = threadIdx.x; h < H; h += blockDim.x)
            o[h] = in_bf16 ? bf16_f32(xb[h]) : xf[h];
    } else {
        float* sc = (float*)(out + H);
        for (int g = 0; g < H / 128; ++g) {
            const int h = g * 128 + threadIdx.x;
            const float v = in_bf16 ? bf16_f32(xb[h]) : xf[h];
            red[threadIdx.x] = fabsf(v);
            __syncthreads();
            for (int s = 64; s > 0; s >>= 1) {
                if (threadIdx.x < s)
                    red[threadIdx.x] = fmaxf(red[threadIdx.x], red[threadIdx.x + s]);
                __syncthreads();
            }
            const float amax = red[0];
            const float scale = amax > 0.0f ? __fdiv_rn(amax, 448.0f) : 1.0f;
            out[h] = f32_e4m3(__fdiv_rn(v, scale));
            if (threadIdx.x == 0)
                sc[g] = scale;
            __syncthreads();
        }
    }
}

extern "C" __global__ void moe_dispatch_send(
    const u8* packed, long long pstride, const int* idx32, const float* w, const int* pos, const int* rowidx,
    const int* nrows, const int* counts, const u64* peers, int me, int ranks, int T, int k, int epr, u32 seq,
    long long dflag_off, long long meta_off, long long meta_bytes, long long drows_off, long long row_bytes,
    long long header_bytes, int max_tokens, u32* done)
{
    const int r = blockIdx.x;
    u8* inbox = (u8*)peers[r];
    u8* rows = inbox + drows_off + (long long)me * max_tokens * row_bytes;
    const long long nv = pstride / 16;
    for (int t = blockIdx.y; t < T; t += gridDim.y) {
        const int i = rowidx[t * ranks + r];
        if (i < 0)
            continue;
        u8* row = rows + (long long)i * row_bytes;
        int* hdr = (int*)row;
        float* hw = (float*)(row + 4 + 8 * k);
        if (threadIdx.x == 0)
            hdr[0] = t;
        for (int j = threadIdx.x; j < k; j += blockDim.x) {
            const int e = idx32[t * k + j];
            const int on = e >= 0 && e / epr == r;
            hdr[1 + j] = on ? e % epr : -1;
            hdr[1 + k + j] = on ? pos[t * k + j] : -1;
            hw[j] = on ? w[t * k + j] : 0.0f;
        }
        const uint4* s4 = (const uint4*)(packed + (long long)t * pstride);
        uint4* d4 = (uint4*)(row + header_bytes);
        for (long long v = threadIdx.x; v < nv; v += blockDim.x)
            d4[v] = s4[v];
    }
    __threadfence_system();
    __syncthreads();
    if (threadIdx.x == 0) {
        const u32 prev = atomicAdd(&done[r], 1u);
        if (prev == gridDim.y - 1) {  /* the last block for r: every row is out */
            done[r] = 0;
            __threadfence_system();
            u32* m = (u32*)(inbox + meta_off + (long long)me * meta_bytes);
            const u32 n = (u32)nrows[r];
            m[0] = seq;
            m[1] = n;
            for (int e = 0; e < epr; ++e)
                ((int*)m)[2 + e] = counts[r * epr + e];
            __threadfence_system();
            st_release((u64*)(inbox + dflag_off) + me, ((u64)seq << 32) | n);
        }
    }
}

extern "C" __global__ void moe_dispatch_recv(
    const u8* inbox, int ranks, int k, int epr, u32 seq, long long dflag_off, long long meta_off,
    long long meta_bytes, long long drows_off, long long row_bytes, long long header_bytes,
    long long payload_bytes, long long scale_bytes, int max_tokens, u8* xout, float* sout, int* src_out,
    int* counts_out, int* offs_out, int* nrecv_out, long long cap, u64 timeout_ns, int* err)
{
    DYN_SHARED(int, off);  /* epr */
    __shared__ int ok;
    const int s = blockIdx.x;
    if (threadIdx.x == 0)
        ok = wait_flags((const u64*)(inbox + dflag_off), 0, s + 1, seq, timeout_ns, err);
    __syncthreads();
    if (!ok)
        return;
    const u8* meta = inbox + meta_off;
    for (int e = threadIdx.x; e < epr; e += blockDim.x) {
        int o = 0;
        for (int q = 0; q < s; ++q)
            o += ((const int*)(meta + q * meta_bytes))[2 + e];
        off[e] = o;
        if (blockIdx.y == 0)
            offs_out[s * epr + e] = o;  /* kept for combine: the inbox's meta is rewritten next round */
        if (s == ranks - 1 && blockIdx.y == 0)
            counts_out[e] = o + ((const int*)(meta + s * meta_bytes))[2 + e];
    }
    __syncthreads();
    const int n = (int)((const u32*)(meta + s * meta_bytes))[1];
    if (threadIdx.x == 0 && blockIdx.y == 0)
        nrecv_out[s] = n;
    const long long pv = payload_bytes / 16;
    const int G = (int)(scale_bytes / 4);
    for (int i = blockIdx.y; i < n && i < max_tokens; i += gridDim.y) {
        const u8* row = inbox + drows_off + ((long long)s * max_tokens + i) * row_bytes;
        const int* hdr = (const int*)row;
        for (int j = 0; j < k; ++j) {
            const int e = hdr[1 + j];
            if (e < 0 || e >= epr)
                continue;
            const long long d = (long long)off[e] + hdr[1 + k + j];
            if (d < 0 || d >= cap) {
                if (threadIdx.x == 0)
                    atomicCAS(err, 0, -1);
                continue;
            }
            const long long slot = (long long)e * cap + d;
            const uint4* s4 = (const uint4*)(row + header_bytes);
            uint4* d4 = (uint4*)(xout + slot * payload_bytes);
            for (long long v = threadIdx.x; v < pv; v += blockDim.x)
                d4[v] = s4[v];
            const float* ss = (const float*)(row + header_bytes + payload_bytes);
            for (int g = threadIdx.x; g < G; g += blockDim.x)
                sout[slot * G + g] = ss[g];
            if (threadIdx.x == 0) {
                src_out[2 * slot] = s;
                src_out[2 * slot + 1] = hdr[0];
            }
        }
    }
}

extern "C" __global__ void moe_combine_send(
    const u8* inbox, const void* y, int y_bf16, long long cap, int H, const u64* peers, int me, int ranks,
    int k, int epr, u32 seq, long long cflag_off, const int* offs, const int* nrecv, long long drows_off,
    long long row_bytes, long long crows_off, int max_tokens, int out_bf16, u32* done)
{
    DYN_SHARED(int, sh);  /* off[epr], e[k], p[k], w[k] */
    int* off = sh;
    int* se = sh + epr;
    int* sp = se + k;
    float* sw = (float*)(sp + k);
    const int s = blockIdx.x;
    /* offsets and row counts as dispatch_recv saw them: a source that has
     * finished this round may already be rewriting its meta in our inbox */
    for (int e = threadIdx.x; e < epr; e += blockDim.x)
        off[e] = offs[s * epr + e];
    const int n = nrecv[s];
    const long long esz = out_bf16 ? 2 : 4;
    u8* dst = (u8*)peers[s] + crows_off + (long long)me * max_tokens * H * esz;
    __syncthreads();
    for (int i = blockIdx.y; i < n && i < max_tokens; i += gridDim.y) {
        const u8* row = inbox + drows_off + ((long long)s * max_tokens + i) * row_bytes;
        const int* hdr = (const int*)row;
        for (int j = threadIdx.x; j < k; j += blockDim.x) {
            const int e = hdr[1 + j];
            const long long p = (e >= 0 && e < epr) ? (long long)off[e] + hdr[1 + k + j] : -1;
            se[j] = (p >= 0 && p < cap) ? e : -1;
            sp[j] = (int)p;
            sw[j] = ((const float*)(row + 4 + 8 * k))[j];
        }
        __syncthreads();
        for (int h = threadIdx.x; h < H; h += blockDim.x) {
            float acc = 0.0f;
            for (int j = 0; j < k; ++j) {
                const int e = se[j];
                if (e < 0)
                    continue;
                const long long at = ((long long)e * cap + sp[j]) * H + h;
                const float v = y_bf16 ? bf16_f32(((const u16*)y)[at]) : ((const float*)y)[at];
                acc = __fadd_rn(acc, __fmul_rn(sw[j], v));
            }
            if (out_bf16)
                ((u16*)dst)[(long long)i * H + h] = f32_bf16(acc);
            else
                ((float*)dst)[(long long)i * H + h] = acc;
        }
        __syncthreads();
    }
    __threadfence_system();
    __syncthreads();
    if (threadIdx.x == 0) {
        const u32 prev = atomicAdd(&done[s], 1u);
        if (prev == gridDim.y - 1) {
            done[s] = 0;
            __threadfence_system();
            st_release((u64*)((u8*)peers[s] + cflag_off) + me, ((u64)seq << 32) | (u32)n);
        }
    }
}

extern "C" __global__ void moe_combine_recv(
    const u8* inbox, const int* rowidx, int T, int H, int ranks, u32 seq, long long cflag_off,
    long long crows_off, int max_tokens, int bf16, void* out, u64 timeout_ns, int* err)
{
    __shared__ int ok;
    if (threadIdx.x == 0)
        ok = wait_flags((const u64*)(inbox + cflag_off), 0, ranks, seq, timeout_ns, err);
    __syncthreads();
    if (!ok)
        return;
    const u8* base = inbox + crows_off;
    for (int t = blockIdx.x; t < T; t += gridDim.x) {
        for (int h = threadIdx.x; h < H; h += blockDim.x) {
            float acc = 0.0f;
            for (int r = 0; r < ranks; ++r) {
                const int i = rowidx[t * ranks + r];
                if (i < 0)
                    continue;
                const long long at = ((long long)r * max_tokens + i) * H + h;
                acc = __fadd_rn(acc, bf16 ? bf16_f32(((const u16*)base)[at]) : ((const float*)base)[at]);
            }
            if (bf16)
                ((u16*)out)[(long long)t * H + h] = f32_bf16(acc);
            else
                ((float*)out)[(long long)t * H + h] = acc;
        }
    }
}
"""
