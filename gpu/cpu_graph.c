/* The CPU backend's graph rows (steps 1-4 of ra_gpu_graph_build in gpu.h): the exact
 * query->key and key->key lists, the per-key candidate rule, occlusion pruning and the
 * reverse edges, written plainly so that it defines what the CUDA kernels compute. It
 * is also what a host without a GPU can hand to ratd as GRAPH_ADJ, so the O(n^2 dim)
 * key->key pass is blocked over keys (fp32 rows converted once, dots that the compiler
 * vectorises), not a scalar loop. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "ra_gpu_internal.h"
#include "ra_half.h"
#include "ra_log.h"
#include "ra_topk.h"

static float *to_f32(const void *p, size_t n, ra_dtype t)
{
    float *f = malloc((n ? n : 1) * sizeof *f);
    if (!f)
        return NULL;
    for (size_t i = 0; i < n; i++)
        switch (t) {
        case RA_DTYPE_F16: f[i] = ra_f16_to_f32(((const uint16_t *)p)[i]); break;
        case RA_DTYPE_BF16: f[i] = ra_bf16_to_f32(((const uint16_t *)p)[i]); break;
        default: f[i] = ((const float *)p)[i]; break;
        }
    return f;
}

/* fp32 dot in 8 lanes (the CUDA kernels sum in another order: near ties may differ) */
static inline float dotf(const float *a, const float *b, unsigned d)
{
    float s[8] = {0};
    unsigned i = 0;
    for (; i + 8 <= d; i += 8)
        for (int j = 0; j < 8; j++)
            s[j] += a[i + j] * b[i + j];
    float r = 0.0f;
    for (; i < d; i++)
        r += a[i] * b[i];
    return r + ((s[0] + s[4]) + (s[1] + s[5])) + ((s[2] + s[6]) + (s[3] + s[7]));
}

/* exact top-k of rows q[0..nq) among keys kf[0..n), skipping key `self0 + i` for row i
 * when self0 >= 0 (the key->key pass) */
static void exact_lists(const float *qf, size_t nq, const float *kf, size_t n, unsigned dim,
                        unsigned k, long self0, int32_t *ids, float *hs, int32_t *hi)
{
    enum { QB = 16 };
    float sc[QB];
    for (size_t q0 = 0; q0 < nq; q0 += QB) {
        size_t qn = nq - q0 < QB ? nq - q0 : QB;
        int cnt[QB] = {0};
        for (size_t j = 0; j < n; j++) {
            const float *kr = kf + j * dim;
            for (size_t a = 0; a < qn; a++)
                sc[a] = dotf(qf + (q0 + a) * dim, kr, dim);
            for (size_t a = 0; a < qn; a++) {
                if (self0 >= 0 && (size_t)self0 + q0 + a == j)
                    continue;
                ra_topk_push(hs + a * k, hi + a * k, &cnt[a], (int)k, sc[a], (int32_t)j);
            }
        }
        for (size_t a = 0; a < qn; a++) {
            ra_topk_finish(hs + a * k, hi + a * k, cnt[a]);
            memcpy(ids + (q0 + a) * k, hi + a * k, k * sizeof *ids);
        }
    }
}

static int cmp_u64(const void *a, const void *b)
{
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return x < y ? -1 : x > y;
}

static int cmp_u32(const void *a, const void *b)
{
    uint32_t x = *(const uint32_t *)a, y = *(const uint32_t *)b;
    return x < y ? -1 : x > y;
}

/* ascending keys are descending scores, ties by lower id (the order of gpu.h) */
static inline uint64_t score_key(float s, int32_t id)
{
    uint32_t u;
    float ns = -s;
    memcpy(&u, &ns, sizeof u);
    u = (u & 0x80000000u) ? ~u : (u | 0x80000000u);
    return (uint64_t)u << 32 | (uint32_t)id;
}

/* Prunes candidates c[0..nc) of node u (ids; u, -1 and repeats skipped) into out (at
 * most M): sorted by u.c desc, c dropped when a kept r has r.c > u.c; refilled to M/2
 * with the best dropped. tmp: nc keys; drop: nc bytes. Returns the count. */
static int prune(const float *kf, unsigned dim, int32_t u, const int32_t *c, int nc, int M,
                 uint64_t *tmp, uint8_t *drop, int32_t *out)
{
    const float *ur = kf + (size_t)u * dim;
    int m = 0;
    for (int i = 0; i < nc; i++)
        if (c[i] >= 0 && c[i] != u)
            tmp[m++] = score_key(dotf(ur, kf + (size_t)c[i] * dim, dim), c[i]);
    qsort(tmp, (size_t)m, sizeof *tmp, cmp_u64);
    int w = 0; /* repeats are adjacent: one id, one dot */
    for (int i = 0; i < m; i++)
        if (w == 0 || (uint32_t)tmp[w - 1] != (uint32_t)tmp[i])
            tmp[w++] = tmp[i];
    m = w;
    int kept = 0;
    for (int i = 0; i < m && kept < M; i++) {
        int32_t id = (int32_t)(uint32_t)tmp[i];
        const float *cr = kf + (size_t)id * dim;
        float s = dotf(ur, cr, dim);
        drop[i] = 0;
        for (int j = 0; j < kept; j++)
            if (dotf(kf + (size_t)out[j] * dim, cr, dim) > s) {
                drop[i] = 1;
                break;
            }
        if (!drop[i])
            out[kept++] = id;
    }
    for (int i = 0; i < m && kept < M / 2; i++)
        if (drop[i])
            out[kept++] = (int32_t)(uint32_t)tmp[i];
    return kept;
}

ra_status ra_gpu_cpu_graph_rows(ra_gpu_cache *c, int lane, ra_gpu_mem mem, ra_dtype t,
                                const void *keys, size_t n, const void *qs, size_t nq, unsigned dim,
                                const ra_gpu_graph_params *p, int32_t *adj, int32_t *occ,
                                int32_t *lists, ra_gpu_graph_stats *st)
{
    (void)lane; /* one lane (no graph_lanes): calls never overlap */
    (void)mem;
    ra_status s = RA_OK;
    const unsigned K = nq ? p->knn : 0, L = p->key_knn, M = p->degree;
    const int W = RA_GPU_GRAPH_WINDOW, G = RA_GPU_GRAPH_LISTS;
    const size_t cp = 4 * (size_t)M, cmax = cp + L;
    const size_t kmax = K > L ? K : L;
    float *kf = to_f32(keys, n * dim, t), *qf = nq ? to_f32(qs, nq * dim, t) : NULL;
    int32_t *ql = malloc((nq * K > 0 ? nq * K : 1) * sizeof *ql);
    int32_t *kk = malloc((n * L > 0 ? n * L : 1) * sizeof *kk);
    float *hs = malloc(16 * (kmax ? kmax : 1) * sizeof *hs);
    int32_t *hi = malloc(16 * (kmax ? kmax : 1) * sizeof *hi);
    size_t *off = calloc(n + 1, sizeof *off);
    uint32_t *oq = malloc((nq * K > 0 ? nq * K : 1) * sizeof *oq); /* occurrences q * K + r */
    /* a list's best key takes the whole list (K - 1), any other key 2W + 1 and the best */
    size_t msz = (size_t)G * ((size_t)(2 * W + 2) > K ? (size_t)(2 * W + 2) : K) + 1;
    uint32_t *ms = malloc(msz * sizeof *ms);
    uint64_t *key = malloc((msz > RA_GPU_GRAPH_REV_CAP ? msz : RA_GPU_GRAPH_REV_CAP) * sizeof *key);
    int32_t *cand = malloc((cmax > RA_GPU_GRAPH_REV_CAP ? cmax : RA_GPU_GRAPH_REV_CAP) * sizeof *cand);
    uint8_t *drop = malloc(msz > RA_GPU_GRAPH_REV_CAP ? msz : RA_GPU_GRAPH_REV_CAP);
    int32_t *adj1 = malloc(n * M * sizeof *adj1);
    size_t *ioff = calloc(n + 1, sizeof *ioff);
    int32_t *isrc = malloc((n * M > 0 ? n * M : 1) * sizeof *isrc);
    if (!kf || (nq && !qf) || !ql || !kk || !hs || !hi || !off || !oq || !ms || !key || !cand ||
        !drop || !adj1 || !ioff || !isrc) {
        s = ra_gpu_fail(c, RA_ENOMEM, "graph build: host scratch for %zu keys", n);
        goto out;
    }
    double t0 = ra_now_s();
    /* 1. query->key lists */
    if (K)
        exact_lists(qf, nq, kf, n, dim, K, -1, ql, hs, hi);
    if (K && lists)
        memcpy(lists, ql, nq * K * sizeof *ql);
    double t1 = ra_now_s();
    /* 2. key->key lists (self excluded) */
    if (L)
        exact_lists(kf, n, kf, n, dim, L, 0, kk, hs, hi);
    double t2 = ra_now_s();
    /* occurrences of each key, in (query, rank) order: a counting sort */
    for (size_t i = 0; i < nq * K; i++)
        off[ql[i] + 1]++;
    for (size_t i = 0; i < n; i++) {
        occ[i] = (int32_t)off[i + 1];
        off[i + 1] += off[i];
    }
    {
        size_t *fill = ioff; /* borrowed: zeroed again below */
        memcpy(fill, off, n * sizeof *fill);
        for (size_t i = 0; i < nq * K; i++)
            oq[fill[ql[i]]++] = (uint32_t)i;
        memset(ioff, 0, (n + 1) * sizeof *ioff);
    }
    /* 3. candidates and pruning per key */
    for (size_t u = 0; u < n; u++) {
        size_t m = 0;
        size_t o1 = off[u + 1] < off[u] + G ? off[u + 1] : off[u] + G;
        for (size_t o = off[u]; o < o1; o++) {
            size_t q = oq[o] / K;
            int r = (int)(oq[o] % K), len = (int)K;
            const int32_t *l = ql + q * K;
            int lo = r == 0 ? 1 : (r - W < 0 ? 0 : r - W);
            int hi2 = r == 0 ? len - 1 : (r + W >= len ? len - 1 : r + W);
            int extra = r > 0 && lo > 0;
            for (int j = lo; j <= hi2 + extra; j++) {
                int32_t v = j > hi2 ? l[0] : l[j];
                if (v != (int32_t)u)
                    ms[m++] = (uint32_t)v;
            }
        }
        qsort(ms, m, sizeof *ms, cmp_u32);
        size_t nd = 0;
        for (size_t i = 0; i < m;) {
            size_t j = i;
            while (j < m && ms[j] == ms[i])
                j++;
            key[nd++] = (uint64_t)(UINT32_MAX - (uint32_t)(j - i)) << 32 | ms[i];
            i = j;
        }
        qsort(key, nd, sizeof *key, cmp_u64);
        size_t nc = 0;
        for (size_t i = 0; i < nd && i < cp; i++)
            cand[nc++] = (int32_t)(uint32_t)key[i];
        for (unsigned j = 0; j < L; j++)
            cand[nc++] = kk[u * L + j];
        int32_t *row = adj1 + u * M;
        int d = prune(kf, dim, (int32_t)u, cand, (int)nc, (int)M, key, drop, row);
        for (unsigned j = (unsigned)d; j < M; j++)
            row[j] = -1;
    }
    double t3 = ra_now_s();
    /* 4. reverse edges: sources of each target in id order (a counting sort) */
    for (size_t i = 0; i < n * M; i++)
        if (adj1[i] >= 0)
            ioff[adj1[i] + 1]++;
    for (size_t i = 0; i < n; i++)
        ioff[i + 1] += ioff[i];
    {
        size_t *fill = off; /* the occurrence offsets are done with */
        memcpy(fill, ioff, n * sizeof *fill);
        for (size_t i = 0; i < n * M; i++)
            if (adj1[i] >= 0)
                isrc[fill[adj1[i]]++] = (int32_t)(i / M);
    }
    for (size_t v = 0; v < n; v++) {
        const int32_t *r1 = adj1 + v * M;
        int nc = 0;
        for (unsigned j = 0; j < M && r1[j] >= 0; j++)
            cand[nc++] = r1[j];
        int deg = nc;
        for (size_t i = ioff[v]; i < ioff[v + 1] && nc < RA_GPU_GRAPH_REV_CAP; i++) {
            int32_t u = isrc[i], have = 0;
            for (int j = 0; j < deg; j++)
                have |= cand[j] == u;
            if (!have)
                cand[nc++] = u;
        }
        int32_t *row = adj + v * M;
        int d = nc;
        if (nc <= (int)M)
            memcpy(row, cand, (size_t)nc * sizeof *row);
        else
            d = prune(kf, dim, (int32_t)v, cand, nc, (int)M, key, drop, row);
        for (unsigned j = (unsigned)d; j < M; j++)
            row[j] = -1;
    }
    double t4 = ra_now_s();
    if (st) {
        st->knn_s = t1 - t0;
        st->key_knn_s = t2 - t1;
        st->project_s = t3 - t2;
        st->reverse_s = t4 - t3;
    }
out:
    free(kf);
    free(qf);
    free(ql);
    free(kk);
    free(hs);
    free(hi);
    free(off);
    free(oq);
    free(ms);
    free(key);
    free(cand);
    free(drop);
    free(adj1);
    free(ioff);
    free(isrc);
    return s;
}
