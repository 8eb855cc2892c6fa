/*
 * test.h - the test harness. A test is `TEST(name) { ... }` in any tests/test_*.c; the
 * Makefile collects the names into a registry, so adding a test never edits a shared file.
 * Each test runs in its own forked process with a fresh temporary folder (crashes are
 * failures, not the end of the run). CHECK* record file:line and both values, then return.
 */
#ifndef LK_TEST_H
#define LK_TEST_H

#include <math.h>
#include <stdio.h>

struct lk_err;

#define TEST(name)                                                                                 \
    void test_##name(void);                                                                        \
    void test_##name(void)

void test_fail(const char *file, int line, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
void test_skip(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
int test_failed(void);

#define CHECK(c)                                                                                   \
    do {                                                                                           \
        if (!(c)) {                                                                                \
            test_fail(__FILE__, __LINE__, "check failed: %s", #c);                                 \
            return;                                                                                \
        }                                                                                          \
    } while (0)

#define CHECK_MSG(c, ...)                                                                          \
    do {                                                                                           \
        if (!(c)) {                                                                                \
            test_fail(__FILE__, __LINE__, __VA_ARGS__);                                            \
            return;                                                                                \
        }                                                                                          \
    } while (0)

#define CHECK_INT(a, b)                                                                            \
    do {                                                                                           \
        long long a_ = (long long)(a), b_ = (long long)(b);                                        \
        if (a_ != b_) {                                                                            \
            test_fail(__FILE__, __LINE__, "%s == %s: %lld != %lld", #a, #b, a_, b_);               \
            return;                                                                                \
        }                                                                                          \
    } while (0)

/* |a - b| <= tol * max(1, |b|) */
#define CHECK_NEAR(a, b, tol)                                                                      \
    do {                                                                                           \
        double a_ = (double)(a), b_ = (double)(b), t_ = (double)(tol);                             \
        if (!(fabs(a_ - b_) <= t_ * fmax(1.0, fabs(b_)))) {                                        \
            test_fail(__FILE__, __LINE__, "%s ~ %s: %.9g vs %.9g (tol %g)", #a, #b, a_, b_, t_);    \
            return;                                                                                \
        }                                                                                          \
    } while (0)

#define CHECK_OK(expr)                                                                             \
    do {                                                                                           \
        int rc_ = (expr);                                                                          \
        if (rc_ != 0) {                                                                            \
            test_fail(__FILE__, __LINE__, "%s returned %d: %s", #expr, rc_, test_errmsg());        \
            return;                                                                                \
        }                                                                                          \
    } while (0)

#define SKIP(...)                                                                                  \
    do {                                                                                           \
        test_skip(__VA_ARGS__);                                                                    \
        return;                                                                                    \
    } while (0)

/* A message buffer tests may point lk_err at; CHECK_OK prints it. */
struct lk_err *test_err(void);
const char *test_errmsg(void);

/* An allocation-failure sweep (sqlite's do_faultsim_test, curl's torture mode). op runs the
 * operation once without faults (it must succeed: this also lets lazily made tables settle),
 * then for n = 1, 2, 3, ... with the nth lk_malloc / lk_calloc / lk_realloc failing. Each run
 * must return LK_OK or LK_ERR_NOMEM with a message. After each run, with faults off, done (may
 * be NULL) gets op's status: it checks the result (LK_OK) or that nothing partial was left
 * (a failure), releases what op made, and returns 0, or -1 after test_fail. Then
 * lk_alloc_live() must be back where it was before the run (memory from other allocators,
 * cJSON's, is left to LeakSanitizer's check at the end of the test in sanitizer builds). The sweep goes on past runs that succeed despite a failed
 * allocation, and ends with the first run in which no allocation failed (the countdown was not
 * reached). Returns the number of runs with an injected failure, or -1 after recording a failure
 * at the caller's line; max bounds the runs. */
#define ALLOC_SWEEP(what, op, done, ctx, max) test_alloc_sweep(__FILE__, __LINE__, what, op, done, ctx, max)
long test_alloc_sweep(const char *file, int line, const char *what, int (*op)(void *ctx, struct lk_err *err),
                      int (*done)(void *ctx, int rc), void *ctx, long max);

/* A fresh folder for this test (removed afterwards unless LK_KEEP_TMP is set). */
const char *test_tmpdir(void);
/* A path inside test_tmpdir(), in a static rotating buffer (8 slots). */
const char *test_path(const char *name);
/* The lorakit binary under test ($LORAKIT, else bin/lorakit). */
const char *test_lorakit(void);
/* Runs a shell command (formatted), stdout+stderr to test_path("out.txt"); returns exit status
 * (or 128+signal). The output is kept in test_output() until the next call. */
int test_sh(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
const char *test_output(void);
/* A path under ../shared (or $LK_SHARED), or NULL when it is absent: tests then SKIP. */
const char *test_shared(const char *rel);
/* Sleeps ms milliseconds (nanosleep: usleep is not in POSIX.1-2008). */
void test_sleep_ms(long ms);
/* 1 when the full tier is on (LK_TEST_FULL=1, set by CI). */
int test_full(void);

#endif
