/* The K/V store (ra_kv.h) and memory accounting: append and read back, growth,
 * limits (memory budget, row count), NaN/Inf rejection without side effects, pinned
 * views that survive growth and release their retired arrays. */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <cmocka.h>

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "idx_test_util.h"
#include "ra_kv.h"

static void test_create_args(void **state)
{
    (void)state;
    ra_kv *kv = (ra_kv *)0x1;
    assert_int_equal(ra_kv_create(&kv, 0, RA_DTYPE_F16, NULL), RA_EINVAL);
    assert_int_equal(ra_kv_create(&kv, -3, RA_DTYPE_F16, NULL), RA_EINVAL);
    assert_int_equal(ra_kv_create(&kv, 1 << 20, RA_DTYPE_F16, NULL), RA_EINVAL);
    assert_int_equal(ra_kv_create(&kv, 64, (ra_dtype)5, NULL), RA_EINVAL);
    assert_int_equal(ra_kv_create(NULL, 64, RA_DTYPE_F16, NULL), RA_EINVAL);
    assert_ptr_equal(kv, (ra_kv *)0x1); /* untouched on failure */
    assert_int_equal(ra_kv_create(&kv, 64, RA_DTYPE_BF16, NULL), RA_OK);
    assert_int_equal(ra_kv_count(kv), 0);
    assert_int_equal(ra_kv_dim(kv), 64);
    assert_int_equal(ra_kv_dtype(kv), RA_DTYPE_BF16);
    ra_kv_destroy(kv);
    ra_kv_destroy(NULL);
}

static void test_append_readback(void **state)
{
    (void)state;
    ra_dtype dts[3] = {RA_DTYPE_F32, RA_DTYPE_F16, RA_DTYPE_BF16};
    for (int d = 0; d < 3; d++) {
        ra_mem acct = {0, 0, NULL};
        ra_kv *kv;
        int dim = 24;
        assert_int_equal(ra_kv_create(&kv, dim, dts[d], &acct), RA_OK);
        trng r = {1};
        size_t total = 0;
        size_t es = ra_dtype_size(dts[d]);
        void *allk = malloc(5000 * dim * es), *allv = malloc(5000 * dim * es);
        for (size_t chunk = 1; total + chunk <= 5000; chunk = chunk * 2 + 1) {
            void *k = tfill(&r, dts[d], chunk * dim, 1.f), *v = tfill(&r, dts[d], chunk * dim, 1.f);
            int64_t *pos = malloc(chunk * sizeof *pos);
            for (size_t i = 0; i < chunk; i++)
                pos[i] = (int64_t)(total + i) * 3;
            assert_int_equal(ra_kv_append(kv, k, v, pos, chunk), RA_OK);
            memcpy((char *)allk + total * dim * es, k, chunk * dim * es);
            memcpy((char *)allv + total * dim * es, v, chunk * dim * es);
            total += chunk;
            free(k);
            free(v);
            free(pos);
        }
        assert_int_equal(ra_kv_count(kv), total);
        assert_memory_equal(ra_kv_keys(kv), allk, total * dim * es);
        assert_memory_equal(ra_kv_values(kv), allv, total * dim * es);
        for (size_t i = 0; i < total; i++)
            assert_int_equal(ra_kv_positions(kv)[i], (int64_t)i * 3);
        assert_true(((uintptr_t)ra_kv_keys(kv) & 63) == 0); /* aligned for SIMD */
        assert_true(acct.used >= total * (2 * dim * es + 8));
        assert_int_equal(acct.used, ra_kv_bytes(kv));
        assert_int_equal(ra_kv_append(kv, NULL, NULL, NULL, 0), RA_OK); /* empty: no-op */
        ra_kv_destroy(kv);
        assert_int_equal(acct.used, 0);
        free(allk);
        free(allv);
    }
}

static void test_append_rejects(void **state)
{
    (void)state;
    ra_mem acct = {0, 0, NULL};
    ra_kv *kv;
    int dim = 8;
    assert_int_equal(ra_kv_create(&kv, dim, RA_DTYPE_F16, &acct), RA_OK);
    trng r = {2};
    uint16_t *k = tfill(&r, RA_DTYPE_F16, 4 * dim, 1.f), *v = tfill(&r, RA_DTYPE_F16, 4 * dim, 1.f);
    int64_t pos[4] = {0, 1, 2, 3};
    assert_int_equal(ra_kv_append(kv, k, v, pos, 4), RA_OK);
    size_t used = acct.used;
    /* NaN in a key, Inf in a value (last element, the tail of any SIMD loop) */
    k[5] = 0x7e00;
    assert_int_equal(ra_kv_append(kv, k, v, pos, 4), RA_ENONFINITE);
    k[5] = 0x3c00;
    v[4 * dim - 1] = 0xfc00;
    assert_int_equal(ra_kv_append(kv, k, v, pos, 4), RA_ENONFINITE);
    v[4 * dim - 1] = 0;
    assert_int_equal(ra_kv_count(kv), 4);
    assert_int_equal(acct.used, used);
    assert_int_equal(ra_kv_append(kv, NULL, v, pos, 4), RA_EINVAL);
    assert_int_equal(ra_kv_append(kv, k, v, NULL, 4), RA_EINVAL);
    assert_int_equal(ra_kv_append(NULL, k, v, pos, 4), RA_EINVAL);
    /* more rows than the store may ever hold: refused before reading or allocating */
    assert_int_equal(ra_kv_append(kv, k, v, pos, RA_KV_MAX_ROWS), RA_ETOOBIG);
    assert_int_equal(ra_kv_append(kv, k, v, pos, SIZE_MAX), RA_ETOOBIG);
    assert_int_equal(ra_kv_count(kv), 4);
    ra_kv_destroy(kv);
    free(k);
    free(v);
}

static void test_memory_limit(void **state)
{
    (void)state;
    ra_mem acct = {.limit = 200000, .used = 0};
    ra_kv *kv;
    int dim = 128;
    assert_int_equal(ra_kv_create(&kv, dim, RA_DTYPE_F32, &acct), RA_OK);
    trng r = {4};
    size_t n = 100; /* 100 rows of 1 KiB (k+v) fit; 1000 do not */
    float *k = tfill(&r, RA_DTYPE_F32, 1000 * dim, 1.f), *v = tfill(&r, RA_DTYPE_F32, 1000 * dim, 1.f);
    int64_t *pos = calloc(1000, sizeof *pos);
    assert_int_equal(ra_kv_append(kv, k, v, pos, n), RA_OK);
    size_t used = acct.used;
    assert_true(used <= acct.limit);
    assert_int_equal(ra_kv_append(kv, k, v, pos, 1000), RA_ENOMEM);
    assert_int_equal(ra_kv_count(kv), n);
    assert_int_equal(acct.used, used);
    assert_memory_equal(ra_kv_keys(kv), k, n * dim * 4); /* data intact */
    ra_kv_destroy(kv);
    assert_int_equal(acct.used, 0);
    /* accounting primitives */
    assert_int_equal(ra_mem_reserve(&acct, 150000), RA_OK);
    assert_int_equal(ra_mem_reserve(&acct, 60000), RA_ENOMEM);
    assert_int_equal(acct.used, 150000);
    ra_mem_release(&acct, 150000);
    assert_int_equal(acct.used, 0);
    assert_int_equal(ra_mem_reserve(NULL, 1 << 30), RA_OK);
    /* nested accounts (a session inside the daemon): each change reaches the parent, a
     * reservation must fit both limits and a refused one leaves both as they were */
    ra_mem top = {.limit = 100000}, sess = {.limit = 0, .parent = &top};
    assert_int_equal(ra_mem_reserve(&sess, 70000), RA_OK);
    assert_int_equal(top.used, 70000);
    assert_int_equal(ra_mem_reserve(&sess, 40000), RA_ENOMEM);
    assert_int_equal(sess.used, 70000);
    assert_int_equal(top.used, 70000);
    sess.limit = 80000;
    assert_int_equal(ra_mem_reserve(&sess, 20000), RA_ENOMEM); /* the child's own limit */
    assert_int_equal(top.used, 70000);
    ra_mem_charge(&sess, 50000); /* growth that already happened passes the limits */
    assert_int_equal(top.used, 120000);
    ra_mem_release(&sess, 120000);
    assert_int_equal(sess.used, 0);
    assert_int_equal(top.used, 0);
    free(k);
    free(v);
    free(pos);
}

/* Room made ahead of an append (what a daemon reserves for all KV heads of a store at
 * once): the cost is known before, the growth uses bytes reserved by the caller, and the
 * append that follows needs no memory. */
static void test_grow_prepaid(void **state)
{
    (void)state;
    int dim = 16;
    size_t row = 2 * (size_t)dim * 4 + 8;
    ra_mem acct = {0, 0, NULL};
    ra_kv *kv;
    assert_int_equal(ra_kv_create(&kv, dim, RA_DTYPE_F32, &acct), RA_OK);
    trng r = {9};
    float *k = tfill(&r, RA_DTYPE_F32, 300 * dim, 1.f);
    int64_t *pos = calloc(300, sizeof *pos);
    size_t cap, bytes, left;
    ra_kv_grow_cost(kv, 256, 1, &cap, &bytes); /* empty: the whole arrays */
    assert_int_equal(cap, 256);
    assert_int_equal(bytes, 256 * row);
    assert_int_equal(ra_kv_append(kv, k, k, pos, 256), RA_OK);
    assert_int_equal(acct.used, 256 * row);
    ra_kv_grow_cost(kv, 10, 0, &cap, &bytes); /* remapped in place: only the new rows */
    assert_int_equal(cap, 384);
    assert_int_equal(bytes, 128 * row);
    ra_kv_grow_cost(kv, 10, 1, &cap, &bytes);
    assert_int_equal(cap, 266);
    assert_int_equal(bytes, 10 * row);
    acct.limit = 256 * row + 10 * row; /* exactly that */
    assert_int_equal(ra_mem_reserve(&acct, 10 * row), RA_OK);
    assert_int_equal(ra_kv_grow(kv, cap, 10 * row, &left), RA_OK);
    assert_int_equal(left, 0);
    assert_int_equal(acct.used, acct.limit);
    assert_int_equal(ra_kv_append(kv, k, k, pos, 10), RA_OK); /* no memory needed */
    assert_int_equal(acct.used, acct.limit);
    ra_kv_grow_cost(kv, 0, 1, &cap, &bytes);
    assert_int_equal(cap, 0);
    /* more prepaid than needed comes back as left; a failed growth returns all of it */
    acct.limit = 0;
    ra_kv_grow_cost(kv, 1, 1, &cap, &bytes);
    assert_int_equal(ra_mem_reserve(&acct, bytes + 100), RA_OK);
    assert_int_equal(ra_kv_grow(kv, cap, bytes + 100, &left), RA_OK);
    assert_int_equal(left, 100);
    ra_mem_release(&acct, left);
    size_t used = acct.used;
    acct.limit = used;
    ra_kv_grow_cost(kv, 50, 1, &cap, &bytes);
    assert_int_equal(ra_kv_grow(kv, cap, 0, &left), RA_ENOMEM);
    assert_int_equal(left, 0);
    assert_int_equal(acct.used, used);
    ra_kv_destroy(kv);
    assert_int_equal(acct.used, 0);
    free(k);
    free(pos);
}

static void test_pinned_view(void **state)
{
    (void)state;
    ra_mem acct = {0, 0, NULL};
    ra_kv *kv, *view = NULL;
    int dim = 16;
    assert_int_equal(ra_kv_create(&kv, dim, RA_DTYPE_F16, &acct), RA_OK);
    trng r = {8};
    size_t n0 = 300;
    uint16_t *k = tfill(&r, RA_DTYPE_F16, 20000 * dim, 1.f), *v = tfill(&r, RA_DTYPE_F16, 20000 * dim, 1.f);
    int64_t *pos = calloc(20000, sizeof *pos);
    assert_int_equal(ra_kv_append(kv, k, v, pos, n0), RA_OK);
    assert_int_equal(ra_kv_pin(kv, &view), RA_OK);
    assert_int_equal(ra_kv_count(view), n0);
    const void *vk = ra_kv_keys(view);
    /* grow several times while pinned: the view's rows stay readable and unchanged */
    for (int i = 0; i < 10; i++)
        assert_int_equal(ra_kv_append(kv, k + n0 * dim, v, pos, 1900), RA_OK);
    assert_ptr_not_equal(ra_kv_keys(kv), vk);
    assert_ptr_equal(ra_kv_keys(view), vk);
    assert_memory_equal(ra_kv_keys(view), k, n0 * dim * 2);
    assert_int_equal(ra_kv_count(view), n0);
    assert_int_equal(ra_kv_append(view, k, v, pos, 1), RA_ESTATE); /* views are read-only */
    size_t pinned_bytes = acct.used;
    ra_kv_unpin(kv, view);
    assert_true(acct.used < pinned_bytes); /* retired arrays released */
    assert_int_equal(acct.used, ra_kv_bytes(kv));
    assert_int_equal(ra_kv_count(kv), n0 + 19000);
    ra_kv_destroy(kv);
    assert_int_equal(acct.used, 0);
    free(k);
    free(v);
    free(pos);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_create_args),    cmocka_unit_test(test_append_readback),
        cmocka_unit_test(test_append_rejects), cmocka_unit_test(test_memory_limit),
        cmocka_unit_test(test_pinned_view),    cmocka_unit_test(test_grow_prepaid),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
