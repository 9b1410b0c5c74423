/* The reference decoder's forward pass on CUDA (ra_gpu_lm.h): weights and the fp32 KV
 * cache in device memory, cuBLAS SGEMM for the projections, and the small kernels of a
 * Llama layer (embedding gather, RMSNorm, RoPE + cache write, SwiGLU, causal prefill
 * attention, decode attention over position ranges, scores, dtype export). It is the
 * GPU twin of bench/lm/lm.c and keeps that file's numerics (fp32 activations, fp32
 * accumulation, RMSNorm sums in double) so bits per byte match the CPU path; speed is
 * secondary to being simple and exact (the model is tiny: 6 layers, 384 wide). */
#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "ra_gpu_lm.h"

#define LM_CHUNK 4096u /* prefill rows per pass */
#define ATT_ROWS 8     /* prefill attention: query rows (warps) per block */
#define ATT_TILE 32    /* keys per shared-memory tile */
#define DEC_WARPS 32   /* decode attention: warps per head */
#define MAX_HD 128     /* head dims the attention kernels take (2 or 4 dims per lane) */

typedef struct dlayer {
    float *attn_norm, *wq, *wk, *wv, *wo, *mlp_norm, *w_gate, *w_up, *w_down;
} dlayer;

struct ra_gpu_lm {
    ra_gpu_lm_config cfg;
    cudaStream_t stream;
    cublasHandle_t blas;
    unsigned pos;
    char err[512];
    float *embed, *final_norm, *lm_head;
    dlayer *layers;
    float *cos_t, *sin_t; /* [max_ctx][hd/2] */
    float *kc, *vc;       /* [layer][kv][max_ctx][hd] */
    float *x, *xn, *q, *k, *v, *att, *g, *u, *logits;
    int *tok;
};

static ra_status lm_fail(ra_gpu_lm *lm, ra_status s, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(lm->err, sizeof lm->err, fmt, ap);
    va_end(ap);
    return s;
}

#define CK(call)                                                                                           \
    do {                                                                                                   \
        cudaError_t e_ = (call);                                                                           \
        if (e_ != cudaSuccess) {                                                                           \
            s = lm_fail(lm, e_ == cudaErrorMemoryAllocation ? RA_ENOMEM : RA_EDEVICE, "CUDA %s (%s) in %s [lm_cuda.cu:%d]", \
                        cudaGetErrorName(e_), cudaGetErrorString(e_), #call, __LINE__);                    \
            goto fail;                                                                                     \
        }                                                                                                  \
    } while (0)

#define CKB(call)                                                                                          \
    do {                                                                                                   \
        cublasStatus_t b_ = (call);                                                                        \
        if (b_ != CUBLAS_STATUS_SUCCESS) {                                                                 \
            s = lm_fail(lm, RA_EDEVICE, "cuBLAS %s in %s [lm_cuda.cu:%d]", cublasGetStatusString(b_), #call, \
                        __LINE__);                                                                         \
            goto fail;                                                                                     \
        }                                                                                                  \
    } while (0)

#define LAUNCHED() CK(cudaGetLastError())

/* ---- kernels ---------------------------------------------------------------------------- */

__global__ void gather_kernel(const float *embed, const int *tok, float *x, unsigned rows, unsigned H)
{
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (size_t)rows * H)
        return;
    size_t r = i / H, c = i % H;
    x[i] = embed[(size_t)tok[r] * H + c];
}

/* one block per row; sum of squares in double as lm.c */
__global__ void rmsnorm_kernel(const float *x, const float *w, float *y, unsigned n, float eps)
{
    __shared__ double part[32];
    const float *xr = x + (size_t)blockIdx.x * n;
    float *yr = y + (size_t)blockIdx.x * n;
    double ss = 0;
    for (unsigned i = threadIdx.x; i < n; i += blockDim.x)
        ss += (double)xr[i] * xr[i];
    for (int o = 16; o > 0; o >>= 1)
        ss += __shfl_xor_sync(0xffffffffu, ss, o);
    if ((threadIdx.x & 31) == 0)
        part[threadIdx.x >> 5] = ss;
    __syncthreads();
    if (threadIdx.x == 0) {
        double t = 0;
        for (unsigned i = 0; i < blockDim.x / 32; i++)
            t += part[i];
        part[0] = t;
    }
    __syncthreads();
    float inv = 1.0f / sqrtf((float)(part[0] / n) + eps);
    for (unsigned i = threadIdx.x; i < n; i += blockDim.x)
        yr[i] = w[i] * (xr[i] * inv);
}

/* RoPE on q and k of `rows` rows at positions pos0.., then k and v into the cache */
__global__ void rope_store_kernel(float *q, float *k, const float *v, const float *cos_t, const float *sin_t,
                                  float *kc, float *vc, unsigned rows, unsigned pos0, unsigned nh, unsigned nkv,
                                  unsigned hd, unsigned max_ctx)
{
    unsigned half = hd / 2, per_row = (nh + nkv) * half;
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (size_t)rows * per_row)
        return;
    unsigned r = (unsigned)(i / per_row), j = (unsigned)(i % per_row);
    unsigned h = j / half, d = j % half, p = pos0 + r;
    float c = cos_t[(size_t)p * half + d], s = sin_t[(size_t)p * half + d];
    float *vec = h < nh ? q + ((size_t)r * nh + h) * hd : k + ((size_t)r * nkv + (h - nh)) * hd;
    float a = vec[d], b = vec[d + half];
    float na = __fsub_rn(__fmul_rn(a, c), __fmul_rn(b, s));
    float nb = __fadd_rn(__fmul_rn(b, c), __fmul_rn(a, s));
    vec[d] = na;
    vec[d + half] = nb;
    if (h >= nh) {
        unsigned g = h - nh;
        size_t dst = ((size_t)g * max_ctx + p) * hd; /* layer offset applied by the caller */
        const float *vr = v + ((size_t)r * nkv + g) * hd;
        kc[dst + d] = na;
        kc[dst + d + half] = nb;
        vc[dst + d] = vr[d];
        vc[dst + d + half] = vr[d + half];
    }
}

__global__ void swiglu_kernel(float *g, const float *u, size_t n)
{
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n)
        return;
    float a = g[i];
    g[i] = a / (1.0f + expf(-a)) * u[i];
}

__device__ __forceinline__ float warp_max(float v)
{
    for (int o = 16; o > 0; o >>= 1)
        v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

__device__ __forceinline__ float warp_sum(float v)
{
    for (int o = 16; o > 0; o >>= 1)
        v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

/* Causal prefill attention. Block: ATT_ROWS query rows of one head, a warp per row.
 * Keys go through shared memory in tiles of 32; lane j scores key j of the tile, then
 * every lane accumulates its dims of o over the tile with the weights broadcast by
 * shuffles (online softmax in fp32). hd <= MAX_HD, a multiple of 32. */
__global__ void prefill_attn_kernel(const float *q, const float *kc, const float *vc, float *att, unsigned rows,
                                    unsigned pos0, unsigned nh, unsigned grp, unsigned hd, unsigned max_ctx,
                                    float scale)
{
    extern __shared__ float sm[];
    float *ks = sm;                          /* [ATT_TILE][hd + 1] */
    float *vs = ks + ATT_TILE * (hd + 1);    /* [ATT_TILE][hd] */
    float *qs = vs + ATT_TILE * hd;          /* [ATT_ROWS][hd] */
    unsigned h = blockIdx.y, g = h / grp, warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    unsigned r0 = blockIdx.x * ATT_ROWS, r = r0 + warp;
    unsigned dpl = hd / 32; /* dims per lane */
    const float *K = kc + (size_t)g * max_ctx * hd, *V = vc + (size_t)g * max_ctx * hd;
    for (unsigned i = threadIdx.x; i < ATT_ROWS * hd; i += blockDim.x) {
        unsigned rr = r0 + i / hd;
        qs[i] = rr < rows ? q[((size_t)rr * nh + h) * hd + i % hd] : 0.0f;
    }
    unsigned last = r0 + ATT_ROWS - 1 < rows - 1 ? r0 + ATT_ROWS - 1 : rows - 1;
    unsigned nk = pos0 + last + 1; /* keys the block needs */
    unsigned myk = pos0 + r + 1;   /* keys this row sees */
    float m = -INFINITY, l = 0.0f, o[MAX_HD / 32];
    for (unsigned i = 0; i < MAX_HD / 32; i++)
        o[i] = 0.0f;
    const float *qr = qs + warp * hd;
    for (unsigned t0 = 0; t0 < nk; t0 += ATT_TILE) {
        __syncthreads();
        for (unsigned i = threadIdx.x; i < ATT_TILE * hd; i += blockDim.x) {
            unsigned j = i / hd, d = i % hd;
            float kv = 0.0f, vv = 0.0f;
            if (t0 + j < nk) {
                kv = K[(size_t)(t0 + j) * hd + d];
                vv = V[(size_t)(t0 + j) * hd + d];
            }
            ks[j * (hd + 1) + d] = kv;
            vs[j * hd + d] = vv;
        }
        __syncthreads();
        if (r >= rows || t0 >= myk)
            continue;
        unsigned key = t0 + lane;
        float sc = -INFINITY;
        if (key < myk) {
            float acc = 0.0f;
            const float *kr = ks + lane * (hd + 1);
            for (unsigned d = 0; d < hd; d++)
                acc = fmaf(qr[d], kr[d], acc);
            sc = acc * scale;
        }
        float tm = warp_max(sc);
        float mn = fmaxf(m, tm);
        float alpha = m == -INFINITY ? 0.0f : expf(m - mn);
        float p = sc == -INFINITY ? 0.0f : expf(sc - mn);
        l = l * alpha + warp_sum(p);
        for (unsigned i = 0; i < dpl; i++)
            o[i] *= alpha;
        for (unsigned j = 0; j < ATT_TILE; j++) {
            float pj = __shfl_sync(0xffffffffu, p, j);
            const float *vr = vs + j * hd;
            for (unsigned i = 0; i < dpl; i++)
                o[i] = fmaf(pj, vr[lane + 32 * i], o[i]);
        }
        m = mn;
    }
    if (r < rows) {
        float inv = 1.0f / l;
        float *dst = att + ((size_t)r * nh + h) * hd;
        for (unsigned i = 0; i < dpl; i++)
            dst[lane + 32 * i] = o[i] * inv;
    }
}

/* Decode attention over position ranges: block per query head, DEC_WARPS warps, each
 * warp a strided set of 32-key tiles (lane per key), then the warps combine by
 * log-sum-exp in shared memory. Ranges come as kernel arguments (at most 4). */
struct ranges4 {
    unsigned r[8];
    unsigned n;
};

__global__ void decode_attn_kernel(const float *q, const float *kc, const float *vc, float *out, float *lse_out,
                                   ranges4 rg, unsigned grp, unsigned hd, unsigned max_ctx, float scale)
{
    __shared__ float qs[MAX_HD];
    __shared__ float wm[DEC_WARPS], wl[DEC_WARPS];
    __shared__ float wo[DEC_WARPS][MAX_HD];
    unsigned h = blockIdx.x, g = h / grp, warp = threadIdx.x >> 5, lane = threadIdx.x & 31, dpl = hd / 32;
    const float *K = kc + (size_t)g * max_ctx * hd, *V = vc + (size_t)g * max_ctx * hd;
    for (unsigned i = threadIdx.x; i < hd; i += blockDim.x)
        qs[i] = q[(size_t)h * hd + i];
    __syncthreads();
    float m = -INFINITY, l = 0.0f, o[MAX_HD / 32];
    for (unsigned i = 0; i < MAX_HD / 32; i++)
        o[i] = 0.0f;
    /* the ranges as one virtual sequence of n keys */
    unsigned tot = 0;
    for (unsigned i = 0; i < rg.n; i++)
        tot += rg.r[2 * i + 1] > rg.r[2 * i] ? rg.r[2 * i + 1] - rg.r[2 * i] : 0;
    for (unsigned t0 = warp * 32; t0 < tot; t0 += DEC_WARPS * 32) {
        unsigned vi = t0 + lane;
        float sc = -INFINITY;
        unsigned key = 0;
        if (vi < tot) {
            unsigned acc_n = 0;
            for (unsigned i = 0; i < rg.n; i++) {
                unsigned a = rg.r[2 * i], b = rg.r[2 * i + 1], len = b > a ? b - a : 0;
                if (vi < acc_n + len) {
                    key = a + (vi - acc_n);
                    break;
                }
                acc_n += len;
            }
            const float *kr = K + (size_t)key * hd;
            float acc = 0.0f;
            for (unsigned d = 0; d < hd; d += 4) {
                float4 kk = *(const float4 *)(kr + d);
                acc = fmaf(qs[d], kk.x, acc);
                acc = fmaf(qs[d + 1], kk.y, acc);
                acc = fmaf(qs[d + 2], kk.z, acc);
                acc = fmaf(qs[d + 3], kk.w, acc);
            }
            sc = acc * scale;
        }
        float tm = warp_max(sc);
        float mn = fmaxf(m, tm);
        float alpha = m == -INFINITY ? 0.0f : expf(m - mn);
        float p = sc == -INFINITY ? 0.0f : expf(sc - mn);
        l = l * alpha + warp_sum(p);
        for (unsigned i = 0; i < dpl; i++)
            o[i] *= alpha;
        for (unsigned j = 0; j < 32; j++) {
            float pj = __shfl_sync(0xffffffffu, p, j);
            unsigned kj = __shfl_sync(0xffffffffu, key, j);
            if (pj != 0.0f) {
                const float *vr = V + (size_t)kj * hd;
                for (unsigned i = 0; i < dpl; i++)
                    o[i] = fmaf(pj, vr[lane + 32 * i], o[i]);
            }
        }
        m = mn;
    }
    if (lane == 0) {
        wm[warp] = m;
        wl[warp] = l;
    }
    for (unsigned i = 0; i < dpl; i++)
        wo[warp][lane + 32 * i] = o[i];
    __syncthreads();
    if (warp == 0) {
        float M = -INFINITY;
        for (unsigned w = 0; w < DEC_WARPS; w++)
            M = fmaxf(M, wm[w]);
        float L = 0.0f, acc[MAX_HD / 32];
        for (unsigned i = 0; i < dpl; i++)
            acc[i] = 0.0f;
        if (M != -INFINITY) {
            for (unsigned w = 0; w < DEC_WARPS; w++) {
                if (wm[w] == -INFINITY)
                    continue;
                float f = expf(wm[w] - M);
                L += wl[w] * f;
                for (unsigned i = 0; i < dpl; i++)
                    acc[i] = fmaf(f, wo[w][lane + 32 * i], acc[i]);
            }
        }
        float inv = L > 0.0f ? 1.0f / L : 0.0f;
        for (unsigned i = 0; i < dpl; i++)
            out[(size_t)h * hd + lane + 32 * i] = acc[i] * inv;
        if (lse_out && lane == 0)
            lse_out[h] = L > 0.0f ? M + logf(L) : -INFINITY;
    }
}

__global__ void scores_kernel(const float *q, const float *K, float *s, unsigned a, unsigned n, unsigned hd,
                              float scale)
{
    unsigned j = blockIdx.x * blockDim.x + threadIdx.x;
    if (j >= n)
        return;
    const float *kr = K + (size_t)(a + j) * hd;
    float acc = 0.0f;
    for (unsigned d = 0; d < hd; d++)
        acc = fmaf(q[d], kr[d], acc);
    s[j] = acc * scale;
}

__device__ __forceinline__ void put_elem(void *dst, size_t i, float x, int dt)
{
    if (dt == RA_DTYPE_F32)
        ((float *)dst)[i] = x;
    else if (dt == RA_DTYPE_F16)
        ((__half *)dst)[i] = __float2half_rn(x);
    else
        ((__nv_bfloat16 *)dst)[i] = __float2bfloat16_rn(x);
}

__global__ void convert_kernel(const float *src, void *dst, size_t n, int dt)
{
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n)
        put_elem(dst, i, src[i], dt);
}

/* [n][nkv][hd] of dtype from the cache [kv][max_ctx][hd] of one layer */
__global__ void export_kernel(const float *kc, const float *vc, void *k, void *v, unsigned p0, unsigned n,
                              unsigned nkv, unsigned hd, unsigned max_ctx, int dt)
{
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (size_t)n * nkv * hd)
        return;
    unsigned d = (unsigned)(i % hd), g = (unsigned)((i / hd) % nkv), t = (unsigned)(i / ((size_t)hd * nkv));
    size_t src = ((size_t)g * max_ctx + p0 + t) * hd + d;
    put_elem(k, i, kc[src], dt);
    put_elem(v, i, vc[src], dt);
}

/* ---- host side ------------------------------------------------------------------------ */

static unsigned nblk(size_t n, unsigned t)
{
    return (unsigned)((n + t - 1) / t);
}

extern "C" int ra_gpu_lm_available(void)
{
    int n = 0;
    return cudaGetDeviceCount(&n) == cudaSuccess && n > 0;
}

static size_t kv_layer(const ra_gpu_lm *lm)
{
    return (size_t)lm->cfg.n_kv_heads * lm->cfg.max_ctx * lm->cfg.head_dim;
}

extern "C" void ra_gpu_lm_destroy(ra_gpu_lm *lm)
{
    if (!lm)
        return;
    if (lm->stream)
        cudaStreamSynchronize(lm->stream);
    if (lm->layers) {
        for (unsigned l = 0; l < lm->cfg.n_layers; l++) {
            dlayer *L = &lm->layers[l];
            float *p[] = {L->attn_norm, L->wq, L->wk, L->wv, L->wo, L->mlp_norm, L->w_gate, L->w_up, L->w_down};
            for (unsigned i = 0; i < 9; i++)
                cudaFree(p[i]);
        }
        free(lm->layers);
    }
    float *f[] = {lm->embed, lm->final_norm, lm->lm_head, lm->cos_t, lm->sin_t, lm->kc, lm->vc, lm->x,
                  lm->xn, lm->q, lm->k, lm->v, lm->att, lm->g, lm->u, lm->logits};
    for (unsigned i = 0; i < sizeof f / sizeof f[0]; i++)
        cudaFree(f[i]);
    cudaFree(lm->tok);
    if (lm->blas)
        cublasDestroy(lm->blas);
    if (lm->stream)
        cudaStreamDestroy(lm->stream);
    free(lm);
}

extern "C" ra_status ra_gpu_lm_create(const ra_gpu_lm_config *cfg, const float *rope_cos, const float *rope_sin,
                                      ra_gpu_lm **out, char *err, size_t errlen)
{
    ra_status s = RA_OK;
    if (!cfg || !rope_cos || !rope_sin || !out || cfg->head_dim % 32 != 0 || cfg->head_dim > MAX_HD ||
        cfg->n_kv_heads == 0 || cfg->n_heads % cfg->n_kv_heads != 0 || cfg->max_ctx == 0 || cfg->hidden == 0 ||
        cfg->n_layers == 0 || cfg->vocab == 0 || cfg->ffn == 0) {
        if (err && errlen)
            snprintf(err, errlen, "ra_gpu_lm: bad config (head_dim must be 32, 64, 96 or 128)");
        return RA_EINVAL;
    }
    ra_gpu_lm *lm = (ra_gpu_lm *)calloc(1, sizeof *lm);
    if (!lm)
        return RA_ENOMEM;
    lm->cfg = *cfg;
    const ra_gpu_lm_config *c = &lm->cfg;
    size_t H = c->hidden, QD = (size_t)c->n_heads * c->head_dim, KD = (size_t)c->n_kv_heads * c->head_dim,
           F = c->ffn, R = c->max_ctx < LM_CHUNK ? c->max_ctx : LM_CHUNK, half = c->head_dim / 2;
    size_t kv = kv_layer(lm) * c->n_layers;
    lm->layers = (dlayer *)calloc(c->n_layers, sizeof(dlayer));
    if (!lm->layers) {
        s = RA_ENOMEM;
        goto fail;
    }
    CK(cudaSetDevice(c->device));
    CK(cudaStreamCreateWithFlags(&lm->stream, cudaStreamNonBlocking));
    CKB(cublasCreate(&lm->blas));
    CKB(cublasSetStream(lm->blas, lm->stream));
    CKB(cublasSetMathMode(lm->blas, CUBLAS_PEDANTIC_MATH)); /* fp32 as lm.c: no TF32 */
    CK(cudaMalloc(&lm->cos_t, (size_t)c->max_ctx * half * sizeof(float)));
    CK(cudaMalloc(&lm->sin_t, (size_t)c->max_ctx * half * sizeof(float)));
    CK(cudaMemcpy(lm->cos_t, rope_cos, (size_t)c->max_ctx * half * sizeof(float), cudaMemcpyHostToDevice));
    CK(cudaMemcpy(lm->sin_t, rope_sin, (size_t)c->max_ctx * half * sizeof(float), cudaMemcpyHostToDevice));
    CK(cudaMalloc(&lm->kc, kv * sizeof(float)));
    CK(cudaMalloc(&lm->vc, kv * sizeof(float)));
    CK(cudaMalloc(&lm->x, R * H * sizeof(float)));
    CK(cudaMalloc(&lm->xn, R * H * sizeof(float)));
    CK(cudaMalloc(&lm->q, R * QD * sizeof(float)));
    CK(cudaMalloc(&lm->k, R * KD * sizeof(float)));
    CK(cudaMalloc(&lm->v, R * KD * sizeof(float)));
    CK(cudaMalloc(&lm->att, R * QD * sizeof(float)));
    CK(cudaMalloc(&lm->g, R * F * sizeof(float)));
    CK(cudaMalloc(&lm->u, R * F * sizeof(float)));
    CK(cudaMalloc(&lm->logits, (size_t)c->vocab * sizeof(float)));
    CK(cudaMalloc(&lm->tok, R * sizeof(int)));
    CK(cudaMalloc(&lm->embed, (size_t)c->vocab * H * sizeof(float)));
    CK(cudaMalloc(&lm->final_norm, H * sizeof(float)));
    CK(cudaMalloc(&lm->lm_head, (size_t)c->vocab * H * sizeof(float)));
    for (unsigned l = 0; l < c->n_layers; l++) {
        dlayer *L = &lm->layers[l];
        CK(cudaMalloc(&L->attn_norm, H * sizeof(float)));
        CK(cudaMalloc(&L->mlp_norm, H * sizeof(float)));
        CK(cudaMalloc(&L->wq, QD * H * sizeof(float)));
        CK(cudaMalloc(&L->wk, KD * H * sizeof(float)));
        CK(cudaMalloc(&L->wv, KD * H * sizeof(float)));
        CK(cudaMalloc(&L->wo, H * QD * sizeof(float)));
        CK(cudaMalloc(&L->w_gate, F * H * sizeof(float)));
        CK(cudaMalloc(&L->w_up, F * H * sizeof(float)));
        CK(cudaMalloc(&L->w_down, H * F * sizeof(float)));
    }
    *out = lm;
    return RA_OK;
fail:
    if (err && errlen)
        snprintf(err, errlen, "ra_gpu_lm: %s", lm->err[0] ? lm->err : "out of memory");
    ra_gpu_lm_destroy(lm);
    return s;
}

static ra_status up(ra_gpu_lm *lm, float *dst, const float *src, size_t n, const char *what)
{
    ra_status s = RA_OK;
    if (!src)
        return lm_fail(lm, RA_EINVAL, "ra_gpu_lm: %s is NULL", what);
    CK(cudaMemcpy(dst, src, n * sizeof(float), cudaMemcpyHostToDevice));
    return RA_OK;
fail:
    return s;
}

extern "C" ra_status ra_gpu_lm_set_globals(ra_gpu_lm *lm, const float *embed, const float *final_norm,
                                           const float *lm_head)
{
    const ra_gpu_lm_config *c = &lm->cfg;
    ra_status s;
    if ((s = up(lm, lm->embed, embed, (size_t)c->vocab * c->hidden, "embed")) != RA_OK ||
        (s = up(lm, lm->final_norm, final_norm, c->hidden, "final_norm")) != RA_OK)
        return s;
    return up(lm, lm->lm_head, lm_head, (size_t)c->vocab * c->hidden, "lm_head");
}

extern "C" ra_status ra_gpu_lm_set_layer(ra_gpu_lm *lm, unsigned layer, const ra_gpu_lm_layer_weights *w)
{
    const ra_gpu_lm_config *c = &lm->cfg;
    if (layer >= c->n_layers || !w)
        return lm_fail(lm, RA_EINVAL, "ra_gpu_lm: layer %u out of range", layer);
    dlayer *L = &lm->layers[layer];
    size_t H = c->hidden, QD = (size_t)c->n_heads * c->head_dim, KD = (size_t)c->n_kv_heads * c->head_dim,
           F = c->ffn;
    ra_status s;
    if ((s = up(lm, L->attn_norm, w->attn_norm, H, "attn_norm")) != RA_OK ||
        (s = up(lm, L->mlp_norm, w->mlp_norm, H, "mlp_norm")) != RA_OK ||
        (s = up(lm, L->wq, w->wq, QD * H, "wq")) != RA_OK || (s = up(lm, L->wk, w->wk, KD * H, "wk")) != RA_OK ||
        (s = up(lm, L->wv, w->wv, KD * H, "wv")) != RA_OK || (s = up(lm, L->wo, w->wo, H * QD, "wo")) != RA_OK ||
        (s = up(lm, L->w_gate, w->w_gate, F * H, "w_gate")) != RA_OK ||
        (s = up(lm, L->w_up, w->w_up, F * H, "w_up")) != RA_OK)
        return s;
    return up(lm, L->w_down, w->w_down, H * F, "w_down");
}

extern "C" const char *ra_gpu_lm_last_error(const ra_gpu_lm *lm)
{
    return lm ? lm->err : "";
}

extern "C" void *ra_gpu_lm_stream(const ra_gpu_lm *lm)
{
    return lm->stream;
}

extern "C" unsigned ra_gpu_lm_pos(const ra_gpu_lm *lm)
{
    return lm->pos;
}

extern "C" ra_status ra_gpu_lm_rewind(ra_gpu_lm *lm, unsigned n)
{
    if (n > lm->pos)
        return RA_EINVAL;
    lm->pos = n;
    return RA_OK;
}

/* y[rows][out] (+)= x[rows][in] W^T, W [out][in] row-major */
static ra_status linear(ra_gpu_lm *lm, const float *x, const float *w, float *y, unsigned rows, unsigned in,
                        unsigned out, float beta)
{
    ra_status s = RA_OK;
    const float one = 1.0f;
    CKB(cublasSgemm(lm->blas, CUBLAS_OP_T, CUBLAS_OP_N, (int)out, (int)rows, (int)in, &one, w, (int)in, x, (int)in,
                    &beta, y, (int)out));
    return RA_OK;
fail:
    return s;
}

static ra_status rmsnorm(ra_gpu_lm *lm, const float *x, const float *w, float *y, unsigned rows)
{
    ra_status s = RA_OK;
    rmsnorm_kernel<<<rows, 128, 0, lm->stream>>>(x, w, y, lm->cfg.hidden, lm->cfg.rms_eps);
    LAUNCHED();
    return RA_OK;
fail:
    return s;
}

/* attention-free parts of a layer: qkv with RoPE and cache store */
static ra_status qkv_block(ra_gpu_lm *lm, unsigned layer, unsigned pos0, unsigned rows)
{
    const ra_gpu_lm_config *c = &lm->cfg;
    const dlayer *L = &lm->layers[layer];
    unsigned hd = c->head_dim, QD = c->n_heads * hd, KD = c->n_kv_heads * hd;
    ra_status s;
    if ((s = rmsnorm(lm, lm->x, L->attn_norm, lm->xn, rows)) != RA_OK ||
        (s = linear(lm, lm->xn, L->wq, lm->q, rows, c->hidden, QD, 0.0f)) != RA_OK ||
        (s = linear(lm, lm->xn, L->wk, lm->k, rows, c->hidden, KD, 0.0f)) != RA_OK ||
        (s = linear(lm, lm->xn, L->wv, lm->v, rows, c->hidden, KD, 0.0f)) != RA_OK)
        return s;
    size_t n = (size_t)rows * (c->n_heads + c->n_kv_heads) * (hd / 2);
    size_t off = (size_t)layer * kv_layer(lm);
    rope_store_kernel<<<nblk(n, 256), 256, 0, lm->stream>>>(lm->q, lm->k, lm->v, lm->cos_t, lm->sin_t, lm->kc + off,
                                                             lm->vc + off, rows, pos0, c->n_heads, c->n_kv_heads, hd,
                                                             c->max_ctx);
    LAUNCHED();
    return RA_OK;
fail:
    return s;
}

/* o projection (residual by beta 1) and the MLP block */
static ra_status out_mlp_block(ra_gpu_lm *lm, unsigned layer, unsigned rows)
{
    const ra_gpu_lm_config *c = &lm->cfg;
    const dlayer *L = &lm->layers[layer];
    unsigned QD = c->n_heads * c->head_dim;
    ra_status s;
    if ((s = linear(lm, lm->att, L->wo, lm->x, rows, QD, c->hidden, 1.0f)) != RA_OK ||
        (s = rmsnorm(lm, lm->x, L->mlp_norm, lm->xn, rows)) != RA_OK ||
        (s = linear(lm, lm->xn, L->w_gate, lm->g, rows, c->hidden, c->ffn, 0.0f)) != RA_OK ||
        (s = linear(lm, lm->xn, L->w_up, lm->u, rows, c->hidden, c->ffn, 0.0f)) != RA_OK)
        return s;
    size_t n = (size_t)rows * c->ffn;
    swiglu_kernel<<<nblk(n, 256), 256, 0, lm->stream>>>(lm->g, lm->u, n);
    LAUNCHED();
    return linear(lm, lm->g, L->w_down, lm->x, rows, c->ffn, c->hidden, 1.0f);
fail:
    return s;
}

static ra_status logits_to_host(ra_gpu_lm *lm, const float *x_row, float *logits)
{
    const ra_gpu_lm_config *c = &lm->cfg;
    ra_status s;
    if ((s = rmsnorm(lm, x_row, lm->final_norm, lm->xn, 1)) != RA_OK ||
        (s = linear(lm, lm->xn, lm->lm_head, lm->logits, 1, c->hidden, c->vocab, 0.0f)) != RA_OK)
        return s;
    CK(cudaMemcpyAsync(logits, lm->logits, c->vocab * sizeof(float), cudaMemcpyDeviceToHost, lm->stream));
    CK(cudaStreamSynchronize(lm->stream));
    return RA_OK;
fail:
    return s;
}

static ra_status embed_rows(ra_gpu_lm *lm, const int *tokens, unsigned rows)
{
    ra_status s = RA_OK;
    CK(cudaMemcpyAsync(lm->tok, tokens, rows * sizeof(int), cudaMemcpyHostToDevice, lm->stream));
    gather_kernel<<<nblk((size_t)rows * lm->cfg.hidden, 256), 256, 0, lm->stream>>>(lm->embed, lm->tok, lm->x, rows,
                                                                                    lm->cfg.hidden);
    LAUNCHED();
    /* the token buffer is pageable: the copy above is synchronous w.r.t. the host */
    return RA_OK;
fail:
    return s;
}

extern "C" ra_status ra_gpu_lm_prefill(ra_gpu_lm *lm, const int *tokens, unsigned n, float *logits_last,
                                       ra_gpu_lm_qkv_fn fn, void *ctx)
{
    const ra_gpu_lm_config *c = &lm->cfg;
    unsigned hd = c->head_dim;
    ra_status s = RA_OK;
    if (!tokens || n == 0 || n > c->max_ctx - lm->pos)
        return lm_fail(lm, RA_EINVAL, "ra_gpu_lm_prefill: %u tokens past the %u positions", n, c->max_ctx);
    for (unsigned i = 0; i < n; i++)
        if (tokens[i] < 0 || (unsigned)tokens[i] >= c->vocab)
            return lm_fail(lm, RA_EINVAL, "ra_gpu_lm_prefill: token %d outside the vocabulary", tokens[i]);
    size_t smem = (ATT_TILE * (hd + 1) + ATT_TILE * hd + ATT_ROWS * hd) * sizeof(float);
    for (unsigned done = 0; done < n;) {
        unsigned rows = n - done < LM_CHUNK ? n - done : LM_CHUNK;
        unsigned pos0 = lm->pos + done;
        if ((s = embed_rows(lm, tokens + done, rows)) != RA_OK)
            return s;
        for (unsigned l = 0; l < c->n_layers; l++) {
            if ((s = qkv_block(lm, l, pos0, rows)) != RA_OK)
                return s;
            if (fn && (s = fn(ctx, lm, l, pos0, rows, lm->q, lm->k, lm->v)) != RA_OK)
                return s;
            size_t off = (size_t)l * kv_layer(lm);
            dim3 grid(nblk(rows, ATT_ROWS), c->n_heads);
            prefill_attn_kernel<<<grid, ATT_ROWS * 32, smem, lm->stream>>>(
                lm->q, lm->kc + off, lm->vc + off, lm->att, rows, pos0, c->n_heads, c->n_heads / c->n_kv_heads, hd,
                c->max_ctx, c->scale);
            LAUNCHED();
            if ((s = out_mlp_block(lm, l, rows)) != RA_OK)
                return s;
        }
        if (logits_last && done + rows == n &&
            (s = logits_to_host(lm, lm->x + (size_t)(rows - 1) * c->hidden, logits_last)) != RA_OK)
            return s;
        done += rows;
    }
    CK(cudaStreamSynchronize(lm->stream));
    lm->pos += n;
    return RA_OK;
fail:
    return s;
}

extern "C" ra_status ra_gpu_lm_attend_ranges(ra_gpu_lm *lm, unsigned layer, const float *q_dev, const unsigned *r,
                                             unsigned n_ranges, float *o_dev, float *lse_dev)
{
    const ra_gpu_lm_config *c = &lm->cfg;
    ra_status s = RA_OK;
    if (layer >= c->n_layers || n_ranges > 4 || !q_dev || !o_dev || (n_ranges && !r))
        return lm_fail(lm, RA_EINVAL, "ra_gpu_lm_attend_ranges: bad arguments");
    ranges4 rg;
    memset(&rg, 0, sizeof rg);
    rg.n = n_ranges;
    for (unsigned i = 0; i < n_ranges; i++) {
        if (r[2 * i + 1] > c->max_ctx)
            return lm_fail(lm, RA_EINVAL, "ra_gpu_lm_attend_ranges: range past the cache");
        rg.r[2 * i] = r[2 * i];
        rg.r[2 * i + 1] = r[2 * i + 1];
    }
    size_t off = (size_t)layer * kv_layer(lm);
    decode_attn_kernel<<<c->n_heads, DEC_WARPS * 32, 0, lm->stream>>>(q_dev, lm->kc + off, lm->vc + off, o_dev,
                                                                      lse_dev, rg, c->n_heads / c->n_kv_heads,
                                                                      c->head_dim, c->max_ctx, c->scale);
    LAUNCHED();
    return RA_OK;
fail:
    return s;
}

extern "C" ra_status ra_gpu_lm_scores(ra_gpu_lm *lm, unsigned layer, unsigned kv_head, const float *q_dev,
                                      unsigned a, unsigned b, float *s_dev)
{
    const ra_gpu_lm_config *c = &lm->cfg;
    ra_status s = RA_OK;
    if (layer >= c->n_layers || kv_head >= c->n_kv_heads || b > c->max_ctx || !q_dev || !s_dev)
        return lm_fail(lm, RA_EINVAL, "ra_gpu_lm_scores: bad arguments");
    if (b <= a)
        return RA_OK;
    const float *K = lm->kc + (size_t)layer * kv_layer(lm) + (size_t)kv_head * c->max_ctx * c->head_dim;
    scores_kernel<<<nblk(b - a, 128), 128, 0, lm->stream>>>(q_dev, K, s_dev, a, b - a, c->head_dim, c->scale);
    LAUNCHED();
    return RA_OK;
fail:
    return s;
}

static int dt_ok(ra_dtype t)
{
    return t == RA_DTYPE_F32 || t == RA_DTYPE_F16 || t == RA_DTYPE_BF16;
}

extern "C" ra_status ra_gpu_lm_kv_export(ra_gpu_lm *lm, unsigned layer, unsigned p0, unsigned n, ra_dtype dtype,
                                         void *k_dev, void *v_dev)
{
    const ra_gpu_lm_config *c = &lm->cfg;
    ra_status s = RA_OK;
    if (layer >= c->n_layers || p0 > c->max_ctx || n > c->max_ctx - p0 || !dt_ok(dtype) || !k_dev || !v_dev)
        return lm_fail(lm, RA_EINVAL, "ra_gpu_lm_kv_export: bad arguments");
    size_t tot = (size_t)n * c->n_kv_heads * c->head_dim, off = (size_t)layer * kv_layer(lm);
    if (tot == 0)
        return RA_OK;
    export_kernel<<<nblk(tot, 256), 256, 0, lm->stream>>>(lm->kc + off, lm->vc + off, k_dev, v_dev, p0, n,
                                                          c->n_kv_heads, c->head_dim, c->max_ctx, (int)dtype);
    LAUNCHED();
    return RA_OK;
fail:
    return s;
}

extern "C" ra_status ra_gpu_lm_convert(ra_gpu_lm *lm, const float *src_dev, ra_dtype dtype, void *dst_dev, size_t n)
{
    ra_status s = RA_OK;
    if (!dt_ok(dtype) || !src_dev || !dst_dev)
        return lm_fail(lm, RA_EINVAL, "ra_gpu_lm_convert: bad arguments");
    if (n == 0)
        return RA_OK;
    convert_kernel<<<nblk(n, 256), 256, 0, lm->stream>>>(src_dev, dst_dev, n, (int)dtype);
    LAUNCHED();
    return RA_OK;
fail:
    return s;
}

extern "C" ra_status ra_gpu_lm_decode(ra_gpu_lm *lm, int token, float *logits, ra_gpu_lm_attn_fn fn, void *ctx)
{
    const ra_gpu_lm_config *c = &lm->cfg;
    ra_status s = RA_OK;
    if (token < 0 || (unsigned)token >= c->vocab || lm->pos >= c->max_ctx || !logits)
        return lm_fail(lm, RA_EINVAL, "ra_gpu_lm_decode: bad token %d or cache full", token);
    unsigned pos = lm->pos;
    if ((s = embed_rows(lm, &token, 1)) != RA_OK)
        return s;
    for (unsigned l = 0; l < c->n_layers; l++) {
        if ((s = qkv_block(lm, l, pos, 1)) != RA_OK)
            return s;
        if (fn)
            s = fn(ctx, lm, l, pos, lm->q, lm->att);
        else {
            unsigned r[2] = {0, pos + 1};
            s = ra_gpu_lm_attend_ranges(lm, l, lm->q, r, 1, lm->att, NULL);
        }
        if (s != RA_OK)
            return s;
        if ((s = out_mlp_block(lm, l, 1)) != RA_OK)
            return s;
    }
    if ((s = logits_to_host(lm, lm->x, logits)) != RA_OK)
        return s;
    lm->pos = pos + 1;
    return RA_OK;
}

extern "C" void *ra_gpu_lm_alloc(ra_gpu_lm *lm, size_t bytes)
{
    void *p = NULL;
    cudaError_t e = cudaMalloc(&p, bytes ? bytes : 1);
    if (e != cudaSuccess) {
        lm_fail(lm, RA_ENOMEM, "CUDA %s in cudaMalloc(%zu)", cudaGetErrorName(e), bytes);
        return NULL;
    }
    return p;
}

extern "C" void ra_gpu_lm_free(ra_gpu_lm *lm, void *p)
{
    (void)lm;
    if (p)
        cudaFree(p);
}

extern "C" ra_status ra_gpu_lm_copy(ra_gpu_lm *lm, void *dst, const void *src, size_t bytes, int async)
{
    ra_status s = RA_OK;
    if (bytes == 0)
        return RA_OK;
    if (!dst || !src)
        return lm_fail(lm, RA_EINVAL, "ra_gpu_lm_copy: NULL pointer");
    CK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDefault, lm->stream));
    if (!async)
        CK(cudaStreamSynchronize(lm->stream));
    return RA_OK;
fail:
    return s;
}

extern "C" ra_status ra_gpu_lm_sync(ra_gpu_lm *lm)
{
    ra_status s = RA_OK;
    CK(cudaStreamSynchronize(lm->stream));
    return RA_OK;
fail:
    return s;
}
