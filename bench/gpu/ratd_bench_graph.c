/* ratd-bench-graph: the index graph of one layer built by gpu/ (ra_gpu_graph_build) against
 * ratd's own CPU build, on the calibrated synthetic generator (bench/index/synth.h): the
 * build time of every KV head on the chosen backend (host tensors in, adjacency out:
 * transfers included), the CPU index build of one head (ra_head_build, every core), and
 * recall@100 of both graphs at the same search efforts on that head's decode queries.
 * The heads differ by seed when --distinct (else one head's data is built --heads times,
 * which times the build alike and saves the generator's minutes). --json writes one
 * object. Shape defaults: Llama-3-8B at 128K (8 KV heads, 4 query heads each, dim 128). */
#include <getopt.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "ra_half.h"
#include "ra_index.h"
#include "ra_log.h"
#include "ratd/gpu.h"
#include "synth.h"

static void usage(void)
{
    fprintf(stderr,
            "usage: ratd-bench-graph [--keys N] [--heads H] [--group G] [--train Q] [--dim D]\n"
            "  [--degree M] [--knn K] [--key-knn L] [--queries NQ] [--backend cpu|cuda]\n"
            "  [--no-cpu-build] [--distinct] [--json FILE]\n");
}

static uint16_t *bf16_of(const float *f, size_t n)
{
    uint16_t *b = ra_gpu_host_alloc(n * sizeof *b);
    if (!b)
        abort();
    for (size_t i = 0; i < n; i++)
        b[i] = ra_f32_to_bf16(f[i]);
    return b;
}

/* the TOPK-th exact score of each query over the bf16 keys (double precision) */
static void thresholds(const uint16_t *kb, size_t n, int dim, const float *q, size_t nq, int k,
                       float *thr)
{
    float *kf = malloc(n * (size_t)dim * sizeof *kf);
    for (size_t i = 0; i < n * (size_t)dim; i++)
        kf[i] = ra_bf16_to_f32(kb[i]);
#pragma omp parallel for schedule(dynamic)
    for (size_t i = 0; i < nq; i++) {
        float *s = malloc(n * sizeof *s);
        for (size_t j = 0; j < n; j++) {
            double a = 0;
            for (int d = 0; d < dim; d++)
                a += (double)q[i * dim + d] * kf[j * dim + d];
            s[j] = (float)a;
        }
        /* k-th largest: k passes of partial selection */
        for (int t = 0; t < k; t++) {
            size_t b = (size_t)t;
            for (size_t j = (size_t)t + 1; j < n; j++)
                if (s[j] > s[b])
                    b = j;
            float x = s[t];
            s[t] = s[b];
            s[b] = x;
        }
        thr[i] = s[k - 1];
        free(s);
    }
    free(kf);
}

static double recall(ra_head *h, const float *q, size_t nq, int dim, const float *thr, int k,
                     int effort, double *scanned)
{
    int32_t *ids = malloc((size_t)k * sizeof *ids);
    float *sc = malloc((size_t)k * sizeof *sc);
    double hit = 0, sum = 0;
    for (size_t i = 0; i < nq; i++) {
        ra_search_params p = {.k = k, .effort = effort};
        ra_search_stats st;
        int got = 0;
        if (ra_head_search(h, q + i * dim, &p, ids, sc, &got, &st) != RA_OK)
            continue;
        int c = 0;
        for (int a = 0; a < got; a++)
            c += sc[a] >= thr[i] - 1e-3f * (fabsf(thr[i]) + 1.0f);
        hit += c < k ? c : k;
        sum += (double)st.scanned;
    }
    free(ids);
    free(sc);
    *scanned = sum / (double)nq;
    return hit / ((double)nq * k);
}

static ra_head *head_with_keys(const uint16_t *kb, size_t n, int dim, int threads)
{
    ra_index_opts o;
    ra_index_opts_default(&o);
    o.kind = RA_INDEX_GRAPH;
    o.threads = threads;
    ra_head *h = NULL;
    if (ra_head_create(&h, dim, RA_DTYPE_BF16, &o, NULL) != RA_OK)
        return NULL;
    int64_t *pos = malloc(n * sizeof *pos);
    for (size_t i = 0; i < n; i++)
        pos[i] = (int64_t)i;
    ra_status s = ra_head_append(h, kb, kb, pos, n);
    free(pos);
    if (s != RA_OK) {
        ra_head_destroy(h);
        return NULL;
    }
    return h;
}

typedef struct head_data {
    ra_synth grp[RA_SYNTH_MAX_GROUP];
    int group;
    uint16_t *kb, *qb; /* bf16 keys, training queries of every query head */
    float *tq, *dq;    /* fp32 training queries, decode queries (query head 0) */
} head_data;

/* the data of KV head h (seed 1 + h), its `group` query heads; returns seconds */
static double make_head(head_data *d, int h, size_t n, int dim, size_t per_q, int group,
                        size_t nqd)
{
    double t0 = ra_now_s();
    for (int i = 0; i < d->group; i++)
        ra_synth_free(&d->grp[i]);
    ra_gpu_host_free(d->kb);
    ra_gpu_host_free(d->qb);
    free(d->tq);
    free(d->dq);
    ra_synth_opts o;
    ra_synth_opts_default(&o);
    o.n = n;
    o.dim = dim;
    o.n_train = per_q;
    o.n_queries = nqd;
    o.seed = 1 + (uint64_t)h;
    uint64_t qs[RA_SYNTH_MAX_GROUP];
    for (int i = 0; i < group; i++)
        qs[i] = (uint64_t)i;
    if (ra_synth_make_group(&o, group, qs, d->grp) != RA_OK) {
        fprintf(stderr, "ratd-bench-graph: the generator failed\n");
        exit(1);
    }
    d->group = group;
    size_t nt = per_q * (size_t)group;
    d->tq = malloc(nt * dim * sizeof *d->tq);
    for (int i = 0; i < group; i++)
        memcpy(d->tq + (size_t)i * per_q * dim, d->grp[i].train_q, per_q * dim * sizeof *d->tq);
    d->dq = malloc(nqd * dim * sizeof *d->dq);
    memcpy(d->dq, d->grp[0].queries, nqd * dim * sizeof *d->dq);
    d->kb = bf16_of(d->grp[0].keys, n * dim);
    d->qb = bf16_of(d->tq, nt * dim);
    return ra_now_s() - t0;
}

static int build_one(ra_gpu_cache *c, const head_data *d, size_t n, size_t nt, int dim,
                     const ra_gpu_graph_params *p, int32_t *adj, int32_t *entries, unsigned *ne,
                     ra_gpu_graph_stats *st, const char *backend, int h, double *secs)
{
    double t0 = ra_now_s();
    ra_status s = ra_gpu_graph_build(c, RA_GPU_MEM_HOST, RA_DTYPE_BF16, d->kb, n, d->qb, nt,
                                     (unsigned)dim, p, adj, entries, ne, st);
    *secs = ra_now_s() - t0;
    if (s != RA_OK) {
        fprintf(stderr, "graph build of head %d: %s: %s\n", h, ra_strerror(s),
                ra_gpu_cache_last_error(c));
        return 1;
    }
    fprintf(stderr,
            "head %d: %s build %.3f s (knn %.3f, key->key %.3f, projection %.3f, reverse %.3f, "
            "copy %.3f, connect %.3f; %zu forced edges, %.0f MiB device)\n",
            h, backend, *secs, st->knn_s, st->key_knn_s, st->project_s, st->reverse_s,
            st->copy_s, st->connect_s, st->forced_edges, (double)st->device_bytes / 1048576.0);
    return 0;
}

int main(int argc, char **argv)
{
    size_t n = 131072, per_q = 4096, nqd = 200;
    int heads = 8, group = 4, dim = 128, cpu_build = 1, distinct = 0;
    unsigned M = 48, K = 100, L = 64;
    const char *json = NULL, *backend = "cuda";
    static const struct option lo[] = {
        {"keys", 1, 0, 'n'},    {"heads", 1, 0, 'H'},   {"group", 1, 0, 'g'},
        {"train", 1, 0, 't'},   {"dim", 1, 0, 'd'},     {"degree", 1, 0, 'M'},
        {"knn", 1, 0, 'K'},     {"key-knn", 1, 0, 'L'}, {"queries", 1, 0, 'q'},
        {"backend", 1, 0, 'b'}, {"json", 1, 0, 'j'},    {"no-cpu-build", 0, 0, 'C'},
        {"distinct", 0, 0, 'D'}, {"help", 0, 0, 'h'},   {0, 0, 0, 0}};
    int ch;
    while ((ch = getopt_long(argc, argv, "", lo, NULL)) != -1) {
        switch (ch) {
        case 'n': n = strtoull(optarg, NULL, 10); break;
        case 'H': heads = atoi(optarg); break;
        case 'g': group = atoi(optarg); break;
        case 't': per_q = strtoull(optarg, NULL, 10); break;
        case 'd': dim = atoi(optarg); break;
        case 'M': M = (unsigned)atoi(optarg); break;
        case 'K': K = (unsigned)atoi(optarg); break;
        case 'L': L = (unsigned)atoi(optarg); break;
        case 'q': nqd = strtoull(optarg, NULL, 10); break;
        case 'b': backend = optarg; break;
        case 'j': json = optarg; break;
        case 'C': cpu_build = 0; break;
        case 'D': distinct = 1; break;
        default: usage(); return ch == 'h' ? 0 : 2;
        }
    }
    if (n < 2 || heads < 1 || group < 1 || group > RA_SYNTH_MAX_GROUP || dim < 2) {
        usage();
        return 2;
    }
    int cores = (int)sysconf(_SC_NPROCESSORS_ONLN);
    ra_gpu_config cfg;
    ra_gpu_config_init(&cfg);
    cfg.n_layers = 1;
    cfg.n_q_heads = cfg.n_kv_heads = 1;
    cfg.head_dim = (unsigned)dim;
    cfg.dtype = RA_DTYPE_BF16;
    cfg.window = 1;
    cfg.batch = 1;
    cfg.backend = strcmp(backend, "cpu") == 0 ? RA_GPU_BACKEND_CPU : RA_GPU_BACKEND_CUDA;
    ra_gpu_cache *c = NULL;
    ra_status s = ra_gpu_cache_create(&cfg, &c);
    if (s != RA_OK) {
        fprintf(stderr, "ratd-bench-graph: no %s cache: %s\n", backend, ra_strerror(s));
        return 1;
    }
    size_t nt = per_q * (size_t)group;
    double gen_s = 0, rest_s = 0, first_s = 0;
    ra_gpu_graph_stats last;
    memset(&last, 0, sizeof last);
    int32_t *adj = malloc(n * M * sizeof *adj), entries[1024];
    unsigned ne = 0;
    head_data hd;
    memset(&hd, 0, sizeof hd);
    ra_gpu_graph_params p;
    ra_gpu_graph_params_init(&p);
    p.degree = M;
    p.knn = K;
    p.key_knn = L;
    /* head 0: build, install, ratd's own CPU build, recall of both at the same efforts */
    gen_s += make_head(&hd, 0, n, dim, per_q, group, nqd);
    if (build_one(c, &hd, n, nt, dim, &p, adj, entries, &ne, &last, backend, 0, &first_s))
        return 1;
    float *thr = malloc(nqd * sizeof *thr);
    double tt = ra_now_s();
    thresholds(hd.kb, n, dim, hd.dq, nqd, 100, thr);
    fprintf(stderr, "exact thresholds: %.1f s\n", ra_now_s() - tt);
    ra_head *hg = head_with_keys(hd.kb, n, dim, cores), *hc = NULL;
    ra_graph_adj a = {.n = n, .M = (int)M, .adj = adj, .n_entries = (int)ne, .entries = entries};
    char err[256];
    ra_status cs = ra_graph_adj_check(&a, NULL, err, sizeof err);
    if (cs != RA_OK)
        fprintf(stderr, "graph refused: %s\n", err);
    double t0 = ra_now_s();
    if (!hg || cs != RA_OK || ra_head_install_graph(hg, &a, hd.tq, nt, NULL, 0, 0) != RA_OK) {
        fprintf(stderr, "install failed\n");
        return 1;
    }
    double install_s = ra_now_s() - t0, cpu_s = 0;
    if (cpu_build) {
        hc = head_with_keys(hd.kb, n, dim, cores);
        t0 = ra_now_s();
        if (!hc || ra_head_build(hc, hd.tq, nt, 0) != RA_OK) {
            fprintf(stderr, "CPU build failed\n");
            return 1;
        }
        cpu_s = ra_now_s() - t0;
    }
    int efforts[] = {100, 150, 200, 300};
    double rg[4], sg[4], rc[4] = {0}, scc[4] = {0};
    for (int e = 0; e < 4; e++) {
        rg[e] = recall(hg, hd.dq, nqd, dim, thr, 100, efforts[e], &sg[e]);
        if (hc)
            rc[e] = recall(hc, hd.dq, nqd, dim, thr, 100, efforts[e], &scc[e]);
        fprintf(stderr, "effort %d: recall@100 gpu/ graph %.4f (%.0f scanned), ratd CPU build "
                        "%.4f (%.0f scanned)\n",
                efforts[e], rg[e], sg[e], rc[e], scc[e]);
    }
    ra_head_destroy(hg);
    ra_head_destroy(hc);
    /* the other heads of the layer */
    for (int h = 1; h < heads; h++) {
        if (distinct)
            gen_s += make_head(&hd, h, n, dim, per_q, group, 1);
        double dt;
        if (build_one(c, &hd, n, nt, dim, &p, adj, entries, &ne, &last, backend, h, &dt))
            return 1;
        rest_s += dt;
    }
    double layer_s = first_s + rest_s;
    double steady = heads > 1 ? rest_s / (heads - 1) : first_s;
    /* the layer again in one ra_gpu_graph_build_heads call (a decoder's way: each head's
     * host steps beside the next head's device steps); the last head's data for all
     * unless --distinct kept them apart, which this pass does not regenerate */
    ra_gpu_graph_head *bh = calloc((size_t)heads, sizeof *bh);
    int32_t *badj = malloc((size_t)heads * n * M * sizeof *badj);
    int32_t *bent = malloc((size_t)heads * 1024 * sizeof *bent);
    double batch_s = 0;
    if (bh && badj && bent) {
        for (int h = 0; h < heads; h++)
            bh[h] = (ra_gpu_graph_head){.keys = hd.kb, .n_keys = n, .queries = hd.qb,
                                        .n_queries = nt, .adj = badj + (size_t)h * n * M,
                                        .entries = bent + (size_t)h * 1024};
        t0 = ra_now_s();
        size_t done = 0;
        s = ra_gpu_graph_build_heads(c, RA_GPU_MEM_HOST, RA_DTYPE_BF16, (unsigned)dim, &p, bh,
                                     (size_t)heads, &done);
        batch_s = ra_now_s() - t0;
        if (s != RA_OK) {
            fprintf(stderr, "ra_gpu_graph_build_heads: %s after %zu heads: %s\n",
                    ra_strerror(s), done, ra_gpu_cache_last_error(c));
            return 1;
        }
        if (memcmp(badj + (size_t)(heads - 1) * n * M, adj, n * M * sizeof *adj) != 0) {
            fprintf(stderr, "ra_gpu_graph_build_heads: head %d differs from its own build\n",
                    heads - 1);
            return 1;
        }
        fprintf(stderr, "%d heads in one ra_gpu_graph_build_heads: %.3f s (%.3f s per head)\n",
                heads, batch_s, batch_s / heads);
    }
    free(bh);
    free(badj);
    free(bent);
    fprintf(stderr,
            "%s build: first head %.3f s, then %.3f s per head; %d heads %.3f s; install %.3f s; "
            "CPU build of one head %.3f s on %d cores; generator %.1f s\n",
            backend, first_s, steady, heads, layer_s, install_s, cpu_s, cores, gen_s);
    FILE *f = json ? fopen(json, "w") : stdout;
    if (f) {
        fprintf(f,
                "{\"backend\": \"%s\", \"keys\": %zu, \"heads\": %d, \"group\": %d, "
                "\"train_queries_per_kv_head\": %zu, \"dim\": %d, \"degree\": %u, \"knn\": %u, "
                "\"key_knn\": %u, \"distinct_heads\": %d, \"first_head_s\": %.4f, "
                "\"steady_head_s\": %.4f, \"layer_s\": %.4f, \"last_phases_s\": {\"knn\": %.4f, "
                "\"key_knn\": %.4f, \"projection\": %.4f, \"reverse\": %.4f, \"copy\": %.4f, "
                "\"connect\": %.4f}, \"forced_edges\": %zu, \"device_bytes\": %zu, "
                "\"layer_heads_s\": %.4f, \"install_s\": %.4f, \"cpu_build_s\": %.4f, "
                "\"cpu_cores\": %d, \"recall\": [",
                backend, n, heads, group, nt, dim, M, K, L, distinct, first_s, steady, layer_s,
                last.knn_s, last.key_knn_s, last.project_s, last.reverse_s, last.copy_s,
                last.connect_s, last.forced_edges, last.device_bytes, batch_s, install_s, cpu_s,
                cores);
        for (int e = 0; e < 4; e++)
            fprintf(f,
                    "%s{\"effort\": %d, \"gpu_graph\": %.4f, \"gpu_scanned\": %.0f, "
                    "\"cpu_build\": %.4f, \"cpu_scanned\": %.0f}",
                    e ? ", " : "", efforts[e], rg[e], sg[e], rc[e], scc[e]);
        fprintf(f, "]}\n");
        if (f != stdout)
            fclose(f);
    }
    ra_gpu_cache_destroy(c);
    return 0;
}
