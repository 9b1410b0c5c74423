/* The daemon's worker pool and its placement. Work is submitted as a ratd_work of n
 * tasks (an Attend: one task per KV head group; Offload/Append: one per KV head); any
 * number of works are in flight at once and an idle worker takes a task of whichever
 * is first in line. The submitter does not wait: the worker that finishes a work's
 * last task calls its `done`. Submitting pushes min(n, workers) tickets naming the
 * work onto a bounded lock-free ring (Vyukov's MPMC queue), adds them to a ticket count
 * and wakes that many sleeping workers with one futex call; a worker holding a ticket
 * claims task indices from the work's atomic counter until none are left, so tasks need
 * no lock and no allocation, and no lock is shared by all workers. Tickets left over once a work is done are harmless: they find no
 * task (works are never freed while the pool runs, only reused).
 *
 * Placement (hwloc, only here): with --numa-node or --cpuset, the process, hence every
 * worker and every index build thread, is bound to that CPU set and memory is bound to
 * the node(s) of it, so that session memory lives next to the cores that read it. */
#ifndef RATD_POOL_H
#define RATD_POOL_H

#include <stddef.h>
#include <stdint.h>

#include "ratd/status.h"

typedef struct ratd_pool ratd_pool;
typedef struct ratd_work ratd_work;

/* worker: 0..ratd_pool_workers()-1, for per-worker scratch. */
typedef void (*ratd_work_task_fn)(ratd_work *w, int task, int worker);
typedef void (*ratd_work_done_fn)(ratd_work *w, int worker);

/* Embed in the submitter's job. fn and done are the submitter's; the rest is the
 * pool's, except work_ns and task_max_ns, which the submitter zeroes and reads after done. */
struct ratd_work {
    ratd_work_task_fn fn;
    ratd_work_done_fn done; /* runs once, on the worker that finished the last task */
    uint64_t claim;         /* atomic: (n_tasks << 32) | next task */
    int left;               /* atomic: tasks not yet finished */
    uint64_t work_ns;       /* atomic: sum of the tasks' wall times */
    uint64_t task_max_ns;   /* atomic: the longest task's wall time */
    /* the timeline (CLOCK_MONOTONIC ns): set by ratd_pool_submit, then the latest task
     * start and the latest task end (atomic maxima) */
    uint64_t submit_ns, start_last_ns, end_last_ns;
    int repeats; /* atomic: tasks a worker took after one of its own (none free) */
};

/* numa_node < 0 and cpuset NULL/"" : no binding. n_workers 0: one per CPU of the set.
 * err gets a message on failure (e.g. no such NUMA node). */
ra_status ratd_pool_create(ratd_pool **out, int n_workers, int numa_node, const char *cpuset,
                           char *err, size_t errlen);
/* Workers finish the tickets already queued, then stop. No work may be in flight. */
void ratd_pool_destroy(ratd_pool *p);

/* Runs w->fn for tasks 0..n_tasks-1 (n_tasks >= 1) on the workers and returns at once;
 * w->done follows the last task. w must stay allocated while the pool exists, and
 * may be submitted again once done has run (a next phase). Never call from a worker:
 * with the ring full the caller waits for workers to take tickets. */
void ratd_pool_submit(ratd_pool *p, ratd_work *w, int n_tasks);

/* Blocking convenience (tests, start-up): runs fn(arg, i) for i in [0, n_tasks) on the
 * workers and waits for all of them. Not from a worker. */
typedef void (*ratd_task_fn)(void *arg, int task);
void ratd_pool_run(ratd_pool *p, int n_tasks, ratd_task_fn fn, void *arg);

/* --pin-workers: worker i bound to the i-th CPU of the binding set (the allowed set when
 * unbound), one CPU per core first, round robin when there are more workers than CPUs.
 * Then the scheduler cannot wake two workers of one Attend on one core (bench/README.md,
 * "Eleventh session"); the I/O and index threads stay on the whole set. err gets a
 * message when a binding fails, and then every worker is on the whole set again. */
ra_status ratd_pool_pin_workers(ratd_pool *p, char *err, size_t errlen);

/* An idle worker spins this long for the next ticket before it sleeps (0: sleeps at
 * once). Set before the first submit. */
void ratd_pool_set_spin(ratd_pool *p, int spin_us);

int ratd_pool_workers(const ratd_pool *p);
int ratd_pool_numa_node(const ratd_pool *p);
int ratd_pool_bound(const ratd_pool *p);
/* A printable description of the binding ("none", "numa node 0: cpus 0-15"). */
const char *ratd_pool_placement(const ratd_pool *p);

#endif
