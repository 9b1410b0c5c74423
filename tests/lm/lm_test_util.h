/* Helpers shared by the tests of bench/lm: a tiny synthetic Llama model written as a
 * real Hugging Face directory (config.json + model.safetensors), so the loader and the
 * forward pass can be checked against a naive reference, and corrupted on purpose.
 * Header-only; each test binary includes it once. */
#ifndef LM_TEST_UTIL_H
#define LM_TEST_UTIL_H

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "ra_half.h"

/* tiny model shape */
#define TV 16  /* vocab */
#define TH 8   /* hidden */
#define TL 2   /* layers */
#define TNH 2  /* query heads */
#define TNKV 1 /* kv heads */
#define THD 8  /* head dim */
#define TF 12  /* ffn */
#define TMAXPOS 64

typedef struct tiny_tensor {
    char name[96];
    const char *dtype; /* "BF16", "F32", "I64", ... */
    unsigned rank;
    uint64_t shape[2];
    float *vals; /* numel values (bf16-exact) */
} tiny_tensor;

typedef struct tiny_model {
    tiny_tensor t[4 + 9 * TL];
    unsigned n;
} tiny_model;

static uint64_t tiny_rng = 88172645463325252ull;
static inline float tiny_rand(void)
{
    tiny_rng ^= tiny_rng << 13;
    tiny_rng ^= tiny_rng >> 7;
    tiny_rng ^= tiny_rng << 17;
    return (float)((tiny_rng >> 11) * (1.0 / 9007199254740992.0)) * 2.0f - 1.0f;
}

static inline void tiny_add(tiny_model *m, const char *name, unsigned r0, unsigned r1, float scale, float bias)
{
    tiny_tensor *t = &m->t[m->n++];
    snprintf(t->name, sizeof t->name, "%s", name);
    t->dtype = "BF16";
    t->rank = r1 ? 2 : 1;
    t->shape[0] = r0;
    t->shape[1] = r1;
    size_t n = (size_t)r0 * (r1 ? r1 : 1);
    t->vals = malloc(n * sizeof(float));
    for (size_t i = 0; i < n; i++)
        t->vals[i] = ra_bf16_to_f32(ra_f32_to_bf16(bias + scale * tiny_rand()));
}

static inline void tiny_build(tiny_model *m)
{
    memset(m, 0, sizeof *m);
    tiny_rng = 88172645463325252ull;
    char n[96];
    tiny_add(m, "model.embed_tokens.weight", TV, TH, 1.0f, 0);
    for (unsigned l = 0; l < TL; l++) {
#define A(s, r0, r1, sc, b)                                                                                      \
    snprintf(n, sizeof n, "model.layers.%u.%s", l, s);                                                          \
    tiny_add(m, n, r0, r1, sc, b)
        A("input_layernorm.weight", TH, 0, 0.2f, 1.0f);
        A("self_attn.q_proj.weight", TNH * THD, TH, 0.8f, 0);
        A("self_attn.k_proj.weight", TNKV * THD, TH, 0.8f, 0);
        A("self_attn.v_proj.weight", TNKV * THD, TH, 0.5f, 0);
        A("self_attn.o_proj.weight", TH, TNH * THD, 0.4f, 0);
        A("post_attention_layernorm.weight", TH, 0, 0.2f, 1.0f);
        A("mlp.gate_proj.weight", TF, TH, 0.5f, 0);
        A("mlp.up_proj.weight", TF, TH, 0.5f, 0);
        A("mlp.down_proj.weight", TH, TF, 0.4f, 0);
#undef A
    }
    tiny_add(m, "model.norm.weight", TH, 0, 0.2f, 1.0f);
    tiny_add(m, "lm_head.weight", TV, TH, 1.0f, 0);
}

static inline void tiny_free(tiny_model *m)
{
    for (unsigned i = 0; i < m->n; i++)
        free(m->t[i].vals);
}

static inline const float *tiny_get(const tiny_model *m, const char *name)
{
    for (unsigned i = 0; i < m->n; i++)
        if (strcmp(m->t[i].name, name) == 0)
            return m->t[i].vals;
    return NULL;
}

static const char *tiny_config_json =
    "{\"architectures\":[\"LlamaForCausalLM\"],\"model_type\":\"llama\",\"vocab_size\":16,\"hidden_size\":8,"
    "\"num_hidden_layers\":2,\"num_attention_heads\":2,\"num_key_value_heads\":1,\"head_dim\":8,"
    "\"intermediate_size\":12,\"max_position_embeddings\":64,\"rms_norm_eps\":1e-05,\"hidden_act\":\"silu\","
    "\"attention_bias\":false,\"mlp_bias\":false,\"tie_word_embeddings\":false,"
    "\"rope_parameters\":{\"rope_theta\":10000.0,\"rope_type\":\"default\"}}";

static inline int write_file(const char *path, const void *data, size_t n)
{
    FILE *f = fopen(path, "wb");
    if (!f)
        return -1;
    size_t w = fwrite(data, 1, n, f);
    fclose(f);
    return w == n ? 0 : -1;
}

/* Writes m as safetensors to path. `hdr_extra` is appended inside the JSON object
 * (e.g. ",\"x\":{...}"); `claim_extra` is added to the written header length (a lie
 * when nonzero); `truncate` bytes are cut from the end. */
static inline int tiny_write_st(const tiny_model *m, const char *path, const char *hdr_extra, long claim_extra,
                         size_t truncate)
{
    char *hdr = malloc(1 << 16);
    size_t hl = 0, off = 0;
    hl += (size_t)sprintf(hdr + hl, "{\"__metadata__\":{\"format\":\"pt\"}");
    for (unsigned i = 0; i < m->n; i++) {
        const tiny_tensor *t = &m->t[i];
        size_t numel = (size_t)t->shape[0] * (t->rank == 2 ? t->shape[1] : 1);
        size_t esz = strcmp(t->dtype, "F32") == 0 ? 4 : strcmp(t->dtype, "I64") == 0 ? 8 : 2;
        if (t->rank == 2)
            hl += (size_t)sprintf(hdr + hl, ",\"%s\":{\"dtype\":\"%s\",\"shape\":[%llu,%llu],\"data_offsets\":[%zu,%zu]}",
                                  t->name, t->dtype, (unsigned long long)t->shape[0],
                                  (unsigned long long)t->shape[1], off, off + numel * esz);
        else
            hl += (size_t)sprintf(hdr + hl, ",\"%s\":{\"dtype\":\"%s\",\"shape\":[%llu],\"data_offsets\":[%zu,%zu]}",
                                  t->name, t->dtype, (unsigned long long)t->shape[0], off, off + numel * esz);
        off += numel * esz;
    }
    hl += (size_t)sprintf(hdr + hl, "%s}", hdr_extra ? hdr_extra : "");
    size_t total = 8 + hl + off;
    uint8_t *buf = calloc(1, total);
    uint64_t claimed = (uint64_t)((long)hl + claim_extra);
    for (int i = 0; i < 8; i++)
        buf[i] = (uint8_t)(claimed >> (8 * i));
    memcpy(buf + 8, hdr, hl);
    size_t p = 8 + hl;
    for (unsigned i = 0; i < m->n; i++) {
        const tiny_tensor *t = &m->t[i];
        size_t numel = (size_t)t->shape[0] * (t->rank == 2 ? t->shape[1] : 1);
        for (size_t j = 0; j < numel; j++) {
            if (strcmp(t->dtype, "F32") == 0) {
                memcpy(buf + p, &t->vals[j], 4);
                p += 4;
            } else if (strcmp(t->dtype, "I64") == 0) {
                int64_t v = (int64_t)t->vals[j];
                memcpy(buf + p, &v, 8);
                p += 8;
            } else {
                uint16_t h = ra_f32_to_bf16(t->vals[j]);
                memcpy(buf + p, &h, 2);
                p += 2;
            }
        }
    }
    int rc = write_file(path, buf, total - (truncate < total ? truncate : total));
    free(buf);
    free(hdr);
    return rc;
}

/* A model directory DIR with config.json (text `cfg`, or the tiny config) and the
 * tiny weights. */
static inline int tiny_write_dir(const tiny_model *m, const char *dir, const char *cfg)
{
    char p[512];
    char cmd[600];
    snprintf(cmd, sizeof cmd, "mkdir -p '%s'", dir);
    if (system(cmd) != 0)
        return -1;
    snprintf(p, sizeof p, "%s/config.json", dir);
    const char *c = cfg ? cfg : tiny_config_json;
    if (write_file(p, c, strlen(c)) != 0)
        return -1;
    snprintf(p, sizeof p, "%s/model.safetensors", dir);
    return tiny_write_st(m, p, NULL, 0, 0);
}

#endif
