/*
 * merge.c - `lorakit merge`: fold one or more LoRA adapters into a model's weights (a plain
 * Hugging Face folder any runtime loads, or one GGUF file for llama.cpp / Ollama when --out
 * ends in .gguf), or combine adapters into one PEFT adapter (--into-adapter, with --portable
 * for runtimes that ignore rsLoRA and per-module alpha).
 * Parses flags, calls merge_run (libcore/merge.h), prints, records the run.
 */
#include <cJSON.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "../libcore/gguf.h"
#include "../libcore/merge.h"
#include "../libcore/rdb.h"
#include "../libcore/tensor.h"
#include "commands.h"
#include "opts.h"

static const struct cmd_help merge_help = {
    "merge",
    "--model DIR --adapter DIR[:WEIGHT] [--adapter DIR[:WEIGHT] ...] --out DIR|FILE.gguf [options]",
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
    "that rounding the exact merged weights to the output dtype alone causes.\n"
    "An --out ending in .gguf writes one GGUF file for llama.cpp / Ollama instead of a folder\n"
    "(as lorakit convert writes it: tokenizer and chat template embedded), streaming the merged\n"
    "tensors the same way; --dtype is then auto (the base's), f32, f16, bf16 or q8_0 for the\n"
    "matrices (norms and biases stay f32). Every method and option applies except\n"
    "--into-adapter; with no --adapter the model is converted as it is. --verify reads the\n"
    "file back and compares as above.",
    "  lorakit merge --model qwen-0.5b --adapter runs/med --out qwen-med --verify\n"
    "  lorakit merge --model base --adapter a:0.7 --adapter b:0.3 --method ties --density 0.5 --out ab\n"
    "  lorakit merge --model base --adapter a --adapter b --method cat --into-adapter --portable --out ab-lora\n"
    "  lorakit merge --model qwen-med --adapter runs/med --subtract --out qwen-again\n"
    "  lorakit merge --model qwen-0.5b --adapter runs/med --out qwen-med.q8_0.gguf --dtype q8_0 --verify",
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

/* The output dtype of the options: a safetensors dtype, or a GGUF type for a .gguf out. */
static const char *opts_dtype_label(const struct merge_opts *o)
{
    if (merge_out_is_gguf(o->out))
        return o->gguf_dtype < 0 ? "as the base" : gguf_ttype_name(o->gguf_dtype);
    return dtype_label(o->dtype);
}

/* The run record's parameters and summary (owned by the caller: cJSON_Delete). */
static cJSON *params_json(const struct merge_opts *o)
{
    cJSON *j = cJSON_CreateObject();
    cJSON_AddStringToObject(j, "model", o->model);
    cJSON_AddStringToObject(j, "out", o->out);
    cJSON *ads = cJSON_AddArrayToObject(j, "adapters");
    for (int i = 0; ads && i < o->n_adapters; i++) {
        cJSON *a = cJSON_CreateObject();
        cJSON_AddStringToObject(a, "dir", o->adapters[i].dir);
        cJSON_AddNumberToObject(a, "weight", o->adapters[i].weight);
        cJSON_AddItemToArray(ads, a);
    }
    cJSON_AddStringToObject(j, "method", merge_method_name(o->method));
    cJSON_AddNumberToObject(j, "density", o->density);
    cJSON_AddNumberToObject(j, "rank", o->rank);
    cJSON_AddStringToObject(j, "dtype", opts_dtype_label(o));
    cJSON_AddNumberToObject(j, "seed", (double)o->seed);
    cJSON_AddBoolToObject(j, "subtract", o->subtract);
    cJSON_AddBoolToObject(j, "into_adapter", o->into_adapter);
    cJSON_AddBoolToObject(j, "portable", o->portable);
    cJSON_AddBoolToObject(j, "verify", o->verify);
    return j;
}

static cJSON *summary_json(const struct merge_report *r)
{
    cJSON *j = cJSON_CreateObject();
    cJSON_AddNumberToObject(j, "tensors", r->n_tensors);
    cJSON_AddNumberToObject(j, "changed", r->n_changed);
    cJSON_AddNumberToObject(j, "copied", r->n_copied);
    cJSON_AddNumberToObject(j, "shards", r->n_shards);
    cJSON_AddBoolToObject(j, "untied", r->untied);
    cJSON_AddNumberToObject(j, "rank", r->rank);
    cJSON_AddNumberToObject(j, "seconds", lk_cli_round(r->seconds, "%.3f"));
    if (r->gguf_dtype >= 0) {
        cJSON_AddStringToObject(j, "gguf_dtype", gguf_ttype_name(r->gguf_dtype));
        cJSON_AddNumberToObject(j, "bytes", (double)r->bytes);
    }
    if (r->verified) {
        cJSON *v = cJSON_AddObjectToObject(j, "verify");
        cJSON_AddStringToObject(v, "reference", r->verify_ref);
        cJSON_AddNumberToObject(v, "max_abs", lk_cli_round(r->verify_max_abs, "%.9g"));
        cJSON_AddNumberToObject(v, "max_rel", lk_cli_round(r->verify_max_rel, "%.9g"));
        cJSON_AddNumberToObject(v, "rounding_max_abs", lk_cli_round(r->round_max_abs, "%.9g"));
        cJSON_AddNumberToObject(v, "rounding_max_rel", lk_cli_round(r->round_max_rel, "%.9g"));
    }
    return j;
}

static void print_report(const struct merge_opts *o, const struct merge_report *rep)
{
    if (rep->untied)
        fprintf(stderr, "merge: note: an adapter changes embed_tokens or lm_head of a model with tied "
                        "embeddings: wrote lm_head.weight and set tie_word_embeddings false\n");
    if (o->into_adapter)
        printf("wrote %s: one adapter (%s of %d), r %d over %d modules%s\n", o->out, merge_method_name(o->method),
               o->n_adapters, rep->rank, rep->n_tensors, o->portable ? ", portable (alpha = r, no patterns)" : "");
    else if (rep->gguf_dtype >= 0)
        printf("wrote %s: one GGUF file, %d tensors (%d merged in float32, %d read as they are), %s, %.2f MB, "
               "%.2f s%s\n", o->out, rep->n_tensors, rep->n_changed, rep->n_copied, gguf_ttype_name(rep->gguf_dtype),
               (double)rep->bytes / 1e6, rep->seconds, rep->n_f32_fallback ? " (some matrices kept f32: rows not "
               "a multiple of 32, the q8_0 block)" : "");
    else
        printf("wrote %s: %d tensors (%d merged in float32, %d copied), %d shard%s, dtype %s, %.2f s\n", o->out,
               rep->n_tensors, rep->n_changed, rep->n_copied, rep->n_shards, rep->n_shards == 1 ? "" : "s",
               dtype_label(rep->out_dtype), rep->seconds);
    if (rep->verified)
        printf("verify: reference %s: max |dlogit| %.3g (relative %.3g); rounding the exact merge to "
               "the output dtype alone: %.3g (relative %.3g)\n",
               rep->verify_ref, rep->verify_max_abs, rep->verify_max_rel, rep->round_max_abs, rep->round_max_rel);
}

struct merge_cli {
    const char *model, *out, *method, *dtype, *runs;
    struct opt_list adapters;
    double density;
    long rank, seed, threads;
    int verify, into, portable, subtract, overwrite, has_density;
};

/* The flags, checked together, into o (adapter folders with a weight suffix go to owned). */
static int merge_opts_from_cli(const struct merge_cli *c, struct merge_opts *o, char **owned, struct lk_err *err)
{
    int gguf = c->out && merge_out_is_gguf(c->out);
    if (!c->model || !c->out || (!c->adapters.n && !gguf))
        return lk_errf(err, LK_ERR_USAGE, "--model, --adapter and --out are required (see --help; with no "
                       "--adapter, an --out FILE.gguf converts the model as it is)");
    if (c->adapters.n > MERGE_MAX_ADAPTERS)
        return lk_errf(err, LK_ERR_USAGE, "at most %d adapters", MERGE_MAX_ADAPTERS);
    if (c->method && merge_method_parse(c->method) < 0)
        return lk_errf(err, LK_ERR_USAGE, "unknown --method '%s' (linear, cat, svd, ties, dare_linear, dare_ties)",
                       c->method);
    int gtype = c->dtype && strcmp(c->dtype, "auto") ? gguf_ttype_parse(c->dtype) : -1;
    if (c->dtype && strcmp(c->dtype, "auto") && gtype < 0)
        return lk_errf(err, LK_ERR_USAGE, "option '--dtype' wants auto, bf16, f16 or f32 (or q8_0 for a .gguf "
                       "--out), got '%s'", c->dtype);
    if (gtype == GGUF_T_Q8_0 && !gguf)
        return lk_errf(err, LK_ERR_USAGE, "--dtype q8_0 is a GGUF type: give --out FILE.gguf");
    if (c->has_density && !(c->density > 0 && c->density <= 1))
        return lk_errf(err, LK_ERR_USAGE, "option '--density' must be in (0, 1]");
    if (c->rank < 0 || c->rank > 1 << 20 || c->seed < 0)
        return lk_errf(err, LK_ERR_USAGE, "--rank and --seed must be non-negative");
    if (c->threads < 0 || c->threads > 4096)
        return lk_errf(err, LK_ERR_USAGE, "option '--threads' must be in 0..4096");
    memset(o, 0, sizeof *o);
    o->model = c->model;
    o->out = c->out;
    o->dtype = o->gguf_dtype = -1;
    if (gguf)
        o->gguf_dtype = gtype;
    else if (gtype >= 0)
        o->dtype = gtype == GGUF_T_BF16 ? TENSOR_BF16 : gtype == GGUF_T_F16 ? TENSOR_F16 : TENSOR_F32;
    o->verify = c->verify;
    o->into_adapter = c->into;
    o->portable = c->portable;
    o->subtract = c->subtract;
    o->overwrite = c->overwrite;
    o->method = c->method ? (enum merge_method)merge_method_parse(c->method) : MERGE_LINEAR;
    o->density = c->has_density ? c->density : 0;
    o->rank = (int)c->rank;
    o->seed = (uint64_t)c->seed;
    o->n_adapters = c->adapters.n;
    for (int i = 0; i < c->adapters.n; i++)
        parse_adapter(c->adapters.v[i], &o->adapters[i], &owned[i]);
    return LK_OK;
}

int cmd_merge(int argc, char **argv)
{
    struct merge_cli c = { 0 };
    int help = 0;
    struct lk_err err = { 0 };
    const struct opt opts[] = {
        { "model", OPT_STR, &c.model, "DIR", "base model folder (config.json + safetensors)" },
        { "adapter", OPT_LIST, &c.adapters, "DIR[:W]", "PEFT adapter folder, optional weight (default 1); repeatable" },
        { "out", OPT_STR, &c.out, "DIR", "output folder (a model, or an adapter with --into-adapter), or FILE.gguf" },
        { "method", OPT_STR, &c.method, "M", "linear (default), cat, svd, ties, dare_linear, dare_ties" },
        { "density", OPT_FLOAT, &c.density, "D", "ties/dare: fraction of each change kept, in (0, 1]" },
        { "rank", OPT_INT, &c.rank, "R", "svd: rank of the truncation (default: the largest adapter rank)" },
        { "dtype", OPT_STR, &c.dtype, "T", "auto (the base's, default), bf16, f16, f32; q8_0 for a .gguf" },
        { "seed", OPT_INT, &c.seed, "S", "dare: seed of the random drop (default 0)" },
        { "verify", OPT_FLAG, &c.verify, NULL, "compare logits of the output with base+adapters" },
        { "into-adapter", OPT_FLAG, &c.into, NULL, "write one PEFT adapter (cat, svd), not a model" },
        { "portable", OPT_FLAG, &c.portable, NULL, "with --into-adapter: scale in B, alpha = r, no patterns" },
        { "subtract", OPT_FLAG, &c.subtract, NULL, "remove the adapters from a merged model (W - s B A)" },
        { "overwrite", OPT_FLAG, &c.overwrite, NULL, "replace an existing non-empty --out folder or .gguf file" },
        { "runs", OPT_STR, &c.runs, "DB", "record the merge in this runs database" },
        { "threads", OPT_INT, &c.threads, "N", "threads (default: all cores)" },
        { 0 },
    };
    if (opts_parse(argc, argv, opts, NULL, 0, NULL, &help, &err))
        return lk_cli_fail("merge", &err);
    if (help) {
        opts_usage(stdout, &merge_help, opts);
        return 0;
    }
    for (int i = 1; i < argc; i++)
        c.has_density |= !strcmp(argv[i], "--density") || !strncmp(argv[i], "--density=", 10);
    struct merge_opts o;
    char *owned[MERGE_MAX_ADAPTERS] = { 0 };
    if (merge_opts_from_cli(&c, &o, owned, &err))
        return lk_cli_fail("merge", &err);
    if (isatty(2))
        o.progress = progress;
    lk_cli_threads(c.threads);
    lk_interrupt_install();

    // the run record (only with --runs); a database that cannot be written is a warning
    struct rdb_rec rec;
    cJSON *params = params_json(&o);
    if (rdb_rec_begin(&rec, c.runs, "merge", c.out, c.model, NULL, params))
        lk_cli_warn("merge", rec.warning);
    cJSON_Delete(params);
    for (int i = 0; i < o.n_adapters; i++)
        lk_cli_adapter_keys("merge", o.adapters[i].dir, NULL);
    struct merge_report rep;
    int rc = merge_run(&o, &rep, &err);
    cJSON *sum = rc ? NULL : summary_json(&rep);
    if (rdb_rec_finish(&rec, rc, sum))
        lk_cli_warn("merge", rec.warning);
    cJSON_Delete(sum);
    for (int i = 0; i < MERGE_MAX_ADAPTERS; i++)
        lk_free(owned[i]);
    if (rc)
        return lk_cli_fail("merge", &err);
    print_report(&o, &rep);
    return 0;
}
