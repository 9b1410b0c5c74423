/* Sorting for the graph build (internal to index/graph*.c): every order the build needs
 * (candidates by distance then id, edges by target then source, co-answers by count then
 * id) is a total order on distinct 64-bit keys, so these sorts give exactly what qsort
 * with the matching comparator gave, without a function call per comparison (qsort and
 * its comparators were 7 % of a 131K build). Small arrays: introsort on the keys; large
 * ones: LSD radix sort by 16-bit digits, skipping digits that are the same everywhere. */
#ifndef RA_GRAPH_SORT_H
#define RA_GRAPH_SORT_H

#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* A float's bits mapped so that unsigned order is numeric order (-0 and +0 equal). */
static inline uint32_t g_f32_key(float f)
{
    f += 0.0f; /* -0 -> +0 */
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    return u & 0x80000000u ? ~u : u | 0x80000000u;
}

static inline float g_f32_unkey(uint32_t k)
{
    uint32_t u = k & 0x80000000u ? k & 0x7fffffffu : ~k;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

static inline void g_isort_u64(uint64_t *a, size_t n)
{
    for (size_t i = 1; i < n; i++) {
        uint64_t x = a[i];
        size_t j = i;
        while (j > 0 && a[j - 1] > x) {
            a[j] = a[j - 1];
            j--;
        }
        a[j] = x;
    }
}

static inline void g_sift_u64(uint64_t *a, size_t n, size_t i)
{
    uint64_t x = a[i];
    for (;;) {
        size_t c = 2 * i + 1;
        if (c >= n)
            break;
        if (c + 1 < n && a[c + 1] > a[c])
            c++;
        if (a[c] <= x)
            break;
        a[i] = a[c];
        i = c;
    }
    a[i] = x;
}

static inline void g_heapsort_u64(uint64_t *a, size_t n)
{
    for (size_t i = n / 2; i-- > 0;)
        g_sift_u64(a, n, i);
    for (size_t e = n; e > 1; e--) {
        uint64_t x = a[0];
        a[0] = a[e - 1];
        a[e - 1] = x;
        g_sift_u64(a, e - 1, 0);
    }
}

/* Hoare partition of a[0..n), n >= 2, around the median of three: returns m, 0 < m < n,
 * with a[0..m) <= pivot <= a[m..n). */
static inline size_t g_partition_u64(uint64_t *a, size_t n)
{
    uint64_t x = a[0], y = a[n / 2], z = a[n - 1];
    uint64_t p = x < y ? (y < z ? y : x < z ? z : x) : (x < z ? x : y < z ? z : y);
    size_t i = 0, j = n - 1;
    for (;;) {
        while (a[i] < p)
            i++;
        while (a[j] > p)
            j--;
        if (i >= j)
            break;
        uint64_t t = a[i];
        a[i] = a[j];
        a[j] = t;
        i++;
        j--;
    }
    return j + 1;
}

static inline void g_introsort_u64(uint64_t *a, size_t n, int depth)
{
    while (n > 24) {
        if (depth-- == 0) {
            g_heapsort_u64(a, n);
            return;
        }
        /* [0, left) <= p <= [left, n): recurse into the smaller part */
        size_t left = g_partition_u64(a, n);
        if (left < n - left) {
            g_introsort_u64(a, left, depth);
            a += left;
            n -= left;
        } else {
            g_introsort_u64(a + left, n - left, depth);
            n = left;
        }
    }
    g_isort_u64(a, n);
}

/* LSD radix sort of a[0..n) by 16-bit digits through tmp[n] (the result is in a). */
static inline void g_radix_u64(uint64_t *a, uint64_t *tmp, size_t n)
{
    uint64_t all_or = 0, all_and = ~(uint64_t)0;
    for (size_t i = 0; i < n; i++) {
        all_or |= a[i];
        all_and &= a[i];
    }
    size_t *cnt = malloc(65536 * sizeof *cnt);
    if (!cnt) { /* no scratch: sort in place */
        g_introsort_u64(a, n, 128);
        return;
    }
    uint64_t *src = a, *dst = tmp;
    for (int shift = 0; shift < 64; shift += 16) {
        if ((((all_or ^ all_and) >> shift) & 0xffff) == 0)
            continue; /* the same digit everywhere */
        memset(cnt, 0, 65536 * sizeof *cnt);
        for (size_t i = 0; i < n; i++)
            cnt[(src[i] >> shift) & 0xffff]++;
        size_t s = 0;
        for (size_t d = 0; d < 65536; d++) {
            size_t c = cnt[d];
            cnt[d] = s;
            s += c;
        }
        for (size_t i = 0; i < n; i++)
            dst[cnt[(src[i] >> shift) & 0xffff]++] = src[i];
        uint64_t *t = src;
        src = dst;
        dst = t;
    }
    if (src != a)
        memcpy(a, src, n * sizeof *a);
    free(cnt);
}

/* Rearranges a[0..n) so that a[0..k) are its k smallest (in no order), k <= n. */
static inline void g_select_u64(uint64_t *a, size_t n, size_t k)
{
    size_t lo = 0, hi = n; /* the k-th smallest is in [lo, hi) */
    while (hi - lo > 24 && k > lo && k < hi) {
        size_t mid = lo + g_partition_u64(a + lo, hi - lo); /* [lo, mid) <= [mid, hi) */
        if (k <= mid)
            hi = mid;
        else
            lo = mid;
    }
    if (k > lo && k < hi)
        g_isort_u64(a + lo, hi - lo);
}

/* Sorts a[0..n) ascending; tmp (may be NULL) holds n keys for the radix path. */
static inline void g_sort_u64(uint64_t *a, size_t n, uint64_t *tmp)
{
    if (n < 2)
        return;
    if (tmp && n >= 4096)
        g_radix_u64(a, tmp, n);
    else
        g_introsort_u64(a, n, 2 * 64);
}

#endif
