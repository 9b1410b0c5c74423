/* Integration test of ratd-bench-decode against a real ratd ($RATD_BIN): a small run
 * with the exact index must report recall 1 and attention mass 1 with every JSON field
 * present and sane (counts that follow from the flags, ordered percentiles, a clean
 * daemon exit); a graph run must complete with recall in (0, 1]; a run without --index
 * must use pscan at recall >= 0.95; a batch of sessions and
 * a trace's heads (a trace written here) must be exact with the exact index too; and bad
 * input (an unknown flag, --context 0, flags that contradict each other, a missing
 * trace, a trace too short for the request) must exit 2 or 1 with a message. Small
 * shapes: the whole file runs in well under a minute on two cores. */
#define _GNU_SOURCE
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cmocka.h>

#include "lm_json.h"
#include "ra_trace.h"

typedef struct result {
    int rc;
    char *out, *err; /* stdout, stderr */
    ra_lm_json *j;   /* stdout parsed, when it is JSON */
} result;

static char *slurp(FILE *f)
{
    size_t cap = 4096, n = 0;
    char *b = malloc(cap);
    assert_non_null(b);
    size_t r;
    while ((r = fread(b + n, 1, cap - n - 1, f)) > 0) {
        n += r;
        if (cap - n < 2) {
            cap *= 2;
            b = realloc(b, cap);
            assert_non_null(b);
        }
    }
    b[n] = 0;
    return b;
}

/* Runs ratd-bench-decode with `args` against a private daemon of this build. */
static result run_bench(const char *args)
{
    const char *bin = getenv("RA_BINARY_DIR"), *ratd = getenv("RATD_BIN");
    char errf[128], cmd[4096];
    snprintf(errf, sizeof errf, "/tmp/test-bench-decode.%d.err", (int)getpid());
    snprintf(cmd, sizeof cmd, "'%s/bench/ratd-bench-decode' --ratd '%s' --threads 2 %s 2>%s", bin,
             ratd, args, errf);
    result r = {0};
    FILE *p = popen(cmd, "r");
    assert_non_null(p);
    r.out = slurp(p);
    int st = pclose(p);
    r.rc = WIFEXITED(st) ? WEXITSTATUS(st) : -1;
    FILE *e = fopen(errf, "r");
    assert_non_null(e);
    r.err = slurp(e);
    fclose(e);
    unlink(errf);
    print_message("# %s -> exit %d\n%s", args, r.rc, r.err);
    if (r.out[0] == '{') {
        char jerr[256];
        assert_int_equal(ra_lm_json_parse(r.out, strlen(r.out), &r.j, jerr, sizeof jerr), RA_OK);
    }
    return r;
}

static void result_free(result *r)
{
    free(r->out);
    free(r->err);
    ra_lm_json_free(r->j);
}

static double num(const result *r, const char *key)
{
    const ra_lm_json *v = ra_lm_json_get(r->j, key);
    if (!v || v->type != RA_LM_JSON_NUM)
        fail_msg("JSON field %s missing or not a number", key);
    return v->num;
}

static const char *str(const result *r, const char *key)
{
    const ra_lm_json *v = ra_lm_json_get(r->j, key);
    if (!v || v->type != RA_LM_JSON_STR)
        fail_msg("JSON field %s missing or not a string", key);
    return v->str;
}

static int is_null(const result *r, const char *key)
{
    const ra_lm_json *v = ra_lm_json_get(r->j, key);
    if (!v)
        fail_msg("JSON field %s missing", key);
    return v->type == RA_LM_JSON_NULL;
}

static void skip_without_env(void)
{
    if (!getenv("RATD_BIN") || !getenv("RA_BINARY_DIR"))
        skip();
}

/* Every field of the report: present, and the numbers sane for an exact index. */
static void test_flat_exact(void **state)
{
    (void)state;
    skip_without_env();
    result r = run_bench("--context 4096 --layers 2 --q-heads 8 --kv-heads 2 --dim 64 --steps 40 "
                         "--index flat --json");
    assert_int_equal(r.rc, 0);
    assert_non_null(r.j);
    /* the configuration, as asked */
    assert_string_equal(str(&r, "bench"), "ratd-bench-decode");
    assert_string_equal(str(&r, "daemon"), "private");
    assert_string_equal(str(&r, "index"), "flat");
    assert_string_equal(str(&r, "dtype"), "bf16");
    assert_string_equal(str(&r, "generator"), "calibrated");
    assert_non_null(str(&r, "endpoint"));
    assert_non_null(str(&r, "server_version"));
    const char *mode = str(&r, "batch_mode");
    assert_true(!strcmp(mode, "sequential") || !strcmp(mode, "batched"));
    assert_true(is_null(&r, "trace") && is_null(&r, "synth"));
    struct {
        const char *k;
        double v;
    } cfg[] = {{"layers", 2},        {"model_layers", 32}, {"q_heads", 8},
               {"kv_heads", 2},      {"head_dim", 64},     {"context", 4096},
               {"steps", 40},        {"warmup", 10},       {"top_k", 100},
               {"effort", 0},        {"batch", 1},         {"append_every", 16},
               {"sample_every", 10}, {"seed", 1},          {"n_train", 4096},
               {"sink", 0},          {"window", 0},        {"wait_index_ms", 600000},
               {"threads", 2},       {"daemon_exit", 0}};
    for (size_t i = 0; i < sizeof cfg / sizeof *cfg; i++)
        if (num(&r, cfg[i].k) != cfg[i].v)
            fail_msg("%s is %g, expected %g", cfg[i].k, num(&r, cfg[i].k), cfg[i].v);
    assert_true(num(&r, "workers") >= 1);
    /* counts that follow from the flags: 40 timed steps x 2 layers; Appends at steps 16,
     * 32, 48 of 50 (2 timed layers each, 16 tokens); fidelity on timed steps 0, 10, 20,
     * 30 for 2 layers x 8 heads */
    assert_int_equal((int)num(&r, "attend_n"), 80);
    assert_int_equal((int)num(&r, "token_n"), 40);
    assert_int_equal((int)num(&r, "rtt_n"), 40);
    assert_int_equal((int)num(&r, "append_n"), 6);
    assert_int_equal((int)num(&r, "appended_tokens"), 48);
    assert_int_equal((int)num(&r, "fid_steps"), 4);
    assert_int_equal((int)num(&r, "fid_heads"), 64);
    assert_int_equal((int)num(&r, "lse_checked"), 64);
    /* latencies: positive and ordered */
    double p50 = num(&r, "attend_us_p50"), p90 = num(&r, "attend_us_p90");
    double p99 = num(&r, "attend_us_p99"), mx = num(&r, "attend_us_max");
    assert_true(p50 > 0 && p50 <= p90 && p90 <= p99 && p99 <= mx);
    assert_true(num(&r, "attend_us_mean") > 0);
    assert_true(num(&r, "token_us_p50") >= p50 &&
                num(&r, "token_us_p99") >= num(&r, "token_us_p50"));
    assert_true(fabs(num(&r, "token_ms_model_est") - p50 * 32 / 1000.0) < 1e-3 * p50);
    assert_true(num(&r, "rtt_us_p50") > 0 && num(&r, "rtt_us_p99") >= num(&r, "rtt_us_p50"));
    assert_true(num(&r, "append_us_p50") > 0 &&
                num(&r, "append_us_max") >= num(&r, "append_us_p99"));
    /* the daemon's own times: numbers once the client reports them, else null */
    assert_true(is_null(&r, "server_us_p50") == is_null(&r, "work_us_p50"));
    /* phases and memory */
    assert_true(num(&r, "gen_s") >= 0 && num(&r, "offload_s") > 0 && num(&r, "build_s") >= 0);
    assert_true(ra_lm_json_get(r.j, "index_ready")->boolean);
    /* K + V + training queries of 2 layers x 2 KV heads x 4096 keys x 64 dims */
    double kv = 2.0 * 2 * 4096 * 64 * 2 * 2;
    assert_true(num(&r, "offload_bytes") >= kv);
    assert_true(num(&r, "session_bytes") >= kv && num(&r, "session_bytes") < 16 * kv);
    assert_true(num(&r, "mem_daemon_kv_bytes") >= kv && num(&r, "mem_bench_bytes_est") > 0);
    assert_true(num(&r, "mem_daemon_index_bytes_est") >= 0 && num(&r, "mem_available_bytes") > 0);
    assert_non_null(str(&r, "session_bytes_source"));
    /* fidelity: the exact index finds the exact top-k and all of its mass */
    assert_true(num(&r, "recall_mean") == 1.0 && num(&r, "recall_min") == 1.0);
    assert_true(num(&r, "recall_p10") == 1.0);
    assert_true(fabs(num(&r, "mass_mean") - 1.0) < 1e-6 && num(&r, "mass_min") > 1.0 - 1e-5);
    assert_true(fabs(num(&r, "mass_p10") - 1.0) < 1e-5);
    assert_true(fabs(num(&r, "retrieved_frac") - 1.0) < 1e-12);
    assert_int_equal((int)num(&r, "lse_mismatch"), 0);
    assert_int_equal((int)num(&r, "bad_positions"), 0);
    assert_true(num(&r, "lse_max_err") < 1e-3);
    assert_true(num(&r, "wall_s") > 0);
    /* the progress lines, one per phase */
    const char *phases[] = {
        "plan:", "generate:", "offload:", "build:", "decode: step 50/50", "done in"};
    for (size_t i = 0; i < sizeof phases / sizeof *phases; i++)
        if (!strstr(r.err, phases[i]))
            fail_msg("no progress line with '%s'", phases[i]);
    result_free(&r);
}

static void test_graph_completes(void **state)
{
    (void)state;
    skip_without_env();
    result r = run_bench("--context 4096 --layers 1 --q-heads 4 --kv-heads 1 --dim 64 --steps 20 "
                         "--index graph --sample-every 5 --json");
    assert_int_equal(r.rc, 0);
    assert_non_null(r.j);
    assert_string_equal(str(&r, "index"), "graph");
    double rec = num(&r, "recall_mean"), mass = num(&r, "mass_mean");
    print_message("# graph: recall %.4f, mass %.4f\n", rec, mass);
    assert_true(rec > 0 && rec <= 1.0);
    assert_true(mass > 0 && mass <= 1.0 + 1e-6);
    assert_int_equal((int)num(&r, "lse_mismatch"), 0);
    assert_int_equal((int)num(&r, "bad_positions"), 0);
    result_free(&r);
}

/* No --index: the sessions get the default kind, the projected-code scan; its recall at
 * the default effort is high on this small head (every key is scored on its code) */
static void test_default_pscan(void **state)
{
    (void)state;
    skip_without_env();
    result r = run_bench("--context 4096 --layers 1 --q-heads 4 --kv-heads 1 --dim 64 --steps 20 "
                         "--sample-every 5 --json");
    assert_int_equal(r.rc, 0);
    assert_non_null(r.j);
    assert_string_equal(str(&r, "index"), "pscan");
    double rec = num(&r, "recall_mean");
    print_message("# default (pscan): recall %.4f\n", rec);
    assert_true(rec >= 0.95 && rec <= 1.0);
    assert_int_equal((int)num(&r, "lse_mismatch"), 0);
    assert_int_equal((int)num(&r, "bad_positions"), 0);
    result_free(&r);
}

/* B sessions with their own data: one Attend per layer for all of them. */
static void test_batch_exact(void **state)
{
    (void)state;
    skip_without_env();
    result r = run_bench("--context 2048 --layers 1 --q-heads 4 --kv-heads 2 --dim 32 --steps 20 "
                         "--index flat --batch 3 --append-every 0 --sample-every 4 --json");
    assert_int_equal(r.rc, 0);
    assert_int_equal((int)num(&r, "batch"), 3);
    assert_int_equal((int)num(&r, "attend_n"), 20); /* one figure per (step, layer) */
    assert_int_equal((int)num(&r, "append_n"), 0);
    assert_int_equal((int)num(&r, "fid_heads"), 5 * 3 * 4);
    assert_true(num(&r, "recall_min") == 1.0);
    assert_true(num(&r, "mass_min") > 1.0 - 1e-5);
    result_free(&r);
}

/* A trace of random heads: 2 layers, 4 query / 2 KV heads, dim 32, n positions. */
static void write_trace(const char *path, uint32_t n)
{
    ra_trace_info in = {.dtype = RA_DTYPE_F32,
                        .n_layers = 2,
                        .n_heads = 4,
                        .n_kv_heads = 2,
                        .head_dim = 32,
                        .n_pos = n,
                        .rope_theta = 10000.0f};
    ra_trace_writer *w = NULL;
    char err[256];
    assert_int_equal(ra_trace_writer_create(path, &in, &w, err, sizeof err), RA_OK);
    float *x = malloc((size_t)n * 32 * sizeof *x);
    assert_non_null(x);
    uint64_t s = 12345;
    for (uint32_t l = 0; l < 2; l++)
        for (int which = 0; which < 3; which++)
            for (uint32_t h = 0; h < (which == 0 ? 4u : 2u); h++) {
                for (size_t i = 0; i < (size_t)n * 32; i++) {
                    s = s * 6364136223846793005ull + 1442695040888963407ull;
                    x[i] = (float)((double)(s >> 11) / 9007199254740992.0 - 0.5);
                }
                assert_int_equal(ra_trace_writer_put(w, (ra_trace_tensor)which, l, h, 0, n, x),
                                 RA_OK);
            }
    free(x);
    assert_int_equal(ra_trace_writer_finish(w, err, sizeof err), RA_OK);
}

static void test_trace(void **state)
{
    (void)state;
    skip_without_env();
    char path[128], args[512];
    snprintf(path, sizeof path, "/tmp/test-bench-decode.%d.trace", (int)getpid());
    write_trace(path, 1024);
    snprintf(args, sizeof args, "--trace %s --steps 20 --index flat --json", path);
    result r = run_bench(args);
    assert_int_equal(r.rc, 0);
    assert_string_equal(str(&r, "generator"), "trace");
    assert_int_equal((int)num(&r, "layers"), 2); /* the shape of the file */
    assert_int_equal((int)num(&r, "model_layers"), 2);
    assert_int_equal((int)num(&r, "q_heads"), 4);
    assert_int_equal((int)num(&r, "kv_heads"), 2);
    assert_int_equal((int)num(&r, "head_dim"), 32);
    /* rows [128, 1024 - 512 - 30) offloaded; training queries: the 482 rows before their end */
    assert_int_equal((int)num(&r, "context"), 1024 - 512 - 30 - 128);
    assert_int_equal((int)num(&r, "n_train"), 1024 - 512 - 30);
    assert_true(num(&r, "recall_min") == 1.0 && num(&r, "mass_min") > 1.0 - 1e-5);
    assert_int_equal((int)num(&r, "appended_tokens"), 16);
    result_free(&r);
    /* too short for the request */
    snprintf(args, sizeof args, "--trace %s --steps 400 --index flat", path);
    r = run_bench(args);
    assert_int_equal(r.rc, 1);
    assert_non_null(strstr(r.err, "too short"));
    result_free(&r);
    /* not a trace */
    FILE *f = fopen(path, "w");
    assert_non_null(f);
    fputs("not a trace\n", f);
    fclose(f);
    snprintf(args, sizeof args, "--trace %s", path);
    r = run_bench(args);
    assert_int_equal(r.rc, 1);
    assert_non_null(strstr(r.err, path));
    result_free(&r);
    unlink(path);
}

static void test_bad_input(void **state)
{
    (void)state;
    skip_without_env();
    struct {
        const char *args;
        int rc;
        const char *msg;
    } cases[] = {
        {"--bogus", 2, "unknown flag --bogus"},
        {"--context 0", 2, "--context must be an integer"},
        {"--context 12x", 2, "--context must be an integer"},
        {"--steps", 2, "needs a value"},
        {"--dtype f32", 2, "--dtype must be bf16 or f16"},
        {"--index lsh", 2, "--index must be"},
        {"--gpu-build --index pscan", 2, "it needs --index graph"},
        {"--q-heads 6 --kv-heads 4", 2, "multiple of --kv-heads"},
        {"--gen nosuch", 2, "unknown generator"},
        {"--synth bogus=1", 2, "unknown knob bogus"},
        {"--endpoint ipc:///tmp/x.sock", 2, "exclude each other"}, /* --ratd is given too */
        {"--trace /tmp/x.trace --dim 64", 2, "its own shape"},
        {"--sink 64", 2, "apply to --trace"},
        {"--trace /nonexistent/test-bench-decode.trace", 1, "/nonexistent/test-bench-decode.trace"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof *cases; i++) {
        result r = run_bench(cases[i].args);
        if (r.rc != cases[i].rc || !strstr(r.err, cases[i].msg))
            fail_msg("'%s': exit %d (expected %d), stderr '%s' (expected '%s')", cases[i].args,
                     r.rc, cases[i].rc, r.err, cases[i].msg);
        result_free(&r);
    }
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_flat_exact),  cmocka_unit_test(test_graph_completes),
        cmocka_unit_test(test_batch_exact), cmocka_unit_test(test_trace),
        cmocka_unit_test(test_bad_input),
        cmocka_unit_test(test_default_pscan),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
