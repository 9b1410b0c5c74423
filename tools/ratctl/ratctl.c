/* ratctl: asks a running ratd how it is, for a person or (--json) for a script.
 *
 *   ratctl [--endpoint EP] [--timeout-ms N] [--json] COMMAND
 *     ping          Hello round trip: version, protocol, workers, placement, time
 *     stats         daemon-wide counters (requests, errors, memory, per request type)
 *     sessions      live sessions: id, shape, tokens, bytes, heads ready/building, idle
 *     drop ID TOKEN drops session ID; TOKEN: its 32 hex digits (ra_client_session_token)
 *     config        the daemon's effective configuration, in config-file syntax
 *
 * The endpoint defaults to RATD_ENDPOINT, else the daemon's own default (ipc:// under
 * $XDG_RUNTIME_DIR/ratd/, else /tmp/ratd-<uid>/: ra_client_default_endpoint). Exit status: 0 on success, 1 when the
 * daemon refused or did not answer (the message says which), 2 on a usage error. Talks
 * only through include/ratd/client.h. */
#define _GNU_SOURCE
#include <errno.h>
#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "ratd/client.h"

static int g_json = 0;

static void usage(FILE *f)
{
    fprintf(f,
            "usage: ratctl [--endpoint EP] [--timeout-ms N] [--json] COMMAND\n\n"
            "commands:\n"
            "  ping        Hello round trip: version, protocol, workers, placement, time\n"
            "  stats       daemon-wide counters: requests, errors, memory, per request type\n"
            "  sessions    live sessions: id, shape, tokens, bytes, heads ready/building, idle\n"
            "  drop ID TOKEN\n"
            "              drop session ID, whose token (32 hex digits, from\n"
            "              ra_client_session_token) proves it is yours; a session whose owner\n"
            "              is gone expires after the daemon's --session-ttl\n"
            "  config      the daemon's effective configuration, in config-file syntax\n\n"
            "options:\n"
            "  --endpoint EP     ipc:///path or tcp://host:port (default: $RATD_ENDPOINT, else\n"
            "                    ipc://$XDG_RUNTIME_DIR/ratd/ratd.sock, else\n"
            "                    ipc:///tmp/ratd-<uid>/ratd.sock)\n"
            "  --timeout-ms N    give up a reply after N ms (default 5000)\n"
            "  --json            one JSON object on stdout instead of text\n"
            "  --help\n");
}

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

/* JSON string: the few characters that need escaping in what the daemon sends. */
static void json_str(const char *s)
{
    putchar('"');
    for (; *s; s++) {
        unsigned char ch = (unsigned char)*s;
        if (ch == '"' || ch == '\\')
            printf("\\%c", ch);
        else if (ch < 0x20)
            printf("\\u%04x", ch);
        else
            putchar(ch);
    }
    putchar('"');
}

static int failed(ra_client *c, const char *what, ra_status st)
{
    if (g_json) {
        printf("{\"ok\": false, \"command\": ");
        json_str(what);
        printf(", \"status\": %d, \"error\": ", (int)st);
        json_str(ra_strerror(st));
        printf(", \"message\": ");
        json_str(ra_client_errmsg(c));
        printf("}\n");
    }
    fprintf(stderr, "ratctl: %s: %s: %s\n", what, ra_strerror(st), ra_client_errmsg(c));
    return 1;
}

static const char *size_h(uint64_t b, char *buf, size_t len)
{
    const char *u[] = {"B", "KiB", "MiB", "GiB", "TiB"};
    double x = (double)b;
    int i = 0;
    while (x >= 1024 && i < 4) {
        x /= 1024;
        i++;
    }
    snprintf(buf, len, i ? "%.1f %s" : "%.0f %s", x, u[i]);
    return buf;
}

static int cmd_ping(ra_client *c)
{
    ra_server_info in;
    double t0 = now_s();
    ra_status st = ra_client_hello(c, &in);
    double ms = (now_s() - t0) * 1e3;
    if (st != RA_OK)
        return failed(c, "ping", st);
    if (g_json) {
        printf("{\"ok\": true, \"command\": \"ping\", \"round_trip_ms\": %.3f, \"server_version\": ",
               ms);
        json_str(in.server_version);
        printf(", \"protocol_version\": %u, \"capabilities\": %u, \"workers\": %u, "
               "\"numa_node\": %d}\n",
               in.protocol_version, in.capabilities, in.workers, in.numa_node);
        return 0;
    }
    printf("ratd %s, protocol %u, %u workers, %s, answered in %.3f ms\n", in.server_version,
           in.protocol_version, in.workers, in.numa_node >= 0 ? "bound to a NUMA node" : "unbound",
           ms);
    return 0;
}

static int cmd_stats(ra_client *c)
{
    ra_server_stats s;
    ra_status st = ra_client_stats(c, &s);
    if (st != RA_OK)
        return failed(c, "stats", st);
    if (g_json) {
        printf("{\"ok\": true, \"command\": \"stats\", \"sessions\": %llu, \"requests\": %llu, "
               "\"errors\": %llu, \"bad_messages\": %llu, \"bytes_in\": %llu, \"bytes_out\": %llu, "
               "\"mem_used\": %llu, \"mem_limit\": %llu, \"tokens\": %llu, \"uptime_s\": %.3f, "
               "\"ops\": {",
               (unsigned long long)s.sessions, (unsigned long long)s.requests,
               (unsigned long long)s.errors, (unsigned long long)s.bad_messages,
               (unsigned long long)s.bytes_in, (unsigned long long)s.bytes_out,
               (unsigned long long)s.mem_used, (unsigned long long)s.mem_limit,
               (unsigned long long)s.tokens, s.uptime_s);
        for (int i = 0; i < RA_OP_COUNT; i++)
            printf("%s\"%s\": {\"count\": %llu, \"errors\": %llu, \"total_us\": %llu, \"max_us\": "
                   "%llu}",
                   i ? ", " : "", ra_op_name((ra_op)i), (unsigned long long)s.ops[i].count,
                   (unsigned long long)s.ops[i].errors, (unsigned long long)s.ops[i].total_us,
                   (unsigned long long)s.ops[i].max_us);
        printf("}}\n");
        return 0;
    }
    char a[32], b[32];
    printf("up %.0f s, %llu sessions, %llu tokens, memory %s of %s\n", s.uptime_s,
           (unsigned long long)s.sessions, (unsigned long long)s.tokens,
           size_h(s.mem_used, a, sizeof a), s.mem_limit ? size_h(s.mem_limit, b, sizeof b) : "no limit");
    printf("%llu requests, %llu errors, %llu malformed; %s in, ", (unsigned long long)s.requests,
           (unsigned long long)s.errors, (unsigned long long)s.bad_messages,
           size_h(s.bytes_in, a, sizeof a));
    printf("%s out\n\n", size_h(s.bytes_out, b, sizeof b));
    printf("%-8s %12s %10s %12s %12s\n", "request", "count", "errors", "mean ms", "max ms");
    for (int i = 0; i < RA_OP_COUNT; i++) {
        const ra_op_stats *o = &s.ops[i];
        printf("%-8s %12llu %10llu %12.3f %12.3f\n", ra_op_name((ra_op)i),
               (unsigned long long)o->count, (unsigned long long)o->errors,
               o->count ? (double)o->total_us / (double)o->count * 1e-3 : 0.0,
               (double)o->max_us * 1e-3);
    }
    return 0;
}

static const char *kind_name(ra_client_index_kind k)
{
    static const char *n[] = {"graph", "flat", "ivf", "hnsw", "faiss-flat", "pscan"};
    return (unsigned)k < 6 ? n[k] : "?";
}

static int cmd_sessions(ra_client *c)
{
    size_t n = 0, cap = 0;
    ra_session_info *v = NULL;
    ra_status st;
    for (;;) { /* the count can grow between the two calls: ask again */
        st = ra_client_list_sessions(c, v, cap, &n);
        if (st != RA_OK || n <= cap)
            break;
        free(v);
        cap = n + 16;
        v = calloc(cap, sizeof *v);
        if (!v) {
            fprintf(stderr, "ratctl: out of memory\n");
            return 1;
        }
    }
    if (st != RA_OK) {
        free(v);
        return failed(c, "sessions", st);
    }
    if (g_json) {
        printf("{\"ok\": true, \"command\": \"sessions\", \"sessions\": [");
        for (size_t i = 0; i < n; i++) {
            const ra_session_info *x = &v[i];
            printf("%s{\"id\": %llu, \"n_layers\": %d, \"n_q_heads\": %d, \"n_kv_heads\": %d, "
                   "\"head_dim\": %d, \"dtype\": \"%s\", \"index\": \"%s\", \"tokens\": %llu, "
                   "\"bytes\": %llu, \"heads\": %u, \"heads_ready\": %u, \"heads_building\": %u, "
                   "\"jobs\": %u, \"idle_s\": %.3f}",
                   i ? ", " : "", (unsigned long long)x->id, x->n_layers, x->n_q_heads,
                   x->n_kv_heads, x->head_dim, ra_dtype_name(x->dtype), kind_name(x->index_kind),
                   (unsigned long long)x->tokens, (unsigned long long)x->bytes, x->heads,
                   x->heads_ready, x->heads_building, x->jobs, x->idle_s);
        }
        printf("]}\n");
        free(v);
        return 0;
    }
    if (!n) {
        printf("no live sessions\n");
        free(v);
        return 0;
    }
    printf("%8s  %-18s %-5s %-6s %10s %10s %15s %5s %8s\n", "id", "layers x q/kv x dim", "dtype",
           "index", "tokens", "memory", "heads rdy/bld", "jobs", "idle s");
    for (size_t i = 0; i < n; i++) {
        const ra_session_info *x = &v[i];
        char shape[32], mem[32], heads[32];
        snprintf(shape, sizeof shape, "%d x %d/%d x %d", x->n_layers, x->n_q_heads, x->n_kv_heads,
                 x->head_dim);
        snprintf(heads, sizeof heads, "%u: %u/%u", x->heads, x->heads_ready, x->heads_building);
        printf("%8llu  %-18s %-5s %-6s %10llu %10s %15s %5u %8.1f\n", (unsigned long long)x->id,
               shape, ra_dtype_name(x->dtype), kind_name(x->index_kind),
               (unsigned long long)x->tokens, size_h(x->bytes, mem, sizeof mem), heads, x->jobs,
               x->idle_s);
    }
    free(v);
    return 0;
}

static int hex_nibble(char ch)
{
    if (ch >= '0' && ch <= '9')
        return ch - '0';
    if (ch >= 'a' && ch <= 'f')
        return ch - 'a' + 10;
    if (ch >= 'A' && ch <= 'F')
        return ch - 'A' + 10;
    return -1;
}

static int cmd_drop(ra_client *c, const char *arg, const char *hex)
{
    char *end;
    errno = 0;
    unsigned long long id = strtoull(arg, &end, 10);
    if (!*arg || *end || errno || id == 0) {
        fprintf(stderr, "ratctl: drop: '%s' is not a session id (a positive integer)\n", arg);
        return 2;
    }
    ra_session_token tok;
    if (strlen(hex) != 2 * sizeof tok.bytes) {
        fprintf(stderr, "ratctl: drop: the token must be %zu hex digits\n", 2 * sizeof tok.bytes);
        return 2;
    }
    for (size_t i = 0; i < sizeof tok.bytes; i++) {
        int hi = hex_nibble(hex[2 * i]), lo = hex_nibble(hex[2 * i + 1]);
        if (hi < 0 || lo < 0) {
            fprintf(stderr, "ratctl: drop: the token '%s' is not hexadecimal\n", hex);
            return 2;
        }
        tok.bytes[i] = (uint8_t)(hi << 4 | lo);
    }
    ra_status st = ra_client_session_adopt(c, id, &tok);
    if (st != RA_OK)
        return failed(c, "drop", st);
    st = ra_client_session_drop(c, id);
    if (st != RA_OK)
        return failed(c, "drop", st);
    if (g_json)
        printf("{\"ok\": true, \"command\": \"drop\", \"session\": %llu}\n", id);
    else
        printf("session %llu dropped\n", id);
    return 0;
}

static int cmd_config(ra_client *c)
{
    static char buf[16384];
    ra_status st = ra_client_get_config(c, buf, sizeof buf);
    if (st != RA_OK)
        return failed(c, "config", st);
    if (!g_json) {
        fputs(buf, stdout);
        return 0;
    }
    printf("{\"ok\": true, \"command\": \"config\", \"options\": {");
    int first = 1;
    for (char *line = strtok(buf, "\n"); line; line = strtok(NULL, "\n")) {
        char *sp = strchr(line, ' ');
        if (!sp)
            continue;
        *sp = 0;
        printf("%s", first ? "" : ", ");
        json_str(line);
        printf(": ");
        json_str(sp + 1);
        first = 0;
    }
    printf("}}\n");
    return 0;
}

int main(int argc, char **argv)
{
    static const struct option opts[] = {{"endpoint", required_argument, 0, 'e'},
                                         {"timeout-ms", required_argument, 0, 't'},
                                         {"json", no_argument, 0, 'j'},
                                         {"help", no_argument, 0, 'h'},
                                         {0, 0, 0, 0}};
    char ep[600] = "";
    int timeout = 5000, o;
    if (getenv("RATD_ENDPOINT"))
        snprintf(ep, sizeof ep, "%s", getenv("RATD_ENDPOINT"));
    while ((o = getopt_long(argc, argv, "+e:t:jh", opts, NULL)) != -1) {
        switch (o) {
        case 'e':
            snprintf(ep, sizeof ep, "%s", optarg);
            break;
        case 't': {
            char *end;
            long v = strtol(optarg, &end, 10);
            if (*end || v < 1 || v > 3600000) {
                fprintf(stderr, "ratctl: --timeout-ms: '%s' is not in 1..3600000\n", optarg);
                return 2;
            }
            timeout = (int)v;
            break;
        }
        case 'j':
            g_json = 1;
            break;
        case 'h':
            usage(stdout);
            return 0;
        default:
            usage(stderr);
            return 2;
        }
    }
    if (optind >= argc) {
        usage(stderr);
        return 2;
    }
    const char *cmd = argv[optind];
    int nargs = argc - optind - 1;
    int want = !strcmp(cmd, "drop") ? 2 : 0;
    if (strcmp(cmd, "ping") && strcmp(cmd, "stats") && strcmp(cmd, "sessions") &&
        strcmp(cmd, "drop") && strcmp(cmd, "config")) {
        fprintf(stderr, "ratctl: unknown command '%s' (ping, stats, sessions, drop, config)\n", cmd);
        return 2;
    }
    if (nargs != want) {
        fprintf(stderr, "ratctl: %s takes %s\n", cmd, want ? "two arguments (a session id and its token)" : "no argument");
        return 2;
    }
    if (!ep[0]) { /* the daemon's own default (daemon/ratd_config.c) */
        if (ra_client_default_endpoint(ep, sizeof ep) != RA_OK) {
            fprintf(stderr, "ratctl: no default endpoint (set --endpoint or RATD_ENDPOINT)\n");
            return 2;
        }
    }
    ra_client_opts co;
    ra_client_opts_default(&co);
    co.timeout_ms = timeout;
    ra_client *c = NULL;
    if (ra_client_open(&c, ep, &co) != RA_OK) {
        fprintf(stderr, "ratctl: cannot use endpoint '%s' (expected ipc:///path or tcp://host:port)\n",
                ep);
        return 2;
    }
    int rc;
    if (!strcmp(cmd, "ping"))
        rc = cmd_ping(c);
    else if (!strcmp(cmd, "stats"))
        rc = cmd_stats(c);
    else if (!strcmp(cmd, "sessions"))
        rc = cmd_sessions(c);
    else if (!strcmp(cmd, "drop"))
        rc = cmd_drop(c, argv[optind + 1], argv[optind + 2]);
    else
        rc = cmd_config(c);
    ra_client_close(c);
    return rc;
}
