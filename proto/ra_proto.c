/* Multipart framing of the ratd wire protocol (see ra_proto.h). Everything that comes
 * off a socket is bounded here before the daemon or the client look at it: frame count,
 * header size, tensor frame sizes, and the agreement of each frame with its declared
 * shape. Replies need the request id, so the header (bounded to 64 KiB) is unpacked
 * first; tensor frames are only measured, never copied, except to fix alignment. */
#include "ra_proto.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int ra_proto_recv(void *sock, ra_proto_msg *m, int flags)
{
    m->n = 0;
    m->dropped = 0;
    m->total_bytes = 0;
    int first = 1;
    for (;;) {
        zmq_msg_t scratch;
        zmq_msg_t *dst = m->n < RA_PROTO_MAX_FRAMES ? &m->frames[m->n] : &scratch;
        zmq_msg_init(dst);
        int rc;
        do {
            rc = zmq_msg_recv(dst, sock, first ? flags : 0);
        } while (rc < 0 && !first && errno == EINTR); /* later parts are already here */
        if (rc < 0) {
            int e = errno;
            zmq_msg_close(dst);
            ra_proto_msg_close(m);
            errno = e;
            return -1;
        }
        first = 0;
        m->total_bytes += zmq_msg_size(dst);
        int more = zmq_msg_more(dst);
        if (dst == &scratch) {
            zmq_msg_close(&scratch);
            m->dropped++;
        } else {
            m->n++;
        }
        if (!more)
            return 0;
    }
}

void ra_proto_msg_close(ra_proto_msg *m)
{
    for (int i = 0; i < m->n; i++)
        zmq_msg_close(&m->frames[i]);
    m->n = 0;
}

size_t ra_proto_dtype_size(int dt)
{
    switch (dt) {
    case RATD__DTYPE__F32:
        return 4;
    case RATD__DTYPE__F16:
        return 2;
    case RATD__DTYPE__BF16:
        return 2;
    case RATD__DTYPE__I64:
        return 8;
    case RATD__DTYPE__I32:
        return 4;
    default:
        return 0;
    }
}

const char *ra_proto_type_name(int type)
{
    static const char *names[] = {"none",   "hello",         "create_session", "offload",
                                  "append", "attend",        "drop_session",   "stats",
                                  "list_sessions", "get_config", "wait_ready"};
    if (type < 0 || type >= (int)(sizeof names / sizeof names[0]))
        return "unknown";
    return names[type];
}

static const char *role_name(int r)
{
    static const char *names[] = {"none",     "K",          "V",          "pos",
                                  "q_train",  "q",          "o",          "lse",
                                  "topk_pos", "topk_score", "topk_count", "train_topk",
                                  "graph_adj", "graph_entries"};
    if (r < 0 || r >= (int)(sizeof names / sizeof names[0]))
        return "unknown";
    return names[r];
}

ra_status ra_proto_parse(ra_proto_msg *m, int first, const ra_proto_limits *lim, ra_proto_view *v,
                         uint64_t *req_id, int *type, char *err, size_t errlen)
{
    return ra_proto_parse_with(m, first, lim, NULL, v, req_id, type, err, errlen);
}

ra_status ra_proto_parse_with(ra_proto_msg *m, int first, const ra_proto_limits *lim,
                              ProtobufCAllocator *alloc, ra_proto_view *v, uint64_t *req_id,
                              int *type, char *err, size_t errlen)
{
    memset(v, 0, sizeof *v);
    if (m->dropped) {
        snprintf(err, errlen, "message has more than %d frames", RA_PROTO_MAX_FRAMES);
        return RA_EPROTO;
    }
    if (first >= m->n) {
        snprintf(err, errlen, "message has no header frame");
        return RA_EPROTO;
    }
    size_t hsz = zmq_msg_size(&m->frames[first]);
    if (hsz == 0) {
        snprintf(err, errlen, "header frame is empty");
        return RA_EPROTO;
    }
    size_t hmax = lim && lim->max_header_bytes ? lim->max_header_bytes : RA_PROTO_MAX_HEADER_BYTES;
    if (hsz > hmax) {
        snprintf(err, errlen, "header frame is %zu bytes; at most %zu are accepted", hsz, hmax);
        return RA_ETOOBIG;
    }
    Ratd__Header *h =
        ratd__header__unpack(alloc, hsz, (const uint8_t *)zmq_msg_data(&m->frames[first]));
    if (!h) {
        snprintf(err, errlen, "header frame (%zu bytes) is not a ratd protocol header", hsz);
        return RA_EPROTO;
    }
    if (req_id)
        *req_id = h->request_id;
    if (type)
        *type = (int)h->type;
    ra_status st = RA_EPROTO;
    int nt = m->n - first - 1;
    size_t total = 0;
    for (int i = 0; i < nt; i++) {
        size_t sz = zmq_msg_size(&m->frames[first + 1 + i]);
        total += sz;
        if (lim && lim->max_frame_bytes && sz > lim->max_frame_bytes) {
            snprintf(err, errlen,
                     "tensor frame %d is %zu bytes, over the limit of %zu (max-frame-bytes)", i, sz,
                     lim->max_frame_bytes);
            st = RA_ETOOBIG;
            goto fail;
        }
    }
    if (lim && lim->max_message_bytes && total > lim->max_message_bytes) {
        snprintf(err, errlen,
                 "message carries %zu tensor bytes, over the limit of %zu (max-message-bytes)",
                 total, lim->max_message_bytes);
        st = RA_ETOOBIG;
        goto fail;
    }
    if (h->n_tensors != (size_t)nt) {
        snprintf(err, errlen,
                 "header announces %zu tensor frames but %d arrived (missing or extra frames)",
                 h->n_tensors, nt);
        goto fail;
    }
    for (int i = 0; i < nt; i++) {
        const Ratd__Tensor *t = h->tensors[i];
        size_t es = ra_proto_dtype_size(t->dtype);
        if (!es) {
            snprintf(err, errlen, "tensor %d has unknown dtype %d", i, (int)t->dtype);
            goto fail;
        }
        if (t->n_shape < 1 || t->n_shape > RA_PROTO_MAX_DIMS) {
            snprintf(err, errlen, "tensor %d (%s) has %zu dimensions; 1..%d allowed", i,
                     role_name(t->role), t->n_shape, RA_PROTO_MAX_DIMS);
            goto fail;
        }
        uint64_t prod = 1;
        for (size_t d = 0; d < t->n_shape; d++) {
            uint64_t x = t->shape[d];
            if (x != 0 && prod > (UINT64_MAX / 16) / x) {
                snprintf(err, errlen, "tensor %d (%s) shape overflows", i, role_name(t->role));
                goto fail;
            }
            prod *= x;
        }
        size_t sz = zmq_msg_size(&m->frames[first + 1 + i]);
        if (prod * es != (uint64_t)sz) {
            snprintf(err, errlen,
                     "tensor %d (%s) declares %llu bytes but its frame has %zu (truncated or "
                     "mislabelled frame)",
                     i, role_name(t->role), (unsigned long long)(prod * es), sz);
            goto fail;
        }
        v->tensor[i] = t;
        v->frame[i] = &m->frames[first + 1 + i];
        v->elems[i] = prod;
    }
    v->hdr = h;
    v->alloc = alloc;
    v->n_tensors = nt;
    return RA_OK;
fail:
    ratd__header__free_unpacked(h, alloc);
    memset(v, 0, sizeof *v);
    return st;
}

void ra_proto_view_free(ra_proto_view *v)
{
    if (v->hdr)
        ratd__header__free_unpacked(v->hdr, v->alloc);
    memset(v, 0, sizeof *v);
}

int ra_proto_find(const ra_proto_view *v, Ratd__Role role)
{
    for (int i = 0; i < v->n_tensors; i++)
        if (v->tensor[i]->role == role)
            return i;
    return -1;
}

const void *ra_proto_data(ra_proto_view *v, int i, void **tmp)
{
    *tmp = NULL;
    const void *d = zmq_msg_data(v->frame[i]);
    size_t sz = zmq_msg_size(v->frame[i]);
    if (((uintptr_t)d & 7u) == 0)
        return d;
    /* Small frames live inside zmq_msg_t and may be unaligned for float/int64 loads. */
    void *c = malloc(sz ? sz : 1);
    if (!c)
        return NULL;
    memcpy(c, d, sz);
    *tmp = c;
    return c;
}

static void free_cb(void *data, void *hint)
{
    (void)hint;
    free(data);
}

typedef struct lender {
    ra_proto_release_fn fn;
    void *hint;
} lender;

/* A part zmq did not take: free it or hand it back to its owner. */
static void part_drop(ra_proto_part *p, const lender *l)
{
    if (p->give == RA_PROTO_LEND)
        l->fn((void *)p->data, l->hint);
    else if (p->give)
        free((void *)p->data);
}

int ra_proto_send(void *sock, zmq_msg_t *route, int delim, Ratd__Header *h, ra_proto_part *parts,
                  int n_parts)
{
    for (int i = 0; i < n_parts; i++)
        if (parts[i].give == RA_PROTO_LEND) { /* nobody to hand it back to */
            errno = EINVAL;
            return -1;
        }
    return ra_proto_send_lend(sock, route, delim, h, parts, n_parts, NULL, NULL);
}

int ra_proto_send_lend(void *sock, zmq_msg_t *route, int delim, Ratd__Header *h,
                       ra_proto_part *parts, int n_parts, ra_proto_release_fn release, void *hint)
{
    return ra_proto_send_lend_flags(sock, route, delim, h, parts, n_parts, release, hint, 0);
}

int ra_proto_send_lend_flags(void *sock, zmq_msg_t *route, int delim, Ratd__Header *h,
                             ra_proto_part *parts, int n_parts, ra_proto_release_fn release,
                             void *hint, int flags)
{
    const lender l = {release, hint};
    Ratd__Tensor tens[RA_PROTO_MAX_FRAMES];
    Ratd__Tensor *tp[RA_PROTO_MAX_FRAMES];
    int next = 0; /* first part not yet handed to zmq */
    int rc = -1, e = 0;
    if (n_parts > RA_PROTO_MAX_FRAMES - 3) {
        e = EINVAL;
        goto out;
    }
    for (int i = 0; i < n_parts; i++) {
        ratd__tensor__init(&tens[i]);
        tens[i].role = parts[i].role;
        tens[i].dtype = parts[i].dtype;
        tens[i].n_shape = (size_t)parts[i].ndim;
        tens[i].shape = parts[i].shape;
        tp[i] = &tens[i];
    }
    h->n_tensors = (size_t)n_parts;
    h->tensors = n_parts ? tp : NULL;

    if (route) {
        zmq_msg_t r;
        zmq_msg_init(&r);
        zmq_msg_copy(&r, route);
        if (zmq_msg_send(&r, sock, ZMQ_SNDMORE | flags) < 0) {
            e = errno;
            zmq_msg_close(&r);
            goto out;
        }
    }
    if (delim && zmq_send(sock, "", 0, ZMQ_SNDMORE | flags) < 0) {
        e = errno;
        goto out;
    }
    size_t hs = ratd__header__get_packed_size(h);
    zmq_msg_t hm;
    if (zmq_msg_init_size(&hm, hs) < 0) {
        e = errno;
        goto out;
    }
    ratd__header__pack(h, (uint8_t *)zmq_msg_data(&hm));
    if (zmq_msg_send(&hm, sock, (n_parts ? ZMQ_SNDMORE : 0) | flags) < 0) {
        e = errno;
        zmq_msg_close(&hm);
        goto out;
    }
    for (; next < n_parts; next++) {
        ra_proto_part *p = &parts[next];
        zmq_msg_t pm;
        int ok;
        if (p->give && p->bytes > 0) {
            int lend = p->give == RA_PROTO_LEND;
            ok = zmq_msg_init_data(&pm, (void *)p->data, p->bytes, lend ? release : free_cb,
                                   lend ? hint : NULL) == 0;
            if (!ok)
                part_drop(p, &l);
        } else {
            ok = zmq_msg_init_size(&pm, p->bytes) == 0;
            if (ok && p->bytes)
                memcpy(zmq_msg_data(&pm), p->data, p->bytes);
            part_drop(p, &l);
        }
        if (!ok) {
            /* a frame we cannot build: end the message with an empty part so that the
             * peer sees a malformed (short) message rather than a hung one */
            e = errno ? errno : ENOMEM;
            zmq_send(sock, "", 0, 0);
            next++;
            goto out;
        }
        if (zmq_msg_send(&pm, sock, (next + 1 < n_parts ? ZMQ_SNDMORE : 0) | flags) < 0) {
            e = errno;
            zmq_msg_close(&pm); /* frees an owned buffer through free_cb */
            next++;
            goto out;
        }
    }
    rc = 0;
out:
    for (; next < n_parts; next++)
        part_drop(&parts[next], &l);
    h->n_tensors = 0;
    h->tensors = NULL;
    if (rc < 0)
        errno = e;
    return rc;
}
