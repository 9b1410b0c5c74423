/* ratd-demo: the synthetic workload of scripts/demo. Talks to a running ratd through
 * libratd-client only: offloads N random keys/values for a few heads (queries out of
 * distribution for the keys, as on real heads), asks for partial attention at a few
 * top_k settings and index kinds, and prints a table comparing each answer with exact
 * attention over all offloaded tokens computed here in double precision. */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "ratd/client.h"

static uint64_t g_rng = 0x9e3779b97f4a7c15ull;
static double urand(void)
{
    g_rng ^= g_rng << 13;
    g_rng ^= g_rng >> 7;
    g_rng ^= g_rng << 17;
    return (double)(g_rng >> 11) * (1.0 / 9007199254740992.0);
}
static double nrand(void)
{
    double u = urand() + 1e-300, v = urand();
    return sqrt(-2.0 * log(u)) * cos(6.283185307179586 * v);
}
static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + ts.tv_nsec * 1e-9;
}
static int cmp_d(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

/* Exact attention of q over all n keys of one KV head, in double. */
static void exact_attention(const float *q, const float *K, const float *V, size_t n, int d,
                            double *o, double *lse)
{
    double *s = malloc(n * sizeof *s), m = -INFINITY, scale = 1.0 / sqrt((double)d);
    for (size_t i = 0; i < n; i++) {
        double acc = 0;
        for (int j = 0; j < d; j++)
            acc += (double)q[j] * K[i * d + j];
        s[i] = acc * scale;
        if (s[i] > m)
            m = s[i];
    }
    double z = 0;
    for (int j = 0; j < d; j++)
        o[j] = 0;
    for (size_t i = 0; i < n; i++) {
        double w = exp(s[i] - m);
        z += w;
        for (int j = 0; j < d; j++)
            o[j] += w * V[i * d + j];
    }
    for (int j = 0; j < d; j++)
        o[j] /= z;
    *lse = m + log(z);
    free(s);
}

/* Exact top-k positions of q by inner product (selection by repeated max: k is small). */
static void exact_topk(const float *q, const float *K, size_t n, int d, int k, int64_t *out)
{
    double *s = malloc(n * sizeof *s);
    for (size_t i = 0; i < n; i++) {
        double acc = 0;
        for (int j = 0; j < d; j++)
            acc += (double)q[j] * K[i * d + j];
        s[i] = acc;
    }
    for (int t = 0; t < k; t++) {
        size_t best = 0;
        for (size_t i = 1; i < n; i++)
            if (s[i] > s[best])
                best = i;
        out[t] = (int64_t)best;
        s[best] = -INFINITY;
    }
    free(s);
}

int main(int argc, char **argv)
{
    const char *endpoint = NULL, *kinds_arg = "flat,graph,ivf,hnsw";
    size_t n = 32768;
    int nq_heads = 4, nkv = 2, d = 128, steps = 16;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--endpoint") && i + 1 < argc)
            endpoint = argv[++i];
        else if (!strcmp(argv[i], "--n") && i + 1 < argc)
            n = strtoul(argv[++i], NULL, 10);
        else if (!strcmp(argv[i], "--steps") && i + 1 < argc)
            steps = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--kinds") && i + 1 < argc)
            kinds_arg = argv[++i];
        else {
            fprintf(stderr, "usage: ratd-demo --endpoint EP [--n N] [--steps S] [--kinds flat,graph,ivf,hnsw]\n");
            return 2;
        }
    }
    if (!endpoint || n < 1024 || n > (1u << 22) || steps < 1 || steps > 1000) {
        fprintf(stderr, "ratd-demo: --endpoint is required; 1024 <= n <= 4M; 1 <= steps <= 1000\n");
        return 2;
    }
    int group = nq_heads / nkv, ntrain = 1024;
    float *K = malloc(sizeof(float) * nkv * n * d), *V = malloc(sizeof(float) * nkv * n * d);
    float *qt = malloc(sizeof(float) * nq_heads * ntrain * d);
    float *qs = malloc(sizeof(float) * steps * nq_heads * d);
    int64_t *pos = malloc(sizeof(int64_t) * n);
    float *kmean = malloc(sizeof(float) * nkv * d), *qmean = malloc(sizeof(float) * nq_heads * d);
    if (!K || !V || !qt || !qs || !pos || !kmean || !qmean) {
        fprintf(stderr, "ratd-demo: out of memory\n");
        return 1;
    }
    /* Keys: anisotropic Gaussian around a mean; queries: around another mean, with a
     * shared direction that puts them far outside the key distribution. */
    for (int g = 0; g < nkv * d; g++)
        kmean[g] = (float)nrand();
    for (int h = 0; h < nq_heads * d; h++)
        qmean[h] = (float)(2.0 * nrand());
    for (int g = 0; g < nkv; g++)
        for (size_t i = 0; i < n; i++) {
            pos[i] = 128 + (int64_t)i;
            for (int j = 0; j < d; j++) {
                double sd = 2.0 * exp(-3.0 * j / d);
                K[((size_t)g * n + i) * d + j] = (float)(kmean[g * d + j] + sd * nrand());
                V[((size_t)g * n + i) * d + j] = (float)nrand();
            }
        }
    /* a few heavy-hitter keys per KV head, pulled towards its queries' mean direction,
     * so that attention is peaked as on real heads */
    for (int g = 0; g < nkv; g++) {
        const float *qm = qmean + (size_t)g * group * d;
        double qn = 0;
        for (int j = 0; j < d; j++)
            qn += (double)qm[j] * qm[j];
        qn = sqrt(qn);
        for (int t = 0; t < 32; t++) {
            size_t i = (size_t)(urand() * (double)n) % n;
            double c = 4.0 + 4.0 * urand();
            for (int j = 0; j < d; j++)
                K[((size_t)g * n + i) * d + j] += (float)(c * qm[j] / qn);
        }
    }
    for (int h = 0; h < nq_heads; h++) {
        for (int t = 0; t < ntrain; t++)
            for (int j = 0; j < d; j++)
                qt[((size_t)h * ntrain + t) * d + j] = (float)(qmean[h * d + j] + 0.5 * nrand());
        for (int s = 0; s < steps; s++)
            for (int j = 0; j < d; j++)
                qs[((size_t)s * nq_heads + h) * d + j] = (float)(qmean[h * d + j] + 0.5 * nrand());
    }

    ra_client *c;
    ra_status st = ra_client_open(&c, endpoint, NULL);
    if (st != RA_OK || (st = ra_client_hello(c, NULL)) != RA_OK) {
        fprintf(stderr, "ratd-demo: %s: %s\n", endpoint, ra_strerror(st));
        return 1;
    }
    static const struct {
        ra_client_index_kind kind;
        const char *name;
    } kinds[] = {{RA_CLIENT_INDEX_FLAT, "flat"},
                 {RA_CLIENT_INDEX_GRAPH, "graph"},
                 {RA_CLIENT_INDEX_IVF, "ivf"},
                 {RA_CLIENT_INDEX_HNSW, "hnsw"}};
    static const int topks[] = {100, 1000};
    enum { MAX_K = 1000 };
    printf("ratd demo: %zu offloaded tokens x %d KV heads (%d query heads), dim %d, fp32, %d decode steps\n",
           n, nkv, nq_heads, d, steps);
    printf("%-14s %6s %10s %10s %14s %10s\n", "index", "top_k", "recall@k", "mass", "err_vs_exact_k",
           "attend_ms");
    double *o_ex = malloc(sizeof(double) * steps * nq_heads * d), *lse_ex = malloc(sizeof(double) * steps * nq_heads);
    for (int s = 0; s < steps; s++)
        for (int h = 0; h < nq_heads; h++)
            exact_attention(qs + ((size_t)s * nq_heads + h) * d, K + (size_t)(h / group) * n * d,
                            V + (size_t)(h / group) * n * d, n, d, o_ex + ((size_t)s * nq_heads + h) * d,
                            lse_ex + (size_t)s * nq_heads + h);
    int rc = 0;
    for (size_t ki = 0; ki < sizeof kinds / sizeof kinds[0]; ki++) {
        const char *hit_at = strstr(kinds_arg, kinds[ki].name);
        size_t nl = strlen(kinds[ki].name);
        if (!hit_at || (hit_at != kinds_arg && hit_at[-1] != ',') || (hit_at[nl] && hit_at[nl] != ','))
            continue;
        ra_session_desc desc;
        ra_session_desc_init(&desc);
        desc.n_layers = 1;
        desc.n_q_heads = nq_heads;
        desc.n_kv_heads = nkv;
        desc.head_dim = d;
        desc.dtype = RA_DTYPE_F32;
        desc.index.kind = kinds[ki].kind;
        uint64_t sid;
        ra_kv_batch b = {.n_kv_heads = nkv, .head_dim = d, .dtype = RA_DTYPE_F32, .n_tokens = n,
                         .k = K, .v = V, .pos = pos, .n_q_heads = nq_heads, .n_queries = (size_t)ntrain,
                         .q_train = qt};
        if ((st = ra_client_session_create(c, &desc, &sid)) != RA_OK ||
            (st = ra_client_offload(c, sid, 0, &b)) != RA_OK ||
            (st = ra_client_wait_ready(c, sid, 600000)) != RA_OK) {
            fprintf(stderr, "ratd-demo: %s: %s (%s)\n", kinds[ki].name, ra_strerror(st), ra_client_errmsg(c));
            rc = 1;
            break;
        }
        for (size_t ti = 0; ti < sizeof topks / sizeof topks[0]; ti++) {
            int k = topks[ti];
            float *o = malloc(sizeof(float) * nq_heads * d), lse[64], sc[64 * 1000];
            int64_t *tp = malloc(sizeof(int64_t) * nq_heads * k), *ex = malloc(sizeof(int64_t) * k);
            int32_t cnt[64];
            double *ms = malloc(sizeof(double) * steps), maxerr = 0, lerr = 0, hit = 0, tot = 0;
            for (int s = 0; s < steps; s++) {
                ra_attend_req r = {.n_q_heads = nq_heads, .head_dim = d,
                                   .q = qs + (size_t)s * nq_heads * d, .top_k = k, .want_topk = 1};
                ra_attend_out out = {.o = o, .lse = lse, .pos = tp, .scores = sc, .counts = cnt};
                double t0 = now_s();
                st = ra_client_attend(c, sid, 0, &r, &out);
                ms[s] = (now_s() - t0) * 1e3;
                if (st != RA_OK) {
                    fprintf(stderr, "ratd-demo: attend: %s (%s)\n", ra_strerror(st), ra_client_errmsg(c));
                    return 1;
                }
                for (int h = 0; h < nq_heads; h++) {
                    int g = h / group;
                    const float *qh = qs + ((size_t)s * nq_heads + h) * d;
                    exact_topk(qh, K + (size_t)g * n * d, n, d, k, ex);
                    /* attention restricted to the exact top-k set, in double */
                    double ok[1024], lk, num = 0, den = 0;
                    float *Kk = malloc(sizeof(float) * (size_t)k * d), *Vk = malloc(sizeof(float) * (size_t)k * d);
                    for (int a = 0; a < k; a++) {
                        memcpy(Kk + (size_t)a * d, K + ((size_t)g * n + (size_t)ex[a]) * d, sizeof(float) * d);
                        memcpy(Vk + (size_t)a * d, V + ((size_t)g * n + (size_t)ex[a]) * d, sizeof(float) * d);
                    }
                    exact_attention(qh, Kk, Vk, (size_t)k, d, ok, &lk);
                    free(Kk);
                    free(Vk);
                    for (int j = 0; j < d; j++) {
                        num += (o[h * d + j] - ok[j]) * (o[h * d + j] - ok[j]);
                        den += ok[j] * ok[j];
                    }
                    double e = sqrt(num / den);
                    if (e > maxerr)
                        maxerr = e;
                    /* share of the full attention mass the retrieved set holds */
                    lerr += exp(lse[h] - lse_ex[(size_t)s * nq_heads + h]);
                    for (int a = 0; a < cnt[h]; a++)
                        for (int bb = 0; bb < k; bb++)
                            if (tp[(size_t)h * k + a] == ex[bb] + 128) {
                                hit++;
                                break;
                            }
                    tot += k;
                }
            }
            qsort(ms, (size_t)steps, sizeof *ms, cmp_d);
            printf("%-14s %6d %10.3f %10.3f %14.2e %10.3f\n", kinds[ki].name, k, hit / tot,
                   lerr / (steps * nq_heads), maxerr, ms[steps / 2]);
            free(o);
            free(tp);
            free(ex);
            free(ms);
        }
        ra_client_session_drop(c, sid);
    }
    printf("recall@k: retrieved vs exact top-k; mass: mean share of the attention mass over all\n"
           "offloaded tokens that the retrieved set holds (exp(lse - lse_all)); err_vs_exact_k: max\n"
           "relative L2 error of o against exact attention (double) over the exact top-k set; attend_ms:\n"
           "median round trip of one Attend (all query heads) through libratd-client.\n");
    ra_client_close(c);
    free(K); free(V); free(qt); free(qs); free(pos); free(kmean); free(qmean); free(o_ex); free(lse_ex);
    return rc;
}
