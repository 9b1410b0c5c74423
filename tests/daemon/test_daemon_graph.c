/* Integration tests of prebuilt graphs on the wire (Offload frames GRAPH_ADJ and
 * GRAPH_ENTRIES, ra_kv_batch.graph_adj) against a real ratd: a valid graph is installed
 * instead of the daemon's own build (the head is ready, searches return exact scores,
 * recall is comparable to the daemon's own build on the same data, the index is charged
 * to the session); every kind of bad graph is refused with RA_EINVAL (RA_ESHAPE for a
 * frame of the wrong shape) naming the KV head, row and slot, with nothing stored, and the
 * session keeps working; a layer that holds tokens, an Append, a non-graph session and a
 * graph without entries are refused too. Raw frames (ra_proto) reach the daemon with what
 * the client library would refuse itself (degree 256, shapes that disagree). */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include "../daemon/ratd_harness.h"
#include "ra_proto.h"

enum { N = 1200, D = 32, G = 2, H = 4, NQ = 64, M = 12, NE = 3, TOPK = 20 };

static ratd_proc g_d;
static ra_client *g_c;
static void *g_ctx;
static float *g_k, *g_v, *g_tq; /* [G][N][D], [G][N][D], [H][NQ][D] */
static int64_t g_pos[N];
static int32_t g_adj[G * N * M], g_ent[G * NE];

static double dotd(const float *a, const float *b)
{
    double s = 0;
    for (int d = 0; d < D; d++)
        s += (double)a[d] * b[d];
    return s;
}

/* A valid graph per KV head: the exact inner-product top M-1 of every key, plus the
 * next key (u + 1) % N, which makes every key reachable from any entry. */
static void make_graph(void)
{
    double *s = malloc(sizeof(double) * N);
    for (int g = 0; g < G; g++) {
        const float *K = g_k + (size_t)g * N * D;
        for (int u = 0; u < N; u++) {
            int32_t *row = g_adj + ((size_t)g * N + u) * M;
            int next = (u + 1) % N, m = 0;
            for (int v = 0; v < N; v++)
                s[v] = v == u || v == next ? -INFINITY : dotd(K + (size_t)u * D, K + (size_t)v * D);
            row[m++] = next;
            while (m < M) {
                int b = 0;
                for (int v = 1; v < N; v++)
                    if (s[v] > s[b])
                        b = v;
                row[m++] = b;
                s[b] = -INFINITY;
            }
        }
        for (int e = 0; e < NE; e++)
            g_ent[g * NE + e] = e * (N / NE);
    }
    free(s);
}

static ra_kv_batch batch(const int32_t *adj, const int32_t *ent, int with_q)
{
    ra_kv_batch b = {.n_kv_heads = G,
                     .head_dim = D,
                     .dtype = RA_DTYPE_F32,
                     .n_tokens = N,
                     .k = g_k,
                     .v = g_v,
                     .pos = g_pos,
                     .n_q_heads = with_q ? H : 0,
                     .n_queries = with_q ? NQ : 0,
                     .q_train = with_q ? g_tq : NULL,
                     .graph_adj = adj,
                     .graph_degree = adj ? M : 0,
                     .graph_entries = ent,
                     .graph_n_entries = ent ? NE : 0};
    return b;
}

static uint64_t graph_session(void)
{
    uint64_t s = ratd_session_new(g_c, 2, H, G, D, RA_DTYPE_F32, RA_CLIENT_INDEX_GRAPH);
    if (!s)
        fail_msg("session_create: %s", ra_client_errmsg(g_c));
    return s;
}

static uint64_t session_tokens(uint64_t s)
{
    ra_session_stats ss;
    assert_int_equal(ra_client_session_stats(g_c, s, &ss), RA_OK);
    return ss.tokens;
}

/* Mean recall@TOPK of 40 decode-like queries against the exact top (double), and the
 * largest relative error of a returned score against q.k. */
static double recall_of(uint64_t s, double *max_err)
{
    float q[H * D], o[H * D], lse[H], sc[H * TOPK];
    int64_t pos[H * TOPK];
    int32_t cnt[H];
    double hit = 0, tot = 0, err = 0;
    double *ex = malloc(sizeof(double) * N);
    for (int t = 0; t < 40; t++) {
        for (int i = 0; i < H * D; i++)
            q[i] = 1.0f + rnd_norm(); /* the training queries' distribution */
        ra_attend_req r = {
            .n_q_heads = H, .head_dim = D, .q = q, .top_k = TOPK, .want_topk = 1};
        ra_attend_out out = {.o = o, .lse = lse, .pos = pos, .scores = sc, .counts = cnt};
        assert_int_equal(ra_client_attend(g_c, s, 0, &r, &out), RA_OK);
        for (int h = 0; h < H; h++) {
            const float *K = g_k + (size_t)(h / (H / G)) * N * D;
            for (int i = 0; i < N; i++)
                ex[i] = dotd(q + h * D, K + (size_t)i * D);
            assert_int_equal(cnt[h], TOPK);
            for (int j = 0; j < cnt[h]; j++) {
                int64_t p = pos[h * TOPK + j];
                assert_true(p >= 0 && p < N);
                double e = fabs(sc[h * TOPK + j] - ex[p]) / (fabs(ex[p]) + 1.0);
                err = e > err ? e : err;
                int better = 0; /* p is in the exact top when fewer than TOPK beat it */
                for (int i = 0; i < N; i++)
                    better += ex[i] > ex[p];
                hit += better < TOPK;
            }
            tot += TOPK;
        }
    }
    free(ex);
    *max_err = err;
    return hit / tot;
}

/* ---- raw frames: what the client library would refuse itself ------------------------- */

static int raw_offload(uint64_t session, uint32_t gdeg, const int32_t *adj, const uint64_t *ashape,
                       const int32_t *ent, const uint64_t *eshape, int type, char *msg,
                       size_t msglen)
{
    void *s = zmq_socket(g_ctx, ZMQ_DEALER);
    int linger = 0;
    zmq_setsockopt(s, ZMQ_LINGER, &linger, sizeof linger);
    assert_int_equal(zmq_connect(s, g_d.endpoint), 0);
    Ratd__Header h = RATD__HEADER__INIT;
    Ratd__OffloadParams op = RATD__OFFLOAD_PARAMS__INIT;
    h.version = RA_PROTO_VERSION;
    h.request_id = 77;
    h.type = (Ratd__MsgType)type;
    h.session = session;
    ra_session_token tok; /* the session's owner token, as the client library sends it */
    assert_int_equal(ra_client_session_token(g_c, session, &tok), RA_OK);
    h.token.data = tok.bytes;
    h.token.len = sizeof tok.bytes;
    op.graph_degree = gdeg;
    h.offload = &op;
    size_t kb = (size_t)G * N * D * sizeof(float);
    ra_proto_part p[5] = {
        {RATD__ROLE__K, RATD__DTYPE__F32, 3, {G, N, D}, g_k, kb, 0},
        {RATD__ROLE__V, RATD__DTYPE__F32, 3, {G, N, D}, g_v, kb, 0},
        {RATD__ROLE__POS, RATD__DTYPE__I64, 1, {N}, g_pos, N * sizeof(int64_t), 0},
        {RATD__ROLE__GRAPH_ADJ, RATD__DTYPE__I32, 3, {ashape[0], ashape[1], ashape[2]}, adj,
         (size_t)(ashape[0] * ashape[1] * ashape[2]) * sizeof(int32_t), 0},
        {RATD__ROLE__GRAPH_ENTRIES, RATD__DTYPE__I32, 2, {eshape[0], eshape[1]}, ent,
         (size_t)(eshape[0] * eshape[1]) * sizeof(int32_t), 0},
    };
    assert_int_equal(ra_proto_send(s, NULL, 0, &h, p, 5), 0);
    zmq_pollitem_t it = {s, 0, ZMQ_POLLIN, 0};
    assert_true(zmq_poll(&it, 1, 20000) > 0);
    ra_proto_msg m;
    assert_int_equal(ra_proto_recv(s, &m, 0), 0);
    ra_proto_view v;
    char err[RA_PROTO_ERRLEN];
    if (ra_proto_parse(&m, 0, NULL, &v, NULL, NULL, err, sizeof err) != RA_OK)
        fail_msg("malformed reply: %s", err);
    int st = v.hdr->status;
    snprintf(msg, msglen, "%s", v.hdr->message ? v.hdr->message : "");
    ra_proto_view_free(&v);
    ra_proto_msg_close(&m);
    zmq_close(s);
    return st;
}

/* ---- setup ------------------------------------------------------------------------------- */

static int setup(void **state)
{
    (void)state;
    if (ratd_start(&g_d, NULL) != 0)
        return -1;
    g_c = ratd_connect(&g_d, 60000);
    g_ctx = zmq_ctx_new();
    g_k = rnd_vec((size_t)G * N * D, 1.0f);
    g_v = rnd_vec((size_t)G * N * D, 1.0f);
    g_tq = rnd_vec((size_t)H * NQ * D, 1.0f);
    for (int i = 0; i < H * NQ * D; i++)
        g_tq[i] += 1.0f; /* out of distribution for the keys, like decode queries */
    for (int i = 0; i < N; i++)
        g_pos[i] = i;
    make_graph();
    return g_c ? 0 : -1;
}

static int teardown(void **state)
{
    (void)state;
    ra_client_close(g_c);
    zmq_ctx_term(g_ctx);
    free(g_k), free(g_v), free(g_tq);
    return ratd_stop(&g_d) == 0 ? 0 : -1;
}

/* ---- tests ------------------------------------------------------------------------------- */

static void test_capability(void **state)
{
    (void)state;
    ra_server_info info;
    assert_int_equal(ra_client_hello(g_c, &info), RA_OK);
    assert_true(info.capabilities & RA_CAP_GRAPH_ADJ);
}

/* A valid graph: installed (ready, charged), exact scores, recall like the daemon's own
 * build of the same tokens and training queries. */
static void test_valid_graph(void **state)
{
    (void)state;
    uint64_t s = graph_session(), own = graph_session();
    ra_kv_batch b = batch(g_adj, g_ent, 1);
    assert_int_equal(ra_client_offload(g_c, s, 0, &b), RA_OK);
    ra_kv_batch bo = batch(NULL, NULL, 1);
    assert_int_equal(ra_client_offload(g_c, own, 0, &bo), RA_OK);
    assert_int_equal(ra_client_wait_ready(g_c, s, 60000), RA_OK);
    assert_int_equal(ra_client_wait_ready(g_c, own, 120000), RA_OK);
    ra_session_stats ss, so;
    assert_int_equal(ra_client_session_stats(g_c, s, &ss), RA_OK);
    assert_int_equal(ra_client_session_stats(g_c, own, &so), RA_OK);
    assert_int_equal(ss.tokens, N);
    assert_int_equal(ss.heads_ready, G);
    /* charged like a built graph: at least K, V, positions and the adjacency */
    uint64_t kv = (uint64_t)G * N * (2 * D * sizeof(float) + sizeof(int64_t));
    assert_true(ss.bytes >= kv + (uint64_t)G * N * M * sizeof(int32_t));
    double err_g, err_o;
    double rg = recall_of(s, &err_g), ro = recall_of(own, &err_o);
    print_message("recall@%d: installed graph %.3f, daemon's own build %.3f (max score error "
                  "%.2g / %.2g)\n",
                  TOPK, rg, ro, err_g, err_o);
    assert_true(err_g < 1e-5);
    assert_true(rg >= 0.9);
    assert_true(rg >= ro - 0.05);
    /* appended tokens are inserted into the installed graph and found */
    float *k2 = rnd_vec((size_t)G * 8 * D, 1.0f), *v2 = rnd_vec((size_t)G * 8 * D, 1.0f);
    for (int i = 0; i < G * 8 * D; i++)
        k2[i] = 3.0f; /* the best key of every positive query */
    int64_t p2[8];
    for (int i = 0; i < 8; i++)
        p2[i] = N + i;
    ra_kv_batch ba = {.n_kv_heads = G, .head_dim = D, .dtype = RA_DTYPE_F32, .n_tokens = 8,
                      .k = k2, .v = v2, .pos = p2};
    assert_int_equal(ra_client_append(g_c, s, 0, &ba), RA_OK);
    float q[H * D], o[H * D], lse[H], sc[H * TOPK];
    int64_t pos[H * TOPK];
    int32_t cnt[H];
    for (int i = 0; i < H * D; i++)
        q[i] = 1.0f;
    ra_attend_req r = {.n_q_heads = H, .head_dim = D, .q = q, .top_k = TOPK, .want_topk = 1};
    ra_attend_out out = {.o = o, .lse = lse, .pos = pos, .scores = sc, .counts = cnt};
    assert_int_equal(ra_client_attend(g_c, s, 0, &r, &out), RA_OK);
    for (int h = 0; h < H; h++)
        assert_true(pos[h * TOPK] >= N);
    free(k2), free(v2);
    assert_int_equal(ra_client_session_drop(g_c, s), RA_OK);
    assert_int_equal(ra_client_session_drop(g_c, own), RA_OK);
}

typedef struct bad_case {
    const char *what;
    int head, row, slot; /* where the change goes (slot -1: the entries) */
    int32_t value;       /* the new id (INT32_MIN: cut every edge into `row`) */
    const char *expect;  /* in the daemon's message */
} bad_case;

/* Every kind of bad graph in KV head 1 (head 0 stays valid): refused with RA_EINVAL and a
 * message naming head, row and slot; nothing stored; then the session takes a valid one. */
static void test_bad_graphs(void **state)
{
    (void)state;
    uint64_t s = graph_session();
    int32_t *adj = malloc(sizeof g_adj), ent[G * NE];
    const int32_t *row5 = g_adj + ((size_t)1 * N + 5) * M;
    const bad_case cases[] = {
        {"out of range", 1, 17, 3, N, "KV head 1 refused: graph row 17 slot 3 is 1200"},
        {"below -1", 1, 17, 4, -2, "row 17 slot 4 is -2"},
        {"self edge", 1, 9, 0, 9, "row 9 slot 0 is the row itself"},
        {"duplicate", 1, 5, 2, row5[1], "row 5 slot 2 repeats"},
        {"unreachable", 1, 42, 0, INT32_MIN, "row 42 is not reachable"},
        {"entry out of range", 1, 0, -1, N + 5, "graph entry 0 is 1205"},
        {"entry repeated", 1, 1, -1, 0, "graph entry 1 repeats row 0"},
    };
    for (size_t c = 0; c < sizeof cases / sizeof cases[0]; c++) {
        const bad_case *bc = &cases[c];
        memcpy(adj, g_adj, sizeof g_adj);
        memcpy(ent, g_ent, sizeof ent);
        int32_t *A = adj + (size_t)bc->head * N * M;
        if (bc->slot < 0) {
            ent[bc->head * NE + bc->row] = bc->value;
        } else if (bc->value == INT32_MIN) { /* no edge into `row` */
            for (size_t i = 0; i < (size_t)N * M; i++)
                if (A[i] == bc->row)
                    A[i] = -1;
        } else {
            A[(size_t)bc->row * M + bc->slot] = bc->value;
        }
        ra_kv_batch b = batch(adj, ent, 1);
        ra_status st = ra_client_offload(g_c, s, 0, &b);
        const char *msg = ra_client_errmsg(g_c);
        if (st != RA_EINVAL || !strstr(msg, bc->expect))
            fail_msg("%s: got %s \"%s\", expected EINVAL with \"%s\"", bc->what, ra_strerror(st),
                     msg, bc->expect);
        assert_non_null(strstr(msg, "nothing stored"));
        assert_int_equal(session_tokens(s), 0);
    }
    /* a degree over 255: the client refuses it; raw frames reach the daemon, which does */
    ra_kv_batch b = batch(g_adj, g_ent, 0);
    b.graph_degree = 256;
    assert_int_equal(ra_client_offload(g_c, s, 0, &b), RA_EINVAL);
    assert_non_null(strstr(ra_client_errmsg(g_c), "graph_degree"));
    char msg[RA_PROTO_ERRLEN];
    int32_t *wide = calloc((size_t)G * N * 256, sizeof *wide);
    uint64_t a256[3] = {G, N, 256}, es[2] = {G, NE};
    assert_int_equal(raw_offload(s, 256, wide, a256, g_ent, es, RATD__MSG_TYPE__OFFLOAD, msg,
                                 sizeof msg),
                     RA_EINVAL);
    assert_non_null(strstr(msg, "1..255"));
    free(wide);
    /* shapes that disagree with the keys or with the declared degree */
    uint64_t a_rows[3] = {G, N - 1, M}, a_m[3] = {G, N, M - 1}, a_g[3] = {1, N, M};
    uint64_t e_g[2] = {G + 1, NE};
    assert_int_equal(raw_offload(s, M, g_adj, a_rows, g_ent, es, RATD__MSG_TYPE__OFFLOAD, msg,
                                 sizeof msg),
                     RA_ESHAPE);
    assert_non_null(strstr(msg, "GRAPH_ADJ"));
    assert_int_equal(raw_offload(s, M, g_adj, a_m, g_ent, es, RATD__MSG_TYPE__OFFLOAD, msg,
                                 sizeof msg),
                     RA_ESHAPE);
    assert_int_equal(raw_offload(s, M, g_adj, a_g, g_ent, es, RATD__MSG_TYPE__OFFLOAD, msg,
                                 sizeof msg),
                     RA_ESHAPE);
    int32_t *ent3 = calloc((size_t)(G + 1) * NE, sizeof *ent3);
    uint64_t ok_a[3] = {G, N, M};
    assert_int_equal(raw_offload(s, M, g_adj, ok_a, ent3, e_g, RATD__MSG_TYPE__OFFLOAD, msg,
                                 sizeof msg),
                     RA_ESHAPE);
    assert_non_null(strstr(msg, "GRAPH_ENTRIES"));
    free(ent3);
    /* no degree declared; an Append with a graph */
    assert_int_equal(raw_offload(s, 0, g_adj, ok_a, g_ent, es, RATD__MSG_TYPE__OFFLOAD, msg,
                                 sizeof msg),
                     RA_EINVAL);
    assert_int_equal(raw_offload(s, M, g_adj, ok_a, g_ent, es, RATD__MSG_TYPE__APPEND, msg,
                                 sizeof msg),
                     RA_EPROTO);
    assert_int_equal(session_tokens(s), 0);
    /* the session keeps working: the valid graph goes in now */
    ra_kv_batch good = batch(g_adj, g_ent, 1);
    assert_int_equal(ra_client_offload(g_c, s, 0, &good), RA_OK);
    assert_int_equal(ra_client_wait_ready(g_c, s, 60000), RA_OK);
    assert_int_equal(session_tokens(s), N);
    double err;
    assert_true(recall_of(s, &err) >= 0.9);
    free(adj);
    assert_int_equal(ra_client_session_drop(g_c, s), RA_OK);
}

/* A graph only for the first tokens of a layer, only in a graph session. */
static void test_graph_refused_where_it_cannot_go(void **state)
{
    (void)state;
    uint64_t s = graph_session();
    ra_kv_batch plain = batch(NULL, NULL, 0);
    assert_int_equal(ra_client_offload(g_c, s, 1, &plain), RA_OK);
    ra_kv_batch b = batch(g_adj, g_ent, 0);
    assert_int_equal(ra_client_offload(g_c, s, 1, &b), RA_EINVAL);
    assert_non_null(strstr(ra_client_errmsg(g_c), "first tokens of a layer"));
    assert_int_equal(session_tokens(s), N);
    /* without training queries the graph still goes in (no routing queries then) */
    assert_int_equal(ra_client_offload(g_c, s, 0, &b), RA_OK);
    assert_int_equal(ra_client_wait_ready(g_c, s, 60000), RA_OK);
    double err;
    assert_true(recall_of(s, &err) >= 0.85);
    assert_int_equal(ra_client_session_drop(g_c, s), RA_OK);
    uint64_t f = ratd_session_new(g_c, 1, H, G, D, RA_DTYPE_F32, RA_CLIENT_INDEX_FLAT);
    assert_int_equal(ra_client_offload(g_c, f, 0, &b), RA_EINVAL);
    assert_non_null(strstr(ra_client_errmsg(g_c), "graph only"));
    assert_int_equal(ra_client_session_drop(g_c, f), RA_OK);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_capability),
        cmocka_unit_test(test_valid_graph),
        cmocka_unit_test(test_bad_graphs),
        cmocka_unit_test(test_graph_refused_where_it_cannot_go),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
