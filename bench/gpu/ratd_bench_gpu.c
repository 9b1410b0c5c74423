/* ratd-bench-gpu: the figures of gpu/ (issue 5). Per-layer attend_local + merge for the
 * Llama-3-8B attention shape (32 query / 8 KV heads, dim 128, sink 128 + window 512) at
 * batch 1 and 8, through the device-pointer API (what a GPU decoder uses; pipelined over
 * the layers of a step, and as a single synchronous layer) and the host-pointer API (what
 * a CPU decoder uses); the GPU kNN of an index build (4096 queries x 131072 keys x 128);
 * and the bandwidth of the staging paths (prefill middle tokens device -> pinned host,
 * sink+window host -> device) against plain pinned cudaMemcpyAsync in the same run.
 * Without a CUDA device it times the CPU backend instead. --json: one object per line. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#ifdef RA_HAVE_CUDA
#include <cuda_runtime_api.h>
#endif

#include "ra_half.h"
#include "ratd/gpu.h"

static int g_json;

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static int cmp_d(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

static double median(double *v, int n)
{
    qsort(v, (size_t)n, sizeof *v, cmp_d);
    return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

#define DIE(...)                                                                          \
    do {                                                                                  \
        fprintf(stderr, "ratd-bench-gpu: " __VA_ARGS__);                                  \
        fprintf(stderr, "\n");                                                            \
        exit(1);                                                                          \
    } while (0)

#define TRY(call)                                                                         \
    do {                                                                                  \
        ra_status s_ = (call);                                                            \
        if (s_ != RA_OK)                                                                  \
            DIE("%s: %s (%s)", #call, ra_strerror(s_), c ? ra_gpu_cache_last_error(c) : ""); \
    } while (0)

#ifdef RA_HAVE_CUDA
#define CU(call)                                                                          \
    do {                                                                                  \
        cudaError_t e_ = (call);                                                          \
        if (e_ != cudaSuccess)                                                            \
            DIE("%s: %s", #call, cudaGetErrorString(e_));                                 \
    } while (0)
#endif

static void fill_bf16(uint16_t *p, size_t n, uint64_t *s)
{
    for (size_t i = 0; i < n; i++) {
        *s ^= *s << 13;
        *s ^= *s >> 7;
        *s ^= *s << 17;
        float x = ((float)(*s >> 40) / (float)(1 << 24) - 0.5f) * 3.0f;
        p[i] = ra_f32_to_bf16(x);
    }
}

/* ---- attend_local + merge ------------------------------------------------------------- */

typedef struct attend_result {
    double pipelined_us; /* per layer, layers enqueued back to back, one sync per block */
    double single_us;    /* one layer: enqueue + wait */
    double host_us;      /* host-pointer API, per layer */
    double attend_only_us, merge_only_us; /* pipelined, each call alone (device API) */
} attend_result;

static void bench_attend(ra_gpu_backend be, unsigned batch, int skip_check, int reps,
                         attend_result *res)
{
    const unsigned L = 32, Hq = 32, H = 8, D = 128, sink = 128, W = 512, n0 = 2048, blk = 32;
    ra_gpu_config cfg;
    ra_gpu_config_init(&cfg);
    cfg.n_layers = L;
    cfg.n_q_heads = Hq;
    cfg.n_kv_heads = H;
    cfg.head_dim = D;
    cfg.dtype = RA_DTYPE_BF16;
    cfg.sink = sink;
    cfg.window = W;
    cfg.batch = batch;
    cfg.backend = be;
    cfg.evict_capacity = blk + 1;
    cfg.skip_pointer_check = skip_check;
    ra_gpu_cache *c = NULL;
    TRY(ra_gpu_cache_create(&cfg, &c));
    int dev = ra_gpu_cache_backend(c) == RA_GPU_BACKEND_CUDA;
    uint64_t s = 42;
    size_t pre = (size_t)batch * n0 * H * D, qn = (size_t)batch * Hq * D, kn = (size_t)batch * H * D;
    uint16_t *pk = malloc(pre * 2), *pv = malloc(pre * 2);
    uint16_t *q = ra_gpu_host_alloc(qn * 2 * blk), *k = ra_gpu_host_alloc(kn * 2 * blk),
             *v = ra_gpu_host_alloc(kn * 2 * blk);
    float *o = ra_gpu_host_alloc(qn * 4), *lse = ra_gpu_host_alloc((size_t)batch * Hq * 4);
    float *orem = ra_gpu_host_alloc(qn * 4), *lrem = ra_gpu_host_alloc((size_t)batch * Hq * 4);
    if (!pk || !pv || !q || !k || !v || !o || !lse || !orem || !lrem)
        DIE("out of memory");
    fill_bf16(pk, pre, &s);
    fill_bf16(pv, pre, &s);
    fill_bf16(q, qn * blk, &s);
    fill_bf16(k, kn * blk, &s);
    fill_bf16(v, kn * blk, &s);
    for (size_t i = 0; i < qn; i++)
        orem[i] = 0.01f * (float)(i % 97);
    for (size_t i = 0; i < (size_t)batch * Hq; i++)
        lrem[i] = 3.0f;
    for (unsigned l = 0; l < L; l++) {
        TRY(ra_gpu_ingest_prefill(c, l, RA_GPU_MEM_HOST, pk, pv, n0));
        TRY(ra_gpu_cache_offload_release(c, l));
    }
    ra_gpu_mem mem = dev ? RA_GPU_MEM_DEVICE : RA_GPU_MEM_HOST;
    void *dq = q, *dk = k, *dv = v, *dbuf __attribute__((unused)) = NULL;
    float *d_o = o, *d_l = lse, *d_orem = orem, *d_lrem = lrem;
#ifdef RA_HAVE_CUDA
    if (dev) {
        size_t tot = (qn + 2 * kn) * 2 * blk + 2 * qn * 4 + 2 * (size_t)batch * Hq * 4 + 1024;
        CU(cudaMalloc(&dbuf, tot));
        char *p = dbuf;
        dq = p;
        p += qn * 2 * blk;
        dk = p;
        p += kn * 2 * blk;
        dv = p;
        p += kn * 2 * blk;
        d_o = (float *)p;
        p += qn * 4;
        d_orem = (float *)p;
        p += qn * 4;
        d_l = (float *)p;
        p += ((size_t)batch * Hq * 4 + 255) & ~(size_t)255;
        d_lrem = (float *)p;
        CU(cudaMemcpy(dq, q, qn * 2 * blk, cudaMemcpyHostToDevice));
        CU(cudaMemcpy(dk, k, kn * 2 * blk, cudaMemcpyHostToDevice));
        CU(cudaMemcpy(dv, v, kn * 2 * blk, cudaMemcpyHostToDevice));
        CU(cudaMemcpy(d_orem, orem, qn * 4, cudaMemcpyHostToDevice));
        CU(cudaMemcpy(d_lrem, lrem, (size_t)batch * Hq * 4, cudaMemcpyHostToDevice));
    }
#endif
    int nblocks = dev ? reps : 1;
    unsigned steps_per_block = dev ? blk : 2;
    double *t = malloc(sizeof(double) * (size_t)(nblocks + 1));
    /* pipelined: a block of decode steps over all layers, one sync at the end */
    for (int r = -1; r < nblocks; r++) { /* r = -1: warm-up */
        double t0 = now_s();
        for (unsigned st = 0; st < steps_per_block; st++)
            for (unsigned l = 0; l < L; l++) {
                TRY(ra_gpu_attend_local(c, l, mem, (char *)dq + st * qn * 2,
                                        (char *)dk + st * kn * 2, (char *)dv + st * kn * 2, d_o,
                                        d_l));
                TRY(ra_gpu_merge(c, mem, d_o, d_l, d_orem, RA_DTYPE_F32, d_lrem, d_o,
                                 RA_DTYPE_F32, NULL));
            }
        TRY(ra_gpu_cache_sync(c));
        double dt = now_s() - t0;
        if (r >= 0)
            t[r] = dt / (steps_per_block * L) * 1e6;
        for (unsigned l = 0; l < L; l++) { /* drain evictions, untimed */
            ra_gpu_staged sv;
            TRY(ra_gpu_cache_evicted_view(c, l, &sv));
            TRY(ra_gpu_cache_evicted_release(c, l));
        }
    }
    res->pipelined_us = median(t, nblocks);
    res->attend_only_us = res->merge_only_us = NAN;
    if (dev) { /* the two calls apart: which one costs what */
        for (int part = 0; part < 2; part++) {
            for (int r = -1; r < nblocks; r++) {
                double t0 = now_s();
                for (unsigned st = 0; st < steps_per_block; st++)
                    for (unsigned l = 0; l < L; l++) {
                        if (part == 0)
                            TRY(ra_gpu_attend_local(c, l, mem, (char *)dq + st * qn * 2,
                                                    (char *)dk + st * kn * 2,
                                                    (char *)dv + st * kn * 2, d_o, d_l));
                        else
                            TRY(ra_gpu_merge(c, mem, d_o, d_l, d_orem, RA_DTYPE_F32, d_lrem, d_o,
                                             RA_DTYPE_F32, NULL));
                    }
                TRY(ra_gpu_cache_sync(c));
                double dt = now_s() - t0;
                if (r >= 0)
                    t[r] = dt / (steps_per_block * L) * 1e6;
                for (unsigned l = 0; l < L; l++) {
                    ra_gpu_staged sv;
                    TRY(ra_gpu_cache_evicted_view(c, l, &sv));
                    TRY(ra_gpu_cache_evicted_release(c, l));
                }
            }
            if (part == 0)
                res->attend_only_us = median(t, nblocks);
            else
                res->merge_only_us = median(t, nblocks);
        }
    }
    /* single layer, synchronous */
    if (dev) {
        int n = 0;
        double *u = malloc(sizeof(double) * blk * 4);
        for (unsigned st = 0; st < blk; st++)
            for (unsigned l = 0; l < 4; l++) {
                double t0 = now_s();
                TRY(ra_gpu_attend_local(c, l, mem, (char *)dq + st * qn * 2,
                                        (char *)dk + st * kn * 2, (char *)dv + st * kn * 2, d_o,
                                        d_l));
                TRY(ra_gpu_merge(c, mem, d_o, d_l, d_orem, RA_DTYPE_F32, d_lrem, d_o,
                                 RA_DTYPE_F32, NULL));
                TRY(ra_gpu_cache_sync(c));
                u[n++] = (now_s() - t0) * 1e6;
            }
        res->single_us = median(u, n);
        free(u);
        for (unsigned l = 0; l < L; l++) {
            ra_gpu_staged sv;
            TRY(ra_gpu_cache_evicted_view(c, l, &sv));
            TRY(ra_gpu_cache_evicted_release(c, l));
        }
    } else {
        res->single_us = res->pipelined_us;
    }
    /* host-pointer API (pinned buffers), per layer */
    {
        int n = 0;
        unsigned steps = dev ? 8 : 1;
        double *u = malloc(sizeof(double) * steps * L);
        for (unsigned st = 0; st < steps; st++)
            for (unsigned l = 0; l < L; l++) {
                double t0 = now_s();
                TRY(ra_gpu_attend_local(c, l, RA_GPU_MEM_HOST, q + st * qn, k + st * kn,
                                        v + st * kn, o, lse));
                TRY(ra_gpu_merge(c, RA_GPU_MEM_HOST, o, lse, orem, RA_DTYPE_F32, lrem, o,
                                 RA_DTYPE_F32, NULL));
                u[n++] = (now_s() - t0) * 1e6;
            }
        res->host_us = median(u, n);
        free(u);
    }
#ifdef RA_HAVE_CUDA
    if (dbuf)
        cudaFree(dbuf);
#endif
    free(t);
    free(pk);
    free(pv);
    ra_gpu_host_free(q);
    ra_gpu_host_free(k);
    ra_gpu_host_free(v);
    ra_gpu_host_free(o);
    ra_gpu_host_free(lse);
    ra_gpu_host_free(orem);
    ra_gpu_host_free(lrem);
    ra_gpu_cache_destroy(c);
}

/* ---- kNN ------------------------------------------------------------------------------ */

static double bench_knn(size_t nq, size_t nk, unsigned dim, unsigned k, int reps)
{
#ifdef RA_HAVE_CUDA
    ra_gpu_config cfg;
    ra_gpu_config_init(&cfg);
    cfg.n_layers = 1;
    cfg.n_q_heads = cfg.n_kv_heads = 1;
    cfg.head_dim = 128;
    cfg.window = 1;
    cfg.batch = 1;
    cfg.backend = RA_GPU_BACKEND_CUDA;
    ra_gpu_cache *c = NULL;
    TRY(ra_gpu_cache_create(&cfg, &c));
    uint64_t s = 7;
    uint16_t *hq = malloc(nq * dim * 2), *hk = malloc(nk * dim * 2);
    fill_bf16(hq, nq * dim, &s);
    fill_bf16(hk, nk * dim, &s);
    void *dq, *dk, *di, *ds;
    CU(cudaMalloc(&dq, nq * dim * 2));
    CU(cudaMalloc(&dk, nk * dim * 2));
    CU(cudaMalloc(&di, nq * k * 4));
    CU(cudaMalloc(&ds, nq * k * 4));
    CU(cudaMemcpy(dq, hq, nq * dim * 2, cudaMemcpyHostToDevice));
    CU(cudaMemcpy(dk, hk, nk * dim * 2, cudaMemcpyHostToDevice));
    double *t = malloc(sizeof(double) * (size_t)reps);
    for (int r = -1; r < reps; r++) {
        double t0 = now_s();
        TRY(ra_gpu_knn(c, RA_GPU_MEM_DEVICE, RA_DTYPE_BF16, dq, nq, dk, nk, dim, k, di, ds));
        if (r >= 0)
            t[r] = (now_s() - t0) * 1e3;
    }
    double ms = median(t, reps);
    free(t);
    cudaFree(dq);
    cudaFree(dk);
    cudaFree(di);
    cudaFree(ds);
    free(hq);
    free(hk);
    ra_gpu_cache_destroy(c);
    return ms;
#else
    return NAN;
#endif
}

/* ---- staging bandwidth ---------------------------------------------------------------- */

typedef struct stage_result {
    double d2h_stage, d2h_plain, h2d_stage, h2d_plain, h2d_bounce; /* GB/s */
    double d2h_bytes, h2d_bytes;
} stage_result;

static void bench_staging(int reps, stage_result *res)
{
#ifdef RA_HAVE_CUDA
    const unsigned H = 8, D = 128;
    double *t = malloc(sizeof(double) * (size_t)reps);
    /* D2H: device prefill of 128 + 131072 + 512 tokens; the middle goes to pinned host */
    {
        ra_gpu_config cfg;
        ra_gpu_config_init(&cfg);
        cfg.n_layers = 1;
        cfg.n_q_heads = 32;
        cfg.n_kv_heads = H;
        cfg.head_dim = D;
        cfg.dtype = RA_DTYPE_BF16;
        cfg.sink = 128;
        cfg.window = 512;
        cfg.batch = 1;
        cfg.backend = RA_GPU_BACKEND_CUDA;
        ra_gpu_cache *c = NULL;
        TRY(ra_gpu_cache_create(&cfg, &c));
        unsigned n = 128 + 131072 + 512;
        size_t bytes = (size_t)n * H * D * 2;
        size_t mid = (size_t)131072 * H * D * 2;
        void *dk, *dv;
        CU(cudaMalloc(&dk, bytes));
        CU(cudaMalloc(&dv, bytes));
        CU(cudaMemset(dk, 0x3c, bytes));
        CU(cudaMemset(dv, 0x3c, bytes));
        for (int r = -1; r < reps; r++) {
            TRY(ra_gpu_cache_reset(c));
            double t0 = now_s();
            TRY(ra_gpu_ingest_prefill(c, 0, RA_GPU_MEM_DEVICE, dk, dv, n));
            ra_gpu_staged sv;
            TRY(ra_gpu_cache_offload_view(c, 0, &sv));
            if (r >= 0)
                t[r] = now_s() - t0;
            if (sv.n_tokens != 131072)
                DIE("staged %u tokens", sv.n_tokens);
            TRY(ra_gpu_cache_offload_release(c, 0));
        }
        res->d2h_bytes = 2.0 * mid;
        res->d2h_stage = 2.0 * mid / median(t, reps) / 1e9;
        void *hk = ra_gpu_host_alloc(mid), *hv = ra_gpu_host_alloc(mid);
        cudaStream_t st = (cudaStream_t)ra_gpu_cache_stream(c);
        for (int r = -1; r < reps; r++) {
            double t0 = now_s();
            CU(cudaMemcpyAsync(hk, dk, mid, cudaMemcpyDeviceToHost, st));
            CU(cudaMemcpyAsync(hv, dv, mid, cudaMemcpyDeviceToHost, st));
            CU(cudaStreamSynchronize(st));
            if (r >= 0)
                t[r] = now_s() - t0;
        }
        res->d2h_plain = 2.0 * mid / median(t, reps) / 1e9;
        ra_gpu_host_free(hk);
        ra_gpu_host_free(hv);
        cudaFree(dk);
        cudaFree(dv);
        ra_gpu_cache_destroy(c);
    }
    /* H2D: host prefill of sink 128 + window 65536 from pinned memory (all to device) */
    {
        ra_gpu_config cfg;
        ra_gpu_config_init(&cfg);
        cfg.n_layers = 1;
        cfg.n_q_heads = 32;
        cfg.n_kv_heads = H;
        cfg.head_dim = D;
        cfg.dtype = RA_DTYPE_BF16;
        cfg.sink = 128;
        cfg.window = 65536;
        cfg.batch = 1;
        cfg.backend = RA_GPU_BACKEND_CUDA;
        ra_gpu_cache *c = NULL;
        TRY(ra_gpu_cache_create(&cfg, &c));
        unsigned n = 128 + 65536;
        size_t bytes = (size_t)n * H * D * 2;
        uint16_t *hk = ra_gpu_host_alloc(bytes), *hv = ra_gpu_host_alloc(bytes);
        uint16_t *mk = malloc(bytes), *mv = malloc(bytes);
        uint64_t s = 5;
        fill_bf16(hk, bytes / 2, &s);
        fill_bf16(hv, bytes / 2, &s);
        memcpy(mk, hk, bytes);
        memcpy(mv, hv, bytes);
        for (int r = -1; r < reps; r++) {
            TRY(ra_gpu_cache_reset(c));
            double t0 = now_s();
            TRY(ra_gpu_ingest_prefill(c, 0, RA_GPU_MEM_HOST, hk, hv, n));
            if (r >= 0)
                t[r] = now_s() - t0;
        }
        res->h2d_bytes = 2.0 * bytes;
        res->h2d_stage = 2.0 * bytes / median(t, reps) / 1e9;
        for (int r = -1; r < reps; r++) {
            TRY(ra_gpu_cache_reset(c));
            double t0 = now_s();
            TRY(ra_gpu_ingest_prefill(c, 0, RA_GPU_MEM_HOST, mk, mv, n));
            if (r >= 0)
                t[r] = now_s() - t0;
        }
        res->h2d_bounce = 2.0 * bytes / median(t, reps) / 1e9;
        void *dk, *dv;
        CU(cudaMalloc(&dk, bytes));
        CU(cudaMalloc(&dv, bytes));
        cudaStream_t st = (cudaStream_t)ra_gpu_cache_stream(c);
        for (int r = -1; r < reps; r++) {
            double t0 = now_s();
            CU(cudaMemcpyAsync(dk, hk, bytes, cudaMemcpyHostToDevice, st));
            CU(cudaMemcpyAsync(dv, hv, bytes, cudaMemcpyHostToDevice, st));
            CU(cudaStreamSynchronize(st));
            if (r >= 0)
                t[r] = now_s() - t0;
        }
        res->h2d_plain = 2.0 * bytes / median(t, reps) / 1e9;
        cudaFree(dk);
        cudaFree(dv);
        ra_gpu_host_free(hk);
        ra_gpu_host_free(hv);
        free(mk);
        free(mv);
        ra_gpu_cache_destroy(c);
    }
    free(t);
#else
    memset(res, 0, sizeof *res);
#endif
}

static void device_name(char *buf, size_t n)
{
    snprintf(buf, n, "cpu");
#ifdef RA_HAVE_CUDA
    if (ra_gpu_cuda_available()) {
        struct cudaDeviceProp p;
        if (cudaGetDeviceProperties(&p, 0) == cudaSuccess)
            snprintf(buf, n, "%.200s (%d SMs)", p.name, p.multiProcessorCount);
    }
#endif
}

int main(int argc, char **argv)
{
    int reps = 20, knn = 1, staging = 1;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--json"))
            g_json = 1;
        else if (!strcmp(argv[i], "--quick"))
            reps = 3;
        else if (!strcmp(argv[i], "--no-knn"))
            knn = 0;
        else if (!strcmp(argv[i], "--no-staging"))
            staging = 0;
        else if (!strcmp(argv[i], "--help") || !strcmp(argv[i], "-h")) {
            printf("usage: ratd-bench-gpu [--json] [--quick] [--no-knn] [--no-staging]\n"
                   "  per-layer attend_local + merge (32q/8kv heads, dim 128, sink 128 + window "
                   "512, bf16),\n  batch 1 and 8; GPU kNN 4096 x 131072 x 128 (k 100); staging "
                   "bandwidth vs pinned copies.\n");
            return 0;
        } else {
            fprintf(stderr, "unknown option %s (try --help)\n", argv[i]);
            return 2;
        }
    }
    int cuda = ra_gpu_cuda_available();
    ra_gpu_backend be = cuda ? RA_GPU_BACKEND_CUDA : RA_GPU_BACKEND_CPU;
    char dev[256];
    device_name(dev, sizeof dev);
    if (g_json)
        printf("{\"bench\":\"gpu\",\"device\":\"%s\",\"backend\":\"%s\"}\n", dev,
               cuda ? "cuda" : "cpu");
    else
        printf("ratd-bench-gpu on %s, backend %s\n", dev, cuda ? "cuda" : "cpu");
    unsigned batches[2] = {1, 8};
    for (int bi = 0; bi < 2; bi++) {
        for (int chk = 0; chk < (cuda ? 2 : 1); chk++) {
            attend_result r;
            bench_attend(be, batches[bi], chk, reps, &r);
            if (g_json)
                printf("{\"bench\":\"attend_merge\",\"backend\":\"%s\",\"batch\":%u,\"q_heads\":32,"
                       "\"kv_heads\":8,\"head_dim\":128,\"sink\":128,\"window\":512,"
                       "\"dtype\":\"bf16\",\"pointer_check\":%s,\"us_per_layer_pipelined\":%.3f,"
                       "\"us_per_layer_sync\":%.3f,\"us_per_layer_host_api\":%.3f,"
                       "\"us_attend_only\":%.3f,\"us_merge_only\":%.3f,\"target_us\":20}\n",
                       cuda ? "cuda" : "cpu", batches[bi], chk ? "false" : "true",
                       r.pipelined_us, r.single_us, r.host_us, r.attend_only_us,
                       r.merge_only_us);
            else
                printf("attend_local+merge batch %u%s: %.2f us/layer pipelined, %.2f us one "
                       "layer synchronous, %.2f us host-pointer API (target <= 20)\n",
                       batches[bi], chk ? " (pointer check off)" : "", r.pipelined_us,
                       r.single_us, r.host_us);
        }
    }
    if (cuda && knn) {
        double ms = bench_knn(4096, 131072, 128, 100, reps > 5 ? 5 : reps);
        double tflops = 2.0 * 4096 * 131072 * 128 / (ms * 1e-3) / 1e12;
        if (g_json)
            printf("{\"bench\":\"knn\",\"nq\":4096,\"nk\":131072,\"dim\":128,\"k\":100,"
                   "\"dtype\":\"bf16\",\"ms\":%.3f,\"effective_tflops\":%.1f}\n",
                   ms, tflops);
        else
            printf("kNN 4096 x 131072 x 128 (bf16, k 100): %.2f ms (%.1f TFLOP/s effective)\n", ms,
                   tflops);
    }
    if (cuda && staging) {
        stage_result r;
        bench_staging(reps > 5 ? 5 : reps, &r);
        if (g_json) {
            printf("{\"bench\":\"staging\",\"dir\":\"d2h\",\"path\":\"ingest_prefill device -> "
                   "pinned offload stage\",\"bytes\":%.0f,\"gbps\":%.2f,\"plain_pinned_gbps\":%.2f,"
                   "\"ratio\":%.3f,\"target_ratio\":0.8}\n",
                   r.d2h_bytes, r.d2h_stage, r.d2h_plain, r.d2h_stage / r.d2h_plain);
            printf("{\"bench\":\"staging\",\"dir\":\"h2d\",\"path\":\"ingest_prefill pinned host -> "
                   "device sink+window\",\"bytes\":%.0f,\"gbps\":%.2f,\"plain_pinned_gbps\":%.2f,"
                   "\"ratio\":%.3f,\"target_ratio\":0.8,\"pageable_source_gbps\":%.2f}\n",
                   r.h2d_bytes, r.h2d_stage, r.h2d_plain, r.h2d_stage / r.h2d_plain,
                   r.h2d_bounce);
        } else {
            printf("staging D2H (prefill middle -> pinned): %.1f GB/s vs plain pinned copy %.1f "
                   "GB/s = %.0f%% (target >= 80%%)\n",
                   r.d2h_stage, r.d2h_plain, 100 * r.d2h_stage / r.d2h_plain);
            printf("staging H2D (pinned prefill -> sink+window): %.1f GB/s vs plain pinned copy "
                   "%.1f GB/s = %.0f%%; from pageable memory %.1f GB/s\n",
                   r.h2d_stage, r.h2d_plain, 100 * r.h2d_stage / r.h2d_plain, r.h2d_bounce);
        }
    }
    return 0;
}
