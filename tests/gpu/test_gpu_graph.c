/* ra_gpu_graph_build (gpu.h): the graph built by gpu/ must be a graph ratd installs
 * (ra_graph_adj_check) and search as well as ratd's own CPU build at the same effort
 * (recall@100 within 0.01 on the calibrated out-of-distribution synthetic head); the
 * CUDA backend must agree with the CPU reference (most edges the same, the same recall)
 * and fail cleanly on device faults. Run with the argument "cuda" for the device tests,
 * which skip without a CUDA device. */
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#ifdef RA_HAVE_CUDA
#include <cuda_runtime_api.h>
#endif

#include "ra_half.h"
#include "ra_index.h"
#include "ratd/gpu.h"
#include "synth.h"

enum { DIM = 64, TOPK = 100 };

static ra_gpu_cache *make_cache(ra_gpu_backend b)
{
    ra_gpu_config cfg;
    ra_gpu_config_init(&cfg);
    cfg.n_layers = 1;
    cfg.n_q_heads = cfg.n_kv_heads = 1;
    cfg.head_dim = DIM;
    cfg.dtype = b == RA_GPU_BACKEND_CPU ? RA_DTYPE_F32 : RA_DTYPE_BF16;
    cfg.window = 1;
    cfg.batch = 1;
    cfg.backend = b;
    ra_gpu_cache *c = NULL;
    assert_int_equal(ra_gpu_cache_create(&cfg, &c), RA_OK);
    return c;
}

static ra_synth make_synth(size_t n, size_t nt, size_t nq, uint64_t seed)
{
    ra_synth_opts o;
    ra_synth_opts_default(&o);
    o.n = n;
    o.dim = DIM;
    o.n_train = nt;
    o.n_queries = nq;
    o.seed = seed;
    ra_synth s;
    assert_int_equal(ra_synth_make(&o, &s), RA_OK);
    return s;
}

static uint16_t *to_bf16(const float *f, size_t n)
{
    uint16_t *b = NULL;
    assert_int_equal(posix_memalign((void **)&b, 64, n * sizeof *b + 64), 0);
    for (size_t i = 0; i < n; i++)
        b[i] = ra_f32_to_bf16(f[i]);
    return b;
}

static float *from_bf16(const uint16_t *b, size_t n)
{
    float *f = malloc(n * sizeof *f);
    for (size_t i = 0; i < n; i++)
        f[i] = ra_bf16_to_f32(b[i]);
    return f;
}

typedef struct graph {
    size_t n;
    unsigned M, ne;
    int32_t *adj, entries[1024];
    ra_gpu_graph_stats st;
} graph;

static ra_status build(ra_gpu_cache *c, ra_gpu_mem mem, ra_dtype t, const void *keys, size_t n,
                       const void *q, size_t nq, const ra_gpu_graph_params *p, graph *g)
{
    g->n = n;
    g->M = p && p->degree ? p->degree : 48;
    g->adj = malloc(n * g->M * sizeof *g->adj);
    return ra_gpu_graph_build(c, mem, t, keys, n, q, nq, DIM, p, g->adj, g->entries, &g->ne,
                              &g->st);
}

static void check_graph(const graph *g)
{
    ra_graph_adj a = {.n = g->n, .M = (int)g->M, .adj = g->adj, .n_entries = (int)g->ne,
                      .entries = (int32_t *)g->entries};
    ra_graph_fault f;
    char err[256];
    ra_status s = ra_graph_adj_check(&a, &f, err, sizeof err);
    if (s != RA_OK)
        print_error("adjacency refused: %s\n", err);
    assert_int_equal(s, RA_OK);
}

/* a graph head over keys (fp32) with ratd's defaults; g NULL: ratd's own CPU build */
static ra_head *head_of(const float *keys, size_t n, const float *tq, size_t nq, const graph *g)
{
    ra_index_opts o;
    ra_index_opts_default(&o);
    o.kind = RA_INDEX_GRAPH;
    o.threads = 2;
    o.seed = 7;
    ra_head *h = NULL;
    assert_int_equal(ra_head_create(&h, DIM, RA_DTYPE_F32, &o, NULL), RA_OK);
    int64_t *pos = malloc(n * sizeof *pos);
    for (size_t i = 0; i < n; i++)
        pos[i] = (int64_t)i;
    assert_int_equal(ra_head_append(h, keys, keys, pos, n), RA_OK);
    free(pos);
    if (!g) {
        assert_int_equal(ra_head_build(h, tq, nq, 0), RA_OK);
    } else {
        ra_graph_adj a = {.n = g->n, .M = (int)g->M, .adj = g->adj, .n_entries = (int)g->ne,
                          .entries = (int32_t *)g->entries};
        assert_int_equal(ra_head_install_graph(h, &a, tq, nq, NULL, 0, 0), RA_OK);
    }
    assert_true(ra_head_ready(h));
    return h;
}

/* exact top-TOPK score thresholds of the decode queries (double precision) */
static float *thresholds(const float *keys, size_t n, const float *q, size_t nq)
{
    float *thr = malloc(nq * sizeof *thr);
    double *s = malloc(n * sizeof *s);
    for (size_t i = 0; i < nq; i++) {
        for (size_t j = 0; j < n; j++) {
            double a = 0;
            for (int d = 0; d < DIM; d++)
                a += (double)q[i * DIM + d] * keys[j * DIM + d];
            s[j] = a;
        }
        /* the TOPK-th largest by partial selection */
        for (int t = 0; t < TOPK; t++) {
            size_t b = t;
            for (size_t j = t + 1; j < n; j++)
                if (s[j] > s[b])
                    b = j;
            double x = s[t];
            s[t] = s[b];
            s[b] = x;
        }
        thr[i] = (float)s[TOPK - 1];
    }
    free(s);
    return thr;
}

static double recall(ra_head *h, const float *q, size_t nq, const float *thr, int effort,
                     double *scanned)
{
    int32_t ids[TOPK];
    float sc[TOPK];
    double hit = 0, sum = 0;
    for (size_t i = 0; i < nq; i++) {
        ra_search_params p = {.k = TOPK, .effort = effort};
        ra_search_stats st;
        int got = 0;
        assert_int_equal(ra_head_search(h, q + i * DIM, &p, ids, sc, &got, &st), RA_OK);
        int hcount = 0;
        for (int a = 0; a < got; a++)
            hcount += sc[a] >= thr[i] - 1e-3f * (fabsf(thr[i]) + 1.0f);
        hit += hcount < TOPK ? hcount : TOPK;
        sum += (double)st.scanned;
    }
    if (scanned)
        *scanned = sum / (double)nq;
    return hit / ((double)nq * TOPK);
}

/* ---- CPU backend ---- */

static void test_cpu_graph_searches_like_ratd(void **state)
{
    (void)state;
    ra_synth s = make_synth(8192, 2048, 100, 3);
    ra_gpu_cache *c = make_cache(RA_GPU_BACKEND_CPU);
    graph g;
    ra_gpu_graph_params p;
    ra_gpu_graph_params_init(&p);
    p.seed = 7;
    assert_int_equal(build(c, RA_GPU_MEM_HOST, RA_DTYPE_F32, s.keys, s.n, s.train_q, s.n_train,
                           &p, &g),
                     RA_OK);
    check_graph(&g);
    print_message("cpu reference build: %.2f s (knn %.2f, key->key %.2f, projection %.2f, "
                  "reverse %.2f, connect %.3f, %zu forced edges)\n",
                  g.st.total_s, g.st.knn_s, g.st.key_knn_s, g.st.project_s, g.st.reverse_s,
                  g.st.connect_s, g.st.forced_edges);
    float *thr = thresholds(s.keys, s.n, s.queries, s.n_queries);
    ra_head *own = head_of(s.keys, s.n, s.train_q, s.n_train, NULL);
    ra_head *gb = head_of(s.keys, s.n, s.train_q, s.n_train, &g);
    int efforts[] = {100, 200, 400};
    for (int e = 0; e < 3; e++) {
        double sa, sb;
        double ra = recall(own, s.queries, s.n_queries, thr, efforts[e], &sa);
        double rb = recall(gb, s.queries, s.n_queries, thr, efforts[e], &sb);
        print_message("effort %d: recall@100 ratd build %.4f (%.0f scanned), gpu/ build %.4f "
                      "(%.0f scanned)\n",
                      efforts[e], ra, sa, rb, sb);
        assert_true(rb >= ra - 0.01);
    }
    ra_head_destroy(own);
    ra_head_destroy(gb);
    free(thr);
    free(g.adj);
    ra_gpu_cache_destroy(c);
    ra_synth_free(&s);
}

static void test_small_and_keys_only(void **state)
{
    (void)state;
    ra_gpu_cache *c = make_cache(RA_GPU_BACKEND_CPU);
    size_t sizes[] = {1, 2, 3, 50, 700};
    for (int i = 0; i < 5; i++) {
        ra_synth s = make_synth(sizes[i] < 64 ? 64 : sizes[i], 40, 1, 11 + i);
        for (int withq = 0; withq < 2; withq++) {
            graph g;
            ra_gpu_graph_params p;
            ra_gpu_graph_params_init(&p);
            p.degree = 8;
            assert_int_equal(build(c, RA_GPU_MEM_HOST, RA_DTYPE_F32, s.keys, sizes[i], s.train_q,
                                   withq ? s.n_train : 0, &p, &g),
                             RA_OK);
            assert_int_equal(g.ne, sizes[i] < 16 ? sizes[i] : 16);
            check_graph(&g);
            free(g.adj);
        }
        ra_synth_free(&s);
    }
    /* all keys equal: occlusion never drops a tie, the graph stays connected; and key 0
     * is the best key of all 64 lists, so it takes the whole list (K - 1 candidates) from
     * each of its first 32: the candidate multiset's largest case */
    float *same = calloc(300 * DIM, sizeof *same);
    for (size_t i = 0; i < 300 * DIM; i++)
        same[i] = (i % DIM) == 0 ? 1.0f : 0.0f;
    graph g;
    assert_int_equal(build(c, RA_GPU_MEM_HOST, RA_DTYPE_F32, same, 300, same, 64, NULL, &g),
                     RA_OK);
    check_graph(&g);
    free(g.adj);
    free(same);
    ra_gpu_cache_destroy(c);
}

static void test_bad_arguments(void **state)
{
    (void)state;
    ra_gpu_cache *c = make_cache(RA_GPU_BACKEND_CPU);
    float k[4 * DIM] = {0};
    int32_t adj[4 * 255], ent[16];
    unsigned ne = 99;
    ra_gpu_graph_params p;
    ra_gpu_graph_params_init(&p);
    p.degree = 1;
    assert_int_equal(ra_gpu_graph_build(c, RA_GPU_MEM_HOST, RA_DTYPE_F32, k, 4, NULL, 0, DIM, &p,
                                        adj, ent, &ne, NULL),
                     RA_EINVAL);
    p.degree = 256;
    assert_int_equal(ra_gpu_graph_build(c, RA_GPU_MEM_HOST, RA_DTYPE_F32, k, 4, NULL, 0, DIM, &p,
                                        adj, ent, &ne, NULL),
                     RA_EINVAL);
    p.degree = 0;
    p.knn = 2000;
    assert_int_equal(ra_gpu_graph_build(c, RA_GPU_MEM_HOST, RA_DTYPE_F32, k, 4, k, 1, DIM, &p,
                                        adj, ent, &ne, NULL),
                     RA_EINVAL);
    assert_int_equal(ra_gpu_graph_build(c, RA_GPU_MEM_HOST, RA_DTYPE_F32, k, 0, NULL, 0, DIM,
                                        NULL, adj, ent, &ne, NULL),
                     RA_ESHAPE);
    assert_int_equal(ra_gpu_graph_build(c, RA_GPU_MEM_HOST, RA_DTYPE_F32, k, 4, NULL, 0, 0, NULL,
                                        adj, ent, &ne, NULL),
                     RA_ESHAPE);
    assert_int_equal(ra_gpu_graph_build(c, RA_GPU_MEM_HOST, RA_DTYPE_F32, k, 4, NULL, 3, DIM,
                                        NULL, adj, ent, &ne, NULL),
                     RA_EINVAL); /* queries NULL with n_queries 3 */
    assert_int_equal(ra_gpu_graph_build(c, RA_GPU_MEM_DEVICE, RA_DTYPE_F32, k, 4, NULL, 0, DIM,
                                        NULL, adj, ent, &ne, NULL),
                     RA_ENOTSUP);
    assert_int_equal(ne, 99); /* nothing written on failure */
    ra_gpu_cache_destroy(c);
}

/* gpu/ test hook (ra_gpu_internal.h): the next CUDA call of the cache fails */
extern void ra_gpu_cache_inject_fault(ra_gpu_cache *c, int cuda_error);

/* ra_gpu_graph_build_heads: the same graphs as one ra_gpu_graph_build per head (the host
 * steps of a head run beside the next head's device steps), and a bad head stops the
 * batch there with the heads before it complete */
static void build_heads_on(ra_gpu_backend be, ra_dtype t)
{
    enum { H = 3 };
    /* on CUDA the third head takes the MMA top-k path (cuda_mma_topk.h: 4,096 keys or more) */
    const size_t n[H] = {700, 1500, be == RA_GPU_BACKEND_CUDA ? 5000 : 3000};
    ra_synth s[H];
    void *kb[H], *qb[H];
    ra_gpu_cache *c = make_cache(be);
    ra_gpu_graph_head hd[H];
    graph one[H];
    ra_gpu_graph_params p;
    ra_gpu_graph_params_init(&p);
    p.seed = 3;
    for (int h = 0; h < H; h++) {
        s[h] = make_synth(n[h], 400, 1, 21 + h);
        kb[h] = t == RA_DTYPE_BF16 ? (void *)to_bf16(s[h].keys, n[h] * DIM) : (void *)s[h].keys;
        qb[h] = t == RA_DTYPE_BF16 ? (void *)to_bf16(s[h].train_q, s[h].n_train * DIM)
                                   : (void *)s[h].train_q;
        assert_int_equal(build(c, RA_GPU_MEM_HOST, t, kb[h], n[h], qb[h], s[h].n_train, &p,
                               &one[h]),
                         RA_OK);
        hd[h] = (ra_gpu_graph_head){.keys = kb[h], .n_keys = n[h], .queries = qb[h],
                                    .n_queries = s[h].n_train,
                                    .adj = malloc(n[h] * 48 * sizeof(int32_t)),
                                    .entries = malloc(1024 * sizeof(int32_t)),
                                    .lists = malloc(s[h].n_train * TOPK * sizeof(int32_t))};
    }
    size_t done = 99;
    assert_int_equal(ra_gpu_graph_build_heads(c, RA_GPU_MEM_HOST, t, DIM, &p, hd, H, &done),
                     RA_OK);
    assert_int_equal(done, H);
    for (int h = 0; h < H; h++) {
        assert_int_equal(hd[h].n_entries, one[h].ne);
        assert_memory_equal(hd[h].entries, one[h].entries, one[h].ne * sizeof(int32_t));
        assert_memory_equal(hd[h].adj, one[h].adj, n[h] * 48 * sizeof(int32_t));
        assert_true(hd[h].stats.total_s > 0);
        /* the lists are the exact kNN of the training queries (ties aside), as the CPU
         * backend finds them */
        size_t nl = s[h].n_train * TOPK, same = 0;
        int32_t *ids = malloc(nl * sizeof *ids);
        float *sc = malloc(nl * sizeof *sc);
        ra_gpu_cache *ref = make_cache(RA_GPU_BACKEND_CPU);
        assert_int_equal(ra_gpu_knn(ref, RA_GPU_MEM_HOST, t, qb[h], s[h].n_train, kb[h], n[h],
                                    DIM, TOPK, ids, sc),
                         RA_OK);
        ra_gpu_cache_destroy(ref);
        for (size_t i = 0; i < nl; i++)
            same += ids[i] == hd[h].lists[i];
        print_message("head %d: %.4f of the lists as ra_gpu_knn's\n", h, (double)same / nl);
        assert_true((double)same / (double)nl > 0.99);
        free(ids);
        free(sc);
    }
    /* more heads than build_heads keeps in flight (two on the device, at most three in
     * their host steps): the ring's slots are reused and every head still equals its own
     * build */
    {
        enum { W = 9 };
        ra_gpu_graph_head wh[W];
        for (int h = 0; h < W; h++) {
            wh[h] = hd[h % H];
            wh[h].adj = malloc(n[h % H] * 48 * sizeof(int32_t));
            wh[h].entries = malloc(1024 * sizeof(int32_t));
            wh[h].lists = NULL;
        }
        assert_int_equal(ra_gpu_graph_build_heads(c, RA_GPU_MEM_HOST, t, DIM, &p, wh, W, &done),
                         RA_OK);
        assert_int_equal(done, W);
        for (int h = 0; h < W; h++) {
            assert_int_equal(wh[h].n_entries, one[h % H].ne);
            assert_memory_equal(wh[h].adj, one[h % H].adj, n[h % H] * 48 * sizeof(int32_t));
            free(wh[h].adj);
            free(wh[h].entries);
        }
    }
    /* head 1 without keys: RA_ESHAPE naming nothing built after head 0 */
    hd[1].n_keys = 0;
    memset(hd[0].adj, 0xff, n[0] * 48 * sizeof(int32_t));
    hd[0].n_entries = 0;
    assert_int_equal(ra_gpu_graph_build_heads(c, RA_GPU_MEM_HOST, t, DIM, &p, hd, H, &done),
                     RA_ESHAPE);
    assert_int_equal(done, 1);
    assert_non_null(strstr(ra_gpu_cache_last_error(c), "head 1"));
    assert_int_equal(hd[0].n_entries, one[0].ne);
    assert_memory_equal(hd[0].adj, one[0].adj, n[0] * 48 * sizeof(int32_t));
    assert_false(ra_gpu_cache_broken(c));
    hd[1].n_keys = n[1];
    if (be == RA_GPU_BACKEND_CUDA) {
        /* a device failure on head 0's own thread (a new cache: its first head runs
         * alone, so the fault is head 0's): its message, with the head named, becomes
         * the cache's, and no later head starts */
        ra_gpu_cache *f = make_cache(be);
        memset(hd[1].adj, 0x5a, n[1] * 48 * sizeof(int32_t));
        ra_gpu_cache_inject_fault(f, 2 /* cudaErrorMemoryAllocation */);
        assert_int_equal(ra_gpu_graph_build_heads(f, RA_GPU_MEM_HOST, t, DIM, &p, hd, H, &done),
                         RA_ENOMEM);
        assert_int_equal(done, 0);
        assert_non_null(strstr(ra_gpu_cache_last_error(f), "head 0"));
        assert_non_null(strstr(ra_gpu_cache_last_error(f), "cudaErrorMemoryAllocation"));
        assert_false(ra_gpu_cache_broken(f));
        for (size_t i = 0; i < n[1] * 48; i++)
            assert_int_equal(hd[1].adj[i], 0x5a5a5a5a);
        assert_int_equal(ra_gpu_graph_build_heads(f, RA_GPU_MEM_HOST, t, DIM, &p, hd, H, &done),
                         RA_OK); /* and the cache builds again */
        assert_int_equal(done, H);
        for (int h = 0; h < H; h++)
            assert_memory_equal(hd[h].adj, one[h].adj, n[h] * 48 * sizeof(int32_t));
        ra_gpu_cache_destroy(f);
    }
    assert_int_equal(ra_gpu_graph_build_heads(c, RA_GPU_MEM_HOST, t, DIM, &p, NULL, 2, &done),
                     RA_EINVAL);
    assert_int_equal(ra_gpu_graph_build_heads(c, RA_GPU_MEM_HOST, t, DIM, &p, hd, 0, &done),
                     RA_OK);
    assert_int_equal(done, 0);
    for (int h = 0; h < H; h++) {
        free(hd[h].adj);
        free(hd[h].entries);
        free(hd[h].lists);
        free(one[h].adj);
        if (t == RA_DTYPE_BF16) {
            free(kb[h]);
            free(qb[h]);
        }
        ra_synth_free(&s[h]);
    }
    ra_gpu_cache_destroy(c);
}

static void test_build_heads(void **state)
{
    (void)state;
    build_heads_on(RA_GPU_BACKEND_CPU, RA_DTYPE_F32);
}

/* ---- CUDA against the CPU reference ---- */

static int g_cuda;

static void test_cuda_matches_cpu(void **state)
{
    (void)state;
    if (!g_cuda)
        skip();
    ra_synth s = make_synth(16384, 4096, 100, 5);
    uint16_t *kb = to_bf16(s.keys, s.n * DIM), *qb = to_bf16(s.train_q, s.n_train * DIM);
    float *kf = from_bf16(kb, s.n * DIM); /* the keys the builds see */
    ra_gpu_cache *cpu = make_cache(RA_GPU_BACKEND_CPU), *gpu = make_cache(RA_GPU_BACKEND_CUDA);
    ra_gpu_graph_params p;
    ra_gpu_graph_params_init(&p);
    p.seed = 7;
    p.tile_bytes = (size_t)8 << 20; /* many tiles */
    graph a, b;
    assert_int_equal(build(cpu, RA_GPU_MEM_HOST, RA_DTYPE_BF16, kb, s.n, qb, s.n_train, &p, &a),
                     RA_OK);
    assert_int_equal(build(gpu, RA_GPU_MEM_HOST, RA_DTYPE_BF16, kb, s.n, qb, s.n_train, &p, &b),
                     RA_OK);
    check_graph(&b);
    print_message("cuda build %.3f s (knn %.3f, key->key %.3f, projection %.3f, reverse %.3f, "
                  "copies %.3f, connect %.3f; %zu forced, %.1f MiB device) vs cpu %.2f s\n",
                  b.st.total_s, b.st.knn_s, b.st.key_knn_s, b.st.project_s, b.st.reverse_s,
                  b.st.copy_s, b.st.connect_s, b.st.forced_edges,
                  (double)b.st.device_bytes / 1048576.0, a.st.total_s);
    /* edges in common (as sets per row) */
    size_t same = 0, tot = 0;
    for (size_t u = 0; u < s.n; u++)
        for (unsigned i = 0; i < a.M; i++) {
            int32_t v = a.adj[u * a.M + i];
            if (v < 0)
                continue;
            tot++;
            for (unsigned j = 0; j < b.M; j++)
                if (b.adj[u * b.M + j] == v) {
                    same++;
                    break;
                }
        }
    double frac = (double)same / (double)tot;
    print_message("edges of the CPU reference also in the CUDA graph: %.4f\n", frac);
    assert_true(frac > 0.90); /* fp32 sums in another order flip near ties */
    assert_int_equal(a.ne, b.ne);
    float *thr = thresholds(kf, s.n, s.queries, s.n_queries);
    ra_head *ha = head_of(kf, s.n, s.train_q, s.n_train, &a);
    ra_head *hb = head_of(kf, s.n, s.train_q, s.n_train, &b);
    for (int effort = 100; effort <= 400; effort *= 2) {
        double ra = recall(ha, s.queries, s.n_queries, thr, effort, NULL);
        double rb = recall(hb, s.queries, s.n_queries, thr, effort, NULL);
        print_message("effort %d: recall@100 cpu reference %.4f, cuda %.4f\n", effort, ra, rb);
        assert_true(fabs(ra - rb) <= 0.01);
    }
    ra_head_destroy(ha);
    ra_head_destroy(hb);
    free(thr);
    free(a.adj);
    free(b.adj);
    free(kb);
    free(qb);
    free(kf);
    ra_gpu_cache_destroy(cpu);
    ra_gpu_cache_destroy(gpu);
    ra_synth_free(&s);
}

static void test_cuda_faults(void **state)
{
    (void)state;
    if (!g_cuda)
        skip();
    ra_synth s = make_synth(2048, 256, 1, 9);
    uint16_t *kb = to_bf16(s.keys, s.n * DIM), *qb = to_bf16(s.train_q, s.n_train * DIM);
    ra_gpu_cache *c = make_cache(RA_GPU_BACKEND_CUDA);
    graph g;
    /* an allocation failure: out of memory, the cache stays usable */
    ra_gpu_cache_inject_fault(c, 2 /* cudaErrorMemoryAllocation */);
    assert_int_equal(build(c, RA_GPU_MEM_HOST, RA_DTYPE_BF16, kb, s.n, qb, s.n_train, NULL, &g),
                     RA_ENOMEM);
    print_message("injected OOM: %s\n", ra_gpu_cache_last_error(c));
    assert_non_null(strstr(ra_gpu_cache_last_error(c), "memory"));
    assert_false(ra_gpu_cache_broken(c));
    free(g.adj);
    /* a launch failure (sticky): RA_EDEVICE, the cache is broken */
    ra_gpu_cache_inject_fault(c, 719 /* cudaErrorLaunchFailure */);
    assert_int_equal(build(c, RA_GPU_MEM_HOST, RA_DTYPE_BF16, kb, s.n, qb, s.n_train, NULL, &g),
                     RA_EDEVICE);
    assert_true(ra_gpu_cache_broken(c));
    free(g.adj);
    assert_int_equal(build(c, RA_GPU_MEM_HOST, RA_DTYPE_BF16, kb, s.n, qb, s.n_train, NULL, &g),
                     RA_ESTATE);
    free(g.adj);
    ra_gpu_cache_destroy(c);
    /* device pointers: the same graph as from host memory */
#ifdef RA_HAVE_CUDA
    c = make_cache(RA_GPU_BACKEND_CUDA);
    graph h, d;
    assert_int_equal(build(c, RA_GPU_MEM_HOST, RA_DTYPE_BF16, kb, s.n, qb, s.n_train, NULL, &h),
                     RA_OK);
    void *dk = NULL, *dq = NULL;
    size_t kbytes = s.n * DIM * 2, qbytes = s.n_train * DIM * 2;
    assert_int_equal(cudaMalloc(&dk, kbytes), cudaSuccess);
    assert_int_equal(cudaMalloc(&dq, qbytes), cudaSuccess);
    assert_int_equal(cudaMemcpy(dk, kb, kbytes, cudaMemcpyHostToDevice), cudaSuccess);
    assert_int_equal(cudaMemcpy(dq, qb, qbytes, cudaMemcpyHostToDevice), cudaSuccess);
    assert_int_equal(build(c, RA_GPU_MEM_DEVICE, RA_DTYPE_BF16, dk, s.n, dq, s.n_train, NULL, &d),
                     RA_OK);
    assert_memory_equal(h.adj, d.adj, s.n * h.M * sizeof *h.adj);
    /* a host pointer passed as device memory: RA_EINVAL, nothing run */
    graph x;
    assert_int_equal(build(c, RA_GPU_MEM_DEVICE, RA_DTYPE_BF16, kb, s.n, dq, s.n_train, NULL, &x),
                     RA_EINVAL);
    free(x.adj);
    cudaFree(dk);
    cudaFree(dq);
    free(h.adj);
    free(d.adj);
    ra_gpu_cache_destroy(c);
#endif
    free(kb);
    free(qb);
    ra_synth_free(&s);
}

/* rows of massive ties (6,000 equal keys): the top-k's sampled threshold lets through
 * more candidates than it holds, and it falls back to its radix select over the row,
 * which still gives ties to the lower ids; the graph is one ratd installs, and the same
 * in two builds */
static void test_cuda_ties(void **state)
{
    (void)state;
    if (!g_cuda)
        skip();
    enum { N = 6000, NQ = 64 };
    float *kf = calloc((size_t)N * DIM, sizeof *kf);
    for (size_t i = 0; i < N; i++)
        kf[i * DIM] = 1.0f;
    uint16_t *kb = to_bf16(kf, (size_t)N * DIM);
    ra_gpu_cache *c = make_cache(RA_GPU_BACKEND_CUDA);
    graph g, g2;
    assert_int_equal(build(c, RA_GPU_MEM_HOST, RA_DTYPE_BF16, kb, N, kb, NQ, NULL, &g), RA_OK);
    check_graph(&g);
    assert_int_equal(build(c, RA_GPU_MEM_HOST, RA_DTYPE_BF16, kb, N, kb, NQ, NULL, &g2), RA_OK);
    assert_memory_equal(g.adj, g2.adj, (size_t)N * g.M * sizeof *g.adj);
    free(g.adj);
    free(g2.adj);
    assert_int_equal(build(c, RA_GPU_MEM_HOST, RA_DTYPE_BF16, kb, N, NULL, 0, NULL, &g), RA_OK);
    check_graph(&g);
    free(g.adj);
    /* every query ties with every key: its list is keys 0..TOPK-1, in order */
    int32_t *adj = malloc((size_t)N * 48 * sizeof *adj), *lists = malloc(NQ * TOPK * 4);
    int32_t ent[16];
    ra_gpu_graph_head hd = {.keys = kb, .n_keys = N, .queries = kb, .n_queries = NQ,
                            .adj = adj, .entries = ent, .lists = lists};
    assert_int_equal(ra_gpu_graph_build_heads(c, RA_GPU_MEM_HOST, RA_DTYPE_BF16, DIM, NULL, &hd,
                                              1, NULL),
                     RA_OK);
    for (size_t i = 0; i < (size_t)NQ * TOPK; i++)
        assert_int_equal(lists[i], (int32_t)(i % TOPK));
    free(adj);
    free(lists);
    ra_gpu_cache_destroy(c);
    free(kb);
    free(kf);
}

static void test_cuda_build_heads(void **state)
{
    (void)state;
    if (!g_cuda)
        skip();
    build_heads_on(RA_GPU_BACKEND_CUDA, RA_DTYPE_BF16);
}

int main(int argc, char **argv)
{
    if (argc > 1 && strcmp(argv[1], "cuda") == 0) {
        g_cuda = ra_gpu_cuda_available();
        const struct CMUnitTest t[] = {
            cmocka_unit_test(test_cuda_matches_cpu),
            cmocka_unit_test(test_cuda_faults),
            cmocka_unit_test(test_cuda_build_heads),
            cmocka_unit_test(test_cuda_ties),
        };
        return cmocka_run_group_tests_name("gpu_graph_cuda", t, NULL, NULL);
    }
    const struct CMUnitTest t[] = {
        cmocka_unit_test(test_bad_arguments),
        cmocka_unit_test(test_small_and_keys_only),
        cmocka_unit_test(test_cpu_graph_searches_like_ratd),
        cmocka_unit_test(test_build_heads),
    };
    return cmocka_run_group_tests_name("gpu_graph", t, NULL, NULL);
}
