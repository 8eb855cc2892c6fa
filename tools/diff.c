/*
 * diff.c - `lorakit diff A B`: what a fine-tune changed, tensor by tensor. Parses flags,
 * runs the comparison engine (libcore/diff.h), prints an aligned table sorted by relative
 * change with per-module and per-layer summaries and a totals line (or --json), and records
 * the run in the runs database when --runs is given. Progress goes to stderr on a terminal.
 */
#include <cJSON.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "../libcore/cfg.h"
#include "../libcore/diff.h"
#include "../libcore/rdb.h"
#include "commands.h"
#include "opts.h"

static const struct cmd_help diff_help = {
    "diff",
    "A B [options]",
    "Compares two folders, each a model (config.json + safetensors) or a PEFT adapter\n"
    "(adapter_config.json), and reports per tensor the change dW = W_B - W_A: shape, |dW|_F,\n"
    "|dW|_F / |W|_F, spectral norm, stable rank, effective rank (Roy & Vetterli 2007), the rank\n"
    "holding each --energy fraction of |dW|_F^2 and the top singular values. Identical tensors\n"
    "are counted as unchanged (no SVD); tensors on one side only are listed.\n"
    "  model vs model: tensors streamed one at a time.\n"
    "  adapter vs adapter (same base): from the factors, never forming out x in; adds the cosine\n"
    "    of the two changes and the subspace similarity phi(i, j) of Hu et al. 2021 (sec. 7) over\n"
    "    their top right-singular vectors (input space; left ones in --json too).\n"
    "  model vs an adapter on it (diff BASE ADAPTER): dW = s*B*A from the factors, plus the\n"
    "    amplification factor |dW|_F / |U_r^T W V_r^T|_F (Hu et al. 2021, Table 7) and the intruder\n"
    "    dimensions of W + dW (Shuttleworth et al. 2024; PEFT's k = 10, eps = 0.5).\n"
    "  adapter vs another model: base + adapter against that model.\n"
    "The adapter's base is --base DIR, else its base_model_name_or_path when that is a local\n"
    "folder. With --runs DB every tensor row and the summary go to the runs database.",
    "  lorakit diff models/base models/tuned --energy 0.5,0.9 --top 3\n"
    "  lorakit diff out/run1 out/run2 --base models/base --json > cmp.json\n"
    "  lorakit diff models/base out/adapter --runs runs.db",
};

struct diff_cli {
    const char *energy, *runs, *base, *name;
    long top, threads, intruders;
    double eps;
    int json;
};

struct progress {
    int tty;
    double last;
};

static void on_progress(void *ctx, int i, int n, const char *tensor)
{
    struct progress *p = ctx;
    if (!p->tty)
        return;
    double now = lk_now();
    if (i == n) {
        fprintf(stderr, "\r\033[K");
        return;
    }
    if (now - p->last < 0.1 && i)
        return;
    p->last = now;
    fprintf(stderr, "\r  diff [%d/%d] %s\033[K", i + 1, n, tensor);
}

// ---- the table ----

static const struct diff_tensor **sorted;

static double sort_key(const struct diff_tensor *t)
{
    return isfinite(t->rel) ? t->rel : -1.0 / (1.0 + (isfinite(t->fro) ? t->fro : 0));
}

static int by_rel(const void *a, const void *b)
{
    double x = sort_key(*(const struct diff_tensor *const *)a);
    double y = sort_key(*(const struct diff_tensor *const *)b);
    return x < y ? 1 : x > y ? -1 : 0;
}

static void fmt_g(char *buf, size_t n, double v)
{
    if (isnan(v))
        snprintf(buf, n, "-");
    else
        snprintf(buf, n, "%.4g", v);
}

static void print_group(const char *label, const struct diff_group *g)
{
    char rel[32], fro[32], mx[32], eff[32];
    fmt_g(rel, sizeof rel, diff_group_rel(g));
    fmt_g(fro, sizeof fro, sqrt(g->fro2));
    fmt_g(mx, sizeof mx, g->n_changed ? g->max_rel : NAN);
    fmt_g(eff, sizeof eff, g->n_eff ? g->eff_rank_sum / g->n_eff : NAN);
    printf("  %-10s %7d %9d %10s %10s %10s %9s\n", label, g->n_changed, g->n_unchanged, fro, rel, mx,
           eff);
}

static void print_table(const struct diff *d, const struct diff_opts *o, const struct diff_summary *s,
                        const char *a, const char *b)
{
    printf("diff (%s): A = %s, B = %s\n", diff_kind_str(d->kind), a, b);
    if (d->base_dir && d->kind != DIFF_MODEL_MODEL)
        printf("base: %s\n", d->base_dir);
    if (d->note[0])
        printf("note: %s\n", d->note);
    int n = 0, w = 6;
    for (int i = 0; i < d->n; i++)
        if (d->t[i].state == DIFF_CHANGED) {
            sorted[n++] = &d->t[i];
            int l = (int)strlen(d->t[i].name);
            w = l > w ? l : w;
        }
    qsort(sorted, (size_t)n, sizeof *sorted, by_rel);
    int pair = d->kind == DIFF_ADAPTER_ADAPTER;
    int base = d->kind == DIFF_BASE_ADAPTER || d->kind == DIFF_MODEL_MODEL;
    if (n) {
        printf("\n%-*s %-12s %10s %10s %10s %7s %6s", w, "tensor", "shape", "|dW|_F", "rel", "sigma1",
               "stable", "eff");
        for (int e = 0; e < o->n_energy; e++) {
            char h[16];
            snprintf(h, sizeof h, "r@%g", o->energy[e]);
            printf(" %6s", h);
        }
        if (pair)
            printf(" %7s %7s %7s", "cos", "phi(1)", "phi(r)");
        if (base)
            printf(" %7s %5s", "amp", "intr");
        if (o->top)
            printf("  top sigma");
        printf("\n");
    }
    for (int i = 0; i < n; i++) {
        const struct diff_tensor *t = sorted[i];
        char shape[32], fro[32], rel[32], sp[32], st[32], ef[32];
        if (t->ndim == 2)
            snprintf(shape, sizeof shape, "%lldx%lld", (long long)t->rows, (long long)t->cols);
        else
            snprintf(shape, sizeof shape, "%lld", (long long)t->rows);
        fmt_g(fro, sizeof fro, t->fro);
        fmt_g(rel, sizeof rel, t->rel);
        fmt_g(sp, sizeof sp, t->spectral);
        fmt_g(st, sizeof st, t->stable_rank);
        fmt_g(ef, sizeof ef, t->eff_rank);
        printf("%-*s %-12s %10s %10s %10s %7s %6s", w, t->name, shape, fro, rel, sp,
               t->num_rank >= 0 ? st : "-", t->num_rank >= 0 ? ef : "-");
        for (int e = 0; e < o->n_energy; e++) {
            if (t->num_rank >= 0)
                printf(" %6d", t->energy_rank[e]);
            else
                printf(" %6s", "-");
        }
        if (pair) {
            char c[32], p1[32] = "-", pr[32] = "-";
            fmt_g(c, sizeof c, t->cosine);
            if (t->phi_right) {
                int last = (t->n_grid_a < t->n_grid_b ? t->n_grid_a : t->n_grid_b) - 1;
                fmt_g(p1, sizeof p1, t->phi_right[0]);
                fmt_g(pr, sizeof pr, t->phi_right[(size_t)last * t->n_grid_b + last]);
            }
            printf(" %7s %7s %7s", c, p1, pr);
        }
        if (base) {
            char am[32], in[16] = "-";
            fmt_g(am, sizeof am, t->amp_rank >= 0 ? t->amplification : NAN);
            if (t->intruders >= 0)
                snprintf(in, sizeof in, "%d", t->intruders);
            printf(" %7s %5s", am, in);
        }
        if (o->top) {
            printf(" ");
            for (int k = 0; k < t->n_top; k++)
                printf(" %.4g", t->top[k]);
        }
        printf("\n");
    }
    printf("\nby module   changed unchanged     |dW|_F        rel    max rel  mean eff\n");
    for (int m = 0; m < CFG_N_MODULES; m++) {
        const struct diff_group *g = &s->module[m];
        if (g->n_changed + g->n_unchanged + g->n_only) {
            char label[16];
            snprintf(label, sizeof label, "%.*s", (int)(strlen(cfg_module_names[m]) - 5), cfg_module_names[m]);
            print_group(label, g);
        }
    }
    if (s->other.n_changed + s->other.n_unchanged + s->other.n_only)
        print_group("other", &s->other);
    if (s->n_layers) {
        printf("\nby layer    changed unchanged     |dW|_F        rel    max rel  mean eff\n");
        for (int l = 0; l < s->n_layers; l++) {
            char label[16];
            snprintf(label, sizeof label, "%d", l);
            print_group(label, &s->layer[l]);
        }
    }
    printf("\n");
    print_group("total", &s->total);
    int only = 0;
    for (int i = 0; i < d->n; i++)
        if (d->t[i].state == DIFF_ONLY_A || d->t[i].state == DIFF_ONLY_B) {
            if (!only++)
                printf("\none side only:\n");
            printf("  %s  %s\n", d->t[i].state == DIFF_ONLY_A ? "only in A" : "only in B", d->t[i].name);
        }
    printf("\n%d tensors: %d changed, %d unchanged, %d on one side only\n", d->n, s->total.n_changed,
           s->total.n_unchanged, s->total.n_only);
}

// ---- the runs database ----

/* Records the run, every tensor and the summary (only with --runs); a database that cannot be
 * written is a warning: the report was printed already. */
static void record(const struct diff_cli *c, const char *a, const char *b, const struct diff *d,
                   const struct diff_opts *o, const struct diff_summary *s)
{
    struct rdb_rec rec;
    cJSON *params = diff_params_obj(d, a, b, o);
    if (rdb_rec_begin(&rec, c->runs, "diff", c->name, a, b, params))
        lk_cli_warn("diff", rec.warning);
    cJSON_Delete(params);
    struct lk_err e = { 0 };
    if (rec.active && diff_rdb_write(&rec.db, rec.run_id, d, o, &e)) {
        rdb_rec_drop(&rec, &e);
        lk_cli_warn("diff", rec.warning);
        return;
    }
    cJSON *sum = diff_summary_obj(d, s);
    if (rdb_rec_finish(&rec, LK_OK, sum))
        lk_cli_warn("diff", rec.warning);
    cJSON_Delete(sum);
}

int cmd_diff(int argc, char **argv)
{
    struct diff_cli c = { .top = 5, .intruders = DIFF_INTRUDER_K_DEFAULT, .eps = DIFF_INTRUDER_EPS_DEFAULT };
    const struct opt opts[] = {
        { "json", OPT_FLAG, &c.json, NULL, "print the whole report as JSON instead of the table" },
        { "energy", OPT_STR, &c.energy, "LIST", "energy fractions for the rank columns (default 0.5,0.9,0.99)" },
        { "top", OPT_INT, &c.top, "K", "top singular values shown per tensor (default 5, at most 64)" },
        { "base", OPT_STR, &c.base, "DIR", "the adapters' base model (default: base_model_name_or_path)" },
        { "intruders", OPT_INT, &c.intruders, "K", "top singular vectors checked for intruders (default 10; 0 skips)" },
        { "intruder-eps", OPT_FLOAT, &c.eps, "E", "max |cos| below which a vector intrudes (default 0.5)" },
        { "runs", OPT_STR, &c.runs, "DB", "record the run and every tensor in this runs database" },
        { "name", OPT_STR, &c.name, "NAME", "run name in the runs database (default none)" },
        { "threads", OPT_INT, &c.threads, "N", "threads (default: all cores; 1 for two adapters)" },
        { 0 },
    };
    struct lk_err err = { 0 };
    const char *pos[2];
    int n_pos = 0, help = 0;
    if (opts_parse(argc, argv, opts, pos, 2, &n_pos, &help, &err))
        return lk_cli_fail("diff", &err);
    if (help) {
        opts_usage(stdout, &diff_help, opts);
        return 0;
    }
    if (n_pos != 2) {
        lk_errf(&err, LK_ERR_USAGE, "want two folders, A and B (see --help)");
        return lk_cli_fail("diff", &err);
    }
    struct diff_opts o;
    diff_opts_init(&o);
    if (c.energy && diff_energy_parse(&o, c.energy, &err))
        return lk_cli_fail("diff", &err);
    if (c.top < 0 || c.top > DIFF_MAX_TOP || c.intruders < 0 || c.intruders > 4096 || !(c.eps > 0) ||
        c.eps > 1 || c.threads < 0) {
        lk_errf(&err, LK_ERR_USAGE, "an option is out of range (see --help)");
        return lk_cli_fail("diff", &err);
    }
    o.top = (int)c.top;
    o.base = c.base;
    o.intruder_k = (int)c.intruders;
    o.intruder_eps = c.eps;
    struct progress pr = { isatty(2), 0 };
    o.progress = on_progress;
    o.progress_ctx = &pr;
    lk_interrupt_install();

    struct diff d;
    struct diff_summary s = { 0 };
    for (int i = 0; i < 2; i++) // an adapter side: keys a newer PEFT wrote (nothing for a model folder)
        lk_cli_adapter_keys("diff", pos[i], NULL);
    if (diff_open(&d, pos[0], pos[1], &o, &err))
        return lk_cli_fail("diff", &err);
    // two adapters: many small factor products, which threads only slow down
    long threads = c.threads ? c.threads : d.kind == DIFF_ADAPTER_ADAPTER ? 1 : 0;
    lk_cli_threads(threads);
    if (diff_compare(&d, &o, &err) || diff_summarize(&d, &s, &err)) {
        diff_close(&d);
        return lk_cli_fail("diff", &err);
    }
    int rc = 0;
    if (c.json) {
        char *j = diff_report_json(&d, pos[0], pos[1], &o, &s);
        if (!j) {
            lk_errf(&err, LK_ERR_NOMEM, "out of memory");
            rc = lk_cli_fail("diff", &err);
        } else {
            printf("%s\n", j);
            lk_free(j);
        }
    } else {
        sorted = lk_malloc(sizeof *sorted * (size_t)(d.n ? d.n : 1));
        if (!sorted) {
            lk_errf(&err, LK_ERR_NOMEM, "out of memory");
            rc = lk_cli_fail("diff", &err);
        } else {
            print_table(&d, &o, &s, pos[0], pos[1]);
            lk_free(sorted);
            sorted = NULL;
        }
    }
    if (!rc)
        record(&c, pos[0], pos[1], &d, &o, &s);
    diff_summary_release(&s);
    diff_close(&d);
    return rc;
}
