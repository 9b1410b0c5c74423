/* safetensors reader behind lm_st.h. The file is mapped read-only; the header is
 * parsed with the bounded JSON reader and each tensor entry is checked (dtype, rank,
 * element count vs byte range, range inside the data area, no overlaps) before the
 * decoder sees a pointer into it: a model file is input like any other. */
#include "lm_st.h"

#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "lm_json.h"
#include "ra_half.h"

struct ra_lm_st {
    char *path;
    void *map;
    size_t map_len;
    ra_lm_st_tensor *t;
    size_t n;
};

static void seterr(char *err, size_t errlen, const char *fmt, ...)
{
    if (!err || !errlen)
        return;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err, errlen, fmt, ap);
    va_end(ap);
}

static int by_offset(const void *a, const void *b)
{
    const ra_lm_st_tensor *x = *(const ra_lm_st_tensor *const *)a, *y = *(const ra_lm_st_tensor *const *)b;
    return x->data < y->data ? -1 : x->data > y->data;
}

static int by_name(const void *a, const void *b)
{
    const ra_lm_st_tensor *x = *(const ra_lm_st_tensor *const *)a, *y = *(const ra_lm_st_tensor *const *)b;
    return strcmp(x->name, y->name);
}

static void fmt_shape(char *buf, size_t len, unsigned rank, const uint64_t *shape)
{
    size_t n = (size_t)snprintf(buf, len, "[");
    for (unsigned i = 0; i < rank && n < len; i++)
        n += (size_t)snprintf(buf + n, len - n, "%s%llu", i ? ", " : "", (unsigned long long)shape[i]);
    if (n < len)
        snprintf(buf + n, len - n, "]");
}

ra_status ra_lm_st_open(const char *path, ra_lm_st **out, char *err, size_t errlen)
{
    ra_status st = RA_OK;
    ra_lm_json *hdr = NULL;
    ra_lm_st *s = calloc(1, sizeof *s);
    const ra_lm_st_tensor **sorted = NULL;
    char jerr[200];
    int fd = -1;
    if (!s || !(s->path = strdup(path))) {
        seterr(err, errlen, "%s: out of memory", path);
        st = RA_ENOMEM;
        goto fail;
    }
    fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
        seterr(err, errlen, "%s: cannot open: %s", path, strerror(errno));
        st = RA_EIO;
        goto fail;
    }
    struct stat sb;
    if (fstat(fd, &sb) != 0 || !S_ISREG(sb.st_mode)) {
        seterr(err, errlen, "%s: not a regular file", path);
        st = RA_EIO;
        goto fail;
    }
    uint64_t fsize = (uint64_t)sb.st_size;
    if (fsize < 8) {
        seterr(err, errlen, "%s: %llu bytes, too short for a safetensors file (8-byte header length)", path,
               (unsigned long long)fsize);
        st = RA_EPROTO;
        goto fail;
    }
    s->map_len = (size_t)fsize;
    s->map = mmap(NULL, s->map_len, PROT_READ, MAP_PRIVATE, fd, 0);
    if (s->map == MAP_FAILED) {
        s->map = NULL;
        seterr(err, errlen, "%s: cannot map: %s", path, strerror(errno));
        st = RA_EIO;
        goto fail;
    }
    const uint8_t *b = s->map;
    uint64_t hlen = 0;
    for (int i = 7; i >= 0; i--)
        hlen = hlen << 8 | b[i];
    if (hlen > RA_LM_ST_MAX_HEADER || hlen > fsize - 8) {
        seterr(err, errlen, "%s: header claims %llu bytes but the file has %llu after the length field", path,
               (unsigned long long)hlen, (unsigned long long)(fsize - 8));
        st = RA_EPROTO;
        goto fail;
    }
    if ((st = ra_lm_json_parse((const char *)b + 8, (size_t)hlen, &hdr, jerr, sizeof jerr)) != RA_OK) {
        seterr(err, errlen, "%s: malformed JSON header: %s", path, jerr);
        goto fail;
    }
    if (hdr->type != RA_LM_JSON_OBJ) {
        seterr(err, errlen, "%s: header is not a JSON object", path);
        st = RA_EPROTO;
        goto fail;
    }
    const uint8_t *data = b + 8 + hlen;
    uint64_t data_len = fsize - 8 - hlen;
    s->t = calloc(hdr->n ? hdr->n : 1, sizeof *s->t);
    if (!s->t) {
        seterr(err, errlen, "%s: out of memory", path);
        st = RA_ENOMEM;
        goto fail;
    }
    for (size_t i = 0; i < hdr->n; i++) {
        const char *name = hdr->keys[i];
        const ra_lm_json *e = &hdr->kids[i];
        if (strcmp(name, "__metadata__") == 0)
            continue;
        ra_lm_st_tensor *t = &s->t[s->n];
        const ra_lm_json *dt = ra_lm_json_get(e, "dtype"), *sh = ra_lm_json_get(e, "shape"),
                         *off = ra_lm_json_get(e, "data_offsets");
        if (!dt || dt->type != RA_LM_JSON_STR || !sh || sh->type != RA_LM_JSON_ARR || !off ||
            off->type != RA_LM_JSON_ARR || off->n != 2) {
            seterr(err, errlen, "%s: tensor '%s': entry lacks dtype, shape or data_offsets", path, name);
            st = RA_EPROTO;
            goto fail;
        }
        unsigned esz;
        if (strcmp(dt->str, "F32") == 0) {
            t->dtype = RA_LM_ST_F32;
            esz = 4;
        } else if (strcmp(dt->str, "F16") == 0) {
            t->dtype = RA_LM_ST_F16;
            esz = 2;
        } else if (strcmp(dt->str, "BF16") == 0) {
            t->dtype = RA_LM_ST_BF16;
            esz = 2;
        } else {
            seterr(err, errlen, "%s: tensor '%s': dtype %s not supported (F32, F16, BF16)", path, name, dt->str);
            st = RA_ENOTSUP;
            goto fail;
        }
        if (sh->n > RA_LM_ST_MAX_RANK) {
            seterr(err, errlen, "%s: tensor '%s': rank %zu above %d", path, name, sh->n, RA_LM_ST_MAX_RANK);
            st = RA_EPROTO;
            goto fail;
        }
        t->rank = (unsigned)sh->n;
        t->numel = 1;
        for (unsigned d = 0; d < t->rank; d++) {
            long long v;
            /* each dim < 2^40 and the product checked against the file: no overflow */
            if (!ra_lm_json_int(&sh->kids[d], 0, 1LL << 40, &v)) {
                seterr(err, errlen, "%s: tensor '%s': shape entry %u is not a non-negative integer", path, name, d);
                st = RA_EPROTO;
                goto fail;
            }
            t->shape[d] = (uint64_t)v;
            if (v != 0 && t->numel > fsize / (uint64_t)v) {
                seterr(err, errlen, "%s: tensor '%s': shape has more elements than the file has bytes", path, name);
                st = RA_EPROTO;
                goto fail;
            }
            t->numel *= (uint64_t)v;
        }
        long long o0, o1;
        if (!ra_lm_json_int(&off->kids[0], 0, 1LL << 52, &o0) || !ra_lm_json_int(&off->kids[1], 0, 1LL << 52, &o1) ||
            o1 < o0) {
            seterr(err, errlen, "%s: tensor '%s': bad data_offsets", path, name);
            st = RA_EPROTO;
            goto fail;
        }
        if ((uint64_t)o1 > data_len) {
            seterr(err, errlen, "%s: tensor '%s': data_offsets end at %lld but the data area has %llu bytes "
                   "(file truncated?)", path, name, o1, (unsigned long long)data_len);
            st = RA_EPROTO;
            goto fail;
        }
        if ((uint64_t)(o1 - o0) != t->numel * esz) {
            seterr(err, errlen, "%s: tensor '%s': %lld bytes for %llu elements of %s", path, name, o1 - o0,
                   (unsigned long long)t->numel, dt->str);
            st = RA_EPROTO;
            goto fail;
        }
        if (!(t->name = strdup(name))) {
            seterr(err, errlen, "%s: out of memory", path);
            st = RA_ENOMEM;
            goto fail;
        }
        t->data = data + o0;
        t->nbytes = (uint64_t)(o1 - o0);
        s->n++;
    }
    /* a name given twice is ambiguous (JSON readers keep the first or the last): refused;
     * overlapping ranges mean a corrupt or hostile file */
    sorted = malloc((s->n ? s->n : 1) * sizeof *sorted);
    if (!sorted) {
        seterr(err, errlen, "%s: out of memory", path);
        st = RA_ENOMEM;
        goto fail;
    }
    for (size_t i = 0; i < s->n; i++)
        sorted[i] = &s->t[i];
    qsort(sorted, s->n, sizeof *sorted, by_name);
    for (size_t i = 1; i < s->n; i++) {
        if (strcmp(sorted[i - 1]->name, sorted[i]->name) == 0) {
            seterr(err, errlen, "%s: tensor '%s' appears more than once in the header", path,
                   sorted[i]->name);
            st = RA_EPROTO;
            goto fail;
        }
    }
    qsort(sorted, s->n, sizeof *sorted, by_offset);
    for (size_t i = 1; i < s->n; i++) {
        if (sorted[i - 1]->data + sorted[i - 1]->nbytes > sorted[i]->data) {
            seterr(err, errlen, "%s: tensors '%s' and '%s' overlap", path, sorted[i - 1]->name, sorted[i]->name);
            st = RA_EPROTO;
            goto fail;
        }
    }
    free(sorted);
    ra_lm_json_free(hdr);
    close(fd);
    *out = s;
    return RA_OK;
fail:
    free(sorted);
    ra_lm_json_free(hdr);
    if (fd >= 0)
        close(fd);
    ra_lm_st_close(s);
    return st;
}

void ra_lm_st_close(ra_lm_st *s)
{
    if (!s)
        return;
    for (size_t i = 0; i < s->n; i++)
        free(s->t[i].name);
    free(s->t);
    if (s->map)
        munmap(s->map, s->map_len);
    free(s->path);
    free(s);
}

size_t ra_lm_st_count(const ra_lm_st *s)
{
    return s->n;
}

const ra_lm_st_tensor *ra_lm_st_at(const ra_lm_st *s, size_t i)
{
    return i < s->n ? &s->t[i] : NULL;
}

const ra_lm_st_tensor *ra_lm_st_find(const ra_lm_st *s, const char *name)
{
    for (size_t i = 0; i < s->n; i++)
        if (strcmp(s->t[i].name, name) == 0)
            return &s->t[i];
    return NULL;
}

ra_status ra_lm_st_load_f32(const ra_lm_st *s, const char *name, unsigned rank, const uint64_t *shape, float *dst,
                            char *err, size_t errlen)
{
    const ra_lm_st_tensor *t = ra_lm_st_find(s, name);
    char want[128], got[128];
    if (!t) {
        seterr(err, errlen, "%s: tensor '%s' is missing", s->path, name);
        return RA_EPROTO;
    }
    int same = t->rank == rank;
    for (unsigned d = 0; same && d < rank; d++)
        same = t->shape[d] == shape[d];
    if (!same) {
        fmt_shape(want, sizeof want, rank, shape);
        fmt_shape(got, sizeof got, t->rank, t->shape);
        seterr(err, errlen, "%s: tensor '%s' has shape %s, the config implies %s", s->path, name, got, want);
        return RA_ESHAPE;
    }
    const uint8_t *p = t->data;
    for (uint64_t i = 0; i < t->numel; i++) {
        uint16_t h;
        switch (t->dtype) {
        case RA_LM_ST_F32: memcpy(&dst[i], p + 4 * i, 4); break;
        case RA_LM_ST_F16:
            memcpy(&h, p + 2 * i, 2);
            dst[i] = ra_f16_to_f32(h);
            break;
        case RA_LM_ST_BF16:
            memcpy(&h, p + 2 * i, 2);
            dst[i] = ra_bf16_to_f32(h);
            break;
        }
    }
    return RA_OK;
}
