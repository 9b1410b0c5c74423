/* Graphs in the wire form (ra_index.h, ra_graph_adj): the install of a graph built
 * outside the daemon once it passed ra_graph_adj_check (adjacency.c) -- its edges plus
 * what the search needs besides them: search codes, norms, routing queries, in the
 * layout of graph_internal.h -- and the export of a built graph in the same form. An
 * installed graph is an ordinary ra_graph from then on: searched by graph_search.c,
 * grown by ra_graph_add, charged by ra_graph_bytes. */
#include <stdlib.h>
#include <string.h>

#include "graph_internal.h"
#include "ra_kernels.h"
#include "ra_log.h"

ra_status ra_graph_export(const ra_graph *g, ra_graph_adj *out)
{
    if (!g || !out)
        return RA_EINVAL;
    size_t n = g->n, M = (size_t)g->M;
    int32_t *adj = malloc((n ? n : 1) * M * sizeof *adj);
    int32_t *ent = malloc((size_t)(g->n_entries ? g->n_entries : 1) * sizeof *ent);
    if (!adj || !ent) {
        free(adj);
        free(ent);
        return RA_ENOMEM;
    }
    for (size_t u = 0; u < n; u++) {
        int d = g->deg[u];
        memcpy(adj + u * M, g_adj(g, u), (size_t)d * sizeof *adj);
        for (size_t j = (size_t)d; j < M; j++)
            adj[u * M + j] = -1;
    }
    memcpy(ent, g->entries, (size_t)g->n_entries * sizeof *ent);
    *out = (ra_graph_adj){
        .n = n, .M = g->M, .adj = adj, .n_entries = g->n_entries, .entries = ent};
    return RA_OK;
}

/* The routing of an installed graph, as the build makes it (g_set_routing over the same
 * sample of training queries), with the best keys of each routing query from the given
 * lists or, without lists, from an exact scan of those few queries (nr x n dots). */
static ra_status install_routing(ra_graph *g, const ra_kv *kv, size_t n, const float *train_q,
                                 size_t nq, const int32_t *lists, int lists_k, int ntrain)
{
    ra_status st = RA_ENOMEM;
    int dim = g->dim;
    size_t want = (size_t)ntrain < nq ? (size_t)ntrain : nq;
    int Kk = n < G_ROUTE_KEYS ? (int)n : G_ROUTE_KEYS;
    if (lists && lists_k < Kk)
        Kk = lists_k;
    size_t *sidx = malloc(want * sizeof *sidx);
    float *sq = malloc(want * (size_t)dim * sizeof *sq);
    int32_t *knn = malloc(want * (size_t)Kk * sizeof *knn);
    float *rq = NULL, *rs = NULL;
    int32_t *ri = NULL;
    if (!sidx || !sq || !knn)
        goto done;
    size_t ns = g_sample_queries(nq, want, g->seed, sidx);
    for (size_t i = 0; i < ns; i++)
        memcpy(sq + i * dim, train_q + sidx[i] * dim, (size_t)dim * sizeof *sq);
    for (size_t i = 0; i < ns * (size_t)Kk; i++)
        knn[i] = -1;
    int nr = ns < G_ROUTE_MAX ? (int)ns : G_ROUTE_MAX;
    if (lists) {
        for (size_t i = 0; i < ns; i++)
            for (int j = 0; j < Kk; j++) {
                int32_t id = lists[sidx[i] * (size_t)lists_k + j];
                knn[i * Kk + j] = id >= 0 && (size_t)id < n ? id : -1;
            }
    } else {
        rq = malloc((size_t)nr * dim * sizeof *rq);
        ri = malloc((size_t)nr * Kk * sizeof *ri);
        rs = malloc((size_t)nr * Kk * sizeof *rs);
        if (!rq || !ri || !rs)
            goto done;
        for (int r = 0; r < nr; r++)
            memcpy(rq + (size_t)r * dim, sq + g_route_pick(r, nr, ns) * dim,
                   (size_t)dim * sizeof *rq);
        if ((st = ra_exact_knn_batch(kv, n, rq, (size_t)nr, Kk, ri, rs)))
            goto done;
        for (int r = 0; r < nr; r++)
            memcpy(knn + g_route_pick(r, nr, ns) * Kk, ri + (size_t)r * Kk,
                   (size_t)Kk * sizeof *knn);
    }
    st = g_set_routing(g, sq, ns, knn, Kk);
done:
    free(sidx);
    free(sq);
    free(knn);
    free(rq);
    free(ri);
    free(rs);
    return st;
}

/* The default effort's per-head factor for a graph built elsewhere, as a build sets it
 * (ra_graph_calibrate), from the last G_CALIB_HOLD training queries and their exact lists
 * (the caller's, else computed here). The builder saw those queries, so they are easier
 * than held-out ones: the factor only rises where even they miss the target. */
#define G_CALIB_HOLD 128
static ra_status install_calibration(ra_graph *g, const ra_kv *kv, size_t n, const float *train_q,
                                     size_t nq, const int32_t *lists, int lists_k)
{
    size_t nh = nq >= 16 * G_CALIB_HOLD ? G_CALIB_HOLD : 0;
    int K = lists ? (lists_k < 100 ? lists_k : 100) : 100;
    if ((size_t)K > n)
        K = (int)n;
    if (!nh || K < 10)
        return RA_OK; /* too few queries to tell: the factor stays 1 */
    const float *hq = train_q + (nq - nh) * (size_t)g->dim;
    int32_t *gt = malloc(nh * (size_t)K * sizeof *gt);
    float *gs = lists ? NULL : malloc(nh * (size_t)K * sizeof *gs);
    ra_status st = RA_ENOMEM;
    if (!gt || (!lists && !gs))
        goto done;
    if (lists) {
        for (size_t i = 0; i < nh; i++)
            for (int j = 0; j < K; j++) {
                int32_t id = lists[(nq - nh + i) * (size_t)lists_k + (size_t)j];
                gt[i * (size_t)K + (size_t)j] = id >= 0 && (size_t)id < n ? id : -1;
            }
    } else if ((st = ra_exact_knn_batch(kv, n, hq, nh, K, gt, gs))) {
        goto done;
    }
    ra_graph_calibrate(g, kv, hq, nh, gt, K);
    st = RA_OK;
done:
    free(gt);
    free(gs);
    return st;
}

ra_status ra_graph_install(ra_graph **out, const ra_kv *kv, size_t n, const ra_graph_adj *a,
                           const float *train_q, size_t nq, const int32_t *lists, int lists_k,
                           const ra_index_opts *opts)
{
    if (!out || !kv || !a || (nq && !train_q) || (lists && lists_k < 1))
        return RA_EINVAL;
    if (a->n != n || n > ra_kv_count(kv)) {
        RA_ERROR("graph: a prebuilt graph of %zu rows for %zu keys", a->n, n);
        return RA_EINVAL;
    }
    char err[192];
    ra_status st = ra_graph_adj_check(a, NULL, err, sizeof err);
    if (st) {
        RA_ERROR("graph: prebuilt graph refused: %s", err);
        return st;
    }
    int K, M, ef, ent, ntrain, threads;
    uint64_t seed;
    if ((st = g_inputs(opts, kv, train_q, nq, &K, &M, &ef, &ent, &ntrain, &threads, &seed)))
        return st;
    int dim = ra_kv_dim(kv);
    ra_dtype dt = ra_kv_dtype(kv);
    double w0, c0, w1, c1;
    g_clock(&w0, &c0);
    ra_graph *g = g_alloc(dim, dt, a->M, ef, threads, seed); /* the graph's own degree */
    if (!g)
        return RA_ENOMEM;
    g->cancel = opts ? opts->cancel : NULL;
    const void *keys = ra_kv_keys(kv);
    if ((st = g_reserve(g, n)))
        goto fail;
    g->n = n;
    if ((st = g_fit_codes(g, keys, n)))
        goto fail;
    for (size_t u = 0; u < n; u++) { /* ids checked: in range, distinct, no self edge */
        const int32_t *src = a->adj + u * (size_t)a->M;
        int32_t *row = g_adj(g, u);
        int d = 0;
        for (int j = 0; j < a->M; j++)
            if (src[j] >= 0)
                row[d++] = src[j];
        g->deg[u] = (uint8_t)d;
        g->pdeg[u] = 0;
    }
    g->entries = malloc((size_t)a->n_entries * sizeof *g->entries);
    if (!g->entries) {
        st = RA_ENOMEM;
        goto fail;
    }
    memcpy(g->entries, a->entries, (size_t)a->n_entries * sizeof *g->entries);
    g->n_entries = a->n_entries;
    if (nq && n > 1 &&
        (st = install_routing(g, kv, n, train_q, nq, lists, lists_k, ntrain)))
        goto fail;
    if (nq && n > 1 && (st = install_calibration(g, kv, n, train_q, nq, lists, lists_k)))
        goto fail;
    if (g_cancelled(g)) {
        st = RA_ECLOSED;
        goto fail;
    }
    g->cancel = NULL;
    g_clock(&w1, &c1);
    RA_DEBUG("graph: installed a prebuilt graph of %zu keys (M %d, %d entries, %d routing "
             "queries, search effort x%.2f) in %.2fs (cpu %.2fs)",
             n, g->M, g->n_entries, g->n_route, (double)g->l_mult, w1 - w0, c1 - c0);
    *out = g;
    return RA_OK;
fail:
    ra_graph_destroy(g);
    return st;
}
