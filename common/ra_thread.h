/* Threads that a pinned thread starts. ratd can pin each pool worker to one CPU
 * (--pin-workers), and a thread inherits the affinity of the thread that creates it, so an
 * index build or probe thread started from a worker would otherwise share that worker's
 * one CPU with all its helpers. ra_thread_attr_wide gives a new thread the union of its
 * creator's CPUs and the main thread's (the process's binding, which ratd never pins). */
#ifndef RA_THREAD_H
#define RA_THREAD_H

#include <pthread.h>

/* a initialised by pthread_attr_init. Returns 0, or the error of the affinity call (the
 * attribute then keeps the creator's affinity, as without it). */
int ra_thread_attr_wide(pthread_attr_t *a);

#endif
