/* ratd-bench-decode: what one decode step over a long context costs through ratd, the
 * figure a user needs to decide whether ratd is cheap enough (issue 10, item 1). It
 * offloads a context per layer (Llama-3-8B's shape by default, synthetic heads from the
 * calibrated generator, or a trace's real heads), waits for the index builds, replays
 * decode steps with one synchronous Attend per layer, and reports the per-layer and
 * per-token latency, the empty request's round trip, build and offload time, memory per
 * session, and on sampled steps recall@k and attention mass against an exact reference.
 * This file owns the command line (every flag checked: exit 2) and the report; run.c
 * runs the phases (exit 1 on a runtime failure). */
#define _GNU_SOURCE
#include <errno.h>
#include <getopt.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "decode.h"

const char *dec_index_name(ra_client_index_kind k)
{
    const char *n = ra_client_index_kind_name(k);
    return n ? n : "graph";
}

static void usage(FILE *f)
{
    fprintf(f, "usage: ratd-bench-decode [--ratd BIN | --endpoint EP] [options]\n"
               "\n"
               "Offloads a long context to ratd, replays decode steps (one synchronous Attend per\n"
               "layer for all query heads) and reports Attend latency per layer and per token,\n"
               "the empty request's round trip, build time, memory, and recall / attention mass\n"
               "against an exact reference on sampled steps.\n"
               "\n"
               "daemon:\n"
               "  --ratd BIN        start a private ratd on an ipc:// path (default: this build\n"
               "                    tree's daemon/ratd); stopped at the end\n"
               "  --endpoint EP     use a running ratd instead\n"
               "  --workers W       the private daemon's attention workers (default: its own)\n"
               "shape (default Llama-3-8B: 32 layers, 32 query / 8 KV heads, dim 128, bf16):\n"
               "  --layers L        layers run (figures are per layer; 2 is the usual run)\n"
               "  --model-layers N  the full model's layers, for the per-token estimate (32)\n"
               "  --q-heads H --kv-heads G --dim D --dtype bf16|f16\n"
               "data:\n"
               "  --context N       offloaded keys per KV head (131072)\n"
               "  --gen NAME        synthetic generator (calibrated); one of:\n");
    dec_gen_list(f);
    fprintf(
        f, "  --synth K=V,...   the generator's knobs (bench/index/synth.h)\n"
           "  --seed X          data seed (1); sessions, layers and heads draw their own\n"
           "  --trace FILE      real heads from ratd-lm-eval --dump-trace (shape from the file):\n"
           "                    rows [sink, n - window - steps) offloaded, the last steps decoded\n"
           "  --sink N --window N   the decoder's GPU-side rows, with --trace (128, 512)\n"
           "  --n-train Q       training queries per query head (4096)\n"
           "decode:\n"
           "  --steps S         timed decode steps (256)\n"
           "  --warmup W        untimed steps first (10)\n"
           "  --client-spin-us N  the client polls N us for each reply before it sleeps (0)\n"
           "  --top-k K         keys retrieved per query head (100)\n"
           "  --effort E        search effort (pscan: candidates rescored; graph: candidate\n"
           "                    list; 0: the daemon's default)\n"
           "  --index graph|flat|ivf|hnsw|pscan   the sessions' index (pscan; graph with\n"
           "                    --gpu-build)\n"
           "  --batch B         B sessions with their own data; one Attend per layer for all\n"
           "  --append-every N  Append the N held-back newest tokens every N steps (16; 0: off)\n"
           "  --sweep E1,E2,... after the run, the same decode steps again at each effort\n"
           "                    (0: the default), on the same sessions: latency and\n"
           "                    fidelity per effort (at most 16)\n"
           "  --sample-every N  fidelity against the exact reference every N timed steps (10;\n"
           "                    0: off)\n"
           "  --wait-index MS   wait this long for the index builds before decoding (600000;\n"
           "                    0: do not wait)\n"
           "  --gpu-build       build each head's graph here with ra_gpu_graph_build (CUDA\n"
           "                    when present, else gpu/'s CPU reference) and send it in the\n"
           "                    Offload (GRAPH_ADJ): the daemon installs it instead of building\n"
           "other:\n"
           "  --threads T       the bench's own threads (generation, reference; 0: all CPUs)\n"
           "  --json            one JSON object on stdout instead of the table\n"
           "  --force           run even when the memory needed exceeds MemAvailable\n"
           "  --quiet           no progress lines on stderr\n"
           "  -h, --help\n");
}

__attribute__((format(printf, 1, 2), noreturn)) static void bad(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    fputs("ratd-bench-decode: ", stderr);
    vfprintf(stderr, fmt, ap);
    fputs(" (--help lists the flags)\n", stderr);
    va_end(ap);
    exit(2);
}

static long long parse_int(const char *flag, const char *v, long long lo, long long hi)
{
    char *end;
    errno = 0;
    long long x = strtoll(v, &end, 10);
    if (errno || end == v || *end || x < lo || x > hi)
        bad("%s must be an integer in [%lld, %lld], got '%s'", flag, lo, hi, v);
    return x;
}

enum {
    O_RATD = 256,
    O_ENDPOINT,
    O_WORKERS,
    O_LAYERS,
    O_MODEL_LAYERS,
    O_QH,
    O_KVH,
    O_DIM,
    O_DTYPE,
    O_CONTEXT,
    O_GEN,
    O_SYNTH,
    O_SEED,
    O_TRACE,
    O_SINK,
    O_WINDOW,
    O_NTRAIN,
    O_STEPS,
    O_WARMUP,
    O_CSPIN,
    O_TOPK,
    O_EFFORT,
    O_INDEX,
    O_BATCH,
    O_APPEND,
    O_SAMPLE,
    O_SWEEP,
    O_WAIT,
    O_GPU_BUILD,
    O_THREADS,
    O_JSON,
    O_FORCE,
    O_QUIET,
};

static const struct option g_long[] = {
    {"ratd", required_argument, 0, O_RATD},
    {"endpoint", required_argument, 0, O_ENDPOINT},
    {"workers", required_argument, 0, O_WORKERS},
    {"layers", required_argument, 0, O_LAYERS},
    {"model-layers", required_argument, 0, O_MODEL_LAYERS},
    {"q-heads", required_argument, 0, O_QH},
    {"kv-heads", required_argument, 0, O_KVH},
    {"dim", required_argument, 0, O_DIM},
    {"dtype", required_argument, 0, O_DTYPE},
    {"context", required_argument, 0, O_CONTEXT},
    {"gen", required_argument, 0, O_GEN},
    {"synth", required_argument, 0, O_SYNTH},
    {"seed", required_argument, 0, O_SEED},
    {"trace", required_argument, 0, O_TRACE},
    {"sink", required_argument, 0, O_SINK},
    {"window", required_argument, 0, O_WINDOW},
    {"n-train", required_argument, 0, O_NTRAIN},
    {"steps", required_argument, 0, O_STEPS},
    {"warmup", required_argument, 0, O_WARMUP},
    {"client-spin-us", required_argument, 0, O_CSPIN},
    {"top-k", required_argument, 0, O_TOPK},
    {"effort", required_argument, 0, O_EFFORT},
    {"index", required_argument, 0, O_INDEX},
    {"batch", required_argument, 0, O_BATCH},
    {"append-every", required_argument, 0, O_APPEND},
    {"sample-every", required_argument, 0, O_SAMPLE},
    {"sweep", required_argument, 0, O_SWEEP},
    {"wait-index", required_argument, 0, O_WAIT},
    {"gpu-build", no_argument, 0, O_GPU_BUILD},
    {"threads", required_argument, 0, O_THREADS},
    {"json", no_argument, 0, O_JSON},
    {"force", no_argument, 0, O_FORCE},
    {"quiet", no_argument, 0, O_QUIET},
    {"help", no_argument, 0, 'h'},
    {0, 0, 0, 0},
};

static void parse_args(int argc, char **argv, dec_cfg *c)
{
    memset(c, 0, sizeof *c);
    c->layers = 32;
    c->model_layers = 32;
    c->q_heads = 32;
    c->kv_heads = 8;
    c->dim = 128;
    c->dtype = RA_DTYPE_BF16;
    c->context = 131072;
    c->gen = "calibrated";
    c->seed = 1;
    c->sink = 128;
    c->window = 512;
    c->n_train = 4096;
    c->steps = 256;
    c->warmup = 10;
    c->top_k = 100;
    c->index = RA_CLIENT_INDEX_PSCAN;
    c->batch = 1;
    c->append_every = 16;
    c->sample_every = 10;
    c->wait_index_ms = 600000;
    int set_sink = 0, set_window = 0, set_synth_shape = 0, set_index = 0;
    opterr = 0;
    int ch;
    while ((ch = getopt_long(argc, argv, ":h", g_long, NULL)) != -1) {
        const char *v = optarg;
        switch (ch) {
        case 'h':
            usage(stdout);
            exit(0);
        case O_RATD:
            c->ratd_bin = v;
            break;
        case O_ENDPOINT:
            c->endpoint = v;
            break;
        case O_WORKERS:
            c->workers = (int)parse_int("--workers", v, 1, 1024);
            break;
        case O_LAYERS:
            c->layers = (int)parse_int("--layers", v, 1, 4096);
            c->set_layers = 1;
            break;
        case O_MODEL_LAYERS:
            c->model_layers = (int)parse_int("--model-layers", v, 1, 4096);
            c->set_model_layers = 1;
            break;
        case O_QH:
            c->q_heads = (int)parse_int("--q-heads", v, 1, 4096);
            set_synth_shape = 1;
            break;
        case O_KVH:
            c->kv_heads = (int)parse_int("--kv-heads", v, 1, 1024);
            set_synth_shape = 1;
            break;
        case O_DIM:
            c->dim = (int)parse_int("--dim", v, 2, 4096);
            set_synth_shape = 1;
            break;
        case O_DTYPE:
            if (!strcmp(v, "bf16"))
                c->dtype = RA_DTYPE_BF16;
            else if (!strcmp(v, "f16"))
                c->dtype = RA_DTYPE_F16;
            else
                bad("--dtype must be bf16 or f16, got '%s'", v);
            break;
        case O_CONTEXT:
            c->context = (size_t)parse_int("--context", v, 1, 1 << 26);
            c->set_context = 1;
            break;
        case O_GEN:
            c->gen = v;
            c->set_gen = 1;
            break;
        case O_SYNTH:
            c->synth = v;
            break;
        case O_SEED:
            c->seed = (uint64_t)parse_int("--seed", v, 0, INT64_MAX);
            break;
        case O_TRACE:
            c->trace = v;
            break;
        case O_SINK:
            c->sink = (int)parse_int("--sink", v, 0, 1 << 24);
            set_sink = 1;
            break;
        case O_WINDOW:
            c->window = (int)parse_int("--window", v, 1, 1 << 24);
            set_window = 1;
            break;
        case O_NTRAIN:
            c->n_train = (int)parse_int("--n-train", v, 0, 1 << 24);
            break;
        case O_STEPS:
            c->steps = (int)parse_int("--steps", v, 1, 1 << 20);
            break;
        case O_WARMUP:
            c->warmup = (int)parse_int("--warmup", v, 0, 1 << 20);
            break;
        case O_CSPIN:
            c->client_spin_us = (int)parse_int("--client-spin-us", v, 0, 100000);
            break;
        case O_TOPK:
            c->top_k = (int)parse_int("--top-k", v, 1, 1 << 20);
            break;
        case O_EFFORT:
            c->effort = (int)parse_int("--effort", v, 0, 1 << 24);
            break;
        case O_INDEX:
            if (ra_client_index_kind_parse(v, &c->index) != RA_OK)
                bad("--index must be graph, flat, ivf, hnsw or pscan, got '%s'", v);
            set_index = 1;
            break;
        case O_BATCH:
            c->batch = (int)parse_int("--batch", v, 1, DEC_MAX_BATCH);
            break;
        case O_APPEND:
            c->append_every = (int)parse_int("--append-every", v, 0, 1 << 20);
            break;
        case O_SAMPLE:
            c->sample_every = (int)parse_int("--sample-every", v, 0, 1 << 20);
            break;
        case O_SWEEP: {
            char buf[256];
            if (strlen(v) >= sizeof buf)
                bad("--sweep: a list of at most 16 efforts, got '%s'", v);
            strcpy(buf, v);
            c->n_sweep = 0;
            for (char *sv = NULL, *t = strtok_r(buf, ",", &sv); t; t = strtok_r(NULL, ",", &sv)) {
                if (c->n_sweep == 16)
                    bad("--sweep: at most 16 efforts, got '%s'", v);
                c->sweep[c->n_sweep++] = (int)parse_int("--sweep", t, 0, 1 << 24);
            }
            if (!c->n_sweep)
                bad("--sweep: a comma-separated list of efforts, got '%s'", v);
            break;
        }
        case O_WAIT:
            c->wait_index_ms = (int)parse_int("--wait-index", v, 0, 86400000);
            break;
        case O_GPU_BUILD:
            c->gpu_build = 1;
            break;
        case O_THREADS:
            c->threads = (int)parse_int("--threads", v, 0, 256);
            break;
        case O_JSON:
            c->json = 1;
            break;
        case O_FORCE:
            c->force = 1;
            break;
        case O_QUIET:
            c->quiet = 1;
            break;
        case ':':
            bad("%s needs a value", argv[optind - 1]);
        default:
            if (optopt)
                bad("unknown flag -%c", optopt);
            bad("unknown flag %s", argv[optind - 1]);
        }
    }
    if (optind < argc)
        bad("unexpected argument '%s'", argv[optind]);
    if (c->ratd_bin && c->endpoint)
        bad("--ratd and --endpoint exclude each other");
    if (c->gpu_build && !set_index) /* prebuilt graphs: the graph index's */
        c->index = RA_CLIENT_INDEX_GRAPH;
    if (c->gpu_build && c->index != RA_CLIENT_INDEX_GRAPH)
        bad("--gpu-build builds graphs: it needs --index graph");
    if (c->endpoint && c->workers)
        bad("--workers sets a private daemon's workers; a running one (--endpoint) keeps its "
            "own");
    if (c->trace) {
        if (set_synth_shape || c->set_context)
            bad("--trace brings its own shape and context: drop --q-heads, --kv-heads, --dim "
                "and --context");
        if (c->set_gen || c->synth)
            bad("--gen and --synth choose synthetic data; --trace reads real heads");
    } else {
        if (set_sink || set_window)
            bad("--sink and --window apply to --trace");
        if (!dec_gen_find(c->gen)) {
            fprintf(stderr, "ratd-bench-decode: unknown generator '%s'; known:\n", c->gen);
            dec_gen_list(stderr);
            exit(2);
        }
        char err[256] = "";
        if (dec_gen_find(c->gen)->check(c->synth, err, sizeof err) != RA_OK)
            bad("%s", err);
        if (c->q_heads % c->kv_heads)
            bad("--q-heads must be a multiple of --kv-heads (GQA)");
        if (c->dim & 1)
            bad("--dim must be even (RoPE pairs)");
    }
    if (c->append_every > c->warmup + c->steps)
        bad("--append-every %d is longer than the run (%d warm-up + %d steps)", c->append_every,
            c->warmup, c->steps);
}

/* ---- report ---------------------------------------------------------------------------- */

static void print_json(const dec_cfg *c, const dec_run *r)
{
    dec_json j;
    const dec_fid *f = &r->fid;
    dec_json_begin(&j, stdout);
    dec_json_str(&j, "bench", "ratd-bench-decode");
    dec_json_str(&j, "endpoint", r->endpoint);
    dec_json_str(&j, "daemon", r->private_daemon ? "private" : "external");
    dec_json_str(&j, "server_version", r->info.server_version);
    dec_json_int(&j, "workers", r->info.workers);
    dec_json_int(&j, "threads", dec_threads(c));
    dec_json_int(&j, "layers", c->layers);
    dec_json_int(&j, "model_layers", c->model_layers);
    dec_json_int(&j, "q_heads", c->q_heads);
    dec_json_int(&j, "kv_heads", c->kv_heads);
    dec_json_int(&j, "head_dim", c->dim);
    dec_json_str(&j, "dtype", ra_dtype_name(c->dtype));
    dec_json_int(&j, "context", (long long)c->context);
    dec_json_int(&j, "n_train", (long long)r->n_train);
    dec_json_int(&j, "steps", c->steps);
    dec_json_int(&j, "warmup", c->warmup);
    dec_json_int(&j, "client_spin_us", c->client_spin_us);
    dec_json_int(&j, "top_k", c->top_k);
    dec_json_int(&j, "effort", c->effort);
    dec_json_str(&j, "index", dec_index_name(c->index));
    dec_json_int(&j, "batch", c->batch);
    dec_json_str(&j, "batch_mode", dec_batch_mode());
    dec_json_int(&j, "append_every", c->append_every);
    dec_json_int(&j, "sample_every", c->sample_every);
    dec_json_str(&j, "generator", c->trace ? "trace" : c->gen);
    dec_json_int(&j, "seed", (long long)c->seed);
    dec_json_str(&j, "synth", c->synth);
    dec_json_str(&j, "trace", c->trace);
    dec_json_int(&j, "sink", c->trace ? c->sink : 0);
    dec_json_int(&j, "window", c->trace ? c->window : 0);
    dec_json_int(&j, "wait_index_ms", c->wait_index_ms);
    dec_json_num(&j, "mem_daemon_kv_bytes", r->mem_kv);
    dec_json_num(&j, "mem_daemon_index_bytes_est", r->mem_index);
    dec_json_num(&j, "mem_bench_bytes_est", r->mem_bench);
    dec_json_num(&j, "mem_available_bytes", r->mem_avail);
    dec_json_num(&j, "session_bytes", r->session_bytes);
    dec_json_str(&j, "session_bytes_source", r->session_bytes_src);
    dec_json_num(&j, "gen_s", r->gen_s);
    dec_json_num(&j, "offload_s", r->offload_s);
    dec_json_num(&j, "offload_bytes", r->offload_bytes);
    dec_json_num(&j, "build_s", r->build_s);
    dec_json_bool(&j, "gpu_build", c->gpu_build);
    dec_json_num(&j, "gpu_build_s", c->gpu_build ? r->gpu_build_s : NAN);
    dec_json_str(&j, "gpu_build_backend", c->gpu_build ? r->gpu_backend : NULL);
    dec_json_bool(&j, "index_ready", r->index_ready);
    dec_json_int(&j, "attend_n", (long long)r->attend_us.n);
    dec_json_num(&j, "attend_us_p50", dec_series_pct(&r->attend_us, 50));
    dec_json_num(&j, "attend_us_p90", dec_series_pct(&r->attend_us, 90));
    dec_json_num(&j, "attend_us_p99", dec_series_pct(&r->attend_us, 99));
    dec_json_num(&j, "attend_us_max", dec_series_max(&r->attend_us));
    dec_json_num(&j, "attend_us_mean", dec_series_mean(&r->attend_us));
    dec_json_int(&j, "token_n", (long long)r->token_us.n);
    dec_json_num(&j, "token_us_p50", dec_series_pct(&r->token_us, 50));
    dec_json_num(&j, "token_us_p99", dec_series_pct(&r->token_us, 99));
    dec_json_num(&j, "token_ms_model_est",
                 dec_series_pct(&r->attend_us, 50) * c->model_layers / 1000.0);
    dec_json_int(&j, "rtt_n", (long long)r->rtt_us.n);
    dec_json_num(&j, "rtt_us_p50", dec_series_pct(&r->rtt_us, 50));
    dec_json_num(&j, "rtt_us_p99", dec_series_pct(&r->rtt_us, 99));
    dec_json_int(&j, "append_n", (long long)r->append_us.n);
    dec_json_int(&j, "appended_tokens", (long long)r->appended);
    dec_json_num(&j, "append_us_p50", dec_series_pct(&r->append_us, 50));
    dec_json_num(&j, "append_us_p99", dec_series_pct(&r->append_us, 99));
    dec_json_num(&j, "append_us_max", dec_series_max(&r->append_us));
    dec_json_num(&j, "server_us_p50", r->have_server ? dec_series_pct(&r->server_us, 50) : NAN);
    dec_json_num(&j, "work_us_p50", r->have_server ? dec_series_pct(&r->work_us, 50) : NAN);
    dec_json_num(&j, "task_max_us_p50",
                 r->have_server ? dec_series_pct(&r->task_max_us, 50) : NAN);
    dec_json_int(&j, "fid_steps", r->fid_steps);
    dec_json_int(&j, "fid_heads", (long long)f->recall.n);
    dec_json_num(&j, "recall_mean", dec_series_mean(&f->recall));
    dec_json_num(&j, "recall_p10", dec_series_pct(&f->recall, 10));
    dec_json_num(&j, "recall_min", dec_series_min(&f->recall));
    dec_json_num(&j, "mass_mean", dec_series_mean(&f->mass));
    dec_json_num(&j, "mass_p10", dec_series_pct(&f->mass, 10));
    dec_json_num(&j, "mass_min", dec_series_min(&f->mass));
    dec_json_num(&j, "retrieved_frac", f->recall.n ? f->retrieved / (double)f->recall.n : NAN);
    dec_json_int(&j, "lse_checked", (long long)f->lse_checked);
    dec_json_int(&j, "lse_mismatch", (long long)f->lse_mismatch);
    dec_json_num(&j, "lse_max_err", f->recall.n ? f->lse_max_err : NAN);
    dec_json_int(&j, "bad_positions", (long long)f->bad_positions);
    dec_json_int(&j, "daemon_exit", r->daemon_exit);
    dec_json_int(&j, "sweep_n", r->n_sweep);
    for (int i = 0; i < r->n_sweep; i++) { /* flat keys: sweep<i>_<figure> */
        const struct dec_sweep *w = &r->sweep[i];
        const struct {
            const char *name;
            double v;
        } f[] = {{"effort", w->effort},
                 {"attend_us_p50", w->attend_p50},
                 {"attend_us_p90", w->attend_p90},
                 {"attend_us_p99", w->attend_p99},
                 {"work_us_p50", w->work_p50},
                 {"server_us_p50", w->server_p50},
                 {"task_max_us_p50", w->task_max_p50},
                 {"recall_mean", w->recall_mean},
                 {"recall_p10", w->recall_p10},
                 {"mass_mean", w->mass_mean}};
        for (size_t k = 0; k < sizeof f / sizeof *f; k++) {
            char key[48];
            snprintf(key, sizeof key, "sweep%d_%s", i, f[k].name);
            dec_json_num(&j, key, f[k].v);
        }
    }
    dec_json_num(&j, "wall_s", r->wall_s);
    dec_json_end(&j);
}

static void print_table(const dec_cfg *c, const dec_run *r)
{
    const dec_fid *f = &r->fid;
    printf("ratd-bench-decode  %s, %d of %d layers, %d query / %d KV heads, dim %d, %s\n",
           c->trace ? c->trace : c->gen, c->layers, c->model_layers, c->q_heads, c->kv_heads,
           c->dim, ra_dtype_name(c->dtype));
    printf("  context %zu keys per KV head, index %s, top_k %d, effort %d, batch %d (%s), "
           "daemon %s %s with %u workers\n",
           c->context, dec_index_name(c->index), c->top_k, c->effort, c->batch, dec_batch_mode(),
           r->private_daemon ? "private" : "at", r->endpoint, r->info.workers);
    printf("\n%-34s %12s %12s %12s %12s %8s\n", "", "p50", "p90", "p99", "max", "n");
    printf("%-34s %12.1f %12.1f %12.1f %12.1f %8zu\n", "Attend per layer, us",
           dec_series_pct(&r->attend_us, 50), dec_series_pct(&r->attend_us, 90),
           dec_series_pct(&r->attend_us, 99), dec_series_max(&r->attend_us), r->attend_us.n);
    char lbl[64];
    snprintf(lbl, sizeof lbl, "token (%d layer%s), us", c->layers, c->layers > 1 ? "s" : "");
    printf("%-34s %12.1f %12s %12.1f %12.1f %8zu\n", lbl, dec_series_pct(&r->token_us, 50), "",
           dec_series_pct(&r->token_us, 99), dec_series_max(&r->token_us), r->token_us.n);
    printf("%-34s %12.1f %12s %12.1f %12.1f %8zu\n", "empty request (Hello), us",
           dec_series_pct(&r->rtt_us, 50), "", dec_series_pct(&r->rtt_us, 99),
           dec_series_max(&r->rtt_us), r->rtt_us.n);
    if (r->append_us.n) {
        snprintf(lbl, sizeof lbl, "Append of %d tokens, us", c->append_every);
        printf("%-34s %12.1f %12s %12.1f %12.1f %8zu\n", lbl, dec_series_pct(&r->append_us, 50), "",
               dec_series_pct(&r->append_us, 99), dec_series_max(&r->append_us), r->append_us.n);
    }
    if (r->have_server)
        printf("%-34s %12.1f / %.1f / %.1f\n", "daemon wall / work / longest task, us",
               dec_series_pct(&r->server_us, 50), dec_series_pct(&r->work_us, 50),
               dec_series_pct(&r->task_max_us, 50));
    printf("\ntoken over %d layers (p50 per layer x %d): %.2f ms\n", c->model_layers,
           c->model_layers, dec_series_pct(&r->attend_us, 50) * c->model_layers / 1000.0);
    printf("generate %.2f s, offload %.2f s (%.0f MiB), build ", r->gen_s, r->offload_s,
           r->offload_bytes / 1048576.0);
    if (c->gpu_build)
        printf("graphs built by ra_gpu_graph_build (%s) in %.2f s before the Offloads, then ",
               r->gpu_backend, r->gpu_build_s);
    if (r->index_ready)
        printf("%.2f s after the last Offload\n", r->build_s);
    else
        printf("not waited for\n");
    printf("memory per session %.1f MiB (%s)\n", r->session_bytes / 1048576.0,
           r->session_bytes_src ? r->session_bytes_src : "-");
    if (f->recall.n) {
        printf("\nfidelity on %d steps, %zu heads      mean      p10      min\n", r->fid_steps,
               f->recall.n);
        printf("  recall@%-5d                 %9.4f %8.4f %8.4f\n", c->top_k,
               dec_series_mean(&f->recall), dec_series_pct(&f->recall, 10),
               dec_series_min(&f->recall));
        printf("  attention mass / exact top-k %9.4f %8.4f %8.4f\n", dec_series_mean(&f->mass),
               dec_series_pct(&f->mass, 10), dec_series_min(&f->mass));
        printf("  lse mismatches %llu of %llu (largest error %.3g), bad positions %llu\n",
               (unsigned long long)f->lse_mismatch, (unsigned long long)f->lse_checked,
               f->lse_max_err, (unsigned long long)f->bad_positions);
    }
    if (r->n_sweep) {
        printf("\nsweep (same steps, no appends)  Attend p50    p90    p99 us  work p50 us  "
               "recall mean   p10  mass\n");
        for (int i = 0; i < r->n_sweep; i++) {
            const struct dec_sweep *w = &r->sweep[i];
            printf("  effort %-8d %18.1f %6.1f %6.1f %12.1f %12.4f %6.3f %6.4f\n", w->effort,
                   w->attend_p50, w->attend_p90, w->attend_p99, w->work_p50, w->recall_mean,
                   w->recall_p10, w->mass_mean);
        }
    }
}

int main(int argc, char **argv)
{
    dec_cfg c;
    parse_args(argc, argv, &c);
    dec_run r;
    memset(&r, 0, sizeof r);
    int rc = dec_run_all(&c, &r);
    if (rc == 0) {
        if (c.json)
            print_json(&c, &r);
        else
            print_table(&c, &r);
        if (r.fid.lse_mismatch || r.fid.bad_positions) {
            fprintf(stderr,
                    "ratd-bench-decode: the daemon's answers disagree with its own positions "
                    "(%llu lse mismatches, %llu bad positions): a bug\n",
                    (unsigned long long)r.fid.lse_mismatch,
                    (unsigned long long)r.fid.bad_positions);
            rc = 1;
        }
    }
    dec_run_free(&r);
    return rc;
}
