/* The projected-code scan (RA_INDEX_PSCAN): every key is read at every search, but as a
 * 4-bit code of `dp` projected dimensions (24 bytes for dp 48) streamed from one
 * contiguous array, scored against the whole GQA group at once; each query's best R
 * by code are rescored exactly on the stored keys and its top k returned. Scores and the
 * attention over them are exact; only the choice of candidates comes from the codes.
 * A search may be cut over the keys (ra_head_attend_part): part p of P scans every P-th
 * unit of 1,024 keys and keeps about R / P candidates.
 *
 * The projection is attention-aware: it is fitted on the training (prefill) queries.
 * With Sq = E[q q^T] over them (regularised), q.k = (Sq^-1/2 q) . (Sq^1/2 k), and in the
 * whitened key space the dp directions of largest key energy keep the most of q.k for
 * queries of that distribution: Ak = U^T Sq^1/2 maps keys to codes, Aq = U^T Sq^-1/2
 * maps queries, U the top eigenvectors of Sq^1/2 Cov(k) Sq^1/2 (keys centred: q . mean is
 * the same for every key). Whitened queries are isotropic, so eigenvalue j is the share
 * of the score variance across keys that direction j carries; dp is the fewest (a
 * multiple of 8) that carry 93 % of it: 48 on the calibrated 131K head of dim 128, 56 on
 * the hidden-state one, where the best 1,000 by code hold 0.991 / 0.996 of the true
 * top-100 (bench/README.md, "Projected-code scan").
 *
 * Why a scan: the graph walk is bound by dependent memory loads (~60 ns a key scored in
 * the daemon); a scan streams 32 bytes a key at the memory's bandwidth, and the cost does
 * not depend on how navigable the keys are, only on their number.
 *
 * Code layout: blocks of 16 keys, each nch = dp / 8 chunks of 64 bytes; chunk c holds 4
 * bytes per key (key i at bytes 4 i .. 4 i + 3), byte t of key i: low nibble dimension
 * 8 c + t, high nibble 8 c + 4 + t. vpdpbusd then scores 16 keys x 4 dimensions of one
 * query per instruction with the query's 4 bytes broadcast (kernels_vnni.c). A query is
 * prepared as w = (Aq q) * step, rounded to int8 at 127 / max|w|: the code score
 * sum_j w8_j code_j orders keys as u . c does up to the rounding (the offset sum_j u_j lo_j
 * is the same for every key). */
#include <math.h>
#include <omp.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "ra_backend.h"
#include "ra_eig.h"
#include "ra_env.h"
#include "ra_kernels.h"
#include "ra_log.h"

#define PS_MAX_DP 128   /* projected dimensions kept, at most (RA_P4_QW / 2 chunks of 8) */
#define PS_MIN_DP 64    /* projected dimensions kept, at least (or all of a smaller head) */
#define PS_SAMPLE 16384 /* keys sampled for the key moments and the code ranges */
/* The threshold is primed from a stratified sample of at least PS_PRIME blocks, at the
 * sample's score of rank X R x sampled / total (X = ps_prime_x(), 3), so that about X R keys
 * would pass the full scan (the buffer cuts raise it on the way), and the sample is
 * large enough for that rank to be PS_PRIME_RANK at least. When fewer than R keys pass,
 * the part is scanned again from no threshold. With X 2 and 96 blocks, 5 % of the 131K
 * lin heads at R 1000 and 30 % at R 200 were scanned twice (a head's keys come in runs
 * of related positions, so 96 blocks are far fewer independent draws), and with 16
 * parts most Attends waited for one part's second scan; with X 3 and the larger sample,
 * 0-0.25 % of the lin parts of 64K and 512K keys. X 4 leaves none but costs more
 * candidates (bench/README.md, "Eleventh session"). */
#define PS_PRIME 96
#define PS_PRIME_RANK 32

/* X of the priming rank (RA_PSCAN_PRIME_X, 1..16, a study knob; default 3) */
static double ps_prime_x(void)
{
    static ra_env_once once;
    int x = ra_env_int(&once, "RA_PSCAN_PRIME_X", 3);
    return x >= 1 && x <= 16 ? x : 3;
}

/* RA_PSCAN_PROFILE=1 (a study knob): every search adds the time of its phases to
 * process-wide totals, logged at exit, to tell where a search's time goes in the daemon */
enum { PP_PREP, PP_PRIME, PP_SCAN, PP_RESCAN, PP_RESCORE, PP_SELECT, PP_CUT, PP_N };
static uint64_t ps_prof[PP_N + 3]; /* ns per phase, then searches, cuts, keys cut */
static __thread uint64_t t_cut_ns, t_cuts, t_cut_keys;

static void ps_prof_print(void)
{
    uint64_t n = ps_prof[PP_N];
    if (!n)
        return;
    double d = (double)n * 1e3;
    RA_WARN("pscan profile: %llu searches; us a search: prepare %.1f, prime %.1f, scan %.1f "
            "(of which cut %.1f), rescan %.1f, rescore %.1f, select %.1f; %.2f cuts of %.0f "
            "keys a search",
            (unsigned long long)n, ps_prof[PP_PREP] / d, ps_prof[PP_PRIME] / d,
            ps_prof[PP_SCAN] / d, ps_prof[PP_CUT] / d, ps_prof[PP_RESCAN] / d,
            ps_prof[PP_RESCORE] / d, ps_prof[PP_SELECT] / d, (double)ps_prof[PP_N + 1] / (double)n,
            ps_prof[PP_N + 1] ? (double)ps_prof[PP_N + 2] / (double)ps_prof[PP_N + 1] : 0.0);
}

static pthread_once_t ps_prof_once = PTHREAD_ONCE_INIT;
static void ps_prof_init(void)
{
    atexit(ps_prof_print);
}

static int ps_profiling(void)
{
    static ra_env_once once;
    if (ra_env_int(&once, "RA_PSCAN_PROFILE", 0) != 1)
        return 0;
    pthread_once(&ps_prof_once, ps_prof_init);
    return 1;
}

static inline uint64_t ps_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

/* the share of the score variance the code keeps (RA_PSCAN_ENERGY_PERMILLE, a study knob) */
static double ps_energy(void)
{
    static ra_env_once once;
    double e = ra_env_int(&once, "RA_PSCAN_ENERGY_PERMILLE", 930) / 1000.0;
    return e > 0.5 && e <= 1.0 ? e : 0.93;
}

typedef struct ps_state {
    int dim, dp, nch;
    ra_dtype dtype;
    float *ak, *aq;   /* [dp][dim] */
    float *lo, *step; /* [dp]: code value c maps to lo + step * c */
    float *mu;        /* [dim]: the keys' mean, subtracted before the projection (q . mu is
                         the same for every key, so it does not change the ranking) */
    float *akmu;      /* [dp]: ak mu */
    uint8_t *codes;   /* [blocks][nch * 64] */
    size_t n, cap_blocks;
    float mult; /* the default candidates' factor (ra_head's recall probes), atomic */
} ps_state;

/* ---------- build ---------- */

/* out = a b, all [n][n] */
static void ps_matmul(const double *a, const double *b, double *out, int n)
{
    for (int i = 0; i < n; i++)
        for (int j = 0; j < n; j++) {
            double x = 0;
            for (int e = 0; e < n; e++)
                x += a[i * n + e] * b[e * n + j];
            out[i * n + j] = x;
        }
}

#define PS_GRAM_CHUNK 4096 /* training queries transposed at a time for their Gram matrix */

/* g[a][b] += sum_i xt[a][i] xt[b][i] for every a, b < dim (both triangles), from xt
 * [dim][m] (m vectors, transposed): the SIMD kernel scores four rows at a time against
 * the rows from theirs on (the upper triangle, half the products of the whole matrix);
 * each block's sums in float, added in double. out4 holds 4 dim floats. */
static void ps_gram_add(const float *xt, size_t m, int dim, double *g, float *out4)
{
    int a = 0;
    for (; a + 4 <= dim; a += 4) {
        size_t nc = (size_t)(dim - a);
        ra_kern_dot_q4_f32(xt + (size_t)a * m, xt + (size_t)a * m, (int)m, nc, out4);
        for (int k = 0; k < 4; k++)
            for (size_t i = (size_t)k; i < nc; i++) { /* row a + k, column a + i >= it */
                double x = out4[(size_t)k * nc + i];
                g[(size_t)(a + k) * dim + (size_t)a + i] += x;
                if (i != (size_t)k)
                    g[((size_t)a + i) * dim + (size_t)(a + k)] += x;
            }
    }
    for (; a < dim; a++) /* the last dim % 4 rows */
        for (int b = a; b < dim; b++) {
            double x = 0;
            for (size_t i = 0; i < m; i++)
                x += (double)xt[(size_t)a * m + i] * xt[(size_t)b * m + i];
            g[(size_t)a * dim + b] += x;
            if (b != a)
                g[(size_t)b * dim + a] += x;
        }
}

/* g += the Gram matrix of rows [n][dim] (row-major): chunk rows at a time transposed
 * into xt [dim][chunk], then ps_gram_add */
static void ps_gram_rows(const float *rows, size_t n, int dim, size_t chunk, float *xt, double *g,
                         float *out4)
{
    for (size_t i0 = 0; i0 < n; i0 += chunk) {
        size_t m = n - i0 < chunk ? n - i0 : chunk;
        for (size_t i = 0; i < m; i++)
            for (int a = 0; a < dim; a++)
                xt[(size_t)a * m + i] = rows[(i0 + i) * (size_t)dim + a];
        ps_gram_add(xt, m, dim, g, out4);
    }
}

static double sum_kept(const double *w, int dp, int dim)
{
    double a = 0;
    for (int i = 0; i < dp && i < dim; i++)
        a += w[i] > 0 ? w[i] : 0;
    return a;
}

static void ps_destroy(void *st)
{
    ps_state *s = st;
    if (!s)
        return;
    free(s->ak), free(s->aq), free(s->lo), free(s->step), free(s->mu), free(s->akmu),
        free(s->codes);
    free(s);
}

static size_t ps_block_bytes(const ps_state *s)
{
    return (size_t)s->nch * 64;
}

/* rows [first, first + n) of kv: projected by ak into f [dp][n] (dimension-major, four
 * projection rows at a time through the SIMD kernel); the mean's projection is taken off
 * afterwards (ak (k - mu) = ak k - ak mu) */
static void ps_project(const ps_state *s, const ra_kv *kv, size_t first, size_t n, float *tmp,
                       float *f)
{
    const char *k = (const char *)ra_kv_keys(kv) + first * (size_t)s->dim * ra_dtype_size(s->dtype);
    ra_kern_to_f32(k, s->dtype, n * (size_t)s->dim, tmp);
    for (int j = 0; j < s->dp; j += 4) /* dp is a multiple of 8 */
        ra_kern_dot_q4_f32(s->ak + (size_t)j * s->dim, tmp, s->dim, n, f + (size_t)j * n);
    for (int j = 0; j < s->dp; j++)
        for (size_t i = 0; i < n; i++)
            f[(size_t)j * n + i] -= s->akmu[j];
}

/* the code of `row` from its projection f[j * fs] */
static void ps_put(ps_state *s, size_t row, const float *f, size_t fs)
{
    uint8_t *blk = s->codes + row / 16 * ps_block_bytes(s);
    int i = (int)(row % 16);
    for (int j = 0; j < s->dp; j++) {
        float x = (f[(size_t)j * fs] - s->lo[j]) / s->step[j];
        int c = (int)lrintf(x < 0 ? 0 : x > 15 ? 15 : x);
        int ch = j / 8, t = j % 8;
        uint8_t *b = blk + (size_t)ch * 64 + (size_t)i * 4 + (t & 3);
        if (t < 4)
            *b = (uint8_t)((*b & 0xf0) | c);
        else
            *b = (uint8_t)((*b & 0x0f) | (c << 4));
    }
}

static ra_status ps_reserve(ps_state *s, size_t n)
{
    size_t want = (n + 15) / 16;
    if (want <= s->cap_blocks)
        return RA_OK;
    size_t cap = s->cap_blocks ? s->cap_blocks : 64;
    while (cap < want)
        cap *= 2;
    uint8_t *c = realloc(s->codes, cap * ps_block_bytes(s));
    if (!c)
        return RA_ENOMEM;
    memset(c + s->cap_blocks * ps_block_bytes(s), 0, (cap - s->cap_blocks) * ps_block_bytes(s));
    s->codes = c;
    s->cap_blocks = cap;
    return RA_OK;
}

static ra_status ps_encode(ps_state *s, const ra_kv *kv, size_t first, size_t n,
                           const ra_index_opts *opts)
{
    ra_status st = ps_reserve(s, first + n);
    if (st != RA_OK)
        return st;
    int threads = opts && opts->threads > 0 ? opts->threads : omp_get_max_threads();
    size_t chunk = 1024, nchunks = (n + chunk - 1) / chunk;
    if (nchunks < (size_t)threads)
        threads = nchunks ? (int)nchunks : 1;
    int fail = 0;
#pragma omp parallel num_threads(threads)
    {
        float *tmp = malloc(chunk * (size_t)s->dim * sizeof *tmp);
        float *f = malloc(chunk * (size_t)s->dp * sizeof *f);
        if (!tmp || !f)
            __atomic_store_n(&fail, 1, __ATOMIC_RELAXED);
#pragma omp for schedule(dynamic, 4)
        for (size_t c = 0; c < nchunks; c++) {
            if (!tmp || !f || ra_index_cancelled(opts))
                continue;
            size_t a = first + c * chunk, m = first + n - a < chunk ? first + n - a : chunk;
            ps_project(s, kv, a, m, tmp, f);
            /* rows share no bytes (each has its own 4-byte lane in every chunk of its
             * block), so chunks that split a block write it from two threads safely */
            for (size_t i = 0; i < m; i++)
                ps_put(s, a + i, f + i, m);
        }
        free(tmp), free(f);
    }
    if (ra_index_cancelled(opts))
        return RA_ECLOSED;
    return fail ? RA_ENOMEM : RA_OK;
}

static ra_status ps_build(void **out, const ra_kv *kv, size_t n, const float *train_q, size_t nq,
                          const ra_index_opts *opts)
{
    int dim = ra_kv_dim(kv);
    if (dim < 8)
        return RA_ENOTSUP;
    ps_state *s = calloc(1, sizeof *s);
    if (!s)
        return RA_ENOMEM;
    s->dim = dim;
    s->mult = 1.0f;
    s->dtype = ra_kv_dtype(kv);
    int dmax = (dim + 7) / 8 * 8;
    dmax = dmax < PS_MAX_DP ? dmax : PS_MAX_DP;
    size_t dd = (size_t)dim * dim;
    double *sq = calloc(dd, sizeof *sq), *w = calloc((size_t)dim, sizeof *w);
    double *v = calloc(dd, sizeof *v), *sh = calloc(dd, sizeof *sh), *shi = calloc(dd, sizeof *shi);
    double *kk = calloc(dd, sizeof *kk), *c = calloc(dd, sizeof *c);
    size_t ns = n < PS_SAMPLE ? n : PS_SAMPLE;
    float *ks = malloc((ns ? ns : 1) * (size_t)dim * sizeof *ks);
    s->ak = calloc((size_t)dmax * dim, sizeof *s->ak);
    s->aq = calloc((size_t)dmax * dim, sizeof *s->aq);
    s->lo = malloc((size_t)dmax * sizeof *s->lo);
    s->step = malloc((size_t)dmax * sizeof *s->step);
    s->mu = calloc((size_t)dim, sizeof *s->mu);
    float *f = malloc((ns ? ns : 1) * (size_t)(dmax > dim ? dmax : dim) * sizeof *f);
    float *xt = NULL, *out4 = malloc(4 * (size_t)dim * sizeof *out4); /* the Gram's scratch */
    ra_status st = RA_ENOMEM;
    if (!sq || !w || !v || !sh || !shi || !kk || !c || !ks || !s->ak || !s->aq || !s->lo ||
        !s->step || !s->mu || !f || !out4)
        goto out;
    /* Sq = E[q q^T] of the training queries, plus 1 % of its mean eigenvalue on the
     * diagonal: decode queries have components the prefill did not show, and an
     * unregularised Sq^-1/2 would blow them up (no queries: Sq = I) */
    if (nq && !(xt = malloc((size_t)PS_GRAM_CHUNK * dim * sizeof *xt)))
        goto out;
    ps_gram_rows(train_q, nq, dim, PS_GRAM_CHUNK, xt, sq, out4);
    double tr = 0;
    for (int a = 0; a < dim; a++) {
        for (int b = 0; b < dim; b++)
            sq[a * dim + b] = nq ? sq[a * dim + b] / (double)nq : (a == b);
        tr += sq[a * dim + a];
    }
    for (int a = 0; a < dim; a++)
        sq[a * dim + a] += 0.01 * (tr > 0 ? tr / dim : 1);
    if (ra_eig_sym(sq, dim, w, v) != 0) { /* a non-finite query (or key, below) */
        st = RA_EINVAL;
        goto out;
    }
    for (int a = 0; a < dim; a++)
        for (int b = 0; b < dim; b++) {
            double x = 0, y = 0;
            for (int e = 0; e < dim; e++) {
                double we = w[e] > 1e-30 ? w[e] : 1e-30;
                x += v[a * dim + e] * sqrt(we) * v[b * dim + e];
                y += v[a * dim + e] / sqrt(we) * v[b * dim + e];
            }
            sh[a * dim + b] = x;
            shi[a * dim + b] = y;
        }
    /* key moments on a stride sample: the mean, the covariance, then C = Sh Cov Sh */
    size_t stride = ns ? n / ns : 1;
    const char *keys = ra_kv_keys(kv);
    size_t rb = (size_t)dim * ra_dtype_size(s->dtype);
    for (size_t i = 0; i < ns; i++)
        ra_kern_to_f32(keys + i * stride * rb, s->dtype, (size_t)dim, ks + i * (size_t)dim);
    double *mu = w; /* scratch until the second eigen decomposition */
    for (int a = 0; a < dim; a++)
        mu[a] = 0;
    for (size_t i = 0; i < ns; i++)
        for (int a = 0; a < dim; a++)
            mu[a] += ks[i * (size_t)dim + a];
    for (int a = 0; a < dim; a++)
        s->mu[a] = (float)(mu[a] / (double)(ns ? ns : 1));
    for (size_t i = 0; i < ns; i++)
        for (int a = 0; a < dim; a++)
            ks[i * (size_t)dim + a] -= s->mu[a];
    /* the Gram matrix of the centred sample, in one chunk (f holds its transpose) */
    if (ns) {
        ps_gram_rows(ks, ns, dim, ns, f, kk, out4);
        for (size_t i = 0; i < dd; i++)
            kk[i] /= (double)ns;
    }
    if (ra_index_cancelled(opts)) {
        st = RA_ECLOSED;
        goto out;
    }
    /* c = sh kk sh, through sq as scratch */
    ps_matmul(sh, kk, sq, dim);
    ps_matmul(sq, sh, c, dim);
    if (ra_eig_sym(c, dim, w, v) != 0) {
        st = RA_EINVAL;
        goto out;
    }
    /* whitened queries are isotropic, so direction j carries w[j] of the score variance
     * across keys: keep the fewest (a multiple of 8) that carry ps_energy() of it */
    double tot = 0, acc = 0;
    for (int a = 0; a < dim; a++)
        tot += w[a] > 0 ? w[a] : 0;
    /* and at least 64 (all of a head of dim 64): on the real model's heads, whose decode
     * queries differ from the prefill's, 93 % alone lost recall (bench/README.md) */
    s->dp = dmax;
    for (int a = 0; a < dim; a++) {
        acc += w[a] > 0 ? w[a] : 0;
        if (acc >= ps_energy() * tot) {
            int d8 = (a + 1 + 7) / 8 * 8;
            d8 = d8 < PS_MIN_DP ? PS_MIN_DP : d8;
            s->dp = d8 < dmax ? d8 : dmax;
            break;
        }
    }
    s->nch = s->dp / 8;
    s->akmu = calloc((size_t)s->dp, sizeof *s->akmu);
    if (!s->akmu)
        goto out;
    for (int j = 0; j < s->dp && j < dim; j++) /* ak row j = u_j^T sh, aq row j = u_j^T shi */
        for (int b = 0; b < dim; b++) {
            double x = 0, y = 0;
            for (int e = 0; e < dim; e++) {
                x += v[e * dim + j] * sh[e * dim + b];
                y += v[e * dim + j] * shi[e * dim + b];
            }
            s->ak[(size_t)j * dim + b] = (float)x;
            s->aq[(size_t)j * dim + b] = (float)y;
        }
    for (int j = 0; j < s->dp; j++) {
        double x = 0;
        for (int d = 0; d < dim; d++)
            x += (double)s->ak[(size_t)j * dim + d] * s->mu[d];
        s->akmu[j] = (float)x;
    }
    /* code ranges from the sample, 3 % margin each side for keys appended later */
    for (int j = 0; ns && j < s->dp; j += 4) /* the centred sample's projections, [dp][ns] */
        ra_kern_dot_q4_f32(s->ak + (size_t)j * dim, ks, dim, ns, f + (size_t)j * ns);
    for (int j = 0; j < s->dp; j++) {
        float lo = INFINITY, hi = -INFINITY;
        for (size_t i = 0; i < ns; i++) {
            float x = f[(size_t)j * ns + i];
            lo = x < lo ? x : lo;
            hi = x > hi ? x : hi;
        }
        if (!ns || !(hi > lo))
            lo = -1, hi = 1;
        float m = 0.03f * (hi - lo);
        s->lo[j] = lo - m;
        s->step[j] = (hi - lo + 2 * m) / 15;
    }
    s->n = 0;
    st = ps_encode(s, kv, 0, n, opts);
    if (st == RA_OK) {
        s->n = n;
        RA_DEBUG("pscan: %zu keys of dim %d as %d projected dimensions (%.4f of the score "
                 "variance, %d bytes a key) from %zu training queries",
                 n, dim, s->dp, tot > 0 ? (double)sum_kept(w, s->dp, dim) / tot : 1.0, s->dp / 2,
                 nq);
    }
out:
    free(sq), free(w), free(v), free(sh), free(shi), free(kk), free(c), free(ks), free(f);
    free(xt), free(out4);
    if (st != RA_OK) {
        ps_destroy(s);
        return st;
    }
    *out = s;
    return RA_OK;
}

static ra_status ps_add(void *st, const ra_kv *kv, size_t first, size_t n)
{
    ps_state *s = st;
    if (first != s->n)
        return RA_EINTERNAL;
    ra_status r = ps_encode(s, kv, first, n, NULL);
    if (r == RA_OK)
        s->n = first + n;
    return r;
}

static size_t ps_bytes(void *st)
{
    const ps_state *s = st;
    return sizeof *s + s->cap_blocks * ps_block_bytes(s) +
           (size_t)s->dp * ((size_t)s->dim * 2 + 2) * sizeof(float);
}

/* ---------- search ---------- */

#define PS_G 4 /* queries per pass of the kernel */
/* scratch entries a thread keeps between searches (the default R at 1M keys is ~1,700,
 * its buffers ~3,500) */
#define PS_KEEP_CAP 65536

typedef struct ps_tls {
    int32_t *sc, *id; /* [PS_G][cap] */
    int32_t *tmp;     /* [cap] */
    float *ex;        /* [cap] exact scores */
    float *u;         /* [dp] */
    size_t cap;
} ps_tls;

static __thread ps_tls t_ps;
static __thread int t_ps_prof; /* this search is profiled (ps_profiling) */
static pthread_key_t ps_key; /* only to free t_ps's buffers when its thread ends */
static pthread_once_t ps_once = PTHREAD_ONCE_INIT;
static int ps_key_ok;

static void ps_tls_free(void *p)
{
    ps_tls *t = p;
    free(t->sc), free(t->id), free(t->tmp), free(t->ex), free(t->u);
    memset(t, 0, sizeof *t);
}

static void ps_key_init(void)
{
    ps_key_ok = pthread_key_create(&ps_key, ps_tls_free) == 0;
}

static int ps_scratch(size_t cap)
{
    ps_tls *t = &t_ps;
    if (t->cap >= cap)
        return 1;
    pthread_once(&ps_once, ps_key_init);
    if (!ps_key_ok || pthread_setspecific(ps_key, t) != 0)
        return 0;
    int32_t *sc = realloc(t->sc, PS_G * cap * sizeof *sc);
    if (sc)
        t->sc = sc;
    int32_t *id = realloc(t->id, PS_G * cap * sizeof *id);
    if (id)
        t->id = id;
    int32_t *tmp = realloc(t->tmp, cap * sizeof *tmp);
    if (tmp)
        t->tmp = tmp;
    float *ex = realloc(t->ex, cap * sizeof *ex);
    if (ex)
        t->ex = ex;
    float *u = realloc(t->u, PS_MAX_DP * sizeof *u);
    if (u)
        t->u = u;
    if (!sc || !id || !tmp || !ex || !u)
        return 0;
    t->cap = cap;
    return 1;
}

/* the value of rank `k` (0: the largest) among a[0..n) by quickselect; a is reordered */
static int32_t ps_kth(int32_t *a, size_t n, size_t k)
{
    size_t lo = 0, hi = n - 1;
    while (lo < hi) {
        int32_t piv = a[lo + (hi - lo) / 2];
        size_t i = lo, j = hi;
        for (;;) {
            while (a[i] > piv)
                i++;
            while (a[j] < piv)
                j--;
            if (i >= j)
                break;
            int32_t t = a[i];
            a[i] = a[j], a[j] = t;
            i++, j--;
        }
        /* a[lo..j] >= piv >= a[j+1..hi] */
        if (k <= j)
            hi = j;
        else
            lo = j + 1;
    }
    return a[k];
}

#define PS_BINS 1024 /* bins of the cuts' histogram */

/* A histogram of a[0..n) (n >= 1) in at most PS_BINS bins over [min, max]: v is in bin
 * (v - mn) >> sh. The cuts find the bin of a rank in it instead of a quickselect over
 * every element, which mispredicted about every other comparison and took ~25 cycles an
 * element (a quarter of the scan's time at R 1,000; bench/README.md, "Twelfth session"). */
typedef struct ps_hist {
    int32_t mn;
    int sh;
    uint32_t nbin;
    uint32_t h[PS_BINS];
} ps_hist;

static void ps_hist_fill(ps_hist *H, const int32_t *a, size_t n)
{
    int32_t mn = a[0], mx = a[0];
    for (size_t i = 1; i < n; i++) {
        mn = a[i] < mn ? a[i] : mn;
        mx = a[i] > mx ? a[i] : mx;
    }
    uint32_t span = (uint32_t)((int64_t)mx - mn);
    int sh = 0;
    while ((span >> sh) >= PS_BINS)
        sh++;
    H->mn = mn;
    H->sh = sh;
    H->nbin = (span >> sh) + 1;
    memset(H->h, 0, H->nbin * sizeof *H->h);
    for (size_t i = 0; i < n; i++)
        H->h[((uint32_t)a[i] - (uint32_t)mn) >> sh]++; /* unsigned: the span may pass 2^31 */
}

/* the bin of rank k (0: the largest; k below the count), and in *above the count of the
 * bins above it */
static uint32_t ps_hist_bin(const ps_hist *H, size_t k, size_t *above)
{
    size_t ab = 0;
    uint32_t b = H->nbin - 1;
    while (ab + H->h[b] <= k) /* the bins hold more than k: stops at b >= 0 */
        ab += H->h[b--];
    *above = ab;
    return b;
}

/* The value of rank k (0: the largest) among a[0..n) (n > k), and in *gt the number of
 * elements above it; a is not changed. Only the elements of rank k's bin are copied to
 * tmp (which holds n) and selected among. */
static int32_t ps_rank(const int32_t *a, size_t n, size_t k, int32_t *tmp, size_t *gt)
{
    ps_hist H;
    ps_hist_fill(&H, a, n);
    size_t above;
    uint32_t b = ps_hist_bin(&H, k, &above);
    size_t m = 0;
    for (size_t i = 0; i < n; i++) {
        tmp[m] = a[i];
        m += (((uint32_t)a[i] - (uint32_t)H.mn) >> H.sh) == b;
    }
    int32_t t = ps_kth(tmp, m, k - above);
    for (size_t i = 0; i < m; i++)
        above += tmp[i] > t;
    *gt = above;
    return t;
}

/* A value e with at least k + 1 of a[0..n) (n > k) at or above it, and at most the bin of
 * rank k more: the lower edge of that bin; *n_at_or_above gets their count. */
static int32_t ps_edge(const int32_t *a, size_t n, size_t k, size_t *n_at_or_above)
{
    ps_hist H;
    ps_hist_fill(&H, a, n);
    size_t above;
    uint32_t b = ps_hist_bin(&H, k, &above);
    *n_at_or_above = above + H.h[b];
    return (int32_t)((int64_t)H.mn + ((int64_t)b << H.sh));
}

static void ps_prof_cut(uint64_t c0, int n)
{
    if (t_ps_prof)
        t_cut_ns += ps_ns() - c0, t_cuts++, t_cut_keys += (uint64_t)n;
}

/* query j's buffer cut back to its best R (ties at the R-th score: the earliest rows) and
 * its threshold raised to the R-th score */
static void ps_cut(int32_t *sc, int32_t *id, int *cnt, int32_t *thr, int R, int32_t *tmp)
{
    if (*cnt <= R)
        return;
    uint64_t c0 = t_ps_prof ? ps_ns() : 0;
    size_t above;
    int32_t t = ps_rank(sc, (size_t)*cnt, (size_t)R - 1, tmp, &above);
    int eq_keep = R - (int)above, m = 0;
    for (int i = 0; i < *cnt; i++) { /* in place, branch-free: m <= i */
        int32_t v = sc[i], d = id[i];
        int keep = (v > t) | ((v == t) & (eq_keep > 0));
        eq_keep -= v == t;
        sc[m] = v;
        id[m] = d;
        m += keep;
    }
    ps_prof_cut(c0, *cnt);
    *cnt = m;
    if (t > *thr)
        *thr = t;
}

/* The cut of a full buffer during a scan: at least its best R kept (every key at or above
 * the lower edge of the R-th score's bin) and the threshold raised to just below that
 * edge. What it keeps beyond the best R only costs room: the final ps_cut leaves the
 * same R as an exact cut here would have (the keys an exact cut drops, and the later
 * ones it would not admit, all rank below its R), so the answers are the same. Where
 * ties would keep too many to make room, the exact cut. */
static void ps_cut_scan(int32_t *sc, int32_t *id, int *cnt, int32_t *thr, int R, int cap,
                        int32_t *tmp)
{
    if (*cnt <= R)
        return;
    uint64_t c0 = t_ps_prof ? ps_ns() : 0;
    size_t keep_n;
    int32_t e = ps_edge(sc, (size_t)*cnt, (size_t)R - 1, &keep_n);
    if (keep_n + 64 > (size_t)cap) {
        ps_cut(sc, id, cnt, thr, R, tmp);
        return;
    }
    int m = 0;
    for (int i = 0; i < *cnt; i++) {
        int32_t v = sc[i], d = id[i];
        sc[m] = v;
        id[m] = d;
        m += v >= e;
    }
    ps_prof_cut(c0, *cnt);
    *cnt = m;
    if (e - 1 > *thr) /* e > every threshold so far: the buffer holds only keys above it */
        *thr = e - 1;
}

/* prepared int8 query words qw[2 nch] from fp32 q */
static void ps_prepare(const ps_state *s, const float *q, float *u, int32_t *qw)
{
    float mx = 0;
    ra_kern_dot_range(q, s->aq, RA_DTYPE_F32, s->dim, 0, (size_t)s->dp, u); /* Aq q */
    for (int j = 0; j < s->dp; j++) {
        u[j] *= s->step[j];
        mx = fabsf(u[j]) > mx ? fabsf(u[j]) : mx;
    }
    float m = mx > 0 ? 127.0f / mx : 0;
    int8_t b[PS_MAX_DP];
    for (int j = 0; j < s->dp; j++)
        b[j] = (int8_t)lrintf(u[j] * m);
    for (int c = 0; c < s->nch; c++) {
        uint32_t lo = 0, hi = 0;
        for (int t = 0; t < 4; t++) {
            lo |= (uint32_t)(uint8_t)b[8 * c + t] << (8 * t);
            hi |= (uint32_t)(uint8_t)b[8 * c + 4 + t] << (8 * t);
        }
        qw[2 * c] = (int32_t)lo;
        qw[2 * c + 1] = (int32_t)hi;
    }
}

/* The default number of candidates rescored: 10 k at 131,072 keys, grown as n^0.25 (at
 * more keys more of them crowd the k-th score within the code's error), at least 4 k.
 * Fewer code dimensions and more candidates rescored was the cheaper way to the same
 * recall (bench/README.md, "Projected-code scan"). Times the head's factor (0.5..8, set
 * by ra_head's recall probes of decode queries). */
static int ps_default_R(int k, size_t n, float mult)
{
    double r = 10.0 * k * pow((double)n / 131072.0, 0.25) * mult;
    if (r < 4.0 * k)
        r = 4.0 * k;
    if (r > 64.0 * k)
        r = 64.0 * k;
    return (int)r;
}

/* scans blocks [b0, b1) for g queries, cutting buffers as they fill */
static void ps_sweep(const ps_state *s, size_t b0, size_t b1, size_t step, int g, const int32_t *qw,
                     int32_t *thr, int32_t **sc, int32_t **id, int *cnt, int cap, const int *R)
{
    size_t b = b0;
    while (b < b1) {
        b = ra_kern_p4scan(s->codes, s->nch, b, b1, step, s->n, g, qw, thr, sc, id, cnt, cap);
        for (int j = 0; j < g; j++)
            if (cnt[j] > cap - 16)
                ps_cut_scan(sc[j], id[j], &cnt[j], &thr[j], R[j], cap, t_ps.tmp);
    }
}

typedef struct ps_pair {
    float s;
    int32_t id;
} ps_pair;

static inline int ps_before(ps_pair a, ps_pair b) /* better score, then lower id */
{
    return a.s > b.s || (a.s == b.s && a.id < b.id);
}

/* Hoare partition of a[lo..hi] around its middle element: returns j, lo <= j < hi, with
 * a[lo..j] not after the pivot and a[j+1..hi] not before it */
static size_t ps_partition(ps_pair *a, size_t lo, size_t hi)
{
    ps_pair piv = a[lo + (hi - lo) / 2];
    size_t i = lo, j = hi;
    for (;;) {
        while (ps_before(a[i], piv))
            i++;
        while (ps_before(piv, a[j]))
            j--;
        if (i >= j)
            return j;
        ps_pair t = a[i];
        a[i] = a[j], a[j] = t;
        i++, j--;
    }
}

/* a[0..n) sorted best first (insertion below 16, else quicksort) */
static void ps_sort(ps_pair *a, size_t n)
{
    while (n > 16) {
        size_t j = ps_partition(a, 0, n - 1);
        ps_sort(a, j + 1); /* the smaller side by recursion would bound the depth; both
                              sides here are at most n - 1 and n is at most 65,536 */
        a += j + 1;
        n -= j + 1;
    }
    for (size_t i = 1; i < n; i++) {
        ps_pair x = a[i];
        size_t j = i;
        for (; j > 0 && ps_before(x, a[j - 1]); j--)
            a[j] = a[j - 1];
        a[j] = x;
    }
}

/* a float score as an unsigned key whose ascending order is the scores' descending one
 * (-0 as +0; scores are finite) */
static inline uint32_t ps_desc_key(float f)
{
    f += 0.0f;
    int32_t b;
    memcpy(&b, &f, sizeof b);
    uint32_t k = (uint32_t)(b ^ ((b >> 31) & 0x7fffffff)) ^ 0x80000000u;
    return ~k;
}

/* a[0..n) sorted best first, ties kept in their order (the callers' ids ascend, so ties
 * go lower id first, as ps_before): a stable radix sort, 8 bits a pass, passes where
 * every key has the same byte skipped; tmp holds n. A quicksort's comparisons
 * mispredicted as the cuts' did (~5 us of a group's 10 us selection, dev box). */
static void ps_sort_stable(ps_pair *a, size_t n, ps_pair *tmp)
{
    if (n <= 32) {
        ps_sort(a, n); /* unique ids: the same order */
        return;
    }
    ps_pair *src = a, *dst = tmp;
    for (int sh = 0; sh < 32; sh += 8) {
        uint32_t c[256] = {0};
        for (size_t i = 0; i < n; i++)
            c[(ps_desc_key(src[i].s) >> sh) & 255]++;
        if (c[(ps_desc_key(src[0].s) >> sh) & 255] == n)
            continue;
        uint32_t o = 0;
        for (int d = 0; d < 256; d++) {
            uint32_t x = c[d];
            c[d] = o;
            o += x;
        }
        for (size_t i = 0; i < n; i++)
            dst[c[(ps_desc_key(src[i].s) >> sh) & 255]++] = src[i];
        ps_pair *t = src;
        src = dst, dst = t;
    }
    if (src != a)
        memcpy(a, src, n * sizeof *a);
}

/* exact scores of the m rows ids (ascending) into ex, every line of each row prefetched
 * 32 rows ahead (the rows come from DRAM; the kernel's own prefetch is one line 4 rows
 * ahead) */
static void ps_rescore(const ps_state *s, const void *keys, const float *q, const int32_t *ids,
                       int m, float *ex)
{
    size_t rb = (size_t)s->dim * ra_dtype_size(s->dtype);
    const char *base = keys;
    enum { AHEAD = 32, CH = 16 };
    for (int i = 0; i < m && i < AHEAD; i++)
        for (size_t o = 0; o < rb; o += 64)
            __builtin_prefetch(base + (size_t)ids[i] * rb + o, 0, 3);
    for (int i = 0; i < m; i += CH) {
        int c = m - i < CH ? m - i : CH;
        for (int x = i + AHEAD; x < i + AHEAD + c && x < m; x++)
            for (size_t o = 0; o < rb; o += 64)
                __builtin_prefetch(base + (size_t)ids[x] * rb + o, 0, 3);
        ra_kern_dot_gather(q, keys, s->dtype, s->dim, ids + i, (size_t)c, ex + i);
    }
}

#define PS_UNIT                                                                                    \
    64 /* blocks (1,024 keys) of one share at a time: parts take every                             \
          nparts-th unit, so each sees keys from all positions */

/* block i of this part's blocks */
static size_t ps_part_block(size_t i, int part, int nparts)
{
    return ((size_t)part + i / PS_UNIT * (size_t)nparts) * PS_UNIT + i % PS_UNIT;
}

/* the part's blocks [0, nb) in order, through the kernel */
static void ps_sweep_part(const ps_state *s, size_t nblk, int part, int nparts, int g,
                          const int32_t *qw, int32_t *thr, int32_t **sc, int32_t **id, int *cnt,
                          int cap, const int *R)
{
    for (size_t u = (size_t)part * PS_UNIT; u < nblk; u += (size_t)nparts * PS_UNIT)
        ps_sweep(s, u, u + PS_UNIT < nblk ? u + PS_UNIT : nblk, 1, g, qw, thr, sc, id, cnt, cap, R);
}

/* The candidates of one part: a part of n_part of the n keys holds about n_part / n of
 * each query's best R by code (the parts' shares differ by up to a unit), so it keeps
 * that many and three standard deviations more */
static int ps_part_R(int R, int k, int nparts, size_t n_part, size_t n)
{
    if (nparts > 1 && n > 0) {
        double m = (double)R * (double)n_part / (double)n;
        R = (int)ceil(m + 3 * sqrt(m));
    }
    R = R < k ? k : R;
    return R > (int)n_part ? (int)n_part : R;
}

/* a query's candidates in one part of n_part of the n keys: its effort, or the default */
static int ps_query_R(const ra_search_params *pj, size_t n, float mult, int nparts, size_t n_part)
{
    int r = pj->effort > 0 ? pj->effort : ps_default_R(pj->k, n, mult);
    return ps_part_R(r, pj->k, nparts, n_part, n);
}

static ra_status ps_search_range(const ps_state *s, const ra_kv *kv, int part, int nparts,
                                 size_t nq, const float *q, const ra_search_params *p, int kmax,
                                 int32_t *ids, float *scores, int *n_out, ra_search_stats *stats)
{
    size_t n = s->n, nblk = (n + 15) / 16;
    float mult;
    __atomic_load(&s->mult, &mult, __ATOMIC_RELAXED); /* once: the probes may change it */
    size_t nb = 0, n_part = 0;                        /* this part's blocks and keys */
    for (size_t u = (size_t)part * PS_UNIT; u < nblk; u += (size_t)nparts * PS_UNIT) {
        nb += u + PS_UNIT < nblk ? PS_UNIT : nblk - u;
        n_part += ((u + PS_UNIT) * 16 < n ? (u + PS_UNIT) * 16 : n) - u * 16;
    }
    int Rmax = 0;
    for (size_t j = 0; j < nq; j++) {
        int R = ps_query_R(&p[j], n, mult, nparts, n_part);
        Rmax = R > Rmax ? R : Rmax;
    }
    int cap = 2 * Rmax + 64;
    if (!ps_scratch((size_t)cap))
        return RA_ENOMEM;
    ps_tls *t = &t_ps;
    const void *keys = ra_kv_keys(kv);
    uint64_t pt[PP_N] = {0}, tp = 0;
    t_ps_prof = ps_profiling();
    if (t_ps_prof)
        t_cut_ns = t_cuts = t_cut_keys = 0, tp = ps_ns();
#define PS_MARK(ph)                                                                                \
    do {                                                                                           \
        if (t_ps_prof) {                                                                           \
            uint64_t now_ = ps_ns();                                                               \
            pt[ph] += now_ - tp;                                                                   \
            tp = now_;                                                                             \
        }                                                                                          \
    } while (0)
    for (size_t g0 = 0; g0 < nq; g0 += PS_G) {
        int g = nq - g0 < PS_G ? (int)(nq - g0) : PS_G;
        int32_t qw[PS_G * RA_P4_QW], thr[PS_G];
        int32_t *sc[PS_G], *id[PS_G];
        int cnt[PS_G], R[PS_G];
        for (int j = 0; j < g; j++) {
            const ra_search_params *pj = &p[g0 + j];
            ps_prepare(s, q + (g0 + j) * (size_t)s->dim, t->u, qw + j * RA_P4_QW);
            sc[j] = t->sc + (size_t)j * cap;
            id[j] = t->id + (size_t)j * cap;
            cnt[j] = 0;
            thr[j] = INT32_MIN;
            R[j] = ps_query_R(pj, n, mult, nparts, n_part);
            if (pj->k <= 0 || R[j] <= 0) /* nothing for this query: no key passes */
                R[j] = 0, thr[j] = INT32_MAX;
        }
        PS_MARK(PP_PREP);
        /* the threshold from a stratified sample of the part's blocks: its score of rank
         * X R x sampled / total, so that about X R keys pass in the full scan (PS_PRIME) */
        int primed = 0;
        if (nb > 4 * PS_PRIME) {
            int rmin = 0; /* the sample for the smallest R: its rank PS_PRIME_RANK at least */
            for (int j = 0; j < g; j++)
                rmin = R[j] && (!rmin || R[j] < rmin) ? R[j] : rmin;
            double px = ps_prime_x();
            double want = rmin ? PS_PRIME_RANK * (double)nb / (px * rmin) : 0;
            want = want < PS_PRIME ? PS_PRIME : want > (double)nb / 8 ? (double)nb / 8 : want;
            size_t step = (size_t)((double)nb / want);
            step = step ? step : 1;
            size_t sampled = (nb + step - 1) / step;
            double frac = (double)sampled / (double)nb;
            /* each query's rank in the sample, and its buffer cut to about that many
             * while the sample is read (not to R: the sample may hold more than R) */
            int rank[PS_G], Rp[PS_G];
            for (int j = 0; j < g; j++) {
                rank[j] = (int)(px * R[j] * frac);
                Rp[j] = rank[j] >= 1 ? rank[j] : R[j];
            }
            size_t bb = ps_block_bytes(s);
            for (size_t i = 0; i < nb; i += step) {
                /* the sampled blocks are far apart: each one's lines asked for 4 ahead */
                if (i + 4 * step < nb) {
                    const uint8_t *c = s->codes + ps_part_block(i + 4 * step, part, nparts) * bb;
                    for (size_t o = 0; o < bb; o += 64)
                        __builtin_prefetch(c + o, 0, 3);
                }
                size_t b = ps_part_block(i, part, nparts);
                /* step 2 over one block: the kernel's prefetch 16 blocks ahead is for a
                   sweep, and here it read as many lines again as the sample */
                ps_sweep(s, b, b + 1, 2, g, qw, thr, sc, id, cnt, cap, Rp);
            }
            for (int j = 0; j < g; j++) {
                if (!R[j])
                    continue;
                if (rank[j] >= 1 && cnt[j] > rank[j]) {
                    /* just below the lower edge of the bin of that rank: a little more
                     * than X R pass, and the answers are the same (ps_cut_scan) */
                    size_t at_or_above;
                    thr[j] = ps_edge(sc[j], (size_t)cnt[j], (size_t)rank[j] - 1, &at_or_above) - 1;
                    primed = 1;
                } else {
                    thr[j] = INT32_MIN;
                }
                cnt[j] = 0;
            }
        }
        PS_MARK(PP_PRIME);
        int32_t thr0[PS_G];
        memcpy(thr0, thr, sizeof thr0);
        int passes = 1;
        ps_sweep_part(s, nblk, part, nparts, g, qw, thr, sc, id, cnt, cap, R);
        PS_MARK(PP_SCAN);
        if (primed) { /* a threshold set too high by the sample: the scan again from none */
            int again = 0;
            for (int j = 0; j < g; j++)
                again |= R[j] && cnt[j] < R[j] && thr0[j] != INT32_MIN;
            if (again) {
                for (int j = 0; j < g; j++)
                    if (R[j])
                        cnt[j] = 0, thr[j] = INT32_MIN;
                ps_sweep_part(s, nblk, part, nparts, g, qw, thr, sc, id, cnt, cap, R);
                passes = 2;
            }
        }
        PS_MARK(PP_RESCAN);
        for (int j = 0; j < g; j++) {
            size_t qi = g0 + (size_t)j;
            int k = p[qi].k;
            if (!R[j]) {
                n_out[qi] = 0;
                if (stats)
                    stats[qi] = (ra_search_stats){.shared = g};
                continue;
            }
            ps_cut(sc[j], id[j], &cnt[j], &thr[j], R[j], t->tmp);
            int m = cnt[j];
            const float *qq = q + qi * (size_t)s->dim;
            ps_rescore(s, keys, qq, id[j], m, t->ex);
            PS_MARK(PP_RESCORE);
            /* the k best (score, id) pairs, best first: the k-th score by ps_rank on the
             * scores as ordered integers (in sc[j], free now), then the pairs above it and
             * the ties at it of the lowest ids (id[j] is ascending) */
            ps_pair *pr = (ps_pair *)t->tmp; /* tmp holds cap int32: k <= m <= cap / 2 */
            int nk = m < k ? m : k;
            if (nk < m) {
                int32_t *key = sc[j];
                for (int i = 0; i < m; i++) {
                    float f = t->ex[i] + 0.0f; /* -0 as +0: equal scores, equal keys */
                    int32_t b;
                    memcpy(&b, &f, sizeof b);
                    key[i] = b ^ ((b >> 31) & 0x7fffffff);
                }
                size_t above;
                int32_t kt = ps_rank(key, (size_t)m, (size_t)nk - 1, t->tmp, &above);
                int eq_keep = nk - (int)above, w = 0;
                for (int i = 0; i < m; i++)
                    if (key[i] > kt || (key[i] == kt && eq_keep-- > 0))
                        pr[w++] = (ps_pair){t->ex[i], id[j][i]};
            } else {
                for (int i = 0; i < m; i++)
                    pr[i] = (ps_pair){t->ex[i], id[j][i]};
            }
            ps_sort_stable(pr, (size_t)nk, (ps_pair *)t->ex); /* ex: cap floats, free now */
            for (int i = 0; i < nk; i++) {
                ids[qi * (size_t)kmax + (size_t)i] = pr[i].id;
                if (scores)
                    scores[qi * (size_t)kmax + (size_t)i] = pr[i].s;
            }
            n_out[qi] = nk;
            PS_MARK(PP_SELECT);
            if (stats) {
                stats[qi] = (ra_search_stats){.scanned = n_part * (size_t)passes,
                                              .hops = 0,
                                              .rescored = (uint64_t)m,
                                              .shared = g,
                                              .exact_fallback = 0};
            }
        }
    }
#undef PS_MARK
    if (t_ps_prof) {
        for (int i = 0; i < PP_N; i++)
            __atomic_add_fetch(&ps_prof[i], pt[i], __ATOMIC_RELAXED);
        __atomic_add_fetch(&ps_prof[PP_CUT], t_cut_ns, __ATOMIC_RELAXED);
        __atomic_add_fetch(&ps_prof[PP_N], 1, __ATOMIC_RELAXED);
        __atomic_add_fetch(&ps_prof[PP_N + 1], t_cuts, __ATOMIC_RELAXED);
        __atomic_add_fetch(&ps_prof[PP_N + 2], t_cut_keys, __ATOMIC_RELAXED);
        t_ps_prof = 0;
    }
    /* a search at a large effort (up to 2^24 candidates) grew the scratch: give it back
     * rather than keep tens of MB a worker, outside the memory limit */
    if (t->cap > PS_KEEP_CAP)
        ps_tls_free(t);
    return RA_OK;
}

static ra_status ps_search_group(void *st, const ra_kv *kv, size_t nq, const float *q,
                                 const ra_search_params *p, int kmax, int32_t *ids, float *scores,
                                 int *n_out, ra_search_stats *stats)
{
    return ps_search_range(st, kv, 0, 1, nq, q, p, kmax, ids, scores, n_out, stats);
}

static ra_status ps_search_part(void *st, const ra_kv *kv, int part, int nparts, size_t nq,
                                const float *q, const ra_search_params *p, int kmax, int32_t *ids,
                                float *scores, int *n_out)
{
    if (part < 0 || nparts < 1 || part >= nparts)
        return RA_EINVAL;
    return ps_search_range(st, kv, part, nparts, nq, q, p, kmax, ids, scores, n_out, NULL);
}

static ra_status ps_search(void *st, const ra_kv *kv, const float *q, const ra_search_params *p,
                           int32_t *ids, float *scores, int *n_out, ra_search_stats *stats)
{
    return ps_search_group(st, kv, 1, q, p, p->k, ids, scores, n_out, stats);
}

static float ps_effort_mult(void *st, float mult)
{
    ps_state *s = st;
    if (mult > 0) {
        mult = mult < 0.5f ? 0.5f : mult > 8.f ? 8.f : mult;
        __atomic_store(&s->mult, &mult, __ATOMIC_RELAXED);
    }
    float m;
    __atomic_load(&s->mult, &m, __ATOMIC_RELAXED);
    return m;
}

const ra_backend_ops ra_backend_pscan = {
    .name = "pscan",
    .build = ps_build,
    .add = ps_add,
    .search = ps_search,
    .bytes = ps_bytes,
    .destroy = ps_destroy,
    .search_group = ps_search_group,
    .search_part = ps_search_part,
    .effort_mult = ps_effort_mult,
};
