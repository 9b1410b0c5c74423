/* The one table of index option bounds and defaults (ra_index.h). The daemon checks a
 * CreateSession against it, ra_head_create refuses what it refuses, ra_head fills zero
 * fields from it and the graph backend reads its defaults from it, so that a value
 * accepted at the door is never refused later inside a background build. Bounds are
 * where a backend stops working: graph degree is one byte per node (255), HNSW below
 * M 4 makes FAISS's construction loop without end, and above 128 its level arrays only
 * grow without better recall. */
#include <stdio.h>
#include <string.h>

#include "ra_index.h"

#define OFF(f) offsetof(ra_index_opts, f)

static const ra_index_opt_def g_defs[] = {
    {"kind", OFF(kind), 0, RA_INDEX_PSCAN, RA_INDEX_GRAPH, "graph",
     "0 graph, 1 flat, 2 ivf, 3 hnsw, 4 faiss-flat, 5 pscan"},
    {"graph_knn", OFF(graph_knn), 1, 1024, 100, "100",
     "graph: exact top-K keys per training query"},
    {"graph_degree", OFF(graph_degree), 2, 255, 48, "48", "graph: max out-degree M"},
    {"graph_build_ef", OFF(graph_build_ef), 1, 4096, 128, "128",
     "graph: candidate list when inserting keys"},
    {"graph_entries", OFF(graph_entries), 1, 1024, 16, "16", "graph: entry points"},
    {"n_train", OFF(n_train), 1, 1000000, 8192, "8192",
     "training queries used per KV head (sampled)"},
    {"ivf_nlist", OFF(ivf_nlist), 1, 1 << 20, 0, "about 4 sqrt(keys)", "ivf: lists"},
    {"hnsw_m", OFF(hnsw_m), 4, 128, 32, "32", "hnsw: M"},
    {"threads", OFF(threads), 1, 256, 0, "every core", "build threads"},
};
#define N_DEFS (sizeof g_defs / sizeof g_defs[0])

const ra_index_opt_def *ra_index_opt_table(int *n)
{
    *n = (int)N_DEFS;
    return g_defs;
}

static int *field(ra_index_opts *o, const ra_index_opt_def *d)
{
    return (int *)((char *)o + d->offset);
}

static int value(const ra_index_opts *o, const ra_index_opt_def *d)
{
    int v;
    memcpy(&v, (const char *)o + d->offset, sizeof v); /* kind is an enum of int size */
    return v;
}

void ra_index_opts_default(ra_index_opts *o)
{
    memset(o, 0, sizeof *o);
    ra_index_opts_fill(o);
}

void ra_index_opts_fill(ra_index_opts *o)
{
    for (size_t i = 0; i < N_DEFS; i++)
        if (value(o, &g_defs[i]) == 0)
            *field(o, &g_defs[i]) = g_defs[i].def;
    if (o->seed == 0)
        o->seed = 1;
}

ra_status ra_index_opts_check(const ra_index_opts *o, char *err, size_t errlen)
{
    for (size_t i = 0; i < N_DEFS; i++) {
        const ra_index_opt_def *d = &g_defs[i];
        int v = value(o, d);
        if (v == 0 || (v >= d->min && v <= d->max))
            continue;
        if (err && errlen)
            snprintf(err, errlen, "index option %s = %d is out of range: %d..%d, or 0 for %s (%s)",
                     d->name, v, d->min, d->max, d->zero, d->help);
        return RA_EINVAL;
    }
    return RA_OK;
}
