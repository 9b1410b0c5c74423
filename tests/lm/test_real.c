/* Tests of the reference decoder on the real model (bench/models/kjv-byte-llama) and
 * of the ratd-lm-eval command line: the decoder reproduces the data card's figures
 * (held-out bits per byte, long-range copying), decode agrees with prefill, full
 * attention agrees with a naive double-precision one, bad inputs give clear errors and
 * leave no files behind, and --dump-trace writes what the decoder computed. */
#define _GNU_SOURCE
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cmocka.h>

#include "lm_test_util.h"
#include "ra_lm.h"
#include "ra_trace.h"

static char g_dir[256], g_model[512], g_kjv[512], g_sql[512], g_eval[512];

static int setup(void **state)
{
    const char *src = getenv("RA_SOURCE_DIR"), *bin = getenv("RA_BINARY_DIR");
    if (!src || !bin) {
        fprintf(stderr, "RA_SOURCE_DIR and RA_BINARY_DIR must be set (ctest sets them)\n");
        return -1;
    }
    snprintf(g_model, sizeof g_model, "%s/bench/models/kjv-byte-llama", src);
    snprintf(g_kjv, sizeof g_kjv, "%s/bench/data/heldout-kjv.txt", src);
    snprintf(g_sql, sizeof g_sql, "%s/bench/data/heldout-sqlite.txt", src);
    snprintf(g_eval, sizeof g_eval, "%s/bench/ratd-lm-eval", bin);
    snprintf(g_dir, sizeof g_dir, "/tmp/ra_lm_real.XXXXXX");
    return mkdtemp(g_dir) ? 0 : -1;
}

static int teardown(void **state)
{
    char cmd[300];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", g_dir);
    return system(cmd) == 0 ? 0 : -1;
}

static int *read_tokens(const char *path, unsigned n)
{
    FILE *f = fopen(path, "rb");
    assert_non_null(f);
    unsigned char *b = malloc(n);
    assert_int_equal(fread(b, 1, n, f), n);
    fclose(f);
    int *t = malloc(n * sizeof *t);
    for (unsigned i = 0; i < n; i++)
        t[i] = b[i];
    free(b);
    return t;
}

/* The data card's long-range copy test at a smaller scale: a held-out chunk of 1024
 * bytes fed twice. The second copy (distance 1024, beyond the 512 window) must be far
 * cheaper; the first must be in the range of the card's held-out figures. */
static void copy_test(const char *text, double first_lo, double first_hi, double second_hi)
{
    enum { HALF = 1024, N = 2 * HALF };
    char err[512];
    ra_lm *lm;
    if (ra_lm_load(g_model, N, &lm, err, sizeof err) != RA_OK)
        fail_msg("%s", err);
    int *chunk = read_tokens(text, HALF);
    int tok[N];
    for (unsigned i = 0; i < N; i++)
        tok[i] = chunk[i % HALF];
    float *lg = malloc((size_t)N * 256 * sizeof(float));
    assert_int_equal(ra_lm_prefill(lm, tok, N, NULL, lg, NULL, NULL), RA_OK);
    double a = 0, b = 0;
    for (unsigned i = 0; i + 1 < N; i++) {
        double nll = -ra_lm_logprob(lg + (size_t)i * 256, 256, tok[i + 1]);
        if (i < HALF - 1)
            a += nll;
        else
            b += nll;
    }
    a /= (HALF - 1) * M_LN2;
    b /= HALF * M_LN2;
    fprintf(stderr, "# %s: first copy %.4f bpb, second copy %.4f bpb\n", text, a, b);
    assert_true(a > first_lo && a < first_hi);
    assert_true(b < second_hi);
    free(lg);
    free(chunk);
    ra_lm_free(lm);
}

static void test_copy_kjv(void **s)
{
    copy_test(g_kjv, 1.30, 1.70, 0.75); /* measured 1.498 / 0.552 */
}

static void test_copy_sqlite(void **s)
{
    copy_test(g_sql, 1.20, 1.70, 0.95); /* measured 1.454 / 0.748 */
}

/* Full attention through the decode hook against a naive double-precision softmax
 * over the same cache; and decode logits against prefill logits. */
typedef struct naive_ctx {
    double maxerr;
} naive_ctx;

static ra_status naive_hook(void *ctx, ra_lm *lm, unsigned layer, unsigned pos, const float *q, float *o)
{
    naive_ctx *nc = ctx;
    const ra_lm_config *c = ra_lm_get_config(lm);
    unsigned hd = c->head_dim, grp = c->n_heads / c->n_kv_heads;
    unsigned r[2] = {0, pos + 1};
    for (unsigned h = 0; h < c->n_heads; h++) {
        float lse;
        ra_lm_attend_ranges(lm, layer, h, q + h * hd, r, 1, o + h * hd, &lse);
        const float *K = ra_lm_cache_k(lm, layer, h / grp), *V = ra_lm_cache_v(lm, layer, h / grp);
        double *sc = malloc((pos + 1) * sizeof(double)), m = -1e300, sum = 0;
        for (unsigned j = 0; j <= pos; j++) {
            double d = 0;
            for (unsigned i = 0; i < hd; i++)
                d += (double)q[h * hd + i] * K[(size_t)j * hd + i];
            sc[j] = d / sqrt((double)hd);
            m = fmax(m, sc[j]);
        }
        for (unsigned j = 0; j <= pos; j++)
            sum += sc[j] = exp(sc[j] - m);
        for (unsigned i = 0; i < hd; i++) {
            double acc = 0;
            for (unsigned j = 0; j <= pos; j++)
                acc += sc[j] / sum * V[(size_t)j * hd + i];
            nc->maxerr = fmax(nc->maxerr, fabs(acc - o[h * hd + i]));
        }
        assert_true(fabs(m + log(sum) - lse) < 1e-4);
        free(sc);
    }
    return RA_OK;
}

static void test_decode_matches_prefill(void **s)
{
    enum { P = 300, N = 316 };
    char err[512];
    ra_lm *lm;
    if (ra_lm_load(g_model, N, &lm, err, sizeof err) != RA_OK)
        fail_msg("%s", err);
    int *tok = read_tokens(g_kjv, N);
    float *all = malloc((size_t)N * 256 * sizeof(float)), lg[256];
    assert_int_equal(ra_lm_prefill(lm, tok, N, NULL, all, NULL, NULL), RA_OK);
    assert_int_equal(ra_lm_rewind(lm, P), RA_OK);
    naive_ctx nc = {0};
    double maxd = 0;
    for (unsigned t = P; t < N; t++) {
        assert_int_equal(ra_lm_decode(lm, tok[t], lg, naive_hook, &nc), RA_OK);
        for (unsigned i = 0; i < 256; i++)
            maxd = fmax(maxd, fabs(lg[i] - all[(size_t)t * 256 + i]));
    }
    fprintf(stderr, "# decode vs prefill max |logit diff| %.2e, full vs naive attention max err %.2e\n", maxd,
            nc.maxerr);
    assert_true(maxd < 2e-3);
    assert_true(nc.maxerr < 1e-5);
    free(all);
    free(tok);
    ra_lm_free(lm);
}

/* ------------------------------------------------------------------ command line */

/* Runs a shell command; returns its exit status; stderr+stdout in *out (malloc'd). */
static int run_cmd(const char *cmd, char **out)
{
    char full[4096], path[300];
    snprintf(path, sizeof path, "%s/out.txt", g_dir);
    snprintf(full, sizeof full, "%s > '%s' 2>&1", cmd, path);
    int st = system(full);
    FILE *f = fopen(path, "rb");
    *out = calloc(1, 1 << 16);
    if (f) {
        size_t n = fread(*out, 1, (1 << 16) - 1, f);
        (*out)[n] = 0;
        fclose(f);
    }
    return WIFEXITED(st) ? WEXITSTATUS(st) : 255;
}

static void expect_fail(const char *cmd, const char *n1, const char *n2)
{
    char *out;
    int rc = run_cmd(cmd, &out);
    if (rc == 0 || !strstr(out, n1) || (n2 && !strstr(out, n2)))
        fail_msg("'%s': exit %d, output '%s' (want '%s'%s%s)", cmd, rc, out, n1, n2 ? ", " : "", n2 ? n2 : "");
    free(out);
}

static void test_cli_bad_input(void **s)
{
    char cmd[2048], trace[400], dir[400], p[500];
    snprintf(trace, sizeof trace, "%s/never.trace", g_dir);
    /* missing model directory */
    snprintf(cmd, sizeof cmd, "'%s' --model %s/nomodel --text '%s' --context 64 --eval 8 --mode full", g_eval, g_dir,
             g_kjv);
    expect_fail(cmd, "nomodel", "cannot open");
    /* text shorter than the context: names the file, writes no trace */
    snprintf(p, sizeof p, "%s/short.txt", g_dir);
    assert_int_equal(write_file(p, "In the beginning", 16), 0);
    snprintf(cmd, sizeof cmd, "'%s' --model '%s' --text '%s' --context 64 --eval 8 --mode full --dump-trace '%s'",
             g_eval, g_model, p, trace);
    expect_fail(cmd, "short.txt", "too short");
    assert_int_equal(access(trace, F_OK), -1);
    /* a malformed model directory: the tiny config with a truncated weights file */
    tiny_model m;
    tiny_build(&m);
    snprintf(dir, sizeof dir, "%s/broken", g_dir);
    assert_int_equal(tiny_write_dir(&m, dir, NULL), 0);
    snprintf(p, sizeof p, "%s/model.safetensors", dir);
    assert_int_equal(tiny_write_st(&m, p, NULL, 0, 7), 0);
    tiny_free(&m);
    snprintf(cmd, sizeof cmd, "'%s' --model '%s' --text '%s' --context 32 --eval 8 --mode full --dump-trace '%s'",
             g_eval, dir, g_kjv, trace);
    expect_fail(cmd, "model.safetensors", "data_offsets");
    assert_int_equal(access(trace, F_OK), -1);
    /* a context beyond the model's positions, bad flags */
    snprintf(cmd, sizeof cmd, "'%s' --model '%s' --text '%s' --context 16384 --eval 8 --mode full", g_eval, g_model,
             g_kjv);
    expect_fail(cmd, "max_position_embeddings", NULL);
    snprintf(cmd, sizeof cmd, "'%s' --model '%s' --text '%s' --context 64 --eval 8 --mode fast", g_eval, g_model,
             g_kjv);
    expect_fail(cmd, "--mode", NULL);
    snprintf(cmd, sizeof cmd, "'%s' --model '%s' --text '%s' --context 64 --eval 8 --mode ratd", g_eval, g_model,
             g_kjv);
    expect_fail(cmd, "--endpoint", NULL);
}

/* ratd-lm-eval --dump-trace: the file holds exactly the q, k, v of the decoder's own
 * prefill (checked against an in-process prefill of the same bytes). */
typedef struct qcap {
    float *q; /* [layer][pos][n_heads * hd] */
    unsigned n, qd;
} qcap;

static ra_status qcap_fn(void *ctx, unsigned layer, unsigned pos0, unsigned rows, const float *q, const float *k,
                         const float *v)
{
    qcap *c = ctx;
    memcpy(c->q + ((size_t)layer * c->n + pos0) * c->qd, q, (size_t)rows * c->qd * sizeof(float));
    return RA_OK;
}

static void test_cli_trace_and_json(void **s)
{
    enum { C = 300 };
    char cmd[2048], trace[400], err[512], *out;
    snprintf(trace, sizeof trace, "%s/ctx.trace", g_dir);
    snprintf(cmd, sizeof cmd,
             "'%s' --model '%s' --text '%s' --offset 1000 --context %d --eval 16 --mode full --json --quiet "
             "--dump-trace '%s'",
             g_eval, g_model, g_kjv, C, trace);
    int rc = run_cmd(cmd, &out);
    if (rc != 0 || !strstr(out, "\"mode\":\"full\"") || !strstr(out, "\"bpb\":"))
        fail_msg("exit %d: %s", rc, out);
    free(out);

    ra_trace *t;
    if (ra_trace_open(trace, &t, err, sizeof err) != RA_OK)
        fail_msg("%s", err);
    const ra_trace_info *ti = ra_trace_get_info(t);
    assert_int_equal(ti->n_layers, 6);
    assert_int_equal(ti->n_heads, 6);
    assert_int_equal(ti->n_kv_heads, 2);
    assert_int_equal(ti->head_dim, 64);
    assert_int_equal(ti->n_pos, C);
    assert_int_equal(ti->dtype, RA_DTYPE_F32);

    ra_lm *lm;
    if (ra_lm_load(g_model, C, &lm, err, sizeof err) != RA_OK)
        fail_msg("%s", err);
    FILE *f = fopen(g_kjv, "rb");
    unsigned char b[C];
    assert_int_equal(fseek(f, 1000, SEEK_SET), 0);
    assert_int_equal(fread(b, 1, C, f), C);
    fclose(f);
    int tok[C];
    for (unsigned i = 0; i < C; i++)
        tok[i] = b[i];
    qcap qc = {.n = C, .qd = 6 * 64};
    qc.q = malloc((size_t)6 * C * qc.qd * sizeof(float));
    assert_int_equal(ra_lm_prefill(lm, tok, C, NULL, NULL, qcap_fn, &qc), RA_OK);
    float *row = malloc((size_t)C * 64 * sizeof(float));
    for (unsigned l = 0; l < 6; l++) {
        for (unsigned g = 0; g < 2; g++) {
            assert_int_equal(ra_trace_read(t, RA_TRACE_K, l, g, 0, C, row), RA_OK);
            assert_memory_equal(row, ra_lm_cache_k(lm, l, g), (size_t)C * 64 * sizeof(float));
            assert_int_equal(ra_trace_read(t, RA_TRACE_V, l, g, 0, C, row), RA_OK);
            assert_memory_equal(row, ra_lm_cache_v(lm, l, g), (size_t)C * 64 * sizeof(float));
        }
        for (unsigned h = 0; h < 6; h++) {
            assert_int_equal(ra_trace_read(t, RA_TRACE_Q, l, h, 0, C, row), RA_OK);
            for (unsigned p = 0; p < C; p++)
                assert_memory_equal(row + (size_t)p * 64, qc.q + ((size_t)l * C + p) * qc.qd + h * 64,
                                    64 * sizeof(float));
        }
    }
    free(row);
    free(qc.q);
    ra_lm_free(lm);
    ra_trace_close(t);
}

/* --repeat: spans copied from >= 4096 bytes back are predicted much better with full
 * attention (the model's copy head) than with sink + window attention. */
static void test_cli_repeat(void **s)
{
    char cmd[2048], *out;
    snprintf(cmd, sizeof cmd,
             "'%s' --model '%s' --text '%s' --context 4500 --eval 528 --repeat 2 --mode full,window --json --quiet",
             g_eval, g_model, g_kjv);
    int rc = run_cmd(cmd, &out);
    const char *f = strstr(out, "\"mode\":\"full\""), *w = strstr(out, "\"mode\":\"window\"");
    const char *fr = f ? strstr(f, "\"bpb_repeat\":") : NULL, *wr = w ? strstr(w, "\"bpb_repeat\":") : NULL;
    if (rc != 0 || !fr || !wr)
        fail_msg("exit %d: %s", rc, out);
    double full = atof(fr + 13), win = atof(wr + 13);
    fprintf(stderr, "# --repeat 2: bpb on the repeated spans: full %.4f, window %.4f\n", full, win);
    assert_true(full < 0.7 * win);
    free(out);
    snprintf(cmd, sizeof cmd, "'%s' --model '%s' --text '%s' --context 3000 --eval 528 --repeat 2 --mode full",
             g_eval, g_model, g_kjv);
    expect_fail(cmd, "--repeat", "4096");
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_copy_kjv),
        cmocka_unit_test(test_copy_sqlite),
        cmocka_unit_test(test_decode_matches_prefill),
        cmocka_unit_test(test_cli_bad_input),
        cmocka_unit_test(test_cli_trace_and_json),
        cmocka_unit_test(test_cli_repeat),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
