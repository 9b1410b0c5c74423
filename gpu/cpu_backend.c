/* The CPU backend of gpu/: the same cache, attention, merge and kNN as the CUDA kernels,
 * written plainly on the host in fp32 accumulation. It is what a decoder without a GPU
 * uses (and CI), and it is the reference every CUDA kernel is tested against, so it
 * favours obvious correctness over speed: two-pass softmax, scalar loops. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "ra_gpu_internal.h"
#include "ra_half.h"
#include "ra_topk.h"

typedef struct cpu_impl {
    void *k, *v;   /* [n_layers][batch][n_kv_heads][rows][head_dim] */
    float *scores; /* rows */
    float *acc;    /* head_dim */
} cpu_impl;

static inline float ld(const void *p, size_t i, ra_dtype t)
{
    switch (t) {
    case RA_DTYPE_F16: return ra_f16_to_f32(((const uint16_t *)p)[i]);
    case RA_DTYPE_BF16: return ra_bf16_to_f32(((const uint16_t *)p)[i]);
    default: return ((const float *)p)[i];
    }
}

static inline void st(void *p, size_t i, ra_dtype t, float x)
{
    switch (t) {
    case RA_DTYPE_F16: ((uint16_t *)p)[i] = ra_f32_to_f16(x); break;
    case RA_DTYPE_BF16: ((uint16_t *)p)[i] = ra_f32_to_bf16(x); break;
    default: ((float *)p)[i] = x; break;
    }
}

static ra_status cpu_init(ra_gpu_cache *c)
{
    cpu_impl *m = calloc(1, sizeof *m);
    if (!m)
        return RA_ENOMEM;
    size_t n = (size_t)c->cfg.n_layers * c->cfg.batch * c->cfg.n_kv_heads * c->rows *
               c->cfg.head_dim * c->esize;
    m->k = malloc(n);
    m->v = malloc(n);
    m->scores = malloc(c->rows * sizeof(float));
    m->acc = malloc(c->cfg.head_dim * sizeof(float));
    if (!m->k || !m->v || !m->scores || !m->acc) {
        free(m->k);
        free(m->v);
        free(m->scores);
        free(m->acc);
        free(m);
        return ra_gpu_fail(c, RA_ENOMEM, "CPU cache of %zu bytes", 2 * n);
    }
    c->impl = m;
    return RA_OK;
}

static void cpu_fini(ra_gpu_cache *c)
{
    cpu_impl *m = c->impl;
    if (!m)
        return;
    free(m->k);
    free(m->v);
    free(m->scores);
    free(m->acc);
    free(m);
    c->impl = NULL;
}

/* byte offset of row `row` of (layer, b, h) in the cache storage */
static size_t row_off(const ra_gpu_cache *c, unsigned layer, unsigned b, unsigned h, size_t row)
{
    size_t i = (((size_t)layer * c->cfg.batch + b) * c->cfg.n_kv_heads + h) * c->rows + row;
    return i * c->cfg.head_dim * c->esize;
}

static ra_status cpu_ingest(ra_gpu_cache *c, unsigned layer, ra_gpu_mem mem, const void *k,
                            const void *v, unsigned n, unsigned n_mid)
{
    cpu_impl *m = c->impl;
    ra_gpu_layer *L = &c->layers[layer];
    unsigned sink = c->cfg.sink, w = c->cfg.window, H = c->cfg.n_kv_heads;
    size_t rowb = c->cfg.head_dim * c->esize;
    unsigned w_first = n > w ? n - w : 0;
    if (w_first < sink)
        w_first = sink;
    for (unsigned b = 0; b < c->cfg.batch; b++)
        for (unsigned t = 0; t < n; t++)
            for (unsigned h = 0; h < H; h++) {
                size_t src = (((size_t)b * n + t) * H + h) * rowb;
                char *dk, *dv;
                if (t < sink || t >= w_first) {
                    size_t row = t < sink ? t : sink + (t - sink) % w;
                    dk = (char *)m->k + row_off(c, layer, b, h, row);
                    dv = (char *)m->v + row_off(c, layer, b, h, row);
                } else {
                    size_t dst = (((size_t)b * H + h) * n_mid + (t - sink)) * rowb;
                    dk = (char *)L->off_k + dst;
                    dv = (char *)L->off_v + dst;
                }
                memcpy(dk, (const char *)k + src, rowb);
                memcpy(dv, (const char *)v + src, rowb);
            }
    return RA_OK;
}

static ra_status cpu_step(ra_gpu_cache *c, unsigned layer, const ra_gpu_step_plan *p,
                          ra_gpu_mem mem, const void *q, const void *kn, const void *vn, float *o,
                          float *lse)
{
    cpu_impl *m = c->impl;
    ra_gpu_layer *L = &c->layers[layer];
    unsigned H = c->cfg.n_kv_heads, Hq = c->cfg.n_q_heads, D = c->cfg.head_dim;
    size_t rowb = D * c->esize, cap = c->cfg.evict_capacity;
    ra_dtype t = c->cfg.dtype;
    for (unsigned b = 0; b < c->cfg.batch; b++)
        for (unsigned h = 0; h < H; h++) {
            char *rk = (char *)m->k + row_off(c, layer, b, h, p->row);
            char *rv = (char *)m->v + row_off(c, layer, b, h, p->row);
            if (p->evict) {
                size_t dst = (((size_t)b * H + h) * cap + p->ev_slot) * rowb;
                memcpy((char *)L->ev_k + dst, rk, rowb);
                memcpy((char *)L->ev_v + dst, rv, rowb);
            }
            memcpy(rk, (const char *)kn + ((size_t)b * H + h) * rowb, rowb);
            memcpy(rv, (const char *)vn + ((size_t)b * H + h) * rowb, rowb);
        }
    for (unsigned b = 0; b < c->cfg.batch; b++)
        for (unsigned hq = 0; hq < Hq; hq++) {
            unsigned h = hq / c->group;
            const char *K = (const char *)m->k + row_off(c, layer, b, h, 0);
            const char *V = (const char *)m->v + row_off(c, layer, b, h, 0);
            size_t qi = ((size_t)b * Hq + hq) * D;
            float mx = -INFINITY;
            for (unsigned r = 0; r < p->n_local; r++) {
                float s = 0.0f;
                for (unsigned d = 0; d < D; d++)
                    s += ld(q, qi + d, t) * ld(K, (size_t)r * D + d, t);
                s *= c->cfg.scale;
                m->scores[r] = s;
                mx = s > mx ? s : mx;
            }
            float l = 0.0f;
            memset(m->acc, 0, D * sizeof(float));
            for (unsigned r = 0; r < p->n_local; r++) {
                float e = expf(m->scores[r] - mx);
                l += e;
                for (unsigned d = 0; d < D; d++)
                    m->acc[d] += e * ld(V, (size_t)r * D + d, t);
            }
            for (unsigned d = 0; d < D; d++)
                o[qi + d] = m->acc[d] / l;
            lse[(size_t)b * Hq + hq] = mx + logf(l);
        }
    return RA_OK;
}

static ra_status cpu_merge(ra_gpu_cache *c, ra_gpu_mem mem, const float *oa, const float *la,
                           const void *ob, ra_dtype bt, const float *lb, void *out,
                           ra_dtype ot, float *lse_out)
{
    size_t rows = (size_t)c->cfg.batch * c->cfg.n_q_heads, D = c->cfg.head_dim;
    for (size_t r = 0; r < rows; r++) {
        float a = la[r], b = lb[r];
        float mx = a > b ? a : b;
        float wa = 0.0f, wb = 0.0f, lse = -INFINITY;
        if (mx != -INFINITY) {
            wa = a == -INFINITY ? 0.0f : expf(a - mx);
            wb = b == -INFINITY ? 0.0f : expf(b - mx);
            float sum = wa + wb;
            lse = mx + logf(sum);
            wa /= sum;
            wb /= sum;
        }
        for (size_t d = 0; d < D; d++) {
            float x = 0.0f;
            if (wa != 0.0f)
                x += wa * oa[r * D + d];
            if (wb != 0.0f)
                x += wb * ld(ob, r * D + d, bt);
            st(out, r * D + d, ot, x);
        }
        if (lse_out)
            lse_out[r] = lse;
    }
    return RA_OK;
}

static ra_status cpu_knn(ra_gpu_cache *c, ra_gpu_mem mem, ra_dtype t, const void *qs, size_t nq,
                         const void *keys, size_t nk, unsigned dim, unsigned k, int32_t *ids,
                         float *scores)
{
    float *kf = malloc(nk * dim * sizeof(float));
    float *qf = malloc((size_t)dim * sizeof(float));
    float *hs = malloc(k * sizeof(float));
    int32_t *hi = malloc(k * sizeof(int32_t));
    ra_status s = RA_OK;
    if (!kf || !qf || !hs || !hi) {
        s = ra_gpu_fail(c, RA_ENOMEM, "knn scratch");
        goto out;
    }
    for (size_t i = 0; i < nk * dim; i++)
        kf[i] = ld(keys, i, t);
    for (size_t qi = 0; qi < nq; qi++) {
        for (unsigned d = 0; d < dim; d++)
            qf[d] = ld(qs, qi * dim + d, t);
        int n = 0;
        for (size_t j = 0; j < nk; j++) {
            const float *kr = kf + j * dim;
            float sc = 0.0f;
            for (unsigned d = 0; d < dim; d++)
                sc += qf[d] * kr[d];
            ra_topk_push(hs, hi, &n, (int)k, sc, (int32_t)j);
        }
        ra_topk_finish(hs, hi, n); /* n == k: ra_gpu_knn checks k <= nk */
        memcpy(scores + qi * k, hs, k * sizeof(float));
        memcpy(ids + qi * k, hi, k * sizeof(int32_t));
    }
out:
    free(kf);
    free(qf);
    free(hs);
    free(hi);
    return s;
}

/* compacts [.][cap][D] blocks to [.][n][D] in place: destinations never overtake
 * sources, so ascending memmoves are safe */
static ra_status cpu_fetch_evicted(ra_gpu_cache *c, unsigned layer, unsigned n)
{
    ra_gpu_layer *L = &c->layers[layer];
    size_t cap = c->cfg.evict_capacity, rowb = c->cfg.head_dim * c->esize;
    size_t blocks = (size_t)c->cfg.batch * c->cfg.n_kv_heads;
    if (n < cap)
        for (size_t i = 1; i < blocks; i++) {
            memmove((char *)L->ev_k + i * n * rowb, (char *)L->ev_k + i * cap * rowb, n * rowb);
            memmove((char *)L->ev_v + i * n * rowb, (char *)L->ev_v + i * cap * rowb, n * rowb);
        }
    return RA_OK;
}

static ra_status cpu_nop(ra_gpu_cache *c)
{
    return RA_OK;
}

static ra_status cpu_nop_layer(ra_gpu_cache *c, unsigned layer)
{
    return RA_OK;
}

static ra_status cpu_set_stream(ra_gpu_cache *c, void *s)
{
    return s ? RA_ENOTSUP : RA_OK;
}

static void *cpu_stream(const ra_gpu_cache *c)
{
    return NULL;
}

static ra_status cpu_check_dev(ra_gpu_cache *c, const void *p, const char *what)
{
    return ra_gpu_fail(c, RA_ENOTSUP, "%s: device pointers need the CUDA backend", what);
}

const ra_gpu_ops ra_gpu_cpu_ops = {
    .name = "cpu",
    .init = cpu_init,
    .fini = cpu_fini,
    .ingest = cpu_ingest,
    .step = cpu_step,
    .merge = cpu_merge,
    .knn = cpu_knn,
    .wait_offload = cpu_nop_layer,
    .fetch_evicted = cpu_fetch_evicted,
    .sync = cpu_nop,
    .set_stream = cpu_set_stream,
    .stream = cpu_stream,
    .check_dev = cpu_check_dev,
    .graph_rows = ra_gpu_cpu_graph_rows,
};
