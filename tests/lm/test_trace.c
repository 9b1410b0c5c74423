/* Unit tests of the trace format (bench/lm/ra_trace.h): write/read round trips in
 * every dtype, the layout promised in the header comment, and readers that refuse
 * truncated, padded, mislabelled or half-written files. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <math.h>
#include <string.h>
#include <unistd.h>

#include <cmocka.h>

#include "ra_trace.h"

static char g_dir[256];

static int setup(void **state)
{
    snprintf(g_dir, sizeof g_dir, "/tmp/ra_trace_test.XXXXXX");
    return mkdtemp(g_dir) ? 0 : -1;
}

static int teardown(void **state)
{
    char cmd[300];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", g_dir);
    return system(cmd) == 0 ? 0 : -1;
}

static float val(int t, int l, int h, int p, int d)
{
    return (float)(t * 1000 + l * 100 + h * 10 + p) + (float)d / 64.0f;
}

static ra_trace_info small_info(ra_dtype dt)
{
    ra_trace_info i = {.dtype = dt, .n_layers = 2, .n_heads = 4, .n_kv_heads = 2, .head_dim = 8,
                       .n_pos = 5, .pos0 = 0, .rope_theta = 10000.0f};
    return i;
}

static void write_trace(const char *path, ra_trace_info info)
{
    ra_trace_writer *w;
    char err[256];
    assert_int_equal(ra_trace_writer_create(path, &info, &w, err, sizeof err), RA_OK);
    float row[8 * 5];
    for (int l = 0; l < 2; l++)
        for (int t = 0; t < 3; t++)
            for (int h = 0; h < (t == 0 ? 4 : 2); h++) {
                for (int p = 0; p < 5; p++)
                    for (int d = 0; d < 8; d++)
                        row[p * 8 + d] = val(t, l, h, p, d);
                /* two puts per block: rows may arrive in pieces */
                assert_int_equal(ra_trace_writer_put(w, (ra_trace_tensor)t, l, h, 0, 2, row), RA_OK);
                assert_int_equal(ra_trace_writer_put(w, (ra_trace_tensor)t, l, h, 2, 3, row + 16), RA_OK);
            }
    assert_int_equal(ra_trace_writer_finish(w, err, sizeof err), RA_OK);
}

static void round_trip(ra_dtype dt)
{
    char path[300];
    snprintf(path, sizeof path, "%s/t%d.trace", g_dir, (int)dt);
    ra_trace_info info = small_info(dt);
    write_trace(path, info);
    ra_trace *t;
    char err[256];
    assert_int_equal(ra_trace_open(path, &t, err, sizeof err), RA_OK);
    const ra_trace_info *ri = ra_trace_get_info(t);
    assert_int_equal(ri->n_pos, 5);
    assert_int_equal(ri->dtype, dt);
    assert_true(ri->rope_theta == 10000.0f);
    float out[8 * 5];
    for (int l = 0; l < 2; l++)
        for (int tt = 0; tt < 3; tt++)
            for (int h = 0; h < (tt == 0 ? 4 : 2); h++) {
                assert_int_equal(ra_trace_read(t, (ra_trace_tensor)tt, l, h, 1, 4, out), RA_OK);
                for (int p = 1; p < 5; p++)
                    for (int d = 0; d < 8; d++) {
                        float want = val(tt, l, h, p, d);
                        float tol = dt == RA_DTYPE_F32 ? 0.0f : dt == RA_DTYPE_F16 ? 1e-3f * want : 8e-3f * want;
                        assert_true(fabsf(out[(p - 1) * 8 + d] - want) <= tol);
                    }
            }
    /* out-of-range requests are refused, not clamped */
    assert_int_equal(ra_trace_read(t, RA_TRACE_K, 0, 2, 0, 1, out), RA_EINVAL);
    assert_int_equal(ra_trace_read(t, RA_TRACE_Q, 2, 0, 0, 1, out), RA_EINVAL);
    assert_int_equal(ra_trace_read(t, RA_TRACE_Q, 0, 0, 4, 2, out), RA_EINVAL);
    ra_trace_close(t);
}

static void test_round_trip_f32(void **s) { round_trip(RA_DTYPE_F32); }
static void test_round_trip_f16(void **s) { round_trip(RA_DTYPE_F16); }
static void test_round_trip_bf16(void **s) { round_trip(RA_DTYPE_BF16); }

/* The documented layout: K of layer 1, KV head 1, row 3 sits at the offset the
 * header comment gives, and the file size is exact. */
static void test_layout(void **s)
{
    char path[300];
    snprintf(path, sizeof path, "%s/layout.trace", g_dir);
    ra_trace_info info = small_info(RA_DTYPE_F32);
    write_trace(path, info);
    uint64_t block = 5 * 8 * 4, layer = (4 + 2 + 2) * block;
    assert_int_equal(ra_trace_file_size(&info), 64 + 2 * layer);
    uint64_t off = 64 + layer + (4 + 1) * block + 3 * 8 * 4;
    assert_int_equal(ra_trace_offset(&info, RA_TRACE_K, 1, 1, 3), off);
    FILE *f = fopen(path, "rb");
    assert_non_null(f);
    char magic[8];
    assert_int_equal(fread(magic, 1, 8, f), 8);
    assert_memory_equal(magic, "RATRACE\0", 8);
    float x;
    assert_int_equal(fseek(f, (long)off, SEEK_SET), 0);
    assert_int_equal(fread(&x, 4, 1, f), 1);
    fclose(f);
    assert_true(x == val(1, 1, 1, 3, 0));
}

static void expect_open_fails(const char *path, ra_status want, const char *needle)
{
    ra_trace *t = NULL;
    char err[512] = "";
    assert_int_equal(ra_trace_open(path, &t, err, sizeof err), want);
    assert_null(t);
    assert_non_null(strstr(err, path)); /* the message names the file */
    if (needle && !strstr(err, needle))
        fail_msg("message '%s' lacks '%s'", err, needle);
}

static void test_bad_files(void **s)
{
    char path[300], bad[300];
    snprintf(path, sizeof path, "%s/good.trace", g_dir);
    write_trace(path, small_info(RA_DTYPE_F16));
    FILE *f = fopen(path, "rb");
    static uint8_t buf[1 << 16];
    size_t n = fread(buf, 1, sizeof buf, f);
    fclose(f);

    snprintf(bad, sizeof bad, "%s/bad.trace", g_dir);
    expect_open_fails(bad, RA_EIO, "cannot open");

    /* truncated by one byte / padded by one byte */
    f = fopen(bad, "wb");
    fwrite(buf, 1, n - 1, f);
    fclose(f);
    expect_open_fails(bad, RA_EPROTO, "header implies");
    f = fopen(bad, "wb");
    fwrite(buf, 1, n, f);
    fputc(0, f);
    fclose(f);
    expect_open_fails(bad, RA_EPROTO, "header implies");

    /* shorter than the header */
    f = fopen(bad, "wb");
    fwrite(buf, 1, 10, f);
    fclose(f);
    expect_open_fails(bad, RA_EPROTO, "shorter");

    /* bad magic, future version, unknown dtype, GQA mismatch, huge dims */
    struct { size_t off; uint32_t v; ra_status st; const char *msg; } cases[] = {
        {0, 0x41414141u, RA_EPROTO, "magic"},  {8, 2, RA_EVERSION, "version"},
        {12, 7, RA_EPROTO, "dtype"},           {24, 3, RA_EPROTO, "kv heads"},
        {32, 0xffffffffu, RA_EPROTO, "header"}, {28, 0, RA_EPROTO, "header"},
    };
    for (size_t c = 0; c < sizeof cases / sizeof cases[0]; c++) {
        static uint8_t b2[1 << 16];
        memcpy(b2, buf, n);
        memcpy(b2 + cases[c].off, &cases[c].v, 4);
        f = fopen(bad, "wb");
        fwrite(b2, 1, n, f);
        fclose(f);
        expect_open_fails(bad, cases[c].st, cases[c].msg);
    }
}

/* A writer that is not finished (or is finished with missing rows) leaves nothing. */
static void test_nothing_half_written(void **s)
{
    char path[300], tmp[310];
    snprintf(path, sizeof path, "%s/half.trace", g_dir);
    snprintf(tmp, sizeof tmp, "%s.tmp", path);
    ra_trace_info info = small_info(RA_DTYPE_F32);
    ra_trace_writer *w;
    char err[256];
    float row[40] = {0};
    assert_int_equal(ra_trace_writer_create(path, &info, &w, err, sizeof err), RA_OK);
    assert_int_equal(ra_trace_writer_put(w, RA_TRACE_Q, 0, 0, 0, 5, row), RA_OK);
    assert_int_equal(access(path, F_OK), -1);
    assert_int_equal(ra_trace_writer_finish(w, err, sizeof err), RA_ESTATE);
    assert_int_equal(access(path, F_OK), -1);
    assert_int_equal(access(tmp, F_OK), -1);

    assert_int_equal(ra_trace_writer_create(path, &info, &w, err, sizeof err), RA_OK);
    assert_int_equal(ra_trace_writer_put(w, RA_TRACE_V, 1, 2, 0, 1, row), RA_EINVAL);
    ra_trace_writer_abort(w);
    assert_int_equal(access(tmp, F_OK), -1);

    info.n_kv_heads = 3; /* 4 heads over 3 KV heads: refused up front */
    assert_int_equal(ra_trace_writer_create(path, &info, &w, err, sizeof err), RA_EINVAL);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_round_trip_f32), cmocka_unit_test(test_round_trip_f16),
        cmocka_unit_test(test_round_trip_bf16), cmocka_unit_test(test_layout),
        cmocka_unit_test(test_bad_files),      cmocka_unit_test(test_nothing_half_written),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
