/* The ratd request loop (see ratd_server.h). Order of work for every message:
 * receive all frames (bounded count) -> ra_proto_parse (header size, frame sizes,
 * frame/shape agreement) -> version -> per-type checks of ids, shapes and limits
 * against the session -> only then allocate and touch index/ -> one reply.
 * Sessions own one ra_head per (layer, KV head), created when the layer first
 * receives tokens; query head h reads KV head h / (n_q_heads / n_kv_heads). */
#include "ratd_server.h"

#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>
#include <zmq.h>

#include "ra_index.h"
#include "ra_log.h"
#include "ra_proto.h"
#include "ratd_pool.h"

#ifndef RATD_VERSION
#define RATD_VERSION "0.1.0"
#endif

/* Previous result ids kept per query head as graph entry points for the next step. */
#define RATD_WARM 32
#define N_OPS 7

typedef struct ratd_session {
    uint64_t id;
    int n_layers, n_q, n_kv, dim, rep;
    ra_dtype dtype;
    ra_index_opts iopts;
    ra_head **heads;  /* [n_layers][n_kv], NULL until the layer gets tokens */
    int32_t *warm;    /* [n_layers][n_q][RATD_WARM] */
    int *n_warm;      /* [n_layers][n_q] */
    uint8_t *broken;  /* [n_layers]: a failed store left KV heads out of step */
    size_t own_bytes; /* heads/warm tables, accounted */
    uint64_t tokens;
} ratd_session;

typedef struct op_stat {
    uint64_t count, errors, total_us, max_us;
} op_stat;

struct ratd_server {
    ratd_config cfg;
    void *ctx, *sock;
    ratd_pool *pool;
    ra_mem mem;
    ra_proto_limits lim;
    ratd_session **sessions;
    int n_sessions;
    uint64_t next_session;
    char ipc_path[512];
    double t0;
    uint64_t requests, errors, bad_messages, bytes_in, bytes_out, tokens;
    op_stat ops[N_OPS];
};

/* ---- helpers --------------------------------------------------------------------- */

static ratd_session *session_find(ratd_server *s, uint64_t id, int *idx)
{
    for (int i = 0; i < s->n_sessions; i++)
        if (s->sessions[i]->id == id) {
            if (idx)
                *idx = i;
            return s->sessions[i];
        }
    return NULL;
}

static void session_free(ratd_server *s, ratd_session *ss)
{
    if (!ss)
        return;
    if (ss->heads)
        for (int i = 0; i < ss->n_layers * ss->n_kv; i++)
            if (ss->heads[i])
                ra_head_destroy(ss->heads[i]); /* waits for a running build */
    free(ss->heads);
    free(ss->warm);
    free(ss->n_warm);
    free(ss->broken);
    ra_mem_release(&s->mem, ss->own_bytes);
    if (s->tokens >= ss->tokens)
        s->tokens -= ss->tokens;
    free(ss);
}

static int all_finite(const void *p, size_t n, ra_dtype dt)
{
    if (dt == RA_DTYPE_F32) {
        const float *f = p;
        for (size_t i = 0; i < n; i++)
            if (!isfinite(f[i]))
                return 0;
        return 1;
    }
    const uint16_t *h = p;
    uint16_t mask = dt == RA_DTYPE_F16 ? 0x7c00u : 0x7f80u;
    for (size_t i = 0; i < n; i++)
        if ((h[i] & mask) == mask)
            return 0;
    return 1;
}

static const char *wire_dtype_name(int dt)
{
    static const char *n[] = {"f32", "f16", "bf16", "i64", "i32"};
    return dt >= 0 && dt < 5 ? n[dt] : "unknown-dtype";
}

static void shape_str(const Ratd__Tensor *t, char *buf, size_t len)
{
    size_t o = 0;
    o += (size_t)snprintf(buf + o, len - o, "[");
    for (size_t d = 0; d < t->n_shape && o < len; d++)
        o += (size_t)snprintf(buf + o, len - o, "%s%llu", d ? "," : "",
                              (unsigned long long)t->shape[d]);
    if (o < len)
        snprintf(buf + o, len - o, "]");
}

/* Checks that tensor `role` exists with dtype dt and the given shape (ndim dims). */
static ra_status want_tensor(ra_proto_view *v, Ratd__Role role, const char *name, int dt, int ndim,
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
        shape_str(t, got, sizeof got);
        Ratd__Tensor e = *t;
        e.n_shape = (size_t)ndim;
        e.shape = (uint64_t *)shape;
        shape_str(&e, exp, sizeof exp);
        snprintf(err, errlen, "%s is %s %s but the session expects %s %s", name,
                 wire_dtype_name(t->dtype), got, wire_dtype_name(dt), exp);
        return RA_ESHAPE;
    }
    *idx = i;
    return RA_OK;
}

/* ---- handlers ---------------------------------------------------------------------- */

typedef struct reply {
    Ratd__Header *h;
    ra_proto_part parts[6];
    int n_parts;
    char *err;
    size_t errlen;
} reply;

static ra_status do_hello(ratd_server *s, ra_proto_view *v, reply *r, Ratd__HelloReply *hr,
                          Ratd__Limits *lm)
{
    hr->capabilities = 1u | 2u | 4u | 8u | 16u | (ratd_pool_bound(s->pool) ? 32u : 0u);
    hr->server_version = (char *)RATD_VERSION;
    hr->workers = (uint32_t)ratd_pool_workers(s->pool);
    hr->numa_node = ratd_pool_numa_node(s->pool);
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
    hr->limits = lm;
    r->h->hello = hr; /* also sent with a version refusal: the client sees our limits */
    return RA_OK;
}

static ra_status do_create(ratd_server *s, ra_proto_view *v, reply *r)
{
    const Ratd__CreateSession *c = v->hdr->create;
    if (!c) {
        snprintf(r->err, r->errlen, "CreateSession without its parameters");
        return RA_EPROTO;
    }
    const ratd_config *cfg = &s->cfg;
    if (c->n_layers < 1 || c->n_layers > (uint32_t)cfg->max_layers) {
        snprintf(r->err, r->errlen, "n_layers %u outside 1..%d (max-layers)", c->n_layers,
                 cfg->max_layers);
        return c->n_layers ? RA_ETOOBIG : RA_EINVAL;
    }
    if (c->n_q_heads < 1 || c->n_q_heads > (uint32_t)cfg->max_heads) {
        snprintf(r->err, r->errlen, "n_q_heads %u outside 1..%d (max-heads)", c->n_q_heads,
                 cfg->max_heads);
        return c->n_q_heads ? RA_ETOOBIG : RA_EINVAL;
    }
    if (c->n_kv_heads < 1 || c->n_kv_heads > c->n_q_heads || c->n_q_heads % c->n_kv_heads) {
        snprintf(r->err, r->errlen,
                 "n_kv_heads %u must divide n_q_heads %u (GQA groups of equal size)", c->n_kv_heads,
                 c->n_q_heads);
        return RA_EINVAL;
    }
    if (c->head_dim < 1 || c->head_dim > (uint32_t)cfg->max_dim) {
        snprintf(r->err, r->errlen, "head_dim %u outside 1..%d (max-dim)", c->head_dim,
                 cfg->max_dim);
        return c->head_dim ? RA_ETOOBIG : RA_EINVAL;
    }
    if ((unsigned)c->dtype > RATD__DTYPE__BF16) {
        snprintf(r->err, r->errlen, "dtype %d: K/V must be f32 (0), f16 (1) or bf16 (2)",
                 (int)c->dtype);
        return RA_EINVAL;
    }
    ra_index_opts io;
    ra_index_opts_default(&io);
    const Ratd__IndexOptions *x = c->index;
    if (x) {
        if (x->kind > RA_INDEX_HNSW) {
            snprintf(r->err, r->errlen, "index kind %u: 0 graph, 1 flat, 2 ivf, 3 hnsw", x->kind);
            return RA_EINVAL;
        }
        const uint32_t big = 1u << 20;
        if (x->graph_knn > big || x->graph_degree > 4096 || x->graph_build_ef > big ||
            x->graph_entries > 4096 || x->n_train > (1u << 24) || x->ivf_nlist > big ||
            x->hnsw_m > 1024 || x->threads > 1024) {
            snprintf(r->err, r->errlen,
                     "an index option is out of range (knn, ef, nlist <= "
                     "2^20; degree, entries <= 4096; hnsw_m, threads <= 1024)");
            return RA_EINVAL;
        }
        io.kind = (ra_index_kind)x->kind;
#define OV(f)                                                                                      \
    if (x->f)                                                                                      \
        io.f = (int)x->f;
        OV(graph_knn)
        OV(graph_degree)
        OV(graph_build_ef) OV(graph_entries) OV(n_train) OV(ivf_nlist) OV(hnsw_m) OV(threads)
#undef OV
            if (x->seed) io.seed = x->seed;
    }
    if (!io.threads && cfg->index_threads)
        io.threads = cfg->index_threads;
    if (s->n_sessions >= cfg->max_sessions) {
        snprintf(r->err, r->errlen, "%d sessions are live, the limit (max-sessions); drop one",
                 s->n_sessions);
        return RA_ETOOBIG;
    }
    size_t nh = (size_t)c->n_layers * c->n_kv_heads;
    size_t nw = (size_t)c->n_layers * c->n_q_heads;
    size_t own = sizeof(ratd_session) + nh * sizeof(ra_head *) +
                 nw * (RATD_WARM * sizeof(int32_t) + sizeof(int)) + c->n_layers;
    if (ra_mem_reserve(&s->mem, own) != RA_OK) {
        snprintf(r->err, r->errlen, "daemon memory limit reached (%zu bytes of %zu in use)",
                 s->mem.used, s->mem.limit);
        return RA_ENOMEM;
    }
    ratd_session *ss = calloc(1, sizeof *ss);
    if (ss) {
        ss->heads = calloc(nh, sizeof *ss->heads);
        ss->warm = calloc(nw * RATD_WARM, sizeof *ss->warm);
        ss->n_warm = calloc(nw, sizeof *ss->n_warm);
        ss->broken = calloc(c->n_layers, 1);
    }
    ratd_session **tab = realloc(s->sessions, (size_t)(s->n_sessions + 1) * sizeof *tab);
    if (tab)
        s->sessions = tab;
    if (!ss || !ss->heads || !ss->warm || !ss->n_warm || !ss->broken || !tab) {
        if (ss) {
            free(ss->heads);
            free(ss->warm);
            free(ss->n_warm);
            free(ss->broken);
        }
        free(ss);
        ra_mem_release(&s->mem, own);
        snprintf(r->err, r->errlen, "out of memory creating a session");
        return RA_ENOMEM;
    }
    ss->id = s->next_session++;
    ss->n_layers = (int)c->n_layers;
    ss->n_q = (int)c->n_q_heads;
    ss->n_kv = (int)c->n_kv_heads;
    ss->rep = ss->n_q / ss->n_kv;
    ss->dim = (int)c->head_dim;
    ss->dtype = (ra_dtype)c->dtype;
    ss->iopts = io;
    ss->own_bytes = own;
    s->sessions[s->n_sessions++] = ss;
    r->h->session = ss->id;
    RA_INFO("session %llu: %d layers, %d query heads, %d KV heads, dim %d, %s, index %s",
            (unsigned long long)ss->id, ss->n_layers, ss->n_q, ss->n_kv, ss->dim,
            ra_dtype_name(ss->dtype), ra_index_kind_name(io.kind));
    return RA_OK;
}

static ra_status do_drop(ratd_server *s, ra_proto_view *v, reply *r)
{
    int idx;
    ratd_session *ss = session_find(s, v->hdr->session, &idx);
    if (!ss) {
        snprintf(r->err, r->errlen, "no session %llu (never created, or dropped)",
                 (unsigned long long)v->hdr->session);
        return RA_ENOSESSION;
    }
    s->sessions[idx] = s->sessions[--s->n_sessions];
    RA_INFO("session %llu dropped", (unsigned long long)ss->id);
    session_free(s, ss);
    return RA_OK;
}

/* Offload and Append: per-KV-head tasks. */
typedef struct kv_job {
    ratd_session *ss;
    int layer;
    size_t n;
    const uint8_t *k, *v;
    const int64_t *pos;
    const float *q;
    size_t nq; /* per query head */
    const int32_t *knn; /* NULL or [n_q][nq][knn_k]: indices into this message's tokens */
    int knn_k;
    size_t es;
    ra_status st[4096];       /* append */
    ra_status build_st[4096]; /* index build start */
    int bad_finite[4096];
} kv_job;

static void task_check(void *arg, int g)
{
    kv_job *j = arg;
    size_t per = j->n * (size_t)j->ss->dim;
    j->bad_finite[g] = !all_finite(j->k + (size_t)g * per * j->es, per, j->ss->dtype) ||
                       !all_finite(j->v + (size_t)g * per * j->es, per, j->ss->dtype);
    if (!j->bad_finite[g] && j->q) {
        size_t qn = (size_t)j->ss->rep * j->nq * (size_t)j->ss->dim;
        j->bad_finite[g] = !all_finite(j->q + (size_t)g * qn, qn, RA_DTYPE_F32);
    }
}

static void task_append(void *arg, int g)
{
    kv_job *j = arg;
    ratd_session *ss = j->ss;
    ra_head *h = ss->heads[j->layer * ss->n_kv + g];
    size_t per = j->n * (size_t)ss->dim * j->es;
    size_t base = ra_head_count(h); /* row of this message's first token */
    ra_status st = RA_OK;
    if (j->n)
        st = ra_head_append(h, j->k + (size_t)g * per, j->v + (size_t)g * per, j->pos, j->n);
    j->st[g] = st;
    j->build_st[g] = RA_OK;
    if (st == RA_OK && j->q && j->nq) {
        /* [n_q][nq][dim]: the rep query heads of KV head g are contiguous */
        size_t qn = (size_t)ss->rep * j->nq;
        const float *q = j->q + (size_t)g * qn * (size_t)ss->dim;
        ra_status bs;
        if (j->knn) { /* the client's exact lists: message indices -> this head's rows */
            size_t m = qn * (size_t)j->knn_k;
            int32_t *rows = malloc(m * sizeof *rows);
            const int32_t *src = j->knn + (size_t)g * m;
            if (rows) {
                for (size_t i = 0; i < m; i++)
                    rows[i] = src[i] < 0 ? -1 : (int32_t)(base + (size_t)src[i]);
                bs = ra_head_build_lists(h, q, qn, rows, j->knn_k, 1);
                free(rows);
            } else {
                bs = RA_ENOMEM;
            }
        } else {
            bs = ra_head_build(h, q, qn, 1);
        }
        if (bs == RA_EBUSY) /* a build runs: it inserts the new keys when it ends */
            bs = RA_OK;
        j->build_st[g] = bs;
    }
}

/* A layer whose KV heads a failed store left out of step answers nothing more. */
static ra_status check_broken(ratd_session *ss, uint32_t layer, reply *r)
{
    if (!ss->broken[layer])
        return RA_OK;
    snprintf(r->err, r->errlen,
             "layer %u of session %llu was left partially updated by a failed Offload/Append "
             "(see the earlier error); drop the session and offload again",
             layer, (unsigned long long)ss->id);
    return RA_ESTATE;
}

static ra_status do_tokens(ratd_server *s, ra_proto_view *v, reply *r, int offload)
{
    Ratd__Header *hd = v->hdr;
    ratd_session *ss = session_find(s, hd->session, NULL);
    if (!ss) {
        snprintf(r->err, r->errlen, "no session %llu (never created, or dropped)",
                 (unsigned long long)hd->session);
        return RA_ENOSESSION;
    }
    if (hd->layer >= (uint32_t)ss->n_layers) {
        snprintf(r->err, r->errlen, "layer %u does not exist: session %llu has layers 0..%d",
                 hd->layer, (unsigned long long)ss->id, ss->n_layers - 1);
        return RA_ENOLAYER;
    }
    ra_status bst = check_broken(ss, hd->layer, r);
    if (bst != RA_OK)
        return bst;
    int ik = ra_proto_find(v, RATD__ROLE__K);
    if (ik < 0) {
        snprintf(r->err, r->errlen, "request has no K frame");
        return RA_EPROTO;
    }
    const Ratd__Tensor *tk = v->tensor[ik];
    uint64_t n = tk->n_shape == 3 ? tk->shape[1] : 0;
    if (n > (uint64_t)s->cfg.max_tokens) {
        snprintf(r->err, r->errlen, "%llu tokens in one message; at most %d (max-tokens)",
                 (unsigned long long)n, s->cfg.max_tokens);
        return RA_ETOOBIG;
    }
    uint64_t kshape[3] = {(uint64_t)ss->n_kv, n, (uint64_t)ss->dim};
    int iv, ip, iq = -1;
    ra_status st;
    if ((st = want_tensor(v, RATD__ROLE__K, "K", ss->dtype, 3, kshape, &ik, r->err, r->errlen)) ||
        (st = want_tensor(v, RATD__ROLE__V, "V", ss->dtype, 3, kshape, &iv, r->err, r->errlen)) ||
        (st = want_tensor(v, RATD__ROLE__POS, "positions", RATD__DTYPE__I64, 1, &n, &ip, r->err,
                          r->errlen)))
        return st;
    uint64_t nq = 0;
    int qi = ra_proto_find(v, RATD__ROLE__Q_TRAIN);
    if (qi >= 0) {
        if (!offload) {
            snprintf(r->err, r->errlen,
                     "Append takes no training queries (send them with Offload)");
            return RA_EPROTO;
        }
        const Ratd__Tensor *tq = v->tensor[qi];
        nq = tq->n_shape == 3 ? tq->shape[1] : 0;
        if (nq > (uint64_t)s->cfg.max_queries) {
            snprintf(r->err, r->errlen, "%llu training queries per head; at most %d (max-queries)",
                     (unsigned long long)nq, s->cfg.max_queries);
            return RA_ETOOBIG;
        }
        uint64_t qshape[3] = {(uint64_t)ss->n_q, nq, (uint64_t)ss->dim};
        if ((st = want_tensor(v, RATD__ROLE__Q_TRAIN, "training queries", RATD__DTYPE__F32, 3,
                              qshape, &iq, r->err, r->errlen)))
            return st;
    }
    int ikn = ra_proto_find(v, RATD__ROLE__TRAIN_TOPK);
    uint64_t knn_k = 0;
    if (ikn >= 0) {
        const Ratd__Tensor *tt = v->tensor[ikn];
        knn_k = tt->n_shape == 3 ? tt->shape[2] : 0;
        if (iq < 0 || nq == 0) {
            snprintf(r->err, r->errlen, "training lists (TRAIN_TOPK) come only with the training "
                                        "queries of an Offload");
            return RA_EPROTO;
        }
        if (knn_k < 1 || knn_k > RA_HEAD_MAX_LIST_K) {
            snprintf(r->err, r->errlen, "training lists of %llu entries per query; 1..%d allowed",
                     (unsigned long long)knn_k, RA_HEAD_MAX_LIST_K);
            return RA_EINVAL;
        }
        uint64_t lshape[3] = {(uint64_t)ss->n_q, nq, knn_k};
        if ((st = want_tensor(v, RATD__ROLE__TRAIN_TOPK, "training lists", RATD__DTYPE__I32, 3,
                              lshape, &ikn, r->err, r->errlen)))
            return st;
    }
    if (n == 0 && nq == 0)
        return RA_OK;
    size_t es = ra_dtype_size(ss->dtype);
    /* K+V+positions per head, before anything is allocated */
    size_t need = (size_t)ss->n_kv * (size_t)n * ((size_t)ss->dim * es * 2 + sizeof(int64_t));
    if (s->mem.limit && __atomic_load_n(&s->mem.used, __ATOMIC_RELAXED) + need > s->mem.limit) {
        snprintf(r->err, r->errlen,
                 "storing %llu tokens needs %zu MiB; the daemon's memory limit is %zu MiB with "
                 "%zu MiB in use (drop sessions or raise --mem-limit)",
                 (unsigned long long)n, need >> 20, s->mem.limit >> 20,
                 __atomic_load_n(&s->mem.used, __ATOMIC_RELAXED) >> 20);
        return RA_ENOMEM;
    }
    kv_job *j = calloc(1, sizeof *j);
    void *tmp[5] = {0};
    if (!j) {
        snprintf(r->err, r->errlen, "out of memory");
        return RA_ENOMEM;
    }
    j->ss = ss;
    j->layer = (int)hd->layer;
    j->n = (size_t)n;
    j->es = es;
    j->nq = (size_t)nq;
    j->k = ra_proto_data(v, ik, &tmp[0]);
    j->v = ra_proto_data(v, iv, &tmp[1]);
    j->pos = ra_proto_data(v, ip, &tmp[2]);
    j->q = iq >= 0 && nq ? ra_proto_data(v, iq, &tmp[3]) : NULL;
    j->knn = ikn >= 0 ? ra_proto_data(v, ikn, &tmp[4]) : NULL;
    j->knn_k = (int)knn_k;
    if (!j->k || !j->v || !j->pos || (iq >= 0 && nq && !j->q) || (ikn >= 0 && !j->knn)) {
        snprintf(r->err, r->errlen, "out of memory");
        st = RA_ENOMEM;
        goto out;
    }
    for (size_t i = 0; j->knn && i < (size_t)ss->n_q * (size_t)nq * (size_t)knn_k; i++)
        if (j->knn[i] < -1 || (int64_t)j->knn[i] >= (int64_t)n) {
            snprintf(r->err, r->errlen,
                     "training list entry %zu is %d: outside -1..%llu (indices into this "
                     "message's tokens); nothing stored",
                     i, j->knn[i], (unsigned long long)n - 1);
            st = RA_EINVAL;
            goto out;
        }
    ratd_pool_run(s->pool, ss->n_kv, task_check, j);
    for (int g = 0; g < ss->n_kv; g++)
        if (j->bad_finite[g]) {
            snprintf(r->err, r->errlen, "NaN or Inf in the data of KV head %d; nothing stored", g);
            st = RA_ENONFINITE;
            goto out;
        }
    ra_head **heads = ss->heads + (size_t)hd->layer * ss->n_kv;
    for (int g = 0; g < ss->n_kv; g++) {
        if (heads[g])
            continue;
        st = ra_head_create(&heads[g], ss->dim, ss->dtype, &ss->iopts, &s->mem);
        if (st != RA_OK) {
            snprintf(r->err, r->errlen, "cannot create the index of layer %u head %d: %s",
                     hd->layer, g, ra_strerror(st));
            for (int x = 0; x < g; x++) /* leave the layer as it was: empty */
                if (heads[x] && ra_head_count(heads[x]) == 0) {
                    ra_head_destroy(heads[x]);
                    heads[x] = NULL;
                }
            goto out;
        }
    }
    ratd_pool_run(s->pool, ss->n_kv, task_append, j);
    st = RA_OK;
    int n_ok = 0, first_bad = -1;
    for (int g = 0; g < ss->n_kv; g++) {
        if (j->st[g] == RA_OK)
            n_ok++;
        else if (first_bad < 0)
            first_bad = g;
    }
    if (first_bad >= 0) {
        st = j->st[first_bad];
        /* appends are validated before they change anything, so a head either took
         * all n tokens or none; heads that disagree now cannot be reconciled */
        int partial = n_ok > 0 && j->n > 0;
        if (partial)
            ss->broken[hd->layer] = 1;
        snprintf(r->err, r->errlen, "layer %u KV head %d: %s while storing %zu tokens%s", hd->layer,
                 first_bad, ra_strerror(st), j->n,
                 partial ? "; other heads stored them, so the layer is now unusable: drop "
                           "the session (raise --mem-limit or free memory first)"
                         : "; nothing was stored");
    }
    if (st == RA_OK) {
        ss->tokens += n;
        s->tokens += n;
        /* the tokens are stored and answered by exact scan: the request succeeded,
         * but say loudly that the index is missing */
        for (int g = 0; g < ss->n_kv; g++)
            if (j->build_st[g] != RA_OK)
                RA_WARN("session %llu layer %u KV head %d: index build not started (%s); "
                        "this head answers by exact scan",
                        (unsigned long long)ss->id, hd->layer, g, ra_strerror(j->build_st[g]));
    }
out:
    for (int i = 0; i < 5; i++)
        free(tmp[i]);
    free(j);
    return st;
}

typedef struct attend_job {
    ratd_session *ss;
    int layer, k, want;
    const uint32_t *k_head; /* NULL or [n_q]: per-head budgets (<= k) */
    ra_search_params base;
    float scale;
    const float *q;
    float *o, *lse, *scores;
    int64_t *pos;
    int32_t *counts, *ids;
    ra_status st[4096];
} attend_job;

static void task_attend(void *arg, int h)
{
    attend_job *j = arg;
    ratd_session *ss = j->ss;
    int dim = ss->dim;
    ra_head *hd = ss->heads[j->layer * ss->n_kv + h / ss->rep];
    float *o = j->o + (size_t)h * dim;
    int32_t *ids = j->ids + (size_t)h * j->k;
    float *sc = j->scores ? j->scores + (size_t)h * j->k : NULL;
    int n_out = 0;
    ra_status st = RA_OK;
    int kh = j->k_head ? (int)j->k_head[h] : j->k;
    if (!hd || ra_head_count(hd) == 0 || kh == 0) {
        memset(o, 0, (size_t)dim * sizeof *o);
        j->lse[h] = -INFINITY;
    } else {
        size_t w = (size_t)j->layer * ss->n_q + (size_t)h;
        ra_search_params p = j->base;
        p.k = kh;
        p.warm = ss->warm + w * RATD_WARM;
        p.n_warm = ss->n_warm[w];
        ra_search_stats stt;
        memset(&stt, 0, sizeof stt);
        st = ra_head_attend(hd, j->q + (size_t)h * dim, &p, j->scale, o, &j->lse[h], ids, sc,
                            &n_out, &stt);
        if (st == RA_OK) {
            int nw = n_out < RATD_WARM ? n_out : RATD_WARM;
            memcpy(ss->warm + w * RATD_WARM, ids, (size_t)nw * sizeof *ids);
            ss->n_warm[w] = nw;
            if (j->want)
                ra_head_positions(hd, ids, (size_t)n_out, j->pos + (size_t)h * j->k);
        }
    }
    if (j->want) {
        for (int i = n_out; i < j->k; i++) {
            j->pos[(size_t)h * j->k + i] = -1;
            sc[i] = -INFINITY;
        }
        j->counts[h] = n_out;
    }
    j->st[h] = st;
}

static ra_status do_attend(ratd_server *s, ra_proto_view *v, reply *r)
{
    Ratd__Header *hd = v->hdr;
    ratd_session *ss = session_find(s, hd->session, NULL);
    if (!ss) {
        snprintf(r->err, r->errlen, "no session %llu (never created, or dropped)",
                 (unsigned long long)hd->session);
        return RA_ENOSESSION;
    }
    if (hd->layer >= (uint32_t)ss->n_layers) {
        snprintf(r->err, r->errlen, "layer %u does not exist: session %llu has layers 0..%d",
                 hd->layer, (unsigned long long)ss->id, ss->n_layers - 1);
        return RA_ENOLAYER;
    }
    ra_status bst = check_broken(ss, hd->layer, r);
    if (bst != RA_OK)
        return bst;
    const Ratd__AttendParams *ap = hd->attend;
    if (!ap) {
        snprintf(r->err, r->errlen, "Attend without its parameters (top_k)");
        return RA_EPROTO;
    }
    if (ap->top_k < 1 || ap->top_k > (uint32_t)s->cfg.max_top_k) {
        snprintf(r->err, r->errlen, "top_k %u outside 1..%d (max-top-k)", ap->top_k,
                 s->cfg.max_top_k);
        return ap->top_k ? RA_ETOOBIG : RA_EINVAL;
    }
    if (ap->n_top_k_per_head && ap->n_top_k_per_head != (size_t)ss->n_q) {
        snprintf(r->err, r->errlen, "top_k_per_head has %zu entries, the session has %d query heads",
                 ap->n_top_k_per_head, ss->n_q);
        return RA_ESHAPE;
    }
    for (size_t h = 0; h < ap->n_top_k_per_head; h++)
        if (ap->top_k_per_head[h] > ap->top_k) {
            snprintf(r->err, r->errlen, "top_k_per_head[%zu] = %u exceeds top_k %u", h,
                     ap->top_k_per_head[h], ap->top_k);
            return RA_EINVAL;
        }
    if (!isfinite(ap->scale) || ap->effort > (1u << 24)) {
        snprintf(r->err, r->errlen, "scale must be finite and effort <= 2^24");
        return RA_EINVAL;
    }
    uint64_t qshape[2] = {(uint64_t)ss->n_q, (uint64_t)ss->dim};
    int iq;
    ra_status st =
        want_tensor(v, RATD__ROLE__Q, "q", RATD__DTYPE__F32, 2, qshape, &iq, r->err, r->errlen);
    if (st)
        return st;
    void *qtmp = NULL;
    const float *q = ra_proto_data(v, iq, &qtmp);
    attend_job *j = calloc(1, sizeof *j);
    size_t nq = (size_t)ss->n_q, k = ap->top_k;
    float *o = malloc(nq * (size_t)ss->dim * sizeof(float));
    float *lse = malloc(nq * sizeof(float));
    int32_t *ids = malloc(nq * k * sizeof(int32_t));
    int64_t *pos = ap->want_topk ? malloc(nq * k * sizeof(int64_t)) : NULL;
    float *sc = ap->want_topk ? malloc(nq * k * sizeof(float)) : NULL;
    int32_t *counts = ap->want_topk ? malloc(nq * sizeof(int32_t)) : NULL;
    if (!q || !j || !o || !lse || !ids || (ap->want_topk && (!pos || !sc || !counts))) {
        snprintf(r->err, r->errlen, "out of memory");
        st = RA_ENOMEM;
        goto fail;
    }
    if (!all_finite(q, nq * (size_t)ss->dim, RA_DTYPE_F32)) {
        snprintf(r->err, r->errlen, "NaN or Inf in q");
        st = RA_ENONFINITE;
        goto fail;
    }
    j->ss = ss;
    j->layer = (int)hd->layer;
    j->k = (int)k;
    j->k_head = ap->n_top_k_per_head ? ap->top_k_per_head : NULL;
    j->want = ap->want_topk;
    j->base.k = (int)k;
    j->base.effort = (int)ap->effort;
    j->scale = ap->scale;
    j->q = q;
    j->o = o;
    j->lse = lse;
    j->ids = ids;
    j->pos = pos;
    j->scores = sc;
    j->counts = counts;
    ratd_pool_run(s->pool, ss->n_q, task_attend, j);
    for (int h = 0; h < ss->n_q; h++)
        if (j->st[h] != RA_OK) {
            st = j->st[h];
            snprintf(r->err, r->errlen, "layer %u query head %d: search failed: %s", hd->layer, h,
                     ra_strerror(st));
            goto fail;
        }
    ra_proto_part *pp = r->parts;
    pp[0] = (ra_proto_part){RATD__ROLE__O,
                            RATD__DTYPE__F32,
                            2,
                            {nq, (uint64_t)ss->dim},
                            o,
                            nq * (size_t)ss->dim * sizeof(float),
                            1};
    pp[1] = (ra_proto_part){RATD__ROLE__LSE, RATD__DTYPE__F32, 1, {nq}, lse, nq * sizeof(float), 1};
    r->n_parts = 2;
    if (ap->want_topk) {
        pp[2] = (ra_proto_part){
            RATD__ROLE__TOPK_POS, RATD__DTYPE__I64, 2, {nq, k}, pos, nq * k * sizeof(int64_t), 1};
        pp[3] = (ra_proto_part){
            RATD__ROLE__TOPK_SCORE, RATD__DTYPE__F32, 2, {nq, k}, sc, nq * k * sizeof(float), 1};
        pp[4] = (ra_proto_part){
            RATD__ROLE__TOPK_COUNT, RATD__DTYPE__I32, 1, {nq}, counts, nq * sizeof(int32_t), 1};
        r->n_parts = 5;
    }
    free(ids);
    free(qtmp);
    free(j);
    return RA_OK;
fail:
    free(qtmp);
    free(j);
    free(o);
    free(lse);
    free(ids);
    free(pos);
    free(sc);
    free(counts);
    return st;
}

static ra_status do_stats(ratd_server *s, ra_proto_view *v, reply *r, Ratd__StatsReply *sr,
                          Ratd__OpStats *os, Ratd__OpStats **osp)
{
    if (v->hdr->session) { /* one session's index state */
        ratd_session *ss = session_find(s, v->hdr->session, NULL);
        if (!ss) {
            snprintf(r->err, r->errlen, "unknown session %llu",
                     (unsigned long long)v->hdr->session);
            return RA_ENOSESSION;
        }
        sr->session_tokens = ss->tokens;
        for (int i = 0; i < ss->n_layers * ss->n_kv; i++) {
            if (!ss->heads[i])
                continue;
            sr->heads++;
            sr->heads_ready += ra_head_ready(ss->heads[i]) ? 1u : 0u;
            sr->heads_building += ra_head_building(ss->heads[i]) ? 1u : 0u;
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
    for (int i = 0; i < N_OPS; i++) {
        ratd__op_stats__init(&os[i]);
        os[i].count = s->ops[i].count;
        os[i].errors = s->ops[i].errors;
        os[i].total_us = s->ops[i].total_us;
        os[i].max_us = s->ops[i].max_us;
        osp[i] = &os[i];
    }
    sr->n_ops = N_OPS;
    sr->ops = osp;
    r->h->stats = sr;
    return RA_OK;
}

/* ---- the loop ---------------------------------------------------------------------- */

static void peer_str(zmq_msg_t *id, char *buf, size_t len)
{
    const unsigned char *d = zmq_msg_data(id);
    size_t n = zmq_msg_size(id), o = 0;
    for (size_t i = 0; i < n && o + 3 < len; i++)
        o += (size_t)snprintf(buf + o, len - o, "%02x", d[i]);
    if (!n)
        snprintf(buf, len, "?");
}

static void handle(ratd_server *s, ra_proto_msg *m)
{
    double t_start = ra_now_s();
    s->requests++;
    s->bytes_in += m->total_bytes;
    char err[RA_PROTO_ERRLEN] = "";
    char peer[80];
    if (m->n < 1)
        return;
    peer_str(&m->frames[0], peer, sizeof peer);
    /* REQ clients put an empty delimiter before the header; DEALER clients do not */
    int delim = m->n >= 3 && zmq_msg_size(&m->frames[1]) == 0;
    int first = 1 + delim;
    uint64_t req_id = 0;
    int type = 0;
    ra_proto_view v;
    ra_status st = ra_proto_parse(m, first, &s->lim, &v, &req_id, &type, err, sizeof err);
    Ratd__Header rep = RATD__HEADER__INIT;
    Ratd__HelloReply hr = RATD__HELLO_REPLY__INIT;
    Ratd__Limits lm = RATD__LIMITS__INIT;
    Ratd__StatsReply sr = RATD__STATS_REPLY__INIT;
    Ratd__OpStats os[N_OPS];
    Ratd__OpStats *osp[N_OPS];
    reply r = {.h = &rep, .n_parts = 0, .err = err, .errlen = sizeof err};
    rep.version = RA_PROTO_VERSION;
    rep.request_id = req_id;
    rep.type = (Ratd__MsgType)type;
    if (st != RA_OK) {
        s->bad_messages++;
        goto reply;
    }
    rep.session = v.hdr->session;
    rep.layer = v.hdr->layer;
    if (v.hdr->version != RA_PROTO_VERSION) {
        snprintf(err, sizeof err,
                 "the client speaks protocol version %u, this ratd speaks version %u; use a "
                 "client and a daemon of the same protocol version",
                 v.hdr->version, RA_PROTO_VERSION);
        st = RA_EVERSION;
        if (type == RATD__MSG_TYPE__HELLO)
            do_hello(s, &v, &r, &hr, &lm);
        goto reply;
    }
    switch (type) {
    case RATD__MSG_TYPE__HELLO:
        st = do_hello(s, &v, &r, &hr, &lm);
        break;
    case RATD__MSG_TYPE__CREATE_SESSION:
        st = do_create(s, &v, &r);
        break;
    case RATD__MSG_TYPE__OFFLOAD:
        st = do_tokens(s, &v, &r, 1);
        break;
    case RATD__MSG_TYPE__APPEND:
        st = do_tokens(s, &v, &r, 0);
        break;
    case RATD__MSG_TYPE__ATTEND:
        st = do_attend(s, &v, &r);
        break;
    case RATD__MSG_TYPE__DROP_SESSION:
        st = do_drop(s, &v, &r);
        break;
    case RATD__MSG_TYPE__STATS:
        st = do_stats(s, &v, &r, &sr, os, osp);
        break;
    default:
        snprintf(err, sizeof err, "unknown request type %d", type);
        st = RA_EPROTO;
        s->bad_messages++;
        break;
    }
reply:
    rep.status = (int32_t)st;
    if (st != RA_OK) {
        s->errors++;
        rep.message = err;
        RA_WARN("request %llu (%s) from client %s: %s: %s", (unsigned long long)req_id,
                ra_proto_type_name(type), peer, ra_strerror(st), err);
        for (int i = 0; i < r.n_parts; i++) /* error replies carry no tensors */
            if (r.parts[i].give)
                free((void *)r.parts[i].data);
        r.n_parts = 0;
    }
    for (int i = 0; i < r.n_parts; i++)
        s->bytes_out += r.parts[i].bytes;
    if (ra_proto_send(s->sock, &m->frames[0], delim, &rep, r.parts, r.n_parts) < 0) {
        if (errno == EHOSTUNREACH)
            RA_WARN("request %llu (%s): client %s went away before its reply; reply dropped",
                    (unsigned long long)req_id, ra_proto_type_name(type), peer);
        else
            RA_WARN("request %llu (%s): reply to client %s failed: %s", (unsigned long long)req_id,
                    ra_proto_type_name(type), peer, zmq_strerror(errno));
    }
    if (v.hdr)
        ra_proto_view_free(&v);
    if (type >= 1 && type <= N_OPS) {
        op_stat *o = &s->ops[type - 1];
        uint64_t us = (uint64_t)((ra_now_s() - t_start) * 1e6);
        o->count++;
        o->errors += st != RA_OK;
        o->total_us += us;
        if (us > o->max_us)
            o->max_us = us;
    }
}

/* An ipc:// path that a live process still accepts on belongs to another daemon:
 * refuse to steal it. A stale file (no listener) is removed. */
static ra_status check_ipc_path(const char *path, char *err, size_t errlen)
{
    struct stat sb;
    if (stat(path, &sb) != 0)
        return RA_OK;
    struct sockaddr_un a;
    memset(&a, 0, sizeof a);
    a.sun_family = AF_UNIX;
    if (strlen(path) >= sizeof a.sun_path) {
        snprintf(err, errlen, "ipc path %s is longer than %zu bytes", path, sizeof a.sun_path - 1);
        return RA_EINVAL;
    }
    strcpy(a.sun_path, path);
    int fd = socket(AF_UNIX, SOCK_STREAM, 0);
    if (fd >= 0) {
        int live = connect(fd, (struct sockaddr *)&a, sizeof a) == 0;
        close(fd);
        if (live) {
            snprintf(err, errlen,
                     "%s is in use by another running ratd; stop it or choose another "
                     "--endpoint",
                     path);
            return RA_EEXIST;
        }
    }
    unlink(path);
    return RA_OK;
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
    s->next_session = 1;
    s->mem.limit = cfg->mem_limit;
    s->lim.max_frame_bytes = cfg->max_frame_bytes;
    s->lim.max_message_bytes = cfg->max_message_bytes;
    s->t0 = ra_now_s();
    st = ratd_pool_create(&s->pool, cfg->workers, cfg->numa_node, cfg->cpuset, err, errlen);
    if (st != RA_OK)
        goto fail;
    if (!strncmp(cfg->endpoint, "ipc://", 6)) {
        snprintf(s->ipc_path, sizeof s->ipc_path, "%s", cfg->endpoint + 6);
        if ((st = check_ipc_path(s->ipc_path, err, errlen)) != RA_OK) {
            s->ipc_path[0] = 0;
            goto fail;
        }
    }
    s->ctx = zmq_ctx_new();
    if (!s->ctx || !(s->sock = zmq_socket(s->ctx, ZMQ_ROUTER))) {
        snprintf(err, errlen, "zmq: %s", zmq_strerror(errno));
        st = RA_EIO;
        goto fail;
    }
    int one = 1, linger = 1000, hwm = 64, sndto = cfg->send_timeout_ms;
    /* Frames a little over the limit still arrive and get an RA_ETOOBIG reply; beyond
     * twice the limit the transport drops the connection before buffering them. */
    int64_t maxmsg = (int64_t)(cfg->max_frame_bytes > (uint64_t)INT64_MAX / 2
                                   ? INT64_MAX
                                   : 2 * cfg->max_frame_bytes + RA_PROTO_MAX_HEADER_BYTES);
    zmq_setsockopt(s->sock, ZMQ_ROUTER_MANDATORY, &one, sizeof one);
    zmq_setsockopt(s->sock, ZMQ_LINGER, &linger, sizeof linger);
    zmq_setsockopt(s->sock, ZMQ_RCVHWM, &hwm, sizeof hwm);
    zmq_setsockopt(s->sock, ZMQ_SNDTIMEO, &sndto, sizeof sndto);
    zmq_setsockopt(s->sock, ZMQ_MAXMSGSIZE, &maxmsg, sizeof maxmsg);
    if (zmq_bind(s->sock, cfg->endpoint) != 0) {
        snprintf(err, errlen, "cannot bind %s: %s", cfg->endpoint, zmq_strerror(errno));
        st = RA_EIO;
        s->ipc_path[0] = 0;
        goto fail;
    }
    *out = s;
    return RA_OK;
fail:
    ratd_server_destroy(s);
    return st;
}

int ratd_server_run(ratd_server *s, volatile sig_atomic_t *stop)
{
    RA_INFO("ratd %s listening on %s (protocol %u, %d workers, placement: %s, memory limit %s)",
            RATD_VERSION, s->cfg.endpoint, RA_PROTO_VERSION, ratd_pool_workers(s->pool),
            ratd_pool_placement(s->pool), s->cfg.mem_limit ? "set" : "none");
    while (!*stop) {
        zmq_pollitem_t it = {s->sock, 0, ZMQ_POLLIN, 0};
        int rc = zmq_poll(&it, 1, 250);
        if (rc < 0) {
            if (errno == EINTR)
                continue;
            RA_ERROR("poll: %s", zmq_strerror(errno));
            break;
        }
        /* a burst: serve what is queued, but look at the stop flag between requests */
        for (int i = 0; rc > 0 && i < 64 && !*stop; i++) {
            ra_proto_msg m;
            if (ra_proto_recv(s->sock, &m, ZMQ_DONTWAIT) < 0) {
                if (errno != EAGAIN && errno != EINTR)
                    RA_ERROR("receive: %s", zmq_strerror(errno));
                break;
            }
            handle(s, &m);
            ra_proto_msg_close(&m);
        }
    }
    /* Drain: requests already on their way get their replies, until the socket has
     * been quiet for 100 ms (bounded, so that a flood cannot hold the shutdown). */
    int drained = 0;
    double until = ra_now_s() + 2.0;
    while (drained < 1024 && ra_now_s() < until) {
        zmq_pollitem_t it = {s->sock, 0, ZMQ_POLLIN, 0};
        int rc = zmq_poll(&it, 1, 100);
        if (rc < 0 && errno == EINTR)
            continue;
        if (rc <= 0)
            break;
        ra_proto_msg m;
        if (ra_proto_recv(s->sock, &m, ZMQ_DONTWAIT) < 0)
            continue;
        handle(s, &m);
        ra_proto_msg_close(&m);
        drained++;
    }
    RA_INFO("stopping: %d sessions, %llu requests served (%d drained)", s->n_sessions,
            (unsigned long long)s->requests, drained);
    return 0;
}

void ratd_server_destroy(ratd_server *s)
{
    if (!s)
        return;
    for (int i = 0; i < s->n_sessions; i++)
        session_free(s, s->sessions[i]);
    free(s->sessions);
    if (s->sock)
        zmq_close(s->sock);
    if (s->ctx)
        zmq_ctx_term(s->ctx);
    if (s->ipc_path[0])
        unlink(s->ipc_path);
    ratd_pool_destroy(s->pool);
    free(s);
}
