/* The decode data of ratd-bench-decode: where a session's keys, values and queries come
 * from (a synthetic generator from a table, or the real heads of a trace), generated in
 * parallel, one task per (layer, KV head), and kept compactly: keys as the 16-bit
 * values the daemon receives, values not at all (made again, or read from the trace,
 * when they are sent: no figure depends on them). */
#define _GNU_SOURCE
#include <math.h>
#include <pthread.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "decode.h"
#include "ra_half.h"
#include "synth.h"
#include "synth_lin.h"

/* ---- small helpers --------------------------------------------------------------------- */

void dec_round(const float *x, size_t n, ra_dtype t, uint16_t *out)
{
    if (t == RA_DTYPE_BF16)
        for (size_t i = 0; i < n; i++)
            out[i] = ra_f32_to_bf16(x[i]);
    else
        for (size_t i = 0; i < n; i++)
            out[i] = ra_f32_to_f16(x[i]);
}

float dec_half_to_f32(uint16_t h, ra_dtype t)
{
    return t == RA_DTYPE_BF16 ? ra_bf16_to_f32(h) : ra_f16_to_f32(h);
}

typedef struct par_ctx {
    size_t n, next;
    pthread_mutex_t mu;
    void (*fn)(void *, size_t);
    void *ctx;
} par_ctx;

static void *par_worker(void *arg)
{
    par_ctx *p = arg;
    for (;;) {
        pthread_mutex_lock(&p->mu);
        size_t i = p->next++;
        pthread_mutex_unlock(&p->mu);
        if (i >= p->n)
            return NULL;
        p->fn(p->ctx, i);
    }
}

void dec_par_for(size_t n, int threads, void (*fn)(void *ctx, size_t i), void *ctx)
{
    par_ctx p = {.n = n, .fn = fn, .ctx = ctx};
    pthread_mutex_init(&p.mu, NULL);
    int nt = threads < 1 ? 1 : threads;
    if ((size_t)nt > n)
        nt = (int)n;
    pthread_t th[256];
    int started = 0;
    for (int i = 1; i < nt && i < 256; i++)
        if (pthread_create(&th[started], NULL, par_worker, &p) == 0)
            started++;
    par_worker(&p); /* this thread works too: the loop finishes even if no thread started */
    for (int i = 0; i < started; i++)
        pthread_join(th[i], NULL);
    pthread_mutex_destroy(&p.mu);
}

int dec_threads(const dec_cfg *c)
{
    if (c->threads > 0)
        return c->threads;
    long n = sysconf(_SC_NPROCESSORS_ONLN);
    return n > 0 ? (int)(n < 256 ? n : 256) : 1;
}

/* splitmix64's finaliser over a combination: seeds of sessions, layers and heads */
static uint64_t mix(uint64_t a, uint64_t b)
{
    uint64_t z = a ^ (b * 0x9e3779b97f4a7c15ull + 0x632be59bd9b4e019ull + (a << 6) + (a >> 2));
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

static float row_norm(const uint16_t *k, int D, ra_dtype t)
{
    double s = 0;
    for (int j = 0; j < D; j++) {
        double x = dec_half_to_f32(k[j], t);
        s += x * x;
    }
    return (float)sqrt(s);
}

/* ---- generators ------------------------------------------------------------------------ */

static ra_status calibrated_check(const char *spec, char *err, size_t errlen)
{
    ra_synth_opts o;
    ra_synth_opts_default(&o);
    return spec ? ra_synth_opts_apply(&o, spec, err, errlen) : RA_OK;
}

/* bench/index/synth.c's generator, calibrated against the trained model's heads: the KV
 * head's seed draws keys, basis, spectra and means; query head h draws its own stream on
 * them with qseed h + 1 */
static ra_status calibrated_make(const dec_gen_req *r, float **keys, float **train, float **dec)
{
    ra_synth_opts o;
    ra_synth_opts_default(&o);
    if (r->spec && ra_synth_opts_apply(&o, r->spec, NULL, 0) != RA_OK)
        return RA_EINVAL;
    o.n = r->n;
    o.dim = r->dim;
    o.n_train = r->n_train;
    o.n_queries = r->n_dec;
    o.seed = r->seed;
    uint64_t qs[RA_SYNTH_MAX_GROUP];
    ra_synth s[RA_SYNTH_MAX_GROUP];
    if (r->n_q < 1 || r->n_q > RA_SYNTH_MAX_GROUP)
        return RA_EINVAL;
    for (int h = 0; h < r->n_q; h++)
        qs[h] = (uint64_t)h + 1;
    ra_status st = ra_synth_make_group(&o, r->n_q, qs, s);
    if (st != RA_OK)
        return st;
    *keys = s[0].keys;
    for (int h = 0; h < r->n_q; h++) {
        train[h] = s[h].train_q;
        dec[h] = s[h].queries;
    }
    return RA_OK;
}

/* bench/index/synth_lin.c's hidden-state generator: keys and queries are different linear
 * maps of one token stream's hidden states (token-match heads, a query bias on the keys'
 * weakest RoPE pairs); its knobs: name=value,... of the float and int fields below */
static ra_status lin_apply(ra_synth_lin_opts *o, const char *spec, char *err, size_t errlen)
{
    static const struct {
        const char *name;
        size_t off;
        int is_int;
    } knobs[] = {
        {"hidden", offsetof(ra_synth_lin_opts, hidden), 1},
        {"vocab", offsetof(ra_synth_lin_opts, vocab), 1},
        {"topics", offsetof(ra_synth_lin_opts, topics), 1},
        {"segment", offsetof(ra_synth_lin_opts, segment), 1},
        {"zipf", offsetof(ra_synth_lin_opts, zipf), 0},
        {"match", offsetof(ra_synth_lin_opts, match), 0},
        {"proj", offsetof(ra_synth_lin_opts, proj), 0},
        {"offset", offsetof(ra_synth_lin_opts, offset), 0},
        {"kdecay", offsetof(ra_synth_lin_opts, kdecay), 0},
        {"rope_base", offsetof(ra_synth_lin_opts, rope_base), 0},
    };
    char buf[512];
    if (!spec || !*spec)
        return RA_OK;
    if (strlen(spec) >= sizeof buf) {
        if (err)
            snprintf(err, errlen, "--synth: longer than %zu characters", sizeof buf - 1);
        return RA_EINVAL;
    }
    strcpy(buf, spec);
    for (char *save = NULL, *tok = strtok_r(buf, ",", &save); tok;
         tok = strtok_r(NULL, ",", &save)) {
        char *eq = strchr(tok, '=');
        size_t i = 0, nk = sizeof knobs / sizeof *knobs;
        if (eq) {
            *eq = 0;
            while (i < nk && strcmp(knobs[i].name, tok))
                i++;
        }
        char *end = NULL;
        double v = eq ? strtod(eq + 1, &end) : 0;
        if (!eq || i == nk || end == eq + 1 || *end || !isfinite(v) || v < -1e6 || v > 1e9) {
            if (err)
                snprintf(err, errlen,
                         "--synth (lin): '%s' is not name=number with name one of hidden, "
                         "vocab, topics, segment, zipf, match, proj, offset, kdecay, rope_base",
                         tok);
            return RA_EINVAL;
        }
        if (knobs[i].is_int)
            *(int *)((char *)o + knobs[i].off) = (int)v;
        else
            *(float *)((char *)o + knobs[i].off) = (float)v;
    }
    return RA_OK;
}

static ra_status lin_check(const char *spec, char *err, size_t errlen)
{
    ra_synth_lin_opts o;
    ra_synth_lin_opts_default(&o);
    return lin_apply(&o, spec, err, errlen);
}

static ra_status lin_make(const dec_gen_req *r, float **keys, float **train, float **dec)
{
    ra_synth_lin_opts o;
    ra_synth_lin_opts_default(&o);
    if (lin_apply(&o, r->spec, NULL, 0) != RA_OK)
        return RA_EINVAL;
    o.n = r->n;
    o.dim = r->dim;
    o.n_rep = r->n_q;
    o.n_train = r->n_train;
    o.n_queries = r->n_dec;
    o.seed = r->seed;
    o.threads = 1; /* the bench runs one generator call per thread */
    ra_synth_group s;
    ra_status st = ra_synth_lin_make(&o, &s);
    if (st != RA_OK)
        return st;
    size_t tb = r->n_train * (size_t)r->dim * sizeof(float);
    size_t db = r->n_dec * (size_t)r->dim * sizeof(float);
    int h = 0;
    for (; h < r->n_q; h++) { /* one array per head: the caller frees each */
        train[h] = malloc(tb ? tb : 1);
        dec[h] = malloc(db ? db : 1);
        if (!train[h] || !dec[h])
            break;
        memcpy(train[h], s.train_q + (size_t)h * r->n_train * r->dim, tb);
        memcpy(dec[h], s.queries + (size_t)h * r->n_dec * r->dim, db);
    }
    if (h < r->n_q) {
        for (int i = 0; i <= h && i < r->n_q; i++) {
            free(train[i]);
            free(dec[i]);
            train[i] = dec[i] = NULL;
        }
        ra_synth_group_free(&s);
        return RA_ENOMEM;
    }
    *keys = s.keys;
    s.keys = NULL;
    ra_synth_group_free(&s);
    return RA_OK;
}

/* To add a generator: one row (name, what it is, a knob check, a maker). */
static const dec_gen g_gens[] = {
    {"calibrated",
     "bench/index/synth.c, calibrated to the trained model's heads (knobs: synth.h via --synth)",
     calibrated_check, calibrated_make},
    {"lin",
     "bench/index/synth_lin.c, an independent hidden-state generator (k = W_K h, q = W_Q h; "
     "knobs: synth_lin.h via --synth)",
     lin_check, lin_make},
};

const dec_gen *dec_gen_find(const char *name)
{
    for (size_t i = 0; i < sizeof g_gens / sizeof *g_gens; i++)
        if (strcmp(g_gens[i].name, name) == 0)
            return &g_gens[i];
    return NULL;
}

void dec_gen_list(FILE *f)
{
    for (size_t i = 0; i < sizeof g_gens / sizeof *g_gens; i++)
        fprintf(f, "    %-12s %s\n", g_gens[i].name, g_gens[i].about);
}

/* ---- a session's data ------------------------------------------------------------------ */

void dec_data_free(dec_data *d)
{
    free(d->k_off);
    free(d->k_app);
    free(d->q_train);
    free(d->q_dec);
    free(d->kmax);
    memset(d, 0, sizeof *d);
}

static ra_status data_alloc(dec_data *d)
{
    size_t L = (size_t)d->n_layers, G = (size_t)d->n_kv, H = (size_t)d->n_q, D = (size_t)d->dim;
    d->k_off = malloc(L * G * d->n_off * D * sizeof *d->k_off);
    d->k_app = malloc((d->n_app ? L * G * d->n_app * D : 1) * sizeof *d->k_app);
    d->q_train = malloc((d->n_train ? L * H * d->n_train * D : 1) * sizeof *d->q_train);
    d->q_dec = malloc((size_t)d->n_steps * L * H * D * sizeof *d->q_dec);
    d->kmax = calloc(L * G, sizeof *d->kmax);
    if (!d->k_off || !d->k_app || !d->q_train || !d->q_dec || !d->kmax) {
        dec_data_free(d);
        return RA_ENOMEM;
    }
    return RA_OK;
}

/* Rounds a head's fp32 keys (rows [0, n_off + n_app)) into place, with their largest norm. */
static void store_keys(dec_data *d, int l, int g, const float *keys)
{
    size_t D = (size_t)d->dim;
    uint16_t *off = d->k_off + ((size_t)l * d->n_kv + g) * d->n_off * D;
    dec_round(keys, d->n_off * D, d->dtype, off);
    if (d->n_app)
        dec_round(keys + d->n_off * D, d->n_app * D, d->dtype,
                  d->k_app + ((size_t)l * d->n_kv + g) * d->n_app * D);
    float m = 0;
    for (size_t r = 0; r < d->n_off + d->n_app; r++) {
        float x = row_norm(dec_key_row(d, l, g, r), (int)D, d->dtype);
        m = x > m ? x : m;
    }
    d->kmax[(size_t)l * d->n_kv + g] = m;
}

static void store_queries(dec_data *d, int l, int h, const float *train, const float *dec)
{
    size_t D = (size_t)d->dim;
    if (d->n_train)
        memcpy(d->q_train + ((size_t)l * d->n_q + h) * d->n_train * D, train,
               d->n_train * D * sizeof *train);
    for (int t = 0; t < d->n_steps; t++)
        memcpy((float *)dec_q_step(d, t, l) + (size_t)h * D, dec + (size_t)t * D, D * sizeof *dec);
}

/* Runs task(job, i) for every (layer, KV head) i on the bench's threads; each task leaves
 * its status in (*st)[i] (an array made here). The first failure names its head. */
static ra_status per_head(const dec_cfg *c, dec_data *d, void (*task)(void *, size_t), void *job,
                          ra_status **st, const char *what, char *err, size_t errlen)
{
    size_t n = (size_t)d->n_layers * d->n_kv;
    ra_status s = RA_OK;
    if (!(*st = calloc(n, sizeof **st))) {
        snprintf(err, errlen, "out of memory");
        return RA_ENOMEM;
    }
    dec_par_for(n, dec_threads(c), task, job);
    for (size_t i = 0; i < n && s == RA_OK; i++)
        if ((s = (*st)[i]) != RA_OK)
            snprintf(err, errlen, "%s, layer %zu KV head %zu: %s", what, i / (size_t)d->n_kv,
                     i % (size_t)d->n_kv, ra_strerror(s));
    free(*st);
    *st = NULL;
    return s;
}

typedef struct synth_job {
    dec_data *d;
    const dec_gen *g;
    const char *spec;
    uint64_t seed;
    ra_status *st; /* [L * G] */
} synth_job;

static void synth_task(void *arg, size_t i)
{
    synth_job *j = arg;
    dec_data *d = j->d;
    int l = (int)(i / (size_t)d->n_kv), g = (int)(i % (size_t)d->n_kv), grp = d->n_q / d->n_kv;
    dec_gen_req r = {.n = d->n_off + d->n_app,
                     .n_train = d->n_train,
                     .n_dec = (size_t)d->n_steps,
                     .dim = d->dim,
                     .n_q = grp,
                     .seed = mix(j->seed, i),
                     .spec = j->spec};
    float *keys = NULL, *train[RA_SYNTH_MAX_GROUP] = {0}, *dec[RA_SYNTH_MAX_GROUP] = {0};
    j->st[i] = j->g->make(&r, &keys, train, dec);
    if (j->st[i] == RA_OK) {
        store_keys(d, l, g, keys);
        for (int h = 0; h < grp; h++)
            store_queries(d, l, g * grp + h, train[h], dec[h]);
    }
    free(keys);
    for (int h = 0; h < grp; h++) {
        free(train[h]);
        free(dec[h]);
    }
}

ra_status dec_data_synth(const dec_cfg *c, const dec_gen *g, int sess, size_t n_app, dec_data *d,
                         char *err, size_t errlen)
{
    memset(d, 0, sizeof *d);
    d->n_layers = c->layers;
    d->n_q = c->q_heads;
    d->n_kv = c->kv_heads;
    d->dim = c->dim;
    d->dtype = c->dtype;
    d->n_off = c->context;
    d->n_app = n_app;
    d->n_train = (size_t)c->n_train;
    d->n_steps = c->warmup + c->steps;
    d->pos0 = 0;
    uint64_t sseed = mix(c->seed, (uint64_t)sess);
    d->vseed = mix(sseed, 0x76616c756573ull); /* "values" */
    if (d->n_q / d->n_kv > RA_SYNTH_MAX_GROUP) {
        snprintf(err, errlen, "%d query heads per KV head: at most %d", d->n_q / d->n_kv,
                 RA_SYNTH_MAX_GROUP);
        return RA_EINVAL;
    }
    if (data_alloc(d) != RA_OK) {
        snprintf(err, errlen, "out of memory for session %d's data", sess);
        return RA_ENOMEM;
    }
    synth_job j = {d, g, c->synth, sseed, NULL};
    char what[64];
    snprintf(what, sizeof what, "generator %s", g->name);
    ra_status s = per_head(c, d, synth_task, &j, &j.st, what, err, errlen);
    if (s != RA_OK)
        dec_data_free(d);
    return s;
}

/* ---- a trace's heads ------------------------------------------------------------------- */

typedef struct trace_job {
    dec_data *d;
    ra_trace *t;
    const unsigned *train_rows;
    unsigned n_pos, sink;
    ra_status *st;
} trace_job;

static void trace_task(void *arg, size_t i)
{
    trace_job *j = arg;
    dec_data *d = j->d;
    int l = (int)(i / (size_t)d->n_kv), g = (int)(i % (size_t)d->n_kv), grp = d->n_q / d->n_kv;
    size_t D = (size_t)d->dim, nk = d->n_off + d->n_app;
    float *buf = malloc((nk > j->n_pos ? nk : j->n_pos) * D * sizeof *buf);
    float *tq = malloc((d->n_train ? d->n_train : 1) * D * sizeof *tq);
    ra_status s = buf && tq ? RA_OK : RA_ENOMEM;
    if (s == RA_OK && (s = ra_trace_read(j->t, RA_TRACE_K, (uint32_t)l, (uint32_t)g, j->sink,
                                         (uint32_t)nk, buf)) == RA_OK)
        store_keys(d, l, g, buf);
    for (int hh = 0; hh < grp && s == RA_OK; hh++) {
        int h = g * grp + hh;
        if ((s = ra_trace_read(j->t, RA_TRACE_Q, (uint32_t)l, (uint32_t)h, 0, j->n_pos, buf)) !=
            RA_OK)
            break;
        for (size_t q = 0; q < d->n_train; q++)
            memcpy(tq + q * D, buf + (size_t)j->train_rows[q] * D, D * sizeof *buf);
        store_queries(d, l, h, tq, buf + (size_t)(j->n_pos - (unsigned)d->n_steps) * D);
    }
    free(buf);
    free(tq);
    j->st[i] = s;
}

ra_status dec_data_trace(const dec_cfg *c, ra_trace *t, size_t n_app, dec_data *d, char *err,
                         size_t errlen)
{
    const ra_trace_info *in = ra_trace_get_info(t);
    memset(d, 0, sizeof *d);
    unsigned P = in->n_pos, S = (unsigned)(c->warmup + c->steps);
    if ((uint64_t)c->sink + c->window + S + c->top_k > P) { /* run.c said why */
        snprintf(err, errlen, "%s is too short for the request", c->trace);
        return RA_EINVAL;
    }
    unsigned end = P - (unsigned)c->window - S; /* the offloaded rows end here */
    d->n_layers = c->layers;
    d->n_q = (int)in->n_heads;
    d->n_kv = (int)in->n_kv_heads;
    d->dim = (int)in->head_dim;
    d->dtype = c->dtype;
    d->n_off = end - (unsigned)c->sink;
    d->n_app = n_app; /* rows [end, end + n_app): the tokens leaving the window */
    d->n_steps = (int)S;
    d->pos0 = (int64_t)in->pos0 + c->sink;
    d->trace = t;
    d->trace_row0 = c->sink;
    unsigned nr = (unsigned)c->n_train < end ? (unsigned)c->n_train : end;
    unsigned *rows = malloc((nr ? nr : 1) * sizeof *rows);
    if (!rows) {
        snprintf(err, errlen, "out of memory");
        return RA_ENOMEM;
    }
    d->n_train = ra_trace_sample_train(end, (unsigned)c->n_train, rows);
    if (data_alloc(d) != RA_OK) {
        free(rows);
        snprintf(err, errlen, "out of memory for the trace's data");
        return RA_ENOMEM;
    }
    trace_job j = {d, t, rows, P, (unsigned)c->sink, NULL};
    ra_status s = per_head(c, d, trace_task, &j, &j.st, c->trace, err, errlen);
    free(rows);
    if (s != RA_OK)
        dec_data_free(d);
    return s;
}

ra_status dec_data_values(const dec_data *d, int layer, int g, size_t row0, size_t n, uint16_t *out)
{
    size_t D = (size_t)d->dim;
    if (d->trace) {
        float *buf = malloc((n ? n : 1) * D * sizeof *buf);
        if (!buf)
            return RA_ENOMEM;
        ra_status s = ra_trace_read(d->trace, RA_TRACE_V, (uint32_t)layer, (uint32_t)g,
                                    (uint32_t)(d->trace_row0 + row0), (uint32_t)n, buf);
        if (s == RA_OK)
            dec_round(buf, n * D, d->dtype, out);
        free(buf);
        return s;
    }
    /* synthetic: uniform in [-1, 1) from (session, layer, head, row), cheap to remake */
    uint64_t hs = mix(mix(d->vseed, (uint64_t)layer), (uint64_t)g);
    float row[4096];
    for (size_t r = 0; r < n; r++) {
        uint64_t s = mix(hs, row0 + r);
        for (size_t j = 0; j < D; j++) {
            s = s * 6364136223846793005ull + 1442695040888963407ull;
            row[j] = (float)((double)(s >> 40) * (2.0 / 16777216.0) - 1.0);
        }
        dec_round(row, D, d->dtype, out + r * D);
    }
    return RA_OK;
}
