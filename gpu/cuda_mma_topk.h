/* Exact top-k of rows against keys without writing the score matrix (cuda_graph.cu's
 * query->key and key->key lists; the reference is the GEMM tiles + topk_kernel of
 * cuda_internal.h, which remains the path for everything this one does not take).
 *
 * 1. A threshold per row: the j-th best score of the row among a sample of the keys (one
 *    at random from every stride, j and stride chosen so that ~MT_CAP / 4 scores of a row
 *    reach it: mma_stride in cuda_graph.cu), by the tiled GEMM over the sample and
 *    mt_kth_kernel: the j-th best of distinct scores of the row, so not above the row's
 *    k-th best unless the sample holds j of the row's top k (then fewer than k candidates
 *    reach it, and step 3 sends the row to the exact path), lowered by a margin of
 *    2^-12 of the sample's best and k-th magnitudes because the two GEMMs sum in different
 *    orders. The margin is not a proven bound on that difference; what makes the answer
 *    exact is step 3: a threshold that ends up above the row's k-th MMA score leaves
 *    fewer than k candidates, and the row goes to the exact path.
 * 2. mt_filter_kernel: a block of 256 threads takes 128 rows and walks all keys 128 at a
 *    time (cp.async double buffer), scores 128 x 128 tiles with bf16/f16 tensor-core MMA
 *    (m16n8k16, fp32 accumulation) and appends every score that reaches its row's
 *    threshold to the row's candidate list (at most MT_CAP) in global memory.
 * 3. mt_select_kernel: a block per row sorts the candidates by (score desc, id asc) and
 *    writes the first k. A row with more than MT_CAP candidates (ties: equal keys; an
 *    infinite score) or fewer than k goes to a list the host then runs through the exact
 *    tiled path, so every row's answer is the exact top-k of its MMA scores or the
 *    reference's own. (Rows with NaN scores differ: NaN is never a candidate here, while
 *    topk_kernel ranks +NaN first; ratd refuses NaN keys at Offload, gpu/ does not look.)
 * Included by cuda_graph.cu only (static kernels: one copy per .cu file). */
#ifndef RA_CUDA_MMA_TOPK_H
#define RA_CUDA_MMA_TOPK_H

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

#include <type_traits>

#define MT_BM 128      /* rows of a block */
#define MT_BN MT_BM    /* keys of a stage (mt_stage stages both with MT_BM rows) */
#define MT_THREADS 256 /* 8 warps: 2 (rows, 64 each) x 4 (keys, 32 each) */
#define MT_CAP 2048    /* candidates of a row */
#define MT_SYM_CAP 512 /* the least room a row's list has in the symmetric key->key filter */
#define MT_SYM_MIN_N ((size_t)1 << 19) /* keys from which the symmetric filter is the default */
#define MT_PAD 8       /* elements of padding per shared row: conflict-free ldmatrix */
#define MT_SEL_THREADS 256

/* MMA bf16, cp.async and warp reductions need sm_80: older architectures the build also
 * compiles for (RA_CUDA_ARCHS) get bodies that trap, and the host never takes this path
 * on such a device (mma_stride in cuda_graph.cu) */
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
#define MT_OLD_ARCH 1
#else
#define MT_OLD_ARCH 0
#endif

/* c (16 x 8 fp32) += a (16 x 16) b (16 x 8) of T, bf16 or f16 (the instruction's type
 * must be a literal: one asm text, the type pasted in) */
#define MT_MMA_ASM(AB)                                                                             \
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32." AB "." AB ".f32 "                        \
                 "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"                         \
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])                                  \
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]))
template <typename T>
static __device__ __forceinline__ void mt_mma(float *c, const unsigned *a, const unsigned *b)
{
    static_assert(std::is_same<T, __nv_bfloat16>::value || std::is_same<T, __half>::value,
                  "bf16 or f16");
#if MT_OLD_ARCH
    __trap();
#else
    if constexpr (std::is_same<T, __nv_bfloat16>::value)
        MT_MMA_ASM("bf16");
    else
        MT_MMA_ASM("f16");
#endif
}
#undef MT_MMA_ASM

static __device__ __forceinline__ void mt_ldsm4(unsigned *r, const void *p)
{
    unsigned a = (unsigned)__cvta_generic_to_shared(p);
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(a));
}

static __device__ __forceinline__ void mt_ldsm2(unsigned *r, const void *p)
{
    unsigned a = (unsigned)__cvta_generic_to_shared(p);
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0,%1}, [%2];\n"
                 : "=r"(r[0]), "=r"(r[1])
                 : "r"(a));
}

/* 16 bytes global -> shared, zero-filled when !valid */
static __device__ __forceinline__ void mt_cp16(void *dst, const void *src, bool valid)
{
#if MT_OLD_ARCH
    __trap();
#else
    unsigned a = (unsigned)__cvta_generic_to_shared(dst);
    int sz = valid ? 16 : 0;
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(a), "l"(src), "r"(sz));
#endif
}
static __device__ __forceinline__ void mt_commit()
{
#if !MT_OLD_ARCH
    asm volatile("cp.async.commit_group;\n" ::);
#endif
}
template <int N> static __device__ __forceinline__ void mt_wait()
{
#if !MT_OLD_ARCH
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
#endif
}

/* mt_filter_kernel's dynamic shared memory: the rows' stage and two key stages of MT_BM
 * rows of dim + MT_PAD elements of es bytes (its static part: MT_BM counts) */
static inline size_t mt_filter_smem(unsigned dim, size_t es)
{
    return 3 * (size_t)MT_BM * (dim + MT_PAD) * es;
}

/* rows x D elements (row-major, D contiguous) into shared rows of D + MT_PAD */
template <int D, typename T>
static __device__ __forceinline__ void mt_stage(T *sm, const T *src, size_t first, size_t count)
{
    constexpr int CH = D * (int)sizeof(T) / 16; /* 16-byte chunks of a row */
    for (int i = threadIdx.x; i < MT_BM * CH; i += MT_THREADS) {
        int r = i / CH, ch = i % CH;
        bool ok = first + (size_t)r < count;
        const T *g = src + (ok ? (first + (size_t)r) * D : 0) + ch * (16 / (int)sizeof(T));
        mt_cp16(sm + r * (D + MT_PAD) + ch * (16 / (int)sizeof(T)), g, ok);
    }
}

/* rows [row0, row0 + nr) of `rows` (chunk-local candidate lists of cap entries: cand[(r -
 * row0) cap], counts cnt[r - row0]) against keys [0, n); thr: the chunk's thresholds.
 *
 * SYM (the key->key pass: rows are the keys, nr = n, every row's list at once, cnt zeroed
 * before): a score is the same for (i, j) and (j, i), so block b scores its rows only
 * against the key stages b, b + 1, ...: each score is offered to its row's list and, off
 * the diagonal stage, to its key's list with the row as the id (against the key's own
 * threshold). Half the MMA work; the counts are global atomics, since other blocks append
 * to a block's rows. */
template <int D, typename T, bool SYM>
static __global__ void __launch_bounds__(MT_THREADS, 2)
    mt_filter_kernel(const T *rows, size_t nr, const T *keys, size_t n, const float *thr,
                     unsigned *cnt, unsigned long long *cand, unsigned cap)
{
    extern __shared__ __align__(16) unsigned char mt_smem[];
    constexpr int S = D + MT_PAD;
    T *sa = reinterpret_cast<T *>(mt_smem);
    T *const sb0 = sa + MT_BM * S; /* key stages: sb0 and sb0 + MT_BM S */
    __shared__ unsigned s_cnt[MT_BM];
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    const int wm = warp / 4, wn = warp % 4, g = lane / 4, t = lane % 4;
    const size_t r_first = (size_t)blockIdx.x * MT_BM;
    for (int i = threadIdx.x; i < MT_BM; i += MT_THREADS)
        s_cnt[i] = 0;
    float th[4][2];
#pragma unroll
    for (int mi = 0; mi < 4; mi++)
#pragma unroll
        for (int h = 0; h < 2; h++) {
            size_t r = r_first + wm * 64 + mi * 16 + g + h * 8;
            th[mi][h] = r < nr ? thr[r] : INFINITY;
        }
    const size_t st0 = SYM ? blockIdx.x : 0; /* MT_BN == MT_BM: stage b holds block b's rows */
    mt_stage<D>(sa, rows, r_first, nr);
    mt_stage<D>(sb0, keys, st0 * MT_BN, n);
    mt_commit();
    const size_t nst = (n + MT_BN - 1) / MT_BN;
    for (size_t st = st0; st < nst; st++) {
        if (st + 1 < nst) {
            mt_stage<D>(sb0 + ((st + 1 - st0) & 1) * MT_BM * S, keys, (st + 1) * MT_BN, n);
            mt_commit();
            mt_wait<1>();
        } else {
            mt_wait<0>();
        }
        __syncthreads();
        const T *b_sm = sb0 + ((st - st0) & 1) * MT_BM * S;
        float acc[4][4][4];
#pragma unroll
        for (int mi = 0; mi < 4; mi++)
#pragma unroll
            for (int ni = 0; ni < 4; ni++)
#pragma unroll
                for (int e = 0; e < 4; e++)
                    acc[mi][ni][e] = 0.0f;
#pragma unroll
        for (int k0 = 0; k0 < D; k0 += 16) {
            unsigned a[4][4], b[4][2];
#pragma unroll
            for (int mi = 0; mi < 4; mi++)
                mt_ldsm4(a[mi], sa + (wm * 64 + mi * 16 + lane % 16) * S + k0 + (lane / 16) * 8);
#pragma unroll
            for (int nj = 0; nj < 2; nj++) {
                unsigned r4[4];
                mt_ldsm4(r4, b_sm + (wn * 32 + nj * 16 + (lane / 16) * 8 + lane % 8) * S + k0 +
                                 ((lane / 8) % 2) * 8);
                b[2 * nj][0] = r4[0];
                b[2 * nj][1] = r4[1];
                b[2 * nj + 1][0] = r4[2];
                b[2 * nj + 1][1] = r4[3];
            }
#pragma unroll
            for (int mi = 0; mi < 4; mi++)
#pragma unroll
                for (int ni = 0; ni < 4; ni++)
                    mt_mma<T>(acc[mi][ni], a[mi], b[ni]);
        }
        /* the epilogue: scores that reach their row's threshold, of keys < n. A thread
         * holds 8 scores of each of its 8 rows: a row's maximum against its threshold
         * first (one vote a row), its 8 scores only where that holds. */
        const size_t c0 = st * MT_BN + wn * 32 + t * 2;
#pragma unroll
        for (int mi = 0; mi < 4; mi++)
#pragma unroll
            for (int h = 0; h < 2; h++) {
                float mx = acc[mi][0][2 * h];
#pragma unroll
                for (int ni = 0; ni < 4; ni++)
                    mx = fmaxf(mx, fmaxf(acc[mi][ni][2 * h], acc[mi][ni][2 * h + 1]));
                bool hit = mx >= th[mi][h];
                if (!__any_sync(0xffffffffu, hit))
                    continue;
                if (hit) {
                    const int rl = wm * 64 + mi * 16 + g + h * 8;
#pragma unroll
                    for (int ni = 0; ni < 4; ni++)
#pragma unroll
                        for (int e = 0; e < 2; e++) {
                            float f = acc[mi][ni][2 * h + e];
                            size_t col = c0 + ni * 8 + e;
                            if (f >= th[mi][h] && col < n) {
                                unsigned slot = SYM ? atomicAdd(&cnt[r_first + rl], 1u)
                                                    : atomicAdd(&s_cnt[rl], 1u);
                                if (slot < cap)
                                    cand[(r_first + rl) * cap + slot] = tk_ckey(f, (int32_t)col);
                            }
                        }
                }
            }
        if (SYM && st != st0) { /* the same scores for the keys' lists, the rows as ids */
#pragma unroll
            for (int ni = 0; ni < 4; ni++)
#pragma unroll
                for (int e = 0; e < 2; e++) {
                    const size_t col = c0 + ni * 8 + e;
                    const float tc = col < n ? thr[col] : INFINITY;
                    float mx = acc[0][ni][e];
#pragma unroll
                    for (int mi = 0; mi < 4; mi++)
                        mx = fmaxf(mx, fmaxf(acc[mi][ni][e], acc[mi][ni][2 + e]));
                    bool hit = mx >= tc;
                    if (!__any_sync(0xffffffffu, hit))
                        continue;
                    if (hit)
#pragma unroll
                        for (int mi = 0; mi < 4; mi++)
#pragma unroll
                            for (int h = 0; h < 2; h++) {
                                float f = acc[mi][ni][2 * h + e];
                                size_t row = r_first + wm * 64 + mi * 16 + g + h * 8;
                                if (f >= tc && row < nr) {
                                    unsigned slot = atomicAdd(&cnt[col], 1u);
                                    if (slot < cap)
                                        cand[col * cap + slot] = tk_ckey(f, (int32_t)row);
                                }
                            }
                }
        }
        __syncthreads(); /* this buffer is the next stage but one */
    }
    if (!SYM)
        for (int i = threadIdx.x; i < MT_BM; i += MT_THREADS)
            if (r_first + i < nr)
                cnt[r_first + i] = s_cnt[i];
}

/* a block per row of the chunk: its candidates sorted by (score desc, id asc), the first k
 * into ids / scores at row row0 + blockIdx.x; a row with more than cap or fewer than k
 * candidates is appended to over[] (its row number) instead */
static __global__ void __launch_bounds__(MT_SEL_THREADS)
    mt_select_kernel(const unsigned *cnt, const unsigned long long *cand, unsigned cap, unsigned k,
                     int32_t *ids_out, float *sc_out, size_t row0, unsigned *n_over, unsigned *over)
{
    __shared__ unsigned long long buf[MT_CAP];
    const size_t r = blockIdx.x;
    const unsigned c = cnt[r];
    if (c > cap || c < k) {
        if (threadIdx.x == 0)
            over[atomicAdd(n_over, 1u)] = (unsigned)(row0 + r);
        return;
    }
    unsigned P = 1;
    while (P < c)
        P <<= 1;
    const unsigned long long *src = cand + r * cap;
    for (unsigned i = threadIdx.x; i < P; i += blockDim.x)
        buf[i] = i < c ? src[i] : ~0ull;
    __syncthreads();
    block_sort(buf, P);
    size_t out = (row0 + r) * k;
    for (unsigned i = threadIdx.x; i < k; i += blockDim.x) {
        ids_out[out + i] = (int32_t)(unsigned)buf[i];
        sc_out[out + i] = tk_score(buf[i]);
    }
}

/* A warp per row of m sample scores (rows x m, row-major): thr[r] = the k-th largest of
 * the union of each lane's best MT_LANE_TOP scores (k distinct scores of the row reach it,
 * so it is never above the row's k-th largest; it is the sample's own k-th largest unless
 * a lane held more than MT_LANE_TOP of those), lowered by the margin. One read of the
 * row, no block barrier. NaN scores are skipped. A non-finite result (an infinite score,
 * or fewer than k finite ones): -inf, so that every score of the row is a candidate and
 * the row goes to the exact path. */
#define MT_LANE_TOP 8
static __device__ __forceinline__ float mt_unkey(unsigned k) /* fkey's inverse */
{
    return __uint_as_float((k & 0x80000000u) ? (k & 0x7fffffffu) : ~k);
}
static __global__ void __launch_bounds__(256)
    mt_kth_kernel(const float *sc, size_t m, unsigned k, size_t rows, float *thr)
{
    const size_t r = (size_t)blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    const unsigned lane = threadIdx.x % 32;
    if (r >= rows) /* warp-uniform */
        return;
    const float *row = sc + r * m;
    float top[MT_LANE_TOP]; /* descending */
#pragma unroll
    for (int j = 0; j < MT_LANE_TOP; j++)
        top[j] = -INFINITY;
    for (size_t i0 = lane; i0 < m; i0 += 32 * 8) { /* 8 loads in flight a lane */
        float v8[8];
#pragma unroll
        for (int q = 0; q < 8; q++)
            v8[q] = i0 + 32 * q < m ? row[i0 + 32 * q] : -INFINITY;
#pragma unroll
        for (int q = 0; q < 8; q++) {
            float v = v8[q];
            if (v > top[MT_LANE_TOP - 1]) { /* NaN never enters */
                top[MT_LANE_TOP - 1] = v;
#pragma unroll
                for (int j = MT_LANE_TOP - 1; j > 0; j--)
                    if (top[j] > top[j - 1]) {
                        float x = top[j];
                        top[j] = top[j - 1];
                        top[j - 1] = x;
                    }
            }
        }
    }
    /* the k-th largest key of the union: bit by bit, the largest prefix that k reach */
    unsigned key[MT_LANE_TOP], prefix = 0;
#pragma unroll
    for (int j = 0; j < MT_LANE_TOP; j++)
        key[j] = fkey(top[j]);
    for (int b = 31; b >= 0; b--) {
        unsigned c = prefix | (1u << b), n_ge = 0;
#pragma unroll
        for (int j = 0; j < MT_LANE_TOP; j++)
            n_ge += key[j] >= c;
#if MT_OLD_ARCH
        __trap();
#else
        if (__reduce_add_sync(0xffffffffu, n_ge) >= k)
            prefix = c;
#endif
    }
#if MT_OLD_ARCH
    const float kth = 0.0f, best = 0.0f;
#else
    const float kth = mt_unkey(prefix), best = mt_unkey(__reduce_max_sync(0xffffffffu, key[0]));
#endif
    if (lane == 0)
        thr[r] = isfinite(kth) && isfinite(best) ? kth - 0x1p-12f * (fabsf(kth) + fabsf(best))
                                                 : -INFINITY;
}

/* the sample of step 1: key m s + (a hash of m) mod s for each m (the last stride's: mod
 * what it has), rows of ch 16-byte chunks gathered into samp */
static __global__ void mt_sample_kernel(const uint4 *keys, size_t n, size_t s, size_t ch,
                                        uint4 *samp)
{
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x, m = i / ch;
    if (m * s >= n)
        return;
    unsigned h = (unsigned)m * 0x9e3779b9u;
    h ^= h >> 16;
    h *= 0x85ebca6bu;
    h ^= h >> 13;
    size_t span = n - m * s < s ? n - m * s : s;
    samp[i] = keys[(m * s + h % span) * ch + i % ch];
}

/* rows of over[] gathered into a dense matrix (rows x dim elements of es bytes) */
static __global__ void mt_gather_kernel(const unsigned char *src, const unsigned *over,
                                        unsigned n_over, size_t row_bytes, unsigned char *dst)
{
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (size_t)n_over * row_bytes)
        return;
    size_t r = i / row_bytes, b = i % row_bytes;
    dst[i] = src[(size_t)over[r] * row_bytes + b];
}

/* the exact path's answers for the gathered rows back to their rows */
static __global__ void mt_scatter_kernel(const int32_t *ids, const float *sc, const unsigned *over,
                                         unsigned n_over, unsigned k, int32_t *ids_out,
                                         float *sc_out)
{
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (size_t)n_over * k)
        return;
    size_t r = i / k, j = i % k;
    ids_out[(size_t)over[r] * k + j] = ids[i];
    sc_out[(size_t)over[r] * k + j] = sc[i];
}

#endif
