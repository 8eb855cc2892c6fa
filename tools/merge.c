/*
 * merge.c - `lorakit merge`: fold one or more LoRA adapters into a model's weights (a plain
 * Hugging Face folder any runtime loads), or combine adapters into one PEFT adapter
 * (--into-adapter, with --portable for runtimes that ignore rsLoRA and per-module alpha).
 * Parses flags, calls merge_run (libcore/merge.h), prints, records the run.
 */
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "../libcore/merge.h"
#include "../libcore/rdb.h"
#include "../libcore/tensor.h"
#include "commands.h"
#include "opts.h"

static const struct cmd_help merge_help = {
    "merge",
    "--model DIR --adapter DIR[:WEIGHT] [--adapter DIR[:WEIGHT] ...] --out DIR [options]",
    "Folds LoRA adapters into the base weights and writes a standalone model folder (same\n"
    "shards and index as the base; config.json, generation_config.json and tokenizer files\n"
    "copied). Tensors stream one at a time from the mapped base: each changed tensor is\n"
    "computed in float32 (W + sum w_i s_i B_i A_i) and rounded once to the output dtype;\n"
    "untouched tensors are copied byte for byte. Several adapters combine by --method:\n"
    "linear / cat (weighted sum of the changes, exact), svd (the sum truncated to --rank),\n"
    "ties (trim to --density by magnitude, elect signs, disjoint mean), dare_linear and\n"
    "dare_ties (random drop at 1 - density with rescale, --seed). DoRA adapters merge with\n"
    "their magnitudes; lora_B.bias merges into the bias; modules_to_save tensors replace the\n"
    "base's. If an adapter changes embed_tokens or lm_head of a tied model, the output is\n"
    "untied (lm_head.weight written, tie_word_embeddings false) and the command says so.\n"
    "--subtract removes a merged adapter again (W - s B A). --into-adapter writes the\n"
    "combination (cat or svd) as one PEFT adapter instead, the base untouched; add\n"
    "--portable for an adapter with the scale folded into B, alpha = r, one rank for all\n"
    "modules and no rank/alpha patterns (a single adapter with --into-adapter --portable is\n"
    "the portable export). --verify runs a probe batch through base+adapters and through\n"
    "the merged output and prints the largest logit difference next to the difference\n"
    "that rounding the exact merged weights to the output dtype alone causes.",
    "  lorakit merge --model qwen-0.5b --adapter runs/med --out qwen-med --verify\n"
    "  lorakit merge --model base --adapter a:0.7 --adapter b:0.3 --method ties --density 0.5 --out ab\n"
    "  lorakit merge --model base --adapter a --adapter b --method cat --into-adapter --portable --out ab-lora\n"
    "  lorakit merge --model qwen-med --adapter runs/med --subtract --out qwen-again",
};

/* "DIR" or "DIR:WEIGHT" (the suffix after the last ':' counts when it is a number). */
static void parse_adapter(const char *s, struct merge_adapter *a, char **owned)
{
    a->weight = 1.0;
    a->dir = s;
    const char *colon = strrchr(s, ':');
    if (!colon || !colon[1])
        return;
    char *end;
    errno = 0;
    double w = strtod(colon + 1, &end);
    if (errno || *end)
        return;
    size_t n = (size_t)(colon - s);
    *owned = lk_malloc(n + 1);
    if (!*owned)
        return;
    memcpy(*owned, s, n);
    (*owned)[n] = 0;
    a->dir = *owned;
    a->weight = w;
}

static void progress(void *ctx, int done, int total, const char *name)
{
    (void)ctx;
    fprintf(stderr, "\rmerge: %d/%d %-60.60s", done, total, name);
    if (done == total)
        fprintf(stderr, "\n");
}

static const char *dtype_label(int d)
{
    return d < 0 ? "as the base" : d == TENSOR_BF16 ? "bf16" : d == TENSOR_F16 ? "f16" : "f32";
}

/* JSON string contents (escaped) into f. */
static void json_s(FILE *f, const char *s)
{
    fputc('"', f);
    for (; *s; s++) {
        if (*s == '"' || *s == '\\')
            fprintf(f, "\\%c", *s);
        else if ((unsigned char)*s < 0x20)
            fprintf(f, "\\u%04x", *s);
        else
            fputc(*s, f);
    }
    fputc('"', f);
}

static char *params_json(const struct merge_opts *o)
{
    char *buf = NULL;
    size_t len = 0;
    FILE *f = open_memstream(&buf, &len);
    if (!f)
        return NULL;
    fprintf(f, "{\"model\": ");
    json_s(f, o->model);
    fprintf(f, ", \"out\": ");
    json_s(f, o->out);
    fprintf(f, ", \"adapters\": [");
    for (int i = 0; i < o->n_adapters; i++) {
        fprintf(f, "%s{\"dir\": ", i ? ", " : "");
        json_s(f, o->adapters[i].dir);
        fprintf(f, ", \"weight\": %.17g}", o->adapters[i].weight);
    }
    fprintf(f, "], \"method\": \"%s\", \"density\": %.17g, \"rank\": %d, \"dtype\": \"%s\", \"seed\": %llu, "
               "\"subtract\": %s, \"into_adapter\": %s, \"portable\": %s, \"verify\": %s}",
            merge_method_name(o->method), o->density, o->rank, dtype_label(o->dtype),
            (unsigned long long)o->seed, o->subtract ? "true" : "false", o->into_adapter ? "true" : "false",
            o->portable ? "true" : "false", o->verify ? "true" : "false");
    fclose(f);
    return buf;
}

static char *summary_json(const struct merge_report *r)
{
    char *buf = NULL;
    size_t len = 0;
    FILE *f = open_memstream(&buf, &len);
    if (!f)
        return NULL;
    fprintf(f, "{\"tensors\": %d, \"changed\": %d, \"copied\": %d, \"shards\": %d, \"untied\": %s, "
               "\"rank\": %d, \"seconds\": %.3f",
            r->n_tensors, r->n_changed, r->n_copied, r->n_shards, r->untied ? "true" : "false", r->rank,
            r->seconds);
    if (r->verified) {
        fprintf(f, ", \"verify\": {\"reference\": ");
        json_s(f, r->verify_ref);
        fprintf(f, ", \"max_abs\": %.9g, \"max_rel\": %.9g, \"rounding_max_abs\": %.9g, "
                   "\"rounding_max_rel\": %.9g}",
                r->verify_max_abs, r->verify_max_rel, r->round_max_abs, r->round_max_rel);
    }
    fprintf(f, "}");
    fclose(f);
    return buf;
}

int cmd_merge(int argc, char **argv)
{
    const char *model = NULL, *out = NULL, *method_s = NULL, *dtype_s = NULL, *runs = NULL;
    struct opt_list adapters = { 0 };
    double density = 0;
    long rank = 0, seed = 0;
    int verify = 0, into = 0, portable = 0, subtract = 0, overwrite = 0, help = 0, has_density = 0;
    struct lk_err err = { 0 };
    const struct opt opts[] = {
        { "model", OPT_STR, &model, "DIR", "base model folder (config.json + safetensors)" },
        { "adapter", OPT_LIST, &adapters, "DIR[:W]", "PEFT adapter folder, optional weight (default 1); repeatable" },
        { "out", OPT_STR, &out, "DIR", "output folder (a model, or an adapter with --into-adapter)" },
        { "method", OPT_STR, &method_s, "M", "linear (default), cat, svd, ties, dare_linear, dare_ties" },
        { "density", OPT_FLOAT, &density, "D", "ties/dare: fraction of each change kept, in (0, 1]" },
        { "rank", OPT_INT, &rank, "R", "svd: rank of the truncation (default: the largest adapter rank)" },
        { "dtype", OPT_STR, &dtype_s, "T", "auto (the base's, default), bf16, f16 or f32" },
        { "seed", OPT_INT, &seed, "S", "dare: seed of the random drop (default 0)" },
        { "verify", OPT_FLAG, &verify, NULL, "compare logits of the output with base+adapters" },
        { "into-adapter", OPT_FLAG, &into, NULL, "write one PEFT adapter (cat, svd), not a model" },
        { "portable", OPT_FLAG, &portable, NULL, "with --into-adapter: scale in B, alpha = r, no patterns" },
        { "subtract", OPT_FLAG, &subtract, NULL, "remove the adapters from a merged model (W - s B A)" },
        { "overwrite", OPT_FLAG, &overwrite, NULL, "replace an existing --out" },
        { "runs", OPT_STR, &runs, "DB", "record the merge in this runs database" },
        { 0 },
    };
    if (opts_parse(argc, argv, opts, NULL, 0, NULL, &help, &err))
        return lk_cli_fail("merge", &err);
    if (help) {
        opts_usage(stdout, &merge_help, opts);
        return 0;
    }
    for (int i = 1; i < argc; i++)
        has_density |= !strcmp(argv[i], "--density") || !strncmp(argv[i], "--density=", 10);
    struct merge_opts o;
    memset(&o, 0, sizeof o);
    o.model = model;
    o.out = out;
    o.dtype = -1;
    o.verify = verify;
    o.into_adapter = into;
    o.portable = portable;
    o.subtract = subtract;
    o.overwrite = overwrite;
    char *owned[MERGE_MAX_ADAPTERS] = { 0 };
    int rc = LK_OK;
    if (!model || !out || !adapters.n)
        rc = lk_errf(&err, LK_ERR_USAGE, "--model, --adapter and --out are required (see --help)");
    else if (adapters.n > MERGE_MAX_ADAPTERS)
        rc = lk_errf(&err, LK_ERR_USAGE, "at most %d adapters", MERGE_MAX_ADAPTERS);
    else if (method_s && merge_method_parse(method_s) < 0)
        rc = lk_errf(&err, LK_ERR_USAGE, "unknown --method '%s' (linear, cat, svd, ties, dare_linear, dare_ties)",
                     method_s);
    else if (dtype_s && strcmp(dtype_s, "auto") && strcmp(dtype_s, "bf16") && strcmp(dtype_s, "f16") &&
             strcmp(dtype_s, "f32"))
        rc = lk_errf(&err, LK_ERR_USAGE, "option '--dtype' wants auto, bf16, f16 or f32, got '%s'", dtype_s);
    else if (has_density && !(density > 0 && density <= 1))
        rc = lk_errf(&err, LK_ERR_USAGE, "option '--density' must be in (0, 1]");
    else if (rank < 0 || rank > 1 << 20 || seed < 0)
        rc = lk_errf(&err, LK_ERR_USAGE, "--rank and --seed must be non-negative");
    if (rc)
        return lk_cli_fail("merge", &err);
    o.method = method_s ? (enum merge_method)merge_method_parse(method_s) : MERGE_LINEAR;
    o.density = has_density ? density : 0;
    o.rank = (int)rank;
    o.seed = (uint64_t)seed;
    if (dtype_s && strcmp(dtype_s, "auto"))
        o.dtype = !strcmp(dtype_s, "bf16") ? TENSOR_BF16 : !strcmp(dtype_s, "f16") ? TENSOR_F16 : TENSOR_F32;
    o.n_adapters = adapters.n;
    for (int i = 0; i < adapters.n; i++)
        parse_adapter(adapters.v[i], &o.adapters[i], &owned[i]);
    if (isatty(2))
        o.progress = progress;
    lk_interrupt_install();

    struct rdb db = { 0 };
    int64_t run_id = -1;
    if (runs) {
        char *params = params_json(&o);
        struct lk_err e2 = { 0 };
        if (rdb_open(&db, runs, &e2) || rdb_run_begin(&db, "merge", out, model, NULL, params, &run_id, &e2)) {
            free(params);
            rdb_close(&db, NULL);
            for (int i = 0; i < MERGE_MAX_ADAPTERS; i++)
                lk_free(owned[i]);
            return lk_cli_fail("merge", &e2);
        }
        free(params);
    }
    struct merge_report rep;
    rc = merge_run(&o, &rep, &err);
    if (runs) {
        char *sum = rc ? NULL : summary_json(&rep);
        rdb_run_finish(&db, run_id, rc == LK_OK ? RDB_DONE : rc == LK_ERR_INTERRUPTED ? RDB_INTERRUPTED : RDB_FAILED,
                       sum, NULL);
        free(sum);
        rdb_close(&db, NULL);
    }
    for (int i = 0; i < MERGE_MAX_ADAPTERS; i++)
        lk_free(owned[i]);
    if (rc)
        return lk_cli_fail("merge", &err);
    if (rep.untied)
        fprintf(stderr, "merge: note: an adapter changes embed_tokens or lm_head of a model with tied "
                        "embeddings: wrote lm_head.weight and set tie_word_embeddings false\n");
    if (o.into_adapter)
        printf("wrote %s: one adapter (%s of %d), r %d over %d modules%s\n", out, merge_method_name(o.method),
               o.n_adapters, rep.rank, rep.n_tensors, o.portable ? ", portable (alpha = r, no patterns)" : "");
    else
        printf("wrote %s: %d tensors (%d merged in float32, %d copied), %d shard%s, dtype %s, %.2f s\n", out,
               rep.n_tensors, rep.n_changed, rep.n_copied, rep.n_shards, rep.n_shards == 1 ? "" : "s",
               dtype_label(rep.out_dtype), rep.seconds);
    if (rep.verified)
        printf("verify: reference %s: max |dlogit| %.3g (relative %.3g); rounding the exact merge to "
               "the output dtype alone: %.3g (relative %.3g)\n",
               rep.verify_ref, rep.verify_max_abs, rep.verify_max_rel, rep.round_max_abs, rep.round_max_rel);
    return 0;
}
