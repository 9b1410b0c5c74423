/* The append-only K/V/position store of one head (ra_kv.h) and the memory account
 * (ra_mem). Rows live in three contiguous 64-byte-aligned arrays so the scan kernels
 * stream them; growth is geometric and reserved on the account before anything is
 * allocated, so an oversized append is a clean RA_ENOMEM, never an OOM kill.
 *
 * Pinned views exist for the background index build: it reads rows [0, n) without the
 * head lock while appends continue. A view shares the arrays of the moment; when the
 * store must grow while pinned, the old arrays are retired instead of freed (rows are
 * append-only, so the view's rows never change) and released at the last unpin. */
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "ra_kernels.h"
#include "ra_kv.h"
#include "ra_bigmem.h"
#include "ra_log.h"

ra_status ra_mem_reserve(ra_mem *acct, size_t bytes)
{
    if (!acct || bytes == 0)
        return RA_OK;
    for (ra_mem *a = acct; a; a = a->parent) {
        size_t used = __atomic_add_fetch(&a->used, bytes, __ATOMIC_RELAXED);
        if (a->limit && used > a->limit) {
            for (ra_mem *b = acct; b != a->parent; b = b->parent) /* undo up to a */
                __atomic_sub_fetch(&b->used, bytes, __ATOMIC_RELAXED);
            return RA_ENOMEM;
        }
    }
    return RA_OK;
}

void ra_mem_release(ra_mem *acct, size_t bytes)
{
    for (ra_mem *a = bytes ? acct : NULL; a; a = a->parent)
        __atomic_sub_fetch(&a->used, bytes, __ATOMIC_RELAXED);
}

void ra_mem_charge(ra_mem *acct, size_t bytes)
{
    for (ra_mem *a = bytes ? acct : NULL; a; a = a->parent)
        __atomic_add_fetch(&a->used, bytes, __ATOMIC_RELAXED);
}

typedef struct ra_kv_retired {
    void *k, *v;
    int64_t *pos;
    size_t cap; /* rows the arrays were mapped for */
    size_t bytes;
    struct ra_kv_retired *next;
} ra_kv_retired;

struct ra_kv {
    int dim;
    ra_dtype dtype;
    size_t row_bytes;
    size_t n, cap;
    void *k, *v;
    int64_t *pos;
    ra_mem *acct;
    size_t held; /* bytes of k, v, pos reserved on acct */
    int pins;
    ra_kv_retired *retired;
    ra_kv *parent; /* set for a pinned view */
};

#define RA_KV_MAX_DIM 65536

/* The three arrays live in their own mappings (ra_bigmem.h): page-aligned rows, huge
 * pages where the kernel has them, and growth by mremap (no copy) unless a view pins
 * the old arrays. */
static void arrays_free(const ra_kv *kv, void *k, void *v, int64_t *pos, size_t cap)
{
    ra_big_free(k, cap * kv->row_bytes);
    ra_big_free(v, cap * kv->row_bytes);
    ra_big_free(pos, cap * sizeof(int64_t));
}

static size_t kv_bytes_for(const ra_kv *kv, size_t cap)
{
    return cap * (2 * kv->row_bytes + sizeof(int64_t));
}

ra_status ra_kv_create(ra_kv **out, int dim, ra_dtype dtype, ra_mem *acct)
{
    if (!out || dim <= 0 || dim > RA_KV_MAX_DIM || ra_dtype_size(dtype) == 0) {
        RA_ERROR("kv: bad arguments (dim %d, dtype %d)", dim, (int)dtype);
        return RA_EINVAL;
    }
    ra_kv *kv = calloc(1, sizeof *kv);
    if (!kv)
        return RA_ENOMEM;
    kv->dim = dim;
    kv->dtype = dtype;
    kv->row_bytes = (size_t)dim * ra_dtype_size(dtype);
    kv->acct = acct;
    *out = kv;
    return RA_OK;
}

static void free_retired(ra_kv *kv)
{
    while (kv->retired) {
        ra_kv_retired *r = kv->retired;
        kv->retired = r->next;
        arrays_free(kv, r->k, r->v, r->pos, r->cap);
        ra_mem_release(kv->acct, r->bytes);
        free(r);
    }
}

void ra_kv_destroy(ra_kv *kv)
{
    if (!kv)
        return;
    if (kv->parent) { /* a view: only ra_kv_unpin may free it */
        RA_ERROR("kv: ra_kv_destroy called on a pinned view (ignored)");
        return;
    }
    if (kv->pins)
        RA_ERROR("kv: destroyed with %d pinned views outstanding", kv->pins);
    free_retired(kv);
    arrays_free(kv, kv->k, kv->v, kv->pos, kv->cap);
    ra_mem_release(kv->acct, kv->held);
    free(kv);
}

/* The rows a growth to hold `need` rows goes to: the geometric step, or exactly need. */
static size_t grow_cap(const ra_kv *kv, size_t need, int exact)
{
    size_t cap = exact ? need : kv->cap + kv->cap / 2;
    if (cap < need)
        cap = need;
    if (!exact && cap < 256)
        cap = 256;
    if (cap > RA_KV_MAX_ROWS)
        cap = RA_KV_MAX_ROWS;
    return cap;
}

/* What growing to `cap` rows adds to the account while it runs: the new arrays, less
 * the old ones when they can be remapped in place (nobody pins them; no copy). */
static size_t grow_cost(const ra_kv *kv, size_t cap)
{
    size_t bytes = kv_bytes_for(kv, cap);
    return !kv->pins && kv->k ? bytes - kv->held : bytes;
}

void ra_kv_grow_cost(const ra_kv *kv, size_t n, int exact, size_t *cap, size_t *bytes)
{
    *cap = 0;
    *bytes = 0;
    if (!kv || kv->parent || n == 0 || n > RA_KV_MAX_ROWS - kv->n || kv->n + n <= kv->cap)
        return;
    *cap = grow_cap(kv, kv->n + n, exact);
    *bytes = grow_cost(kv, *cap);
}

/* Grows to `cap` rows. `prepaid` bytes are already reserved on the account for it (0:
 * reserve here); *left gets the part of them this growth did not need (the caller
 * releases it; all of prepaid on failure). */
static ra_status kv_grow_to(ra_kv *kv, size_t cap, size_t prepaid, size_t *left)
{
    *left = prepaid;
    size_t bytes = kv_bytes_for(kv, cap), cost = grow_cost(kv, cap);
    int remap = !kv->pins && kv->k;
    if (cost > prepaid) {
        ra_status st = ra_mem_reserve(kv->acct, cost - prepaid);
        if (st != RA_OK) {
            RA_ERROR("kv: memory limit reached growing to %zu rows (%zu bytes)", cap, bytes);
            return st;
        }
        *left = 0;
    } else {
        *left = prepaid - cost;
    }
    /* from here `cost` is reserved for this growth; failures give it back */
    void *k = NULL, *v = NULL;
    int64_t *pos = NULL;
    size_t rb = kv->row_bytes, oc = kv->cap;
    if (remap) { /* nobody holds the old arrays: remap them in place */
        k = ra_big_resize(kv->k, oc * rb, cap * rb);
        if (k) {
            kv->k = k;
            v = ra_big_resize(kv->v, oc * rb, cap * rb);
        }
        if (v) {
            kv->v = v;
            pos = ra_big_resize(kv->pos, oc * sizeof(int64_t), cap * sizeof(int64_t));
        }
        if (!pos) { /* undo what grew: the store stays as it was */
            if (v)
                kv->v = ra_big_resize(kv->v, cap * rb, oc * rb);
            if (k)
                kv->k = ra_big_resize(kv->k, cap * rb, oc * rb);
            ra_mem_release(kv->acct, cost);
            RA_ERROR("kv: out of memory growing to %zu rows", cap);
            return RA_ENOMEM;
        }
    } else {
        k = ra_big_alloc(cap * rb);
        v = ra_big_alloc(cap * rb);
        pos = ra_big_alloc(cap * sizeof(int64_t));
        if (!k || !v || !pos) {
            arrays_free(kv, k, v, pos, cap);
            ra_mem_release(kv->acct, cost);
            RA_ERROR("kv: out of memory growing to %zu rows", cap);
            return RA_ENOMEM;
        }
        if (kv->n) {
            memcpy(k, kv->k, kv->n * rb);
            memcpy(v, kv->v, kv->n * rb);
            memcpy(pos, kv->pos, kv->n * sizeof(int64_t));
        }
        if (kv->pins && kv->k) {
            ra_kv_retired *r = malloc(sizeof *r);
            if (!r) {
                arrays_free(kv, k, v, pos, cap);
                ra_mem_release(kv->acct, cost);
                return RA_ENOMEM;
            }
            *r = (ra_kv_retired){kv->k, kv->v, kv->pos, oc, kv->held, kv->retired};
            kv->retired = r;
        } else {
            arrays_free(kv, kv->k, kv->v, kv->pos, oc);
            ra_mem_release(kv->acct, kv->held);
        }
    }
    kv->k = k;
    kv->v = v;
    kv->pos = pos;
    kv->cap = cap;
    kv->held = bytes;
    return RA_OK;
}

ra_status ra_kv_grow(ra_kv *kv, size_t cap, size_t prepaid, size_t *left)
{
    *left = prepaid;
    if (!kv || kv->parent)
        return RA_EINVAL;
    if (cap <= kv->cap)
        return RA_OK;
    return kv_grow_to(kv, cap, prepaid, left);
}

static ra_status kv_grow(ra_kv *kv, size_t need)
{
    size_t left;
    ra_status st = kv_grow_to(kv, grow_cap(kv, need, 0), 0, &left);
    if (st == RA_ENOMEM && grow_cap(kv, need, 0) > need) /* near the limit: only as needed */
        st = kv_grow_to(kv, need, 0, &left);
    return st;
}

ra_status ra_kv_append(ra_kv *kv, const void *k, const void *v, const int64_t *pos, size_t n)
{
    if (!kv)
        return RA_EINVAL;
    if (kv->parent) {
        RA_ERROR("kv: append to a pinned view");
        return RA_ESTATE;
    }
    if (n == 0)
        return RA_OK;
    if (!k || !v || !pos) {
        RA_ERROR("kv: append of %zu rows with a NULL array", n);
        return RA_EINVAL;
    }
    if (n > RA_KV_MAX_ROWS - kv->n) {
        RA_ERROR("kv: append of %zu rows to %zu exceeds the %zu-row limit", n, kv->n,
                 (size_t)RA_KV_MAX_ROWS);
        return RA_ETOOBIG;
    }
    size_t elems = n * (size_t)kv->dim;
    if (!ra_kern_all_finite(k, kv->dtype, elems) || !ra_kern_all_finite(v, kv->dtype, elems)) {
        RA_ERROR("kv: append of %zu rows rejected: keys or values contain NaN or Inf", n);
        return RA_ENONFINITE;
    }
    if (kv->n + n > kv->cap) {
        ra_status st = kv_grow(kv, kv->n + n);
        if (st != RA_OK)
            return st;
    }
    memcpy((char *)kv->k + kv->n * kv->row_bytes, k, n * kv->row_bytes);
    memcpy((char *)kv->v + kv->n * kv->row_bytes, v, n * kv->row_bytes);
    memcpy(kv->pos + kv->n, pos, n * sizeof(int64_t));
    kv->n += n;
    return RA_OK;
}

ra_status ra_kv_pin(ra_kv *kv, ra_kv **view)
{
    if (!kv || !view || kv->parent)
        return RA_EINVAL;
    ra_kv *w = malloc(sizeof *w);
    if (!w)
        return RA_ENOMEM;
    *w = *kv;
    w->acct = NULL;
    w->held = 0;
    w->pins = 0;
    w->retired = NULL;
    w->parent = kv;
    w->cap = kv->n;
    kv->pins++;
    *view = w;
    return RA_OK;
}

void ra_kv_unpin(ra_kv *kv, ra_kv *view)
{
    if (!kv || !view || view->parent != kv || kv->pins <= 0) {
        RA_ERROR("kv: unpin of a view that is not pinned here (ignored)");
        return;
    }
    free(view);
    if (--kv->pins == 0)
        free_retired(kv);
}

size_t ra_kv_count(const ra_kv *kv) { return kv ? kv->n : 0; }
int ra_kv_dim(const ra_kv *kv) { return kv->dim; }
ra_dtype ra_kv_dtype(const ra_kv *kv) { return kv->dtype; }
const void *ra_kv_keys(const ra_kv *kv) { return kv->k; }
const void *ra_kv_values(const ra_kv *kv) { return kv->v; }
const int64_t *ra_kv_positions(const ra_kv *kv) { return kv->pos; }

size_t ra_kv_bytes(const ra_kv *kv)
{
    if (!kv)
        return 0;
    size_t b = kv->held;
    for (const ra_kv_retired *r = kv->retired; r; r = r->next)
        b += r->bytes;
    return b;
}
