/* The u8 and u4 search-code kernels on AVX-512 VNNI (this file alone is compiled with
 * -mavx512vnni; kernels.c installs it in the AVX-512 table only when the CPU has VNNI).
 * vpdpbusd multiplies 64 u8 codes by 64 s8 query values and adds groups of four into
 * 16 int32 lanes: one instruction per 64 dimensions and query, exact (no saturation:
 * |sum| <= 1024 * 255 * 128 fits int32). Four queries per pass share each code load. */
#include <immintrin.h>

#include "kern_impl.h"
#include "kern_u4.h"

static inline __attribute__((always_inline)) void rows(const int8_t *q8, int g, int cb,
                                                       const uint8_t *c, int32_t *out)
{
    __m512i a0 = _mm512_setzero_si512(), a1 = a0, a2 = a0, a3 = a0;
    for (int d = 0; d < cb; d += 64) {
        __m512i cv = _mm512_loadu_si512(c + d);
        const int8_t *q = q8 + d;
        a0 = _mm512_dpbusd_epi32(a0, cv, _mm512_loadu_si512(q));
        if (g > 1)
            a1 = _mm512_dpbusd_epi32(a1, cv, _mm512_loadu_si512(q + cb));
        if (g > 2)
            a2 = _mm512_dpbusd_epi32(a2, cv, _mm512_loadu_si512(q + 2 * cb));
        if (g > 3)
            a3 = _mm512_dpbusd_epi32(a3, cv, _mm512_loadu_si512(q + 3 * cb));
    }
    if (g == 4) { /* four sums at once: fold 512 -> 256 -> 128, then a 4x4 transpose-add */
        __m256i b0 = _mm256_add_epi32(_mm512_castsi512_si256(a0), _mm512_extracti64x4_epi64(a0, 1));
        __m256i b1 = _mm256_add_epi32(_mm512_castsi512_si256(a1), _mm512_extracti64x4_epi64(a1, 1));
        __m256i b2 = _mm256_add_epi32(_mm512_castsi512_si256(a2), _mm512_extracti64x4_epi64(a2, 1));
        __m256i b3 = _mm256_add_epi32(_mm512_castsi512_si256(a3), _mm512_extracti64x4_epi64(a3, 1));
        __m256i h = _mm256_hadd_epi32(_mm256_hadd_epi32(b0, b1), _mm256_hadd_epi32(b2, b3));
        _mm_storeu_si128((__m128i *)out,
                         _mm_add_epi32(_mm256_castsi256_si128(h), _mm256_extracti128_si256(h, 1)));
        return;
    }
    out[0] = _mm512_reduce_add_epi32(a0);
    if (g > 1)
        out[1] = _mm512_reduce_add_epi32(a1);
    if (g > 2)
        out[2] = _mm512_reduce_add_epi32(a2);
}

/* One query against four code rows (each query chunk loaded once for four rows). */
static inline __attribute__((always_inline)) void rows4(const int8_t *q8, int cb, const uint8_t *c0,
                                                        const uint8_t *c1, const uint8_t *c2,
                                                        const uint8_t *c3, int32_t *out)
{
    __m512i a0 = _mm512_setzero_si512(), a1 = a0, a2 = a0, a3 = a0;
    for (int d = 0; d < cb; d += 64) {
        __m512i qv = _mm512_loadu_si512(q8 + d);
        a0 = _mm512_dpbusd_epi32(a0, _mm512_loadu_si512(c0 + d), qv);
        a1 = _mm512_dpbusd_epi32(a1, _mm512_loadu_si512(c1 + d), qv);
        a2 = _mm512_dpbusd_epi32(a2, _mm512_loadu_si512(c2 + d), qv);
        a3 = _mm512_dpbusd_epi32(a3, _mm512_loadu_si512(c3 + d), qv);
    }
    out[0] = _mm512_reduce_add_epi32(a0);
    out[1] = _mm512_reduce_add_epi32(a1);
    out[2] = _mm512_reduce_add_epi32(a2);
    out[3] = _mm512_reduce_add_epi32(a3);
}

void ra_kern_u8dot_gather_vnni(const int8_t *q8, const int16_t *q16, int G, int cb,
                               const uint8_t *base, size_t stride, const int32_t *ids, size_t n,
                               int32_t *out)
{
    (void)q16;
    size_t i0 = 0;
    if (G == 1)
        for (; i0 + 4 <= n; i0 += 4)
            rows4(q8, cb, base + (size_t)ids[i0] * stride, base + (size_t)ids[i0 + 1] * stride,
                  base + (size_t)ids[i0 + 2] * stride, base + (size_t)ids[i0 + 3] * stride,
                  out + i0);
    for (size_t i = i0; i < n; i++) {
        const uint8_t *c = base + (size_t)ids[i] * stride;
        int32_t *o = out + i * (size_t)G;
        for (int j = 0; j < G; j += 4) {
            const int8_t *q = q8 + (size_t)j * cb;
            switch (G - j) {
            case 1:
                rows(q, 1, cb, c, o + j);
                break;
            case 2:
                rows(q, 2, cb, c, o + j);
                break;
            case 3:
                rows(q, 3, cb, c, o + j);
                break;
            default:
                rows(q, 4, cb, c, o + j);
                break;
            }
        }
    }
}

/* 4-bit codes: the low and high nibbles of 64 code bytes (128 dimensions) into two
 * vpdpbusd per query (0..15 times s8: exact in int32). */
static inline __attribute__((always_inline)) void rows_u4(const int8_t *q8, int g, int cb,
                                                          const uint8_t *c, int32_t *out)
{
    const __m512i m4 = _mm512_set1_epi8(15);
    __m512i a[4] = {_mm512_setzero_si512(), _mm512_setzero_si512(), _mm512_setzero_si512(),
                    _mm512_setzero_si512()};
    for (int b = 0; b < cb; b += 64) {
        __m512i v = _mm512_loadu_si512(c + b);
        __m512i lo = _mm512_and_si512(v, m4), hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), m4);
        for (int j = 0; j < g; j++) {
            const int8_t *q = q8 + (size_t)j * 2 * cb + b;
            a[j] = _mm512_dpbusd_epi32(a[j], lo, _mm512_loadu_si512(q));
            a[j] = _mm512_dpbusd_epi32(a[j], hi, _mm512_loadu_si512(q + cb));
        }
    }
    for (int j = 0; j < g; j++)
        out[j] = _mm512_reduce_add_epi32(a[j]);
}

void ra_kern_u4dot_gather_vnni(const int8_t *q8, int G, int cb, const uint8_t *base, size_t stride,
                               const int32_t *ids, size_t n,
                               int32_t *out){RA_KERN_U4_GATHER(rows_u4)}

/* The projected-code scan (ra_kernels.h, ra_kern_p4scan): 16 keys a block in the 16
 * lanes, each chunk's low and high nibbles against the query's 4 bytes broadcast; two
 * vpdpbusd per chunk and query. The keys that beat a threshold leave by compress stores. */
size_t ra_kern_p4scan_vnni(const uint8_t *codes, int nch, size_t b, size_t b1, size_t step,
                           size_t n_valid, int g, const int32_t *qw, const int32_t *thr,
                           int32_t *const *sc, int32_t *const *id, int *cnt, int cap)
{
    const __m512i m4 = _mm512_set1_epi8(0x0f);
    const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    const int32_t *q0 = qw, *q1 = qw + RA_P4_QW, *q2 = qw + 2 * RA_P4_QW, *q3 = qw + 3 * RA_P4_QW;
    size_t bb = (size_t)nch * 64;
    for (; b < b1; b += step) {
        const uint8_t *c = codes + b * bb;
        if (step == 1) /* every line of the block 16 ahead: the scan streams from DRAM, and
                          the prefetcher alone left it at half the bandwidth of a plain read
                          (bench/README.md, "Projected-code scan") */
            for (int ch = 0; ch < nch; ch++)
                _mm_prefetch((const char *)(c + 16 * bb + (size_t)ch * 64), _MM_HINT_T0);
        /* two sums a query (low and high nibbles), so that eight chains of vpdpbusd are
           in flight (latency 5): with four, the chains, not the ports, set the pace */
        __m512i a0 = _mm512_setzero_si512(), a1 = a0, a2 = a0, a3 = a0;
        __m512i h0 = a0, h1 = a0, h2 = a0, h3 = a0;
        for (int ch = 0; ch < nch; ch++) {
            __m512i x = _mm512_loadu_si512(c + ch * 64);
            __m512i lo = _mm512_and_si512(x, m4);
            __m512i hi = _mm512_and_si512(_mm512_srli_epi16(x, 4), m4);
            a0 = _mm512_dpbusd_epi32(a0, lo, _mm512_set1_epi32(q0[2 * ch]));
            h0 = _mm512_dpbusd_epi32(h0, hi, _mm512_set1_epi32(q0[2 * ch + 1]));
            if (g > 1) {
                a1 = _mm512_dpbusd_epi32(a1, lo, _mm512_set1_epi32(q1[2 * ch]));
                h1 = _mm512_dpbusd_epi32(h1, hi, _mm512_set1_epi32(q1[2 * ch + 1]));
            }
            if (g > 2) {
                a2 = _mm512_dpbusd_epi32(a2, lo, _mm512_set1_epi32(q2[2 * ch]));
                h2 = _mm512_dpbusd_epi32(h2, hi, _mm512_set1_epi32(q2[2 * ch + 1]));
            }
            if (g > 3) {
                a3 = _mm512_dpbusd_epi32(a3, lo, _mm512_set1_epi32(q3[2 * ch]));
                h3 = _mm512_dpbusd_epi32(h3, hi, _mm512_set1_epi32(q3[2 * ch + 1]));
            }
        }
        a0 = _mm512_add_epi32(a0, h0);
        a1 = _mm512_add_epi32(a1, h1);
        a2 = _mm512_add_epi32(a2, h2);
        a3 = _mm512_add_epi32(a3, h3);
        __mmask16 valid = 0xffff;
        if (b * 16 + 16 > n_valid)
            valid = n_valid > b * 16 ? (__mmask16)((1u << (n_valid - b * 16)) - 1) : 0;
        __m512i acc[4] = {a0, a1, a2, a3};
        __m512i idv = _mm512_add_epi32(lane, _mm512_set1_epi32((int)(b * 16)));
        int full = 0;
        for (int j = 0; j < g; j++) {
            __mmask16 k = _mm512_mask_cmpgt_epi32_mask(valid, acc[j], _mm512_set1_epi32(thr[j]));
            if (k) {
                _mm512_mask_compressstoreu_epi32(sc[j] + cnt[j], k, acc[j]);
                _mm512_mask_compressstoreu_epi32(id[j] + cnt[j], k, idv);
                cnt[j] += __builtin_popcount(k);
            }
            full |= cnt[j] > cap - 16;
        }
        if (full)
            return b + step;
    }
    return b;
}
