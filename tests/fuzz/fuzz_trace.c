/* Fuzz target: the trace reader of bench/lm (ra_trace_open: magic, version, dtype,
 * bounds, exact file size; then ra_trace_read by computed offset). On success the first
 * and last rows of every (tensor, layer, head) are read, and a few out-of-range reads
 * must be refused. */
#include <stdint.h>
#include <stdlib.h>

#include "fuzz_util.h"
#include "ra_trace.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    char path[64], err[512];
    int fd = fuzz_memfile(data, size, path, sizeof path);
    if (fd < 0)
        return 0;
    ra_trace *t = NULL;
    if (ra_trace_open(path, &t, err, sizeof err) == RA_OK) {
        const ra_trace_info *in = ra_trace_get_info(t);
        if (ra_trace_file_size(in) != size)
            abort();
        float *row = malloc((size_t)in->head_dim * 2 * sizeof *row);
        for (int w = 0; row && w < 3; w++) {
            uint32_t heads = w == RA_TRACE_Q ? in->n_heads : in->n_kv_heads;
            for (uint32_t l = 0; l < in->n_layers; l++)
                for (uint32_t h = 0; h < heads; h++) {
                    if (ra_trace_read(t, (ra_trace_tensor)w, l, h, 0, 1, row) != RA_OK ||
                        ra_trace_read(t, (ra_trace_tensor)w, l, h, in->n_pos - 1, 1, row) != RA_OK)
                        abort();
                }
            if (ra_trace_read(t, (ra_trace_tensor)w, in->n_layers, 0, 0, 1, row) == RA_OK ||
                ra_trace_read(t, (ra_trace_tensor)w, 0, heads, 0, 1, row) == RA_OK ||
                ra_trace_read(t, (ra_trace_tensor)w, 0, 0, in->n_pos, 1, row) == RA_OK ||
                ra_trace_read(t, (ra_trace_tensor)w, 0, 0, in->n_pos - 1, 2, row) == RA_OK)
                abort(); /* out of range must be refused */
        }
        free(row);
        ra_trace_close(t);
    }
    close(fd);
    return 0;
}
