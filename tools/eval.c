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
#include "../eval/retain.h"
#include "../libcore/rdb.h"
#include "commands.h"
#include "opts.h"

#define EVAL_STR2(x) #x
#define EVAL_STR(x) EVAL_STR2(x)

static const struct cmd_help eval_help = {
    "eval",
    "--model BASE [--adapter DIR | --tuned DIR] [--system NAME=PATH ...] --qa FILE.jsonl (--docs FILE.jsonl | --index DB) [options]",
    "Answers the same questions in four modes: base (closed book), rag (base + the top-k FTS5\n"
    "passages as \"Context:\\n<p1>\\n\\n<p2>\\n\\nQuestion: <q>\"), ft (the tuned model: base + --adapter,\n"
    "or the --tuned model folder) and ft+rag. Scores: exact match, token F1 and ROUGE-L of the greedy\n"
    "answer (SQuAD normalisation), the teacher-forced NLL per token of the reference, recall@k of the\n"
    "item's doc_id, answer@k (the reference is in a passage of the prompt); multiple-choice items ({question, choices, answer_index}) by the log-likelihood\n"
    "of each choice (accuracy). Prints means with 95% bootstrap intervals, the paired differences\n"
    "ft - rag and ft+rag - rag, and a one-line verdict; records items, answers, passages, scores and\n"
    "the summary in the runs database. QA lines: {\"id\", \"question\", \"answer\", \"doc_id\"}.\n"
    "--system NAME=PATH (repeatable) adds tuned systems (an adapter or a model folder, each checked against\n"
    "the base first): modes NAME and NAME+rag on the same items and bootstrap resamples, and a verdict\n"
    "naming the best row per metric. --retain (QA the base knew; rag with --retain-docs) and\n"
    "--retain-text measure what each system forgot (base - system, NLL: system - base) next to what it\n"
    "learned (system - base on --qa).",
    "  lorakit eval --model base --adapter med-lora --qa qa_test.jsonl --docs docs.jsonl --show 5\n"
    "  lorakit eval --model base --tuned base-full --qa qa.jsonl --index docs.db --k 0,1,3,5 --json\n"
    "  lorakit eval --model base --system lora=med-lora --system full=base-full --qa new_qa.jsonl \\\n"
    "      --docs new_docs.jsonl --retain old_qa.jsonl --retain-docs old_docs.jsonl --retain-text old.jsonl",
};

struct eval_cli {
    const char *model, *adapter, *tuned, *qa, *docs, *index, *modes, *k, *runs, *fts_tok, *tmpl, *name;
    long max_new, limit, show, seed, threads, chunk_tokens, overlap, batch;
    const char *weights;
    int keep;
    int json, quiet;
    struct opt_list systems;
    const char *retain, *retain_docs, *retain_text;
};

struct progress {
    int tty, quiet;
    double t0, last;
    const char *what;  /* "question", "retain question", "text" */
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
        fprintf(stderr, "\r\033[K%s %d/%d  %.1fs", p->what, done, total, now - p->t0);
        if (done == total)
            fprintf(stderr, "\n");
    } else if (done == total || now - p->last >= 10) {
        p->last = now;
        fprintf(stderr, "%s %d/%d  %.1fs\n", p->what, done, total, now - p->t0);
    }
}

static void add_str(cJSON *o, const char *key, const char *v)
{
    if (v)
        cJSON_AddStringToObject(o, key, v);
}

/* The run record's parameters (as the record always had them; the new flags when given). */
static cJSON *params_json(const struct eval_cli *c, const struct ev_mode *modes, int n_modes)
{
    cJSON *o = cJSON_CreateObject();
    cJSON_AddStringToObject(o, "qa", c->qa);
    add_str(o, "adapter", c->adapter);
    add_str(o, "tuned", c->tuned);
    add_str(o, "docs", c->docs);
    add_str(o, "index", c->index);
    cJSON *m = cJSON_AddArrayToObject(o, "modes");
    for (int j = 0; m && j < n_modes; j++)
        cJSON_AddItemToArray(m, cJSON_CreateString(modes[j].name));
    cJSON_AddStringToObject(o, "k", c->k);
    cJSON_AddNumberToObject(o, "max_new", (double)c->max_new);
    cJSON_AddNumberToObject(o, "limit", (double)c->limit);
    cJSON_AddNumberToObject(o, "seed", (double)c->seed);
    cJSON_AddNumberToObject(o, "batch", (double)c->batch);
    cJSON_AddStringToObject(o, "fts_tokenizer", c->fts_tok ? c->fts_tok : "unicode61");
    if (c->systems.n) {
        cJSON *sy = cJSON_AddArrayToObject(o, "systems");
        for (int i = 0; sy && i < c->systems.n; i++)
            cJSON_AddItemToArray(sy, cJSON_CreateString(c->systems.v[i]));
    }
    add_str(o, "retain", c->retain);
    add_str(o, "retain_docs", c->retain_docs);
    add_str(o, "retain_text", c->retain_text);
    return o;
}

static void print_table(const struct ev_run *r, const struct ev_summary *s)
{
    int has[EV_N_METRICS] = { 0 };
    for (int i = 0; i < s->n_stats; i++)
        has[s->stats[i].metric] = 1;
    int w = 12;
    for (int j = 0; j < r->n_modes; j++)
        w = (int)strlen(r->modes[j].name) > w ? (int)strlen(r->modes[j].name) : w;
    printf("%-*s %5s", w, "mode", "n");
    for (int m = 0; m < EV_N_METRICS; m++)
        if (has[m])
            printf("  %-21s", ev_metric_labels[m]);
    printf("  %8s\n", "time");
    for (int j = 0; j < r->n_modes; j++) {
        printf("%-*s %5d", w, r->modes[j].name, r->n_items);
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
    int any = 0, pw = 22;
    for (int i = 0; i < s->n_diffs; i++) {
        int n = (int)(strlen(r->modes[s->diffs[i].a].name) + strlen(r->modes[s->diffs[i].b].name)) + 3;
        pw = n > pw ? n : pw;
    }
    for (int i = 0; i < s->n_diffs; i++) {
        const struct ev_diff *d = &s->diffs[i];
        if (d->metric != EV_F1 && d->metric != EV_EM && d->metric != EV_ACC && d->metric != EV_NLL)
            continue;
        if (!any++)
            printf("\npaired differences (95%% bootstrap interval):\n");
        char pair[80];
        snprintf(pair, sizeof pair, "%s - %s", r->modes[d->a].name, r->modes[d->b].name);
        printf("  %-*s %-10s %+.3f [%+.3f, %+.3f]%s\n", pw, pair, ev_metric_labels[d->metric], d->ci.mean, d->ci.lo,
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
            char label[48];
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

/* "+0.012 [-0.010, +0.030]" in a column of w (0: no padding); -0 prints as +0. */
static void print_ci(const char *prefix, const struct ev_ci *ci, int w)
{
    char cell[80];
    snprintf(cell, sizeof cell, "%s%+.3f [%+.3f, %+.3f]", prefix, ci->mean + 0.0, ci->lo + 0.0, ci->hi + 0.0);
    printf("  %-*s", w, cell);
}

/* The forgot figure shown beside learned for a retain set (prefix "closed", "rag", "rag@3",
 * "text"): its headline metric when the base leaves room to forget, else its NLL. */
static const struct ev_forget *forgot_pick(const struct ev_retention *r, int sys, const char *prefix)
{
    const struct ev_forget *head = NULL, *nll = NULL;
    size_t n = strlen(prefix);
    for (int i = 0; i < r->n_f; i++) {
        const struct ev_forget *f = &r->f[i];
        if (f->sys != sys || strncmp(f->metric, prefix, n) || f->metric[n] != '.')
            continue;
        if (!strcmp(f->metric + n + 1, ev_metric_names[r->headline]) && !f->no_room)
            head = f;
        if (!strcmp(f->metric + n + 1, "nll"))
            nll = f;
    }
    return head ? head : nll;
}

static void print_retention(const struct ev_retention *r)
{
    printf("\nretention (forgetting = base - system; NLL: system - base; > 0 means forgotten; 95%% bootstrap "
           "interval):\n  %-12s %-14s %7s %7s  %s\n", "system", "metric", "base", "system", "forgetting");
    for (int i = 0; i < r->n_f; i++) {
        const struct ev_forget *f = &r->f[i];
        printf("  %-12s %-14s %7.3f %7.3f", r->names[f->sys], f->metric, f->base, f->value);
        print_ci("", &f->forgetting, f->no_room ? 25 : 0);
        if (f->no_room)
            printf("  no room to forget: the base scores %.3f", f->base);
        printf("\n");
    }
    // the sets, in order of first appearance (system 0's rows hold every set)
    char sets[16][40];
    int ns = 0;
    for (int i = 0; i < r->n_f && ns < 16; i++) {
        char p[40];
        snprintf(p, sizeof p, "%.*s", (int)(strrchr(r->f[i].metric, '.') - r->f[i].metric), r->f[i].metric);
        int seen = 0;
        for (int j = 0; j < ns; j++)
            seen |= !strcmp(sets[j], p);
        if (!seen)
            memcpy(sets[ns++], p, sizeof p);
    }
    char head[48];
    snprintf(head, sizeof head, "learned %s", ev_metric_labels[r->headline]);
    printf("\nlearned against forgot (learned = system - base on the questions, closed book):\n  %-12s  %-25s",
           "system", head);
    for (int j = 0; j < ns; j++) {
        const struct ev_forget *f = forgot_pick(r, 0, sets[j]);
        char col[64];
        snprintf(col, sizeof col, "forgot %.47s", f ? f->metric : sets[j]);
        printf(j + 1 < ns ? "  %-25s" : "  %s", col);
    }
    printf("\n");
    for (int sy = 0; sy < r->n_systems; sy++) {
        const struct ev_learned *l = ev_retention_learned(r, sy, r->headline);
        static const struct ev_ci none = { NAN, NAN, NAN, 0, 0 };
        printf("  %-12s", r->names[sy]);
        print_ci("", l ? &l->gain : &none, 25);
        for (int j = 0; j < ns; j++) {
            const struct ev_forget *f = forgot_pick(r, sy, sets[j]);
            print_ci("", f ? &f->forgetting : &none, j + 1 < ns ? 25 : 0);
        }
        printf("\n");
    }
    for (int i = 0; i < r->n_f; i++)
        if (r->f[i].no_room && r->f[i].sys == 0)
            printf("note: the base scores %.3f on %s: no room to forget, so that row measures nothing\n",
                   r->f[i].base, r->f[i].metric);
}

/* Everything a run computes. */
struct eval_out {
    struct ev_run run, retain;
    struct ev_text_run text;
    struct ev_summary sum;
    struct ev_retention ret;
    int has_ret;
    cJSON *summary;
};

static void eval_out_release(struct eval_out *x)
{
    cJSON_Delete(x->summary);
    ev_retention_release(&x->ret);
    ev_summary_release(&x->sum);
    ev_text_run_release(&x->text);
    ev_run_release(&x->retain);
    ev_run_release(&x->run);
}

/* The systems as the summary names them: name, kind, path. */
static int systems_json(const struct ev_setup *s, cJSON *root)
{
    cJSON *a = cJSON_AddArrayToObject(root, "systems");
    for (int i = 0; a && i < s->n_systems; i++) {
        cJSON *o = cJSON_CreateObject();
        if (!o)
            return LK_ERR_NOMEM;
        cJSON_AddStringToObject(o, "name", s->systems[i].name);
        cJSON_AddStringToObject(o, "kind", s->systems[i].is_adapter ? "adapter" : "model");
        cJSON_AddStringToObject(o, "path", s->systems[i].path);
        cJSON_AddItemToArray(a, o);
    }
    return a ? LK_OK : LK_ERR_NOMEM;
}

/* The runs (questions, retain questions, texts), the summary and the retention figures. */
static int eval_work(const struct eval_cli *c, struct ev_setup *s, struct eval_out *x, struct lk_err *err)
{
    struct progress pg = { isatty(2), c->quiet, lk_now(), 0, "question" };
    if (!c->quiet)
        fprintf(stderr, "%d questions x %d modes, context %d, max-new %ld\n", s->qa.n, s->n_modes, s->cfg.max_ctx,
                c->max_new);
    int rc = ev_run_systems(&x->run, &s->cfg, s->systems, s->n_systems, &s->qa, s->modes, s->n_modes, on_progress,
                            &pg, err);
    if (!rc && s->retain_modes) {
        if (!c->quiet)
            fprintf(stderr, "retention: %d questions x %d modes\n", s->retain.n, s->n_retain_modes);
        pg = (struct progress){ isatty(2), c->quiet, lk_now(), 0, "retain question" };
        rc = ev_run_systems(&x->retain, &s->retain_cfg, s->systems, s->n_systems, &s->retain, s->retain_modes,
                            s->n_retain_modes, on_progress, &pg, err);
    }
    if (!rc && s->text) {
        pg = (struct progress){ isatty(2), c->quiet, lk_now(), 0, "text" };
        rc = ev_text_run_all(&x->text, &s->cfg, s->systems, s->n_systems, s->text, on_progress, &pg, err);
    }
    if (!rc)
        rc = ev_summarize(&x->run, (uint64_t)c->seed, &x->sum, err);
    x->has_ret = s->retain_modes || s->text;
    if (!rc && x->has_ret)
        rc = ev_retention_compute(&x->run, &x->sum, s->retain_modes ? &x->retain : NULL, s->text ? &x->text : NULL,
                                  s->n_systems, s->names, (uint64_t)c->seed, &x->ret, err);
    if (!rc && !(x->summary = ev_summary_obj(&x->run, &x->sum)))
        rc = lk_errf(err, LK_ERR_NOMEM, "out of memory");
    if (!rc && ((c->systems.n && systems_json(s, x->summary)) || (x->has_ret && ev_retention_json(&x->ret, x->summary))))
        rc = lk_errf(err, LK_ERR_NOMEM, "out of memory");
    return rc;
}

/* The run and its record (a database that cannot be written is a warning); prints the report. */
static int eval_run(const struct eval_cli *c, struct ev_setup *s, struct lk_err *err)
{
    struct eval_out x = { 0 };
    struct rdb_rec rec;
    char *runs = c->runs ? NULL : rdb_default_path(NULL);
    cJSON *params = params_json(c, s->modes, s->n_modes);
    if (rdb_rec_begin(&rec, c->runs ? c->runs : runs, "eval", c->name ? c->name : c->qa, c->model, c->qa, params))
        lk_cli_warn("eval", rec.warning);
    cJSON_Delete(params);
    int rc = eval_work(c, s, &x, err);
    struct lk_err e = { 0 };
    if (!rc && rec.active &&
        (ev_record(&rec.db, rec.run_id, &s->qa, &x.run, &x.sum, &e) ||
         (x.has_ret && ev_retention_record(&rec.db, rec.run_id, &x.ret, &e)))) {
        rdb_rec_drop(&rec, &e);
        lk_cli_warn("eval", rec.warning);
    }
    int64_t run_id = rec.active ? rec.run_id : 0;
    if (rdb_rec_finish(&rec, rc, x.summary)) {
        lk_cli_warn("eval", rec.warning);
        run_id = 0;
    }
    if (!rc) {
        char *js = c->json ? cJSON_PrintUnformatted(x.summary) : NULL;
        if (js)
            printf("%s\n", js);
        else
            print_table(&x.run, &x.sum);
        cJSON_free(js);
        if (!c->json && x.has_ret)
            print_retention(&x.ret);
        if (c->show)
            print_show(&s->qa, &x.run, (int)c->show);
        if (run_id && !c->quiet)
            fprintf(stderr, "recorded as run %lld in %s\n", (long long)run_id, c->runs ? c->runs : runs);
    }
    lk_free(runs);
    eval_out_release(&x);
    return rc;
}

int cmd_eval(int argc, char **argv)
{
    struct eval_cli c = { .k = "3", .max_new = 32, .seed = 42, .chunk_tokens = 200, .overlap = 40,
                          .batch = EV_BATCH_DEFAULT };
    const struct opt opts[] = {
        { "model", OPT_STR, &c.model, "DIR", "base model folder (config.json, safetensors, tokenizer.json)" },
        { "adapter", OPT_STR, &c.adapter, "DIR", "tuned = base + this PEFT LoRA adapter (the system 'ft')" },
        { "tuned", OPT_STR, &c.tuned, "DIR", "tuned = this fine-tuned model folder, same architecture (the system 'ft')" },
        { "system", OPT_LIST, &c.systems, "NAME=PATH", "one more tuned system: an adapter for --model or a model "
                                                       "folder (repeatable; modes NAME, NAME+rag)" },
        { "qa", OPT_STR, &c.qa, "FILE", "questions, JSONL: {id, question, answer, doc_id} or {question, choices, answer_index}" },
        { "docs", OPT_STR, &c.docs, "FILE", "documents, JSONL {id, title, text}: indexed for this run" },
        { "index", OPT_STR, &c.index, "DB", "an index made by `lorakit index`" },
        { "modes", OPT_STR, &c.modes, "LIST", "base,rag,ft,ft+rag (default: those the inputs allow)" },
        { "k", OPT_STR, &c.k, "K", "passages per question, or a sweep like 0,1,3,5 (default 3)" },
        { "max-new", OPT_INT, &c.max_new, "N", "answer tokens at most (default 32)" },
        { "limit", OPT_INT, &c.limit, "N", "only the first N questions (of --retain and --retain-text too)" },
        { "runs", OPT_STR, &c.runs, "DB", "runs database (default runs.db)" },
        { "name", OPT_STR, &c.name, "NAME", "run name in the runs database" },
        { "json", OPT_FLAG, &c.json, NULL, "print the summary as JSON" },
        { "show", OPT_INT, &c.show, "N", "print N items: question, reference and each mode's answer" },
        { "seed", OPT_INT, &c.seed, "S", "bootstrap seed (default 42)" },
        { "template", OPT_STR, &c.tmpl, "NAME", "chat template: chatml, qwen3, qwen3-nothink, llama3, llama3.2, plain (default: from the tokenizer)" },
        { "fts-tokenizer", OPT_STR, &c.fts_tok, "T", "unicode61, porter or trigram (--docs: default unicode61; "
                                                      "--index: the index must match)" },
        { "chunk-tokens", OPT_INT, &c.chunk_tokens, "N", "--docs: words per chunk (default 200)" },
        { "overlap", OPT_INT, &c.overlap, "M", "--docs: words shared by consecutive chunks (default 40)" },
        { "retain", OPT_STR, &c.retain, "FILE", "QA the base knew: forgetting, closed book (and rag with --retain-docs)" },
        { "retain-docs", OPT_STR, &c.retain_docs, "FILE", "documents for --retain's rag modes (indexed for this run)" },
        { "retain-text", OPT_STR, &c.retain_text, "FILE", "texts the base knew ({\"text\"} JSONL or lines): forgetting "
                                                         "in NLL per token" },
        { "batch", OPT_INT, &c.batch, "B", "questions x modes in flight, prefilled, scored and decoded together "
                                           "(default " EVAL_STR(EV_BATCH_DEFAULT) "; 1: one at a time)" },
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
    else if (c.batch < 1 || c.batch > EV_BATCH_MAX)
        lk_errf(&err, LK_ERR_USAGE, "--batch %ld: give 1 to %d (questions x modes in flight; 1: one at a time)",
                c.batch, EV_BATCH_MAX);
    else
        lk_cli_weights(c.weights, MODEL_KEEP_FILE, &c.keep, &err);
    struct ev_setup_opts so = { c.model, c.adapter, c.tuned, c.qa, c.docs, c.index, c.modes, c.k, c.tmpl,
                                c.fts_tok, (int)c.limit, (int)c.max_new, (int)c.chunk_tokens, (int)c.overlap,
                                on_indexing, &c, c.systems.v, c.systems.n, c.retain, c.retain_docs,
                                c.retain_text, c.keep, (int)c.batch };
    struct ev_setup s = { 0 };
    if (err.code || ev_setup_parse(&s, &so, &err)) {
        ev_setup_release(&s);
        return lk_cli_fail("eval", &err);
    }
    lk_cli_threads(c.threads);
    lk_interrupt_install();
    // the inputs, all checked before the run is recorded
    int rc = ev_setup_load(&s, &so, &err);
    for (int i = 0; !rc && i < s.n_systems; i++) // adapter_config.json keys a newer PEFT may have
        if (s.systems[i].is_adapter)
            lk_cli_adapter_keys("eval", s.systems[i].path, &s.systems[i].lora.cfg);
    if (!rc)
        rc = eval_run(&c, &s, &err);
    ev_setup_release(&s);
    return rc ? lk_cli_fail("eval", &err) : 0;
}
