/* libratd-client (include/ratd/client.h): one DEALER socket per client, request ids
 * chosen here and echoed by the daemon. Replies are matched by id: a reply for an
 * outstanding asynchronous attend that arrives while another call waits is parked in
 * that ticket's slot; replies nobody waits for any more (timed out, cancelled) are
 * dropped. Replies are validated like requests are in the daemon (ra_proto_parse),
 * so a confused or hostile daemon cannot make us write outside the caller's arrays.
 *
 * Sessions: a table sorted by the caller's id keeps each session's id and token on
 * every daemon; every request naming a session carries its token (Header.token, or
 * AttendParams.session_tokens in a batch), so callers never see tokens unless they
 * hand a session to another client (ra_client_session_token / _adopt). The table
 * lives in the client, not the connection: a DEALER that reconnects keeps it.
 *
 * Sharding: an endpoint list "A,B,..." opens one socket per daemon; layer l lives on
 * daemon l % n. A session is created on every daemon; the id the caller sees is the
 * first daemon's. */
#include "ratd/client.h"

#include <errno.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <zmq.h>

#include "ra_log.h"
#include "ra_proto.h"

typedef struct ra_reply {
    ra_proto_msg m;
    ra_proto_view v;
} ra_reply;

#define RA_CLIENT_MAX_SHARDS 16

typedef struct pending {
    uint64_t id; /* 0: free slot */
    int shard;
    int n_sess; /* 0: a single-session Attend (no leading dimension) */
    int n_q, dim, k, want;
    ra_reply *reply; /* parked, when it arrived during another wait */
} pending;

/* A session this client created (or adopted): its id on each daemon and the token each
 * daemon gave it (token_len 0: none, a daemon that predates tokens). */
typedef struct smap {
    uint64_t local;
    uint64_t remote[RA_CLIENT_MAX_SHARDS];
    uint8_t token[RA_CLIENT_MAX_SHARDS][RA_SESSION_TOKEN_BYTES];
    uint8_t token_len[RA_CLIENT_MAX_SHARDS];
} smap;

struct ra_client {
    void *ctx;
    void *socks[RA_CLIENT_MAX_SHARDS];
    int n_shards;
    smap *map;
    int n_map, cap_map;
    int timeout_ms;
    int spin_us; /* ra_client_set_spin_us */
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

ra_status ra_client_default_endpoint(char *buf, size_t len)
{
    const char *xdg = getenv("XDG_RUNTIME_DIR");
    int n;
    if (xdg && *xdg && strlen(xdg) < 300 && access(xdg, W_OK) == 0)
        n = snprintf(buf, len, "ipc://%s/ratd/ratd.sock", xdg);
    else
        n = snprintf(buf, len, "ipc:///tmp/ratd-%u/ratd.sock", (unsigned)geteuid());
    return n >= 0 && (size_t)n < len ? RA_OK : RA_EINVAL;
}

/* A Z85 CURVE key: 40 characters that decode. */
static int curve_key_ok(const char *k)
{
    uint8_t b[32];
    return k && strlen(k) == 40 && zmq_z85_decode(b, k) != NULL;
}

void ra_session_desc_init(ra_session_desc *d)
{
    memset(d, 0, sizeof *d);
    d->dtype = RA_DTYPE_F16;
    d->index.kind = RA_CLIENT_INDEX_PSCAN;
}

static const struct {
    ra_client_index_kind kind;
    const char *name;
} g_index_kinds[] = {{RA_CLIENT_INDEX_GRAPH, "graph"},
                     {RA_CLIENT_INDEX_FLAT, "flat"},
                     {RA_CLIENT_INDEX_IVF, "ivf"},
                     {RA_CLIENT_INDEX_HNSW, "hnsw"},
                     {RA_CLIENT_INDEX_PSCAN, "pscan"}};

const char *ra_client_index_kind_name(ra_client_index_kind k)
{
    for (size_t i = 0; i < sizeof g_index_kinds / sizeof *g_index_kinds; i++)
        if (g_index_kinds[i].kind == k)
            return g_index_kinds[i].name;
    return NULL;
}

ra_status ra_client_index_kind_parse(const char *name, ra_client_index_kind *out)
{
    for (size_t i = 0; name && i < sizeof g_index_kinds / sizeof *g_index_kinds; i++)
        if (!strcmp(name, g_index_kinds[i].name)) {
            *out = g_index_kinds[i].kind;
            return RA_OK;
        }
    return RA_EINVAL;
}

const char *ra_op_name(ra_op op)
{
    static const char *n[] = {"hello", "create", "offload", "append", "attend", "drop", "stats"};
    return (unsigned)op < RA_OP_COUNT ? n[op] : "?";
}

ra_status ra_client_open(ra_client **out, const char *endpoint, const ra_client_opts *opts)
{
    if (!out)
        return RA_EINVAL;
    char def[400];
    if (!endpoint) {
        if (ra_client_default_endpoint(def, sizeof def) != RA_OK)
            return RA_EINVAL;
        endpoint = def;
    }
    ra_client_opts o;
    ra_client_opts_default(&o);
    int curve = 0;
    if (opts) {
        if (opts->timeout_ms > 0)
            o.timeout_ms = opts->timeout_ms;
        if (opts->max_inflight > 0)
            o.max_inflight = opts->max_inflight;
        curve = opts->curve_server_key || opts->curve_public_key || opts->curve_secret_key;
        if (curve &&
            (!curve_key_ok(opts->curve_server_key) || !curve_key_ok(opts->curve_public_key) ||
             !curve_key_ok(opts->curve_secret_key)))
            return RA_EINVAL; /* all three, each 40 characters of Z85 */
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
    /* one DEALER per comma-separated endpoint */
    for (const char *e = endpoint; *e;) {
        const char *comma = strchr(e, ',');
        size_t len = comma ? (size_t)(comma - e) : strlen(e);
        char ep[512];
        if (len == 0 || len >= sizeof ep || c->n_shards == RA_CLIENT_MAX_SHARDS)
            goto fail;
        memcpy(ep, e, len);
        ep[len] = 0;
        void *sock = zmq_socket(c->ctx, ZMQ_DEALER);
        if (!sock)
            goto fail;
        c->socks[c->n_shards++] = sock;
        int linger = 0;
        zmq_setsockopt(sock, ZMQ_LINGER, &linger, sizeof linger);
        zmq_setsockopt(sock, ZMQ_SNDTIMEO, &c->timeout_ms, sizeof c->timeout_ms);
        if (curve && (zmq_setsockopt(sock, ZMQ_CURVE_SERVERKEY, opts->curve_server_key, 40) != 0 ||
                      zmq_setsockopt(sock, ZMQ_CURVE_PUBLICKEY, opts->curve_public_key, 40) != 0 ||
                      zmq_setsockopt(sock, ZMQ_CURVE_SECRETKEY, opts->curve_secret_key, 40) != 0))
            goto fail;
        if (zmq_connect(sock, ep) != 0)
            goto fail;
        e += len;
        if (*e == ',')
            e++;
    }
    if (c->n_shards == 0)
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
    free(c->map);
    for (int i = 0; i < c->n_shards; i++)
        zmq_close(c->socks[i]);
    if (c->ctx)
        zmq_ctx_term(c->ctx);
    free(c);
}

const char *ra_client_errmsg(const ra_client *c)
{
    return c ? c->err : "no client";
}

void ra_client_set_timeout(ra_client *c, int timeout_ms)
{
    c->timeout_ms = timeout_ms > 0 ? timeout_ms : 30000;
    for (int i = 0; i < c->n_shards; i++)
        zmq_setsockopt(c->socks[i], ZMQ_SNDTIMEO, &c->timeout_ms, sizeof c->timeout_ms);
}

void ra_client_set_spin_us(ra_client *c, int spin_us)
{
    if (c)
        c->spin_us = spin_us < 0 ? 0 : spin_us > 100000 ? 100000 : spin_us;
}

/* ---- request / reply ---------------------------------------------------------------- */

/* Layer l lives on daemon l % n; the session id there comes from the map. */
static int shard_of(const ra_client *c, int layer)
{
    return layer % c->n_shards;
}

static int map_index(const ra_client *c, uint64_t local, int *at)
{
    int lo = 0, hi = c->n_map - 1;
    while (lo <= hi) {
        int mid = lo + (hi - lo) / 2;
        if (c->map[mid].local == local)
            return mid;
        if (c->map[mid].local < local)
            lo = mid + 1;
        else
            hi = mid - 1;
    }
    if (at)
        *at = lo;
    return -1;
}

static smap *map_find(ra_client *c, uint64_t local)
{
    int i = map_index(c, local, NULL);
    return i < 0 ? NULL : &c->map[i];
}

/* Adds or replaces m (room for one more is made by map_reserve first). */
static void map_put(ra_client *c, const smap *m)
{
    int at = 0, i = map_index(c, m->local, &at);
    if (i >= 0) {
        c->map[i] = *m;
        return;
    }
    memmove(&c->map[at + 1], &c->map[at], (size_t)(c->n_map - at) * sizeof *c->map);
    c->map[at] = *m;
    c->n_map++;
}

static int map_reserve(ra_client *c)
{
    if (c->n_map < c->cap_map)
        return 0;
    int cap = c->cap_map ? 2 * c->cap_map : 16;
    smap *m = realloc(c->map, (size_t)cap * sizeof *m);
    if (!m)
        return -1;
    c->map = m;
    c->cap_map = cap;
    return 0;
}

/* Header.session and .token of a request naming `session` on `shard`. */
static void name_session(ra_client *c, Ratd__Header *h, uint64_t session, int shard)
{
    smap *m = map_find(c, session);
    h->session = m ? m->remote[shard] : session;
    if (m && m->token_len[shard]) {
        h->token.data = m->token[shard];
        h->token.len = m->token_len[shard];
    }
}

static ra_status send_req(ra_client *c, int shard, Ratd__Header *h, ra_proto_part *parts, int n,
                          uint64_t *id)
{
    h->version = RA_PROTO_VERSION;
    h->request_id = c->next_id++;
    if (ra_proto_send(c->socks[shard], NULL, 0, h, parts, n) < 0) {
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
static ra_status wait_reply(ra_client *c, int shard, uint64_t id, int timeout_ms, ra_reply **out)
{
    double deadline = ra_now_s() + timeout_ms / 1000.0;
    for (;;) {
        int left = (int)((deadline - ra_now_s()) * 1000.0 + 0.5);
        if (left < 0)
            left = 0;
        zmq_pollitem_t it = {c->socks[shard], 0, ZMQ_POLLIN, 0};
        int rc = 0;
        if (c->spin_us > 0) { /* ra_client_set_spin_us: poll awake first */
            double until = ra_now_s() + c->spin_us * 1e-6;
            if (until > deadline)
                until = deadline;
            while ((rc = zmq_poll(&it, 1, 0)) == 0 && ra_now_s() < until)
                ;
            left = (int)((deadline - ra_now_s()) * 1000.0 + 0.5);
            left = left < 0 ? 0 : left;
        }
        if (rc == 0)
            rc = zmq_poll(&it, 1, left);
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
        if (ra_proto_recv(c->socks[shard], &r->m, ZMQ_DONTWAIT) < 0) {
            free(r);
            continue;
        }
        char err[RA_PROTO_ERRLEN];
        uint64_t rid = 0;
        static const ra_proto_limits reply_lim = {.max_header_bytes =
                                                      RA_PROTO_MAX_REPLY_HEADER_BYTES};
        ra_status st = ra_proto_parse(&r->m, 0, &reply_lim, &r->v, &rid, NULL, err, sizeof err);
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
    return fail(c, (ra_status)s, "%s",
                r->v.hdr->message && *r->v.hdr->message ? r->v.hdr->message
                                                        : ra_strerror((ra_status)s));
}

static ra_status call(ra_client *c, int shard, Ratd__Header *h, ra_proto_part *parts, int n,
                      ra_reply **out)
{
    uint64_t id = 0;
    ra_status st = send_req(c, shard, h, parts, n, &id);
    if (st != RA_OK)
        return st;
    ra_reply *r;
    if ((st = wait_reply(c, shard, id, c->timeout_ms, &r)) != RA_OK)
        return st;
    if ((st = reply_status(c, r)) != RA_OK) {
        reply_free(r);
        return st;
    }
    *out = r;
    return RA_OK;
}

/* ---- Hello / sessions / stats ------------------------------------------------------ */

static uint64_t min_nz(uint64_t a, uint64_t b)
{
    return !a ? b : !b ? a : a < b ? a : b;
}

/* Hello to every daemon: each must speak our version. With several daemons, info
 * describes what they have in common (capabilities and, per limit, the smallest);
 * workers add up. */
ra_status ra_client_hello(ra_client *c, ra_server_info *info)
{
    if (!c)
        return RA_EINVAL;
    ra_server_info acc;
    memset(&acc, 0, sizeof acc);
    for (int sh = 0; sh < c->n_shards; sh++) {
        Ratd__Header h = RATD__HEADER__INIT;
        h.type = RATD__MSG_TYPE__HELLO;
        ra_reply *r;
        ra_status st = call(c, sh, &h, NULL, 0, &r);
        if (st != RA_OK)
            return st;
        const Ratd__HelloReply *hr = r->v.hdr->hello;
        ra_server_info one;
        memset(&one, 0, sizeof one);
        one.protocol_version = r->v.hdr->version;
        one.numa_node = -1;
        if (hr) {
            one.capabilities = hr->capabilities;
            snprintf(one.server_version, sizeof one.server_version, "%s",
                     hr->server_version ? hr->server_version : "");
            one.workers = hr->workers;
            one.numa_node = hr->numa_node;
            const Ratd__Limits *l = hr->limits;
            if (l) {
                one.limits.max_frame_bytes = l->max_frame_bytes;
                one.limits.max_message_bytes = l->max_message_bytes;
                one.limits.mem_limit = l->mem_limit;
                one.limits.max_sessions = l->max_sessions;
                one.limits.max_layers = l->max_layers;
                one.limits.max_heads = l->max_heads;
                one.limits.max_dim = l->max_dim;
                one.limits.max_top_k = l->max_top_k;
                one.limits.max_tokens = l->max_tokens;
                one.limits.max_queries = l->max_queries;
            }
            one.instance_id = hr->instance_id;
        }
        reply_free(r);
        if (sh == 0) {
            acc = one; /* instance_id: the first daemon's */
            continue;
        }
        acc.capabilities &= one.capabilities;
        acc.workers += one.workers;
        if (acc.numa_node != one.numa_node)
            acc.numa_node = -1;
#define MN(f) acc.limits.f = min_nz(acc.limits.f, one.limits.f);
        MN(max_frame_bytes)
        MN(max_message_bytes) MN(mem_limit) MN(max_sessions) MN(max_layers) MN(max_heads)
            MN(max_dim) MN(max_top_k) MN(max_tokens) MN(max_queries)
#undef MN
    }
    if (info)
        *info = acc;
    c->err[0] = 0;
    return RA_OK;
}

static ra_status drop_one(ra_client *c, int shard, uint64_t remote, const uint8_t *tok,
                          size_t tok_len)
{
    Ratd__Header h = RATD__HEADER__INIT;
    h.type = RATD__MSG_TYPE__DROP_SESSION;
    h.session = remote;
    h.token.data = (uint8_t *)(uintptr_t)tok;
    h.token.len = tok_len;
    ra_reply *r;
    ra_status st = call(c, shard, &h, NULL, 0, &r);
    if (st == RA_OK)
        reply_free(r);
    return st;
}

ra_status ra_client_session_create(ra_client *c, const ra_session_desc *d, uint64_t *session)
{
    if (!c || !d || !session)
        return c ? fail(c, RA_EINVAL, "NULL argument") : RA_EINVAL;
    if (d->n_layers <= 0 || d->n_q_heads <= 0 || d->n_kv_heads <= 0 || d->head_dim <= 0 ||
        (int)d->index.kind < 0)
        return fail(c, RA_EINVAL, "session sizes must be positive");
    if (map_reserve(c) < 0)
        return fail(c, RA_ENOMEM, "out of memory");
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
    CP(graph_knn)
    CP(graph_degree) CP(graph_build_ef) CP(graph_entries) CP(n_train) CP(ivf_nlist) CP(hnsw_m)
        CP(threads)
#undef CP
            io.seed = d->index.seed;
    cs.index = &io;
    h.create = &cs;
    smap m;
    memset(&m, 0, sizeof m);
    for (int sh = 0; sh < c->n_shards; sh++) {
        ra_reply *r;
        ra_status st = call(c, sh, &h, NULL, 0, &r);
        uint64_t id = st == RA_OK ? r->v.hdr->session : 0;
        if (st == RA_OK) {
            const ProtobufCBinaryData *t = &r->v.hdr->token;
            if (t->len > RA_SESSION_TOKEN_BYTES) {
                st = fail(c, RA_EPROTO, "ratd sent a session token of %zu bytes", t->len);
            } else {
                memcpy(m.token[sh], t->data, t->len);
                m.token_len[sh] = (uint8_t)t->len;
            }
            reply_free(r);
        }
        if (st == RA_OK && !id)
            st = fail(c, RA_EPROTO, "ratd created a session but sent no id");
        if (st != RA_OK) {
            char keep[sizeof c->err];
            memcpy(keep, c->err, sizeof keep);
            for (int x = 0; x < sh; x++) /* undo: all daemons or none */
                drop_one(c, x, m.remote[x], m.token[x], m.token_len[x]);
            memcpy(c->err, keep, sizeof keep);
            return st;
        }
        m.remote[sh] = id;
    }
    m.local = m.remote[0];
    map_put(c, &m); /* an id the first daemon gives again replaces the old entry */
    *session = m.local;
    c->err[0] = 0;
    return RA_OK;
}

ra_status ra_client_session_drop(ra_client *c, uint64_t session)
{
    if (!c)
        return RA_EINVAL;
    ra_status first = RA_OK;
    char keep[sizeof c->err] = "";
    int i = map_index(c, session, NULL);
    smap *m = i >= 0 ? &c->map[i] : NULL;
    for (int sh = 0; sh < c->n_shards; sh++) {
        ra_status st = drop_one(c, sh, m ? m->remote[sh] : session, m ? m->token[sh] : NULL,
                                m ? m->token_len[sh] : 0);
        if (st != RA_OK && first == RA_OK) {
            first = st;
            memcpy(keep, c->err, sizeof keep);
        }
    }
    if (i >= 0) {
        memmove(&c->map[i], &c->map[i + 1], (size_t)(c->n_map - i - 1) * sizeof *c->map);
        c->n_map--;
    }
    memcpy(c->err, keep, sizeof keep);
    return first;
}

ra_status ra_client_session_token(ra_client *c, uint64_t session, ra_session_token *out)
{
    if (!c || !out)
        return c ? fail(c, RA_EINVAL, "NULL argument") : RA_EINVAL;
    if (c->n_shards > 1)
        return fail(c, RA_ENOTSUP, "a sharded client's session has one token per daemon");
    smap *m = map_find(c, session);
    if (!m || m->token_len[0] != RA_SESSION_TOKEN_BYTES)
        return fail(c, RA_ENOSESSION, "this client holds no token of session %llu",
                    (unsigned long long)session);
    memcpy(out->bytes, m->token[0], RA_SESSION_TOKEN_BYTES);
    c->err[0] = 0;
    return RA_OK;
}

ra_status ra_client_session_adopt(ra_client *c, uint64_t session, const ra_session_token *tok)
{
    if (!c || !tok || !session)
        return c ? fail(c, RA_EINVAL, "NULL argument or session 0") : RA_EINVAL;
    if (c->n_shards > 1)
        return fail(c, RA_ENOTSUP, "a sharded client's session has one token per daemon");
    if (map_reserve(c) < 0)
        return fail(c, RA_ENOMEM, "out of memory");
    smap m;
    memset(&m, 0, sizeof m);
    m.local = m.remote[0] = session;
    memcpy(m.token[0], tok->bytes, RA_SESSION_TOKEN_BYTES);
    m.token_len[0] = RA_SESSION_TOKEN_BYTES;
    map_put(c, &m);
    c->err[0] = 0;
    return RA_OK;
}

/* One daemon's Stats reply (session 0: the daemon's counters). *r is freed by the
 * caller on RA_OK; *s points into it. */
static ra_status stats_call(ra_client *c, int sh, uint64_t session, ra_reply **r,
                            const Ratd__StatsReply **s)
{
    Ratd__Header h = RATD__HEADER__INIT;
    h.type = RATD__MSG_TYPE__STATS;
    if (session)
        name_session(c, &h, session, sh);
    ra_status st = call(c, sh, &h, NULL, 0, r);
    if (st != RA_OK)
        return st;
    *s = (*r)->v.hdr->stats;
    if (!*s) {
        reply_free(*r);
        return fail(c, RA_EPROTO, "Stats reply without counters");
    }
    return RA_OK;
}

/* Counters of every daemon, added up (max_us and uptime: the largest). */
ra_status ra_client_stats(ra_client *c, ra_server_stats *out)
{
    if (!c || !out)
        return c ? fail(c, RA_EINVAL, "NULL argument") : RA_EINVAL;
    ra_server_stats acc;
    memset(&acc, 0, sizeof acc);
    for (int sh = 0; sh < c->n_shards; sh++) {
        ra_reply *r;
        const Ratd__StatsReply *s;
        ra_status st = stats_call(c, sh, 0, &r, &s);
        if (st != RA_OK)
            return st;
        acc.sessions += s->sessions;
        acc.requests += s->requests;
        acc.errors += s->errors;
        acc.bad_messages += s->bad_messages;
        acc.bytes_in += s->bytes_in;
        acc.bytes_out += s->bytes_out;
        acc.mem_used += s->mem_used;
        acc.mem_limit += s->mem_limit;
        acc.tokens += s->tokens;
        acc.clients += s->clients;
        acc.max_clients += s->max_clients;
        acc.listener_pauses += s->listener_pauses;
        acc.replies_dropped += s->replies_dropped;
        acc.sessions_expired += s->sessions_expired;
        acc.tokens_refused += s->tokens_refused;
        acc.reply_bytes += s->reply_bytes;
        acc.curve_refused += s->curve_refused;
        if (s->uptime_s > acc.uptime_s)
            acc.uptime_s = s->uptime_s;
        for (size_t i = 0; i < s->n_ops && i < RA_OP_COUNT; i++) {
            acc.ops[i].count += s->ops[i]->count;
            acc.ops[i].errors += s->ops[i]->errors;
            acc.ops[i].total_us += s->ops[i]->total_us;
            if (s->ops[i]->max_us > acc.ops[i].max_us)
                acc.ops[i].max_us = s->ops[i]->max_us;
        }
        reply_free(r);
    }
    if (c->n_shards > 1) /* sessions are counted once per daemon */
        acc.sessions /= (uint64_t)c->n_shards;
    *out = acc;
    c->err[0] = 0;
    return RA_OK;
}

/* One session's index state, added up over the daemons that hold its layers. */
ra_status ra_client_session_stats(ra_client *c, uint64_t session, ra_session_stats *out)
{
    if (!c || !out || !session)
        return c ? fail(c, RA_EINVAL, "NULL argument or session 0") : RA_EINVAL;
    ra_session_stats acc;
    memset(&acc, 0, sizeof acc);
    for (int sh = 0; sh < c->n_shards; sh++) {
        ra_reply *r;
        const Ratd__StatsReply *s;
        ra_status st = stats_call(c, sh, session, &r, &s);
        if (st != RA_OK)
            return st;
        acc.tokens += s->session_tokens;
        acc.heads += s->heads;
        acc.heads_ready += s->heads_ready;
        acc.heads_building += s->heads_building;
        acc.bytes += s->session_bytes;
        reply_free(r);
    }
    *out = acc;
    c->err[0] = 0;
    return RA_OK;
}

/* The Stats polling of daemons that predate WaitReady. */
static ra_status wait_ready_poll(ra_client *c, uint64_t session, double deadline, int timeout_ms)
{
    for (;;) {
        ra_session_stats ss;
        ra_status st = ra_client_session_stats(c, session, &ss);
        if (st != RA_OK)
            return st;
        if (ss.heads_building == 0)
            return RA_OK;
        if (ra_now_s() >= deadline)
            return fail(c, RA_ETIMEDOUT, "index builds still running after %d ms", timeout_ms);
        struct timespec nap = {0, 5 * 1000 * 1000};
        nanosleep(&nap, NULL);
    }
}

/* A daemon's answer to a request type it does not know. */
static int unknown_type(ra_status st, const ra_client *c)
{
    return st == RA_EPROTO && strstr(c->err, "unknown request type") != NULL;
}

ra_status ra_client_wait_ready(ra_client *c, uint64_t session, int timeout_ms)
{
    if (!c)
        return RA_EINVAL;
    if (timeout_ms <= 0)
        timeout_ms = c->timeout_ms;
    double deadline = ra_now_s() + timeout_ms * 1e-3;
    for (int sh = 0; sh < c->n_shards; sh++) {
        for (;;) {
            /* The daemon answers one WaitReady at most c->timeout_ms later, so that a daemon
             * that died meanwhile is noticed within the client's own bound, as with any
             * other call; a long wait is a few such requests. */
            int left = (int)((deadline - ra_now_s()) * 1e3);
            if (left < 1)
                left = 1;
            int slice = left < c->timeout_ms ? left : c->timeout_ms;
            if (slice > (int)RA_PROTO_MAX_WAIT_MS) /* the bound of one WaitReady */
                slice = (int)RA_PROTO_MAX_WAIT_MS;
            Ratd__Header h = RATD__HEADER__INIT;
            Ratd__WaitParams wp = RATD__WAIT_PARAMS__INIT;
            h.type = RATD__MSG_TYPE__WAIT_READY;
            name_session(c, &h, session, sh);
            wp.timeout_ms = (uint32_t)slice;
            h.wait = &wp;
            uint64_t id = 0;
            ra_status st = send_req(c, sh, &h, NULL, 0, &id);
            ra_reply *r = NULL;
            if (st == RA_OK) /* the daemon answers at its deadline: wait a little longer */
                st = wait_reply(c, sh, id, slice + 2000, &r);
            if (st != RA_OK)
                return st; /* no answer at all: the daemon is gone or unreachable */
            st = reply_status(c, r);
            reply_free(r);
            if (unknown_type(st, c))
                return wait_ready_poll(c, session, deadline, timeout_ms);
            if (st == RA_ETIMEDOUT && ra_now_s() < deadline)
                continue; /* this slice ended, the caller's time has not */
            if (st != RA_OK)
                return st;
            break;
        }
    }
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
    int with_knn = with_q && b->train_knn;
    if (with_knn && b->train_knn_k <= 0)
        return fail(c, RA_EINVAL, "train_knn needs train_knn_k > 0");
    int with_graph = offload && b->graph_adj;
    if (with_graph && (b->graph_degree < 1 || b->graph_degree > 255 || !b->graph_entries ||
                       b->graph_n_entries < 1 || b->graph_n_entries > 1024 || b->n_tokens == 0))
        return fail(c, RA_EINVAL,
                    "graph_adj needs n_tokens > 0, graph_degree 1..255, graph_entries and "
                    "graph_n_entries 1..1024");
    size_t es = ra_dtype_size(b->dtype);
    uint64_t G = (uint64_t)b->n_kv_heads, n = b->n_tokens, D = (uint64_t)b->head_dim;
    if (n > ((uint64_t)1 << 40) / (G * D))
        return fail(c, RA_ETOOBIG, "batch too large");
    size_t kvb = (size_t)(G * n * D) * es;
    int sh = shard_of(c, layer);
    Ratd__Header h = RATD__HEADER__INIT;
    h.type = offload ? RATD__MSG_TYPE__OFFLOAD : RATD__MSG_TYPE__APPEND;
    name_session(c, &h, session, sh);
    h.layer = (uint32_t)layer;
    ra_proto_part p[7] = {
        {RATD__ROLE__K, (Ratd__DType)b->dtype, 3, {G, n, D}, b->k, kvb, 0},
        {RATD__ROLE__V, (Ratd__DType)b->dtype, 3, {G, n, D}, b->v, kvb, 0},
        {RATD__ROLE__POS, RATD__DTYPE__I64, 1, {n}, b->pos, n * sizeof(int64_t), 0},
        {RATD__ROLE__Q_TRAIN,
         RATD__DTYPE__F32,
         3,
         {(uint64_t)b->n_q_heads, b->n_queries, D},
         b->q_train,
         (size_t)b->n_q_heads * b->n_queries * (size_t)D * sizeof(float),
         0},
        {RATD__ROLE__TRAIN_TOPK,
         RATD__DTYPE__I32,
         3,
         {(uint64_t)b->n_q_heads, b->n_queries, (uint64_t)(with_knn ? b->train_knn_k : 0)},
         b->train_knn,
         with_knn ? (size_t)b->n_q_heads * b->n_queries * (size_t)b->train_knn_k * sizeof(int32_t)
                  : 0,
         0},
        {RATD__ROLE__GRAPH_ADJ,
         RATD__DTYPE__I32,
         3,
         {G, n, (uint64_t)(with_graph ? b->graph_degree : 0)},
         b->graph_adj,
         with_graph ? (size_t)(G * n) * (size_t)b->graph_degree * sizeof(int32_t) : 0,
         0},
        {RATD__ROLE__GRAPH_ENTRIES,
         RATD__DTYPE__I32,
         2,
         {G, (uint64_t)(with_graph ? b->graph_n_entries : 0)},
         b->graph_entries,
         with_graph ? (size_t)G * (size_t)b->graph_n_entries * sizeof(int32_t) : 0,
         0},
    };
    Ratd__OffloadParams op = RATD__OFFLOAD_PARAMS__INIT;
    int np = 3;
    if (with_q)
        p[np++] = p[3];
    if (with_knn)
        p[np++] = p[4];
    if (with_graph) {
        op.graph_degree = (uint32_t)b->graph_degree;
        h.offload = &op;
        p[np++] = p[5];
        p[np++] = p[6];
    }
    ra_reply *r;
    ra_status st = call(c, sh, &h, p, np, &r);
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

/* One Attend request, single (n_sess 0: Header.session) or batched (AttendParams.sessions
 * of n_sess local ids, mapped to the shard's own). */
typedef struct attend_args {
    int n_sess;
    const uint64_t *sessions;
    uint64_t session;
    int n_q, dim;
    const float *q;
    int top_k, effort;
    float scale;
    int want;
    const int32_t *k_head;
} attend_args;

static ra_status attend_send(ra_client *c, int layer, const attend_args *a, ra_ticket *ticket)
{
    if (layer < 0)
        return fail(c, RA_ENOLAYER, "layer %d is negative", layer);
    if (a->n_q <= 0 || a->dim <= 0 || !a->q || a->top_k <= 0)
        return fail(c, RA_EINVAL, "n_q_heads, head_dim and top_k must be positive, q set");
    if (a->k_head)
        for (int i = 0; i < a->n_q; i++)
            if (a->k_head[i] < 0 || a->k_head[i] > a->top_k)
                return fail(c, RA_EINVAL, "top_k_per_head[%d] = %d outside 0..top_k (%d)", i,
                            a->k_head[i], a->top_k);
    pending *slot = find_pending(c, 0);
    if (!slot)
        return fail(c, RA_EBUSY, "%d attends already outstanding (max_inflight)", c->max_inflight);
    int sh = shard_of(c, layer);
    uint64_t *remote = NULL;
    ProtobufCBinaryData *toks = NULL;
    if (a->n_sess > 0) { /* each session's id and token on this shard */
        remote = malloc((size_t)a->n_sess * sizeof *remote);
        toks = calloc((size_t)a->n_sess, sizeof *toks);
        if (!remote || !toks) {
            free(remote);
            free(toks);
            return fail(c, RA_ENOMEM, "out of memory");
        }
        for (int i = 0; i < a->n_sess; i++) {
            smap *m = map_find(c, a->sessions[i]);
            remote[i] = m ? m->remote[sh] : a->sessions[i];
            if (m) {
                toks[i].data = m->token[sh];
                toks[i].len = m->token_len[sh];
            }
        }
    }
    Ratd__Header h = RATD__HEADER__INIT;
    Ratd__AttendParams ap = RATD__ATTEND_PARAMS__INIT;
    h.type = RATD__MSG_TYPE__ATTEND;
    if (remote)
        h.session = remote[0];
    else
        name_session(c, &h, a->session, sh);
    h.layer = (uint32_t)layer;
    ap.top_k = (uint32_t)a->top_k;
    ap.effort = a->effort > 0 ? (uint32_t)a->effort : 0;
    ap.scale = a->scale > 0 ? a->scale : 0.0f;
    ap.want_topk = a->want != 0;
    if (a->k_head) { /* int32 -> uint32, values checked above */
        ap.n_top_k_per_head = (size_t)a->n_q;
        ap.top_k_per_head = (uint32_t *)(uintptr_t)a->k_head;
    }
    ap.n_sessions = remote ? (size_t)a->n_sess : 0;
    ap.sessions = remote;
    ap.n_session_tokens = remote ? (size_t)a->n_sess : 0;
    ap.session_tokens = toks;
    h.attend = &ap;
    uint64_t S = (uint64_t)a->n_sess, H = (uint64_t)a->n_q, D = (uint64_t)a->dim;
    ra_proto_part p = {
        RATD__ROLE__Q, RATD__DTYPE__F32, 2, {H, D}, a->q, (size_t)(H * D) * sizeof(float), 0};
    if (remote) {
        p.ndim = 3;
        p.shape[0] = S;
        p.shape[1] = H;
        p.shape[2] = D;
        p.bytes *= (size_t)S;
    }
    uint64_t id = 0;
    ra_status st = send_req(c, sh, &h, &p, 1, &id);
    free(remote);
    free(toks);
    if (st != RA_OK)
        return st;
    slot->id = id;
    slot->shard = sh;
    slot->n_sess = a->n_sess;
    slot->n_q = a->n_q;
    slot->dim = a->dim;
    slot->k = a->top_k;
    slot->want = a->want != 0;
    slot->reply = NULL;
    *ticket = id;
    c->err[0] = 0;
    return RA_OK;
}

static attend_args args_single(uint64_t session, const ra_attend_req *r)
{
    attend_args a = {.session = session,
                     .n_q = r->n_q_heads,
                     .dim = r->head_dim,
                     .q = r->q,
                     .top_k = r->top_k,
                     .effort = r->effort,
                     .scale = r->scale,
                     .want = r->want_topk,
                     .k_head = r->top_k_per_head};
    return a;
}

static ra_status args_batch(ra_client *c, const ra_attend_batch_req *r, attend_args *a)
{
    if (r->n_sessions <= 0 || !r->sessions)
        return fail(c, RA_EINVAL, "a batched Attend needs n_sessions > 0 and the session ids");
    const ra_attend_req one = {r->n_q_heads, r->head_dim, r->q,         r->top_k,
                               r->effort,    r->scale,    r->want_topk, r->top_k_per_head};
    *a = args_single(0, &one);
    a->n_sess = r->n_sessions;
    a->sessions = r->sessions;
    return RA_OK;
}

ra_status ra_client_attend_send(ra_client *c, uint64_t session, int layer, const ra_attend_req *rq,
                                ra_ticket *ticket)
{
    if (!c || !rq || !ticket)
        return c ? fail(c, RA_EINVAL, "NULL argument") : RA_EINVAL;
    attend_args a = args_single(session, rq);
    return attend_send(c, layer, &a, ticket);
}

ra_status ra_client_attend_batch_send(ra_client *c, int layer, const ra_attend_batch_req *rq,
                                      ra_ticket *ticket)
{
    if (!c || !rq || !ticket)
        return c ? fail(c, RA_EINVAL, "NULL argument") : RA_EINVAL;
    attend_args a;
    ra_status st = args_batch(c, rq, &a);
    return st != RA_OK ? st : attend_send(c, layer, &a, ticket);
}

/* Tensor i is dt with shape [lead][a] or [lead][a][b] (lead 0: no leading dimension;
 * b 0: none). */
static int tensor_is(const ra_proto_view *v, int i, int dt, uint64_t lead, uint64_t a, uint64_t b)
{
    uint64_t want[3];
    size_t nd = 0;
    if (lead)
        want[nd++] = lead;
    want[nd++] = a;
    if (b)
        want[nd++] = b;
    const Ratd__Tensor *t = v->tensor[i];
    if ((int)t->dtype != dt || t->n_shape != nd)
        return 0;
    for (size_t d = 0; d < nd; d++)
        if (t->shape[d] != want[d])
            return 0;
    return 1;
}

static ra_status unpack_attend(ra_client *c, pending *p, ra_reply *r, ra_attend_out *out)
{
    ra_proto_view *v = &r->v;
    uint64_t S = (uint64_t)p->n_sess, H = (uint64_t)p->n_q, D = (uint64_t)p->dim,
             K = (uint64_t)p->k;
    uint64_t rows = (S ? S : 1) * H;
    int io = ra_proto_find(v, RATD__ROLE__O), il = ra_proto_find(v, RATD__ROLE__LSE);
    if (io < 0 || il < 0 || !tensor_is(v, io, RATD__DTYPE__F32, S, H, D) ||
        !tensor_is(v, il, RATD__DTYPE__F32, S, H, 0))
        return fail(c, RA_EPROTO, "Attend reply lacks o [%d][%d] or lse [%d] (%d sessions)", p->n_q,
                    p->dim, p->n_q, p->n_sess);
    int ip = -1, is = -1, ic = -1;
    if (p->want) {
        ip = ra_proto_find(v, RATD__ROLE__TOPK_POS);
        is = ra_proto_find(v, RATD__ROLE__TOPK_SCORE);
        ic = ra_proto_find(v, RATD__ROLE__TOPK_COUNT);
        if (ip < 0 || is < 0 || ic < 0 || !tensor_is(v, ip, RATD__DTYPE__I64, S, H, K) ||
            !tensor_is(v, is, RATD__DTYPE__F32, S, H, K) ||
            !tensor_is(v, ic, RATD__DTYPE__I32, S, H, 0))
            return fail(c, RA_EPROTO, "Attend reply lacks the requested top-k tensors");
    }
    memcpy(out->o, zmq_msg_data(v->frame[io]), (size_t)(rows * D) * sizeof(float));
    memcpy(out->lse, zmq_msg_data(v->frame[il]), (size_t)rows * sizeof(float));
    if (p->want) {
        if (out->pos)
            memcpy(out->pos, zmq_msg_data(v->frame[ip]), (size_t)(rows * K) * sizeof(int64_t));
        if (out->scores)
            memcpy(out->scores, zmq_msg_data(v->frame[is]), (size_t)(rows * K) * sizeof(float));
        if (out->counts)
            memcpy(out->counts, zmq_msg_data(v->frame[ic]), (size_t)rows * sizeof(int32_t));
    }
    out->server_us = v->hdr->server_us;
    out->work_us = v->hdr->work_us;
    out->task_max_us = v->hdr->task_max_us;
    return RA_OK;
}

ra_status ra_client_attend_wait(ra_client *c, ra_ticket ticket, ra_attend_out *out, int timeout_ms)
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
        st = wait_reply(c, p->shard, ticket, timeout_ms < 0 ? c->timeout_ms : timeout_ms, &r);
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

/* Send, then wait with the client's timeout; a timed-out ticket is cancelled. */
static ra_status attend_sync(ra_client *c, int layer, const attend_args *a, ra_attend_out *out)
{
    if (!out || !out->o || !out->lse)
        return fail(c, RA_EINVAL, "out->o and out->lse are required");
    ra_ticket t;
    ra_status st = attend_send(c, layer, a, &t);
    if (st != RA_OK)
        return st;
    st = ra_client_attend_wait(c, t, out, -1);
    if (st == RA_ETIMEDOUT)
        ra_client_attend_cancel(c, t);
    return st;
}

ra_status ra_client_attend(ra_client *c, uint64_t session, int layer, const ra_attend_req *r,
                           ra_attend_out *out)
{
    if (!c || !r)
        return c ? fail(c, RA_EINVAL, "NULL argument") : RA_EINVAL;
    attend_args a = args_single(session, r);
    return attend_sync(c, layer, &a, out);
}

ra_status ra_client_attend_batch(ra_client *c, int layer, const ra_attend_batch_req *r,
                                 ra_attend_out *out)
{
    if (!c || !r)
        return c ? fail(c, RA_EINVAL, "NULL argument") : RA_EINVAL;
    attend_args a;
    ra_status st = args_batch(c, r, &a);
    return st != RA_OK ? st : attend_sync(c, layer, &a, out);
}

/* ---- operations ------------------------------------------------------------------- */

ra_status ra_client_list_sessions(ra_client *c, ra_session_info *out, size_t cap, size_t *n)
{
    if (!c || !n || (cap && !out))
        return c ? fail(c, RA_EINVAL, "NULL argument") : RA_EINVAL;
    Ratd__Header h = RATD__HEADER__INIT;
    h.type = RATD__MSG_TYPE__LIST_SESSIONS;
    ra_reply *r;
    ra_status st = call(c, 0, &h, NULL, 0, &r);
    if (unknown_type(st, c))
        return fail(c, RA_ENOTSUP, "this ratd predates ListSessions: %s", c->err);
    if (st != RA_OK)
        return st;
    const Ratd__ListSessionsReply *lr = r->v.hdr->session_list;
    size_t total = lr ? lr->n_sessions : 0;
    for (size_t i = 0; i < total && i < cap; i++) {
        const Ratd__SessionInfo *x = lr->sessions[i];
        ra_session_info *o = &out[i];
        memset(o, 0, sizeof *o);
        o->id = x->id;
        o->n_layers = (int)x->n_layers;
        o->n_q_heads = (int)x->n_q_heads;
        o->n_kv_heads = (int)x->n_kv_heads;
        o->head_dim = (int)x->head_dim;
        o->dtype = (ra_dtype)x->dtype;
        o->index_kind = (ra_client_index_kind)x->index_kind;
        o->tokens = x->tokens;
        o->bytes = x->bytes;
        o->heads = x->heads;
        o->heads_ready = x->heads_ready;
        o->heads_building = x->heads_building;
        o->jobs = x->jobs;
        o->idle_s = x->idle_s;
    }
    reply_free(r);
    *n = total;
    c->err[0] = 0;
    return RA_OK;
}

ra_status ra_client_get_config(ra_client *c, char *buf, size_t cap)
{
    if (!c || !buf || !cap)
        return c ? fail(c, RA_EINVAL, "NULL argument") : RA_EINVAL;
    Ratd__Header h = RATD__HEADER__INIT;
    h.type = RATD__MSG_TYPE__GET_CONFIG;
    ra_reply *r;
    ra_status st = call(c, 0, &h, NULL, 0, &r);
    if (unknown_type(st, c))
        return fail(c, RA_ENOTSUP, "this ratd predates GetConfig: %s", c->err);
    if (st != RA_OK)
        return st;
    const Ratd__ConfigReply *cr = r->v.hdr->config;
    size_t used = 0;
    buf[0] = 0;
    for (size_t i = 0; cr && i < cr->n_options && st == RA_OK; i++) {
        const Ratd__ConfigEntry *e = cr->options[i];
        int w = snprintf(buf + used, cap - used, "%s %s\n", e->name ? e->name : "?",
                         e->value ? e->value : "");
        if (w < 0 || (size_t)w >= cap - used) {
            buf[used] = 0;
            st = fail(c, RA_ETOOBIG, "the configuration needs more than %zu bytes", cap);
        } else {
            used += (size_t)w;
        }
    }
    reply_free(r);
    if (st == RA_OK)
        c->err[0] = 0;
    return st;
}

/* ---- ABI ------------------------------------------------------------------------- */

uint32_t ra_client_abi_version(void)
{
    return RA_CLIENT_ABI_VERSION;
}

size_t ra_client_struct_size(ra_client_struct which)
{
    /* indexed by ra_client_struct; a new struct is one more line here */
    static const size_t sizes[RA_CLIENT_STRUCT_COUNT] = {
        [RA_CLIENT_STRUCT_OPTS] = sizeof(ra_client_opts),
        [RA_CLIENT_STRUCT_SERVER_LIMITS] = sizeof(ra_server_limits),
        [RA_CLIENT_STRUCT_SERVER_INFO] = sizeof(ra_server_info),
        [RA_CLIENT_STRUCT_INDEX_OPTS] = sizeof(ra_client_index_opts),
        [RA_CLIENT_STRUCT_SESSION_DESC] = sizeof(ra_session_desc),
        [RA_CLIENT_STRUCT_KV_BATCH] = sizeof(ra_kv_batch),
        [RA_CLIENT_STRUCT_ATTEND_REQ] = sizeof(ra_attend_req),
        [RA_CLIENT_STRUCT_ATTEND_OUT] = sizeof(ra_attend_out),
        [RA_CLIENT_STRUCT_OP_STATS] = sizeof(ra_op_stats),
        [RA_CLIENT_STRUCT_SERVER_STATS] = sizeof(ra_server_stats),
        [RA_CLIENT_STRUCT_SESSION_STATS] = sizeof(ra_session_stats),
        [RA_CLIENT_STRUCT_ATTEND_BATCH_REQ] = sizeof(ra_attend_batch_req),
        [RA_CLIENT_STRUCT_SESSION_TOKEN] = sizeof(ra_session_token),
        [RA_CLIENT_STRUCT_SESSION_INFO] = sizeof(ra_session_info),
    };
    return (unsigned)which < RA_CLIENT_STRUCT_COUNT ? sizes[which] : 0;
}

const char *ra_client_version(void)
{
    return RA_CLIENT_VERSION;
}
