/* Integration tests of libratd-client against a real ratd ($RATD_BIN) on a private
 * ipc:// endpoint: attention over offloaded + appended tokens against exact attention
 * computed here in double precision (all three dtypes, GQA, top_k = all tokens), the
 * exact top-k subset with a flat index, self-consistency of a trained graph index,
 * the log-sum-exp merge of a daemon result with a local part, the asynchronous
 * send/wait form, timeouts, stats, and a tcp:// daemon. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include "../daemon/ratd_harness.h"
#include "ra_half.h"
#include "ra_log.h"

static ratd_proc g_d;
static ra_client *g_c;

/* ---- test data ----------------------------------------------------------------------- */

/* One layer's tokens: float values already rounded to dtype (what the daemon stores),
 * and the wire bytes. Layout [G][n][D]. */
typedef struct layer_data {
    int G, n, D;
    ra_dtype dt;
    float *K, *V;
    void *Kw, *Vw;
    int64_t *pos;
} layer_data;

static float round_to(float x, ra_dtype dt, uint16_t *bits)
{
    if (dt == RA_DTYPE_F16) {
        *bits = ra_f32_to_f16(x);
        return ra_f16_to_f32(*bits);
    }
    if (dt == RA_DTYPE_BF16) {
        *bits = ra_f32_to_bf16(x);
        return ra_bf16_to_f32(*bits);
    }
    return x;
}

static void layer_make(layer_data *L, int G, int n, int D, ra_dtype dt)
{
    L->G = G;
    L->n = n;
    L->D = D;
    L->dt = dt;
    size_t N = (size_t)G * n * D, es = ra_dtype_size(dt);
    L->K = malloc(N * sizeof(float));
    L->V = malloc(N * sizeof(float));
    L->Kw = malloc(N * es);
    L->Vw = malloc(N * es);
    L->pos = malloc((size_t)n * sizeof(int64_t));
    for (size_t i = 0; i < N; i++) {
        uint16_t b = 0;
        L->K[i] = round_to(rnd_norm(), dt, &b);
        if (dt == RA_DTYPE_F32)
            ((float *)L->Kw)[i] = L->K[i];
        else
            ((uint16_t *)L->Kw)[i] = b;
        L->V[i] = round_to(rnd_norm(), dt, &b);
        if (dt == RA_DTYPE_F32)
            ((float *)L->Vw)[i] = L->V[i];
        else
            ((uint16_t *)L->Vw)[i] = b;
    }
    for (int i = 0; i < n; i++)
        L->pos[i] = 1000 + 3 * (int64_t)i; /* not row ids: catches a missing mapping */
}

static void layer_free(layer_data *L)
{
    free(L->K);
    free(L->V);
    free(L->Kw);
    free(L->Vw);
    free(L->pos);
}

/* Tokens [a, b) of a layer as a batch (copies into head-major slices; free with
 * batch_free). */
static ra_kv_batch batch_of(const layer_data *L, int a, int b)
{
    size_t es = ra_dtype_size(L->dt), row = (size_t)L->D * es, m = (size_t)(b - a);
    uint8_t *k = malloc((size_t)L->G * m * row + 1), *v = malloc((size_t)L->G * m * row + 1);
    for (int g = 0; g < L->G; g++) {
        memcpy(k + g * m * row, (uint8_t *)L->Kw + ((size_t)g * L->n + a) * row, m * row);
        memcpy(v + g * m * row, (uint8_t *)L->Vw + ((size_t)g * L->n + a) * row, m * row);
    }
    ra_kv_batch bt;
    memset(&bt, 0, sizeof bt);
    bt.n_kv_heads = L->G;
    bt.head_dim = L->D;
    bt.dtype = L->dt;
    bt.n_tokens = m;
    bt.k = k;
    bt.v = v;
    bt.pos = L->pos + a;
    return bt;
}

static void batch_free(ra_kv_batch *b)
{
    free((void *)b->k);
    free((void *)b->v);
}

static float *rand_q(int H, int D, float amp)
{
    return rnd_vec((size_t)H * D, amp);
}

static uint64_t new_session(int L, int H, int G, int D, ra_dtype dt, ra_client_index_kind kind)
{
    uint64_t s = ratd_session_new(g_c, L, H, G, D, dt, kind);
    if (!s)
        fail_msg("session_create: %s", ra_client_errmsg(g_c));
    return s;
}

/* Offloads tokens [0, n_off) then appends the rest in `chunks` pieces. */
static void load_layer(uint64_t s, int layer, const layer_data *L, int n_off, int chunks)
{
    ra_kv_batch b = batch_of(L, 0, n_off);
    ra_status st = ra_client_offload(g_c, s, layer, &b);
    if (st != RA_OK)
        fail_msg("offload: %s: %s", ra_strerror(st), ra_client_errmsg(g_c));
    batch_free(&b);
    int rest = L->n - n_off;
    for (int c = 0; c < chunks && rest > 0; c++) {
        int a = n_off + rest * c / chunks, e = n_off + rest * (c + 1) / chunks;
        b = batch_of(L, a, e);
        st = ra_client_append(g_c, s, layer, &b);
        if (st != RA_OK)
            fail_msg("append: %s: %s", ra_strerror(st), ra_client_errmsg(g_c));
        batch_free(&b);
    }
}

/* Checks o/lse of every query head against exact attention over all n tokens. */
static void check_exact(const layer_data *L, int H, const float *q, const float *o,
                        const float *lse, double tol)
{
    char msg[256];
    if (ref_check_heads(L->K, L->V, L->G, L->n, L->D, H, q, o, lse, tol, msg, sizeof msg) >= 0)
        fail_msg("%s", msg);
}

static int setup(void **state)
{
    (void)state;
    if (ratd_start(&g_d, NULL) != 0)
        return -1;
    g_c = ratd_connect(&g_d, 20000);
    return g_c ? 0 : -1;
}

static int teardown(void **state)
{
    (void)state;
    ra_client_close(g_c);
    return ratd_stop(&g_d) == 0 ? 0 : -1;
}

/* ---- tests --------------------------------------------------------------------------- */

/* ra_client_index_kind_name / _parse: every kind round-trips, anything else is refused
 * and leaves the output alone */
static void test_index_kind_names(void **state)
{
    (void)state;
    const ra_client_index_kind all[] = {RA_CLIENT_INDEX_GRAPH, RA_CLIENT_INDEX_FLAT,
                                        RA_CLIENT_INDEX_IVF, RA_CLIENT_INDEX_HNSW,
                                        RA_CLIENT_INDEX_PSCAN};
    const char *want[] = {"graph", "flat", "ivf", "hnsw", "pscan"};
    for (int i = 0; i < 5; i++) {
        assert_string_equal(ra_client_index_kind_name(all[i]), want[i]);
        ra_client_index_kind k = RA_CLIENT_INDEX_FLAT;
        assert_int_equal(ra_client_index_kind_parse(want[i], &k), RA_OK);
        assert_int_equal(k, all[i]);
    }
    assert_null(ra_client_index_kind_name((ra_client_index_kind)4)); /* the daemon's faiss-flat */
    assert_null(ra_client_index_kind_name((ra_client_index_kind)99));
    const char *bad[] = {NULL, "", "Graph", "pscan ", "faiss-flat", "graphx"};
    for (int i = 0; i < 6; i++) {
        ra_client_index_kind k = RA_CLIENT_INDEX_IVF;
        assert_int_equal(ra_client_index_kind_parse(bad[i], &k), RA_EINVAL);
        assert_int_equal(k, RA_CLIENT_INDEX_IVF);
    }
}

static void test_hello(void **state)
{
    (void)state;
    ra_server_info info;
    memset(&info, 0xab, sizeof info);
    assert_int_equal(ra_client_hello(g_c, &info), RA_OK);
    assert_int_equal(info.protocol_version, RA_CLIENT_PROTOCOL_VERSION);
    assert_true(info.capabilities & RA_CAP_TOPK);
    assert_int_equal(info.workers, 2);
    assert_int_equal(info.numa_node, -1);
    assert_int_equal(info.limits.max_top_k, 8192);
    assert_int_equal(info.limits.max_frame_bytes, 1ull << 30);
    assert_true(strlen(info.server_version) > 0);
    assert_string_equal(ra_client_errmsg(g_c), "");
}

static void exact_case(ra_dtype dt, double tol)
{
    const int Ls = 2, H = 4, G = 2, D = 32, N = 1200;
    uint64_t s = new_session(Ls, H, G, D, dt, RA_CLIENT_INDEX_GRAPH);
    layer_data L[2];
    for (int l = 0; l < Ls; l++) {
        layer_make(&L[l], G, N, D, dt);
        load_layer(s, l, &L[l], 1000, 3);
    }
    for (int l = 0; l < Ls; l++) {
        float *q = rand_q(H, D, 1.5f);
        float o[4 * 32], lse[4];
        ra_attend_req r = {.n_q_heads = H, .head_dim = D, .q = q, .top_k = N};
        ra_attend_out out = {.o = o, .lse = lse};
        ra_status st = ra_client_attend(g_c, s, l, &r, &out);
        if (st != RA_OK)
            fail_msg("attend: %s: %s", ra_strerror(st), ra_client_errmsg(g_c));
        check_exact(&L[l], H, q, o, lse, tol);
        free(q);
    }
    assert_int_equal(ra_client_session_drop(g_c, s), RA_OK);
    for (int l = 0; l < Ls; l++)
        layer_free(&L[l]);
}

static void test_exact_f32(void **state)
{
    (void)state;
    exact_case(RA_DTYPE_F32, 1e-3);
}

static void test_exact_f16(void **state)
{
    (void)state;
    exact_case(RA_DTYPE_F16, 1e-2);
}

static void test_exact_bf16(void **state)
{
    (void)state;
    exact_case(RA_DTYPE_BF16, 1e-2);
}

/* The same answers with the client polling for its replies (ra_client_set_spin_us) */
static void test_exact_spin(void **state)
{
    (void)state;
    ra_client_set_spin_us(g_c, 2000);
    exact_case(RA_DTYPE_F32, 1e-3);
    ra_client_set_spin_us(g_c, 0);
}

static int cmp_desc(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? 1 : x > y ? -1 : 0;
}

/* With a flat (exact) index and top_k < n: the returned positions are the exact top-k,
 * their scores are q.k, and o/lse equal exact attention restricted to that set. */
static void test_topk_subset_exact(void **state)
{
    (void)state;
    const int H = 4, G = 1, D = 48, N = 900, K = 40;
    uint64_t s = new_session(1, H, G, D, RA_DTYPE_F32, RA_CLIENT_INDEX_FLAT);
    layer_data L;
    layer_make(&L, G, N, D, RA_DTYPE_F32);
    load_layer(s, 0, &L, 700, 2);
    float *q = rand_q(H, D, 1.0f);
    float o[4 * 48], lse[4], sc[4 * 40];
    int64_t pos[4 * 40];
    int32_t cnt[4];
    ra_attend_req r = {.n_q_heads = H, .head_dim = D, .q = q, .top_k = K, .want_topk = 1};
    ra_attend_out out = {.o = o, .lse = lse, .pos = pos, .scores = sc, .counts = cnt};
    assert_int_equal(ra_client_attend(g_c, s, 0, &r, &out), RA_OK);
    double *raw = malloc(N * sizeof *raw), *sorted = malloc(N * sizeof *sorted);
    double ro[48], rl;
    for (int h = 0; h < H; h++) {
        assert_int_equal(cnt[h], K);
        for (int i = 0; i < N; i++) {
            double x = 0;
            for (int d = 0; d < D; d++)
                x += (double)q[h * D + d] * L.K[(size_t)i * D + d];
            raw[i] = sorted[i] = x;
        }
        qsort(sorted, N, sizeof *sorted, cmp_desc);
        double kth = sorted[K - 1];
        int rows[40];
        for (int j = 0; j < K; j++) {
            int64_t p = pos[h * K + j];
            assert_true(p >= 1000 && (p - 1000) % 3 == 0);
            int row = (int)((p - 1000) / 3);
            assert_true(row < N);
            rows[j] = row;
            assert_true(raw[row] >= kth - 1e-4); /* in the exact top-k */
            assert_true(fabs(sc[h * K + j] - raw[row]) <= 1e-3 * fmax(1.0, fabs(raw[row])));
            if (j > 0)
                assert_true(sc[h * K + j] <= sc[h * K + j - 1] + 1e-6); /* best first */
            for (int x = 0; x < j; x++)
                assert_true(rows[x] != row); /* no duplicates */
        }
        ref_attend(q + h * D, L.K, L.V, D, rows, K, 1.0 / sqrt(D), ro, &rl);
        assert_true(rel_err(o + h * D, ro, D) <= 1e-3);
        assert_true(fabs(lse[h] - rl) <= 1e-3 * fmax(1.0, fabs(rl)));
    }
    free(raw);
    free(sorted);
    free(q);
    layer_free(&L);
    assert_int_equal(ra_client_session_drop(g_c, s), RA_OK);
}

/* A graph index trained from prefill queries may miss keys, but what it returns must
 * be self-consistent: o/lse equal attention over exactly the returned positions. */
static void test_graph_trained_consistent(void **state)
{
    (void)state;
    const int H = 4, G = 2, D = 32, N = 2000, K = 64, NQ = 64;
    uint64_t s = new_session(1, H, G, D, RA_DTYPE_F16, RA_CLIENT_INDEX_GRAPH);
    layer_data L;
    layer_make(&L, G, N, D, RA_DTYPE_F16);
    ra_kv_batch b = batch_of(&L, 0, N);
    float *qt = rand_q(H * NQ, D, 1.0f);
    b.n_q_heads = H;
    b.n_queries = NQ;
    b.q_train = qt;
    assert_int_equal(ra_client_offload(g_c, s, 0, &b), RA_OK);
    batch_free(&b);
    float o[4 * 32], lse[4], sc[4 * 64];
    int64_t pos[4 * 64];
    int32_t cnt[4];
    double ro[32], rl;
    for (int step = 0; step < 3; step++) { /* later steps may use the built index */
        float *q = rand_q(H, D, 1.0f);
        ra_attend_req r = {.n_q_heads = H, .head_dim = D, .q = q, .top_k = K, .want_topk = 1};
        ra_attend_out out = {.o = o, .lse = lse, .pos = pos, .scores = sc, .counts = cnt};
        assert_int_equal(ra_client_attend(g_c, s, 0, &r, &out), RA_OK);
        for (int h = 0; h < H; h++) {
            int g = h / (H / G), rows[64];
            assert_true(cnt[h] > 0 && cnt[h] <= K);
            for (int j = 0; j < cnt[h]; j++)
                rows[j] = (int)((pos[h * K + j] - 1000) / 3);
            ref_attend(q + h * D, L.K + (size_t)g * N * D, L.V + (size_t)g * N * D, D, rows, cnt[h],
                       1.0 / sqrt(D), ro, &rl);
            assert_true(rel_err(o + h * D, ro, D) <= 1e-2);
            assert_true(fabs(lse[h] - rl) <= 1e-2 * fmax(1.0, fabs(rl)));
        }
        free(q);
        usleep(200000);
    }
    free(qt);
    layer_free(&L);
    assert_int_equal(ra_client_session_drop(g_c, s), RA_OK);
}

/* Session stats: heads holding tokens, their builds, and wait_ready; after it, every
 * head with training queries is built (a graph head answers from the index). */
static void test_session_stats_ready(void **state)
{
    (void)state;
    const int H = 4, G = 2, D = 32, N = 3000, NQ = 128, Ls = 2;
    uint64_t s = new_session(Ls + 1, H, G, D, RA_DTYPE_F16, RA_CLIENT_INDEX_GRAPH);
    ra_session_stats ss;
    assert_int_equal(ra_client_session_stats(g_c, s, &ss), RA_OK);
    assert_int_equal(ss.heads, 0);
    assert_int_equal(ss.tokens, 0);
    layer_data L[2];
    float *qt = rand_q(H * NQ, D, 1.0f);
    for (int l = 0; l < Ls; l++) {
        layer_make(&L[l], G, N, D, RA_DTYPE_F16);
        ra_kv_batch b = batch_of(&L[l], 0, N);
        b.n_q_heads = H;
        b.n_queries = NQ;
        b.q_train = qt;
        assert_int_equal(ra_client_offload(g_c, s, l, &b), RA_OK);
        batch_free(&b);
    }
    assert_int_equal(ra_client_wait_ready(g_c, s, 300000), RA_OK);
    assert_int_equal(ra_client_session_stats(g_c, s, &ss), RA_OK);
    assert_int_equal(ss.heads, Ls * G); /* the third layer has no tokens */
    assert_int_equal(ss.heads_building, 0);
    assert_int_equal(ss.heads_ready, Ls * G);
    assert_int_equal(ss.tokens, (uint64_t)Ls * N);
    assert_int_equal(ra_client_session_stats(g_c, s + 1000, &ss), RA_ENOSESSION);
    assert_int_equal(ra_client_wait_ready(g_c, s + 1000, 1000), RA_ENOSESSION);
    free(qt);
    for (int l = 0; l < Ls; l++)
        layer_free(&L[l]);
    assert_int_equal(ra_client_session_drop(g_c, s), RA_OK);
}

/* A projected-code scan session (pscan) on a real ratd with 2 workers: one KV head, so
 * each Attend is cut into 2 parts over the keys and merged by the part that ends last.
 * After the build: every answer holds distinct positions with exact scores, best first,
 * o/lse are attention over exactly them, recall@40 against exact top-k is high, a
 * budget of 0 reads nothing; keys appended after the build are found. */
static void test_pscan_session(void **state)
{
    (void)state;
    const int H = 4, G = 1, D = 32, N = 6000, K = 40, NQ = 256;
    uint64_t s = new_session(1, H, G, D, RA_DTYPE_F16, RA_CLIENT_INDEX_PSCAN);
    layer_data L;
    layer_make(&L, G, N, D, RA_DTYPE_F16);
    ra_kv_batch b = batch_of(&L, 0, N - 100);
    float *qt = rand_q(H * NQ, D, 1.0f);
    b.n_q_heads = H;
    b.n_queries = NQ;
    b.q_train = qt;
    assert_int_equal(ra_client_offload(g_c, s, 0, &b), RA_OK);
    batch_free(&b);
    assert_int_equal(ra_client_wait_ready(g_c, s, 300000), RA_OK);
    b = batch_of(&L, N - 100, N); /* after the build: coded and scanned at once */
    assert_int_equal(ra_client_append(g_c, s, 0, &b), RA_OK);
    batch_free(&b);
    float o[4 * 32], lse[4], sc[4 * 40];
    int64_t pos[4 * 40];
    int32_t cnt[4];
    double *raw = malloc(N * sizeof *raw), *sorted = malloc(N * sizeof *sorted);
    double ro[32], rl, hit = 0, tot = 0;
    int32_t budget[4] = {K, 0, 7, K};
    for (int step = 0; step < 6; step++) {
        float *q = rand_q(H, D, 1.0f);
        if (step == 0) /* head 0 aims at an appended key */
            for (int d = 0; d < D; d++)
                q[d] = 4.0f * L.K[(size_t)(N - 30) * D + d];
        ra_attend_req r = {.n_q_heads = H,
                           .head_dim = D,
                           .q = q,
                           .top_k = K,
                           .want_topk = 1,
                           .top_k_per_head = step & 1 ? budget : NULL};
        ra_attend_out out = {.o = o, .lse = lse, .pos = pos, .scores = sc, .counts = cnt};
        assert_int_equal(ra_client_attend(g_c, s, 0, &r, &out), RA_OK);
        for (int h = 0; h < H; h++) {
            int kh = step & 1 ? budget[h] : K;
            assert_int_equal(cnt[h], kh);
            if (!kh) {
                assert_true(isinf(lse[h]) && lse[h] < 0);
                continue;
            }
            for (int i = 0; i < N; i++) {
                double x = 0;
                for (int d = 0; d < D; d++)
                    x += (double)q[h * D + d] * L.K[(size_t)i * D + d];
                raw[i] = sorted[i] = x;
            }
            qsort(sorted, N, sizeof *sorted, cmp_desc);
            int rows[40];
            for (int j = 0; j < kh; j++) {
                int row = (int)((pos[h * K + j] - 1000) / 3);
                assert_true(row >= 0 && row < N);
                rows[j] = row;
                assert_true(fabs(sc[h * K + j] - raw[row]) <= 1e-2 * fmax(1.0, fabs(raw[row])));
                if (j > 0)
                    assert_true(sc[h * K + j] <= sc[h * K + j - 1] + 1e-6);
                for (int x = 0; x < j; x++)
                    assert_true(rows[x] != row);
                hit += raw[row] >= sorted[kh - 1] - 1e-3;
            }
            tot += kh;
            if (step == 0 && h == 0)
                assert_int_equal(rows[0], N - 30);
            ref_attend(q + h * D, L.K, L.V, D, rows, kh, 1.0 / sqrt(D), ro, &rl);
            assert_true(rel_err(o + h * D, ro, D) <= 1e-2);
            assert_true(fabs(lse[h] - rl) <= 1e-2 * fmax(1.0, fabs(rl)));
        }
        free(q);
    }
    fprintf(stderr, "# pscan session: recall@%d %.3f\n", K, hit / tot);
    assert_true(hit / tot >= 0.95);
    free(raw);
    free(sorted);
    free(qt);
    layer_free(&L);
    assert_int_equal(ra_client_session_drop(g_c, s), RA_OK);
}

/* Per-head budgets: head h reads exactly its own number of keys (the exact top of a
 * flat index), a budget of 0 reads nothing, and a budget over top_k is refused. */
static void test_topk_per_head(void **state)
{
    (void)state;
    const int H = 4, G = 2, D = 32, N = 600, K = 50;
    uint64_t s = new_session(1, H, G, D, RA_DTYPE_F32, RA_CLIENT_INDEX_FLAT);
    layer_data L;
    layer_make(&L, G, N, D, RA_DTYPE_F32);
    load_layer(s, 0, &L, 400, 2);
    float *q = rand_q(H, D, 1.0f);
    float o[4 * 32], lse[4], sc[4 * 50];
    int64_t pos[4 * 50];
    int32_t cnt[4], budget[4] = {50, 7, 0, 1};
    ra_attend_req r = {.n_q_heads = H, .head_dim = D, .q = q, .top_k = K, .want_topk = 1,
                       .top_k_per_head = budget};
    ra_attend_out out = {.o = o, .lse = lse, .pos = pos, .scores = sc, .counts = cnt};
    assert_int_equal(ra_client_attend(g_c, s, 0, &r, &out), RA_OK);
    double ro[32], rl;
    for (int h = 0; h < H; h++) {
        assert_int_equal(cnt[h], budget[h]);
        if (budget[h] == 0) {
            assert_true(isinf(lse[h]) && lse[h] < 0);
            for (int d = 0; d < D; d++)
                assert_true(o[h * D + d] == 0.0f);
            continue;
        }
        int g = h / (H / G), rows[50];
        for (int j = 0; j < cnt[h]; j++)
            rows[j] = (int)((pos[h * K + j] - 1000) / 3);
        for (int j = cnt[h]; j < K; j++)
            assert_true(pos[h * K + j] == -1);
        ref_attend(q + h * D, L.K + (size_t)g * N * D, L.V + (size_t)g * N * D, D, rows, cnt[h],
                   1.0 / sqrt(D), ro, &rl);
        assert_true(rel_err(o + h * D, ro, D) <= 1e-3);
    }
    /* the 7 keys of head 1 are the best 7 of its 50 with a full budget */
    int32_t full[4] = {50, 50, 50, 50};
    float sc2[4 * 50];
    int64_t pos2[4 * 50];
    r.top_k_per_head = full;
    out.pos = pos2;
    out.scores = sc2;
    assert_int_equal(ra_client_attend(g_c, s, 0, &r, &out), RA_OK);
    for (int j = 0; j < 7; j++)
        assert_true(pos[1 * K + j] == pos2[1 * K + j]);
    int32_t bad[4] = {1, 51, 1, 1};
    r.top_k_per_head = bad;
    assert_int_equal(ra_client_attend(g_c, s, 0, &r, &out), RA_EINVAL);
    free(q);
    layer_free(&L);
    assert_int_equal(ra_client_session_drop(g_c, s), RA_OK);
}

/* Offload with the client's own exact training lists (the GPU kNN path): accepted
 * and built; an index outside this message's tokens is refused, nothing stored. */
static void test_offload_train_lists(void **state)
{
    (void)state;
    const int H = 2, G = 1, D = 16, N = 500, NQ = 8, KL = 4;
    uint64_t s = new_session(1, H, G, D, RA_DTYPE_F32, RA_CLIENT_INDEX_GRAPH);
    layer_data L;
    layer_make(&L, G, N, D, RA_DTYPE_F32);
    float *qt = rand_q(H * NQ, D, 1.0f);
    int32_t lists[2 * 8 * 4];
    for (int q = 0; q < H * NQ; q++) { /* exact top-KL by a double scan */
        double best[4] = {-INFINITY, -INFINITY, -INFINITY, -INFINITY};
        int id[4] = {-1, -1, -1, -1};
        for (int i = 0; i < N; i++) {
            double a = 0;
            for (int d = 0; d < D; d++)
                a += (double)qt[q * D + d] * L.K[(size_t)i * D + d];
            for (int t = 0; t < KL; t++)
                if (a > best[t]) {
                    for (int u = KL - 1; u > t; u--) {
                        best[u] = best[u - 1];
                        id[u] = id[u - 1];
                    }
                    best[t] = a;
                    id[t] = i;
                    break;
                }
        }
        memcpy(lists + q * KL, id, sizeof id);
    }
    ra_kv_batch b = batch_of(&L, 0, N);
    b.n_q_heads = H;
    b.n_queries = NQ;
    b.q_train = qt;
    b.train_knn = lists;
    b.train_knn_k = KL;
    int32_t save = lists[3];
    lists[3] = N; /* outside the message */
    assert_int_equal(ra_client_offload(g_c, s, 0, &b), RA_EINVAL);
    assert_non_null(strstr(ra_client_errmsg(g_c), "training list"));
    ra_session_stats ss;
    assert_int_equal(ra_client_session_stats(g_c, s, &ss), RA_OK);
    assert_int_equal(ss.tokens, 0);
    lists[3] = save;
    assert_int_equal(ra_client_offload(g_c, s, 0, &b), RA_OK);
    assert_int_equal(ra_client_wait_ready(g_c, s, 300000), RA_OK);
    assert_int_equal(ra_client_session_stats(g_c, s, &ss), RA_OK);
    assert_int_equal(ss.heads_ready, 1);
    assert_int_equal(ss.tokens, N);
    b.train_knn_k = 0;
    assert_int_equal(ra_client_offload(g_c, s, 0, &b), RA_EINVAL); /* lists without K */
    batch_free(&b);
    free(qt);
    layer_free(&L);
    assert_int_equal(ra_client_session_drop(g_c, s), RA_OK);
}

/* The decoder's merge: daemon result over the offloaded part, local result over the
 * window, combined by the log-sum-exp rule, equals attention over the union. */
static void test_merge_partial(void **state)
{
    (void)state;
    const int H = 2, G = 2, D = 64, N = 1500, LOCAL = 200;
    uint64_t s = new_session(1, H, G, D, RA_DTYPE_F32, RA_CLIENT_INDEX_FLAT);
    layer_data L;
    layer_make(&L, G, N, D, RA_DTYPE_F32);
    ra_kv_batch b = batch_of(&L, 0, N - LOCAL); /* the daemon gets the older tokens */
    assert_int_equal(ra_client_offload(g_c, s, 0, &b), RA_OK);
    batch_free(&b);
    float *q = rand_q(H, D, 2.0f);
    float o[2 * 64], lse[2];
    ra_attend_req r = {.n_q_heads = H, .head_dim = D, .q = q, .top_k = N};
    ra_attend_out out = {.o = o, .lse = lse};
    assert_int_equal(ra_client_attend(g_c, s, 0, &r, &out), RA_OK);
    int *local = malloc(LOCAL * sizeof *local);
    for (int i = 0; i < LOCAL; i++)
        local[i] = N - LOCAL + i;
    for (int h = 0; h < H; h++) {
        const float *K = L.K + (size_t)h * N * D, *V = L.V + (size_t)h * N * D;
        double lo[64], ll, full[64], fl;
        ref_attend(q + h * D, K, V, D, local, LOCAL, 1.0 / sqrt(D), lo, &ll);
        ref_attend(q + h * D, K, V, D, NULL, N, 1.0 / sqrt(D), full, &fl);
        double m = fmax(ll, lse[h]), wa = exp(ll - m), wb = exp(lse[h] - m);
        float merged[64];
        for (int d = 0; d < D; d++)
            merged[d] = (float)((wa * lo[d] + wb * o[h * D + d]) / (wa + wb));
        double mlse = m + log(wa + wb);
        assert_true(rel_err(merged, full, D) <= 1e-3);
        assert_true(fabs(mlse - fl) <= 1e-3 * fmax(1.0, fabs(fl)));
        /* and the daemon part alone is not the answer (the test can fail) */
        assert_true(rel_err(o + h * D, full, D) > 1e-3);
    }
    free(local);
    free(q);
    layer_free(&L);
    assert_int_equal(ra_client_session_drop(g_c, s), RA_OK);
}

/* Send several attends, then wait for them out of order: each gets its own reply and
 * equals the synchronous answer. */
static void test_async_out_of_order(void **state)
{
    (void)state;
    const int Ls = 3, H = 4, G = 2, D = 16, N = 500;
    uint64_t s = new_session(Ls, H, G, D, RA_DTYPE_F32, RA_CLIENT_INDEX_FLAT);
    layer_data L[3];
    float *q[3];
    for (int l = 0; l < Ls; l++) {
        layer_make(&L[l], G, N, D, RA_DTYPE_F32);
        load_layer(s, l, &L[l], N, 0);
        q[l] = rand_q(H, D, 1.0f);
    }
    ra_ticket t[3];
    for (int l = 0; l < Ls; l++) {
        ra_attend_req r = {.n_q_heads = H, .head_dim = D, .q = q[l], .top_k = N};
        assert_int_equal(ra_client_attend_send(g_c, s, l, &r, &t[l]), RA_OK);
    }
    /* an unrelated synchronous call in between parks the attend replies */
    assert_int_equal(ra_client_hello(g_c, NULL), RA_OK);
    for (int l = Ls - 1; l >= 0; l--) {
        float o[4 * 16], lse[4];
        ra_attend_out out = {.o = o, .lse = lse};
        assert_int_equal(ra_client_attend_wait(g_c, t[l], &out, 10000), RA_OK);
        check_exact(&L[l], H, q[l], o, lse, 1e-3);
        /* consumed: a second wait is refused */
        assert_int_equal(ra_client_attend_wait(g_c, t[l], &out, 100), RA_EINVAL);
    }
    for (int l = 0; l < Ls; l++) {
        free(q[l]);
        layer_free(&L[l]);
    }
    assert_int_equal(ra_client_session_drop(g_c, s), RA_OK);
}

/* No daemon: requests time out within their bound; a timed-out ticket stays valid. */
static void test_timeouts(void **state)
{
    (void)state;
    ra_client_opts o;
    ra_client_opts_default(&o);
    o.timeout_ms = 150;
    ra_client *c;
    assert_int_equal(ra_client_open(&c, "ipc:///tmp/ratd-test-nobody-here.sock", &o), RA_OK);
    double t0 = ra_now_s();
    assert_int_equal(ra_client_hello(c, NULL), RA_ETIMEDOUT);
    double dt = ra_now_s() - t0;
    assert_true(dt >= 0.1 && dt < 2.0);
    assert_true(strlen(ra_client_errmsg(c)) > 0);
    float q[8] = {0};
    ra_attend_req r = {.n_q_heads = 1, .head_dim = 8, .q = q, .top_k = 4};
    ra_ticket t;
    assert_int_equal(ra_client_attend_send(c, 1, 0, &r, &t), RA_OK);
    float out_o[8], out_l[1];
    ra_attend_out out = {.o = out_o, .lse = out_l};
    assert_int_equal(ra_client_attend_wait(c, t, &out, 50), RA_ETIMEDOUT);
    /* a spin longer than the wait (and one above the bound, clamped to 100 ms) ends at
     * the wait's deadline */
    ra_client_set_spin_us(c, 1 << 30);
    t0 = ra_now_s();
    assert_int_equal(ra_client_attend_wait(c, t, &out, 50), RA_ETIMEDOUT); /* still valid */
    dt = ra_now_s() - t0;
    assert_true(dt >= 0.04 && dt < 0.095);
    ra_client_set_spin_us(c, 0);
    ra_client_attend_cancel(c, t);
    assert_int_equal(ra_client_attend_wait(c, t, &out, 50), RA_EINVAL);
    ra_client_close(c);
    assert_int_equal(ra_client_open(&c, "bogus://x", &o), RA_EINVAL);
}

static void test_drop_and_unknown_session(void **state)
{
    (void)state;
    uint64_t s = new_session(1, 2, 1, 8, RA_DTYPE_F32, RA_CLIENT_INDEX_FLAT);
    assert_int_equal(ra_client_session_drop(g_c, s), RA_OK);
    assert_int_equal(ra_client_session_drop(g_c, s), RA_ENOSESSION);
    assert_non_null(strstr(ra_client_errmsg(g_c), "no session"));
    float q[16] = {0}, o[16], lse[2];
    ra_attend_req r = {.n_q_heads = 2, .head_dim = 8, .q = q, .top_k = 4};
    ra_attend_out out = {.o = o, .lse = lse};
    assert_int_equal(ra_client_attend(g_c, s, 0, &r, &out), RA_ENOSESSION);
    /* the client is still usable */
    assert_int_equal(ra_client_hello(g_c, NULL), RA_OK);
    assert_string_equal(ra_client_errmsg(g_c), "");
}

static void test_empty_layer_and_layer_bounds(void **state)
{
    (void)state;
    uint64_t s = new_session(2, 2, 2, 8, RA_DTYPE_BF16, RA_CLIENT_INDEX_GRAPH);
    float q[16], o[16], lse[2], sc[2 * 5];
    int64_t pos[2 * 5];
    int32_t cnt[2] = {9, 9};
    for (int i = 0; i < 16; i++)
        q[i] = 1.0f;
    ra_attend_req r = {.n_q_heads = 2, .head_dim = 8, .q = q, .top_k = 5, .want_topk = 1};
    ra_attend_out out = {.o = o, .lse = lse, .pos = pos, .scores = sc, .counts = cnt};
    assert_int_equal(ra_client_attend(g_c, s, 1, &r, &out), RA_OK);
    for (int h = 0; h < 2; h++) {
        assert_true(isinf(lse[h]) && lse[h] < 0);
        assert_int_equal(cnt[h], 0);
        assert_int_equal(pos[h * 5], -1);
        for (int d = 0; d < 8; d++)
            assert_true(o[h * 8 + d] == 0.0f);
    }
    assert_int_equal(ra_client_attend(g_c, s, 2, &r, &out), RA_ENOLAYER);
    assert_non_null(strstr(ra_client_errmsg(g_c), "layer 2"));
    assert_int_equal(ra_client_attend(g_c, s, -1, &r, &out), RA_ENOLAYER);
    /* fewer tokens than top_k: counts say how many, the rest is padding */
    layer_data L;
    layer_make(&L, 2, 3, 8, RA_DTYPE_BF16);
    load_layer(s, 0, &L, 3, 0);
    assert_int_equal(ra_client_attend(g_c, s, 0, &r, &out), RA_OK);
    assert_int_equal(cnt[0], 3);
    assert_int_equal(cnt[1], 3);
    assert_int_equal(pos[4], -1);
    assert_true(isinf(sc[4]));
    layer_free(&L);
    assert_int_equal(ra_client_session_drop(g_c, s), RA_OK);
}

static void test_stats_count(void **state)
{
    (void)state;
    ra_server_stats a, b;
    assert_int_equal(ra_client_stats(g_c, &a), RA_OK);
    uint64_t s = new_session(1, 2, 1, 8, RA_DTYPE_F32, RA_CLIENT_INDEX_FLAT);
    layer_data L;
    layer_make(&L, 1, 50, 8, RA_DTYPE_F32);
    load_layer(s, 0, &L, 30, 2);
    float q[16] = {0}, o[16], lse[2];
    ra_attend_req r = {.n_q_heads = 2, .head_dim = 8, .q = q, .top_k = 10};
    ra_attend_out out = {.o = o, .lse = lse};
    for (int i = 0; i < 5; i++)
        assert_int_equal(ra_client_attend(g_c, s, 0, &r, &out), RA_OK);
    assert_int_equal(ra_client_attend(g_c, s + 1000, 0, &r, &out), RA_ENOSESSION);
    assert_int_equal(ra_client_stats(g_c, &b), RA_OK);
    assert_int_equal(b.ops[RA_OP_ATTEND].count - a.ops[RA_OP_ATTEND].count, 6);
    assert_int_equal(b.ops[RA_OP_ATTEND].errors - a.ops[RA_OP_ATTEND].errors, 1);
    assert_int_equal(b.ops[RA_OP_OFFLOAD].count - a.ops[RA_OP_OFFLOAD].count, 1);
    assert_int_equal(b.ops[RA_OP_APPEND].count - a.ops[RA_OP_APPEND].count, 2);
    assert_int_equal(b.ops[RA_OP_STATS].count - a.ops[RA_OP_STATS].count, 1);
    assert_int_equal(b.sessions, a.sessions + 1);
    assert_int_equal(b.tokens, a.tokens + 50);
    assert_true(b.mem_used > a.mem_used);
    assert_true(b.bytes_in > a.bytes_in && b.bytes_out > a.bytes_out);
    assert_true(b.ops[RA_OP_ATTEND].max_us >=
                b.ops[RA_OP_ATTEND].total_us / b.ops[RA_OP_ATTEND].count);
    assert_string_equal(ra_op_name(RA_OP_ATTEND), "attend");
    layer_free(&L);
    assert_int_equal(ra_client_session_drop(g_c, s), RA_OK);
    assert_int_equal(ra_client_stats(g_c, &b), RA_OK);
    assert_int_equal(b.sessions, a.sessions);
    assert_int_equal(b.tokens, a.tokens);
}

static void test_local_argument_checks(void **state)
{
    (void)state;
    ra_attend_req r = {.n_q_heads = 2, .head_dim = 8, .q = NULL, .top_k = 4};
    float o[16], lse[2];
    ra_attend_out out = {.o = o, .lse = lse};
    assert_int_equal(ra_client_attend(g_c, 1, 0, &r, &out), RA_EINVAL);
    assert_true(strlen(ra_client_errmsg(g_c)) > 0);
    ra_session_desc d;
    ra_session_desc_init(&d);
    uint64_t s;
    assert_int_equal(ra_client_session_create(g_c, &d, &s), RA_EINVAL);
    assert_int_equal(ra_client_session_create(NULL, &d, &s), RA_EINVAL);
    ra_kv_batch b;
    memset(&b, 0, sizeof b);
    b.n_kv_heads = 1;
    b.head_dim = 8;
    b.dtype = RA_DTYPE_F32;
    b.n_tokens = 4; /* but no data */
    assert_int_equal(ra_client_append(g_c, 1, 0, &b), RA_EINVAL);
    /* daemon-side refusals of session shapes */
    d.n_layers = 1;
    d.n_q_heads = 6;
    d.n_kv_heads = 4; /* does not divide */
    d.head_dim = 8;
    assert_int_equal(ra_client_session_create(g_c, &d, &s), RA_EINVAL);
    assert_non_null(strstr(ra_client_errmsg(g_c), "divide"));
    d.n_kv_heads = 2;
    d.head_dim = 100000;
    assert_int_equal(ra_client_session_create(g_c, &d, &s), RA_ETOOBIG);
    assert_non_null(strstr(ra_client_errmsg(g_c), "max-dim"));
}

static void test_tcp_loopback(void **state)
{
    (void)state;
    char ep[64];
    ratd_proc d2;
    int up = -1;
    for (int attempt = 0; attempt < 5 && up != 0; attempt++) { /* a port may be taken */
        snprintf(ep, sizeof ep, "tcp://127.0.0.1:%d",
                 20000 + (int)((getpid() * 7 + attempt * 7919) % 20000));
        g_harness_endpoint = ep;
        up = ratd_start(&d2, "--allow-plain-loopback", NULL);
        if (up != 0)
            unlink(d2.log);
    }
    assert_int_equal(up, 0);
    /* plain (no CURVE) tcp:// lets every local user in: only when asked for */
    char cmd[600];
    snprintf(cmd, sizeof cmd, "%s --endpoint tcp://127.0.0.1:1 >/dev/null 2>&1", getenv("RATD_BIN"));
    int rc = system(cmd);
    assert_true(WIFEXITED(rc) && WEXITSTATUS(rc) == 2);
    ra_client *c = ratd_connect(&d2, 10000);
    assert_non_null(c);
    ra_client *save = g_c;
    g_c = c;
    uint64_t s = new_session(1, 2, 1, 16, RA_DTYPE_F16, RA_CLIENT_INDEX_FLAT);
    layer_data L;
    layer_make(&L, 1, 300, 16, RA_DTYPE_F16);
    load_layer(s, 0, &L, 200, 1);
    float *q = rand_q(2, 16, 1.0f), o[32], lse[2];
    ra_attend_req r = {.n_q_heads = 2, .head_dim = 16, .q = q, .top_k = 300};
    ra_attend_out out = {.o = o, .lse = lse};
    assert_int_equal(ra_client_attend(c, s, 0, &r, &out), RA_OK);
    check_exact(&L, 2, q, o, lse, 1e-2);
    free(q);
    layer_free(&L);
    g_c = save;
    ra_client_close(c);
    assert_int_equal(ratd_stop(&d2), 0);
}

/* Layers sharded over two daemons: answers are exact, each daemon holds only its
 * layers, and a session exists on both until dropped. */
static void test_sharded_layers(void **state)
{
    (void)state;
    ratd_proc d1, d2;
    assert_int_equal(ratd_start(&d1, NULL), 0);
    assert_int_equal(ratd_start(&d2, NULL), 0);
    char eps[700];
    snprintf(eps, sizeof eps, "%s,%s", d1.endpoint, d2.endpoint);
    ra_client_opts o;
    ra_client_opts_default(&o);
    o.timeout_ms = 20000;
    ra_client *c;
    assert_int_equal(ra_client_open(&c, eps, &o), RA_OK);
    ra_server_info info;
    assert_int_equal(ra_client_hello(c, &info), RA_OK);
    assert_int_equal(info.workers, 4); /* 2 + 2 */
    ra_client *save = g_c;
    g_c = c;
    const int Ls = 4, H = 2, G = 1, D = 16, N = 300;
    uint64_t s = new_session(Ls, H, G, D, RA_DTYPE_F32, RA_CLIENT_INDEX_FLAT);
    layer_data L[4];
    for (int l = 0; l < Ls; l++) {
        layer_make(&L[l], G, N + 10 * l, D, RA_DTYPE_F32);
        load_layer(s, l, &L[l], N, 1);
    }
    ra_ticket t[4];
    float *q = rand_q(H, D, 1.0f);
    for (int l = 0; l < Ls; l++) {
        ra_attend_req r = {.n_q_heads = H, .head_dim = D, .q = q, .top_k = N + 40};
        assert_int_equal(ra_client_attend_send(c, s, l, &r, &t[l]), RA_OK);
    }
    for (int l = Ls - 1; l >= 0; l--) {
        float oo[2 * 16], lse[2];
        ra_attend_out out = {.o = oo, .lse = lse};
        assert_int_equal(ra_client_attend_wait(c, t[l], &out, -1), RA_OK);
        check_exact(&L[l], H, q, oo, lse, 1e-3);
    }
    /* daemon 1 holds layers 0 and 2, daemon 2 layers 1 and 3 */
    ra_client *c1 = ratd_connect(&d1, 5000), *c2 = ratd_connect(&d2, 5000);
    ra_server_stats s1, s2, sall;
    assert_int_equal(ra_client_stats(c1, &s1), RA_OK);
    assert_int_equal(ra_client_stats(c2, &s2), RA_OK);
    assert_int_equal(s1.tokens, (uint64_t)(N + N + 20));
    assert_int_equal(s2.tokens, (uint64_t)(N + 10 + N + 30));
    assert_int_equal(s1.sessions, 1);
    assert_int_equal(s2.sessions, 1);
    assert_int_equal(ra_client_stats(c, &sall), RA_OK);
    assert_int_equal(sall.tokens, s1.tokens + s2.tokens);
    assert_int_equal(sall.sessions, 1);
    assert_int_equal(ra_client_session_drop(c, s), RA_OK);
    assert_int_equal(ra_client_stats(c1, &s1), RA_OK);
    assert_int_equal(ra_client_stats(c2, &s2), RA_OK);
    assert_int_equal(s1.sessions + s2.sessions, 0);
    assert_int_equal(ra_client_session_drop(c, s), RA_ENOSESSION);
    ra_client_close(c1);
    ra_client_close(c2);
    g_c = save;
    free(q);
    for (int l = 0; l < Ls; l++)
        layer_free(&L[l]);
    ra_client_close(c);
    assert_int_equal(ratd_stop(&d1), 0);
    assert_int_equal(ratd_stop(&d2), 0);
    assert_int_equal(ra_client_open(&c, "ipc:///tmp/a,,ipc:///tmp/b", &o), RA_EINVAL);
}

/* Placement flags reach the daemon: Hello reports the node and the capability, and
 * an impossible node stops the daemon at start. */
static void test_numa_placement(void **state)
{
    (void)state;
    ratd_proc d;
    assert_int_equal(ratd_start(&d, "--numa-node", "0", NULL), 0);
    ra_client *c = ratd_connect(&d, 5000);
    ra_server_info info;
    assert_int_equal(ra_client_hello(c, &info), RA_OK);
    assert_int_equal(info.numa_node, 0);
    assert_true(info.capabilities & RA_CAP_NUMA);
    ra_client_close(c);
    assert_int_equal(ratd_stop(&d), 0);
    assert_int_equal(ratd_start(&d, "--cpuset", "0", NULL), 0);
    c = ratd_connect(&d, 5000);
    assert_int_equal(ra_client_hello(c, &info), RA_OK);
    assert_true(info.capabilities & RA_CAP_NUMA);
    assert_int_equal(info.numa_node, -1);
    ra_client_close(c);
    assert_int_equal(ratd_stop(&d), 0);
    assert_int_equal(ratd_start(&d, "--numa-node", "4000", NULL), -1);
    assert_true(ratd_log_has(&d, "NUMA node"));
    unlink(d.log);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_index_kind_names),
        cmocka_unit_test(test_hello),
        cmocka_unit_test(test_exact_f32),
        cmocka_unit_test(test_exact_f16),
        cmocka_unit_test(test_exact_bf16),
        cmocka_unit_test(test_exact_spin),
        cmocka_unit_test(test_topk_subset_exact),
        cmocka_unit_test(test_graph_trained_consistent),
        cmocka_unit_test(test_session_stats_ready),
        cmocka_unit_test(test_topk_per_head),
        cmocka_unit_test(test_pscan_session),
        cmocka_unit_test(test_offload_train_lists),
        cmocka_unit_test(test_merge_partial),
        cmocka_unit_test(test_async_out_of_order),
        cmocka_unit_test(test_timeouts),
        cmocka_unit_test(test_drop_and_unknown_session),
        cmocka_unit_test(test_empty_layer_and_layer_bounds),
        cmocka_unit_test(test_stats_count),
        cmocka_unit_test(test_local_argument_checks),
        cmocka_unit_test(test_tcp_loopback),
        cmocka_unit_test(test_sharded_layers),
        cmocka_unit_test(test_numa_placement),
    };
    return cmocka_run_group_tests_name("client", tests, setup, teardown);
}
