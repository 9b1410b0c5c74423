/* Worker pool and hwloc placement (see ratd_pool.h). A run publishes a job under the
 * mutex and bumps a generation counter; workers claim task indices with an atomic
 * counter, so short per-head tasks need no per-task locking. */
#include "ratd_pool.h"

#include <hwloc.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "ra_log.h"

struct ratd_pool {
    pthread_mutex_t mu;
    pthread_cond_t wake, done;
    pthread_t *threads;
    int n_threads; /* background workers (callers add one) */
    int started;
    unsigned long gen;
    int stop;
    /* the current job */
    ratd_task_fn fn;
    void *arg;
    int n_tasks;
    int next;     /* atomic */
    int finished; /* workers done with this generation */
    hwloc_topology_t topo;
    hwloc_bitmap_t cpuset; /* NULL: unbound */
    int numa_node;
    char placement[256];
};

static void work(ratd_pool *p, ratd_task_fn fn, void *arg, int n)
{
    for (;;) {
        int i = __atomic_fetch_add(&p->next, 1, __ATOMIC_RELAXED);
        if (i >= n)
            return;
        fn(arg, i);
    }
}

static void *worker_main(void *vp)
{
    ratd_pool *p = vp;
    if (p->cpuset)
        hwloc_set_cpubind(p->topo, p->cpuset, HWLOC_CPUBIND_THREAD);
    unsigned long seen = 0;
    pthread_mutex_lock(&p->mu);
    for (;;) {
        while (!p->stop && p->gen == seen)
            pthread_cond_wait(&p->wake, &p->mu);
        if (p->stop)
            break;
        seen = p->gen;
        ratd_task_fn fn = p->fn;
        void *arg = p->arg;
        int n = p->n_tasks;
        pthread_mutex_unlock(&p->mu);
        work(p, fn, arg, n);
        pthread_mutex_lock(&p->mu);
        if (++p->finished == p->n_threads)
            pthread_cond_signal(&p->done);
    }
    pthread_mutex_unlock(&p->mu);
    return NULL;
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
    pthread_mutex_init(&p->mu, NULL);
    pthread_cond_init(&p->wake, NULL);
    pthread_cond_init(&p->done, NULL);
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
    p->n_threads = n_workers - 1; /* the caller is a worker too */
    if (p->n_threads > 0) {
        p->threads = calloc((size_t)p->n_threads, sizeof *p->threads);
        if (!p->threads) {
            snprintf(err, errlen, "out of memory");
            st = RA_ENOMEM;
            goto fail;
        }
        for (int i = 0; i < p->n_threads; i++) {
            if (pthread_create(&p->threads[i], NULL, worker_main, p) != 0) {
                snprintf(err, errlen, "cannot start worker thread %d", i);
                st = RA_ENOMEM;
                p->n_threads = i;
                goto fail;
            }
        }
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
    pthread_mutex_lock(&p->mu);
    p->stop = 1;
    pthread_cond_broadcast(&p->wake);
    pthread_mutex_unlock(&p->mu);
    for (int i = 0; i < p->n_threads; i++)
        pthread_join(p->threads[i], NULL);
    free(p->threads);
    if (p->cpuset)
        hwloc_bitmap_free(p->cpuset);
    if (p->topo)
        hwloc_topology_destroy(p->topo);
    pthread_mutex_destroy(&p->mu);
    pthread_cond_destroy(&p->wake);
    pthread_cond_destroy(&p->done);
    free(p);
}

void ratd_pool_run(ratd_pool *p, int n_tasks, ratd_task_fn fn, void *arg)
{
    if (n_tasks <= 0)
        return;
    if (p->n_threads == 0 || n_tasks == 1) {
        for (int i = 0; i < n_tasks; i++)
            fn(arg, i);
        return;
    }
    pthread_mutex_lock(&p->mu);
    p->fn = fn;
    p->arg = arg;
    p->n_tasks = n_tasks;
    __atomic_store_n(&p->next, 0, __ATOMIC_RELAXED);
    p->finished = 0;
    p->gen++;
    pthread_cond_broadcast(&p->wake);
    pthread_mutex_unlock(&p->mu);
    work(p, fn, arg, n_tasks);
    pthread_mutex_lock(&p->mu);
    while (p->finished < p->n_threads)
        pthread_cond_wait(&p->done, &p->mu);
    pthread_mutex_unlock(&p->mu);
}

int ratd_pool_workers(const ratd_pool *p)
{
    return p->n_threads + 1;
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
