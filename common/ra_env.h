/* Integer knobs read from the environment once (the index's study knobs: RA_GRAPH_*,
 * RA_HEAD_PROBE_EVERY): the first call parses the variable, later calls return what it
 * gave. Threads that race on the first call parse the same text and store the same
 * value, so no lock is needed. */
#ifndef RA_ENV_H
#define RA_ENV_H

#include <stdlib.h>

typedef struct ra_env_once {
    int read, v; /* read: v is set (atomics) */
} ra_env_once;

/* The variable as an int (atoi), or `unset` when it is absent or empty. */
static inline int ra_env_int(ra_env_once *o, const char *name, int unset)
{
    if (__atomic_load_n(&o->read, __ATOMIC_ACQUIRE))
        return __atomic_load_n(&o->v, __ATOMIC_RELAXED);
    const char *e = getenv(name);
    int v = e && *e ? atoi(e) : unset;
    __atomic_store_n(&o->v, v, __ATOMIC_RELAXED);
    __atomic_store_n(&o->read, 1, __ATOMIC_RELEASE);
    return v;
}

#endif
