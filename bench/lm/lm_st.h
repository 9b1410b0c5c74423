/* safetensors files: an 8-byte little-endian header length, a JSON header mapping
 * tensor names to {dtype, shape, data_offsets}, then the raw data. The reader maps the
 * file and validates every field against the file before anything is used: header
 * length vs file size, dtypes, ranks, element counts vs byte ranges, ranges inside the
 * data area and not overlapping, every name once (a duplicate is ambiguous). Internal
 * to bench/lm. */
#ifndef RA_LM_ST_H
#define RA_LM_ST_H

#include <stddef.h>
#include <stdint.h>

#include "ratd/status.h"

#define RA_LM_ST_MAX_HEADER (64u << 20) /* 64 MiB of JSON is far beyond any real model's */
#define RA_LM_ST_MAX_RANK 8

typedef enum ra_lm_st_dtype { RA_LM_ST_F32, RA_LM_ST_F16, RA_LM_ST_BF16 } ra_lm_st_dtype;

typedef struct ra_lm_st_tensor {
    char *name;
    ra_lm_st_dtype dtype;
    unsigned rank;
    uint64_t shape[RA_LM_ST_MAX_RANK];
    uint64_t numel;
    const uint8_t *data; /* inside the mapping; valid until ra_lm_st_close */
    uint64_t nbytes;
} ra_lm_st_tensor;

typedef struct ra_lm_st ra_lm_st;

/* Maps and validates `path`. Errors name the file and the problem in err:
 * RA_EIO (cannot open/map), RA_EPROTO (malformed header, bad ranges), RA_ENOTSUP
 * (a dtype other than F32/F16/BF16), RA_ETOOBIG, RA_ENOMEM. */
ra_status ra_lm_st_open(const char *path, ra_lm_st **out, char *err, size_t errlen);
void ra_lm_st_close(ra_lm_st *st);

size_t ra_lm_st_count(const ra_lm_st *st);
const ra_lm_st_tensor *ra_lm_st_at(const ra_lm_st *st, size_t i);
/* The tensor called `name`, or NULL. */
const ra_lm_st_tensor *ra_lm_st_find(const ra_lm_st *st, const char *name);

/* Copies tensor `name` converted to f32 into dst[numel], after checking that it exists
 * and its shape is exactly shape[0..rank). Errors (RA_EPROTO/RA_ESHAPE) name the file,
 * the tensor, and the expected and found shapes. */
ra_status ra_lm_st_load_f32(const ra_lm_st *st, const char *name, unsigned rank, const uint64_t *shape,
                            float *dst, char *err, size_t errlen);

#endif
