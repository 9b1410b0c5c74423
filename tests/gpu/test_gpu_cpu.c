/* Unit tests of gpu/ on its CPU backend (label unit: they run everywhere, CI included):
 * partial attention against a double-precision model of the whole run, exactness of the
 * merge (local + remote = full attention), the window ring and its wrap-around, the order
 * and content of evicted and offloaded tokens, the sink filling first, the kNN against a
 * brute-force sort, and every bad-input path the API promises an error for. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>

#include <cmocka.h>

#include "gpu_testutil.h"

static ra_gpu_config mkcfg(ra_dtype t, unsigned hq, unsigned hkv, unsigned d, unsigned sink,
                           unsigned w, unsigned batch)
{
    ra_gpu_config c;
    ra_gpu_config_init(&c);
    c.n_layers = 2;
    c.n_q_heads = hq;
    c.n_kv_heads = hkv;
    c.head_dim = d;
    c.dtype = t;
    c.sink = sink;
    c.window = w;
    c.batch = batch;
    c.backend = RA_GPU_BACKEND_CPU;
    c.evict_capacity = 1024;
    return c;
}

/* Runs prefill + steps on layer 1 and checks every step: local attention vs double,
 * merge with the double remote part vs full attention, staging contents. */
static void run_and_check(const ra_gpu_config *cfg, unsigned n_prefill, unsigned steps,
                          double tol, uint64_t seed)
{
    ra_gpu_cache *c = NULL;
    assert_int_equal(ra_gpu_cache_create(cfg, &c), RA_OK);
    assert_int_equal(ra_gpu_cache_backend(c), RA_GPU_BACKEND_CPU);
    const ra_gpu_config *g = ra_gpu_cache_config(c);
    unsigned B = g->batch, Hq = g->n_q_heads, H = g->n_kv_heads, D = g->head_dim;
    size_t es = ra_dtype_size(g->dtype);
    tu_hist h;
    tu_hist_init(&h, g, n_prefill + steps);
    uint64_t s = seed;
    int64_t *seen = calloc(n_prefill + steps + 1, sizeof *seen); /* 1: offloaded/evicted */
    const unsigned layer = 1;
    if (n_prefill) {
        void *pk, *pv;
        tu_hist_prefill(&h, n_prefill, &s, &pk, &pv);
        assert_int_equal(ra_gpu_ingest_prefill(c, layer, RA_GPU_MEM_HOST, pk, pv, n_prefill),
                         RA_OK);
        ra_gpu_staged st;
        assert_int_equal(ra_gpu_cache_offload_view(c, layer, &st), RA_OK);
        unsigned want = n_prefill > g->sink + g->window ? n_prefill - g->sink - g->window : 0;
        assert_int_equal(st.n_tokens, want);
        assert_int_equal(st.head_stride, (size_t)want * D);
        for (unsigned i = 0; i < st.n_tokens; i++) {
            int64_t p = st.pos[i];
            assert_int_equal(p, (int64_t)g->sink + i);
            seen[p]++;
            for (unsigned b = 0; b < B; b++)
                for (unsigned hh = 0; hh < H; hh++) {
                    size_t off = (b * st.seq_stride + hh * st.head_stride + (size_t)i * D) * es;
                    assert_memory_equal((char *)st.k + off,
                                        (char *)h.k + tu_idx(&h, (unsigned)p, b, hh, 0) * es,
                                        D * es);
                    assert_memory_equal((char *)st.v + off,
                                        (char *)h.v + tu_idx(&h, (unsigned)p, b, hh, 0) * es,
                                        D * es);
                }
        }
        assert_int_equal(ra_gpu_cache_offload_release(c, layer), RA_OK);
        free(pk);
        free(pv);
    }
    void *q = tu_alloc((size_t)B * Hq * D * es);
    void *kn = tu_alloc((size_t)B * H * D * es), *vn = tu_alloc((size_t)B * H * D * es);
    float *o = tu_alloc((size_t)B * Hq * D * 4), *lse = tu_alloc((size_t)B * Hq * 4);
    float *o_rem = tu_alloc((size_t)B * Hq * D * 4), *l_rem = tu_alloc((size_t)B * Hq * 4);
    float *o_m = tu_alloc((size_t)B * Hq * D * 4), *l_m = tu_alloc((size_t)B * Hq * 4);
    double *ref = malloc(D * sizeof(double)), *full = malloc(D * sizeof(double));
    int64_t last_ev = -1;
    for (unsigned step = 0; step < steps; step++) {
        tu_fill(q, (size_t)B * Hq * D, g->dtype, 2.0f, &s);
        tu_hist_step(&h, &s, kn, vn);
        assert_int_equal(ra_gpu_attend_local(c, layer, RA_GPU_MEM_HOST, q, kn, vn, o, lse),
                         RA_OK);
        unsigned n_seen, n_local;
        assert_int_equal(ra_gpu_cache_tokens(c, layer, &n_seen, &n_local), RA_OK);
        assert_int_equal(n_seen, h.n);
        /* remote part in double (what ratd would answer), then merge */
        for (unsigned b = 0; b < B; b++)
            for (unsigned hq = 0; hq < Hq; hq++) {
                size_t r = (size_t)b * Hq + hq;
                double lr = tu_attend(&h, q, b, hq, 1, ref);
                assert_true(tu_relerr_fd(o + r * D, ref, D) <= tol);
                assert_true(fabs(lse[r] - lr) <= tol * (1.0 + fabs(lr)));
                double lrem = tu_attend(&h, q, b, hq, 0, full);
                for (unsigned d = 0; d < D; d++)
                    o_rem[r * D + d] = (float)full[d];
                l_rem[r] = (float)lrem;
            }
        assert_int_equal(ra_gpu_merge(c, RA_GPU_MEM_HOST, o, lse, o_rem, RA_DTYPE_F32, l_rem,
                                      o_m, RA_DTYPE_F32, l_m),
                         RA_OK);
        for (unsigned b = 0; b < B; b++)
            for (unsigned hq = 0; hq < Hq; hq++) {
                size_t r = (size_t)b * Hq + hq;
                double lf = tu_attend(&h, q, b, hq, -1, full);
                assert_true(tu_relerr_fd(o_m + r * D, full, D) <= tol);
                assert_true(fabs(l_m[r] - lf) <= tol * (1.0 + fabs(lf)));
            }
        /* drain evictions every 3 steps, checking order and content */
        if (step % 3 == 2 || step + 1 == steps) {
            ra_gpu_staged st;
            assert_int_equal(ra_gpu_cache_evicted_view(c, layer, &st), RA_OK);
            for (unsigned i = 0; i < st.n_tokens; i++) {
                int64_t p = st.pos[i];
                assert_true(p > last_ev);
                assert_true(p >= (int64_t)g->sink);
                last_ev = p;
                seen[p]++;
                assert_false(tu_local(g, (unsigned)p, h.n));
                for (unsigned b = 0; b < B; b++)
                    for (unsigned hh = 0; hh < H; hh++) {
                        size_t off = (b * st.seq_stride + hh * st.head_stride + (size_t)i * D) * es;
                        assert_memory_equal((char *)st.k + off,
                                            (char *)h.k + tu_idx(&h, (unsigned)p, b, hh, 0) * es,
                                            D * es);
                        assert_memory_equal((char *)st.v + off,
                                            (char *)h.v + tu_idx(&h, (unsigned)p, b, hh, 0) * es,
                                            D * es);
                    }
            }
            assert_int_equal(ra_gpu_cache_evicted_release(c, layer), RA_OK);
        }
    }
    /* every token is on exactly one side */
    for (unsigned t = 0; t < h.n; t++)
        assert_int_equal(seen[t] + tu_local(g, t, h.n), 1);
    free(seen);
    free(q);
    free(kn);
    free(vn);
    free(o);
    free(lse);
    free(o_rem);
    free(l_rem);
    free(o_m);
    free(l_m);
    free(ref);
    free(full);
    tu_hist_free(&h);
    ra_gpu_cache_destroy(c);
}

static void test_attend_f32(void **st)
{
    ra_gpu_config c = mkcfg(RA_DTYPE_F32, 4, 2, 16, 3, 7, 2);
    run_and_check(&c, 30, 25, 1e-5, 1);
}

static void test_attend_f16_gqa(void **st)
{
    ra_gpu_config c = mkcfg(RA_DTYPE_F16, 8, 2, 64, 4, 16, 1);
    run_and_check(&c, 50, 40, 1e-5, 2);
}

static void test_attend_bf16_mha(void **st)
{
    ra_gpu_config c = mkcfg(RA_DTYPE_BF16, 2, 2, 128, 2, 5, 3);
    run_and_check(&c, 9, 20, 1e-5, 3);
}

/* no prefill: the sink fills first, then the window, then the ring wraps many times */
static void test_ring_wrap_from_empty(void **st)
{
    ra_gpu_config c = mkcfg(RA_DTYPE_F16, 4, 1, 32, 5, 4, 2);
    run_and_check(&c, 0, 40, 1e-5, 4);
}

/* prefill shorter than the sink: the window stays empty until the sink is full */
static void test_sink_fills_first(void **st)
{
    ra_gpu_config cfg = mkcfg(RA_DTYPE_F32, 2, 1, 8, 6, 3, 1);
    run_and_check(&cfg, 2, 12, 1e-5, 5);
    ra_gpu_cache *c;
    assert_int_equal(ra_gpu_cache_create(&cfg, &c), RA_OK);
    float *k = tu_alloc(8 * 4), *v = tu_alloc(8 * 4), *q = tu_alloc(2 * 8 * 4);
    float *o = tu_alloc(2 * 8 * 4), *l = tu_alloc(2 * 4);
    uint64_t s = 9;
    tu_fill(k, 8, RA_DTYPE_F32, 1, &s);
    tu_fill(v, 8, RA_DTYPE_F32, 1, &s);
    tu_fill(q, 16, RA_DTYPE_F32, 1, &s);
    unsigned n, nl;
    for (unsigned i = 0; i < 12; i++) {
        assert_int_equal(ra_gpu_attend_local(c, 0, RA_GPU_MEM_HOST, q, k, v, o, l), RA_OK);
        assert_int_equal(ra_gpu_cache_tokens(c, 0, &n, &nl), RA_OK);
        assert_int_equal(n, i + 1);
        assert_int_equal(nl, i + 1 < 9 ? i + 1 : 9);
        ra_gpu_staged sv;
        assert_int_equal(ra_gpu_cache_evicted_view(c, 0, &sv), RA_OK);
        assert_int_equal(sv.n_tokens, i + 1 > 9 ? 1 : 0);
        if (sv.n_tokens)
            assert_int_equal(sv.pos[0], 6 + (i + 1 - 10)); /* oldest window token */
        assert_int_equal(ra_gpu_cache_evicted_release(c, 0), RA_OK);
    }
    free(k);
    free(v);
    free(q);
    free(o);
    free(l);
    ra_gpu_cache_destroy(c);
}

static void test_merge_edges(void **st)
{
    ra_gpu_config cfg = mkcfg(RA_DTYPE_F16, 2, 1, 16, 0, 4, 1);
    ra_gpu_cache *c;
    assert_int_equal(ra_gpu_cache_create(&cfg, &c), RA_OK);
    float *oa = tu_alloc(32 * 4), *ob = tu_alloc(32 * 4), *out = tu_alloc(32 * 4);
    float la[2] __attribute__((aligned(16))), lb[2] __attribute__((aligned(16)));
    float lo[2] __attribute__((aligned(16)));
    uint64_t s = 11;
    tu_fill(oa, 32, RA_DTYPE_F32, 1, &s);
    tu_fill(ob, 32, RA_DTYPE_F32, 1, &s);
    /* row 0: remote empty -> local; row 1: both empty -> zeros, -inf */
    la[0] = 1.5f;
    lb[0] = -INFINITY;
    la[1] = -INFINITY;
    lb[1] = -INFINITY;
    assert_int_equal(ra_gpu_merge(c, RA_GPU_MEM_HOST, oa, la, ob, RA_DTYPE_F32, lb, out,
                                  RA_DTYPE_F32, lo),
                     RA_OK);
    for (int d = 0; d < 16; d++) {
        assert_true(out[d] == oa[d]);
        assert_true(out[16 + d] == 0.0f);
    }
    assert_true(lo[0] == 1.5f);
    assert_true(isinf(lo[1]) && lo[1] < 0);
    /* equal lse: the mean; huge lse gaps do not overflow */
    la[0] = lb[0] = 3.0f;
    la[1] = 1000.0f;
    lb[1] = -1000.0f;
    uint16_t ob16[32] __attribute__((aligned(16))), out16[32] __attribute__((aligned(16)));
    for (int i = 0; i < 32; i++)
        ob16[i] = ra_f32_to_bf16(ob[i]);
    assert_int_equal(ra_gpu_merge(c, RA_GPU_MEM_HOST, oa, la, ob16, RA_DTYPE_BF16, lb, out16,
                                  RA_DTYPE_F16, NULL),
                     RA_OK);
    for (int d = 0; d < 16; d++) {
        float want = 0.5f * (oa[d] + ra_bf16_to_f32(ob16[d]));
        assert_true(fabsf(ra_f16_to_f32(out16[d]) - want) <= 2e-3f * (1 + fabsf(want)));
        assert_true(fabsf(ra_f16_to_f32(out16[16 + d]) - oa[16 + d]) <=
                    2e-3f * (1 + fabsf(oa[16 + d])));
    }
    /* in place (F32) */
    assert_int_equal(ra_gpu_merge(c, RA_GPU_MEM_HOST, oa, la, ob, RA_DTYPE_F32, lb, oa,
                                  RA_DTYPE_F32, NULL),
                     RA_OK);
    assert_int_equal(ra_gpu_merge(c, RA_GPU_MEM_HOST, oa, la, ob, RA_DTYPE_F32, lb, oa,
                                  RA_DTYPE_F16, NULL),
                     RA_EINVAL);
    free(oa);
    free(ob);
    free(out);
    ra_gpu_cache_destroy(c);
}

static void test_knn_cpu(void **st)
{
    ra_gpu_config cfg = mkcfg(RA_DTYPE_F16, 2, 1, 16, 0, 4, 1);
    ra_gpu_cache *c;
    assert_int_equal(ra_gpu_cache_create(&cfg, &c), RA_OK);
    const unsigned nq = 7, nk = 300, dim = 24, k = 17;
    uint64_t s = 12;
    uint16_t *q = tu_alloc(nq * dim * 2), *keys = tu_alloc(nk * dim * 2);
    tu_fill(q, nq * dim, RA_DTYPE_F16, 1, &s);
    tu_fill(keys, nk * dim, RA_DTYPE_F16, 1, &s);
    /* duplicate keys: ties must resolve to the lower id */
    memcpy(keys + 10 * dim, keys + 200 * dim, dim * 2);
    int32_t *ids = tu_alloc(nq * k * 4);
    float *sc = tu_alloc(nq * k * 4);
    assert_int_equal(ra_gpu_knn(c, RA_GPU_MEM_HOST, RA_DTYPE_F16, q, nq, keys, nk, dim, k, ids,
                                sc),
                     RA_OK);
    for (unsigned i = 0; i < nq; i++) {
        float all[300];
        for (unsigned j = 0; j < nk; j++) {
            float x = 0;
            for (unsigned d = 0; d < dim; d++)
                x += ra_f16_to_f32(q[i * dim + d]) * ra_f16_to_f32(keys[j * dim + d]);
            all[j] = x;
        }
        for (unsigned r = 0; r < k; r++) {
            int32_t id = ids[i * k + r];
            assert_true(id >= 0 && id < (int32_t)nk);
            assert_true(sc[i * k + r] == all[id]);
            if (r)
                assert_true(sc[i * k + r] <= sc[i * k + r - 1]);
            /* rank check: fewer than r+1 keys beat it */
            unsigned better = 0;
            for (unsigned j = 0; j < nk; j++)
                better += all[j] > all[id] || (all[j] == all[id] && (int32_t)j < id);
            assert_int_equal(better, r);
        }
    }
    assert_int_equal(ra_gpu_knn(c, RA_GPU_MEM_HOST, RA_DTYPE_F16, q, nq, keys, nk, dim, nk + 1,
                                ids, sc),
                     RA_ESHAPE);
    assert_int_equal(ra_gpu_knn(c, RA_GPU_MEM_HOST, RA_DTYPE_F16, q, 0, keys, nk, dim, k, ids,
                                sc),
                     RA_ESHAPE);
    free(q);
    free(keys);
    free(ids);
    free(sc);
    ra_gpu_cache_destroy(c);
}

static void test_bad_config(void **st)
{
    ra_gpu_cache *c = (ra_gpu_cache *)0x1;
    ra_gpu_config g = mkcfg(RA_DTYPE_F16, 6, 4, 16, 2, 4, 1); /* 6 % 4 != 0 */
    assert_int_equal(ra_gpu_cache_create(&g, &c), RA_EINVAL);
    assert_ptr_equal(c, (ra_gpu_cache *)0x1); /* out-param untouched */
    g = mkcfg(RA_DTYPE_F16, 4, 4, 16, 2, 0, 1);
    assert_int_equal(ra_gpu_cache_create(&g, &c), RA_EINVAL);
    g = mkcfg(RA_DTYPE_F16, 4, 4, 0, 2, 4, 1);
    assert_int_equal(ra_gpu_cache_create(&g, &c), RA_EINVAL);
    g = mkcfg(RA_DTYPE_F16, 4, 4, 16, 2, 4, 0);
    assert_int_equal(ra_gpu_cache_create(&g, &c), RA_EINVAL);
    g = mkcfg((ra_dtype)7, 4, 4, 16, 2, 4, 1);
    assert_int_equal(ra_gpu_cache_create(&g, &c), RA_EINVAL);
    g = mkcfg(RA_DTYPE_F16, 4, 4, 16, 2, 4, 1);
    g.n_layers = 0;
    assert_int_equal(ra_gpu_cache_create(&g, &c), RA_EINVAL);
    g = mkcfg(RA_DTYPE_F16, 4, 4, 16, 2, 4, 1);
    g.scale = NAN;
    assert_int_equal(ra_gpu_cache_create(&g, &c), RA_EINVAL);
    assert_int_equal(ra_gpu_cache_create(NULL, &c), RA_EINVAL);
    /* the CUDA backend on a machine (or build) without it: a clean error */
    if (!ra_gpu_cuda_available()) {
        g = mkcfg(RA_DTYPE_F16, 4, 4, 64, 2, 4, 1);
        g.backend = RA_GPU_BACKEND_CUDA;
        ra_status s = ra_gpu_cache_create(&g, &c);
        assert_true(s == RA_ENOTSUP || s == RA_EDEVICE);
        g.backend = RA_GPU_BACKEND_AUTO;
        assert_int_equal(ra_gpu_cache_create(&g, &c), RA_OK);
        assert_int_equal(ra_gpu_cache_backend(c), RA_GPU_BACKEND_CPU);
        ra_gpu_cache_destroy(c);
    }
    ra_gpu_cache_destroy(NULL);
}

static void test_bad_input(void **st)
{
    ra_gpu_config g = mkcfg(RA_DTYPE_F16, 4, 2, 16, 2, 3, 1);
    g.evict_capacity = 2;
    ra_gpu_cache *c;
    assert_int_equal(ra_gpu_cache_create(&g, &c), RA_OK);
    size_t qb = 4 * 16 * 2, kb = 2 * 16 * 2;
    char *q = tu_alloc(qb + 16), *k = tu_alloc(kb + 16), *v = tu_alloc(kb + 16);
    float *o = tu_alloc(4 * 16 * 4 + 16), *l = tu_alloc(4 * 4 + 16);
    uint64_t s = 13;
    tu_fill(q, 4 * 16, RA_DTYPE_F16, 1, &s);
    tu_fill(k, 2 * 16, RA_DTYPE_F16, 1, &s);
    tu_fill(v, 2 * 16, RA_DTYPE_F16, 1, &s);
    ra_gpu_mem H = RA_GPU_MEM_HOST;
    assert_int_equal(ra_gpu_attend_local(c, 2, H, q, k, v, o, l), RA_ENOLAYER);
    assert_int_equal(ra_gpu_attend_local(c, 0, H, NULL, k, v, o, l), RA_EINVAL);
    assert_int_equal(ra_gpu_attend_local(c, 0, H, q, k, v, o, NULL), RA_EINVAL);
    assert_int_equal(ra_gpu_attend_local(c, 0, H, q + 2, k, v, o, l), RA_EINVAL);
    assert_true(strstr(ra_gpu_cache_last_error(c), "aligned") != NULL);
    assert_int_equal(ra_gpu_attend_local(c, 0, RA_GPU_MEM_DEVICE, q, k, v, o, l), RA_ENOTSUP);
    assert_int_equal(ra_gpu_attend_local(c, 0, (ra_gpu_mem)5, q, k, v, o, l), RA_EINVAL);
    unsigned n = 77, nl = 77;
    assert_int_equal(ra_gpu_cache_tokens(c, 9, &n, &nl), RA_ENOLAYER);
    assert_int_equal(n, 77); /* untouched */
    assert_int_equal(ra_gpu_cache_tokens(c, 0, &n, &nl), RA_OK);
    assert_int_equal(n, 0); /* no failed call advanced anything */
    assert_int_equal(ra_gpu_ingest_prefill(c, 0, H, k, v, 0), RA_ESHAPE);
    assert_int_equal(ra_gpu_ingest_prefill(c, 5, H, k, v, 1), RA_ENOLAYER);
    assert_int_equal(ra_gpu_ingest_prefill(c, 0, H, k, NULL, 1), RA_EINVAL);
    assert_int_equal(ra_gpu_ingest_prefill(c, 0, H, k, v, 1), RA_OK);
    assert_int_equal(ra_gpu_ingest_prefill(c, 0, H, k, v, 1), RA_ESTATE);
    /* fill sink (2) + window (3), then evictions until the stage (2) is full */
    for (int i = 0; i < 4 + 2; i++)
        assert_int_equal(ra_gpu_attend_local(c, 0, H, q, k, v, o, l), RA_OK);
    assert_int_equal(ra_gpu_cache_tokens(c, 0, &n, &nl), RA_OK);
    assert_int_equal(n, 7);
    assert_int_equal(ra_gpu_attend_local(c, 0, H, q, k, v, o, l), RA_EBUSY);
    assert_int_equal(ra_gpu_cache_tokens(c, 0, &n, &nl), RA_OK);
    assert_int_equal(n, 7); /* nothing changed */
    assert_int_equal(ra_gpu_cache_evicted_release(c, 0), RA_ESTATE); /* no view: would drop */
    ra_gpu_staged sv;
    assert_int_equal(ra_gpu_cache_evicted_view(c, 0, &sv), RA_OK);
    assert_int_equal(sv.n_tokens, 2);
    assert_int_equal(sv.pos[0], 2);
    assert_int_equal(sv.pos[1], 3);
    assert_int_equal(ra_gpu_attend_local(c, 0, H, q, k, v, o, l), RA_EBUSY); /* view out */
    assert_int_equal(ra_gpu_cache_evicted_release(c, 0), RA_OK);
    assert_int_equal(ra_gpu_attend_local(c, 0, H, q, k, v, o, l), RA_OK);
    assert_int_equal(ra_gpu_cache_evicted_view(c, 0, &sv), RA_OK);
    assert_int_equal(sv.pos[0], 4);
    assert_int_equal(ra_gpu_cache_evicted_release(c, 0), RA_OK);
    assert_int_equal(ra_gpu_cache_evicted_view(c, 3, &sv), RA_ENOLAYER);
    assert_int_equal(ra_gpu_cache_offload_view(c, 3, &sv), RA_ENOLAYER);
    assert_int_equal(ra_gpu_cache_offload_view(c, 0, NULL), RA_EINVAL);
    assert_int_equal(ra_gpu_cache_set_stream(c, (void *)0x10), RA_ENOTSUP);
    assert_null(ra_gpu_cache_stream(c));
    assert_int_equal(ra_gpu_cache_sync(c), RA_OK);
    /* reset: empty again, ingest allowed */
    assert_int_equal(ra_gpu_cache_reset(c), RA_OK);
    assert_int_equal(ra_gpu_cache_tokens(c, 0, &n, &nl), RA_OK);
    assert_int_equal(n, 0);
    assert_int_equal(ra_gpu_ingest_prefill(c, 0, H, k, v, 1), RA_OK);
    free(q);
    free(k);
    free(v);
    free(o);
    free(l);
    ra_gpu_cache_destroy(c);
}

/* ingest while the previous offload stage is still held: EBUSY; after release: trim */
static void test_offload_stage_lifecycle(void **st)
{
    ra_gpu_config g = mkcfg(RA_DTYPE_F16, 2, 1, 16, 1, 2, 1);
    ra_gpu_cache *c;
    assert_int_equal(ra_gpu_cache_create(&g, &c), RA_OK);
    tu_hist h;
    tu_hist_init(&h, ra_gpu_cache_config(c), 10);
    uint64_t s = 14;
    void *pk, *pv;
    tu_hist_prefill(&h, 10, &s, &pk, &pv);
    assert_int_equal(ra_gpu_ingest_prefill(c, 0, RA_GPU_MEM_HOST, pk, pv, 10), RA_OK);
    assert_int_equal(ra_gpu_cache_reset(c), RA_OK); /* reset drops the stage */
    assert_int_equal(ra_gpu_ingest_prefill(c, 0, RA_GPU_MEM_HOST, pk, pv, 10), RA_OK);
    ra_gpu_staged sv;
    assert_int_equal(ra_gpu_cache_offload_view(c, 0, &sv), RA_OK);
    assert_int_equal(sv.n_tokens, 7);
    ra_gpu_cache_trim(c); /* keeps the pending stage */
    assert_int_equal(ra_gpu_cache_offload_view(c, 0, &sv), RA_OK);
    assert_int_equal(sv.n_tokens, 7);
    assert_int_equal(sv.pos[6], 7);
    assert_int_equal(ra_gpu_cache_offload_release(c, 0), RA_OK);
    ra_gpu_cache_trim(c);
    assert_int_equal(ra_gpu_cache_offload_view(c, 0, &sv), RA_OK);
    assert_int_equal(sv.n_tokens, 0);
    free(pk);
    free(pv);
    tu_hist_free(&h);
    ra_gpu_cache_destroy(c);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_attend_f32),
        cmocka_unit_test(test_attend_f16_gqa),
        cmocka_unit_test(test_attend_bf16_mha),
        cmocka_unit_test(test_ring_wrap_from_empty),
        cmocka_unit_test(test_sink_fills_first),
        cmocka_unit_test(test_merge_edges),
        cmocka_unit_test(test_knn_cpu),
        cmocka_unit_test(test_bad_config),
        cmocka_unit_test(test_bad_input),
        cmocka_unit_test(test_offload_stage_lifecycle),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
