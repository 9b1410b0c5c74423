/* Offload and Append: a layer's tokens for every KV head, plus (Offload) training
 * queries, optional exact training lists and an optional prebuilt graph. Shapes and
 * limits are checked on the I/O thread; the data itself in three phases of one task per
 * KV head on the workers. Phase 0 checks everything (K, V and training queries finite,
 * training list entries in range, the graph valid for an empty layer:
 * ra_graph_adj_check) so that a bad message stores nothing -- the session and the layer
 * stay as they were, answered by exact scan over what they held, and a retry without
 * the graph gets the daemon's own build. Then the last checker creates the layer's heads
 * if this is its first batch and reserves, in one step on the session's account, the
 * memory every head's store needs for the new tokens (the geometric growth, else exactly
 * what they need); phase 1 grows the stores with it; only when every head has its room
 * does phase 2 append and start the index builds, or install the graph (background
 * threads in index/). So the memory limit refuses a store as a whole, never on one KV
 * head only, which would leave the layer's heads out of step. The job runs in its
 * (session, layer) lane, so the next Attend of the layer sees the tokens. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "ra_log.h"
#include "ratd_internal.h"

enum { BAD_NONE = 0, BAD_FINITE, BAD_LIST, BAD_GRAPH, BAD_GRAPH_LAYER };

/* What ra_graph_adj_check said about KV head g's graph: FAULT_MSG bytes per head. */
enum { FAULT_MSG = 160 };
static char *fault_msg(const ratd_job *j, int g)
{
    return (char *)j->t.fault.p + (size_t)g * FAULT_MSG;
}

/* KV head g's graph from the message's frames (views, not copies). */
static ra_graph_adj graph_of(const ratd_job *j, int g)
{
    return (ra_graph_adj){.n = j->t.n,
                          .M = j->t.gdeg,
                          .adj = (int32_t *)(uintptr_t)(j->t.adj + (size_t)g * j->t.n * j->t.gdeg),
                          .n_entries = j->t.n_ent,
                          .entries = (int32_t *)(uintptr_t)(j->t.ent + (size_t)g * j->t.n_ent)};
}

static void check_task(ratd_job *j, int g)
{
    ratd_session *ss = j->ss[0];
    int *bad = j->t.bad.p;
    size_t *bad_at = j->t.bad_at.p;
    size_t per = j->t.n * (size_t)ss->dim;
    bad[g] = BAD_NONE;
    if (!ratd_all_finite(j->t.k + (size_t)g * per * j->t.es, per, ss->dtype) ||
        !ratd_all_finite(j->t.v + (size_t)g * per * j->t.es, per, ss->dtype)) {
        bad[g] = BAD_FINITE;
        return;
    }
    size_t qn = (size_t)ss->rep * j->t.nq; /* the training queries of KV head g */
    if (j->t.q && !ratd_all_finite(j->t.q + (size_t)g * qn * (size_t)ss->dim, qn * (size_t)ss->dim,
                                   RA_DTYPE_F32)) {
        bad[g] = BAD_FINITE;
        return;
    }
    if (j->t.knn) {
        size_t m = qn * (size_t)j->t.knn_k, first = (size_t)g * m;
        for (size_t i = first; i < first + m; i++)
            if (j->t.knn[i] < -1 || (int64_t)j->t.knn[i] >= (int64_t)j->t.n) {
                bad[g] = BAD_LIST;
                bad_at[g] = i;
                return;
            }
    }
    if (j->t.adj) {
        /* rows are this message's tokens: the head must have none before them */
        ra_head *h = __atomic_load_n(&ss->heads[(size_t)j->layer * (size_t)ss->n_kv + (size_t)g],
                                     __ATOMIC_ACQUIRE);
        if (h && (ra_head_count(h) > 0 || ra_head_building(h))) { /* also a build of 0 keys */
            bad[g] = BAD_GRAPH_LAYER;
            bad_at[g] = ra_head_count(h);
            return;
        }
        ra_graph_adj a = graph_of(j, g);
        ra_status st = ra_graph_adj_check(&a, NULL, fault_msg(j, g), FAULT_MSG);
        if (st != RA_OK) {
            bad[g] = BAD_GRAPH;
            bad_at[g] = (size_t)st;
        }
    }
}

static void append_task(ratd_job *j, int g)
{
    ratd_session *ss = j->ss[0];
    ra_status *tst = j->tst.p, *bst = j->t.bst.p;
    ra_head *h = __atomic_load_n(&ss->heads[(size_t)j->layer * (size_t)ss->n_kv + (size_t)g],
                                 __ATOMIC_ACQUIRE);
    size_t per = j->t.n * (size_t)ss->dim * j->t.es;
    size_t base = ra_head_count(h); /* row of this message's first token */
    ra_status st = RA_OK;
    if (j->t.n)
        st =
            ra_head_append(h, j->t.k + (size_t)g * per, j->t.v + (size_t)g * per, j->t.pos, j->t.n);
    tst[g] = st;
    bst[g] = RA_OK;
    if (st != RA_OK || (!j->t.adj && (!j->t.q || !j->t.nq)))
        return;
    /* [n_q][nq][dim]: the rep query heads of KV head g are contiguous */
    size_t qn = j->t.q ? (size_t)ss->rep * j->t.nq : 0;
    const float *q = j->t.q ? j->t.q + (size_t)g * qn * (size_t)ss->dim : NULL;
    ra_status bs;
    if (j->t.adj) { /* a prebuilt graph: the layer was empty, so message index = row */
        ra_graph_adj a = graph_of(j, g);
        bs = ra_head_install_graph(
            h, &a, q, qn, j->t.knn ? j->t.knn + (size_t)g * qn * (size_t)j->t.knn_k : NULL,
            j->t.knn_k, 1);
    } else if (j->t.knn) { /* the client's exact lists: message indices -> this head's rows */
        size_t m = qn * (size_t)j->t.knn_k;
        int32_t *rows = malloc(m * sizeof *rows);
        const int32_t *src = j->t.knn + (size_t)g * m;
        if (rows) {
            for (size_t i = 0; i < m; i++)
                rows[i] = src[i] < 0 ? -1 : (int32_t)(base + (size_t)src[i]);
            bs = ra_head_build_lists(h, q, qn, rows, j->t.knn_k, 1);
            free(rows);
        } else {
            bs = RA_ENOMEM;
        }
    } else {
        bs = ra_head_build(h, q, qn, 1);
    }
    if (bs == RA_EBUSY && !j->t.adj) /* a build runs: it inserts the new keys when it ends */
        bs = RA_OK;                      /* (a graph is never dropped silently: warned below) */
    bst[g] = bs;
}

/* Phase 1: this head's store grows into the room reserved for it. */
static void grow_task(ratd_job *j, int g)
{
    ratd_session *ss = j->ss[0];
    size_t *gr = (size_t *)j->t.grow.p + 2 * (size_t)g;
    ra_head *h = __atomic_load_n(&ss->heads[(size_t)j->layer * (size_t)ss->n_kv + (size_t)g],
                                 __ATOMIC_ACQUIRE);
    size_t left = gr[1];
    ra_status st = gr[0] ? ra_head_reserve(h, gr[0], gr[1], &left) : RA_OK;
    ra_mem_release(&ss->mem, left);
    ((ra_status *)j->tst.p)[g] = st;
}

static void tokens_task(ratd_work *w, int g, int worker)
{
    (void)worker;
    ratd_job *j = (ratd_job *)w;
    if (j->t.phase == 0)
        check_task(j, g);
    else if (j->t.phase == 1)
        grow_task(j, g);
    else
        append_task(j, g);
}

/* The room of every head for the new tokens, reserved at once: the geometric growth
 * when the limit has it, else the exact one. */
static ra_status reserve_stores(ratd_job *j)
{
    ratd_session *ss = j->ss[0];
    ra_head **heads = ss->heads + (size_t)j->layer * (size_t)ss->n_kv;
    size_t *gr = j->t.grow.p;
    for (int exact = 0; exact < 2; exact++) {
        size_t total = 0;
        for (int g = 0; g < ss->n_kv; g++) {
            ra_head_grow_cost(heads[g], j->t.n, exact, &gr[2 * g], &gr[2 * g + 1]);
            total += gr[2 * g + 1];
        }
        if (ra_mem_reserve(&ss->mem, total) == RA_OK)
            return RA_OK;
        if (exact) {
            size_t used = __atomic_load_n(&ss->mem.parent->used, __ATOMIC_RELAXED);
            ratd_job_set_err(j, RA_ENOMEM,
                             "storing %zu tokens on %d KV heads needs %zu bytes more; the "
                             "daemon's memory limit is %zu bytes with %zu in use (drop sessions "
                             "or raise --mem-limit); nothing stored",
                             j->t.n, ss->n_kv, total, ss->mem.parent->limit, used);
        }
    }
    return RA_ENOMEM;
}

/* After the checks: refuse, or create the layer's heads and run phase 1. */
static void checks_done(ratd_job *j)
{
    ratd_session *ss = j->ss[0];
    const int *bad = j->t.bad.p;
    const size_t *bad_at = j->t.bad_at.p;
    for (int g = 0; g < ss->n_kv; g++) {
        if (bad[g] == BAD_FINITE) {
            ratd_job_set_err(j, RA_ENONFINITE,
                             "NaN or Inf in the data of KV head %d; nothing stored", g);
            return;
        }
        if (bad[g] == BAD_LIST) {
            ratd_job_set_err(j, RA_EINVAL,
                             "training list entry %zu is %d: outside -1..%llu (indices into this "
                             "message's tokens); nothing stored",
                             bad_at[g], j->t.knn[bad_at[g]], (unsigned long long)j->t.n - 1);
            return;
        }
        if (bad[g] == BAD_GRAPH_LAYER) {
            ratd_job_set_err(j, RA_EINVAL,
                             "a prebuilt graph (GRAPH_ADJ) only with the first tokens of a layer: "
                             "layer %u KV head %d holds %zu already%s; nothing stored",
                             j->layer, g, bad_at[g],
                             bad_at[g] ? "" : " (and an index build of its training queries runs)");
            return;
        }
        if (bad[g] == BAD_GRAPH) {
            ratd_job_set_err(j, (ra_status)bad_at[g],
                             "prebuilt graph of KV head %d refused: %s; nothing stored, the "
                             "layer stays as it was",
                             g, fault_msg(j, g));
            return;
        }
    }
    ra_head **heads = ss->heads + (size_t)j->layer * (size_t)ss->n_kv;
    for (int g = 0; g < ss->n_kv; g++) {
        if (heads[g])
            continue;
        ra_head *h = NULL;
        ra_status st = ra_head_create(&h, ss->dim, ss->dtype, &ss->iopts, &ss->mem);
        if (st != RA_OK) {
            ratd_job_set_err(j, st, "cannot create the index of layer %u head %d: %s", j->layer, g,
                             ra_strerror(st));
            /* the heads made so far stay, empty: the layer holds no tokens as before, and
             * freeing them here could race with the I/O thread, which reads heads[] for
             * Stats and ListSessions (the session's end frees them) */
            return;
        }
        char label[64];
        snprintf(label, sizeof label, "session %llu layer %u kv-head %d",
                 (unsigned long long)ss->id, j->layer, g);
        ra_head_set_label(h, label);
        __atomic_store_n(&heads[g], h, __ATOMIC_RELEASE); /* Stats reads it */
    }
    if (j->t.n && reserve_stores(j) != RA_OK)
        return;
    if (!j->t.n) /* training queries only: no room to make */
        memset(j->t.grow.p, 0, 2 * sizeof(size_t) * (size_t)ss->n_kv);
    j->t.phase = 1;
    j->resubmit = 1; /* the I/O thread submits phase 1 */
}

/* After the growths: append only when every head has its room. */
static void grows_done(ratd_job *j)
{
    ratd_session *ss = j->ss[0];
    const ra_status *tst = j->tst.p;
    for (int g = 0; g < ss->n_kv; g++)
        if (tst[g] != RA_OK) {
            ratd_job_set_err(j, tst[g],
                             "layer %u KV head %d: %s making room for %zu tokens; nothing stored",
                             j->layer, g, ra_strerror(tst[g]), j->t.n);
            return;
        }
    j->t.phase = 2;
    j->resubmit = 1;
}

static void stores_done(ratd_job *j)
{
    ratd_session *ss = j->ss[0];
    const ra_status *tst = j->tst.p, *bst = j->t.bst.p;
    int n_ok = 0, first_bad = -1;
    for (int g = 0; g < ss->n_kv; g++) {
        if (tst[g] == RA_OK)
            n_ok++;
        else if (first_bad < 0)
            first_bad = g;
    }
    if (first_bad >= 0) {
        /* appends are validated before they change anything and their room is made
         * before any of them runs, so a head either took all n tokens or none; heads
         * that disagree now (not the memory limit: e.g. the row limit) cannot be
         * reconciled */
        int partial = n_ok > 0 && j->t.n > 0;
        if (partial)
            __atomic_store_n(&ss->broken[j->layer], 1, __ATOMIC_RELEASE);
        ratd_job_set_err(j, tst[first_bad], "layer %u KV head %d: %s while storing %zu tokens%s",
                         j->layer, first_bad, ra_strerror(tst[first_bad]), j->t.n,
                         partial ? "; other heads stored them, so the layer is now unusable: "
                                   "drop the session (raise --mem-limit or free memory first)"
                                 : "; nothing was stored");
        return;
    }
    j->stored_tokens = j->t.n;
    /* the tokens are stored and answered by exact scan: the request succeeded, but say
     * loudly that the index is missing */
    for (int g = 0; g < ss->n_kv; g++)
        if (bst[g] != RA_OK)
            RA_WARN("session %llu layer %u KV head %d: index build not started (%s); this head "
                    "answers by exact scan",
                    (unsigned long long)ss->id, j->layer, g, ra_strerror(bst[g]));
}

static void tokens_done(ratd_work *w, int worker)
{
    (void)worker;
    ratd_job *j = (ratd_job *)w;
    if (j->t.phase == 0)
        checks_done(j);
    else if (j->t.phase == 1)
        grows_done(j);
    else
        stores_done(j);
    ratd_job_complete(j);
}

ra_status ratd_tokens_accept(ratd_server *s, ratd_job *j)
{
    Ratd__Header *hd = j->v.hdr;
    ra_proto_view *v = &j->v;
    char *err = j->err;
    size_t el = sizeof j->err;
    int offload = j->type == RATD__MSG_TYPE__OFFLOAD;
    ratd_session *ss =
        ratd_session_get(s, hd->session, hd->token.data, hd->token.len, j->peer, err, el);
    if (!ss)
        return RA_ENOSESSION;
    if (hd->layer >= (uint32_t)ss->n_layers) {
        snprintf(err, el, "layer %u does not exist: session %llu has layers 0..%d", hd->layer,
                 (unsigned long long)ss->id, ss->n_layers - 1);
        return RA_ENOLAYER;
    }
    int ik = ra_proto_find(v, RATD__ROLE__K);
    if (ik < 0) {
        snprintf(err, el, "request has no K frame");
        return RA_EPROTO;
    }
    const Ratd__Tensor *tk = v->tensor[ik];
    uint64_t n = tk->n_shape == 3 ? tk->shape[1] : 0;
    if (n > (uint64_t)s->cfg.max_tokens) {
        snprintf(err, el, "%llu tokens in one message; at most %d (max-tokens)",
                 (unsigned long long)n, s->cfg.max_tokens);
        return RA_ETOOBIG;
    }
    uint64_t kshape[3] = {(uint64_t)ss->n_kv, n, (uint64_t)ss->dim};
    int iv, ip, iq = -1;
    ra_status st;
    if ((st = ratd_want_tensor(v, RATD__ROLE__K, "K", ss->dtype, 3, kshape, &ik, err, el)) ||
        (st = ratd_want_tensor(v, RATD__ROLE__V, "V", ss->dtype, 3, kshape, &iv, err, el)) ||
        (st = ratd_want_tensor(v, RATD__ROLE__POS, "positions", RATD__DTYPE__I64, 1, &n, &ip, err,
                               el)))
        return st;
    uint64_t nq = 0;
    int qi = ra_proto_find(v, RATD__ROLE__Q_TRAIN);
    if (qi >= 0) {
        if (!offload) {
            snprintf(err, el, "Append takes no training queries (send them with Offload)");
            return RA_EPROTO;
        }
        const Ratd__Tensor *tq = v->tensor[qi];
        nq = tq->n_shape == 3 ? tq->shape[1] : 0;
        if (nq > (uint64_t)s->cfg.max_queries) {
            snprintf(err, el, "%llu training queries per head; at most %d (max-queries)",
                     (unsigned long long)nq, s->cfg.max_queries);
            return RA_ETOOBIG;
        }
        uint64_t qshape[3] = {(uint64_t)ss->n_q, nq, (uint64_t)ss->dim};
        if ((st = ratd_want_tensor(v, RATD__ROLE__Q_TRAIN, "training queries", RATD__DTYPE__F32, 3,
                                   qshape, &iq, err, el)))
            return st;
    }
    int ikn = ra_proto_find(v, RATD__ROLE__TRAIN_TOPK);
    uint64_t knn_k = 0;
    if (ikn >= 0) {
        const Ratd__Tensor *tt = v->tensor[ikn];
        knn_k = tt->n_shape == 3 ? tt->shape[2] : 0;
        if (iq < 0 || nq == 0) {
            snprintf(err, el,
                     "training lists (TRAIN_TOPK) come only with the training queries of "
                     "an Offload");
            return RA_EPROTO;
        }
        if (knn_k < 1 || knn_k > RA_HEAD_MAX_LIST_K) {
            snprintf(err, el, "training lists of %llu entries per query; 1..%d allowed",
                     (unsigned long long)knn_k, RA_HEAD_MAX_LIST_K);
            return RA_EINVAL;
        }
        uint64_t lshape[3] = {(uint64_t)ss->n_q, nq, knn_k};
        if ((st = ratd_want_tensor(v, RATD__ROLE__TRAIN_TOPK, "training lists", RATD__DTYPE__I32, 3,
                                   lshape, &ikn, err, el)))
            return st;
    }
    int iga = ra_proto_find(v, RATD__ROLE__GRAPH_ADJ), ige = ra_proto_find(v, RATD__ROLE__GRAPH_ENTRIES);
    uint64_t gdeg = 0, n_ent = 0;
    if (iga >= 0 || ige >= 0) {
        if (!offload) {
            snprintf(err, el, "Append takes no prebuilt graph (GRAPH_ADJ comes with an Offload)");
            return RA_EPROTO;
        }
        if (iga < 0 || ige < 0) {
            snprintf(err, el, "a prebuilt graph needs both GRAPH_ADJ and GRAPH_ENTRIES frames");
            return RA_EPROTO;
        }
        if (ss->iopts.kind != RA_INDEX_GRAPH) {
            snprintf(err, el, "a prebuilt graph for a session with the %s index (graph only)",
                     ra_index_kind_name(ss->iopts.kind));
            return RA_EINVAL;
        }
        gdeg = hd->offload ? hd->offload->graph_degree : 0;
        if (gdeg < 1 || gdeg > RA_GRAPH_MAX_DEGREE) {
            snprintf(err, el,
                     "prebuilt graph degree (OffloadParams.graph_degree) %llu: 1..%d allowed",
                     (unsigned long long)gdeg, RA_GRAPH_MAX_DEGREE);
            return RA_EINVAL;
        }
        if (n == 0) {
            snprintf(err, el, "a prebuilt graph over no tokens");
            return RA_EINVAL;
        }
        uint64_t ashape[3] = {(uint64_t)ss->n_kv, n, gdeg};
        if ((st = ratd_want_tensor(v, RATD__ROLE__GRAPH_ADJ, "graph adjacency (GRAPH_ADJ)",
                                   RATD__DTYPE__I32, 3, ashape, &iga, err, el)))
            return st;
        const Ratd__Tensor *te = v->tensor[ige];
        n_ent = te->n_shape == 2 ? te->shape[1] : 0;
        if (n_ent < 1 || n_ent > RA_GRAPH_MAX_ENTRIES) {
            snprintf(err, el, "%llu graph entry points per head; 1..%d allowed",
                     (unsigned long long)n_ent, RA_GRAPH_MAX_ENTRIES);
            return RA_EINVAL;
        }
        uint64_t eshape[2] = {(uint64_t)ss->n_kv, n_ent};
        if ((st = ratd_want_tensor(v, RATD__ROLE__GRAPH_ENTRIES, "graph entries (GRAPH_ENTRIES)",
                                   RATD__DTYPE__I32, 2, eshape, &ige, err, el)))
            return st;
    }
    j->n_tasks = 0;
    if (n == 0 && nq == 0)
        return RA_OK; /* nothing to store: answered at once */
    size_t es = ra_dtype_size(ss->dtype);
    /* K+V+positions per head, before anything is allocated */
    size_t need = (size_t)ss->n_kv * (size_t)n * ((size_t)ss->dim * es * 2 + sizeof(int64_t));
    size_t used = __atomic_load_n(&s->mem.used, __ATOMIC_RELAXED);
    if (s->mem.limit && used + need > s->mem.limit) {
        snprintf(err, el,
                 "storing %llu tokens needs %zu bytes; the daemon's memory limit is %zu bytes "
                 "with %zu in use (drop sessions or raise --mem-limit); nothing stored",
                 (unsigned long long)n, need, s->mem.limit, used);
        return RA_ENOMEM;
    }
    j->ss = ratd_buf_get(&j->ss_buf, sizeof *j->ss);
    j->nodes = ratd_buf_get(&j->node_buf, sizeof *j->nodes);
    size_t G = (size_t)ss->n_kv;
    j->t.k = ratd_frame_data(v, ik, es, &j->t.copy[0]);
    j->t.v = ratd_frame_data(v, iv, es, &j->t.copy[1]);
    j->t.pos = ratd_frame_data(v, ip, sizeof(int64_t), &j->t.copy[2]);
    j->t.q = iq >= 0 && nq ? ratd_frame_data(v, iq, sizeof(float), &j->t.copy[3]) : NULL;
    j->t.knn = ikn >= 0 ? ratd_frame_data(v, ikn, sizeof(int32_t), &j->t.copy[4]) : NULL;
    j->t.adj = iga >= 0 ? ratd_frame_data(v, iga, sizeof(int32_t), &j->t.copy[5]) : NULL;
    j->t.ent = iga >= 0 ? ratd_frame_data(v, ige, sizeof(int32_t), &j->t.copy[6]) : NULL;
    if (!j->ss || !j->nodes || !j->t.k || !j->t.v || !j->t.pos || (iq >= 0 && nq && !j->t.q) ||
        (ikn >= 0 && !j->t.knn) || (iga >= 0 && (!j->t.adj || !j->t.ent)) ||
        (iga >= 0 && !ratd_buf_get(&j->t.fault, G * FAULT_MSG)) ||
        !ratd_buf_get(&j->t.bad, G * sizeof(int)) ||
        !ratd_buf_get(&j->t.bad_at, G * sizeof(size_t)) ||
        !ratd_buf_get(&j->t.bst, G * sizeof(ra_status)) ||
        !ratd_buf_get(&j->t.grow, 2 * G * sizeof(size_t)) ||
        !ratd_buf_get(&j->tst, G * sizeof(ra_status))) {
        snprintf(err, el, "out of memory");
        return RA_ENOMEM;
    }
    j->ss[0] = ss;
    j->n_sess = 1;
    j->layer = hd->layer;
    j->kind = JOB_TOKENS;
    j->t.offload = offload;
    j->t.phase = 0;
    j->t.n = (size_t)n;
    j->t.nq = (size_t)nq;
    j->t.es = es;
    j->t.knn_k = (int)knn_k;
    j->t.gdeg = (int)gdeg;
    j->t.n_ent = (int)n_ent;
    j->work.fn = tokens_task;
    j->work.done = tokens_done;
    j->n_tasks = ss->n_kv; /* per phase */
    return RA_OK;
}
