/* ra_lm_gpu_load: the bridge from a model directory to gpu/'s device decoder. It reads
 * model.safetensors a second time (as fp32, exactly as lm.c does; the bf16 checkpoint
 * converts without loss), uploads one tensor at a time so the host holds at most one
 * weight matrix at once, and takes RoPE's cos/sin from the CPU decoder itself
 * (ra_lm_rope on a unit vector) so the angles are bit-identical on both paths. */
#include "ra_lm_gpu.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "lm_st.h"

static ra_status put(const ra_lm_st *st, const char *name, unsigned rows, unsigned cols, float **buf,
                     char *err, size_t errlen)
{
    uint64_t shape[2] = {rows, cols};
    *buf = malloc((size_t)rows * (cols ? cols : 1) * sizeof(float));
    if (!*buf) {
        snprintf(err, errlen, "out of memory loading '%s'", name);
        return RA_ENOMEM;
    }
    return ra_lm_st_load_f32(st, name, cols ? 2 : 1, shape, *buf, err, errlen);
}

ra_status ra_lm_gpu_load(const char *dir, const ra_lm *cpu, unsigned max_ctx, int device, ra_gpu_lm **out,
                         char *err, size_t errlen)
{
    const ra_lm_config *c = ra_lm_get_config(cpu);
    unsigned hd = c->head_dim, half = hd / 2, H = c->hidden, QD = c->n_heads * hd, KD = c->n_kv_heads * hd;
    ra_gpu_lm *g = NULL;
    ra_lm_st *st = NULL;
    float *cos_t = NULL, *sin_t = NULL, *unit = NULL;
    float *w[9] = {0}, *emb = NULL, *fnorm = NULL, *head = NULL;
    ra_status s;
    char path[4096];
    if (max_ctx == 0 || max_ctx > ra_lm_max_ctx(cpu)) {
        snprintf(err, errlen, "ra_lm_gpu_load: max_ctx %u outside 1..%u", max_ctx, ra_lm_max_ctx(cpu));
        return RA_EINVAL;
    }
    if (!ra_gpu_lm_available()) {
        snprintf(err, errlen, "no CUDA device (or this build has no CUDA backend)");
        return RA_ENOTSUP;
    }
    cos_t = malloc((size_t)max_ctx * half * sizeof(float));
    sin_t = malloc((size_t)max_ctx * half * sizeof(float));
    unit = malloc(hd * sizeof(float));
    if (!cos_t || !sin_t || !unit) {
        s = RA_ENOMEM;
        snprintf(err, errlen, "out of memory");
        goto fail;
    }
    for (unsigned p = 0; p < max_ctx; p++) {
        for (unsigned i = 0; i < hd; i++)
            unit[i] = i < half ? 1.0f : 0.0f;
        ra_lm_rope(cpu, unit, 1, p); /* (1, 0) rotates to (cos, sin) exactly */
        memcpy(cos_t + (size_t)p * half, unit, half * sizeof(float));
        memcpy(sin_t + (size_t)p * half, unit + half, half * sizeof(float));
    }
    ra_gpu_lm_config gc = {.vocab = c->vocab, .hidden = H, .n_layers = c->n_layers, .n_heads = c->n_heads,
                           .n_kv_heads = c->n_kv_heads, .head_dim = hd, .ffn = c->ffn, .max_ctx = max_ctx,
                           .rms_eps = c->rms_eps, .scale = ra_lm_scale(cpu), .device = device};
    if ((s = ra_gpu_lm_create(&gc, cos_t, sin_t, &g, err, errlen)) != RA_OK)
        goto fail;
    snprintf(path, sizeof path, "%s/model.safetensors", dir);
    if ((s = ra_lm_st_open(path, &st, err, errlen)) != RA_OK)
        goto fail;
    if ((s = put(st, "model.embed_tokens.weight", c->vocab, H, &emb, err, errlen)) != RA_OK ||
        (s = put(st, "model.norm.weight", H, 0, &fnorm, err, errlen)) != RA_OK)
        goto fail;
    if (!c->tied && (s = put(st, "lm_head.weight", c->vocab, H, &head, err, errlen)) != RA_OK)
        goto fail;
    if ((s = ra_gpu_lm_set_globals(g, emb, fnorm, c->tied ? emb : head)) != RA_OK) {
        snprintf(err, errlen, "%s", ra_gpu_lm_last_error(g));
        goto fail;
    }
    static const char *const names[9] = {"input_layernorm.weight", "self_attn.q_proj.weight",
                                         "self_attn.k_proj.weight", "self_attn.v_proj.weight",
                                         "self_attn.o_proj.weight", "post_attention_layernorm.weight",
                                         "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight"};
    unsigned rows[9] = {H, QD, KD, KD, H, H, c->ffn, c->ffn, H}, cols[9] = {0, H, H, H, QD, 0, H, H, c->ffn};
    for (unsigned l = 0; l < c->n_layers; l++) {
        for (unsigned i = 0; i < 9; i++) {
            char n[160];
            snprintf(n, sizeof n, "model.layers.%u.%s", l, names[i]);
            free(w[i]);
            w[i] = NULL;
            if ((s = put(st, n, rows[i], cols[i], &w[i], err, errlen)) != RA_OK)
                goto fail;
        }
        ra_gpu_lm_layer_weights lw = {.attn_norm = w[0], .wq = w[1], .wk = w[2], .wv = w[3], .wo = w[4],
                                      .mlp_norm = w[5], .w_gate = w[6], .w_up = w[7], .w_down = w[8]};
        if ((s = ra_gpu_lm_set_layer(g, l, &lw)) != RA_OK) {
            snprintf(err, errlen, "%s", ra_gpu_lm_last_error(g));
            goto fail;
        }
    }
    *out = g;
    g = NULL;
    s = RA_OK;
fail:
    for (unsigned i = 0; i < 9; i++)
        free(w[i]);
    free(emb);
    free(fnorm);
    free(head);
    free(cos_t);
    free(sin_t);
    free(unit);
    ra_lm_st_close(st);
    ra_gpu_lm_destroy(g);
    return s;
}
