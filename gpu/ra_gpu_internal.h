/* Internals of gpu/: the cache object shared by the front end (gpu.c: argument checks,
 * bookkeeping of tokens and staging, which are the same for every backend) and the
 * backends behind one table of operations (cpu_backend.c always; cuda_backend.cu when
 * built with CUDA, else cuda_stub.c). A backend never checks caller arguments again and
 * never changes the bookkeeping: the front end advances it after a backend call returns
 * RA_OK, so a failed step leaves the cache as it was.
 *
 * Storage of one layer (both backends): [batch][n_kv_heads][sink + window][head_dim];
 * token p lives in row p if p < sink, else in row sink + (p - sink) % window. The rows
 * of live tokens are always [0, n_local). */
#ifndef RA_GPU_INTERNAL_H
#define RA_GPU_INTERNAL_H

#include <stddef.h>
#include <stdint.h>

#include "ratd/gpu.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct ra_gpu_layer {
    unsigned n_seen;        /* tokens per sequence so far */
    unsigned n_evicted;     /* tokens in the eviction stage */
    int evict_viewing;      /* a view is out: steps must wait for the release */
    unsigned n_offload;     /* middle tokens staged by ingest (0: none) */
    int offload_pending;    /* staged and not released */
    /* eviction stage, host side (pinned): [batch][n_kv_heads][evict_capacity][head_dim] as
     * the CPU backend writes it; compacted by fetch_evicted for a view */
    void *ev_k, *ev_v;
    int64_t *ev_pos;        /* [evict_capacity] */
    /* offload stage: [batch][n_kv_heads][n_offload][head_dim], grown on demand */
    void *off_k, *off_v;
    int64_t *off_pos;
    size_t off_cap;         /* tokens the buffers hold */
} ra_gpu_layer;

/* What one decode step does, worked out by the front end. */
typedef struct ra_gpu_step_plan {
    unsigned pos;     /* position of the new token */
    unsigned row;     /* its row */
    unsigned n_local; /* live rows after the append, the new one included */
    int evict;        /* the row held a window token that is staged first */
    unsigned ev_slot; /* its index in the eviction stage */
} ra_gpu_step_plan;

typedef struct ra_gpu_ops {
    const char *name;
    ra_status (*init)(ra_gpu_cache *c);
    void (*fini)(ra_gpu_cache *c);
    /* prefill: layer empty; writes sink/window rows and the offload stage (already sized) */
    ra_status (*ingest)(ra_gpu_cache *c, unsigned layer, ra_gpu_mem mem, const void *k,
                        const void *v, unsigned n_tokens, unsigned n_mid);
    ra_status (*step)(ra_gpu_cache *c, unsigned layer, const ra_gpu_step_plan *p, ra_gpu_mem mem,
                      const void *q, const void *k, const void *v, float *o, float *lse);
    ra_status (*merge)(ra_gpu_cache *c, ra_gpu_mem mem, const float *o_a, const float *lse_a,
                       const void *o_b, ra_dtype b_dtype, const float *lse_b, void *o_out,
                       ra_dtype out_dtype, float *lse_out);
    ra_status (*knn)(ra_gpu_cache *c, ra_gpu_mem mem, ra_dtype dtype, const void *q, size_t nq,
                     const void *keys, size_t nk, unsigned dim, unsigned top_k, int32_t *ids,
                     float *scores);
    ra_status (*wait_offload)(ra_gpu_cache *c, unsigned layer);
    /* fills the eviction stage's host buffers with the n staged tokens, compacted to
     * [batch][n_kv_heads][n][head_dim] (the view's layout) */
    ra_status (*fetch_evicted)(ra_gpu_cache *c, unsigned layer, unsigned n);
    ra_status (*sync)(ra_gpu_cache *c);
    ra_status (*set_stream)(ra_gpu_cache *c, void *stream);
    void *(*stream)(const ra_gpu_cache *c);
    /* checks a device pointer (RA_EINVAL if it is not device memory) */
    ra_status (*check_dev)(ra_gpu_cache *c, const void *p, const char *what);
    /* steps 1-4 of ra_gpu_graph_build (gpu.h): the pruned rows with reverse edges into
     * adj [n][p->degree] (host, -1 padded) and into occ [n] (host) how often each key is
     * in a query list, and (lists not NULL) the exact query->key lists [nq][p->knn] into
     * lists (host). p is resolved: no zero field, knn <= n, key_knn <= n - 1. The phase
     * times of st (not NULL) are filled. lane (0..RA_GPU_GRAPH_LANES-1) names the build
     * state it runs on: calls on different lanes may run at once on different threads. */
    ra_status (*graph_rows)(ra_gpu_cache *c, int lane, ra_gpu_mem mem, ra_dtype dtype,
                            const void *keys, size_t n, const void *q, size_t nq, unsigned dim,
                            const ra_gpu_graph_params *p, int32_t *adj, int32_t *occ,
                            int32_t *lists, ra_gpu_graph_stats *st);
    /* how many lanes graph_rows may use at once for heads that held `peak` bytes of
     * device memory at most (NULL: one) */
    int (*graph_lanes)(ra_gpu_cache *c, size_t peak);
} ra_gpu_ops;

/* independent build states of graph_rows */
#define RA_GPU_GRAPH_LANES 2

/* The constants of the graph build's candidate rule (gpu.h, ra_gpu_graph_build), the
 * values of index/graph_internal.h's G_WINDOW and G_PROJ_LISTS, so that both builds
 * take the same projection candidates. */
#define RA_GPU_GRAPH_WINDOW 32   /* ranks either side of a key in one query list */
#define RA_GPU_GRAPH_LISTS 32    /* query lists a key takes candidates from */
#define RA_GPU_GRAPH_REV_CAP 512 /* candidates of a row in the reverse-edge pass */
#define RA_GPU_GRAPH_MAX_DEGREE 255

/* The CPU backend's graph rows (cpu_graph.c), the reference of the CUDA ones. */
ra_status ra_gpu_cpu_graph_rows(ra_gpu_cache *c, int lane, ra_gpu_mem mem, ra_dtype dtype,
                                const void *keys, size_t n, const void *q, size_t nq, unsigned dim,
                                const ra_gpu_graph_params *p, int32_t *adj, int32_t *occ,
                                int32_t *lists, ra_gpu_graph_stats *st);

struct ra_gpu_cache {
    ra_gpu_config cfg;
    ra_gpu_backend backend;
    const ra_gpu_ops *ops;
    size_t esize;          /* bytes per element */
    size_t rows;           /* sink + window */
    unsigned group;        /* n_q_heads / n_kv_heads */
    ra_gpu_layer *layers;
    int broken;
    char err[512];
    void *impl;            /* the backend's own state */
    int inject;            /* tests: the next device call fails with this CUDA error (0: none) */
    /* ra_gpu_graph_build_heads: the most keys and queries of a head built and the most
     * device bytes a head held, for builds of the same kind (graph_peak_key: dim, dtype,
     * memory kind and the parameters that size device memory); a later head of that kind
     * and no more keys and queries needs no more */
    size_t graph_peak_n, graph_peak_nq, graph_peak;
    size_t graph_peak_key[7];
};

/* Records an error message in c (or in the calling thread's redirect buffer) and logs
 * device errors; returns s. */
ra_status ra_gpu_fail(ra_gpu_cache *c, ra_status s, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
/* Until called again with NULL, ra_gpu_fail on this thread writes its message into buf
 * [512] instead of the cache's: the heads that ra_gpu_graph_build_heads runs on threads
 * of their own keep their messages apart. */
void ra_gpu_err_redirect(char *buf);

extern const ra_gpu_ops ra_gpu_cpu_ops;
extern const ra_gpu_ops ra_gpu_cuda_ops;
/* CUDA backend helpers, stubbed when built without CUDA. */
int ra_gpu_cuda_probe(void);
void *ra_gpu_cuda_host_alloc(size_t bytes); /* NULL when no device (caller falls back) */
int ra_gpu_cuda_host_free(void *p);         /* 1 if it was CUDA host memory and is freed */

/* Test hook (tests/gpu only): makes the next CUDA call of this cache report `cuda_error`
 * (a cudaError_t value), as a failing driver would. */
void ra_gpu_cache_inject_fault(ra_gpu_cache *c, int cuda_error);

#ifdef __cplusplus
}
#endif
#endif
