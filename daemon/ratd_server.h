/* The ratd server: one ROUTER socket, the session table, the request handlers and the
 * counters. One server thread receives, validates and answers requests in order; the
 * heavy parts (per-query-head attention, per-KV-head appends) fan out to the worker
 * pool, and index builds run in the background inside index/. A request that fails in
 * any way gets one error reply (status + message) and one log line; nothing a client
 * sends can end the loop or touch another client's session. */
#ifndef RATD_SERVER_H
#define RATD_SERVER_H

#include <signal.h>

#include "ratd_config.h"

typedef struct ratd_server ratd_server;

/* Binds the endpoint, builds the pool (placement), prepares the limits. */
ra_status ratd_server_create(ratd_server **out, const ratd_config *cfg, char *err, size_t errlen);
/* Serves until *stop becomes nonzero (a signal handler sets it). Returns 0. */
int ratd_server_run(ratd_server *s, volatile sig_atomic_t *stop);
/* Drops every session (waiting for background builds), closes the socket, removes
 * the ipc:// socket file. */
void ratd_server_destroy(ratd_server *s);

#endif
