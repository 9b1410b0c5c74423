/* Operations of a real ratd (integration): --print-config and config files, --log-file,
 * ListSessions and GetConfig through the client API, the server-side WaitReady (one
 * request however long it waits), the Prometheus endpoint read with a plain HTTP GET,
 * and the ratctl tool. */
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include "../daemon/ratd_harness.h"
#include "ops_util.h"
#include "ra_log.h"

static char g_out[1 << 20];

static const char *bin(const char *var)
{
    const char *b = getenv(var);
    if (!b || !*b)
        fail_msg("%s is not set (run under ctest)", var);
    return b;
}

/* --print-config writes what flags, environment and file merged into; the output read
 * back as a config file gives the same configuration; name=value lines work too. */
static void test_print_config_roundtrip(void **state)
{
    (void)state;
    char cmd[2048], path[128], first[8192];
    snprintf(path, sizeof path, "/tmp/ratd-test-%d.conf", (int)getpid());
    snprintf(cmd, sizeof cmd,
             "RATD_MAX_SESSIONS=7 %s --print-config --workers 3 --mem-limit 1G "
             "--endpoint ipc:///tmp/x.sock > %s",
             bin("RATD_BIN"), path);
    assert_int_equal(system(cmd), 0);
    FILE *f = fopen(path, "r");
    assert_non_null(f);
    size_t n = fread(first, 1, sizeof first - 1, f);
    first[n] = 0;
    fclose(f);
    assert_non_null(strstr(first, "\nworkers 3\n"));
    assert_non_null(strstr(first, "\nmem-limit 1G\n"));
    assert_non_null(strstr(first, "\nmax-sessions 7\n"));
    assert_non_null(strstr(first, "\nendpoint ipc:///tmp/x.sock\n"));
    assert_null(strstr(first, "\nconfig ")); /* a file does not name itself */
    snprintf(cmd, sizeof cmd, "%s --config %s --print-config", bin("RATD_BIN"), path);
    assert_int_equal(run_capture(cmd, g_out, sizeof g_out), 0);
    assert_string_equal(g_out, first);
    /* name=value and name = value */
    f = fopen(path, "w");
    fprintf(f, "workers=5\nmax-batch = 9 # comment\n");
    fclose(f);
    snprintf(cmd, sizeof cmd, "%s --config %s --print-config", bin("RATD_BIN"), path);
    assert_int_equal(run_capture(cmd, g_out, sizeof g_out), 0);
    assert_non_null(strstr(g_out, "\nworkers 5\n"));
    assert_non_null(strstr(g_out, "\nmax-batch 9\n"));
    /* an unknown name in a file names the line */
    f = fopen(path, "w");
    fprintf(f, "workers 2\nno-such-option 1\n");
    fclose(f);
    assert_int_equal(run_capture(cmd, g_out, sizeof g_out), 2);
    assert_non_null(strstr(g_out, ":2: unknown option 'no-such-option'"));
    unlink(path);
}

/* --log-file: log lines go there, dated, with the session named. */
static void test_log_file(void **state)
{
    (void)state;
    char log[128];
    snprintf(log, sizeof log, "/tmp/ratd-test-%d-own.log", (int)getpid());
    unlink(log);
    ratd_proc d;
    assert_int_equal(ratd_start(&d, "--log-file", log, NULL), 0);
    ra_client *c = ratd_connect(&d, 5000);
    uint64_t s = ratd_session_new(c, 1, 2, 1, 8, RA_DTYPE_F32, RA_CLIENT_INDEX_FLAT);
    assert_true(s > 0);
    float q[18] = {0}, o[18], lse[2]; /* [2][9]: a shape the session (dim 8) refuses */
    ra_attend_req r = {.n_q_heads = 2, .head_dim = 9, .q = q, .top_k = 1};
    ra_attend_out out = {.o = o, .lse = lse};
    assert_int_equal(ra_client_attend(c, s, 0, &r, &out), RA_ESHAPE);
    ra_client_close(c);
    assert_int_equal(ratd_stop(&d), 0);
    FILE *f = fopen(log, "r");
    assert_non_null(f);
    size_t n = fread(g_out, 1, sizeof g_out - 1, f);
    g_out[n] = 0;
    fclose(f);
    char want[64];
    snprintf(want, sizeof want, "session %llu (client ", (unsigned long long)s);
    assert_non_null(strstr(g_out, want));
    assert_non_null(strstr(g_out, "): 1 layers, 2 query heads, 1 KV heads, dim 8"));
    snprintf(want, sizeof want, "(attend) session %llu layer 0 from client", (unsigned long long)s);
    assert_non_null(strstr(g_out, want));
    /* 2026-12-01T10:58:01.123Z ratd info: ... */
    int y, mo, da, h, mi, se, ms;
    assert_int_equal(sscanf(g_out, "%d-%d-%dT%d:%d:%d.%dZ ratd ", &y, &mo, &da, &h, &mi, &se, &ms), 7);
    assert_true(y >= 2024 && mo >= 1 && mo <= 12);
    unlink(log);
}

/* ListSessions and GetConfig through the client API. */
static void test_list_sessions_and_config(void **state)
{
    (void)state;
    ratd_proc d;
    assert_int_equal(ratd_start(&d, "--max-sessions", "9", NULL), 0);
    ra_client *c = ratd_connect(&d, 10000);
    size_t n = 99;
    assert_int_equal(ra_client_list_sessions(c, NULL, 0, &n), RA_OK);
    assert_int_equal(n, 0);
    uint64_t a = ratd_session_new(c, 2, 4, 2, 16, RA_DTYPE_F32, RA_CLIENT_INDEX_FLAT);
    uint64_t b = ratd_session_new(c, 1, 2, 1, 8, RA_DTYPE_BF16, RA_CLIENT_INDEX_GRAPH);
    assert_true(a && b);
    float *k, *v;
    assert_int_equal(offload_f32(c, a, 2, 16, 100, 4, 0, &k, &v), RA_OK);
    ra_session_info info[4];
    assert_int_equal(ra_client_list_sessions(c, info, 4, &n), RA_OK);
    assert_int_equal(n, 2);
    /* ids are random: the list is in id order */
    int ia = info[0].id == a ? 0 : 1, ib = 1 - ia;
    assert_int_equal(info[ia].id, a);
    assert_int_equal(info[ia].n_layers, 2);
    assert_int_equal(info[ia].n_q_heads, 4);
    assert_int_equal(info[ia].n_kv_heads, 2);
    assert_int_equal(info[ia].head_dim, 16);
    assert_int_equal(info[ia].dtype, RA_DTYPE_F32);
    assert_int_equal(info[ia].index_kind, RA_CLIENT_INDEX_FLAT);
    assert_int_equal(info[ia].tokens, 100);
    assert_int_equal(info[ia].heads, 2);
    assert_true(info[ia].bytes >= 2 * 100 * 16 * 4 * 2); /* K and V of two heads */
    assert_int_equal(info[ib].id, b);
    assert_int_equal(info[ib].dtype, RA_DTYPE_BF16);
    assert_int_equal(info[ib].tokens, 0);
    assert_true(info[ib].idle_s >= 0 && info[ib].idle_s < 60);
    /* a short array: the count says how many there are */
    assert_int_equal(ra_client_list_sessions(c, info, 1, &n), RA_OK);
    assert_int_equal(n, 2);
    assert_int_equal(ra_client_session_drop(c, a), RA_OK);
    assert_int_equal(ra_client_list_sessions(c, info, 4, &n), RA_OK);
    assert_int_equal(n, 1);
    assert_int_equal(info[0].id, b);
    char cfg[8192];
    assert_int_equal(ra_client_get_config(c, cfg, sizeof cfg), RA_OK);
    assert_non_null(strstr(cfg, "workers 2\n"));
    assert_non_null(strstr(cfg, "max-sessions 9\n"));
    char ep[400];
    snprintf(ep, sizeof ep, "endpoint %s\n", d.endpoint);
    assert_non_null(strstr(cfg, ep));
    assert_int_equal(ra_client_get_config(c, cfg, 16), RA_ETOOBIG);
    free(k);
    free(v);
    ra_client_close(c);
    assert_int_equal(ratd_stop(&d), 0);
}

/* ra_client_wait_ready is answered by the daemon when the builds end: one request, not
 * a poll of Stats (the Stats counter moves only by the Stats calls of the test). */
static void test_wait_ready_is_one_request(void **state)
{
    (void)state;
    ratd_proc d;
    assert_int_equal(ratd_start(&d, NULL), 0);
    ra_client *c = ratd_connect(&d, 30000);
    uint64_t s = ratd_session_new(c, 1, 4, 2, 32, RA_DTYPE_F32, RA_CLIENT_INDEX_GRAPH);
    assert_true(s > 0);
    float *k, *v;
    assert_int_equal(offload_f32(c, s, 2, 32, 6000, 4, 512, &k, &v), RA_OK);
    ra_server_stats before, after;
    assert_int_equal(ra_client_stats(c, &before), RA_OK);
    assert_int_equal(ra_client_wait_ready(c, s, 60000), RA_OK);
    assert_int_equal(ra_client_stats(c, &after), RA_OK);
    assert_int_equal(after.ops[RA_OP_STATS].count - before.ops[RA_OP_STATS].count, 1);
    assert_int_equal(after.requests - before.requests, 2); /* the WaitReady and one Stats */
    ra_session_stats ss;
    assert_int_equal(ra_client_session_stats(c, s, &ss), RA_OK);
    assert_int_equal(ss.heads_building, 0);
    assert_int_equal(ss.heads_ready, 2);
    assert_int_equal(ra_client_wait_ready(c, s + 100, 1000), RA_ENOSESSION);
    /* a build that outlasts the wait: RA_ETIMEDOUT, and the daemon says how many run */
    uint64_t s2 = ratd_session_new(c, 1, 4, 2, 64, RA_DTYPE_F32, RA_CLIENT_INDEX_GRAPH);
    float *k2, *v2;
    assert_int_equal(offload_f32(c, s2, 2, 64, 40000, 4, 2048, &k2, &v2), RA_OK);
    assert_int_equal(ra_client_session_stats(c, s2, &ss), RA_OK);
    if (ss.heads_building > 0) {
        double t0 = ra_now_s();
        assert_int_equal(ra_client_wait_ready(c, s2, 50), RA_ETIMEDOUT);
        assert_true(ra_now_s() - t0 < 2.0);
        assert_non_null(strstr(ra_client_errmsg(c), "index builds still running"));
    } else {
        fprintf(stderr, "# the 40000-key build ended before the check; timeout not exercised\n");
    }
    free(k);
    free(v);
    free(k2);
    free(v2);
    ra_client_close(c);
    assert_int_equal(ratd_stop(&d), 0);
}

/* The Prometheus endpoint, read with a plain HTTP GET. */
static void test_metrics_endpoint(void **state)
{
    (void)state;
    int port = free_port();
    assert_true(port > 0);
    char mep[64];
    snprintf(mep, sizeof mep, "tcp://127.0.0.1:%d", port);
    ratd_proc d;
    assert_int_equal(ratd_start(&d, "--metrics", mep, NULL), 0);
    ra_client *c = ratd_connect(&d, 10000);
    uint64_t s = ratd_session_new(c, 1, 2, 1, 16, RA_DTYPE_F32, RA_CLIENT_INDEX_FLAT);
    float *k, *v;
    assert_int_equal(offload_f32(c, s, 1, 16, 200, 2, 0, &k, &v), RA_OK);
    float q[32], o[32], lse[2];
    for (int i = 0; i < 32; i++)
        q[i] = 0.1f * (float)i;
    ra_attend_req r = {.n_q_heads = 2, .head_dim = 16, .q = q, .top_k = 8};
    ra_attend_out out = {.o = o, .lse = lse};
    for (int i = 0; i < 5; i++)
        assert_int_equal(ra_client_attend(c, s, 0, &r, &out), RA_OK);
    r.head_dim = 15;
    assert_int_equal(ra_client_attend(c, s, 0, &r, &out), RA_ESHAPE);
    usleep(400 * 1000); /* the snapshot of sessions and memory is refreshed every 250 ms */
    assert_int_equal(http_get(port, "GET", "/metrics", g_out, sizeof g_out), 200);
    assert_non_null(strstr(g_out, "Content-Type: text/plain; version=0.0.4"));
    assert_true(metric(g_out, "ratd_requests_total{type=\"attend\"}") == 6);
    assert_true(metric(g_out, "ratd_request_errors_total{type=\"attend\"}") == 1);
    assert_true(metric(g_out, "ratd_requests_total{type=\"offload\"}") == 1);
    assert_true(metric(g_out, "ratd_request_duration_seconds_count{type=\"attend\"}") == 6);
    assert_true(metric(g_out, "ratd_request_duration_seconds_bucket{type=\"attend\",le=\"+Inf\"}") == 6);
    assert_true(metric(g_out, "ratd_request_duration_seconds_sum{type=\"attend\"}") > 0);
    double p50 = metric(g_out, "ratd_request_duration_quantile_seconds{type=\"attend\",quantile=\"0.5\"}");
    double p999 = metric(g_out, "ratd_request_duration_quantile_seconds{type=\"attend\",quantile=\"0.999\"}");
    assert_true(p50 > 0 && p999 >= p50 && p999 < 60);
    assert_true(metric(g_out, "ratd_sessions") == 1);
    char name[96];
    snprintf(name, sizeof name, "ratd_session_memory_bytes{session=\"%llu\"}", (unsigned long long)s);
    assert_true(metric(g_out, name) >= 2 * 200 * 16 * 4);
    assert_true(metric(g_out, "ratd_memory_used_bytes") >= metric(g_out, name));
    assert_true(metric(g_out, "ratd_uptime_seconds") > 0);
    assert_false(isnan(metric(g_out, "ratd_index_builds{state=\"running\"}")));
    assert_false(isnan(metric(g_out, "ratd_index_builds_total{result=\"built\"}")));
    assert_true(metric(g_out, "ratd_index_probes_total") >= 0);
    assert_true(metric(g_out, "ratd_index_effort_changes_total{direction=\"up\"}") >= 0);
    assert_true(metric(g_out, "ratd_index_effort_changes_total{direction=\"down\"}") >= 0);
    assert_true(metric(g_out, "ratd_resident_memory_bytes") > 1e6);
    /* reading the metrics is no request of the daemon's */
    ra_server_stats st;
    assert_int_equal(ra_client_stats(c, &st), RA_OK);
    assert_int_equal(st.ops[RA_OP_ATTEND].count, 6);
    assert_int_equal(http_get(port, "GET", "/nope", g_out, sizeof g_out), 404);
    assert_int_equal(http_get(port, "POST", "/metrics", g_out, sizeof g_out), 405);
    free(k);
    free(v);
    ra_client_close(c);
    assert_int_equal(ratd_stop(&d), 0);
    /* a non-loopback metrics address needs --allow-remote: refused at start */
    char cmd[1024];
    snprintf(cmd, sizeof cmd, "%s --endpoint ipc:///tmp/ratd-test-%d-m.sock --metrics tcp://0.0.0.0:%d",
             bin("RATD_BIN"), (int)getpid(), port);
    assert_int_equal(run_capture(cmd, g_out, sizeof g_out), 2); /* not allowed: exit 2 */
    assert_non_null(strstr(g_out, "needs --metrics-allow-remote"));
    snprintf(cmd, sizeof cmd, "%s --endpoint ipc:///tmp/ratd-test-%d-m.sock --metrics 127.0.0.1",
             bin("RATD_BIN"), (int)getpid());
    assert_int_equal(run_capture(cmd, g_out, sizeof g_out), 2);
    assert_non_null(strstr(g_out, "expected tcp://host:port"));
}

/* ListSessions of more sessions than a request header could name (a reply header over
 * 64 KiB): every one listed, in id order; ratctl lists them too. */
static void test_list_many_sessions(void **state)
{
    (void)state;
    enum { N = 1500 };
    ratd_proc d;
    assert_int_equal(ratd_start(&d, "--max-sessions", "2000", NULL), 0);
    ra_client *c = ratd_connect(&d, 10000);
    for (int i = 0; i < N; i++)
        assert_true(ratd_session_new(c, 1, 2, 1, 8, RA_DTYPE_F32, RA_CLIENT_INDEX_FLAT) > 0);
    static ra_session_info info[N];
    size_t n = 0;
    assert_int_equal(ra_client_list_sessions(c, info, N, &n), RA_OK);
    assert_int_equal(n, N);
    for (int i = 1; i < N; i++)
        assert_true(info[i].id > info[i - 1].id);
    char cmd[1024];
    snprintf(cmd, sizeof cmd, "%s --endpoint %s --json sessions", bin("RATCTL_BIN"), d.endpoint);
    assert_int_equal(run_capture(cmd, g_out, sizeof g_out), 0);
    char want[64];
    snprintf(want, sizeof want, "{\"id\": %llu, ", (unsigned long long)info[N - 1].id);
    assert_non_null(strstr(g_out, want));
    ra_client_close(c);
    assert_int_equal(ratd_stop(&d), 0);
}

/* Runs ratctl with `args` against endpoint ep: its exit status must be rc and its
 * output must contain `needle`. */
static void ctl_expect(const char *ctl, const char *ep, const char *args, int rc, const char *needle)
{
    char cmd[1024];
    snprintf(cmd, sizeof cmd, "%s --endpoint %s %s", ctl, ep, args);
    int got = run_capture(cmd, g_out, sizeof g_out);
    if (got != rc || !strstr(g_out, needle))
        fail_msg("ratctl %s: exit %d (want %d), output lacks '%s':\n%s", args, got, rc, needle, g_out);
}

/* ratctl against a daemon with one session, for a person and with --json. */
static void test_ratctl(void **state)
{
    (void)state;
    ratd_proc d;
    assert_int_equal(ratd_start(&d, NULL), 0);
    ra_client *c = ratd_connect(&d, 10000);
    uint64_t s = ratd_session_new(c, 3, 8, 2, 32, RA_DTYPE_F16, RA_CLIENT_INDEX_FLAT);
    assert_true(s > 0);
    const char *ctl = bin("RATCTL_BIN");
    ctl_expect(ctl, d.endpoint, "ping", 0, "protocol 1, 2 workers");
    ctl_expect(ctl, d.endpoint, "--json ping", 0, "\"workers\": 2");
    ctl_expect(ctl, d.endpoint, "stats", 0, "1 sessions");
    ctl_expect(ctl, d.endpoint, "stats", 0, "create ");
    ctl_expect(ctl, d.endpoint, "--json stats", 0, "\"sessions\": 1,");
    ctl_expect(ctl, d.endpoint, "sessions", 0, "3 x 8/2 x 32");
    ctl_expect(ctl, d.endpoint, "sessions", 0, "f16");
    char want[64], drop[128];
    snprintf(want, sizeof want, "{\"id\": %llu, \"n_layers\": 3", (unsigned long long)s);
    ctl_expect(ctl, d.endpoint, "--json sessions", 0, want);
    ctl_expect(ctl, d.endpoint, "config", 0, "workers 2\n");
    ctl_expect(ctl, d.endpoint, "--json config", 0, "\"workers\": \"2\"");
    ra_session_token tok;
    assert_int_equal(ra_client_session_token(c, s, &tok), RA_OK);
    char hex[2 * sizeof tok.bytes + 1], bad[2 * sizeof tok.bytes + 1];
    for (size_t i = 0; i < sizeof tok.bytes; i++)
        snprintf(hex + 2 * i, 3, "%02x", tok.bytes[i]);
    memcpy(bad, hex, sizeof bad);
    bad[0] = bad[0] == '0' ? '1' : '0'; /* another token */
    snprintf(drop, sizeof drop, "drop %llu %s", (unsigned long long)s, bad);
    ctl_expect(ctl, d.endpoint, drop, 1, "unknown session"); /* not its token */
    snprintf(drop, sizeof drop, "drop %llu", (unsigned long long)s);
    ctl_expect(ctl, d.endpoint, drop, 2, "two arguments");
    snprintf(drop, sizeof drop, "drop %llu %s", (unsigned long long)s, hex);
    ctl_expect(ctl, d.endpoint, drop, 0, "dropped");
    ctl_expect(ctl, d.endpoint, drop, 1, "unknown session"); /* gone now */
    ctl_expect(ctl, d.endpoint, "--json sessions", 0, "\"sessions\": []");
    ctl_expect(ctl, d.endpoint, "drop abc 00", 2, "not a session id");
    ctl_expect(ctl, d.endpoint, "drop 1 xyz", 2, "32 hex digits");
    ctl_expect(ctl, d.endpoint, "frobnicate", 2, "unknown command");
    ra_client_close(c);
    assert_int_equal(ratd_stop(&d), 0);
    /* no daemon: a clear failure within the timeout */
    ctl_expect(ctl, d.endpoint, "--timeout-ms 300 ping", 1, "timed out");
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_print_config_roundtrip), cmocka_unit_test(test_log_file),
        cmocka_unit_test(test_list_sessions_and_config), cmocka_unit_test(test_list_many_sessions),
        cmocka_unit_test(test_wait_ready_is_one_request),
        cmocka_unit_test(test_metrics_endpoint),       cmocka_unit_test(test_ratctl),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
