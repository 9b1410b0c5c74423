/* The operations side of ratd (see ratd_ops.h). The serving path touches it at three
 * points only: every reply is counted (ratd_ops_on_reply: relaxed atomic adds into
 * per-type counters and fixed latency buckets), the I/O loop calls ratd_ops_tick once
 * per turn, and the request types ListSessions, GetConfig and WaitReady are handed
 * here. The metrics thread (libmicrohttpd's) reads the atomics directly and everything
 * the I/O thread owns (sessions, memory, byte counters) from a snapshot the I/O thread
 * publishes under a mutex at most every 250 ms, so it never touches the session table.
 * A WaitReady is parked, not polled by the client: it is answered when the session has
 * no Offload/Append queued or running and no index build running, when the session
 * goes, or at its deadline, so waiting costs one request however long it takes. */
#define _GNU_SOURCE
#include "ratd_ops.h"

#include <errno.h>
#include <malloc.h>
#include <microhttpd.h>
#include <netdb.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>

#include "ra_log.h"
#include "ratd_internal.h"

#define N_TYPES 11 /* MsgType 0..10; 0 counts requests of an unknown type */
#define WAIT_DEFAULT_MS 30000u
#define WAIT_MAX_MS RA_PROTO_MAX_WAIT_MS

static const uint64_t g_bucket_us[RATD_OPS_N_BUCKETS] = {
    25,     50,     100,    250,     500,     1000,    2500,    5000,     10000,    25000,
    50000,  100000, 250000, 500000,  1000000, 2500000, 5000000, 10000000, 30000000, 60000000};

typedef struct op_metric {
    uint64_t count, errors, sum_us;
    uint64_t bucket[RATD_OPS_N_BUCKETS + 1]; /* not cumulative; the last is +Inf */
} op_metric;

typedef struct snap_session {
    uint64_t id, bytes, tokens;
} snap_session;

typedef struct waiter {
    ratd_job *job;
    uint64_t session;
    double deadline, t0;
} waiter;

struct ratd_ops {
    op_metric m[N_TYPES]; /* atomics */
    /* the I/O thread's snapshot for the metrics thread */
    pthread_mutex_t mu;
    snap_session *snap;
    int n_snap, cap_snap;
    uint64_t sessions, mem_used, mem_limit, requests, bad_messages, bytes_in, bytes_out, tokens;
    int active, max_queue, n_waiting;
    double t_pub;
    /* parked WaitReady requests, I/O thread */
    waiter *wait;
    int n_wait, cap_wait;
    /* heap trimming, I/O thread */
    uint64_t seen_requests, trimmed_requests;
    double t_busy, t_trim;
    /* the endpoint */
    struct MHD_Daemon *mhd;
};

/* ---- counting ------------------------------------------------------------------------ */

void ratd_ops_on_reply(ratd_server *s, int type, ra_status st, uint64_t us)
{
    if (!s->ops)
        return;
    op_metric *m = &s->ops->m[type > 0 && type < N_TYPES ? type : 0];
    int b = 0;
    while (b < RATD_OPS_N_BUCKETS && us > g_bucket_us[b])
        b++;
    __atomic_add_fetch(&m->count, 1, __ATOMIC_RELAXED);
    __atomic_add_fetch(&m->errors, st != RA_OK, __ATOMIC_RELAXED);
    __atomic_add_fetch(&m->sum_us, us, __ATOMIC_RELAXED);
    __atomic_add_fetch(&m->bucket[b], 1, __ATOMIC_RELAXED);
}

static void publish(ratd_server *s)
{
    ratd_ops *o = s->ops;
    pthread_mutex_lock(&o->mu);
    if (s->n_sessions > o->cap_snap) {
        int cap = s->n_sessions * 2;
        snap_session *n = realloc(o->snap, (size_t)cap * sizeof *n);
        if (n) {
            o->snap = n;
            o->cap_snap = cap;
        }
    }
    o->n_snap = s->n_sessions < o->cap_snap ? s->n_sessions : o->cap_snap;
    for (int i = 0; i < o->n_snap; i++) {
        ratd_session *ss = s->sessions[i];
        o->snap[i].id = ss->id;
        o->snap[i].bytes = __atomic_load_n(&ss->mem.used, __ATOMIC_RELAXED);
        o->snap[i].tokens = ss->tokens;
    }
    o->sessions = (uint64_t)s->n_sessions;
    o->mem_used = __atomic_load_n(&s->mem.used, __ATOMIC_RELAXED);
    o->mem_limit = s->mem.limit;
    o->requests = s->requests;
    o->bad_messages = s->bad_messages;
    o->bytes_in = s->bytes_in;
    o->bytes_out = s->bytes_out;
    o->tokens = s->tokens;
    o->active = s->active;
    o->max_queue = s->cfg.max_queue;
    o->n_waiting = o->n_wait;
    pthread_mutex_unlock(&o->mu);
}

/* ---- the Prometheus text ---------------------------------------------------------------- */

static uint64_t ld(const uint64_t *p)
{
    return __atomic_load_n(p, __ATOMIC_RELAXED);
}

/* The q-quantile of a histogram, interpolated inside its bucket (seconds). */
static double quantile(const uint64_t *bk, uint64_t count, double q)
{
    if (!count)
        return 0;
    double want = q * (double)count, cum = 0;
    for (int b = 0; b <= RATD_OPS_N_BUCKETS; b++) {
        double n = (double)bk[b];
        if (cum + n >= want && n > 0) {
            if (b == RATD_OPS_N_BUCKETS) /* beyond the last bound: say the bound */
                return (double)g_bucket_us[RATD_OPS_N_BUCKETS - 1] * 1e-6;
            double lo = b ? (double)g_bucket_us[b - 1] : 0, hi = (double)g_bucket_us[b];
            return (lo + (hi - lo) * (want - cum) / n) * 1e-6;
        }
        cum += n;
    }
    return (double)g_bucket_us[RATD_OPS_N_BUCKETS - 1] * 1e-6;
}

static long rss_bytes(void)
{
    FILE *f = fopen("/proc/self/status", "r");
    if (!f)
        return -1;
    char line[256];
    long kb = -1;
    while (fgets(line, sizeof line, f))
        if (sscanf(line, "VmRSS: %ld kB", &kb) == 1)
            break;
    fclose(f);
    return kb < 0 ? -1 : kb * 1024;
}

static char *metrics_text(ratd_server *s, size_t *len)
{
    ratd_ops *o = s->ops;
    char *buf = NULL;
    FILE *f = open_memstream(&buf, len);
    if (!f)
        return NULL;
    fprintf(f, "# HELP ratd_uptime_seconds Seconds since the daemon started.\n"
               "# TYPE ratd_uptime_seconds gauge\nratd_uptime_seconds %.3f\n",
            ra_now_s() - s->t0);
    static const char *hdr[][3] = {
        {"ratd_requests_total", "counter", "Replies sent, by request type."},
        {"ratd_request_errors_total", "counter", "Replies with a status other than RA_OK."},
    };
    for (int k = 0; k < 2; k++) {
        fprintf(f, "# HELP %s %s\n# TYPE %s %s\n", hdr[k][0], hdr[k][2], hdr[k][0], hdr[k][1]);
        for (int t = 1; t < N_TYPES; t++)
            fprintf(f, "%s{type=\"%s\"} %llu\n", hdr[k][0], ra_proto_type_name(t),
                    (unsigned long long)ld(k ? &o->m[t].errors : &o->m[t].count));
    }
    fprintf(f, "# HELP ratd_request_duration_seconds Time from a request's arrival to its "
               "reply.\n# TYPE ratd_request_duration_seconds histogram\n");
    uint64_t bk[N_TYPES][RATD_OPS_N_BUCKETS + 1], cnt[N_TYPES];
    for (int t = 1; t < N_TYPES; t++) {
        uint64_t cum = 0;
        for (int b = 0; b <= RATD_OPS_N_BUCKETS; b++) {
            bk[t][b] = ld(&o->m[t].bucket[b]);
            cum += bk[t][b];
            if (b < RATD_OPS_N_BUCKETS)
                fprintf(f, "ratd_request_duration_seconds_bucket{type=\"%s\",le=\"%g\"} %llu\n",
                        ra_proto_type_name(t), (double)g_bucket_us[b] * 1e-6,
                        (unsigned long long)cum);
            else
                fprintf(f, "ratd_request_duration_seconds_bucket{type=\"%s\",le=\"+Inf\"} %llu\n",
                        ra_proto_type_name(t), (unsigned long long)cum);
        }
        cnt[t] = cum; /* the buckets' own total, consistent with them */
        fprintf(f, "ratd_request_duration_seconds_sum{type=\"%s\"} %.6f\n",
                ra_proto_type_name(t), (double)ld(&o->m[t].sum_us) * 1e-6);
        fprintf(f, "ratd_request_duration_seconds_count{type=\"%s\"} %llu\n",
                ra_proto_type_name(t), (unsigned long long)cum);
    }
    fprintf(f, "# HELP ratd_request_duration_quantile_seconds Latency quantiles estimated from "
               "the histogram's buckets.\n# TYPE ratd_request_duration_quantile_seconds gauge\n");
    static const double qs[] = {0.5, 0.99, 0.999};
    for (int t = 1; t < N_TYPES; t++)
        for (int i = 0; i < 3; i++)
            fprintf(f, "ratd_request_duration_quantile_seconds{type=\"%s\",quantile=\"%g\"} %.6f\n",
                    ra_proto_type_name(t), qs[i], quantile(bk[t], cnt[t], qs[i]));
    fprintf(f, "# HELP ratd_unknown_type_requests_total Requests of a type this daemon does "
               "not know.\n# TYPE ratd_unknown_type_requests_total counter\n"
               "ratd_unknown_type_requests_total %llu\n",
            (unsigned long long)ld(&o->m[0].count));

    pthread_mutex_lock(&o->mu);
    fprintf(f,
            "# TYPE ratd_bad_messages_total counter\nratd_bad_messages_total %llu\n"
            "# TYPE ratd_received_bytes_total counter\nratd_received_bytes_total %llu\n"
            "# TYPE ratd_sent_bytes_total counter\nratd_sent_bytes_total %llu\n"
            "# HELP ratd_sessions Live sessions.\n# TYPE ratd_sessions gauge\nratd_sessions %llu\n"
            "# TYPE ratd_tokens gauge\nratd_tokens %llu\n"
            "# HELP ratd_memory_used_bytes Accounted memory: K, V, indexes, tables (dropped "
            "sessions until the reaper frees them).\n# TYPE ratd_memory_used_bytes gauge\n"
            "ratd_memory_used_bytes %llu\n"
            "# TYPE ratd_memory_limit_bytes gauge\nratd_memory_limit_bytes %llu\n"
            "# HELP ratd_jobs_active Offload/Append/Attend requests queued or running.\n"
            "# TYPE ratd_jobs_active gauge\nratd_jobs_active %d\n"
            "# TYPE ratd_jobs_limit gauge\nratd_jobs_limit %d\n"
            "# HELP ratd_waits_parked WaitReady requests waiting for index builds.\n"
            "# TYPE ratd_waits_parked gauge\nratd_waits_parked %d\n",
            (unsigned long long)o->bad_messages, (unsigned long long)o->bytes_in,
            (unsigned long long)o->bytes_out, (unsigned long long)o->sessions,
            (unsigned long long)o->tokens, (unsigned long long)o->mem_used,
            (unsigned long long)o->mem_limit, o->active, o->max_queue, o->n_waiting);
    fprintf(f, "# HELP ratd_session_memory_bytes Accounted memory of one live session.\n"
               "# TYPE ratd_session_memory_bytes gauge\n");
    for (int i = 0; i < o->n_snap; i++)
        fprintf(f, "ratd_session_memory_bytes{session=\"%llu\"} %llu\n",
                (unsigned long long)o->snap[i].id, (unsigned long long)o->snap[i].bytes);
    fprintf(f, "# TYPE ratd_session_tokens gauge\n");
    for (int i = 0; i < o->n_snap; i++)
        fprintf(f, "ratd_session_tokens{session=\"%llu\"} %llu\n",
                (unsigned long long)o->snap[i].id, (unsigned long long)o->snap[i].tokens);
    pthread_mutex_unlock(&o->mu);

    ra_index_build_counts bc;
    ra_index_build_counts_get(&bc);
    fprintf(f,
            "# HELP ratd_index_builds Index builds now waiting for a build slot or running.\n"
            "# TYPE ratd_index_builds gauge\nratd_index_builds{state=\"queued\"} %llu\n"
            "ratd_index_builds{state=\"running\"} %llu\n"
            "# HELP ratd_index_builds_total Index builds ended, by result.\n"
            "# TYPE ratd_index_builds_total counter\n"
            "ratd_index_builds_total{result=\"built\"} %llu\n"
            "ratd_index_builds_total{result=\"failed\"} %llu\n"
            "ratd_index_builds_total{result=\"cancelled\"} %llu\n"
            "# TYPE ratd_index_build_seconds_total counter\nratd_index_build_seconds_total %.3f\n",
            (unsigned long long)bc.queued, (unsigned long long)bc.running,
            (unsigned long long)bc.done, (unsigned long long)bc.failed,
            (unsigned long long)bc.cancelled, bc.seconds);
    uint64_t probes, raises, lowers;
    ra_index_probe_counts_get(&probes, &raises, &lowers);
    fprintf(f,
            "# HELP ratd_index_probes_total Recall probes of default-effort searches run.\n"
            "# TYPE ratd_index_probes_total counter\nratd_index_probes_total %llu\n"
            "# HELP ratd_index_effort_changes_total Default-effort changes the probes made.\n"
            "# TYPE ratd_index_effort_changes_total counter\n"
            "ratd_index_effort_changes_total{direction=\"up\"} %llu\n"
            "ratd_index_effort_changes_total{direction=\"down\"} %llu\n",
            (unsigned long long)probes, (unsigned long long)raises, (unsigned long long)lowers);
    long rss = rss_bytes();
    if (rss >= 0)
        fprintf(f, "# HELP ratd_resident_memory_bytes The process's resident set (VmRSS).\n"
                   "# TYPE ratd_resident_memory_bytes gauge\nratd_resident_memory_bytes %ld\n",
                rss);
    if (fclose(f) != 0) {
        free(buf);
        return NULL;
    }
    return buf;
}

static enum MHD_Result on_http(void *cls, struct MHD_Connection *conn, const char *url,
                               const char *method, const char *version, const char *upload,
                               size_t *upload_size, void **con_cls)
{
    (void)version;
    (void)upload;
    ratd_server *s = cls;
    if (!*con_cls) { /* first call: headers only; answer on the second */
        static int marker;
        *con_cls = &marker;
        return MHD_YES;
    }
    if (*upload_size) { /* a body we do not want */
        *upload_size = 0;
        return MHD_YES;
    }
    unsigned code = MHD_HTTP_OK;
    char *body = NULL;
    size_t len = 0;
    const char *ctype = "text/plain; version=0.0.4; charset=utf-8";
    if (strcmp(method, "GET") != 0 && strcmp(method, "HEAD") != 0) {
        code = MHD_HTTP_METHOD_NOT_ALLOWED;
        body = strdup("ratd metrics: only GET /metrics\n");
    } else if (!strcmp(url, "/metrics")) {
        body = metrics_text(s, &len);
        if (!body) {
            code = MHD_HTTP_INTERNAL_SERVER_ERROR;
            body = strdup("ratd metrics: out of memory\n");
        }
    } else if (!strcmp(url, "/")) {
        body = strdup("ratd: Prometheus metrics at /metrics\n");
    } else {
        code = MHD_HTTP_NOT_FOUND;
        body = strdup("ratd metrics: not found; try /metrics\n");
    }
    if (!body)
        return MHD_NO;
    if (!len)
        len = strlen(body);
    struct MHD_Response *r = MHD_create_response_from_buffer(len, body, MHD_RESPMEM_MUST_FREE);
    if (!r) {
        free(body);
        return MHD_NO;
    }
    MHD_add_response_header(r, "Content-Type", ctype);
    enum MHD_Result ret = MHD_queue_response(conn, code, r);
    MHD_destroy_response(r);
    return ret;
}

/* tcp://host:port (host may be [v6]) into a bound-ready address; err on failure. */
static ra_status metrics_start(ratd_server *s, char *err, size_t errlen)
{
    const char *ep = s->cfg.metrics;
    char host[256], port[16];
    if (ratd_tcp_split(ep, host, sizeof host, port, sizeof port) < 0) {
        snprintf(err, errlen, "metrics endpoint %s: expected tcp://host:port", ep);
        return RA_EINVAL;
    }
    if (!ratd_endpoint_is_loopback(ep, 0) && !s->cfg.metrics_allow_remote) {
        snprintf(err, errlen,
                 "metrics endpoint %s is not a loopback address; metrics have no "
                 "authentication, so this needs --metrics-allow-remote (or "
                 "tcp://127.0.0.1:PORT)",
                 ep);
        return RA_EINVAL;
    }
    struct addrinfo hints, *ai = NULL;
    memset(&hints, 0, sizeof hints);
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    hints.ai_flags = AI_NUMERICSERV | AI_PASSIVE;
    int gr = getaddrinfo(host, port, &hints, &ai);
    if (gr != 0 || !ai) {
        snprintf(err, errlen, "metrics endpoint %s: %s", ep, gai_strerror(gr));
        return RA_EINVAL;
    }
    /* poll/epoll, not select(): ratd raises its descriptor limit for its clients, and a
     * scrape accepted on a descriptor >= FD_SETSIZE would be closed by select()'s MHD */
    unsigned flags = MHD_USE_AUTO_INTERNAL_THREAD | MHD_USE_ERROR_LOG;
    if (ai->ai_family == AF_INET6)
        flags |= MHD_USE_IPv6;
    s->ops->mhd = MHD_start_daemon(flags, 0, NULL, NULL, on_http, s, MHD_OPTION_SOCK_ADDR,
                                   ai->ai_addr, MHD_OPTION_CONNECTION_LIMIT, (unsigned)16,
                                   MHD_OPTION_CONNECTION_TIMEOUT, (unsigned)10, MHD_OPTION_END);
    int e = errno;
    freeaddrinfo(ai);
    if (!s->ops->mhd) {
        snprintf(err, errlen, "cannot serve metrics on %s: %s", ep,
                 e ? strerror(e) : "the HTTP server did not start");
        return RA_EIO;
    }
    int v6 = strchr(host, ':') != NULL; /* an IPv6 address goes back into brackets */
    RA_INFO("metrics: Prometheus text at http://%s%s%s:%s/metrics", v6 ? "[" : "", host,
            v6 ? "]" : "", port);
    return RA_OK;
}

ra_status ratd_ops_create(ratd_server *s, char *err, size_t errlen)
{
    ratd_ops *o = calloc(1, sizeof *o);
    if (!o) {
        snprintf(err, errlen, "out of memory");
        return RA_ENOMEM;
    }
    pthread_mutex_init(&o->mu, NULL);
    o->t_busy = o->t_trim = ra_now_s();
    s->ops = o;
    publish(s);
    if (s->cfg.metrics[0])
        return metrics_start(s, err, errlen);
    return RA_OK;
}

void ratd_ops_destroy(ratd_server *s)
{
    ratd_ops *o = s->ops;
    if (!o)
        return;
    if (o->mhd)
        MHD_stop_daemon(o->mhd); /* joins its thread: nobody reads s after this */
    pthread_mutex_destroy(&o->mu);
    free(o->snap);
    free(o->wait);
    free(o);
    s->ops = NULL;
}

/* ---- ListSessions / GetConfig / WaitReady -------------------------------------------- */

int ratd_ops_owns(int type)
{
    return type == RATD__MSG_TYPE__LIST_SESSIONS || type == RATD__MSG_TYPE__GET_CONFIG ||
           type == RATD__MSG_TYPE__WAIT_READY;
}

/* Heads building, and whether an Offload/Append of the session is queued or running. */
static int session_pending(ratd_session *ss, uint32_t *heads, uint32_t *ready, uint32_t *building)
{
    int jobs = 0;
    for (int l = 0; l < ss->n_layers; l++)
        for (ratd_lane_node *nd = ss->lanes[l].head; nd; nd = nd->next)
            jobs += nd->job->kind == JOB_TOKENS;
    *heads = *ready = *building = 0;
    for (int i = 0; i < ss->n_layers * ss->n_kv; i++) {
        ra_head *h = __atomic_load_n(&ss->heads[i], __ATOMIC_ACQUIRE);
        if (!h)
            continue;
        *heads += ra_head_count(h) > 0 ? 1u : 0u; /* holding tokens */
        *ready += ra_head_ready(h) ? 1u : 0u;
        *building += ra_head_building(h) ? 1u : 0u;
    }
    return jobs;
}

static void list_sessions(ratd_server *s, ratd_job *j, Ratd__Header *rep)
{
    int n = s->n_sessions;
    Ratd__SessionInfo *info = calloc((size_t)(n ? n : 1), sizeof *info);
    Ratd__SessionInfo **ptr = calloc((size_t)(n ? n : 1), sizeof *ptr);
    Ratd__ListSessionsReply lr = RATD__LIST_SESSIONS_REPLY__INIT;
    ra_status st = RA_OK;
    if (!info || !ptr) {
        ratd_job_set_err(j, RA_ENOMEM, "out of memory listing %d sessions", n);
        st = RA_ENOMEM;
        goto out;
    }
    double now = ra_now_s();
    for (int i = 0; i < n; i++) {
        ratd_session *ss = s->sessions[i];
        Ratd__SessionInfo *x = &info[i];
        ratd__session_info__init(x);
        x->id = ss->id;
        x->n_layers = (uint32_t)ss->n_layers;
        x->n_q_heads = (uint32_t)ss->n_q;
        x->n_kv_heads = (uint32_t)ss->n_kv;
        x->head_dim = (uint32_t)ss->dim;
        x->dtype = (Ratd__DType)ss->dtype;
        x->index_kind = (uint32_t)ss->iopts.kind;
        x->tokens = ss->tokens;
        x->bytes = __atomic_load_n(&ss->mem.used, __ATOMIC_RELAXED);
        session_pending(ss, &x->heads, &x->heads_ready, &x->heads_building);
        x->idle_s = now - ss->last_used;
        x->jobs = (uint32_t)(ss->refs > 0 ? ss->refs - 1 : 0);
        ptr[i] = x;
    }
    lr.n_sessions = (size_t)n;
    lr.sessions = ptr;
    rep->session_list = &lr;
out:
    ratd_reply(s, j, rep, st);
    free(info);
    free(ptr);
}

static void get_config(ratd_server *s, ratd_job *j, Ratd__Header *rep)
{
    size_t n = 0;
    const char *name;
    char val[600];
    while (ratd_config_value(&s->cfg, n, &name, val, sizeof val))
        n++;
    Ratd__ConfigEntry *e = calloc(n ? n : 1, sizeof *e);
    Ratd__ConfigEntry **ptr = calloc(n ? n : 1, sizeof *ptr);
    char *vals = calloc(n ? n : 1, sizeof val);
    Ratd__ConfigReply cr = RATD__CONFIG_REPLY__INIT;
    ra_status st = RA_OK;
    if (!e || !ptr || !vals) {
        ratd_job_set_err(j, RA_ENOMEM, "out of memory listing the configuration");
        st = RA_ENOMEM;
    } else {
        for (size_t i = 0; i < n; i++) {
            ratd__config_entry__init(&e[i]);
            ratd_config_value(&s->cfg, i, &name, vals + i * sizeof val, sizeof val);
            e[i].name = (char *)name;
            e[i].value = vals + i * sizeof val;
            ptr[i] = &e[i];
        }
        cr.n_options = n;
        cr.options = ptr;
        rep->config = &cr;
    }
    ratd_reply(s, j, rep, st);
    free(e);
    free(ptr);
    free(vals);
}

static void wait_park(ratd_server *s, ratd_job *j, Ratd__Header *rep)
{
    ratd_ops *o = s->ops;
    uint64_t sid = j->v.hdr->session;
    uint32_t ms = j->v.hdr->wait ? j->v.hdr->wait->timeout_ms : 0;
    if (!ms)
        ms = WAIT_DEFAULT_MS;
    if (ms > WAIT_MAX_MS) {
        ratd_job_set_err(j, RA_EINVAL, "wait timeout %u ms is over the limit of %u ms", ms,
                         WAIT_MAX_MS);
        ratd_reply(s, j, rep, RA_EINVAL);
        return;
    }
    const ProtobufCBinaryData *tok = &j->v.hdr->token; /* the session's owner only */
    if (!ratd_session_get(s, sid, tok->data, tok->len, j->peer, j->err, sizeof j->err)) {
        j->st = RA_ENOSESSION;
        ratd_reply(s, j, rep, RA_ENOSESSION);
        return;
    }
    if (o->n_wait >= s->cfg.max_queue) {
        ratd_job_set_err(j, RA_EBUSY, "%d waits are parked, the limit set by --max-queue",
                         o->n_wait);
        ratd_reply(s, j, rep, RA_EBUSY);
        return;
    }
    if (o->n_wait == o->cap_wait) {
        int cap = o->cap_wait ? 2 * o->cap_wait : 8;
        waiter *w = realloc(o->wait, (size_t)cap * sizeof *w);
        if (!w) {
            ratd_job_set_err(j, RA_ENOMEM, "out of memory parking a wait");
            ratd_reply(s, j, rep, RA_ENOMEM);
            return;
        }
        o->wait = w;
        o->cap_wait = cap;
    }
    double now = ra_now_s();
    o->wait[o->n_wait++] = (waiter){j, sid, now + ms * 1e-3, now};
    ratd_ops_tick(s, 0); /* ready already: answered at once */
}

void ratd_ops_handle(ratd_server *s, ratd_job *j)
{
    Ratd__Header rep = RATD__HEADER__INIT;
    rep.session = j->v.hdr->session;
    rep.layer = j->v.hdr->layer;
    switch (j->type) {
    case RATD__MSG_TYPE__LIST_SESSIONS:
        list_sessions(s, j, &rep);
        break;
    case RATD__MSG_TYPE__GET_CONFIG:
        get_config(s, j, &rep);
        break;
    default:
        wait_park(s, j, &rep);
        break;
    }
}

/* 1 when waiter w was answered. */
static int wait_check(ratd_server *s, waiter *w, double now, int closing)
{
    Ratd__Header rep = RATD__HEADER__INIT;
    rep.session = w->session;
    ratd_job *j = w->job;
    ratd_session *ss = ratd_session_find(s, w->session);
    ra_status st = RA_OK;
    uint32_t heads = 0, ready = 0, building = 0;
    int jobs = ss ? session_pending(ss, &heads, &ready, &building) : 0;
    if (closing) {
        st = RA_ECLOSED;
        ratd_job_set_err(j, st, "the daemon is stopping");
    } else if (!ss) {
        st = RA_ENOSESSION;
        ratd_job_set_err(j, st, "session %llu was dropped while waiting for its index builds",
                         (unsigned long long)w->session);
    } else if (jobs || building) {
        if (now < w->deadline) {
            ss->last_used = now; /* a client waiting on it uses it (--session-ttl) */
            return 0;
        }
        st = RA_ETIMEDOUT;
        ratd_job_set_err(j, st,
                         "session %llu: %u of %u index builds still running and %d "
                         "Offload/Append requests pending after %.0f ms",
                         (unsigned long long)w->session, building, heads, jobs,
                         (w->deadline - w->t0) * 1e3);
    }
    ratd_reply(s, j, &rep, st);
    return 1;
}

static void waits_check(ratd_server *s, int closing)
{
    ratd_ops *o = s->ops;
    double now = ra_now_s();
    for (int i = 0; i < o->n_wait;) {
        if (wait_check(s, &o->wait[i], now, closing))
            o->wait[i] = o->wait[--o->n_wait]; /* order among waiters does not matter */
        else
            i++;
    }
}

void ratd_ops_flush(ratd_server *s)
{
    if (s->ops)
        waits_check(s, 1);
}

void ratd_ops_trim(ratd_server *s)
{
    ratd_ops *o = s->ops;
    double now = ra_now_s();
    if (!o || now - o->t_trim < 0.1)
        return;
    malloc_trim(0);
    o->t_trim = now;
    o->trimmed_requests = s->requests;
}

int ratd_ops_tick(ratd_server *s, int timeout_ms)
{
    ratd_ops *o = s->ops;
    if (!o)
        return timeout_ms;
    double now = ra_now_s();
    if (o->n_wait)
        waits_check(s, 0);
    if (now - o->t_pub >= 0.25) {
        publish(s);
        o->t_pub = now;
    }
    /* idle for a second after some traffic: give freed pages back to the kernel */
    if (s->requests != o->seen_requests || s->active) {
        o->seen_requests = s->requests;
        o->t_busy = now;
    } else if (o->trimmed_requests != s->requests && now - o->t_busy >= 1.0 && !o->n_wait) {
        malloc_trim(0);
        o->t_trim = now;
        o->trimmed_requests = s->requests;
    }
    if (o->n_wait && timeout_ms > 5)
        return 5;
    if (o->trimmed_requests != s->requests && timeout_ms > 250)
        return 250;
    return timeout_ms;
}
