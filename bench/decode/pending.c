/* One layer's Attend for the sessions of a step (one batched request for several), the
 * daemon's per-request times of the replies, a session's bytes from its stats. */
#include <string.h>

#include "decode.h"

const char *dec_batch_mode(void)
{
    return "batched";
}

static void add_server(const ra_attend_out *o, int *have, double *server_us, double *work_us,
                       double *task_max_us)
{
    *have = 1;
    if (server_us)
        *server_us += o->server_us;
    if (work_us)
        *work_us += o->work_us;
    if (task_max_us)
        *task_max_us += o->task_max_us;
}

ra_status dec_attend_layer(ra_client *c, const uint64_t *sessions, int n, int layer,
                           const ra_attend_req *r, const ra_attend_out *out, int *have_server,
                           double *server_us, double *work_us, double *task_max_us)
{
    int have = 0;
    if (n > 1) {
        ra_attend_batch_req b = {.n_sessions = n,
                                 .sessions = sessions,
                                 .n_q_heads = r->n_q_heads,
                                 .head_dim = r->head_dim,
                                 .q = r->q,
                                 .top_k = r->top_k,
                                 .effort = r->effort,
                                 .scale = r->scale,
                                 .want_topk = r->want_topk,
                                 .top_k_per_head = r->top_k_per_head};
        ra_attend_out o = *out;
        ra_status s = ra_client_attend_batch(c, layer, &b, &o);
        if (s == RA_OK)
            add_server(&o, &have, server_us, work_us, task_max_us);
        if (have_server)
            *have_server = have;
        return s;
    }
    size_t H = (size_t)r->n_q_heads, D = (size_t)r->head_dim, K = (size_t)r->top_k;
    for (int i = 0; i < n; i++) {
        ra_attend_req one = *r;
        one.q = r->q + (size_t)i * H * D;
        ra_attend_out o = *out;
        o.o = out->o + (size_t)i * H * D;
        o.lse = out->lse + (size_t)i * H;
        if (r->want_topk) {
            o.pos = out->pos + (size_t)i * H * K;
            o.scores = out->scores + (size_t)i * H * K;
            o.counts = out->counts + (size_t)i * H;
        }
        ra_status s = ra_client_attend(c, sessions[i], layer, &one, &o);
        if (s != RA_OK)
            return s;
        add_server(&o, &have, server_us, work_us, task_max_us);
    }
    if (have_server)
        *have_server = have;
    return RA_OK;
}

int dec_session_bytes(const ra_session_stats *st, uint64_t *bytes)
{
    *bytes = st->bytes;
    return 1;
}
