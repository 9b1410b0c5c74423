/* The reference decoder behind ra_lm.h: config.json and safetensors loading with
 * full validation, and the Llama forward pass in fp32 on OpenBLAS. It follows
 * Hugging Face's LlamaForCausalLM operation for operation (RMSNorm with the weight
 * applied after normalisation, RoPE angles computed as fp32 inv_freq * fp32
 * position as HF does, rotate_half layout, softmax scale head_dim^-0.5, SwiGLU) so
 * that its bits per byte match the model's data card; it differs only in keeping
 * activations in fp32 where HF's bf16 inference rounds them. */
#define _GNU_SOURCE
#include "ra_lm.h"

#include <cblas.h>
#include <errno.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "lm_json.h"
#include "lm_st.h"

#define RA_LM_MAX_CONFIG (1u << 20)
#define RA_LM_CHUNK 256u /* prefill rows per pass: bounds the score buffer to CHUNK x max_ctx */

typedef struct lm_layer {
    float *attn_norm, *wq, *wk, *wv, *wo, *mlp_norm, *w_gate, *w_up, *w_down;
} lm_layer;

struct ra_lm {
    ra_lm_config cfg;
    unsigned max_ctx, pos;
    float scale;
    float *inv_freq; /* [head_dim / 2] */
    float *embed, *final_norm, *lm_head;
    lm_layer *layers;
    float *kc, *vc; /* [layer][kv_head][max_ctx][head_dim] */
    /* workspaces, sized for RA_LM_CHUNK rows */
    float *x, *xn, *q, *k, *v, *att, *g, *u, *s;
    float *dscore; /* [max_ctx] scores of one decode query */
};

static void seterr(char *err, size_t errlen, const char *fmt, ...)
{
    if (!err || !errlen)
        return;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err, errlen, fmt, ap);
    va_end(ap);
}

/* ------------------------------------------------------------------ config */

static ra_status read_small_file(const char *path, size_t max, char **out, size_t *len, char *err,
                                 size_t errlen)
{
    FILE *f = fopen(path, "rb");
    if (!f) {
        seterr(err, errlen, "%s: cannot open: %s", path, strerror(errno));
        return RA_EIO;
    }
    char *buf = malloc(max + 1);
    if (!buf) {
        fclose(f);
        seterr(err, errlen, "%s: out of memory", path);
        return RA_ENOMEM;
    }
    size_t n = fread(buf, 1, max + 1, f);
    int bad = ferror(f);
    fclose(f);
    if (bad) {
        free(buf);
        seterr(err, errlen, "%s: read error", path);
        return RA_EIO;
    }
    if (n > max) {
        free(buf);
        seterr(err, errlen, "%s: larger than %zu bytes", path, max);
        return RA_ETOOBIG;
    }
    *out = buf;
    *len = n;
    return RA_OK;
}

static int cfg_uint(const ra_lm_json *root, const char *key, long long lo, long long hi, long long dflt,
                    unsigned *out, const char *path, char *err, size_t errlen)
{
    const ra_lm_json *j = ra_lm_json_get(root, key);
    long long v;
    if (!j || j->type == RA_LM_JSON_NULL) {
        if (dflt < 0) {
            seterr(err, errlen, "%s: field '%s' is missing", path, key);
            return -1;
        }
        *out = (unsigned)dflt;
        return 0;
    }
    if (!ra_lm_json_int(j, lo, hi, &v)) {
        seterr(err, errlen, "%s: field '%s' must be an integer in [%lld, %lld]", path, key, lo, hi);
        return -1;
    }
    *out = (unsigned)v;
    return 0;
}

static int cfg_num(const ra_lm_json *root, const char *key, double lo, double hi, double dflt, int required,
                   double *out, const char *path, char *err, size_t errlen)
{
    const ra_lm_json *j = ra_lm_json_get(root, key);
    if (!j || j->type == RA_LM_JSON_NULL) {
        if (required) {
            seterr(err, errlen, "%s: field '%s' is missing", path, key);
            return -1;
        }
        *out = dflt;
        return 0;
    }
    if (j->type != RA_LM_JSON_NUM || !(j->num >= lo && j->num <= hi)) {
        seterr(err, errlen, "%s: field '%s' must be a number in [%g, %g]", path, key, lo, hi);
        return -1;
    }
    *out = j->num;
    return 0;
}

static int cfg_false(const ra_lm_json *root, const char *key, const char *path, char *err, size_t errlen)
{
    const ra_lm_json *j = ra_lm_json_get(root, key);
    if (j && !(j->type == RA_LM_JSON_BOOL && !j->boolean) && j->type != RA_LM_JSON_NULL) {
        seterr(err, errlen, "%s: '%s' is set: biases are not supported", path, key);
        return -1;
    }
    return 0;
}

static ra_status parse_config(const char *path, ra_lm_config *c, char *err, size_t errlen)
{
    char *text = NULL;
    size_t len = 0;
    ra_lm_json *root = NULL;
    char jerr[200];
    ra_status st = read_small_file(path, RA_LM_MAX_CONFIG, &text, &len, err, errlen);
    if (st != RA_OK)
        return st;
    if ((st = ra_lm_json_parse(text, len, &root, jerr, sizeof jerr)) != RA_OK) {
        seterr(err, errlen, "%s: malformed JSON: %s", path, jerr);
        goto out;
    }
    st = RA_EINVAL;
    if (root->type != RA_LM_JSON_OBJ) {
        seterr(err, errlen, "%s: not a JSON object", path);
        goto out;
    }
    memset(c, 0, sizeof *c);
    const ra_lm_json *mt = ra_lm_json_get(root, "model_type");
    if (mt && (mt->type != RA_LM_JSON_STR || (strcmp(mt->str, "llama") != 0 && strcmp(mt->str, "mistral") != 0))) {
        seterr(err, errlen, "%s: model_type '%s' is not a Llama architecture", path,
               mt->type == RA_LM_JSON_STR ? mt->str : "?");
        goto out;
    }
    const ra_lm_json *act = ra_lm_json_get(root, "hidden_act");
    if (act && (act->type != RA_LM_JSON_STR || strcmp(act->str, "silu") != 0)) {
        seterr(err, errlen, "%s: hidden_act must be \"silu\"", path);
        goto out;
    }
    if (cfg_false(root, "attention_bias", path, err, errlen) || cfg_false(root, "mlp_bias", path, err, errlen))
        goto out;
    if (cfg_uint(root, "vocab_size", 1, 1 << 20, -1, &c->vocab, path, err, errlen) ||
        cfg_uint(root, "hidden_size", 1, 65536, -1, &c->hidden, path, err, errlen) ||
        cfg_uint(root, "num_hidden_layers", 1, 1024, -1, &c->n_layers, path, err, errlen) ||
        cfg_uint(root, "num_attention_heads", 1, 1024, -1, &c->n_heads, path, err, errlen) ||
        cfg_uint(root, "num_key_value_heads", 1, 1024, c->n_heads, &c->n_kv_heads, path, err, errlen) ||
        cfg_uint(root, "intermediate_size", 1, 1 << 20, -1, &c->ffn, path, err, errlen) ||
        cfg_uint(root, "max_position_embeddings", 1, 1 << 24, -1, &c->max_pos, path, err, errlen))
        goto out;
    if (c->hidden % c->n_heads != 0 && !ra_lm_json_get(root, "head_dim")) {
        seterr(err, errlen, "%s: hidden_size %u is not a multiple of num_attention_heads %u", path, c->hidden,
               c->n_heads);
        goto out;
    }
    if (cfg_uint(root, "head_dim", 2, 4096, c->hidden / c->n_heads, &c->head_dim, path, err, errlen))
        goto out;
    if (c->head_dim % 2 != 0 || c->n_kv_heads > c->n_heads || c->n_heads % c->n_kv_heads != 0) {
        seterr(err, errlen, "%s: head_dim %u must be even and num_attention_heads %u a multiple of "
               "num_key_value_heads %u", path, c->head_dim, c->n_heads, c->n_kv_heads);
        goto out;
    }
    double eps;
    if (cfg_num(root, "rms_norm_eps", 0.0, 1.0, 1e-6, 0, &eps, path, err, errlen))
        goto out;
    c->rms_eps = (float)eps;
    const ra_lm_json *tie = ra_lm_json_get(root, "tie_word_embeddings");
    if (tie && tie->type != RA_LM_JSON_BOOL && tie->type != RA_LM_JSON_NULL) {
        seterr(err, errlen, "%s: tie_word_embeddings must be a boolean", path);
        goto out;
    }
    c->tied = tie && tie->type == RA_LM_JSON_BOOL && tie->boolean;

    /* RoPE: transformers >= 5 keeps it in rope_parameters, older ones in rope_theta +
     * rope_scaling; the key naming the variant is rope_type (or type, older). */
    const ra_lm_json *rp = ra_lm_json_get(root, "rope_parameters");
    const ra_lm_json *rs = ra_lm_json_get(root, "rope_scaling");
    const ra_lm_json *theta_src = root;
    if (rp && rp->type == RA_LM_JSON_OBJ) {
        theta_src = ra_lm_json_get(rp, "rope_theta") ? rp : root;
        rs = rp;
    } else if (rp && rp->type != RA_LM_JSON_NULL) {
        seterr(err, errlen, "%s: rope_parameters must be an object", path);
        goto out;
    }
    if (cfg_num(theta_src, "rope_theta", 1.0, 1e12, 10000.0, 0, &c->rope_theta, path, err, errlen))
        goto out;
    c->rope_type = RA_LM_ROPE_DEFAULT;
    if (rs && rs->type == RA_LM_JSON_OBJ) {
        const ra_lm_json *ty = ra_lm_json_get(rs, "rope_type");
        if (!ty)
            ty = ra_lm_json_get(rs, "type");
        const char *tname = ty && ty->type == RA_LM_JSON_STR ? ty->str : "default";
        if (strcmp(tname, "default") == 0) {
            c->rope_type = RA_LM_ROPE_DEFAULT;
        } else if (strcmp(tname, "linear") == 0) {
            c->rope_type = RA_LM_ROPE_LINEAR;
            if (cfg_num(rs, "factor", 1e-3, 1e6, 1.0, 1, &c->rope_factor, path, err, errlen))
                goto out;
        } else if (strcmp(tname, "llama3") == 0) {
            c->rope_type = RA_LM_ROPE_LLAMA3;
            if (cfg_num(rs, "factor", 1e-3, 1e6, 1.0, 1, &c->rope_factor, path, err, errlen) ||
                cfg_num(rs, "low_freq_factor", 1e-6, 1e6, 1.0, 1, &c->rope_low_freq, path, err, errlen) ||
                cfg_num(rs, "high_freq_factor", 1e-6, 1e6, 4.0, 1, &c->rope_high_freq, path, err, errlen) ||
                cfg_num(rs, "original_max_position_embeddings", 1, 1 << 24, 8192, 1, &c->rope_orig_max_pos, path,
                        err, errlen))
                goto out;
            if (c->rope_high_freq <= c->rope_low_freq) {
                seterr(err, errlen, "%s: llama3 RoPE needs high_freq_factor > low_freq_factor", path);
                goto out;
            }
        } else {
            seterr(err, errlen, "%s: RoPE type '%s' not supported (default, linear, llama3)", path, tname);
            goto out;
        }
    } else if (rs && rs->type != RA_LM_JSON_NULL) {
        seterr(err, errlen, "%s: rope_scaling must be an object or null", path);
        goto out;
    }
    st = RA_OK;
out:
    ra_lm_json_free(root);
    free(text);
    return st;
}

/* inv_freq exactly as transformers computes it: fp32 1 / theta^(2i/d), then the
 * scaling variant's adjustment. */
static void rope_init(const ra_lm_config *c, float *inv)
{
    unsigned half = c->head_dim / 2;
    for (unsigned i = 0; i < half; i++) {
        float e = (float)(2 * i) / (float)c->head_dim;
        float f = 1.0f / powf((float)c->rope_theta, e);
        if (c->rope_type == RA_LM_ROPE_LINEAR) {
            f = (float)(f / c->rope_factor);
        } else if (c->rope_type == RA_LM_ROPE_LLAMA3) {
            double low_wl = c->rope_orig_max_pos / c->rope_low_freq;
            double high_wl = c->rope_orig_max_pos / c->rope_high_freq;
            double wl = 2.0 * M_PI / f;
            if (wl > low_wl) {
                f = (float)(f / c->rope_factor);
            } else if (wl >= high_wl) {
                double sm = (c->rope_orig_max_pos / wl - c->rope_low_freq) / (c->rope_high_freq - c->rope_low_freq);
                f = (float)((1.0 - sm) * f / c->rope_factor + sm * f);
            }
        }
        inv[i] = f;
    }
}

void ra_lm_rope(const ra_lm *lm, float *x, unsigned n_heads, unsigned pos)
{
    unsigned hd = lm->cfg.head_dim, half = hd / 2;
    for (unsigned i = 0; i < half; i++) {
        float ang = (float)pos * lm->inv_freq[i]; /* fp32 product, as HF */
        float c = cosf(ang), s = sinf(ang);
        for (unsigned h = 0; h < n_heads; h++) {
            float *v = x + (size_t)h * hd;
            float a = v[i], b = v[i + half];
            v[i] = a * c - b * s;
            v[i + half] = b * c + a * s;
        }
    }
}

/* ------------------------------------------------------------------ loading */

static float *wload(const ra_lm_st *st, const char *name, unsigned rows, unsigned cols, ra_status *status,
                    char *err, size_t errlen)
{
    if (*status != RA_OK)
        return NULL;
    uint64_t shape[2] = {rows, cols};
    float *w = malloc((size_t)rows * (cols ? cols : 1) * sizeof *w);
    if (!w) {
        seterr(err, errlen, "out of memory loading '%s'", name);
        *status = RA_ENOMEM;
        return NULL;
    }
    ra_status s = ra_lm_st_load_f32(st, name, cols ? 2 : 1, shape, w, err, errlen);
    if (s != RA_OK) {
        free(w);
        *status = s;
        return NULL;
    }
    return w;
}

ra_status ra_lm_load(const char *dir, unsigned max_ctx, ra_lm **out, char *err, size_t errlen)
{
    char path[4096];
    ra_lm_st *st = NULL;
    ra_status s;
    ra_lm *lm = NULL;
    struct stat sb;
    if (stat(dir, &sb) != 0) {
        seterr(err, errlen, "%s: cannot open the model directory: %s", dir, strerror(errno));
        return RA_EIO;
    }
    if (!S_ISDIR(sb.st_mode)) {
        seterr(err, errlen, "%s: not a model directory", dir);
        return RA_EIO;
    }
    lm = calloc(1, sizeof *lm);
    if (!lm) {
        seterr(err, errlen, "out of memory");
        return RA_ENOMEM;
    }
    snprintf(path, sizeof path, "%s/config.json", dir);
    if ((s = parse_config(path, &lm->cfg, err, errlen)) != RA_OK)
        goto fail;
    ra_lm_config *c = &lm->cfg;
    if (max_ctx == 0)
        max_ctx = c->max_pos;
    if (max_ctx > c->max_pos) {
        seterr(err, errlen, "%s: context %u exceeds max_position_embeddings %u", path, max_ctx, c->max_pos);
        s = RA_EINVAL;
        goto fail;
    }
    lm->max_ctx = max_ctx;
    lm->scale = 1.0f / sqrtf((float)c->head_dim);
    snprintf(path, sizeof path, "%s/model.safetensors", dir);
    if ((s = ra_lm_st_open(path, &st, err, errlen)) != RA_OK)
        goto fail;
    unsigned H = c->hidden, QD = c->n_heads * c->head_dim, KD = c->n_kv_heads * c->head_dim, F = c->ffn;
    lm->layers = calloc(c->n_layers, sizeof *lm->layers);
    lm->inv_freq = malloc(c->head_dim / 2 * sizeof(float));
    if (!lm->layers || !lm->inv_freq) {
        seterr(err, errlen, "out of memory");
        s = RA_ENOMEM;
        goto fail;
    }
    rope_init(c, lm->inv_freq);
    lm->embed = wload(st, "model.embed_tokens.weight", c->vocab, H, &s, err, errlen);
    lm->final_norm = wload(st, "model.norm.weight", H, 0, &s, err, errlen);
    if (c->tied)
        lm->lm_head = lm->embed;
    else
        lm->lm_head = wload(st, "lm_head.weight", c->vocab, H, &s, err, errlen);
    for (unsigned l = 0; l < c->n_layers && s == RA_OK; l++) {
        lm_layer *L = &lm->layers[l];
        char n[160];
#define W(field, suffix, r, cl)                                                                                      \
    snprintf(n, sizeof n, "model.layers.%u.%s", l, suffix);                                                         \
    L->field = wload(st, n, r, cl, &s, err, errlen)
        W(attn_norm, "input_layernorm.weight", H, 0);
        W(wq, "self_attn.q_proj.weight", QD, H);
        W(wk, "self_attn.k_proj.weight", KD, H);
        W(wv, "self_attn.v_proj.weight", KD, H);
        W(wo, "self_attn.o_proj.weight", H, QD);
        W(mlp_norm, "post_attention_layernorm.weight", H, 0);
        W(w_gate, "mlp.gate_proj.weight", F, H);
        W(w_up, "mlp.up_proj.weight", F, H);
        W(w_down, "mlp.down_proj.weight", H, F);
#undef W
    }
    if (s != RA_OK)
        goto fail;
    ra_lm_st_close(st);
    st = NULL;

    size_t R = RA_LM_CHUNK, kv = (size_t)c->n_layers * c->n_kv_heads * max_ctx * c->head_dim;
    lm->kc = malloc(kv * sizeof(float));
    lm->vc = malloc(kv * sizeof(float));
    lm->x = malloc(R * H * sizeof(float));
    lm->xn = malloc(R * H * sizeof(float));
    lm->q = malloc(R * QD * sizeof(float));
    lm->k = malloc(R * KD * sizeof(float));
    lm->v = malloc(R * KD * sizeof(float));
    lm->att = malloc(R * QD * sizeof(float));
    lm->g = malloc(R * (F > c->vocab ? F : c->vocab) * sizeof(float));
    lm->u = malloc(R * F * sizeof(float));
    lm->s = malloc(R * max_ctx * sizeof(float));
    lm->dscore = malloc((size_t)max_ctx * sizeof(float));
    if (!lm->kc || !lm->vc || !lm->x || !lm->xn || !lm->q || !lm->k || !lm->v || !lm->att || !lm->g || !lm->u ||
        !lm->s || !lm->dscore) {
        seterr(err, errlen, "out of memory for a %u-position KV cache", max_ctx);
        s = RA_ENOMEM;
        goto fail;
    }
    *out = lm;
    return RA_OK;
fail:
    ra_lm_st_close(st);
    ra_lm_free(lm);
    return s;
}

void ra_lm_free(ra_lm *lm)
{
    if (!lm)
        return;
    if (lm->layers) {
        for (unsigned l = 0; l < lm->cfg.n_layers; l++) {
            lm_layer *L = &lm->layers[l];
            free(L->attn_norm);
            free(L->wq);
            free(L->wk);
            free(L->wv);
            free(L->wo);
            free(L->mlp_norm);
            free(L->w_gate);
            free(L->w_up);
            free(L->w_down);
        }
    }
    if (lm->lm_head != lm->embed)
        free(lm->lm_head);
    free(lm->embed);
    free(lm->final_norm);
    free(lm->layers);
    free(lm->inv_freq);
    free(lm->kc);
    free(lm->vc);
    free(lm->x);
    free(lm->xn);
    free(lm->q);
    free(lm->k);
    free(lm->v);
    free(lm->att);
    free(lm->g);
    free(lm->u);
    free(lm->s);
    free(lm->dscore);
    free(lm);
}

const ra_lm_config *ra_lm_get_config(const ra_lm *lm)
{
    return &lm->cfg;
}

unsigned ra_lm_max_ctx(const ra_lm *lm)
{
    return lm->max_ctx;
}

unsigned ra_lm_pos(const ra_lm *lm)
{
    return lm->pos;
}

float ra_lm_scale(const ra_lm *lm)
{
    return lm->scale;
}

ra_status ra_lm_rewind(ra_lm *lm, unsigned n)
{
    if (n > lm->pos)
        return RA_EINVAL;
    lm->pos = n;
    return RA_OK;
}

static float *kcache(const ra_lm *lm, float *base, unsigned layer, unsigned g)
{
    return base + ((size_t)layer * lm->cfg.n_kv_heads + g) * lm->max_ctx * lm->cfg.head_dim;
}

const float *ra_lm_cache_k(const ra_lm *lm, unsigned layer, unsigned kv_head)
{
    return kcache(lm, lm->kc, layer, kv_head);
}

const float *ra_lm_cache_v(const ra_lm *lm, unsigned layer, unsigned kv_head)
{
    return kcache(lm, lm->vc, layer, kv_head);
}

/* ------------------------------------------------------------------ forward */

/* HF LlamaRMSNorm: x * rsqrt(mean(x^2) + eps), then * weight. */
static void rmsnorm(const float *x, const float *w, float *y, unsigned rows, unsigned n, float eps)
{
    for (unsigned r = 0; r < rows; r++) {
        const float *xr = x + (size_t)r * n;
        float *yr = y + (size_t)r * n;
        double ss = 0;
        for (unsigned i = 0; i < n; i++)
            ss += (double)xr[i] * xr[i];
        float inv = 1.0f / sqrtf((float)(ss / n) + eps);
        for (unsigned i = 0; i < n; i++)
            yr[i] = w[i] * (xr[i] * inv);
    }
}

/* y[rows][out] = x[rows][in] W^T, W [out][in] row-major (torch Linear). */
static void linear(const float *x, const float *w, float *y, unsigned rows, unsigned in, unsigned out)
{
    if (rows == 1)
        cblas_sgemv(CblasRowMajor, CblasNoTrans, (int)out, (int)in, 1.0f, w, (int)in, x, 1, 0.0f, y, 1);
    else
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, (int)rows, (int)out, (int)in, 1.0f, x, (int)in, w,
                    (int)in, 0.0f, y, (int)out);
}

static void mlp_block(ra_lm *lm, const lm_layer *L, unsigned rows)
{
    const ra_lm_config *c = &lm->cfg;
    rmsnorm(lm->x, L->mlp_norm, lm->xn, rows, c->hidden, c->rms_eps);
    linear(lm->xn, L->w_gate, lm->g, rows, c->hidden, c->ffn);
    linear(lm->xn, L->w_up, lm->u, rows, c->hidden, c->ffn);
    size_t n = (size_t)rows * c->ffn;
    for (size_t i = 0; i < n; i++) {
        float a = lm->g[i];
        lm->g[i] = a / (1.0f + expf(-a)) * lm->u[i];
    }
    linear(lm->g, L->w_down, lm->xn, rows, c->ffn, c->hidden);
    for (size_t i = 0; i < (size_t)rows * c->hidden; i++)
        lm->x[i] += lm->xn[i];
}

/* q, k, v of `rows` rows at positions pos0.. from the normalised input; RoPE applied;
 * k and v stored into the cache. */
static void qkv_block(ra_lm *lm, const lm_layer *L, unsigned layer, unsigned pos0, unsigned rows)
{
    const ra_lm_config *c = &lm->cfg;
    unsigned hd = c->head_dim, QD = c->n_heads * hd, KD = c->n_kv_heads * hd;
    rmsnorm(lm->x, L->attn_norm, lm->xn, rows, c->hidden, c->rms_eps);
    linear(lm->xn, L->wq, lm->q, rows, c->hidden, QD);
    linear(lm->xn, L->wk, lm->k, rows, c->hidden, KD);
    linear(lm->xn, L->wv, lm->v, rows, c->hidden, KD);
    for (unsigned r = 0; r < rows; r++) {
        ra_lm_rope(lm, lm->q + (size_t)r * QD, c->n_heads, pos0 + r);
        ra_lm_rope(lm, lm->k + (size_t)r * KD, c->n_kv_heads, pos0 + r);
        for (unsigned g = 0; g < c->n_kv_heads; g++) {
            memcpy(kcache(lm, lm->kc, layer, g) + (size_t)(pos0 + r) * hd, lm->k + (size_t)r * KD + g * hd,
                   hd * sizeof(float));
            memcpy(kcache(lm, lm->vc, layer, g) + (size_t)(pos0 + r) * hd, lm->v + (size_t)r * KD + g * hd,
                   hd * sizeof(float));
        }
    }
}

static void logits_of(ra_lm *lm, const float *x, unsigned rows, float *logits)
{
    const ra_lm_config *c = &lm->cfg;
    rmsnorm(x, lm->final_norm, lm->xn, rows, c->hidden, c->rms_eps);
    linear(lm->xn, lm->lm_head, logits, rows, c->hidden, c->vocab);
}

/* Causal attention of rows pos0..pos0+rows-1 over cache rows 0..pos0+rows-1, per head:
 * one GEMM for the scores, a masked softmax, one GEMM for the output. */
static void prefill_attention(ra_lm *lm, unsigned layer, unsigned pos0, unsigned rows)
{
    const ra_lm_config *c = &lm->cfg;
    unsigned hd = c->head_dim, QD = c->n_heads * hd, grp = c->n_heads / c->n_kv_heads;
    unsigned nk = pos0 + rows;
    for (unsigned h = 0; h < c->n_heads; h++) {
        unsigned g = h / grp;
        const float *K = kcache(lm, lm->kc, layer, g), *V = kcache(lm, lm->vc, layer, g);
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, (int)rows, (int)nk, (int)hd, lm->scale, lm->q + h * hd,
                    (int)QD, K, (int)hd, 0.0f, lm->s, (int)nk);
        for (unsigned r = 0; r < rows; r++) {
            float *sr = lm->s + (size_t)r * nk;
            unsigned valid = pos0 + r + 1;
            float m = -INFINITY;
            for (unsigned j = 0; j < valid; j++)
                m = sr[j] > m ? sr[j] : m;
            double sum = 0;
            for (unsigned j = 0; j < valid; j++) {
                float e = expf(sr[j] - m);
                sr[j] = e;
                sum += e;
            }
            float inv = (float)(1.0 / sum);
            for (unsigned j = 0; j < valid; j++)
                sr[j] *= inv;
            for (unsigned j = valid; j < nk; j++)
                sr[j] = 0.0f;
        }
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, (int)rows, (int)hd, (int)nk, 1.0f, lm->s, (int)nk, V,
                    (int)hd, 0.0f, lm->att + h * hd, (int)QD);
    }
}

ra_status ra_lm_prefill(ra_lm *lm, const int *tokens, unsigned n, float *logits_last, float *logits_all,
                        ra_lm_qkv_fn fn, void *ctx)
{
    const ra_lm_config *c = &lm->cfg;
    if (n == 0 || n > lm->max_ctx - lm->pos)
        return RA_EINVAL;
    for (unsigned i = 0; i < n; i++)
        if (tokens[i] < 0 || (unsigned)tokens[i] >= c->vocab)
            return RA_EINVAL;
    unsigned QD = c->n_heads * c->head_dim;
    for (unsigned done = 0; done < n;) {
        unsigned rows = n - done < RA_LM_CHUNK ? n - done : RA_LM_CHUNK;
        unsigned pos0 = lm->pos + done;
        for (unsigned r = 0; r < rows; r++)
            memcpy(lm->x + (size_t)r * c->hidden, lm->embed + (size_t)tokens[done + r] * c->hidden,
                   c->hidden * sizeof(float));
        for (unsigned l = 0; l < c->n_layers; l++) {
            const lm_layer *L = &lm->layers[l];
            qkv_block(lm, L, l, pos0, rows);
            if (fn) {
                ra_status s = fn(ctx, l, pos0, rows, lm->q, lm->k, lm->v);
                if (s != RA_OK)
                    return s;
            }
            prefill_attention(lm, l, pos0, rows);
            linear(lm->att, L->wo, lm->xn, rows, QD, c->hidden);
            for (size_t i = 0; i < (size_t)rows * c->hidden; i++)
                lm->x[i] += lm->xn[i];
            mlp_block(lm, L, rows);
        }
        if (logits_all) {
            logits_of(lm, lm->x, rows, lm->g);
            memcpy(logits_all + (size_t)done * c->vocab, lm->g, (size_t)rows * c->vocab * sizeof(float));
        }
        if (logits_last && done + rows == n) {
            logits_of(lm, lm->x + (size_t)(rows - 1) * c->hidden, 1, lm->g);
            memcpy(logits_last, lm->g, c->vocab * sizeof(float));
        }
        done += rows;
    }
    lm->pos += n;
    return RA_OK;
}

void ra_lm_scores(ra_lm *lm, unsigned layer, unsigned kv_head, const float *q, unsigned a, unsigned b, float *s)
{
    unsigned hd = lm->cfg.head_dim;
    if (b <= a)
        return;
    const float *K = kcache(lm, lm->kc, layer, kv_head) + (size_t)a * hd;
    cblas_sgemv(CblasRowMajor, CblasNoTrans, (int)(b - a), (int)hd, lm->scale, K, (int)hd, q, 1, 0.0f, s, 1);
}

void ra_lm_attend_ranges(ra_lm *lm, unsigned layer, unsigned q_head, const float *q, const unsigned *r,
                         unsigned n_ranges, float *o, float *lse)
{
    unsigned hd = lm->cfg.head_dim, g = q_head / (lm->cfg.n_heads / lm->cfg.n_kv_heads);
    float *s = lm->dscore;
    unsigned tot = 0;
    for (unsigned i = 0; i < n_ranges; i++) {
        if (r[2 * i + 1] > r[2 * i]) {
            ra_lm_scores(lm, layer, g, q, r[2 * i], r[2 * i + 1], s + tot);
            tot += r[2 * i + 1] - r[2 * i];
        }
    }
    memset(o, 0, hd * sizeof(float));
    if (tot == 0) {
        *lse = -INFINITY;
        return;
    }
    float m = -INFINITY;
    for (unsigned j = 0; j < tot; j++)
        m = s[j] > m ? s[j] : m;
    double sum = 0;
    for (unsigned j = 0; j < tot; j++) {
        s[j] = expf(s[j] - m);
        sum += s[j];
    }
    float inv = (float)(1.0 / sum);
    const float *V = kcache(lm, lm->vc, layer, g);
    tot = 0;
    for (unsigned i = 0; i < n_ranges; i++) {
        unsigned a = r[2 * i], b = r[2 * i + 1];
        if (b <= a)
            continue;
        cblas_sgemv(CblasRowMajor, CblasTrans, (int)(b - a), (int)hd, inv, V + (size_t)a * hd, (int)hd, s + tot, 1,
                    1.0f, o, 1);
        tot += b - a;
    }
    *lse = m + (float)log(sum);
}

static ra_status full_attn(void *ctx, ra_lm *lm, unsigned layer, unsigned pos, const float *q, float *o)
{
    unsigned hd = lm->cfg.head_dim, r[2] = {0, pos + 1};
    float lse;
    for (unsigned h = 0; h < lm->cfg.n_heads; h++)
        ra_lm_attend_ranges(lm, layer, h, q + (size_t)h * hd, r, 1, o + (size_t)h * hd, &lse);
    return RA_OK;
}

ra_status ra_lm_decode(ra_lm *lm, int token, float *logits, ra_lm_attn_fn fn, void *ctx)
{
    const ra_lm_config *c = &lm->cfg;
    if (token < 0 || (unsigned)token >= c->vocab || lm->pos >= lm->max_ctx)
        return RA_EINVAL;
    if (!fn)
        fn = full_attn;
    unsigned pos = lm->pos, QD = c->n_heads * c->head_dim;
    memcpy(lm->x, lm->embed + (size_t)token * c->hidden, c->hidden * sizeof(float));
    for (unsigned l = 0; l < c->n_layers; l++) {
        const lm_layer *L = &lm->layers[l];
        qkv_block(lm, L, l, pos, 1);
        ra_status s = fn(ctx, lm, l, pos, lm->q, lm->att);
        if (s != RA_OK)
            return s;
        linear(lm->att, L->wo, lm->xn, 1, QD, c->hidden);
        for (unsigned i = 0; i < c->hidden; i++)
            lm->x[i] += lm->xn[i];
        mlp_block(lm, L, 1);
    }
    logits_of(lm, lm->x, 1, logits);
    lm->pos = pos + 1;
    return RA_OK;
}

double ra_lm_logprob(const float *logits, unsigned vocab, int target)
{
    double m = -INFINITY;
    for (unsigned i = 0; i < vocab; i++)
        m = logits[i] > m ? logits[i] : m;
    double sum = 0;
    for (unsigned i = 0; i < vocab; i++)
        sum += exp((double)logits[i] - m);
    return (double)logits[target] - m - log(sum);
}
