/* ra_eig_sym (index/eig.c), the projected-code scan's eigen decomposition, against an
 * independent method: the eigenvalues must equal a cyclic Jacobi decomposition's (the
 * method it replaced) to 1e-10 of the largest, come out descending, and the vectors must
 * satisfy A v = w v to 1e-10 of |A| and be orthonormal to 1e-12; on random symmetric
 * matrices of 12 sizes from 1 to 128, on repeated eigenvalues (the identity, a rank-one
 * matrix), an unsorted diagonal, a tridiagonal matrix and a zero matrix. A NaN gets -1. */
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "ra_eig.h"

/* the reference: cyclic Jacobi rotations until the off-diagonal mass is negligible */
static void jacobi(double *a, int n, double *w)
{
    for (int sweep = 0; sweep < 100; sweep++) {
        double off = 0, diag = 0;
        for (int i = 0; i < n; i++) {
            diag += a[i * n + i] * a[i * n + i];
            for (int j = i + 1; j < n; j++)
                off += a[i * n + j] * a[i * n + j];
        }
        if (off <= 1e-30 * diag || off == 0)
            break;
        for (int p = 0; p < n; p++)
            for (int q = p + 1; q < n; q++) {
                double apq = a[p * n + q];
                if (fabs(apq) < 1e-300)
                    continue;
                double th = (a[q * n + q] - a[p * n + p]) / (2 * apq);
                double t = (th >= 0 ? 1 : -1) / (fabs(th) + sqrt(th * th + 1));
                double c = 1 / sqrt(t * t + 1), s = t * c;
                for (int k = 0; k < n; k++) {
                    double akp = a[k * n + p], akq = a[k * n + q];
                    a[k * n + p] = c * akp - s * akq;
                    a[k * n + q] = s * akp + c * akq;
                }
                for (int k = 0; k < n; k++) {
                    double apk = a[p * n + k], aqk = a[q * n + k];
                    a[p * n + k] = c * apk - s * aqk;
                    a[q * n + k] = s * apk + c * aqk;
                }
            }
    }
    for (int i = 0; i < n; i++)
        w[i] = a[i * n + i];
    for (int i = 0; i < n; i++) /* descending */
        for (int j = i + 1; j < n; j++)
            if (w[j] > w[i]) {
                double t = w[i];
                w[i] = w[j], w[j] = t;
            }
}

static uint64_t g_rng = 88172645463325252ull;
static double urand(void) /* (-1, 1) */
{
    g_rng ^= g_rng << 13, g_rng ^= g_rng >> 7, g_rng ^= g_rng << 17;
    return (double)(g_rng >> 11) * 0x1p-52 - 1.0;
}

/* decomposes a (n x n, symmetric) and checks it against the reference */
static void check(const double *a, int n, const char *what)
{
    size_t nn = (size_t)n * n;
    double *w = malloc(n * sizeof *w), *v = malloc(nn * sizeof *v), *c = malloc(nn * sizeof *c);
    double *wr = malloc(n * sizeof *wr), *cr = malloc(nn * sizeof *cr);
    assert_non_null(w), assert_non_null(v), assert_non_null(c), assert_non_null(wr),
        assert_non_null(cr);
    memcpy(c, a, nn * sizeof *c);
    memcpy(cr, a, nn * sizeof *cr);
    assert_int_equal(ra_eig_sym(c, n, w, v), 0);
    jacobi(cr, n, wr);
    double norm = 0; /* Frobenius */
    for (size_t i = 0; i < nn; i++)
        norm += a[i] * a[i];
    norm = sqrt(norm);
    double scale = norm > 0 ? norm : 1;
    for (int j = 0; j < n; j++) {
        if (fabs(w[j] - wr[j]) > 1e-10 * scale)
            fail_msg("%s n %d: eigenvalue %d is %.17g, Jacobi %.17g", what, n, j, w[j], wr[j]);
        if (j && w[j] > w[j - 1])
            fail_msg("%s n %d: eigenvalues not descending at %d", what, n, j);
        double res = 0;
        for (int i = 0; i < n; i++) {
            double x = -w[j] * v[(size_t)i * n + j];
            for (int k = 0; k < n; k++)
                x += a[(size_t)i * n + k] * v[(size_t)k * n + j];
            res += x * x;
        }
        if (sqrt(res) > 1e-10 * scale)
            fail_msg("%s n %d: |A v - w v| = %g for vector %d", what, n, sqrt(res), j);
        for (int l = 0; l <= j; l++) {
            double d = 0;
            for (int i = 0; i < n; i++)
                d += v[(size_t)i * n + j] * v[(size_t)i * n + l];
            if (fabs(d - (l == j)) > 1e-12)
                fail_msg("%s n %d: v%d . v%d = %.3g", what, n, j, l, d);
        }
    }
    free(w), free(v), free(c), free(wr), free(cr);
}

static double *sym_random(int n, double diag_boost)
{
    double *a = malloc((size_t)n * n * sizeof *a);
    assert_non_null(a);
    for (int i = 0; i < n; i++)
        for (int j = 0; j <= i; j++)
            a[i * n + j] = a[j * n + i] = urand() + (i == j ? diag_boost : 0);
    return a;
}

static void test_random(void **state)
{
    (void)state;
    static const int sizes[] = {1, 2, 3, 4, 5, 7, 8, 16, 31, 64, 100, 128};
    for (size_t s = 0; s < sizeof sizes / sizeof *sizes; s++) {
        double *a = sym_random(sizes[s], 0);
        check(a, sizes[s], "random");
        free(a);
        a = sym_random(sizes[s], 50); /* positive definite, clustered */
        check(a, sizes[s], "shifted");
        free(a);
    }
}

/* a covariance-like matrix: B B^T with a decaying spectrum, as the build's are */
static void test_covariance(void **state)
{
    (void)state;
    int n = 128, m = 300;
    double *b = malloc((size_t)n * m * sizeof *b), *a = calloc((size_t)n * n, sizeof *a);
    assert_non_null(b), assert_non_null(a);
    for (int i = 0; i < n; i++)
        for (int k = 0; k < m; k++)
            b[i * m + k] = urand() * exp(-0.05 * i);
    for (int i = 0; i < n; i++)
        for (int j = 0; j < n; j++)
            for (int k = 0; k < m; k++)
                a[i * n + j] += b[i * m + k] * b[j * m + k] / m;
    check(a, n, "covariance");
    free(a), free(b);
}

static void test_special(void **state)
{
    (void)state;
    enum { n = 24 };
    double a[n * n];
    memset(a, 0, sizeof a);
    check(a, n, "zero");
    for (int i = 0; i < n; i++)
        a[i * n + i] = 1;
    check(a, n, "identity");
    memset(a, 0, sizeof a);
    for (int i = 0; i < n; i++)
        a[i * n + i] = (double)((i * 7) % n) - 5; /* unsorted, distinct */
    check(a, n, "diagonal");
    double u[n];
    for (int i = 0; i < n; i++)
        u[i] = urand();
    for (int i = 0; i < n; i++)
        for (int j = 0; j < n; j++)
            a[i * n + j] = u[i] * u[j]; /* rank one: n - 1 zero eigenvalues */
    check(a, n, "rank one");
    memset(a, 0, sizeof a);
    for (int i = 0; i < n; i++) {
        a[i * n + i] = 2;
        if (i + 1 < n)
            a[i * n + i + 1] = a[(i + 1) * n + i] = -1;
    }
    check(a, n, "tridiagonal");
}

static void test_nan(void **state)
{
    (void)state;
    enum { n = 6 };
    double a[n * n], w[n], v[n * n];
    for (int i = 0; i < n * n; i++)
        a[i] = 1;
    a[2 * n + 3] = a[3 * n + 2] = NAN;
    assert_int_equal(ra_eig_sym(a, n, w, v), -1);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_random),
        cmocka_unit_test(test_covariance),
        cmocka_unit_test(test_special),
        cmocka_unit_test(test_nan),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
