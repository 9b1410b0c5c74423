/* Synthetic attention heads for index benchmarks and tests, and the Mahalanobis
 * out-of-distribution measure. The generator exists because a random Gaussian query
 * set is in distribution for the keys and flatters every index; real heads are not:
 * their queries sit far from the keys (a large offset between the query and key
 * means, different and anisotropic spectra), both are rotated by RoPE at their
 * positions, and each query has a few heavy-hitter keys. ra_synth_make reproduces
 * those traits, deterministically from a seed; ra_synth_mahalanobis_ratio measures
 * how far queries are from the key distribution compared with held-out keys.
 * Ownership: ra_synth_make allocates the three arrays; ra_synth_free frees them.
 * ra_synth_make_group gives the query heads of one KV head their own query streams
 * (qseed) on the same keys. */
#ifndef RA_SYNTH_H
#define RA_SYNTH_H

#include <stddef.h>
#include <stdint.h>

#include "ratd/status.h"

typedef struct ra_synth_opts {
    size_t n;         /* keys, at positions 0..n-1 */
    int dim;          /* even */
    size_t n_train;   /* prefill queries (positions < n: half strided, half the last ones) */
    size_t n_queries; /* decode queries at positions n, n+1, ... in order */
    uint64_t seed;
    /* the query process: 0 gives the queries this generator always gave; another value
     * draws another query head's topics, AR(1) stream, needles and prefill queries on
     * the same keys, basis, spectra and means (GQA: query heads sharing a KV head) */
    uint64_t qseed;
    float rho;         /* step-to-step correlation of consecutive queries (0..1) */
    float offset;      /* norm of the query-mean offset, in units of the key spread */
    float hub_frac;    /* fraction of keys that are heavy hitters for most queries */
    int needles;       /* planted heavy-hitter keys per query */
    float needle_gain; /* strength of a planted key in its query */
    int rank;          /* dimension of the query variation */
    float mix;         /* share of strong key directions in the query variation */
    float qscale;      /* size of the query variation */
    float qnoise;      /* isotropic query noise (per coordinate) */
    float blur;        /* how far the key basis strays from the RoPE coordinates */
    int topics;        /* kinds of query (0: none, one Gaussian) */
    int vocab;         /* token types of the keys (Zipfian; 0: plain Gaussian keys) */
    float knoise;      /* a key's own part relative to its type's */
    float tnoise;      /* a query's wobble around its topic, relative to the topic spread */
    float tswitch;     /* probability that a decode stream changes topic at a step */
    float tzipf;       /* Zipf exponent of the topic frequencies (0: uniform) */
    float rope_base;   /* RoPE base (0: 500000, the trained model's) */
    float tneedle;     /* probability that a planted key is its topic's own (else a random
                        * past key): what the query looks for is set by its kind */
    /* knobs for studies of what the index's curve depends on (bench/README.md, "Why
     * the graph does not reach 3 %"); 0 leaves the calibrated generator unchanged */
    float kdecay;   /* key spectrum: direction i has scale exp(-kdecay i / dim) (0: 3) */
    int krank;      /* a key's own (per-position) part spans every (dim/krank)-th key
                     * direction only (0: all): lower local dimension */
    int kslow;      /* 1: the strongest key directions on the slowest of their RoPE
                     * pairs (less key energy on fast pairs, as most real heads) */
    int train_at_n; /* 1: prefill queries rotated at position n (where decode starts), not
                     * their own: what re-rotating them to the decode position would do */
} ra_synth_opts;

void ra_synth_opts_default(ra_synth_opts *o);

typedef struct ra_synth {
    size_t n, n_train, n_queries;
    int dim;
    float *keys;    /* [n][dim] */
    float *train_q; /* [n_train][dim], positions increasing */
    float *queries; /* [n_queries][dim], decode order */
} ra_synth;

ra_status ra_synth_make(const ra_synth_opts *o, ra_synth *out);
void ra_synth_free(ra_synth *s);

/* GQA: the keys of one KV head once, and n_heads query heads on them, head h drawn with
 * qseeds[h] (o->qseed is not read). out[0] holds the keys; out[h].keys is NULL for h > 0
 * (each out[h] is freed with ra_synth_free). ra_synth_make(o, s) is
 * ra_synth_make_group(o, 1, &o->qseed, s). On failure nothing stays allocated. */
#define RA_SYNTH_MAX_GROUP 1024
ra_status ra_synth_make_group(const ra_synth_opts *o, int n_heads, const uint64_t *qseeds,
                              ra_synth *out);

/* Applies "knob=value,..." (the benchmarks' --synth) to o: the knob names are the
 * fields above with short names (offset, mix, rank, qscale, qnoise, hub, needles,
 * needle_gain, topics, tnoise, tswitch, tzipf, tneedle, trainatn, kdecay, krank, kslow,
 * rope_base, rho, vocab, knoise, blur). RA_EINVAL with a message in err for an unknown
 * knob or a value that is not a number (an integer for integer knobs); o is then
 * unchanged. */
ra_status ra_synth_opts_apply(ra_synth_opts *o, const char *spec, char *err, size_t errlen);

/* Mean Mahalanobis distance of the queries to the key distribution over mean
 * Mahalanobis distance of held-out keys, with the keys' mean and covariance fit on
 * the keys that are not held out (every 8th key is held out). 1 means in
 * distribution; the trained model's heads show 1.4-4.7. */
ra_status ra_synth_mahalanobis_ratio(const float *keys, size_t n, const float *q, size_t nq,
                                     int dim, double *ratio);

/* Mean cosine similarity of consecutive rows (step-to-step similarity of a stream). */
double ra_synth_step_cosine(const float *q, size_t nq, int dim);

#endif
