/* ra_gpu_lm without CUDA (the "interface plus stub" pattern of gpu/): the same symbols,
 * so bench/lm and the tests link either way; creating a model answers RA_ENOTSUP and
 * nothing else can be reached without one. */
#include <stdio.h>

#include "ra_gpu_lm.h"

int ra_gpu_lm_available(void)
{
    return 0;
}

ra_status ra_gpu_lm_create(const ra_gpu_lm_config *cfg, const float *rope_cos, const float *rope_sin,
                           ra_gpu_lm **out, char *err, size_t errlen)
{
    (void)cfg, (void)rope_cos, (void)rope_sin, (void)out;
    if (err && errlen)
        snprintf(err, errlen, "ra_gpu_lm: this build has no CUDA backend");
    return RA_ENOTSUP;
}

void ra_gpu_lm_destroy(ra_gpu_lm *lm)
{
    (void)lm;
}

ra_status ra_gpu_lm_set_globals(ra_gpu_lm *lm, const float *embed, const float *final_norm, const float *lm_head)
{
    (void)lm, (void)embed, (void)final_norm, (void)lm_head;
    return RA_ENOTSUP;
}

ra_status ra_gpu_lm_set_layer(ra_gpu_lm *lm, unsigned layer, const ra_gpu_lm_layer_weights *w)
{
    (void)lm, (void)layer, (void)w;
    return RA_ENOTSUP;
}

const char *ra_gpu_lm_last_error(const ra_gpu_lm *lm)
{
    (void)lm;
    return "this build has no CUDA backend";
}

void *ra_gpu_lm_stream(const ra_gpu_lm *lm)
{
    (void)lm;
    return NULL;
}

unsigned ra_gpu_lm_pos(const ra_gpu_lm *lm)
{
    (void)lm;
    return 0;
}

ra_status ra_gpu_lm_rewind(ra_gpu_lm *lm, unsigned n)
{
    (void)lm, (void)n;
    return RA_ENOTSUP;
}

ra_status ra_gpu_lm_prefill(ra_gpu_lm *lm, const int *tokens, unsigned n, float *logits_last, ra_gpu_lm_qkv_fn fn,
                            void *ctx)
{
    (void)lm, (void)tokens, (void)n, (void)logits_last, (void)fn, (void)ctx;
    return RA_ENOTSUP;
}

ra_status ra_gpu_lm_decode(ra_gpu_lm *lm, int token, float *logits, ra_gpu_lm_attn_fn fn, void *ctx)
{
    (void)lm, (void)token, (void)logits, (void)fn, (void)ctx;
    return RA_ENOTSUP;
}

ra_status ra_gpu_lm_attend_ranges(ra_gpu_lm *lm, unsigned layer, const float *q_dev, const unsigned *r,
                                  unsigned n_ranges, float *o_dev, float *lse_dev)
{
    (void)lm, (void)layer, (void)q_dev, (void)r, (void)n_ranges, (void)o_dev, (void)lse_dev;
    return RA_ENOTSUP;
}

ra_status ra_gpu_lm_scores(ra_gpu_lm *lm, unsigned layer, unsigned kv_head, const float *q_dev, unsigned a,
                           unsigned b, float *s_dev)
{
    (void)lm, (void)layer, (void)kv_head, (void)q_dev, (void)a, (void)b, (void)s_dev;
    return RA_ENOTSUP;
}

ra_status ra_gpu_lm_kv_export(ra_gpu_lm *lm, unsigned layer, unsigned p0, unsigned n, ra_dtype dtype, void *k_dev,
                              void *v_dev)
{
    (void)lm, (void)layer, (void)p0, (void)n, (void)dtype, (void)k_dev, (void)v_dev;
    return RA_ENOTSUP;
}

ra_status ra_gpu_lm_convert(ra_gpu_lm *lm, const float *src_dev, ra_dtype dtype, void *dst_dev, size_t n)
{
    (void)lm, (void)src_dev, (void)dtype, (void)dst_dev, (void)n;
    return RA_ENOTSUP;
}

void *ra_gpu_lm_alloc(ra_gpu_lm *lm, size_t bytes)
{
    (void)lm, (void)bytes;
    return NULL;
}

void ra_gpu_lm_free(ra_gpu_lm *lm, void *p)
{
    (void)lm, (void)p;
}

ra_status ra_gpu_lm_copy(ra_gpu_lm *lm, void *dst, const void *src, size_t bytes, int async)
{
    (void)lm, (void)dst, (void)src, (void)bytes, (void)async;
    return RA_ENOTSUP;
}

ra_status ra_gpu_lm_sync(ra_gpu_lm *lm)
{
    (void)lm;
    return RA_ENOTSUP;
}
