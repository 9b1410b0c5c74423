/* The per-head retrieval interface the daemon uses: ra_head owns one (layer, KV head)'s
 * K/V store and its search index, and answers "partial attention of this query over
 * the top-k keys". Index kinds are backends behind one table (ra_backend.h): exact
 * scan (FAISS IndexFlatIP), IVF-Flat and HNSW through the FAISS C API, and the
 * attention-aware graph. A build runs in a background thread; until it is done,
 * searches are answered by an exact scan, never refused. Keys appended after the
 * build are inserted into the index and searchable at once.
 *
 * Thread-safety: every ra_head_* call may be made from any thread; searches run
 * concurrently with each other, appends and the end of a build are exclusive. */
#ifndef RA_INDEX_H
#define RA_INDEX_H

#include <stddef.h>
#include <stdint.h>

#include "ra_kv.h"
#include "ratd/status.h"

typedef enum ra_index_kind {
    RA_INDEX_GRAPH = 0,      /* attention-aware graph (default) */
    RA_INDEX_FLAT = 1,       /* exact: SIMD scan of the stored keys, no copy */
    RA_INDEX_IVF = 2,        /* FAISS IVF-Flat */
    RA_INDEX_HNSW = 3,       /* FAISS HNSW32,Flat */
    RA_INDEX_FAISS_FLAT = 4, /* exact through FAISS IndexFlatIP (fp32 copy): a benchmark
                                baseline; RA_INDEX_FLAT is the same answer without a copy */
    RA_INDEX_PSCAN = 5       /* projected-code scan: every key as a 4-bit code of 64
                                query-fitted directions, the best rescored exactly (pscan.c) */
} ra_index_kind;

const char *ra_index_kind_name(ra_index_kind k);

/* Index options; zero fields take the defaults (ra_index_opts_default). Bounds and
 * defaults come from one table (index/opts.c, ra_index_opt_table) that the daemon,
 * ra_head and the backends all read. */
typedef struct ra_index_opts {
    ra_index_kind kind;
    int graph_knn;      /* K: exact top-K keys per training query */
    int graph_degree;   /* M: max out-degree */
    int graph_build_ef; /* candidate list when inserting keys */
    int graph_entries;  /* entry points */
    int n_train;        /* max training queries used (sampled) */
    int ivf_nlist;      /* IVF lists (0: ~4*sqrt(n)) */
    int hnsw_m;         /* HNSW M */
    int threads;        /* build threads (0: all) */
    uint64_t seed;
    /* Set by ra_head for the backends' build calls (a caller's value is ignored): its
     * own flag, read atomically; nonzero asks a running build to end early with
     * RA_ECLOSED (ra_head_cancel, ra_head_destroy). NULL: never cancelled. */
    const int *cancel;
} ra_index_opts;

/* One row per int option: a set value must lie in [min, max]; 0 always means "the
 * default", which is `def` (0 where the backend chooses at build time: `zero` says how). */
typedef struct ra_index_opt_def {
    const char *name; /* the field's name, as on the wire (IndexOptions) */
    size_t offset;    /* of an int-sized field of ra_index_opts */
    int min, max;
    int def;
    const char *zero; /* what 0 means, for messages: "48", "every core" */
    const char *help;
} ra_index_opt_def;

const ra_index_opt_def *ra_index_opt_table(int *n);
/* Every field at its default (seed 1, cancel NULL). */
void ra_index_opts_default(ra_index_opts *o);
/* Zero fields -> defaults (seed 0 -> 1); other fields are left as they are. */
void ra_index_opts_fill(ra_index_opts *o);
/* RA_EINVAL when a field is outside its row's bounds (negative included); err (may be
 * NULL) names the option, its value and its range. */
ra_status ra_index_opts_check(const ra_index_opts *o, char *err, size_t errlen);

/* Search-time knobs: `effort` is the backend's own dial (graph: candidate list size,
 * IVF: nprobe, HNSW: efSearch; 0 = default). `warm`/`n_warm`: previous step's row ids
 * for this query head (may be NULL), used as extra entry points by the graph. */
typedef struct ra_search_params {
    int k;
    int effort;
    const int32_t *warm;
    int n_warm;
} ra_search_params;

typedef struct ra_search_stats {
    uint64_t scanned;   /* distinct keys whose inner product (or code score) was computed,
                           by the walk this query took part in: a group walk shares its
                           keys among `shared` queries, so its cost per query is
                           scanned / shared */
    uint64_t hops;      /* graph nodes expanded (0 for others), of the whole walk */
    uint64_t rescored;  /* candidates rescored exactly on the stored keys, this query */
    int shared;         /* queries of the walk (1 for a single search) */
    int exact_fallback; /* 1 when answered by exact scan because the index was not built */
} ra_search_stats;

typedef struct ra_head ra_head;

/* opts (may be NULL: defaults) are checked with ra_index_opts_check (RA_EINVAL). */
ra_status ra_head_create(ra_head **out, int dim, ra_dtype dtype, const ra_index_opts *opts,
                         ra_mem *acct);
/* Cancels a running or waiting build (ra_head_cancel), waits for it to end, then frees
 * everything. */
void ra_head_destroy(ra_head *h);
/* Asks a running build, or one waiting for its turn, to end early; returns at once.
 * The head keeps answering (by exact scan, or the previous index); later builds of a
 * cancelled head end at once with RA_ECLOSED. For owners that free heads off the
 * serving thread: cancel every head first, then destroy them one by one. */
void ra_head_cancel(ra_head *h);
/* Gives the threads that exist now, other than the caller, the priority of index
 * builds (nice 19, SCHED_BATCH). Call first thing in main(), before starting threads:
 * the ones already there are library pools made at load time -- OpenBLAS's pthread
 * server, which FAISS's BLAS calls of index builds run on. Build threads lower
 * themselves, and OpenMP teams and the graph's helper threads, created by a build
 * thread, inherit that. Returns the number of threads changed. */
int ra_index_build_priority_setup(void);

/* Appends n tokens: k, v are [n][dim] of the head's dtype; pos n positions. Validated
 * (finite, sizes) before anything changes. If an index is built, inserts them. */
ra_status ra_head_append(ra_head *h, const void *k, const void *v, const int64_t *pos, size_t n);
/* For an owner that stores the same n tokens on several heads and must not fail on some
 * of them only: what making room for n more tokens costs on the head's account now
 * (ra_kv_grow_cost: *cap 0 when none is needed), then the growth itself with bytes the
 * owner reserved beforehand (ra_kv_grow: *left is the unused part, the owner releases
 * it). After a successful reserve, ra_head_append of n tokens needs no K/V memory. */
void ra_head_grow_cost(ra_head *h, size_t n, int exact, size_t *cap, size_t *bytes);
ra_status ra_head_reserve(ra_head *h, size_t cap, size_t prepaid, size_t *left);

/* Starts building the index over the keys present now, from nq training queries
 * (fp32 [nq][dim], copied). background=1 returns at once; 0 waits. A second call while
 * a build runs returns RA_EBUSY. Keys appended during the build are inserted at its end. */
ra_status ra_head_build(ra_head *h, const float *train_q, size_t nq, int background);
/* ra_head_build with precomputed exact top-K lists of the training queries: lists
 * [nq][K] (copied) hold row ids of this head, in [0, count) or -1 for padding, best
 * first — e.g. computed on the GPU during prefill (ra_gpu_knn). A backend that can use
 * them (the graph) skips its own kNN; others ignore them. Ids out of range: RA_EINVAL. */
#define RA_HEAD_MAX_LIST_K 4096
ra_status ra_head_build_lists(ra_head *h, const float *train_q, size_t nq, const int32_t *lists,
                              int K, int background);
/* A name for the head's log lines (e.g. "session 3 layer 2 kv-head 1"), copied; at most
 * 63 characters are kept. Set it before the first build. */
void ra_head_set_label(ra_head *h, const char *label);
/* Index builds of every head of the process: waiting for a build slot, running, and
 * ended since the start (built, failed or cancelled). Safe from any thread. */
typedef struct ra_index_build_counts {
    uint64_t queued, running, done, failed, cancelled;
    double seconds; /* total build time of the builds done */
} ra_index_build_counts;
void ra_index_build_counts_get(ra_index_build_counts *out);
/* Process-wide recall probes of default-effort searches (head.c): probes run, and the
 * times they raised / lowered a head's default effort. */
void ra_index_probe_counts_get(uint64_t *probes, uint64_t *raises, uint64_t *lowers);
/* The factor of the head's default search effort (the build's calibration, then the
 * recall probes): mult > 0 sets it (clamped to 0.5..8). Returns the factor in use, 0
 * when the head has no index with a default effort (none built, or not a graph). */
float ra_head_effort_mult(ra_head *h, float mult);
/* ---- graphs built elsewhere, and graphs handed out ----------------------------------
 * The wire form of a graph over n keys (rows 0..n-1 of a head): an adjacency of n rows
 * of M int32 slots, each a row id in [0, n) or -1 (padding, anywhere in the row), and
 * the entry points a search starts from. It is the format of the Offload frames
 * GRAPH_ADJ / GRAPH_ENTRIES (proto/ratd.proto), of ra_head_graph_export and of a
 * builder outside the daemon (ra_gpu_graph_build). */
#define RA_GRAPH_MAX_DEGREE 255  /* M: one degree byte per node */
#define RA_GRAPH_MAX_ENTRIES 1024 /* as the option graph_entries */

typedef struct ra_graph_adj {
    size_t n;         /* rows */
    int M;            /* slots per row, 1..RA_GRAPH_MAX_DEGREE */
    int32_t *adj;     /* [n][M] */
    int n_entries;    /* 1..RA_GRAPH_MAX_ENTRIES */
    int32_t *entries; /* [n_entries] distinct row ids */
} ra_graph_adj;

/* What is wrong with an adjacency (ra_graph_adj_check), in the order it is checked. */
typedef enum ra_graph_fault_kind {
    RA_GRAPH_FAULT_NONE = 0,
    RA_GRAPH_FAULT_SHAPE,        /* n, M or n_entries out of bounds, NULL arrays */
    RA_GRAPH_FAULT_ENTRY,        /* entries[slot] out of range or repeated */
    RA_GRAPH_FAULT_RANGE,        /* adj[row][slot] outside -1..n-1 */
    RA_GRAPH_FAULT_SELF,         /* adj[row][slot] == row */
    RA_GRAPH_FAULT_DUPLICATE,    /* adj[row][slot] repeats an earlier slot of the row */
    RA_GRAPH_FAULT_UNREACHABLE   /* key `row` is not reachable from the entries */
} ra_graph_fault_kind;

typedef struct ra_graph_fault {
    ra_graph_fault_kind kind;
    size_t row;    /* RANGE, SELF, DUPLICATE, UNREACHABLE */
    int slot;      /* ENTRY, RANGE, SELF, DUPLICATE (-1 otherwise) */
    int64_t value; /* the offending id (or the bad size, SHAPE) */
} ra_graph_fault;

/* Checks a graph for installation: sizes, every id in range, no self edge, no id twice
 * in a row, entries in range and distinct, every key reachable from the entries (BFS).
 * RA_OK, or RA_EINVAL with the first fault (f may be NULL; err, if not NULL, gets a
 * sentence naming row, slot and value), RA_ENOMEM for the BFS's scratch (n/8 bytes and
 * 4n bytes). O(n M). Reads nothing outside the arrays the sizes declare. */
ra_status ra_graph_adj_check(const ra_graph_adj *a, ra_graph_fault *f, char *err, size_t errlen);
/* Frees what ra_head_graph_export allocated and zeroes *a. */
void ra_graph_adj_fini(ra_graph_adj *a);

/* Installs a graph built elsewhere over every row of the head (its row count must be
 * a->n; RA_EINVAL otherwise, and for a graph that fails ra_graph_adj_check) instead of
 * building one: the head computes the search codes, norms and routing (from nq training
 * queries fp32 [nq][dim] and, if lists is not NULL, their exact top-K lists as in
 * ra_head_build_lists; else the routing queries' own exact top keys) in the layout the
 * graph search walks, and charges it like a built graph. Arrays are copied. Graph heads
 * only (RA_ENOTSUP for other kinds). background as in ra_head_build; an install does
 * not wait for the gate of the CPU builds (it costs one pass over the keys). */
ra_status ra_head_install_graph(ra_head *h, const ra_graph_adj *a, const float *train_q,
                                size_t nq, const int32_t *lists, int K, int background);
/* The graph index in use, in the wire form (n = the keys it links, rows appended since
 * included): adj and entries are malloc()ed, freed by ra_graph_adj_fini. RA_ESTATE when
 * no graph index is built (not a graph head, or still building). */
ra_status ra_head_graph_export(ra_head *h, ra_graph_adj *out);

/* 1 when the index is built and in use. */
int ra_head_ready(ra_head *h);
/* 1 while a build runs. */
int ra_head_building(ra_head *h);
/* Waits until no build is running. */
void ra_head_wait(ra_head *h);

/* Top-k rows by inner product q.k (fp32 q[dim]); writes up to k ids (row ids) and raw
 * scores, best first; *n_out = min(k, count) or fewer if the index returns fewer. */
ra_status ra_head_search(ra_head *h, const float *q, const ra_search_params *p, int32_t *ids,
                         float *scores, int *n_out, ra_search_stats *st);

/* Search + partial attention: o[dim], lse (scale = 1/sqrt(dim) if scale <= 0).
 * ids/scores (each of k entries, may be NULL) receive the retrieved row ids and raw
 * scores; positions of ids through ra_head_positions(). n == 0 gives o = 0, lse = -INF. */
ra_status ra_head_attend(ra_head *h, const float *q, const ra_search_params *p, float scale,
                         float *o, float *lse, int32_t *ids, float *scores, int *n_out,
                         ra_search_stats *st);

/* GQA: the nq query heads that share this KV head, in one call under one lock. The index
 * is walked once for the whole group where the backend can (one visited set; each key
 * reached is scored against every query of the group, each query keeps its own top-k),
 * and the exact path (RA_INDEX_FLAT, or while a build runs) reads the keys once for all.
 * q, o: [nq][dim]; lse [nq]; p: nq parameter sets, each with its own k (0: that query
 * reads nothing: o = 0, lse = -INF, n_out 0) and warm ids; ids/scores [nq][kmax] with
 * kmax the largest p[j].k, or NULL; n_out [nq] or NULL; st [nq] or NULL.
 * 1 <= nq <= RA_HEAD_MAX_GROUP. flags: RA_HEAD_Q_CHECKED when the caller has already
 * checked that q is finite (the daemon checks each input once). */
#define RA_HEAD_MAX_GROUP 256
#define RA_HEAD_Q_CHECKED 1u
ra_status ra_head_attend_group(ra_head *h, size_t nq, const float *q, const ra_search_params *p,
                               float scale, unsigned flags, float *o, float *lse, int32_t *ids,
                               float *scores, int *n_out, ra_search_stats *st);

/* ra_head_attend_group cut over the keys instead of the queries, for an index that reads
 * every key (the projected-code scan): `nparts` calls, each with its own `part` (any
 * threads, any order), scan disjoint shares of the keys for all nq queries; the call that
 * completes the set merges the shares' exact top-k and computes the attention, writes o,
 * lse, ids, scores, n_out as ra_head_attend_group would, sets *finished = 1 and returns the
 * first error of any part; the others set *finished = 0 and return RA_OK. The merge
 * context is the caller's: ra_head_part_bytes(nparts, nq, kmax) bytes at `ctx`, zeroed by
 * ra_head_part_init before the first call of a set (and again before the next set).
 * Heads whose index cannot be cut (other kinds, a build still running) answer the whole
 * group in the call of part 0; the other parts then read nothing. The caller must keep
 * the head's rows from changing between the first and the last call (the daemon orders
 * an Append after the Attend that precedes it). p[j].warm is ignored. */
#define RA_HEAD_MAX_PARTS 64
int ra_head_partable(ra_head *h);
size_t ra_head_part_bytes(int nparts, size_t nq, int kmax);
void ra_head_part_init(void *ctx, int nparts, size_t nq, int kmax);
ra_status ra_head_attend_part(ra_head *h, void *ctx, int part, size_t nq, const float *q,
                              const ra_search_params *p, float scale, unsigned flags, float *o,
                              float *lse, int32_t *ids, float *scores, int *n_out, int *finished);

size_t ra_head_count(ra_head *h);
/* Copies the positions of n row ids (caller sized). */
void ra_head_positions(ra_head *h, const int32_t *ids, size_t n, int64_t *pos);
size_t ra_head_bytes(ra_head *h);

#endif
