/* A small, bounded JSON reader for the two JSON texts the decoder meets: a
 * safetensors header and a Hugging Face config.json. Both come from files, so the
 * parser trusts nothing: input length, nesting depth and node count are capped, and
 * every error says at which byte it stopped. Internal to bench/lm. */
#ifndef RA_LM_JSON_H
#define RA_LM_JSON_H

#include <stddef.h>

#include "ratd/status.h"

typedef enum ra_lm_json_type {
    RA_LM_JSON_NULL,
    RA_LM_JSON_BOOL,
    RA_LM_JSON_NUM,
    RA_LM_JSON_STR,
    RA_LM_JSON_ARR,
    RA_LM_JSON_OBJ
} ra_lm_json_type;

typedef struct ra_lm_json ra_lm_json;
struct ra_lm_json {
    ra_lm_json_type type;
    int boolean;
    double num;
    char *str;         /* STR: decoded, NUL-terminated (embedded NULs are rejected) */
    size_t n;          /* ARR/OBJ: number of children */
    ra_lm_json *kids;  /* ARR/OBJ children */
    char **keys;       /* OBJ: keys[i] names kids[i] */
};

#define RA_LM_JSON_MAX_DEPTH 32
#define RA_LM_JSON_MAX_NODES (1u << 20)

/* Parses text[0..len) (need not be NUL-terminated). RA_EPROTO with a message in err
 * ("byte N: ...") on malformed input, RA_ETOOBIG past the caps, RA_ENOMEM. The tree is
 * freed with ra_lm_json_free. */
ra_status ra_lm_json_parse(const char *text, size_t len, ra_lm_json **out, char *err, size_t errlen);
void ra_lm_json_free(ra_lm_json *j);

/* The member `key` of an object, or NULL (also when j is not an object). */
const ra_lm_json *ra_lm_json_get(const ra_lm_json *j, const char *key);

/* 1 when j is a number that is an integer in [lo, hi] (and writes it), else 0. */
int ra_lm_json_int(const ra_lm_json *j, long long lo, long long hi, long long *out);

#endif
