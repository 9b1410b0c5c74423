/* Per-dimension 8- and 4-bit search codes (ra_codes.h): fitting, encoding, query
 * preparation. */
#include "ra_codes.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "ra_env.h"
#include "ra_kernels.h"

/* Range per dimension: the observed min..max over every key, widened by 10 % on each
 * side for keys appended later. Not mean +- a few standard deviations: out-of-distribution
 * queries rank highest exactly the keys that are extreme in some dimension, and clipping
 * them at 4 sigma put true top-100 keys at rank 300-1800 by code score on the calibrated
 * synthetic head (131K keys), where the full range keeps them within rank ~110. */
#define CODE_MARGIN 0.1
/* 4 bits: 15 steps over the range, so a margin costs resolution that every key pays for.
 * On the calibrated and the hidden-state synthetic heads (131K keys, dim 128) the share
 * of the true top-100 within the best 300 by code score is 0.985 / 0.990 at a 10 %
 * margin, 0.992 / 0.994 at 3 %, 0.995 / 0.997 at none (the 8-bit code: 1.000). */
#define CODE_MARGIN4 0.03

int ra_codebook_code_bytes(int dim, int bits)
{
    if (dim <= 0 || dim > 65536 || (bits != 8 && bits != 4))
        return 0;
    int b = bits == 8 ? dim : (dim + 1) / 2;
    return (b + 63) & ~63;
}

int ra_codebook_bits(void)
{
    static ra_env_once env; /* study knob: 4 or 8, anything else is 8 */
    return ra_env_int(&env, "RA_GRAPH_CODE_BITS", 8) == 4 ? 4 : 8;
}

ra_status ra_codebook_from_range(ra_codebook *cb, int dim, int bits, size_t n, const float *mn,
                                 const float *mx)
{
    if (!cb || !ra_codebook_code_bytes(dim, bits) || !mn || !mx)
        return RA_EINVAL;
    memset(cb, 0, sizeof *cb);
    cb->dim = dim;
    cb->bits = bits;
    cb->cbytes = ra_codebook_code_bytes(dim, bits);
    cb->qbytes = bits == 8 ? cb->cbytes : 2 * cb->cbytes;
    double levels = bits == 8 ? 255.0 : 15.0, margin = bits == 8 ? CODE_MARGIN : CODE_MARGIN4;
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
            lo = c - levels / 2;
            hi = c + levels / 2;
        } else {
            double r = hi - lo;
            lo -= margin * r;
            hi += margin * r;
        }
        cb->lo[d] = (float)lo;
        cb->step[d] = (float)((hi - lo) / levels);
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

ra_status ra_codebook_train(ra_codebook *cb, const void *rows, ra_dtype t, int dim, int bits,
                            size_t n)
{
    if (!cb || !ra_codebook_code_bytes(dim, bits) || ra_dtype_size(t) == 0 || (n && !rows))
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
        st = ra_codebook_from_range(cb, dim, bits, n, mn, mx);
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
    if (cb->bits == 4) {
        memset(code, 0, (size_t)cb->cbytes);
        for (int d = 0; d < cb->dim; d++) {
            float c = nearbyintf((tmp[d] - cb->lo[d]) / cb->step[d]);
            unsigned v = !(c > 0.f) ? 0 : c >= 15.f ? 15 : (unsigned)c; /* NaN -> 0 */
            if (d < cb->cbytes)
                code[d] |= (uint8_t)v;
            else
                code[d - cb->cbytes] |= (uint8_t)(v << 4);
        }
        return;
    }
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
    double mid = cb->bits == 8 ? 128.0 : 8.0, a = 0.0;
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
        a += (double)q[d] * cb->lo[d] + ((double)w - (double)s * v) * mid;
    }
    /* 4 bits: q8[d] weighs dimension d, wherever its nibble sits (ra_codes.h) */
    memset(q8 + dim, 0, (size_t)(cb->qbytes - dim));
    memset(q16 + dim, 0, (size_t)(cb->qbytes - dim) * sizeof *q16);
    *mul = s;
    *add = (float)a;
}
