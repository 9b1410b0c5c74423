/* The option table of ratd and its four sources (defaults, config file, environment,
 * flags). Every option lives in exactly one row below; parsing, bounds checks and
 * --help all read that row, so adding an option is one line. */
#include "ratd_config.h"

#include <arpa/inet.h>
#include <ctype.h>
#include <errno.h>
#include <limits.h>
#include <netinet/in.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

typedef enum { OPT_INT, OPT_SIZE, OPT_STR, OPT_BOOL, OPT_OCTAL } opt_type;

typedef struct ratd_option {
    const char *name;
    opt_type type;
    size_t offset;
    size_t size; /* OPT_STR: buffer size */
    int64_t min, max;
    const char *def;
    const char *help;
} ratd_option;

#define OFF(f) offsetof(ratd_config, f)
#define SZ(f) sizeof(((ratd_config *)0)->f)
#define GiB (1024LL * 1024 * 1024)

static const ratd_option g_options[] = {
    {"endpoint", OPT_STR, OFF(endpoint), SZ(endpoint), 0, 0, "",
     "ZeroMQ endpoint to bind: ipc:///path or tcp://host:port (default "
     "ipc://$XDG_RUNTIME_DIR/ratd/ratd.sock, else ipc:///tmp/ratd-<uid>/ratd.sock, in a "
     "directory created 0700 and checked)"},
    {"allow-remote", OPT_BOOL, OFF(allow_remote), 0, 0, 1, "0",
     "allow a tcp:// bind to a non-loopback address (needs CURVE: --curve-secret-file and "
     "--curve-clients)"},
    {"allow-plain-loopback", OPT_BOOL, OFF(allow_plain_loopback), 0, 0, 1, "0",
     "allow tcp:// on a loopback address without CURVE (any local user can connect)"},
    {"socket-mode", OPT_OCTAL, OFF(socket_mode), 0, 0600, 0777, "0600",
     "mode of the ipc:// socket file, octal; whoever may write it may connect"},
    {"curve-secret-file", OPT_STR, OFF(curve_secret_file), SZ(curve_secret_file), 0, 0, "",
     "the server's CURVE secret key (Z85, from --curve-keygen); the file must be ours and "
     "mode 0600 or stricter; turns CURVE on"},
    {"curve-clients", OPT_STR, OFF(curve_clients), SZ(curve_clients), 0, 0, "",
     "authorised client public keys (Z85): a file of one key per line, or a directory of "
     "such files; read at start, checked for every connection"},
    {"curve-keygen", OPT_BOOL, OFF(curve_keygen), 0, 0, 1, "0",
     "print a new CURVE key pair (public and secret, Z85) and exit"},
    {"max-clients", OPT_INT, OFF(max_clients), 0, 0, 1 << 20, "0",
     "connections at once (0: from RLIMIT_NOFILE, keeping a margin of descriptors); beyond "
     "it ratd stops accepting until connections close"},
    {"session-ttl", OPT_INT, OFF(session_ttl), 0, 0, 30 * 86400, "0",
     "drop a session unused for this many seconds (0: never)"},
    {"max-peer-reply-bytes", OPT_SIZE, OFF(max_peer_reply_bytes), 0, 1 << 20, 64 * GiB, "256M",
     "reply bytes one client may leave unread; its requests beyond it get RA_EBUSY"},
    {"workers", OPT_INT, OFF(workers), 0, 0, 1024, "0",
     "attention worker threads (0: one per CPU of the binding set)"},
    {"numa-node", OPT_INT, OFF(numa_node), 0, -1, 4096, "-1",
     "bind workers to the cores of this NUMA node and allocate memory there (-1: off)"},
    {"cpuset", OPT_STR, OFF(cpuset), SZ(cpuset), 0, 0, "",
     "bind workers to these CPUs, a list such as 0-7,16 (overrides numa-node's cores)"},
    {"pin-workers", OPT_BOOL, OFF(pin_workers), 0, 0, 1, "1",
     "bind each worker to one CPU of the binding set (one per core first), so that the "
     "scheduler cannot stack two workers of one Attend on a core (0: workers move freely; "
     "a binding the system refuses is logged and the workers stay free)"},
    {"mem-limit", OPT_SIZE, OFF(mem_limit), 0, 0, INT64_MAX, "0",
     "daemon-wide memory budget for K, V and indexes, e.g. 64G (0: unlimited); requests "
     "beyond it fail with RA_ENOMEM"},
    {"max-frame-bytes", OPT_SIZE, OFF(max_frame_bytes), 0, 1024, 64 * GiB, "1G",
     "largest tensor frame accepted; larger ones get RA_ETOOBIG (beyond twice this, the "
     "transport drops the connection)"},
    {"max-message-bytes", OPT_SIZE, OFF(max_message_bytes), 0, 1024, 256 * GiB, "2G",
     "largest sum of tensor frames in one request"},
    {"max-sessions", OPT_INT, OFF(max_sessions), 0, 1, 65536, "64", "live sessions at most"},
    {"max-layers", OPT_INT, OFF(max_layers), 0, 1, 4096, "512", "layers per session at most"},
    {"max-heads", OPT_INT, OFF(max_heads), 0, 1, 4096, "256", "query heads per session at most"},
    {"max-dim", OPT_INT, OFF(max_dim), 0, 1, 16384, "1024", "head dimension at most"},
    {"max-top-k", OPT_INT, OFF(max_top_k), 0, 1, 1 << 24, "8192", "top_k of an Attend at most"},
    {"max-tokens", OPT_INT, OFF(max_tokens), 0, 1, 1 << 28, "1048576",
     "tokens per Offload/Append message at most"},
    {"max-queries", OPT_INT, OFF(max_queries), 0, 0, 1 << 24, "65536",
     "training queries per query head in one Offload at most"},
    {"max-queue", OPT_INT, OFF(max_queue), 0, 1, 65536, "1024",
     "Offload/Append/Attend requests queued or running at most; one more gets RA_EBUSY at "
     "once"},
    /* 1024 keeps a batched Attend's header (an id and a token per session) under the
     * 64 KiB a request header may have */
    {"max-batch", OPT_INT, OFF(max_batch), 0, 1, 1024, "256",
     "sessions in one batched Attend at most"},
    /* the index's own bound (index/opts.c, "threads"); ratd_server_create checks it */
    {"index-threads", OPT_INT, OFF(index_threads), 0, 0, 256, "0",
     "threads of a background index build (0: every core)"},
    {"spin-us", OPT_INT, OFF(spin_us), 0, 0, 100000, "0",
     "microseconds an idle worker spins for the next task before it sleeps, and the I/O "
     "thread polls for finished jobs while requests are in flight (0: at once)"},
    {"timeline", OPT_INT, OFF(timeline), 0, 0, 1000000, "0",
     "log every N-th pooled request's timeline (arrival, tasks started and ended, reply) at "
     "warn level, a study aid (0: off)"},
    {"send-timeout-ms", OPT_INT, OFF(send_timeout_ms), 0, 1, 600000, "2000",
     "unused: replies never wait (one to a client whose queue is full is dropped and "
     "counted); kept so that older configurations still load"},
    {"log-level", OPT_STR, OFF(log_level), SZ(log_level), 0, 0, "info",
     "error, warn, info or debug"},
    {"config", OPT_STR, OFF(config_file), SZ(config_file), 0, 0, "",
     "read options from this file first: lines \"name value\" (or name=value), # comments"},
    {"log-file", OPT_STR, OFF(log_file), SZ(log_file), 0, 0, "",
     "append log lines to this file instead of stderr (refused at start when it cannot be "
     "opened for writing)"},
    {"metrics", OPT_STR, OFF(metrics), SZ(metrics), 0, 0, "",
     "serve Prometheus metrics over HTTP at tcp://host:port (GET /metrics), loopback only "
     "unless metrics-allow-remote; empty: off"},
    {"metrics-allow-remote", OPT_BOOL, OFF(metrics_allow_remote), 0, 0, 1, "0",
     "let --metrics listen on a non-loopback address: plain HTTP without authentication "
     "(session ids, sizes and latencies, never tokens or data)"},
};
#define N_OPTIONS (sizeof g_options / sizeof g_options[0])

static const ratd_option *find(const char *name)
{
    for (size_t i = 0; i < N_OPTIONS; i++)
        if (strcmp(g_options[i].name, name) == 0)
            return &g_options[i];
    return NULL;
}

static int parse_size(const char *s, int64_t *out)
{
    char *end;
    errno = 0;
    double x = strtod(s, &end);
    if (end == s || errno || x < 0)
        return -1;
    double mul = 1;
    switch (toupper((unsigned char)*end)) {
    case 0:
        break;
    case 'K':
        mul = 1024.0;
        end++;
        break;
    case 'M':
        mul = 1024.0 * 1024;
        end++;
        break;
    case 'G':
        mul = 1024.0 * 1024 * 1024;
        end++;
        break;
    case 'T':
        mul = 1024.0 * 1024 * 1024 * 1024;
        end++;
        break;
    default:
        return -1;
    }
    if (toupper((unsigned char)*end) == 'B' || toupper((unsigned char)*end) == 'I') {
        end++;
        if (toupper((unsigned char)*end) == 'B')
            end++;
    }
    if (*end)
        return -1;
    x *= mul;
    if (x > 9.2e18)
        return -1;
    *out = (int64_t)x;
    return 0;
}

ra_status ratd_config_set(ratd_config *c, const char *name, const char *value, char *err,
                          size_t errlen)
{
    const ratd_option *o = find(name);
    if (!o) {
        snprintf(err, errlen, "unknown option '%s' (see --help)", name);
        return RA_EINVAL;
    }
    char *field = (char *)c + o->offset;
    int64_t x = 0;
    switch (o->type) {
    case OPT_STR:
        if (strlen(value) >= o->size) {
            snprintf(err, errlen, "option %s: value longer than %zu characters", name, o->size - 1);
            return RA_EINVAL;
        }
        strcpy(field, value);
        return RA_OK;
    case OPT_BOOL:
        if (!strcmp(value, "1") || !strcasecmp(value, "yes") || !strcasecmp(value, "true") ||
            !strcasecmp(value, "on"))
            x = 1;
        else if (!strcmp(value, "0") || !strcasecmp(value, "no") || !strcasecmp(value, "false") ||
                 !strcasecmp(value, "off"))
            x = 0;
        else {
            snprintf(err, errlen, "option %s: '%s' is not a boolean (yes/no)", name, value);
            return RA_EINVAL;
        }
        *(int *)field = (int)x;
        return RA_OK;
    case OPT_INT: {
        char *end;
        errno = 0;
        long long v = strtoll(value, &end, 10);
        if (end == value || *end || errno) {
            snprintf(err, errlen, "option %s: '%s' is not an integer", name, value);
            return RA_EINVAL;
        }
        x = v;
        break;
    }
    case OPT_OCTAL: {
        char *end;
        errno = 0;
        long v = strtol(value, &end, 8);
        if (end == value || *end || errno) {
            snprintf(err, errlen, "option %s: '%s' is not an octal mode such as 0600", name, value);
            return RA_EINVAL;
        }
        x = v;
        if (x < o->min || x > o->max) {
            snprintf(err, errlen, "option %s: %04llo is outside [%04llo, %04llo]", name,
                     (long long)x, (long long)o->min, (long long)o->max);
            return RA_EINVAL;
        }
        break;
    }
    case OPT_SIZE:
        if (parse_size(value, &x) < 0) {
            snprintf(err, errlen, "option %s: '%s' is not a size (e.g. 4096, 512M, 8G)", name,
                     value);
            return RA_EINVAL;
        }
        break;
    }
    if (x < o->min || x > o->max) {
        snprintf(err, errlen, "option %s: %lld is outside [%lld, %lld]", name, (long long)x,
                 (long long)o->min, (long long)o->max);
        return RA_EINVAL;
    }
    if (o->type == OPT_INT || o->type == OPT_OCTAL)
        *(int *)field = (int)x;
    else
        *(uint64_t *)field = (uint64_t)x;
    return RA_OK;
}

void ratd_config_defaults(ratd_config *c)
{
    memset(c, 0, sizeof *c);
    char err[256];
    for (size_t i = 0; i < N_OPTIONS; i++) {
        ra_status st = ratd_config_set(c, g_options[i].name, g_options[i].def, err, sizeof err);
        (void)st;
        /* a default outside its own bounds is a bug in the table */
        if (st != RA_OK) {
            fprintf(stderr, "ratd: bad default: %s\n", err);
            abort();
        }
    }
}

ra_status ratd_config_file(ratd_config *c, const char *path, char *err, size_t errlen)
{
    FILE *f = fopen(path, "r");
    if (!f) {
        snprintf(err, errlen, "cannot open config file %s: %s", path, strerror(errno));
        return RA_EIO;
    }
    char line[1024];
    int lineno = 0;
    ra_status st = RA_OK;
    while (fgets(line, sizeof line, f)) {
        lineno++;
        char *p = line;
        char *hash = strchr(p, '#');
        if (hash)
            *hash = 0;
        while (isspace((unsigned char)*p))
            p++;
        if (!*p)
            continue;
        char *name = p; /* "name value", "name=value" or "name = value" */
        while (*p && !isspace((unsigned char)*p) && *p != '=')
            p++;
        int eq = *p == '=';
        if (*p)
            *p++ = 0;
        while (isspace((unsigned char)*p) || (!eq && *p == '=' && (eq = 1)))
            p++;
        char *val = p;
        size_t n = strlen(val);
        while (n && isspace((unsigned char)val[n - 1]))
            val[--n] = 0;
        if (!strcmp(name, "config"))
            continue;
        char e2[256];
        st = ratd_config_set(c, name, val, e2, sizeof e2);
        if (st != RA_OK) {
            snprintf(err, errlen, "%s:%d: %s", path, lineno, e2);
            break;
        }
    }
    fclose(f);
    return st;
}

ra_status ratd_config_env(ratd_config *c, char *err, size_t errlen)
{
    for (size_t i = 0; i < N_OPTIONS; i++) {
        char var[64] = "RATD_";
        size_t j = 5;
        for (const char *s = g_options[i].name; *s && j < sizeof var - 1; s++)
            var[j++] = *s == '-' ? '_' : (char)toupper((unsigned char)*s);
        var[j] = 0;
        const char *v = getenv(var);
        if (!v || !strcmp(g_options[i].name, "config"))
            continue;
        char e2[256];
        ra_status st = ratd_config_set(c, g_options[i].name, v, e2, sizeof e2);
        if (st != RA_OK) {
            snprintf(err, errlen, "environment %s: %s", var, e2);
            return st;
        }
    }
    return RA_OK;
}

ra_status ratd_config_args(ratd_config *c, int argc, char **argv, int *help, int *version,
                           char *err, size_t errlen)
{
    *help = 0;
    *version = 0;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (!strcmp(a, "--help") || !strcmp(a, "-h")) {
            *help = 1;
            continue;
        }
        if (!strcmp(a, "--version")) {
            *version = 1;
            continue;
        }
        if (strncmp(a, "--", 2) != 0) {
            snprintf(err, errlen, "unexpected argument '%s' (options are --name value)", a);
            return RA_EINVAL;
        }
        char name[64];
        const char *eq = strchr(a + 2, '=');
        size_t nl = eq ? (size_t)(eq - a - 2) : strlen(a + 2);
        if (nl >= sizeof name) {
            snprintf(err, errlen, "unknown option '%s'", a);
            return RA_EINVAL;
        }
        memcpy(name, a + 2, nl);
        name[nl] = 0;
        const ratd_option *o = find(name);
        if (!o) {
            snprintf(err, errlen, "unknown option '--%s' (see --help)", name);
            return RA_EINVAL;
        }
        const char *val;
        if (eq)
            val = eq + 1;
        else if (o->type == OPT_BOOL && (i + 1 >= argc || strncmp(argv[i + 1], "--", 2) == 0))
            val = "1"; /* a bare boolean flag */
        else if (i + 1 < argc)
            val = argv[++i];
        else {
            snprintf(err, errlen, "option --%s needs a value", name);
            return RA_EINVAL;
        }
        ra_status st = ratd_config_set(c, name, val, err, errlen);
        if (st != RA_OK)
            return st;
    }
    return RA_OK;
}

ra_status ratd_config_load(ratd_config *c, int argc, char **argv, int *help, int *version,
                           char *err, size_t errlen)
{
    ratd_config_defaults(c);
    /* find --config first: the file ranks below env and flags */
    const char *file = getenv("RATD_CONFIG");
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--config") && i + 1 < argc)
            file = argv[i + 1];
        else if (!strncmp(argv[i], "--config=", 9))
            file = argv[i] + 9;
    }
    ra_status st;
    if (file && *file && (st = ratd_config_file(c, file, err, errlen)) != RA_OK)
        return st;
    if ((st = ratd_config_env(c, err, errlen)) != RA_OK)
        return st;
    return ratd_config_args(c, argc, argv, help, version, err, errlen);
}

void ratd_config_usage(FILE *f, const char *prog)
{
    fprintf(f,
            "usage: %s [--name value | --name=value]...\n\n"
            "ratd, the retrieval-attention daemon: stores the offloaded keys and values of a\n"
            "decoder's KV cache, indexes them per head, and answers partial attention over\n"
            "the retrieved top-k keys (output and log-sum-exp per query head).\n\n"
            "Options (each also from the environment as RATD_<NAME>, dashes as underscores,\n"
            "and from a --config file; flags win over env, env over file):\n",
            prog);
    for (size_t i = 0; i < N_OPTIONS; i++) {
        const ratd_option *o = &g_options[i];
        const char *arg = o->type == OPT_BOOL    ? ""
                          : o->type == OPT_STR   ? " STR"
                          : o->type == OPT_SIZE  ? " SIZE"
                          : o->type == OPT_OCTAL ? " MODE"
                                                 : " N";
        char head[64];
        snprintf(head, sizeof head, "--%s%s", o->name, arg);
        fprintf(f, "  %-26s %s", head, o->help);
        if (o->def[0])
            fprintf(f, " [default %s]", o->def);
        if (o->type == OPT_INT)
            fprintf(f, " [%lld..%lld]", (long long)o->min, (long long)o->max);
        fprintf(f, "\n");
    }
    fprintf(f, "  %-26s %s\n  %-26s %s\n  %-26s %s\n", "--help", "print this text and exit",
            "--version", "print the version and protocol version and exit", "--print-config",
            "print the effective configuration in config-file syntax and exit");
    fprintf(f, "\nThreads: one I/O thread owns the socket; --workers threads run the requests,\n"
               "several at once, in order per (session, layer); index builds run in their own\n"
               "threads at nice 19; a reaper thread frees dropped sessions once their builds\n"
               "end.\n"
               "SIGINT/SIGTERM: stop taking requests, answer those queued, cancel index builds,\n"
               "free every session, remove the ipc:// socket file, exit 0.\n");
}

static void size_str(uint64_t x, char *buf, size_t len)
{
    static const char suf[] = "TGMK";
    for (int i = 0; i < 4; i++) {
        uint64_t u = (uint64_t)1 << (10 * (4 - i));
        if (x && x % u == 0) {
            snprintf(buf, len, "%llu%c", (unsigned long long)(x / u), suf[i]);
            return;
        }
    }
    snprintf(buf, len, "%llu", (unsigned long long)x);
}

int ratd_config_value(const ratd_config *c, size_t i, const char **name, char *buf, size_t len)
{
    if (i >= N_OPTIONS)
        return 0;
    const ratd_option *o = &g_options[i];
    const char *field = (const char *)c + o->offset;
    *name = o->name;
    switch (o->type) {
    case OPT_STR:
        snprintf(buf, len, "%s", field);
        break;
    case OPT_BOOL:
        snprintf(buf, len, "%s", *(const int *)field ? "yes" : "no");
        break;
    case OPT_INT:
        snprintf(buf, len, "%d", *(const int *)field);
        break;
    case OPT_OCTAL:
        snprintf(buf, len, "%04o", (unsigned)*(const int *)field);
        break;
    case OPT_SIZE:
        size_str(*(const uint64_t *)field, buf, len);
        break;
    }
    return 1;
}

void ratd_config_print(FILE *f, const ratd_config *c)
{
    fprintf(f, "# ratd %s: effective configuration (defaults, config file, environment and "
               "flags merged)\n",
#ifdef RATD_VERSION
            RATD_VERSION
#else
            ""
#endif
    );
    const char *name;
    char val[600];
    for (size_t i = 0; ratd_config_value(c, i, &name, val, sizeof val); i++) {
        if (!strcmp(name, "config") || !strcmp(name, "curve-keygen"))
            continue; /* a file does not name itself; keygen is an action, not a setting */
        if (val[0])
            fprintf(f, "%s %s\n", name, val);
        else
            fprintf(f, "# %s (unset)\n", name);
    }
}

/* 1 for a numeric loopback address (127.0.0.0/8, ::1, ::ffff:127.x; brackets allowed)
 * or, unless numeric_only, the names localhost and lo. */
static int host_is_loopback(const char *host, int numeric_only)
{
    char h[256];
    size_t n = strlen(host);
    if (n >= sizeof h)
        return 0;
    if (n >= 2 && host[0] == '[' && host[n - 1] == ']') {
        memcpy(h, host + 1, n - 2);
        h[n - 2] = 0;
    } else {
        memcpy(h, host, n + 1);
    }
    if (!numeric_only && (!strcmp(h, "localhost") || !strcmp(h, "lo")))
        return 1;
    struct in_addr a4;
    struct in6_addr a6;
    if (inet_pton(AF_INET, h, &a4) == 1)
        return (ntohl(a4.s_addr) >> 24) == 127;
    if (inet_pton(AF_INET6, h, &a6) == 1) {
        if (IN6_IS_ADDR_LOOPBACK(&a6))
            return 1;
        return IN6_IS_ADDR_V4MAPPED(&a6) && a6.s6_addr[12] == 127;
    }
    return 0;
}

int ratd_tcp_split(const char *endpoint, char *host, size_t hlen, char *port, size_t plen)
{
    if (strncmp(endpoint, "tcp://", 6) != 0)
        return -1;
    const char *h = endpoint + 6;
    const char *colon = strrchr(h, ':');
    if (!colon || colon == h || (size_t)(colon - h) >= hlen)
        return -1;
    if (port) {
        if (!colon[1] || strlen(colon + 1) >= plen)
            return -1;
        snprintf(port, plen, "%s", colon + 1);
    }
    size_t n = (size_t)(colon - h);
    if (n > 2 && h[0] == '[' && h[n - 1] == ']') {
        h++;
        n -= 2;
    }
    memcpy(host, h, n);
    host[n] = 0;
    return 0;
}

int ratd_endpoint_is_loopback(const char *endpoint, int numeric_only)
{
    char host[256];
    if (ratd_tcp_split(endpoint, host, sizeof host, NULL, 0) < 0)
        return 0;
    return host_is_loopback(host, numeric_only);
}

ra_status ratd_private_dir(const char *dir, int create, char *err, size_t errlen)
{
    if (create && mkdir(dir, 0700) != 0 && errno != EEXIST) {
        snprintf(err, errlen, "cannot create the socket directory %s: %s", dir, strerror(errno));
        return RA_EIO;
    }
    struct stat sb;
    if (lstat(dir, &sb) != 0) {
        snprintf(err, errlen, "socket directory %s: %s", dir, strerror(errno));
        return RA_EIO;
    }
    if (S_ISLNK(sb.st_mode) || !S_ISDIR(sb.st_mode)) {
        snprintf(err, errlen,
                 "socket directory %s is %s, not a directory of ours; remove it or choose "
                 "another --endpoint",
                 dir, S_ISLNK(sb.st_mode) ? "a symbolic link" : "not a directory");
        return RA_EINVAL;
    }
    if (sb.st_uid != geteuid()) {
        snprintf(err, errlen,
                 "socket directory %s belongs to uid %u, not to this user (uid %u): refusing "
                 "to put the socket there; remove it or choose another --endpoint",
                 dir, (unsigned)sb.st_uid, (unsigned)geteuid());
        return RA_EINVAL;
    }
    if (sb.st_mode & 077) {
        snprintf(err, errlen,
                 "socket directory %s has mode %04o: others may reach it; make it private "
                 "(chmod 700 %s) or choose another --endpoint",
                 dir, (unsigned)(sb.st_mode & 07777), dir);
        return RA_EINVAL;
    }
    return RA_OK;
}

static ra_status tcp_policy(const ratd_config *c, const char *ep, int loopback, char *err,
                            size_t errlen)
{
    int curve = c->curve_secret_file[0] != 0;
    if (!loopback) {
        if (!c->allow_remote) {
            snprintf(err, errlen,
                     "endpoint %s binds a non-loopback address; this needs --allow-remote and "
                     "CURVE (--curve-secret-file, --curve-clients), or bind tcp://127.0.0.1:PORT",
                     ep);
            return RA_EINVAL;
        }
        if (!curve) {
            snprintf(err, errlen,
                     "endpoint %s binds a non-loopback address: remote clients must "
                     "authenticate with CURVE; give --curve-secret-file (ratd --curve-keygen "
                     "makes a key pair) and --curve-clients",
                     ep);
            return RA_EINVAL;
        }
    } else if (!curve && !c->allow_plain_loopback) {
        snprintf(err, errlen,
                 "endpoint %s: tcp:// without CURVE lets every local user connect; use an "
                 "ipc:// endpoint (its directory and socket file are private), CURVE "
                 "(--curve-secret-file, --curve-clients), or say --allow-plain-loopback",
                 ep);
        return RA_EINVAL;
    }
    return RA_OK;
}

ra_status ratd_config_check_bound(const ratd_config *c, const char *bound, char *err, size_t errlen)
{
    if (strncmp(bound, "tcp://", 6) != 0)
        return RA_OK;
    return tcp_policy(c, bound, ratd_endpoint_is_loopback(bound, 1), err, errlen);
}

ra_status ratd_config_check_endpoint(ratd_config *c, char *err, size_t errlen)
{
    ra_status st;
    if (!c->endpoint[0]) {
        char dir[400];
        const char *xdg = getenv("XDG_RUNTIME_DIR");
        if (xdg && *xdg && strlen(xdg) < 300 && access(xdg, W_OK) == 0)
            snprintf(dir, sizeof dir, "%s/ratd", xdg);
        else
            snprintf(dir, sizeof dir, "/tmp/ratd-%u", (unsigned)geteuid());
        if ((st = ratd_private_dir(dir, 1, err, errlen)) != RA_OK)
            return st;
        snprintf(c->endpoint, sizeof c->endpoint, "ipc://%s/ratd.sock", dir);
    }
    if (!c->curve_secret_file[0] && c->curve_clients[0]) {
        snprintf(err, errlen,
                 "--curve-clients needs --curve-secret-file (the server's own key); CURVE is "
                 "off without it");
        return RA_EINVAL;
    }
    if (c->curve_secret_file[0] && !c->curve_clients[0]) {
        snprintf(err, errlen,
                 "--curve-secret-file needs --curve-clients (the public keys that may "
                 "connect); without them every key would be accepted");
        return RA_EINVAL;
    }
    if (!strncmp(c->endpoint, "ipc://", 6)) {
        if (!c->endpoint[6]) {
            snprintf(err, errlen, "endpoint %s has no path", c->endpoint);
            return RA_EINVAL;
        }
        return RA_OK;
    }
    if (!strncmp(c->endpoint, "tcp://", 6)) {
        char host[256];
        if (strchr(c->endpoint, ';')) {
            snprintf(err, errlen,
                     "endpoint %s: ';' is ZeroMQ's source;address form, which would bind the "
                     "address after it; give one tcp://host:port",
                     c->endpoint);
            return RA_EINVAL;
        }
        if (ratd_tcp_split(c->endpoint, host, sizeof host, NULL, 0) < 0) {
            snprintf(err, errlen, "endpoint %s: expected tcp://host:port", c->endpoint);
            return RA_EINVAL;
        }
        return tcp_policy(c, c->endpoint, ratd_endpoint_is_loopback(c->endpoint, 0), err, errlen);
    }
    snprintf(err, errlen, "endpoint %s: only ipc:// and tcp:// are supported", c->endpoint);
    return RA_EINVAL;
}
