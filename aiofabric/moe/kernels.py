"""CUDA source of the intra-host MoE kernels (compiled by CuPy's NVRTC).

They write the same bytes as layout.py and compute the same numbers as
reference.py: BF16 and FP8 E4M3 rounding to nearest even (FP8 saturating,
rounded on the float32 bits; numerics.py searches the codes, same result),
float32 sums with explicit ``__fmul_rn``/``__fadd_rn`` (no fused
multiply-add) in the reference's order.

One fused kernel per phase, launched by the send half (``dispatch_send``,
``combine_send``); the receive half launches nothing and only orders the
caller's stream after it.  A block's role comes from a ticket taken when it
starts (``take_ticket``): senders first, which never wait, then receivers,
which spin, so a launch can never deadlock on its own SMs.  Senders signal
per row: after its stores a block issues one system-scope fence and stores
the round's sequence number into each row's tag in the destination's inbox;
a receiver waits for exactly the rows it is about to read (acquiring polls),
so the receive work overlaps the transfer.

``moe_dispatch``  tickets 0..T*P-1: part p of token t (P = 1..8 blocks a
                  token) routes the token (its row index at each destination
                  rank and its position in each expert's list, counted over
                  the tokens before it: a prefix computed in the block, no
                  atomics on the order), quantises its share of the channels
                  (a lane per 8 channels, FP8 group maxima by warp shuffles)
                  and stores it with 8/16-byte stores straight into the row of
                  every destination's inbox (CUDA IPC mapping; part 0 also the
                  header), then tags its part of the rows.  Ticket T*P counts
                  tokens per (destination, expert), writes the metas and raises
                  each destination's meta flag ``seq << 32 | (P-1) << 28 |
                  rows``.  The others wait for every meta, then a warp per
                  (row, slot) waits for the row's P tags and copies it into the
                  expert's array.
``moe_combine``   tickets 0..S-1: whole rows of every source, interleaved:
                  weighted partial sums over this rank's slots, 16-byte
                  stores into the source's inbox, one fence, the rows' tags.
                  The others: a unit per (token, channel part) waits for the
                  token's rows' tags and sums the partials in rank order.
``moe_pack``      the dispatch payload alone, into a local buffer (the
                  fabric proxy's GPU half)

Under ``MOE_EMU`` the same source compiles as C++ for the CPU emulator that
the tests use (tests/moe_emu.py): the spin and fences become host atomics.
"""
from __future__ import annotations

__all__ = ["SOURCE", "NAMES", "MODE"]

MODE = {"bf16": 0, "fp8": 1, "float32": 2}
NAMES = ("moe_pack", "moe_dispatch", "moe_combine")

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
#ifndef PAUSE_NS
#define PAUSE_NS 64
#endif
#define PAUSE() do { if (PAUSE_NS > 0) __nanosleep(PAUSE_NS); } while (0)
#endif

__shared__ u32 block_role;  /* this block's ticket in a fused kernel (take_ticket) */

#ifdef MOE_TRACE
/* timing probes (benchmarks/moe_latency.py --trace): %globaltimer per role and point */
#define TRACE_ROLES 1024
__device__ u64 moe_trace[2][TRACE_ROLES][12];
__device__ __forceinline__ void trace(int kernel, int point)
{
    if (threadIdx.x == 0 && block_role < TRACE_ROLES)
        moe_trace[kernel][block_role][point] = now_ns();
}
#else
#define trace(kernel, point) ((void)0)
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


/* Waiting: relaxed polls (a strong load that skips L1), then one acquiring
 * load of the value seen.  Every acquiring load invalidates its SM's L1, and
 * with hundreds of spinning blocks sharing SMs with the senders that slowed
 * the senders' own loads by microseconds; a system-scope fence after the
 * polls instead costs ~1.4 us on H200 (benchmarks/nvlink_probe.py). */

/* thread 0: wait until flags[from..to) carry round seq in their high half; 0 on timeout (err set) */
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
        (void)ld_acquire(flags + s);
    }
    return 1;
}

/* wait until a row's tag carries round seq; 0 on timeout, err = 1 + who */
__device__ __forceinline__ int wait_tag(const u64* tag, u32 seq, u64 start, u64 timeout_ns, int* err, int who)
{
    while (ld_relaxed(tag) != (u64)seq) {
        if (now_ns() - start > timeout_ns) {
            atomicCAS(err, 0, 1 + who);
            return 0;
        }
        PAUSE();
    }
    (void)ld_acquire(tag);
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

/* the raw 16 (BF16 bits) or 32 (float32) bytes of channels 8c..8c+7 of a row */
__device__ __forceinline__ void load_raw(const void* row, int bf16, long long c, uint4* q)
{
    if (bf16) {
        q[0] = ((const uint4*)row)[c];
    } else {
        q[0] = ((const uint4*)row)[2 * c];
        q[1] = ((const uint4*)row)[2 * c + 1];
    }
}

/* The dispatch payload of channels 8c..8c+7 of one token row, from their raw
 * bytes q (load_raw): o[0] (BF16 codes, 16 bytes; FP8 codes in o[0].x/.y, 8
 * bytes) or o[0], o[1] (float32).  Every lane of the warp must call it with
 * lanes on consecutive chunks (FP8: the 16 lanes of a 128-channel group
 * exchange their maxima by shuffles); lanes with valid == 0 take part with
 * zeros (their q is not read).  *scale: the FP8 group's scale. */
__device__ __forceinline__ void pack_raw(const uint4* q, int in_bf16, int mode, int valid, uint4* o, float* scale)
{
    if (mode != MODE_FP8 && (in_bf16 ? mode == MODE_BF16 : mode == MODE_F32)) {
        if (valid) {  /* the input's own format: the bits as they are */
            o[0] = q[0];
            if (!in_bf16)
                o[1] = q[1];
        }
        return;
    }
    float v[8];
    if (valid)
        unpack8(q, in_bf16, v);
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

/* pack_raw of chunk c loaded from xrow */
__device__ __forceinline__ void pack8(const void* xrow, int in_bf16, int mode, long long c, int valid, uint4* o,
                                      float* scale)
{
    uint4 q[2];
    if (valid)
        load_raw(xrow, in_bf16, c, q);
    pack_raw(q, in_bf16, mode, valid, o, scale);
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

/* n uint4 from s to d by the 32 lanes of a warp, up to COPY_LOADS loads in
 * flight per lane (8: 16 took the kernel to 139 registers, one block of 512
 * threads per SM instead of three) */
#ifndef COPY_LOADS
#define COPY_LOADS 8
#endif
__device__ __forceinline__ void copy16(uint4* d, const uint4* s, long long n, int lane)
{
    for (long long v = lane; v < n; v += 32 * COPY_LOADS) {
        uint4 a[COPY_LOADS];
#pragma unroll
        for (int i = 0; i < COPY_LOADS; ++i)
            if (v + 32 * i < n)
                a[i] = s[v + 32 * i];
#pragma unroll
        for (int i = 0; i < COPY_LOADS; ++i)
            if (v + 32 * i < n)
                d[v + 32 * i] = a[i];
    }
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
#define MAX_PARTS 8  /* layout.MAX_PARTS: blocks a token's payload is split over */
#define MAX_RANKS_GPU 1024  /* layout.MAX_RANKS */

/* sid[i * ks + j] = expert id of slot j of token base + i (i < nt), -1 masked */
__device__ __forceinline__ void stage_ids(int* sid, const void* idx, int idx64, int base, int nt, int k, int ks, int E)
{
    for (int q = threadIdx.x; q < nt * k; q += blockDim.x) {
        const int i = q / k, j = q - i * k;
        sid[i * ks + j] = expert_at(idx, idx64, (long long)base * k + q, E);
    }
}

/* A fused kernel's blocks take their roles from a ticket counter in the order
 * they start, not from blockIdx: every block holding a lower ticket (a sender,
 * which never waits) is running or done before any block takes a higher one
 * (a receiver, which spins), so receivers can never hold every SM while a
 * sender of the same launch waits for one.  Each launch takes exactly
 * gridDim.x tickets; the host passes the count taken before it as base. */
__device__ __forceinline__ u32 take_ticket(u32* tickets, u32 base)
{
    if (threadIdx.x == 0)
        block_role = atomicAdd(tickets, 1u) - base;
    __syncthreads();
    return block_role;
}

/* dispatch, the sender of token t: its slots, then over the tokens before it,
 * its position in each slot's expert list and its row index at each slot's
 * rank (a prefix computed in the block, no atomics on the order); the row
 * headers and the payload (quantised here) stored straight into the row of
 * every destination's inbox; then one system fence and the rows' tags */
__device__ void dispatch_token(int t, int part, int parts, const void* x, int in_bf16, const void* idx, int idx64,
                               const float* w, int H,
                               int mode, const u64* peers, int me, int ranks, int k, int epr, u32 seq,
                               long long drows_off, long long row_bytes, long long header_bytes, long long dtag_off,
                               int max_tokens, int* rowidx, int* sid, int* sh)
{
    __shared__ int se[64], sr[64], sp[64], sd[64], dsl[64], sfirst[64];
    __shared__ u64 smask[64];  /* slot j: the slots holding the same expert (an expert named twice) */
    __shared__ float sw[64];
    __shared__ int nd;
    __shared__ u8* drow[64];   /* the row at each destination (nd of them) */
    const int E = ranks * epr, tid = threadIdx.x, B = blockDim.x, lane = tid & 31;
    int* slot_of = sh;                            /* [E]: the first slot of this token naming expert e, or -1 */
    u64* rmask = (u64*)(sh + E + (E & 1));        /* [ranks]: the slots of this token on rank r */
    u64* spr = rmask + ranks;                     /* [ranks]: every rank's inbox */
    /* the routing is read in chunks, staged in shared memory by coalesced
     * loads all in flight at once; an odd row stride avoids bank conflicts
     * when a thread per token reads its row */
    const int ks = k | 1, CH = B < SID_WORDS / ks ? B : SID_WORDS / ks;
    /* one round of global loads: this token's slots and weights, the peers'
     * inboxes and the first chunk of the earlier tokens' routing (each
     * dependent round trip costs about a microsecond) */
    for (int e = tid; e < E; e += B)
        slot_of[e] = -1;
    for (int r = tid; r < ranks; r += B) {
        rmask[r] = 0;
        spr[r] = peers[r];
    }
    for (int j = tid; j < k; j += B) {
        const int e = expert_at(idx, idx64, (long long)t * k + j, E);
        se[j] = e;
        sr[j] = e >= 0 ? e / epr : -1;
        sw[j] = w[(long long)t * k + j];
        sp[j] = 0;
        sd[j] = 0;
    }
    stage_ids(sid, idx, idx64, 0, t < CH ? t : CH, k, ks, E);
    __syncthreads();
    for (int j = tid; j < k; j += B) {  /* a thread per slot: its expert's and its rank's slot sets */
        const int e = se[j], r = sr[j];
        u64 em = 0, rm = 0;
        int first_e = 1, first_r = 1;
        for (int j2 = 0; j2 < k; ++j2) {
            if (e >= 0 && se[j2] == e) {
                em |= 1ull << j2;
                first_e &= j2 >= j;
            }
            if (r >= 0 && sr[j2] == r) {
                rm |= 1ull << j2;
                first_r &= j2 >= j;
            }
        }
        smask[j] = em;
        if (e >= 0 && first_e)
            slot_of[e] = j;
        if (r >= 0 && first_r)
            rmask[r] = rm;
        sfirst[j] = r >= 0 && first_r;
    }
    __syncthreads();
    trace(0, 7);
    if (tid < 32) {  /* the destinations: the first slot of each rank, in slot order */
        int n = 0;
        for (int j0 = 0; j0 < k; j0 += 32) {
            const int j = j0 + lane, f = j < k && sfirst[j];
            const u32 b = __ballot_sync(0xffffffffu, f);
            if (f)
                dsl[n + __popc(b & ((1u << lane) - 1u))] = j;
            n += __popc(b);
        }
        if (lane == 0)
            nd = n;
    }
    for (int base = 0; base < t; base += CH) {  /* a thread per earlier token, counts added up per warp */
        const int nt = t - base < CH ? t - base : CH;
        if (base > 0) {  /* block-uniform; the first chunk was staged above */
            __syncthreads();
            stage_ids(sid, idx, idx64, base, nt, k, ks, E);
            __syncthreads();
        }
        trace(0, 8);
        u64 pm = 0, dm = 0;  /* the slots of token t whose expert / rank this earlier token names too */
        for (int j2 = 0; tid < nt && j2 < k; ++j2) {
            const int e2 = sid[tid * ks + j2];
            if (e2 < 0)
                continue;
            const int j = slot_of[e2];
            if (j >= 0)
                pm |= smask[j];
            dm |= rmask[e2 / epr];
        }
        trace(0, 9);
        for (int j = 0; j < k; ++j) {
            const int np = __popc(__ballot_sync(0xffffffffu, (int)((pm >> j) & 1ull)));
            const int nr = __popc(__ballot_sync(0xffffffffu, (int)((dm >> j) & 1ull)));
            if (lane == 0 && np)
                atomicAdd(&sp[j], np);
            if (lane == 0 && nr)
                atomicAdd(&sd[j], nr);
        }
        trace(0, 10);
    }
    __syncthreads();  /* sp, sd complete (the warps' adds); dsl, nd written */
    const int n = nd;
    for (int d = tid; d < n; d += B)
        drow[d] = (u8*)spr[sr[dsl[d]]] + drows_off + ((long long)me * max_tokens + sd[dsl[d]]) * row_bytes;
    __syncthreads();
    trace(0, 4);
    for (int q = tid; part == 0 && q < n * k; q += B) {  /* headers: a thread per (destination, slot) */
        const int d = q / k, j = q - d * k, r = sr[dsl[d]];
        u8* row = drow[d];
        const int on = sr[j] == r;
        if (j == 0)
            ((int*)row)[0] = t;
        ((int*)row)[1 + j] = on ? se[j] - r * epr : -1;
        ((int*)row)[1 + k + j] = on ? sp[j] : -1;
        ((float*)(row + 4 + 8 * k))[j] = on ? sw[j] : 0.0f;
    }
    for (int r = tid; part == 0 && r < ranks; r += B) {  /* kept for combine */
        int v = -1;
        for (int d = 0; d < n; ++d)
            if (sr[dsl[d]] == r)
                v = sd[dsl[d]];
        rowidx[(long long)t * ranks + r] = v;
    }
    trace(0, 5);
    if (n == 0)
        return;
    const void* xrow = in_bf16 ? (const void*)((const u16*)x + (long long)t * H)
                               : (const void*)((const float*)x + (long long)t * H);
    /* this part's chunks of 8 channels: a multiple of 16 (an FP8 group) each */
    const int nch = H / 8, per = ((nch + parts - 1) / parts + 15) / 16 * 16;
    const int first = part * per, end = first + per < nch ? first + per : nch;
    for (int base = first; base < end; base += 2 * B) {  /* two chunks a thread, both loads in flight first */
        const int c0 = base + tid, c1 = c0 + B, v0 = c0 < end, v1 = c1 < end;
        uint4 q0[2], q1[2], o[2];
        float sc = 1.0f;
        if (v0)
            load_raw(xrow, in_bf16, c0, q0);
        if (v1)
            load_raw(xrow, in_bf16, c1, q1);
        pack_raw(q0, in_bf16, mode, v0, o, &sc);
        if (v0)
            for (int d = 0; d < n; ++d)
                put8(drow[d] + header_bytes, mode, H, c0, o, sc);
        if (base + B < end) {  /* block-uniform: the second chunk's warps all take part (shuffles) */
            pack_raw(q1, in_bf16, mode, v1, o, &sc);
            if (v1)
                for (int d = 0; d < n; ++d)
                    put8(drow[d] + header_bytes, mode, H, c1, o, sc);
        }
        trace(0, 6);
    }
    __syncthreads();
    trace(0, 1);
    if (tid == 0) {  /* one fence orders the whole block's stores (cumulative after the barrier) */
        fence_sys();
        for (int d = 0; d < n; ++d)  /* the tag of this part of the row */
            st_relaxed((u64*)((u8*)spr[sr[dsl[d]]] + dtag_off) + ((long long)me * max_tokens + sd[dsl[d]]) * MAX_PARTS +
                           part, seq);
    }
    trace(0, 2);
}

/* dispatch, the counting sender: tokens per (destination, expert) and rows
 * per destination into every destination's meta, then its flag
 * seq << 32 | (parts - 1) << 28 | rows; shared: E + ranks ints */
__device__ void dispatch_meta(int* hist, int* sid, int parts, const void* idx, int idx64, int T, const u64* peers, int me,
                              int ranks, int k, int epr, u32 seq, long long dflag_off, long long meta_off,
                              long long meta_bytes)
{
    const int E = ranks * epr, tid = threadIdx.x, B = blockDim.x;
    const int ks = k | 1, CH = B < SID_WORDS / ks ? B : SID_WORDS / ks;
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
                const int lo = e - e % epr;  /* this rank's experts: [lo, lo + epr) */
                for (int j2 = 0; j2 < j; ++j2) {
                    const int e2 = ids[j2];
                    first_e &= e2 != e;
                    first_r &= !(e2 >= lo && e2 < lo + epr);
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
    __syncthreads();
    trace(0, 1);
    if (tid == 0) {
        fence_sys();
        for (int r = 0; r < ranks; ++r)
            st_relaxed((u64*)((u8*)peers[r] + dflag_off) + me,
                       ((u64)seq << 32) | ((u64)(parts - 1) << 28) | (u32)rows[r]);
    }
    trace(0, 2);
}

/* dispatch, receiver q of Q: waits for every source's meta, works out where
 * each source's tokens start in each expert's list, then a warp per (row,
 * slot) waits for the row's tag and copies the row into the expert's array,
 * the rows of all sources interleaved (row 0 of each, then row 1, ...) so the
 * copies follow the arrivals; shared: ranks * epr + ranks ints */
__device__ void dispatch_expand(int q, int Q, int* sh, const u8* inbox, int ranks, int k, int epr, u32 seq,
                                long long dflag_off, long long meta_off, long long meta_bytes, long long drows_off,
                                long long row_bytes, long long header_bytes, long long payload_bytes,
                                long long scale_bytes, long long dtag_off, int max_tokens, u8* xout, float* sout,
                                int* src_out, int* counts_out, int* offs_out, int* nrecv_out, long long cap,
                                u64 timeout_ns, int* err)
{
    __shared__ int ok, maxn;
    const int tid = threadIdx.x, B = blockDim.x;
    const u64 start = now_ns();
    if (tid == 0)
        ok = wait_flags((const u64*)(inbox + dflag_off), 0, ranks, seq, timeout_ns, err);
    __syncthreads();
    trace(0, 1);
    if (!ok)
        return;
    const u8* meta = inbox + meta_off;
    int* off = sh;                     /* [ranks][epr]: where source s's tokens start in expert e's list */
    int* nsrc = sh + ranks * epr;      /* [ranks]: rows from each source */
    int* nparts = nsrc + ranks;        /* [ranks]: the blocks each of its rows was split over */
    for (int e = tid; e < epr; e += B) {
        int o = 0;
        for (int s = 0; s < ranks; ++s) {
            off[s * epr + e] = o;
            if (q == 0)
                offs_out[s * epr + e] = o;  /* kept for combine: the inbox's meta is rewritten next round */
            o += ((const int*)(meta + s * meta_bytes))[2 + e];
        }
        if (q == 0)
            counts_out[e] = o;
    }
    for (int s = tid; s < ranks; s += B) {
        const int n = (int)((const u32*)(meta + s * meta_bytes))[1];
        if (q == 0)
            nrecv_out[s] = n;
        nsrc[s] = n < max_tokens ? n : max_tokens;
        nparts[s] = 1 + (int)((((const u64*)(inbox + dflag_off))[s] >> 28) & 7u);
    }
    __syncthreads();
    if (tid == 0) {
        int m = 0;
        for (int s = 0; s < ranks; ++s)
            m = nsrc[s] > m ? nsrc[s] : m;
        maxn = m;
    }
    __syncthreads();
    const u64* tags = (const u64*)(inbox + dtag_off);
    const long long pv = payload_bytes / 16;
    const int G = (int)(scale_bytes / 4);
    const int lane = tid & 31, warps = B >> 5;
    const long long per_row = (long long)ranks * k, items = (long long)maxn * per_row;
    for (long long it = (long long)q * warps + (tid >> 5); it < items; it += (long long)Q * warps) {
        const int i = (int)(it / per_row), rem = (int)(it - (long long)i * per_row);
        const int s = rem / k, j = rem - s * k;
        if (i >= nsrc[s])
            continue;
        int got = 1;  /* lane p waits for part p of the row */
        if (lane < nparts[s])
            got = wait_tag(tags + ((long long)s * max_tokens + i) * MAX_PARTS + lane, seq, start, timeout_ns, err, s);
        if (__ballot_sync(0xffffffffu, got) != 0xffffffffu)
            return;
        __syncwarp();  /* the lanes' acquires order every lane's reads too */
        const u8* row = inbox + drows_off + ((long long)s * max_tokens + i) * row_bytes;
        const int* hdr = (const int*)row;
        const int e = hdr[1 + j];
        if (e < 0 || e >= epr)
            continue;
        const long long d = (long long)off[s * epr + e] + hdr[1 + k + j];
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

/* grid (T * P + 1 + R), blockDim.x a multiple of 32, k <= 64, 1 <= P <= 8;
 * dynamic shared memory 4 * (E + 1) + 16 * ranks.  Tickets 0..T*P-1: part
 * ticket % P of token ticket / P; ticket T*P: the counts; the R others:
 * receivers. */
extern "C" __global__ void moe_dispatch(
    const void* x, int in_bf16, const void* idx, int idx64, const float* w, int T, int H, int mode,
    const u64* peers, int me, int ranks, int k, int epr, u32 seq, long long dflag_off, long long meta_off,
    long long meta_bytes, long long drows_off, long long row_bytes, long long header_bytes, long long dtag_off,
    int max_tokens, int* rowidx, long long payload_bytes, long long scale_bytes, u8* xout, float* sout,
    int* src_out, int* counts_out, int* offs_out, int* nrecv_out, long long cap, u64 timeout_ns, int* err,
    u32* tickets, u32 base, int parts)
{
    DYN_SHARED(int, sh);
    __shared__ int sid[SID_WORDS];  /* senders: a chunk of the routing, CH tokens of ks ids each */
    const u32 role = take_ticket(tickets, base), S = (u32)T * (u32)parts;
    trace(0, 0);
    if (role < S)
        dispatch_token((int)(role / (u32)parts), (int)(role % (u32)parts), parts, x, in_bf16, idx, idx64, w, H, mode, peers, me, ranks, k, epr, seq, drows_off,
                       row_bytes, header_bytes, dtag_off, max_tokens, rowidx, sid, sh);
    else if (role == S)
        dispatch_meta(sh, sid, parts, idx, idx64, T, peers, me, ranks, k, epr, seq, dflag_off, meta_off, meta_bytes);
    else
        dispatch_expand((int)(role - S - 1u), (int)(gridDim.x - S - 1u), sh, (const u8*)peers[me], ranks,
                        k, epr, seq, dflag_off, meta_off, meta_bytes, drows_off, row_bytes, header_bytes,
                        payload_bytes, scale_bytes, dtag_off, max_tokens, xout, sout, src_out, counts_out, offs_out,
                        nrecv_out, cap, timeout_ns, err);
    trace(0, 3);
}

/* combine, one row of a source (all channels): the row's slots present here
 * compacted in slot order by warp 0, then the weighted partial sums stored at dst */
template <int YBF16>
__device__ __forceinline__ void combine_row(const u8* row, const void* y, long long cap, int H, int k, int epr,
                                            const int* off, u8* dst, int out_bf16)
{
    __shared__ long long sat[64];
    __shared__ float sw[64];
    __shared__ int nv;
    const int tid = threadIdx.x, B = blockDim.x, nch = H / 8;
    const int* hdr = (const int*)row;
    if (tid < 32) {
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
    for (int c = tid; c < nch; c += B) {
        float acc[8];
        for (int q = 0; q < 8; ++q)
            acc[q] = 0.0f;
        partial8<YBF16>(y, H, nv, sat, sw, c, acc);
        store8(dst, out_bf16, c, acc);
    }
    __syncthreads();
}

/* combine, sender b of S: rows u = b, b + S, ... of all sources interleaved
 * (row i of source s is u = i * ranks + s), each summed over this rank's
 * slots and stored into its source's inbox; then one fence and the rows' tags */
__device__ void combine_sender(int b, int S, const u8* inbox, const void* y, int y_bf16, long long cap, int H,
                               const u64* peers, int me, int ranks, int k, int epr, u32 seq, const int* offs,
                               const int* nrecv, long long drows_off, long long row_bytes, long long crows_off,
                               long long ctag_off, int max_tokens, int out_bf16)
{
    __shared__ int nr[MAX_RANKS_GPU];  /* rows from each source, capped */
    __shared__ int maxn_s;
    const long long esz = out_bf16 ? 2 : 4;
    for (int s = threadIdx.x; s < ranks; s += blockDim.x)
        nr[s] = nrecv[s] < max_tokens ? nrecv[s] : max_tokens;
    __syncthreads();
    if (threadIdx.x == 0) {
        int m = 0;
        for (int s = 0; s < ranks; ++s)
            m = nr[s] > m ? nr[s] : m;
        maxn_s = m;
    }
    __syncthreads();
    const int maxn = maxn_s;
    const long long units = (long long)maxn * ranks;
    int did = 0;
    trace(1, 4);
    for (long long u = b; u < units; u += S) {
        const int i = (int)(u / ranks), s = (int)(u - (long long)i * ranks);
        if (i >= nr[s])
            continue;
        const u8* row = inbox + drows_off + ((long long)s * max_tokens + i) * row_bytes;
        u8* dst = (u8*)peers[s] + crows_off + ((long long)me * max_tokens + i) * H * esz;
        if (y_bf16)
            combine_row<1>(row, y, cap, H, k, epr, offs + s * epr, dst, out_bf16);
        else
            combine_row<0>(row, y, cap, H, k, epr, offs + s * epr, dst, out_bf16);
        if (!did)
            trace(1, 5);
        did = 1;
    }
    trace(1, 1);
    if (did && threadIdx.x == 0) {  /* combine_row ended with a barrier: the fence covers the block's stores */
        fence_sys();
        for (long long u = b; u < units; u += S) {
            const int i = (int)(u / ranks), s = (int)(u - (long long)i * ranks);
            if (i < nr[s])
                st_relaxed((u64*)((u8*)peers[s] + ctag_off) + (long long)me * max_tokens + i, seq);
        }
    }
    trace(1, 2);
}

/* combine, receiver q of Q: unit u = (token u / P, channel part u % P); the
 * threads wait for the tags of the token's rows (one thread per rank), then
 * the partials of four (BF16) or two (float32) ranks are loaded raw at once
 * and added in rank order */
template <int BF16>
__device__ void combine_gather(int q, int Q, const u8* inbox, const int* rowidx, int T, int H, int ranks, u32 seq,
                               long long crows_off, long long ctag_off, int max_tokens, void* out, u64 timeout_ns,
                               int* err)
{
    __shared__ int ok;
    const int tid = threadIdx.x, B = blockDim.x;
    const long long esz = BF16 ? 2 : 4;
    const int nch = H / 8, parts = (nch + B - 1) / B;
    const u64* tags = (const u64*)(inbox + ctag_off);
    const u8* base = inbox + crows_off;
    const u64 start = now_ns();
    for (long long u = q; u < (long long)T * parts; u += Q) {
        const int t = (int)(u / parts), c = (int)(u - (long long)t * parts) * B + tid;
        if (tid == 0)
            ok = 1;
        __syncthreads();
        for (int r = tid; r < ranks; r += B) {
            const int i = rowidx[(long long)t * ranks + r];
            if (i >= 0 && !wait_tag(tags + (long long)r * max_tokens + i, seq, start, timeout_ns, err, r))
                ok = 0;
        }
        __syncthreads();
        trace(1, u == q ? 1 : 2);
        if (!ok)
            return;
        if (c < nch) {
            float acc[8];
            for (int j = 0; j < 8; ++j)
                acc[j] = 0.0f;
            const int NR = BF16 ? 4 : 2;  /* 64 bytes a lane in flight */
            for (int r0 = 0; r0 < ranks; r0 += NR) {
                uint4 qv[NR][BF16 ? 1 : 2];
                int has[NR];
                for (int rr = 0; rr < NR; ++rr) {
                    const int r = r0 + rr;
                    const int i = r < ranks ? rowidx[(long long)t * ranks + r] : -1;
                    has[rr] = i >= 0;
                    if (i >= 0) {
                        const uint4* row = (const uint4*)(base + ((long long)r * max_tokens + i) * H * esz);
                        if (BF16) {
                            qv[rr][0] = row[c];
                        } else {
                            qv[rr][0] = row[2 * c];
                            qv[rr][BF16 ? 0 : 1] = row[2 * c + 1];
                        }
                    }
                }
                for (int rr = 0; rr < NR; ++rr)
                    if (has[rr]) {
                        float v[8];
                        unpack8(qv[rr], BF16, v);
                        for (int j = 0; j < 8; ++j)
                            acc[j] = __fadd_rn(acc[j], v[j]);
                    }
            }
            store8((u8*)out + (long long)t * H * esz, BF16, c, acc);
        }
        __syncthreads();  /* ok is rewritten next unit */
    }
}

/* grid (S + R), blockDim.x a multiple of 32, k <= 64.  Tickets 0..S-1:
 * senders; the R others: receivers. */
extern "C" __global__ void moe_combine(
    const void* y, int y_bf16, long long cap, int H, const u64* peers, int me, int ranks, int k, int epr, u32 seq,
    const int* offs, const int* nrecv, long long drows_off, long long row_bytes, long long crows_off,
    long long ctag_off, int max_tokens, int out_bf16, const int* rowidx, int T, void* out, u64 timeout_ns, int* err,
    u32* tickets, u32 base, int senders)
{
    const u32 role = take_ticket(tickets, base);
    trace(1, 0);
    const u8* inbox = (const u8*)peers[me];
    if (role < (u32)senders)
        combine_sender((int)role, senders, inbox, y, y_bf16, cap, H, peers, me, ranks, k, epr, seq, offs, nrecv,
                       drows_off, row_bytes, crows_off, ctag_off, max_tokens, out_bf16);
    else if (out_bf16)
        combine_gather<1>((int)(role - (u32)senders), (int)(gridDim.x - (u32)senders), inbox, rowidx, T, H, ranks,
                          seq, crows_off, ctag_off, max_tokens, out, timeout_ns, err);
    else
        combine_gather<0>((int)(role - (u32)senders), (int)(gridDim.x - (u32)senders), inbox, rowidx, T, H, ranks,
                          seq, crows_off, ctag_off, max_tokens, out, timeout_ns, err);
    trace(1, 3);
}
"""
