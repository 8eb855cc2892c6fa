/*
 * train.c - `lorakit train`: LoRA (or full) fine-tuning of a Hugging Face model folder on
 * JSONL data, with checkpoints, progress and the runs database. The adapter comes from
 * lora_build, the loop is train_run; this file checks flags, loads, prints and records.
 */
#include <cJSON.h>
#include <limits.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "../libcore/data.h"
#include "../libcore/lora.h"
#include "../libcore/model.h"
#include "../libcore/rdb.h"
#include "../libcore/tensor.h"
#include "../libcore/tok.h"
#include "../libcore/train.h"
#include "commands.h"
#include "opts.h"

static const struct cmd_help train_help = {
    "train",
    "--model DIR --data FILE.jsonl[,FILE2...] --out DIR [options]",
    "Trains a LoRA adapter (PEFT layout) or, with --full, every weight (a model folder) on JSONL\n"
    "records: chat {\"messages\"}, alpaca {\"instruction\",\"input\",\"output\"}, plain {\"text\"} or\n"
    "pre-tokenized {\"input_ids\",\"labels\"}. Only assistant tokens are trained on unless\n"
    "--train-on-prompt. The loss of a step is the mean over every trained token of the global batch\n"
    "(batch x grad-accum). Checkpoints (adapter or model, AdamW moments, step) are written\n"
    "atomically to DIR/checkpoint-N every --save-every steps and on Ctrl-C; --resume DIR continues\n"
    "bit-identically. Every step goes to the runs database (WAL; `lorakit dash` shows it live).",
    "  lorakit train --model qwen2.5-0.5b --data med.jsonl --out med-lora --rank 16 --epochs 2\n"
    "  lorakit train --model tiny --data a.jsonl --out tiny-full --full --lr 1e-3 --steps 200",
};

const struct train_dist *train_cli_dist;

struct train_cli {
    const char *model, *data, *out, *targets, *init, *schedule, *tmpl, *eval_data, *runs;
    const char *resume, *adapter, *dump_grads, *tokenizer, *dtype, *name, *weights;
    long rank, steps, batch, grad_accum, seq, warmup, seed, eval_every, save_every, threads, log_every;
    double alpha, dropout, loraplus, lr, epochs, weight_decay, clip;
    int rslora, dora, full, pack, overwrite, skip_bad, train_on_prompt, quiet;
    /* from the enum flags, checked at parse time */
    enum adamw_schedule sched;
    enum lora_init_kind init_kind;
    int out_dtype;           /* --full: TENSOR_* to write, -1 auto (the base's) */
    int keep;                /* --weights: MODEL_KEEP_FILE (LoRA's default) or MODEL_KEEP_F32 */
    int ranks, lead;         /* data parallel: processes, 1 on rank 0 (which alone prints and writes) */
};

struct progress_ctx {
    struct rdb_rec *rec;
    int tty;
    long log_every;
    int quiet;
    double last_print;
    int ranks;               /* data-parallel processes (1: none) */
};

static void on_step(void *ctx, const struct train_progress *p)
{
    struct progress_ctx *c = ctx;
    struct lk_err e = { 0 };
    if (c->rec->active && rdb_train_step(&c->rec->db, c->rec->run_id, p->step, p->loss, p->lr, p->grad_norm,
                                         p->tokens_per_s, p->elapsed_s, p->eval_loss, &e)) {
        rdb_rec_drop(c->rec, &e);
        lk_cli_warn("train", c->rec->warning);
    }
    if (c->quiet)
        return;
    double eta = p->step ? p->elapsed_s / p->step * (double)(p->total - p->step) : 0;
    char ev[48] = "", rk[64] = "";
    if (c->ranks > 1) // tokens_per_s is the global figure; each rank did its share of it
        snprintf(rk, sizeof rk, " (%d ranks, %.0f/rank)", c->ranks, p->tokens_per_s / c->ranks);
    if (!isnan(p->eval_loss))
        snprintf(ev, sizeof ev, "  eval %.4f", p->eval_loss);
    if (c->tty) {
        double now = lk_now();
        if (now - c->last_print < 0.2 && p->step != p->total && isnan(p->eval_loss))
            return;
        c->last_print = now;
        fprintf(stderr, "\r\033[Kstep %ld/%ld  loss %.4f%s  lr %.3g  %.0f tok/s%s  ETA %.0fs", p->step,
                p->total, p->loss, ev, p->lr, p->tokens_per_s, rk, eta);
        if (p->step == p->total)
            fprintf(stderr, "\n");
    } else if (p->step % c->log_every == 0 || p->step == p->total || ev[0]) {
        fprintf(stderr, "step %ld/%ld  loss %.4f%s  lr %.3g  grad %.3g  %.0f tok/s%s  ETA %.0fs\n", p->step,
                p->total, p->loss, ev, p->lr, p->grad_norm, p->tokens_per_s, rk, eta);
    }
}

static void on_checkpoint(void *ctx, long step, const char *dir)
{
    struct progress_ctx *c = ctx;
    if (!c->quiet)
        fprintf(stderr, "%scheckpoint at step %ld: %s\n", c->tty ? "\r\033[K" : "", step, dir);
}

/* Every flag, checked before any work: required ones, combinations, ranges, the enums
 * (--schedule, --init, --dtype), and the output folder (lk_outdir's rule; --resume continues
 * in it). */
static int train_check(struct train_cli *c, struct lk_err *err)
{
    if (!c->model || !c->data || (!c->out && !c->dump_grads))
        return lk_errf(err, LK_ERR_USAGE, "--model, --data and --out are required (see --help)");
    if (c->dora && (c->full || c->dropout > 0 || !strcmp(c->init, "pissa")))
        return lk_errf(err, LK_ERR_USAGE, "--dora does not combine with %s",
                       c->full ? "--full"
                       : c->dropout > 0 ? "--dropout (PEFT recomputes the base on the dropped input)" : "--init pissa");
    if (c->rank < 1 || c->rank > 4096 || c->alpha <= 0 || c->dropout < 0 || c->dropout >= 1 || c->batch < 1 ||
        c->grad_accum < 1 || c->seq < 2 || c->epochs <= 0 || c->steps < 0 || c->warmup < 0 || c->clip < 0 ||
        c->loraplus <= 0 || c->weight_decay < 0 || c->save_every < 0 || c->eval_every < 0 || c->log_every < 1 ||
        c->batch > INT_MAX || c->grad_accum > INT_MAX || c->seq > INT_MAX || c->threads > 4096) // cast to int
        return lk_errf(err, LK_ERR_USAGE, "an option is out of range (see --help)");
    int sched = adamw_schedule_parse(c->schedule), init = lora_init_kind_parse(c->init);
    if (sched < 0)
        return lk_errf(err, LK_ERR_USAGE, "unknown --schedule '%s' (cosine, linear, constant)", c->schedule);
    if (init < 0)
        return lk_errf(err, LK_ERR_USAGE, "unknown --init '%s' (default, gaussian, pissa)", c->init);
    c->sched = (enum adamw_schedule)sched;
    c->init_kind = (enum lora_init_kind)init;
    static const char *const dtypes[] = { "auto", "f32", "bf16", "f16" };
    static const int dtype_of[] = { -1, TENSOR_F32, TENSOR_BF16, TENSOR_F16 };
    int k = 0;
    while (k < 4 && strcmp(c->dtype, dtypes[k]))
        k++;
    if (k == 4)
        return lk_errf(err, LK_ERR_USAGE, "unknown --dtype '%s' (auto, f32, bf16, f16)", c->dtype);
    c->out_dtype = dtype_of[k];
    if (c->full && (c->adapter || c->init_kind != LORA_INIT_DEFAULT))
        return lk_errf(err, LK_ERR_USAGE, "--full trains every weight: --adapter and --init do not apply");
    // float32 master weights for a full fine-tune; PiSSA rewrites the base, in float32 too
    int f32 = c->full || c->init_kind == LORA_INIT_PISSA;
    if (lk_cli_weights(c->weights, f32 ? MODEL_KEEP_F32 : MODEL_KEEP_FILE, &c->keep, err))
        return err->code;
    if (f32 && c->keep != MODEL_KEEP_F32)
        return lk_errf(err, LK_ERR_USAGE, "--weights file does not combine with %s, which %s",
                       c->full ? "--full" : "--init pissa",
                       c->full ? "trains float32 master weights" : "rewrites the base weights in float32");
    if (c->out && !c->resume && lk_outdir_check(c->out, c->overwrite, err)) {
        if (err->code == LK_ERR_EXISTS && lk_is_dir(c->out)) // the usual case: an earlier run's output
            lk_errf(err, LK_ERR_EXISTS, "%s: output folder exists and is not empty (use --overwrite, or "
                    "--resume %s)", c->out, c->out);
        return err->code;
    }
    return LK_OK;
}

/* The model, its tokenizer (unless every record is pre-tokenized) and the data. */
static int train_load(const struct train_cli *c, struct model *m, struct tok **tk, struct data_set *d,
                      struct data_set *ev, struct lk_err *err)
{
    int rc = model_load_keep(m, c->model, (enum model_keep)c->keep, err);
    if (rc)
        return rc;
    const char *tdir = c->tokenizer ? c->tokenizer : c->model;
    char tpath[4200];
    snprintf(tpath, sizeof tpath, "%s/tokenizer.json", tdir);
    if (lk_file_exists(tpath) && (rc = tok_load(tk, tdir, err)))
        return rc;
    if (c->tokenizer && !*tk)
        return lk_errf(err, LK_ERR_MISSING, "%s: no tokenizer.json", c->tokenizer);
    struct data_opts dopt = { (int)c->seq, c->skip_bad, c->train_on_prompt, c->tmpl, m->cfg.vocab_size };
    if ((rc = data_load(d, c->data, *tk, &dopt, err)))
        return rc;
    if (d->n_trained == 0)
        return lk_errf(err, LK_ERR_USAGE, "%s: no token to train on (every label is -100 after templating "
                       "and truncation)", c->data);
    return c->eval_data ? data_load(ev, c->eval_data, *tk, &dopt, err) : LK_OK;
}

static void train_opts_from_cli(const struct train_cli *c, struct train_opts *o)
{
    train_opts_default(o);
    o->steps = c->steps;
    o->epochs = c->epochs;
    o->batch = (int)c->batch;
    o->grad_accum = (int)c->grad_accum;
    o->seq = (int)c->seq;
    o->pack = c->pack;
    o->lr = c->lr > 0 ? c->lr : c->full ? 2e-5 : 2e-4;
    o->loraplus_ratio = c->loraplus;
    o->warmup = c->warmup;
    o->schedule = c->sched;
    o->weight_decay = c->weight_decay;
    o->clip = c->clip;
    o->seed = (uint64_t)c->seed;
    o->eval_every = c->eval_every;
    o->save_every = c->save_every;
    o->ckpt_dir = c->dump_grads ? NULL : c->out;
    o->dump_grads = c->dump_grads;
    o->dist = train_cli_dist;
}

static void print_plan(const struct train_cli *c, const struct data_set *d, const struct train_state *st,
                       size_t trainable, size_t all)
{
    fprintf(stderr, "trainable params: %zu || all params: %zu || trainable%%: %.4f\n", trainable, all,
            100.0 * (double)trainable / (double)all);
    fprintf(stderr, "data: %d records, %zu tokens (%zu trained on), %d truncated to %ld tokens%s", d->n, d->n_tokens,
            d->n_trained, d->n_truncated, c->seq, d->n_skipped ? "" : "\n");
    if (d->n_skipped)
        fprintf(stderr, ", %d broken lines skipped\n", d->n_skipped);
    fprintf(stderr, "plan: %ld steps of %ld rows x %d tokens (batch %ld x grad-accum %ld)%s\n", st->total,
            c->batch * c->grad_accum, st->T, c->batch, c->grad_accum, c->pack ? ", packed" : "");
    if (c->ranks > 1)
        fprintf(stderr, "data parallel: %d ranks, micro-batches of %ld rows per rank\n", c->ranks,
                (c->batch + c->ranks - 1) / c->ranks);
}

/* The run record's parameters and summary, with the precision the record always had. */
static cJSON *train_params(const struct train_cli *c, const struct train_opts *o, const struct train_state *st,
                           const struct data_set *d, size_t trainable, size_t all)
{
    cJSON *j = cJSON_CreateObject();
    cJSON_AddStringToObject(j, "mode", c->full ? "full" : "lora");
    cJSON_AddNumberToObject(j, "rank", (double)c->rank);
    cJSON_AddNumberToObject(j, "alpha", lk_cli_round(c->alpha, "%g"));
    cJSON_AddNumberToObject(j, "dropout", lk_cli_round(c->dropout, "%g"));
    cJSON_AddStringToObject(j, "targets", c->targets);
    cJSON_AddBoolToObject(j, "rslora", c->rslora);
    cJSON_AddStringToObject(j, "init", c->init);
    cJSON_AddNumberToObject(j, "lr", lk_cli_round(o->lr, "%g"));
    cJSON_AddNumberToObject(j, "steps", (double)st->total);
    cJSON_AddNumberToObject(j, "batch", (double)c->batch);
    cJSON_AddNumberToObject(j, "grad_accum", (double)c->grad_accum);
    cJSON_AddNumberToObject(j, "seq", (double)c->seq);
    cJSON_AddBoolToObject(j, "pack", c->pack);
    cJSON_AddNumberToObject(j, "warmup", (double)c->warmup);
    cJSON_AddStringToObject(j, "schedule", c->schedule);
    cJSON_AddNumberToObject(j, "weight_decay", lk_cli_round(c->weight_decay, "%g"));
    cJSON_AddNumberToObject(j, "clip", lk_cli_round(c->clip, "%g"));
    cJSON_AddNumberToObject(j, "seed", (double)c->seed);
    cJSON_AddNumberToObject(j, "loraplus_ratio", lk_cli_round(c->loraplus, "%g"));
    cJSON_AddNumberToObject(j, "trainable_params", (double)trainable);
    cJSON_AddNumberToObject(j, "all_params", (double)all);
    cJSON_AddNumberToObject(j, "records", d->n);
    cJSON_AddNumberToObject(j, "tokens", (double)d->n_tokens);
    cJSON_AddNumberToObject(j, "truncated", d->n_truncated);
    return j;
}

static cJSON *train_summary(const struct train_state *st, const struct data_set *d, const struct data_set *ev,
                            double secs)
{
    cJSON *j = cJSON_CreateObject();
    cJSON_AddNumberToObject(j, "steps", (double)st->step);
    cJSON_AddNumberToObject(j, "first_loss", lk_cli_round(st->first_loss, "%.6g"));
    cJSON_AddNumberToObject(j, "final_loss", lk_cli_round(st->last_loss, "%.6g"));
    cJSON_AddNumberToObject(j, "eval_loss", ev->n && isfinite(st->last_eval_loss) ? lk_cli_round(st->last_eval_loss,
                                                                                                  "%.6g") : NAN);
    cJSON_AddNumberToObject(j, "seconds", lk_cli_round(secs, "%.3f"));
    cJSON_AddNumberToObject(j, "tokens_per_s", lk_cli_round(st->tokens_per_s, "%.1f"));
    cJSON_AddNumberToObject(j, "truncated", d->n_truncated);
    cJSON_AddNumberToObject(j, "skipped", d->n_skipped);
    return j;
}

/* The tokenizer and generation files a model folder carries along. */
static int copy_side_files(const char *tdir, const char *mdir, const char *out, struct lk_err *err)
{
    static const char *const names[] = { "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                                         "vocab.json", "merges.txt", "generation_config.json" };
    for (size_t i = 0; i < sizeof names / sizeof names[0]; i++) {
        char src[4200], dst[4200];
        snprintf(src, sizeof src, "%s/%s", i < 5 ? tdir : mdir, names[i]);
        snprintf(dst, sizeof dst, "%s/%s", out, names[i]);
        if (lk_file_exists(src)) {
            int rc = lk_copy_file(src, dst, err);
            if (rc)
                return rc;
        }
    }
    return LK_OK;
}

/* The result: a model folder (--full, in --dtype) with the tokenizer's files, or the adapter. */
static int train_save(const struct train_cli *c, const struct model *m, const struct lora *l, const struct tok *tk,
                      struct lk_err *err)
{
    if (!c->full)
        return c->init_kind == LORA_INIT_PISSA ? lora_save_pissa(l, m, c->out, err) : lora_save(l, c->out, err);
    int dtype = c->out_dtype >= 0                            ? c->out_dtype
                : !strcmp(m->cfg.torch_dtype, "bfloat16") ? TENSOR_BF16
                : !strcmp(m->cfg.torch_dtype, "float16")  ? TENSOR_F16
                                                          : TENSOR_F32;
    int rc = model_save(m, c->out, dtype, err);
    if (!rc && tk)
        rc = copy_side_files(c->tokenizer ? c->tokenizer : c->model, c->model, c->out, err);
    return rc;
}

/* The training run from loaded inputs: plan, record, train, save, summary. rec is begun here
 * (rank 0 with an --out only) and finished by the caller. */
static int train_go(struct train_cli *c, struct model *m, struct lora *l, const struct tok *tk,
                    const struct data_set *d, const struct data_set *ev, struct rdb_rec *rec, struct lk_err *err)
{
    struct train_opts o;
    struct train_state st;
    train_opts_from_cli(c, &o);
    int rc = train_plan(&o, d, &st, err);
    if (rc)
        return rc;
    size_t base_n = model_param_count(&m->cfg), trainable = c->full ? base_n : lora_param_count(l);
    size_t all = c->full ? base_n : base_n + trainable;
    if (!c->quiet)
        print_plan(c, d, &st, trainable, all);
    if (c->out && !c->dump_grads && c->lead) {
        if ((rc = lk_mkdir_p(c->out, err)))
            return rc;
        char *runs = c->runs ? NULL : rdb_default_path(c->out);
        cJSON *params = train_params(c, &o, &st, d, trainable, all);
        if (rdb_rec_begin(rec, c->runs ? c->runs : runs, "train", c->name ? c->name : c->out, c->model, c->data,
                          params))
            lk_cli_warn("train", rec->warning);
        cJSON_Delete(params);
        lk_free(runs);
    }
    double t0 = lk_now();
    struct progress_ctx pc = { rec, isatty(2), c->log_every, c->quiet, 0, c->ranks };
    struct train_hooks hooks = { &pc, on_step, on_checkpoint };
    if ((rc = train_run(&o, m, c->full ? NULL : l, d, ev->n ? ev : NULL, c->resume, &hooks, &st, err)))
        return rc;
    if (c->dump_grads) {
        if (c->lead)
            fprintf(stderr, "wrote the first step's gradients (loss %.6f) to %s\n", st.last_loss, c->dump_grads);
        return LK_OK;
    }
    if (!c->lead || (rc = train_save(c, m, l, tk, err)))
        return rc;
    double secs = lk_now() - t0;
    char rk[64] = "";
    if (c->ranks > 1)
        snprintf(rk, sizeof rk, " (%d ranks, %.0f/rank)", c->ranks, st.tokens_per_s / c->ranks);
    if (!c->quiet)
        fprintf(stderr, "done: %ld steps in %.1fs, loss %.4f -> %.4f, %.0f tok/s%s, wrote %s\n", st.step, secs,
                st.first_loss, st.last_loss, st.tokens_per_s, rk, c->out);
    cJSON *sum = train_summary(&st, d, ev, secs);
    if (rdb_rec_finish(rec, LK_OK, sum))
        lk_cli_warn("train", rec->warning);
    cJSON_Delete(sum);
    printf("%s\n", c->out);
    return LK_OK;
}

int cmd_train(int argc, char **argv)
{
    struct train_cli c = { .rank = 8, .alpha = 16, .lr = -1, .epochs = 1, .batch = 4, .grad_accum = 1,
                           .seq = 512, .seed = 42, .clip = 1.0, .loraplus = 1.0, .log_every = 10,
                           .schedule = "cosine", .init = "default", .targets = "all", .dtype = "auto" };
    const struct opt opts[] = {
        { "model", OPT_STR, &c.model, "DIR", "base model folder (config.json, safetensors, tokenizer.json)" },
        { "data", OPT_STR, &c.data, "FILES", "training JSONL file(s), comma-separated" },
        { "out", OPT_STR, &c.out, "DIR", "output adapter folder (model folder with --full)" },
        { "rank", OPT_INT, &c.rank, "R", "LoRA rank (default 8)" },
        { "alpha", OPT_FLOAT, &c.alpha, "A", "LoRA alpha; scale = alpha/rank (default 16)" },
        { "dropout", OPT_FLOAT, &c.dropout, "P", "dropout on the LoRA input path (default 0)" },
        { "targets", OPT_STR, &c.targets, "LIST", "modules: q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj or all (default all)" },
        { "rslora", OPT_FLAG, &c.rslora, NULL, "rank-stabilised scale alpha/sqrt(rank)" },
        { "init", OPT_STR, &c.init, "KIND", "default (PEFT: kaiming-uniform A, zero B), gaussian or pissa" },
        { "dora", OPT_FLAG, &c.dora, NULL, "weight-decomposed LoRA (magnitude vector m, W' = m (W + sBA) / ||W + sBA||)" },
        { "loraplus-ratio", OPT_FLOAT, &c.loraplus, "L", "LoRA+: B learns at L x lr (default 1)" },
        { "full", OPT_FLAG, &c.full, NULL, "full fine-tuning of every weight; the output is a model folder" },
        { "adapter", OPT_STR, &c.adapter, "DIR", "start from this PEFT adapter (continued training)" },
        { "lr", OPT_FLOAT, &c.lr, "LR", "peak learning rate (default 2e-4 LoRA, 2e-5 full)" },
        { "epochs", OPT_FLOAT, &c.epochs, "E", "epochs over the data (default 1)" },
        { "steps", OPT_INT, &c.steps, "N", "optimizer steps (overrides --epochs)" },
        { "batch", OPT_INT, &c.batch, "B", "rows per micro-batch (default 4)" },
        { "grad-accum", OPT_INT, &c.grad_accum, "K", "micro-batches per optimizer step (default 1)" },
        { "seq", OPT_INT, &c.seq, "T", "maximum length; longer records are truncated and counted (default 512)" },
        { "pack", OPT_FLAG, &c.pack, NULL, "pack short records into full rows (no attention across records)" },
        { "warmup", OPT_INT, &c.warmup, "N", "linear warm-up steps (default 0)" },
        { "schedule", OPT_STR, &c.schedule, "S", "cosine, linear or constant (default cosine)" },
        { "weight-decay", OPT_FLOAT, &c.weight_decay, "W", "decoupled weight decay (default 0)" },
        { "clip", OPT_FLOAT, &c.clip, "C", "global gradient-norm clip, 0 = off (default 1)" },
        { "seed", OPT_INT, &c.seed, "S", "seed for init, shuffling and dropout (default 42)" },
        { "template", OPT_STR, &c.tmpl, "T", "chat template: chatml, qwen3, qwen3-nothink, llama3, llama3.2, plain (default: from the tokenizer)" },
        { "tokenizer", OPT_STR, &c.tokenizer, "DIR", "tokenizer folder (default: the model folder)" },
        { "train-on-prompt", OPT_FLAG, &c.train_on_prompt, NULL, "train on prompt tokens too" },
        { "skip-bad", OPT_FLAG, &c.skip_bad, NULL, "skip (and count) broken JSONL lines instead of stopping" },
        { "eval-data", OPT_STR, &c.eval_data, "FILE", "held-out JSONL for the eval loss" },
        { "eval-every", OPT_INT, &c.eval_every, "N", "eval loss every N steps (default: at the end)" },
        { "save-every", OPT_INT, &c.save_every, "N", "checkpoint every N steps (default: only on Ctrl-C)" },
        { "resume", OPT_STR, &c.resume, "DIR", "continue from a checkpoint (or the newest in DIR)" },
        { "threads", OPT_INT, &c.threads, "N", "threads (default: all cores)" },
        { "weights", OPT_STR, &c.weights, "W", "frozen weights: file (its bf16/f16 kept; default) or f32 (--full: f32)" },
        { "runs", OPT_STR, &c.runs, "DB", "runs database (default runs.db next to --out)" },
        { "name", OPT_STR, &c.name, "NAME", "run name in the runs database (default: --out)" },
        { "dtype", OPT_STR, &c.dtype, "D", "full fine-tune output dtype: auto (the base's), f32, bf16, f16" },
        { "dump-grads", OPT_STR, &c.dump_grads, "FILE", "write the first step's gradients (PEFT/model names) and exit" },
        { "log-every", OPT_INT, &c.log_every, "N", "progress line every N steps when not on a terminal (default 10)" },
        { "overwrite", OPT_FLAG, &c.overwrite, NULL, "replace an existing output folder" },
        { "quiet", OPT_FLAG, &c.quiet, NULL, "no progress output" },
        { 0 },
    };
    struct lk_err err = { 0 };
    int help;
    if (opts_parse(argc, argv, opts, NULL, 0, NULL, &help, &err))
        return lk_cli_fail("train", &err);
    if (help) {
        opts_usage(stdout, &train_help, opts);
        return 0;
    }
    if (train_check(&c, &err))
        return lk_cli_fail("train", &err);
    lk_cli_threads(c.threads);
    lk_interrupt_install();
    // data parallel (bin/lorakit-mpi): rank 0 alone prints and writes the output and runs database
    c.ranks = train_cli_dist ? train_cli_dist->size : 1;
    c.lead = !train_cli_dist || train_cli_dist->rank == 0;
    if (!c.lead)
        c.quiet = 1;
    struct model m = { 0 };
    struct lora l = { 0 };
    struct tok *tk = NULL;
    struct data_set d = { 0 }, ev = { 0 };
    struct rdb_rec rec = { 0 };
    struct lora_build_opts lb = { c.adapter, (int)c.rank, c.alpha, c.dropout, c.rslora, c.dora, c.targets,
                                  c.init_kind, (uint64_t)c.seed, c.model };
    int rc = train_load(&c, &m, &tk, &d, &ev, &err);
    if (!rc && !c.full)
        rc = lora_build(&l, &m, &lb, &err);
    if (!rc && c.adapter)
        lk_cli_adapter_keys("train", c.adapter, &l.cfg);
    if (!rc)
        rc = train_go(&c, &m, &l, tk, &d, &ev, &rec, &err);
    if (rc && rdb_rec_finish(&rec, rc, NULL))
        lk_cli_warn("train", rec.warning);
    data_release(&d);
    data_release(&ev);
    tok_free(tk);
    lora_release(&l);
    model_release(&m);
    if (rc == LK_ERR_INTERRUPTED && !c.lead)
        return 130; // every rank stopped at the same step; rank 0 alone says so
    return rc ? lk_cli_fail("train", &err) : 0;
}
