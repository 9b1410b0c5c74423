/* Sessions: the table (sorted by id, I/O thread only), CreateSession's checks, Drop,
 * reference counts and the reaper. Drop never waits: it takes the session out of the
 * table at once (later requests get RA_ENOSESSION) and drops the table's reference;
 * jobs already queued or running on it hold their own and finish normally. When the
 * last reference goes, a small session with no build running is freed right there;
 * any other goes to the reaper thread (nng's reaper, Redis's lazyfree), which cancels
 * its builds, waits for them to end and frees it. Its memory stays on the daemon's
 * account until then. */
#define _GNU_SOURCE
#include <errno.h>
#include <limits.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <time.h>

#include "ra_log.h"
#include "ratd_internal.h"

static int find_index(ratd_server *s, uint64_t id)
{
    int lo = 0, hi = s->n_sessions - 1;
    while (lo <= hi) {
        int mid = lo + (hi - lo) / 2;
        uint64_t x = s->sessions[mid]->id;
        if (x == id)
            return mid;
        if (x < id)
            lo = mid + 1;
        else
            hi = mid - 1;
    }
    return -1;
}

ratd_session *ratd_session_find(ratd_server *s, uint64_t id)
{
    int i = find_index(s, id);
    return i < 0 ? NULL : s->sessions[i];
}

ra_status ratd_random(void *buf, size_t n)
{
    uint8_t *p = buf;
    while (n > 0) {
        ssize_t r = getrandom(p, n, 0);
        if (r < 0) {
            if (errno == EINTR)
                continue;
            return RA_EIO;
        }
        p += r;
        n -= (size_t)r;
    }
    return RA_OK;
}

/* Compares in time independent of where the tokens differ. */
static int token_equal(const uint8_t *a, const uint8_t *b)
{
    uint8_t d = 0;
    for (int i = 0; i < RATD_TOKEN_BYTES; i++)
        d |= (uint8_t)(a[i] ^ b[i]);
    return d == 0;
}

static void unknown_session(uint64_t id, char *err, size_t errlen)
{
    snprintf(err, errlen,
             "no session %llu (never created, dropped, expired, or the request's token is "
             "not the one CreateSession returned)",
             (unsigned long long)id);
}

ratd_session *ratd_session_get(ratd_server *s, uint64_t id, const uint8_t *token, size_t len,
                               const char *peer, char *err, size_t errlen)
{
    ratd_session *ss = ratd_session_find(s, id);
    if (ss && len == RATD_TOKEN_BYTES && token_equal(ss->token, token)) {
        ss->last_used = ra_now_s();
        return ss;
    }
    if (ss) {
        s->tokens_refused++;
        RA_WARN("client %s named session %llu (created by client %s) with %s token: refused "
                "as unknown",
                peer, (unsigned long long)id, ss->owner, len ? "a wrong" : "no");
    }
    unknown_session(id, err, errlen);
    return NULL;
}

ra_status ratd_session_check_layer(ratd_session *ss, uint32_t layer, char *err, size_t errlen)
{
    if (!__atomic_load_n(&ss->broken[layer], __ATOMIC_ACQUIRE))
        return RA_OK;
    snprintf(err, errlen,
             "layer %u of session %llu was left partially updated by a failed Offload/Append "
             "(see the earlier error); drop the session and offload again",
             layer, (unsigned long long)ss->id);
    return RA_ESTATE;
}

static void session_free(ratd_session *ss)
{
    size_t nh = (size_t)ss->n_layers * (size_t)ss->n_kv;
    if (ss->heads) {
        for (size_t i = 0; i < nh; i++) /* every build winds down at once */
            ra_head_cancel(ss->heads[i]);
        for (size_t i = 0; i < nh; i++)
            ra_head_destroy(ss->heads[i]); /* waits for its build, cancelled above */
    }
    free(ss->heads);
    free(ss->warm);
    free(ss->n_warm);
    free(ss->broken);
    free(ss->lanes);
    ra_mem_release(&ss->mem, ss->own_bytes);
    size_t left = __atomic_load_n(&ss->mem.used, __ATOMIC_RELAXED);
    if (left) { /* a bug: keep the daemon's account right anyway */
        RA_ERROR("session %llu: %zu bytes still accounted after its free",
                 (unsigned long long)ss->id, left);
        ra_mem_release(&ss->mem, left);
    }
    free(ss);
}

static int session_building(ratd_session *ss)
{
    for (int i = 0; i < ss->n_layers * ss->n_kv; i++)
        if (ra_head_building(__atomic_load_n(&ss->heads[i], __ATOMIC_ACQUIRE)))
            return 1;
    return 0;
}

void ratd_session_unref(ratd_server *s, ratd_session *ss)
{
    if (--ss->refs > 0)
        return;
    size_t bytes = __atomic_load_n(&ss->mem.used, __ATOMIC_RELAXED);
    if (!s->reaper_live || (!session_building(ss) && bytes <= RATD_INLINE_FREE_BYTES)) {
        session_free(ss);
        return;
    }
    RA_INFO("session %llu: %zu MiB and %s go to the reaper", (unsigned long long)ss->id,
            bytes >> 20, session_building(ss) ? "running index builds" : "no build");
    /* Cancel its builds now, not when the reaper reaches it: a build waiting for a build
     * slot then leaves at once, and one running ends at its next check, instead of taking
     * slots from live sessions while dropped ones queue in the reaper (seen in the soak:
     * under session churn the queue of dropped sessions' builds outgrew the two slots). */
    for (int i = 0; i < ss->n_layers * ss->n_kv; i++)
        ra_head_cancel(__atomic_load_n(&ss->heads[i], __ATOMIC_ACQUIRE));
    pthread_mutex_lock(&s->reap_mu);
    ss->reap_next = s->reap_head;
    s->reap_head = ss;
    s->reap_pending++;
    pthread_cond_broadcast(&s->reap_cv);
    pthread_mutex_unlock(&s->reap_mu);
}

static void *reaper_main(void *arg)
{
    ratd_server *s = arg;
    pthread_setname_np(pthread_self(), "ratd-reaper");
    pthread_mutex_lock(&s->reap_mu);
    for (;;) {
        while (!s->reap_head && !s->reap_stop)
            pthread_cond_wait(&s->reap_cv, &s->reap_mu);
        ratd_session *ss = s->reap_head;
        if (!ss)
            break; /* stop, and nothing left */
        s->reap_head = ss->reap_next;
        pthread_mutex_unlock(&s->reap_mu);
        double t0 = ra_now_s();
        uint64_t id = ss->id;
        session_free(ss);
        RA_INFO("session %llu freed by the reaper (%.3f s)", (unsigned long long)id,
                ra_now_s() - t0);
        pthread_mutex_lock(&s->reap_mu);
        s->reap_pending--;
        pthread_cond_broadcast(&s->reap_cv);
    }
    pthread_mutex_unlock(&s->reap_mu);
    return NULL;
}

ra_status ratd_reaper_start(ratd_server *s, char *err, size_t errlen)
{
    pthread_mutex_init(&s->reap_mu, NULL);
    pthread_cond_init(&s->reap_cv, NULL);
    if (pthread_create(&s->reaper, NULL, reaper_main, s) != 0) {
        snprintf(err, errlen, "cannot start the reaper thread");
        pthread_mutex_destroy(&s->reap_mu);
        pthread_cond_destroy(&s->reap_cv);
        return RA_ENOMEM;
    }
    s->reaper_live = 1;
    return RA_OK;
}

int ratd_reaper_finish(ratd_server *s, double seconds)
{
    while (s->n_sessions > 0) {
        ratd_session *ss = s->sessions[--s->n_sessions];
        ratd_session_unref(s, ss);
    }
    if (!s->reaper_live)
        return 0;
    struct timespec until;
    clock_gettime(CLOCK_REALTIME, &until);
    until.tv_sec += (time_t)seconds;
    until.tv_nsec += (long)((seconds - (double)(time_t)seconds) * 1e9);
    if (until.tv_nsec >= 1000000000L) {
        until.tv_sec++;
        until.tv_nsec -= 1000000000L;
    }
    pthread_mutex_lock(&s->reap_mu);
    int rc = 0;
    while (s->reap_pending > 0 && rc != ETIMEDOUT)
        rc = pthread_cond_timedwait(&s->reap_cv, &s->reap_mu, &until);
    int left = s->reap_pending;
    s->reap_stop = 1;
    pthread_cond_broadcast(&s->reap_cv);
    pthread_mutex_unlock(&s->reap_mu);
    if (left) {
        RA_WARN("%d dropped sessions still wait for index builds to end after %.1f s", left,
                seconds);
        return -1;
    }
    pthread_join(s->reaper, NULL);
    s->reaper_live = 0;
    pthread_mutex_destroy(&s->reap_mu);
    pthread_cond_destroy(&s->reap_cv);
    return 0;
}

/* IndexOptions from the wire into ra_index_opts, checked against the index's table. */
static ra_status index_opts(const ratd_config *cfg, const Ratd__IndexOptions *x, ra_index_opts *io,
                            char *err, size_t errlen)
{
    memset(io, 0, sizeof *io);
    if (x) {
#define WIRE(f) io->f = x->f > INT_MAX ? INT_MAX : (int)x->f;
        WIRE(graph_knn)
        WIRE(graph_degree)
        WIRE(graph_build_ef)
        WIRE(graph_entries)
        WIRE(n_train)
        WIRE(ivf_nlist)
        WIRE(hnsw_m)
        WIRE(threads)
#undef WIRE
        io->kind = (ra_index_kind)(x->kind > INT_MAX ? INT_MAX : (int)x->kind);
        io->seed = x->seed;
    }
    if (!io->threads)
        io->threads = cfg->index_threads;
    ra_status st = ra_index_opts_check(io, err, errlen);
    if (st != RA_OK)
        return st;
    ra_index_opts_fill(io);
    return RA_OK;
}

ra_status ratd_session_create(ratd_server *s, const Ratd__CreateSession *c, const char *peer,
                              uint64_t *id, uint8_t token[RATD_TOKEN_BYTES], char *err,
                              size_t errlen)
{
    if (!c) {
        snprintf(err, errlen, "CreateSession without its parameters");
        return RA_EPROTO;
    }
    const ratd_config *cfg = &s->cfg;
    if (c->n_layers < 1 || c->n_layers > (uint32_t)cfg->max_layers) {
        snprintf(err, errlen, "n_layers %u outside 1..%d (max-layers)", c->n_layers,
                 cfg->max_layers);
        return c->n_layers ? RA_ETOOBIG : RA_EINVAL;
    }
    if (c->n_q_heads < 1 || c->n_q_heads > (uint32_t)cfg->max_heads) {
        snprintf(err, errlen, "n_q_heads %u outside 1..%d (max-heads)", c->n_q_heads,
                 cfg->max_heads);
        return c->n_q_heads ? RA_ETOOBIG : RA_EINVAL;
    }
    if (c->n_kv_heads < 1 || c->n_kv_heads > c->n_q_heads || c->n_q_heads % c->n_kv_heads) {
        snprintf(err, errlen, "n_kv_heads %u must divide n_q_heads %u (GQA groups of equal size)",
                 c->n_kv_heads, c->n_q_heads);
        return RA_EINVAL;
    }
    if (c->n_q_heads / c->n_kv_heads > RA_HEAD_MAX_GROUP) {
        snprintf(err, errlen, "%u query heads per KV head; at most %d",
                 c->n_q_heads / c->n_kv_heads, RA_HEAD_MAX_GROUP);
        return RA_EINVAL;
    }
    if (c->head_dim < 1 || c->head_dim > (uint32_t)cfg->max_dim) {
        snprintf(err, errlen, "head_dim %u outside 1..%d (max-dim)", c->head_dim, cfg->max_dim);
        return c->head_dim ? RA_ETOOBIG : RA_EINVAL;
    }
    if ((unsigned)c->dtype > RATD__DTYPE__BF16) {
        snprintf(err, errlen, "dtype %d: K/V must be f32 (0), f16 (1) or bf16 (2)", (int)c->dtype);
        return RA_EINVAL;
    }
    ra_index_opts io;
    ra_status st = index_opts(cfg, c->index, &io, err, errlen);
    if (st != RA_OK)
        return st;
    if (s->n_sessions >= cfg->max_sessions) {
        snprintf(err, errlen, "%d sessions are live, the limit (max-sessions); drop one",
                 s->n_sessions);
        return RA_ETOOBIG;
    }
    size_t nh = (size_t)c->n_layers * c->n_kv_heads;
    size_t nw = (size_t)c->n_layers * c->n_q_heads;
    size_t own = sizeof(ratd_session) + nh * sizeof(ra_head *) +
                 nw * (RATD_WARM * sizeof(int32_t) + sizeof(int)) +
                 c->n_layers * (1 + sizeof(ratd_lane));
    ratd_session *ss = calloc(1, sizeof *ss);
    if (!ss) {
        snprintf(err, errlen, "out of memory creating a session");
        return RA_ENOMEM;
    }
    ss->mem.parent = &s->mem;
    if (ra_mem_reserve(&ss->mem, own) != RA_OK) {
        free(ss);
        snprintf(err, errlen, "daemon memory limit reached (%zu bytes of %zu in use)",
                 __atomic_load_n(&s->mem.used, __ATOMIC_RELAXED), s->mem.limit);
        return RA_ENOMEM;
    }
    ss->own_bytes = own;
    ss->n_layers = (int)c->n_layers;
    ss->n_kv = (int)c->n_kv_heads;
    ss->heads = calloc(nh, sizeof *ss->heads);
    ss->warm = calloc(nw * RATD_WARM, sizeof *ss->warm);
    ss->n_warm = calloc(nw, sizeof *ss->n_warm);
    ss->broken = calloc(c->n_layers, 1);
    ss->lanes = calloc(c->n_layers, sizeof *ss->lanes);
    if (s->n_sessions == s->cap_sessions) {
        int cap = s->cap_sessions ? 2 * s->cap_sessions : 16;
        ratd_session **tab = realloc(s->sessions, (size_t)cap * sizeof *tab);
        if (tab) {
            s->sessions = tab;
            s->cap_sessions = cap;
        }
    }
    if (!ss->heads || !ss->warm || !ss->n_warm || !ss->broken || !ss->lanes ||
        s->n_sessions == s->cap_sessions) {
        session_free(ss);
        snprintf(err, errlen, "out of memory creating a session");
        return RA_ENOMEM;
    }
    /* a random id below 2^63 (never 0, never one of the table), so that ids do not
     * repeat across restarts, and a random token that proves ownership */
    uint64_t nid = 0;
    for (int tries = 0; nid == 0 || find_index(s, nid) >= 0; tries++) {
        if (tries == 64 || ratd_random(&nid, sizeof nid) != RA_OK ||
            ratd_random(ss->token, sizeof ss->token) != RA_OK) {
            session_free(ss);
            snprintf(err, errlen, "the kernel has no random bytes for a session id (getrandom)");
            return RA_EIO;
        }
        nid &= ~((uint64_t)1 << 63);
    }
    ss->id = nid;
    ss->last_used = ra_now_s();
    snprintf(ss->owner, sizeof ss->owner, "%s", peer);
    ss->n_q = (int)c->n_q_heads;
    ss->rep = ss->n_q / ss->n_kv;
    ss->dim = (int)c->head_dim;
    ss->dtype = (ra_dtype)c->dtype;
    ss->iopts = io;
    ss->refs = 1;
    int at = s->n_sessions; /* sorted insertion */
    while (at > 0 && s->sessions[at - 1]->id > nid)
        at--;
    memmove(&s->sessions[at + 1], &s->sessions[at],
            (size_t)(s->n_sessions - at) * sizeof *s->sessions);
    s->sessions[at] = ss;
    s->n_sessions++;
    *id = ss->id;
    memcpy(token, ss->token, RATD_TOKEN_BYTES);
    RA_INFO("session %llu (client %s): %d layers, %d query heads, %d KV heads, dim %d, %s, "
            "index %s",
            (unsigned long long)ss->id, peer, ss->n_layers, ss->n_q, ss->n_kv, ss->dim,
            ra_dtype_name(ss->dtype), ra_index_kind_name(io.kind));
    return RA_OK;
}

static void remove_at(ratd_server *s, int i)
{
    ratd_session *ss = s->sessions[i];
    memmove(&s->sessions[i], &s->sessions[i + 1],
            (size_t)(s->n_sessions - i - 1) * sizeof *s->sessions);
    s->n_sessions--;
    s->tokens -= ss->tokens <= s->tokens ? ss->tokens : s->tokens;
}

ra_status ratd_session_drop(ratd_server *s, uint64_t id, const uint8_t *token, size_t len,
                            const char *peer, char *err, size_t errlen)
{
    ratd_session *ss = ratd_session_get(s, id, token, len, peer, err, errlen);
    if (!ss)
        return RA_ENOSESSION;
    remove_at(s, find_index(s, id));
    RA_INFO("session %llu dropped (%d jobs still hold it)", (unsigned long long)id, ss->refs - 1);
    ratd_session_unref(s, ss);
    return RA_OK;
}

void ratd_session_expire(ratd_server *s, double now)
{
    if (s->cfg.session_ttl <= 0)
        return;
    for (int i = s->n_sessions - 1; i >= 0; i--) {
        ratd_session *ss = s->sessions[i];
        double idle = now - ss->last_used;
        if (ss->refs > 1 || idle < (double)s->cfg.session_ttl)
            continue; /* in use: a request in flight, or recent */
        remove_at(s, i);
        s->sessions_expired++;
        RA_INFO("session %llu (client %s) expired: unused for %.0f s (--session-ttl %d)",
                (unsigned long long)ss->id, ss->owner, idle, s->cfg.session_ttl);
        ratd_session_unref(s, ss);
    }
}
