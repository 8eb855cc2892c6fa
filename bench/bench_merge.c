/*
 * bench_merge.c - `lorakit merge` on a model of at least 3 GB: peak RSS and wall time against
 * copying the model's files with cp in the same run, for the folder output and for one GGUF
 * file (f32, bf16 and q8_0).
 *
 * Usage: bench_merge LORAKIT WORKDIR
 * Makes WORKDIR/base with `lorakit init --preset qwen2-1.5b --dtype bf16` (1.54e9 parameters,
 * 3.09 GB; kept for a second run) with the project's tokenizer (datasets/base-model), a random
 * rank-16 adapter on all seven projections (alpha 32), reads the base once so both contenders
 * start from a warm page cache, then times `cp -r base copy` (and a `sync` of the copy, since
 * merge fsyncs its output),
 * `lorakit merge --model base --adapter adapter --out merged` and the same with
 * `--out merged.gguf --dtype f32|bf16|q8_0`, each a child process whose peak RSS comes from
 * wait4's rusage, with the load average before and after (the machine is shared). Prints each,
 * its ratio to cp, and the pass/fail of the targets (RSS < 1 GiB for every output, time <= 2 x
 * cp for the folder). Each output is removed before the next (the f32 GGUF is 6.2 GB).
 */
#define _DEFAULT_SOURCE /* wait4 (the child's peak RSS) and getloadavg are BSD extensions, not POSIX */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/time.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "../libcore/cfg.h"
#include "../libcore/lk.h"
#include "../libcore/lora.h"

/* Runs argv as a child; wall seconds and the child's peak RSS (KiB). Returns the exit status. */
static int run(const char *const *argv, double *secs, long *maxrss_kb)
{
    double t0 = lk_now();
    pid_t pid = fork();
    if (pid == 0) {
        execvp(argv[0], (char *const *)argv);
        _exit(127);
    }
    int st = 0;
    struct rusage ru;
    memset(&ru, 0, sizeof ru);
    if (pid < 0 || wait4(pid, &st, 0, &ru) < 0)
        return -1;
    *secs = lk_now() - t0;
    *maxrss_kb = ru.ru_maxrss;
    return WIFEXITED(st) ? WEXITSTATUS(st) : 128;
}

static void print_load(const char *when)
{
    double la[3];
    if (getloadavg(la, 3) == 3)
        printf("  load average %s: %.2f %.2f %.2f\n", when, la[0], la[1], la[2]);
}

/* merge into one GGUF file of dtype: its time, peak RSS and size, printed against cp. Returns
 * 1 when the RSS target holds, 0 when not, -1 when the merge failed. */
static int merge_gguf(const char *lk, const char *base, const char *adapter, const char *wd, const char *dtype,
                      double t_cp)
{
    char out[1100];
    snprintf(out, sizeof out, "%s/merged-%s.gguf", wd, dtype);
    unlink(out);
    const char *mg[] = { lk, "merge", "--model", base, "--adapter", adapter, "--out", out, "--dtype", dtype, NULL };
    double t;
    long rss;
    int rc = run(mg, &t, &rss);
    struct stat sb;
    long long bytes = stat(out, &sb) == 0 ? (long long)sb.st_size : 0;
    unlink(out);
    if (rc) {
        fprintf(stderr, "bench_merge: lorakit merge --out %s failed (exit %d)\n", out, rc);
        return -1;
    }
    printf("  merge .gguf %-4s %7.2f s   peak RSS %6.1f MiB   %.2f GB written   merge / cp = %.2f\n", dtype, t,
           rss / 1024.0, bytes / 1e9, t / t_cp);
    return rss / 1024.0 < 1024;
}

int main(int argc, char **argv)
{
    if (argc != 3) {
        fprintf(stderr, "usage: bench_merge LORAKIT WORKDIR\n");
        return 2;
    }
    const char *lk = argv[1], *wd = argv[2];
    char base[1024], adapter[1024], copy[1024], merged[1024], cfgp[1100], cmd[4096];
    snprintf(base, sizeof base, "%s/base", wd);
    snprintf(adapter, sizeof adapter, "%s/adapter", wd);
    snprintf(copy, sizeof copy, "%s/copy", wd);
    snprintf(merged, sizeof merged, "%s/merged", wd);
    snprintf(cfgp, sizeof cfgp, "%s/config.json", base);
    struct lk_err err = { 0 };
    if (lk_mkdir_p(wd, &err)) {
        fprintf(stderr, "bench_merge: %s\n", err.msg);
        return 1;
    }
    lk_rm_rf(copy);
    lk_rm_rf(merged);
    double s;
    long rss;
    if (!lk_file_exists(cfgp)) {
        const char *init[] = { lk, "init", "--preset", "qwen2-1.5b", "--dtype", "bf16", "--seed", "1", "--out",
                         base, NULL };
        if (run(init, &s, &rss)) {
            fprintf(stderr, "bench_merge: lorakit init failed\n");
            return 1;
        }
        printf("init: wrote the qwen2-1.5b bf16 base in %.1f s\n", s);
    }
    // a GGUF carries the tokenizer: the project's own (768 tokens, padded to the vocabulary)
    char tokp[1100];
    snprintf(tokp, sizeof tokp, "%s/tokenizer.json", base);
    snprintf(cmd, sizeof cmd, "cp datasets/base-model/tokenizer.json datasets/base-model/tokenizer_config.json '%s'/",
             base);
    if (!lk_file_exists(tokp) && system(cmd) != 0) {
        fprintf(stderr, "bench_merge: no tokenizer (run from the repository root)\n");
        return 1;
    }
    // a random rank-16 adapter on all seven projections (B nonzero, so every product counts)
    struct cfg c;
    if (cfg_load(&c, base, &err)) {
        fprintf(stderr, "bench_merge: %s\n", err.msg);
        return 1;
    }
    struct lora_config lc;
    lora_config_default(&lc);
    lc.r = 16;
    lc.alpha = 32;
    struct lora l;
    if (lora_init(&l, &lc, &c, &err)) {
        fprintf(stderr, "bench_merge: %s\n", err.msg);
        return 1;
    }
    struct lk_rng rng;
    lk_rng_seed(&rng, 7);
    for (size_t i = 0; i < l.n; i++)
        l.mem[i] = 0.01f * lk_rng_normal(&rng);
    lk_rm_rf(adapter);
    if (lora_save(&l, adapter, &err)) {
        fprintf(stderr, "bench_merge: %s\n", err.msg);
        return 1;
    }
    size_t adapter_params = l.n;
    lora_release(&l);
    cfg_release(&c);

    // warm the page cache for both contenders
    snprintf(cmd, sizeof cmd, "cat '%s'/*.safetensors > /dev/null", base);
    if (system(cmd) != 0)
        fprintf(stderr, "bench_merge: warming the cache failed (continuing)\n");
    snprintf(cmd, sizeof cmd, "du -sb '%s' | cut -f1", base);
    FILE *p = popen(cmd, "r");
    long long bytes = 0;
    if (p) {
        if (fscanf(p, "%lld", &bytes) != 1)
            bytes = 0;
        pclose(p);
    }

    double t_cp, t_sync, t_merge;
    long rss_cp, rss_merge;
    print_load("before");
    const char *cp[] = { "cp", "-r", base, copy, NULL };
    if (run(cp, &t_cp, &rss_cp)) {
        fprintf(stderr, "bench_merge: cp failed\n");
        return 1;
    }
    snprintf(cmd, sizeof cmd, "%s/model.safetensors", copy);
    const char *sy[] = { "sync", cmd, NULL };
    if (run(sy, &t_sync, &rss)) // fsync of the copied weights (coreutils sync FILE)
        t_sync = 0;
    lk_rm_rf(copy);
    const char *mg[] = { lk, "merge", "--model", base, "--adapter", adapter, "--out", merged, NULL };
    int rc = run(mg, &t_merge, &rss_merge);
    lk_rm_rf(merged);
    if (rc) {
        fprintf(stderr, "bench_merge: lorakit merge failed (exit %d)\n", rc);
        return 1;
    }
    double mib = rss_merge / 1024.0;
    printf("bench-merge: base %.2f GB (qwen2-1.5b, bf16), adapter rank 16 on all projections (%zu params)\n",
           bytes / 1e9, adapter_params);
    printf("  cp -r          %7.2f s   (+ sync of the copy %.2f s = %.2f s)   peak RSS %6.1f MiB\n", t_cp, t_sync,
           t_cp + t_sync, rss_cp / 1024.0);
    printf("  lorakit merge  %7.2f s   peak RSS %6.1f MiB\n", t_merge, mib);
    printf("  ratio merge / cp = %.2f (target <= 2), merge / (cp + sync) = %.2f; RSS target < 1024 MiB: %s\n",
           t_merge / t_cp, t_merge / (t_cp + t_sync), mib < 1024 ? "ok" : "OVER");
    // one GGUF file instead of the folder (f32 writes twice the base's bytes, q8_0 about half)
    int gguf_ok = 1;
    static const char *const dtypes[] = { "f32", "bf16", "q8_0" };
    for (size_t i = 0; i < sizeof dtypes / sizeof dtypes[0]; i++) {
        int r = merge_gguf(lk, base, adapter, wd, dtypes[i], t_cp);
        if (r < 0)
            return 1;
        gguf_ok &= r;
    }
    printf("  GGUF RSS target < 1024 MiB: %s\n", gguf_ok ? "ok" : "OVER");
    print_load("after");
    return (mib < 1024 && t_merge <= 2 * t_cp && gguf_ok) ? 0 : 1;
}
