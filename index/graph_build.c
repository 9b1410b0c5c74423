/* Building and growing the graph (graph_internal.h has the design): the query
 * projection, occlusion pruning, batched key->key insertion on the stored keys, reverse
 * edges, connectivity, entry points, routing queries and the search codes. */
#include <math.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>

#include "graph_internal.h"
#include "ra_bigmem.h"
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

/* Scores a batch of ids against q: IP, minus |k|^2/2 in L2 mode; on the search codes
 * when the thread's scratch holds q prepared for them (t->use_codes), else exactly. */
static void g_score(const ra_graph *g, const void *keys, const float *q, int l2, const int32_t *ids,
                    int n, float *out, g_tls *t)
{
    if (t->use_codes) {
        int32_t *dots = (int32_t *)(void *)out; /* same size: converted in place */
        for (int i = 0; i < n; i++) {
            const uint8_t *c = g_code(g, (size_t)ids[i]);
            for (int o = 0; o < g->cb.cbytes; o += 64)
                __builtin_prefetch(c + o);
        }
        ra_kern_u8dot_gather(t->q8, t->q16, 1, g->cb.cbytes, g->rec, g->rec_bytes, ids, (size_t)n,
                             dots);
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

/* Beam search over nodes [0, g->n) from the entry points, the warm ids and the given
 * seeds. Leaves the best L candidates in t->pool, sorted; returns their count. Every
 * node is expanded at most once and the pool is bounded, so it always ends. */
static int g_search(const ra_graph *g, const void *keys, const float *q, int l2, int L,
                    const int32_t *warm, int n_warm, const int32_t *route, int n_route,
                    int32_t skip, g_tls *t, uint64_t *scanned, uint64_t *hops)
{
    uint32_t gen = g_tls_next_gen(t);
    uint32_t *stamp = t->stamp;
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
            if (id < 0 || (size_t)id >= g->n || stamp[id] == gen)
                continue;
            stamp[id] = gen;
            t->buf[nb++] = id;
            if (nb == t->buf_cap) {
                g_score(g, keys, q, l2, t->buf, nb, t->sc, t);
                nscan += (uint64_t)nb;
                for (int j = 0; j < nb; j++)
                    if (t->buf[j] != skip)
                        g_pool_insert(pool, &np, L, t->sc[j], t->buf[j]);
                nb = 0;
            }
        }
    }
    if (nb == 0 && np == 0 && g->n > 0) { /* nothing valid: start at node 0 */
        stamp[0] = gen;
        t->buf[nb++] = 0;
    }
    if (nb) {
        g_score(g, keys, q, l2, t->buf, nb, t->sc, t);
        nscan += (uint64_t)nb;
        for (int j = 0; j < nb; j++)
            if (t->buf[j] != skip)
                g_pool_insert(pool, &np, L, t->sc[j], t->buf[j]);
    }
    if (skip >= 0 && (size_t)skip < g->n && stamp[skip] != gen) {
        stamp[skip] = gen; /* never score or return the node being linked */
    }
    int k = 0;
    while (k < np) {
        if (pool[k].done) {
            k++;
            continue;
        }
        pool[k].done = 1;
        nhop++;
        int32_t u = pool[k].id;
        const int32_t *nbr = g_adj(g, u);
        int d = g->deg[u];
        /* prefetch the next candidate's adjacency while this one is scored */
        for (int j = k + 1; j < np; j++)
            if (!pool[j].done) {
                __builtin_prefetch(g_adj(g, (size_t)pool[j].id));
                break;
            }
        nb = 0;
        for (int j = 0; j < d; j++) {
            int32_t v = nbr[j];
            if (stamp[v] == gen)
                continue;
            stamp[v] = gen;
            t->buf[nb++] = v;
        }

        if (!nb) {
            k++;
            continue;
        }
        g_score(g, keys, q, l2, t->buf, nb, t->sc, t);
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

typedef struct g_nb {
    float d2;
    int32_t id;
} g_nb;

static int g_nb_cmp(const void *a, const void *b)
{
    const g_nb *x = a, *y = b;
    if (x->d2 < y->d2)
        return -1;
    if (x->d2 > y->d2)
        return 1;
    return (x->id > y->id) - (x->id < y->id);
}

/* From candidates c[0..nc) (d2 = distance to u: -u.c for inner product, the default,
 * or |u - c|^2; sorted ascending, no duplicates, u excluded) keeps at most M that no
 * kept r occludes: c is dropped when r is closer to c than u is (IP: r.c > u.c; L2:
 * alpha^2 |r - c|^2 < |u - c|^2). Strict comparisons keep exact duplicates, so
 * all-equal keys still get edges. A second pass refills up to M/2 slots with the
 * nearest dropped candidates, which keeps degrees up on heavy-tailed data. Writes ids
 * to out; returns the count. */
static int g_prune(const ra_graph *g, const void *keys, const g_nb *c, int nc, int M, int32_t *out,
                   g_tls *t)
{
    int kept = 0;
    uint8_t dropped[1024] = {0};
    int lim = nc < 1024 ? nc : 1024;
    for (int i = 0; i < lim && kept < M; i++) {
        int32_t cid = c[i].id;
        dropped[i] = 0;
        if (kept) {
            ra_kern_to_f32(g_row(g, keys, cid), g->dtype, (size_t)g->dim, t->cf);
            ra_kern_dot_gather(t->cf, keys, g->dtype, g->dim, out, (size_t)kept, t->sc);
            float nc2 = g->norm2[cid];
            for (int j = 0; j < kept; j++) {
                int l2 = g_use_l2();
                float drc = l2 ? g->norm2[out[j]] + nc2 - 2.0f * t->sc[j] : -t->sc[j];
                if (l2 ? G_ALPHA2 * drc < c[i].d2 : drc < c[i].d2) {
                    dropped[i] = 1;
                    break;
                }
            }
        }
        if (!dropped[i])
            out[kept++] = cid;
    }
    /* half the slots at most are refilled: long edges are what pruning is for */
    for (int i = 0; i < lim && kept < M / 2; i++)
        if (dropped[i])
            out[kept++] = c[i].id;
    return kept;
}

/* Candidates ids[0..n) of node u: computes d2, sorts, dedups, prunes into out. */
static int g_link_list(const ra_graph *g, const void *keys, int32_t u, const int32_t *ids, int n,
                       int M, g_nb *tmp, int32_t *out, g_tls *t)
{
    ra_kern_to_f32(g_row(g, keys, u), g->dtype, (size_t)g->dim, t->qf);
    int m = 0;
    for (int i = 0; i < n; i++)
        if (ids[i] != u && ids[i] >= 0)
            tmp[m++].id = ids[i];
    /* dots in chunks through the tls gather buffer */
    for (int b = 0; b < m; b += t->buf_cap) {
        int e = b + t->buf_cap < m ? b + t->buf_cap : m;
        for (int i = b; i < e; i++)
            t->buf[i - b] = tmp[i].id;
        ra_kern_dot_gather(t->qf, keys, g->dtype, g->dim, t->buf, (size_t)(e - b), t->sc);
        for (int i = b; i < e; i++) {
            float d2 = g->norm2[u] + g->norm2[tmp[i].id] - 2.0f * t->sc[i - b];
            tmp[i].d2 = g_use_l2() ? (d2 > 0.0f ? d2 : 0.0f) : -t->sc[i - b];
        }
    }
    qsort(tmp, (size_t)m, sizeof *tmp, g_nb_cmp);
    int w = 0;
    for (int i = 0; i < m; i++) /* equal ids have equal d2: adjacent after sorting */
        if (i == 0 || tmp[i].id != tmp[w - 1].id || tmp[i].d2 != tmp[w - 1].d2)
            tmp[w++] = tmp[i];
    /* a duplicate id can still hide behind an equal-d2 other id: drop it */
    int w2 = 0;
    for (int i = 0; i < w; i++) {
        int dup = 0;
        for (int j = i - 1; j >= 0 && tmp[j].d2 == tmp[i].d2; j--)
            if (tmp[j].id == tmp[i].id) {
                dup = 1;
                break;
            }
        if (!dup)
            tmp[w2++] = tmp[i];
    }
    return g_prune(g, keys, tmp, w2, M, out, t);
}

/* ------------------------------------------------------------------------ */
/* storage */

static ra_status g_reserve(ra_graph *g, size_t n)
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

typedef struct g_edge {
    int32_t to, from;
} g_edge;

static int g_edge_cmp(const void *a, const void *b)
{
    const g_edge *x = a, *y = b;
    if (x->to != y->to)
        return (x->to > y->to) - (x->to < y->to);
    return (x->from > y->from) - (x->from < y->from);
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
    g_nb *tmp = malloc((size_t)(M + 4096) * sizeof *tmp);
    int32_t out[G_MAX_DEGREE];
    g_tls *t = g_tls_get(0, 1, M + 4096, g->dim);
    if (!ids || !tmp || !t) {
        atomic_store(&c->fail, 1);
        goto done;
    }
    for (size_t gi = b; gi < end; gi++) {
        size_t s = c->grp[gi], e = c->grp[gi + 1];
        int32_t v = c->e[s].to;
        int32_t *row = g_adj(g, v);
        int d = g->deg[v];
        int pd = g->pdeg[v];
        int n = 0;
        for (int j = 0; j < d; j++)
            ids[n++] = row[j];
        int added = 0;
        for (size_t i = s; i < e && n < M + 4096; i++) {
            int32_t u = c->e[i].from;
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
                tmp[i] = (g_nb){.d2 = -t->sc[i], .id = cand[i]};
            qsort(tmp, (size_t)(nt + extra), sizeof *tmp, g_nb_cmp);
            for (int i = 0; i < nt; i++)
                cand[i] = tmp[i].id;
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
    qsort(e, ne, sizeof *e, g_edge_cmp);
    size_t ngrp = 0;
    for (size_t i = 0; i < ne; i++)
        if (i == 0 || e[i].to != e[i - 1].to)
            ngrp++;
    size_t *grp = malloc((ngrp + 1) * sizeof *grp);
    if (!grp)
        return RA_ENOMEM;
    size_t k = 0;
    for (size_t i = 0; i < ne; i++)
        if (i == 0 || e[i].to != e[i - 1].to)
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

typedef struct g_ins_ctx {
    ra_graph *g;
    const void *keys;
    const int32_t *nodes; /* the batch */
    int32_t *lists;       /* [nb][M] new out-lists */
    int *counts;
    int keep_old; /* merge the node's current out-list into its candidates */
    atomic_int fail;
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
    g_nb *tmp = malloc((size_t)ncand * sizeof *tmp);
    float *q = malloc((size_t)g->dim * sizeof *q);
    g_tls *t = g_tls_get(g->n, L, ncand > M ? ncand : M, g->dim);
    if (!ids || !tmp || !q || !t) {
        atomic_store(&c->fail, 1);
        goto done;
    }
    for (size_t i = b; i < e; i++) {
        int32_t u = c->nodes[i];
        ra_kern_to_f32(g_row(g, c->keys, u), g->dtype, (size_t)g->dim, q);
        /* the walk for a key's neighbours scores on the codes, as query walks do; the
         * candidates it finds are then linked on exact distances (g_link_list). Same
         * recall as exact walks on the calibrated 131K head, linking 19 s vs 24 s here */
        ra_codebook_prep(&g->cb, q, t->q8, t->q16, &t->cmul, &t->cadd);
        t->use_codes = 1;
        int np = g_search(g, c->keys, q, g_use_l2(), L, NULL, 0, NULL, 0, u, t, NULL, NULL);
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
done:
    free(ids);
    free(tmp);
    free(q);
}

/* Links nodes[0..n) (already counted in g->n) in batches. */
static ra_status g_insert_nodes(ra_graph *g, const void *keys, const int32_t *nodes, size_t n,
                                int keep_old)
{
    ra_status st = RA_OK;
    size_t bmax = 8192;
    int32_t *lists = malloc(bmax * (size_t)g->M * sizeof *lists);
    int *counts = malloc(bmax * sizeof *counts);
    g_edge *e = malloc(bmax * (size_t)g->M * sizeof *e);
    if (!lists || !counts || !e) {
        st = RA_ENOMEM;
        goto fail;
    }
    size_t linked = 0; /* nodes with edges: what a batch's searches can see */
    for (size_t i = 0; i < g->n; i++)
        linked += g->deg[i] > 0;
    size_t done = 0;
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
        g_ins_ctx c = {.g = g,
                       .keys = keys,
                       .nodes = nodes + done,
                       .lists = lists,
                       .counts = counts,
                       .keep_old = keep_old};
        atomic_init(&c.fail, 0);
        g_parallel(g->threads, bs, 16, g_ins_task, &c);
        if (atomic_load(&c.fail)) {
            st = RA_ENOMEM;
            goto fail;
        }
        size_t ne = 0;
        for (size_t i = 0; i < bs; i++) {
            int32_t u = nodes[done + i];
            int32_t *row = g_adj(g, u);
            memcpy(row, lists + i * (size_t)g->M, (size_t)counts[i] * sizeof *row);
            g->deg[u] = (uint8_t)counts[i];
            for (int j = 0; j < counts[i]; j++)
                e[ne++] = (g_edge){.to = row[j], .from = u};
        }
        st = g_apply_edges(g, keys, e, ne);
        if (st)
            goto fail;
        done += bs;
    }
fail:
    free(lists);
    free(counts);
    free(e);
    return st;
}

/* ------------------------------------------------------------------------ */
/* connectivity: BFS from the entries; unreached nodes are inserted again (their
 * reverse edges come from reached nodes), and a node still unreached after that gets
 * a forced edge from the best reached node the search found. Bounded rounds. */

static ra_status g_connect(ra_graph *g, const void *keys)
{
    ra_status st = RA_OK;
    size_t n = g->n;
    uint8_t *seen = NULL;
    int32_t *queue = NULL, *miss = NULL;
    if (n == 0)
        return RA_OK;
    seen = malloc(n);
    queue = malloc(n * sizeof *queue);
    miss = malloc(n * sizeof *miss);
    if (!seen || !queue || !miss) {
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
        while (qh < qt) {
            int32_t u = queue[qh++];
            const int32_t *row = g_adj(g, u);
            for (int j = 0; j < g->deg[u]; j++)
                if (!seen[row[j]]) {
                    seen[row[j]] = 1;
                    queue[qt++] = row[j];
                }
        }
        size_t nm = 0;
        for (size_t i = 0; i < n; i++)
            if (!seen[i])
                miss[nm++] = (int32_t)i;
        if (!nm)
            break;
        RA_DEBUG("graph: connectivity round %d: %zu of %zu unreached", round, nm, n);
        if (round < 4) {
            st = g_insert_nodes(g, keys, miss, nm, 1);
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
    return st;
}

/* ------------------------------------------------------------------------ */
/* build */

/* Slots of a row kept for projection edges (unpruned, most frequent co-answers);
 * 0 = none: projection edges are pruned like the others. Protecting them was
 * measured worse (recall@100 0.71 vs 0.73 at M=48), so the default is 0. */
static int g_proj_slots(int M)
{
    return G_PROJ_PCT * M / 100;
}

typedef struct g_proj_ctx {
    ra_graph *g;
    const void *keys;
    const size_t *off; /* candidates of node u: cand[off[u] .. off[u] + kept[u]) */
    const int32_t *kept;
    const int32_t *cand;
    int mp; /* protected slots per node */
    atomic_int fail;
} g_proj_ctx;

static void g_proj_task(void *arg, size_t b, size_t e)
{
    g_proj_ctx *c = arg;
    ra_graph *g = c->g;
    size_t maxc = 0;
    for (size_t u = b; u < e; u++)
        if ((size_t)c->kept[u] > maxc)
            maxc = (size_t)c->kept[u];
    g_nb *tmp = malloc((maxc + 1) * sizeof *tmp);
    g_tls *t = g_tls_get(0, 1, 1024, g->dim);
    if (!tmp || !t) {
        atomic_store(&c->fail, 1);
        free(tmp);
        return;
    }
    for (size_t u = b; u < e; u++) {
        size_t s = c->off[u], n = (size_t)c->kept[u];
        if (!n)
            continue;
        int32_t *row = g_adj(g, u);
        /* the most frequent co-answers, in order: occlusion by key distance would
         * drop exactly the far-apart keys one query scores high together */
        int mp = c->mp;
        if (mp == 0) { /* unprotected: occlusion-pruned like every other edge */
            int k = g_link_list(g, c->keys, (int32_t)u, c->cand + s, (int)n, g->M, tmp, row, t);
            g->deg[u] = (uint8_t)k;
            continue;
        }
        int k = (int)n < mp ? (int)n : mp;
        memcpy(row, c->cand + s, (size_t)k * sizeof *row);
        g->deg[u] = (uint8_t)k;
        g->pdeg[u] = (uint8_t)k;
    }
    free(tmp);
}

typedef struct g_cnt {
    int32_t cnt, id;
} g_cnt;

static int g_cnt_cmp(const void *a, const void *b)
{
    const g_cnt *x = a, *y = b;
    if (x->cnt != y->cnt)
        return (x->cnt < y->cnt) - (x->cnt > y->cnt);
    return (x->id > y->id) - (x->id < y->id);
}

static int g_i32_cmp(const void *a, const void *b)
{
    int32_t x = *(const int32_t *)a, y = *(const int32_t *)b;
    return (x > y) - (x < y);
}

typedef struct g_dedup_ctx {
    const size_t *off;
    int32_t *pairs;
    int32_t *kept;
    size_t cmax;
    atomic_int fail;
} g_dedup_ctx;

/* Per node: distinct candidates with their counts, the cmax most frequent first,
 * written back to the front of the node's own range. */
static void g_dedup_task(void *arg, size_t b, size_t end)
{
    g_dedup_ctx *c = arg;
    g_cnt *tmp = NULL;
    size_t cap = 0;
    for (size_t u = b; u < end; u++) {
        size_t s = c->off[u], e = c->off[u + 1];
        int32_t *p = c->pairs;
        if (e - s > 1)
            qsort(p + s, e - s, sizeof *p, g_i32_cmp);
        if (e - s > cap) {
            g_cnt *nt = realloc(tmp, (e - s) * sizeof *nt);
            if (!nt) {
                atomic_store(&c->fail, 1);
                break;
            }
            tmp = nt;
            cap = e - s;
        }
        size_t m = 0;
        for (size_t i = s; i < e; i++) {
            if (m && tmp[m - 1].id == p[i])
                tmp[m - 1].cnt++;
            else
                tmp[m++] = (g_cnt){.cnt = 1, .id = p[i]};
        }
        if (m > 1)
            qsort(tmp, m, sizeof *tmp, g_cnt_cmp);
        if (m > c->cmax)
            m = c->cmax;
        for (size_t i = 0; i < m; i++)
            p[s + i] = tmp[i].id;
        c->kept[u] = (int32_t)m;
    }
    free(tmp);
}

/* The candidate lists of the projection, CSR by node: for every training query's
 * exact top-K list, each key gets the keys within G_WINDOW ranks of it and the
 * query's best key; the best key (the query's pivot) gets the whole list. Per node,
 * at most cmax distinct candidates, the most frequent co-answers first. */
static ra_status g_project(ra_graph *g, const void *keys, const int32_t *knn, size_t nq, int K,
                           int32_t *occ)
{
    ra_status st = RA_OK;
    size_t n = g->n;
    size_t *off = calloc(n + 1, sizeof *off);
    size_t *fill = NULL;
    int32_t *pairs = NULL, *kept = NULL;
    uint16_t *taken = calloc(n ? n : 1, sizeof *taken);
    if (!off || !taken) {
        free(off);
        free(taken);
        return RA_ENOMEM;
    }
    /* pass 1 counts, pass 2 fills */
    for (int pass = 0; pass < 2; pass++) {
        memset(taken, 0, (n ? n : 1) * sizeof *taken);
        for (size_t qi = 0; qi < nq; qi++) {
            const int32_t *l = knn + qi * (size_t)K;
            int len = 0;
            while (len < K && l[len] >= 0)
                len++;
            for (int r = 0; r < len; r++) {
                int32_t u = l[r];
                if (pass == 0 && occ)
                    occ[u]++;
                if (taken[u] >= G_PROJ_LISTS)
                    continue;
                taken[u]++;
                int lo = r == 0 ? 1 : (r - G_WINDOW < 0 ? 0 : r - G_WINDOW);
                int hi = r == 0 ? len - 1 : (r + G_WINDOW >= len ? len - 1 : r + G_WINDOW);
                /* the pivot l[0] as one extra candidate when the window misses it */
                int extra = r > 0 && lo > 0;
                for (int j = lo; j <= hi + extra; j++) {
                    int32_t v = j > hi ? l[0] : l[j];
                    if (v == u)
                        continue;
                    if (pass == 0)
                        off[u + 1]++;
                    else
                        pairs[fill[u]++] = v;
                }
            }
        }
        if (pass == 0) {
            for (size_t i = 0; i < n; i++)
                off[i + 1] += off[i];
            pairs = malloc((off[n] ? off[n] : 1) * sizeof *pairs);
            fill = malloc(n * sizeof *fill);
            if (!pairs || !fill) {
                st = RA_ENOMEM;
                goto fail;
            }
            memcpy(fill, off, n * sizeof *fill);
        }
    }
    /* dedup per node with counts; keep the cmax most frequent (in parallel, in place) */
    kept = malloc((n ? n : 1) * sizeof *kept);
    if (!kept) {
        st = RA_ENOMEM;
        goto fail;
    }
    {
        g_dedup_ctx dc = {.off = off, .pairs = pairs, .kept = kept, .cmax = (size_t)g->M * 4};
        atomic_init(&dc.fail, 0);
        g_parallel(g->threads, n, 256, g_dedup_task, &dc);
        if (atomic_load(&dc.fail)) {
            st = RA_ENOMEM;
            goto fail;
        }
    }
    g_proj_ctx c = {
        .g = g, .keys = keys, .off = off, .kept = kept, .cand = pairs, .mp = g_proj_slots(g->M)};
    atomic_init(&c.fail, 0);
    g_parallel(g->threads, n, 256, g_proj_task, &c);
    if (atomic_load(&c.fail)) {
        st = RA_ENOMEM;
        goto fail;
    }
    if (c.mp == 0) { /* reverse edges of the pruned projection */
        size_t ne = 0;
        for (size_t u = 0; u < n; u++)
            ne += g->deg[u];
        g_edge *e = malloc((ne ? ne : 1) * sizeof *e);
        if (!e) {
            st = RA_ENOMEM;
            goto fail;
        }
        size_t k = 0;
        for (size_t u = 0; u < n; u++)
            for (int j = 0; j < g->deg[u]; j++)
                e[k++] = (g_edge){.to = g_adj(g, u)[j], .from = (int32_t)u};
        st = g_apply_edges(g, keys, e, k);
        free(e);
    }
fail:
    free(off);
    free(fill);
    free(pairs);
    free(kept);
    free(taken);
    return st;
}

/* Picks training queries: half the budget from the last positions (closest to the
 * decode steps that follow), the rest on a stride over the earlier ones, offset by
 * the seed. Returns the count written to idx. */
static size_t g_sample_queries(size_t nq, size_t want, uint64_t seed, size_t *idx)
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

/* Fits the search code to rows [0, n) and encodes them (with their norms). */
static ra_status g_fit_codes(ra_graph *g, const void *keys, size_t n)
{
    ra_codebook cb;
    ra_status st = ra_codebook_train(&cb, keys, g->dtype, g->dim, n);
    if (st)
        return st;
    ra_codebook_fini(&g->cb);
    g->cb = cb;
    g->cb_n = n;
    g_norm_ctx c = {.g = g, .keys = keys};
    g_parallel(g->threads, n, 4096, g_norm_task, &c);
    return RA_OK;
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
    g_cnt *rank = NULL;
    if (!state || !kv)
        return RA_EINVAL;
    if (n > ra_kv_count(kv) || n > (size_t)INT32_MAX - 1)
        return RA_EINVAL;
    if (nq && !train_q)
        return RA_EINVAL;
    int K, M, ef, ent, ntrain, threads;
    uint64_t seed;
    st = g_opts(opts, &K, &M, &ef, &ent, &ntrain, &threads, &seed);
    if (st) {
        RA_ERROR("graph: options out of range");
        return st;
    }
    int dim = ra_kv_dim(kv);
    ra_dtype dt = ra_kv_dtype(kv);
    if (dim <= 0 || ra_dtype_size(dt) == 0)
        return RA_EINVAL;
    if (nq && !ra_kern_all_finite(train_q, RA_DTYPE_F32, nq * (size_t)dim)) {
        RA_ERROR("graph: training queries contain NaN or Inf");
        return RA_ENONFINITE;
    }
    g = calloc(1, sizeof *g);
    if (!g)
        return RA_ENOMEM;
    g->dim = dim;
    g->dtype = dt;
    g->row_bytes = (size_t)dim * ra_dtype_size(dt);
    g->M = M;
    g->ef_build = ef;
    g->threads = g_threads(threads);
    g->seed = seed;
    g->cancel = opts ? opts->cancel : NULL; /* cleared when the build returns */
    g->l_mult = 1.0f;
    g->rec_bytes = (((size_t)((dim + 63) & ~63) + (size_t)M * sizeof(int32_t)) + 63) & ~(size_t)63;
    if ((st = g_reserve(g, n > 0 ? n : 1)))
        goto fail;
    g->n = n;
    const void *keys = ra_kv_keys(kv);
    double t0 = ra_now_s();
    if ((st = g_fit_codes(g, keys, n)))
        goto fail;
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
        else
            st = ra_exact_knn_batch(kv, n, sq, ns, Kk, knn, knn_s);
        if (st) {
            RA_ERROR("graph: exact top-%d of %zu training queries failed: %s", Kk, ns,
                     ra_strerror(st));
            goto fail;
        }
        for (size_t i = 0; i < ns * (size_t)Kk; i++) /* never trust an index from outside */
            if (knn[i] >= (int32_t)n)
                knn[i] = -1;
        double t1 = ra_now_s();
        if (g_cancelled(g)) {
            st = RA_ECLOSED;
            goto fail;
        }
        /* hold out the most recent training queries (the last rows of the sample, a
         * block of consecutive positions, as decode queries follow the prefill) for the
         * calibration of the search effort: the graph never sees their lists */
        n_hold = ns >= 2048 && Kk >= 10 ? 128 : 0;
        ns -= n_hold;
        st = g_project(g, keys, knn, ns, Kk, occ);
        if (st)
            goto fail;
        RA_DEBUG("graph: knn+projection %.2fs (knn %.2fs)", ra_now_s() - t0, t1 - t0);
    }
    /* entry points: the keys most often in a training query's top-K (heavy hitters,
     * which many queries score high), then evenly spaced keys for the rest */
    {
        int ne = (size_t)ent > n ? (int)n : ent;
        if (ne < 1)
            ne = 1;
        g->entries = malloc((size_t)ne * sizeof *g->entries);
        rank = malloc((n ? n : 1) * sizeof *rank);
        if (!g->entries || !rank) {
            st = RA_ENOMEM;
            goto fail;
        }
        int k = 0;
        if (n > 0) {
            size_t m = 0;
            for (size_t i = 0; i < n; i++)
                if (occ[i] > 0)
                    rank[m++] = (g_cnt){.cnt = occ[i], .id = (int32_t)i};
            qsort(rank, m, sizeof *rank, g_cnt_cmp);
            int hh = ns ? (ne + 1) / 2 : 0;
            for (size_t i = 0; i < m && k < hh; i++)
                g->entries[k++] = rank[i].id;
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
    /* routing queries: evenly spaced over the sample, which is half tail, half stride */
    if (ns > 0) {
        int nr = ns < G_ROUTE_MAX ? (int)ns : G_ROUTE_MAX;
        int Kk = knn_w;
        g->route_q = malloc((size_t)nr * dim * sizeof *g->route_q);
        g->route_ids = malloc((size_t)nr * G_ROUTE_KEYS * sizeof *g->route_ids);
        if (!g->route_q || !g->route_ids) {
            st = RA_ENOMEM;
            goto fail;
        }
        for (int r = 0; r < nr; r++) {
            size_t qi = (size_t)r * ns / (size_t)nr;
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
    }
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
        double t2 = ra_now_s();
        st = g_insert_nodes(g, keys, miss, nm, 1);
        if (st)
            goto fail;
        RA_DEBUG("graph: key->key linking %.2fs", ra_now_s() - t2);
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
    RA_DEBUG("graph: built %zu keys from %zu queries in %.2fs", n, ns, ra_now_s() - t0);
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
    st = g_insert_nodes(g, keys, nodes, n, 0);
    g->light_rev = 0;
    free(nodes);
    return st;
}

/* Seeds from the routing queries most similar (cosine) to q: their best keys. Cost:
 * n_route fp32 dot products, no key is read. Returns the count written. */
