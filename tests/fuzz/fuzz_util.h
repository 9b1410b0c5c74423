/* Shared by the fuzz targets of tests/fuzz: the readers under test take a path, so a
 * fuzz input is handed to them as a file. An anonymous memory file (memfd) named by
 * /proc/self/fd/N costs no disk I/O and is a regular file for fstat; a model directory
 * (two files) is a private folder under $TMPDIR made once per process. Header-only;
 * the targets are compiled with _GNU_SOURCE (memfd_create). */
#ifndef RA_FUZZ_UTIL_H
#define RA_FUZZ_UTIL_H

#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

/* A memfd holding data[0..n); *path gets /proc/self/fd/N. Returns the fd (close it), or
 * -1 when the kernel refuses (the input is then skipped). */
__attribute__((unused)) static int fuzz_memfile(const uint8_t *data, size_t n, char *path, size_t len)
{
    int fd = memfd_create("ratd-fuzz", MFD_CLOEXEC);
    if (fd < 0)
        return -1;
    size_t off = 0;
    while (off < n) {
        ssize_t w = write(fd, data + off, n - off);
        if (w <= 0) {
            close(fd);
            return -1;
        }
        off += (size_t)w;
    }
    snprintf(path, len, "/proc/self/fd/%d", fd);
    return fd;
}

/* Writes data[0..n) to path (replacing it); 0 on success. */
__attribute__((unused)) static int fuzz_write_file(const char *path, const uint8_t *data, size_t n)
{
    FILE *f = fopen(path, "wb");
    if (!f)
        return -1;
    int ok = fwrite(data, 1, n, f) == n;
    return fclose(f) == 0 && ok ? 0 : -1;
}

/* A private directory for this process, removed at exit with the files named in
 * fuzz_dir_file. */
static char g_fuzz_dir[256];
static char g_fuzz_files[4][320];
static void fuzz_dir_cleanup(void)
{
    for (int i = 0; i < 4; i++)
        if (g_fuzz_files[i][0])
            unlink(g_fuzz_files[i]);
    if (g_fuzz_dir[0])
        rmdir(g_fuzz_dir);
}
__attribute__((unused)) static const char *fuzz_dir(void)
{
    if (!g_fuzz_dir[0]) {
        const char *t = getenv("TMPDIR");
        snprintf(g_fuzz_dir, sizeof g_fuzz_dir, "%s/ratd-fuzz-XXXXXX", t && *t ? t : "/tmp");
        if (!mkdtemp(g_fuzz_dir)) {
            perror("mkdtemp");
            abort();
        }
        atexit(fuzz_dir_cleanup);
    }
    return g_fuzz_dir;
}
/* Path of file `name` (slot 0..3) in the private directory. */
__attribute__((unused)) static const char *fuzz_dir_file(int slot, const char *name)
{
    snprintf(g_fuzz_files[slot], sizeof g_fuzz_files[slot], "%s/%s", fuzz_dir(), name);
    return g_fuzz_files[slot];
}

/* Reads every byte of p[0..n) so that a pointer past its buffer shows up under ASan. */
__attribute__((unused)) static uint64_t fuzz_touch(const void *p, size_t n)
{
    const volatile uint8_t *b = p;
    uint64_t s = 0;
    for (size_t i = 0; i < n; i++)
        s += b[i];
    return s;
}

#endif
