/* The build's key->key lists from the search codes, over every pair of keys
 * (graph_internal.h, g_kk_block): each key is prepared as a query (ra_codebook_prep) and
 * scored on the code of every other key, and its best c by that score are its key->key
 * candidates. This is the GPU build's exact key->key top-k (gpu/, issue 12) on the codes:
 * the pruning that follows scores the candidates exactly, so only the choice of them is
 * approximate (the 8-bit code keeps a query's true top-100 within its best ~110).
 *
 * On AMX a tile product scores 16 codes against 16 keys over 64 dimensions in one
 * instruction: a 131K head's 17 G pairs cost ~9.5 thread seconds, ~0.6 s on the GPU host's
 * 16 cores, where one walk per key cost ~2 s (bench/README.md, "CPU build, eighth
 * session"). Elsewhere the same integer dots come from ra_kern_u8dot_gather, so the
 * lists are the same on every host, bit for bit, but a dot at a time: the build keeps its
 * walks there (graph_build.c, g_kk_count).
 *
 * Keys are scanned in chunks against blocks of 32 queries, from the chunk of the block's
 * first key on (then from the start); a query keeps a buffer of up to 2 c + 32 candidates
 * not worse than its threshold (the worst of its best c at the last cut, ties by id), cut
 * back by g_keep_best when full: the lists do not depend on the order. */
#include <math.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>

#include "graph_internal.h"
#include "ra_kernels.h"

#define KK_CH 128 /* codes a pass scores against each block of 32 queries in turn: 16 KB, in L1 */

/* The rows of dots[n][32] with some dots[i][j] > tau[j], as ra_kern_amx_dots32 lists
 * them (its portable counterpart) */
#if defined(__SANITIZE_THREAD__) /* TSan crashes in an ifunc resolver (GCC 12) */
#define KK_CLONES
#else
#define KK_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#endif
KK_CLONES static size_t kk_masks(int32_t *dots, size_t n, const int32_t *tau, uint32_t *mask,
                                 uint32_t *rows)
{
    size_t nr = 0;
    for (size_t i = 0; i < n; i++) {
        uint32_t m = 0;
        for (int j = 0; j < 32; j++)
            m |= (uint32_t)(dots[i * 32 + j] > tau[j]) << j;
        if (nr < i && m) /* compacted in place (rows only move down) */
            memcpy(dots + nr * 32, dots + i * 32, 32 * sizeof *dots);
        mask[nr] = m;
        rows[nr] = (uint32_t)i;
        nr += m != 0;
    }
    return nr;
}

int g_kk_amx(const ra_graph *g)
{
    return g->cb.bits == 8 && (g->cb.cbytes == 64 || g->cb.cbytes == 128) && ra_kern_amx_ok();
}

/* Priming (the key->key lists and the training queries' lists of heads of KK_PRIME_MIN_N
 * keys or more): before the scan, a query is scored on an evenly spaced sample of
 * S = n / step codes (step = n / KK_PRIME_S) and its threshold starts at the sample's r-th
 * best score, so that the scan's buffer is not first filled with whatever the first
 * chunks hold. About r n / S keys score at or above it; with lambda = c S / n,
 * r = lambda + 3 sqrt(lambda) + 3 makes fewer than c of them (the Poisson tail) rare:
 * ~1e-4 a query at lambda 3 (c 96, n 131,072, S 4,096). A
 * query with fewer than c at or above its threshold and no cut is scanned again from no
 * threshold, so the lists are exactly those of a scan without priming. On the dev box
 * (131K keys, dim 128) the buffer took ~930 candidates a key without it, and the lists'
 * thread time fell 17 % with it (bench/README.md, "Fourteenth session"). */
#define KK_PRIME_MIN_N 16384
#define KK_PRIME_S 4096
#define KK_PRIME_RMAX 32

static atomic_int kk_prime_forced = -1; /* g_kk_prime_force: -1 = not forced */

void g_kk_prime_force(int r)
{
    atomic_store(&kk_prime_forced, r);
}

/* the sample's rank r for c of n keys, 0 for no priming; *step its spacing */
static int kk_prime_rank(size_t n, int c, size_t *step)
{
    int forced = atomic_load(&kk_prime_forced);
    if (forced == 0 || (forced < 0 && n < KK_PRIME_MIN_N))
        return 0;
    size_t st = n / (forced > 0 ? 256 : KK_PRIME_S);
    if (st < 1)
        st = 1;
    *step = st;
    if (forced > 0)
        return forced < KK_PRIME_RMAX ? forced : KK_PRIME_RMAX;
    double lam = (double)c * (double)(n / st) / (double)n;
    int r = (int)ceil(lam + 3.0 * sqrt(lam) + 3.0);
    return r <= KK_PRIME_RMAX ? r : 0; /* c near n / 64 and beyond: no gain */
}

/* One block's scan state (g_kk_block) */
typedef struct kk_scan {
    const ra_graph *g;
    size_t nq, nsb;
    const int32_t *self;
    int c, cap, amx, qb, cb;
    int8_t *q8, *pack;
    int16_t *q16;
    int32_t *dots, *ids, *tau, *wsc, *wid, *key;
    uint32_t *mask, *rows;
    int *cnt; /* a query's candidates in W: c or more once it has been cut */
    g_hc *W;
    uint64_t t_sc;
} kk_scan;

/* Scores query block sb on the m codes from key j0 on, `step` keys apart (step > 1: the
 * priming sample), into x->dots / mask / rows; returns the rows with a flag. */
static size_t kk_score(kk_scan *x, size_t sb, size_t j0, size_t m, size_t step, int pf)
{
    const ra_graph *g = x->g;
    int32_t *ts = x->tau + sb * 32;
    uint64_t ta = __builtin_ia32_rdtsc();
    size_t nr;
    if (x->amx) {
        const uint8_t *base = g->kk_codes ? g->kk_codes + j0 * (size_t)x->cb : g_code(g, j0);
        size_t stride = g->kk_codes ? (size_t)x->cb : g->rec_bytes;
        nr = ra_kern_amx_dots32(x->pack + sb * 4096, x->cb, base, stride * step, m, pf, ts, x->dots,
                                x->mask, x->rows);
    } else {
        for (size_t i = 0; i < m; i++)
            x->ids[i] = (int32_t)(j0 + i * step);
        ra_codebook_dots(&g->cb, x->q8 + sb * 32 * (size_t)x->qb, x->q16 + sb * 32 * (size_t)x->qb,
                         32, g->rec, g->rec_bytes, x->ids, m, x->dots);
        nr = kk_masks(x->dots, m, ts, x->mask, x->rows);
    }
    x->t_sc += __builtin_ia32_rdtsc() - ta;
    return nr;
}

/* The scan over every chunk, from the block's own on (then from the start): nearby keys
 * (in position) tend to score high, and an early high threshold lets fewer keys in */
static void kk_scan_all(kk_scan *x)
{
    size_t n = x->g->n, nch = (n + KK_CH - 1) / KK_CH;
    size_t c0 = x->self ? (size_t)x->self[0] / KK_CH % nch : 0;
    int c = x->c, cap = x->cap;
    uint64_t live = 0; /* the query blocks that can take anything (a second scan: few) */
    for (size_t s = 0; s < x->nsb && s < 64; s++)
        for (int j = 0; j < 32; j++)
            live |= (uint64_t)(x->tau[s * 32 + (size_t)j] != INT32_MAX) << s;
    for (size_t k = 0; k < nch; k++) {
        size_t j0 = (c0 + k) % nch * KK_CH;
        size_t m = n - j0 < KK_CH ? n - j0 : KK_CH;
        int pf = 1; /* the chunk's first pass reads its codes from L2 or beyond */
        for (size_t s = 0; s < x->nsb; s++) {
            if (s < 64 && !(live >> s & 1))
                continue;
            int32_t *ts = x->tau + s * 32;
            size_t nr = kk_score(x, s, j0, m, 1, pf);
            pf = 0;
            for (size_t r = 0; r < nr; r++) {
                size_t i = x->rows[r];
                uint32_t mk = x->mask[r];
                while (mk) {
                    int j = __builtin_ctz(mk);
                    mk &= mk - 1;
                    size_t qi = s * 32 + (size_t)j;
                    int32_t id = (int32_t)(j0 + i), d = x->dots[r * 32 + (size_t)j];
                    if (d < x->wsc[qi] || (d == x->wsc[qi] && id > x->wid[qi]) ||
                        (x->self && x->self[qi] == id))
                        continue; /* (a cut since the mask) */
                    g_hc *w = x->W + qi * (size_t)cap;
                    w[x->cnt[qi]++] = (g_hc){(float)d, id};
                    if (x->cnt[qi] == cap) {
                        g_hc worst = g_keep_best(w, cap, c, x->key);
                        x->wsc[qi] = (int32_t)worst.s, x->wid[qi] = worst.id;
                        ts[j] = x->wsc[qi] - 1;
                        x->cnt[qi] = c;
                    }
                }
            }
        }
    }
}

/* The priming thresholds (see KK_PRIME_S): each query's r-th best sample score, self
 * skipped, in tau (INT32_MIN where the sample has fewer than r) */
static void kk_prime(kk_scan *x, int r, size_t step)
{
    size_t n = x->g->n, S = n / step;
    int32_t *best = malloc(x->nsb * 32 * (size_t)r * sizeof *best);
    int *nb = calloc(x->nsb * 32, sizeof *nb);
    if (!best || !nb) { /* no priming: the plain scan */
        free(best), free(nb);
        return;
    }
    for (size_t s0 = 0; s0 < S; s0 += KK_CH) {
        size_t m = S - s0 < KK_CH ? S - s0 : KK_CH;
        for (size_t sb = 0; sb < x->nsb; sb++) {
            int32_t *ts = x->tau + sb * 32;
            size_t nr = kk_score(x, sb, s0 * step, m, step, sb == 0);
            for (size_t k = 0; k < nr; k++) {
                uint32_t mk = x->mask[k];
                int32_t id = (int32_t)((s0 + x->rows[k]) * step);
                while (mk) {
                    int j = __builtin_ctz(mk);
                    mk &= mk - 1;
                    size_t qi = sb * 32 + (size_t)j;
                    if (x->self && x->self[qi] == id)
                        continue;
                    int32_t d = x->dots[k * 32 + (size_t)j], *b = best + qi * (size_t)r;
                    int e = nb[qi] < r ? nb[qi]++ : r - 1; /* insertion, best first */
                    while (e > 0 && b[e - 1] < d) {
                        b[e] = b[e - 1];
                        e--;
                    }
                    b[e] = d;
                    if (nb[qi] == r)
                        ts[j] = b[r - 1];
                }
            }
        }
    }
    /* the scan flags scores at or above the r-th best */
    for (size_t qi = 0; qi < x->nq; qi++) {
        int32_t t = nb[qi] == r ? best[qi * (size_t)r + (size_t)r - 1] : INT32_MIN;
        x->tau[qi] = t == INT32_MIN ? INT32_MIN : t - 1;
    }
    free(best), free(nb);
}

ra_status g_kk_block(const ra_graph *g, const float *q, size_t nq, const int32_t *self, int c,
                     int amx, int32_t *out, uint64_t *cyc)
{
    uint64_t t0 = __builtin_ia32_rdtsc();
    if (nq == 0 || c <= 0)
        return RA_OK;
    kk_scan x = {.g = g, .nq = nq, .nsb = (nq + 31) / 32, .self = self, .c = c};
    size_t nsb = x.nsb;
    /* a cut keeps c of 2 c + 32: on the dev box 4 c + 32 held more candidates longer (~7 %
     * more time in the lists), c + 32 cut too often */
    x.cap = 2 * c + 32, x.qb = g->cb.qbytes, x.cb = g->cb.cbytes;
    int cap = x.cap, qb = x.qb;
    x.amx = amx = amx && g_kk_amx(g);
    x.q8 = calloc(nsb * 32 * (size_t)qb, 1);
    x.q16 = calloc(nsb * 32 * (size_t)qb, sizeof *x.q16);
    x.pack = amx ? aligned_alloc(64, nsb * 4096) : NULL;
    x.dots = aligned_alloc(64, (KK_CH + 16) * 32 * sizeof *x.dots);
    x.mask = malloc(KK_CH * sizeof *x.mask), x.rows = malloc(KK_CH * sizeof *x.rows);
    x.ids = amx ? NULL : malloc(KK_CH * sizeof *x.ids);
    x.tau = malloc(nsb * 32 * sizeof *x.tau), x.wsc = malloc(nq * sizeof *x.wsc);
    x.wid = malloc(nq * sizeof *x.wid);
    x.cnt = calloc(nsb * 32, sizeof *x.cnt);
    x.W = malloc(nq * (size_t)cap * sizeof *x.W);
    g_hc *tmp = malloc((size_t)cap * sizeof *tmp);
    x.key = malloc((size_t)cap * sizeof *x.key);
    ra_status st = RA_OK;
    if (!x.q8 || !x.q16 || (amx && !x.pack) || !x.dots || !x.mask || !x.rows || (!amx && !x.ids) ||
        !x.tau || !x.wsc || !x.wid || !x.cnt || !x.W || !tmp || !x.key) {
        st = RA_ENOMEM;
        goto out;
    }
    /* a query's worst kept (score, id) once it has c, INT32_MIN before; the kernels flag
     * the scores at or above it (tau = worst - 1: ties are decided by id here) */
    for (size_t i = 0; i < nsb * 32; i++) /* padding queries take nothing */
        x.tau[i] = i < nq ? INT32_MIN : INT32_MAX;
    for (size_t i = 0; i < nq; i++)
        x.wsc[i] = INT32_MIN, x.wid[i] = INT32_MAX;
    for (size_t i = 0; i < nq; i++) {
        float mul, add;
        ra_codebook_prep(&g->cb, q + i * (size_t)g->dim, x.q8 + i * (size_t)qb,
                         x.q16 + i * (size_t)qb, &mul, &add);
    }
    if (amx)
        for (size_t s = 0; s < nsb; s++) {
            size_t left = nq - s * 32;
            ra_kern_amx_pack32(x.q8 + s * 32 * (size_t)qb, left < 32 ? (int)left : 32, x.cb,
                               x.pack + s * 4096);
        }
    size_t step = 1;
    int r = kk_prime_rank(g->n, c, &step);
    if (amx)
        ra_kern_amx_begin();
    if (r)
        kk_prime(&x, r, step);
    kk_scan_all(&x);
    if (r) { /* queries with fewer than c at or above the primed threshold (so never cut,
              * which leaves c): again */
        size_t again = 0;
        for (size_t qi = 0; qi < nsb * 32; qi++) {
            int redo = qi < nq && x.cnt[qi] < c && x.tau[qi] != INT32_MIN;
            x.tau[qi] = redo ? INT32_MIN : INT32_MAX;
            if (redo)
                x.cnt[qi] = 0, again++;
        }
        if (again)
            kk_scan_all(&x);
        if (cyc)
            cyc[2] += again;
    }
    if (amx)
        ra_kern_amx_end();
    for (size_t qi = 0; qi < nq; qi++) {
        g_hc *w = x.W + qi * (size_t)cap;
        int k = x.cnt[qi];
        if (k > c) {
            g_keep_best(w, k, c, x.key);
            k = c;
        }
        g_sort_best(w, k, tmp);
        for (int i = 0; i < c; i++)
            out[qi * (size_t)c + (size_t)i] = i < k ? w[i].id : -1;
    }
    if (cyc) { /* scoring, and all else: preparation, selection, sorting */
        cyc[0] += x.t_sc;
        cyc[1] += __builtin_ia32_rdtsc() - t0 - x.t_sc;
    }
out:
    free(x.q8), free(x.q16), free(x.pack), free(x.dots), free(x.mask), free(x.rows), free(x.ids);
    free(x.tau), free(x.wsc), free(x.wid), free(x.cnt), free(x.W), free(x.key);
    free(tmp);
    return st;
}

/* The training queries' lists from the codes (g_code_knn): a block of queries' best
 * 2 K by code (g_kk_block), rescored on the stored keys, the best K kept */
typedef struct kq_ctx {
    const ra_graph *g;
    const void *keys;
    const float *q;
    int K, c;
    int32_t *ids;
    float *scores;
    atomic_int fail;
} kq_ctx;

static void kq_task(void *arg, size_t b, size_t e)
{
    kq_ctx *x = arg;
    const ra_graph *g = x->g;
    size_t c = (size_t)x->c, dim = (size_t)g->dim;
    int32_t *cand = malloc(G_KK_BLOCK * c * sizeof *cand);
    float *sc = malloc(c * sizeof *sc);
    g_hc *h = malloc(c * sizeof *h), *tmp = malloc(c * sizeof *tmp);
    if (!cand || !sc || !h || !tmp) {
        atomic_store(&x->fail, 1);
        goto out;
    }
    for (size_t q0 = b; q0 < e; q0 += G_KK_BLOCK) {
        size_t nb = e - q0 < G_KK_BLOCK ? e - q0 : G_KK_BLOCK;
        if (g_kk_block(g, x->q + q0 * dim, nb, NULL, x->c, 1, cand, NULL)) {
            atomic_store(&x->fail, 1);
            goto out;
        }
        for (size_t i = 0; i < nb; i++) {
            const int32_t *ci = cand + i * c;
            int m = 0;
            while ((size_t)m < c && ci[m] >= 0)
                m++;
            ra_kern_dot_gather(x->q + (q0 + i) * dim, x->keys, g->dtype, g->dim, ci, (size_t)m, sc);
            for (int j = 0; j < m; j++)
                h[j] = (g_hc){sc[j], ci[j]};
            g_sort_best(h, m, tmp);
            int32_t *oi = x->ids + (q0 + i) * (size_t)x->K;
            float *os = x->scores + (q0 + i) * (size_t)x->K;
            for (int j = 0; j < x->K; j++) {
                oi[j] = j < m ? h[j].id : -1;
                os[j] = j < m ? h[j].s : -INFINITY;
            }
        }
    }
out:
    free(cand), free(sc), free(h), free(tmp);
}

ra_status g_code_knn(const ra_graph *g, const void *keys, const float *q, size_t nq, int K,
                     int32_t *ids, float *scores)
{
    if (K <= 0 || (size_t)K > G_MAX_K)
        return RA_EINVAL;
    size_t c = 2 * (size_t)K + 16;
    if (c > g->n)
        c = g->n;
    kq_ctx x = {.g = g, .keys = keys, .q = q, .K = K, .c = (int)c, .ids = ids, .scores = scores};
    atomic_init(&x.fail, 0);
    g_parallel(g->threads, nq, G_KK_BLOCK, kq_task, &x);
    return atomic_load(&x.fail) ? RA_ENOMEM : RA_OK;
}
