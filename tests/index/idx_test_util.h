/* Shared helpers of the index/ unit tests: a seeded RNG, fills in each dtype, and
 * double-precision references (inner products of the stored values, softmax). */
#ifndef IDX_TEST_UTIL_H
#define IDX_TEST_UTIL_H

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "ra_half.h"
#include "ratd/status.h"

typedef struct { uint64_t s; } trng;

static inline uint64_t trng_u64(trng *r)
{
    uint64_t z = (r->s += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}
static inline double trng_unif(trng *r) { return (double)(trng_u64(r) >> 11) * 0x1.0p-53; }
static inline float trng_gauss(trng *r)
{
    double u = trng_unif(r), v = trng_unif(r);
    if (u < 1e-300)
        u = 1e-300;
    return (float)(sqrt(-2.0 * log(u)) * cos(6.283185307179586 * v));
}

/* Stored element i of an array of dtype t, as double. */
static inline double tval(const void *p, ra_dtype t, size_t i)
{
    switch (t) {
    case RA_DTYPE_F32: return ((const float *)p)[i];
    case RA_DTYPE_F16: return ra_f16_to_f32(((const uint16_t *)p)[i]);
    case RA_DTYPE_BF16: return ra_bf16_to_f32(((const uint16_t *)p)[i]);
    }
    return NAN;
}

static inline void tset(void *p, ra_dtype t, size_t i, float x)
{
    switch (t) {
    case RA_DTYPE_F32: ((float *)p)[i] = x; break;
    case RA_DTYPE_F16: ((uint16_t *)p)[i] = ra_f32_to_f16(x); break;
    case RA_DTYPE_BF16: ((uint16_t *)p)[i] = ra_f32_to_bf16(x); break;
    }
}

/* n gaussian elements (times scale) in dtype t; caller frees. */
static inline void *tfill(trng *r, ra_dtype t, size_t n, float scale)
{
    void *p = malloc(n * ra_dtype_size(t) + 64);
    for (size_t i = 0; i < n; i++)
        tset(p, t, i, scale * trng_gauss(r));
    return p;
}

static inline double tdot(const float *q, const void *rows, ra_dtype t, int dim, size_t row,
                          double *absdot)
{
    double s = 0, a = 0;
    for (int j = 0; j < dim; j++) {
        double x = (double)q[j] * tval(rows, t, row * (size_t)dim + j);
        s += x;
        a += fabs(x);
    }
    if (absdot)
        *absdot = a;
    return s;
}

/* Double-precision partial attention over rows ids[0..n) with raw scores s[]. */
static inline void tattn(const double *s, const int32_t *ids, size_t n, double scale,
                         const void *V, ra_dtype t, int dim, double *o, double *lse)
{
    double m = -INFINITY;
    for (size_t i = 0; i < n; i++)
        if (scale * s[i] > m)
            m = scale * s[i];
    double sum = 0;
    for (int j = 0; j < dim; j++)
        o[j] = 0;
    for (size_t i = 0; i < n; i++) {
        double w = exp(scale * s[i] - m);
        sum += w;
        for (int j = 0; j < dim; j++)
            o[j] += w * tval(V, t, (size_t)ids[i] * dim + j);
    }
    for (int j = 0; j < dim; j++)
        o[j] = n ? o[j] / sum : 0;
    *lse = n ? m + log(sum) : -INFINITY;
}

#endif
