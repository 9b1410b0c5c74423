/* The daemon's worker pool and its placement. Attend fans one task per query head out
 * to the workers (Offload/Append one per KV head); the calling thread works too and
 * the call returns when every task is done. Placement (hwloc, only here): with
 * --numa-node or --cpuset, the process, hence every worker and every index build
 * thread, is bound to that CPU set and memory is bound to the node(s) of it, so that
 * session memory lives next to the cores that read it. */
#ifndef RATD_POOL_H
#define RATD_POOL_H

#include <stddef.h>

#include "ratd/status.h"

typedef struct ratd_pool ratd_pool;

typedef void (*ratd_task_fn)(void *arg, int task);

/* numa_node < 0 and cpuset NULL/"" : no binding. n_workers 0: one per CPU of the set.
 * err gets a message on failure (e.g. no such NUMA node). */
ra_status ratd_pool_create(ratd_pool **out, int n_workers, int numa_node, const char *cpuset,
                           char *err, size_t errlen);
void ratd_pool_destroy(ratd_pool *p);

/* Runs fn(arg, i) for i in [0, n_tasks) on the workers and the caller; blocks until all
 * are done. Not reentrant: one run at a time (the server thread is the only caller). */
void ratd_pool_run(ratd_pool *p, int n_tasks, ratd_task_fn fn, void *arg);

int ratd_pool_workers(const ratd_pool *p); /* threads including the caller */
int ratd_pool_numa_node(const ratd_pool *p);
int ratd_pool_bound(const ratd_pool *p);
/* A printable description of the binding ("none", "numa node 0: cpus 0-15"). */
const char *ratd_pool_placement(const ratd_pool *p);

#endif
