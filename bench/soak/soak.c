/* ratd-bench-soak: C client threads against a private ratd for M minutes, doing what
 * decoders and their failures do at random: sessions of random small shapes, dtypes and
 * index kinds, offloads, appends, attends, drops, clients closed with requests in flight
 * and reconnects. Every answer is checked: o and lse against exact attention in double
 * precision over the positions the daemon says it read (and, for the exact index, that
 * those are the true top-k). Requests made invalid on purpose (wrong shapes, unknown
 * sessions and layers, NaN) must get exactly the error they provoke; any other error
 * reply is unprovoked and fails the run. After a warm-up (a tenth of the run, 10..60 s)
 * every session is dropped and the daemon measured; at the end again: Stats mem_used
 * must be at its start value both times, the resident set at the end (VmRSS, after the
 * idle heap trim) within 5 % of the one after the warm-up, or a small absolute slack,
 * so that one-time memory (thread heaps, pooled request buffers) is told apart from
 * growth; the daemon's error count must equal the errors the clients saw (plus at most
 * the abandoned Attends of closed clients), and it must exit cleanly on SIGTERM.
 * The exit status is the verdict (0 pass, 1 fail, 2 usage or start failure).
 *
 *   ratd-bench-soak --minutes M --clients C [--seed S] [--workers N] [--ratd BIN]
 *                   [--rss-slack-mb MB] [--json]
 *
 * The daemon is started as ratd-bench-decode starts its own (bench/decode/daemon.c). */
#define _GNU_SOURCE
#include <errno.h>
#include <getopt.h>
#include <math.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "decode.h"
#include "ra_half.h"
#include "ratd/client.h"

#define MAX_SESS 3  /* live sessions per client thread */
static int g_index = -1; /* --index: one kind for every session, -1: a random mix */
#define MAX_TOK 600 /* tokens per (layer, KV head) before a layer stops growing */

/* ---- what is counted --------------------------------------------------------------------- */

enum { A_CREATE, A_OFFLOAD, A_APPEND, A_ATTEND, A_DROP, A_PROVOKE, A_KILL, A_RECONNECT, A_STATS, A_N };
static const char *const g_action[A_N] = {"create", "offload", "append",    "attend", "drop",
                                          "provoke", "kill",   "reconnect", "stats"};

typedef struct counts {
    uint64_t requests, act[A_N], provoked, unprovoked, wrong, in_flight_abandoned;
    uint64_t checked_o, tokens;
    double max_err;
    char first_problem[400];
} counts;

static pthread_mutex_t g_mu = PTHREAD_MUTEX_INITIALIZER;
static counts g_total;

static void problem(counts *c, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void problem(counts *c, const char *fmt, ...)
{
    char msg[400];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    if (!c->first_problem[0])
        snprintf(c->first_problem, sizeof c->first_problem, "%s", msg);
    fprintf(stderr, "ratd-bench-soak: %s\n", msg);
}

/* ---- a session and its exact copy ---------------------------------------------------- */

typedef struct layer_kv {
    int n;               /* tokens per KV head */
    float *k[4], *v[4];  /* [kv head][n][dim], as the daemon stores them (rounded to dtype) */
} layer_kv;

typedef struct sess {
    uint64_t id;
    ra_session_token tok; /* the session's owner token: adopted again after a reconnect */
    int L, H, G, D;
    ra_dtype dt;
    ra_client_index_kind kind;
    layer_kv lay[3];
} sess;

typedef struct worker {
    int idx;
    uint64_t rng;
    ra_client *cl;
    const char *endpoint;
    double deadline, warm_end;
    sess s[MAX_SESS];
    int n_s;
    counts c;
} worker;

static uint64_t rnd(worker *w)
{
    uint64_t x = (w->rng += 0x9e3779b97f4a7c15ull);
    x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
    x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
    return x ^ (x >> 31);
}
static int rint_(worker *w, int lo, int hi) /* [lo, hi] */
{
    return lo + (int)(rnd(w) % (uint64_t)(hi - lo + 1));
}
static float rnorm(worker *w)
{
    double u = ((double)(rnd(w) >> 11) + 0.5) / 9007199254740992.0;
    double v = (double)(rnd(w) >> 11) / 9007199254740992.0;
    return (float)(sqrt(-2.0 * log(u)) * cos(6.283185307179586 * v));
}

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

/* The daemon's stored value of x in dtype dt. */
static float round_to(ra_dtype dt, float x)
{
    if (dt == RA_DTYPE_F16)
        return ra_f16_to_f32(ra_f32_to_f16(x));
    if (dt == RA_DTYPE_BF16)
        return ra_bf16_to_f32(ra_f32_to_bf16(x));
    return x;
}

static void put(ra_dtype dt, void *dst, size_t i, float x)
{
    if (dt == RA_DTYPE_F32)
        ((float *)dst)[i] = x;
    else if (dt == RA_DTYPE_F16)
        ((uint16_t *)dst)[i] = ra_f32_to_f16(x);
    else
        ((uint16_t *)dst)[i] = ra_f32_to_bf16(x);
}

static void sess_free(sess *s)
{
    for (int l = 0; l < 3; l++)
        for (int g = 0; g < 4; g++) {
            free(s->lay[l].k[g]);
            free(s->lay[l].v[g]);
        }
    memset(s, 0, sizeof *s);
}

/* One status check: `want` is what this request must get (RA_OK or the provoked error). */
static int expect(worker *w, const char *what, ra_status got, ra_status want)
{
    w->c.requests++;
    if (got == want) {
        if (want != RA_OK)
            w->c.provoked++;
        return 1;
    }
    if (got == RA_OK)
        problem(&w->c, "client %d: %s succeeded but should have failed with %s", w->idx, what,
                ra_strerror(want));
    else
        problem(&w->c, "client %d: %s: unprovoked %s: %s", w->idx, what, ra_strerror(got),
                ra_client_errmsg(w->cl));
    w->c.unprovoked++;
    return 0;
}

/* A client-side call that sends nothing (token kept or adopted): it must succeed. */
static int local_ok(worker *w, const char *what, ra_status got)
{
    if (got == RA_OK)
        return 1;
    problem(&w->c, "client %d: %s: %s: %s", w->idx, what, ra_strerror(got), ra_client_errmsg(w->cl));
    w->c.unprovoked++;
    return 0;
}

/* ---- actions ----------------------------------------------------------------------------- */

static void do_create(worker *w)
{
    if (w->n_s == MAX_SESS)
        return;
    sess *s = &w->s[w->n_s];
    memset(s, 0, sizeof *s);
    s->L = rint_(w, 1, 3);
    s->G = rint_(w, 1, 2);
    s->H = s->G * rint_(w, 1, 4);
    static const int dims[] = {8, 16, 32, 64};
    s->D = dims[rint_(w, 0, 3)];
    s->dt = (ra_dtype)rint_(w, 0, 2);
    static const ra_client_index_kind kinds[] = {RA_CLIENT_INDEX_FLAT, RA_CLIENT_INDEX_GRAPH,
                                                 RA_CLIENT_INDEX_HNSW};
    s->kind = kinds[rint_(w, 0, 2)];
    if (g_index >= 0)
        s->kind = (ra_client_index_kind)g_index;
    ra_session_desc d;
    ra_session_desc_init(&d);
    d.n_layers = s->L;
    d.n_q_heads = s->H;
    d.n_kv_heads = s->G;
    d.head_dim = s->D;
    d.dtype = s->dt;
    d.index.kind = s->kind;
    d.index.n_train = 64;
    d.index.threads = 1;
    d.index.seed = rnd(w);
    ra_status st = ra_client_session_create(w->cl, &d, &s->id);
    if (expect(w, "create", st, RA_OK) &&
        local_ok(w, "session_token", ra_client_session_token(w->cl, s->id, &s->tok)))
        w->n_s++;
}

/* Offload (layer empty) or Append (layer holding tokens) of n tokens; `nan` puts a NaN
 * into K (provoked: RA_ENONFINITE, nothing stored). */
static void do_tokens(worker *w, sess *s, int layer, int n, int nan)
{
    layer_kv *lk = &s->lay[layer];
    int offload = lk->n == 0;
    size_t es = ra_dtype_size(s->dt), per = (size_t)n * s->D;
    void *k = malloc((size_t)s->G * per * es), *v = malloc((size_t)s->G * per * es);
    int64_t *pos = malloc((size_t)n * sizeof *pos);
    float *kf = malloc((size_t)s->G * per * sizeof(float)), *vf = malloc((size_t)s->G * per * sizeof(float));
    int nq = offload ? rint_(w, 0, 48) : 0;
    float *q = nq ? malloc((size_t)s->H * nq * s->D * sizeof(float)) : NULL;
    if (!k || !v || !pos || !kf || !vf || (nq && !q)) {
        problem(&w->c, "client %d: out of memory", w->idx);
        w->c.unprovoked++;
        goto out;
    }
    for (size_t i = 0; i < (size_t)s->G * per; i++) {
        kf[i] = round_to(s->dt, rnorm(w));
        vf[i] = round_to(s->dt, rnorm(w));
        put(s->dt, k, i, kf[i]);
        put(s->dt, v, i, vf[i]);
    }
    if (nan)
        put(s->dt, k, (size_t)rint_(w, 0, (int)(s->G * per) - 1), NAN);
    for (int i = 0; i < n; i++)
        pos[i] = lk->n + i;
    for (size_t i = 0; q && i < (size_t)s->H * nq * s->D; i++)
        q[i] = rnorm(w);
    ra_kv_batch b = {.n_kv_heads = s->G, .head_dim = s->D, .dtype = s->dt, .n_tokens = (size_t)n,
                     .k = k, .v = v, .pos = pos, .n_q_heads = nq ? s->H : 0,
                     .n_queries = (size_t)nq, .q_train = q};
    ra_status st = offload ? ra_client_offload(w->cl, s->id, layer, &b)
                           : ra_client_append(w->cl, s->id, layer, &b);
    w->c.act[offload ? A_OFFLOAD : A_APPEND]++;
    if (!expect(w, offload ? "offload" : "append", st, nan ? RA_ENONFINITE : RA_OK) || nan)
        goto out;
    for (int g = 0; g < s->G; g++) {
        float *nk = realloc(lk->k[g], (size_t)(lk->n + n) * s->D * sizeof(float));
        float *nv = realloc(lk->v[g], (size_t)(lk->n + n) * s->D * sizeof(float));
        if (nk)
            lk->k[g] = nk;
        if (nv)
            lk->v[g] = nv;
        if (!nk || !nv) {
            problem(&w->c, "client %d: out of memory", w->idx);
            w->c.unprovoked++;
            goto out;
        }
        memcpy(lk->k[g] + (size_t)lk->n * s->D, kf + (size_t)g * per, per * sizeof(float));
        memcpy(lk->v[g] + (size_t)lk->n * s->D, vf + (size_t)g * per, per * sizeof(float));
    }
    lk->n += n;
    w->c.tokens += (uint64_t)n;
out:
    free(k);
    free(v);
    free(pos);
    free(kf);
    free(vf);
    free(q);
}

/* Exact attention of q over the given rows of head g of the layer, in double. */
static void ref_rows(const sess *s, const layer_kv *lk, int g, const float *q, const int64_t *rows,
                     int n, double *o, double *lse)
{
    double m = -INFINITY, sc[1024];
    double scale = 1.0 / sqrt((double)s->D);
    for (int i = 0; i < n; i++) {
        const float *kr = lk->k[g] + (size_t)rows[i] * s->D;
        double d = 0;
        for (int x = 0; x < s->D; x++)
            d += (double)q[x] * kr[x];
        sc[i] = d * scale;
        if (sc[i] > m)
            m = sc[i];
    }
    double z = 0;
    for (int x = 0; x < s->D; x++)
        o[x] = 0;
    for (int i = 0; i < n; i++) {
        double e = exp(sc[i] - m);
        z += e;
        const float *vr = lk->v[g] + (size_t)rows[i] * s->D;
        for (int x = 0; x < s->D; x++)
            o[x] += e * vr[x];
    }
    for (int x = 0; x < s->D; x++)
        o[x] /= z;
    *lse = m + log(z);
}

/* Attend on a layer holding tokens; checks every head's answer. */
static void do_attend(worker *w, sess *s, int layer)
{
    layer_kv *lk = &s->lay[layer];
    int k = rint_(w, 1, lk->n < 64 ? lk->n : 64);
    if (rnd(w) % 4 == 0)
        k = lk->n; /* everything: must equal full attention */
    size_t HD = (size_t)s->H * s->D;
    float *q = malloc(HD * sizeof *q), *o = malloc(HD * sizeof *o), lse[16], sc[16 * 600];
    int64_t *pos = malloc((size_t)s->H * k * sizeof *pos);
    int32_t cnt[16];
    if (!q || !o || !pos)
        goto out;
    for (size_t i = 0; i < HD; i++)
        q[i] = 0.5f * rnorm(w);
    ra_attend_req r = {.n_q_heads = s->H, .head_dim = s->D, .q = q, .top_k = k, .want_topk = 1};
    ra_attend_out ao = {.o = o, .lse = lse, .pos = pos, .scores = sc, .counts = cnt};
    ra_status st = ra_client_attend(w->cl, s->id, layer, &r, &ao);
    w->c.act[A_ATTEND]++;
    if (!expect(w, "attend", st, RA_OK))
        goto out;
    int rep = s->H / s->G;
    for (int h = 0; h < s->H; h++) {
        int g = h / rep, n = cnt[h];
        const int64_t *p = pos + (size_t)h * k;
        int ok = n >= 1 && n <= k;
        /* the exact index reads the true top-k; every index reads distinct stored rows */
        if (ok && s->kind == RA_CLIENT_INDEX_FLAT && n != k)
            ok = 0;
        for (int i = 0; ok && i < n; i++) {
            if (p[i] < 0 || p[i] >= lk->n)
                ok = 0;
            for (int j = 0; ok && j < i; j++)
                if (p[j] == p[i])
                    ok = 0;
        }
        if (!ok) {
            problem(&w->c, "client %d: session %llu layer %d head %d (%s index): %d positions "
                    "returned for top_k %d of %d tokens, or invalid ones",
                    w->idx, (unsigned long long)s->id, layer, h,
                    s->kind == RA_CLIENT_INDEX_FLAT ? "flat" : "approximate", n, k, lk->n);
            w->c.wrong++;
            continue;
        }
        double ro[64], rl;
        ref_rows(s, lk, g, q + (size_t)h * s->D, p, n, ro, &rl);
        double num = 0, den = 0;
        for (int x = 0; x < s->D; x++) {
            double d = o[(size_t)h * s->D + x] - ro[x];
            num += d * d;
            den += ro[x] * ro[x];
        }
        double e = sqrt(num) / fmax(sqrt(den), 1e-6), el = fabs(lse[h] - rl) / fmax(1.0, fabs(rl));
        if (e > w->c.max_err)
            w->c.max_err = e;
        if (el > w->c.max_err)
            w->c.max_err = el;
        int bad = e > 2e-3 || el > 2e-3;
        if (!bad && s->kind == RA_CLIENT_INDEX_FLAT && n < lk->n) {
            /* the true top-k: nothing left out may score above the k-th read */
            double kth = INFINITY, scale = 1.0 / sqrt((double)s->D);
            for (int i = 0; i < n; i++) {
                double d = 0;
                for (int x = 0; x < s->D; x++)
                    d += (double)q[(size_t)h * s->D + x] * lk->k[g][(size_t)p[i] * s->D + x];
                if (d * scale < kth)
                    kth = d * scale;
            }
            int missing = 0; /* rows scoring above the k-th read that were not read */
            for (int t = 0; t < lk->n; t++) {
                double d = 0;
                for (int x = 0; x < s->D; x++)
                    d += (double)q[(size_t)h * s->D + x] * lk->k[g][(size_t)t * s->D + x];
                if (d * scale <= kth + 1e-4)
                    continue;
                int read = 0;
                for (int i = 0; i < n && !read; i++)
                    read = p[i] == t;
                missing += !read;
            }
            bad = missing > 0;
        }
        if (bad) {
            problem(&w->c, "client %d: session %llu layer %d head %d: wrong answer (o rel err %.3g, "
                    "lse %.6f vs %.6f, %d of %d tokens read)",
                    w->idx, (unsigned long long)s->id, layer, h, e, lse[h], rl, n, lk->n);
            w->c.wrong++;
        } else {
            w->c.checked_o++;
        }
    }
out:
    free(q);
    free(o);
    free(pos);
}

/* A request made invalid on purpose; it must get exactly its error. */
static void do_provoke(worker *w, sess *s, int layer)
{
    w->c.act[A_PROVOKE]++;
    float q[16 * 72];
    for (int i = 0; i < 16 * 72; i++)
        q[i] = 0.1f;
    ra_attend_req r = {.n_q_heads = s->H, .head_dim = s->D, .q = q, .top_k = 4};
    float o[16 * 72], lse[16];
    ra_attend_out ao = {.o = o, .lse = lse};
    switch (rint_(w, 0, 4)) {
    case 0: /* wrong head_dim */
        r.head_dim = s->D + 8;
        expect(w, "attend with the wrong head_dim", ra_client_attend(w->cl, s->id, layer, &r, &ao),
               RA_ESHAPE);
        break;
    case 1: /* unknown session */
        expect(w, "attend on an unknown session",
               ra_client_attend(w->cl, s->id + 1000000, layer, &r, &ao), RA_ENOSESSION);
        break;
    case 2: /* layer out of range */
        expect(w, "attend on a layer out of range",
               ra_client_attend(w->cl, s->id, s->L, &r, &ao), RA_ENOLAYER);
        break;
    case 3: /* NaN in q */
        q[rint_(w, 0, s->H * s->D - 1)] = NAN;
        expect(w, "attend with NaN in q", ra_client_attend(w->cl, s->id, layer, &r, &ao),
               RA_ENONFINITE);
        break;
    default: /* NaN in K: nothing stored */
        do_tokens(w, s, layer, rint_(w, 1, 8), 1);
        w->c.act[A_APPEND]--;
        break;
    }
}

static int open_client(worker *w)
{
    ra_client_opts o;
    ra_client_opts_default(&o);
    o.timeout_ms = 30000;
    if (ra_client_open(&w->cl, w->endpoint, &o) != RA_OK) {
        problem(&w->c, "client %d: cannot open %s", w->idx, w->endpoint);
        w->c.unprovoked++;
        return -1;
    }
    /* a new client knows none of the sessions: it takes them over with their tokens */
    for (int i = 0; i < w->n_s; i++)
        local_ok(w, "session_adopt", ra_client_session_adopt(w->cl, w->s[i].id, &w->s[i].tok));
    return 0;
}

/* Closes the client with Attends in flight (their replies go nowhere), then a new one. */
static void do_kill(worker *w, sess *s, int layer)
{
    w->c.act[A_KILL]++;
    layer_kv *lk = &s->lay[layer];
    size_t HD = (size_t)s->H * s->D;
    float q[16 * 64];
    for (size_t i = 0; i < HD; i++)
        q[i] = rnorm(w);
    ra_attend_req r = {.n_q_heads = s->H, .head_dim = s->D, .q = q, .top_k = lk->n};
    int n = rint_(w, 1, 4);
    for (int i = 0; i < n; i++) {
        ra_ticket t;
        if (expect(w, "attend_send before a kill", ra_client_attend_send(w->cl, s->id, layer, &r, &t),
                   RA_OK))
            w->c.in_flight_abandoned++;
    }
    ra_client_close(w->cl);
    w->cl = NULL;
    open_client(w);
}

static void do_drop(worker *w, int i)
{
    w->c.act[A_DROP]++;
    expect(w, "drop", ra_client_session_drop(w->cl, w->s[i].id), RA_OK);
    sess_free(&w->s[i]);
    w->s[i] = w->s[--w->n_s];
    memset(&w->s[w->n_s], 0, sizeof w->s[w->n_s]);
}

static pthread_barrier_t g_warm_done, g_warm_measured;

static void drop_all(worker *w)
{
    while (w->cl && w->n_s > 0)
        do_drop(w, w->n_s - 1);
    ra_client_close(w->cl);
    w->cl = NULL;
}

static void *worker_main(void *arg)
{
    worker *w = arg;
    int warm = 1;
    if (open_client(w) != 0)
        w->warm_end = 0;
    for (;;) {
        if (warm && now_s() >= w->warm_end) {
            /* end of the warm-up: everything dropped, the daemon measured, then on */
            drop_all(w);
            pthread_barrier_wait(&g_warm_done);
            pthread_barrier_wait(&g_warm_measured);
            warm = 0;
            if (open_client(w) != 0)
                break;
        }
        if (now_s() >= w->deadline || !w->cl)
            break;
        int a = rint_(w, 0, 99);
        if (w->n_s == 0 || (a < 6 && w->n_s < MAX_SESS)) {
            w->c.act[A_CREATE]++;
            do_create(w);
            continue;
        }
        sess *s = &w->s[rint_(w, 0, w->n_s - 1)];
        int layer = rint_(w, 0, s->L - 1);
        layer_kv *lk = &s->lay[layer];
        if (lk->n == 0) { /* a layer starts with an Offload */
            do_tokens(w, s, layer, rint_(w, 16, 400), 0);
            continue;
        }
        if (a < 22) {
            if (lk->n < MAX_TOK)
                do_tokens(w, s, layer, rint_(w, 1, 32), 0);
        } else if (a < 80) {
            do_attend(w, s, layer);
        } else if (a < 88) {
            do_provoke(w, s, layer);
        } else if (a < 92) {
            do_drop(w, (int)(s - w->s));
        } else if (a < 95) {
            do_kill(w, s, layer);
        } else if (a < 97) {
            w->c.act[A_RECONNECT]++;
            ra_client_close(w->cl);
            w->cl = NULL;
            open_client(w);
        } else {
            w->c.act[A_STATS]++;
            ra_server_stats st;
            expect(w, "stats", ra_client_stats(w->cl, &st), RA_OK);
        }
    }
    if (warm) { /* never reached the warm-up's end (no client): keep the barriers whole */
        pthread_barrier_wait(&g_warm_done);
        pthread_barrier_wait(&g_warm_measured);
    }
    drop_all(w);
    return NULL;
}

/* ---- the daemon's side ------------------------------------------------------------------ */

/* A field of /proc/PID/status ("VmRSS:", "Threads:"), -1 when unreadable. */
static long proc_field(int pid, const char *field)
{
    char path[64], line[256];
    snprintf(path, sizeof path, "/proc/%d/status", pid);
    FILE *f = fopen(path, "r");
    if (!f)
        return -1;
    long v = -1;
    size_t fl = strlen(field);
    while (fgets(line, sizeof line, f))
        if (!strncmp(line, field, fl)) {
            v = strtol(line + fl, NULL, 10);
            break;
        }
    fclose(f);
    return v;
}

static long rss_kb(int pid)
{
    return proc_field(pid, "VmRSS:");
}

/* Stats after a second of idleness (the daemon trims its heap then and on Stats). */
static ra_status settled_stats(ra_client *c, ra_server_stats *st)
{
    usleep(1200 * 1000);
    return ra_client_stats(c, st);
}

/* Waits (60 s at most) until every session is gone and mem_used is back at `base`. */
static ra_status settle(ra_client *c, uint64_t base, ra_server_stats *st)
{
    ra_status r;
    double t0 = now_s();
    do
        r = settled_stats(c, st);
    while (r == RA_OK && (st->mem_used != base || st->sessions) && now_s() - t0 < 60);
    return r;
}

static void usage(FILE *f)
{
    fprintf(f, "usage: ratd-bench-soak --minutes M --clients C [--seed S] [--workers N] [--ratd BIN]\n"
               "                       [--index flat|graph|hnsw|mix] [--rss-slack-mb MB] [--json]\n"
               "C client threads against a private ratd for M minutes (random sessions, offloads,\n"
               "appends, attends checked against exact attention, drops, provoked errors, clients\n"
               "closed with requests in flight, reconnects); exit 0 when nothing went wrong and\n"
               "the daemon gave all memory back (mem_used to its start; VmRSS at the end within\n"
               "5 %% or --rss-slack-mb, default 8, of its value after the warm-up).\n");
}

int main(int argc, char **argv)
{
    double minutes = 0;
    int clients = 0, workers = 2, json = 0, o;
    uint64_t seed = 1;
    long slack_mb = 8;
    char bin[4096] = "";
    static const struct option opts[] = {
        {"minutes", required_argument, 0, 'm'}, {"clients", required_argument, 0, 'c'},
        {"seed", required_argument, 0, 's'},    {"workers", required_argument, 0, 'w'},
        {"ratd", required_argument, 0, 'r'},    {"rss-slack-mb", required_argument, 0, 'k'},
        {"json", no_argument, 0, 'j'},          {"help", no_argument, 0, 'h'},
        {"index", required_argument, 0, 'i'},
        {0, 0, 0, 0}};
    while ((o = getopt_long(argc, argv, "", opts, NULL)) != -1) {
        char *end = NULL;
        switch (o) {
        case 'm':
            minutes = strtod(optarg, &end);
            if (*end || !(minutes > 0 && minutes <= 10080)) {
                fprintf(stderr, "ratd-bench-soak: --minutes must be in (0, 10080]\n");
                return 2;
            }
            break;
        case 'c':
            clients = (int)strtol(optarg, &end, 10);
            if (*end || clients < 1 || clients > 64) {
                fprintf(stderr, "ratd-bench-soak: --clients must be in 1..64\n");
                return 2;
            }
            break;
        case 's':
            seed = strtoull(optarg, &end, 10);
            if (*end) {
                fprintf(stderr, "ratd-bench-soak: --seed must be an integer\n");
                return 2;
            }
            break;
        case 'w':
            workers = (int)strtol(optarg, &end, 10);
            if (*end || workers < 0 || workers > 1024) {
                fprintf(stderr, "ratd-bench-soak: --workers must be in 0..1024\n");
                return 2;
            }
            break;
        case 'r':
            snprintf(bin, sizeof bin, "%s", optarg);
            break;
        case 'k':
            slack_mb = strtol(optarg, &end, 10);
            if (*end || slack_mb < 0 || slack_mb > 65536) {
                fprintf(stderr, "ratd-bench-soak: --rss-slack-mb must be in 0..65536\n");
                return 2;
            }
            break;
        case 'j':
            json = 1;
            break;
        case 'i':
            if (!strcmp(optarg, "flat"))
                g_index = RA_CLIENT_INDEX_FLAT;
            else if (!strcmp(optarg, "graph"))
                g_index = RA_CLIENT_INDEX_GRAPH;
            else if (!strcmp(optarg, "hnsw"))
                g_index = RA_CLIENT_INDEX_HNSW;
            else if (strcmp(optarg, "mix") != 0) {
                fprintf(stderr, "ratd-bench-soak: --index must be flat, graph, hnsw or mix\n");
                return 2;
            }
            break;
        case 'h':
            usage(stdout);
            return 0;
        default:
            usage(stderr);
            return 2;
        }
    }
    if (minutes <= 0 || clients <= 0) {
        usage(stderr);
        return 2;
    }
    if (!bin[0] && dec_daemon_default_bin(bin, sizeof bin) != 0) {
        fprintf(stderr, "ratd-bench-soak: no ratd beside this binary; pass --ratd BIN\n");
        return 2;
    }
    dec_daemon dm;
    char err[512];
    if (dec_daemon_start(&dm, bin, workers, err, sizeof err) != RA_OK) {
        fprintf(stderr, "ratd-bench-soak: %s\n", err);
        return 2;
    }
    ra_client *ctl = NULL;
    ra_client_opts co;
    ra_client_opts_default(&co);
    co.timeout_ms = 30000;
    ra_server_stats s0, s1;
    if (ra_client_open(&ctl, dm.endpoint, &co) != RA_OK || settled_stats(ctl, &s0) != RA_OK) {
        fprintf(stderr, "ratd-bench-soak: no Stats from the daemon: %s\n", ra_client_errmsg(ctl));
        dec_daemon_stop(&dm);
        return 2;
    }
    long rss0 = rss_kb(dm.pid);
    worker *w = calloc((size_t)clients, sizeof *w);
    pthread_t *th = calloc((size_t)clients, sizeof *th);
    if (!w || !th)
        return 2;
    double t0 = now_s();
    /* a warm-up of a tenth of the run (10..60 s) makes the daemon's one-time memory
     * (thread heaps, pooled request buffers, transport state); growth after it is a leak */
    double warm = minutes * 6.0 < 10 ? 10 : minutes * 6.0 > 60 ? 60 : minutes * 6.0;
    if (warm > minutes * 30.0)
        warm = minutes * 30.0;
    pthread_barrier_init(&g_warm_done, NULL, (unsigned)clients + 1);
    pthread_barrier_init(&g_warm_measured, NULL, (unsigned)clients + 1);
    for (int i = 0; i < clients; i++) {
        w[i].idx = i;
        w[i].rng = seed * 1000003u + (uint64_t)i * 7919u + 1;
        w[i].endpoint = dm.endpoint;
        w[i].warm_end = t0 + warm;
        w[i].deadline = t0 + minutes * 60.0;
        pthread_create(&th[i], NULL, worker_main, &w[i]);
    }
    pthread_barrier_wait(&g_warm_done);
    ra_server_stats sw;
    ra_status wst = settle(ctl, s0.mem_used, &sw);
    long rss_warm = rss_kb(dm.pid), thr_warm = proc_field(dm.pid, "Threads:");
    long anon_warm = proc_field(dm.pid, "RssAnon:");
    int warm_ok = wst == RA_OK && sw.mem_used == s0.mem_used && sw.sessions == 0;
    pthread_barrier_wait(&g_warm_measured);
    long rss_peak = rss_warm > rss0 ? rss_warm : rss0;
    /* a thread is joined once: pthread_tryjoin_np reaps a finished one, and joining it
     * again (as this loop once did) is undefined (it crashed the soak at its end) */
    char *joined = calloc((size_t)clients, 1);
    for (;;) { /* the main thread samples the daemon's RSS while the clients run */
        int alive = 0;
        for (int i = 0; i < clients; i++) {
            if (joined && joined[i])
                continue;
            if (joined && pthread_tryjoin_np(th[i], NULL) == 0)
                joined[i] = 1;
            else
                alive++;
        }
        long r = rss_kb(dm.pid);
        if (r > rss_peak)
            rss_peak = r;
        if (!alive || !joined || now_s() > t0 + minutes * 60.0 + 120)
            break;
        usleep(200 * 1000);
    }
    for (int i = 0; i < clients; i++)
        if (!joined || !joined[i])
            pthread_join(th[i], NULL);
    free(joined);
    double secs = now_s() - t0;
    counts *T = &g_total;
    pthread_mutex_lock(&g_mu);
    for (int i = 0; i < clients; i++) {
        counts *c = &w[i].c;
        T->requests += c->requests;
        T->provoked += c->provoked;
        T->unprovoked += c->unprovoked;
        T->wrong += c->wrong;
        T->in_flight_abandoned += c->in_flight_abandoned;
        T->checked_o += c->checked_o;
        T->tokens += c->tokens;
        if (c->max_err > T->max_err)
            T->max_err = c->max_err;
        for (int a = 0; a < A_N; a++)
            T->act[a] += c->act[a];
        if (!T->first_problem[0] && c->first_problem[0])
            snprintf(T->first_problem, sizeof T->first_problem, "%s", c->first_problem);
    }
    pthread_mutex_unlock(&g_mu);
    /* every session is dropped; the reaper may still be freeing: wait for mem_used */
    ra_status sst = settle(ctl, s0.mem_used, &s1);
    long rss1 = rss_kb(dm.pid), thr1 = proc_field(dm.pid, "Threads:");
    long anon1 = proc_field(dm.pid, "RssAnon:");
    uint64_t daemon_errors = sst == RA_OK ? s1.errors - s0.errors : 0;
    ra_client_close(ctl);
    int exit_st = dec_daemon_stop(&dm);
    long slack_kb = rss_warm / 20 > slack_mb * 1024 ? rss_warm / 20 : slack_mb * 1024;
    int mem_ok = warm_ok && sst == RA_OK && s1.mem_used == s0.mem_used && s1.sessions == 0;
    int rss_ok = rss_warm > 0 && rss1 > 0 && rss1 - rss_warm <= slack_kb;
    /* the daemon may count more: an abandoned Attend of a closed client can reach it after
     * the session was dropped by that client's successor (RA_ENOSESSION to nobody) */
    uint64_t seen = T->provoked + T->unprovoked;
    int err_ok = daemon_errors >= seen && daemon_errors - seen <= T->in_flight_abandoned;
    int pass = mem_ok && rss_ok && err_ok && T->unprovoked == 0 && T->wrong == 0 && exit_st == 0 &&
               T->act[A_ATTEND] > 0;
    if (json) {
        printf("{\"verdict\":\"%s\",\"minutes\":%.3f,\"clients\":%d,\"seed\":%llu,\"workers\":%d,"
               "\"seconds\":%.1f,\"requests\":%llu,\"provoked_errors\":%llu,"
               "\"unprovoked_errors\":%llu,\"wrong_answers\":%llu,\"heads_checked\":%llu,"
               "\"max_rel_err\":%.3g,\"tokens_stored\":%llu,\"in_flight_abandoned\":%llu,"
               "\"daemon_errors\":%llu,\"mem_used_start\":%llu,\"mem_used_end\":%llu,"
               "\"rss_start_kb\":%ld,\"rss_warm_kb\":%ld,\"rss_peak_kb\":%ld,\"rss_end_kb\":%ld,"
               "\"rss_slack_kb\":%ld,\"warmup_s\":%.1f,\"daemon_exit\":%d,\"threads_warm\":%ld,"
               "\"threads_end\":%ld,\"rss_anon_warm_kb\":%ld,\"rss_anon_end_kb\":%ld",
               pass ? "pass" : "fail", minutes, clients, (unsigned long long)seed, workers, secs,
               (unsigned long long)T->requests, (unsigned long long)T->provoked,
               (unsigned long long)T->unprovoked, (unsigned long long)T->wrong,
               (unsigned long long)T->checked_o, T->max_err, (unsigned long long)T->tokens,
               (unsigned long long)T->in_flight_abandoned, (unsigned long long)daemon_errors,
               (unsigned long long)s0.mem_used, (unsigned long long)s1.mem_used, rss0, rss_warm,
               rss_peak, rss1, slack_kb, warm, exit_st, thr_warm, thr1, anon_warm, anon1);
        for (int a = 0; a < A_N; a++)
            printf(",\"%s\":%llu", g_action[a], (unsigned long long)T->act[a]);
        printf("}\n");
    } else {
        printf("ratd-bench-soak: %d clients, %.1f s, seed %llu, %d workers\n", clients, secs,
               (unsigned long long)seed, workers);
        printf("  requests %llu:", (unsigned long long)T->requests);
        for (int a = 0; a < A_N; a++)
            printf(" %s %llu", g_action[a], (unsigned long long)T->act[a]);
        printf("\n  tokens stored %llu, heads checked against exact attention %llu (max rel err "
               "%.2g), attends abandoned in flight %llu\n",
               (unsigned long long)T->tokens, (unsigned long long)T->checked_o, T->max_err,
               (unsigned long long)T->in_flight_abandoned);
        printf("  errors: provoked %llu, unprovoked %llu, wrong answers %llu; the daemon counted "
               "%llu %s\n",
               (unsigned long long)T->provoked, (unsigned long long)T->unprovoked,
               (unsigned long long)T->wrong, (unsigned long long)daemon_errors,
               err_ok ? (daemon_errors == seen ? "(the same)"
                                               : "(the rest: abandoned attends)")
                      : "(MISMATCH)");
        printf("  daemon memory: mem_used %llu -> %llu bytes %s (also after the %.0f s warm-up); "
               "VmRSS %ld kB idle at start, %ld kB after the warm-up, %ld kB peak, %ld kB at the "
               "end (allowed: warm-up +%ld kB) %s; exit %d\n",
               (unsigned long long)s0.mem_used, (unsigned long long)s1.mem_used,
               mem_ok ? "ok" : "NOT BACK", warm, rss0, rss_warm, rss_peak, rss1, slack_kb,
               rss_ok ? "ok" : "TOO HIGH", exit_st);
        printf("  daemon threads %ld after the warm-up, %ld at the end; RssAnon %ld kB -> %ld kB\n",
               thr_warm, thr1, anon_warm, anon1);
        if (T->first_problem[0])
            printf("  first problem: %s\n", T->first_problem);
        printf("  verdict: %s\n", pass ? "pass" : "FAIL");
    }
    for (int i = 0; i < clients; i++)
        for (int j = 0; j < MAX_SESS; j++)
            sess_free(&w[i].s[j]);
    free(w);
    free(th);
    return pass ? 0 : 1;
}
