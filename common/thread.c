/* ra_thread_attr_wide (ra_thread.h) */
#define _GNU_SOURCE
#include "ra_thread.h"

#include <errno.h>
#include <sched.h>
#include <unistd.h>

int ra_thread_attr_wide(pthread_attr_t *a)
{
    cpu_set_t mine, main_set;
    if (sched_getaffinity(0, sizeof mine, &mine) != 0 ||
        sched_getaffinity(getpid(), sizeof main_set, &main_set) != 0) /* the main thread's */
        return errno;
    CPU_OR(&mine, &mine, &main_set);
    return pthread_attr_setaffinity_np(a, sizeof mine, &mine);
}
