/*
 * fuzz_util.h - helpers shared by the libFuzzer targets in tests/fuzz/ (built by `make fuzz`
 * with clang -fsanitize=fuzzer,address,undefined into build/fuzz). Parsers that read a file
 * or a folder get the fuzz input written to a per-process temporary folder.
 */
#ifndef LK_FUZZ_UTIL_H
#define LK_FUZZ_UTIL_H

#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "../../libcore/lk.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

/* A temporary folder for this process, made on first use (removed at exit). */
static char fz_dir_buf[256];
static void fz_cleanup(void)
{
    if (fz_dir_buf[0])
        lk_rm_rf(fz_dir_buf);
}
static inline const char *fz_dir(void)
{
    if (!fz_dir_buf[0]) {
        const char *t = getenv("TMPDIR");
        snprintf(fz_dir_buf, sizeof fz_dir_buf, "%s/lkfuzz.XXXXXX", t && *t ? t : "/tmp");
        if (!mkdtemp(fz_dir_buf))
            abort();
        atexit(fz_cleanup);
    }
    return fz_dir_buf;
}

/* fz_dir()/name into a static buffer. */
static inline const char *fz_path(const char *name)
{
    static char p[512];
    snprintf(p, sizeof p, "%s/%s", fz_dir(), name);
    return p;
}

/* Writes data to path (plain POSIX calls: the harness, not the code under test). The file is
 * overwritten in place and cut to n bytes, not truncated to zero first: ext4 flushes a file
 * truncated to zero when it is closed, which made every execution wait for the disk. */
static inline void fz_write(const char *path, const void *data, size_t n)
{
    int fd = open(path, O_WRONLY | O_CREAT, 0644);
    if (fd < 0)
        abort();
    const char *p = data;
    for (size_t done = 0; done < n;) {
        ssize_t w = write(fd, p + done, n - done);
        if (w <= 0)
            abort();
        done += (size_t)w;
    }
    if (ftruncate(fd, (off_t)n) || close(fd))
        abort();
}

/* A NUL-terminated heap copy of the input (caller frees). */
static inline char *fz_cstr(const uint8_t *data, size_t n)
{
    char *s = malloc(n + 1);
    if (!s)
        abort();
    memcpy(s, data, n);
    s[n] = 0;
    return s;
}

/* An error must carry a message: a parser failing silently is a finding too. */
static inline void fz_check_err(int rc, const struct lk_err *err)
{
    if (rc && !err->msg[0])
        abort();
}

#endif
