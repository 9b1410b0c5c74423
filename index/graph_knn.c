/* The build's exact top-K keys of every training query (graph_internal.h, g_exact_knn),
 * on the build's own threads. It replaced ra_exact_knn_batch (FAISS IndexFlatIP) there:
 * FAISS runs each block of keys as an OpenBLAS sgemm (OpenBLAS's pthreads) followed by an
 * OpenMP pass over the queries, and the two pools spin while the other works: the kNN of
 * a 131K head took 2.3 s on 16 threads on the GPU host (4096 queries), and on two cores
 * ~45 % of its CPU time was spinning (OPENBLAS_NUM_THREADS=1 took 2.2 CPU s where the
 * default took 4.0). Here one task is a chunk of queries over every key: blocks of keys
 * converted to fp32 once per chunk and held in L2 while the chunk's queries score them,
 * four at a time (ra_kern_dot_q4_f32), and each keeps its best K (a buffer of 2K cut by selection:
 * most scores fail one compare against the K-th best). Scores are the same dot products as
 * ra_kern_dot; ties go to the lower id. Deterministic whatever the threads. */
#include <math.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>

#include "graph_internal.h"
#include "graph_sort.h"
#include "ra_kernels.h"

#define KNN_QCHUNK 32  /* queries of one task: they share each block of converted keys */
#define KNN_KBLOCK 512 /* keys of one block (256 KB of fp32 at dim 128) */

typedef struct knn_ctx {
    const ra_graph *g;
    const void *keys;
    size_t n;
    const float *q;
    size_t nq;
    int K;
    int32_t *ids;
    float *scores;
    atomic_int fail;
} knn_ctx;

/* (score, id) as a key that sorts best first (score descending, then id ascending) */
static inline uint64_t knn_key(float s, int32_t id)
{
    return (uint64_t)g_f32_key(-s) << 32 | (uint32_t)id;
}

/* Cuts h[0..m) to its K best; returns the K-th best key (the new threshold). */
static uint64_t knn_cut(uint64_t *h, int m, int K)
{
    g_select_u64(h, (size_t)m, (size_t)K);
    uint64_t t = h[0];
    for (int i = 1; i < K; i++)
        t = h[i] > t ? h[i] : t;
    return t;
}

static void knn_task(void *arg, size_t b, size_t e)
{
    knn_ctx *c = arg;
    const ra_graph *g = c->g;
    int dim = g->dim, K = c->K;
    size_t nqc = e - b;
    float *kf = malloc((size_t)KNN_KBLOCK * dim * sizeof *kf);
    float *sc = malloc(4 * KNN_KBLOCK * sizeof *sc);
    uint64_t *h = malloc(nqc * 2 * (size_t)K * sizeof *h);
    uint64_t *thr = malloc(nqc * sizeof *thr);
    float *ts = malloc(nqc * sizeof *ts); /* the threshold's score: the fast reject */
    int *m = calloc(nqc, sizeof *m);
    if (!kf || !sc || !h || !thr || !ts || !m) {
        atomic_store(&c->fail, 1);
        goto done;
    }
    for (size_t j = 0; j < nqc; j++) {
        thr[j] = UINT64_MAX;
        ts[j] = -INFINITY;
    }
    for (size_t k0 = 0; k0 < c->n; k0 += KNN_KBLOCK) {
        size_t kn = c->n - k0 < KNN_KBLOCK ? c->n - k0 : KNN_KBLOCK;
        if (g->dtype == RA_DTYPE_F32)
            memcpy(kf, g_row(g, c->keys, (int32_t)k0), kn * (size_t)dim * sizeof *kf);
        else
            ra_kern_to_f32(g_row(g, c->keys, (int32_t)k0), g->dtype, kn * (size_t)dim, kf);
        for (size_t j0 = 0; j0 < nqc; j0 += 4) { /* four queries per pass over the block */
            size_t nj = nqc - j0 < 4 ? nqc - j0 : 4;
            const float *qj = c->q + (b + j0) * (size_t)dim;
            if (nj == 4)
                ra_kern_dot_q4_f32(qj, kf, dim, kn, sc);
            else
                for (size_t j = 0; j < nj; j++)
                    ra_kern_dot_range(qj + j * dim, kf, RA_DTYPE_F32, dim, 0, kn, sc + j * kn);
            for (size_t j = j0; j < j0 + nj; j++) {
                const float *sj = sc + (j - j0) * kn;
                uint64_t *hj = h + j * 2 * (size_t)K;
                float t = ts[j];
                for (size_t i = 0; i < kn; i++) {
                    if (sj[i] < t) /* below the K-th best: most of them */
                        continue;
                    uint64_t key = knn_key(sj[i], (int32_t)(k0 + i));
                    if (key >= thr[j])
                        continue;
                    hj[m[j]++] = key;
                    if (m[j] == 2 * K) {
                        thr[j] = knn_cut(hj, m[j], K);
                        ts[j] = t = -g_f32_unkey((uint32_t)(thr[j] >> 32));
                        m[j] = K;
                    }
                }
            }
        }
    }
    for (size_t j = 0; j < nqc; j++) {
        uint64_t *hj = h + j * 2 * (size_t)K;
        int mj = m[j];
        if (mj > K) {
            g_select_u64(hj, (size_t)mj, (size_t)K);
            mj = K;
        }
        g_sort_u64(hj, (size_t)mj, NULL);
        int32_t *oi = c->ids + (b + j) * (size_t)K;
        float *os = c->scores + (b + j) * (size_t)K;
        for (int r = 0; r < K; r++) {
            oi[r] = r < mj ? (int32_t)(uint32_t)hj[r] : -1;
            os[r] = r < mj ? -g_f32_unkey((uint32_t)(hj[r] >> 32)) : -INFINITY;
        }
    }
done:
    free(kf), free(sc), free(h), free(thr), free(ts), free(m);
}

ra_status g_exact_knn(const ra_graph *g, const void *keys, size_t n, const float *q, size_t nq,
                      int K, int32_t *ids, float *scores)
{
    if (K <= 0 || (size_t)K > G_MAX_K)
        return RA_EINVAL;
    knn_ctx c = {
        .g = g, .keys = keys, .n = n, .q = q, .nq = nq, .K = K, .ids = ids, .scores = scores};
    atomic_init(&c.fail, 0);
    g_parallel(g->threads, nq, KNN_QCHUNK, knn_task, &c);
    return atomic_load(&c.fail) ? RA_ENOMEM : RA_OK;
}
