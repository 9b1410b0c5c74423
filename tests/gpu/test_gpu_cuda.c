/* Device tests of gpu/ (label gpu): every CUDA kernel against the CPU backend on the same
 * inputs (the ggml test-backend-ops habit) — decode attention with the window ring
 * wrapping, eviction and offload staging byte for byte, merge, kNN up to ties — through
 * both the host-pointer and the device-pointer API, plus the device-side bad-input paths
 * (host pointer passed as device, misaligned device pointer, a CUDA error mid-step,
 * allocation failure). Each test skips when no CUDA device is present. Bounds (issue 5):
 * max relative error <= 2e-3 for fp16 and <= 1e-2 for bf16 in fp32 accumulation. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>

#include <cmocka.h>

#ifdef RA_HAVE_CUDA
#include <cuda_runtime_api.h>
#endif

#include "gpu_testutil.h"

#define NEED_DEVICE()                                                                     \
    do {                                                                                  \
        if (!ra_gpu_cuda_available()) {                                                   \
            skip();                                                                       \
            return;                                                                       \
        }                                                                                 \
    } while (0)

#ifdef RA_HAVE_CUDA
static void *dmalloc(size_t n)
{
    void *p = NULL;
    assert_int_equal(cudaMalloc(&p, n), cudaSuccess);
    return p;
}
static void h2d(void *d, const void *h, size_t n)
{
    assert_int_equal(cudaMemcpy(d, h, n, cudaMemcpyHostToDevice), cudaSuccess);
}
static void d2h(void *h, const void *d, size_t n)
{
    assert_int_equal(cudaMemcpy(h, d, n, cudaMemcpyDeviceToHost), cudaSuccess);
}
#endif

static ra_gpu_config mkcfg(ra_dtype t, unsigned hq, unsigned hkv, unsigned d, unsigned sink,
                           unsigned w, unsigned batch)
{
    ra_gpu_config c;
    ra_gpu_config_init(&c);
    c.n_layers = 3;
    c.n_q_heads = hq;
    c.n_kv_heads = hkv;
    c.head_dim = d;
    c.dtype = t;
    c.sink = sink;
    c.window = w;
    c.batch = batch;
    c.evict_capacity = 256;
    return c;
}

static __attribute__((unused)) double bound(ra_dtype t)
{
    return t == RA_DTYPE_BF16 ? 1e-2 : 2e-3;
}

static void views_equal(const ra_gpu_staged *a, const ra_gpu_staged *b, size_t es)
{
    assert_int_equal(a->n_tokens, b->n_tokens);
    assert_int_equal(a->seq_stride, b->seq_stride);
    assert_int_equal(a->head_stride, b->head_stride);
    size_t bytes = (size_t)a->batch * a->seq_stride * es;
    if (a->n_tokens) {
        assert_memory_equal(a->k, b->k, bytes);
        assert_memory_equal(a->v, b->v, bytes);
        assert_memory_equal(a->pos, b->pos, a->n_tokens * sizeof(int64_t));
    }
}

/* Same inputs through the CPU backend and the CUDA backend (host or device pointers);
 * compares every step, every eviction view and the offload view. Also checks CUDA's
 * local attention against the double model. */
static void cross_check(const ra_gpu_config *cfg, unsigned n_prefill, unsigned steps,
                        int device_ptrs, uint64_t seed)
{
#ifdef RA_HAVE_CUDA
    ra_gpu_config gc = *cfg, gg = *cfg;
    gc.backend = RA_GPU_BACKEND_CPU;
    gg.backend = RA_GPU_BACKEND_CUDA;
    ra_gpu_cache *cc, *cg;
    assert_int_equal(ra_gpu_cache_create(&gc, &cc), RA_OK);
    assert_int_equal(ra_gpu_cache_create(&gg, &cg), RA_OK);
    assert_int_equal(ra_gpu_cache_backend(cg), RA_GPU_BACKEND_CUDA);
    const ra_gpu_config *g = ra_gpu_cache_config(cg);
    unsigned B = g->batch, Hq = g->n_q_heads, H = g->n_kv_heads, D = g->head_dim;
    size_t es = ra_dtype_size(g->dtype);
    size_t qb = (size_t)B * Hq * D * es, kb = (size_t)B * H * D * es;
    size_t ob = (size_t)B * Hq * D * 4, lb = (size_t)B * Hq * 4;
    size_t lbp = (lb + 15) & ~(size_t)15; /* device sub-buffers stay 16-byte aligned */
    tu_hist h;
    tu_hist_init(&h, g, n_prefill + steps);
    uint64_t s = seed;
    const unsigned layer = 2;
    ra_gpu_mem mem = device_ptrs ? RA_GPU_MEM_DEVICE : RA_GPU_MEM_HOST;
    if (n_prefill) {
        void *pk, *pv;
        tu_hist_prefill(&h, n_prefill, &s, &pk, &pv);
        size_t pb = (size_t)B * n_prefill * H * D * es;
        assert_int_equal(ra_gpu_ingest_prefill(cc, layer, RA_GPU_MEM_HOST, pk, pv, n_prefill),
                         RA_OK);
        if (device_ptrs) {
            void *dk = dmalloc(pb), *dv = dmalloc(pb);
            h2d(dk, pk, pb);
            h2d(dv, pv, pb);
            assert_int_equal(ra_gpu_ingest_prefill(cg, layer, mem, dk, dv, n_prefill), RA_OK);
            assert_int_equal(ra_gpu_cache_sync(cg), RA_OK);
            cudaFree(dk);
            cudaFree(dv);
        } else {
            assert_int_equal(ra_gpu_ingest_prefill(cg, layer, mem, pk, pv, n_prefill), RA_OK);
        }
        ra_gpu_staged a, b;
        assert_int_equal(ra_gpu_cache_offload_view(cc, layer, &a), RA_OK);
        assert_int_equal(ra_gpu_cache_offload_view(cg, layer, &b), RA_OK);
        views_equal(&a, &b, es);
        assert_int_equal(ra_gpu_cache_offload_release(cc, layer), RA_OK);
        assert_int_equal(ra_gpu_cache_offload_release(cg, layer), RA_OK);
        free(pk);
        free(pv);
    }
    void *q = tu_alloc(qb), *kn = tu_alloc(kb), *vn = tu_alloc(kb);
    float *oc = tu_alloc(ob), *lc = tu_alloc(lb), *og = tu_alloc(ob), *lg = tu_alloc(lb);
    float *orem = tu_alloc(ob), *lrem = tu_alloc(lb);
    float *mc = tu_alloc(ob), *mlc = tu_alloc(lb), *mg = tu_alloc(ob), *mlg = tu_alloc(lb);
    double *ref = malloc(D * sizeof(double));
    char *dq = NULL, *dk = NULL, *dv = NULL, *dout = NULL;
    if (device_ptrs) {
        dq = dmalloc(qb);
        dk = dmalloc(kb);
        dv = dmalloc(kb);
        dout = dmalloc(4 * ob + 4 * lbp + 1024);
    }
    double worst = 0.0, worst_m = 0.0;
    for (unsigned step = 0; step < steps; step++) {
        tu_fill(q, (size_t)B * Hq * D, g->dtype, 2.0f, &s);
        tu_hist_step(&h, &s, kn, vn);
        tu_fill(orem, (size_t)B * Hq * D, RA_DTYPE_F32, 1.0f, &s);
        for (size_t r = 0; r < (size_t)B * Hq; r++)
            lrem[r] = r % 7 == 3 ? -INFINITY : 4.0f * tu_randn(&s);
        memset(og, 0xff, ob); /* NaN poison: every element must be written */
        assert_int_equal(ra_gpu_attend_local(cc, layer, RA_GPU_MEM_HOST, q, kn, vn, oc, lc),
                         RA_OK);
        if (device_ptrs) {
            float *d_o = (float *)dout, *d_l = (float *)(dout + ob);
            float *d_orem = (float *)(dout + ob + lbp), *d_lrem = (float *)(dout + 2 * ob + lbp);
            float *d_m = (float *)(dout + 2 * ob + 2 * lbp);
            float *d_ml = (float *)(dout + 3 * ob + 2 * lbp);
            h2d(dq, q, qb);
            h2d(dk, kn, kb);
            h2d(dv, vn, kb);
            h2d(d_orem, orem, ob);
            h2d(d_lrem, lrem, lb);
            assert_int_equal(ra_gpu_attend_local(cg, layer, mem, dq, dk, dv, d_o, d_l), RA_OK);
            assert_int_equal(ra_gpu_merge(cg, mem, d_o, d_l, d_orem, RA_DTYPE_F32, d_lrem, d_m,
                                          RA_DTYPE_F32, d_ml),
                             RA_OK);
            assert_int_equal(ra_gpu_cache_sync(cg), RA_OK);
            d2h(og, d_o, ob);
            d2h(lg, d_l, lb);
            d2h(mg, d_m, ob);
            d2h(mlg, d_ml, lb);
        } else {
            assert_int_equal(ra_gpu_attend_local(cg, layer, mem, q, kn, vn, og, lg), RA_OK);
            assert_int_equal(ra_gpu_merge(cg, mem, og, lg, orem, RA_DTYPE_F32, lrem, mg,
                                          RA_DTYPE_F32, mlg),
                             RA_OK);
        }
        assert_int_equal(ra_gpu_merge(cc, RA_GPU_MEM_HOST, oc, lc, orem, RA_DTYPE_F32, lrem, mc,
                                      RA_DTYPE_F32, mlc),
                         RA_OK);
        for (size_t r = 0; r < (size_t)B * Hq; r++) {
            double e = tu_relerr_ff(og + r * D, oc + r * D, D);
            worst = e > worst ? e : worst;
            assert_true(e <= bound(g->dtype));
            assert_true(fabsf(lg[r] - lc[r]) <= 1e-3f * (1.0f + fabsf(lc[r])));
            double em = tu_relerr_ff(mg + r * D, mc + r * D, D);
            worst_m = em > worst_m ? em : worst_m;
            assert_true(em <= bound(g->dtype));
            assert_true(fabsf(mlg[r] - mlc[r]) <= 1e-3f * (1.0f + fabsf(mlc[r])));
        }
        if (step % 5 == 0) { /* and against double, on one row per step */
            unsigned b = step % B, hq = (step * 7) % Hq;
            tu_attend(&h, q, b, hq, 1, ref);
            assert_true(tu_relerr_fd(og + ((size_t)b * Hq + hq) * D, ref, D) <= bound(g->dtype));
        }
        if (step % 4 == 3 || step + 1 == steps) {
            ra_gpu_staged a, b;
            assert_int_equal(ra_gpu_cache_evicted_view(cc, layer, &a), RA_OK);
            assert_int_equal(ra_gpu_cache_evicted_view(cg, layer, &b), RA_OK);
            views_equal(&a, &b, es);
            assert_int_equal(ra_gpu_cache_evicted_release(cc, layer), RA_OK);
            assert_int_equal(ra_gpu_cache_evicted_release(cg, layer), RA_OK);
        }
    }
    print_message("    %s D=%u G=%u B=%u sink=%u window=%u prefill=%u steps=%u %s: max rel err "
                  "attend %.2e merge %.2e\n",
                  ra_dtype_name(g->dtype), D, Hq / H, B, g->sink, g->window, n_prefill, steps,
                  device_ptrs ? "device" : "host", worst, worst_m);
    if (device_ptrs) {
        cudaFree(dq);
        cudaFree(dk);
        cudaFree(dv);
        cudaFree(dout);
    }
    free(q);
    free(kn);
    free(vn);
    free(oc);
    free(lc);
    free(og);
    free(lg);
    free(orem);
    free(lrem);
    free(mc);
    free(mlc);
    free(mg);
    free(mlg);
    free(ref);
    tu_hist_free(&h);
    ra_gpu_cache_destroy(cc);
    ra_gpu_cache_destroy(cg);
#endif
}

static void test_attend_matrix(void **st)
{
    NEED_DEVICE();
    static const ra_dtype dts[] = {RA_DTYPE_F16, RA_DTYPE_BF16};
    static const unsigned dims[] = {64, 128};
    static const unsigned groups[] = {1, 3, 4, 6, 8};
    uint64_t seed = 100;
    for (int i = 0; i < 2; i++)
        for (int j = 0; j < 2; j++)
            for (int k = 0; k < 5; k++) {
                unsigned hkv = groups[k] == 8 ? 1 : 2;
                ra_gpu_config c = mkcfg(dts[i], hkv * groups[k], hkv, dims[j], 4, 40,
                                        (i + k) % 2 ? 3 : 1);
                cross_check(&c, 70, 60, (i + j + k) % 2, seed++);
            }
}

/* the benchmark's shape: Llama-3-8B heads, sink 128 + window 512, batch 1 and 8 */
static void test_attend_llama_shape(void **st)
{
    NEED_DEVICE();
    ra_gpu_config c = mkcfg(RA_DTYPE_BF16, 32, 8, 128, 128, 512, 1);
    cross_check(&c, 1000, 12, 1, 200);
    c = mkcfg(RA_DTYPE_F16, 32, 8, 128, 128, 512, 8);
    cross_check(&c, 700, 8, 0, 201);
}

/* empty start: the sink fills, then the window, then the ring wraps several times */
static void test_ring_from_empty(void **st)
{
    NEED_DEVICE();
    ra_gpu_config c = mkcfg(RA_DTYPE_F16, 8, 2, 128, 3, 17, 2);
    cross_check(&c, 0, 90, 1, 300);
    cross_check(&c, 2, 90, 0, 301);
}

static void test_merge_dtypes(void **st)
{
    NEED_DEVICE();
    ra_gpu_config cfg = mkcfg(RA_DTYPE_BF16, 8, 2, 64, 4, 8, 2);
    ra_gpu_config cc = cfg, cg = cfg;
    cc.backend = RA_GPU_BACKEND_CPU;
    cg.backend = RA_GPU_BACKEND_CUDA;
    ra_gpu_cache *a, *b;
    assert_int_equal(ra_gpu_cache_create(&cc, &a), RA_OK);
    assert_int_equal(ra_gpu_cache_create(&cg, &b), RA_OK);
    size_t R = 16, D = 64;
    uint64_t s = 400;
    float *oa = tu_alloc(R * D * 4), *la = tu_alloc(R * 4), *lb = tu_alloc(R * 4);
    float *lo1 = tu_alloc(R * 4), *lo2 = tu_alloc(R * 4);
    void *ob = tu_alloc(R * D * 4), *o1 = tu_alloc(R * D * 4), *o2 = tu_alloc(R * D * 4);
    static const ra_dtype ts[] = {RA_DTYPE_F32, RA_DTYPE_F16, RA_DTYPE_BF16};
    for (int bt = 0; bt < 3; bt++)
        for (int ot = 0; ot < 3; ot++) {
            tu_fill(oa, R * D, RA_DTYPE_F32, 1, &s);
            tu_fill(ob, R * D, ts[bt], 1, &s);
            for (size_t r = 0; r < R; r++) {
                la[r] = r == 0 || r == 5 ? -INFINITY : 5 * tu_randn(&s);
                lb[r] = r == 1 || r == 5 ? -INFINITY : 5 * tu_randn(&s);
            }
            assert_int_equal(ra_gpu_merge(a, RA_GPU_MEM_HOST, oa, la, ob, ts[bt], lb, o1, ts[ot],
                                          lo1),
                             RA_OK);
            assert_int_equal(ra_gpu_merge(b, RA_GPU_MEM_HOST, oa, la, ob, ts[bt], lb, o2, ts[ot],
                                          lo2),
                             RA_OK);
            for (size_t i = 0; i < R * D; i++) {
                float x = tu_ld(o1, i, ts[ot]), y = tu_ld(o2, i, ts[ot]);
                /* one rounding step of the output type apart at most */
                float tol = ts[ot] == RA_DTYPE_BF16 ? 8e-3f : ts[ot] == RA_DTYPE_F16 ? 1e-3f : 1e-5f;
                assert_true(fabsf(x - y) <= tol * (1 + fabsf(x)));
            }
            for (size_t r = 0; r < R; r++) {
                if (r == 5)
                    assert_true(isinf(lo2[r]) && lo2[r] < 0);
                else
                    assert_true(fabsf(lo1[r] - lo2[r]) <= 1e-5f * (1 + fabsf(lo1[r])));
            }
        }
    free(oa);
    free(la);
    free(lb);
    free(lo1);
    free(lo2);
    free(ob);
    free(o1);
    free(o2);
    ra_gpu_cache_destroy(a);
    ra_gpu_cache_destroy(b);
}

/* GPU kNN == CPU kNN up to ties: same ids, or ids whose CPU scores sit within rounding
 * of the k-th score */
static void knn_case(ra_dtype t, size_t nq, size_t nk, unsigned dim, unsigned k, int device,
                     uint64_t seed)
{
#ifdef RA_HAVE_CUDA
    ra_gpu_config cfg = mkcfg(RA_DTYPE_F16, 2, 1, 64, 0, 4, 1);
    ra_gpu_config cc = cfg, cg = cfg;
    cc.backend = RA_GPU_BACKEND_CPU;
    cg.backend = RA_GPU_BACKEND_CUDA;
    ra_gpu_cache *a, *b;
    assert_int_equal(ra_gpu_cache_create(&cc, &a), RA_OK);
    assert_int_equal(ra_gpu_cache_create(&cg, &b), RA_OK);
    size_t es = ra_dtype_size(t);
    uint64_t s = seed;
    void *q = tu_alloc(nq * dim * es), *keys = tu_alloc(nk * dim * es);
    tu_fill(q, nq * dim, t, 1, &s);
    tu_fill(keys, nk * dim, t, 1, &s);
    int32_t *i1 = tu_alloc(nq * k * 4), *i2 = tu_alloc(nq * k * 4);
    float *s1 = tu_alloc(nq * k * 4), *s2 = tu_alloc(nq * k * 4);
    assert_int_equal(ra_gpu_knn(a, RA_GPU_MEM_HOST, t, q, nq, keys, nk, dim, k, i1, s1), RA_OK);
    if (device) {
        void *dq = dmalloc(nq * dim * es), *dk = dmalloc(nk * dim * es);
        void *di = dmalloc(nq * k * 4), *ds = dmalloc(nq * k * 4);
        h2d(dq, q, nq * dim * es);
        h2d(dk, keys, nk * dim * es);
        assert_int_equal(ra_gpu_knn(b, RA_GPU_MEM_DEVICE, t, dq, nq, dk, nk, dim, k, di, ds),
                         RA_OK);
        d2h(i2, di, nq * k * 4);
        d2h(s2, ds, nq * k * 4);
        cudaFree(dq);
        cudaFree(dk);
        cudaFree(di);
        cudaFree(ds);
    } else {
        assert_int_equal(ra_gpu_knn(b, RA_GPU_MEM_HOST, t, q, nq, keys, nk, dim, k, i2, s2),
                         RA_OK);
    }
    size_t differ = 0;
    char *mark = calloc(nk, 1);
    for (size_t i = 0; i < nq; i++) {
        float kth = s1[i * k + k - 1];
        float tol = 1e-5f * (1.0f + fabsf(kth)) * sqrtf((float)dim);
        for (unsigned r = 0; r < k; r++)
            mark[i1[i * k + r]] = 1;
        for (unsigned r = 0; r < k; r++) {
            int32_t id = i2[i * k + r];
            assert_true(id >= 0 && (size_t)id < nk);
            if (r)
                assert_true(s2[i * k + r] <= s2[i * k + r - 1]);
            if (!mark[id]) { /* not in the CPU's list: must tie with its k-th */
                differ++;
                assert_true(fabsf(s2[i * k + r] - kth) <= tol);
            }
            assert_true(fabsf(s2[i * k + r] - s1[i * k + r]) <= tol);
        }
        for (unsigned r = 0; r < k; r++)
            mark[i1[i * k + r]] = 0;
    }
    print_message("    knn %s nq=%zu nk=%zu dim=%u k=%u %s: %zu ids differ (ties)\n",
                  ra_dtype_name(t), nq, nk, dim, k, device ? "device" : "host", differ);
    free(mark);
    free(q);
    free(keys);
    free(i1);
    free(i2);
    free(s1);
    free(s2);
    ra_gpu_cache_destroy(a);
    ra_gpu_cache_destroy(b);
#endif
}

static void test_knn(void **st)
{
    NEED_DEVICE();
    knn_case(RA_DTYPE_F16, 64, 5000, 128, 100, 0, 500);
    knn_case(RA_DTYPE_BF16, 33, 3001, 64, 1, 1, 501);
    knn_case(RA_DTYPE_F16, 5, 2000, 128, 1024, 1, 502);
    knn_case(RA_DTYPE_F32, 17, 777, 96, 50, 0, 503);
    knn_case(RA_DTYPE_F16, 8, 100, 128, 100, 0, 504); /* k == nk */
    /* the top-k's paths at more keys than it keeps (4,096): a sampled threshold with
     * 16-byte loads and with single ones (nk % 4 != 0), and the radix select straight
     * away (k n too large for the sample's threshold) */
    knn_case(RA_DTYPE_F16, 16, 20000, 64, 100, 0, 505);
    knn_case(RA_DTYPE_F16, 16, 20001, 64, 100, 1, 506);
    knn_case(RA_DTYPE_BF16, 4, 40000, 64, 1024, 0, 507);
}

static void test_bad_device_input(void **st)
{
    NEED_DEVICE();
#ifdef RA_HAVE_CUDA
    ra_gpu_config cfg = mkcfg(RA_DTYPE_F16, 4, 2, 64, 2, 8, 1);
    cfg.backend = RA_GPU_BACKEND_CUDA;
    ra_gpu_cache *c;
    assert_int_equal(ra_gpu_cache_create(&cfg, &c), RA_OK);
    size_t qb = 4 * 64 * 2, kb = 2 * 64 * 2;
    char *dq = dmalloc(qb + 64), *dk = dmalloc(kb + 64), *dv = dmalloc(kb + 64);
    char *dout = dmalloc(4 * 64 * 4 + 64), *dl = dmalloc(64);
    char *hq = tu_alloc(qb);
    ra_gpu_mem D = RA_GPU_MEM_DEVICE;
    /* a host pointer where a device pointer belongs */
    assert_int_equal(ra_gpu_attend_local(c, 0, D, hq, dk, dv, (float *)dout, (float *)dl),
                     RA_EINVAL);
    assert_true(strstr(ra_gpu_cache_last_error(c), "device") != NULL);
    /* misaligned */
    assert_int_equal(ra_gpu_attend_local(c, 0, D, dq + 8, dk, dv, (float *)dout, (float *)dl),
                     RA_EINVAL);
    assert_int_equal(ra_gpu_attend_local(c, 0, D, dq, dk, dv, NULL, (float *)dl), RA_EINVAL);
    assert_int_equal(ra_gpu_attend_local(c, 3, D, dq, dk, dv, (float *)dout, (float *)dl),
                     RA_ENOLAYER);
    assert_int_equal(ra_gpu_ingest_prefill(c, 0, D, dk, hq, 1), RA_EINVAL);
    unsigned n;
    assert_int_equal(ra_gpu_cache_tokens(c, 0, &n, NULL), RA_OK);
    assert_int_equal(n, 0);
    assert_false(ra_gpu_cache_broken(c));
    /* a valid step still works */
    assert_int_equal(cudaMemset(dq, 0, qb), cudaSuccess);
    assert_int_equal(cudaMemset(dk, 0, kb), cudaSuccess);
    assert_int_equal(cudaMemset(dv, 0, kb), cudaSuccess);
    assert_int_equal(ra_gpu_attend_local(c, 0, D, dq, dk, dv, (float *)dout, (float *)dl), RA_OK);
    assert_int_equal(ra_gpu_cache_sync(c), RA_OK);
    cudaFree(dq);
    cudaFree(dk);
    cudaFree(dv);
    cudaFree(dout);
    cudaFree(dl);
    free(hq);
    ra_gpu_cache_destroy(c);

    /* unsupported shapes / types on the device: a clean ENOTSUP */
    ra_gpu_config bad = mkcfg(RA_DTYPE_F16, 4, 2, 96, 2, 8, 1);
    bad.backend = RA_GPU_BACKEND_CUDA;
    assert_int_equal(ra_gpu_cache_create(&bad, &c), RA_ENOTSUP);
    bad = mkcfg(RA_DTYPE_F32, 4, 2, 64, 2, 8, 1);
    bad.backend = RA_GPU_BACKEND_CUDA;
    assert_int_equal(ra_gpu_cache_create(&bad, &c), RA_ENOTSUP);
    bad = mkcfg(RA_DTYPE_F16, 4, 2, 64, 2, 8, 1);
    bad.backend = RA_GPU_BACKEND_CUDA;
    bad.device = 999;
    assert_int_equal(ra_gpu_cache_create(&bad, &c), RA_EINVAL);
    /* a real CUDA failure: far more device memory than exists */
    bad = mkcfg(RA_DTYPE_F16, 32, 8, 128, 1u << 24, 1u << 24, 64);
    bad.n_layers = 64;
    bad.backend = RA_GPU_BACKEND_CUDA;
    ra_status s = ra_gpu_cache_create(&bad, &c);
    assert_true(s == RA_ENOMEM || s == RA_EDEVICE);
#endif
}

/* a CUDA error in the middle of a step: an error status with the CUDA name, then either
 * the cache works on (recoverable) or says it is broken (sticky) */
static void test_fault_mid_step(void **st)
{
    NEED_DEVICE();
    extern void ra_gpu_cache_inject_fault(ra_gpu_cache * c, int cuda_error);
    ra_gpu_config cfg = mkcfg(RA_DTYPE_F16, 4, 2, 64, 2, 8, 2);
    ra_gpu_config cc = cfg, cg = cfg;
    cc.backend = RA_GPU_BACKEND_CPU;
    cg.backend = RA_GPU_BACKEND_CUDA;
    ra_gpu_cache *a, *b;
    assert_int_equal(ra_gpu_cache_create(&cc, &a), RA_OK);
    assert_int_equal(ra_gpu_cache_create(&cg, &b), RA_OK);
    size_t qn = 2 * 4 * 64, kn = 2 * 2 * 64;
    uint16_t *q = tu_alloc(qn * 2), *k = tu_alloc(kn * 2), *v = tu_alloc(kn * 2);
    float *o1 = tu_alloc(qn * 4), *l1 = tu_alloc(8 * 4), *o2 = tu_alloc(qn * 4),
          *l2 = tu_alloc(8 * 4);
    uint64_t s = 600;
    for (int i = 0; i < 20; i++) {
        tu_fill(q, qn, RA_DTYPE_F16, 2, &s);
        tu_fill(k, kn, RA_DTYPE_F16, 1, &s);
        tu_fill(v, kn, RA_DTYPE_F16, 1, &s);
        if (i == 12) { /* recoverable: cudaErrorLaunchOutOfResources (701)... before append */
            ra_gpu_cache_inject_fault(b, 701);
            assert_int_equal(ra_gpu_attend_local(b, 1, RA_GPU_MEM_HOST, q, k, v, o2, l2),
                             RA_EDEVICE);
            assert_true(strstr(ra_gpu_cache_last_error(b), "cuda") != NULL ||
                        strstr(ra_gpu_cache_last_error(b), "CUDA") != NULL);
            assert_false(ra_gpu_cache_broken(b));
        }
        assert_int_equal(ra_gpu_attend_local(a, 1, RA_GPU_MEM_HOST, q, k, v, o1, l1), RA_OK);
        assert_int_equal(ra_gpu_attend_local(b, 1, RA_GPU_MEM_HOST, q, k, v, o2, l2), RA_OK);
        for (int r = 0; r < 8; r++)
            assert_true(tu_relerr_ff(o2 + r * 64, o1 + r * 64, 64) <= 2e-3);
        ra_gpu_staged x, y;
        assert_int_equal(ra_gpu_cache_evicted_view(a, 1, &x), RA_OK);
        assert_int_equal(ra_gpu_cache_evicted_view(b, 1, &y), RA_OK);
        views_equal(&x, &y, 2);
        assert_int_equal(ra_gpu_cache_evicted_release(a, 1), RA_OK);
        assert_int_equal(ra_gpu_cache_evicted_release(b, 1), RA_OK);
    }
    /* sticky: cudaErrorIllegalAddress (700) -> broken, every later call RA_ESTATE */
    ra_gpu_cache_inject_fault(b, 700);
    assert_int_equal(ra_gpu_attend_local(b, 1, RA_GPU_MEM_HOST, q, k, v, o2, l2), RA_EDEVICE);
    assert_true(ra_gpu_cache_broken(b));
    assert_true(strstr(ra_gpu_cache_last_error(b), "cudaErrorIllegalAddress") != NULL);
    assert_int_equal(ra_gpu_attend_local(b, 1, RA_GPU_MEM_HOST, q, k, v, o2, l2), RA_ESTATE);
    assert_int_equal(ra_gpu_cache_sync(b), RA_ESTATE);
    free(q);
    free(k);
    free(v);
    free(o1);
    free(l1);
    free(o2);
    free(l2);
    ra_gpu_cache_destroy(a);
    ra_gpu_cache_destroy(b); /* a broken cache still frees */
}

/* the cache on a caller's stream */
static void test_user_stream(void **st)
{
    NEED_DEVICE();
#ifdef RA_HAVE_CUDA
    ra_gpu_config cfg = mkcfg(RA_DTYPE_F16, 4, 2, 64, 2, 8, 1);
    cfg.backend = RA_GPU_BACKEND_CUDA;
    ra_gpu_cache *c;
    assert_int_equal(ra_gpu_cache_create(&cfg, &c), RA_OK);
    void *own = ra_gpu_cache_stream(c);
    assert_non_null(own);
    cudaStream_t us;
    assert_int_equal(cudaStreamCreate(&us), cudaSuccess);
    assert_int_equal(ra_gpu_cache_set_stream(c, us), RA_OK);
    assert_ptr_equal(ra_gpu_cache_stream(c), us);
    uint16_t *q = tu_alloc(4 * 64 * 2), *k = tu_alloc(2 * 64 * 2), *v = tu_alloc(2 * 64 * 2);
    float *o = tu_alloc(4 * 64 * 4), *l = tu_alloc(16);
    uint64_t s = 700;
    tu_fill(q, 256, RA_DTYPE_F16, 1, &s);
    tu_fill(k, 128, RA_DTYPE_F16, 1, &s);
    tu_fill(v, 128, RA_DTYPE_F16, 1, &s);
    assert_int_equal(ra_gpu_attend_local(c, 0, RA_GPU_MEM_HOST, q, k, v, o, l), RA_OK);
    /* one token: o is that token's v */
    for (int hq = 0; hq < 4; hq++)
        for (int d = 0; d < 64; d++)
            assert_true(fabsf(o[hq * 64 + d] - ra_f16_to_f32(v[(hq / 2) * 64 + d])) < 1e-6f);
    assert_int_equal(ra_gpu_cache_set_stream(c, NULL), RA_OK);
    assert_ptr_equal(ra_gpu_cache_stream(c), own);
    ra_gpu_cache_destroy(c);
    cudaStreamDestroy(us);
    free(q);
    free(k);
    free(v);
    free(o);
    free(l);
#endif
}

/* Real vectors: a trace of the trained model (ratd-lm-eval --dump-trace; format in
 * bench/lm/ra_trace.h, read here directly). Per layer, the first n_pos - 48 positions
 * are the prefill, the rest decode steps with the model's own q, k, v; CUDA is checked
 * against the CPU backend and, merged with the exact remote part, against full
 * attention in double. RA_GPU_TRACE names the file; without it the test skips. */
static void test_trace(void **st)
{
    NEED_DEVICE();
    const char *path = getenv("RA_GPU_TRACE");
    if (!path || !*path) {
        print_message("    RA_GPU_TRACE not set: no trace data\n");
        skip();
        return;
    }
    FILE *f = fopen(path, "rb");
    assert_non_null(f);
    unsigned char hdr[64];
    assert_int_equal(fread(hdr, 1, 64, f), 64);
    assert_memory_equal(hdr, "RATRACE", 8);
    uint32_t u[8];
    memcpy(u, hdr + 8, sizeof u); /* version dtype layers heads kv_heads dim n_pos pos0 */
    ra_dtype tt = (ra_dtype)u[1];
    unsigned NL = u[2], Hq = u[3], H = u[4], D = u[5], NP = u[6];
    size_t tes = ra_dtype_size(tt);
    assert_true(tes > 0 && NP > 64 && H > 0 && Hq % H == 0);
    unsigned steps = 48, n0 = NP - steps;
    ra_gpu_config cfg = mkcfg(RA_DTYPE_BF16, Hq, H, D, 16, 64, 1);
    cfg.n_layers = NL;
    ra_gpu_config cc = cfg, cg = cfg;
    cc.backend = RA_GPU_BACKEND_CPU;
    cg.backend = RA_GPU_BACKEND_CUDA;
    ra_gpu_cache *a, *b;
    assert_int_equal(ra_gpu_cache_create(&cc, &a), RA_OK);
    assert_int_equal(ra_gpu_cache_create(&cg, &b), RA_OK);
    size_t blk = (size_t)(Hq + 2 * H) * NP * D * tes;
    unsigned char *raw = malloc(blk);
    uint16_t *pk = tu_alloc((size_t)n0 * H * D * 2), *pv = tu_alloc((size_t)n0 * H * D * 2);
    uint16_t *q = tu_alloc((size_t)Hq * D * 2), *kn = tu_alloc((size_t)H * D * 2),
             *vn = tu_alloc((size_t)H * D * 2);
    float *o1 = tu_alloc((size_t)Hq * D * 4), *l1 = tu_alloc(Hq * 4 + 16),
          *o2 = tu_alloc((size_t)Hq * D * 4), *l2 = tu_alloc(Hq * 4 + 16),
          *orem = tu_alloc((size_t)Hq * D * 4), *lrem = tu_alloc(Hq * 4 + 16),
          *om = tu_alloc((size_t)Hq * D * 4), *lm = tu_alloc(Hq * 4 + 16);
    double *ref = malloc(D * sizeof(double));
    double worst = 0, worst_full = 0;
    for (unsigned layer = 0; layer < NL; layer++) {
        assert_int_equal(fread(raw, 1, blk, f), blk);
        /* element of tensor (0 Q, 1 K, 2 V), head, position, dim -> bf16 */
#define TR(which, head, pos, d)                                                           \
    ra_f32_to_bf16(tu_ld(raw, ((((which) == 0 ? 0 : (which) == 1 ? Hq : Hq + H) + (size_t)(head)) * NP + \
                               (pos)) * D + (d), tt))
        tu_hist h;
        tu_hist_init(&h, ra_gpu_cache_config(b), NP);
        for (unsigned t = 0; t < NP; t++)
            for (unsigned hh = 0; hh < H; hh++)
                for (unsigned d = 0; d < D; d++) {
                    ((uint16_t *)h.k)[tu_idx(&h, t, 0, hh, d)] = TR(1, hh, t, d);
                    ((uint16_t *)h.v)[tu_idx(&h, t, 0, hh, d)] = TR(2, hh, t, d);
                }
        for (unsigned t = 0; t < n0; t++)
            for (unsigned hh = 0; hh < H; hh++) {
                memcpy(pk + ((size_t)t * H + hh) * D, (uint16_t *)h.k + tu_idx(&h, t, 0, hh, 0), D * 2);
                memcpy(pv + ((size_t)t * H + hh) * D, (uint16_t *)h.v + tu_idx(&h, t, 0, hh, 0), D * 2);
            }
        h.n = n0;
        assert_int_equal(ra_gpu_ingest_prefill(a, layer, RA_GPU_MEM_HOST, pk, pv, n0), RA_OK);
        assert_int_equal(ra_gpu_ingest_prefill(b, layer, RA_GPU_MEM_HOST, pk, pv, n0), RA_OK);
        ra_gpu_staged x, y;
        assert_int_equal(ra_gpu_cache_offload_view(a, layer, &x), RA_OK);
        assert_int_equal(ra_gpu_cache_offload_view(b, layer, &y), RA_OK);
        views_equal(&x, &y, 2);
        for (unsigned t = n0; t < NP; t++) {
            for (unsigned hq = 0; hq < Hq; hq++)
                for (unsigned d = 0; d < D; d++)
                    q[(size_t)hq * D + d] = TR(0, hq, t, d);
            for (unsigned hh = 0; hh < H; hh++) {
                memcpy(kn + (size_t)hh * D, (uint16_t *)h.k + tu_idx(&h, t, 0, hh, 0), D * 2);
                memcpy(vn + (size_t)hh * D, (uint16_t *)h.v + tu_idx(&h, t, 0, hh, 0), D * 2);
            }
            h.n = t + 1;
            assert_int_equal(ra_gpu_attend_local(a, layer, RA_GPU_MEM_HOST, q, kn, vn, o1, l1), RA_OK);
            assert_int_equal(ra_gpu_attend_local(b, layer, RA_GPU_MEM_HOST, q, kn, vn, o2, l2), RA_OK);
            for (unsigned hq = 0; hq < Hq; hq++) {
                double e = tu_relerr_ff(o2 + (size_t)hq * D, o1 + (size_t)hq * D, D);
                worst = e > worst ? e : worst;
                assert_true(e <= 1e-2);
                assert_true(fabsf(l2[hq] - l1[hq]) <= 1e-3f * (1 + fabsf(l1[hq])));
                lrem[hq] = (float)tu_attend(&h, q, 0, hq, 0, ref); /* what ratd answers */
                for (unsigned d = 0; d < D; d++)
                    orem[(size_t)hq * D + d] = (float)ref[d];
            }
            assert_int_equal(ra_gpu_merge(b, RA_GPU_MEM_HOST, o2, l2, orem, RA_DTYPE_F32, lrem,
                                          om, RA_DTYPE_F32, lm),
                             RA_OK);
            for (unsigned hq = 0; hq < Hq; hq++) {
                tu_attend(&h, q, 0, hq, -1, ref);
                double e = tu_relerr_fd(om + (size_t)hq * D, ref, D);
                worst_full = e > worst_full ? e : worst_full;
                assert_true(e <= 1e-2);
            }
            if (t % 8 == 7 || t + 1 == NP) {
                assert_int_equal(ra_gpu_cache_evicted_view(a, layer, &x), RA_OK);
                assert_int_equal(ra_gpu_cache_evicted_view(b, layer, &y), RA_OK);
                views_equal(&x, &y, 2);
                assert_int_equal(ra_gpu_cache_evicted_release(a, layer), RA_OK);
                assert_int_equal(ra_gpu_cache_evicted_release(b, layer), RA_OK);
            }
        }
#undef TR
        tu_hist_free(&h);
    }
    print_message("    trace %s: %u layers, %u/%u heads, dim %u, %u positions (%u decoded): max rel "
                  "err CUDA vs CPU %.2e, merged vs full attention %.2e\n",
                  path, NL, Hq, H, D, NP, steps, worst, worst_full);
    fclose(f);
    free(raw);
    free(pk);
    free(pv);
    free(q);
    free(kn);
    free(vn);
    free(o1);
    free(l1);
    free(o2);
    free(l2);
    free(orem);
    free(lrem);
    free(om);
    free(lm);
    free(ref);
    ra_gpu_cache_destroy(a);
    ra_gpu_cache_destroy(b);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_attend_matrix),
        cmocka_unit_test(test_attend_llama_shape),
        cmocka_unit_test(test_ring_from_empty),
        cmocka_unit_test(test_merge_dtypes),
        cmocka_unit_test(test_knn),
        cmocka_unit_test(test_bad_device_input),
        cmocka_unit_test(test_fault_mid_step),
        cmocka_unit_test(test_user_stream),
        cmocka_unit_test(test_trace),
    };
    /* RA_TEST_SMALL=1: the quick subset, for a compute-sanitizer pass */
    const struct CMUnitTest small[] = {
        cmocka_unit_test(test_ring_from_empty),  cmocka_unit_test(test_merge_dtypes),
        cmocka_unit_test(test_bad_device_input), cmocka_unit_test(test_fault_mid_step),
        cmocka_unit_test(test_user_stream),
    };
    const char *f = getenv("RA_TEST_SMALL");
    if (f && *f == '1')
        return cmocka_run_group_tests(small, NULL, NULL);
    return cmocka_run_group_tests(tests, NULL, NULL);
}
