/* Threads that a pinned thread starts. ratd can pin each pool worker to one CPU
 * (--pin-workers), and a thread inherits the affinity of the thread that creates it, so an
 * index build or probe thread started from a worker would otherwise share that worker's
 * one CPU with all its helpers. ra_thread_create_wide gives a new thread the union of its
 * creator's CPUs and the main thread's (the process's binding, which ratd never pins). */
#ifndef RA_THREAD_H
#define RA_THREAD_H

#include <pthread.h>

/* pthread_create with that affinity, detached when `detached`. Returns pthread_create's
 * result. When the affinity cannot be read or set, the thread keeps its creator's, as
 * without this call. */
int ra_thread_create_wide(pthread_t *t, int detached, void *(*fn)(void *), void *arg);

#endif
