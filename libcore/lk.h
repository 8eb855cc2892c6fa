/*
 * lk.h - project-wide basics: status codes and error messages, checked allocation
 * (with a fault-injection countdown for tests), overflow-checked sizes, atomic file
 * output (temp name in the destination folder, fsync, rename), small file helpers,
 * a seeded RNG and the interrupt flag. Everything else in libcore includes this.
 */
#ifndef LK_H
#define LK_H

#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

/* The project's version: `lorakit version` prints it, GGUF files record it. */
#define LK_VERSION "0.1"

enum lk_status {
    LK_OK = 0,
    LK_ERR_IO,
    LK_ERR_FORMAT,
    LK_ERR_SHAPE,
    LK_ERR_MISSING,
    LK_ERR_NOMEM,
    LK_ERR_USAGE,
    LK_ERR_INTERRUPTED,
    LK_ERR_UNSUPPORTED,
    LK_ERR_NUMERIC,
    LK_ERR_EXISTS,
};

/* Caller-owned message buffer (curl's CURLOPT_ERRORBUFFER). */
struct lk_err {
    enum lk_status code;
    char msg[512];
};

/* Formats msg, stores code, returns code: a failure is one line, `return lk_errf(...)`. */
int lk_errf(struct lk_err *err, enum lk_status code, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
/* Prepends "prefix: " to an existing message (e.g. the file name), keeps the code. */
int lk_err_prefix(struct lk_err *err, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
const char *lk_status_str(enum lk_status code);

void lk_assert_fail(const char *file, int line, const char *cond) __attribute__((noreturn));
#define LK_ASSERT(c) ((c) ? (void)0 : lk_assert_fail(__FILE__, __LINE__, #c))

// ---- memory ----
/* NULL on failure (sizes come from user files: never abort on OOM). lk_malloc(0) returns a
 * valid unique pointer; a block of 1 KB or more from lk_malloc (and lk_falloc) starts on an
 * LK_ALIGN-byte boundary. Tests set lk_fail_countdown = N to make the Nth allocation fail. */
#define LK_ALIGN 64
void *lk_malloc(size_t n);
void *lk_calloc(size_t count, size_t size);
void *lk_realloc(void *p, size_t n);
void lk_free(void *p);
char *lk_strdup(const char *s);
/* n zeroed bytes from an LK_ALIGN boundary inside a block of lk_calloc's, *raw (lk_free(*raw)
 * releases it); like lk_calloc's, the pages of a large block stay untouched until written. */
void *lk_calloc_aligned(size_t n, void **raw);
extern long lk_fail_countdown; /* <= 0: off */
/* Blocks that lk_malloc, lk_calloc and lk_realloc(NULL, n) handed out and lk_free has not taken
 * back (counted atomically): allocation-failure tests check that an operation that failed left
 * it where it was. Memory from other allocators (cJSON, libc) is not counted. */
long lk_alloc_live(void);
/* Allocation-size probe for tests and benchmarks (not thread-safe; single-threaded callers):
 * when lk_alloc_limit > 0, any single request above it fails (NULL) and lk_alloc_largest
 * records the largest request seen (set the limit to SIZE_MAX to record only). */
extern size_t lk_alloc_limit;
extern size_t lk_alloc_largest;

/* lk_malloc of a*b floats with the product checked; NULL on overflow or failure. */
float *lk_falloc(size_t a, size_t b);

/* a*b (and a*b*c) with overflow detection: return 0 and set *out, or -1 on overflow */
int lk_mul_size(size_t a, size_t b, size_t *out);
int lk_mul3_size(size_t a, size_t b, size_t c, size_t *out);

// ---- growable strings ----
/* A NUL-terminated string that grows as it is written. Errors are sticky: after a failed
 * allocation (oom set) writes are no-ops, so a builder checks once at the end. p is owned:
 * lk_buf_release frees it (harmless twice); a zeroed struct is an empty buffer. */
struct lk_buf {
    char *p;
    size_t n, cap;
    int oom;
};
void lk_buf_put(struct lk_buf *b, const char *s, size_t n);
void lk_buf_puts(struct lk_buf *b, const char *s);
void lk_buf_printf(struct lk_buf *b, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
/* A JSON string literal as Python's json.dumps writes it (\" \\ \n \t \r, other control
 * characters as \u00XX, UTF-8 kept). */
void lk_buf_json_str(struct lk_buf *b, const char *s);
void lk_buf_release(struct lk_buf *b);

// ---- files ----
/* Whole file into a NUL-terminated heap buffer (caller frees with lk_free). */
int lk_read_file(const char *path, char **out_buf, size_t *out_len, struct lk_err *err);
int lk_file_exists(const char *path);
int lk_is_dir(const char *path);
/* 1 when path is a folder holding anything. */
int lk_dir_nonempty(const char *path);
int lk_mkdir_p(const char *path, struct lk_err *err);
/* Remove a folder and everything in it (for temp output folders). 0 on success. */
int lk_rm_rf(const char *path);
/* Joins a and b with one '/', into a fresh heap string (caller frees). NULL on OOM. */
char *lk_path_join(const char *a, const char *b);

/* An output file written atomically: data goes to "<path>.tmp.<pid>" in the same folder;
 * commit checks every flush and fsync and renames; abort (or a failed commit) removes the
 * temp file. Errors are sticky: after the first failure writes are no-ops. */
struct lk_afile {
    FILE *f;        /* owned */
    char *path;     /* owned: final path */
    char *tmp;      /* owned: temporary path */
    int failed;
    struct lk_err *err; /* borrowed */
};
int lk_afile_open(struct lk_afile *af, const char *path, struct lk_err *err);
int lk_afile_write(struct lk_afile *af, const void *buf, size_t n);
int lk_afile_printf(struct lk_afile *af, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
int lk_afile_commit(struct lk_afile *af);
void lk_afile_abort(struct lk_afile *af);
/* An output folder, built under a temporary name beside its final path and renamed into
 * place when complete (git's lockfile, for folders). Every command that writes a folder uses
 * it, so there is one rule: a path that exists and is not a folder is refused; a non-empty
 * folder is refused unless overwrite; an empty folder is replaced. On commit an old folder
 * is moved aside, the new one renamed in, the old one removed (a failed rename puts the old
 * one back). Files are written into `tmp`. */
struct lk_outdir {
    char *path; /* owned: the final folder */
    char *tmp;  /* owned: "<path>.tmp.<pid>", created by begin; write the outputs here */
};
/* The rule alone, to refuse early, before any work: LK_ERR_EXISTS with the hint. */
int lk_outdir_check(const char *path, int overwrite, struct lk_err *err);
/* Checks the rule and creates an empty tmp folder (removing a stale one of this pid). On
 * failure the struct is zeroed (abort is still harmless). */
int lk_outdir_begin(struct lk_outdir *od, const char *path, int overwrite, struct lk_err *err);
/* Renames tmp into place and frees the struct's strings. On failure tmp is removed too. */
int lk_outdir_commit(struct lk_outdir *od, struct lk_err *err);
/* Removes tmp and frees; harmless after commit, on a zeroed struct and twice. */
void lk_outdir_abort(struct lk_outdir *od);
/* Writes a whole buffer atomically to path. */
int lk_write_file_atomic(const char *path, const void *buf, size_t n, struct lk_err *err);
/* Copies a file atomically (temp name next to dst, fsync, rename). */
int lk_copy_file(const char *src, const char *dst, struct lk_err *err);
/* fsync a directory (after renames into it). Errors ignored where unsupported. */
void lk_fsync_dir(const char *dir);

// ---- rng: xorshift64* seeded state, never rand() or the clock ----
struct lk_rng {
    uint64_t s;
};
void lk_rng_seed(struct lk_rng *r, uint64_t seed);
uint64_t lk_rng_u64(struct lk_rng *r);
float lk_rng_uniform(struct lk_rng *r); /* [0, 1) */
float lk_rng_normal(struct lk_rng *r);  /* N(0, 1), Box-Muller */

// ---- interrupts ----
/* Installs SIGINT/SIGTERM handlers that set lk_interrupted; long loops check it. */
void lk_interrupt_install(void);
extern volatile int lk_interrupted;

/* Seconds from a monotonic clock (for progress and tokens/s, never for results). */
double lk_now(void);

#endif
