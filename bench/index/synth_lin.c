/* The hidden-state generator (synth_lin.h). Per position t: a topic z_t (a Markov chain
 * that changes topic with probability 1/segment), a token x_t drawn from a Zipfian law
 * whose ranks each topic maps to its own tokens, and a hidden state
 *   h_t = E[x_t] + C[z_t] + P (0.3 xi_t + drift_t)        (xi_t ~ N(0, I_32), drift AR(1))
 * Keys k_t = RoPE_t(W_K h_t + b_K), with W_K a Gaussian map whose rows decay in scale.
 * Query head j: q_t = RoPE_t(match W_K (E[sigma_j(x_t)] + C[z_t]) + proj R_j h_t + b_j):
 * a token-match part seen through the key map (look for the keys of token sigma_j(x_t)),
 * a random projection R_j of the query's own state, and a bias b_j along the weakest
 * rows of W_K, scaled to `offset` key spreads. Everything is computed through the small
 * precomputed products W_K E, W_K C, W_K P so that a million keys take seconds. */
#include "synth_lin.h"

#include <math.h>
#include <omp.h>
#include <stdlib.h>
#include <string.h>

#define LAT 32 /* dimension of the per-position noise and drift */

/* xoshiro256**: independent of synth.c's generator on purpose */
typedef struct lrng {
    uint64_t s[4];
} lrng;

static inline uint64_t rotl(uint64_t x, int k)
{
    return (x << k) | (x >> (64 - k));
}

static uint64_t lr_next(lrng *r)
{
    uint64_t *s = r->s, res = rotl(s[1] * 5, 7) * 9, t = s[1] << 17;
    s[2] ^= s[0];
    s[3] ^= s[1];
    s[1] ^= s[2];
    s[0] ^= s[3];
    s[2] ^= t;
    s[3] = rotl(s[3], 45);
    return res;
}

static void lr_seed(lrng *r, uint64_t seed)
{
    for (int i = 0; i < 4; i++) { /* splitmix64 expansion of the seed */
        uint64_t z = (seed += 0x9e3779b97f4a7c15ull);
        z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
        z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
        r->s[i] = z ^ (z >> 31);
    }
}

static double lr_unif(lrng *r)
{
    return ((double)(lr_next(r) >> 11) + 0.5) * 0x1.0p-53;
}

static double lr_norm(lrng *r)
{
    double u = lr_unif(r), v = lr_unif(r);
    return sqrt(-2.0 * log(u)) * cos(6.283185307179586 * v);
}

void ra_synth_lin_opts_default(ra_synth_lin_opts *o)
{
    memset(o, 0, sizeof *o);
    o->n = 32768;
    o->dim = 128;
    o->n_rep = 4;
    o->n_train = 4096;
    o->n_queries = 200;
    o->seed = 1;
}

void ra_synth_group_free(ra_synth_group *g)
{
    if (!g)
        return;
    free(g->keys);
    free(g->train_q);
    free(g->queries);
    memset(g, 0, sizeof *g);
}

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

/* y[d] = A[d][H] x[H] */
static void matvec(const float *A, const float *x, int d, int H, float *y)
{
    for (int i = 0; i < d; i++) {
        const float *a = A + (size_t)i * H;
        double s = 0;
        for (int j = 0; j < H; j++)
            s += (double)a[j] * x[j];
        y[i] = (float)s;
    }
}

typedef struct lin_state {
    int d, H, V, T;
    const ra_synth_lin_opts *o;
    float *E, *C, *P;    /* [V][H], [T][H], [H][LAT] */
    float *WE, *WC, *WP; /* W_K E [V][d], W_K C [T][d], W_K P [d][LAT] */
    int32_t *tok;        /* [npos] */
    int16_t *top;        /* [npos] */
    float *lat;          /* [npos][LAT]: 0.3 xi + drift */
} lin_state;

/* the hidden state of position t, written to h[H] */
static void hidden(const lin_state *L, size_t t, float *h)
{
    const float *e = L->E + (size_t)L->tok[t] * L->H, *c = L->C + (size_t)L->top[t] * L->H;
    const float *z = L->lat + t * LAT;
    for (int j = 0; j < L->H; j++) {
        double s = e[j] + c[j];
        const float *p = L->P + (size_t)j * LAT;
        for (int a = 0; a < LAT; a++)
            s += (double)p[a] * z[a];
        h[j] = (float)s;
    }
}

ra_status ra_synth_lin_make(const ra_synth_lin_opts *o, ra_synth_group *out)
{
    if (!o || !out || o->dim <= 0 || o->dim > 4096 || (o->dim & 1) || o->n == 0 ||
        o->n > ((size_t)1 << 28) || o->n_rep < 1 || o->n_rep > 256 ||
        o->n_train > ((size_t)1 << 24) || o->n_queries > ((size_t)1 << 24) || o->hidden < 0 ||
        o->hidden > 8192 || o->vocab < 0 || o->vocab > (1 << 20) || o->topics < 0 ||
        o->topics > 32767 || o->segment < 0 || !(o->zipf >= 0.f) || !(o->kdecay >= 0.f))
        return RA_EINVAL;
    lin_state L = {.d = o->dim, .o = o};
    int d = o->dim;
    L.H = o->hidden ? o->hidden : 2 * d;
    L.V = o->vocab ? o->vocab : 4096;
    L.T = o->topics ? o->topics : 32;
    int H = L.H, V = L.V, T = L.T, R = o->n_rep;
    double zipf = o->zipf > 0 ? o->zipf : 1.1;
    double seg = o->segment ? o->segment : 256;
    double match = o->match == 0 ? 1.0 : o->match < 0 ? 0.0 : o->match;
    double projw = o->proj == 0 ? 0.7 : o->proj < 0 ? 0.0 : o->proj;
    double offset = o->offset == 0 ? 1.5 : o->offset < 0 ? 0.0 : o->offset;
    double kdecay = o->kdecay > 0 ? o->kdecay : 2.0;
    double base = o->rope_base > 1.f ? o->rope_base : 500000.0;
    size_t npos = o->n + o->n_queries;
    int nthr = o->threads > 0 ? o->threads : omp_get_max_threads();
    ra_synth_group g = {
        .n = o->n, .n_train = o->n_train, .n_queries = o->n_queries, .dim = d, .n_rep = R};
    float *WK = malloc((size_t)d * H * sizeof *WK), *bK = malloc((size_t)d * sizeof *bK);
    float *WR = malloc((size_t)R * d * H * sizeof *WR), *bQ = malloc((size_t)R * d * sizeof *bQ);
    int32_t *perm = malloc((size_t)T * V * sizeof *perm),
            *succ = malloc((size_t)R * V * sizeof *succ);
    double *cdf = malloc((size_t)V * sizeof *cdf), *ks = malloc((size_t)d * sizeof *ks);
    L.E = malloc((size_t)V * H * sizeof *L.E);
    L.C = malloc((size_t)T * H * sizeof *L.C);
    L.P = malloc((size_t)H * LAT * sizeof *L.P);
    L.WE = malloc((size_t)V * d * sizeof *L.WE);
    L.WC = malloc((size_t)T * d * sizeof *L.WC);
    L.WP = malloc((size_t)d * LAT * sizeof *L.WP);
    L.tok = malloc(npos * sizeof *L.tok);
    L.top = malloc(npos * sizeof *L.top);
    L.lat = malloc(npos * LAT * sizeof *L.lat);
    g.keys = malloc(o->n * (size_t)d * sizeof *g.keys);
    g.train_q = malloc((size_t)R * (o->n_train ? o->n_train : 1) * d * sizeof *g.train_q);
    g.queries = malloc((size_t)R * (o->n_queries ? o->n_queries : 1) * d * sizeof *g.queries);
    ra_status st = RA_ENOMEM;
    if (!WK || !bK || !WR || !bQ || !perm || !succ || !cdf || !ks || !L.E || !L.C || !L.P ||
        !L.WE || !L.WC || !L.WP || !L.tok || !L.top || !L.lat || !g.keys || !g.train_q ||
        !g.queries)
        goto done;
    lrng r;
    lr_seed(&r, o->seed * 0x9e3779b97f4a7c15ull + 0x5851f42d4c957f2dull);
    double eh = 1.0 / sqrt((double)H);
    for (size_t i = 0; i < (size_t)V * H; i++)
        L.E[i] = (float)(lr_norm(&r) * eh);
    for (size_t i = 0; i < (size_t)T * H; i++)
        L.C[i] = (float)(0.6 * lr_norm(&r) * eh);
    for (size_t i = 0; i < (size_t)H * LAT; i++)
        L.P[i] = (float)(lr_norm(&r) * eh);
    /* W_K: Gaussian rows with decaying scales, one scale per RoPE pair (j, j + d/2) since
     * rotation mixes the two coordinates of a pair; pairs in a random order so that strong
     * and weak pairs sit on every frequency */
    int hd = d / 2;
    for (int i = 0; i < hd; i++)
        ks[i] = exp(-kdecay * i / hd);
    for (int i = hd - 1; i > 0; i--) {
        int j = (int)(lr_next(&r) % (uint64_t)(i + 1));
        double t = ks[i];
        ks[i] = ks[j];
        ks[j] = t;
    }
    for (int i = 0; i < hd; i++)
        ks[i + hd] = ks[i];
    for (int i = 0; i < d; i++) {
        for (int j = 0; j < H; j++)
            WK[(size_t)i * H + j] = (float)(ks[i] * lr_norm(&r));
        bK[i] = (float)(0.3 * ks[i] * lr_norm(&r));
    }
    for (int v = 0; v < V; v++)
        matvec(WK, L.E + (size_t)v * H, d, H, L.WE + (size_t)v * d);
    for (int t = 0; t < T; t++)
        matvec(WK, L.C + (size_t)t * H, d, H, L.WC + (size_t)t * d);
    for (int i = 0; i < d; i++)
        for (int a = 0; a < LAT; a++) {
            double s = 0;
            for (int j = 0; j < H; j++)
                s += (double)WK[(size_t)i * H + j] * L.P[(size_t)j * LAT + a];
            L.WP[(size_t)i * LAT + a] = (float)s;
        }
    /* token law: ranks Zipfian; each topic maps ranks to tokens by its own permutation */
    double acc = 0;
    for (int v = 0; v < V; v++)
        cdf[v] = acc += pow(v + 1.0, -zipf);
    for (int v = 0; v < V; v++)
        cdf[v] /= acc;
    for (int t = 0; t < T; t++) {
        int32_t *p = perm + (size_t)t * V;
        for (int v = 0; v < V; v++)
            p[v] = v;
        for (int v = V - 1; v > 0; v--) {
            int j = (int)(lr_next(&r) % (uint64_t)(v + 1));
            int32_t x = p[v];
            p[v] = p[j];
            p[j] = x;
        }
    }
    for (int h = 0; h < R; h++) {
        int32_t *p = succ + (size_t)h * V;
        for (int v = 0; v < V; v++)
            p[v] = v;
        for (int v = V - 1; v > 0; v--) {
            int j = (int)(lr_next(&r) % (uint64_t)(v + 1));
            int32_t x = p[v];
            p[v] = p[j];
            p[j] = x;
        }
    }
    /* the stream */
    {
        int z = (int)(lr_next(&r) % (uint64_t)T);
        double drift[LAT] = {0}, rho = 0.995, ds = sqrt(1 - rho * rho);
        for (size_t t = 0; t < npos; t++) {
            if (lr_unif(&r) < 1.0 / seg)
                z = (int)(lr_next(&r) % (uint64_t)T);
            double u = lr_unif(&r);
            int lo = 0, hi = V - 1;
            while (lo < hi) {
                int mid = (lo + hi) / 2;
                if (cdf[mid] < u)
                    lo = mid + 1;
                else
                    hi = mid;
            }
            L.top[t] = (int16_t)z;
            L.tok[t] = perm[(size_t)z * V + lo];
            for (int a = 0; a < LAT; a++) {
                drift[a] = rho * drift[a] + ds * lr_norm(&r);
                L.lat[t * LAT + a] = (float)(0.3 * lr_norm(&r) + 0.5 * drift[a]);
            }
        }
    }
    /* keys: W_K h_t + b_K = WE[x] + WC[z] + WP lat + b_K */
#pragma omp parallel for schedule(static) num_threads(nthr)
    for (size_t t = 0; t < o->n; t++) {
        float *k = g.keys + t * d;
        const float *we = L.WE + (size_t)L.tok[t] * d, *wc = L.WC + (size_t)L.top[t] * d;
        const float *z = L.lat + t * LAT;
        for (int i = 0; i < d; i++) {
            double s = we[i] + wc[i] + bK[i];
            const float *wp = L.WP + (size_t)i * LAT;
            for (int a = 0; a < LAT; a++)
                s += (double)wp[a] * z[a];
            k[i] = (float)s;
        }
        rope(k, d, (double)t, base);
    }
    /* query biases along the weakest rows of W_K, at `offset` key spreads */
    {
        double spread = 0;
        for (int i = 0; i < d; i++)
            spread += ks[i] * ks[i];
        spread = sqrt(spread); /* ~ the keys' total standard deviation (|h| ~ 1) */
        for (int h = 0; h < R; h++) {
            float *b = bQ + (size_t)h * d;
            double nn = 0;
            for (int i = 0; i < d; i++) {
                b[i] = ks[i] < exp(-kdecay * 0.75) ? (float)lr_norm(&r) : 0.f;
                nn += (double)b[i] * b[i];
            }
            double f = nn > 0 ? offset * spread / sqrt(nn) : 0;
            for (int i = 0; i < d; i++)
                b[i] = (float)(b[i] * f);
            float *w = WR + (size_t)h * d * H;
            for (size_t i = 0; i < (size_t)d * H; i++)
                w[i] = (float)(projw * lr_norm(&r) * eh * sqrt((double)H / d));
        }
    }
    /* queries of head h at position t */
    size_t tail = o->n_train / 2, rest = o->n_train - tail;
    size_t head_n = o->n > tail ? o->n - tail : 0;
#pragma omp parallel for schedule(dynamic, 64) collapse(2) num_threads(nthr)
    for (int h = 0; h < R; h++)
        for (size_t i = 0; i < o->n_train + o->n_queries; i++) {
            size_t t;
            float *q;
            if (i < o->n_train) {
                t = i < rest ? (head_n ? (size_t)((double)i * head_n / (double)rest) : 0)
                             : head_n + (i - rest);
                if (t >= o->n)
                    t = o->n - 1;
                q = g.train_q + ((size_t)h * o->n_train + i) * d;
            } else {
                t = o->n + (i - o->n_train);
                q = g.queries + ((size_t)h * o->n_queries + (i - o->n_train)) * d;
            }
            float hs[8192];
            hidden(&L, t, hs);
            int32_t want = succ[(size_t)h * V + L.tok[t]];
            const float *we = L.WE + (size_t)want * d, *wc = L.WC + (size_t)L.top[t] * d;
            const float *w = WR + (size_t)h * d * H;
            for (int a = 0; a < d; a++) {
                double s = match * (we[a] + wc[a]) + bQ[(size_t)h * d + a];
                const float *wr = w + (size_t)a * H;
                for (int j = 0; j < H; j++)
                    s += (double)wr[j] * hs[j];
                q[a] = (float)s;
            }
            rope(q, d, (double)t, base);
        }
    *out = g;
    memset(&g, 0, sizeof g);
    st = RA_OK;
done:
    free(WK), free(bK), free(WR), free(bQ), free(perm), free(succ), free(cdf), free(ks);
    free(L.E), free(L.C), free(L.P), free(L.WE), free(L.WC), free(L.WP), free(L.tok), free(L.top);
    free(L.lat);
    ra_synth_group_free(&g);
    return st;
}
