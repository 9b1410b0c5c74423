/* Reader and writer of trace files (format in ra_trace.h). Kept apart from the
 * decoder so that ratd-bench-index and the tests link only this: a header check
 * that trusts nothing in the file, pread/pwrite by computed offset, and a writer
 * that publishes the file by rename only once it is complete. */
#define _GNU_SOURCE
#include "ra_trace.h"

#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "ra_half.h"

struct ra_trace {
    int fd;
    ra_trace_info info;
    char *path;
};

struct ra_trace_writer {
    int fd;
    ra_trace_info info;
    char *path, *tmp;
    uint64_t *rows; /* rows written per block [layer][tensor block][head] */
    size_t n_blocks;
    int failed;
};

static void seterr(char *err, size_t errlen, const char *fmt, ...)
{
    if (!err || errlen == 0)
        return;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err, errlen, fmt, ap);
    va_end(ap);
}

static void put_u32(uint8_t *p, uint32_t v)
{
    p[0] = (uint8_t)v;
    p[1] = (uint8_t)(v >> 8);
    p[2] = (uint8_t)(v >> 16);
    p[3] = (uint8_t)(v >> 24);
}

static uint32_t get_u32(const uint8_t *p)
{
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

ra_status ra_trace_info_check(const ra_trace_info *i)
{
    if (!i || ra_dtype_size(i->dtype) == 0)
        return RA_EINVAL;
    if (i->n_layers == 0 || i->n_layers > RA_TRACE_MAX_LAYERS || i->n_heads == 0 ||
        i->n_heads > RA_TRACE_MAX_HEADS || i->n_kv_heads == 0 || i->n_kv_heads > i->n_heads ||
        i->n_heads % i->n_kv_heads != 0 || i->head_dim == 0 || i->head_dim > RA_TRACE_MAX_HEAD_DIM ||
        i->n_pos == 0 || i->n_pos > RA_TRACE_MAX_POS || i->pos0 > RA_TRACE_MAX_POS)
        return RA_EINVAL;
    return RA_OK;
}

/* With the bounds above every product fits easily in 64 bits
 * (2^10 * 3*2^10 * 2^26 * 2^12 * 4 < 2^62). */
static uint64_t block_bytes(const ra_trace_info *i)
{
    return (uint64_t)i->n_pos * i->head_dim * ra_dtype_size(i->dtype);
}

uint64_t ra_trace_offset(const ra_trace_info *i, ra_trace_tensor which, uint32_t layer, uint32_t head,
                         uint32_t pos)
{
    uint64_t per_layer = (uint64_t)(i->n_heads + 2u * i->n_kv_heads) * block_bytes(i);
    uint64_t blk = 0;
    switch (which) {
    case RA_TRACE_Q: blk = head; break;
    case RA_TRACE_K: blk = (uint64_t)i->n_heads + head; break;
    case RA_TRACE_V: blk = (uint64_t)i->n_heads + i->n_kv_heads + head; break;
    }
    return RA_TRACE_HEADER_SIZE + layer * per_layer + blk * block_bytes(i) +
           (uint64_t)pos * i->head_dim * ra_dtype_size(i->dtype);
}

uint64_t ra_trace_file_size(const ra_trace_info *i)
{
    return RA_TRACE_HEADER_SIZE + (uint64_t)i->n_layers * (i->n_heads + 2u * i->n_kv_heads) * block_bytes(i);
}

static int check_index(const ra_trace_info *i, ra_trace_tensor which, uint32_t layer, uint32_t head,
                       uint32_t pos, uint32_t n)
{
    uint32_t nh = which == RA_TRACE_Q ? i->n_heads : i->n_kv_heads;
    if ((unsigned)which > RA_TRACE_V || layer >= i->n_layers || head >= nh || pos > i->n_pos ||
        n > i->n_pos - pos)
        return 0;
    return 1;
}

static ra_status full_pread(int fd, void *buf, size_t n, uint64_t off)
{
    uint8_t *p = buf;
    while (n > 0) {
        ssize_t r = pread(fd, p, n, (off_t)off);
        if (r < 0 && errno == EINTR)
            continue;
        if (r <= 0)
            return RA_EIO;
        p += r;
        n -= (size_t)r;
        off += (uint64_t)r;
    }
    return RA_OK;
}

static ra_status full_pwrite(int fd, const void *buf, size_t n, uint64_t off)
{
    const uint8_t *p = buf;
    while (n > 0) {
        ssize_t r = pwrite(fd, p, n, (off_t)off);
        if (r < 0 && errno == EINTR)
            continue;
        if (r <= 0)
            return RA_EIO;
        p += r;
        n -= (size_t)r;
        off += (uint64_t)r;
    }
    return RA_OK;
}

unsigned ra_trace_sample_train(unsigned C, unsigned want, unsigned *pos)
{
    if (want >= C) {
        for (unsigned i = 0; i < C; i++)
            pos[i] = i;
        return C;
    }
    unsigned tail = want / 2, head = want - tail, n = 0;
    unsigned span = C - tail;
    for (unsigned i = 0; i < head; i++)
        pos[n++] = (unsigned)((unsigned long long)i * span / head);
    for (unsigned i = C - tail; i < C; i++)
        pos[n++] = i;
    return n;
}

ra_status ra_trace_open(const char *path, ra_trace **out, char *err, size_t errlen)
{
    uint8_t h[RA_TRACE_HEADER_SIZE];
    ra_trace *t = NULL;
    ra_status st;
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
        seterr(err, errlen, "%s: cannot open: %s", path, strerror(errno));
        return RA_EIO;
    }
    struct stat sb;
    if (fstat(fd, &sb) != 0 || !S_ISREG(sb.st_mode)) {
        seterr(err, errlen, "%s: not a regular file", path);
        st = RA_EIO;
        goto fail;
    }
    if ((uint64_t)sb.st_size < RA_TRACE_HEADER_SIZE) {
        seterr(err, errlen, "%s: %lld bytes, shorter than the %u-byte trace header", path,
               (long long)sb.st_size, RA_TRACE_HEADER_SIZE);
        st = RA_EPROTO;
        goto fail;
    }
    if ((st = full_pread(fd, h, sizeof h, 0)) != RA_OK) {
        seterr(err, errlen, "%s: cannot read the header", path);
        goto fail;
    }
    if (memcmp(h, RA_TRACE_MAGIC, 8) != 0) {
        seterr(err, errlen, "%s: not a ratd trace (bad magic)", path);
        st = RA_EPROTO;
        goto fail;
    }
    ra_trace_info info = {
        .version = get_u32(h + 8),
        .dtype = (ra_dtype)get_u32(h + 12),
        .n_layers = get_u32(h + 16),
        .n_heads = get_u32(h + 20),
        .n_kv_heads = get_u32(h + 24),
        .head_dim = get_u32(h + 28),
        .n_pos = get_u32(h + 32),
        .pos0 = get_u32(h + 36),
    };
    memcpy(&info.rope_theta, h + 40, 4);
    if (info.version != RA_TRACE_VERSION) {
        seterr(err, errlen, "%s: trace version %u, this reader knows %u", path, info.version,
               RA_TRACE_VERSION);
        st = RA_EVERSION;
        goto fail;
    }
    if (get_u32(h + 12) > RA_DTYPE_BF16 || ra_trace_info_check(&info) != RA_OK) {
        seterr(err, errlen,
               "%s: bad trace header (dtype %u, layers %u, heads %u, kv heads %u, head dim %u, positions %u)",
               path, get_u32(h + 12), info.n_layers, info.n_heads, info.n_kv_heads, info.head_dim, info.n_pos);
        st = RA_EPROTO;
        goto fail;
    }
    uint64_t want = ra_trace_file_size(&info);
    if ((uint64_t)sb.st_size != want) {
        seterr(err, errlen, "%s: header implies %llu bytes but the file has %lld", path,
               (unsigned long long)want, (long long)sb.st_size);
        st = RA_EPROTO;
        goto fail;
    }
    t = calloc(1, sizeof *t);
    if (!t || !(t->path = strdup(path))) {
        seterr(err, errlen, "%s: out of memory", path);
        st = RA_ENOMEM;
        goto fail;
    }
    t->fd = fd;
    t->info = info;
    *out = t;
    return RA_OK;
fail:
    if (t)
        free(t->path);
    free(t);
    close(fd);
    return st;
}

const ra_trace_info *ra_trace_get_info(const ra_trace *t)
{
    return &t->info;
}

ra_status ra_trace_read(ra_trace *t, ra_trace_tensor which, uint32_t layer, uint32_t head, uint32_t pos,
                        uint32_t n, float *out)
{
    const ra_trace_info *i = &t->info;
    if (!check_index(i, which, layer, head, pos, n))
        return RA_EINVAL;
    size_t cnt = (size_t)n * i->head_dim;
    uint64_t off = ra_trace_offset(i, which, layer, head, pos);
    if (i->dtype == RA_DTYPE_F32)
        return full_pread(t->fd, out, cnt * 4, off);
    /* 16-bit rows are read into the tail half of `out` and widened in place from
     * the front: element j is read at byte 2*cnt + 2j before float j (4j) overwrites it. */
    char *half = (char *)out + cnt * 2;
    ra_status st = full_pread(t->fd, half, cnt * 2, off);
    if (st != RA_OK)
        return st;
    for (size_t j = 0; j < cnt; j++) {
        uint16_t v; /* memcpy: the bytes alias floats */
        memcpy(&v, half + 2 * j, 2);
        out[j] = i->dtype == RA_DTYPE_BF16 ? ra_bf16_to_f32(v) : ra_f16_to_f32(v);
    }
    return RA_OK;
}

void ra_trace_close(ra_trace *t)
{
    if (!t)
        return;
    close(t->fd);
    free(t->path);
    free(t);
}

ra_status ra_trace_writer_create(const char *path, const ra_trace_info *info, ra_trace_writer **out, char *err,
                                 size_t errlen)
{
    ra_trace_writer *w = NULL;
    ra_status st;
    if (ra_trace_info_check(info) != RA_OK) {
        seterr(err, errlen, "%s: trace dims out of range", path);
        return RA_EINVAL;
    }
    w = calloc(1, sizeof *w);
    if (!w)
        goto nomem;
    w->fd = -1;
    w->info = *info;
    w->info.version = RA_TRACE_VERSION;
    w->n_blocks = (size_t)info->n_layers * (info->n_heads + 2u * info->n_kv_heads);
    w->rows = calloc(w->n_blocks, sizeof *w->rows);
    w->path = strdup(path);
    if (!w->rows || !w->path || asprintf(&w->tmp, "%s.tmp", path) < 0) {
        w->tmp = NULL;
        goto nomem;
    }
    w->fd = open(w->tmp, O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (w->fd < 0) {
        seterr(err, errlen, "%s: cannot create: %s", w->tmp, strerror(errno));
        st = RA_EIO;
        goto fail;
    }
    uint8_t h[RA_TRACE_HEADER_SIZE] = {0};
    memcpy(h, RA_TRACE_MAGIC, 8);
    put_u32(h + 8, RA_TRACE_VERSION);
    put_u32(h + 12, (uint32_t)info->dtype);
    put_u32(h + 16, info->n_layers);
    put_u32(h + 20, info->n_heads);
    put_u32(h + 24, info->n_kv_heads);
    put_u32(h + 28, info->head_dim);
    put_u32(h + 32, info->n_pos);
    put_u32(h + 36, info->pos0);
    memcpy(h + 40, &info->rope_theta, 4);
    if (full_pwrite(w->fd, h, sizeof h, 0) != RA_OK || ftruncate(w->fd, (off_t)ra_trace_file_size(info)) != 0) {
        seterr(err, errlen, "%s: cannot write: %s", w->tmp, strerror(errno));
        st = RA_EIO;
        goto fail;
    }
    *out = w;
    return RA_OK;
nomem:
    seterr(err, errlen, "%s: out of memory", path);
    st = RA_ENOMEM;
fail:
    ra_trace_writer_abort(w);
    return st;
}

ra_status ra_trace_writer_put(ra_trace_writer *w, ra_trace_tensor which, uint32_t layer, uint32_t head,
                              uint32_t pos, uint32_t n, const float *src)
{
    const ra_trace_info *i = &w->info;
    if (!check_index(i, which, layer, head, pos, n))
        return RA_EINVAL;
    size_t cnt = (size_t)n * i->head_dim;
    uint64_t off = ra_trace_offset(i, which, layer, head, pos);
    ra_status st;
    if (i->dtype == RA_DTYPE_F32) {
        st = full_pwrite(w->fd, src, cnt * 4, off);
    } else {
        uint16_t *buf = malloc(cnt * 2 + 2);
        if (!buf)
            return RA_ENOMEM;
        for (size_t j = 0; j < cnt; j++)
            buf[j] = i->dtype == RA_DTYPE_BF16 ? ra_f32_to_bf16(src[j]) : ra_f32_to_f16(src[j]);
        st = full_pwrite(w->fd, buf, cnt * 2, off);
        free(buf);
    }
    if (st != RA_OK) {
        w->failed = 1;
        return st;
    }
    size_t blk = (size_t)layer * (i->n_heads + 2u * i->n_kv_heads) +
                 (which == RA_TRACE_Q ? head
                  : which == RA_TRACE_K ? i->n_heads + head
                                        : i->n_heads + i->n_kv_heads + head);
    w->rows[blk] += n;
    return RA_OK;
}

ra_status ra_trace_writer_finish(ra_trace_writer *w, char *err, size_t errlen)
{
    ra_status st = RA_OK;
    if (w->failed) {
        seterr(err, errlen, "%s: an earlier write failed", w->tmp);
        st = RA_EIO;
        goto out;
    }
    for (size_t b = 0; b < w->n_blocks; b++) {
        if (w->rows[b] != w->info.n_pos) {
            seterr(err, errlen, "%s: block %zu has %llu of %u rows written", w->tmp, b,
                   (unsigned long long)w->rows[b], w->info.n_pos);
            st = RA_ESTATE;
            goto out;
        }
    }
    if (fsync(w->fd) != 0 || close(w->fd) != 0) {
        w->fd = -1;
        seterr(err, errlen, "%s: cannot flush: %s", w->tmp, strerror(errno));
        st = RA_EIO;
        goto out;
    }
    w->fd = -1;
    if (rename(w->tmp, w->path) != 0) {
        seterr(err, errlen, "%s: cannot rename to %s: %s", w->tmp, w->path, strerror(errno));
        st = RA_EIO;
        goto out;
    }
    free(w->tmp);
    w->tmp = NULL; /* published: nothing to remove */
out:
    ra_trace_writer_abort(w);
    return st;
}

void ra_trace_writer_abort(ra_trace_writer *w)
{
    if (!w)
        return;
    if (w->fd >= 0)
        close(w->fd);
    if (w->tmp)
        unlink(w->tmp);
    free(w->tmp);
    free(w->path);
    free(w->rows);
    free(w);
}
