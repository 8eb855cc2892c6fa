/* test_fts.c - chunking, index building and BM25 search, the query builder against hostile
 * text (checked by an independent parser of the query's shape), Chinese with trigram, bad
 * documents, and every MedQuAD question through the search path. */
#include "test.h"

#include <cJSON.h>
#include <sqlite3.h>
#include <stdlib.h>
#include <string.h>

#include "../eval/fts.h"

/* A test_path copied into a caller buffer (test_path's buffers rotate, test_sh uses one). */
#define TPATH(var, name)                                                                           \
    char var[1024];                                                                                \
    snprintf(var, sizeof var, "%s", test_path(name))

static int write_text(const char *path, const char *s)
{
    return lk_write_file_atomic(path, s, strlen(s), test_err());
}

/* A copy of the chunk's bytes in a static buffer. */
static const char *chunk_str(const char *text, const struct fts_chunk *c)
{
    static char buf[4096];
    snprintf(buf, sizeof buf, "%.*s", (int)c->len, text + c->off);
    return buf;
}

TEST(fts_chunk_boundaries_and_overlap)
{
    struct fts_chunk *c;
    size_t n;
    // 10 tokens, N = 4, M = 1: starts every 3 tokens: 0, 3, 6; the chunk at 6 reaches the end
    const char *t10 = "w0 w1 w2 w3 w4 w5 w6 w7 w8 w9";
    CHECK_OK(fts_chunk_text(t10, 4, 1, &c, &n, test_err()));
    CHECK_INT(n, 3);
    CHECK(!strcmp(chunk_str(t10, &c[0]), "w0 w1 w2 w3"));
    CHECK(!strcmp(chunk_str(t10, &c[1]), "w3 w4 w5 w6"));
    CHECK(!strcmp(chunk_str(t10, &c[2]), "w6 w7 w8 w9"));
    lk_free(c);
    // 11 tokens: a fourth chunk holds the last 2 (w9 shared with the third)
    const char *t11 = "w0 w1 w2 w3 w4 w5 w6 w7 w8 w9 w10";
    CHECK_OK(fts_chunk_text(t11, 4, 1, &c, &n, test_err()));
    CHECK_INT(n, 4);
    CHECK(!strcmp(chunk_str(t11, &c[3]), "w9 w10"));
    CHECK_INT(c[3].n_tokens, 2);
    lk_free(c);
    // inner whitespace is kept, outer trimmed; short text is one chunk
    const char *ws = "  a\nb\tc   d \n";
    CHECK_OK(fts_chunk_text(ws, 3, 0, &c, &n, test_err()));
    CHECK_INT(n, 2);
    CHECK(!strcmp(chunk_str(ws, &c[0]), "a\nb\tc"));
    CHECK(!strcmp(chunk_str(ws, &c[1]), "d"));
    lk_free(c);
    CHECK_OK(fts_chunk_text(ws, 200, 40, &c, &n, test_err()));
    CHECK(n == 1 && !strcmp(chunk_str(ws, &c[0]), "a\nb\tc   d"));
    lk_free(c);
    // empty text: one empty chunk
    CHECK_OK(fts_chunk_text(" \n ", 5, 1, &c, &n, test_err()));
    CHECK(n == 1 && c[0].len == 0 && c[0].n_tokens == 0);
    lk_free(c);
    // Chinese: one token per character. 高血压是一种病 (7), N = 3, M = 1: 高血压 / 压是一 / 一种病
    const char *zh = "\xe9\xab\x98\xe8\xa1\x80\xe5\x8e\x8b\xe6\x98\xaf\xe4\xb8\x80\xe7\xa7\x8d\xe7\x97\x85";
    CHECK_OK(fts_chunk_text(zh, 3, 1, &c, &n, test_err()));
    CHECK_INT(n, 3);
    CHECK(!strcmp(chunk_str(zh, &c[0]), "\xe9\xab\x98\xe8\xa1\x80\xe5\x8e\x8b"));
    CHECK(!strcmp(chunk_str(zh, &c[1]), "\xe5\x8e\x8b\xe6\x98\xaf\xe4\xb8\x80"));
    CHECK(!strcmp(chunk_str(zh, &c[2]), "\xe4\xb8\x80\xe7\xa7\x8d\xe7\x97\x85"));
    lk_free(c);
    // mixed: "ab高c" is tokens ab, 高, c
    CHECK_OK(fts_chunk_text("ab\xe9\xab\x98" "c", 2, 0, &c, &n, test_err()));
    CHECK(n == 2 && c[0].n_tokens == 2 && !strcmp(chunk_str("ab\xe9\xab\x98" "c", &c[1]), "c"));
    lk_free(c);
    CHECK(fts_chunk_text("x", 4, 4, &c, &n, test_err()) == LK_ERR_USAGE);
    CHECK(fts_chunk_text("x", 0, 0, &c, &n, test_err()) == LK_ERR_USAGE);
}

TEST(fts_chunk_matches_reference_split)
{
    // Reference: split ASCII words by hand; chunk i must be words[i*S, min(i*S + N, T)),
    // the last chunk must end at T and the one before must not.
    char text[1024], words[64][16];
    for (int T = 0; T <= 40; T++)
        for (int N = 1; N <= 7; N++)
            for (int M = 0; M < N; M++) {
                size_t w = 0;
                for (int i = 0; i < T; i++) {
                    snprintf(words[i], sizeof words[i], "t%d", i);
                    w += (size_t)snprintf(text + w, sizeof text - w, "%s%s", i % 3 ? " " : "\n ", words[i]);
                }
                text[w] = 0;
                struct fts_chunk *c;
                size_t n;
                CHECK_OK(fts_chunk_text(text, N, M, &c, &n, test_err()));
                int S = N - M;
                for (size_t k = 0; k < n; k++) {
                    int a = (int)k * S, b = a + N < T ? a + N : T;
                    char want[1024] = "";
                    for (int i = a; i < b; i++) {
                        if (i > a)
                            strcat(want, i % 3 ? " " : "\n ");
                        strcat(want, words[i]);
                    }
                    CHECK_MSG(!strcmp(chunk_str(text, &c[k]), want),
                              "T=%d N=%d M=%d chunk %zu: '%s' want '%s'", T, N, M, k,
                              chunk_str(text, &c[k]), want);
                }
                if (T > 0) {
                    CHECK((int)(n - 1) * S + N >= T);             // the last reaches the end
                    CHECK(n == 1 || (int)(n - 2) * S + N < T);    // and is needed
                }
                lk_free(c);
            }
}

// ---- a small hand-made corpus ----

static const char *CORPUS =
    "{\"id\":\"d-glaucoma\",\"title\":\"Glaucoma\",\"text\":\"Glaucoma is a group of eye diseases "
    "that damage the optic nerve. Open-angle glaucoma has no early symptoms. Treatment includes eye "
    "drops and laser surgery.\"}\n"
    "{\"id\":\"d-diabetes\",\"title\":\"Diabetes\",\"text\":\"Diabetes is a disease in which blood "
    "glucose levels are too high. Insulin helps glucose get into cells. Symptoms include thirst and "
    "frequent urination.\"}\n"
    "\n"
    "{\"id\":\"d-asthma\",\"title\":\"Asthma\",\"text\":\"Asthma is a chronic disease of the airways. "
    "Wheezing, coughing and shortness of breath are symptoms of asthma. Inhalers relieve attacks.\"}\n"
    "{\"id\":\"d-gout\",\"title\":\"Gout\",\"text\":\"Gout is arthritis caused by uric acid crystals "
    "in a joint, often the big toe.\",\"extra\":[1,2]}\n"
    "{\"id\":\"d-empty\",\"title\":\"Title only: Scurvy\",\"text\":\"\"}\n";

static int build(const char *docs, const char *db, enum fts_tokenizer t)
{
    struct fts_settings s = { t, 12, 3 };
    return fts_index_build(docs, db, &s, 0, NULL, test_err());
}

static const char *top_doc(struct fts_index *idx, const char *q)
{
    static char buf[256];
    struct fts_hit *h;
    int n;
    snprintf(buf, sizeof buf, "<error>");
    if (fts_search(idx, q, 5, &h, &n, test_err()) != LK_OK)
        return buf;
    snprintf(buf, sizeof buf, "%s", n ? h[0].doc_id : "<none>");
    fts_hits_free(h, n);
    return buf;
}

TEST(fts_index_and_search_small_corpus)
{
    TPATH(docs, "docs.jsonl");
    TPATH(db, "p.fts");
    CHECK_OK(write_text(docs, CORPUS));
    struct fts_build_stats st;
    struct fts_settings s = { FTS_TOK_PORTER, 12, 3 };
    CHECK_OK(fts_index_build(docs, db, &s, 0, &st, test_err()));
    CHECK_INT(st.n_docs, 5);
    CHECK(st.n_chunks >= 7); // glaucoma (22 tokens) alone needs 3 chunks of 12 with overlap 3
    struct fts_index idx;
    CHECK_OK(fts_open(&idx, db, test_err()));
    CHECK(idx.settings.tokenizer == FTS_TOK_PORTER && idx.settings.chunk_tokens == 12 &&
          idx.settings.overlap == 3 && idx.n_docs == 5 && idx.n_chunks == st.n_chunks);
    CHECK(!strcmp(idx.source, docs));
    CHECK(!strcmp(top_doc(&idx, "What are the symptoms of asthma?"), "d-asthma"));
    CHECK(!strcmp(top_doc(&idx, "optic nerve damage"), "d-glaucoma"));
    CHECK(!strcmp(top_doc(&idx, "uric acid"), "d-gout"));
    CHECK(!strcmp(top_doc(&idx, "scurvy"), "d-empty")); // title only
    CHECK(!strcmp(top_doc(&idx, "diabetic"), "d-diabetes")); // porter: diabetic ~ diabetes
    CHECK(!strcmp(top_doc(&idx, "zebra"), "<none>"));
    struct fts_hit *h;
    int n;
    CHECK_OK(fts_search(&idx, "insulin glucose", 3, &h, &n, test_err()));
    CHECK(n >= 1 && !strcmp(h[0].title, "Diabetes") && strstr(h[0].snippet, "[Insulin]") &&
          strstr(h[0].text, "nsulin") && h[0].score > 0);
    for (int i = 1; i < n; i++)
        CHECK(h[i].score <= h[i - 1].score);
    fts_hits_free(h, n);
    // settings checks
    struct fts_settings want = { FTS_TOK_TRIGRAM, 0, -1 };
    CHECK(fts_index_check(&idx, &want, test_err()) == LK_ERR_USAGE);
    CHECK(strstr(test_errmsg(), "porter") && strstr(test_errmsg(), "trigram"));
    want = (struct fts_settings){ FTS_TOK_PORTER, 12, 3 };
    CHECK_OK(fts_index_check(&idx, &want, test_err()));
    fts_close(&idx);
    fts_close(&idx);

    // unicode61 does not stem: "diabetic" finds nothing
    CHECK_OK(build(docs, test_path("u.fts"), FTS_TOK_UNICODE61));
    CHECK_OK(fts_open(&idx, test_path("u.fts"), test_err()));
    CHECK(!strcmp(top_doc(&idx, "diabetic"), "<none>"));
    CHECK(!strcmp(top_doc(&idx, "diabetes"), "d-diabetes"));
    fts_close(&idx);

    // an existing index is kept unless overwrite
    CHECK(build(docs, db, FTS_TOK_TRIGRAM) == LK_ERR_EXISTS);
    CHECK_OK(fts_open(&idx, db, test_err()));
    CHECK(idx.settings.tokenizer == FTS_TOK_PORTER);
    fts_close(&idx);
}

TEST(fts_cli_index_and_search)
{
    TPATH(docs, "docs.jsonl");
    CHECK_OK(write_text(docs, CORPUS));
    const char *lk = test_lorakit();
    CHECK_INT(test_sh("%s index --help", lk), 0);
    CHECK(strstr(test_output(), "CJK") && strstr(test_output(), "example"));
    CHECK_INT(test_sh("%s index --docs %s --db %s/i.fts --chunk-tokens 12 --overlap 3", lk, docs,
                      test_tmpdir()), 0);
    CHECK(strstr(test_output(), "5 documents"));
    CHECK_INT(test_sh("%s search --db %s/i.fts --k 2 'what is \"glaucoma\" (AND' OR", lk,
                      test_tmpdir()), 0);
    CHECK(strstr(test_output(), "d-glaucoma") && strstr(test_output(), "tokenizer porter"));
    CHECK_INT(test_sh("%s search --db %s/i.fts --json thirst", lk, test_tmpdir()), 0);
    CHECK(strstr(test_output(), "\"doc_id\":\"d-diabetes\"") && strstr(test_output(), "\"rank\":1"));
    CHECK_INT(test_sh("%s search --db %s/i.fts '?!'", lk, test_tmpdir()), 0);
    CHECK(strstr(test_output(), "no results"));
    CHECK_INT(test_sh("%s search --db %s/i.fts --fts-tokenizer trigram x", lk, test_tmpdir()), 2);
    CHECK(strstr(test_output(), "lorakit search: error:") && strstr(test_output(), "porter"));
    CHECK_INT(test_sh("%s index --docs %s --db %s/i.fts", lk, docs, test_tmpdir()), 1);
    CHECK(strstr(test_output(), "already exists"));
    CHECK_INT(test_sh("%s index --docs %s --db %s/j.fts --overlap 300", lk, docs, test_tmpdir()), 2);
    CHECK_INT(test_sh("%s index --docs %s --db %s/j.fts --fts-tokenizer nope", lk, docs,
                      test_tmpdir()), 2);
    CHECK_INT(test_sh("%s search --db %s/absent.fts x", lk, test_tmpdir()), 1);
    // recall over a tiny QA file: both questions find their document first
    CHECK_OK(write_text(test_path("qa.jsonl"),
                        "{\"question\":\"What causes gout ?\",\"doc_id\":\"d-gout\"}\n"
                        "{\"question\":\"Does glaucoma damage the optic nerve?\",\"doc_id\":\"d-glaucoma\"}\n"));
    CHECK_INT(test_sh("%s search --db %s/i.fts --eval-recall %s/qa.jsonl --json", lk,
                      test_tmpdir(), test_tmpdir()), 0);
    CHECK(strstr(test_output(), "\"recall@1\":1") && strstr(test_output(), "\"n_questions\":2"));
}

// ---- the query builder against hostile text ----

/* Independent check of a built query's shape: empty, or "..." (with "" escapes) separated by
 * exactly " OR ". Anything else could be FTS5 syntax. */
static int query_shape_ok(const char *q)
{
    if (!*q)
        return 1;
    const char *p = q;
    for (;;) {
        if (*p++ != '"')
            return 0;
        for (;;) {
            if (!*p)
                return 0;
            if (*p == '"') {
                if (p[1] == '"') {
                    p += 2;
                    continue;
                }
                p++;
                break;
            }
            p++;
        }
        if (!*p)
            return 1;
        if (strncmp(p, " OR ", 4))
            return 0;
        p += 4;
    }
}

static const char *HOSTILE[] = {
    "",
    "\"",
    "\"\"\"",
    "'; DROP TABLE chunks; --",
    "((((",
    "))) a",
    "a AND",
    "AND OR NOT",
    "NEAR(a b, 3)",
    "a NOT b",
    "title:glaucoma",
    "doc_id:x text:y",
    "{title text}: eye",
    "*",
    "eye*",
    "^eye",
    "- eye",
    "-eye +asthma",
    "a\" OR \"b",
    "\xf0\x9f\x98\x80\xf0\x9f\x92\x89 emoji",
    "\xe7\xb3\x96\xe5\xb0\xbf\xe7\x97\x85\xe7\x9a\x84\xe7\x97\x87\xe7\x8a\xb6\xe6\x98\xaf\xe4\xbb\x80\xe4\xb9\x88\xef\xbc\x9f",
    "\xd9\x85\xd8\xa7 \xd9\x87\xd9\x8a \xd8\xa3\xd8\xb9\xd8\xb1\xd8\xa7\xd8\xb6 \xd8\xa7\xd9\x84\xd8\xb1\xd8\xa8\xd9\x88",
    "?!.,;:()[]{}<>@#$%^&*_+=|\\/~`",
    "\x01\x02\x03\x1b[31m\x7f\t\r\n",
    "\xff\xfe\xc0\xaf invalid utf8 \xe2\x82",
    "a\xcc\x81\xcc\x81 combining",
    "x:y:z NEAR/3 \"unterminated",
    "OR",
    "NOT NOT NOT",
    "ab", // shorter than 3: dropped under trigram
};

TEST(fts_hostile_queries_never_error)
{
    TPATH(docs, "docs.jsonl");
    CHECK_OK(write_text(docs, CORPUS));
    // a 10 KB query of mixed junk
    char *big = lk_malloc(10241);
    CHECK(big);
    static const char pat[] = "ab\"(:*^- OR NEAR\xe7\xb3\x96";
    for (int i = 0; i < 10240; i++)
        big[i] = pat[i % (int)(sizeof pat - 1)];
    big[10240] = 0;
    struct lk_rng rng;
    lk_rng_seed(&rng, 1234);
    for (int t = FTS_TOK_UNICODE61; t <= FTS_TOK_TRIGRAM; t++) {
        char db[64];
        snprintf(db, sizeof db, "t%d.fts", t);
        CHECK_OK(build(docs, test_path(db), (enum fts_tokenizer)t));
        struct fts_index idx;
        CHECK_OK(fts_open(&idx, test_path(db), test_err()));
        int nh = (int)(sizeof HOSTILE / sizeof HOSTILE[0]);
        for (int i = -1; i < nh + 3000; i++) {
            char rnd[80];
            const char *q;
            if (i < 0) {
                q = big;
            } else if (i < nh) {
                q = HOSTILE[i];
            } else { // random bytes 1..255 with a bias to FTS5 syntax characters
                int len = 1 + (int)(lk_rng_u64(&rng) % 70);
                for (int j = 0; j < len; j++) {
                    uint64_t r = lk_rng_u64(&rng);
                    static const char syn[] = "\"():*^-+ ORANDNOTNEAR{},\xe7\xb3\x96";
                    rnd[j] = r & 1 ? syn[(r >> 1) % (sizeof syn - 1)] : (char)(1 + (r >> 8) % 255);
                }
                rnd[len] = 0;
                q = rnd;
            }
            char *built;
            CHECK_OK(fts_query_build(q, (enum fts_tokenizer)t, &built, test_err()));
            int ok = query_shape_ok(built);
            lk_free(built);
            CHECK_MSG(ok, "tokenizer %d query %d: bad shape", t, i);
            struct fts_hit *h;
            int n;
            int rc = fts_search(&idx, q, 5, &h, &n, test_err());
            CHECK_MSG(rc == LK_OK, "tokenizer %d, query %d: %s", t, i, test_errmsg());
            fts_hits_free(h, n);
        }
        fts_close(&idx);
    }
    lk_free(big);
}

TEST(fts_query_build_exact_forms)
{
    char *q;
    CHECK_OK(fts_query_build("Title:Glaucoma AND (eye*) NOT \"x\"", FTS_TOK_UNICODE61, &q, test_err()));
    CHECK(!strcmp(q, "\"title\" OR \"glaucoma\" OR \"and\" OR \"eye\" OR \"not\" OR \"x\""));
    lk_free(q);
    CHECK_OK(fts_query_build("the eye, THE EYE", FTS_TOK_PORTER, &q, test_err()));
    CHECK(!strcmp(q, "\"the\" OR \"eye\"")); // de-duplicated, lower-cased
    lk_free(q);
    CHECK_OK(fts_query_build("is an eye ok", FTS_TOK_TRIGRAM, &q, test_err()));
    CHECK(!strcmp(q, "\"eye\"")); // is, an, ok: shorter than 3
    lk_free(q);
    CHECK_OK(fts_query_build("?? -- ::", FTS_TOK_PORTER, &q, test_err()));
    CHECK(!strcmp(q, ""));
    lk_free(q);
    // trigram + Chinese: 糖尿病的症状 -> 糖尿病, 尿病的, 病的症, 的症状; "2型" splits at the script change
    CHECK_OK(fts_query_build("\xe7\xb3\x96\xe5\xb0\xbf\xe7\x97\x85\xe7\x9a\x84\xe7\x97\x87\xe7\x8a\xb6",
                             FTS_TOK_TRIGRAM, &q, test_err()));
    CHECK(!strcmp(q, "\"\xe7\xb3\x96\xe5\xb0\xbf\xe7\x97\x85\" OR \"\xe5\xb0\xbf\xe7\x97\x85\xe7\x9a\x84\" OR "
                     "\"\xe7\x97\x85\xe7\x9a\x84\xe7\x97\x87\" OR \"\xe7\x9a\x84\xe7\x97\x87\xe7\x8a\xb6\""));
    lk_free(q);
    // the cap on terms
    char many[4096] = "";
    for (int i = 0; i < 200; i++)
        sprintf(many + strlen(many), "w%d ", i);
    CHECK_OK(fts_query_build(many, FTS_TOK_UNICODE61, &q, test_err()));
    int ors = 0;
    for (const char *p = q; (p = strstr(p, " OR ")); p += 4)
        ors++;
    CHECK_INT(ors + 1, FTS_QUERY_MAX_TERMS);
    lk_free(q);
}

TEST(fts_trigram_finds_chinese)
{
    TPATH(docs, "zh.jsonl");
    // 高血压 / 糖尿病 / 哮喘 documents
    CHECK_OK(write_text(docs,
        "{\"id\":\"zh-htn\",\"title\":\"\xe9\xab\x98\xe8\xa1\x80\xe5\x8e\x8b\",\"text\":\"\xe9\xab\x98\xe8\xa1\x80\xe5\x8e\x8b\xe6\x98\xaf\xe4\xb8\x80\xe7\xa7\x8d\xe5\xb8\xb8\xe8\xa7\x81\xe7\x9a\x84\xe6\x85\xa2\xe6\x80\xa7\xe7\x97\x85\xef\xbc\x8c\xe8\xa1\x80\xe5\x8e\x8b\xe6\x8c\x81\xe7\xbb\xad\xe5\x8d\x87\xe9\xab\x98\xe3\x80\x82\"}\n"
        "{\"id\":\"zh-dm\",\"title\":\"\xe7\xb3\x96\xe5\xb0\xbf\xe7\x97\x85\",\"text\":\"\xe7\xb3\x96\xe5\xb0\xbf\xe7\x97\x85\xe7\x9a\x84\xe5\x85\xb8\xe5\x9e\x8b\xe7\x97\x87\xe7\x8a\xb6\xe6\x98\xaf\xe5\xa4\x9a\xe9\xa5\xae\xe3\x80\x81\xe5\xa4\x9a\xe5\xb0\xbf\xe5\x92\x8c\xe4\xbd\x93\xe9\x87\x8d\xe4\xb8\x8b\xe9\x99\x8d\xe3\x80\x82\"}\n"
        "{\"id\":\"zh-asthma\",\"title\":\"\xe5\x93\xae\xe5\x96\x98\",\"text\":\"\xe5\x93\xae\xe5\x96\x98\xe6\x82\xa3\xe8\x80\x85\xe4\xbc\x9a\xe5\x87\xba\xe7\x8e\xb0\xe5\x96\x98\xe6\x81\xaf\xe5\x92\x8c\xe5\x92\xb3\xe5\x97\xbd\xe3\x80\x82\"}\n"));
    CHECK_OK(build(docs, test_path("zh.fts"), FTS_TOK_TRIGRAM));
    struct fts_index idx;
    CHECK_OK(fts_open(&idx, test_path("zh.fts"), test_err()));
    // 糖尿病的症状是什么？ (what are the symptoms of diabetes?)
    CHECK(!strcmp(top_doc(&idx, "\xe7\xb3\x96\xe5\xb0\xbf\xe7\x97\x85\xe7\x9a\x84\xe7\x97\x87\xe7\x8a\xb6\xe6\x98\xaf\xe4\xbb\x80\xe4\xb9\x88\xef\xbc\x9f"), "zh-dm"));
    // 高血压怎么治疗 (how is hypertension treated)
    CHECK(!strcmp(top_doc(&idx, "\xe9\xab\x98\xe8\xa1\x80\xe5\x8e\x8b\xe6\x80\x8e\xe4\xb9\x88\xe6\xb2\xbb\xe7\x96\x97"), "zh-htn"));
    // 哮喘患者 (asthma patients)
    CHECK(!strcmp(top_doc(&idx, "\xe5\x93\xae\xe5\x96\x98\xe6\x82\xa3\xe8\x80\x85"), "zh-asthma"));
    fts_close(&idx);
    // unicode61 keeps a run of ideographs as one token: the question does not match
    CHECK_OK(build(docs, test_path("zh61.fts"), FTS_TOK_UNICODE61));
    CHECK_OK(fts_open(&idx, test_path("zh61.fts"), test_err()));
    CHECK(!strcmp(top_doc(&idx, "\xe7\xb3\x96\xe5\xb0\xbf\xe7\x97\x85\xe7\x9a\x84\xe7\x97\x87\xe7\x8a\xb6\xe6\x98\xaf\xe4\xbb\x80\xe4\xb9\x88\xef\xbc\x9f"), "<none>"));
    fts_close(&idx);
}

/* Files in the test folder other than out.txt and those named. */
static int stray_files(void)
{
    test_sh("ls -A '%s' | grep -v -e '^out.txt$' -e '^docs.jsonl$' | wc -l", test_tmpdir());
    return atoi(test_output());
}

TEST(fts_bad_documents_name_the_line_and_leave_no_index)
{
    TPATH(docs, "docs.jsonl");
    TPATH(db, "x.fts");
    struct fts_settings s = { FTS_TOK_PORTER, 200, 40 };
    static const struct {
        const char *text, *want;
    } cases[] = {
        { "{\"id\":\"a\",\"title\":\"A\",\"text\":\"x\"}\n\n{\"id\":\"b\",\"title\":\"B\",\"text\":\"y\"\n",
          "docs.jsonl:3: not a JSON object" },
        { "{\"id\":\"a\",\"title\":\"A\",\"text\":\"x\"}\n{\"id\":\"b\",\"title\":\"B\"}\n",
          "docs.jsonl:2: missing field 'text'" },
        { "{\"id\":7,\"title\":\"A\",\"text\":\"x\"}\n", "docs.jsonl:1: field 'id' is not a string" },
        { "[1,2]\n", "docs.jsonl:1: not a JSON object" },
        { "{\"id\":\"a\",\"title\":\"A\",\"text\":\"x\"}\n{\"id\":\"a\",\"title\":\"B\",\"text\":\"y\"}\n",
          "docs.jsonl:2: duplicate id 'a' (first on line 1)" },
        { "{\"id\":\"\",\"title\":\"A\",\"text\":\"x\"}\n", "docs.jsonl:1: empty 'id'" },
        { "\n  \n", "no documents" },
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        CHECK_OK(write_text(docs, cases[i].text));
        int rc = fts_index_build(docs, db, &s, 1, NULL, test_err());
        CHECK_MSG(rc == LK_ERR_FORMAT, "case %zu: rc %d", i, rc);
        CHECK_MSG(strstr(test_errmsg(), cases[i].want), "case %zu: '%s'", i, test_errmsg());
        CHECK_INT(stray_files(), 0); // neither the index nor its temp file
    }
    // through the CLI: exit 1, the message, no file
    CHECK_OK(write_text(docs, cases[0].text));
    CHECK_INT(test_sh("%s index --docs %s --db %s", test_lorakit(), docs, db), 1);
    CHECK(strstr(test_output(), "lorakit index: error:") && strstr(test_output(), "docs.jsonl:3"));
    CHECK_INT(stray_files(), 0);
    CHECK(fts_index_build(test_path("nope.jsonl"), db, &s, 1, NULL, test_err()) == LK_ERR_MISSING);
    // an existing good index survives a failed --overwrite
    CHECK_OK(write_text(docs, CORPUS));
    CHECK_OK(fts_index_build(docs, db, &s, 0, NULL, test_err()));
    CHECK_OK(write_text(docs, cases[1].text));
    CHECK(fts_index_build(docs, db, &s, 1, NULL, test_err()) == LK_ERR_FORMAT);
    struct fts_index idx;
    CHECK_OK(fts_open(&idx, db, test_err()));
    CHECK_INT(idx.n_docs, 5);
    fts_close(&idx);
}

TEST(fts_open_rejects_other_files)
{
    struct fts_index idx;
    const char *junk = test_path("junk.fts");
    char buf[2048];
    memset(buf, 'z', sizeof buf);
    CHECK_OK(lk_write_file_atomic(junk, buf, sizeof buf, test_err()));
    CHECK(fts_open(&idx, junk, test_err()) == LK_ERR_FORMAT);
    CHECK(strstr(test_errmsg(), "not an SQLite database"));
    sqlite3 *s;
    CHECK_INT(sqlite3_open(test_path("other.db"), &s), SQLITE_OK);
    CHECK_INT(sqlite3_exec(s, "CREATE TABLE t(x)", NULL, NULL, NULL), SQLITE_OK);
    sqlite3_close(s);
    CHECK(fts_open(&idx, test_path("other.db"), test_err()) == LK_ERR_FORMAT);
    CHECK(strstr(test_errmsg(), "not a lorakit search index"));
    CHECK(fts_open(&idx, test_path("absent.fts"), test_err()) == LK_ERR_MISSING);
}

// ---- acceptance: every MedQuAD question through the search path ----

/* Copies to dst every step-th line of src shorter than max_len bytes, n_docs of them at most:
 * a spread of sources with short texts, so the index stays small. */
static int pick_lines(const char *src, const char *dst, int n_docs, int step, size_t max_len)
{
    char *buf;
    size_t len;
    if (lk_read_file(src, &buf, &len, test_err()))
        return -1;
    size_t w = 0, pos = 0;
    int k = 0;
    for (long i = 0; pos < len && k < n_docs; i++) {
        char *nl = memchr(buf + pos, '\n', len - pos);
        size_t end = nl ? (size_t)(nl - buf) + 1 : len;
        if (i % step == 0 && end - pos < max_len) {
            memmove(buf + w, buf + pos, end - pos);
            w += end - pos;
            k++;
        }
        pos = end;
    }
    int rc = lk_write_file_atomic(dst, buf, w, test_err());
    lk_free(buf);
    return rc;
}

/* Every "question" of a QA file through the search path; returns the count, -1 on a failure.
 * k_best > 0: fts_search (ranking and snippets); k_best == 0: fts_query_build and a bare
 * MATCH (the part that could raise an FTS5 syntax error), several times cheaper. */
static long questions_through(struct fts_index *idx, const char *qa, int k_best)
{
    char *buf;
    size_t len;
    if (lk_read_file(qa, &buf, &len, test_err()))
        return -1;
    sqlite3_stmt *st = NULL;
    if (sqlite3_prepare_v2(idx->db, "SELECT count(*) FROM chunks WHERE chunks MATCH ?1", -1, &st,
                           NULL) != SQLITE_OK) {
        lk_free(buf);
        return -1;
    }
    long n = 0;
    int bad = 0;
    char *line = buf;
    while (!bad && line < buf + len) {
        char *nl = strchr(line, '\n');
        if (nl)
            *nl = 0;
        cJSON *o = cJSON_Parse(line);
        const cJSON *q = cJSON_GetObjectItemCaseSensitive(o, "question");
        if (cJSON_IsString(q)) {
            if (k_best > 0) {
                struct fts_hit *h;
                int k;
                bad = fts_search(idx, q->valuestring, k_best, &h, &k, test_err()) != LK_OK;
                fts_hits_free(h, k);
            } else {
                char *fq;
                bad = fts_query_build(q->valuestring, idx->settings.tokenizer, &fq, test_err());
                if (!bad && fq[0]) {
                    sqlite3_bind_text(st, 1, fq, -1, SQLITE_STATIC);
                    bad = sqlite3_step(st) != SQLITE_ROW;
                    if (bad)
                        lk_errf(test_err(), LK_ERR_IO, "%s: %s", fq, sqlite3_errmsg(idx->db));
                    sqlite3_reset(st);
                }
                if (!bad)
                    lk_free(fq);
            }
            if (bad)
                fprintf(stderr, "%s:%ld: %s\n", qa, n + 1, test_errmsg());
            n++;
        }
        cJSON_Delete(o);
        if (!nl)
            break;
        line = nl + 1;
    }
    sqlite3_finalize(st);
    lk_free(buf);
    return bad ? -1 : n;
}

TEST(fts_medquad_questions_never_error)
{
    const char *dev = test_shared("data/medquad/dev.jsonl");
    if (!dev)
        SKIP("data/medquad/dev.jsonl not found (set LK_SHARED)");
    char devp[1024], trainp[1024], docsp[1024];
    snprintf(devp, sizeof devp, "%s", dev);
    const char *train = test_shared("data/medquad/train.jsonl");
    const char *docs = test_shared("data/medquad/docs.jsonl");
    if (!train || !docs)
        SKIP("data/medquad train or docs missing");
    snprintf(trainp, sizeof trainp, "%s", train);
    snprintf(docsp, sizeof docsp, "%s", docs);
    // A subset of the documents keeps MATCH cheap: FTS5 parses the whole query whatever the
    // index holds, so a syntax error would still surface. Quick tier: dev questions through
    // fts_search; full tier: also every train question through the builder and MATCH.
    int full = test_full();
    CHECK_OK(pick_lines(docsp, test_path("sub.jsonl"), full ? 100 : 20, full ? 53 : 197, 3000));
    for (int t = FTS_TOK_UNICODE61; t <= FTS_TOK_TRIGRAM; t++) {
        char db[64];
        snprintf(db, sizeof db, "m%d.fts", t);
        struct fts_settings s = { (enum fts_tokenizer)t, 200, 40 };
        CHECK_OK(fts_index_build(test_path("sub.jsonl"), test_path(db), &s, 0, NULL, test_err()));
        struct fts_index idx;
        CHECK_OK(fts_open(&idx, test_path(db), test_err()));
        CHECK_INT(questions_through(&idx, devp, full ? 5 : 1), 1782); // the whole path
        if (full)
            CHECK_INT(questions_through(&idx, trainp, 0), 12827); // builder + MATCH
        fts_close(&idx);
    }
}

// ---- document ranking (version 2) ----

TEST(fts_query_stopwords_dropped_unless_all)
{
    char *q;
    CHECK_OK(fts_query_build_flags("What are the symptoms of Glaucoma ?", FTS_TOK_PORTER,
                                   FTS_QUERY_STOPWORDS, &q, test_err()));
    CHECK(!strcmp(q, "\"symptoms\" OR \"glaucoma\""));
    lk_free(q);
    CHECK_OK(fts_query_build_flags("The Who", FTS_TOK_UNICODE61, FTS_QUERY_STOPWORDS, &q, test_err()));
    CHECK(!strcmp(q, "\"the\" OR \"who\"")); // nothing but stop words: all kept
    lk_free(q);
    CHECK_OK(fts_query_build_flags("what the glaucoma", FTS_TOK_TRIGRAM, FTS_QUERY_STOPWORDS, &q, test_err()));
    CHECK(!strcmp(q, "\"what\" OR \"the\" OR \"glaucoma\"")); // trigram: no stop words
    lk_free(q);
    CHECK_OK(fts_query_build("What is it", FTS_TOK_PORTER, &q, test_err())); // the plain builder keeps all
    CHECK(!strcmp(q, "\"what\" OR \"is\" OR \"it\""));
    lk_free(q);
    CHECK(fts_is_stopword("the", 3) && fts_is_stopword("your", 4) && fts_is_stopword("a", 1));
    CHECK(!fts_is_stopword("them", 4) && !fts_is_stopword("th", 2) && !fts_is_stopword("", 0));
    CHECK(!fts_is_stopword("thermometer", 11) && !fts_is_stopword("aa", 2));
}

/* Hits of a search as "doc:chunk doc:chunk ...". */
static const char *hits_str(struct fts_index *idx, const char *q, int k, enum fts_rank rank)
{
    static char buf[1024];
    struct fts_hit *h;
    int n;
    snprintf(buf, sizeof buf, "<error>");
    if (fts_search_ranked(idx, q, k, rank, 1, &h, &n, test_err()) != LK_OK)
        return buf;
    buf[0] = 0;
    for (int i = 0; i < n; i++)
        snprintf(buf + strlen(buf), sizeof buf - strlen(buf), "%s%s:%lld", i ? " " : "", h[i].doc_id,
                 (long long)h[i].chunk_no);
    fts_hits_free(h, n);
    return buf;
}

TEST(fts_search_returns_distinct_documents_as_their_best_chunk)
{
    // "long" has 4 chunks of 6 tokens (overlap 0); only its third mentions the query's words
    const char *docs =
        "{\"id\":\"long\",\"title\":\"Notes\",\"text\":\"one two three four five six seven eight nine ten "
        "eleven twelve kidney stones hurt kidney stones pass thirteen fourteen fifteen sixteen seventeen "
        "eighteen\"}\n"
        "{\"id\":\"a\",\"title\":\"Kidney stones\",\"text\":\"Hard deposits form in the kidney.\"}\n"
        "{\"id\":\"b\",\"title\":\"Gout\",\"text\":\"Crystals of uric acid; stones are rare.\"}\n";
    CHECK_OK(write_text(test_path("d.jsonl"), docs));
    struct fts_settings s = { FTS_TOK_PORTER, 6, 0 };
    CHECK_OK(fts_index_build(test_path("d.jsonl"), test_path("d.fts"), &s, 0, NULL, test_err()));
    struct fts_index idx;
    CHECK_OK(fts_open(&idx, test_path("d.fts"), test_err()));
    // version 1's ranking may return one document several times; v2 never does
    const char *all = hits_str(&idx, "kidney stones", 10, FTS_RANK_DOCS);
    char got[1024];
    snprintf(got, sizeof got, "%s", all); // hits_str's buffer is reused below
    all = got;
    CHECK_MSG(strstr(all, "long:2") && strstr(all, "a:0") && strstr(all, "b:0"), "%s", all);
    int count = 0;
    for (const char *p = all; (p = strstr(p, "long:")); p++)
        count++;
    CHECK_INT(count, 1);
    // k 1: the best passage among the candidates, whatever k is
    char first[1024];
    snprintf(first, sizeof first, "%s", all);
    first[strcspn(first, " ")] = 0;
    CHECK(!strcmp(hits_str(&idx, "kidney stones", 1, FTS_RANK_DOCS), first));
    // the plain ranking's hit is the document's first chunk
    CHECK(strstr(hits_str(&idx, "kidney stones hurt", 3, FTS_RANK_PLAIN), "long:0"));
    struct fts_hit *h;
    int n;
    CHECK_OK(fts_search(&idx, "What hurts?", 5, &h, &n, test_err())); // "what" dropped, "hurt" stems
    CHECK(n == 1 && !strcmp(h[0].doc_id, "long") && h[0].chunk_no == 2 && strstr(h[0].text, "hurt") &&
          strstr(h[0].snippet, "[hurt]"));
    fts_hits_free(h, n);
    fts_close(&idx);
}

TEST(fts_title_weighs_more_than_text)
{
    // the same word once in a title, once in a text of the same length: the title wins, and
    // by the configured weight (bm25 scores are linear in the column weights)
    const char *docs =
        "{\"id\":\"t\",\"title\":\"Rickets\",\"text\":\"soft bones in children low vitamin\"}\n"
        "{\"id\":\"x\",\"title\":\"Bones\",\"text\":\"rickets soft in children low vitamin\"}\n"
        "{\"id\":\"y\",\"title\":\"Other\",\"text\":\"nothing to see here at all\"}\n";
    CHECK_OK(write_text(test_path("t.jsonl"), docs));
    struct fts_settings s = { FTS_TOK_UNICODE61, 200, 40 };
    CHECK_OK(fts_index_build(test_path("t.jsonl"), test_path("t.fts"), &s, 0, NULL, test_err()));
    struct fts_index idx;
    CHECK_OK(fts_open(&idx, test_path("t.fts"), test_err()));
    struct fts_hit *h;
    int n;
    CHECK_OK(fts_search(&idx, "rickets", 5, &h, &n, test_err()));
    CHECK(n == 2 && !strcmp(h[0].doc_id, "t") && !strcmp(h[1].doc_id, "x"));
    // FTS5's bm25 (sqlite.org/fts5.html, "The bm25() function"): a column's weight multiplies
    // the count of the phrase's hits in it, f = sum of weights, and the row scores
    // idf * f * (k1 + 1) / (f + k1 * (1 - b + b * D / avgD)), D the row's token count, k1 1.2.
    // All three rows have 7 tokens (D = avgD) and the same idf, so the ratio of the two scores
    // is (w (k1 + 1) / (w + k1)) / ((k1 + 1) / (1 + k1)) with w = FTS_TITLE_WEIGHT.
    double k1 = 1.2, w = FTS_TITLE_WEIGHT;
    CHECK_NEAR(h[0].score / h[1].score, w * (k1 + 1) / (w + k1), 1e-9);
    fts_hits_free(h, n);
    // the plain ranking weighs both columns 1: a tie
    CHECK_OK(fts_search_ranked(&idx, "rickets", 5, FTS_RANK_PLAIN, 0, &h, &n, test_err()));
    CHECK(n == 2);
    CHECK_NEAR(h[0].score, h[1].score, 1e-9);
    fts_hits_free(h, n);
    fts_close(&idx);
}

TEST(fts_version_1_index_is_refused_with_a_hint)
{
    CHECK_OK(write_text(test_path("d.jsonl"), CORPUS));
    CHECK_OK(build(test_path("d.jsonl"), test_path("v.fts"), FTS_TOK_PORTER));
    sqlite3 *db;
    CHECK(sqlite3_open(test_path("v.fts"), &db) == SQLITE_OK);
    CHECK(sqlite3_exec(db, "UPDATE meta SET value = '1' WHERE key = 'version'", NULL, NULL, NULL) == SQLITE_OK);
    sqlite3_close(db);
    struct fts_index idx;
    CHECK_INT(fts_open(&idx, test_path("v.fts"), test_err()), LK_ERR_UNSUPPORTED);
    CHECK(strstr(test_errmsg(), "version 1") && strstr(test_errmsg(), "--overwrite"));
}

/* The share of questions in a QA file whose doc_id is among the top 5 of the ranking. */
static double recall_at_5(struct fts_index *idx, const char *qa, enum fts_rank rank, int *n_q)
{
    FILE *f = fopen(qa, "r");
    if (!f)
        return -1;
    char *line = NULL;
    size_t cap = 0;
    int n = 0, found = 0;
    while (getline(&line, &cap, f) > 0) {
        cJSON *o = cJSON_Parse(line);
        const char *q = cJSON_GetStringValue(cJSON_GetObjectItem(o, "question"));
        const char *d = cJSON_GetStringValue(cJSON_GetObjectItem(o, "doc_id"));
        struct fts_hit *h;
        int nh;
        if (q && d && fts_search_ranked(idx, q, 5, rank, 0, &h, &nh, test_err()) == LK_OK) {
            n++;
            for (int i = 0; i < nh; i++)
                if (!strcmp(h[i].doc_id, d)) {
                    found++;
                    break;
                }
            fts_hits_free(h, nh);
        }
        cJSON_Delete(o);
    }
    free(line);
    fclose(f);
    *n_q = n;
    return n ? (double)found / n : -1;
}

TEST(fts_medquad_document_recall_at_5)
{
    const char *dev = test_shared("data/medquad/dev.jsonl");
    const char *docs = dev ? test_shared("data/medquad/docs.jsonl") : NULL;
    if (!dev || !docs)
        SKIP("data/medquad not found (set LK_SHARED)");
    if (!test_full())
        SKIP("full tier only (LK_TEST_FULL=1): indexes all 5,483 MedQuAD documents");
    char devp[1024];
    snprintf(devp, sizeof devp, "%s", dev);
    struct fts_settings s = { FTS_TOK_PORTER, 200, 40 };
    CHECK_OK(fts_index_build(docs, test_path("mq.fts"), &s, 0, NULL, test_err()));
    struct fts_index idx;
    CHECK_OK(fts_open(&idx, test_path("mq.fts"), test_err()));
    int n = 0, n2 = 0;
    double r5 = recall_at_5(&idx, devp, FTS_RANK_DOCS, &n);
    double plain = recall_at_5(&idx, devp, FTS_RANK_PLAIN, &n2);
    fts_close(&idx);
    fprintf(stderr, "    MedQuAD dev: document recall@5 %.4f, plain BM25 %.4f\n", r5, plain);
    CHECK_INT(n, 1782);
    CHECK_INT(n2, 1782);
    CHECK_MSG(r5 >= 0.98, "document recall@5 %.4f < 0.98", r5);
    CHECK_MSG(r5 >= plain, "lorakit %.4f below plain BM25 %.4f", r5, plain);
}
