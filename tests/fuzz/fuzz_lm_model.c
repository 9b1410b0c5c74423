/* Fuzz target: loading a model directory with the reference decoder's reader
 * (ra_lm_load: config.json validated field by field, then model.safetensors checked
 * against the shapes the config implies, then the weights and a small KV cache
 * allocated). Input layout: config.json, one NUL byte, model.safetensors; both are
 * written into a private directory. The context is capped at 16 positions so that the
 * KV cache stays small; everything else the loader allocates must be bounded by the
 * file it read, which -rss_limit_mb / -malloc_limit_mb check. */
#include <stdint.h>
#include <string.h>

#include "fuzz_util.h"
#include "ra_lm.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    const uint8_t *nul = memchr(data, 0, size);
    size_t cl = nul ? (size_t)(nul - data) : size;
    const uint8_t *st = nul ? nul + 1 : data + size;
    size_t sl = (size_t)(data + size - st);
    if (fuzz_write_file(fuzz_dir_file(0, "config.json"), data, cl) != 0 ||
        fuzz_write_file(fuzz_dir_file(1, "model.safetensors"), st, sl) != 0)
        return 0;
    ra_lm *lm = NULL;
    char err[512];
    unsigned ctx = 16;
    if (ra_lm_load(fuzz_dir(), ctx, &lm, err, sizeof err) == RA_OK) {
        const ra_lm_config *c = ra_lm_get_config(lm);
        if (ra_lm_max_ctx(lm) > ctx || c->n_heads % c->n_kv_heads || c->head_dim % 2)
            abort();
        ra_lm_free(lm);
    } else if (!err[0]) {
        abort(); /* every refusal says why */
    }
    return 0;
}
