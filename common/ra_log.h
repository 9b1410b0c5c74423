/* A tiny leveled logger to stderr with a timestamp, shared by daemon, client and tools.
 * Thread-safe (one fprintf per line). The level is set once at start-up. */
#ifndef RA_LOG_H
#define RA_LOG_H

#include <stdarg.h>

typedef enum { RA_LOG_ERROR = 0, RA_LOG_WARN = 1, RA_LOG_INFO = 2, RA_LOG_DEBUG = 3 } ra_log_level;

void ra_log_set_level(ra_log_level lvl);
ra_log_level ra_log_get_level(void);
void ra_log(ra_log_level lvl, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

#define RA_ERROR(...) ra_log(RA_LOG_ERROR, __VA_ARGS__)
#define RA_WARN(...) ra_log(RA_LOG_WARN, __VA_ARGS__)
#define RA_INFO(...) ra_log(RA_LOG_INFO, __VA_ARGS__)
#define RA_DEBUG(...) ra_log(RA_LOG_DEBUG, __VA_ARGS__)

/* Monotonic clock in seconds / nanoseconds. */
double ra_now_s(void);

#endif
