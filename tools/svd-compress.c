/*
 * svd-compress.c - `lorakit svd-compress`: a full fine-tune (base + tuned model folders) to a
 * LoRA adapter by truncated SVD of each change, or an adapter to a lower rank; prints what
 * each tensor keeps (table or --json) and records it in the runs database. The work is
 * libcore/compress.c; this file parses flags, shows progress and prints.
 */
#include <cJSON.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "../libcore/compress.h"
#include "../libcore/lora.h"
#include "../libcore/rdb.h"
#include "commands.h"
#include "opts.h"

static const struct cmd_help svdc_help = {
    "svd-compress",
    "--base DIR --tuned DIR --out ADAPTER_DIR (--rank R | --energy E) [options]\n"
    "       lorakit svd-compress --adapter DIR --out DIR (--rank R | --energy E) [options]",
    "Turns a full fine-tune into a PEFT LoRA adapter: for each target linear, the change\n"
    "ΔW = W_tuned - W_base is cut to its top singular values (rank R, or per tensor the smallest\n"
    "rank keeping a fraction E of ‖ΔW‖_F², capped by --max-rank), with B = U·sqrt(S),\n"
    "A = sqrt(S)·Vᵀ and lora_alpha = r (scale 1); per-tensor ranks go to rank_pattern /\n"
    "alpha_pattern. Changed q/k/v biases go to lora_B.bias (lora_bias: true; zeros for the modules\n"
    "without a bias, since PEFT gives every target one: PEFT runs such an adapter but will not\n"
    "merge_and_unload it, lorakit merges it; --no-bias leaves the bias changes out). Changed tensors\n"
    "outside the targets are listed; --keep-other stores embeddings, lm_head and norms as\n"
    "modules_to_save (on a tied base the embedding also as lm_head, with ensure_weight_tying,\n"
    "so that PEFT reproduces the fine-tune). The SVD is exact (LAPACK gesdd) or randomized (Halko et al. 2011),\n"
    "chosen by shape unless forced. The models are read tensor by tensor.\n"
    "With --adapter, re-factors an existing adapter to a lower rank exactly, from its factors\n"
    "(QR of B and Aᵀ, SVD of the small core), never forming the full product.\n"
    "Prints per tensor: shape, rank kept, energy kept, relative Frobenius error, the largest\n"
    "discarded singular value ('~': an estimate, randomized path); the run goes to the runs\n"
    "database (default runs.db next to --out).",
    "  lorakit svd-compress --base Qwen2.5-0.5B --tuned my-full-ft --out my-lora --rank 64\n"
    "  lorakit svd-compress --base base --tuned ft --out ad --energy 0.9 --max-rank 128 --keep-other\n"
    "  lorakit svd-compress --adapter my-lora --out my-lora-r16 --rank 16",
};

struct svdc_args {
    const char *base, *tuned, *adapter, *out, *targets, *runs, *name;
    long rank, max_rank, oversample, power_iters, threads, seed;
    double energy, sv_epsilon;
    int exact, randomized, keep_other, no_bias, json, overwrite, quiet;
};

static void svdc_progress(void *ctx, int done, int total, const char *tensor)
{
    (void)ctx;
    fprintf(stderr, "\r\033[Ksvd-compress: %d/%d %s", done, total, tensor);
    if (done == total)
        fprintf(stderr, "\r\033[K");
    fflush(stderr);
}

/* "4864x896", "896" */
static void shape_str(const struct cmp_tensor *t, char *buf, size_t n)
{
    if (t->kind == CMP_LINEAR || t->cols > 1)
        snprintf(buf, n, "%lldx%lld", (long long)t->rows, (long long)t->cols);
    else
        snprintf(buf, n, "%lld", (long long)t->rows);
}

/* 1234567 -> "1.23M" */
static void count_str(int64_t v, char *buf, size_t n)
{
    if (v >= 1000000000)
        snprintf(buf, n, "%.2fG", v / 1e9);
    else if (v >= 1000000)
        snprintf(buf, n, "%.2fM", v / 1e6);
    else if (v >= 10000)
        snprintf(buf, n, "%.1fk", v / 1e3);
    else
        snprintf(buf, n, "%lld", (long long)v);
}

static void svdc_print_table(const struct cmp_report *r, const char *out, int reduce)
{
    int w = 6;
    for (int i = 0; i < r->n; i++)
        if ((int)strlen(r->t[i].name) > w)
            w = (int)strlen(r->t[i].name);
    // "σ discarded" is 11 columns but 12 bytes: printed as a literal, not through a width
    printf("%-*s  %-12s %5s %8s %9s  σ discarded  %s\n", w, reduce ? "module" : "tensor", "shape", "rank", "energy",
           "rel.err", "svd");
    char shp[48];
    for (int i = 0; i < r->n; i++) {
        const struct cmp_tensor *t = &r->t[i];
        if (t->kind != CMP_LINEAR)
            continue;
        shape_str(t, shp, sizeof shp);
        char sig[24];
        snprintf(sig, sizeof sig, "%.3e%s", t->sigma_next, t->sigma_estimate ? "~" : " ");
        printf("%-*s  %-12s %5d %7.2f%% %9.3e %12s  %s\n", w, t->name, shp, t->rank, 100 * t->energy_kept,
               t->rel_error, sig, t->method == SVD_RANDOMIZED ? "randomized" : "exact");
    }
    int header = 0;
    for (int i = 0; i < r->n; i++) {
        const struct cmp_tensor *t = &r->t[i];
        if (t->kind == CMP_LINEAR)
            continue;
        if (!header++)
            printf("\nchanged outside the low-rank factors:\n");
        shape_str(t, shp, sizeof shp);
        const char *where = t->kind == CMP_BIAS && t->stored ? "in lora_B.bias"
                            : t->kind == CMP_BIAS ? "LEFT OUT (--no-bias): the adapter's bias is off by this"
                            : t->stored        ? "kept (modules_to_save)"
                            : t->layer >= 0    ? "LEFT OUT (not in --targets)"
                                               : "LEFT OUT (use --keep-other)";
        printf("%-*s  %-12s rel. change %.3e  %s\n", w, t->name, shp, t->base_fro > 0 ? t->fro / t->base_fro : 0,
               where);
    }
    char a[32], d[32], in[32];
    count_str(r->adapter_params, a, sizeof a);
    count_str(r->delta_params, d, sizeof d);
    printf("\ntotal: %d %s, adapter %s parameters vs %s in the full delta (%.2f%%)", r->n_linear,
           reduce ? "modules" : "linears", a, d, r->delta_params ? 100.0 * r->adapter_params / r->delta_params : 0);
    if (reduce) {
        count_str(r->input_params, in, sizeof in);
        printf(", input adapter %s", in);
    }
    printf("\nenergy kept overall %.3f%% of Σ‖ΔW‖_F²; r %d, %d module%s in rank_pattern, lora_bias %s\n",
           r->energy_total > 0 ? 100 * r->energy_kept / r->energy_total : 100.0, r->rank_common,
           r->n_rank_pattern, r->n_rank_pattern == 1 ? "" : "s", r->lora_bias ? "true" : "false");
    if (r->n_left_out)
        printf("the adapter leaves out %d changed tensor%s (listed above)\n", r->n_left_out,
               r->n_left_out == 1 ? "" : "s");
    if (r->lora_bias && !reduce)
        printf("note: the q/k/v biases changed, so the adapter sets lora_bias. PEFT runs it, but its\n"
               "merge_and_unload refuses lora_bias on a layer without a bias (PEFT gives every target a\n"
               "lora_B.bias: o_proj and the MLP projections get zeros); lorakit merge accepts it.\n"
               "--no-bias leaves the bias changes out (the cost is listed per tensor above) for an adapter\n"
               "every tool can merge.\n");
    printf("wrote %s in %.1f s\n", out, r->seconds);
}

/* One tensor_stats row per tensor of the report; a failed write stops recording (warning). */
static void svdc_record(struct rdb_rec *rec, const struct cmp_report *r)
{
    struct lk_err e = { 0 };
    for (int i = 0; i < r->n && rec->active && !e.code; i++) {
        const struct cmp_tensor *t = &r->t[i];
        cJSON *x = cJSON_CreateObject();
        cJSON_AddStringToObject(x, "kind", t->kind == CMP_LINEAR ? "linear" : t->kind == CMP_BIAS ? "bias" : "other");
        cJSON_AddNumberToObject(x, "energy_kept", lk_cli_round(t->energy_kept, "%.9g"));
        cJSON_AddBoolToObject(x, "stored", t->stored);
        cJSON_AddStringToObject(x, "method", t->method == SVD_RANDOMIZED ? "randomized" : "exact");
        cJSON_AddNumberToObject(x, "sigma_next", isfinite(t->sigma_next) ? lk_cli_round(t->sigma_next, "%.9g") : 0.0);
        cJSON_AddBoolToObject(x, "sigma_next_estimate", t->sigma_estimate);
        cJSON_AddNumberToObject(x, "seconds", lk_cli_round(t->seconds, "%.4f"));
        char *extra = cJSON_PrintUnformatted(x);
        cJSON_Delete(x);
        struct rdb_tensor_stat s = {
            .tensor = t->name,
            .rows = t->rows,
            .cols = t->cols,
            .rank = t->kind == CMP_LINEAR ? t->rank : -1,
            .fro_norm = t->fro,
            .rel_change = t->base_fro > 0 ? t->fro / t->base_fro : NAN,
            .eff_rank = NAN,
            .energy_json = NULL,
            .rel_error = t->rel_error,
            .extra_json = extra,
        };
        if (!extra)
            lk_errf(&e, LK_ERR_NOMEM, "out of memory");
        else
            rdb_tensor_stat(&rec->db, rec->run_id, &s, &e);
        cJSON_free(extra);
    }
    if (e.code) {
        rdb_rec_drop(rec, &e);
        lk_cli_warn("svd-compress", rec->warning);
    }
}

static cJSON *svdc_params(const struct svdc_args *a)
{
    cJSON *j = cJSON_CreateObject();
    cJSON_AddStringToObject(j, "mode", a->adapter ? "adapter" : "models");
    cJSON_AddNumberToObject(j, "rank", (double)a->rank);
    cJSON_AddNumberToObject(j, "energy", lk_cli_round(a->energy, "%g"));
    cJSON_AddNumberToObject(j, "max_rank", (double)a->max_rank);
    cJSON_AddNumberToObject(j, "sv_epsilon", lk_cli_round(a->sv_epsilon, "%g"));
    cJSON_AddStringToObject(j, "targets", a->targets ? a->targets : "all");
    cJSON_AddStringToObject(j, "method", a->exact ? "exact" : a->randomized ? "randomized" : "auto");
    cJSON_AddNumberToObject(j, "oversample", (double)a->oversample);
    cJSON_AddNumberToObject(j, "power_iters", (double)a->power_iters);
    cJSON_AddNumberToObject(j, "seed", (double)a->seed);
    cJSON_AddBoolToObject(j, "keep_other", a->keep_other);
    cJSON_AddBoolToObject(j, "no_bias", a->no_bias);
    return j;
}

/* The flags, checked together, into o. */
static int svdc_opts_from_args(const struct svdc_args *a, struct cmp_opts *o, struct lk_err *err)
{
    const char *bad = NULL;
    if (!a->out)
        bad = "missing --out DIR (see --help)";
    else if (a->adapter ? (a->base || a->tuned || a->keep_other || a->no_bias) : (!a->base || !a->tuned))
        bad = a->adapter ? "--adapter does not combine with --base, --tuned, --keep-other or --no-bias"
                         : "give --base DIR and --tuned DIR, or --adapter DIR (see --help)";
    else if ((a->rank != 0) == (a->energy != 0))
        bad = "give exactly one of --rank R and --energy E";
    else if (a->rank < 0 || a->rank > 1000000)
        bad = "option '--rank' must be a positive integer";
    else if (a->energy != 0 && !(a->energy > 0 && a->energy <= 1))
        bad = "option '--energy' must be in (0, 1], e.g. 0.9";
    else if (a->max_rank < 0 || a->max_rank > 1000000)
        bad = "option '--max-rank' must be a positive integer";
    else if (a->sv_epsilon < 0 || !isfinite(a->sv_epsilon))
        bad = "option '--sv-epsilon' must be a non-negative number";
    else if (a->exact && a->randomized)
        bad = "give at most one of --exact and --randomized";
    else if (a->oversample < 0 || a->oversample > 10000 || a->power_iters < 0 || a->power_iters > 100)
        bad = "options '--oversample' and '--power-iters' must be small non-negative integers";
    else if (a->seed < 0 || a->threads < 0 || a->threads > 4096)
        bad = "options '--seed' and '--threads' must be non-negative";
    if (bad)
        return lk_errf(err, LK_ERR_USAGE, "%s", bad);
    cmp_opts_init(o);
    o->rank = (int)a->rank;
    o->energy = a->energy;
    o->max_rank = (int)a->max_rank;
    o->sv_epsilon = a->sv_epsilon;
    o->keep_other = a->keep_other;
    o->no_bias = a->no_bias;
    o->overwrite = a->overwrite;
    o->svd.method = a->exact ? SVD_EXACT : a->randomized ? SVD_RANDOMIZED : SVD_AUTO;
    o->svd.oversample = (int)a->oversample;
    o->svd.power_iters = (int)a->power_iters;
    o->svd.seed = (uint64_t)a->seed;
    if (a->targets)
        return lora_targets_parse(a->targets, &o->targets, err);
    return LK_OK;
}

/* The compression with its run record (the default database is runs.db next to --out; one
 * that cannot be written is a warning, never a failed compression). */
static int svdc_run(const struct svdc_args *a, const struct cmp_opts *o, struct cmp_report *rep, struct lk_err *err)
{
    struct rdb_rec rec;
    char *runs = a->runs ? NULL : rdb_default_path(a->out);
    cJSON *params = svdc_params(a);
    if (rdb_rec_begin(&rec, a->runs ? a->runs : runs, "svd-compress", a->name ? a->name : a->out,
                      a->adapter ? a->adapter : a->base, a->adapter ? NULL : a->tuned, params))
        lk_cli_warn("svd-compress", rec.warning);
    cJSON_Delete(params);
    lk_free(runs);
    if (a->adapter)
        lk_cli_adapter_keys("svd-compress", a->adapter, NULL);
    int rc = a->adapter ? cmp_adapter(a->adapter, a->out, o, rep, err) : cmp_models(a->base, a->tuned, a->out, o, rep, err);
    cJSON *sum = NULL;
    if (!rc) {
        svdc_record(&rec, rep);
        char *txt = cmp_report_json(rep, 0);
        sum = txt ? cJSON_Parse(txt) : NULL;
        lk_free(txt);
    }
    if (rdb_rec_finish(&rec, rc, sum))
        lk_cli_warn("svd-compress", rec.warning);
    cJSON_Delete(sum);
    return rc;
}

int cmd_svd_compress(int argc, char **argv)
{
    struct svdc_args a;
    memset(&a, 0, sizeof a);
    a.oversample = SVD_OVERSAMPLE_DEFAULT;
    a.power_iters = SVD_POWER_ITERS_DEFAULT;
    int help = 0;
    struct lk_err err = { 0 };
    const struct opt opts[] = {
        { "base", OPT_STR, &a.base, "DIR", "base model folder" },
        { "tuned", OPT_STR, &a.tuned, "DIR", "fully fine-tuned model folder (same architecture)" },
        { "adapter", OPT_STR, &a.adapter, "DIR", "reduce the rank of this adapter instead" },
        { "out", OPT_STR, &a.out, "DIR", "output adapter folder (written atomically)" },
        { "rank", OPT_INT, &a.rank, "R", "keep rank R on every tensor" },
        { "energy", OPT_FLOAT, &a.energy, "E", "per tensor, the smallest rank keeping a fraction E of ‖ΔW‖_F²" },
        { "max-rank", OPT_INT, &a.max_rank, "R", "cap every rank at R (default: no cap)" },
        { "sv-epsilon", OPT_FLOAT, &a.sv_epsilon, "EPS", "drop singular values <= EPS (default 0: none)" },
        { "targets", OPT_STR, &a.targets, "LIST", "modules to compress, e.g. q_proj,v_proj (default all)" },
        { "exact", OPT_FLAG, &a.exact, NULL, "always LAPACK gesdd" },
        { "randomized", OPT_FLAG, &a.randomized, NULL, "always the randomized SVD (default: by shape)" },
        { "oversample", OPT_INT, &a.oversample, "P", "randomized: extra sketch columns (default 10)" },
        { "power-iters", OPT_INT, &a.power_iters, "Q", "randomized: power iterations (default 2)" },
        { "seed", OPT_INT, &a.seed, "S", "seed of the randomized sketches (default 0)" },
        { "threads", OPT_INT, &a.threads, "N", "threads (default: all cores)" },
        { "keep-other", OPT_FLAG, &a.keep_other, NULL, "store changed embeddings, lm_head, norms as modules_to_save" },
        { "no-bias", OPT_FLAG, &a.no_bias, NULL, "leave q/k/v bias changes out: no lora_bias, mergeable by PEFT too" },
        { "json", OPT_FLAG, &a.json, NULL, "print the report as JSON" },
        { "runs", OPT_STR, &a.runs, "DB", "runs database (default runs.db next to --out)" },
        { "name", OPT_STR, &a.name, "NAME", "run name in the runs database (default: --out)" },
        { "overwrite", OPT_FLAG, &a.overwrite, NULL, "replace an existing non-empty --out folder" },
        { "quiet", OPT_FLAG, &a.quiet, NULL, "no progress output" },
        { 0 },
    };
    if (opts_parse(argc, argv, opts, NULL, 0, NULL, &help, &err))
        return lk_cli_fail("svd-compress", &err);
    if (help) {
        opts_usage(stdout, &svdc_help, opts);
        return 0;
    }
    struct cmp_opts o;
    if (svdc_opts_from_args(&a, &o, &err))
        return lk_cli_fail("svd-compress", &err);
    if (!a.quiet && isatty(2))
        o.progress = svdc_progress;
    lk_cli_threads(a.threads);
    lk_interrupt_install();
    struct cmp_report rep;
    if (svdc_run(&a, &o, &rep, &err)) {
        if (o.progress)
            fprintf(stderr, "\r\033[K");
        cmp_report_release(&rep);
        return lk_cli_fail("svd-compress", &err);
    }
    if (a.json) {
        char *js = cmp_report_json(&rep, 1);
        if (js)
            printf("%s\n", js);
        lk_free(js);
    } else
        svdc_print_table(&rep, a.out, a.adapter != NULL);
    cmp_report_release(&rep);
    return 0;
}
