/* The synthetic head generator and the Mahalanobis OOD measure (synth.h).
 *
 * Model, in a random orthonormal basis B of R^dim (pre-RoPE):
 *   key   k_p = mu_k + B diag(s_k) z_p,            s_k decays (anisotropic), z ~ N(0, I)
 *   query q_t = mu_q + B diag(s_q) w_t + needles,  s_q puts its energy where s_k is small
 * then both are rotated by RoPE at their position (pairs (j, j + dim/2), HF layout,
 * theta_j = base^(-2j/dim); base 5e7 by default, slower than the trained model's 500000, which
 * stands for content sitting on the slower pairs, as in trained heads: calibrated with
 * --overlap, bench/README.md). mu_q - mu_k is large and lies in the keys' low-variance
 * directions, which is what makes queries out of distribution: the ranking of keys by
 * q.k is decided by directions the keys barely vary in, so clusters and proximity
 * graphs built from the keys alone do not predict it. A few hub keys get an extra
 * component along the query mean (heavy hitters for most queries), and each query
 * adds `needles` planted keys (copy-head behaviour). Decode queries follow an AR(1)
 * process w_{t+1} = rho w_t + sqrt(1 - rho^2) e and change topic with probability
 * tswitch per step (defaults calibrated to the trained model's heads). */
#include "synth.h"

#include <errno.h>
#include <math.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* splitmix64: small, seedable, the same on every platform */
static uint64_t rng_next(uint64_t *s)
{
    uint64_t z = (*s += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

static double rng_unif(uint64_t *s)
{
    return ((double)(rng_next(s) >> 11) + 0.5) * (1.0 / 9007199254740992.0);
}

static double rng_norm(uint64_t *s)
{
    double u = rng_unif(s), v = rng_unif(s);
    return sqrt(-2.0 * log(u)) * cos(6.283185307179586 * v);
}

void ra_synth_opts_default(ra_synth_opts *o)
{
    memset(o, 0, sizeof *o);
    o->n = 32768;
    o->dim = 128;
    o->n_train = 4096;
    o->n_queries = 1000;
    o->seed = 1;
    /* calibrated against the trained model's heads with --overlap (bench/README.md,
     * "The synthetic head"): step-to-step similarity, consecutive top-k overlap and the
     * overlap with the nearest prefill query all in the middle of the real heads' range */
    o->rho = 0.3f;
    o->offset = 1.0f;
    o->hub_frac = 0.0002f;
    o->needles = 2;
    o->needle_gain = 1.0f;
    o->rank = 16;
    o->mix = 2.0f;
    o->qscale = 3.0f;
    o->qnoise = 0.05f;
    o->blur = 0.5f;
    o->topics = 64;
    o->tnoise = 0.3f;
    o->tswitch = 0.5f;
    o->tzipf = 1.0f;
    o->rope_base = 5e7f;
    o->tneedle = 0.5f;
    o->vocab = 2048;
    o->knoise = 0.5f;
}

/* --synth knob names and the fields of ra_synth_opts they set; each field is an int
 * or a float, and the table takes which from the field's type */
#define KNOB(name, field)                                                                          \
    {                                                                                              \
        name, offsetof(ra_synth_opts, field),                                                      \
            _Generic(((ra_synth_opts *)0)->field, int : 1, float : 0)                              \
    }
static const struct {
    const char *name;
    size_t off;
    int is_int;
} knobs[] = {
    KNOB("offset", offset),   KNOB("mix", mix),
    KNOB("rank", rank),       KNOB("qscale", qscale),
    KNOB("qnoise", qnoise),   KNOB("hub", hub_frac),
    KNOB("needles", needles), KNOB("needle_gain", needle_gain),
    KNOB("topics", topics),   KNOB("tnoise", tnoise),
    KNOB("tswitch", tswitch), KNOB("tzipf", tzipf),
    KNOB("tneedle", tneedle), KNOB("trainatn", train_at_n),
    KNOB("kdecay", kdecay),   KNOB("krank", krank),
    KNOB("kslow", kslow),     KNOB("rope_base", rope_base),
    KNOB("rho", rho),         KNOB("vocab", vocab),
    KNOB("knoise", knoise),   KNOB("blur", blur),
};
#undef KNOB

ra_status ra_synth_opts_apply(ra_synth_opts *o, const char *spec, char *err, size_t errlen)
{
    if (!o || !spec)
        return RA_EINVAL;
    ra_synth_opts t = *o; /* all or nothing */
    const char *p = spec;
    while (*p) {
        const char *end = strchr(p, ',');
        size_t len = end ? (size_t)(end - p) : strlen(p);
        char tok[128];
        if (len == 0 || len >= sizeof tok) {
            if (err && errlen)
                snprintf(err, errlen, "--synth: empty or overlong item in '%s'", spec);
            return RA_EINVAL;
        }
        memcpy(tok, p, len);
        tok[len] = 0;
        p += len + (end ? 1 : 0);
        char *eq = strchr(tok, '=');
        if (!eq) {
            if (err && errlen)
                snprintf(err, errlen, "--synth: %s is not knob=value", tok);
            return RA_EINVAL;
        }
        *eq = 0;
        size_t x = 0;
        while (x < sizeof knobs / sizeof *knobs && strcmp(tok, knobs[x].name))
            x++;
        if (x == sizeof knobs / sizeof *knobs) {
            if (err && errlen)
                snprintf(err, errlen, "--synth: unknown knob %s", tok);
            return RA_EINVAL;
        }
        char *vend;
        errno = 0;
        double v = strtod(eq + 1, &vend);
        if (errno || vend == eq + 1 || *vend || !isfinite(v) ||
            (knobs[x].is_int && (v != floor(v) || fabs(v) > 1e9))) {
            if (err && errlen)
                snprintf(err, errlen, "--synth: %s takes %s, got '%s'", tok,
                         knobs[x].is_int ? "an integer" : "a number", eq + 1);
            return RA_EINVAL;
        }
        char *field = (char *)&t + knobs[x].off;
        if (knobs[x].is_int)
            *(int *)field = (int)v;
        else
            *(float *)field = (float)v;
    }
    *o = t;
    return RA_OK;
}

void ra_synth_free(ra_synth *s)
{
    if (!s)
        return;
    free(s->keys);
    free(s->train_q);
    free(s->queries);
    memset(s, 0, sizeof *s);
}

/* Gram-Schmidt on perturbed coordinate vectors: an orthonormal basis, rows of B,
 * whose i-th direction lies mostly on the i-th slowest RoPE coordinate. Real heads
 * put their key energy in the low-frequency dimensions (slow rotation keeps content
 * there); the random part (`blur`) spreads each direction over others. */
static void rand_orthonormal(double *B, int d, uint64_t *rs, double blur, int kslow)
{
    int h = d / 2;
    for (int i = 0; i < d; i++) {
        double *b = B + (size_t)i * d;
        /* strong key directions (i < d/2) on the middle pairs, the query subspace
         * (d/2 <= i < 3d/4, weak for keys) on the slowest pairs, the weakest on the
         * fastest pairs. Slow pairs keep a query's ranking stable across positions,
         * as content dimensions do in trained models. */
        int pair;
        if (i < d / 2)
            pair = kslow ? 3 * h / 4 - 1 - i / 2 /* pairs 3h/4 - 1 .. h/4, slow first */
                         : h / 4 + i / 2;        /* pairs h/4 .. 3h/4 - 1 */
        else if (i < 3 * d / 4)
            pair = h - 1 - (i - d / 2) / 2; /* pairs h - 1 .. 3h/4 */
        else
            pair = (i - 3 * d / 4) / 2;        /* pairs 0 .. h/4 - 1 */
        int coord = (i & 1) ? pair + h : pair; /* HF layout: (j, j + d/2) */
        for (;;) {
            for (int j = 0; j < d; j++)
                b[j] = blur * rng_norm(rs) / sqrt((double)d) + (j == coord ? 1.0 : 0.0);
            for (int pass = 0; pass < 2; pass++)
                for (int k = 0; k < i; k++) {
                    const double *c = B + (size_t)k * d;
                    double dot = 0;
                    for (int j = 0; j < d; j++)
                        dot += b[j] * c[j];
                    for (int j = 0; j < d; j++)
                        b[j] -= dot * c[j];
                }
            double nn = 0;
            for (int j = 0; j < d; j++)
                nn += b[j] * b[j];
            if (nn > 1e-12) {
                nn = 1.0 / sqrt(nn);
                for (int j = 0; j < d; j++)
                    b[j] *= nn;
                break;
            }
        }
    }
}

/* RoPE at position pos, HF rotate_half layout: pairs (j, j + d/2). */
static void rope(float *x, int d, double pos, double base)
{
    int h = d / 2;
    for (int j = 0; j < h; j++) {
        double th = pos * pow(base, -2.0 * j / d);
        double c = cos(th), s = sin(th);
        double a = x[j], b = x[j + h];
        x[j] = (float)(a * c - b * s);
        x[j + h] = (float)(a * s + b * c);
    }
}

/* x = mu + sum_i coef[i] * scale[i] * B_i */
static void compose(float *x, const double *mu, const double *B, const double *scale,
                    const double *coef, int d)
{
    double acc[4096];
    for (int j = 0; j < d; j++)
        acc[j] = mu[j];
    for (int i = 0; i < d; i++) {
        double c = coef[i] * scale[i];
        if (c == 0.0)
            continue;
        const double *b = B + (size_t)i * d;
        for (int j = 0; j < d; j++)
            acc[j] += c * b[j];
    }
    for (int j = 0; j < d; j++)
        x[j] = (float)acc[j];
}

/* The key side of one KV head and the parameters of its query model (basis, spectra,
 * means, query subspace): everything the query heads sharing the KV head have in
 * common. What a query head draws from them (topics, stream, needles) is its own. */
typedef struct synth_head {
    int d, r;
    double rbase;
    double *B, *sk, *sq, *muk, *muq, *hub;
    double *U;   /* [r][d] query subspace */
    float *kpre; /* [n][d] keys before RoPE minus mean: the needles' directions */
} synth_head;

static void synth_head_free(synth_head *h)
{
    free(h->B), free(h->sk), free(h->sq), free(h->muk), free(h->muq), free(h->hub), free(h->U);
    free(h->kpre);
    memset(h, 0, sizeof *h);
}

/* Draws the basis, spectra and means from *rs, then the o->n keys into keys[n][d];
 * leaves *rs where the queries of qseed 0 continue the stream. */
static ra_status synth_keys(const ra_synth_opts *o, synth_head *h, float *keys, uint64_t *rsp)
{
    int d = o->dim;
    ra_status st = RA_ENOMEM;
    uint64_t rs = *rsp;
    double *z = malloc((size_t)d * sizeof *z), *tz = NULL, *cdf = NULL;
    h->d = d;
    h->B = malloc((size_t)d * d * sizeof *h->B);
    h->sk = malloc((size_t)d * sizeof *h->sk);
    h->sq = malloc((size_t)d * sizeof *h->sq);
    h->muk = calloc((size_t)d, sizeof *h->muk);
    h->muq = calloc((size_t)d, sizeof *h->muq);
    h->hub = calloc((size_t)d, sizeof *h->hub);
    h->kpre = malloc(o->n * (size_t)d * sizeof *h->kpre);
    if (!z || !h->B || !h->sk || !h->sq || !h->muk || !h->muq || !h->hub || !h->kpre)
        goto out;
    double *B = h->B, *sk = h->sk, *sq = h->sq, *muk = h->muk, *muq = h->muq, *hub = h->hub;
    h->rbase = o->rope_base > 1.0f ? (double)o->rope_base : 500000.0;
    rand_orthonormal(B, d, &rs, o->blur, o->kslow);
    /* key spectrum: decaying (anisotropic), strong directions first. Query variation
     * lives in a rank-r subspace whose directions mix weak key directions (second
     * half of B) with a share `mix` of strong ones: that share is what lets key
     * structure predict a query's ranking a little (IVF ~30 %, not ~100 %). */
    int r = h->r = o->rank > 0 && o->rank <= d ? o->rank : 16;
    double *U = h->U = calloc((size_t)r * d, sizeof *U);
    if (!U)
        goto out;
    for (int i = 0; i < d; i++)
        sk[i] = exp(-(o->kdecay > 0 ? o->kdecay : 3.0) * i / d); /* 1 .. 0.05 */
    for (int a = 0; a < r; a++) {
        double *u = U + (size_t)a * d;
        double nn = 0;
        for (int i = 0; i < d; i++) {
            /* strong key directions (slowest RoPE pairs) get weight `mix`, the middle
             * ones 1, the fastest pairs almost nothing: real heads keep content off
             * the fast pairs, which only encode short-range position */
            double c = rng_norm(&rs) * (i < d / 2 ? o->mix : i < 3 * d / 4 ? 1.0 : 0.1);
            const double *b = B + (size_t)i * d;
            for (int j = 0; j < d; j++)
                u[j] += c * b[j];
        }
        for (int j = 0; j < d; j++)
            nn += u[j] * u[j];
        nn = 1.0 / sqrt(nn);
        for (int j = 0; j < d; j++)
            u[j] *= nn;
        sq[a] = o->qscale * exp(-1.5 * a / r); /* decaying query spectrum */
    }
    /* means: key mean a moderate vector; query mean offset along weak key directions */
    for (int i = 0; i < d; i++) {
        const double *b = B + (size_t)i * d;
        double ck = 0.5 * rng_norm(&rs) * sk[i];
        double cq = i >= d / 2 && i < 3 * d / 4 ? rng_norm(&rs) : 0.0;
        for (int j = 0; j < d; j++) {
            muk[j] += ck * b[j];
            muq[j] += cq * b[j];
        }
    }
    {
        /* scale the query-mean offset to `offset` times the mean key spread */
        double nq2 = 0, spread = 0;
        for (int j = 0; j < d; j++)
            nq2 += muq[j] * muq[j];
        for (int i = 0; i < d; i++)
            spread += sk[i] * sk[i];
        spread = sqrt(spread);
        double f = nq2 > 0 ? o->offset * spread / sqrt(nq2) : 0;
        for (int j = 0; j < d; j++) {
            muq[j] *= f;
            hub[j] = muq[j] / (o->offset > 0 ? o->offset : 1.0) * 0.6; /* hubs lean toward mu_q */
        }
    }
    /* keys: token types with Zipfian frequencies, as text has; a key is its type's
     * latent plus a smaller per-position part. Occurrences of one type are what a
     * query's top keys mostly are, so similar queries share top keys. */
    int V = o->vocab > 0 ? o->vocab : 0;
    tz = V ? malloc((size_t)V * d * sizeof *tz) : NULL;
    cdf = V ? malloc((size_t)V * sizeof *cdf) : NULL;
    if (V && (!tz || !cdf))
        goto out;
    if (V) {
        double acc = 0;
        for (int v = 0; v < V; v++) {
            acc += 1.0 / pow((double)(v + 1), 1.0);
            cdf[v] = acc;
            for (int i = 0; i < d; i++)
                tz[(size_t)v * d + i] = rng_norm(&rs);
        }
        for (int v = 0; v < V; v++)
            cdf[v] /= acc;
    }
    for (size_t p = 0; p < o->n; p++) {
        int tok = -1;
        if (V) {
            double u = rng_unif(&rs);
            int lo = 0, hi = V - 1;
            while (lo < hi) {
                int mid = (lo + hi) / 2;
                if (cdf[mid] < u)
                    lo = mid + 1;
                else
                    hi = mid;
            }
            tok = lo;
        }
        int kstep = o->krank > 0 && o->krank < d ? d / o->krank : 1; /* own part: rank d / kstep */
        for (int i = 0; i < d; i++)
            z[i] = tok < 0 ? rng_norm(&rs)
                   : i % kstep
                       ? tz[(size_t)tok * d + i]
                       : tz[(size_t)tok * d + i] + o->knoise * sqrt((double)kstep) * rng_norm(&rs);
        float *k = keys + p * d;
        compose(k, muk, B, sk, z, d);
        if (rng_unif(&rs) < o->hub_frac)
            for (int j = 0; j < d; j++)
                k[j] += (float)(hub[j] * (1.0 + rng_unif(&rs)));
        for (int j = 0; j < d; j++)
            h->kpre[p * d + j] = k[j] - (float)muk[j];
        rope(k, d, (double)p, h->rbase);
    }
    *rsp = rs;
    st = RA_OK;
out:
    free(z), free(tz), free(cdf);
    return st;
}

/* One query head's prefill queries train_q[n_train][d] and decode queries
 * queries[n_queries][d] on the keys of h, drawn from the stream *rs. */
static ra_status synth_queries(const ra_synth_opts *o, const synth_head *h, uint64_t rs,
                               float *train_q, float *queries)
{
    int d = h->d, r = h->r;
    const double *sq = h->sq, *muq = h->muq, *U = h->U;
    const float *kpre = h->kpre;
    int ntop = o->topics > 0 ? o->topics : 1;
    int nnd = o->needles > 0 ? o->needles : 1;
    double *w = malloc((size_t)d * sizeof *w);
    int32_t *nd = malloc((size_t)nnd * sizeof *nd);
    double *T = malloc((size_t)ntop * r * sizeof *T);
    double *tcdf = malloc((size_t)ntop * sizeof *tcdf);
    int32_t *tnd = malloc((size_t)ntop * nnd * sizeof *tnd);
    if (!w || !nd || !T || !tcdf || !tnd) {
        free(w), free(nd), free(T), free(tcdf), free(tnd);
        return RA_ENOMEM;
    }
    /* queries: one AR(1) stream for the last prefill positions and the decode steps,
     * independent draws for the strided prefill positions */
    size_t tail = o->n_train / 2, head = o->n_train - tail;
    double a = o->rho, b = sqrt(1.0 - (double)o->rho * o->rho);
    for (int i = 0; i < d; i++)
        w[i] = rng_norm(&rs);
    for (int j = 0; j < o->needles; j++)
        nd[j] = (int32_t)(rng_next(&rs) % o->n);
    /* topics: queries of a head come in a few kinds (what it looks for); each query is
     * its topic's centre plus an AR(1) wobble, and a stream stays on its topic for a
     * while. This is what makes the prefill queries informative about decode queries:
     * their nearest prefill queries share most of their top keys. */
    for (int i = 0; i < ntop * r; i++)
        T[i] = o->topics > 0 ? rng_norm(&rs) : 0.0;
    /* topic frequencies: Zipfian with exponent tzipf (0: uniform), like the token
     * types a query head reacts to */
    {
        double acc = 0;
        for (int v = 0; v < ntop; v++) {
            acc += o->tzipf > 0 ? 1.0 / pow((double)(v + 1), o->tzipf) : 1.0;
            tcdf[v] = acc;
        }
        for (int v = 0; v < ntop; v++)
            tcdf[v] /= acc;
    }
#define DRAW_TOPIC()                                                                               \
    do {                                                                                           \
        double u_ = rng_unif(&rs);                                                                 \
        int lo_ = 0, hi_ = ntop - 1;                                                               \
        while (lo_ < hi_) {                                                                        \
            int mid_ = (lo_ + hi_) / 2;                                                            \
            if (tcdf[mid_] < u_)                                                                   \
                lo_ = mid_ + 1;                                                                    \
            else                                                                                   \
                hi_ = mid_;                                                                        \
        }                                                                                          \
        topic = lo_;                                                                               \
    } while (0)
    /* each topic's own planted keys, in the first half of the positions so that most
     * queries can see them (a query only attends to the past) */
    for (int i = 0; i < ntop * nnd; i++)
        tnd[i] = (int32_t)(rng_next(&rs) % (o->n / 2 + 1));
    int topic;
    DRAW_TOPIC();
    double tn = o->topics > 0 ? o->tnoise : 1.0;
    size_t total = o->n_train + o->n_queries;
    for (size_t t = 0; t < total; t++) {
        double pos;
        int fresh;
        float *q;
        if (t < head) {
            pos = (double)(t * (o->n - (tail < o->n ? tail : 0)) / (head ? head : 1));
            q = train_q + t * d;
            fresh = 1;
        } else if (t < o->n_train) {
            pos = (double)(o->n - (o->n_train - t));
            q = train_q + t * d;
            fresh = 0;
        } else {
            pos = (double)(o->n + (t - o->n_train));
            q = queries + (t - o->n_train) * d;
            fresh = 0;
        }
        for (int i = 0; i < d; i++)
            w[i] = fresh ? rng_norm(&rs) : a * w[i] + b * rng_norm(&rs);
        if (fresh || rng_unif(&rs) < o->tswitch) /* a stream changes topic every 1/tswitch steps */
            DRAW_TOPIC();
        /* needles: each persists with probability rho per step, as a copy head's
         * target does; only past keys can be planted */
        size_t limit = (size_t)pos < o->n ? ((size_t)pos > 0 ? (size_t)pos : 1) : o->n;
        for (int j = 0; j < o->needles; j++) {
            if (o->tneedle > 0) { /* the topic's own key with probability tneedle */
                int32_t own = tnd[(size_t)topic * nnd + j];
                nd[j] = rng_unif(&rs) < o->tneedle && (size_t)own < limit
                            ? own
                            : (int32_t)(rng_next(&rs) % limit);
            } else if (fresh || rng_unif(&rs) > o->rho || (size_t)nd[j] >= limit)
                nd[j] = (int32_t)(rng_next(&rs) % limit);
        }
        for (int j = 0; j < d; j++) {
            double acc = muq[j];
            for (int a = 0; a < r; a++)
                acc += sq[a] * (T[(size_t)topic * r + a] + tn * w[a]) * U[(size_t)a * d + j];
            q[j] = (float)(acc + o->qnoise * rng_norm(&rs));
        }
        /* a planted key adds its own (pre-RoPE, centred) direction, scaled so that the
         * key lands among the query's top few, but not always first */
        for (int j = 0; j < o->needles; j++) {
            const float *kp = kpre + (size_t)nd[j] * d;
            double kn = 0;
            for (int i = 0; i < d; i++)
                kn += (double)kp[i] * kp[i];
            double f = kn > 0 ? o->needle_gain * 4.0 / sqrt(kn) : 0;
            for (int i = 0; i < d; i++)
                q[i] += (float)(f * kp[i]);
        }
        rope(q, d, t < o->n_train && o->train_at_n ? (double)o->n : pos, h->rbase);
    }
#undef DRAW_TOPIC
    free(w), free(nd), free(T), free(tcdf), free(tnd);
    return RA_OK;
}

/* The stream of a query head with qseed != 0: its own, on the same keys. */
static uint64_t qseed_stream(uint64_t seed, uint64_t qseed)
{
    uint64_t s = (seed * 0x2545f4914f6cdd1dull + 7) ^ (qseed * 0xd1b54a32d192ed03ull);
    return rng_next(&s);
}

ra_status ra_synth_make_group(const ra_synth_opts *o, int n_heads, const uint64_t *qseeds,
                              ra_synth *out)
{
    if (!o || !out || !qseeds || n_heads < 1 || n_heads > RA_SYNTH_MAX_GROUP || o->dim <= 0 ||
        o->dim > 4096 || (o->dim & 1) || o->n == 0 || o->n > ((size_t)1 << 28) ||
        o->n_train > ((size_t)1 << 24) || o->n_queries > ((size_t)1 << 24) ||
        !(o->rho >= 0.0f && o->rho < 1.0f) || !(o->offset >= 0.0f) ||
        !(o->hub_frac >= 0.0f && o->hub_frac <= 1.0f) || o->needles < 0 || o->needles > 64)
        return RA_EINVAL;
    int d = o->dim;
    ra_status st = RA_ENOMEM;
    synth_head h = {0};
    memset(out, 0, (size_t)n_heads * sizeof *out);
    for (int g = 0; g < n_heads; g++) {
        ra_synth *s = &out[g];
        *s = (ra_synth){.n = o->n, .n_train = o->n_train, .n_queries = o->n_queries, .dim = d};
        if (g == 0 && !(s->keys = malloc(o->n * (size_t)d * sizeof *s->keys)))
            goto fail;
        s->train_q = malloc((o->n_train ? o->n_train : 1) * (size_t)d * sizeof *s->train_q);
        s->queries = malloc((o->n_queries ? o->n_queries : 1) * (size_t)d * sizeof *s->queries);
        if (!s->train_q || !s->queries)
            goto fail;
    }
    uint64_t rs = o->seed * 0x2545f4914f6cdd1dull + 7;
    if ((st = synth_keys(o, &h, out[0].keys, &rs)) != RA_OK)
        goto fail;
    for (int g = 0; g < n_heads; g++)
        if ((st = synth_queries(o, &h, qseeds[g] ? qseed_stream(o->seed, qseeds[g]) : rs,
                                out[g].train_q, out[g].queries)) != RA_OK)
            goto fail;
    synth_head_free(&h);
    return RA_OK;
fail:
    synth_head_free(&h);
    for (int g = 0; g < n_heads; g++)
        ra_synth_free(&out[g]);
    return st;
}

ra_status ra_synth_make(const ra_synth_opts *o, ra_synth *out)
{
    if (!o)
        return RA_EINVAL;
    return ra_synth_make_group(o, 1, &o->qseed, out);
}

/* Cholesky of a d x d SPD matrix in place (lower). 0 on success. */
static int cholesky(double *A, int d)
{
    for (int j = 0; j < d; j++) {
        double s = A[(size_t)j * d + j];
        for (int k = 0; k < j; k++)
            s -= A[(size_t)j * d + k] * A[(size_t)j * d + k];
        if (!(s > 0))
            return -1;
        double l = sqrt(s);
        A[(size_t)j * d + j] = l;
        for (int i = j + 1; i < d; i++) {
            double t = A[(size_t)i * d + j];
            for (int k = 0; k < j; k++)
                t -= A[(size_t)i * d + k] * A[(size_t)j * d + k];
            A[(size_t)i * d + j] = t / l;
        }
    }
    return 0;
}

/* sqrt((x - mu)^T S^-1 (x - mu)) with S = L L^T: solve L y = x - mu, |y|. */
static double maha(const double *L, const double *mu, const float *x, int d, double *y)
{
    double s = 0;
    for (int i = 0; i < d; i++) {
        double t = (double)x[i] - mu[i];
        for (int k = 0; k < i; k++)
            t -= L[(size_t)i * d + k] * y[k];
        y[i] = t / L[(size_t)i * d + i];
        s += y[i] * y[i];
    }
    return sqrt(s);
}

ra_status ra_synth_mahalanobis_ratio(const float *keys, size_t n, const float *q, size_t nq,
                                     int dim, double *ratio)
{
    if (!keys || !q || !ratio || n < 16 || nq == 0 || dim <= 0 || dim > 4096)
        return RA_EINVAL;
    int d = dim;
    double *mu = calloc((size_t)d, sizeof *mu);
    double *C = calloc((size_t)d * d, sizeof *C);
    double *y = malloc((size_t)d * sizeof *y);
    double *x = malloc((size_t)d * sizeof *x);
    if (!mu || !C || !y || !x) {
        free(mu), free(C), free(y), free(x);
        return RA_ENOMEM;
    }
    /* fit on keys i % 8 != 0, at most ~64K of them (stride) to bound the cost */
    size_t stride = n / 65536 + 1, m = 0;
    for (size_t i = 0; i < n; i += stride) {
        if (i % 8 == 0)
            continue;
        for (int j = 0; j < d; j++)
            mu[j] += keys[i * d + j];
        m++;
    }
    for (int j = 0; j < d; j++)
        mu[j] /= (double)m;
    for (size_t i = 0; i < n; i += stride) {
        if (i % 8 == 0)
            continue;
        for (int j = 0; j < d; j++)
            x[j] = keys[i * d + j] - mu[j];
        for (int a = 0; a < d; a++)
            for (int b = 0; b <= a; b++)
                C[(size_t)a * d + b] += x[a] * x[b];
    }
    double tr = 0;
    for (int a = 0; a < d; a++) {
        for (int b = 0; b <= a; b++)
            C[(size_t)a * d + b] /= (double)(m > 1 ? m - 1 : 1);
        tr += C[(size_t)a * d + a];
    }
    for (int a = 0; a < d; a++) /* a tiny ridge keeps rank-deficient heads invertible */
        C[(size_t)a * d + a] += 1e-6 * tr / d + 1e-12;
    if (cholesky(C, d) != 0) {
        free(mu), free(C), free(y), free(x);
        return RA_EINVAL;
    }
    double sk = 0, sq = 0;
    size_t nk = 0;
    for (size_t i = 0; i < n; i += 8 * stride) { /* held out: i % 8 == 0 */
        sk += maha(C, mu, keys + (i - i % 8) * d, d, y);
        nk++;
    }
    size_t qs = nq / 8192 + 1, nqq = 0;
    for (size_t i = 0; i < nq; i += qs) {
        sq += maha(C, mu, q + i * d, d, y);
        nqq++;
    }
    *ratio = (sq / (double)nqq) / (sk / (double)nk);
    free(mu), free(C), free(y), free(x);
    return RA_OK;
}

double ra_synth_step_cosine(const float *q, size_t nq, int dim)
{
    if (!q || nq < 2 || dim <= 0)
        return 0.0;
    double s = 0;
    for (size_t t = 1; t < nq; t++) {
        const float *a = q + (t - 1) * dim, *b = q + t * dim;
        double ab = 0, aa = 0, bb = 0;
        for (int j = 0; j < dim; j++) {
            ab += (double)a[j] * b[j];
            aa += (double)a[j] * a[j];
            bb += (double)b[j] * b[j];
        }
        s += aa > 0 && bb > 0 ? ab / sqrt(aa * bb) : 0;
    }
    return s / (double)(nq - 1);
}
