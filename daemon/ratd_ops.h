/* Operations side of the daemon, kept apart from the serving path: request metrics
 * (atomic counters and fixed latency buckets per request type, written by the I/O
 * thread, read by the metrics thread), a Prometheus text endpoint on its own thread
 * (libmicrohttpd, --metrics), the ListSessions / GetConfig / WaitReady requests that
 * ratctl and ra_client_wait_ready use, and giving freed memory back to the kernel
 * (malloc_trim) when the daemon is idle or asked for Stats. Internal to daemon/. */
#ifndef RATD_OPS_H
#define RATD_OPS_H

#include <stddef.h>
#include <stdint.h>

#include "ratd/status.h"

typedef struct ratd_server ratd_server;
typedef struct ratd_job ratd_job;
typedef struct ratd_ops ratd_ops;

/* Latency buckets of the histograms, upper bounds in microseconds (+Inf after them). */
#define RATD_OPS_N_BUCKETS 20

/* Makes the ops state and, when cfg.metrics is set, starts the HTTP endpoint (refused
 * for a non-loopback host without allow-remote, or when the address cannot be bound). */
ra_status ratd_ops_create(ratd_server *s, char *err, size_t errlen);
/* Stops the endpoint and frees the state; parked waits must have been answered. */
void ratd_ops_destroy(ratd_server *s);

/* Counts one reply (I/O thread). */
void ratd_ops_on_reply(ratd_server *s, int type, ra_status st, uint64_t us);
/* 1 when type is one of the requests ratd_ops_handle answers. */
int ratd_ops_owns(int type);
/* Answers ListSessions and GetConfig at once, or parks a WaitReady (I/O thread). */
void ratd_ops_handle(ratd_server *s, ratd_job *j);
/* Once per loop turn (I/O thread): answers the WaitReady requests whose session is
 * ready, gone or past its deadline, publishes the metrics snapshot, and trims the heap
 * after a second of idleness. Returns the poll timeout the loop should use at most. */
int ratd_ops_tick(ratd_server *s, int timeout_ms);
/* Answers every parked WaitReady with RA_ECLOSED (shutdown). */
void ratd_ops_flush(ratd_server *s);
/* malloc_trim when something was freed since the last one (Stats requests). */
void ratd_ops_trim(ratd_server *s);

#endif
