/* Symmetric eigen decomposition (ra_eig.h). The classic two steps (Wilkinson and
 * Reinsch's tred2 and tql2, as in EISPACK): Householder reflections reduce the matrix to
 * tridiagonal form while accumulating the orthogonal transform, then QL sweeps with
 * implicit shifts diagonalise the tridiagonal matrix, rotating the transform's columns
 * along. About 9 n^3 flops in all: ~2 ms at n = 128, where the cyclic Jacobi method it
 * replaced took ~70 ms (bench/README.md, "Thirteenth session"). */
#include "ra_eig.h"

#include <math.h>
#include <string.h>

/* v [n][n] holds the matrix on entry (row-major, symmetric); on return the orthogonal Q
 * with Q^T A Q tridiagonal, d its diagonal and e[1..n-1] its sub-diagonal (e[0] = 0). */
static void tridiagonalize(double *v, int n, double *d, double *e)
{
#define V(i, j) v[(size_t)(i) * (size_t)n + (size_t)(j)]
    for (int j = 0; j < n; j++)
        d[j] = V(n - 1, j);
    for (int i = n - 1; i > 0; i--) {
        double scale = 0, h = 0;
        for (int k = 0; k < i; k++)
            scale += fabs(d[k]);
        if (scale == 0) { /* the row is already reduced */
            e[i] = d[i - 1];
            for (int j = 0; j < i; j++) {
                d[j] = V(i - 1, j);
                V(i, j) = 0;
                V(j, i) = 0;
            }
        } else {
            /* the Householder vector of row i, scaled against under/overflow */
            for (int k = 0; k < i; k++) {
                d[k] /= scale;
                h += d[k] * d[k];
            }
            double f = d[i - 1], g = sqrt(h);
            if (f > 0)
                g = -g;
            e[i] = scale * g;
            h -= f * g;
            d[i - 1] = f - g;
            for (int j = 0; j < i; j++)
                e[j] = 0;
            /* p = A u / h into e */
            for (int j = 0; j < i; j++) {
                f = d[j];
                V(j, i) = f;
                g = e[j] + V(j, j) * f;
                for (int k = j + 1; k <= i - 1; k++) {
                    g += V(k, j) * d[k];
                    e[k] += V(k, j) * f;
                }
                e[j] = g;
            }
            f = 0;
            for (int j = 0; j < i; j++) {
                e[j] /= h;
                f += e[j] * d[j];
            }
            double hh = f / (h + h);
            for (int j = 0; j < i; j++)
                e[j] -= hh * d[j];
            /* A -= u q^T + q u^T on the lower triangle */
            for (int j = 0; j < i; j++) {
                f = d[j];
                g = e[j];
                for (int k = j; k <= i - 1; k++)
                    V(k, j) -= f * e[k] + g * d[k];
                d[j] = V(i - 1, j);
                V(i, j) = 0;
            }
        }
        d[i] = h;
    }
    /* accumulate the reflections into Q */
    for (int i = 0; i < n - 1; i++) {
        V(n - 1, i) = V(i, i);
        V(i, i) = 1;
        double h = d[i + 1];
        if (h != 0) {
            for (int k = 0; k <= i; k++)
                d[k] = V(k, i + 1) / h;
            for (int j = 0; j <= i; j++) {
                double g = 0;
                for (int k = 0; k <= i; k++)
                    g += V(k, i + 1) * V(k, j);
                for (int k = 0; k <= i; k++)
                    V(k, j) -= g * d[k];
            }
        }
        for (int k = 0; k <= i; k++)
            V(k, i + 1) = 0;
    }
    for (int j = 0; j < n; j++) {
        d[j] = V(n - 1, j);
        V(n - 1, j) = 0;
    }
    V(n - 1, n - 1) = 1;
    e[0] = 0;
}

/* The tridiagonal matrix (d, e) diagonalised in place by implicit QL; v's columns are
 * rotated along, so that on return A v_j = d_j v_j. -1 if an eigenvalue needed more than
 * 60 sweeps (only non-finite input does; a few are the rule). */
static int ql_implicit(double *v, int n, double *d, double *e)
{
    for (int i = 1; i < n; i++)
        e[i - 1] = e[i];
    e[n - 1] = 0;
    double f = 0, tst1 = 0;
    const double eps = 0x1p-52;
    for (int l = 0; l < n; l++) {
        double t = fabs(d[l]) + fabs(e[l]);
        tst1 = t > tst1 ? t : tst1;
        int m = l;
        while (m < n - 1 && !(fabs(e[m]) <= eps * tst1)) /* the first negligible e[m] */
            m++;
        if (m > l) {
            int iter = 0;
            do {
                if (++iter > 60)
                    return -1;
                /* the shift from the leading 2 x 2 block */
                double g = d[l];
                double p = (d[l + 1] - g) / (2 * e[l]);
                double r = hypot(p, 1.0);
                if (p < 0)
                    r = -r;
                d[l] = e[l] / (p + r);
                d[l + 1] = e[l] * (p + r);
                double dl1 = d[l + 1], h = g - d[l];
                for (int i = l + 2; i < n; i++)
                    d[i] -= h;
                f += h;
                /* the QL sweep from m up to l */
                p = d[m];
                double c = 1, c2 = 1, c3 = 1, el1 = e[l + 1], s = 0, s2 = 0;
                for (int i = m - 1; i >= l; i--) {
                    c3 = c2;
                    c2 = c;
                    s2 = s;
                    g = c * e[i];
                    h = c * p;
                    r = hypot(p, e[i]);
                    e[i + 1] = s * r;
                    s = e[i] / r;
                    c = p / r;
                    p = c * d[i] - s * g;
                    d[i + 1] = h + s * (c * g + s * d[i]);
                    for (int k = 0; k < n; k++) {
                        h = V(k, i + 1);
                        V(k, i + 1) = s * V(k, i) + c * h;
                        V(k, i) = c * V(k, i) - s * h;
                    }
                }
                p = -s * s2 * c3 * el1 * (e[l] / dl1); /* |e[l] / dl1| <= 1: no overflow */
                e[l] = s * p;
                d[l] = c * p;
            } while (!(fabs(e[l]) <= eps * tst1));
        }
        d[l] += f;
        e[l] = 0;
    }
    return 0;
#undef V
}

int ra_eig_sym(double *a, int n, double *w, double *v)
{
    memcpy(v, a, (size_t)n * (size_t)n * sizeof *v);
    double *e = a; /* a's first row: free once copied */
    tridiagonalize(v, n, w, e);
    if (ql_implicit(v, n, w, e) != 0)
        return -1;
    for (int i = 0; i < n; i++) /* a non-finite diagonal alone converges to itself */
        if (!isfinite(w[i]))
            return -1;
    for (int i = 0; i < n; i++) { /* selection sort, descending; the columns follow */
        int m = i;
        for (int j = i + 1; j < n; j++)
            if (w[j] > w[m])
                m = j;
        if (m == i)
            continue;
        double t = w[i];
        w[i] = w[m], w[m] = t;
        for (int k = 0; k < n; k++) {
            t = v[(size_t)k * n + i];
            v[(size_t)k * n + i] = v[(size_t)k * n + m], v[(size_t)k * n + m] = t;
        }
    }
    return 0;
}
