/* Internal to the graph backend (graph.c, graph_build.c, graph_search.c): the
 * attention-aware graph index (ra_backend_graph), a proximity graph over one head's keys
 * whose edges are shaped by real queries, after RetrievalAttention and RoarGraph. Decode
 * queries are out of distribution for the keys, so a graph built from keys alone (HNSW)
 * or clusters of keys (IVF) leads a query to the wrong places; here the exact top-K keys
 * of sampled prefill queries are projected onto the keys (keys that answer the same query
 * become neighbours), pruned with an occlusion rule, completed with reverse edges and made
 * reachable from the entry points by inserting every key by key->key search (which is in
 * distribution). Where the CPU has AMX (graph_kk.c) the key->key searches are replaced by
 * each key's best keys on the search codes over all pairs, pruned together with its
 * projection candidates in one pass, as the GPU build does (gpu/cpu_graph.c): 2.6-3.2x
 * faster at 131K keys and the same or better recall (bench/README.md, "CPU build, eighth
 * session"). Keys appended later are always inserted by search.
 *
 * Layout: one record per node, 64-byte aligned: the key's u8 search code (ra_codes.h,
 * cbytes) and then its M int32 neighbour slots, so that scoring a node and expanding it
 * read neighbouring cache lines; a degree byte per node; the squared norm of every key
 * (L2 search during insertion is an inner-product search with a -|k|^2/2 bias). A search
 * walks the codes and rescores its final candidates on the stored keys, so returned
 * scores are exact. Searches are concurrent and lock-free (per-thread scratch). All
 * mutations (build, add) are exclusive (ra_head holds the lock); they run in batches
 * whose searches see a frozen graph and whose edge updates are grouped per target node,
 * so the result depends on the seed and the data, never on thread scheduling. */
#ifndef RA_GRAPH_INTERNAL_H
#define RA_GRAPH_INTERNAL_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "ra_backend.h"
#include "ra_codes.h"

/* ---- bounds of this backend's arrays and constants of its design (option defaults and
 * bounds: the table of index/opts.c) ---- */
#define G_MAX_DEGREE 255 /* the degree array is one byte per node */
#define G_MAX_EF 4096    /* search effort bound: G_MAX_EF * 16 (option bounds: index/opts.c) */
#define G_MULT_MIN 0.5f  /* the default candidate list's factor (l_mult) stays in here */
#define G_MULT_MAX 8.0f
#define G_MAX_K 65536    /* top-k bound for one search */
#define G_MAX_THREADS 256
#define G_WINDOW                                                                                   \
    32 /* rank window: keys within +-32 ranks of one query's list (131K synthetic,                 \
        * K 100: recall 0.954 at 6.2 % scans vs 0.941 at 6.1 % with +-2, K 32) */
#define G_PROJ_PCT 0
#define G_PROJ_LISTS                                                                               \
    32                  /* a key takes projection candidates from its first 32 lists only:         \
                         * bounds the pairs at n * 32 * 65 (small heads with many training         \
                         * queries put one key in hundreds of lists) */
#define G_ROUTE_MAX 256 /* training queries kept for routing */
#define G_ROUTE_KEYS 8  /* best keys kept per routing query */
#define G_ROUTE_TOP 4   /* routing queries used per search */
#define G_LINK_L2 0     /* 1: link by L2 (measured far worse for MIPS: 0.16 vs 0.60 recall) */
#define G_ALPHA2 1.44f  /* occlusion slack (alpha = 1.2, on squared distances) */
/* The build's linking batches run their keys in the order of G_LINK_CLUSTERS clusters
 * (the most similar of evenly spaced keys, by cosine), so that the walks running together
 * read the same records from cache. The same keys make the same batches, and a batch's
 * walks see a frozen graph, so the graph is the same bit for bit; walks+pruning CPU 20.2 ->
 * 16.6 s on the calibrated 131K head with 48 expanded (512 clusters: 17.7 s). */
#define G_LINK_CLUSTERS 64

typedef struct g_cand {
    float s; /* score: larger is better (IP, or -d2/2 + const in L2 mode) */
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
    size_t n;          /* nodes linked */
    size_t cap;        /* records allocated */
    size_t rec_bytes;  /* code + adjacency, a multiple of 64 */
    uint8_t *rec;      /* [cap][rec_bytes], 64-byte aligned */
    uint8_t *deg;      /* [cap] */
    uint8_t *pdeg;     /* [cap] protected prefix: edges from the query projection */
    float *norm2;      /* [cap] |k|^2 */
    int code_bits;     /* of the search codes (ra_codebook_bits() at g_alloc): sizes the
                          records before the code is fitted */
    ra_codebook cb;    /* search codes (cb.cbytes bytes at the start of each record) */
    size_t cb_n;       /* keys the code was fitted on */
    float l_mult;      /* the default candidate list's factor for this head, G_MULT_MIN..
                          G_MULT_MAX: set at build by ra_graph_calibrate from held-out
                          prefill queries, then moved by ra_head's recall probes through
                          ra_graph_effort_mult (atomic: read once per search) */
    const int *cancel; /* while a build runs: its ra_index_opts.cancel (NULL otherwise) */
    uint8_t *kk_codes; /* while a build makes key->key lists by code: the codes back to
                          back ([n][cbytes], 64-byte aligned), which the tile loads stream
                          (the records' stride spreads them over 2.5x the lines); NULL:
                          the records' */
    int light_rev;     /* while keys are appended: a reverse edge into a full row replaces
                          the row's last (farthest) members when closer, instead of
                          re-pruning the row, which cost ~20 us per edge and made an Append
                          of 16 keys take milliseconds per head */
    int32_t *entries;
    int n_entries;
    /* routing: a few training queries (fp32, unit norm) and their best keys; a search
     * starts also from the best keys of the training queries nearest to it */
    float *route_q;     /* [n_route][dim] */
    int32_t *route_ids; /* [n_route][G_ROUTE_KEYS] (-1 padded) */
    int n_route;
} ra_graph;

static inline int32_t *g_adj(const ra_graph *g, size_t u)
{
    return (int32_t *)(g->rec + u * g->rec_bytes + (size_t)g->cb.cbytes);
}

static inline const uint8_t *g_code(const ra_graph *g, size_t u)
{
    return g->rec + u * g->rec_bytes;
}

static inline const void *g_row(const ra_graph *g, const void *keys, int32_t id)
{
    return (const char *)keys + (size_t)id * g->row_bytes;
}

static inline int g_better(float sa, int32_t ia, float sb, int32_t ib)
{
    return sa > sb || (sa == sb && ia < ib); /* ties by id: deterministic */
}

/* A (score, id) pair of a search's result and candidate lists (graph_search.c) */
typedef struct g_hc {
    float s;
    int32_t id;
} g_hc;

static inline int hc_better(g_hc a, g_hc b)
{
    return g_better(a.s, a.id, b.s, b.id);
}

/* graph_search.c: moves the m best of h[0..n) (0 < m <= n, scores not NaN; ties by id)
 * to h[0..m), in their order, and returns the worst of them; key: n ints of scratch. */
g_hc g_keep_best(g_hc *h, int n, int m, int32_t *key);
/* graph_search.c: sorts h[0..n) best first (ties by id); tmp holds n. */
void g_sort_best(g_hc *h, int n, g_hc *tmp);

/* Inserts c into the pool sorted best first (size *np <= L). Returns its position,
 * or L when it did not make it. */
static inline int g_pool_insert(g_cand *pool, int *np, int L, float s, int32_t id)
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

/* graph_kk.c: for each of the nq fp32 rows q[nq][dim] (row i is key self[i], which it
 * skips, when self is not NULL), its best c keys among the graph's n by search-code score,
 * best first (ties by lower id), -1 where fewer: out[nq][c]. amx = 0 forces the
 * portable kernel (the same lists). Runs on the calling thread. cyc (NULL: none) gains
 * the time stamp counter's ticks of the scoring kernels [0] and of the rest [1]. */
ra_status g_kk_block(const ra_graph *g, const float *q, size_t nq, const int32_t *self, int c,
                     int amx, int32_t *out, uint64_t *cyc);
/* graph_kk.c: whether g_kk_block can score g's codes on AMX (8-bit codes of 64 or 128
 * bytes, and ra_kern_amx_ok) */
int g_kk_amx(const ra_graph *g);
/* the rows its callers hand it at once (keys of the projection, training queries): its
 * buffers are nq x (2 c + 32) candidates */
#ifndef G_KK_BLOCK /* (-DG_KK_BLOCK=n for the A/B benchmarks) */
#define G_KK_BLOCK 256
#endif

/* graph_build.c: the key->key candidates of later builds as RA_GRAPH_KK would set them
 * (-1 auto, 0 walks, 1 lists by code even without AMX); -2 goes back to RA_GRAPH_KK.
 * For tests. */
void g_kk_force(int mode);
/* graph_kk.c: the key->key scans' priming (g_kk_block): -1 as the build chooses it, 0 off,
 * r > 0 at rank r of a sample of ~256 keys whatever n (to make rescans happen). For tests. */
void g_kk_prime_force(int r);

/* graph_kk.c: the training lists as g_exact_knn gives them (best first, -1 / -inf
 * padded), from each query's best 2 K + 16 by search code rescored exactly on the keys
 * (the true top K is within them unless the code misranks it by over K places), on
 * g->threads threads. Used with the key->key lists by code (AMX). */
ra_status g_code_knn(const ra_graph *g, const void *keys, const float *q, size_t nq, int K,
                     int32_t *ids, float *scores);

/* ---- per-thread scratch of the build (graph.c) ---- */
typedef struct g_tls {
    uint32_t *stamp; /* visit generations (candidate dedup) */
    uint32_t *slot;  /* [stamp_cap]: where a stamped id sits in a list being counted */
    size_t stamp_cap;
    uint32_t gen;
    uint64_t *vis; /* visited bits of a build walk: 1/32 of the stamps' footprint, so the
                      test per neighbour hits L1 (the stamps' misses were 30 % of a walk) */
    size_t vis_words;
    g_cand *pool;
    int pool_cap;
    int32_t *buf;
    float *sc;
    int buf_cap;
    float *qf; /* fp32 copy of a key used as a query / in pruning */
    float *kf; /* [G_MAX_DEGREE][dim]: fp32 copies of the rows a pruning kept so far */
    int qf_cap;
    int8_t *q8; /* the query prepared for the search codes (ra_codebook_prep) */
    int16_t *q16;
    float cmul, cadd;
    int use_codes; /* 1: g_search scores on the codes (key->key insertion) */
} g_tls;

/* The calling thread's scratch, grown to hold n stamps, a pool of L, gathers of nb
 * and vectors of dim. NULL on allocation failure. */
g_tls *g_tls_get(size_t n, int L, int nb, int dim);
/* A new visit generation; on wrap-around the stamps are cleared once. */
uint32_t g_tls_next_gen(g_tls *t);

/* ---- a small deterministic parallel-for (graph.c): items are independent, so the
 * dynamic chunking changes only who computes an item, never its result ---- */
typedef void (*g_task_fn)(void *ctx, size_t begin, size_t end);
void g_parallel(int threads, size_t n, size_t chunk, g_task_fn fn, void *ctx);
int g_threads(int want);
/* Sorts a[0..n) ascending on up to `threads` threads, tmp holding n keys: the same result
 * as g_sort_u64 (graph_sort.h). Falls back to it when small or out of memory. */
void g_psort_u64(int threads, uint64_t *a, uint64_t *tmp, size_t n);

/* Options against the graph's bounds; RA_EINVAL when out of range (graph.c). */
ra_status g_opts(const ra_index_opts *o, int *K, int *M, int *ef, int *ent, int *ntrain,
                 int *threads, uint64_t *seed);
/* What every construction (a build, an install) checks first: the options (g_opts), the
 * keys' dim and dtype, the nq training queries finite. RA_OK, RA_EINVAL or
 * RA_ENONFINITE, logged (graph.c). */
ra_status g_inputs(const ra_index_opts *o, const ra_kv *kv, const float *train_q, size_t nq, int *K,
                   int *M, int *ef, int *ent, int *ntrain, int *threads, uint64_t *seed);
void ra_graph_destroy(ra_graph *g);
size_t ra_graph_bytes(const ra_graph *g);

/* 1 when the build in progress was asked to end (checked between phases and batches) */
static inline int g_cancelled(const ra_graph *g)
{
    return g->cancel && __atomic_load_n(g->cancel, __ATOMIC_RELAXED);
}

/* The sampled training query of routing query r of nr (evenly spaced over ns). */
static inline size_t g_route_pick(int r, int nr, size_t ns)
{
    return (size_t)r * ns / (size_t)nr;
}

/* graph_build.c: storage, codes and routing shared with graph_io.c */
/* An empty graph (no records) of rows of dim elements of dt, degree M; NULL: no memory. */
ra_graph *g_alloc(int dim, ra_dtype dt, int M, int ef, int threads, uint64_t seed);
ra_status g_reserve(ra_graph *g, size_t n);
ra_status g_fit_codes(ra_graph *g, const void *keys, size_t n);
size_t g_sample_queries(size_t nq, size_t want, uint64_t seed, size_t *idx);
ra_status g_set_routing(ra_graph *g, const float *sq, size_t ns, const int32_t *knn, int Kk);
/* Wall and CPU seconds of the process, for the build's phase log. */
void g_clock(double *wall, double *cpu);

/* graph_knn.c: the exact top-K (inner product) of queries q[nq][dim] among rows [0, n) of
 * keys, best first (ties: lower id), on g->threads threads: ids and scores [nq][K], padded
 * with -1 / -inf when n < K. RA_ENOMEM, RA_EINVAL (K out of range). */
ra_status g_exact_knn(const ra_graph *g, const void *keys, size_t n, const float *q, size_t nq,
                      int K, int32_t *ids, float *scores);

/* graph_io.c: graphs in the wire form (ra_index.h) */
ra_status ra_graph_export(const ra_graph *g, ra_graph_adj *out);
ra_status ra_graph_install(ra_graph **out, const ra_kv *kv, size_t n, const ra_graph_adj *a,
                           const float *train_q, size_t nq, const int32_t *lists, int lists_k,
                           const ra_index_opts *opts);

/* graph_build.c */
ra_status ra_graph_build_from(ra_graph **out, const ra_kv *kv, size_t n, const float *train_q,
                              size_t nq, const int32_t *lists, int lists_k,
                              const ra_index_opts *opts);
ra_status ra_graph_add(ra_graph *g, const ra_kv *kv, size_t first, size_t n);

/* graph_search.c: sets g->l_mult, the smallest factor of the default candidate list (1 to
 * 4) at which single-query walks reach `target` mean recall@min(K, 100) on nh held-out
 * queries q [nh][dim] with exact top-K lists gt [nh][K] (the graph never saw them).
 * Threads: g->threads. */
void ra_graph_calibrate(ra_graph *g, const ra_kv *kv, const float *q, size_t nh, const int32_t *gt,
                        int K);
/* graph_search.c: sets the factor when mult > 0 (clamped to G_MULT_MIN..G_MULT_MAX, an
 * atomic store: searches read it once each), returns the factor in use. */
float ra_graph_effort_mult(ra_graph *g, float mult);

/* graph_search.c: one walk for nq queries sharing this head (a GQA group); see
 * ra_backend_ops.search_group. */
ra_status ra_graph_search_group(const ra_graph *g, const ra_kv *kv, size_t nq, const float *q,
                                const ra_search_params *p, int kmax, int32_t *ids, float *scores,
                                int *n_out, ra_search_stats *st);

#endif
