/*
 * search.c - `lorakit search`: BM25 search of an index made by `lorakit index`, and
 * `--eval-recall`, the retrieval recall of the source documents of a QA file.
 * The work is fts_search (eval/fts.c); this file parses flags and prints.
 */
#include <cJSON.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../eval/fts.h"
#include "commands.h"
#include "opts.h"

/* Prints s on one line: control characters (newlines, tabs, escapes) become spaces. */
static void print_flat(const char *s)
{
    for (; *s; s++)
        putchar((unsigned char)*s < 0x20 || *s == 0x7f ? ' ' : *s);
}

static void print_settings(const struct fts_index *idx)
{
    printf("index %s: tokenizer %s, %d-token chunks, overlap %d, %lld documents, %lld chunks, "
           "from %s\n", idx->path, fts_tokenizer_name(idx->settings.tokenizer),
           idx->settings.chunk_tokens, idx->settings.overlap, (long long)idx->n_docs,
           (long long)idx->n_chunks, idx->source ? idx->source : "?");
}

static cJSON *settings_json(const struct fts_index *idx)
{
    cJSON *o = cJSON_CreateObject();
    cJSON_AddStringToObject(o, "path", idx->path);
    cJSON_AddStringToObject(o, "tokenizer", fts_tokenizer_name(idx->settings.tokenizer));
    cJSON_AddNumberToObject(o, "chunk_tokens", idx->settings.chunk_tokens);
    cJSON_AddNumberToObject(o, "overlap", idx->settings.overlap);
    cJSON_AddNumberToObject(o, "n_docs", (double)idx->n_docs);
    cJSON_AddNumberToObject(o, "n_chunks", (double)idx->n_chunks);
    cJSON_AddStringToObject(o, "source", idx->source ? idx->source : "");
    cJSON_AddNumberToObject(o, "title_weight_bm25", FTS_TITLE_WEIGHT);
    return o;
}

/* Prints a cJSON tree (consumed) and a newline; NOMEM when printing failed. */
static int print_json(cJSON *o, struct lk_err *err)
{
    char *s = o ? cJSON_PrintUnformatted(o) : NULL;
    cJSON_Delete(o);
    if (!s)
        return lk_errf(err, LK_ERR_NOMEM, "out of memory printing JSON");
    printf("%s\n", s);
    cJSON_free(s);
    return LK_OK;
}

static int run_query(struct fts_index *idx, const char *query, int k, int json, struct lk_err *err)
{
    struct fts_hit *hits;
    int n;
    if (fts_search(idx, query, k, &hits, &n, err))
        return err->code;
    char *q = NULL;
    if (fts_query_build(query, idx->settings.tokenizer, &q, err)) {
        fts_hits_free(hits, n);
        return err->code;
    }
    int r = LK_OK;
    if (json) {
        cJSON *o = cJSON_CreateObject();
        cJSON_AddStringToObject(o, "query", query);
        cJSON_AddStringToObject(o, "fts_query", q);
        cJSON_AddItemToObject(o, "index", settings_json(idx));
        cJSON *a = cJSON_AddArrayToObject(o, "results");
        for (int i = 0; i < n; i++) {
            cJSON *h = cJSON_CreateObject();
            cJSON_AddNumberToObject(h, "rank", i + 1);
            cJSON_AddNumberToObject(h, "score", hits[i].score);
            cJSON_AddStringToObject(h, "doc_id", hits[i].doc_id);
            cJSON_AddStringToObject(h, "title", hits[i].title);
            cJSON_AddNumberToObject(h, "chunk_no", (double)hits[i].chunk_no);
            cJSON_AddStringToObject(h, "snippet", hits[i].snippet);
            cJSON_AddStringToObject(h, "text", hits[i].text);
            cJSON_AddItemToArray(a, h);
        }
        r = print_json(o, err);
    } else {
        print_settings(idx);
        printf("query: %s\n", q[0] ? q : "(no usable terms)");
        for (int i = 0; i < n; i++) {
            printf("%2d  %8.3f  %s  ", i + 1, hits[i].score, hits[i].doc_id);
            print_flat(hits[i].title);
            printf("  (chunk %lld)\n    ", (long long)hits[i].chunk_no);
            print_flat(hits[i].snippet);
            putchar('\n');
        }
        if (n == 0)
            printf("no results\n");
    }
    lk_free(q);
    fts_hits_free(hits, n);
    return r;
}

/* The {"question","doc_id"} lines of a QA file (other fields ignored; blank lines skipped). */
struct recall_qs {
    char **q, **doc;
    int64_t n, cap;
};

static void recall_qs_release(struct recall_qs *r)
{
    for (int64_t i = 0; i < r->n; i++) {
        lk_free(r->q[i]);
        lk_free(r->doc[i]);
    }
    lk_free(r->q);
    lk_free(r->doc);
    memset(r, 0, sizeof *r);
}

static int recall_qs_add(struct recall_qs *r, const char *q, const char *d, struct lk_err *err)
{
    if (r->n == r->cap) {
        int64_t cap = r->cap ? 2 * r->cap : 256;
        char **nq = lk_realloc(r->q, sizeof *nq * (size_t)cap);
        if (nq)
            r->q = nq;
        char **nd = nq ? lk_realloc(r->doc, sizeof *nd * (size_t)cap) : NULL;
        if (!nd)
            return lk_errf(err, LK_ERR_NOMEM, "out of memory");
        r->doc = nd;
        r->cap = cap;
    }
    r->q[r->n] = lk_strdup(q);
    r->doc[r->n] = lk_strdup(d);
    r->n++;
    if (!r->q[r->n - 1] || !r->doc[r->n - 1])
        return lk_errf(err, LK_ERR_NOMEM, "out of memory");
    return LK_OK;
}

static int recall_qs_load(struct recall_qs *r, const char *path, struct lk_err *err)
{
    memset(r, 0, sizeof *r);
    FILE *f = fopen(path, "r");
    if (!f)
        return lk_errf(err, errno == ENOENT ? LK_ERR_MISSING : LK_ERR_IO, "%s: cannot open: %s",
                       path, strerror(errno));
    char *buf = NULL;
    size_t cap = 0;
    long line = 0;
    int rc = LK_OK;
    ssize_t len;
    while (!rc && (len = getline(&buf, &cap, f)) >= 0) {
        line++;
        if (strspn(buf, " \t\r\n") == (size_t)len)
            continue;
        cJSON *o = cJSON_ParseWithLength(buf, (size_t)len);
        const cJSON *q = cJSON_GetObjectItemCaseSensitive(o, "question");
        const cJSON *d = cJSON_GetObjectItemCaseSensitive(o, "doc_id");
        if (!cJSON_IsObject(o) || !cJSON_IsString(q) || !cJSON_IsString(d))
            rc = lk_errf(err, LK_ERR_FORMAT, "%s:%ld: expected an object with string fields "
                         "'question' and 'doc_id'", path, line);
        else
            rc = recall_qs_add(r, q->valuestring, d->valuestring, err);
        cJSON_Delete(o);
    }
    free(buf);
    fclose(f);
    if (!rc && r->n == 0)
        rc = lk_errf(err, LK_ERR_FORMAT, "%s: no questions", path);
    if (rc)
        recall_qs_release(r);
    return rc;
}

static void recall_json(cJSON *o, const struct fts_recall *m)
{
    for (int j = 0; j < 3; j++) {
        char key[32];
        snprintf(key, sizeof key, "recall@%d", fts_recall_ks[j]);
        cJSON_AddNumberToObject(o, key, m->recall[j]);
    }
    cJSON_AddNumberToObject(o, "mrr@20", m->mrr);
    cJSON_AddNumberToObject(o, "ms_per_query", 1000.0 * m->seconds / (double)m->n_questions);
    cJSON_AddNumberToObject(o, "n_no_results", (double)m->n_no_results);
}

/* --eval-recall: for every {"question","doc_id"} line, is doc_id among the top 1/5/20
 * documents? lorakit's ranking, then plain BM25 and version 1's chunk ranking for comparison,
 * each timed alone over the same questions. */
static int eval_recall(struct fts_index *idx, const char *path, int json, struct lk_err *err)
{
    struct recall_qs qs;
    int r = recall_qs_load(&qs, path, err);
    if (r)
        return r;
    struct fts_recall m[3];
    for (int k = 0; !r && k < 3; k++)
        r = fts_recall_measure(idx, (const char *const *)qs.q, (const char *const *)qs.doc, qs.n,
                               (enum fts_rank)k, &m[k], err);
    int64_t n_q = qs.n;
    recall_qs_release(&qs);
    if (r)
        return r;
    if (json) {
        cJSON *o = cJSON_CreateObject();
        cJSON_AddStringToObject(o, "questions_file", path);
        cJSON_AddItemToObject(o, "index", settings_json(idx));
        cJSON_AddNumberToObject(o, "n_questions", (double)n_q);
        recall_json(o, &m[FTS_RANK_DOCS]); // lorakit's figures at the top level
        cJSON *b = cJSON_AddObjectToObject(o, "baselines");
        for (int k = 1; b && k < 3; k++) {
            cJSON *x = cJSON_AddObjectToObject(b, fts_rank_names[k]);
            if (x)
                recall_json(x, &m[k]);
        }
        return print_json(o, err);
    }
    print_settings(idx);
    printf("questions %lld from %s (no results for %lld)\n", (long long)n_q, path,
           (long long)m[FTS_RANK_DOCS].n_no_results);
    printf("source document among the top k results (ms/query: search alone, in-process):\n");
    printf("  %-12s %9s %9s %9s %7s %9s\n", "ranking", "recall@1", "recall@5", "recall@20", "mrr@20",
           "ms/query");
    for (int k = 0; k < 3; k++)
        printf("  %-12s %9.3f %9.3f %9.3f %7.3f %9.2f\n", fts_rank_names[k], m[k].recall[0], m[k].recall[1],
               m[k].recall[2], m[k].mrr, 1000.0 * m[k].seconds / (double)n_q);
    printf("lorakit: the top k documents by BM25 over whole documents (title weight %g, English stop\n"
           "words dropped), each as its best chunk; plain-bm25: whole documents, every word, title\n"
           "weight 1; chunks: the top k chunks, a document may come more than once (version 1)\n",
           FTS_TITLE_WEIGHT);
    return LK_OK;
}

int cmd_search(int argc, char **argv)
{
    const char *db = NULL, *tokenizer = NULL, *recall = NULL;
    long k = 5;
    int json = 0, help = 0;
    const struct opt opts[] = {
        { "db", OPT_STR, &db, "FILE", "index made by `lorakit index`" },
        { "k", OPT_INT, &k, "K", "number of chunks to return (default 5)" },
        { "json", OPT_FLAG, &json, NULL, "print JSON (results with full chunk text)" },
        { "fts-tokenizer", OPT_STR, &tokenizer, "NAME",
          "refuse an index built with another tokenizer (default: accept any)" },
        { "eval-recall", OPT_STR, &recall, "QA.jsonl",
          "instead of a query: recall@1/5/20 of each line's 'doc_id' for its 'question'" },
        { 0 },
    };
    const struct cmd_help h = {
        "search", "--db FILE [--k K] [--json] QUERY...",
        "Prints the K best chunks for a free-text query: rank, score (-bm25, higher is better;\n"
        "the title weighs 2, the text 1), doc_id, title and a snippet with matches in [brackets].\n"
        "The query is never FTS5 syntax: it is split into words (letters and digits), each\n"
        "quoted, joined with OR; operators, quotes, colons and other punctuation are plain\n"
        "separators. With a trigram index, words shorter than 3 characters are dropped and\n"
        "Chinese is matched by overlapping 3-character windows.",
        "  lorakit search --db medquad.fts What are the symptoms of Glaucoma ?\n"
        "  lorakit search --db medquad.fts --k 20 --json \"glaucoma treatment\"\n"
        "  lorakit search --db medquad.fts --eval-recall data/medquad/dev.jsonl",
    };
    struct lk_err err = { 0 };
    const char **pos = lk_calloc((size_t)argc + 1, sizeof *pos);
    if (!pos)
        return lk_cli_fail("search", &(struct lk_err){ LK_ERR_NOMEM, "out of memory" });
    int np = 0;
    if (opts_parse(argc, argv, opts, pos, argc, &np, &help, &err)) {
        lk_free(pos);
        return lk_cli_fail("search", &err);
    }
    if (help) {
        lk_free(pos);
        opts_usage(stdout, &h, opts);
        return 0;
    }
    struct fts_settings want = { FTS_TOK_ANY, 0, -1 };
    if (!db)
        lk_errf(&err, LK_ERR_USAGE, "--db is required (see --help)");
    else if (k <= 0 || k > 10000)
        lk_errf(&err, LK_ERR_USAGE, "--k must be in 1..10000 (got %ld)", k);
    else if (recall && np)
        lk_errf(&err, LK_ERR_USAGE, "--eval-recall takes no query");
    else if (!recall && !np)
        lk_errf(&err, LK_ERR_USAGE, "no query given (see --help)");
    else if (tokenizer)
        fts_tokenizer_parse(tokenizer, &want.tokenizer, &err);
    char *query = NULL;
    if (!err.code && np) { // the words of the query, joined by spaces
        size_t len = 1;
        for (int i = 0; i < np; i++)
            len += strlen(pos[i]) + 1;
        query = lk_malloc(len);
        if (!query)
            lk_errf(&err, LK_ERR_NOMEM, "out of memory");
        else {
            query[0] = 0;
            for (int i = 0; i < np; i++) {
                if (i)
                    strcat(query, " ");
                strcat(query, pos[i]);
            }
        }
    }
    lk_free(pos);
    struct fts_index idx = { 0 };
    if (!err.code && !fts_open(&idx, db, &err) && !fts_index_check(&idx, &want, &err)) {
        lk_interrupt_install();
        if (recall)
            eval_recall(&idx, recall, json, &err);
        else
            run_query(&idx, query, (int)k, json, &err);
    }
    fts_close(&idx);
    lk_free(query);
    if (err.code)
        return lk_cli_fail("search", &err);
    return 0;
}
