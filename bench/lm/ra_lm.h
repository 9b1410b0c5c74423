/* The reference decoder: a Llama-architecture causal LM (RMSNorm, RoPE in the HF
 * rotate_half layout, GQA attention, SwiGLU MLP, no biases) loaded from a Hugging Face
 * model directory (config.json + model.safetensors) and run on the CPU in fp32 with
 * OpenBLAS. It exists so that ratd can be judged on a real trained model: prefill
 * with full causal attention, then decode token by token with a KV cache, where the
 * attention of every decode step goes through a caller's hook (full, sink+window, or
 * ratd), so the modes share all other numerics.
 *
 * Ownership: ra_lm_load allocates the model, its fp32 weights and a KV cache for
 * max_ctx positions; ra_lm_free releases all of it. An ra_lm is used by one thread. */
#ifndef RA_LM_H
#define RA_LM_H

#include <stddef.h>
#include <stdint.h>

#include "ratd/status.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef enum ra_lm_rope_type { RA_LM_ROPE_DEFAULT = 0, RA_LM_ROPE_LINEAR = 1, RA_LM_ROPE_LLAMA3 = 2 } ra_lm_rope_type;

typedef struct ra_lm_config {
    unsigned vocab, hidden, n_layers, n_heads, n_kv_heads, head_dim, ffn, max_pos;
    float rms_eps;
    double rope_theta;
    ra_lm_rope_type rope_type;
    double rope_factor;                      /* linear, llama3 */
    double rope_low_freq, rope_high_freq;    /* llama3 */
    double rope_orig_max_pos;                /* llama3 */
    int tied;                                /* lm_head shares embed_tokens */
} ra_lm_config;

typedef struct ra_lm ra_lm;

/* Reads DIR/config.json (validated: every field bounded, hidden_act silu, no biases)
 * and DIR/model.safetensors (every expected tensor present with the shape the config
 * implies). max_ctx: KV cache positions, 1..max_position_embeddings (0 = all).
 * Errors name the file and the problem in err. */
ra_status ra_lm_load(const char *dir, unsigned max_ctx, ra_lm **out, char *err, size_t errlen);
void ra_lm_free(ra_lm *lm);

const ra_lm_config *ra_lm_get_config(const ra_lm *lm);
unsigned ra_lm_max_ctx(const ra_lm *lm);
/* Tokens in the KV cache. */
unsigned ra_lm_pos(const ra_lm *lm);
/* Forgets cache positions >= n (n <= pos): decoding restarts from the prefix. */
ra_status ra_lm_rewind(ra_lm *lm, unsigned n);

/* Applies RoPE for position `pos` in place to n_heads vectors of head_dim. */
void ra_lm_rope(const ra_lm *lm, float *x, unsigned n_heads, unsigned pos);

/* Called per layer and chunk during prefill with the post-RoPE q [rows][n_heads][hd]
 * and k, v [rows][n_kv_heads][hd] of positions pos0..pos0+rows-1. A non-OK return
 * stops the prefill with that status. */
typedef ra_status (*ra_lm_qkv_fn)(void *ctx, unsigned layer, unsigned pos0, unsigned rows, const float *q,
                                  const float *k, const float *v);

/* Runs tokens[0..n) from the current position (normally 0) with full causal
 * attention, filling the KV cache. logits_last[vocab] (may be NULL) gets the logits
 * after the last token; logits_all[n][vocab] (may be NULL) those after every token.
 * RA_EINVAL for a token outside the vocabulary or n past max_ctx. */
ra_status ra_lm_prefill(ra_lm *lm, const int *tokens, unsigned n, float *logits_last, float *logits_all,
                        ra_lm_qkv_fn fn, void *ctx);

/* The attention of one decode step of one layer. q: [n_heads][hd] post-RoPE, for the
 * token at position `pos`, whose k and v are already in the cache. Writes o
 * [n_heads][hd] (softmax-weighted V, before the output projection). */
typedef ra_status (*ra_lm_attn_fn)(void *ctx, ra_lm *lm, unsigned layer, unsigned pos, const float *q,
                                   float *o);

/* One decode step: token at position ra_lm_pos(); fn NULL means full attention.
 * logits[vocab] gets the next-token logits. */
ra_status ra_lm_decode(ra_lm *lm, int token, float *logits, ra_lm_attn_fn fn, void *ctx);

/* Exact partial attention of one query head over the cached positions in the
 * half-open ranges [r[2i], r[2i+1]) of a layer: o[hd] = softmax-weighted V,
 * *lse = log sum exp(scale q.k) (natural log; -INFINITY and o = 0 for an empty set). */
void ra_lm_attend_ranges(ra_lm *lm, unsigned layer, unsigned q_head, const float *q, const unsigned *r,
                         unsigned n_ranges, float *o, float *lse);

/* s[j] = scale * q.k of cached positions a..b-1 of KV head kv_head. */
void ra_lm_scores(ra_lm *lm, unsigned layer, unsigned kv_head, const float *q, unsigned a, unsigned b, float *s);

/* The cached K / V of one layer and KV head: [max_ctx][head_dim], rows < pos valid. */
const float *ra_lm_cache_k(const ra_lm *lm, unsigned layer, unsigned kv_head);
const float *ra_lm_cache_v(const ra_lm *lm, unsigned layer, unsigned kv_head);

/* Softmax scale, 1/sqrt(head_dim). */
float ra_lm_scale(const ra_lm *lm);

/* Natural-log probability of `target` under logits[vocab] (log-softmax, in double). */
double ra_lm_logprob(const float *logits, unsigned vocab, int target);

#ifdef __cplusplus
}
#endif
#endif
