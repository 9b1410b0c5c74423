/* Helpers of the operations tests (tests/ops): run a program and capture its output,
 * an HTTP GET over a plain socket, a free loopback port, reading a metric's value, and
 * a small session filled with f32 keys whose exact attention the harness can check.
 * Header-only, next to ../daemon/ratd_harness.h. */
#ifndef RA_OPS_UTIL_H
#define RA_OPS_UTIL_H

#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include "ratd/client.h"

/* Runs `cmd` through the shell; its stdout and stderr (merged) go into out[cap]. Returns
 * the exit status, or -1. */
__attribute__((unused)) static int run_capture(const char *cmd, char *out, size_t cap)
{
    char full[4096];
    snprintf(full, sizeof full, "%s 2>&1", cmd);
    FILE *p = popen(full, "r");
    if (!p)
        return -1;
    size_t n = fread(out, 1, cap - 1, p);
    out[n] = 0;
    int st = pclose(p);
    return WIFEXITED(st) ? WEXITSTATUS(st) : -1;
}

/* A TCP port on 127.0.0.1 that nobody listens on now. */
__attribute__((unused)) static int free_port(void)
{
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t len = sizeof a;
    if (fd < 0 || bind(fd, (struct sockaddr *)&a, sizeof a) != 0 ||
        getsockname(fd, (struct sockaddr *)&a, &len) != 0) {
        if (fd >= 0)
            close(fd);
        return -1;
    }
    close(fd);
    return ntohs(a.sin_port);
}

/* `method` `path` on 127.0.0.1:port; the whole response (headers and body) into out.
 * Returns the HTTP status code, or -1. */
__attribute__((unused)) static int http_get(int port, const char *method, const char *path,
                                            char *out, size_t cap)
{
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port),
                            .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    if (fd < 0 || connect(fd, (struct sockaddr *)&a, sizeof a) != 0) {
        if (fd >= 0)
            close(fd);
        return -1;
    }
    struct timeval tv = {5, 0};
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    char req[512];
    int n = snprintf(req, sizeof req, "%s %s HTTP/1.0\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n",
                     method, path);
    if (write(fd, req, (size_t)n) != n) {
        close(fd);
        return -1;
    }
    size_t got = 0;
    ssize_t r;
    while (got + 1 < cap && (r = read(fd, out + got, cap - 1 - got)) > 0)
        got += (size_t)r;
    out[got] = 0;
    close(fd);
    int code = -1;
    if (sscanf(out, "HTTP/1.%*d %d", &code) != 1)
        return -1;
    return code;
}

/* The value of the sample line that starts with `name` (e.g.
 * ratd_requests_total{type="attend"}), or NAN when there is none. */
__attribute__((unused)) static double metric(const char *text, const char *name)
{
    size_t nl = strlen(name);
    for (const char *p = text; p && *p; p = strchr(p, '\n') ? strchr(p, '\n') + 1 : NULL)
        if (!strncmp(p, name, nl) && p[nl] == ' ')
            return strtod(p + nl + 1, NULL);
    return NAN;
}

/* Offloads n random f32 tokens of a session with G KV heads of dim D into layer 0;
 * K and V stay in k/v ([G][n][D], caller frees). */
__attribute__((unused)) static ra_status offload_f32(ra_client *c, uint64_t s, int G, int D, size_t n,
                                                     int H, size_t nq, float **k, float **v)
{
    *k = rnd_vec((size_t)G * n * D, 1.0f);
    *v = rnd_vec((size_t)G * n * D, 1.0f);
    int64_t *pos = malloc(n * sizeof *pos);
    for (size_t i = 0; i < n; i++)
        pos[i] = (int64_t)i;
    float *q = nq ? rnd_vec((size_t)H * nq * D, 1.0f) : NULL;
    ra_kv_batch b = {.n_kv_heads = G, .head_dim = D, .dtype = RA_DTYPE_F32, .n_tokens = n, .k = *k,
                     .v = *v, .pos = pos, .n_q_heads = nq ? H : 0, .n_queries = nq, .q_train = q};
    ra_status st = ra_client_offload(c, s, 0, &b);
    free(pos);
    free(q);
    return st;
}

#endif
