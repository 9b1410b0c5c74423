/* Internal to index/: the per-ISA kernel table behind ra_kernels.h. Each ISA file
 * (kernels.c scalar, kernels_avx2.c, kernels_avx512.c) fills one table; kernels.c picks
 * one at run time. Functions are per dtype so the hot loops carry no dtype switch. */
#ifndef RA_KERN_IMPL_H
#define RA_KERN_IMPL_H

#include <stddef.h>
#include <stdint.h>

#include "ra_kernels.h"

typedef void (*ra_kern_dot_range_fn)(const float *q, const void *rows, int dim, size_t first,
                                     size_t n, float *out);
typedef void (*ra_kern_dot_gather_fn)(const float *q, const void *rows, int dim,
                                      const int32_t *ids, size_t n, float *out);
/* acc[j] += w * row[j] for j < dim */
typedef void (*ra_kern_axpy_fn)(float w, const void *row, int dim, float *acc);
typedef void (*ra_kern_to_f32_fn)(const void *src, size_t n, float *dst);
typedef void (*ra_kern_from_f32_fn)(const float *src, size_t n, void *dst);

/* out[k * n + i] = q[k] . row_i for k < 4 (q: 4 vectors of dim, one after another), fp32 */
typedef void (*ra_kern_dotq4_fn)(const float *q, int dim, const float *rows, size_t n, float *out);
typedef void (*ra_kern_u8dot_fn)(const int8_t *q8, const int16_t *q16, int G, int cbytes,
                                 const uint8_t *base, size_t stride, const int32_t *ids, size_t n,
                                 int32_t *out);
typedef void (*ra_kern_u4dot_fn)(const int8_t *q8, int G, int cbytes, const uint8_t *base,
                                 size_t stride, const int32_t *ids, size_t n, int32_t *out);

typedef size_t (*ra_kern_p4scan_fn)(const uint8_t *codes, int nch, size_t b, size_t b1, size_t step,
                                    size_t n_valid, int g, const int32_t *qw, const int32_t *thr,
                                    int32_t *const *sc, int32_t *const *id, int *cnt, int cap);

typedef struct ra_kern_table {
    ra_kern_dot_range_fn dot_range[3];
    ra_kern_dot_gather_fn dot_gather[3];
    ra_kern_axpy_fn axpy[3];
    ra_kern_to_f32_fn to_f32[3];
    ra_kern_from_f32_fn from_f32[3];
    ra_kern_u8dot_fn u8dot_gather;
    ra_kern_u4dot_fn u4dot_gather;
    ra_kern_dotq4_fn dotq4_f32;
    ra_kern_p4scan_fn p4scan; /* NULL: the scalar one */
} ra_kern_table;

/* The gathers' prefetch (ra_kern_prefetch_row): the rows ids[b .. e) of rb bytes at base,
 * RA_GATHER_AHEAD rows ahead of the one being scored */
#define RA_GATHER_AHEAD 8 /* rows */
static inline void ra_kern_prefetch_rows(const char *base, size_t rb, const int32_t *ids, size_t b,
                                         size_t e)
{
    for (size_t i = b; i < e; i++)
        ra_kern_prefetch_row(base + (size_t)ids[i] * rb, rb);
}

extern const ra_kern_table ra_kern_table_scalar;
/* Filled only when the compiler can target the ISA; NULL entries are never used
 * because kernels.c checks the CPU first. */
extern const ra_kern_table ra_kern_table_avx2;
extern const ra_kern_table ra_kern_table_avx512;
/* kernels_vnni.c: the AVX-512 table's u8 code kernel on vpdpbusd */
void ra_kern_u8dot_gather_vnni(const int8_t *q8, const int16_t *q16, int G, int cbytes,
                               const uint8_t *base, size_t stride, const int32_t *ids, size_t n,
                               int32_t *out);
/* kernels_avx2.c: the projected-code scan on vpmaddubsw (the AVX2 and AVX-512 tables) */
size_t ra_kern_p4scan_avx2(const uint8_t *codes, int nch, size_t b, size_t b1, size_t step,
                           size_t n_valid, int g, const int32_t *qw, const int32_t *thr,
                           int32_t *const *sc, int32_t *const *id, int *cnt, int cap);
size_t ra_kern_p4scan_vnni(const uint8_t *codes, int nch, size_t b, size_t b1, size_t step,
                           size_t n_valid, int g, const int32_t *qw, const int32_t *thr,
                           int32_t *const *sc, int32_t *const *id, int *cnt, int cap);
void ra_kern_u4dot_gather_vnni(const int8_t *q8, int G, int cbytes, const uint8_t *base,
                               size_t stride, const int32_t *ids, size_t n, int32_t *out);

#endif
