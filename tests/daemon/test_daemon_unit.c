/* Unit tests of ratd's pieces without a socket: the option table and its sources
 * (defaults, sizes with suffixes, bounds, config file, environment, flags and their
 * order), the endpoint policy (default ipc://, tcp:// non-loopback needs allow-remote),
 * the worker pool (every task exactly once, many runs, many works in flight at once,
 * several submitters at once, bad placement refused, workers pinned one per CPU) and the
 * Attend split rule. */
#define _GNU_SOURCE
#include <fcntl.h>
#include <pthread.h>
#include <sched.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <sys/stat.h>
#include <unistd.h>

#include <cmocka.h>

#include "ra_thread.h"
#include "ratd_config.h"
#include "ratd_internal.h"
#include "ratd_pool.h"

static void test_defaults(void **state)
{
    (void)state;
    ratd_config c;
    ratd_config_defaults(&c);
    assert_int_equal(c.max_frame_bytes, 1ull << 30);
    assert_int_equal(c.max_sessions, 64);
    assert_int_equal(c.max_top_k, 8192);
    assert_int_equal(c.numa_node, -1);
    assert_int_equal(c.allow_remote, 0);
    assert_int_equal(c.mem_limit, 0);
    assert_string_equal(c.log_level, "info");
    assert_string_equal(c.endpoint, "");
}

static void test_set_sizes_and_bounds(void **state)
{
    (void)state;
    ratd_config c;
    char err[256];
    ratd_config_defaults(&c);
    assert_int_equal(ratd_config_set(&c, "mem-limit", "64G", err, sizeof err), RA_OK);
    assert_int_equal(c.mem_limit, 64ull << 30);
    assert_int_equal(ratd_config_set(&c, "mem-limit", "512MiB", err, sizeof err), RA_OK);
    assert_int_equal(c.mem_limit, 512ull << 20);
    assert_int_equal(ratd_config_set(&c, "max-frame-bytes", "1.5k", err, sizeof err), RA_OK);
    assert_int_equal(c.max_frame_bytes, 1536);
    assert_int_equal(ratd_config_set(&c, "max-frame-bytes", "12", err, sizeof err), RA_EINVAL);
    assert_non_null(strstr(err, "outside"));
    assert_int_equal(c.max_frame_bytes, 1536); /* unchanged on failure */
    assert_int_equal(ratd_config_set(&c, "mem-limit", "lots", err, sizeof err), RA_EINVAL);
    assert_int_equal(ratd_config_set(&c, "workers", "-1", err, sizeof err), RA_EINVAL);
    assert_int_equal(ratd_config_set(&c, "workers", "3x", err, sizeof err), RA_EINVAL);
    assert_int_equal(ratd_config_set(&c, "workers", "12", err, sizeof err), RA_OK);
    assert_int_equal(c.workers, 12);
    assert_int_equal(ratd_config_set(&c, "allow-remote", "yes", err, sizeof err), RA_OK);
    assert_int_equal(c.allow_remote, 1);
    assert_int_equal(ratd_config_set(&c, "allow-remote", "maybe", err, sizeof err), RA_EINVAL);
    assert_int_equal(ratd_config_set(&c, "no-such-option", "1", err, sizeof err), RA_EINVAL);
    assert_non_null(strstr(err, "unknown option"));
}

static void test_sources_order(void **state)
{
    (void)state;
    char path[] = "/tmp/ratd-unit-conf-XXXXXX";
    int fd = mkstemp(path);
    assert_true(fd >= 0);
    const char *text = "# a comment\nmax-sessions 5\nmax-top-k 100   # trailing\n\nworkers 3\n";
    assert_int_equal(write(fd, text, strlen(text)), (ssize_t)strlen(text));
    close(fd);
    setenv("RATD_MAX_TOP_K", "200", 1);
    setenv("RATD_WORKERS", "4", 1);
    char *argv[] = {"ratd",           "--config",  path, "--workers=6",
                    "--allow-remote", "--max-dim", "64", NULL};
    ratd_config c;
    char err[256];
    int help, version;
    assert_int_equal(ratd_config_load(&c, 7, argv, &help, &version, err, sizeof err), RA_OK);
    assert_int_equal(c.max_sessions, 5); /* file */
    assert_int_equal(c.max_top_k, 200);  /* env over file */
    assert_int_equal(c.workers, 6);      /* flag over env */
    assert_int_equal(c.allow_remote, 1); /* bare boolean flag */
    assert_int_equal(c.max_dim, 64);
    assert_int_equal(help, 0);
    unsetenv("RATD_MAX_TOP_K");
    unsetenv("RATD_WORKERS");
    /* a bad line names the file and line */
    fd = open(path, O_WRONLY | O_TRUNC);
    const char *bad = "max-sessions 5\nmax-heads zero\n";
    assert_int_equal(write(fd, bad, strlen(bad)), (ssize_t)strlen(bad));
    close(fd);
    assert_int_equal(ratd_config_load(&c, 3, argv, &help, &version, err, sizeof err), RA_EINVAL);
    assert_non_null(strstr(err, ":2:"));
    unlink(path);
    char *argv2[] = {"ratd", "--help", "--max-dim", NULL};
    assert_int_equal(ratd_config_args(&c, 3, argv2, &help, &version, err, sizeof err),
                     RA_EINVAL); /* --max-dim without a value */
    char *argv3[] = {"ratd", "stray", NULL};
    assert_int_equal(ratd_config_args(&c, 2, argv3, &help, &version, err, sizeof err), RA_EINVAL);
    char *argv4[] = {"ratd", "--help", NULL};
    assert_int_equal(ratd_config_args(&c, 2, argv4, &help, &version, err, sizeof err), RA_OK);
    assert_int_equal(help, 1);
}

static void test_endpoint_policy(void **state)
{
    (void)state;
    ratd_config c;
    char err[512], dir[128], sub[160];
    ratd_config_defaults(&c);
    /* the default: a private directory under $XDG_RUNTIME_DIR, made 0700 */
    snprintf(dir, sizeof dir, "/tmp/ratd-unit-%d", (int)getpid());
    assert_int_equal(mkdir(dir, 0700), 0);
    setenv("XDG_RUNTIME_DIR", dir, 1);
    assert_int_equal(ratd_config_check_endpoint(&c, err, sizeof err), RA_OK);
    snprintf(sub, sizeof sub, "ipc://%s/ratd/ratd.sock", dir);
    assert_string_equal(c.endpoint, sub);
    snprintf(sub, sizeof sub, "%s/ratd", dir);
    struct stat sb;
    assert_int_equal(lstat(sub, &sb), 0);
    assert_int_equal(sb.st_mode & 0777, 0700);
    /* a directory others may enter is refused, with the fix in the message */
    chmod(sub, 0755);
    ratd_config_defaults(&c);
    assert_int_equal(ratd_config_check_endpoint(&c, err, sizeof err), RA_EINVAL);
    assert_non_null(strstr(err, "chmod 700"));
    /* a symbolic link is refused */
    rmdir(sub);
    assert_int_equal(symlink("/tmp", sub), 0);
    ratd_config_defaults(&c);
    assert_int_equal(ratd_config_check_endpoint(&c, err, sizeof err), RA_EINVAL);
    assert_non_null(strstr(err, "symbolic link"));
    unlink(sub);
    rmdir(dir);
    ratd_config_defaults(&c);
    setenv("XDG_RUNTIME_DIR", "/nonexistent-dir-for-ratd", 1);
    assert_int_equal(ratd_config_check_endpoint(&c, err, sizeof err), RA_OK);
    snprintf(sub, sizeof sub, "ipc:///tmp/ratd-%u/ratd.sock", (unsigned)geteuid());
    assert_string_equal(c.endpoint, sub);
    unsetenv("XDG_RUNTIME_DIR");
    /* tcp:// on loopback: CURVE or --allow-plain-loopback */
    const char *ok[] = {"tcp://127.0.0.1:5555", "tcp://localhost:1", "tcp://[::1]:9"};
    for (int i = 0; i < 3; i++) {
        strcpy(c.endpoint, ok[i]);
        c.allow_plain_loopback = 0;
        assert_int_equal(ratd_config_check_endpoint(&c, err, sizeof err), RA_EINVAL);
        assert_non_null(strstr(err, "--allow-plain-loopback"));
        c.allow_plain_loopback = 1;
        assert_int_equal(ratd_config_check_endpoint(&c, err, sizeof err), RA_OK);
    }
    /* elsewhere: --allow-remote and CURVE, whatever the plain-loopback flag says */
    const char *remote[] = {"tcp://0.0.0.0:5555", "tcp://*:5555", "tcp://10.1.2.3:7",
                            "tcp://127.evil.example:7"};
    for (int i = 0; i < 4; i++) {
        strcpy(c.endpoint, remote[i]);
        c.allow_remote = 0;
        assert_int_equal(ratd_config_check_endpoint(&c, err, sizeof err), RA_EINVAL);
        assert_non_null(strstr(err, "--allow-remote"));
        c.allow_remote = 1;
        assert_int_equal(ratd_config_check_endpoint(&c, err, sizeof err), RA_EINVAL);
        assert_non_null(strstr(err, "CURVE"));
        strcpy(c.curve_secret_file, "/some/secret");
        assert_int_equal(ratd_config_check_endpoint(&c, err, sizeof err), RA_EINVAL);
        assert_non_null(strstr(err, "--curve-clients"));
        strcpy(c.curve_clients, "/some/clients");
        assert_int_equal(ratd_config_check_endpoint(&c, err, sizeof err), RA_OK);
        c.curve_secret_file[0] = c.curve_clients[0] = 0;
    }
    c.allow_remote = 0;
    /* ZeroMQ's source;address form would bind the second address: refused outright */
    const char *semi[] = {"tcp://127.0.0.1:1;0.0.0.0:47107", "tcp://127.0.0.1:1;*:47107",
                          "tcp://lo;127.0.0.1:5"};
    for (int i = 0; i < 3; i++) {
        strcpy(c.endpoint, semi[i]);
        c.allow_remote = i == 2;
        assert_int_equal(ratd_config_check_endpoint(&c, err, sizeof err), RA_EINVAL);
        assert_non_null(strstr(err, "';'"));
    }
    c.allow_remote = 0;
    /* the bound address decides, numerically */
    assert_int_equal(ratd_config_check_bound(&c, "tcp://0.0.0.0:47107", err, sizeof err),
                     RA_EINVAL);
    assert_int_equal(ratd_config_check_bound(&c, "tcp://[::]:47107", err, sizeof err), RA_EINVAL);
    assert_int_equal(ratd_config_check_bound(&c, "tcp://127.0.0.1:47107", err, sizeof err), RA_OK);
    assert_int_equal(ratd_config_check_bound(&c, "tcp://[::ffff:127.0.0.1]:1", err, sizeof err),
                     RA_OK);
    assert_int_equal(ratd_config_check_bound(&c, "ipc:///x", err, sizeof err), RA_OK);
    assert_int_equal(ratd_endpoint_is_loopback("tcp://localhost:1", 1), 0);
    assert_int_equal(ratd_endpoint_is_loopback("tcp://[::1]:1", 1), 1);
    strcpy(c.endpoint, "inproc://x");
    assert_int_equal(ratd_config_check_endpoint(&c, err, sizeof err), RA_EINVAL);
    strcpy(c.endpoint, "tcp://nohostport");
    assert_int_equal(ratd_config_check_endpoint(&c, err, sizeof err), RA_EINVAL);
    /* the socket mode is octal and bounded: the owner keeps read and write */
    assert_int_equal(ratd_config_set(&c, "socket-mode", "0660", err, sizeof err), RA_OK);
    assert_int_equal(c.socket_mode, 0660);
    assert_int_equal(ratd_config_set(&c, "socket-mode", "0400", err, sizeof err), RA_EINVAL);
    assert_int_equal(ratd_config_set(&c, "socket-mode", "0999", err, sizeof err), RA_EINVAL);
    assert_int_equal(ratd_config_set(&c, "socket-mode", "01777", err, sizeof err), RA_EINVAL);
}

static void test_usage_lists_options(void **state)
{
    (void)state;
    char *buf = NULL;
    size_t len = 0;
    FILE *f = open_memstream(&buf, &len);
    ratd_config_usage(f, "ratd");
    fclose(f);
    const char *flags[] = {"--endpoint",
                           "--allow-remote",
                           "--workers",
                           "--numa-node",
                           "--cpuset",
                           "--mem-limit",
                           "--max-frame-bytes",
                           "--max-message-bytes",
                           "--max-sessions",
                           "--max-layers",
                           "--max-heads",
                           "--max-dim",
                           "--max-top-k",
                           "--max-tokens",
                           "--max-queries",
                           "--max-queue",
                           "--max-batch",
                           "--index-threads",
                           "--send-timeout-ms",
                           "--log-level",
                           "--config",
                           "--help",
                           "--version",
                           "--allow-plain-loopback",
                           "--socket-mode",
                           "--curve-secret-file",
                           "--curve-clients",
                           "--curve-keygen",
                           "--max-clients",
                           "--session-ttl",
                           "--max-peer-reply-bytes"};
    for (size_t i = 0; i < sizeof flags / sizeof flags[0]; i++)
        if (!strstr(buf, flags[i]))
            fail_msg("--help does not document %s", flags[i]);
    free(buf);
}

typedef struct count_job {
    int hits[1000];
} count_job;

static void count_task(void *arg, int i)
{
    count_job *j = arg;
    __atomic_fetch_add(&j->hits[i], 1, __ATOMIC_RELAXED);
}

static void test_pool_runs_each_task_once(void **state)
{
    (void)state;
    ratd_pool *p;
    char err[256];
    assert_int_equal(ratd_pool_create(&p, 4, -1, NULL, err, sizeof err), RA_OK);
    assert_int_equal(ratd_pool_workers(p), 4);
    assert_int_equal(ratd_pool_bound(p), 0);
    count_job *j = calloc(1, sizeof *j);
    for (int run = 0; run < 200; run++) {
        int n = 1 + (run * 37) % 1000;
        memset(j, 0, sizeof *j);
        ratd_pool_run(p, n, count_task, j);
        for (int i = 0; i < 1000; i++)
            if (j->hits[i] != (i < n ? 1 : 0))
                fail_msg("run %d: task %d ran %d times", run, i, j->hits[i]);
    }
    ratd_pool_run(p, 0, count_task, j); /* nothing to do */
    free(j);
    ratd_pool_destroy(p);
}

static void test_pool_placement(void **state)
{
    (void)state;
    ratd_pool *p = NULL;
    char err[256];
    cpu_set_t mine; /* a binding binds the whole process: given back at the end */
    assert_int_equal(sched_getaffinity(0, sizeof mine, &mine), 0);
    assert_int_equal(ratd_pool_create(&p, 2, 4000, NULL, err, sizeof err), RA_EINVAL);
    assert_non_null(strstr(err, "NUMA"));
    assert_int_equal(ratd_pool_create(&p, 2, -1, "garbage!", err, sizeof err), RA_EINVAL);
    /* node 0 always exists: binding to it works and is reported */
    assert_int_equal(ratd_pool_create(&p, 2, 0, NULL, err, sizeof err), RA_OK);
    assert_int_equal(ratd_pool_numa_node(p), 0);
    assert_int_equal(ratd_pool_bound(p), 1);
    assert_non_null(strstr(ratd_pool_placement(p), "cpus"));
    count_job *j = calloc(1, sizeof *j);
    ratd_pool_run(p, 10, count_task, j);
    assert_int_equal(j->hits[9], 1);
    free(j);
    ratd_pool_destroy(p);
    assert_int_equal(ratd_pool_create(&p, 0, -1, "0", err, sizeof err), RA_OK);
    assert_int_equal(ratd_pool_workers(p), 1); /* one CPU in the set: one worker */
    ratd_pool_destroy(p);
    assert_int_equal(sched_setaffinity(0, sizeof mine, &mine), 0);
}

/* --pin-workers: every worker's affinity is one CPU, where it runs, the first
 * min(workers, CPUs) on distinct ones and the rest round robin (5 workers on however
 * many CPUs this machine lets us) */
typedef struct cpu_work {
    ratd_work w;
    int cpu[8][64]; /* [worker][sample]: sched_getcpu() at each task */
    int mask[8];    /* the worker's affinity: its one CPU, -1 for none or several */
    int n_seen[8];  /* atomic */
    int finished;   /* atomic */
    int wide_cpus;  /* CPUs of a thread a worker started with ra_thread_create_wide */
} cpu_work;

static void *count_cpus(void *arg)
{
    cpu_set_t m;
    *(int *)arg = sched_getaffinity(0, sizeof m, &m) == 0 ? CPU_COUNT(&m) : -1;
    return NULL;
}

static void cpu_task(ratd_work *w, int task, int worker)
{
    (void)task;
    cpu_work *c = (cpu_work *)w;
    int i = __atomic_fetch_add(&c->n_seen[worker], 1, __ATOMIC_RELAXED);
    if (i < 64)
        c->cpu[worker][i] = sched_getcpu();
    cpu_set_t m;
    int one = -1;
    if (sched_getaffinity(0, sizeof m, &m) == 0 && CPU_COUNT(&m) == 1)
        for (int k = 0; k < CPU_SETSIZE && one < 0; k++)
            one = CPU_ISSET(k, &m) ? k : -1;
    c->mask[worker] = one;
    if (task == 0) { /* a thread started from a pinned worker, as an index build is */
        pthread_t t;
        if (ra_thread_create_wide(&t, 0, count_cpus, &c->wide_cpus) == 0)
            pthread_join(t, NULL);
    }
    usleep(100); /* long enough that every worker gets tasks */
}

static void cpu_done(ratd_work *w, int worker)
{
    (void)worker;
    __atomic_store_n(&((cpu_work *)w)->finished, 1, __ATOMIC_RELEASE);
}

static void test_pool_pin_workers(void **state)
{
    (void)state;
    enum { NW = 5 };
    ratd_pool *p;
    char err[256];
    assert_int_equal(ratd_pool_create(&p, NW, -1, NULL, err, sizeof err), RA_OK);
    assert_int_equal(ratd_pool_pin_workers(p, err, sizeof err), RA_OK);
    assert_non_null(strstr(ratd_pool_placement(p), "pinned"));
    cpu_set_t allowed;
    assert_int_equal(sched_getaffinity(0, sizeof allowed, &allowed), 0);
    int n_cpu = CPU_COUNT(&allowed);
    cpu_work *c = calloc(1, sizeof *c);
    for (int round = 0; round < 4; round++) {
        c->w.fn = cpu_task;
        c->w.done = cpu_done;
        __atomic_store_n(&c->finished, 0, __ATOMIC_RELAXED);
        ratd_pool_submit(p, &c->w, 100);
        for (int t = 0; t < 20000 && !__atomic_load_n(&c->finished, __ATOMIC_ACQUIRE); t++)
            usleep(1000);
        assert_int_equal(__atomic_load_n(&c->finished, __ATOMIC_ACQUIRE), 1);
    }
    int cpu_of[NW];
    for (int w = 0; w < NW; w++) {
        cpu_of[w] = -1;
        int n = c->n_seen[w] < 64 ? c->n_seen[w] : 64;
        if (n == 0)
            fail_msg("worker %d ran no task", w);
        cpu_of[w] = c->mask[w];
        if (cpu_of[w] < 0)
            fail_msg("worker %d is not bound to one CPU", w);
        for (int i = 0; i < n; i++) {
            if (c->cpu[w][i] != cpu_of[w])
                fail_msg("worker %d ran on CPU %d and on CPU %d", w, cpu_of[w], c->cpu[w][i]);
        }
    }
    for (int a = 0; a < NW; a++)
        for (int b = a + 1; b < NW && b < n_cpu; b++)
            if (cpu_of[a] == cpu_of[b])
                fail_msg("workers %d and %d share CPU %d with %d CPUs free", a, b, cpu_of[a],
                         n_cpu);
    assert_int_equal(c->wide_cpus, n_cpu); /* every CPU of the process, not the worker's one */
    free(c);
    ratd_pool_destroy(p);
}

/* Many works in flight at once, submitted without waiting, each with its own task
 * count: every task of every work runs once, every done once, after its tasks. */
typedef struct multi_work {
    ratd_work w;
    int n;
    int hits[64];
    int done;      /* atomic */
    int early;     /* done saw a task not yet run */
    int *finished; /* atomic: works done */
} multi_work;

static void multi_task(ratd_work *w, int task, int worker)
{
    (void)worker;
    multi_work *m = (multi_work *)w;
    __atomic_fetch_add(&m->hits[task], 1, __ATOMIC_RELAXED);
}

static void multi_done(ratd_work *w, int worker)
{
    (void)worker;
    multi_work *m = (multi_work *)w;
    for (int i = 0; i < m->n; i++)
        m->early |= __atomic_load_n(&m->hits[i], __ATOMIC_RELAXED) != 1;
    __atomic_fetch_add(&m->done, 1, __ATOMIC_RELAXED);
    __atomic_fetch_add(m->finished, 1, __ATOMIC_RELEASE);
}

static void test_pool_works_in_flight(void **state)
{
    (void)state;
    ratd_pool *p;
    char err[256];
    assert_int_equal(ratd_pool_create(&p, 3, -1, NULL, err, sizeof err), RA_OK);
    enum { NW = 300 };
    multi_work *w = calloc(NW, sizeof *w);
    int finished = 0;
    for (int round = 0; round < 3; round++) { /* the same works again: reuse is allowed */
        __atomic_store_n(&finished, 0, __ATOMIC_RELAXED);
        for (int i = 0; i < NW; i++) {
            memset(w[i].hits, 0, sizeof w[i].hits);
            w[i].w.fn = multi_task;
            w[i].w.done = multi_done;
            w[i].n = 1 + (i * 7 + round) % 64;
            w[i].done = 0;
            w[i].finished = &finished;
            ratd_pool_submit(p, &w[i].w, w[i].n);
        }
        for (int t = 0; t < 20000 && __atomic_load_n(&finished, __ATOMIC_ACQUIRE) < NW; t++)
            usleep(1000);
        assert_int_equal(__atomic_load_n(&finished, __ATOMIC_ACQUIRE), NW);
        for (int i = 0; i < NW; i++) {
            assert_int_equal(w[i].done, 1);
            assert_int_equal(w[i].early, 0);
            for (int t = 0; t < 64; t++)
                if (w[i].hits[t] != (t < w[i].n ? 1 : 0))
                    fail_msg("round %d work %d: task %d ran %d times", round, i, t, w[i].hits[t]);
        }
    }
    ratd_pool_destroy(p); /* before the works go: leftover tickets may name them */
    free(w);
}

/* Several submitters at once, with idle workers sleeping or spinning: the ticket
 * counter loses no wake (a lost one would leave tickets behind sleeping workers and
 * the works unfinished) and every task still runs once */
typedef struct submitter {
    ratd_pool *p;
    multi_work *w;
    int nw, seed;
} submitter;

static void *submit_main(void *arg)
{
    submitter *s = arg;
    for (int i = 0; i < s->nw; i++) {
        ratd_pool_submit(s->p, &s->w[i].w, s->w[i].n);
        if ((i + s->seed) % 7 == 0) /* now and then let the workers fall asleep */
            usleep(200);
    }
    return NULL;
}

static void test_pool_submitters(void **state)
{
    (void)state;
    enum { NS = 4, NW = 150 };
    for (int spin = 0; spin <= 50; spin += 50) {
        ratd_pool *p;
        char err[256];
        assert_int_equal(ratd_pool_create(&p, 3, -1, NULL, err, sizeof err), RA_OK);
        ratd_pool_set_spin(p, spin);
        multi_work *w = calloc(NS * NW, sizeof *w);
        int finished = 0;
        for (int i = 0; i < NS * NW; i++) {
            w[i].w.fn = multi_task;
            w[i].w.done = multi_done;
            w[i].n = 1 + (i * 5) % 16;
            w[i].finished = &finished;
        }
        submitter sub[NS];
        pthread_t th[NS];
        for (int t = 0; t < NS; t++) {
            sub[t] = (submitter){.p = p, .w = w + t * NW, .nw = NW, .seed = t};
            assert_int_equal(pthread_create(&th[t], NULL, submit_main, &sub[t]), 0);
        }
        for (int t = 0; t < NS; t++)
            pthread_join(th[t], NULL);
        for (int t = 0; t < 20000 && __atomic_load_n(&finished, __ATOMIC_ACQUIRE) < NS * NW; t++)
            usleep(1000);
        assert_int_equal(__atomic_load_n(&finished, __ATOMIC_ACQUIRE), NS * NW);
        for (int i = 0; i < NS * NW; i++) {
            assert_int_equal(w[i].done, 1);
            assert_int_equal(w[i].early, 0);
            for (int t = 0; t < 64; t++)
                if (w[i].hits[t] != (t < w[i].n ? 1 : 0))
                    fail_msg("spin %d work %d: task %d ran %d times", spin, i, t, w[i].hits[t]);
        }
        ratd_pool_destroy(p);
        free(w);
    }
}

/* The Attend split rule (ratd_attend.c): sub-groups only when the batch's KV heads
 * cannot feed the workers, none empty, never more than the query heads. */
static void test_attend_split(void **state)
{
    (void)state;
    struct {
        int S, G, R, W, P, gsize;
    } c[] = {
        {1, 8, 4, 16, 4, 1},   /* Llama-3-8B on 16 workers: 32 single walks, 2 per worker */
        {1, 8, 4, 8, 2, 2},    /* on 8 workers: 16 walks of 2 query heads */
        {4, 8, 4, 16, 1, 4},   /* a batch of 4 sessions feeds 16 workers by itself */
        {2, 8, 4, 16, 2, 2},   /* a batch of 2: 32 walks of 2 */
        {1, 1, 32, 16, 32, 1}, /* one KV head, 32 query heads */
        {1, 2, 4, 16, 4, 1},   /* more workers than query heads: one head per task */
        {1, 8, 1, 64, 1, 1},   /* MHA: nothing to split */
        {1, 1, 7, 3, 4, 2},    /* 7 heads on 3 workers: 6 wanted, 2 + 2 + 2 + 1 */
        {1, 1, 5, 2, 3, 2},    /* 4 wanted, ceil(5/4) = 2 per group: 3 groups, none empty */
    };
    for (size_t i = 0; i < sizeof c / sizeof c[0]; i++) {
        int P, g;
        ratd_attend_split(c[i].S, c[i].G, c[i].R, c[i].W, &P, &g);
        if (P != c[i].P || g != c[i].gsize)
            fail_msg("case %zu: P %d gsize %d, expected %d and %d", i, P, g, c[i].P, c[i].gsize);
        assert_true((P - 1) * g < c[i].R && P * g >= c[i].R);
    }
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_defaults),
        cmocka_unit_test(test_set_sizes_and_bounds),
        cmocka_unit_test(test_sources_order),
        cmocka_unit_test(test_endpoint_policy),
        cmocka_unit_test(test_usage_lists_options),
        cmocka_unit_test(test_pool_runs_each_task_once),
        cmocka_unit_test(test_pool_placement),
        cmocka_unit_test(test_pool_pin_workers),
        cmocka_unit_test(test_pool_works_in_flight),
        cmocka_unit_test(test_pool_submitters),
        cmocka_unit_test(test_attend_split),
    };
    return cmocka_run_group_tests_name("daemon-unit", tests, NULL, NULL);
}
