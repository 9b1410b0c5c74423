/* Unit tests of the wire framing (proto/ra_proto.c) over an inproc PAIR: round trips of
 * header + tensor frames, and every way ra_proto_parse must refuse a message (garbage
 * header, missing/extra frames, truncated frames, frames over the limit, too many
 * frames, oversized header, unknown dtype, overflowing shapes) while still reporting
 * the request id when the header itself was readable; lent frames handed back once,
 * headers parsed through a caller's allocator. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <cmocka.h>

#include "ra_proto.h"

typedef struct pair {
    void *ctx, *a, *b;
} pair;

static int setup(void **state)
{
    static int seq = 0;
    pair *p = calloc(1, sizeof *p);
    char ep[64];
    snprintf(ep, sizeof ep, "inproc://proto-%d", seq++);
    p->ctx = zmq_ctx_new();
    p->a = zmq_socket(p->ctx, ZMQ_PAIR);
    p->b = zmq_socket(p->ctx, ZMQ_PAIR);
    assert_int_equal(zmq_bind(p->a, ep), 0);
    assert_int_equal(zmq_connect(p->b, ep), 0);
    *state = p;
    return 0;
}

static int teardown(void **state)
{
    pair *p = *state;
    zmq_close(p->a);
    zmq_close(p->b);
    zmq_ctx_term(p->ctx);
    free(p);
    return 0;
}

/* Sends raw frames (sizes given, NULL data = zero bytes). */
static void send_raw(void *s, int n, const void **data, const size_t *size)
{
    for (int i = 0; i < n; i++) {
        zmq_msg_t m;
        zmq_msg_init_size(&m, size[i]);
        if (data[i])
            memcpy(zmq_msg_data(&m), data[i], size[i]);
        else
            memset(zmq_msg_data(&m), 0, size[i]);
        assert_true(zmq_msg_send(&m, s, i + 1 < n ? ZMQ_SNDMORE : 0) >= 0);
    }
}

/* A packed header with request id 42 announcing tensors of the given byte counts as f32
 * vectors. Caller frees. */
static uint8_t *header_with(int n, const uint64_t *elems, size_t *len)
{
    Ratd__Header h = RATD__HEADER__INIT;
    Ratd__Tensor t[8];
    Ratd__Tensor *tp[8];
    uint64_t shapes[8];
    h.version = RA_PROTO_VERSION;
    h.request_id = 42;
    h.type = RATD__MSG_TYPE__APPEND;
    for (int i = 0; i < n; i++) {
        ratd__tensor__init(&t[i]);
        t[i].role = RATD__ROLE__K;
        t[i].dtype = RATD__DTYPE__F32;
        shapes[i] = elems[i];
        t[i].n_shape = 1;
        t[i].shape = &shapes[i];
        tp[i] = &t[i];
    }
    h.n_tensors = (size_t)n;
    h.tensors = tp;
    *len = ratd__header__get_packed_size(&h);
    uint8_t *b = malloc(*len);
    ratd__header__pack(&h, b);
    return b;
}

static ra_status parse_from(pair *p, const ra_proto_limits *lim, uint64_t *id, char *err)
{
    ra_proto_msg m;
    assert_int_equal(ra_proto_recv(p->b, &m, 0), 0);
    ra_proto_view v;
    ra_status st = ra_proto_parse(&m, 0, lim, &v, id, NULL, err, RA_PROTO_ERRLEN);
    if (st == RA_OK)
        ra_proto_view_free(&v);
    ra_proto_msg_close(&m);
    return st;
}

static void test_round_trip(void **state)
{
    pair *p = *state;
    float k[2 * 3 * 4];
    int64_t pos[3] = {7, 8, 1000000000000ll};
    for (int i = 0; i < 24; i++)
        k[i] = (float)i * 0.5f - 3.0f;
    float *owned = malloc(6 * sizeof(float)); /* handed to zmq: no copy, freed by it */
    for (int i = 0; i < 6; i++)
        owned[i] = (float)(100 + i);
    Ratd__Header h = RATD__HEADER__INIT;
    Ratd__AttendParams ap = RATD__ATTEND_PARAMS__INIT;
    h.version = RA_PROTO_VERSION;
    h.request_id = 0xdeadbeefcafeull;
    h.type = RATD__MSG_TYPE__ATTEND;
    h.session = 5;
    h.layer = 31;
    ap.top_k = 100;
    ap.want_topk = 1;
    h.attend = &ap;
    ra_proto_part parts[3] = {
        {RATD__ROLE__K, RATD__DTYPE__F32, 3, {2, 3, 4}, k, sizeof k, 0},
        {RATD__ROLE__POS, RATD__DTYPE__I64, 1, {3}, pos, sizeof pos, 0},
        {RATD__ROLE__O, RATD__DTYPE__F32, 2, {2, 3}, owned, 6 * sizeof(float), 1},
    };
    assert_int_equal(ra_proto_send(p->a, NULL, 0, &h, parts, 3), 0);
    assert_int_equal(h.n_tensors, 0); /* the caller's header is left as it was */
    ra_proto_msg m;
    assert_int_equal(ra_proto_recv(p->b, &m, 0), 0);
    assert_int_equal(m.n, 4);
    ra_proto_view v;
    char err[RA_PROTO_ERRLEN];
    uint64_t id = 0;
    int type = 0;
    assert_int_equal(ra_proto_parse(&m, 0, NULL, &v, &id, &type, err, sizeof err), RA_OK);
    assert_int_equal(id, 0xdeadbeefcafeull);
    assert_int_equal(type, RATD__MSG_TYPE__ATTEND);
    assert_int_equal(v.hdr->session, 5);
    assert_int_equal(v.hdr->layer, 31);
    assert_non_null(v.hdr->attend);
    assert_int_equal(v.hdr->attend->top_k, 100);
    assert_true(v.hdr->attend->want_topk);
    assert_int_equal(v.n_tensors, 3);
    int ik = ra_proto_find(&v, RATD__ROLE__K), ip = ra_proto_find(&v, RATD__ROLE__POS);
    int io = ra_proto_find(&v, RATD__ROLE__O);
    assert_int_equal(ik, 0);
    assert_int_equal(ip, 1);
    assert_int_equal(io, 2);
    assert_int_equal(ra_proto_find(&v, RATD__ROLE__LSE), -1);
    assert_int_equal(v.elems[0], 24);
    assert_int_equal(v.tensor[0]->shape[2], 4);
    void *tmp;
    const float *kk = ra_proto_data(&v, ik, &tmp);
    assert_memory_equal(kk, k, sizeof k);
    free(tmp);
    const int64_t *pp = ra_proto_data(&v, ip, &tmp);
    assert_int_equal(pp[2], 1000000000000ll);
    assert_true(((uintptr_t)pp & 7u) == 0);
    free(tmp);
    const float *oo = ra_proto_data(&v, io, &tmp);
    assert_true(oo[5] == 105.0f);
    free(tmp);
    ra_proto_view_free(&v);
    ra_proto_msg_close(&m);
}

static void test_reply_fields(void **state)
{
    pair *p = *state;
    Ratd__Header h = RATD__HEADER__INIT;
    Ratd__HelloReply hr = RATD__HELLO_REPLY__INIT;
    Ratd__Limits lm = RATD__LIMITS__INIT;
    h.version = RA_PROTO_VERSION;
    h.request_id = 9;
    h.type = RATD__MSG_TYPE__HELLO;
    h.status = RA_EVERSION;
    h.message = "versions 1 and 2";
    lm.max_top_k = 1234;
    hr.limits = &lm;
    hr.server_version = "x.y";
    h.hello = &hr;
    assert_int_equal(ra_proto_send(p->a, NULL, 0, &h, NULL, 0), 0);
    ra_proto_msg m;
    assert_int_equal(ra_proto_recv(p->b, &m, 0), 0);
    ra_proto_view v;
    char err[RA_PROTO_ERRLEN];
    assert_int_equal(ra_proto_parse(&m, 0, NULL, &v, NULL, NULL, err, sizeof err), RA_OK);
    assert_int_equal(v.hdr->status, RA_EVERSION);
    assert_string_equal(v.hdr->message, "versions 1 and 2");
    assert_int_equal(v.hdr->hello->limits->max_top_k, 1234);
    assert_string_equal(v.hdr->hello->server_version, "x.y");
    ra_proto_view_free(&v);
    ra_proto_msg_close(&m);
}

static void test_garbage_header(void **state)
{
    pair *p = *state;
    const uint8_t junk[] = {0xff, 0xff, 0xff, 0xff, 0x0f, 0x01, 0x02, 0x03, 0x99, 0x88};
    const void *d[1] = {junk};
    size_t sz[1] = {sizeof junk};
    send_raw(p->a, 1, d, sz);
    char err[RA_PROTO_ERRLEN];
    uint64_t id = 77;
    assert_int_equal(parse_from(p, NULL, &id, err), RA_EPROTO);
    assert_int_equal(id, 77); /* not written: the header was unreadable */
    assert_non_null(strstr(err, "not a ratd protocol header"));
}

static void test_empty_and_missing_header(void **state)
{
    pair *p = *state;
    const void *d[1] = {NULL};
    size_t sz[1] = {0};
    send_raw(p->a, 1, d, sz);
    char err[RA_PROTO_ERRLEN];
    assert_int_equal(parse_from(p, NULL, NULL, err), RA_EPROTO);
    assert_non_null(strstr(err, "empty"));
    /* first = 1 with a one-frame message: no header at all */
    send_raw(p->a, 1, d, sz);
    ra_proto_msg m;
    assert_int_equal(ra_proto_recv(p->b, &m, 0), 0);
    ra_proto_view v;
    assert_int_equal(ra_proto_parse(&m, 1, NULL, &v, NULL, NULL, err, sizeof err), RA_EPROTO);
    assert_non_null(strstr(err, "no header"));
    ra_proto_msg_close(&m);
}

static void test_missing_frame(void **state)
{
    pair *p = *state;
    uint64_t el[3] = {4, 4, 4};
    size_t hl;
    uint8_t *hb = header_with(3, el, &hl);
    const void *d[3] = {hb, NULL, NULL};
    size_t sz[3] = {hl, 16, 16};
    send_raw(p->a, 3, d, sz); /* announces 3 tensors, carries 2 */
    char err[RA_PROTO_ERRLEN];
    uint64_t id = 0;
    assert_int_equal(parse_from(p, NULL, &id, err), RA_EPROTO);
    assert_int_equal(id, 42);
    assert_non_null(strstr(err, "announces 3"));
    free(hb);
}

static void test_truncated_frame(void **state)
{
    pair *p = *state;
    uint64_t el[2] = {4, 8};
    size_t hl;
    uint8_t *hb = header_with(2, el, &hl);
    const void *d[3] = {hb, NULL, NULL};
    size_t sz[3] = {hl, 16, 31}; /* second frame one byte short */
    send_raw(p->a, 3, d, sz);
    char err[RA_PROTO_ERRLEN];
    assert_int_equal(parse_from(p, NULL, NULL, err), RA_EPROTO);
    assert_non_null(strstr(err, "tensor 1"));
    assert_non_null(strstr(err, "truncated"));
    free(hb);
}

static void test_frame_over_limit(void **state)
{
    pair *p = *state;
    uint64_t el[1] = {1024};
    size_t hl;
    uint8_t *hb = header_with(1, el, &hl);
    const void *d[2] = {hb, NULL};
    size_t sz[2] = {hl, 4096};
    ra_proto_limits lim = {.max_frame_bytes = 4095, .max_message_bytes = 1 << 20};
    send_raw(p->a, 2, d, sz);
    char err[RA_PROTO_ERRLEN];
    uint64_t id = 0;
    assert_int_equal(parse_from(p, &lim, &id, err), RA_ETOOBIG);
    assert_int_equal(id, 42); /* the reply can still name the request */
    assert_non_null(strstr(err, "max-frame-bytes"));
    /* exactly at the limit passes */
    lim.max_frame_bytes = 4096;
    send_raw(p->a, 2, d, sz);
    assert_int_equal(parse_from(p, &lim, &id, err), RA_OK);
    /* message limit */
    lim.max_message_bytes = 4000;
    send_raw(p->a, 2, d, sz);
    assert_int_equal(parse_from(p, &lim, &id, err), RA_ETOOBIG);
    assert_non_null(strstr(err, "max-message-bytes"));
    free(hb);
}

static void test_header_too_big(void **state)
{
    pair *p = *state;
    size_t n = RA_PROTO_MAX_HEADER_BYTES + 1;
    uint8_t *big = calloc(1, n);
    const void *d[1] = {big};
    size_t sz[1] = {n};
    send_raw(p->a, 1, d, sz);
    char err[RA_PROTO_ERRLEN];
    assert_int_equal(parse_from(p, NULL, NULL, err), RA_ETOOBIG);
    free(big);
}

static void test_too_many_frames(void **state)
{
    pair *p = *state;
    enum { N = RA_PROTO_MAX_FRAMES + 5 };
    const void *d[N];
    size_t sz[N];
    for (int i = 0; i < N; i++) {
        d[i] = NULL;
        sz[i] = 8;
    }
    send_raw(p->a, N, d, sz);
    ra_proto_msg m;
    assert_int_equal(ra_proto_recv(p->b, &m, 0), 0);
    assert_int_equal(m.n, RA_PROTO_MAX_FRAMES);
    assert_int_equal(m.dropped, 5);
    assert_int_equal(m.total_bytes, 8 * N);
    ra_proto_view v;
    char err[RA_PROTO_ERRLEN];
    assert_int_equal(ra_proto_parse(&m, 0, NULL, &v, NULL, NULL, err, sizeof err), RA_EPROTO);
    ra_proto_msg_close(&m);
    /* the socket is still in step: the next message is whole */
    uint64_t el[1] = {2};
    size_t hl;
    uint8_t *hb = header_with(1, el, &hl);
    const void *d2[2] = {hb, NULL};
    size_t sz2[2] = {hl, 8};
    send_raw(p->a, 2, d2, sz2);
    assert_int_equal(parse_from(p, NULL, NULL, err), RA_OK);
    free(hb);
}

static void test_bad_dtype_and_shape(void **state)
{
    pair *p = *state;
    Ratd__Header h = RATD__HEADER__INIT;
    Ratd__Tensor t = RATD__TENSOR__INIT;
    Ratd__Tensor *tp[1] = {&t};
    uint64_t shape[2] = {1ull << 40, 1ull << 40}; /* product overflows 64 bits with size */
    h.version = 1;
    h.n_tensors = 1;
    h.tensors = tp;
    t.dtype = RATD__DTYPE__F32;
    t.n_shape = 2;
    t.shape = shape;
    uint8_t buf[256];
    size_t hl = ratd__header__pack(&h, buf);
    const void *d[2] = {buf, NULL};
    size_t sz[2] = {hl, 8};
    send_raw(p->a, 2, d, sz);
    char err[RA_PROTO_ERRLEN];
    assert_int_equal(parse_from(p, NULL, NULL, err), RA_EPROTO);
    assert_non_null(strstr(err, "overflow"));
    shape[0] = 2;
    shape[1] = 1;
    t.dtype = (Ratd__DType)77;
    hl = ratd__header__pack(&h, buf);
    send_raw(p->a, 2, d, sz);
    assert_int_equal(parse_from(p, NULL, NULL, err), RA_EPROTO);
    assert_non_null(strstr(err, "dtype"));
    t.dtype = RATD__DTYPE__F32;
    t.n_shape = 0; /* no dimensions */
    hl = ratd__header__pack(&h, buf);
    send_raw(p->a, 2, d, sz);
    assert_int_equal(parse_from(p, NULL, NULL, err), RA_EPROTO);
}

static void test_dtype_sizes(void **state)
{
    (void)state;
    assert_int_equal(ra_proto_dtype_size(RATD__DTYPE__F32), 4);
    assert_int_equal(ra_proto_dtype_size(RATD__DTYPE__F16), 2);
    assert_int_equal(ra_proto_dtype_size(RATD__DTYPE__BF16), 2);
    assert_int_equal(ra_proto_dtype_size(RATD__DTYPE__I64), 8);
    assert_int_equal(ra_proto_dtype_size(RATD__DTYPE__I32), 4);
    assert_int_equal(ra_proto_dtype_size(99), 0);
    /* the wire dtypes of K/V are the public ra_dtype values */
    assert_int_equal(RATD__DTYPE__F16, RA_DTYPE_F16);
    assert_int_equal(RATD__DTYPE__BF16, RA_DTYPE_BF16);
    assert_string_equal(ra_proto_type_name(RATD__MSG_TYPE__ATTEND), "attend");
    assert_string_equal(ra_proto_type_name(1000), "unknown");
}

/* Lent parts (RA_PROTO_LEND) go out without a copy and come back through the release
 * function once each, also when the send fails; a header parsed through a caller's
 * allocator is freed through it. */
typedef struct lend_count {
    int calls;
    const void *last;
} lend_count;

static void lend_release(void *data, void *hint)
{
    lend_count *c = hint;
    __atomic_fetch_add(&c->calls, 1, __ATOMIC_RELAXED);
    c->last = data;
}

typedef struct bump {
    char buf[8192];
    size_t used;
    int allocs, frees;
} bump;

static void *bump_alloc(void *d, size_t n)
{
    bump *b = d;
    n = (n + 15) & ~(size_t)15;
    if (b->used + n > sizeof b->buf)
        return NULL;
    b->allocs++;
    void *p = b->buf + b->used;
    b->used += n;
    return p;
}

static void bump_free(void *d, void *p)
{
    bump *b = d;
    assert_true((char *)p >= b->buf && (char *)p < b->buf + sizeof b->buf);
    b->frees++;
}

static void test_lend_and_allocator(void **state)
{
    pair *p = *state;
    static float o[64], lse[8];
    for (int i = 0; i < 64; i++)
        o[i] = (float)i;
    lend_count lc = {0, NULL};
    Ratd__Header h = RATD__HEADER__INIT;
    Ratd__AttendParams ap = RATD__ATTEND_PARAMS__INIT;
    uint64_t sessions[3] = {4, 9, 2};
    h.version = RA_PROTO_VERSION;
    h.type = RATD__MSG_TYPE__ATTEND;
    h.server_us = 1234;
    h.work_us = 567;
    h.task_max_us = 89;
    ap.n_sessions = 3;
    ap.sessions = sessions;
    h.attend = &ap;
    ra_proto_part parts[2] = {
        {RATD__ROLE__O, RATD__DTYPE__F32, 3, {2, 4, 8}, o, sizeof o, RA_PROTO_LEND},
        {RATD__ROLE__LSE, RATD__DTYPE__F32, 2, {2, 4}, lse, sizeof lse, RA_PROTO_LEND},
    };
    /* a lent part without a lender is refused before anything is sent */
    assert_int_equal(ra_proto_send(p->a, NULL, 0, &h, parts, 2), -1);
    assert_int_equal(ra_proto_send_lend(p->a, NULL, 0, &h, parts, 2, lend_release, &lc), 0);
    ra_proto_msg m;
    assert_int_equal(ra_proto_recv(p->b, &m, 0), 0);
    bump b = {.used = 0};
    ProtobufCAllocator pa = {bump_alloc, bump_free, &b};
    ra_proto_view v;
    char err[RA_PROTO_ERRLEN];
    assert_int_equal(ra_proto_parse_with(&m, 0, NULL, &pa, &v, NULL, NULL, err, sizeof err), RA_OK);
    assert_true(b.allocs > 0);
    assert_int_equal(v.hdr->server_us, 1234);
    assert_int_equal(v.hdr->work_us, 567);
    assert_int_equal(v.hdr->task_max_us, 89);
    assert_int_equal(v.hdr->attend->n_sessions, 3);
    assert_int_equal(v.hdr->attend->sessions[1], 9);
    assert_int_equal(v.tensor[0]->n_shape, 3);
    assert_memory_equal(zmq_msg_data(v.frame[0]), o, sizeof o);
    ra_proto_view_free(&v);
    assert_int_equal(b.frees, b.allocs);
    ra_proto_msg_close(&m);
    for (int i = 0; i < 200 && __atomic_load_n(&lc.calls, __ATOMIC_RELAXED) < 2; i++)
        usleep(1000); /* zmq releases sent frames from its own thread */
    assert_int_equal(__atomic_load_n(&lc.calls, __ATOMIC_RELAXED), 2);
    /* a failed send hands every lent part back at once */
    lend_count lf = {0, NULL};
    void *closed = zmq_socket(p->ctx, ZMQ_ROUTER); /* no peer: the route is unknown */
    int one = 1;
    zmq_setsockopt(closed, ZMQ_ROUTER_MANDATORY, &one, sizeof one);
    zmq_msg_t route;
    zmq_msg_init_size(&route, 3);
    memcpy(zmq_msg_data(&route), "abc", 3);
    assert_int_equal(ra_proto_send_lend(closed, &route, 0, &h, parts, 2, lend_release, &lf), -1);
    assert_int_equal(lf.calls, 2);
    zmq_msg_close(&route);
    zmq_close(closed);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(test_round_trip, setup, teardown),
        cmocka_unit_test_setup_teardown(test_reply_fields, setup, teardown),
        cmocka_unit_test_setup_teardown(test_garbage_header, setup, teardown),
        cmocka_unit_test_setup_teardown(test_empty_and_missing_header, setup, teardown),
        cmocka_unit_test_setup_teardown(test_missing_frame, setup, teardown),
        cmocka_unit_test_setup_teardown(test_truncated_frame, setup, teardown),
        cmocka_unit_test_setup_teardown(test_frame_over_limit, setup, teardown),
        cmocka_unit_test_setup_teardown(test_header_too_big, setup, teardown),
        cmocka_unit_test_setup_teardown(test_too_many_frames, setup, teardown),
        cmocka_unit_test_setup_teardown(test_bad_dtype_and_shape, setup, teardown),
        cmocka_unit_test(test_dtype_sizes),
        cmocka_unit_test_setup_teardown(test_lend_and_allocator, setup, teardown),
    };
    return cmocka_run_group_tests_name("proto", tests, NULL, NULL);
}
