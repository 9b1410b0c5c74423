/* Symmetric eigen decomposition in double (index/eig.c): Householder reduction to a
 * tridiagonal matrix, then the implicit QL iteration with Wilkinson shifts, O(n^3) with
 * a small constant (the projected-code scan's build calls it twice a head at n = dim). */
#ifndef RA_EIG_H
#define RA_EIG_H

/* a [n][n] symmetric, row-major (destroyed): the
 * eigenvalues into w[n], descending, and the eigenvectors as the columns of v [n][n]
 * (v[i * n + j]: component i of vector j), orthonormal. 0 on success, -1 when the QL
 * iteration did not converge within 60 steps for some eigenvalue or an eigenvalue is not
 * finite (a non-finite input does one or the other): w and v are then unspecified.
 * n >= 1; a and v must not overlap. */
int ra_eig_sym(double *a, int n, double *w, double *v);

#endif
