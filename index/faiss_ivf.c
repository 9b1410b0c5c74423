/* IVF-Flat baseline (FAISS IndexIVFFlat, inner product) behind the backend table.
 * effort = nprobe. FAISS keeps its own fp32 copy of the keys. The coarse assignment is
 * done here (quantizer search) so that `scanned` is honest: the sum of the sizes of the
 * probed lists, i.e. the keys whose inner product FAISS computes. nprobe is a field of
 * the FAISS index, so a search with a different nprobe than the last takes the state's
 * lock exclusively; searches with the same nprobe share it. */
#include <math.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#include <faiss/c_api/IndexFlat_c.h>
#include <faiss/c_api/IndexIVFFlat_c.h>
#include <faiss/c_api/IndexIVF_c.h>
#include <faiss/c_api/Index_c.h>

#include "faiss_util.h"
#include "ra_backend.h"
#include "ra_log.h"

#define IVF_DEFAULT_NPROBE 16
#define IVF_ADD_CHUNK ((size_t)4096)

typedef struct ivf_state {
    FaissIndexIVFFlat *idx; /* NULL when there were no keys to train on */
    FaissIndex *quantizer;  /* owned by idx */
    int dim;
    size_t nlist;
    size_t nprobe; /* the value set in idx; changed under the exclusive lock */
    pthread_rwlock_t lock;
} ivf_state;

static void ivf_destroy(void *state)
{
    ivf_state *s = state;
    if (!s)
        return;
    if (s->idx)
        faiss_Index_free((FaissIndex *)s->idx);
    pthread_rwlock_destroy(&s->lock);
    free(s);
}

static ra_status ivf_build(void **state, const ra_kv *kv, size_t n, const float *train_q,
                           size_t nq, const ra_index_opts *opts)
{
    ivf_state *s = calloc(1, sizeof *s);
    if (!s)
        return RA_ENOMEM;
    pthread_rwlock_init(&s->lock, NULL);
    s->dim = ra_kv_dim(kv);
    ra_status st = RA_OK;
    float *x = NULL;
    FaissIndexFlatIP *quant = NULL;
    if (n == 0) { /* nothing to cluster: searches fall back to an exact scan */
        *state = s;
        return RA_OK;
    }
    size_t nlist = opts->ivf_nlist > 0 ? (size_t)opts->ivf_nlist : (size_t)(4.0 * sqrt((double)n));
    if (nlist < 1)
        nlist = 1;
    if (nlist > n)
        nlist = n;
    s->nlist = nlist;
    int rc = faiss_IndexFlatIP_new_with(&quant, s->dim);
    if (rc) {
        st = ra_index_faiss_error("IndexFlatIP_new (IVF quantizer)", rc);
        goto fail;
    }
    rc = faiss_IndexIVFFlat_new_with_metric(&s->idx, (FaissIndex *)quant, (size_t)s->dim, nlist,
                                            METRIC_INNER_PRODUCT);
    if (rc) {
        st = ra_index_faiss_error("IndexIVFFlat_new", rc);
        goto fail;
    }
    faiss_IndexIVF_set_own_fields(s->idx, 1);
    s->quantizer = (FaissIndex *)quant;
    quant = NULL;
    x = malloc(n * (size_t)s->dim * sizeof(float));
    if (!x) {
        st = RA_ENOMEM;
        goto fail;
    }
    ra_index_rows_f32(kv, 0, n, x);
    if (ra_index_cancelled(opts)) {
        st = RA_ECLOSED;
        goto fail;
    }
    if ((rc = faiss_Index_train((FaissIndex *)s->idx, (idx_t)n, x))) {
        st = ra_index_faiss_error("IndexIVFFlat_train", rc);
        goto fail;
    }
    /* in chunks, so that a cancelled build ends within one chunk */
    for (size_t i = 0; i < n; i += IVF_ADD_CHUNK) {
        size_t m = n - i < IVF_ADD_CHUNK ? n - i : IVF_ADD_CHUNK;
        if (ra_index_cancelled(opts)) {
            st = RA_ECLOSED;
            goto fail;
        }
        if ((rc = faiss_Index_add((FaissIndex *)s->idx, (idx_t)m, x + i * (size_t)s->dim))) {
            st = ra_index_faiss_error("IndexIVFFlat_add", rc);
            goto fail;
        }
    }
    s->nprobe = faiss_IndexIVF_nprobe(s->idx);
    free(x);
    *state = s;
    return RA_OK;
fail:
    free(x);
    if (quant)
        faiss_Index_free((FaissIndex *)quant);
    ivf_destroy(s);
    return st;
}

static ra_status ivf_add(void *state, const ra_kv *kv, size_t first, size_t n)
{
    ivf_state *s = state;
    if (!s->idx)
        return RA_OK; /* untrained: searches scan exactly, which sees every row */
    return ra_index_faiss_add_rows(s->idx, kv, first, n, NULL);
}

typedef struct ivf_call {
    ivf_state *s;
    const float *q;
    int k;
    const idx_t *assign;
    const float *cdis;
    float *dis;
    idx_t *lab;
    int rc;
} ivf_call;

static void ivf_call_run(void *arg)
{
    ivf_call *c = arg;
    c->rc = faiss_IndexIVF_search_preassigned(c->s->idx, 1, c->q, c->k, c->assign, c->cdis, c->dis,
                                              c->lab, 0);
}

static ra_status ivf_search(void *state, const ra_kv *kv, const float *q,
                            const ra_search_params *p, int32_t *ids, float *scores, int *n_out,
                            ra_search_stats *st)
{
    ivf_state *s = state;
    if (!s->idx) {
        ra_status r = ra_exact_topk(kv, ra_kv_count(kv), q, p->k, ids, scores, n_out);
        if (r == RA_OK && st)
            st->scanned += ra_kv_count(kv);
        return r;
    }
    size_t nprobe = p->effort > 0 ? (size_t)p->effort : IVF_DEFAULT_NPROBE;
    if (nprobe > s->nlist)
        nprobe = s->nlist;
    idx_t nt = faiss_Index_ntotal((FaissIndex *)s->idx);
    int k = (idx_t)p->k < nt ? p->k : (int)nt;
    if (k <= 0) {
        *n_out = 0;
        return RA_OK;
    }
    ra_status ret = RA_OK;
    idx_t *assign = NULL, *lab = NULL;
    float *cdis = NULL, *dis = NULL;
    uint64_t scanned = 0;
    int rc;
    /* nprobe is a floor: when the probed lists hold fewer than k keys (tiny lists, or
     * degenerate data that k-means piles into one list) more lists are probed, so a
     * head with keys never answers with nothing. */
    for (;;) {
        free(assign);
        free(cdis);
        assign = malloc(nprobe * sizeof(idx_t) + (size_t)k * sizeof(idx_t));
        cdis = malloc(nprobe * sizeof(float) + (size_t)k * sizeof(float));
        if (!assign || !cdis) {
            ret = RA_ENOMEM;
            goto out;
        }
        lab = assign + nprobe;
        dis = cdis + nprobe;
        rc = faiss_Index_search(s->quantizer, 1, q, (idx_t)nprobe, cdis, assign);
        if (rc) {
            ret = ra_index_faiss_error("IVF quantizer search", rc);
            goto out;
        }
        scanned = 0;
        for (size_t i = 0; i < nprobe; i++)
            if (assign[i] >= 0)
                scanned += faiss_IndexIVF_get_list_size(s->idx, (size_t)assign[i]);
        if (scanned >= (uint64_t)k || nprobe >= s->nlist)
            break;
        nprobe = nprobe * 2 < s->nlist ? nprobe * 2 : s->nlist;
    }

    pthread_rwlock_rdlock(&s->lock);
    if (__atomic_load_n(&s->nprobe, __ATOMIC_RELAXED) != nprobe) {
        pthread_rwlock_unlock(&s->lock);
        pthread_rwlock_wrlock(&s->lock);
        faiss_IndexIVF_set_nprobe(s->idx, nprobe);
        __atomic_store_n(&s->nprobe, nprobe, __ATOMIC_RELAXED);
    }
    ivf_call c = {s, q, k, assign, cdis, dis, lab, 0};
    ra_index_omp_single(ivf_call_run, &c);
    rc = c.rc;
    pthread_rwlock_unlock(&s->lock);
    if (rc) {
        ret = ra_index_faiss_error("IVF search_preassigned", rc);
        goto out;
    }
    int m = 0;
    for (int i = 0; i < k; i++)
        if (lab[i] >= 0) {
            ids[m] = (int32_t)lab[i];
            scores[m] = dis[i];
            m++;
        }
    *n_out = m;
    if (st)
        st->scanned += scanned;
out:
    free(assign);
    free(cdis);
    return ret;
}

static size_t ivf_bytes(void *state)
{
    ivf_state *s = state;
    if (!s->idx)
        return sizeof *s;
    size_t n = (size_t)faiss_Index_ntotal((FaissIndex *)s->idx);
    /* codes + ids, plus the centroids */
    return sizeof *s + n * ((size_t)s->dim * 4 + 8) + s->nlist * (size_t)s->dim * 4;
}

const ra_backend_ops ra_backend_ivf = {
    .name = "ivf",
    .build = ivf_build,
    .add = ivf_add,
    .search = ivf_search,
    .bytes = ivf_bytes,
    .destroy = ivf_destroy,
};
