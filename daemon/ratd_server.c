/* The ratd I/O loop (see ratd_server.h). One I/O thread owns the ROUTER socket: it
 * receives a request, parses and validates it once (ra_proto_parse: header size,
 * frame sizes, frame/shape agreement; then the handler's checks of ids, shapes and
 * limits against the sessions), and either answers it at once (Hello, CreateSession,
 * DropSession, Stats, every refusal) or turns it into a job. A job enters one lane
 * per (session, layer) it names and runs when it is first in all of them, so an
 * Append of layer L runs before the next Attend of layer L of that session while
 * other layers and sessions run concurrently; at most --max-queue jobs are queued or
 * running, beyond that a request gets RA_EBUSY at once. Jobs run on the worker pool;
 * the worker finishing a job's last task pushes the job onto a lock-free stack and
 * wakes the I/O thread through an eventfd it polls next to the socket; the I/O thread
 * starts the lanes' next jobs and sends the reply, whose tensor frames leave without a
 * copy from the job's buffers, which return to the job pool when ZeroMQ releases them.
 * A reply is never waited for: one that the client's full queue refuses is dropped and
 * counted (ratd_peer.c). Nothing on this path allocates once the pool's jobs have grown
 * to the request sizes seen. */
#define _GNU_SOURCE
#include "ratd_server.h"

#include <errno.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>
#include <zmq.h>

#include "ra_kernels.h"
#include "ra_log.h"
#include "ratd_internal.h"

#ifndef RATD_VERSION
#define RATD_VERSION "0.1.0"
#endif

/* capability bits, as include/ratd/client.h */
#define CAP_F16 (1u << 0)
#define CAP_BF16 (1u << 1)
#define CAP_GRAPH (1u << 2)
#define CAP_FAISS (1u << 3)
#define CAP_TOPK (1u << 4)
#define CAP_NUMA (1u << 5)
#define CAP_BATCH (1u << 6)
#define CAP_GRAPH_ADJ (1u << 7) /* Offload takes a prebuilt graph (GRAPH_ADJ) */

/* ---- small shared helpers ------------------------------------------------------------- */

void *ratd_buf_get(ratd_buf *b, size_t bytes)
{
    if (bytes <= b->cap && b->p)
        return b->p;
    size_t cap = b->cap ? b->cap : 256;
    while (cap < bytes)
        cap *= 2;
    void *p = realloc(b->p, cap);
    if (!p)
        return NULL;
    b->p = p;
    b->cap = cap;
    return p;
}

static void buf_free(ratd_buf *b)
{
    free(b->p);
    b->p = NULL;
    b->cap = 0;
}

const void *ratd_frame_data(ra_proto_view *v, int i, size_t align, ratd_buf *b)
{
    const void *d = zmq_msg_data(v->frame[i]);
    size_t sz = zmq_msg_size(v->frame[i]);
    if (((uintptr_t)d & (align - 1)) == 0)
        return d;
    /* frames received into ZeroMQ's shared buffer start anywhere */
    void *c = ratd_buf_get(b, sz ? sz : 1);
    if (c)
        memcpy(c, d, sz);
    return c;
}

int ratd_all_finite(const void *p, size_t n, ra_dtype dt)
{
    return ra_kern_all_finite(p, dt, n);
}

void ratd_job_set_err(ratd_job *j, ra_status st, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(j->err, sizeof j->err, fmt, ap);
    va_end(ap);
    j->st = st;
}

static const char *wire_dtype_name(int dt)
{
    static const char *n[] = {"f32", "f16", "bf16", "i64", "i32"};
    return dt >= 0 && dt < 5 ? n[dt] : "unknown-dtype";
}

static void shape_str(const uint64_t *shape, size_t ndim, char *buf, size_t len)
{
    size_t o = (size_t)snprintf(buf, len, "[");
    for (size_t d = 0; d < ndim && o < len; d++)
        o += (size_t)snprintf(buf + o, len - o, "%s%llu", d ? "," : "",
                              (unsigned long long)shape[d]);
    if (o < len)
        snprintf(buf + o, len - o, "]");
}

ra_status ratd_want_tensor(ra_proto_view *v, Ratd__Role role, const char *name, int dt, int ndim,
                           const uint64_t *shape, int *idx, char *err, size_t errlen)
{
    int i = ra_proto_find(v, role);
    if (i < 0) {
        snprintf(err, errlen, "request has no %s frame", name);
        return RA_EPROTO;
    }
    const Ratd__Tensor *t = v->tensor[i];
    int ok = (int)t->dtype == dt && (int)t->n_shape == ndim;
    for (int d = 0; ok && d < ndim; d++)
        if (t->shape[d] != shape[d])
            ok = 0;
    if (!ok) {
        char got[96], exp[96];
        shape_str(t->shape, t->n_shape, got, sizeof got);
        shape_str(shape, (size_t)ndim, exp, sizeof exp);
        snprintf(err, errlen, "%s is %s %s but the session expects %s %s", name,
                 wire_dtype_name(t->dtype), got, wire_dtype_name(dt), exp);
        return RA_ESHAPE;
    }
    *idx = i;
    return RA_OK;
}

/* ---- the header arena ------------------------------------------------------------------ */

typedef struct spill_block {
    struct spill_block *next;
    size_t pad; /* keeps the payload 16-byte aligned */
} spill_block;

static void *arena_alloc(void *data, size_t n)
{
    ratd_arena *a = data;
    n = (n + 15) & ~(size_t)15;
    if (a->used + n <= a->cap) {
        void *p = a->buf + a->used;
        a->used += n;
        return p;
    }
    spill_block *b = malloc(sizeof *b + n); /* this request only; the arena grows after it */
    if (!b)
        return NULL;
    b->next = a->spill;
    a->spill = b;
    a->spilled += n;
    return b + 1;
}

static void arena_free(void *data, void *p)
{
    (void)data; /* everything goes at once, at arena_reset */
    (void)p;
}

static void arena_reset(ratd_arena *a)
{
    for (spill_block *b = a->spill, *nx; b; b = nx) {
        nx = b->next;
        free(b);
    }
    a->spill = NULL;
    if (a->spilled) {
        size_t cap = a->cap + a->spilled;
        char *nb = malloc(cap);
        if (nb) {
            free(a->buf);
            a->buf = nb;
            a->cap = cap;
        }
    }
    a->spilled = 0;
    a->used = 0;
}

/* ---- the job pool ---------------------------------------------------------------------- */

static void job_free_push(ratd_server *s, ratd_job *j)
{
    ratd_job *old = __atomic_load_n(&s->free_shared, __ATOMIC_RELAXED);
    do
        j->next = old;
    while (!__atomic_compare_exchange_n(&s->free_shared, &old, j, 1, __ATOMIC_RELEASE,
                                        __ATOMIC_RELAXED));
}

/* One reference less on the job's reply frames (the I/O thread holds one too); at zero
 * the job and its buffers go back to the pool. Called from ZeroMQ's threads. */
static void job_unref(ratd_job *j)
{
    if (__atomic_sub_fetch(&j->frames, 1, __ATOMIC_ACQ_REL) != 0)
        return;
    ratd_server *s = j->srv;
    ratd_job_uncharge(s, j);
    job_free_push(s, j);
}

void ratd_job_frame_release(void *data, void *hint)
{
    (void)data;
    job_unref(hint);
}

static void job_work_done(ratd_work *w, int worker);

static ratd_job *job_get(ratd_server *s)
{
    if (!s->free_local) /* take everything released since the last time at once */
        s->free_local = __atomic_exchange_n(&s->free_shared, NULL, __ATOMIC_ACQUIRE);
    ratd_job *j = s->free_local;
    if (j) {
        s->free_local = j->next;
    } else {
        j = calloc(1, sizeof *j);
        if (!j)
            return NULL;
        j->srv = s;
        j->arena.pa.alloc = arena_alloc;
        j->arena.pa.free = arena_free;
        j->arena.pa.allocator_data = &j->arena;
        j->arena.cap = 4096;
        j->arena.buf = malloc(j->arena.cap);
        if (!j->arena.buf) {
            free(j);
            return NULL;
        }
        j->all_next = s->all_jobs;
        s->all_jobs = j;
    }
    j->next = NULL;
    j->kind = JOB_INLINE;
    j->n_sess = 0;
    j->n_tasks = 0;
    j->resubmit = 0;
    j->st = RA_OK;
    j->err[0] = 0;
    j->stored_tokens = 0;
    j->req_id = 0;
    j->type = 0;
    j->cl = NULL;
    j->charged = 0;
    j->t.phase = 0;
    j->work.fn = NULL;
    j->work.done = job_work_done;
    __atomic_store_n(&j->work.work_ns, 0, __ATOMIC_RELAXED);
    __atomic_store_n(&j->work.task_max_ns, 0, __ATOMIC_RELAXED);
    j->work.submit_ns = 0;
    __atomic_store_n(&j->frames, 1, __ATOMIC_RELAXED);
    return j;
}

static void job_destroy(ratd_job *j)
{
    ratd_buf *bufs[] = {&j->ss_buf,    &j->node_buf,  &j->tst,      &j->a.qcopy,   &j->a.o,
                        &j->a.lse,     &j->a.ids,     &j->a.sc,     &j->a.pos,     &j->a.cnt,
                        &j->a.pctx, /* the key parts' merge contexts (pscan) */
                        &j->t.bad,     &j->t.bad_at,  &j->t.bst,    &j->t.copy[0], &j->t.copy[1],
                        &j->t.copy[2], &j->t.copy[3], &j->t.copy[4], &j->t.copy[5],
                        &j->t.copy[6], &j->t.fault,   &j->t.grow};
    for (size_t i = 0; i < sizeof bufs / sizeof bufs[0]; i++)
        buf_free(bufs[i]);
    arena_reset(&j->arena);
    free(j->arena.buf);
    free(j);
}

/* ---- completion ------------------------------------------------------------------------ */

void ratd_job_complete(ratd_job *j)
{
    ratd_server *s = j->srv;
    ratd_job *old = __atomic_load_n(&s->done_stack, __ATOMIC_RELAXED);
    do
        j->next = old;
    while (!__atomic_compare_exchange_n(&s->done_stack, &old, j, 1, __ATOMIC_RELEASE,
                                        __ATOMIC_RELAXED));
    if (!old) { /* the I/O thread reads the eventfd before it takes the stack */
        uint64_t one = 1;
        ssize_t w = write(s->efd, &one, sizeof one);
        (void)w;
    }
}

static void job_work_done(ratd_work *w, int worker)
{
    (void)worker;
    ratd_job_complete((ratd_job *)w);
}

static void ready_push(ratd_server *s, ratd_job *j)
{
    j->next = NULL;
    if (s->ready_tail)
        s->ready_tail->next = j;
    else
        s->ready = j;
    s->ready_tail = j;
}

/* ---- replies ----------------------------------------------------------------------------- */

static void peer_str(zmq_msg_t *id, char *buf, size_t len)
{
    const unsigned char *d = zmq_msg_data(id);
    size_t n = zmq_msg_size(id), o = 0;
    for (size_t i = 0; i < n && o + 3 < len; i++)
        o += (size_t)snprintf(buf + o, len - o, "%02x", d[i]);
    if (!n)
        snprintf(buf, len, "?");
}

/* RATD_TIMELINE=N (a study knob): every N-th request that ran on the pool logs where its
 * time went, in µs from its arrival: its submission to the pool, the start of its last
 * task, the end of its last task, and its reply (at warn level: asked for, and shown at
 * the level ratd-bench-decode gives its private daemon) */
static void log_timeline(const ratd_job *j, double us, uint64_t work_us, uint64_t task_max_us)
{
    double a = j->t_arrive * 1e9;
    double sub = ((double)j->work.submit_ns - a) / 1e3;
    double st = ((double)__atomic_load_n(&j->work.start_last_ns, __ATOMIC_RELAXED) - a) / 1e3;
    double en = ((double)__atomic_load_n(&j->work.end_last_ns, __ATOMIC_RELAXED) - a) / 1e3;
    RA_WARN("timeline: request %llu (%s) of %d tasks: submitted %.0f, last task started %.0f, "
            "ended %.0f, reply %.0f us after arrival; work %llu us, longest task %llu us, "
            "%d tasks after another on one worker",
            (unsigned long long)j->req_id, ra_proto_type_name(j->type), j->n_tasks, sub, st, en, us,
            (unsigned long long)work_us, (unsigned long long)task_max_us,
            __atomic_load_n(&j->work.repeats, __ATOMIC_RELAXED));
}

/* Sends j's reply (parts only with RA_OK), counts it, and releases the request. */
static void reply(ratd_server *s, ratd_job *j, Ratd__Header *rep, ra_status st,
                  ra_proto_part *parts, int n_parts)
{
    rep->version = RA_PROTO_VERSION;
    rep->request_id = j->req_id;
    rep->type = (Ratd__MsgType)j->type;
    rep->status = (int32_t)st;
    if (st != RA_OK) {
        s->errors++;
        rep->message = j->err;
        /* a WaitReady slice that ends before the builds is routine, not a warning */
        ra_log(st == RA_ETIMEDOUT && j->type == RATD__MSG_TYPE__WAIT_READY ? RA_LOG_DEBUG
                                                                           : RA_LOG_WARN,
               "request %llu (%s) session %llu layer %u from client %s: %s: %s",
               (unsigned long long)j->req_id, ra_proto_type_name(j->type),
               (unsigned long long)rep->session, rep->layer, j->peer, ra_strerror(st), j->err);
    }
    int lent = 0;
    for (int i = 0; i < n_parts; i++) {
        s->bytes_out += parts[i].bytes;
        lent += parts[i].give == RA_PROTO_LEND;
    }
    double us = (ra_now_s() - j->t_arrive) * 1e6;
    uint64_t work_us = __atomic_load_n(&j->work.work_ns, __ATOMIC_RELAXED) / 1000;
    uint64_t task_max_us = __atomic_load_n(&j->work.task_max_ns, __ATOMIC_RELAXED) / 1000;
    if (j->work.submit_ns && s->timeline > 0 && ++s->timeline_n % (unsigned)s->timeline == 0)
        log_timeline(j, us, work_us, task_max_us);
    rep->server_us = us < 4e9 ? (uint32_t)us : UINT32_MAX;
    rep->work_us = work_us < UINT32_MAX ? (uint32_t)work_us : UINT32_MAX;
    rep->task_max_us = task_max_us < UINT32_MAX ? (uint32_t)task_max_us : UINT32_MAX;
    __atomic_add_fetch(&j->frames, lent, __ATOMIC_RELAXED); /* released by the frames */
    /* never wait: a client that does not read must not hold the loop */
    if (ra_proto_send_lend_flags(s->sock, &j->msg.frames[0], j->delim, rep, parts, n_parts,
                                 ratd_job_frame_release, j, ZMQ_DONTWAIT) < 0) {
        if (errno == EAGAIN)
            ratd_peer_reply_dropped(s, j);
        else if (errno == EHOSTUNREACH)
            RA_WARN("request %llu (%s): client %s went away before its reply; reply dropped",
                    (unsigned long long)j->req_id, ra_proto_type_name(j->type), j->peer);
        else
            RA_WARN("request %llu (%s): reply to client %s failed: %s",
                    (unsigned long long)j->req_id, ra_proto_type_name(j->type), j->peer,
                    zmq_strerror(errno));
    }
    if (j->type >= 1 && j->type <= RATD_N_OPS) {
        op_stat *o = &s->op_stats[j->type - 1];
        o->count++;
        o->errors += st != RA_OK;
        o->total_us += (uint64_t)us;
        if ((uint64_t)us > o->max_us)
            o->max_us = (uint64_t)us;
    }
    ratd_ops_on_reply(s, j->type, st, (uint64_t)us);
    ra_proto_view_free(&j->v);
    arena_reset(&j->arena);
    ra_proto_msg_close(&j->msg);
    job_unref(j); /* the I/O thread's reference */
}

void ratd_reply(ratd_server *s, ratd_job *j, Ratd__Header *rep, ra_status st)
{
    reply(s, j, rep, st, NULL, 0);
}

static void reply_status(ratd_server *s, ratd_job *j, ra_status st)
{
    Ratd__Header rep = RATD__HEADER__INIT;
    if (j->v.hdr) {
        rep.session = j->v.hdr->session;
        rep.layer = j->v.hdr->layer;
    }
    reply(s, j, &rep, st, NULL, 0);
}

/* ---- lanes --------------------------------------------------------------------------- */

static void dispatch(ratd_server *s, ratd_job *j)
{
    for (int i = 0; i < j->n_sess; i++) { /* state checks run in lane order */
        ra_status st = ratd_session_check_layer(j->ss[i], j->layer, j->err, sizeof j->err);
        if (st != RA_OK) {
            j->st = st;
            ready_push(s, j);
            return;
        }
    }
    ratd_pool_submit(s->pool, &j->work, j->n_tasks);
}

static void enqueue(ratd_server *s, ratd_job *j)
{
    s->active++;
    j->waiting = j->n_sess;
    for (int i = 0; i < j->n_sess; i++) {
        ratd_session *ss = j->ss[i];
        ratd_lane *l = &ss->lanes[j->layer];
        ratd_lane_node *nd = &j->nodes[i];
        ss->refs++;
        ss->last_used = j->t_arrive;
        nd->job = j;
        nd->next = NULL;
        if (l->tail) {
            l->tail->next = nd;
        } else {
            l->head = nd;
            j->waiting--;
        }
        l->tail = nd;
    }
    if (j->waiting == 0)
        dispatch(s, j);
}

static void finish(ratd_server *s, ratd_job *j)
{
    for (int i = 0; i < j->n_sess; i++) { /* start the lanes' next jobs first */
        ratd_lane *l = &j->ss[i]->lanes[j->layer];
        l->head = l->head->next;
        if (!l->head)
            l->tail = NULL;
        else if (--l->head->job->waiting == 0)
            dispatch(s, l->head->job);
    }
    if (j->st == RA_OK && j->stored_tokens) {
        ratd_session *ss = j->ss[0];
        ss->tokens += j->stored_tokens;
        if (ratd_session_find(s, ss->id) == ss) /* not dropped meanwhile */
            s->tokens += j->stored_tokens;
    }
    Ratd__Header rep = RATD__HEADER__INIT;
    rep.session = j->v.hdr->session;
    rep.layer = j->v.hdr->layer;
    ra_proto_part parts[6];
    int n = j->st == RA_OK && j->kind == JOB_ATTEND ? ratd_attend_reply(j, parts) : 0;
    int n_sess = j->n_sess;
    reply(s, j, &rep, j->st, parts, n);
    s->active--;
    for (int i = 0; i < n_sess; i++) /* the job's buffers stay ours until it is reused */
        ratd_session_unref(s, j->ss[i]);
}

static void drain_completions(ratd_server *s)
{
    ratd_job *list = __atomic_exchange_n(&s->done_stack, NULL, __ATOMIC_ACQUIRE);
    ratd_job *fifo = NULL;
    while (list) { /* the stack is newest first */
        ratd_job *nx = list->next;
        list->next = fifo;
        fifo = list;
        list = nx;
    }
    while (fifo) {
        ratd_job *nx = fifo->next;
        ready_push(s, fifo);
        fifo = nx;
    }
    while (s->ready) {
        ratd_job *j = s->ready;
        s->ready = j->next;
        if (!s->ready)
            s->ready_tail = NULL;
        if (j->resubmit) { /* a next phase (Offload/Append: the stores after the checks) */
            j->resubmit = 0;
            ratd_pool_submit(s->pool, &j->work, j->n_tasks);
            continue;
        }
        finish(s, j);
    }
}

/* ---- requests answered on the I/O thread ------------------------------------------ */

static void do_hello(ratd_server *s, Ratd__Header *rep, Ratd__HelloReply *hr, Ratd__Limits *lm)
{
    hr->capabilities = CAP_F16 | CAP_BF16 | CAP_GRAPH | CAP_FAISS | CAP_TOPK | CAP_BATCH |
                       CAP_GRAPH_ADJ |
                       (ratd_pool_bound(s->pool) ? CAP_NUMA : 0u);
    hr->server_version = (char *)RATD_VERSION;
    hr->workers = (uint32_t)ratd_pool_workers(s->pool);
    hr->numa_node = ratd_pool_numa_node(s->pool);
    hr->instance_id = s->instance_id;
    lm->max_frame_bytes = s->cfg.max_frame_bytes;
    lm->max_message_bytes = s->cfg.max_message_bytes;
    lm->mem_limit = s->cfg.mem_limit;
    lm->max_sessions = (uint32_t)s->cfg.max_sessions;
    lm->max_layers = (uint32_t)s->cfg.max_layers;
    lm->max_heads = (uint32_t)s->cfg.max_heads;
    lm->max_dim = (uint32_t)s->cfg.max_dim;
    lm->max_top_k = (uint32_t)s->cfg.max_top_k;
    lm->max_tokens = (uint32_t)s->cfg.max_tokens;
    lm->max_queries = (uint32_t)s->cfg.max_queries;
    lm->max_batch = (uint32_t)s->cfg.max_batch;
    lm->max_queue = (uint32_t)s->cfg.max_queue;
    hr->limits = lm;
    rep->hello = hr; /* also sent with a version refusal: the client sees our limits */
}

static ra_status do_stats(ratd_server *s, ratd_job *j, Ratd__StatsReply *sr, Ratd__OpStats *os,
                          Ratd__OpStats **osp)
{
    uint64_t sid = j->v.hdr->session;
    if (sid) { /* one session's index state */
        const ProtobufCBinaryData *tok = &j->v.hdr->token;
        ratd_session *ss =
            ratd_session_get(s, sid, tok->data, tok->len, j->peer, j->err, sizeof j->err);
        if (!ss) {
            j->st = RA_ENOSESSION;
            return RA_ENOSESSION;
        }
        sr->session_tokens = ss->tokens;
        sr->session_bytes = __atomic_load_n(&ss->mem.used, __ATOMIC_RELAXED);
        for (int i = 0; i < ss->n_layers * ss->n_kv; i++) {
            ra_head *h = __atomic_load_n(&ss->heads[i], __ATOMIC_ACQUIRE);
            if (!h)
                continue;
            sr->heads += ra_head_count(h) > 0 ? 1u : 0u; /* holding tokens */
            sr->heads_ready += ra_head_ready(h) ? 1u : 0u;
            sr->heads_building += ra_head_building(h) ? 1u : 0u;
        }
    }
    sr->sessions = (uint64_t)s->n_sessions;
    sr->requests = s->requests;
    sr->errors = s->errors;
    sr->bad_messages = s->bad_messages;
    sr->bytes_in = s->bytes_in;
    sr->bytes_out = s->bytes_out;
    sr->mem_used = __atomic_load_n(&s->mem.used, __ATOMIC_RELAXED);
    sr->mem_limit = s->mem.limit;
    sr->tokens = s->tokens;
    sr->uptime_s = ra_now_s() - s->t0;
    sr->clients = (uint32_t)s->clients;
    sr->max_clients = (uint32_t)s->max_clients;
    sr->listener_pauses = s->listener_pauses;
    sr->replies_dropped = s->replies_dropped;
    sr->sessions_expired = s->sessions_expired;
    sr->tokens_refused = s->tokens_refused;
    sr->reply_bytes = __atomic_load_n(&s->reply_bytes, __ATOMIC_RELAXED);
    sr->curve_refused = __atomic_load_n(&s->curve_refused, __ATOMIC_RELAXED);
    for (int i = 0; i < RATD_N_OPS; i++) {
        ratd__op_stats__init(&os[i]);
        os[i].count = s->op_stats[i].count;
        os[i].errors = s->op_stats[i].errors;
        os[i].total_us = s->op_stats[i].total_us;
        os[i].max_us = s->op_stats[i].max_us;
        osp[i] = &os[i];
    }
    sr->n_ops = RATD_N_OPS;
    sr->ops = osp;
    return RA_OK;
}

/* Hello, CreateSession, DropSession, Stats: session-wide, cheap, answered in order. */
static void handle_inline(ratd_server *s, ratd_job *j, int version_ok)
{
    Ratd__Header rep = RATD__HEADER__INIT;
    Ratd__HelloReply hr = RATD__HELLO_REPLY__INIT;
    Ratd__Limits lm = RATD__LIMITS__INIT;
    Ratd__StatsReply sr = RATD__STATS_REPLY__INIT;
    Ratd__OpStats os[RATD_N_OPS];
    Ratd__OpStats *osp[RATD_N_OPS];
    uint8_t tok[RATD_TOKEN_BYTES];
    Ratd__Header *hd = j->v.hdr;
    rep.session = hd->session;
    rep.layer = hd->layer;
    ra_status st = RA_OK;
    if (!version_ok) {
        ratd_job_set_err(j, RA_EVERSION,
                         "the client speaks protocol version %u, this ratd speaks version %u; "
                         "use a client and a daemon of the same protocol version",
                         hd->version, RA_PROTO_VERSION);
        st = RA_EVERSION;
        if (j->type == RATD__MSG_TYPE__HELLO)
            do_hello(s, &rep, &hr, &lm);
        reply(s, j, &rep, st, NULL, 0);
        return;
    }
    switch (j->type) {
    case RATD__MSG_TYPE__HELLO:
        do_hello(s, &rep, &hr, &lm);
        break;
    case RATD__MSG_TYPE__CREATE_SESSION: {
        uint64_t id = 0;
        st = ratd_session_create(s, hd->create, j->peer, &id, tok, j->err, sizeof j->err);
        if (st == RA_OK) {
            rep.session = id;
            rep.token.data = tok;
            rep.token.len = RATD_TOKEN_BYTES;
        }
        break;
    }
    case RATD__MSG_TYPE__DROP_SESSION:
        st = ratd_session_drop(s, hd->session, hd->token.data, hd->token.len, j->peer, j->err,
                               sizeof j->err);
        break;
    case RATD__MSG_TYPE__STATS:
        ratd_ops_trim(s); /* before the figures: mem and RSS read after this are settled */
        st = do_stats(s, j, &sr, os, osp);
        if (st == RA_OK)
            rep.stats = &sr;
        break;
    default:
        if (ratd_ops_owns(j->type)) { /* ListSessions, GetConfig, WaitReady */
            ratd_ops_handle(s, j);
            return;
        }
        ratd_job_set_err(j, RA_EPROTO, "unknown request type %d", j->type);
        st = RA_EPROTO;
        s->bad_messages++;
        break;
    }
    reply(s, j, &rep, st, NULL, 0);
}

static void on_message(ratd_server *s, ratd_job *j)
{
    j->t_arrive = ra_now_s();
    s->requests++;
    s->bytes_in += j->msg.total_bytes;
    peer_str(&j->msg.frames[0], j->peer, sizeof j->peer);
    j->cl = ratd_peer_get(s, &j->msg.frames[0], j->t_arrive);
    if (j->cl)
        __atomic_add_fetch(&j->cl->refs, 1, __ATOMIC_RELAXED);
    /* REQ clients put an empty delimiter before the header; DEALER clients do not */
    j->delim = j->msg.n >= 3 && zmq_msg_size(&j->msg.frames[1]) == 0;
    ra_status st = ra_proto_parse_with(&j->msg, 1 + j->delim, &s->lim, &j->arena.pa, &j->v,
                                       &j->req_id, &j->type, j->err, sizeof j->err);
    if (st != RA_OK) {
        s->bad_messages++;
        reply_status(s, j, st);
        return;
    }
    int version_ok = j->v.hdr->version == RA_PROTO_VERSION;
    int is_job = j->type == RATD__MSG_TYPE__OFFLOAD || j->type == RATD__MSG_TYPE__APPEND ||
                 j->type == RATD__MSG_TYPE__ATTEND;
    if (!is_job || !version_ok) {
        handle_inline(s, j, version_ok);
        return;
    }
    if (s->active >= s->cfg.max_queue) {
        ratd_job_set_err(j, RA_EBUSY,
                         "%d requests are already queued or running, the limit set by "
                         "--max-queue; retry later, or start ratd with a larger --max-queue",
                         s->active);
        reply_status(s, j, RA_EBUSY);
        return;
    }
    st = j->type == RATD__MSG_TYPE__ATTEND ? ratd_attend_accept(s, j) : ratd_tokens_accept(s, j);
    if (st != RA_OK || j->n_tasks == 0) { /* refused, or nothing to do */
        reply_status(s, j, st);
        return;
    }
    enqueue(s, j);
}

/* Receives and handles one message; 0 when none is waiting. */
static int receive_one(ratd_server *s)
{
    ratd_job *j = job_get(s);
    if (!j) {
        RA_ERROR("out of memory for a request; the daemon answers it later");
        return 0;
    }
    if (ra_proto_recv(s->sock, &j->msg, ZMQ_DONTWAIT) < 0) {
        if (errno != EAGAIN && errno != EINTR)
            RA_ERROR("receive: %s", zmq_strerror(errno));
        j->next = s->free_local; /* unused: straight back */
        s->free_local = j;
        return 0;
    }
    on_message(s, j);
    return 1;
}

/* ---- the loop ---------------------------------------------------------------------- */

/* One poll of the eventfd and (burst > 0) the socket; then completions, then up to
 * `burst` requests. Returns the requests handled, or -1 when the socket is unusable. */
static int serve_once(ratd_server *s, int timeout_ms, int burst, volatile sig_atomic_t *stop)
{
    /* while accepting is paused, the I/O thread refuses the waiting connections */
    zmq_pollitem_t it[4] = {{NULL, s->efd, ZMQ_POLLIN, 0},
                            {s->mon, 0, ZMQ_POLLIN, 0},
                            {NULL, s->paused ? s->listen_fd : -1, ZMQ_POLLIN, 0},
                            {s->sock, 0, ZMQ_POLLIN, 0}};
    timeout_ms = ratd_ops_tick(s, timeout_ms);
    int rc = zmq_poll(it, burst > 0 ? 4 : 3, s->ready ? 0 : timeout_ms);
    if (rc < 0) {
        if (errno == EINTR)
            return 0;
        RA_ERROR("poll: %s", zmq_strerror(errno));
        return -1;
    }
    if ((it[1].revents | it[2].revents) & ZMQ_POLLIN)
        ratd_listen_events(s);
    double now = ra_now_s();
    if (now >= s->next_sweep) {
        ratd_session_expire(s, now);
        ratd_peer_sweep(s, now, 60.0);
        s->next_sweep = now + 1.0;
    }
    if (it[0].revents & ZMQ_POLLIN) {
        uint64_t x;
        ssize_t r = read(s->efd, &x, sizeof x);
        (void)r;
    }
    drain_completions(s);
    int n = 0;
    if (burst > 0 && (it[3].revents & ZMQ_POLLIN))
        for (; n < burst && !(stop && *stop); n++) {
            if (!receive_one(s))
                break;
            if ((n & 15) == 15) /* a long burst: let finished jobs out meanwhile */
                drain_completions(s);
        }
    if (s->ready) /* refused when they became first in their lanes: answer now */
        drain_completions(s);
    return n;
}

ra_status ratd_server_create(ratd_server **out, const ratd_config *cfg, char *err, size_t errlen)
{
    ratd_server *s = calloc(1, sizeof *s);
    if (!s) {
        snprintf(err, errlen, "out of memory");
        return RA_ENOMEM;
    }
    ra_status st;
    s->cfg = *cfg;
    s->efd = -1;
    s->listen_fd = s->zmq_fd = s->idle_fd = s->spare_fd = -1;
    s->mem.limit = cfg->mem_limit;
    s->lim.max_frame_bytes = cfg->max_frame_bytes;
    s->lim.max_message_bytes = cfg->max_message_bytes;
    s->t0 = ra_now_s();
    s->timeline = cfg->timeline;
    ra_index_opts probe; /* --index-threads against the index's own bound */
    memset(&probe, 0, sizeof probe);
    probe.threads = cfg->index_threads;
    if ((st = ra_index_opts_check(&probe, err, errlen)) != RA_OK)
        goto fail;
    st = ratd_pool_create(&s->pool, cfg->workers, cfg->numa_node, cfg->cpuset, err, errlen);
    if (st == RA_OK)
        ratd_pool_set_spin(s->pool, cfg->spin_us);
    if (st == RA_OK && cfg->pin_workers) {
        char perr[256];
        if (ratd_pool_pin_workers(s->pool, perr, sizeof perr) != RA_OK)
            RA_WARN("%s; the workers move freely", perr);
    }
    if (st != RA_OK)
        goto fail;
    if ((s->efd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC)) < 0) {
        snprintf(err, errlen, "eventfd: %s", strerror(errno));
        st = RA_EIO;
        goto fail;
    }
    if ((st = ratd_reaper_start(s, err, errlen)) != RA_OK)
        goto fail;
    if (ratd_random(&s->instance_id, sizeof s->instance_id) != RA_OK) {
        snprintf(err, errlen, "the kernel has no random bytes (getrandom)");
        st = RA_EIO;
        goto fail;
    }
    s->ctx = zmq_ctx_new();
    if (!s->ctx || !(s->sock = zmq_socket(s->ctx, ZMQ_ROUTER))) {
        snprintf(err, errlen, "zmq: %s", zmq_strerror(errno));
        st = RA_EIO;
        goto fail;
    }
    if ((st = ratd_curve_setup(s, err, errlen)) != RA_OK)
        goto fail;
    if ((st = ratd_listen_bind(s, err, errlen)) != RA_OK)
        goto fail;
    if ((st = ratd_ops_create(s, err, errlen)) != RA_OK)
        goto fail;
    *out = s;
    return RA_OK;
fail:
    ratd_server_destroy(s);
    return st;
}

int ratd_server_run(ratd_server *s, volatile sig_atomic_t *stop)
{
    RA_INFO("ratd %s listening on %s (protocol %u, %d workers, queue %d, placement: %s, memory "
            "limit %s, up to %d clients, %s, instance %016llx)",
            RATD_VERSION, s->bound, RA_PROTO_VERSION, ratd_pool_workers(s->pool), s->cfg.max_queue,
            ratd_pool_placement(s->pool), s->cfg.mem_limit ? "set" : "none", s->max_clients,
            s->zap ? "CURVE" : "no CURVE", (unsigned long long)s->instance_id);
    /* --spin-us: while requests are in flight the I/O thread polls without sleeping for
     * that long, so that a finished job's reply does not wait for the thread to wake */
    double spin_until = 0;
    while (!*stop) {
        int t = 250;
        if (s->cfg.spin_us > 0 && s->active > 0) {
            double now = ra_now_s();
            if (spin_until == 0)
                spin_until = now + s->cfg.spin_us * 1e-6;
            if (now < spin_until)
                t = 0;
        } else {
            spin_until = 0;
        }
        if (serve_once(s, t, 64, stop) < 0)
            break;
    }
    /* Drain: requests already on their way are taken as usual, until the socket has
     * been quiet for 100 ms (bounded, so that a flood cannot hold the shutdown); then
     * every job in flight finishes and is answered. Jobs never wait for a build. */
    int drained = 0;
    double until = ra_now_s() + 2.0, quiet = ra_now_s() + 0.1;
    while (drained < 1024 && ra_now_s() < until && ra_now_s() < quiet) {
        int n = serve_once(s, 20, 1024 - drained, NULL);
        if (n < 0)
            break;
        if (n > 0)
            quiet = ra_now_s() + 0.1;
        drained += n;
    }
    while (s->active > 0 || s->ready)
        if (serve_once(s, 100, 0, NULL) < 0)
            break;
    ratd_ops_flush(s); /* parked WaitReady requests: RA_ECLOSED */
    RA_INFO("stopping: %d sessions, %llu requests served (%d drained)", s->n_sessions,
            (unsigned long long)s->requests, drained);
    /* every session goes; builds are cancelled and given a bounded time to end */
    return ratd_reaper_finish(s, 3.0) == 0 ? 0 : 1;
}

void ratd_server_abandon(ratd_server *s)
{
    if (s && s->ipc_path[0])
        unlink(s->ipc_path);
}

void ratd_server_destroy(ratd_server *s)
{
    if (!s)
        return;
    ratd_reaper_finish(s, 3.0);
    ratd_ops_flush(s);
    ratd_ops_destroy(s); /* the metrics thread first: it reads the server */
    ratd_pool_destroy(s->pool); /* no job is in flight: leftover tickets find nothing */
    ratd_listen_close(s);
    if (s->sock)
        zmq_close(s->sock);
    ratd_curve_stop(s);
    if (s->ctx)
        zmq_ctx_term(s->ctx); /* releases reply frames still queued: jobs back to the pool */
    ratd_listen_release(s);
    ratd_peer_sweep(s, 0, -1);
    free(s->curve_keys);
    for (ratd_job *j = s->all_jobs, *nx; j; j = nx) {
        nx = j->all_next;
        job_destroy(j);
    }
    free(s->sessions);
    if (s->efd >= 0)
        close(s->efd);
    if (s->ipc_path[0])
        unlink(s->ipc_path);
    free(s);
}
