/* CURVE for ratd's tcp:// endpoints: the key pair (--curve-keygen), the server's secret
 * (--curve-secret-file, refused unless only its owner may read it), the public keys of
 * the clients that may connect (--curve-clients, a file or a directory of files), and
 * the ZAP handler (RFC 27) that ZeroMQ asks about every CURVE handshake: a REP socket on
 * inproc://zeromq.zap.01 served by its own thread, answering 200 for an authorised key
 * and 400 for any other, so that an unknown client's connection ends at its handshake.
 * Keys are Z85 text (40 characters); a line may be the bare key or "public KEY" (the
 * keygen output), lines starting with '#' are comments ('#' elsewhere belongs to Z85),
 * and "secret" lines in a clients file are skipped with a warning. */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>
#include <zmq.h>

#include "ra_log.h"
#include "ratd_internal.h"

#define KEY_BYTES 32
#define KEY_Z85 40

int ratd_curve_keygen(FILE *f)
{
    char pub[KEY_Z85 + 1], sec[KEY_Z85 + 1];
    if (zmq_curve_keypair(pub, sec) != 0) {
        fprintf(stderr,
                "ratd: cannot make a CURVE key pair: %s (is libzmq built with "
                "CURVE?)\n",
                zmq_strerror(errno));
        return 1;
    }
    fprintf(f,
            "# ratd CURVE key pair (Z85). The server reads a file like this one with\n"
            "# --curve-secret-file (mode 0600); clients get the public line. A client's\n"
            "# public line goes into the server's --curve-clients.\n"
            "public %s\nsecret %s\n",
            pub, sec);
    return 0;
}

/* Reads a small text file into buf; -1 with err. st: its stat. */
static int read_small(const char *path, char *buf, size_t len, struct stat *sb, char *err,
                      size_t errlen)
{
    int fd = open(path, O_RDONLY | O_CLOEXEC | O_NOFOLLOW);
    if (fd < 0 || fstat(fd, sb) != 0) {
        snprintf(err, errlen, "cannot read %s: %s", path, strerror(errno));
        if (fd >= 0)
            close(fd);
        return -1;
    }
    if (!S_ISREG(sb->st_mode) || sb->st_size >= (off_t)len) {
        snprintf(err, errlen, "%s is not a key file (a regular file under %zu bytes)", path, len);
        close(fd);
        return -1;
    }
    ssize_t n = read(fd, buf, len - 1);
    close(fd);
    if (n < 0) {
        snprintf(err, errlen, "cannot read %s: %s", path, strerror(errno));
        return -1;
    }
    buf[n] = 0;
    return 0;
}

/* The next key of a line: `kind` gets "public", "secret" or "" (a bare key). 0: none. */
static int line_key(char *line, const char **kind, char **key)
{
    while (*line == ' ' || *line == '\t')
        line++;
    if (*line == '#') /* a comment line; '#' inside a line is part of Z85 */
        return 0;
    char *save = NULL, *a = strtok_r(line, " \t\r", &save),
         *b = a ? strtok_r(NULL, " \t\r", &save) : NULL;
    if (!a)
        return 0;
    if (b) {
        *kind = a;
        *key = b;
    } else {
        *kind = "";
        *key = a;
    }
    return 1;
}

static int decode(const char *z85, uint8_t out[KEY_BYTES])
{
    return strlen(z85) == KEY_Z85 && zmq_z85_decode(out, z85) != NULL;
}

static ra_status load_secret(const char *path, uint8_t sec[KEY_BYTES], char *err, size_t errlen)
{
    char buf[4096];
    struct stat sb;
    if (read_small(path, buf, sizeof buf, &sb, err, errlen) < 0)
        return RA_EIO;
    if (sb.st_uid != geteuid() || (sb.st_mode & 077)) {
        snprintf(err, errlen,
                 "CURVE secret file %s has mode %04o and owner uid %u: it must belong to this "
                 "user (uid %u) and be readable by its owner only (chmod 600 %s)",
                 path, (unsigned)(sb.st_mode & 07777), (unsigned)sb.st_uid, (unsigned)geteuid(),
                 path);
        return RA_EINVAL;
    }
    char *save = NULL;
    int found = 0;
    for (char *ln = strtok_r(buf, "\n", &save); ln && !found; ln = strtok_r(NULL, "\n", &save)) {
        const char *kind;
        char *key;
        if (!line_key(ln, &kind, &key) || !strcmp(kind, "public"))
            continue;
        if ((strcmp(kind, "secret") && *kind) || !decode(key, sec)) {
            snprintf(err, errlen,
                     "%s: expected 'secret KEY' with a 40-character Z85 key (as "
                     "ratd --curve-keygen writes)",
                     path);
            return RA_EINVAL;
        }
        found = 1;
    }
    if (!found) {
        snprintf(err, errlen, "%s holds no secret key (see ratd --curve-keygen)", path);
        return RA_EINVAL;
    }
    return RA_OK;
}

static int key_cmp(const void *a, const void *b)
{
    return memcmp(a, b, KEY_BYTES);
}

static ra_status add_keys_file(ratd_server *s, const char *path, size_t *cap, char *err,
                               size_t errlen)
{
    char buf[65536];
    struct stat sb;
    if (read_small(path, buf, sizeof buf, &sb, err, errlen) < 0)
        return RA_EIO;
    char *save = NULL;
    int lineno = 0;
    for (char *ln = strtok_r(buf, "\n", &save); ln; ln = strtok_r(NULL, "\n", &save)) {
        lineno++;
        const char *kind;
        char *key;
        if (!line_key(ln, &kind, &key))
            continue;
        if (!strcmp(kind, "secret")) {
            RA_WARN("%s:%d: a secret key in the clients' file is skipped (only public keys "
                    "belong there; keep secrets with their owners)",
                    path, lineno);
            continue;
        }
        uint8_t k[KEY_BYTES];
        if ((*kind && strcmp(kind, "public")) || !decode(key, k)) {
            snprintf(err, errlen, "%s:%d: expected a 40-character Z85 public key", path, lineno);
            return RA_EINVAL;
        }
        if (s->n_curve_keys == *cap) {
            size_t nc = *cap ? 2 * *cap : 16;
            uint8_t *nk = realloc(s->curve_keys, nc * KEY_BYTES);
            if (!nk) {
                snprintf(err, errlen, "out of memory");
                return RA_ENOMEM;
            }
            s->curve_keys = nk;
            *cap = nc;
        }
        memcpy(s->curve_keys + s->n_curve_keys++ * KEY_BYTES, k, KEY_BYTES);
    }
    return RA_OK;
}

static ra_status load_clients(ratd_server *s, const char *path, char *err, size_t errlen)
{
    size_t cap = 0;
    struct stat sb;
    if (stat(path, &sb) != 0) {
        snprintf(err, errlen, "--curve-clients %s: %s", path, strerror(errno));
        return RA_EIO;
    }
    ra_status st = RA_OK;
    if (S_ISDIR(sb.st_mode)) {
        DIR *d = opendir(path);
        if (!d) {
            snprintf(err, errlen, "--curve-clients %s: %s", path, strerror(errno));
            return RA_EIO;
        }
        struct dirent *e;
        while (st == RA_OK && (e = readdir(d))) {
            if (e->d_name[0] == '.')
                continue;
            char f[1024];
            snprintf(f, sizeof f, "%s/%s", path, e->d_name);
            struct stat fb;
            if (stat(f, &fb) == 0 && S_ISREG(fb.st_mode))
                st = add_keys_file(s, f, &cap, err, errlen);
        }
        closedir(d);
    } else {
        st = add_keys_file(s, path, &cap, err, errlen);
    }
    if (st != RA_OK)
        return st;
    if (!s->n_curve_keys) {
        snprintf(err, errlen, "--curve-clients %s holds no public key: nobody could connect", path);
        return RA_EINVAL;
    }
    qsort(s->curve_keys, s->n_curve_keys, KEY_BYTES, key_cmp);
    return RA_OK;
}

/* One ZAP request: [version, request id, domain, address, identity, mechanism,
 * credentials...]; the reply [version, request id, status, text, user id, metadata]. */
static void zap_serve_one(ratd_server *s)
{
    zmq_msg_t f[8];
    int kept = 0, more = 1;
    while (more) {
        zmq_msg_t scratch, *m = kept < 8 ? &f[kept] : &scratch;
        zmq_msg_init(m);
        if (zmq_msg_recv(m, s->zap, 0) < 0) {
            zmq_msg_close(m);
            for (int i = 0; i < kept; i++)
                zmq_msg_close(&f[i]);
            return;
        }
        more = zmq_msg_more(m);
        if (m == &scratch)
            zmq_msg_close(&scratch);
        else
            kept++;
    }
    const char *code = "400", *text = "unknown client key";
    char addr[64] = "?";
    if (kept >= 4) {
        size_t al = zmq_msg_size(&f[3]);
        snprintf(addr, sizeof addr, "%.*s", (int)(al < 63 ? al : 63), (char *)zmq_msg_data(&f[3]));
    }
    if (kept >= 7 && zmq_msg_size(&f[5]) == 5 && !memcmp(zmq_msg_data(&f[5]), "CURVE", 5) &&
        zmq_msg_size(&f[6]) == KEY_BYTES &&
        bsearch(zmq_msg_data(&f[6]), s->curve_keys, s->n_curve_keys, KEY_BYTES, key_cmp)) {
        code = "200";
        text = "OK";
    }
    if (code[0] != '2') {
        uint64_t n = __atomic_add_fetch(&s->curve_refused, 1, __ATOMIC_RELAXED);
        double now = ra_now_s();
        if (now - s->zap_last_log >= 1.0) { /* a refused client retries: one line a second */
            char z85[KEY_Z85 + 1] = "?";
            if (kept >= 7 && zmq_msg_size(&f[6]) == KEY_BYTES)
                zmq_z85_encode(z85, zmq_msg_data(&f[6]), KEY_BYTES);
            RA_WARN("CURVE: refused a connection from %s with key %s (not in --curve-clients); "
                    "%llu refused so far",
                    addr, z85, (unsigned long long)n);
            s->zap_last_log = now;
        }
    }
    const char *ver = "1.0";
    zmq_send(s->zap, ver, 3, ZMQ_SNDMORE);
    if (kept >= 2)
        zmq_send(s->zap, zmq_msg_data(&f[1]), zmq_msg_size(&f[1]), ZMQ_SNDMORE);
    else
        zmq_send(s->zap, "", 0, ZMQ_SNDMORE);
    zmq_send(s->zap, code, 3, ZMQ_SNDMORE);
    zmq_send(s->zap, text, strlen(text), ZMQ_SNDMORE);
    zmq_send(s->zap, "", 0, ZMQ_SNDMORE);
    zmq_send(s->zap, "", 0, 0);
    for (int i = 0; i < kept; i++)
        zmq_msg_close(&f[i]);
}

static void *zap_main(void *arg)
{
    ratd_server *s = arg;
    pthread_setname_np(pthread_self(), "ratd-zap");
    while (!__atomic_load_n(&s->zap_stop, __ATOMIC_ACQUIRE)) {
        zmq_pollitem_t it = {s->zap, 0, ZMQ_POLLIN, 0};
        int rc = zmq_poll(&it, 1, 200);
        if (rc > 0)
            zap_serve_one(s);
        else if (rc < 0 && errno != EINTR)
            break;
    }
    zmq_close(s->zap);
    return NULL;
}

ra_status ratd_curve_setup(ratd_server *s, char *err, size_t errlen)
{
    const ratd_config *cfg = &s->cfg;
    if (!cfg->curve_secret_file[0])
        return RA_OK;
    if (!zmq_has("curve")) {
        snprintf(err, errlen, "this libzmq has no CURVE support; cannot use --curve-secret-file");
        return RA_ENOTSUP;
    }
    uint8_t sec[KEY_BYTES];
    ra_status st = load_secret(cfg->curve_secret_file, sec, err, errlen);
    if (st == RA_OK)
        st = load_clients(s, cfg->curve_clients, err, errlen);
    if (st != RA_OK)
        return st;
    s->zap = zmq_socket(s->ctx, ZMQ_REP);
    int zero = 0, one = 1;
    if (!s->zap || zmq_setsockopt(s->zap, ZMQ_LINGER, &zero, sizeof zero) != 0 ||
        zmq_bind(s->zap, "inproc://zeromq.zap.01") != 0) {
        snprintf(err, errlen, "ZAP handler: %s", zmq_strerror(errno));
        if (s->zap)
            zmq_close(s->zap);
        s->zap = NULL;
        return RA_EIO;
    }
    if (pthread_create(&s->zap_thread, NULL, zap_main, s) != 0) {
        zmq_close(s->zap);
        s->zap = NULL;
        snprintf(err, errlen, "cannot start the ZAP thread");
        return RA_ENOMEM;
    }
    s->zap_live = 1;
    if (zmq_setsockopt(s->sock, ZMQ_CURVE_SERVER, &one, sizeof one) != 0 ||
        zmq_setsockopt(s->sock, ZMQ_CURVE_SECRETKEY, sec, KEY_BYTES) != 0 ||
        zmq_setsockopt(s->sock, ZMQ_ZAP_DOMAIN, "ratd", 4) != 0) {
        snprintf(err, errlen, "CURVE options: %s", zmq_strerror(errno));
        memset(sec, 0, sizeof sec);
        return RA_EIO;
    }
    memset(sec, 0, sizeof sec);
    RA_INFO("CURVE on: %zu authorised client keys from %s", s->n_curve_keys, cfg->curve_clients);
    return RA_OK;
}

void ratd_curve_stop(ratd_server *s)
{
    if (!s->zap_live)
        return;
    __atomic_store_n(&s->zap_stop, 1, __ATOMIC_RELEASE);
    pthread_join(s->zap_thread, NULL);
    s->zap_live = 0;
    s->zap = NULL;
}
