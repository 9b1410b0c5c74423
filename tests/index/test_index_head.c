/* ra_head (ra_index.h) with every backend: exact search equals brute force; attend
 * matches a double reference; searches during a background build are answered exactly;
 * rows appended during and after a build are searchable at once; the FAISS baselines
 * reach high recall at high effort and report honest `scanned`; degenerate data
 * (all-equal keys, zero vectors, N < top_k, a single key, duplicate positions) never
 * hangs or crashes, and NaN/Inf are refused with RA_ENONFINITE. */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <cmocka.h>

#include <dirent.h>
#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "idx_test_util.h"
#include "ra_backend.h"
#include "ra_index.h"
#include "ra_kernels.h"
#include "ra_log.h"

static const ra_index_kind KINDS[] = {RA_INDEX_FLAT,  RA_INDEX_IVF,        RA_INDEX_HNSW,
                                      RA_INDEX_GRAPH, RA_INDEX_FAISS_FLAT, RA_INDEX_PSCAN};
#define NK (int)(sizeof KINDS / sizeof KINDS[0])

typedef struct fixture {
    ra_head *h;
    int dim;
    ra_dtype dt;
    size_t n;
    void *k, *v; /* what was appended, in the head's dtype */
} fixture;

static ra_head *new_head(ra_index_kind kind, int dim, ra_dtype dt, ra_mem *acct)
{
    ra_index_opts o;
    ra_index_opts_default(&o);
    o.kind = kind;
    o.threads = 2;
    ra_head *h = NULL;
    assert_int_equal(ra_head_create(&h, dim, dt, &o, acct), RA_OK);
    return h;
}

static void fx_init(fixture *f, ra_index_kind kind, int dim, ra_dtype dt, size_t n, uint64_t seed)
{
    trng r = {seed};
    f->dim = dim;
    f->dt = dt;
    f->n = n;
    f->h = new_head(kind, dim, dt, NULL);
    f->k = tfill(&r, dt, n * dim + 1, 1.f);
    f->v = tfill(&r, dt, n * dim + 1, 1.f);
    int64_t *pos = malloc((n + 1) * sizeof *pos);
    for (size_t i = 0; i < n; i++)
        pos[i] = 1000 + (int64_t)i;
    if (n)
        assert_int_equal(ra_head_append(f->h, f->k, f->v, pos, n), RA_OK);
    free(pos);
}

static void fx_fini(fixture *f)
{
    ra_head_destroy(f->h);
    free(f->k);
    free(f->v);
}

static float *rand_queries(uint64_t seed, size_t nq, int dim, float scale)
{
    trng r = {seed};
    float *q = malloc(nq * dim * sizeof *q + 4);
    for (size_t i = 0; i < nq * dim; i++)
        q[i] = scale * trng_gauss(&r);
    return q;
}

/* Reference: all n true scores in double, and the k-th best. */
static int cmp_desc(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return (x < y) - (x > y);
}

static double kth_score(const float *q, const void *K, ra_dtype dt, int dim, size_t n, int k,
                        double *all)
{
    if (n == 0)
        return INFINITY;
    double *s = malloc(n * sizeof *s);
    for (size_t i = 0; i < n; i++) {
        s[i] = tdot(q, K, dt, dim, i, NULL);
        if (all)
            all[i] = s[i];
    }
    qsort(s, n, sizeof *s, cmp_desc);
    double kth = s[((size_t)k < n ? (size_t)k : n) - 1];
    free(s);
    return kth;
}

static void check_exact(fixture *f, const float *q, int k, const int32_t *ids, const float *sc,
                        int n_out)
{
    size_t want = (size_t)k < f->n ? (size_t)k : f->n;
    assert_int_equal(n_out, want);
    double *all = malloc(f->n * sizeof *all);
    double kth = kth_score(q, f->k, f->dt, f->dim, f->n, k, all);
    double tol = 1e-4 * (1 + fabs(kth));
    for (int i = 0; i < n_out; i++) {
        assert_true(ids[i] >= 0 && (size_t)ids[i] < f->n);
        if (!(fabs(sc[i] - all[ids[i]]) <= tol))
            fail_msg("score of id %d: %g, true %g", ids[i], sc[i], all[ids[i]]);
        if (!(all[ids[i]] >= kth - tol))
            fail_msg("id %d (score %g) is not in the top %d (k-th %g)", ids[i], all[ids[i]], k,
                     kth);
        if (i)
            assert_true(sc[i] <= sc[i - 1]);
        for (int j = 0; j < i; j++)
            assert_int_not_equal(ids[i], ids[j]);
    }
    free(all);
}

static void test_args(void **state)
{
    (void)state;
    ra_head *h = (ra_head *)0x1;
    ra_index_opts o;
    ra_index_opts_default(&o);
    o.kind = (ra_index_kind)9;
    assert_int_equal(ra_head_create(&h, 64, RA_DTYPE_F16, &o, NULL), RA_EINVAL);
    assert_int_equal(ra_head_create(&h, 0, RA_DTYPE_F16, NULL, NULL), RA_EINVAL);
    assert_int_equal(ra_head_create(&h, 64, (ra_dtype)3, NULL, NULL), RA_EINVAL);
    assert_ptr_equal(h, (ra_head *)0x1);
    for (int ki = 0; ki < NK; ki++) {
        h = new_head(KINDS[ki], 16, RA_DTYPE_F16, NULL);
        float q[16] = {1};
        int32_t ids[4] = {-7, -7, -7, -7};
        float sc[4], o[16], lse = 0;
        int n = -1;
        ra_search_params p = {.k = 4};
        /* empty head: valid, nothing found */
        assert_int_equal(ra_head_search(h, q, &p, ids, sc, &n, NULL), RA_OK);
        assert_int_equal(n, 0);
        assert_int_equal(ra_head_attend(h, q, &p, 0, o, &lse, NULL, NULL, &n, NULL), RA_OK);
        assert_true(isinf(lse) && lse < 0);
        assert_true(o[0] == 0.f);
        assert_int_equal(ra_head_build(h, NULL, 0, 0), RA_OK); /* build over nothing */
        assert_int_equal(ra_head_search(h, q, &p, ids, sc, &n, NULL), RA_OK);
        assert_int_equal(n, 0);
        n = -1;
        p.k = 0;
        assert_int_equal(ra_head_search(h, q, &p, ids, sc, &n, NULL), RA_EINVAL);
        p.k = 1 << 20;
        assert_int_equal(ra_head_search(h, q, &p, ids, sc, &n, NULL), RA_EINVAL);
        p.k = 4;
        p.effort = -1;
        assert_int_equal(ra_head_search(h, q, &p, ids, sc, &n, NULL), RA_EINVAL);
        p.effort = 0;
        assert_int_equal(ra_head_search(h, NULL, &p, ids, sc, &n, NULL), RA_EINVAL);
        assert_int_equal(ra_head_search(h, q, NULL, ids, sc, &n, NULL), RA_EINVAL);
        assert_int_equal(ra_head_search(h, q, &p, NULL, sc, &n, NULL), RA_EINVAL);
        q[3] = NAN;
        assert_int_equal(ra_head_search(h, q, &p, ids, sc, &n, NULL), RA_ENONFINITE);
        q[3] = INFINITY;
        assert_int_equal(ra_head_attend(h, q, &p, 0, o, &lse, NULL, NULL, &n, NULL), RA_ENONFINITE);
        assert_int_equal(n, -1); /* out-parameters untouched on failure */
        assert_int_equal(ra_head_build(h, NULL, 5, 0), RA_EINVAL);
        assert_int_equal(ra_head_build(h, q, 1, 0), RA_ENONFINITE);
        ra_head_destroy(h);
    }
    ra_head_destroy(NULL);
    assert_string_equal(ra_index_kind_name(RA_INDEX_IVF), "ivf");
    assert_string_equal(ra_index_kind_name(RA_INDEX_FAISS_FLAT), "faiss-flat");
}

static void test_exact_equals_bruteforce(void **state)
{
    (void)state;
    ra_dtype dts[3] = {RA_DTYPE_F32, RA_DTYPE_F16, RA_DTYPE_BF16};
    for (int d = 0; d < 6; d++) {
        fixture f;
        fx_init(&f, d < 3 ? RA_INDEX_FLAT : RA_INDEX_FAISS_FLAT, 48, dts[d % 3], 3001, 100 + d);
        float *q = rand_queries(7, 20, f.dim, 1.f);
        int ks[3] = {1, 100, 5000};
        for (int built = 0; built < 2; built++) {
            if (built) {
                assert_int_equal(ra_head_build(f.h, NULL, 0, 0), RA_OK);
                assert_int_equal(ra_head_ready(f.h), 1);
            }
            for (int t = 0; t < 20; t++)
                for (int ki = 0; ki < 3; ki++) {
                    ra_search_params p = {.k = ks[ki]};
                    int32_t *ids = malloc(ks[ki] * sizeof *ids);
                    float *sc = malloc(ks[ki] * sizeof *sc);
                    int n = -1;
                    ra_search_stats st;
                    assert_int_equal(ra_head_search(f.h, q + t * f.dim, &p, ids, sc, &n, &st), RA_OK);
                    check_exact(&f, q + t * f.dim, ks[ki], ids, sc, n);
                    assert_int_equal(st.exact_fallback, !built);
                    assert_int_equal(st.scanned, f.n);
                    free(ids);
                    free(sc);
                }
        }
        free(q);
        fx_fini(&f);
    }
}

static void test_attend_reference(void **state)
{
    (void)state;
    ra_dtype dts[3] = {RA_DTYPE_F32, RA_DTYPE_F16, RA_DTYPE_BF16};
    for (int d = 0; d < 3; d++) {
        fixture f;
        fx_init(&f, RA_INDEX_FLAT, 128, dts[d], 2000, 200 + d);
        float *q = rand_queries(8, 5, f.dim, 0.5f);
        for (int t = 0; t < 5; t++) {
            ra_search_params p = {.k = 100};
            int32_t ids[100];
            float sc[100], o[128], lse;
            int n;
            assert_int_equal(ra_head_attend(f.h, q + t * f.dim, &p, 0, o, &lse, ids, sc, &n, NULL),
                             RA_OK);
            assert_int_equal(n, 100);
            double sd[100], ro[128], rl;
            for (int i = 0; i < n; i++)
                sd[i] = tdot(q + t * f.dim, f.k, f.dt, f.dim, ids[i], NULL);
            tattn(sd, ids, n, 1.0 / sqrt(f.dim), f.v, f.dt, f.dim, ro, &rl);
            assert_true(fabs(lse - rl) <= 1e-4 * (1 + fabs(rl)));
            for (int j = 0; j < f.dim; j++)
                assert_true(fabs(o[j] - ro[j]) <= 1e-4);
            /* without id/score arrays, and an explicit scale */
            float o2[128], l2;
            assert_int_equal(ra_head_attend(f.h, q + t * f.dim, &p, 0.25f, o2, &l2, NULL, NULL, NULL,
                                            NULL),
                             RA_OK);
            tattn(sd, ids, n, 0.25, f.v, f.dt, f.dim, ro, &rl);
            assert_true(fabs(l2 - rl) <= 1e-4 * (1 + fabs(rl)));
            int64_t pos[100];
            ra_head_positions(f.h, ids, 100, pos);
            for (int i = 0; i < 100; i++)
                assert_int_equal(pos[i], 1000 + ids[i]);
        }
        int32_t bad[2] = {-1, 1 << 30};
        int64_t pos[2];
        ra_head_positions(f.h, bad, 2, pos);
        assert_int_equal(pos[0], -1);
        assert_int_equal(pos[1], -1);
        free(q);
        fx_fini(&f);
    }
}

/* A key far out along unit direction u: with gaussian keys of norm ~sqrt(dim), q = u
 * scores it `mag` and every other key ~N(0,1), so it must come first. */
static void outlier(trng *r, int dim, float mag, float *u, void *k, ra_dtype dt)
{
    double nn = 0;
    for (int j = 0; j < dim; j++) {
        u[j] = trng_gauss(r);
        nn += (double)u[j] * u[j];
    }
    for (int j = 0; j < dim; j++) {
        u[j] = (float)(u[j] / sqrt(nn));
        tset(k, dt, j, mag * u[j]);
    }
}

typedef struct searcher {
    ra_head *h;
    int dim;
    int stop;
    long n_fallback, n_index, errors;
} searcher;

static void *search_loop(void *arg)
{
    searcher *s = arg;
    float *q = rand_queries(77, 1, s->dim, 1.f);
    while (!__atomic_load_n(&s->stop, __ATOMIC_ACQUIRE)) {
        /* efforts differ between calls: the FAISS backends must switch nprobe/efSearch
         * under their lock while other threads search */
        ra_search_params p = {.k = 10, .effort = (int)((s->n_fallback + s->n_index) % 3) * 24};
        int32_t ids[10];
        float sc[10], o[64], lse;
        int n;
        ra_search_stats st;
        if (ra_head_attend(s->h, q, &p, 0, o, &lse, ids, sc, &n, &st) != RA_OK || n != 10)
            s->errors++;
        else if (st.exact_fallback)
            s->n_fallback++;
        else
            s->n_index++;
        usleep(100); /* leave the build its cores: the test machine is small */
    }
    free(q);
    return NULL;
}

static void test_search_during_build(void **state)
{
    (void)state;
    ra_index_kind kinds[2] = {RA_INDEX_HNSW, RA_INDEX_GRAPH};
    for (int ki = 0; ki < 2; ki++) {
        fixture f;
        fx_init(&f, kinds[ki], 64, RA_DTYPE_F16, 12000, 300 + ki);
        float *tq = rand_queries(9, 512, f.dim, 1.f);
        searcher s = {f.h, f.dim, 0, 0, 0, 0};
        pthread_t th;
        assert_int_equal(ra_head_build(f.h, tq, 512, 1), RA_OK);
        assert_int_equal(pthread_create(&th, NULL, search_loop, &s), 0);
        /* while it builds: exact answers, appends accepted, a second build refused */
        int saw_busy = 0, exact_checked = 0;
        trng r = {31};
        float u[8][64];
        uint16_t kout[64], vout[64];
        for (int j = 0; j < 64; j++)
            vout[j] = ra_f32_to_f16(0.5f);
        for (int a = 0; a < 8; a++) {
            outlier(&r, f.dim, 30.f, u[a], kout, RA_DTYPE_F16);
            int64_t pos = 5000000 + a;
            assert_int_equal(ra_head_append(f.h, kout, vout, &pos, 1), RA_OK);
            if (!ra_head_ready(f.h)) {
                ra_status bs = ra_head_build(f.h, tq, 512, 1);
                saw_busy |= bs == RA_EBUSY;
                if (bs == RA_OK) /* the first build already finished: fine */
                    ra_head_wait(f.h);
                int32_t ids[5];
                float sc[5];
                int n;
                ra_search_stats st;
                ra_search_params p = {.k = 5};
                assert_int_equal(ra_head_search(f.h, u[a], &p, ids, sc, &n, &st), RA_OK);
                if (st.exact_fallback) {
                    assert_int_equal(ids[0], (int32_t)(f.n + a)); /* appended: found at once */
                    assert_int_equal(st.scanned, f.n + a + 1);
                    exact_checked++;
                }
            }
        }
        ra_head_wait(f.h);
        __atomic_store_n(&s.stop, 1, __ATOMIC_RELEASE);
        pthread_join(th, NULL);
        fprintf(stderr, "# %s: %ld searches during the build (exact), %ld after, busy seen %d, "
                        "%d exact checks\n",
                ra_index_kind_name(kinds[ki]), s.n_fallback, s.n_index, saw_busy, exact_checked);
        assert_int_equal(s.errors, 0);
        assert_true(s.n_fallback + exact_checked > 0); /* the build took some time */
        assert_int_equal(ra_head_ready(f.h), 1);
        assert_int_equal(ra_head_count(f.h), f.n + 8);
        /* rows appended during the build were inserted into the index at its end */
        for (int a = 0; a < 8; a++) {
            int32_t ids[5];
            float sc[5];
            int n;
            ra_search_stats st;
            ra_search_params p = {.k = 5, .effort = 128};
            assert_int_equal(ra_head_search(f.h, u[a], &p, ids, sc, &n, &st), RA_OK);
            assert_int_equal(st.exact_fallback, 0);
            if (ids[0] != (int32_t)(f.n + a))
                fail_msg("%s: row %zu, appended during the build, not found first after it "
                         "(got %d, score %g)",
                         ra_index_kind_name(kinds[ki]), f.n + a, ids[0], sc[0]);
        }
        free(tq);
        fx_fini(&f);
    }
}

static void test_append_after_build(void **state)
{
    (void)state;
    for (int ki = 0; ki < NK; ki++) {
        fixture f;
        fx_init(&f, KINDS[ki], 32, RA_DTYPE_BF16, 3000, 400 + ki);
        float *tq = rand_queries(10, 256, f.dim, 1.f);
        assert_int_equal(ra_head_build(f.h, tq, 256, 0), RA_OK);
        assert_int_equal(ra_head_ready(f.h), 1);
        trng r = {41};
        for (int a = 0; a < 20; a++) {
            float u[32];
            uint16_t k[32], v[32];
            outlier(&r, f.dim, 25.f, u, k, RA_DTYPE_BF16);
            memcpy(v, k, sizeof v);
            int64_t pos = 777;
            assert_int_equal(ra_head_append(f.h, k, v, &pos, 1), RA_OK);
            int32_t ids[10];
            float sc[10];
            int n;
            ra_search_stats st;
            ra_search_params p = {.k = 10, .effort = 64};
            assert_int_equal(ra_head_search(f.h, u, &p, ids, sc, &n, &st), RA_OK);
            assert_int_equal(st.exact_fallback, 0);
            if (ids[0] != (int32_t)(f.n + a))
                fail_msg("%s: appended row %zu not found first (got %d)",
                         ra_index_kind_name(KINDS[ki]), f.n + a, ids[0]);
            int64_t p0;
            ra_head_positions(f.h, ids, 1, &p0);
            assert_int_equal(p0, 777);
        }
        free(tq);
        fx_fini(&f);
    }
}

static double recall_at(fixture *f, const float *q, int nq, int k, int effort, double *scan_frac,
                        ra_index_kind *kind_out)
{
    double hit = 0, scanned = 0;
    int32_t *ids = malloc(k * sizeof *ids);
    float *sc = malloc(k * sizeof *sc);
    for (int t = 0; t < nq; t++) {
        ra_search_params p = {.k = k, .effort = effort};
        int n;
        ra_search_stats st;
        assert_int_equal(ra_head_search(f->h, q + t * f->dim, &p, ids, sc, &n, &st), RA_OK);
        assert_int_equal(st.exact_fallback, 0);
        double kth = kth_score(q + t * f->dim, f->k, f->dt, f->dim, f->n, k, NULL);
        for (int i = 0; i < n; i++)
            hit += tdot(q + t * f->dim, f->k, f->dt, f->dim, ids[i], NULL) >= kth - 1e-5;
        scanned += (double)st.scanned;
    }
    free(ids);
    free(sc);
    *scan_frac = scanned / nq / (double)f->n;
    (void)kind_out;
    return hit / ((double)nq * k);
}

static void test_baseline_recall(void **state)
{
    (void)state;
    const ra_index_kind bk[4] = {RA_INDEX_FLAT, RA_INDEX_IVF, RA_INDEX_HNSW, RA_INDEX_FAISS_FLAT};
    for (int bi = 0; bi < 4; bi++) {
        fixture f;
        size_t n = 8000;
        ra_index_kind kind = bk[bi];
        fx_init(&f, kind, 32, RA_DTYPE_F16, n, 500 + bi);
        assert_int_equal(ra_head_build(f.h, NULL, 0, 0), RA_OK);
        float *q = rand_queries(11, 30, f.dim, 1.f);
        double frac_lo, frac_hi;
        double lo = recall_at(&f, q, 30, 50, 1, &frac_lo, NULL);
        double hi = recall_at(&f, q, 30, 50, kind == RA_INDEX_IVF ? 1 << 20 : 1000, &frac_hi,
                              NULL);
        fprintf(stderr, "# %s: recall@50 %.3f (scanned %.3f) at low effort, %.3f (scanned %.3f) "
                        "at high effort\n",
                ra_index_kind_name(kind), lo, frac_lo, hi, frac_hi);
        switch (kind) {
        case RA_INDEX_FLAT:
        case RA_INDEX_FAISS_FLAT:
            assert_true(lo == 1.0 && hi == 1.0);
            assert_true(frac_lo == 1.0);
            break;
        case RA_INDEX_IVF: /* every list probed: exact, and honest counts */
            assert_true(hi >= 0.999);
            assert_true(fabs(frac_hi - 1.0) < 1e-9);
            assert_true(frac_lo > 0 && frac_lo < 0.1);
            assert_true(lo < hi);
            break;
        case RA_INDEX_HNSW:
            assert_true(hi >= 0.95);
            assert_true(frac_hi > 0.0 && frac_hi < 1.0);
            break;
        default:
            break;
        }
        free(q);
        fx_fini(&f);
    }
}

/* Degenerate inputs through every backend: a build and searches must finish and give
 * valid answers. */
static void degenerate_case(ra_index_kind kind, const char *what, size_t n, int dim,
                            void (*fill)(void *k, void *v, int64_t *pos, size_t n, int dim))
{
    ra_head *h = new_head(kind, dim, RA_DTYPE_F16, NULL);
    uint16_t *k = calloc(n * dim + 1, 2), *v = calloc(n * dim + 1, 2);
    int64_t *pos = calloc(n + 1, sizeof *pos);
    fill(k, v, pos, n, dim);
    assert_int_equal(ra_head_append(h, k, v, pos, n), RA_OK);
    float *tq = rand_queries(12, 32, dim, 1.f);
    ra_status bs = ra_head_build(h, tq, 32, 0);
    if (bs != RA_OK)
        fail_msg("%s/%s: build failed: %s", ra_index_kind_name(kind), what, ra_strerror(bs));
    for (int t = 0; t < 4; t++) {
        int32_t ids[100];
        float sc[100], o[64], lse;
        int nout = -1;
        ra_search_stats st;
        ra_search_params p = {.k = 100, .effort = t * 40};
        assert_int_equal(ra_head_attend(h, tq + t * dim, &p, 0, o, &lse, ids, sc, &nout, &st), RA_OK);
        size_t want = n < 100 ? n : 100;
        if (!(nout >= 1 && (size_t)nout <= want))
            fail_msg("%s/%s: %d results for %zu keys", ra_index_kind_name(kind), what, nout, n);
        if ((kind == RA_INDEX_FLAT || st.exact_fallback) && (size_t)nout != want)
            fail_msg("%s/%s: exact search gave %d of %zu", ra_index_kind_name(kind), what, nout,
                     want);
        for (int i = 0; i < nout; i++) {
            assert_true(ids[i] >= 0 && (size_t)ids[i] < n);
            for (int j = 0; j < i; j++)
                if (ids[i] == ids[j])
                    fail_msg("%s/%s: id %d returned twice", ra_index_kind_name(kind), what, ids[i]);
        }
        assert_true(isfinite(lse));
        for (int j = 0; j < dim; j++)
            assert_true(isfinite(o[j]));
    }
    /* appends after the build still work on degenerate data */
    assert_int_equal(ra_head_append(h, k, v, pos, n < 50 ? n : 50), RA_OK);
    int32_t ids[5];
    float sc[5];
    int nout;
    ra_search_params p = {.k = 5};
    assert_int_equal(ra_head_search(h, tq, &p, ids, sc, &nout, NULL), RA_OK);
    assert_true(nout >= 1);
    free(tq);
    free(k);
    free(v);
    free(pos);
    ra_head_destroy(h);
}

static void fill_equal(void *k, void *v, int64_t *pos, size_t n, int dim)
{
    for (size_t i = 0; i < n; i++) {
        for (int j = 0; j < dim; j++) {
            tset(k, RA_DTYPE_F16, i * dim + j, 0.25f * (float)((j % 5) - 2));
            tset(v, RA_DTYPE_F16, i * dim + j, (float)(i % 7));
        }
        pos[i] = (int64_t)i;
    }
}
static void fill_zero(void *k, void *v, int64_t *pos, size_t n, int dim)
{
    for (size_t i = 0; i < n; i++) {
        for (int j = 0; j < dim; j++)
            tset(v, RA_DTYPE_F16, i * dim + j, 1.f);
        pos[i] = (int64_t)i;
    }
}
static void fill_rand_duppos(void *k, void *v, int64_t *pos, size_t n, int dim)
{
    trng r = {13};
    for (size_t i = 0; i < n * dim; i++) {
        tset(k, RA_DTYPE_F16, i, trng_gauss(&r));
        tset(v, RA_DTYPE_F16, i, trng_gauss(&r));
    }
    for (size_t i = 0; i < n; i++)
        pos[i] = 7; /* every token claims the same position */
}

static void test_degenerate(void **state)
{
    (void)state;
    for (int ki = 0; ki < NK; ki++) {
        degenerate_case(KINDS[ki], "all-equal keys", 600, 16, fill_equal);
        degenerate_case(KINDS[ki], "zero keys", 600, 16, fill_zero);
        degenerate_case(KINDS[ki], "N < top_k", 5, 16, fill_rand_duppos);
        degenerate_case(KINDS[ki], "single key", 1, 16, fill_rand_duppos);
        degenerate_case(KINDS[ki], "duplicate positions", 700, 16, fill_rand_duppos);
    }
    /* zero keys: all scores 0, so attention is the plain mean of the retrieved V */
    ra_head *h = new_head(RA_INDEX_FLAT, 8, RA_DTYPE_F32, NULL);
    float k[3 * 8] = {0}, v[3 * 8], q[8] = {1, 2, 3, 4, 5, 6, 7, 8}, o[8], lse;
    for (int i = 0; i < 24; i++)
        v[i] = (float)(i / 8);
    int64_t pos[3] = {1, 1, 1};
    assert_int_equal(ra_head_append(h, k, v, pos, 3), RA_OK);
    ra_search_params p = {.k = 10};
    int n;
    assert_int_equal(ra_head_attend(h, q, &p, 0, o, &lse, NULL, NULL, &n, NULL), RA_OK);
    assert_int_equal(n, 3);
    assert_float_equal(lse, logf(3.f), 1e-6);
    for (int j = 0; j < 8; j++)
        assert_float_equal(o[j], 1.f, 1e-6);
    ra_head_destroy(h);
}

static void test_nonfinite_rejected(void **state)
{
    (void)state;
    for (int ki = 0; ki < NK; ki++) {
        fixture f;
        fx_init(&f, KINDS[ki], 16, RA_DTYPE_F16, 300, 600 + ki);
        uint16_t k[2 * 16], v[2 * 16];
        memcpy(k, f.k, sizeof k);
        memcpy(v, f.v, sizeof v);
        int64_t pos[2] = {1, 2};
        k[17] = 0x7c00; /* +Inf */
        assert_int_equal(ra_head_append(f.h, k, v, pos, 2), RA_ENONFINITE);
        k[17] = 0;
        v[0] = 0x7e00; /* NaN */
        assert_int_equal(ra_head_append(f.h, k, v, pos, 2), RA_ENONFINITE);
        assert_int_equal(ra_head_count(f.h), 300);
        float *tq = rand_queries(14, 8, 16, 1.f);
        tq[5] = NAN;
        assert_int_equal(ra_head_build(f.h, tq, 8, 1), RA_ENONFINITE);
        assert_int_equal(ra_head_ready(f.h), 0);
        tq[5] = 0;
        assert_int_equal(ra_head_build(f.h, tq, 8, 0), RA_OK);
        v[0] = 0;
        assert_int_equal(ra_head_append(f.h, k, v, pos, 2), RA_OK);
        assert_int_equal(ra_head_count(f.h), 302);
        free(tq);
        fx_fini(&f);
    }
}

static void test_memory_limit(void **state)
{
    (void)state;
    ra_mem acct = {.limit = 4 << 20, .used = 0};
    ra_head *h = new_head(RA_INDEX_FLAT, 64, RA_DTYPE_F16, &acct);
    trng r = {15};
    size_t n = 20000; /* 20000 * (2*128 + 8) = 5.3 MB > 4 MiB */
    void *k = tfill(&r, RA_DTYPE_F16, n * 64, 1.f), *v = tfill(&r, RA_DTYPE_F16, n * 64, 1.f);
    int64_t *pos = calloc(n, sizeof *pos);
    assert_int_equal(ra_head_append(h, k, v, pos, n), RA_ENOMEM);
    assert_int_equal(ra_head_count(h), 0);
    assert_int_equal(ra_head_append(h, k, v, pos, 5000), RA_OK);
    /* the FAISS flat copy (5000*64*4 = 1.3 MB) fits; the head stays usable either way */
    ra_status bs = ra_head_build(h, NULL, 0, 0);
    assert_true(bs == RA_OK || bs == RA_ENOMEM);
    assert_true(acct.used <= acct.limit);
    float q[64] = {1};
    int32_t ids[3];
    float sc[3];
    int nout;
    ra_search_params p = {.k = 3};
    assert_int_equal(ra_head_search(h, q, &p, ids, sc, &nout, NULL), RA_OK);
    assert_int_equal(nout, 3);
    assert_true(ra_head_bytes(h) > 5000 * 2 * 128);
    ra_head_destroy(h);
    assert_int_equal(acct.used, 0);
    free(k);
    free(v);
    free(pos);
}

/* Searches from three threads while appends go on, on a built index of each kind. */
static void test_concurrent_search_append(void **state)
{
    (void)state;
    for (int ki = 0; ki < NK; ki++) {
        fixture f;
        fx_init(&f, KINDS[ki], 64, RA_DTYPE_F16, 4000, 700 + ki);
        float *tq = rand_queries(18, 256, f.dim, 1.f);
        assert_int_equal(ra_head_build(f.h, tq, 256, 0), RA_OK);
        searcher s[3];
        pthread_t th[3];
        for (int t = 0; t < 3; t++) {
            s[t] = (searcher){f.h, f.dim, 0, 0, 0, 0};
            assert_int_equal(pthread_create(&th[t], NULL, search_loop, &s[t]), 0);
        }
        int64_t pos[10] = {0};
        for (int a = 0; a < 100; a++) {
            assert_int_equal(ra_head_append(f.h, (uint16_t *)f.k + (size_t)(a * 10) * f.dim,
                                            (uint16_t *)f.v + (size_t)(a * 10) * f.dim, pos, 10),
                             RA_OK);
            usleep(500);
        }
        long total = 0;
        for (int t = 0; t < 3; t++) {
            __atomic_store_n(&s[t].stop, 1, __ATOMIC_RELEASE);
            pthread_join(th[t], NULL);
            assert_int_equal(s[t].errors, 0);
            assert_int_equal(s[t].n_fallback, 0);
            total += s[t].n_index;
        }
        assert_true(total > 0);
        assert_int_equal(ra_head_count(f.h), 5000);
        free(tq);
        fx_fini(&f);
    }
}

/* Scores returned for ids are their exact inner products, best first, ids distinct. */
static void check_scores_exact(fixture *f, const float *q, const int32_t *ids, const float *sc,
                               int n)
{
    for (int i = 0; i < n; i++) {
        assert_true(ids[i] >= 0 && (size_t)ids[i] < f->n);
        double e = tdot(q, f->k, f->dt, f->dim, (size_t)ids[i], NULL);
        if (!(fabs(sc[i] - e) <= 1e-4 * (1 + fabs(e))))
            fail_msg("score of id %d: %g, exact %g", ids[i], sc[i], e);
        if (i)
            assert_true(sc[i] <= sc[i - 1]);
        for (int j = 0; j < i; j++)
            assert_int_not_equal(ids[i], ids[j]);
    }
}

/* o and lse are the exact partial attention over ids (double reference). */
static void check_attn_over(fixture *f, const float *q, const int32_t *ids, int n, const float *o,
                            float lse)
{
    double *s = malloc(((size_t)n + 1) * sizeof *s), ro[1024], rl;
    assert_true(n >= 0 && f->dim <= 1024);
    for (int i = 0; i < n; i++)
        s[i] = tdot(q, f->k, f->dt, f->dim, (size_t)ids[i], NULL);
    tattn(s, ids, (size_t)n, 1.0 / sqrt((double)f->dim), f->v, f->dt, f->dim, ro, &rl);
    assert_true(fabs(lse - rl) <= 1e-4 * (1 + fabs(rl)));
    for (int d = 0; d < f->dim; d++)
        assert_true(fabs(o[d] - ro[d]) <= 1e-4);
    free(s);
}

/* |ids in the exact top k| / k (ties at the k-th score count as hits). */
static double recall_vs_exact(fixture *f, const float *q, int k, const int32_t *ids, int n)
{
    double kth = kth_score(q, f->k, f->dt, f->dim, f->n, k, NULL), hit = 0;
    for (int i = 0; i < n; i++)
        hit += tdot(q, f->k, f->dt, f->dim, (size_t)ids[i], NULL) >= kth - 1e-5;
    return hit / k;
}

/* ra_head_attend_group gives what nq single calls give, on the exact path (one pass over
 * the keys) and through an index. */
/* The projected-code scan on a head whose queries are out of distribution for its keys
 * (keys spread along the last dimensions and offset, queries along the first ones, as
 * real heads): recall@50 at the default effort against exact in double; an effort of n
 * rescored every key (exact answer); a group of 6 queries with different k (one 0) gives
 * each query what it gets alone; keys appended after the build (n not a multiple of 16
 * before and after) are found; dims that are not a multiple of 8 are projected. */
static void test_pscan(void **state)
{
    (void)state;
    const int dims[] = {128, 60};
    for (int di = 0; di < 2; di++) {
        int dim = dims[di];
        size_t n = 20000 + 7;
        trng r = {4242 + (uint64_t)di};
        float *kf = malloc((n + 64) * dim * sizeof *kf);
        for (size_t i = 0; i < n + 64; i++)
            for (int j = 0; j < dim; j++)
                kf[i * dim + j] = 0.3f + trng_gauss(&r) * (0.2f + 1.5f * j / dim);
        enum { NT = 1024, NQ = 40, K = 50 };
        float *tq = malloc((NT + NQ) * dim * sizeof *tq);
        for (int i = 0; i < NT + NQ; i++)
            for (int j = 0; j < dim; j++)
                tq[i * dim + j] = trng_gauss(&r) * (2.0f - 1.7f * j / dim);
        float *q = tq + NT * dim;
        fixture f = {.h = new_head(RA_INDEX_PSCAN, dim, RA_DTYPE_BF16, NULL),
                     .dim = dim,
                     .dt = RA_DTYPE_BF16,
                     .n = n};
        f.k = malloc((n + 64) * dim * 2);
        f.v = malloc((n + 64) * dim * 2);
        ra_kern_from_f32(kf, RA_DTYPE_BF16, (n + 64) * dim, f.k);
        ra_kern_from_f32(kf, RA_DTYPE_BF16, (n + 64) * dim, f.v);
        int64_t *pos = malloc((n + 64) * sizeof *pos);
        for (size_t i = 0; i < n + 64; i++)
            pos[i] = (int64_t)i;
        assert_int_equal(ra_head_append(f.h, f.k, f.v, pos, n), RA_OK);
        assert_int_equal(ra_head_build(f.h, tq, NT, 0), RA_OK);
        assert_true(ra_head_ready(f.h));
        double frac;
        double rec = recall_at(&f, q, NQ, K, 0, &frac, NULL);
        fprintf(stderr, "# pscan dim %d: recall@%d %.3f at the default effort\n", dim, K, rec);
        assert_true(rec >= 0.95);
        /* every code is scored, some groups twice (a sample that primed too high) */
        assert_true(frac >= 1.0 && frac <= 1.1);
        /* effort n: every key rescored, the exact answer */
        for (int t = 0; t < 3; t++) {
            int32_t ids[K];
            float sc[K];
            int no;
            ra_search_params p = {.k = K, .effort = (int)n};
            assert_int_equal(ra_head_search(f.h, q + t * dim, &p, ids, sc, &no, NULL), RA_OK);
            check_exact(&f, q + t * dim, K, ids, sc, no);
        }
        /* a group: each query alone gets the same answer */
        enum { G = 6 };
        ra_search_params pg[G];
        const int kk[G] = {50, 10, 0, 50, 1, 33};
        for (int j = 0; j < G; j++)
            pg[j] = (ra_search_params){.k = kk[j]};
        int32_t gi[G * K];
        float gs[G * K], go[G * 128], gl[G];
        int gn[G];
        assert_int_equal(ra_head_attend_group(f.h, G, q, pg, 0, 0, go, gl, gi, gs, gn, NULL),
                         RA_OK);
        for (int j = 0; j < G; j++) {
            int32_t ids[K];
            float sc[K], o[128], l;
            int no;
            if (kk[j] == 0) { /* nothing read for it */
                assert_int_equal(gn[j], 0);
                assert_true(isinf(gl[j]) && gl[j] < 0);
                continue;
            }
            assert_int_equal(ra_head_attend(f.h, q + j * dim, &pg[j], 0, o, &l, ids, sc, &no, NULL),
                             RA_OK);
            assert_int_equal(no, gn[j]);
            assert_int_equal(no, kk[j]);
            for (int i = 0; i < no; i++) {
                assert_int_equal(ids[i], gi[j * K + i]);
                assert_true(sc[i] == gs[j * K + i]);
            }
            assert_true(fabsf(l - gl[j]) <= 1e-5f * (1 + fabsf(l)));
        }
        /* cut over the keys: parts called in reverse order; at effort n every part rescores
         * all its keys, so the merge is the exact answer, as the group's; at the default
         * effort the recall holds */
        for (int np = 1; np <= 5; np += 2)
            for (int eff = 0; eff < 2; eff++) {
                ra_search_params pp[G];
                for (int j = 0; j < G; j++)
                    pp[j] = (ra_search_params){.k = kk[j], .effort = eff ? (int)n : 0};
                void *ctx = malloc(ra_head_part_bytes(np, G, K));
                ra_head_part_init(ctx, np, G, K);
                int32_t pi[G * K];
                float ps[G * K], po[G * 128], pl[G];
                int pn[G], fin = 0;
                for (int x = np - 1; x >= 0; x--) {
                    assert_int_equal(
                        ra_head_attend_part(f.h, ctx, x, G, q, pp, 0, 0, po, pl, pi, ps, pn, &fin),
                        RA_OK);
                    assert_int_equal(fin, x == 0);
                }
                free(ctx);
                assert_int_equal(
                    ra_head_attend_group(f.h, G, q, pp, 0, 0, go, gl, gi, gs, gn, NULL), RA_OK);
                double hit = 0, tot = 0;
                for (int j = 0; j < G; j++) {
                    assert_int_equal(pn[j], kk[j]);
                    if (!kk[j])
                        continue;
                    double kth = kth_score(q + j * dim, f.k, f.dt, dim, f.n, kk[j], NULL);
                    for (int i = 0; i < pn[j]; i++) {
                        int32_t id = pi[j * K + i];
                        assert_true(id >= 0 && (size_t)id < f.n);
                        if (i) /* best first */
                            assert_true(ps[j * K + i] <= ps[j * K + i - 1]);
                        hit += tdot(q + j * dim, f.k, f.dt, dim, id, NULL) >= kth - 1e-5;
                        if (eff)
                            assert_int_equal(id, gi[j * K + i]);
                    }
                    tot += kk[j];
                    if (eff)
                        assert_true(fabsf(pl[j] - gl[j]) <= 1e-5f * (1 + fabsf(gl[j])));
                }
                if (!(hit / tot >= (eff ? 1.0 : 0.95)))
                    fail_msg("pscan dim %d, %d parts, effort %s: recall %.3f", dim, np,
                             eff ? "n" : "default", hit / tot);
            }
        /* appends: 57 more keys, one of them the best for query 0 by far */
        float *nk = kf + n * dim;
        for (int j = 0; j < dim; j++)
            nk[20 * dim + j] = 40.f * q[j] / (fabsf(q[j]) + 1.f);
        ra_kern_from_f32(nk, RA_DTYPE_BF16, 57 * dim, (char *)f.k + n * dim * 2);
        assert_int_equal(
            ra_head_append(f.h, (char *)f.k + n * dim * 2, (char *)f.v + n * dim * 2, pos + n, 57),
            RA_OK);
        f.n = n + 57;
        int32_t ids[K];
        float sc[K];
        int no;
        ra_search_params p = {.k = K};
        assert_int_equal(ra_head_search(f.h, q, &p, ids, sc, &no, NULL), RA_OK);
        assert_int_equal(ids[0], (int32_t)(n + 20));
        rec = recall_at(&f, q, NQ, K, 0, &frac, NULL);
        assert_true(rec >= 0.95);
        free(pos), free(kf), free(tq);
        fx_fini(&f);
    }
}

/* A pscan head of the n keys kf [n][D] (as f16; V the same), built on nt training
 * queries tq. */
static fixture pscan_f16(const float *kf, size_t n, int D, const float *tq, int nt)
{
    fixture f = {
        .h = new_head(RA_INDEX_PSCAN, D, RA_DTYPE_F16, NULL), .dim = D, .dt = RA_DTYPE_F16, .n = n};
    f.k = malloc(n * D * 2);
    f.v = malloc(n * D * 2);
    ra_kern_from_f32(kf, RA_DTYPE_F16, n * D, f.k);
    ra_kern_from_f32(kf, RA_DTYPE_F16, n * D, f.v);
    int64_t *pos = malloc(n * sizeof *pos);
    for (size_t i = 0; i < n; i++)
        pos[i] = (int64_t)i;
    assert_int_equal(ra_head_append(f.h, f.k, f.v, pos, n), RA_OK);
    assert_int_equal(ra_head_build(f.h, tq, nt, 0), RA_OK);
    free(pos);
    return f;
}

/* pscan's second scan: keys whose best ones all sit in the blocks the threshold's sample
 * reads (every 13th block of 1,250, as pscan.c's PS_PRIME 96 gives at this size), so the
 * sample sets the threshold far too high, fewer than R keys pass, and the part is
 * scanned again from no threshold. The answer is still the best by code, rescored: the
 * exact top-k here; the stats count both scans. If pscan's sample changes, the first
 * check says that this test no longer reaches the second scan. */
static void test_pscan_second_scan(void **state)
{
    (void)state;
    enum { D = 64, NT = 512, NQ = 8, K = 50 }; /* k 50: R 312, a sample of 96 blocks */
    size_t n = 20000;
    trng r = {777};
    float u[D]; /* the queries' direction */
    double nu = 0;
    for (int j = 0; j < D; j++)
        u[j] = trng_gauss(&r), nu += (double)u[j] * u[j];
    for (int j = 0; j < D; j++)
        u[j] = (float)(u[j] / sqrt(nu));
    float *kf = malloc(n * D * sizeof *kf);
    for (size_t i = 0; i < n; i++) {
        float boost = (i / 16) % 13 == 0 ? 2.0f + 2.0f * (float)(i % 7) : 0.f;
        for (int j = 0; j < D; j++)
            kf[i * D + j] = trng_gauss(&r) + boost * u[j];
    }
    float *tq = malloc((NT + NQ) * D * sizeof *tq);
    for (int i = 0; i < NT + NQ; i++)
        for (int j = 0; j < D; j++)
            tq[i * D + j] = 3.f * u[j] + 0.5f * trng_gauss(&r);
    float *q = tq + NT * D;
    fixture f = pscan_f16(kf, n, D, tq, NT);
    for (int t = 0; t < NQ; t++) {
        int32_t ids[K];
        float sc[K];
        int no;
        ra_search_stats st;
        ra_search_params p = {.k = K};
        assert_int_equal(ra_head_search(f.h, q + t * D, &p, ids, sc, &no, &st), RA_OK);
        if (st.scanned != 2 * n)
            fail_msg("query %d: %llu keys scanned, not the two scans of %zu", t,
                     (unsigned long long)st.scanned, n);
        assert_int_equal(no, K);
        check_exact(&f, q + t * D, K, ids, sc, no);
    }
    free(kf), free(tq);
    fx_fini(&f);
}

/* pscan with every key one of three vectors: the code scores tie in the thousands, so a
 * full buffer cannot be cut to its best R by score alone (the cut during the scan falls
 * back to the exact one, earliest rows first) and the answer is the k lowest rows of the
 * best vector, in row order, each with the exact score. */
static void test_pscan_ties(void **state)
{
    (void)state;
    enum { D = 64, NT = 256, NQ = 4, K = 50 };
    size_t n = 30000;
    trng r = {4711};
    float base[3][D];
    for (int t = 0; t < 3; t++)
        for (int j = 0; j < D; j++)
            base[t][j] = trng_gauss(&r);
    float *kf = malloc(n * D * sizeof *kf);
    for (size_t i = 0; i < n; i++)
        memcpy(kf + i * D, base[i % 3], sizeof base[0]);
    float *tq = malloc((NT + NQ) * D * sizeof *tq);
    for (int i = 0; i < NT + NQ; i++)
        for (int j = 0; j < D; j++)
            tq[i * D + j] = base[0][j] + 0.3f * trng_gauss(&r);
    float *q = tq + NT * D;
    fixture f = pscan_f16(kf, n, D, tq, NT);
    for (int t = 0; t < NQ; t++)
        for (int eff = 0; eff <= 200; eff += 200) { /* the default R, and R 200 */
            int32_t ids[K];
            float sc[K];
            int no;
            ra_search_params p = {.k = K, .effort = eff};
            assert_int_equal(ra_head_search(f.h, q + t * D, &p, ids, sc, &no, NULL), RA_OK);
            check_exact(&f, q + t * D, K, ids, sc, no);
            for (int i = 0; i < no; i++)
                if (ids[i] != 3 * i)
                    fail_msg("query %d effort %d: rank %d is row %d, not %d", t, eff, i, ids[i],
                             3 * i);
        }
    free(kf), free(tq);
    fx_fini(&f);
}

/* A head whose index cannot be cut over the keys (the graph; any head during a build)
 * answers the whole group in part 0 of ra_head_attend_part, the same as the group call;
 * bad arguments are refused and still count, so the set completes. */
static void test_attend_part_whole(void **state)
{
    (void)state;
    fixture f;
    fx_init(&f, RA_INDEX_GRAPH, 32, RA_DTYPE_F16, 3000, 71);
    enum { G = 3, K = 20 };
    float *q = rand_queries(72, G, f.dim, 1.f);
    ra_search_params p[G];
    for (int j = 0; j < G; j++)
        p[j] = (ra_search_params){.k = K};
    assert_false(ra_head_partable(f.h));
    void *ctx = malloc(ra_head_part_bytes(3, G, K));
    int32_t ids[G * K], gi[G * K];
    float sc[G * K], gs[G * K], o[G * 32], go[G * 32], l[G], gl[G];
    int n[G], gn[G], fin;
    ra_head_part_init(ctx, 3, G, K);
    for (int x = 2; x >= 0; x--) {
        assert_int_equal(ra_head_attend_part(f.h, ctx, x, G, q, p, 0, 0, o, l, ids, sc, n, &fin),
                         RA_OK);
        assert_int_equal(fin, x == 0);
    }
    assert_int_equal(ra_head_attend_group(f.h, G, q, p, 0, 0, go, gl, gi, gs, gn, NULL), RA_OK);
    for (int j = 0; j < G; j++) {
        assert_int_equal(n[j], gn[j]);
        for (int i = 0; i < n[j]; i++)
            assert_int_equal(ids[j * K + i], gi[j * K + i]);
        check_exact(&f, q + j * f.dim, K, ids + j * K, sc + j * K, n[j]);
    }
    /* part 0 answers first, another part finishes: its own count buffer gets the counts */
    ra_head_part_init(ctx, 3, G, K);
    for (int x = 0; x < 3; x++) {
        int nx[G] = {-7, -7, -7};
        assert_int_equal(ra_head_attend_part(f.h, ctx, x, G, q, p, 0, 0, o, l, ids, sc, nx, &fin),
                         RA_OK);
        assert_int_equal(fin, x == 2);
        if (x == 2)
            for (int j = 0; j < G; j++)
                assert_int_equal(nx[j], gn[j]);
    }
    /* a k above the context's, then a part out of range: the set still completes with the
     * first error */
    ra_head_part_init(ctx, 2, G, K);
    ra_search_params big[G] = {{.k = K + 1}, {.k = 1}, {.k = 1}};
    assert_int_equal(ra_head_attend_part(f.h, ctx, 1, G, q, big, 0, 0, o, l, ids, sc, n, &fin),
                     RA_OK);
    assert_int_equal(fin, 0);
    assert_int_equal(ra_head_attend_part(f.h, ctx, 0, G, q, p, 0, 0, o, l, ids, sc, n, &fin),
                     RA_EINVAL);
    assert_int_equal(fin, 1);
    assert_int_equal(ra_head_attend_part(f.h, ctx, 2, G, q, p, 0, 0, o, l, ids, sc, n, &fin),
                     RA_EINVAL);
    assert_int_equal(fin, 0);
    free(ctx);
    free(q);
    fx_fini(&f);
}

/* An index installed while an Attend's parts run: a part that ran before it searched
 * nothing, a part after it searched its share; the finisher must not merge without the
 * first one's keys (it answers the whole group) */
static void test_attend_part_installed_between(void **state)
{
    (void)state;
    enum { G = 3, K = 40 };
    float *q = rand_queries(74, G, 32, 1.f);
    float *tq = rand_queries(75, 256, 32, 1.f);
    ra_search_params p[G];
    for (int j = 0; j < G; j++)
        p[j] = (ra_search_params){.k = K};
    void *ctx = malloc(ra_head_part_bytes(3, G, K));
    int32_t ids[G * K];
    float sc[G * K], o[G * 32], l[G];
    int n[G], fin;
    for (int order = 0; order < 2; order++) { /* the part without an index: 1, then 2 */
        fixture f;
        fx_init(&f, RA_INDEX_PSCAN, 32, RA_DTYPE_F16, 5000, 73);
        assert_false(ra_head_ready(f.h));
        ra_head_part_init(ctx, 3, G, K);
        int early = 1 + order;
        assert_int_equal(
            ra_head_attend_part(f.h, ctx, early, G, q, p, 0, 0, o, l, ids, sc, n, &fin), RA_OK);
        assert_int_equal(fin, 0);
        assert_int_equal(ra_head_build(f.h, tq, 256, 0), RA_OK);
        assert_true(ra_head_ready(f.h));
        for (int x = 0; x < 3; x++) {
            if (x == early)
                continue;
            for (int j = 0; j < G; j++)
                n[j] = -1;
            assert_int_equal(
                ra_head_attend_part(f.h, ctx, x, G, q, p, 0, 0, o, l, ids, sc, n, &fin), RA_OK);
        }
        assert_int_equal(fin, 1);
        for (int j = 0; j < G; j++) {
            assert_int_equal(n[j], K);
            check_exact(&f, q + j * f.dim, K, ids + j * K, sc + j * K, n[j]);
        }
        fx_fini(&f);
    }
    free(ctx);
    free(q), free(tq);
}

/* The parts of one pscan search on their own threads, as the daemon runs them: at
 * effort n the merge is the group's exact answer, at the default effort every answer
 * is exact for the keys it holds and the recall holds */
typedef struct part_run {
    ra_head *h;
    void *ctx;
    int part, G, fin;
    const float *q;
    const ra_search_params *p;
    float *o, *l, *sc;
    int32_t *ids;
    int *n;
    ra_status st;
} part_run;

static void *part_thread(void *arg)
{
    part_run *r = arg;
    r->st = ra_head_attend_part(r->h, r->ctx, r->part, (size_t)r->G, r->q, r->p, 0, 0, r->o, r->l,
                                r->ids, r->sc, r->n, &r->fin);
    return NULL;
}

static void test_attend_part_threads(void **state)
{
    (void)state;
    enum { G = 3, K = 30, NP = 4, D = 32 };
    fixture f;
    fx_init(&f, RA_INDEX_PSCAN, D, RA_DTYPE_F16, 40000, 76);
    float *tq = rand_queries(77, 512, D, 1.f);
    assert_int_equal(ra_head_build(f.h, tq, 512, 0), RA_OK);
    float *q = rand_queries(78, G, D, 1.f);
    for (int eff = 1; eff >= 0; eff--)
        for (int rep = 0; rep < 3; rep++) {
            ra_search_params p[G];
            for (int j = 0; j < G; j++)
                p[j] = (ra_search_params){.k = K, .effort = eff ? (int)f.n : 0};
            void *ctx = malloc(ra_head_part_bytes(NP, G, K));
            ra_head_part_init(ctx, NP, G, K);
            part_run r[NP];
            pthread_t th[NP];
            float o[NP][G * D], l[NP][G], sc[NP][G * K];
            int32_t ids[NP][G * K];
            int n[NP][G];
            for (int x = 0; x < NP; x++) {
                r[x] = (part_run){.h = f.h,
                                  .ctx = ctx,
                                  .part = x,
                                  .G = G,
                                  .q = q,
                                  .p = p,
                                  .o = o[x],
                                  .l = l[x],
                                  .sc = sc[x],
                                  .ids = ids[x],
                                  .n = n[x]};
                assert_int_equal(pthread_create(&th[x], NULL, part_thread, &r[x]), 0);
            }
            int fins = 0, w = -1;
            for (int x = 0; x < NP; x++) {
                pthread_join(th[x], NULL);
                assert_int_equal(r[x].st, RA_OK);
                fins += r[x].fin;
                if (r[x].fin)
                    w = x;
            }
            assert_int_equal(fins, 1);
            float go[G * D], gl[G], gs[G * K];
            int32_t gi[G * K];
            int gn[G];
            assert_int_equal(ra_head_attend_group(f.h, G, q, p, 0, 0, go, gl, gi, gs, gn, NULL),
                             RA_OK);
            double hit = 0;
            for (int j = 0; j < G; j++) {
                assert_int_equal(n[w][j], K);
                double kth = kth_score(q + j * D, f.k, f.dt, D, f.n, K, NULL);
                for (int i = 0; i < K; i++) {
                    int32_t id = ids[w][j * K + i];
                    double e = tdot(q + j * D, f.k, f.dt, D, id, NULL);
                    assert_true(fabs(sc[w][j * K + i] - e) <= 1e-4 * (1 + fabs(e)));
                    if (i) /* best first, no repeats */
                        assert_true(sc[w][j * K + i] <= sc[w][j * K + i - 1] &&
                                    id != ids[w][j * K + i - 1]);
                    hit += e >= kth - 1e-5;
                    if (eff)
                        assert_int_equal(id, gi[j * K + i]);
                }
            }
            assert_true(hit >= 0.95 * G * K);
            free(ctx);
        }
    free(q), free(tq);
    fx_fini(&f);
}

static void test_attend_group(void **state)
{
    (void)state;
    const ra_index_kind kinds[3] = {RA_INDEX_FLAT, RA_INDEX_HNSW, RA_INDEX_GRAPH};
    for (int ki = 0; ki < 3; ki++) {
        fixture f;
        fx_init(&f, kinds[ki], 64, RA_DTYPE_F16, 5000, 800 + ki);
        enum { NQ = 5, K = 50 };
        float *q = rand_queries(19, NQ, f.dim, 1.f);
        float *tq = rand_queries(20, 256, f.dim, 1.f);
        for (int built = 0; built < 2; built++) {
            if (built)
                assert_int_equal(ra_head_build(f.h, tq, 256, 0), RA_OK);
            ra_search_params p[NQ];
            for (int j = 0; j < NQ; j++)
                p[j] = (ra_search_params){.k = K, .effort = 64};
            float o[NQ * 64], lse[NQ];
            int32_t ids[NQ * K];
            float sc[NQ * K];
            int nout[NQ];
            ra_search_stats st[NQ];
            assert_int_equal(ra_head_attend_group(f.h, NQ, q, p, 0, 0, o, lse, ids, sc, nout, st),
                             RA_OK);
            /* the graph walks once for the group: its answers may differ from single
             * searches (each query scores at least what its own walk would), so there the
             * check is exactness of what it returns and recall no worse than alone */
            int shared = built && kinds[ki] == RA_INDEX_GRAPH;
            double rec_group = 0, rec_single = 0;
            for (int j = 0; j < NQ; j++) {
                float o1[64], l1;
                int32_t i1[K];
                float s1[K];
                int n1;
                ra_search_stats st1;
                assert_int_equal(ra_head_attend(f.h, q + j * f.dim, &p[j], 0, o1, &l1, i1, s1, &n1,
                                                &st1),
                                 RA_OK);
                assert_int_equal(nout[j], n1);
                assert_int_equal(st[j].exact_fallback, st1.exact_fallback);
                assert_int_equal(st[j].exact_fallback, !built);
                if (!shared) {
                    assert_memory_equal(ids + j * K, i1, n1 * sizeof *i1);
                    assert_float_equal(lse[j], l1, 1e-5 * (1 + fabsf(l1)));
                    for (int d = 0; d < f.dim; d++)
                        assert_float_equal(o[j * f.dim + d], o1[d], 1e-5);
                } else {
                    assert_int_equal(st[j].shared, NQ);
                    check_scores_exact(&f, q + j * f.dim, ids + j * K, sc + j * K, nout[j]);
                    check_attn_over(&f, q + j * f.dim, ids + j * K, nout[j], o + j * f.dim,
                                    lse[j]);
                    rec_group += recall_vs_exact(&f, q + j * f.dim, K, ids + j * K, nout[j]);
                    rec_single += recall_vs_exact(&f, q + j * f.dim, K, i1, n1);
                }
                if (!built || kinds[ki] == RA_INDEX_FLAT)
                    check_exact(&f, q + j * f.dim, K, ids + j * K, sc + j * K, nout[j]);
            }
            if (shared) {
                fprintf(stderr, "# group walk recall %.3f, single searches %.3f\n",
                        rec_group / NQ, rec_single / NQ);
                assert_true(rec_group >= rec_single - 0.02 * NQ);
                assert_true(rec_group / NQ > 0.8);
            }
            /* without id arrays */
            float o2[NQ * 64], l2[NQ];
            assert_int_equal(ra_head_attend_group(f.h, NQ, q, p, 0, 0, o2, l2, NULL, NULL, NULL, NULL),
                             RA_OK);
            assert_memory_equal(o2, o, sizeof o);
            /* a budget of 0 reads nothing; the others are unchanged */
            p[2].k = 0;
            assert_int_equal(
                ra_head_attend_group(f.h, NQ, q, p, 0, 0, o2, l2, NULL, NULL, nout, NULL), RA_OK);
            assert_int_equal(nout[2], 0);
            assert_true(isinf(l2[2]) && l2[2] < 0);
            for (int d = 0; d < f.dim; d++)
                assert_float_equal(o2[2 * f.dim + d], 0.f, 0);
            /* bad groups */
            p[2].k = -1;
            assert_int_equal(
                ra_head_attend_group(f.h, NQ, q, p, 0, 0, o, lse, NULL, NULL, NULL, NULL),
                RA_EINVAL);
            p[2].k = K;
            assert_int_equal(
                ra_head_attend_group(f.h, 0, q, p, 0, 0, o, lse, NULL, NULL, NULL, NULL),
                RA_EINVAL);
            float qbad[NQ * 64];
            memcpy(qbad, q, sizeof qbad);
            qbad[3 * f.dim + 1] = NAN;
            assert_int_equal(
                ra_head_attend_group(f.h, NQ, qbad, p, 0, 0, o, lse, NULL, NULL, NULL, NULL),
                RA_ENONFINITE);
        }
        free(q);
        free(tq);
        fx_fini(&f);
    }
}

/* Recall probes (head.c): default-effort group searches whose recall is below the
 * target get a longer default list from the probe thread, and recall rises; searches
 * with an explicit effort are never probed. The keys are gaussian (hard for a graph) and
 * the decode queries come from another distribution than the training queries, so that
 * the build's calibration on held-out training queries is optimistic. */
static uint64_t probes_settle(void)
{
    uint64_t p, r, l, last = (uint64_t)-1;
    for (int i = 0; i < 200; i++) { /* until no probe ran for 50 ms (10 s at most) */
        ra_index_probe_counts_get(&p, &r, &l);
        if (p == last)
            break;
        last = p;
        usleep(50000);
    }
    return last;
}

static double group_recall(fixture *f, const float *q, int nq, int K, int G)
{
    double rec = 0;
    for (int i = 0; i + G <= nq; i += G) {
        ra_search_params p[4];
        for (int j = 0; j < G; j++)
            p[j] = (ra_search_params){.k = K};
        float o[4 * 64], lse[4], sc[4 * 64];
        int32_t ids[4 * 64];
        int nout[4];
        assert_int_equal(ra_head_attend_group(f->h, (size_t)G, q + (size_t)i * f->dim, p, 0, 0, o,
                                              lse, ids, sc, nout, NULL),
                         RA_OK);
        for (int j = 0; j < G; j++)
            rec += recall_vs_exact(f, q + (size_t)(i + j) * f->dim, K, ids + j * K, nout[j]);
    }
    return rec / (nq / G * G);
}

static void test_recall_probes(void **state)
{
    (void)state;
    fixture f;
    fx_init(&f, RA_INDEX_GRAPH, 64, RA_DTYPE_F16, 20000, 977);
    enum { K = 50, G = 2, NQ = 200 };
    float *tq = rand_queries(31, 2500, f.dim, 1.f);
    float *q = rand_queries(32, NQ, f.dim, 1.f);
    for (int i = 0; i < NQ; i++) /* decode queries: a shared offset the training lacked */
        for (int d = 0; d < 8; d++)
            q[(size_t)i * f.dim + d] += 2.f;
    assert_int_equal(ra_head_build(f.h, tq, 2500, 0), RA_OK);
    probes_settle();
    uint64_t p0, r0, l0, p1, r1, l1;
    ra_index_probe_counts_get(&p0, &r0, &l0);
    /* explicit effort: never probed */
    for (int i = 0; i < 64; i++) {
        ra_search_params p[G] = {{.k = K, .effort = 80}, {.k = K, .effort = 80}};
        float o[G * 64], lse[G];
        assert_int_equal(ra_head_attend_group(f.h, G, q + (size_t)(i % (NQ / G)) * G * f.dim, p, 0,
                                              0, o, lse, NULL, NULL, NULL, NULL),
                         RA_OK);
    }
    probes_settle();
    ra_index_probe_counts_get(&p1, &r1, &l1);
    assert_int_equal(p1, p0);
    /* a head whose default list is far too short: the probes must lengthen it */
    float f0 = ra_head_effort_mult(f.h, 0.f);
    assert_true(f0 >= 1.f);
    assert_true(ra_head_effort_mult(f.h, 0.01f) == 0.5f); /* clamped */
    double before = group_recall(&f, q, NQ, K, G);
    for (int round = 0; round < 6; round++) { /* decode: the same queries again and again */
        group_recall(&f, q, NQ, K, G);
        probes_settle();
    }
    ra_index_probe_counts_get(&p1, &r1, &l1);
    double after = group_recall(&f, q, NQ, K, G);
    float f1 = ra_head_effort_mult(f.h, 0.f);
    fprintf(stderr,
            "# default-effort recall@%d %.3f before, %.3f after %llu probes (%llu raises, %llu "
            "lowers)\n",
            K, before, after, (unsigned long long)(p1 - p0), (unsigned long long)(r1 - r0),
            (unsigned long long)(l1 - l0));
    fprintf(stderr, "# default effort x%.2f at the build, x0.50 set, x%.2f after the probes\n",
            (double)f0, (double)f1);
    assert_true(p1 - p0 >= 20);
    assert_true(before < 0.95); /* the shortened list misses */
    assert_true(r1 > r0);
    assert_true(f1 > 0.5f);
    assert_true(after > before + 0.02);
    assert_true(after >= 0.95);
    /* an easy head (the same queries, the build's own factor) is not made dearer: the
     * probes leave it or lower it */
    ra_head_effort_mult(f.h, f0);
    ra_index_probe_counts_get(&p0, &r0, &l0);
    for (int round = 0; round < 4; round++) {
        group_recall(&f, q, NQ, K, G);
        probes_settle();
    }
    ra_index_probe_counts_get(&p1, &r1, &l1);
    assert_true(ra_head_effort_mult(f.h, 0.f) <= f0 || before >= 0.96);
    /* no index: no factor */
    fixture e;
    fx_init(&e, RA_INDEX_FLAT, 64, RA_DTYPE_F16, 100, 5);
    assert_true(ra_head_effort_mult(e.h, 2.f) == 0.f);
    fx_fini(&e);
    assert_true(ra_head_effort_mult(NULL, 1.f) == 0.f);
    free(tq);
    free(q);
    fx_fini(&f);
}

/* The recall probes on a projected-code scan, through ra_head_attend_part (the daemon's
 * path for pscan): decode queries live in the directions the training queries and the
 * keys gave least weight, which the code dropped, so the default candidates miss; the
 * probes raise the head's factor and recall rises. */
static void test_pscan_probes(void **state)
{
    (void)state;
    enum { D = 128, N = 20000, K = 50, G = 4, NQ = 160, NT = 1024 };
    trng r = {515};
    float *kf = malloc((size_t)N * D * sizeof *kf);
    for (size_t i = 0; i < (size_t)N * D; i++)
        kf[i] = trng_gauss(&r) * (0.2f + 1.5f * (float)(i % D) / D);
    fixture f = {
        .h = new_head(RA_INDEX_PSCAN, D, RA_DTYPE_F16, NULL), .dim = D, .dt = RA_DTYPE_F16, .n = N};
    f.k = malloc((size_t)N * D * 2);
    f.v = malloc((size_t)N * D * 2);
    ra_kern_from_f32(kf, RA_DTYPE_F16, (size_t)N * D, f.k);
    ra_kern_from_f32(kf, RA_DTYPE_F16, (size_t)N * D, f.v);
    int64_t *pos = malloc(N * sizeof *pos);
    for (int i = 0; i < N; i++)
        pos[i] = i;
    assert_int_equal(ra_head_append(f.h, f.k, f.v, pos, N), RA_OK);
    float *tq = rand_queries(516, NT, D, 1.f), *q = rand_queries(517, NQ, D, 1.f);
    for (int i = 0; i < NQ; i++)
        for (int d = 0; d < D; d++)
            q[i * D + d] *= d < 16 ? 3.f : 0.3f;
    assert_int_equal(ra_head_build(f.h, tq, NT, 0), RA_OK);
    probes_settle();
    void *ctx = malloc(ra_head_part_bytes(2, G, K));
    double rec[2] = {0};
    uint64_t p0, r0, l0, p1, r1, l1;
    ra_index_probe_counts_get(&p0, &r0, &l0);
    assert_true(ra_head_effort_mult(f.h, 0.5f) == 0.5f);
    for (int round = 0; round < 8; round++) {
        double hit = 0;
        for (int i = 0; i + G <= NQ; i += G) {
            ra_search_params p[G];
            for (int j = 0; j < G; j++)
                p[j] = (ra_search_params){.k = K};
            float o[G * D], lse[G], sc[G * K];
            int32_t ids[G * K];
            int n[G], fin;
            ra_head_part_init(ctx, 2, G, K);
            for (int x = 0; x < 2; x++)
                assert_int_equal(ra_head_attend_part(f.h, ctx, x, G, q + i * D, p, 0, 0, o, lse,
                                                     ids, sc, n, &fin),
                                 RA_OK);
            for (int j = 0; j < G; j++)
                hit += recall_vs_exact(&f, q + (i + j) * D, K, ids + j * K, n[j]);
        }
        if (round == 0)
            rec[0] = hit / NQ;
        rec[1] = hit / NQ;
        probes_settle();
    }
    ra_index_probe_counts_get(&p1, &r1, &l1);
    fprintf(stderr, "# pscan probes: recall@%d %.3f at x0.50, %.3f after %llu probes (x%.2f)\n", K,
            rec[0], rec[1], (unsigned long long)(p1 - p0), (double)ra_head_effort_mult(f.h, 0.f));
    assert_true(p1 - p0 >= 10);
    assert_true(r1 > r0);
    assert_true(rec[1] > rec[0] + 0.02);
    free(ctx), free(tq), free(q), free(kf), free(pos);
    fx_fini(&f);
}

/* The other way: a pscan head set to 8 times its default candidates, on queries it
 * answers exactly: the probes lower the factor (by x0.75 steps while the recall stays
 * above 0.995) and the recall stays above the probes' target. */
static void test_pscan_probes_lower(void **state)
{
    (void)state;
    enum { D = 64, N = 20000, K = 50, G = 4, NQ = 160, NT = 1024 };
    fixture f;
    fx_init(&f, RA_INDEX_PSCAN, D, RA_DTYPE_F16, N, 519);
    float *tq = rand_queries(520, NT, D, 1.f), *q = rand_queries(521, NQ, D, 1.f);
    assert_int_equal(ra_head_build(f.h, tq, NT, 0), RA_OK);
    probes_settle();
    assert_true(ra_head_effort_mult(f.h, 8.f) == 8.f);
    uint64_t p0, r0, l0, p1, r1, l1;
    ra_index_probe_counts_get(&p0, &r0, &l0);
    double rec = 0;
    for (int round = 0; round < 12; round++) {
        rec = group_recall(&f, q, NQ, K, G);
        probes_settle();
    }
    ra_index_probe_counts_get(&p1, &r1, &l1);
    float m = ra_head_effort_mult(f.h, 0.f);
    fprintf(stderr, "# pscan probes from x8: x%.2f after %llu probes (%llu lowers), recall %.3f\n",
            (double)m, (unsigned long long)(p1 - p0), (unsigned long long)(l1 - l0), rec);
    assert_true(l1 - l0 >= 2);
    assert_true(m <= 8.f * 0.75f * 0.75f + 1e-3f);
    assert_true(rec >= 0.96);
    free(tq), free(q);
    fx_fini(&f);
}

/* ra_exact_topk and ra_exact_knn_batch (the graph build's ground truth) against each
 * other and a double reference: padding, ties, and the key slices of the batch path. */
static void test_exact_paths(void **state)
{
    (void)state;
    ra_kv *kv;
    int dim = 8;
    size_t n = 300000; /* more than one FAISS slice (2^18 keys) */
    assert_int_equal(ra_kv_create(&kv, dim, RA_DTYPE_BF16, NULL), RA_OK);
    trng r = {16};
    void *k = tfill(&r, RA_DTYPE_BF16, n * dim, 1.f);
    int64_t *pos = calloc(n, sizeof *pos);
    assert_int_equal(ra_kv_append(kv, k, k, pos, n), RA_OK);
    int nq = 6, K = 20;
    float *q = rand_queries(17, nq, dim, 1.f);
    int32_t *bi = malloc(nq * K * sizeof *bi);
    float *bs = malloc(nq * K * sizeof *bs);
    assert_int_equal(ra_exact_knn_batch(kv, n, q, nq, K, bi, bs), RA_OK);
    for (int t = 0; t < nq; t++) {
        int32_t ids[20];
        float sc[20];
        int m;
        assert_int_equal(ra_exact_topk(kv, n, q + t * dim, K, ids, sc, &m), RA_OK);
        assert_int_equal(m, K);
        double kth = kth_score(q + t * dim, k, RA_DTYPE_BF16, dim, n, K, NULL);
        for (int i = 0; i < K; i++) {
            double tb = tdot(q + t * dim, k, RA_DTYPE_BF16, dim, bi[t * K + i], NULL);
            double tt = tdot(q + t * dim, k, RA_DTYPE_BF16, dim, ids[i], NULL);
            assert_true(tb >= kth - 1e-4 && tt >= kth - 1e-4);
            assert_true(fabs(bs[t * K + i] - tb) <= 1e-4 && fabs(sc[i] - tt) <= 1e-4);
            assert_true(fabs(bs[t * K + i] - sc[i]) <= 1e-4);
            if (i)
                assert_true(bs[t * K + i] <= bs[t * K + i - 1] + 1e-6);
        }
    }
    /* fewer keys than K: padded with -1 */
    assert_int_equal(ra_exact_knn_batch(kv, 3, q, nq, K, bi, bs), RA_OK);
    for (int t = 0; t < nq; t++)
        for (int i = 0; i < K; i++)
            assert_true(i < 3 ? (bi[t * K + i] >= 0 && bi[t * K + i] < 3) : bi[t * K + i] == -1);
    int32_t ids[20];
    float sc[20];
    int m = -1;
    assert_int_equal(ra_exact_topk(kv, 0, q, 5, ids, sc, &m), RA_OK);
    assert_int_equal(m, 0);
    assert_int_equal(ra_exact_topk(kv, n + 1, q, 5, ids, sc, &m), RA_EINVAL);
    assert_int_equal(ra_exact_knn_batch(kv, 10, q, nq, 0, bi, bs), RA_EINVAL);
    ra_kv_destroy(kv);
    /* ties: all-equal keys come back in row order */
    assert_int_equal(ra_kv_create(&kv, dim, RA_DTYPE_F32, NULL), RA_OK);
    float same[50 * 8];
    for (int i = 0; i < 50 * 8; i++)
        same[i] = 0.5f;
    assert_int_equal(ra_kv_append(kv, same, same, pos, 50), RA_OK);
    assert_int_equal(ra_exact_topk(kv, 50, q, 20, ids, sc, &m), RA_OK);
    assert_int_equal(m, 20);
    for (int i = 0; i < 20; i++)
        assert_int_equal(ids[i], i);
    ra_kv_destroy(kv);
    free(k);
    free(pos);
    free(q);
    free(bi);
    free(bs);
}

/* The option table: defaults, bounds (negative, zero, min, max, max + 1), messages that
 * name the option and its range, and ra_head_create / the HNSW backend refusing what the
 * table refuses instead of replacing it. */
static void test_opts_table(void **state)
{
    (void)state;
    ra_index_opts o;
    ra_index_opts_default(&o);
    assert_int_equal(o.kind, RA_INDEX_GRAPH);
    assert_int_equal(o.n_train, 8192); /* one default for ra_head and the graph */
    assert_int_equal(o.hnsw_m, 32);
    assert_int_equal(o.graph_degree, 48);
    assert_int_equal(o.seed, 1);
    assert_null(o.cancel);
    char err[256];
    assert_int_equal(ra_index_opts_check(&o, err, sizeof err), RA_OK);
    int n;
    const ra_index_opt_def *t = ra_index_opt_table(&n);
    assert_true(n >= 9);
    for (int i = 0; i < n; i++) {
        int *f = (int *)((char *)&o + t[i].offset);
        int keep = *f;
        int probe[5] = {t[i].min, t[i].max, t[i].max + 1, -1, 0};
        int ok[5] = {1, 1, 0, 0, 1};
        if (t[i].min > 1) { /* a gap between 0 (default) and min */
            probe[3] = t[i].min - 1;
        }
        for (int p = 0; p < 5; p++) {
            *f = probe[p];
            ra_status st = ra_index_opts_check(&o, err, sizeof err);
            if ((st == RA_OK) != ok[p])
                fail_msg("%s = %d: %s", t[i].name, probe[p], ra_strerror(st));
            if (st != RA_OK && !strstr(err, t[i].name))
                fail_msg("message does not name %s: %s", t[i].name, err);
        }
        *f = keep;
    }
    o.hnsw_m = 1; /* FAISS's construction never ends with M 1 */
    assert_int_equal(ra_index_opts_check(&o, err, sizeof err), RA_EINVAL);
    assert_non_null(strstr(err, "hnsw_m = 1"));
    assert_non_null(strstr(err, "4..128"));
    o.kind = RA_INDEX_HNSW;
    ra_head *h = NULL;
    assert_int_equal(ra_head_create(&h, 8, RA_DTYPE_F32, &o, NULL), RA_EINVAL);
    assert_null(h);
    o.hnsw_m = 300; /* was silently replaced by 32 */
    assert_int_equal(ra_head_create(&h, 8, RA_DTYPE_F32, &o, NULL), RA_EINVAL);
    o.hnsw_m = 0;
    o.graph_degree = 255;
    assert_int_equal(ra_head_create(&h, 8, RA_DTYPE_F32, &o, NULL), RA_OK);
    ra_head_destroy(h);
    o.graph_degree = 256;
    assert_int_equal(ra_head_create(&h, 8, RA_DTYPE_F32, &o, NULL), RA_EINVAL);
    /* the backend called directly refuses too */
    ra_kv *kv;
    assert_int_equal(ra_kv_create(&kv, 8, RA_DTYPE_F32, NULL), RA_OK);
    float row[8] = {1, 0, 0, 0, 0, 0, 0, 0};
    int64_t pos = 0;
    assert_int_equal(ra_kv_append(kv, row, row, &pos, 1), RA_OK);
    ra_index_opts_default(&o);
    o.hnsw_m = 300;
    void *bs = NULL;
    assert_int_equal(ra_backend_hnsw.build(&bs, kv, 1, NULL, 0, &o), RA_EINVAL);
    assert_null(bs);
    o.hnsw_m = 0; /* 0: the default */
    assert_int_equal(ra_backend_hnsw.build(&bs, kv, 1, NULL, 0, &o), RA_OK);
    ra_backend_hnsw.destroy(bs);
    ra_kv_destroy(kv);
}

/* How many threads of this process have nice value `want` (/proc/self/task/<tid>/stat,
 * field 19). */
static int threads_with_nice(int want)
{
    int n = 0;
    DIR *d = opendir("/proc/self/task");
    if (!d)
        return 0;
    struct dirent *e;
    while ((e = readdir(d)) != NULL) {
        if (e->d_name[0] == '.')
            continue;
        char path[300], buf[1024];
        snprintf(path, sizeof path, "/proc/self/task/%s/stat", e->d_name);
        FILE *f = fopen(path, "r");
        if (!f)
            continue;
        size_t len = fread(buf, 1, sizeof buf - 1, f);
        fclose(f);
        buf[len] = 0;
        const char *p = strrchr(buf, ')'); /* the name may hold spaces */
        int field = 2;
        for (; p && *p; p++)
            if (*p == ' ' && ++field == 19) {
                n += atoi(p + 1) == want;
                break;
            }
    }
    closedir(d);
    return n;
}

/* A background build runs at nice 19 (never ahead of the serving threads), and
 * ra_head_cancel ends it early: the index is not swapped in, the head keeps answering
 * by exact scan, later builds of the head end at once. */
static void test_build_priority_and_cancel(void **state)
{
    (void)state;
    fixture f;
    fx_init(&f, RA_INDEX_HNSW, 32, RA_DTYPE_F32, 60000, 77);
    int before = threads_with_nice(19);
    assert_int_equal(ra_head_build(f.h, NULL, 0, 1), RA_OK);
    int seen = 0;
    for (int i = 0; i < 200 && !seen && ra_head_building(f.h); i++) {
        seen = threads_with_nice(19) > before;
        if (!seen)
            usleep(5000);
    }
    ra_head_cancel(f.h);
    double t0 = ra_now_s();
    ra_head_wait(f.h);
    double waited = ra_now_s() - t0;
    fprintf(stderr, "# build thread at nice 19 seen: %d; wait after cancel %.3f s\n", seen, waited);
    assert_true(seen);
    assert_int_equal(ra_head_ready(f.h), 0); /* cancelled: not swapped in */
    float q[32];
    for (int d = 0; d < 32; d++)
        q[d] = ((const float *)f.k)[5 * 32 + d];
    int32_t ids[4];
    float sc[4];
    int n = 0;
    ra_search_stats st;
    ra_search_params p = {.k = 4};
    assert_int_equal(ra_head_search(f.h, q, &p, ids, sc, &n, &st), RA_OK);
    assert_int_equal(st.exact_fallback, 1);
    check_exact(&f, q, 4, ids, sc, n);
    assert_int_equal(ra_head_build(f.h, NULL, 0, 0), RA_ECLOSED); /* sticky */
    fx_fini(&f);
}

int main(void)
{
    ra_log_set_level(RA_LOG_WARN);
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_args),
        cmocka_unit_test(test_exact_equals_bruteforce),
        cmocka_unit_test(test_attend_reference),
        cmocka_unit_test(test_search_during_build),
        cmocka_unit_test(test_append_after_build),
        cmocka_unit_test(test_baseline_recall),
        cmocka_unit_test(test_degenerate),
        cmocka_unit_test(test_nonfinite_rejected),
        cmocka_unit_test(test_memory_limit),
        cmocka_unit_test(test_exact_paths),
        cmocka_unit_test(test_attend_group),
        cmocka_unit_test(test_pscan),
        cmocka_unit_test(test_pscan_second_scan),
        cmocka_unit_test(test_pscan_ties),
        cmocka_unit_test(test_attend_part_whole),
        cmocka_unit_test(test_attend_part_installed_between),
        cmocka_unit_test(test_attend_part_threads),
        cmocka_unit_test(test_recall_probes),
        cmocka_unit_test(test_pscan_probes),
        cmocka_unit_test(test_pscan_probes_lower),
        cmocka_unit_test(test_concurrent_search_append),
        cmocka_unit_test(test_opts_table),
        cmocka_unit_test(test_build_priority_and_cancel),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
