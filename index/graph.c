/* The graph backend's table (ra_backend_graph) and what its build and search share:
 * per-thread build scratch, the parallel-for, option bounds, size and destruction
 * (graph_internal.h has the design; graph_build.c builds, graph_search.c searches). */
#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "graph_internal.h"
#include "graph_sort.h"
#include "ra_bigmem.h"
#include "ra_kernels.h"
#include "ra_log.h"
#include "ra_thread.h"

static pthread_key_t g_tls_key;
static pthread_once_t g_tls_once = PTHREAD_ONCE_INIT;
static int g_tls_ok;

static void g_tls_free(void *p)
{
    g_tls *t = p;
    if (!t)
        return;
    free(t->stamp);
    free(t->slot);
    free(t->vis);
    free(t->pool);
    free(t->buf);
    free(t->sc);
    free(t->qf);
    free(t->kf);
    free(t->q8);
    free(t->q16);
    free(t);
}

static void g_tls_init_once(void)
{
    g_tls_ok = pthread_key_create(&g_tls_key, g_tls_free) == 0;
}

/* The calling thread's scratch, grown to hold n stamps, a pool of L, gathers of nb
 * and vectors of dim. NULL on allocation failure. */
g_tls *g_tls_get(size_t n, int L, int nb, int dim)
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
        uint32_t *sl = malloc(c * sizeof *sl);
        if (!s || !sl) {
            free(s);
            free(sl);
            return NULL;
        }
        free(t->stamp);
        free(t->slot);
        t->stamp = s;
        t->slot = sl;
        t->stamp_cap = c;
        t->gen = 0;
    }
    if (t->vis_words < (n + 63) / 64) {
        size_t w = (n + n / 4 + 1024 + 63) / 64;
        uint64_t *v = realloc(t->vis, w * sizeof *v);
        if (!v)
            return NULL;
        t->vis = v;
        t->vis_words = w;
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
        int cb = 2 * ra_codebook_code_bytes(dim, 4); /* >= the prepared query of either code */
        float *a = realloc(t->qf, (size_t)dim * sizeof *a);
        if (!a)
            return NULL;
        t->qf = a;
        float *k = realloc(t->kf, (size_t)G_MAX_DEGREE * dim * sizeof *k);
        if (!k)
            return NULL;
        t->kf = k;
        int8_t *c = realloc(t->q8, (size_t)cb);
        if (!c)
            return NULL;
        t->q8 = c;
        int16_t *d = realloc(t->q16, (size_t)cb * sizeof *d);
        if (!d)
            return NULL;
        t->q16 = d;
        t->qf_cap = dim;
    }
    return t;
}

/* A new visit generation; on wrap-around the stamps are cleared once. */
uint32_t g_tls_next_gen(g_tls *t)
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

void g_parallel(int threads, size_t n, size_t chunk, g_task_fn fn, void *ctx)
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
    for (int i = 1; i < t; i++) { /* the helpers of a caller pinned to one CPU are not */
        if (ra_thread_create_wide(&tid[started], 0, g_par_worker, &p) != 0)
            break; /* fewer threads: the caller's thread does the rest */
        started++;
    }
    g_par_worker(&p);
    for (int i = 0; i < started; i++)
        pthread_join(tid[i], NULL);
}

/* ------------------------------------------------------------------------ */
/* a parallel sort with the result of g_sort_u64 (graph_sort.h): keys are scattered by
 * their top bits into buckets (per-chunk counts, chunks in order: stable), then every
 * bucket is sorted on its own. The edges of a 131K build (2M after the projection, 390K
 * per linking batch) were sorted on one thread between two parallel passes. */

#define G_PSORT_BUCKETS 1024
#define G_PSORT_CHUNKS 64

typedef struct g_psort_ctx {
    uint64_t *a, *tmp;
    size_t n, csz; /* keys, keys per chunk */
    uint64_t lo;   /* smallest key */
    int shift;     /* bucket of x: (x - lo) >> shift */
    uint64_t mn[G_PSORT_CHUNKS], mx[G_PSORT_CHUNKS];
    size_t *cnt; /* [G_PSORT_CHUNKS][G_PSORT_BUCKETS]: counts, then write offsets */
    size_t boff[G_PSORT_BUCKETS + 1];
    int pass; /* 0 min/max, 1 counts, 2 scatter, 3 bucket sorts */
} g_psort_ctx;

static void g_psort_task(void *arg, size_t b, size_t e)
{
    g_psort_ctx *c = arg;
    for (size_t k = b; k < e; k++) {
        if (c->pass == 3) { /* bucket k: sorted in tmp (a as radix scratch), back to a */
            size_t s = c->boff[k], m = c->boff[k + 1] - s;
            g_sort_u64(c->tmp + s, m, c->a + s);
            memcpy(c->a + s, c->tmp + s, m * sizeof *c->a);
            continue;
        }
        size_t s = k * c->csz, z = s + c->csz < c->n ? s + c->csz : c->n;
        if (c->pass == 0) {
            uint64_t mn = UINT64_MAX, mx = 0;
            for (size_t i = s; i < z; i++) {
                mn = c->a[i] < mn ? c->a[i] : mn;
                mx = c->a[i] > mx ? c->a[i] : mx;
            }
            c->mn[k] = mn, c->mx[k] = mx;
        } else if (c->pass == 1) {
            size_t *h = c->cnt + k * G_PSORT_BUCKETS;
            for (size_t i = s; i < z; i++)
                h[(c->a[i] - c->lo) >> c->shift]++;
        } else {
            size_t *h = c->cnt + k * G_PSORT_BUCKETS;
            for (size_t i = s; i < z; i++)
                c->tmp[h[(c->a[i] - c->lo) >> c->shift]++] = c->a[i];
        }
    }
}

void g_psort_u64(int threads, uint64_t *a, uint64_t *tmp, size_t n)
{
    g_psort_ctx *c = NULL;
    if (threads < 2 || n < ((size_t)1 << 15) || !tmp || !(c = calloc(1, sizeof *c)) ||
        !(c->cnt = calloc((size_t)G_PSORT_CHUNKS * G_PSORT_BUCKETS, sizeof *c->cnt))) {
        free(c);
        g_sort_u64(a, n, tmp);
        return;
    }
    c->a = a, c->tmp = tmp, c->n = n;
    c->csz = (n + G_PSORT_CHUNKS - 1) / G_PSORT_CHUNKS;
    size_t nch = (n + c->csz - 1) / c->csz;
    g_parallel(threads, nch, 1, g_psort_task, c);
    uint64_t lo = UINT64_MAX, hi = 0;
    for (size_t k = 0; k < nch; k++) {
        lo = c->mn[k] < lo ? c->mn[k] : lo;
        hi = c->mx[k] > hi ? c->mx[k] : hi;
    }
    c->lo = lo;
    while (((hi - lo) >> c->shift) >= G_PSORT_BUCKETS)
        c->shift++;
    c->pass = 1;
    g_parallel(threads, nch, 1, g_psort_task, c);
    size_t at = 0; /* bucket by bucket, chunk by chunk: stable */
    for (size_t bk = 0; bk < G_PSORT_BUCKETS; bk++) {
        c->boff[bk] = at;
        for (size_t k = 0; k < nch; k++) {
            size_t m = c->cnt[k * G_PSORT_BUCKETS + bk];
            c->cnt[k * G_PSORT_BUCKETS + bk] = at;
            at += m;
        }
    }
    c->boff[G_PSORT_BUCKETS] = at;
    c->pass = 2;
    g_parallel(threads, nch, 1, g_psort_task, c);
    c->pass = 3;
    g_parallel(threads, G_PSORT_BUCKETS, 8, g_psort_task, c);
    free(c->cnt);
    free(c);
}

int g_threads(int want)
{
    if (want > 0)
        return want > G_MAX_THREADS ? G_MAX_THREADS : want;
    long c = sysconf(_SC_NPROCESSORS_ONLN);
    if (c < 1)
        c = 1;
    return c > G_MAX_THREADS ? G_MAX_THREADS : (int)c;
}

/* Bounds and defaults from the option table (index/opts.c), so that the daemon and
 * ra_head accept exactly what a build accepts; the two caps guard this file's arrays. */
ra_status g_opts(const ra_index_opts *o, int *K, int *M, int *ef, int *ent, int *ntrain,
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

ra_status g_inputs(const ra_index_opts *o, const ra_kv *kv, const float *train_q, size_t nq, int *K,
                   int *M, int *ef, int *ent, int *ntrain, int *threads, uint64_t *seed)
{
    if (g_opts(o, K, M, ef, ent, ntrain, threads, seed) != RA_OK) {
        RA_ERROR("graph: options out of range");
        return RA_EINVAL;
    }
    int dim = ra_kv_dim(kv);
    if (dim <= 0 || ra_dtype_size(ra_kv_dtype(kv)) == 0)
        return RA_EINVAL;
    if (nq && !ra_kern_all_finite(train_q, RA_DTYPE_F32, nq * (size_t)dim)) {
        RA_ERROR("graph: training queries contain NaN or Inf");
        return RA_ENONFINITE;
    }
    return RA_OK;
}

void ra_graph_destroy(ra_graph *g)
{
    if (!g)
        return;
    ra_big_free(g->rec, g->cap * g->rec_bytes);
    free(g->deg);
    free(g->pdeg);
    free(g->norm2);
    ra_codebook_fini(&g->cb);
    free(g->entries);
    free(g->route_q);
    free(g->route_ids);
    free(g);
}

size_t ra_graph_bytes(const ra_graph *g)
{
    if (!g)
        return 0;
    return sizeof *g + g->cap * (g->rec_bytes + 2 + sizeof(float)) + ra_codebook_bytes(&g->cb) +
           (size_t)g->n_entries * sizeof(int32_t) +
           (size_t)g->n_route * ((size_t)g->dim * sizeof(float) + G_ROUTE_KEYS * sizeof(int32_t));
}

static void graph_destroy(void *state)
{
    ra_graph_destroy(state);
}

static size_t graph_bytes(void *state)
{
    return ra_graph_bytes(state);
}

static ra_status graph_build(void **state, const ra_kv *kv, size_t n, const float *train_q,
                             size_t nq, const ra_index_opts *opts)
{
    return ra_graph_build_from((ra_graph **)state, kv, n, train_q, nq, NULL, 0, opts);
}

static ra_status graph_build_lists(void **state, const ra_kv *kv, size_t n, const float *train_q,
                                   size_t nq, const int32_t *lists, int K,
                                   const ra_index_opts *opts)
{
    if (!lists || K < 1)
        return RA_EINVAL;
    return ra_graph_build_from((ra_graph **)state, kv, n, train_q, nq, lists, K, opts);
}

static ra_status graph_install(void **state, const ra_kv *kv, size_t n, const ra_graph_adj *a,
                               const float *train_q, size_t nq, const int32_t *lists, int K,
                               const ra_index_opts *opts)
{
    return ra_graph_install((ra_graph **)state, kv, n, a, train_q, nq, lists, K, opts);
}

static ra_status graph_export(void *state, ra_graph_adj *out)
{
    return ra_graph_export(state, out);
}

static ra_status graph_add(void *state, const ra_kv *kv, size_t first, size_t n)
{
    return ra_graph_add(state, kv, first, n);
}

static ra_status graph_search(void *state, const ra_kv *kv, const float *q,
                              const ra_search_params *p, int32_t *ids, float *scores, int *n_out,
                              ra_search_stats *st)
{
    const ra_graph *g = state;
    if (!g || !p || !q || p->k <= 0)
        return RA_EINVAL;
    if (!ra_kern_all_finite(q, RA_DTYPE_F32, (size_t)g->dim))
        return RA_ENONFINITE;
    return ra_graph_search_group(g, kv, 1, q, p, p->k, ids, scores, n_out, st);
}

static ra_status graph_search_group(void *state, const ra_kv *kv, size_t nq, const float *q,
                                    const ra_search_params *p, int kmax, int32_t *ids,
                                    float *scores, int *n_out, ra_search_stats *st)
{
    return ra_graph_search_group(state, kv, nq, q, p, kmax, ids, scores, n_out, st);
}

static float graph_effort_mult(void *state, float mult)
{
    return ra_graph_effort_mult(state, mult);
}

const ra_backend_ops ra_backend_graph = {
    .name = "graph",
    .build = graph_build,
    .build_lists = graph_build_lists,
    .install = graph_install,
    .export_graph = graph_export,
    .add = graph_add,
    .search = graph_search,
    .search_group = graph_search_group,
    .bytes = graph_bytes,
    .destroy = graph_destroy,
    .effort_mult = graph_effort_mult,
};
