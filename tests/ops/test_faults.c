/* Fault drills against a real ratd (integration): the daemon SIGKILLed with an Attend in
 * flight (the client returns a clear status within its deadline), a restarted daemon on
 * the same endpoint serving new sessions, an Offload beyond --mem-limit refused by the
 * daemon (not the kernel), an unwritable log path refused at start, and the reference
 * decoder (ratd-lm-eval, ratd mode) falling back to window-only attention, with a
 * warning, when its daemon dies mid-run. */
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include "../daemon/ratd_harness.h"
#include "ops_util.h"
#include "ra_log.h"

static char g_out[1 << 16];

/* SIGKILL with Attends in flight: every wait returns RA_ETIMEDOUT or RA_ECLOSED within
 * its deadline; then a new daemon on the same endpoint (the stale socket file of the
 * killed one is taken over) serves a new session, answered exactly, and refuses the
 * old session's id and token. */
static void test_kill_mid_attend_then_restart(void **state)
{
    (void)state;
    ratd_proc d;
    assert_int_equal(ratd_start(&d, NULL), 0);
    ra_client *c = ratd_connect(&d, 10000);
    enum { H = 8, G = 2, D = 64, N = 60000, SENDS = 8 };
    uint64_t s = ratd_session_new(c, 1, H, G, D, RA_DTYPE_F32, RA_CLIENT_INDEX_FLAT);
    float *k, *v;
    assert_int_equal(offload_f32(c, s, G, D, N, H, 0, &k, &v), RA_OK);
    float *q = rnd_vec((size_t)H * D, 0.5f), o[H * D], lse[H];
    ra_attend_req r = {.n_q_heads = H, .head_dim = D, .q = q, .top_k = 2000};
    ra_ticket t[SENDS];
    for (int i = 0; i < SENDS; i++) /* exact scans of 60000 keys: these queue up */
        assert_int_equal(ra_client_attend_send(c, s, 0, &r, &t[i]), RA_OK);
    kill(d.pid, SIGKILL);
    waitpid(d.pid, NULL, 0);
    ratd_harness_track(-d.pid, "");
    int lost = 0;
    for (int i = 0; i < SENDS; i++) {
        ra_attend_out out = {.o = o, .lse = lse};
        double t0 = ra_now_s();
        ra_status st = ra_client_attend_wait(c, t[i], &out, 700);
        double took = ra_now_s() - t0;
        assert_true(took < 0.7 + 0.3); /* within its deadline */
        if (st == RA_OK)
            continue; /* answered before the kill */
        assert_true(st == RA_ETIMEDOUT || st == RA_ECLOSED);
        assert_true(strlen(ra_client_errmsg(c)) > 10); /* says what happened */
        if (st == RA_ETIMEDOUT)
            ra_client_attend_cancel(c, t[i]);
        lost++;
    }
    assert_true(lost > 0); /* the last of 8 queued scans cannot have been answered */
    struct stat sb;
    assert_int_equal(stat(d.path, &sb), 0); /* SIGKILL leaves the socket file behind */
    /* a new daemon takes over the endpoint; the old client reconnects by itself */
    ratd_proc d2;
    g_harness_endpoint = d.endpoint;
    assert_int_equal(ratd_start(&d2, NULL), 0);
    ra_client_set_timeout(c, 10000);
    assert_int_equal(ra_client_hello(c, NULL), RA_OK);
    uint64_t s2 = ratd_session_new(c, 1, H, G, D, RA_DTYPE_F32, RA_CLIENT_INDEX_FLAT);
    assert_true(s2 > 0);
    float *k2, *v2;
    assert_int_equal(offload_f32(c, s2, G, D, 500, H, 0, &k2, &v2), RA_OK);
    r.top_k = 500;
    ra_attend_out out = {.o = o, .lse = lse};
    assert_int_equal(ra_client_attend(c, s2, 0, &r, &out), RA_OK);
    char msg[256];
    assert_int_equal(ref_check_heads(k2, v2, G, 500, D, H, q, o, lse, 1e-4, msg, sizeof msg), -1);
    /* the old session, id and token still held by the client, is unknown to the new
     * daemon: refused, not mistaken for another one */
    assert_int_equal(ra_client_attend(c, s, 0, &r, &out), RA_ENOSESSION);
    assert_int_equal(ra_client_session_drop(c, s), RA_ENOSESSION);
    free(q);
    free(k);
    free(v);
    free(k2);
    free(v2);
    ra_client_close(c);
    assert_int_equal(ratd_stop(&d2), 0);
}

/* An Offload beyond --mem-limit is refused by the daemon with RA_ENOMEM and a message;
 * nothing stays accounted, the daemon serves on, and what fits is stored. */
static void test_offload_beyond_mem_limit(void **state)
{
    (void)state;
    ratd_proc d;
    assert_int_equal(ratd_start(&d, "--mem-limit", "16M", NULL), 0);
    ra_client *c = ratd_connect(&d, 10000);
    uint64_t s = ratd_session_new(c, 2, 4, 2, 64, RA_DTYPE_F32, RA_CLIENT_INDEX_FLAT);
    assert_true(s > 0);
    ra_server_stats st0, st1;
    assert_int_equal(ra_client_stats(c, &st0), RA_OK);
    float *k, *v;
    /* 2 heads x 20000 tokens x 64 x 4 bytes, K and V: 20 MB against 16 MB (each 10 MB
     * frame fits; a frame larger than the whole limit ends the connection instead, which
     * test_daemon_security covers) */
    assert_int_equal(offload_f32(c, s, 2, 64, 20000, 4, 0, &k, &v), RA_ENOMEM);
    assert_non_null(strstr(ra_client_errmsg(c), "limit"));
    free(k);
    free(v);
    assert_int_equal(ra_client_stats(c, &st1), RA_OK);
    assert_int_equal(st1.mem_used, st0.mem_used);
    assert_int_equal(st1.mem_limit, 16u << 20);
    assert_int_equal(offload_f32(c, s, 2, 64, 1000, 4, 0, &k, &v), RA_OK); /* 1 MB fits */
    float *q = rnd_vec(4 * 64, 0.5f), o[4 * 64], lse[4];
    ra_attend_req r = {.n_q_heads = 4, .head_dim = 64, .q = q, .top_k = 1000};
    ra_attend_out out = {.o = o, .lse = lse};
    assert_int_equal(ra_client_attend(c, s, 0, &r, &out), RA_OK);
    char msg[256];
    assert_int_equal(ref_check_heads(k, v, 2, 1000, 64, 4, q, o, lse, 1e-4, msg, sizeof msg), -1);
    free(q);
    free(k);
    free(v);
    ra_client_close(c);
    assert_int_equal(ratd_stop(&d), 0);
}

/* A log path the daemon cannot write: refused at start, exit 2, the reason named. */
static void test_unwritable_log_path(void **state)
{
    (void)state;
    char cmd[1024];
    snprintf(cmd, sizeof cmd, "%s --endpoint ipc:///tmp/ratd-test-%d-log.sock --log-file /proc/ratd/none.log",
             getenv("RATD_BIN"), (int)getpid());
    assert_int_equal(run_capture(cmd, g_out, sizeof g_out), 2);
    assert_non_null(strstr(g_out, "cannot open the log file /proc/ratd/none.log for writing"));
    snprintf(cmd, sizeof cmd, "%s --endpoint ipc:///tmp/ratd-test-%d-log.sock --log-file /tmp",
             getenv("RATD_BIN"), (int)getpid());
    assert_int_equal(run_capture(cmd, g_out, sizeof g_out), 2); /* a directory */
    assert_non_null(strstr(g_out, "cannot open the log file /tmp"));
}

/* ratd-lm-eval in ratd mode loses its daemon mid-run: it warns, answers the rest
 * window-only, and finishes with its figures marked. */
static void test_eval_falls_back_to_window(void **state)
{
    (void)state;
    const char *eval = getenv("RATD_LM_EVAL"), *src = getenv("RA_SOURCE_DIR");
    if (!eval || !src)
        fail_msg("RATD_LM_EVAL / RA_SOURCE_DIR not set (run under ctest)");
    ratd_proc d;
    assert_int_equal(ratd_start(&d, "--workers", "1", NULL), 0);
    char err[128], out[128], cmd[4096];
    snprintf(err, sizeof err, "/tmp/ratd-test-%d-eval.err", (int)getpid());
    snprintf(out, sizeof out, "/tmp/ratd-test-%d-eval.json", (int)getpid());
    snprintf(cmd, sizeof cmd,
             "%s --model %s/bench/models/kjv-byte-llama --text %s/bench/data/heldout-kjv.txt "
             "--context 768 --eval 384 --mode ratd --sink 16 --window 64 --topk 50 --n-train 128 "
             "--endpoint %s --ratd-timeout-ms 1000 --json >%s 2>%s",
             eval, src, src, d.endpoint, out, err);
    pid_t p = fork();
    if (p == 0) {
        execl("/bin/sh", "sh", "-c", cmd, (char *)NULL);
        _exit(127);
    }
    /* kill the daemon once decoding has started */
    int started = 0;
    for (int i = 0; i < 600 && !started; i++) {
        usleep(50000);
        FILE *f = fopen(err, "r");
        if (f) {
            size_t n = fread(g_out, 1, sizeof g_out - 1, f);
            g_out[n] = 0;
            fclose(f);
            started = strstr(g_out, "decoding starts") != NULL;
        }
    }
    assert_true(started);
    usleep(300000);
    kill(d.pid, SIGKILL);
    waitpid(d.pid, NULL, 0);
    ratd_harness_track(-d.pid, "");
    unlink(d.path);
    int status;
    assert_int_equal(waitpid(p, &status, 0), p);
    FILE *f = fopen(err, "r");
    size_t n = f ? fread(g_out, 1, sizeof g_out - 1, f) : 0;
    g_out[n] = 0;
    if (f)
        fclose(f);
    if (!WIFEXITED(status) || WEXITSTATUS(status) != 0)
        fail_msg("ratd-lm-eval exited with %d: %s", WIFEXITED(status) ? WEXITSTATUS(status) : -1, g_out);
    assert_non_null(strstr(g_out, "WARNING: ratd stopped answering"));
    assert_non_null(strstr(g_out, "window-only attention"));
    f = fopen(out, "r");
    assert_non_null(f);
    n = fread(g_out, 1, sizeof g_out - 1, f);
    g_out[n] = 0;
    fclose(f);
    assert_non_null(strstr(g_out, "\"mode\":\"ratd\""));
    assert_non_null(strstr(g_out, "\"ratd_lost\":true"));
    assert_non_null(strstr(g_out, "\"tokens\":384"));
    unlink(err);
    unlink(out);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_kill_mid_attend_then_restart),
        cmocka_unit_test(test_offload_beyond_mem_limit),
        cmocka_unit_test(test_unwritable_log_path),
        cmocka_unit_test(test_eval_falls_back_to_window),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
