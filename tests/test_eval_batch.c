/*
 * test_eval_batch.c - the batched eval (`--batch B`) against one question at a time: every cell's
 * answer equal, every score within float32 rounding, for several batch sizes (some not dividing
 * the number of items, one above it), on items of very different lengths (one-token and
 * multi-chunk references, a reference whose last scoring chunk is one token, multiple choice with
 * a one-token and a multi-chunk choice, prompts with and without passages), with answers that end
 * at once, midway or at --max-new, under the base, two adapters and a copy of the base (which must
 * score exactly as the base in a batch too), for the texts of the retention set, and end to end
 * through `lorakit eval` with systems and retention sets.
 */
#include "test.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cJSON.h>
#include <sqlite3.h>

#include "../eval/fts.h"
#include "../eval/batch.h"
#include "../eval/harness.h"
#include "../eval/retain.h"
#include "../libcore/chat.h"
#include "../libcore/generate.h"
#include "../libcore/lora.h"
#include "../libcore/model.h"
#include "../libcore/tensor.h"
#include "../libcore/tok.h"
#include "fix_model.h"

/* n words of a fixed cycle, for long answers and passages. */
static void words(char *buf, size_t cap, int n, int seed)
{
    static const char *const W[12] = { "the", "code", "of", "item", "is", "B", "what", "question", "context",
                                       "C", "D", "é中" };
    size_t off = 0;
    buf[0] = 0;
    for (int i = 0; i < n && off + 16 < cap; i++)
        off += (size_t)snprintf(buf + off, cap - off, "%s%s", i ? " " : "", W[(i * 7 + seed) % 12]);
}

/* The documents, texts and tokenizer corpus. */
static int make_docs(void)
{
    FILE *d = fopen(test_path("docs.jsonl"), "w"), *t = fopen(test_path("texts.txt"), "w");
    FILE *c = fopen(test_path("corpus.txt"), "w");
    if (!d || !t || !c)
        return -1;
    char p[4096];
    for (int i = 0; i < 9; i++) {
        words(p, sizeof p, 8 + 9 * (i % 4), i);
        fprintf(d, "{\"id\":\"d%d\",\"title\":\"t%d\",\"text\":\"item %d %s\"}\n", i, i, i, p);
        fprintf(c, "Context: the code of item %d is %c. Question: what is the code of item %d? %s\n", i, 'B' + i, i, p);
    }
    for (int i = 0; i < 5; i++) {
        words(p, sizeof p, i == 2 ? 400 : 3 + 17 * i, i); // one longer than the context: cut
        fprintf(t, "%s\n", p);
    }
    return fclose(d) | fclose(t) | fclose(c);
}

static int n_tokens(struct tok *tk, const char *a)
{
    struct tok_ids ids = { 0 };
    int rc = tok_encode(tk, a, strlen(a), 0, &ids, test_err()), n = (int)ids.n;
    tok_ids_release(&ids);
    return rc ? -1 : n;
}

/* Words for a reference of exactly n tokens, into a: words while they fit, then short ones that
 * add one token each. */
static int words_of_tokens(struct tok *tk, char *a, size_t cap, int n, int seed)
{
    int w = 0;
    while (w < 400) {
        words(a, cap, w + 1, seed);
        if (n_tokens(tk, a) > n)
            break;
        w++;
    }
    words(a, cap, w, seed);
    static const char *const fill[6] = { "B", " B", " C", " D", " item", " é" };
    for (int got = n_tokens(tk, a); got >= 0 && got < n;) {
        size_t len = strlen(a);
        int k = len ? 1 : 0;
        for (; k < 6; k++) {
            snprintf(a + len, cap - len, "%s", fill[k]);
            if (n_tokens(tk, a) == got + 1)
                break;
            a[len] = 0;
        }
        if (k == 6)
            return -1;
        got++;
    }
    return n_tokens(tk, a) == n ? 0 : -1;
}

/* The questions: references of 1, 2, 66 (scoring chunks of 64 and 1) and 130 tokens (three
 * chunks) and a few others, multiple choice with a one-token and a long choice; questions with
 * and without the documents' ids, short and long. */
static int make_qa(struct tok *tk)
{
    FILE *q = fopen(test_path("qa.jsonl"), "w");
    if (!q)
        return -1;
    char a[4096];
    static const int ans_tokens[9] = { 1, 3, 130, 12, 0, 66, 2, 45, 0 }; // 0: multiple choice
    int rc = 0;
    for (int i = 0; i < 9 && !rc; i++) {
        if (ans_tokens[i] == 0) {
            words(a, sizeof a, 60, i);
            fprintf(q, "{\"id\":\"m%d\",\"question\":\"which is item %d?\",\"choices\":[\"B\",\"%s\",\"item %d\"],"
                       "\"answer_index\":%d,\"doc_id\":\"d%d\"}\n", i, i, a, i, i % 3, i);
            continue;
        }
        rc = words_of_tokens(tk, a, sizeof a, ans_tokens[i], i + 3);
        fprintf(q, "{\"id\":\"q%d\",\"question\":\"what is the code of item %d%s?\",\"answer\":\"%s\"%s}\n", i, i,
                i % 3 ? "" : " in the long context of the question", a, i % 2 ? ",\"doc_id\":\"d1\"" : "");
    }
    return fclose(q) | rc;
}

/* The tokenizer (chatml) trained on the corpus, and a Qwen2 of hidden 64 (products above
 * OpenBLAS's small sizes), intermediate 132 (not a multiple of 8), 2 layers, in dtype; the
 * embedding row of the end-of-turn token (tied: also the output row) scaled so that some answers
 * stop at once, some midway, some run to --max-new. */
static void make_tok(struct tok **tk, struct chat_fmt *fmt)
{
    const char *files[1] = { test_path("corpus.txt") };
    struct tok_train_opts o = { files, 1, 300, NULL, 0, 0 };
    CHECK_OK(tok_train(&o, test_path("tok"), test_err()));
    CHECK_OK(tok_load(tk, test_path("tok"), test_err()));
    CHECK_OK(chat_fmt_init(fmt, *tk, NULL, test_err()));
}

static void make_model(struct model *m, struct tok *tk, const struct chat_fmt *fmt, int dtype, float stop_scale)
{
    struct cfg c;
    fix_cfg_qwen2_wide(&c);
    c.vocab_size = tok_vocab_size(tk) + 3;
    c.max_position_embeddings = 200;
    CHECK_OK(fix_model_random(m, &c, 0.5f, 81));
    float *row = m->w.embed.f + (size_t)fmt->eot * c.hidden_size;
    for (int i = 0; i < c.hidden_size; i++)
        row[i] *= stop_scale;
    if (dtype != TENSOR_F32)
        CHECK_OK(model_weights_convert(&m->w, &c, dtype, test_err()));
}

static int same_num(double a, double b, double tol)
{
    if (isnan(a) || isnan(b))
        return isnan(a) && isnan(b);
    return fabs(a - b) <= tol * (1 + fabs(a));
}

/* Two runs of the same items and modes: answers and everything derived from them equal, the
 * log-likelihoods within float32 rounding (exact when tol is 0). */
static void check_runs_alike(const struct ev_run *a, const struct ev_run *b, const struct ev_qa *qa, double tol,
                             const char *what)
{
    CHECK(a->n_items == b->n_items && a->n_modes == b->n_modes);
    for (int i = 0; i < a->n_items && !test_failed(); i++)
        for (int j = 0; j < a->n_modes && !test_failed(); j++) {
            const struct ev_cell *x = ev_run_cell(a, i, j), *y = ev_run_cell(b, i, j);
            const char *mode = a->modes[j].name;
            CHECK_MSG(x->answer && y->answer && !strcmp(x->answer, y->answer), "%s, item %d, %s: answer '%s' vs '%s'",
                      what, i, mode, x->answer, y->answer);
            CHECK_MSG(same_num(x->em, y->em, 0) && same_num(x->f1, y->f1, 0) && same_num(x->rouge_l, y->rouge_l, 0) &&
                      same_num(x->acc, y->acc, 0) && same_num(x->recall, y->recall, 0) &&
                      same_num(x->has_answer, y->has_answer, 0), "%s, item %d, %s: scores differ", what, i, mode);
            CHECK_MSG(x->n_passages == y->n_passages && x->prompt_tokens == y->prompt_tokens &&
                      x->answer_tokens == y->answer_tokens, "%s, item %d, %s: token counts differ", what, i, mode);
            CHECK_MSG(same_num(x->nll, y->nll, tol), "%s, item %d, %s: NLL %.17g vs %.17g", what, i, mode, x->nll, y->nll);
            for (int k = 0; x->choice_ll && k < qa->items[i].n_choices; k++)
                CHECK_MSG(y->choice_ll && same_num(x->choice_ll[k], y->choice_ll[k], tol),
                          "%s, item %d, %s: choice %d", what, i, mode, k);
            CHECK((x->retrieved == NULL) == (y->retrieved == NULL));
            if (x->retrieved && y->retrieved)
                CHECK(!strcmp(x->retrieved, y->retrieved));
        }
}

/* Modes j and k of one run score exactly alike (a copy of the base against the base). */
static void check_modes_exact(const struct ev_run *r, int j, int k, const char *what)
{
    for (int i = 0; i < r->n_items; i++) {
        const struct ev_cell *x = ev_run_cell(r, i, j), *y = ev_run_cell(r, i, k);
        CHECK_MSG(!strcmp(x->answer, y->answer) && same_num(x->nll, y->nll, 0), "%s, item %d: %s and %s differ (%.17g, "
                  "%.17g)", what, i, r->modes[j].name, r->modes[k].name, x->nll, y->nll);
    }
}

/* Where the greedy answers of every cell stop: each prompt generated again alone (gen_run) with
 * the cell's model and adapter; counts of answers that end at once, midway, at max_new. */
static void count_endings(const struct ev_config *c, const struct ev_system *sys, const struct ev_qa *qa,
                          const struct ev_mode *modes, int n_modes, int *at_once, int *mid, int *full)
{
    struct gen_cache gc;
    CHECK_OK(gen_cache_init(&gc, &c->base->cfg, c->max_ctx, EV_CHUNK, 8, test_err()));
    struct gen_opts o = { c->max_new, 0, 1, 0, c->fmt, tok_eos(c->tk) >= 0 ? tok_eos(c->tk) : c->base->cfg.eos_token_id,
                          0, (int)tok_vocab_size(c->tk) };
    float *saved = lk_falloc((size_t)c->base->cfg.vocab_size, 1);
    CHECK(saved != NULL);
    for (int i = 0; i < qa->n && !test_failed(); i++) {
        if (qa->items[i].choices)
            continue;
        struct fts_hit *hits = NULL;
        int nh = 0;
        CHECK_OK(fts_search(c->idx, qa->items[i].question, 2, &hits, &nh, test_err()));
        for (int j = 0; j < n_modes && !test_failed(); j++) {
            const struct model *m;
            const struct lora *l;
            ev_mode_model(c, sys, 3, &modes[j], &m, &l);
            struct ev_cell cell;
            memset(&cell, 0, sizeof cell);
            struct tok_ids p = { 0 }, g = { 0 };
            int stop = 0;
            CHECK_OK(ev_cell_prompt(c, &qa->items[i], &modes[j], hits, nh, &p, &cell, test_err()));
            gen_cache_truncate(&gc, 0);
            CHECK_OK(gen_forward(&gc, m, l, p.v, (int)p.n, NULL, test_err()));
            memcpy(saved, gc.logits, sizeof(float) * (size_t)m->cfg.vocab_size);
            CHECK_OK(gen_continue(&gc, m, l, saved, &o, NULL, NULL, &g, &stop, test_err()));
            *full += !stop;
            *mid += stop && g.n > 0;
            *at_once += stop && g.n == 0;
            lk_free(cell.retrieved);
            tok_ids_release(&p);
            tok_ids_release(&g);
        }
        fts_hits_free(hits, nh);
    }
    lk_free(saved);
    gen_cache_release(&gc);
}

/* The end-of-turn row's scale: every kind of ending among the cells' answers (in float32: 9
 * end at once, 33 midway, 14 at max-new). */
#define STOP_SCALE 3.0f

static void check_batched_eval(int dtype)
{
    CHECK_INT(make_docs(), 0);
    struct model m, cp;
    struct tok *tk = NULL;
    struct chat_fmt fmt;
    make_tok(&tk, &fmt);
    CHECK_INT(make_qa(tk), 0);
    make_model(&m, tk, &fmt, dtype, STOP_SCALE);
    make_model(&cp, tk, &fmt, dtype, STOP_SCALE); // the same weights, another struct model
    struct lora l1 = { 0 }, l2 = { 0 };
    CHECK_OK(fix_lora_random(&l1, &m.cfg, (1u << CFG_N_MODULES) - 1, 3, 6.0, 0, 0.0f, 82));
    CHECK_OK(fix_lora_random(&l2, &m.cfg, (1u << CFG_Q) | (1u << CFG_DOWN), 2, 4.0, 0, 0.0f, 83));
    struct ev_system sys[3];
    memset(sys, 0, sizeof sys);
    const char *names[3] = { "lo", "lo2", "cp" };
    for (int s = 0; s < 3; s++) {
        snprintf(sys[s].name, sizeof sys[s].name, "%s", names[s]);
        sys[s].m = s == 2 ? &cp : &m;
        sys[s].l = s == 0 ? &l1 : s == 1 ? &l2 : NULL;
    }
    struct fts_settings st = { FTS_TOK_UNICODE61, 12, 3 };
    struct fts_index idx;
    CHECK_OK(fts_index_build(test_path("docs.jsonl"), test_path("docs.db"), &st, 1, NULL, test_err()));
    CHECK_OK(fts_open(&idx, test_path("docs.db"), test_err()));
    struct ev_qa qa;
    CHECK_OK(ev_qa_load(&qa, test_path("qa.jsonl"), 0, test_err()));
    int ks[1] = { 2 }, n0 = 0, n = 0;
    struct ev_mode *m0 = NULL, *modes = NULL;
    CHECK_OK(ev_modes_parse("base,rag,ft,ft+rag", ks, 1, &m0, &n0, test_err()));
    CHECK_OK(ev_modes_expand(m0, n0, names, 3, &modes, &n, test_err()));
    CHECK_INT(n, 8); // base rag lo lo+rag lo2 lo2+rag cp cp+rag
    struct ev_config ec = { tk, &fmt, &m, NULL, NULL, &idx, 12, 200, 1 };
    struct ev_run ref, got;
    CHECK_OK(ev_run_systems(&ref, &ec, sys, 3, &qa, modes, n, NULL, NULL, test_err()));
    // the cases the comparison must cover: answers that end at once, midway and at --max-new;
    // references of one token and of several chunks; multiple choice
    int at_once = 0, mid = 0, full = 0, one = 0, long_ref = 0;
    for (int i = 0; i < qa.n; i++) {
        const struct ev_cell *x = ev_run_cell(&ref, i, 0);
        one += !qa.items[i].choices && x->answer_tokens == 1;
        long_ref += !qa.items[i].choices && x->answer_tokens > 2 * EV_CHUNK;
    }
    count_endings(&ec, sys, &qa, modes, n, &at_once, &mid, &full);
    CHECK_MSG(at_once > 0 && mid > 0 && full > 0 && one > 0 && long_ref > 0 && qa.n_mc > 0,
              "a weak fixture: %d answers ending at once, %d midway, %d at max-new, %d one-token and %d "
              "multi-chunk references", at_once, mid, full, one, long_ref);
    check_modes_exact(&ref, 0, 6, "one at a time");
    static const int batches[4] = { 2, 3, 5, 16 };
    for (int b = 0; b < 4 && !test_failed(); b++) {
        char what[64];
        snprintf(what, sizeof what, "%s, batch %d", tensor_dtype_name(dtype), batches[b]);
        ec.batch = batches[b];
        CHECK_OK(ev_run_systems(&got, &ec, sys, 3, &qa, modes, n, NULL, NULL, test_err()));
        check_runs_alike(&ref, &got, &qa, 1e-5, what);
        check_modes_exact(&got, 0, 6, what); // base and cp: the same bits in a batch too
        check_modes_exact(&got, 1, 7, what);
        ev_run_release(&got);
    }
    // the texts of the retention set: NLL per token, the base and each system
    struct ev_text t;
    CHECK_OK(ev_text_load(&t, test_path("texts.txt"), 0, test_err()));
    struct ev_text_run tr, tb;
    ec.batch = 1;
    CHECK_OK(ev_text_run_all(&tr, &ec, sys, 3, &t, NULL, NULL, test_err()));
    CHECK_MSG(tr.tokens[2] == 199, "the long text is cut to the context less one: %d", tr.tokens[2]);
    for (int b = 0; b < 4 && !test_failed(); b++) {
        ec.batch = batches[b];
        CHECK_OK(ev_text_run_all(&tb, &ec, sys, 3, &t, NULL, NULL, test_err()));
        for (int i = 0; i < t.n; i++) {
            CHECK_INT(tb.tokens[i], tr.tokens[i]);
            for (int s = 0; s < 4; s++)
                CHECK_MSG(same_num(tb.nll[i * 4 + s], tr.nll[i * 4 + s], 1e-5), "text %d, model %d, batch %d: %.17g vs "
                          "%.17g", i, s, batches[b], tb.nll[i * 4 + s], tr.nll[i * 4 + s]);
            CHECK(tb.nll[i * 4 + 3] == tb.nll[i * 4]); // cp and the base
        }
        ev_text_run_release(&tb);
    }
    ev_text_run_release(&tr);
    ev_text_release(&t);
    ev_run_release(&ref);
    lk_free(m0);
    lk_free(modes);
    ev_qa_release(&qa);
    fts_close(&idx);
    lora_release(&l1);
    lora_release(&l2);
    model_release(&m);
    model_release(&cp);
    tok_free(tk);
}

TEST(ev_batch_matches_one_question_at_a_time)
{
    check_batched_eval(TENSOR_F32);
    if (!test_failed())
        check_batched_eval(TENSOR_BF16);
}

// ---- end to end: `lorakit eval --batch` ----

/* The model folder m (a Qwen2 of hidden 64 from `lorakit init`, a tokenizer trained on the
 * corpus), its copy "same", an adapter trained two steps, and the questions. */
static int make_cli_fixture(void)
{
    const char *T = test_tmpdir(), *L = test_lorakit();
    if (make_docs())
        return -1;
    FILE *c = fopen(test_path("cfg.json"), "w"), *t = fopen(test_path("train.jsonl"), "w");
    if (!c || !t)
        return -1;
    fprintf(c, "{\"architectures\":[\"Qwen2ForCausalLM\"],\"model_type\":\"qwen2\",\"hidden_size\":64,"
               "\"intermediate_size\":132,\"num_hidden_layers\":2,\"num_attention_heads\":4,\"num_key_value_heads\":2,"
               "\"vocab_size\":320,\"rms_norm_eps\":1e-6,\"rope_theta\":10000,\"tie_word_embeddings\":true,"
               "\"max_position_embeddings\":200,\"initializer_range\":0.5,\"torch_dtype\":\"float32\"}\n");
    for (int i = 0; i < 9; i++)
        fprintf(t, "{\"messages\":[{\"role\":\"user\",\"content\":\"what is the code of item %d?\"},"
                   "{\"role\":\"assistant\",\"content\":\"%c\"}]}\n", i, 'B' + i);
    if (fclose(c) | fclose(t))
        return -1;
    if (test_sh("%s init --config '%s/cfg.json' --out '%s/m' --seed 1 && %s tokenizer train --text '%s/corpus.txt' "
                "--vocab 300 --out '%s/m' && cp -r '%s/m' '%s/same' && %s train --model '%s/m' --data '%s/train.jsonl' "
                "--out '%s/ad' --steps 2 --rank 2 --lr 0.05 --threads 1 --runs '%s/train.db' --quiet",
                L, T, T, L, T, T, T, T, L, T, T, T, T))
        return -1;
    struct tok *tk = NULL;
    if (tok_load(&tk, test_path("m"), test_err()))
        return -1;
    int rc = make_qa(tk);
    tok_free(tk);
    return rc;
}

/* Runs the eval with --batch B (0: the default) into the runs database db. */
static int cli_eval(int B, const char *db)
{
    const char *T = test_tmpdir();
    char batch[32] = "";
    if (B)
        snprintf(batch, sizeof batch, "--batch %d", B);
    return test_sh("%s eval --model '%s/m' --system ad='%s/ad' --system same='%s/same' --qa '%s/qa.jsonl' "
                   "--docs '%s/docs.jsonl' --k 2 --max-new 12 --retain '%s/qa.jsonl' --retain-docs '%s/docs.jsonl' "
                   "--retain-text '%s/texts.txt' --runs '%s/%s' --threads 2 --quiet --json %s", test_lorakit(), T, T, T,
                   T, T, T, T, T, T, db, batch);
}

/* Rows of a query over main and the attached b that must be 0 (or the count asked). */
static long sql_count(sqlite3 *s, const char *sql)
{
    sqlite3_stmt *st = NULL;
    long n = -1;
    if (sqlite3_prepare_v2(s, sql, -1, &st, NULL) == SQLITE_OK && sqlite3_step(st) == SQLITE_ROW)
        n = sqlite3_column_int64(st, 0);
    else
        test_fail(__FILE__, __LINE__, "%s: %s", sql, sqlite3_errmsg(s));
    sqlite3_finalize(st);
    return n;
}

/* NLL-like values (a and b columns) equal within float32 rounding, every other one exactly. */
#define SQL_NEAR(a, b, nll) \
    "((" a ") IS (" b ") OR ((" nll ") AND abs((" a ") - (" b ")) <= 1e-5 * (1 + abs(" a "))))"

/* The runs in db (batch B) and ref.db (batch 1) alike: every item's answer, passages and scores
 * (NLL and choice log-likelihoods within float32 rounding), every summary figure and interval,
 * every retention figure; and the copy of the base alike with the base to the bit. */
static void check_cli_alike(const char *db, int B)
{
    sqlite3 *s;
    CHECK_INT(sqlite3_open(test_path("ref.db"), &s), SQLITE_OK);
    char sql[2048];
    snprintf(sql, sizeof sql, "ATTACH '%s' AS b", test_path(db));
    CHECK_INT(sqlite3_exec(s, sql, NULL, NULL, NULL), SQLITE_OK);
    long items = sql_count(s, "SELECT count(*) FROM eval_items");
    CHECK_MSG(items == 9 * 6 && sql_count(s, "SELECT count(*) FROM b.eval_items") == items, "batch %d: %ld items", B,
              items);
    CHECK_MSG(sql_count(s, "SELECT count(*) FROM eval_items a JOIN b.eval_items x USING(item_id, mode) WHERE "
                           "a.answer IS NOT x.answer OR a.retrieved IS NOT x.retrieved") == 0,
              "batch %d: answers or passages differ", B);
    // every score of every cell but its seconds
    CHECK_MSG(sql_count(s, "SELECT count(*) FROM eval_items a JOIN b.eval_items x USING(item_id, mode), "
                           "json_tree(a.scores_json) j LEFT JOIN json_tree(x.scores_json) k ON k.fullkey = j.fullkey "
                           "WHERE j.atom IS NOT NULL AND j.key IS NOT 'seconds' AND NOT " SQL_NEAR("j.atom", "k.atom",
                           "j.fullkey LIKE '%nll%' OR j.fullkey LIKE '%choice_ll%'")) == 0,
              "batch %d: an item's scores differ", B);
    CHECK_MSG(sql_count(s, "SELECT count(*) FROM eval_results a LEFT JOIN b.eval_results x USING(mode, metric) WHERE "
                           "a.metric != 'seconds' AND NOT (" SQL_NEAR("a.value", "x.value", "a.metric = 'nll'") " AND "
                           SQL_NEAR("a.lo", "x.lo", "a.metric = 'nll'") " AND " SQL_NEAR("a.hi", "x.hi", "a.metric = 'nll'")
                           " AND a.n IS x.n)") == 0, "batch %d: a summary figure differs", B);
    long ret = sql_count(s, "SELECT count(*) FROM eval_retention");
    CHECK_MSG(ret > 2 * 7 && sql_count(s, "SELECT count(*) FROM b.eval_retention") == ret, "%ld retention rows", ret);
    CHECK_MSG(sql_count(s, "SELECT count(*) FROM eval_retention a LEFT JOIN b.eval_retention x USING(system, kind, metric) "
                           "WHERE NOT (" SQL_NEAR("a.base", "x.base", "a.metric LIKE '%nll'") " AND "
                           SQL_NEAR("a.value", "x.value", "a.metric LIKE '%nll'") " AND "
                           SQL_NEAR("a.diff", "x.diff", "a.metric LIKE '%nll'") " AND "
                           SQL_NEAR("a.lo", "x.lo", "a.metric LIKE '%nll'") " AND "
                           SQL_NEAR("a.hi", "x.hi", "a.metric LIKE '%nll'") " AND a.n IS x.n)") == 0,
              "batch %d: a retention figure differs", B);
    // the copy of the base: the base's answers and scores to the bit, forgetting exactly 0
    CHECK_MSG(sql_count(s, "SELECT count(*) FROM b.eval_items a JOIN b.eval_items x ON x.item_id = a.item_id AND "
                           "x.mode = replace(a.mode, 'base', 'same') AND x.mode != a.mode WHERE a.mode IN ('base') AND "
                           "(a.answer IS NOT x.answer OR json_remove(a.scores_json, '$.seconds') IS NOT "
                           "json_remove(x.scores_json, '$.seconds'))") == 0 &&
              sql_count(s, "SELECT count(*) FROM b.eval_items a JOIN b.eval_items x ON x.item_id = a.item_id AND "
                           "a.mode = 'rag' AND x.mode = 'same+rag' WHERE a.answer IS NOT x.answer OR "
                           "json_remove(a.scores_json, '$.seconds') IS NOT json_remove(x.scores_json, '$.seconds')") == 0,
              "batch %d: the copy of the base scores otherwise", B);
    CHECK_MSG(sql_count(s, "SELECT count(*) FROM b.eval_retention WHERE system = 'same' AND kind = 'forgot' AND "
                           "diff = 0 AND lo = 0 AND hi = 0") ==
              sql_count(s, "SELECT count(*) FROM b.eval_retention WHERE system = 'same' AND kind = 'forgot'"),
              "batch %d: the copy of the base forgets", B);
    // the batch each run was made with, as recorded
    CHECK_INT(sql_count(s, "SELECT json_extract(params_json, '$.batch') FROM runs WHERE kind = 'eval'"), 1);
    CHECK_INT(sql_count(s, "SELECT json_extract(params_json, '$.batch') FROM b.runs WHERE kind = 'eval'"), B);
    sqlite3_close(s);
}

TEST(ev_batch_cli_matches_batch_1)
{
    CHECK_INT(make_cli_fixture(), 0);
    CHECK_INT(cli_eval(1, "ref.db"), 0);
    CHECK_INT(cli_eval(3, "b3.db"), 0);
    check_cli_alike("b3.db", 3);
    CHECK_INT(cli_eval(0, "bd.db"), 0); // the default
    check_cli_alike("bd.db", EV_BATCH_DEFAULT);
}

TEST(ev_batch_cli_bad_values_and_help)
{
    const char *L = test_lorakit(), *T = test_tmpdir();
    static const char *const bad[5] = { "0", "-2", "x", "4x", "257" };
    for (int i = 0; i < 5; i++) {
        CHECK_INT(test_sh("%s eval --model '%s/none' --qa '%s/none.jsonl' --batch %s", L, T, T, bad[i]), 2);
        const char *want = i == 2 || i == 3 ? "option '--batch' wants an integer" : "--batch";
        CHECK_MSG(strstr(test_output(), "lorakit eval: error: ") && strstr(test_output(), want) &&
                  (i == 2 || i == 3 || strstr(test_output(), "1 to 256")), "--batch %s: %s", bad[i], test_output());
    }
    CHECK_INT(test_sh("%s eval --help", L), 0);
    char want[64];
    snprintf(want, sizeof want, "default %d; 1: one at a time", EV_BATCH_DEFAULT);
    CHECK_MSG(strstr(test_output(), "--batch B") && strstr(test_output(), want), "%s", test_output());
}
