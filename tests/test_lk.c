/* test_lk.c - the basics: messages, overflow checks, atomic files, the RNG, the CLI. */
#include "test.h"

#include <stdint.h>
#include <string.h>
#include <unistd.h>

#include "../libcore/lk.h"

TEST(lk_mul_size_detects_overflow)
{
    size_t out;
    CHECK_INT(lk_mul_size(3, 5, &out), 0);
    CHECK_INT(out, 15);
    CHECK_INT(lk_mul_size(SIZE_MAX / 2 + 1, 2, &out), -1);
    CHECK_INT(lk_mul3_size((size_t)1 << 32, (size_t)1 << 31, 4, &out), -1);
}

TEST(lk_afile_commit_and_abort)
{
    struct lk_err err = { 0 };
    const char *p = test_path("a.txt");
    struct lk_afile af;
    CHECK_OK(lk_afile_open(&af, p, &err));
    lk_afile_printf(&af, "hello %d", 42);
    CHECK(!lk_file_exists(p)); // nothing under the final name before commit
    CHECK_OK(lk_afile_commit(&af));
    char *buf;
    size_t n;
    CHECK_OK(lk_read_file(p, &buf, &n, &err));
    CHECK(n == 8 && !memcmp(buf, "hello 42", 8));
    lk_free(buf);
    CHECK_OK(lk_afile_open(&af, test_path("b.txt"), &err));
    lk_afile_write(&af, "x", 1);
    lk_afile_abort(&af);
    CHECK(!lk_file_exists(test_path("b.txt")));
    CHECK_INT(test_sh("ls -A '%s' | wc -l | grep -qx 2", test_tmpdir()), 0); // a.txt and out.txt only
}

TEST(lk_read_file_names_missing_file)
{
    struct lk_err err = { 0 };
    char *buf;
    CHECK(lk_read_file(test_path("nope"), &buf, NULL, &err) == LK_ERR_MISSING);
    CHECK(strstr(err.msg, "nope") != NULL);
}

TEST(lk_rng_is_seeded_and_normal)
{
    struct lk_rng a, b;
    lk_rng_seed(&a, 7);
    lk_rng_seed(&b, 7);
    for (int i = 0; i < 100; i++)
        CHECK(lk_rng_u64(&a) == lk_rng_u64(&b));
    double s = 0, s2 = 0;
    int n = 200000;
    for (int i = 0; i < n; i++) {
        double x = lk_rng_normal(&a);
        s += x;
        s2 += x * x;
    }
    CHECK_NEAR(s / n, 0.0, 0.01);
    CHECK_NEAR(s2 / n, 1.0, 0.02);
}

TEST(lk_fail_countdown_fails_nth_allocation)
{
    lk_fail_countdown = 2;
    void *a = lk_malloc(8);
    void *b = lk_malloc(8);
    void *c = lk_malloc(8);
    CHECK(a != NULL && b == NULL && c != NULL);
    lk_free(a);
    lk_free(c);
}

TEST(lk_large_blocks_start_on_cache_lines)
{
    // the AMX tiles load 64-byte rows of these blocks: at malloc's usual 16-byte offset every row
    // would span two cache lines
    long live = lk_alloc_live();
    for (size_t n = 1024; n <= ((size_t)8 << 20); n = n * 3 + 16) {
        unsigned char *p = lk_malloc(n);
        CHECK(p != NULL);
        CHECK_MSG((uintptr_t)p % LK_ALIGN == 0, "lk_malloc(%zu) at offset %zu", n, (size_t)((uintptr_t)p % LK_ALIGN));
        p[0] = p[n - 1] = 1;
        lk_free(p);
        void *raw = NULL;
        unsigned char *z = lk_calloc_aligned(n, &raw);
        CHECK(z != NULL && raw != NULL);
        CHECK((uintptr_t)z % LK_ALIGN == 0 && z >= (unsigned char *)raw && z < (unsigned char *)raw + LK_ALIGN);
        size_t nz = 0;
        for (size_t i = 0; i < n; i++)
            nz += z[i] != 0;
        CHECK_INT((long)nz, 0);
        z[n - 1] = 1; // the whole n bytes are the caller's (ASan checks the bound)
        lk_free(raw);
    }
    CHECK_INT(lk_alloc_live(), live);
    lk_fail_countdown = 1; // a failed allocation leaves nothing
    void *raw = &live;
    CHECK(lk_calloc_aligned(4096, &raw) == NULL && raw == NULL);
}

TEST(cli_help_and_unknown_command)
{
    CHECK_INT(test_sh("%s --help", test_lorakit()), 0);
    CHECK(strstr(test_output(), "commands:") != NULL);
    CHECK_INT(test_sh("%s frobnicate", test_lorakit()), 2);
    CHECK(strstr(test_output(), "not a lorakit command") != NULL);
}

TEST(lk_outdir_one_rule_for_every_folder)
{
    struct lk_err err = { 0 };
    struct lk_outdir od;
    const char *out = test_path("out");
    // a new folder: nothing under the final name until commit
    CHECK_OK(lk_outdir_begin(&od, out, 0, &err));
    CHECK(lk_is_dir(od.tmp));
    CHECK(!lk_file_exists(out));
    char *f = lk_path_join(od.tmp, "x.txt");
    CHECK_OK(lk_write_file_atomic(f, "1", 1, &err));
    lk_free(f);
    CHECK_OK(lk_outdir_commit(&od, &err));
    CHECK(od.tmp == NULL && od.path == NULL);
    CHECK(lk_file_exists(test_path("out/x.txt")));
    // a non-empty folder is refused without overwrite, and left as it was
    CHECK_INT(lk_outdir_begin(&od, out, 0, &err), LK_ERR_EXISTS);
    CHECK(strstr(err.msg, "--overwrite") && strstr(err.msg, out));
    CHECK(od.tmp == NULL);
    lk_outdir_abort(&od); // harmless on the zeroed struct
    // with overwrite the old content is replaced whole
    CHECK_OK(lk_outdir_begin(&od, out, 1, &err));
    f = lk_path_join(od.tmp, "y.txt");
    CHECK_OK(lk_write_file_atomic(f, "2", 1, &err));
    lk_free(f);
    CHECK(lk_file_exists(test_path("out/x.txt"))); // still the old one until commit
    CHECK_OK(lk_outdir_commit(&od, &err));
    CHECK(!lk_file_exists(test_path("out/x.txt")) && lk_file_exists(test_path("out/y.txt")));
    // an empty folder is replaced without overwrite
    CHECK_INT(test_sh("mkdir '%s'", test_path("empty")), 0);
    CHECK_OK(lk_outdir_begin(&od, test_path("empty"), 0, &err));
    CHECK_OK(lk_outdir_commit(&od, &err));
    CHECK(lk_is_dir(test_path("empty")));
    // a file is never replaced by a folder, overwrite or not
    CHECK_OK(lk_write_file_atomic(test_path("file"), "z", 1, &err));
    CHECK_INT(lk_outdir_begin(&od, test_path("file"), 1, &err), LK_ERR_EXISTS);
    CHECK(strstr(err.msg, "not a folder"));
    // abort removes the temporary folder and leaves the old output alone
    CHECK_OK(lk_outdir_begin(&od, out, 1, &err));
    char *tmp = lk_strdup(od.tmp);
    lk_outdir_abort(&od);
    lk_outdir_abort(&od);
    CHECK(!lk_file_exists(tmp));
    lk_free(tmp);
    CHECK(lk_file_exists(test_path("out/y.txt")));
    // "out/" is the folder out: the temporary folder goes beside it, not inside
    char slash[1024], want[1024];
    snprintf(slash, sizeof slash, "%s/", test_path("sub"));
    snprintf(want, sizeof want, "%s.tmp.", test_path("sub"));
    CHECK_OK(lk_outdir_begin(&od, slash, 0, &err));
    CHECK(!strcmp(od.path, test_path("sub")) && !strncmp(od.tmp, want, strlen(want)));
    lk_outdir_abort(&od);
    // nothing else is left beside the outputs
    CHECK_INT(test_sh("ls -A '%s' | grep -c 'tmp\\|old' | grep -qx 0", test_tmpdir()), 0);
}
