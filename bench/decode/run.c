/* One ratd-bench-decode run, phase by phase: plan (sizes, memory against MemAvailable),
 * daemon (private or running) and its limits, data (generated or from a trace), sessions
 * and Offload, the wait for the index builds, then the decode replay: per step and layer
 * one timed Attend for all heads (of all sessions of a batch), the held-back tokens
 * Appended every few steps, an empty request timed after every step, and on sampled
 * steps an untimed Attend with the retrieved positions for the exact comparison. */
#define _GNU_SOURCE
#include <math.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "decode.h"
#include "ra_half.h"
#include "ratd/gpu.h"

typedef struct bench {
    dec_cfg *c;
    dec_run *r;
    const dec_gen *gen;
    ra_trace *trace;
    dec_data data[DEC_MAX_BATCH]; /* one per session; a trace's is shared */
    int n_data;
    dec_data *sd[DEC_MAX_BATCH];
    dec_daemon dm;
    ra_client *cl;
    uint64_t sid[DEC_MAX_BATCH];
    int n_sid;
    size_t base_app; /* rows appended before this decode pass (a --sweep pass: all) */
} bench;

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

/* One line on stderr: a progress line (unless --quiet) or a failure (always). */
static void say(int show, const char *fmt, va_list ap)
{
    if (!show)
        return;
    fputs("ratd-bench-decode: ", stderr);
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
}

__attribute__((format(printf, 2, 3))) static void progress(const dec_cfg *c, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    say(!c->quiet, fmt, ap);
    va_end(ap);
}

/* returns the exit code of a runtime failure */
__attribute__((format(printf, 1, 2))) static int fail(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    say(1, fmt, ap);
    va_end(ap);
    return 1;
}

static int fail_call(bench *b, const char *what, ra_status s)
{
    return fail("%s: %s (%s)", what, ra_strerror(s), ra_client_errmsg(b->cl));
}

#define MiB(x) ((x) / 1048576.0)

/* ---- plan ------------------------------------------------------------------------------ */

static double mem_available(void)
{
    FILE *f = fopen("/proc/meminfo", "r");
    if (!f)
        return -1;
    char line[256];
    double kb = -1;
    while (fgets(line, sizeof line, f))
        if (sscanf(line, "MemAvailable: %lf kB", &kb) == 1)
            break;
    fclose(f);
    return kb < 0 ? -1 : kb * 1024.0;
}

/* The memory the run needs, said up front; refused past MemAvailable unless --force. */
static int plan(bench *b)
{
    const dec_cfg *c = b->c;
    dec_run *r = b->r;
    double L = c->layers, G = c->kv_heads, H = c->q_heads, D = c->dim, B = c->batch;
    double rows = (double)c->context + (double)r->n_app, n_data = b->trace ? 1 : B;
    double per_key; /* an index's own bytes per key beyond K and V (ratd's backends) */
    switch (c->index) {
    case RA_CLIENT_INDEX_FLAT:
    case RA_CLIENT_INDEX_IVF:
        per_key = 4 * D;
        break; /* FAISS's fp32 copy */
    case RA_CLIENT_INDEX_HNSW:
        per_key = 4 * D + 64 * 4;
        break; /* + level-0 links */
    default:
        per_key = 48 * 4;
        break; /* graph: M = 48 edges */
    }
    r->mem_kv = B * L * G * rows * (2 * D * 2 + 8);
    r->mem_index = B * L * G * rows * per_key;
    int th = dec_threads(c), tasks = c->layers * c->kv_heads;
    double gen_threads = th < tasks ? th : tasks;
    r->mem_bench = n_data * (L * G * rows * D * 2 + L * H * c->n_train * D * 4 +
                             (double)r->s_total * L * H * D * 4) +
                   G * (double)c->context * (D * 2 + 8) /* an Offload's values, positions */
                   + gen_threads * 2 * rows * D * 4     /* a generator's fp32 keys in flight */
                   + th * (H / G + 1) * rows * 8;       /* the reference's scores */
    r->mem_avail = mem_available();
    r->mem_local = r->private_daemon || !strncmp(r->endpoint, "ipc://", 6);
    double need = r->mem_bench + (r->mem_local ? r->mem_kv + r->mem_index : 0);
    progress(c,
             "plan: %d session(s) x %d layer(s) x %d KV heads x %zu keys (+%zu appended), %d "
             "query heads, dim %d: daemon %.0f MiB (K, V, positions) + ~%.0f MiB (%s index), "
             "bench %.0f MiB; MemAvailable %.0f MiB",
             c->batch, c->layers, c->kv_heads, c->context, r->n_app, c->q_heads, c->dim,
             MiB(r->mem_kv), MiB(r->mem_index), dec_index_name(c->index), MiB(r->mem_bench),
             MiB(r->mem_avail));
    if (r->mem_avail > 0 && need > r->mem_avail && !c->force)
        return fail("this run needs about %.0f MiB (%s%.0f MiB for the bench) but MemAvailable "
                    "is %.0f MiB; use fewer --layers, a shorter --context or a smaller --batch "
                    "(or --force)",
                    MiB(need), r->mem_local ? "the daemon's K, V and indexes, plus " : "",
                    MiB(r->mem_bench), MiB(r->mem_avail));
    return 0;
}

/* ---- daemon ---------------------------------------------------------------------------- */

static int connect_daemon(bench *b)
{
    dec_run *r = b->r;
    ra_client_opts o;
    ra_client_opts_default(&o);
    o.timeout_ms = 5000; /* the first Hello: an absent daemon fails fast */
    ra_status s = ra_client_open(&b->cl, r->endpoint, &o);
    if (s != RA_OK)
        return fail("cannot open %s: %s", r->endpoint, ra_strerror(s));
    if ((s = ra_client_hello(b->cl, &r->info)) != RA_OK)
        return fail("no ratd answers on %s: %s (%s)", r->endpoint, ra_strerror(s),
                    ra_client_errmsg(b->cl));
    ra_client_set_timeout(b->cl, 120000); /* an Offload of a long context takes a while */
    ra_client_set_spin_us(b->cl, b->c->client_spin_us);
    return 0;
}

static int start_daemon(bench *b)
{
    dec_cfg *c = b->c;
    dec_run *r = b->r;
    char bin[4096], err[512];
    if (c->endpoint) {
        snprintf(r->endpoint, sizeof r->endpoint, "%s", c->endpoint);
        return connect_daemon(b);
    }
    if (c->ratd_bin)
        snprintf(bin, sizeof bin, "%s", c->ratd_bin);
    else if (dec_daemon_default_bin(bin, sizeof bin) != 0)
        return fail("no ratd at %s (this build tree's daemon); pass --ratd BIN or --endpoint EP",
                    bin);
    ra_status s = dec_daemon_start(&b->dm, bin, c->workers, err, sizeof err);
    if (s != RA_OK)
        return fail("%s", err);
    r->private_daemon = 1;
    snprintf(r->endpoint, sizeof r->endpoint, "%s", b->dm.endpoint);
    return connect_daemon(b);
}

/* Everything the run will send, against the limits the daemon announced. */
static int check_limits(bench *b)
{
    const dec_cfg *c = b->c;
    const ra_server_info *in = &b->r->info;
    const ra_server_limits *lm = &in->limits;
    double es = 2, kframe = (double)c->kv_heads * c->context * c->dim * es;
    double qframe = (double)c->q_heads * c->n_train * c->dim * 4;
    double msg = 2 * kframe + 8.0 * c->context + qframe;
    uint32_t cap = c->dtype == RA_DTYPE_BF16 ? RA_CAP_BF16 : RA_CAP_F16;
    if (!(in->capabilities & cap))
        return fail("the daemon does not store %s", ra_dtype_name(c->dtype));
    if (c->sample_every > 0 && !(in->capabilities & RA_CAP_TOPK))
        return fail("the daemon cannot return top-k positions (fidelity): use --sample-every 0");
    struct {
        const char *what;
        double want, limit;
    } chk[] = {
        {"sessions (--batch)", c->batch, lm->max_sessions},
        {"layers", c->layers, lm->max_layers},
        {"query heads", c->q_heads, lm->max_heads},
        {"head dim", c->dim, lm->max_dim},
        {"top_k", c->top_k, lm->max_top_k},
        {"tokens per Offload (--context)", (double)c->context, lm->max_tokens},
        {"tokens per Append (--append-every)", c->append_every, lm->max_tokens},
        {"training queries per head (--n-train)", c->n_train, lm->max_queries},
        {"bytes of the K frame of an Offload", kframe, (double)lm->max_frame_bytes},
        {"bytes of the training-query frame", qframe, (double)lm->max_frame_bytes},
        {"bytes of an Offload message", msg, (double)lm->max_message_bytes},
    };
    for (size_t i = 0; i < sizeof chk / sizeof *chk; i++)
        if (chk[i].limit > 0 && chk[i].want > chk[i].limit)
            return fail("%s: %.0f, but the daemon's limit is %.0f", chk[i].what, chk[i].want,
                        chk[i].limit);
    double need = b->r->mem_kv + b->r->mem_index;
    if (lm->mem_limit && need > (double)lm->mem_limit && !c->force)
        return fail("the sessions need about %.0f MiB on the daemon; its --mem-limit is %.0f MiB "
                    "(or --force)",
                    MiB(need), MiB((double)lm->mem_limit));
    return 0;
}

/* ---- data, sessions, Offload, builds ----------------------------------------------------- */

static int make_data(bench *b)
{
    dec_cfg *c = b->c;
    char err[512];
    double t0 = now_s();
    if (b->trace) {
        ra_status s = dec_data_trace(c, b->trace, b->r->n_app, &b->data[0], err, sizeof err);
        if (s != RA_OK)
            return fail("%s", err);
        b->n_data = 1;
        for (int i = 0; i < c->batch; i++)
            b->sd[i] = &b->data[0];
    } else {
        for (int i = 0; i < c->batch; i++) {
            ra_status s = dec_data_synth(c, b->gen, i, b->r->n_app, &b->data[i], err, sizeof err);
            if (s != RA_OK)
                return fail("%s", err);
            b->n_data = i + 1;
            b->sd[i] = &b->data[i];
        }
    }
    b->r->gen_s = now_s() - t0;
    b->r->n_train = b->data[0].n_train;
    progress(c,
             "generate: %d x %d heads (%s), %zu + %zu keys and %d query heads each, %.2f s on %d "
             "threads",
             b->n_data, c->layers * c->kv_heads, b->trace ? c->trace : b->gen->name, c->context,
             b->r->n_app, c->q_heads / c->kv_heads, b->r->gen_s, dec_threads(c));
    return 0;
}

static int create_sessions(bench *b)
{
    const dec_cfg *c = b->c;
    ra_session_desc d;
    ra_session_desc_init(&d);
    d.n_layers = c->layers;
    d.n_q_heads = c->q_heads;
    d.n_kv_heads = c->kv_heads;
    d.head_dim = c->dim;
    d.dtype = c->dtype;
    d.index.kind = c->index;
    d.index.seed = c->seed;
    for (int i = 0; i < c->batch; i++) {
        ra_status s = ra_client_session_create(b->cl, &d, &b->sid[i]);
        if (s != RA_OK)
            return fail_call(b, "session", s);
        b->n_sid = i + 1;
    }
    return 0;
}

typedef struct vjob {
    const dec_data *d;
    int layer;
    size_t row0, n;
    uint16_t *v; /* [G][n][D] */
    ra_status st[1024];
} vjob;

static void values_task(void *arg, size_t g)
{
    vjob *j = arg;
    j->st[g] =
        dec_data_values(j->d, j->layer, (int)g, j->row0, j->n, j->v + g * j->n * (size_t)j->d->dim);
}

/* The values of rows [row0, row0 + n) of one layer, every KV head, into v [G][n][D]. */
static ra_status layer_values(const bench *b, const dec_data *d, int layer, size_t row0, size_t n,
                              uint16_t *v)
{
    vjob *j = malloc(sizeof *j);
    if (!j)
        return RA_ENOMEM;
    *j = (vjob){.d = d, .layer = layer, .row0 = row0, .n = n, .v = v};
    dec_par_for((size_t)d->n_kv, dec_threads(b->c), values_task, j);
    ra_status s = RA_OK;
    for (int g = 0; g < d->n_kv && s == RA_OK; g++)
        s = j->st[g];
    free(j);
    return s;
}

/* --gpu-build: the graph of every KV head of one layer by ra_gpu_graph_build_heads (each
 * head as ra_gpu_graph_build builds it, host steps beside the next head's device steps)
 * from its keys and the training queries of the query heads that share it (converted to
 * the keys' dtype, as a decoder holds them), into adj [G][n][M] and entries [G][ne], and
 * the exact lists of the training queries into lists [H][n_train][GPU_LIST_K] (the
 * Offload's train_knn: ratd then scans nothing for the graph's routing and calibration). */
#define GPU_LIST_K 100
static int gpu_build_layer(bench *b, ra_gpu_cache *gc, const dec_data *d, int l, size_t n,
                           int32_t *adj, int32_t *entries, unsigned *ne, int32_t *lists,
                           unsigned M)
{
    const dec_cfg *c = b->c;
    size_t G = (size_t)c->kv_heads, D = (size_t)c->dim, H = (size_t)c->q_heads, grp = H / G;
    size_t nq = grp * d->n_train;
    uint16_t *qb = ra_gpu_host_alloc((nq ? nq : 1) * G * D * sizeof *qb);
    ra_gpu_graph_head *hd = calloc(G, sizeof *hd);
    if (!qb || !hd) {
        ra_gpu_host_free(qb);
        free(hd);
        return fail("out of memory for the training queries of a GPU build");
    }
    for (size_t g = 0; g < G; g++) {
        const float *q = d->q_train + ((size_t)l * H + g * grp) * d->n_train * D;
        uint16_t *o = qb + g * nq * D;
        for (size_t i = 0; i < nq * D; i++)
            o[i] = c->dtype == RA_DTYPE_BF16 ? ra_f32_to_bf16(q[i]) : ra_f32_to_f16(q[i]);
        hd[g] = (ra_gpu_graph_head){.keys = d->k_off + ((size_t)l * G + g) * n * D,
                                    .n_keys = n,
                                    .queries = o,
                                    .n_queries = nq,
                                    .adj = adj + g * n * M,
                                    .entries = entries + g * 16,
                                    .lists = lists + g * nq * GPU_LIST_K};
    }
    ra_gpu_graph_params p;
    ra_gpu_graph_params_init(&p);
    p.degree = M;
    p.knn = GPU_LIST_K; /* the caller asks for n > GPU_LIST_K */
    p.seed = c->seed;
    size_t done = 0;
    double t0 = now_s();
    ra_status s = ra_gpu_graph_build_heads(gc, RA_GPU_MEM_HOST, c->dtype, (unsigned)D, &p, hd, G,
                                           &done);
    b->r->gpu_build_s += now_s() - t0;
    int rc = 0;
    if (s != RA_OK)
        rc = fail("ra_gpu_graph_build_heads of layer %d (head %zu): %s: %s", l, done,
                  ra_strerror(s), ra_gpu_cache_last_error(gc));
    else
        *ne = G ? hd[0].n_entries : 0;
    ra_gpu_host_free(qb);
    free(hd);
    return rc;
}

/* a ra_gpu cache for --gpu-build: CUDA when it can be made, else gpu/'s CPU reference */
static ra_gpu_cache *gpu_build_cache(bench *b)
{
    const dec_cfg *c = b->c;
    ra_gpu_config g;
    ra_gpu_config_init(&g);
    g.n_layers = 1;
    g.n_q_heads = g.n_kv_heads = 1;
    g.head_dim = (unsigned)c->dim;
    g.dtype = c->dtype;
    g.window = 1;
    g.batch = 1;
    ra_gpu_cache *gc = NULL;
    g.backend = RA_GPU_BACKEND_CUDA;
    if (!ra_gpu_cuda_available() || ra_gpu_cache_create(&g, &gc) != RA_OK) {
        g.backend = RA_GPU_BACKEND_CPU;
        if (ra_gpu_cache_create(&g, &gc) != RA_OK)
            return NULL;
    }
    b->r->gpu_backend = ra_gpu_cache_backend(gc) == RA_GPU_BACKEND_CUDA ? "cuda" : "cpu";
    return gc;
}

static int offload(bench *b)
{
    const dec_cfg *c = b->c;
    dec_run *r = b->r;
    size_t G = (size_t)c->kv_heads, D = (size_t)c->dim, H = (size_t)c->q_heads, n = c->context;
    uint16_t *v = malloc(G * n * D * sizeof *v);
    int64_t *pos = malloc(n * sizeof *pos);
    if (!v || !pos) {
        free(v), free(pos);
        return fail("out of memory for an Offload's values");
    }
    const unsigned M = 48; /* ratd's graph_degree default, which the session keeps */
    int32_t *adj = NULL, *lists = NULL, entries[16 * 1024];
    unsigned ne = 0;
    ra_gpu_cache *gc = NULL;
    if (c->gpu_build) {
        if (!(r->info.capabilities & RA_CAP_GRAPH_ADJ)) {
            free(v), free(pos);
            return fail("--gpu-build: the daemon does not take prebuilt graphs (RA_CAP_GRAPH_ADJ)");
        }
        if (G > 1024 || c->index != RA_CLIENT_INDEX_GRAPH) {
            free(v), free(pos);
            return fail("--gpu-build: needs --index graph and at most 1024 KV heads");
        }
        if (n <= GPU_LIST_K) {
            free(v), free(pos);
            return fail("--gpu-build: needs more than %d keys per head", GPU_LIST_K);
        }
        adj = malloc(G * n * M * sizeof *adj);
        lists = malloc((size_t)c->q_heads * (c->n_train ? (size_t)c->n_train : 1) * GPU_LIST_K *
                       sizeof *lists);
        gc = adj && lists ? gpu_build_cache(b) : NULL;
        if (!gc) {
            free(v), free(pos), free(adj), free(lists);
            return fail("--gpu-build: no memory or no ra_gpu cache");
        }
        r->gpu_build_s = 0;
    }
    int rc = 0;
    double t_end = now_s();
    for (int i = 0; i < c->batch && !rc; i++) {
        const dec_data *d = b->sd[i];
        double t_sess = 0, bytes = 0;
        for (size_t p = 0; p < n; p++)
            pos[p] = d->pos0 + (int64_t)p;
        for (int l = 0; l < c->layers && !rc; l++) {
            ra_status s = layer_values(b, d, l, 0, n, v);
            if (s != RA_OK) {
                rc = fail("values of layer %d: %s", l, ra_strerror(s));
                break;
            }
            ra_kv_batch kb = {.n_kv_heads = (int)G,
                              .head_dim = (int)D,
                              .dtype = c->dtype,
                              .n_tokens = n,
                              .k = d->k_off + (size_t)l * G * n * D,
                              .v = v,
                              .pos = pos,
                              .n_q_heads = d->n_train ? (int)H : 0,
                              .n_queries = d->n_train,
                              .q_train = d->q_train + (size_t)l * H * d->n_train * D};
            if (c->gpu_build) {
                if ((rc = gpu_build_layer(b, gc, d, l, n, adj, entries, &ne, lists, M)))
                    break;
                if (d->n_train) {
                    kb.train_knn = lists;
                    kb.train_knn_k = GPU_LIST_K;
                }
                kb.graph_adj = adj;
                kb.graph_degree = (int)M;
                kb.graph_entries = entries;
                kb.graph_n_entries = (int)ne;
                if (ne < 16) /* the wire takes [G][ne]: compact the rows of 16 */
                    for (size_t g = 1; g < G; g++)
                        memmove(entries + g * ne, entries + g * 16, ne * sizeof *entries);
            }
            double t0 = now_s();
            if ((s = ra_client_offload(b->cl, b->sid[i], l, &kb)) != RA_OK) {
                char what[64];
                snprintf(what, sizeof what, "Offload of session %d layer %d", i, l);
                rc = fail_call(b, what, s);
                break;
            }
            t_end = now_s();
            t_sess += t_end - t0;
            bytes += 2.0 * G * n * D * 2 + 8.0 * n + 4.0 * H * d->n_train * D;
        }
        r->offload_s += t_sess;
        r->offload_bytes += bytes;
        if (!rc)
            progress(c, "offload: session %d/%d, %d layer(s), %.0f MiB in %.2f s", i + 1, c->batch,
                     c->layers, MiB(bytes), t_sess);
    }
    free(v);
    free(pos);
    free(adj);
    free(lists);
    ra_gpu_cache_destroy(gc);
    if (c->gpu_build && !rc)
        progress(c, "gpu build: %d layer(s) x %zu heads x %d session(s) by ra_gpu_graph_build "
                    "(%s) in %.2f s",
                 c->layers, G, c->batch, r->gpu_backend, r->gpu_build_s);
    for (int i = 0; i < b->n_data; i++) { /* the daemon has copied them */
        free(b->data[i].q_train);
        b->data[i].q_train = NULL;
    }
    if (rc)
        return rc;
    /* build seconds: from the last Offload's reply to every build done */
    if (c->wait_index_ms <= 0) {
        r->build_s = NAN;
        progress(c, "build: not waited for (--wait-index 0): early steps may be exact scans");
        return 0;
    }
    for (int i = 0; i < c->batch; i++) {
        int left = c->wait_index_ms - (int)((now_s() - t_end) * 1000.0);
        ra_status s = left > 0 ? ra_client_wait_ready(b->cl, b->sid[i], left) : RA_ETIMEDOUT;
        if (s == RA_ETIMEDOUT)
            return fail("the index builds were not done %d ms after the last Offload "
                        "(--wait-index)",
                        c->wait_index_ms);
        if (s != RA_OK)
            return fail_call(b, "waiting for the index builds", s);
    }
    r->build_s = now_s() - t_end;
    r->index_ready = 1;
    ra_client_set_timeout(b->cl, 30000); /* decode requests are small: fail sooner */
    progress(c, "build: every %s index ready %.2f s after the last Offload",
             dec_index_name(c->index), r->build_s);
    return 0;
}

static int memory_stats(bench *b)
{
    dec_run *r = b->r;
    ra_server_stats st;
    ra_status s = ra_client_stats(b->cl, &st);
    if (s != RA_OK)
        return fail_call(b, "Stats", s);
    double sum = 0;
    int have = 1;
    for (int i = 0; i < b->c->batch && have; i++) {
        ra_session_stats ss;
        uint64_t by = 0;
        if ((s = ra_client_session_stats(b->cl, b->sid[i], &ss)) != RA_OK)
            return fail_call(b, "session Stats", s);
        have = dec_session_bytes(&ss, &by);
        sum += (double)by;
    }
    if (have) {
        r->session_bytes = sum / b->c->batch;
        r->session_bytes_src = "session_stats";
    } else {
        r->session_bytes = st.sessions ? (double)st.mem_used / (double)st.sessions : NAN;
        r->session_bytes_src = "mem_used/sessions";
    }
    return 0;
}

/* ---- decode ---------------------------------------------------------------------------- */

typedef struct dec_bufs {
    float *qb, *o, *lse; /* [B][H][D], [B][H][D], [B][H] */
    int64_t *fpos;       /* [L][B][H][k] */
    float *fsc, *flse;   /* [L][B][H][k], [L][B][H] */
    int32_t *fcnt;       /* [L][B][H] */
    uint16_t *ak, *av;   /* [G][N][D] an Append's tokens */
    int64_t *apos;       /* [N] */
    dec_answer *ans;     /* [B][L] */
} dec_bufs;

static void bufs_free(dec_bufs *u)
{
    free(u->qb), free(u->o), free(u->lse), free(u->fpos), free(u->fsc), free(u->flse);
    free(u->fcnt), free(u->ak), free(u->av), free(u->apos), free(u->ans);
}

static int bufs_alloc(const dec_cfg *c, dec_bufs *u)
{
    size_t B = (size_t)c->batch, H = (size_t)c->q_heads, D = (size_t)c->dim, L = (size_t)c->layers;
    size_t K = (size_t)c->top_k, N = c->append_every > 0 ? (size_t)c->append_every : 1;
    size_t G = (size_t)c->kv_heads;
    memset(u, 0, sizeof *u);
    u->qb = malloc(B * H * D * sizeof *u->qb);
    u->o = malloc(B * H * D * sizeof *u->o);
    u->lse = malloc(B * H * sizeof *u->lse);
    u->fpos = malloc(L * B * H * K * sizeof *u->fpos);
    u->fsc = malloc(L * B * H * K * sizeof *u->fsc);
    u->flse = malloc(L * B * H * sizeof *u->flse);
    u->fcnt = malloc(L * B * H * sizeof *u->fcnt);
    u->ak = malloc(G * N * D * sizeof *u->ak);
    u->av = malloc(G * N * D * sizeof *u->av);
    u->apos = malloc(N * sizeof *u->apos);
    u->ans = malloc(B * L * sizeof *u->ans);
    if (!u->qb || !u->o || !u->lse || !u->fpos || !u->fsc || !u->flse || !u->fcnt || !u->ak ||
        !u->av || !u->apos || !u->ans) {
        bufs_free(u);
        return -1;
    }
    return 0;
}

/* Appends rows [n_off + done, n_off + done + N) of every layer of every session. */
static int append_step(bench *b, dec_bufs *u, size_t done, int timed)
{
    const dec_cfg *c = b->c;
    size_t G = (size_t)c->kv_heads, D = (size_t)c->dim, N = (size_t)c->append_every;
    for (int i = 0; i < c->batch; i++) {
        const dec_data *d = b->sd[i];
        for (size_t p = 0; p < N; p++)
            u->apos[p] = d->pos0 + (int64_t)(d->n_off + done + p);
        for (int l = 0; l < c->layers; l++) {
            for (size_t g = 0; g < G; g++)
                memcpy(u->ak + g * N * D, dec_key_row(d, l, (int)g, d->n_off + done),
                       N * D * sizeof *u->ak);
            ra_status s = layer_values(b, d, l, d->n_off + done, N, u->av);
            if (s != RA_OK)
                return fail("values to append: %s", ra_strerror(s));
            ra_kv_batch kb = {.n_kv_heads = (int)G,
                              .head_dim = (int)D,
                              .dtype = c->dtype,
                              .n_tokens = N,
                              .k = u->ak,
                              .v = u->av,
                              .pos = u->apos};
            double t0 = now_s();
            if ((s = ra_client_append(b->cl, b->sid[i], l, &kb)) != RA_OK)
                return fail_call(b, "Append", s);
            if (timed && dec_series_add(&b->r->append_us, (now_s() - t0) * 1e6))
                return fail("out of memory");
        }
    }
    return 0;
}

static int decode(bench *b)
{
    const dec_cfg *c = b->c;
    dec_run *r = b->r;
    size_t B = (size_t)c->batch, H = (size_t)c->q_heads, D = (size_t)c->dim, K = (size_t)c->top_k;
    int L = c->layers;
    dec_bufs u;
    if (bufs_alloc(c, &u))
        return fail("out of memory for the decode buffers");
    float scale = (float)(1.0 / sqrt((double)D));
    size_t appended = b->base_app;
    int rc = 0, every = r->s_total / 10 > 0 ? r->s_total / 10 : 1, threads = dec_threads(c);
    progress(c, "decode: %d warm-up + %d timed steps x %d layer(s), batch %d (%s)", c->warmup,
             c->steps, L, c->batch, dec_batch_mode());
    for (int t = 0; t < r->s_total && !rc; t++) {
        int timed = t >= c->warmup;
        if (c->append_every > 0 && t > 0 && t % c->append_every == 0 &&
            appended + (size_t)c->append_every <= r->n_app) {
            if ((rc = append_step(b, &u, appended, timed)))
                break;
            appended += (size_t)c->append_every;
            r->appended = appended;
        }
        int sampled = timed && c->sample_every > 0 && (t - c->warmup) % c->sample_every == 0;
        double tok = 0;
        for (int l = 0; l < L && !rc; l++) {
            for (size_t i = 0; i < B; i++)
                memcpy(u.qb + i * H * D, dec_q_step(b->sd[i], t, l), H * D * sizeof *u.qb);
            ra_attend_req q = {.n_q_heads = (int)H,
                               .head_dim = (int)D,
                               .q = u.qb,
                               .top_k = c->top_k,
                               .effort = c->effort,
                               .scale = scale};
            ra_attend_out out = {.o = u.o, .lse = u.lse};
            int have = 0;
            double sv = 0, wk = 0, tm = 0, t0 = now_s();
            ra_status s =
                dec_attend_layer(b->cl, b->sid, c->batch, l, &q, &out, &have, &sv, &wk, &tm);
            double us = (now_s() - t0) * 1e6;
            if (s != RA_OK) {
                rc = fail_call(b, "Attend", s);
                break;
            }
            if (timed) {
                tok += us;
                r->have_server = have;
                if (dec_series_add(&r->attend_us, us) ||
                    (have &&
                     (dec_series_add(&r->server_us, sv) || dec_series_add(&r->work_us, wk) ||
                      dec_series_add(&r->task_max_us, tm))))
                    rc = fail("out of memory");
            }
            if (!sampled || rc)
                continue;
            /* untimed: the same queries again, with the retrieved positions */
            size_t blk = (size_t)l * B * H;
            q.want_topk = 1;
            out = (ra_attend_out){.o = u.o,
                                  .lse = u.flse + blk,
                                  .pos = u.fpos + blk * K,
                                  .scores = u.fsc + blk * K,
                                  .counts = u.fcnt + blk};
            if ((s = dec_attend_layer(b->cl, b->sid, c->batch, l, &q, &out, NULL, NULL, NULL,
                                      NULL)) !=
                RA_OK) {
                rc = fail_call(b, "Attend (top-k)", s);
                break;
            }
            for (size_t i = 0; i < B; i++)
                u.ans[i * L + l] = (dec_answer){.q = dec_q_step(b->sd[i], t, l),
                                                .lse = u.flse + blk + i * H,
                                                .pos = u.fpos + (blk + i * H) * K,
                                                .counts = u.fcnt + blk + i * H};
        }
        if (rc)
            break;
        if (timed && dec_series_add(&r->token_us, tok))
            rc = fail("out of memory");
        double t0 = now_s(); /* the empty request's round trip, between steps */
        ra_status s = ra_client_hello(b->cl, NULL);
        if (s != RA_OK) {
            rc = fail_call(b, "Hello", s);
            break;
        }
        if (timed && dec_series_add(&r->rtt_us, (now_s() - t0) * 1e6))
            rc = fail("out of memory");
        if (sampled && !rc) {
            if ((s = dec_fid_add(&r->fid, b->sd, c->batch, u.ans, c->context + appended, c->top_k,
                                 threads)) != RA_OK)
                rc = fail("exact reference: %s", ra_strerror(s));
            r->fid_steps++;
        }
        if (((t + 1) % every == 0 || t + 1 == r->s_total) && timed)
            progress(c, "decode: step %d/%d, Attend p50 so far %.0f us per layer", t + 1,
                     r->s_total, dec_series_pct(&r->attend_us, 50));
        else if ((t + 1) % every == 0)
            progress(c, "decode: step %d/%d (warm-up)", t + 1, r->s_total);
    }
    bufs_free(&u);
    return rc;
}

/* --sweep: the same decode steps again at each effort, on the same sessions (no Appends:
 * the held-back keys are in since the main pass), each into a run of its own whose
 * figures are summarised into r->sweep. */
static int sweep(bench *b)
{
    dec_cfg *c = b->c;
    dec_run *r = b->r;
    int effort = c->effort, every = c->append_every;
    int rc = 0;
    for (int i = 0; i < c->n_sweep && !rc; i++) {
        dec_run p;
        memset(&p, 0, sizeof p);
        p.s_total = r->s_total;
        p.n_app = r->n_app;
        c->effort = c->sweep[i];
        c->append_every = 0;
        b->base_app = r->appended;
        b->r = &p;
        progress(c, "sweep: effort %d", c->effort);
        rc = decode(b);
        b->r = r;
        struct dec_sweep *w = &r->sweep[r->n_sweep++];
        *w = (struct dec_sweep){
            .effort = c->effort,
            .attend_p50 = dec_series_pct(&p.attend_us, 50),
            .attend_p90 = dec_series_pct(&p.attend_us, 90),
            .attend_p99 = dec_series_pct(&p.attend_us, 99),
            .work_p50 = p.have_server ? dec_series_pct(&p.work_us, 50) : NAN,
            .server_p50 = p.have_server ? dec_series_pct(&p.server_us, 50) : NAN,
            .task_max_p50 = p.have_server ? dec_series_pct(&p.task_max_us, 50) : NAN,
            .recall_mean = dec_series_mean(&p.fid.recall),
            .recall_p10 = dec_series_pct(&p.fid.recall, 10),
            .mass_mean = dec_series_mean(&p.fid.mass),
        };
        if (!rc && (p.fid.lse_mismatch || p.fid.bad_positions)) { /* counted in the total */
            r->fid.lse_mismatch += p.fid.lse_mismatch;
            r->fid.bad_positions += p.fid.bad_positions;
        }
        dec_run_free(&p);
    }
    c->effort = effort;
    c->append_every = every;
    b->base_app = 0;
    return rc;
}

/* ---- the whole run ------------------------------------------------------------------------ */

/* --trace: the shape comes from the file. */
static int open_trace(bench *b)
{
    dec_cfg *c = b->c;
    char err[512];
    ra_status s = ra_trace_open(c->trace, &b->trace, err, sizeof err);
    if (s != RA_OK)
        return fail("%s", err);
    const ra_trace_info *in = ra_trace_get_info(b->trace);
    if (c->set_layers && (uint32_t)c->layers > in->n_layers)
        return fail("--layers %d: %s has %u layers", c->layers, c->trace, in->n_layers);
    if (!c->set_layers)
        c->layers = (int)in->n_layers;
    if (!c->set_model_layers)
        c->model_layers = (int)in->n_layers;
    c->q_heads = (int)in->n_heads;
    c->kv_heads = (int)in->n_kv_heads;
    c->dim = (int)in->head_dim;
    uint64_t S = (uint64_t)c->warmup + c->steps;
    if ((uint64_t)c->sink + c->window + S + c->top_k > in->n_pos)
        return fail("%s is too short: %u positions, but sink %d + window %d + %llu decode steps "
                    "(--warmup + --steps) + top_k %d offloaded keys need %llu",
                    c->trace, in->n_pos, c->sink, c->window, (unsigned long long)S, c->top_k,
                    (unsigned long long)(c->sink + c->window + S + c->top_k));
    if (c->dim > 4096 || (c->dim & 1))
        return fail("%s: head dim %d is not supported (even, at most 4096)", c->trace, c->dim);
    c->context = in->n_pos - (unsigned)c->window - (unsigned)S - (unsigned)c->sink;
    return 0;
}

int dec_run_all(dec_cfg *c, dec_run *r)
{
    bench *b = calloc(1, sizeof *b);
    if (!b)
        return fail("out of memory");
    b->c = c;
    b->r = r;
    double t0 = now_s();
    int rc = 0;
    r->s_total = c->warmup + c->steps;
    r->daemon_exit = 0;
    if (c->trace)
        rc = open_trace(b);
    else
        b->gen = dec_gen_find(c->gen);
    /* Appends come at steps N, 2N, ... < s_total, N tokens each: hold back that many keys */
    r->n_app = c->append_every > 0
                   ? (size_t)((r->s_total - 1) / c->append_every) * (size_t)c->append_every
                   : 0;
    if (!rc && c->endpoint)
        snprintf(r->endpoint, sizeof r->endpoint, "%s", c->endpoint);
    r->private_daemon = !c->endpoint;
    static int (*const phases[])(bench *) = {plan,         start_daemon,    check_limits,
                                             make_data,    create_sessions, offload,
                                             memory_stats, decode,          sweep};
    for (size_t i = 0; i < sizeof phases / sizeof *phases && !rc; i++)
        rc = phases[i](b);
    for (int i = 0; i < b->n_sid; i++) { /* a running daemon keeps nothing of the run */
        ra_status s = ra_client_session_drop(b->cl, b->sid[i]);
        if (s != RA_OK && !rc)
            rc = fail_call(b, "Drop", s);
    }
    ra_client_close(b->cl);
    if (b->dm.pid > 0) {
        r->daemon_exit = dec_daemon_stop(&b->dm);
        if (r->daemon_exit != 0 && !rc)
            rc = fail("the daemon did not exit cleanly on SIGTERM (status %d)", r->daemon_exit);
    }
    for (int i = 0; i < b->n_data; i++)
        dec_data_free(&b->data[i]);
    ra_trace_close(b->trace);
    free(b);
    r->wall_s = now_s() - t0;
    if (!rc)
        progress(c, "done in %.1f s", r->wall_s);
    return rc;
}

void dec_run_free(dec_run *r)
{
    dec_series_free(&r->attend_us);
    dec_series_free(&r->token_us);
    dec_series_free(&r->rtt_us);
    dec_series_free(&r->append_us);
    dec_series_free(&r->server_us);
    dec_series_free(&r->work_us);
    dec_series_free(&r->task_max_us);
    dec_fid_free(&r->fid);
}
