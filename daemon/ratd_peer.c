/* The clients as the ROUTER names them (routing ids) and what the daemon holds for
 * each: the reply bytes charged on the memory account until ZeroMQ releases them (an
 * Attend's reply is charged from its acceptance; one client's unread replies are
 * bounded by --max-peer-reply-bytes), and the replies dropped because the client's
 * queue was full (the I/O thread never waits on a send; a drop is counted and logged
 * once per client per 10 s). Records are made by the I/O thread at a request, held by
 * the jobs naming them (released from ZeroMQ's threads, hence atomic), and swept by the
 * I/O thread once unreferenced and idle. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "ra_log.h"
#include "ratd_internal.h"

static size_t peer_hash(const uint8_t *id, size_t n)
{
    uint64_t h = 1469598103934665603ull;
    for (size_t i = 0; i < n; i++)
        h = (h ^ id[i]) * 1099511628211ull;
    return (size_t)(h % RATD_PEER_BUCKETS);
}

ratd_peer *ratd_peer_get(ratd_server *s, zmq_msg_t *route, double now)
{
    const uint8_t *id = zmq_msg_data(route);
    size_t n = zmq_msg_size(route);
    if (n > RATD_PEER_ID_MAX)
        n = RATD_PEER_ID_MAX;
    size_t b = peer_hash(id, n);
    for (ratd_peer *p = s->peers[b]; p; p = p->next)
        if (p->id_len == n && !memcmp(p->id, id, n)) {
            p->last_seen = now;
            return p;
        }
    ratd_peer *p = calloc(1, sizeof *p);
    if (!p)
        return NULL;
    memcpy(p->id, id, n);
    p->id_len = n;
    p->last_seen = now;
    p->last_drop_log = -1e9;
    p->next = s->peers[b];
    s->peers[b] = p;
    s->n_peers++;
    return p;
}

void ratd_peer_sweep(ratd_server *s, double now, double idle)
{
    for (int b = 0; b < RATD_PEER_BUCKETS; b++)
        for (ratd_peer **pp = &s->peers[b]; *pp;) {
            ratd_peer *p = *pp;
            if ((idle < 0 || now - p->last_seen > idle) &&
                __atomic_load_n(&p->refs, __ATOMIC_ACQUIRE) == 0) {
                *pp = p->next;
                free(p);
                s->n_peers--;
            } else {
                pp = &p->next;
            }
        }
}

void ratd_peer_reply_dropped(ratd_server *s, ratd_job *j)
{
    s->replies_dropped++;
    ratd_peer *p = j->cl;
    if (!p) {
        RA_WARN("request %llu (%s): the queue of client %s is full; reply dropped",
                (unsigned long long)j->req_id, ra_proto_type_name(j->type), j->peer);
        return;
    }
    p->dropped++;
    double now = ra_now_s();
    if (now - p->last_drop_log < 10.0)
        return;
    RA_WARN("client %s does not read its replies (its queue is full): %llu replies dropped "
            "(%llu since the last report); the daemon serves everyone else meanwhile",
            j->peer, (unsigned long long)p->dropped,
            (unsigned long long)(p->dropped - p->dropped_logged));
    p->last_drop_log = now;
    p->dropped_logged = p->dropped;
}

ra_status ratd_job_charge(ratd_server *s, ratd_job *j, size_t bytes)
{
    ratd_peer *cl = j->cl;
    size_t unread = cl ? __atomic_load_n(&cl->reply_bytes, __ATOMIC_RELAXED) : 0;
    if (unread && unread + bytes > s->cfg.max_peer_reply_bytes) {
        ratd_job_set_err(j, RA_EBUSY,
                         "%zu MiB of replies to this client are not yet read; with this one "
                         "(%zu MiB) they would pass --max-peer-reply-bytes (%llu MiB): read "
                         "the replies first",
                         unread >> 20, bytes >> 20,
                         (unsigned long long)(s->cfg.max_peer_reply_bytes >> 20));
        return RA_EBUSY;
    }
    if (ra_mem_reserve(&s->mem, bytes) != RA_OK) {
        ratd_job_set_err(j, RA_ENOMEM,
                         "the reply (%zu MiB) does not fit the daemon's memory limit (%zu MiB, "
                         "%zu MiB in use, of which %zu MiB are replies not yet read by their "
                         "clients)",
                         bytes >> 20, s->mem.limit >> 20,
                         __atomic_load_n(&s->mem.used, __ATOMIC_RELAXED) >> 20,
                         __atomic_load_n(&s->reply_bytes, __ATOMIC_RELAXED) >> 20);
        return RA_ENOMEM;
    }
    j->charged = bytes;
    __atomic_add_fetch(&s->reply_bytes, bytes, __ATOMIC_RELAXED);
    if (cl)
        __atomic_add_fetch(&cl->reply_bytes, bytes, __ATOMIC_RELAXED);
    return RA_OK;
}

void ratd_job_uncharge(ratd_server *s, ratd_job *j)
{
    ratd_peer *cl = j->cl;
    if (j->charged) { /* the reply's bytes leave the accounts with its frames */
        ra_mem_release(&s->mem, j->charged);
        __atomic_sub_fetch(&s->reply_bytes, j->charged, __ATOMIC_RELAXED);
        if (cl)
            __atomic_sub_fetch(&cl->reply_bytes, j->charged, __ATOMIC_RELAXED);
        j->charged = 0;
    }
    j->cl = NULL;
    if (cl)
        __atomic_sub_fetch(&cl->refs, 1, __ATOMIC_RELEASE);
}
