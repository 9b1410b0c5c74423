/* Unit tests of ratd's pieces without a socket: the option table and its sources
 * (defaults, sizes with suffixes, bounds, config file, environment, flags and their
 * order), the endpoint policy (default ipc://, tcp:// non-loopback needs allow-remote),
 * and the worker pool (every task exactly once, many runs, bad placement refused). */
#include <fcntl.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <cmocka.h>

#include "ratd_config.h"
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
    char err[512];
    ratd_config_defaults(&c);
    setenv("XDG_RUNTIME_DIR", "/tmp", 1);
    assert_int_equal(ratd_config_check_endpoint(&c, err, sizeof err), RA_OK);
    assert_string_equal(c.endpoint, "ipc:///tmp/ratd.sock");
    ratd_config_defaults(&c);
    setenv("XDG_RUNTIME_DIR", "/nonexistent-dir-for-ratd", 1);
    assert_int_equal(ratd_config_check_endpoint(&c, err, sizeof err), RA_OK);
    assert_true(strncmp(c.endpoint, "ipc:///tmp/ratd-", 16) == 0);
    unsetenv("XDG_RUNTIME_DIR");
    const char *ok[] = {"tcp://127.0.0.1:5555", "tcp://localhost:1", "tcp://[::1]:9"};
    for (int i = 0; i < 3; i++) {
        strcpy(c.endpoint, ok[i]);
        assert_int_equal(ratd_config_check_endpoint(&c, err, sizeof err), RA_OK);
    }
    const char *remote[] = {"tcp://0.0.0.0:5555", "tcp://*:5555", "tcp://10.1.2.3:7"};
    for (int i = 0; i < 3; i++) {
        strcpy(c.endpoint, remote[i]);
        c.allow_remote = 0;
        assert_int_equal(ratd_config_check_endpoint(&c, err, sizeof err), RA_EINVAL);
        assert_non_null(strstr(err, "--allow-remote"));
        c.allow_remote = 1;
        assert_int_equal(ratd_config_check_endpoint(&c, err, sizeof err), RA_OK);
    }
    strcpy(c.endpoint, "inproc://x");
    assert_int_equal(ratd_config_check_endpoint(&c, err, sizeof err), RA_EINVAL);
    strcpy(c.endpoint, "tcp://nohostport");
    assert_int_equal(ratd_config_check_endpoint(&c, err, sizeof err), RA_EINVAL);
}

static void test_usage_lists_options(void **state)
{
    (void)state;
    char *buf = NULL;
    size_t len = 0;
    FILE *f = open_memstream(&buf, &len);
    ratd_config_usage(f, "ratd");
    fclose(f);
    const char *flags[] = {
        "--endpoint",        "--allow-remote", "--workers",         "--numa-node",
        "--cpuset",          "--mem-limit",    "--max-frame-bytes", "--max-message-bytes",
        "--max-sessions",    "--max-layers",   "--max-heads",       "--max-dim",
        "--max-top-k",       "--max-tokens",   "--max-queries",     "--index-threads",
        "--send-timeout-ms", "--log-level",    "--config",          "--help",
        "--version"};
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
    };
    return cmocka_run_group_tests_name("daemon-unit", tests, NULL, NULL);
}
