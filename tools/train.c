/*
 * train.c - `lorakit train`: LoRA (or full) fine-tuning of a Hugging Face model folder on
 * JSONL data, with checkpoints, progress and the runs database.
 */
#include <cblas.h>
#include <limits.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "../libcore/chat.h"
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
    const char *resume, *adapter, *dump_grads, *tokenizer, *dtype, *name;
    long rank, steps, batch, grad_accum, seq, warmup, seed, eval_every, save_every, threads, log_every;
    double alpha, dropout, loraplus, lr, epochs, weight_decay, clip;
    int rslora, dora, full, pack, overwrite, skip_bad, train_on_prompt, quiet;
};

struct progress_ctx {
    struct rdb *db;
    int64_t run_id;
    int tty;
    long log_every;
    int quiet;
    double last_print;
    int ranks;               /* data-parallel processes (1: none) */
};

static void on_step(void *ctx, const struct train_progress *p)
{
    struct progress_ctx *c = ctx;
    if (c->db)
        rdb_train_step(c->db, c->run_id, p->step, p->loss, p->lr, p->grad_norm, p->tokens_per_s,
                       p->elapsed_s, p->eval_loss, NULL);
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

static char *default_runs_db(const char *out)
{
    const char *slash = strrchr(out, '/');
    if (!slash)
        return lk_strdup("runs.db");
    size_t n = (size_t)(slash - out);
    char *s = lk_malloc(n + 16);
    if (s)
        snprintf(s, n + 16, "%.*s/runs.db", (int)n, out);
    return s;
}

static int folder_nonempty(const char *dir)
{
    if (!lk_is_dir(dir))
        return lk_file_exists(dir);
    char probe[4200];
    snprintf(probe, sizeof probe, "%s/adapter_config.json", dir);
    if (lk_file_exists(probe))
        return 1;
    snprintf(probe, sizeof probe, "%s/config.json", dir);
    return lk_file_exists(probe);
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
        { "template", OPT_STR, &c.tmpl, "T", "chat template: chatml, llama3, plain (default: from the tokenizer)" },
        { "tokenizer", OPT_STR, &c.tokenizer, "DIR", "tokenizer folder (default: the model folder)" },
        { "train-on-prompt", OPT_FLAG, &c.train_on_prompt, NULL, "train on prompt tokens too" },
        { "skip-bad", OPT_FLAG, &c.skip_bad, NULL, "skip (and count) broken JSONL lines instead of stopping" },
        { "eval-data", OPT_STR, &c.eval_data, "FILE", "held-out JSONL for the eval loss" },
        { "eval-every", OPT_INT, &c.eval_every, "N", "eval loss every N steps (default: at the end)" },
        { "save-every", OPT_INT, &c.save_every, "N", "checkpoint every N steps (default: only on Ctrl-C)" },
        { "resume", OPT_STR, &c.resume, "DIR", "continue from a checkpoint (or the newest in DIR)" },
        { "threads", OPT_INT, &c.threads, "N", "threads (default: all cores)" },
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
    if (!c.model || !c.data || (!c.out && !c.dump_grads)) {
        lk_errf(&err, LK_ERR_USAGE, "--model, --data and --out are required (see --help)");
        return lk_cli_fail("train", &err);
    }
    if (c.dora && (c.full || c.dropout > 0 || !strcmp(c.init, "pissa"))) {
        lk_errf(&err, LK_ERR_USAGE, "--dora does not combine with %s",
                c.full ? "--full" : c.dropout > 0 ? "--dropout (PEFT recomputes the base on the dropped input)"
                                                  : "--init pissa");
        return lk_cli_fail("train", &err);
    }
    if (c.rank < 1 || c.rank > 4096 || c.alpha <= 0 || c.dropout < 0 || c.dropout >= 1 || c.batch < 1 ||
        c.grad_accum < 1 || c.seq < 2 || c.epochs <= 0 || c.steps < 0 || c.warmup < 0 || c.clip < 0 ||
        c.loraplus <= 0 || c.weight_decay < 0 || c.save_every < 0 || c.eval_every < 0 || c.log_every < 1 ||
        c.batch > INT_MAX || c.grad_accum > INT_MAX || c.seq > INT_MAX || c.threads > 4096) { // cast to int
        lk_errf(&err, LK_ERR_USAGE, "an option is out of range (see --help)");
        return lk_cli_fail("train", &err);
    }
    int sched = adamw_schedule_parse(c.schedule);
    if (sched < 0) {
        lk_errf(&err, LK_ERR_USAGE, "unknown --schedule '%s' (cosine, linear, constant)", c.schedule);
        return lk_cli_fail("train", &err);
    }
    int pissa = !strcmp(c.init, "pissa"), gaussian = !strcmp(c.init, "gaussian");
    if (!pissa && !gaussian && strcmp(c.init, "default")) {
        lk_errf(&err, LK_ERR_USAGE, "unknown --init '%s' (default, gaussian, pissa)", c.init);
        return lk_cli_fail("train", &err);
    }
    if (c.full && (c.adapter || pissa || gaussian)) {
        lk_errf(&err, LK_ERR_USAGE, "--full trains every weight: --adapter and --init do not apply");
        return lk_cli_fail("train", &err);
    }
    if (c.out && !c.resume && !c.overwrite && folder_nonempty(c.out)) {
        lk_errf(&err, LK_ERR_EXISTS, "%s: output folder exists (use --overwrite, or --resume %s)", c.out, c.out);
        return lk_cli_fail("train", &err);
    }
    if (c.threads > 0) {
        openblas_set_num_threads((int)c.threads);
    }
    lk_interrupt_install();
    // data parallel (bin/lorakit-mpi): rank 0 alone prints and writes the output and runs database
    int ranks = train_cli_dist ? train_cli_dist->size : 1;
    int lead = !train_cli_dist || train_cli_dist->rank == 0;
    if (!lead)
        c.quiet = 1;

    int rc;
    struct model m = { 0 };
    struct lora l = { 0 };
    struct tok *tk = NULL;
    struct data_set d = { 0 }, ev = { 0 };
    struct rdb db = { 0 };
    int have_db = 0;
    int64_t run_id = 0;
    char *runs = NULL;
    double t0 = lk_now();
    if ((rc = model_load(&m, c.model, &err)))
        goto fail;
    // tokenizer: needed unless every record is pre-tokenized
    {
        const char *tdir = c.tokenizer ? c.tokenizer : c.model;
        char tpath[4200];
        snprintf(tpath, sizeof tpath, "%s/tokenizer.json", tdir);
        if (lk_file_exists(tpath) && (rc = tok_load(&tk, tdir, &err)))
            goto fail;
        if (c.tokenizer && !tk) {
            rc = lk_errf(&err, LK_ERR_MISSING, "%s: no tokenizer.json", c.tokenizer);
            goto fail;
        }
    }
    struct data_opts dopt = { (int)c.seq, c.skip_bad, c.train_on_prompt, c.tmpl, m.cfg.vocab_size };
    if ((rc = data_load(&d, c.data, tk, &dopt, &err)))
        goto fail;
    if (d.n_trained == 0) {
        rc = lk_errf(&err, LK_ERR_USAGE, "%s: no token to train on (every label is -100 after templating "
                     "and truncation)", c.data);
        goto fail;
    }
    if (c.eval_data && (rc = data_load(&ev, c.eval_data, tk, &dopt, &err)))
        goto fail;
    if (!c.full) {
        struct lora_config lc;
        if (c.adapter) {
            if ((rc = lora_load(&l, c.adapter, &m.cfg, &err)))
                goto fail;
            if (l.n_extra || l.embed_A) {
                rc = lk_errf(&err, LK_ERR_UNSUPPORTED, "%s: continued training of embedding or "
                             "modules_to_save adapters is not supported", c.adapter);
                goto fail;
            }
            l.cfg.dropout = c.dropout;
        } else {
            lora_config_default(&lc);
            lc.r = (int)c.rank;
            lc.alpha = c.alpha;
            lc.dropout = c.dropout;
            lc.use_rslora = c.rslora;
            lc.use_dora = c.dora;
            if ((rc = lora_targets_parse(c.targets, &lc.targets, &err)))
                goto fail;
            snprintf(lc.base_model, sizeof lc.base_model, "%s", c.model);
            snprintf(lc.init, sizeof lc.init, "%s", gaussian ? "gaussian" : pissa ? "pissa" : "true");
            if ((rc = lora_init(&l, &lc, &m.cfg, &err)))
                goto fail;
            struct lk_rng rng;
            lk_rng_seed(&rng, (uint64_t)c.seed);
            if (pissa) {
                if ((rc = lora_init_pissa(&l, &m, &err)))
                    goto fail;
            } else
                lora_init_weights(&l, gaussian, &rng);
            if (c.dora && (rc = lora_init_dora_magnitude(&l, &m, &err)))
                goto fail;
        }
    }
    struct train_opts o;
    train_opts_default(&o);
    o.steps = c.steps;
    o.epochs = c.epochs;
    o.batch = (int)c.batch;
    o.grad_accum = (int)c.grad_accum;
    o.seq = (int)c.seq;
    o.pack = c.pack;
    o.lr = c.lr > 0 ? c.lr : c.full ? 2e-5 : 2e-4;
    o.loraplus_ratio = c.loraplus;
    o.warmup = c.warmup;
    o.schedule = (enum adamw_schedule)sched;
    o.weight_decay = c.weight_decay;
    o.clip = c.clip;
    o.seed = (uint64_t)c.seed;
    o.eval_every = c.eval_every;
    o.save_every = c.save_every;
    o.ckpt_dir = c.dump_grads ? NULL : c.out;
    o.dump_grads = c.dump_grads;
    o.dist = train_cli_dist;
    struct train_state st;
    if ((rc = train_plan(&o, &d, &st, &err)))
        goto fail;
    size_t base_n = model_param_count(&m.cfg);
    size_t trainable = c.full ? base_n : lora_param_count(&l);
    size_t all = c.full ? base_n : base_n + trainable;
    if (!c.quiet) {
        fprintf(stderr, "trainable params: %zu || all params: %zu || trainable%%: %.4f\n", trainable, all,
                100.0 * (double)trainable / (double)all);
        fprintf(stderr, "data: %d records, %zu tokens (%zu trained on), %d truncated to %ld tokens%s",
                d.n, d.n_tokens, d.n_trained, d.n_truncated, c.seq, d.n_skipped ? "" : "\n");
        if (d.n_skipped)
            fprintf(stderr, ", %d broken lines skipped\n", d.n_skipped);
        fprintf(stderr, "plan: %ld steps of %ld rows x %d tokens (batch %ld x grad-accum %ld)%s\n", st.total,
                c.batch * c.grad_accum, st.T, c.batch, c.grad_accum, c.pack ? ", packed" : "");
        if (ranks > 1)
            fprintf(stderr, "data parallel: %d ranks, micro-batches of %ld rows per rank\n", ranks,
                    (c.batch + ranks - 1) / ranks);
    }
    if (c.out && !c.dump_grads && lead) {
        if ((rc = lk_mkdir_p(c.out, &err)))
            goto fail;
        runs = c.runs ? lk_strdup(c.runs) : default_runs_db(c.out);
        if (runs && rdb_open(&db, runs, &err) == LK_OK) {
            have_db = 1;
            char params[1024];
            snprintf(params, sizeof params,
                     "{\"mode\":\"%s\",\"rank\":%ld,\"alpha\":%g,\"dropout\":%g,\"targets\":\"%s\","
                     "\"rslora\":%s,\"init\":\"%s\",\"lr\":%g,\"steps\":%ld,\"batch\":%ld,\"grad_accum\":%ld,"
                     "\"seq\":%ld,\"pack\":%s,\"warmup\":%ld,\"schedule\":\"%s\",\"weight_decay\":%g,"
                     "\"clip\":%g,\"seed\":%ld,\"loraplus_ratio\":%g,\"trainable_params\":%zu,"
                     "\"all_params\":%zu,\"records\":%d,\"tokens\":%zu,\"truncated\":%d}",
                     c.full ? "full" : "lora", c.rank, c.alpha, c.dropout, c.targets, c.rslora ? "true" : "false",
                     c.init, o.lr, st.total, c.batch, c.grad_accum, c.seq, c.pack ? "true" : "false", c.warmup,
                     c.schedule, c.weight_decay, c.clip, c.seed, c.loraplus, trainable, all, d.n, d.n_tokens,
                     d.n_truncated);
            if (rdb_run_begin(&db, "train", c.name ? c.name : c.out, c.model, c.data, params, &run_id, &err)) {
                rdb_close(&db, NULL);
                have_db = 0;
            }
        }
        if (!have_db && !c.quiet) {
            fprintf(stderr, "lorakit train: warning: runs database not written: %s\n", err.msg);
            err.code = LK_OK;
        }
    }
    struct progress_ctx pc = { have_db ? &db : NULL, run_id, isatty(2), c.log_every, c.quiet, 0, ranks };
    struct train_hooks hooks = { &pc, on_step, on_checkpoint };
    rc = train_run(&o, &m, c.full ? NULL : &l, &d, ev.n ? &ev : NULL, c.resume, &hooks, &st, &err);
    if (rc == LK_OK && !lead)
        goto done;
    if (rc == LK_OK && c.dump_grads) {
        fprintf(stderr, "wrote the first step's gradients (loss %.6f) to %s\n", st.last_loss, c.dump_grads);
        goto done;
    }
    if (rc)
        goto fail;
    // the result
    if (c.full) {
        int dtype = TENSOR_F32;
        if (!strcmp(c.dtype, "bf16"))
            dtype = TENSOR_BF16;
        else if (!strcmp(c.dtype, "f16"))
            dtype = TENSOR_F16;
        else if (!strcmp(c.dtype, "auto"))
            dtype = !strcmp(m.cfg.torch_dtype, "bfloat16") ? TENSOR_BF16
                    : !strcmp(m.cfg.torch_dtype, "float16") ? TENSOR_F16 : TENSOR_F32;
        rc = model_save(&m, c.out, dtype, &err);
        if (!rc && tk)
            rc = copy_side_files(c.tokenizer ? c.tokenizer : c.model, c.model, c.out, &err);
    } else {
        rc = pissa ? lora_save_pissa(&l, &m, c.out, &err) : lora_save(&l, c.out, &err);
    }
    if (rc)
        goto fail;
    double secs = lk_now() - t0;
    char rk[64] = "";
    if (ranks > 1)
        snprintf(rk, sizeof rk, " (%d ranks, %.0f/rank)", ranks, st.tokens_per_s / ranks);
    if (!c.quiet)
        fprintf(stderr, "done: %ld steps in %.1fs, loss %.4f -> %.4f, %.0f tok/s%s, wrote %s\n", st.step, secs,
                st.first_loss, st.last_loss, st.tokens_per_s, rk, c.out);
    if (have_db) {
        char summary[512], evs[32] = "null";
        if (ev.n && isfinite(st.last_eval_loss))
            snprintf(evs, sizeof evs, "%.6g", st.last_eval_loss);
        snprintf(summary, sizeof summary,
                 "{\"steps\":%ld,\"first_loss\":%.6g,\"final_loss\":%.6g,\"eval_loss\":%s,\"seconds\":%.3f,"
                 "\"tokens_per_s\":%.1f,\"truncated\":%d,\"skipped\":%d}",
                 st.step, st.first_loss, st.last_loss, evs, secs, st.tokens_per_s, d.n_truncated, d.n_skipped);
        rdb_run_finish(&db, run_id, RDB_DONE, summary, NULL);
    }
    printf("%s\n", c.out);
fail:
    if (rc && have_db)
        rdb_run_finish(&db, run_id, rc == LK_ERR_INTERRUPTED ? RDB_INTERRUPTED : RDB_FAILED, NULL, NULL);
done:
    if (have_db)
        rdb_close(&db, NULL);
    lk_free(runs);
    data_release(&d);
    data_release(&ev);
    tok_free(tk);
    lora_release(&l);
    model_release(&m);
    if (!rc)
        return 0;
    if (rc == LK_ERR_INTERRUPTED) {
        if (lead)
            fprintf(stderr, "lorakit train: %s\n", err.msg);
        return 130;
    }
    return lk_cli_fail("train", &err);
}
