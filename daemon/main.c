/* ratd's entry point, in Redis's fixed start order: defaults -> config file -> env ->
 * flags -> endpoint policy -> topology/pinning and bind (ratd_server_create) -> serve
 * -> on SIGINT/SIGTERM stop taking requests, answer those queued, cancel the index
 * builds, free every session, remove the ipc:// socket file, exit 0 (within a bound:
 * a build that does not end 3 s after its cancellation is left to the exit). Exit 2
 * on a configuration error (also an endpoint the policy refuses once bound, or a CURVE
 * file that is not private), 1 on another start failure. */
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#include "ra_index.h"
#include "ra_log.h"
#include "ra_proto.h"
#include "ratd_config.h"
#include "ratd_server.h"

int ratd_curve_keygen(FILE *f); /* ratd_curve.c */

#ifndef RATD_VERSION
#define RATD_VERSION "0.1.0"
#endif

static volatile sig_atomic_t g_stop = 0;

static void on_signal(int sig)
{
    (void)sig;
    g_stop = 1;
}

int main(int argc, char **argv)
{
    /* before any thread of ours: what runs now are library pools (OpenBLAS) that only
     * index builds use; they get the builds' low priority */
    ra_index_build_priority_setup();
    ratd_config cfg;
    char err[512];
    int help = 0, version = 0;
    if (ratd_config_load(&cfg, argc, argv, &help, &version, err, sizeof err) != RA_OK) {
        fprintf(stderr, "ratd: %s\n", err);
        return 2;
    }
    if (help) {
        ratd_config_usage(stdout, argv[0]);
        return 0;
    }
    if (version) {
        printf("ratd %s (wire protocol %u)\n", RATD_VERSION, RA_PROTO_VERSION);
        return 0;
    }
    if (cfg.curve_keygen)
        return ratd_curve_keygen(stdout);
    if (!strcmp(cfg.log_level, "error"))
        ra_log_set_level(RA_LOG_ERROR);
    else if (!strcmp(cfg.log_level, "warn"))
        ra_log_set_level(RA_LOG_WARN);
    else if (!strcmp(cfg.log_level, "info"))
        ra_log_set_level(RA_LOG_INFO);
    else if (!strcmp(cfg.log_level, "debug"))
        ra_log_set_level(RA_LOG_DEBUG);
    else {
        fprintf(stderr, "ratd: log-level '%s': use error, warn, info or debug\n", cfg.log_level);
        return 2;
    }
    if (ratd_config_check_endpoint(&cfg, err, sizeof err) != RA_OK) {
        fprintf(stderr, "ratd: %s\n", err);
        return 2;
    }
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_signal; /* no SA_RESTART: the poll returns at once */
    sigemptyset(&sa.sa_mask);
    sigaction(SIGINT, &sa, NULL);
    sigaction(SIGTERM, &sa, NULL);
    signal(SIGPIPE, SIG_IGN);

    ratd_server *s;
    ra_status st = ratd_server_create(&s, &cfg, err, sizeof err);
    if (st != RA_OK) {
        RA_ERROR("cannot start: %s (%s)", err, ra_strerror(st));
        return st == RA_EINVAL ? 2 : 1; /* 2: what was asked for is not allowed */
    }
    if (ratd_server_run(s, &g_stop) != 0) {
        ratd_server_abandon(s);
        RA_WARN("stopped, leaving running index builds to the exit");
        fflush(NULL);
        _exit(0);
    }
    ratd_server_destroy(s);
    RA_INFO("stopped");
    return 0;
}
