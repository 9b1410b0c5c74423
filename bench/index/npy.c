/* The .npy reader of npy.h: versions 1.0, 2.0 and 3.0 of the format, 2-D arrays of
 * '<f4' or '<f2' in C order. The header is a Python dict literal; only the three keys
 * the format defines are looked at, with a small hand parser (no eval, bounded). */
#include "npy.h"

#include <ctype.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "ra_half.h"

static const char *find_key(const char *h, size_t len, const char *key)
{
    size_t kl = strlen(key);
    for (size_t i = 0; i + kl + 2 <= len; i++)
        if ((h[i] == '\'' || h[i] == '"') && memcmp(h + i + 1, key, kl) == 0 &&
            h[i + 1 + kl] == h[i]) {
            const char *p = h + i + kl + 2;
            while (p < h + len && (*p == ' ' || *p == ':'))
                p++;
            return p < h + len ? p : NULL;
        }
    return NULL;
}

ra_status ra_npy_parse_header(const char *h, size_t len, int *is_f16, size_t *rows, size_t *cols)
{
    const char *end = h + len;
    const char *p = find_key(h, len, "descr");
    if (!p || end - p < 5 || (*p != '\'' && *p != '"'))
        return RA_EPROTO;
    if (memcmp(p + 1, "<f4", 3) == 0)
        *is_f16 = 0;
    else if (memcmp(p + 1, "<f2", 3) == 0)
        *is_f16 = 1;
    else
        return RA_EPROTO;
    p = find_key(h, len, "fortran_order");
    if (!p || end - p < 5 || memcmp(p, "False", 5) != 0)
        return RA_EPROTO;
    p = find_key(h, len, "shape");
    if (!p || *p != '(')
        return RA_EPROTO;
    p++;
    size_t dims[2];
    int nd = 0;
    while (p < end && *p != ')') {
        while (p < end && (*p == ' ' || *p == ','))
            p++;
        if (p < end && *p == ')')
            break;
        if (p >= end || !isdigit((unsigned char)*p) || nd == 2)
            return RA_EPROTO;
        size_t v = 0;
        while (p < end && isdigit((unsigned char)*p)) {
            if (v > ((size_t)1 << 40))
                return RA_EPROTO;
            v = v * 10 + (size_t)(*p - '0');
            p++;
        }
        dims[nd++] = v;
    }
    if (p >= end || nd != 2 || dims[0] == 0 || dims[1] == 0 || dims[1] > 65536)
        return RA_EPROTO;
    *rows = dims[0];
    *cols = dims[1];
    return RA_OK;
}

ra_status ra_npy_read_f32(const char *path, float **data, size_t *rows, size_t *cols, char *err,
                          size_t errlen)
{
    ra_status st = RA_EIO;
    char *hdr = NULL;
    void *raw = NULL;
    float *out = NULL;
    FILE *f = fopen(path, "rb");
    if (!f) {
        if (err)
            snprintf(err, errlen, "%s: cannot open", path);
        return RA_EIO;
    }
    unsigned char pre[12];
    if (fread(pre, 1, 10, f) != 10 || memcmp(pre, "\x93NUMPY", 6) != 0) {
        st = RA_EPROTO;
        if (err)
            snprintf(err, errlen, "%s: not a .npy file", path);
        goto fail;
    }
    size_t hl;
    long data_off;
    if (pre[6] == 1) {
        hl = (size_t)pre[8] | (size_t)pre[9] << 8;
        data_off = 10 + (long)hl;
    } else if (pre[6] == 2 || pre[6] == 3) {
        if (fread(pre + 10, 1, 2, f) != 2)
            goto fail;
        hl = (size_t)pre[8] | (size_t)pre[9] << 8 | (size_t)pre[10] << 16 | (size_t)pre[11] << 24;
        data_off = 12 + (long)hl;
    } else {
        st = RA_EPROTO;
        if (err)
            snprintf(err, errlen, "%s: unsupported .npy version %d", path, pre[6]);
        goto fail;
    }
    if (hl == 0 || hl > (1u << 20)) {
        st = RA_EPROTO;
        if (err)
            snprintf(err, errlen, "%s: bad header length", path);
        goto fail;
    }
    hdr = malloc(hl + 1);
    if (!hdr) {
        st = RA_ENOMEM;
        goto fail;
    }
    if (fread(hdr, 1, hl, f) != hl)
        goto fail;
    hdr[hl] = 0;
    int f16;
    size_t r, c;
    if (ra_npy_parse_header(hdr, hl, &f16, &r, &c) != RA_OK) {
        st = RA_EPROTO;
        if (err)
            snprintf(err, errlen, "%s: need a 2-D '<f4' or '<f2' array in C order", path);
        goto fail;
    }
    size_t es = f16 ? 2 : 4;
    if (fseek(f, 0, SEEK_END) != 0)
        goto fail;
    long fsz = ftell(f);
    if (fsz < 0 || r > ((size_t)1 << 40) / c || (size_t)fsz - (size_t)data_off != r * c * es ||
        fsz < data_off) {
        st = RA_EPROTO;
        if (err)
            snprintf(err, errlen, "%s: file size disagrees with shape (%zu, %zu)", path, r, c);
        goto fail;
    }
    if (fseek(f, data_off, SEEK_SET) != 0)
        goto fail;
    out = malloc(r * c * sizeof *out);
    raw = f16 ? malloc(r * c * es) : NULL;
    if (!out || (f16 && !raw)) {
        st = RA_ENOMEM;
        goto fail;
    }
    if (fread(f16 ? raw : (void *)out, es, r * c, f) != r * c)
        goto fail;
    if (f16)
        for (size_t i = 0; i < r * c; i++)
            out[i] = ra_f16_to_f32(((const uint16_t *)raw)[i]);
    free(raw);
    free(hdr);
    fclose(f);
    *data = out;
    *rows = r;
    *cols = c;
    return RA_OK;
fail:
    if (st == RA_EIO && err)
        snprintf(err, errlen, "%s: read error", path);
    free(raw);
    free(out);
    free(hdr);
    fclose(f);
    return st;
}

ra_status ra_npy_write_f32(const char *path, const float *data, size_t rows, size_t cols, char *err,
                           size_t errlen)
{
    if (!path || !data || rows == 0 || cols == 0)
        return RA_EINVAL;
    /* magic, version 1.0, header length, then the dict padded with spaces and a
     * newline so that the data starts on a multiple of 64 bytes */
    char dict[128];
    int dl =
        snprintf(dict, sizeof dict,
                 "{'descr': '<f4', 'fortran_order': False, 'shape': (%zu, %zu), }", rows, cols);
    if (dl < 0 || (size_t)dl >= sizeof dict)
        return RA_EINVAL;
    size_t hl = ((size_t)dl + 1 + 10 + 63) / 64 * 64 - 10;
    char hdr[192];
    memset(hdr, ' ', hl);
    memcpy(hdr, dict, (size_t)dl);
    hdr[hl - 1] = '\n';
    unsigned char pre[10] = {
        0x93, 'N', 'U', 'M', 'P', 'Y', 1, 0, (unsigned char)(hl & 0xff), (unsigned char)(hl >> 8)};
    char tmp[4096];
    if ((size_t)snprintf(tmp, sizeof tmp, "%s.tmp", path) >= sizeof tmp)
        return RA_EINVAL;
    FILE *f = fopen(tmp, "wb");
    if (!f) {
        if (err)
            snprintf(err, errlen, "%s: cannot create", tmp);
        return RA_EIO;
    }
    int ok = fwrite(pre, 1, sizeof pre, f) == sizeof pre && fwrite(hdr, 1, hl, f) == hl &&
             fwrite(data, sizeof *data, rows * cols, f) == rows * cols;
    ok = fclose(f) == 0 && ok;
    if (!ok || rename(tmp, path) != 0) {
        remove(tmp);
        if (err)
            snprintf(err, errlen, "%s: write error", path);
        return RA_EIO;
    }
    return RA_OK;
}
