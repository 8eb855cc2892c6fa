/*
 * test_adamw.c - the optimizer and the learning-rate schedules against their published
 * definitions, computed here in double, independently of libcore/adamw.c:
 *   - torch.optim.AdamW (decoupled weight decay; torch/optim/adamw.py, _single_tensor_adamw):
 *       p *= 1 - lr * wd;  m = b1 m + (1 - b1) g;  v = b2 v + (1 - b2) g^2;
 *       p -= (lr / (1 - b1^t)) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)
 *     with hand-worked cases that tell it from the usual mistakes (decay through the gradient,
 *     eps inside the square root, no bias correction);
 *   - transformers' get_cosine_schedule_with_warmup (num_cycles 0.5), get_linear_schedule_with_warmup
 *     and get_constant_schedule_with_warmup: optimizer step k (1-based) runs at lr * lambda(k - 1),
 *     since LambdaLR starts at lambda(0) and the Trainer steps the scheduler after the optimizer;
 *     numbers worked by hand, the formulas over many (warm-up, total, step), and the rates that
 *     `lorakit train` records for each step in the runs database.
 */
#include "test.h"

#include <math.h>
#include <string.h>

#include "../libcore/adamw.h"
#include "../libcore/lk.h"
#include "../libcore/rdb.h"

#define PI 3.14159265358979323846

// ---- references, from the published definitions ----

/* transformers.optimization's lr lambdas at 0-based scheduler step s. */
static double ref_lambda(enum adamw_schedule sch, long s, long warmup, long total)
{
    if (s < warmup)
        return (double)s / (double)(warmup > 1 ? warmup : 1);
    if (sch == ADAMW_CONSTANT)
        return 1.0;
    double span = (double)(total - warmup > 1 ? total - warmup : 1);
    if (sch == ADAMW_LINEAR)
        return fmax(0.0, (double)(total - s) / span);
    double progress = (double)(s - warmup) / span;
    return fmax(0.0, 0.5 * (1.0 + cos(PI * 0.5 * 2.0 * progress)));
}

/* torch.optim.AdamW, one step on n parameters, in double. */
static void ref_adamw(double *p, const double *g, double *m, double *v, int n, double lr, double wd, double b1,
                      double b2, double eps, long t)
{
    double bc1 = 1.0 - pow(b1, (double)t), bc2 = 1.0 - pow(b2, (double)t);
    for (int i = 0; i < n; i++) {
        p[i] *= 1.0 - lr * wd;
        m[i] = b1 * m[i] + (1.0 - b1) * g[i];
        v[i] = b2 * v[i] + (1.0 - b2) * g[i] * g[i];
        p[i] -= (lr / bc1) * m[i] / (sqrt(v[i]) / sqrt(bc2) + eps);
    }
}

// ---- AdamW ----

TEST(adamw_matches_torch_over_steps)
{
    // 9 parameters of different sizes and signs, a gradient that changes every step (zero,
    // tiny and large entries), 12 steps with weight decay: float against the double reference
    enum { N = 9, STEPS = 12 };
    const struct adamw o = { 0.9f, 0.95f, 1e-8f };
    float p[N], m[N] = { 0 }, v[N] = { 0 }, g[N];
    double rp[N], rm[N] = { 0 }, rv[N] = { 0 }, rg[N];
    struct lk_rng rng;
    lk_rng_seed(&rng, 11);
    for (int i = 0; i < N; i++)
        rp[i] = p[i] = (float)(i - 4) * 0.37f + 0.05f;
    double worst = 0;
    for (long t = 1; t <= STEPS; t++) {
        for (int i = 0; i < N; i++) {
            g[i] = i == 0 ? 0.0f : i == 1 ? 1e-9f * (float)t : (float)(i * (t % 3 - 1)) * lk_rng_normal(&rng);
            rg[i] = g[i];
        }
        float lr = 1e-2f * (float)t / STEPS, wd = 0.1f;
        adamw_step(&o, p, g, m, v, N, lr, wd, t);
        ref_adamw(rp, rg, rm, rv, N, lr, wd, o.beta1, o.beta2, o.eps, t);
        for (int i = 0; i < N; i++) {
            CHECK_NEAR(p[i], rp[i], 1e-5);
            CHECK_NEAR(m[i], rm[i], 1e-5);
            CHECK_NEAR(v[i], rv[i], 1e-5);
            double e = fabs(p[i] - rp[i]) / fmax(1e-3, fabs(rp[i]));
            worst = e > worst ? e : worst;
        }
    }
    fprintf(stderr, "    worst relative parameter error over %d steps: %.2g\n", STEPS, worst);
}

TEST(adamw_hand_worked_steps)
{
    const struct adamw o = { 0.9f, 0.999f, 1e-8f };
    // step 1 from zero moments: m_hat = g, v_hat = g^2, so the step is lr * g / (|g| + eps) after
    // the decay: p = 1 * (1 - 0.1 * 0.01) - 0.1 * 0.5 / (0.5 + 1e-8) = 0.899000002
    float p = 1.0f, g = 0.5f, m = 0, v = 0;
    adamw_step(&o, &p, &g, &m, &v, 1, 0.1f, 0.01f, 1);
    CHECK_NEAR(p, 0.899000002, 1e-7);
    CHECK_NEAR(m, 0.05, 1e-7);    // (1 - 0.9) * 0.5
    CHECK_NEAR(v, 0.00025, 1e-7); // (1 - 0.999) * 0.25
    // bias correction: a constant gradient moves every step by lr (steps 1 to 10), not by the
    // uncorrected (1 - b1^t) / sqrt(1 - b2^t) of it (0.1 / 0.0316 = 3.16 at step 1)
    p = 2.0f, g = -3.0f, m = 0, v = 0;
    for (long t = 1; t <= 10; t++) {
        float before = p;
        adamw_step(&o, &p, &g, &m, &v, 1, 0.01f, 0.0f, t);
        CHECK_NEAR(p - before, 0.01, 1e-5);
    }
    CHECK_NEAR(p, 2.1, 1e-5);
    // decoupled decay: a zero gradient leaves p * (1 - lr * wd) = 3 * (1 - 0.1 * 0.5) = 2.85 (an
    // L2 penalty folded into the gradient would instead move p by about lr = 0.1)
    p = 3.0f, g = 0.0f, m = 0, v = 0;
    adamw_step(&o, &p, &g, &m, &v, 1, 0.1f, 0.5f, 1);
    CHECK_NEAR(p, 2.85, 1e-7);
    // eps after the square root: g = eps = 1e-8 gives a step of lr * 1e-8 / (1e-8 + 1e-8) = lr / 2
    // (inside the root, sqrt(g^2 + eps) = 1e-4 would give lr * 1e-4)
    p = 1.0f, g = 1e-8f, m = 0, v = 0;
    adamw_step(&o, &p, &g, &m, &v, 1, 0.1f, 0.0f, 1);
    CHECK_NEAR(p, 0.95, 1e-6);
}

TEST(adamw_grad_norm_and_schedule_names)
{
    float g[5] = { 3.0f, -4.0f, 0.0f, 12.0f, 0.0f };
    CHECK_NEAR(adamw_grad_norm(g, 5), 13.0, 1e-12); // sqrt(9 + 16 + 144)
    CHECK_NEAR(adamw_grad_norm(g, 0), 0.0, 0);
    CHECK_INT(adamw_schedule_parse("cosine"), ADAMW_COSINE);
    CHECK_INT(adamw_schedule_parse("linear"), ADAMW_LINEAR);
    CHECK_INT(adamw_schedule_parse("constant"), ADAMW_CONSTANT);
    CHECK_INT(adamw_schedule_parse("Cosine"), -1);
    CHECK_INT(adamw_schedule_parse(""), -1);
}

// ---- schedules ----

TEST(adamw_schedules_hand_worked)
{
    // lr 1e-3, 2 warm-up steps, 10 in all. Scheduler steps s = 0, 1, 2, 3, 6, 9 are optimizer
    // steps 1, 2, 3 (warm-up done), 4, 7, 10. Cosine: 0.5 (1 + cos(pi (s - 2) / 8)), with
    // cos(pi / 8) = sqrt(2 + sqrt 2) / 2 = 0.9238795325; linear: (10 - s) / 8.
    static const struct {
        long s;
        double cosine, linear, constant;
    } want[] = {
        { 0, 0.0, 0.0, 0.0 },
        { 1, 5e-4, 5e-4, 5e-4 },
        { 2, 1e-3, 1e-3, 1e-3 },
        { 3, 9.619397662556e-4, 8.75e-4, 1e-3 },
        { 6, 5e-4, 5e-4, 1e-3 },
        { 9, 3.806023374436e-5, 1.25e-4, 1e-3 },
        { 10, 0.0, 0.0, 1e-3 },
    };
    for (size_t i = 0; i < sizeof want / sizeof want[0]; i++) {
        CHECK_NEAR(adamw_lr(ADAMW_COSINE, 1e-3, want[i].s, 2, 10), want[i].cosine, 1e-12);
        CHECK_NEAR(adamw_lr(ADAMW_LINEAR, 1e-3, want[i].s, 2, 10), want[i].linear, 1e-12);
        CHECK_NEAR(adamw_lr(ADAMW_CONSTANT, 1e-3, want[i].s, 2, 10), want[i].constant, 1e-12);
    }
    // no warm-up: the first step runs at the full rate
    CHECK_NEAR(adamw_lr(ADAMW_COSINE, 2e-4, 0, 0, 100), 2e-4, 1e-15);
    CHECK_NEAR(adamw_lr(ADAMW_LINEAR, 2e-4, 0, 0, 100), 2e-4, 1e-15);
    CHECK_NEAR(adamw_lr(ADAMW_LINEAR, 2e-4, 99, 0, 100), 2e-6, 1e-15);
}

TEST(adamw_schedules_match_transformers)
{
    // every step of many (warm-up, total) pairs, warm-up longer than the run included
    static const long pairs[][2] = { { 0, 1 }, { 0, 7 }, { 1, 1 }, { 1, 5 }, { 3, 10 }, { 10, 10 }, { 12, 10 },
                                     { 100, 1000 }, { 7, 1000 } };
    const enum adamw_schedule sch[3] = { ADAMW_COSINE, ADAMW_LINEAR, ADAMW_CONSTANT };
    int n = 0;
    for (size_t k = 0; k < sizeof pairs / sizeof pairs[0]; k++)
        for (int j = 0; j < 3; j++)
            for (long s = 0; s < pairs[k][1]; s++) { // the steps a run of `total` takes
                double got = adamw_lr(sch[j], 3e-4, s, pairs[k][0], pairs[k][1]);
                double want = 3e-4 * ref_lambda(sch[j], s, pairs[k][0], pairs[k][1]);
                CHECK_MSG(fabs(got - want) <= 1e-15, "schedule %d, warmup %ld, total %ld, step %ld: %.17g vs %.17g",
                          j, pairs[k][0], pairs[k][1], s, got, want);
                n++;
            }
    CHECK(n > 6000);
}

TEST(adamw_train_records_the_schedule)
{
    // `lorakit train` records each optimizer step's rate: step k (1-based) ran at lr * lambda(k - 1)
    char model[1024], data[1024];
    snprintf(model, sizeof model, "%s", test_path("m"));
    snprintf(data, sizeof data, "%s", test_path("d.jsonl"));
    CHECK_INT(test_sh("%s init --preset tiny --seed 2 --out '%s'", test_lorakit(), model), 0);
    FILE *f = fopen(data, "w");
    CHECK(f);
    for (int i = 0; i < 8; i++)
        fprintf(f, "{\"input_ids\":[%d,%d,%d,%d,%d,%d]}\n", i, i + 1, i + 2, 7, 8, 9);
    fclose(f);
    static const char *const names[3] = { "cosine", "linear", "constant" };
    for (int j = 0; j < 3; j++) {
        char out[1024], runs_path[1024];
        snprintf(out, sizeof out, "%s/o%d", test_tmpdir(), j);
        snprintf(runs_path, sizeof runs_path, "%s/runs%d.db", test_tmpdir(), j);
        CHECK_MSG(test_sh("%s train --model '%s' --data '%s' --out '%s' --steps 9 --warmup 3 --schedule %s "
                          "--lr 2e-3 --batch 2 --seq 6 --threads 1 --log-every 1 --quiet --runs '%s'",
                          test_lorakit(), model, data, out, names[j], runs_path) == 0,
                  "%s", test_output());
        struct rdb db;
        CHECK_OK(rdb_open_readonly(&db, runs_path, test_err()));
        struct rdb_run *r;
        int nr;
        CHECK_OK(rdb_runs_list(&db, 1, &r, &nr, test_err()));
        struct rdb_step *st = NULL;
        int64_t ns = 0;
        int rc = nr == 1 ? rdb_train_steps_load(&db, r[0].id, -1, &st, &ns, test_err()) : -1;
        rdb_runs_free(r, nr);
        rdb_close(&db, NULL);
        CHECK_INT(rc, 0);
        CHECK_INT(ns, 9);
        for (int64_t k = 0; k < ns; k++) {
            double want = 2e-3 * ref_lambda((enum adamw_schedule)adamw_schedule_parse(names[j]), st[k].step - 1, 3, 9);
            if (!(st[k].step == k + 1 && fabs(st[k].lr - want) <= 1e-12))
                test_fail(__FILE__, __LINE__, "%s: step %lld recorded lr %.17g, want %.17g", names[j],
                          (long long)st[k].step, st[k].lr, want);
        }
        CHECK(st[0].lr == 0.0 && fabs(st[3].lr - 2e-3) <= 1e-15); // step 1 at 0; step 4 ends the warm-up
        lk_free(st);
        if (test_failed())
            return;
    }
}
