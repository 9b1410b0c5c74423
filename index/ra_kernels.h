/* SIMD kernels of index/: inner products and partial attention over keys and values
 * stored as fp32, fp16 or bf16. One implementation per ISA level (scalar, AVX2+F16C+FMA,
 * AVX-512F/BW/VL); the best one the CPU supports is chosen once at run time (or the one
 * named by RA_ISA=scalar|avx2|avx512 in the environment, if the CPU has it), and tests
 * force each level in turn to compare it with the scalar reference. Queries and results
 * are always fp32; storage is converted in registers. */
#ifndef RA_KERNELS_H
#define RA_KERNELS_H

#include <stddef.h>
#include <stdint.h>

#include "ratd/status.h"

typedef enum ra_isa {
    RA_ISA_SCALAR = 0,
    RA_ISA_AVX2 = 1,   /* AVX2 + FMA + F16C */
    RA_ISA_AVX512 = 2, /* AVX-512F + BW + VL */
    RA_ISA_AVX512VNNI = 3 /* the same + VNNI: the u8 code kernel uses vpdpbusd */
} ra_isa;

/* Prefetches every cache line of the `bytes` at p (a stored row a gather will read soon:
 * scattered rows wait on memory, and one line a row leaves the rest to the hardware) */
static inline void ra_kern_prefetch_row(const void *p, size_t bytes)
{
    for (size_t off = 0; off < bytes; off += 64)
        __builtin_prefetch((const char *)p + off, 0, 1);
}

/* Best ISA this CPU supports (cached). */
ra_isa ra_kern_isa_best(void);
/* ISA in use; ra_kern_isa_set() forces one (tests); returns RA_ENOTSUP if the CPU lacks it. */
ra_isa ra_kern_isa_get(void);
ra_status ra_kern_isa_set(ra_isa isa);
const char *ra_kern_isa_name(ra_isa isa);

/* out[i] = q . row(first + i) for i < n; rows are `dim` elements of type t, contiguous. */
void ra_kern_dot_range(const float *q, const void *rows, ra_dtype t, int dim, size_t first, size_t n,
                       float *out);
/* out[i] = q . row(ids[i]) for i < n (gather). */
void ra_kern_dot_gather(const float *q, const void *rows, ra_dtype t, int dim, const int32_t *ids,
                        size_t n, float *out);
/* out[k * n + i] = q[k] . row_i for k < 4 and i < n: four fp32 queries q[4][dim] (one after
 * another) against n contiguous fp32 rows, each row loaded once for the four (the graph
 * build's exact kNN). The sums may differ from ra_kern_dot's in the last bits. */
void ra_kern_dot_q4_f32(const float *q, const float *rows, int dim, size_t n, float *out);
/* One inner product. */
float ra_kern_dot(const float *q, const void *row, ra_dtype t, int dim);

/* Partial attention over a set S given the raw scores s_i = q.k_i (i < n) of its members:
 *   z_i = scale * s_i;  lse = log sum_i e^{z_i};  o = sum_i e^{z_i - lse} v_{ids[i]}
 * V rows are `dim` elements of type t. o has dim floats. With n == 0: o = 0, lse = -INF.
 * fp32 accumulation. */
void ra_kern_partial_attention(const float *scores, const int32_t *ids, size_t n, float scale,
                               const void *vrows, ra_dtype t, int dim, float *o, float *lse);

/* Search-code inner products (index/codes.c makes the codes and the prepared queries):
 * for i < n and j < G, out[i * G + j] = sum_{d < cbytes} q8[j][d] * code_i[d], exact int32,
 * where code_i = base + ids[i] * stride holds cbytes u8 values (cbytes a multiple of 64)
 * and q8 [G][cbytes] the prepared int8 queries; q16 [G][cbytes] is the same values as
 * int16 (the non-VNNI paths widen the codes and use vpmaddwd). The result is the same
 * bit for bit on every ISA: it is integer arithmetic with no saturation. */
void ra_kern_u8dot_gather(const int8_t *q8, const int16_t *q16, int G, int cbytes,
                          const uint8_t *base, size_t stride, const int32_t *ids, size_t n,
                          int32_t *out);

/* AMX (kernels_amx.c): 1 when the CPU has AMX-INT8 and AVX-512BW, Linux granted this
 * process the tile state and RA_AMX is not 0 (read once); ra_kern_amx_set(0) turns it off
 * for the process (tests compare the paths) and returns whether it is available. */
int ra_kern_amx_ok(void);
int ra_kern_amx_set(int on);
/* The tile configuration of ra_kern_amx_dots32 on the calling thread, set by begin and
 * given back by end (the tile state is saved with the thread until then); calls to
 * ra_kern_amx_dots32 go between them. Only when ra_kern_amx_ok(). */
void ra_kern_amx_begin(void);
void ra_kern_amx_end(void);
/* Packs up to 32 prepared int8 queries q8[nq][cbytes] (cbytes 64 or 128) into the tile
 * layout ra_kern_amx_dots32 reads: cbytes / 64 * 2 KB at pack; queries past nq are 0. */
void ra_kern_amx_pack32(const int8_t *q8, int nq, int cbytes, int8_t *pack);
/* The scores sum_d q8[j][d] * code_i[d] (exact int32, as ra_kern_u8dot_gather) of the n
 * codes at codes + i * stride against the 32 packed queries j; of the codes i with some
 * score above tau[j], in ascending order: i in rows[], the mask of those j in mask[], and
 * the 32 scores in dots[r * 32 ..]. Returns their count (at most n); nothing past code
 * n - 1 is read. pf 1 prefetches the codes ahead (the first pass over codes not in L1:
 * tile loads do not prefetch), 0 not (codes a pass before has just read). Only when
 * ra_kern_amx_ok(). */
size_t ra_kern_amx_dots32(const int8_t *pack, int cbytes, const uint8_t *codes, size_t stride,
                          size_t n, int pf, const int32_t *tau, int32_t *dots, uint32_t *mask,
                          uint32_t *rows);

/* The same for 4-bit codes (ra_codes.h has the packing): out[i * G + j] = sum_{b < cbytes}
 * q8[j][b] * (code_i[b] & 15) + q8[j][b + cbytes] * (code_i[b] >> 4), q8 [G][2 cbytes].
 * Exact int32 and the same on every ISA (no int16 step can saturate: 2 * 15 * 127 fits). */
void ra_kern_u4dot_gather(const int8_t *q8, int G, int cbytes, const uint8_t *base, size_t stride,
                          const int32_t *ids, size_t n, int32_t *out);

/* The projected-code scan's kernel (index/pscan.c has the code layout): 4-bit codes in
 * blocks of 16 keys, nch chunks of 64 bytes a block. For the blocks b, b + step, ... below
 * b1 and the g <= 4 prepared queries qw[j * RA_P4_QW + w] (word 2 c: the int8 weights of
 * dimensions 8 c .. 8 c + 3, word 2 c + 1: 8 c + 4 .. 8 c + 7), every key r = 16 block + i
 * below n_valid whose score sum_d w8[j][d] code_r[d] (exact int32) exceeds thr[j] is
 * appended to sc[j] / id[j] at cnt[j]++. After a block that leaves some cnt[j] above
 * cap - 16 it returns the next block to scan (the caller makes room); else b1 or past it.
 * Keys are appended in ascending order; the same on every ISA. nch <= RA_P4_QW / 2. */
#define RA_P4_QW 32
size_t ra_kern_p4scan(const uint8_t *codes, int nch, size_t b, size_t b1, size_t step,
                      size_t n_valid, int g, const int32_t *qw, const int32_t *thr,
                      int32_t *const *sc, int32_t *const *id, int *cnt, int cap);

/* Convert n elements of type t to fp32 / from fp32 (round to nearest even). */
void ra_kern_to_f32(const void *src, ra_dtype t, size_t n, float *dst);
void ra_kern_from_f32(const float *src, ra_dtype t, size_t n, void *dst);

/* 1 when every one of n elements of type t is finite. */
int ra_kern_all_finite(const void *src, ra_dtype t, size_t n);

#endif
