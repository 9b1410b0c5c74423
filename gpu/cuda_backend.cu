/* The CUDA backend of gpu/: device storage of the sink+window cache, the fused
 * append + split-K partial-attention kernel of a decode step (one launch; the last
 * block of each (sequence, KV head) reduces the splits, so no second launch), the merge
 * kernel, prefill scatter/gather with staging copies to pinned host memory, and the
 * exact kNN for index builds (cuBLAS GEMM + a radix top-k selection kernel). Everything
 * is enqueued on one stream; waits are on that stream or on per-layer events, never on
 * the whole device. Every CUDA call goes through CK(), which turns a failure into
 * RA_EDEVICE with the CUDA message and marks the cache broken when device state may
 * be inconsistent. */
#include <stdlib.h>
#include <string.h>

#include "cuda_internal.h"

#define MAX_SPLITS 64
#define NWARPS 8
#define BOUNCE_BYTES ((size_t)8 << 20)

/* ---- state (cuda_internal.h) ---- */

/* after `committed`, a failure leaves device state unknown: the cache is broken */
ra_status ra_gpu_cuda_dev_fail(ra_gpu_cache *c, cudaError_t e, const char *what,
                               const char *file, int line, int committed)
{
    if (sticky(e) || committed) /* graph build lanes may read it meanwhile */
        __atomic_store_n(&c->broken, 1, __ATOMIC_RELAXED);
    ra_status s = e == cudaErrorMemoryAllocation ? RA_ENOMEM : RA_EDEVICE;
    const char *base = strrchr(file, '/');
    return ra_gpu_fail(c, s, "CUDA %s (%s) in %s [%s:%d]%s", err_name(e),
                       cudaGetErrorString(e), what, base ? base + 1 : file, line,
                       c->broken ? "; the cache is marked broken" : "");
}

/* ---- element helpers ----------------------------------------------------------------- */

__device__ __forceinline__ float to_f(__half x)
{
    return __half2float(x);
}
__device__ __forceinline__ float to_f(__nv_bfloat16 x)
{
    return __bfloat162float(x);
}
__device__ __forceinline__ float to_f(float x)
{
    return x;
}

/* EPL consecutive elements at p (aligned to EPL * sizeof(T)) into floats */
template <typename T, int EPL> __device__ __forceinline__ void load_row(const T *p, float *f)
{
    if constexpr (EPL * sizeof(T) == 16) {
        uint4 u = *reinterpret_cast<const uint4 *>(p);
        const T *t = reinterpret_cast<const T *>(&u);
#pragma unroll
        for (int e = 0; e < EPL; e++)
            f[e] = to_f(t[e]);
    } else if constexpr (EPL * sizeof(T) == 8) {
        uint2 u = *reinterpret_cast<const uint2 *>(p);
        const T *t = reinterpret_cast<const T *>(&u);
#pragma unroll
        for (int e = 0; e < EPL; e++)
            f[e] = to_f(t[e]);
    } else if constexpr (EPL * sizeof(T) == 4) {
        uint32_t u = *reinterpret_cast<const uint32_t *>(p);
        const T *t = reinterpret_cast<const T *>(&u);
#pragma unroll
        for (int e = 0; e < EPL; e++)
            f[e] = to_f(t[e]);
    } else {
#pragma unroll
        for (int e = 0; e < EPL; e++)
            f[e] = to_f(p[e]);
    }
}

/* ---- decode step: append + split partial attention + split reduction ------------------- */

struct step_args {
    const void *q, *kn, *vn; /* [B][Hq][D], [B][H][D] */
    void *K, *V;             /* this layer's storage [B][H][rows][D] */
    void *ev_k, *ev_v;       /* this layer's device eviction ring [B][H][cap][D] */
    float *o, *lse;
    float *part;
    unsigned *counters;
    unsigned rows, n_local, new_row, evict, ev_slot, ev_cap, nsplit, chunk;
    float scale_log2; /* scale * log2(e) */
};

template <typename T, int D, int G> __global__ void __launch_bounds__(NWARPS * 32)
    step_kernel(step_args a)
{
    /* A half-warp reads one row (16 lanes x 16 bytes for D = 128), so a warp has 2U rows
     * of K and V in flight per iteration; each warp walks a contiguous slice of the
     * block's rows. Decode attention is latency-bound: few, wide round trips matter. */
    constexpr int EPL = D / 16;
    constexpr int U = G >= 6 ? 2 : 4; /* registers: q and acc grow with G */
    const unsigned split = blockIdx.x, h = blockIdx.y, b = blockIdx.z, H = gridDim.y;
    const unsigned bh = b * H + h;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, half = lane / 16, sub = lane % 16;
    const T *K = (const T *)a.K + (size_t)bh * a.rows * D;
    const T *V = (const T *)a.V + (size_t)bh * a.rows * D;
    const T *kn = (const T *)a.kn + (size_t)bh * D;
    const T *vn = (const T *)a.vn + (size_t)bh * D;

    if (split == 0) { /* append: stage the evicted row, then write the new one. No block
                         reads row new_row from storage in this launch (they read kn/vn). */
        T *Kw = (T *)a.K + ((size_t)bh * a.rows + a.new_row) * D;
        T *Vw = (T *)a.V + ((size_t)bh * a.rows + a.new_row) * D;
        for (int d = threadIdx.x; d < D; d += blockDim.x) {
            T ok = Kw[d], ov = Vw[d];
            if (a.evict) {
                size_t e = ((size_t)bh * a.ev_cap + a.ev_slot) * D + d;
                ((T *)a.ev_k)[e] = ok;
                ((T *)a.ev_v)[e] = ov;
            }
            Kw[d] = kn[d];
            Vw[d] = vn[d];
        }
    }

    const unsigned start = split * a.chunk;
    const unsigned end = min(a.n_local, start + a.chunk);
    const unsigned per = (end > start ? end - start + NWARPS - 1 : 0) / NWARPS;
    const unsigned wstart = start + warp * per;
    const unsigned wend = min(end, wstart + per);

    float q[G][EPL];
#pragma unroll
    for (int g = 0; g < G; g++) {
        load_row<T, EPL>((const T *)a.q + ((size_t)b * H * G + h * G + g) * D + sub * EPL, q[g]);
#pragma unroll
        for (int e = 0; e < EPL; e++)
            q[g][e] *= a.scale_log2;
    }
    float m[G], l[G], acc[G][EPL];
#pragma unroll
    for (int g = 0; g < G; g++) {
        m[g] = -INFINITY;
        l[g] = 0.0f;
#pragma unroll
        for (int e = 0; e < EPL; e++)
            acc[g][e] = 0.0f;
    }
    for (unsigned r0 = wstart; r0 < wend; r0 += 2 * U) {
        float kf[U][EPL], vf[U][EPL];
        bool ok[U];
#pragma unroll
        for (int u = 0; u < U; u++) {
            unsigned r = r0 + 2 * u + half;
            ok[u] = r < wend;
            if (ok[u]) {
                const T *kp = r == a.new_row ? kn : K + (size_t)r * D;
                const T *vp = r == a.new_row ? vn : V + (size_t)r * D;
                load_row<T, EPL>(kp + sub * EPL, kf[u]);
                load_row<T, EPL>(vp + sub * EPL, vf[u]);
            } else {
#pragma unroll
                for (int e = 0; e < EPL; e++)
                    kf[u][e] = vf[u][e] = 0.0f;
            }
        }
        float s[U][G];
#pragma unroll
        for (int u = 0; u < U; u++)
#pragma unroll
            for (int g = 0; g < G; g++) {
                float x = 0.0f;
#pragma unroll
                for (int e = 0; e < EPL; e++)
                    x += q[g][e] * kf[u][e];
                s[u][g] = x;
            }
#pragma unroll
        for (int off = 8; off > 0; off >>= 1) /* within each half-warp */
#pragma unroll
            for (int u = 0; u < U; u++)
#pragma unroll
                for (int g = 0; g < G; g++)
                    s[u][g] += __shfl_xor_sync(0xffffffffu, s[u][g], off);
#pragma unroll
        for (int g = 0; g < G; g++) {
            float mx = m[g];
#pragma unroll
            for (int u = 0; u < U; u++)
                if (ok[u])
                    mx = fmaxf(mx, s[u][g]);
            if (mx == -INFINITY) /* this half had no row in this iteration */
                continue;
            float alpha = exp2f(m[g] - mx); /* m = -inf: 0 */
            l[g] *= alpha;
#pragma unroll
            for (int e = 0; e < EPL; e++)
                acc[g][e] *= alpha;
#pragma unroll
            for (int u = 0; u < U; u++) {
                float p = ok[u] ? exp2f(s[u][g] - mx) : 0.0f;
                l[g] += p;
#pragma unroll
                for (int e = 0; e < EPL; e++)
                    acc[g][e] += p * vf[u][e];
            }
            m[g] = mx;
        }
    }
    /* the two halves of the warp saw different rows: combine them */
#pragma unroll
    for (int g = 0; g < G; g++) {
        float mo = __shfl_xor_sync(0xffffffffu, m[g], 16);
        float lo = __shfl_xor_sync(0xffffffffu, l[g], 16);
        float M = fmaxf(m[g], mo);
        float fa = m[g] == -INFINITY ? 0.0f : exp2f(m[g] - M);
        float fb = mo == -INFINITY ? 0.0f : exp2f(mo - M);
        l[g] = l[g] * fa + lo * fb;
#pragma unroll
        for (int e = 0; e < EPL; e++) {
            float ao = __shfl_xor_sync(0xffffffffu, acc[g][e], 16);
            acc[g][e] = acc[g][e] * fa + ao * fb;
        }
        m[g] = M;
    }

    /* warps -> block */
    __shared__ float sm_m[NWARPS][G], sm_l[NWARPS][G];
    __shared__ float sm_acc[NWARPS][G][D];
    if (lane == 0)
#pragma unroll
        for (int g = 0; g < G; g++) {
            sm_m[warp][g] = m[g];
            sm_l[warp][g] = l[g];
        }
    if (half == 0)
#pragma unroll
        for (int g = 0; g < G; g++)
#pragma unroll
            for (int e = 0; e < EPL; e++)
                sm_acc[warp][g][sub * EPL + e] = acc[g][e];
    __syncthreads();

    const unsigned hq0 = h * G;
    float *part = a.part + (size_t)bh * MAX_SPLITS * G * (D + 2);
    for (int i = threadIdx.x; i < G * D; i += blockDim.x) {
        int g = i / D, d = i % D;
        float M = -INFINITY;
#pragma unroll
        for (int w = 0; w < NWARPS; w++)
            M = fmaxf(M, sm_m[w][g]);
        float L = 0.0f, A = 0.0f;
        if (M != -INFINITY) {
#pragma unroll
            for (int w = 0; w < NWARPS; w++) {
                float f = exp2f(sm_m[w][g] - M);
                L += f * sm_l[w][g];
                A += f * sm_acc[w][g][d];
            }
        }
        if (a.nsplit == 1) {
            size_t row = (size_t)b * H * G + hq0 + g;
            a.o[row * D + d] = A / L;
            if (d == 0)
                a.lse[row] = (M + log2f(L)) * 0.69314718055994531f;
        } else {
            float *p = part + ((size_t)split * G + g) * (D + 2);
            p[d] = A;
            if (d == 0) {
                p[D] = M;
                p[D + 1] = L;
            }
        }
    }
    if (a.nsplit == 1)
        return;

    /* splits -> result: the last block to finish reduces (threadfence reduction) */
    __shared__ bool last;
    __threadfence();
    __syncthreads();
    if (threadIdx.x == 0) {
        unsigned done = atomicAdd(&a.counters[bh], 1u);
        last = done == a.nsplit - 1;
    }
    __syncthreads();
    if (!last)
        return;
    __threadfence();
    /* weights of the splits first (in parallel), then independent loads of the partial
     * outputs: the reduction costs a few L2 round trips, not one per split */
    __shared__ float sw[MAX_SPLITS][G], sl[MAX_SPLITS][G], sL[G];
    for (unsigned i = threadIdx.x; i < a.nsplit * G; i += blockDim.x) {
        unsigned sp = i / G, g = i % G;
        const float *p = part + ((size_t)sp * G + g) * (D + 2);
        sw[sp][g] = __ldcg(p + D);
        sl[sp][g] = __ldcg(p + D + 1);
    }
    __syncthreads();
    __shared__ float sM[G];
    if (threadIdx.x < G) {
        int g = threadIdx.x;
        float M = -INFINITY;
        for (unsigned sp = 0; sp < a.nsplit; sp++)
            M = fmaxf(M, sw[sp][g]);
        float L = 0.0f;
        for (unsigned sp = 0; sp < a.nsplit; sp++) {
            float f = sw[sp][g] == -INFINITY ? 0.0f : exp2f(sw[sp][g] - M);
            sw[sp][g] = f;
            L += f * sl[sp][g];
        }
        sM[g] = M;
        sL[g] = L;
    }
    __syncthreads();
    for (int i = threadIdx.x; i < G * D; i += blockDim.x) {
        int g = i / D, d = i % D;
        float A = 0.0f;
#pragma unroll 8
        for (unsigned sp = 0; sp < a.nsplit; sp++)
            A += sw[sp][g] * __ldcg(part + ((size_t)sp * G + g) * (D + 2) + d);
        size_t row = (size_t)b * H * G + hq0 + g;
        a.o[row * D + d] = A / sL[g];
        if (d == 0)
            a.lse[row] = (sM[g] + log2f(sL[g])) * 0.69314718055994531f;
    }
    if (threadIdx.x == 0)
        a.counters[bh] = 0;
}

typedef void (*step_fn)(step_args);

template <typename T, int D> static step_fn pick_g(unsigned g)
{
    switch (g) { /* every GQA group up to 8 (Llama-3 4, Qwen2 6-7, small models 3) */
    case 1: return step_kernel<T, D, 1>;
    case 2: return step_kernel<T, D, 2>;
    case 3: return step_kernel<T, D, 3>;
    case 4: return step_kernel<T, D, 4>;
    case 5: return step_kernel<T, D, 5>;
    case 6: return step_kernel<T, D, 6>;
    case 7: return step_kernel<T, D, 7>;
    case 8: return step_kernel<T, D, 8>;
    default: return NULL;
    }
}

static step_fn pick_step(ra_dtype t, unsigned d, unsigned g)
{
    if (t == RA_DTYPE_F16)
        return d == 64 ? pick_g<__half, 64>(g) : d == 128 ? pick_g<__half, 128>(g) : NULL;
    if (t == RA_DTYPE_BF16)
        return d == 64 ? pick_g<__nv_bfloat16, 64>(g)
                       : d == 128 ? pick_g<__nv_bfloat16, 128>(g) : NULL;
    return NULL;
}

/* ---- merge ---------------------------------------------------------------------------- */

__device__ __forceinline__ float ld_any(const void *p, size_t i, int t)
{
    if (t == RA_DTYPE_F16)
        return __half2float(((const __half *)p)[i]);
    if (t == RA_DTYPE_BF16)
        return __bfloat162float(((const __nv_bfloat16 *)p)[i]);
    return ((const float *)p)[i];
}

__device__ __forceinline__ void st_any(void *p, size_t i, int t, float x)
{
    if (t == RA_DTYPE_F16)
        ((__half *)p)[i] = __float2half_rn(x);
    else if (t == RA_DTYPE_BF16)
        ((__nv_bfloat16 *)p)[i] = __float2bfloat16_rn(x);
    else
        ((float *)p)[i] = x;
}

__global__ void merge_kernel(const float *oa, const float *la, const void *ob, int bt,
                             const float *lb, void *out, int ot, float *lse_out, size_t rows,
                             unsigned D)
{
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= rows * D)
        return;
    size_t r = i / D;
    float a = la[r], b = lb[r];
    float mx = fmaxf(a, b);
    float wa = 0.0f, wb = 0.0f, lse = -INFINITY;
    if (mx != -INFINITY) {
        wa = a == -INFINITY ? 0.0f : expf(a - mx);
        wb = b == -INFINITY ? 0.0f : expf(b - mx);
        float sum = wa + wb;
        lse = mx + logf(sum);
        wa /= sum;
        wb /= sum;
    }
    float x = 0.0f;
    if (wa != 0.0f)
        x += wa * oa[i];
    if (wb != 0.0f)
        x += wb * ld_any(ob, i, bt);
    st_any(out, i, ot, x);
    if (lse_out && i % D == 0)
        lse_out[r] = lse;
}

/* ---- prefill scatter / gather ------------------------------------------------------------ */

/* src [B][n_src][H][D]: source token i is token t = i < split ? i : i + gap. Tokens of the
 * sink and the window go to storage rows, the middle ones to mid [B][H][n_mid][D]. Moves
 * 16-byte units. */
__global__ void ingest_kernel(const uint4 *sk, const uint4 *sv, uint4 *K, uint4 *V, uint4 *mk,
                              uint4 *mv, unsigned B, unsigned n_src, unsigned split,
                              unsigned gap, unsigned H, unsigned upr, unsigned rows,
                              unsigned sink, unsigned window, unsigned w_first, unsigned n_mid)
{
    size_t total = (size_t)B * n_src * H * upr;
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < total;
         i += (size_t)gridDim.x * blockDim.x) {
        unsigned u = i % upr;
        size_t r = i / upr;
        unsigned h = r % H;
        size_t bt = r / H;
        unsigned ti = bt % n_src;
        unsigned b = bt / n_src;
        unsigned t = ti < split ? ti : ti + gap;
        size_t dst;
        uint4 *dk, *dv;
        if (t < sink || t >= w_first) {
            unsigned row = t < sink ? t : sink + (t - sink) % window;
            dst = (((size_t)b * H + h) * rows + row) * upr + u;
            dk = K;
            dv = V;
        } else {
            dst = (((size_t)b * H + h) * n_mid + (t - sink)) * upr + u;
            dk = mk;
            dv = mv;
        }
        dk[dst] = sk[i];
        dv[dst] = sv[i];
    }
}

/* ---- host side ---------------------------------------------------------------------------- */

static int g_probe = -1;

extern "C" int ra_gpu_cuda_probe(void)
{
    if (g_probe < 0) {
        int n = 0;
        g_probe = cudaGetDeviceCount(&n) == cudaSuccess && n > 0;
        if (!g_probe)
            cudaGetLastError();
    }
    return g_probe;
}

extern "C" void *ra_gpu_cuda_host_alloc(size_t bytes)
{
    if (!ra_gpu_cuda_probe())
        return NULL;
    void *p = NULL;
    if (cudaHostAlloc(&p, bytes, cudaHostAllocPortable | cudaHostAllocMapped) != cudaSuccess) {
        cudaGetLastError();
        return NULL;
    }
    return p;
}

extern "C" int ra_gpu_cuda_host_free(void *p)
{
    if (!ra_gpu_cuda_probe())
        return 0;
    cudaPointerAttributes a;
    if (cudaPointerGetAttributes(&a, p) != cudaSuccess) {
        cudaGetLastError();
        return 0;
    }
    if (a.type != cudaMemoryTypeHost)
        return 0;
    cudaFreeHost(p);
    return 1;
}

static int is_pinned(const void *p)
{
    cudaPointerAttributes a;
    if (cudaPointerGetAttributes(&a, p) != cudaSuccess) {
        cudaGetLastError();
        return 0;
    }
    return a.type == cudaMemoryTypeHost;
}

static void cuda_fini(ra_gpu_cache *c)
{
    cuda_impl *m = IMPL(c);
    if (!m)
        return;
    int ndev = 0;
    if (cudaGetDeviceCount(&ndev) == cudaSuccess && m->device >= 0 && m->device < ndev)
        cudaSetDevice(m->device);
    if (m->own)
        cudaStreamSynchronize(m->own);
    ra_gpu_cuda_graph_fini(c);
    if (m->blas)
        cublasDestroy(m->blas);
    cudaFree(m->k);
    cudaFree(m->v);
    cudaFree(m->ev_k);
    cudaFree(m->ev_v);
    cudaFree(m->part);
    cudaFree(m->counters);
    cudaFree(m->d_in);
    cudaFree(m->d_out);
    cudaFree(m->d_merge);
    cudaFree(m->scratch);
    cudaFreeHost(m->h_in);
    cudaFreeHost(m->h_out);
    cudaFreeHost(m->h_merge);
    for (int i = 0; i < 2; i++) {
        cudaFreeHost(m->bounce[i]);
        if (m->bounce_ev[i])
            cudaEventDestroy(m->bounce_ev[i]);
    }
    if (m->ev_off)
        for (unsigned l = 0; l < c->cfg.n_layers; l++)
            if (m->ev_off[l])
                cudaEventDestroy(m->ev_off[l]);
    free(m->ev_off);
    if (m->own)
        cudaStreamDestroy(m->own);
    cudaGetLastError();
    free(m);
    c->impl = NULL;
}

static size_t merge_rows(const ra_gpu_cache *c)
{
    return (size_t)c->cfg.batch * c->cfg.n_q_heads;
}

static ra_status cuda_init(ra_gpu_cache *c)
{
    ra_status s = RA_OK;
    int committed = 0;
    const ra_gpu_config *g = &c->cfg;
    if (!ra_gpu_cuda_probe())
        return ra_gpu_fail(c, RA_EDEVICE, "no CUDA device is present");
    if (g->dtype != RA_DTYPE_F16 && g->dtype != RA_DTYPE_BF16)
        return ra_gpu_fail(c, RA_ENOTSUP, "CUDA backend: dtype %s (f16/bf16 only)",
                           ra_dtype_name(g->dtype));
    if (!pick_step(g->dtype, g->head_dim, c->group))
        return ra_gpu_fail(c, RA_ENOTSUP,
                           "CUDA backend: head_dim %u / GQA group %u (64|128 and 1..8)",
                           g->head_dim, c->group);
    cuda_impl *m = (cuda_impl *)calloc(1, sizeof *m);
    if (!m)
        return RA_ENOMEM;
    c->impl = m;
    m->device = g->device;
    int ndev = 0;
    CK(cudaGetDeviceCount(&ndev));
    if (g->device < 0 || g->device >= ndev) {
        s = ra_gpu_fail(c, RA_EINVAL, "CUDA device %d of %d", g->device, ndev);
        goto fail;
    }
    CK(cudaSetDevice(m->device));
    {
        cudaDeviceProp p;
        CK(cudaGetDeviceProperties(&p, m->device));
        m->sms = p.multiProcessorCount;
        if (!p.unifiedAddressing) {
            s = ra_gpu_fail(c, RA_ENOTSUP, "CUDA device without unified addressing");
            goto fail;
        }
    }
    CK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(
        &m->step_occ, (const void *)pick_step(g->dtype, g->head_dim, c->group), NWARPS * 32, 0));
    if (m->step_occ < 1)
        m->step_occ = 1;
    CK(cudaStreamCreateWithFlags(&m->own, cudaStreamNonBlocking));
    m->cur = m->own;
    {
        size_t bytes = (size_t)g->n_layers * g->batch * g->n_kv_heads * c->rows * g->head_dim *
                       c->esize;
        size_t bh = (size_t)g->batch * g->n_kv_heads;
        CK(cudaMalloc(&m->k, bytes));
        CK(cudaMalloc(&m->v, bytes));
        size_t evb = (size_t)g->n_layers * g->batch * g->n_kv_heads * g->evict_capacity *
                     g->head_dim * c->esize;
        CK(cudaMalloc(&m->ev_k, evb));
        CK(cudaMalloc(&m->ev_v, evb));
        CK(cudaMalloc(&m->part, bh * MAX_SPLITS * c->group * (g->head_dim + 2) * sizeof(float)));
        CK(cudaMalloc(&m->counters, bh * sizeof(unsigned)));
        CK(cudaMemset(m->counters, 0, bh * sizeof(unsigned)));
        size_t R = merge_rows(c), D = g->head_dim;
        m->in_bytes = (R * D + 2 * bh * D) * c->esize + 64;
        m->out_bytes = R * D * sizeof(float) + R * sizeof(float) + 64;
        CK(cudaMalloc(&m->d_in, m->in_bytes));
        CK(cudaHostAlloc(&m->h_in, m->in_bytes, cudaHostAllocPortable));
        CK(cudaMalloc(&m->d_out, m->out_bytes));
        CK(cudaHostAlloc(&m->h_out, m->out_bytes, cudaHostAllocPortable));
        size_t mb = (4 * R * D + 4 * R) * sizeof(float) + 6 * 64;
        CK(cudaMalloc(&m->d_merge, mb));
        CK(cudaHostAlloc(&m->h_merge, mb, cudaHostAllocPortable));
    }
    m->ev_off = (cudaEvent_t *)calloc(g->n_layers, sizeof(cudaEvent_t));
    if (!m->ev_off) {
        s = RA_ENOMEM;
        goto fail;
    }
    for (unsigned l = 0; l < g->n_layers; l++) {
        CK(cudaEventCreateWithFlags(&m->ev_off[l], cudaEventDisableTiming));
    }
    CK(cudaStreamSynchronize(m->own));
    return RA_OK;
fail:
    cuda_fini(c);
    return s;
}

static ra_status grow_scratch(ra_gpu_cache *c, size_t bytes)
{
    ra_status s = RA_OK;
    int committed = 0;
    cuda_impl *m = IMPL(c);
    if (m->scratch_bytes >= bytes)
        return RA_OK;
    CK(cudaStreamSynchronize(m->cur)); /* the old scratch may still be in use */
    cudaFree(m->scratch);
    m->scratch = NULL;
    m->scratch_bytes = 0;
    CK(cudaMalloc(&m->scratch, bytes));
    m->scratch_bytes = bytes;
    return RA_OK;
fail:
    return s;
}

/* host -> device copy on the current stream: direct DMA from pinned memory, else through
 * two pinned bounce buffers (host memcpy of one chunk overlaps the DMA of the other) */
static ra_status h2d(ra_gpu_cache *c, void *dst, const void *src, size_t bytes)
{
    ra_status s = RA_OK;
    int committed = 0;
    cuda_impl *m = IMPL(c);
    if (is_pinned(src)) {
        CK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyHostToDevice, m->cur));
        return RA_OK;
    }
    for (int i = 0; i < 2; i++)
        if (!m->bounce[i]) {
            CK(cudaHostAlloc(&m->bounce[i], BOUNCE_BYTES, cudaHostAllocPortable));
            CK(cudaEventCreateWithFlags(&m->bounce_ev[i], cudaEventDisableTiming));
            CK(cudaEventRecord(m->bounce_ev[i], m->cur));
        }
    for (size_t off = 0, i = 0; off < bytes; off += BOUNCE_BYTES, i ^= 1) {
        size_t n = bytes - off < BOUNCE_BYTES ? bytes - off : BOUNCE_BYTES;
        CK(cudaEventSynchronize(m->bounce_ev[i]));
        memcpy(m->bounce[i], (const char *)src + off, n);
        CK(cudaMemcpyAsync((char *)dst + off, m->bounce[i], n, cudaMemcpyHostToDevice, m->cur));
        CK(cudaEventRecord(m->bounce_ev[i], m->cur));
    }
    return RA_OK;
fail:
    return s;
}

static ra_status cuda_check_dev(ra_gpu_cache *c, const void *p, const char *what)
{
    cudaPointerAttributes a;
    cudaError_t e = cudaPointerGetAttributes(&a, p);
    if (e != cudaSuccess) {
        cudaGetLastError();
        return ra_gpu_fail(c, RA_EINVAL, "%s: not a CUDA pointer (%s)", what, err_name(e));
    }
    if ((a.type != cudaMemoryTypeDevice && a.type != cudaMemoryTypeManaged) ||
        a.device != IMPL(c)->device)
        return ra_gpu_fail(c, RA_EINVAL, "%s is not device memory of CUDA device %d", what,
                           IMPL(c)->device);
    return RA_OK;
}

static size_t layer_elems(const ra_gpu_cache *c)
{
    return (size_t)c->cfg.batch * c->cfg.n_kv_heads * c->rows * c->cfg.head_dim;
}

static ra_status cuda_ingest(ra_gpu_cache *c, unsigned layer, ra_gpu_mem mem, const void *k,
                             const void *v, unsigned n, unsigned n_mid)
{
    ra_status s = RA_OK;
    int committed = 0;
    cuda_impl *m = IMPL(c);
    ra_gpu_layer *L = &c->layers[layer];
    const ra_gpu_config *g = &c->cfg;
    unsigned sink = g->sink, w = g->window, H = g->n_kv_heads, B = g->batch;
    size_t rowb = (size_t)g->head_dim * c->esize;
    unsigned w_first = n > w ? n - w : 0;
    if (w_first < sink)
        w_first = sink;
    size_t mid_bytes = (size_t)B * H * n_mid * rowb;
    const void *sk = k, *sv = v;
    unsigned n_src = n, split = n, gap = 0;
    char *base;
    CK(cudaSetDevice(m->device));
    if (mem == RA_GPU_MEM_HOST) {
        /* the middle is repacked on the host; only sink + window rows cross PCIe */
        unsigned s0 = n < sink ? n : sink;
        unsigned n_win = n > w_first ? n - w_first : 0; /* n <= sink: no window tokens */
        unsigned n_keep = s0 + n_win;
        size_t keep_bytes = (size_t)B * n_keep * H * rowb;
        CK(cudaStreamSynchronize(m->cur)); /* the staging buffer may be read by a copy */
        for (unsigned b = 0; b < B; b++)
            for (unsigned t = sink; t < w_first; t++)
                for (unsigned h = 0; h < H; h++) {
                    size_t src = (((size_t)b * n + t) * H + h) * rowb;
                    size_t dst = (((size_t)b * H + h) * n_mid + (t - sink)) * rowb;
                    memcpy((char *)L->off_k + dst, (const char *)k + src, rowb);
                    memcpy((char *)L->off_v + dst, (const char *)v + src, rowb);
                }
        s = grow_scratch(c, 2 * keep_bytes);
        if (s != RA_OK)
            return s;
        base = (char *)m->scratch;
        size_t tok = (size_t)H * rowb;
        /* per sequence: [0, s0) and [w_first, n), both contiguous in token-major input */
        for (unsigned b = 0; b < B; b++) {
            const char *kb = (const char *)k + (size_t)b * n * tok;
            const char *vb = (const char *)v + (size_t)b * n * tok;
            char *dk = base + (size_t)b * n_keep * tok;
            char *dv = base + keep_bytes + (size_t)b * n_keep * tok;
            if (n_keep == n) {
                if ((s = h2d(c, dk, kb, n * tok)) || (s = h2d(c, dv, vb, n * tok)))
                    return s;
                continue;
            }
            if ((s = h2d(c, dk, kb, s0 * tok)) || (s = h2d(c, dv, vb, s0 * tok)))
                return s;
            if (n_win && ((s = h2d(c, dk + s0 * tok, kb + (size_t)w_first * tok, n_win * tok)) ||
                          (s = h2d(c, dv + s0 * tok, vb + (size_t)w_first * tok, n_win * tok))))
                return s;
        }
        sk = base;
        sv = base + keep_bytes;
        n_src = n_keep;
        split = s0;
        gap = w_first - s0;
        n_mid = 0; /* nothing left for the device to gather */
    } else if (n_mid) {
        s = grow_scratch(c, 2 * mid_bytes);
        if (s != RA_OK)
            return s;
    }
    {
        unsigned upr = (unsigned)(rowb / 16);
        size_t units = (size_t)B * n_src * H * upr;
        unsigned blocks = (unsigned)((units + 255) / 256);
        if (blocks > 8u * m->sms)
            blocks = 8u * m->sms;
        if (blocks == 0)
            blocks = 1;
        char *K = (char *)m->k + layer * layer_elems(c) * c->esize;
        char *V = (char *)m->v + layer * layer_elems(c) * c->esize;
        uint4 *mk = n_mid ? (uint4 *)m->scratch : NULL;
        uint4 *mv = n_mid ? (uint4 *)((char *)m->scratch + mid_bytes) : NULL;
        ingest_kernel<<<blocks, 256, 0, m->cur>>>((const uint4 *)sk, (const uint4 *)sv,
                                                  (uint4 *)K, (uint4 *)V, mk, mv, B, n_src,
                                                  split, gap, H, upr, (unsigned)c->rows, sink, w,
                                                  w_first, n_mid);
        CK(cudaGetLastError());
        committed = 1;
        if (n_mid) {
            CK(cudaMemcpyAsync(L->off_k, mk, mid_bytes, cudaMemcpyDeviceToHost, m->cur));
            CK(cudaMemcpyAsync(L->off_v, mv, mid_bytes, cudaMemcpyDeviceToHost, m->cur));
        }
        CK(cudaEventRecord(m->ev_off[layer], m->cur));
        if (mem == RA_GPU_MEM_HOST)
            CK(cudaStreamSynchronize(m->cur));
    }
    return RA_OK;
fail:
    return s;
}

static unsigned pick_splits(const ra_gpu_cache *c, unsigned n_local)
{
    unsigned bh = c->cfg.batch * c->cfg.n_kv_heads;
    /* one wave: as many blocks as fit on the chip at once, never a second wave */
    unsigned want = (unsigned)(IMPL(c)->step_occ * IMPL(c)->sms) / bh;
    unsigned most = (n_local + 31) / 32; /* at least 32 rows a split */
    if (want > most)
        want = most;
    if (want > MAX_SPLITS)
        want = MAX_SPLITS;
    return want ? want : 1;
}

static ra_status cuda_step(ra_gpu_cache *c, unsigned layer, const ra_gpu_step_plan *p,
                           ra_gpu_mem mem, const void *q, const void *kn, const void *vn,
                           float *o, float *lse)
{
    ra_status s = RA_OK;
    int committed = 0;
    cuda_impl *m = IMPL(c);
    const ra_gpu_config *g = &c->cfg;
    size_t R = merge_rows(c), D = g->head_dim, bh = (size_t)g->batch * g->n_kv_heads;
    size_t qb = R * D * c->esize, kb = bh * D * c->esize;
    float *dout_o = o, *dout_l = lse;
    if (mem == RA_GPU_MEM_HOST) {
        /* one packed H2D and one packed D2H: three tiny copies would cost three latencies */
        char *hi = (char *)m->h_in, *di = (char *)m->d_in;
        size_t kofs = (qb + 15) & ~(size_t)15, vofs = kofs + ((kb + 15) & ~(size_t)15);
        memcpy(hi, q, qb);
        memcpy(hi + kofs, kn, kb);
        memcpy(hi + vofs, vn, kb);
        CK(cudaMemcpyAsync(di, hi, vofs + kb, cudaMemcpyHostToDevice, m->cur));
        q = di;
        kn = di + kofs;
        vn = di + vofs;
        dout_o = (float *)m->d_out;
        dout_l = (float *)((char *)m->d_out + R * D * sizeof(float));
    }
    {
        step_args a;
        a.q = q;
        a.kn = kn;
        a.vn = vn;
        a.K = (char *)m->k + layer * layer_elems(c) * c->esize;
        a.V = (char *)m->v + layer * layer_elems(c) * c->esize;
        size_t evl = (size_t)g->batch * g->n_kv_heads * g->evict_capacity * D * c->esize;
        a.ev_k = (char *)m->ev_k + layer * evl;
        a.ev_v = (char *)m->ev_v + layer * evl;
        a.o = dout_o;
        a.lse = dout_l;
        a.part = m->part;
        a.counters = m->counters;
        a.rows = (unsigned)c->rows;
        a.n_local = p->n_local;
        a.new_row = p->row;
        a.evict = (unsigned)p->evict;
        a.ev_slot = p->ev_slot;
        a.ev_cap = g->evict_capacity;
        a.nsplit = pick_splits(c, p->n_local);
        a.chunk = (p->n_local + a.nsplit - 1) / a.nsplit;
        a.scale_log2 = g->scale * 1.4426950408889634f;
        dim3 grid(a.nsplit, g->n_kv_heads, g->batch);
        step_fn fn = pick_step(g->dtype, g->head_dim, c->group);
        fn<<<grid, NWARPS * 32, 0, m->cur>>>(a);
        CK(cudaGetLastError());
    }
    committed = 1; /* the kernel appended: from here a failure breaks the cache */
    if (mem == RA_GPU_MEM_HOST) {
        CK(cudaMemcpyAsync(m->h_out, m->d_out, R * D * sizeof(float) + R * sizeof(float),
                           cudaMemcpyDeviceToHost, m->cur));
        CK(cudaStreamSynchronize(m->cur));
        memcpy(o, m->h_out, R * D * sizeof(float));
        memcpy(lse, (char *)m->h_out + R * D * sizeof(float), R * sizeof(float));
    }
    return RA_OK;
fail:
    return s;
}

static ra_status cuda_merge(ra_gpu_cache *c, ra_gpu_mem mem, const float *oa, const float *la,
                            const void *ob, ra_dtype bt, const float *lb, void *out,
                            ra_dtype ot, float *lse_out)
{
    ra_status s = RA_OK;
    int committed = 0;
    cuda_impl *m = IMPL(c);
    size_t R = merge_rows(c), D = c->cfg.head_dim;
    size_t fo = R * D * sizeof(float), fl = R * sizeof(float);
    size_t ob_bytes = R * D * ra_dtype_size(bt), out_bytes = R * D * ra_dtype_size(ot);
    void *d_out = out;
    float *d_lse = lse_out;
    char *hm = (char *)m->h_merge, *dm = (char *)m->d_merge;
    size_t o_la = fo, o_ob = o_la + ((fl + 63) & ~(size_t)63), o_lb = o_ob + ((fo + 63) & ~63);
    size_t o_out = o_lb + ((fl + 63) & ~(size_t)63), o_lo = o_out + ((fo + 63) & ~(size_t)63);
    if (mem == RA_GPU_MEM_HOST) {
        memcpy(hm, oa, fo);
        memcpy(hm + o_la, la, fl);
        memcpy(hm + o_ob, ob, ob_bytes);
        memcpy(hm + o_lb, lb, fl);
        CK(cudaMemcpyAsync(dm, hm, o_lb + fl, cudaMemcpyHostToDevice, m->cur));
        oa = (const float *)dm;
        la = (const float *)(dm + o_la);
        ob = dm + o_ob;
        lb = (const float *)(dm + o_lb);
        d_out = dm + o_out;
        d_lse = lse_out ? (float *)(dm + o_lo) : NULL;
    }
    {
        size_t n = R * D;
        merge_kernel<<<(unsigned)((n + 255) / 256), 256, 0, m->cur>>>(oa, la, ob, (int)bt, lb,
                                                                      d_out, (int)ot, d_lse, R,
                                                                      (unsigned)D);
        CK(cudaGetLastError());
    }
    if (mem == RA_GPU_MEM_HOST) {
        CK(cudaMemcpyAsync(hm + o_out, dm + o_out, o_lo + fl - o_out, cudaMemcpyDeviceToHost,
                           m->cur));
        CK(cudaStreamSynchronize(m->cur));
        memcpy(out, hm + o_out, out_bytes);
        if (lse_out)
            memcpy(lse_out, hm + o_lo, fl);
    }
    return RA_OK;
fail:
    return s;
}

static ra_status cuda_knn(ra_gpu_cache *c, ra_gpu_mem mem, ra_dtype t, const void *qs, size_t nq,
                          const void *keys, size_t nk, unsigned dim, unsigned k, int32_t *ids,
                          float *scores)
{
    ra_status s = RA_OK;
    int committed = 0;
    cuda_impl *m = IMPL(c);
    size_t es = ra_dtype_size(t);
    size_t qbytes = nq * dim * es, kbytes = nk * dim * es;
    size_t obytes = nq * k * (sizeof(int32_t) + sizeof(float));
    /* query chunk: its score block at most 512 MiB */
    size_t qc = ((size_t)512 << 20) / (nk * sizeof(float));
    if (qc < 1)
        qc = 1;
    if (qc > nq)
        qc = nq;
    size_t sbytes = qc * nk * sizeof(float);
    size_t in_bytes = mem == RA_GPU_MEM_HOST ? ((qbytes + 255) & ~(size_t)255) +
                                                   ((kbytes + 255) & ~(size_t)255) +
                                                   ((obytes + 255) & ~(size_t)255)
                                             : 0;
    CK(cudaSetDevice(m->device));
    s = grow_scratch(c, sbytes + in_bytes);
    if (s != RA_OK)
        return s;
    {
        char *base = (char *)m->scratch;
        float *sc = (float *)base;
        const void *dq = qs, *dk = keys;
        int32_t *d_ids = ids;
        float *d_sc = scores;
        if (mem == RA_GPU_MEM_HOST) {
            char *p = base + sbytes;
            if ((s = h2d(c, p, qs, qbytes)) != RA_OK)
                return s;
            dq = p;
            p += (qbytes + 255) & ~(size_t)255;
            if ((s = h2d(c, p, keys, kbytes)) != RA_OK)
                return s;
            dk = p;
            p += (kbytes + 255) & ~(size_t)255;
            d_ids = (int32_t *)p;
            d_sc = (float *)(p + nq * k * sizeof(int32_t));
        }
        if (!m->blas) {
            CKB(cublasCreate(&m->blas));
        }
        CKB(cublasSetStream(m->blas, m->cur));
        const float one = 1.0f, zero = 0.0f;
        for (size_t q0 = 0; q0 < nq; q0 += qc) {
            size_t n = nq - q0 < qc ? nq - q0 : qc;
            /* column-major: S (nk x n) = K^T (nk x dim) * Q (dim x n); row-major S[q][key] */
            CKB(cublasGemmEx(m->blas, CUBLAS_OP_T, CUBLAS_OP_N, (int)nk, (int)n, (int)dim, &one,
                             dk, blas_type(t), (int)dim, (const char *)dq + q0 * dim * es,
                             blas_type(t), (int)dim, &zero, sc, CUDA_R_32F, (int)nk,
                             CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
            topk_kernel<<<(unsigned)n, TOPK_THREADS, 0, m->cur>>>(sc, nk, k, d_ids, d_sc, q0);
            CK(cudaGetLastError());
        }
        if (mem == RA_GPU_MEM_HOST) {
            CK(cudaMemcpyAsync(ids, d_ids, nq * k * sizeof(int32_t), cudaMemcpyDeviceToHost,
                               m->cur));
            CK(cudaMemcpyAsync(scores, d_sc, nq * k * sizeof(float), cudaMemcpyDeviceToHost,
                               m->cur));
        }
        CK(cudaStreamSynchronize(m->cur));
    }
    return RA_OK;
fail:
    return s;
}

static ra_status cuda_wait_offload(ra_gpu_cache *c, unsigned layer)
{
    ra_status s = RA_OK;
    int committed = 1; /* an asynchronous fault: device state is unknown */
    CK(cudaEventSynchronize(IMPL(c)->ev_off[layer]));
    return RA_OK;
fail:
    return s;
}

/* one strided copy both compacts the ring's [.][cap][D] blocks to [.][n][D] and brings
 * them to the pinned host stage; waits on the cache's stream only */
static ra_status cuda_fetch_evicted(ra_gpu_cache *c, unsigned layer, unsigned n)
{
    ra_status s = RA_OK;
    int committed = 1; /* a fault here is asynchronous: device state is unknown */
    cuda_impl *m = IMPL(c);
    const ra_gpu_config *g = &c->cfg;
    ra_gpu_layer *L = &c->layers[layer];
    size_t rowb = (size_t)g->head_dim * c->esize, cap = g->evict_capacity;
    size_t blocks = (size_t)g->batch * g->n_kv_heads;
    size_t evl = blocks * cap * rowb;
    CK(cudaMemcpy2DAsync(L->ev_k, n * rowb, (char *)m->ev_k + layer * evl, cap * rowb, n * rowb,
                         blocks, cudaMemcpyDeviceToHost, m->cur));
    CK(cudaMemcpy2DAsync(L->ev_v, n * rowb, (char *)m->ev_v + layer * evl, cap * rowb, n * rowb,
                         blocks, cudaMemcpyDeviceToHost, m->cur));
    CK(cudaStreamSynchronize(m->cur));
    return RA_OK;
fail:
    return s;
}

static ra_status cuda_sync(ra_gpu_cache *c)
{
    ra_status s = RA_OK;
    int committed = 1;
    CK(cudaStreamSynchronize(IMPL(c)->cur));
    return RA_OK;
fail:
    return s;
}

static ra_status cuda_set_stream(ra_gpu_cache *c, void *stream)
{
    ra_status s = RA_OK;
    int committed = 0;
    cuda_impl *m = IMPL(c);
    cudaStream_t next = stream ? (cudaStream_t)stream : m->own;
    if (next == m->cur)
        return RA_OK;
    /* order: the new stream waits for what the old one still has in flight */
    {
        cudaEvent_t e;
        CK(cudaEventCreateWithFlags(&e, cudaEventDisableTiming));
        cudaError_t r1 = cudaEventRecord(e, m->cur);
        cudaError_t r2 = r1 == cudaSuccess ? cudaStreamWaitEvent(next, e, 0) : r1;
        cudaEventDestroy(e);
        CK(r2);
    }
    m->cur = next;
    return RA_OK;
fail:
    return s;
}

static void *cuda_stream(const ra_gpu_cache *c)
{
    return IMPL(c) ? (void *)IMPL(c)->cur : NULL;
}

extern "C" const ra_gpu_ops ra_gpu_cuda_ops = {
    "cuda",
    cuda_init,
    cuda_fini,
    cuda_ingest,
    cuda_step,
    cuda_merge,
    cuda_knn,
    cuda_wait_offload,
    cuda_fetch_evicted,
    cuda_sync,
    cuda_set_stream,
    cuda_stream,
    cuda_check_dev,
    ra_gpu_cuda_graph_rows,
    ra_gpu_cuda_graph_lanes,
};
