/* scan_micro: how fast can 16 cores stream compact search codes of a layer's KV heads,
 * scoring each key against the GQA group's queries (VNNI), keeping each query's best R?
 * A feasibility probe for the projected-code scan (not part of the build).
 * usage: scan_micro N HEADS LAYERS THREADS PARTS DIMS ITERS */
#define _GNU_SOURCE
#include <immintrin.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

static double now(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

static int mode;        /* 0 vnni, 1 amx4, 2 amx8, 3 read */
static int pf_mode = 1; /* SCAN_PF: 0 none, 1 a line 8 blocks ahead, 2 every line 16 ahead (L1),
                           3 every line 32 ahead (L2) */
enum { G = 4, R = 512, CAP = 2048, BLK = 16, SPAN = 64 /* blocks per interleave unit */ };

typedef struct {
    int32_t sc[G][CAP];
    int32_t id[G][CAP];
    int n[G];
    int32_t thr[G];
} sel;

static int cmp_desc(const void *a, const void *b)
{
    int32_t x = *(const int32_t *)a, y = *(const int32_t *)b;
    return (x < y) - (x > y);
}

/* the R-th largest of a[0..n) by quickselect (a is reordered) */
static int32_t kth(int32_t *a, int n, int k)
{
    int lo = 0, hi = n - 1;
    while (lo < hi) {
        int32_t piv = a[(lo + hi) / 2];
        int i = lo, j = hi;
        while (i <= j) {
            while (a[i] > piv)
                i++;
            while (a[j] < piv)
                j--;
            if (i <= j) {
                int32_t t = a[i];
                a[i++] = a[j];
                a[j--] = t;
            }
        }
        if (k <= j)
            hi = j;
        else if (k >= i)
            lo = i;
        else
            return a[k];
    }
    return a[k];
}

static void cut(sel *s, int j)
{
    static __thread int32_t tmp[CAP];
    memcpy(tmp, s->sc[j], s->n[j] * 4);
    int32_t t = kth(tmp, s->n[j], R - 1);
    int m = 0;
    for (int i = 0; i < s->n[j]; i++)
        if (s->sc[j][i] > t || (s->sc[j][i] == t && m < R)) {
            s->sc[j][m] = s->sc[j][i];
            s->id[j][m++] = s->id[j][i];
        }
    s->n[j] = m;
    s->thr[j] = t;
}

/* codes: nblk blocks of 16 keys, each dims/8 chunks of 64 bytes (4-bit: low nibbles dims
 * 8c..8c+3, high 8c+4..8c+7 of each key's 4-byte lane) */
static void scan_blocks(const uint8_t *codes, int dims, size_t first, size_t count, size_t stride,
                        const int32_t *qw, sel *s);
static void scan(const uint8_t *codes, int dims, size_t b0, size_t b1, size_t stride_units,
                 const int32_t *qw /* [G][dims/4] */, sel *s)
{
    for (size_t u = b0; u < b1; u += stride_units)
        scan_blocks(codes, dims, u * SPAN, SPAN, 1, qw, s);
}

static void scan_blocks(const uint8_t *codes, int dims, size_t first, size_t count, size_t stride,
                        const int32_t *qw, sel *s)
{
    const int nch = dims / 8;
    const __m512i m4 = _mm512_set1_epi8(0x0f);
    const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    for (size_t bi = 0; bi < count; bi++) {
        size_t b = first + bi * stride;
        const uint8_t *c = codes + b * (size_t)nch * 64;
        if (pf_mode == 1)
            _mm_prefetch((const char *)(c + 8 * 64 * nch), _MM_HINT_T0);
        else if (pf_mode == 2)
            for (int l = 0; l < nch; l++)
                _mm_prefetch((const char *)(c + 16 * 64 * nch + l * 64), _MM_HINT_T0);
        else if (pf_mode == 3)
            for (int l = 0; l < nch; l++)
                _mm_prefetch((const char *)(c + 32 * 64 * nch + l * 64), _MM_HINT_T1);
        __m512i a0 = _mm512_setzero_si512(), a1 = a0, a2 = a0, a3 = a0;
        for (int ch = 0; ch < nch; ch++) {
            __m512i x = _mm512_loadu_si512(c + ch * 64);
            __m512i lo = _mm512_and_si512(x, m4);
            __m512i hi = _mm512_and_si512(_mm512_srli_epi16(x, 4), m4);
            const int32_t *q = qw + 2 * ch;
            a0 = _mm512_dpbusd_epi32(a0, lo, _mm512_set1_epi32(q[0]));
            a0 = _mm512_dpbusd_epi32(a0, hi, _mm512_set1_epi32(q[1]));
            a1 = _mm512_dpbusd_epi32(a1, lo, _mm512_set1_epi32(q[dims / 4]));
            a1 = _mm512_dpbusd_epi32(a1, hi, _mm512_set1_epi32(q[dims / 4 + 1]));
            a2 = _mm512_dpbusd_epi32(a2, lo, _mm512_set1_epi32(q[2 * dims / 4]));
            a2 = _mm512_dpbusd_epi32(a2, hi, _mm512_set1_epi32(q[2 * dims / 4 + 1]));
            a3 = _mm512_dpbusd_epi32(a3, lo, _mm512_set1_epi32(q[3 * dims / 4]));
            a3 = _mm512_dpbusd_epi32(a3, hi, _mm512_set1_epi32(q[3 * dims / 4 + 1]));
        }
        __m512i acc[4] = {a0, a1, a2, a3};
        __m512i idv = _mm512_add_epi32(lane, _mm512_set1_epi32((int)(b * BLK)));
        for (int j = 0; j < G; j++) {
            __mmask16 k = _mm512_cmpgt_epi32_mask(acc[j], _mm512_set1_epi32(s->thr[j]));
            if (k) {
                _mm512_mask_compressstoreu_epi32(s->sc[j] + s->n[j], k, acc[j]);
                _mm512_mask_compressstoreu_epi32(s->id[j] + s->n[j], k, idv);
                s->n[j] += __builtin_popcount(k);
                if (s->n[j] > CAP - 16)
                    cut(s, j);
            }
        }
    }
}

typedef struct {
    uint8_t palette, start;
    uint8_t res[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} amx_cfg;
static const amx_cfg cfg __attribute__((aligned(64))) = {
    .palette = 1, .colsb = {16, 64, 16}, .rows = {16, 16, 16}}; /* C, A, B */

/* AMX, 4-bit codes (row layout: key r's 32 bytes, low nibble dim i, high dim 32 + i) or
 * 8-bit (64 bytes a key); dims 64. qb: B tile [16 rows][4 queries][4 bytes] */
static void scan_amx(const uint8_t *codes, int bits, size_t b0, size_t b1, size_t stride_units,
                     const int8_t *qb, sel *s)
{
    int32_t cbuf[64] __attribute__((aligned(64)));
    uint8_t abuf[1024] __attribute__((aligned(64)));
    const __m512i m4 = _mm512_set1_epi8(0x0f);
    _tile_loadd(2, qb, 16);
    const __m512i thr = _mm512_setr_epi32(
        s->thr[0], s->thr[1], s->thr[2], s->thr[3], s->thr[0], s->thr[1], s->thr[2], s->thr[3],
        s->thr[0], s->thr[1], s->thr[2], s->thr[3], s->thr[0], s->thr[1], s->thr[2], s->thr[3]);
    __m512i th = thr;
    size_t kb = bits == 4 ? 512 : 1024;
    for (size_t u = b0; u < b1; u += stride_units)
        for (size_t b = u * SPAN; b < (u + 1) * SPAN; b++) {
            const uint8_t *c = codes + b * kb;
            _mm_prefetch((const char *)(c + 8 * kb), _MM_HINT_T0);
            if (bits == 4) {
                for (int i = 0; i < 8; i++) {
                    __m512i x = _mm512_loadu_si512(c + i * 64);
                    __m512i lo = _mm512_and_si512(x, m4);
                    __m512i hi = _mm512_and_si512(_mm512_srli_epi16(x, 4), m4);
                    _mm512_store_si512(abuf + i * 128, _mm512_shuffle_i64x2(lo, hi, 0x44));
                    _mm512_store_si512(abuf + i * 128 + 64, _mm512_shuffle_i64x2(lo, hi, 0xee));
                }
                _tile_loadd(1, abuf, 64);
            } else {
                _tile_loadd(1, c, 64);
            }
            _tile_zero(0);
            _tile_dpbusd(0, 1, 2);
            _tile_stored(0, cbuf, 16);
            __m512i v0 = _mm512_load_si512(cbuf), v1 = _mm512_load_si512(cbuf + 16),
                    v2 = _mm512_load_si512(cbuf + 32), v3 = _mm512_load_si512(cbuf + 48);
            uint64_t mk = (uint64_t)_mm512_cmpgt_epi32_mask(v0, th) |
                          (uint64_t)_mm512_cmpgt_epi32_mask(v1, th) << 16 |
                          (uint64_t)_mm512_cmpgt_epi32_mask(v2, th) << 32 |
                          (uint64_t)_mm512_cmpgt_epi32_mask(v3, th) << 48;
            int changed = 0;
            while (mk) {
                int x = __builtin_ctzll(mk);
                mk &= mk - 1;
                int key = x / 4, j = x % 4;
                s->sc[j][s->n[j]] = cbuf[x];
                s->id[j][s->n[j]++] = (int32_t)(b * BLK + key);
                if (s->n[j] >= CAP) {
                    cut(s, j);
                    changed = 1;
                }
            }
            if (changed)
                th = _mm512_setr_epi32(s->thr[0], s->thr[1], s->thr[2], s->thr[3], s->thr[0],
                                       s->thr[1], s->thr[2], s->thr[3], s->thr[0], s->thr[1],
                                       s->thr[2], s->thr[3], s->thr[0], s->thr[1], s->thr[2],
                                       s->thr[3]);
        }
}

static long scan_read(const uint8_t *codes, size_t bytes_per_blk, size_t b0, size_t b1,
                      size_t stride_units)
{
    __m512i acc = _mm512_setzero_si512();
    for (size_t u = b0; u < b1; u += stride_units) {
        const uint8_t *c = codes + u * SPAN * bytes_per_blk;
        for (size_t o = 0; o < SPAN * bytes_per_blk; o += 64)
            acc = _mm512_add_epi32(acc, _mm512_loadu_si512(c + o));
    }
    return _mm512_reduce_add_epi32(acc);
}

/* thresholds from a stratified sample: scan sample blocks into s with no threshold, then
 * set each query's threshold to the score of rank 2R * sample / total */
static void prime(const uint8_t *codes, int dims, size_t units, size_t part, size_t P,
                  const int32_t *qw, sel *s)
{
    size_t nu = (units - part + P - 1) / P; /* this part's units */
    size_t nblk = nu * SPAN, want = 96, step = nblk / want ? nblk / want : 1;
    for (int j = 0; j < G; j++)
        s->thr[j] = INT32_MIN;
    size_t sampled = 0;
    for (size_t i = 0; i < nblk; i += step) { /* the i-th block of this part */
        size_t u = part + (i / SPAN) * P, b = u * SPAN + i % SPAN;
        scan_blocks(codes, dims, b, 1, 1, qw, s);
        sampled++;
    }
    nu = nblk;
    double frac = (double)sampled / nu;
    int rank = (int)(2.0 * R * frac);
    if (rank < 1)
        rank = 1;
    static __thread int32_t tmp[CAP];
    for (int j = 0; j < G; j++) {
        if (s->n[j] <= rank) {
            s->thr[j] = INT32_MIN;
        } else {
            memcpy(tmp, s->sc[j], s->n[j] * 4);
            s->thr[j] = kth(tmp, s->n[j], rank - 1);
        }
        s->n[j] = 0; /* the full scan sees the sample again */
    }
}

typedef struct {
    int tid, T, P, H, L, dims, iters;
    size_t n;
    uint8_t **codes; /* [L*H] */
    int32_t *qw;
    pthread_barrier_t *bar;
    double *times;
    long sink;
} targ;

static void *worker(void *p)
{
    targ *a = p;
    sel *s = aligned_alloc(64, sizeof *s);
    if (mode == 1 || mode == 2) {
        syscall(SYS_arch_prctl, 0x1023, 18);
        _tile_loadconfig(&cfg);
    }
    size_t units = a->n / BLK / SPAN;
    int tasks = a->H * a->P;
    for (int it = 0; it < a->iters; it++) {
        int layer = it % a->L;
        pthread_barrier_wait(a->bar);
        double t0 = now();
        for (int t = a->tid; t < tasks; t += a->T) {
            int h = t / a->P, part = t % a->P;
            memset(s->n, 0, sizeof s->n);
            for (int j = 0; j < G; j++)
                s->thr[j] = getenv("SCAN_NOSEL") ? INT32_MAX : INT32_MIN;
            if (!getenv("SCAN_NOSEL") && !getenv("SCAN_NOPRIME") && mode == 0)
                prime(a->codes[layer * a->H + h], a->dims, units, part, a->P, a->qw, s);
            const uint8_t *cd = a->codes[layer * a->H + h];
            if (mode == 0)
                scan(cd, a->dims, part, units, a->P, a->qw, s);
            else if (mode == 3)
                a->sink += scan_read(cd, (size_t)a->dims * 8, part, units, a->P);
            else
                scan_amx(cd, mode == 1 ? 4 : 8, part, units, a->P, (const int8_t *)a->qw, s);
            a->sink += s->n[0] + s->thr[1];
        }
        double t1 = now();
        pthread_barrier_wait(a->bar);
        if (a->tid == 0)
            a->times[it] = t1 - t0; /* overwritten by max below */
        a->times[(size_t)a->iters * (1 + a->tid) + it] = t1 - t0;
    }
    free(s);
    return NULL;
}

static int cmpd(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

int main(int argc, char **argv)
{
    if (argc < 8) {
        fprintf(stderr, "usage: scan_micro N HEADS LAYERS THREADS PARTS DIMS ITERS\n");
        return 2;
    }
    size_t n = strtoull(argv[1], 0, 10);
    int H = atoi(argv[2]), L = atoi(argv[3]), T = atoi(argv[4]), P = atoi(argv[5]),
        dims = atoi(argv[6]), iters = atoi(argv[7]);
    const char *md = getenv("SCAN_MODE");
    if (getenv("SCAN_PF"))
        pf_mode = atoi(getenv("SCAN_PF"));
    mode = !md                   ? 0
           : !strcmp(md, "amx4") ? 1
           : !strcmp(md, "amx8") ? 2
           : !strcmp(md, "read") ? 3
                                 : 0;
    if (mode == 1 || mode == 2)
        dims = 64;
    size_t bytes = n * dims / 2 * (mode == 2 ? 2 : 1);
    uint8_t **codes = malloc(sizeof *codes * L * H);
    srand(1);
    for (int i = 0; i < L * H; i++) {
        codes[i] = aligned_alloc(4096, bytes);
        uint64_t x = 0x9e3779b97f4a7c15ull * (i + 1);
        for (size_t b = 0; b + 8 <= bytes; b += 8) {
            x ^= x << 13, x ^= x >> 7, x ^= x << 17;
            memcpy(codes[i] + b, &x, 8);
        }
    }
    int32_t *qw = malloc(sizeof *qw * G * dims / 4 + 1024);
    for (int i = 0; i < G * dims / 4; i++)
        qw[i] = rand() & 0x3f3f3f3f;
    pthread_barrier_t bar;
    pthread_barrier_init(&bar, NULL, T);
    double *times = calloc((size_t)iters * (T + 1), sizeof *times);
    pthread_t th[256];
    targ a[256];
    for (int t = 0; t < T; t++) {
        a[t] = (targ){t, T, P, H, L, dims, iters, n, codes, qw, &bar, times, 0};
        pthread_create(&th[t], NULL, worker, &a[t]);
    }
    for (int t = 0; t < T; t++)
        pthread_join(th[t], NULL);
    double *mx = calloc(iters, sizeof *mx);
    double sumt = 0;
    for (int it = 0; it < iters; it++) {
        for (int t = 0; t < T; t++) {
            double v = times[(size_t)iters * (1 + t) + it];
            if (v > mx[it])
                mx[it] = v;
            sumt += v;
        }
    }
    int skip = iters / 10;
    qsort(mx + skip, iters - skip, sizeof *mx, cmpd);
    int m = iters - skip;
    double layer_mb = (double)bytes * H / 1e6;
    printf("%s pf%d ", md ? md : "vnni", pf_mode);
    printf("n=%zu heads=%d layers=%d threads=%d parts=%d dims=%d bytes/key=%d: layer %.1f MB, "
           "p50 %.1f us p90 %.1f p99 %.1f -> %.1f GB/s at p50; mean thread busy %.1f us\n",
           n, H, L, T, P, dims, (int)(bytes / n), layer_mb, mx[skip + m / 2] * 1e6,
           mx[skip + m * 9 / 10] * 1e6, mx[skip + m * 99 / 100] * 1e6,
           layer_mb / 1e3 / mx[skip + m / 2], sumt / iters / T * 1e6);
    return 0;
}
