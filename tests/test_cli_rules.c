/*
 * test_cli_rules.c - the rules every command shares, end to end, once per command:
 *   - an output folder (lk_outdir): an empty folder is filled, a non-empty one is refused
 *     without --overwrite and left untouched, --overwrite replaces it whole, a file is never
 *     replaced, and a failure midway (a full disk, by the LD_PRELOAD fault shim) leaves the
 *     old output as it was and no *.tmp.* / *.old.* beside it;
 *   - a run record (rdb_rec): a runs database that cannot be written (a file of junk, a folder)
 *     costs no output: exit 0, the result, and a warning naming the run that was not recorded.
 * Fixtures are made here with lorakit itself (a tiny model, a one-step adapter).
 */
#include "test.h"

#include <stdlib.h>
#include <string.h>

#include "../libcore/lk.h"

/* test_path() rotates 8 buffers: paths kept across calls get their own. */
#define PATHVAR(var, name)                                                                         \
    char var[1024];                                                                                \
    snprintf(var, sizeof var, "%s/%s", test_tmpdir(), name)

static const char *medworld_bin(void)
{
    const char *p = getenv("MEDWORLD");
    return p && *p ? p : "build/opt/medworld";
}

/* A tiny model M (with a tokenizer), pre-tokenized data D and a one-step adapter AD, in tmpdir. */
static int make_fixture(int tokenizer)
{
    FILE *f = fopen(test_path("d.jsonl"), "w"), *t = fopen(test_path("text.txt"), "w");
    if (!f || !t)
        return -1;
    for (int r = 0; r < 6; r++) {
        fprintf(f, "{\"input_ids\":[%d,%d,%d,%d,%d,%d],\"labels\":[-100,-100,%d,%d,%d,%d]}\n", r + 1, r + 2, r + 3,
                r + 4, r + 5, r + 6, r + 3, r + 4, r + 5, r + 6);
        fprintf(t, "Question %d: which tablet? Answer: the blue tablet number %d.\n", r, r * 3);
    }
    fclose(f);
    fclose(t);
    const char *T = test_tmpdir(), *L = test_lorakit();
    int rc = test_sh("%s init --preset tiny --out '%s/M' --seed 1 && %s train --model '%s/M' --data '%s/d.jsonl' "
                     "--out '%s/AD' --steps 1 --batch 2 --threads 1 --quiet --runs '%s/setup.db'",
                     L, T, L, T, T, T, T);
    if (!rc && tokenizer)
        rc = test_sh("%s tokenizer train --text '%s/text.txt' --vocab 300 --out '%s/M'", L, T, T);
    return rc;
}

/* The shell prefix that loads the fault shim (NULL when it was not built); ASan must not insist
 * on coming first in the library list. */
static const char *fault_prefix(void)
{
    static char buf[1400];
    const char *shim = getenv("LK_FAULTSHIM");
    if (!shim || !*shim || !lk_file_exists(shim))
        return NULL;
    snprintf(buf, sizeof buf, "ASAN_OPTIONS=verify_asan_link_order=0:detect_leaks=0 LD_PRELOAD='%s'", shim);
    return buf;
}

/* 1 when the folder holds no *.tmp.* or *.old.* name. */
static int no_leftovers(const char *dir)
{
    return test_sh("ls -A '%s' | grep -c -e '\\.tmp\\.' -e '\\.old\\.' | grep -qx 0", dir) == 0;
}

/*
 * The output-folder rule for the command "<cmd> '<out>' [--overwrite]". probe: a file the
 * command writes into the folder. replaces: --overwrite replaces the folder whole (train
 * writes into it in place: its checkpoints live there during the run).
 */
static void outdir_rule(const char *cmd, const char *probe, int replaces)
{
    PATHVAR(w, "w");
    PATHVAR(out, "w/out");
    PATHVAR(file, "w/afile");
    char p[1200], marker[1200];
    snprintf(p, sizeof p, "%s/%s", out, probe);
    snprintf(marker, sizeof marker, "%s/marker.txt", out);
    // 1. an existing empty folder is filled, no --overwrite needed
    CHECK_OK(lk_mkdir_p(out, test_err()));
    CHECK_MSG(test_sh("%s '%s'", cmd, out) == 0, "into an empty folder: %s", test_output());
    CHECK(lk_file_exists(p));
    // 2. a non-empty folder is refused without --overwrite and left as it was
    CHECK_INT(test_sh("echo precious > '%s' && cksum '%s' > '%s/sum'", marker, p, test_tmpdir()), 0);
    CHECK_INT(test_sh("%s '%s'", cmd, out), 1);
    CHECK_MSG(strstr(test_output(), "exists and is not empty") && strstr(test_output(), "--overwrite"), "%s",
              test_output());
    CHECK_INT(test_sh("grep -qx precious '%s' && cksum '%s' | cmp -s - '%s/sum'", marker, p, test_tmpdir()), 0);
    CHECK(no_leftovers(w));
    // 3. a failure midway (a full disk under w/) leaves the old output whole and nothing beside it
    const char *fp = fault_prefix();
    if (fp) {
        int rc = test_sh("%s LK_FAULT_PATH='%s' LK_FAULT_ENOSPC_AFTER=300 %s '%s' --overwrite", fp, w, cmd, out);
        CHECK_MSG(rc == 1 && strstr(test_output(), "No space left on device"), "full disk: exit %d: %s", rc,
                  test_output());
        CHECK_INT(test_sh("grep -qx precious '%s' && cksum '%s' | cmp -s - '%s/sum'", marker, p, test_tmpdir()), 0);
        CHECK_MSG(no_leftovers(w), "a failure left temporary folders: %s",
                  test_sh("ls -A '%s'", w) == 0 ? test_output() : "?");
    }
    // 4. --overwrite replaces it
    CHECK_MSG(test_sh("%s '%s' --overwrite", cmd, out) == 0, "--overwrite: %s", test_output());
    CHECK(lk_file_exists(p));
    if (replaces)
        CHECK(!lk_file_exists(marker));
    CHECK(no_leftovers(w));
    // 5. a file is never replaced by a folder, --overwrite or not
    CHECK_INT(test_sh("echo data > '%s'", file), 0);
    CHECK_INT(test_sh("%s '%s' --overwrite", cmd, file), 1);
    CHECK_MSG(strstr(test_output(), "exists and is not a folder"), "%s", test_output());
    CHECK_INT(test_sh("grep -qx data '%s'", file), 0);
    CHECK(no_leftovers(w));
}

TEST(cli_outdir_rule_init)
{
    char cmd[1200];
    snprintf(cmd, sizeof cmd, "%s init --preset tiny --seed 1 --out", test_lorakit());
    outdir_rule(cmd, "model.safetensors", 1);
}

TEST(cli_outdir_rule_merge)
{
    CHECK_MSG(make_fixture(0) == 0, "fixture: %s", test_output());
    char cmd[2400];
    snprintf(cmd, sizeof cmd, "%s merge --model '%s/M' --adapter '%s/AD' --threads 1 --out", test_lorakit(),
             test_tmpdir(), test_tmpdir());
    outdir_rule(cmd, "model.safetensors", 1);
}

TEST(cli_outdir_rule_svd_compress)
{
    CHECK_MSG(make_fixture(0) == 0, "fixture: %s", test_output());
    char cmd[2400];
    snprintf(cmd, sizeof cmd, "%s svd-compress --adapter '%s/AD' --rank 1 --quiet --runs '%s/r.db' --out",
             test_lorakit(), test_tmpdir(), test_tmpdir());
    outdir_rule(cmd, "adapter_model.safetensors", 1);
}

TEST(cli_outdir_rule_train)
{
    CHECK_MSG(make_fixture(0) == 0, "fixture: %s", test_output());
    char cmd[2400];
    snprintf(cmd, sizeof cmd, "%s train --model '%s/M' --data '%s/d.jsonl' --steps 1 --batch 2 --threads 1 "
             "--quiet --runs '%s/r.db' --out", test_lorakit(), test_tmpdir(), test_tmpdir(), test_tmpdir());
    outdir_rule(cmd, "adapter_model.safetensors", 0);
}

TEST(cli_outdir_rule_medworld)
{
    char cmd[1200];
    snprintf(cmd, sizeof cmd, "'%s' --world new --seed 1 --entities 4 --out", medworld_bin());
    outdir_rule(cmd, "manifest.json", 1);
}

/*
 * A runs database that cannot be written, for "<cmd> --runs DB": exit 0, the output still
 * made (want: a file that must exist, or text that must be in the output), and the warning.
 */
static void runs_unwritable(const char *cmd, const char *kind, const char *want_file, const char *want_text)
{
    PATHVAR(junk, "junk.db");
    PATHVAR(dir, "dbdir");
    CHECK_OK(lk_write_file_atomic(junk, "this is not an SQLite database, only text\n", 42, test_err()));
    CHECK_OK(lk_mkdir_p(dir, test_err()));
    const char *dbs[2] = { junk, dir };
    for (int i = 0; i < 2; i++) {
        if (want_file)
            lk_rm_rf(want_file);
        int rc = test_sh("%s --runs '%s'", cmd, dbs[i]);
        CHECK_MSG(rc == 0, "%s with the runs database %s: exit %d: %s", kind, dbs[i], rc, test_output());
        char w[128];
        snprintf(w, sizeof w, "lorakit %s: warning: %s run not recorded in the runs database '", kind, kind);
        CHECK_MSG(strstr(test_output(), w) && strstr(test_output(), dbs[i]), "no warning: %s", test_output());
        CHECK_MSG(!strstr(test_output(), ": error:"), "%s", test_output());
        if (want_file)
            CHECK_MSG(lk_file_exists(want_file), "%s: no %s", kind, want_file);
        if (want_text)
            CHECK_MSG(strstr(test_output(), want_text), "%s: no '%s' in: %s", kind, want_text, test_output());
    }
    CHECK_INT(test_sh("head -c 42 '%s' | grep -q 'not an SQLite'", junk), 0); // left as it was
}

TEST(cli_runs_db_unwritable_train)
{
    CHECK_MSG(make_fixture(0) == 0, "fixture: %s", test_output());
    char cmd[2400];
    PATHVAR(probe, "o/adapter_model.safetensors");
    snprintf(cmd, sizeof cmd, "%s train --model '%s/M' --data '%s/d.jsonl' --steps 2 --batch 2 --threads 1 --out '%s/o' "
             "--overwrite", test_lorakit(), test_tmpdir(), test_tmpdir(), test_tmpdir());
    runs_unwritable(cmd, "train", probe, "done: 2 steps");
}

TEST(cli_runs_db_unwritable_svd_compress)
{
    CHECK_MSG(make_fixture(0) == 0, "fixture: %s", test_output());
    char cmd[2400];
    PATHVAR(probe, "o/adapter_model.safetensors");
    snprintf(cmd, sizeof cmd, "%s svd-compress --adapter '%s/AD' --rank 1 --out '%s/o' --overwrite", test_lorakit(),
             test_tmpdir(), test_tmpdir());
    runs_unwritable(cmd, "svd-compress", probe, "energy kept overall");
}

TEST(cli_runs_db_unwritable_merge)
{
    CHECK_MSG(make_fixture(0) == 0, "fixture: %s", test_output());
    char cmd[2400];
    PATHVAR(probe, "o/model.safetensors");
    snprintf(cmd, sizeof cmd, "%s merge --model '%s/M' --adapter '%s/AD' --out '%s/o' --overwrite --threads 1",
             test_lorakit(), test_tmpdir(), test_tmpdir(), test_tmpdir());
    runs_unwritable(cmd, "merge", probe, "wrote ");
}

TEST(cli_runs_db_unwritable_diff)
{
    CHECK_MSG(make_fixture(0) == 0, "fixture: %s", test_output());
    char cmd[2400];
    snprintf(cmd, sizeof cmd, "%s diff '%s/M' '%s/AD' --threads 1", test_lorakit(), test_tmpdir(), test_tmpdir());
    runs_unwritable(cmd, "diff", NULL, " changed, ");
}

TEST(cli_runs_db_unwritable_eval)
{
    CHECK_MSG(make_fixture(1) == 0, "fixture: %s", test_output());
    FILE *q = fopen(test_path("qa.jsonl"), "w");
    CHECK(q != NULL);
    fprintf(q, "{\"id\":\"a\",\"question\":\"Which tablet?\",\"answer\":\"the blue one\"}\n"
               "{\"id\":\"b\",\"question\":\"Which number?\",\"answer\":\"three\"}\n");
    fclose(q);
    char cmd[2400];
    snprintf(cmd, sizeof cmd, "%s eval --model '%s/M' --adapter '%s/AD' --qa '%s/qa.jsonl' --modes base,ft "
             "--max-new 2 --threads 1 --quiet", test_lorakit(), test_tmpdir(), test_tmpdir(), test_tmpdir());
    runs_unwritable(cmd, "eval", NULL, "verdict: ");
}
