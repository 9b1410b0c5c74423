/* Storage of one head's offloaded keys and values: rows of `dim` elements in the
 * session's dtype, the token position of each row, append-only. Row ids are dense
 * int32 (0..n-1) in insertion order; every index backend speaks row ids and this
 * store maps them back to positions. Memory is accounted against an optional
 * budget (ra_mem). Not synchronized: the owner (ra_head) locks. */
#ifndef RA_KV_H
#define RA_KV_H

#include <stddef.h>
#include <stdint.h>

#include "ratd/status.h"

/* A memory account: `limit` bytes (0 = unlimited), `used` updated atomically. Accounts
 * may nest (a session's inside the daemon's): every change applies to the account and
 * each parent, and a reservation must fit every limit on the way up. */
typedef struct ra_mem {
    size_t limit;
    size_t used; /* accessed with __atomic builtins */
    struct ra_mem *parent; /* NULL, or an account that also carries these bytes */
} ra_mem;

/* Reserve / release bytes on an account (acct may be NULL). RA_ENOMEM when over a limit. */
ra_status ra_mem_reserve(ra_mem *acct, size_t bytes);
void ra_mem_release(ra_mem *acct, size_t bytes);
/* Adds bytes whatever the limits (growth that already happened, e.g. an index that
 * followed accepted rows). */
void ra_mem_charge(ra_mem *acct, size_t bytes);

typedef struct ra_kv ra_kv;

#define RA_KV_MAX_ROWS ((size_t)1 << 30)

ra_status ra_kv_create(ra_kv **out, int dim, ra_dtype dtype, ra_mem *acct);
void ra_kv_destroy(ra_kv *kv);

/* Appends n rows. k and v are n*dim elements of the store's dtype, pos n positions.
 * Rejects NaN/Inf (RA_ENONFINITE) and overflow (RA_ETOOBIG) before changing anything. */
ra_status ra_kv_append(ra_kv *kv, const void *k, const void *v, const int64_t *pos, size_t n);

/* What growing the store for n more rows would reserve on its account now: *cap the
 * rows it would grow to (0 and *bytes 0: no growth needed), *bytes the reservation
 * (the new arrays, less the old ones when they can be remapped in place). exact: grow
 * to exactly count + n rows; else by the geometric step. */
void ra_kv_grow_cost(const ra_kv *kv, size_t n, int exact, size_t *cap, size_t *bytes);
/* Grows the capacity to `cap` rows (no-op when it holds that many), drawing on
 * `prepaid` bytes the caller already reserved on the account and reserving any
 * shortfall; *left gets what of prepaid was not used (all of it on failure), which the
 * caller releases. A later append of up to cap - count rows then needs no memory. */
ra_status ra_kv_grow(ra_kv *kv, size_t cap, size_t prepaid, size_t *left);

size_t ra_kv_count(const ra_kv *kv);
int ra_kv_dim(const ra_kv *kv);
ra_dtype ra_kv_dtype(const ra_kv *kv);
/* Contiguous rows; the pointers change when ra_kv_append grows the store. */
const void *ra_kv_keys(const ra_kv *kv);
const void *ra_kv_values(const ra_kv *kv);
const int64_t *ra_kv_positions(const ra_kv *kv);
/* Bytes held (for stats). */
size_t ra_kv_bytes(const ra_kv *kv);

/* A read-only view of rows [0, count now) that stays valid while the store grows
 * (for a background build that reads without the owner's lock). Pin and unpin under
 * the owner's exclusive lock; the view is freed by ra_kv_unpin only, and must not be
 * appended to (RA_ESTATE). Arrays replaced while pinned are freed at the last unpin. */
ra_status ra_kv_pin(ra_kv *kv, ra_kv **view);
void ra_kv_unpin(ra_kv *kv, ra_kv *view);

#endif
