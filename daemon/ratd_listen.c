/* The listener of ratd: the listening socket, who may reach it, and how many may be
 * connected at once.
 *
 * ratd makes the listening socket itself (ipc:// or tcp://) and lends ZeroMQ a
 * duplicate of it (ZMQ_USE_FD), for two reasons. The address is ours: an ipc:// socket
 * file is created under umask 0177 and then given --socket-mode, a tcp:// address is
 * bound exactly as written (ZeroMQ's "source;address" form is never parsed) and the
 * address actually bound is checked against the transport policy before anything is
 * served. And the accepting can be paused: libzmq 4.3 aborts the whole process when
 * accept(2) on an ipc:// listener fails with EMFILE (an assertion in ipc_listener.cpp),
 * so ratd must never let the descriptors run out. It counts connections through the
 * ROUTER's monitor (ZMQ_EVENT_ACCEPTED / DISCONNECTED, keyed by descriptor) and, at
 * --max-clients (by default RLIMIT_NOFILE less a margin for its own descriptors and for
 * the monitor's lag), points the descriptor ZeroMQ polls at an idle listening socket
 * of its own (dup2): ZeroMQ's accept then finds nothing (EAGAIN, which it handles),
 * while the I/O thread accepts and closes the connections waiting on the real socket
 * (with a spare descriptor for the case EMFILE happens anyway). Connected clients are
 * served as before; new ones are refused (closed, ZeroMQ clients retry by themselves)
 * until the count falls below the limit, when the real socket is pointed back. */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>
#include <zmq.h>

#include "ra_log.h"
#include "ratd_internal.h"

/* Descriptors kept for the daemon itself (log, eventfd, ZeroMQ's mailboxes and poller,
 * the monitor, hwloc, OpenMP, the listener's own) and for the connections ZeroMQ
 * accepts before the monitor's event reaches the I/O thread. */
#define FD_RESERVE_MIN 64

/* An ipc:// path that a live process still accepts on belongs to another daemon:
 * refuse to steal it. A stale file (no listener) is removed. */
static ra_status check_ipc_path(const char *path, char *err, size_t errlen)
{
    struct stat sb;
    if (lstat(path, &sb) != 0)
        return RA_OK;
    if (!S_ISSOCK(sb.st_mode)) {
        snprintf(err, errlen,
                 "%s exists and is not a socket; remove it or choose another "
                 "--endpoint",
                 path);
        return RA_EEXIST;
    }
    struct sockaddr_un a;
    memset(&a, 0, sizeof a);
    a.sun_family = AF_UNIX;
    strcpy(a.sun_path, path); /* length checked by the caller */
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd >= 0) {
        int live = connect(fd, (struct sockaddr *)&a, sizeof a) == 0;
        close(fd);
        if (live) {
            snprintf(err, errlen,
                     "%s is in use by another running ratd; stop it or choose another "
                     "--endpoint",
                     path);
            return RA_EEXIST;
        }
    }
    unlink(path);
    return RA_OK;
}

static ra_status ipc_socket(ratd_server *s, const char *path, char *err, size_t errlen)
{
    struct sockaddr_un a;
    memset(&a, 0, sizeof a);
    a.sun_family = AF_UNIX;
    if (strlen(path) >= sizeof a.sun_path) {
        snprintf(err, errlen, "ipc path %s is longer than %zu bytes", path, sizeof a.sun_path - 1);
        return RA_EINVAL;
    }
    strcpy(a.sun_path, path);
    /* a directory that anyone may write without the sticky bit lets anyone replace the
     * socket file: refuse it (/tmp itself is sticky) */
    char dir[sizeof a.sun_path];
    snprintf(dir, sizeof dir, "%s", path);
    char *slash = strrchr(dir, '/');
    if (slash)
        *(slash == dir ? slash + 1 : slash) = 0;
    struct stat db;
    if (slash && stat(dir, &db) == 0 && (db.st_mode & S_IWOTH) && !(db.st_mode & S_ISVTX)) {
        snprintf(err, errlen,
                 "the directory of %s (%s) is writable by everyone and not sticky: anyone "
                 "could replace the socket; choose a private directory",
                 path, dir);
        return RA_EINVAL;
    }
    ra_status st = check_ipc_path(path, err, errlen);
    if (st != RA_OK)
        return st;
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0) {
        snprintf(err, errlen, "socket: %s", strerror(errno));
        return RA_EIO;
    }
    mode_t old = umask(0177); /* the file is born 0600, never wider */
    int rc = bind(fd, (struct sockaddr *)&a, sizeof a);
    int e = errno;
    umask(old);
    if (rc != 0) {
        close(fd);
        snprintf(err, errlen, "cannot bind %s: %s", path, strerror(e));
        return RA_EIO;
    }
    snprintf(s->ipc_path, sizeof s->ipc_path, "%s", path);
    if (chmod(path, (mode_t)s->cfg.socket_mode) != 0 || listen(fd, 256) != 0) {
        snprintf(err, errlen, "%s: %s", path, strerror(errno));
        close(fd);
        return RA_EIO;
    }
    s->listen_fd = fd;
    return RA_OK;
}

static ra_status tcp_socket(ratd_server *s, const char *ep, char *err, size_t errlen)
{
    char host[256], port[16];
    const char *h = ep + 6, *colon = strrchr(h, ':');
    size_t n = colon ? (size_t)(colon - h) : 0;
    if (!colon || n == 0 || n >= sizeof host || strlen(colon + 1) >= sizeof port) {
        snprintf(err, errlen, "endpoint %s: expected tcp://host:port", ep);
        return RA_EINVAL;
    }
    if (h[0] == '[' && h[n - 1] == ']') {
        h++;
        n -= 2;
    }
    memcpy(host, h, n);
    host[n] = 0;
    snprintf(port, sizeof port, "%s", colon + 1);
    const char *node = host;
    if (!strcmp(host, "*"))
        node = "0.0.0.0"; /* ZeroMQ's "every interface" */
    else if (!strcmp(host, "lo"))
        node = "127.0.0.1";
    struct addrinfo hints, *ai = NULL;
    memset(&hints, 0, sizeof hints);
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    hints.ai_flags = AI_PASSIVE | AI_NUMERICSERV;
    int gr = getaddrinfo(node, port, &hints, &ai);
    if (gr != 0 || !ai) {
        snprintf(err, errlen,
                 "endpoint %s: cannot resolve '%s' port '%s' (%s); give a numeric address "
                 "(tcp://127.0.0.1:5555, tcp://[::1]:5555) or localhost",
                 ep, host, port, gai_strerror(gr));
        return RA_EINVAL;
    }
    int fd = socket(ai->ai_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    int one = 1;
    if (fd >= 0)
        setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    if (fd < 0 || bind(fd, ai->ai_addr, ai->ai_addrlen) != 0 || listen(fd, 256) != 0) {
        snprintf(err, errlen, "cannot bind %s: %s", ep, strerror(errno));
        if (fd >= 0)
            close(fd);
        freeaddrinfo(ai);
        return RA_EIO;
    }
    freeaddrinfo(ai);
    s->listen_fd = fd;
    return RA_OK;
}

/* The descriptor budget: the soft RLIMIT_NOFILE is raised to the hard one, and the
 * connection limit is that less the reserve. */
static ra_status fd_budget(ratd_server *s, char *err, size_t errlen)
{
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) != 0) {
        snprintf(err, errlen, "getrlimit(RLIMIT_NOFILE): %s", strerror(errno));
        return RA_EIO;
    }
    if (rl.rlim_cur < rl.rlim_max) {
        rlim_t want = rl.rlim_max > (1u << 20) ? (1u << 20) : rl.rlim_max;
        if (want > rl.rlim_cur) {
            struct rlimit up = {want, rl.rlim_max};
            if (setrlimit(RLIMIT_NOFILE, &up) == 0)
                rl.rlim_cur = want;
        }
    }
    long nofile = rl.rlim_cur > (1u << 20) ? (1L << 20) : (long)rl.rlim_cur;
    /* a quarter of the limit for the monitor's lag: a burst of connections keeps ZeroMQ's
     * I/O thread accepting while ours, on a loaded host, is slow to count them (an
     * eighth was overrun once: 1,100 connections at once under 1024 on two busy cores) */
    long reserve = FD_RESERVE_MIN + nofile / 4;
    long max = s->cfg.max_clients;
    if (max == 0) {
        max = nofile - reserve;
        if (max < 1) {
            snprintf(err, errlen,
                     "RLIMIT_NOFILE is %ld descriptors; ratd needs more than %ld to serve a "
                     "client (raise ulimit -n)",
                     nofile, reserve);
            return RA_EINVAL;
        }
    } else if (max > nofile - FD_RESERVE_MIN) {
        snprintf(err, errlen,
                 "--max-clients %ld needs %ld descriptors, but RLIMIT_NOFILE is %ld: raise "
                 "ulimit -n or lower --max-clients (at most %ld here)",
                 max, max + FD_RESERVE_MIN, nofile, nofile - FD_RESERVE_MIN);
        return RA_EINVAL;
    }
    s->max_clients = (int)max;
    s->conn_fds_cap = (int)nofile;
    s->conn_fds = calloc((size_t)nofile / 8 + 1, 1);
    if (!s->conn_fds) {
        snprintf(err, errlen, "out of memory");
        return RA_ENOMEM;
    }
    RA_INFO("up to %d clients at once (RLIMIT_NOFILE %ld)", s->max_clients, nofile);
    return RA_OK;
}

/* The address a socket is bound to, as ZeroMQ would write it. */
static void sock_name(int fd, char *buf, size_t len)
{
    struct sockaddr_storage ss;
    socklen_t sl = sizeof ss;
    char a[INET6_ADDRSTRLEN] = "?";
    int port = 0;
    if (getsockname(fd, (struct sockaddr *)&ss, &sl) == 0) {
        if (ss.ss_family == AF_INET) {
            struct sockaddr_in *in = (struct sockaddr_in *)&ss;
            inet_ntop(AF_INET, &in->sin_addr, a, sizeof a);
            port = ntohs(in->sin_port);
            snprintf(buf, len, "tcp://%s:%d", a, port);
            return;
        }
        if (ss.ss_family == AF_INET6) {
            struct sockaddr_in6 *in = (struct sockaddr_in6 *)&ss;
            inet_ntop(AF_INET6, &in->sin6_addr, a, sizeof a);
            port = ntohs(in->sin6_port);
        }
    }
    snprintf(buf, len, "tcp://[%s]:%d", a, port);
}

ra_status ratd_listen_bind(ratd_server *s, char *err, size_t errlen)
{
    const ratd_config *cfg = &s->cfg;
    ra_status st = fd_budget(s, err, errlen);
    if (st != RA_OK)
        return st;
    int maxsock = 64, linger = 1000, hwm = 64, hs = 10000, one = 1;
    zmq_ctx_set(s->ctx, ZMQ_MAX_SOCKETS, maxsock);
    /* Frames a little over --max-frame-bytes still arrive and get an RA_ETOOBIG reply;
     * beyond twice that, or beyond the memory limit (nothing that large can be stored),
     * the transport drops the connection before buffering them. ZeroMQ applies the
     * bound to each frame. */
    uint64_t cap = cfg->max_frame_bytes > (uint64_t)INT64_MAX / 4
                       ? (uint64_t)INT64_MAX / 2
                       : 2 * cfg->max_frame_bytes + RA_PROTO_MAX_HEADER_BYTES;
    if (cfg->mem_limit && cfg->mem_limit + RA_PROTO_MAX_HEADER_BYTES < cap)
        cap = cfg->mem_limit + RA_PROTO_MAX_HEADER_BYTES;
    int64_t maxmsg = (int64_t)cap;
    zmq_setsockopt(s->sock, ZMQ_ROUTER_MANDATORY, &one, sizeof one);
    zmq_setsockopt(s->sock, ZMQ_LINGER, &linger, sizeof linger);
    zmq_setsockopt(s->sock, ZMQ_RCVHWM, &hwm, sizeof hwm);
    zmq_setsockopt(s->sock, ZMQ_HANDSHAKE_IVL, &hs, sizeof hs);
    zmq_setsockopt(s->sock, ZMQ_MAXMSGSIZE, &maxmsg, sizeof maxmsg);
    RA_INFO("frames over %lld bytes end the sender's connection (ZMQ_MAXMSGSIZE)",
            (long long)maxmsg);
    /* the monitor first, so that no connection goes uncounted */
    if (zmq_socket_monitor(s->sock, "inproc://ratd-monitor",
                           ZMQ_EVENT_ACCEPTED | ZMQ_EVENT_DISCONNECTED) != 0 ||
        !(s->mon = zmq_socket(s->ctx, ZMQ_PAIR))) {
        snprintf(err, errlen, "zmq monitor: %s", zmq_strerror(errno));
        return RA_EIO;
    }
    int zero = 0;
    zmq_setsockopt(s->mon, ZMQ_RCVHWM, &zero, sizeof zero); /* never lose an event */
    zmq_setsockopt(s->mon, ZMQ_LINGER, &zero, sizeof zero);
    if (zmq_connect(s->mon, "inproc://ratd-monitor") != 0) {
        snprintf(err, errlen, "zmq monitor: %s", zmq_strerror(errno));
        return RA_EIO;
    }
    int ipc = !strncmp(cfg->endpoint, "ipc://", 6);
    st = ipc ? ipc_socket(s, cfg->endpoint + 6, err, errlen)
             : tcp_socket(s, cfg->endpoint, err, errlen);
    if (st != RA_OK)
        return st;
    if (!ipc) { /* the policy on what was really bound, before anyone is served */
        char name[128];
        sock_name(s->listen_fd, name, sizeof name);
        if ((st = ratd_config_check_bound(cfg, name, err, errlen)) != RA_OK)
            return st;
    }
    /* the idle socket that stands in while accepting is paused, and the spare */
    struct sockaddr_un an = {.sun_family = AF_UNIX};
    s->idle_fd = socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (s->idle_fd < 0 || bind(s->idle_fd, (struct sockaddr *)&an, sizeof(sa_family_t)) != 0 ||
        listen(s->idle_fd, 1) != 0) {
        snprintf(err, errlen, "idle listener: %s", strerror(errno));
        return RA_EIO;
    }
    s->spare_fd = open("/dev/null", O_RDONLY | O_CLOEXEC);
    s->zmq_fd = fcntl(s->listen_fd, F_DUPFD_CLOEXEC, 0);
    if (s->zmq_fd < 0 || s->spare_fd < 0) {
        snprintf(err, errlen, "dup: %s", strerror(errno));
        return RA_EIO;
    }
    zmq_setsockopt(s->sock, ZMQ_USE_FD, &s->zmq_fd, sizeof s->zmq_fd);
    if (zmq_bind(s->sock, cfg->endpoint) != 0) {
        snprintf(err, errlen, "cannot bind %s: %s", cfg->endpoint, zmq_strerror(errno));
        return RA_EIO;
    }
    s->zmq_fd_lent = 1; /* ZeroMQ closes it */
    size_t bl = sizeof s->bound;
    if (zmq_getsockopt(s->sock, ZMQ_LAST_ENDPOINT, s->bound, &bl) != 0)
        snprintf(s->bound, sizeof s->bound, "%s", cfg->endpoint);
    /* ZeroMQ's own reading of the address: the same policy once more */
    if ((st = ratd_config_check_bound(cfg, s->bound, err, errlen)) != RA_OK)
        return st;
    return RA_OK;
}

/* Accepts and closes the connections waiting while paused. */
static void refuse_waiting(ratd_server *s)
{
    for (int i = 0; i < 256; i++) {
        int fd = accept4(s->listen_fd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (fd >= 0) {
            close(fd);
            continue;
        }
        if ((errno == EMFILE || errno == ENFILE) && s->spare_fd >= 0) {
            close(s->spare_fd); /* one descriptor to accept and close with */
            fd = accept4(s->listen_fd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
            if (fd >= 0)
                close(fd);
            s->spare_fd = open("/dev/null", O_RDONLY | O_CLOEXEC);
            if (fd >= 0)
                continue;
        }
        return; /* EAGAIN: none left */
    }
}

static void set_paused(ratd_server *s, int paused)
{
    if (s->paused == paused || s->zmq_fd < 0)
        return;
    if (dup2(paused ? s->idle_fd : s->listen_fd, s->zmq_fd) < 0) {
        RA_ERROR("listener: dup2: %s", strerror(errno));
        return;
    }
    s->paused = paused;
    if (paused) {
        s->listener_pauses++;
        RA_WARN("%d clients are connected, the limit (--max-clients %d, from the descriptor "
                "budget): new connections are refused until some close",
                s->clients, s->max_clients);
    } else {
        RA_INFO("%d clients are connected: accepting new connections again", s->clients);
    }
}

void ratd_listen_events(ratd_server *s)
{
    for (;;) {
        zmq_msg_t ev, addr;
        zmq_msg_init(&ev);
        if (zmq_msg_recv(&ev, s->mon, ZMQ_DONTWAIT) < 0) {
            zmq_msg_close(&ev);
            break;
        }
        uint16_t event = 0;
        uint32_t value = 0;
        if (zmq_msg_size(&ev) >= 6) {
            memcpy(&event, zmq_msg_data(&ev), 2);
            memcpy(&value, (char *)zmq_msg_data(&ev) + 2, 4);
        }
        int more = zmq_msg_more(&ev);
        zmq_msg_close(&ev);
        while (more) { /* the endpoint frame */
            zmq_msg_init(&addr);
            if (zmq_msg_recv(&addr, s->mon, 0) < 0) {
                zmq_msg_close(&addr);
                break;
            }
            more = zmq_msg_more(&addr);
            zmq_msg_close(&addr);
        }
        int fd = (int)value, known = fd >= 0 && fd < s->conn_fds_cap;
        uint8_t bit = known ? (uint8_t)(1u << (fd & 7)) : 0;
        if (event == ZMQ_EVENT_ACCEPTED) {
            if (!known || !(s->conn_fds[fd >> 3] & bit))
                s->clients++;
            if (known)
                s->conn_fds[fd >> 3] |= bit;
            RA_DEBUG("connection accepted (descriptor %d): %d clients", fd, s->clients);
        } else if (event == ZMQ_EVENT_DISCONNECTED) {
            if (known && (s->conn_fds[fd >> 3] & bit)) {
                s->conn_fds[fd >> 3] &= (uint8_t)~bit;
                s->clients--;
            } else if (!known && s->clients > 0) {
                s->clients--;
            }
            RA_DEBUG("connection closed (descriptor %d): %d clients", fd, s->clients);
        }
    }
    int low = s->max_clients - (s->max_clients / 16 > 1 ? s->max_clients / 16 : 1);
    if (!s->paused && s->clients >= s->max_clients)
        set_paused(s, 1);
    else if (s->paused && s->clients <= low)
        set_paused(s, 0);
    if (s->paused)
        refuse_waiting(s);
}

void ratd_listen_close(ratd_server *s)
{
    set_paused(s, 0); /* ZeroMQ removes the descriptor from its poller as it added it */
    if (s->sock)
        zmq_socket_monitor(s->sock, NULL, 0);
    if (s->mon) {
        zmq_close(s->mon);
        s->mon = NULL;
    }
}

void ratd_listen_release(ratd_server *s)
{
    if (s->listen_fd >= 0)
        close(s->listen_fd);
    s->listen_fd = -1;
    if (s->idle_fd >= 0)
        close(s->idle_fd);
    if (s->spare_fd >= 0)
        close(s->spare_fd);
    s->idle_fd = s->spare_fd = -1;
    if (s->zmq_fd >= 0 && !s->zmq_fd_lent)
        close(s->zmq_fd);
    s->zmq_fd = -1;
    free(s->conn_fds);
    s->conn_fds = NULL;
}
