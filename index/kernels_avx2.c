/* AVX2 + FMA + F16C kernels (this file alone is compiled with -mavx2 -mfma -mf16c;
 * kernels.c calls into it only after the CPU said yes). fp16 rows convert with
 * vcvtph2ps, bf16 rows by a 16-bit shift, both in registers; the exact scan computes
 * four rows per pass so each q chunk is loaded once and the four horizontal sums share
 * one hadd tree. Tails (dim % 8) take the scalar conversion. */
#include <immintrin.h>
#include <string.h>

#include "kern_dotq4.h"
#include "kern_impl.h"
#include "kern_u4.h"
#include "ra_half.h"

static inline __m256 ld8_f32(const void *p) { return _mm256_loadu_ps((const float *)p); }
static inline __m256 ld8_f16(const void *p)
{
    return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p));
}
static inline __m256 ld8_bf16(const void *p)
{
    __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
}
static inline float ld1_f32(const void *p, int j) { return ((const float *)p)[j]; }
static inline float ld1_f16(const void *p, int j) { return ra_f16_to_f32(((const uint16_t *)p)[j]); }
static inline float ld1_bf16(const void *p, int j) { return ra_bf16_to_f32(((const uint16_t *)p)[j]); }

static inline float hsum1(__m256 a)
{
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

static inline __m128 hsum4(__m256 a, __m256 b, __m256 c, __m256 d)
{
    __m256 ab = _mm256_hadd_ps(a, b);
    __m256 cd = _mm256_hadd_ps(c, d);
    __m256 abcd = _mm256_hadd_ps(ab, cd);
    return _mm_add_ps(_mm256_castps256_ps128(abcd), _mm256_extractf128_ps(abcd, 1));
}

#define AVX2_DTYPE(NAME, ESZ)                                                                  \
    static inline float dot1_##NAME(const float *q, const char *r, int dim)                    \
    {                                                                                          \
        __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();                             \
        int j = 0;                                                                             \
        for (; j + 16 <= dim; j += 16) {                                                       \
            a0 = _mm256_fmadd_ps(_mm256_loadu_ps(q + j), ld8_##NAME(r + j * ESZ), a0);         \
            a1 = _mm256_fmadd_ps(_mm256_loadu_ps(q + j + 8), ld8_##NAME(r + (j + 8) * ESZ),    \
                                 a1);                                                          \
        }                                                                                      \
        for (; j + 8 <= dim; j += 8)                                                           \
            a0 = _mm256_fmadd_ps(_mm256_loadu_ps(q + j), ld8_##NAME(r + j * ESZ), a0);         \
        float s = hsum1(_mm256_add_ps(a0, a1));                                                \
        for (; j < dim; j++)                                                                   \
            s += q[j] * ld1_##NAME(r, j);                                                      \
        return s;                                                                              \
    }                                                                                          \
    static inline void dot4_##NAME(const float *q, const char *r0, const char *r1,             \
                                   const char *r2, const char *r3, int dim, float *out)        \
    {                                                                                          \
        __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();                             \
        __m256 a2 = _mm256_setzero_ps(), a3 = _mm256_setzero_ps();                             \
        int j = 0;                                                                             \
        for (; j + 8 <= dim; j += 8) {                                                         \
            __m256 qv = _mm256_loadu_ps(q + j);                                                \
            a0 = _mm256_fmadd_ps(qv, ld8_##NAME(r0 + j * ESZ), a0);                            \
            a1 = _mm256_fmadd_ps(qv, ld8_##NAME(r1 + j * ESZ), a1);                            \
            a2 = _mm256_fmadd_ps(qv, ld8_##NAME(r2 + j * ESZ), a2);                            \
            a3 = _mm256_fmadd_ps(qv, ld8_##NAME(r3 + j * ESZ), a3);                            \
        }                                                                                      \
        __m128 s = hsum4(a0, a1, a2, a3);                                                      \
        if (j < dim) {                                                                         \
            float t[4] = {0, 0, 0, 0};                                                         \
            for (; j < dim; j++) {                                                             \
                t[0] += q[j] * ld1_##NAME(r0, j);                                              \
                t[1] += q[j] * ld1_##NAME(r1, j);                                              \
                t[2] += q[j] * ld1_##NAME(r2, j);                                              \
                t[3] += q[j] * ld1_##NAME(r3, j);                                              \
            }                                                                                  \
            s = _mm_add_ps(s, _mm_loadu_ps(t));                                                \
        }                                                                                      \
        _mm_storeu_ps(out, s);                                                                 \
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
        __m256 wv = _mm256_set1_ps(w);                                                         \
        int j = 0;                                                                             \
        for (; j + 8 <= dim; j += 8)                                                           \
            _mm256_storeu_ps(acc + j, _mm256_fmadd_ps(wv, ld8_##NAME(r + j * ESZ),             \
                                                      _mm256_loadu_ps(acc + j)));              \
        for (; j < dim; j++)                                                                   \
            acc[j] += w * ld1_##NAME(r, j);                                                    \
    }                                                                                          \
    static void to_f32_##NAME(const void *src, size_t n, float *dst)                           \
    {                                                                                          \
        const char *s = src;                                                                   \
        size_t i = 0;                                                                          \
        for (; i + 8 <= n; i += 8)                                                             \
            _mm256_storeu_ps(dst + i, ld8_##NAME(s + i * ESZ));                                \
        for (; i < n; i++)                                                                     \
            dst[i] = ld1_##NAME(s + i * ESZ, 0);                                               \
    }

AVX2_DTYPE(f32, 4)
AVX2_DTYPE(f16, 2)
AVX2_DTYPE(bf16, 2)

static void from_f32_f32(const float *src, size_t n, void *dst) { memcpy(dst, src, n * 4); }

static void from_f32_f16(const float *src, size_t n, void *dst)
{
    uint16_t *d = dst;
    size_t i = 0;
    for (; i + 8 <= n; i += 8)
        _mm_storeu_si128((__m128i *)(d + i),
                         _mm256_cvtps_ph(_mm256_loadu_ps(src + i),
                                         _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    for (; i < n; i++)
        d[i] = ra_f32_to_f16(src[i]);
}

/* Round to nearest even on bit 16, NaN kept quiet: the same integer recipe as
 * ra_f32_to_bf16 (vcvtneps2bf16 would flush subnormals, so it is not used). */
static inline __m128i bf16_8(__m256 x)
{
    __m256i u = _mm256_castps_si256(x);
    __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    __m256i r = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(_mm256_set1_epi32(0x7fff), lsb)), 16);
    __m256i abs = _mm256_and_si256(u, _mm256_set1_epi32(0x7fffffff));
    __m256i nan = _mm256_cmpgt_epi32(abs, _mm256_set1_epi32(0x7f800000));
    __m256i qn = _mm256_or_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(0x40));
    r = _mm256_blendv_epi8(r, qn, nan);
    __m256i p = _mm256_packus_epi32(r, _mm256_setzero_si256());
    p = _mm256_permute4x64_epi64(p, 0xD8);
    return _mm256_castsi256_si128(p);
}

static void from_f32_bf16(const float *src, size_t n, void *dst)
{
    uint16_t *d = dst;
    size_t i = 0;
    for (; i + 8 <= n; i += 8)
        _mm_storeu_si128((__m128i *)(d + i), bf16_8(_mm256_loadu_ps(src + i)));
    for (; i < n; i++)
        d[i] = ra_f32_to_bf16(src[i]);
}

/* u8 codes: 16 codes widened to int16 per step, vpmaddwd against the int16 query, four
 * queries per pass so each code chunk is loaded once; exact int32 sums. */
static inline __attribute__((always_inline)) void u8dot_rows(const int16_t *q16, int g, int cb,
                                                             const uint8_t *c, int32_t *out)
{
    __m256i a0 = _mm256_setzero_si256(), a1 = a0, a2 = a0, a3 = a0;
    for (int d = 0; d < cb; d += 16) {
        __m256i cw = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)(c + d)));
        const int16_t *q = q16 + d;
        a0 = _mm256_add_epi32(a0, _mm256_madd_epi16(cw, _mm256_loadu_si256((const __m256i *)q)));
        if (g > 1)
            a1 = _mm256_add_epi32(
                a1, _mm256_madd_epi16(cw, _mm256_loadu_si256((const __m256i *)(q + cb))));
        if (g > 2)
            a2 = _mm256_add_epi32(
                a2, _mm256_madd_epi16(cw, _mm256_loadu_si256((const __m256i *)(q + 2 * cb))));
        if (g > 3)
            a3 = _mm256_add_epi32(
                a3, _mm256_madd_epi16(cw, _mm256_loadu_si256((const __m256i *)(q + 3 * cb))));
    }
    __m256i h = _mm256_hadd_epi32(_mm256_hadd_epi32(a0, a1), _mm256_hadd_epi32(a2, a3));
    __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(h), _mm256_extracti128_si256(h, 1));
    int32_t t[4];
    _mm_storeu_si128((__m128i *)t, s4);
    for (int j = 0; j < g; j++)
        out[j] = t[j];
}

/* One query against four code rows: each query chunk is loaded once for four rows (every
 * single-query walk, the build's key->key walks too, goes through here); the same exact
 * int32 sums as u8dot_rows. */
static inline __attribute__((always_inline)) void u8dot_4rows(const int16_t *q16, int cb,
                                                              const uint8_t *c0, const uint8_t *c1,
                                                              const uint8_t *c2, const uint8_t *c3,
                                                              int32_t *out)
{
    __m256i a0 = _mm256_setzero_si256(), a1 = a0, a2 = a0, a3 = a0;
    for (int d = 0; d < cb; d += 16) {
        __m256i qv = _mm256_loadu_si256((const __m256i *)(q16 + d));
        a0 = _mm256_add_epi32(
            a0, _mm256_madd_epi16(_mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)(c0 + d))), qv));
        a1 = _mm256_add_epi32(
            a1, _mm256_madd_epi16(_mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)(c1 + d))), qv));
        a2 = _mm256_add_epi32(
            a2, _mm256_madd_epi16(_mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)(c2 + d))), qv));
        a3 = _mm256_add_epi32(
            a3, _mm256_madd_epi16(_mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)(c3 + d))), qv));
    }
    __m256i h = _mm256_hadd_epi32(_mm256_hadd_epi32(a0, a1), _mm256_hadd_epi32(a2, a3));
    _mm_storeu_si128((__m128i *)out,
                     _mm_add_epi32(_mm256_castsi256_si128(h), _mm256_extracti128_si256(h, 1)));
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

/* 4-bit codes: 32 code bytes per step split into their low and high nibbles (64
 * dimensions), vpmaddubsw against the int8 query (|pair sum| <= 2 * 15 * 127: no
 * saturation), vpmaddwd by ones to int32; up to four queries share each code load. */
static inline __attribute__((always_inline)) void u4dot_rows(const int8_t *q8, int g, int cb,
                                                             const uint8_t *c, int32_t *out)
{
    const __m256i m4 = _mm256_set1_epi8(15), one = _mm256_set1_epi16(1);
    __m256i a[4] = {_mm256_setzero_si256(), _mm256_setzero_si256(), _mm256_setzero_si256(),
                    _mm256_setzero_si256()};
    for (int b = 0; b < cb; b += 32) {
        __m256i v = _mm256_loadu_si256((const __m256i *)(c + b));
        __m256i lo = _mm256_and_si256(v, m4), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), m4);
        for (int j = 0; j < g; j++) {
            const int8_t *q = q8 + (size_t)j * 2 * cb + b;
            __m256i p = _mm256_add_epi16(
                _mm256_maddubs_epi16(lo, _mm256_loadu_si256((const __m256i *)q)),
                _mm256_maddubs_epi16(hi, _mm256_loadu_si256((const __m256i *)(q + cb))));
            a[j] = _mm256_add_epi32(a[j], _mm256_madd_epi16(p, one));
        }
    }
    for (int j = 0; j < g; j++) {
        __m128i s = _mm_add_epi32(_mm256_castsi256_si128(a[j]), _mm256_extracti128_si256(a[j], 1));
        s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4e));
        s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xb1));
        out[j] = _mm_cvtsi128_si32(s);
    }
}

static void u4dot_gather(const int8_t *q8, int G, int cb, const uint8_t *base, size_t stride,
                         const int32_t *ids, size_t n, int32_t *out){RA_KERN_U4_GATHER(u4dot_rows)}

/* The projected-code scan (ra_kernels.h, ra_kern_p4scan) without vpdpbusd: a block's 16
 * keys as two halves of 8 lanes; per chunk and query, vpmaddubsw of the low and of the
 * high nibbles against the query's 4 bytes broadcast (u4 x s8 pairs: at most 2 x 15 x 128
 * = 3,840 a word, so no saturation even for their sum), then vpmaddwd by ones into the
 * key's int32 lane: the same exact sums as the scalar reference. Keys that beat the
 * threshold leave in ascending order through their mask bits. */
size_t ra_kern_p4scan_avx2(const uint8_t *codes, int nch, size_t b, size_t b1, size_t step,
                           size_t n_valid, int g, const int32_t *qw, const int32_t *thr,
                           int32_t *const *sc, int32_t *const *id, int *cnt, int cap)
{
    const __m256i m4 = _mm256_set1_epi8(0x0f), ones = _mm256_set1_epi16(1);
    size_t bb = (size_t)nch * 64;
    for (; b < b1; b += step) {
        const uint8_t *c = codes + b * bb;
        if (step == 1) /* as the VNNI kernel: every line of the block 16 ahead */
            for (int ch = 0; ch < nch; ch++)
                _mm_prefetch((const char *)(c + 16 * bb + (size_t)ch * 64), _MM_HINT_T0);
        __m256i acc[4][2];
        for (int j = 0; j < 4; j++)
            acc[j][0] = acc[j][1] = _mm256_setzero_si256();
        for (int ch = 0; ch < nch; ch++) {
            __m256i lo[2], hi[2];
            for (int h = 0; h < 2; h++) {
                __m256i x = _mm256_loadu_si256((const __m256i *)(c + ch * 64 + h * 32));
                lo[h] = _mm256_and_si256(x, m4);
                hi[h] = _mm256_and_si256(_mm256_srli_epi16(x, 4), m4);
            }
            for (int j = 0; j < g; j++) {
                __m256i wl = _mm256_set1_epi32(qw[j * RA_P4_QW + 2 * ch]);
                __m256i wh = _mm256_set1_epi32(qw[j * RA_P4_QW + 2 * ch + 1]);
                for (int h = 0; h < 2; h++) {
                    __m256i p = _mm256_add_epi16(_mm256_maddubs_epi16(lo[h], wl),
                                                 _mm256_maddubs_epi16(hi[h], wh));
                    acc[j][h] = _mm256_add_epi32(acc[j][h], _mm256_madd_epi16(p, ones));
                }
            }
        }
        unsigned valid = 0xffff;
        if (b * 16 + 16 > n_valid)
            valid = n_valid > b * 16 ? (1u << (n_valid - b * 16)) - 1 : 0;
        int full = 0;
        for (int j = 0; j < g; j++) {
            __m256i t = _mm256_set1_epi32(thr[j]);
            unsigned k =
                (unsigned)_mm256_movemask_ps(
                    _mm256_castsi256_ps(_mm256_cmpgt_epi32(acc[j][0], t))) |
                (unsigned)_mm256_movemask_ps(_mm256_castsi256_ps(_mm256_cmpgt_epi32(acc[j][1], t)))
                    << 8;
            k &= valid;
            if (k) {
                int32_t v[16];
                _mm256_storeu_si256((__m256i *)v, acc[j][0]);
                _mm256_storeu_si256((__m256i *)(v + 8), acc[j][1]);
                for (; k; k &= k - 1) {
                    int i = __builtin_ctz(k);
                    sc[j][cnt[j]] = v[i];
                    id[j][cnt[j]++] = (int32_t)(b * 16 + (size_t)i);
                }
            }
            full |= cnt[j] > cap - 16;
        }
        if (full)
            return b + step;
    }
    return b;
}

const ra_kern_table ra_kern_table_avx2 = {
    .dot_range = {dot_range_f32, dot_range_f16, dot_range_bf16},
    .dot_gather = {dot_gather_f32, dot_gather_f16, dot_gather_bf16},
    .axpy = {axpy_f32, axpy_f16, axpy_bf16},
    .to_f32 = {to_f32_f32, to_f32_f16, to_f32_bf16},
    .from_f32 = {from_f32_f32, from_f32_f16, from_f32_bf16},
    .u8dot_gather = u8dot_gather,
    .u4dot_gather = u4dot_gather,
    .dotq4_f32 = dotq4_f32,
    .p4scan = ra_kern_p4scan_avx2,
};
