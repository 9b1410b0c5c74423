/* HNSW baseline (FAISS index_factory "HNSW<M>,Flat", inner product) behind the backend
 * table. effort = efSearch. FAISS keeps its own fp32 copy of the keys. efSearch is a
 * field of the FAISS index (the 1.7 C API has no per-search parameters), so a search
 * with a different efSearch than the last takes the state's lock exclusively.
 *
 * `scanned`: the C API exposes no HNSW statistics. When FAISS is 1.7.x (checked by
 * CMake, RA_FAISS_HNSW_STATS) this file reads the C++ global faiss::hnsw_stats (n3 + ndis)
 * before and after the search through its mangled symbol; that counter is global, so
 * the figure is exact for one search at a time (the benchmark) and approximate when
 * several HNSW searches run at once. Without it, `scanned` is reported as 0. FAISS
 * opens an OpenMP team even for one query, so searches run with a team of one. */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <faiss/c_api/AutoTune_c.h>
#include <faiss/c_api/Index_c.h>
#include <faiss/c_api/index_factory_c.h>

#include "faiss_util.h"
#include "ra_backend.h"
#include "ra_log.h"

#define HNSW_DEFAULT_EF 64

#ifdef RA_FAISS_HNSW_STATS
/* Layout of faiss::HNSWStats in FAISS 1.7.x (impl/HNSW.h). */
struct ra_faiss_hnsw_stats {
    size_t n1, n2, n3, ndis, nreorder;
};
extern struct ra_faiss_hnsw_stats ra_faiss_hnsw_stats_sym __asm__("_ZN5faiss10hnsw_statsE");
static inline size_t hnsw_ndis(void)
{
    /* 1.7.3 counts the level-0 beam's distances in n3 (search_from_candidates) and the
     * unbounded variant's in ndis; the few greedy upper-level steps are not counted. */
    return __atomic_load_n(&ra_faiss_hnsw_stats_sym.n3, __ATOMIC_RELAXED) +
           __atomic_load_n(&ra_faiss_hnsw_stats_sym.ndis, __ATOMIC_RELAXED);
}
#else
static inline size_t hnsw_ndis(void) { return 0; }
#endif

typedef struct hnsw_state {
    FaissIndex *idx;
    FaissParameterSpace *ps;
    int dim;
    int m;  /* HNSW M */
    int ef; /* the efSearch set in idx; changed under the exclusive lock */
    pthread_rwlock_t lock;
} hnsw_state;

static void hnsw_destroy(void *state)
{
    hnsw_state *s = state;
    if (!s)
        return;
    if (s->idx)
        faiss_Index_free(s->idx);
    if (s->ps)
        faiss_ParameterSpace_free(s->ps);
    pthread_rwlock_destroy(&s->lock);
    free(s);
}

static ra_status hnsw_build(void **state, const ra_kv *kv, size_t n, const float *train_q,
                            size_t nq, const ra_index_opts *opts)
{
    hnsw_state *s = calloc(1, sizeof *s);
    if (!s)
        return RA_ENOMEM;
    pthread_rwlock_init(&s->lock, NULL);
    s->dim = ra_kv_dim(kv);
    /* ra_head checked and filled the options from the table (index/opts.c); called
     * directly, 0 is the default and anything else out of range is refused */
    ra_index_opts f = *opts;
    ra_index_opts_fill(&f);
    char oerr[160];
    if (ra_index_opts_check(&f, oerr, sizeof oerr) != RA_OK) {
        RA_ERROR("hnsw: %s", oerr);
        hnsw_destroy(s);
        return RA_EINVAL;
    }
    int m = f.hnsw_m;
    char desc[64];
    snprintf(desc, sizeof desc, "HNSW%d,Flat", m);
    s->m = m;
    ra_status st = RA_OK;
    int rc = faiss_index_factory(&s->idx, s->dim, desc, METRIC_INNER_PRODUCT);
    if (rc) {
        st = ra_index_faiss_error(desc, rc);
        goto fail;
    }
    if ((rc = faiss_ParameterSpace_new(&s->ps))) {
        st = ra_index_faiss_error("ParameterSpace_new", rc);
        goto fail;
    }
    s->ef = 16; /* FAISS's default */
    if ((st = ra_index_faiss_add_rows(s->idx, kv, 0, n, opts)) != RA_OK)
        goto fail;
    *state = s;
    return RA_OK;
fail:
    hnsw_destroy(s);
    return st;
}

static ra_status hnsw_add(void *state, const ra_kv *kv, size_t first, size_t n)
{
    hnsw_state *s = state;
    pthread_rwlock_wrlock(&s->lock); /* FAISS HNSW add is not safe against searches */
    ra_status st = ra_index_faiss_add_rows(s->idx, kv, first, n, NULL);
    pthread_rwlock_unlock(&s->lock);
    return st;
}

typedef struct hnsw_call {
    hnsw_state *s;
    const float *q;
    int k;
    float *dis;
    idx_t *lab;
    int rc;
    size_t ndis;
} hnsw_call;

static void hnsw_call_run(void *arg)
{
    hnsw_call *c = arg;
    size_t before = hnsw_ndis();
    c->rc = faiss_Index_search(c->s->idx, 1, c->q, c->k, c->dis, c->lab);
    c->ndis = hnsw_ndis() - before;
}

static ra_status hnsw_search(void *state, const ra_kv *kv, const float *q,
                             const ra_search_params *p, int32_t *ids, float *scores, int *n_out,
                             ra_search_stats *st)
{
    hnsw_state *s = state;
    int ef = p->effort > 0 ? p->effort : HNSW_DEFAULT_EF;
    idx_t nt = faiss_Index_ntotal(s->idx);
    int k = (idx_t)p->k < nt ? p->k : (int)nt;
    if (k <= 0) {
        *n_out = 0;
        return RA_OK;
    }
    float *dis = malloc((size_t)k * sizeof(float));
    idx_t *lab = malloc((size_t)k * sizeof(idx_t));
    if (!dis || !lab) {
        free(dis);
        free(lab);
        return RA_ENOMEM;
    }
    ra_status ret = RA_OK;
    pthread_rwlock_rdlock(&s->lock);
    if (__atomic_load_n(&s->ef, __ATOMIC_RELAXED) != ef) {
        pthread_rwlock_unlock(&s->lock);
        pthread_rwlock_wrlock(&s->lock);
        int rc = faiss_ParameterSpace_set_index_parameter(s->ps, s->idx, "efSearch", ef);
        if (rc) {
            pthread_rwlock_unlock(&s->lock);
            ret = ra_index_faiss_error("set efSearch", rc);
            goto out;
        }
        __atomic_store_n(&s->ef, ef, __ATOMIC_RELAXED);
    }
    hnsw_call c = {s, q, k, dis, lab, 0, 0};
    ra_index_omp_single(hnsw_call_run, &c);
    pthread_rwlock_unlock(&s->lock);
    if (c.rc) {
        ret = ra_index_faiss_error("HNSW search", c.rc);
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
        st->scanned += c.ndis;
out:
    free(dis);
    free(lab);
    return ret;
}

static size_t hnsw_bytes(void *state)
{
    hnsw_state *s = state;
    size_t n = (size_t)faiss_Index_ntotal(s->idx);
    /* vectors + level-0 links (2M ints) + upper levels (about 1/M of nodes, M links) */
    return sizeof *s + n * ((size_t)s->dim * 4 + 2 * (size_t)s->m * 4 + 4 + 16);
}

const ra_backend_ops ra_backend_hnsw = {
    .name = "hnsw",
    .build = hnsw_build,
    .add = hnsw_add,
    .search = hnsw_search,
    .bytes = hnsw_bytes,
    .destroy = hnsw_destroy,
};
