/* ratd's device side: the sink+window KV cache of a decoder, partial decode attention
 * over it, the exact log-sum-exp merge with ratd's answer, and the staging of the tokens
 * that go to ratd (the middle of the prefill for Offload, the tokens leaving the window
 * for Append). Two backends share this API: CUDA (when built with it and a device is
 * present) and a CPU reference that always exists and defines the numerics (fp32
 * accumulation). This header includes no CUDA header and is usable from C and C++.
 *
 * Model of one cache. `batch` sequences advance in lockstep; each layer keeps, per
 * sequence and KV head, the first `sink` tokens and a ring of the last `window` tokens.
 * Token positions count from 0 per sequence. New tokens fill the sink first, then the
 * window; once the window is full, every new token evicts the oldest window token,
 * which is staged for Append. Every token is on exactly one side (here or in ratd).
 *
 * Layouts (row-major, elements of the cache's dtype unless said otherwise):
 *   prefill K, V      [batch][n_tokens][n_kv_heads][head_dim]   (as a projection writes them)
 *   step q            [batch][n_q_heads][head_dim]
 *   step k, v         [batch][n_kv_heads][head_dim]
 *   o (partial)       [batch][n_q_heads][head_dim]  float32
 *   lse               [batch][n_q_heads]            float32, natural log; -INFINITY = empty set
 *   staged K, V       per (sequence, KV head) `n_tokens` contiguous rows of head_dim (see
 *                     ra_gpu_staged for the strides); positions int64, one per token
 * GQA: query head h uses KV head h / (n_q_heads / n_kv_heads).
 * Scores are s = scale * q.k (scale defaults to 1/sqrt(head_dim), as ratd's).
 *
 * Memory kinds. Every call that takes tensors names where they live:
 *   RA_GPU_MEM_HOST    ordinary host memory; the call copies in and out and returns when
 *                      its outputs are written (CUDA: it waits on the cache's stream only).
 *   RA_GPU_MEM_DEVICE  CUDA device memory (CUDA backend only; the CPU backend answers
 *                      RA_ENOTSUP). The call enqueues its work on the cache's stream and
 *                      returns at once; outputs are ready when that stream reaches them
 *                      (ra_gpu_cache_stream, ra_gpu_cache_sync). No call on the decode path
 *                      waits for the whole device.
 * Pointers must be 16-byte aligned; device pointers are checked to be device memory
 * (unless cfg.skip_pointer_check) so that a host pointer gives RA_EINVAL, not a crash.
 *
 * Errors: every fallible call returns ra_status and writes out-parameters only on
 * success. A failing CUDA call gives RA_EDEVICE with the CUDA message in
 * ra_gpu_cache_last_error(). If the failure happened before the step changed anything
 * the cache stays usable; if device state may be inconsistent (an asynchronous fault,
 * a sticky CUDA error) the cache is marked broken and every later call on it returns
 * RA_ESTATE: destroy it. A cache is not thread-safe: one thread at a time. */
#ifndef RATD_GPU_H
#define RATD_GPU_H

#include <stddef.h>
#include <stdint.h>

#include "ratd/status.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct ra_gpu_cache ra_gpu_cache;

typedef enum ra_gpu_backend {
    RA_GPU_BACKEND_AUTO = 0, /* CUDA when built with it and a device is present, else CPU */
    RA_GPU_BACKEND_CPU = 1,
    RA_GPU_BACKEND_CUDA = 2 /* RA_ENOTSUP if not built with CUDA, RA_EDEVICE if no device */
} ra_gpu_backend;

typedef enum ra_gpu_mem {
    RA_GPU_MEM_HOST = 0,
    RA_GPU_MEM_DEVICE = 1
} ra_gpu_mem;

typedef struct ra_gpu_config {
    unsigned n_layers;
    unsigned n_q_heads;  /* a multiple of n_kv_heads (CUDA: at most 8 per KV head) */
    unsigned n_kv_heads;
    unsigned head_dim;   /* CUDA: 64 or 128; CPU: 1..1024 */
    ra_dtype dtype;      /* F16 or BF16; F32 on the CPU backend only */
    unsigned sink;       /* may be 0 */
    unsigned window;     /* >= 1 */
    unsigned batch;      /* sequences, >= 1 */
    ra_gpu_backend backend;
    int device;               /* CUDA device ordinal (CUDA backend) */
    unsigned evict_capacity;  /* staged evicted tokens per layer before Append must drain
                                 them (ra_gpu_cache_evicted_release); 0 = 64 */
    float scale;              /* softmax scale; 0 = 1/sqrt(head_dim) */
    int skip_pointer_check;   /* nonzero: trust device pointers (saves a driver call each) */
} ra_gpu_config;

/* Fills *cfg with defaults (backend AUTO, device 0, evict_capacity 64, scale 1/sqrt(d)),
 * shapes zero: the caller sets them. */
void ra_gpu_config_init(ra_gpu_config *cfg);

/* 1 when this build has the CUDA backend and a CUDA device is visible, else 0. */
int ra_gpu_cuda_available(void);

/* Creates a cache; allocates all device memory up front (sink + window per layer,
 * sequence and KV head, workspaces, eviction staging in pinned host memory).
 * RA_EINVAL for bad shapes, RA_ENOTSUP for a dtype/head_dim the backend lacks,
 * RA_ENOMEM / RA_EDEVICE when memory or the device fails. */
ra_status ra_gpu_cache_create(const ra_gpu_config *cfg, ra_gpu_cache **out);
/* Frees everything, including staged buffers; waits for the cache's pending work. NULL ok. */
void ra_gpu_cache_destroy(ra_gpu_cache *c);

/* The backend actually in use (never AUTO). */
ra_gpu_backend ra_gpu_cache_backend(const ra_gpu_cache *c);
const ra_gpu_config *ra_gpu_cache_config(const ra_gpu_cache *c);
/* Text of the last error on this cache ("" if none); valid until the next call on it. */
const char *ra_gpu_cache_last_error(const ra_gpu_cache *c);
/* 1 when a device fault left the cache unusable. */
int ra_gpu_cache_broken(const ra_gpu_cache *c);

/* Page-locked host memory for RA_GPU_MEM_HOST tensors: the CUDA backend copies from and
 * to it directly (DMA) instead of through its own bounce buffers. Plain malloc memory on
 * the CPU backend (or without a device). Free with ra_gpu_host_free; NULL on failure. */
void *ra_gpu_host_alloc(size_t bytes);
void ra_gpu_host_free(void *p);

/* The CUDA stream (a cudaStream_t) the cache works on; NULL on the CPU backend.
 * set_stream makes the cache enqueue on the caller's stream instead (NULL: back to its
 * own); call it between steps, never with work of the cache in flight elsewhere. */
void *ra_gpu_cache_stream(const ra_gpu_cache *c);
ra_status ra_gpu_cache_set_stream(ra_gpu_cache *c, void *cuda_stream);
/* Waits until all work enqueued by the cache is done (its stream only). */
ra_status ra_gpu_cache_sync(ra_gpu_cache *c);

/* Forgets every token of every layer (a new batch of sequences). Staged data is dropped. */
ra_status ra_gpu_cache_reset(ra_gpu_cache *c);

/* Tokens seen so far per sequence on a layer, and how many of them are held locally
 * (sink + window part). */
ra_status ra_gpu_cache_tokens(const ra_gpu_cache *c, unsigned layer, unsigned *n_seen,
                              unsigned *n_local);

/* One layer's K and V after the decoder's own prefill of n_tokens per sequence (layout
 * above). The layer must be empty (RA_ESTATE otherwise; ra_gpu_cache_reset first).
 * Keeps tokens [0, min(sink, n)) in the sink and the last min(window, n - sink) in the
 * window; stages the middle [sink, n - window) in pinned host memory for Offload
 * (ra_gpu_cache_offload_view). With MEM_DEVICE the copies are asynchronous.
 * RA_EBUSY if the layer's previous offload stage was not released. */
ra_status ra_gpu_ingest_prefill(ra_gpu_cache *c, unsigned layer, ra_gpu_mem mem, const void *k,
                                const void *v, unsigned n_tokens);

/* A view of staged tokens in host memory, ready to hand to libratd-client: the block of
 * sequence b, k + b * seq_stride elements, is [n_kv_heads][n_tokens][head_dim] contiguous
 * (head_stride == n_tokens * head_dim), the layout of ra_kv_batch; same for v. Positions:
 * pos[b * pos_stride + i] (pos_stride is 0: sequences advance in lockstep). */
typedef struct ra_gpu_staged {
    unsigned n_tokens; /* per sequence (the same for all) */
    unsigned batch, n_kv_heads, head_dim;
    ra_dtype dtype;
    const void *k;
    const void *v;
    const int64_t *pos;
    size_t seq_stride;  /* elements */
    size_t head_stride; /* elements */
    size_t pos_stride;  /* int64 entries */
} ra_gpu_staged;

/* The middle tokens staged by ingest_prefill of `layer` (n_tokens 0 if none). Waits for
 * the staging copies of that layer only. Valid until ra_gpu_cache_offload_release. */
ra_status ra_gpu_cache_offload_view(ra_gpu_cache *c, unsigned layer, ra_gpu_staged *out);
/* Marks the offload stage of a layer consumed; its pinned buffer is kept for reuse
 * until ra_gpu_cache_trim. */
ra_status ra_gpu_cache_offload_release(ra_gpu_cache *c, unsigned layer);
/* Frees pinned buffers of released offload stages. */
void ra_gpu_cache_trim(ra_gpu_cache *c);

/* One decode step of one layer: appends the new k, v (position n_seen) to the cache,
 * then computes for every query head the partial attention over all local tokens (sink
 * + window, the new token included): o, lse (layout above). If the window was full the
 * oldest window token is staged for Append first; RA_EBUSY (nothing changed) if the
 * eviction stage already holds evict_capacity tokens. */
ra_status ra_gpu_attend_local(ra_gpu_cache *c, unsigned layer, ra_gpu_mem mem, const void *q,
                              const void *k_new, const void *v_new, float *o, float *lse);

/* Tokens evicted from a layer's window since the last release, oldest first (positions
 * increasing). Waits for that layer's last step only. Valid until the release; between
 * the two, attend_local on that layer returns RA_EBUSY (hand the view to Append, then
 * release). */
ra_status ra_gpu_cache_evicted_view(ra_gpu_cache *c, unsigned layer, ra_gpu_staged *out);
ra_status ra_gpu_cache_evicted_release(ra_gpu_cache *c, unsigned layer);

/* Exact merge of two partial attentions over disjoint token sets, per (sequence, query
 * head) row: m = max(lse_a, lse_b), o = (e^(lse_a-m) o_a + e^(lse_b-m) o_b) /
 * (e^(lse_a-m) + e^(lse_b-m)), lse = m + log(e^(lse_a-m) + e^(lse_b-m)). An empty side
 * (lse -INFINITY) contributes nothing; both empty gives o = 0, lse = -INFINITY.
 * o_local/lse_local are attend_local's outputs; o_remote (fp32, fp16 or bf16, `remote_dtype`)
 * and lse_remote (fp32) are ratd's reply; o_out is written in out_dtype (F32, or the
 * cache's dtype); lse_out may be NULL. o_out may alias o_local when out_dtype is F32.
 * Shapes: batch * n_q_heads rows of head_dim. */
ra_status ra_gpu_merge(ra_gpu_cache *c, ra_gpu_mem mem, const float *o_local,
                       const float *lse_local, const void *o_remote, ra_dtype remote_dtype,
                       const float *lse_remote, void *o_out, ra_dtype out_dtype, float *lse_out);

/* Exact inner-product k-nearest neighbours for index builds: for each of nq queries
 * ([nq][dim]) the top_k keys ([nk][dim], both in `dtype`) by q.k (no scale), written to
 * ids [nq][top_k] (int32 row of the key) and scores [nq][top_k] (float32), best first.
 * Equal to the CPU backend up to ties and fp32 rounding. top_k <= min(nk, 1024).
 * CUDA: cuBLAS GEMM (fp32 accumulation) + a top-k selection kernel; with MEM_HOST the
 * inputs are copied to the device first. Synchronous. Uses the cache's backend and stream. */
ra_status ra_gpu_knn(ra_gpu_cache *c, ra_gpu_mem mem, ra_dtype dtype, const void *queries,
                     size_t nq, const void *keys, size_t nk, unsigned dim, unsigned top_k,
                     int32_t *ids, float *scores);


/* ---- index graph construction (issue 12) --------------------------------------------
 * The attention-aware graph of one KV head built where its keys and prefill queries
 * already are, in the adjacency form ratd installs (the Offload GRAPH_ADJ frame,
 * index/ra_index.h ra_graph_adj): adj [n_keys][degree] int32, each row's neighbours
 * best first and then -1 padding, no self edge, no id twice in a row, and every key
 * reachable from the entry points. The steps, the same on both backends (the CPU
 * backend is the reference; the CUDA one agrees up to fp32 rounding of near ties):
 *   1. exact query->key top-knn of every training query (ties by lower id);
 *   2. exact key->key top-key_knn of every key (itself excluded), by inner product;
 *   3. per key u, candidates: the keys within +-32 ranks of u in the first 32 query
 *      lists u occurs in (and each list's best key), the 4*degree most frequent (ties
 *      by lower id), together with u's key->key neighbours; sorted by u.c (desc, ties
 *      by id) and pruned by occlusion (c is dropped when a kept r has r.c > u.c), at
 *      most `degree`, refilled to degree/2 with the best dropped ones (ratd's rule);
 *   4. reverse edges: every u->v adds u to v's candidates (row first, then sources in
 *      id order, at most 512); a row over `degree` is pruned again by the same rule;
 *   5. entry points: the ceil(n_entries/2) keys most often in a query list, then
 *      evenly spaced keys (offset by the seed), as ratd's own build;
 *   6. connectivity: a BFS from the entries; an unreached key is hung under its best
 *      reached neighbour with a free slot (else the first reached key with one).
 * CUDA: steps 1-4 on the device, on a stream of the build's own (not the cache's
 * decode stream, and a second one for the top-k of a score tile while the next tile's
 * GEMM runs), score tiles of at most tile_bytes, stream-ordered allocations, waits on
 * those streams only; 5-6 are O(n degree) passes on the host. Memory on the device:
 * keys + queries (if MEM_HOST) + two score tiles + O(n (key_knn + 2 degree)) ints. */
typedef struct ra_gpu_graph_params {
    unsigned knn;       /* K: query->key list length (0: 100, ratd's graph_knn); <= 1024
                           (CUDA: <= 128, its candidate multiset is in shared memory) */
    unsigned degree;    /* M: out-degree bound (0: 48, ratd's graph_degree); 2..255
                           (CUDA: 4 degree + key_knn <= 2048) */
    unsigned key_knn;   /* key->key neighbours per key (0: 64); <= 1023 */
    unsigned n_entries; /* entry points wanted (0: 16, ratd's graph_entries); <= 1024 */
    size_t tile_bytes;  /* CUDA: bound of each of the two fp32 score tiles (0: 512 rows
                           of n_keys scores, within 256 MiB..2 GiB: 2 GiB from 1M keys) */
    uint64_t seed;      /* offsets the evenly spaced entry points (ratd: the index seed) */
} ra_gpu_graph_params;

/* Seconds per step (wall, of the calling thread; CUDA steps by events on its stream, and
 * knn_s includes the uploads of MEM_HOST tensors, copy_s the adjacency's download). */
typedef struct ra_gpu_graph_stats {
    double knn_s, key_knn_s, project_s, reverse_s, copy_s, connect_s, total_s;
    size_t forced_edges;  /* edges the connectivity pass added */
    size_t device_bytes;  /* device memory the build held at most (CUDA; 0 on the CPU) */
} ra_gpu_graph_stats;

/* Zeroes *p: every field at its default. */
void ra_gpu_graph_params_init(ra_gpu_graph_params *p);

/* Builds the graph of one head: keys [n_keys][dim] and queries [n_queries][dim] (both in
 * `dtype`, where `mem` says; n_queries may be 0: a key->key graph) into the caller's
 * host arrays adj [n_keys][M] (M = p->degree or its default) and entries [n_entries
 * wanted]; *n_entries_out = min(wanted, n_keys). p and stats may be NULL. Synchronous
 * (CUDA: the host waits on the build's stream only; the decode stream keeps running).
 * RA_EINVAL / RA_ESHAPE for bad arguments, RA_ENOMEM when host or device memory runs
 * out (CUDA: "out of memory" in ra_gpu_cache_last_error, nothing written), RA_EDEVICE
 * for any other CUDA failure (a sticky one marks the cache broken). On any failure adj
 * and entries are not a graph: fall back to the CPU build. */
ra_status ra_gpu_graph_build(ra_gpu_cache *c, ra_gpu_mem mem, ra_dtype dtype, const void *keys,
                             size_t n_keys, const void *queries, size_t n_queries, unsigned dim,
                             const ra_gpu_graph_params *p, int32_t *adj, int32_t *entries,
                             unsigned *n_entries_out, ra_gpu_graph_stats *stats);

/* One head of ra_gpu_graph_build_heads: its inputs, as ra_gpu_graph_build takes them,
 * and its outputs. */
typedef struct ra_gpu_graph_head {
    const void *keys;         /* [n_keys][dim] */
    size_t n_keys;
    const void *queries;      /* [n_queries][dim], or NULL with n_queries 0 */
    size_t n_queries;
    int32_t *adj;             /* out: [n_keys][M], the caller's */
    int32_t *entries;         /* out: [n_entries wanted], the caller's */
    int32_t *lists;           /* out, optional (NULL: not wanted), host memory: step 1's exact
                                 query->key lists [n_queries][min(knn, n_keys)], best first:
                                 what an Offload's train_knn takes, so that ratd needs no
                                 scan of its own */
    unsigned n_entries;       /* out: entries written */
    ra_gpu_graph_stats stats; /* out */
} ra_gpu_graph_head;

/* The graphs of several heads (a layer's KV heads), each exactly as ra_gpu_graph_build
 * builds it. Each head runs on a thread of its own: its device steps, then its host
 * steps (entries and connectivity, ~15-25 ms of a 131K-key head). On CUDA two heads'
 * device steps run at once where the device's free memory holds twice a head's peak (the
 * first head of the first call runs alone to measure it; RA_GPU_GRAPH_LANES=1 keeps one),
 * and up to 3 heads' host steps (RA_GPU_GRAPH_HOST_THREADS, 1-4) run beside them; the
 * caller's thread waits. No head starts once one has failed; returns the earliest failed
 * head's status, as ra_gpu_graph_build would, with the head's index in the message
 * (ra_gpu_cache_last_error); *n_done (may be NULL): the heads before it, whose outputs
 * are complete. One head: on the caller's thread, as ra_gpu_graph_build. */
ra_status ra_gpu_graph_build_heads(ra_gpu_cache *c, ra_gpu_mem mem, ra_dtype dtype,
                                   unsigned dim, const ra_gpu_graph_params *p,
                                   ra_gpu_graph_head *heads, size_t n_heads, size_t *n_done);

#ifdef __cplusplus
}
#endif
#endif
