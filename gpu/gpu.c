/* The front end of gpu/: every public call of include/ratd/gpu.h lands here, is checked
 * (state, layer, pointers, shapes) and is handed to the chosen backend. The token
 * bookkeeping (sink fill, window ring, eviction and offload stages) lives here once,
 * so that the CUDA backend and the CPU reference agree on it by construction; it
 * advances only after the backend reported success. */
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "ra_gpu_internal.h"
#include "ra_log.h"

#define RA_GPU_MAX_DIM 1024u
#define RA_GPU_MAX_HEADS 1024u
#define RA_GPU_MAX_TOPK 1024u

static _Thread_local char *err_redirect;

void ra_gpu_err_redirect(char *buf)
{
    err_redirect = buf;
}

ra_status ra_gpu_fail(ra_gpu_cache *c, ra_status s, const char *fmt, ...)
{
    char buf[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(buf, sizeof buf, fmt, ap);
    va_end(ap);
    if (err_redirect)
        memcpy(err_redirect, buf, sizeof buf);
    else if (c)
        memcpy(c->err, buf, sizeof buf);
    if (s == RA_EDEVICE || s == RA_EINTERNAL)
        RA_ERROR("gpu: %s", buf);
    else
        RA_DEBUG("gpu: %s (%s)", buf, ra_strerror(s));
    return s;
}

void ra_gpu_config_init(ra_gpu_config *cfg)
{
    memset(cfg, 0, sizeof *cfg);
    cfg->dtype = RA_DTYPE_F16;
    cfg->backend = RA_GPU_BACKEND_AUTO;
    cfg->evict_capacity = 64;
}

int ra_gpu_cuda_available(void)
{
    return ra_gpu_cuda_probe();
}

void *ra_gpu_host_alloc(size_t bytes)
{
    if (bytes == 0)
        bytes = 1;
    void *p = ra_gpu_cuda_host_alloc(bytes);
    if (p)
        return p;
    if (posix_memalign(&p, 64, bytes) != 0)
        return NULL;
    return p;
}

void ra_gpu_host_free(void *p)
{
    if (!p)
        return;
    if (!ra_gpu_cuda_host_free(p))
        free(p);
}

void ra_gpu_cache_inject_fault(ra_gpu_cache *c, int cuda_error)
{
    c->inject = cuda_error;
}

static ra_status check_config(const ra_gpu_config *g)
{
    if (g->n_layers == 0 || g->n_layers > 4096)
        return ra_gpu_fail(NULL, RA_EINVAL, "n_layers %u out of range", g->n_layers);
    if (g->n_kv_heads == 0 || g->n_q_heads == 0 || g->n_q_heads > RA_GPU_MAX_HEADS ||
        g->n_q_heads % g->n_kv_heads != 0)
        return ra_gpu_fail(NULL, RA_EINVAL, "heads q=%u kv=%u: q must be a multiple of kv",
                           g->n_q_heads, g->n_kv_heads);
    if (g->head_dim == 0 || g->head_dim > RA_GPU_MAX_DIM)
        return ra_gpu_fail(NULL, RA_EINVAL, "head_dim %u out of range", g->head_dim);
    if (g->dtype != RA_DTYPE_F16 && g->dtype != RA_DTYPE_BF16 && g->dtype != RA_DTYPE_F32)
        return ra_gpu_fail(NULL, RA_EINVAL, "unknown dtype %d", (int)g->dtype);
    if (g->window == 0 || g->window > (1u << 24) || g->sink > (1u << 24))
        return ra_gpu_fail(NULL, RA_EINVAL, "sink %u / window %u out of range", g->sink,
                           g->window);
    if (g->batch == 0 || g->batch > 4096)
        return ra_gpu_fail(NULL, RA_EINVAL, "batch %u out of range", g->batch);
    if (g->evict_capacity > (1u << 20))
        return ra_gpu_fail(NULL, RA_EINVAL, "evict_capacity %u out of range",
                           g->evict_capacity);
    if (!(g->scale >= 0.0f) || isinf(g->scale))
        return ra_gpu_fail(NULL, RA_EINVAL, "scale must be finite and >= 0");
    if (g->backend != RA_GPU_BACKEND_AUTO && g->backend != RA_GPU_BACKEND_CPU &&
        g->backend != RA_GPU_BACKEND_CUDA)
        return ra_gpu_fail(NULL, RA_EINVAL, "unknown backend %d", (int)g->backend);
    return RA_OK;
}

/* Staging memory: pinned and mapped on the CUDA backend (its kernels write evicted rows
 * straight into it and its copies are asynchronous), any host memory on the CPU one. */
static void *stage_alloc(const ra_gpu_cache *c, size_t bytes)
{
    if (c->backend == RA_GPU_BACKEND_CUDA)
        return ra_gpu_cuda_host_alloc(bytes ? bytes : 1);
    return ra_gpu_host_alloc(bytes);
}

static size_t layer_stage_elems(const ra_gpu_cache *c, size_t tokens)
{
    return (size_t)c->cfg.batch * c->cfg.n_kv_heads * tokens * c->cfg.head_dim;
}

static void free_layers(ra_gpu_cache *c)
{
    if (!c->layers)
        return;
    for (unsigned l = 0; l < c->cfg.n_layers; l++) {
        ra_gpu_layer *L = &c->layers[l];
        ra_gpu_host_free(L->ev_k);
        ra_gpu_host_free(L->ev_v);
        free(L->ev_pos);
        ra_gpu_host_free(L->off_k);
        ra_gpu_host_free(L->off_v);
        free(L->off_pos);
    }
    free(c->layers);
    c->layers = NULL;
}

ra_status ra_gpu_cache_create(const ra_gpu_config *cfg, ra_gpu_cache **out)
{
    if (!cfg || !out)
        return RA_EINVAL;
    ra_status s = check_config(cfg);
    if (s != RA_OK)
        return s;
    ra_gpu_cache *c = calloc(1, sizeof *c);
    if (!c)
        return RA_ENOMEM;
    c->cfg = *cfg;
    if (c->cfg.evict_capacity == 0)
        c->cfg.evict_capacity = 64;
    if (c->cfg.scale == 0.0f)
        c->cfg.scale = 1.0f / sqrtf((float)c->cfg.head_dim);
    c->esize = ra_dtype_size(cfg->dtype);
    c->rows = (size_t)cfg->sink + cfg->window;
    c->group = cfg->n_q_heads / cfg->n_kv_heads;

    switch (cfg->backend) {
    case RA_GPU_BACKEND_CPU:
        c->backend = RA_GPU_BACKEND_CPU;
        break;
    case RA_GPU_BACKEND_CUDA:
        c->backend = RA_GPU_BACKEND_CUDA;
        break;
    default:
        c->backend = ra_gpu_cuda_probe() ? RA_GPU_BACKEND_CUDA : RA_GPU_BACKEND_CPU;
        break;
    }
    c->cfg.backend = c->backend;
    c->ops = c->backend == RA_GPU_BACKEND_CUDA ? &ra_gpu_cuda_ops : &ra_gpu_cpu_ops;

    c->layers = calloc(cfg->n_layers, sizeof *c->layers);
    if (!c->layers) {
        s = RA_ENOMEM;
        goto fail_noimpl;
    }
    s = c->ops->init(c); /* before the host stages: pinned memory needs the device set */
    if (s != RA_OK)
        goto fail_noimpl;
    size_t cap = c->cfg.evict_capacity ? c->cfg.evict_capacity : 1;
    size_t ev_bytes = layer_stage_elems(c, cap) * c->esize;
    for (unsigned l = 0; l < cfg->n_layers; l++) {
        ra_gpu_layer *L = &c->layers[l];
        L->ev_k = stage_alloc(c, ev_bytes);
        L->ev_v = stage_alloc(c, ev_bytes);
        L->ev_pos = malloc(cap * sizeof(int64_t));
        if (!L->ev_k || !L->ev_v || !L->ev_pos) {
            s = RA_ENOMEM;
            goto fail;
        }
    }
    *out = c;
    return RA_OK;
fail:
    c->ops->fini(c);
fail_noimpl:
    free_layers(c);
    free(c);
    return s;
}

void ra_gpu_cache_destroy(ra_gpu_cache *c)
{
    if (!c)
        return;
    if (!c->broken)
        c->ops->sync(c);
    free_layers(c); /* host stages before the backend: pinned frees need the context */
    c->ops->fini(c);
    free(c);
}

ra_gpu_backend ra_gpu_cache_backend(const ra_gpu_cache *c)
{
    return c->backend;
}

const ra_gpu_config *ra_gpu_cache_config(const ra_gpu_cache *c)
{
    return &c->cfg;
}

const char *ra_gpu_cache_last_error(const ra_gpu_cache *c)
{
    return c ? c->err : "";
}

int ra_gpu_cache_broken(const ra_gpu_cache *c)
{
    return c->broken;
}

void *ra_gpu_cache_stream(const ra_gpu_cache *c)
{
    return c->ops->stream(c);
}

#define CHECK_USABLE(c)                                                                   \
    do {                                                                                  \
        if (!(c))                                                                         \
            return RA_EINVAL;                                                             \
        if ((c)->broken)                                                                  \
            return ra_gpu_fail((c), RA_ESTATE, "cache is broken by an earlier device fault"); \
    } while (0)

ra_status ra_gpu_cache_set_stream(ra_gpu_cache *c, void *stream)
{
    CHECK_USABLE(c);
    if (c->backend != RA_GPU_BACKEND_CUDA)
        return stream ? ra_gpu_fail(c, RA_ENOTSUP, "no streams on the CPU backend") : RA_OK;
    return c->ops->set_stream(c, stream);
}

ra_status ra_gpu_cache_sync(ra_gpu_cache *c)
{
    CHECK_USABLE(c);
    return c->ops->sync(c);
}

ra_status ra_gpu_cache_reset(ra_gpu_cache *c)
{
    CHECK_USABLE(c);
    ra_status s = c->ops->sync(c);
    if (s != RA_OK)
        return s;
    for (unsigned l = 0; l < c->cfg.n_layers; l++) {
        ra_gpu_layer *L = &c->layers[l];
        L->n_seen = 0;
        L->n_evicted = 0;
        L->evict_viewing = 0;
        L->n_offload = 0;
        L->offload_pending = 0;
    }
    return RA_OK;
}

static unsigned local_count(const ra_gpu_cache *c, unsigned n_seen)
{
    unsigned sink = c->cfg.sink, w = c->cfg.window;
    if (n_seen <= sink)
        return n_seen;
    unsigned in_w = n_seen - sink;
    return sink + (in_w < w ? in_w : w);
}

ra_status ra_gpu_cache_tokens(const ra_gpu_cache *c, unsigned layer, unsigned *n_seen,
                              unsigned *n_local)
{
    if (!c)
        return RA_EINVAL;
    if (layer >= c->cfg.n_layers)
        return RA_ENOLAYER;
    unsigned n = c->layers[layer].n_seen;
    if (n_seen)
        *n_seen = n;
    if (n_local)
        *n_local = local_count(c, n);
    return RA_OK;
}

/* Null, misaligned, or (device) not device memory: RA_EINVAL. */
static ra_status check_ptr(ra_gpu_cache *c, ra_gpu_mem mem, const void *p, const char *what)
{
    if (!p)
        return ra_gpu_fail(c, RA_EINVAL, "%s is NULL", what);
    if ((uintptr_t)p % 16 != 0)
        return ra_gpu_fail(c, RA_EINVAL, "%s is not 16-byte aligned", what);
    if (mem == RA_GPU_MEM_DEVICE && !c->cfg.skip_pointer_check)
        return c->ops->check_dev(c, p, what);
    return RA_OK;
}

static ra_status check_mem(ra_gpu_cache *c, ra_gpu_mem mem)
{
    if (mem != RA_GPU_MEM_HOST && mem != RA_GPU_MEM_DEVICE)
        return ra_gpu_fail(c, RA_EINVAL, "unknown memory kind %d", (int)mem);
    if (mem == RA_GPU_MEM_DEVICE && c->backend != RA_GPU_BACKEND_CUDA)
        return ra_gpu_fail(c, RA_ENOTSUP, "device pointers need the CUDA backend");
    return RA_OK;
}

#define TRY(x)                                                                            \
    do {                                                                                  \
        ra_status s_ = (x);                                                               \
        if (s_ != RA_OK)                                                                  \
            return s_;                                                                    \
    } while (0)

static ra_status grow_offload(ra_gpu_cache *c, ra_gpu_layer *L, size_t n)
{
    if (L->off_cap >= n)
        return RA_OK;
    size_t bytes = layer_stage_elems(c, n) * c->esize;
    void *k = stage_alloc(c, bytes);
    void *v = stage_alloc(c, bytes);
    int64_t *pos = malloc(n * sizeof *pos);
    if (!k || !v || !pos) {
        ra_gpu_host_free(k);
        ra_gpu_host_free(v);
        free(pos);
        return ra_gpu_fail(c, RA_ENOMEM, "no pinned memory for %zu staged tokens", n);
    }
    ra_gpu_host_free(L->off_k);
    ra_gpu_host_free(L->off_v);
    free(L->off_pos);
    L->off_k = k;
    L->off_v = v;
    L->off_pos = pos;
    L->off_cap = n;
    return RA_OK;
}

ra_status ra_gpu_ingest_prefill(ra_gpu_cache *c, unsigned layer, ra_gpu_mem mem, const void *k,
                                const void *v, unsigned n_tokens)
{
    CHECK_USABLE(c);
    if (layer >= c->cfg.n_layers)
        return ra_gpu_fail(c, RA_ENOLAYER, "layer %u >= %u", layer, c->cfg.n_layers);
    TRY(check_mem(c, mem));
    TRY(check_ptr(c, mem, k, "k"));
    TRY(check_ptr(c, mem, v, "v"));
    if (n_tokens == 0 || n_tokens > (1u << 30))
        return ra_gpu_fail(c, RA_ESHAPE, "n_tokens %u out of range", n_tokens);
    ra_gpu_layer *L = &c->layers[layer];
    if (L->n_seen != 0)
        return ra_gpu_fail(c, RA_ESTATE, "layer %u already holds %u tokens (reset first)", layer,
                           L->n_seen);
    if (L->offload_pending)
        return ra_gpu_fail(c, RA_EBUSY, "layer %u: offload stage not released", layer);
    unsigned sink = c->cfg.sink, w = c->cfg.window;
    unsigned n_mid = n_tokens > sink + w ? n_tokens - sink - w : 0;
    if (n_mid)
        TRY(grow_offload(c, L, n_mid));
    TRY(c->ops->ingest(c, layer, mem, k, v, n_tokens, n_mid));
    for (unsigned i = 0; i < n_mid; i++)
        L->off_pos[i] = (int64_t)sink + i;
    L->n_offload = n_mid;
    L->offload_pending = n_mid > 0;
    L->n_seen = n_tokens;
    return RA_OK;
}

static void fill_view(const ra_gpu_cache *c, ra_gpu_staged *out, unsigned n, const void *k,
                      const void *v, const int64_t *pos)
{
    memset(out, 0, sizeof *out);
    out->n_tokens = n;
    out->batch = c->cfg.batch;
    out->n_kv_heads = c->cfg.n_kv_heads;
    out->head_dim = c->cfg.head_dim;
    out->dtype = c->cfg.dtype;
    out->k = k;
    out->v = v;
    out->pos = pos;
    out->head_stride = (size_t)n * c->cfg.head_dim;
    out->seq_stride = out->head_stride * c->cfg.n_kv_heads;
    out->pos_stride = 0;
}

ra_status ra_gpu_cache_offload_view(ra_gpu_cache *c, unsigned layer, ra_gpu_staged *out)
{
    CHECK_USABLE(c);
    if (!out)
        return RA_EINVAL;
    if (layer >= c->cfg.n_layers)
        return ra_gpu_fail(c, RA_ENOLAYER, "layer %u >= %u", layer, c->cfg.n_layers);
    ra_gpu_layer *L = &c->layers[layer];
    if (L->offload_pending)
        TRY(c->ops->wait_offload(c, layer));
    unsigned n = L->offload_pending ? L->n_offload : 0;
    fill_view(c, out, n, L->off_k, L->off_v, L->off_pos);
    return RA_OK;
}

ra_status ra_gpu_cache_offload_release(ra_gpu_cache *c, unsigned layer)
{
    CHECK_USABLE(c);
    if (layer >= c->cfg.n_layers)
        return ra_gpu_fail(c, RA_ENOLAYER, "layer %u >= %u", layer, c->cfg.n_layers);
    ra_gpu_layer *L = &c->layers[layer];
    if (L->offload_pending)
        TRY(c->ops->wait_offload(c, layer)); /* the copy must not land in a reused buffer */
    L->offload_pending = 0;
    L->n_offload = 0;
    return RA_OK;
}

void ra_gpu_cache_trim(ra_gpu_cache *c)
{
    if (!c || c->broken)
        return;
    for (unsigned l = 0; l < c->cfg.n_layers; l++) {
        ra_gpu_layer *L = &c->layers[l];
        if (L->offload_pending)
            continue;
        ra_gpu_host_free(L->off_k);
        ra_gpu_host_free(L->off_v);
        free(L->off_pos);
        L->off_k = L->off_v = NULL;
        L->off_pos = NULL;
        L->off_cap = 0;
    }
}

ra_status ra_gpu_attend_local(ra_gpu_cache *c, unsigned layer, ra_gpu_mem mem, const void *q,
                              const void *k_new, const void *v_new, float *o, float *lse)
{
    CHECK_USABLE(c);
    if (layer >= c->cfg.n_layers)
        return ra_gpu_fail(c, RA_ENOLAYER, "layer %u >= %u", layer, c->cfg.n_layers);
    TRY(check_mem(c, mem));
    TRY(check_ptr(c, mem, q, "q"));
    TRY(check_ptr(c, mem, k_new, "k_new"));
    TRY(check_ptr(c, mem, v_new, "v_new"));
    TRY(check_ptr(c, mem, o, "o"));
    TRY(check_ptr(c, mem, lse, "lse"));
    ra_gpu_layer *L = &c->layers[layer];
    if (L->evict_viewing)
        return ra_gpu_fail(c, RA_EBUSY, "layer %u: eviction view not released", layer);
    if (L->n_seen >= (1u << 30))
        return ra_gpu_fail(c, RA_ETOOBIG, "layer %u: position limit reached", layer);
    unsigned sink = c->cfg.sink, w = c->cfg.window;
    ra_gpu_step_plan p;
    memset(&p, 0, sizeof p);
    p.pos = L->n_seen;
    if (p.pos < sink) {
        p.row = p.pos; /* the sink fills first: the window stays empty until it is full */
    } else {
        unsigned in_w = p.pos - sink;
        p.row = sink + in_w % w;
        p.evict = in_w >= w;
    }
    p.n_local = local_count(c, p.pos + 1);
    if (p.evict) {
        if (L->n_evicted >= c->cfg.evict_capacity)
            return ra_gpu_fail(c, RA_EBUSY,
                               "layer %u: eviction stage full (%u tokens): Append and release",
                               layer, L->n_evicted);
        p.ev_slot = L->n_evicted;
    }
    TRY(c->ops->step(c, layer, &p, mem, q, k_new, v_new, o, lse));
    if (p.evict) {
        L->ev_pos[p.ev_slot] = (int64_t)p.pos - w;
        L->n_evicted++;
    }
    L->n_seen++;
    return RA_OK;
}

ra_status ra_gpu_cache_evicted_view(ra_gpu_cache *c, unsigned layer, ra_gpu_staged *out)
{
    CHECK_USABLE(c);
    if (!out)
        return RA_EINVAL;
    if (layer >= c->cfg.n_layers)
        return ra_gpu_fail(c, RA_ENOLAYER, "layer %u >= %u", layer, c->cfg.n_layers);
    ra_gpu_layer *L = &c->layers[layer];
    unsigned n = L->n_evicted;
    if (n && !L->evict_viewing)
        TRY(c->ops->fetch_evicted(c, layer, n));
    if (n)
        L->evict_viewing = 1;
    fill_view(c, out, n, L->ev_k, L->ev_v, L->ev_pos);
    return RA_OK;
}

ra_status ra_gpu_cache_evicted_release(ra_gpu_cache *c, unsigned layer)
{
    CHECK_USABLE(c);
    if (layer >= c->cfg.n_layers)
        return ra_gpu_fail(c, RA_ENOLAYER, "layer %u >= %u", layer, c->cfg.n_layers);
    ra_gpu_layer *L = &c->layers[layer];
    if (L->n_evicted && !L->evict_viewing)
        return ra_gpu_fail(c, RA_ESTATE, "layer %u: release without a view drops tokens",
                           layer);
    L->n_evicted = 0;
    L->evict_viewing = 0;
    return RA_OK;
}

static int dtype_ok(ra_dtype t)
{
    return t == RA_DTYPE_F32 || t == RA_DTYPE_F16 || t == RA_DTYPE_BF16;
}

ra_status ra_gpu_merge(ra_gpu_cache *c, ra_gpu_mem mem, const float *o_local,
                       const float *lse_local, const void *o_remote, ra_dtype remote_dtype,
                       const float *lse_remote, void *o_out, ra_dtype out_dtype, float *lse_out)
{
    CHECK_USABLE(c);
    TRY(check_mem(c, mem));
    TRY(check_ptr(c, mem, o_local, "o_local"));
    TRY(check_ptr(c, mem, lse_local, "lse_local"));
    TRY(check_ptr(c, mem, o_remote, "o_remote"));
    TRY(check_ptr(c, mem, lse_remote, "lse_remote"));
    TRY(check_ptr(c, mem, o_out, "o_out"));
    if (lse_out)
        TRY(check_ptr(c, mem, lse_out, "lse_out"));
    if (!dtype_ok(remote_dtype) || !dtype_ok(out_dtype))
        return ra_gpu_fail(c, RA_EINVAL, "merge dtypes %d/%d", (int)remote_dtype,
                           (int)out_dtype);
    if ((const void *)o_out == (const void *)o_local && out_dtype != RA_DTYPE_F32)
        return ra_gpu_fail(c, RA_EINVAL, "o_out may alias o_local only in F32");
    return c->ops->merge(c, mem, o_local, lse_local, o_remote, remote_dtype, lse_remote, o_out,
                         out_dtype, lse_out);
}

ra_status ra_gpu_knn(ra_gpu_cache *c, ra_gpu_mem mem, ra_dtype dtype, const void *queries,
                     size_t nq, const void *keys, size_t nk, unsigned dim, unsigned top_k,
                     int32_t *ids, float *scores)
{
    CHECK_USABLE(c);
    TRY(check_mem(c, mem));
    TRY(check_ptr(c, mem, queries, "queries"));
    TRY(check_ptr(c, mem, keys, "keys"));
    TRY(check_ptr(c, mem, ids, "ids"));
    TRY(check_ptr(c, mem, scores, "scores"));
    if (!dtype_ok(dtype))
        return ra_gpu_fail(c, RA_EINVAL, "knn dtype %d", (int)dtype);
    if (nq == 0 || nk == 0 || nk > (size_t)INT32_MAX || nq > (size_t)INT32_MAX)
        return ra_gpu_fail(c, RA_ESHAPE, "knn nq %zu / nk %zu out of range", nq, nk);
    if (dim == 0 || dim > RA_GPU_MAX_DIM)
        return ra_gpu_fail(c, RA_ESHAPE, "knn dim %u out of range", dim);
    if (top_k == 0 || top_k > RA_GPU_MAX_TOPK || top_k > nk)
        return ra_gpu_fail(c, RA_ESHAPE, "knn top_k %u out of range (nk %zu, max %u)", top_k,
                           nk, RA_GPU_MAX_TOPK);
    return c->ops->knn(c, mem, dtype, queries, nq, keys, nk, dim, top_k, ids, scores);
}
