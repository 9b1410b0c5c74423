/* Unit tests of the reference decoder's loading and numerics (bench/lm): the bounded
 * JSON reader, safetensors validation on good and corrupted files, config.json
 * validation, RoPE in the HF rotate_half layout, and the whole forward pass (prefill
 * and decode) against a naive double-precision Llama on a tiny synthetic model. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <cmocka.h>

#include "lm_json.h"
#include "lm_st.h"
#include "lm_test_util.h"
#include "ra_lm.h"

static char g_dir[256];
static tiny_model g_m;

static int setup(void **state)
{
    snprintf(g_dir, sizeof g_dir, "/tmp/ra_lm_test.XXXXXX");
    if (!mkdtemp(g_dir))
        return -1;
    tiny_build(&g_m);
    return 0;
}

static int teardown(void **state)
{
    char cmd[300];
    tiny_free(&g_m);
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", g_dir);
    return system(cmd) == 0 ? 0 : -1;
}

static void contains(const char *msg, const char *needle)
{
    if (!strstr(msg, needle))
        fail_msg("message '%s' lacks '%s'", msg, needle);
}

/* ------------------------------------------------------------------ JSON */

static void test_json(void **s)
{
    ra_lm_json *j;
    char err[200];
    const char *ok = " {\"a\": [1, -2.5e3, true, false, null], \"b\": {\"c\": \"x\\u00e9\\ud83d\\ude00\\n\"}} ";
    assert_int_equal(ra_lm_json_parse(ok, strlen(ok), &j, err, sizeof err), RA_OK);
    const ra_lm_json *a = ra_lm_json_get(j, "a");
    assert_non_null(a);
    assert_int_equal(a->n, 5);
    long long v;
    assert_true(ra_lm_json_int(&a->kids[0], 0, 10, &v) && v == 1);
    assert_true(ra_lm_json_int(&a->kids[1], -1000000, 1000000, &v) && v == -2500);
    assert_false(ra_lm_json_int(&a->kids[1], 0, 1000000, &v)); /* below the bound */
    assert_false(ra_lm_json_int(&a->kids[2], 0, 1, &v));       /* true is not a number */
    assert_string_equal(ra_lm_json_get(ra_lm_json_get(j, "b"), "c")->str, "x\xc3\xa9\xf0\x9f\x98\x80\n");
    ra_lm_json_free(j);

    const char *bad[] = {"", "{", "{\"a\":}", "[1,]", "{\"a\" 1}", "\"abc", "[1] x", "{\"a\":\"\\q\"}",
                         "[\"\\ud800\"]", "[nul]", "[1e999]", "[\"\\u0000\"]", "{1:2}"};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        j = NULL;
        assert_int_not_equal(ra_lm_json_parse(bad[i], strlen(bad[i]), &j, err, sizeof err), RA_OK);
        assert_null(j);
        contains(err, "byte ");
    }
    /* nesting is capped, not a stack overflow */
    char deep[200];
    memset(deep, '[', sizeof deep);
    assert_int_equal(ra_lm_json_parse(deep, sizeof deep, &j, err, sizeof err), RA_ETOOBIG);
    /* the parser never reads past len: a prefix of a valid text is invalid */
    assert_int_not_equal(ra_lm_json_parse(ok, 10, &j, err, sizeof err), RA_OK);
}

/* ------------------------------------------------------------------ safetensors */

static void st_expect(const char *path, ra_status want, const char *needle)
{
    ra_lm_st *st = NULL;
    char err[512] = "";
    assert_int_equal(ra_lm_st_open(path, &st, err, sizeof err), want);
    assert_null(st);
    contains(err, path);
    contains(err, needle);
}

static void test_st_good(void **s)
{
    char path[300], err[256];
    snprintf(path, sizeof path, "%s/good.safetensors", g_dir);
    assert_int_equal(tiny_write_st(&g_m, path, NULL, 0, 0), 0);
    ra_lm_st *st;
    assert_int_equal(ra_lm_st_open(path, &st, err, sizeof err), RA_OK);
    assert_int_equal(ra_lm_st_count(st), g_m.n);
    const ra_lm_st_tensor *t = ra_lm_st_find(st, "model.layers.1.mlp.down_proj.weight");
    assert_non_null(t);
    assert_int_equal(t->rank, 2);
    assert_int_equal(t->shape[0], TH);
    assert_int_equal(t->shape[1], TF);
    float buf[TH * TF];
    uint64_t shape[2] = {TH, TF};
    assert_int_equal(ra_lm_st_load_f32(st, t->name, 2, shape, buf, err, sizeof err), RA_OK);
    assert_memory_equal(buf, tiny_get(&g_m, t->name), sizeof buf);
    uint64_t wrong[2] = {TF, TH};
    assert_int_equal(ra_lm_st_load_f32(st, t->name, 2, wrong, buf, err, sizeof err), RA_ESHAPE);
    contains(err, "down_proj");
    contains(err, "[8, 12]");
    assert_int_equal(ra_lm_st_load_f32(st, "nope", 2, wrong, buf, err, sizeof err), RA_EPROTO);
    contains(err, "missing");
    ra_lm_st_close(st);
}

static void test_st_bad(void **s)
{
    char path[300];
    snprintf(path, sizeof path, "%s/bad.safetensors", g_dir);
    st_expect(path, RA_EIO, "cannot open");
    /* header length claims more bytes than the file has */
    assert_int_equal(tiny_write_st(&g_m, path, NULL, 1 << 20, 0), 0);
    st_expect(path, RA_EPROTO, "header claims");
    /* file cut short: the last tensor's range leaves the data area */
    assert_int_equal(tiny_write_st(&g_m, path, NULL, 0, 10), 0);
    st_expect(path, RA_EPROTO, "data_offsets end");
    /* header length pointing inside the JSON: malformed */
    assert_int_equal(tiny_write_st(&g_m, path, NULL, -5, 0), 0);
    st_expect(path, RA_EPROTO, "malformed JSON");
    /* shorter than the length field */
    assert_int_equal(write_file(path, "abc", 3), 0);
    st_expect(path, RA_EPROTO, "too short");
    /* byte range disagrees with shape * dtype size */
    assert_int_equal(tiny_write_st(&g_m, path,
                                   ",\"x\":{\"dtype\":\"F32\",\"shape\":[3],\"data_offsets\":[0,8]}", 0, 0), 0);
    st_expect(path, RA_EPROTO, "'x'");
    /* overlapping tensors */
    assert_int_equal(tiny_write_st(&g_m, path,
                                   ",\"x\":{\"dtype\":\"BF16\",\"shape\":[2],\"data_offsets\":[2,6]}", 0, 0), 0);
    st_expect(path, RA_EPROTO, "overlap");
    /* unsupported dtype */
    assert_int_equal(tiny_write_st(&g_m, path,
                                   ",\"x\":{\"dtype\":\"I64\",\"shape\":[1],\"data_offsets\":[0,8]}", 0, 0), 0);
    st_expect(path, RA_ENOTSUP, "I64");
    /* negative / fractional shape, missing fields */
    assert_int_equal(tiny_write_st(&g_m, path,
                                   ",\"x\":{\"dtype\":\"BF16\",\"shape\":[-1],\"data_offsets\":[0,0]}", 0, 0), 0);
    st_expect(path, RA_EPROTO, "shape");
    assert_int_equal(tiny_write_st(&g_m, path, ",\"x\":{\"dtype\":\"BF16\",\"shape\":[1]}", 0, 0), 0);
    st_expect(path, RA_EPROTO, "lacks");
    /* a shape with more elements than the file has bytes */
    assert_int_equal(tiny_write_st(&g_m, path,
                                   ",\"x\":{\"dtype\":\"BF16\",\"shape\":[1000000,1000000],\"data_offsets\":[0,2]}",
                                   0, 0), 0);
    st_expect(path, RA_EPROTO, "more elements");
}

/* ------------------------------------------------------------------ model directories */

static void load_expect(const char *dir, ra_status want, const char *n1, const char *n2)
{
    ra_lm *lm = NULL;
    char err[512] = "";
    assert_int_equal(ra_lm_load(dir, 0, &lm, err, sizeof err), want);
    assert_null(lm);
    contains(err, n1);
    if (n2)
        contains(err, n2);
}

static char *cfg_replace(const char *from, const char *to)
{
    static char buf[4096];
    const char *p = strstr(tiny_config_json, from);
    assert_non_null(p);
    snprintf(buf, sizeof buf, "%.*s%s%s", (int)(p - tiny_config_json), tiny_config_json, to, p + strlen(from));
    return buf;
}

static void test_model_dir_bad(void **s)
{
    char dir[300], p[400];
    snprintf(dir, sizeof dir, "%s/nonexistent", g_dir);
    load_expect(dir, RA_EIO, dir, "cannot open");

    snprintf(dir, sizeof dir, "%s/m_noconfig", g_dir);
    assert_int_equal(tiny_write_dir(&g_m, dir, NULL), 0);
    snprintf(p, sizeof p, "%s/config.json", dir);
    unlink(p);
    load_expect(dir, RA_EIO, "config.json", "cannot open");

    snprintf(dir, sizeof dir, "%s/m_badjson", g_dir);
    assert_int_equal(tiny_write_dir(&g_m, dir, "{\"vocab_size\": 16,"), 0);
    load_expect(dir, RA_EPROTO, "config.json", "malformed");

    struct { const char *from, *to, *needle; } cfgs[] = {
        {"\"num_attention_heads\":2", "\"num_attention_heads\":\"two\"", "num_attention_heads"},
        {"\"num_key_value_heads\":1", "\"num_key_value_heads\":3", "multiple"},
        {"\"hidden_act\":\"silu\"", "\"hidden_act\":\"gelu\"", "hidden_act"},
        {"\"attention_bias\":false", "\"attention_bias\":true", "bias"},
        {"\"vocab_size\":16,", "", "vocab_size"},
        {"\"rope_type\":\"default\"", "\"rope_type\":\"yarn\"", "yarn"},
        {"\"rms_norm_eps\":1e-05", "\"rms_norm_eps\":-1", "rms_norm_eps"},
        {"\"hidden_size\":8", "\"hidden_size\":1e30", "hidden_size"},
    };
    for (size_t i = 0; i < sizeof cfgs / sizeof cfgs[0]; i++) {
        snprintf(dir, sizeof dir, "%s/m_cfg%zu", g_dir, i);
        assert_int_equal(tiny_write_dir(&g_m, dir, cfg_replace(cfgs[i].from, cfgs[i].to)), 0);
        load_expect(dir, RA_EINVAL, "config.json", cfgs[i].needle);
    }

    /* the config implies other shapes than the weights have: hidden 16 */
    snprintf(dir, sizeof dir, "%s/m_shape", g_dir);
    assert_int_equal(tiny_write_dir(&g_m, dir, cfg_replace("\"intermediate_size\":12", "\"intermediate_size\":10")), 0);
    load_expect(dir, RA_ESHAPE, "model.safetensors", "gate_proj");

    /* a weight stored as I64: the file names the dtype */
    tiny_model m2;
    tiny_build(&m2);
    m2.t[3].dtype = "I64";
    snprintf(dir, sizeof dir, "%s/m_dtype", g_dir);
    assert_int_equal(tiny_write_dir(&m2, dir, NULL), 0);
    load_expect(dir, RA_ENOTSUP, "model.safetensors", "I64");
    tiny_free(&m2);

    /* a context longer than max_position_embeddings */
    snprintf(dir, sizeof dir, "%s/m_good", g_dir);
    assert_int_equal(tiny_write_dir(&g_m, dir, NULL), 0);
    ra_lm *lm = NULL;
    char err[512];
    assert_int_equal(ra_lm_load(dir, TMAXPOS + 1, &lm, err, sizeof err), RA_EINVAL);
    contains(err, "max_position_embeddings");
}

static ra_lm *load_tiny(const char *cfg, const char *name)
{
    char dir[300], err[512];
    snprintf(dir, sizeof dir, "%s/%s", g_dir, name);
    assert_int_equal(tiny_write_dir(&g_m, dir, cfg), 0);
    ra_lm *lm = NULL;
    if (ra_lm_load(dir, 0, &lm, err, sizeof err) != RA_OK)
        fail_msg("load: %s", err);
    return lm;
}

/* ------------------------------------------------------------------ RoPE */

static void test_rope(void **s)
{
    ra_lm *lm = load_tiny(NULL, "m_rope");
    float x[2 * THD], ref[2 * THD];
    for (unsigned pos = 0; pos < TMAXPOS; pos += 7) {
        for (unsigned i = 0; i < 2 * THD; i++)
            x[i] = (float)(i + 1) * 0.25f - 1.0f;
        memcpy(ref, x, sizeof x);
        ra_lm_rope(lm, x, 2, pos);
        /* HF rotate_half: pairs (i, i + d/2), angle pos * theta^(-2i/d) */
        for (unsigned h = 0; h < 2; h++)
            for (unsigned i = 0; i < THD / 2; i++) {
                double ang = pos * pow(10000.0, -2.0 * i / THD);
                double a = ref[h * THD + i], b = ref[h * THD + i + THD / 2];
                assert_true(fabs(x[h * THD + i] - (a * cos(ang) - b * sin(ang))) < 1e-4);
                assert_true(fabs(x[h * THD + i + THD / 2] - (b * cos(ang) + a * sin(ang))) < 1e-4);
            }
    }
    /* the point of RoPE: q(m).k(n) depends on m - n only */
    float q[THD], k[THD], q2[THD], k2[THD];
    for (unsigned i = 0; i < THD; i++) {
        q[i] = q2[i] = sinf((float)i + 1);
        k[i] = k2[i] = cosf((float)i * 3);
    }
    ra_lm_rope(lm, q, 1, 20);
    ra_lm_rope(lm, k, 1, 13);
    ra_lm_rope(lm, q2, 1, 57);
    ra_lm_rope(lm, k2, 1, 50);
    double d1 = 0, d2 = 0;
    for (unsigned i = 0; i < THD; i++) {
        d1 += q[i] * k[i];
        d2 += q2[i] * k2[i];
    }
    assert_true(fabs(d1 - d2) < 1e-4);
    ra_lm_free(lm);

    /* linear scaling by 2: position 2p behaves as p did */
    lm = load_tiny(cfg_replace("\"rope_type\":\"default\"", "\"rope_type\":\"linear\",\"factor\":2.0"), "m_rope_lin");
    ra_lm *lm0 = load_tiny(NULL, "m_rope0");
    float a[THD], b[THD];
    for (unsigned i = 0; i < THD; i++)
        a[i] = b[i] = (float)i - 3.5f;
    ra_lm_rope(lm, a, 1, 30);
    ra_lm_rope(lm0, b, 1, 15);
    for (unsigned i = 0; i < THD; i++)
        assert_true(fabsf(a[i] - b[i]) < 1e-5f);
    ra_lm_free(lm);
    ra_lm_free(lm0);
}

/* ------------------------------------------------------------------ forward pass */

/* A naive double-precision Llama over tokens[0..n): logits [n][TV]. */
static void naive_forward(const int *tok, unsigned n, double *logits)
{
    static double x[TMAXPOS][TH], xn[TMAXPOS][TH], q[TMAXPOS][TNH * THD], k[TMAXPOS][TNKV * THD],
        v[TMAXPOS][TNKV * THD], att[TMAXPOS][TNH * THD];
    char nm[96];
    const float *emb = tiny_get(&g_m, "model.embed_tokens.weight");
    for (unsigned t = 0; t < n; t++)
        for (unsigned i = 0; i < TH; i++)
            x[t][i] = emb[tok[t] * TH + i];
#define G(s) (snprintf(nm, sizeof nm, "model.layers.%u.%s", l, s), tiny_get(&g_m, nm))
    for (unsigned l = 0; l < TL; l++) {
        const float *an = G("input_layernorm.weight"), *wq = G("self_attn.q_proj.weight"),
                    *wk = G("self_attn.k_proj.weight"), *wv = G("self_attn.v_proj.weight"),
                    *wo = G("self_attn.o_proj.weight"), *mn = G("post_attention_layernorm.weight"),
                    *wg = G("mlp.gate_proj.weight"), *wu = G("mlp.up_proj.weight"), *wd = G("mlp.down_proj.weight");
        for (unsigned t = 0; t < n; t++) {
            double ss = 0;
            for (unsigned i = 0; i < TH; i++)
                ss += x[t][i] * x[t][i];
            double inv = 1.0 / sqrt(ss / TH + 1e-5);
            for (unsigned i = 0; i < TH; i++)
                xn[t][i] = an[i] * x[t][i] * inv;
            for (unsigned o = 0; o < TNH * THD; o++) {
                q[t][o] = 0;
                for (unsigned i = 0; i < TH; i++)
                    q[t][o] += wq[o * TH + i] * xn[t][i];
            }
            for (unsigned o = 0; o < TNKV * THD; o++) {
                k[t][o] = v[t][o] = 0;
                for (unsigned i = 0; i < TH; i++) {
                    k[t][o] += wk[o * TH + i] * xn[t][i];
                    v[t][o] += wv[o * TH + i] * xn[t][i];
                }
            }
            /* rotate_half RoPE, angles in double */
            for (unsigned h = 0; h < TNH + TNKV; h++) {
                double *vec = h < TNH ? &q[t][h * THD] : &k[t][(h - TNH) * THD];
                for (unsigned i = 0; i < THD / 2; i++) {
                    double ang = t * pow(10000.0, -2.0 * i / THD);
                    double a = vec[i], b = vec[i + THD / 2];
                    vec[i] = a * cos(ang) - b * sin(ang);
                    vec[i + THD / 2] = b * cos(ang) + a * sin(ang);
                }
            }
        }
        for (unsigned t = 0; t < n; t++)
            for (unsigned h = 0; h < TNH; h++) {
                unsigned g = h / (TNH / TNKV);
                double sc[TMAXPOS], m = -1e300, sum = 0;
                for (unsigned j = 0; j <= t; j++) {
                    sc[j] = 0;
                    for (unsigned d = 0; d < THD; d++)
                        sc[j] += q[t][h * THD + d] * k[j][g * THD + d];
                    sc[j] /= sqrt((double)THD);
                    m = sc[j] > m ? sc[j] : m;
                }
                for (unsigned j = 0; j <= t; j++)
                    sum += sc[j] = exp(sc[j] - m);
                for (unsigned d = 0; d < THD; d++) {
                    double acc = 0;
                    for (unsigned j = 0; j <= t; j++)
                        acc += sc[j] / sum * v[j][g * THD + d];
                    att[t][h * THD + d] = acc;
                }
            }
        for (unsigned t = 0; t < n; t++) {
            for (unsigned o = 0; o < TH; o++) {
                double acc = 0;
                for (unsigned i = 0; i < TNH * THD; i++)
                    acc += wo[o * TNH * THD + i] * att[t][i];
                x[t][o] += acc;
            }
            double ss = 0;
            for (unsigned i = 0; i < TH; i++)
                ss += x[t][i] * x[t][i];
            double inv = 1.0 / sqrt(ss / TH + 1e-5);
            for (unsigned i = 0; i < TH; i++)
                xn[t][i] = mn[i] * x[t][i] * inv;
            double h1[TF];
            for (unsigned f = 0; f < TF; f++) {
                double gsum = 0, usum = 0;
                for (unsigned i = 0; i < TH; i++) {
                    gsum += wg[f * TH + i] * xn[t][i];
                    usum += wu[f * TH + i] * xn[t][i];
                }
                h1[f] = gsum / (1 + exp(-gsum)) * usum;
            }
            for (unsigned o = 0; o < TH; o++) {
                double acc = 0;
                for (unsigned f = 0; f < TF; f++)
                    acc += wd[o * TF + f] * h1[f];
                x[t][o] += acc;
            }
        }
    }
#undef G
    const float *fn = tiny_get(&g_m, "model.norm.weight"), *head = tiny_get(&g_m, "lm_head.weight");
    for (unsigned t = 0; t < n; t++) {
        double ss = 0;
        for (unsigned i = 0; i < TH; i++)
            ss += x[t][i] * x[t][i];
        double inv = 1.0 / sqrt(ss / TH + 1e-5);
        for (unsigned o = 0; o < TV; o++) {
            double acc = 0;
            for (unsigned i = 0; i < TH; i++)
                acc += head[o * TH + i] * fn[i] * x[t][i] * inv;
            logits[t * TV + o] = acc;
        }
    }
}

static void test_forward_vs_naive(void **s)
{
    ra_lm *lm = load_tiny(NULL, "m_fwd");
    enum { N = 40, P = 25 };
    int tok[N];
    for (unsigned i = 0; i < N; i++)
        tok[i] = (int)((i * 7 + 3) % TV);
    static double ref[N * TV];
    naive_forward(tok, N, ref);
    static float all[N * TV], last[TV];
    assert_int_equal(ra_lm_prefill(lm, tok, N, last, all, NULL, NULL), RA_OK);
    double maxerr = 0;
    for (unsigned i = 0; i < N * TV; i++)
        maxerr = fmax(maxerr, fabs(all[i] - ref[i]));
    assert_true(maxerr < 2e-4);
    for (unsigned i = 0; i < TV; i++) /* one row by GEMV, all rows by GEMM: rounding only */
        assert_true(fabsf(last[i] - all[(N - 1) * TV + i]) < 1e-5f);

    /* prefill P, then decode the rest one token at a time with full attention */
    assert_int_equal(ra_lm_rewind(lm, 0), RA_OK);
    assert_int_equal(ra_lm_prefill(lm, tok, P, last, NULL, NULL, NULL), RA_OK);
    for (unsigned t = P; t < N; t++) {
        float lg[TV];
        assert_int_equal(ra_lm_decode(lm, tok[t], lg, NULL, NULL), RA_OK);
        for (unsigned i = 0; i < TV; i++)
            assert_true(fabs(lg[i] - ref[t * TV + i]) < 2e-4);
    }
    assert_int_equal(ra_lm_pos(lm), N);

    /* bad tokens and overflow are refused */
    float lg[TV];
    assert_int_equal(ra_lm_decode(lm, TV, lg, NULL, NULL), RA_EINVAL);
    assert_int_equal(ra_lm_rewind(lm, N + 1), RA_EINVAL);
    int many[TMAXPOS + 1] = {0};
    assert_int_equal(ra_lm_rewind(lm, 0), RA_OK);
    assert_int_equal(ra_lm_prefill(lm, many, TMAXPOS + 1, NULL, NULL, NULL, NULL), RA_EINVAL);
    ra_lm_free(lm);
}

/* Partial attention over disjoint ranges merged by log-sum-exp equals full attention
 * (the rule ratd mode relies on). */
static void test_attend_ranges_merge(void **s)
{
    ra_lm *lm = load_tiny(NULL, "m_ranges");
    int tok[50];
    for (unsigned i = 0; i < 50; i++)
        tok[i] = (int)((i * 5 + 1) % TV);
    assert_int_equal(ra_lm_prefill(lm, tok, 50, NULL, NULL, NULL, NULL), RA_OK);
    float q[THD];
    for (unsigned i = 0; i < THD; i++)
        q[i] = 0.3f * (float)i - 1.0f;
    unsigned all[2] = {0, 50}, a[4] = {0, 4, 30, 50}, b[2] = {4, 30}, none[2] = {7, 7};
    float of[THD], oa[THD], ob[THD], lf, la, lb;
    ra_lm_attend_ranges(lm, 1, 1, q, all, 1, of, &lf);
    ra_lm_attend_ranges(lm, 1, 1, q, a, 2, oa, &la);
    ra_lm_attend_ranges(lm, 1, 1, q, b, 1, ob, &lb);
    double m = fmax(la, lb), wa = exp(la - m), wb = exp(lb - m);
    for (unsigned d = 0; d < THD; d++)
        assert_true(fabs((wa * oa[d] + wb * ob[d]) / (wa + wb) - of[d]) < 1e-5);
    assert_true(fabs(m + log(wa + wb) - lf) < 1e-5);
    ra_lm_attend_ranges(lm, 1, 1, q, none, 1, oa, &la);
    assert_true(isinf(la) && la < 0);
    ra_lm_free(lm);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_json),          cmocka_unit_test(test_st_good),
        cmocka_unit_test(test_st_bad),        cmocka_unit_test(test_model_dir_bad),
        cmocka_unit_test(test_rope),          cmocka_unit_test(test_forward_vs_naive),
        cmocka_unit_test(test_attend_ranges_merge),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
