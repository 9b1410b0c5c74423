/* A reader for 2-D NumPy .npy files of fp32 or fp16 (little-endian, C order), the
 * format people already keep their vectors in; ratd-bench-index --keys/--queries use
 * it. Everything in the header is checked against the file size before anything is
 * allocated, so a truncated or hostile file is an error, never a crash.
 * ra_npy_write_f32 writes the same format (fp32), for exporting a benchmark's data.
 * Ownership: ra_npy_read_f32 allocates *data (fp32, rows * cols); the caller frees it. */
#ifndef RA_NPY_H
#define RA_NPY_H

#include <stddef.h>

#include "ratd/status.h"

/* Reads PATH into *data as fp32 [*rows][*cols]. RA_EIO (open/read), RA_EPROTO (not a
 * supported .npy: bad magic, not 2-D, not <f4/<f2, Fortran order, size mismatch),
 * RA_ENOMEM. err (may be NULL) receives a message naming the file. */
ra_status ra_npy_read_f32(const char *path, float **data, size_t *rows, size_t *cols, char *err,
                          size_t errlen);

/* Writes data [rows][cols] (fp32) to PATH as a version 1.0 '<f4' .npy file, through
 * PATH.tmp renamed into place, so a failed write leaves no file. RA_EIO, RA_EINVAL
 * (rows or cols 0). err (may be NULL) receives a message naming the file. */
ra_status ra_npy_write_f32(const char *path, const float *data, size_t rows, size_t cols, char *err,
                           size_t errlen);

/* Parses a header dict (the text after the length field); exposed for tests. */
ra_status ra_npy_parse_header(const char *hdr, size_t len, int *is_f16, size_t *rows, size_t *cols);

#endif
