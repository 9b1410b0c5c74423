/* Trace files: the post-RoPE queries, keys and values of every layer and head of a
 * real model over one context, written by ratd-lm-eval --dump-trace and read by
 * ratd-bench-index --trace and the tests. They exist so that index benchmarks run
 * on the vectors a trained model really produces (queries out of distribution for
 * the keys) instead of random ones.
 *
 * Format, version 1 (all integers little-endian):
 *
 *   offset size  field
 *        0    8  magic "RATRACE\0"
 *        8    4  u32 version = 1
 *       12    4  u32 dtype of the tensors: ra_dtype (0 f32, 1 f16, 2 bf16)
 *       16    4  u32 n_layers
 *       20    4  u32 n_heads      (query heads)
 *       24    4  u32 n_kv_heads   (GQA: query head h uses KV head h / (n_heads / n_kv_heads))
 *       28    4  u32 head_dim
 *       32    4  u32 n_pos        (number of positions, one row per position)
 *       36    4  u32 pos0         (absolute position of the first row; 0 for a prefill)
 *       40    4  f32 rope_theta   (informational: the RoPE base already applied)
 *       44    4  u32 flags        (0; reserved)
 *       48   16  reserved, zero
 *       64       data
 *
 * Data: for each layer l = 0..n_layers-1, three blocks in this order
 *   Q[n_heads   ][n_pos][head_dim]
 *   K[n_kv_heads][n_pos][head_dim]
 *   V[n_kv_heads][n_pos][head_dim]
 * elements of `dtype`, row-major. Head-major so that one head's keys (what one
 * index holds) are a single contiguous [n_pos][head_dim] run. Row i holds position
 * pos0 + i; Q and K have RoPE applied at that position (HF Llama rotate_half
 * layout), Q is not scaled by 1/sqrt(head_dim). The vectors come from a causal
 * prefill with full attention over the trace's positions, so row i of Q is the
 * query of position pos0 + i and its attention is over K rows 0..i.
 * The file size is exactly 64 + n_layers * (n_heads + 2 n_kv_heads) * n_pos *
 * head_dim * sizeof(dtype); a reader rejects anything else.
 *
 * Writers build FILE.tmp and rename it over FILE when every block was written, so
 * a failed run never leaves a partial trace behind. Ownership: the handles are
 * heap objects; ra_trace_close / ra_trace_writer_finish / _abort free them. */
#ifndef RA_TRACE_H
#define RA_TRACE_H

#include <stddef.h>
#include <stdint.h>

#include "ratd/status.h"

#ifdef __cplusplus
extern "C" {
#endif

#define RA_TRACE_MAGIC "RATRACE"   /* 8 bytes with the terminating NUL */
#define RA_TRACE_VERSION 1u
#define RA_TRACE_HEADER_SIZE 64u

/* Bounds a reader enforces before trusting the header. */
#define RA_TRACE_MAX_LAYERS 1024u
#define RA_TRACE_MAX_HEADS 1024u
#define RA_TRACE_MAX_HEAD_DIM 4096u
#define RA_TRACE_MAX_POS (1u << 26)

typedef enum ra_trace_tensor { RA_TRACE_Q = 0, RA_TRACE_K = 1, RA_TRACE_V = 2 } ra_trace_tensor;

typedef struct ra_trace_info {
    uint32_t version;
    ra_dtype dtype;
    uint32_t n_layers, n_heads, n_kv_heads, head_dim;
    uint32_t n_pos, pos0;
    float rope_theta;
} ra_trace_info;

/* Checks the dims of an info against the bounds above (GQA: n_heads a multiple of
 * n_kv_heads). RA_OK or RA_EINVAL. */
ra_status ra_trace_info_check(const ra_trace_info *info);

/* Byte offset of row `pos` (0-based, relative to pos0) of head `head` of tensor
 * `which` in layer `layer`; the caller has checked the indices. */
uint64_t ra_trace_offset(const ra_trace_info *info, ra_trace_tensor which, uint32_t layer,
                         uint32_t head, uint32_t pos);

/* Total file size implied by an info (header included). */
uint64_t ra_trace_file_size(const ra_trace_info *info);

/* The prefill positions whose queries a decoder sends to train the index (what
 * ratd-lm-eval sends, and ratd-bench-decode --trace): of rows 0..n_rows-1, the last
 * want/2 plus a stride over the rest (recent queries resemble decode queries); all rows
 * when want >= n_rows. Writes min(want, n_rows) increasing positions to pos (caller-sized)
 * and returns that count. */
unsigned ra_trace_sample_train(unsigned n_rows, unsigned want, unsigned *pos);

/* ---- reader ---- */
typedef struct ra_trace ra_trace;

/* Opens and validates a trace (magic, version, dtype, bounds, exact file size).
 * On failure returns RA_EIO (cannot open/read), RA_EPROTO (not a trace / bad
 * header), RA_EVERSION or RA_EINVAL; when err is non-NULL a message naming the
 * file and the problem is written to it. */
ra_status ra_trace_open(const char *path, ra_trace **out, char *err, size_t errlen);

const ra_trace_info *ra_trace_get_info(const ra_trace *t);

/* Reads rows [pos, pos + n) of one head of one tensor, converted to f32, into
 * out[n * head_dim] (caller-sized). RA_EINVAL for indices out of range, RA_EIO on
 * a short read. */
ra_status ra_trace_read(ra_trace *t, ra_trace_tensor which, uint32_t layer, uint32_t head,
                        uint32_t pos, uint32_t n, float *out);

void ra_trace_close(ra_trace *t);

/* ---- writer ---- */
typedef struct ra_trace_writer ra_trace_writer;

/* Creates PATH.tmp sized for `info` (info->version is ignored: 1 is written). */
ra_status ra_trace_writer_create(const char *path, const ra_trace_info *info, ra_trace_writer **out,
                                 char *err, size_t errlen);

/* Writes rows [pos, pos + n) of one head of one tensor from f32 `src[n * head_dim]`,
 * converting to the file's dtype. Blocks may come in any order. */
ra_status ra_trace_writer_put(ra_trace_writer *w, ra_trace_tensor which, uint32_t layer,
                              uint32_t head, uint32_t pos, uint32_t n, const float *src);

/* Checks that every row of every block was written, flushes, renames PATH.tmp to
 * PATH and frees w (also on failure, after removing PATH.tmp). */
ra_status ra_trace_writer_finish(ra_trace_writer *w, char *err, size_t errlen);

/* Removes PATH.tmp and frees w. NULL is a no-op. */
void ra_trace_writer_abort(ra_trace_writer *w);

#ifdef __cplusplus
}
#endif
#endif
