/* ra_bigmem.h: mmap / mremap / munmap with MADV_HUGEPAGE. */
#define _GNU_SOURCE
#include "ra_bigmem.h"

#include <sys/mman.h>
#include <unistd.h>

static size_t page_round(size_t bytes)
{
    static size_t page;
    if (!page) {
        long p = sysconf(_SC_PAGESIZE);
        page = p > 0 ? (size_t)p : 4096;
    }
    if (bytes == 0)
        bytes = 1;
    return (bytes + page - 1) / page * page;
}

static void advise(void *p, size_t bytes)
{
#ifdef MADV_HUGEPAGE
    if (bytes >= ((size_t)2 << 20))
        (void)madvise(p, bytes, MADV_HUGEPAGE); /* a hint: refused where THP is off */
#else
    (void)p;
    (void)bytes;
#endif
}

void *ra_big_alloc(size_t bytes)
{
    size_t n = page_round(bytes);
    void *p = mmap(NULL, n, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED)
        return NULL;
    advise(p, n);
    return p;
}

void *ra_big_resize(void *p, size_t old, size_t bytes)
{
    if (!p)
        return ra_big_alloc(bytes);
    size_t o = page_round(old), n = page_round(bytes);
    if (o == n)
        return p;
    void *q = mremap(p, o, n, MREMAP_MAYMOVE);
    if (q == MAP_FAILED)
        return NULL;
    advise(q, n);
    return q;
}

void ra_big_free(void *p, size_t bytes)
{
    if (p)
        munmap(p, page_round(bytes));
}
