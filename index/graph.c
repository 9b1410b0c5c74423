/* The attention-aware graph index (ra_backend_graph): a proximity graph over one
 * head's keys whose edges are shaped by real queries, after RetrievalAttention and
 * RoarGraph. Decode queries are out of distribution for the keys, so a graph built
 * from keys alone (HNSW) or clusters of keys (IVF) leads a query to the wrong places;
 * here the exact top-K keys of sampled prefill queries are projected onto the keys
 * (keys that answer the same query become neighbours), pruned with an occlusion rule,
 * completed with reverse edges and made reachable from the entry points by inserting
 * the keys no query covered (key->key search, which is in distribution).
 *
 * Layout: fixed M int32 slots per node (-1 = empty) plus a degree byte array, and the
 * squared norm of every key (L2 search during insertion is an inner-product search
 * with a -|k|^2/2 bias). Searches are concurrent and lock-free: the visited set is a
 * per-thread generation-stamped array, so no per-query clearing of N entries. All
 * mutations (build, add) are exclusive (ra_head holds the lock); they run in batches
 * whose searches see a frozen graph and whose edge updates are grouped per target
 * node, so the result depends on the seed and the data, never on thread scheduling. */
#include <errno.h>
#include <math.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "ra_backend.h"
#include "ra_kernels.h"
#include "ra_log.h"

/* ---- defaults and bounds (zero / out-of-range options fall back here) ---- */
#define G_DEF_KNN 100
#define G_DEF_DEGREE 48   /* 131K synthetic: recall 0.956 at 9.6 % scans vs 0.93 at 9.2 % with 32 */
#define G_DEF_BUILD_EF 128
#define G_DEF_ENTRIES 16
#define G_DEF_NTRAIN 4096
#define G_MAX_KNN 1024
#define G_MAX_DEGREE 255 /* the degree array is one byte per node */
#define G_MAX_EF 4096
#define G_MAX_ENTRIES 1024
#define G_MAX_NTRAIN 1000000
#define G_MAX_K 65536    /* top-k bound for one search */
#define G_MAX_THREADS 256
#define G_WINDOW 32      /* rank window: keys within +-32 ranks of one query's list (131K synthetic,
                          * K 100: recall 0.954 at 6.2 % scans vs 0.941 at 6.1 % with +-2, K 32) */
#define G_PROJ_PCT 0
#define G_PROJ_LISTS 32  /* a key takes projection candidates from its first 32 lists only:
                          * bounds the pairs at n * 32 * 65 (small heads with many training
                          * queries put one key in hundreds of lists) */
#define G_ROUTE_MAX 256  /* training queries kept for routing */
#define G_ROUTE_KEYS 8   /* best keys kept per routing query */
#define G_ROUTE_TOP 4    /* routing queries used per search */
#define G_LINK_L2 0      /* 1: link by L2 (measured far worse for MIPS: 0.16 vs 0.60 recall) */
#define G_ALPHA2 1.44f   /* occlusion slack (alpha = 1.2, on squared distances) */

/* Key->key metric for linking: inner product (default) or L2. With IP a key's
 * neighbours are the keys most extreme along its own direction, which is where a
 * query that scores this key high finds its other top keys; L2 neighbours of an
 * extreme key are interior ones. */
static int g_use_l2(void) { return G_LINK_L2; }


typedef struct g_cand {
    float s;    /* score: larger is better (IP, or -d2/2 + const in L2 mode) */
    int32_t id;
    int32_t done; /* expanded */
} g_cand;

typedef struct ra_graph {
    int dim;
    ra_dtype dtype;
    size_t row_bytes;
    int M;
    int ef_build;
    int threads;
    uint64_t seed;
    size_t n;   /* nodes linked */
    size_t cap; /* slots allocated */
    int32_t *adj;  /* [cap][M] */
    uint8_t *deg;  /* [cap] */
    uint8_t *pdeg; /* [cap] protected prefix: edges from the query projection */
    float *norm2;  /* [cap] |k|^2 */
    int32_t *entries;
    int n_entries;
    /* routing: a few training queries (fp32, unit norm) and their best keys; a search
     * starts also from the best keys of the training queries nearest to it */
    float *route_q;      /* [n_route][dim] */
    int32_t *route_ids;  /* [n_route][G_ROUTE_KEYS] (-1 padded) */
    int n_route;
} ra_graph;

/* ------------------------------------------------------------------------ */
/* per-thread scratch: visited stamps, candidate pool, gather buffers */

typedef struct g_tls {
    uint32_t *stamp;
    size_t stamp_cap;
    uint32_t gen;
    g_cand *pool;
    int pool_cap;
    int32_t *buf;
    float *sc;
    int buf_cap;
    float *qf; /* fp32 copy of a key used as a query / in pruning */
    float *cf;
    int qf_cap;
} g_tls;

static pthread_key_t g_tls_key;
static pthread_once_t g_tls_once = PTHREAD_ONCE_INIT;
static int g_tls_ok;

static void g_tls_free(void *p)
{
    g_tls *t = p;
    if (!t)
        return;
    free(t->stamp);
    free(t->pool);
    free(t->buf);
    free(t->sc);
    free(t->qf);
    free(t->cf);
    free(t);
}

static void g_tls_init_once(void) { g_tls_ok = pthread_key_create(&g_tls_key, g_tls_free) == 0; }

/* The calling thread's scratch, grown to hold n stamps, a pool of L, gathers of nb
 * and vectors of dim. NULL on allocation failure. */
static g_tls *g_tls_get(size_t n, int L, int nb, int dim)
{
    pthread_once(&g_tls_once, g_tls_init_once);
    if (!g_tls_ok)
        return NULL;
    g_tls *t = pthread_getspecific(g_tls_key);
    if (!t) {
        t = calloc(1, sizeof *t);
        if (!t || pthread_setspecific(g_tls_key, t) != 0) {
            free(t);
            return NULL;
        }
    }
    if (t->stamp_cap < n) {
        size_t c = n + n / 4 + 1024;
        uint32_t *s = calloc(c, sizeof *s); /* fresh zeros: every stamp is stale */
        if (!s)
            return NULL;
        free(t->stamp);
        t->stamp = s;
        t->stamp_cap = c;
        t->gen = 0;
    }
    if (t->pool_cap < L + 1) {
        g_cand *p = realloc(t->pool, (size_t)(L + 1) * sizeof *p);
        if (!p)
            return NULL;
        t->pool = p;
        t->pool_cap = L + 1;
    }
    if (t->buf_cap < nb) {
        int32_t *b = realloc(t->buf, (size_t)nb * sizeof *b);
        if (!b)
            return NULL;
        t->buf = b;
        float *s = realloc(t->sc, (size_t)nb * sizeof *s);
        if (!s)
            return NULL;
        t->sc = s;
        t->buf_cap = nb;
    }
    if (t->qf_cap < dim) {
        float *a = realloc(t->qf, (size_t)dim * sizeof *a);
        if (!a)
            return NULL;
        t->qf = a;
        float *b = realloc(t->cf, (size_t)dim * sizeof *b);
        if (!b)
            return NULL;
        t->cf = b;
        t->qf_cap = dim;
    }
    return t;
}

/* A new visit generation; on wrap-around the stamps are cleared once. */
static uint32_t g_tls_next_gen(g_tls *t)
{
    if (++t->gen == 0) {
        memset(t->stamp, 0, t->stamp_cap * sizeof *t->stamp);
        t->gen = 1;
    }
    return t->gen;
}

/* ------------------------------------------------------------------------ */
/* a small deterministic parallel-for: items are independent, so the dynamic
 * chunking changes only who computes an item, never its result */

typedef void (*g_task_fn)(void *ctx, size_t begin, size_t end);

typedef struct g_par {
    g_task_fn fn;
    void *ctx;
    size_t n, chunk;
    atomic_size_t next;
} g_par;

static void *g_par_worker(void *arg)
{
    g_par *p = arg;
    for (;;) {
        size_t b = atomic_fetch_add(&p->next, p->chunk);
        if (b >= p->n)
            break;
        size_t e = b + p->chunk < p->n ? b + p->chunk : p->n;
        p->fn(p->ctx, b, e);
    }
    return NULL;
}

static void g_parallel(int threads, size_t n, size_t chunk, g_task_fn fn, void *ctx)
{
    if (n == 0)
        return;
    g_par p = {.fn = fn, .ctx = ctx, .n = n, .chunk = chunk ? chunk : 1};
    atomic_init(&p.next, 0);
    size_t want = (n + p.chunk - 1) / p.chunk;
    int t = threads;
    if ((size_t)t > want)
        t = (int)want;
    pthread_t tid[G_MAX_THREADS];
    int started = 0;
    for (int i = 1; i < t; i++) {
        if (pthread_create(&tid[started], NULL, g_par_worker, &p) != 0)
            break; /* fewer threads: the caller's thread does the rest */
        started++;
    }
    g_par_worker(&p);
    for (int i = 0; i < started; i++)
        pthread_join(tid[i], NULL);
}

static int g_threads(int want)
{
    if (want > 0)
        return want > G_MAX_THREADS ? G_MAX_THREADS : want;
    long c = sysconf(_SC_NPROCESSORS_ONLN);
    if (c < 1)
        c = 1;
    return c > G_MAX_THREADS ? G_MAX_THREADS : (int)c;
}

/* ------------------------------------------------------------------------ */
/* best-first search */

static inline const void *g_row(const ra_graph *g, const void *keys, int32_t id)
{
    return (const char *)keys + (size_t)id * g->row_bytes;
}

static inline int g_better(float sa, int32_t ia, float sb, int32_t ib)
{
    return sa > sb || (sa == sb && ia < ib); /* ties by id: deterministic */
}

/* Inserts c into the pool sorted best first (size *np <= L). Returns its position,
 * or L when it did not make it. */
static int g_pool_insert(g_cand *pool, int *np, int L, float s, int32_t id)
{
    int n = *np;
    if (n == L && !g_better(s, id, pool[n - 1].s, pool[n - 1].id))
        return L;
    int lo = 0, hi = n;
    while (lo < hi) {
        int mid = (lo + hi) >> 1;
        if (g_better(pool[mid].s, pool[mid].id, s, id))
            lo = mid + 1;
        else
            hi = mid;
    }
    int move = (n == L ? n - 1 : n) - lo;
    if (move > 0)
        memmove(&pool[lo + 1], &pool[lo], (size_t)move * sizeof *pool);
    pool[lo].s = s;
    pool[lo].id = id;
    pool[lo].done = 0;
    if (n < L)
        *np = n + 1;
    return lo;
}

/* Scores a batch of ids against q: IP, minus |k|^2/2 in L2 mode. */
static void g_score(const ra_graph *g, const void *keys, const float *q, int l2, const int32_t *ids,
                    int n, float *out)
{
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
                g_score(g, keys, q, l2, t->buf, nb, t->sc);
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
        g_score(g, keys, q, l2, t->buf, nb, t->sc);
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
        const int32_t *nbr = g->adj + (size_t)u * g->M;
        int d = g->deg[u];
        /* prefetch the next candidate's adjacency while this one is scored */
        for (int j = k + 1; j < np; j++)
            if (!pool[j].done) {
                __builtin_prefetch(g->adj + (size_t)pool[j].id * g->M);
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
        g_score(g, keys, q, l2, t->buf, nb, t->sc);
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
    int32_t *a = realloc(g->adj, c * (size_t)g->M * sizeof *a);
    if (!a)
        return RA_ENOMEM;
    g->adj = a;
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

static void g_norm_task(void *arg, size_t b, size_t e)
{
    g_norm_ctx *c = arg;
    const ra_graph *g = c->g;
    float *f = malloc((size_t)g->dim * sizeof *f);
    for (size_t i = b; i < e; i++) {
        const void *r = g_row(g, c->keys, (int32_t)i);
        if (f) {
            ra_kern_to_f32(r, g->dtype, (size_t)g->dim, f);
            c->g->norm2[i] = ra_kern_dot(f, r, g->dtype, g->dim);
        } else {
            c->g->norm2[i] = 0.0f;
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
        int32_t *row = g->adj + (size_t)v * M;
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
    int keep_old;         /* merge the node's current out-list into its candidates */
    atomic_int fail;
} g_ins_ctx;

static void g_ins_task(void *arg, size_t b, size_t e)
{
    g_ins_ctx *c = arg;
    ra_graph *g = c->g;
    int L = g->ef_build;
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
        int np = g_search(g, c->keys, q, g_use_l2(), L, NULL, 0, NULL, 0, u, t, NULL, NULL);
        int n = 0;
        for (int j = 0; j < np; j++)
            if (t->pool[j].id != u)
                ids[n++] = t->pool[j].id;
        int pd = g->pdeg[u];
        if (c->keep_old)
            for (int j = pd; j < g->deg[u]; j++)
                ids[n++] = g->adj[(size_t)u * M + j];
        /* the protected prefix is kept; the search results fill the rest */
        int32_t *out = c->lists + i * (size_t)M;
        memcpy(out, g->adj + (size_t)u * M, (size_t)pd * sizeof *out);
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
        g_ins_ctx c = {.g = g, .keys = keys, .nodes = nodes + done, .lists = lists,
                       .counts = counts, .keep_old = keep_old};
        atomic_init(&c.fail, 0);
        g_parallel(g->threads, bs, 16, g_ins_task, &c);
        if (atomic_load(&c.fail)) {
            st = RA_ENOMEM;
            goto fail;
        }
        size_t ne = 0;
        for (size_t i = 0; i < bs; i++) {
            int32_t u = nodes[done + i];
            int32_t *row = g->adj + (size_t)u * g->M;
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
    for (int round = 0; round < 8; round++) {
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
            const int32_t *row = g->adj + (size_t)u * g->M;
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
            int32_t *row = g->adj + (size_t)par * g->M;
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
static int g_proj_slots(int M) { return G_PROJ_PCT * M / 100; }

typedef struct g_proj_ctx {
    ra_graph *g;
    const void *keys;
    const size_t *off;   /* candidates of node u: cand[off[u] .. off[u] + kept[u]) */
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
        int32_t *row = g->adj + u * (size_t)g->M;
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
    g_proj_ctx c = {.g = g, .keys = keys, .off = off, .kept = kept, .cand = pairs,
                    .mp = g_proj_slots(g->M)};
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
                e[k++] = (g_edge){.to = g->adj[u * (size_t)g->M + j], .from = (int32_t)u};
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

/* Bounds and defaults from the option table (index/opts.c), so that the daemon and
 * ra_head accept exactly what a build accepts; the two caps guard this file's arrays. */
static ra_status g_opts(const ra_index_opts *o, int *K, int *M, int *ef, int *ent, int *ntrain,
                        int *threads, uint64_t *seed)
{
    ra_index_opts f;
    if (o && ra_index_opts_check(o, NULL, 0) != RA_OK)
        return RA_EINVAL;
    if (o)
        f = *o;
    else
        memset(&f, 0, sizeof f);
    *threads = f.threads; /* before the fill: 0 stays "every core" */
    *seed = f.seed;
    ra_index_opts_fill(&f);
    *K = f.graph_knn;
    *M = f.graph_degree;
    *ef = f.graph_build_ef;
    *ent = f.graph_entries;
    *ntrain = f.n_train;
    if (*M > G_MAX_DEGREE || *threads > G_MAX_THREADS)
        return RA_EINVAL;
    return RA_OK;
}

static void graph_destroy(void *state)
{
    ra_graph *g = state;
    if (!g)
        return;
    free(g->adj);
    free(g->deg);
    free(g->pdeg);
    free(g->norm2);
    free(g->entries);
    free(g->route_q);
    free(g->route_ids);
    free(g);
}

/* lists: NULL, or precomputed exact top-lists_k row ids of every training query
 * ([nq][lists_k], -1 pads): then the kNN step is skipped. */
static ra_status graph_build_from(void **state, const ra_kv *kv, size_t n, const float *train_q,
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
    if ((st = g_reserve(g, n > 0 ? n : 1)))
        goto fail;
    g->n = n;
    const void *keys = ra_kv_keys(kv);
    double t0 = ra_now_s();
    {
        g_norm_ctx c = {.g = g, .keys = keys};
        g_parallel(g->threads, n, 4096, g_norm_task, &c);
    }
    occ = calloc(n ? n : 1, sizeof *occ);
    if (!occ) {
        st = RA_ENOMEM;
        goto fail;
    }
    size_t ns = 0;
    int knn_w = 0; /* width of the knn rows */
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
        if (st)
            goto fail;
    }
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
    graph_destroy(g);
    return st;
}

static ra_status graph_add(void *state, const ra_kv *kv, size_t first, size_t n)
{
    ra_graph *g = state;
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
            ra_kern_to_f32(r, g->dtype, (size_t)g->dim, tmp);
            g->norm2[i] = ra_kern_dot(tmp, r, g->dtype, g->dim);
            g->deg[i] = g->pdeg[i] = 0;
        }
        free(tmp);
        g->n = first + n;
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
    st = g_insert_nodes(g, keys, nodes, n, 0);
    free(nodes);
    return st;
}

/* Seeds from the routing queries most similar (cosine) to q: their best keys. Cost:
 * n_route fp32 dot products, no key is read. Returns the count written. */
static int g_route(const ra_graph *g, const float *q, int32_t *out)
{
    if (!g->n_route)
        return 0;
    float sc[G_ROUTE_MAX];
    ra_kern_dot_range(q, g->route_q, RA_DTYPE_F32, g->dim, 0, (size_t)g->n_route, sc);
    int best[G_ROUTE_TOP];
    int nb = 0;
    for (int r = 0; r < g->n_route; r++) { /* tiny top-T by insertion */
        int pos = nb;
        while (pos > 0 && sc[best[pos - 1]] < sc[r])
            pos--;
        if (pos >= G_ROUTE_TOP)
            continue;
        int last = nb < G_ROUTE_TOP ? nb : G_ROUTE_TOP - 1;
        for (int j = last; j > pos; j--)
            best[j] = best[j - 1];
        best[pos] = r;
        if (nb < G_ROUTE_TOP)
            nb++;
    }
    int n = 0;
    for (int i = 0; i < nb; i++)
        for (int j = 0; j < G_ROUTE_KEYS; j++) {
            int32_t id = g->route_ids[(size_t)best[i] * G_ROUTE_KEYS + j];
            if (id >= 0 && (size_t)id < g->n)
                out[n++] = id;
        }
    return n;
}

static ra_status graph_search(void *state, const ra_kv *kv, const float *q, const ra_search_params *p,
                              int32_t *ids, float *scores, int *n_out, ra_search_stats *st)
{
    ra_graph *g = state;
    if (!g || !kv || !q || !p || !ids || !n_out || p->k <= 0 || p->k > G_MAX_K ||
        p->effort < 0 || p->effort > G_MAX_EF * 16 || p->n_warm < 0 ||
        (p->n_warm > 0 && !p->warm) || ra_kv_dim(kv) != g->dim || ra_kv_count(kv) < g->n)
        return RA_EINVAL;
    if (!ra_kern_all_finite(q, RA_DTYPE_F32, (size_t)g->dim))
        return RA_ENONFINITE;

    int k = p->k;
    /* default candidate list: 2 k, at least 64 (small k needs room to navigate). On the
     * trained model at 15360/1024, k 500: recall 0.959 at 2 k vs 0.940 at 1.5 k for +2 %
     * time per token (bench/README.md, Fidelity) */
    int L = p->effort > 0 ? p->effort : (2 * k > 64 ? 2 * k : 64);
    if (L < k)
        L = k;
    int n_warm = p->n_warm > G_MAX_K ? G_MAX_K : p->n_warm;
    uint64_t scanned = 0, hops = 0;
    int got = 0;
    if (g->n > 0) {
        int nb = g->M > g->n_entries ? g->M : g->n_entries;
        if (nb < 256)
            nb = 256;
        g_tls *t = g_tls_get(g->n, L, nb, g->dim);
        if (!t)
            return RA_ENOMEM;
        int32_t route[G_ROUTE_TOP * G_ROUTE_KEYS];
        int nr = g_route(g, q, route);
        int np = g_search(g, ra_kv_keys(kv), q, 0, L, p->warm, n_warm, route, nr, -1, t, &scanned,
                          &hops);
        got = np < k ? np : k;
        for (int i = 0; i < got; i++) {
            ids[i] = t->pool[i].id;
            if (scores)
                scores[i] = t->pool[i].s;
        }
    }
    *n_out = got;
    if (st) {
        st->scanned = scanned;
        st->hops = hops;
        st->exact_fallback = 0;
    }
    return RA_OK;
}

static size_t graph_bytes(void *state)
{
    ra_graph *g = state;
    if (!g)
        return 0;
    return sizeof *g + g->cap * ((size_t)g->M * sizeof(int32_t) + 2 + sizeof(float)) +
           (size_t)g->n_entries * sizeof(int32_t);
}

static ra_status graph_build(void **state, const ra_kv *kv, size_t n, const float *train_q,
                             size_t nq, const ra_index_opts *opts)
{
    return graph_build_from(state, kv, n, train_q, nq, NULL, 0, opts);
}

static ra_status graph_build_lists(void **state, const ra_kv *kv, size_t n, const float *train_q,
                                   size_t nq, const int32_t *lists, int K,
                                   const ra_index_opts *opts)
{
    if (!lists || K < 1)
        return RA_EINVAL;
    return graph_build_from(state, kv, n, train_q, nq, lists, K, opts);
}

const ra_backend_ops ra_backend_graph = {
    .name = "graph",
    .build = graph_build,
    .build_lists = graph_build_lists,
    .add = graph_add,
    .search = graph_search,
    .bytes = graph_bytes,
    .destroy = graph_destroy,
};
