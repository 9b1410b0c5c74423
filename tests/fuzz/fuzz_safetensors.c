/* Fuzz target: the safetensors reader of bench/lm (ra_lm_st_open: 8-byte header
 * length, JSON header through the bounded JSON reader, per-tensor dtype / shape /
 * byte-range checks). On success every tensor is converted to f32 in full, so a range
 * the checks let through that leaves the mapping shows up under ASan. */
#include <stdint.h>
#include <stdlib.h>

#include "fuzz_util.h"
#include "lm_st.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    char path[64], err[512];
    int fd = fuzz_memfile(data, size, path, sizeof path);
    if (fd < 0)
        return 0;
    ra_lm_st *st = NULL;
    if (ra_lm_st_open(path, &st, err, sizeof err) == RA_OK) {
        size_t n = ra_lm_st_count(st);
        for (size_t i = 0; i < n; i++) {
            const ra_lm_st_tensor *t = ra_lm_st_at(st, i);
            if (t->numel > (1u << 22)) /* the file is small: never true unless a check failed */
                abort();
            float *dst = malloc((size_t)(t->numel ? t->numel : 1) * sizeof *dst);
            if (dst && ra_lm_st_load_f32(st, t->name, t->rank, t->shape, dst, err, sizeof err) != RA_OK)
                abort(); /* its own shape must load */
            free(dst);
            if (ra_lm_st_find(st, t->name) == NULL)
                abort();
        }
        ra_lm_st_close(st);
    }
    close(fd);
    return 0;
}
