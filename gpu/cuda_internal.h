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
    struct cuda_graph *graph; /* the graph build's stream and cuBLAS handle (cuda_graph.cu) */
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
#define CK(call)                                                                          \
    do {                                                                                  \
        cudaError_t e_ = (call);                                                          \
        if (c->inject) {                                                                  \
            e_ = (cudaError_t)c->inject;                                                  \
            c->inject = 0;                                                                \
        }                                                                                 \
        if (e_ != cudaSuccess) {                                                          \
            s = ra_gpu_cuda_dev_fail(c, e_, #call, __FILE__, __LINE__, committed);                              \
            goto fail;                                                                    \
        }                                                                                 \
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
ra_status ra_gpu_cuda_graph_rows(ra_gpu_cache *c, ra_gpu_mem mem, ra_dtype dtype,
                                 const void *keys, size_t n, const void *q, size_t nq,
                                 unsigned dim, const ra_gpu_graph_params *p, int32_t *adj,
                                 int32_t *occ, ra_gpu_graph_stats *st);

/* (static: one copy per .cu file, no separable compilation needed) */
/* ---- kNN top-k selection ----------------------------------------------------------------- */

static __device__ __forceinline__ unsigned fkey(float f)
{
    unsigned u = __float_as_uint(f);
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

#define TOPK_THREADS 1024
#define TOPK_MAX 1024

/* one block per row of n scores: radix select of the k-th largest key (4 passes of 8
 * bits, warp-aggregated histogram), collection, bitonic sort by (score desc, id asc) */
static __global__ void __launch_bounds__(TOPK_THREADS)
    topk_kernel(const float *scores, size_t n, unsigned k, int32_t *ids_out, float *sc_out,
                size_t row0)
{
    __shared__ unsigned hist[256];
    __shared__ unsigned s_prefix, s_kk, s_nout, s_neq;
    __shared__ float os[TOPK_MAX];
    __shared__ int32_t oi[TOPK_MAX];
    const float *row = scores + (size_t)blockIdx.x * n;
    const int lane = threadIdx.x % 32;
    unsigned prefix = 0, mask = 0, kk = k;
    for (int pass = 0; pass < 4; pass++) {
        int shift = 24 - 8 * pass;
        for (int i = threadIdx.x; i < 256; i += blockDim.x)
            hist[i] = 0;
        __syncthreads();
        for (size_t i0 = 0; i0 < n; i0 += blockDim.x) {
            size_t i = i0 + threadIdx.x;
            bool in = false;
            unsigned dig = 0;
            if (i < n) {
                unsigned u = fkey(row[i]);
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
            kk -= cum;
            s_prefix = prefix | ((unsigned)d << shift);
            s_kk = kk;
        }
        __syncthreads();
        prefix = s_prefix;
        kk = s_kk;
        mask |= 255u << shift;
    }
    /* prefix: key of the k-th largest; kk: how many equal to it are taken */
    if (threadIdx.x == 0) {
        s_nout = 0;
        s_neq = 0;
    }
    unsigned P = 1;
    while (P < k)
        P <<= 1;
    for (unsigned i = threadIdx.x; i < P; i += blockDim.x) {
        os[i] = -INFINITY;
        oi[i] = INT32_MAX;
    }
    __syncthreads();
    for (size_t i = threadIdx.x; i < n; i += blockDim.x) {
        float f = row[i];
        unsigned u = fkey(f);
        if (u > prefix) {
            unsigned slot = atomicAdd(&s_nout, 1u);
            os[slot] = f;
            oi[slot] = (int32_t)i;
        } else if (u == prefix) {
            unsigned e = atomicAdd(&s_neq, 1u);
            if (e < kk) {
                unsigned slot = atomicAdd(&s_nout, 1u);
                os[slot] = f;
                oi[slot] = (int32_t)i;
            }
        }
    }
    __syncthreads();
    /* bitonic sort, best first */
    for (unsigned size = 2; size <= P; size <<= 1)
        for (unsigned stride = size >> 1; stride > 0; stride >>= 1) {
            for (unsigned i = threadIdx.x; i < P; i += blockDim.x) {
                unsigned j = i ^ stride;
                if (j > i) {
                    bool desc = (i & size) == 0;
                    float a = os[i], bb = os[j];
                    int32_t ia = oi[i], ib = oi[j];
                    bool a_first = a > bb || (a == bb && ia < ib);
                    if (desc != a_first) {
                        os[i] = bb;
                        os[j] = a;
                        oi[i] = ib;
                        oi[j] = ia;
                    }
                }
            }
            __syncthreads();
        }
    size_t out = (row0 + blockIdx.x) * k;
    for (unsigned i = threadIdx.x; i < k; i += blockDim.x) {
        ids_out[out + i] = oi[i];
        sc_out[out + i] = os[i];
    }
}

#endif
