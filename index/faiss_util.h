/* Internal to index/: small helpers shared by the FAISS-backed backends (flat.c,
 * faiss_ivf.c, faiss_hnsw.c). FAISS headers stay inside index/ .c files. */
#ifndef RA_FAISS_UTIL_H
#define RA_FAISS_UTIL_H

#include <stddef.h>

#include "ra_index.h"
#include "ra_kv.h"
#include "ratd/status.h"

/* Logs "<what>: <faiss_get_last_error()>" at once (the text dies with the next FAISS
 * call) and returns the status to report: RA_ENOMEM for bad_alloc, else RA_EINTERNAL. */
ra_status ra_index_faiss_error(const char *what, int rc);

/* Rows [first, first + n) of kv converted to fp32 into dst[n][dim]. */
void ra_index_rows_f32(const ra_kv *kv, size_t first, size_t n, float *dst);

/* Adds rows [first, first + n) of kv to a FAISS index (FaissIndex *), converting to fp32
 * in chunks so the temporary stays small. opts: NULL, or a build's options, whose
 * cancel flag is checked between chunks (RA_ECLOSED). */
ra_status ra_index_faiss_add_rows(void *faiss_index, const ra_kv *kv, size_t first, size_t n,
                                  const ra_index_opts *opts);

/* Runs fn(arg) with this thread's OpenMP team size forced to 1: FAISS opens a parallel
 * region even for one query, which on a daemon worker only oversubscribes the cores. */
void ra_index_omp_single(void (*fn)(void *), void *arg);

#endif
