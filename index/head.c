/* ra_head (ra_index.h): one (layer, KV head)'s K/V store plus its search index, and the
 * locking that lets searches, appends and a background build overlap. A writer-
 * preferring rwlock guards the store and the index: searches share it, appends and the
 * swap-in of a finished build take it exclusively. The build itself runs without the
 * lock on a pinned view of the rows present when it started (ra_kv_pin), so decode-time
 * appends and searches go on meanwhile; searches are answered by an exact scan (or the
 * previous index on a rebuild) until the new index is swapped in, and rows appended
 * during the build are inserted into it just before the swap. */
#define _GNU_SOURCE
#include <dirent.h>
#include <math.h>
#include <omp.h>
#include <pthread.h>
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <unistd.h>

#include "ra_backend.h"
#include "ra_env.h"
#include "ra_index.h"
#include "ra_kernels.h"
#include "ra_log.h"
#include "ra_thread.h"
#include "ra_topk.h"

#define RA_HEAD_MAX_K 65536
#define RA_HEAD_MAX_TRAIN ((size_t)1 << 24)

struct ra_head {
    pthread_rwlock_t lock;
    ra_kv *kv;
    ra_mem *acct;
    ra_index_opts opts;
    const ra_backend_ops *ops;
    void *state;          /* the index in use, NULL while none is built */
    size_t index_charged; /* bytes of `state` charged on acct */
    int ready;            /* atomic: state is complete and in use */
    int cancel;           /* atomic, sticky: builds end early (ra_head_cancel); opts.cancel */

    pthread_mutex_t bmu; /* guards the fields below */
    pthread_cond_t bcv;
    int building;
    int thr_live; /* a build thread exists that nobody joined yet */
    pthread_t thr;
    ra_status last_build;

    /* the running build's job (owned by the build while building) */
    ra_kv *view;
    size_t n_build;
    float *train_q;
    size_t nq;
    int32_t *lists; /* NULL, or [nq][lists_k] precomputed exact top-K row ids */
    int lists_k;
    char label[64]; /* for log lines: "session S layer L kv-head G" or "" */
    ra_graph_adj graph; /* graph.adj != NULL: install this prebuilt graph (a copy) */

    /* recall probes of default-effort searches (below): the attend side writes the probe
     * while probe_busy is 0 and then sets it; the probe thread reads it and clears it */
    uint32_t n_default; /* atomic: default-effort group searches so far */
    int probe_busy;     /* atomic */
    float *probe_q;     /* [dim] */
    float *probe_sc;    /* [PROBE_KMAX] exact scores of the ids the search returned */
    int probe_k;
    const void *probe_state; /* probe thread only: the index the sums below belong to */
    double probe_sum;        /* probe thread only: recall sum and count at this factor */
    int probe_cnt;
};

/* ---- the default effort from decode queries: recall probes ----
 * A build calibrates the default effort on held-out prefill queries (graph_search.c),
 * but decode queries are harder for a walk: their most local keys sit in the decoder's
 * window and not here, so their top-k are the distant keys a walk finds worst. On the
 * 16K trace of bench/models/kjv-byte-llama the calibrated default gave decode recall@100
 * 0.93 where the held-out queries had said 0.96. So every PROBE_EVERY-th default-effort
 * group search of a head hands one of its queries (in turn) and the exact scores of what
 * it returned to one low-priority probe thread, which finds the k-th best exact score
 * by a scan (in chunks, taking the head's read lock per chunk, so that an Append never
 * waits long) and counts the returned keys at or above it: that query's recall@k. At
 * most one probe per head is in flight and probes are skipped while the thread is busy,
 * so the cost is bounded by one core at nice 19. After PROBE_MIN probes at the current
 * factor, a mean below PROBE_TARGET raises the head's factor of the default candidate
 * list (x1.25, x1.5 when more than 0.05 below); after 2 PROBE_MIN a mean above
 * PROBE_TARGET + PROBE_SLACK lowers it (x0.9, x0.75 above PROBE_HIGH): the search gets
 * cheaper where decode queries are easier than the formula assumed (pscan's default gave
 * 0.9997 on the calibrated 128K heads, where x0.9 a step took ~100 probes a head to
 * halve its candidates). RA_HEAD_PROBE_EVERY=N sets the period (0: off). */
#define PROBE_EVERY 8
#define PROBE_KMAX 1024
#define PROBE_MIN 8
#define PROBE_TARGET 0.96
#define PROBE_SLACK 0.025
#define PROBE_HIGH 0.995
#define PROBE_CHUNK 4096 /* keys a probe scores between looks at g_serving (~0.1 ms) */
#define PROBE_QCAP 256

static struct {
    pthread_mutex_t mu;
    pthread_cond_t cv, done;
    ra_head *q[PROBE_QCAP];
    int n;
    ra_head *cur; /* the head being probed */
    int state;    /* 0 not started, 1 running, -1 could not start */
} g_probe = {.mu = PTHREAD_MUTEX_INITIALIZER,
             .cv = PTHREAD_COND_INITIALIZER,
             .done = PTHREAD_COND_INITIALIZER};

static void probe_forget(ra_head *h);

static uint64_t g_probes, g_probe_raises, g_probe_lowers; /* atomics, for tests and logs */

void ra_index_probe_counts_get(uint64_t *probes, uint64_t *raises, uint64_t *lowers)
{
    *probes = __atomic_load_n(&g_probes, __ATOMIC_RELAXED);
    *raises = __atomic_load_n(&g_probe_raises, __ATOMIC_RELAXED);
    *lowers = __atomic_load_n(&g_probe_lowers, __ATOMIC_RELAXED);
}

static int probe_every(void)
{
    static ra_env_once env;
    int e = ra_env_int(&env, "RA_HEAD_PROBE_EVERY", PROBE_EVERY);
    return e < 0 ? 0 : e;
}

/* process-wide build counters (ra_index_build_counts_get), atomics */
static uint64_t g_builds_queued, g_builds_running, g_builds_done, g_builds_failed,
    g_builds_cancelled, g_build_us;

void ra_index_build_counts_get(ra_index_build_counts *o)
{
    o->queued = __atomic_load_n(&g_builds_queued, __ATOMIC_RELAXED);
    o->running = __atomic_load_n(&g_builds_running, __ATOMIC_RELAXED);
    o->done = __atomic_load_n(&g_builds_done, __ATOMIC_RELAXED);
    o->failed = __atomic_load_n(&g_builds_failed, __ATOMIC_RELAXED);
    o->cancelled = __atomic_load_n(&g_builds_cancelled, __ATOMIC_RELAXED);
    o->seconds = (double)__atomic_load_n(&g_build_us, __ATOMIC_RELAXED) * 1e-6;
}

void ra_head_set_label(ra_head *h, const char *label)
{
    if (h)
        snprintf(h->label, sizeof h->label, "%s", label ? label : "");
}

const char *ra_index_kind_name(ra_index_kind k)
{
    switch (k) {
    case RA_INDEX_GRAPH:
        return "graph";
    case RA_INDEX_FLAT:
        return "flat";
    case RA_INDEX_IVF:
        return "ivf";
    case RA_INDEX_HNSW:
        return "hnsw";
    case RA_INDEX_FAISS_FLAT:
        return "faiss-flat";
    case RA_INDEX_PSCAN:
        return "pscan";
    }
    return "?";
}

/* Zero fields from the option table (index/opts.c); the caller checked the rest. */
static void opts_fill(ra_index_opts *o, const ra_index_opts *in)
{
    if (in)
        *o = *in;
    else
        memset(o, 0, sizeof *o);
    ra_index_opts_fill(o);
}

static const ra_backend_ops *kind_ops(ra_index_kind k)
{
    switch (k) {
    case RA_INDEX_FLAT:
        return &ra_backend_scan;
    case RA_INDEX_FAISS_FLAT:
        return &ra_backend_flat;
    case RA_INDEX_IVF:
        return &ra_backend_ivf;
    case RA_INDEX_HNSW:
        return &ra_backend_hnsw;
    case RA_INDEX_PSCAN:
        return &ra_backend_pscan;
    case RA_INDEX_GRAPH:
#ifdef RA_HAVE_GRAPH
        return &ra_backend_graph;
#else
    {
        static int said;
        if (!__atomic_exchange_n(&said, 1, __ATOMIC_RELAXED))
            RA_WARN("index: this build has no graph backend (index/graph.c missing); graph "
                    "heads use the exact scan");
        return &ra_backend_scan;
    }
#endif
    }
    return NULL;
}

/* Charges (or refunds) the index's size on the account. Growth through appends is
 * charged unconditionally: the rows were accepted, the index must follow them. */
static void charge_index(ra_head *h, size_t now)
{
    if (now > h->index_charged)
        ra_mem_charge(h->acct, now - h->index_charged);
    else
        ra_mem_release(h->acct, h->index_charged - now);
    h->index_charged = now;
}

ra_status ra_head_create(ra_head **out, int dim, ra_dtype dtype, const ra_index_opts *opts,
                         ra_mem *acct)
{
    if (!out) {
        RA_ERROR("head: NULL out pointer");
        return RA_EINVAL;
    }
    char oerr[192];
    if (opts && ra_index_opts_check(opts, oerr, sizeof oerr) != RA_OK) {
        RA_ERROR("head: %s", oerr);
        return RA_EINVAL;
    }
    ra_head *h = calloc(1, sizeof *h);
    if (!h)
        return RA_ENOMEM;
    ra_status st = ra_kv_create(&h->kv, dim, dtype, acct);
    if (st != RA_OK) {
        free(h);
        return st;
    }
    opts_fill(&h->opts, opts);
    h->opts.cancel = &h->cancel;
    h->ops = kind_ops(h->opts.kind);
    h->acct = acct;
    h->probe_q = malloc((size_t)dim * sizeof *h->probe_q);
    h->probe_sc = malloc(PROBE_KMAX * sizeof *h->probe_sc);
    if (!h->probe_q || !h->probe_sc) {
        free(h->probe_q);
        free(h->probe_sc);
        ra_kv_destroy(h->kv);
        free(h);
        return RA_ENOMEM;
    }
    static ra_mem no_acct; /* so charge_index needs no NULL test; never limited */
    if (!h->acct)
        h->acct = &no_acct;
    pthread_rwlockattr_t ra;
    pthread_rwlockattr_init(&ra);
    /* Appends must not starve behind a stream of searches. */
    pthread_rwlockattr_setkind_np(&ra, PTHREAD_RWLOCK_PREFER_WRITER_NONRECURSIVE_NP);
    pthread_rwlock_init(&h->lock, &ra);
    pthread_rwlockattr_destroy(&ra);
    pthread_mutex_init(&h->bmu, NULL);
    pthread_cond_init(&h->bcv, NULL);
    *out = h;
    return RA_OK;
}

void ra_head_wait(ra_head *h)
{
    if (!h)
        return;
    pthread_mutex_lock(&h->bmu);
    while (h->building)
        pthread_cond_wait(&h->bcv, &h->bmu);
    int join = h->thr_live;
    pthread_t t = h->thr;
    h->thr_live = 0;
    pthread_mutex_unlock(&h->bmu);
    if (join)
        pthread_join(t, NULL);
}

void ra_head_destroy(ra_head *h)
{
    if (!h)
        return;
    ra_head_cancel(h);
    ra_head_wait(h);
    probe_forget(h);
    if (h->state)
        h->ops->destroy(h->state);
    charge_index(h, 0);
    ra_kv_destroy(h->kv);
    pthread_rwlock_destroy(&h->lock);
    pthread_mutex_destroy(&h->bmu);
    pthread_cond_destroy(&h->bcv);
    free(h->probe_q);
    free(h->probe_sc);
    free(h);
}

ra_status ra_head_append(ra_head *h, const void *k, const void *v, const int64_t *pos, size_t n)
{
    if (!h)
        return RA_EINVAL;
    pthread_rwlock_wrlock(&h->lock);
    size_t first = ra_kv_count(h->kv);
    ra_status st = ra_kv_append(h->kv, k, v, pos, n);
    if (st == RA_OK && n && h->state) {
        ra_status ast = h->ops->add(h->state, h->kv, first, n);
        if (ast != RA_OK) {
            /* The rows are stored; an index missing them would silently lose them, so
             * drop it and answer exactly until the next build. */
            RA_ERROR("head: %s index insert of %zu rows failed (%s); falling back to exact "
                     "scan until the next build",
                     h->ops->name, n, ra_strerror(ast));
            h->ops->destroy(h->state);
            h->state = NULL;
            charge_index(h, 0);
            __atomic_store_n(&h->ready, 0, __ATOMIC_RELEASE);
        } else {
            charge_index(h, h->ops->bytes(h->state));
        }
    }
    pthread_rwlock_unlock(&h->lock);
    return st;
}

/* At most this many index builds run at once in the process. Each build already uses
 * every core (FAISS/OpenMP, the graph's thread pool), so more would only oversubscribe
 * the CPU; and a graph build holds temporary lists (K 100, window 32: 4 bytes x 100
 * x 65 per training query, ~210 MB at 8192 queries) that no memory limit charges:
 * a model's heads all offloaded at once must not hold them all together. Waiting
 * builds leave their heads on exact scans, as a running build does. */
#define RA_MAX_BUILDS 2
/* Installs of prebuilt graphs (one pass over the keys: codes, routing, calibration) have
 * slots of their own, so that they never queue behind CPU builds; bounded too, because
 * each holds a copy of its adjacency and the graph it fills before the account sees it. */
#define RA_MAX_INSTALLS 4

static pthread_mutex_t g_gate_mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t g_gate_cv = PTHREAD_COND_INITIALIZER;
static int g_gate_busy[2]; /* [0] builds, [1] installs */

static int build_cancelled(ra_head *h)
{
    return __atomic_load_n(&h->cancel, __ATOMIC_RELAXED) != 0;
}

/* 0 when the build was cancelled while it waited (it holds no place then). */
static int build_gate_enter(ra_head *h, int install)
{
    int max = install ? RA_MAX_INSTALLS : RA_MAX_BUILDS;
    pthread_mutex_lock(&g_gate_mu);
    while (g_gate_busy[install] >= max && !build_cancelled(h))
        pthread_cond_wait(&g_gate_cv, &g_gate_mu);
    int in = !build_cancelled(h);
    g_gate_busy[install] += in;
    pthread_mutex_unlock(&g_gate_mu);
    return in;
}

static void build_gate_leave(int install)
{
    pthread_mutex_lock(&g_gate_mu);
    g_gate_busy[install]--;
    pthread_cond_broadcast(&g_gate_cv); /* both kinds wait on the one condition */
    pthread_mutex_unlock(&g_gate_mu);
}

void ra_head_cancel(ra_head *h)
{
    if (!h)
        return;
    __atomic_store_n(&h->cancel, 1, __ATOMIC_RELAXED);
    pthread_mutex_lock(&g_gate_mu); /* a build waiting for its turn re-checks the flag */
    pthread_cond_broadcast(&g_gate_cv);
    pthread_mutex_unlock(&g_gate_mu);
}

/* SCHED_IDLE (else SCHED_BATCH) at nice 19 for thread `tid` (0: the caller). An
 * unprivileged thread can lower its priority but never raise it back, so only threads
 * that exist to build call this: background build threads, the probe thread, and
 * (ra_index_build_priority_setup) library pools.
 * Why SCHED_IDLE: Linux's EEVDF scheduler may let a running task finish its slice before
 * a woken one (RUN_TO_PARITY) whatever their nice values, while an idle-policy task gives
 * way to a woken normal one at once; a worker woken for an Attend must not wait behind a
 * build or a probe. On the GPU host the two policies measured within the run-to-run
 * spread (bench/README.md, "Tenth session"). RA_LOW_SCHED=batch keeps the old policy (a
 * study knob). */
static int lower_priority(pid_t tid)
{
    if (!tid)
        tid = gettid();
    struct sched_param sp = {0};
    const char *env = getenv("RA_LOW_SCHED");
    int batch = env && strcmp(env, "batch") == 0;
    int a = batch ? -1 : sched_setscheduler(tid, SCHED_IDLE, &sp);
    if (a != 0)
        a = sched_setscheduler(tid, SCHED_BATCH, &sp);
    int b = setpriority(PRIO_PROCESS, (id_t)tid, 19);
    return a == 0 && b == 0;
}

/* Attend calls running now (atomic). The probe thread waits while there is one: under
 * EEVDF even an idle-policy thread can be picked before a woken worker whose lag is
 * negative, and then runs on for its slice; on the dev box a probe chunk held a woken
 * worker off its core for 1.3 ms (bench/README.md, "Tenth session"). */
static int g_serving;

/* One probe of h (the probe thread; h stays alive while g_probe.cur == h). */
static void probe_run(ra_head *h)
{
    static float sc[PROBE_CHUNK], top[PROBE_KMAX]; /* the thread's own: there is one */
    static int32_t top_id[PROBE_KMAX];
    int k = h->probe_k, nt = 0, dim = ra_kv_dim(h->kv);
    size_t done = 0;
    for (;;) { /* the k best exact scores (ra_topk: top[0] is the k-th once nt == k) */
        for (int w = 0; __atomic_load_n(&g_serving, __ATOMIC_RELAXED) > 0 && w < 20000; w++)
            usleep(50); /* decode first (at most ~1 s: a daemon never idle still probes) */
        pthread_rwlock_rdlock(&h->lock);
        size_t cnt = ra_kv_count(h->kv), m = cnt - done < PROBE_CHUNK ? cnt - done : PROBE_CHUNK;
        if (done < cnt)
            ra_kern_dot_range(h->probe_q, ra_kv_keys(h->kv), ra_kv_dtype(h->kv), dim, done, m, sc);
        pthread_rwlock_unlock(&h->lock);
        if (done >= cnt)
            break;
        for (size_t i = 0; i < m; i++)
            ra_topk_push(top, top_id, &nt, k, sc[i], (int32_t)(done + i));
        done += m;
    }
    if (nt < k)
        return;
    /* the returned keys at or above the k-th best (their scores are exact dots too; the
     * slack covers a different summation order) */
    float kth = top[0], tol = 1e-5f * (fabsf(kth) + 1.f);
    int hits = 0;
    for (int i = 0; i < k; i++)
        hits += h->probe_sc[i] >= kth - tol;
    double r = (double)hits / k;
    __atomic_add_fetch(&g_probes, 1, __ATOMIC_RELAXED);
    pthread_rwlock_rdlock(&h->lock);
    if (h->state && __atomic_load_n(&h->ready, __ATOMIC_ACQUIRE) && h->ops->effort_mult) {
        if (h->probe_state != h->state) { /* a new index: its own calibration, new sums */
            h->probe_state = h->state;
            h->probe_sum = 0;
            h->probe_cnt = 0;
        }
        h->probe_sum += r;
        h->probe_cnt++;
        double mean = h->probe_sum / h->probe_cnt;
        float f = h->ops->effort_mult(h->state, 0.f), nf = f;
        if (h->probe_cnt >= PROBE_MIN && mean < PROBE_TARGET)
            nf = f * (mean < PROBE_TARGET - 0.05 ? 1.5f : 1.25f);
        else if (h->probe_cnt >= 2 * PROBE_MIN && mean > PROBE_TARGET + PROBE_SLACK)
            nf = f * (mean > PROBE_HIGH ? 0.75f : 0.9f);
        if (nf != f) {
            float got = h->ops->effort_mult(h->state, nf);
            if (got != f) {
                RA_DEBUG("head %s: decode recall@%d %.3f over %d probes: default effort x%.2f "
                         "-> x%.2f",
                         h->label, k, mean, h->probe_cnt, (double)f, (double)got);
                __atomic_add_fetch(got > f ? &g_probe_raises : &g_probe_lowers, 1,
                                   __ATOMIC_RELAXED);
            }
            h->probe_sum = 0;
            h->probe_cnt = 0;
        }
    }
    pthread_rwlock_unlock(&h->lock);
}

static void *probe_main(void *arg)
{
    (void)arg;
    lower_priority(0);
    pthread_mutex_lock(&g_probe.mu);
    for (;;) {
        while (g_probe.n == 0)
            pthread_cond_wait(&g_probe.cv, &g_probe.mu);
        ra_head *h = g_probe.q[0];
        memmove(g_probe.q, g_probe.q + 1, (size_t)(--g_probe.n) * sizeof *g_probe.q);
        g_probe.cur = h;
        pthread_mutex_unlock(&g_probe.mu);
        probe_run(h);
        __atomic_store_n(&h->probe_busy, 0, __ATOMIC_RELEASE);
        pthread_mutex_lock(&g_probe.mu);
        g_probe.cur = NULL;
        pthread_cond_broadcast(&g_probe.done);
    }
    return NULL;
}

float ra_head_effort_mult(ra_head *h, float mult)
{
    if (!h)
        return 0.f;
    float f = 0.f;
    pthread_rwlock_rdlock(&h->lock);
    if (h->state && __atomic_load_n(&h->ready, __ATOMIC_ACQUIRE) && h->ops->effort_mult)
        f = h->ops->effort_mult(h->state, mult);
    pthread_rwlock_unlock(&h->lock);
    return f;
}

/* Queues h's probe (probe_busy already set); drops it when the queue is full. */
static void probe_submit(ra_head *h)
{
    int ok = 0;
    pthread_mutex_lock(&g_probe.mu);
    if (g_probe.state == 0) {
        pthread_t t;
        /* not on the CPU of a pinned worker that submits first */
        g_probe.state = ra_thread_create_wide(&t, 1, probe_main, NULL) == 0 ? 1 : -1;
    }
    if (g_probe.state == 1 && g_probe.n < PROBE_QCAP) {
        g_probe.q[g_probe.n++] = h;
        pthread_cond_signal(&g_probe.cv);
        ok = 1;
    }
    pthread_mutex_unlock(&g_probe.mu);
    if (!ok)
        __atomic_store_n(&h->probe_busy, 0, __ATOMIC_RELEASE);
}

/* Before h goes: out of the queue, and not being probed. */
static void probe_forget(ra_head *h)
{
    pthread_mutex_lock(&g_probe.mu);
    for (int i = 0; i < g_probe.n; i++)
        if (g_probe.q[i] == h) {
            memmove(g_probe.q + i, g_probe.q + i + 1,
                    (size_t)(g_probe.n - i - 1) * sizeof *g_probe.q);
            g_probe.n--;
            i--;
        }
    while (g_probe.cur == h)
        pthread_cond_wait(&g_probe.done, &g_probe.mu);
    pthread_mutex_unlock(&g_probe.mu);
}

int ra_index_build_priority_setup(void)
{
    DIR *d = opendir("/proc/self/task");
    if (!d)
        return 0;
    pid_t self = gettid();
    int n = 0;
    struct dirent *e;
    while ((e = readdir(d)) != NULL) {
        pid_t tid = (pid_t)atoi(e->d_name);
        if (tid > 0 && tid != self)
            n += lower_priority(tid);
    }
    closedir(d);
    return n;
}

static void *build_main(void *arg)
{
    ra_head *h = arg;
    void *state = NULL, *old = NULL;
    size_t now = 0;
    ra_status st = RA_ECLOSED;
    /* an install costs one pass over the keys: it does not queue behind CPU builds */
    int install = h->graph.adj != NULL ? 1 : 0;
    double tq = ra_now_s();
    __atomic_add_fetch(&g_builds_queued, 1, __ATOMIC_RELAXED);
    int gated = build_gate_enter(h, install);
    __atomic_sub_fetch(&g_builds_queued, 1, __ATOMIC_RELAXED);
    __atomic_add_fetch(&g_builds_running, 1, __ATOMIC_RELAXED);
    double t0 = ra_now_s();
    const char *who = h->label[0] ? h->label : "head";
    /* This thread's FAISS/OpenMP team; restored, since a foreground build runs on the
     * caller's (a daemon worker's) thread. */
    int omp_old = omp_get_max_threads();
    if (h->opts.threads > 0)
        omp_set_num_threads(h->opts.threads);
    if (gated && install)
        st = h->ops->install(&state, h->view, h->n_build, &h->graph, h->train_q, h->nq, h->lists,
                             h->lists_k, &h->opts);
    else if (gated)
        st = h->lists && h->ops->build_lists
                 ? h->ops->build_lists(&state, h->view, h->n_build, h->train_q, h->nq, h->lists,
                                       h->lists_k, &h->opts)
                 : h->ops->build(&state, h->view, h->n_build, h->train_q, h->nq, &h->opts);
    double t1 = ra_now_s();
    if (st == RA_OK && build_cancelled(h))
        st = RA_ECLOSED; /* the head is going away: skip the insert and the swap-in */

    pthread_rwlock_wrlock(&h->lock);
    now = ra_kv_count(h->kv);
    if (st == RA_OK && now > h->n_build) {
        st = h->ops->add(state, h->kv, h->n_build, now - h->n_build);
        if (st != RA_OK)
            RA_ERROR("head: inserting %zu rows appended during the build failed (%s)",
                     now - h->n_build, ra_strerror(st));
    }
    if (st == RA_OK) {
        size_t bytes = h->ops->bytes(state);
        size_t delta = bytes > h->index_charged ? bytes - h->index_charged : 0;
        st = ra_mem_reserve(h->acct, delta);
        if (st != RA_OK) {
            RA_ERROR("head: %s index of %zu bytes exceeds the memory limit; staying on the "
                     "previous index or exact scan",
                     h->ops->name, bytes);
        } else {
            h->index_charged += delta;
            old = h->state;
            h->state = state;
            state = NULL;
            charge_index(h, bytes);
            __atomic_store_n(&h->ready, 1, __ATOMIC_RELEASE);
        }
    } else if (st == RA_ECLOSED) {
        RA_INFO("index build: %s: %s build over %zu keys cancelled after %.3f s", who, h->ops->name,
                h->n_build, t1 - t0);
    } else if (st == RA_ENOTSUP) { /* a shape the kind does not index (pscan below dim 8) */
        RA_INFO("index build: %s: %s does not index this head (dim %d); searches stay exact", who,
                h->ops->name, ra_kv_dim(h->kv));
    } else {
        RA_ERROR("index build: %s: %s build over %zu keys failed (%s); searches stay exact", who,
                 h->ops->name, h->n_build, ra_strerror(st));
    }
    ra_kv_unpin(h->kv, h->view);
    h->view = NULL;
    pthread_rwlock_unlock(&h->lock);

    if (state)
        h->ops->destroy(state);
    if (old)
        h->ops->destroy(old);
    if (st == RA_OK)
        RA_INFO("index build: %s: %s build over %zu keys (+%zu appended) done in %.3f s (%.3f s "
                "waiting for a build slot)",
                who, h->ops->name, h->n_build, now - h->n_build, t1 - t0, t0 - tq);
    __atomic_sub_fetch(&g_builds_running, 1, __ATOMIC_RELAXED);
    __atomic_add_fetch(st == RA_OK       ? &g_builds_done
                       : st == RA_ECLOSED ? &g_builds_cancelled
                                          : &g_builds_failed,
                       1, __ATOMIC_RELAXED);
    if (st == RA_OK)
        __atomic_add_fetch(&g_build_us, (uint64_t)((t1 - t0) * 1e6), __ATOMIC_RELAXED);
    free(h->train_q);
    h->train_q = NULL;
    free(h->lists);
    h->lists = NULL;
    ra_graph_adj_fini(&h->graph);
    if (h->opts.threads > 0)
        omp_set_num_threads(omp_old);
    if (gated)
        build_gate_leave(install);
    pthread_mutex_lock(&h->bmu);
    h->last_build = st;
    h->building = 0;
    pthread_cond_broadcast(&h->bcv);
    pthread_mutex_unlock(&h->bmu);
    return NULL;
}

/* A background build: below every serving thread, so that it never delays a reply.
 * Its OpenMP team and the graph's helper threads are created by this thread and
 * inherit the priority (libgomp makes a team per master thread). */
static void *build_thread_main(void *arg)
{
    if (!lower_priority(0))
        RA_DEBUG("head: could not lower the build thread's priority");
    return build_main(arg);
}

ra_status ra_head_build(ra_head *h, const float *train_q, size_t nq, int background)
{
    return ra_head_build_lists(h, train_q, nq, NULL, 0, background);
}

static ra_status start_build(ra_head *h, const float *train_q, size_t nq, const int32_t *lists,
                             int K, const ra_graph_adj *graph, int background);

ra_status ra_head_build_lists(ra_head *h, const float *train_q, size_t nq, const int32_t *lists,
                              int K, int background)
{
    return start_build(h, train_q, nq, lists, K, NULL, background);
}

ra_status ra_head_install_graph(ra_head *h, const ra_graph_adj *a, const float *train_q,
                                size_t nq, const int32_t *lists, int K, int background)
{
    if (!h || !a)
        return RA_EINVAL;
    if (!h->ops->install) {
        RA_ERROR("head: a prebuilt graph for a %s index (graph heads only)", h->ops->name);
        return RA_ENOTSUP;
    }
    char err[192];
    ra_status st = ra_graph_adj_check(a, NULL, err, sizeof err);
    if (st != RA_OK) {
        RA_ERROR("head: prebuilt graph refused: %s", err);
        return st;
    }
    return start_build(h, train_q, nq, lists, K, a, background);
}

static ra_status start_build(ra_head *h, const float *train_q, size_t nq, const int32_t *lists,
                             int K, const ra_graph_adj *graph, int background)
{
    if (!h)
        return RA_EINVAL;
    if (lists && (K < 1 || K > RA_HEAD_MAX_LIST_K || !nq)) {
        RA_ERROR("head: precomputed lists need 1 <= K <= %d and training queries (K %d, %zu "
                 "queries)",
                 RA_HEAD_MAX_LIST_K, K, nq);
        return RA_EINVAL;
    }
    int dim = ra_kv_dim(h->kv);
    if (nq && !train_q) {
        RA_ERROR("head: build with %zu training queries but a NULL array", nq);
        return RA_EINVAL;
    }
    if (nq > RA_HEAD_MAX_TRAIN) {
        RA_ERROR("head: %zu training queries exceed the limit %zu", nq, RA_HEAD_MAX_TRAIN);
        return RA_ETOOBIG;
    }
    if (nq && !ra_kern_all_finite(train_q, RA_DTYPE_F32, nq * (size_t)dim)) {
        RA_ERROR("head: training queries contain NaN or Inf");
        return RA_ENONFINITE;
    }
    pthread_mutex_lock(&h->bmu);
    if (h->building) {
        pthread_mutex_unlock(&h->bmu);
        return RA_EBUSY;
    }
    h->building = 1;
    int join = h->thr_live;
    pthread_t t = h->thr;
    h->thr_live = 0;
    pthread_mutex_unlock(&h->bmu);
    if (join)
        pthread_join(t, NULL);

    ra_status st = RA_OK;
    float *tq = NULL;
    int32_t *tl = NULL;
    ra_graph_adj ga = {0};
    if (graph) {
        size_t cells = graph->n * (size_t)graph->M;
        ga = (ra_graph_adj){.n = graph->n,
                            .M = graph->M,
                            .n_entries = graph->n_entries,
                            .adj = malloc(cells * sizeof *ga.adj),
                            .entries = malloc((size_t)graph->n_entries * sizeof *ga.entries)};
        if (!ga.adj || !ga.entries) {
            RA_ERROR("head: out of memory copying a graph of %zu x %d", graph->n, graph->M);
            st = RA_ENOMEM;
            goto fail;
        }
        memcpy(ga.adj, graph->adj, cells * sizeof *ga.adj);
        memcpy(ga.entries, graph->entries, (size_t)graph->n_entries * sizeof *ga.entries);
    }
    if (nq) {
        tq = malloc(nq * (size_t)dim * sizeof(float));
        if (!tq) {
            RA_ERROR("head: out of memory copying %zu training queries", nq);
            st = RA_ENOMEM;
            goto fail;
        }
        memcpy(tq, train_q, nq * (size_t)dim * sizeof(float));
    }
    if (lists) {
        tl = malloc(nq * (size_t)K * sizeof *tl);
        if (!tl) {
            RA_ERROR("head: out of memory copying %zu x %d precomputed lists", nq, K);
            st = RA_ENOMEM;
            goto fail;
        }
        memcpy(tl, lists, nq * (size_t)K * sizeof *tl);
    }
    pthread_rwlock_wrlock(&h->lock);
    size_t count = ra_kv_count(h->kv);
    for (size_t i = 0; tl && i < nq * (size_t)K; i++)
        if (tl[i] < -1 || (int64_t)tl[i] >= (int64_t)count) {
            pthread_rwlock_unlock(&h->lock);
            RA_ERROR("head: precomputed list entry %d outside -1..%zu", tl[i], count - 1);
            st = RA_EINVAL;
            goto fail;
        }
    if (graph && graph->n != count) {
        pthread_rwlock_unlock(&h->lock);
        RA_ERROR("head: a prebuilt graph of %zu rows for a head of %zu keys", graph->n, count);
        st = RA_EINVAL;
        goto fail;
    }
    st = ra_kv_pin(h->kv, &h->view);
    h->n_build = count;
    pthread_rwlock_unlock(&h->lock);
    if (st != RA_OK)
        goto fail;
    h->train_q = tq;
    h->nq = nq;
    h->lists = tl;
    h->lists_k = K;
    h->graph = ga;
    if (background) {
        /* Created under bmu so the thread is recorded before it can finish and another
         * build can start (the thread takes bmu last thing). */
        pthread_mutex_lock(&h->bmu);
        /* with its OpenMP helpers, not on a pinned worker's one CPU */
        int rc = ra_thread_create_wide(&h->thr, 0, build_thread_main, h);
        h->thr_live = rc == 0;
        pthread_mutex_unlock(&h->bmu);
        if (rc == 0)
            return RA_OK;
        RA_WARN("head: cannot start a build thread (errno %d); building in the caller", rc);
    }
    build_main(h);
    pthread_mutex_lock(&h->bmu);
    st = h->last_build;
    pthread_mutex_unlock(&h->bmu);
    return st;
fail:
    free(tq);
    free(tl);
    ra_graph_adj_fini(&ga);
    pthread_mutex_lock(&h->bmu);
    h->building = 0;
    pthread_cond_broadcast(&h->bcv);
    pthread_mutex_unlock(&h->bmu);
    return st;
}

ra_status ra_head_graph_export(ra_head *h, ra_graph_adj *out)
{
    if (!h || !out)
        return RA_EINVAL;
    pthread_rwlock_rdlock(&h->lock);
    ra_status st = RA_ESTATE;
    if (h->state && h->ops->export_graph && __atomic_load_n(&h->ready, __ATOMIC_ACQUIRE))
        st = h->ops->export_graph(h->state, out);
    pthread_rwlock_unlock(&h->lock);
    return st;
}

int ra_head_building(ra_head *h)
{
    if (!h)
        return 0;
    pthread_mutex_lock(&h->bmu);
    int b = h->building;
    pthread_mutex_unlock(&h->bmu);
    return b;
}

int ra_head_ready(ra_head *h)
{
    return h ? __atomic_load_n(&h->ready, __ATOMIC_ACQUIRE) : 0;
}

static ra_status check_search(ra_head *h, const float *q, const ra_search_params *p)
{
    if (!h || !q || !p) {
        RA_ERROR("head: search with a NULL argument");
        return RA_EINVAL;
    }
    if (p->k <= 0 || p->k > RA_HEAD_MAX_K) {
        RA_ERROR("head: top_k %d out of range [1, %d]", p->k, RA_HEAD_MAX_K);
        return RA_EINVAL;
    }
    if (p->effort < 0 || p->n_warm < 0 || (p->n_warm && !p->warm)) {
        RA_ERROR("head: bad search parameters (effort %d, n_warm %d)", p->effort, p->n_warm);
        return RA_EINVAL;
    }
    if (!ra_kern_all_finite(q, RA_DTYPE_F32, (size_t)ra_kv_dim(h->kv))) {
        RA_ERROR("head: query contains NaN or Inf");
        return RA_ENONFINITE;
    }
    return RA_OK;
}

/* Under the read lock. */
static ra_status search_locked(ra_head *h, const float *q, const ra_search_params *p, int32_t *ids,
                               float *scores, int *n_out, ra_search_stats *st)
{
    ra_search_stats s = {0};
    ra_status r;
    int n = 0;
    if (h->state && __atomic_load_n(&h->ready, __ATOMIC_ACQUIRE)) {
        ra_search_params pp = *p;
        if (pp.warm && pp.n_warm) { /* drop stale ids rather than trust every backend */
            size_t cnt = ra_kv_count(h->kv);
            for (int i = 0; i < pp.n_warm; i++)
                if (pp.warm[i] < 0 || (size_t)pp.warm[i] >= cnt) {
                    pp.warm = NULL;
                    pp.n_warm = 0;
                    break;
                }
        }
        r = h->ops->search(h->state, h->kv, q, &pp, ids, scores, &n, &s);
    } else {
        size_t cnt = ra_kv_count(h->kv);
        r = ra_exact_topk(h->kv, cnt, q, p->k, ids, scores, &n);
        s.scanned = cnt;
        s.exact_fallback = 1;
    }
    if (r == RA_OK) {
        *n_out = n;
        if (st)
            *st = s;
    }
    return r;
}

ra_status ra_head_search(ra_head *h, const float *q, const ra_search_params *p, int32_t *ids,
                         float *scores, int *n_out, ra_search_stats *st)
{
    ra_status r = check_search(h, q, p);
    if (r != RA_OK)
        return r;
    if (!ids || !scores || !n_out) {
        RA_ERROR("head: search with NULL result arrays");
        return RA_EINVAL;
    }
    pthread_rwlock_rdlock(&h->lock);
    r = search_locked(h, q, p, ids, scores, n_out, st);
    pthread_rwlock_unlock(&h->lock);
    return r;
}

ra_status ra_head_attend(ra_head *h, const float *q, const ra_search_params *p, float scale,
                         float *o, float *lse, int32_t *ids, float *scores, int *n_out,
                         ra_search_stats *st)
{
    ra_status r = check_search(h, q, p);
    if (r != RA_OK)
        return r;
    if (!o || !lse) {
        RA_ERROR("head: attend with NULL outputs");
        return RA_EINVAL;
    }
    enum { STACK_K = 1024 };
    int32_t ids_stack[STACK_K];
    float sc_stack[STACK_K];
    int32_t *I = ids;
    float *S = scores;
    void *heap = NULL;
    if (!I || !S) {
        if (p->k <= STACK_K) {
            I = I ? I : ids_stack;
            S = S ? S : sc_stack;
        } else {
            heap = malloc((size_t)p->k * (sizeof(int32_t) + sizeof(float)));
            if (!heap)
                return RA_ENOMEM;
            I = I ? I : heap;
            S = S ? S : (float *)((char *)heap + (size_t)p->k * sizeof(int32_t));
        }
    }
    int dim = ra_kv_dim(h->kv);
    if (!(scale > 0.f))
        scale = 1.0f / sqrtf((float)dim);
    int n = 0;
    pthread_rwlock_rdlock(&h->lock);
    r = search_locked(h, q, p, I, S, &n, st);
    if (r == RA_OK)
        ra_kern_partial_attention(S, I, (size_t)n, scale, ra_kv_values(h->kv), ra_kv_dtype(h->kv),
                                  dim, o, lse);
    pthread_rwlock_unlock(&h->lock);
    free(heap);
    if (r == RA_OK && n_out)
        *n_out = n;
    return r;
}

/* Every probe_every()-th default-effort group search of a head (under its read lock,
 * index ready) hands one of its queries and the exact scores it got to the probe
 * thread (probe_run), which adjusts the head's default effort. */
static void maybe_probe(ra_head *h, size_t nq, const float *q, const ra_search_params *p,
                        const float *S, int kmax, const int *nbuf)
{
    int every = probe_every(), dim = ra_kv_dim(h->kv);
    if (every <= 0 || !h->ops->effort_mult)
        return;
    uint32_t c = __atomic_add_fetch(&h->n_default, 1, __ATOMIC_RELAXED);
    size_t j = (size_t)(c / (uint32_t)every) % nq;
    if (c % (uint32_t)every == 0 && p[j].effort == 0 && p[j].k >= 10 && p[j].k <= PROBE_KMAX &&
        nbuf[j] == p[j].k && !__atomic_exchange_n(&h->probe_busy, 1, __ATOMIC_ACQUIRE)) {
        memcpy(h->probe_q, q + j * (size_t)dim, (size_t)dim * sizeof *h->probe_q);
        memcpy(h->probe_sc, S + j * (size_t)kmax, (size_t)p[j].k * sizeof *h->probe_sc);
        h->probe_k = p[j].k;
        probe_submit(h);
    }
}

static ra_status attend_group(ra_head *h, size_t nq, const float *q, const ra_search_params *p,
                              float scale, unsigned flags, float *o, float *lse, int32_t *ids,
                              float *scores, int *n_out, ra_search_stats *st);

ra_status ra_head_attend_group(ra_head *h, size_t nq, const float *q, const ra_search_params *p,
                               float scale, unsigned flags, float *o, float *lse, int32_t *ids,
                               float *scores, int *n_out, ra_search_stats *st)
{
    __atomic_add_fetch(&g_serving, 1, __ATOMIC_RELAXED);
    ra_status r = attend_group(h, nq, q, p, scale, flags, o, lse, ids, scores, n_out, st);
    __atomic_sub_fetch(&g_serving, 1, __ATOMIC_RELAXED);
    return r;
}

static ra_status attend_group(ra_head *h, size_t nq, const float *q, const ra_search_params *p,
                              float scale, unsigned flags, float *o, float *lse, int32_t *ids,
                              float *scores, int *n_out, ra_search_stats *st)
{
    if (!h || !q || !p || !o || !lse || nq == 0 || nq > RA_HEAD_MAX_GROUP) {
        RA_ERROR("head: attend_group with a NULL argument or %zu query heads (1..%d)", nq,
                 RA_HEAD_MAX_GROUP);
        return RA_EINVAL;
    }
    int dim = ra_kv_dim(h->kv);
    int kmax = 0;
    for (size_t j = 0; j < nq; j++) {
        if (p[j].k < 0 || p[j].k > RA_HEAD_MAX_K || p[j].effort < 0 || p[j].n_warm < 0 ||
            (p[j].n_warm && !p[j].warm)) {
            RA_ERROR("head: bad search parameters of query %zu (k %d, effort %d, n_warm %d)", j,
                     p[j].k, p[j].effort, p[j].n_warm);
            return RA_EINVAL;
        }
        if (p[j].k > kmax)
            kmax = p[j].k;
    }
    if (!(flags & RA_HEAD_Q_CHECKED) && !ra_kern_all_finite(q, RA_DTYPE_F32, nq * (size_t)dim)) {
        RA_ERROR("head: query contains NaN or Inf");
        return RA_ENONFINITE;
    }
    int nbuf[RA_HEAD_MAX_GROUP];
    if (!(scale > 0.f))
        scale = 1.0f / sqrtf((float)dim);
    if (kmax == 0) {
        memset(o, 0, nq * (size_t)dim * sizeof *o);
        for (size_t j = 0; j < nq; j++) {
            lse[j] = -INFINITY;
            if (n_out)
                n_out[j] = 0;
            if (st)
                st[j] = (ra_search_stats){0};
        }
        return RA_OK;
    }
    void *heap = NULL;
    int32_t *I = ids;
    float *S = scores;
    if (!I || !S) {
        heap = malloc(nq * (size_t)kmax * (sizeof(int32_t) + sizeof(float)));
        if (!heap)
            return RA_ENOMEM;
        I = I ? I : heap;
        S = S ? S : (float *)((char *)heap + nq * (size_t)kmax * sizeof(int32_t));
    }
    ra_status r = RA_OK;
    pthread_rwlock_rdlock(&h->lock);
    int indexed = h->state && __atomic_load_n(&h->ready, __ATOMIC_ACQUIRE);
    if (!indexed || h->ops == &ra_backend_scan) {
        size_t cnt = ra_kv_count(h->kv);
        r = ra_exact_topk_multi(h->kv, cnt, nq, q, kmax, I, S, nbuf);
        for (size_t j = 0; r == RA_OK && j < nq; j++) {
            if (nbuf[j] > p[j].k) /* best first: a smaller budget is a prefix */
                nbuf[j] = p[j].k;
            if (st)
                st[j] = (ra_search_stats){.scanned = p[j].k ? cnt : 0, .exact_fallback = !indexed};
        }
    } else if (h->ops->search_group) { /* one walk for the group (warm ids: the backend
                                          validates them against its own nodes) */
        r = h->ops->search_group(h->state, h->kv, nq, q, p, kmax, I, S, nbuf, st);
        if (r == RA_OK)
            maybe_probe(h, nq, q, p, S, kmax, nbuf);
    } else {
        for (size_t j = 0; j < nq && r == RA_OK; j++) {
            if (p[j].k == 0) {
                nbuf[j] = 0;
                if (st)
                    st[j] = (ra_search_stats){0};
                continue;
            }
            r = search_locked(h, q + j * (size_t)dim, &p[j], I + j * (size_t)kmax,
                              S + j * (size_t)kmax, &nbuf[j], st ? &st[j] : NULL);
        }
    }
    if (r == RA_OK)
        for (size_t j = 0; j < nq; j++)
            ra_kern_partial_attention(S + j * (size_t)kmax, I + j * (size_t)kmax, (size_t)nbuf[j],
                                      scale, ra_kv_values(h->kv), ra_kv_dtype(h->kv), dim,
                                      o + j * (size_t)dim, &lse[j]);
    pthread_rwlock_unlock(&h->lock);
    free(heap);
    if (r == RA_OK && n_out)
        memcpy(n_out, nbuf, nq * sizeof *n_out);
    return r;
}

/* ---------- an Attend cut over the keys (ra_head_attend_part) ---------- */

typedef struct part_ctx {
    int nparts, kmax;
    size_t nq;
    int done;                    /* parts finished (atomic) */
    int err;                     /* the first error (atomic, RA_OK = 0) */
    int whole;                   /* 1: part 0 answered the whole group itself */
    int used[RA_HEAD_MAX_PARTS]; /* 1: the part left candidates */
    /* then: ids [nparts][nq][kmax], scores [nparts][nq][kmax], counts [nparts][nq] */
} part_ctx;

size_t ra_head_part_bytes(int nparts, size_t nq, int kmax)
{
    size_t per = (size_t)nparts * nq;
    return sizeof(part_ctx) + per * (size_t)kmax * (sizeof(int32_t) + sizeof(float)) +
           per * sizeof(int);
}

void ra_head_part_init(void *ctx, int nparts, size_t nq, int kmax)
{
    part_ctx *c = ctx;
    memset(c, 0, sizeof *c);
    c->nparts = nparts;
    c->nq = nq;
    c->kmax = kmax;
}

static int32_t *part_ids(part_ctx *c, int part)
{
    return (int32_t *)(c + 1) + (size_t)part * c->nq * (size_t)c->kmax;
}

static float *part_sc(part_ctx *c, int part)
{
    return (float *)((int32_t *)(c + 1) + (size_t)c->nparts * c->nq * (size_t)c->kmax) +
           (size_t)part * c->nq * (size_t)c->kmax;
}

static int *part_n(part_ctx *c, int part)
{
    return (int *)(part_sc(c, c->nparts)) + (size_t)part * c->nq;
}

int ra_head_partable(ra_head *h)
{
    return h && h->ops && h->ops->search_part;
}

static ra_status attend_part(ra_head *h, void *ctx, int part, size_t nq, const float *q,
                             const ra_search_params *p, float scale, unsigned flags, float *o,
                             float *lse, int32_t *ids, float *scores, int *n_out, int *finished);

ra_status ra_head_attend_part(ra_head *h, void *ctx, int part, size_t nq, const float *q,
                              const ra_search_params *p, float scale, unsigned flags, float *o,
                              float *lse, int32_t *ids, float *scores, int *n_out, int *finished)
{
    __atomic_add_fetch(&g_serving, 1, __ATOMIC_RELAXED);
    ra_status r =
        attend_part(h, ctx, part, nq, q, p, scale, flags, o, lse, ids, scores, n_out, finished);
    __atomic_sub_fetch(&g_serving, 1, __ATOMIC_RELAXED);
    return r;
}

static ra_status attend_part(ra_head *h, void *ctx, int part, size_t nq, const float *q,
                             const ra_search_params *p, float scale, unsigned flags, float *o,
                             float *lse, int32_t *ids, float *scores, int *n_out, int *finished)
{
    part_ctx *c = ctx;
    *finished = 0;
    if (!h || !c || !q || !p || !o || !lse || part < 0 || part >= c->nparts ||
        c->nparts > RA_HEAD_MAX_PARTS || nq == 0 || nq > RA_HEAD_MAX_GROUP || nq != c->nq || !ids ||
        !scores) {
        RA_ERROR("head: attend_part with a bad part (%d of %d), NULL buffers or %zu queries", part,
                 c ? c->nparts : 0, nq);
        return RA_EINVAL;
    }
    ra_status r = RA_OK;
    int kmax = 0;
    for (size_t j = 0; j < nq; j++) {
        if (p[j].k < 0 || p[j].k > RA_HEAD_MAX_K || p[j].effort < 0) {
            RA_ERROR("head: bad search parameters of query %zu (k %d, effort %d)", j, p[j].k,
                     p[j].effort);
            r = RA_EINVAL;
            goto count;
        }
        kmax = p[j].k > kmax ? p[j].k : kmax;
    }
    if (kmax > c->kmax) {
        RA_ERROR("head: attend_part with k %d above its context's %d", kmax, c->kmax);
        r = RA_EINVAL;
        goto count;
    }
    pthread_rwlock_rdlock(&h->lock);
    int cut =
        h->state && __atomic_load_n(&h->ready, __ATOMIC_ACQUIRE) && h->ops->search_part && kmax > 0;
    if (cut && (flags & RA_HEAD_Q_CHECKED ||
                ra_kern_all_finite(q, RA_DTYPE_F32, nq * (size_t)ra_kv_dim(h->kv)))) {
        r = h->ops->search_part(h->state, h->kv, part, c->nparts, nq, q, p, c->kmax,
                                part_ids(c, part), part_sc(c, part), part_n(c, part));
        c->used[part] = r == RA_OK;
    } else if (cut) {
        RA_ERROR("head: query contains NaN or Inf");
        r = RA_ENONFINITE;
    }
    pthread_rwlock_unlock(&h->lock);
    if (!cut && part == 0) { /* the whole group, here; the counts kept for the finisher,
                                whose n_out may be another buffer */
        r = ra_head_attend_group(h, nq, q, p, scale, flags, o, lse, ids, scores, part_n(c, 0),
                                 NULL);
        if (r == RA_OK && n_out)
            memcpy(n_out, part_n(c, 0), nq * sizeof *n_out);
        c->whole = r == RA_OK;
    }
count:
    if (r != RA_OK) {
        int z = RA_OK;
        __atomic_compare_exchange_n(&c->err, &z, (int)r, 0, __ATOMIC_RELAXED, __ATOMIC_RELAXED);
    }
    if (__atomic_add_fetch(&c->done, 1, __ATOMIC_ACQ_REL) != c->nparts)
        return RA_OK;
    *finished = 1;
    ra_status e = (ra_status)__atomic_load_n(&c->err, __ATOMIC_RELAXED);
    if (e != RA_OK)
        return e;
    if (c->whole) {
        if (n_out)
            memcpy(n_out, part_n(c, 0), nq * sizeof *n_out);
        return RA_OK;
    }
    /* A part that found no index (one was installed between the parts, after it ran and
     * before part 0 did) searched nothing: its keys would be missing from the merge, so
     * the finisher answers the whole group itself instead */
    for (int x = 0; x < c->nparts; x++)
        if (!c->used[x]) {
            int nb[RA_HEAD_MAX_GROUP];
            r = ra_head_attend_group(h, nq, q, p, scale, flags, o, lse, ids, scores, nb, NULL);
            if (r == RA_OK && n_out)
                memcpy(n_out, nb, nq * sizeof *n_out);
            return r;
        }
    /* merge: each query's k best of the parts' sorted lists (ties: the lower id) */
    int dim = ra_kv_dim(h->kv);
    if (!(scale > 0.f))
        scale = 1.0f / sqrtf((float)dim);
    int nbuf[RA_HEAD_MAX_GROUP];
    for (size_t j = 0; j < nq; j++) {
        int pos[RA_HEAD_MAX_PARTS] = {0}, m = 0, k = p[j].k;
        int32_t *io = ids + j * (size_t)kmax; /* rows of kmax, as ra_head_attend_group */
        float *so = scores + j * (size_t)kmax;
        while (m < k) {
            int best = -1;
            float bs = 0;
            int32_t bi = 0;
            for (int x = 0; x < c->nparts; x++) {
                if (!c->used[x] || pos[x] >= part_n(c, x)[j])
                    continue;
                size_t at = j * (size_t)c->kmax + (size_t)pos[x];
                float s = part_sc(c, x)[at];
                int32_t i = part_ids(c, x)[at];
                if (best < 0 || s > bs || (s == bs && i < bi))
                    best = x, bs = s, bi = i;
            }
            if (best < 0)
                break;
            pos[best]++;
            io[m] = bi;
            so[m++] = bs;
        }
        nbuf[j] = m;
    }
    pthread_rwlock_rdlock(&h->lock);
    for (size_t j = 0; j < nq; j++)
        ra_kern_partial_attention(scores + j * (size_t)kmax, ids + j * (size_t)kmax,
                                  (size_t)nbuf[j], scale, ra_kv_values(h->kv), ra_kv_dtype(h->kv),
                                  dim, o + j * (size_t)dim, &lse[j]);
    if (h->state && __atomic_load_n(&h->ready, __ATOMIC_ACQUIRE))
        maybe_probe(h, nq, q, p, scores, kmax, nbuf);
    pthread_rwlock_unlock(&h->lock);
    if (n_out)
        memcpy(n_out, nbuf, nq * sizeof *n_out);
    return RA_OK;
}

void ra_head_grow_cost(ra_head *h, size_t n, int exact, size_t *cap, size_t *bytes)
{
    *cap = *bytes = 0;
    if (!h)
        return;
    pthread_rwlock_rdlock(&h->lock);
    ra_kv_grow_cost(h->kv, n, exact, cap, bytes);
    pthread_rwlock_unlock(&h->lock);
}

ra_status ra_head_reserve(ra_head *h, size_t cap, size_t prepaid, size_t *left)
{
    *left = prepaid;
    if (!h)
        return RA_EINVAL;
    pthread_rwlock_wrlock(&h->lock);
    ra_status st = ra_kv_grow(h->kv, cap, prepaid, left);
    pthread_rwlock_unlock(&h->lock);
    return st;
}

size_t ra_head_count(ra_head *h)
{
    if (!h)
        return 0;
    pthread_rwlock_rdlock(&h->lock);
    size_t n = ra_kv_count(h->kv);
    pthread_rwlock_unlock(&h->lock);
    return n;
}

void ra_head_positions(ra_head *h, const int32_t *ids, size_t n, int64_t *pos)
{
    if (!h || !ids || !pos)
        return;
    pthread_rwlock_rdlock(&h->lock);
    size_t cnt = ra_kv_count(h->kv);
    const int64_t *P = ra_kv_positions(h->kv);
    for (size_t i = 0; i < n; i++)
        pos[i] = ids[i] >= 0 && (size_t)ids[i] < cnt ? P[ids[i]] : -1;
    pthread_rwlock_unlock(&h->lock);
}

size_t ra_head_bytes(ra_head *h)
{
    if (!h)
        return 0;
    pthread_rwlock_rdlock(&h->lock);
    size_t b = sizeof *h + ra_kv_bytes(h->kv) + (h->state ? h->ops->bytes(h->state) : 0);
    pthread_rwlock_unlock(&h->lock);
    return b;
}
