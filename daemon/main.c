/* ratd's entry point, in Redis's fixed start order: defaults -> config file -> env ->
 * flags -> endpoint policy -> topology/pinning and bind (ratd_server_create) -> serve
 * -> on SIGINT/SIGTERM stop taking requests, answer those queued, cancel the index
 * builds, free every session, remove the ipc:// socket file, exit 0 (within a bound:
 * a build that does not end 3 s after its cancellation is left to the exit). Exit 2
 * on a configuration error (also an endpoint the policy refuses once bound, a CURVE
 * file that is not private, or an unwritable --log-file), 1 on another start failure.
 * --print-config prints the merged configuration in config-file syntax and exits. */
#include <errno.h>
#include <fcntl.h>
#include <malloc.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
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

/* glibc's defaults keep freed memory: up to 8 arenas per core, each holding what it
 * freed at its top, and an mmap threshold that rises to the largest block freed so far
 * (then blocks of that size live in the arenas). Under session churn the daemon's
 * resident set grew by ~10 MB a minute that malloc_trim could not give back (the soak
 * measured it; one arena or fixed thresholds keep it flat). Fixed here unless the
 * operator set glibc's own MALLOC_* variables. The serving path does not allocate once
 * its pools have grown, so fewer arenas cost it nothing. */
static void malloc_setup(void)
{
    if (!getenv("MALLOC_ARENA_MAX"))
        mallopt(M_ARENA_MAX, 4);
    if (!getenv("MALLOC_MMAP_THRESHOLD_"))
        mallopt(M_MMAP_THRESHOLD, 256 * 1024);
    if (!getenv("MALLOC_TRIM_THRESHOLD_"))
        mallopt(M_TRIM_THRESHOLD, 1024 * 1024);
}

int main(int argc, char **argv)
{
    malloc_setup();
    /* before any thread of ours: what runs now are library pools (OpenBLAS) that only
     * index builds use; they get the builds' low priority */
    ra_index_build_priority_setup();
    ratd_config cfg;
    char err[512];
    int help = 0, version = 0, print_config = 0;
    /* --print-config is an action, not an option of the table: taken out here */
    char **args = calloc((size_t)argc + 1, sizeof *args);
    int nargs = 0;
    if (!args)
        return 1;
    for (int i = 0; i < argc; i++) {
        if (i > 0 && !strcmp(argv[i], "--print-config"))
            print_config = 1;
        else
            args[nargs++] = argv[i];
    }
    if (ratd_config_load(&cfg, nargs, args, &help, &version, err, sizeof err) != RA_OK) {
        fprintf(stderr, "ratd: %s\n", err);
        free(args);
        return 2;
    }
    free(args);
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
    if (print_config) {
        ratd_config_print(stdout, &cfg);
        return 0;
    }
    if (cfg.log_file[0]) { /* refused now, with the reason, rather than logging nowhere */
        int fd = open(cfg.log_file, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0640);
        if (fd < 0) {
            fprintf(stderr, "ratd: cannot open the log file %s for writing: %s\n", cfg.log_file,
                    strerror(errno));
            return 2;
        }
        if (dup2(fd, STDERR_FILENO) < 0) {
            fprintf(stderr, "ratd: cannot log to %s: %s\n", cfg.log_file, strerror(errno));
            close(fd);
            return 2;
        }
        close(fd);
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
