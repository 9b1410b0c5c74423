/* libratd-client: the C API a decoder links to talk to a ratd daemon.
 *
 * One ra_client is one connection (a ZeroMQ DEALER socket) to one daemon. Requests
 * are synchronous (send, then wait for the reply) except Attend, which also has a
 * send-now / wait-later form so a decoder can overlap its own GPU work with the
 * daemon's retrieval. Every wait has a timeout (RA_ETIMEDOUT).
 *
 * Errors: every fallible call returns an ra_status (include/ratd/status.h, text
 * through ra_strerror()); out-parameters are written only on RA_OK. The message of
 * the last failed call (the daemon's own text when the daemon refused the request,
 * else a local one) is ra_client_errmsg().
 *
 * Results go into arrays the caller sized; the library never hands out memory the
 * caller has to free, except the ra_client itself (ra_client_close).
 *
 * Tensor layouts (row-major, contiguous):
 *   K, V       [n_kv_heads][n_tokens][head_dim]   session dtype (f32, f16 or bf16 bits)
 *   positions  [n_tokens] int64                    token positions in the sequence
 *   train q    [n_q_heads][n_queries][head_dim]   fp32 (prefill queries for the index)
 *   attend q   [n_q_heads][head_dim]              fp32
 *   o          [n_q_heads][head_dim]              fp32
 *   lse        [n_q_heads]                        fp32 (natural log; -INF if no key)
 *   top-k      [n_q_heads][top_k] int64 positions and fp32 raw scores q.k, best first
 *
 * Thread-safety: an ra_client is NOT thread-safe (like a ZeroMQ socket). Use each
 * ra_client from one thread at a time (a caller may hand it between threads behind its
 * own lock); open one ra_client per thread for parallel traffic. Different clients are
 * independent. */
#ifndef RATD_CLIENT_H
#define RATD_CLIENT_H

#include <stddef.h>
#include <stdint.h>

#include "ratd/status.h"

#ifdef __cplusplus
extern "C" {
#endif

/* The wire protocol version this library speaks. */
#define RA_CLIENT_PROTOCOL_VERSION 1u

typedef struct ra_client ra_client;

typedef struct ra_client_opts {
    int timeout_ms;   /* bound of every wait; <= 0: 30000 */
    int max_inflight; /* asynchronous attends outstanding at once; <= 0: 64 */
    /* CURVE (a daemon with --curve-secret-file, needed for tcp:// off loopback): the
     * daemon's public key and this client's key pair, each 40 characters of Z85 as
     * `ratd --curve-keygen` prints them. All three NULL: no CURVE. The client's public
     * key must be in the daemon's --curve-clients, else its connection ends at the
     * handshake and requests time out (RA_ETIMEDOUT). The strings are copied. */
    const char *curve_server_key;
    const char *curve_public_key;
    const char *curve_secret_key;
} ra_client_opts;

void ra_client_opts_default(ra_client_opts *o);

/* Connects to `endpoint` ("ipc:///path" or "tcp://host:port"; NULL: the daemon's default,
 * see ra_client_default_endpoint). Does no network I/O: an absent daemon shows up as
 * RA_ETIMEDOUT on the first request (call ra_client_hello to check the daemon and the
 * protocol version). opts may be NULL. RA_EINVAL for a malformed endpoint or CURVE key.
 *
 * Sharding: a comma-separated list of up to 16 endpoints ("ipc:///a,ipc:///b") spreads
 * layers over several daemons (e.g. one per NUMA node): layer l lives on daemon
 * l % n. Sessions are created and dropped on all of them (all or none), Hello checks
 * all (limits: the smallest of each), Stats adds their counters up. The session id
 * the caller sees is the first daemon's. */
ra_status ra_client_open(ra_client **out, const char *endpoint, const ra_client_opts *opts);
/* Closes the socket, abandons outstanding requests, frees the client. NULL is a no-op. */
void ra_client_close(ra_client *c);

/* The endpoint a ratd started without --endpoint binds, by the same rule:
 * ipc://$XDG_RUNTIME_DIR/ratd/ratd.sock when XDG_RUNTIME_DIR is set (and writable), else
 * ipc:///tmp/ratd-<uid>/ratd.sock. Writes at most len bytes (NUL included); RA_EINVAL when
 * it does not fit. */
ra_status ra_client_default_endpoint(char *buf, size_t len);

/* Message of the last failed call on this client ("" after a success). Valid until the
 * next call on the same client. Never NULL. */
const char *ra_client_errmsg(const ra_client *c);

/* Changes the wait bound of later calls (<= 0: 30000 ms). */
void ra_client_set_timeout(ra_client *c, int timeout_ms);
/* While waiting for a reply, poll for up to spin_us microseconds without sleeping before
 * blocking (0, the default: block at once; at most 100000). A reply that comes while the
 * thread sleeps waits for its wake-up: on the GPU host's KVM guest ~50 us an Attend, on
 * top of the round trip (bench/README.md, "Twelfth session"). It costs a core while it
 * spins: leave one free of ratd's workers. */
void ra_client_set_spin_us(ra_client *c, int spin_us);

/* ---- Hello -------------------------------------------------------------------- */

/* Capability bits of a daemon. */
#define RA_CAP_F16 (1u << 0)
#define RA_CAP_BF16 (1u << 1)
#define RA_CAP_GRAPH (1u << 2)
#define RA_CAP_FAISS (1u << 3)
#define RA_CAP_TOPK (1u << 4) /* returns top-k positions and scores on request */
#define RA_CAP_NUMA (1u << 5) /* workers and memory bound to a NUMA node / cpuset */
#define RA_CAP_BATCH (1u << 6) /* batched Attend over several sessions (ra_client_attend_batch) */
#define RA_CAP_GRAPH_ADJ (1u << 7) /* Offload takes a prebuilt graph (ra_kv_batch.graph_adj) */

/* The daemon's limits: a request beyond any of them is refused (RA_ETOOBIG/RA_EINVAL). */
typedef struct ra_server_limits {
    uint64_t max_frame_bytes;   /* one tensor frame */
    uint64_t max_message_bytes; /* all frames of one request */
    uint64_t mem_limit;         /* daemon-wide memory budget, 0 = none */
    uint32_t max_sessions;
    uint32_t max_layers;
    uint32_t max_heads;
    uint32_t max_dim;
    uint32_t max_top_k;
    uint32_t max_tokens;  /* tokens per Offload/Append message */
    uint32_t max_queries; /* training queries per head per Offload */
} ra_server_limits;

typedef struct ra_server_info {
    uint32_t protocol_version;
    uint32_t capabilities; /* RA_CAP_* */
    char server_version[32];
    uint32_t workers;
    int32_t numa_node; /* -1 when not bound */
    ra_server_limits limits;
    uint64_t instance_id; /* random at every start of the (first) daemon: a change means
                             that its sessions are gone */
} ra_server_info;

/* Exchanges protocol versions; a daemon that speaks another version answers
 * RA_EVERSION and the message names both versions. info may be NULL. */
ra_status ra_client_hello(ra_client *c, ra_server_info *info);

/* ---- Sessions ----------------------------------------------------------------- */

/* Index kinds; same values as the daemon's. */
typedef enum ra_client_index_kind {
    RA_CLIENT_INDEX_GRAPH = 0, /* attention-aware graph (kind 0 on the wire) */
    RA_CLIENT_INDEX_FLAT = 1,  /* exact scan */
    RA_CLIENT_INDEX_IVF = 2,   /* FAISS IVF-Flat */
    RA_CLIENT_INDEX_HNSW = 3,  /* FAISS HNSW */
    RA_CLIENT_INDEX_PSCAN = 5  /* projected-code scan, ra_session_desc_init's default (4 is the
                                  daemon's faiss-flat baseline) */
} ra_client_index_kind;

/* The name of an index kind as the tools spell it ("graph", "flat", "ivf", "hnsw",
 * "pscan"), or NULL for a value that is none of them. */
const char *ra_client_index_kind_name(ra_client_index_kind k);
/* The kind of one of those names into *out: RA_OK, or RA_EINVAL (nothing written) for
 * NULL or any other text. */
ra_status ra_client_index_kind_parse(const char *name, ra_client_index_kind *out);

/* Index options; 0 means "daemon default" for every field. */
typedef struct ra_client_index_opts {
    ra_client_index_kind kind;
    int graph_knn;      /* exact top-K keys per training query */
    int graph_degree;   /* max out-degree */
    int graph_build_ef; /* candidate list when inserting */
    int graph_entries;  /* entry points */
    int n_train;        /* training queries used per KV head (sampled) */
    int ivf_nlist;
    int hnsw_m;
    int threads; /* build threads */
    uint64_t seed;
} ra_client_index_opts;

typedef struct ra_session_desc {
    int n_layers;
    int n_q_heads;  /* query heads; a multiple of n_kv_heads (GQA) */
    int n_kv_heads; /* query head h uses KV head h / (n_q_heads / n_kv_heads) */
    int head_dim;
    ra_dtype dtype; /* storage and wire dtype of K and V */
    ra_client_index_opts index;
} ra_session_desc;

/* Zeroes *d, then sets the defaults: the projected-code scan (RA_CLIENT_INDEX_PSCAN),
 * fp16. A zeroed desc without it asks for the graph index (kind 0). */
void ra_session_desc_init(ra_session_desc *d);

/* Creates a session on the daemon; *session is its id (never 0; random, so ids do not
 * repeat across daemon restarts). The daemon also returns the session's token, a random
 * 128-bit secret that every later request naming the session must carry; the client
 * keeps it and sends it by itself, across reconnects too. Without the right token a
 * session is unknown (RA_ENOSESSION) to everyone, whatever its id. */
ra_status ra_client_session_create(ra_client *c, const ra_session_desc *d, uint64_t *session);
/* Frees the session and everything of it on the daemon. */
ra_status ra_client_session_drop(ra_client *c, uint64_t session);

/* A session's token, to use the session from another ra_client (or process) that did
 * not create it: ra_client_session_token on the creator, ra_client_session_adopt on the
 * other. Whoever holds the token owns the session: pass it only as securely as the data.
 * Single-daemon clients only (RA_ENOTSUP on a sharded one); RA_ENOSESSION when this
 * client does not know the session. */
#define RA_SESSION_TOKEN_BYTES 16
typedef struct ra_session_token {
    uint8_t bytes[RA_SESSION_TOKEN_BYTES];
} ra_session_token;
ra_status ra_client_session_token(ra_client *c, uint64_t session, ra_session_token *out);
ra_status ra_client_session_adopt(ra_client *c, uint64_t session, const ra_session_token *token);

/* ---- Tokens ------------------------------------------------------------------- */

/* One layer's tokens for Offload / Append. Pointers are only read during the call. */
typedef struct ra_kv_batch {
    int n_kv_heads;
    int head_dim;
    ra_dtype dtype;
    size_t n_tokens;
    const void *k;        /* [n_kv_heads][n_tokens][head_dim] */
    const void *v;        /* [n_kv_heads][n_tokens][head_dim] */
    const int64_t *pos;   /* [n_tokens] */
    int n_q_heads;        /* Offload only: heads of q_train (0: no training queries) */
    size_t n_queries;     /* Offload only: queries per head */
    const float *q_train; /* Offload only: [n_q_heads][n_queries][head_dim] fp32 */
    /* Offload only, optional: the exact top-train_knn_k tokens of each training query
     * among this batch's tokens of its KV head, [n_q_heads][n_queries][train_knn_k]
     * int32 indices 0..n_tokens-1 (-1 pads), best first — e.g. from ra_gpu_knn during
     * prefill. The graph index then skips its own kNN. NULL: ratd computes them. */
    const int32_t *train_knn;
    int train_knn_k;
    /* Offload only, optional (daemon capability RA_CAP_GRAPH_ADJ): a graph index built
     * outside ratd over this batch's tokens (e.g. ra_gpu_graph_build), installed instead of
     * ratd's own build. Only for a layer that holds no tokens yet, in a session with the
     * graph index. graph_adj [n_kv_heads][n_tokens][graph_degree] int32: the out-neighbours
     * of each token as indices 0..n_tokens-1, -1 pads; no self edge, no index twice in a
     * row, every token reachable from the entries. graph_entries [n_kv_heads]
     * [graph_n_entries] distinct indices. The daemon checks all of it before it stores
     * anything: RA_EINVAL names the first bad (head, row, slot), and nothing of the batch is
     * stored. NULL: ratd builds the index itself. */
    const int32_t *graph_adj;
    int graph_degree;    /* 1..255 */
    const int32_t *graph_entries;
    int graph_n_entries; /* 1..1024 */
} ra_kv_batch;

/* Prefill: stores the tokens of one layer and starts building that layer's index in the
 * background from the training queries (every query head sharing a KV head trains it).
 * Attend is answered by an exact scan until the index is built. */
ra_status ra_client_offload(ra_client *c, uint64_t session, int layer, const ra_kv_batch *b);
/* Decode: tokens leaving the GPU window; searchable by the next Attend. */
ra_status ra_client_append(ra_client *c, uint64_t session, int layer, const ra_kv_batch *b);

/* ---- Attend ------------------------------------------------------------------- */

typedef struct ra_attend_req {
    int n_q_heads;
    int head_dim;
    const float *q; /* [n_q_heads][head_dim] fp32 */
    int top_k;      /* keys retrieved per query head (> 0, <= limits.max_top_k) */
    int effort;     /* search effort (graph: candidate list; 0: default) */
    float scale;    /* softmax scale; <= 0: 1/sqrt(head_dim) */
    int want_topk;  /* 1: also return the retrieved positions and scores */
    const int32_t *top_k_per_head; /* NULL, or [n_q_heads] budgets in 0..top_k: head h reads
                                      that many keys (0: none, o = 0, lse = -INF); result
                                      rows keep width top_k */
} ra_attend_req;

/* Caller-sized result arrays (see the layouts at the top). pos/scores/counts are used
 * only when want_topk was set, and may be NULL otherwise. A batched Attend puts a
 * leading [n_sessions] dimension in front of every array. server_us, work_us and
 * task_max_us are written on success. */
typedef struct ra_attend_out {
    float *o;        /* [n_q_heads][head_dim] */
    float *lse;      /* [n_q_heads] */
    int64_t *pos;    /* [n_q_heads][top_k]; rows shorter than top_k padded with -1 */
    float *scores;   /* [n_q_heads][top_k]; padding -INF */
    int32_t *counts; /* [n_q_heads]: entries filled per head */
    uint32_t server_us; /* the daemon's wall time from the request's arrival to its reply */
    uint32_t work_us;   /* the sum of the request's task times (its work on one thread) */
    uint32_t task_max_us; /* the longest of those tasks: a floor under server_us */
} ra_attend_out;

/* Partial attention over the offloaded tokens of one layer, per query head. */
ra_status ra_client_attend(ra_client *c, uint64_t session, int layer, const ra_attend_req *r,
                           ra_attend_out *out);

/* Asynchronous form: sends the request now (q is copied before return) and gives a
 * ticket; ra_client_attend_wait blocks until that reply arrives (or timeout_ms passes,
 * < 0: the client's timeout) and writes it into out, whose arrays must match the
 * request (n_q_heads, head_dim, top_k, want_topk). On RA_ETIMEDOUT the ticket stays
 * valid: wait again, or drop it with ra_client_attend_cancel. Any other return of
 * wait consumes the ticket. Other calls on the client may be made in between. */
typedef uint64_t ra_ticket;
ra_status ra_client_attend_send(ra_client *c, uint64_t session, int layer, const ra_attend_req *r,
                                ra_ticket *ticket);
ra_status ra_client_attend_wait(ra_client *c, ra_ticket ticket, ra_attend_out *out, int timeout_ms);
/* Forgets a ticket; its reply is discarded when it arrives. */
void ra_client_attend_cancel(ra_client *c, ra_ticket ticket);

/* Batched decode: one Attend carrying several sessions' queries for the same layer
 * (continuous batching). The sessions must share n_q_heads, n_kv_heads and head_dim;
 * ids are distinct; at most the daemon's max-batch (256 by default) of them. An
 * unknown session fails the whole request (RA_ENOSESSION naming it), a shape mismatch
 * is RA_ESHAPE naming the session. The daemon runs the request's tasks (per session x
 * KV head x sub-group) in parallel. Needs RA_CAP_BATCH. With sharding, layer l lives on
 * daemon l % n and the session ids are mapped as everywhere else. */
typedef struct ra_attend_batch_req {
    int n_sessions;
    const uint64_t *sessions; /* [n_sessions] */
    int n_q_heads, head_dim;
    const float *q; /* [n_sessions][n_q_heads][head_dim] fp32 */
    int top_k, effort;
    float scale;
    int want_topk;
    const int32_t *top_k_per_head; /* NULL or [n_q_heads], applies to every session */
} ra_attend_batch_req;
/* out arrays get a leading [n_sessions] dimension: o [n_sessions][n_q_heads][head_dim],
 * lse [n_sessions][n_q_heads], pos/scores [n_sessions][n_q_heads][top_k], counts
 * [n_sessions][n_q_heads]. */
ra_status ra_client_attend_batch(ra_client *c, int layer, const ra_attend_batch_req *r,
                                 ra_attend_out *out);
/* Asynchronous form, as ra_client_attend_send; its ticket is waited for with
 * ra_client_attend_wait (out arrays with the leading dimension) or cancelled. */
ra_status ra_client_attend_batch_send(ra_client *c, int layer, const ra_attend_batch_req *r,
                                      ra_ticket *ticket);

/* ---- Stats -------------------------------------------------------------------- */

typedef enum ra_op {
    RA_OP_HELLO = 0,
    RA_OP_CREATE = 1,
    RA_OP_OFFLOAD = 2,
    RA_OP_APPEND = 3,
    RA_OP_ATTEND = 4,
    RA_OP_DROP = 5,
    RA_OP_STATS = 6,
    RA_OP_COUNT = 7
} ra_op;

typedef struct ra_op_stats {
    uint64_t count;
    uint64_t errors;
    uint64_t total_us; /* time from a request's arrival to its reply */
    uint64_t max_us;
} ra_op_stats;

typedef struct ra_server_stats {
    uint64_t sessions;     /* live now */
    uint64_t requests;     /* all requests served, including refused ones */
    uint64_t errors;       /* replies with a status other than RA_OK */
    uint64_t bad_messages; /* malformed input: garbage, truncated, too big */
    uint64_t bytes_in;
    uint64_t bytes_out;
    uint64_t mem_used;  /* accounted bytes (K, V, indexes) */
    uint64_t mem_limit; /* 0 = none */
    uint64_t tokens;    /* tokens stored, all sessions */
    double uptime_s;
    ra_op_stats ops[RA_OP_COUNT];
    uint64_t clients;          /* connections now */
    uint64_t max_clients;      /* the daemon's connection limit */
    uint64_t listener_pauses;  /* times it stopped accepting at max_clients */
    uint64_t replies_dropped;  /* replies dropped because their client's queue was full */
    uint64_t sessions_expired; /* sessions dropped after --session-ttl unused */
    uint64_t tokens_refused;   /* requests naming a live session with a wrong/missing token */
    uint64_t reply_bytes;      /* reply bytes charged on the memory account now */
    uint64_t curve_refused;    /* CURVE handshakes refused (key not authorised) */
} ra_server_stats;

const char *ra_op_name(ra_op op);

/* Daemon-wide counters. */
ra_status ra_client_stats(ra_client *c, ra_server_stats *st);

/* One session's tokens and index state (over every daemon holding its layers). */
typedef struct ra_session_stats {
    uint64_t tokens;
    uint32_t heads;          /* (layer, KV head) pairs holding tokens */
    uint32_t heads_ready;    /* of which the index is built and in use */
    uint32_t heads_building; /* of which a build is running (answered by exact scan) */
    uint64_t bytes;          /* accounted memory: K, V, indexes, tables (a dropped session's
                                stays on the daemon's mem_used until it is freed) */
} ra_session_stats;
ra_status ra_client_session_stats(ra_client *c, uint64_t session, ra_session_stats *st);

/* Blocks until no index build of the session is running and no Offload/Append of it is
 * queued, bounded by timeout_ms (<= 0: the client's timeout; RA_ETIMEDOUT after it).
 * One request per daemon, answered by the daemon when the builds are done (a daemon
 * older than WaitReady is polled with Stats instead). Attend never needs this (it is
 * answered by an exact scan meanwhile); benchmarks use it to measure the built index. */
ra_status ra_client_wait_ready(ra_client *c, uint64_t session, int timeout_ms);

/* ---- Operations (ratctl) ---------------------------------------------------------- */

/* One live session of a daemon (ra_client_list_sessions). */
typedef struct ra_session_info {
    uint64_t id;
    int n_layers, n_q_heads, n_kv_heads, head_dim;
    ra_dtype dtype;
    ra_client_index_kind index_kind;
    uint64_t tokens;
    uint64_t bytes;          /* accounted memory: K, V, indexes, tables */
    uint32_t heads;          /* (layer, KV head) pairs holding tokens */
    uint32_t heads_ready;    /* of which the index is built */
    uint32_t heads_building; /* of which a build is running */
    uint32_t jobs;           /* its requests queued or running now */
    double idle_s;           /* since the last request that named it */
} ra_session_info;

/* The live sessions of the first daemon of the client's endpoint list (ids are that
 * daemon's own), in id order: up to cap into out (may be NULL when cap is 0); *n gets
 * the number of live sessions, which may exceed cap. RA_ENOTSUP from a daemon that
 * predates the request. */
ra_status ra_client_list_sessions(ra_client *c, ra_session_info *out, size_t cap, size_t *n);

/* The first daemon's effective configuration (defaults, config file, environment and
 * flags merged) as "name value" lines, one per option, into buf[cap], NUL-terminated.
 * RA_ETOOBIG when it does not fit (about 2 KiB is enough), RA_ENOTSUP from an older daemon. */
ra_status ra_client_get_config(ra_client *c, char *buf, size_t cap);

/* ---- ABI (for bindings that mirror these structs: ctypes, cffi) ----------------- */

/* Bumped whenever a public struct's layout or a call's signature changes. A binding
 * compares it, and the size of every struct it mirrors, with its own copy at load time
 * and refuses a library that differs. */
#define RA_CLIENT_ABI_VERSION 4u

/* The public structs whose sizes ra_client_struct_size reports. Values are stable:
 * a new struct takes the next value, before RA_CLIENT_STRUCT_COUNT. */
typedef enum ra_client_struct {
    RA_CLIENT_STRUCT_OPTS = 0,          /* ra_client_opts */
    RA_CLIENT_STRUCT_SERVER_LIMITS = 1, /* ra_server_limits */
    RA_CLIENT_STRUCT_SERVER_INFO = 2,   /* ra_server_info */
    RA_CLIENT_STRUCT_INDEX_OPTS = 3,    /* ra_client_index_opts */
    RA_CLIENT_STRUCT_SESSION_DESC = 4,  /* ra_session_desc */
    RA_CLIENT_STRUCT_KV_BATCH = 5,      /* ra_kv_batch */
    RA_CLIENT_STRUCT_ATTEND_REQ = 6,    /* ra_attend_req */
    RA_CLIENT_STRUCT_ATTEND_OUT = 7,    /* ra_attend_out */
    RA_CLIENT_STRUCT_OP_STATS = 8,      /* ra_op_stats */
    RA_CLIENT_STRUCT_SERVER_STATS = 9,  /* ra_server_stats */
    RA_CLIENT_STRUCT_SESSION_STATS = 10, /* ra_session_stats */
    RA_CLIENT_STRUCT_ATTEND_BATCH_REQ = 11, /* ra_attend_batch_req */
    RA_CLIENT_STRUCT_SESSION_TOKEN = 12,    /* ra_session_token */
    RA_CLIENT_STRUCT_SESSION_INFO = 13,     /* ra_session_info */
    RA_CLIENT_STRUCT_COUNT = 14
} ra_client_struct;

/* RA_CLIENT_ABI_VERSION of the library (not of the header a caller was built with). */
uint32_t ra_client_abi_version(void);
/* sizeof the struct `which` in the library; 0 for a value it does not know. */
size_t ra_client_struct_size(ra_client_struct which);
/* The project version the library was built from ("0.1.0"); a static string. */
const char *ra_client_version(void);

#ifdef __cplusplus
}
#endif
#endif
