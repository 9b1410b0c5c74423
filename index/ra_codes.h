/* Search codes of index/ (internal): every key as `dim` u8 values under a per-dimension
 * affine code, k_d ~ lo_d + step_d * c_d, padded with zeros to a multiple of 64 bytes so
 * that the SIMD kernels need no tails. A graph walk scores keys on their codes (one or two
 * cache lines a key instead of four of bf16) and the final candidates are rescored on the
 * stored keys, so returned scores stay exact. A query is prepared once per search into
 * int8 (and int16) weights: q.k ~ mul * sum_d q8_d c_d + add, with the integer sum from
 * ra_kern_u8dot_gather. Ranges are the observed range per dimension with a margin (codes.c
 * says why not a few standard deviations); keys appended later outside it are clamped
 * (only their approximate score suffers; the graph refits the code as keys grow). */
#ifndef RA_CODES_H
#define RA_CODES_H

#include <stddef.h>
#include <stdint.h>

#include "ratd/status.h"

typedef struct ra_codebook {
    int dim;
    int cbytes; /* dim rounded up to 64 */
    float *lo;  /* [dim] */
    float *step;
} ra_codebook;

/* Fits the code to rows [0, n) of `dim` elements of type t (one pass over all of them).
 * n == 0 gives a code centred on 0 with unit steps. */
ra_status ra_codebook_train(ra_codebook *cb, const void *rows, ra_dtype t, int dim, size_t n);
/* The same in two steps, for callers that split the pass over the rows: the range of rows
 * [0, n) widened into mn/mx[dim] (start them at +inf/-inf; tmp holds dim floats), then the
 * code from the range of all n rows. */
void ra_codebook_range(const void *rows, ra_dtype t, int dim, size_t n, float *mn, float *mx,
                       float *tmp);
ra_status ra_codebook_from_range(ra_codebook *cb, int dim, size_t n, const float *mn,
                                 const float *mx);
void ra_codebook_fini(ra_codebook *cb);
size_t ra_codebook_bytes(const ra_codebook *cb);

/* code[cbytes] of one row of type t; tmp holds dim floats. */
void ra_codebook_encode(const ra_codebook *cb, const void *row, ra_dtype t, uint8_t *code,
                        float *tmp);

/* Prepares fp32 q[dim]: q8, q16 [cbytes] (padding 0), and *mul, *add such that
 * q.k ~ *mul * dot(q8, code(k)) + *add. */
void ra_codebook_prep(const ra_codebook *cb, const float *q, int8_t *q8, int16_t *q16, float *mul,
                      float *add);

#endif
