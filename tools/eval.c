/*
 * eval.c - `lorakit eval`: base / rag / ft / ft+rag on the same questions, with bootstrap
 * intervals, paired differences, a one-line verdict, and everything in the runs database.
 * The work is eval/harness.c; this file loads the inputs, prints, and keeps the run record
 * honest (a run that fails after it was recorded is finished as 'failed').
 */
#include <cblas.h>
#include <cJSON.h>
#include <math.h>
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "../eval/fts.h"
#include "../eval/harness.h"
#include "../libcore/chat.h"
#include "../libcore/lora.h"
#include "../libcore/model.h"
#include "../libcore/rdb.h"
#include "../libcore/tok.h"
#include "commands.h"
#include "opts.h"

static const struct cmd_help eval_help = {
    "eval",
    "--model BASE [--adapter DIR | --tuned DIR] --qa FILE.jsonl (--docs FILE.jsonl | --index DB) [options]",
    "Answers the same questions in four modes: base (closed book), rag (base + the top-k FTS5\n"
    "passages as \"Context:\\n<p1>\\n\\n<p2>\\n\\nQuestion: <q>\"), ft (the tuned model: base + --adapter,\n"
    "or the --tuned model folder) and ft+rag. Scores: exact match, token F1 and ROUGE-L of the greedy\n"
    "answer (SQuAD normalisation), the teacher-forced NLL per token of the reference, recall@k of the\n"
    "item's doc_id, answer@k (the reference is in a passage of the prompt); multiple-choice items ({question, choices, answer_index}) by the log-likelihood\n"
    "of each choice (accuracy). Prints means with 95% bootstrap intervals, the paired differences\n"
    "ft - rag and ft+rag - rag, and a one-line verdict; records items, answers, passages, scores and\n"
    "the summary in the runs database. QA lines: {\"id\", \"question\", \"answer\", \"doc_id\"}.",
    "  lorakit eval --model base --adapter med-lora --qa qa_test.jsonl --docs docs.jsonl --show 5\n"
    "  lorakit eval --model base --tuned base-full --qa qa.jsonl --index docs.db --k 0,1,3,5 --json",
};

struct eval_cli {
    const char *model, *adapter, *tuned, *qa, *docs, *index, *modes, *k, *runs, *fts_tok, *tmpl, *name;
    long max_new, limit, show, seed, threads, chunk_tokens, overlap;
    int json, quiet;
};

struct progress {
    int tty, quiet;
    double t0, last;
};

static void on_progress(void *ctx, int done, int total)
{
    struct progress *p = ctx;
    if (p->quiet)
        return;
    double now = lk_now();
    if (p->tty) {
        if (now - p->last < 0.2 && done != total)
            return;
        p->last = now;
        fprintf(stderr, "\r\033[Kquestion %d/%d  %.1fs", done, total, now - p->t0);
        if (done == total)
            fprintf(stderr, "\n");
    } else if (done == total || now - p->last >= 10) {
        p->last = now;
        fprintf(stderr, "question %d/%d  %.1fs\n", done, total, now - p->t0);
    }
}

static int same_arch(const struct cfg *a, const struct cfg *b, const char *adir, const char *bdir,
                     struct lk_err *err)
{
#define SAME(f)                                                                                    \
    if (a->f != b->f)                                                                              \
        return lk_errf(err, LK_ERR_SHAPE, "tuned model '%s' has " #f " %d, base '%s' has %d: a tuned "  \
                       "model must have the base's architecture", adir, (int)a->f, bdir, (int)b->f)
    if (strcmp(a->architecture, b->architecture))
        return lk_errf(err, LK_ERR_SHAPE, "tuned model '%s' is a %s, base '%s' a %s: a tuned model must "
                       "have the base's architecture", adir, a->architecture, bdir, b->architecture);
    SAME(hidden_size);
    SAME(intermediate_size);
    SAME(num_hidden_layers);
    SAME(num_attention_heads);
    SAME(num_key_value_heads);
    SAME(head_dim);
    SAME(vocab_size);
    SAME(attention_bias);
#undef SAME
    return LK_OK;
}

static char *params_json(const struct eval_cli *c, const struct ev_mode *modes, int n_modes)
{
    cJSON *o = cJSON_CreateObject();
    if (!o)
        return NULL;
    cJSON_AddStringToObject(o, "qa", c->qa);
    if (c->adapter)
        cJSON_AddStringToObject(o, "adapter", c->adapter);
    if (c->tuned)
        cJSON_AddStringToObject(o, "tuned", c->tuned);
    if (c->docs)
        cJSON_AddStringToObject(o, "docs", c->docs);
    if (c->index)
        cJSON_AddStringToObject(o, "index", c->index);
    cJSON *m = cJSON_AddArrayToObject(o, "modes");
    for (int j = 0; m && j < n_modes; j++)
        cJSON_AddItemToArray(m, cJSON_CreateString(modes[j].name));
    cJSON_AddStringToObject(o, "k", c->k);
    cJSON_AddNumberToObject(o, "max_new", (double)c->max_new);
    cJSON_AddNumberToObject(o, "limit", (double)c->limit);
    cJSON_AddNumberToObject(o, "seed", (double)c->seed);
    cJSON_AddStringToObject(o, "fts_tokenizer", c->fts_tok ? c->fts_tok : "unicode61");
    char *s = cJSON_PrintUnformatted(o);
    cJSON_Delete(o);
    char *r = s ? lk_strdup(s) : NULL;
    free(s);
    return r;
}

static void print_table(const struct ev_run *r, const struct ev_summary *s)
{
    int has[EV_N_METRICS] = { 0 };
    for (int i = 0; i < s->n_stats; i++)
        has[s->stats[i].metric] = 1;
    printf("%-12s %5s", "mode", "n");
    for (int m = 0; m < EV_N_METRICS; m++)
        if (has[m])
            printf("  %-21s", ev_metric_labels[m]);
    printf("  %8s\n", "time");
    for (int j = 0; j < r->n_modes; j++) {
        printf("%-12s %5d", r->modes[j].name, r->n_items);
        for (int m = 0; m < EV_N_METRICS; m++) {
            if (!has[m])
                continue;
            const struct ev_stat *st = ev_summary_stat(s, j, (enum ev_metric)m);
            char cell[64] = "-";
            if (st)
                snprintf(cell, sizeof cell, "%.3f [%.3f, %.3f]", st->ci.mean, st->ci.lo, st->ci.hi);
            printf("  %-21s", cell);
        }
        printf("  %7.1fs\n", r->seconds[j]);
    }
    int any = 0;
    for (int i = 0; i < s->n_diffs; i++) {
        const struct ev_diff *d = &s->diffs[i];
        if (d->metric != EV_F1 && d->metric != EV_EM && d->metric != EV_ACC && d->metric != EV_NLL)
            continue;
        if (!any++)
            printf("\npaired differences (95%% bootstrap interval):\n");
        char pair[64];
        snprintf(pair, sizeof pair, "%s - %s", r->modes[d->a].name, r->modes[d->b].name);
        printf("  %-22s %-10s %+.3f [%+.3f, %+.3f]%s\n", pair, ev_metric_labels[d->metric], d->ci.mean, d->ci.lo,
               d->ci.hi, d->ci.lo > 0 || d->ci.hi < 0 ? "" : "  (includes 0)");
    }
    printf("\nverdict: %s\n", s->verdict);
}

static void print_one_line(const char *label, const char *s)
{
    printf("  %-10s ", label);
    for (; s && *s; s++)
        putchar(*s == '\n' ? ' ' : *s);
    putchar('\n');
}

static void print_show(const struct ev_qa *qa, const struct ev_run *r, int n)
{
    for (int i = 0; i < n && i < qa->n; i++) {
        const struct ev_item *it = &qa->items[i];
        printf("\n--- %s ---\n", it->id);
        print_one_line("question", it->question);
        print_one_line("reference", it->choices ? it->choices[it->answer_index] : it->answer);
        for (int j = 0; j < r->n_modes; j++) {
            const struct ev_cell *c = ev_run_cell(r, i, j);
            char label[32];
            snprintf(label, sizeof label, "%s:", r->modes[j].name);
            print_one_line(label, c->answer);
        }
    }
}

int cmd_eval(int argc, char **argv)
{
    struct eval_cli c = { .k = "3", .max_new = 32, .seed = 42, .runs = "runs.db", .chunk_tokens = 200,
                          .overlap = 40 };
    const struct opt opts[] = {
        { "model", OPT_STR, &c.model, "DIR", "base model folder (config.json, safetensors, tokenizer.json)" },
        { "adapter", OPT_STR, &c.adapter, "DIR", "tuned = base + this PEFT LoRA adapter" },
        { "tuned", OPT_STR, &c.tuned, "DIR", "tuned = this fine-tuned model folder (same architecture)" },
        { "qa", OPT_STR, &c.qa, "FILE", "questions, JSONL: {id, question, answer, doc_id} or {question, choices, answer_index}" },
        { "docs", OPT_STR, &c.docs, "FILE", "documents, JSONL {id, title, text}: indexed for this run" },
        { "index", OPT_STR, &c.index, "DB", "an index made by `lorakit index`" },
        { "modes", OPT_STR, &c.modes, "LIST", "base,rag,ft,ft+rag (default: those the inputs allow)" },
        { "k", OPT_STR, &c.k, "K", "passages per question, or a sweep like 0,1,3,5 (default 3)" },
        { "max-new", OPT_INT, &c.max_new, "N", "answer tokens at most (default 32)" },
        { "limit", OPT_INT, &c.limit, "N", "only the first N questions" },
        { "runs", OPT_STR, &c.runs, "DB", "runs database (default runs.db)" },
        { "name", OPT_STR, &c.name, "NAME", "run name in the runs database" },
        { "json", OPT_FLAG, &c.json, NULL, "print the summary as JSON" },
        { "show", OPT_INT, &c.show, "N", "print N items: question, reference and each mode's answer" },
        { "seed", OPT_INT, &c.seed, "S", "bootstrap seed (default 42)" },
        { "template", OPT_STR, &c.tmpl, "NAME", "chat template: chatml, llama3, plain (default: from the tokenizer)" },
        { "fts-tokenizer", OPT_STR, &c.fts_tok, "T", "unicode61, porter or trigram (--docs: default unicode61; "
                                                      "--index: the index must match)" },
        { "chunk-tokens", OPT_INT, &c.chunk_tokens, "N", "--docs: words per chunk (default 200)" },
        { "overlap", OPT_INT, &c.overlap, "M", "--docs: words shared by consecutive chunks (default 40)" },
        { "threads", OPT_INT, &c.threads, "N", "threads (default: all cores)" },
        { "quiet", OPT_FLAG, &c.quiet, NULL, "no progress output" },
        { 0 },
    };
    struct lk_err err = { 0 };
    int help;
    if (opts_parse(argc, argv, opts, NULL, 0, NULL, &help, &err))
        return lk_cli_fail("eval", &err);
    if (help) {
        opts_usage(stdout, &eval_help, opts);
        return 0;
    }
    if (!c.model || !c.qa) {
        lk_errf(&err, LK_ERR_USAGE, "--model and --qa are required (see --help)");
        return lk_cli_fail("eval", &err);
    }
    if ((c.adapter && c.tuned) || (c.docs && c.index)) {
        lk_errf(&err, LK_ERR_USAGE, "give --adapter or --tuned, and --docs or --index, not both");
        return lk_cli_fail("eval", &err);
    }
    if (c.max_new < 1 || c.max_new > 100000 || c.limit < 0 || c.show < 0 || c.seed < 0 || c.chunk_tokens < 1 ||
        c.overlap < 0 || c.overlap >= c.chunk_tokens) {
        lk_errf(&err, LK_ERR_USAGE, "an option is out of range (see --help)");
        return lk_cli_fail("eval", &err);
    }
    long *kl = NULL;
    int nk = 0;
    if (opts_parse_longs(c.k, &kl, &nk, &err))
        return lk_cli_fail("eval", &err);
    int ks[32];
    for (int i = 0; i < nk && i < 32; i++)
        ks[i] = kl[i] < 0 || kl[i] > 64 ? -1 : (int)kl[i];
    lk_free(kl);
    int have_docs = c.docs || c.index, have_tuned = c.adapter || c.tuned;
    char deflist[32];
    snprintf(deflist, sizeof deflist, "base%s%s%s", have_docs ? ",rag" : "", have_tuned ? ",ft" : "",
             have_docs && have_tuned ? ",ft+rag" : "");
    struct ev_mode *modes = NULL;
    int n_modes = 0, kmax = 0, need_tuned = 0;
    if (ev_modes_parse(c.modes ? c.modes : deflist, ks, nk > 32 ? 33 : nk, &modes, &n_modes, &err))
        return lk_cli_fail("eval", &err);
    for (int j = 0; j < n_modes; j++) {
        kmax = modes[j].k > kmax ? modes[j].k : kmax;
        need_tuned |= modes[j].tuned;
    }
    if ((kmax > 0 && !have_docs) || (need_tuned && !have_tuned)) {
        lk_errf(&err, LK_ERR_USAGE, "%s", kmax > 0 && !have_docs ? "the rag modes need --docs or --index"
                                                                 : "the ft modes need --adapter or --tuned");
        lk_free(modes);
        return lk_cli_fail("eval", &err);
    }
    enum fts_tokenizer ftok = FTS_TOK_ANY;
    if (c.fts_tok && fts_tokenizer_parse(c.fts_tok, &ftok, &err)) {
        lk_free(modes);
        return lk_cli_fail("eval", &err);
    }
    if (c.threads > 0) {
        openblas_set_num_threads((int)c.threads);
        omp_set_num_threads((int)c.threads);
    }
    lk_interrupt_install();

    struct ev_qa qa = { 0 };
    struct model base = { 0 }, tuned = { 0 };
    struct lora l = { 0 };
    struct tok *tk = NULL;
    struct fts_index idx = { 0 };
    struct rdb db = { 0 };
    struct ev_run run = { 0 };
    struct ev_summary sum = { 0 };
    struct chat_fmt fmt;
    char tmp_index[4200] = "";
    char *params = NULL, *summary = NULL;
    int have_db = 0, have_idx = 0, have_l = 0, have_t = 0, rc;
    int64_t run_id = 0;
    // 1. inputs, all checked before the run is recorded
    if ((rc = ev_qa_load(&qa, c.qa, (int)c.limit, &err)))
        goto out;
    if ((rc = model_load(&base, c.model, &err)) || (rc = tok_load(&tk, c.model, &err)))
        goto out;
    if (tok_vocab_size(tk) > base.cfg.vocab_size) {
        rc = lk_errf(&err, LK_ERR_SHAPE, "%s: the tokenizer has %d ids, the model's vocabulary %d", c.model,
                     (int)tok_vocab_size(tk), base.cfg.vocab_size);
        goto out;
    }
    if ((rc = chat_fmt_init(&fmt, tk, c.tmpl, &err)))
        goto out;
    if (c.adapter && need_tuned) {
        if ((rc = lora_load(&l, c.adapter, &base.cfg, &err)))
            goto out;
        have_l = 1;
        if (l.n_extra) {
            rc = lk_errf(&err, LK_ERR_UNSUPPORTED, "%s: the adapter carries modules_to_save tensors, which would "
                         "change the base modes too: merge it (lorakit merge) and pass the result as --tuned",
                         c.adapter);
            goto out;
        }
    }
    if (c.tuned && need_tuned) {
        if ((rc = model_load(&tuned, c.tuned, &err)))
            goto out;
        have_t = 1;
        if ((rc = same_arch(&tuned.cfg, &base.cfg, c.tuned, c.model, &err)))
            goto out;
    }
    if (kmax > 0) {
        if (c.docs) {
            const char *td = getenv("TMPDIR");
            snprintf(tmp_index, sizeof tmp_index, "%s/lorakit-eval-%ld.fts", td && *td ? td : "/tmp", (long)getpid());
            struct fts_settings st = { ftok == FTS_TOK_ANY ? FTS_TOK_UNICODE61 : ftok, (int)c.chunk_tokens,
                                       (int)c.overlap };
            if (!c.quiet)
                fprintf(stderr, "indexing %s (%s, %ld-word chunks)\n", c.docs, fts_tokenizer_name(st.tokenizer),
                        c.chunk_tokens);
            if ((rc = fts_index_build(c.docs, tmp_index, &st, 1, NULL, &err)))
                goto out;
            rc = fts_open(&idx, tmp_index, &err);
        } else {
            if (!(rc = fts_open(&idx, c.index, &err))) {
                struct fts_settings want = { ftok, 0, -1 };
                have_idx = 1;
                if ((rc = fts_index_check(&idx, &want, &err)))
                    rc = err.code = LK_ERR_FORMAT; // the index is bad input, not a bad flag
            }
        }
        if (rc)
            goto out;
        have_idx = 1;
    }
    // 2. the run record
    if (!(params = params_json(&c, modes, n_modes))) {
        rc = lk_errf(&err, LK_ERR_NOMEM, "out of memory");
        goto out;
    }
    if ((rc = rdb_open(&db, c.runs, &err)))
        goto out;
    have_db = 1;
    if ((rc = rdb_run_begin(&db, "eval", c.name ? c.name : c.qa, c.model, c.qa, params, &run_id, &err))) {
        rdb_close(&db, NULL);
        have_db = 0;
        goto out;
    }
    // 3. the work
    int maxpos = base.cfg.max_position_embeddings > 0 ? base.cfg.max_position_embeddings : 2048;
    struct ev_config ec = { tk, &fmt, &base, have_t ? &tuned : NULL, have_l ? &l : NULL, have_idx ? &idx : NULL,
                            (int)c.max_new, maxpos };
    struct progress pg = { isatty(2), c.quiet, lk_now(), 0 };
    if (!c.quiet)
        fprintf(stderr, "%d questions x %d modes, context %d, max-new %ld\n", qa.n, n_modes, maxpos, c.max_new);
    if ((rc = ev_run_all(&run, &ec, &qa, modes, n_modes, on_progress, &pg, &err)))
        goto out;
    if ((rc = ev_summarize(&run, (uint64_t)c.seed, &sum, &err)))
        goto out;
    if (!(summary = ev_summary_json(&run, &sum))) {
        rc = lk_errf(&err, LK_ERR_NOMEM, "out of memory");
        goto out;
    }
    if ((rc = ev_record(&db, run_id, &qa, &run, &sum, &err)) ||
        (rc = rdb_run_finish(&db, run_id, RDB_DONE, summary, &err)))
        goto out;
    // 4. the report
    if (c.json)
        printf("%s\n", summary);
    else
        print_table(&run, &sum);
    if (c.show)
        print_show(&qa, &run, (int)c.show);
    if (!c.quiet)
        fprintf(stderr, "recorded as run %lld in %s\n", (long long)run_id, c.runs);
out:
    if (rc && have_db) {
        rdb_run_finish(&db, run_id, rc == LK_ERR_INTERRUPTED ? RDB_INTERRUPTED : RDB_FAILED, NULL, NULL);
    }
    if (have_db)
        rdb_close(&db, NULL);
    if (have_idx)
        fts_close(&idx);
    if (tmp_index[0])
        unlink(tmp_index);
    lk_free(params);
    lk_free(summary);
    ev_summary_release(&sum);
    ev_run_release(&run);
    ev_qa_release(&qa);
    tok_free(tk);
    lora_release(&l);
    model_release(&tuned);
    model_release(&base);
    lk_free(modes);
    if (rc == LK_ERR_INTERRUPTED) {
        fprintf(stderr, "lorakit eval: %s\n", err.msg);
        return 130;
    }
    return rc ? lk_cli_fail("eval", &err) : 0;
}
