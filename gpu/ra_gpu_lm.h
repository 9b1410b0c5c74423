/* The reference decoder's forward pass on a CUDA device: a Llama-architecture model
 * (RMSNorm, RoPE in the HF rotate_half layout, GQA attention, SwiGLU, no biases) with
 * fp32 weights in device memory (the bf16 checkpoint converts to fp32 without loss),
 * cuBLAS SGEMM for every projection (fp32, no TF32), and small kernels for the rest.
 * It lives in gpu/ because CUDA may only live here; it knows nothing of files or of
 * ratd: bench/lm loads the weights and hands them over, and drives ratd mode through
 * the decode hook with ra_gpu (include/ratd/gpu.h) on the same stream. This header has
 * no CUDA types. Without CUDA (or without a device) every call that needs the device
 * returns RA_ENOTSUP (lm_stub.c), so callers carry no #ifdef.
 *
 * Numerics follow bench/lm/lm.c operation for operation (fp32 activations, RMSNorm in
 * double, softmax scale head_dim^-0.5, RoPE cos/sin supplied by the caller as the CPU
 * decoder computes them) so that the two agree to fp32 rounding.
 *
 * Pointers named *_dev are device memory; every call enqueues on the model's stream
 * (ra_gpu_lm_stream) in order. Calls that return host results (prefill and decode
 * logits, ra_gpu_lm_copy without async) wait for that stream only. One thread at a time. */
#ifndef RA_GPU_LM_H
#define RA_GPU_LM_H

#include <stddef.h>
#include <stdint.h>

#include "ratd/status.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct ra_gpu_lm ra_gpu_lm;

typedef struct ra_gpu_lm_config {
    unsigned vocab, hidden, n_layers, n_heads, n_kv_heads, head_dim, ffn;
    unsigned max_ctx; /* KV cache positions */
    float rms_eps;
    float scale; /* softmax scale (1/sqrt(head_dim)) */
    int device;  /* CUDA ordinal */
} ra_gpu_lm_config;

/* One layer's weights, fp32 host arrays in torch Linear layout ([out][in] row-major). */
typedef struct ra_gpu_lm_layer_weights {
    const float *attn_norm, *wq, *wk, *wv, *wo, *mlp_norm, *w_gate, *w_up, *w_down;
} ra_gpu_lm_layer_weights;

/* 1 when built with CUDA and a device is visible. */
int ra_gpu_lm_available(void);

/* Allocates weights, the fp32 KV cache [layer][kv_head][max_ctx][head_dim] and the
 * workspaces on the device. rope_cos/rope_sin: [max_ctx][head_dim/2] host tables.
 * Errors go to err (CUDA message included): RA_EINVAL, RA_ENOTSUP (no CUDA), RA_EDEVICE,
 * RA_ENOMEM. */
ra_status ra_gpu_lm_create(const ra_gpu_lm_config *cfg, const float *rope_cos, const float *rope_sin,
                           ra_gpu_lm **out, char *err, size_t errlen);
void ra_gpu_lm_destroy(ra_gpu_lm *lm);
/* Uploads the embedding [vocab][hidden], final norm [hidden] and lm_head [vocab][hidden]. */
ra_status ra_gpu_lm_set_globals(ra_gpu_lm *lm, const float *embed, const float *final_norm,
                                const float *lm_head);
ra_status ra_gpu_lm_set_layer(ra_gpu_lm *lm, unsigned layer, const ra_gpu_lm_layer_weights *w);

const char *ra_gpu_lm_last_error(const ra_gpu_lm *lm);
/* The cudaStream_t everything is enqueued on (hand it to ra_gpu_cache_set_stream). */
void *ra_gpu_lm_stream(const ra_gpu_lm *lm);
unsigned ra_gpu_lm_pos(const ra_gpu_lm *lm);
ra_status ra_gpu_lm_rewind(ra_gpu_lm *lm, unsigned n);

/* Per prefill chunk and layer: post-RoPE q [rows][n_heads][hd], k, v [rows][n_kv][hd]
 * on the device, positions pos0.. (copy what is needed with ra_gpu_lm_copy). */
typedef ra_status (*ra_gpu_lm_qkv_fn)(void *ctx, ra_gpu_lm *lm, unsigned layer, unsigned pos0, unsigned rows,
                                      const float *q_dev, const float *k_dev, const float *v_dev);
/* Full causal attention over tokens[0..n) from the current position; logits_last
 * (host, [vocab], may be NULL) gets the logits after the last token. */
ra_status ra_gpu_lm_prefill(ra_gpu_lm *lm, const int *tokens, unsigned n, float *logits_last,
                            ra_gpu_lm_qkv_fn fn, void *ctx);

/* Decode attention of one layer: q_dev [n_heads][hd] post-RoPE for position pos (its k,
 * v already in the cache); writes o_dev [n_heads][hd] (enqueued on the stream). */
typedef ra_status (*ra_gpu_lm_attn_fn)(void *ctx, ra_gpu_lm *lm, unsigned layer, unsigned pos, const float *q_dev,
                                       float *o_dev);
/* One decode step at ra_gpu_lm_pos(); fn NULL: full attention. logits host [vocab]. */
ra_status ra_gpu_lm_decode(ra_gpu_lm *lm, int token, float *logits, ra_gpu_lm_attn_fn fn, void *ctx);

/* Exact attention of every query head over cached positions in the half-open ranges
 * [r[2i], r[2i+1]) of a layer: o_dev [n_heads][hd]; lse_dev [n_heads] (may be NULL;
 * -INFINITY and o = 0 for an empty set). */
ra_status ra_gpu_lm_attend_ranges(ra_gpu_lm *lm, unsigned layer, const float *q_dev, const unsigned *r,
                                  unsigned n_ranges, float *o_dev, float *lse_dev);
/* s_dev[j] = scale * q.k of cached positions a..b-1 of KV head kv_head. */
ra_status ra_gpu_lm_scores(ra_gpu_lm *lm, unsigned layer, unsigned kv_head, const float *q_dev, unsigned a,
                           unsigned b, float *s_dev);
/* Cached K and V of positions p0..p0+n-1 of a layer, as a projection writes them:
 * [n][n_kv_heads][hd] in dtype (F32, F16 or BF16; round to nearest even). */
ra_status ra_gpu_lm_kv_export(ra_gpu_lm *lm, unsigned layer, unsigned p0, unsigned n, ra_dtype dtype,
                              void *k_dev, void *v_dev);
/* dst_dev[i] = src_dev[i] converted to dtype, i < n. */
ra_status ra_gpu_lm_convert(ra_gpu_lm *lm, const float *src_dev, ra_dtype dtype, void *dst_dev, size_t n);

/* Device memory for hooks (NULL on failure); freed with ra_gpu_lm_free. */
void *ra_gpu_lm_alloc(ra_gpu_lm *lm, size_t bytes);
void ra_gpu_lm_free(ra_gpu_lm *lm, void *p);
/* Copies bytes between any two of host and device memory on the stream; waits unless
 * async (then a host side must be pinned memory, ra_gpu_host_alloc, and stay valid). */
ra_status ra_gpu_lm_copy(ra_gpu_lm *lm, void *dst, const void *src, size_t bytes, int async);
ra_status ra_gpu_lm_sync(ra_gpu_lm *lm);

#ifdef __cplusplus
}
#endif
#endif
