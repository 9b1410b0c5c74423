/* ra_thread_create_wide (ra_thread.h) */
#define _GNU_SOURCE
#include "ra_thread.h"

#include <sched.h>
#include <unistd.h>

int ra_thread_create_wide(pthread_t *t, int detached, void *(*fn)(void *), void *arg)
{
    pthread_attr_t a;
    int rc = pthread_attr_init(&a);
    if (rc)
        return rc;
    if (detached)
        pthread_attr_setdetachstate(&a, PTHREAD_CREATE_DETACHED);
    cpu_set_t mine, main_set;
    if (sched_getaffinity(0, sizeof mine, &mine) == 0 &&
        sched_getaffinity(getpid(), sizeof main_set, &main_set) == 0) { /* the main thread's */
        CPU_OR(&mine, &mine, &main_set);
        pthread_attr_setaffinity_np(&a, sizeof mine, &mine);
    }
    rc = pthread_create(t, &a, fn, arg);
    pthread_attr_destroy(&a);
    return rc;
}
