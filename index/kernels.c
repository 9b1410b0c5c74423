/* Scalar kernels, run-time ISA dispatch and the public entry points of ra_kernels.h.
 * The scalar table is the reference every SIMD path is tested against and the path
 * old CPUs take; the best table the CPU supports is picked once (or forced by tests and
 * by RA_ISA=scalar|avx2|avx512 in the environment, for benchmarks). Partial attention
 * lives here once for every ISA: its per-row work is the table's axpy, which is where
 * the SIMD conversion of V happens. */
#include <math.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "kern_impl.h"
#include "ra_half.h"
#include "ra_log.h"

/* ---------- scalar table ---------- */

static inline float ld_f32(const void *p, size_t i) { return ((const float *)p)[i]; }
static inline float ld_f16(const void *p, size_t i) { return ra_f16_to_f32(((const uint16_t *)p)[i]); }
static inline float ld_bf16(const void *p, size_t i) { return ra_bf16_to_f32(((const uint16_t *)p)[i]); }

#define SCALAR_DTYPE(NAME, ESZ, LD)                                                            \
    static float dot1_##NAME(const float *q, const void *row, int dim)                         \
    {                                                                                          \
        float a0 = 0, a1 = 0, a2 = 0, a3 = 0;                                                  \
        int j = 0;                                                                             \
        for (; j + 4 <= dim; j += 4) {                                                         \
            a0 += q[j] * LD(row, j);                                                           \
            a1 += q[j + 1] * LD(row, j + 1);                                                   \
            a2 += q[j + 2] * LD(row, j + 2);                                                   \
            a3 += q[j + 3] * LD(row, j + 3);                                                   \
        }                                                                                      \
        for (; j < dim; j++)                                                                   \
            a0 += q[j] * LD(row, j);                                                           \
        return (a0 + a1) + (a2 + a3);                                                          \
    }                                                                                          \
    static void dot_range_##NAME(const float *q, const void *rows, int dim, size_t first,      \
                                 size_t n, float *out)                                         \
    {                                                                                          \
        const char *base = (const char *)rows + first * (size_t)dim * ESZ;                     \
        for (size_t i = 0; i < n; i++)                                                         \
            out[i] = dot1_##NAME(q, base + i * (size_t)dim * ESZ, dim);                        \
    }                                                                                          \
    static void dot_gather_##NAME(const float *q, const void *rows, int dim,                   \
                                  const int32_t *ids, size_t n, float *out)                    \
    {                                                                                          \
        for (size_t i = 0; i < n; i++)                                                         \
            out[i] = dot1_##NAME(q, (const char *)rows + (size_t)ids[i] * dim * ESZ, dim);     \
    }                                                                                          \
    static void axpy_##NAME(float w, const void *row, int dim, float *acc)                     \
    {                                                                                          \
        for (int j = 0; j < dim; j++)                                                          \
            acc[j] += w * LD(row, j);                                                          \
    }                                                                                          \
    static void to_f32_##NAME(const void *src, size_t n, float *dst)                           \
    {                                                                                          \
        for (size_t i = 0; i < n; i++)                                                         \
            dst[i] = LD(src, i);                                                               \
    }

SCALAR_DTYPE(f32, 4, ld_f32)
SCALAR_DTYPE(f16, 2, ld_f16)
SCALAR_DTYPE(bf16, 2, ld_bf16)

static void from_f32_f32(const float *src, size_t n, void *dst) { memcpy(dst, src, n * 4); }
static void from_f32_f16(const float *src, size_t n, void *dst)
{
    for (size_t i = 0; i < n; i++)
        ((uint16_t *)dst)[i] = ra_f32_to_f16(src[i]);
}
static void from_f32_bf16(const float *src, size_t n, void *dst)
{
    for (size_t i = 0; i < n; i++)
        ((uint16_t *)dst)[i] = ra_f32_to_bf16(src[i]);
}

static void u8dot_gather_scalar(const int8_t *q8, const int16_t *q16, int G, int cbytes,
                                const uint8_t *base, size_t stride, const int32_t *ids, size_t n,
                                int32_t *out)
{
    (void)q16;
    for (size_t i = 0; i < n; i++) {
        const uint8_t *c = base + (size_t)ids[i] * stride;
        for (int j = 0; j < G; j++) {
            const int8_t *q = q8 + (size_t)j * cbytes;
            int32_t s = 0;
            for (int d = 0; d < cbytes; d++)
                s += (int32_t)c[d] * q[d];
            out[i * (size_t)G + j] = s;
        }
    }
}

static void u4dot_gather_scalar(const int8_t *q8, int G, int cbytes, const uint8_t *base,
                                size_t stride, const int32_t *ids, size_t n, int32_t *out)
{
    for (size_t i = 0; i < n; i++) {
        const uint8_t *c = base + (size_t)ids[i] * stride;
        for (int j = 0; j < G; j++) {
            const int8_t *q = q8 + (size_t)j * 2 * cbytes;
            int32_t s = 0;
            for (int b = 0; b < cbytes; b++)
                s += (int32_t)(c[b] & 15) * q[b] + (int32_t)(c[b] >> 4) * q[b + cbytes];
            out[i * (size_t)G + j] = s;
        }
    }
}

static void dotq4_f32_scalar(const float *q, int dim, const float *rows, size_t n, float *out)
{
    for (int k = 0; k < 4; k++)
        for (size_t i = 0; i < n; i++)
            out[(size_t)k * n + i] = dot1_f32(q + (size_t)k * dim, rows + i * (size_t)dim, dim);
}

static size_t p4scan_scalar(const uint8_t *codes, int nch, size_t b, size_t b1, size_t step,
                            size_t n_valid, int g, const int32_t *qw, const int32_t *thr,
                            int32_t *const *sc, int32_t *const *id, int *cnt, int cap)
{
    for (; b < b1; b += step) {
        const uint8_t *c = codes + b * (size_t)nch * 64;
        int32_t acc[4][16] = {{0}};
        for (int ch = 0; ch < nch; ch++)
            for (int j = 0; j < g; j++) {
                const int8_t *wl = (const int8_t *)&qw[j * RA_P4_QW + 2 * ch];
                const int8_t *wh = (const int8_t *)&qw[j * RA_P4_QW + 2 * ch + 1];
                for (int i = 0; i < 16; i++)
                    for (int t = 0; t < 4; t++) {
                        uint8_t x = c[ch * 64 + i * 4 + t];
                        acc[j][i] += wl[t] * (x & 15) + wh[t] * (x >> 4);
                    }
            }
        int full = 0;
        for (int j = 0; j < g; j++) {
            for (int i = 0; i < 16; i++) {
                size_t r = b * 16 + (size_t)i;
                if (r < n_valid && acc[j][i] > thr[j]) {
                    sc[j][cnt[j]] = acc[j][i];
                    id[j][cnt[j]++] = (int32_t)r;
                }
            }
            full |= cnt[j] > cap - 16;
        }
        if (full)
            return b + step;
    }
    return b;
}

const ra_kern_table ra_kern_table_scalar = {
    .dot_range = {dot_range_f32, dot_range_f16, dot_range_bf16},
    .dot_gather = {dot_gather_f32, dot_gather_f16, dot_gather_bf16},
    .axpy = {axpy_f32, axpy_f16, axpy_bf16},
    .to_f32 = {to_f32_f32, to_f32_f16, to_f32_bf16},
    .from_f32 = {from_f32_f32, from_f32_f16, from_f32_bf16},
    .u8dot_gather = u8dot_gather_scalar,
    .u4dot_gather = u4dot_gather_scalar,
    .p4scan = p4scan_scalar,
    .dotq4_f32 = dotq4_f32_scalar,
};

/* ---------- dispatch ---------- */

/* AVX-512 with VNNI: the AVX-512 table with the u8 code kernel on vpdpbusd. Filled at the
 * first dispatch (a const initializer cannot copy another table). */
static ra_kern_table g_table_vnni;
static pthread_once_t g_vnni_once = PTHREAD_ONCE_INIT;
static void vnni_init(void)
{
    g_table_vnni = ra_kern_table_avx512;
    g_table_vnni.u8dot_gather = ra_kern_u8dot_gather_vnni;
    g_table_vnni.u4dot_gather = ra_kern_u4dot_gather_vnni;
    g_table_vnni.p4scan = ra_kern_p4scan_vnni;
}

static const ra_kern_table *const g_tables[4] = {&ra_kern_table_scalar, &ra_kern_table_avx2,
                                                  &ra_kern_table_avx512, &g_table_vnni};
#define N_ISA 4
static const ra_kern_table *g_tab;  /* atomic; NULL until first use */
static int g_isa = -1;              /* atomic */
static int g_best = -1;             /* atomic */

static int cpu_best(void)
{
    __builtin_cpu_init();
    int avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
               __builtin_cpu_supports("f16c");
    /* kernels_avx512.c is compiled with F, BW and VL */
    int avx512 = avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                 __builtin_cpu_supports("avx512vl");
    int vnni = avx512 && __builtin_cpu_supports("avx512vnni");
    return vnni ? RA_ISA_AVX512VNNI : avx512 ? RA_ISA_AVX512 : avx2 ? RA_ISA_AVX2 : RA_ISA_SCALAR;
}

ra_isa ra_kern_isa_best(void)
{
    int b = __atomic_load_n(&g_best, __ATOMIC_ACQUIRE);
    if (b < 0) {
        b = cpu_best();
        __atomic_store_n(&g_best, b, __ATOMIC_RELEASE);
    }
    return (ra_isa)b;
}

const char *ra_kern_isa_name(ra_isa isa)
{
    switch (isa) {
    case RA_ISA_SCALAR: return "scalar";
    case RA_ISA_AVX2: return "avx2";
    case RA_ISA_AVX512: return "avx512";
    case RA_ISA_AVX512VNNI: return "avx512vnni";
    }
    return "?";
}

static void isa_store(int isa)
{
    pthread_once(&g_vnni_once, vnni_init);
    __atomic_store_n(&g_isa, isa, __ATOMIC_RELEASE);
    __atomic_store_n(&g_tab, g_tables[isa], __ATOMIC_RELEASE);
}

static const ra_kern_table *tab(void)
{
    const ra_kern_table *t = __atomic_load_n(&g_tab, __ATOMIC_ACQUIRE);
    if (__builtin_expect(t != NULL, 1))
        return t;
    int isa = ra_kern_isa_best();
    const char *env = getenv("RA_ISA");
    if (env && *env) {
        int want = -1;
        for (int i = 0; i < N_ISA; i++)
            if (strcasecmp(env, ra_kern_isa_name((ra_isa)i)) == 0)
                want = i;
        if (want < 0)
            RA_WARN("RA_ISA=%s is not one of scalar, avx2, avx512, avx512vnni: using %s", env,
                    ra_kern_isa_name((ra_isa)isa));
        else if (want > isa)
            RA_WARN("RA_ISA=%s: this CPU lacks it, using %s", env, ra_kern_isa_name((ra_isa)isa));
        else
            isa = want;
    }
    isa_store(isa);
    return g_tables[isa];
}

ra_isa ra_kern_isa_get(void)
{
    tab();
    return (ra_isa)__atomic_load_n(&g_isa, __ATOMIC_ACQUIRE);
}

ra_status ra_kern_isa_set(ra_isa isa)
{
    if ((int)isa < 0 || (int)isa >= N_ISA)
        return RA_EINVAL;
    if ((int)isa > (int)ra_kern_isa_best())
        return RA_ENOTSUP;
    isa_store((int)isa);
    return RA_OK;
}

/* ---------- public entry points ---------- */

static inline int dt_ok(ra_dtype t) { return (unsigned)t <= RA_DTYPE_BF16; }

void ra_kern_dot_range(const float *q, const void *rows, ra_dtype t, int dim, size_t first,
                       size_t n, float *out)
{
    if (!dt_ok(t) || dim <= 0 || n == 0)
        return;
    tab()->dot_range[t](q, rows, dim, first, n, out);
}

void ra_kern_dot_gather(const float *q, const void *rows, ra_dtype t, int dim, const int32_t *ids,
                        size_t n, float *out)
{
    if (!dt_ok(t) || dim <= 0 || n == 0)
        return;
    tab()->dot_gather[t](q, rows, dim, ids, n, out);
}

void ra_kern_dot_q4_f32(const float *q, const float *rows, int dim, size_t n, float *out)
{
    if (dim <= 0 || n == 0)
        return;
    tab()->dotq4_f32(q, dim, rows, n, out);
}

float ra_kern_dot(const float *q, const void *row, ra_dtype t, int dim)
{
    float r = 0.f;
    ra_kern_dot_range(q, row, t, dim, 0, 1, &r);
    return r;
}

void ra_kern_u8dot_gather(const int8_t *q8, const int16_t *q16, int G, int cbytes,
                          const uint8_t *base, size_t stride, const int32_t *ids, size_t n,
                          int32_t *out)
{
    if (G <= 0 || cbytes <= 0 || (cbytes & 63) || n == 0)
        return;
    tab()->u8dot_gather(q8, q16, G, cbytes, base, stride, ids, n, out);
}

size_t ra_kern_p4scan(const uint8_t *codes, int nch, size_t b, size_t b1, size_t step,
                      size_t n_valid, int g, const int32_t *qw, const int32_t *thr,
                      int32_t *const *sc, int32_t *const *id, int *cnt, int cap)
{
    if (g < 1 || g > 4 || nch < 1 || nch > RA_P4_QW / 2 || step < 1)
        return b1;
    ra_kern_p4scan_fn f = tab()->p4scan;
    return (f ? f : p4scan_scalar)(codes, nch, b, b1, step, n_valid, g, qw, thr, sc, id, cnt, cap);
}

void ra_kern_u4dot_gather(const int8_t *q8, int G, int cbytes, const uint8_t *base, size_t stride,
                          const int32_t *ids, size_t n, int32_t *out)
{
    if (G <= 0 || cbytes <= 0 || (cbytes & 63) || n == 0)
        return;
    tab()->u4dot_gather(q8, G, cbytes, base, stride, ids, n, out);
}

void ra_kern_to_f32(const void *src, ra_dtype t, size_t n, float *dst)
{
    if (dt_ok(t) && n)
        tab()->to_f32[t](src, n, dst);
}

void ra_kern_from_f32(const float *src, ra_dtype t, size_t n, void *dst)
{
    if (dt_ok(t) && n)
        tab()->from_f32[t](src, n, dst);
}

int ra_kern_all_finite(const void *src, ra_dtype t, size_t n)
{
    /* Branch-free OR reductions that the compiler vectorizes: the exponent field all ones
     * means Inf or NaN in each format. */
    unsigned bad = 0;
    if (t == RA_DTYPE_F32) {
        const uint32_t *u = src;
        for (size_t i = 0; i < n; i++)
            bad |= (u[i] & 0x7f800000u) == 0x7f800000u;
    } else if (t == RA_DTYPE_F16) {
        const uint16_t *u = src;
        for (size_t i = 0; i < n; i++)
            bad |= (u[i] & 0x7c00u) == 0x7c00u;
    } else if (t == RA_DTYPE_BF16) {
        const uint16_t *u = src;
        for (size_t i = 0; i < n; i++)
            bad |= (u[i] & 0x7f80u) == 0x7f80u;
    } else {
        return 0;
    }
    return !bad;
}

void ra_kern_partial_attention(const float *scores, const int32_t *ids, size_t n, float scale,
                               const void *vrows, ra_dtype t, int dim, float *o, float *lse)
{
    if (dim > 0)
        memset(o, 0, (size_t)dim * sizeof *o);
    if (n == 0 || dim <= 0 || !dt_ok(t)) {
        *lse = -INFINITY;
        return;
    }
    const ra_kern_table *tb = tab();
    ra_kern_axpy_fn axpy = tb->axpy[t];
    size_t rb = (size_t)dim * ra_dtype_size(t);
    const char *V = vrows;

    float m = -INFINITY;
    for (size_t i = 0; i < n; i++) {
        float z = scale * scores[i];
        if (z > m) /* NaN never wins */
            m = z;
    }
    if (!isfinite(m)) {
        /* All scores NaN/-Inf, or one overflowed to +Inf: the softmax degenerates to a
         * uniform average over the maximal entries (or nothing). Inputs are validated
         * finite, so this only guards against fp32 overflow of q.k. */
        size_t cnt = 0;
        for (size_t i = 0; i < n; i++)
            if (m == INFINITY && scale * scores[i] == INFINITY) {
                axpy(1.f, V + (size_t)ids[i] * rb, dim, o);
                cnt++;
            }
        if (cnt) {
            for (int j = 0; j < dim; j++)
                o[j] /= (float)cnt;
            *lse = INFINITY;
        } else {
            *lse = -INFINITY;
        }
        return;
    }
#ifndef RA_PA_AHEAD
#define RA_PA_AHEAD 16 /* rows: 2 -> 5.6 us, 8 -> 4.9 us, 24 -> 4.0 us for k=100 fp16 rows of
                        * dim 128 out of 128K in one run on the H200 host
                        * (tests/index/kern_speed); that machine is noisy, ~2x */
#endif
    enum { AHEAD = RA_PA_AHEAD };
    for (size_t i = 0; i < n && i < AHEAD; i++)
        ra_kern_prefetch_row(V + (size_t)ids[i] * rb, rb);
    double sum = 0.0;
    for (size_t i = 0; i < n; i++) {
        if (i + AHEAD < n)
            ra_kern_prefetch_row(V + (size_t)ids[i + AHEAD] * rb, rb);
        float z = scale * scores[i];
        if (!(z >= -INFINITY)) /* NaN: weight 0 */
            continue;
        float w = expf(z - m);
        sum += w;
        axpy(w, V + (size_t)ids[i] * rb, dim, o);
    }
    float inv = (float)(1.0 / sum); /* sum >= 1: the max contributes e^0 */
    for (int j = 0; j < dim; j++)
        o[j] *= inv;
    *lse = m + (float)log(sum);
}
