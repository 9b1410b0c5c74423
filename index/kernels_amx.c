/* AMX (Advanced Matrix Extensions) kernel of index/: the 8-bit search codes of many keys
 * against 32 prepared queries at once, on the tile unit (ra_kernels.h,
 * ra_kern_amx_dots32). One TDPBUSD multiplies 16 codes by 16 queries over 64 dimensions
 * (16,384 multiply-adds), where vpdpbusd does 64: the graph build's all-pairs key->key
 * lists (graph_kk.c) are affordable only this way. Compiled with -mamx-tile -mamx-int8
 * -mavx512f -mavx512bw (CMakeLists.txt) and reached only when ra_kern_amx_ok() says the
 * CPU has AMX-INT8 and Linux granted this process the tile state; without the compiler's
 * support the file builds to stubs that say no. */
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "ra_env.h"
#include "ra_kernels.h"

#if defined(RA_HAVE_AMX) && defined(__x86_64__)
#include <cpuid.h>
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#define ARCH_REQ_XCOMP_PERM 0x1023
#define XFEATURE_XTILEDATA 18

static int amx_ok;
static pthread_once_t amx_once = PTHREAD_ONCE_INIT;
static int amx_forced_off; /* tests: ra_kern_amx_set(0) */

static void amx_probe(void)
{
    unsigned a, b, c, d;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d))
        return;
    int tile = (d >> 24) & 1, int8 = (d >> 25) & 1;
    /* AVX-512F/BW/VL for the masks below (GCC's checks include the OS's XCR0 state) */
    int avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                 __builtin_cpu_supports("avx512vl");
    (void)b;
    static ra_env_once env;
    if (!tile || !int8 || !avx512 || ra_env_int(&env, "RA_AMX", 1) == 0)
        return;
    /* Linux keeps the tile data out of a process's state until it asks (5.16+); under
     * valgrind or an older kernel this fails and the callers use their other path */
    if (syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) != 0)
        return;
    amx_ok = 1;
}

int ra_kern_amx_ok(void)
{
    pthread_once(&amx_once, amx_probe);
    return amx_ok && !__atomic_load_n(&amx_forced_off, __ATOMIC_RELAXED);
}

int ra_kern_amx_set(int on)
{
    pthread_once(&amx_once, amx_probe);
    __atomic_store_n(&amx_forced_off, !on, __ATOMIC_RELAXED);
    return amx_ok;
}

void ra_kern_amx_pack32(const int8_t *q8, int nq, int cbytes, int8_t *pack)
{
    /* B tile (k step s, query block b): row r holds dimensions 64 s + 4 r .. + 3 of the
     * block's 16 queries, 4 bytes a query (the VNNI layout TDPBUSD reads) */
    int ks = cbytes / 64;
    for (int s = 0; s < ks; s++)
        for (int blk = 0; blk < 2; blk++) {
            int8_t *t = pack + (size_t)(s * 2 + blk) * 1024;
            for (int r = 0; r < 16; r++)
                for (int n = 0; n < 16; n++) {
                    int j = blk * 16 + n;
                    for (int i = 0; i < 4; i++)
                        t[r * 64 + n * 4 + i] =
                            j < nq ? q8[(size_t)j * cbytes + s * 64 + 4 * r + i] : 0;
                }
        }
}

typedef struct amx_cfg {
    uint8_t palette, start;
    uint8_t res[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} amx_cfg;

/* 16 codes at c (stride apart) against the resident query tiles: C tiles 0 (queries
 * 0-15) and 1 (16-31), A tiles 2-3 (the code's two 64-byte halves), B tiles 4-7 */
#define AMX_BLOCK(c, stride, ks)                                                                   \
    do {                                                                                           \
        _tile_zero(0);                                                                             \
        _tile_zero(1);                                                                             \
        _tile_loadd(2, (c), (stride));                                                             \
        _tile_dpbusd(0, 2, 4);                                                                     \
        _tile_dpbusd(1, 2, 5);                                                                     \
        if ((ks) == 2) {                                                                           \
            _tile_loadd(3, (c) + 64, (stride));                                                    \
            _tile_dpbusd(0, 3, 6);                                                                 \
            _tile_dpbusd(1, 3, 7);                                                                 \
        }                                                                                          \
    } while (0)

/* palette 1, tiles 0-7 of 16 rows of 64 bytes (a stack copy filled at run time was seen
 * to fault in ldtilecfg once the compiler put it in the red zone) */
static const amx_cfg amx_config
    __attribute__((aligned(64))) = {.palette = 1,
                                    .colsb = {64, 64, 64, 64, 64, 64, 64, 64},
                                    .rows = {16, 16, 16, 16, 16, 16, 16, 16}};

void ra_kern_amx_begin(void)
{
    _tile_loadconfig(&amx_config);
}

void ra_kern_amx_end(void)
{
    _tile_release();
}

size_t ra_kern_amx_dots32(const int8_t *pack, int cbytes, const uint8_t *codes, size_t stride,
                          size_t n, int pf, const int32_t *tau, int32_t *dots, uint32_t *mask,
                          uint32_t *rows)
{
    int ks = cbytes / 64;
    _tile_loadd(4, pack, 64);
    _tile_loadd(5, pack + 1024, 64);
    if (ks == 2) {
        _tile_loadd(6, pack + 2048, 64);
        _tile_loadd(7, pack + 3072, 64);
    }
    __m512i t0 = _mm512_loadu_si512(tau), t1 = _mm512_loadu_si512(tau + 16);
    /* two blocks' scores in turn, so that the stores of one and the loads of the other
     * do not wait on each other; each row is compared once: a vertical max of the 16 rows
     * first, to skip blocks that beat no threshold, was mostly extra work in the build's
     * scan, where ~3 blocks in 4 have a hit (with the first-pass-only prefetch, a
     * calibrated head's key->key lists took 14 % less thread time on the H200 host:
     * bench/README.md, "Sixteenth session") */
    int32_t blk[2][16 * 32] __attribute__((aligned(64)));
    size_t full = n / 16 * 16, nr = 0;
    for (size_t j = 0; j < n; j += 16) {
        int32_t *o = blk[(j / 16) & 1];
        if (pf && j + 48 < full) /* the codes of the block 3 ahead */
            for (int r = 0; r < 16; r++)
                for (int b = 0; b < cbytes; b += 64)
                    _mm_prefetch((const char *)codes + (j + 48 + (size_t)r) * stride + b,
                                 _MM_HINT_T0);
        if (j < full) {
            AMX_BLOCK(codes + j * stride, (long)stride, ks);
        } else { /* the tail: its codes copied into zero rows, nothing read past n */
            uint8_t tail[16 * 128] __attribute__((aligned(64)));
            memset(tail, 0, sizeof tail);
            for (size_t i = j; i < n; i++)
                memcpy(tail + (i - j) * (size_t)cbytes, codes + i * stride, (size_t)cbytes);
            AMX_BLOCK(tail, cbytes, ks);
        }
        _tile_stored(0, o, 128);
        _tile_stored(1, o + 16, 128);
        size_t m = n - j < 16 ? n - j : 16;
        for (size_t i = 0; i < m; i++) {
            __m512i a = _mm512_load_si512(o + i * 32), b = _mm512_load_si512(o + i * 32 + 16);
            uint32_t mk = (uint32_t)_mm512_cmpgt_epi32_mask(a, t0) |
                          (uint32_t)_mm512_cmpgt_epi32_mask(b, t1) << 16;
            if (!mk)
                continue;
            _mm512_storeu_si512(dots + nr * 32, a);
            _mm512_storeu_si512(dots + nr * 32 + 16, b);
            mask[nr] = mk;
            rows[nr++] = (uint32_t)(j + i);
        }
    }
    return nr;
}

#else /* no compiler support: the callers take their other path */

int ra_kern_amx_ok(void)
{
    return 0;
}

int ra_kern_amx_set(int on)
{
    (void)on;
    return 0;
}

void ra_kern_amx_begin(void)
{
    abort(); /* never reached: ra_kern_amx_ok() is 0 */
}

void ra_kern_amx_end(void)
{
    abort();
}

void ra_kern_amx_pack32(const int8_t *q8, int nq, int cbytes, int8_t *pack)
{
    (void)q8, (void)nq, (void)cbytes, (void)pack;
    abort(); /* never reached: ra_kern_amx_ok() is 0 */
}

size_t ra_kern_amx_dots32(const int8_t *pack, int cbytes, const uint8_t *codes, size_t stride,
                          size_t n, int pf, const int32_t *tau, int32_t *dots, uint32_t *mask,
                          uint32_t *rows)
{
    (void)pack, (void)cbytes, (void)codes, (void)stride, (void)n, (void)pf, (void)tau, (void)dots;
    (void)mask, (void)rows;
    abort();
}
#endif
