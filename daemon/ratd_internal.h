/* Internal to daemon/: the server, its sessions and its jobs, shared by the I/O loop
 * (ratd_server.c), the session table and reaper (ratd_session.c) and the handlers
 * (ratd_attend.c, ratd_tokens.c).
 *
 * Who touches what. The I/O thread owns the ROUTER socket, the session table, every
 * session's lanes and reference count, the counters, and every job outside its run.
 * A job's tasks (workers) touch the job, the sessions' ra_heads (thread-safe), and the
 * per-(session, layer) state that only that lane's jobs use, one at a time: warm ids,
 * `broken`, the creation of the layer's heads. The reaper thread frees sessions that
 * nobody references any more. */
#ifndef RATD_INTERNAL_H
#define RATD_INTERNAL_H

#include <pthread.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

#include "ra_index.h"
#include "ra_proto.h"
#include "ratd_config.h"
#include "ratd_ops.h"
#include "ratd_pool.h"
#include "ratd_server.h"

/* Previous result ids kept per (layer, query head) as graph entry points. */
#define RATD_WARM 32
#define RATD_N_OPS 10 /* MsgType 1..10 */
/* Sessions no bigger than this, with no build running, are freed by Drop itself;
 * others go to the reaper. */
#define RATD_INLINE_FREE_BYTES ((size_t)64 << 20)

/* Bytes of a session's token (Header.token). */
#define RATD_TOKEN_BYTES 16
/* Longest ZeroMQ routing id kept per peer (ROUTER-made ids are 5 bytes). */
#define RATD_PEER_ID_MAX 32
#define RATD_PEER_BUCKETS 1024

typedef struct ratd_job ratd_job;
typedef struct ratd_session ratd_session;

/* One client connection as the ROUTER names it: what its unread replies hold, and when
 * a dropped reply to it was last logged. Made by the I/O thread at a request; jobs hold
 * references (atomic: released from ZeroMQ's threads); swept by the I/O thread when
 * unreferenced and idle. */
typedef struct ratd_peer {
    uint8_t id[RATD_PEER_ID_MAX];
    size_t id_len;
    size_t reply_bytes; /* atomic: charged replies not yet released by ZeroMQ */
    int refs;           /* atomic: jobs naming this peer */
    double last_seen, last_drop_log;
    uint64_t dropped, dropped_logged;
    struct ratd_peer *next;
} ratd_peer;

/* One job's place in one (session, layer) lane: a FIFO whose head job may run. */
typedef struct ratd_lane_node {
    ratd_job *job;
    struct ratd_lane_node *next;
} ratd_lane_node;

typedef struct ratd_lane {
    ratd_lane_node *head, *tail;
} ratd_lane;

struct ratd_session {
    uint64_t id;
    uint8_t token[RATD_TOKEN_BYTES]; /* the owner's proof (Header.token) */
    double last_used; /* I/O thread: last request naming it (--session-ttl, ListSessions) */
    char owner[80];                  /* routing id of the creator, for logs */
    int n_layers, n_q, n_kv, dim, rep;
    ra_dtype dtype;
    ra_index_opts iopts;
    ra_head **heads;  /* [n_layers][n_kv]; set once by the layer's first tokens job
                         (atomic store), read with atomic loads */
    int32_t *warm;    /* [n_layers][n_q][RATD_WARM]: that lane's jobs only */
    int *n_warm;      /* [n_layers][n_q] */
    uint8_t *broken;  /* [n_layers]: a failed store left KV heads out of step */
    ratd_lane *lanes; /* [n_layers], I/O thread */
    ra_mem mem;       /* this session's account (K, V, indexes, tables); parent: the daemon's */
    size_t own_bytes; /* the tables above, reserved on mem */
    uint64_t tokens;  /* I/O thread */
    int refs;         /* I/O thread: the table's, plus one per job naming the session */
    uint64_t mark;    /* I/O thread: duplicate check of a batched Attend */
    ratd_session *reap_next;
};

typedef struct op_stat {
    uint64_t count, errors, total_us, max_us;
} op_stat;

/* A bump allocator for the protobuf-c header of one request: parsing allocates
 * nothing once the arena has grown to the largest header seen. */
typedef struct ratd_arena {
    ProtobufCAllocator pa;
    char *buf;
    size_t cap, used, spilled;
    void *spill; /* overflow blocks of this request, freed at reset */
} ratd_arena;

typedef enum { JOB_INLINE = 0, JOB_ATTEND, JOB_TOKENS } ratd_job_kind;

/* A growable buffer, reused by the next request of the job that holds it. */
typedef struct ratd_buf {
    void *p;
    size_t cap;
} ratd_buf;

/* One request from its arrival to the release of its reply frames. Jobs are pooled by
 * the server and never freed while it runs (the worker pool may hold stale tickets). */
struct ratd_job {
    ratd_work work; /* first: the pool's view */
    ratd_server *srv;
    ratd_job *next; /* free list, completion stack or the I/O thread's ready list */
    ratd_job *all_next;
    ratd_job_kind kind;
    /* the request */
    ra_proto_msg msg; /* frames, kept until the reply: tensors are read in place */
    ra_proto_view v;
    ratd_arena arena;
    int delim, type;
    uint64_t req_id;
    double t_arrive;
    char peer[80];
    ratd_peer *cl;  /* the requesting connection (NULL when out of memory) */
    size_t charged; /* reply bytes reserved on the daemon's account and cl (Attend) */
    /* sessions and lanes (a batched Attend names several) */
    int n_sess;
    uint32_t layer;
    ratd_buf ss_buf, node_buf; /* ratd_session *[n_sess], ratd_lane_node [n_sess] */
    ratd_session **ss;
    ratd_lane_node *nodes;
    int waiting; /* lanes in which this job is not yet first (I/O thread) */
    /* the outcome (written by the job's worker before it completes) */
    ra_status st;
    char err[RA_PROTO_ERRLEN];
    int n_tasks;
    int resubmit;           /* a next phase of n_tasks is ready to run */
    ratd_buf tst;           /* ra_status [n_tasks] */
    uint64_t stored_tokens; /* tokens job: stored on success */
    /* reply frames referencing this job's buffers + the I/O thread's own reference */
    int frames; /* atomic */
    /* Attend */
    struct {
        int k, effort, want, P, gsize, tasks_per_sess;
        int kparts;    /* 1: the P tasks of a KV head cut its keys, not its query
                          heads (ra_head_attend_part; pscan sessions) */
        size_t pbytes; /* one KV head's merge context (ra_head_part_bytes) */
        float scale;
        const uint32_t *k_head; /* NULL or [n_q] */
        const float *q;         /* [n_sess][n_q][dim] */
        ratd_buf qcopy, o, lse, ids, sc, pos, cnt, pctx;
    } a;
    /* Offload / Append */
    struct {
        int offload, phase, knn_k;
        size_t n, nq, es;
        const uint8_t *k, *v;
        const int64_t *pos;
        const float *q;
        const int32_t *knn;
        const int32_t *adj, *ent;  /* GRAPH_ADJ [n_kv][n][gdeg], GRAPH_ENTRIES [n_kv][n_ent] */
        int gdeg, n_ent;
        ratd_buf copy[7];          /* unaligned frames */
        ratd_buf bad, bad_at, bst; /* per KV head: error, entry index, build status */
        ratd_buf fault;            /* per KV head: what is wrong with its graph */
        ratd_buf grow;             /* per KV head: {rows to grow to, bytes prepaid} */
    } t;
};

struct ratd_server {
    ratd_config cfg;
    void *ctx, *sock;
    int efd; /* eventfd: workers wake the I/O thread */
    ratd_pool *pool;
    int timeline; /* --timeline (RATD_TIMELINE): every N-th pool request's timeline (0: off) */
    unsigned timeline_n;
    ra_mem mem;
    ra_proto_limits lim;
    /* sessions, sorted by id (random ids, never 0): binary search, I/O thread */
    ratd_session **sessions;
    int n_sessions, cap_sessions;
    uint64_t instance_id; /* random per start (HelloReply.instance_id) */
    double next_sweep;    /* I/O thread: next --session-ttl and peer sweep */
    /* peers (ratd_peer), I/O thread */
    ratd_peer *peers[RATD_PEER_BUCKETS];
    int n_peers;
    /* the listener (ratd_listen.c), I/O thread */
    void *mon;               /* PAIR receiving the ROUTER's connection events */
    int listen_fd;           /* our listening socket; a duplicate is lent to ZeroMQ (ZMQ_USE_FD) */
    int zmq_fd, zmq_fd_lent; /* that duplicate; 1: ZeroMQ owns it */
    int idle_fd;             /* an idle listening socket that stands in for it while paused */
    int spare_fd;            /* kept to accept-and-close with when descriptors run out */
    char bound[512];         /* ZMQ_LAST_ENDPOINT */
    int max_clients, clients, paused;
    uint8_t *conn_fds; /* bitmap of live connection descriptors */
    int conn_fds_cap;
    uint64_t listener_pauses;
    /* CURVE (ratd_curve.c) */
    void *zap; /* REP socket on inproc://zeromq.zap.01, its own thread */
    pthread_t zap_thread;
    int zap_live, zap_stop;
    double zap_last_log; /* ZAP thread: the last refusal logged */
    uint8_t *curve_keys; /* sorted 32-byte public keys of authorised clients */
    size_t n_curve_keys;
    uint64_t curve_refused; /* atomic: handshakes refused by the ZAP handler */
    /* jobs */
    ratd_job *done_stack;  /* atomic: finished jobs, pushed by workers */
    ratd_job *free_shared; /* atomic: jobs whose reply frames were released */
    ratd_job *free_local;  /* I/O thread */
    ratd_job *all_jobs;    /* I/O thread: every job, for the final free */
    ratd_job *ready;       /* I/O thread: finished jobs to answer, FIFO */
    ratd_job *ready_tail;
    int active; /* jobs accepted and not yet answered (--max-queue) */
    uint64_t mark_gen;
    /* reaper */
    pthread_t reaper;
    int reaper_live;
    pthread_mutex_t reap_mu;
    pthread_cond_t reap_cv;
    ratd_session *reap_head;
    int reap_pending, reap_stop;
    /* counters, I/O thread */
    char ipc_path[512];
    double t0;
    uint64_t requests, errors, bad_messages, bytes_in, bytes_out, tokens;
    uint64_t replies_dropped, sessions_expired, tokens_refused;
    size_t reply_bytes; /* atomic: reply bytes charged now */
    op_stat op_stats[RATD_N_OPS];
    ratd_ops *ops; /* metrics, ListSessions/GetConfig/WaitReady, heap trimming (ratd_ops.c) */
};

/* ---- ratd_session.c ----------------------------------------------------------------- */
ratd_session *ratd_session_find(ratd_server *s, uint64_t id);
/* The session `id` when `token` (len bytes) is its token; else NULL with the message of
 * an unknown session in err (a wrong token is counted and logged, never told apart). */
ratd_session *ratd_session_get(ratd_server *s, uint64_t id, const uint8_t *token, size_t len,
                               const char *peer, char *err, size_t errlen);
/* Validates a CreateSession and adds the session (reply: Header.session and .token). */
ra_status ratd_session_create(ratd_server *s, const Ratd__CreateSession *c, const char *peer,
                              uint64_t *id, uint8_t token[RATD_TOKEN_BYTES], char *err,
                              size_t errlen);
/* Takes the session out of the table; it is freed when its last job ends. */
ra_status ratd_session_drop(ratd_server *s, uint64_t id, const uint8_t *token, size_t len,
                            const char *peer, char *err, size_t errlen);
/* Drops the sessions unused for --session-ttl with no request in flight. */
void ratd_session_expire(ratd_server *s, double now);
/* Random bytes from getrandom(2); RA_EIO when the kernel has none to give. */
ra_status ratd_random(void *buf, size_t n);
void ratd_session_unref(ratd_server *s, ratd_session *ss);
ra_status ratd_reaper_start(ratd_server *s, char *err, size_t errlen);
/* Drops every session, then waits up to `seconds` for the reaper to free them all.
 * Returns 0 when all are freed, -1 when builds were still running at the deadline. */
int ratd_reaper_finish(ratd_server *s, double seconds);
/* ESTATE message for a layer a failed store left out of step, or RA_OK. */
ra_status ratd_session_check_layer(ratd_session *ss, uint32_t layer, char *err, size_t errlen);

/* ---- handlers: validate on the I/O thread (RA_OK: j is ready to be queued, its tasks
 * and sessions set), run on the workers, build the reply on the I/O thread ----------- */
ra_status ratd_attend_accept(ratd_server *s, ratd_job *j);
int ratd_attend_reply(ratd_job *j, ra_proto_part *parts);
ra_status ratd_tokens_accept(ratd_server *s, ratd_job *j);
/* The split of an Attend over the workers: P sub-groups of gsize query heads per KV
 * head (see ratd_attend.c). */
void ratd_attend_split(int n_sess, int n_kv, int rep, int workers, int *P, int *gsize);
/* pscan sessions: P parts over the keys of each KV head, enough to give every worker one
 * (ceil(workers / (n_sess * n_kv)), 1..RA_HEAD_MAX_PARTS) */
void ratd_attend_split_keys(int n_sess, int n_kv, int workers, int *P);

/* ---- ratd_listen.c: the bind, the policy on the bound address, the connection
 * budget (stop accepting at max-clients, resume below it) ---------------------------- */
ra_status ratd_listen_bind(ratd_server *s, char *err, size_t errlen);
/* Handles the ROUTER's connection events waiting on s->mon. */
void ratd_listen_events(ratd_server *s);
/* Before the ROUTER closes: accepting resumed, the monitor closed. */
void ratd_listen_close(ratd_server *s);
/* After the context ends: the descriptors. */
void ratd_listen_release(ratd_server *s);

/* ---- ratd_peer.c: clients, their charged replies, dropped replies ------------------- */
/* The record of a routing id, made on first sight; NULL when out of memory. */
ratd_peer *ratd_peer_get(ratd_server *s, zmq_msg_t *route, double now);
/* Frees the records no job names that sent nothing for `idle` seconds (idle < 0: all,
 * at the end). */
void ratd_peer_sweep(ratd_server *s, double now, double idle);
/* A reply the client's full queue refused: counted, logged once per 10 s a client. */
void ratd_peer_reply_dropped(ratd_server *s, ratd_job *j);
/* Reserves an Attend's reply bytes on the daemon's account and the client's share
 * (--max-peer-reply-bytes) until ZeroMQ releases the reply; RA_ENOMEM / RA_EBUSY with
 * the job's message set. */
ra_status ratd_job_charge(ratd_server *s, ratd_job *j, size_t bytes);
/* When the job's last reply frame is released: the charge and the client's reference
 * go back (any thread). */
void ratd_job_uncharge(ratd_server *s, ratd_job *j);

/* ---- ratd_curve.c: CURVE keys and the ZAP handler ------------------------------------ */
/* Prints a new key pair; 0 on success. */
int ratd_curve_keygen(FILE *f);
/* Loads the secret and the client keys, starts the ZAP thread and sets the ROUTER's
 * CURVE options (before its bind). No-op without --curve-secret-file. */
ra_status ratd_curve_setup(ratd_server *s, char *err, size_t errlen);
void ratd_curve_stop(ratd_server *s);

/* ---- ratd_server.c: helpers the handlers share ------------------------------------ */
/* Grows b to at least `bytes` (kept for the next request); NULL on allocation failure. */
void *ratd_buf_get(ratd_buf *b, size_t bytes);
/* Tensor i's data aligned to `align` (in place, or copied into b). NULL: no memory. */
const void *ratd_frame_data(ra_proto_view *v, int i, size_t align, ratd_buf *b);
/* Checks that tensor `role` exists with dtype dt and the given shape. */
ra_status ratd_want_tensor(ra_proto_view *v, Ratd__Role role, const char *name, int dt, int ndim,
                           const uint64_t *shape, int *idx, char *err, size_t errlen);
/* Sends j's reply (no tensor frames), counts it and releases the request. */
void ratd_reply(ratd_server *s, ratd_job *j, Ratd__Header *rep, ra_status st);
/* Called by a job's last task (or phase): hands the job back to the I/O thread. */
void ratd_job_complete(ratd_job *j);
/* ra_proto_part.release of reply frames made from a job's buffers. */
void ratd_job_frame_release(void *data, void *hint);
void ratd_job_set_err(ratd_job *j, ra_status st, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
int ratd_all_finite(const void *p, size_t n, ra_dtype dt);

#endif
