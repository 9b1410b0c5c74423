/* Attend, single and batched (several sessions' queries for one layer). Checked once
 * on the I/O thread: every session exists and has the layer, the sessions share their
 * shape, the ids are distinct, top_k and the per-head budgets are in range, q has the
 * expected shape, the reply fits max-message-bytes. Run as one job whose tasks each
 * take one group of query heads sharing a KV head, in one session, and call
 * ra_head_attend_group for it; each task checks its own rows of q for NaN/Inf (so q is
 * checked exactly once) and tells the index so (RA_HEAD_Q_CHECKED).
 *
 * Split rule: with S sessions of G KV heads, each of R query heads, on W workers,
 * every KV head's R query heads are cut into P = min(R, ceil(2 W / (S * G))) sub-groups
 * of ceil(R / P) consecutive heads (the last one may be smaller; P is then recounted
 * so that none is empty), giving S * G * P tasks: twice the workers when the batch
 * alone cannot feed them, one per KV head otherwise. Twice, because walks differ in
 * cost: with one task per worker the layer waits for the slowest walk, with two a
 * worker that finished early takes another (8 KV heads x 4 query heads on 16 workers:
 * 32 single walks; on the GPU host 1.18 ms p50 at recall 0.951 against 1.65 ms at 0.957
 * for 16 walks of 2, bench/README.md "Decode step"). Sessions on the projected-code scan
 * (pscan) take one task per KV head: the scan streams every code of the head once for
 * all the query heads it serves.
 *
 * Results go into the job's own buffers, which are the reply's frames. Warm ids (the
 * previous step's ids per (layer, query head), graph entry points) belong to the
 * session and layer, and only that lane's jobs, one at a time, read and write them. */
#include <math.h>
#include <stdio.h>
#include <string.h>

#include "ra_env.h"
#include "ratd_internal.h"

void ratd_attend_split_keys(int n_sess, int n_kv, int workers, int *P)
{
    static ra_env_once e_parts; /* RATD_KEY_PARTS: parts per KV head (a study knob) */
    long groups = (long)n_sess * n_kv, p = (workers + groups - 1) / groups;
    int force = ra_env_int(&e_parts, "RATD_KEY_PARTS", 0);
    if (force > 0)
        p = force;
    *P = (int)(p < 1 ? 1 : p > RA_HEAD_MAX_PARTS ? RA_HEAD_MAX_PARTS : p);
}

void ratd_attend_split(int n_sess, int n_kv, int rep, int workers, int *P, int *gsize)
{
    long groups = (long)n_sess * n_kv, want = 2L * workers;
    long p = 1;
    if (groups < want)
        p = (want + groups - 1) / groups;
    if (p > rep)
        p = rep;
    int g = (int)((rep + p - 1) / p);
    *gsize = g;
    *P = (rep + g - 1) / g;
}

static void attend_task(ratd_work *w, int t, int worker)
{
    (void)worker;
    ratd_job *j = (ratd_job *)w;
    int si = t / j->a.tasks_per_sess, r = t % j->a.tasks_per_sess;
    int g = r / j->a.P, part = r % j->a.P;
    ratd_session *ss = j->ss[si];
    int dim = ss->dim, k = j->a.k;
    int qpart = j->a.kparts ? 0 : part; /* key parts: every task has all the query heads */
    int h0 = g * ss->rep + qpart * j->a.gsize;
    int m = ss->rep - qpart * j->a.gsize;
    if (m > j->a.gsize)
        m = j->a.gsize;
    size_t row = (size_t)si * (size_t)ss->n_q + (size_t)h0; /* first row of this task */
    const float *q = j->a.q + row * (size_t)dim;
    float *o = (float *)j->a.o.p + row * (size_t)dim;
    float *lse = (float *)j->a.lse.p + row;
    int32_t *ids = (int32_t *)j->a.ids.p + row * (size_t)k;
    float *sc = (float *)j->a.sc.p + row * (size_t)k;
    ra_status *tst = (ra_status *)j->tst.p;
    if (!ratd_all_finite(q, (size_t)m * (size_t)dim, RA_DTYPE_F32)) {
        tst[t] = RA_ENONFINITE;
        return;
    }
    ra_search_params prm[RA_HEAD_MAX_GROUP];
    int n_out[RA_HEAD_MAX_GROUP];
    int kmax = 0;
    size_t w0 = (size_t)j->layer * (size_t)ss->n_q + (size_t)h0;
    for (int x = 0; x < m; x++) {
        int kh = j->a.k_head ? (int)j->a.k_head[h0 + x] : k;
        prm[x] = (ra_search_params){.k = kh,
                                    .effort = j->a.effort,
                                    .warm = ss->warm + (w0 + (size_t)x) * RATD_WARM,
                                    .n_warm = ss->n_warm[w0 + (size_t)x]};
        if (kh > kmax)
            kmax = kh;
    }
    ra_head *hd = __atomic_load_n(&ss->heads[(size_t)j->layer * (size_t)ss->n_kv + (size_t)g],
                                  __ATOMIC_ACQUIRE);
    ra_status st = RA_OK;
    if (!hd && j->a.kparts && part > 0) { /* part 0 answers for the head */
        tst[t] = RA_OK;
        return;
    }
    if (!hd) { /* the layer never got tokens */
        memset(o, 0, (size_t)m * (size_t)dim * sizeof *o);
        for (int x = 0; x < m; x++) {
            lse[x] = -INFINITY;
            n_out[x] = 0;
        }
    } else if (j->a.kparts) {
        void *ctx = (char *)j->a.pctx.p + ((size_t)si * (size_t)ss->n_kv + (size_t)g) * j->a.pbytes;
        int fin = 0;
        st = ra_head_attend_part(hd, ctx, part, (size_t)m, q, prm, j->a.scale, RA_HEAD_Q_CHECKED, o,
                                 lse, ids, sc, n_out, &fin);
        if (!fin) { /* the part that completes the head writes its answer */
            tst[t] = st;
            return;
        }
    } else {
        st = ra_head_attend_group(hd, (size_t)m, q, prm, j->a.scale, RA_HEAD_Q_CHECKED, o, lse, ids,
                                  sc, n_out, NULL);
    }
    if (st != RA_OK) {
        tst[t] = st;
        return;
    }
    /* the index wrote rows of kmax entries; the reply's rows are k wide */
    for (int x = m - 1; kmax < k && x > 0; x--) {
        memmove(ids + (size_t)x * k, ids + (size_t)x * kmax, (size_t)n_out[x] * sizeof *ids);
        memmove(sc + (size_t)x * k, sc + (size_t)x * kmax, (size_t)n_out[x] * sizeof *sc);
    }
    for (int x = 0; x < m; x++) {
        int32_t *ir = ids + (size_t)x * k;
        int nw = n_out[x] < RATD_WARM ? n_out[x] : RATD_WARM;
        memcpy(ss->warm + (w0 + (size_t)x) * RATD_WARM, ir, (size_t)nw * sizeof *ir);
        ss->n_warm[w0 + (size_t)x] = nw;
        if (!j->a.want)
            continue;
        int64_t *pr = (int64_t *)j->a.pos.p + (row + (size_t)x) * (size_t)k;
        float *sr = sc + (size_t)x * k;
        if (hd && n_out[x])
            ra_head_positions(hd, ir, (size_t)n_out[x], pr);
        for (int i = n_out[x]; i < k; i++) {
            pr[i] = -1;
            sr[i] = -INFINITY;
        }
        ((int32_t *)j->a.cnt.p)[row + (size_t)x] = n_out[x];
    }
    tst[t] = RA_OK;
}

static void attend_done(ratd_work *w, int worker)
{
    (void)worker;
    ratd_job *j = (ratd_job *)w;
    const ra_status *tst = j->tst.p;
    for (int t = 0; t < j->n_tasks; t++) {
        if (tst[t] == RA_OK)
            continue;
        int si = t / j->a.tasks_per_sess, r = t % j->a.tasks_per_sess;
        ratd_session *ss = j->ss[si];
        int g = r / j->a.P, h0 = g * ss->rep + (j->a.kparts ? 0 : r % j->a.P) * j->a.gsize;
        int m = (g + 1) * ss->rep - h0;
        int h1 = h0 + (m < j->a.gsize ? m : j->a.gsize) - 1;
        if (tst[t] == RA_ENONFINITE)
            ratd_job_set_err(j, RA_ENONFINITE, "NaN or Inf in q (session %llu, query heads %d..%d)",
                             (unsigned long long)ss->id, h0, h1);
        else
            ratd_job_set_err(j, tst[t], "session %llu layer %u KV head %d: search failed: %s",
                             (unsigned long long)ss->id, j->layer, g, ra_strerror(tst[t]));
        break;
    }
    ratd_job_complete(j);
}

/* The sessions named by the request (AttendParams.sessions, else Header.session). */
static ra_status attend_sessions(ratd_server *s, ratd_job *j, const Ratd__AttendParams *ap)
{
    const Ratd__Header *hd = j->v.hdr;
    int batch = ap->n_sessions > 0;
    size_t n = batch ? ap->n_sessions : 1;
    char *err = j->err;
    size_t el = sizeof j->err;
    if (n > (size_t)s->cfg.max_batch) {
        snprintf(err, el, "%zu sessions in one Attend; at most %d (max-batch)", n,
                 s->cfg.max_batch);
        return RA_ETOOBIG;
    }
    if (batch && hd->session && hd->session != ap->sessions[0]) {
        snprintf(err, el,
                 "a batched Attend names its sessions in AttendParams.sessions; Header.session "
                 "(%llu) must be 0 or the first of them (%llu)",
                 (unsigned long long)hd->session, (unsigned long long)ap->sessions[0]);
        return RA_EINVAL;
    }
    j->ss = ratd_buf_get(&j->ss_buf, n * sizeof *j->ss);
    j->nodes = ratd_buf_get(&j->node_buf, n * sizeof *j->nodes);
    if (!j->ss || !j->nodes) {
        snprintf(err, el, "out of memory");
        return RA_ENOMEM;
    }
    uint64_t gen = ++s->mark_gen;
    for (size_t i = 0; i < n; i++) {
        uint64_t id = batch ? ap->sessions[i] : hd->session;
        /* a batch carries one token per session; Header.token serves the first */
        const ProtobufCBinaryData *tok = i < ap->n_session_tokens ? &ap->session_tokens[i]
                                         : i == 0                 ? &hd->token
                                                                  : NULL;
        ratd_session *ss =
            ratd_session_get(s, id, tok ? tok->data : NULL, tok ? tok->len : 0, j->peer, err, el);
        if (!ss) {
            if (batch) {
                size_t o = strlen(err);
                snprintf(err + o, el - o, "; the batched Attend is refused as a whole");
            }
            return RA_ENOSESSION;
        }
        if (ss->mark == gen) {
            snprintf(err, el, "session %llu appears twice in the batch", (unsigned long long)id);
            return RA_EINVAL;
        }
        ss->mark = gen;
        if (hd->layer >= (uint32_t)ss->n_layers) {
            snprintf(err, el, "layer %u does not exist: session %llu has layers 0..%d", hd->layer,
                     (unsigned long long)ss->id, ss->n_layers - 1);
            return RA_ENOLAYER;
        }
        const ratd_session *s0 = j->ss[0];
        if (i > 0 && (ss->n_q != s0->n_q || ss->n_kv != s0->n_kv || ss->dim != s0->dim)) {
            snprintf(err, el,
                     "session %llu has %d query heads, %d KV heads and head_dim %d, but the "
                     "batch's first session %llu has %d, %d and %d: a batch shares its shape",
                     (unsigned long long)ss->id, ss->n_q, ss->n_kv, ss->dim,
                     (unsigned long long)s0->id, s0->n_q, s0->n_kv, s0->dim);
            return RA_ESHAPE;
        }
        j->ss[i] = ss;
    }
    j->n_sess = (int)n;
    return RA_OK;
}

ra_status ratd_attend_accept(ratd_server *s, ratd_job *j)
{
    Ratd__Header *hd = j->v.hdr;
    const Ratd__AttendParams *ap = hd->attend;
    char *err = j->err;
    size_t el = sizeof j->err;
    if (!ap) {
        snprintf(err, el, "Attend without its parameters (top_k)");
        return RA_EPROTO;
    }
    ra_status st = attend_sessions(s, j, ap);
    if (st != RA_OK) {
        j->n_sess = 0;
        return st;
    }
    const ratd_session *s0 = j->ss[0];
    int batch = ap->n_sessions > 0;
    if (ap->top_k < 1 || ap->top_k > (uint32_t)s->cfg.max_top_k) {
        snprintf(err, el, "top_k %u outside 1..%d (max-top-k)", ap->top_k, s->cfg.max_top_k);
        st = ap->top_k ? RA_ETOOBIG : RA_EINVAL;
        goto fail;
    }
    if (ap->n_top_k_per_head && ap->n_top_k_per_head != (size_t)s0->n_q) {
        snprintf(err, el, "top_k_per_head has %zu entries, the session has %d query heads",
                 ap->n_top_k_per_head, s0->n_q);
        st = RA_ESHAPE;
        goto fail;
    }
    for (size_t h = 0; h < ap->n_top_k_per_head; h++)
        if (ap->top_k_per_head[h] > ap->top_k) {
            snprintf(err, el, "top_k_per_head[%zu] = %u exceeds top_k %u", h, ap->top_k_per_head[h],
                     ap->top_k);
            st = RA_EINVAL;
            goto fail;
        }
    if (!isfinite(ap->scale) || ap->effort > (1u << 24)) {
        snprintf(err, el, "scale must be finite and effort <= 2^24");
        st = RA_EINVAL;
        goto fail;
    }
    size_t S = (size_t)j->n_sess, H = (size_t)s0->n_q, D = (size_t)s0->dim, K = ap->top_k;
    uint64_t qshape[3] = {S, H, D};
    int iq;
    st = ratd_want_tensor(&j->v, RATD__ROLE__Q, "q", RATD__DTYPE__F32, batch ? 3 : 2,
                          batch ? qshape : qshape + 1, &iq, err, el);
    if (st != RA_OK)
        goto fail;
    /* ids and scores always; positions and counts with want_topk */
    size_t rows = S * H, per_row = D * 4 + 4 + K * (4 + 4 + (ap->want_topk ? 8 : 0)) + 4;
    if (rows * per_row > s->cfg.max_message_bytes) {
        snprintf(err, el,
                 "the reply of %zu sessions x %zu heads x top_k %zu would be %zu MiB, "
                 "over max-message-bytes",
                 S, H, K, rows * per_row >> 20);
        st = RA_ETOOBIG;
        goto fail;
    }
    int P, gsize;
    ratd_attend_split((int)S, s0->n_kv, s0->rep, ratd_pool_workers(s->pool), &P, &gsize);
    j->a.kparts = 0;
    size_t nctx = 0;
    if (s0->iopts.kind == RA_INDEX_PSCAN) { /* parts over the keys, merged by the last */
        ratd_attend_split_keys((int)S, s0->n_kv, ratd_pool_workers(s->pool), &P);
        gsize = s0->rep;
        j->a.kparts = 1;
        j->a.pbytes = (ra_head_part_bytes(P, (size_t)s0->rep, (int)K) + 63) / 64 * 64;
        nctx = S * (size_t)s0->n_kv;
    }
    /* the reply's buffers (and the parts' merge contexts) count on the memory limit while
     * they are computed and until ZeroMQ has sent them: a client that never reads cannot
     * pile them up outside it */
    if ((st = ratd_job_charge(s, j, rows * per_row + nctx * j->a.pbytes)) != RA_OK)
        goto fail;
    j->a.q = ratd_frame_data(&j->v, iq, sizeof(float), &j->a.qcopy);
    int ok = j->a.q && ratd_buf_get(&j->a.o, rows * D * sizeof(float)) &&
             ratd_buf_get(&j->a.lse, rows * sizeof(float)) &&
             ratd_buf_get(&j->a.ids, rows * K * sizeof(int32_t)) &&
             ratd_buf_get(&j->a.sc, rows * K * sizeof(float));
    if (ok && ap->want_topk)
        ok = ratd_buf_get(&j->a.pos, rows * K * sizeof(int64_t)) &&
             ratd_buf_get(&j->a.cnt, rows * sizeof(int32_t));
    if (j->a.kparts) {
        char *c = ok ? ratd_buf_get(&j->a.pctx, nctx * j->a.pbytes) : NULL;
        ok = c != NULL;
        for (size_t x = 0; ok && x < nctx; x++)
            ra_head_part_init(c + x * j->a.pbytes, P, (size_t)s0->rep, (int)K);
    }
    j->a.P = P;
    j->a.gsize = gsize;
    j->a.tasks_per_sess = s0->n_kv * P;
    j->n_tasks = (int)S * j->a.tasks_per_sess;
    if (ok)
        ok = ratd_buf_get(&j->tst, (size_t)j->n_tasks * sizeof(ra_status)) != NULL;
    if (!ok) {
        snprintf(err, el, "out of memory");
        st = RA_ENOMEM;
        goto fail;
    }
    j->kind = JOB_ATTEND;
    j->layer = hd->layer;
    j->a.k = (int)K;
    j->a.effort = (int)ap->effort;
    j->a.want = ap->want_topk;
    j->a.scale = ap->scale;
    j->a.k_head = ap->n_top_k_per_head ? ap->top_k_per_head : NULL;
    j->work.fn = attend_task;
    j->work.done = attend_done;
    return RA_OK;
fail:
    j->n_sess = 0;
    j->n_tasks = 0;
    return st;
}

int ratd_attend_reply(ratd_job *j, ra_proto_part *pp)
{
    const ratd_session *s0 = j->ss[0];
    int batch = j->v.hdr->attend->n_sessions > 0;
    uint64_t S = (uint64_t)j->n_sess, H = (uint64_t)s0->n_q, D = (uint64_t)s0->dim;
    uint64_t K = (uint64_t)j->a.k, rows = S * H;
    struct {
        Ratd__Role role;
        Ratd__DType dt;
        const void *data;
        size_t es;
        uint64_t inner; /* 0: none */
    } f[5] = {
        {RATD__ROLE__O, RATD__DTYPE__F32, j->a.o.p, 4, D},
        {RATD__ROLE__LSE, RATD__DTYPE__F32, j->a.lse.p, 4, 0},
        {RATD__ROLE__TOPK_POS, RATD__DTYPE__I64, j->a.pos.p, 8, K},
        {RATD__ROLE__TOPK_SCORE, RATD__DTYPE__F32, j->a.sc.p, 4, K},
        {RATD__ROLE__TOPK_COUNT, RATD__DTYPE__I32, j->a.cnt.p, 4, 0},
    };
    int n = j->a.want ? 5 : 2;
    for (int i = 0; i < n; i++) {
        ra_proto_part *p = &pp[i];
        memset(p, 0, sizeof *p);
        p->role = f[i].role;
        p->dtype = f[i].dt;
        p->ndim = 0;
        if (batch)
            p->shape[p->ndim++] = S;
        p->shape[p->ndim++] = H;
        if (f[i].inner)
            p->shape[p->ndim++] = f[i].inner;
        p->data = f[i].data;
        p->bytes = (size_t)(rows * (f[i].inner ? f[i].inner : 1)) * f[i].es;
        p->give = RA_PROTO_LEND; /* zero copy: the buffers go back with the job */
    }
    return n;
}
