/*
 * bench_diff.c - `lorakit diff` of two adapters on the Qwen2.5-0.5B shape: two random rank-16
 * adapters on all seven projections of every layer (168 adapted tensors), their base given by
 * config.json alone (the preset `lorakit init --preset qwen2.5-0.5b` writes; no weights are
 * needed to compare two adapters). Measures:
 *   1. the command as a user runs it (`lorakit diff A1 A2 --json`): wall time and the child's
 *      peak RSS, against the memory one out x in float matrix per adapted tensor would take;
 *   2. in process, with lk_malloc's size probe on: the largest single allocation made while
 *      each tensor is compared, against that tensor's out x in floats.
 * Targets: finishes in under 30 s, peak RSS under a quarter of the summed out x in matrices,
 * and no allocation while comparing a tensor reaches its out x in size. Exit 1 on a miss.
 * Usage: bench_diff LORAKIT_BINARY [WORKDIR]
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

#include "../libcore/cfg.h"
#include "../libcore/diff.h"
#include "../libcore/lk.h"
#include "../libcore/lora.h"

#define RANK 16

static void die(const char *what, const struct lk_err *err)
{
    fprintf(stderr, "bench_diff: %s: %s\n", what, err ? err->msg : "failed");
    exit(1);
}

static void make_adapter(const struct cfg *c, const char *base, const char *dir, uint64_t seed)
{
    struct lk_err err = { 0 };
    struct lora_config lc;
    lora_config_default(&lc);
    lc.r = RANK;
    lc.alpha = 2 * RANK;
    snprintf(lc.base_model, sizeof lc.base_model, "%s", base);
    struct lora l;
    if (lora_init(&l, &lc, c, &err))
        die("lora_init", &err);
    struct lk_rng rng;
    lk_rng_seed(&rng, seed);
    for (size_t i = 0; i < l.n; i++)
        l.mem[i] = 0.02f * lk_rng_normal(&rng);
    if (lora_save(&l, dir, &err))
        die(dir, &err);
    lora_release(&l);
}

/* Per-tensor allocation high-water marks, from the progress callback. */
struct probe {
    const struct diff *d;
    int worst_i;
    double worst_ratio;
    size_t worst_bytes;
};

static void on_tensor(void *ctx, int i, int n, const char *name)
{
    (void)n;
    (void)name;
    struct probe *p = ctx;
    if (i > 0) {
        const struct diff_tensor *t = &p->d->t[i - 1];
        double full = (double)t->rows * (double)t->cols * sizeof(float);
        double ratio = (double)lk_alloc_largest / full;
        if (t->state == DIFF_CHANGED && t->ndim == 2 && ratio > p->worst_ratio) {
            p->worst_ratio = ratio;
            p->worst_i = i - 1;
            p->worst_bytes = lk_alloc_largest;
        }
    }
    lk_alloc_largest = 0;
}

int main(int argc, char **argv)
{
    if (argc < 2) {
        fprintf(stderr, "usage: bench_diff LORAKIT_BINARY [WORKDIR]\n");
        return 2;
    }
    const char *bin = argv[1];
    const char *work = argc > 2 ? argv[2] : "build/bench-diff";
    struct lk_err err = { 0 };
    lk_rm_rf(work);
    char base[512], a1[512], a2[512], cfgp[600], cmd[2048];
    snprintf(base, sizeof base, "%s/base", work);
    snprintf(a1, sizeof a1, "%s/a1", work);
    snprintf(a2, sizeof a2, "%s/a2", work);
    snprintf(cfgp, sizeof cfgp, "%s/config.json", base);
    if (lk_mkdir_p(base, &err))
        die(base, &err);
    struct cfg c;
    if (cfg_preset(&c, "qwen2.5-0.5b", &err) || cfg_save(&c, cfgp, &err))
        die("config", &err);
    make_adapter(&c, base, a1, 1);
    make_adapter(&c, base, a2, 2);

    // what forming ΔW would take: one out x in float matrix per adapted tensor
    double sum_full = 0, max_full = 0;
    for (int m = 0; m < CFG_N_MODULES; m++) {
        int64_t r, k;
        cfg_module_shape(&c, (enum cfg_module)m, &r, &k);
        double b = (double)r * (double)k * sizeof(float);
        sum_full += b * c.num_hidden_layers;
        max_full = b > max_full ? b : max_full;
    }
    int n_adapted = CFG_N_MODULES * c.num_hidden_layers;

    // 1. the command
    snprintf(cmd, sizeof cmd, "%s diff %s %s --json > %s/out.json", bin, a1, a2, work);
    double t0 = lk_now();
    int st = system(cmd);
    double wall = lk_now() - t0;
    if (st != 0) {
        fprintf(stderr, "bench_diff: '%s' failed (status %d)\n", cmd, st);
        return 1;
    }
    struct rusage ru;
    getrusage(RUSAGE_CHILDREN, &ru);
    double rss = (double)ru.ru_maxrss * 1024.0;

    // 2. in process, with the allocation probe
    struct diff_opts o;
    diff_opts_init(&o);
    struct diff d;
    if (diff_open(&d, a1, a2, &o, &err))
        die("diff_open", &err);
    struct probe pr = { &d, -1, 0, 0 };
    o.progress = on_tensor;
    o.progress_ctx = &pr;
    lk_alloc_limit = SIZE_MAX; // record only
    t0 = lk_now();
    int rc = diff_compare(&d, &o, &err);
    double inproc = lk_now() - t0;
    lk_alloc_limit = 0;
    if (rc)
        die("diff_compare", &err);
    int changed = 0, factors = 0;
    for (int i = 0; i < d.n; i++) {
        changed += d.t[i].state == DIFF_CHANGED;
        factors += d.t[i].from_factors;
    }

    printf("bench-diff: adapter vs adapter, Qwen2.5-0.5B shape (%d layers, hidden %d, intermediate %d), "
           "rank %d on all 7 projections\n", c.num_hidden_layers, c.hidden_size, c.intermediate_size, RANK);
    printf("  adapted tensors               %d (%d changed, %d from factors)\n", n_adapted, changed, factors);
    printf("  lorakit diff A1 A2 --json     %.2f s wall, peak RSS %.1f MB\n", wall, rss / 1e6);
    printf("  out x in floats, all tensors  %.1f MB (largest one %.1f MB)\n", sum_full / 1e6, max_full / 1e6);
    printf("  peak RSS / all out x in       %.3f\n", rss / sum_full);
    printf("  in process: compare %.2f s; largest allocation while comparing a tensor = %.4f x its "
           "out x in (%s, %zu bytes)\n", inproc, pr.worst_ratio, pr.worst_i >= 0 ? d.t[pr.worst_i].name : "-",
           pr.worst_bytes);
    int ok = wall < 30 && rss < sum_full / 4 && pr.worst_ratio < 1 && factors == n_adapted;
    printf("  targets (< 30 s, RSS < 1/4 of all out x in, no allocation >= out x in): %s\n",
           ok ? "met" : "MISSED");
    diff_close(&d);
    cfg_release(&c);
    lk_rm_rf(work);
    return ok ? 0 : 1;
}
