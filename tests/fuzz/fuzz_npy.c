/* Fuzz target: the .npy reader of bench/index (ra_npy_read_f32: magic, version 1/2/3
 * header length, the dict parsed by hand, size against the shape). On success the
 * whole array is read back, so a shape the checks let through that exceeds the data
 * shows up under ASan. The header parser is also fed the raw input directly. */
#include <stdint.h>
#include <stdlib.h>

#include "fuzz_util.h"
#include "npy.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    int f16;
    size_t rows, cols;
    (void)ra_npy_parse_header((const char *)data, size, &f16, &rows, &cols);
    char path[64], err[512];
    int fd = fuzz_memfile(data, size, path, sizeof path);
    if (fd < 0)
        return 0;
    float *x = NULL;
    if (ra_npy_read_f32(path, &x, &rows, &cols, err, sizeof err) == RA_OK) {
        if (rows == 0 || cols == 0 || rows * cols * 2 > size)
            abort(); /* the data must be in the file */
        fuzz_touch(x, rows * cols * sizeof *x);
        free(x);
    }
    close(fd);
    return 0;
}
