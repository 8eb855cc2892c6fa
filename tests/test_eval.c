/*
 * test_eval.c - the eval harness: QA loading and its errors, the rag prompt format and its
 * fitting to the context, mode lists and the k sweep, aggregation (intervals around the mean,
 * paired difference signs), the verdict text, multiple-choice and reference log-likelihoods
 * against an independent model_forward, and `lorakit eval` end to end: a model trained in the
 * test to read its context answers from retrieved documents (rag far above base), bad inputs
 * leave no run marked 'running'. Several systems and retention: forgetting and its interval on
 * hand-worked items, systems sharing items and resamples (against a bootstrap written out here),
 * the verdict naming the best row, text NLL against model_forward, end to end with the runs
 * database, a misfit system refused before any work, a whole-weight adapter against its merge.
 */
#include "test.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include <cJSON.h>
#include <sqlite3.h>

#include "../eval/harness.h"
#include "../eval/retain.h"
#include "../eval/text.h"
#include "../libcore/chat.h"
#include "../libcore/model.h"
#include "../libcore/rdb.h"
#include "../libcore/tensor.h"
#include "../libcore/tok.h"
#include "fix_model.h"

static int write_file(const char *name, const char *text)
{
    FILE *f = fopen(test_path(name), "w");
    if (!f)
        return -1;
    fputs(text, f);
    return fclose(f);
}

// ---- questions ----

/* Loads a one-file QA set and expects an error mentioning want (NULL: success). */
static int qa_try(const char *text, const char *want)
{
    struct ev_qa qa;
    if (write_file("qa.jsonl", text))
        return -1;
    int rc = ev_qa_load(&qa, test_path("qa.jsonl"), 0, test_err());
    if (!want) {
        if (rc)
            return -2;
        ev_qa_release(&qa);
        return 0;
    }
    if (rc != LK_ERR_FORMAT) {
        if (!rc)
            ev_qa_release(&qa);
        return -3;
    }
    return strstr(test_errmsg(), want) ? 0 : -4;
}

TEST(ev_qa_load_fields_and_errors)
{
    struct ev_qa qa;
    CHECK_INT(write_file("qa.jsonl", "{\"id\":\"a\",\"question\":\"Q1?\",\"answer\":\"x\",\"doc_id\":\"d1\"}\n\n"
                                     "{\"question\":\"Q2?\",\"choices\":[\"p\",\"q\",\"r\"],\"answer_index\":2}\n"
                                     "{\"id\":7,\"question\":\"Q3?\",\"answer\":\"y\",\"extra\":1}\n"), 0);
    CHECK_OK(ev_qa_load(&qa, test_path("qa.jsonl"), 0, test_err()));
    CHECK_INT(qa.n, 3);
    CHECK_INT(qa.n_mc, 1);
    CHECK(!strcmp(qa.items[0].id, "a") && !strcmp(qa.items[0].doc_id, "d1") && !strcmp(qa.items[0].answer, "x"));
    CHECK(!strcmp(qa.items[1].id, "line 3") && qa.items[1].n_choices == 3 && qa.items[1].answer_index == 2);
    CHECK(qa.items[1].answer == NULL && qa.items[1].line == 3);
    CHECK(!strcmp(qa.items[2].id, "7") && qa.items[2].doc_id == NULL);
    ev_qa_release(&qa);
    ev_qa_release(&qa);
    CHECK_OK(ev_qa_load(&qa, test_path("qa.jsonl"), 2, test_err())); // --limit
    CHECK_INT(qa.n, 2);
    ev_qa_release(&qa);
    CHECK_INT(qa_try("{\"question\":\"a\",\"answer\":\"b\"}\n{\"answer\":\"b\"}\n", "qa.jsonl:2: missing field 'question'"), 0);
    CHECK_INT(qa_try("{\"question\":\"a\"}\n", "qa.jsonl:1: missing field 'answer'"), 0);
    CHECK_INT(qa_try("{\"question\":\"a\",\"answer\":3}\n", "qa.jsonl:1: field 'answer' must be a string"), 0);
    CHECK_INT(qa_try("{\"question\":\"a\",\"answer\":\"b\"\n", "qa.jsonl:1: not a JSON object"), 0);
    CHECK_INT(qa_try("[1,2]\n", "qa.jsonl:1: not a JSON object"), 0);
    CHECK_INT(qa_try("{\"question\":\"a\",\"choices\":[\"x\"],\"answer_index\":0}\n", "at least 2"), 0);
    CHECK_INT(qa_try("{\"question\":\"a\",\"choices\":[\"x\",\"y\"]}\n", "missing field 'answer_index'"), 0);
    CHECK_INT(qa_try("{\"question\":\"a\",\"choices\":[\"x\",\"y\"],\"answer_index\":2}\n", "'answer_index' must be"), 0);
    CHECK_INT(qa_try("{\"question\":\"a\",\"choices\":[\"x\",\"\"],\"answer_index\":0}\n", "choice 1"), 0);
    CHECK_INT(qa_try("{\"id\":\"z\",\"question\":\"a\",\"answer\":\"b\"}\n{\"id\":\"z\",\"question\":\"c\",\"answer\":\"d\"}\n",
                     "qa.jsonl:2: duplicate id 'z' (first on line 1)"), 0);
    CHECK_INT(qa_try("{\"question\":\"  \",\"answer\":\"b\"}\n", "'question' is empty"), 0);
    CHECK_INT(qa_try("{\"question\":\"a\",\"answer\":\"b\",\"doc_id\":5}\n", "'doc_id' must be a string"), 0);
    CHECK_INT(qa_try("\n\n", "no question"), 0);
    CHECK(ev_qa_load(&qa, test_path("missing.jsonl"), 0, test_err()) == LK_ERR_IO);
}

// ---- prompts ----

/* A trained tokenizer (chatml template) in tmpdir/tok. */
static int make_tokenizer(void)
{
    FILE *f = fopen(test_path("corpus.txt"), "w");
    if (!f)
        return -1;
    for (int i = 0; i < 40; i++)
        fprintf(f, "Context: the code of item %d is %c. Question: what is the code of item %d? é中\n", i,
                'B' + i % 20, i);
    fclose(f);
    const char *files[1] = { test_path("corpus.txt") };
    struct tok_train_opts o = { files, 1, 300, NULL, 0, 0 };
    return tok_train(&o, test_path("tok"), test_err());
}

TEST(ev_rag_prompt_format_and_fitting)
{
    const char *ps[3] = { "first passage", "second one", "third" };
    char *s = ev_rag_text("What is X?", ps, 2);
    CHECK(s && !strcmp(s, "Context:\nfirst passage\n\nsecond one\n\nQuestion: What is X?"));
    lk_free(s);
    s = ev_rag_text("What is X?", ps, 0);
    CHECK(s && !strcmp(s, "What is X?"));
    lk_free(s);

    CHECK_OK(make_tokenizer());
    struct tok *tk;
    CHECK_OK(tok_load(&tk, test_path("tok"), test_err()));
    struct chat_fmt fmt;
    CHECK_OK(chat_fmt_init(&fmt, tk, NULL, test_err()));
    CHECK_INT(fmt.kind, CHAT_CHATML);
    // the prompt is exactly the chat template around the rag text
    struct tok_ids got = { 0 }, want = { 0 };
    int used;
    CHECK_OK(ev_prompt_build(tk, &fmt, "What is X?", ps, 3, 1000, &got, &used, test_err()));
    CHECK_INT(used, 3);
    s = ev_rag_text("What is X?", ps, 3);
    CHECK_OK(chat_prompt_user(tk, &fmt, NULL, s, &want, test_err()));
    lk_free(s);
    CHECK_INT(got.n, want.n);
    CHECK(memcmp(got.v, want.v, sizeof(int32_t) * got.n) == 0);
    char *text;
    CHECK_OK(tok_decode(tk, got.v, got.n, 0, &text, NULL, test_err()));
    CHECK_MSG(strstr(text, "<|im_start|>user\nContext:\nfirst passage\n\nsecond one\n\nthird\n\nQuestion: What is X?"
                           "<|im_end|>\n<|im_start|>assistant\n"), "prompt: %s", text);
    lk_free(text);
    // a budget between 2 and 3 passages keeps 2 (the lowest-ranked goes first)
    size_t n3 = got.n;
    s = ev_rag_text("What is X?", ps, 2);
    CHECK_OK(chat_prompt_user(tk, &fmt, NULL, s, &want, test_err()));
    lk_free(s);
    size_t n2 = want.n;
    CHECK(n2 < n3);
    CHECK_OK(ev_prompt_build(tk, &fmt, "What is X?", ps, 3, (int)n3 - 1, &got, &used, test_err()));
    CHECK_INT(used, 2);
    CHECK_INT(got.n, n2);
    // a long passage alone is cut to fit, at a character boundary
    char *longp = malloc(4000);
    for (int i = 0; i < 3990; i += 4)
        memcpy(longp + i, i % 8 ? "\xC3\xA9\xC3\xA9" : "ab c", 4); // "éé" or "ab c"
    longp[3990] = 0;
    const char *lp[1] = { longp };
    CHECK_OK(ev_prompt_build(tk, &fmt, "What is X?", lp, 1, 60, &got, &used, test_err()));
    CHECK_INT(used, 1);
    CHECK(got.n <= 60 && got.n >= 50);
    CHECK_OK(tok_decode(tk, got.v, got.n, 0, &text, NULL, test_err()));
    CHECK(tok_utf8_check(text, strlen(text)) == 0);
    CHECK(strstr(text, "Context:\nab c") && strstr(text, "\n\nQuestion: What is X?"));
    lk_free(text);
    // the question alone does not fit: an error
    CHECK(ev_prompt_build(tk, &fmt, longp, lp, 1, 60, &got, &used, test_err()) == LK_ERR_USAGE);
    free(longp);
    tok_ids_release(&got);
    tok_ids_release(&want);
    tok_free(tk);
}

/* answer@k against hand-worked cases: SQuAD normalisation on both sides, whole tokens only. */
TEST(ev_has_answer_cases)
{
    static const struct {
        const char *answer, *p1, *p2;
        int n;
        double want;
    } cases[] = {
        { "5 mg", "The usual dose is 5 mg.", NULL, 1, 1 },
        { "5 mg", "The usual dose is 25 mg.", NULL, 1, 0 },           // not inside a token
        { "Tab", "Tablet form only.", NULL, 1, 0 },
        { "the Liver", "It affects THE liver, mostly.", NULL, 1, 1 }, // case, article, punctuation
        { "X-ray", "an xray shows it", NULL, 1, 1 },                   // punctuation deleted
        { "tremor", "nausea", "Its main symptom is tremor", 2, 1 },    // any passage
        { "tremor", "nausea", "Its main symptom is tremor", 1, 0 },    // only the first n count
        { "", "anything", NULL, 1, 0 },                                // no tokens: never found
        { "a", "a cat", NULL, 1, 0 },                                  // "a" normalises to nothing
        { "mg", "mg", NULL, 1, 1 },
        { "tremor", "x", NULL, 0, 0 },
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        const char *ps[2] = { cases[i].p1, cases[i].p2 };
        double v = -1;
        CHECK_OK(ev_has_answer(cases[i].answer, ps, cases[i].n, &v, test_err()));
        CHECK_MSG(v == cases[i].want, "case %zu ('%s'): %g", i, cases[i].answer, v);
    }
}

TEST(ev_modes_and_k_sweep)
{
    struct ev_mode *m;
    int n, k3[1] = { 3 }, sweep[4] = { 0, 1, 3, 5 };
    CHECK_OK(ev_modes_parse("ft+rag,base,rag,ft", k3, 1, &m, &n, test_err()));
    CHECK_INT(n, 4);
    CHECK(!strcmp(m[0].name, "base") && !strcmp(m[1].name, "rag") && !strcmp(m[2].name, "ft") &&
          !strcmp(m[3].name, "ft+rag"));
    CHECK(m[1].k == 3 && !m[1].tuned && m[3].k == 3 && m[3].tuned && m[2].k == 0);
    lk_free(m);
    CHECK_OK(ev_modes_parse("base,rag,ft,ft+rag", sweep, 4, &m, &n, test_err()));
    CHECK_INT(n, 8); // base, rag@1, rag@3, rag@5, ft, ft+rag@1, ft+rag@3, ft+rag@5
    CHECK(!strcmp(m[1].name, "rag@1") && m[3].k == 5 && !strcmp(m[7].name, "ft+rag@5") && m[7].tuned);
    lk_free(m);
    CHECK(ev_modes_parse("base,foo", k3, 1, &m, &n, test_err()) == LK_ERR_USAGE);
    CHECK(ev_modes_parse("base,base", k3, 1, &m, &n, test_err()) == LK_ERR_USAGE);
    int k0[1] = { 0 }, kdup[2] = { 1, 1 };
    CHECK(ev_modes_parse("rag", k0, 1, &m, &n, test_err()) == LK_ERR_USAGE);
    CHECK(ev_modes_parse("rag", kdup, 2, &m, &n, test_err()) == LK_ERR_USAGE);
}

// ---- summary ----

TEST(ev_verdict_text)
{
    char buf[512];
    struct ev_ci d = { -0.21, -0.25, -0.17, 500, 1000 };
    ev_verdict("ft", "rag", "F1", &d, 0, buf, sizeof buf);
    CHECK_MSG(!strcmp(buf, "rag beats ft on F1 by 0.21 ± 0.04 on 500 questions"), "%s", buf);
    struct ev_ci e = { 0.10, 0.06, 0.14, 40, 1000 };
    ev_verdict("ft", "rag", "F1", &e, 0, buf, sizeof buf);
    CHECK_MSG(!strcmp(buf, "ft beats rag on F1 by 0.10 ± 0.04 on 40 questions"), "%s", buf);
    ev_verdict("ft", "rag", "NLL/token", &e, 1, buf, sizeof buf); // lower is better: rag wins
    CHECK_MSG(!strcmp(buf, "rag beats ft on NLL/token by 0.10 ± 0.04 on 40 questions"), "%s", buf);
    struct ev_ci z = { 0.01, -0.03, 0.05, 500, 1000 };
    ev_verdict("ft", "rag", "F1", &z, 0, buf, sizeof buf);
    CHECK_MSG(strstr(buf, "no clear difference between ft and rag on F1") && strstr(buf, "includes 0") &&
              strstr(buf, "0.01 ± 0.04") && strstr(buf, "500 questions"), "%s", buf);
}

/* A synthetic run: F1 of rag is ft's + 0.3 on every item, EM 0/1 patterns, NLL. */
TEST(ev_summary_aggregation)
{
    static const struct ev_mode modes[3] = { { "base", 0, 0 }, { "rag", 0, 3 }, { "ft", 1, 0 } };
    struct ev_run r = { 0 };
    int N = 60;
    r.n_items = N;
    r.n_modes = 3;
    r.modes = modes;
    r.cells = calloc((size_t)N * 3, sizeof *r.cells);
    r.seconds = calloc(3, sizeof(double));
    struct lk_rng rng;
    lk_rng_seed(&rng, 5);
    double sum_ft = 0;
    for (int i = 0; i < N; i++) {
        double u = 0.5 * lk_rng_uniform(&rng);
        for (int j = 0; j < 3; j++) {
            struct ev_cell *c = ev_run_cell(&r, i, j);
            c->f1 = j == 1 ? u + 0.3 : j == 2 ? u : 0.1 * u;
            c->em = (i + j) % 3 == 0;
            c->rouge_l = c->f1;
            c->nll = 2.0 - c->f1;
            c->acc = NAN;
            c->recall = j == 1 ? (i % 4 != 0) : NAN;
            if (j == 2)
                sum_ft += c->f1;
        }
    }
    struct ev_summary s;
    CHECK_OK(ev_summarize(&r, 7, &s, test_err()));
    for (int i = 0; i < s.n_stats; i++) {
        const struct ev_ci *ci = &s.stats[i].ci;
        CHECK_MSG(ci->lo <= ci->mean && ci->mean <= ci->hi, "stat %d: mean %g outside [%g, %g]", i, ci->mean,
                  ci->lo, ci->hi);
        CHECK(ci->hi - ci->lo < 0.5);
    }
    const struct ev_stat *st = ev_summary_stat(&s, 2, EV_F1);
    CHECK(st && st->ci.n == (size_t)N);
    CHECK_NEAR(st->ci.mean, sum_ft / N, 1e-12);
    st = ev_summary_stat(&s, 1, EV_RECALL);
    CHECK(st && fabs(st->ci.mean - 0.75) < 1e-12);
    CHECK(ev_summary_stat(&s, 0, EV_RECALL) == NULL); // closed book: no recall
    CHECK(ev_summary_stat(&s, 0, EV_ACC) == NULL);
    // ft - rag on F1 is exactly -0.3 on every item: the interval is a point, below 0
    int found = 0;
    for (int i = 0; i < s.n_diffs; i++) {
        const struct ev_diff *d = &s.diffs[i];
        if (d->a == 2 && d->b == 1 && d->metric == EV_F1) {
            found = 1;
            CHECK_NEAR(d->ci.mean, -0.3, 1e-9);
            CHECK(d->ci.hi < 0);
        }
        if (d->a == 1 && d->b == 0 && d->metric == EV_F1)
            CHECK(d->ci.lo > 0); // rag - base > 0
        if (d->a == 2 && d->b == 1 && d->metric == EV_NLL)
            CHECK(d->ci.lo > 0); // ft's NLL is higher
    }
    CHECK(found);
    CHECK_MSG(!strncmp(s.verdict, "rag beats ft on F1 by 0.30 ± 0.00 on 60 questions", 60), "%s", s.verdict);
    // the same seed gives the same intervals; the JSON carries everything
    struct ev_summary s2;
    CHECK_OK(ev_summarize(&r, 7, &s2, test_err()));
    CHECK(s2.n_stats == s.n_stats && s2.stats[3].ci.lo == s.stats[3].ci.lo);
    char *js = ev_summary_json(&r, &s);
    CHECK(js && strstr(js, "\"verdict\":\"rag beats ft on F1") && strstr(js, "\"rag\":{") &&
          strstr(js, "\"recall\":{\"mean\":0.75"));
    lk_free(js);
    ev_summary_release(&s);
    ev_summary_release(&s2);
    ev_run_release(&r);
}

// ---- log-likelihoods against model_forward ----

/* -(sum of log p(cont | prompt)) from one model_forward with targets on the continuation. */
static double ref_nll_sum(struct model *m, const struct tok_ids *prompt, const struct tok_ids *cont)
{
    int T = (int)(prompt->n + cont->n);
    int *tok = malloc(sizeof(int) * T), *tgt = malloc(sizeof(int) * T);
    for (int i = 0; i < T; i++) {
        tok[i] = i < (int)prompt->n ? prompt->v[i] : cont->v[i - prompt->n];
        tgt[i] = -100;
    }
    for (int i = (int)prompt->n - 1; i < T - 1; i++)
        tgt[i] = tok[i + 1];
    double loss = NAN;
    if (model_plan(m, 1, T, 0, test_err()) || model_forward(m, NULL, tok, NULL, NULL, tgt, 1, &loss, test_err()))
        loss = NAN;
    free(tok);
    free(tgt);
    return loss;
}

TEST(ev_choice_and_reference_loglik_match_model_forward)
{
    CHECK_OK(make_tokenizer());
    struct tok *tk;
    CHECK_OK(tok_load(&tk, test_path("tok"), test_err()));
    struct chat_fmt fmt;
    CHECK_OK(chat_fmt_init(&fmt, tk, NULL, test_err()));
    struct cfg c;
    fix_cfg_qwen2(&c);
    c.vocab_size = tok_vocab_size(tk) + 3;
    c.max_position_embeddings = 200; // > the 64-token prefill chunk: scoring crosses chunks
    struct model m;
    CHECK_OK(fix_model_random(&m, &c, 0.4f, 41));
    CHECK_INT(write_file("qa.jsonl",
                         "{\"id\":\"mc\",\"question\":\"what is the code of item 3?\","
                         "\"choices\":[\"E\",\"E, Q, B, 7, 11; 6 / 4 * 10 é 中 x y z w v u t s r q p o n m l k j i h "
                         "g f e d c b a 9 8 7 6 5 4 3 2 1 0 ! ? . , ; : - + = _ ( ) [ ] { } # @ Z Y X W V U T S R\","
                         "\"B\",\"item 9\"],"
                         "\"answer_index\":2}\n"
                         "{\"id\":\"qa\",\"question\":\"what is the code of item 7?\",\"answer\":\"the code is I\"}\n"), 0);
    struct ev_qa qa;
    CHECK_OK(ev_qa_load(&qa, test_path("qa.jsonl"), 0, test_err()));
    static const struct ev_mode modes[1] = { { "base", 0, 0 } };
    struct ev_config ec = { tk, &fmt, &m, NULL, NULL, NULL, 8, 200, 0 };
    struct ev_run r;
    CHECK_OK(ev_run_all(&r, &ec, &qa, modes, 1, NULL, NULL, test_err()));
    // independent reference: model_forward on prompt + continuation
    struct tok_ids prompt = { 0 }, cont = { 0 };
    const struct ev_cell *cell = ev_run_cell(&r, 0, 0);
    CHECK(cell->choice_ll != NULL);
    CHECK_OK(chat_prompt_user(tk, &fmt, NULL, qa.items[0].question, &prompt, test_err()));
    CHECK_INT(cell->prompt_tokens, prompt.n);
    int best = 0;
    double ll[4];
    for (int j = 0; j < 4; j++) {
        cont.n = 0;
        CHECK_OK(tok_encode(tk, qa.items[0].choices[j], strlen(qa.items[0].choices[j]), 0, &cont, test_err()));
        if (j == 1)
            CHECK(cont.n > 64); // the long choice spans more than one chunk
        ll[j] = -ref_nll_sum(&m, &prompt, &cont);
        CHECK_NEAR(cell->choice_ll[j], ll[j], 1e-4);
        if (ll[j] > ll[best])
            best = j;
        if (j == 2)
            CHECK_NEAR(cell->nll, -ll[j] / (double)cont.n, 1e-5);
    }
    CHECK(!strcmp(cell->answer, qa.items[0].choices[best]));
    CHECK_INT(cell->acc, best == 2);
    CHECK(isnan(cell->em) && isnan(cell->f1));
    // the free answer: NLL of the reference, and the greedy answer decodes what generation gives
    cell = ev_run_cell(&r, 1, 0);
    CHECK_OK(chat_prompt_user(tk, &fmt, NULL, qa.items[1].question, &prompt, test_err()));
    cont.n = 0;
    CHECK_OK(tok_encode(tk, "the code is I", 13, 0, &cont, test_err()));
    CHECK_NEAR(cell->nll, ref_nll_sum(&m, &prompt, &cont) / (double)cont.n, 1e-5);
    CHECK(!isnan(cell->em) && !isnan(cell->f1) && isnan(cell->acc) && isnan(cell->recall));
    struct gen_cache gc;
    CHECK_OK(gen_cache_init(&gc, &c, 200, 16, 0, test_err()));
    struct gen_opts o = { 8, 0, 1, 0, &fmt, tok_eos(tk), 0, tok_vocab_size(tk) };
    struct tok_ids g = { 0 };
    CHECK_OK(gen_run(&gc, &m, NULL, prompt.v, (int)prompt.n, &o, NULL, NULL, &g, NULL, test_err()));
    char *bytes;
    size_t nb;
    CHECK_OK(tok_decode(tk, g.v, g.n, 1, &bytes, &nb, test_err()));
    char *text = ev_utf8_lossy(bytes, nb); // the answer is text: stray bytes become U+FFFD
    CHECK(text != NULL);
    char *t = text;
    while (*t == ' ' || *t == '\n')
        t++;
    CHECK_MSG(!strncmp(cell->answer, t, strlen(cell->answer)), "answer '%s' vs generated '%s'", cell->answer, text);
    char *again = ev_utf8_lossy(cell->answer, strlen(cell->answer)); // valid UTF-8: unchanged
    CHECK(again && !strcmp(again, cell->answer));
    lk_free(again);
    lk_free(bytes);
    lk_free(text);
    tok_ids_release(&g);
    gen_cache_release(&gc);
    tok_ids_release(&prompt);
    tok_ids_release(&cont);
    ev_run_release(&r);
    ev_qa_release(&qa);
    model_release(&m);
    tok_free(tk);
}

// ---- end to end ----

/* Entities with one-character codes; documents state them; a tiny model trained on
 * reading-comprehension records (the rag prompt format) learns to copy the code from the
 * context. held.jsonl asks about entities it never saw in training. */
static const char *const SYL[20] = { "bor", "ka", "mi", "tel", "ros", "vu", "pan", "di", "lek", "so",
                                     "mar", "tu", "gin", "fe", "lo", "zan", "pe", "ri", "dol", "nu" };
static const char CODES[] = "BCDFGHJKLMNPQRSTVWXZ23456789";

static int make_rc_fixture(int n_train, int n_held)
{
    FILE *d = fopen(test_path("docs.jsonl"), "w"), *t = fopen(test_path("train.jsonl"), "w");
    FILE *h = fopen(test_path("held.jsonl"), "w"), *x = fopen(test_path("text.txt"), "w");
    FILE *mc = fopen(test_path("mc.jsonl"), "w");
    if (!d || !t || !h || !x || !mc)
        return -1;
    struct lk_rng rng;
    lk_rng_seed(&rng, 1);
    int n = n_train + n_held;
    char(*names)[32] = calloc((size_t)n, 32);
    for (int i = 0; i < n; i++) {
        int dup;
        do {
            names[i][0] = 0;
            for (int s = 0; s < 3; s++)
                strcat(names[i], SYL[lk_rng_u64(&rng) % 20]);
            dup = 0;
            for (int j = 0; j < i; j++)
                dup |= !strcmp(names[i], names[j]);
        } while (dup);
        char code = CODES[lk_rng_u64(&rng) % (sizeof CODES - 1)];
        char doc[128], q[128];
        snprintf(doc, sizeof doc, "The code of %s is %c.", names[i], code);
        snprintf(q, sizeof q, "What is the code of %s?", names[i]);
        fprintf(d, "{\"id\":\"d%d\",\"title\":\"%s\",\"text\":\"%s\"}\n", i, names[i], doc);
        fprintf(x, "%s\n%s\n%c\n", doc, q, code);
        if (i < n_train) {
            fprintf(t, "{\"messages\":[{\"role\":\"user\",\"content\":\"Context:\\n%s\\n\\nQuestion: %s\"},"
                       "{\"role\":\"assistant\",\"content\":\"%c\"}]}\n", doc, q, code);
        } else {
            fprintf(h, "{\"id\":\"q%d\",\"question\":\"%s\",\"answer\":\"%c\",\"doc_id\":\"d%d\"}\n", i, q, code, i);
            char other = CODES[(strchr(CODES, code) - CODES + 5) % (sizeof CODES - 1)];
            int right = i % 2;
            fprintf(mc, "{\"id\":\"m%d\",\"question\":\"%s\",\"choices\":[\"%c\",\"%c\"],\"answer_index\":%d,"
                        "\"doc_id\":\"d%d\"}\n", i, q, right ? other : code, right ? code : other, right, i);
        }
    }
    free(names);
    fclose(d);
    fclose(t);
    fclose(h);
    fclose(x);
    fclose(mc);
    // a small Qwen2 (vocab 320), its tokenizer trained on the texts
    if (write_file("cfg.json",
                   "{\"architectures\":[\"Qwen2ForCausalLM\"],\"model_type\":\"qwen2\",\"hidden_size\":64,"
                   "\"intermediate_size\":128,\"num_hidden_layers\":2,\"num_attention_heads\":4,"
                   "\"num_key_value_heads\":2,\"vocab_size\":320,\"rms_norm_eps\":1e-6,\"rope_theta\":10000,"
                   "\"tie_word_embeddings\":true,\"max_position_embeddings\":128,\"initializer_range\":0.1,"
                   "\"torch_dtype\":\"float32\"}\n"))
        return -1;
    return test_sh("%s init --config '%s/cfg.json' --out '%s/m' --seed 1 && "
                   "%s tokenizer train --text '%s/text.txt' --vocab 300 --out '%s/m'",
                   test_lorakit(), test_tmpdir(), test_tmpdir(), test_lorakit(), test_tmpdir(), test_tmpdir());
}

/* The value of "key":{"mean":X in a JSON summary, for mode. */
static double json_mean(const char *js, const char *mode, const char *metric)
{
    char pat[64];
    snprintf(pat, sizeof pat, "\"%s\":{", mode);
    const char *p = strstr(js, pat);
    if (!p)
        return NAN;
    snprintf(pat, sizeof pat, "\"%s\":{\"mean\":", metric);
    p = strstr(p, pat);
    return p ? atof(p + strlen(pat)) : NAN;
}

static int sanitized(void)
{
#if defined(__SANITIZE_ADDRESS__)
    return 1;
#else
    return 0;
#endif
}

TEST(ev_rag_beats_base_on_a_model_that_reads_its_context)
{
    if (sanitized() && !test_full())
        SKIP("training the reading model takes minutes under ASan (runs with LK_TEST_FULL=1)");
    CHECK_INT(make_rc_fixture(300, 30), 0);
    CHECK_INT(test_sh("%s train --model '%s/m' --data '%s/train.jsonl' --out '%s/rc' --full --steps 600 --lr 1e-2 "
                      "--warmup 20 --batch 8 --threads 1 --runs '%s/runs.db' --quiet", test_lorakit(), test_tmpdir(),
                      test_tmpdir(), test_tmpdir(), test_tmpdir()), 0);
    CHECK_INT(test_sh("%s eval --model '%s/rc' --qa '%s/held.jsonl' --docs '%s/docs.jsonl' --k 1 --max-new 4 "
                      "--runs '%s/runs.db' --threads 1 --quiet --json --show 2",
                      test_lorakit(), test_tmpdir(), test_tmpdir(), test_tmpdir(), test_tmpdir()), 0);
    const char *js = test_output();
    double base = json_mean(js, "base", "em"), rag = json_mean(js, "rag", "em");
    double recall = json_mean(js, "rag", "recall");
    // "far above": at least half the held-out codes read from the context, and 0.4 above closed book
    CHECK_MSG(rag >= 0.5 && rag - base >= 0.4 && base <= 0.2, "EM: rag %g, base %g\n%s", rag, base, js);
    CHECK_NEAR(recall, 1.0, 1e-12);
    CHECK_NEAR(json_mean(js, "rag", "has_answer"), 1.0, 1e-12); // every document holds its code
    CHECK_MSG(strstr(js, "\"verdict\":\"rag beats base on F1 by"), "%s", js);
    CHECK(strstr(js, "--- q300 ---") && strstr(js, "  rag:"));
    // multiple choice on the same entities: the code in the context wins
    CHECK_INT(test_sh("%s eval --model '%s/rc' --qa '%s/mc.jsonl' --docs '%s/docs.jsonl' --k 1 "
                      "--runs '%s/runs.db' --threads 1 --quiet --json",
                      test_lorakit(), test_tmpdir(), test_tmpdir(), test_tmpdir(), test_tmpdir()), 0);
    double acc = json_mean(test_output(), "rag", "acc"), acc0 = json_mean(test_output(), "base", "acc");
    CHECK_MSG(acc >= 0.9 && acc0 <= 0.8, "accuracy: rag %g, base %g", acc, acc0);
    CHECK(strstr(test_output(), "\"verdict\":\"rag beats base on accuracy by"));
}

static int count_runs(const char *db_path, const char *status)
{
    struct rdb db;
    if (rdb_open(&db, db_path, test_err()))
        return -1;
    struct rdb_run *runs;
    int n, k = 0;
    if (rdb_runs_list(&db, 0, &runs, &n, test_err())) {
        rdb_close(&db, NULL);
        return -1;
    }
    for (int i = 0; i < n; i++)
        k += !strcmp(runs[i].status, status);
    rdb_runs_free(runs, n);
    rdb_close(&db, NULL);
    return k;
}

/* Random tiny models: the k sweep, the runs database rows, the adapter and tuned paths. */
TEST(ev_cli_sweep_and_runs_db)
{
    CHECK_INT(make_rc_fixture(20, 12), 0);
    CHECK_INT(test_sh("%s init --config '%s/cfg.json' --out '%s/t' --seed 9 && cp '%s/m/'tok* '%s/t/'",
                      test_lorakit(), test_tmpdir(), test_tmpdir(), test_tmpdir(), test_tmpdir()), 0);
    char db[4200];
    snprintf(db, sizeof db, "%s", test_path("runs.db"));
    CHECK_INT(test_sh("%s eval --model '%s/m' --tuned '%s/t' --qa '%s/held.jsonl' --docs '%s/docs.jsonl' "
                      "--k 0,1,3 --max-new 3 --runs '%s' --threads 1 --quiet --json",
                      test_lorakit(), test_tmpdir(), test_tmpdir(), test_tmpdir(), test_tmpdir(), db), 0);
    const char *js = test_output();
    CHECK(strstr(js, "\"rag@1\":{") && strstr(js, "\"rag@3\":{") && strstr(js, "\"ft+rag@3\":{") &&
          strstr(js, "\"ft\":{") && !strstr(js, "\"rag@0\""));
    CHECK(json_mean(js, "rag@3", "recall") >= json_mean(js, "rag@1", "recall"));
    CHECK(strstr(js, "\"verdict\":"));
    CHECK_INT(count_runs(db, "done"), 1);
    // the database: 12 items x 6 modes, results with intervals, the summary with the verdict
    sqlite3 *s;
    CHECK_INT(sqlite3_open(db, &s), SQLITE_OK);
    sqlite3_stmt *st;
    CHECK_INT(sqlite3_prepare_v2(s, "SELECT (SELECT count(*) FROM eval_items), (SELECT count(*) FROM eval_results "
                                    "WHERE mode='rag@3' AND metric='f1' AND lo <= value AND value <= hi AND n=12), "
                                    "(SELECT summary_json LIKE '%\"verdict\":%' FROM runs WHERE kind='eval'), "
                                    "(SELECT count(*) FROM eval_items WHERE mode='rag@3' AND retrieved LIKE "
                                    "'[{\"doc_id\":%' AND scores_json LIKE '%\"recall\":%'), "
                                    "(SELECT count(*) FROM eval_results WHERE mode='ft - rag@3'), "
                                    "(SELECT count(*) FROM eval_items WHERE mode='rag@3' AND "
                                    "(scores_json LIKE '%\"has_answer\":0%' OR scores_json LIKE '%\"has_answer\":1%')), "
                                    "(SELECT count(*) FROM eval_items WHERE mode='ft' AND "
                                    "scores_json LIKE '%has_answer%')",
                                 -1, &st, NULL), SQLITE_OK);
    CHECK_INT(sqlite3_step(st), SQLITE_ROW);
    CHECK_INT(sqlite3_column_int(st, 0), 12 * 6);
    CHECK_INT(sqlite3_column_int(st, 1), 1);
    CHECK_INT(sqlite3_column_int(st, 2), 1);
    CHECK_INT(sqlite3_column_int(st, 3), 12);
    CHECK(sqlite3_column_int(st, 4) >= 4);
    CHECK_INT(sqlite3_column_int(st, 5), 12); // answer@k: 0 or 1 with retrieval,
    CHECK_INT(sqlite3_column_int(st, 6), 0);  // and left out closed book
    sqlite3_finalize(st);
    sqlite3_close(s);
    // an index built beforehand; an adapter as the tuned model
    CHECK_INT(test_sh("%s index --docs '%s/docs.jsonl' --db '%s/idx.db' --fts-tokenizer porter", test_lorakit(),
                      test_tmpdir(), test_tmpdir()), 0);
    CHECK_INT(test_sh("%s eval --model '%s/m' --qa '%s/held.jsonl' --index '%s/idx.db' --modes base,rag --limit 3 "
                      "--runs '%s' --threads 1 --quiet --show 3", test_lorakit(), test_tmpdir(), test_tmpdir(),
                      test_tmpdir(), db), 0);
    CHECK(strstr(test_output(), "verdict: ") && strstr(test_output(), "--- q22 ---") &&
          strstr(test_output(), "  reference  "));
    CHECK_INT(test_sh("%s train --model '%s/m' --data '%s/train.jsonl' --out '%s/ad' --steps 2 --rank 2 --threads 1 "
                      "--runs '%s/train.db' --quiet && %s eval --model '%s/m' --adapter '%s/ad' --qa '%s/held.jsonl' "
                      "--modes base,ft --runs '%s' --threads 1 --quiet --json", test_lorakit(), test_tmpdir(),
                      test_tmpdir(), test_tmpdir(), test_tmpdir(), test_lorakit(), test_tmpdir(), test_tmpdir(),
                      test_tmpdir(), db), 0);
    CHECK(strstr(test_output(), "\"ft\":{") && strstr(test_output(), "\"verdict\":\"") &&
          strstr(test_output(), "base"));
    CHECK_INT(count_runs(db, "done"), 3);
}

TEST(ev_cli_bad_inputs)
{
    CHECK_INT(make_rc_fixture(10, 4), 0);
    char db[4200];
    snprintf(db, sizeof db, "%s", test_path("runs.db"));
    const char *T = test_tmpdir(), *L = test_lorakit();
    // a QA line without an answer: file:line, exit 1, no run recorded
    CHECK_INT(write_file("bad.jsonl", "{\"question\":\"a?\",\"answer\":\"b\"}\n{\"question\":\"c?\"}\n"), 0);
    CHECK_INT(test_sh("%s eval --model '%s/m' --qa '%s/bad.jsonl' --runs '%s'", L, T, T, db), 1);
    CHECK(strstr(test_output(), "lorakit eval: error: ") && strstr(test_output(), "bad.jsonl:2: missing field 'answer'"));
    // a document line without text
    CHECK_INT(write_file("baddocs.jsonl", "{\"id\":\"x\",\"title\":\"t\",\"text\":\"u\"}\n{\"id\":\"y\",\"title\":\"t\"}\n"), 0);
    CHECK_INT(test_sh("%s eval --model '%s/m' --qa '%s/held.jsonl' --docs '%s/baddocs.jsonl' --runs '%s'", L, T, T,
                      T, db), 1);
    CHECK(strstr(test_output(), "baddocs.jsonl:2:"));
    // an index made with another tokenizer setting
    CHECK_INT(test_sh("%s index --docs '%s/docs.jsonl' --db '%s/tri.db' --fts-tokenizer trigram", L, T, T), 0);
    CHECK_INT(test_sh("%s eval --model '%s/m' --qa '%s/held.jsonl' --index '%s/tri.db' --fts-tokenizer unicode61 "
                      "--runs '%s'", L, T, T, T, db), 1);
    CHECK(strstr(test_output(), "trigram") && strstr(test_output(), "unicode61"));
    // a tuned model of another architecture
    CHECK_INT(write_file("cfg2.json",
                         "{\"architectures\":[\"Qwen2ForCausalLM\"],\"model_type\":\"qwen2\",\"hidden_size\":32,"
                         "\"intermediate_size\":64,\"num_hidden_layers\":2,\"num_attention_heads\":4,"
                         "\"num_key_value_heads\":2,\"vocab_size\":320,\"tie_word_embeddings\":true,"
                         "\"max_position_embeddings\":128,\"torch_dtype\":\"float32\"}\n"), 0);
    CHECK_INT(test_sh("%s init --config '%s/cfg2.json' --out '%s/other' --seed 2", L, T, T), 0);
    CHECK_INT(test_sh("%s eval --model '%s/m' --tuned '%s/other' --qa '%s/held.jsonl' --modes base,ft --runs '%s'", L,
                      T, T, T, db), 1);
    CHECK(strstr(test_output(), "hidden_size 32") && strstr(test_output(), "base's architecture"));
    // usage errors
    CHECK_INT(test_sh("%s eval --model '%s/m' --qa '%s/held.jsonl' --modes rag --runs '%s'", L, T, T, db), 2);
    CHECK_INT(test_sh("%s eval --model '%s/m' --qa '%s/held.jsonl' --modes ft --runs '%s'", L, T, T, db), 2);
    CHECK_INT(test_sh("%s eval --model '%s/m' --qa '%s/held.jsonl' --k x --runs '%s'", L, T, T, db), 2);
    CHECK_INT(test_sh("%s eval --help", L), 0);
    CHECK(strstr(test_output(), "--k K") && strstr(test_output(), "lorakit eval --model"));
    // no run was left as 'running' (none was even begun)
    CHECK(count_runs(db, "running") <= 0);
    // a failure after the run began (a question longer than the context) finishes it as 'failed'
    char *q = malloc(3000);
    strcpy(q, "{\"question\":\"");
    for (int i = 0; i < 300; i++)
        strcat(q, "bor ka ");
    strcat(q, "\",\"answer\":\"B\"}\n");
    CHECK_INT(write_file("long.jsonl", q), 0);
    free(q);
    CHECK(test_sh("%s eval --model '%s/m' --qa '%s/long.jsonl' --runs '%s' --quiet", L, T, T, db) != 0);
    CHECK(strstr(test_output(), "long.jsonl") == NULL || strstr(test_output(), "error"));
    CHECK(strstr(test_output(), "question 'line 1' (line 1), mode base"));
    CHECK_INT(count_runs(db, "failed"), 1);
    CHECK_INT(count_runs(db, "running"), 0);
}

/* k is checked before anything is read, and the message names the value given (a k above 64
 * was once reported as "k -1"). */
TEST(ev_cli_k_out_of_range_names_the_value)
{
    int ks[EV_MAX_K], nk = 0;
    CHECK_OK(ev_k_parse("0,1,3,64", ks, &nk, test_err()));
    CHECK_INT(nk, 4);
    CHECK_INT(ks[3], 64);
    CHECK_INT(ev_k_parse("100", ks, &nk, test_err()), LK_ERR_USAGE);
    CHECK(strstr(test_errmsg(), "k 100 is outside [0, 64]"));
    CHECK_INT(ev_k_parse("3,-2", ks, &nk, test_err()), LK_ERR_USAGE);
    CHECK(strstr(test_errmsg(), "k -2 is outside"));
    CHECK_INT(ev_k_parse("1,x", ks, &nk, test_err()), LK_ERR_USAGE);
    char many[256] = "0";
    for (int i = 1; i <= EV_MAX_K; i++)
        snprintf(many + strlen(many), sizeof many - strlen(many), ",%d", i);
    CHECK_INT(ev_k_parse(many, ks, &nk, test_err()), LK_ERR_USAGE);
    CHECK(strstr(test_errmsg(), "give 1 to 32 values of k"));
    // end to end: a usage error (exit 2) before any input is opened
    CHECK_INT(test_sh("%s eval --model '%s/none' --qa '%s/none.jsonl' --k 100", test_lorakit(), test_tmpdir(),
                      test_tmpdir()), 2);
    CHECK_MSG(strstr(test_output(), "lorakit eval: error: k 100 is outside [0, 64]"), "%s", test_output());
    CHECK_INT(test_sh("%s eval --model '%s/none' --qa '%s/none.jsonl' --k %s --modes base,rag --docs x", test_lorakit(),
                      test_tmpdir(), test_tmpdir(), many), 2);
    CHECK(strstr(test_output(), "give 1 to 32 values of k"));
}

// ---- several systems, learned against forgot ----

/* A run of n items in the given modes, every metric NAN (the test fills what it needs). */
static void synth_run(struct ev_run *r, const struct ev_mode *modes, int n_modes, int n)
{
    memset(r, 0, sizeof *r);
    r->n_items = n;
    r->n_modes = n_modes;
    r->modes = modes;
    r->cells = calloc((size_t)n * n_modes, sizeof *r->cells);
    r->seconds = calloc((size_t)n_modes, sizeof(double));
    for (int i = 0; i < n * n_modes; i++) {
        struct ev_cell *c = &r->cells[i];
        c->em = c->f1 = c->rouge_l = c->nll = c->acc = c->recall = c->has_answer = NAN;
    }
}

static const struct ev_forget *forget_of(const struct ev_retention *r, int sys, const char *metric)
{
    for (int i = 0; i < r->n_f; i++)
        if (r->f[i].sys == sys && !strcmp(r->f[i].metric, metric))
            return &r->f[i];
    return NULL;
}

/* Forgetting on four hand-worked items. "same" answers as the base does; "loses" loses the
 * fourth answer (EM and F1 1 -> 0, NLL 0.5 -> 1.5). Per-item forgetting of "loses" is then
 * d = (0, 0, 0, 1): mean 0.25. A bootstrap resample of 4 items holds X copies of the fourth,
 * X ~ Binomial(4, 1/4), mean X/4: P(X = 0) = (3/4)^4 = 0.316 > 0.025, so the 2.5th percentile
 * is 0; P(X <= 2) = 0.949 < 0.975 <= P(X <= 3) = 0.996, so the 97.5th is 3/4. (With 1,000
 * resamples the order statistics 24-25 and 974-975 are 0 and 0.75 unless the counts stray
 * 3.5 standard deviations; the seed is fixed.) "same": d = 0 on every item, so 0 with an
 * interval of zero width. Learned (F1 on the new questions, closed book): "loses" gains
 * (1, 1, 0, 0), mean 0.5; X ~ Binomial(4, 1/2), P(X = 0) = 1/16 > 0.025 and P(X <= 3) =
 * 15/16 < 0.975: interval [0, 1]. Texts: NLL (1, 2, 3, 4) against (1, 2, 3, 5): 0.25 [0, 0.75]. */
TEST(ev_forgetting_hand_worked)
{
    static const struct ev_mode modes[3] = { { "base", 0, 0 }, { "same", 1, 0 }, { "loses", 2, 0 } };
    static const char *const names[2] = { "same", "loses" };
    struct ev_run main, rt;
    synth_run(&main, modes, 3, 4);
    synth_run(&rt, modes, 3, 4);
    for (int i = 0; i < 4; i++) {
        ev_run_cell(&main, i, 0)->f1 = ev_run_cell(&main, i, 1)->f1 = 0;
        ev_run_cell(&main, i, 2)->f1 = i < 2;
        for (int j = 0; j < 3; j++) {
            struct ev_cell *c = ev_run_cell(&rt, i, j);
            c->em = c->f1 = !(j == 2 && i == 3);
            c->nll = j == 2 && i == 3 ? 1.5 : 0.5;
        }
    }
    struct ev_text_run tx = { 4, 3, calloc(12, sizeof(double)), calloc(4, sizeof(int)), 0 };
    for (int i = 0; i < 4; i++)
        for (int j = 0; j < 3; j++)
            tx.nll[i * 3 + j] = i + 1 + (j == 2 && i == 3);
    struct ev_summary ms;
    CHECK_OK(ev_summarize(&main, 42, &ms, test_err()));
    struct ev_retention ret;
    CHECK_OK(ev_retention_compute(&main, &ms, &rt, &tx, 2, names, 42, &ret, test_err()));
    CHECK_INT(ret.n_f, 2 * 4); // closed.em, closed.f1, closed.nll, text.nll per system
    static const char *const metrics[4] = { "closed.em", "closed.f1", "closed.nll", "text.nll" };
    for (int q = 0; q < 4; q++) {
        const struct ev_forget *s = forget_of(&ret, 0, metrics[q]), *l = forget_of(&ret, 1, metrics[q]);
        CHECK_MSG(s && l, "%s", metrics[q]);
        CHECK_MSG(s->forgetting.mean == 0 && s->forgetting.lo == 0 && s->forgetting.hi == 0, "same %s: %g [%g, %g]",
                  metrics[q], s->forgetting.mean, s->forgetting.lo, s->forgetting.hi);
        CHECK(s->base == s->value && !s->no_room && s->forgetting.n == 4);
        CHECK_NEAR(l->forgetting.mean, 0.25, 1e-12);
        CHECK_MSG(l->forgetting.lo == 0 && fabs(l->forgetting.hi - 0.75) < 1e-12, "loses %s: [%g, %g]", metrics[q],
                  l->forgetting.lo, l->forgetting.hi);
    }
    CHECK_NEAR(forget_of(&ret, 1, "closed.em")->value, 0.75, 1e-12);
    CHECK_NEAR(forget_of(&ret, 1, "closed.nll")->value, 0.75, 1e-12); // NLL: 1.5 on one item of four
    const struct ev_learned *g0 = ev_retention_learned(&ret, 0, EV_F1), *g1 = ev_retention_learned(&ret, 1, EV_F1);
    CHECK(g0 && g1 && ret.headline == EV_F1);
    CHECK(g0->gain.mean == 0 && g0->gain.lo == 0 && g0->gain.hi == 0);
    CHECK_NEAR(g1->gain.mean, 0.5, 1e-12);
    CHECK(g1->gain.lo == 0 && g1->gain.hi == 1);
    // the JSON list, as --json prints it
    cJSON *root = cJSON_CreateObject();
    CHECK_OK(ev_retention_json(&ret, root));
    char *js = cJSON_PrintUnformatted(root);
    CHECK_MSG(strstr(js, "{\"system\":\"loses\",\"metric\":\"closed.em\",\"base\":1,\"value\":0.75,"
                         "\"forgetting\":{\"mean\":0.25,\"lo\":0,\"hi\":0.75,\"n\":4},\"no_room\":false}"), "%s", js);
    CHECK(strstr(js, "\"learned\":[") && strstr(js, "\"gain\":{\"mean\":0.5,\"lo\":0,\"hi\":1,\"n\":4}"));
    free(js);
    cJSON_Delete(root);
    ev_retention_release(&ret);
    // a base that answers nothing closed book leaves no room to forget; NLL always has room
    for (int i = 0; i < 4; i++)
        for (int j = 0; j < 3; j++)
            ev_run_cell(&rt, i, j)->em = 0;
    CHECK_OK(ev_retention_compute(&main, &ms, &rt, NULL, 2, names, 42, &ret, test_err()));
    CHECK(forget_of(&ret, 1, "closed.em")->no_room && !forget_of(&ret, 1, "closed.f1")->no_room &&
          !forget_of(&ret, 1, "closed.nll")->no_room && !forget_of(&ret, 1, "text.nll"));
    ev_retention_release(&ret);
    ev_summary_release(&ms);
    ev_text_run_release(&tx);
    ev_run_release(&main);
    ev_run_release(&rt);
}

/* Percentile bootstrap of mean(a - b), written out here: the reference for the resamples. */
static void ref_paired(const double *a, const double *b, int n, struct lk_rng *rng, double *lo, double *hi)
{
    double *m = malloc(sizeof(double) * EV_BOOTSTRAP_B);
    for (int r = 0; r < EV_BOOTSTRAP_B; r++) {
        double t = 0;
        for (int i = 0; i < n; i++) {
            int k = (int)(lk_rng_u64(rng) % (uint64_t)n);
            t += a[k] - b[k];
        }
        m[r] = t / n;
    }
    for (int i = 1; i < EV_BOOTSTRAP_B; i++) // insertion sort: small and obviously right
        for (int j = i; j > 0 && m[j - 1] > m[j]; j--) {
            double x = m[j];
            m[j] = m[j - 1];
            m[j - 1] = x;
        }
    double h = (EV_BOOTSTRAP_B - 1) * 0.025, g = (EV_BOOTSTRAP_B - 1) * 0.975;
    *lo = m[(int)h] + (h - (int)h) * (m[(int)h + 1] - m[(int)h]);
    *hi = m[(int)g] + (g - (int)g) * (m[(int)g + 1] - m[(int)g]);
    free(m);
}

/* Two systems on the same items: system b draws exactly the resamples system a draws, so equal
 * answers give equal intervals, and b's interval is the reference bootstrap of b's values on
 * a's stream of indices. */
TEST(ev_systems_share_items_and_resamples)
{
    static const struct ev_mode modes[6] = { { "base", 0, 0 }, { "rag", 0, 1 }, { "a", 1, 0 },
                                             { "a+rag", 1, 1 },  { "b", 2, 0 },  { "b+rag", 2, 1 } };
    struct ev_run r;
    int N = 40;
    synth_run(&r, modes, 6, N);
    struct lk_rng g;
    lk_rng_seed(&g, 3);
    for (int i = 0; i < N; i++)
        for (int j = 0; j < 6; j++) {
            struct ev_cell *c = ev_run_cell(&r, i, j);
            int src = j >= 4 ? j - 2 : j; // b answers exactly as a
            c->f1 = src == j ? lk_rng_uniform(&g) : ev_run_cell(&r, i, src)->f1;
            c->em = c->f1 > 0.5;
            c->nll = 2 - c->f1;
        }
    struct ev_summary s;
    CHECK_OK(ev_summarize(&r, 11, &s, test_err()));
    for (int m = 0; m < 3; m++) {
        enum ev_metric mm = m == 0 ? EV_EM : m == 1 ? EV_F1 : EV_NLL;
        const struct ev_stat *sa = ev_summary_stat(&s, 2, mm), *sb = ev_summary_stat(&s, 4, mm);
        CHECK(sa && sb && sa->ci.lo == sb->ci.lo && sa->ci.hi == sb->ci.hi && sa->ci.mean == sb->ci.mean);
        const struct ev_diff *da = ev_summary_diff(&s, 2, 0, mm), *db = ev_summary_diff(&s, 4, 0, mm);
        CHECK(da && db && da->ci.lo == db->ci.lo && da->ci.hi == db->ci.hi);
        da = ev_summary_diff(&s, 3, 1, mm), db = ev_summary_diff(&s, 5, 1, mm);
        CHECK(da && db && da->ci.lo == db->ci.lo && da->ci.hi == db->ci.hi);
    }
    // equal rows cannot be separated: the verdict says so
    CHECK_MSG(strstr(s.verdict, "best on F1: ") && strstr(s.verdict, "not separated from"), "%s", s.verdict);
    ev_summary_release(&s);
    // b now answers differently; its interval is still drawn from a's stream of item indices
    for (int i = 0; i < N; i++)
        ev_run_cell(&r, i, 4)->f1 = 0.5 * lk_rng_uniform(&g);
    CHECK_OK(ev_summarize(&r, 11, &s, test_err()));
    double a[64], b[64], lo, hi;
    for (int i = 0; i < N; i++)
        a[i] = ev_run_cell(&r, i, 4)->f1, b[i] = ev_run_cell(&r, i, 0)->f1;
    struct lk_rng ra, rb;
    ev_stat_rng(&r, 11, 2, 0, EV_F1, &ra); // system a's stream for a - base
    ev_stat_rng(&r, 11, 4, 0, EV_F1, &rb);
    CHECK(lk_rng_u64(&ra) == lk_rng_u64(&rb));
    ev_stat_rng(&r, 11, 2, 0, EV_F1, &ra);
    ref_paired(a, b, N, &ra, &lo, &hi);
    const struct ev_diff *d = ev_summary_diff(&s, 4, 0, EV_F1);
    CHECK(d && d->ci.n == (size_t)N);
    CHECK_NEAR(d->ci.lo, lo, 1e-12);
    CHECK_NEAR(d->ci.hi, hi, 1e-12);
    ev_summary_release(&s);
    ev_run_release(&r);
}

/* The verdict with several systems names the best row per metric, and says when nothing
 * separates it from another. */
TEST(ev_verdict_several_systems)
{
    static const struct ev_mode modes[4] = { { "base", 0, 0 }, { "lora", 1, 0 }, { "full", 2, 0 }, { "tiny", 3, 0 } };
    struct ev_run r;
    int N = 50;
    synth_run(&r, modes, 4, N);
    for (int i = 0; i < N; i++)
        for (int j = 0; j < 4; j++) {
            struct ev_cell *c = ev_run_cell(&r, i, j);
            c->f1 = j == 2 ? 0.9 : j == 1 ? 0.3 + 0.01 * (i % 3) : 0.3; // full ahead on every item
            c->em = j >= 1 && i % 2;                                      // lora, full, tiny tie on EM
            c->nll = 1.0;
        }
    struct ev_summary s;
    CHECK_OK(ev_summarize(&r, 5, &s, test_err()));
    CHECK_MSG(strstr(s.verdict, "best on F1: full (0.90), ahead of every other row (paired 95% intervals exclude 0)"),
              "%s", s.verdict);
    CHECK_MSG(strstr(s.verdict, "best on EM: lora (0.50), not separated from full, tiny (paired 95% intervals "
                                "include 0)"), "%s", s.verdict);
    CHECK(strstr(s.verdict, "best on NLL/token: base (1.00), not separated from lora, full, tiny"));
    // the best - other pairs it needed are among the diffs (full - lora was not a pair before)
    CHECK(ev_summary_diff(&s, 2, 1, EV_F1) && ev_summary_diff(&s, 1, 2, EV_EM));
    ev_summary_release(&s);
    ev_run_release(&r);
}

/* Texts: JSONL {"text"} or plain lines, errors by file:line; and the NLL per token of a text
 * against an independent model_forward over [end-of-text] + the text's tokens. */
TEST(ev_text_load_and_nll_match_model_forward)
{
    struct ev_text t;
    CHECK_INT(write_file("t.jsonl", "{\"text\":\"the code of item 3 is E\",\"id\":1}\n\n{\"text\":\"what is the code\"}\n"),
              0);
    CHECK_OK(ev_text_load(&t, test_path("t.jsonl"), 0, test_err()));
    CHECK(t.n == 2 && !strcmp(t.v[1], "what is the code") && t.line[1] == 3);
    ev_text_release(&t);
    CHECK_INT(write_file("t.txt", "plain line one\n\n  {not json} line two\n"), 0);
    CHECK_OK(ev_text_load(&t, test_path("t.txt"), 0, test_err()));
    CHECK(t.n == 2 && !strcmp(t.v[0], "plain line one") && !strcmp(t.v[1], "  {not json} line two"));
    ev_text_release(&t);
    CHECK_INT(write_file("bad.jsonl", "{\"text\":\"a\"}\n{\"txt\":\"b\"}\n"), 0);
    CHECK_INT(ev_text_load(&t, test_path("bad.jsonl"), 0, test_err()), LK_ERR_FORMAT);
    CHECK_MSG(strstr(test_errmsg(), "bad.jsonl:2: missing or empty string field 'text'"), "%s", test_errmsg());
    CHECK_INT(write_file("bad.jsonl", "{\"text\":\"a\"}\nnot json\n"), 0);
    CHECK_INT(ev_text_load(&t, test_path("bad.jsonl"), 0, test_err()), LK_ERR_FORMAT);
    CHECK(strstr(test_errmsg(), "bad.jsonl:2: not a JSON object"));
    CHECK_INT(write_file("empty.txt", "\n \n"), 0);
    CHECK_INT(ev_text_load(&t, test_path("empty.txt"), 0, test_err()), LK_ERR_FORMAT);

    CHECK_OK(make_tokenizer());
    struct tok *tk;
    CHECK_OK(tok_load(&tk, test_path("tok"), test_err()));
    struct chat_fmt fmt;
    CHECK_OK(chat_fmt_init(&fmt, tk, NULL, test_err()));
    struct cfg c;
    fix_cfg_qwen2(&c);
    c.vocab_size = tok_vocab_size(tk) + 3;
    c.max_position_embeddings = 200;
    struct model m;
    CHECK_OK(fix_model_random(&m, &c, 0.4f, 43));
    CHECK_INT(write_file("t.txt", "Context: the code of item 7 is I. Question: what is the code of item 7? é中 "
                                  "the code of item 12 is N, the code of item 13 is P, and item 14 is Q. Zyx wvu "
                                  "tsr qpo nml kji hgf edc ba 98 76 54 32 10 !? ;: -+ =_ () [] {} #@ ZY XW VU.\n"
                                  "item 9\n"), 0);
    CHECK_OK(ev_text_load(&t, test_path("t.txt"), 0, test_err()));
    struct ev_system sys;
    memset(&sys, 0, sizeof sys);
    snprintf(sys.name, sizeof sys.name, "same");
    sys.m = &m; // the base itself as a system: identical figures
    struct ev_config ec = { tk, &fmt, &m, NULL, NULL, NULL, 8, 200, 0 };
    struct ev_text_run tr;
    CHECK_OK(ev_text_run_all(&tr, &ec, &sys, 1, &t, NULL, NULL, test_err()));
    CHECK(tr.n_items == 2 && tr.n_models == 2);
    for (int i = 0; i < 2; i++) {
        struct tok_ids pre = { 0 }, cont = { 0 };
        CHECK_OK(tok_ids_push(&pre, tok_eos(tk), test_err()));
        CHECK_OK(tok_encode(tk, t.v[i], strlen(t.v[i]), 0, &cont, test_err()));
        if (i == 0)
            CHECK(cont.n > 64); // crosses the 64-token prefill chunk
        CHECK_INT(tr.tokens[i], cont.n);
        CHECK_NEAR(tr.nll[i * 2], ref_nll_sum(&m, &pre, &cont) / (double)cont.n, 1e-5);
        CHECK(tr.nll[i * 2 + 1] == tr.nll[i * 2]);
        tok_ids_release(&pre);
        tok_ids_release(&cont);
    }
    ev_text_run_release(&tr);
    ev_text_release(&t);
    model_release(&m);
    tok_free(tk);
}

/* The JSON summary printed by a --json run (the first line starting with '{'). */
static cJSON *json_out(void)
{
    const char *p = test_output();
    while (p && *p && *p != '{')
        p = strchr(p, '\n') ? strchr(p, '\n') + 1 : NULL;
    return p && *p ? cJSON_Parse(p) : NULL;
}

static const cJSON *json_find(const cJSON *list, const char *k1, const char *v1, const char *k2, const char *v2)
{
    const cJSON *o;
    cJSON_ArrayForEach(o, list) {
        const cJSON *a = cJSON_GetObjectItem(o, k1), *b = cJSON_GetObjectItem(o, k2);
        if (a && b && cJSON_IsString(a) && cJSON_IsString(b) && !strcmp(a->valuestring, v1) &&
            !strcmp(b->valuestring, v2))
            return o;
    }
    return NULL;
}

/* End to end: three systems (an adapter under two names, and a copy of the base folder) with
 * retention on questions, retrieval and texts; the JSON, the table and the runs database. */
TEST(ev_cli_systems_and_retention)
{
    CHECK_INT(make_rc_fixture(20, 12), 0);
    const char *T = test_tmpdir(), *L = test_lorakit();
    CHECK_INT(test_sh("cp -r '%s/m' '%s/same' && %s train --model '%s/m' --data '%s/train.jsonl' --out '%s/ad' --steps 2 "
                      "--rank 2 --threads 1 --runs '%s/train.db' --quiet", T, T, L, T, T, T, T), 0);
    CHECK_INT(test_sh("%s eval --model '%s/m' --system ad='%s/ad' --system ad2='%s/ad' --system same='%s/same' "
                      "--qa '%s/held.jsonl' --docs '%s/docs.jsonl' --k 1 --max-new 3 --retain '%s/held.jsonl' "
                      "--retain-docs '%s/docs.jsonl' --retain-text '%s/text.txt' --runs '%s/runs.db' --threads 1 "
                      "--quiet --json", L, T, T, T, T, T, T, T, T, T, T), 0);
    cJSON *js = json_out();
    CHECK_MSG(js, "%s", test_output());
    const cJSON *modes = cJSON_GetObjectItem(js, "modes"), *sys = cJSON_GetObjectItem(js, "systems");
    static const char *const want[8] = { "base", "rag", "ad", "ad+rag", "ad2", "ad2+rag", "same", "same+rag" };
    for (int i = 0; i < 8; i++)
        CHECK_MSG(cJSON_GetObjectItem(modes, want[i]), "mode %s", want[i]);
    CHECK(cJSON_GetArraySize(sys) == 3 &&
          !strcmp(cJSON_GetObjectItem(cJSON_GetArrayItem(sys, 0), "kind")->valuestring, "adapter") &&
          !strcmp(cJSON_GetObjectItem(cJSON_GetArrayItem(sys, 2), "kind")->valuestring, "model"));
    // ad and ad2 are one adapter: the same rows, the same intervals (same items, same resamples)
    static const char *const mets[4] = { "em", "f1", "rouge_l", "nll" }; // not "seconds"
    for (int q = 0; q < 4; q++)
        for (int r = 0; r < 2; r++)
            CHECK_MSG(cJSON_Compare(cJSON_GetObjectItem(cJSON_GetObjectItem(modes, r ? "ad+rag" : "ad"), mets[q]),
                                    cJSON_GetObjectItem(cJSON_GetObjectItem(modes, r ? "ad2+rag" : "ad2"), mets[q]), 1),
                      "%s differs between ad and ad2", mets[q]);
    const cJSON *diffs = cJSON_GetObjectItem(js, "diffs"), *d1, *d2;
    cJSON_ArrayForEach(d1, diffs) {
        if (strcmp(cJSON_GetObjectItem(d1, "a")->valuestring, "ad"))
            continue;
        int found = 0;
        cJSON_ArrayForEach(d2, diffs)
            found |= !strcmp(cJSON_GetObjectItem(d2, "a")->valuestring, "ad2") &&
                     !strcmp(cJSON_GetObjectItem(d2, "b")->valuestring, cJSON_GetObjectItem(d1, "b")->valuestring) &&
                     !strcmp(cJSON_GetObjectItem(d2, "metric")->valuestring,
                             cJSON_GetObjectItem(d1, "metric")->valuestring) &&
                     cJSON_GetObjectItem(d2, "lo")->valuedouble == cJSON_GetObjectItem(d1, "lo")->valuedouble &&
                     cJSON_GetObjectItem(d2, "hi")->valuedouble == cJSON_GetObjectItem(d1, "hi")->valuedouble;
        CHECK_MSG(found, "no ad2 twin of ad - %s", cJSON_GetObjectItem(d1, "b")->valuestring);
    }
    // retention: 7 figures per system; the copy of the base forgets exactly 0, ad and ad2 alike
    const cJSON *ret = cJSON_GetObjectItem(js, "retention"), *o;
    CHECK_INT(cJSON_GetArraySize(ret), 21);
    static const char *const met[7] = { "closed.em", "closed.f1", "closed.nll", "rag.em", "rag.f1", "rag.nll",
                                        "text.nll" };
    for (int q = 0; q < 7; q++) {
        const cJSON *s = json_find(ret, "system", "same", "metric", met[q]), *a = json_find(ret, "system", "ad", "metric", met[q]),
                    *b = json_find(ret, "system", "ad2", "metric", met[q]);
        CHECK_MSG(s && a && b, "%s", met[q]);
        const cJSON *f = cJSON_GetObjectItem(s, "forgetting");
        CHECK_MSG(cJSON_GetObjectItem(f, "mean")->valuedouble == 0 && cJSON_GetObjectItem(f, "lo")->valuedouble == 0 &&
                  cJSON_GetObjectItem(f, "hi")->valuedouble == 0, "same forgets on %s", met[q]);
        CHECK(cJSON_Compare(cJSON_GetObjectItem(a, "forgetting"), cJSON_GetObjectItem(b, "forgetting"), 1));
        double base = cJSON_GetObjectItem(s, "base")->valuedouble;
        int no_room = cJSON_IsTrue(cJSON_GetObjectItem(s, "no_room"));
        CHECK_INT(no_room, strstr(met[q], "nll") ? 0 : base < EV_NO_ROOM);
    }
    o = json_find(cJSON_GetObjectItem(js, "learned"), "system", "same", "metric", "f1");
    CHECK(o && cJSON_GetObjectItem(cJSON_GetObjectItem(o, "gain"), "hi")->valuedouble == 0);
    // the runs database: schema 3, one eval_retention row per figure, as printed
    sqlite3 *s;
    CHECK_INT(sqlite3_open(test_path("runs.db"), &s), SQLITE_OK);
    sqlite3_stmt *st;
    CHECK_INT(sqlite3_prepare_v2(s, "SELECT (SELECT user_version FROM pragma_user_version), "
                                    "(SELECT count(*) FROM eval_retention WHERE kind='forgot'), "
                                    "(SELECT count(*) FROM eval_retention WHERE kind='learned'), "
                                    "(SELECT count(*) FROM eval_retention WHERE system='same' AND diff=0 AND lo=0 AND hi=0), "
                                    "(SELECT base FROM eval_retention WHERE system='ad' AND metric='text.nll')",
                                 -1, &st, NULL), SQLITE_OK);
    CHECK_INT(sqlite3_step(st), SQLITE_ROW);
    CHECK_INT(sqlite3_column_int(st, 0), 3);
    CHECK_INT(sqlite3_column_int(st, 1), 21);
    CHECK_INT(sqlite3_column_int(st, 2), cJSON_GetArraySize(cJSON_GetObjectItem(js, "learned")));
    CHECK_INT(sqlite3_column_int(st, 3), 7 + cJSON_GetArraySize(cJSON_GetObjectItem(js, "learned")) / 3);
    CHECK_NEAR(sqlite3_column_double(st, 4),
               cJSON_GetObjectItem(json_find(ret, "system", "ad", "metric", "text.nll"), "base")->valuedouble, 1e-12);
    sqlite3_finalize(st);
    sqlite3_close(s);
    cJSON_Delete(js);
    // the table: one row per system and mode, retention and learned against forgot; a key of a
    // newer PEFT in the adapter's config is named in a warning, as the other commands do
    CHECK_INT(test_sh("sed -i 's/^{/{\"some_future_field\": 1, /' '%s/ad/adapter_config.json'", T), 0);
    CHECK_INT(test_sh("%s eval --model '%s/m' --adapter '%s/ad' --system same='%s/same' --qa '%s/held.jsonl' "
                      "--modes base,ft --max-new 3 --retain '%s/held.jsonl' --retain-text '%s/text.txt' "
                      "--runs '%s/runs.db' --threads 1 --quiet", L, T, T, T, T, T, T, T), 0);
    const char *out = test_output();
    CHECK_MSG(strstr(out, "\nft ") && strstr(out, "\nsame ") && strstr(out, "verdict: best on EM: ") &&
              strstr(out, "retention (forgetting = base - system") && strstr(out, "learned against forgot") &&
              strstr(out, "  same         text.nll "), "%s", out);
    CHECK_MSG(strstr(out, "lorakit eval: warning: ") && strstr(out, "unknown keys 'some_future_field'"), "%s", out);
}

/* A system that does not fit the base is refused before any work: before the documents are
 * indexed, before the run is recorded, with its name in the message. */
TEST(ev_cli_misfit_system_refused_first)
{
    CHECK_INT(make_rc_fixture(10, 4), 0);
    const char *T = test_tmpdir(), *L = test_lorakit();
    CHECK_INT(write_file("cfg2.json",
                         "{\"architectures\":[\"Qwen2ForCausalLM\"],\"model_type\":\"qwen2\",\"hidden_size\":32,"
                         "\"intermediate_size\":64,\"num_hidden_layers\":2,\"num_attention_heads\":4,"
                         "\"num_key_value_heads\":2,\"vocab_size\":320,\"tie_word_embeddings\":true,"
                         "\"max_position_embeddings\":128,\"torch_dtype\":\"float32\"}\n"), 0);
    CHECK_INT(test_sh("%s init --config '%s/cfg2.json' --out '%s/other' --seed 2 && cp '%s/m/'tok* '%s/other/' && "
                      "%s train --model '%s/m' --data '%s/train.jsonl' --out '%s/ad' --steps 1 --rank 2 --threads 1 "
                      "--runs '%s/t.db' --quiet && %s train --model '%s/other' --data '%s/train.jsonl' --out "
                      "'%s/otherad' --steps 1 --rank 2 --threads 1 --runs '%s/t.db' --quiet",
                      L, T, T, T, T, L, T, T, T, T, L, T, T, T, T), 0);
    static const struct {
        const char *name, *dir, *want;
    } cases[] = {
        { "bad", "other", "system 'bad': " },       // a model folder of another shape
        { "badad", "otherad", "system 'badad': " }, // an adapter trained on another shape
        { "none", "nowhere", "system 'none': " },   // neither
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        CHECK_INT(test_sh("%s eval --model '%s/m' --system ok='%s/ad' --system %s='%s/%s' --qa '%s/held.jsonl' "
                          "--docs '%s/docs.jsonl' --runs '%s/runs.db' --threads 1", L, T, T, cases[i].name, T,
                          cases[i].dir, T, T, T), 1);
        CHECK_MSG(strstr(test_output(), cases[i].want) && !strstr(test_output(), "indexing") &&
                  !strstr(test_output(), "question"), "%s", test_output());
    }
    CHECK(strstr(test_output(), "neither an adapter"));
    CHECK_INT(test_sh("%s eval --model '%s/m' --system bad='%s/other' --qa '%s/held.jsonl' --threads 1 --runs '%s/runs.db'",
                      L, T, T, T, T), 1);
    CHECK(strstr(test_output(), "hidden_size 32") && strstr(test_output(), "system 'bad': "));
    CHECK(count_runs(test_path("runs.db"), "running") <= 0 && count_runs(test_path("runs.db"), "failed") <= 0 &&
          count_runs(test_path("runs.db"), "done") <= 0);
    // usage errors, before anything is read
    static const char *const usage[] = {
        "--system base=x", "--system 'a b=x'", "--system a=", "--system ad=x --system ad=y",
        "--adapter x --system ft=y", "--retain-docs x", "--retain x", "--retain-text x --modes base",
    };
    for (size_t i = 0; i < sizeof usage / sizeof usage[0]; i++) {
        CHECK_INT(test_sh("%s eval --model '%s/none' --qa '%s/none.jsonl' %s", L, T, T, usage[i]), 2);
        CHECK_MSG(strstr(test_output(), "lorakit eval: error: "), "%s: %s", usage[i], test_output());
    }
}

/* An adapter that carries modules_to_save (svd-compress --keep-other of a fine-tune that changed
 * the tied embeddings and a norm) runs as a system on its own copy of the base: every figure
 * equals that of the model `lorakit merge` writes from it (the reference), and the base modes are
 * the base's. */
TEST(ev_system_with_modules_to_save_matches_its_merge)
{
    CHECK_INT(make_rc_fixture(10, 6), 0);
    const char *T = test_tmpdir(), *L = test_lorakit();
    struct model m;
    CHECK_OK(model_load(&m, test_path("m"), test_err()));
    struct lk_rng g;
    lk_rng_seed(&g, 17);
    size_t nv = (size_t)m.cfg.vocab_size * m.cfg.hidden_size;
    for (size_t i = 0; i < nv; i++)
        m.w.embed.f[i] += 0.05f * lk_rng_normal(&g);
    for (int i = 0; i < m.cfg.hidden_size; i++)
        m.w.norm[i] *= 1.1f;
    size_t no = (size_t)m.cfg.hidden_size * m.cfg.num_attention_heads * m.cfg.head_dim;
    for (size_t i = 0; i < no; i++) // one linear without a bias changes too (a rank-2 factor keeps most)
        m.w.layer[0].wo.f[i] += 0.02f * lk_rng_normal(&g);
    CHECK_OK(model_save(&m, test_path("t2"), TENSOR_F32, test_err()));
    model_release(&m);
    CHECK_INT(test_sh("%s svd-compress --base '%s/m' --tuned '%s/t2' --out '%s/comp' --rank 2 --keep-other --runs "
                      "'%s/c.db' && %s merge --model '%s/m' --adapter '%s/comp' --out '%s/merged' --runs '%s/c.db' && "
                      "grep -q '\"tie_word_embeddings\": false' '%s/merged/config.json'",
                      L, T, T, T, T, L, T, T, T, T, T), 0);
    CHECK_INT(test_sh("%s eval --model '%s/m' --system comp='%s/comp' --system merged='%s/merged' --qa '%s/held.jsonl' "
                      "--docs '%s/docs.jsonl' --k 1 --max-new 3 --retain-text '%s/text.txt' --runs '%s/r.db' "
                      "--threads 1 --quiet --json", L, T, T, T, T, T, T, T), 0);
    cJSON *js = json_out();
    CHECK_MSG(js, "%s", test_output());
    const cJSON *modes = cJSON_GetObjectItem(js, "modes");
    static const char *const pairs[2][2] = { { "comp", "merged" }, { "comp+rag", "merged+rag" } };
    for (int p = 0; p < 2; p++)
        for (int q = 0; q < 3; q++) {
            const char *met = q == 0 ? "em" : q == 1 ? "f1" : "nll";
            double a = cJSON_GetObjectItem(cJSON_GetObjectItem(cJSON_GetObjectItem(modes, pairs[p][0]), met), "mean")
                           ->valuedouble;
            double b = cJSON_GetObjectItem(cJSON_GetObjectItem(cJSON_GetObjectItem(modes, pairs[p][1]), met), "mean")
                           ->valuedouble;
            CHECK_NEAR(a, b, 1e-5);
        }
    const cJSON *ret = cJSON_GetObjectItem(js, "retention");
    double tc = cJSON_GetObjectItem(json_find(ret, "system", "comp", "metric", "text.nll"), "value")->valuedouble;
    double tm = cJSON_GetObjectItem(json_find(ret, "system", "merged", "metric", "text.nll"), "value")->valuedouble;
    double tb = cJSON_GetObjectItem(json_find(ret, "system", "comp", "metric", "text.nll"), "base")->valuedouble;
    CHECK_NEAR(tc, tm, 1e-5);
    CHECK_MSG(fabs(tc - tb) > 1e-3, "the extras changed nothing: %g vs %g", tc, tb);
    double base_nll = cJSON_GetObjectItem(cJSON_GetObjectItem(cJSON_GetObjectItem(modes, "base"), "nll"), "mean")
                          ->valuedouble;
    cJSON_Delete(js);
    // the base modes are the base's: the same figure without any system
    CHECK_INT(test_sh("%s eval --model '%s/m' --qa '%s/held.jsonl' --max-new 3 --runs '%s/r.db' --threads 1 --quiet "
                      "--json", L, T, T, T), 0);
    CHECK_NEAR(json_mean(test_output(), "base", "nll"), base_nll, 1e-9);
}
