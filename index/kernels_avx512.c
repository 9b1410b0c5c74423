/* AVX-512F/BW kernels (this file alone is compiled with -mavx512f -mavx512bw -mfma
 * -mf16c; kernels.c calls into it only after the CPU said yes). 16 lanes per step;
 * fp16 via vcvtph2ps zmm, bf16 via a 16-bit shift. Same structure as the AVX2 file:
 * four rows per pass in the scan, scalar tails for dim % 16. */
#include <immintrin.h>
#include <string.h>

#include "kern_dotq4.h"
#include "kern_impl.h"
#include "kern_u4.h"
#include "ra_half.h"

static inline __m512 ld16_f32(const void *p) { return _mm512_loadu_ps(p); }
static inline __m512 ld16_f16(const void *p)
{
    return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)p));
}
static inline __m512 ld16_bf16(const void *p)
{
    __m512i w = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
}
static inline float ld1_f32(const void *p, int j) { return ((const float *)p)[j]; }
static inline float ld1_f16(const void *p, int j) { return ra_f16_to_f32(((const uint16_t *)p)[j]); }
static inline float ld1_bf16(const void *p, int j) { return ra_bf16_to_f32(((const uint16_t *)p)[j]); }

#define AVX512_DTYPE(NAME, ESZ)                                                                \
    static inline float dot1_##NAME(const float *q, const char *r, int dim)                    \
    {                                                                                          \
        __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();                             \
        int j = 0;                                                                             \
        for (; j + 32 <= dim; j += 32) {                                                       \
            a0 = _mm512_fmadd_ps(_mm512_loadu_ps(q + j), ld16_##NAME(r + j * ESZ), a0);        \
            a1 = _mm512_fmadd_ps(_mm512_loadu_ps(q + j + 16),                                  \
                                 ld16_##NAME(r + (j + 16) * ESZ), a1);                         \
        }                                                                                      \
        for (; j + 16 <= dim; j += 16)                                                         \
            a0 = _mm512_fmadd_ps(_mm512_loadu_ps(q + j), ld16_##NAME(r + j * ESZ), a0);        \
        float s = _mm512_reduce_add_ps(_mm512_add_ps(a0, a1));                                 \
        for (; j < dim; j++)                                                                   \
            s += q[j] * ld1_##NAME(r, j);                                                      \
        return s;                                                                              \
    }                                                                                          \
    static inline void dot4_##NAME(const float *q, const char *r0, const char *r1,             \
                                   const char *r2, const char *r3, int dim, float *out)        \
    {                                                                                          \
        __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();                             \
        __m512 a2 = _mm512_setzero_ps(), a3 = _mm512_setzero_ps();                             \
        int j = 0;                                                                             \
        for (; j + 16 <= dim; j += 16) {                                                       \
            __m512 qv = _mm512_loadu_ps(q + j);                                                \
            a0 = _mm512_fmadd_ps(qv, ld16_##NAME(r0 + j * ESZ), a0);                           \
            a1 = _mm512_fmadd_ps(qv, ld16_##NAME(r1 + j * ESZ), a1);                           \
            a2 = _mm512_fmadd_ps(qv, ld16_##NAME(r2 + j * ESZ), a2);                           \
            a3 = _mm512_fmadd_ps(qv, ld16_##NAME(r3 + j * ESZ), a3);                           \
        }                                                                                      \
        float t0 = _mm512_reduce_add_ps(a0), t1 = _mm512_reduce_add_ps(a1);                    \
        float t2 = _mm512_reduce_add_ps(a2), t3 = _mm512_reduce_add_ps(a3);                    \
        for (; j < dim; j++) {                                                                 \
            t0 += q[j] * ld1_##NAME(r0, j);                                                    \
            t1 += q[j] * ld1_##NAME(r1, j);                                                    \
            t2 += q[j] * ld1_##NAME(r2, j);                                                    \
            t3 += q[j] * ld1_##NAME(r3, j);                                                    \
        }                                                                                      \
        out[0] = t0, out[1] = t1, out[2] = t2, out[3] = t3;                                    \
    }                                                                                          \
    static void dot_range_##NAME(const float *q, const void *rows, int dim, size_t first,      \
                                 size_t n, float *out)                                         \
    {                                                                                          \
        size_t rb = (size_t)dim * ESZ;                                                         \
        const char *b = (const char *)rows + first * rb;                                       \
        size_t i = 0;                                                                          \
        for (; i + 4 <= n; i += 4, b += 4 * rb)                                                \
            dot4_##NAME(q, b, b + rb, b + 2 * rb, b + 3 * rb, dim, out + i);                   \
        for (; i < n; i++, b += rb)                                                            \
            out[i] = dot1_##NAME(q, b, dim);                                                   \
    }                                                                                          \
    static void dot_gather_##NAME(const float *q, const void *rows, int dim,                   \
                                  const int32_t *ids, size_t n, float *out)                    \
    {                                                                                          \
        size_t rb = (size_t)dim * ESZ;                                                         \
        const char *b = rows;                                                                  \
        size_t i = 0, ah = RA_GATHER_AHEAD;                                                    \
        ra_kern_prefetch_rows(b, rb, ids, 0, n < ah ? n : ah);                                 \
        for (; i + 4 <= n; i += 4) {                                                           \
            if (i + ah < n)                                                                    \
                ra_kern_prefetch_rows(b, rb, ids, i + ah, i + ah + 4 < n ? i + ah + 4 : n);    \
            dot4_##NAME(q, b + (size_t)ids[i] * rb, b + (size_t)ids[i + 1] * rb,               \
                        b + (size_t)ids[i + 2] * rb, b + (size_t)ids[i + 3] * rb, dim,         \
                        out + i);                                                              \
        }                                                                                      \
        for (; i < n; i++)                                                                     \
            out[i] = dot1_##NAME(q, b + (size_t)ids[i] * rb, dim);                             \
    }                                                                                          \
    static void axpy_##NAME(float w, const void *row, int dim, float *acc)                     \
    {                                                                                          \
        const char *r = row;                                                                   \
        __m512 wv = _mm512_set1_ps(w);                                                         \
        int j = 0;                                                                             \
        for (; j + 16 <= dim; j += 16)                                                         \
            _mm512_storeu_ps(acc + j, _mm512_fmadd_ps(wv, ld16_##NAME(r + j * ESZ),            \
                                                      _mm512_loadu_ps(acc + j)));              \
        for (; j < dim; j++)                                                                   \
            acc[j] += w * ld1_##NAME(r, j);                                                    \
    }                                                                                          \
    static void to_f32_##NAME(const void *src, size_t n, float *dst)                           \
    {                                                                                          \
        const char *s = src;                                                                   \
        size_t i = 0;                                                                          \
        for (; i + 16 <= n; i += 16)                                                           \
            _mm512_storeu_ps(dst + i, ld16_##NAME(s + i * ESZ));                               \
        for (; i < n; i++)                                                                     \
            dst[i] = ld1_##NAME(s + i * ESZ, 0);                                               \
    }

AVX512_DTYPE(f32, 4)
AVX512_DTYPE(f16, 2)
AVX512_DTYPE(bf16, 2)

static void from_f32_f32(const float *src, size_t n, void *dst) { memcpy(dst, src, n * 4); }

static void from_f32_f16(const float *src, size_t n, void *dst)
{
    uint16_t *d = dst;
    size_t i = 0;
    for (; i + 16 <= n; i += 16)
        _mm256_storeu_si256((__m256i *)(d + i),
                            _mm512_cvtps_ph(_mm512_loadu_ps(src + i),
                                            _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    for (; i < n; i++)
        d[i] = ra_f32_to_f16(src[i]);
}

/* Integer RNE like ra_f32_to_bf16; vcvtneps2bf16 would flush subnormals. */
static void from_f32_bf16(const float *src, size_t n, void *dst)
{
    uint16_t *d = dst;
    size_t i = 0;
    const __m512i one = _mm512_set1_epi32(1), bias = _mm512_set1_epi32(0x7fff);
    const __m512i absm = _mm512_set1_epi32(0x7fffffff), inf = _mm512_set1_epi32(0x7f800000);
    const __m512i qbit = _mm512_set1_epi32(0x40);
    for (; i + 16 <= n; i += 16) {
        __m512i u = _mm512_castps_si512(_mm512_loadu_ps(src + i));
        __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), one);
        __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(bias, lsb)), 16);
        __mmask16 nan = _mm512_cmpgt_epi32_mask(_mm512_and_si512(u, absm), inf);
        r = _mm512_mask_or_epi32(r, nan, _mm512_srli_epi32(u, 16), qbit);
        _mm256_storeu_si256((__m256i *)(d + i), _mm512_cvtepi32_epi16(r));
    }
    for (; i < n; i++)
        d[i] = ra_f32_to_bf16(src[i]);
}

/* u8 codes without VNNI: 32 codes widened to int16 per step, vpmaddwd against the int16
 * query; four queries per pass. */
static inline __attribute__((always_inline)) void u8dot_rows(const int16_t *q16, int g, int cb,
                                                             const uint8_t *c, int32_t *out)
{
    __m512i a0 = _mm512_setzero_si512(), a1 = a0, a2 = a0, a3 = a0;
    for (int d = 0; d < cb; d += 32) {
        __m512i cw = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i *)(c + d)));
        const int16_t *q = q16 + d;
        a0 = _mm512_add_epi32(a0, _mm512_madd_epi16(cw, _mm512_loadu_si512(q)));
        if (g > 1)
            a1 = _mm512_add_epi32(a1, _mm512_madd_epi16(cw, _mm512_loadu_si512(q + cb)));
        if (g > 2)
            a2 = _mm512_add_epi32(a2, _mm512_madd_epi16(cw, _mm512_loadu_si512(q + 2 * cb)));
        if (g > 3)
            a3 = _mm512_add_epi32(a3, _mm512_madd_epi16(cw, _mm512_loadu_si512(q + 3 * cb)));
    }
    out[0] = _mm512_reduce_add_epi32(a0);
    if (g > 1)
        out[1] = _mm512_reduce_add_epi32(a1);
    if (g > 2)
        out[2] = _mm512_reduce_add_epi32(a2);
    if (g > 3)
        out[3] = _mm512_reduce_add_epi32(a3);
}

/* One query against four code rows (each query chunk loaded once for four rows); the same
 * exact int32 sums as u8dot_rows. */
static inline __attribute__((always_inline)) void u8dot_4rows(const int16_t *q16, int cb,
                                                              const uint8_t *c0, const uint8_t *c1,
                                                              const uint8_t *c2, const uint8_t *c3,
                                                              int32_t *out)
{
    __m512i a0 = _mm512_setzero_si512(), a1 = a0, a2 = a0, a3 = a0;
    for (int d = 0; d < cb; d += 32) {
        __m512i qv = _mm512_loadu_si512(q16 + d);
        a0 = _mm512_add_epi32(
            a0, _mm512_madd_epi16(_mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i *)(c0 + d))), qv));
        a1 = _mm512_add_epi32(
            a1, _mm512_madd_epi16(_mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i *)(c1 + d))), qv));
        a2 = _mm512_add_epi32(
            a2, _mm512_madd_epi16(_mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i *)(c2 + d))), qv));
        a3 = _mm512_add_epi32(
            a3, _mm512_madd_epi16(_mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i *)(c3 + d))), qv));
    }
    out[0] = _mm512_reduce_add_epi32(a0);
    out[1] = _mm512_reduce_add_epi32(a1);
    out[2] = _mm512_reduce_add_epi32(a2);
    out[3] = _mm512_reduce_add_epi32(a3);
}

static void u8dot_gather(const int8_t *q8, const int16_t *q16, int G, int cb, const uint8_t *base,
                         size_t stride, const int32_t *ids, size_t n, int32_t *out)
{
    (void)q8;
    size_t i = 0;
    if (G == 1)
        for (; i + 4 <= n; i += 4)
            u8dot_4rows(q16, cb, base + (size_t)ids[i] * stride, base + (size_t)ids[i + 1] * stride,
                        base + (size_t)ids[i + 2] * stride, base + (size_t)ids[i + 3] * stride,
                        out + i);
    for (; i < n; i++) {
        const uint8_t *c = base + (size_t)ids[i] * stride;
        int32_t *o = out + i * (size_t)G;
        for (int j = 0; j < G; j += 4) {
            const int16_t *q = q16 + (size_t)j * cb;
            switch (G - j) {
            case 1: u8dot_rows(q, 1, cb, c, o + j); break;
            case 2: u8dot_rows(q, 2, cb, c, o + j); break;
            case 3: u8dot_rows(q, 3, cb, c, o + j); break;
            default: u8dot_rows(q, 4, cb, c, o + j); break;
            }
        }
    }
}

/* 4-bit codes without VNNI: 64 code bytes (128 dimensions) per step as in the AVX2
 * kernel, vpmaddubsw + vpmaddwd; up to four queries share each code load. */
static inline __attribute__((always_inline)) void u4dot_rows(const int8_t *q8, int g, int cb,
                                                             const uint8_t *c, int32_t *out)
{
    const __m512i m4 = _mm512_set1_epi8(15), one = _mm512_set1_epi16(1);
    __m512i a[4] = {_mm512_setzero_si512(), _mm512_setzero_si512(), _mm512_setzero_si512(),
                    _mm512_setzero_si512()};
    for (int b = 0; b < cb; b += 64) {
        __m512i v = _mm512_loadu_si512(c + b);
        __m512i lo = _mm512_and_si512(v, m4), hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), m4);
        for (int j = 0; j < g; j++) {
            const int8_t *q = q8 + (size_t)j * 2 * cb + b;
            __m512i p = _mm512_add_epi16(_mm512_maddubs_epi16(lo, _mm512_loadu_si512(q)),
                                         _mm512_maddubs_epi16(hi, _mm512_loadu_si512(q + cb)));
            a[j] = _mm512_add_epi32(a[j], _mm512_madd_epi16(p, one));
        }
    }
    for (int j = 0; j < g; j++)
        out[j] = _mm512_reduce_add_epi32(a[j]);
}

static void u4dot_gather(const int8_t *q8, int G, int cb, const uint8_t *base, size_t stride,
                         const int32_t *ids, size_t n, int32_t *out)
{
    RA_KERN_U4_GATHER(u4dot_rows)
}

const ra_kern_table ra_kern_table_avx512 = {
    .dot_range = {dot_range_f32, dot_range_f16, dot_range_bf16},
    .dot_gather = {dot_gather_f32, dot_gather_f16, dot_gather_bf16},
    .axpy = {axpy_f32, axpy_f16, axpy_bf16},
    .to_f32 = {to_f32_f32, to_f32_f16, to_f32_bf16},
    .from_f32 = {from_f32_f32, from_f32_f16, from_f32_bf16},
    .u8dot_gather = u8dot_gather,
    .u4dot_gather = u4dot_gather,
    .dotq4_f32 = dotq4_f32,
    .p4scan = ra_kern_p4scan_avx2, /* AVX-512 without VNNI has no faster one */
};
