/* Index builds from precomputed training lists (ra_head_build_lists), the path a GPU
 * decoder uses when it computes the exact top-K of its prefill queries on the device:
 * exact lists must give the same graph as ratd's own kNN (the build is deterministic
 * for a seed, so the searches agree exactly), wrong lists must change it (so the lists
 * are really used), and out-of-range lists are refused before anything changes. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>

#include <cmocka.h>

#include "idx_test_util.h"
#include "ra_backend.h"
#include "ra_index.h"
#include "ra_kv.h"

enum { N = 3000, D = 32, NQ = 200, KL = 32, TOPK = 20 };

typedef struct {
    float *keys, *vals, *tq;
    int64_t pos[N];
    int32_t lists[NQ * KL];
} data;

static void make(data *x)
{
    trng r = {7};
    x->keys = malloc(sizeof(float) * N * D);
    x->vals = malloc(sizeof(float) * N * D);
    x->tq = malloc(sizeof(float) * NQ * D);
    for (size_t i = 0; i < (size_t)N * D; i++) {
        x->keys[i] = trng_gauss(&r);
        x->vals[i] = trng_gauss(&r);
    }
    for (size_t i = 0; i < (size_t)NQ * D; i++)
        x->tq[i] = 1.5f + trng_gauss(&r); /* offset: out of distribution for the keys */
    for (int i = 0; i < N; i++)
        x->pos[i] = i;
    /* exact top-KL of each training query, by a double-precision scan */
    double *s = malloc(sizeof(double) * N);
    for (int q = 0; q < NQ; q++) {
        for (int i = 0; i < N; i++) {
            double a = 0;
            for (int d = 0; d < D; d++)
                a += (double)x->tq[q * D + d] * x->keys[i * D + d];
            s[i] = a;
        }
        for (int t = 0; t < KL; t++) {
            int b = 0;
            for (int i = 1; i < N; i++)
                if (s[i] > s[b])
                    b = i;
            x->lists[q * KL + t] = b;
            s[b] = -INFINITY;
        }
    }
    free(s);
}

static ra_head *head_of(const data *x)
{
    ra_index_opts o;
    ra_index_opts_default(&o);
    o.kind = RA_INDEX_GRAPH;
    o.graph_knn = KL;
    o.threads = 2;
    o.seed = 11;
    ra_head *h;
    assert_int_equal(ra_head_create(&h, D, RA_DTYPE_F32, &o, NULL), RA_OK);
    assert_int_equal(ra_head_append(h, x->keys, x->vals, x->pos, N), RA_OK);
    return h;
}

/* ids of TOPK for 20 decode-like queries, concatenated; returns the keys scanned (the
 * walk's path: it differs between two graphs even where both find the exact top k) */
static uint64_t search_all(ra_head *h, const data *x, int32_t *out)
{
    uint64_t scanned = 0;
    trng r = {99};
    for (int q = 0; q < 20; q++) {
        float qq[D];
        for (int d = 0; d < D; d++)
            qq[d] = x->tq[(q * 7 % NQ) * D + d] + 0.3f * trng_gauss(&r);
        ra_search_params p = {.k = TOPK, .effort = 64};
        float sc[TOPK];
        int n = 0;
        ra_search_stats st;
        assert_int_equal(ra_head_search(h, qq, &p, out + q * TOPK, sc, &n, &st), RA_OK);
        assert_int_equal(n, TOPK);
        scanned += st.scanned;
    }
    return scanned;
}

static void test_exact_lists_equal_own_knn(void **state)
{
    (void)state;
    data x;
    make(&x);
    ra_head *a = head_of(&x), *b = head_of(&x);
    assert_int_equal(ra_head_build(a, x.tq, NQ, 0), RA_OK);
    assert_int_equal(ra_head_build_lists(b, x.tq, NQ, x.lists, KL, 0), RA_OK);
    assert_true(ra_head_ready(a) && ra_head_ready(b));
    int32_t ia[20 * TOPK], ib[20 * TOPK];
    uint64_t sa = search_all(a, &x, ia), sb = search_all(b, &x, ib);
    assert_memory_equal(ia, ib, sizeof ia);
    assert_int_equal(sa, sb); /* the same graph: the same walks */
    ra_head_destroy(a);
    ra_head_destroy(b);
    free(x.keys);
    free(x.vals);
    free(x.tq);
}

static void test_wrong_lists_change_the_graph(void **state)
{
    (void)state;
    data x;
    make(&x);
    ra_head *a = head_of(&x), *b = head_of(&x);
    int32_t *bad = malloc(sizeof(int32_t) * NQ * KL);
    for (int i = 0; i < NQ * KL; i++) /* consistent but wrong: every query gets the same keys */
        bad[i] = (i % KL) * 17;
    assert_int_equal(ra_head_build_lists(a, x.tq, NQ, x.lists, KL, 0), RA_OK);
    assert_int_equal(ra_head_build_lists(b, x.tq, NQ, bad, KL, 0), RA_OK);
    int32_t ia[20 * TOPK], ib[20 * TOPK];
    uint64_t sa = search_all(a, &x, ia), sb = search_all(b, &x, ib);
    assert_true(memcmp(ia, ib, sizeof ia) != 0 || sa != sb);
    free(bad);
    ra_head_destroy(a);
    ra_head_destroy(b);
    free(x.keys);
    free(x.vals);
    free(x.tq);
}

static void test_bad_lists_refused(void **state)
{
    (void)state;
    data x;
    make(&x);
    ra_head *h = head_of(&x);
    int32_t save = x.lists[5];
    x.lists[5] = N; /* one past the last row */
    assert_int_equal(ra_head_build_lists(h, x.tq, NQ, x.lists, KL, 0), RA_EINVAL);
    x.lists[5] = -2;
    assert_int_equal(ra_head_build_lists(h, x.tq, NQ, x.lists, KL, 0), RA_EINVAL);
    x.lists[5] = save;
    assert_int_equal(ra_head_build_lists(h, x.tq, NQ, x.lists, 0, 0), RA_EINVAL);
    assert_int_equal(ra_head_build_lists(h, x.tq, NQ, x.lists, RA_HEAD_MAX_LIST_K + 1, 0), RA_EINVAL);
    assert_int_equal(ra_head_build_lists(h, x.tq, 0, x.lists, KL, 0), RA_EINVAL);
    assert_false(ra_head_ready(h));
    /* the head still works: a good build afterwards */
    assert_int_equal(ra_head_build_lists(h, x.tq, NQ, x.lists, KL, 0), RA_OK);
    assert_true(ra_head_ready(h));
    ra_head_destroy(h);
    free(x.keys);
    free(x.vals);
    free(x.tq);
}

/* Lists narrower than the graph's K (here 8 of 32): the graph uses what it is given. */
static void test_short_lists(void **state)
{
    (void)state;
    data x;
    make(&x);
    ra_head *h = head_of(&x);
    int32_t *narrow = malloc(sizeof(int32_t) * NQ * 8);
    for (int q = 0; q < NQ; q++)
        memcpy(narrow + q * 8, x.lists + q * KL, 8 * sizeof(int32_t));
    assert_int_equal(ra_head_build_lists(h, x.tq, NQ, narrow, 8, 0), RA_OK);
    assert_true(ra_head_ready(h));
    int32_t ids[20 * TOPK];
    search_all(h, &x, ids);
    free(narrow);
    ra_head_destroy(h);
    free(x.keys);
    free(x.vals);
    free(x.tq);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_exact_lists_equal_own_knn),
        cmocka_unit_test(test_wrong_lists_change_the_graph),
        cmocka_unit_test(test_bad_lists_refused),
        cmocka_unit_test(test_short_lists),
    };
    return cmocka_run_group_tests_name("index_lists", tests, NULL, NULL);
}
