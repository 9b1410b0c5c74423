/* Internals shared by the CUDA files of gpu/ (cuda_backend.cu: the cache, decode step,
 * merge, kNN; cuda_graph.cu: the index graph build): the backend's state, the error
 * macros that turn a CUDA failure into a status, and the top-k selection kernel. Only
 * .cu files include it. */
#ifndef RA_GPU_CUDA_INTERNAL_H
#define RA_GPU_CUDA_INTERNAL_H

#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <math.h>
#include <stdint.h>

#include "ra_gpu_internal.h"

/* ---- state ------------------------------------------------------------------------ */

struct cuda_impl {
    int device;
    int sms;
    int step_occ;             /* resident step-kernel blocks per SM */
    cudaStream_t own, cur;
    cublasHandle_t blas;
    void *k, *v;              /* [layers][B][H][rows][D] */
    void *ev_k, *ev_v;        /* eviction ring on the device: [layers][B][H][cap][D] */
    float *part;              /* split partials: [B*H][MAX_SPLITS][G][D + 2] */
    unsigned *counters;       /* [B*H], zero between launches */
    cudaEvent_t *ev_off;      /* per layer: offload staging copies done */
    /* host path of a step: pinned bounce + device copies of q|k|v and o|lse */
    void *h_in, *d_in;
    size_t in_bytes;
    void *h_out, *d_out;
    size_t out_bytes;
    /* merge on host pointers: device [o_a | lse_a | o_b | lse_b | out | lse_out] */
    void *d_merge;
    void *h_merge;
    /* growable device scratch (prefill gather, host-path ingest, kNN) */
    void *scratch;
    size_t scratch_bytes;
    void *bounce[2];
    cudaEvent_t bounce_ev[2];
    struct cuda_graph *graph[RA_GPU_GRAPH_LANES]; /* the graph build's lanes: streams, cuBLAS
                                                     handle (cuda_graph.cu) */
};

static inline const char *err_name(cudaError_t e)
{
    return cudaGetErrorName(e);
}

static inline int sticky(cudaError_t e)
{
    switch (e) {
    case cudaErrorIllegalAddress:
    case cudaErrorLaunchFailure:
    case cudaErrorHardwareStackError:
    case cudaErrorIllegalInstruction:
    case cudaErrorMisalignedAddress:
    case cudaErrorInvalidAddressSpace:
    case cudaErrorInvalidPc:
    case cudaErrorAssert:
    case cudaErrorECCUncorrectable:
    case cudaErrorLaunchTimeout:
    case cudaErrorUnknown:
        return 1;
    default:
        return 0;
    }
}

/* after `committed`, a failure leaves device state unknown: the cache is broken */
ra_status ra_gpu_cuda_dev_fail(ra_gpu_cache *c, cudaError_t e, const char *what,
                               const char *file, int line, int committed);

/* CK: checks a CUDA call (and the test hook); on failure sets s and jumps to fail.
 * Functions using it declare `ra_status s = RA_OK; int committed = 0;`. */
#define CK(call)                                                                                   \
    do {                                                                                           \
        cudaError_t e_ = (call);                                                                   \
        if (__atomic_load_n(&c->inject, __ATOMIC_RELAXED)) { /* one thread takes it */             \
            int i_ = __atomic_exchange_n(&c->inject, 0, __ATOMIC_RELAXED);                         \
            e_ = i_ ? (cudaError_t)i_ : e_;                                                        \
        }                                                                                          \
        if (e_ != cudaSuccess) {                                                                   \
            s = ra_gpu_cuda_dev_fail(c, e_, #call, __FILE__, __LINE__, committed);                 \
            goto fail;                                                                             \
        }                                                                                          \
    } while (0)

#define CKB(call)                                                                         \
    do {                                                                                  \
        cublasStatus_t b_ = (call);                                                       \
        if (b_ != CUBLAS_STATUS_SUCCESS) {                                                \
            s = ra_gpu_fail(c, RA_EDEVICE, "cuBLAS %s in %s", cublasGetStatusString(b_),  \
                            #call);                                                       \
            goto fail;                                                                    \
        }                                                                                 \
    } while (0)

static inline cuda_impl *IMPL(const ra_gpu_cache *c)
{
    return (cuda_impl *)c->impl;
}

static inline cudaDataType blas_type(ra_dtype t)
{
    return t == RA_DTYPE_F16 ? CUDA_R_16F : t == RA_DTYPE_BF16 ? CUDA_R_16BF : CUDA_R_32F;
}

/* cuda_graph.cu */
struct cuda_graph;
void ra_gpu_cuda_graph_fini(ra_gpu_cache *c);
ra_status ra_gpu_cuda_graph_rows(ra_gpu_cache *c, int lane, ra_gpu_mem mem, ra_dtype dtype,
                                 const void *keys, size_t n, const void *q, size_t nq, unsigned dim,
                                 const ra_gpu_graph_params *p, int32_t *adj, int32_t *occ,
                                 int32_t *lists, ra_gpu_graph_stats *st);
int ra_gpu_cuda_graph_lanes(ra_gpu_cache *c, size_t peak);

/* (static: one copy per .cu file, no separable compilation needed) */
/* ---- kNN top-k selection ----------------------------------------------------------------- */

static __device__ __forceinline__ unsigned fkey(float f)
{
    unsigned u = __float_as_uint(f);
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

#define TOPK_THREADS 1024
#define TOPK_MAX 1024
#define TOPK_CAP 4096      /* candidates kept in shared memory by the filtering pass */
#define TOPK_SAMPLE 8192   /* scores of the threshold's sample: 64 runs of 128 */
#define TOPK_RUN 128

/* (score desc, id asc) as one ascending 64-bit key; its score back */
static __device__ __forceinline__ unsigned long long tk_ckey(float s, int32_t id)
{
    return (unsigned long long)(~fkey(s)) << 32 | (unsigned)id;
}
static __device__ __forceinline__ float tk_score(unsigned long long c)
{
    unsigned u = ~(unsigned)(c >> 32);
    u = (u & 0x80000000u) ? (u & 0x7fffffffu) : ~u;
    return __uint_as_float(u);
}

/* ascending bitonic sort of a[0..P) (P a power of two) by the whole block; a barrier
 * after each stage (the caller's before the first) */
template <typename K> static __device__ void block_sort(K *a, unsigned P)
{
    for (unsigned size = 2; size <= P; size <<= 1)
        for (unsigned stride = size >> 1; stride > 0; stride >>= 1) {
            for (unsigned i = threadIdx.x; i < P; i += blockDim.x) {
                unsigned j = i ^ stride;
                if (j > i) {
                    bool up = (i & size) == 0;
                    K x = a[i], y = a[j];
                    if ((x > y) == up) {
                        a[i] = y;
                        a[j] = x;
                    }
                }
            }
            __syncthreads();
        }
}

/* Radix select over v[0..m) (global or shared memory), 4 passes of 8 bits with a
 * warp-aggregated histogram: the key of the kk-th largest and how many equal to it are
 * among the kk (*eq_take). Every thread of the block calls it. */
static __device__ unsigned tk_radix(const float *v, size_t m, const unsigned *u_sh, unsigned kk,
                                    unsigned *hist, unsigned *sh, unsigned *eq_take)
{
    const int lane = threadIdx.x % 32;
    unsigned prefix = 0, mask = 0;
    for (int pass = 0; pass < 4; pass++) {
        int shift = 24 - 8 * pass;
        for (int i = threadIdx.x; i < 256; i += blockDim.x)
            hist[i] = 0;
        __syncthreads();
        for (size_t i0 = 0; i0 < m; i0 += blockDim.x) {
            size_t i = i0 + threadIdx.x;
            bool in = false;
            unsigned dig = 0;
            if (i < m) {
                unsigned u = u_sh ? u_sh[i] : fkey(v[i]);
                in = (u & mask) == prefix;
                dig = (u >> shift) & 255u;
            }
            unsigned act = __ballot_sync(0xffffffffu, in);
            if (in) {
                unsigned peers = __match_any_sync(act, dig);
                if (lane == __ffs(peers) - 1)
                    atomicAdd(&hist[dig], __popc(peers));
            }
        }
        __syncthreads();
        if (threadIdx.x == 0) {
            unsigned cum = 0;
            int d = 255;
            for (; d > 0; d--) {
                if (cum + hist[d] >= kk)
                    break;
                cum += hist[d];
            }
            sh[0] = prefix | ((unsigned)d << shift);
            sh[1] = kk - cum;
        }
        __syncthreads();
        prefix = sh[0];
        kk = sh[1];
        mask |= 255u << shift;
        __syncthreads();
    }
    *eq_take = kk;
    return prefix;
}

/* One block per row of n scores, its top k by (score desc, id asc). A row of the key
 * counts is read once: the k-th largest of a sample of its scores (64 runs of 128 spread
 * over the row, distinct entries, so no more than the row's own k-th largest) is a
 * threshold every top-k score reaches, and the one pass keeps what reaches it (~k n /
 * 8192 entries) in shared memory, sorted there. Rows that keep more than TOPK_CAP (ties,
 * or k of several hundred) fall back to a radix select over the row, 5 passes. */
static __global__ void __launch_bounds__(TOPK_THREADS)
    topk_kernel(const float *scores, size_t n, unsigned k, int32_t *ids_out, float *sc_out,
                size_t row0)
{
    __shared__ unsigned long long buf[TOPK_CAP]; /* sample | candidates | fallback lists */
    __shared__ unsigned hist[256], sh[2], s_cnt, s_eq, wsum[TOPK_THREADS / 32];
    const float *row = scores + (size_t)blockIdx.x * n;
    const int lane = threadIdx.x % 32;
    unsigned *samp = reinterpret_cast<unsigned *>(buf);
    unsigned thr = 0, eqk = 0;
    size_t m = n <= TOPK_SAMPLE ? n : TOPK_SAMPLE;
    /* a sample's threshold keeps ~k n / m: when that would not fit, the radix select
     * straight away (n ~ 1M at k 65, or k in the hundreds) */
    int direct = n > TOPK_CAP && (size_t)k * n > (size_t)TOPK_CAP * m * 3 / 4;
    if (n > TOPK_CAP && !direct) {
        for (size_t i = threadIdx.x; i < m; i += blockDim.x) {
            size_t at = i;
            if (n > TOPK_SAMPLE) { /* run r starts at r (n - RUN) / 63: >= RUN apart */
                size_t r = i / TOPK_RUN;
                at = r * (n - TOPK_RUN) / (TOPK_SAMPLE / TOPK_RUN - 1) + i % TOPK_RUN;
            }
            samp[i] = fkey(row[at]);
        }
        __syncthreads();
        thr = tk_radix(NULL, m, samp, k, hist, sh, &eqk);
    }
    if (threadIdx.x == 0)
        s_cnt = direct ? TOPK_CAP + 1 : 0;
    __syncthreads();
    /* the filtering pass: 16-byte loads, 8 scores in flight per thread (a row of n % 4
     * scores, which is not 16-byte aligned, by single loads) */
    auto offer = [&](bool in, float f, size_t i) {
        bool take = in && fkey(f) >= thr;
        if (!__any_sync(0xffffffffu, take)) /* most warps, once the threshold holds */
            return;
        unsigned b = __ballot_sync(0xffffffffu, take);
        unsigned base = 0;
        if (lane == 0)
            base = atomicAdd(&s_cnt, __popc(b));
        base = __shfl_sync(0xffffffffu, base, 0);
        unsigned slot = base + __popc(b & ((1u << lane) - 1));
        if (take && slot < TOPK_CAP)
            buf[slot] = tk_ckey(f, (int32_t)i);
    };
    if (direct) {
        /* nothing to filter: the radix select below */
    } else if ((n & 3) == 0 && ((uintptr_t)row & 15) == 0) {
        const float4 *r4 = reinterpret_cast<const float4 *>(row);
        size_t n4 = n / 4;
        for (size_t v0 = 0; v0 < n4; v0 += 2 * (size_t)blockDim.x) {
            float4 f[2];
#pragma unroll
            for (int j = 0; j < 2; j++) {
                size_t v = v0 + (size_t)j * blockDim.x + threadIdx.x;
                f[j] = v < n4 ? r4[v] : make_float4(0.f, 0.f, 0.f, 0.f);
            }
#pragma unroll
            for (int j = 0; j < 2; j++) {
                size_t v = v0 + (size_t)j * blockDim.x + threadIdx.x;
                bool in = v < n4;
                offer(in, f[j].x, 4 * v);
                offer(in, f[j].y, 4 * v + 1);
                offer(in, f[j].z, 4 * v + 2);
                offer(in, f[j].w, 4 * v + 3);
            }
        }
    } else {
        for (size_t i0 = 0; i0 < n; i0 += 4 * (size_t)blockDim.x) {
            float f[4];
#pragma unroll
            for (int j = 0; j < 4; j++) {
                size_t i = i0 + (size_t)j * blockDim.x + threadIdx.x;
                f[j] = i < n ? row[i] : 0.0f;
            }
#pragma unroll
            for (int j = 0; j < 4; j++) {
                size_t i = i0 + (size_t)j * blockDim.x + threadIdx.x;
                offer(i < n, f[j], i);
            }
        }
    }
    __syncthreads();
    unsigned cnt = s_cnt;
    if (cnt > TOPK_CAP) {
        /* fallback: the k-th largest of the whole row by radix select, then everything
         * above it, and of those equal to it the lowest ids that complete k (ranked in
         * index order, chunk by chunk, as the CPU reference breaks ties) */
        unsigned prefix = tk_radix(row, n, NULL, k, hist, sh, &eqk);
        if (threadIdx.x == 0)
            s_cnt = s_eq = 0;
        __syncthreads();
        const unsigned w = threadIdx.x / 32, nw = blockDim.x / 32;
        for (size_t i0 = 0; i0 < n; i0 += blockDim.x) {
            size_t i = i0 + threadIdx.x;
            float f = i < n ? row[i] : 0.0f;
            unsigned u = fkey(f);
            bool gt = i < n && u > prefix, eq = i < n && u == prefix;
            if (gt)
                buf[atomicAdd(&s_cnt, 1u)] = tk_ckey(f, (int32_t)i);
            unsigned b = __ballot_sync(0xffffffffu, eq);
            if (lane == 0)
                wsum[w] = __popc(b);
            unsigned taken = s_eq; /* the ties taken before this chunk */
            __syncthreads();
            unsigned r = taken + __popc(b & ((1u << lane) - 1)), tot = 0;
            for (unsigned j = 0; j < nw; j++) {
                r += j < w ? wsum[j] : 0;
                tot += wsum[j];
            }
            if (eq && r < eqk)
                buf[atomicAdd(&s_cnt, 1u)] = tk_ckey(f, (int32_t)i);
            __syncthreads();
            if (threadIdx.x == 0)
                s_eq = taken + tot;
            __syncthreads();
        }
        cnt = s_cnt; /* k (or n, if fewer) */
    }
    unsigned P = 1;
    while (P < cnt || P < k)
        P <<= 1;
    for (unsigned i = cnt + threadIdx.x; i < P; i += blockDim.x)
        buf[i] = ~0ull;
    __syncthreads();
    block_sort(buf, P);
    size_t out = (row0 + blockIdx.x) * k;
    for (unsigned i = threadIdx.x; i < k; i += blockDim.x) {
        unsigned long long c = buf[i];
        ids_out[out + i] = c == ~0ull ? INT32_MAX : (int32_t)(unsigned)c;
        sc_out[out + i] = c == ~0ull ? -INFINITY : tk_score(c);
    }
}

#endif
