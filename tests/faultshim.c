/*
 * faultshim.c - an LD_PRELOAD shim for tests/test_hard.c: a full disk and a read-only
 * destination without root or mounts. Built by the Makefile as $(OUT)/tests/faultshim.so.
 *
 * Only files whose path starts with $LK_FAULT_PATH (an absolute folder) are affected; the
 * standard streams never are. Environment:
 *   LK_FAULT_PATH=/abs/dir      the folder under fault (required; nothing happens without it)
 *   LK_FAULT_ENOSPC_AFTER=N     after N bytes written to files under the folder (write, pwrite,
 *                               writev, fwrite, fputs, fputc, vfprintf/fprintf), every further
 *                               write fails with ENOSPC (a short fwrite, -1 from the others), and
 *                               so do fsync/fdatasync of such files
 *   LK_FAULT_FSYNC=1            every fsync/fdatasync of a file under the folder fails with EIO
 *   LK_FAULT_EROFS=1            opening for writing, creating, mkdir, rename, unlink under the
 *                               folder fail with EROFS (a read-only file system; root ignores
 *                               chmod 555, so permission bits cannot simulate it)
 * glibc's stdio calls its internal write, not the exported one, so the stdio entry points are
 * wrapped too (the byte count is then taken before buffering: a fwrite that would cross the
 * limit fails as a whole).
 */
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/uio.h>
#include <unistd.h>

#define REAL(name) ((__typeof__(&name))real_sym(#name))

static void *real_sym(const char *name)
{
    void *p = dlsym(RTLD_NEXT, name);
    if (!p)
        abort();
    return p;
}

static const char *fault_dir(void)
{
    const char *d = getenv("LK_FAULT_PATH");
    return d && d[0] == '/' ? d : NULL;
}

static long long env_ll(const char *name, long long dflt)
{
    const char *s = getenv(name);
    return s && *s ? atoll(s) : dflt;
}

/* 1 when path (absolute, or relative to the working folder) lies under LK_FAULT_PATH. */
static int under(const char *path)
{
    const char *d = fault_dir();
    if (!d || !path)
        return 0;
    char abs[PATH_MAX + 2];
    if (path[0] == '/')
        snprintf(abs, sizeof abs, "%s", path);
    else {
        char cwd[PATH_MAX];
        if (!getcwd(cwd, sizeof cwd))
            return 0;
        snprintf(abs, sizeof abs, "%s/%s", cwd, path);
    }
    size_t n = strlen(d);
    while (n > 1 && d[n - 1] == '/')
        n--;
    return !strncmp(abs, d, n) && (abs[n] == '/' || abs[n] == 0);
}

static int fd_under(int fd)
{
    if (fd <= 2 || !fault_dir())
        return 0;
    char link[64], path[PATH_MAX + 1];
    snprintf(link, sizeof link, "/proc/self/fd/%d", fd);
    ssize_t n = readlink(link, path, PATH_MAX);
    if (n <= 0)
        return 0;
    path[n] = 0;
    return under(path);
}

static long long written; /* bytes written under the folder so far (this process) */

/* 0 when n more bytes may be written to fd, else -1 with errno ENOSPC. */
static int charge(int fd, size_t n)
{
    long long lim = env_ll("LK_FAULT_ENOSPC_AFTER", -1);
    if (lim < 0 || !fd_under(fd))
        return 0;
    if (written + (long long)n > lim) {
        written = lim;
        errno = ENOSPC;
        return -1;
    }
    written += (long long)n;
    return 0;
}

static int full(int fd)
{
    long long lim = env_ll("LK_FAULT_ENOSPC_AFTER", -1);
    return lim >= 0 && written >= lim && fd_under(fd);
}

static int erofs(const char *path)
{
    return env_ll("LK_FAULT_EROFS", 0) && under(path);
}

// ---- writes ----

ssize_t write(int fd, const void *buf, size_t n)
{
    if (charge(fd, n))
        return -1;
    return REAL(write)(fd, buf, n);
}

ssize_t pwrite(int fd, const void *buf, size_t n, off_t off)
{
    if (charge(fd, n))
        return -1;
    return REAL(pwrite)(fd, buf, n, off);
}

ssize_t pwrite64(int fd, const void *buf, size_t n, off_t off);
ssize_t pwrite64(int fd, const void *buf, size_t n, off_t off)
{
    if (charge(fd, n))
        return -1;
    return REAL(pwrite64)(fd, buf, n, off);
}

ssize_t writev(int fd, const struct iovec *iov, int cnt)
{
    size_t n = 0;
    for (int i = 0; i < cnt; i++)
        n += iov[i].iov_len;
    if (charge(fd, n))
        return -1;
    return REAL(writev)(fd, iov, cnt);
}

static int stream_fd(FILE *f)
{
    return f == stdout || f == stderr ? -1 : fileno(f);
}

size_t fwrite(const void *buf, size_t size, size_t nmemb, FILE *f)
{
    if (size && nmemb && charge(stream_fd(f), size * nmemb))
        return 0;
    return REAL(fwrite)(buf, size, nmemb, f);
}

int fputs(const char *s, FILE *f)
{
    if (charge(stream_fd(f), strlen(s)))
        return EOF;
    return REAL(fputs)(s, f);
}

int fputc(int c, FILE *f)
{
    if (charge(stream_fd(f), 1))
        return EOF;
    return REAL(fputc)(c, f);
}

int vfprintf(FILE *f, const char *fmt, va_list ap)
{
    int fd = stream_fd(f);
    if (fd > 2) {
        va_list aq;
        va_copy(aq, ap);
        int n = vsnprintf(NULL, 0, fmt, aq);
        va_end(aq);
        if (n > 0 && charge(fd, (size_t)n))
            return -1;
    }
    return REAL(vfprintf)(f, fmt, ap);
}

int fprintf(FILE *f, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    int r = vfprintf(f, fmt, ap);
    va_end(ap);
    return r;
}

int fsync(int fd)
{
    if (full(fd) || (env_ll("LK_FAULT_FSYNC", 0) && fd_under(fd))) {
        errno = full(fd) ? ENOSPC : EIO;
        return -1;
    }
    return REAL(fsync)(fd);
}

int fdatasync(int fd)
{
    if (full(fd) || (env_ll("LK_FAULT_FSYNC", 0) && fd_under(fd))) {
        errno = full(fd) ? ENOSPC : EIO;
        return -1;
    }
    return REAL(fdatasync)(fd);
}

// ---- a read-only destination ----

static int wants_write(int flags)
{
    return (flags & O_ACCMODE) != O_RDONLY || (flags & (O_CREAT | O_TRUNC));
}

int open(const char *path, int flags, ...)
{
    mode_t mode = 0;
    if (flags & (O_CREAT | O_TMPFILE)) {
        va_list ap;
        va_start(ap, flags);
        mode = (mode_t)va_arg(ap, int);
        va_end(ap);
    }
    if (wants_write(flags) && erofs(path)) {
        errno = EROFS;
        return -1;
    }
    return REAL(open)(path, flags, mode);
}

int open64(const char *path, int flags, ...);
int open64(const char *path, int flags, ...)
{
    mode_t mode = 0;
    if (flags & (O_CREAT | O_TMPFILE)) {
        va_list ap;
        va_start(ap, flags);
        mode = (mode_t)va_arg(ap, int);
        va_end(ap);
    }
    if (wants_write(flags) && erofs(path)) {
        errno = EROFS;
        return -1;
    }
    return REAL(open64)(path, flags, mode);
}

int openat(int dirfd, const char *path, int flags, ...)
{
    mode_t mode = 0;
    if (flags & (O_CREAT | O_TMPFILE)) {
        va_list ap;
        va_start(ap, flags);
        mode = (mode_t)va_arg(ap, int);
        va_end(ap);
    }
    if (wants_write(flags) && (path[0] == '/' || dirfd == AT_FDCWD) && erofs(path)) {
        errno = EROFS;
        return -1;
    }
    return REAL(openat)(dirfd, path, flags, mode);
}

int creat(const char *path, mode_t mode)
{
    if (erofs(path)) {
        errno = EROFS;
        return -1;
    }
    return REAL(creat)(path, mode);
}

FILE *fopen(const char *path, const char *mode)
{
    if (strpbrk(mode, "wa+") && erofs(path)) {
        errno = EROFS;
        return NULL;
    }
    return REAL(fopen)(path, mode);
}

FILE *fopen64(const char *path, const char *mode);
FILE *fopen64(const char *path, const char *mode)
{
    if (strpbrk(mode, "wa+") && erofs(path)) {
        errno = EROFS;
        return NULL;
    }
    return REAL(fopen64)(path, mode);
}

int mkdir(const char *path, mode_t mode)
{
    if (erofs(path)) {
        struct stat st;
        errno = stat(path, &st) == 0 ? EEXIST : EROFS;
        return -1;
    }
    return REAL(mkdir)(path, mode);
}

int rename(const char *a, const char *b)
{
    if (erofs(a) || erofs(b)) {
        errno = EROFS;
        return -1;
    }
    return REAL(rename)(a, b);
}

int unlink(const char *path)
{
    if (erofs(path)) {
        errno = EROFS;
        return -1;
    }
    return REAL(unlink)(path);
}

int rmdir(const char *path)
{
    if (erofs(path)) {
        errno = EROFS;
        return -1;
    }
    return REAL(rmdir)(path);
}
