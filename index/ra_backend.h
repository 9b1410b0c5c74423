/* The table every index backend fills (internal to index/). A backend sees the keys
 * through the ra_kv it is handed at each call; ra_head holds the lock that keeps those
 * rows stable during the call. Row ids are int32 into the ra_kv. Scores are raw inner
 * products q.k. `scanned` counts distinct keys whose inner product was computed. */
#ifndef RA_BACKEND_H
#define RA_BACKEND_H

#include "ra_index.h"
#include "ra_kv.h"

typedef struct ra_backend_ops {
    const char *name;
    /* Build over rows [0, n) of kv from nq fp32 training queries [nq][dim] (may be 0). */
    ra_status (*build)(void **state, const ra_kv *kv, size_t n, const float *train_q, size_t nq,
                       const ra_index_opts *opts);
    /* Rows [first, first + n) were appended to kv: make them searchable. */
    ra_status (*add)(void *state, const ra_kv *kv, size_t first, size_t n);
    /* Top-k by inner product. Must be safe to call concurrently from several threads. */
    ra_status (*search)(void *state, const ra_kv *kv, const float *q, const ra_search_params *p,
                        int32_t *ids, float *scores, int *n_out, ra_search_stats *st);
    size_t (*bytes)(void *state);
    void (*destroy)(void *state);
    /* Optional (NULL: ra_head calls search per query): nq queries that share this head (a
     * GQA group) in one walk; q [nq][dim]; p[j].k may differ (0: nothing for that query);
     * ids/scores [nq][kmax] (scores may be NULL); n_out [nq]; st [nq] or NULL. */
    ra_status (*search_group)(void *state, const ra_kv *kv, size_t nq, const float *q,
                              const ra_search_params *p, int kmax, int32_t *ids, float *scores,
                              int *n_out, ra_search_stats *st);
    /* Optional (NULL: unsupported): build from precomputed exact top-K lists of the
     * training queries, lists [nq][K] of row ids in [0, n) (-1 pads), instead of the
     * backend's own kNN (e.g. lists computed on the GPU during prefill). */
    ra_status (*build_lists)(void **state, const ra_kv *kv, size_t n, const float *train_q,
                             size_t nq, const int32_t *lists, int K, const ra_index_opts *opts);
    /* Optional (NULL: unsupported): the index from a graph built elsewhere over rows
     * [0, n) of kv (ra_head_install_graph; a->n == n, checked with ra_graph_adj_check);
     * lists (may be NULL) as in build_lists, used for the routing queries. */
    ra_status (*install)(void **state, const ra_kv *kv, size_t n, const ra_graph_adj *a,
                         const float *train_q, size_t nq, const int32_t *lists, int K,
                         const ra_index_opts *opts);
    /* Optional (NULL: unsupported): the index as a graph in the wire form (malloc()ed
     * arrays, ra_graph_adj_fini). */
    ra_status (*export_graph)(void *state, ra_graph_adj *out);
    /* Optional (NULL: the default effort is fixed): the factor of the default search
     * effort (the candidate list of a search with effort 0); mult > 0 sets it, and the
     * factor in use is returned. Safe while searches run (they read it once). */
    float (*effort_mult)(void *state, float mult);
    /* Optional (NULL: the index cannot be cut, ra_head_attend_part answers in part 0):
     * search_group over share `part` of `nparts` of the keys (disjoint shares covering
     * all keys); each query's best kmax... as search_group, best first, exact scores. */
    ra_status (*search_part)(void *state, const ra_kv *kv, int part, int nparts, size_t nq,
                             const float *q, const ra_search_params *p, int kmax, int32_t *ids,
                             float *scores, int *n_out);
} ra_backend_ops;

/* 1 when the build that got these options was asked to end (ra_index_opts.cancel):
 * builds check it between phases and chunks and then return RA_ECLOSED. */
static inline int ra_index_cancelled(const ra_index_opts *o)
{
    return o && o->cancel && __atomic_load_n(o->cancel, __ATOMIC_RELAXED);
}

extern const ra_backend_ops ra_backend_scan;  /* index/flat.c (SIMD scan of the ra_kv) */
extern const ra_backend_ops ra_backend_flat;  /* index/flat.c (FAISS IndexFlatIP) */
extern const ra_backend_ops ra_backend_ivf;   /* index/faiss_ivf.c */
extern const ra_backend_ops ra_backend_hnsw;  /* index/faiss_hnsw.c */
extern const ra_backend_ops ra_backend_graph; /* index/graph.c */
extern const ra_backend_ops ra_backend_pscan; /* index/pscan.c */

/* Exact top-k by plain SIMD scan over rows [0, n) (no FAISS): the reference and the
 * fallback while a build runs. */
ra_status ra_exact_topk(const ra_kv *kv, size_t n, const float *q, int k, int32_t *ids,
                        float *scores, int *n_out);

/* ra_exact_topk for nq queries at once (q [nq][dim]; ids, scores [nq][k]; n_out [nq]),
 * reading the keys from memory once: the exact path for a GQA group. */
ra_status ra_exact_topk_multi(const ra_kv *kv, size_t n, size_t nq, const float *q, int k,
                              int32_t *ids, float *scores, int *n_out);

/* Exact top-K keys of each of nq queries through FAISS (BLAS): ids [nq][K], scores
 * [nq][K]; rows with fewer than K keys are padded with -1. Multi-threaded. */
ra_status ra_exact_knn_batch(const ra_kv *kv, size_t n, const float *q, size_t nq, int K,
                             int32_t *ids, float *scores);

#endif
