/* Fuzz target: the wire parser, ra_proto_parse, on a multipart message built from the
 * input. Input layout: byte 0 is the frame count (0..20: above 16 the excess frames are
 * "dropped" as ra_proto_recv would), then per frame but the last a 2-byte little-endian
 * length (cut to what is left), the last frame takes the rest. On success every tensor
 * the view announces is read in full through ra_proto_data, so a frame shorter than its
 * declared shape shows up as a read past the buffer. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <zmq.h>

#include "fuzz_util.h"
#include "ra_proto.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size < 1)
        return 0;
    int want = data[0] % 21;
    size_t off = 1;
    ra_proto_msg m;
    memset(&m, 0, sizeof m);
    for (int f = 0; f < want; f++) {
        size_t len = size - off;
        if (f + 1 < want) {
            if (size - off < 2)
                len = 0;
            else {
                len = (size_t)data[off] | (size_t)data[off + 1] << 8;
                off += 2;
                if (len > size - off)
                    len = size - off;
            }
        }
        m.total_bytes += len;
        if (m.n < RA_PROTO_MAX_FRAMES) {
            zmq_msg_init_size(&m.frames[m.n], len);
            if (len)
                memcpy(zmq_msg_data(&m.frames[m.n]), data + off, len);
            m.n++;
        } else {
            m.dropped++;
        }
        off += len;
    }
    /* small limits, so that the size checks are reached too */
    ra_proto_limits lim = {.max_frame_bytes = 8192, .max_message_bytes = 32768};
    ra_proto_view v;
    uint64_t rid = 0;
    int type = 0;
    char err[RA_PROTO_ERRLEN];
    ra_status st = ra_proto_parse(&m, 0, &lim, &v, &rid, &type, err, sizeof err);
    if (st == RA_OK) {
        (void)ra_proto_type_name((int)v.hdr->type);
        for (int r = 0; r <= RATD__ROLE__TRAIN_TOPK; r++)
            (void)ra_proto_find(&v, (Ratd__Role)r);
        for (int i = 0; i < v.n_tensors; i++) {
            void *tmp = NULL;
            const void *p = ra_proto_data(&v, i, &tmp);
            size_t es = ra_proto_dtype_size(v.tensor[i]->dtype);
            if (p)
                fuzz_touch(p, (size_t)v.elems[i] * es);
            free(tmp);
        }
        if (v.hdr->create)
            fuzz_touch(v.hdr->create, sizeof *v.hdr->create);
        if (v.hdr->attend)
            fuzz_touch(v.hdr->attend->top_k_per_head,
                       v.hdr->attend->n_top_k_per_head * sizeof(uint32_t));
        ra_proto_view_free(&v);
    } else {
        err[sizeof err - 1] = 0;
        fuzz_touch(err, strlen(err));
    }
    ra_proto_msg_close(&m);
    return 0;
}
