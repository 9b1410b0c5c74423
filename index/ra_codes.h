/* Search codes of index/ (internal): every key as `dim` values of `bits` bits (8 or 4)
 * under a per-dimension affine code, k_d ~ lo_d + step_d * c_d, padded with zeros to a
 * multiple of 64 bytes so that the SIMD kernels need no tails. A graph walk scores keys
 * on their codes (one or two cache lines a key instead of four of bf16) and the final
 * candidates are rescored on the stored keys, so returned scores stay exact. A query is
 * prepared once per search into int8 (and int16) weights: q.k ~ mul * sum_d q8_d c_d +
 * add, with the integer sum from ra_codebook_dots. Ranges are the observed range per
 * dimension with a margin (codes.c says why not a few standard deviations); keys appended
 * later outside it are clamped (only their approximate score suffers; the graph refits
 * the code as keys grow).
 *
 * 4-bit codes pack two dimensions a byte: byte b holds dimension b in its low nibble and
 * dimension b + cbytes in its high nibble, so that one SIMD load gives two aligned runs of
 * dimensions and the prepared query is simply q8[d] for dimension d (qbytes = 2 cbytes).
 * A 128-dimension key is then one cache line instead of two. */
#ifndef RA_CODES_H
#define RA_CODES_H

#include <stddef.h>
#include <stdint.h>

#include "ra_kernels.h"
#include "ratd/status.h"

typedef struct ra_codebook {
    int dim;
    int bits;   /* 8 or 4 */
    int cbytes; /* bytes of a code: dim (8 bits) or dim / 2 (4 bits) rounded up to 64 */
    int qbytes; /* int8 (and int16) weights of a prepared query: cbytes * 8 / bits */
    float *lo;  /* [dim] */
    float *step;
} ra_codebook;

/* The code size of `dim` dimensions at `bits` (8 or 4), 0 for anything else. */
int ra_codebook_code_bytes(int dim, int bits);
/* The bits of new heads' search codes: 8, or 4 with RA_GRAPH_CODE_BITS=4 (a study knob,
 * read once). A 4-bit code of 128 dimensions is one cache line instead of two, but on
 * the GPU host it needed a 20 % longer candidate list for the same recall and the walk
 * cost the same per key scored (bench/README.md, "Search codes: 4 bits"): the walk is
 * not bound by the code's lines, so 8 bits stay the default. */
int ra_codebook_bits(void);

/* Fits the code to rows [0, n) of `dim` elements of type t (one pass over all of them).
 * n == 0 gives a code centred on 0 with unit steps. bits: 8 or 4 (else RA_EINVAL). */
ra_status ra_codebook_train(ra_codebook *cb, const void *rows, ra_dtype t, int dim, int bits,
                            size_t n);
/* The same in two steps, for callers that split the pass over the rows: the range of rows
 * [0, n) widened into mn/mx[dim] (start them at +inf/-inf; tmp holds dim floats), then the
 * code from the range of all n rows. */
void ra_codebook_range(const void *rows, ra_dtype t, int dim, size_t n, float *mn, float *mx,
                       float *tmp);
ra_status ra_codebook_from_range(ra_codebook *cb, int dim, int bits, size_t n, const float *mn,
                                 const float *mx);
void ra_codebook_fini(ra_codebook *cb);
size_t ra_codebook_bytes(const ra_codebook *cb);

/* code[cbytes] of one row of type t; tmp holds dim floats. */
void ra_codebook_encode(const ra_codebook *cb, const void *row, ra_dtype t, uint8_t *code,
                        float *tmp);

/* Prepares fp32 q[dim]: q8, q16 [qbytes] (padding 0), and *mul, *add such that
 * q.k ~ *mul * dot(q8, code(k)) + *add. */
void ra_codebook_prep(const ra_codebook *cb, const float *q, int8_t *q8, int16_t *q16, float *mul,
                      float *add);

/* out[i * G + j] = the integer dot of prepared query j (q8/q16 [G][qbytes]) with the
 * code at base + ids[i] * stride, for i < n: ra_kern_u8dot_gather or ra_kern_u4dot_gather
 * by the code's bits. */
static inline void ra_codebook_dots(const ra_codebook *cb, const int8_t *q8, const int16_t *q16,
                                    int G, const uint8_t *base, size_t stride, const int32_t *ids,
                                    size_t n, int32_t *out)
{
    if (cb->bits == 4)
        ra_kern_u4dot_gather(q8, G, cb->cbytes, base, stride, ids, n, out);
    else
        ra_kern_u8dot_gather(q8, q16, G, cb->cbytes, base, stride, ids, n, out);
}

#endif
