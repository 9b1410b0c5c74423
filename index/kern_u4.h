/* Internal to index/kernels_avx2.c, kernels_avx512.c and kernels_vnni.c: the loop of
 * the 4-bit code kernel around an ISA's `rows(q, g, cb, code, out)` (one code against
 * g <= 4 prepared queries), in the body of a function with ra_kern_u4dot_fn's
 * parameters (q8, G, cb, base, stride, ids, n, out). A macro, so that each ISA file
 * compiles it with its own rows inlined at a constant g. */
#ifndef RA_KERN_U4_H
#define RA_KERN_U4_H

#define RA_KERN_U4_GATHER(rows)                                                                    \
    for (size_t i = 0; i < n; i++) {                                                               \
        const uint8_t *c = base + (size_t)ids[i] * stride;                                         \
        int32_t *o = out + i * (size_t)G;                                                          \
        for (int j = 0; j < G; j += 4) {                                                           \
            const int8_t *q = q8 + (size_t)j * 2 * cb;                                             \
            switch (G - j) {                                                                       \
            case 1: rows(q, 1, cb, c, o + j); break;                                               \
            case 2: rows(q, 2, cb, c, o + j); break;                                               \
            case 3: rows(q, 3, cb, c, o + j); break;                                               \
            default: rows(q, 4, cb, c, o + j); break;                                              \
            }                                                                                      \
        }                                                                                          \
    }

#endif
