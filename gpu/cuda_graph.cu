/* The CUDA graph build (steps 1-4 of ra_gpu_graph_build, gpu.h; cpu_graph.c is the
 * reference): query->key and key->key exact lists by cuBLAS GEMM over score tiles of at
 * most tile_bytes plus the top-k kernel, the occurrence lists of each key by a stable
 * radix sort (CUB), one block per key for the projection candidates and the occlusion
 * pruning, the reverse edges by a second stable sort and one block per key again. It
 * runs on a stream of its own (not the cache's decode stream, which keeps running),
 * allocates stream-ordered (cudaMallocAsync: no implicit device-wide synchronisation of
 * cudaFree), and waits on that stream only. */
#include <cub/cub.cuh>

#include <stdlib.h>
#include <string.h>

#include "cuda_internal.h"
#include "cuda_mma_topk.h"
#include "ra_env.h"
#include "ra_log.h"

#include <pthread.h>

/* A kernel's dynamic shared-memory ceiling (cudaFuncAttributeMaxDynamicSharedMemorySize)
 * is the function's, for every thread and stream of the device: two builds that set it
 * each to their own size could lower it under the other's launch. So it is only ever
 * raised, under one lock, to what a launch needs; the table keeps what each (kernel,
 * device) has (beyond its 64 entries it is set every time, as before). */
static cudaError_t smem_at_least(const void *fn, int bytes)
{
    static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
    static struct {
        const void *fn;
        int dev, bytes;
    } tab[64];
    static int n;
    int dev = 0;
    cudaError_t e = cudaGetDevice(&dev);
    if (e != cudaSuccess)
        return e;
    pthread_mutex_lock(&mu);
    int i = 0;
    while (i < n && !(tab[i].fn == fn && tab[i].dev == dev))
        i++;
    if (i == n && n < 64) {
        tab[n].fn = fn, tab[n].dev = dev, tab[n].bytes = 0;
        n++;
    }
    if (i >= 64 || tab[i].bytes < bytes) {
        e = cudaFuncSetAttribute(fn, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
        if (e == cudaSuccess && i < 64)
            tab[i].bytes = bytes;
    }
    pthread_mutex_unlock(&mu);
    return e;
}

#define GB_THREADS 128
#define GB_WARPS (GB_THREADS / 32)
#define GB_MS 4096          /* multiset of projection candidates: 32 lists x max(66, K - 1) */
#define GB_CAND 2048 /* scored candidates: 4 M + key_knn (projection), or REV_CAP */

struct cuda_graph {
    cudaStream_t s, s2; /* s2: the top-k of a tile while s computes the next tile's GEMM */
    cublasHandle_t blas;
    cudaEvent_t ev[6];
    cudaEvent_t tev[5]; /* GEMM done [2], top-k done [2] (per tile buffer), the join */
};

static void lane_fini(cuda_impl *m, int lane)
{
    struct cuda_graph *g = m->graph[lane];
    if (!g)
        return;
    if (g->s)
        cudaStreamSynchronize(g->s);
    if (g->blas)
        cublasDestroy(g->blas);
    for (int i = 0; i < 6; i++)
        if (g->ev[i])
            cudaEventDestroy(g->ev[i]);
    for (int i = 0; i < 5; i++)
        if (g->tev[i])
            cudaEventDestroy(g->tev[i]);
    if (g->s2) {
        cudaStreamSynchronize(g->s2);
        cudaStreamDestroy(g->s2);
    }
    if (g->s)
        cudaStreamDestroy(g->s);
    cudaGetLastError();
    free(g);
    m->graph[lane] = NULL;
}

void ra_gpu_cuda_graph_fini(ra_gpu_cache *c)
{
    cuda_impl *m = IMPL(c);
    for (int i = 0; m && i < RA_GPU_GRAPH_LANES; i++)
        lane_fini(m, i);
}

/* Two lanes where the device's free memory holds two heads' peak and a quarter more
 * (RA_GPU_GRAPH_LANES 1-2 asks for fewer or as many); called with no build running. */
int ra_gpu_cuda_graph_lanes(ra_gpu_cache *c, size_t peak)
{
    static ra_env_once once;
    int want = ra_env_int(&once, "RA_GPU_GRAPH_LANES", RA_GPU_GRAPH_LANES);
    want = want < 1 ? 1 : want > RA_GPU_GRAPH_LANES ? RA_GPU_GRAPH_LANES : want;
    size_t fr = 0, total = 0;
    if (want == 1 || cudaSetDevice(IMPL(c)->device) != cudaSuccess ||
        cudaMemGetInfo(&fr, &total) != cudaSuccess) {
        cudaGetLastError();
        return 1;
    }
    size_t need = peak + peak / 4;
    if (!need) /* not measured */
        return 1;
    size_t fit = fr / need;
    return fit < 1 ? 1 : fit < (size_t)want ? (int)fit : want;
}

/* ---- device helpers ---------------------------------------------------------------- */

__device__ __forceinline__ float gf(__half x)
{
    return __half2float(x);
}
__device__ __forceinline__ float gf(__nv_bfloat16 x)
{
    return __bfloat162float(x);
}
__device__ __forceinline__ float gf(float x)
{
    return x;
}

/* one warp: the dots of a shared fp32 row with four key rows in global memory (lane l sums
 * dims l, l + 32, ... in order, then a butterfly over the lanes: every dot is the same
 * bits whichever rows share its call), the four rows' loads in flight together */
template <typename T>
__device__ __forceinline__ void warp_dot4(const float *a, const T *const b[4], unsigned dim,
                                          float out[4])
{
    float s[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    for (unsigned d = threadIdx.x % 32; d < dim; d += 32) {
        float x = a[d];
#pragma unroll
        for (int q = 0; q < 4; q++)
            s[q] += x * gf(b[q][d]);
    }
#pragma unroll
    for (int q = 0; q < 4; q++) {
#pragma unroll
        for (int o = 16; o > 0; o >>= 1)
            s[q] += __shfl_xor_sync(0xffffffffu, s[q], o);
        out[q] = s[q];
    }
}

/* ordered compaction, one chunk of blockDim.x flags: returns the exclusive rank of this
 * thread's flag among the chunk's set flags plus *base, and advances *base (shared) by
 * the chunk's count. Every thread of the block calls it. */
__device__ unsigned block_rank(bool f, unsigned *base, unsigned *wsum)
{
    unsigned lane = threadIdx.x % 32, w = threadIdx.x / 32;
    unsigned b = __ballot_sync(0xffffffffu, f);
    unsigned r = __popc(b & ((1u << lane) - 1));
    if (lane == 0)
        wsum[w] = __popc(b);
    __syncthreads();
    unsigned off = *base;
    for (unsigned i = 0; i < w; i++)
        off += wsum[i];
    unsigned tot = 0;
    for (unsigned i = 0; i < GB_WARPS; i++)
        tot += wsum[i];
    __syncthreads();
    if (threadIdx.x == 0)
        *base += tot;
    __syncthreads();
    return off + r;
}

/* Shared memory of the pruning, for at most C candidates (a power of two: the sort's
 * length). After it, 16-byte aligned, its tail: the candidates being tested, a row of dim
 * floats per warp (prune_scalar), or the MMA rounds' rows (prune_mma; pr_tail
 * has the sizes). */
#define PR_R 16 /* candidates a round of prune_mma: one m16 tile */
/* prune_mma: a kept row's slot fits a byte, 0xff free; the last n-tile of the kept rows
 * (8 rows) may reach 7 rows past M, into the round's rows, which follow them (its dots
 * are masked by the kept count) */
static_assert(RA_GPU_GRAPH_MAX_DEGREE <= 255, "prune_mma's slot (at most degree - 1) is a byte");
static_assert(PR_R >= 7, "the kept rows' last n-tile stays inside the tail");
template <unsigned C> struct prune_smem {
    unsigned long long ck[C];
    int kept[RA_GPU_GRAPH_MAX_DEGREE];
    unsigned char drop[C];
    unsigned n_kept;
    unsigned char b_occ[GB_WARPS], b_pair[GB_WARPS]; /* a round's verdicts (prune_scalar) */
    /* prune_mma: the round's candidates (indices into ck), their scores against u, the
     * verdict bits the MMA epilogue sets, and each one's slot among the kept rows */
    unsigned nb, bi[PR_R];
    float s[PR_R];
    unsigned occ, pair[PR_R];
    unsigned char slot[PR_R];
};

static __host__ __device__ __forceinline__ size_t pr_align(size_t b)
{
    return (b + 15) & ~(size_t)15;
}

/* prune_mma's tail: the kept keys' rows (M rows) and the round's (PR_R rows), dim + MT_PAD
 * elements of 2 bytes each (conflict-free ldmatrix) */
static __host__ __device__ __forceinline__ size_t pr_tail(unsigned dim, unsigned M, int mma)
{
    if (!mma)
        return (size_t)GB_WARPS * dim * sizeof(float);
    return ((size_t)M + PR_R) * (dim + MT_PAD) * 2;
}
template <unsigned C>
static __host__ __device__ __forceinline__ size_t pr_bytes(unsigned dim, unsigned M, int mma)
{
    return pr_align(sizeof(prune_smem<C>)) + pr_tail(dim, M, mma);
}

/* the next (at most want) distinct candidates from ck[*i] into bi, their number returned
 * (a repeated id: one id, one dot, one key) */
template <unsigned C>
__device__ __forceinline__ unsigned pr_round(const prune_smem<C> *sm, unsigned P, unsigned *i,
                                             unsigned *bi, unsigned want)
{
    unsigned nb = 0;
    while (nb < want && *i < P) {
        unsigned long long k = sm->ck[*i];
        if (k == ~0ull) {
            *i = P;
            break;
        }
        if (*i == 0 || sm->ck[*i - 1] != k)
            bi[nb++] = *i;
        (*i)++;
    }
    return nb;
}

/* The greedy occlusion rule (cpu_graph.c prune()) over the candidates sorted in sm->ck
 * (P entries, ~0 padded), one warp a candidate: a round takes the next GB_WARPS candidates
 * at once, a warp each: its candidate against every key kept before the round, and
 * against the round's earlier candidates; thread 0 then settles the round in order
 * (occluded by a kept key, or by an earlier candidate of the round that it keeps). The
 * same dots, in the same order of summation, and the same verdicts as one candidate at a
 * time, with two barriers a round instead of three a candidate. */
template <typename T, unsigned C>
__device__ void prune_scalar(const T *keys, unsigned dim, unsigned P, unsigned M, prune_smem<C> *sm,
                             float *cf)
{
    const unsigned w = threadIdx.x / 32, lane = threadIdx.x % 32;
    float *cw = cf + (size_t)w * dim; /* this warp's candidate */
    for (unsigned i = 0;;) {
        /* the round: the next GB_WARPS distinct ids (every thread finds the same) */
        unsigned bi[GB_WARPS];
        const unsigned nb = pr_round(sm, P, &i, bi, GB_WARPS);
        const unsigned nk = sm->n_kept;
        if (nb == 0 || nk >= M)
            break;
        if (w < nb) {
            unsigned long long k = sm->ck[bi[w]];
            float s = tk_score(k);
            const T *cr = keys + (size_t)(unsigned)k * dim;
            for (unsigned d = lane; d < dim; d += 32)
                cw[d] = gf(cr[d]); /* read back by the same lanes (warp_dot) */
            /* against the kept keys, then the round's earlier candidates, four rows at a
             * time (a padding slot repeats a real row; its dot is not looked at) */
            bool occl = false;
            for (unsigned j0 = 0; j0 < nk && !occl; j0 += 4) {
                const T *b4[4];
                float d4[4];
#pragma unroll
                for (int q = 0; q < 4; q++)
                    b4[q] = keys + (size_t)sm->kept[j0 + q < nk ? j0 + q : j0] * dim;
                warp_dot4(cw, b4, dim, d4);
#pragma unroll
                for (int q = 0; q < 4; q++)
                    occl |= j0 + q < nk && d4[q] > s;
            }
            unsigned pair = 0;
            for (unsigned j0 = 0; j0 < w && !occl; j0 += 4) {
                const T *b4[4];
                float d4[4];
#pragma unroll
                for (int q = 0; q < 4; q++)
                    b4[q] = keys + (size_t)(unsigned)sm->ck[bi[j0 + q < w ? j0 + q : j0]] * dim;
                warp_dot4(cw, b4, dim, d4);
#pragma unroll
                for (int q = 0; q < 4; q++)
                    if (j0 + q < w && d4[q] > s)
                        pair |= 1u << (j0 + q);
            }
            if (lane == 0) {
                sm->b_occ[w] = occl;
                sm->b_pair[w] = (unsigned char)pair;
            }
        }
        __syncthreads();
        if (threadIdx.x == 0) {
            unsigned kept_mask = 0;
            for (unsigned b = 0; b < nb && sm->n_kept < M; b++) {
                bool o = sm->b_occ[b] || (sm->b_pair[b] & kept_mask);
                sm->drop[bi[b]] = (unsigned char)o;
                if (!o) {
                    sm->kept[sm->n_kept++] = (int)(unsigned)sm->ck[bi[b]];
                    kept_mask |= 1u << b;
                }
            }
        }
        __syncthreads();
    }
}

/* The same rule as prune_scalar, PR_R candidates a round, their dots by tensor-core MMA
 * (bf16/f16 rows of dim a multiple of 16, fp32 accumulation; code for sm_80+): the
 * round's rows against the kept keys' rows, which stay in shared memory as they are kept,
 * and against each other. The epilogue sets a candidate's bit where a kept key scores
 * above its score against u (occluded), and bit j of its pair mask where the round's
 * candidate j before it does; thread 0 settles the round in order as prune_scalar does.
 * Four barriers a round of PR_R, and each candidate's row read from global memory once.
 * The dots sum in the MMA's order, not warp_dot4's: a candidate within rounding of the
 * rule's boundary may get the other verdict. */
template <typename T, unsigned C>
__device__ void prune_mma(const T *keys, unsigned dim, unsigned P, unsigned M, prune_smem<C> *sm,
                          unsigned char *tail)
{
#if MT_OLD_ARCH
    __trap();
#else
    const unsigned S = dim + MT_PAD;
    T *krow = reinterpret_cast<T *>(tail), *crow = krow + (size_t)M * S;
    const unsigned w = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
    const unsigned ch = dim * 2 / 16; /* 16-byte chunks of a row */
    unsigned i = 0;                   /* thread 0's place in ck */
    if (threadIdx.x == 0)
        sm->nb = pr_round(sm, P, &i, sm->bi, PR_R);
    __syncthreads();
    for (;;) {
        const unsigned nb = sm->nb, nk = sm->n_kept;
        if (nb == 0 || nk >= M)
            break;
        /* the round's rows (zero past nb), scores, verdict bits cleared */
        for (unsigned x = threadIdx.x; x < PR_R * ch; x += blockDim.x) {
            unsigned b = x / ch, c = x % ch;
            uint4 v = make_uint4(0, 0, 0, 0);
            if (b < nb)
                v = reinterpret_cast<const uint4 *>(keys +
                                                    (size_t)(unsigned)sm->ck[sm->bi[b]] * dim)[c];
            reinterpret_cast<uint4 *>(crow + (size_t)b * S)[c] = v;
        }
        if (threadIdx.x < PR_R) {
            unsigned b = threadIdx.x;
            sm->s[b] = b < nb ? tk_score(sm->ck[sm->bi[b]]) : INFINITY;
            sm->pair[b] = 0;
            if (b == 0)
                sm->occ = 0;
        }
        __syncthreads();
        /* n-tiles of 8 columns: the kept keys', then the round's two */
        const unsigned ntk = (nk + 7) / 8, nt = ntk + 2;
        for (unsigned ti = w; ti < nt; ti += GB_WARPS) {
            const bool own = ti >= ntk;
            const T *brow = own ? crow + (size_t)(ti - ntk) * 8 * S : krow + (size_t)ti * 8 * S;
            float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
            for (unsigned k0 = 0; k0 < dim; k0 += 16) {
                unsigned a[4], bf[2];
                mt_ldsm4(a, crow + (size_t)(lane % 16) * S + k0 + (lane / 16) * 8);
                mt_ldsm2(bf, brow + (size_t)(lane % 8) * S + k0 + ((lane / 8) % 2) * 8);
                mt_mma<T>(acc, a, bf);
            }
#pragma unroll
            for (int e = 0; e < 4; e++) {
                unsigned r = g + (e / 2) * 8, j = (own ? ti - ntk : ti) * 8 + 2 * t + e % 2;
                float f = acc[e];
                if (own && j < r && f > sm->s[r])
                    atomicOr(&sm->pair[r], 1u << j);
                else if (!own && j < nk && f > sm->s[r])
                    atomicOr(&sm->occ, 1u << r);
            }
        }
        __syncthreads();
        if (threadIdx.x == 0) {
            unsigned kept_mask = 0;
            for (unsigned b = 0; b < nb; b++) {
                sm->slot[b] = 0xff;
                if (sm->n_kept >= M)
                    continue;
                bool o = ((sm->occ >> b) & 1u) || (sm->pair[b] & kept_mask);
                sm->drop[sm->bi[b]] = (unsigned char)o;
                if (!o) {
                    sm->slot[b] = (unsigned char)sm->n_kept;
                    sm->kept[sm->n_kept++] = (int)(unsigned)sm->ck[sm->bi[b]];
                    kept_mask |= 1u << b;
                }
            }
            sm->nb = pr_round(sm, P, &i, sm->bi, PR_R);
        }
        __syncthreads();
        /* the kept candidates' rows join the kept keys' */
        for (unsigned x = threadIdx.x; x < nb * ch; x += blockDim.x) {
            unsigned b = x / ch, c = x % ch;
            if (sm->slot[b] != 0xff)
                reinterpret_cast<uint4 *>(krow + (size_t)sm->slot[b] * S)[c] =
                    reinterpret_cast<const uint4 *>(crow + (size_t)b * S)[c];
        }
        __syncthreads();
    }
#endif
}

/* Scores ids[0..nc) (in shared memory; u and -1 skipped) against key u, sorts, prunes
 * into row (M slots, -1 padded): cpu_graph.c prune(). ur must hold u's row; sm is
 * followed by the pruning's tail (pr_bytes: mma says which). */
template <typename T, unsigned C>
__device__ void prune_block(const T *keys, unsigned dim, int u, const int *ids, unsigned nc,
                            unsigned M, prune_smem<C> *sm, const float *ur, int mma, int *row)
{
    unsigned char *tail = reinterpret_cast<unsigned char *>(sm) + pr_align(sizeof(prune_smem<C>));
    const unsigned w = threadIdx.x / 32, lane = threadIdx.x % 32;
    unsigned P = 1;
    while (P < nc)
        P <<= 1;
    for (unsigned i0 = 4 * w; i0 < P; i0 += 4 * GB_WARPS) { /* four a warp at a time */
        const T *b4[4];
        float d4[4];
        bool ok[4];
#pragma unroll
        for (int q = 0; q < 4; q++) {
            unsigned i = i0 + q;
            ok[q] = i < nc && ids[i] >= 0 && ids[i] != u;
            b4[q] = keys + (size_t)(ok[q] ? ids[i] : u) * dim;
        }
        warp_dot4(ur, b4, dim, d4);
#pragma unroll
        for (int q = 0; q < 4; q++)
            if (lane == 0 && i0 + q < P) /* sorted ascending: best first */
                sm->ck[i0 + q] = ok[q] ? tk_ckey(d4[q], ids[i0 + q]) : ~0ull;
    }
    for (unsigned i = threadIdx.x; i < P; i += blockDim.x)
        sm->drop[i] = 2; /* not looked at */
    if (threadIdx.x == 0)
        sm->n_kept = 0;
    __syncthreads();
    block_sort(sm->ck, P);
    if constexpr (sizeof(T) == 2) {
        if (mma)
            prune_mma<T, C>(keys, dim, P, M, sm, tail);
        else
            prune_scalar<T, C>(keys, dim, P, M, sm, reinterpret_cast<float *>(tail));
    } else {
        prune_scalar<T, C>(keys, dim, P, M, sm, reinterpret_cast<float *>(tail));
    }
    /* every thread has read n_kept for the last time in the loop */
    __syncthreads();
    if (threadIdx.x == 0) /* refill to M/2 with the best dropped, in order */
        for (unsigned i = 0; i < P && sm->n_kept < M / 2; i++)
            if (sm->drop[i] == 1)
                sm->kept[sm->n_kept++] = (int)(unsigned)sm->ck[i];
    __syncthreads();
    for (unsigned j = threadIdx.x; j < M; j += blockDim.x)
        row[j] = j < sm->n_kept ? sm->kept[j] : -1;
}

/* The projection's shared memory: this struct, key u's row (dim floats), then one region
 * that is first the multiset (GB_MS ids) and then, once the candidates are chosen, the
 * pruning's (pr_bytes): proj_bytes has the layout. */
template <unsigned C> struct proj_smem {
    int cand[C];
    unsigned hist[RA_GPU_GRAPH_LISTS + 2];
    unsigned m, nd, nc, base, wsum[GB_WARPS], thr, need;
};
/* a kernel's block of shared memory: its struct S, the key's row (dim floats) right after
 * it, and from this offset its region (the pruning's, or what shares the room) */
template <typename S> static __host__ __device__ __forceinline__ size_t blk_region(unsigned dim)
{
    return pr_align(sizeof(S)) + pr_align((size_t)dim * sizeof(float));
}
template <unsigned C> static size_t proj_bytes(unsigned dim, unsigned M, int mma)
{
    size_t r = pr_bytes<C>(dim, M, mma), ms = (size_t)GB_MS * sizeof(unsigned);
    return blk_region<proj_smem<C>>(dim) + (r > ms ? r : ms);
}

/* the length of the run of equal ids that starts at ms[i] (at most LISTS + 1 long) */
__device__ __forceinline__ unsigned run_len(const unsigned *ms, unsigned i, unsigned m)
{
    unsigned j = i + 1;
    while (j < m && ms[j] == ms[i])
        j++;
    return j - i;
}

/* One block per key u: the projection candidates (cpu_graph.c step 3), its key->key
 * list, pruned into adj1[u]. ql [nq][K]; occ_v: occurrences (q K + r) sorted by key,
 * off [n + 1]; kk [n][L + 1] (u itself among them, usually first). */
template <typename T, unsigned C>
__global__ void __launch_bounds__(GB_THREADS)
    proj_kernel(const T *keys, unsigned dim, const int *ql, unsigned K, const unsigned *occ_v,
                const int *off, const int *kk, unsigned L, unsigned M, int mma, int *adj1)
{
    extern __shared__ __align__(16) unsigned char smraw[];
    proj_smem<C> *sm = reinterpret_cast<proj_smem<C> *>(smraw);
    float *ur = reinterpret_cast<float *>(smraw + pr_align(sizeof(proj_smem<C>)));
    unsigned char *region = smraw + blk_region<proj_smem<C>>(dim);
    unsigned *ms = reinterpret_cast<unsigned *>(region); /* then the pruning's (pr) */
    prune_smem<C> *pr = reinterpret_cast<prune_smem<C> *>(region);
    const int u = (int)blockIdx.x;
    const unsigned w = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int W = RA_GPU_GRAPH_WINDOW;
    for (unsigned d = threadIdx.x; d < dim; d += blockDim.x)
        ur[d] = gf(keys[(size_t)u * dim + d]);
    if (threadIdx.x == 0) {
        sm->m = 0;
        sm->nd = 0;
        sm->nc = 0;
        sm->base = 0;
    }
    for (unsigned i = threadIdx.x; i < RA_GPU_GRAPH_LISTS + 2; i += blockDim.x)
        sm->hist[i] = 0;
    __syncthreads();
    int o0 = off[u], o1 = off[u + 1];
    if (o1 > o0 + RA_GPU_GRAPH_LISTS)
        o1 = o0 + RA_GPU_GRAPH_LISTS;
    /* the multiset: a warp per occurrence, its lanes over the window */
    for (int o = o0 + (int)w; o < o1; o += GB_WARPS) {
        unsigned v0 = occ_v[o];
        unsigned q = v0 / K;
        int r = (int)(v0 % K), len = (int)K;
        const int *l = ql + (size_t)q * K;
        int lo = r == 0 ? 1 : (r - W < 0 ? 0 : r - W);
        int hi = r == 0 ? len - 1 : (r + W >= len ? len - 1 : r + W);
        int extra = r > 0 && lo > 0;
        for (int j0 = lo; j0 <= hi + extra; j0 += 32) { /* one shared atomic per warp */
            int j = j0 + (int)lane;
            int v = j > hi + extra ? u : j > hi ? l[0] : l[j];
            bool f = v != u;
            unsigned b = __ballot_sync(0xffffffffu, f), base = 0;
            if (lane == 0 && b)
                base = atomicAdd(&sm->m, __popc(b));
            base = __shfl_sync(0xffffffffu, base, 0);
            unsigned slot = base + __popc(b & ((1u << lane) - 1));
            if (f && slot < GB_MS) /* the host bounds K so that it always is */
                ms[slot] = (unsigned)v;
        }
    }
    __syncthreads();
    unsigned m = sm->m < GB_MS ? sm->m : GB_MS, P = 1;
    while (P < m)
        P <<= 1;
    for (unsigned i = m + threadIdx.x; i < P; i += blockDim.x)
        ms[i] = 0xffffffffu;
    __syncthreads();
    if (m > 1)
        block_sort(ms, P);
    /* the distinct ids are the run starts of the sorted multiset; their counts are 1..32
     * (a key is once in a list): the most frequent 4M by a histogram of the counts */
    const unsigned cp = 4 * M;
    for (unsigned i = threadIdx.x; i < m; i += blockDim.x)
        if (i == 0 || ms[i] != ms[i - 1]) {
            atomicAdd(&sm->hist[run_len(ms, i, m)], 1u);
            atomicAdd(&sm->nd, 1u);
        }
    __syncthreads();
    unsigned nd = sm->nd;
    if (threadIdx.x == 0) {
        unsigned cum = 0, t = 0;
        if (nd > cp) {
            for (t = RA_GPU_GRAPH_LISTS + 1; t > 0; t--) {
                if (cum + sm->hist[t] >= cp)
                    break;
                cum += sm->hist[t];
            }
        }
        sm->thr = t;                              /* counts > t all, == t the first need */
        sm->need = nd > cp ? cp - cum : nd;
        sm->base = 0;
    }
    __syncthreads();
    unsigned thr = sm->thr, need = sm->need;
    for (unsigned c0 = 0; c0 < m; c0 += blockDim.x) { /* ids ascending: ties by lower id */
        unsigned i = c0 + threadIdx.x;
        bool st = i < m && (i == 0 || ms[i] != ms[i - 1]);
        unsigned cnt = st ? run_len(ms, i, m) : 0;
        bool eq = st && cnt == thr && nd > cp;
        unsigned r = block_rank(eq, &sm->base, sm->wsum);
        bool take = st && (nd <= cp || cnt > thr || (eq && r < need));
        if (take) {
            unsigned slot = atomicAdd(&sm->nc, 1u);
            sm->cand[slot] = (int)ms[i];
        }
    }
    __syncthreads();
    /* the candidates are read from cand from here on: the multiset's room goes to the pruning */
    /* the key->key list: the first L of its L + 1 that are not u */
    if (threadIdx.x == 0) {
        const int *kr = kk + (size_t)u * (L + 1);
        unsigned nc = sm->nc, t = 0;
        for (unsigned j = 0; j <= L && t < L; j++)
            if (kr[j] != u) {
                sm->cand[nc++] = kr[j];
                t++;
            }
        sm->nc = nc;
    }
    __syncthreads();
    prune_block<T, C>(keys, dim, u, sm->cand, sm->nc, M, pr, ur, mma, adj1 + (size_t)u * M);
}

/* the reverse pass's shared memory: this struct, key v's row (dim floats), the pruning's
 * (pr_bytes): rev_bytes */
struct rev_smem {
    int cand[RA_GPU_GRAPH_REV_CAP];
    unsigned base, wsum[GB_WARPS], deg;
};
template <unsigned C> static size_t rev_bytes(unsigned dim, unsigned M, int mma)
{
    return blk_region<rev_smem>(dim) + pr_bytes<C>(dim, M, mma);
}

/* One block per key v: its row then the sources of its incoming edges (ioff/isrc, in id
 * order) not in the row, at most REV_CAP; over M: pruned again (cpu_graph.c step 4). */
template <typename T, unsigned C>
__global__ void __launch_bounds__(GB_THREADS)
    rev_kernel(const T *keys, unsigned dim, const int *adj1, const int *ioff, const int *isrc,
               unsigned M, int mma, int *adj)
{
    static_assert(RA_GPU_GRAPH_REV_CAP <= C, "the reverse pass's candidates fit the pruning");
    extern __shared__ __align__(16) unsigned char smraw[];
    rev_smem *sm = reinterpret_cast<rev_smem *>(smraw);
    const int v = (int)blockIdx.x;
    const int *r1 = adj1 + (size_t)v * M;
    if (threadIdx.x == 0) {
        unsigned d = 0;
        while (d < M && r1[d] >= 0) {
            sm->cand[d] = r1[d];
            d++;
        }
        sm->deg = d;
        sm->base = d;
    }
    __syncthreads();
    const unsigned deg = sm->deg;
    const int i0 = ioff[v], i1 = ioff[v + 1];
    for (int c0 = i0; c0 < i1; c0 += (int)blockDim.x) {
        if (sm->base >= RA_GPU_GRAPH_REV_CAP)
            break; /* block-uniform: base is shared and read after a barrier */
        int i = c0 + (int)threadIdx.x;
        int src = i < i1 ? isrc[i] : -1;
        bool f = src >= 0;
        for (unsigned j = 0; j < deg && f; j++)
            f = r1[j] != src;
        unsigned r = block_rank(f, &sm->base, sm->wsum);
        if (f && r < RA_GPU_GRAPH_REV_CAP)
            sm->cand[r] = src;
    }
    __syncthreads(); /* the last chunk's candidates, before any thread reads them */
    unsigned nc = sm->base < RA_GPU_GRAPH_REV_CAP ? sm->base : RA_GPU_GRAPH_REV_CAP;
    int *row = adj + (size_t)v * M;
    if (nc <= M) {
        for (unsigned j = threadIdx.x; j < M; j += blockDim.x)
            row[j] = j < nc ? sm->cand[j] : -1;
        return;
    }
    float *ur = reinterpret_cast<float *>(smraw + pr_align(sizeof(rev_smem)));
    unsigned char *region = smraw + blk_region<rev_smem>(dim);
    for (unsigned d = threadIdx.x; d < dim; d += blockDim.x)
        ur[d] = gf(keys[(size_t)v * dim + d]);
    __syncthreads();
    prune_block<T, C>(keys, dim, v, sm->cand, nc, M, reinterpret_cast<prune_smem<C> *>(region), ur,
                      mma, row);
}

__global__ void iota_kernel(unsigned *a, size_t n)
{
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n)
        a[i] = (unsigned)i;
}

/* counts of each id < n in a[0..len) into cnt (zeroed) */
__global__ void hist_kernel(const int *a, size_t len, int n, int *cnt)
{
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < len && a[i] >= 0 && a[i] < n)
        atomicAdd(&cnt[a[i]], 1);
}

/* edges of adj1 as (target, source): padding becomes target n (sorted last) */
__global__ void edges_kernel(const int *adj1, size_t len, unsigned M, int n, unsigned *to,
                             unsigned *from)
{
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < len) {
        to[i] = adj1[i] >= 0 ? (unsigned)adj1[i] : (unsigned)n;
        from[i] = (unsigned)(i / M);
    }
}

/* ---- host side --------------------------------------------------------------------- */

static unsigned grid_of(size_t n)
{
    return (unsigned)((n + 255) / 256);
}

/* stream-ordered allocations of one build, freed together */
struct gb_mem {
    void *p[48];
    int n;
    size_t bytes, peak;
};

static ra_status gb_alloc(ra_gpu_cache *c, gb_mem *a, cudaStream_t stream, void **out,
                          size_t bytes)
{
    ra_status s = RA_OK;
    int committed = 0;
    void *p = NULL;
    if (a->n == (int)(sizeof a->p / sizeof a->p[0]))
        return ra_gpu_fail(c, RA_EINTERNAL, "CUDA graph build: more than %d allocations", a->n);
    CK(cudaMallocAsync(&p, bytes ? bytes : 16, stream));
    a->p[a->n++] = p;
    a->bytes += bytes;
    if (a->bytes > a->peak)
        a->peak = a->bytes;
    *out = p;
    return RA_OK;
fail:
    return s;
}

static void gb_free(gb_mem *a, cudaStream_t s)
{
    for (int i = 0; i < a->n; i++)
        cudaFreeAsync(a->p[i], s);
    a->n = 0;
    a->bytes = 0;
}

#define ALLOC(ptr, bytes)                                                                 \
    do {                                                                                  \
        void *p_ = NULL;                                                                  \
        if ((s = gb_alloc(c, &mem_, g->s, &p_, (bytes))) != RA_OK)                        \
            goto fail;                                                                    \
        ptr = (decltype(ptr))p_;                                                          \
    } while (0)

/* whether this device runs sm_80+ code of this file's kernels (bf16 MMA, cp.async): an
 * sm_86 GPU under the default RA_CUDA_ARCHS "90;75" runs the compute_75 PTX, whose MMA
 * bodies trap (MT_OLD_ARCH); and whether a block may have smem bytes of shared memory */
static bool mma_code_ok(int device, size_t smem)
{
    cudaFuncAttributes fa;
    int optin = 0;
    if (cudaFuncGetAttributes(&fa, mt_kth_kernel) != cudaSuccess || fa.ptxVersion < 80 ||
        fa.binaryVersion < 80 ||
        cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device) !=
            cudaSuccess ||
        (size_t)optin < smem) {
        cudaGetLastError();
        return false;
    }
    return true;
}

/* The projection (phase 0) or the reverse pass (phase 1), one block a key. The pruning
 * takes prune_mma where it can (2-byte keys, 16-byte aligned, dim a multiple of 16 up to
 * 256, sm_80+ code; RA_GPU_MMA_PRUNE=0 turns it off), and sorts at most 512 candidates
 * where the shape allows (4 M + key_knn <= 512: a smaller block, more blocks an SM). */
template <typename T, unsigned C>
static ra_status launch_kernels(ra_gpu_cache *c, struct cuda_graph *g, const void *dk, unsigned dim,
                                const int *ql, unsigned K, const unsigned *occ_v, const int *off,
                                const int *kk, unsigned L, unsigned M, size_t n, int *adj1,
                                const int *ioff, const int *isrc, int *adj2, int phase)
{
    ra_status s = RA_OK;
    int committed = 0;
    static ra_env_once once;
    int mma = sizeof(T) == 2 && !((uintptr_t)dk & 15) && dim % 16 == 0 && dim <= 256 &&
              ra_env_int(&once, "RA_GPU_MMA_PRUNE", 1);
    size_t sm = phase == 0 ? proj_bytes<C>(dim, M, mma) : rev_bytes<C>(dim, M, mma);
    if (mma && !mma_code_ok(IMPL(c)->device, sm)) {
        mma = 0;
        sm = phase == 0 ? proj_bytes<C>(dim, M, mma) : rev_bytes<C>(dim, M, mma);
    }
    if (phase == 0) {
        CK(smem_at_least((const void *)proj_kernel<T, C>, (int)sm));
        proj_kernel<T, C><<<(unsigned)n, GB_THREADS, sm, g->s>>>((const T *)dk, dim, ql, K, occ_v,
                                                                 off, kk, L, M, mma, adj1);
    } else {
        CK(smem_at_least((const void *)rev_kernel<T, C>, (int)sm));
        rev_kernel<T, C><<<(unsigned)n, GB_THREADS, sm, g->s>>>((const T *)dk, dim, adj1, ioff,
                                                                isrc, M, mma, adj2);
    }
    CK(cudaGetLastError());
    return RA_OK;
fail:
    return s;
}

template <typename T>
static ra_status launch_sized(ra_gpu_cache *c, struct cuda_graph *g, const void *dk, unsigned dim,
                              const int *ql, unsigned K, const unsigned *occ_v, const int *off,
                              const int *kk, unsigned L, unsigned M, size_t n, int *adj1,
                              const int *ioff, const int *isrc, int *adj2, int phase)
{
    if (4 * (size_t)M + L <= 512)
        return launch_kernels<T, 512>(c, g, dk, dim, ql, K, occ_v, off, kk, L, M, n, adj1, ioff,
                                      isrc, adj2, phase);
    return launch_kernels<T, GB_CAND>(c, g, dk, dim, ql, K, occ_v, off, kk, L, M, n, adj1, ioff,
                                      isrc, adj2, phase);
}

static ra_status launch_typed(ra_gpu_cache *c, struct cuda_graph *g, ra_dtype t, const void *dk,
                              unsigned dim, const int *ql, unsigned K, const unsigned *occ_v,
                              const int *off, const int *kk, unsigned L, unsigned M, size_t n,
                              int *adj1, const int *ioff, const int *isrc, int *adj2, int phase)
{
    switch (t) {
    case RA_DTYPE_F16:
        return launch_sized<__half>(c, g, dk, dim, ql, K, occ_v, off, kk, L, M, n, adj1, ioff, isrc,
                                    adj2, phase);
    case RA_DTYPE_BF16:
        return launch_sized<__nv_bfloat16>(c, g, dk, dim, ql, K, occ_v, off, kk, L, M, n, adj1,
                                           ioff, isrc, adj2, phase);
    default:
        return launch_sized<float>(c, g, dk, dim, ql, K, occ_v, off, kk, L, M, n, adj1, ioff, isrc,
                                   adj2, phase);
    }
}

/* exact top-k of rows [0, nrows) of `rows` among the n keys (key i at keys + i ldk
 * elements), tiles of tile_floats / n rows in two buffers: the GEMM of a tile (stream s)
 * runs while the top-k of the one before it (stream s2) reads the other buffer; s waits
 * for s2 at the end. With thr, not the lists but the thresholds of mt_kth_kernel. */
static ra_status tiled_lists(ra_gpu_cache *c, struct cuda_graph *g, ra_dtype t, const void *rows,
                             size_t nrows, const void *keys, size_t n, size_t ldk, unsigned dim,
                             unsigned k, float *const tile[2], size_t tile_floats, int *ids,
                             float *scores, float *thr)
{
    ra_status s = RA_OK;
    int committed = 0;
    size_t es = ra_dtype_size(t);
    const float one = 1.0f, zero = 0.0f;
    size_t ti = 0, tile_rows = tile_floats / n;
    if (tile_rows < 1)
        return ra_gpu_fail(c, RA_EINTERNAL, "CUDA graph build: a tile of %zu floats, rows of %zu",
                           tile_floats, n);
    for (size_t r0 = 0; r0 < nrows; r0 += tile_rows, ti++) {
        size_t nr = nrows - r0 < tile_rows ? nrows - r0 : tile_rows;
        int b = (int)(ti & 1);
        if (ti >= 2) /* the top-k of tile ti - 2 has read this buffer */
            CK(cudaStreamWaitEvent(g->s, g->tev[2 + b], 0));
        /* column-major S (n x nr) = K^T Q: row-major S[row][key], as cuda_knn */
        CKB(cublasGemmEx(g->blas, CUBLAS_OP_T, CUBLAS_OP_N, (int)n, (int)nr, (int)dim, &one, keys,
                         blas_type(t), (int)ldk, (const char *)rows + r0 * dim * es, blas_type(t),
                         (int)dim, &zero, tile[b], CUDA_R_32F, (int)n, CUBLAS_COMPUTE_32F,
                         CUBLAS_GEMM_DEFAULT));
        CK(cudaEventRecord(g->tev[b], g->s));
        CK(cudaStreamWaitEvent(g->s2, g->tev[b], 0));
        if (thr)
            mt_kth_kernel<<<(unsigned)((nr + 7) / 8), 256, 0, g->s2>>>(tile[b], n, k, nr, thr + r0);
        else
            topk_kernel<<<(unsigned)nr, TOPK_THREADS, 0, g->s2>>>(tile[b], n, k, ids, scores, r0);
        CK(cudaGetLastError());
        CK(cudaEventRecord(g->tev[2 + b], g->s2));
    }
    CK(cudaEventRecord(g->tev[4], g->s2));
    CK(cudaStreamWaitEvent(g->s, g->tev[4], 0));
    return RA_OK;
fail:
    return s;
}

/* cuda_mma_topk.h's path for this shape: 0 where it does not apply (code for an
 * architecture before sm_80, too little shared memory a block, fp32, a head dim other than
 * 64 or 128, unaligned rows, few keys, k above 256 or RA_GPU_MMA_TOPK=0), else the
 * sample's stride, and in *rank the rank in the sample that makes a row's threshold.
 *
 * The rank j = max(16, k / 8) and the stride s = E / j for E expected candidates a row
 * (the caller's: a quarter or a half of its lists' room, cap): a row's j-th best sampled
 * score is about its (j s = E)-th best overall. With one key sampled at random from every
 * s, a row whose true top-k holds j or more sampled keys (fewer than k candidates: the
 * exact path) is a Poisson tail of mean k / s (<= 4 at k 65, E 256), and one with fewer
 * than j sampled among its best cap (over cap candidates) one of mean cap / s >= 2j:
 * both rare, neither wrong. RA_GPU_MMA_RANK sets j (a study knob). */
static size_t mma_stride(int device, ra_dtype t, unsigned dim, const void *rows, const void *keys,
                         size_t n, unsigned k, size_t E, unsigned *rank)
{
    static ra_env_once once, once_rank;
    if (!ra_env_int(&once, "RA_GPU_MMA_TOPK", 1))
        return 0;
    if ((t != RA_DTYPE_BF16 && t != RA_DTYPE_F16) || (dim != 64 && dim != 128) ||
        ((uintptr_t)rows & 15) || ((uintptr_t)keys & 15) || k > 256 || n < 2 * (size_t)MT_CAP)
        return 0;
    unsigned j = (k + 7) / 8 > 16 ? (k + 7) / 8 : 16;
    int jr = ra_env_int(&once_rank, "RA_GPU_MMA_RANK", 0);
    if (jr > 0 && jr <= 32 * MT_LANE_TOP)
        j = (unsigned)jr;
    size_t stride = E / j;
    if (stride < 2 || E < 2 * (size_t)k)
        return 0;
    /* sm_80+ code, and the filter's three stages must fit a block's shared memory (dim
     * 128: 102 KB, more than sm_86/89 allow) */
    if (!mma_code_ok(device, mt_filter_smem(dim, ra_dtype_size(t)) + MT_BM * sizeof(unsigned)))
        return 0;
    *rank = j;
    return stride;
}

template <int D, typename T, bool SYM>
static ra_status mma_filter_t(ra_gpu_cache *c, struct cuda_graph *g, const void *rows, size_t nr,
                              const void *keys, size_t n, const float *thr, unsigned *cnt,
                              unsigned long long *cand, unsigned cap)
{
    ra_status s = RA_OK;
    int committed = 0;
    const int sm = (int)mt_filter_smem(D, sizeof(T));
    CK(smem_at_least((const void *)mt_filter_kernel<D, T, SYM>, sm));
    mt_filter_kernel<D, T, SYM><<<(unsigned)((nr + MT_BM - 1) / MT_BM), MT_THREADS, sm, g->s>>>(
        (const T *)rows, nr, (const T *)keys, n, thr, cnt, cand, cap);
    CK(cudaGetLastError());
    return RA_OK;
fail:
    return s;
}

static ra_status mma_filter(ra_gpu_cache *c, struct cuda_graph *g, ra_dtype t, unsigned dim,
                            bool sym, const void *rows, size_t nr, const void *keys, size_t n,
                            const float *thr, unsigned *cnt, unsigned long long *cand, unsigned cap)
{
#define RA_MF(D, T, SY) mma_filter_t<D, T, SY>(c, g, rows, nr, keys, n, thr, cnt, cand, cap)
    if (t == RA_DTYPE_BF16)
        return dim == 64
                   ? (sym ? RA_MF(64, __nv_bfloat16, true) : RA_MF(64, __nv_bfloat16, false))
                   : (sym ? RA_MF(128, __nv_bfloat16, true) : RA_MF(128, __nv_bfloat16, false));
    return dim == 64 ? (sym ? RA_MF(64, __half, true) : RA_MF(64, __half, false))
                     : (sym ? RA_MF(128, __half, true) : RA_MF(128, __half, false));
#undef RA_MF
}

/* the exact top-k lists of rows among the n keys (ids and scores: nrows x k): by
 * cuda_mma_topk.h where mma_stride allows, with its rows over MT_CAP candidates through
 * tiled_lists; else tiled_lists. tile: the two score tiles, contiguous, of tile_floats
 * each. */
static ra_status top_lists(ra_gpu_cache *c, struct cuda_graph *g, gb_mem &mem_, ra_dtype t,
                           const void *rows, size_t nrows, const void *keys, size_t n, unsigned dim,
                           unsigned k, float *const tile[2], size_t tile_floats, int *ids,
                           float *scores)
{
    ra_status s = RA_OK;
    int committed = 0;
    const size_t es = ra_dtype_size(t);
    /* the candidate lists live in the tiles' memory: chunks of rows with lists of MT_CAP,
     * or for the key->key pass (rows are the keys) every row at once with lists of what
     * fits, when that is at least MT_SYM_CAP, and the symmetric filter. That halves the
     * MMA work but appends through global atomics, which cost more than they save where
     * a row's candidates are dense among the keys: measured on the H200, 34 against 22 ms
     * at 131K keys, and ~0.7 against ~1.4 s at 1M; so from MT_SYM_MIN_N keys (the
     * crossover between was not measured). RA_GPU_MMA_SYM=1 takes it whenever the room
     * allows (tests), 0 never. */
    const size_t room = 2 * tile_floats * sizeof(float) / sizeof(unsigned long long);
    static ra_env_once sym_once;
    const int sym_env = ra_env_int(&sym_once, "RA_GPU_MMA_SYM", -1);
    const bool sym = rows == keys && nrows == n && room / n >= MT_SYM_CAP &&
                     room / n >= 4 * (size_t)k && /* E = cap / 2 >= 2k: mma_stride */
                     (sym_env == 1 || (sym_env < 0 && n >= MT_SYM_MIN_N));
    const unsigned cap = sym ? (unsigned)(room / n < MT_CAP ? room / n : MT_CAP) : MT_CAP;
    /* (cap <= MT_CAP: mt_select_kernel's shared buffer) */
    const size_t chunk = sym ? nrows : room / MT_CAP / MT_BM * MT_BM;
    unsigned rank = 0;
    size_t stride = mma_stride(IMPL(c)->device, t, dim, rows, keys, n, k,
                               cap / 2 < MT_CAP / 4 ? cap / 2 : MT_CAP / 4, &rank);
    if (!stride || chunk < MT_BM)
        return tiled_lists(c, g, t, rows, nrows, keys, n, dim, dim, k, tile, tile_floats, ids,
                           scores, NULL);
    /* RA_GPU_MMA_PROFILE=1: the phases' times on stderr (a study knob; it synchronises) */
    static ra_env_once prof_once;
    const int prof = ra_env_int(&prof_once, "RA_GPU_MMA_PROFILE", 0);
    struct prof_events { /* destroyed on every way out, the early error returns too */
        cudaEvent_t e[2] = {NULL, NULL};
        ~prof_events()
        {
            for (cudaEvent_t x : e)
                if (x)
                    cudaEventDestroy(x);
        }
    } pev;
    cudaEvent_t *pe = pev.e;
    float ms_sample = 0, ms_filter = 0, ms_select = 0, ms_e;
    auto lap = [&](float *acc) {
        if (!prof)
            return;
        cudaEventRecord(pe[1], g->s);
        cudaEventSynchronize(pe[1]);
        cudaEventElapsedTime(&ms_e, pe[0], pe[1]);
        *acc += ms_e;
        cudaEventRecord(pe[0], g->s);
    };
    if (prof) {
        cudaEventCreate(&pe[0]);
        cudaEventCreate(&pe[1]);
        cudaEventRecord(pe[0], g->s);
    }
    float *thr = NULL;
    unsigned *cnt = NULL, *over = NULL, *n_over = NULL;
    unsigned long long *cand = (unsigned long long *)tile[0];
    unsigned h_over = 0;
    ALLOC(thr, nrows * sizeof(float));
    ALLOC(cnt, (chunk < nrows ? chunk : nrows) * sizeof(unsigned));
    ALLOC(over, nrows * sizeof(unsigned));
    ALLOC(n_over, sizeof(unsigned));
    CK(cudaMemsetAsync(n_over, 0, sizeof(unsigned), g->s));
    /* 1. thresholds: the rank-th best score of each row among one key at random of every
     * stride (a stratified sample: keys in position order may repeat with any period) */
    {
        const size_t ns = (n + stride - 1) / stride;
        unsigned char *samp = NULL;
        ALLOC(samp, ns * dim * es);
        mt_sample_kernel<<<grid_of(ns * dim * es / 16), 256, 0, g->s>>>(
            (const uint4 *)keys, n, stride, dim * es / 16, (uint4 *)samp);
        CK(cudaGetLastError());
        s = tiled_lists(c, g, t, rows, nrows, samp, ns, dim, dim, rank, tile, tile_floats, NULL,
                        NULL, thr);
        if (s != RA_OK)
            return s;
    }
    lap(&ms_sample);
    /* 2.-3. candidates of a chunk of rows in the tiles' memory, then their top-k */
    for (size_t r0 = 0; r0 < nrows; r0 += chunk) {
        size_t nr = nrows - r0 < chunk ? nrows - r0 : chunk;
        const void *rr = (const char *)rows + r0 * dim * es;
        if (sym)
            CK(cudaMemsetAsync(cnt, 0, nr * sizeof(unsigned), g->s));
        s = mma_filter(c, g, t, dim, sym, rr, nr, keys, n, thr + r0, cnt, cand, cap);
        if (s != RA_OK)
            return s;
        lap(&ms_filter);
        mt_select_kernel<<<(unsigned)nr, MT_SEL_THREADS, 0, g->s>>>(cnt, cand, cap, k, ids, scores,
                                                                    r0, n_over, over);
        CK(cudaGetLastError());
        lap(&ms_select);
    }
    /* 4. the rows it could not answer (more than cap candidates, or fewer than k): exactly */
    CK(cudaMemcpyAsync(&h_over, n_over, sizeof h_over, cudaMemcpyDeviceToHost, g->s));
    CK(cudaStreamSynchronize(g->s));
    if (h_over) {
        unsigned char *gr = NULL;
        int *tid = NULL;
        float *tsc = NULL;
        ALLOC(gr, (size_t)h_over * dim * es);
        ALLOC(tid, (size_t)h_over * k * sizeof(int));
        ALLOC(tsc, (size_t)h_over * k * sizeof(float));
        mt_gather_kernel<<<grid_of((size_t)h_over * dim * es), 256, 0, g->s>>>(
            (const unsigned char *)rows, over, h_over, dim * es, gr);
        CK(cudaGetLastError());
        s = tiled_lists(c, g, t, gr, h_over, keys, n, dim, dim, k, tile, tile_floats, tid, tsc,
                        NULL);
        if (s != RA_OK)
            return s;
        mt_scatter_kernel<<<grid_of((size_t)h_over * k), 256, 0, g->s>>>(tid, tsc, over, h_over, k,
                                                                         ids, scores);
        CK(cudaGetLastError());
    }
    if (prof) {
        float ms_over = 0;
        lap(&ms_over);
        fprintf(stderr,
                "mma top-k: %zu rows x %zu keys, k %u, sample 1/%zu rank %u, %s lists of %u: "
                "sample %.2f ms, filter "
                "%.2f ms, select %.2f ms, %u rows exact in %.2f ms\n",
                nrows, n, k, stride, rank, sym ? "symmetric" : "chunked", cap, ms_sample, ms_filter,
                ms_select, h_over, ms_over);
    }
    return RA_OK;
fail:
    return s;
}

static unsigned bits_for(size_t v)
{
    unsigned b = 1;
    while (b < 32 && ((size_t)1 << b) <= v)
        b++;
    return b;
}

ra_status ra_gpu_cuda_graph_rows(ra_gpu_cache *c, int lane, ra_gpu_mem mem, ra_dtype t,
                                 const void *keys, size_t n, const void *qs, size_t nq,
                                 unsigned dim, const ra_gpu_graph_params *p, int32_t *adj,
                                 int32_t *occ, int32_t *lists, ra_gpu_graph_stats *st)
{
    ra_status s = RA_OK;
    int committed = 0;
    cuda_impl *m = IMPL(c);
    gb_mem mem_;
    memset(&mem_, 0, sizeof mem_);
    struct cuda_graph *g = NULL;
    const unsigned K = nq ? p->knn : 0, L = p->key_knn, M = p->degree;
    const size_t es = ra_dtype_size(t), nocc = nq * K;
    if ((size_t)RA_GPU_GRAPH_LISTS * (K > 2 * RA_GPU_GRAPH_WINDOW + 2 ? K : 2 * RA_GPU_GRAPH_WINDOW + 2) >
        GB_MS)
        return ra_gpu_fail(c, RA_ENOTSUP, "CUDA graph build: knn %u (at most %d)", K,
                           GB_MS / RA_GPU_GRAPH_LISTS);
    if (4 * (size_t)M + L > GB_CAND)
        return ra_gpu_fail(c, RA_ENOTSUP,
                           "CUDA graph build: 4 x degree + key_knn = %zu candidates (max %d)",
                           4 * (size_t)M + L, GB_CAND);
    if (lane < 0 || lane >= RA_GPU_GRAPH_LANES)
        return ra_gpu_fail(c, RA_EINTERNAL, "CUDA graph build: lane %d", lane);
    CK(cudaSetDevice(m->device));
    if (!m->graph[lane]) {
        g = (struct cuda_graph *)calloc(1, sizeof *g);
        if (!g)
            return ra_gpu_fail(c, RA_ENOMEM, "CUDA graph build state");
        m->graph[lane] = g;
        CK(cudaStreamCreateWithFlags(&g->s, cudaStreamNonBlocking));
        CKB(cublasCreate(&g->blas));
        CKB(cublasSetStream(g->blas, g->s));
        for (int i = 0; i < 6; i++)
            CK(cudaEventCreate(&g->ev[i]));
        CK(cudaStreamCreateWithFlags(&g->s2, cudaStreamNonBlocking));
        for (int i = 0; i < 5; i++)
            CK(cudaEventCreateWithFlags(&g->tev[i], cudaEventDisableTiming));
    }
    g = m->graph[lane];
    {
        const void *dk = keys, *dq = qs;
        float *tile[2] = {NULL, NULL}, *lsc = NULL;
        int *ql = NULL, *kk = NULL, *cnt = NULL, *off = NULL, *adj1 = NULL, *adj2 = NULL;
        int *icnt = NULL, *ioff = NULL;
        unsigned *iota = NULL, *occ_k = NULL, *occ_v = NULL, *e_to = NULL, *e_from = NULL;
        unsigned *e_to2 = NULL, *e_from2 = NULL;
        void *tmp = NULL;
        size_t tmp_bytes = 0, nm = n * M;
        CK(cudaEventRecord(g->ev[0], g->s));
        if (mem == RA_GPU_MEM_HOST) {
            void *a = NULL, *b = NULL;
            ALLOC(a, n * dim * es);
            CK(cudaMemcpyAsync(a, keys, n * dim * es, cudaMemcpyHostToDevice, g->s));
            dk = a;
            if (nq) {
                ALLOC(b, nq * dim * es);
                CK(cudaMemcpyAsync(b, qs, nq * dim * es, cudaMemcpyHostToDevice, g->s));
                dq = b;
            }
        }
        /* score tiles: at most tile_bytes, at least one row */
        size_t tile_rows = p->tile_bytes / (n * sizeof(float));
        size_t most = nq > n ? nq : n;
        if (tile_rows < 1)
            tile_rows = 1;
        if (tile_rows > most)
            tile_rows = most;
        ALLOC(tile[0], 2 * tile_rows * n * sizeof(float)); /* one block: top_lists() uses both */
        tile[1] = tile[0] + tile_rows * n;
        size_t lmax = nocc > n * (L + 1) ? nocc : n * (L + 1);
        ALLOC(lsc, lmax * sizeof(float)); /* the top-k kernel's scores (not used) */
        ALLOC(cnt, (n + 1) * sizeof(int));
        ALLOC(off, (n + 1) * sizeof(int));
        CK(cudaMemsetAsync(cnt, 0, (n + 1) * sizeof(int), g->s));
        /* CUB scratch: the largest of the sorts and scans, asked with their own sizes */
        {
            size_t b1 = 0, b2 = 0, b3 = 0;
            unsigned kb = bits_for(n);
            CK(cub::DeviceRadixSort::SortPairs(NULL, b1, (unsigned *)NULL, (unsigned *)NULL,
                                               (unsigned *)NULL, (unsigned *)NULL,
                                               (int)(nocc ? nocc : 1), 0, (int)kb, g->s));
            CK(cub::DeviceRadixSort::SortPairs(NULL, b2, (unsigned *)NULL, (unsigned *)NULL,
                                               (unsigned *)NULL, (unsigned *)NULL, (int)nm, 0,
                                               (int)kb, g->s));
            CK(cub::DeviceScan::ExclusiveSum(NULL, b3, (int *)NULL, (int *)NULL, (int)(n + 1),
                                             g->s));
            tmp_bytes = b1 > b2 ? b1 : b2;
            tmp_bytes = tmp_bytes > b3 ? tmp_bytes : b3;
            ALLOC(tmp, tmp_bytes);
        }
        /* 1. query->key lists and the occurrences of each key, by a stable sort on key */
        if (nq) {
            ALLOC(ql, nocc * sizeof(int));
            s = top_lists(c, g, mem_, t, dq, nq, dk, n, dim, K, tile, tile_rows * n, ql, lsc);
            if (s != RA_OK)
                goto fail;
            ALLOC(iota, nocc * sizeof(unsigned));
            ALLOC(occ_k, nocc * sizeof(unsigned));
            ALLOC(occ_v, nocc * sizeof(unsigned));
            iota_kernel<<<grid_of(nocc), 256, 0, g->s>>>(iota, nocc);
            CK(cudaGetLastError());
            CK(cub::DeviceRadixSort::SortPairs(tmp, tmp_bytes, (const unsigned *)ql, occ_k,
                                               iota, occ_v, (int)nocc, 0, (int)bits_for(n),
                                               g->s));
            hist_kernel<<<grid_of(nocc), 256, 0, g->s>>>(ql, nocc, (int)n, cnt);
            CK(cudaGetLastError());
        } else {
            ALLOC(ql, sizeof(int));
            ALLOC(occ_v, sizeof(unsigned));
        }
        CK(cub::DeviceScan::ExclusiveSum(tmp, tmp_bytes, cnt, off, (int)(n + 1), g->s));
        CK(cudaMemcpyAsync(occ, cnt, n * sizeof(int), cudaMemcpyDeviceToHost, g->s));
        if (lists && nq)
            CK(cudaMemcpyAsync(lists, ql, nocc * sizeof(int), cudaMemcpyDeviceToHost, g->s));
        CK(cudaEventRecord(g->ev[1], g->s));
        /* 2. key->key lists (L + 1: the key itself is dropped in the projection) */
        ALLOC(kk, n * (L + 1) * sizeof(int));
        s = top_lists(c, g, mem_, t, dk, n, dk, n, dim, L + 1, tile, tile_rows * n, kk, lsc);
        if (s != RA_OK)
            goto fail;
        CK(cudaEventRecord(g->ev[2], g->s));
        /* 3. projection + pruning */
        ALLOC(adj1, nm * sizeof(int));
        s = launch_typed(c, g, t, dk, dim, ql, K ? K : 1, occ_v, off, kk, L, M, n, adj1, NULL,
                         NULL, NULL, 0);
        if (s != RA_OK)
            goto fail;
        CK(cudaEventRecord(g->ev[3], g->s));
        /* 4. reverse edges: (target, source) sorted stably by target */
        ALLOC(e_to, nm * sizeof(unsigned));
        ALLOC(e_from, nm * sizeof(unsigned));
        ALLOC(e_to2, nm * sizeof(unsigned));
        ALLOC(e_from2, nm * sizeof(unsigned));
        ALLOC(icnt, (n + 1) * sizeof(int));
        ALLOC(ioff, (n + 1) * sizeof(int));
        ALLOC(adj2, nm * sizeof(int));
        edges_kernel<<<grid_of(nm), 256, 0, g->s>>>(adj1, nm, M, (int)n, e_to, e_from);
        CK(cudaGetLastError());
        CK(cub::DeviceRadixSort::SortPairs(tmp, tmp_bytes, e_to, e_to2, e_from, e_from2, (int)nm,
                                           0, (int)bits_for(n), g->s));
        CK(cudaMemsetAsync(icnt, 0, (n + 1) * sizeof(int), g->s));
        hist_kernel<<<grid_of(nm), 256, 0, g->s>>>(adj1, nm, (int)n, icnt);
        CK(cudaGetLastError());
        CK(cub::DeviceScan::ExclusiveSum(tmp, tmp_bytes, icnt, ioff, (int)(n + 1), g->s));
        s = launch_typed(c, g, t, dk, dim, NULL, 0, NULL, NULL, NULL, 0, M, n, adj1, ioff,
                         (const int *)e_from2, adj2, 1);
        if (s != RA_OK)
            goto fail;
        CK(cudaEventRecord(g->ev[4], g->s));
        CK(cudaMemcpyAsync(adj, adj2, nm * sizeof(int), cudaMemcpyDeviceToHost, g->s));
        CK(cudaEventRecord(g->ev[5], g->s));
        gb_free(&mem_, g->s);
        CK(cudaStreamSynchronize(g->s)); /* this build's stream only */
        if (st) {
            float ms[5];
            for (int i = 0; i < 5; i++)
                CK(cudaEventElapsedTime(&ms[i], g->ev[i], g->ev[i + 1]));
            st->knn_s = ms[0] / 1e3;
            st->key_knn_s = ms[1] / 1e3;
            st->project_s = ms[2] / 1e3;
            st->reverse_s = ms[3] / 1e3;
            st->copy_s = ms[4] / 1e3;
            st->device_bytes = mem_.peak;
        }
    }
    return RA_OK;
fail:
    g = m->graph[lane];
    int broken = __atomic_load_n(&c->broken, __ATOMIC_RELAXED);
    if (g && g->s2 && !broken) /* its top-k may still read a tile */
        cudaStreamSynchronize(g->s2);
    if (g && g->s) {
        gb_free(&mem_, g->s);
        if (!broken)
            cudaStreamSynchronize(g->s);
        cudaGetLastError();
    }
    /* made only in part: again next time */
    if (g && (!g->blas || !g->ev[5] || !g->tev[4]))
        lane_fini(m, lane);
    return s;
}
