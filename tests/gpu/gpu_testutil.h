/* Shared helpers of gpu/'s tests: seeded random tensors in any dtype, a model of one
 * decode run that remembers every token (so any token set can be attended in double
 * precision), and error measures. Header-only, so each test binary stays one file. */
#ifndef GPU_TESTUTIL_H
#define GPU_TESTUTIL_H

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "ra_half.h"
#include "ratd/gpu.h"

static inline uint64_t tu_rng(uint64_t *s)
{
    *s ^= *s << 13;
    *s ^= *s >> 7;
    *s ^= *s << 17;
    return *s;
}

/* roughly N(0, 1) (sum of uniforms) */
static inline float tu_randn(uint64_t *s)
{
    float x = 0.0f;
    for (int i = 0; i < 4; i++)
        x += (float)(tu_rng(s) >> 40) / (float)(1 << 24);
    return (x - 2.0f) * 1.7320508f;
}

static inline float tu_ld(const void *p, size_t i, ra_dtype t)
{
    switch (t) {
    case RA_DTYPE_F16: return ra_f16_to_f32(((const uint16_t *)p)[i]);
    case RA_DTYPE_BF16: return ra_bf16_to_f32(((const uint16_t *)p)[i]);
    default: return ((const float *)p)[i];
    }
}

static inline void tu_st(void *p, size_t i, ra_dtype t, float x)
{
    switch (t) {
    case RA_DTYPE_F16: ((uint16_t *)p)[i] = ra_f32_to_f16(x); break;
    case RA_DTYPE_BF16: ((uint16_t *)p)[i] = ra_f32_to_bf16(x); break;
    default: ((float *)p)[i] = x; break;
    }
}

/* 64-byte aligned, so every tensor passes the 16-byte alignment check */
static inline void *tu_alloc(size_t bytes)
{
    void *p = NULL;
    if (posix_memalign(&p, 64, bytes ? bytes : 1) != 0)
        abort();
    memset(p, 0xA5, bytes); /* poison */
    return p;
}

static inline void tu_fill(void *p, size_t n, ra_dtype t, float scale, uint64_t *s)
{
    for (size_t i = 0; i < n; i++)
        tu_st(p, i, t, scale * tu_randn(s));
}

/* Every token of a run, in the prefill layout [batch][t][n_kv_heads][head_dim]. */
typedef struct tu_hist {
    ra_gpu_config cfg;
    size_t esize;
    unsigned n, cap;
    void *k, *v; /* [cap][batch][H][D]: token-major across sequences, appended per step */
} tu_hist;

static inline size_t tu_tok(const tu_hist *h)
{
    return (size_t)h->cfg.batch * h->cfg.n_kv_heads * h->cfg.head_dim;
}

static inline void tu_hist_init(tu_hist *h, const ra_gpu_config *cfg, unsigned cap)
{
    memset(h, 0, sizeof *h);
    h->cfg = *cfg;
    h->esize = ra_dtype_size(cfg->dtype);
    h->cap = cap;
    h->k = tu_alloc((size_t)cap * tu_tok(h) * h->esize);
    h->v = tu_alloc((size_t)cap * tu_tok(h) * h->esize);
}

static inline void tu_hist_free(tu_hist *h)
{
    free(h->k);
    free(h->v);
}

/* element (token t, seq b, head hh, dim d) of the history */
static inline size_t tu_idx(const tu_hist *h, unsigned t, unsigned b, unsigned hh, unsigned d)
{
    return (((size_t)t * h->cfg.batch + b) * h->cfg.n_kv_heads + hh) * h->cfg.head_dim + d;
}

/* Random prefill of n tokens: fills the history and writes the prefill layout
 * [batch][n][H][D] into fresh buffers *pk, *pv. */
static inline void tu_hist_prefill(tu_hist *h, unsigned n, uint64_t *s, void **pk, void **pv)
{
    unsigned B = h->cfg.batch, H = h->cfg.n_kv_heads, D = h->cfg.head_dim;
    size_t es = h->esize;
    void *k = tu_alloc((size_t)B * n * H * D * es), *v = tu_alloc((size_t)B * n * H * D * es);
    for (unsigned b = 0; b < B; b++)
        for (unsigned t = 0; t < n; t++)
            for (unsigned hh = 0; hh < H; hh++)
                for (unsigned d = 0; d < D; d++) {
                    size_t i = (((size_t)b * n + t) * H + hh) * D + d;
                    tu_st(k, i, h->cfg.dtype, tu_randn(s));
                    tu_st(v, i, h->cfg.dtype, tu_randn(s));
                    memcpy((char *)h->k + tu_idx(h, t, b, hh, d) * es, (char *)k + i * es, es);
                    memcpy((char *)h->v + tu_idx(h, t, b, hh, d) * es, (char *)v + i * es, es);
                }
    h->n = n;
    *pk = k;
    *pv = v;
}

/* Random step token: k, v [B][H][D] into caller buffers, recorded in the history. */
static inline void tu_hist_step(tu_hist *h, uint64_t *s, void *k, void *v)
{
    size_t tok = tu_tok(h), es = h->esize;
    tu_fill(k, tok, h->cfg.dtype, 1.0f, s);
    tu_fill(v, tok, h->cfg.dtype, 1.0f, s);
    memcpy((char *)h->k + (size_t)h->n * tok * es, k, tok * es);
    memcpy((char *)h->v + (size_t)h->n * tok * es, v, tok * es);
    h->n++;
}

/* Is token t (of n) held locally by a cache with this sink / window? */
static inline int tu_local(const ra_gpu_config *c, unsigned t, unsigned n)
{
    if (t < c->sink)
        return 1;
    unsigned first = n > c->window ? n - c->window : 0;
    if (first < c->sink)
        first = c->sink;
    return t >= first;
}

/* Double-precision partial attention of query row (b, hq) over the tokens t < n with
 * sel(t) == want (want: 1 local, 0 remote, -1 all). o is head_dim doubles. Returns lse
 * (-INFINITY for an empty set, o zero). */
static inline double tu_attend(const tu_hist *h, const void *q, unsigned b, unsigned hq,
                               int want, double *o)
{
    const ra_gpu_config *c = &h->cfg;
    unsigned D = c->head_dim, G = c->n_q_heads / c->n_kv_heads, hh = hq / G;
    double scale = c->scale > 0 ? c->scale : 1.0 / sqrt((double)D);
    double mx = -INFINITY;
    double *sc = malloc(sizeof(double) * (h->n ? h->n : 1));
    for (unsigned t = 0; t < h->n; t++) {
        sc[t] = -INFINITY;
        if (want >= 0 && tu_local(c, t, h->n) != want)
            continue;
        double x = 0.0;
        for (unsigned d = 0; d < D; d++)
            x += (double)tu_ld(q, ((size_t)b * c->n_q_heads + hq) * D + d, c->dtype) *
                 tu_ld(h->k, tu_idx(h, t, b, hh, d), c->dtype);
        sc[t] = x * scale;
        if (sc[t] > mx)
            mx = sc[t];
    }
    memset(o, 0, D * sizeof(double));
    if (mx == -INFINITY) {
        free(sc);
        return -INFINITY;
    }
    double l = 0.0;
    for (unsigned t = 0; t < h->n; t++) {
        if (sc[t] == -INFINITY)
            continue;
        double e = exp(sc[t] - mx);
        l += e;
        for (unsigned d = 0; d < D; d++)
            o[d] += e * tu_ld(h->v, tu_idx(h, t, b, hh, d), c->dtype);
    }
    for (unsigned d = 0; d < D; d++)
        o[d] /= l;
    free(sc);
    return mx + log(l);
}

/* max_i |a_i - b_i| / max(max_i |b_i|, 1e-30) over n floats vs doubles */
static inline double tu_relerr_fd(const float *a, const double *b, size_t n)
{
    double num = 0.0, den = 0.0;
    for (size_t i = 0; i < n; i++) {
        double e = fabs((double)a[i] - b[i]);
        if (!(e <= num)) /* NaN propagates */
            num = e;
        if (fabs(b[i]) > den)
            den = fabs(b[i]);
    }
    return num / (den > 1e-30 ? den : 1e-30);
}

static inline double tu_relerr_ff(const float *a, const float *b, size_t n)
{
    double num = 0.0, den = 0.0;
    for (size_t i = 0; i < n; i++) {
        double e = fabs((double)a[i] - (double)b[i]);
        if (!(e <= num))
            num = e;
        if (fabs((double)b[i]) > den)
            den = fabs((double)b[i]);
    }
    return num / (den > 1e-30 ? den : 1e-30);
}

#endif
