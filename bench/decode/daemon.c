/* The private ratd of a ratd-bench-decode run: found beside the bench in the same build
 * tree unless --ratd names one, started on a fresh ipc:// path, waited for until it
 * answers Hello, and stopped with SIGTERM at the end, at exit and when the bench is
 * interrupted, so that no run leaves a daemon (or its socket file) behind. */
#define _GNU_SOURCE
#include <errno.h>
#include <libgen.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "decode.h"

static volatile pid_t g_child = 0;
static char g_sock[256];

int dec_daemon_default_bin(char *buf, size_t len)
{
    char exe[4096];
    ssize_t n = readlink("/proc/self/exe", exe, sizeof exe - 1);
    if (n <= 0)
        return -1;
    exe[n] = 0;
    snprintf(buf, len, "%s/../daemon/ratd", dirname(exe));
    return access(buf, X_OK) == 0 ? 0 : -1;
}

static void on_exit_stop(void)
{
    if (g_child > 0) {
        kill(g_child, SIGTERM);
        for (int i = 0; i < 100 && waitpid(g_child, NULL, WNOHANG) == 0; i++)
            usleep(100000);
        kill(g_child, SIGKILL);
        waitpid(g_child, NULL, 0);
        g_child = 0;
        unlink(g_sock);
    }
}

static void on_signal(int sig)
{
    if (g_child > 0)
        kill(g_child, SIGTERM); /* it unlinks its socket itself */
    signal(sig, SIG_DFL);
    raise(sig);
}

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

ra_status dec_daemon_start(dec_daemon *dm, const char *bin, int workers, char *err, size_t errlen)
{
    memset(dm, 0, sizeof *dm);
    if (access(bin, X_OK) != 0) {
        snprintf(err, errlen, "cannot run %s: %s", bin, strerror(errno));
        return RA_EIO;
    }
    snprintf(dm->sock, sizeof dm->sock, "/tmp/ratd-bench-decode.%d.sock", (int)getpid());
    snprintf(dm->endpoint, sizeof dm->endpoint, "ipc://%s", dm->sock);
    unlink(dm->sock); /* a stale file of an earlier process with this pid */
    char wbuf[16];
    snprintf(wbuf, sizeof wbuf, "%d", workers);
    const char *argv[10] = {bin, "--endpoint", dm->endpoint, "--log-level", "warn"};
    int argc = 5;
    if (workers > 0) {
        argv[argc++] = "--workers";
        argv[argc++] = wbuf;
    }
    argv[argc] = NULL;
    pid_t p = fork();
    if (p < 0) {
        snprintf(err, errlen, "fork: %s", strerror(errno));
        return RA_EIO;
    }
    if (p == 0) {
        prctl(PR_SET_PDEATHSIG, SIGTERM); /* a bench killed outright takes its daemon along */
        execv(bin, (char *const *)argv);
        fprintf(stderr, "ratd-bench-decode: cannot run %s: %s\n", bin, strerror(errno));
        _exit(127);
    }
    dm->pid = p;
    g_child = p;
    snprintf(g_sock, sizeof g_sock, "%s", dm->sock);
    static int hooked = 0;
    if (!hooked) {
        atexit(on_exit_stop);
        signal(SIGINT, on_signal);
        signal(SIGTERM, on_signal);
        signal(SIGHUP, on_signal);
        hooked = 1;
    }
    /* a fresh daemon needs a moment to bind: short hellos until it answers */
    ra_client_opts o;
    ra_client_opts_default(&o);
    o.timeout_ms = 250;
    double t0 = now_s();
    while (now_s() - t0 < 20.0) {
        int status;
        if (waitpid(p, &status, WNOHANG) == p) {
            dm->pid = 0;
            g_child = 0;
            snprintf(err, errlen, "%s exited at start-up (status %d)", bin,
                     WIFEXITED(status) ? WEXITSTATUS(status) : -1);
            return RA_ECLOSED;
        }
        ra_client *c = NULL;
        if (ra_client_open(&c, dm->endpoint, &o) == RA_OK) {
            ra_status s = ra_client_hello(c, NULL);
            ra_client_close(c);
            if (s == RA_OK)
                return RA_OK;
        }
        usleep(50000);
    }
    dec_daemon_stop(dm);
    snprintf(err, errlen, "%s did not answer Hello on %s within 20 s", bin, dm->endpoint);
    return RA_ETIMEDOUT;
}

int dec_daemon_stop(dec_daemon *dm)
{
    if (dm->pid <= 0)
        return 0;
    kill(dm->pid, SIGTERM);
    int status = 0, rc = -2;
    double t0 = now_s();
    while (rc == -2 && now_s() - t0 < 60.0) { /* freeing large sessions takes a while */
        if (waitpid(dm->pid, &status, WNOHANG) == dm->pid)
            rc = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
        else
            usleep(20000);
    }
    if (rc == -2) {
        kill(dm->pid, SIGKILL);
        waitpid(dm->pid, NULL, 0);
        rc = -1;
    }
    struct stat sb;
    if (stat(dm->sock, &sb) == 0)
        unlink(dm->sock);
    dm->pid = 0;
    g_child = 0;
    return rc;
}
