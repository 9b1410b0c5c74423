/* Large arrays straight from the kernel (mmap), for the K/V store and the graph's node
 * records: page-aligned (so 64-byte rows never straddle an extra cache line), marked for
 * transparent huge pages (a walk over a few GB of records misses the TLB on nearly every
 * key with 4 KB pages), and grown by mremap, which moves page tables instead of copying
 * the data: growing a 1M-key store by one decode step's tokens used to copy half a
 * gigabyte while an Append waited. Sizes are rounded up to whole pages. */
#ifndef RA_BIGMEM_H
#define RA_BIGMEM_H

#include <stddef.h>

/* NULL when the kernel refuses; the memory is zeroed. */
void *ra_big_alloc(size_t bytes);
/* Grows or shrinks p (from ra_big_alloc, `old` bytes) to `bytes`, moving it if needed;
 * the contents up to the smaller size are kept. NULL on failure, p still valid. */
void *ra_big_resize(void *p, size_t old, size_t bytes);
void ra_big_free(void *p, size_t bytes);

#endif
