/* Internal to index/kernels_avx2.c and kernels_avx512.c (each includes it once and gets
 * its own copy compiled for its ISA): four fp32 queries against fp32 rows, two rows per
 * step. Eight independent accumulators keep the FMA units busy where the one-query kernel
 * (four rows, four chains) waits on the FMA latency; every row chunk is loaded once for the
 * four queries. Needs AVX2 and FMA. */
#ifndef RA_KERN_DOTQ4_H
#define RA_KERN_DOTQ4_H

#include <immintrin.h>
#include <stddef.h>

static inline float dotq4_one(const float *q, const float *r, int dim)
{
    __m256 a = _mm256_setzero_ps();
    int j = 0;
    for (; j + 8 <= dim; j += 8)
        a = _mm256_fmadd_ps(_mm256_loadu_ps(q + j), _mm256_loadu_ps(r + j), a);
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    float x = _mm_cvtss_f32(s);
    for (; j < dim; j++)
        x += q[j] * r[j];
    return x;
}

/* [a, b, c, d] -> the four horizontal sums */
static inline __m128 dotq4_hsum4(__m256 a, __m256 b, __m256 c, __m256 d)
{
    __m256 ab = _mm256_hadd_ps(a, b), cd = _mm256_hadd_ps(c, d);
    __m256 x = _mm256_hadd_ps(ab, cd);
    return _mm_add_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
}

static void dotq4_f32(const float *q, int dim, const float *rows, size_t n, float *out)
{
    const float *q0 = q, *q1 = q + dim, *q2 = q + 2 * (size_t)dim, *q3 = q + 3 * (size_t)dim;
    size_t i = 0;
    if ((dim & 7) == 0)
        for (; i + 2 <= n; i += 2) {
            const float *r0 = rows + i * (size_t)dim, *r1 = r0 + dim;
            __m256 a00 = _mm256_setzero_ps(), a10 = a00, a20 = a00, a30 = a00;
            __m256 a01 = a00, a11 = a00, a21 = a00, a31 = a00;
            for (int j = 0; j < dim; j += 8) {
                __m256 x0 = _mm256_loadu_ps(r0 + j), x1 = _mm256_loadu_ps(r1 + j), v;
                v = _mm256_loadu_ps(q0 + j);
                a00 = _mm256_fmadd_ps(v, x0, a00);
                a01 = _mm256_fmadd_ps(v, x1, a01);
                v = _mm256_loadu_ps(q1 + j);
                a10 = _mm256_fmadd_ps(v, x0, a10);
                a11 = _mm256_fmadd_ps(v, x1, a11);
                v = _mm256_loadu_ps(q2 + j);
                a20 = _mm256_fmadd_ps(v, x0, a20);
                a21 = _mm256_fmadd_ps(v, x1, a21);
                v = _mm256_loadu_ps(q3 + j);
                a30 = _mm256_fmadd_ps(v, x0, a30);
                a31 = _mm256_fmadd_ps(v, x1, a31);
            }
            float s0[4], s1[4];
            _mm_storeu_ps(s0, dotq4_hsum4(a00, a10, a20, a30));
            _mm_storeu_ps(s1, dotq4_hsum4(a01, a11, a21, a31));
            for (int k = 0; k < 4; k++) {
                out[(size_t)k * n + i] = s0[k];
                out[(size_t)k * n + i + 1] = s1[k];
            }
        }
    for (; i < n; i++)
        for (int k = 0; k < 4; k++)
            out[(size_t)k * n + i] = dotq4_one(q + (size_t)k * dim, rows + i * (size_t)dim, dim);
}

#endif
