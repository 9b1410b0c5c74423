/* Test harness shared by the integration tests of tests/daemon and tests/client: starts
 * the real ratd (path from $RATD_BIN) on a private ipc:// endpoint under /tmp with its
 * log captured to a file, waits until it answers Hello, and stops it with SIGTERM,
 * checking a clean exit and the removal of the socket file. Also the double-precision
 * reference attention every correctness check compares against. Header-only: each test
 * binary is one translation unit plus this. */
#ifndef RATD_HARNESS_H
#define RATD_HARNESS_H

#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "ratd/client.h"

typedef struct ratd_proc {
    pid_t pid;
    char endpoint[320];
    char path[256];
    char log[256];
} ratd_proc;

static int g_harness_seq = 0;
/* When set before ratd_start, the daemon binds this endpoint instead of the private
 * ipc:// one (e.g. a tcp:// test); reset by ratd_start. */
static const char *g_harness_endpoint = NULL;

/* When set before ratd_start, called in the child just before exec (setrlimit, umask,
 * environment); reset by ratd_start. */
static void (*g_harness_child_setup)(void) = NULL;
/* When set before ratd_start, no --endpoint is passed (the daemon's default applies);
 * g_harness_endpoint then says where to connect. Reset by ratd_start. */
static int g_harness_omit_endpoint = 0;

/* Daemons still running: killed at exit, so that a failed assertion (cmocka longjmps
 * out of the test) never leaves an orphan ratd holding the test's pipes. */
static pid_t g_harness_pids[16];
static char g_harness_paths[16][256];

static void ratd_harness_atexit(void)
{
    for (int i = 0; i < 16; i++)
        if (g_harness_pids[i] > 0) {
            kill(g_harness_pids[i], SIGKILL);
            waitpid(g_harness_pids[i], NULL, 0);
            unlink(g_harness_paths[i]);
            g_harness_pids[i] = 0;
        }
}

static void ratd_harness_track(pid_t pid, const char *path)
{
    static int registered = 0;
    if (!registered) {
        atexit(ratd_harness_atexit);
        registered = 1;
    }
    for (int i = 0; i < 16; i++)
        if (pid > 0 ? g_harness_pids[i] == 0 : g_harness_pids[i] == -pid) {
            g_harness_pids[i] = pid > 0 ? pid : 0;
            if (pid > 0 && path)
                snprintf(g_harness_paths[i], sizeof g_harness_paths[i], "%s", path);
            return;
        }
}

/* Starts ratd with extra flags (NULL-terminated list). Returns 0 when it answers Hello
 * within 20 s, -1 otherwise (the process is killed). */
static int ratd_start(ratd_proc *p, ...)
{
    const char *bin = getenv("RATD_BIN");
    if (!bin || !*bin) {
        fprintf(stderr, "RATD_BIN is not set (run under ctest)\n");
        return -1;
    }
    memset(p, 0, sizeof *p);
    g_harness_seq++;
    snprintf(p->path, sizeof p->path, "/tmp/ratd-test-%d-%d.sock", (int)getpid(), g_harness_seq);
    snprintf(p->endpoint, sizeof p->endpoint, "ipc://%s", p->path);
    if (g_harness_endpoint) {
        snprintf(p->endpoint, sizeof p->endpoint, "%s", g_harness_endpoint);
        g_harness_endpoint = NULL;
    }
    snprintf(p->log, sizeof p->log, "/tmp/ratd-test-%d-%d.log", (int)getpid(), g_harness_seq);
    const char *argv[64];
    int argc = 0;
    argv[argc++] = bin;
    if (!g_harness_omit_endpoint) {
        argv[argc++] = "--endpoint";
        argv[argc++] = p->endpoint;
    } else if (!strncmp(p->endpoint, "ipc://", 6)) {
        snprintf(p->path, sizeof p->path, "%s", p->endpoint + 6);
    }
    void (*setup)(void) = g_harness_child_setup;
    g_harness_child_setup = NULL;
    g_harness_omit_endpoint = 0;
    argv[argc++] = "--workers";
    argv[argc++] = "2";
    va_list ap;
    va_start(ap, p);
    const char *a;
    while ((a = va_arg(ap, const char *)) != NULL && argc < 62)
        argv[argc++] = a;
    va_end(ap);
    argv[argc] = NULL;
    pid_t pid = fork();
    if (pid < 0)
        return -1;
    if (pid == 0) {
        int fd = open(p->log, O_WRONLY | O_CREAT | O_TRUNC, 0644);
        if (fd >= 0) {
            dup2(fd, 1);
            dup2(fd, 2);
            close(fd);
        }
        if (setup)
            setup();
        execv(bin, (char *const *)argv);
        _exit(127);
    }
    p->pid = pid;
    ratd_harness_track(pid, p->path);
    ra_client_opts o;
    ra_client_opts_default(&o);
    o.timeout_ms = 200;
    for (int i = 0; i < 100; i++) {
        int status;
        if (waitpid(pid, &status, WNOHANG) == pid) {
            ratd_harness_track(-pid, "");
            p->pid = 0;
            return -1; /* exited at start */
        }
        ra_client *c;
        if (ra_client_open(&c, p->endpoint, &o) == RA_OK) {
            ra_status st = ra_client_hello(c, NULL);
            ra_client_close(c);
            if (st == RA_OK)
                return 0;
        }
        usleep(100000);
    }
    kill(pid, SIGKILL);
    waitpid(pid, NULL, 0);
    ratd_harness_track(-pid, "");
    p->pid = 0;
    return -1;
}

/* SIGTERM and wait; returns the exit status (0 clean), or -1 if it had to be killed or
 * left its socket file behind. */
static int ratd_stop(ratd_proc *p)
{
    if (!p->pid)
        return -1;
    kill(p->pid, SIGTERM);
    int status = 0, rc = -2;
    for (int i = 0; i < 300 && rc == -2; i++) {
        if (waitpid(p->pid, &status, WNOHANG) == p->pid)
            rc = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
        else
            usleep(50000);
    }
    if (rc == -2) { /* stuck: kill it, count as a failure */
        kill(p->pid, SIGKILL);
        waitpid(p->pid, NULL, 0);
        unlink(p->path);
        rc = -1;
    }
    ratd_harness_track(-p->pid, "");
    p->pid = 0;
    struct stat sb;
    if (stat(p->path, &sb) == 0) {
        unlink(p->path);
        return -1;
    }
    if (rc == 0 && !getenv("RATD_TEST_KEEP_LOGS"))
        unlink(p->log); /* kept when the stop was not clean, for the post-mortem */
    return rc;
}

/* 1 when the daemon's log contains `needle`. */
__attribute__((unused)) static int ratd_log_has(const ratd_proc *p, const char *needle)
{
    FILE *f = fopen(p->log, "r");
    if (!f)
        return 0;
    char line[2048];
    int found = 0;
    while (!found && fgets(line, sizeof line, f))
        found = strstr(line, needle) != NULL;
    fclose(f);
    return found;
}

__attribute__((unused)) static ra_client *ratd_connect(const ratd_proc *p, int timeout_ms)
{
    ra_client_opts o;
    ra_client_opts_default(&o);
    o.timeout_ms = timeout_ms;
    ra_client *c = NULL;
    if (ra_client_open(&c, p->endpoint, &o) != RA_OK)
        return NULL;
    return c;
}

/* ---- data and reference -------------------------------------------------------------- */

static uint64_t g_rng = 88172645463325252ull;
static double rnd_unif(void)
{
    g_rng ^= g_rng << 13;
    g_rng ^= g_rng >> 7;
    g_rng ^= g_rng << 17;
    return (double)(g_rng >> 11) * (1.0 / 9007199254740992.0);
}
static float rnd_norm(void)
{
    double u = rnd_unif(), v = rnd_unif();
    if (u < 1e-300)
        u = 1e-300;
    return (float)(sqrt(-2.0 * log(u)) * cos(6.283185307179586 * v));
}

/* Exact attention of q over rows `rows` (n of them; NULL: all n) of K, V (fp32 views,
 * [n_all][dim]), scale s; writes o[dim], *lse in double. n == 0: o = 0, lse = -inf. */
__attribute__((unused)) static void ref_attend(const float *q, const float *K, const float *V,
                                               int dim, const int *rows, int n, double scale,
                                               double *o, double *lse)
{
    double m = -INFINITY;
    double *sc = malloc((size_t)(n > 0 ? n : 1) * sizeof *sc);
    for (int i = 0; i < n; i++) {
        int r = rows ? rows[i] : i;
        double s = 0;
        for (int d = 0; d < dim; d++)
            s += (double)q[d] * K[(size_t)r * dim + d];
        sc[i] = s * scale;
        if (sc[i] > m)
            m = sc[i];
    }
    for (int d = 0; d < dim; d++)
        o[d] = 0;
    double z = 0;
    for (int i = 0; i < n; i++) {
        int r = rows ? rows[i] : i;
        double w = exp(sc[i] - m);
        z += w;
        for (int d = 0; d < dim; d++)
            o[d] += w * V[(size_t)r * dim + d];
    }
    if (n == 0) {
        *lse = -INFINITY;
    } else {
        for (int d = 0; d < dim; d++)
            o[d] /= z;
        *lse = m + log(z);
    }
    free(sc);
}

/* Relative error of o against ref: ||o - ref|| / max(||ref||, 1e-6). */
__attribute__((unused)) static double rel_err(const float *o, const double *ref, int dim)
{
    double num = 0, den = 0;
    for (int d = 0; d < dim; d++) {
        num += (o[d] - ref[d]) * (o[d] - ref[d]);
        den += ref[d] * ref[d];
    }
    return sqrt(num) / fmax(sqrt(den), 1e-6);
}

/* o [H][D] / lse [H] of H query heads (GQA: head h reads KV head h / (H / G)) against
 * exact attention over all n tokens of K, V ([G][n][D] fp32 as the daemon stores them).
 * Returns the first head off by more than tol (relative), with a description in msg,
 * or -1. */
__attribute__((unused)) static int ref_check_heads(const float *K, const float *V, int G, int n,
                                                   int D, int H, const float *q, const float *o,
                                                   const float *lse, double tol, char *msg,
                                                   size_t msglen)
{
    int rep = H / G, bad = -1;
    double *ro = malloc((size_t)D * sizeof *ro), rl;
    for (int h = 0; h < H && bad < 0; h++) {
        const float *Kg = K + (size_t)(h / rep) * n * D, *Vg = V + (size_t)(h / rep) * n * D;
        ref_attend(q + (size_t)h * D, Kg, Vg, D, NULL, n, 1.0 / sqrt(D), ro, &rl);
        double e = rel_err(o + (size_t)h * D, ro, D);
        if (e > tol || fabs(lse[h] - rl) > tol * fmax(1.0, fabs(rl))) {
            snprintf(msg, msglen, "head %d: rel err %.3g, lse %.6f vs %.6f (tol %g)", h, e, lse[h],
                     rl, tol);
            bad = h;
        }
    }
    free(ro);
    return bad;
}

/* n floats of N(0, amp^2). */
__attribute__((unused)) static float *rnd_vec(size_t n, float amp)
{
    float *q = malloc(n * sizeof(float));
    for (size_t i = 0; i < n; i++)
        q[i] = amp * rnd_norm();
    return q;
}

/* ---- session tokens, for tests that speak the wire protocol by hand --------------------- */

static struct {
    uint64_t id;
    ra_session_token tok;
} g_harness_tok[512];
static int g_harness_ntok;

/* Remembers the token client c holds for session id (ratd_token_of finds it). */
__attribute__((unused)) static void ratd_remember_token(ra_client *c, uint64_t id)
{
    ra_session_token t;
    if (ra_client_session_token(c, id, &t) != RA_OK)
        return;
    int i = 0;
    while (i < g_harness_ntok && g_harness_tok[i].id != id)
        i++;
    if (i == g_harness_ntok) {
        if (g_harness_ntok == 512)
            i = 0; /* oldest out */
        else
            g_harness_ntok++;
    }
    g_harness_tok[i].id = id;
    g_harness_tok[i].tok = t;
}

/* The remembered token of session id (16 bytes), or NULL. */
__attribute__((unused)) static uint8_t *ratd_token_of(uint64_t id)
{
    for (int i = 0; i < g_harness_ntok; i++)
        if (g_harness_tok[i].id == id)
            return g_harness_tok[i].tok.bytes;
    return NULL;
}

/* A session of L layers, H query heads over G KV heads of dim D; 0 on failure (the
 * client's message says why). Its token is remembered (ratd_token_of). */
__attribute__((unused)) static uint64_t ratd_session_new(ra_client *c, int L, int H, int G, int D,
                                                         ra_dtype dt, ra_client_index_kind kind)
{
    ra_session_desc d;
    ra_session_desc_init(&d);
    d.n_layers = L;
    d.n_q_heads = H;
    d.n_kv_heads = G;
    d.head_dim = D;
    d.dtype = dt;
    d.index.kind = kind;
    uint64_t s = 0;
    if (ra_client_session_create(c, &d, &s) != RA_OK)
        return 0;
    ratd_remember_token(c, s);
    return s;
}

#endif
