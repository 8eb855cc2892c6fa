/*
 * test_hard.c - hardening (issue 11): fuzz findings as regression tests, SIGKILL at random
 * moments, a full disk and a read-only destination (LD_PRELOAD tests/faultshim.c), truncated
 * model files, hostile names (paths, SQL) and sizes read from files that would overflow.
 * Every case checks a clean error (a message naming the file) and that nothing partial or
 * misleading is left, by comparing folder listings before and after.
 */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "../eval/fts.h"
#include "../libcore/cfg.h"
#include "../libcore/data.h"
#include "../libcore/lk.h"
#include "../libcore/lora.h"
#include "../libcore/model.h"
#include "../libcore/rdb.h"
#include "../libcore/st.h"
#include "../libcore/tok.h"
#include "fuzz/fuzz_weights.h"
#include "test.h"

// ---- helpers ----

/* A path in the test's folder kept in a local buffer (test_path's buffers rotate). */
#define TP(var, name)                                                                              \
    char var[1024];                                                                                \
    snprintf(var, sizeof var, "%s", test_path(name))

static int hard_write(const char *path, const char *text)
{
    return lk_write_file_atomic(path, text, strlen(text), test_err());
}

/* Appends "relpath size\n" for every entry under dir (sorted, recursive) to *buf. The test's
 * own out.txt (test_sh's capture) is left out. */
static int tree_cmp(const void *a, const void *b)
{
    return strcmp(*(char *const *)a, *(char *const *)b);
}

static void tree_walk(const char *root, const char *rel, char **buf, size_t *len)
{
    char path[4096];
    snprintf(path, sizeof path, "%s%s%s", root, rel[0] ? "/" : "", rel);
    DIR *d = opendir(path);
    if (!d)
        return;
    char *names[512];
    int n = 0;
    struct dirent *e;
    while ((e = readdir(d)) && n < 512)
        if (strcmp(e->d_name, ".") && strcmp(e->d_name, "..") && !(!rel[0] && !strcmp(e->d_name, "out.txt")))
            names[n++] = lk_strdup(e->d_name);
    closedir(d);
    qsort(names, (size_t)n, sizeof *names, tree_cmp);
    for (int i = 0; i < n; i++) {
        char sub[4096], full[4200];
        snprintf(sub, sizeof sub, "%s%s%s", rel, rel[0] ? "/" : "", names[i]);
        snprintf(full, sizeof full, "%s/%s", root, sub);
        struct stat st;
        if (lstat(full, &st) == 0) {
            char line[4200];
            int k = snprintf(line, sizeof line, "%s %lld\n", sub, S_ISDIR(st.st_mode) ? -1LL : (long long)st.st_size);
            char *nb = lk_realloc(*buf, *len + (size_t)k + 1);
            if (nb) {
                memcpy(nb + *len, line, (size_t)k + 1);
                *buf = nb;
                *len += (size_t)k;
            }
            if (S_ISDIR(st.st_mode))
                tree_walk(root, sub, buf, len);
        }
        lk_free(names[i]);
    }
}

/* The listing of a folder tree (heap string, "" for an empty or missing folder). */
__attribute__((noinline)) static char *tree(const char *root)
{
    char *buf = lk_strdup("");
    size_t len = 0;
    tree_walk(root, "", &buf, &len);
    return buf;
}

static int files_equal(const char *a, const char *b)
{
    char *x = NULL, *y = NULL;
    size_t nx = 0, ny = 0;
    int eq = !lk_read_file(a, &x, &nx, NULL) && !lk_read_file(b, &y, &ny, NULL) && nx == ny &&
             !memcmp(x, y, nx);
    lk_free(x);
    lk_free(y);
    return eq;
}

/* A small Qwen2 model folder written by `lorakit init` (hidden 32, 2 layers, vocab 64). */
static int make_model(const char *dir)
{
    TP(cfgp, "small-config.json");
    if (hard_write(cfgp, "{\"architectures\":[\"Qwen2ForCausalLM\"],\"model_type\":\"qwen2\",\"hidden_size\":32,"
                         "\"intermediate_size\":64,\"num_hidden_layers\":2,\"num_attention_heads\":4,"
                         "\"num_key_value_heads\":2,\"vocab_size\":64,\"max_position_embeddings\":64,"
                         "\"rms_norm_eps\":1e-6,\"rope_theta\":10000,\"tie_word_embeddings\":true,"
                         "\"torch_dtype\":\"float32\"}"))
        return -1;
    return test_sh("%s init --config %s --out %s --seed 3", test_lorakit(), cfgp, dir);
}

/* n pre-tokenized records of len ids below vocab. */
static int make_data(const char *path, int n, int len, int vocab, uint64_t seed)
{
    struct lk_rng r;
    lk_rng_seed(&r, seed);
    size_t cap = (size_t)n * (size_t)len * 4 + (size_t)n * 32 + 1;
    char *s = lk_malloc(cap), *p = s;
    for (int i = 0; i < n; i++) {
        p += sprintf(p, "{\"input_ids\":[");
        for (int k = 0; k < len; k++)
            p += sprintf(p, "%s%d", k ? "," : "", (int)(lk_rng_u64(&r) % (uint64_t)vocab));
        p += sprintf(p, "]}\n");
    }
    int rc = hard_write(path, s);
    lk_free(s);
    return rc;
}

/* The LD_PRELOAD prefix for the fault shim, or NULL when it was not built. ASan must then not
 * insist on coming first in the library list. */
static const char *shim(void)
{
    static char buf[1200];
    const char *p = getenv("LK_FAULTSHIM");
    if (!p || !*p || !lk_file_exists(p))
        return NULL;
    snprintf(buf, sizeof buf, "ASAN_OPTIONS=verify_asan_link_order=0:detect_leaks=0 LD_PRELOAD=%s", p);
    return buf;
}

static int contains(const char *hay, const char *needle)
{
    return strstr(hay, needle) != NULL;
}

/* 1 when no entry of the tree listing has ".tmp." in its name. */
static int no_tmp(const char *listing)
{
    return !contains(listing, ".tmp.");
}

// ---- 1. fuzz findings (tests/fuzz-regress/<target>.<what>.txt|hex) ----

/* Reads a fixture: .txt as is, .hex as hex digits (whitespace and #-comments ignored). */
static int read_fixture(const char *path, char **out, size_t *n)
{
    char *t = NULL;
    size_t len = 0;
    if (lk_read_file(path, &t, &len, test_err()))
        return -1;
    size_t pl = strlen(path);
    if (pl < 4 || strcmp(path + pl - 4, ".hex")) {
        *out = t;
        *n = len;
        return 0;
    }
    char *b = lk_malloc(len / 2 + 1);
    size_t k = 0;
    int hi = -1;
    for (size_t i = 0; i < len; i++) {
        char c = t[i];
        if (c == '#') {
            while (i < len && t[i] != '\n')
                i++;
            continue;
        }
        int v = c >= '0' && c <= '9' ? c - '0' : c >= 'a' && c <= 'f' ? c - 'a' + 10 : c >= 'A' && c <= 'F' ? c - 'A' + 10 : -1;
        if (v < 0)
            continue;
        if (hi < 0)
            hi = v;
        else {
            b[k++] = (char)(hi * 16 + v);
            hi = -1;
        }
    }
    b[k] = 0;
    lk_free(t);
    *out = b;
    *n = k;
    return 0;
}

/* Runs one fixture through the parser its name starts with; returns the status, message in
 * err. A fixture must fail with a message (they are all bad inputs). */
static int regress_one(const char *name, const char *data, size_t n, struct lk_err *err)
{
    int rc;
    if (!strncmp(name, "st.", 3)) {
        struct st_file f;
        rc = st_open_buffer(&f, data, n, name, err);
        if (!rc)
            st_close(&f);
    } else if (!strncmp(name, "cfg.", 4)) {
        // config.json of a model folder beside the fixed weights of tests/fuzz/fuzz_cfg.c
        char dir[1024];
        snprintf(dir, sizeof dir, "%s/cfg", test_tmpdir());
        char *w = lk_path_join(dir, "model.safetensors");
        char *p = lk_path_join(dir, "config.json");
        int wrc = lk_mkdir_p(dir, NULL) || fz_weights_write(w);
        lk_write_file_atomic(p, data, n, err);
        lk_free(w);
        lk_free(p);
        if (wrc)
            return lk_errf(err, LK_ERR_USAGE, "fixture weights: cannot write");
        struct cfg c;
        rc = cfg_load(&c, dir, err);
        if (!rc)
            cfg_release(&c);
    } else if (!strncmp(name, "lora_config.", 12)) {
        char *p = lk_path_join(test_tmpdir(), "adapter_config.json");
        lk_write_file_atomic(p, data, n, err);
        lk_free(p);
        struct lora_config lc;
        rc = lora_config_load(&lc, test_tmpdir(), err);
        if (!rc)
            lora_config_release(&lc);
    } else if (!strncmp(name, "tok.", 4)) {
        struct tok *t = NULL;
        size_t k = strlen(data);
        rc = tok_load_json(&t, data, k, k < n ? data + k + 1 : NULL, name, err);
        tok_free(t);
    } else if (!strncmp(name, "data.", 5)) {
        // first byte: options as in fuzz_data.c; pre-tokenized records need no tokenizer
        char *p = lk_path_join(test_tmpdir(), "data.jsonl");
        lk_write_file_atomic(p, data + 1, n - 1, err);
        struct data_opts o = { 0, 0, 0, NULL, 64 };
        o.skip_bad = (data[0] >> 1) & 1;
        struct data_set d;
        rc = data_load(&d, p, NULL, &o, err);
        lk_free(p);
        if (!rc)
            data_release(&d);
    } else if (!strncmp(name, "st_index.", 9)) {
        char *p = lk_path_join(test_tmpdir(), "model.safetensors.index.json");
        lk_write_file_atomic(p, data, n, err);
        lk_free(p);
        struct st_model m;
        rc = st_model_open(&m, test_tmpdir(), err);
        if (!rc)
            st_model_close(&m);
    } else if (!strncmp(name, "adapter.", 8)) {
        // adapter_model.safetensors beside the fixed config of tests/fuzz/fuzz_adapter.c
        static const char cj[] =
            "{\"architectures\":[\"Qwen2ForCausalLM\"],\"model_type\":\"qwen2\",\"hidden_size\":8,"
            "\"intermediate_size\":16,\"num_hidden_layers\":1,\"num_attention_heads\":2,\"num_key_value_heads\":1,"
            "\"vocab_size\":16,\"max_position_embeddings\":64,\"tie_word_embeddings\":true}";
        static const char ac[] = "{\"peft_type\":\"LORA\",\"r\":2,\"lora_alpha\":4,\"target_modules\":[\"q_proj\",\"v_proj\"]}";
        struct cfg c;
        if ((rc = cfg_parse(&c, cj, "config.json", err)))
            return lk_errf(err, LK_ERR_USAGE, "fixture config: %s", err->msg);
        char *p = lk_path_join(test_tmpdir(), "adapter_config.json");
        lk_write_file_atomic(p, ac, sizeof ac - 1, err);
        lk_free(p);
        p = lk_path_join(test_tmpdir(), "adapter_model.safetensors");
        lk_write_file_atomic(p, data, n, err);
        lk_free(p);
        struct lora l = { 0 };
        rc = lora_load(&l, test_tmpdir(), &c, err);
        lora_release(&l);
        cfg_release(&c);
    } else {
        return lk_errf(err, LK_ERR_USAGE, "unknown fixture kind (expected st., cfg., lora_config., tok., data., "
                       "st_index., adapter.)");
    }
    return rc;
}

TEST(hard_fuzz_regress)
{
    const char *dir = "tests/fuzz-regress";
    DIR *d = opendir(dir);
    if (!d)
        SKIP("no %s (run from the source tree)", dir);
    int count = 0;
    struct dirent *e;
    while ((e = readdir(d))) {
        if (e->d_name[0] == '.' || !strcmp(e->d_name, "README"))
            continue;
        char path[1024];
        snprintf(path, sizeof path, "%s/%s", dir, e->d_name);
        char *data = NULL;
        size_t n = 0;
        if (read_fixture(path, &data, &n)) {
            closedir(d);
            CHECK_MSG(0, "%s: unreadable", path);
        }
        struct lk_err err = { 0 };
        int rc = regress_one(e->d_name, data, n, &err);
        lk_free(data);
        if (!rc || !err.msg[0] || err.code == LK_ERR_USAGE) {
            closedir(d);
            CHECK_MSG(0, "%s: expected a clean error, got %d '%s'", e->d_name, rc, err.msg);
        }
        count++;
    }
    closedir(d);
    CHECK(count >= 1);
}

// ---- 2. SIGKILL at random moments ----

/*
 * One row per command that writes a result: the command (placeholders {LK} the binary, {MODEL}
 * a small base model, {DATA} training JSONL, {ADAPTER} the reference run's adapter, {OUT} the
 * output folder, {RUNS} a runs database outside it), the result's kind (what a complete result
 * looks like), the file compared byte for byte with an uninterrupted run, and the resume
 * command (NULL: the command is simply run again). To add merge and svd-compress when they
 * land, one line each:
 *   { "merge", "{LK} merge --base {MODEL} --adapter {ADAPTER} --out {OUT}", RES_MODEL, "model.safetensors", NULL },
 *   { "svd-compress", "{LK} svd-compress --adapter {ADAPTER} --rank 2 --out {OUT}", RES_ADAPTER,
 *     "adapter_model.safetensors", NULL },
 */
enum res_kind { RES_ADAPTER, RES_MODEL };
struct kill_cmd {
    const char *name;
    const char *cmd;
    enum res_kind kind;
    const char *compare;
    const char *resume;
};
#define TRAIN_ARGS                                                                                 \
    "{LK} train --model {MODEL} --data {DATA} --out {OUT} --runs {RUNS} --steps 24 --save-every 2 "  \
    "--batch 4 --seq 16 --threads 1 --seed 7 --quiet"
static const struct kill_cmd kill_cmds[] = {
    { "train", TRAIN_ARGS, RES_ADAPTER, "adapter_model.safetensors", TRAIN_ARGS " --resume {OUT}" },
    { "merge", "{LK} merge --model {MODEL} --adapter {ADAPTER} --out {OUT} --runs {RUNS}", RES_MODEL,
      "model.safetensors", NULL },
    { "svd-compress", "{LK} svd-compress --adapter {ADAPTER} --rank 4 --out {OUT} --runs {RUNS}", RES_ADAPTER,
      "adapter_model.safetensors", NULL },
};

struct kill_env {
    const char *model, *data, *adapter, *runs, *docs;
};

/* Expands the placeholders into buf. */
static void expand(const char *tmpl, const struct kill_env *ke, const char *out, char *buf, size_t n)
{
    size_t k = 0;
    for (const char *p = tmpl; *p && k + 1 < n;) {
        const char *val = NULL;
        size_t skip = 0;
        static const char *const keys[] = { "{LK}", "{MODEL}", "{DATA}", "{ADAPTER}", "{OUT}", "{RUNS}", "{DOCS}" };
        const char *vals[] = { test_lorakit(), ke->model, ke->data, ke->adapter, out, ke->runs, ke->docs };
        for (int i = 0; i < 7; i++)
            if (!strncmp(p, keys[i], strlen(keys[i]))) {
                val = vals[i] ? vals[i] : "";
                skip = strlen(keys[i]);
            }
        if (val) {
            k += (size_t)snprintf(buf + k, n - k, "%s", val);
            p += skip;
        } else
            buf[k++] = *p++;
    }
    buf[k < n ? k : n - 1] = 0;
}

/* Checks a result folder: loadable as its kind. */
static int result_loads(enum res_kind kind, const char *dir, const struct cfg *c, struct lk_err *err)
{
    if (kind == RES_ADAPTER) {
        struct lora l = { 0 };
        int rc = lora_load(&l, dir, c, err);
        lora_release(&l);
        return rc;
    }
    struct model m = { 0 };
    int rc = model_load(&m, dir, err);
    if (!rc)
        model_release(&m);
    return rc;
}

/* The state a killed command left in out: every checkpoint-N folder complete and loadable,
 * a result (marker file present) loadable, anything else a *.tmp.* leftover that no reader
 * takes for a result. Sets *n_ckpt, *have_result. Returns 0 or fails the test (message). */
static int check_after_kill(const struct kill_cmd *kc, const char *out, const struct cfg *c, int *n_ckpt,
                            int *have_result, char *why, size_t wn)
{
    *n_ckpt = 0;
    *have_result = 0;
    DIR *d = opendir(out);
    if (!d)
        return 0; // killed before it made the folder: nothing new
    struct dirent *e;
    int bad = 0;
    while ((e = readdir(d)) && !bad) {
        const char *s = e->d_name;
        char p[4200];
        snprintf(p, sizeof p, "%s/%s", out, s);
        struct lk_err err = { 0 };
        if (!strcmp(s, ".") || !strcmp(s, ".."))
            continue;
        if (!strncmp(s, "checkpoint-", 11)) {
            char st[4300];
            snprintf(st, sizeof st, "%s/trainer_state.json", p);
            if (strstr(s, ".tmp.") || !lk_file_exists(st) || result_loads(kc->kind, p, c, &err)) {
                snprintf(why, wn, "%s: incomplete checkpoint %s: %s", kc->name, s, err.msg);
                bad = 1;
            }
            (*n_ckpt)++;
        } else if (strstr(s, ".tmp.")) {
            continue; // a leftover temp name: never read as a result
        } else if (!strcmp(s, kc->kind == RES_ADAPTER ? "adapter_config.json" : "config.json")) {
            if (result_loads(kc->kind, out, c, &err)) {
                snprintf(why, wn, "%s: result present but not loadable: %s", kc->name, err.msg);
                bad = 1;
            }
            *have_result = 1;
        }
    }
    closedir(d);
    return bad ? -1 : 0;
}

static double now_s(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

/* Runs cmd through /bin/sh (exec'd, so the pid is the command's), kills it with SIGKILL
 * after delay seconds unless it ended first; returns 1 when it was killed, else 0 with the
 * seconds it took in *took. */
static int run_and_kill(const char *cmd, double delay, double *took)
{
    char full[8400];
    snprintf(full, sizeof full, "exec %s >/dev/null 2>&1", cmd);
    pid_t pid = fork();
    if (pid == 0) {
        execl("/bin/sh", "sh", "-c", full, (char *)NULL);
        _exit(127);
    }
    double t0 = now_s();
    int st, killed = 0;
    for (;;) {
        pid_t r = waitpid(pid, &st, WNOHANG);
        if (r == pid) {
            *took = now_s() - t0;
            break;
        }
        if (now_s() - t0 >= delay) {
            kill(pid, SIGKILL);
            waitpid(pid, &st, 0);
            killed = WIFSIGNALED(st) && WTERMSIG(st) == SIGKILL;
            break;
        }
        struct timespec ts = { 0, 500000 };
        nanosleep(&ts, NULL);
    }
    return killed;
}

TEST(hard_kill_train)
{
    TP(model, "model");
    TP(data, "data.jsonl");
    CHECK_MSG(make_model(model) == 0, "init: %s", test_output());
    CHECK_OK(make_data(data, 24, 16, 64, 5));
    struct cfg c;
    CHECK_OK(cfg_load(&c, model, test_err()));
    char ref[1024], runs[1024];
    snprintf(ref, sizeof ref, "%s", test_path("ref"));
    snprintf(runs, sizeof runs, "%s", test_path("runs.db"));
    struct kill_env ke = { model, data, ref, runs, NULL };
    int trials = test_full() ? 16 : 6;
    for (size_t ci = 0; ci < sizeof kill_cmds / sizeof kill_cmds[0]; ci++) {
        const struct kill_cmd *kc = &kill_cmds[ci];
        char cmd[8192], out[1024], refout[1024];
        // the uninterrupted run, timed
        if (!strcmp(kc->name, "train")) // its result is the adapter other rows start from
            snprintf(refout, sizeof refout, "%s", ref);
        else
            snprintf(refout, sizeof refout, "%s/%s-ref", test_tmpdir(), kc->name);
        expand(kc->cmd, &ke, refout, cmd, sizeof cmd);
        double t0 = now_s();
        int rc = test_sh("%s", cmd);
        double dur = now_s() - t0;
        CHECK_MSG(rc == 0, "%s: %s", kc->name, test_output());
        char refcmp[1200];
        snprintf(refcmp, sizeof refcmp, "%s/%s", refout, kc->compare);
        struct lk_rng r;
        lk_rng_seed(&r, 1000 + ci);
        int killed_n = 0, with_ckpt = 0, complete = 0;
        for (int k = 0; k < trials; k++) {
            snprintf(out, sizeof out, "%s/%s-kill%d", test_tmpdir(), kc->name, k);
            expand(kc->cmd, &ke, out, cmd, sizeof cmd);
            double delay = (0.05 + 1.0 * lk_rng_uniform(&r)) * dur, took = dur;
            int killed = run_and_kill(cmd, delay, &took);
            killed_n += killed;
            if (!killed && took < dur) // the timed run was slow (a cold cache, a busy machine)
                dur = took;
            int n_ckpt, have;
            char why[1024] = "";
            CHECK_MSG(check_after_kill(kc, out, &c, &n_ckpt, &have, why, sizeof why) == 0, "trial %d (%.3fs of %.3fs): %s",
                      k, delay, dur, why);
            with_ckpt += n_ckpt > 0;
            complete += have;
            // finish the job: resume from the newest checkpoint, or run again from scratch
            if (kc->resume && n_ckpt > 0)
                expand(kc->resume, &ke, out, cmd, sizeof cmd);
            else if (!have) {
                expand(kc->cmd, &ke, out, cmd, sizeof cmd);
                strcat(cmd, " --overwrite");
            } else
                cmd[0] = 0;
            if (cmd[0])
                CHECK_MSG(test_sh("%s", cmd) == 0, "trial %d: finishing: %s", k, test_output());
            char got[1200];
            snprintf(got, sizeof got, "%s/%s", out, kc->compare);
            CHECK_MSG(files_equal(got, refcmp), "trial %d (killed at %.3fs of %.3fs, %d checkpoints): %s differs "
                      "from the uninterrupted run", k, delay, dur, n_ckpt, kc->compare);
            lk_rm_rf(out);
        }
        fprintf(stderr, "  %s: %d trials, %d killed, %d left checkpoints, %d had a complete result (run %.2fs)\n",
                kc->name, trials, killed_n, with_ckpt, complete, dur);
        CHECK_MSG(killed_n >= 2, "%s: only %d of %d runs were killed before finishing", kc->name,
                  killed_n, trials);
    }
    // the runs database every killed run wrote to is still readable (SQLite WAL)
    struct rdb db = { 0 };
    CHECK_OK(rdb_open(&db, runs, test_err()));
    struct rdb_run *rr = NULL;
    int nr = 0;
    CHECK_OK(rdb_runs_list(&db, 1000, &rr, &nr, test_err()));
    CHECK(nr >= trials);
    rdb_runs_free(rr, nr);
    CHECK_OK(rdb_close(&db, test_err()));
    cfg_release(&c);
}

// ---- 3. faults: a full disk, failing fsync, a read-only destination ----

TEST(hard_enospc_init)
{
    const char *sh = shim();
    if (!sh)
        SKIP("fault shim not built (LK_FAULTSHIM)");
    TP(fd, "full");
    CHECK_OK(lk_mkdir_p(fd, test_err()));
    CHECK_OK(hard_write(test_path("small-config.json"), "{\"architectures\":[\"Qwen2ForCausalLM\"],\"model_type\":\"qwen2\","
                        "\"hidden_size\":32,\"intermediate_size\":64,\"num_hidden_layers\":2,\"num_attention_heads\":4,"
                        "\"num_key_value_heads\":2,\"vocab_size\":64,\"tie_word_embeddings\":true}"));
    static const long budgets[] = { 0, 100, 700, 5000, 40000 };
    for (size_t i = 0; i < sizeof budgets / sizeof budgets[0]; i++) {
        int rc = test_sh("%s LK_FAULT_PATH=%s LK_FAULT_ENOSPC_AFTER=%ld %s init --config %s --out %s/m --shard-size 20000",
                         sh, fd, budgets[i], test_lorakit(), test_path("small-config.json"), fd);
        CHECK_MSG(rc == 1, "budget %ld: exit %d: %s", budgets[i], rc, test_output());
        CHECK_MSG(contains(test_output(), "No space left on device") && contains(test_output(), fd),
                  "budget %ld: %s", budgets[i], test_output());
        char *t = tree(fd);
        CHECK_MSG(!t[0], "budget %ld left: %s", budgets[i], t);
        lk_free(t);
    }
    // failing fsync is an error too
    int rc = test_sh("%s LK_FAULT_PATH=%s LK_FAULT_FSYNC=1 %s init --config %s --out %s/m", sh, fd, test_lorakit(),
                     test_path("small-config.json"), fd);
    CHECK_MSG(rc == 1 && contains(test_output(), "Input/output error"), "fsync: %d %s", rc, test_output());
    char *t = tree(fd);
    CHECK_MSG(!t[0], "fsync failure left: %s", t);
    lk_free(t);
}

TEST(hard_enospc_train)
{
    const char *sh = shim();
    if (!sh)
        SKIP("fault shim not built (LK_FAULTSHIM)");
    TP(model, "model");
    TP(data, "data.jsonl");
    TP(fd, "full");
    CHECK_MSG(make_model(model) == 0, "init: %s", test_output());
    CHECK_OK(make_data(data, 8, 12, 64, 9));
    CHECK_OK(lk_mkdir_p(fd, test_err()));
    // the size of the adapter's weights: a budget just past it fails on adapter_config.json
    CHECK_MSG(test_sh("%s train --model %s --data %s --out %s --runs %s --steps 2 --batch 2 --seq 12 --threads 1 "
                      "--quiet", test_lorakit(), model, data, test_path("probe"), test_path("runs.db")) == 0,
              "%s", test_output());
    struct stat sb;
    CHECK(stat(test_path("probe/adapter_model.safetensors"), &sb) == 0);
    // the final save (no checkpoints), then the first checkpoint
    const long budgets[] = { 0, 2000, (long)sb.st_size + 10 };
    for (int ck = 0; ck < 2; ck++)
        for (size_t i = 0; i < sizeof budgets / sizeof budgets[0]; i++) {
            int rc = test_sh("%s LK_FAULT_PATH=%s LK_FAULT_ENOSPC_AFTER=%ld %s train --model %s --data %s --out %s/a "
                             "--runs %s --steps 2 --batch 2 --seq 12 --threads 1 --quiet %s",
                             sh, fd, budgets[i], test_lorakit(), model, data, fd, test_path("runs.db"),
                             ck ? "--save-every 1" : "");
            CHECK_MSG(rc == 1, "%s budget %ld: exit %d: %s", ck ? "checkpoint" : "final", budgets[i], rc, test_output());
            CHECK_MSG(contains(test_output(), "No space left on device") && contains(test_output(), fd),
                      "budget %ld: %s", budgets[i], test_output());
            char *t = tree(fd);
            // the output folder itself may exist (made before training), but holds no file
            CHECK_MSG(!t[0] || !strcmp(t, "a -1\n"), "%s budget %ld left: %s", ck ? "checkpoint" : "final",
                      budgets[i], t);
            lk_free(t);
            lk_rm_rf(fd);
            CHECK_OK(lk_mkdir_p(fd, test_err()));
        }
}

/* The same with a real full file system: a small tmpfs mounted in a private mount namespace
 * (`unshare -m`, so it vanishes with the command and never touches the host's mounts). Needs
 * root and unshare; skipped otherwise. */
static int make_docs(const char *path, int n, const char *const *ids);
TEST(hard_enospc_tmpfs)
{
    if (geteuid() != 0 || test_sh("unshare -m true") != 0)
        SKIP("needs root and unshare -m (mount namespaces)");
    TP(model, "model");
    TP(data, "data.jsonl");
    TP(docs, "docs.jsonl");
    TP(mnt, "mnt");
    CHECK_MSG(make_model(model) == 0, "init: %s", test_output());
    CHECK_OK(make_data(data, 8, 12, 64, 9));
    CHECK_OK(make_docs(docs, 300, NULL));
    CHECK_OK(lk_mkdir_p(mnt, test_err()));
    struct {
        const char *what, *size, *cmd;
    } cases[] = {
        { "init", "64k", "%s init --preset tiny --out %s/m" },
        { "train", "16k", "%s train --model %s --data %s --out %s/a --steps 2 --batch 2 --seq 12 --threads 1 --quiet --runs %s" },
        { "index", "32k", "%s index --docs %s --db %s/i.db" },
    };
    for (int i = 0; i < 3; i++) {
        char cmd[4096];
        if (i == 0)
            snprintf(cmd, sizeof cmd, cases[i].cmd, test_lorakit(), mnt);
        else if (i == 1)
            snprintf(cmd, sizeof cmd, cases[i].cmd, test_lorakit(), model, data, mnt, test_path("runs.db"));
        else
            snprintf(cmd, sizeof cmd, cases[i].cmd, test_lorakit(), docs, mnt);
        // the listing is taken inside the namespace, after the command failed
        int rc = test_sh("unshare -m sh -c 'mount -t tmpfs -o size=%s tmpfs %s || exit 99; %s; echo \"rc=$?\"; "
                         "find %s -mindepth 1 -printf \"left: %%P\\n\"'", cases[i].size, mnt, cmd, mnt);
        if (rc == 99)
            SKIP("mount -t tmpfs is not allowed here");
        const char *o = test_output();
        CHECK_MSG(contains(o, "rc=1") && contains(o, "No space left on device") && contains(o, mnt),
                  "%s: %s", cases[i].what, o);
        // train makes its --out folder before training: that empty folder is all it may leave
        CHECK_MSG(!contains(o, "left: ") || (i == 1 && contains(o, "left: a\n") && !contains(o, "left: a/")),
                  "%s left files: %s", cases[i].what, o);
    }
}

/* docs.jsonl of n documents (ids given, or d<k>), with some text each. */
static int make_docs(const char *path, int n, const char *const *ids)
{
    size_t cap = (size_t)n * 400 + 1;
    char *s = lk_malloc(cap), *p = s;
    for (int i = 0; i < n; i++) {
        char id[64];
        snprintf(id, sizeof id, "d%d", i);
        p += sprintf(p, "{\"id\":\"%s\",\"title\":\"Document %d\",\"text\":\"fever cough patient number %d takes "
                        "%d tablets of paracetamol every day; headache and nausea are common side effects\"}\n",
                     ids ? ids[i] : id, i, i, i % 7);
    }
    int rc = hard_write(path, s);
    lk_free(s);
    return rc;
}

TEST(hard_enospc_index)
{
    const char *sh = shim();
    if (!sh)
        SKIP("fault shim not built (LK_FAULTSHIM)");
    TP(docs, "docs.jsonl");
    TP(fd, "full");
    CHECK_OK(make_docs(docs, 300, NULL));
    CHECK_OK(lk_mkdir_p(fd, test_err()));
    static const long budgets[] = { 0, 4096, 30000, 60000 }; // 60000: while finishing
    for (size_t i = 0; i < sizeof budgets / sizeof budgets[0]; i++) {
        int rc = test_sh("%s LK_FAULT_PATH=%s LK_FAULT_ENOSPC_AFTER=%ld %s index --docs %s --db %s/i.db", sh, fd,
                         budgets[i], test_lorakit(), docs, fd);
        CHECK_MSG(rc == 1, "budget %ld: exit %d: %s", budgets[i], rc, test_output());
        CHECK_MSG(contains(test_output(), "No space left on device") && contains(test_output(), "i.db"),
                  "budget %ld: %s", budgets[i], test_output());
        char *t = tree(fd);
        CHECK_MSG(!t[0], "budget %ld left: %s", budgets[i], t);
        lk_free(t);
    }
    // with room, the same command works (the shim itself is harmless)
    CHECK_MSG(test_sh("%s LK_FAULT_PATH=%s LK_FAULT_ENOSPC_AFTER=100000000 %s index --docs %s --db %s/i.db", sh, fd,
                      test_lorakit(), docs, fd) == 0, "%s", test_output());
}

TEST(hard_readonly)
{
    const char *sh = shim();
    if (!sh)
        SKIP("fault shim not built (LK_FAULTSHIM)");
    TP(model, "model");
    TP(data, "data.jsonl");
    TP(ro, "ro");
    TP(docs, "docs.jsonl");
    CHECK_MSG(make_model(model) == 0, "init: %s", test_output());
    CHECK_OK(make_data(data, 4, 8, 64, 1));
    CHECK_OK(make_docs(docs, 3, NULL));
    CHECK_OK(lk_mkdir_p(ro, test_err()));
    CHECK_OK(hard_write(test_path("ro/keep.txt"), "already here\n"));
    char *before = tree(ro);
    const char *cmds[3][2] = {
        { "init", "%s init --preset tiny --out %s/m" },
        { "train", "%s train --model %s --data %s --out %s/a --steps 1 --batch 2 --seq 8 --threads 1 --quiet --runs %s" },
        { "index", "%s index --docs %s --db %s/i.db" },
    };
    for (int i = 0; i < 3; i++) {
        int rc;
        if (i == 0)
            rc = test_sh("%s LK_FAULT_PATH=%s LK_FAULT_EROFS=1 %s init --preset tiny --out %s/m", sh, ro, test_lorakit(), ro);
        else if (i == 1)
            rc = test_sh("%s LK_FAULT_PATH=%s LK_FAULT_EROFS=1 %s train --model %s --data %s --out %s/a --steps 1 "
                         "--batch 2 --seq 8 --threads 1 --quiet --runs %s", sh, ro, test_lorakit(), model, data, ro,
                         test_path("runs.db"));
        else
            rc = test_sh("%s LK_FAULT_PATH=%s LK_FAULT_EROFS=1 %s index --docs %s --db %s/i.db", sh, ro, test_lorakit(),
                         docs, ro);
        CHECK_MSG(rc == 1 && contains(test_output(), "Read-only file system") && contains(test_output(), ro),
                  "%s: exit %d: %s", cmds[i][0], rc, test_output());
        char *after = tree(ro);
        CHECK_MSG(!strcmp(before, after), "%s changed the read-only folder: %s", cmds[i][0], after);
        lk_free(after);
    }
    lk_free(before);
}

/*
 * Every command that writes, under a full disk (several budgets) and a read-only destination:
 * exit 1, the OS's reason and the destination named, and the destination folder as it was
 * (train may leave its empty --out folder, made before training). Placeholders as kill_cmds,
 * plus {DOCS}; {OUT} lies in the faulty folder. merge and svd-compress join with one line each:
 *   { "merge", "{LK} merge --base {MODEL} --adapter {ADAPTER} --out {OUT}" },
 *   { "svd-compress", "{LK} svd-compress --adapter {ADAPTER} --rank 2 --out {OUT}" },
 */
static const struct {
    const char *name, *cmd;
} fault_cmds[] = {
    { "init", "{LK} init --preset tiny --out {OUT}" },
    { "train", "{LK} train --model {MODEL} --data {DATA} --out {OUT} --runs {RUNS} --steps 2 --save-every 1 --batch 2 "
               "--seq 12 --threads 1 --quiet" },
    { "index", "{LK} index --docs {DOCS} --db {OUT}" },
    { "merge", "{LK} merge --model {MODEL} --adapter {ADAPTER} --out {OUT} --runs {RUNS}" },
    { "svd-compress", "{LK} svd-compress --adapter {ADAPTER} --rank 4 --out {OUT} --runs {RUNS}" },
};

TEST(hard_faults_table)
{
    const char *sh = shim();
    if (!sh)
        SKIP("fault shim not built (LK_FAULTSHIM)");
    TP(model, "model");
    TP(data, "data.jsonl");
    TP(docs, "docs.jsonl");
    TP(adapter, "adapter");
    TP(runs, "runs.db");
    TP(fd, "faulty");
    CHECK_MSG(make_model(model) == 0, "init: %s", test_output());
    CHECK_OK(make_data(data, 8, 12, 64, 9));
    CHECK_OK(make_docs(docs, 50, NULL));
    CHECK_MSG(test_sh("%s train --model %s --data %s --out %s --runs %s --steps 2 --batch 2 --seq 12 --threads 1 --quiet",
                      test_lorakit(), model, data, adapter, runs) == 0, "%s", test_output());
    struct kill_env ke = { model, data, adapter, runs, docs };
    char out[1200];
    snprintf(out, sizeof out, "%s/result", fd);
    static const char *const faults[] = { "LK_FAULT_ENOSPC_AFTER=0", "LK_FAULT_ENOSPC_AFTER=3000",
                                          "LK_FAULT_ENOSPC_AFTER=20000", "LK_FAULT_FSYNC=1", "LK_FAULT_EROFS=1" };
    static const char *const reasons[] = { "No space left on device", "No space left on device",
                                           "No space left on device", "Input/output error", "Read-only file system" };
    for (size_t ci = 0; ci < sizeof fault_cmds / sizeof fault_cmds[0]; ci++)
        for (size_t k = 0; k < sizeof faults / sizeof faults[0]; k++) {
            CHECK_OK(lk_mkdir_p(fd, test_err()));
            CHECK_OK(hard_write(test_path("faulty/keep.txt"), "already here\n"));
            char *before = tree(fd);
            char cmd[8192];
            expand(fault_cmds[ci].cmd, &ke, out, cmd, sizeof cmd);
            int rc = test_sh("%s LK_FAULT_PATH=%s %s %s", sh, fd, faults[k], cmd);
            CHECK_MSG(rc == 1 && contains(test_output(), reasons[k]) && contains(test_output(), fd),
                      "%s with %s: exit %d: %s", fault_cmds[ci].name, faults[k], rc, test_output());
            char *after = tree(fd);
            int same = !strcmp(before, after);
            if (!same && !strcmp(fault_cmds[ci].name, "train")) { // its empty --out folder may stay
                char *b2 = lk_malloc(strlen(before) + 32);
                snprintf(b2, strlen(before) + 32, "keep.txt 13\nresult -1\n");
                same = !strcmp(after, b2);
                lk_free(b2);
            }
            CHECK_MSG(same, "%s with %s left:\n%s", fault_cmds[ci].name, faults[k], after);
            lk_free(before);
            lk_free(after);
            lk_rm_rf(fd);
        }
}

// ---- 3b. truncated model files ----

TEST(hard_truncated_model)
{
    TP(model, "model");
    CHECK_MSG(make_model(model) == 0, "init: %s", test_output());
    char st[1100];
    snprintf(st, sizeof st, "%s/model.safetensors", model);
    struct stat sb;
    CHECK(stat(st, &sb) == 0);
    off_t full = sb.st_size;
    char *orig = NULL;
    size_t olen = 0;
    CHECK_OK(lk_read_file(st, &orig, &olen, test_err()));
    uint64_t hl = 0;
    memcpy(&hl, orig, 8);
    // cut inside the data, at the end of the header, inside the header, inside the length
    off_t cuts[] = { full - 1, full - 4096, (off_t)(8 + hl), (off_t)(8 + hl / 2), 4, 0 };
    for (size_t i = 0; i < sizeof cuts / sizeof cuts[0]; i++) {
        CHECK_OK(lk_write_file_atomic(st, orig, olen, test_err()));
        CHECK(truncate(st, cuts[i]) == 0);
        struct st_file f;
        struct lk_err err = { 0 };
        CHECK_MSG(st_open(&f, st, &err) != 0 && contains(err.msg, "model.safetensors"), "cut at %lld: '%s'",
                  (long long)cuts[i], err.msg);
        struct model m = { 0 };
        CHECK(model_load(&m, model, &err) != 0);
        int rc = test_sh("%s info %s", test_lorakit(), model);
        CHECK_MSG(rc == 1 && contains(test_output(), "model.safetensors"), "info on a cut file: %d %s", rc, test_output());
    }
    // trailing bytes are refused too (the data area must be covered exactly)
    CHECK_OK(lk_write_file_atomic(st, orig, olen, test_err()));
    FILE *f = fopen(st, "ab");
    CHECK(f && fwrite("xxxx", 1, 4, f) == 4 && fclose(f) == 0);
    struct st_file sf;
    CHECK(st_open(&sf, st, test_err()) != 0);
    // truncation after model_load cannot hurt: the weights were copied into the model's block
    CHECK_OK(lk_write_file_atomic(st, orig, olen, test_err()));
    struct model m = { 0 };
    CHECK_OK(model_load(&m, model, test_err()));
    double sum = 0;
    for (size_t i = 0; i < m.w.n; i++)
        sum += m.w.mem[i];
    CHECK(truncate(st, 8) == 0);
    double sum2 = 0;
    for (size_t i = 0; i < m.w.n; i++)
        sum2 += m.w.mem[i];
    CHECK(sum == sum2);
    model_release(&m);
    lk_free(orig);
}

// ---- 4. hostile names ----

TEST(hard_names_tensor_and_targets)
{
    TP(model, "model");
    CHECK_MSG(make_model(model) == 0, "init: %s", test_output());
    struct cfg c;
    CHECK_OK(cfg_load(&c, model, test_err()));
    // an adapter whose tensor names walk out of the folder
    TP(ad, "adapter");
    CHECK_OK(lk_mkdir_p(ad, test_err()));
    CHECK_OK(hard_write(test_path("adapter/adapter_config.json"),
                        "{\"peft_type\":\"LORA\",\"r\":2,\"lora_alpha\":4,\"target_modules\":[\"q_proj\"]}"));
    static const float v[64] = { 0 };
    struct st_item items[2] = {
        { "base_model.model.model.layers.0.self_attn.q_proj/../../../../evil.lora_A.weight", 2, { 2, 32 }, v },
        { "../../../tmp/evil", 1, { 2 }, v },
    };
    char p[1200];
    snprintf(p, sizeof p, "%s/adapter_model.safetensors", ad);
    CHECK_OK(st_write_f32(p, items, 2, TENSOR_F32, test_err()));
    struct st_file f;
    CHECK_OK(st_open(&f, p, test_err())); // names are data: the file itself is valid
    CHECK(st_find(&f, "../../../tmp/evil") != NULL);
    st_close(&f);
    char *before = tree(test_tmpdir());
    struct lora l = { 0 };
    struct lk_err err = { 0 };
    CHECK(lora_load(&l, ad, &c, &err) != 0);
    CHECK_MSG(contains(err.msg, "adapter_model.safetensors"), "%s", err.msg);
    lora_release(&l);
    // the commands that read an adapter refuse it and write nothing
    CHECK_OK(make_data(test_path("d.jsonl"), 2, 8, 64, 1));
    char *before2 = tree(test_tmpdir());
    int rc0 = test_sh("%s train --model %s --data %s --adapter %s --out %s --steps 1 --batch 1 --seq 8 --quiet --runs %s",
                      test_lorakit(), model, test_path("d.jsonl"), ad, test_path("out"), test_path("runs.db"));
    CHECK_MSG(rc0 == 1 && contains(test_output(), "adapter_model.safetensors"), "train --adapter: %d %s", rc0,
              test_output());
    char *after2 = tree(test_tmpdir());
    CHECK_MSG(!strcmp(before2, after2), "train --adapter wrote:\n%s", after2);
    lk_free(before2);
    lk_free(after2);
    // target_modules that are paths
    static const char *const bad_targets[] = { "[\"../../q_proj/x\"]", "[\"q_proj/../../../etc\"]",
                                               "[\"/etc/passwd\"]", "\"../../.*\"" };
    for (size_t i = 0; i < sizeof bad_targets / sizeof bad_targets[0]; i++) {
        char js[512];
        snprintf(js, sizeof js, "{\"peft_type\":\"LORA\",\"r\":2,\"lora_alpha\":4,\"target_modules\":%s}", bad_targets[i]);
        CHECK_OK(hard_write(test_path("adapter/adapter_config.json"), js));
        struct lora_config lc;
        struct lk_err e2 = { 0 };
        int rc = lora_config_load(&lc, ad, &e2);
        if (!rc) { // a regex that names nothing selects nothing: no module, never a path
            CHECK_MSG(lc.targets == 0, "%s selected modules %#x", bad_targets[i], lc.targets);
            lora_config_release(&lc);
        } else
            CHECK_MSG(contains(e2.msg, "adapter_config.json"), "%s", e2.msg);
    }
    // an index naming a shard outside the folder (the file exists there): refused
    TP(m2, "m2");
    CHECK_OK(lk_mkdir_p(m2, test_err()));
    snprintf(p, sizeof p, "%s/outside.safetensors", test_tmpdir());
    CHECK_OK(st_write_f32(p, items + 1, 1, TENSOR_F32, test_err()));
    static const char *const shards[] = { "../outside.safetensors", "/etc/passwd", "sub/../../outside.safetensors",
                                          "..\\\\outside.safetensors" };
    for (size_t i = 0; i < sizeof shards / sizeof shards[0]; i++) {
        char js[512];
        snprintf(js, sizeof js, "{\"weight_map\":{\"../../../tmp/evil\":\"%s\"}}", shards[i]);
        CHECK_OK(hard_write(test_path("m2/model.safetensors.index.json"), js));
        struct st_model sm;
        struct lk_err e2 = { 0 };
        CHECK_MSG(st_model_open(&sm, m2, &e2) != 0, "shard '%s' accepted", shards[i]);
        CHECK_MSG(contains(e2.msg, "index.json") || contains(e2.msg, m2), "%s", e2.msg);
    }
    // nothing was written anywhere (the fixtures made above aside)
    char *after = tree(test_tmpdir());
    CHECK_MSG(!contains(after, "evil") && !contains(after, "out -1"), "%s", after);
    lk_free(after);
    lk_free(before);
    lk_rm_rf(m2);
    lk_rm_rf(ad);
    cfg_release(&c);
}

TEST(hard_names_sql)
{
    TP(docs, "w/docs.jsonl");
    CHECK_OK(lk_mkdir_p(test_path("w"), test_err()));
    static const char *const ids[] = { "x'; DROP TABLE docs; --", "\\\"quoted\\\" \\\"id\\\"", "../../../evil",
                                       "Robert'); DELETE FROM chunks WHERE ('1'='1" };
    CHECK_OK(make_docs(docs, 4, ids));
    char *before = tree(test_tmpdir());
    int rc = test_sh("%s index --docs %s --db %s", test_lorakit(), docs, test_path("w/i.db"));
    CHECK_MSG(rc == 0, "%s", test_output());
    struct fts_index idx;
    CHECK_OK(fts_open(&idx, test_path("w/i.db"), test_err()));
    CHECK_INT(idx.n_docs, 4);
    struct fts_hit *h = NULL;
    int n = 0;
    CHECK_OK(fts_search(&idx, "paracetamol'; DROP TABLE chunks; --", 10, &h, &n, test_err()));
    CHECK_INT(n, 4);
    static const char *const want[] = { "x'; DROP TABLE docs; --", "\"quoted\" \"id\"", "../../../evil",
                                        "Robert'); DELETE FROM chunks WHERE ('1'='1" };
    int found = 0;
    for (int i = 0; i < n; i++)
        for (int k = 0; k < 4; k++)
            found += !strcmp(h[i].doc_id, want[k]);
    CHECK_INT(found, 4);
    fts_hits_free(h, n);
    fts_close(&idx);
    rc = test_sh("%s search --db %s \"x'; DROP TABLE docs; --\"", test_lorakit(), test_path("w/i.db"));
    CHECK_MSG(rc == 0, "%s", test_output());
    // only the index was added
    char *after = tree(test_tmpdir());
    const char *cut = strstr(after, "w/i.db "); // the listing with the index's line taken out
    CHECK_MSG(cut != NULL, "%s", after);
    size_t pre = (size_t)(cut - after);
    const char *rest = strchr(cut, '\n') + 1;
    CHECK_MSG(strlen(before) == pre + strlen(rest) && !strncmp(before, after, pre) && !strcmp(before + pre, rest),
              "before:\n%s\nafter:\n%s", before, after);
    CHECK(no_tmp(after));
    lk_free(before);
    lk_free(after);
}

// ---- 5. sizes read from files ----

/* A safetensors buffer: 8-byte length (given, or the header's) + header + data bytes. */
static int open_st(const char *header, uint64_t len_field, size_t data_len, struct lk_err *err)
{
    size_t hl = strlen(header);
    size_t n = 8 + hl + data_len;
    unsigned char *b = lk_calloc(n, 1);
    uint64_t L = len_field ? len_field : hl;
    for (int i = 0; i < 8; i++)
        b[i] = (unsigned char)(L >> (8 * i));
    memcpy(b + 8, header, hl);
    struct st_file f;
    int rc = st_open_buffer(&f, b, n, "limits.safetensors", err);
    if (!rc)
        st_close(&f);
    lk_free(b);
    return rc;
}

TEST(hard_limits_safetensors)
{
    struct lk_err err = { 0 };
    const char *ok = "{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]}}";
    CHECK_OK(open_st(ok, 0, 8, test_err()));
    // header lengths: past the file, 2^64-1, past the 100 MB limit, zero
    CHECK(open_st(ok, 1000, 8, &err) != 0 && contains(err.msg, "limits.safetensors"));
    CHECK(open_st(ok, UINT64_MAX, 8, &err) != 0);
    CHECK(open_st(ok, (uint64_t)ST_MAX_HEADER + 1, 8, &err) != 0);
    CHECK(open_st("", 0, 0, &err) != 0);
    // shapes whose product (or product x 4 bytes) overflows size_t, negative, fractional, huge
    static const char *const bad[] = {
        "{\"a\":{\"dtype\":\"F32\",\"shape\":[4294967296,4294967296,16],\"data_offsets\":[0,0]}}",
        "{\"a\":{\"dtype\":\"F32\",\"shape\":[4611686018427387904],\"data_offsets\":[0,0]}}",
        "{\"a\":{\"dtype\":\"F32\",\"shape\":[18446744073709551616],\"data_offsets\":[0,8]}}",
        "{\"a\":{\"dtype\":\"F32\",\"shape\":[-2],\"data_offsets\":[0,8]}}",
        "{\"a\":{\"dtype\":\"F32\",\"shape\":[2.5],\"data_offsets\":[0,8]}}",
        "{\"a\":{\"dtype\":\"F32\",\"shape\":[1e300],\"data_offsets\":[0,8]}}",
        "{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,18446744073709551615]}}",
        "{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[18446744073709551608,0]}}",
        "{\"a\":{\"dtype\":\"F32\",\"shape\":[1,1,1,1,1,1,1,1,1,2],\"data_offsets\":[0,8]}}",
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        struct lk_err e2 = { 0 };
        CHECK_MSG(open_st(bad[i], 0, 8, &e2) != 0 && contains(e2.msg, "limits.safetensors"), "%s: '%s'", bad[i], e2.msg);
    }
}

TEST(hard_limits_config)
{
    static const char *const base = "\"architectures\":[\"Qwen2ForCausalLM\"],\"model_type\":\"qwen2\",\"num_key_value_heads\":2";
    static const char *const bad[] = {
        "\"hidden_size\":2147483520,\"intermediate_size\":64,\"num_hidden_layers\":2,\"num_attention_heads\":4,\"vocab_size\":2147483647",
        "\"hidden_size\":64,\"intermediate_size\":2147483647,\"num_hidden_layers\":2147483647,\"num_attention_heads\":4,\"vocab_size\":64",
        "\"hidden_size\":1048576,\"intermediate_size\":4194304,\"num_hidden_layers\":1000,\"num_attention_heads\":8,\"vocab_size\":64",
        "\"hidden_size\":64,\"intermediate_size\":64,\"num_hidden_layers\":2,\"num_attention_heads\":4,\"vocab_size\":1e30",
        "\"hidden_size\":64,\"intermediate_size\":64,\"num_hidden_layers\":2,\"num_attention_heads\":4,\"vocab_size\":-5",
        "\"hidden_size\":64,\"intermediate_size\":64,\"num_hidden_layers\":2,\"num_attention_heads\":4,\"vocab_size\":64,\"max_position_embeddings\":1e20",
        "\"hidden_size\":64,\"intermediate_size\":64,\"num_hidden_layers\":2,\"num_attention_heads\":4,\"vocab_size\":64,\"head_dim\":2147483647",
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        char js[1024];
        snprintf(js, sizeof js, "{%s,%s}", base, bad[i]);
        struct cfg c;
        struct lk_err err = { 0 };
        int rc = cfg_parse(&c, js, "config.json", &err);
        CHECK_MSG(rc != 0 && contains(err.msg, "config.json"), "accepted: %s", bad[i]);
    }
    // large but admissible dimensions: model_init fails cleanly with LK_ERR_NOMEM (about 4 TB)
    char js[1024];
    snprintf(js, sizeof js, "{%s,\"hidden_size\":65536,\"intermediate_size\":262144,\"num_hidden_layers\":16,"
                            "\"num_attention_heads\":64,\"vocab_size\":1000000}", base);
    struct cfg c;
    CHECK_OK(cfg_parse(&c, js, "config.json", test_err()));
    CHECK(cfg_param_count(&c) > (int64_t)1e11);
    struct model m = { 0 };
    struct lk_err err = { 0 };
#if defined(__SANITIZE_ADDRESS__)
    // ASan aborts on a request this large (allocation-size-too-big) instead of returning NULL:
    // take the same path through the allocation countdown
    lk_fail_countdown = 1;
#endif
    CHECK_INT(model_init(&m, &c, &err), LK_ERR_NOMEM);
    lk_fail_countdown = 0;
    CHECK(err.msg[0]);
    cfg_release(&c);
}

/* Runs argv (no shell), stdout and stderr into *out_text (heap, caller frees), and returns its
 * exit status (128 + signal when killed) with its peak resident memory in KB and its wall time. An intermediate process forks and waits for it, so getrusage's
 * RUSAGE_CHILDREN there holds that one process; a command still running after 20 s is killed. */
static int run_measured(char *const argv[], char **out_text, long *out_kb, double *out_s)
{
    char out[1024];
    snprintf(out, sizeof out, "%s", test_path("measured.txt"));
    int fd[2];
    if (pipe(fd))
        return -1;
    double t0 = now_s();
    pid_t mid = fork();
    if (mid == 0) {
        close(fd[0]);
        pid_t pid = fork();
        if (pid == 0) {
            int o = open(out, O_WRONLY | O_CREAT | O_TRUNC, 0644);
            if (o < 0 || dup2(o, 1) < 0 || dup2(o, 2) < 0)
                _exit(126);
            alarm(20); // survives exec: a command that runs away is killed by SIGALRM
            execv(argv[0], argv);
            _exit(127);
        }
        int st = 0;
        struct rusage ru;
        long r[2] = { -1, -1 };
        if (pid > 0 && waitpid(pid, &st, 0) == pid && getrusage(RUSAGE_CHILDREN, &ru) == 0) {
            r[0] = WIFSIGNALED(st) ? 128 + WTERMSIG(st) : WEXITSTATUS(st);
            r[1] = ru.ru_maxrss; // KB on Linux
        }
        _exit(write(fd[1], r, sizeof r) == (ssize_t)sizeof r ? 0 : 1);
    }
    close(fd[1]);
    long r[2] = { -1, -1 };
    ssize_t got = mid > 0 ? read(fd[0], r, sizeof r) : -1;
    close(fd[0]);
    if (mid > 0)
        waitpid(mid, NULL, 0);
    *out_s = now_s() - t0;
    *out_kb = r[1];
    if (lk_read_file(out, out_text, NULL, NULL))
        *out_text = lk_strdup("");
    return got == (ssize_t)sizeof r ? (int)r[0] : -1;
}

TEST(hard_hostile_config_refused_by_every_command)
{
    // found by fuzz_cfg (-seed=777): 7,171,000 layers of width 2 pass the parameter limit; beside
    // an empty model.safetensors, `info` took 116 s and 10.7 GB and `logits` 111 s and 13.4 GB
    // before refusing, the tensor table sized from config.json before the weights were read
    const char *hostile = "{\"architectures\":[\"Qwen2ForCausalLM\"],\"model_type\":\"qwen2\",\"hidden_size\":2,"
                          "\"intermediate_size\":2,\"num_hidden_layers\":7171000,\"num_attention_heads\":1,"
                          "\"num_key_value_heads\":1,\"vocab_size\":2}";
    CHECK(strlen(hostile) < 200);
    TP(m, "m");
    TP(good, "good");
    TP(ad, "ad");
    TP(data, "d.jsonl");
    TP(qa, "qa.jsonl");
    TP(docs, "docs.jsonl");
    TP(runs, "runs.db");
    CHECK_OK(lk_mkdir_p(m, test_err()));
    CHECK_OK(hard_write(test_path("m/config.json"), hostile));
    CHECK_MSG(make_model(good) == 0, "init: %s", test_output());
    CHECK_OK(hard_write(data, "{\"input_ids\":[1,2,3,4]}\n"));
    CHECK_OK(hard_write(qa, "{\"id\":\"q1\",\"question\":\"what?\",\"answer\":\"x\"}\n"));
    CHECK_OK(hard_write(docs, "{\"id\":\"d1\",\"title\":\"t\",\"text\":\"x y z\"}\n"));
    // a real adapter of the small model, so that merge and diff have one to read
    struct cfg gc;
    struct lora l;
    struct lora_config lc;
    CHECK_OK(cfg_load(&gc, good, test_err()));
    lora_config_default(&lc);
    lc.targets = 1u << CFG_Q;
    CHECK_OK(lora_init(&l, &lc, &gc, test_err()));
    CHECK_OK(lora_save(&l, ad, test_err()));
    lora_release(&l);
    cfg_release(&gc);
    // every command that opens a model, each given the hostile folder as its model
    TP(o0, "o.safetensors");
    TP(o1, "o1");
    TP(o2, "o2");
    TP(o3, "o3");
    const char *const cmds[][12] = {
        { "info", m },
        { "logits", "--model", m, "--tokens", "1,1", "--out", o0 },
        { "generate", "--model", m, "--prompt", "hi", "--max-new", "1" },
        { "train", "--model", m, "--data", data, "--out", o1, "--steps", "1", "--runs", runs },
        { "merge", "--model", m, "--adapter", ad, "--out", o2 },
        { "svd-compress", "--base", m, "--tuned", m, "--out", o3, "--rank", "2" },
        { "diff", ad, m, "--base", m },
        { "eval", "--model", m, "--qa", qa, "--docs", docs, "--runs", runs, "--quiet" },
    };
    // the weights: a valid file of no tensors, an empty file, none at all (then any clean
    // refusal will do: merge, for one, first finds that the adapter does not fit the config)
    static const struct {
        const char *bytes;
        size_t n;
        const char *want;
    } weights[] = {
        { "\x02\0\0\0\0\0\0\0{}", 10, "this config.json does not belong to them" },
        { "", 0, "too short for a safetensors header" },
        { NULL, 0, "" },
    };
    long worst_kb = 0;
    double worst_s = 0;
    for (size_t w = 0; w < sizeof weights / sizeof weights[0]; w++) {
        const char *wp = test_path("m/model.safetensors");
        unlink(wp);
        if (weights[w].bytes)
            CHECK_OK(lk_write_file_atomic(wp, weights[w].bytes, weights[w].n, test_err()));
        for (size_t c = 0; c < sizeof cmds / sizeof cmds[0]; c++) {
            char *argv[16] = { (char *)test_lorakit() }; // execv's argv is not const
            for (int i = 0; i < 12 && cmds[c][i]; i++)
                argv[i + 1] = (char *)cmds[c][i];
            long kb;
            double secs;
            char *o;
            int rc = run_measured(argv, &o, &kb, &secs);
            char who[64];
            snprintf(who, sizeof who, "lorakit %s: error: ", cmds[c][0]);
            int ok = rc == 1 && contains(o, who) && contains(o, weights[w].want) &&
                     (!weights[w].bytes || contains(o, m)); // the message names the model folder
            if (!ok)
                test_fail(__FILE__, __LINE__, "weights %zu, %s: exit %d: %s", w, cmds[c][0], rc, o);
            lk_free(o);
            if (!ok)
                return;
            CHECK_MSG(secs < 1.0 && kb > 0 && kb < 50 * 1024, "weights %zu, %s: %.2f s, %ld KB", w, cmds[c][0],
                      secs, kb);
            worst_kb = kb > worst_kb ? kb : worst_kb;
            worst_s = secs > worst_s ? secs : worst_s;
        }
        CHECK(!lk_file_exists(o0) && !lk_file_exists(o1) && !lk_file_exists(o2) && !lk_file_exists(o3));
    }
    fprintf(stderr, "    24 refusals: at most %.3f s and %ld KB peak resident\n", worst_s, worst_kb);
}

TEST(hard_limits_tokenizer)
{
    // ids far beyond the number of tokens must not size an allocation
    static const char *const bad[] = {
        "{\"model\":{\"type\":\"BPE\",\"vocab\":{\"a\":2147483647},\"merges\":[]}}",
        "{\"model\":{\"type\":\"BPE\",\"vocab\":{\"a\":1e18},\"merges\":[]}}",
        "{\"model\":{\"type\":\"BPE\",\"vocab\":{\"a\":-1},\"merges\":[]}}",
        "{\"model\":{\"type\":\"BPE\",\"vocab\":{\"a\":0},\"merges\":[]},\"added_tokens\":[{\"id\":2147483647,\"content\":\"x\",\"special\":true}]}",
        "{\"model\":{\"type\":\"BPE\",\"vocab\":{\"a\":99999999},\"merges\":[]}}",
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        struct tok *t = NULL;
        struct lk_err err = { 0 };
        double t0 = now_s();
        int rc = tok_load_json(&t, bad[i], strlen(bad[i]), NULL, "tokenizer.json", &err);
        tok_free(t);
        CHECK_MSG(rc != 0 && contains(err.msg, "tokenizer.json"), "accepted: %s", bad[i]);
        CHECK_MSG(now_s() - t0 < 2.0, "slow on %s", bad[i]);
    }
}

TEST(hard_limits_data)
{
    TP(model, "model");
    CHECK_MSG(make_model(model) == 0, "init: %s", test_output());
    static const char *const bad[] = {
        "{\"input_ids\":[1,2,3]}\n{\"input_ids\":[1,64,3]}\n",                  /* id = vocab */
        "{\"input_ids\":[1,2,3]}\n{\"input_ids\":[1,2,2147483647]}\n",          /* id = INT_MAX */
        "{\"input_ids\":[1,2,3]}\n{\"input_ids\":[1,2,3],\"labels\":[1,2,1e300]}\n", /* label overflows int */
        "{\"input_ids\":[1,2,3]}\n{\"input_ids\":[1,2,3],\"labels\":[1,2,99]}\n",    /* label beyond vocab */
        "{\"input_ids\":[1,2,3]}\n{\"input_ids\":[1,2,3],\"labels\":[1,2,2.5]}\n",   /* label not an integer */
        "{\"input_ids\":[1,2,3]}\n{\"input_ids\":[1,2,1e10]}\n",
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        CHECK_OK(hard_write(test_path("d.jsonl"), bad[i]));
        int rc = test_sh("%s train --model %s --data %s --out %s --steps 1 --batch 1 --seq 8 --threads 1 --quiet --runs %s",
                         test_lorakit(), model, test_path("d.jsonl"), test_path("out"), test_path("runs.db"));
        CHECK_MSG(rc == 1 && contains(test_output(), "d.jsonl:2:"), "case %zu: exit %d: %s", i, rc, test_output());
        CHECK(!lk_file_exists(test_path("out")));
        // and in the library, with the vocabulary given
        struct data_opts o = { 8, 0, 0, NULL, 64 };
        struct data_set d;
        struct lk_err err = { 0 };
        CHECK(data_load(&d, test_path("d.jsonl"), NULL, &o, &err) != 0 && contains(err.msg, "d.jsonl:2:"));
    }
    // sizes from the command line beyond int are refused, not wrapped (2^32 + 2 was --seq 2)
    CHECK_OK(hard_write(test_path("d.jsonl"), "{\"input_ids\":[1,2,3,4,5]}\n"));
    static const char *const big[] = { "--seq 4294967298", "--seq 99999999999", "--batch 4294967297",
                                       "--grad-accum 4294967297" };
    for (size_t i = 0; i < sizeof big / sizeof big[0]; i++) {
        int rc = test_sh("%s train --model %s --data %s --out %s --steps 1 %s --quiet --runs %s", test_lorakit(), model,
                         test_path("d.jsonl"), test_path("out"), big[i], test_path("runs.db"));
        CHECK_MSG(rc == 2 && contains(test_output(), "out of range"), "%s: exit %d: %s", big[i], rc, test_output());
        CHECK(!lk_file_exists(test_path("out")));
    }
}
