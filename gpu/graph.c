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
 * them, then evenly spaced keys offset by the seed (index/graph_build.c's rule). The
 * frequent half by one pass with a heap of that many ranks (worst on top): O(n log T),
 * not a sort of every key (~15 ms of a 131K-key head's host steps). */
static ra_status pick_entries(ra_gpu_cache *c, const int32_t *occ, size_t n, int have_q,
                              unsigned want, uint64_t seed, int32_t *entries, unsigned *n_out)
{
    unsigned ne = want > n ? (unsigned)n : want, k = 0;
    unsigned hh = have_q ? (ne + 1) / 2 : 0;
    uint64_t *top = malloc((hh ? hh : 1) * sizeof *top);
    if (!top)
        return ra_gpu_fail(c, RA_ENOMEM, "graph build: entry ranking of %u keys", hh);
    unsigned m = 0;
    for (size_t i = 0; i < n && hh; i++) {
        if (occ[i] <= 0)
            continue;
        uint64_t r = (uint64_t)(UINT32_MAX - (uint32_t)occ[i]) << 32 | (uint32_t)i;
        unsigned at;
        if (m < hh) { /* sift up */
            at = m++;
            while (at > 0 && top[(at - 1) / 2] < r) {
                top[at] = top[(at - 1) / 2];
                at = (at - 1) / 2;
            }
            top[at] = r;
            continue;
        }
        if (r >= top[0])
            continue;
        for (at = 0;;) { /* replace the worst, sift down */
            unsigned ch = 2 * at + 1;
            if (ch >= m)
                break;
            if (ch + 1 < m && top[ch + 1] > top[ch])
                ch++;
            if (top[ch] <= r)
                break;
            top[at] = top[ch];
            at = ch;
        }
        top[at] = r;
    }
    qsort(top, m, sizeof *top, cmp_u64);
    for (unsigned i = 0; i < m; i++)
        entries[k++] = (int32_t)(uint32_t)top[i];
    free(top);
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

/* the first id of row v outside -1..n-1 (the backend's ids are checked before the host
 * steps index by them: a device fault must not become a wild access), or -1 */
static int bad_slot(const int32_t *adj, size_t v, unsigned M, size_t n)
{
    const int32_t *row = adj + v * M;
    unsigned bad = M;
    for (unsigned j = 0; j < M; j++) /* no early exit: vectorised */
        bad = (uint32_t)row[j] + 1u > (uint32_t)n && bad == M ? j : bad;
    return bad < M ? (int)bad : -1;
}

/* BFS from the entries; each unreached key x (in id order) gets an edge from its best
 * reached out-neighbour with a free slot, else from the first reached key in BFS order
 * with one, and the BFS goes on from x. When every reached row is full, an edge that is
 * not in the BFS tree is replaced (the tree spans everything reached, so nothing
 * reached is lost). Reached keys stay reached: one pass, O(n M). Every row's ids are
 * checked before any is used (each key is dequeued once; an unreached key's row is
 * checked before its fix-up reads it), and the rows of the next keys in the queue are
 * prefetched: the pass is bound by those random row reads. */
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
    enum { AHEAD = 12 }; /* rows in flight ahead of the BFS */
    size_t row_bytes = (size_t)M * sizeof *adj;
    for (size_t x = 0;; x++) {
        while (qh < qt) {
            if (qh + AHEAD < qt) {
                const char *a = (const char *)(adj + (size_t)queue[qh + AHEAD] * M);
                for (size_t o = 0; o < row_bytes; o += 64)
                    __builtin_prefetch(a + o);
            }
            int32_t u = queue[qh++];
            const int32_t *row = adj + (size_t)u * M;
            int b = bad_slot(adj, (size_t)u, M, n);
            if (b >= 0) {
                s = ra_gpu_fail(c, RA_EINTERNAL, "graph build: the backend wrote id %d in row %zu",
                                row[b], (size_t)u);
                goto done;
            }
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
        int b = bad_slot(adj, x, M, n);
        if (b >= 0) {
            s = ra_gpu_fail(c, RA_EINTERNAL, "graph build: the backend wrote id %d in row %zu",
                            xr[b], x);
            break;
        }
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
done:
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
    if (__atomic_load_n(&c->broken, __ATOMIC_RELAXED)) /* head threads may set it */
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

/* Steps 1-4 (the backend, on its build state `lane`): rows into adj, the query-list
 * counts of each key into occ. */
static ra_status gb_rows(ra_gpu_cache *c, int lane, ra_gpu_mem mem, ra_dtype dtype,
                         const void *keys, size_t n, const void *queries, size_t nq, unsigned dim,
                         const ra_gpu_graph_params *p, int32_t *adj, int32_t *occ, int32_t *lists,
                         ra_gpu_graph_stats *st)
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
    return c->ops->graph_rows(c, lane, mem, dtype, keys, n, queries, nq, dim, p, adj, occ, lists,
                              st);
}

/* Steps 5-6 on the host (connect() checks the backend's ids before it uses them). */
static ra_status gb_finish(ra_gpu_cache *c, const int32_t *occ, size_t n, size_t nq,
                           const ra_gpu_graph_params *p, int32_t *adj, int32_t *entries,
                           unsigned *n_entries_out, ra_gpu_graph_stats *st)
{
    double t1 = ra_now_s();
    ra_status s = pick_entries(c, occ, n, nq > 0, p->n_entries, p->seed, entries, n_entries_out);
    if (s == RA_OK)
        s = connect(c, adj, n, p->degree, entries, *n_entries_out, &st->forced_edges);
    st->connect_s = ra_now_s() - t1;
    st->total_s += st->connect_s;
    return s;
}

static void gb_log(const ra_gpu_graph_head *h, const char *backend)
{
    const ra_gpu_graph_stats *st = &h->stats;
    RA_DEBUG("gpu: graph of %zu keys from %zu queries (%s): knn %.3f, key->key %.3f, "
             "projection %.3f, reverse %.3f, copies %.3f, entries+connectivity %.3f s "
             "(%zu forced edges), total %.3f s",
             h->n_keys, h->n_queries, backend, st->knn_s, st->key_knn_s, st->project_s,
             st->reverse_s, st->copy_s, st->connect_s, st->forced_edges, st->total_s);
}

/* one head's checks and defaults (*p) and its zeroed counts (*occ), stats reset */
static ra_status gb_prepare(ra_gpu_cache *c, ra_gpu_mem mem, ra_dtype dtype, unsigned dim,
                            const ra_gpu_graph_params *pp, ra_gpu_graph_head *hd,
                            ra_gpu_graph_params *p, int32_t **occ)
{
    *occ = NULL;
    ra_status s = gb_check(c, mem, dtype, hd->keys, hd->n_keys, hd->queries, hd->n_queries, dim, pp,
                           hd->adj, hd->entries, &hd->n_entries, p);
    if (s != RA_OK)
        return s;
    if (!(*occ = calloc(hd->n_keys, sizeof **occ)))
        return ra_gpu_fail(c, RA_ENOMEM, "graph build: %zu counts", hd->n_keys);
    memset(&hd->stats, 0, sizeof hd->stats);
    return RA_OK;
}

/* one head's device steps on `lane`, their wall time in total_s */
static ra_status gb_device(ra_gpu_cache *c, int lane, ra_gpu_mem mem, ra_dtype dtype, unsigned dim,
                           const ra_gpu_graph_params *p, ra_gpu_graph_head *hd, int32_t *occ)
{
    double t0 = ra_now_s();
    ra_status s = gb_rows(c, lane, mem, dtype, hd->keys, hd->n_keys, hd->queries, hd->n_queries,
                          dim, p, hd->adj, occ, hd->lists, &hd->stats);
    hd->stats.total_s = ra_now_s() - t0;
    return s;
}

/* one head's host steps (after its device steps), logged when done */
static ra_status gb_host(ra_gpu_cache *c, const ra_gpu_graph_params *p, ra_gpu_graph_head *hd,
                         const int32_t *occ)
{
    ra_status s = gb_finish(c, occ, hd->n_keys, hd->n_queries, p, hd->adj, hd->entries,
                            &hd->n_entries, &hd->stats);
    if (s == RA_OK)
        gb_log(hd, c->ops->name);
    return s;
}

/* ---- several heads (ra_gpu_graph_build_heads) ----
 * Each head in flight has a thread of its own that runs the head's device steps on a
 * lane (the backend's own build state: on CUDA its streams and cuBLAS handle), then its
 * host steps (~15-25 ms of a 131K-key head). At most `lanes` heads are in their device
 * steps at once: one until the first head's device steps are done (or none, when an
 * earlier call built a head of as many keys and queries: the cache keeps the peak), then
 * what the backend says fits that head's peak memory (graph_lanes: CUDA 2, or
 * RA_GPU_GRAPH_LANES 1-2; the CPU backend 1). A head's uploads, downloads, host-side
 * launches and synchronisations leave the device idle, and a second head on the other
 * lane fills those gaps (an H200, 8 heads of 131K keys: 0.650 -> 0.555 s). At most
 * RA_GPU_GRAPH_HOST_THREADS (1-4, default 3) heads are in their host steps at once. Heads start in
 * order, are joined in order, and none starts once one has failed; failure messages go to each
 * head's own buffer (ra_gpu_err_redirect) and the earliest failed head's becomes the cache's. */
#define GB_RING (RA_GPU_GRAPH_LANES + 4)

typedef struct gb_ring gb_ring;

typedef struct gb_job {
    gb_ring *r;
    ra_gpu_graph_head *h;
    ra_gpu_graph_params p;
    int32_t *occ;
    int lane;
    ra_status s;
    int dev_done, done; /* under the ring's lock */
    char err[512];      /* the head's failure message */
} gb_job;

struct gb_ring {
    ra_gpu_cache *c;
    size_t key[7];        /* the kind of build (graph_peak_key) */
    size_t fit_n, fit_nq; /* heads no larger may share the device (lanes > 1) */
    ra_gpu_mem mem;
    ra_dtype dtype;
    unsigned dim;
    int lanes, threads;
    pthread_mutex_t mu;
    pthread_cond_t cv;
    gb_job job[GB_RING];
    pthread_t th[GB_RING];
    size_t first, next; /* heads [first, next) have threads, not joined (slot h % GB_RING) */
    size_t ok;          /* heads [0, ok) are done */
    int busy[RA_GPU_GRAPH_LANES];
    int decided; /* lanes is final for this call */
    int n_host;  /* heads in their host steps */
    int failed;  /* a head has failed: start no more */
    ra_status s; /* the first failure among the joined heads */
};

static void *gb_head_main(void *arg)
{
    gb_job *j = arg;
    gb_ring *r = j->r;
    ra_gpu_graph_head *h = j->h;
    ra_gpu_err_redirect(j->err);
    ra_status s = gb_device(r->c, j->lane, r->mem, r->dtype, r->dim, &j->p, h, j->occ);
    pthread_mutex_lock(&r->mu);
    r->busy[j->lane] = 0;
    j->dev_done = 1;
    r->failed |= s != RA_OK;
    pthread_cond_broadcast(&r->cv);
    while (s == RA_OK && r->n_host >= r->threads)
        pthread_cond_wait(&r->cv, &r->mu);
    r->n_host += s == RA_OK;
    pthread_mutex_unlock(&r->mu);
    if (s == RA_OK) {
        s = gb_host(r->c, &j->p, h, j->occ);
        pthread_mutex_lock(&r->mu);
        r->n_host--;
    } else {
        pthread_mutex_lock(&r->mu);
    }
    j->s = s;
    j->done = 1;
    r->failed |= s != RA_OK;
    pthread_cond_broadcast(&r->cv);
    pthread_mutex_unlock(&r->mu);
    ra_gpu_err_redirect(NULL);
    return NULL;
}

/* joins the oldest head (done), under the ring's lock: its thread only returns after
 * `done`, so the join does not wait on the lock */
static void gb_join(gb_ring *r)
{
    size_t h = r->first++;
    gb_job *j = &r->job[h % GB_RING];
    pthread_join(r->th[h % GB_RING], NULL);
    free(j->occ);
    j->occ = NULL;
    if (r->s != RA_OK)
        return;
    if (j->s != RA_OK) {
        r->s = ra_gpu_fail(r->c, j->s, "graph build of head %zu: %s", h, j->err);
        return;
    }
    r->ok = h + 1;
    ra_gpu_cache *c = r->c; /* what the next call may assume of heads as large */
    if (memcmp(c->graph_peak_key, r->key, sizeof r->key) != 0) { /* another kind of build */
        memcpy(c->graph_peak_key, r->key, sizeof r->key);
        c->graph_peak_n = c->graph_peak_nq = c->graph_peak = 0;
    }
    if (j->h->n_keys > c->graph_peak_n)
        c->graph_peak_n = j->h->n_keys;
    if (j->h->n_queries > c->graph_peak_nq)
        c->graph_peak_nq = j->h->n_queries;
    if (j->h->stats.device_bytes > c->graph_peak)
        c->graph_peak = j->h->stats.device_bytes;
}

/* a free lane for head h, once one is and the ring has room (-1: a head failed); a head
 * larger than the one the lanes were decided on runs alone */
static int gb_lane(gb_ring *r, const ra_gpu_graph_head *heads, size_t h)
{
    for (;;) {
        while (r->first < r->next && r->job[r->first % GB_RING].done)
            gb_join(r);
        if (r->failed) /* set by every failed head before it is joined */
            return -1;
        /* the first head alone, unless an earlier call measured a head as large */
        if (!r->decided) {
            size_t peak = 0;
            const ra_gpu_cache *c = r->c;
            if (r->next == 0 && !memcmp(c->graph_peak_key, r->key, sizeof r->key) &&
                heads[0].n_keys <= c->graph_peak_n && heads[0].n_queries <= c->graph_peak_nq) {
                r->decided = 1, peak = c->graph_peak;
                r->fit_n = c->graph_peak_n, r->fit_nq = c->graph_peak_nq;
            } else if (r->next > 0 && r->job[0].dev_done) {
                r->decided = 1, peak = heads[0].stats.device_bytes;
                r->fit_n = heads[0].n_keys, r->fit_nq = heads[0].n_queries;
            }
            if (r->decided && peak && r->c->ops->graph_lanes) { /* 0: not measured */
                int l = r->c->ops->graph_lanes(r->c, peak);
                r->lanes = l < 1 ? 1 : l > RA_GPU_GRAPH_LANES ? RA_GPU_GRAPH_LANES : l;
            }
        }
        int alone = heads[h].n_keys > r->fit_n || heads[h].n_queries > r->fit_nq, idle = 1;
        for (int l = 0; l < RA_GPU_GRAPH_LANES; l++)
            idle &= !r->busy[l];
        if (r->next - r->first < GB_RING && (!alone || idle))
            for (int l = 0; l < (alone ? 1 : r->lanes); l++)
                if (!r->busy[l])
                    return l;
        pthread_cond_wait(&r->cv, &r->mu);
    }
}

static ra_status gb_many(gb_ring *r, const ra_gpu_graph_params *pp, ra_gpu_graph_head *heads,
                         size_t n_heads)
{
    ra_gpu_cache *c = r->c;
    ra_status s = RA_OK;
    pthread_mutex_lock(&r->mu);
    for (size_t h = 0; h < n_heads; h++) {
        int lane = gb_lane(r, heads, h);
        if (lane < 0)
            break;
        pthread_mutex_unlock(&r->mu);
        gb_job *j = &r->job[h % GB_RING]; /* free: fewer than GB_RING heads in flight */
        *j = (gb_job){.r = r, .h = &heads[h], .lane = lane};
        s = gb_prepare(c, r->mem, r->dtype, r->dim, pp, &heads[h], &j->p, &j->occ);
        pthread_mutex_lock(&r->mu);
        if (s == RA_OK && r->failed) { /* one failed meanwhile */
            free(j->occ);
            j->occ = NULL;
            break;
        }
        if (s == RA_OK) {
            r->busy[lane] = 1;
            if (pthread_create(&r->th[h % GB_RING], NULL, gb_head_main, j) != 0) {
                r->busy[lane] = 0;
                s = ra_gpu_fail(c, RA_ENOMEM, "graph build: no thread");
            }
        }
        if (s != RA_OK) { /* the message names the head (c->err copied first) */
            s = ra_gpu_fail(c, s, "graph build of head %zu: %s", h, c->err);
            free(j->occ);
            j->occ = NULL;
            break;
        }
        r->next = h + 1;
    }
    while (r->first < r->next) {
        while (!r->job[r->first % GB_RING].done)
            pthread_cond_wait(&r->cv, &r->mu);
        gb_join(r);
    }
    pthread_mutex_unlock(&r->mu);
    return r->s != RA_OK ? r->s : s; /* an earlier head's failure is the one reported */
}

ra_status ra_gpu_graph_build_heads(ra_gpu_cache *c, ra_gpu_mem mem, ra_dtype dtype,
                                   unsigned dim, const ra_gpu_graph_params *pp,
                                   ra_gpu_graph_head *heads, size_t n_heads, size_t *n_done)
{
    if (n_done)
        *n_done = 0;
    if (!c || (n_heads && !heads))
        return c ? ra_gpu_fail(c, RA_EINVAL, "graph build: NULL heads") : RA_EINVAL;
    if (n_heads == 0)
        return RA_OK;
    if (n_heads == 1) { /* on this thread, its messages as they are */
        ra_gpu_graph_params p;
        int32_t *occ;
        ra_status s = gb_prepare(c, mem, dtype, dim, pp, heads, &p, &occ);
        if (s == RA_OK)
            s = gb_device(c, 0, mem, dtype, dim, &p, heads, occ);
        if (s == RA_OK)
            s = gb_host(c, &p, heads, occ);
        free(occ);
        if (n_done)
            *n_done = s == RA_OK;
        return s;
    }
    static ra_env_once once;
    int threads = ra_env_int(&once, "RA_GPU_GRAPH_HOST_THREADS", 3);
    gb_ring *r = calloc(1, sizeof *r);
    if (!r)
        return ra_gpu_fail(c, RA_ENOMEM, "graph build: state of %zu heads", n_heads);
    *r = (gb_ring){.c = c,
                   .mem = mem,
                   .dtype = dtype,
                   .dim = dim,
                   .lanes = 1,
                   .threads = threads < 1   ? 1
                              : threads > 4 ? 4
                                            : threads,
                   .key = {dim, (size_t)dtype, (size_t)mem, pp ? pp->knn : 0, pp ? pp->degree : 0,
                           pp ? pp->key_knn : 0, pp ? pp->tile_bytes : 0}};
    pthread_mutex_init(&r->mu, NULL);
    pthread_cond_init(&r->cv, NULL);
    ra_status s = gb_many(r, pp, heads, n_heads);
    if (n_done)
        *n_done = r->ok;
    pthread_mutex_destroy(&r->mu);
    pthread_cond_destroy(&r->cv);
    free(r);
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
