/* Device tests of the reference decoder on the GPU (gpu/ra_gpu_lm.h via bench/lm's
 * ra_lm_gpu_load, label gpu): the real model (bench/models/kjv-byte-llama) on held-out
 * text, the GPU decoder against the CPU decoder (bench/lm/lm.c, OpenBLAS) on the same
 * tokens — logits after a 512-token prefill, logits of every decode step with full and
 * with sink+window attention, and bits per byte of both modes. Both run fp32 with fp32
 * accumulation, so they differ only by summation order: the bounds are tight (1e-3 of
 * the logit range per step, 1e-4 relative in bits per byte). Without a CUDA device the
 * comparisons skip and the stub's RA_ENOTSUP is checked instead. */
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "ra_lm.h"
#include "ra_lm_gpu.h"

#define CTX 512u
#define EVAL 64u
#define SINK 32u
#define WIN 128u

static char g_model[512], g_text[512];
static ra_lm *g_cpu;
static ra_gpu_lm *g_gpu;
static int *g_tok;

static int setup(void **state)
{
    (void)state;
    const char *src = getenv("RA_SOURCE_DIR");
    if (!src)
        src = ".";
    snprintf(g_model, sizeof g_model, "%s/bench/models/kjv-byte-llama", src);
    snprintf(g_text, sizeof g_text, "%s/bench/data/heldout-kjv.txt", src);
    char err[512];
    if (ra_lm_load(g_model, CTX + EVAL, &g_cpu, err, sizeof err) != RA_OK) {
        fprintf(stderr, "%s\n", err);
        return -1;
    }
    FILE *f = fopen(g_text, "rb");
    if (!f)
        return -1;
    unsigned char b[CTX + EVAL];
    size_t n = fread(b, 1, sizeof b, f);
    fclose(f);
    if (n != sizeof b)
        return -1;
    g_tok = malloc(sizeof b * sizeof *g_tok);
    for (unsigned i = 0; i < CTX + EVAL; i++)
        g_tok[i] = b[i];
    if (ra_gpu_lm_available()) {
        ra_status s = ra_lm_gpu_load(g_model, g_cpu, CTX + EVAL, 0, &g_gpu, err, sizeof err);
        if (s != RA_OK) {
            fprintf(stderr, "ra_lm_gpu_load: %s: %s\n", ra_strerror(s), err);
            return -1;
        }
    }
    return 0;
}

static int teardown(void **state)
{
    (void)state;
    ra_gpu_lm_destroy(g_gpu);
    ra_lm_free(g_cpu);
    free(g_tok);
    return 0;
}

/* max |a - b| over the logit range of b */
static double logit_err(const float *a, const float *b, unsigned n)
{
    double d = 0, lo = INFINITY, hi = -INFINITY;
    for (unsigned i = 0; i < n; i++) {
        double e = fabs((double)a[i] - b[i]);
        d = e > d ? e : d;
        lo = b[i] < lo ? b[i] : lo;
        hi = b[i] > hi ? b[i] : hi;
    }
    return d / (hi - lo);
}

static void test_stub_without_device(void **state)
{
    (void)state;
    if (ra_gpu_lm_available()) {
        skip();
        return;
    }
    ra_gpu_lm *g = NULL;
    char err[256];
    assert_int_equal(ra_lm_gpu_load(g_model, g_cpu, CTX, 0, &g, err, sizeof err), RA_ENOTSUP);
    assert_null(g);
}

static void prefill_both(float *lc, float *lg)
{
    assert_int_equal(ra_lm_rewind(g_cpu, 0), RA_OK);
    assert_int_equal(ra_gpu_lm_rewind(g_gpu, 0), RA_OK);
    assert_int_equal(ra_lm_prefill(g_cpu, g_tok, CTX, lc, NULL, NULL, NULL), RA_OK);
    ra_status s = ra_gpu_lm_prefill(g_gpu, g_tok, CTX, lg, NULL, NULL);
    if (s != RA_OK)
        fprintf(stderr, "gpu prefill: %s\n", ra_gpu_lm_last_error(g_gpu));
    assert_int_equal(s, RA_OK);
}

static void test_prefill_logits(void **state)
{
    (void)state;
    if (!g_gpu) {
        skip();
        return;
    }
    unsigned V = ra_lm_get_config(g_cpu)->vocab;
    float *lc = malloc(V * sizeof(float)), *lg = malloc(V * sizeof(float));
    prefill_both(lc, lg);
    double e = logit_err(lg, lc, V);
    printf("# prefill %u tokens: max |gpu - cpu| logit / range = %.3g\n", CTX, e);
    assert_true(e < 1e-3);
    free(lc);
    free(lg);
}

static ra_status cpu_window(void *ctx, ra_lm *lm, unsigned layer, unsigned pos, const float *q, float *o)
{
    (void)ctx;
    const ra_lm_config *c = ra_lm_get_config(lm);
    unsigned a = SINK < pos + 1 ? SINK : pos + 1, b = pos + 1 > WIN ? pos + 1 - WIN : 0;
    if (b < a)
        b = a;
    unsigned r[4] = {0, a, b, pos + 1};
    float lse;
    for (unsigned h = 0; h < c->n_heads; h++)
        ra_lm_attend_ranges(lm, layer, h, q + (size_t)h * c->head_dim, r, 2, o + (size_t)h * c->head_dim, &lse);
    return RA_OK;
}

static ra_status gpu_window(void *ctx, ra_gpu_lm *g, unsigned layer, unsigned pos, const float *q, float *o)
{
    (void)ctx;
    unsigned a = SINK < pos + 1 ? SINK : pos + 1, b = pos + 1 > WIN ? pos + 1 - WIN : 0;
    if (b < a)
        b = a;
    unsigned r[4] = {0, a, b, pos + 1};
    return ra_gpu_lm_attend_ranges(g, layer, q, r, 2, o, NULL);
}

/* decodes EVAL tokens after the prefill on both devices; returns bpb of each */
static void decode_both(int window, double *bpb_cpu, double *bpb_gpu, double *max_err)
{
    unsigned V = ra_lm_get_config(g_cpu)->vocab;
    float *lc = malloc(V * sizeof(float)), *lg = malloc(V * sizeof(float));
    prefill_both(lc, lg);
    double nc = -ra_lm_logprob(lc, V, g_tok[CTX]), ng = -ra_lm_logprob(lg, V, g_tok[CTX]);
    *max_err = logit_err(lg, lc, V);
    for (unsigned i = 1; i < EVAL; i++) {
        int t = g_tok[CTX + i - 1];
        assert_int_equal(ra_lm_decode(g_cpu, t, lc, window ? cpu_window : NULL, NULL), RA_OK);
        ra_status s = ra_gpu_lm_decode(g_gpu, t, lg, window ? gpu_window : NULL, NULL);
        if (s != RA_OK)
            fprintf(stderr, "gpu decode: %s\n", ra_gpu_lm_last_error(g_gpu));
        assert_int_equal(s, RA_OK);
        double e = logit_err(lg, lc, V);
        *max_err = e > *max_err ? e : *max_err;
        nc -= ra_lm_logprob(lc, V, g_tok[CTX + i]);
        ng -= ra_lm_logprob(lg, V, g_tok[CTX + i]);
    }
    *bpb_cpu = nc / EVAL / M_LN2;
    *bpb_gpu = ng / EVAL / M_LN2;
    free(lc);
    free(lg);
}

static void test_decode_full(void **state)
{
    (void)state;
    if (!g_gpu) {
        skip();
        return;
    }
    double bc, bg, e;
    decode_both(0, &bc, &bg, &e);
    printf("# full: bpb cpu %.6f gpu %.6f (rel diff %.3g), max logit err / range %.3g\n", bc, bg,
           fabs(bg / bc - 1), e);
    assert_true(e < 1e-3);
    assert_true(fabs(bg / bc - 1) < 1e-4);
}

static void test_decode_window(void **state)
{
    (void)state;
    if (!g_gpu) {
        skip();
        return;
    }
    double bc, bg, e;
    decode_both(1, &bc, &bg, &e);
    printf("# window %u+%u: bpb cpu %.6f gpu %.6f (rel diff %.3g), max logit err / range %.3g\n", SINK, WIN, bc, bg,
           fabs(bg / bc - 1), e);
    assert_true(e < 1e-3);
    assert_true(fabs(bg / bc - 1) < 1e-4);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_stub_without_device),
        cmocka_unit_test(test_prefill_logits),
        cmocka_unit_test(test_decode_full),
        cmocka_unit_test(test_decode_window),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
