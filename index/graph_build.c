/* Building and growing the graph (graph_internal.h has the design): the query
 * projection, occlusion pruning, batched key->key insertion on the stored keys (or the
 * key->key lists by code, graph_kk.c), reverse edges, connectivity, entry points, routing
 * queries and the search codes. */
#include <math.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "graph_internal.h"
#include "graph_sort.h"
#include "ra_bigmem.h"
#include "ra_env.h"
#include "ra_kernels.h"
#include "ra_log.h"

/* Key->key metric for linking: inner product (default) or L2. With IP a key's
 * neighbours are the keys most extreme along its own direction, which is where a
 * query that scores this key high finds its other top keys; L2 neighbours of an
 * extreme key are interior ones. */
static int g_use_l2(void)
{
    return G_LINK_L2;
}

/* ------------------------------------------------------------------------ */
/* best-first search */

static inline void g_prefetch_code(const ra_graph *g, int32_t v)
{
    const uint8_t *c = g_code(g, (size_t)v);
    for (int o = 0; o < g->cb.cbytes; o += 64)
        __builtin_prefetch(c + o);
}

/* Scores a batch of ids against q: IP, minus |k|^2/2 in L2 mode; on the search codes
 * when the thread's scratch holds q prepared for them (t->use_codes), else exactly. On the
 * codes it also prefetches the codes of the list likely scored next (nx[0..n_nx)),
 * spread over the scoring in chunks of 4 (as graph_search.c's offer: issued at once, tens
 * of prefetches fill the miss buffers and stall the loop that issues them). Prefetches
 * only: the scores and the walk are the same with or without them. */
static void g_score(const ra_graph *g, const void *keys, const float *q, int l2, const int32_t *ids,
                    int n, float *out, g_tls *t, const int32_t *nx, int n_nx)
{
    if (t->use_codes) {
        int32_t *dots = (int32_t *)(void *)out; /* same size: converted in place */
        for (int i = 0; i < n; i++) /* in cache already when the last step guessed right */
            g_prefetch_code(g, ids[i]);
        enum { CH = 4 };
        int per = n ? (n_nx * CH + n - 1) / n : n_nx, done = 0;
        for (int i = 0; i < n; i += CH) {
            int m = n - i < CH ? n - i : CH;
            ra_codebook_dots(&g->cb, t->q8, t->q16, 1, g->rec, g->rec_bytes, ids + i, (size_t)m,
                             dots + i);
            for (int e = done + per; done < e && done < n_nx; done++)
                g_prefetch_code(g, nx[done]);
        }
        for (; done < n_nx; done++)
            g_prefetch_code(g, nx[done]);
        for (int i = 0; i < n; i++)
            out[i] = t->cmul * (float)dots[i] + t->cadd - (l2 ? 0.5f * g->norm2[ids[i]] : 0.f);
        return;
    }
    for (int i = 0; i < n; i++) {
        const char *r = g_row(g, keys, ids[i]);
        for (size_t off = 0; off < g->row_bytes; off += 64)
            __builtin_prefetch(r + off);
    }
    ra_kern_dot_gather(q, keys, g->dtype, g->dim, ids, (size_t)n, out);
    if (l2)
        for (int i = 0; i < n; i++)
            out[i] -= 0.5f * g->norm2[ids[i]];
}

static inline int g_bit_test_set(uint64_t *b, int32_t i)
{
    uint64_t m = 1ull << (i & 63), *w = &b[i >> 6];
    int was = (*w & m) != 0;
    *w |= m;
    return was;
}

/* Beam search over nodes [0, g->n) from the entry points, the warm ids and the given
 * seeds. Leaves the best L candidates in t->pool, sorted; returns their count. It stops
 * when the best Lx (<= L) of the pool are expanded (g_link_expand). Every node is
 * expanded at most once and the pool is bounded, so it always ends. */
static int g_search(const ra_graph *g, const void *keys, const float *q, int l2, int L, int Lx,
                    const int32_t *warm, int n_warm, const int32_t *route, int n_route,
                    int32_t skip, g_tls *t, uint64_t *scanned, uint64_t *hops)
{
    uint64_t *vis = t->vis;
    memset(vis, 0, (g->n + 63) / 64 * sizeof *vis);
    g_cand *pool = t->pool;
    int np = 0;
    uint64_t nscan = 0, nhop = 0;
    int nb = 0;
    /* seeds: entries then warm ids (validated: callers may pass anything) */
    for (int pass = 0; pass < 3; pass++) {
        const int32_t *src = pass == 0 ? g->entries : pass == 1 ? warm : route;
        int ns = pass == 0 ? g->n_entries : pass == 1 ? n_warm : n_route;
        if (!src)
            continue;
        for (int i = 0; i < ns; i++) {
            int32_t id = src[i];
            if (id < 0 || (size_t)id >= g->n || g_bit_test_set(vis, id))
                continue;
            t->buf[nb++] = id;
            if (nb == t->buf_cap) {
                g_score(g, keys, q, l2, t->buf, nb, t->sc, t, NULL, 0);
                nscan += (uint64_t)nb;
                for (int j = 0; j < nb; j++)
                    if (t->buf[j] != skip)
                        g_pool_insert(pool, &np, L, t->sc[j], t->buf[j]);
                nb = 0;
            }
        }
    }
    if (nb == 0 && np == 0 && g->n > 0) { /* nothing valid: start at node 0 */
        g_bit_test_set(vis, 0);
        t->buf[nb++] = 0;
    }
    if (nb) {
        g_score(g, keys, q, l2, t->buf, nb, t->sc, t, NULL, 0);
        nscan += (uint64_t)nb;
        for (int j = 0; j < nb; j++)
            if (t->buf[j] != skip)
                g_pool_insert(pool, &np, L, t->sc[j], t->buf[j]);
    }
    if (skip >= 0 && (size_t)skip < g->n)
        g_bit_test_set(vis, skip); /* never score or return the node being linked */
    int k = 0;
    while (k < np && k < Lx) {
        if (pool[k].done) {
            k++;
            continue;
        }
        pool[k].done = 1;
        nhop++;
        int32_t u = pool[k].id;
        const int32_t *nbr = g_adj(g, u);
        int d = g->deg[u];
        /* the two candidates likely expanded next (the pool may change before): the
         * second one's adjacency is prefetched (all its lines; its first load was 16 % of
         * a walk with one line prefetched), the first one's was one step ago and its
         * unvisited neighbours' codes are prefetched while this node's are scored (the
         * codes' misses were most of a walk) */
        int32_t nx1 = -1;
        for (int j = k + 1, f = 0; j < np && f < 2; j++)
            if (!pool[j].done) {
                if (f++ == 0) {
                    nx1 = pool[j].id;
                    continue;
                }
                const char *a = (const char *)g_adj(g, (size_t)pool[j].id);
                for (size_t o = 0; o < (size_t)g->M * sizeof(int32_t); o += 64)
                    __builtin_prefetch(a + o);
            }
        nb = 0;
        for (int j = 0; j < d; j++) {
            int32_t v = nbr[j];
            if (!g_bit_test_set(vis, v))
                t->buf[nb++] = v;
        }

        if (!nb) {
            k++;
            continue;
        }
        int32_t nxb[G_MAX_DEGREE];
        int n_nx = 0;
        if (nx1 >= 0 && t->use_codes) {
            const int32_t *a = g_adj(g, (size_t)nx1);
            for (int j = 0; j < g->deg[nx1]; j++)
                if (!(vis[a[j] >> 6] & 1ull << (a[j] & 63)))
                    nxb[n_nx++] = a[j];
        }
        g_score(g, keys, q, l2, t->buf, nb, t->sc, t, nxb, n_nx);
        nscan += (uint64_t)nb;
        int best = np;
        for (int j = 0; j < nb; j++) {
            int pos = g_pool_insert(pool, &np, L, t->sc[j], t->buf[j]);
            if (pos < best)
                best = pos;
        }
        k = best <= k ? best : k + 1;
    }
    if (scanned)
        *scanned += nscan;
    if (hops)
        *hops += nhop;
    return np;
}

/* ------------------------------------------------------------------------ */
/* occlusion pruning */

/* A candidate of node u as one sortable key: its distance to u (d2 below) in the high
 * half, its id in the low half, so that ascending keys are ascending (d2, id). */
static inline uint64_t g_nb_key(float d2, int32_t id)
{
    return (uint64_t)g_f32_key(d2) << 32 | (uint32_t)id;
}

static inline int32_t g_nb_id(uint64_t k)
{
    return (int32_t)(uint32_t)k;
}

static inline float g_nb_d2(uint64_t k)
{
    return g_f32_unkey((uint32_t)(k >> 32));
}

/* From candidates c[0..nc) (g_nb_key; d2 = distance to u: -u.c for inner product, the
 * default, or |u - c|^2; sorted ascending, no duplicates, u excluded) keeps at most M
 * that no kept r occludes: c is dropped when r is closer to c than u is (IP: r.c > u.c;
 * L2: alpha^2 |r - c|^2 < |u - c|^2). Strict comparisons keep exact duplicates, so
 * all-equal keys still get edges. A second pass refills up to M/2 slots with the
 * nearest dropped candidates, which keeps degrees up on heavy-tailed data. Writes ids
 * to out; returns the count. A candidate's dots with the kept ones are computed 8 at a
 * time, stopping at the first occluder (the nearest kept ones occlude most): the same
 * dots as one gather over all of them (groups of 4 stay aligned), fewer of them. The kept
 * rows are read as fp32 copies made once each (t->kf: 24 KB at degree 48 and dim 128),
 * not converted again for every candidate that is checked against them. */
static int g_prune(const ra_graph *g, const void *keys, const uint64_t *c, int nc, int M,
                   int32_t *out, g_tls *t)
{
    int kept = 0;
    uint8_t dropped[1024] = {0};
    int lim = nc < 1024 ? nc : 1024;
    int l2 = g_use_l2();
    size_t dim = (size_t)g->dim;
    for (int i = 0; i < lim && kept < M; i++) {
        int32_t cid = g_nb_id(c[i]);
        float cd2 = g_nb_d2(c[i]);
        dropped[i] = 0;
        if (i + 4 < lim) /* the row converted 4 candidates on (cold again after the gather) */
            ra_kern_prefetch_row(g_row(g, keys, g_nb_id(c[i + 4])), g->row_bytes);
        float *cf = t->kf + (size_t)kept * dim; /* its fp32 copy stays there if kept */
        ra_kern_to_f32(g_row(g, keys, cid), g->dtype, dim, cf);
        if (kept) {
            float nc2 = g->norm2[cid];
            for (int b = 0; b < kept && !dropped[i]; b += 8) {
                int e = b + 8 < kept ? b + 8 : kept;
                ra_kern_dot_range(cf, t->kf, RA_DTYPE_F32, g->dim, (size_t)b, (size_t)(e - b),
                                  t->sc);
                for (int j = b; j < e; j++) {
                    float dot = t->sc[j - b];
                    float drc = l2 ? g->norm2[out[j]] + nc2 - 2.0f * dot : -dot;
                    if (l2 ? G_ALPHA2 * drc < cd2 : drc < cd2) {
                        dropped[i] = 1;
                        break;
                    }
                }
            }
        }
        if (!dropped[i])
            out[kept++] = cid;
    }
    /* half the slots at most are refilled: long edges are what pruning is for */
    for (int i = 0; i < lim && kept < M / 2; i++)
        if (dropped[i])
            out[kept++] = g_nb_id(c[i]);
    return kept;
}

/* Candidates ids[0..n) of node u (-1, u itself and repeated ids are skipped): computes
 * d2, sorts, prunes into out. tmp holds n keys; t's stamps cover the graph's nodes.
 * Repeats are dropped by id before any distance: the SIMD gather computes a row in a
 * group of 4 and a row in the tail in different orders, so one id at two places of the
 * list can get two distances, and a dedup by (d2, id) after sorting kept both (graphs
 * with an id twice in a row: a wasted slot, and refused by ra_graph_adj_check). */
static int g_link_list(const ra_graph *g, const void *keys, int32_t u, const int32_t *ids, int n,
                       int M, uint64_t *tmp, int32_t *out, g_tls *t)
{
    ra_kern_to_f32(g_row(g, keys, u), g->dtype, (size_t)g->dim, t->qf);
    uint32_t gen = g_tls_next_gen(t);
    t->stamp[u] = gen;
    int m = 0;
    for (int i = 0; i < n; i++) {
        int32_t v = ids[i];
        if (v < 0 || t->stamp[v] == gen)
            continue;
        t->stamp[v] = gen;
        tmp[m++] = (uint32_t)v;
    }
    /* dots in chunks through the tls gather buffer */
    for (int b = 0; b < m; b += t->buf_cap) {
        int e = b + t->buf_cap < m ? b + t->buf_cap : m;
        for (int i = b; i < e; i++)
            t->buf[i - b] = g_nb_id(tmp[i]);
        ra_kern_dot_gather(t->qf, keys, g->dtype, g->dim, t->buf, (size_t)(e - b), t->sc);
        for (int i = b; i < e; i++) {
            int32_t v = t->buf[i - b];
            float d2 = g->norm2[u] + g->norm2[v] - 2.0f * t->sc[i - b];
            tmp[i] = g_nb_key(g_use_l2() ? (d2 > 0.0f ? d2 : 0.0f) : -t->sc[i - b], v);
        }
    }
    g_sort_u64(tmp, (size_t)m, NULL);
    return g_prune(g, keys, tmp, m, M, out, t);
}

/* ------------------------------------------------------------------------ */
/* storage */

ra_status g_reserve(ra_graph *g, size_t n)
{
    if (n <= g->cap)
        return RA_OK;
    size_t c = g->cap ? g->cap : 1024;
    while (c < n)
        c *= 2;
    if (c > (size_t)INT32_MAX)
        c = (size_t)INT32_MAX;
    if (c < n)
        return RA_ETOOBIG;
    /* records in their own mapping: page-aligned, huge pages, grown by mremap (no copy
     * of a few hundred MB while an Append waits) */
    uint8_t *a = ra_big_resize(g->rec, g->cap * g->rec_bytes, c * g->rec_bytes);
    if (!a)
        return RA_ENOMEM;
    g->rec = a;
    uint8_t *d = realloc(g->deg, c);
    if (!d)
        return RA_ENOMEM;
    g->deg = d;
    uint8_t *pd = realloc(g->pdeg, c);
    if (!pd)
        return RA_ENOMEM;
    g->pdeg = pd;
    float *nr = realloc(g->norm2, c * sizeof *nr);
    if (!nr)
        return RA_ENOMEM;
    g->norm2 = nr;
    for (size_t i = g->cap; i < c; i++)
        g->deg[i] = g->pdeg[i] = 0;
    g->cap = c;
    return RA_OK;
}

typedef struct g_norm_ctx {
    ra_graph *g;
    const void *keys;
} g_norm_ctx;

/* |k|^2 and the search code of rows [b, e) */
static void g_norm_task(void *arg, size_t b, size_t e)
{
    g_norm_ctx *c = arg;
    ra_graph *g = c->g;
    float *f = malloc((size_t)g->dim * sizeof *f);
    for (size_t i = b; i < e; i++) {
        const void *r = g_row(g, c->keys, (int32_t)i);
        if (f) {
            ra_codebook_encode(&g->cb, r, g->dtype, (uint8_t *)g_code(g, i), f);
            g->norm2[i] = ra_kern_dot(f, r, g->dtype, g->dim);
        } else {
            g->norm2[i] = 0.0f;
            memset((uint8_t *)g_code(g, i), 0, (size_t)g->cb.cbytes);
        }
    }
    free(f);
}

/* ------------------------------------------------------------------------ */
/* edge updates grouped by target node: (target, source) pairs */

typedef uint64_t g_edge; /* target in the high half, source in the low: sorts by both */

static inline g_edge g_edge_of(int32_t to, int32_t from)
{
    return (uint64_t)(uint32_t)to << 32 | (uint32_t)from;
}

static inline int32_t g_edge_to(g_edge e)
{
    return (int32_t)(uint32_t)(e >> 32);
}

static inline int32_t g_edge_from(g_edge e)
{
    return (int32_t)(uint32_t)e;
}

typedef struct g_rev_ctx {
    ra_graph *g;
    const void *keys;
    const g_edge *e;
    const size_t *grp; /* group starts, ngrp + 1 */
    atomic_int fail;
} g_rev_ctx;

static void g_rev_task(void *arg, size_t b, size_t end)
{
    g_rev_ctx *c = arg;
    ra_graph *g = c->g;
    int M = g->M;
    int32_t *ids = malloc((size_t)(M + 4096) * sizeof *ids);
    uint64_t *tmp = malloc((size_t)(M + 4096) * sizeof *tmp);
    int32_t out[G_MAX_DEGREE];
    g_tls *t = g_tls_get(g->n, 1, M + 4096, g->dim);
    if (!ids || !tmp || !t) {
        atomic_store(&c->fail, 1);
        goto done;
    }
    for (size_t gi = b; gi < end; gi++) {
        size_t s = c->grp[gi], e = c->grp[gi + 1];
        int32_t v = g_edge_to(c->e[s]);
        int32_t *row = g_adj(g, v);
        int d = g->deg[v];
        int pd = g->pdeg[v];
        int n = 0;
        for (int j = 0; j < d; j++)
            ids[n++] = row[j];
        int added = 0;
        for (size_t i = s; i < e && n < M + 4096; i++) {
            int32_t u = g_edge_from(c->e[i]);
            if (u == v)
                continue;
            int have = 0;
            for (int j = 0; j < d; j++)
                if (row[j] == u) {
                    have = 1;
                    break;
                }
            if (!have) {
                ids[n++] = u;
                added++;
            }
        }
        if (!added)
            continue;
        if (n <= M) { /* room: append, no distances needed */
            for (int j = d; j < n; j++)
                row[j] = ids[j];
            g->deg[v] = (uint8_t)n;
            continue;
        }
        if (g->light_rev) { /* keys appended after the build: see ra_graph.light_rev */
            /* ids[0..M) is the row filled up with the first new ones; the rest (n - M of
             * them) compete with the row's last nt members for those nt slots */
            int extra = n - M, nt = extra < M - pd ? extra : M - pd;
            int32_t *cand = ids + (M - nt);
            ra_kern_to_f32(g_row(g, c->keys, v), g->dtype, (size_t)g->dim, t->qf);
            ra_kern_dot_gather(t->qf, c->keys, g->dtype, g->dim, cand, (size_t)(nt + extra), t->sc);
            for (int i = 0; i < nt + extra; i++)
                tmp[i] = g_nb_key(-t->sc[i], cand[i]);
            g_sort_u64(tmp, (size_t)(nt + extra), NULL);
            for (int i = 0; i < nt; i++)
                cand[i] = g_nb_id(tmp[i]);
            memcpy(row, ids, (size_t)M * sizeof *row);
            g->deg[v] = (uint8_t)M;
            continue;
        }
        /* full: the protected prefix stays, the rest is re-pruned */
        int k = g_link_list(g, c->keys, v, ids + pd, n - pd, M - pd, tmp, out, t);
        memcpy(row + pd, out, (size_t)k * sizeof *out);
        g->deg[v] = (uint8_t)(pd + k);
    }
done:
    free(ids);
    free(tmp);
}

/* Applies edges (sorted in place by target) to the graph, re-pruning full rows. */
static ra_status g_apply_edges(ra_graph *g, const void *keys, g_edge *e, size_t ne)
{
    if (!ne)
        return RA_OK;
    g_edge *tmp = malloc(ne * sizeof *tmp);
    g_psort_u64(g->threads, e, tmp, ne);
    free(tmp);
    size_t ngrp = 0;
    for (size_t i = 0; i < ne; i++)
        if (i == 0 || g_edge_to(e[i]) != g_edge_to(e[i - 1]))
            ngrp++;
    size_t *grp = malloc((ngrp + 1) * sizeof *grp);
    if (!grp)
        return RA_ENOMEM;
    size_t k = 0;
    for (size_t i = 0; i < ne; i++)
        if (i == 0 || g_edge_to(e[i]) != g_edge_to(e[i - 1]))
            grp[k++] = i;
    grp[ngrp] = ne;
    g_rev_ctx c = {.g = g, .keys = keys, .e = e, .grp = grp};
    atomic_init(&c.fail, 0);
    g_parallel(g->threads, ngrp, 64, g_rev_task, &c);
    free(grp);
    return atomic_load(&c.fail) ? RA_ENOMEM : RA_OK;
}

/* ------------------------------------------------------------------------ */
/* batched insertion: searches see a frozen graph, lists land after the batch */

/* A build's linking walk keeps a pool of graph_build_ef (L) candidates and expands its
 * best RA_GRAPH_LINK_EXPAND / 8 of them (a study knob, 1..8; default 8: all) before it
 * stops; the pool's tail, scored but not expanded, still feeds the occlusion pruning. On
 * 131K heads (2026-12-02) 5/8 cut the linking's CPU time by ~27 % on 2 threads (36.9 ->
 * 27.0 CPU s, lin 31.4 -> 24.6) for recall@100 -0.001..-0.005 at efforts 200/250/300,
 * and on the GPU host's 16 cores one head's build (ratd-bench-graph, 16K training
 * queries) 3.42-3.69 -> 2.95-3.10 s, same lease, for recall -0.004 at efforts 200 and
 * 300 (0.968 vs 0.972): not the default. 4/8: -0.005..-0.010; 3/8: -0.007..-0.013. */
static int g_link_expand(int L)
{
    static ra_env_once env;
    int e = ra_env_int(&env, "RA_GRAPH_LINK_EXPAND", 8);
    e = e < 1 ? 1 : e > 8 ? 8 : e;
    int x = L * e / 8;
    return x < 16 ? (L < 16 ? L : 16) : x;
}

typedef struct g_ins_ctx {
    ra_graph *g;
    const void *keys;
    const int32_t *nodes; /* the batch */
    int32_t *lists;       /* [nb][M] new out-lists */
    int *counts;
    int keep_old; /* merge the node's current out-list into its candidates */
    atomic_int fail;
    atomic_ullong scanned, hops; /* of the walks, for the phase log */
} g_ins_ctx;

static void g_ins_task(void *arg, size_t b, size_t e)
{
    g_ins_ctx *c = arg;
    ra_graph *g = c->g;
    /* appended keys (decode-time tokens, a few per step) walk half the build's list: the
     * Append is on the decode path and its walk costs as much as a query's */
    int L = g->light_rev ? (g->ef_build / 2 > 32 ? g->ef_build / 2 : 32) : g->ef_build;
    int M = g->M;
    int ncand = L + M;
    int32_t *ids = malloc((size_t)ncand * sizeof *ids);
    uint64_t *tmp = malloc((size_t)ncand * sizeof *tmp);
    float *q = malloc((size_t)g->dim * sizeof *q);
    g_tls *t = g_tls_get(g->n, L, ncand > M ? ncand : M, g->dim);
    if (!ids || !tmp || !q || !t) {
        atomic_store(&c->fail, 1);
        goto done;
    }
    uint64_t nscan = 0, nhop = 0;
    for (size_t i = b; i < e; i++) {
        int32_t u = c->nodes[i];
        ra_kern_to_f32(g_row(g, c->keys, u), g->dtype, (size_t)g->dim, q);
        /* the walk for a key's neighbours scores on the codes, as query walks do; the
         * candidates it finds are then linked on exact distances (g_link_list). Same
         * recall as exact walks on the calibrated 131K head, linking 19 s vs 24 s here */
        ra_codebook_prep(&g->cb, q, t->q8, t->q16, &t->cmul, &t->cadd);
        t->use_codes = 1;
        int Lx = g->light_rev ? L : g_link_expand(L);
        int np = g_search(g, c->keys, q, g_use_l2(), L, Lx, NULL, 0, NULL, 0, u, t, &nscan, &nhop);
        t->use_codes = 0;
        int n = 0;
        for (int j = 0; j < np; j++)
            if (t->pool[j].id != u)
                ids[n++] = t->pool[j].id;
        int pd = g->pdeg[u];
        if (c->keep_old)
            for (int j = pd; j < g->deg[u]; j++)
                ids[n++] = g_adj(g, u)[j];
        /* the protected prefix is kept; the search results fill the rest */
        int32_t *out = c->lists + i * (size_t)M;
        memcpy(out, g_adj(g, u), (size_t)pd * sizeof *out);
        c->counts[i] = pd + g_link_list(g, c->keys, u, ids, n, M - pd, tmp, out + pd, t);
    }
    atomic_fetch_add(&c->scanned, nscan);
    atomic_fetch_add(&c->hops, nhop);
done:
    free(ids);
    free(tmp);
    free(q);
}

/* A batch's new out-lists into their rows, and their edges (target, source) at each
 * node's offset (a serial loop between two parallel passes before) */
typedef struct g_land_ctx {
    ra_graph *g;
    const int32_t *nodes, *lists;
    const int *counts;
    const size_t *eoff;
    g_edge *e;
} g_land_ctx;

static void g_land_task(void *arg, size_t b, size_t end)
{
    g_land_ctx *c = arg;
    ra_graph *g = c->g;
    for (size_t i = b; i < end; i++) {
        int32_t u = c->nodes[i];
        int32_t *row = g_adj(g, u);
        memcpy(row, c->lists + i * (size_t)g->M, (size_t)c->counts[i] * sizeof *row);
        g->deg[u] = (uint8_t)c->counts[i];
        for (int j = 0; j < c->counts[i]; j++)
            c->e[c->eoff[i] + (size_t)j] = g_edge_of(row[j], u);
    }
}

/* Links nodes[0..n) (already counted in g->n) in batches; cl (NULL: none) gives a cluster
 * per node, the order in which a batch runs its walks (G_LINK_CLUSTERS). */
static ra_status g_insert_nodes(ra_graph *g, const void *keys, const int32_t *nodes, size_t n,
                                int keep_old, const uint16_t *cl)
{
    ra_status st = RA_OK;
    size_t bmax = 8192;
    int32_t *lists = malloc(bmax * (size_t)g->M * sizeof *lists);
    int *counts = malloc(bmax * sizeof *counts);
    size_t *eoff = malloc(bmax * sizeof *eoff);
    g_edge *e = malloc(bmax * (size_t)g->M * sizeof *e);
    uint64_t *ord = cl ? malloc(bmax * sizeof *ord) : NULL; /* a batch in cluster order */
    int32_t *bn = cl ? malloc(bmax * sizeof *bn) : NULL;
    if (!lists || !counts || !eoff || !e || (cl && (!ord || !bn))) {
        st = RA_ENOMEM;
        goto fail;
    }
    size_t linked = 0; /* nodes with edges: what a batch's searches can see */
    for (size_t i = 0; i < g->n; i++)
        linked += g->deg[i] > 0;
    size_t done = 0;
    double tw[2] = {0, 0}, tc[2] = {0, 0};
    uint64_t scanned = 0, hops = 0;
    int batches = 0;
    while (done < n) {
        if (g_cancelled(g)) {
            st = RA_ECLOSED;
            goto fail;
        }
        /* batches grow with the linked graph so early searches are not blind, and
         * double from 64 within one call so that keys inserted together (a burst
         * of appends, often about one topic) see each other: one batch of 8192 new
         * keys on 131K old ones left them linked only to old keys (recall 0.13) */
        size_t bs = (linked + done) / 16;
        if (bs > (done > 64 ? done : 64))
            bs = done > 64 ? done : 64;
        if (bs < 64)
            bs = 64;
        if (bs > bmax)
            bs = bmax;
        if (bs > n - done)
            bs = n - done;
        const int32_t *bnodes = nodes + done;
        if (cl) { /* the batch in cluster order: same items, nearer walks run together */
            for (size_t i = 0; i < bs; i++)
                ord[i] = (uint64_t)cl[nodes[done + i]] << 32 | (uint32_t)nodes[done + i];
            g_sort_u64(ord, bs, NULL);
            for (size_t i = 0; i < bs; i++)
                bn[i] = (int32_t)(uint32_t)ord[i];
            bnodes = bn;
        }
        g_ins_ctx c = {.g = g,
                       .keys = keys,
                       .nodes = bnodes,
                       .lists = lists,
                       .counts = counts,
                       .keep_old = keep_old};
        atomic_init(&c.fail, 0);
        atomic_init(&c.scanned, 0);
        atomic_init(&c.hops, 0);
        double w0, c0, w1, c1, w2, c2;
        g_clock(&w0, &c0);
        g_parallel(g->threads, bs, 16, g_ins_task, &c);
        if (atomic_load(&c.fail)) {
            st = RA_ENOMEM;
            goto fail;
        }
        g_clock(&w1, &c1);
        tw[0] += w1 - w0, tc[0] += c1 - c0;
        scanned += atomic_load(&c.scanned);
        hops += atomic_load(&c.hops);
        size_t ne = 0;
        for (size_t i = 0; i < bs; i++) { /* where each node's edges go */
            eoff[i] = ne;
            ne += (size_t)counts[i];
        }
        g_land_ctx lc = {
            .g = g, .nodes = bnodes, .lists = lists, .counts = counts, .eoff = eoff, .e = e};
        g_parallel(g->threads, bs, 256, g_land_task, &lc);
        st = g_apply_edges(g, keys, e, ne);
        if (st)
            goto fail;
        g_clock(&w2, &c2);
        tw[1] += w2 - w1, tc[1] += c2 - c1;
        done += bs;
        batches++;
    }
    if (n >= 1024) /* the build's linking and connectivity passes, not a few appended keys */
        RA_DEBUG("graph: linked %zu keys in %d batches: walks+pruning %.2f/%.2f s (%.0f keys "
                 "scored, %.1f expanded per walk), reverse edges %.2f/%.2f s (wall/cpu)",
                 n, batches, tw[0], tc[0], (double)scanned / (double)n, (double)hops / (double)n,
                 tw[1], tc[1]);
fail:
    free(ord);
    free(bn);
    free(lists);
    free(counts);
    free(eoff);
    free(e);
    return st;
}

/* ------------------------------------------------------------------------ */
/* connectivity: BFS from the entries; unreached nodes are inserted again (their
 * reverse edges come from reached nodes), and a node still unreached after that gets
 * a forced edge from the best reached node the search found. Bounded rounds. */

/* One BFS level on the build's threads: a chunk of the level claims its nodes' unseen
 * neighbours (the first to flip a seen byte wins) and appends them to next; the level's
 * claims are then sorted by id, so the reached set is a serial BFS's and the order (only
 * the forced edges below use it) depends on the data alone. The BFS was serial: ~0.04 s
 * per pass over a 131K head, two passes a build. */
#define G_BFS_CHUNK 256
typedef struct g_bfs_ctx {
    const ra_graph *g;
    uint8_t *seen;
    const int32_t *lvl;
    uint64_t *next; /* room for every node: each is claimed once */
    atomic_size_t at;
    atomic_int fail;
} g_bfs_ctx;

static void g_bfs_task(void *arg, size_t b, size_t e)
{
    g_bfs_ctx *c = arg;
    const ra_graph *g = c->g;
    uint64_t *loc = malloc((e - b) * (size_t)g->M * sizeof *loc);
    if (!loc) {
        atomic_store(&c->fail, 1);
        return;
    }
    size_t m = 0;
    for (size_t i = b; i < e; i++) {
        int32_t u = c->lvl[i];
        const int32_t *row = g_adj(g, u);
        for (int j = 0; j < g->deg[u]; j++) {
            int32_t v = row[j];
            if (!__atomic_load_n(&c->seen[v], __ATOMIC_RELAXED) &&
                !__atomic_exchange_n(&c->seen[v], 1, __ATOMIC_RELAXED))
                loc[m++] = (uint32_t)v;
        }
    }
    size_t at = atomic_fetch_add(&c->at, m);
    memcpy(c->next + at, loc, m * sizeof *loc);
    free(loc);
}

static ra_status g_connect(ra_graph *g, const void *keys)
{
    ra_status st = RA_OK;
    size_t n = g->n;
    uint8_t *seen = NULL;
    int32_t *queue = NULL, *miss = NULL;
    uint64_t *lv = NULL; /* a level's claims, and sort scratch */
    if (n == 0)
        return RA_OK;
    seen = malloc(n);
    queue = malloc(n * sizeof *queue);
    miss = malloc(n * sizeof *miss);
    lv = malloc(2 * n * sizeof *lv);
    if (!seen || !queue || !miss || !lv) {
        st = RA_ENOMEM;
        goto fail;
    }
    for (int round = 0; round < 8 && !g_cancelled(g); round++) {
        memset(seen, 0, n);
        size_t qh = 0, qt = 0;
        for (int i = 0; i < g->n_entries; i++) {
            int32_t s = g->entries[i];
            if (!seen[s]) {
                seen[s] = 1;
                queue[qt++] = s;
            }
        }
        while (qh < qt) { /* one level [qh, qt) per pass */
            g_bfs_ctx bc = {.g = g, .seen = seen, .lvl = queue + qh, .next = lv};
            atomic_init(&bc.at, 0);
            atomic_init(&bc.fail, 0);
            g_parallel(g->threads, qt - qh, G_BFS_CHUNK, g_bfs_task, &bc);
            if (atomic_load(&bc.fail)) {
                st = RA_ENOMEM;
                goto fail;
            }
            size_t m = atomic_load(&bc.at);
            g_psort_u64(g->threads, lv, lv + n, m);
            qh = qt;
            for (size_t i = 0; i < m; i++)
                queue[qt++] = (int32_t)lv[i];
        }
        size_t nm = 0;
        for (size_t i = 0; i < n; i++)
            if (!seen[i])
                miss[nm++] = (int32_t)i;
        if (!nm)
            break;
        RA_DEBUG("graph: connectivity round %d: %zu of %zu unreached", round, nm, n);
        if (round < 4) {
            st = g_insert_nodes(g, keys, miss, nm, 1, NULL);
            if (st)
                goto fail;
            continue;
        }
        /* forced edges: hang each unreached node under a reached one (round-robin
         * over the BFS order, replacing the last slot of a full row) */
        for (size_t i = 0; i < nm; i++) {
            int32_t par = queue[(i * 7919u) % qt];
            int32_t *row = g_adj(g, par);
            if (g->deg[par] < g->M)
                row[g->deg[par]++] = miss[i];
            else
                row[g->M - 1] = miss[i];
        }
    }
fail:
    free(seen);
    free(queue);
    free(miss);
    free(lv);
    return st;
}

/* ------------------------------------------------------------------------ */
/* build */

typedef struct g_cl_ctx {
    const ra_graph *g;
    const void *keys;
    const float *cen; /* [nc][dim], nc a multiple of 4 */
    int nc;
    uint16_t *cl;
    atomic_int fail;
} g_cl_ctx;

#define G_CL_BLOCK 512
static void g_cl_task(void *arg, size_t b, size_t e)
{
    g_cl_ctx *c = arg;
    const ra_graph *g = c->g;
    int dim = g->dim;
    float *kf = malloc((size_t)G_CL_BLOCK * dim * sizeof *kf);
    float *sc = malloc(4 * G_CL_BLOCK * sizeof *sc);
    float *best = malloc(G_CL_BLOCK * sizeof *best);
    if (!kf || !sc || !best) {
        atomic_store(&c->fail, 1);
        goto done;
    }
    for (size_t blk = b; blk < e; blk++) {
        size_t k0 = blk * G_CL_BLOCK, kn = g->n - k0 < G_CL_BLOCK ? g->n - k0 : G_CL_BLOCK;
        ra_kern_to_f32(g_row(g, c->keys, (int32_t)k0), g->dtype, kn * (size_t)dim, kf);
        for (size_t i = 0; i < kn; i++)
            best[i] = -INFINITY;
        for (int j0 = 0; j0 < c->nc; j0 += 4) {
            ra_kern_dot_q4_f32(c->cen + (size_t)j0 * dim, kf, dim, kn, sc);
            for (int j = 0; j < 4; j++)
                for (size_t i = 0; i < kn; i++)
                    if (sc[j * kn + i] > best[i]) {
                        best[i] = sc[j * kn + i];
                        c->cl[k0 + i] = (uint16_t)(j0 + j);
                    }
        }
    }
done:
    free(kf);
    free(sc);
    free(best);
}

/* A cluster per key for the order of the linking walks: the most similar (cosine) of nc
 * evenly spaced keys. NULL: no memory. */
static uint16_t *g_cluster_keys(const ra_graph *g, const void *keys, int nc)
{
    int dim = g->dim;
    nc = (nc + 3) & ~3;
    uint16_t *cl = calloc(g->n, sizeof *cl);
    float *cen = malloc((size_t)nc * dim * sizeof *cen);
    if (!cl || !cen) {
        free(cl);
        free(cen);
        return NULL;
    }
    for (int j = 0; j < nc; j++) {
        float *r = cen + (size_t)j * dim;
        ra_kern_to_f32(g_row(g, keys, (int32_t)((size_t)j * g->n / (size_t)nc)), g->dtype,
                       (size_t)dim, r);
        double nn = 0;
        for (int d = 0; d < dim; d++)
            nn += (double)r[d] * r[d];
        float inv = nn > 0 ? (float)(1.0 / sqrt(nn)) : 0.0f;
        for (int d = 0; d < dim; d++)
            r[d] *= inv;
    }
    g_cl_ctx c = {.g = g, .keys = keys, .cen = cen, .nc = nc, .cl = cl};
    atomic_init(&c.fail, 0);
    g_parallel(g->threads, (g->n + G_CL_BLOCK - 1) / G_CL_BLOCK, 1, g_cl_task, &c);
    free(cen);
    if (atomic_load(&c.fail)) {
        free(cl);
        return NULL;
    }
    return cl;
}

/* The key->key candidates of a build: 0 for the linking walks (g_insert_nodes), else
 * the count of each key's best keys by code over all pairs (g_kk_block) that join its
 * projection candidates in one pruning, as the GPU build does with its exact lists
 * (gpu/cpu_graph.c). Chosen where the tile unit makes all pairs cheaper than a walk per
 * key: AMX, 8-bit codes of at most 128 bytes, and at most G_KK_MAX_N keys (the pairs
 * grow as n^2, the walks as n). RA_GRAPH_KK=0 keeps the walks, 1 forces the lists (the
 * portable kernel without AMX); RA_GRAPH_KK_C sets their length (study knobs). */
#define G_KK_MAX_N 524288
#define G_KK_C 96
static void g_kk_codes_free(ra_graph *g)
{
    if (g->kk_codes)
        ra_big_free(g->kk_codes, g->n * (size_t)g->cb.cbytes);
    g->kk_codes = NULL;
}

/* the lists join the candidates that are pruned; protected projection slots would copy
 * them unpruned (and with repeats) into a row */
_Static_assert(G_PROJ_PCT == 0, "key->key lists by code need unprotected projection edges");

static atomic_int g_kk_forced = -2; /* g_kk_force: -2 = not forced */

void g_kk_force(int mode)
{
    atomic_store(&g_kk_forced, mode);
}

static int g_kk_count(const ra_graph *g, size_t n)
{
    static ra_env_once e_on, e_c;
    int on = atomic_load(&g_kk_forced);
    if (on == -2)
        on = ra_env_int(&e_on, "RA_GRAPH_KK", -1);
    int kc = ra_env_int(&e_c, "RA_GRAPH_KK_C", G_KK_C);
    kc = kc < 8 ? 8 : kc > 1024 ? 1024 : kc;
    /* the lists keep scores as floats (g_keep_best): exact below 2^24, so up to ~518
     * dimensions of 8-bit codes (255 * 127 * qbytes) */
    if (on == 0 || n < 2 || 255.0 * 127.0 * g->cb.qbytes >= 16777216.0)
        return 0;
    if (on < 0 && !(g_kk_amx(g) && n <= G_KK_MAX_N))
        return 0;
    return (size_t)kc < n ? kc : (int)(n - 1);
}

/* Slots of a row kept for projection edges (unpruned, most frequent co-answers);
 * 0 = none: projection edges are pruned like the others. Protecting them was
 * measured worse (recall@100 0.71 vs 0.73 at M=48), so the default is 0. */
static int g_proj_slots(int M)
{
    return G_PROJ_PCT * M / 100;
}

/* (count, id) as one key that sorts by count descending, then id ascending */
static inline uint64_t g_cnt_key(int32_t cnt, int32_t id)
{
    return (uint64_t)(UINT32_MAX - (uint32_t)cnt) << 32 | (uint32_t)id;
}

/* The projection's inputs: every training query's exact list and, per node, the lists
 * it takes its candidates from (its first G_PROJ_LISTS occurrences, in query order). */
typedef struct g_proj_ctx {
    ra_graph *g;
    const void *keys;
    const int32_t *knn; /* [nq][K] */
    int K;
    const int *len;      /* [nq] valid entries of each list */
    const size_t *off;   /* occurrences of node u: occ[off[u] .. off[u + 1]) */
    const uint64_t *occ; /* query << 16 | rank */
    size_t cmax;         /* distinct candidates kept per node, most frequent first */
    int mp;              /* protected slots per node */
    int kc;              /* > 0: each node's best kc keys by code join its candidates */
    int amx;             /* g_kk_block's kernel */
    atomic_int fail;
    atomic_ullong kk_us;     /* thread time in g_kk_block, for the log */
    atomic_ullong kk_cyc[3]; /* its ticks scoring / the rest, keys scanned twice */
} g_proj_ctx;

/* Per node: the candidates of its occurrences (each key of a list gets the keys within
 * G_WINDOW ranks of it and the list's best key; the best key gets the whole list),
 * counted (a stamp and a slot per distinct id: no sort of the multiset), the cmax most
 * frequent (ties by id), pruned into the node's row. This was a sort of every pair (up
 * to n x 32 x 65) in an array filled on one thread; the pairs are never stored now. */
static void g_proj_task(void *arg, size_t b, size_t e)
{
    g_proj_ctx *c = arg;
    ra_graph *g = c->g;
    size_t cap = 1024, kc = (size_t)c->kc, dim = (size_t)g->dim;
    uint64_t *key = malloc(cap * sizeof *key);
    int32_t *cnt = malloc(cap * sizeof *cnt), *ids = malloc((c->cmax + kc) * sizeof *ids);
    uint64_t *tmp = malloc((c->cmax + kc) * sizeof *tmp);
    g_tls *t = g_tls_get(g->n, 1, 1024, g->dim);
    float *kq = kc ? malloc(G_KK_BLOCK * dim * sizeof *kq) : NULL;
    int32_t *self = kc ? malloc(G_KK_BLOCK * sizeof *self) : NULL;
    int32_t *kk = kc ? malloc(G_KK_BLOCK * kc * sizeof *kk) : NULL;
    if (!key || !cnt || !ids || !tmp || !t || (kc && (!kq || !self || !kk))) {
        atomic_store(&c->fail, 1);
        goto done;
    }
    for (size_t u = b; u < e; u++) {
        size_t ui = (u - b) % G_KK_BLOCK;
        if (kc && ui == 0) { /* the next block's key->key lists */
            if (g_cancelled(g)) { /* a block costs ~10 ms: a Drop need not wait the phase */
                atomic_store(&c->fail, 1); /* (g_project tells a cancel from a failure) */
                goto done;
            }
            size_t nb = e - u < G_KK_BLOCK ? e - u : G_KK_BLOCK;
            for (size_t i = 0; i < nb; i++) {
                self[i] = (int32_t)(u + i);
                ra_kern_to_f32(g_row(g, c->keys, self[i]), g->dtype, dim, kq + i * dim);
            }
            double t0 = ra_now_s();
            uint64_t cyc[3] = {0, 0, 0};
            if (g_kk_block(g, kq, nb, self, (int)kc, c->amx, kk, cyc)) {
                atomic_store(&c->fail, 1);
                goto done;
            }
            atomic_fetch_add(&c->kk_cyc[0], cyc[0]);
            atomic_fetch_add(&c->kk_cyc[1], cyc[1]);
            atomic_fetch_add(&c->kk_cyc[2], cyc[2]);
            atomic_fetch_add(&c->kk_us, (unsigned long long)((ra_now_s() - t0) * 1e6));
        }
        if (!kc && c->off[u] == c->off[u + 1])
            continue;
        uint32_t gen = g_tls_next_gen(t);
        size_t m = 0;
        for (size_t o = c->off[u]; o < c->off[u + 1]; o++) {
            size_t qi = (size_t)(c->occ[o] >> 16);
            int r = (int)(c->occ[o] & 0xffff), len = c->len[qi];
            const int32_t *l = c->knn + qi * (size_t)c->K;
            int lo = r == 0 ? 1 : (r - G_WINDOW < 0 ? 0 : r - G_WINDOW);
            int hi = r == 0 ? len - 1 : (r + G_WINDOW >= len ? len - 1 : r + G_WINDOW);
            /* the pivot l[0] as one extra candidate when the window misses it */
            int extra = r > 0 && lo > 0;
            for (int j = lo; j <= hi + extra; j++) {
                int32_t v = j > hi ? l[0] : l[j];
                if (v == (int32_t)u)
                    continue;
                if (t->stamp[v] == gen) {
                    cnt[t->slot[v]]++;
                    continue;
                }
                if (m == cap) {
                    uint64_t *k2 = realloc(key, 2 * cap * sizeof *k2);
                    if (k2)
                        key = k2;
                    int32_t *c2 = k2 ? realloc(cnt, 2 * cap * sizeof *c2) : NULL;
                    if (!c2) {
                        atomic_store(&c->fail, 1);
                        goto done;
                    }
                    cnt = c2;
                    cap *= 2;
                }
                t->stamp[v] = gen;
                t->slot[v] = (uint32_t)m;
                key[m] = (uint32_t)v;
                cnt[m++] = 1;
            }
        }
        for (size_t i = 0; i < m; i++)
            key[i] = g_cnt_key(cnt[i], (int32_t)key[i]);
        g_sort_u64(key, m, NULL);
        size_t k = m < c->cmax ? m : c->cmax;
        for (size_t i = 0; i < k; i++)
            ids[i] = (int32_t)(uint32_t)key[i];
        int32_t *row = g_adj(g, u);
        if (kc) { /* its key->key list (g_link_list skips -1 and what repeats) */
            memcpy(ids + k, kk + ui * kc, kc * sizeof *ids);
            k += kc;
        }
        if (c->mp == 0) { /* unprotected: occlusion-pruned like every other edge */
            int d = g_link_list(g, c->keys, (int32_t)u, ids, (int)k, g->M, tmp, row, t);
            g->deg[u] = (uint8_t)d;
            continue;
        }
        /* the most frequent co-answers, in order: occlusion by key distance would drop
         * exactly the far-apart keys one query scores high together */
        int kp = (int)k < c->mp ? (int)k : c->mp;
        memcpy(row, ids, (size_t)kp * sizeof *row);
        g->deg[u] = g->pdeg[u] = (uint8_t)kp;
    }
done:
    free(key);
    free(cnt);
    free(ids);
    free(tmp);
    free(kq);
    free(self);
    free(kk);
}

/* The edges (target, source) of rows [b, e), node u's at eoff[u] */
typedef struct g_redge_ctx {
    const ra_graph *g;
    const size_t *eoff;
    g_edge *e;
} g_redge_ctx;

static void g_redge_task(void *arg, size_t b, size_t end)
{
    g_redge_ctx *c = arg;
    for (size_t u = b; u < end; u++)
        for (int j = 0; j < c->g->deg[u]; j++)
            c->e[c->eoff[u] + (size_t)j] = g_edge_of(g_adj(c->g, u)[j], (int32_t)u);
}

/* The projection: per node, its candidates from the training lists it occurs in (the
 * first G_PROJ_LISTS), the cmax most frequent co-answers pruned into its row; then the
 * reverse edges. occ[u] (may be NULL) counts every occurrence of u. */
static ra_status g_project(ra_graph *g, const void *keys, const int32_t *knn, size_t nq, int K,
                           int32_t *occ, int kc)
{
    ra_status st = RA_OK;
    size_t n = g->n;
    size_t *off = calloc(n + 1, sizeof *off), *fill = NULL;
    int *len = malloc((nq ? nq : 1) * sizeof *len);
    uint64_t *oc = NULL;
    if (!off || !len) {
        st = RA_ENOMEM;
        goto fail;
    }
    if (K > 0xffff) { /* ranks are 16 bits in the occurrences (K <= 4096 from ra_head) */
        st = RA_EINVAL;
        goto fail;
    }
    double w0, c0, w1, c1, w2, c2, w3, c3;
    g_clock(&w0, &c0);
    /* occurrences per node (capped), in query order: a count pass, then a fill pass */
    for (size_t qi = 0; qi < nq; qi++) {
        const int32_t *l = knn + qi * (size_t)K;
        int m = 0;
        while (m < K && l[m] >= 0)
            m++;
        len[qi] = m;
        for (int r = 0; r < m; r++) {
            if (occ)
                occ[l[r]]++;
            if (off[l[r] + 1] < G_PROJ_LISTS)
                off[l[r] + 1]++;
        }
    }
    for (size_t i = 0; i < n; i++)
        off[i + 1] += off[i];
    oc = malloc((off[n] ? off[n] : 1) * sizeof *oc);
    fill = malloc((n ? n : 1) * sizeof *fill);
    if (!oc || !fill) {
        st = RA_ENOMEM;
        goto fail;
    }
    memcpy(fill, off, n * sizeof *fill);
    for (size_t qi = 0; qi < nq; qi++) {
        const int32_t *l = knn + qi * (size_t)K;
        for (int r = 0; r < len[qi]; r++) {
            int32_t u = l[r];
            if (fill[u] < off[u + 1])
                oc[fill[u]++] = (uint64_t)qi << 16 | (uint64_t)r;
        }
    }
    g_proj_ctx c = {.g = g,
                    .keys = keys,
                    .knn = knn,
                    .K = K,
                    .len = len,
                    .off = off,
                    .occ = oc,
                    .cmax = (size_t)g->M * 4,
                    .mp = g_proj_slots(g->M),
                    .kc = kc,
                    .amx = kc > 0 && g_kk_amx(g)};
    atomic_init(&c.fail, 0);
    atomic_init(&c.kk_us, 0);
    atomic_init(&c.kk_cyc[0], 0);
    atomic_init(&c.kk_cyc[1], 0);
    atomic_init(&c.kk_cyc[2], 0);
    g_clock(&w1, &c1);
    g_parallel(g->threads, n, kc ? G_KK_BLOCK : 256, g_proj_task, &c);
    g_clock(&w2, &c2);
    if (atomic_load(&c.fail)) {
        st = g_cancelled(g) ? RA_ECLOSED : RA_ENOMEM;
        goto fail;
    }
    if (c.mp == 0) { /* reverse edges of the pruned projection */
        size_t ne = 0;
        for (size_t u = 0; u < n; u++) { /* fill (reused): where node u's edges go */
            fill[u] = ne;
            ne += g->deg[u];
        }
        g_edge *e = malloc((ne ? ne : 1) * sizeof *e);
        if (!e) {
            st = RA_ENOMEM;
            goto fail;
        }
        g_redge_ctx rc = {.g = g, .eoff = fill, .e = e};
        g_parallel(g->threads, n, 4096, g_redge_task, &rc);
        st = g_apply_edges(g, keys, e, ne);
        free(e);
    }
    g_clock(&w3, &c3);
    char kks[192] = "";
    if (kc)
        snprintf(kks, sizeof kks,
                 " (key->key lists of %d by code%s: %.2f thread s, %.0f %% of it scoring, %llu "
                 "keys scanned twice)",
                 kc, c.amx ? ", AMX" : "", (double)atomic_load(&c.kk_us) / 1e6,
                 100.0 * (double)atomic_load(&c.kk_cyc[0]) /
                     (double)(atomic_load(&c.kk_cyc[0]) + atomic_load(&c.kk_cyc[1]) + 1),
                 (unsigned long long)atomic_load(&c.kk_cyc[2]));
    RA_DEBUG("graph: projection of %zu lists: occurrences %.2f/%.2f s, candidates and pruning "
             "%.2f/%.2f s%s, reverse edges %.2f/%.2f s (wall/cpu)",
             nq, w1 - w0, c1 - c0, w2 - w1, c2 - c1, kks, w3 - w2, c3 - c2);
fail:
    free(off);
    free(fill);
    free(len);
    free(oc);
    return st;
}

/* Picks training queries: half the budget from the last positions (closest to the
 * decode steps that follow), the rest on a stride over the earlier ones, offset by
 * the seed. Returns the count written to idx. */
size_t g_sample_queries(size_t nq, size_t want, uint64_t seed, size_t *idx)
{
    if (nq <= want) {
        for (size_t i = 0; i < nq; i++)
            idx[i] = i;
        return nq;
    }
    size_t tail = want / 2, rest = want - tail;
    size_t head_n = nq - tail; /* earlier positions [0, head_n) */
    size_t k = 0;
    double stride = (double)head_n / (double)rest;
    double phase = (double)(seed % 1000) / 1000.0 * stride;
    for (size_t i = 0; i < rest; i++) {
        size_t p = (size_t)(phase + stride * (double)i);
        idx[k++] = p < head_n ? p : head_n - 1;
    }
    for (size_t i = head_n; i < nq; i++)
        idx[k++] = i;
    return k;
}

/* The code's range over rows in G_RANGE_CHUNKS slices, merged after (min and max: the
 * same range whatever the slicing); it was one serial pass over every key. */
#define G_RANGE_CHUNKS 64
typedef struct g_range_ctx {
    const ra_graph *g;
    const void *keys;
    size_t n, csz;
    float *mn, *mx; /* [G_RANGE_CHUNKS][dim] */
    atomic_int fail;
} g_range_ctx;

static void g_range_task(void *arg, size_t b, size_t e)
{
    g_range_ctx *c = arg;
    int dim = c->g->dim;
    float *f = malloc((size_t)dim * sizeof *f);
    if (!f) {
        atomic_store(&c->fail, 1);
        return;
    }
    for (size_t k = b; k < e; k++) {
        size_t s = k * c->csz, z = s + c->csz < c->n ? s + c->csz : c->n;
        ra_codebook_range(g_row(c->g, c->keys, (int32_t)s), c->g->dtype, dim, z - s,
                          c->mn + k * dim, c->mx + k * dim, f);
    }
    free(f);
}

/* Fits the search code to rows [0, n) and encodes them (with their norms). */
ra_status g_fit_codes(ra_graph *g, const void *keys, size_t n)
{
    ra_codebook cb;
    int dim = g->dim;
    g_range_ctx rc = {
        .g = g, .keys = keys, .n = n, .csz = (n + G_RANGE_CHUNKS - 1) / G_RANGE_CHUNKS};
    rc.csz = rc.csz ? rc.csz : 1;
    size_t nch = (n + rc.csz - 1) / rc.csz;
    rc.mn = malloc((size_t)G_RANGE_CHUNKS * dim * sizeof *rc.mn);
    rc.mx = malloc((size_t)G_RANGE_CHUNKS * dim * sizeof *rc.mx);
    atomic_init(&rc.fail, 0);
    ra_status st = RA_ENOMEM;
    if (rc.mn && rc.mx) {
        for (size_t i = 0; i < (size_t)G_RANGE_CHUNKS * dim; i++) {
            rc.mn[i] = INFINITY;
            rc.mx[i] = -INFINITY;
        }
        g_parallel(g->threads, nch, 1, g_range_task, &rc);
        for (size_t k = 1; k < nch; k++)
            for (int d = 0; d < dim; d++) {
                float a = rc.mn[k * dim + d], z = rc.mx[k * dim + d];
                rc.mn[d] = a < rc.mn[d] ? a : rc.mn[d];
                rc.mx[d] = z > rc.mx[d] ? z : rc.mx[d];
            }
        st = atomic_load(&rc.fail)
                 ? RA_ENOMEM
                 : ra_codebook_from_range(&cb, dim, g->code_bits, n, rc.mn, rc.mx);
    }
    free(rc.mn);
    free(rc.mx);
    if (st)
        return st;
    ra_codebook_fini(&g->cb);
    g->cb = cb;
    g->cb_n = n;
    g_norm_ctx c = {.g = g, .keys = keys};
    g_parallel(g->threads, n, 4096, g_norm_task, &c);
    return RA_OK;
}

/* Routing queries: evenly spaced over the sample (half tail, half stride), unit rows,
 * each with the first G_ROUTE_KEYS ids of its list (lists [ns][Kk]). */
ra_status g_set_routing(ra_graph *g, const float *sq, size_t ns, const int32_t *knn, int Kk)
{
    int dim = g->dim;
    int nr = ns < G_ROUTE_MAX ? (int)ns : G_ROUTE_MAX;
    g->route_q = malloc((size_t)nr * dim * sizeof *g->route_q);
    g->route_ids = malloc((size_t)nr * G_ROUTE_KEYS * sizeof *g->route_ids);
    if (!g->route_q || !g->route_ids)
        return RA_ENOMEM;
    for (int r = 0; r < nr; r++) {
        size_t qi = g_route_pick(r, nr, ns);
        const float *src = sq + qi * dim;
        double nn = 0;
        for (int j = 0; j < dim; j++)
            nn += (double)src[j] * src[j];
        float inv = nn > 0 ? (float)(1.0 / sqrt(nn)) : 0.0f; /* cosine: unit rows */
        for (int j = 0; j < dim; j++)
            g->route_q[(size_t)r * dim + j] = src[j] * inv;
        for (int j = 0; j < G_ROUTE_KEYS; j++)
            g->route_ids[(size_t)r * G_ROUTE_KEYS + j] = j < Kk ? knn[qi * Kk + j] : -1;
    }
    g->n_route = nr;
    return RA_OK;
}

ra_graph *g_alloc(int dim, ra_dtype dt, int M, int ef, int threads, uint64_t seed)
{
    ra_graph *g = calloc(1, sizeof *g);
    if (!g)
        return NULL;
    g->dim = dim;
    g->dtype = dt;
    g->row_bytes = (size_t)dim * ra_dtype_size(dt);
    g->M = M;
    g->ef_build = ef;
    g->threads = g_threads(threads);
    g->seed = seed;
    g->l_mult = 1.0f; /* the calibration of a build sets it */
    g->code_bits = ra_codebook_bits();
    /* RA_GRAPH_REC_ALIGN=128 (a study knob): records a multiple of 128 bytes, so that a
     * 128-byte code never straddles two of the 128-byte line pairs the L2's adjacent-line
     * prefetcher fetches together (320-byte records: half of them do) */
    static ra_env_once align_env;
    size_t al = ra_env_int(&align_env, "RA_GRAPH_REC_ALIGN", 64) == 128 ? 128 : 64;
    g->rec_bytes =
        ((size_t)ra_codebook_code_bytes(dim, g->code_bits) + (size_t)M * sizeof(int32_t) + al - 1) &
        ~(al - 1);
    return g;
}

void g_clock(double *wall, double *cpu)
{
    struct timespec ts;
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
    *cpu = (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
    *wall = ra_now_s();
}

/* The build's phases, in order, for the log (ratd-bench-index --verbose) */
#define G_NPHASE 5
static const char *const g_phase_names[G_NPHASE] = {"codes", "kNN", "projection",
                                                    "key->key linking", "connectivity"};

/* One line per build: each phase's wall and CPU seconds (process CPU: other threads of the
 * process count too) and their ratio, the threads it kept busy: a phase near 1.0 with
 * several threads is a serial one. */
static void g_log_phases(size_t n, size_t ns, int threads, int given, const double *w,
                         const double *c)
{
    char buf[768];
    int at = snprintf(buf, sizeof buf,
                      "graph: built %zu keys from %zu queries on %d threads in "
                      "%.2f s (cpu %.2f s); phases wall/cpu s (cpu/wall):",
                      n, ns, threads, w[G_NPHASE] - w[0], c[G_NPHASE] - c[0]);
    for (int i = 0; i < G_NPHASE && at > 0 && (size_t)at < sizeof buf; i++) {
        double dw = w[i + 1] - w[i], dc = c[i + 1] - c[i];
        at += snprintf(buf + at, sizeof buf - (size_t)at, "%s %s%s %.2f/%.2f (%.1f)", i ? "," : "",
                       g_phase_names[i], i == 1 && given ? " (lists given)" : "", dw, dc,
                       dw > 1e-6 ? dc / dw : 0.0);
    }
    RA_DEBUG("%s", buf);
}

ra_status ra_graph_build_from(ra_graph **state, const ra_kv *kv, size_t n, const float *train_q,
                              size_t nq, const int32_t *lists, int lists_k,
                              const ra_index_opts *opts)
{
    ra_status st;
    ra_graph *g = NULL;
    float *sq = NULL;
    size_t *sidx = NULL;
    int32_t *knn = NULL;
    float *knn_s = NULL;
    int32_t *occ = NULL, *miss = NULL;
    uint64_t *rank = NULL;
    if (!state || !kv)
        return RA_EINVAL;
    if (n > ra_kv_count(kv) || n > (size_t)INT32_MAX - 1)
        return RA_EINVAL;
    if (nq && !train_q)
        return RA_EINVAL;
    int K, M, ef, ent, ntrain, threads;
    uint64_t seed;
    if ((st = g_inputs(opts, kv, train_q, nq, &K, &M, &ef, &ent, &ntrain, &threads, &seed)))
        return st;
    int dim = ra_kv_dim(kv);
    ra_dtype dt = ra_kv_dtype(kv);
    if (!(g = g_alloc(dim, dt, M, ef, threads, seed)))
        return RA_ENOMEM;
    g->cancel = opts ? opts->cancel : NULL; /* cleared when the build returns */
    if ((st = g_reserve(g, n > 0 ? n : 1)))
        goto fail;
    g->n = n;
    const void *keys = ra_kv_keys(kv);
    /* phase clocks (wall, process CPU): the end of each phase of g_phase_names */
    double w[G_NPHASE + 1], c[G_NPHASE + 1];
    g_clock(&w[0], &c[0]);
    if ((st = g_fit_codes(g, keys, n)))
        goto fail;
    g_clock(&w[1], &c[1]);
    for (int i = 2; i <= G_NPHASE; i++) /* phases that do not run take no time */
        w[i] = w[1], c[i] = c[1];
    int kc = g_kk_count(g, n); /* key->key lists by code instead of walks */
    if (kc && g_kk_amx(g) && (g->kk_codes = ra_big_alloc(n * (size_t)g->cb.cbytes)) != NULL)
        for (size_t i = 0; i < n; i++) /* (without the copy: the records, slower) */
            memcpy(g->kk_codes + i * (size_t)g->cb.cbytes, g_code(g, i), (size_t)g->cb.cbytes);
    occ = calloc(n ? n : 1, sizeof *occ);
    if (!occ) {
        st = RA_ENOMEM;
        goto fail;
    }
    size_t ns = 0, n_hold = 0; /* training queries used; held out for the calibration */
    int knn_w = 0;             /* width of the knn rows */
    if (n > 1 && nq > 0) {
        size_t want = (size_t)ntrain;
        sidx = malloc((want < nq ? want : nq) * sizeof *sidx);
        if (!sidx) {
            st = RA_ENOMEM;
            goto fail;
        }
        ns = g_sample_queries(nq, want, seed, sidx);
        int Kk = (size_t)K > n ? (int)n : K;
        if (lists && lists_k < Kk)
            Kk = lists_k;
        knn_w = Kk;
        sq = malloc(ns * (size_t)dim * sizeof *sq);
        knn = malloc(ns * (size_t)Kk * sizeof *knn);
        knn_s = malloc(ns * (size_t)Kk * sizeof *knn_s);
        if (!sq || !knn || !knn_s) {
            st = RA_ENOMEM;
            goto fail;
        }
        for (size_t i = 0; i < ns; i++)
            memcpy(sq + i * dim, train_q + sidx[i] * dim, (size_t)dim * sizeof *sq);
        if (lists) /* the caller's exact lists (e.g. from the GPU), truncated to Kk */
            for (size_t i = 0; i < ns; i++)
                memcpy(knn + i * (size_t)Kk, lists + sidx[i] * (size_t)lists_k,
                       (size_t)Kk * sizeof *knn);
        else if (kc) /* the tile unit's candidates, rescored: ~10x less than exact */
            st = g_code_knn(g, keys, sq, ns, Kk, knn, knn_s);
        else
            st = g_exact_knn(g, keys, n, sq, ns, Kk, knn, knn_s);
        if (st) {
            RA_ERROR("graph: exact top-%d of %zu training queries failed: %s", Kk, ns,
                     ra_strerror(st));
            goto fail;
        }
        for (size_t i = 0; i < ns * (size_t)Kk; i++) /* never trust an index from outside */
            if (knn[i] >= (int32_t)n)
                knn[i] = -1;
        g_clock(&w[2], &c[2]);
        if (g_cancelled(g)) {
            st = RA_ECLOSED;
            goto fail;
        }
        /* hold out the most recent training queries (the last rows of the sample, a
         * block of consecutive positions, as decode queries follow the prefill) for the
         * calibration of the search effort: the graph never sees their lists */
        n_hold = ns >= 2048 && Kk >= 10 ? 128 : 0;
        ns -= n_hold;
        st = g_project(g, keys, knn, ns, Kk, occ, kc);
        if (st)
            goto fail;
        size_t cov = 0, full = 0, edges = 0;
        for (size_t i = 0; i < n; i++) {
            cov += g->deg[i] > 0;
            full += g->deg[i] >= g->M;
            edges += g->deg[i];
        }
        RA_DEBUG("graph: projection: %zu of %zu keys linked (%zu full rows), mean degree %.1f",
                 cov, n, full, (double)edges / (double)n);
        g_clock(&w[3], &c[3]);
    } else if (kc) { /* no training queries: the key->key lists alone */
        if ((st = g_project(g, keys, NULL, 0, 1, occ, kc)))
            goto fail;
        g_clock(&w[3], &c[3]);
    }
    g_kk_codes_free(g);
    /* entry points: the keys most often in a training query's top-K (heavy hitters,
     * which many queries score high), then evenly spaced keys for the rest */
    {
        int ne = (size_t)ent > n ? (int)n : ent;
        if (ne < 1)
            ne = 1;
        g->entries = malloc((size_t)ne * sizeof *g->entries);
        rank = malloc(2 * (n ? n : 1) * sizeof *rank); /* keys, radix scratch */
        if (!g->entries || !rank) {
            st = RA_ENOMEM;
            goto fail;
        }
        int k = 0;
        if (n > 0) {
            size_t m = 0;
            for (size_t i = 0; i < n; i++)
                if (occ[i] > 0)
                    rank[m++] = g_cnt_key(occ[i], (int32_t)i);
            g_psort_u64(g->threads, rank, rank + n, m);
            int hh = ns ? (ne + 1) / 2 : 0;
            for (size_t i = 0; i < m && k < hh; i++)
                g->entries[k++] = (int32_t)(uint32_t)rank[i];
            for (int i = 0; k < ne && i < ne * 4; i++) {
                int32_t id = (int32_t)(((uint64_t)i * n + seed % n) / (uint64_t)ne % n);
                int dup = 0;
                for (int j = 0; j < k; j++)
                    dup |= g->entries[j] == id;
                if (!dup)
                    g->entries[k++] = id;
            }
        }
        g->n_entries = k;
    }
    if (ns > 0 && (st = g_set_routing(g, sq, ns, knn, knn_w)))
        goto fail;
    /* keys no training query reached: insert them by key->key search */
    if (n > 1) {
        miss = malloc(n * sizeof *miss);
        if (!miss) {
            st = RA_ENOMEM;
            goto fail;
        }
        size_t nm = 0;
        /* every key is searched for by itself and linked to what it finds, merged with
         * its projection edges (RoarGraph's connectivity enhancement): keys no query
         * covered get edges at all, covered ones get key->key edges next to the
         * query-shaped ones. Linking only the uncovered keys was measured much worse
         * (recall@100 0.57 vs 0.78 at 32K keys, M=32, L=100). */
        for (size_t i = 0; i < n; i++)
            miss[nm++] = (int32_t)i;
        g_clock(&w[3], &c[3]); /* entries and routing belong to the projection */
        if (!kc) {             /* else every key had its key->key list in the projection */
            uint16_t *cl = NULL;
            if (n >= 4 * G_LINK_CLUSTERS) /* only an order: none without memory for it */
                cl = g_cluster_keys(g, keys, G_LINK_CLUSTERS);
            st = g_insert_nodes(g, keys, miss, nm, 1, cl);
            free(cl);
            if (st)
                goto fail;
        }
        g_clock(&w[4], &c[4]);
        st = g_connect(g, keys);
        if (!st && g_cancelled(g))
            st = RA_ECLOSED;
        if (st)
            goto fail;
    }
    if (n_hold) {
        double tc = ra_now_s();
        ra_graph_calibrate(g, kv, sq + ns * (size_t)dim, n_hold, knn + ns * (size_t)knn_w, knn_w);
        RA_DEBUG("graph: search effort calibrated in %.2fs: x%.2f", ra_now_s() - tc,
                 (double)g->l_mult);
    }
    g->cancel = NULL;
    g_clock(&w[G_NPHASE], &c[G_NPHASE]);
    if (n <= 1)
        for (int i = 3; i < G_NPHASE; i++)
            w[i] = w[2], c[i] = c[2];
    g_log_phases(n, ns, g->threads, lists != NULL, w, c);
    free(sq);
    free(sidx);
    free(knn);
    free(knn_s);
    free(occ);
    free(miss);
    free(rank);
    *state = g;
    return RA_OK;
fail:
    free(sq);
    free(sidx);
    free(knn);
    free(knn_s);
    free(occ);
    free(miss);
    free(rank);
    if (g)
        g_kk_codes_free(g);
    ra_graph_destroy(g);
    return st;
}

ra_status ra_graph_add(ra_graph *g, const ra_kv *kv, size_t first, size_t n)
{
    if (!g || !kv || ra_kv_dim(kv) != g->dim || ra_kv_dtype(kv) != g->dtype)
        return RA_EINVAL;
    if (first != g->n || n > ra_kv_count(kv) || first > ra_kv_count(kv) - n ||
        first + n > (size_t)INT32_MAX - 1)
        return RA_EINVAL;
    if (n == 0)
        return RA_OK;
    ra_status st = g_reserve(g, first + n);
    if (st)
        return st;
    const void *keys = ra_kv_keys(kv);
    int32_t *nodes = malloc(n * sizeof *nodes);
    if (!nodes)
        return RA_ENOMEM;
    for (size_t i = 0; i < n; i++)
        nodes[i] = (int32_t)(first + i);
    {
        float *tmp = malloc((size_t)g->dim * sizeof *tmp);
        if (!tmp) {
            free(nodes);
            return RA_ENOMEM;
        }
        for (size_t i = first; i < first + n; i++) {
            const void *r = g_row(g, keys, (int32_t)i);
            ra_codebook_encode(&g->cb, r, g->dtype, (uint8_t *)g_code(g, i), tmp);
            g->norm2[i] = ra_kern_dot(tmp, r, g->dtype, g->dim);
            g->deg[i] = g->pdeg[i] = 0;
        }
        free(tmp);
        g->n = first + n;
    }
    /* a code fitted to few keys (a graph built small, or empty) is refitted to all of
     * them each time the keys have grown fourfold: O(n) in all */
    if (g->n >= 4 * g->cb_n + 64 && (st = g_fit_codes(g, keys, g->n))) {
        g->n = first;
        free(nodes);
        return st;
    }
    if (g->n_entries == 0) { /* built empty: the first key becomes the entry */
        int32_t *e = realloc(g->entries, sizeof *e);
        if (!e) {
            g->n = first;
            free(nodes);
            return RA_ENOMEM;
        }
        g->entries = e;
        g->entries[0] = (int32_t)first;
        g->n_entries = 1;
    }
    /* new rows are searched only once linked; nodes of one batch cannot see each
     * other, which is why the batches start small (g_insert_nodes) */
    g->light_rev = 1;
    st = g_insert_nodes(g, keys, nodes, n, 0, NULL);
    g->light_rev = 0;
    free(nodes);
    return st;
}

/* Seeds from the routing queries most similar (cosine) to q: their best keys. Cost:
 * n_route fp32 dot products, no key is read. Returns the count written. */
