/*
 * run.c - the test runner. `run` runs every test; `run st_ model_` those whose names start
 * with one of the given prefixes. Each test forks, so a crash or an abort is one failure.
 * The last line is `N passed, N failed, N skipped`; any failure gives a non-zero exit, and so
 * does a prefix that matches no test (a typo must not pass as "nothing failed"). With
 * LK_TEST_REQUIRE_RUN=1 (CI) a run in which no test passed (all skipped) fails too.
 * In sanitizer builds each test child runs LeakSanitizer's check before it exits (_exit skips
 * the check at exit): memory a test or the code under test leaked is a failure of that test.
 */
#include "test.h"

#include <errno.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "../libcore/lk.h"

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/lsan_interface.h>
#define RUN_LEAK_CHECK 1
#else
#define RUN_LEAK_CHECK 0
#endif

#define X(name) void test_##name(void);
#include "registry.h"
#undef X

struct test_case {
    const char *name;
    void (*fn)(void);
};

static const struct test_case tests[] = {
#define X(name) { #name, test_##name },
#include "registry.h"
#undef X
};

static int g_failed, g_skipped;
static char g_tmp[512];
static struct lk_err g_err;
static char *g_out;

void test_fail(const char *file, int line, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    fprintf(stderr, "    %s:%d: ", file, line);
    vfprintf(stderr, fmt, ap);
    fprintf(stderr, "\n");
    va_end(ap);
    g_failed = 1;
}

void test_skip(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    fprintf(stderr, "    skipped: ");
    vfprintf(stderr, fmt, ap);
    fprintf(stderr, "\n");
    va_end(ap);
    g_skipped = 1;
}

int test_failed(void)
{
    return g_failed;
}

struct lk_err *test_err(void)
{
    return &g_err;
}

const char *test_errmsg(void)
{
    return g_err.msg;
}

const char *test_tmpdir(void)
{
    return g_tmp;
}

const char *test_path(const char *name)
{
    static char buf[8][1024];
    static int k;
    char *b = buf[k++ & 7];
    snprintf(b, sizeof buf[0], "%s/%s", g_tmp, name);
    return b;
}

const char *test_lorakit(void)
{
    const char *p = getenv("LORAKIT");
    return p && *p ? p : "bin/lorakit";
}

int test_sh(const char *fmt, ...)
{
    char cmd[8192], full[8400];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(cmd, sizeof cmd, fmt, ap);
    va_end(ap);
    const char *out = test_path("out.txt");
    snprintf(full, sizeof full, "( %s ) >'%s' 2>&1", cmd, out);
    int st = system(full);
    lk_free(g_out);
    g_out = NULL;
    lk_read_file(out, &g_out, NULL, NULL);
    if (st == -1)
        return -1;
    if (WIFSIGNALED(st))
        return 128 + WTERMSIG(st);
    return WEXITSTATUS(st);
}

const char *test_output(void)
{
    return g_out ? g_out : "";
}

const char *test_shared(const char *rel)
{
    static char buf[4][1024];
    static int k;
    const char *root = getenv("LK_SHARED");
    if (!root || !*root)
        root = "../shared";
    char *b = buf[k++ & 3];
    snprintf(b, sizeof buf[0], "%s/%s", root, rel);
    return lk_file_exists(b) ? b : NULL;
}

void test_sleep_ms(long ms)
{
    struct timespec ts = { ms / 1000, (ms % 1000) * 1000000L };
    while (nanosleep(&ts, &ts) != 0 && errno == EINTR)
        ;
}

int test_full(void)
{
    const char *f = getenv("LK_TEST_FULL");
    return f && *f && strcmp(f, "0");
}

static int matches(const char *name, int argc, char **argv)
{
    if (argc < 2)
        return 1;
    for (int i = 1; i < argc; i++)
        if (!strncmp(name, argv[i], strlen(argv[i])))
            return 1;
    return 0;
}

/* 1 when some test's name starts with prefix. */
static int prefix_used(const char *prefix, size_t n)
{
    for (size_t i = 0; i < n; i++)
        if (!strncmp(tests[i].name, prefix, strlen(prefix)))
            return 1;
    return 0;
}

/* LeakSanitizer's check, in the child before _exit (which would skip the check at exit). The
 * test's temporary buffers still reachable from statics (test_output) are not leaks. 1 when
 * something leaked (the report is on stderr). ASAN_OPTIONS=detect_leaks=0 turns it off. */
static int leak_check(void)
{
#if RUN_LEAK_CHECK
    lk_free(g_out);
    g_out = NULL;
    if (__lsan_do_recoverable_leak_check()) {
        fprintf(stderr, "    leaked memory (LeakSanitizer's report above)\n");
        return 1;
    }
#endif
    return 0;
}

long test_alloc_sweep(const char *file, int line, const char *what, int (*op)(void *ctx, struct lk_err *err),
                      int (*done)(void *ctx, int rc), void *ctx, long max)
{
    struct lk_err err = { 0 };
    lk_fail_countdown = 0;
    int rc = op(ctx, &err);
    if (done && done(ctx, rc))
        return -1;
    if (rc != LK_OK) {
        test_fail(file, line, "%s: fails without injected faults: status %d: %s", what, rc, err.msg);
        return -1;
    }
    long failed_runs = 0;
    for (long n = 1; n <= max; n++) {
        memset(&err, 0, sizeof err);
        long live = lk_alloc_live();
        lk_fail_countdown = n;
        rc = op(ctx, &err);
        int reached = lk_fail_countdown == 0; // the nth allocation happened, and failed
        lk_fail_countdown = 0;
        if (rc != LK_OK && rc != LK_ERR_NOMEM) {
            test_fail(file, line, "%s: allocation %ld failed: status %d (%s), not LK_ERR_NOMEM: %s", what, n,
                      rc, lk_status_str((enum lk_status)rc), err.msg);
            return -1;
        }
        if (rc == LK_ERR_NOMEM && !err.msg[0]) {
            test_fail(file, line, "%s: allocation %ld failed: LK_ERR_NOMEM without a message", what, n);
            return -1;
        }
        if (rc != LK_OK && !reached) {
            test_fail(file, line, "%s: run %ld returned %d but no allocation failed: %s", what, n, rc, err.msg);
            return -1;
        }
        if (done && done(ctx, rc))
            return -1; // a wrong result, or something partial left: done said which
        if (lk_alloc_live() != live) {
            test_fail(file, line, "%s: allocation %ld failed (status %d): %ld lk_malloc blocks left behind", what,
                      n, rc, lk_alloc_live() - live);
            return -1;
        }
        if (!reached)
            return failed_runs; // every allocation of the operation has been made to fail once
        failed_runs++;
    }
    test_fail(file, line, "%s: still allocating after %ld runs", what, max);
    return -1;
}

/* 0 passed, 1 failed, 3 skipped */
static int run_one(const struct test_case *t)
{
    const char *base = getenv("TMPDIR");
    snprintf(g_tmp, sizeof g_tmp, "%s/lktest.%s.XXXXXX", base && *base ? base : "/tmp", t->name);
    if (!mkdtemp(g_tmp)) {
        fprintf(stderr, "    cannot create a temporary folder\n");
        return 1;
    }
    fflush(stdout);
    fflush(stderr);
    pid_t pid = fork();
    if (pid == 0) {
        g_failed = g_skipped = 0;
        t->fn();
        if (leak_check())
            g_failed = 1;
        fflush(stdout);
        fflush(stderr);
        _exit(g_failed ? 1 : g_skipped ? 3 : 0);
    }
    int st = 0;
    waitpid(pid, &st, 0);
    if (!getenv("LK_KEEP_TMP"))
        lk_rm_rf(g_tmp);
    if (WIFSIGNALED(st)) {
        fprintf(stderr, "    crashed with signal %d\n", WTERMSIG(st));
        return 1;
    }
    return WEXITSTATUS(st);
}

int main(int argc, char **argv)
{
    int passed = 0, failed = 0, skipped = 0;
    size_t n = sizeof tests / sizeof tests[0];
    setvbuf(stdout, NULL, _IOLBF, 0);
    int unknown = 0;
    for (int i = 1; i < argc; i++)
        if (!prefix_used(argv[i], n)) {
            fprintf(stderr, "run: no test name starts with '%s'\n", argv[i]);
            unknown = 1;
        }
    if (unknown)
        return 2;
    for (size_t i = 0; i < n; i++) {
        if (!matches(tests[i].name, argc, argv))
            continue;
        double t0 = lk_now();
        int r = run_one(&tests[i]);
        double dt = lk_now() - t0;
        const char *word = r == 0 ? "ok" : r == 3 ? "skip" : "FAIL";
        printf("%-5s %-52s %7.2fs\n", word, tests[i].name, dt);
        if (r == 0)
            passed++;
        else if (r == 3)
            skipped++;
        else
            failed++;
    }
    printf("%d passed, %d failed, %d skipped\n", passed, failed, skipped);
    const char *req = getenv("LK_TEST_REQUIRE_RUN");
    if (!failed && !passed && req && *req && strcmp(req, "0")) {
        fprintf(stderr, "run: no test passed (LK_TEST_REQUIRE_RUN is set: a step that runs nothing fails)\n");
        return 1;
    }
    return failed ? 1 : 0;
}
