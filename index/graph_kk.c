/* Key->key candidates of the build by an inverted file over the keys themselves
 * (graph_internal.h, g_kk): the keys are clustered (k-means on a sample, G_KK_PER keys a
 * cluster), each key scores the centroids (inner product: the metric the graph links by)
 * and scans the search codes of its G_KK_PROBES best clusters, stored cluster by cluster,
 * keeping its best L by code score. These replace the build's key->key walks, which read
 * ~3700 scattered codes a key at 70-80 ns each (a 131K head: 40 of its 52 CPU seconds on
 * two cores) where a scan of ~8192 contiguous codes costs a few ns a code.
 *
 * Measured on the calibrated synthetic head (131072 keys, bf16, top-100, 2-vCPU box;
 * bench/README.md "Index build"): walks of L 128 give recall 0.928 / 0.962 at search L 200
 * / 300; exact fp32 candidates from 16 probed clusters of 512 0.930 / 0.962, from 8 0.914 /
 * 0.952, from 16 clusters probed by the key's cluster instead of the key itself 0.906 /
 * 0.949. With clusters of a fixed size, the probes a key needs stay about the same as the
 * keys grow (its top neighbours fill about as many clusters), so the cost is linear in n;
 * at n <= G_KK_PER * G_KK_PROBES every cluster is probed and the candidates are the exact
 * top L by code score.
 *
 * Deterministic: the k-means is seeded and sums in a fixed order, every key's candidates
 * depend on nothing but the data, whatever the threads. */
#include <math.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>

#include "graph_internal.h"
#include "graph_sort.h"
#include "ra_kernels.h"

#define KK_ITERS 10     /* Lloyd iterations on the sample */
#define KK_SAMPLE 64   /* sample points per centroid */
#define KK_MAX_C 2048   /* clusters at most (beyond: larger clusters) */
#define KK_SCAN_CAP 4   /* a key scans at most KK_SCAN_CAP * G_KK_PROBES * G_KK_PER codes */

/* ---- k-means on a sample (fp32) ---- */

typedef struct km_ctx {
    const float *x; /* [S][dim] */
    const float *cen, *cn2;
    int dim, C;
    int32_t *asg;
} km_ctx;

/* nearest centroid (L2) of each sample point, ties to the lower index */
static void km_assign_task(void *arg, size_t b, size_t e)
{
    km_ctx *c = arg;
    float *sc = malloc((size_t)c->C * sizeof *sc);
    for (size_t i = b; i < e; i++) {
        int best = 0;
        if (sc) {
            ra_kern_dot_range(c->x + i * c->dim, c->cen, RA_DTYPE_F32, c->dim, 0, (size_t)c->C,
                              sc);
            float bd = INFINITY;
            for (int j = 0; j < c->C; j++) {
                float d = c->cn2[j] - 2.0f * sc[j];
                if (d < bd) {
                    bd = d;
                    best = j;
                }
            }
        }
        c->asg[i] = best;
    }
    free(sc);
}

/* means: cluster j's points (pts[po[j] .. po[j + 1]), in point order) summed in that
 * order, so the centroids do not depend on the threads */
typedef struct km_mean_ctx {
    const float *x;
    int dim;
    const int32_t *pts;
    const size_t *po;
    float *cen;
} km_mean_ctx;

static void km_mean_task(void *arg, size_t b, size_t e)
{
    km_mean_ctx *c = arg;
    int dim = c->dim;
    double *s = malloc((size_t)dim * sizeof *s);
    for (size_t j = b; j < e && s; j++) {
        size_t m = c->po[j + 1] - c->po[j];
        if (m == 0)
            continue;
        memset(s, 0, (size_t)dim * sizeof *s);
        for (size_t i = c->po[j]; i < c->po[j + 1]; i++) {
            const float *p = c->x + (size_t)c->pts[i] * dim;
            for (int d = 0; d < dim; d++)
                s[d] += p[d];
        }
        for (int d = 0; d < dim; d++)
            c->cen[j * dim + d] = (float)(s[d] / (double)m);
    }
    free(s);
}

static void km_norms(const float *cen, int C, int dim, float *cn2)
{
    for (int j = 0; j < C; j++)
        cn2[j] = ra_kern_dot(cen + (size_t)j * dim, cen + (size_t)j * dim, RA_DTYPE_F32, dim);
}

/* C centroids of S sample points: seeded from evenly spaced points, KK_ITERS rounds of
 * assignment (parallel, per point) and means (parallel, per cluster, in point order); an
 * emptied cluster takes the first point of the largest one. */
static ra_status km_run(const float *x, size_t S, int dim, int C, int threads, uint64_t seed,
                        float *cen)
{
    float *cn2 = malloc((size_t)C * sizeof *cn2);
    int32_t *asg = malloc(S * sizeof *asg), *pts = malloc(S * sizeof *pts);
    size_t *po = malloc(((size_t)C + 1) * sizeof *po), *fill = malloc((size_t)C * sizeof *fill);
    if (!cn2 || !asg || !pts || !po || !fill) {
        free(cn2), free(asg), free(pts), free(po), free(fill);
        return RA_ENOMEM;
    }
    size_t phase = (size_t)(seed % 997);
    for (int j = 0; j < C; j++)
        memcpy(cen + (size_t)j * dim, x + (((size_t)j * S) / (size_t)C + phase) % S * dim,
               (size_t)dim * sizeof *cen);
    for (int it = 0; it < KK_ITERS; it++) {
        km_norms(cen, C, dim, cn2);
        km_ctx c = {.x = x, .cen = cen, .cn2 = cn2, .dim = dim, .C = C, .asg = asg};
        g_parallel(threads, S, 256, km_assign_task, &c);
        memset(po, 0, ((size_t)C + 1) * sizeof *po);
        for (size_t i = 0; i < S; i++)
            po[asg[i] + 1]++;
        for (int j = 0; j < C; j++)
            po[j + 1] += po[j];
        memcpy(fill, po, (size_t)C * sizeof *fill);
        for (size_t i = 0; i < S; i++)
            pts[fill[asg[i]]++] = (int32_t)i;
        km_mean_ctx mc = {.x = x, .dim = dim, .pts = pts, .po = po, .cen = cen};
        g_parallel(threads, (size_t)C, 8, km_mean_task, &mc);
        for (int j = 0; j < C; j++) {
            if (po[j + 1] > po[j])
                continue;
            int big = 0; /* re-seed from the largest cluster's first point */
            for (int k = 1; k < C; k++)
                big = po[k + 1] - po[k] > po[big + 1] - po[big] ? k : big;
            if (po[big + 1] > po[big])
                memcpy(cen + (size_t)j * dim, x + (size_t)pts[po[big]] * dim,
                       (size_t)dim * sizeof *cen);
        }
    }
    free(cn2), free(asg), free(pts), free(po), free(fill);
    return RA_OK;
}

/* ---- the inverted file ---- */

typedef struct kk_probe_ctx {
    g_kk *kk;
    const ra_graph *g;
    const void *keys;
    int32_t *home; /* [n] */
    atomic_int fail;
} kk_probe_ctx;

/* Per key: its home cluster (nearest centroid, L2) and its probes (the G_KK_PROBES
 * centroids of highest inner product with it), both from one row of dots. */
static void kk_probe_task(void *arg, size_t b, size_t e)
{
    kk_probe_ctx *c = arg;
    g_kk *kk = c->kk;
    int C = kk->C, dim = c->g->dim, P = kk->p;
    float *q = malloc((size_t)dim * sizeof *q), *sc = malloc((size_t)C * sizeof *sc);
    uint64_t *top = malloc((size_t)P * sizeof *top);
    if (!q || !sc || !top) {
        atomic_store(&c->fail, 1);
        goto done;
    }
    for (size_t u = b; u < e; u++) {
        ra_kern_to_f32(g_row(c->g, c->keys, (int32_t)u), c->g->dtype, (size_t)dim, q);
        ra_kern_dot_range(q, kk->cen, RA_DTYPE_F32, dim, 0, (size_t)C, sc);
        int best = 0, m = 0;
        float bd = INFINITY;
        for (int j = 0; j < C; j++) {
            float d = kk->cn2[j] - 2.0f * sc[j];
            if (d < bd) {
                bd = d;
                best = j;
            }
            /* top P by inner product (ties to the lower index): insertion into P */
            uint64_t k = (uint64_t)g_f32_key(-sc[j]) << 32 | (uint32_t)j;
            if (m == P && k >= top[P - 1])
                continue;
            int pos = m < P ? m++ : P - 1;
            while (pos > 0 && top[pos - 1] > k) {
                top[pos] = top[pos - 1];
                pos--;
            }
            top[pos] = k;
        }
        c->home[u] = best;
        for (int j = 0; j < P; j++)
            kk->probe[u * P + j] = (int32_t)(uint32_t)top[j];
    }
done:
    free(q), free(sc), free(top);
}

/* positions [b, e): the member's code and the position itself (iota) */
typedef struct kk_copy_ctx {
    g_kk *kk;
    const ra_graph *g;
} kk_copy_ctx;

static void kk_copy_task(void *arg, size_t b, size_t e)
{
    kk_copy_ctx *c = arg;
    g_kk *kk = c->kk;
    for (size_t i = b; i < e; i++) {
        memcpy(kk->codes + i * kk->cbytes, g_code(c->g, (size_t)kk->member[i]), kk->cbytes);
        kk->iota[i] = (int32_t)i;
    }
}

ra_status g_kk_init(g_kk *kk, const ra_graph *g, const void *keys, size_t n)
{
    memset(kk, 0, sizeof *kk);
    int dim = g->dim;
    size_t C = n / G_KK_PER;
    C = C < 1 ? 1 : C > KK_MAX_C ? KK_MAX_C : C;
    kk->C = (int)C;
    kk->p = G_KK_PROBES < kk->C ? G_KK_PROBES : kk->C;
    kk->n = n;
    kk->cbytes = (size_t)g->cb.cbytes;
    size_t S = C * KK_SAMPLE < n ? C * KK_SAMPLE : n;
    float *x = malloc(S * (size_t)dim * sizeof *x);
    int32_t *home = kk->home = malloc(n * sizeof *home);
    size_t *fill = malloc(C * sizeof *fill);
    kk->cen = malloc(C * (size_t)dim * sizeof *kk->cen);
    kk->cn2 = malloc(C * sizeof *kk->cn2);
    kk->off = calloc(C + 1, sizeof *kk->off);
    kk->member = malloc(n * sizeof *kk->member);
    kk->codes = malloc(n * kk->cbytes);
    kk->probe = malloc(n * (size_t)kk->p * sizeof *kk->probe);
    kk->iota = malloc(n * sizeof *kk->iota);
    ra_status st = RA_ENOMEM;
    if (!x || !home || !fill || !kk->cen || !kk->cn2 || !kk->off || !kk->member || !kk->codes ||
        !kk->probe || !kk->iota)
        goto fail;
    for (size_t i = 0; i < S; i++) /* evenly spaced sample */
        ra_kern_to_f32(g_row(g, keys, (int32_t)(i * n / S)), g->dtype, (size_t)dim,
                       x + i * dim);
    if ((st = km_run(x, S, dim, kk->C, g->threads, g->seed, kk->cen)))
        goto fail;
    km_norms(kk->cen, kk->C, dim, kk->cn2);
    kk_probe_ctx pc = {.kk = kk, .g = g, .keys = keys, .home = home};
    atomic_init(&pc.fail, 0);
    g_parallel(g->threads, n, 256, kk_probe_task, &pc);
    if (atomic_load(&pc.fail)) {
        st = RA_ENOMEM;
        goto fail;
    }
    for (size_t u = 0; u < n; u++)
        kk->off[home[u] + 1]++;
    for (size_t j = 0; j < C; j++)
        kk->off[j + 1] += kk->off[j];
    memcpy(fill, kk->off, C * sizeof *fill);
    for (size_t u = 0; u < n; u++) /* members in id order */
        kk->member[fill[home[u]]++] = (int32_t)u;
    kk_copy_ctx cc = {.kk = kk, .g = g};
    g_parallel(g->threads, n, 4096, kk_copy_task, &cc);
    free(x), free(fill);
    return RA_OK;
fail:
    free(x), free(fill);
    g_kk_fini(kk);
    return st;
}

void g_kk_fini(g_kk *kk)
{
    free(kk->cen), free(kk->cn2), free(kk->off), free(kk->member), free(kk->codes);
    free(kk->probe), free(kk->iota), free(kk->home);
    memset(kk, 0, sizeof *kk);
}

/* One node's best L so far: a buffer of up to 2L keys (dot, id) under a threshold; a
 * full buffer is cut to its L smallest by selection and the threshold becomes the largest
 * of them (a heap cost a sift of log L per key taken: 12 % of a build). */
static inline void kk_offer(uint64_t *h, int *m, uint64_t *thr, int L, uint64_t key)
{
    h[(*m)++] = key;
    if (*m == 2 * L) {
        g_select_u64(h, (size_t)*m, (size_t)L);
        uint64_t t = h[0];
        for (int i = 1; i < L; i++)
            t = h[i] > t ? h[i] : t;
        *thr = t;
        *m = L;
    }
}

ra_status g_kk_scratch_init(g_kk_scratch *s, const g_kk *kk, const ra_graph *g, int L)
{
    size_t cb = (size_t)g->cb.cbytes;
    memset(s, 0, sizeof *s);
    s->L = L;
    s->q8 = malloc(G_KK_GROUP * cb);
    s->q16 = malloc(G_KK_GROUP * cb * sizeof *s->q16);
    s->b8 = malloc(4 * cb);
    s->b16 = malloc(4 * cb * sizeof *s->b16);
    s->heap = malloc((size_t)G_KK_GROUP * 2 * L * sizeof *s->heap);
    s->hn = malloc(G_KK_GROUP * sizeof *s->hn);
    s->thr = malloc(G_KK_GROUP * sizeof *s->thr);
    s->pairs = malloc((size_t)G_KK_GROUP * kk->p * sizeof *s->pairs);
    s->dots = malloc(4 * G_KK_ROWS * sizeof *s->dots);
    s->f = malloc((size_t)g->dim * sizeof *s->f);
    if (!s->q8 || !s->q16 || !s->b8 || !s->b16 || !s->heap || !s->hn || !s->thr || !s->pairs ||
        !s->dots || !s->f) {
        g_kk_scratch_fini(s);
        return RA_ENOMEM;
    }
    return RA_OK;
}

void g_kk_scratch_fini(g_kk_scratch *s)
{
    free(s->q8), free(s->q16), free(s->b8), free(s->b16), free(s->heap), free(s->hn), free(s->thr);
    free(s->pairs), free(s->dots), free(s->f);
    memset(s, 0, sizeof *s);
}

void g_kk_group(const g_kk *kk, const ra_graph *g, const void *keys, const int32_t *us, int gn,
                int32_t *cand, int *nc, g_kk_scratch *s, uint64_t *scanned)
{
    size_t cb = (size_t)g->cb.cbytes;
    int L = s->L, P = kk->p;
    float mul, add;
    size_t np = 0;
    for (int j = 0; j < gn; j++) {
        ra_kern_to_f32(g_row(g, keys, us[j]), g->dtype, (size_t)g->dim, s->f);
        ra_codebook_prep(&g->cb, s->f, s->q8 + j * cb, s->q16 + j * cb, &mul, &add);
        s->hn[j] = 0;
        s->thr[j] = UINT64_MAX;
        for (int p = 0; p < P; p++) /* (cluster, member of the group) */
            s->pairs[np++] = (uint64_t)(uint32_t)kk->probe[(size_t)us[j] * P + p] << 32 |
                             (uint32_t)j;
    }
    g_sort_u64(s->pairs, np, NULL);
    uint64_t nscan = 0;
    for (size_t a = 0; a < np;) { /* one cluster: the group's members that probe it */
        int c = (int)(s->pairs[a] >> 32);
        size_t z = a;
        while (z < np && (int)(s->pairs[z] >> 32) == c)
            z++;
        size_t rb = kk->off[c], re = kk->off[c + 1];
        if (re - rb > (size_t)KK_SCAN_CAP * G_KK_PER) /* a giant cluster: its first members */
            re = rb + (size_t)KK_SCAN_CAP * G_KK_PER;
        for (size_t q0 = a; q0 < z; q0 += 4) { /* four queries per pass over the codes */
            int G = z - q0 < 4 ? (int)(z - q0) : 4, qi[4];
            for (int k = 0; k < G; k++) {
                qi[k] = (int)(uint32_t)s->pairs[q0 + k];
                memcpy(s->b8 + k * cb, s->q8 + qi[k] * cb, cb);
                memcpy(s->b16 + k * cb, s->q16 + qi[k] * cb, cb * sizeof *s->b16);
            }
            for (size_t r = rb; r < re; r += G_KK_ROWS) {
                size_t len = re - r < G_KK_ROWS ? re - r : G_KK_ROWS;
                ra_kern_u8dot_gather(s->b8, s->b16, G, (int)cb, kk->codes, kk->cbytes,
                                     kk->iota + r, len, s->dots);
                for (int k = 0; k < G; k++) {
                    int32_t u = us[qi[k]];
                    uint64_t *h = s->heap + (size_t)qi[k] * 2 * L, *thr = &s->thr[qi[k]];
                    int *m = &s->hn[qi[k]];
                    const int32_t *dk = s->dots + k;
                    /* by the integer dot: the code score is mul * dot + add with mul > 0, so
                     * a key (INT32_MAX - dot, id) under the threshold needs dot >= lo */
                    int64_t lo = (int64_t)INT32_MAX - (int64_t)(*thr >> 32);
                    for (size_t i = 0; i < len; i++) {
                        if ((int64_t)dk[i * G] < lo)
                            continue;
                        int32_t v = kk->member[r + i];
                        uint64_t key = (uint64_t)(uint32_t)((int64_t)INT32_MAX - dk[i * G]) << 32 |
                                       (uint32_t)v;
                        if (key < *thr && v != u) {
                            kk_offer(h, m, thr, L, key);
                            lo = (int64_t)INT32_MAX - (int64_t)(*thr >> 32);
                        }
                    }
                }
            }
            nscan += (uint64_t)(re - rb) * (uint64_t)G;
        }
        a = z;
    }
    for (int j = 0; j < gn; j++) {
        uint64_t *h = s->heap + (size_t)j * 2 * L;
        int m = s->hn[j] < L ? s->hn[j] : L;
        if (s->hn[j] > L)
            g_select_u64(h, (size_t)s->hn[j], (size_t)L);
        g_sort_u64(h, (size_t)m, NULL);
        for (int i = 0; i < m; i++)
            cand[(size_t)j * L + i] = (int32_t)(uint32_t)h[i];
        nc[j] = m;
    }
    if (scanned)
        *scanned += nscan;
}
