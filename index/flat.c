/* Exact search, three ways: ra_exact_topk (a plain SIMD scan with a bounded heap: the
 * reference answer, the fallback while an index is being built, and ra_backend_scan,
 * which RA_INDEX_FLAT heads use; no copy of the keys), ra_exact_knn_batch (many queries
 * at once through FAISS IndexFlatIP, i.e. BLAS sgemm: ground truth of the benchmarks, the
 * routing lists of an installed graph; the graph build has its own, graph_knn.c), and
 * ra_backend_flat, FAISS IndexFlatIP over an fp32 copy of the keys: the FAISS exact
 * baseline of the benchmark. RA_INDEX_FLAT uses the scan because it needs no copy (FAISS
 * holds fp32: twice the bytes of fp16 keys, and each append is copied again) and sees
 * appends with no work. Speed for one query is in the same range either way on the H200
 * host (2-6 ms over 128K fp16 keys of dim 128, run-to-run noise of that shared machine
 * about 2x; one run had FAISS at 12-16 ms). Also the FAISS helpers the other FAISS
 * backends share. */
#include <math.h>
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <faiss/c_api/IndexFlat_c.h>
#include <faiss/c_api/Index_c.h>
#include <faiss/c_api/error_c.h>

#include "faiss_util.h"
#include "ra_backend.h"
#include "ra_kernels.h"
#include "ra_log.h"
#include "ra_topk.h"

/* ---------- FAISS helpers ---------- */

ra_status ra_index_faiss_error(const char *what, int rc)
{
    const char *e = faiss_get_last_error();
    char msg[512];
    snprintf(msg, sizeof msg, "%s", e ? e : "(no message)");
    RA_ERROR("faiss: %s failed (rc %d): %s", what, rc, msg);
    if (strstr(msg, "bad_alloc") || strstr(msg, "memory"))
        return RA_ENOMEM;
    return RA_EINTERNAL;
}

void ra_index_rows_f32(const ra_kv *kv, size_t first, size_t n, float *dst)
{
    int dim = ra_kv_dim(kv);
    ra_dtype t = ra_kv_dtype(kv);
    const char *k = (const char *)ra_kv_keys(kv) + first * (size_t)dim * ra_dtype_size(t);
    ra_kern_to_f32(k, t, n * (size_t)dim, dst);
}

ra_status ra_index_faiss_add_rows(void *faiss_index, const ra_kv *kv, size_t first, size_t n,
                                  const ra_index_opts *opts)
{
    /* a build (opts set) checks its cancel flag every chunk: smaller ones there */
    size_t chunk = opts ? 2048 : 16384;
    int dim = ra_kv_dim(kv);
    size_t c = n < chunk ? n : chunk;
    if (n == 0)
        return RA_OK;
    float *buf = malloc(c * (size_t)dim * sizeof(float));
    if (!buf)
        return RA_ENOMEM;
    ra_status st = RA_OK;
    for (size_t i = 0; i < n; i += c) {
        size_t m = n - i < c ? n - i : c;
        if (ra_index_cancelled(opts)) {
            st = RA_ECLOSED;
            break;
        }
        ra_index_rows_f32(kv, first + i, m, buf);
        int rc = faiss_Index_add((FaissIndex *)faiss_index, (idx_t)m, buf);
        if (rc) {
            st = ra_index_faiss_error("Index_add", rc);
            break;
        }
    }
    free(buf);
    return st;
}

void ra_index_omp_single(void (*fn)(void *), void *arg)
{
    int old = omp_get_max_threads();
    if (old != 1)
        omp_set_num_threads(1);
    fn(arg);
    if (old != 1)
        omp_set_num_threads(old);
}

/* ---------- exact top-k by scan ---------- */

/* Offers m scores of rows base.. to the bounded heap of k held in scores/ids. */
static void heap_offer(float *scores, int32_t *ids, int *cnt_io, int k, const float *buf, size_t m,
                       size_t base)
{
    for (size_t i = 0; i < m; i++)
        ra_topk_push(scores, ids, cnt_io, k, buf[i], (int32_t)(base + i));
}

enum { SCAN_BLOCK = 512 }; /* rows per pass: 128 KiB of fp16 dim-128 keys stay in L2 */

ra_status ra_exact_topk(const ra_kv *kv, size_t n, const float *q, int k, int32_t *ids,
                        float *scores, int *n_out)
{
    if (!kv || !q || k <= 0 || !ids || !scores || !n_out || n > ra_kv_count(kv))
        return RA_EINVAL;
    float buf[SCAN_BLOCK];
    int dim = ra_kv_dim(kv);
    ra_dtype t = ra_kv_dtype(kv);
    const void *keys = ra_kv_keys(kv);
    /* The caller's arrays are the heap: no allocation on the hot path. */
    int cnt = 0;
    for (size_t b = 0; b < n; b += SCAN_BLOCK) {
        size_t m = n - b < SCAN_BLOCK ? n - b : SCAN_BLOCK;
        ra_kern_dot_range(q, keys, t, dim, b, m, buf);
        heap_offer(scores, ids, &cnt, k, buf, m, b);
    }
    ra_topk_finish(scores, ids, cnt);
    *n_out = cnt;
    return RA_OK;
}

ra_status ra_exact_topk_multi(const ra_kv *kv, size_t n, size_t nq, const float *q, int k,
                              int32_t *ids, float *scores, int *n_out)
{
    if (!kv || (nq && (!q || !ids || !scores || !n_out)) || k <= 0 || n > ra_kv_count(kv))
        return RA_EINVAL;
    float buf[SCAN_BLOCK];
    int dim = ra_kv_dim(kv);
    ra_dtype t = ra_kv_dtype(kv);
    const void *keys = ra_kv_keys(kv);
    for (size_t j = 0; j < nq; j++)
        n_out[j] = 0;
    /* Block-major: each block of keys comes from memory once and is re-read from L2 by
     * every query, so a GQA group costs about one scan of memory, not nq. */
    for (size_t b = 0; b < n; b += SCAN_BLOCK) {
        size_t m = n - b < SCAN_BLOCK ? n - b : SCAN_BLOCK;
        for (size_t j = 0; j < nq; j++) {
            ra_kern_dot_range(q + j * (size_t)dim, keys, t, dim, b, m, buf);
            heap_offer(scores + j * (size_t)k, ids + j * (size_t)k, &n_out[j], k, buf, m, b);
        }
    }
    for (size_t j = 0; j < nq; j++)
        ra_topk_finish(scores + j * (size_t)k, ids + j * (size_t)k, n_out[j]);
    return RA_OK;
}

/* ---------- batched exact k-NN through FAISS ---------- */

ra_status ra_exact_knn_batch(const ra_kv *kv, size_t n, const float *q, size_t nq, int K,
                             int32_t *ids, float *scores)
{
    if (!kv || (nq && !q) || K <= 0 || !ids || !scores || n > ra_kv_count(kv))
        return RA_EINVAL;
    /* Keys go through FAISS in slices so the fp32 copy stays bounded; results of the
     * slices are merged per query. */
    enum { SLICE = 1 << 18 };
    int dim = ra_kv_dim(kv);
    size_t slice = n < SLICE ? n : SLICE;
    ra_status st = RA_OK;
    float *kf = NULL, *cd = NULL, *md = NULL;
    idx_t *cl = NULL;
    int32_t *mi = NULL;
    FaissIndexFlatIP *idx = NULL;

    for (size_t i = 0; i < nq * (size_t)K; i++) {
        ids[i] = -1;
        scores[i] = -INFINITY;
    }
    if (n == 0 || nq == 0)
        return RA_OK;
    int rc = faiss_IndexFlatIP_new_with(&idx, dim);
    if (rc) {
        st = ra_index_faiss_error("IndexFlatIP_new", rc);
        goto fail;
    }
    kf = malloc(slice * (size_t)dim * sizeof(float));
    cd = malloc(nq * (size_t)K * sizeof(float));
    cl = malloc(nq * (size_t)K * sizeof(idx_t));
    md = malloc((size_t)K * sizeof(float));
    mi = malloc((size_t)K * sizeof(int32_t));
    if (!kf || !cd || !cl || !md || !mi) {
        st = RA_ENOMEM;
        RA_ERROR("exact_knn_batch: out of memory (%zu keys, %zu queries, K %d)", n, nq, K);
        goto fail;
    }
    for (size_t b = 0; b < n; b += slice) {
        size_t m = n - b < slice ? n - b : slice;
        int kk = (size_t)K < m ? K : (int)m;
        ra_index_rows_f32(kv, b, m, kf);
        if ((rc = faiss_Index_reset((FaissIndex *)idx)) ||
            (rc = faiss_Index_add((FaissIndex *)idx, (idx_t)m, kf)) ||
            (rc = faiss_Index_search((FaissIndex *)idx, (idx_t)nq, q, kk, cd, cl))) {
            st = ra_index_faiss_error("IndexFlatIP add/search", rc);
            goto fail;
        }
        for (size_t j = 0; j < nq; j++) {
            int32_t *oi = ids + j * (size_t)K;
            float *os = scores + j * (size_t)K;
            const float *ns = cd + j * (size_t)kk;
            const idx_t *ni = cl + j * (size_t)kk;
            if (b == 0) {
                for (int r = 0; r < kk; r++) {
                    oi[r] = ni[r] < 0 ? -1 : (int32_t)(ni[r] + (idx_t)b);
                    os[r] = ni[r] < 0 ? -INFINITY : ns[r];
                }
                continue;
            }
            int a = 0, c = 0;
            for (int r = 0; r < K; r++) { /* merge two lists sorted best first */
                int take_new = c < kk && ni[c] >= 0 &&
                               (a >= K || oi[a] < 0 || ns[c] > os[a]);
                if (take_new) {
                    md[r] = ns[c];
                    mi[r] = (int32_t)(ni[c] + (idx_t)b);
                    c++;
                } else if (a < K) {
                    md[r] = os[a];
                    mi[r] = oi[a];
                    a++;
                } else {
                    md[r] = -INFINITY;
                    mi[r] = -1;
                }
            }
            memcpy(os, md, (size_t)K * sizeof(float));
            memcpy(oi, mi, (size_t)K * sizeof(int32_t));
        }
    }
fail:
    if (idx)
        faiss_Index_free((FaissIndex *)idx);
    free(kf);
    free(cd);
    free(cl);
    free(md);
    free(mi);
    return st;
}

/* ---------- the exact baseline backend ---------- */

typedef struct flat_state {
    FaissIndexFlatIP *idx;
    int dim;
} flat_state;

static void flat_destroy(void *state)
{
    flat_state *s = state;
    if (!s)
        return;
    if (s->idx)
        faiss_Index_free((FaissIndex *)s->idx);
    free(s);
}

static ra_status flat_build(void **state, const ra_kv *kv, size_t n, const float *train_q,
                            size_t nq, const ra_index_opts *opts)
{
    flat_state *s = calloc(1, sizeof *s);
    if (!s)
        return RA_ENOMEM;
    s->dim = ra_kv_dim(kv);
    int rc = faiss_IndexFlatIP_new_with(&s->idx, s->dim);
    if (rc) {
        ra_status st = ra_index_faiss_error("IndexFlatIP_new", rc);
        flat_destroy(s);
        return st;
    }
    ra_status st = ra_index_faiss_add_rows(s->idx, kv, 0, n, opts);
    if (st != RA_OK) {
        flat_destroy(s);
        return st;
    }
    *state = s;
    return RA_OK;
}

static ra_status flat_add(void *state, const ra_kv *kv, size_t first, size_t n)
{
    flat_state *s = state;
    return ra_index_faiss_add_rows(s->idx, kv, first, n, NULL);
}

typedef struct flat_call {
    FaissIndexFlatIP *idx;
    const float *q;
    int k;
    float *dis;
    idx_t *lab;
    int rc;
} flat_call;

static void flat_call_run(void *arg)
{
    flat_call *c = arg;
    c->rc = faiss_Index_search((FaissIndex *)c->idx, 1, c->q, c->k, c->dis, c->lab);
}

static ra_status flat_search(void *state, const ra_kv *kv, const float *q,
                             const ra_search_params *p, int32_t *ids, float *scores, int *n_out,
                             ra_search_stats *st)
{
    flat_state *s = state;
    idx_t nt = faiss_Index_ntotal((FaissIndex *)s->idx);
    int k = (idx_t)p->k < nt ? p->k : (int)nt;
    if (k <= 0) {
        *n_out = 0;
        return RA_OK;
    }
    idx_t lab_stack[256];
    float dis_stack[256];
    idx_t *lab = lab_stack;
    float *dis = dis_stack;
    if (k > 256) {
        lab = malloc((size_t)k * sizeof(idx_t));
        dis = malloc((size_t)k * sizeof(float));
        if (!lab || !dis) {
            free(lab);
            free(dis);
            return RA_ENOMEM;
        }
    }
    flat_call c = {s->idx, q, k, dis, lab, 0};
    ra_index_omp_single(flat_call_run, &c);
    int rc = c.rc;
    ra_status ret = RA_OK;
    if (rc) {
        ret = ra_index_faiss_error("IndexFlatIP_search", rc);
    } else {
        int m = 0;
        for (int i = 0; i < k; i++)
            if (lab[i] >= 0) {
                ids[m] = (int32_t)lab[i];
                scores[m] = dis[i];
                m++;
            }
        *n_out = m;
        if (st)
            st->scanned += (uint64_t)nt;
    }
    if (lab != lab_stack) {
        free(lab);
        free(dis);
    }
    return ret;
}

static size_t flat_bytes(void *state)
{
    flat_state *s = state;
    return sizeof *s + (size_t)faiss_Index_ntotal((FaissIndex *)s->idx) * (size_t)s->dim * 4;
}

const ra_backend_ops ra_backend_flat = {
    .name = "flat",
    .build = flat_build,
    .add = flat_add,
    .search = flat_search,
    .bytes = flat_bytes,
    .destroy = flat_destroy,
};

/* ---------- the exact scan backend (RA_INDEX_FLAT) ---------- */

/* No state beyond a token: the scan reads the ra_kv it is handed, so appends are
 * searchable with no work and the index costs no memory. */
static char scan_token;

static ra_status scan_build(void **state, const ra_kv *kv, size_t n, const float *train_q,
                            size_t nq, const ra_index_opts *opts)
{
    *state = &scan_token;
    return RA_OK;
}

static ra_status scan_add(void *state, const ra_kv *kv, size_t first, size_t n) { return RA_OK; }

static ra_status scan_search(void *state, const ra_kv *kv, const float *q,
                             const ra_search_params *p, int32_t *ids, float *scores, int *n_out,
                             ra_search_stats *st)
{
    size_t n = ra_kv_count(kv);
    ra_status r = ra_exact_topk(kv, n, q, p->k, ids, scores, n_out);
    if (r == RA_OK && st)
        st->scanned += n;
    return r;
}

static size_t scan_bytes(void *state) { return 0; }
static void scan_destroy(void *state) {}

const ra_backend_ops ra_backend_scan = {
    .name = "scan",
    .build = scan_build,
    .add = scan_add,
    .search = scan_search,
    .bytes = scan_bytes,
    .destroy = scan_destroy,
};
