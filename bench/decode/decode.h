/* Internal interfaces of ratd-bench-decode, shared by its files: the configuration
 * (main.c), the decode data of a session and where it comes from (data.c: synthetic
 * generators, traces), the exact reference on sampled steps (fidelity.c), the daemon it
 * runs against (daemon.c), the calls that wait on a colleague's client API (pending.c)
 * and the report (report.c). The bench talks to ratd only through include/ratd/client.h. */
#ifndef RA_BENCH_DECODE_H
#define RA_BENCH_DECODE_H

#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

#include "ra_trace.h"
#include "ratd/client.h"

#define DEC_MAX_BATCH 64

typedef struct dec_cfg {
    const char *ratd_bin; /* private daemon (default: ../daemon/ratd next to this binary) */
    const char *endpoint; /* or a running one */
    const char *trace;    /* real heads instead of a generator */
    const char *gen;      /* generator name (synthetic data) */
    const char *synth;    /* generator knobs, "knob=v,..." */
    int layers;           /* layers run */
    int model_layers;     /* the full model's layers (the per-token extrapolation) */
    int q_heads, kv_heads, dim;
    ra_dtype dtype;
    size_t context; /* offloaded keys per KV head */
    int steps, warmup;
    int client_spin_us; /* ra_client_set_spin_us on the bench's client; 0: off */
    int top_k, effort;
    int sweep[16], n_sweep; /* --sweep: more decode passes at these efforts */
    int batch;
    int workers; /* passed to a private daemon; 0: its default */
    int threads; /* the bench's own threads (generation, exact reference); 0: all CPUs */
    ra_client_index_kind index;
    int sink, window; /* trace: the decoder's GPU-side sink and window */
    int n_train;      /* training queries per query head */
    int sample_every; /* fidelity on every N-th timed step; 0: off */
    int append_every; /* Append the N newest tokens every N steps; 0: off */
    uint64_t seed;
    int wait_index_ms; /* 0: do not wait for the index builds */
    int gpu_build;     /* build each head's graph with ra_gpu_graph_build, send it as GRAPH_ADJ */
    int json, force, quiet;
    /* flags given explicitly (a trace brings its own shape) */
    int set_layers, set_shape, set_context, set_gen, set_model_layers;
} dec_cfg;

const char *dec_index_name(ra_client_index_kind k);

/* ---- data ---------------------------------------------------------------------------- */

/* The decode data of one session: per (layer, KV head) the keys it offloads and those it
 * appends later, rounded to the session dtype (16-bit: the bench's exact reference scans
 * exactly the bits it sent), the training queries of every query head and the decode
 * queries in decode order. Row r of a head is position pos0 + r; rows n_off.. are the
 * appended ones. */
typedef struct dec_data {
    int n_layers, n_q, n_kv, dim;
    ra_dtype dtype;
    size_t n_off, n_app, n_train;
    int n_steps; /* decode queries per query head: warm-up + timed */
    int64_t pos0;
    uint16_t *k_off; /* [L][G][n_off][D] */
    uint16_t *k_app; /* [L][G][n_app][D] */
    float *q_train;  /* [L][H][n_train][D]; freed layer by layer after the Offload */
    float *q_dec;    /* [n_steps][L][H][D] */
    float *kmax;     /* [L][G] largest norm of a head's rounded keys */
    uint64_t vseed;  /* synthetic values */
    ra_trace *trace; /* not owned: a trace's values are read from it when sent */
    int trace_row0;  /* trace row of row 0 */
} dec_data;

/* A synthetic generator: one KV head's keys and the queries of its n_q query heads. */
typedef struct dec_gen_req {
    size_t n, n_train, n_dec; /* keys (positions 0..n-1), prefill and decode queries */
    int dim, n_q;
    uint64_t seed;
    const char *spec; /* knobs, may be NULL */
} dec_gen_req;

typedef struct dec_gen {
    const char *name;
    const char *about;
    /* checks the knobs before anything runs; a message in err */
    ra_status (*check)(const char *spec, char *err, size_t errlen);
    /* allocates (malloc) keys [n][dim] and, per query head h < n_q, train[h]
     * [n_train][dim] and dec[h] [n_dec][dim], fp32; the caller frees them */
    ra_status (*make)(const dec_gen_req *r, float **keys, float **train, float **dec);
} dec_gen;

/* NULL when no generator has that name. */
const dec_gen *dec_gen_find(const char *name);
/* "calibrated, ..." for --help */
void dec_gen_list(FILE *f);

/* Session `sess`'s data from generator g: layers, heads and sizes from c, context +
 * (append ? steps : 0) keys per head, seeds from (c->seed, sess, layer, KV head).
 * threads workers. A message in err on failure. */
ra_status dec_data_synth(const dec_cfg *c, const dec_gen *g, int sess, size_t n_app, dec_data *d,
                         char *err, size_t errlen);

/* A trace's heads: rows [sink, n - window - n_steps) offloaded, the next n_app rows
 * appended, training queries sampled among the rows before the offloaded keys' end,
 * decode queries the last n_steps rows. */
ra_status dec_data_trace(const dec_cfg *c, ra_trace *t, size_t n_app, dec_data *d, char *err,
                         size_t errlen);

void dec_data_free(dec_data *d);

/* Values of rows [row0, row0 + n) of (layer, g) in the session dtype into out[n][D]. */
ra_status dec_data_values(const dec_data *d, int layer, int g, size_t row0, size_t n,
                          uint16_t *out);

/* Row `row` of (layer, g): offloaded or appended. */
static inline const uint16_t *dec_key_row(const dec_data *d, int layer, int g, size_t row)
{
    size_t D = (size_t)d->dim;
    if (row < d->n_off)
        return d->k_off + (((size_t)layer * d->n_kv + g) * d->n_off + row) * D;
    return d->k_app + (((size_t)layer * d->n_kv + g) * d->n_app + (row - d->n_off)) * D;
}

static inline const float *dec_q_step(const dec_data *d, int step, int layer)
{
    return d->q_dec + (((size_t)step * d->n_layers + layer) * d->n_q) * (size_t)d->dim;
}

/* fp32 -> session dtype, round to nearest even */
void dec_round(const float *x, size_t n, ra_dtype t, uint16_t *out);
float dec_half_to_f32(uint16_t h, ra_dtype t);

/* Runs fn(ctx, i) for i in [0, n) on up to `threads` threads; returns when all are done. */
void dec_par_for(size_t n, int threads, void (*fn)(void *ctx, size_t i), void *ctx);
int dec_threads(const dec_cfg *c);

/* ---- fidelity -------------------------------------------------------------------------- */

/* A growable series of samples (report.c). */
typedef struct dec_series {
    double *v;
    size_t n, cap;
} dec_series;

/* What the daemon answered for one (session, layer) on a sampled step. */
typedef struct dec_answer {
    const float *q;     /* [H][D] the query sent */
    const float *lse;   /* [H] */
    const int64_t *pos; /* [H][top_k] */
    const int32_t *counts;
} dec_answer;

typedef struct dec_fid {
    dec_series recall, mass; /* one per (step, session, layer, query head) */
    uint64_t lse_checked, lse_mismatch, bad_positions;
    double lse_max_err;
    double retrieved; /* sum over heads of counts / top_k */
} dec_fid;

/* Adds the exact comparison of the answers of n sessions x L layers (ans[s][l],
 * data[s]) with n_rows rows held per head (offloaded + appended so far). */
ra_status dec_fid_add(dec_fid *f, dec_data *const *data, int n, const dec_answer *ans,
                      size_t n_rows, int top_k, int threads);
void dec_fid_free(dec_fid *f);

/* ---- daemon ---------------------------------------------------------------------------- */

typedef struct dec_daemon {
    int pid; /* 0: none started (external endpoint) */
    char endpoint[300];
    char sock[256];
} dec_daemon;

/* The ratd of this build tree (../daemon/ratd beside this executable) into buf; 0 when it
 * exists and is executable. */
int dec_daemon_default_bin(char *buf, size_t len);
/* Starts bin on a private ipc:// endpoint (workers > 0: --workers) and waits until it
 * answers Hello; stopped by dec_daemon_stop (also at exit and on SIGINT / SIGTERM). */
ra_status dec_daemon_start(dec_daemon *dm, const char *bin, int workers, char *err, size_t errlen);
/* SIGTERM and wait; returns the exit status (0 clean), -1 when it had to be killed. */
int dec_daemon_stop(dec_daemon *dm);

/* ---- the client API still to come (pending.c) ------------------------------------------- */

/* "batched" when ra_client_attend_batch is in this tree's client, else "sequential" (B
 * synchronous Attends, one per session). */
const char *dec_batch_mode(void);

/* One layer's Attend for n sessions: q [n][H][D] contiguous, out arrays with a leading
 * [n] dimension. server_us / work_us / task_max_us (may be NULL) get the daemon's figures
 * summed over the requests made, or stay untouched when the client does not report them
 * (returns with *have_server = 0). */
ra_status dec_attend_layer(ra_client *c, const uint64_t *sessions, int n, int layer,
                           const ra_attend_req *r, const ra_attend_out *out, int *have_server,
                           double *server_us, double *work_us, double *task_max_us);

/* Bytes a session holds on the daemon, when ra_session_stats reports them (1), else 0. */
int dec_session_bytes(const ra_session_stats *st, uint64_t *bytes);

/* ---- the run ---------------------------------------------------------------------------- */

/* Everything a run measured, and its plan. */
typedef struct dec_run {
    size_t n_app;   /* keys held back per head for Append */
    size_t n_train; /* training queries per query head sent (a trace may have fewer rows) */
    int s_total;    /* decode steps: warm-up + timed */
    int private_daemon;
    char endpoint[300];
    ra_server_info info;
    /* memory, bytes: the daemon's K, V and positions; its indexes (estimate); the bench */
    double mem_kv, mem_index, mem_bench, mem_avail;
    int mem_local; /* the daemon runs on this host (counted against MemAvailable) */
    double gen_s, offload_s, build_s, wall_s;
    double gpu_build_s;       /* --gpu-build: ra_gpu_graph_build of every head, summed */
    const char *gpu_backend;  /* --gpu-build: "cuda" or "cpu" */
    double offload_bytes;
    int index_ready;
    dec_series attend_us, token_us, rtt_us, append_us, server_us, work_us, task_max_us;
    int have_server;
    uint64_t appended;
    dec_fid fid;
    int fid_steps;
    double session_bytes;
    const char *session_bytes_src;
    int daemon_exit; /* private daemon's exit status after SIGTERM */
    /* --sweep: one more pass over the same decode steps per effort, on the sessions as
     * the main pass left them (appends done, no more appended) */
    struct dec_sweep {
        int effort;
        double attend_p50, attend_p90, attend_p99, work_p50, server_p50, task_max_p50;
        double recall_mean, recall_p10, mass_mean;
    } sweep[16];
    int n_sweep;
} dec_run;

/* Runs the benchmark (c's shape is completed from a trace); 0, or 1 after a message. */
int dec_run_all(dec_cfg *c, dec_run *r);
void dec_run_free(dec_run *r);

/* ---- report ---------------------------------------------------------------------------- */

int dec_series_add(dec_series *s, double x);
/* nearest rank: the smallest value with at least p % of the values at or below it; NAN
 * when empty */
double dec_series_pct(const dec_series *s, double p);
double dec_series_mean(const dec_series *s);
double dec_series_max(const dec_series *s);
double dec_series_min(const dec_series *s);
void dec_series_free(dec_series *s);

/* A flat JSON object written by hand: keys are literals, strings escaped, NAN -> null. */
typedef struct dec_json {
    FILE *f;
    int n;
} dec_json;

void dec_json_begin(dec_json *j, FILE *f);
void dec_json_num(dec_json *j, const char *key, double v);
void dec_json_int(dec_json *j, const char *key, long long v);
void dec_json_str(dec_json *j, const char *key, const char *v); /* NULL -> null */
void dec_json_bool(dec_json *j, const char *key, int v);
void dec_json_end(dec_json *j);

#endif
