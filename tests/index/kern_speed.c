/* Kernel speed table (not a ctest test): exact-scan throughput and partial attention
 * over a top-k gather per ISA and dtype, plus ra_head_attend end to end on an exact
 * flat head, single thread. Also a self-check of every SIMD path against scalar that
 * needs no cmocka, so it runs on machines that only have the binary (the AVX-512 box).
 * Usage: kern_speed [--check] [--n ROWS] [--dim D] [--k K] */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "idx_test_util.h"
#include "ra_index.h"
#include "ra_kernels.h"
#include "ra_log.h"

static const ra_dtype DT[3] = {RA_DTYPE_F32, RA_DTYPE_F16, RA_DTYPE_BF16};

/* Best of `reps` runs of a statement, in seconds: the machines this runs on are shared
 * and noisy, and the minimum is the figure that repeats. */
#define TIME_MIN(reps, stmt)                                                                   \
    ({                                                                                         \
        double best_ = 1e30;                                                                   \
        for (int rep_ = 0; rep_ < (reps); rep_++) {                                            \
            double t0_ = ra_now_s();                                                           \
            stmt;                                                                              \
            double d_ = ra_now_s() - t0_;                                                      \
            if (d_ < best_)                                                                    \
                best_ = d_;                                                                    \
        }                                                                                      \
        best_;                                                                                 \
    })

static int self_check(void)
{
    int fails = 0;
    trng r = {1};
    int dims[] = {1, 7, 16, 17, 33, 64, 128, 130};
    for (int isa = 1; isa <= (int)ra_kern_isa_best(); isa++) {
        int bad = 0;
        for (int d = 0; d < 3; d++)
            for (int di = 0; di < 8; di++) {
                int dim = dims[di];
                size_t n = 67;
                void *rows = tfill(&r, DT[d], n * dim, 1.f);
                float *q = malloc(dim * 4), a[67], b[67];
                for (int j = 0; j < dim; j++)
                    q[j] = trng_gauss(&r);
                int32_t ids[67];
                for (size_t i = 0; i < n; i++)
                    ids[i] = (int32_t)(trng_u64(&r) % n);
                for (int op = 0; op < 2; op++) {
                    ra_kern_isa_set(RA_ISA_SCALAR);
                    if (op == 0)
                        ra_kern_dot_range(q, rows, DT[d], dim, 0, n, a);
                    else
                        ra_kern_dot_gather(q, rows, DT[d], dim, ids, n, a);
                    ra_kern_isa_set((ra_isa)isa);
                    if (op == 0)
                        ra_kern_dot_range(q, rows, DT[d], dim, 0, n, b);
                    else
                        ra_kern_dot_gather(q, rows, DT[d], dim, ids, n, b);
                    for (size_t i = 0; i < n; i++) {
                        double ab, ref = tdot(q, rows, DT[d], dim, op ? (size_t)ids[i] : i, &ab);
                        double tol = (dim + 4) * 1.2e-7 * ab + 1e-30;
                        if (!(fabs(b[i] - ref) <= tol) || !(fabs(a[i] - ref) <= tol))
                            bad++;
                    }
                }
                /* conversions: bitwise equal to scalar (NaN: both NaN) */
                size_t m = n * dim;
                float *src = malloc(m * 4), *x = malloc(m * 4), *y = malloc(m * 4);
                uint16_t *h1 = malloc(m * 2), *h2 = malloc(m * 2);
                for (size_t i = 0; i < m; i++) {
                    uint32_t u = (uint32_t)trng_u64(&r);
                    if (i % 2)
                        u = (u & 0x80000000u) | (0x30000000u + (u % 0x18000000u));
                    memcpy(&src[i], &u, 4);
                }
                if (d) {
                    ra_kern_isa_set(RA_ISA_SCALAR);
                    ra_kern_from_f32(src, DT[d], m, h1);
                    ra_kern_to_f32(h1, DT[d], m, x);
                    ra_kern_isa_set((ra_isa)isa);
                    ra_kern_from_f32(src, DT[d], m, h2);
                    ra_kern_to_f32(h1, DT[d], m, y);
                    for (size_t i = 0; i < m; i++) {
                        int n1 = isnan(x[i]), n2 = isnan(tval(h2, DT[d], i));
                        if (n1 != n2 || (!n1 && h1[i] != h2[i]) ||
                            (!n1 && memcmp(&x[i], &y[i], 4)))
                            bad++;
                    }
                }
                free(src);
                free(x);
                free(y);
                free(h1);
                free(h2);
                /* partial attention vs double */
                float s[67], o[130], lse;
                double sd[67], ro[130], rl;
                for (size_t i = 0; i < n; i++)
                    sd[i] = s[i] = 6.f * trng_gauss(&r);
                ra_kern_partial_attention(s, ids, n, 0.3f, rows, DT[d], dim, o, &lse);
                tattn(sd, ids, n, 0.3, rows, DT[d], dim, ro, &rl);
                if (!(fabs(lse - rl) <= 2e-5 * (1 + fabs(rl))))
                    bad++;
                for (int j = 0; j < dim; j++)
                    if (!(fabs(o[j] - ro[j]) <= 2e-5 * 5))
                        bad++;
                free(rows);
                free(q);
            }
        printf("self-check %-6s vs scalar and double: %s (%d mismatches)\n",
               ra_kern_isa_name((ra_isa)isa), bad ? "FAIL" : "PASS", bad);
        fails += bad != 0;
    }
    ra_kern_isa_set(ra_kern_isa_best());
    return fails;
}

int main(int argc, char **argv)
{
    size_t n = 131072;
    int dim = 128, k = 100, check = 0;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--check"))
            check = 1;
        else if (!strcmp(argv[i], "--n") && i + 1 < argc)
            n = strtoull(argv[++i], NULL, 10);
        else if (!strcmp(argv[i], "--dim") && i + 1 < argc)
            dim = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--k") && i + 1 < argc)
            k = atoi(argv[++i]);
    }
    ra_log_set_level(RA_LOG_WARN);
    printf("best ISA: %s\n", ra_kern_isa_name(ra_kern_isa_best()));
    int fails = self_check();
    if (check)
        return fails ? 1 : 0;
    trng r = {2};
    float *q = malloc(dim * 4), *out = malloc(n * 4), o[4096], lse;
    for (int j = 0; j < dim; j++)
        q[j] = trng_gauss(&r);
    int32_t *ids = malloc(k * 4);
    float *sc = malloc(k * 4);
    printf("%-7s %-5s %12s %10s %11s %15s %14s %14s %14s\n", "isa", "dtype", "scan Mrow/s",
           "scan GB/s", "attn us(k)", "head_attend us", "4x attend us", "batch(4) us",
           "faiss-flat us");
    for (int d = 0; d < 3; d++) {
        void *rows = tfill(&r, DT[d], n * dim, 1.f);
        void *vals = tfill(&r, DT[d], n * dim, 1.f);
        for (int isa = 0; isa <= (int)ra_kern_isa_best(); isa++) {
            ra_kern_isa_set((ra_isa)isa);
            int reps = isa == 0 ? 2 : 10;
            double ts = TIME_MIN(reps, ra_kern_dot_range(q, rows, DT[d], dim, 0, n, out));
            /* partial attention over k random rows of a big store: the gather dominates */
            int areps = 2000;
            double ta = 0;
            for (int rep = 0; rep < areps; rep++) {
                for (int i = 0; i < k; i++) {
                    ids[i] = (int32_t)(trng_u64(&r) % n);
                    sc[i] = trng_gauss(&r);
                }
                double a0 = ra_now_s();
                ra_kern_partial_attention(sc, ids, (size_t)k, 0.088f, vals, DT[d], dim, o, &lse);
                ta += ra_now_s() - a0;
            }
            ta /= areps;
            /* ra_head_attend on an unbuilt head: exact scan + top-k heap + attention */
            ra_head *h;
            ra_index_opts op;
            ra_index_opts_default(&op);
            op.kind = RA_INDEX_FLAT;
            ra_head_create(&h, dim, DT[d], &op, NULL);
            int64_t *pos = calloc(n, 8);
            ra_head_append(h, rows, vals, pos, n);
            free(pos);
            ra_search_params p = {.k = k};
            int hreps = isa == 0 ? 2 : 10, no;
            double th = TIME_MIN(hreps, ra_head_attend(h, q, &p, 0, o, &lse, NULL, NULL, &no, NULL));
            /* a GQA group of 4 query heads: 4 single calls vs one batch (exact path) */
            enum { G = 4 };
            float *qg = malloc(G * (size_t)dim * 4), *og = malloc(G * (size_t)dim * 4), lg[G];
            for (int j = 0; j < G * dim; j++)
                qg[j] = trng_gauss(&r);
            ra_search_params pg[G] = {{.k = k}, {.k = k}, {.k = k}, {.k = k}};
            double tg1 = TIME_MIN(hreps, for (int j = 0; j < G; j++) ra_head_attend(
                                             h, qg + j * dim, &pg[j], 0, og, lg, NULL, NULL, &no,
                                             NULL));
            double tgb =
                TIME_MIN(hreps, ra_head_attend_group(h, G, qg, pg, 0, 0, og, lg, NULL, NULL, NULL, NULL));
            free(qg);
            free(og);
            double tf = 0;
            if (isa == (int)ra_kern_isa_best()) { /* FAISS IndexFlatIP (fp32 copy) once built */
                ra_head_build(h, NULL, 0, 0);
                ra_head_attend(h, q, &p, 0, o, &lse, NULL, NULL, &no, NULL);
                tf = TIME_MIN(hreps, ra_head_attend(h, q, &p, 0, o, &lse, NULL, NULL, &no, NULL));
            }
            ra_head_destroy(h);
            printf("%-7s %-5s %12.1f %10.2f %11.2f %15.1f %14.1f %14.1f %14.1f\n",
                   ra_kern_isa_name((ra_isa)isa), ra_dtype_name(DT[d]), n / ts / 1e6,
                   n * (double)dim * ra_dtype_size(DT[d]) / ts / 1e9, ta * 1e6, th * 1e6,
                   tg1 * 1e6, tgb * 1e6, tf * 1e6);
        }
        free(rows);
        free(vals);
    }
    printf("(n %zu, dim %d, k %d, single thread, best of 10 runs; attn: mean of 2000 random "
           "k-row gathers)\n",
           n, dim, k);
    return fails ? 1 : 0;
}
