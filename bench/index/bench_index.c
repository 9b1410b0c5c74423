/* ratd-bench-index: recall@k, scanned fraction, single-thread latency and build time
 * of every index backend (exact, IVF, HNSW, the attention-aware graph) on one head,
 * from synthetic data (synth.h), a trace of the reference decoder, or .npy files.
 * It exists to check RetrievalAttention's claim on ratd's own code: the graph finds
 * the top-k of out-of-distribution decode queries while scanning 1-3 % of the keys.
 *
 * Each backend is built over the head's keys (all threads), then every decode query
 * is answered one at a time on one thread for each effort setting of a sweep, and the
 * answer is compared with the exact top-k. The graph also runs its warm start (the
 * previous decode step's ids as extra entries) and an insertion check: keys appended
 * after the build, probed by queries whose exact top-k lie among them. */
#include <math.h>
#include <omp.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "npy.h"
#include "ra_backend.h"
#include "ra_kernels.h"
#include "ra_log.h"
#include "synth.h"
#include "synth_lin.h"
#ifdef RA_HAVE_TRACE
#include "ra_trace.h"
#endif

typedef struct bench_cfg {
    int synthetic;
    size_t n;
    int dim;
    int topk;
    size_t nq;
    size_t ntrain;
    uint64_t seed;
    const char *trace;
    int layer, head;
    const char *keys_npy, *queries_npy, *train_npy;
    int json;
    int threads;
    ra_dtype dtype;
    const char *indexes;
    size_t insert;
    ra_index_opts gopts;
    float rho;
    const char *efforts;
    int eval_train; /* diagnostic: evaluate on the last training queries */
    int verbose;    /* debug log: build phases and their times */
    int overlap;    /* print how much top-k sets of nearby queries overlap */
    const char *synth;
    const char *save; /* write the head's keys and queries as PREFIX.{keys,train,queries}.npy */
    int no_train;     /* build without training queries (what the queries add) */
    const char *gen;  /* synthetic generator: "calibrated" (synth.h) or "lin" (synth_lin.h) */
    int group;        /* GQA: query heads per key set (a group walk vs independent searches) */
    const char *save_graph; /* write the built graph (wire form) to this file */
    const char *load_graph; /* install this graph instead of building one */
    int cold;               /* evict the caches before each timed query (cold_evict) */
    int no_warm_start;      /* skip the graph's warm-start pass (previous ids as entries) */
} bench_cfg;

static void usage(void)
{
    fprintf(
        stderr,
        "usage: ratd-bench-index [--synthetic --n N --dim D [--queries Q] [--train T] [--rho R]]\n"
        "                        [--trace FILE [--layer L --head H]]\n"
        "                        [--keys K.npy --queries Q.npy [--train-queries T.npy]]\n"
        "                        [--topk K] [--seed S] [--json] [--threads T] [--dtype "
        "f16|bf16|f32]\n"
        "                        [--index graph,ivf,hnsw,flat,pscan] [--insert N] [--efforts "
        "a,b,c]\n"
        "                        [--knn K] [--degree M] [--build-ef E] [--entries E] [--ntrain "
        "N|all]\n"
        "                        [--synth knob=v,...] [--overlap] [--no-train] [--eval-train] "
        "[--verbose]\n"
        "                        [--save PREFIX] [--gen calibrated|lin] [--group G]\n"
        "                        [--save-graph FILE] [--load-graph FILE] [--cold]\n"
        "                        [--no-warm-start]\n"
        "  --cold: before each timed query, read through a buffer of twice the last-level\n"
        "          cache (at least 512 MiB; not timed), so that every search starts with the\n"
        "          index in DRAM, as in the daemon, where a model's graphs do not fit in L3\n"
        "  --no-warm-start: skip the graph's pass with the previous query's ids as entries\n"
        "  us/q is the mean wall time per query, med its median (search calls only); hash:\n"
        "  FNV-1a of every query's set of returned ids, to tell whether two builds answer alike\n");
}

static int parse_args(int argc, char **argv, bench_cfg *c)
{
    memset(c, 0, sizeof *c);
    c->n = 32768;
    c->dim = 128;
    c->topk = 100;
    c->nq = 500;
    c->ntrain = 4096;
    c->seed = 1;
    c->layer = 3;
    c->head = 5;
    c->dtype = RA_DTYPE_F16;
    c->indexes = "flat,ivf,hnsw,graph";
    c->insert = 8192;
    c->rho = -1.0f;
    c->gen = "calibrated";
    c->group = 1;
    const char *qarg = NULL;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        const char *v = i + 1 < argc ? argv[i + 1] : NULL;
#define NEEDV                                                                                      \
    do {                                                                                           \
        if (!v) {                                                                                  \
            fprintf(stderr, "%s needs a value\n", a);                                              \
            return -1;                                                                             \
        }                                                                                          \
        i++;                                                                                       \
    } while (0)
        if (!strcmp(a, "--synthetic"))
            c->synthetic = 1;
        else if (!strcmp(a, "--eval-train"))
            c->eval_train = 1;
        else if (!strcmp(a, "--no-train"))
            c->no_train = 1;
        else if (!strcmp(a, "--verbose"))
            c->verbose = 1;
        else if (!strcmp(a, "--overlap"))
            c->overlap = 1;
        else if (!strcmp(a, "--cold"))
            c->cold = 1;
        else if (!strcmp(a, "--no-warm-start"))
            c->no_warm_start = 1;
        else if (!strcmp(a, "--synth")) {
            NEEDV;
            c->synth = v;
        } else if (!strcmp(a, "--save")) {
            NEEDV;
            c->save = v;
        } else if (!strcmp(a, "--json"))
            c->json = 1;
        else if (!strcmp(a, "--n")) {
            NEEDV;
            c->n = strtoull(v, NULL, 10);
        } else if (!strcmp(a, "--dim")) {
            NEEDV;
            c->dim = atoi(v);
        } else if (!strcmp(a, "--topk")) {
            NEEDV;
            c->topk = atoi(v);
        } else if (!strcmp(a, "--queries")) {
            NEEDV;
            qarg = v;
        } else if (!strcmp(a, "--train")) {
            NEEDV;
            c->ntrain = strtoull(v, NULL, 10);
        } else if (!strcmp(a, "--seed")) {
            NEEDV;
            c->seed = strtoull(v, NULL, 10);
        } else if (!strcmp(a, "--trace")) {
            NEEDV;
            c->trace = v;
        } else if (!strcmp(a, "--layer")) {
            NEEDV;
            c->layer = atoi(v);
        } else if (!strcmp(a, "--head")) {
            NEEDV;
            c->head = atoi(v);
        } else if (!strcmp(a, "--keys")) {
            NEEDV;
            c->keys_npy = v;
        } else if (!strcmp(a, "--train-queries")) {
            NEEDV;
            c->train_npy = v;
        } else if (!strcmp(a, "--threads")) {
            NEEDV;
            c->threads = atoi(v);
        } else if (!strcmp(a, "--dtype")) {
            NEEDV;
            c->dtype = !strcmp(v, "f32")    ? RA_DTYPE_F32
                       : !strcmp(v, "bf16") ? RA_DTYPE_BF16
                                            : RA_DTYPE_F16;
        } else if (!strcmp(a, "--index")) {
            NEEDV;
            c->indexes = v;
        } else if (!strcmp(a, "--insert")) {
            NEEDV;
            c->insert = strtoull(v, NULL, 10);
        } else if (!strcmp(a, "--efforts")) {
            NEEDV;
            c->efforts = v;
        } else if (!strcmp(a, "--rho")) {
            NEEDV;
            c->rho = (float)atof(v);
        } else if (!strcmp(a, "--knn")) {
            NEEDV;
            c->gopts.graph_knn = atoi(v);
        } else if (!strcmp(a, "--degree")) {
            NEEDV;
            c->gopts.graph_degree = atoi(v);
        } else if (!strcmp(a, "--build-ef")) {
            NEEDV;
            c->gopts.graph_build_ef = atoi(v);
        } else if (!strcmp(a, "--entries")) {
            NEEDV;
            c->gopts.graph_entries = atoi(v);
        } else if (!strcmp(a, "--ntrain")) { /* "all": every training query (issue 12 item 3) */
            NEEDV;
            c->gopts.n_train = !strcmp(v, "all") ? 1000000 : atoi(v);
        } else if (!strcmp(a, "--gen")) {
            NEEDV;
            c->gen = v;
        } else if (!strcmp(a, "--save-graph")) {
            NEEDV;
            c->save_graph = v;
        } else if (!strcmp(a, "--load-graph")) {
            NEEDV;
            c->load_graph = v;
        } else if (!strcmp(a, "--group")) {
            NEEDV;
            c->group = atoi(v);
        } else if (!strcmp(a, "-h") || !strcmp(a, "--help")) {
            usage();
            exit(0);
        } else {
            fprintf(stderr, "unknown argument %s\n", a);
            return -1;
        }
    }
    if (qarg) {
        if (c->keys_npy)
            c->queries_npy = qarg;
        else
            c->nq = strtoull(qarg, NULL, 10);
    }
    if (!c->synthetic && !c->trace && !c->keys_npy)
        c->synthetic = 1;
    if (c->topk < 1 || c->topk > 4096 || c->dim < 2 || c->dim > 4096 || c->nq < 1 || c->n < 2 ||
        c->threads < 0) {
        fprintf(stderr, "bad sizes\n");
        return -1;
    }
    if (strcmp(c->gen, "calibrated") && strcmp(c->gen, "lin")) {
        fprintf(stderr, "--gen: calibrated or lin, not %s\n", c->gen);
        return -1;
    }
    if (c->group < 1 || c->group > 64 || (c->group > 1 && c->keys_npy) ||
        (c->group > 1 && c->synthetic && !c->trace && !strcmp(c->gen, "calibrated"))) {
        fprintf(stderr, "--group: 1..64 query heads per key set, with --gen lin or --trace "
                        "(the calibrated generator has one query stream)\n");
        return -1;
    }
    if (c->keys_npy && !c->queries_npy) {
        fprintf(stderr, "--keys needs --queries Q.npy\n");
        return -1;
    }
    return 0;
}

/* ---- data ---- */

typedef struct bench_data {
    size_t n, nt, nq, nins, nqins;
    int dim;
    int G;          /* query heads sharing the keys; queries are [G][nq][dim], train all G */
    float *keys;    /* [n + nins][dim]: the first n are built, the rest inserted */
    float *train;   /* [nt][dim] */
    float *queries; /* [G][nq][dim] decode order */
    float *qins;    /* [nqins][dim] queries aimed at the inserted keys */
    char desc[256];
} bench_data;

static void data_free(bench_data *d)
{
    free(d->keys);
    free(d->train);
    free(d->queries);
    free(d->qins);
}

/* Inserted keys and the queries that probe them (synthetic and npy): a new "topic" of
 * keys (ordinary keys plus a shared direction u), and decode queries plus a multiple
 * of u, strong enough that their exact top-k fall among the new keys. */
static int make_insert_set(bench_data *d, size_t nins, const float *pool_keys, size_t npool,
                           uint64_t seed)
{
    int D = d->dim;
    if (nins == 0)
        return 0;
    float *k2 = realloc(d->keys, (d->n + nins) * (size_t)D * sizeof *k2);
    if (!k2)
        return -1;
    d->keys = k2;
    /* key spread, for scaling u */
    double var = 0;
    double *mu = calloc((size_t)D, sizeof *mu);
    size_t m = d->n < 4096 ? d->n : 4096;
    for (size_t i = 0; i < m; i++)
        for (int j = 0; j < D; j++)
            mu[j] += d->keys[i * D + j] / (double)m;
    for (size_t i = 0; i < m; i++)
        for (int j = 0; j < D; j++) {
            double t = d->keys[i * D + j] - mu[j];
            var += t * t / (double)m;
        }
    double spread = sqrt(var);
    float *u = malloc((size_t)D * sizeof *u);
    uint64_t s = seed * 977 + 13;
    double nn = 0;
    for (int j = 0; j < D; j++) {
        s = s * 6364136223846793005ull + 1442695040888963407ull;
        u[j] = (float)((double)(s >> 11) / 9007199254740992.0 - 0.5);
        nn += (double)u[j] * u[j];
    }
    for (int j = 0; j < D; j++)
        u[j] = (float)(u[j] / sqrt(nn));
    for (size_t i = 0; i < nins; i++) {
        const float *src = pool_keys + ((i * 7919u) % npool) * D;
        float *dst = d->keys + (d->n + i) * D;
        for (int j = 0; j < D; j++)
            dst[j] = src[j] + (float)(1.0 * spread) * u[j];
    }
    d->nins = nins;
    d->nqins = d->nq < 200 ? d->nq : 200;
    d->qins = malloc(d->nqins * (size_t)D * sizeof *d->qins);
    if (!d->qins) {
        free(u);
        free(mu);
        return -1;
    }
    double qn = 0;
    for (size_t i = 0; i < d->nqins; i++)
        for (int j = 0; j < D; j++)
            qn += (double)d->queries[i * D + j] * d->queries[i * D + j] / (double)d->nqins;
    qn = sqrt(qn);
    for (size_t i = 0; i < d->nqins; i++)
        for (int j = 0; j < D; j++)
            d->qins[i * D + j] = d->queries[i * D + j] + (float)(3.0 * qn) * u[j];
    free(u);
    free(mu);
    return 0;
}

static int load_synthetic(const bench_cfg *c, bench_data *d)
{
    ra_synth_opts o;
    ra_synth_opts_default(&o);
    o.n = c->n + c->insert;
    o.dim = c->dim;
    o.n_train = c->ntrain;
    o.n_queries = c->nq;
    o.seed = c->seed;
    if (c->rho >= 0)
        o.rho = c->rho;
    char err[256];
    if (c->synth && ra_synth_opts_apply(&o, c->synth, err, sizeof err) != RA_OK) {
        fprintf(stderr, "%s\n", err);
        return -1;
    }
    ra_synth s;
    ra_status st = ra_synth_make(&o, &s);
    if (st) {
        fprintf(stderr, "synthetic data: %s\n", ra_strerror(st));
        return -1;
    }
    d->n = c->n;
    d->dim = c->dim;
    d->keys = s.keys; /* the last `insert` keys are later positions: decode-time tokens */
    d->train = s.train_q;
    d->queries = s.queries;
    d->nt = s.n_train;
    d->nq = s.n_queries;
    snprintf(d->desc, sizeof d->desc, "synthetic n=%zu dim=%d seed=%llu rho=%.2f", c->n, c->dim,
             (unsigned long long)c->seed, (double)o.rho);
    /* inserted keys: the generator's own later keys shifted by a new topic */
    if (c->insert) {
        float *tail = malloc(c->insert * (size_t)c->dim * sizeof *tail);
        if (!tail)
            return -1;
        memcpy(tail, s.keys + c->n * (size_t)c->dim, c->insert * (size_t)c->dim * sizeof *tail);
        int rc = make_insert_set(d, c->insert, tail, c->insert, c->seed);
        free(tail);
        return rc;
    }
    return 0;
}

/* The hidden-state generator (synth_lin.h): G query heads on one key set. No insertion
 * check (it needs queries aimed at the inserted keys; the calibrated generator has it). */
static int load_lin(const bench_cfg *c, bench_data *d)
{
    ra_synth_lin_opts o;
    ra_synth_lin_opts_default(&o);
    o.n = c->n;
    o.dim = c->dim;
    o.n_rep = c->group;
    o.n_train = c->ntrain;
    o.n_queries = c->nq;
    o.seed = c->seed;
    ra_synth_group s;
    ra_status st = ra_synth_lin_make(&o, &s);
    if (st) {
        fprintf(stderr, "lin generator: %s\n", ra_strerror(st));
        return -1;
    }
    d->n = c->n;
    d->dim = c->dim;
    d->G = c->group;
    d->keys = s.keys;
    d->train = s.train_q;
    d->nt = s.n_train * (size_t)c->group;
    d->queries = s.queries;
    d->nq = s.n_queries;
    snprintf(d->desc, sizeof d->desc, "lin n=%zu dim=%d seed=%llu group=%d", c->n, c->dim,
             (unsigned long long)c->seed, c->group);
    return 0;
}

static int load_npy(const bench_cfg *c, bench_data *d)
{
    char err[512];
    size_t r, cc, r2, c2;
    if (ra_npy_read_f32(c->keys_npy, &d->keys, &r, &cc, err, sizeof err) != RA_OK) {
        fprintf(stderr, "%s\n", err);
        return -1;
    }
    if (ra_npy_read_f32(c->queries_npy, &d->queries, &r2, &c2, err, sizeof err) != RA_OK) {
        fprintf(stderr, "%s\n", err);
        return -1;
    }
    if (c2 != cc) {
        fprintf(stderr, "queries have %zu columns, keys %zu\n", c2, cc);
        return -1;
    }
    d->dim = (int)cc;
    d->n = r;
    d->nq = r2;
    if (c->train_npy) {
        if (ra_npy_read_f32(c->train_npy, &d->train, &d->nt, &c2, err, sizeof err) != RA_OK) {
            fprintf(stderr, "%s\n", err);
            return -1;
        }
        if (c2 != cc) {
            fprintf(stderr, "train queries have %zu columns, keys %zu\n", c2, cc);
            return -1;
        }
    } else { /* no prefill queries given: the decode queries train (optimistic) */
        d->nt = d->nq;
        d->train = malloc(d->nt * cc * sizeof *d->train);
        if (!d->train)
            return -1;
        memcpy(d->train, d->queries, d->nt * cc * sizeof *d->train);
        fprintf(stderr, "note: no --train-queries: the graph is built from the decode queries\n");
    }
    snprintf(d->desc, sizeof d->desc, "npy keys=%s (%zu x %zu) queries=%zu", c->keys_npy, r, cc,
             r2);
    size_t nins = c->insert < d->n / 4 ? c->insert : d->n / 4;
    if (nins) { /* the last keys are held out and inserted */
        d->n -= nins;
        float *pool = malloc(nins * cc * sizeof *pool);
        if (!pool)
            return -1;
        memcpy(pool, d->keys + d->n * cc, nins * cc * sizeof *pool);
        int rc = make_insert_set(d, nins, pool, nins, c->seed);
        free(pool);
        return rc;
    }
    return 0;
}

#ifdef RA_HAVE_TRACE
/* One head of a trace: keys = K rows except the sink (first 128) and the window (last
 * 512 positions, the defaults of ratd-lm-eval), prefill queries = every query row before the
 * window, decode queries = the last positions (the window's queries, in order). */
static int load_trace(const bench_cfg *c, bench_data *d)
{
    char err[512];
    ra_trace *t = NULL;
    if (ra_trace_open(c->trace, &t, err, sizeof err) != RA_OK) {
        fprintf(stderr, "%s\n", err);
        return -1;
    }
    const ra_trace_info *in = ra_trace_get_info(t);
    if (c->layer < 0 || (uint32_t)c->layer >= in->n_layers || c->head < 0 ||
        (uint32_t)c->head >= in->n_heads) {
        fprintf(stderr, "layer %d head %d out of range (%u layers, %u heads)\n", c->layer, c->head,
                in->n_layers, in->n_heads);
        ra_trace_close(t);
        return -1;
    }
    uint32_t P = in->n_pos, D = in->head_dim, sink = 128, window = 512; /* ratd-lm-eval defaults */
    if (P < sink + window + 256) {
        fprintf(stderr, "trace too short (%u positions)\n", P);
        ra_trace_close(t);
        return -1;
    }
    uint32_t rep = in->n_heads / in->n_kv_heads;
    uint32_t kvh = (uint32_t)c->head / rep;
    /* --group: every query head of this KV head (the real GQA group) */
    uint32_t G = c->group > 1 ? rep : 1, h0 = G > 1 ? kvh * rep : (uint32_t)c->head;
    float *K = malloc((size_t)P * D * sizeof *K), *Q = malloc((size_t)G * P * D * sizeof *Q);
    int bad = !K || !Q || ra_trace_read(t, RA_TRACE_K, (uint32_t)c->layer, kvh, 0, P, K) != RA_OK;
    for (uint32_t j = 0; !bad && j < G; j++)
        bad = ra_trace_read(t, RA_TRACE_Q, (uint32_t)c->layer, h0 + j, 0, P,
                            Q + (size_t)j * P * D) != RA_OK;
    if (bad) {
        fprintf(stderr, "trace read failed\n");
        free(K);
        free(Q);
        ra_trace_close(t);
        return -1;
    }
    ra_trace_close(t);
    size_t nk = P - sink - window;
    d->dim = (int)D;
    d->G = (int)G;
    d->n = nk;
    d->keys = malloc(nk * D * sizeof *d->keys);
    size_t nt1 = P - window;
    d->nt = nt1 * G;
    d->train = malloc(d->nt * D * sizeof *d->train);
    d->nq = window < c->nq ? window : c->nq;
    d->queries = malloc(G * d->nq * D * sizeof *d->queries);
    if (!d->keys || !d->train || !d->queries) {
        free(K);
        free(Q);
        return -1;
    }
    memcpy(d->keys, K + (size_t)sink * D, nk * D * sizeof *K);
    for (uint32_t j = 0; j < G; j++) {
        const float *Qj = Q + (size_t)j * P * D;
        memcpy(d->train + j * nt1 * D, Qj, nt1 * D * sizeof *Q);
        memcpy(d->queries + j * d->nq * D, Qj + (size_t)(P - d->nq) * D, d->nq * D * sizeof *Q);
    }
    free(K);
    free(Q);
    snprintf(d->desc, sizeof d->desc, "trace %s layer %d head %d (kv head %u): %zu keys, dim %u",
             c->trace, c->layer, c->head, kvh, nk, D);
    /* insertion: the last quarter (up to --insert) of the keys is held out */
    size_t nins = G > 1 ? 0 : c->insert < d->n / 4 ? c->insert : d->n / 4;
    if (nins) {
        d->n -= nins;
        float *pool = malloc(nins * D * sizeof *pool);
        if (!pool)
            return -1;
        memcpy(pool, d->keys + d->n * D, nins * D * sizeof *pool);
        int rc = make_insert_set(d, nins, pool, nins, c->seed);
        free(pool);
        return rc;
    }
    return 0;
}
#endif

/* ---- measurement ---- */

typedef struct sweep_out {
    double recall, scanned_frac, us, hops;
    double cpu_us; /* thread CPU time per query: steadier than us on a shared machine */
    double us_med; /* median wall time of one search call */
    uint64_t hash; /* of every query's set of returned ids: equal answers, equal hashes */
} sweep_out;

static int cmp_i32(const void *a, const void *b)
{
    int32_t x = *(const int32_t *)a, y = *(const int32_t *)b;
    return x < y ? -1 : x > y;
}

/* FNV-1a over one query's ids, in id order. Not over the scores, nor the ids' order,
 * which follows the scores: a key's exact score may differ in its last bit with its
 * position in a rescoring batch (a kernel's 4-row and 1-row paths sum in other orders). */
static uint64_t ids_hash(uint64_t h, const int32_t *ids, int n)
{
    int32_t s[4096];
    n = n < 4096 ? n : 4096;
    memcpy(s, ids, (size_t)n * sizeof *s);
    qsort(s, (size_t)n, sizeof *s, cmp_i32);
    const unsigned char *b = (const unsigned char *)s;
    for (size_t i = 0; i < (size_t)n * sizeof *s; i++)
        h = (h ^ b[i]) * 1099511628211ull;
    return (h ^ 0xff) * 1099511628211ull; /* the query's end */
}

static double thread_cpu_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

/* --cold: a buffer of twice the last-level cache, read through (one load per line, on
 * the build's threads) before each timed query. Reading is enough: the index's lines are
 * clean, and a write pass would leave dirty lines whose write-backs land in the next
 * timed search. What a query touches of a head (~10,000 records, a few MB) stays in a
 * 300 MiB L3 across hundreds of queries, so cycling over copies of the head would not
 * make it cold; this costs ~50 ms a query instead, outside the timed region. */
static struct {
    uint64_t *buf;
    size_t words;
    int threads;
    volatile uint64_t sink;
} cold;

static int cold_init(int threads)
{
    long l3 = sysconf(_SC_LEVEL3_CACHE_SIZE);
    size_t bytes = l3 > 0 ? 2 * (size_t)l3 : 0;
    if (bytes < ((size_t)512 << 20))
        bytes = (size_t)512 << 20;
    cold.words = bytes / sizeof *cold.buf;
    cold.buf = malloc(bytes);
    if (!cold.buf)
        return -1;
    for (size_t i = 0; i < cold.words; i++) /* touched once: no page faults later */
        cold.buf[i] = i;
    cold.threads = threads;
    return 0;
}

static void cold_evict(void)
{
    if (!cold.buf)
        return;
    uint64_t s = 0;
    size_t w = cold.words;
#pragma omp parallel for num_threads(cold.threads) reduction(+ : s) schedule(static)
    for (size_t i = 0; i < w; i += 8)
        s += cold.buf[i];
    cold.sink += s;
}

static int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

static double median(double *x, size_t n)
{
    qsort(x, n, sizeof *x, cmp_double);
    return n % 2 ? x[n / 2] : 0.5 * (x[n / 2 - 1] + x[n / 2]);
}

/* Runs nq queries one at a time on this thread; recall against gt [nq][k]. warm: pass
 * the previous query's ids as warm entries (decode order). */
static int run_queries(const ra_backend_ops *ops, void *st, const ra_kv *kv, size_t n,
                       const float *q, size_t nq, int dim, int k, int effort, int warm,
                       const int32_t *gt, sweep_out *o)
{
    int32_t *ids = malloc((size_t)k * sizeof *ids), *prev = malloc((size_t)k * sizeof *prev);
    float *sc = malloc((size_t)k * sizeof *sc);
    double *tq = malloc(nq * sizeof *tq);
    if (!ids || !prev || !sc || !tq) {
        free(ids), free(prev), free(sc), free(tq);
        return -1;
    }
    int nprev = 0;
    double hit = 0, scanned = 0, hops = 0, wall = 0, cpu = 0;
    o->hash = 14695981039346656037ull;
    for (size_t i = 0; i < nq; i++) {
        ra_search_params p = {.k = k,
                              .effort = effort,
                              .warm = warm && nprev ? prev : NULL,
                              .n_warm = warm ? nprev : 0};

        ra_search_stats ss = {0};
        int got = 0;
        cold_evict();
        double t0 = ra_now_s(), c0 = thread_cpu_s();
        ra_status s = ops->search(st, kv, q + i * (size_t)dim, &p, ids, sc, &got, &ss);
        tq[i] = ra_now_s() - t0;
        cpu += thread_cpu_s() - c0;
        wall += tq[i];
        if (s) {
            fprintf(stderr, "%s search: %s\n", ops->name, ra_strerror(s));
            free(ids), free(prev), free(sc), free(tq);
            return -1;
        }
        scanned += (double)ss.scanned;
        hops += (double)ss.hops;
        o->hash = ids_hash(o->hash, ids, got);
        /* recall: members of the exact top-k found (both lists are small) */
        const int32_t *g = gt + i * (size_t)k;
        int kk = (size_t)k < n ? k : (int)n;
        for (int a = 0; a < got; a++)
            for (int b = 0; b < kk; b++)
                if (ids[a] == g[b]) {
                    hit += 1;
                    break;
                }
        memcpy(prev, ids, (size_t)got * sizeof *ids);
        nprev = got;
    }
    o->cpu_us = cpu * 1e6 / (double)nq;
    int kk = (size_t)k < n ? k : (int)n;
    o->recall = hit / ((double)nq * kk);
    o->scanned_frac = scanned / ((double)nq * (double)n);
    o->us = wall * 1e6 / (double)nq;
    o->us_med = median(tq, nq) * 1e6;
    o->hops = hops / (double)nq;
    free(ids), free(prev), free(sc), free(tq);
    return 0;
}

/* GQA: the G query heads of each decode step in one group walk (search_group; one search
 * per head for backends without it), warm ids per head from its previous step. Recall per
 * head against gt [G][nq][k]; scanned and time are per query head (a walk's keys / G). */
static int run_group(const ra_backend_ops *ops, void *st, const ra_kv *kv, size_t n, const float *q,
                     size_t nq, int G, int dim, int k, int effort, const int32_t *gt, sweep_out *o)
{
    int32_t *ids = malloc((size_t)G * k * sizeof *ids),
            *prev = malloc((size_t)G * k * sizeof *prev);
    float *sc = malloc((size_t)G * k * sizeof *sc), *qs = malloc((size_t)G * dim * sizeof *qs);
    ra_search_params *p = malloc((size_t)G * sizeof *p);
    ra_search_stats *ss = malloc((size_t)G * sizeof *ss);
    int *got = calloc((size_t)G, sizeof *got), *nprev = calloc((size_t)G, sizeof *nprev);
    double *tq = malloc(nq * sizeof *tq);
    int rc = -1;
    if (!ids || !prev || !sc || !qs || !p || !ss || !got || !nprev || !tq)
        goto done;
    double hit = 0, scanned = 0, hops = 0, wall = 0, cpu = 0;
    int kk = (size_t)k < n ? k : (int)n;
    o->hash = 14695981039346656037ull;
    for (size_t i = 0; i < nq; i++) {
        for (int j = 0; j < G; j++) {
            memcpy(qs + (size_t)j * dim, q + ((size_t)j * nq + i) * dim, (size_t)dim * sizeof *qs);
            p[j] = (ra_search_params){
                .k = k, .effort = effort, .warm = prev + (size_t)j * k, .n_warm = nprev[j]};
        }
        ra_status s = RA_OK;
        cold_evict();
        double t0 = ra_now_s(), c0 = thread_cpu_s();
        if (ops->search_group) {
            s = ops->search_group(st, kv, (size_t)G, qs, p, k, ids, sc, got, ss);
            scanned += (double)ss[0].scanned;
            hops += (double)ss[0].hops;
        } else {
            for (int j = 0; j < G && !s; j++) {
                s = ops->search(st, kv, qs + (size_t)j * dim, &p[j], ids + (size_t)j * k,
                                sc + (size_t)j * k, &got[j], &ss[j]);
                scanned += (double)ss[j].scanned;
                hops += (double)ss[j].hops;
            }
        }
        tq[i] = (ra_now_s() - t0) / G;
        cpu += thread_cpu_s() - c0;
        wall += tq[i] * G;
        if (s) {
            fprintf(stderr, "%s group search: %s\n", ops->name, ra_strerror(s));
            goto done;
        }
        for (int j = 0; j < G; j++) {
            const int32_t *g = gt + ((size_t)j * nq + i) * k;
            o->hash = ids_hash(o->hash, ids + (size_t)j * k, got[j]);
            for (int a = 0; a < got[j]; a++)
                for (int b = 0; b < kk; b++)
                    if (ids[(size_t)j * k + a] == g[b]) {
                        hit += 1;
                        break;
                    }
            memcpy(prev + (size_t)j * k, ids + (size_t)j * k, (size_t)got[j] * sizeof *ids);
            nprev[j] = got[j] < 32 ? got[j] : 32; /* as the daemon keeps them */
        }
    }
    o->cpu_us = cpu * 1e6 / ((double)nq * G);
    o->recall = hit / ((double)nq * G * kk);
    o->scanned_frac = scanned / ((double)nq * G * (double)n);
    o->us = wall * 1e6 / ((double)nq * G);
    o->us_med = median(tq, nq) * 1e6;
    o->hops = hops / ((double)nq * G);
    rc = 0;
done:
    free(ids), free(prev), free(sc), free(qs), free(p), free(ss), free(got), free(nprev), free(tq);
    return rc;
}

static void emit(const bench_cfg *c, const char *index, const char *params, const sweep_out *o,
                 double build_s, const char *extra)
{
    if (c->json)
        printf(
            "{\"index\":\"%s\",\"params\":\"%s\",\"recall\":%.4f,\"scanned_frac\":%.5f,"
            "\"us_per_query\":%.1f,\"us_median\":%.1f,\"cpu_us_per_query\":%.1f,\"build_s\":%.3f,"
            "\"hops\":%.1f,\"cold\":%d,\"hash\":\"%016llx\"%s%s}\n",
            index, params, o->recall, o->scanned_frac, o->us, o->us_med, o->cpu_us, build_s,
            o->hops, c->cold, (unsigned long long)o->hash, extra ? "," : "", extra ? extra : "");
    else
        printf("%-6s %-22s recall %.4f  scanned %.5f  %9.1f us/q (med %.1f, cpu %.1f)%s  build "
               "%.2fs hash %016llx %s\n",
               index, params, o->recall, o->scanned_frac, o->us, o->us_med, o->cpu_us,
               c->cold ? " cold" : "", build_s, (unsigned long long)o->hash, extra ? extra : "");
    fflush(stdout);
}

/* Appends the held-back keys to the store, inserts them into the built index, and
 * probes with queries whose exact top-k lie (mostly) among them. Must run last: it
 * grows the store the other backends were built on. */
static void insert_check(const bench_cfg *c, const bench_data *d, ra_kv *kv,
                         const ra_backend_ops *ops, void *st, const int *eff, int ne)
{
    int D = d->dim, k = c->topk;
    size_t es = ra_dtype_size(c->dtype), tot = d->n + d->nins;
    void *buf = malloc(d->nins * (size_t)D * es);
    int64_t *pos = malloc(d->nins * sizeof *pos);
    int32_t *gt = malloc(d->nqins * (size_t)k * sizeof *gt);
    float *gts = malloc(d->nqins * (size_t)k * sizeof *gts);
    if (!buf || !pos || !gt || !gts)
        goto done;
    ra_kern_from_f32(d->keys + d->n * (size_t)D, c->dtype, d->nins * (size_t)D, buf);
    for (size_t i = 0; i < d->nins; i++)
        pos[i] = (int64_t)(d->n + i);
    ra_status as = ra_kv_append(kv, buf, buf, pos, d->nins);
    if (as != RA_OK) {
        fprintf(stderr, "insertion check: appending %zu keys: %s\n", d->nins, ra_strerror(as));
        goto done;
    }
    omp_set_num_threads(c->threads ? c->threads : (int)sysconf(_SC_NPROCESSORS_ONLN));
    double t0 = ra_now_s();
    ra_status s = ops->add(st, kv, d->n, d->nins);
    double add_s = ra_now_s() - t0;
    if (s) {
        fprintf(stderr, "%s add: %s\n", ops->name, ra_strerror(s));
        goto done;
    }
    if (ra_exact_knn_batch(kv, tot, d->qins, d->nqins, k, gt, gts) != RA_OK)
        goto done;
    size_t in_new = 0;
    for (size_t i = 0; i < d->nqins * (size_t)k; i++)
        in_new += (size_t)gt[i] >= d->n;
    double frac = (double)in_new / ((double)d->nqins * k);
    omp_set_num_threads(1);
    for (int e = 0; e < ne; e++) {
        sweep_out so;
        if (run_queries(ops, st, kv, tot, d->qins, d->nqins, D, k, eff[e], 0, gt, &so))
            break;
        char params[64], extra[160];
        snprintf(params, sizeof params, "effort=%d,inserted", eff[e]);
        if (c->json)
            snprintf(extra, sizeof extra,
                     "\"inserted\":%zu,\"insert_s\":%.3f,\"gt_in_inserted\":%.3f", d->nins, add_s,
                     frac);
        else
            snprintf(extra, sizeof extra, "(+%zu keys in %.2fs; %.1f%% of true top-k inserted)",
                     d->nins, add_s, 100.0 * frac);
        emit(c, ops->name, params, &so, add_s, extra);
    }
done:
    free(buf);
    free(pos);
    free(gt);
    free(gts);
}

/* ---- graph files (--save-graph / --load-graph): the wire form of ra_graph_adj, as
 * "RAGRAPH1", u64 n, u32 M, u32 n_entries, int32 adj [n][M], int32 entries, host order */

static int graph_save(const char *path, const ra_graph_adj *a)
{
    FILE *f = fopen(path, "wb");
    if (!f) {
        fprintf(stderr, "--save-graph: cannot create %s\n", path);
        return -1;
    }
    uint64_t n = a->n;
    uint32_t M = (uint32_t)a->M, ne = (uint32_t)a->n_entries;
    int ok = fwrite("RAGRAPH1", 1, 8, f) == 8 && fwrite(&n, sizeof n, 1, f) == 1 &&
             fwrite(&M, sizeof M, 1, f) == 1 && fwrite(&ne, sizeof ne, 1, f) == 1 &&
             fwrite(a->adj, sizeof(int32_t) * M, a->n, f) == a->n &&
             fwrite(a->entries, sizeof(int32_t), ne, f) == ne;
    if (fclose(f) != 0 || !ok) {
        fprintf(stderr, "--save-graph: writing %s failed\n", path);
        return -1;
    }
    return 0;
}

static int graph_load(const char *path, ra_graph_adj *a)
{
    memset(a, 0, sizeof *a);
    FILE *f = fopen(path, "rb");
    if (!f) {
        fprintf(stderr, "--load-graph: cannot open %s\n", path);
        return -1;
    }
    char magic[8];
    uint64_t n = 0;
    uint32_t M = 0, ne = 0;
    int ok = fread(magic, 1, 8, f) == 8 && !memcmp(magic, "RAGRAPH1", 8) &&
             fread(&n, sizeof n, 1, f) == 1 && fread(&M, sizeof M, 1, f) == 1 &&
             fread(&ne, sizeof ne, 1, f) == 1 && n >= 1 && n <= RA_KV_MAX_ROWS && M >= 1 &&
             M <= RA_GRAPH_MAX_DEGREE && ne >= 1 && ne <= RA_GRAPH_MAX_ENTRIES;
    if (ok) {
        a->adj = malloc(n * M * sizeof *a->adj);
        a->entries = malloc(ne * sizeof *a->entries);
        ok = a->adj && a->entries && fread(a->adj, sizeof(int32_t) * M, n, f) == n &&
             fread(a->entries, sizeof(int32_t), ne, f) == ne && fgetc(f) == EOF;
    }
    fclose(f);
    if (!ok) {
        fprintf(stderr, "--load-graph: %s is not a graph file (or truncated)\n", path);
        ra_graph_adj_fini(a);
        return -1;
    }
    a->n = n;
    a->M = (int)M;
    a->n_entries = (int)ne;
    return 0;
}

static int parse_list(const char *s, int *out, int max)
{
    int n = 0;
    while (s && *s && n < max) {
        out[n++] = atoi(s);
        s = strchr(s, ',');
        if (s)
            s++;
    }
    return n;
}

static int has_index(const char *list, const char *name)
{
    size_t l = strlen(name);
    for (const char *p = list; (p = strstr(p, name)); p += l)
        if ((p == list || p[-1] == ',') && (p[l] == 0 || p[l] == ','))
            return 1;
    return 0;
}

int main(int argc, char **argv)
{
    bench_cfg c;
    bench_data d = {0};
    ra_kv *kv = NULL;
    int rc = 1;
    if (parse_args(argc, argv, &c))
        return (usage(), 2);
    ra_log_set_level(c.verbose ? RA_LOG_DEBUG : RA_LOG_WARN);
    int rcl;
    if (c.trace) {
#ifdef RA_HAVE_TRACE
        rcl = load_trace(&c, &d);
#else
        fprintf(stderr, "--trace: built without the trace reader (bench/lm)\n");
        rcl = -1;
#endif
    } else if (c.keys_npy) {
        rcl = load_npy(&c, &d);
    } else if (!strcmp(c.gen, "lin")) {
        rcl = load_lin(&c, &d);
    } else {
        rcl = load_synthetic(&c, &d);
    }
    if (rcl)
        goto out;
    if (d.G < 1)
        d.G = 1;
    size_t NQ = d.nq * (size_t)d.G; /* every query head's decode queries, head-major */
    int D = d.dim, k = c.topk;
    if (c.eval_train && d.nt >= d.nq) /* in-sample: is the graph itself sound? */
        memcpy(d.queries, d.train + (d.nt - d.nq) * (size_t)D,
               d.nq * (size_t)D * sizeof *d.queries);
    int threads = c.threads ? c.threads : (int)sysconf(_SC_NPROCESSORS_ONLN);
    if (c.cold && cold_init(threads)) {
        fprintf(stderr, "--cold: no memory for the eviction buffer\n");
        goto out;
    }
    double ratio = 0;
    ra_synth_mahalanobis_ratio(d.keys, d.n, d.queries, NQ, D, &ratio);
    double cosq = ra_synth_step_cosine(d.queries, NQ, D);
    if (c.json)
        printf(
            "{\"data\":\"%s\",\"n\":%zu,\"dim\":%d,\"n_train\":%zu,\"n_queries\":%zu,\"topk\":%d,"
            "\"mahalanobis_ratio\":%.3f,\"step_cosine\":%.3f,\"threads\":%d,\"isa\":\"%s\"}\n",
            d.desc, d.n, D, d.nt, NQ, k, ratio, cosq, threads, ra_kern_isa_name(ra_kern_isa_get()));
    else
        printf("# %s\n# n=%zu dim=%d train=%zu queries=%zu topk=%d threads=%d isa=%s\n"
               "# Mahalanobis ratio (queries vs held-out keys) %.3f, step cosine %.3f\n",
               d.desc, d.n, D, d.nt, NQ, k, threads, ra_kern_isa_name(ra_kern_isa_get()), ratio,
               cosq);
    fflush(stdout);

    if (c.save) { /* the built keys, the training and the decode queries, for other tools */
        const struct {
            const char *what;
            const float *x;
            size_t rows;
        } out[3] = {{"keys", d.keys, d.n}, {"train", d.train, d.nt}, {"queries", d.queries, NQ}};
        for (int i = 0; i < 3; i++) {
            char path[4096], err[512];
            if (!out[i].rows)
                continue;
            snprintf(path, sizeof path, "%s.%s.npy", c.save, out[i].what);
            if (ra_npy_write_f32(path, out[i].x, out[i].rows, (size_t)D, err, sizeof err) !=
                RA_OK) {
                fprintf(stderr, "--save: %s\n", err);
                goto out;
            }
        }
    }
    /* the store: keys (values = keys: unused here) in the session dtype */
    if (ra_kv_create(&kv, D, c.dtype, NULL) != RA_OK)
        goto out;
    {
        size_t tot = d.n + d.nins;
        size_t es = ra_dtype_size(c.dtype);
        void *buf = malloc(tot * (size_t)D * es);
        int64_t *pos = malloc(tot * sizeof *pos);
        if (!buf || !pos) {
            free(buf), free(pos);
            goto out;
        }
        ra_kern_from_f32(d.keys, c.dtype, tot * (size_t)D, buf);
        for (size_t i = 0; i < tot; i++)
            pos[i] = (int64_t)i;
        /* the built part first; inserted rows are appended later */
        ra_status s = ra_kv_append(kv, buf, buf, pos, d.n);
        if (s) {
            fprintf(stderr, "kv append: %s\n", ra_strerror(s));
            free(buf), free(pos);
            goto out;
        }
        /* stash the inserted rows' storage in d.keys' tail: converted again later */
        free(buf);
        free(pos);
    }
    /* ground truth over the built keys */
    int32_t *gt = malloc(NQ * (size_t)k * sizeof *gt);
    float *gts = malloc(NQ * (size_t)k * sizeof *gts);
    if (!gt || !gts)
        goto out;
    omp_set_num_threads(threads);
    double tg = ra_now_s();
    if (ra_exact_knn_batch(kv, d.n, d.queries, NQ, k, gt, gts) != RA_OK) {
        fprintf(stderr, "exact top-k failed\n");
        goto out;
    }
    if (!c.json)
        printf("# ground truth %.2fs\n", ra_now_s() - tg);
    if (c.overlap && d.nt) { /* diagnostic: top-k overlap with the nearest training query */
        int32_t *tg2 = malloc(d.nt * (size_t)k * sizeof *tg2);
        float *ts2 = malloc(d.nt * (size_t)k * sizeof *ts2);
        ra_exact_knn_batch(kv, d.n, d.train, d.nt, k, tg2, ts2);
        double ov = 0, ov5 = 0;
        for (size_t i = 0; i < NQ; i++) {
            const float *q = d.queries + i * (size_t)D;
            double best[5] = {-2, -2, -2, -2, -2};
            size_t bi[5] = {0};
            for (size_t t = 0; t < d.nt; t++) {
                const float *r = d.train + t * (size_t)D;
                double ab = 0, bb = 0, aa = 0;
                for (int j = 0; j < D; j++) {
                    ab += q[j] * r[j];
                    bb += r[j] * r[j];
                    aa += q[j] * q[j];
                }
                double cs = ab / sqrt(aa * bb + 1e-30);
                for (int m = 0; m < 5; m++)
                    if (cs > best[m]) {
                        for (int z = 4; z > m; z--) {
                            best[z] = best[z - 1];
                            bi[z] = bi[z - 1];
                        }
                        best[m] = cs;
                        bi[m] = t;
                        break;
                    }
            }
            const int32_t *g = gt + i * (size_t)k;
            int h1 = 0, h5 = 0;
            for (int a = 0; a < k; a++) {
                int f1 = 0, f5 = 0;
                for (int m = 0; m < 5; m++)
                    for (int b = 0; b < k; b++)
                        if (tg2[bi[m] * k + b] == g[a]) {
                            f5 = 1;
                            if (m == 0)
                                f1 = 1;
                        }
                h1 += f1;
                h5 += f5;
            }
            ov += (double)h1 / k;
            ov5 += (double)h5 / k;
        }
        printf("# overlap of top-%d with the nearest training query's: %.3f (union of 5 nearest: "
               "%.3f)\n",
               k, ov / NQ, ov5 / NQ);
        double oc = 0;
        for (size_t i = 1; i < NQ; i++) {
            int h = 0;
            for (int a = 0; a < k; a++)
                for (int b = 0; b < k; b++)
                    h += gt[i * k + a] == gt[(i - 1) * k + b];
            oc += (double)h / k;
        }
        printf("# overlap of consecutive decode queries' top-%d: %.3f\n", k, oc / (NQ - 1));
        free(tg2);
        free(ts2);
    }

    struct {
        const char *name;
        const ra_backend_ops *ops;
        int efforts[32];
        int ne;
    } idx[5] = {
        {"flat", &ra_backend_flat, {0}, 1},
        {"ivf", &ra_backend_ivf, {1, 2, 4, 8, 16, 32, 64, 128, 256, 384, 512, 768}, 12},
        {"hnsw", &ra_backend_hnsw, {16, 32, 64, 128, 256, 512, 1024, 2048}, 8},
        {"graph", &ra_backend_graph, {100, 120, 150, 200, 250, 300, 350, 400, 500, 650, 800}, 11},
        {"pscan", &ra_backend_pscan, {0, 200, 300, 400, 500, 700, 1000, 1500, 2000}, 9},
    };
    for (int ii = 0; ii < 5; ii++) {
        if (!has_index(c.indexes, idx[ii].name))
            continue;
        ra_index_opts o;
        ra_index_opts_default(&o);
        o.threads = c.threads;
        o.seed = c.seed;
        if (c.gopts.graph_knn)
            o.graph_knn = c.gopts.graph_knn;
        if (c.gopts.graph_degree)
            o.graph_degree = c.gopts.graph_degree;
        if (c.gopts.graph_build_ef)
            o.graph_build_ef = c.gopts.graph_build_ef;
        if (c.gopts.graph_entries)
            o.graph_entries = c.gopts.graph_entries;
        if (c.gopts.n_train)
            o.n_train = c.gopts.n_train;
        void *st = NULL;
        omp_set_num_threads(threads);
        int is_graph = !strcmp(idx[ii].name, "graph");
        ra_graph_adj ga = {0};
        if (is_graph && c.load_graph && graph_load(c.load_graph, &ga))
            goto out;
        double t0 = ra_now_s();
        ra_status s = is_graph && c.load_graph
                          ? idx[ii].ops->install(&st, kv, d.n, &ga, d.train,
                                                 c.no_train ? 0 : d.nt, NULL, 0, &o)
                          : idx[ii].ops->build(&st, kv, d.n, d.train, c.no_train ? 0 : d.nt, &o);
        double build_s = ra_now_s() - t0;
        ra_graph_adj_fini(&ga);
        if (s) {
            fprintf(stderr, "%s %s: %s\n", idx[ii].name, c.load_graph ? "install" : "build",
                    ra_strerror(s));
            continue;
        }
        if (is_graph && c.save_graph) {
            if ((s = idx[ii].ops->export_graph(st, &ga)) != RA_OK || graph_save(c.save_graph, &ga)) {
                fprintf(stderr, "--save-graph: export failed (%s)\n", ra_strerror(s));
                ra_graph_adj_fini(&ga);
                idx[ii].ops->destroy(st);
                goto out;
            }
            if (!c.json)
                printf("# graph of %zu keys, M %d, %d entries written to %s\n", ga.n, ga.M,
                       ga.n_entries, c.save_graph);
            ra_graph_adj_fini(&ga);
        }
        omp_set_num_threads(1); /* single-thread search, as the targets are stated */
        int eff[32];
        int ne = idx[ii].ne;
        memcpy(eff, idx[ii].efforts, sizeof eff);
        if (c.efforts && strcmp(idx[ii].name, "graph") == 0)
            ne = parse_list(c.efforts, eff, 32);
        if (!strcmp(idx[ii].name, "graph"))
            for (int e = 0; e < ne; e++)
                if (eff[e] < k && eff[e] != 0) /* 0: the index's default */
                    eff[e] = k;
        for (int e = 0; e < ne; e++) {
            sweep_out so;
            if (run_queries(idx[ii].ops, st, kv, d.n, d.queries, NQ, D, k, eff[e], 0, gt, &so))
                break;
            char params[64];
            snprintf(params, sizeof params, "effort=%d", eff[e]);
            emit(&c, idx[ii].name, params, &so, build_s, NULL);
            if (d.G > 1 && idx[ii].ops->search_group) { /* graph, pscan */
                sweep_out sg;
                if (run_group(idx[ii].ops, st, kv, d.n, d.queries, d.nq, d.G, D, k, eff[e], gt,
                              &sg))
                    break;
                snprintf(params, sizeof params, "effort=%d,group=%d", eff[e], d.G);
                emit(&c, idx[ii].name, params, &sg, build_s, NULL);
            }
            if (!strcmp(idx[ii].name, "graph") && !c.no_warm_start) {
                sweep_out sw;
                if (run_queries(idx[ii].ops, st, kv, d.n, d.queries, NQ, D, k, eff[e], 1, gt, &sw))
                    break;
                snprintf(params, sizeof params, "effort=%d,warm", eff[e]);
                emit(&c, "graph", params, &sw, build_s, NULL);
            }
            if (so.recall >= 0.999 && strcmp(idx[ii].name, "graph"))
                break; /* further effort only costs time */
        }
        if (!strcmp(idx[ii].name, "graph") && d.nins)
            insert_check(&c, &d, kv, idx[ii].ops, st, eff, ne);
        idx[ii].ops->destroy(st);
    }
    rc = 0;
    free(gt);
    free(gts);
out:
    free(cold.buf);
    ra_kv_destroy(kv);
    data_free(&d);
    return rc;
}
