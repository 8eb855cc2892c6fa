/*
 * lk.c - status codes, messages, allocation with fault injection, atomic output files,
 * small file helpers, the seeded RNG and the interrupt flag. See lk.h.
 */
#include "lk.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <signal.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

int lk_errf(struct lk_err *err, enum lk_status code, const char *fmt, ...)
{
    if (err) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(err->msg, sizeof err->msg, fmt, ap);
        va_end(ap);
        err->code = code;
    }
    return code;
}

int lk_err_prefix(struct lk_err *err, const char *fmt, ...)
{
    if (!err)
        return LK_ERR_IO;
    char pre[256], old[sizeof err->msg];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(pre, sizeof pre, fmt, ap);
    va_end(ap);
    memcpy(old, err->msg, sizeof old);
    size_t np = strlen(pre);
    if (np > sizeof err->msg - 3)
        np = sizeof err->msg - 3;
    memcpy(err->msg, pre, np);
    memcpy(err->msg + np, ": ", 2);
    size_t rest = sizeof err->msg - np - 3, no = strlen(old);
    if (no > rest)
        no = rest;
    memcpy(err->msg + np + 2, old, no);
    err->msg[np + 2 + no] = 0;
    return err->code;
}

const char *lk_status_str(enum lk_status code)
{
    switch (code) {
    case LK_OK: return "ok";
    case LK_ERR_IO: return "i/o error";
    case LK_ERR_FORMAT: return "bad format";
    case LK_ERR_SHAPE: return "shape mismatch";
    case LK_ERR_MISSING: return "missing";
    case LK_ERR_NOMEM: return "out of memory";
    case LK_ERR_USAGE: return "usage";
    case LK_ERR_INTERRUPTED: return "interrupted";
    case LK_ERR_UNSUPPORTED: return "unsupported";
    case LK_ERR_NUMERIC: return "numeric error";
    case LK_ERR_EXISTS: return "exists";
    }
    return "unknown";
}

void lk_assert_fail(const char *file, int line, const char *cond)
{
    fprintf(stderr, "%s:%d: assertion failed: %s\n", file, line, cond);
    abort();
}

// ---- memory ----

long lk_fail_countdown = 0;
static atomic_long lk_live; // blocks handed out and not freed (threads allocate too)

long lk_alloc_live(void)
{
    return atomic_load_explicit(&lk_live, memory_order_relaxed);
}

/* Counts p as a new block when it is one; returns p. */
static void *lk_count(void *p)
{
    if (p)
        atomic_fetch_add_explicit(&lk_live, 1, memory_order_relaxed);
    return p;
}

size_t lk_alloc_limit = 0;
size_t lk_alloc_largest = 0;

static int lk_fault_now(void)
{
    if (lk_fail_countdown <= 0)
        return 0;
    return --lk_fail_countdown == 0;
}

/* The size probe: 1 when a request of n bytes must fail. */
static int lk_probe_refuses(size_t n)
{
    if (!lk_alloc_limit)
        return 0;
    if (n > lk_alloc_largest)
        lk_alloc_largest = n;
    return n > lk_alloc_limit;
}

/* Blocks of LK_ALIGN_FROM bytes and more start on a cache line: the AMX tile loads read 64-byte
 * rows of weights, packed activations and outputs, and a row straddling two lines costs two (the
 * tile kernel of the 0.5B shape's 896 -> 4864 product ran 1.8x faster with all three aligned than
 * at malloc's 16-byte offset, measured here). Smaller blocks keep malloc's 16 bytes. */
#define LK_ALIGN_FROM 1024

void *lk_malloc(size_t n)
{
    if (lk_fault_now() || lk_probe_refuses(n))
        return NULL;
    if (n < LK_ALIGN_FROM)
        return lk_count(malloc(n ? n : 1));
    void *p;
    return lk_count(posix_memalign(&p, LK_ALIGN, n) ? NULL : p);
}

void *lk_calloc(size_t count, size_t size)
{
    if (lk_fault_now() || (lk_alloc_limit && count && size > SIZE_MAX / count) ||
        lk_probe_refuses(count * size))
        return NULL;
    if (!count || !size)
        return lk_count(calloc(1, 1));
    return lk_count(calloc(count, size));
}

void *lk_calloc_aligned(size_t n, void **raw)
{
    *raw = n <= SIZE_MAX - LK_ALIGN ? lk_calloc(1, n + LK_ALIGN) : NULL;
    if (!*raw)
        return NULL;
    return (char *)*raw + (LK_ALIGN - (uintptr_t)*raw % LK_ALIGN) % LK_ALIGN;
}

void *lk_realloc(void *p, size_t n)
{
    if (lk_fault_now() || lk_probe_refuses(n))
        return NULL;
    void *q = realloc(p, n ? n : 1);
    return p ? q : lk_count(q);
}

void lk_free(void *p)
{
    if (p)
        atomic_fetch_sub_explicit(&lk_live, 1, memory_order_relaxed);
    free(p);
}

char *lk_strdup(const char *s)
{
    size_t n = strlen(s) + 1;
    char *d = lk_malloc(n);
    if (d)
        memcpy(d, s, n);
    return d;
}

float *lk_falloc(size_t a, size_t b)
{
    size_t n;
    if (lk_mul3_size(a, b, sizeof(float), &n) != 0)
        return NULL;
    return lk_malloc(n);
}

int lk_mul_size(size_t a, size_t b, size_t *out)
{
    if (a && b > SIZE_MAX / a)
        return -1;
    *out = a * b;
    return 0;
}

int lk_mul3_size(size_t a, size_t b, size_t c, size_t *out)
{
    size_t ab;
    if (lk_mul_size(a, b, &ab))
        return -1;
    return lk_mul_size(ab, c, out);
}

// ---- growable strings ----

void lk_buf_put(struct lk_buf *b, const char *s, size_t n)
{
    if (b->oom)
        return;
    if (b->n + n + 1 > b->cap) {
        size_t cap = b->cap ? b->cap : 256;
        while (cap < b->n + n + 1)
            cap *= 2;
        char *p = lk_realloc(b->p, cap);
        if (!p) {
            b->oom = 1;
            return;
        }
        b->p = p;
        b->cap = cap;
    }
    memcpy(b->p + b->n, s, n);
    b->n += n;
    b->p[b->n] = 0;
}

void lk_buf_puts(struct lk_buf *b, const char *s)
{
    lk_buf_put(b, s, strlen(s));
}

void lk_buf_printf(struct lk_buf *b, const char *fmt, ...)
{
    char tmp[256];
    va_list ap;
    va_start(ap, fmt);
    int k = vsnprintf(tmp, sizeof tmp, fmt, ap);
    va_end(ap);
    if (k < 0) {
        b->oom = 1;
        return;
    }
    if ((size_t)k < sizeof tmp) {
        lk_buf_put(b, tmp, (size_t)k);
        return;
    }
    char *big = lk_malloc((size_t)k + 1);
    if (!big) {
        b->oom = 1;
        return;
    }
    va_start(ap, fmt);
    vsnprintf(big, (size_t)k + 1, fmt, ap);
    va_end(ap);
    lk_buf_put(b, big, (size_t)k);
    lk_free(big);
}

void lk_buf_json_str(struct lk_buf *b, const char *s)
{
    lk_buf_put(b, "\"", 1);
    for (const unsigned char *p = (const unsigned char *)s; *p; p++) {
        char e[8];
        switch (*p) {
        case '"': lk_buf_put(b, "\\\"", 2); break;
        case '\\': lk_buf_put(b, "\\\\", 2); break;
        case '\n': lk_buf_put(b, "\\n", 2); break;
        case '\t': lk_buf_put(b, "\\t", 2); break;
        case '\r': lk_buf_put(b, "\\r", 2); break;
        default:
            if (*p < 0x20) {
                snprintf(e, sizeof e, "\\u%04x", *p);
                lk_buf_put(b, e, 6);
            } else {
                lk_buf_put(b, (const char *)p, 1);
            }
        }
    }
    lk_buf_put(b, "\"", 1);
}

void lk_buf_release(struct lk_buf *b)
{
    if (!b)
        return;
    lk_free(b->p);
    memset(b, 0, sizeof *b);
}

// ---- files ----

int lk_read_file(const char *path, char **out_buf, size_t *out_len, struct lk_err *err)
{
    *out_buf = NULL;
    if (out_len)
        *out_len = 0;
    FILE *f = fopen(path, "rb");
    if (!f)
        return lk_errf(err, errno == ENOENT ? LK_ERR_MISSING : LK_ERR_IO, "%s: cannot open: %s",
                       path, strerror(errno));
    struct stat st;
    if (fstat(fileno(f), &st) != 0 || !S_ISREG(st.st_mode)) {
        fclose(f);
        return lk_errf(err, LK_ERR_IO, "%s: not a regular file", path);
    }
    size_t n = (size_t)st.st_size;
    char *buf = lk_malloc(n + 1);
    if (!buf) {
        fclose(f);
        return lk_errf(err, LK_ERR_NOMEM, "%s: out of memory reading %zu bytes", path, n);
    }
    size_t got = fread(buf, 1, n, f);
    int bad = ferror(f);
    fclose(f);
    if (bad || got != n) {
        lk_free(buf);
        return lk_errf(err, LK_ERR_IO, "%s: read error", path);
    }
    buf[n] = 0;
    *out_buf = buf;
    if (out_len)
        *out_len = n;
    return LK_OK;
}

int lk_file_exists(const char *path)
{
    struct stat st;
    return stat(path, &st) == 0;
}

int lk_is_dir(const char *path)
{
    struct stat st;
    return stat(path, &st) == 0 && S_ISDIR(st.st_mode);
}

int lk_dir_nonempty(const char *path)
{
    DIR *d = opendir(path);
    if (!d)
        return 0;
    struct dirent *e;
    int n = 0;
    while (!n && (e = readdir(d)))
        n = strcmp(e->d_name, ".") && strcmp(e->d_name, "..");
    closedir(d);
    return n;
}

int lk_mkdir_p(const char *path, struct lk_err *err)
{
    char *p = lk_strdup(path);
    if (!p)
        return lk_errf(err, LK_ERR_NOMEM, "out of memory");
    for (char *s = p + 1; *s; s++) {
        if (*s != '/')
            continue;
        *s = 0;
        if (mkdir(p, 0777) != 0 && errno != EEXIST) {
            lk_errf(err, LK_ERR_IO, "%s: cannot create folder: %s", p, strerror(errno));
            lk_free(p);
            return LK_ERR_IO;
        }
        *s = '/';
    }
    if (mkdir(p, 0777) != 0 && errno != EEXIST) {
        lk_errf(err, LK_ERR_IO, "%s: cannot create folder: %s", p, strerror(errno));
        lk_free(p);
        return LK_ERR_IO;
    }
    lk_free(p);
    if (!lk_is_dir(path))
        return lk_errf(err, LK_ERR_IO, "%s: exists and is not a folder", path);
    return LK_OK;
}

/* name under the folder dfd, and everything in it. Paths are never built (no allocation of
 * ours: cleanup after an out-of-memory failure must not itself run out). */
static int rm_at(int dfd, const char *name)
{
    struct stat st;
    if (fstatat(dfd, name, &st, AT_SYMLINK_NOFOLLOW) != 0)
        return errno == ENOENT ? 0 : -1;
    if (!S_ISDIR(st.st_mode))
        return unlinkat(dfd, name, 0);
    int fd = openat(dfd, name, O_RDONLY | O_DIRECTORY | O_NOFOLLOW);
    if (fd < 0)
        return -1;
    DIR *d = fdopendir(fd);
    if (!d) {
        close(fd);
        return -1;
    }
    struct dirent *e;
    int rc = 0;
    while ((e = readdir(d))) {
        if (!strcmp(e->d_name, ".") || !strcmp(e->d_name, ".."))
            continue;
        if (rm_at(fd, e->d_name) != 0)
            rc = -1;
    }
    closedir(d); // closes fd
    if (unlinkat(dfd, name, AT_REMOVEDIR) != 0)
        rc = -1;
    return rc;
}

int lk_rm_rf(const char *path)
{
    return rm_at(AT_FDCWD, path);
}

char *lk_path_join(const char *a, const char *b)
{
    size_t na = strlen(a), nb = strlen(b);
    while (na > 1 && a[na - 1] == '/')
        na--;
    char *s = lk_malloc(na + nb + 2);
    if (!s)
        return NULL;
    memcpy(s, a, na);
    s[na] = '/';
    memcpy(s + na + 1, b, nb + 1);
    return s;
}

int lk_afile_open(struct lk_afile *af, const char *path, struct lk_err *err)
{
    memset(af, 0, sizeof *af);
    af->err = err;
    af->path = lk_strdup(path);
    size_t n = strlen(path) + 32;
    af->tmp = lk_malloc(n);
    if (!af->path || !af->tmp) {
        lk_free(af->path);
        lk_free(af->tmp);
        af->path = af->tmp = NULL;
        af->failed = 1;
        return lk_errf(err, LK_ERR_NOMEM, "out of memory");
    }
    snprintf(af->tmp, n, "%s.tmp.%ld", path, (long)getpid());
    af->f = fopen(af->tmp, "wb");
    if (!af->f) {
        lk_errf(err, LK_ERR_IO, "%s: cannot create: %s", af->tmp, strerror(errno));
        lk_free(af->path);
        lk_free(af->tmp);
        af->path = af->tmp = NULL;
        af->failed = 1;
        return LK_ERR_IO;
    }
    return LK_OK;
}

int lk_afile_write(struct lk_afile *af, const void *buf, size_t n)
{
    if (af->failed)
        return LK_ERR_IO;
    if (n && fwrite(buf, 1, n, af->f) != n) {
        af->failed = 1;
        return lk_errf(af->err, LK_ERR_IO, "%s: write failed: %s", af->path, strerror(errno));
    }
    return LK_OK;
}

int lk_afile_printf(struct lk_afile *af, const char *fmt, ...)
{
    if (af->failed)
        return LK_ERR_IO;
    va_list ap;
    va_start(ap, fmt);
    int r = vfprintf(af->f, fmt, ap);
    va_end(ap);
    if (r < 0) {
        af->failed = 1;
        return lk_errf(af->err, LK_ERR_IO, "%s: write failed: %s", af->path, strerror(errno));
    }
    return LK_OK;
}

void lk_afile_abort(struct lk_afile *af)
{
    if (af->f)
        fclose(af->f);
    if (af->tmp)
        unlink(af->tmp);
    lk_free(af->path);
    lk_free(af->tmp);
    af->f = NULL;
    af->path = af->tmp = NULL;
}

static char *lk_dirname(const char *path)
{
    const char *slash = strrchr(path, '/');
    if (!slash)
        return lk_strdup(".");
    if (slash == path)
        return lk_strdup("/");
    size_t n = (size_t)(slash - path);
    char *d = lk_malloc(n + 1);
    if (d) {
        memcpy(d, path, n);
        d[n] = 0;
    }
    return d;
}

void lk_fsync_dir(const char *dir)
{
    int fd = open(dir, O_RDONLY);
    if (fd >= 0) {
        fsync(fd);
        close(fd);
    }
}

int lk_afile_commit(struct lk_afile *af)
{
    if (af->failed || !af->f) {
        int code = af->err && af->err->code ? (int)af->err->code : LK_ERR_IO;
        lk_afile_abort(af);
        return code;
    }
    int bad = fflush(af->f) != 0;
    if (!bad && fsync(fileno(af->f)) != 0)
        bad = 1;
    int e = errno;
    if (fclose(af->f) != 0 && !bad) {
        bad = 1;
        e = errno;
    }
    af->f = NULL;
    if (bad) {
        lk_errf(af->err, LK_ERR_IO, "%s: write failed: %s", af->path, strerror(e));
        lk_afile_abort(af);
        return LK_ERR_IO;
    }
    if (rename(af->tmp, af->path) != 0) {
        lk_errf(af->err, LK_ERR_IO, "%s: cannot rename into place: %s", af->path, strerror(errno));
        lk_afile_abort(af);
        return LK_ERR_IO;
    }
    char *dir = lk_dirname(af->path);
    if (dir)
        lk_fsync_dir(dir);
    lk_free(dir);
    lk_free(af->path);
    lk_free(af->tmp);
    af->path = af->tmp = NULL;
    return LK_OK;
}

int lk_write_file_atomic(const char *path, const void *buf, size_t n, struct lk_err *err)
{
    struct lk_afile af;
    if (lk_afile_open(&af, path, err))
        return err ? (int)err->code : LK_ERR_IO;
    lk_afile_write(&af, buf, n);
    return lk_afile_commit(&af);
}

// ---- output folders ----

int lk_outdir_check(const char *path, int overwrite, struct lk_err *err)
{
    if (lk_file_exists(path) && !lk_is_dir(path))
        return lk_errf(err, LK_ERR_EXISTS, "%s: exists and is not a folder", path);
    if (!overwrite && lk_dir_nonempty(path))
        return lk_errf(err, LK_ERR_EXISTS, "%s: folder exists and is not empty (use --overwrite to replace it)",
                       path);
    return LK_OK;
}

int lk_outdir_begin(struct lk_outdir *od, const char *path, int overwrite, struct lk_err *err)
{
    memset(od, 0, sizeof *od);
    int rc = lk_outdir_check(path, overwrite, err);
    if (rc)
        return rc;
    size_t n = strlen(path) + 32;
    od->path = lk_strdup(path);
    od->tmp = lk_malloc(n);
    if (!od->path || !od->tmp) {
        lk_outdir_abort(od);
        return lk_errf(err, LK_ERR_NOMEM, "out of memory");
    }
    // "out/" names the folder out: without this the temporary folder would go inside it
    for (size_t k = strlen(od->path); k > 1 && od->path[k - 1] == '/'; k--)
        od->path[k - 1] = 0;
    snprintf(od->tmp, n, "%s.tmp.%ld", od->path, (long)getpid());
    lk_rm_rf(od->tmp); // a stale one of a process with our pid
    if ((rc = lk_mkdir_p(od->tmp, err))) {
        lk_outdir_abort(od);
        return rc;
    }
    return LK_OK;
}

int lk_outdir_commit(struct lk_outdir *od, struct lk_err *err)
{
    if (!od->path || !od->tmp)
        return lk_errf(err, LK_ERR_IO, "output folder was not begun");
    size_t n = strlen(od->path) + 32;
    char *old = lk_malloc(n);
    if (!old) {
        lk_outdir_abort(od);
        return lk_errf(err, LK_ERR_NOMEM, "out of memory");
    }
    snprintf(old, n, "%s.old.%ld", od->path, (long)getpid());
    int exists = lk_is_dir(od->path), nonempty = exists && lk_dir_nonempty(od->path), rc = LK_OK;
    if (nonempty && rename(od->path, old) != 0)
        rc = lk_errf(err, LK_ERR_IO, "%s: cannot move the old folder aside: %s", od->path, strerror(errno));
    else if (exists && !nonempty && rmdir(od->path) != 0)
        rc = lk_errf(err, LK_ERR_IO, "%s: cannot replace the empty folder: %s", od->path, strerror(errno));
    else if (rename(od->tmp, od->path) != 0) {
        rc = lk_errf(err, LK_ERR_IO, "%s: cannot rename into place: %s", od->path, strerror(errno));
        if (nonempty)
            rename(old, od->path);
    } else {
        if (nonempty)
            lk_rm_rf(old);
        char *dir = lk_dirname(od->path);
        if (dir)
            lk_fsync_dir(dir);
        lk_free(dir);
        lk_free(od->tmp); // renamed: nothing left to remove
        od->tmp = NULL;
    }
    lk_free(old);
    lk_outdir_abort(od);
    return rc;
}

void lk_outdir_abort(struct lk_outdir *od)
{
    if (od->tmp)
        lk_rm_rf(od->tmp);
    lk_free(od->tmp);
    lk_free(od->path);
    od->tmp = od->path = NULL;
}

// ---- rng ----

void lk_rng_seed(struct lk_rng *r, uint64_t seed)
{
    // splitmix64 so that small seeds give well-mixed, non-zero states
    uint64_t z = seed + 0x9E3779B97F4A7C15ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    z ^= z >> 31;
    r->s = z ? z : 0x2545F4914F6CDD1Dull;
}

uint64_t lk_rng_u64(struct lk_rng *r)
{
    uint64_t x = r->s;
    x ^= x >> 12;
    x ^= x << 25;
    x ^= x >> 27;
    r->s = x;
    return x * 0x2545F4914F6CDD1Dull;
}

float lk_rng_uniform(struct lk_rng *r)
{
    return (float)(lk_rng_u64(r) >> 40) / 16777216.0f;
}

float lk_rng_normal(struct lk_rng *r)
{
    double u1 = ((double)(lk_rng_u64(r) >> 11) + 1.0) / 9007199254740993.0; // (0, 1]
    double u2 = (double)(lk_rng_u64(r) >> 11) / 9007199254740992.0;
    return (float)(sqrt(-2.0 * log(u1)) * cos(6.283185307179586 * u2));
}

// ---- interrupts ----

volatile int lk_interrupted = 0;

static void lk_on_signal(int sig)
{
    (void)sig;
    lk_interrupted = 1;
}

void lk_interrupt_install(void)
{
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = lk_on_signal;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGINT, &sa, NULL);
    sigaction(SIGTERM, &sa, NULL);
}

double lk_now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + ts.tv_nsec * 1e-9;
}

int lk_copy_file(const char *src, const char *dst, struct lk_err *err)
{
    FILE *in = fopen(src, "rb");
    if (!in)
        return lk_errf(err, LK_ERR_IO, "%s: cannot open: %s", src, strerror(errno));
    struct lk_afile af;
    int rc = lk_afile_open(&af, dst, err);
    if (rc) {
        fclose(in);
        return rc;
    }
    char buf[65536];
    size_t n;
    while ((n = fread(buf, 1, sizeof buf, in)) > 0)
        lk_afile_write(&af, buf, n);
    if (ferror(in)) {
        fclose(in);
        lk_afile_abort(&af);
        return lk_errf(err, LK_ERR_IO, "%s: read error", src);
    }
    fclose(in);
    return lk_afile_commit(&af);
}
