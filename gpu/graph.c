/* The front end of the index graph build (ra_gpu_graph_build, gpu.h): argument checks,
 * defaults, the backend's rows (steps 1-4), then the two O(n M) host passes that are the
 * same for every backend: the entry points (ratd's rule: the keys most often in a query
 * list, then evenly spaced ones) and the connectivity pass, which makes every key
 * reachable from the entries without ever removing an edge, so the result always
 * passes ra_graph_adj_check or the call fails. */
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#include "ra_env.h"
#include "ra_gpu_internal.h"
#include "ra_log.h"

#define GRAPH_DEF_KNN 100
#define GRAPH_DEF_DEGREE 48
#define GRAPH_DEF_KEY_KNN 64
#define GRAPH_DEF_ENTRIES 16
#define GRAPH_DEF_TILE_ROWS 512 /* a tile's rows: two waves of the top-k kernel on an H200 */
#define GRAPH_DEF_TILE_MIN ((size_t)256 << 20)
#define GRAPH_DEF_TILE_MAX ((size_t)2 << 30)

void ra_gpu_graph_params_init(ra_gpu_graph_params *p)
{
    memset(p, 0, sizeof *p);
}

static int cmp_u64(const void *a, const void *b)
{
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return x < y ? -1 : x > y;
}

/* entries: the most frequent keys of the query lists (count desc, id asc), half of
 * them, then evenly spaced keys offset by the seed (index/graph_build.c's rule) */
static ra_status pick_entries(ra_gpu_cache *c, const int32_t *occ, size_t n, int have_q,
                              unsigned want, uint64_t seed, int32_t *entries, unsigned *n_out)
{
    unsigned ne = want > n ? (unsigned)n : want, k = 0;
    uint64_t *rank = malloc((n ? n : 1) * sizeof *rank);
    if (!rank)
        return ra_gpu_fail(c, RA_ENOMEM, "graph build: entry ranking of %zu keys", n);
    size_t m = 0;
    for (size_t i = 0; i < n; i++)
        if (occ[i] > 0)
            rank[m++] = (uint64_t)(UINT32_MAX - (uint32_t)occ[i]) << 32 | (uint32_t)i;
    qsort(rank, m, sizeof *rank, cmp_u64);
    unsigned hh = have_q ? (ne + 1) / 2 : 0;
    for (size_t i = 0; i < m && k < hh; i++)
        entries[k++] = (int32_t)(uint32_t)rank[i];
    for (unsigned i = 0; k < ne && i < ne * 4; i++) {
        int32_t id = (int32_t)(((uint64_t)i * n + seed % n) / (uint64_t)ne % n);
        int dup = 0;
        for (unsigned j = 0; j < k; j++)
            dup |= entries[j] == id;
        if (!dup)
            entries[k++] = id;
    }
    for (size_t i = 0; k < ne && i < n; i++) { /* few keys: fill with the first free ids */
        int dup = 0;
        for (unsigned j = 0; j < k; j++)
            dup |= entries[j] == (int32_t)i;
        if (!dup)
            entries[k++] = (int32_t)i;
    }
    free(rank);
    *n_out = k;
    return RA_OK;
}

static unsigned row_deg(const int32_t *row, unsigned M)
{
    unsigned d = 0;
    while (d < M && row[d] >= 0)
        d++;
    return d;
}

/* the last slot of row v whose edge is not v's BFS-tree edge (-1: none) */
static int non_tree_slot(const int32_t *adj, const int32_t *parent, int32_t v, unsigned M)
{
    const int32_t *row = adj + (size_t)v * M;
    for (int j = (int)row_deg(row, M) - 1; j >= 0; j--)
        if (parent[row[j]] != v)
            return j;
    return -1;
}

/* BFS from the entries; each unreached key x (in id order) gets an edge from its best
 * reached out-neighbour with a free slot, else from the first reached key in BFS order
 * with one, and the BFS goes on from x. When every reached row is full, an edge that is
 * not in the BFS tree is replaced (the tree spans everything reached, so nothing
 * reached is lost). Reached keys stay reached: one pass, O(n M). */
static ra_status connect(ra_gpu_cache *c, int32_t *adj, size_t n, unsigned M,
                         const int32_t *entries, unsigned ne, size_t *forced)
{
    uint8_t *seen = calloc(n, 1);
    int32_t *queue = malloc(n * sizeof *queue), *parent = malloc(n * sizeof *parent);
    if (!seen || !queue || !parent) {
        free(seen);
        free(queue);
        free(parent);
        return ra_gpu_fail(c, RA_ENOMEM, "graph build: connectivity scratch of %zu keys", n);
    }
    size_t qh = 0, qt = 0, free_scan = 0, tree_scan = 0, added = 0;
    ra_status s = RA_OK;
    for (unsigned i = 0; i < ne; i++)
        if (!seen[entries[i]]) {
            seen[entries[i]] = 1;
            parent[entries[i]] = -1;
            queue[qt++] = entries[i];
        }
    for (size_t x = 0;; x++) {
        while (qh < qt) {
            int32_t u = queue[qh++];
            const int32_t *row = adj + (size_t)u * M;
            for (unsigned j = 0; j < M && row[j] >= 0; j++)
                if (!seen[row[j]]) {
                    seen[row[j]] = 1;
                    parent[row[j]] = u;
                    queue[qt++] = row[j];
                }
        }
        while (x < n && seen[x])
            x++;
        if (x >= n)
            break;
        int32_t par = -1;
        int slot = -1;
        const int32_t *xr = adj + x * M;
        for (unsigned j = 0; j < M && xr[j] >= 0 && par < 0; j++)
            if (seen[xr[j]] && row_deg(adj + (size_t)xr[j] * M, M) < M)
                par = xr[j];
        while (par < 0 && free_scan < qt) { /* degrees only grow: the scan never rewinds */
            int32_t v = queue[free_scan];
            if (row_deg(adj + (size_t)v * M, M) < M)
                par = v;
            else
                free_scan++;
        }
        if (par >= 0) {
            slot = (int)row_deg(adj + (size_t)par * M, M);
        } else { /* every reached row is full: replace an edge outside the BFS tree */
            for (unsigned j = 0; j < M && xr[j] >= 0 && par < 0; j++)
                if (seen[xr[j]] && (slot = non_tree_slot(adj, parent, xr[j], M)) >= 0)
                    par = xr[j];
            while (par < 0 && tree_scan < qt) {
                int32_t v = queue[tree_scan];
                if ((slot = non_tree_slot(adj, parent, v, M)) >= 0)
                    par = v;
                else
                    tree_scan++;
            }
        }
        if (par < 0) { /* not possible with M >= 2: the tree has fewer edges than slots */
            s = ra_gpu_fail(c, RA_EINTERNAL,
                            "graph build: key %zu unreachable and no edge can be replaced", x);
            break;
        }
        adj[(size_t)par * M + slot] = (int32_t)x;
        added++;
        seen[x] = 1;
        parent[x] = par;
        queue[qt++] = (int32_t)x;
    }
    free(seen);
    free(queue);
    free(parent);
    *forced = added;
    return s;
}

/* Argument checks and defaults of one head's build: *p gets the parameters it runs with. */
static ra_status gb_check(ra_gpu_cache *c, ra_gpu_mem mem, ra_dtype dtype, const void *keys,
                          size_t n, const void *queries, size_t nq, unsigned dim,
                          const ra_gpu_graph_params *pp, const int32_t *adj,
                          const int32_t *entries, const unsigned *n_entries_out,
                          ra_gpu_graph_params *p)
{
    if (!c)
        return RA_EINVAL;
    if (c->broken)
        return ra_gpu_fail(c, RA_ESTATE, "cache is broken by an earlier device fault");
    if (mem != RA_GPU_MEM_HOST && mem != RA_GPU_MEM_DEVICE)
        return ra_gpu_fail(c, RA_EINVAL, "unknown memory kind %d", (int)mem);
    if (mem == RA_GPU_MEM_DEVICE && c->backend != RA_GPU_BACKEND_CUDA)
        return ra_gpu_fail(c, RA_ENOTSUP, "device pointers need the CUDA backend");
    if (dtype != RA_DTYPE_F32 && dtype != RA_DTYPE_F16 && dtype != RA_DTYPE_BF16)
        return ra_gpu_fail(c, RA_EINVAL, "graph build: dtype %d", (int)dtype);
    if (!keys || !adj || !entries || !n_entries_out || (nq && !queries))
        return ra_gpu_fail(c, RA_EINVAL, "graph build: NULL keys, queries or outputs");
    if (mem == RA_GPU_MEM_DEVICE && !c->cfg.skip_pointer_check) {
        ra_status s = c->ops->check_dev(c, keys, "keys");
        if (s == RA_OK && nq)
            s = c->ops->check_dev(c, queries, "queries");
        if (s != RA_OK)
            return s;
    }
    if (n == 0 || n > (size_t)INT32_MAX - 1)
        return ra_gpu_fail(c, RA_ESHAPE, "graph build: %zu keys (1..%d)", n, INT32_MAX - 1);
    if (dim == 0 || dim > 1024)
        return ra_gpu_fail(c, RA_ESHAPE, "graph build: dim %u (1..1024)", dim);
    if (pp)
        *p = *pp;
    else
        ra_gpu_graph_params_init(p);
    if (!p->knn)
        p->knn = GRAPH_DEF_KNN;
    if (!p->degree)
        p->degree = GRAPH_DEF_DEGREE;
    if (!p->key_knn)
        p->key_knn = GRAPH_DEF_KEY_KNN;
    if (!p->n_entries)
        p->n_entries = GRAPH_DEF_ENTRIES;
    if (!p->tile_bytes) { /* 512 rows, within 256 MiB..2 GiB */
        size_t b = (size_t)GRAPH_DEF_TILE_ROWS * n * sizeof(float);
        p->tile_bytes = b < GRAPH_DEF_TILE_MIN   ? GRAPH_DEF_TILE_MIN
                        : b > GRAPH_DEF_TILE_MAX ? GRAPH_DEF_TILE_MAX
                                                 : b;
    }
    if (p->knn > 1024 || p->degree < 2 || p->degree > RA_GPU_GRAPH_MAX_DEGREE ||
        p->key_knn > 1023 || p->n_entries > 1024)
        return ra_gpu_fail(c, RA_EINVAL,
                           "graph build: knn %u (1..1024), degree %u (2..255), key_knn %u "
                           "(1..1023), n_entries %u (1..1024)",
                           p->knn, p->degree, p->key_knn, p->n_entries);
    /* a query's list (rank < 2^16) and a key's occurrence index fit 32 bits */
    if (nq > (size_t)INT32_MAX / p->knn)
        return ra_gpu_fail(c, RA_ESHAPE, "graph build: %zu queries x knn %u too many", nq,
                           p->knn);
    if (p->knn > n)
        p->knn = (unsigned)n;
    if (p->key_knn > n - 1)
        p->key_knn = (unsigned)(n - 1);
    return RA_OK;
}

/* Steps 1-4 (the backend): rows into adj, the query-list counts of each key into occ. */
static ra_status gb_rows(ra_gpu_cache *c, ra_gpu_mem mem, ra_dtype dtype, const void *keys,
                         size_t n, const void *queries, size_t nq, unsigned dim,
                         const ra_gpu_graph_params *p, int32_t *adj, int32_t *occ,
                         int32_t *lists, ra_gpu_graph_stats *st)
{
    if (n == 1) { /* nothing to link; every list is the one key */
        for (unsigned j = 0; j < p->degree; j++)
            adj[j] = -1;
        for (size_t i = 0; lists && i < nq; i++)
            lists[i] = 0;
        return RA_OK;
    }
    if (!c->ops->graph_rows)
        return ra_gpu_fail(c, RA_ENOTSUP, "graph build: not in this backend");
    return c->ops->graph_rows(c, mem, dtype, keys, n, queries, nq, dim, p, adj, occ, lists, st);
}

/* Steps 5-6 on the host, after a check of the backend's ids (these steps index by them:
 * a device fault must not become a wild access). c may be NULL (another thread's: then
 * failures are logged only). */
static ra_status gb_finish(ra_gpu_cache *c, const int32_t *occ, size_t n, size_t nq,
                           const ra_gpu_graph_params *p, int32_t *adj, int32_t *entries,
                           unsigned *n_entries_out, ra_gpu_graph_stats *st)
{
    double t1 = ra_now_s();
    for (size_t i = 0; i < n * p->degree; i++)
        if (adj[i] < -1 || adj[i] >= (int32_t)n)
            return ra_gpu_fail(c, RA_EINTERNAL, "graph build: the backend wrote id %d in row %zu",
                               adj[i], i / p->degree);
    ra_status s = pick_entries(c, occ, n, nq > 0, p->n_entries, p->seed, entries, n_entries_out);
    if (s == RA_OK)
        s = connect(c, adj, n, p->degree, entries, *n_entries_out, &st->forced_edges);
    st->connect_s = ra_now_s() - t1;
    st->total_s += st->connect_s;
    return s;
}

/* one head's host steps, on a thread of their own or the caller's */
typedef struct gb_job {
    ra_gpu_graph_head *h;
    const ra_gpu_graph_params *p;
    int32_t *occ;
    ra_status s;
    const char *backend;
    int finished; /* set (atomically) by its thread when s is final */
} gb_job;

static ra_status gb_finish_head(ra_gpu_cache *c, gb_job *j)
{
    ra_gpu_graph_head *h = j->h;
    const ra_gpu_graph_stats *st = &h->stats;
    j->s = gb_finish(c, j->occ, h->n_keys, h->n_queries, j->p, h->adj, h->entries,
                     &h->n_entries, &h->stats);
    if (j->s == RA_OK)
        RA_DEBUG("gpu: graph of %zu keys from %zu queries (%s): knn %.3f, key->key %.3f, "
                 "projection %.3f, reverse %.3f, copies %.3f, entries+connectivity %.3f s "
                 "(%zu forced edges), total %.3f s",
                 h->n_keys, h->n_queries, j->backend, st->knn_s, st->key_knn_s, st->project_s,
                 st->reverse_s, st->copy_s, st->connect_s, st->forced_edges, st->total_s);
    return j->s;
}

static void *gb_finish_main(void *arg)
{
    gb_job *j = arg;
    gb_finish_head(NULL, j);
    __atomic_store_n(&j->finished, 1, __ATOMIC_RELEASE);
    return NULL;
}

/* Heads in flight in ra_gpu_graph_build_heads: one on the device, the host steps of at
 * most GB_RING - 1 earlier ones on threads of their own (RA_GPU_GRAPH_HOST_THREADS, 1 to
 * GB_RING - 1, default 3). The host steps of a 131K-key head (~40-55 ms) are close to its
 * device steps (~57 ms on an H200) and slow down beside the next head's copies, so one
 * thread alone made the device wait. */
#define GB_RING 5
typedef struct gb_ring {
    gb_job job[GB_RING];
    ra_gpu_graph_params p[GB_RING];
    pthread_t th[GB_RING];
    size_t first, next; /* heads [first, next) are on threads (slot h % GB_RING) */
    size_t ok;          /* heads [0, ok) are done */
    ra_status s;        /* the first failure among the joined heads */
} gb_ring;

/* joins the oldest head on a thread; heads are joined in order, so the first failure
 * seen is the earliest */
static void gb_join(ra_gpu_cache *c, gb_ring *r)
{
    size_t h = r->first++;
    gb_job *j = &r->job[h % GB_RING];
    pthread_join(r->th[h % GB_RING], NULL);
    free(j->occ);
    j->occ = NULL;
    if (r->s != RA_OK)
        return;
    if (j->s != RA_OK)
        r->s = ra_gpu_fail(c, j->s, "graph build of head %zu: entries or connectivity: %s", h,
                           ra_strerror(j->s));
    else
        r->ok = h + 1;
}

ra_status ra_gpu_graph_build_heads(ra_gpu_cache *c, ra_gpu_mem mem, ra_dtype dtype,
                                   unsigned dim, const ra_gpu_graph_params *pp,
                                   ra_gpu_graph_head *heads, size_t n_heads, size_t *n_done)
{
    if (n_done)
        *n_done = 0;
    if (!c || (n_heads && !heads))
        return c ? ra_gpu_fail(c, RA_EINVAL, "graph build: NULL heads") : RA_EINVAL;
    static ra_env_once once;
    int threads = ra_env_int(&once, "RA_GPU_GRAPH_HOST_THREADS", 3);
    threads = threads < 1 ? 1 : threads > GB_RING - 1 ? GB_RING - 1 : threads;
    gb_ring r;
    memset(&r, 0, sizeof r);
    ra_status s = RA_OK;
    for (size_t h = 0; h < n_heads; h++) {
        ra_gpu_graph_head *hd = &heads[h];
        ra_gpu_graph_params *ph = &r.p[h % GB_RING]; /* free: fewer than GB_RING in flight */
        int32_t *occ = NULL;
        /* the heads whose host steps have finished, so that a failure stops the loop
         * before another head's device steps */
        while (r.first < r.next &&
               __atomic_load_n(&r.job[r.first % GB_RING].finished, __ATOMIC_ACQUIRE))
            gb_join(c, &r);
        if (r.s != RA_OK)
            break;
        s = gb_check(c, mem, dtype, hd->keys, hd->n_keys, hd->queries, hd->n_queries, dim, pp,
                     hd->adj, hd->entries, &hd->n_entries, ph);
        if (s == RA_OK && !(occ = calloc(hd->n_keys, sizeof *occ)))
            s = ra_gpu_fail(c, RA_ENOMEM, "graph build: %zu counts", hd->n_keys);
        if (s == RA_OK) {
            memset(&hd->stats, 0, sizeof hd->stats);
            double t0 = ra_now_s();
            s = gb_rows(c, mem, dtype, hd->keys, hd->n_keys, hd->queries, hd->n_queries, dim, ph,
                        hd->adj, occ, hd->lists, &hd->stats);
            hd->stats.total_s = ra_now_s() - t0;
        }
        if (s != RA_OK) {
            if (n_heads > 1) /* the message names the head (c->err copied first) */
                s = ra_gpu_fail(c, s, "graph build of head %zu: %s", h, c->err);
            free(occ);
            break;
        }
        gb_job *j = &r.job[h % GB_RING];
        *j = (gb_job){.h = hd, .p = ph, .occ = occ, .backend = c->ops->name};
        while (r.next - r.first >= (size_t)threads) /* room for this head's thread */
            gb_join(c, &r);
        if (r.s != RA_OK) { /* an earlier head failed: no more */
            free(occ);
            break;
        }
        if (h + 1 < n_heads && pthread_create(&r.th[h % GB_RING], NULL, gb_finish_main, j) == 0) {
            r.next = h + 1;
            continue;
        }
        /* the last head (nothing to overlap with), or no thread: on this one, after the
         * earlier heads */
        while (r.first < r.next)
            gb_join(c, &r);
        if (r.s != RA_OK) {
            free(occ);
            break;
        }
        s = gb_finish_head(c, j);
        free(occ);
        j->occ = NULL;
        if (s != RA_OK) {
            if (n_heads > 1)
                s = ra_gpu_fail(c, s, "graph build of head %zu: %s", h, c->err);
            break;
        }
        r.first = r.next = r.ok = h + 1;
    }
    while (r.first < r.next)
        gb_join(c, &r);
    if (r.s != RA_OK) /* an earlier head's failure is the one reported */
        s = r.s;
    if (n_done)
        *n_done = r.ok;
    return s;
}

ra_status ra_gpu_graph_build(ra_gpu_cache *c, ra_gpu_mem mem, ra_dtype dtype, const void *keys,
                             size_t n, const void *queries, size_t nq, unsigned dim,
                             const ra_gpu_graph_params *pp, int32_t *adj, int32_t *entries,
                             unsigned *n_entries_out, ra_gpu_graph_stats *stats)
{
    /* a batch of one head; no place for the count is refused as a NULL output */
    ra_gpu_graph_head hd = {.keys = keys,
                            .n_keys = n,
                            .queries = queries,
                            .n_queries = nq,
                            .adj = adj,
                            .entries = n_entries_out ? entries : NULL};
    ra_status s = ra_gpu_graph_build_heads(c, mem, dtype, dim, pp, &hd, 1, NULL);
    if (s != RA_OK)
        return s;
    *n_entries_out = hd.n_entries;
    if (stats)
        *stats = hd.stats;
    return RA_OK;
}
