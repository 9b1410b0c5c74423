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
 * first key on (then from the start); a query keeps a buffer of up to 4 c + 32 candidates
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

ra_status g_kk_block(const ra_graph *g, const float *q, size_t nq, const int32_t *self, int c,
                     int amx, int32_t *out, uint64_t *cyc)
{
    uint64_t t_sc = 0, t0 = __builtin_ia32_rdtsc();
    if (nq == 0 || c <= 0)
        return RA_OK;
    size_t n = g->n, nsb = (nq + 31) / 32;
    int qb = g->cb.qbytes, cb = g->cb.cbytes, cap = 4 * c + 32;
    amx = amx && g_kk_amx(g);
    int8_t *q8 = calloc(nsb * 32 * (size_t)qb, 1);
    int16_t *q16 = calloc(nsb * 32 * (size_t)qb, sizeof *q16);
    int8_t *pack = amx ? aligned_alloc(64, nsb * 4096) : NULL;
    int32_t *dots = aligned_alloc(64, (KK_CH + 16) * 32 * sizeof *dots);
    uint32_t *mask = malloc(KK_CH * sizeof *mask), *rows = malloc(KK_CH * sizeof *rows);
    int32_t *ids = amx ? NULL : malloc(KK_CH * sizeof *ids);
    int32_t *tau = malloc(nsb * 32 * sizeof *tau), *wsc = malloc(nq * sizeof *wsc);
    int32_t *wid = malloc(nq * sizeof *wid);
    int *cnt = calloc(nsb * 32, sizeof *cnt);
    g_hc *W = malloc(nq * (size_t)cap * sizeof *W), *tmp = malloc((size_t)cap * sizeof *tmp);
    int32_t *key = malloc((size_t)cap * sizeof *key);
    ra_status st = RA_OK;
    if (!q8 || !q16 || (amx && !pack) || !dots || !mask || !rows || (!amx && !ids) || !tau ||
        !wsc || !wid || !cnt || !W || !tmp || !key) {
        st = RA_ENOMEM;
        goto out;
    }
    /* a query's worst kept (score, id) once it has c, INT32_MIN before; the kernels flag
     * the scores at or above it (tau = worst - 1: ties are decided by id here) */
    for (size_t i = 0; i < nsb * 32; i++) /* padding queries take nothing */
        tau[i] = i < nq ? INT32_MIN : INT32_MAX;
    for (size_t i = 0; i < nq; i++)
        wsc[i] = INT32_MIN, wid[i] = INT32_MAX;
    for (size_t i = 0; i < nq; i++) {
        float mul, add;
        ra_codebook_prep(&g->cb, q + i * (size_t)g->dim, q8 + i * (size_t)qb, q16 + i * (size_t)qb,
                         &mul, &add);
    }
    if (amx)
        for (size_t s = 0; s < nsb; s++) {
            size_t left = nq - s * 32;
            ra_kern_amx_pack32(q8 + s * 32 * (size_t)qb, left < 32 ? (int)left : 32, cb,
                               pack + s * 4096);
        }
    /* the chunks from the block's own onwards, then from the start: nearby keys (in
     * position) tend to score high, and an early high threshold lets fewer keys in */
    size_t nch = (n + KK_CH - 1) / KK_CH, c0 = self ? (size_t)self[0] / KK_CH % nch : 0;
    if (amx)
        ra_kern_amx_begin();
    for (size_t k = 0; k < nch; k++) {
        size_t j0 = (c0 + k) % nch * KK_CH;
        size_t m = n - j0 < KK_CH ? n - j0 : KK_CH;
        if (!amx)
            for (size_t i = 0; i < m; i++)
                ids[i] = (int32_t)(j0 + i);
        for (size_t s = 0; s < nsb; s++) {
            int32_t *ts = tau + s * 32;
            size_t nr;
            uint64_t ta = __builtin_ia32_rdtsc();
            if (amx) {
                nr = g->kk_codes
                         ? ra_kern_amx_dots32(pack + s * 4096, cb, g->kk_codes + j0 * (size_t)cb,
                                              (size_t)cb, m, ts, dots, mask, rows)
                         : ra_kern_amx_dots32(pack + s * 4096, cb, g_code(g, j0), g->rec_bytes, m,
                                              ts, dots, mask, rows);
            } else {
                ra_codebook_dots(&g->cb, q8 + s * 32 * (size_t)qb, q16 + s * 32 * (size_t)qb, 32,
                                 g->rec, g->rec_bytes, ids, m, dots);
                nr = kk_masks(dots, m, ts, mask, rows);
            }
            uint64_t tb = __builtin_ia32_rdtsc();
            t_sc += tb - ta;
            for (size_t r = 0; r < nr; r++) {
                size_t i = rows[r];
                uint32_t mk = mask[r];
                while (mk) {
                    int j = __builtin_ctz(mk);
                    mk &= mk - 1;
                    size_t qi = s * 32 + (size_t)j;
                    int32_t id = (int32_t)(j0 + i), d = dots[r * 32 + (size_t)j];
                    if (d < wsc[qi] || (d == wsc[qi] && id > wid[qi]) || (self && self[qi] == id))
                        continue; /* (a cut since the mask) */
                    g_hc *w = W + qi * (size_t)cap;
                    w[cnt[qi]++] = (g_hc){(float)d, id};
                    if (cnt[qi] == cap) {
                        g_hc worst = g_keep_best(w, cap, c, key);
                        wsc[qi] = (int32_t)worst.s, wid[qi] = worst.id;
                        ts[j] = wsc[qi] - 1;
                        cnt[qi] = c;
                    }
                }
            }
        }
    }
    if (amx)
        ra_kern_amx_end();
    for (size_t qi = 0; qi < nq; qi++) {
        g_hc *w = W + qi * (size_t)cap;
        int k = cnt[qi];
        if (k > c) {
            g_keep_best(w, k, c, key);
            k = c;
        }
        g_sort_best(w, k, tmp);
        for (int i = 0; i < c; i++)
            out[qi * (size_t)c + (size_t)i] = i < k ? w[i].id : -1;
    }
    if (cyc) { /* scoring, and all else: preparation, selection, sorting */
        cyc[0] += t_sc;
        cyc[1] += __builtin_ia32_rdtsc() - t0 - t_sc;
    }
out:
    free(q8), free(q16), free(pack), free(dots), free(mask), free(rows), free(ids), free(tau);
    free(wsc), free(wid);
    free(cnt);
    free(W), free(tmp), free(key);
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
