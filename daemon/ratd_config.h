/* ratd's configuration: one declarative table of options (name, type, bounds, default,
 * help) in ratd_config.c, as Redis config.c. Defaults come first, then a config file
 * (--config FILE, lines "name value"), then the environment (RATD_<NAME>, dashes as
 * underscores), then command-line flags (--name value or --name=value); later sources
 * win. `ratd --help` is generated from the same table, so every flag is documented. */
#ifndef RATD_CONFIG_H
#define RATD_CONFIG_H

#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

#include "ratd/status.h"

typedef struct ratd_config {
    char endpoint[512];
    int allow_remote;
    int allow_plain_loopback; /* tcp:// on loopback without CURVE */
    int socket_mode;          /* mode of the ipc:// socket file */
    char curve_secret_file[512];
    char curve_clients[512];       /* a directory or a file of authorised client public keys */
    int curve_keygen;              /* action: print a key pair and exit */
    int max_clients;               /* connections at once; 0: from RLIMIT_NOFILE */
    int session_ttl;               /* seconds a session may stay idle; 0: forever */
    uint64_t max_peer_reply_bytes; /* reply bytes one client may leave unread */
    int workers;                   /* 0: one per CPU of the binding set */
    int numa_node;                 /* -1: none */
    char cpuset[256];
    int pin_workers;    /* worker i on the i-th CPU of the set */
    uint64_t mem_limit; /* bytes, 0: none */
    uint64_t max_frame_bytes;
    uint64_t max_message_bytes;
    int max_sessions;
    int max_layers;
    int max_heads;
    int max_dim;
    int max_top_k;
    int max_tokens;
    int max_queries;
    int max_queue; /* Offload/Append/Attend requests queued or running */
    int max_batch; /* sessions in one batched Attend */
    int index_threads;
    int send_timeout_ms;
    int spin_us;
    int timeline; /* --timeline N: every N-th pooled request's timeline logged (0: off) */
    char log_level[16];
    char config_file[512];
    char log_file[512]; /* "": stderr */
    char metrics[256];  /* Prometheus endpoint tcp://host:port, "": off */
    int metrics_allow_remote; /* --metrics on a non-loopback address */
} ratd_config;

void ratd_config_defaults(ratd_config *c);
/* Applies one option by name (without dashes) from its text value; err on failure. */
ra_status ratd_config_set(ratd_config *c, const char *name, const char *value, char *err,
                          size_t errlen);
/* Reads "name value" lines ('#' comments). */
ra_status ratd_config_file(ratd_config *c, const char *path, char *err, size_t errlen);
/* RATD_<NAME> variables. */
ra_status ratd_config_env(ratd_config *c, char *err, size_t errlen);
/* Command line; *help = 1 when --help was given, *version for --version. */
ra_status ratd_config_args(ratd_config *c, int argc, char **argv, int *help, int *version,
                           char *err, size_t errlen);
/* Full start-up sequence: defaults, --config file, env, flags. */
ra_status ratd_config_load(ratd_config *c, int argc, char **argv, int *help, int *version,
                           char *err, size_t errlen);
void ratd_config_usage(FILE *f, const char *prog);
/* Option i of the table (0, 1, ... until it returns 0): its name and its value in c as
 * a config file writes it (sizes with a K/M/G suffix when exact, booleans yes/no). */
int ratd_config_value(const ratd_config *c, size_t i, const char **name, char *buf, size_t len);
/* Writes the effective configuration in config-file syntax (every option but `config`),
 * which ratd --config reads back to the same configuration. */
void ratd_config_print(FILE *f, const ratd_config *c);
/* Splits tcp://host:port: the host without the brackets of an IPv6 address into
 * host[hlen], and (port not NULL) the non-empty port into port[plen]; -1 when the endpoint
 * is no tcp://host:port or a part does not fit. */
int ratd_tcp_split(const char *endpoint, char *host, size_t hlen, char *port, size_t plen);
/* Fills the default endpoint when none is set (ipc:// in the private directory
 * $XDG_RUNTIME_DIR/ratd/, else /tmp/ratd-<uid>/, created 0700 and checked: ours, not a
 * symlink, no group/other bits), and applies the transport policy before the bind:
 * a tcp:// endpoint has no ';' (ZeroMQ's source;bind form), a non-loopback address
 * needs allow-remote and CURVE, a loopback one CURVE or allow-plain-loopback; CURVE
 * needs its authorised clients. */
ra_status ratd_config_check_endpoint(ratd_config *c, char *err, size_t errlen);
/* The same policy on the address actually bound (ZMQ_LAST_ENDPOINT, e.g.
 * "tcp://0.0.0.0:47107"): RA_EINVAL with a message when it is not allowed. */
ra_status ratd_config_check_bound(const ratd_config *c, const char *bound, char *err,
                                  size_t errlen);
/* 1 when a tcp:// endpoint's host is a numeric loopback address (127.0.0.0/8, ::1,
 * ::ffff:127.x), or the names localhost / lo before the bind. */
int ratd_endpoint_is_loopback(const char *endpoint, int numeric_only);
/* Creates (0700) or checks the private directory `dir`: a real directory, owned by
 * this user, without group/other permission bits. */
ra_status ratd_private_dir(const char *dir, int create, char *err, size_t errlen);

#endif
