/* Kernels of index/ (ra_kernels.h): every ISA this CPU has, forced in turn, against a
 * double-precision reference and against the scalar path; fp16/bf16 conversion edge
 * cases (subnormals, Inf, NaN, ties), exhaustively for round trips and against the
 * F16C hardware for f32->f16; partial attention vs double; the merge rule. ISAs the
 * CPU lacks are skipped, not passed. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
// clang-format off: cmocka.h needs the four above first
#include <cmocka.h>
// clang-format on

#include <float.h>
#include <immintrin.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "idx_test_util.h"
#include "ra_codes.h"
#include "ra_half.h"
#include "ra_kernels.h"

static const ra_dtype DT[3] = {RA_DTYPE_F32, RA_DTYPE_F16, RA_DTYPE_BF16};
static const int DIMS[] = {1, 3, 7, 8, 15, 16, 17, 31, 32, 33, 64, 100, 128, 130, 256};
#define NDIMS (int)(sizeof DIMS / sizeof DIMS[0])

static int isa_scalar = RA_ISA_SCALAR, isa_avx2 = RA_ISA_AVX2, isa_avx512 = RA_ISA_AVX512,
           isa_vnni = RA_ISA_AVX512VNNI;

static void use_isa(void **state)
{
    int isa = *(int *)*state;
    ra_status st = ra_kern_isa_set((ra_isa)isa);
    if (st == RA_ENOTSUP) {
        fprintf(stderr, "# %s not supported by this CPU: skipped\n", ra_kern_isa_name(isa));
        skip();
    }
    assert_int_equal(st, RA_OK);
    assert_int_equal(ra_kern_isa_get(), isa);
}

static int reset_isa(void **state)
{
    (void)state;
    ra_kern_isa_set(ra_kern_isa_best());
    return 0;
}

static void test_isa_dispatch(void **state)
{
    (void)state;
    ra_isa best = ra_kern_isa_best();
    assert_true(best >= RA_ISA_SCALAR && best <= RA_ISA_AVX512VNNI);
    fprintf(stderr, "# best ISA on this CPU: %s\n", ra_kern_isa_name(best));
    assert_int_equal(ra_kern_isa_set(RA_ISA_SCALAR), RA_OK);
    assert_int_equal(ra_kern_isa_get(), RA_ISA_SCALAR);
    assert_int_equal(ra_kern_isa_set((ra_isa)7), RA_EINVAL);
    assert_int_equal(ra_kern_isa_set((ra_isa)-1), RA_EINVAL);
    if (best < RA_ISA_AVX512VNNI)
        assert_int_equal(ra_kern_isa_set((ra_isa)(best + 1)), RA_ENOTSUP);
    assert_string_equal(ra_kern_isa_name(RA_ISA_AVX512VNNI), "avx512vnni");
    assert_int_equal(ra_kern_isa_set(best), RA_OK);
    assert_string_equal(ra_kern_isa_name(RA_ISA_AVX2), "avx2");
}

/* |got - ref| within the fp32 accumulation bound of a dim-term sum. */
static void check_dot(float got, double ref, double absdot, int dim, const char *what)
{
    double tol = (dim + 4) * (double)FLT_EPSILON * absdot + 1e-30;
    if (!(fabs(got - ref) <= tol))
        fail_msg("%s: got %.9g, reference %.17g (tol %.3g, dim %d)", what, got, ref, tol, dim);
}

static void test_dot(void **state)
{
    use_isa(state);
    trng r = {42};
    for (int d = 0; d < 3; d++)
        for (int di = 0; di < NDIMS; di++) {
            int dim = DIMS[di];
            size_t n = 37, first = 3;
            void *rows = tfill(&r, DT[d], (n + first) * dim, 1.0f);
            float *q = malloc(dim * sizeof *q);
            for (int j = 0; j < dim; j++)
                q[j] = trng_gauss(&r);
            float out[37], ref_s[37];
            ra_kern_dot_range(q, rows, DT[d], dim, first, n, out);
            ra_kern_isa_set(RA_ISA_SCALAR);
            ra_kern_dot_range(q, rows, DT[d], dim, first, n, ref_s);
            ra_kern_isa_set((ra_isa) * (int *)*state);
            for (size_t i = 0; i < n; i++) {
                double a, ref = tdot(q, rows, DT[d], dim, first + i, &a);
                check_dot(out[i], ref, a, dim, "dot_range vs double");
                check_dot(out[i], ref_s[i], 2 * a, dim, "dot_range vs scalar");
            }
            float one = ra_kern_dot(q, (const char *)rows + first * dim * ra_dtype_size(DT[d]),
                                    DT[d], dim);
            double a, ref = tdot(q, rows, DT[d], dim, first, &a);
            check_dot(one, ref, a, dim, "dot");
            /* gather with duplicate and reversed ids */
            int32_t ids[23];
            for (int i = 0; i < 23; i++)
                ids[i] = (int32_t)(trng_u64(&r) % (n + first));
            ids[5] = ids[4];
            float g[23];
            ra_kern_dot_gather(q, rows, DT[d], dim, ids, 23, g);
            for (int i = 0; i < 23; i++) {
                ref = tdot(q, rows, DT[d], dim, (size_t)ids[i], &a);
                check_dot(g[i], ref, a, dim, "dot_gather vs double");
            }
            if (DT[d] == RA_DTYPE_F32) { /* four queries at once (odd n: the tail row too) */
                float *q4 = malloc(4 * (size_t)dim * sizeof *q4), o4[4 * 37];
                for (int j = 0; j < 4 * dim; j++)
                    q4[j] = trng_gauss(&r);
                const float *r0 = (const float *)rows + first * (size_t)dim;
                ra_kern_dot_q4_f32(q4, r0, dim, n, o4);
                for (int k = 0; k < 4; k++)
                    for (size_t i = 0; i < n; i++) {
                        ref = tdot(q4 + k * dim, rows, DT[d], dim, first + i, &a);
                        check_dot(o4[k * n + i], ref, a, dim, "dot_q4 vs double");
                    }
                free(q4);
            }
            free(rows);
            free(q);
        }
}

static int same_bits_or_nan(float a, float b)
{
    if (isnan(a) || isnan(b))
        return isnan(a) && isnan(b);
    uint32_t x, y;
    memcpy(&x, &a, 4);
    memcpy(&y, &b, 4);
    return x == y;
}

/* Special f32 inputs for the narrowing conversions. */
static size_t special_f32(float *v)
{
    static const uint32_t bits[] = {
        0x00000000, 0x80000000, 0x7f800000, 0xff800000, 0x7fc00000, 0xffc00001, 0x7f800001,
        0x00000001, 0x807fffff, 0x33000000, 0x33000001, 0x33800000, 0x387fc000, 0x387fe000,
        0x38800000, 0x38000000, 0x477fe000, 0x477fefff, 0x477ff000, 0x47800000, 0x7f7fffff,
        0x3f808000, 0x3f818000, 0x3f800fff, 0x3f801000, 0x3f803000, 0x00018000, 0x00008000,
        0x3f7fffff, 0xbf801000, 0x4b800000, 0x00400000, 0x7f7f8000, 0x7f7f7fff};
    size_t n = sizeof bits / sizeof bits[0];
    for (size_t i = 0; i < n; i++)
        memcpy(&v[i], &bits[i], 4);
    return n;
}

static void test_convert(void **state)
{
    use_isa(state);
    int isa = *(int *)*state;
    trng r = {7};
    enum { N = 4099 };
    float *src = malloc(N * sizeof *src), *back = malloc(N * sizeof *back),
          *ref = malloc(N * sizeof *ref);
    uint16_t *h = malloc(N * 2), *hs = malloc(N * 2);
    size_t ns = special_f32(src);
    for (size_t i = ns; i < N; i++) {
        uint32_t u = (uint32_t)trng_u64(&r);
        if (i % 3 == 0) /* also plenty of ordinary magnitudes */
            src[i] = trng_gauss(&r) * (float)ldexp(1.0, (int)(trng_u64(&r) % 40) - 20);
        else
            memcpy(&src[i], &u, 4);
    }
    for (int d = 1; d < 3; d++) {
        for (size_t len = 1; len <= N; len = len * 3 + 1) {
            ra_kern_from_f32(src, DT[d], len, h);
            ra_kern_isa_set(RA_ISA_SCALAR);
            ra_kern_from_f32(src, DT[d], len, hs);
            ra_kern_isa_set((ra_isa)isa);
            for (size_t i = 0; i < len; i++) {
                float a = tval(h, DT[d], i), b = tval(hs, DT[d], i);
                if (!same_bits_or_nan(a, b))
                    fail_msg("%s from_f32 of %a (0x%08x): 0x%04x, scalar 0x%04x",
                             ra_dtype_name(DT[d]), src[i], *(uint32_t *)&src[i], h[i], hs[i]);
            }
            ra_kern_to_f32(h, DT[d], len, back);
            for (size_t i = 0; i < len; i++) {
                ref[i] = (float)tval(h, DT[d], i);
                if (!same_bits_or_nan(back[i], ref[i]))
                    fail_msg("%s to_f32 of 0x%04x: %a, scalar %a", ra_dtype_name(DT[d]), h[i],
                             back[i], ref[i]);
            }
        }
    }
    ra_kern_from_f32(src, RA_DTYPE_F32, N, back);
    assert_memory_equal(back, src, N * sizeof *src);
    free(src);
    free(back);
    free(ref);
    free(h);
    free(hs);
}

static void test_half_edge_cases(void **state)
{
    (void)state;
    /* fp16 -> f32 */
    assert_true(ra_f16_to_f32(0x0001) == ldexpf(1.f, -24));           /* smallest subnormal */
    assert_true(ra_f16_to_f32(0x03ff) == ldexpf(1023.f, -24));        /* largest subnormal */
    assert_true(ra_f16_to_f32(0x0400) == ldexpf(1.f, -14));           /* smallest normal */
    assert_true(ra_f16_to_f32(0x7bff) == 65504.f);
    assert_true(isinf(ra_f16_to_f32(0x7c00)) && ra_f16_to_f32(0x7c00) > 0);
    assert_true(isinf(ra_f16_to_f32(0xfc00)) && ra_f16_to_f32(0xfc00) < 0);
    assert_true(isnan(ra_f16_to_f32(0x7e00)) && isnan(ra_f16_to_f32(0x7c01)));
    assert_true(signbit(ra_f16_to_f32(0x8000)) && ra_f16_to_f32(0x8000) == 0.f);
    /* f32 -> fp16, round to nearest even */
    assert_int_equal(ra_f32_to_f16(1.0f), 0x3c00);
    assert_int_equal(ra_f32_to_f16(1.0f + ldexpf(1, -11)), 0x3c00);     /* tie -> even */
    assert_int_equal(ra_f32_to_f16(1.0f + 3 * ldexpf(1, -11)), 0x3c02); /* tie -> even */
    assert_int_equal(ra_f32_to_f16(65504.f), 0x7bff);
    assert_int_equal(ra_f32_to_f16(65519.99f), 0x7bff);
    assert_int_equal(ra_f32_to_f16(65520.f), 0x7c00); /* overflow -> Inf */
    assert_int_equal(ra_f32_to_f16(-1e30f), 0xfc00);
    assert_int_equal(ra_f32_to_f16(INFINITY), 0x7c00);
    assert_true((ra_f32_to_f16(NAN) & 0x7c00) == 0x7c00 && (ra_f32_to_f16(NAN) & 0x3ff));
    assert_int_equal(ra_f32_to_f16(ldexpf(1, -24)), 0x0001);
    assert_int_equal(ra_f32_to_f16(ldexpf(1, -25)), 0x0000);                /* tie -> even 0 */
    assert_int_equal(ra_f32_to_f16(ldexpf(1.0001f, -25)), 0x0001);          /* above the tie */
    assert_int_equal(ra_f32_to_f16(ldexpf(3, -25)), 0x0002);                /* 1.5 ulp -> 2 */
    assert_int_equal(ra_f32_to_f16(ldexpf(1023.5f, -24)), 0x0400);          /* -> smallest normal */
    assert_int_equal(ra_f32_to_f16(-0.0f), 0x8000);
    assert_int_equal(ra_f32_to_f16(ldexpf(1, -30)), 0x0000);
    /* bf16 */
    assert_int_equal(ra_f32_to_bf16(1.0f), 0x3f80);
    assert_int_equal(ra_f32_to_bf16(1.0f + ldexpf(1, -8)), 0x3f80);     /* tie -> even */
    assert_int_equal(ra_f32_to_bf16(1.0f + 3 * ldexpf(1, -8)), 0x3f82); /* tie -> even */
    float fmax;
    uint32_t u = 0x7f7fffff;
    memcpy(&fmax, &u, 4);
    assert_int_equal(ra_f32_to_bf16(fmax), 0x7f80); /* rounds up to Inf */
    assert_int_equal(ra_f32_to_bf16(INFINITY), 0x7f80);
    assert_true((ra_f32_to_bf16(NAN) & 0x7f80) == 0x7f80 && (ra_f32_to_bf16(NAN) & 0x7f));
    u = 0x7f800001; /* signalling NaN whose payload sits in the dropped bits stays NaN */
    float snan;
    memcpy(&snan, &u, 4);
    assert_true(isnan(ra_bf16_to_f32(ra_f32_to_bf16(snan))));
    u = 0x00018000; /* subnormal tie -> even */
    float sub;
    memcpy(&sub, &u, 4);
    assert_int_equal(ra_f32_to_bf16(sub), 0x0002);
    assert_true(ra_bf16_to_f32(0x0001) == ldexpf(1, -133));
}

static void test_half_roundtrip_exhaustive(void **state)
{
    (void)state;
    for (uint32_t h = 0; h < 65536; h++) {
        float f = ra_f16_to_f32((uint16_t)h);
        uint16_t back = ra_f32_to_f16(f);
        if (isnan(f))
            assert_true((back & 0x7c00) == 0x7c00 && (back & 0x3ff));
        else if (back != h)
            fail_msg("fp16 0x%04x -> %a -> 0x%04x", h, f, back);
        float g = ra_bf16_to_f32((uint16_t)h);
        uint16_t bb = ra_f32_to_bf16(g);
        if (isnan(g))
            assert_true(isnan(ra_bf16_to_f32(bb)));
        else if (bb != h)
            fail_msg("bf16 0x%04x -> %a -> 0x%04x", h, g, bb);
    }
}

__attribute__((target("f16c"))) static uint16_t hw_f16(float f)
{
    return (uint16_t)_cvtss_sh(f, _MM_FROUND_TO_NEAREST_INT);
}

__attribute__((target("f16c"))) static float hw_f32(uint16_t h) { return _cvtsh_ss(h); }

static void test_f16_vs_hardware(void **state)
{
    (void)state;
    __builtin_cpu_init();
    if (!__builtin_cpu_supports("f16c")) {
        fprintf(stderr, "# no F16C: skipped\n");
        skip();
    }
    for (uint32_t h = 0; h < 65536; h++)
        if (!same_bits_or_nan(ra_f16_to_f32((uint16_t)h), hw_f32((uint16_t)h)))
            fail_msg("fp16 0x%04x: scalar %a, F16C %a", h, ra_f16_to_f32(h), hw_f32(h));
    trng r = {99};
    float sp[64];
    size_t ns = special_f32(sp);
    for (uint32_t i = 0; i < 2000000; i++) {
        float f;
        uint32_t u = (uint32_t)trng_u64(&r);
        if (i < ns)
            f = sp[i];
        else {
            if (i & 1) /* concentrate on fp16's range, subnormals included */
                u = (u & 0x80000000u) | (0x30000000u + (u % 0x18000000u));
            memcpy(&f, &u, 4);
        }
        uint16_t a = ra_f32_to_f16(f), b = hw_f16(f);
        if (isnan(f))
            assert_true((a & 0x7c00) == 0x7c00 && (a & 0x3ff) && (b & 0x7c00) == 0x7c00);
        else if (a != b)
            fail_msg("f32 %a (0x%08x): scalar 0x%04x, F16C 0x%04x", f, u, a, b);
    }
}

static void test_all_finite(void **state)
{
    (void)state;
    enum { N = 77 };
    for (int d = 0; d < 3; d++) {
        trng r = {3};
        void *p = tfill(&r, DT[d], N, 100.f);
        assert_int_equal(ra_kern_all_finite(p, DT[d], N), 1);
        assert_int_equal(ra_kern_all_finite(p, DT[d], 0), 1);
        for (size_t at = 0; at < N; at += 19) {
            float bad[3] = {INFINITY, -INFINITY, NAN};
            for (int b = 0; b < 3; b++) {
                void *c = malloc(N * 4);
                memcpy(c, p, N * ra_dtype_size(DT[d]));
                tset(c, DT[d], at, bad[b]);
                assert_int_equal(ra_kern_all_finite(c, DT[d], N), 0);
                assert_int_equal(ra_kern_all_finite(c, DT[d], at), 1); /* before it: fine */
                free(c);
            }
        }
        /* the largest finite values are finite */
        if (DT[d] == RA_DTYPE_F16) {
            uint16_t m = 0x7bff;
            assert_int_equal(ra_kern_all_finite(&m, DT[d], 1), 1);
        }
        free(p);
    }
    assert_int_equal(ra_kern_all_finite(NULL, (ra_dtype)9, 1), 0);
}

static void check_attn(const float *o, float lse, const double *ro, double rlse, int dim,
                       double vmax, const char *what)
{
    if (!(fabs(lse - rlse) <= 2e-5 * (1 + fabs(rlse))))
        fail_msg("%s: lse %.9g vs reference %.17g", what, lse, rlse);
    for (int j = 0; j < dim; j++)
        if (!(fabs(o[j] - ro[j]) <= 2e-5 * vmax))
            fail_msg("%s: o[%d] %.9g vs reference %.17g", what, j, o[j], ro[j]);
}

static void test_partial_attention(void **state)
{
    use_isa(state);
    trng r = {11};
    for (int d = 0; d < 3; d++)
        for (int di = 0; di < NDIMS; di++) {
            int dim = DIMS[di];
            size_t rows = 300;
            void *V = tfill(&r, DT[d], rows * dim, 2.f);
            size_t ns[] = {1, 2, 5, 100, 257};
            for (int t = 0; t < 5; t++) {
                size_t n = ns[t];
                int32_t *ids = malloc(n * sizeof *ids);
                float *s = malloc(n * sizeof *s);
                double *sd = malloc(n * sizeof *sd), *ro = malloc(dim * sizeof *ro), rl;
                float *o = malloc(dim * sizeof *o), lse;
                for (size_t i = 0; i < n; i++) {
                    ids[i] = (int32_t)(trng_u64(&r) % rows);
                    s[i] = 8.f * trng_gauss(&r) + (t == 4 ? 500.f : 0.f); /* large: no overflow */
                    sd[i] = s[i];
                }
                float scale = 1.f / sqrtf((float)dim);
                ra_kern_partial_attention(s, ids, n, scale, V, DT[d], dim, o, &lse);
                tattn(sd, ids, n, scale, V, DT[d], dim, ro, &rl);
                check_attn(o, lse, ro, rl, dim, 2.f * 5, ra_dtype_name(DT[d]));
                free(ids);
                free(s);
                free(sd);
                free(ro);
                free(o);
            }
            free(V);
        }
    /* n == 0: o = 0, lse = -Inf */
    float o[4] = {1, 2, 3, 4}, lse = 0;
    ra_kern_partial_attention(NULL, NULL, 0, 1.f, NULL, RA_DTYPE_F32, 4, o, &lse);
    assert_true(isinf(lse) && lse < 0);
    for (int j = 0; j < 4; j++)
        assert_true(o[j] == 0.f);
    /* equal scores: plain mean, lse = s + log n */
    float V[3][2] = {{1, 2}, {3, 4}, {5, 9}};
    float s[3] = {0.5f, 0.5f, 0.5f};
    int32_t ids[3] = {0, 1, 2};
    ra_kern_partial_attention(s, ids, 3, 1.f, V, RA_DTYPE_F32, 2, o, &lse);
    assert_float_equal(o[0], 3.f, 1e-6);
    assert_float_equal(o[1], 5.f, 1e-6);
    assert_float_equal(lse, 0.5f + logf(3.f), 1e-6);
}

/* Attention over A ∪ B from the partials over A and over B (the GPU/CPU merge). */
static void test_merge(void **state)
{
    (void)state;
    trng r = {5};
    for (int d = 0; d < 3; d++) {
        int dim = 128;
        size_t rows = 1000, na = 37, nb = 91;
        void *V = tfill(&r, DT[d], rows * dim, 1.f);
        int32_t ids[128];
        float s[128];
        double sd[128];
        for (size_t i = 0; i < na + nb; i++) {
            ids[i] = (int32_t)i * 7;
            s[i] = 20.f * trng_gauss(&r);
            sd[i] = s[i];
        }
        float scale = 1.f / sqrtf((float)dim);
        float oa[128], ob[128], la, lb;
        ra_kern_partial_attention(s, ids, na, scale, V, DT[d], dim, oa, &la);
        ra_kern_partial_attention(s + na, ids + na, nb, scale, V, DT[d], dim, ob, &lb);
        float m = la > lb ? la : lb;
        float wa = expf(la - m), wb = expf(lb - m);
        float o[128];
        for (int j = 0; j < dim; j++)
            o[j] = (wa * oa[j] + wb * ob[j]) / (wa + wb);
        float lse = m + logf(wa + wb);
        double ro[128], rl;
        tattn(sd, ids, na + nb, scale, V, DT[d], dim, ro, &rl);
        check_attn(o, lse, ro, rl, dim, 5.f, "merge");
        free(V);
    }
}

/* The u8 code kernel: exact int32 sums, equal to a plain loop, for groups of 1..9 queries
 * (the kernels take them four at a time), several code lengths and extreme values (255
 * codes against -127 / 127 weights: the widening and VNNI paths must not saturate). */
static void test_u8dot(void **state)
{
    use_isa(state);
    trng r = {77};
    const int CB[] = {64, 128, 192, 1024};
    for (int ci = 0; ci < 4; ci++)
        for (int G = 1; G <= 9; G++) {
            int cb = CB[ci];
            size_t stride = (size_t)cb + 64 * (ci & 1); /* records longer than the code */
            enum { NR = 50, NI = 31 };
            uint8_t *base = malloc(NR * stride);
            int8_t *q8 = malloc((size_t)G * cb);
            int16_t *q16 = malloc((size_t)G * cb * sizeof *q16);
            for (size_t i = 0; i < NR * stride; i++)
                base[i] = (i % 7 == 0) ? 255 : (uint8_t)trng_u64(&r);
            for (int i = 0; i < G * cb; i++) {
                int v = (int)(trng_u64(&r) % 255) - 127;
                if (i % 5 == 0)
                    v = (i / 5) & 1 ? 127 : -127;
                q8[i] = (int8_t)v;
                q16[i] = (int16_t)v;
            }
            int32_t ids[NI];
            for (int i = 0; i < NI; i++)
                ids[i] = (int32_t)(trng_u64(&r) % NR);
            ids[3] = ids[2];
            int32_t out[NI * 9];
            ra_kern_u8dot_gather(q8, q16, G, cb, base, stride, ids, NI, out);
            for (int i = 0; i < NI; i++)
                for (int j = 0; j < G; j++) {
                    int64_t ref = 0;
                    for (int d = 0; d < cb; d++)
                        ref += (int64_t)base[(size_t)ids[i] * stride + d] * q8[j * cb + d];
                    if (out[i * G + j] != ref)
                        fail_msg("u8dot G %d cb %d key %d query %d: %d, expected %lld", G, cb, i,
                                 j, out[i * G + j], (long long)ref);
                }
            free(base);
            free(q8);
            free(q16);
        }
}

/* The AMX kernel: for 8-bit codes of 64 and 128 bytes, records longer than the code, code
 * counts that are not a multiple of 16 (the tail block), fewer than 32 queries and
 * extreme values, every row listed exactly when some score beats its query's threshold,
 * with its mask and its 32 exact scores, in ascending order. Skipped without AMX. */
static void test_amx_dots32(void **state)
{
    (void)state;
    if (!ra_kern_amx_ok()) {
        print_message("    (no AMX on this host: skipped)\n");
        skip();
    }
    trng r = {91};
    const int CB[] = {64, 128};
    const size_t NS[] = {1, 15, 16, 17, 100, 523};
    for (int ci = 0; ci < 2; ci++)
        for (int ni = 0; ni < 6; ni++)
            for (int qi = 0; qi < 3; qi++) {
                int nq = qi == 0 ? 1 : qi == 1 ? 7 : 32;
                int cb = CB[ci];
                size_t n = NS[ni], stride = (size_t)cb + 64 * (ni & 1);
                uint8_t *base = malloc(n * stride);
                int8_t *q8 = calloc(32 * (size_t)cb, 1);
                int8_t *pack = aligned_alloc(64, 4096);
                int32_t *dots = malloc(n * 32 * sizeof *dots), *ref = malloc(n * 32 * sizeof *ref);
                uint32_t *mask = malloc(n * sizeof *mask), *rows = malloc(n * sizeof *rows);
                assert_non_null(base), assert_non_null(dots), assert_non_null(rows);
                for (size_t i = 0; i < n * stride; i++)
                    base[i] = (i % 7 == 0) ? 255 : (uint8_t)trng_u64(&r);
                for (int i = 0; i < nq * cb; i++) {
                    int v = (int)(trng_u64(&r) % 255) - 127;
                    q8[i] = (int8_t)(i % 5 == 0 ? ((i / 5) & 1 ? 127 : -127) : v);
                }
                int32_t tau[32];
                for (size_t i = 0; i < n; i++)
                    for (int j = 0; j < 32; j++) {
                        int64_t s = 0;
                        for (int d = 0; d < cb; d++)
                            s += (int64_t)base[i * stride + d] * q8[j * cb + d];
                        ref[i * 32 + j] = (int32_t)s;
                    }
                for (int j = 0; j < 32; j++) /* about one row in four beats each query */
                    tau[j] = j < nq ? ref[(trng_u64(&r) % n) * 32 + j] + (int32_t)(j % 3) - 1
                                    : INT32_MAX;
                ra_kern_amx_pack32(q8, nq, cb, pack);
                ra_kern_amx_begin();
                size_t nr = ra_kern_amx_dots32(pack, cb, base, stride, n, (int)(n & 1), tau, dots,
                                               mask, rows);
                ra_kern_amx_end();
                size_t k = 0;
                for (size_t i = 0; i < n; i++) {
                    uint32_t want = 0;
                    for (int j = 0; j < 32; j++)
                        want |= (uint32_t)(ref[i * 32 + j] > tau[j]) << j;
                    if (!want)
                        continue;
                    if (k >= nr || rows[k] != i || mask[k] != want)
                        fail_msg("amx cb %d n %zu nq %d: row %zu (listed %zu of %zu) mask %x vs %x",
                                 cb, n, nq, i, k, nr, k < nr ? mask[k] : 0, want);
                    for (int j = 0; j < 32; j++)
                        if (j < nq && dots[k * 32 + j] != ref[i * 32 + j])
                            fail_msg("amx cb %d n %zu: code %zu query %d: %d, expected %d", cb, n,
                                     i, j, dots[k * 32 + j], ref[i * 32 + j]);
                    k++;
                }
                assert_int_equal(k, nr);
                free(base), free(q8), free(pack), free(dots), free(ref), free(mask), free(rows);
            }
}

/* The AMX kernel reads nothing past the last code (ASan does not see tile loads): the
 * codes end where an inaccessible page starts, for both code sizes, records longer than
 * the code, and every count up to 70 (full blocks and tails). Skipped without AMX. */
static void test_amx_dots32_bounds(void **state)
{
    (void)state;
    if (!ra_kern_amx_ok()) {
        print_message("    (no AMX on this host: skipped)\n");
        skip();
    }
    int8_t q8[32 * 128];
    for (int i = 0; i < 32 * 128; i++)
        q8[i] = (int8_t)(i * 37 % 255 - 127);
    int8_t *pack = aligned_alloc(64, 4096);
    int32_t tau[32];
    for (int j = 0; j < 32; j++)
        tau[j] = INT32_MIN;
    int32_t *dots = malloc(70 * 32 * sizeof *dots);
    uint32_t mask[70], rows[70];
    size_t pg = (size_t)sysconf(_SC_PAGESIZE);
    for (int cb = 64; cb <= 128; cb += 64)
        for (size_t stride = (size_t)cb; stride <= (size_t)cb + 64; stride += 64)
            for (size_t n = 1; n <= 70; n++) {
                size_t bytes = (n - 1) * stride + (size_t)cb, tot = (bytes + pg - 1) / pg * pg + pg;
                uint8_t *m =
                    mmap(NULL, tot, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
                assert_true(m != MAP_FAILED);
                assert_int_equal(mprotect(m + tot - pg, pg, PROT_NONE), 0);
                uint8_t *codes = m + tot - pg - bytes;
                memset(codes, 200, bytes);
                ra_kern_amx_pack32(q8, 32, cb, pack);
                ra_kern_amx_begin();
                size_t nr =
                    ra_kern_amx_dots32(pack, cb, codes, stride, n, 1, tau, dots, mask, rows);
                ra_kern_amx_end();
                assert_int_equal(nr, n); /* every score beats INT32_MIN */
                munmap(m, tot);
            }
    free(pack);
    free(dots);
}

/* The u4 code kernel: exact int32 sums equal to a plain loop over both nibbles, for
 * groups of 1..9 queries, several code lengths, records longer than the code, and
 * extreme values (15 nibbles against -127 / 127 weights). */
static void test_u4dot(void **state)
{
    use_isa(state);
    trng r = {78};
    const int CB[] = {64, 128, 192, 512};
    for (int ci = 0; ci < 4; ci++)
        for (int G = 1; G <= 9; G++) {
            int cb = CB[ci];
            size_t stride = (size_t)cb + 64 * (ci & 1);
            enum { NR = 50, NI = 31 };
            uint8_t *base = malloc(NR * stride);
            int8_t *q8 = malloc((size_t)G * 2 * cb);
            for (size_t i = 0; i < NR * stride; i++)
                base[i] = (i % 7 == 0) ? 255 : (uint8_t)trng_u64(&r);
            for (int i = 0; i < G * 2 * cb; i++) {
                int v = (int)(trng_u64(&r) % 255) - 127;
                if (i % 5 == 0)
                    v = (i / 5) & 1 ? 127 : -127;
                q8[i] = (int8_t)v;
            }
            int32_t ids[NI];
            for (int i = 0; i < NI; i++)
                ids[i] = (int32_t)(trng_u64(&r) % NR);
            ids[3] = ids[2];
            int32_t out[NI * 9];
            ra_kern_u4dot_gather(q8, G, cb, base, stride, ids, NI, out);
            for (int i = 0; i < NI; i++)
                for (int j = 0; j < G; j++) {
                    int64_t ref = 0;
                    const uint8_t *c = base + (size_t)ids[i] * stride;
                    const int8_t *q = q8 + (size_t)j * 2 * cb;
                    for (int b = 0; b < cb; b++)
                        ref += (int64_t)(c[b] & 15) * q[b] + (int64_t)(c[b] >> 4) * q[b + cb];
                    if (out[i * G + j] != ref)
                        fail_msg("u4dot G %d cb %d key %d query %d: %d, expected %lld", G, cb, i, j,
                                 out[i * G + j], (long long)ref);
                }
            free(base);
            free(q8);
        }
}

/* The projected-code scan kernel against a plain loop: every ISA, 1-4 queries, 1-8,
 * 12 and 16 chunks (pscan keeps 64-128 dimensions: 8-16), a tail block (n_valid not a multiple of
 * 16), a block step, thresholds that pass everything / some / nothing, and the early return when a
 * buffer fills (the caller's resumption gives the same keys in the same order). */
static void test_p4scan(void **state)
{
    use_isa(state);
    trng r = {97};
    enum { NB = 37, CAP = 96 };
    for (int nch = 1; nch <= 16; nch += nch < 8 ? 1 : 4) /* 1-8, 12, 16 (pscan: 8-16) */
        for (int g = 1; g <= 4; g++)
            for (int step = 1; step <= 3; step += 2) {
                size_t bb = (size_t)nch * 64, nvalid = NB * 16 - 5;
                uint8_t *codes = malloc(NB * bb);
                for (size_t i = 0; i < NB * bb; i++)
                    codes[i] = i % 11 == 0 ? 255 : (uint8_t)trng_u64(&r);
                int32_t qw[4 * RA_P4_QW];
                for (int i = 0; i < 4 * RA_P4_QW; i++)
                    qw[i] = (int32_t)trng_u64(&r);
                ((int8_t *)qw)[0] = -128; /* the extremes of an int8 weight */
                ((int8_t *)qw)[1] = 127;
                int32_t ref[4][NB * 16];
                for (int j = 0; j < g; j++)
                    for (size_t k = 0; k < NB * 16; k++) {
                        int64_t s = 0;
                        const uint8_t *c = codes + k / 16 * bb + k % 16 * 4;
                        for (int ch = 0; ch < nch; ch++)
                            for (int t = 0; t < 4; t++) {
                                const int8_t *w = (const int8_t *)&qw[j * RA_P4_QW + 2 * ch];
                                uint8_t x = c[ch * 64 + t];
                                s += (int64_t)w[t] * (x & 15) + (int64_t)w[4 + t] * (x >> 4);
                            }
                        ref[j][k] = (int32_t)s;
                    }
                for (int mode = 0; mode < 3; mode++) {
                    int32_t thr[4], *sc[4], *id[4], cnt[4] = {0};
                    int32_t scb[4][CAP], idb[4][CAP];
                    for (int j = 0; j < g; j++) {
                        /* mode 0: everything passes; 1: about a third; 2: nothing */
                        thr[j] = mode == 0 ? INT32_MIN : mode == 1 ? 200 : INT32_MAX;
                        sc[j] = scb[j], id[j] = idb[j];
                    }
                    size_t want[4] = {0};
                    size_t b = 0;
                    while (b < NB) {
                        b = ra_kern_p4scan(codes, nch, b, NB, (size_t)step, nvalid, g, qw, thr, sc,
                                           id, cnt, CAP);
                        for (int j = 0; j < g; j++) {
                            assert_true(cnt[j] <= CAP);
                            for (int i = 0; i < cnt[j]; i++) { /* the next keys of the ref */
                                size_t k = want[j];
                                while (k < NB * 16 && !(k / 16 % (size_t)step == 0 && k < nvalid &&
                                                        ref[j][k] > thr[j]))
                                    k++;
                                assert_true(k < NB * 16);
                                assert_int_equal(idb[j][i], (int32_t)k);
                                assert_int_equal(scb[j][i], ref[j][k]);
                                want[j] = k + 1;
                            }
                            cnt[j] = 0; /* the caller made room */
                        }
                    }
                    for (int j = 0; j < g; j++) /* nothing passing was left out */
                        for (size_t k = want[j]; k < nvalid; k++)
                            assert_false(k / 16 % (size_t)step == 0 && ref[j][k] > thr[j]);
                }
                free(codes);
            }
}

/* Codes: the approximate score is within the bound that the steps and the query's
 * rounding allow, on anisotropic data with an offset, in every dtype; the ranking of
 * 2000 keys by code agrees with the exact one at the top. */
static void test_codebook(void **state)
{
    use_isa(state);
    trng r = {91};
    const int dims[] = {64, 100, 128, 130};
    for (int bits = 8; bits >= 4; bits -= 4)
        for (int di = 0; di < 4; di++)
            for (int d = 0; d < 3; d++) {
                int dim = dims[di];
                double levels = bits == 8 ? 255 : 15;
                size_t n = 2000;
                float *kf = malloc(n * dim * sizeof *kf);
                for (size_t i = 0; i < n; i++)
                    for (int j = 0; j < dim; j++)
                        kf[i * dim + j] = 0.5f + trng_gauss(&r) * expf(-3.f * j / dim);
                size_t es = ra_dtype_size(DT[d]);
                void *rows = malloc(n * dim * es);
                ra_kern_from_f32(kf, DT[d], n * dim, rows);
                ra_codebook cb;
                assert_int_equal(ra_codebook_train(&cb, rows, DT[d], dim, bits, n), RA_OK);
                assert_int_equal(cb.cbytes % 64, 0);
                assert_true(cb.cbytes * 8 >= dim * bits);
                assert_int_equal(cb.qbytes, cb.cbytes * 8 / bits);
                assert_true(cb.qbytes >= dim);
                uint8_t *codes = malloc(n * cb.cbytes);
                float *tmp = malloc(dim * sizeof *tmp);
                for (size_t i = 0; i < n; i++)
                    ra_codebook_encode(&cb, (char *)rows + i * dim * es, DT[d],
                                       codes + i * cb.cbytes, tmp);
                float *q = malloc(dim * sizeof *q);
                for (int j = 0; j < dim; j++)
                    q[j] = 2.f * trng_gauss(&r) + (j > dim / 2 ? 1.f : 0.f);
                int8_t *q8 = malloc(cb.qbytes);
                int16_t *q16 = malloc(cb.qbytes * sizeof *q16);
                float mul, add;
                ra_codebook_prep(&cb, q, q8, q16, &mul, &add);
                int32_t *ids = malloc(n * sizeof *ids), *dots = malloc(n * sizeof *dots);
                for (size_t i = 0; i < n; i++)
                    ids[i] = (int32_t)i;
                ra_codebook_dots(&cb, q8, q16, 1, codes, (size_t)cb.cbytes, ids, n, dots);
                /* against the plain decoding of each code: the kernels and the packing agree */
                for (size_t i = 0; i < n; i += 97) {
                    int64_t ref = 0;
                    const uint8_t *c = codes + i * cb.cbytes;
                    for (int j = 0; j < dim; j++) {
                        int v = bits == 8       ? c[j]
                                : j < cb.cbytes ? (c[j] & 15)
                                                : (c[j - cb.cbytes] >> 4);
                        ref += (int64_t)v * q8[j];
                    }
                    assert_int_equal(dots[i], ref);
                }
                double bound = 0;
                float s = mul;
                for (int j = 0; j < dim; j++) /* half a step per dim, and the query's rounding */
                    bound += 0.5 * fabs(q[j]) * cb.step[j] + 0.5 * s * levels;
                float *ex = malloc(n * sizeof *ex);
                ra_kern_dot_range(q, rows, DT[d], dim, 0, n, ex);
                double maxerr = 0;
                for (size_t i = 0; i < n; i++) {
                    float approx = mul * (float)dots[i] + add;
                    double e = fabs(approx - ex[i]);
                    if (e > maxerr)
                        maxerr = e;
                }
                /* the bound is loose by construction; 2x guards against float rounding */
                if (!(maxerr <= 2 * bound))
                    fail_msg("codes %d bits dim %d %s: max error %.4g over bound %.4g", bits, dim,
                             ra_dtype_name(DT[d]), maxerr, bound);
                /* the exact top key is in the code's top 10 */
                size_t best = 0, ab = 0;
                for (size_t i = 1; i < n; i++) {
                    if (ex[i] > ex[best])
                        best = i;
                    if (dots[i] > dots[ab])
                        ab = i;
                }
                int rank = 0;
                for (size_t i = 0; i < n; i++)
                    rank += dots[i] > dots[best];
                assert_true(rank < (bits == 8 ? 10 : 40));
                free(kf), free(rows), free(codes), free(tmp), free(q), free(q8), free(q16),
                    free(ids);
                free(dots), free(ex);
                ra_codebook_fini(&cb);
            }
    ra_codebook cb0;
    assert_int_equal(ra_codebook_train(&cb0, NULL, RA_DTYPE_F16, 0, 8, 0), RA_EINVAL);
    assert_int_equal(ra_codebook_train(&cb0, NULL, RA_DTYPE_F16, 8, 5, 0), RA_EINVAL);
    assert_int_equal(ra_codebook_code_bytes(128, 4), 64);
    assert_int_equal(ra_codebook_code_bytes(128, 8), 128);
    assert_int_equal(ra_codebook_code_bytes(64, 2), 0);
    assert_int_equal(ra_codebook_train(&cb0, NULL, RA_DTYPE_F16, 8, 8, 0), RA_OK); /* empty */
    assert_true(cb0.step[0] > 0);
    ra_codebook_fini(&cb0);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_isa_dispatch),
        cmocka_unit_test_prestate_setup_teardown(test_dot, NULL, reset_isa, &isa_scalar),
        cmocka_unit_test_prestate_setup_teardown(test_dot, NULL, reset_isa, &isa_avx2),
        cmocka_unit_test_prestate_setup_teardown(test_dot, NULL, reset_isa, &isa_avx512),
        cmocka_unit_test_prestate_setup_teardown(test_convert, NULL, reset_isa, &isa_scalar),
        cmocka_unit_test_prestate_setup_teardown(test_convert, NULL, reset_isa, &isa_avx2),
        cmocka_unit_test_prestate_setup_teardown(test_convert, NULL, reset_isa, &isa_avx512),
        cmocka_unit_test_prestate_setup_teardown(test_partial_attention, NULL, reset_isa,
                                                 &isa_scalar),
        cmocka_unit_test_prestate_setup_teardown(test_partial_attention, NULL, reset_isa,
                                                 &isa_avx2),
        cmocka_unit_test_prestate_setup_teardown(test_partial_attention, NULL, reset_isa,
                                                 &isa_avx512),
        cmocka_unit_test_prestate_setup_teardown(test_u8dot, NULL, reset_isa, &isa_scalar),
        cmocka_unit_test_prestate_setup_teardown(test_u8dot, NULL, reset_isa, &isa_avx2),
        cmocka_unit_test_prestate_setup_teardown(test_u8dot, NULL, reset_isa, &isa_avx512),
        cmocka_unit_test_prestate_setup_teardown(test_u8dot, NULL, reset_isa, &isa_vnni),
        cmocka_unit_test(test_amx_dots32),
        cmocka_unit_test(test_amx_dots32_bounds),
        cmocka_unit_test_prestate_setup_teardown(test_u4dot, NULL, reset_isa, &isa_scalar),
        cmocka_unit_test_prestate_setup_teardown(test_u4dot, NULL, reset_isa, &isa_avx2),
        cmocka_unit_test_prestate_setup_teardown(test_u4dot, NULL, reset_isa, &isa_avx512),
        cmocka_unit_test_prestate_setup_teardown(test_u4dot, NULL, reset_isa, &isa_vnni),
        cmocka_unit_test_prestate_setup_teardown(test_p4scan, NULL, reset_isa, &isa_scalar),
        cmocka_unit_test_prestate_setup_teardown(test_p4scan, NULL, reset_isa, &isa_avx2),
        cmocka_unit_test_prestate_setup_teardown(test_p4scan, NULL, reset_isa, &isa_avx512),
        cmocka_unit_test_prestate_setup_teardown(test_p4scan, NULL, reset_isa, &isa_vnni),
        cmocka_unit_test_prestate_setup_teardown(test_codebook, NULL, reset_isa, &isa_scalar),
        cmocka_unit_test_prestate_setup_teardown(test_codebook, NULL, reset_isa, &isa_avx2),
        cmocka_unit_test_prestate_setup_teardown(test_codebook, NULL, reset_isa, &isa_vnni),
        cmocka_unit_test(test_half_edge_cases),
        cmocka_unit_test(test_half_roundtrip_exhaustive),
        cmocka_unit_test(test_f16_vs_hardware),
        cmocka_unit_test(test_all_finite),
        cmocka_unit_test(test_merge),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
