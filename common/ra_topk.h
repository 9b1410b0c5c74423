/* A bounded top-k of (score, id) pairs, shared by the exact scans of index/ and the
 * CPU backend's kNN in gpu/. Order: higher score first, ties by lower id, so every
 * exact path of ratd returns the same set and order. While filling, the arrays hold a
 * heap whose root is the worst pair kept; ra_topk_finish sorts them best first. */
#ifndef RA_TOPK_H
#define RA_TOPK_H

#include <stdint.h>

/* a ranks after b */
static inline int ra_topk_worse(float sa, int32_t ia, float sb, int32_t ib)
{
    return sa < sb || (sa == sb && ia > ib);
}

static inline void ra_topk_swap(float *s, int32_t *id, int a, int b)
{
    float ts = s[a];
    s[a] = s[b];
    s[b] = ts;
    int32_t ti = id[a];
    id[a] = id[b];
    id[b] = ti;
}

static inline void ra_topk_sift_down(float *s, int32_t *id, int n, int i)
{
    for (;;) {
        int l = 2 * i + 1, r = l + 1, m = i;
        if (l < n && ra_topk_worse(s[l], id[l], s[m], id[m]))
            m = l;
        if (r < n && ra_topk_worse(s[r], id[r], s[m], id[m]))
            m = r;
        if (m == i)
            return;
        ra_topk_swap(s, id, i, m);
        i = m;
    }
}

static inline void ra_topk_sift_up(float *s, int32_t *id, int i)
{
    while (i > 0) {
        int p = (i - 1) / 2;
        if (!ra_topk_worse(s[i], id[i], s[p], id[p]))
            return;
        ra_topk_swap(s, id, i, p);
        i = p;
    }
}

/* Offers (sc, i) to the heap of *cnt <= k pairs held in s / id. */
static inline void ra_topk_push(float *s, int32_t *id, int *cnt, int k, float sc, int32_t i)
{
    if (*cnt < k) {
        s[*cnt] = sc;
        id[*cnt] = i;
        ra_topk_sift_up(s, id, *cnt);
        (*cnt)++;
    } else if (k > 0 && ra_topk_worse(s[0], id[0], sc, i)) {
        s[0] = sc;
        id[0] = i;
        ra_topk_sift_down(s, id, k, 0);
    }
}

/* Heap sort of the cnt pairs kept: best first. */
static inline void ra_topk_finish(float *s, int32_t *id, int cnt)
{
    for (int e = cnt - 1; e > 0; e--) {
        ra_topk_swap(s, id, 0, e);
        ra_topk_sift_down(s, id, e, 0);
    }
}

#endif
