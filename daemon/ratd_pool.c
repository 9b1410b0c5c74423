/* Worker pool and hwloc placement (see ratd_pool.h). The ticket ring is Dmitry Vyukov's
 * bounded MPMC queue: each cell carries a sequence number that tells producers and
 * consumers whose turn it is, so a push or a pop is one CAS on its own index. A counter
 * on a futex counts the tickets, so a worker only pops after a push completed and idle
 * workers sleep in the kernel instead of spinning.
 *
 * Why not a semaphore: a submission of t tickets posted it t times, one futex wake per
 * post, and the first worker woken on the submitting I/O thread's core preempted it
 * there, so the other posts waited for that worker's whole task: in most 128K Attends
 * one of 16 workers started a task time late (bench/README.md, "Tenth session"). One
 * FUTEX_WAKE of t waiters wakes them all before the submitter can be preempted. */
#define _GNU_SOURCE
#include "ratd_pool.h"

#include <errno.h>
#include <hwloc.h>
#include <linux/futex.h>
#include <pthread.h>
#include <sched.h>
#include <semaphore.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include "ra_log.h"

typedef struct run_work {
    ratd_work w;
    ratd_pool *p;
    ratd_task_fn fn;
    void *arg;
    sem_t done;
} run_work;

typedef struct ring_cell {
    size_t seq; /* atomic */
    ratd_work *w;
} ring_cell;

struct ratd_pool {
    /* the ring: producers and consumers on their own cache lines */
    ring_cell *cells;
    size_t mask;
    char pad0[64];
    size_t head; /* atomic: next cell to push */
    char pad1[64];
    size_t tail; /* atomic: next cell to pop */
    char pad2[64];
    uint32_t tickets; /* atomic, the futex word: tickets pushed and not yet taken */
    char pad3[60];
    uint32_t sleepers; /* atomic: workers about to sleep or asleep on tickets */
    uint64_t spin_ns; /* idle workers poll the ticket count this long before sleeping */
    run_work run;     /* ratd_pool_run's, one at a time */
    pthread_mutex_t run_mu;
    pthread_t *threads;
    int n_threads;
    hwloc_topology_t topo;
    hwloc_bitmap_t cpuset; /* NULL: unbound */
    int numa_node;
    char placement[256];
};

typedef struct worker_arg {
    ratd_pool *p;
    int index;
} worker_arg;

static uint64_t now_ns(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (uint64_t)t.tv_sec * 1000000000u + (uint64_t)t.tv_nsec;
}

static long futex(uint32_t *uaddr, int op, uint32_t val)
{
    return syscall(SYS_futex, uaddr, op, val, NULL, NULL, 0);
}

/* one ticket taken if there is one */
static int tickets_try(ratd_pool *p)
{
    uint32_t v = __atomic_load_n(&p->tickets, __ATOMIC_RELAXED);
    while (v > 0)
        if (__atomic_compare_exchange_n(&p->tickets, &v, v - 1, 1, __ATOMIC_ACQUIRE,
                                        __ATOMIC_RELAXED))
            return 1;
    return 0;
}

/* one ticket taken, sleeping while there is none. The sleeper is counted before it
 * looks again, and the poster counts tickets before it looks for sleepers (both
 * sequentially consistent), so either the poster sees the sleeper and wakes it or the
 * sleeper sees the ticket; FUTEX_WAIT itself sleeps only while the word is still 0. */
static void tickets_take(ratd_pool *p)
{
    while (!tickets_try(p)) {
        __atomic_add_fetch(&p->sleepers, 1, __ATOMIC_SEQ_CST);
        if (__atomic_load_n(&p->tickets, __ATOMIC_SEQ_CST) == 0)
            futex(&p->tickets, FUTEX_WAIT_PRIVATE, 0);
        __atomic_sub_fetch(&p->sleepers, 1, __ATOMIC_SEQ_CST);
    }
}

/* t tickets made available and up to t sleepers woken, by one system call */
static void tickets_post(ratd_pool *p, uint32_t t)
{
    __atomic_add_fetch(&p->tickets, t, __ATOMIC_SEQ_CST);
    if (__atomic_load_n(&p->sleepers, __ATOMIC_SEQ_CST) > 0)
        futex(&p->tickets, FUTEX_WAKE_PRIVATE, t);
}

static void ring_push(ratd_pool *p, ratd_work *w)
{
    size_t pos = __atomic_load_n(&p->head, __ATOMIC_RELAXED);
    for (;;) {
        ring_cell *c = &p->cells[pos & p->mask];
        size_t seq = __atomic_load_n(&c->seq, __ATOMIC_ACQUIRE);
        intptr_t dif = (intptr_t)seq - (intptr_t)pos;
        if (dif == 0) {
            if (__atomic_compare_exchange_n(&p->head, &pos, pos + 1, 1, __ATOMIC_RELAXED,
                                            __ATOMIC_RELAXED)) {
                c->w = w;
                __atomic_store_n(&c->seq, pos + 1, __ATOMIC_RELEASE);
                return;
            }
        } else if (dif < 0) { /* full: workers are taking tickets, wait for a cell */
            sched_yield();
            pos = __atomic_load_n(&p->head, __ATOMIC_RELAXED);
        } else {
            pos = __atomic_load_n(&p->head, __ATOMIC_RELAXED);
        }
    }
}

/* Only after a ticket was taken (tickets_try, tickets_take): its cell is published. */
static ratd_work *ring_pop(ratd_pool *p)
{
    size_t pos = __atomic_load_n(&p->tail, __ATOMIC_RELAXED);
    for (;;) {
        ring_cell *c = &p->cells[pos & p->mask];
        size_t seq = __atomic_load_n(&c->seq, __ATOMIC_ACQUIRE);
        intptr_t dif = (intptr_t)seq - (intptr_t)(pos + 1);
        if (dif == 0) {
            if (__atomic_compare_exchange_n(&p->tail, &pos, pos + 1, 1, __ATOMIC_RELAXED,
                                            __ATOMIC_RELAXED)) {
                ratd_work *w = c->w;
                __atomic_store_n(&c->seq, pos + p->mask + 1, __ATOMIC_RELEASE);
                return w;
            }
        } else if (dif < 0) { /* a producer claimed this cell and is writing it */
            sched_yield();
            pos = __atomic_load_n(&p->tail, __ATOMIC_RELAXED);
        } else {
            pos = __atomic_load_n(&p->tail, __ATOMIC_RELAXED);
        }
    }
}

static void atomic_max(uint64_t *a, uint64_t v)
{
    uint64_t m = __atomic_load_n(a, __ATOMIC_RELAXED);
    while (v > m && !__atomic_compare_exchange_n(a, &m, v, 1, __ATOMIC_RELAXED, __ATOMIC_RELAXED))
        ; /* m reloaded */
}

/* Claims and runs tasks of w until none is left. The claim word holds the task count
 * with the index, so a stale ticket (of a finished phase, or of a work since reused)
 * claims either nothing or a task of the work as it is now, never a task twice. */
static void work_run(ratd_work *w, int worker)
{
    for (int round = 0;; round++) {
        uint64_t c = __atomic_fetch_add(&w->claim, 1, __ATOMIC_ACQ_REL);
        uint32_t i = (uint32_t)c, n = (uint32_t)(c >> 32);
        if (i >= n)
            return;
        if (round) /* a task that waited for this worker's previous one */
            __atomic_add_fetch(&w->repeats, 1, __ATOMIC_RELAXED);
        uint64_t t0 = now_ns();
        atomic_max(&w->start_last_ns, t0);
        w->fn(w, (int)i, worker);
        uint64_t t1 = now_ns();
        atomic_max(&w->end_last_ns, t1);
        atomic_max(&w->task_max_ns, t1 - t0);
        __atomic_add_fetch(&w->work_ns, t1 - t0, __ATOMIC_RELAXED);
        if (__atomic_sub_fetch(&w->left, 1, __ATOMIC_ACQ_REL) == 0) {
            w->done(w, worker); /* w may be reused from here on */
            return;
        }
    }
}

static void *worker_main(void *vp)
{
    worker_arg *a = vp;
    ratd_pool *p = a->p;
    char name[16];
    snprintf(name, sizeof name, "ratd-w%d", a->index);
    pthread_setname_np(pthread_self(), name);
    /* bound with the process before it was created (its mask is inherited), and only
     * rebound from outside by ratd_pool_pin_workers */
    for (;;) {
        /* --spin-us: spin a little first, as a worker asleep in the kernel takes tens of
         * microseconds to wake. Off by default: on the GPU host (16 vCPUs) a spinning
         * worker slowed the walks still running (2.17 vs 2.08 ms p50 per layer at 128K,
         * 1.93 vs 1.72 ms with 32 workers; 2 ms of spin: 3.24 ms) */
        int got = 0;
        uint64_t spin = __atomic_load_n(&p->spin_ns, __ATOMIC_RELAXED);
        if (spin) {
            uint64_t until = now_ns() + spin;
            for (unsigned i = 0; !(got = tickets_try(p)); i++) {
                __builtin_ia32_pause();
                if ((i & 63) == 63 && now_ns() > until)
                    break;
            }
        }
        if (!got)
            tickets_take(p);
        ratd_work *w = ring_pop(p);
        if (!w) /* stop */
            break;
        work_run(w, a->index);
    }
    free(a);
    return NULL;
}

ra_status ratd_pool_pin_workers(ratd_pool *p, char *err, size_t errlen)
{
    hwloc_const_cpuset_t set = p->cpuset ? p->cpuset : hwloc_topology_get_allowed_cpuset(p->topo);
    int n_pu = hwloc_get_nbobjs_inside_cpuset_by_type(p->topo, set, HWLOC_OBJ_PU);
    if (n_pu <= 0) {
        snprintf(err, errlen, "--pin-workers: hwloc finds no CPU in the binding set");
        return RA_EIO;
    }
    /* the first PU of every core, then the cores' other PUs (SMT siblings) */
    hwloc_obj_t *pus = malloc((size_t)n_pu * sizeof *pus);
    if (!pus) {
        snprintf(err, errlen, "out of memory");
        return RA_ENOMEM;
    }
    int m = 0, n_core = hwloc_get_nbobjs_inside_cpuset_by_type(p->topo, set, HWLOC_OBJ_CORE);
    hwloc_bitmap_t in = hwloc_bitmap_alloc();
    for (int rank = 0, added = 1; in && added && m < n_pu; rank++) { /* rank-th PU of each core */
        added = 0;
        for (int c = 0; c < n_core && m < n_pu; c++) {
            hwloc_obj_t core = hwloc_get_obj_inside_cpuset_by_type(p->topo, set, HWLOC_OBJ_CORE, c);
            hwloc_bitmap_and(in, core->cpuset, set);
            hwloc_obj_t pu =
                hwloc_get_obj_inside_cpuset_by_type(p->topo, in, HWLOC_OBJ_PU, (unsigned)rank);
            if (pu) {
                pus[m++] = pu;
                added = 1;
            }
        }
    }
    hwloc_bitmap_free(in);
    for (int i = 0; m == 0 && i < n_pu; i++) /* no cores in the topology: the PUs in order */
        pus[m++] = hwloc_get_obj_inside_cpuset_by_type(p->topo, set, HWLOC_OBJ_PU, (unsigned)i);
    ra_status st = RA_OK;
    for (int i = 0; i < p->n_threads; i++) { /* m >= 1: n_pu >= 1 */
        hwloc_obj_t pu = pus[i % m];
        if (hwloc_set_thread_cpubind(p->topo, p->threads[i], pu->cpuset, HWLOC_CPUBIND_THREAD) <
            0) {
            snprintf(err, errlen, "--pin-workers: hwloc cannot bind worker %d to CPU %u", i,
                     pu->os_index);
            st = RA_EIO;
            for (int j = 0; j < i; j++) /* all free again, as without the option */
                hwloc_set_thread_cpubind(p->topo, p->threads[j], set, HWLOC_CPUBIND_THREAD);
            break;
        }
    }
    if (st == RA_OK) {
        size_t len = strlen(p->placement);
        snprintf(p->placement + len, sizeof p->placement - len, ", %d workers pinned to %d CPU(s)",
                 p->n_threads, m < p->n_threads ? m : p->n_threads);
    }
    free(pus);
    return st;
}

void ratd_pool_set_spin(ratd_pool *p, int spin_us)
{
    __atomic_store_n(&p->spin_ns, spin_us > 0 ? (uint64_t)spin_us * 1000u : 0, __ATOMIC_RELAXED);
}

void ratd_pool_submit(ratd_pool *p, ratd_work *w, int n_tasks)
{
    w->submit_ns = now_ns();
    __atomic_store_n(&w->start_last_ns, 0, __ATOMIC_RELAXED);
    __atomic_store_n(&w->end_last_ns, 0, __ATOMIC_RELAXED);
    __atomic_store_n(&w->repeats, 0, __ATOMIC_RELAXED);
    __atomic_store_n(&w->left, n_tasks, __ATOMIC_RELAXED);
    __atomic_store_n(&w->claim, (uint64_t)(uint32_t)n_tasks << 32, __ATOMIC_RELEASE);
    int t = n_tasks < p->n_threads ? n_tasks : p->n_threads;
    for (int i = 0; i < t; i++)
        ring_push(p, w);
    if (t > 0)
        tickets_post(p, (uint32_t)t); /* all the wakes at once, after all the pushes */
}

static void run_task(ratd_work *w, int task, int worker)
{
    (void)worker;
    ratd_pool *p = ((run_work *)w)->p;
    p->run.fn(p->run.arg, task);
}

static void run_done(ratd_work *w, int worker)
{
    (void)worker;
    sem_post(&((run_work *)w)->done);
}

void ratd_pool_run(ratd_pool *p, int n_tasks, ratd_task_fn fn, void *arg)
{
    if (n_tasks <= 0)
        return;
    /* the pool's own work, not one on this stack: leftover tickets may name it later */
    pthread_mutex_lock(&p->run_mu);
    p->run.fn = fn;
    p->run.arg = arg;
    ratd_pool_submit(p, &p->run.w, n_tasks);
    while (sem_wait(&p->run.done) != 0 && errno == EINTR)
        ;
    pthread_mutex_unlock(&p->run_mu);
}

ra_status ratd_pool_create(ratd_pool **out, int n_workers, int numa_node, const char *cpuset,
                           char *err, size_t errlen)
{
    ratd_pool *p = calloc(1, sizeof *p);
    if (!p) {
        snprintf(err, errlen, "out of memory");
        return RA_ENOMEM;
    }
    ra_status st = RA_EINVAL;
    sem_init(&p->run.done, 0, 0);
    pthread_mutex_init(&p->run_mu, NULL);
    p->run.w.fn = run_task;
    p->run.w.done = run_done;
    p->run.p = p;
    p->numa_node = -1;
    snprintf(p->placement, sizeof p->placement, "none");
    if (hwloc_topology_init(&p->topo) < 0 || hwloc_topology_load(p->topo) < 0) {
        snprintf(err, errlen, "hwloc cannot read the machine topology");
        st = RA_EIO;
        goto fail;
    }
    hwloc_const_cpuset_t all = hwloc_topology_get_allowed_cpuset(p->topo);
    hwloc_bitmap_t nodeset = NULL;
    if (numa_node >= 0) {
        hwloc_obj_t node = hwloc_get_numanode_obj_by_os_index(p->topo, (unsigned)numa_node);
        if (!node) {
            snprintf(err, errlen, "--numa-node %d: this machine has %d NUMA node(s)", numa_node,
                     hwloc_get_nbobjs_by_type(p->topo, HWLOC_OBJ_NUMANODE));
            goto fail;
        }
        p->cpuset = hwloc_bitmap_dup(node->cpuset);
        hwloc_bitmap_and(p->cpuset, p->cpuset, all);
        nodeset = hwloc_bitmap_dup(node->nodeset);
        p->numa_node = numa_node;
    }
    if (cpuset && *cpuset) {
        hwloc_bitmap_t s = hwloc_bitmap_alloc();
        if (hwloc_bitmap_list_sscanf(s, cpuset) < 0) {
            hwloc_bitmap_free(s);
            snprintf(err, errlen, "--cpuset '%s' is not a CPU list such as 0-7,16", cpuset);
            goto fail;
        }
        hwloc_bitmap_and(s, s, all);
        hwloc_bitmap_free(p->cpuset);
        p->cpuset = s;
        if (!nodeset) {
            nodeset = hwloc_bitmap_alloc();
            hwloc_cpuset_to_nodeset(p->topo, s, nodeset);
        }
    }
    if (p->cpuset && hwloc_bitmap_iszero(p->cpuset)) {
        snprintf(err, errlen, "the requested CPU set has no CPU this process may use");
        hwloc_bitmap_free(nodeset);
        goto fail;
    }
    if (p->cpuset) {
        /* the whole process: index build threads (OpenMP, FAISS) inherit it */
        if (hwloc_set_cpubind(p->topo, p->cpuset, HWLOC_CPUBIND_PROCESS) < 0)
            RA_WARN("hwloc could not bind the process to its CPU set; running unbound");
        if (nodeset && hwloc_set_membind(p->topo, nodeset, HWLOC_MEMBIND_BIND,
                                         HWLOC_MEMBIND_PROCESS | HWLOC_MEMBIND_BYNODESET) < 0)
            RA_WARN("hwloc could not bind memory to the node set; memory is first-touch");
        char *cs = NULL, *ns = NULL;
        hwloc_bitmap_list_asprintf(&cs, p->cpuset);
        if (nodeset)
            hwloc_bitmap_list_asprintf(&ns, nodeset);
        snprintf(p->placement, sizeof p->placement, "cpus %s, memory on node(s) %s", cs ? cs : "?",
                 ns ? ns : "?");
        free(cs);
        free(ns);
    }
    hwloc_bitmap_free(nodeset);
    if (n_workers <= 0)
        n_workers = hwloc_bitmap_weight(p->cpuset ? p->cpuset : all);
    if (n_workers <= 0)
        n_workers = 1;
    /* A ticket per worker per work at most: room for 1024 works of 64-way fan-out
     * before a submitter has to wait for the workers. */
    size_t cells = 4096, want = 1024 * (size_t)(n_workers < 64 ? n_workers : 64);
    while (cells < want)
        cells <<= 1;
    p->cells = malloc(cells * sizeof *p->cells);
    p->threads = calloc((size_t)n_workers, sizeof *p->threads);
    if (!p->cells || !p->threads) {
        snprintf(err, errlen, "out of memory");
        st = RA_ENOMEM;
        goto fail;
    }
    for (size_t i = 0; i < cells; i++) {
        p->cells[i].seq = i;
        p->cells[i].w = NULL;
    }
    p->mask = cells - 1;
    for (int i = 0; i < n_workers; i++) {
        worker_arg *a = malloc(sizeof *a);
        if (a) {
            a->p = p;
            a->index = i;
        }
        if (!a || pthread_create(&p->threads[i], NULL, worker_main, a) != 0) {
            free(a);
            snprintf(err, errlen, "cannot start worker thread %d", i);
            st = RA_ENOMEM;
            goto fail;
        }
        p->n_threads = i + 1;
    }
    *out = p;
    return RA_OK;
fail:
    ratd_pool_destroy(p);
    return st;
}

void ratd_pool_destroy(ratd_pool *p)
{
    if (!p)
        return;
    for (int i = 0; i < p->n_threads; i++) { /* after every ticket already queued */
        ring_push(p, NULL);
        tickets_post(p, 1);
    }
    for (int i = 0; i < p->n_threads; i++)
        pthread_join(p->threads[i], NULL);
    free(p->threads);
    free(p->cells);
    if (p->cpuset)
        hwloc_bitmap_free(p->cpuset);
    if (p->topo)
        hwloc_topology_destroy(p->topo);
    sem_destroy(&p->run.done);
    pthread_mutex_destroy(&p->run_mu);
    free(p);
}

int ratd_pool_workers(const ratd_pool *p)
{
    return p->n_threads;
}
int ratd_pool_numa_node(const ratd_pool *p)
{
    return p->numa_node;
}
int ratd_pool_bound(const ratd_pool *p)
{
    return p->cpuset != NULL;
}
const char *ratd_pool_placement(const ratd_pool *p)
{
    return p->placement;
}
