/* ratd-lm-eval: the fidelity benchmark. Prefills a context of real text with the
 * reference decoder (full causal attention), then teacher-forces the next bytes with
 * each attention mode and reports what the mode costs in model quality: bits per byte,
 * the relative L2 error of every layer's attention output against full attention on
 * the same query, recall@k of ratd's retrieved keys against the exact top-k, the share
 * of offloaded keys read, and time per token. It is the end-to-end proof that ratd
 * preserves attention on a trained model (and the demo's engine).
 *
 * Modes: full (reference), window (first `sink` + last `window` positions, as
 * StreamingLLM and as the model's own window-only check), ratd (sink + window through
 * the gpu/ module's cache, the rest offloaded to a running ratd through libratd-client
 * and merged by log-sum-exp). All three share the decoder's numerics.
 *
 * --device cuda runs the same decoder on the GPU (gpu/ra_gpu_lm.h through ra_lm_gpu.h):
 * prefill and decode on the device; ratd mode keeps sink + window in a CUDA ra_gpu cache
 * on the decoder's stream, sends q to ratd asynchronously, computes the local part while
 * ratd answers, and merges on the device. The CPU path is unchanged. */
#define _GNU_SOURCE
#include <errno.h>
#include <math.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "ra_half.h"
#include "ra_lm.h"
#include "ra_lm_gpu.h"
#include "ra_log.h"
#include "ra_trace.h"
#include "ratd/client.h"
#include "ratd/gpu.h"

#define MAX_TEXT (256u << 20)
#define MAX_SWEEP 16

typedef enum { MODE_FULL = 0, MODE_WINDOW = 1, MODE_RATD = 2 } eval_mode;
static const char *const mode_names[] = {"full", "window", "ratd"};

typedef struct opts {
    const char *model, *text, *mode, *endpoint, *ratd_bin, *dump_trace;
    int set_index;              /* --index given */
    ra_client_index_kind index; /* the sessions' index kind */
    unsigned context, eval, offset, sink, window, repeat, n_train, effort;
    unsigned topk[MAX_SWEEP], n_topk;
    double adaptive;      /* > 0: per-head adaptive budget, tail-mass threshold */
    unsigned adaptive_max;
    double adaptive_q; /* quantile of the calibration queries' needs */
    unsigned adaptive_min;
    ra_dtype trace_dtype, kv_dtype;
    unsigned long seed;
    int json, quiet, wait_index_ms;
    int ratd_timeout_ms; /* bound of every ratd call; past it ratd counts as gone */
    unsigned gpu_knn; /* --device cuda, ratd mode: exact training lists of K from the GPU */
    int cpu_build;    /* --device cuda, ratd mode: ratd builds the graphs (else the GPU does) */
    int cuda; /* --device cuda */
} opts;

/* One span copied by --repeat: bytes [src, src+len) reappear at [dst, dst+len). */
typedef struct span {
    unsigned src, dst, len;
} span;

typedef struct result {
    eval_mode mode;
    unsigned topk;
    double nats, nats_rep;
    unsigned n, n_rep;
    double *rel_l2; /* [n_layers] sums */
    unsigned long n_rel;
    double recall_sum;
    unsigned long recall_n;
    double keys_read, keys_offloaded; /* summed per (step, layer, head) */
    double keys_perhead;              /* adaptive: keys a per-head budget would read */
    unsigned long attends;            /* Attend requests */
    int ratd_lost;                    /* ratd stopped answering: window-only from then on */
    unsigned lost_at;                 /* position of the step that found it gone */
    unsigned long window_only;        /* layer steps answered window-only after that */
    int adaptive;
    double seconds;
    unsigned steps;
} result;

/* State of one mode's decode run, seen by the attention hook. */
typedef struct run {
    const opts *o;
    eval_mode mode;
    unsigned topk;
    result *res;
    /* ratd mode */
    ra_gpu_cache *gc;
    ra_client *cl;
    uint64_t session;
    float *o_loc, *lse_loc, *o_rem, *lse_rem, *o_ref, *knew, *vnew, *sc;
    int64_t *tpos;
    float *tscores;
    int32_t *tcounts;
    int *mark;
    void *pack_k, *pack_v;
    int64_t *pack_pos;
    size_t pack_cap;
    double t_measure; /* seconds spent in measurement only (excluded from timing) */
    int adaptive;      /* this run uses the calibrated per-head budget */
    unsigned *k_layer; /* top_k per layer (adaptive: calibrated at prefill) */
    unsigned *k_head;  /* adaptive: the budget each query head alone would need */
    /* --device cuda: device buffers (d_*) and pinned host buffers (h_*) */
    ra_gpu_lm *g;
    ra_dtype gdt; /* the CUDA cache's dtype */
    float *d_ref, *d_oloc, *d_lseloc, *d_orem, *d_lserem, *d_sc;
    void *d_q16, *d_k16, *d_v16, *d_evk, *d_evv;
    float *h_q, *h_o, *h_ref, *h_orem, *h_lserem;
    void *h_evk, *h_evv;
    unsigned *ev_pending; /* per layer: evictions already sent to ratd, not yet released */
    ra_lm *lm_cpu;        /* config and scale */
    int32_t *knn_lists;   /* --gpu-knn: one layer's training lists, while it is offloaded */
    double knn_s;         /* --gpu-knn: time of the GPU kNN, all layers */
    int32_t *graph_adj, *graph_ent; /* GPU-built graphs of one layer, while it is offloaded */
    double graph_s;                 /* ra_gpu_graph_build, all layers */
    int graph_layers;               /* layers sent with a GPU-built graph */
} run;

static void die_usage(const char *msg)
{
    if (msg)
        fprintf(stderr, "ratd-lm-eval: %s\n", msg);
    fprintf(
        stderr,
        "usage: ratd-lm-eval --model DIR --text FILE --context C --eval E\n"
        "         [--mode full|window|ratd|all|LIST] [--offset O] [--sink 128] [--window 512]\n"
        "         [--topk K[,K2,...]] [--adaptive EPS [--adaptive-min 100]\n"
        "         [--adaptive-max 2000] [--adaptive-quantile 0.9]] [--repeat N] [--seed S]\n"
        "         [--endpoint ipc://...|tcp://...] [--ratd BIN] [--index "
        "graph|flat|ivf|hnsw|pscan]\n"
        "         [--kv-dtype f16|bf16|f32] [--n-train Q] [--effort E] [--wait-index MS]\n"
        "         [--dump-trace FILE [--trace-dtype f32|f16|bf16]] [--json] [--quiet]\n"
        "         [--device cpu|cuda] [--cpu-build] [--ratd-timeout-ms MS]\n"
        "  --ratd-timeout-ms MS: bound of every call to ratd (default 120000); a daemon that\n"
        "               does not answer within it (killed, restarted) is given up: the rest of\n"
        "               the run is window-only attention, with a warning (CPU decoder)\n"
        "  --index: the sessions' index (default pscan; with --device cuda, graph: built on\n"
        "               the GPU, or by ratd with --cpu-build)\n"
        "  --cpu-build: with --device cuda, ratd mode: ratd builds each head's graph on its\n"
        "               CPUs (default: the GPU builds it, ra_gpu_graph_build, and the\n"
        "               Offload carries it; a failed GPU build falls back to ratd's)\n"
        "  --gpu-knn K: with --device cuda --cpu-build --index graph, ratd mode: the exact top-K "
        "keys of every "
        "training\n"
        "               query come from the GPU (ra_gpu_knn) with the Offload, so ratd skips\n"
        "               its own kNN (default 100; 0: ratd computes them)\n"
        "  --wait-index MS: after Offload, wait up to MS for ratd's index builds before decoding\n"
        "                   (default 600000; 0: start at once, early steps use exact scans)\n");
    exit(2);
}

static unsigned parse_uint(const char *flag, const char *s, unsigned lo, unsigned hi)
{
    char *end;
    errno = 0;
    unsigned long v = strtoul(s, &end, 10);
    if (errno || end == s || *end || v < lo || v > hi || s[0] == '-') {
        fprintf(stderr, "ratd-lm-eval: %s must be an integer in [%u, %u], got '%s'\n", flag, lo, hi, s);
        exit(2);
    }
    return (unsigned)v;
}

static ra_dtype parse_dtype(const char *flag, const char *s)
{
    if (strcmp(s, "f32") == 0)
        return RA_DTYPE_F32;
    if (strcmp(s, "f16") == 0)
        return RA_DTYPE_F16;
    if (strcmp(s, "bf16") == 0)
        return RA_DTYPE_BF16;
    fprintf(stderr, "ratd-lm-eval: %s must be f32, f16 or bf16, got '%s'\n", flag, s);
    exit(2);
}

static void parse_args(int argc, char **argv, opts *o)
{
    memset(o, 0, sizeof *o);
    o->mode = "all";
    o->sink = 128;
    o->window = 512;
    o->topk[0] = 500;
    o->n_topk = 1;
    o->n_train = 4096;
    o->trace_dtype = RA_DTYPE_F32;
    o->kv_dtype = RA_DTYPE_F16;
    o->seed = 1;
    o->adaptive_max = 2000;
    o->adaptive_q = 0.9;
    o->adaptive_min = 100;
    o->wait_index_ms = 600000;
    o->ratd_timeout_ms = 120000;
    o->gpu_knn = 100;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        const char *v = i + 1 < argc ? argv[i + 1] : NULL;
#define ARG(name) (strcmp(a, name) == 0 && (v || (die_usage("missing value after " name), 0)) && ++i)
        if (strcmp(a, "--json") == 0)
            o->json = 1;
        else if (strcmp(a, "--quiet") == 0)
            o->quiet = 1;
        else if (strcmp(a, "-h") == 0 || strcmp(a, "--help") == 0)
            die_usage(NULL);
        else if (ARG("--model"))
            o->model = v;
        else if (ARG("--text"))
            o->text = v;
        else if (ARG("--mode"))
            o->mode = v;
        else if (!strcmp(a, "--cpu-build"))
            o->cpu_build = 1;
        else if (ARG("--gpu-knn"))
            o->gpu_knn = parse_uint(a, v, 0, 1024);
        else if (ARG("--device")) {
            if (strcmp(v, "cpu") && strcmp(v, "cuda"))
                die_usage("--device must be cpu or cuda");
            o->cuda = !strcmp(v, "cuda");
        }
        else if (ARG("--endpoint"))
            o->endpoint = v;
        else if (ARG("--ratd"))
            o->ratd_bin = v;
        else if (ARG("--dump-trace"))
            o->dump_trace = v;
        else if (ARG("--index")) {
            if (ra_client_index_kind_parse(v, &o->index) != RA_OK)
                die_usage("--index must be graph, flat, ivf, hnsw or pscan");
            o->set_index = 1;
        } else if (ARG("--context"))
            o->context = parse_uint(a, v, 1, 1u << 24);
        else if (ARG("--eval"))
            o->eval = parse_uint(a, v, 1, 1u << 24);
        else if (ARG("--offset"))
            o->offset = parse_uint(a, v, 0, MAX_TEXT);
        else if (ARG("--sink"))
            o->sink = parse_uint(a, v, 0, 1u << 20);
        else if (ARG("--window"))
            o->window = parse_uint(a, v, 1, 1u << 20);
        else if (ARG("--repeat"))
            o->repeat = parse_uint(a, v, 0, 64);
        else if (ARG("--n-train"))
            o->n_train = parse_uint(a, v, 0, 1u << 20);
        else if (ARG("--effort"))
            o->effort = parse_uint(a, v, 0, 1u << 20);
        else if (ARG("--seed"))
            o->seed = parse_uint(a, v, 0, 0xffffffffu);
        else if (ARG("--wait-index"))
            o->wait_index_ms = (int)parse_uint(a, v, 0, 600000);
        else if (ARG("--ratd-timeout-ms"))
            o->ratd_timeout_ms = (int)parse_uint(a, v, 100, 3600000);
        else if (ARG("--adaptive-quantile")) {
            char *end;
            o->adaptive_q = strtod(v, &end);
            if (*end || !(o->adaptive_q > 0 && o->adaptive_q <= 1))
                die_usage("--adaptive-quantile takes a value in (0, 1]");
        } else if (ARG("--adaptive-min")) {
            o->adaptive_min = parse_uint(a, v, 1, 1u << 20);
        } else if (ARG("--adaptive-max"))
            o->adaptive_max = parse_uint(a, v, 1, 1u << 20);
        else if (ARG("--trace-dtype"))
            o->trace_dtype = parse_dtype(a, v);
        else if (ARG("--kv-dtype"))
            o->kv_dtype = parse_dtype(a, v);
        else if (ARG("--adaptive")) {
            char *end;
            o->adaptive = strtod(v, &end);
            if (*end || !(o->adaptive > 0 && o->adaptive < 1))
                die_usage("--adaptive takes a tail-mass threshold in (0, 1), e.g. 0.01");
        } else if (ARG("--topk")) {
            o->n_topk = 0;
            char *dup = strdup(v), *save = NULL;
            for (char *t = strtok_r(dup, ",", &save); t; t = strtok_r(NULL, ",", &save)) {
                if (o->n_topk == MAX_SWEEP)
                    die_usage("--topk: at most 16 values");
                o->topk[o->n_topk++] = parse_uint("--topk", t, 0, 1u << 20);
            }
            free(dup);
            if (o->n_topk == 0)
                die_usage("--topk needs a value");
        } else {
            char buf[300];
            snprintf(buf, sizeof buf, "unknown argument '%s'", a);
            die_usage(buf);
        }
#undef ARG
    }
    if (!o->model || !o->text || !o->context || !o->eval)
        die_usage("--model, --text, --context and --eval are required");
    {
        /* a comma list of modes, or all */
        char *dup = strdup(o->mode), *save = NULL;
        for (char *t = strtok_r(dup, ",", &save); t; t = strtok_r(NULL, ",", &save))
            if (strcmp(t, "all") && strcmp(t, "full") && strcmp(t, "window") && strcmp(t, "ratd"))
                die_usage("--mode must be full, window, ratd, a comma list of them, or all");
        free(dup);
    }
    if (!o->set_index) /* pscan; with --device cuda, graph (GPU-built unless --cpu-build) */
        o->index = o->cuda ? RA_CLIENT_INDEX_GRAPH : RA_CLIENT_INDEX_PSCAN;
    if (o->cuda && o->adaptive > 0)
        die_usage("--adaptive calibrates on the CPU decoder's KV cache: not with --device cuda");
}

/* ------------------------------------------------------------------ text */

static int read_text(const opts *o, unsigned need, unsigned char **out)
{
    FILE *f = fopen(o->text, "rb");
    if (!f) {
        fprintf(stderr, "ratd-lm-eval: %s: cannot open: %s\n", o->text, strerror(errno));
        return -1;
    }
    struct stat sb;
    if (fstat(fileno(f), &sb) != 0 || !S_ISREG(sb.st_mode)) {
        fprintf(stderr, "ratd-lm-eval: %s: not a regular file\n", o->text);
        fclose(f);
        return -1;
    }
    if ((unsigned long long)sb.st_size < (unsigned long long)o->offset + need) {
        fprintf(stderr,
                "ratd-lm-eval: %s: text too short: %lld bytes, but offset %u + context %u + eval %u needs %llu\n",
                o->text, (long long)sb.st_size, o->offset, o->context, o->eval,
                (unsigned long long)o->offset + need);
        fclose(f);
        return -1;
    }
    unsigned char *b = malloc(need);
    if (!b || fseek(f, (long)o->offset, SEEK_SET) != 0 || fread(b, 1, need, f) != need) {
        fprintf(stderr, "ratd-lm-eval: %s: read error\n", o->text);
        free(b);
        fclose(f);
        return -1;
    }
    fclose(f);
    *out = b;
    return 0;
}

static uint64_t rng_next(uint64_t *s)
{
    /* splitmix64: a deterministic span layout from --seed */
    uint64_t z = (*s += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

/* --repeat N: N spans of 256..1024 bytes, each placed in its own slot of the evaluated
 * part [C, C+E), copied from a source at distance >= 4096 before it that lies in the
 * offloaded middle (after the sink), sources pairwise disjoint. */
static int make_repeats(const opts *o, unsigned char *text, span *sp)
{
    unsigned C = o->context, E = o->eval, N = o->repeat;
    unsigned slot = E / N;
    if (slot < 256 + 8) {
        fprintf(stderr, "ratd-lm-eval: --repeat %u: eval %u leaves %u bytes per span, need >= 264\n", N, E, slot);
        return -1;
    }
    unsigned len = slot - 8 < 1024 ? slot - 8 : 1024;
    uint64_t rs = o->seed * 0x2545f4914f6cdd1dull + 7;
    for (unsigned i = 0; i < N; i++) {
        unsigned dst = C + i * slot + 4 + (unsigned)(rng_next(&rs) % (slot - len - 7));
        if (dst < 4096 + len + o->sink) {
            fprintf(stderr, "ratd-lm-eval: --repeat: context %u too short for a source >= 4096 bytes back\n", C);
            return -1;
        }
        unsigned hi = dst - 4096 - len; /* last allowed source start */
        unsigned lo = o->sink;
        int ok = 0;
        for (int tries = 0; tries < 1000 && !ok; tries++) {
            unsigned src = lo + (unsigned)(rng_next(&rs) % (hi - lo + 1));
            ok = 1;
            for (unsigned j = 0; j < i; j++)
                if (src < sp[j].src + sp[j].len && sp[j].src < src + len)
                    ok = 0;
            if (ok)
                sp[i] = (span){src, dst, len};
        }
        if (!ok) {
            fprintf(stderr, "ratd-lm-eval: --repeat: no room for %u disjoint sources\n", N);
            return -1;
        }
        memcpy(text + dst, text + sp[i].src, len);
    }
    return 0;
}

/* ------------------------------------------------------------------ prefill capture */

typedef struct capture {
    const opts *o;
    const ra_lm_config *c;
    ra_trace_writer *tw;
    float *q_train;     /* [layer][n_heads][n_q][hd] */
    unsigned *q_pos;    /* sampled positions, increasing */
    unsigned n_q;
    float *row;         /* [row_cap][hd] scratch for the trace, grown to a pass's rows */
    unsigned row_cap;
    float *cal_q;       /* adaptive budget: [layer][n_heads][NCAL][hd] late prefill queries */
    unsigned cal_pos[64], n_cal;
} capture;

#define NCAL 32

static ra_status capture_fn(void *ctx, unsigned layer, unsigned pos0, unsigned rows, const float *q,
                            const float *k, const float *v)
{
    capture *cp = ctx;
    const ra_lm_config *c = cp->c;
    unsigned hd = c->head_dim, QD = c->n_heads * hd, KD = c->n_kv_heads * hd;
    if (cp->q_train) {
        /* positions are increasing: binary search the first one >= pos0 */
        unsigned lo = 0, hi = cp->n_q;
        while (lo < hi) {
            unsigned mid = (lo + hi) / 2;
            if (cp->q_pos[mid] < pos0)
                lo = mid + 1;
            else
                hi = mid;
        }
        for (unsigned i = lo; i < cp->n_q && cp->q_pos[i] < pos0 + rows; i++)
            for (unsigned h = 0; h < c->n_heads; h++)
                memcpy(cp->q_train + (((size_t)layer * c->n_heads + h) * cp->n_q + i) * hd,
                       q + (size_t)(cp->q_pos[i] - pos0) * QD + h * hd, hd * sizeof(float));
    }
    if (cp->cal_q) {
        for (unsigned i = 0; i < cp->n_cal; i++) {
            unsigned p = cp->cal_pos[i];
            if (p < pos0 || p >= pos0 + rows)
                continue;
            for (unsigned h = 0; h < c->n_heads; h++)
                memcpy(cp->cal_q + (((size_t)layer * c->n_heads + h) * NCAL + i) * hd,
                       q + (size_t)(p - pos0) * QD + h * hd, hd * sizeof(float));
        }
    }
    if (cp->tw) {
        /* a pass is 256 rows on the CPU and 4096 on the GPU (it overflowed a fixed
         * 256-row scratch there) */
        if (rows > cp->row_cap) {
            float *nr = realloc(cp->row, (size_t)rows * hd * sizeof(float));
            if (!nr)
                return RA_ENOMEM;
            cp->row = nr;
            cp->row_cap = rows;
        }
        for (unsigned t = 0; t < 3; t++) {
            unsigned nh = t == 0 ? c->n_heads : c->n_kv_heads, stride = t == 0 ? QD : KD;
            const float *src = t == 0 ? q : t == 1 ? k : v;
            for (unsigned h = 0; h < nh; h++) {
                for (unsigned r = 0; r < rows; r++)
                    memcpy(cp->row + (size_t)r * hd, src + (size_t)r * stride + h * hd, hd * sizeof(float));
                ra_status s = ra_trace_writer_put(cp->tw, (ra_trace_tensor)t, layer, h, pos0, rows, cp->row);
                if (s != RA_OK)
                    return s;
            }
        }
    }
    return RA_OK;
}

/* ------------------------------------------------------------------ attention hooks */

static double now_s(void)
{
    return ra_now_s();
}

static double rel_l2(const float *a, const float *ref, unsigned n)
{
    double num = 0, den = 0;
    for (unsigned i = 0; i < n; i++) {
        double d = (double)a[i] - ref[i];
        num += d * d;
        den += (double)ref[i] * ref[i];
    }
    return den > 0 ? sqrt(num / den) : sqrt(num);
}

/* full attention on the same q, for the error measure */
static void reference(ra_lm *lm, unsigned layer, unsigned pos, const float *q, float *o_ref)
{
    const ra_lm_config *c = ra_lm_get_config(lm);
    unsigned r[2] = {0, pos + 1};
    float lse;
    for (unsigned h = 0; h < c->n_heads; h++)
        ra_lm_attend_ranges(lm, layer, h, q + (size_t)h * c->head_dim, r, 1, o_ref + (size_t)h * c->head_dim, &lse);
}

static ra_status hook_window(void *ctx, ra_lm *lm, unsigned layer, unsigned pos, const float *q, float *o)
{
    run *R = ctx;
    const ra_lm_config *c = ra_lm_get_config(lm);
    unsigned hd = c->head_dim, sink = R->o->sink, win = R->o->window;
    /* key k visible iff k < sink or k > pos - window (the model card's definition) */
    unsigned a = sink < pos + 1 ? sink : pos + 1;
    unsigned b = pos + 1 > win ? pos + 1 - win : 0;
    if (b < a)
        b = a;
    unsigned r[4] = {0, a, b, pos + 1};
    float lse;
    for (unsigned h = 0; h < c->n_heads; h++)
        ra_lm_attend_ranges(lm, layer, h, q + (size_t)h * hd, r, 2, o + (size_t)h * hd, &lse);
    double t0 = now_s();
    reference(lm, layer, pos, q, R->o_ref);
    R->res->rel_l2[layer] += rel_l2(o, R->o_ref, c->n_heads * hd);
    if (layer == 0)
        R->res->n_rel++;
    R->t_measure += now_s() - t0;
    return RA_OK;
}

static ra_status hook_full(void *ctx, ra_lm *lm, unsigned layer, unsigned pos, const float *q, float *o)
{
    run *R = ctx;
    reference(lm, layer, pos, q, o);
    if (layer == 0)
        R->res->n_rel++;
    return RA_OK;
}

static void pack_convert(ra_dtype to, const float *src, void *dst, size_t i, size_t n)
{
    for (size_t j = 0; j < n; j++) {
        float x = src[j];
        if (to == RA_DTYPE_F32)
            ((float *)dst)[i + j] = x;
        else if (to == RA_DTYPE_F16)
            ((uint16_t *)dst)[i + j] = ra_f32_to_f16(x);
        else
            ((uint16_t *)dst)[i + j] = ra_f32_to_bf16(x);
    }
}

/* Packs a staged view (gpu cache dtype f32) into [n_kv][n][hd] of the session dtype. */
static ra_status pack_staged(run *R, const ra_gpu_staged *sv, ra_kv_batch *b)
{
    size_t n = sv->n_tokens, hd = sv->head_dim, nkv = sv->n_kv_heads;
    size_t need = nkv * n * hd;
    if (need > R->pack_cap) {
        size_t cap = need + need / 2 + 1024;
        void *k = realloc(R->pack_k, cap * 4), *v = k ? realloc(R->pack_v, cap * 4) : NULL;
        if (k)
            R->pack_k = k;
        if (v)
            R->pack_v = v;
        int64_t *p = v ? realloc(R->pack_pos, (cap / hd + 1) * sizeof *p) : NULL;
        if (!k || !v || !p)
            return RA_ENOMEM;
        R->pack_pos = p;
        R->pack_cap = cap;
    }
    for (size_t h = 0; h < nkv; h++) {
        const float *ks = (const float *)sv->k + h * sv->head_stride;
        const float *vs = (const float *)sv->v + h * sv->head_stride;
        pack_convert(R->o->kv_dtype, ks, R->pack_k, h * n * hd, n * hd);
        pack_convert(R->o->kv_dtype, vs, R->pack_v, h * n * hd, n * hd);
    }
    memcpy(R->pack_pos, sv->pos, n * sizeof(int64_t));
    memset(b, 0, sizeof *b);
    b->n_kv_heads = (int)nkv;
    b->head_dim = (int)hd;
    b->dtype = R->o->kv_dtype;
    b->n_tokens = n;
    b->k = R->pack_k;
    b->v = R->pack_v;
    b->pos = R->pack_pos;
    return RA_OK;
}

/* The k-th largest of a[0..n) (1 <= k <= n), by quickselect; reorders a. */
static float kth_largest(float *a, unsigned n, unsigned k)
{
    unsigned lo = 0, hi = n - 1, want = k - 1;
    while (lo < hi) {
        float pivot = a[lo + (hi - lo) / 2];
        unsigned i = lo, j = hi;
        while (i <= j) {
            while (a[i] > pivot)
                i++;
            while (a[j] < pivot)
                j--;
            if (i <= j) {
                float t = a[i];
                a[i] = a[j];
                a[j] = t;
                i++;
                if (j == 0)
                    break;
                j--;
            }
        }
        if (want <= j)
            hi = j;
        else if (want >= i)
            lo = i;
        else
            return a[want];
    }
    return a[want];
}

/* Recall of ratd's answer for query head h against the exact top-kk of the offloaded
 * keys [sink, off_end), whose scores are in R->sc: a retrieved key counts if it scores
 * at least the kk-th largest (ties count). R->tpos holds up to k positions per head. */
static void add_recall(run *R, unsigned h, unsigned k, unsigned kk, unsigned off_end)
{
    unsigned sink = R->o->sink, n_off = off_end - sink;
    float *cp = R->sc + n_off; /* k-th largest score by a partial sort of a copy */
    memcpy(cp, R->sc, n_off * sizeof(float));
    float kth = kth_largest(cp, n_off, kk);
    unsigned hit = 0, got = (unsigned)R->tcounts[h];
    for (unsigned i = 0; i < got && i < k; i++) {
        int64_t p = R->tpos[(size_t)h * k + i];
        if (p >= sink && p < off_end && R->sc[p - sink] >= kth)
            hit++;
    }
    R->res->recall_sum += (double)(hit > kk ? kk : hit) / kk;
    R->res->recall_n++;
    R->res->keys_offloaded += n_off;
}

/* A status that means the daemon is gone (killed, restarted, unreachable) rather than
 * that it refused the request. */
static int ratd_gone(ra_status s)
{
    return s == RA_ETIMEDOUT || s == RA_ECLOSED || s == RA_EIO;
}

/* From now on this run answers window-only (sink + window), said once, loudly. */
static void ratd_lose(run *R, const char *what, ra_status s, unsigned layer, unsigned pos)
{
    R->res->ratd_lost = 1;
    R->res->lost_at = pos;
    fprintf(stderr,
            "ratd-lm-eval: WARNING: ratd stopped answering (%s, layer %u, position %u: %s: %s); "
            "the rest of this run falls back to window-only attention (sink %u + window %u): "
            "its figures from here on are not ratd's\n",
            what, layer, pos, ra_strerror(s), ra_client_errmsg(R->cl), R->o->sink, R->o->window);
}

/* A step of a run whose daemon is gone: the local part (sink + window, computed before
 * the daemon was asked) is the answer, as in window mode; its error is still measured. */
static ra_status window_only_step(run *R, ra_lm *lm, unsigned layer, unsigned pos, const float *q, float *o)
{
    const ra_lm_config *c = ra_lm_get_config(lm);
    size_t n = (size_t)c->n_heads * c->head_dim;
    memcpy(o, R->o_loc, n * sizeof(float));
    R->res->window_only++;
    double t0 = now_s();
    reference(lm, layer, pos, q, R->o_ref);
    R->res->rel_l2[layer] += rel_l2(o, R->o_ref, (unsigned)n);
    if (layer == 0)
        R->res->n_rel++;
    R->t_measure += now_s() - t0;
    return RA_OK;
}

static ra_status hook_ratd(void *ctx, ra_lm *lm, unsigned layer, unsigned pos, const float *q, float *o)
{
    run *R = ctx;
    const ra_lm_config *c = ra_lm_get_config(lm);
    unsigned hd = c->head_dim, nh = c->n_heads, nkv = c->n_kv_heads, grp = nh / nkv;
    ra_status s;
    for (unsigned g = 0; g < nkv; g++) {
        memcpy(R->knew + g * hd, ra_lm_cache_k(lm, layer, g) + (size_t)pos * hd, hd * sizeof(float));
        memcpy(R->vnew + g * hd, ra_lm_cache_v(lm, layer, g) + (size_t)pos * hd, hd * sizeof(float));
    }
    /* local part first: it evicts the token leaving the window, which must reach ratd
     * before this step's Attend so that every token is on exactly one side */
    if ((s = ra_gpu_attend_local(R->gc, layer, RA_GPU_MEM_HOST, q, R->knew, R->vnew, R->o_loc, R->lse_loc)) !=
        RA_OK) {
        fprintf(stderr, "ratd-lm-eval: gpu attend_local: %s (%s)\n", ra_strerror(s), ra_gpu_cache_last_error(R->gc));
        return s;
    }
    ra_gpu_staged sv;
    if ((s = ra_gpu_cache_evicted_view(R->gc, layer, &sv)) != RA_OK)
        return s;
    if (sv.n_tokens > 0) {
        ra_kv_batch b;
        if ((s = pack_staged(R, &sv, &b)) != RA_OK)
            return s;
        if (!R->res->ratd_lost && (s = ra_client_append(R->cl, R->session, (int)layer, &b)) != RA_OK) {
            if (!ratd_gone(s)) {
                fprintf(stderr, "ratd-lm-eval: append: %s (%s)\n", ra_strerror(s), ra_client_errmsg(R->cl));
                return s;
            }
            ratd_lose(R, "append", s, layer, pos);
        }
        /* without a daemon the evicted tokens are simply dropped, as window mode does */
        if ((s = ra_gpu_cache_evicted_release(R->gc, layer)) != RA_OK)
            return s;
    }
    if (R->res->ratd_lost)
        return window_only_step(R, lm, layer, pos, q, o);
    unsigned off_end = pos + 1 > R->o->window ? pos + 1 - R->o->window : 0; /* offloaded: [sink, off_end) */
    unsigned n_off = off_end > R->o->sink ? off_end - R->o->sink : 0;
    unsigned k = R->adaptive ? R->k_layer[layer] : R->topk;
    if (n_off == 0) {
        memcpy(o, R->o_loc, (size_t)nh * hd * sizeof(float));
    } else {
        /* adaptive: each query head asks for its own budget; rows keep width k */
        int32_t kb[nh];
        for (unsigned h = 0; h < nh; h++)
            kb[h] = (int32_t)(R->adaptive && R->k_head ? R->k_head[layer * nh + h] : k);
        ra_attend_req rq = {.n_q_heads = (int)nh, .head_dim = (int)hd, .q = q, .top_k = (int)k,
                            .effort = (int)R->o->effort, .scale = ra_lm_scale(lm), .want_topk = 1,
                            .top_k_per_head = kb};
        ra_attend_out ao = {.o = R->o_rem, .lse = R->lse_rem, .pos = R->tpos, .scores = R->tscores,
                            .counts = R->tcounts};
        if ((s = ra_client_attend(R->cl, R->session, (int)layer, &rq, &ao)) != RA_OK) {
            if (!ratd_gone(s)) {
                fprintf(stderr, "ratd-lm-eval: attend: %s (%s)\n", ra_strerror(s), ra_client_errmsg(R->cl));
                return s;
            }
            ratd_lose(R, "attend", s, layer, pos);
            return window_only_step(R, lm, layer, pos, q, o);
        }
        R->res->attends++;
        for (unsigned h = 0; h < nh; h++) {
            R->res->keys_read += (unsigned)R->tcounts[h];
            if (R->k_head) {
                unsigned kh = R->k_head[layer * nh + h];
                R->res->keys_perhead += kh < n_off ? kh : n_off;
            }
        }
        if ((s = ra_gpu_merge(R->gc, RA_GPU_MEM_HOST, R->o_loc, R->lse_loc, R->o_rem, RA_DTYPE_F32, R->lse_rem, o,
                              RA_DTYPE_F32, NULL)) != RA_OK)
            return s;
    }
    /* measurement: error against full attention, recall against the exact top-k of the
     * offloaded keys */
    double t0 = now_s();
    reference(lm, layer, pos, q, R->o_ref);
    R->res->rel_l2[layer] += rel_l2(o, R->o_ref, nh * hd);
    if (layer == 0)
        R->res->n_rel++;
    if (n_off > 0) {
        for (unsigned h = 0; h < nh; h++) {
            unsigned kh = R->adaptive && R->k_head ? R->k_head[layer * nh + h] : k;
            unsigned kk = kh < n_off ? kh : n_off; /* recall against this head's own budget */
            ra_lm_scores(lm, layer, h / grp, q + (size_t)h * hd, R->o->sink, off_end, R->sc);
            add_recall(R, h, k, kk, off_end);
        }
    }
    R->t_measure += now_s() - t0;
    return RA_OK;
}

/* ------------------------------------------------------------------ daemon and session */

static pid_t g_child = -1;

static void stop_child(void)
{
    if (g_child > 0) {
        kill(g_child, SIGTERM);
        int st;
        for (int i = 0; i < 50; i++) {
            if (waitpid(g_child, &st, WNOHANG) == g_child) {
                g_child = -1;
                return;
            }
            usleep(100000);
        }
        kill(g_child, SIGKILL);
        waitpid(g_child, &st, 0);
        g_child = -1;
    }
}

/* --ratd BIN: starts a private daemon on a fresh ipc:// endpoint, stopped at exit. */
static int spawn_daemon(const char *bin, char *ep, size_t eplen)
{
    snprintf(ep, eplen, "ipc:///tmp/ratd-lm-eval.%d.sock", (int)getpid());
    pid_t p = fork();
    if (p < 0) {
        fprintf(stderr, "ratd-lm-eval: fork: %s\n", strerror(errno));
        return -1;
    }
    if (p == 0) {
        execl(bin, bin, "--endpoint", ep, "--log-level", "warn", (char *)NULL);
        fprintf(stderr, "ratd-lm-eval: cannot run %s: %s\n", bin, strerror(errno));
        _exit(127);
    }
    g_child = p;
    atexit(stop_child);
    return 0;
}

static ra_status connect_daemon(const opts *o, const char *ep, ra_client **out)
{
    ra_client *cl = NULL;
    ra_client_opts co;
    ra_client_opts_default(&co);
    co.timeout_ms = o->ratd_timeout_ms;
    ra_status s = ra_client_open(&cl, ep, &co);
    if (s != RA_OK) {
        fprintf(stderr, "ratd-lm-eval: cannot open %s: %s\n", ep, ra_strerror(s));
        return s;
    }
    /* a freshly spawned daemon needs a moment to bind: short hellos until it answers */
    ra_client_set_timeout(cl, 500);
    ra_server_info info;
    for (int i = 0; i < 40; i++) {
        s = ra_client_hello(cl, &info);
        if (s == RA_OK)
            break;
        int st;
        if (g_child > 0 && waitpid(g_child, &st, WNOHANG) == g_child) {
            g_child = -1;
            fprintf(stderr, "ratd-lm-eval: the daemon exited at start-up\n");
            s = RA_ECLOSED;
            break;
        }
        ra_client_close(cl);
        cl = NULL;
        if ((s = ra_client_open(&cl, ep, &co)) != RA_OK)
            break;
        ra_client_set_timeout(cl, 500);
    }
    if (s != RA_OK) {
        fprintf(stderr, "ratd-lm-eval: no daemon answers at %s: %s (%s)\n", ep, ra_strerror(s),
                cl ? ra_client_errmsg(cl) : "");
        ra_client_close(cl);
        return s;
    }
    ra_client_set_timeout(cl, co.timeout_ms);
    if (!o->quiet)
        fprintf(stderr, "ratd-lm-eval: ratd %s at %s, %u workers, protocol %u\n", info.server_version, ep,
                info.workers, info.protocol_version);
    *out = cl;
    return RA_OK;
}

/* ------------------------------------------------------------------ one mode */

typedef struct shared {
    const opts *o;
    ra_lm *lm;
    const ra_lm_config *c;
    const int *tok;      /* C + E tokens */
    const float *logits0; /* after the prefill */
    const unsigned char *is_rep; /* [E]: prediction i falls in a repeated span */
    capture *cap;
    const char *endpoint;
    ra_gpu_lm *g; /* --device cuda */
} shared;

static void free_run(run *R)
{
    if (R->cl && R->session && !(R->res && R->res->ratd_lost)) /* a gone daemon: no Drop */
        ra_client_session_drop(R->cl, R->session);
    ra_client_close(R->cl);
    ra_gpu_cache_destroy(R->gc);
    free(R->o_loc);
    free(R->lse_loc);
    free(R->o_rem);
    free(R->lse_rem);
    free(R->o_ref);
    free(R->knew);
    free(R->vnew);
    free(R->sc);
    free(R->tpos);
    free(R->tscores);
    free(R->tcounts);
    free(R->pack_k);
    free(R->pack_v);
    free(R->pack_pos);
    free(R->k_layer);
    free(R->k_head);
}

static int cmp_desc(const void *a, const void *b)
{
    float x = *(const float *)a, y = *(const float *)b;
    return x < y ? 1 : x > y ? -1 : 0;
}

/* --adaptive EPS: a per-head budget calibrated on the decoder's own prefill, where
 * full attention is computed anyway. For late prefill queries (the last 256 positions,
 * stride 8) it finds how many of the keys that would be offloaded at that position must
 * be read, best first, for the rest to hold less than EPS of the head's attention; the
 * head's budget is the --adaptive-quantile (0.9) of those needs, clamped to
 * [--adaptive-min, --adaptive-max]. It runs after the fixed --topk budgets.
 * Heads that only look locally get the floor. Each query head's Attend budget is its
 * own (top_k_per_head); k_layer, the largest budget of a layer, is the row width. */
static ra_status calibrate_budget(shared *S, run *R)
{
    const ra_lm_config *c = S->c;
    const opts *o = S->o;
    unsigned nh = c->n_heads, hd = c->head_dim, grp = nh / c->n_kv_heads;
    capture *cp = S->cap;
    R->k_head = calloc((size_t)c->n_layers * nh, sizeof(unsigned));
    if (!R->k_head)
        return RA_ENOMEM;
    for (unsigned l = 0; l < c->n_layers; l++) {
        unsigned kl = R->topk;
        for (unsigned h = 0; h < nh; h++) {
            unsigned needs[NCAL], n_need = 0;
            for (unsigned i = 0; i < cp->n_cal; i++) {
                unsigned p = cp->cal_pos[i];
                if (p + 1 <= o->window + o->sink)
                    continue;
                unsigned off_end = p + 1 - o->window, n_off = off_end - o->sink;
                const float *q = cp->cal_q + (((size_t)l * nh + h) * NCAL + i) * hd;
                ra_lm_scores(S->lm, l, h / grp, q, 0, p + 1, R->sc);
                double m = -INFINITY, z = 0, off = 0;
                for (unsigned j = 0; j <= p; j++)
                    m = R->sc[j] > m ? R->sc[j] : m;
                for (unsigned j = 0; j <= p; j++)
                    z += exp(R->sc[j] - m);
                float *so = R->sc + o->sink;
                for (unsigned j = 0; j < n_off; j++)
                    off += exp(so[j] - m);
                qsort(so, n_off, sizeof(float), cmp_desc);
                unsigned need = 0;
                double omitted = off;
                while (need < n_off && omitted / z >= o->adaptive)
                    omitted -= exp(so[need++] - m);
                needs[n_need++] = need;
            }
            /* a high quantile over the calibration queries, not the max: one query
             * with diffuse attention should not set the budget of all steps */
            unsigned need_max = 0;
            if (n_need > 0) {
                for (unsigned a = 1; a < n_need; a++)
                    for (unsigned b = a; b > 0 && needs[b - 1] > needs[b]; b--) {
                        unsigned t = needs[b];
                        needs[b] = needs[b - 1];
                        needs[b - 1] = t;
                    }
                unsigned qi = (unsigned)ceil(o->adaptive_q * n_need) - 1;
                need_max = needs[qi < n_need ? qi : n_need - 1];
            }
            unsigned kh = need_max < R->topk ? R->topk : need_max;
            kh = kh > o->adaptive_max ? o->adaptive_max : kh;
            R->k_head[l * nh + h] = kh;
            kl = kh > kl ? kh : kl;
        }
        R->k_layer[l] = kl;
        if (!o->quiet) {
            fprintf(stderr, "ratd-lm-eval: adaptive %g: layer %u top_k %u (heads:", o->adaptive, l, kl);
            for (unsigned h = 0; h < nh; h++)
                fprintf(stderr, " %u", R->k_head[l * nh + h]);
            fprintf(stderr, ")\n");
        }
    }
    return RA_OK;
}

/* Connects to ratd and creates the session of the model's shape (both devices). */
static ra_status open_session(shared *S, run *R)
{
    const ra_lm_config *c = S->c;
    const opts *o = S->o;
    ra_status s;
    if ((s = connect_daemon(o, S->endpoint, &R->cl)) != RA_OK)
        return s;
    ra_session_desc d;
    ra_session_desc_init(&d);
    d.n_layers = (int)c->n_layers;
    d.n_q_heads = (int)c->n_heads;
    d.n_kv_heads = (int)c->n_kv_heads;
    d.head_dim = (int)c->head_dim;
    d.dtype = o->kv_dtype;
    d.index.kind = o->index;
    d.index.seed = o->seed;
    if ((s = ra_client_session_create(R->cl, &d, &R->session)) != RA_OK)
        fprintf(stderr, "ratd-lm-eval: session: %s (%s)\n", ra_strerror(s), ra_client_errmsg(R->cl));
    return s;
}

/* Sets up ratd mode after the prefill: the gpu/ cache takes sink + window of every
 * layer, the middle goes to the daemon by Offload with the sampled prefill queries. */
static ra_status setup_ratd(shared *S, run *R)
{
    const ra_lm_config *c = S->c;
    const opts *o = S->o;
    unsigned C = o->context, hd = c->head_dim, nkv = c->n_kv_heads;
    ra_status s;
    ra_gpu_config gcfg;
    ra_gpu_config_init(&gcfg);
    gcfg.n_layers = c->n_layers;
    gcfg.n_q_heads = c->n_heads;
    gcfg.n_kv_heads = nkv;
    gcfg.head_dim = hd;
    gcfg.dtype = RA_DTYPE_F32; /* the CPU backend keeps the local part exact */
    gcfg.sink = o->sink;
    gcfg.window = o->window;
    gcfg.batch = 1;
    gcfg.backend = RA_GPU_BACKEND_CPU;
    gcfg.evict_capacity = 64;
    if ((s = ra_gpu_cache_create(&gcfg, &R->gc)) != RA_OK) {
        fprintf(stderr, "ratd-lm-eval: gpu cache: %s\n", ra_strerror(s));
        return s;
    }
    if ((s = open_session(S, R)) != RA_OK)
        return s;
    float *kv = malloc((size_t)C * nkv * hd * 2 * sizeof(float));
    if (!kv)
        return RA_ENOMEM;
    float *vv = kv + (size_t)C * nkv * hd;
    for (unsigned l = 0; l < c->n_layers && s == RA_OK; l++) {
        /* [1][C][nkv][hd], as a projection writes them */
        for (unsigned g = 0; g < nkv; g++) {
            const float *K = ra_lm_cache_k(S->lm, l, g), *V = ra_lm_cache_v(S->lm, l, g);
            for (unsigned p = 0; p < C; p++) {
                memcpy(kv + ((size_t)p * nkv + g) * hd, K + (size_t)p * hd, hd * sizeof(float));
                memcpy(vv + ((size_t)p * nkv + g) * hd, V + (size_t)p * hd, hd * sizeof(float));
            }
        }
        if ((s = ra_gpu_ingest_prefill(R->gc, l, RA_GPU_MEM_HOST, kv, vv, C)) != RA_OK)
            break;
        ra_gpu_staged sv;
        if ((s = ra_gpu_cache_offload_view(R->gc, l, &sv)) != RA_OK)
            break;
        if (sv.n_tokens > 0) {
            ra_kv_batch b;
            if ((s = pack_staged(R, &sv, &b)) != RA_OK)
                break;
            if (S->cap->q_train && S->cap->n_q > 0) {
                b.n_q_heads = (int)c->n_heads;
                b.n_queries = S->cap->n_q;
                b.q_train = S->cap->q_train + (size_t)l * c->n_heads * S->cap->n_q * hd;
            }
            if (!R->res->ratd_lost && (s = ra_client_offload(R->cl, R->session, (int)l, &b)) != RA_OK) {
                if (!ratd_gone(s)) {
                    fprintf(stderr, "ratd-lm-eval: offload layer %u: %s (%s)\n", l, ra_strerror(s),
                            ra_client_errmsg(R->cl));
                    break;
                }
                ratd_lose(R, "offload", s, l, C);
                s = RA_OK;
            }
        }
        s = ra_gpu_cache_offload_release(R->gc, l);
    }
    free(kv);
    ra_gpu_cache_trim(R->gc);
    /* measure the built index, not the exact scan that answers while builds run */
    if (s == RA_OK && o->wait_index_ms > 0 && !R->res->ratd_lost &&
        (s = ra_client_wait_ready(R->cl, R->session, o->wait_index_ms)) != RA_OK) {
        fprintf(stderr, "ratd-lm-eval: waiting for the index builds: %s (%s)\n", ra_strerror(s),
                ra_client_errmsg(R->cl));
        if (ratd_gone(s) && !strstr(ra_client_errmsg(R->cl), "still running")) {
            ratd_lose(R, "wait for the index builds", s, 0, C);
            s = RA_OK;
        }
    }
    return s;
}

/* Adds the prediction of evaluated byte i (negative log-likelihood in nats) to res,
 * and to the repeated-span figures when byte i lies in a --repeat span. */
static void account(result *res, const shared *S, unsigned i, double nll)
{
    res->nats += nll;
    res->n++;
    if (S->is_rep[i]) {
        res->nats_rep += nll;
        res->n_rep++;
    }
}

static ra_status run_mode(shared *S, eval_mode mode, unsigned topk, int adaptive, result *res)
{
    const opts *o = S->o;
    const ra_lm_config *c = S->c;
    unsigned C = o->context, E = o->eval, nh = c->n_heads, hd = c->head_dim;
    unsigned max_ctx = ra_lm_max_ctx(S->lm);
    run R = {.o = o, .mode = mode, .topk = topk, .res = res, .adaptive = adaptive};
    ra_status s = RA_ENOMEM;
    float *logits = malloc(c->vocab * sizeof(float));
    memset(res, 0, sizeof *res);
    res->mode = mode;
    res->topk = topk;
    res->adaptive = adaptive;
    res->rel_l2 = calloc(c->n_layers, sizeof(double));
    R.o_loc = malloc((size_t)nh * hd * sizeof(float));
    R.lse_loc = malloc(nh * sizeof(float));
    R.o_rem = malloc((size_t)nh * hd * sizeof(float));
    R.lse_rem = malloc(nh * sizeof(float));
    R.o_ref = malloc((size_t)nh * hd * sizeof(float));
    R.knew = malloc((size_t)c->n_kv_heads * hd * sizeof(float));
    R.vnew = malloc((size_t)c->n_kv_heads * hd * sizeof(float));
    R.sc = malloc((size_t)2 * max_ctx * sizeof(float));
    unsigned kcap = adaptive && o->adaptive_max > topk ? o->adaptive_max : topk;
    R.tpos = malloc((size_t)nh * kcap * sizeof(int64_t));
    R.tscores = malloc((size_t)nh * kcap * sizeof(float));
    R.k_layer = malloc(c->n_layers * sizeof(unsigned));
    for (unsigned l = 0; R.k_layer && l < c->n_layers; l++)
        R.k_layer[l] = topk;
    R.tcounts = malloc(nh * sizeof(int32_t));
    if (!logits || !res->rel_l2 || !R.o_loc || !R.lse_loc || !R.o_rem || !R.lse_rem || !R.o_ref || !R.knew ||
        !R.vnew || !R.sc || !R.tpos || !R.tscores || !R.tcounts || !R.k_layer)
        goto out;
    if ((s = ra_lm_rewind(S->lm, C)) != RA_OK)
        goto out;
    if (mode == MODE_RATD && adaptive && (s = calibrate_budget(S, &R)) != RA_OK)
        goto out;
    if (mode == MODE_RATD && (s = setup_ratd(S, &R)) != RA_OK)
        goto out;
    ra_lm_attn_fn fn = mode == MODE_FULL ? hook_full : mode == MODE_WINDOW ? hook_window : hook_ratd;
    /* prediction 0 (byte C) comes from the prefill, identical in every mode */
    double nll = -ra_lm_logprob(S->logits0, c->vocab, S->tok[C]);
    account(res, S, 0, nll);
    if (!o->quiet)
        RA_INFO("ratd-lm-eval: %s%s: decoding starts", mode_names[mode], adaptive ? " (adaptive)" : "");
    double t0 = now_s();
    for (unsigned i = 1; i < E; i++) {
        if ((s = ra_lm_decode(S->lm, S->tok[C + i - 1], logits, fn, &R)) != RA_OK) {
            if (s == RA_EINVAL)
                fprintf(stderr, "ratd-lm-eval: decode step %u failed: %s\n", i, ra_strerror(s));
            goto out;
        }
        nll = -ra_lm_logprob(logits, c->vocab, S->tok[C + i]);
        account(res, S, i, nll);
        res->steps++;
        if (!o->quiet && i % 128 == 0)
            fprintf(stderr, "ratd-lm-eval: %s%s%.0u: %u/%u tokens, bpb so far %.4f\n", mode_names[mode],
                    mode == MODE_RATD ? " k=" : "", mode == MODE_RATD ? topk : 0, i, E,
                    res->nats / res->n / M_LN2);
    }
    res->seconds = now_s() - t0 - R.t_measure;
    s = RA_OK;
out:
    free_run(&R);
    free(logits);
    return s;
}

/* ------------------------------------------------------------------ --device cuda */

/* prefill capture on the device: the chunk's q, k, v come to the host for capture_fn
 * (trace, training and calibration queries), which then works as on the CPU path */
typedef struct gcapture {
    capture *cap;
    float *q, *k, *v; /* host, one chunk */
    size_t rows_cap;
} gcapture;

static ra_status gcapture_fn(void *ctx, ra_gpu_lm *g, unsigned layer, unsigned pos0, unsigned rows, const float *q_dev,
                             const float *k_dev, const float *v_dev)
{
    gcapture *gc = ctx;
    const ra_lm_config *c = gc->cap->c;
    size_t QD = (size_t)c->n_heads * c->head_dim, KD = (size_t)c->n_kv_heads * c->head_dim;
    if (rows > gc->rows_cap) {
        free(gc->q);
        free(gc->k);
        free(gc->v);
        gc->q = malloc(rows * QD * sizeof(float));
        gc->k = malloc(rows * KD * sizeof(float));
        gc->v = malloc(rows * KD * sizeof(float));
        gc->rows_cap = gc->q && gc->k && gc->v ? rows : 0;
        if (!gc->rows_cap)
            return RA_ENOMEM;
    }
    ra_status s;
    if ((s = ra_gpu_lm_copy(g, gc->q, q_dev, rows * QD * sizeof(float), 0)) != RA_OK ||
        (s = ra_gpu_lm_copy(g, gc->k, k_dev, rows * KD * sizeof(float), 0)) != RA_OK ||
        (s = ra_gpu_lm_copy(g, gc->v, v_dev, rows * KD * sizeof(float), 0)) != RA_OK)
        return s;
    return capture_fn(gc->cap, layer, pos0, rows, gc->q, gc->k, gc->v);
}

static ra_status gpu_err(run *R, ra_status s, const char *what)
{
    fprintf(stderr, "ratd-lm-eval: %s: %s (%s)\n", what, ra_strerror(s),
            R->gc && ra_gpu_cache_last_error(R->gc)[0] ? ra_gpu_cache_last_error(R->gc) : ra_gpu_lm_last_error(R->g));
    return s;
}

/* error of o_dev against full attention on the same q (measurement only: the stream is
 * drained first so the mode's own work is not billed to the measurement) */
static ra_status gpu_measure_rel(run *R, unsigned layer, unsigned pos, const float *q_dev, const float *o_dev,
                                 double *t0)
{
    const ra_lm_config *c = ra_lm_get_config(R->lm_cpu);
    unsigned n = c->n_heads * c->head_dim, r[2] = {0, pos + 1};
    ra_status s;
    if ((s = ra_gpu_lm_sync(R->g)) != RA_OK)
        return s;
    *t0 = now_s();
    if ((s = ra_gpu_lm_attend_ranges(R->g, layer, q_dev, r, 1, R->d_ref, NULL)) != RA_OK ||
        (s = ra_gpu_lm_copy(R->g, R->h_o, o_dev, n * sizeof(float), 1)) != RA_OK ||
        (s = ra_gpu_lm_copy(R->g, R->h_ref, R->d_ref, n * sizeof(float), 0)) != RA_OK)
        return s;
    R->res->rel_l2[layer] += rel_l2(R->h_o, R->h_ref, n);
    if (layer == 0)
        R->res->n_rel++;
    return RA_OK;
}

static ra_status ghook_full(void *ctx, ra_gpu_lm *g, unsigned layer, unsigned pos, const float *q_dev, float *o_dev)
{
    run *R = ctx;
    unsigned r[2] = {0, pos + 1};
    if (layer == 0)
        R->res->n_rel++;
    return ra_gpu_lm_attend_ranges(g, layer, q_dev, r, 1, o_dev, NULL);
}

static ra_status ghook_window(void *ctx, ra_gpu_lm *g, unsigned layer, unsigned pos, const float *q_dev,
                              float *o_dev)
{
    run *R = ctx;
    unsigned sink = R->o->sink, win = R->o->window;
    unsigned a = sink < pos + 1 ? sink : pos + 1;
    unsigned b = pos + 1 > win ? pos + 1 - win : 0;
    if (b < a)
        b = a;
    unsigned r[4] = {0, a, b, pos + 1};
    ra_status s = ra_gpu_lm_attend_ranges(g, layer, q_dev, r, 2, o_dev, NULL);
    double t0 = now_s();
    if (s == RA_OK)
        s = gpu_measure_rel(R, layer, pos, q_dev, o_dev, &t0);
    R->t_measure += now_s() - t0;
    return s;
}

/* Packs a staged view of any cache dtype into the session's dtype; a view already in
 * it is handed over as it is (batch 1: [n_kv][n][hd] contiguous). */
static ra_status pack_staged_any(run *R, const ra_gpu_staged *sv, ra_kv_batch *b)
{
    size_t n = sv->n_tokens, hd = sv->head_dim, nkv = sv->n_kv_heads;
    if (sv->dtype == R->o->kv_dtype) {
        memset(b, 0, sizeof *b);
        b->n_kv_heads = (int)nkv;
        b->head_dim = (int)hd;
        b->dtype = sv->dtype;
        b->n_tokens = n;
        b->k = sv->k;
        b->v = sv->v;
        b->pos = sv->pos;
        return RA_OK;
    }
    float *tmp = malloc(2 * nkv * n * hd * sizeof(float));
    if (!tmp)
        return RA_ENOMEM;
    for (size_t i = 0; i < nkv * n * hd; i++) {
        uint16_t kk = ((const uint16_t *)sv->k)[i], vv = ((const uint16_t *)sv->v)[i];
        tmp[i] = sv->dtype == RA_DTYPE_F16 ? ra_f16_to_f32(kk) : ra_bf16_to_f32(kk);
        tmp[nkv * n * hd + i] = sv->dtype == RA_DTYPE_F16 ? ra_f16_to_f32(vv) : ra_bf16_to_f32(vv);
    }
    ra_gpu_staged f = *sv;
    f.dtype = RA_DTYPE_F32;
    f.k = tmp;
    f.v = tmp + nkv * n * hd;
    ra_status s = pack_staged(R, &f, b);
    free(tmp);
    return s;
}

/* The tokens a layer's window evicted were sent to ratd before the step that evicted
 * them (from the decoder's own KV cache, so Attend could go out before the local part
 * ran); every 32 steps the cache's eviction stage is checked against them and released. */
static ra_status drain_evicted(run *R, unsigned layer, unsigned last_pos)
{
    ra_gpu_staged sv;
    ra_status s = ra_gpu_cache_evicted_view(R->gc, layer, &sv);
    if (s != RA_OK)
        return gpu_err(R, s, "evicted_view");
    if (sv.n_tokens != R->ev_pending[layer] || (sv.n_tokens && sv.pos[sv.n_tokens - 1] != (int64_t)last_pos)) {
        fprintf(stderr, "ratd-lm-eval: layer %u: the cache evicted %u tokens (last %lld), %u were sent (last %u)\n",
                layer, sv.n_tokens, sv.n_tokens ? (long long)sv.pos[sv.n_tokens - 1] : -1LL, R->ev_pending[layer],
                last_pos);
        return RA_ESTATE;
    }
    R->ev_pending[layer] = 0;
    if ((s = ra_gpu_cache_evicted_release(R->gc, layer)) != RA_OK)
        return gpu_err(R, s, "evicted_release");
    return RA_OK;
}

static ra_status ghook_ratd(void *ctx, ra_gpu_lm *g, unsigned layer, unsigned pos, const float *q_dev, float *o_dev)
{
    run *R = ctx;
    const ra_lm_config *c = ra_lm_get_config(R->lm_cpu);
    unsigned hd = c->head_dim, nh = c->n_heads, nkv = c->n_kv_heads, sink = R->o->sink, win = R->o->window;
    ra_status s;
    /* the token this step evicts from the window (pos - window once it is full) goes to
     * ratd first, so that it is on ratd's side when Attend is answered */
    int evict = pos >= sink + win;
    unsigned ev_pos = evict ? pos - win : 0;
    if ((s = ra_gpu_lm_kv_export(g, layer, pos, 1, R->gdt, R->d_k16, R->d_v16)) != RA_OK ||
        (s = ra_gpu_lm_convert(g, q_dev, R->gdt, R->d_q16, (size_t)nh * hd)) != RA_OK ||
        (evict && (s = ra_gpu_lm_kv_export(g, layer, ev_pos, 1, R->o->kv_dtype, R->d_evk, R->d_evv)) != RA_OK))
        return gpu_err(R, s, "prepare step");
    size_t kvb = (size_t)nkv * hd * (R->o->kv_dtype == RA_DTYPE_F32 ? 4 : 2);
    if ((evict && ((s = ra_gpu_lm_copy(g, R->h_evk, R->d_evk, kvb, 1)) != RA_OK ||
                   (s = ra_gpu_lm_copy(g, R->h_evv, R->d_evv, kvb, 1)) != RA_OK)) ||
        (s = ra_gpu_lm_copy(g, R->h_q, q_dev, (size_t)nh * hd * sizeof(float), 0)) != RA_OK)
        return gpu_err(R, s, "q to the host");
    if (evict) {
        int64_t p64 = ev_pos;
        ra_kv_batch b = {.n_kv_heads = (int)nkv, .head_dim = (int)hd, .dtype = R->o->kv_dtype, .n_tokens = 1,
                         .k = R->h_evk, .v = R->h_evv, .pos = &p64};
        /* ra_kv_batch wants [n_kv][n][hd]: with n = 1 that is the export's [1][n_kv][hd] */
        if ((s = ra_client_append(R->cl, R->session, (int)layer, &b)) != RA_OK) {
            fprintf(stderr, "ratd-lm-eval: append: %s (%s)\n", ra_strerror(s), ra_client_errmsg(R->cl));
            return s;
        }
    }
    unsigned off_end = pos + 1 > win ? pos + 1 - win : 0;
    unsigned n_off = off_end > sink ? off_end - sink : 0;
    unsigned k = R->topk;
    ra_attend_req rq = {.n_q_heads = (int)nh, .head_dim = (int)hd, .q = R->h_q, .top_k = (int)k,
                        .effort = (int)R->o->effort, .scale = ra_lm_scale(R->lm_cpu), .want_topk = 1};
    ra_ticket t = 0;
    if (n_off > 0 && (s = ra_client_attend_send(R->cl, R->session, (int)layer, &rq, &t)) != RA_OK) {
        fprintf(stderr, "ratd-lm-eval: attend: %s (%s)\n", ra_strerror(s), ra_client_errmsg(R->cl));
        return s;
    }
    /* the local part runs on the device while ratd answers */
    if ((s = ra_gpu_attend_local(R->gc, layer, RA_GPU_MEM_DEVICE, R->d_q16, R->d_k16, R->d_v16, R->d_oloc,
                                 R->d_lseloc)) != RA_OK) {
        if (n_off > 0)
            ra_client_attend_cancel(R->cl, t);
        return gpu_err(R, s, "gpu attend_local");
    }
    if (evict && ++R->ev_pending[layer] >= 32 && (s = drain_evicted(R, layer, ev_pos)) != RA_OK) {
        if (n_off > 0)
            ra_client_attend_cancel(R->cl, t);
        return s;
    }
    if (n_off == 0) {
        if ((s = ra_gpu_lm_copy(g, o_dev, R->d_oloc, (size_t)nh * hd * sizeof(float), 1)) != RA_OK)
            return gpu_err(R, s, "copy");
    } else {
        ra_attend_out ao = {.o = R->h_orem, .lse = R->h_lserem, .pos = R->tpos, .scores = R->tscores,
                            .counts = R->tcounts};
        if ((s = ra_client_attend_wait(R->cl, t, &ao, -1)) != RA_OK) {
            fprintf(stderr, "ratd-lm-eval: attend: %s (%s)\n", ra_strerror(s), ra_client_errmsg(R->cl));
            return s;
        }
        R->res->attends++;
        for (unsigned h = 0; h < nh; h++)
            R->res->keys_read += (unsigned)R->tcounts[h];
        if ((s = ra_gpu_lm_copy(g, R->d_orem, R->h_orem, (size_t)nh * hd * sizeof(float), 1)) != RA_OK ||
            (s = ra_gpu_lm_copy(g, R->d_lserem, R->h_lserem, nh * sizeof(float), 1)) != RA_OK)
            return gpu_err(R, s, "ratd's answer to the device");
        if ((s = ra_gpu_merge(R->gc, RA_GPU_MEM_DEVICE, R->d_oloc, R->d_lseloc, R->d_orem, RA_DTYPE_F32,
                              R->d_lserem, o_dev, RA_DTYPE_F32, NULL)) != RA_OK)
            return gpu_err(R, s, "gpu merge");
    }
    /* measurement: error against full attention, recall against the exact top-k */
    double t0 = now_s();
    if ((s = gpu_measure_rel(R, layer, pos, q_dev, o_dev, &t0)) != RA_OK)
        return gpu_err(R, s, "measure");
    if (n_off > 0) {
        unsigned kk = k < n_off ? k : n_off, grp = nh / nkv;
        for (unsigned h = 0; h < nh; h++) {
            if ((s = ra_gpu_lm_scores(g, layer, h / grp, q_dev + (size_t)h * hd, sink, off_end, R->d_sc)) != RA_OK ||
                (s = ra_gpu_lm_copy(g, R->sc, R->d_sc, n_off * sizeof(float), 0)) != RA_OK)
                return gpu_err(R, s, "scores");
            add_recall(R, h, k, kk, off_end);
        }
    }
    R->t_measure += now_s() - t0;
    return RA_OK;
}

/* ratd mode on the device: a CUDA ra_gpu cache on the decoder's stream takes sink +
 * window of every layer straight from the device KV cache; the middle goes to ratd. */
/* The exact top-K staged keys of every training query of one layer, on the GPU
 * (ra_gpu_knn: cuBLAS GEMM + top-K), attached to the Offload batch so that ratd builds
 * its graph from them instead of running its own CPU kNN. Queries go to the cache's
 * dtype (the keys' one); lists index the staged tokens of the query head's KV head. */
static ra_status gpu_train_lists(run *R, const ra_gpu_staged *sv, ra_kv_batch *b, unsigned K)
{
    unsigned nh = (unsigned)b->n_q_heads, hd = sv->head_dim, grp = nh / sv->n_kv_heads;
    size_t nq = b->n_queries, n = sv->n_tokens;
    if (K > n)
        K = (unsigned)n;
    if (K == 0 || nq == 0)
        return RA_OK;
    uint16_t *q16 = malloc(nq * hd * sizeof *q16);
    float *sc = malloc(nq * K * sizeof *sc);
    R->knn_lists = malloc((size_t)nh * nq * K * sizeof(int32_t));
    ra_status s = RA_ENOMEM;
    if (!q16 || !sc || !R->knn_lists)
        goto out;
    double t0 = now_s();
    for (unsigned h = 0; h < nh; h++) {
        const float *q = b->q_train + (size_t)h * nq * hd;
        for (size_t i = 0; i < nq * hd; i++)
            q16[i] = sv->dtype == RA_DTYPE_BF16 ? ra_f32_to_bf16(q[i]) : ra_f32_to_f16(q[i]);
        const uint8_t *keys = (const uint8_t *)sv->k + (size_t)(h / grp) * sv->head_stride * 2;
        s = ra_gpu_knn(R->gc, RA_GPU_MEM_HOST, sv->dtype, q16, nq, keys, n, hd, K,
                       R->knn_lists + (size_t)h * nq * K, sc);
        if (s != RA_OK) {
            gpu_err(R, s, "knn");
            goto out;
        }
    }
    R->knn_s += now_s() - t0;
    b->train_knn = R->knn_lists;
    b->train_knn_k = (int)K;
out:
    free(q16);
    free(sc);
    return s;
}

/* The graph of every KV head of one layer built on the GPU (ra_gpu_graph_build_heads, on a
 * stream of its own: the decoder's stream keeps running) from the staged keys and the
 * training queries of the query heads sharing each, attached to the Offload as GRAPH_ADJ,
 * with the build's exact query->key lists as train_knn (more than K keys: ratd then scans
 * nothing for the graph's routing and calibration). A failed build leaves the batch
 * without a graph (ratd then builds its own) unless the device is broken. */
static ra_status gpu_graphs(run *R, const ra_gpu_staged *sv, ra_kv_batch *b, unsigned long seed)
{
    const unsigned M = 48;  /* the session's graph_degree (ratd's default) */
    const unsigned K = 100; /* the build's query->key lists (its default) */
    unsigned nh = (unsigned)b->n_q_heads, hd = sv->head_dim, G = sv->n_kv_heads, grp = nh / G;
    size_t nq = b->n_queries, n = sv->n_tokens, qn = grp * nq;
    if (nq == 0 || n < 2 || G > 1024)
        return RA_OK;
    uint16_t *q16 = ra_gpu_host_alloc((size_t)G * qn * hd * sizeof *q16);
    ra_gpu_graph_head *heads = calloc(G, sizeof *heads);
    R->graph_adj = malloc((size_t)G * n * M * sizeof(int32_t));
    R->graph_ent = malloc((size_t)G * 16 * sizeof(int32_t));
    int lists = n > K; /* the lists' row is its query head's [nq][K], as train_knn */
    R->knn_lists = lists ? malloc((size_t)G * qn * K * sizeof(int32_t)) : NULL;
    ra_status s = RA_ENOMEM;
    unsigned ne = 0;
    if (!q16 || !heads || !R->graph_adj || !R->graph_ent || (lists && !R->knn_lists))
        goto out;
    double t0 = now_s();
    for (unsigned g = 0; g < G; g++) {
        const float *q = b->q_train + (size_t)g * grp * nq * hd;
        uint16_t *o = q16 + (size_t)g * qn * hd;
        for (size_t i = 0; i < qn * hd; i++)
            o[i] = sv->dtype == RA_DTYPE_BF16 ? ra_f32_to_bf16(q[i]) : ra_f32_to_f16(q[i]);
        heads[g] = (ra_gpu_graph_head){
            .keys = (const uint8_t *)sv->k + (size_t)g * sv->head_stride * 2,
            .n_keys = n,
            .queries = o,
            .n_queries = qn,
            .adj = R->graph_adj + (size_t)g * n * M,
            .entries = R->graph_ent + g * 16,
            .lists = lists ? R->knn_lists + (size_t)g * qn * K : NULL};
    }
    ra_gpu_graph_params p;
    ra_gpu_graph_params_init(&p);
    p.degree = M;
    p.knn = K;
    p.seed = seed;
    s = ra_gpu_graph_build_heads(R->gc, RA_GPU_MEM_HOST, sv->dtype, hd, &p, heads, G, NULL);
    ne = heads[0].n_entries;
    R->graph_s += now_s() - t0;
    if (s != RA_OK) {
        fprintf(stderr, "ratd-lm-eval: GPU graph build: %s (%s); ratd builds this layer's graphs\n",
                ra_strerror(s), ra_gpu_cache_last_error(R->gc));
        s = ra_gpu_cache_broken(R->gc) ? RA_EDEVICE : RA_OK;
        goto out;
    }
    if (ne < 16) /* the wire takes [G][ne] */
        for (unsigned g = 1; g < G; g++)
            memmove(R->graph_ent + (size_t)g * ne, R->graph_ent + (size_t)g * 16,
                    ne * sizeof(int32_t));
    b->graph_adj = R->graph_adj;
    b->graph_degree = (int)M;
    b->graph_entries = R->graph_ent;
    b->graph_n_entries = (int)ne;
    if (lists) {
        b->train_knn = R->knn_lists;
        b->train_knn_k = (int)K;
    }
    R->graph_layers++;
    ra_gpu_host_free(q16);
    free(heads);
    return RA_OK;
out:
    ra_gpu_host_free(q16);
    free(heads);
    free(R->graph_adj);
    free(R->graph_ent);
    R->graph_adj = R->graph_ent = NULL;
    free(R->knn_lists);
    R->knn_lists = NULL;
    return s;
}

static ra_status setup_ratd_gpu(shared *S, run *R)
{
    const ra_lm_config *c = S->c;
    const opts *o = S->o;
    unsigned C = o->context, hd = c->head_dim, nkv = c->n_kv_heads, nh = c->n_heads;
    ra_gpu_lm *g = S->g;
    ra_status s;
    R->gdt = o->kv_dtype == RA_DTYPE_BF16 ? RA_DTYPE_BF16 : RA_DTYPE_F16;
    ra_gpu_config gcfg;
    ra_gpu_config_init(&gcfg);
    gcfg.n_layers = c->n_layers;
    gcfg.n_q_heads = nh;
    gcfg.n_kv_heads = nkv;
    gcfg.head_dim = hd;
    gcfg.dtype = R->gdt;
    gcfg.sink = o->sink;
    gcfg.window = o->window;
    gcfg.batch = 1;
    gcfg.backend = RA_GPU_BACKEND_CUDA;
    gcfg.evict_capacity = 64;
    if ((s = ra_gpu_cache_create(&gcfg, &R->gc)) != RA_OK) {
        fprintf(stderr, "ratd-lm-eval: gpu cache: %s\n", ra_strerror(s));
        return s;
    }
    if ((s = ra_gpu_cache_set_stream(R->gc, ra_gpu_lm_stream(g))) != RA_OK)
        return gpu_err(R, s, "set_stream");
    size_t e = 4; /* worst case element size */
    R->d_q16 = ra_gpu_lm_alloc(g, (size_t)nh * hd * e);
    R->d_k16 = ra_gpu_lm_alloc(g, (size_t)nkv * hd * e);
    R->d_v16 = ra_gpu_lm_alloc(g, (size_t)nkv * hd * e);
    R->d_evk = ra_gpu_lm_alloc(g, (size_t)nkv * hd * e);
    R->d_evv = ra_gpu_lm_alloc(g, (size_t)nkv * hd * e);
    R->d_oloc = ra_gpu_lm_alloc(g, (size_t)nh * hd * sizeof(float));
    R->d_lseloc = ra_gpu_lm_alloc(g, nh * sizeof(float));
    R->d_orem = ra_gpu_lm_alloc(g, (size_t)nh * hd * sizeof(float));
    R->d_lserem = ra_gpu_lm_alloc(g, nh * sizeof(float));
    R->d_sc = ra_gpu_lm_alloc(g, (size_t)ra_lm_max_ctx(S->lm) * sizeof(float));
    R->h_q = ra_gpu_host_alloc((size_t)nh * hd * sizeof(float));
    R->h_orem = ra_gpu_host_alloc((size_t)nh * hd * sizeof(float));
    R->h_lserem = ra_gpu_host_alloc(nh * sizeof(float));
    R->h_evk = ra_gpu_host_alloc((size_t)nkv * hd * e);
    R->h_evv = ra_gpu_host_alloc((size_t)nkv * hd * e);
    R->ev_pending = calloc(c->n_layers, sizeof(unsigned));
    void *kbuf = ra_gpu_lm_alloc(g, (size_t)C * nkv * hd * 2), *vbuf = ra_gpu_lm_alloc(g, (size_t)C * nkv * hd * 2);
    if (!R->d_q16 || !R->d_k16 || !R->d_v16 || !R->d_evk || !R->d_evv || !R->d_oloc || !R->d_lseloc || !R->d_orem ||
        !R->d_lserem || !R->d_sc || !R->h_q || !R->h_orem || !R->h_lserem || !R->h_evk || !R->h_evv ||
        !R->ev_pending || !kbuf || !vbuf) {
        s = RA_ENOMEM;
        goto out;
    }
    if ((s = open_session(S, R)) != RA_OK)
        goto out;
    int gpu_graph = 0; /* the GPU builds the graphs: graph index, a daemon that takes them */
    if (!o->cpu_build && o->index == RA_CLIENT_INDEX_GRAPH) {
        ra_server_info info;
        gpu_graph = ra_client_hello(R->cl, &info) == RA_OK &&
                    (info.capabilities & RA_CAP_GRAPH_ADJ) != 0;
        if (!gpu_graph)
            fprintf(stderr, "ratd-lm-eval: the daemon takes no prebuilt graphs: ratd builds them\n");
    }
    for (unsigned l = 0; l < c->n_layers && s == RA_OK; l++) {
        if ((s = ra_gpu_lm_kv_export(g, l, 0, C, R->gdt, kbuf, vbuf)) != RA_OK ||
            (s = ra_gpu_ingest_prefill(R->gc, l, RA_GPU_MEM_DEVICE, kbuf, vbuf, C)) != RA_OK) {
            gpu_err(R, s, "ingest_prefill");
            break;
        }
        ra_gpu_staged sv;
        if ((s = ra_gpu_cache_offload_view(R->gc, l, &sv)) != RA_OK) {
            gpu_err(R, s, "offload_view");
            break;
        }
        if (sv.n_tokens > 0) {
            ra_kv_batch b;
            if ((s = pack_staged_any(R, &sv, &b)) != RA_OK)
                break;
            if (S->cap->q_train && S->cap->n_q > 0) {
                b.n_q_heads = (int)nh;
                b.n_queries = S->cap->n_q;
                b.q_train = S->cap->q_train + (size_t)l * nh * S->cap->n_q * hd;
                if (gpu_graph && (s = gpu_graphs(R, &sv, &b, o->seed)) != RA_OK)
                    break;
                if (!b.graph_adj && o->gpu_knn && o->index == RA_CLIENT_INDEX_GRAPH &&
                    (s = gpu_train_lists(R, &sv, &b, o->gpu_knn)) != RA_OK)
                    break;
            }
            s = ra_client_offload(R->cl, R->session, (int)l, &b);
            free(R->knn_lists);
            R->knn_lists = NULL;
            free(R->graph_adj);
            free(R->graph_ent);
            R->graph_adj = R->graph_ent = NULL;
            if (s != RA_OK) {
                fprintf(stderr, "ratd-lm-eval: offload layer %u: %s (%s)\n", l, ra_strerror(s),
                        ra_client_errmsg(R->cl));
                break;
            }
        }
        s = ra_gpu_cache_offload_release(R->gc, l);
    }
    ra_gpu_cache_trim(R->gc);
    double tw = now_s();
    if (s == RA_OK && o->wait_index_ms > 0 &&
        (s = ra_client_wait_ready(R->cl, R->session, o->wait_index_ms)) != RA_OK)
        fprintf(stderr, "ratd-lm-eval: waiting for the index builds: %s (%s)\n", ra_strerror(s),
                ra_client_errmsg(R->cl));
    if (s == RA_OK && !o->quiet)
        fprintf(stderr,
                "ratd-lm-eval: offload: %u of %u layers with GPU-built graphs (%.3f s); training "
                "lists %s (GPU kNN %.3f s), index builds done %.2f s after the last Offload\n",
                R->graph_layers, c->n_layers, R->graph_s,
                R->knn_s > 0 ? "from the GPU" : "computed by ratd (or none)", R->knn_s,
                now_s() - tw);
out:
    ra_gpu_lm_free(g, kbuf);
    ra_gpu_lm_free(g, vbuf);
    return s;
}

static void free_run_gpu(run *R)
{
    void *d[] = {R->d_ref, R->d_oloc, R->d_lseloc, R->d_orem, R->d_lserem, R->d_sc,
                 R->d_q16, R->d_k16, R->d_v16, R->d_evk, R->d_evv};
    if (R->g)
        ra_gpu_lm_sync(R->g);
    free_run(R);
    for (unsigned i = 0; i < sizeof d / sizeof d[0]; i++)
        ra_gpu_lm_free(R->g, d[i]);
    void *h[] = {R->h_q, R->h_o, R->h_ref, R->h_orem, R->h_lserem, R->h_evk, R->h_evv};
    for (unsigned i = 0; i < sizeof h / sizeof h[0]; i++)
        ra_gpu_host_free(h[i]);
    free(R->ev_pending);
}

static ra_status run_mode_gpu(shared *S, eval_mode mode, unsigned topk, result *res)
{
    const opts *o = S->o;
    const ra_lm_config *c = S->c;
    unsigned C = o->context, E = o->eval, nh = c->n_heads, hd = c->head_dim;
    unsigned max_ctx = ra_lm_max_ctx(S->lm);
    run R = {.o = o, .mode = mode, .topk = topk, .res = res, .g = S->g, .lm_cpu = S->lm};
    ra_status s = RA_ENOMEM;
    float *logits = malloc(c->vocab * sizeof(float));
    memset(res, 0, sizeof *res);
    res->mode = mode;
    res->topk = topk;
    res->rel_l2 = calloc(c->n_layers, sizeof(double));
    R.sc = malloc((size_t)2 * max_ctx * sizeof(float));
    R.tpos = malloc((size_t)nh * (topk ? topk : 1) * sizeof(int64_t));
    R.tscores = malloc((size_t)nh * (topk ? topk : 1) * sizeof(float));
    R.tcounts = malloc(nh * sizeof(int32_t));
    R.d_ref = ra_gpu_lm_alloc(S->g, (size_t)nh * hd * sizeof(float));
    R.h_o = ra_gpu_host_alloc((size_t)nh * hd * sizeof(float));
    R.h_ref = ra_gpu_host_alloc((size_t)nh * hd * sizeof(float));
    if (!logits || !res->rel_l2 || !R.sc || !R.tpos || !R.tscores || !R.tcounts || !R.d_ref || !R.h_o || !R.h_ref)
        goto out;
    if ((s = ra_gpu_lm_rewind(S->g, C)) != RA_OK)
        goto out;
    if (mode == MODE_RATD && (s = setup_ratd_gpu(S, &R)) != RA_OK)
        goto out;
    ra_gpu_lm_attn_fn fn = mode == MODE_FULL ? ghook_full : mode == MODE_WINDOW ? ghook_window : ghook_ratd;
    double nll = -ra_lm_logprob(S->logits0, c->vocab, S->tok[C]);
    account(res, S, 0, nll);
    if (!o->quiet)
        RA_INFO("ratd-lm-eval: %s (cuda): decoding starts", mode_names[mode]);
    double t0 = now_s();
    for (unsigned i = 1; i < E; i++) {
        if ((s = ra_gpu_lm_decode(S->g, S->tok[C + i - 1], logits, fn, &R)) != RA_OK) {
            fprintf(stderr, "ratd-lm-eval: decode step %u failed: %s (%s)\n", i, ra_strerror(s),
                    ra_gpu_lm_last_error(S->g));
            goto out;
        }
        nll = -ra_lm_logprob(logits, c->vocab, S->tok[C + i]);
        account(res, S, i, nll);
        res->steps++;
        if (!o->quiet && i % 128 == 0)
            fprintf(stderr, "ratd-lm-eval: %s (cuda)%s%.0u: %u/%u tokens, bpb so far %.4f\n", mode_names[mode],
                    mode == MODE_RATD ? " k=" : "", mode == MODE_RATD ? topk : 0, i, E, res->nats / res->n / M_LN2);
    }
    res->seconds = now_s() - t0 - R.t_measure;
    s = RA_OK;
out:
    free_run_gpu(&R);
    free(logits);
    return s;
}

/* ------------------------------------------------------------------ report */

static void print_result(const opts *o, const ra_lm_config *c, const result *r, double full_bpb)
{
    double bpb = r->nats / r->n / M_LN2;
    double rep = r->n_rep ? r->nats_rep / r->n_rep / M_LN2 : NAN;
    double ms = r->steps ? 1e3 * r->seconds / r->steps : 0;
    double recall = r->recall_n ? r->recall_sum / r->recall_n : NAN;
    double frac = r->keys_offloaded > 0 ? r->keys_read / r->keys_offloaded : NAN;
    double err = 0;
    for (unsigned l = 0; l < c->n_layers; l++)
        err += r->n_rel ? r->rel_l2[l] / r->n_rel : 0;
    err /= c->n_layers;
    if (o->json) {
        printf("{\"mode\":\"%s\",\"bpb\":%.6f,\"tokens\":%u", mode_names[r->mode], bpb, r->n);
        if (r->n_rep)
            printf(",\"bpb_repeat\":%.6f,\"repeat_tokens\":%u", rep, r->n_rep);
        if (r->mode == MODE_RATD) {
            printf(",\"topk\":%u,\"recall\":%.6f,\"keys_read_frac\":%.6f", r->topk, recall, frac);
            if (r->adaptive)
                printf(",\"adaptive\":%g,\"adaptive_quantile\":%g,\"adaptive_max\":%u,\"mean_k\":%.1f,\"attends_per_layer_step\":%.3f,"
                       "\"perhead_keys_frac\":%.6f",
                       o->adaptive, o->adaptive_q, o->adaptive_max,
                       r->attends ? r->keys_read / ((double)r->attends * c->n_heads) : 0.0,
                       r->steps ? (double)r->attends / ((double)r->steps * c->n_layers) : 0.0,
                       r->keys_offloaded > 0 ? r->keys_perhead / r->keys_offloaded : 0.0);
        }
        printf(",\"ms_per_token\":%.3f,\"rel_l2\":[", ms);
        for (unsigned l = 0; l < c->n_layers; l++)
            printf("%s%.6g", l ? "," : "", r->n_rel ? r->rel_l2[l] / r->n_rel : 0.0);
        printf("],\"context\":%u,\"eval\":%u,\"sink\":%u,\"window\":%u", o->context, o->eval, o->sink,
               o->window);
        if (r->ratd_lost)
            printf(",\"ratd_lost\":true,\"ratd_lost_at\":%u,\"window_only_layer_steps\":%lu", r->lost_at,
                   r->window_only);
        printf("}\n");
    } else {
        char k[16] = "-", rc[16] = "-", fr[16] = "-", rp[16] = "-";
        if (r->mode == MODE_RATD) {
            if (r->adaptive)
                snprintf(k, sizeof k, "a%u", r->topk);
            else
                snprintf(k, sizeof k, "%u", r->topk);
            if (r->recall_n) {
                snprintf(rc, sizeof rc, "%.4f", recall);
                snprintf(fr, sizeof fr, "%.2f%%", 100 * frac);
            }
        }
        if (r->n_rep)
            snprintf(rp, sizeof rp, "%.4f", rep);
        char vs[16] = "-";
        if (full_bpb > 0)
            snprintf(vs, sizeof vs, "%+.2f%%", 100 * (bpb / full_bpb - 1));
        printf("%-7s %6s %8.4f %8s %9s %9.2e %8s %8s %9.2f", mode_names[r->mode], k, bpb, vs, rp, err, rc, fr, ms);
        if (r->mode == MODE_RATD && r->adaptive && r->attends)
            printf("   (adaptive %g: mean k %.0f, %.2f attends/layer/step, per-head budgets read %.2f%%)",
                   o->adaptive, r->keys_read / ((double)r->attends * c->n_heads),
                   (double)r->attends / ((double)r->steps * c->n_layers),
                   r->keys_offloaded > 0 ? 100 * r->keys_perhead / r->keys_offloaded : 0.0);
        if (r->ratd_lost)
            printf("   (ratd lost at position %u: window-only after it, %lu layer steps)", r->lost_at,
                   r->window_only);
        printf("\n");
    }
    fflush(stdout);
}

static int has_mode(const char *list, const char *m)
{
    if (!strcmp(list, "all"))
        return 1;
    size_t n = strlen(m);
    for (const char *p = list; (p = strstr(p, m)); p += n)
        if ((p == list || p[-1] == ',') && (p[n] == 0 || p[n] == ','))
            return 1;
    return 0;
}

int main(int argc, char **argv)
{
    opts o;
    parse_args(argc, argv, &o);
    ra_log_set_level(o.quiet ? RA_LOG_WARN : RA_LOG_INFO);
    char err[1024];
    ra_lm *lm = NULL;
    unsigned char *text = NULL;
    int *tok = NULL;
    unsigned char *is_rep = NULL;
    float *logits0 = NULL;
    capture cap = {0};
    gcapture gcap = {.cap = &cap};
    ra_gpu_lm *g = NULL;
    int rc = 1;
    unsigned need = o.context + o.eval;
    ra_status s;

    if ((s = ra_lm_load(o.model, need, &lm, err, sizeof err)) != RA_OK) {
        fprintf(stderr, "ratd-lm-eval: %s\n", err);
        goto out;
    }
    const ra_lm_config *c = ra_lm_get_config(lm);
    if (o.cuda && (s = ra_lm_gpu_load(o.model, lm, need, 0, &g, err, sizeof err)) != RA_OK) {
        fprintf(stderr, "ratd-lm-eval: --device cuda: %s\n", err);
        goto out;
    }
    if (read_text(&o, need, &text) != 0)
        goto out;
    span sp[64];
    is_rep = calloc(o.eval, 1);
    tok = malloc((size_t)need * sizeof *tok);
    logits0 = malloc(c->vocab * sizeof(float));
    if (!is_rep || !tok || !logits0)
        goto nomem;
    if (o.repeat > 0) {
        if (make_repeats(&o, text, sp) != 0)
            goto out;
        for (unsigned i = 0; i < o.repeat; i++) {
            for (unsigned j = 0; j < sp[i].len; j++)
                is_rep[sp[i].dst - o.context + j] = 1;
            if (!o.quiet)
                fprintf(stderr, "ratd-lm-eval: repeat span %u: %u bytes from %u at %u (distance %u)\n", i, sp[i].len,
                        sp[i].src, sp[i].dst, sp[i].dst - sp[i].src);
        }
    }
    for (unsigned i = 0; i < need; i++) {
        tok[i] = text[i];
        if ((unsigned)tok[i] >= c->vocab) {
            fprintf(stderr, "ratd-lm-eval: %s: byte %u at offset %u is outside the %u-entry vocabulary\n", o.text,
                    tok[i], o.offset + i, c->vocab);
            goto out;
        }
    }

    int want_full = has_mode(o.mode, "full"), want_window = has_mode(o.mode, "window");
    int want_ratd = has_mode(o.mode, "ratd");
    const char *endpoint = o.endpoint;
    char ep[128];
    if (want_ratd && !endpoint) {
        if (!o.ratd_bin) {
            fprintf(stderr, "ratd-lm-eval: mode ratd needs --endpoint EP (a running ratd) or --ratd BIN\n");
            goto out;
        }
        if (spawn_daemon(o.ratd_bin, ep, sizeof ep) != 0)
            goto out;
        endpoint = ep;
    }

    /* prefill once: the KV cache of the context is the same for every mode */
    cap.o = &o;
    cap.c = c;
    if (want_ratd && o.n_train > 0) {
        cap.q_pos = malloc((size_t)(o.n_train < o.context ? o.n_train : o.context) * sizeof(unsigned));
        if (!cap.q_pos)
            goto nomem;
        cap.n_q = ra_trace_sample_train(o.context, o.n_train, cap.q_pos);
        cap.q_train = malloc((size_t)c->n_layers * c->n_heads * cap.n_q * c->head_dim * sizeof(float));
        if (!cap.q_train)
            goto nomem;
    }
    if (want_ratd && o.adaptive > 0) {
        cap.cal_q = malloc((size_t)c->n_layers * c->n_heads * NCAL * c->head_dim * sizeof(float));
        if (!cap.cal_q)
            goto nomem;
        for (unsigned i = 0; i < NCAL; i++)
            if (o.context >= 256)
                cap.cal_pos[cap.n_cal++] = o.context - 256 + 8 * i + 7;
    }
    if (o.dump_trace) {
        ra_trace_info ti = {.dtype = o.trace_dtype, .n_layers = c->n_layers, .n_heads = c->n_heads,
                            .n_kv_heads = c->n_kv_heads, .head_dim = c->head_dim, .n_pos = o.context,
                            .pos0 = 0, .rope_theta = (float)c->rope_theta};
        if ((s = ra_trace_writer_create(o.dump_trace, &ti, &cap.tw, err, sizeof err)) != RA_OK) {
            fprintf(stderr, "ratd-lm-eval: %s\n", err);
            goto out;
        }
    }
    double t0 = now_s();
    int want_cap = cap.tw || cap.q_train || cap.cal_q;
    if (g)
        s = ra_gpu_lm_prefill(g, tok, o.context, logits0, want_cap ? gcapture_fn : NULL, &gcap);
    else
        s = ra_lm_prefill(lm, tok, o.context, logits0, NULL, want_cap ? capture_fn : NULL, &cap);
    if (s != RA_OK) {
        fprintf(stderr, "ratd-lm-eval: prefill failed: %s%s%s\n", ra_strerror(s), g ? ": " : "",
                g ? ra_gpu_lm_last_error(g) : "");
        goto out;
    }
    double t_prefill = now_s() - t0;
    if (!o.quiet)
        fprintf(stderr, "ratd-lm-eval: prefill of %u bytes: %.1f s\n", o.context, t_prefill);
    if (cap.tw) {
        s = ra_trace_writer_finish(cap.tw, err, sizeof err);
        cap.tw = NULL;
        if (s != RA_OK) {
            fprintf(stderr, "ratd-lm-eval: %s\n", err);
            goto out;
        }
        if (!o.quiet)
            fprintf(stderr, "ratd-lm-eval: wrote trace %s\n", o.dump_trace);
    }

    shared S = {.o = &o, .lm = lm, .c = c, .tok = tok, .logits0 = logits0, .is_rep = is_rep, .cap = &cap,
                .endpoint = endpoint, .g = g};
    if (!o.json) {
        printf("# ratd-lm-eval: model %s, text %s (offset %u), context %u, eval %u, sink %u, window %u%s\n", o.model,
               o.text, o.offset, o.context, o.eval, o.sink, o.window, o.repeat ? ", with repeats" : "");
        if (g)
            printf("# device cuda: prefill and decode on the GPU (ra_gpu_lm), ratd's local part in a CUDA ra_gpu cache\n");
        printf("# prefill %.1f s; rel_l2: mean over layers of |o - o_full| / |o_full|; keys: share of the "
               "offloaded keys read per step\n",
               t_prefill);
        printf("%-7s %6s %8s %8s %9s %9s %8s %8s %9s\n", "mode", "top_k", "bpb", "vs_full", "bpb_rep", "rel_l2",
               "recall", "keys", "ms/token");
    }
    result r;
    double full_bpb = 0;
    if (want_full) {
        if ((s = g ? run_mode_gpu(&S, MODE_FULL, 0, &r) : run_mode(&S, MODE_FULL, 0, 0, &r)) != RA_OK)
            goto out;
        full_bpb = r.nats / r.n / M_LN2;
        print_result(&o, c, &r, full_bpb);
        free(r.rel_l2);
    }
    if (want_window) {
        if ((s = g ? run_mode_gpu(&S, MODE_WINDOW, 0, &r) : run_mode(&S, MODE_WINDOW, 0, 0, &r)) != RA_OK)
            goto out;
        print_result(&o, c, &r, full_bpb);
        free(r.rel_l2);
    }
    if (want_ratd) {
        /* the fixed budgets of --topk (0: none), then the adaptive run of --adaptive */
        for (unsigned i = 0; i < o.n_topk + (o.adaptive > 0); i++) {
            int ad = i == o.n_topk;
            if (!ad && o.topk[i] == 0)
                continue;
            s = g ? run_mode_gpu(&S, MODE_RATD, o.topk[i], &r)
                  : run_mode(&S, MODE_RATD, ad ? o.adaptive_min : o.topk[i], ad, &r);
            if (s != RA_OK) {
                free(r.rel_l2);
                goto out;
            }
            print_result(&o, c, &r, full_bpb);
            free(r.rel_l2);
        }
    }
    rc = 0;
    goto out;
nomem:
    fprintf(stderr, "ratd-lm-eval: out of memory\n");
out:
    ra_trace_writer_abort(cap.tw);
    free(cap.q_train);
    free(cap.cal_q);
    free(cap.q_pos);
    free(cap.row);
    free(logits0);
    free(tok);
    free(is_rep);
    free(text);
    free(gcap.q);
    free(gcap.k);
    free(gcap.v);
    ra_gpu_lm_destroy(g);
    ra_lm_free(lm);
    stop_child();
    return rc;
}
