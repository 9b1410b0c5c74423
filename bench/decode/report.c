/* Figures of ratd-bench-decode: growable series of samples with nearest-rank percentiles,
 * and the flat JSON object of --json, written by hand (integral numbers in full, others
 * with %.6g, strings escaped, NAN and infinities as null) so that the bench needs no JSON library.
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "decode.h"

int dec_series_add(dec_series *s, double x)
{
    if (s->n == s->cap) {
        size_t cap = s->cap ? 2 * s->cap : 256;
        double *v = realloc(s->v, cap * sizeof *v);
        if (!v)
            return -1;
        s->v = v;
        s->cap = cap;
    }
    s->v[s->n++] = x;
    return 0;
}

static int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

double dec_series_pct(const dec_series *s, double p)
{
    if (s->n == 0)
        return NAN;
    double *t = malloc(s->n * sizeof *t);
    if (!t)
        return NAN;
    memcpy(t, s->v, s->n * sizeof *t);
    qsort(t, s->n, sizeof *t, cmp_double);
    double r = ceil(p / 100.0 * (double)s->n);
    size_t i = r < 1 ? 0 : (size_t)r - 1;
    double v = t[i < s->n ? i : s->n - 1];
    free(t);
    return v;
}

double dec_series_mean(const dec_series *s)
{
    if (s->n == 0)
        return NAN;
    double a = 0;
    for (size_t i = 0; i < s->n; i++)
        a += s->v[i];
    return a / (double)s->n;
}

double dec_series_max(const dec_series *s)
{
    double m = s->n ? s->v[0] : NAN;
    for (size_t i = 1; i < s->n; i++)
        m = s->v[i] > m ? s->v[i] : m;
    return m;
}

double dec_series_min(const dec_series *s)
{
    double m = s->n ? s->v[0] : NAN;
    for (size_t i = 1; i < s->n; i++)
        m = s->v[i] < m ? s->v[i] : m;
    return m;
}

void dec_series_free(dec_series *s)
{
    free(s->v);
    memset(s, 0, sizeof *s);
}

/* ---- JSON ------------------------------------------------------------------------------ */

static void key(dec_json *j, const char *k)
{
    fprintf(j->f, "%s\"%s\":", j->n++ ? "," : "", k);
}

void dec_json_begin(dec_json *j, FILE *f)
{
    j->f = f;
    j->n = 0;
    fputc('{', f);
}

void dec_json_num(dec_json *j, const char *k, double v)
{
    key(j, k);
    if (!isfinite(v))
        fputs("null", j->f);
    else if (v == floor(v) && fabs(v) < 1e15) /* counts and bytes: every digit */
        fprintf(j->f, "%.0f", v);
    else
        fprintf(j->f, "%.6g", v);
}

void dec_json_int(dec_json *j, const char *k, long long v)
{
    key(j, k);
    fprintf(j->f, "%lld", v);
}

void dec_json_bool(dec_json *j, const char *k, int v)
{
    key(j, k);
    fputs(v ? "true" : "false", j->f);
}

void dec_json_str(dec_json *j, const char *k, const char *v)
{
    key(j, k);
    if (!v) {
        fputs("null", j->f);
        return;
    }
    fputc('"', j->f);
    for (const unsigned char *p = (const unsigned char *)v; *p; p++) {
        if (*p == '"' || *p == '\\')
            fprintf(j->f, "\\%c", *p);
        else if (*p < 0x20)
            fprintf(j->f, "\\u%04x", *p);
        else
            fputc(*p, j->f);
    }
    fputc('"', j->f);
}

void dec_json_end(dec_json *j)
{
    fputs("}\n", j->f);
    fflush(j->f);
}
