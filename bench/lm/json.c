/* Recursive-descent JSON parser behind lm_json.h. Bounded by design (depth, node
 * count, the caller's length) because its inputs are file headers written by
 * someone else; \u escapes are decoded to UTF-8, surrogate pairs included. */
#include "lm_json.h"

#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef struct parser {
    const char *s;
    size_t len, pos;
    size_t nodes;
    char *err;
    size_t errlen;
    ra_status st;
} parser;

static int fail(parser *p, ra_status st, const char *fmt, ...)
{
    if (p->st == RA_OK) {
        p->st = st;
        if (p->err && p->errlen) {
            int n = snprintf(p->err, p->errlen, "byte %zu: ", p->pos);
            va_list ap;
            va_start(ap, fmt);
            if (n >= 0 && (size_t)n < p->errlen)
                vsnprintf(p->err + n, p->errlen - (size_t)n, fmt, ap);
            va_end(ap);
        }
    }
    return -1;
}

static void skip_ws(parser *p)
{
    while (p->pos < p->len && (p->s[p->pos] == ' ' || p->s[p->pos] == '\t' || p->s[p->pos] == '\n' ||
                               p->s[p->pos] == '\r'))
        p->pos++;
}

static void free_node(ra_lm_json *j)
{
    free(j->str);
    for (size_t i = 0; i < j->n; i++) {
        free_node(&j->kids[i]);
        if (j->keys)
            free(j->keys[i]);
    }
    free(j->kids);
    free(j->keys);
}

static int hex4(parser *p, unsigned *out)
{
    if (p->len - p->pos < 4)
        return fail(p, RA_EPROTO, "truncated \\u escape");
    unsigned v = 0;
    for (int i = 0; i < 4; i++) {
        char c = p->s[p->pos++];
        v <<= 4;
        if (c >= '0' && c <= '9')
            v |= (unsigned)(c - '0');
        else if (c >= 'a' && c <= 'f')
            v |= (unsigned)(c - 'a' + 10);
        else if (c >= 'A' && c <= 'F')
            v |= (unsigned)(c - 'A' + 10);
        else
            return fail(p, RA_EPROTO, "bad \\u escape");
    }
    *out = v;
    return 0;
}

/* At an opening quote; decodes into a fresh buffer (never longer than the input). */
static int parse_string(parser *p, char **out)
{
    p->pos++; /* quote */
    size_t start = p->pos;
    size_t end = start;
    while (end < p->len && p->s[end] != '"') {
        if (p->s[end] == '\\')
            end++;
        end++;
    }
    if (end >= p->len)
        return fail(p, RA_EPROTO, "unterminated string");
    char *buf = malloc(end - start + 1);
    if (!buf)
        return fail(p, RA_ENOMEM, "out of memory");
    size_t n = 0;
    while (p->pos < end) {
        unsigned char c = (unsigned char)p->s[p->pos++];
        if (c < 0x20) {
            free(buf);
            return fail(p, RA_EPROTO, "control character in string");
        }
        if (c != '\\') {
            buf[n++] = (char)c;
            continue;
        }
        char e = p->s[p->pos++];
        unsigned cp;
        switch (e) {
        case '"': buf[n++] = '"'; break;
        case '\\': buf[n++] = '\\'; break;
        case '/': buf[n++] = '/'; break;
        case 'b': buf[n++] = '\b'; break;
        case 'f': buf[n++] = '\f'; break;
        case 'n': buf[n++] = '\n'; break;
        case 'r': buf[n++] = '\r'; break;
        case 't': buf[n++] = '\t'; break;
        case 'u':
            if (hex4(p, &cp) != 0)
                goto bad;
            if (cp >= 0xd800 && cp < 0xdc00) {
                unsigned lo;
                if (p->len - p->pos < 6 || p->s[p->pos] != '\\' || p->s[p->pos + 1] != 'u') {
                    fail(p, RA_EPROTO, "lone surrogate");
                    goto bad;
                }
                p->pos += 2;
                if (hex4(p, &lo) != 0)
                    goto bad;
                if (lo < 0xdc00 || lo > 0xdfff) {
                    fail(p, RA_EPROTO, "bad surrogate pair");
                    goto bad;
                }
                cp = 0x10000 + ((cp - 0xd800) << 10) + (lo - 0xdc00);
            } else if (cp >= 0xdc00 && cp < 0xe000) {
                fail(p, RA_EPROTO, "lone surrogate");
                goto bad;
            }
            if (cp == 0) {
                fail(p, RA_EPROTO, "NUL in string");
                goto bad;
            }
            /* 6 escape bytes always cover the <= 4 UTF-8 bytes written */
            if (cp < 0x80) {
                buf[n++] = (char)cp;
            } else if (cp < 0x800) {
                buf[n++] = (char)(0xc0 | cp >> 6);
                buf[n++] = (char)(0x80 | (cp & 0x3f));
            } else if (cp < 0x10000) {
                buf[n++] = (char)(0xe0 | cp >> 12);
                buf[n++] = (char)(0x80 | ((cp >> 6) & 0x3f));
                buf[n++] = (char)(0x80 | (cp & 0x3f));
            } else {
                buf[n++] = (char)(0xf0 | cp >> 18);
                buf[n++] = (char)(0x80 | ((cp >> 12) & 0x3f));
                buf[n++] = (char)(0x80 | ((cp >> 6) & 0x3f));
                buf[n++] = (char)(0x80 | (cp & 0x3f));
            }
            break;
        default:
            fail(p, RA_EPROTO, "bad escape");
            goto bad;
        }
    }
    p->pos = end + 1;
    buf[n] = 0;
    *out = buf;
    return 0;
bad:
    free(buf);
    return -1;
}

static int parse_value(parser *p, ra_lm_json *j, int depth);

static int parse_container(parser *p, ra_lm_json *j, int depth, int is_obj)
{
    char close = is_obj ? '}' : ']';
    size_t cap = 0;
    j->type = is_obj ? RA_LM_JSON_OBJ : RA_LM_JSON_ARR;
    p->pos++;
    skip_ws(p);
    if (p->pos < p->len && p->s[p->pos] == close) {
        p->pos++;
        return 0;
    }
    for (;;) {
        if (j->n == cap) {
            size_t nc = cap ? cap * 2 : 8;
            ra_lm_json *k = realloc(j->kids, nc * sizeof *k);
            if (!k)
                return fail(p, RA_ENOMEM, "out of memory");
            j->kids = k;
            if (is_obj) {
                char **ks = realloc(j->keys, nc * sizeof *ks);
                if (!ks)
                    return fail(p, RA_ENOMEM, "out of memory");
                j->keys = ks;
            }
            cap = nc;
        }
        ra_lm_json *kid = &j->kids[j->n];
        memset(kid, 0, sizeof *kid);
        char *key = NULL;
        skip_ws(p);
        if (is_obj) {
            if (p->pos >= p->len || p->s[p->pos] != '"')
                return fail(p, RA_EPROTO, "expected a key string");
            if (parse_string(p, &key) != 0)
                return -1;
            skip_ws(p);
            if (p->pos >= p->len || p->s[p->pos] != ':') {
                free(key);
                return fail(p, RA_EPROTO, "expected ':'");
            }
            p->pos++;
        }
        if (parse_value(p, kid, depth + 1) != 0) {
            free_node(kid);
            free(key);
            return -1;
        }
        if (is_obj)
            j->keys[j->n] = key;
        j->n++;
        skip_ws(p);
        if (p->pos >= p->len)
            return fail(p, RA_EPROTO, "unterminated %s", is_obj ? "object" : "array");
        if (p->s[p->pos] == ',') {
            p->pos++;
            continue;
        }
        if (p->s[p->pos] == close) {
            p->pos++;
            return 0;
        }
        return fail(p, RA_EPROTO, "expected ',' or '%c'", close);
    }
}

static int parse_value(parser *p, ra_lm_json *j, int depth)
{
    if (depth > RA_LM_JSON_MAX_DEPTH)
        return fail(p, RA_ETOOBIG, "nesting deeper than %d", RA_LM_JSON_MAX_DEPTH);
    if (++p->nodes > RA_LM_JSON_MAX_NODES)
        return fail(p, RA_ETOOBIG, "more than %u values", RA_LM_JSON_MAX_NODES);
    skip_ws(p);
    if (p->pos >= p->len)
        return fail(p, RA_EPROTO, "unexpected end of input");
    char c = p->s[p->pos];
    size_t rest = p->len - p->pos;
    if (c == '{' || c == '[')
        return parse_container(p, j, depth, c == '{');
    if (c == '"') {
        j->type = RA_LM_JSON_STR;
        return parse_string(p, &j->str);
    }
    if (rest >= 4 && memcmp(p->s + p->pos, "true", 4) == 0) {
        j->type = RA_LM_JSON_BOOL;
        j->boolean = 1;
        p->pos += 4;
        return 0;
    }
    if (rest >= 5 && memcmp(p->s + p->pos, "false", 5) == 0) {
        j->type = RA_LM_JSON_BOOL;
        p->pos += 5;
        return 0;
    }
    if (rest >= 4 && memcmp(p->s + p->pos, "null", 4) == 0) {
        j->type = RA_LM_JSON_NULL;
        p->pos += 4;
        return 0;
    }
    if (c == '-' || (c >= '0' && c <= '9')) {
        /* copy the token (bounded) so strtod never reads past the caller's buffer */
        char tok[64];
        size_t n = 0;
        while (p->pos + n < p->len && n < sizeof tok - 1 && strchr("+-.eE0123456789", p->s[p->pos + n]))
            n++;
        if (n == sizeof tok - 1)
            return fail(p, RA_EPROTO, "number too long");
        memcpy(tok, p->s + p->pos, n);
        tok[n] = 0;
        char *end;
        double v = strtod(tok, &end);
        if (end != tok + n || !isfinite(v))
            return fail(p, RA_EPROTO, "bad number '%s'", tok);
        j->type = RA_LM_JSON_NUM;
        j->num = v;
        p->pos += n;
        return 0;
    }
    return fail(p, RA_EPROTO, "unexpected character 0x%02x", (unsigned char)c);
}

ra_status ra_lm_json_parse(const char *text, size_t len, ra_lm_json **out, char *err, size_t errlen)
{
    parser p = {.s = text, .len = len, .err = err, .errlen = errlen, .st = RA_OK};
    ra_lm_json *j = calloc(1, sizeof *j);
    if (!j)
        return RA_ENOMEM;
    if (parse_value(&p, j, 0) == 0) {
        skip_ws(&p);
        if (p.pos != p.len)
            fail(&p, RA_EPROTO, "trailing data after the JSON value");
    }
    if (p.st != RA_OK) {
        ra_lm_json_free(j);
        return p.st;
    }
    *out = j;
    return RA_OK;
}

void ra_lm_json_free(ra_lm_json *j)
{
    if (!j)
        return;
    free_node(j);
    free(j);
}

const ra_lm_json *ra_lm_json_get(const ra_lm_json *j, const char *key)
{
    if (!j || j->type != RA_LM_JSON_OBJ)
        return NULL;
    for (size_t i = 0; i < j->n; i++)
        if (strcmp(j->keys[i], key) == 0)
            return &j->kids[i];
    return NULL;
}

int ra_lm_json_int(const ra_lm_json *j, long long lo, long long hi, long long *out)
{
    if (!j || j->type != RA_LM_JSON_NUM || j->num != floor(j->num) || j->num < (double)lo ||
        j->num > (double)hi || fabs(j->num) > 9007199254740992.0)
        return 0;
    *out = (long long)j->num;
    return 1;
}
