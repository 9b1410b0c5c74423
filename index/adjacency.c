/* The check of a graph in the wire form (ra_index.h, ra_graph_adj) before anything
 * installs it: the daemon runs it on an Offload's GRAPH_ADJ frame before it stores
 * anything, and the graph backend again where it installs one (whoever checked it
 * before). It knows nothing of the graph backend's internals, so it
 * exists in every build of index/, with or without the graph backend. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "ra_index.h"

static ra_status fault(ra_graph_fault *f, ra_graph_fault_kind kind, size_t row, int slot,
                       int64_t value)
{
    if (f)
        *f = (ra_graph_fault){.kind = kind, .row = row, .slot = slot, .value = value};
    return RA_EINVAL;
}

ra_status ra_graph_adj_check(const ra_graph_adj *a, ra_graph_fault *f, char *err, size_t errlen)
{
    ra_graph_fault tmp;
    if (!f)
        f = &tmp;
    *f = (ra_graph_fault){.kind = RA_GRAPH_FAULT_NONE, .slot = -1};
    if (err && errlen)
        err[0] = 0;
    if (!a || !a->adj || !a->entries || a->n < 1 || a->n > (size_t)INT32_MAX - 1) {
        if (err && errlen)
            snprintf(err, errlen, "graph of %zu keys: 1..%d keys and both arrays needed",
                     a ? a->n : 0, INT32_MAX - 1);
        return fault(f, RA_GRAPH_FAULT_SHAPE, 0, -1, a ? (int64_t)a->n : 0);
    }
    if (a->M < 1 || a->M > RA_GRAPH_MAX_DEGREE) {
        if (err && errlen)
            snprintf(err, errlen, "graph degree %d: 1..%d allowed", a->M, RA_GRAPH_MAX_DEGREE);
        return fault(f, RA_GRAPH_FAULT_SHAPE, 0, -1, a->M);
    }
    if (a->n_entries < 1 || a->n_entries > RA_GRAPH_MAX_ENTRIES) {
        if (err && errlen)
            snprintf(err, errlen, "%d graph entry points: 1..%d allowed", a->n_entries,
                     RA_GRAPH_MAX_ENTRIES);
        return fault(f, RA_GRAPH_FAULT_SHAPE, 0, -1, a->n_entries);
    }
    size_t n = a->n, M = (size_t)a->M;
    uint64_t *seen = calloc((n + 63) / 64, sizeof *seen);
    int32_t *mark = malloc(n * sizeof *mark); /* duplicates: the last row that named v */
    if (!seen || !mark) {
        free(seen);
        free(mark);
        if (err && errlen)
            snprintf(err, errlen, "out of memory checking a graph of %zu keys", n);
        return RA_ENOMEM;
    }
    ra_status st = RA_OK;
    for (int i = 0; i < a->n_entries; i++) {
        int32_t e = a->entries[i];
        if (e < 0 || (size_t)e >= n) {
            if (err && errlen)
                snprintf(err, errlen, "graph entry %d is %d: outside 0..%zu", i, e, n - 1);
            st = fault(f, RA_GRAPH_FAULT_ENTRY, 0, i, e);
            goto done;
        }
        if (seen[e >> 6] >> (e & 63) & 1) {
            if (err && errlen)
                snprintf(err, errlen, "graph entry %d repeats row %d", i, e);
            st = fault(f, RA_GRAPH_FAULT_ENTRY, 0, i, e);
            goto done;
        }
        seen[e >> 6] |= 1ull << (e & 63);
    }
    memset(mark, 0xff, n * sizeof *mark);
    for (size_t u = 0; u < n; u++) {
        const int32_t *row = a->adj + u * M;
        for (size_t j = 0; j < M; j++) {
            int32_t v = row[j];
            if (v == -1)
                continue;
            if (v < -1 || (size_t)v >= n) {
                if (err && errlen)
                    snprintf(err, errlen, "graph row %zu slot %zu is %d: outside -1..%zu", u, j, v,
                             n - 1);
                st = fault(f, RA_GRAPH_FAULT_RANGE, u, (int)j, v);
                goto done;
            }
            if ((size_t)v == u) {
                if (err && errlen)
                    snprintf(err, errlen, "graph row %zu slot %zu is the row itself (self edge)",
                             u, j);
                st = fault(f, RA_GRAPH_FAULT_SELF, u, (int)j, v);
                goto done;
            }
            if (mark[v] == (int32_t)u) {
                if (err && errlen)
                    snprintf(err, errlen,
                             "graph row %zu slot %zu repeats %d (an earlier slot of the row)", u,
                             j, v);
                st = fault(f, RA_GRAPH_FAULT_DUPLICATE, u, (int)j, v);
                goto done;
            }
            mark[v] = (int32_t)u;
        }
    }
    /* reachability: BFS from the entries (mark is the queue now) */
    size_t qh = 0, qt = 0;
    for (int i = 0; i < a->n_entries; i++)
        mark[qt++] = a->entries[i]; /* distinct and marked seen above */
    while (qh < qt) {
        const int32_t *row = a->adj + (size_t)mark[qh++] * M;
        for (size_t j = 0; j < M; j++) {
            int32_t v = row[j];
            if (v < 0 || (seen[v >> 6] >> (v & 63) & 1))
                continue;
            seen[v >> 6] |= 1ull << (v & 63);
            mark[qt++] = v;
        }
    }
    if (qt < n) {
        size_t first = 0;
        while (seen[first >> 6] >> (first & 63) & 1)
            first++;
        if (err && errlen)
            snprintf(err, errlen,
                     "graph row %zu is not reachable from the %d entry points (%zu of %zu keys "
                     "are not)",
                     first, a->n_entries, n - qt, n);
        st = fault(f, RA_GRAPH_FAULT_UNREACHABLE, first, -1, (int64_t)(n - qt));
    }
done:
    free(seen);
    free(mark);
    return st;
}

void ra_graph_adj_fini(ra_graph_adj *a)
{
    if (!a)
        return;
    free(a->adj);
    free(a->entries);
    memset(a, 0, sizeof *a);
}

