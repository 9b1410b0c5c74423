/* Per-dimension u8 search codes (ra_codes.h): fitting, encoding, query preparation. */
#include "ra_codes.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "ra_kernels.h"

#define CODE_SAMPLE 65536
#define CODE_SIGMAS 4.0

ra_status ra_codebook_train(ra_codebook *cb, const void *rows, ra_dtype t, int dim, size_t n)
{
    if (!cb || dim <= 0 || dim > 65536 || ra_dtype_size(t) == 0 || (n && !rows))
        return RA_EINVAL;
    memset(cb, 0, sizeof *cb);
    cb->dim = dim;
    cb->cbytes = (dim + 63) & ~63;
    cb->lo = malloc((size_t)dim * sizeof *cb->lo);
    cb->step = malloc((size_t)dim * sizeof *cb->step);
    double *acc = calloc((size_t)dim * 4, sizeof *acc); /* sum, sum2, min, max */
    float *f = malloc((size_t)dim * sizeof *f);
    if (!cb->lo || !cb->step || !acc || !f) {
        free(acc);
        free(f);
        ra_codebook_fini(cb);
        return RA_ENOMEM;
    }
    size_t ns = n < CODE_SAMPLE ? n : CODE_SAMPLE;
    size_t rb = (size_t)dim * ra_dtype_size(t);
    for (int d = 0; d < dim; d++) {
        acc[2 * dim + d] = INFINITY;
        acc[3 * dim + d] = -INFINITY;
    }
    for (size_t s = 0; s < ns; s++) {
        size_t i = ns == n ? s : (size_t)((double)s * (double)n / (double)ns);
        ra_kern_to_f32((const char *)rows + i * rb, t, (size_t)dim, f);
        for (int d = 0; d < dim; d++) {
            double x = f[d];
            acc[d] += x;
            acc[dim + d] += x * x;
            if (x < acc[2 * dim + d])
                acc[2 * dim + d] = x;
            if (x > acc[3 * dim + d])
                acc[3 * dim + d] = x;
        }
    }
    for (int d = 0; d < dim; d++) {
        double lo = 0, hi = 0;
        if (ns) {
            double m = acc[d] / (double)ns;
            double v = acc[dim + d] / (double)ns - m * m;
            double sd = v > 0 ? sqrt(v) : 0;
            lo = fmax(acc[2 * dim + d], m - CODE_SIGMAS * sd);
            hi = fmin(acc[3 * dim + d], m + CODE_SIGMAS * sd);
        }
        if (!(hi - lo > 1e-30)) { /* a constant dimension (or no data): any step works */
            double c = ns ? 0.5 * (lo + hi) : 0.0;
            lo = c - 127.5;
            hi = c + 127.5;
        }
        cb->lo[d] = (float)lo;
        cb->step[d] = (float)((hi - lo) / 255.0);
    }
    free(acc);
    free(f);
    return RA_OK;
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
        if (w > amax)
            amax = w;
    }
    float s = amax > 0.f ? amax / 127.f : 1.f;
    double a = 0.0;
    for (int d = 0; d < dim; d++) {
        float w = q[d] * cb->step[d];
        float r = nearbyintf(w / s);
        int v = r > 127.f ? 127 : r < -127.f ? -127 : (int)r;
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
