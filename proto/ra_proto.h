/* Multipart framing of the ratd wire protocol, shared by the daemon and the client:
 * receive one multipart ZeroMQ message without trusting it (frame count, frame and
 * message sizes bounded; excess frames drained), validate the header frame and the
 * tensor frames it announces before anything else is unpacked or allocated, and send
 * a header + raw tensor frames (tensors never pass through protobuf). Generated code
 * (ratd.pb-c.h) lives in the build tree. */
#ifndef RA_PROTO_H
#define RA_PROTO_H

#include <stddef.h>
#include <stdint.h>
#include <zmq.h>

#include "ratd.pb-c.h"
#include "ratd/status.h"

#define RA_PROTO_VERSION 1u
/* Frames kept per message: routing id, optional empty delimiter, header, tensors. */
#define RA_PROTO_MAX_FRAMES 16
/* A header is small; anything larger is refused before protobuf sees it. */
#define RA_PROTO_MAX_HEADER_BYTES (64u * 1024u)
#define RA_PROTO_MAX_DIMS 4
/* The longest wait one WaitReady request may ask for (WaitParams.timeout_ms). */
#define RA_PROTO_MAX_WAIT_MS 600000u
#define RA_PROTO_ERRLEN 256

typedef struct ra_proto_limits {
    size_t max_frame_bytes;   /* one tensor frame */
    size_t max_message_bytes; /* sum of all frames */
    size_t max_header_bytes;  /* the header frame; 0: RA_PROTO_MAX_HEADER_BYTES */
} ra_proto_limits;

/* What a client accepts in a reply's header: a ListSessions of every session of a
 * daemon (~60 bytes each, --max-sessions up to 65536) is larger than a request may be. */
#define RA_PROTO_MAX_REPLY_HEADER_BYTES (16u * 1024u * 1024u)

/* One received multipart message. frames[0..n) are initialised zmq messages. */
typedef struct ra_proto_msg {
    zmq_msg_t frames[RA_PROTO_MAX_FRAMES];
    int n;
    int dropped;        /* frames beyond RA_PROTO_MAX_FRAMES, received and discarded */
    size_t total_bytes; /* every frame, dropped ones included */
} ra_proto_msg;

/* Receives all parts of one message (flags: 0 or ZMQ_DONTWAIT for the first part).
 * Returns 0, or -1 with errno from zmq (EAGAIN, EINTR, ETERM); on -1 nothing is held. */
int ra_proto_recv(void *sock, ra_proto_msg *m, int flags);
void ra_proto_msg_close(ra_proto_msg *m);

/* A message after validation: the unpacked header and its tensor frames. */
typedef struct ra_proto_view {
    Ratd__Header *hdr;         /* owned: ra_proto_view_free */
    ProtobufCAllocator *alloc; /* what hdr was unpacked with (NULL: malloc) */
    int n_tensors;
    const Ratd__Tensor *tensor[RA_PROTO_MAX_FRAMES];
    zmq_msg_t *frame[RA_PROTO_MAX_FRAMES];
    uint64_t elems[RA_PROTO_MAX_FRAMES]; /* product of the shape */
} ra_proto_view;

/* Validates frames [first, m->n) of m as header + tensors, in this order: the header
 * frame exists and is at most RA_PROTO_MAX_HEADER_BYTES; every tensor frame and the
 * message are within `lim` (RA_ETOOBIG); then the header is unpacked (RA_EPROTO if it
 * is not one); then the tensor list must match the frames one to one, with known
 * dtypes, at most RA_PROTO_MAX_DIMS dimensions and byte sizes equal to the shapes
 * (RA_EPROTO: truncated or missing frames). On failure err gets a message and, when
 * the header could be unpacked, *req_id / *type (may be NULL) get its ids so that the
 * reply can still name the request. */
ra_status ra_proto_parse(ra_proto_msg *m, int first, const ra_proto_limits *lim, ra_proto_view *v,
                         uint64_t *req_id, int *type, char *err, size_t errlen);
/* ra_proto_parse with the header unpacked through `alloc` (NULL: malloc), e.g. an arena
 * that the caller resets after ra_proto_view_free, so that parsing allocates nothing. */
ra_status ra_proto_parse_with(ra_proto_msg *m, int first, const ra_proto_limits *lim,
                              ProtobufCAllocator *alloc, ra_proto_view *v, uint64_t *req_id,
                              int *type, char *err, size_t errlen);
void ra_proto_view_free(ra_proto_view *v);

/* Finds the first tensor with `role`; -1 if none. */
int ra_proto_find(const ra_proto_view *v, Ratd__Role role);
/* Frame data of tensor i, 8-byte aligned: either the frame itself or a copy made into
 * *tmp (free() it; NULL when no copy was needed). NULL only on allocation failure. */
const void *ra_proto_data(ra_proto_view *v, int i, void **tmp);

/* Bytes per element of a wire dtype, 0 if unknown. */
size_t ra_proto_dtype_size(int dt);
const char *ra_proto_type_name(int type);

/* A tensor to send: `data` of `bytes`, described by role/dtype/shape. With `give`=1
 * zmq takes ownership of a malloc()ed `data` and free()s it when sent (no copy);
 * with `give`=RA_PROTO_LEND it is sent without a copy and handed back through the
 * release function of ra_proto_send_lend; with `give`=0 the bytes are copied into the
 * frame before ra_proto_send returns. */
#define RA_PROTO_LEND 2
typedef struct ra_proto_part {
    Ratd__Role role;
    Ratd__DType dtype;
    int ndim;
    uint64_t shape[RA_PROTO_MAX_DIMS];
    const void *data;
    size_t bytes;
    int give;
} ra_proto_part;
/* release(data, hint) is called once per lent part when zmq is done with it: from a
 * zmq thread after the send, or from ra_proto_send_lend itself on failure. */
typedef void (*ra_proto_release_fn)(void *data, void *hint);

/* Sends [route] [empty delimiter if delim] header parts... as one message. The
 * header's tensors field is filled from parts (whatever it held is replaced).
 * route may be NULL (client side). Owned parts are freed even on failure.
 * Returns 0, or -1 with errno from zmq. */
int ra_proto_send(void *sock, zmq_msg_t *route, int delim, Ratd__Header *h, ra_proto_part *parts,
                  int n_parts);
/* ra_proto_send whose RA_PROTO_LEND parts go back through release(data, hint). */
int ra_proto_send_lend(void *sock, zmq_msg_t *route, int delim, Ratd__Header *h,
                       ra_proto_part *parts, int n_parts, ra_proto_release_fn release, void *hint);
/* ra_proto_send_lend with zmq send flags on every frame (ZMQ_DONTWAIT: -1 with EAGAIN
 * instead of waiting when the peer's queue is full; a ROUTER with ZMQ_ROUTER_MANDATORY
 * refuses at the first frame, so nothing of the message is queued then). */
int ra_proto_send_lend_flags(void *sock, zmq_msg_t *route, int delim, Ratd__Header *h,
                             ra_proto_part *parts, int n_parts, ra_proto_release_fn release,
                             void *hint, int flags);

#endif
