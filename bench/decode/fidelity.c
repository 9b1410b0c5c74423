/* The exact reference of ratd-bench-decode's sampled steps: for every query head, the
 * scores of every key the daemon holds (the 16-bit keys exactly as sent, converted on the
 * fly, products summed in double), their exact top-k, and against it the retrieved set's
 * recall@k and share of the top-k's attention mass, plus a check of the daemon's lse
 * over the positions it says it used. One task per (session, layer, KV head), so the
 * query heads of a GQA group share each key read; tasks run in parallel. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "decode.h"

static int cmp_desc(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return x > y ? -1 : x < y;
}

typedef struct head_res {
    double recall, mass, lse_err, retrieved;
    int lse_checked, lse_bad, bad_pos;
} head_res;

typedef struct fid_job {
    dec_data *const *data;
    const dec_answer *ans; /* [n_sess][L] */
    int L;
    size_t n_rows;
    int k;
    head_res *res; /* [n_sess][L][H] */
    ra_status *st; /* [tasks] */
} fid_job;

/* Tie tolerance of a score: what fp32 summation of dim products may move it by, with
 * room (2 sqrt(dim) ulps of |q| max|k|); keys within it of the k-th score count as ties. */
static double tie_tol(const float *q, int D, double kmax)
{
    double qn = 0;
    for (int j = 0; j < D; j++)
        qn += (double)q[j] * q[j];
    return 2.0 * sqrt((double)D) * ldexp(1.0, -24) * sqrt(qn) * kmax + 1e-30;
}

static void fid_task(void *arg, size_t t)
{
    fid_job *j = arg;
    const dec_data *d0 = j->data[0];
    int G = d0->n_kv, grp = d0->n_q / d0->n_kv, D = d0->dim, k = j->k;
    size_t sess = t / ((size_t)j->L * G), l = t / (size_t)G % (size_t)j->L, g = t % (size_t)G;
    const dec_data *d = j->data[sess];
    const dec_answer *a = &j->ans[sess * (size_t)j->L + l];
    size_t n = j->n_rows;
    double *sc = malloc((size_t)grp * n * sizeof *sc), *tmp = malloc(n * sizeof *tmp);
    float *row = malloc((size_t)D * sizeof *row);
    unsigned char *seen = calloc(n, 1);
    if (!sc || !tmp || !row || !seen) {
        free(sc), free(tmp), free(row), free(seen);
        j->st[t] = RA_ENOMEM;
        return;
    }
    for (size_t r = 0; r < n; r++) {
        const uint16_t *kr = dec_key_row(d, (int)l, (int)g, r);
        for (int c = 0; c < D; c++)
            row[c] = dec_half_to_f32(kr[c], d->dtype);
        for (int hh = 0; hh < grp; hh++) {
            const float *q = a->q + (size_t)(g * grp + hh) * D;
            double s = 0;
            for (int c = 0; c < D; c++)
                s += (double)q[c] * row[c];
            sc[(size_t)hh * n + r] = s;
        }
    }
    double scale = 1.0 / sqrt((double)D);
    size_t kk = (size_t)k < n ? (size_t)k : n;
    for (int hh = 0; hh < grp; hh++) {
        int h = (int)g * grp + hh;
        const double *s = sc + (size_t)hh * n;
        head_res *o = &j->res[(sess * (size_t)j->L + l) * d->n_q + h];
        memset(o, 0, sizeof *o);
        memcpy(tmp, s, n * sizeof *tmp);
        qsort(tmp, n, sizeof *tmp, cmp_desc); /* the exact ranking */
        double thr = tmp[kk - 1], m = tmp[0];
        double top = 0; /* attention mass of the exact top-k, relative to e^(m scale) */
        for (size_t i = 0; i < kk; i++)
            top += exp((tmp[i] - m) * scale);
        double tol = tie_tol(a->q + (size_t)h * D, D, d->kmax[l * (size_t)G + g]);
        int cnt = a->counts[h], hits = 0;
        double got = 0;
        if (cnt < 0 || cnt > k) {
            o->bad_pos += 1;
            cnt = cnt < 0 ? 0 : k;
        }
        for (int i = 0; i < cnt; i++) {
            int64_t p = a->pos[(size_t)h * k + i] - d->pos0;
            if (p < 0 || (uint64_t)p >= n || seen[p]) { /* not a key it holds, or twice */
                o->bad_pos++;
                continue;
            }
            seen[p] = 1;
            hits += s[p] >= thr - tol;
            got += exp((s[p] - m) * scale);
        }
        for (int i = 0; i < cnt; i++) { /* clear for the next head */
            int64_t p = a->pos[(size_t)h * k + i] - d->pos0;
            if (p >= 0 && (uint64_t)p < n)
                seen[p] = 0;
        }
        o->recall = (double)(hits < (int)kk ? hits : (int)kk) / (double)kk;
        o->mass = got / top;
        o->retrieved = (double)cnt / k;
        /* the daemon's lse against the exact lse of the positions it reports */
        o->lse_checked = 1;
        double lse = a->lse[h];
        if (got > 0) {
            double ref = m * scale + log(got);
            o->lse_err = isfinite(lse) ? fabs(lse - ref) : INFINITY;
            o->lse_bad = !(o->lse_err <= 1e-2 + 1e-3 * fabs(ref));
        } else {
            o->lse_err = 0;
            o->lse_bad = !(isinf(lse) && lse < 0); /* nothing retrieved: -inf */
        }
    }
    free(sc), free(tmp), free(row), free(seen);
    j->st[t] = RA_OK;
}

ra_status dec_fid_add(dec_fid *f, dec_data *const *data, int n, const dec_answer *ans,
                      size_t n_rows, int top_k, int threads)
{
    const dec_data *d0 = data[0];
    int L = d0->n_layers, H = d0->n_q;
    size_t tasks = (size_t)n * L * d0->n_kv;
    if (n_rows == 0 || top_k < 1)
        return RA_EINVAL;
    head_res *res = calloc((size_t)n * L * H, sizeof *res);
    ra_status *st = calloc(tasks, sizeof *st);
    if (!res || !st) {
        free(res), free(st);
        return RA_ENOMEM;
    }
    fid_job j = {data, ans, L, n_rows, top_k, res, st};
    dec_par_for(tasks, threads, fid_task, &j);
    ra_status s = RA_OK;
    for (size_t i = 0; i < tasks && s == RA_OK; i++)
        s = st[i];
    for (size_t i = 0; s == RA_OK && i < (size_t)n * L * H; i++) {
        const head_res *o = &res[i];
        if (dec_series_add(&f->recall, o->recall) || dec_series_add(&f->mass, o->mass)) {
            s = RA_ENOMEM;
            break;
        }
        f->lse_checked += (uint64_t)o->lse_checked;
        f->lse_mismatch += (uint64_t)o->lse_bad;
        f->bad_positions += (uint64_t)o->bad_pos;
        f->retrieved += o->retrieved;
        if (isfinite(o->lse_err) && o->lse_err > f->lse_max_err)
            f->lse_max_err = o->lse_err;
        else if (!isfinite(o->lse_err))
            f->lse_max_err = INFINITY;
    }
    free(res);
    free(st);
    return s;
}

void dec_fid_free(dec_fid *f)
{
    dec_series_free(&f->recall);
    dec_series_free(&f->mass);
    memset(f, 0, sizeof *f);
}
