/* libratd-client (include/ratd/client.h): one DEALER socket per client, request ids
 * chosen here and echoed by the daemon. Replies are matched by id: a reply for an
 * outstanding asynchronous attend that arrives while another call waits is parked in
 * that ticket's slot; replies nobody waits for any more (timed out, cancelled) are
 * dropped. Replies are validated like requests are in the daemon (ra_proto_parse),
 * so a confused or hostile daemon cannot make us write outside the caller's arrays. */
#include "ratd/client.h"

#include <errno.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <zmq.h>

#include "ra_log.h"
#include "ra_proto.h"

typedef struct ra_reply {
    ra_proto_msg m;
    ra_proto_view v;
} ra_reply;

typedef struct pending {
    uint64_t id; /* 0: free slot */
    int n_q, dim, k, want;
    ra_reply *reply; /* parked, when it arrived during another wait */
} pending;

struct ra_client {
    void *ctx, *sock;
    int timeout_ms;
    int max_inflight;
    uint64_t next_id;
    pending *pend;
    char err[512];
};

static ra_status fail(ra_client *c, ra_status st, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
static ra_status fail(ra_client *c, ra_status st, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(c->err, sizeof c->err, fmt, ap);
    va_end(ap);
    return st;
}

static void reply_free(ra_reply *r)
{
    if (!r)
        return;
    ra_proto_view_free(&r->v);
    ra_proto_msg_close(&r->m);
    free(r);
}

void ra_client_opts_default(ra_client_opts *o)
{
    memset(o, 0, sizeof *o);
    o->timeout_ms = 30000;
    o->max_inflight = 64;
}

void ra_session_desc_init(ra_session_desc *d)
{
    memset(d, 0, sizeof *d);
    d->dtype = RA_DTYPE_F16;
    d->index.kind = RA_CLIENT_INDEX_GRAPH;
}

const char *ra_op_name(ra_op op)
{
    static const char *n[] = {"hello", "create", "offload", "append", "attend", "drop", "stats"};
    return (unsigned)op < RA_OP_COUNT ? n[op] : "?";
}

ra_status ra_client_open(ra_client **out, const char *endpoint, const ra_client_opts *opts)
{
    if (!out || !endpoint)
        return RA_EINVAL;
    ra_client_opts o;
    ra_client_opts_default(&o);
    if (opts) {
        if (opts->timeout_ms > 0)
            o.timeout_ms = opts->timeout_ms;
        if (opts->max_inflight > 0)
            o.max_inflight = opts->max_inflight;
    }
    ra_client *c = calloc(1, sizeof *c);
    if (!c)
        return RA_ENOMEM;
    c->timeout_ms = o.timeout_ms;
    c->max_inflight = o.max_inflight;
    c->next_id = 1;
    c->pend = calloc((size_t)o.max_inflight, sizeof *c->pend);
    c->ctx = zmq_ctx_new();
    if (!c->pend || !c->ctx)
        goto fail;
    c->sock = zmq_socket(c->ctx, ZMQ_DEALER);
    if (!c->sock)
        goto fail;
    int linger = 0;
    zmq_setsockopt(c->sock, ZMQ_LINGER, &linger, sizeof linger);
    zmq_setsockopt(c->sock, ZMQ_SNDTIMEO, &c->timeout_ms, sizeof c->timeout_ms);
    if (zmq_connect(c->sock, endpoint) != 0)
        goto fail;
    *out = c;
    return RA_OK;
fail:
    ra_client_close(c);
    return RA_EINVAL; /* a malformed endpoint, the common case */
}

void ra_client_close(ra_client *c)
{
    if (!c)
        return;
    if (c->pend)
        for (int i = 0; i < c->max_inflight; i++)
            reply_free(c->pend[i].reply);
    free(c->pend);
    if (c->sock)
        zmq_close(c->sock);
    if (c->ctx)
        zmq_ctx_term(c->ctx);
    free(c);
}

const char *ra_client_errmsg(const ra_client *c) { return c ? c->err : "no client"; }

void ra_client_set_timeout(ra_client *c, int timeout_ms)
{
    c->timeout_ms = timeout_ms > 0 ? timeout_ms : 30000;
    zmq_setsockopt(c->sock, ZMQ_SNDTIMEO, &c->timeout_ms, sizeof c->timeout_ms);
}

/* ---- request / reply ---------------------------------------------------------------- */

static ra_status send_req(ra_client *c, Ratd__Header *h, ra_proto_part *parts, int n,
                          uint64_t *id)
{
    h->version = RA_PROTO_VERSION;
    h->request_id = c->next_id++;
    if (ra_proto_send(c->sock, NULL, 0, h, parts, n) < 0) {
        if (errno == EAGAIN)
            return fail(c, RA_ETIMEDOUT, "sending the request timed out (is ratd running?)");
        return fail(c, RA_EIO, "sending the request failed: %s", zmq_strerror(errno));
    }
    *id = h->request_id;
    return RA_OK;
}

static pending *find_pending(ra_client *c, uint64_t id)
{
    for (int i = 0; i < c->max_inflight; i++)
        if (c->pend[i].id == id)
            return &c->pend[i];
    return NULL;
}

/* Waits for the reply to `id`; parks replies of other outstanding tickets. */
static ra_status wait_reply(ra_client *c, uint64_t id, int timeout_ms, ra_reply **out)
{
    double deadline = ra_now_s() + timeout_ms / 1000.0;
    for (;;) {
        int left = (int)((deadline - ra_now_s()) * 1000.0 + 0.5);
        if (left < 0)
            left = 0;
        zmq_pollitem_t it = {c->sock, 0, ZMQ_POLLIN, 0};
        int rc = zmq_poll(&it, 1, left);
        if (rc < 0) {
            if (errno == EINTR)
                continue;
            return fail(c, RA_EIO, "poll: %s", zmq_strerror(errno));
        }
        if (rc == 0)
            return fail(c, RA_ETIMEDOUT,
                        "no reply from ratd within %d ms (daemon down, busy, or the request "
                        "was dropped)",
                        timeout_ms);
        ra_reply *r = calloc(1, sizeof *r);
        if (!r)
            return fail(c, RA_ENOMEM, "out of memory");
        if (ra_proto_recv(c->sock, &r->m, ZMQ_DONTWAIT) < 0) {
            free(r);
            continue;
        }
        char err[RA_PROTO_ERRLEN];
        uint64_t rid = 0;
        ra_status st = ra_proto_parse(&r->m, 0, NULL, &r->v, &rid, NULL, err, sizeof err);
        if (st != RA_OK) {
            if (rid == id) {
                reply_free(r);
                return fail(c, RA_EPROTO, "malformed reply from ratd: %s", err);
            }
            reply_free(r); /* unmatched garbage: nothing to attribute it to */
            continue;
        }
        if (rid == id) {
            *out = r;
            return RA_OK;
        }
        pending *p = find_pending(c, rid);
        if (p && !p->reply && rid != 0)
            p->reply = r;
        else
            reply_free(r); /* a late reply to an abandoned request */
    }
}

/* Status of a parsed reply; the daemon's message becomes the client's error text. */
static ra_status reply_status(ra_client *c, ra_reply *r)
{
    int32_t s = r->v.hdr->status;
    if (s == 0)
        return RA_OK;
    if (s < 0 || s > RA_ESTATE)
        return fail(c, RA_EPROTO, "ratd answered with unknown status %d: %s", s,
                    r->v.hdr->message ? r->v.hdr->message : "");
    return fail(c, (ra_status)s, "%s", r->v.hdr->message && *r->v.hdr->message
                                           ? r->v.hdr->message
                                           : ra_strerror((ra_status)s));
}

static ra_status call(ra_client *c, Ratd__Header *h, ra_proto_part *parts, int n,
                      ra_reply **out)
{
    uint64_t id = 0;
    ra_status st = send_req(c, h, parts, n, &id);
    if (st != RA_OK)
        return st;
    ra_reply *r;
    if ((st = wait_reply(c, id, c->timeout_ms, &r)) != RA_OK)
        return st;
    if ((st = reply_status(c, r)) != RA_OK) {
        reply_free(r);
        return st;
    }
    *out = r;
    return RA_OK;
}

/* ---- Hello / sessions / stats ------------------------------------------------------ */

ra_status ra_client_hello(ra_client *c, ra_server_info *info)
{
    if (!c)
        return RA_EINVAL;
    Ratd__Header h = RATD__HEADER__INIT;
    h.type = RATD__MSG_TYPE__HELLO;
    ra_reply *r;
    ra_status st = call(c, &h, NULL, 0, &r);
    if (st != RA_OK)
        return st;
    const Ratd__HelloReply *hr = r->v.hdr->hello;
    if (info) {
        memset(info, 0, sizeof *info);
        info->protocol_version = r->v.hdr->version;
        if (hr) {
            info->capabilities = hr->capabilities;
            snprintf(info->server_version, sizeof info->server_version, "%s",
                     hr->server_version ? hr->server_version : "");
            info->workers = hr->workers;
            info->numa_node = hr->numa_node;
            const Ratd__Limits *l = hr->limits;
            if (l) {
                info->limits.max_frame_bytes = l->max_frame_bytes;
                info->limits.max_message_bytes = l->max_message_bytes;
                info->limits.mem_limit = l->mem_limit;
                info->limits.max_sessions = l->max_sessions;
                info->limits.max_layers = l->max_layers;
                info->limits.max_heads = l->max_heads;
                info->limits.max_dim = l->max_dim;
                info->limits.max_top_k = l->max_top_k;
                info->limits.max_tokens = l->max_tokens;
                info->limits.max_queries = l->max_queries;
            }
        }
    }
    reply_free(r);
    c->err[0] = 0;
    return RA_OK;
}

ra_status ra_client_session_create(ra_client *c, const ra_session_desc *d, uint64_t *session)
{
    if (!c || !d || !session)
        return c ? fail(c, RA_EINVAL, "NULL argument") : RA_EINVAL;
    if (d->n_layers <= 0 || d->n_q_heads <= 0 || d->n_kv_heads <= 0 || d->head_dim <= 0 ||
        (int)d->index.kind < 0)
        return fail(c, RA_EINVAL, "session sizes must be positive");
    Ratd__Header h = RATD__HEADER__INIT;
    Ratd__CreateSession cs = RATD__CREATE_SESSION__INIT;
    Ratd__IndexOptions io = RATD__INDEX_OPTIONS__INIT;
    h.type = RATD__MSG_TYPE__CREATE_SESSION;
    cs.n_layers = (uint32_t)d->n_layers;
    cs.n_q_heads = (uint32_t)d->n_q_heads;
    cs.n_kv_heads = (uint32_t)d->n_kv_heads;
    cs.head_dim = (uint32_t)d->head_dim;
    cs.dtype = (Ratd__DType)d->dtype;
    io.kind = (uint32_t)d->index.kind;
#define CP(f) io.f = d->index.f > 0 ? (uint32_t)d->index.f : 0;
    CP(graph_knn) CP(graph_degree) CP(graph_build_ef) CP(graph_entries) CP(n_train)
        CP(ivf_nlist) CP(hnsw_m) CP(threads)
#undef CP
    io.seed = d->index.seed;
    cs.index = &io;
    h.create = &cs;
    ra_reply *r;
    ra_status st = call(c, &h, NULL, 0, &r);
    if (st != RA_OK)
        return st;
    uint64_t id = r->v.hdr->session;
    reply_free(r);
    if (!id)
        return fail(c, RA_EPROTO, "ratd created a session but sent no id");
    *session = id;
    c->err[0] = 0;
    return RA_OK;
}

ra_status ra_client_session_drop(ra_client *c, uint64_t session)
{
    if (!c)
        return RA_EINVAL;
    Ratd__Header h = RATD__HEADER__INIT;
    h.type = RATD__MSG_TYPE__DROP_SESSION;
    h.session = session;
    ra_reply *r;
    ra_status st = call(c, &h, NULL, 0, &r);
    if (st != RA_OK)
        return st;
    reply_free(r);
    c->err[0] = 0;
    return RA_OK;
}

ra_status ra_client_stats(ra_client *c, ra_server_stats *out)
{
    if (!c || !out)
        return c ? fail(c, RA_EINVAL, "NULL argument") : RA_EINVAL;
    Ratd__Header h = RATD__HEADER__INIT;
    h.type = RATD__MSG_TYPE__STATS;
    ra_reply *r;
    ra_status st = call(c, &h, NULL, 0, &r);
    if (st != RA_OK)
        return st;
    const Ratd__StatsReply *s = r->v.hdr->stats;
    if (!s) {
        reply_free(r);
        return fail(c, RA_EPROTO, "Stats reply without counters");
    }
    memset(out, 0, sizeof *out);
    out->sessions = s->sessions;
    out->requests = s->requests;
    out->errors = s->errors;
    out->bad_messages = s->bad_messages;
    out->bytes_in = s->bytes_in;
    out->bytes_out = s->bytes_out;
    out->mem_used = s->mem_used;
    out->mem_limit = s->mem_limit;
    out->tokens = s->tokens;
    out->uptime_s = s->uptime_s;
    for (size_t i = 0; i < s->n_ops && i < RA_OP_COUNT; i++) {
        out->ops[i].count = s->ops[i]->count;
        out->ops[i].errors = s->ops[i]->errors;
        out->ops[i].total_us = s->ops[i]->total_us;
        out->ops[i].max_us = s->ops[i]->max_us;
    }
    reply_free(r);
    c->err[0] = 0;
    return RA_OK;
}

/* ---- tokens ----------------------------------------------------------------------- */

static ra_status tokens(ra_client *c, uint64_t session, int layer, const ra_kv_batch *b,
                        int offload)
{
    if (!c || !b)
        return c ? fail(c, RA_EINVAL, "NULL argument") : RA_EINVAL;
    if (layer < 0)
        return fail(c, RA_ENOLAYER, "layer %d is negative", layer);
    if (b->n_kv_heads <= 0 || b->head_dim <= 0 || ra_dtype_size(b->dtype) == 0)
        return fail(c, RA_EINVAL, "n_kv_heads and head_dim must be positive, dtype known");
    if (b->n_tokens && (!b->k || !b->v || !b->pos))
        return fail(c, RA_EINVAL, "k, v and pos are required when n_tokens > 0");
    int with_q = offload && b->n_queries > 0;
    if (with_q && (!b->q_train || b->n_q_heads <= 0))
        return fail(c, RA_EINVAL, "q_train and n_q_heads are required when n_queries > 0");
    size_t es = ra_dtype_size(b->dtype);
    uint64_t G = (uint64_t)b->n_kv_heads, n = b->n_tokens, D = (uint64_t)b->head_dim;
    if (n > ((uint64_t)1 << 40) / (G * D))
        return fail(c, RA_ETOOBIG, "batch too large");
    size_t kvb = (size_t)(G * n * D) * es;
    Ratd__Header h = RATD__HEADER__INIT;
    h.type = offload ? RATD__MSG_TYPE__OFFLOAD : RATD__MSG_TYPE__APPEND;
    h.session = session;
    h.layer = (uint32_t)layer;
    ra_proto_part p[4] = {
        {RATD__ROLE__K, (Ratd__DType)b->dtype, 3, {G, n, D}, b->k, kvb, 0},
        {RATD__ROLE__V, (Ratd__DType)b->dtype, 3, {G, n, D}, b->v, kvb, 0},
        {RATD__ROLE__POS, RATD__DTYPE__I64, 1, {n}, b->pos, n * sizeof(int64_t), 0},
        {RATD__ROLE__Q_TRAIN, RATD__DTYPE__F32, 3, {(uint64_t)b->n_q_heads, b->n_queries, D},
         b->q_train, (size_t)b->n_q_heads * b->n_queries * (size_t)D * sizeof(float), 0},
    };
    ra_reply *r;
    ra_status st = call(c, &h, p, with_q ? 4 : 3, &r);
    if (st != RA_OK)
        return st;
    reply_free(r);
    c->err[0] = 0;
    return RA_OK;
}

ra_status ra_client_offload(ra_client *c, uint64_t session, int layer, const ra_kv_batch *b)
{
    return tokens(c, session, layer, b, 1);
}

ra_status ra_client_append(ra_client *c, uint64_t session, int layer, const ra_kv_batch *b)
{
    return tokens(c, session, layer, b, 0);
}

/* ---- attend ----------------------------------------------------------------------- */

ra_status ra_client_attend_send(ra_client *c, uint64_t session, int layer,
                                const ra_attend_req *rq, ra_ticket *ticket)
{
    if (!c || !rq || !ticket)
        return c ? fail(c, RA_EINVAL, "NULL argument") : RA_EINVAL;
    if (layer < 0)
        return fail(c, RA_ENOLAYER, "layer %d is negative", layer);
    if (rq->n_q_heads <= 0 || rq->head_dim <= 0 || !rq->q || rq->top_k <= 0)
        return fail(c, RA_EINVAL, "n_q_heads, head_dim and top_k must be positive, q set");
    pending *slot = find_pending(c, 0);
    if (!slot)
        return fail(c, RA_EBUSY, "%d attends already outstanding (max_inflight)",
                    c->max_inflight);
    Ratd__Header h = RATD__HEADER__INIT;
    Ratd__AttendParams ap = RATD__ATTEND_PARAMS__INIT;
    h.type = RATD__MSG_TYPE__ATTEND;
    h.session = session;
    h.layer = (uint32_t)layer;
    ap.top_k = (uint32_t)rq->top_k;
    ap.effort = rq->effort > 0 ? (uint32_t)rq->effort : 0;
    ap.scale = rq->scale > 0 ? rq->scale : 0.0f;
    ap.want_topk = rq->want_topk != 0;
    h.attend = &ap;
    uint64_t H = (uint64_t)rq->n_q_heads, D = (uint64_t)rq->head_dim;
    ra_proto_part p = {RATD__ROLE__Q, RATD__DTYPE__F32, 2, {H, D}, rq->q,
                       (size_t)(H * D) * sizeof(float), 0};
    uint64_t id = 0;
    ra_status st = send_req(c, &h, &p, 1, &id);
    if (st != RA_OK)
        return st;
    slot->id = id;
    slot->n_q = rq->n_q_heads;
    slot->dim = rq->head_dim;
    slot->k = rq->top_k;
    slot->want = rq->want_topk != 0;
    slot->reply = NULL;
    *ticket = id;
    c->err[0] = 0;
    return RA_OK;
}

static int tensor_is(const ra_proto_view *v, int i, int dt, int ndim, uint64_t a, uint64_t b)
{
    const Ratd__Tensor *t = v->tensor[i];
    return (int)t->dtype == dt && (int)t->n_shape == ndim && t->shape[0] == a &&
           (ndim == 1 || t->shape[1] == b);
}

static ra_status unpack_attend(ra_client *c, pending *p, ra_reply *r, ra_attend_out *out)
{
    ra_proto_view *v = &r->v;
    uint64_t H = (uint64_t)p->n_q, D = (uint64_t)p->dim, K = (uint64_t)p->k;
    int io = ra_proto_find(v, RATD__ROLE__O), il = ra_proto_find(v, RATD__ROLE__LSE);
    if (io < 0 || il < 0 || !tensor_is(v, io, RATD__DTYPE__F32, 2, H, D) ||
        !tensor_is(v, il, RATD__DTYPE__F32, 1, H, 0))
        return fail(c, RA_EPROTO, "Attend reply lacks o [%d][%d] or lse [%d]", p->n_q, p->dim,
                    p->n_q);
    memcpy(out->o, zmq_msg_data(v->frame[io]), (size_t)(H * D) * sizeof(float));
    memcpy(out->lse, zmq_msg_data(v->frame[il]), (size_t)H * sizeof(float));
    if (p->want) {
        int ip = ra_proto_find(v, RATD__ROLE__TOPK_POS);
        int is = ra_proto_find(v, RATD__ROLE__TOPK_SCORE);
        int ic = ra_proto_find(v, RATD__ROLE__TOPK_COUNT);
        if (ip < 0 || is < 0 || ic < 0 || !tensor_is(v, ip, RATD__DTYPE__I64, 2, H, K) ||
            !tensor_is(v, is, RATD__DTYPE__F32, 2, H, K) ||
            !tensor_is(v, ic, RATD__DTYPE__I32, 1, H, 0))
            return fail(c, RA_EPROTO, "Attend reply lacks the requested top-k tensors");
        if (out->pos)
            memcpy(out->pos, zmq_msg_data(v->frame[ip]), (size_t)(H * K) * sizeof(int64_t));
        if (out->scores)
            memcpy(out->scores, zmq_msg_data(v->frame[is]), (size_t)(H * K) * sizeof(float));
        if (out->counts)
            memcpy(out->counts, zmq_msg_data(v->frame[ic]), (size_t)H * sizeof(int32_t));
    }
    return RA_OK;
}

ra_status ra_client_attend_wait(ra_client *c, ra_ticket ticket, ra_attend_out *out,
                                int timeout_ms)
{
    if (!c || !out || !out->o || !out->lse)
        return c ? fail(c, RA_EINVAL, "out->o and out->lse are required") : RA_EINVAL;
    pending *p = ticket ? find_pending(c, ticket) : NULL;
    if (!p)
        return fail(c, RA_EINVAL, "unknown ticket %llu (already waited for or cancelled)",
                    (unsigned long long)ticket);
    ra_reply *r = p->reply;
    p->reply = NULL;
    ra_status st = RA_OK;
    if (!r) {
        st = wait_reply(c, ticket, timeout_ms < 0 ? c->timeout_ms : timeout_ms, &r);
        if (st == RA_ETIMEDOUT)
            return st; /* the ticket stays valid */
    }
    if (st == RA_OK)
        st = reply_status(c, r);
    if (st == RA_OK)
        st = unpack_attend(c, p, r, out);
    reply_free(r);
    memset(p, 0, sizeof *p);
    if (st == RA_OK)
        c->err[0] = 0;
    return st;
}

void ra_client_attend_cancel(ra_client *c, ra_ticket ticket)
{
    pending *p = c && ticket ? find_pending(c, ticket) : NULL;
    if (!p)
        return;
    reply_free(p->reply);
    memset(p, 0, sizeof *p);
}

ra_status ra_client_attend(ra_client *c, uint64_t session, int layer, const ra_attend_req *r,
                           ra_attend_out *out)
{
    if (!c || !out || !out->o || !out->lse)
        return c ? fail(c, RA_EINVAL, "out->o and out->lse are required") : RA_EINVAL;
    ra_ticket t;
    ra_status st = ra_client_attend_send(c, session, layer, r, &t);
    if (st != RA_OK)
        return st;
    st = ra_client_attend_wait(c, t, out, -1);
    if (st == RA_ETIMEDOUT)
        ra_client_attend_cancel(c, t);
    return st;
}
