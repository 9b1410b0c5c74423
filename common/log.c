/* The logger behind ra_log.h: one formatted line per call, written with a single
 * fprintf so lines from different threads never interleave. */
#include "ra_log.h"

#include <stdio.h>
#include <time.h>

static volatile int g_level = RA_LOG_INFO;

void ra_log_set_level(ra_log_level lvl) { g_level = (int)lvl; }
ra_log_level ra_log_get_level(void) { return (ra_log_level)g_level; }

void ra_log(ra_log_level lvl, const char *fmt, ...)
{
    if ((int)lvl > g_level)
        return;
    static const char *names[] = {"error", "warn", "info", "debug"};
    char msg[1024];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    struct tm tm;
    gmtime_r(&ts.tv_sec, &tm);
    /* ISO 8601 in UTC, so that lines of several days and hosts sort and compare */
    fprintf(stderr, "%04d-%02d-%02dT%02d:%02d:%02d.%03ldZ ratd %s: %s\n", tm.tm_year + 1900,
            tm.tm_mon + 1, tm.tm_mday, tm.tm_hour, tm.tm_min, tm.tm_sec, ts.tv_nsec / 1000000,
            names[lvl], msg);
}

double ra_now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}
