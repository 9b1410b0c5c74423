/* Puts the reference decoder on the GPU: reads the same model directory as ra_lm_load
 * (the CPU decoder, already loaded, gives the validated config and the RoPE table, so
 * both decoders share one definition of the angles) and uploads the weights into a
 * gpu/ ra_gpu_lm. Kept apart from lm.c so the CPU decoder stays as it is. */
#ifndef RA_LM_GPU_H
#define RA_LM_GPU_H

#include "ra_gpu_lm.h"
#include "ra_lm.h"

/* max_ctx: KV positions on the device (<= ra_lm_max_ctx(cpu)). RA_ENOTSUP without CUDA,
 * errors of the file or the device in err. */
ra_status ra_lm_gpu_load(const char *dir, const ra_lm *cpu, unsigned max_ctx, int device, ra_gpu_lm **out,
                         char *err, size_t errlen);

#endif
