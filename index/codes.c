/* Per-dimension u8 search codes (ra_codes.h): fitting, encoding, query preparation. */
#include "ra_codes.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "ra_kernels.h"

/* Range per dimension: the observed min..max over every key, widened by 10 % on each
 * side for keys appended later. Not mean +- a few standard deviations: out-of-distribution
 * queries rank highest exactly the keys that are extreme in some dimension, and clipping
 * them at 4 sigma put true top-100 keys at rank 300-1800 by code score on the calibrated
 * synthetic head (131K keys), where the full range keeps them within rank ~110. */
#define CODE_MARGIN 0.1

ra_status ra_codebook_from_range(ra_codebook *cb, int dim, size_t n, const float *mn,
                                 const float *mx)
{
    if (!cb || dim <= 0 || dim > 65536 || !mn || !mx)
        return RA_EINVAL;
    memset(cb, 0, sizeof *cb);
    cb->dim = dim;
    cb->cbytes = (dim + 63) & ~63;
    cb->lo = malloc((size_t)dim * sizeof *cb->lo);
    cb->step = malloc((size_t)dim * sizeof *cb->step);
    if (!cb->lo || !cb->step) {
        ra_codebook_fini(cb);
        return RA_ENOMEM;
    }
    for (int d = 0; d < dim; d++) {
        double lo = mn[d], hi = mx[d];
        if (!(hi - lo > 1e-30)) { /* a constant dimension (or no data): any step works */
            double c = n && isfinite(lo) ? lo : 0.0;
            lo = c - 127.5;
            hi = c + 127.5;
        } else {
            double r = hi - lo;
            lo -= CODE_MARGIN * r;
            hi += CODE_MARGIN * r;
        }
        cb->lo[d] = (float)lo;
        cb->step[d] = (float)((hi - lo) / 255.0);
    }
    return RA_OK;
}

void ra_codebook_range(const void *rows, ra_dtype t, int dim, size_t n, float *mn, float *mx,
                       float *tmp)
{
    size_t rb = (size_t)dim * ra_dtype_size(t);
    for (size_t i = 0; i < n; i++) {
        ra_kern_to_f32((const char *)rows + i * rb, t, (size_t)dim, tmp);
        for (int d = 0; d < dim; d++) {
            mn[d] = tmp[d] < mn[d] ? tmp[d] : mn[d];
            mx[d] = tmp[d] > mx[d] ? tmp[d] : mx[d];
        }
    }
}

ra_status ra_codebook_train(ra_codebook *cb, const void *rows, ra_dtype t, int dim, size_t n)
{
    if (!cb || dim <= 0 || dim > 65536 || ra_dtype_size(t) == 0 || (n && !rows))
        return RA_EINVAL;
    float *mn = malloc((size_t)dim * sizeof *mn), *mx = malloc((size_t)dim * sizeof *mx);
    float *f = malloc((size_t)dim * sizeof *f);
    ra_status st = RA_ENOMEM;
    if (mn && mx && f) {
        for (int d = 0; d < dim; d++) {
            mn[d] = INFINITY;
            mx[d] = -INFINITY;
        }
        ra_codebook_range(rows, t, dim, n, mn, mx, f);
        st = ra_codebook_from_range(cb, dim, n, mn, mx);
    }
    free(mn), free(mx), free(f);
    return st;
}

void ra_codebook_fini(ra_codebook *cb)
{
    if (!cb)
        return;
    free(cb->lo);
    free(cb->step);
    cb->lo = cb->step = NULL;
}

size_t ra_codebook_bytes(const ra_codebook *cb)
{
    return cb && cb->lo ? 2 * (size_t)cb->dim * sizeof(float) : 0;
}

void ra_codebook_encode(const ra_codebook *cb, const void *row, ra_dtype t, uint8_t *code,
                        float *tmp)
{
    ra_kern_to_f32(row, t, (size_t)cb->dim, tmp);
    for (int d = 0; d < cb->dim; d++) {
        float c = nearbyintf((tmp[d] - cb->lo[d]) / cb->step[d]);
        code[d] = !(c > 0.f) ? 0 : c >= 255.f ? 255 : (uint8_t)c; /* NaN -> 0 */
    }
    memset(code + cb->dim, 0, (size_t)(cb->cbytes - cb->dim));
}

void ra_codebook_prep(const ra_codebook *cb, const float *q, int8_t *q8, int16_t *q16, float *mul,
                      float *add)
{
    int dim = cb->dim;
    float amax = 0.f;
    for (int d = 0; d < dim; d++) {
        float w = fabsf(q[d] * cb->step[d]);
        amax = w > amax ? w : amax;
    }
    float s = amax > 0.f ? amax / 127.f : 1.f, inv = 1.f / s;
    double a = 0.0;
    for (int d = 0; d < dim; d++) {
        float w = q[d] * cb->step[d];
        /* |w * inv| <= 127 (up to rounding of inv): round half away, clamp */
        float r = w * inv;
        int v = (int)(r + (r >= 0.f ? 0.5f : -0.5f));
        v = v > 127 ? 127 : v < -127 ? -127 : v;
        q8[d] = (int8_t)v;
        q16[d] = (int16_t)v;
        /* the offset, and the query's rounding against a mid-range code: constant over
         * keys, so it centres the approximate score without changing the ranking */
        a += (double)q[d] * cb->lo[d] + ((double)w - (double)s * v) * 128.0;
    }
    memset(q8 + dim, 0, (size_t)(cb->cbytes - dim));
    memset(q16 + dim, 0, (size_t)(cb->cbytes - dim) * sizeof *q16);
    *mul = s;
    *add = (float)a;
}
