"""CUDA source of the intra-host MoE kernels (compiled by CuPy's NVRTC).

They write the same bytes as layout.py and compute the same numbers as
reference.py: BF16 and FP8 E4M3 rounding to nearest even (FP8 saturating,
rounded on the float32 bits; numerics.py searches the codes, same result),
float32 sums with explicit ``__fmul_rn``/``__fadd_rn`` (no fused
multiply-add) in the reference's order.

One kernel per API call, so two per phase, with nothing on the host between
them (one CUDA stream, in this order per round):

``moe_dispatch_send`` grid (T + 1, P): block (t, p) routes token t (its
                      row index at each destination rank and its position
                      in each expert's list, counted over the tokens before
                      it: a prefix computed in the block, no atomics on the
                      order), quantises channel part p of it (a lane per 8
                      channels, FP8 group maxima by warp shuffles) and stores
                      the payload with 8/16-byte stores straight into the row
                      of every destination's inbox (CUDA IPC mapping); block
                      (t, 0) also writes the row headers.  Block (T, 0) counts
                      tokens per (destination, expert) and writes the metas.
                      Every block counts itself done (its thread 0 alone
                      fences, after a barrier); the last one raises every
                      destination's flag ``seq << 32 | rows`` (system-scope
                      release)
``moe_dispatch_recv`` grid (ranks, Y): block (s, .) spins (relaxed polls,
                      then one acquiring fence; bounded by a timeout) on the flags of sources 0..s,
                      then its warps expand source s's rows, a warp per
                      (row, slot), into the per-expert arrays
``moe_combine_send``  grid (ranks, Y): a block per (row of source s, channel
                      part): weighted partial sums over this rank's slots,
                      16-byte stores into s's inbox; blocks without a unit
                      return at once; the block completing s's units
                      raises s's combine flag
``moe_combine_recv``  grid (T x parts): spins on every rank's combine flag,
                      then sums the partials in rank order
``moe_pack``          the dispatch payload alone, into a local buffer (the
                      fabric proxy's GPU half)

Under ``MOE_EMU`` the same source compiles as C++ for the CPU emulator that
the tests use (tests/moe_emu.py): the spin and fences become host atomics.
"""
from __future__ import annotations

__all__ = ["SOURCE", "NAMES", "MODE"]

MODE = {"bf16": 0, "fp8": 1, "float32": 2}
NAMES = ("moe_pack", "moe_dispatch_send", "moe_dispatch_recv", "moe_combine_send", "moe_combine_recv")

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
/* a spin's poll: no ordering of its own (fence_sys after the value is seen) */
__device__ __forceinline__ u64 ld_relaxed(const u64* p)
{
    u64 v;
    asm volatile("ld.relaxed.sys.u64 %0, [%1];" : "=l"(v) : "l"(p) : "memory");
    return v;
}
/* after fence_sys: the fence makes this store a release */
__device__ __forceinline__ void st_relaxed(u64* p, u64 v)
{
    asm volatile("st.relaxed.sys.u64 [%0], %1;" :: "l"(p), "l"(v) : "memory");
}
/* one thread's system-scope acquire+release fence (cheaper than the
 * sequentially consistent __threadfence_system); cumulative: after a
 * __syncthreads it orders the whole block's earlier stores */
__device__ __forceinline__ void fence_sys()
{
    asm volatile("fence.acq_rel.sys;" ::: "memory");
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

/* float -> E4M3 code: nearest value, ties to the even code, saturating at
 * +-448, NaN -> 0x7f with the sign (numerics.fp8_encode) */
__device__ __forceinline__ u8 f32_e4m3(float x)
{
    const u32 sign = (__float_as_uint(x) >> 31) ? 0x80u : 0u;
    if (x != x)
        return (u8)(0x7fu | sign);
    const float a = fminf(fabsf(x), 448.0f);
    u32 code;
    if (a < 0.015625f) {
        /* below the smallest normal (2^-6): codes 0..8 in steps of 2^-9; the
         * product is exact, the conversion rounds to nearest even */
        code = (u32)__float2int_rn(a * 512.0f);
    } else {
        /* keep 3 mantissa bits, ties to even (a carry moves into the
         * exponent); rebias 127 -> 7.  a <= 448 (code 126) never rounds up past it */
        const u32 u = __float_as_uint(a);
        code = ((u + 0x7ffffu + ((u >> 20) & 1u)) >> 20) - (120u << 3);
    }
    return (u8)(code | sign);
}


/* thread 0: wait until flags[from..to) carry round seq (relaxed polls, then
 * one acquiring fence); 0 on timeout (err set) */
__device__ int wait_flags(const u64* flags, int from, int to, u32 seq, u64 timeout_ns, int* err)
{
    const u64 start = now_ns();
    for (int s = from; s < to; ++s) {
        while ((u32)(ld_relaxed(flags + s) >> 32) != seq) {
            if (now_ns() - start > timeout_ns) {
                atomicCAS(err, 0, 1 + s);
                return 0;
            }
            PAUSE();
        }
    }
    fence_sys();
    return 1;
}

/* global expert id of entry i of topk_idx (int32 or int64), -1 if masked or out of range */
__device__ __forceinline__ int expert_at(const void* idx, int idx64, long long i, int E)
{
    const long long e = idx64 ? ((const long long*)idx)[i] : (long long)((const int*)idx)[i];
    return (e >= 0 && e < E) ? (int)e : -1;
}

/* 8 channels as floats from their raw 16 (BF16 bits) or 32 (float32) bytes */
__device__ __forceinline__ void unpack8(const uint4* q, int bf16, float* v)
{
    if (bf16) {
        const u32 w[4] = {q[0].x, q[0].y, q[0].z, q[0].w};
        for (int i = 0; i < 4; ++i) {
            v[2 * i] = bf16_f32((u16)(w[i] & 0xffffu));
            v[2 * i + 1] = bf16_f32((u16)(w[i] >> 16));
        }
    } else {
        const u32 w[8] = {q[0].x, q[0].y, q[0].z, q[0].w, q[1].x, q[1].y, q[1].z, q[1].w};
        for (int i = 0; i < 8; ++i)
            v[i] = __uint_as_float(w[i]);
    }
}

/* channels 8c..8c+7 of a row of BF16 bits or float32, as floats (16-byte loads) */
__device__ __forceinline__ void load8(const void* row, int bf16, long long c, float* v)
{
    uint4 q[2];
    if (bf16) {
        q[0] = ((const uint4*)row)[c];
    } else {
        q[0] = ((const uint4*)row)[2 * c];
        q[1] = ((const uint4*)row)[2 * c + 1];
    }
    unpack8(q, bf16, v);
}

/* acc += the weighted outputs of this rank's slots for channels 8c..8c+7:
 * slot (expert, position) rows sat[0..n) (only the slots present here,
 * compacted in slot order), weights sw; float32 multiply, then add, in slot
 * order; the loads of four (BF16) or two (float32) slots are in flight at
 * once, kept raw */
template <int YBF16>
__device__ __forceinline__ void partial8(const void* y, int H, int n, const long long* sat, const float* sw,
                                         long long c, float* acc)
{
    const int NB = YBF16 ? 4 : 2;  /* 64 bytes of loads in flight per lane (registers: 3 blocks of 256 per SM) */
    for (int j0 = 0; j0 < n; j0 += NB) {
        uint4 q[NB][YBF16 ? 1 : 2];
        for (int jj = 0; jj < NB; ++jj) {
            const int j = j0 + jj;
            if (j < n) {
                const long long at = sat[j] * H;
                if (YBF16) {
                    q[jj][0] = ((const uint4*)((const u16*)y + at))[c];
                } else {
                    q[jj][0] = ((const uint4*)((const float*)y + at))[2 * c];
                    q[jj][YBF16 ? 0 : 1] = ((const uint4*)((const float*)y + at))[2 * c + 1];
                }
            }
        }
        for (int jj = 0; jj < NB; ++jj) {
            const int j = j0 + jj;
            if (j < n) {
                float v[8];
                unpack8(q[jj], YBF16, v);
                for (int i = 0; i < 8; ++i)
                    acc[i] = __fadd_rn(acc[i], __fmul_rn(sw[j], v[i]));
            }
        }
    }
}

/* 8 floats rounded to BF16 (one uint4) or as float32 (two) at chunk c of dst */
__device__ __forceinline__ void store8(void* dst, int bf16, long long c, const float* v)
{
    if (bf16) {
        u32 w[4];
        for (int i = 0; i < 4; ++i)
            w[i] = (u32)f32_bf16(v[2 * i]) | ((u32)f32_bf16(v[2 * i + 1]) << 16);
        uint4 q;
        q.x = w[0]; q.y = w[1]; q.z = w[2]; q.w = w[3];
        ((uint4*)dst)[c] = q;
    } else {
        uint4 a, b;
        a.x = __float_as_uint(v[0]); a.y = __float_as_uint(v[1]); a.z = __float_as_uint(v[2]);
        a.w = __float_as_uint(v[3]); b.x = __float_as_uint(v[4]); b.y = __float_as_uint(v[5]);
        b.z = __float_as_uint(v[6]); b.w = __float_as_uint(v[7]);
        ((uint4*)dst)[2 * c] = a;
        ((uint4*)dst)[2 * c + 1] = b;
    }
}

/* The dispatch payload of channels 8c..8c+7 of one token row: o[0] (BF16
 * codes, 16 bytes; FP8 codes in o[0].x/.y, 8 bytes) or o[0], o[1] (float32).
 * Every lane of the warp must call it with lanes on consecutive chunks (FP8:
 * the 16 lanes of a 128-channel group exchange their maxima by shuffles);
 * lanes with valid == 0 take part with zeros.  *scale: the FP8 group's scale. */
__device__ __forceinline__ void pack8(const void* xrow, int in_bf16, int mode, long long c, int valid, uint4* o,
                                      float* scale)
{
    if (mode != MODE_FP8 && valid && (in_bf16 ? mode == MODE_BF16 : mode == MODE_F32)) {
        o[0] = ((const uint4*)xrow)[in_bf16 ? c : 2 * c];  /* the input's own format: the bits as they are */
        if (!in_bf16)
            o[1] = ((const uint4*)xrow)[2 * c + 1];
        return;
    }
    float v[8];
    if (valid)
        load8(xrow, in_bf16, c, v);
    else
        for (int i = 0; i < 8; ++i)
            v[i] = 0.0f;
    if (mode == MODE_BF16) {
        u32 w[4];
        for (int i = 0; i < 4; ++i)
            w[i] = (u32)f32_bf16(v[2 * i]) | ((u32)f32_bf16(v[2 * i + 1]) << 16);
        o[0].x = w[0]; o[0].y = w[1]; o[0].z = w[2]; o[0].w = w[3];
    } else if (mode == MODE_F32) {
        o[0].x = __float_as_uint(v[0]); o[0].y = __float_as_uint(v[1]);
        o[0].z = __float_as_uint(v[2]); o[0].w = __float_as_uint(v[3]);
        o[1].x = __float_as_uint(v[4]); o[1].y = __float_as_uint(v[5]);
        o[1].z = __float_as_uint(v[6]); o[1].w = __float_as_uint(v[7]);
    } else {
        float a = 0.0f;
        for (int i = 0; i < 8; ++i)
            a = fmaxf(a, fabsf(v[i]));
        for (int m = 8; m > 0; m >>= 1)
            a = fmaxf(a, __shfl_xor_sync(0xffffffffu, a, m));
        const float sc = a > 0.0f ? __fdiv_rn(a, 448.0f) : 1.0f;
        u32 lo = 0, hi = 0;
        for (int i = 0; i < 4; ++i) {
            lo |= (u32)f32_e4m3(__fdiv_rn(v[i], sc)) << (8 * i);
            hi |= (u32)f32_e4m3(__fdiv_rn(v[4 + i], sc)) << (8 * i);
        }
        o[0].x = lo;
        o[0].y = hi;
        *scale = sc;
    }
}

/* chunk c of a packed body (payload, then FP8 scales after H code bytes) */
__device__ __forceinline__ void put8(u8* body, int mode, int H, long long c, const uint4* o, float scale)
{
    if (mode == MODE_BF16) {
        ((uint4*)body)[c] = o[0];
    } else if (mode == MODE_F32) {
        ((uint4*)body)[2 * c] = o[0];
        ((uint4*)body)[2 * c + 1] = o[1];
    } else {
        uint2 q;
        q.x = o[0].x;
        q.y = o[0].y;
        ((uint2*)body)[c] = q;
        if ((c & 15) == 0)
            ((float*)(body + H))[c >> 4] = scale;
    }
}

/* n uint4 from s to d by the 32 lanes of a warp, eight loads in flight per
 * lane (an FP8 row of 7168 channels: two rounds of loads, then the tail) */
__device__ __forceinline__ void copy16(uint4* d, const uint4* s, long long n, int lane)
{
    long long v = lane;
    for (; v + 224 < n; v += 256) {
        uint4 a[8];
        for (int i = 0; i < 8; ++i)
            a[i] = s[v + 32 * i];
        for (int i = 0; i < 8; ++i)
            d[v + 32 * i] = a[i];
    }
    if (v + 96 < n) {
        uint4 a[4];
        for (int i = 0; i < 4; ++i)
            a[i] = s[v + 32 * i];
        for (int i = 0; i < 4; ++i)
            d[v + 32 * i] = a[i];
        v += 128;
    }
    for (; v < n; v += 32)
        d[v] = s[v];
}

/* A block that has done `add` of `total` units of work: after a barrier, its
 * thread 0 alone fences (system-scope release, cumulative over the block's
 * stores) and adds `add` to *done; it returns 1 in every thread of the block
 * that completes the total, after thread 0 reset the counter for the next
 * launch and fenced again (acquire: every other block's stores are then
 * ordered before whatever this block stores next, e.g. the flags, which
 * thread 0 writes with st_relaxed).  One fence per block, not per thread: a
 * system fence waits for the NVLink stores in flight and costs microseconds. */
__device__ __forceinline__ int last_block(u32* done, u32 add, u32 total)
{
    __shared__ int last;
    __syncthreads();
    if (threadIdx.x == 0) {
        fence_sys();
        last = atomicAdd(done, add) + add == total;
        if (last) {
            *done = 0;
            fence_sys();
        }
    }
    __syncthreads();
    return last;
}

/* blockDim.x a multiple of 32: the payload of token blockIdx.x, channel part
 * blockIdx.y (the fabric proxy packs on the GPU, then copies to the host) */
extern "C" __global__ void moe_pack(const void* x, int in_bf16, int T, int H, int mode, u8* packed,
                                    long long stride)
{
    const int t = blockIdx.x;
    if (t >= T)
        return;
    const void* xrow = in_bf16 ? (const void*)((const u16*)x + (long long)t * H)
                               : (const void*)((const float*)x + (long long)t * H);
    u8* out = packed + (long long)t * stride;
    const int nch = H / 8;
    for (int base = blockIdx.y * blockDim.x; base < nch; base += gridDim.y * blockDim.x) {
        const int c = base + threadIdx.x, valid = c < nch;
        uint4 o[2];
        float sc = 1.0f;
        pack8(xrow, in_bf16, mode, c, valid, o, &sc);
        if (valid)
            put8(out, mode, H, c, o, sc);
    }
}

#define SID_WORDS 2048

/* sid[i * ks + j] = expert id of slot j of token base + i (i < nt), -1 masked */
__device__ __forceinline__ void stage_ids(int* sid, const void* idx, int idx64, int base, int nt, int k, int ks, int E)
{
    for (int q = threadIdx.x; q < nt * k; q += blockDim.x) {
        const int i = q / k, j = q - i * k;
        sid[i * ks + j] = expert_at(idx, idx64, (long long)base * k + q, E);
    }
}

/* grid (T + 1, P), blockDim.x a multiple of 32, k <= 64 (blocks (T, p > 0)
 * return at once: blocks (t < T, .) and (T, 0) count themselves done); dynamic shared
 * memory 4 * (ranks * epr + ranks) bytes (block (T, 0)'s histogram) */
extern "C" __global__ void moe_dispatch_send(
    const void* x, int in_bf16, const void* idx, int idx64, const float* w, int T, int H, int mode,
    const u64* peers, int me, int ranks, int k, int epr, u32 seq, long long dflag_off, long long meta_off,
    long long meta_bytes, long long drows_off, long long row_bytes, long long header_bytes, int max_tokens,
    int* rowidx, int* nrows, u32* done)
{
    DYN_SHARED(int, hist);
    __shared__ int se[64], sr[64], sp[64], sd[64], dsl[64];
    __shared__ int nd;
    __shared__ int sid[SID_WORDS];  /* a chunk of the routing: CH tokens, a row of ks ids each */
    const int E = ranks * epr, tid = threadIdx.x, B = blockDim.x, t = blockIdx.x;
    if (t == T && blockIdx.y != 0)
        return;  /* the counting row has one block: the others neither work nor count */
    /* the routing is read in chunks, staged in shared memory by coalesced
     * loads all in flight at once (a thread per token reading its own ids
     * would wait for them one after another); an odd row stride avoids bank
     * conflicts when a thread per token reads its row */
    const int ks = k | 1, CH = B < SID_WORDS / ks ? B : SID_WORDS / ks;
    if (t == T) {
        {
            /* the metas: tokens per (destination, expert) and rows per destination */
            int* rows = hist + E;
            for (int i = tid; i < E + ranks; i += B)
                hist[i] = 0;
            __syncthreads();
            for (int base = 0; base < T; base += CH) {  /* a thread per token of the chunk */
                const int nt = T - base < CH ? T - base : CH;
                __syncthreads();
                stage_ids(sid, idx, idx64, base, nt, k, ks, E);
                __syncthreads();
                if (tid < nt) {
                    const int* ids = sid + tid * ks;
                    for (int j = 0; j < k; ++j) {
                        const int e = ids[j];
                        if (e < 0)
                            continue;
                        int first_e = 1, first_r = 1;
                        for (int j2 = 0; j2 < j; ++j2) {
                            const int e2 = ids[j2];
                            first_e &= e2 != e;
                            first_r &= !(e2 >= 0 && e2 / epr == e / epr);
                        }
                        if (first_e)
                            atomicAdd(&hist[e], 1);
                        if (first_r)
                            atomicAdd(&rows[e / epr], 1);
                    }
                }
            }
            __syncthreads();
            const int words = 2 + epr;
            for (int i = tid; i < ranks * words; i += B) {
                const int r = i / words, q = i - r * words;
                u32* m = (u32*)((u8*)peers[r] + meta_off + (long long)me * meta_bytes);
                m[q] = q == 0 ? seq : q == 1 ? (u32)rows[r] : (u32)hist[r * epr + q - 2];
            }
            for (int r = tid; r < ranks; r += B)
                nrows[r] = rows[r];
        }
    } else {
        /* token t: its slots, then over the tokens before it, its position in
         * each slot's expert list and its row index at each slot's rank */
        for (int j = tid; j < k; j += B) {
            const int e = expert_at(idx, idx64, (long long)t * k + j, E);
            se[j] = e;
            sr[j] = e >= 0 ? e / epr : -1;
            sp[j] = 0;
            sd[j] = 0;
        }
        __syncthreads();
        const int lane = tid & 31;
        for (int base = 0; base < t; base += CH) {  /* a thread per earlier token, counts added up per warp */
            const int nt = t - base < CH ? t - base : CH;
            __syncthreads();
            stage_ids(sid, idx, idx64, base, nt, k, ks, E);
            __syncthreads();
            u64 pm = 0, dm = 0;
            for (int j2 = 0; tid < nt && j2 < k; ++j2) {
                const int e2 = sid[tid * ks + j2];
                if (e2 < 0)
                    continue;
                const int r2 = e2 / epr;
                for (int j = 0; j < k; ++j) {
                    if (se[j] == e2)
                        pm |= 1ull << j;
                    if (sr[j] == r2)
                        dm |= 1ull << j;
                }
            }
            for (int j = 0; j < k; ++j) {
                const int np = __popc(__ballot_sync(0xffffffffu, (int)((pm >> j) & 1ull)));
                const int nr = __popc(__ballot_sync(0xffffffffu, (int)((dm >> j) & 1ull)));
                if (lane == 0 && np)
                    atomicAdd(&sp[j], np);
                if (lane == 0 && nr)
                    atomicAdd(&sd[j], nr);
            }
        }
        if (tid == 0) {  /* the destinations: the first slot of each rank */
            int n = 0;
            for (int j = 0; j < k; ++j) {
                if (sr[j] < 0)
                    continue;
                int first = 1;
                for (int j2 = 0; j2 < j; ++j2)
                    first &= sr[j2] != sr[j];
                if (first)
                    dsl[n++] = j;
            }
            nd = n;
        }
        __syncthreads();
        const int n = nd;
        if (blockIdx.y == 0) {
            for (int q = tid; q < n * k; q += B) {  /* headers: a thread per (destination, slot) */
                const int d = q / k, j = q - d * k, r = sr[dsl[d]];
                u8* row = (u8*)peers[r] + drows_off + ((long long)me * max_tokens + sd[dsl[d]]) * row_bytes;
                const int on = sr[j] == r;
                if (j == 0)
                    ((int*)row)[0] = t;
                ((int*)row)[1 + j] = on ? se[j] - r * epr : -1;
                ((int*)row)[1 + k + j] = on ? sp[j] : -1;
                ((float*)(row + 4 + 8 * k))[j] = on ? w[(long long)t * k + j] : 0.0f;
            }
            for (int r = tid; r < ranks; r += B) {  /* kept for combine_recv */
                int v = -1;
                for (int d = 0; d < n; ++d)
                    if (sr[dsl[d]] == r)
                        v = sd[dsl[d]];
                rowidx[(long long)t * ranks + r] = v;
            }
        }
        if (n > 0) {
            const void* xrow = in_bf16 ? (const void*)((const u16*)x + (long long)t * H)
                                       : (const void*)((const float*)x + (long long)t * H);
            const int nch = H / 8;
            for (int base = blockIdx.y * B; base < nch; base += gridDim.y * B) {
                const int c = base + tid, valid = c < nch;
                uint4 o[2];
                float sc = 1.0f;
                pack8(xrow, in_bf16, mode, c, valid, o, &sc);
                if (valid)
                    for (int d = 0; d < n; ++d) {
                        u8* row = (u8*)peers[sr[dsl[d]]] + drows_off +
                                  ((long long)me * max_tokens + sd[dsl[d]]) * row_bytes;
                        put8(row + header_bytes, mode, H, c, o, sc);
                    }
            }
        }
    }
    if (last_block(done, 1u, (gridDim.x - 1) * gridDim.y + 1) && tid == 0) {
        for (int r = 0; r < ranks; ++r) {  /* after last_block's fence: release stores */
            const u32 n = (u32)((volatile const int*)nrows)[r];
            st_relaxed((u64*)((u8*)peers[r] + dflag_off) + me, ((u64)seq << 32) | n);
        }
    }
}

/* grid (ranks, Y), blockDim.x a multiple of 32; dynamic shared memory 4 * epr */
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
    const int lane = threadIdx.x & 31, warps = blockDim.x >> 5;
    const long long items = (long long)(n < max_tokens ? n : max_tokens) * k;
    /* a warp per (row, slot) */
    for (long long it = (long long)blockIdx.y * warps + (threadIdx.x >> 5); it < items;
         it += (long long)gridDim.y * warps) {
        const int i = (int)(it / k), j = (int)(it - (long long)i * k);
        const u8* row = inbox + drows_off + ((long long)s * max_tokens + i) * row_bytes;
        const int* hdr = (const int*)row;
        const int e = hdr[1 + j];
        if (e < 0 || e >= epr)
            continue;
        const long long d = (long long)off[e] + hdr[1 + k + j];
        if (d < 0 || d >= cap) {
            if (lane == 0)
                atomicCAS(err, 0, -1);
            continue;
        }
        const long long slot = (long long)e * cap + d;
        copy16((uint4*)(xout + slot * payload_bytes), (const uint4*)(row + header_bytes), pv, lane);
        const float* ss = (const float*)(row + header_bytes + payload_bytes);
        for (int g = lane; g < G; g += 32)
            sout[slot * G + g] = ss[g];
        if (lane == 0) {
            src_out[2 * slot] = s;
            src_out[2 * slot + 1] = hdr[0];
        }
    }
}

/* moe_combine_send's units y, y + Y, ... of one source (a function per
 * y dtype: one loop holding both would need ~50% more registers) */
template <int YBF16>
__device__ __forceinline__ void combine_units(const u8* inbox, const void* y, long long cap, int H, int s, int k,
                                              int epr, const int* off, long long units, int parts, int nch,
                                              long long drows_off, long long row_bytes, int max_tokens, u8* dst,
                                              long long esz, int out_bf16)
{
    __shared__ long long sat[64];
    __shared__ float sw[64];
    __shared__ int nv;
    const int tid = threadIdx.x, B = blockDim.x;
    for (long long u = blockIdx.y; u < units; u += gridDim.y) {
        const int i = (int)(u / parts), c = (int)(u - (long long)i * parts) * B + tid;
        const u8* row = inbox + drows_off + ((long long)s * max_tokens + i) * row_bytes;
        const int* hdr = (const int*)row;
        if (tid < 32) {  /* warp 0: the row's slots present here, compacted in slot order */
            int m = 0;
            for (int j0 = 0; j0 < k; j0 += 32) {
                const int j = j0 + tid;
                const int e = j < k ? hdr[1 + j] : -1;
                const long long p = (e >= 0 && e < epr) ? (long long)off[e] + hdr[1 + k + j] : -1;
                const int ok = p >= 0 && p < cap;
                const u32 b = __ballot_sync(0xffffffffu, ok);
                if (ok) {
                    const int q = m + __popc(b & ((1u << tid) - 1u));
                    sat[q] = (long long)e * cap + p;
                    sw[q] = ((const float*)(row + 4 + 8 * k))[j];
                }
                m += __popc(b);
            }
            if (tid == 0)
                nv = m;
        }
        __syncthreads();
        if (c < nch) {
            float acc[8];
            for (int q = 0; q < 8; ++q)
                acc[q] = 0.0f;
            partial8<YBF16>(y, H, nv, sat, sw, c, acc);
            store8(dst + (long long)i * H * esz, out_bf16, c, acc);
        }
        __syncthreads();
    }
}

/* grid (ranks, Y), k <= 64; dynamic shared memory 4 * epr.  Block (s, y)
 * takes units y, y + Y, ... of source s: unit u is row u / P, channel part
 * u % P (P = parts of blockDim.x chunks of 8 channels).  A block without a
 * unit returns at once (no fence, no count): the counter for s counts units,
 * and the block that completes them raises s's flag (block (s, 0) when there
 * are none). */
extern "C" __global__ void moe_combine_send(
    const u8* inbox, const void* y, int y_bf16, long long cap, int H, const u64* peers, int me, int ranks,
    int k, int epr, u32 seq, long long cflag_off, const int* offs, const int* nrecv, long long drows_off,
    long long row_bytes, long long crows_off, int max_tokens, int out_bf16, u32* done)
{
    DYN_SHARED(int, off);  /* epr */
    const int s = blockIdx.x, tid = threadIdx.x, B = blockDim.x;
    /* offsets and row counts as dispatch_recv saw them: a source that has
     * finished this round may already be rewriting its meta in our inbox */
    const int n = nrecv[s];
    const int nch = H / 8, parts = (nch + B - 1) / B;
    const long long units = (long long)(n < max_tokens ? n : max_tokens) * parts;
    u64* flag = (u64*)((u8*)peers[s] + cflag_off) + me;
    if (units == 0) {
        if (blockIdx.y == 0 && tid == 0)
            st_release(flag, ((u64)seq << 32) | (u32)n);
        return;
    }
    if ((long long)blockIdx.y >= units)
        return;
    for (int e = tid; e < epr; e += B)
        off[e] = offs[s * epr + e];
    const long long esz = out_bf16 ? 2 : 4;
    u8* dst = (u8*)peers[s] + crows_off + (long long)me * max_tokens * H * esz;
    __syncthreads();
    if (y_bf16)
        combine_units<1>(inbox, y, cap, H, s, k, epr, off, units, parts, nch, drows_off, row_bytes, max_tokens, dst,
                         esz, out_bf16);
    else
        combine_units<0>(inbox, y, cap, H, s, k, epr, off, units, parts, nch, drows_off, row_bytes, max_tokens, dst,
                         esz, out_bf16);
    const u32 mine = (u32)((units - blockIdx.y + gridDim.y - 1) / gridDim.y);
    if (last_block(done + s, mine, (u32)units) && tid == 0)
        st_relaxed(flag, ((u64)seq << 32) | (u32)n);  /* after last_block's fence: a release */
}

/* moe_combine_recv's units (a loop per dtype, as combine_units): the
 * partials of four (BF16) or two (float32) ranks loaded raw at once, then
 * added in rank order */
template <int BF16>
__device__ __forceinline__ void recv_units(const u8* base, const int* rowidx, int T, int H, int ranks,
                                           int max_tokens, void* out)
{
    const long long esz = BF16 ? 2 : 4;
    const int nch = H / 8, parts = (nch + blockDim.x - 1) / blockDim.x;
    for (long long u = blockIdx.x; u < (long long)T * parts; u += gridDim.x) {
        const int t = (int)(u / parts), c = (int)(u - (long long)t * parts) * blockDim.x + threadIdx.x;
        if (c >= nch)
            continue;
        float acc[8];
        for (int q = 0; q < 8; ++q)
            acc[q] = 0.0f;
        const int NR = BF16 ? 4 : 2;  /* 64 bytes a lane in flight */
        for (int r0 = 0; r0 < ranks; r0 += NR) {
            uint4 q[NR][BF16 ? 1 : 2];
            int has[NR];
            for (int rr = 0; rr < NR; ++rr) {
                const int r = r0 + rr;
                const int i = r < ranks ? rowidx[(long long)t * ranks + r] : -1;
                has[rr] = i >= 0;
                if (i >= 0) {
                    const uint4* row = (const uint4*)(base + ((long long)r * max_tokens + i) * H * esz);
                    if (BF16) {
                        q[rr][0] = row[c];
                    } else {
                        q[rr][0] = row[2 * c];
                        q[rr][BF16 ? 0 : 1] = row[2 * c + 1];
                    }
                }
            }
            for (int rr = 0; rr < NR; ++rr)
                if (has[rr]) {
                    float v[8];
                    unpack8(q[rr], BF16, v);
                    for (int j = 0; j < 8; ++j)
                        acc[j] = __fadd_rn(acc[j], v[j]);
                }
        }
        store8((u8*)out + (long long)t * H * esz, BF16, c, acc);
    }
}

/* grid (G): unit u = token u / P, channel part u % P */
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
    if (bf16)
        recv_units<1>(inbox + crows_off, rowidx, T, H, ranks, max_tokens, out);
    else
        recv_units<0>(inbox + crows_off, rowidx, T, H, ranks, max_tokens, out);
}
"""
