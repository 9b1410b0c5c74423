/* A second, independent generator of out-of-distribution attention heads, for GQA groups:
 * a token stream drives hidden states, and keys and queries are *different* linear maps
 * of them, as in a real attention layer (k = W_K h, q = W_Q h), rotated by RoPE at their
 * positions. Built to share no construction with synth.c (which composes keys and
 * queries from one basis and spectrum), so that an index tuned on one is checked on the
 * other. What makes it out of distribution: the query maps differ from the key map (a
 * token-match part seen through W_K, plus a random projection of the query's own state)
 * and the queries carry a bias along the keys' weakest directions; what gives attention
 * its structure: a Zipfian vocabulary with topic-dependent preferences (keys of one token
 * type cluster), topics that persist for a few hundred tokens, and per query head a
 * "successor" map (head j at token x looks for keys of token sigma_j(x) of the same topic:
 * induction-like retrieval far back). n_rep query heads share one key set (GQA).
 * Ownership: ra_synth_lin_make allocates the arrays; ra_synth_group_free frees them. */
#ifndef RA_SYNTH_LIN_H
#define RA_SYNTH_LIN_H

#include <stddef.h>
#include <stdint.h>

#include "ratd/status.h"

typedef struct ra_synth_lin_opts {
    size_t n;         /* keys, at positions 0..n-1 */
    int dim;          /* even */
    int n_rep;        /* query heads sharing the keys */
    size_t n_train;   /* prefill queries per head (positions < n: half strided, half last) */
    size_t n_queries; /* decode queries per head at positions n, n+1, ... */
    uint64_t seed;
    int hidden;      /* hidden-state width (0: 2 dim) */
    int vocab;       /* token types (0: 4096) */
    float zipf;      /* Zipf exponent of token frequencies (0: 1.1) */
    int topics;      /* topics of the token stream (0: 32) */
    int segment;     /* mean tokens per topic run (0: 256) */
    float match;     /* weight of the token-match part of a query (0: 1.0; < 0: none) */
    float proj;      /* weight of the random projection of the query's state (0: 0.7) */
    float offset;    /* query bias along the keys' weakest directions, in units of the
                        key spread (0: 1.5; < 0: none) */
    float kdecay;    /* singular values of W_K decay as exp(-kdecay i / dim) (0: 2) */
    float rope_base; /* 0: 500000 (Llama-3) */
    int threads;     /* OpenMP threads of the key and query loops (0: OpenMP's default) */
} ra_synth_lin_opts;

void ra_synth_lin_opts_default(ra_synth_lin_opts *o);

typedef struct ra_synth_group {
    size_t n, n_train, n_queries;
    int dim, n_rep;
    float *keys;    /* [n][dim] */
    float *train_q; /* [n_rep][n_train][dim], positions increasing */
    float *queries; /* [n_rep][n_queries][dim], decode order */
} ra_synth_group;

ra_status ra_synth_lin_make(const ra_synth_lin_opts *o, ra_synth_group *out);
void ra_synth_group_free(ra_synth_group *g);

#endif
