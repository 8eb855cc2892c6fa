/*
 * eval.c - `lorakit eval`: base / rag / ft / ft+rag on the same questions, with bootstrap
 * intervals, paired differences, a one-line verdict, and everything in the runs database.
 * The work, set-up included, is eval/harness.c; this file parses flags, records the run
 * (rdb_rec: a run that fails after it began is finished as 'failed'; a database that cannot be
 * written is a warning) and prints.
 */
#include <cJSON.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "../eval/fts.h"
#include "../eval/harness.h"
#include "../libcore/rdb.h"
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
    const char *weights;
    int keep;
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

/* The run record's parameters (as the record always had them). */
static cJSON *params_json(const struct eval_cli *c, const struct ev_mode *modes, int n_modes)
{
    cJSON *o = cJSON_CreateObject();
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
    return o;
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

static void on_indexing(void *ctx, const char *docs, const struct fts_settings *st)
{
    const struct eval_cli *c = ctx;
    if (!c->quiet)
        fprintf(stderr, "indexing %s (%s, %d-word chunks)\n", docs, fts_tokenizer_name(st->tokenizer),
                st->chunk_tokens);
}

/* The run and its record (a database that cannot be written is a warning); prints the report. */
static int eval_run(const struct eval_cli *c, struct ev_setup *s, struct lk_err *err)
{
    struct ev_run run = { 0 };
    struct ev_summary sum = { 0 };
    struct rdb_rec rec;
    char *runs = c->runs ? NULL : rdb_default_path(NULL);
    cJSON *params = params_json(c, s->modes, s->n_modes), *summary = NULL;
    if (rdb_rec_begin(&rec, c->runs ? c->runs : runs, "eval", c->name ? c->name : c->qa, c->model, c->qa, params))
        lk_cli_warn("eval", rec.warning);
    cJSON_Delete(params);
    struct progress pg = { isatty(2), c->quiet, lk_now(), 0 };
    if (!c->quiet)
        fprintf(stderr, "%d questions x %d modes, context %d, max-new %ld\n", s->qa.n, s->n_modes, s->cfg.max_ctx,
                c->max_new);
    int rc = ev_run_all(&run, &s->cfg, &s->qa, s->modes, s->n_modes, on_progress, &pg, err);
    if (!rc)
        rc = ev_summarize(&run, (uint64_t)c->seed, &sum, err);
    if (!rc && !(summary = ev_summary_obj(&run, &sum)))
        rc = lk_errf(err, LK_ERR_NOMEM, "out of memory");
    struct lk_err e = { 0 };
    if (!rc && rec.active && ev_record(&rec.db, rec.run_id, &s->qa, &run, &sum, &e)) {
        rdb_rec_drop(&rec, &e);
        lk_cli_warn("eval", rec.warning);
    }
    int64_t run_id = rec.active ? rec.run_id : 0;
    if (rdb_rec_finish(&rec, rc, summary)) {
        lk_cli_warn("eval", rec.warning);
        run_id = 0;
    }
    if (!rc) {
        char *js = c->json ? cJSON_PrintUnformatted(summary) : NULL;
        if (js)
            printf("%s\n", js);
        else
            print_table(&run, &sum);
        cJSON_free(js);
        if (c->show)
            print_show(&s->qa, &run, (int)c->show);
        if (run_id && !c->quiet)
            fprintf(stderr, "recorded as run %lld in %s\n", (long long)run_id, c->runs ? c->runs : runs);
    }
    cJSON_Delete(summary);
    lk_free(runs);
    ev_summary_release(&sum);
    ev_run_release(&run);
    return rc;
}

int cmd_eval(int argc, char **argv)
{
    struct eval_cli c = { .k = "3", .max_new = 32, .seed = 42, .chunk_tokens = 200, .overlap = 40 };
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
        { "weights", OPT_STR, &c.weights, "W", "file (the file's bf16/f16 kept in memory; default) or f32" },
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
    if (!c.model || !c.qa)
        lk_errf(&err, LK_ERR_USAGE, "--model and --qa are required (see --help)");
    else if (c.max_new < 1 || c.max_new > 100000 || c.limit < 0 || c.show < 0 || c.seed < 0 || c.chunk_tokens < 1 ||
             c.overlap < 0 || c.overlap >= c.chunk_tokens)
        lk_errf(&err, LK_ERR_USAGE, "an option is out of range (see --help)");
    else
        lk_cli_weights(c.weights, MODEL_KEEP_FILE, &c.keep, &err);
    struct ev_setup_opts so = { c.model, c.adapter, c.tuned, c.qa, c.docs, c.index, c.modes, c.k, c.tmpl,
                                c.fts_tok, (int)c.limit, (int)c.max_new, (int)c.chunk_tokens, (int)c.overlap,
                                on_indexing, &c, c.keep };
    struct ev_setup s = { 0 };
    if (err.code || ev_setup_parse(&s, &so, &err)) {
        ev_setup_release(&s);
        return lk_cli_fail("eval", &err);
    }
    lk_cli_threads(c.threads);
    lk_interrupt_install();
    // the inputs, all checked before the run is recorded
    int rc = ev_setup_load(&s, &so, &err);
    if (!rc)
        rc = eval_run(&c, &s, &err);
    ev_setup_release(&s);
    return rc ? lk_cli_fail("eval", &err) : 0;
}
