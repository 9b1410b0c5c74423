/* The three things ratd-bench-decode wants from the client API that a colleague's branch
 * adds (batched Attend, the daemon's per-request times in ra_attend_out, a session's
 * bytes in ra_session_stats), kept here so the rest of the bench has no #if: CMake
 * probes include/ratd/client.h (RA_BENCH_HAVE_*), and without the batched call a batch
 * of B sessions is B synchronous Attends, reported as batch_mode "sequential".
 * TODO(merge): once the API has landed on main, drop the probes and the fallbacks. */
#include <string.h>

#include "decode.h"

const char *dec_batch_mode(void)
{
#ifdef RA_BENCH_HAVE_ATTEND_BATCH
    return "batched";
#else
    return "sequential";
#endif
}

static void add_server(const ra_attend_out *o, int *have, double *server_us, double *work_us)
{
#ifdef RA_BENCH_HAVE_SERVER_US
    *have = 1;
    if (server_us)
        *server_us += o->server_us;
    if (work_us)
        *work_us += o->work_us;
#else
    (void)o, (void)server_us, (void)work_us;
    *have = 0;
#endif
}

ra_status dec_attend_layer(ra_client *c, const uint64_t *sessions, int n, int layer,
                           const ra_attend_req *r, const ra_attend_out *out, int *have_server,
                           double *server_us, double *work_us)
{
    int have = 0;
#ifdef RA_BENCH_HAVE_ATTEND_BATCH
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
            add_server(&o, &have, server_us, work_us);
        if (have_server)
            *have_server = have;
        return s;
    }
#endif
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
        add_server(&o, &have, server_us, work_us);
    }
    if (have_server)
        *have_server = have;
    return RA_OK;
}

int dec_session_bytes(const ra_session_stats *st, uint64_t *bytes)
{
#ifdef RA_BENCH_HAVE_SESSION_BYTES
    *bytes = st->bytes;
    return 1;
#else
    (void)st, (void)bytes;
    return 0;
#endif
}
