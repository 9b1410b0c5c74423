/* The ratd server: one ROUTER socket on one I/O thread, the session table, the
 * request handlers and the counters. The I/O thread receives and validates every
 * request once and answers the session-wide ones (Hello, CreateSession, DropSession,
 * Stats) itself; Offload, Append and Attend become jobs that run on the worker pool,
 * several at once, ordered per (session, layer), at most --max-queue of them; their
 * replies go back through the I/O thread. Index builds run in their own low-priority
 * threads inside index/; dropped sessions are freed by a reaper thread. A request that
 * fails in any way gets one error reply (status + message) and one log line; nothing a
 * client sends can end the loop or touch another client's session. */
#ifndef RATD_SERVER_H
#define RATD_SERVER_H

#include <signal.h>

#include "ratd_config.h"

typedef struct ratd_server ratd_server;

/* Binds the endpoint, builds the pool (placement) and the reaper, prepares the limits. */
ra_status ratd_server_create(ratd_server **out, const ratd_config *cfg, char *err, size_t errlen);
/* Serves until *stop becomes nonzero (a signal handler sets it), then takes the
 * requests already on their way, answers every one, and drops every session
 * (cancelling their builds). Returns 0, or 1 when index builds still ran 3 s after
 * their cancellation: then call ratd_server_abandon and _exit, never destroy. */
int ratd_server_run(ratd_server *s, volatile sig_atomic_t *stop);
/* Removes the ipc:// socket file and leaves everything else to the exit. */
void ratd_server_abandon(ratd_server *s);
/* Stops the workers, closes the socket, frees everything, removes the ipc:// socket
 * file. */
void ratd_server_destroy(ratd_server *s);

#endif
