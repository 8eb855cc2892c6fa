/*
 * fts.c - chunking, FTS5 index building, safe query building and BM25 search.
 * See fts.h for the index layout and the rules. Owns: the index connection and its
 * prepared search statement; while building, the temporary index file.
 */
#include "fts.h"

#include <cJSON.h>
#include <errno.h>
#include <fcntl.h>
#include <sqlite3.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <utf8proc.h>

#include "text.h"

// ---- characters ----

/* Letters, numbers, combining marks: what a query term is made of. */
static int is_word(int32_t c)
{
    if (c < 0x80)
        return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z');
    utf8proc_category_t k = utf8proc_category(c);
    return k >= UTF8PROC_CATEGORY_LU && k <= UTF8PROC_CATEGORY_NO; // L*, M*, N* are contiguous
}

/* Decodes one character at s[i] (len bytes in all); invalid bytes decode as -1, length 1. */
static size_t next_char(const char *s, size_t i, size_t len, int32_t *c)
{
    utf8proc_ssize_t k =
        utf8proc_iterate((const utf8proc_uint8_t *)s + i, (utf8proc_ssize_t)(len - i), c);
    if (k <= 0) {
        *c = -1;
        return 1;
    }
    return (size_t)k;
}

const char *fts_tokenizer_name(enum fts_tokenizer t)
{
    switch (t) {
    case FTS_TOK_ANY: return "any";
    case FTS_TOK_UNICODE61: return "unicode61";
    case FTS_TOK_PORTER: return "porter";
    case FTS_TOK_TRIGRAM: return "trigram";
    }
    return "?";
}

int fts_tokenizer_parse(const char *name, enum fts_tokenizer *out, struct lk_err *err)
{
    for (int t = FTS_TOK_UNICODE61; t <= FTS_TOK_TRIGRAM; t++)
        if (name && !strcmp(name, fts_tokenizer_name((enum fts_tokenizer)t))) {
            *out = (enum fts_tokenizer)t;
            return LK_OK;
        }
    return lk_errf(err, LK_ERR_USAGE, "unknown FTS tokenizer '%s' (choose unicode61, porter or "
                   "trigram)", name ? name : "");
}

/* The tokenize= argument of the fts5 table: fixed strings, never user text. */
static const char *tokenize_arg(enum fts_tokenizer t)
{
    switch (t) {
    case FTS_TOK_PORTER: return "porter unicode61 remove_diacritics 2";
    case FTS_TOK_TRIGRAM: return "trigram";
    default: return "unicode61 remove_diacritics 2";
    }
}

// ---- chunking ----

struct span {
    size_t start, end;
};

/* Token spans of text: whitespace-separated runs, each CJK character on its own. */
static int tokens_of(const char *text, struct span **out, size_t *n, struct lk_err *err)
{
    size_t len = strlen(text), cap = 64, cnt = 0;
    struct span *t = lk_malloc(sizeof *t * cap);
    if (!t)
        return lk_errf(err, LK_ERR_NOMEM, "out of memory");
    size_t i = 0;
    int in_word = 0;
    while (i < len) {
        int32_t c;
        size_t k = next_char(text, i, len, &c);
        int sp = c >= 0 && ev_char_is_space(c), cjk = c >= 0 && ev_char_is_cjk(c);
        if (sp || cjk)
            in_word = 0;
        if (!sp && !in_word) {
            if (cnt == cap) {
                cap *= 2;
                struct span *nt = lk_realloc(t, sizeof *t * cap);
                if (!nt) {
                    lk_free(t);
                    return lk_errf(err, LK_ERR_NOMEM, "out of memory");
                }
                t = nt;
            }
            t[cnt].start = i;
            t[cnt].end = i + k;
            cnt++;
            in_word = !cjk;
        } else if (!sp) {
            t[cnt - 1].end = i + k;
        }
        i += k;
    }
    *out = t;
    *n = cnt;
    return LK_OK;
}

int fts_chunk_text(const char *text, int chunk_tokens, int overlap, struct fts_chunk **out,
                   size_t *n, struct lk_err *err)
{
    *out = NULL;
    *n = 0;
    if (chunk_tokens <= 0 || overlap < 0 || overlap >= chunk_tokens)
        return lk_errf(err, LK_ERR_USAGE, "chunk size %d with overlap %d: need 0 <= overlap < "
                       "chunk size", chunk_tokens, overlap);
    struct span *tok = NULL;
    size_t nt = 0;
    int r = tokens_of(text, &tok, &nt, err);
    if (r)
        return r;
    size_t N = (size_t)chunk_tokens, S = (size_t)(chunk_tokens - overlap);
    size_t nc = nt <= N ? 1 : 1 + (nt - N + S - 1) / S; // starts 0, S, 2S, ... until one reaches the end
    struct fts_chunk *c = lk_malloc(sizeof *c * nc);
    if (!c) {
        lk_free(tok);
        return lk_errf(err, LK_ERR_NOMEM, "out of memory");
    }
    if (nt == 0) {
        c[0] = (struct fts_chunk){ 0, 0, 0 };
    } else {
        for (size_t i = 0; i < nc; i++) {
            size_t a = i * S, b = a + N < nt ? a + N : nt; // tokens [a, b)
            c[i].off = tok[a].start;
            c[i].len = tok[b - 1].end - tok[a].start;
            c[i].n_tokens = b - a;
        }
        LK_ASSERT(c[nc - 1].off + c[nc - 1].len == tok[nt - 1].end);
    }
    lk_free(tok);
    *out = c;
    *n = nc;
    return LK_OK;
}

// ---- query building ----

/* English function words: Lucene's English stop set (articles, conjunctions, prepositions,
 * pronouns, forms of "be") plus question words, auxiliaries and personal pronouns, which
 * questions are full of and documents too. Sorted, for bsearch. */
static const char *const stopwords[] = {
    "a", "am", "an", "and", "are", "as", "at", "be", "been", "being", "but", "by", "can",
    "could", "did", "do", "does", "for", "from", "had", "has", "have", "how", "i", "if", "in",
    "into", "is", "it", "its", "may", "me", "might", "my", "no", "not", "of", "on", "or",
    "our", "should", "such", "that", "the", "their", "then", "there", "these", "they", "this",
    "to", "us", "was", "we", "were", "what", "when", "where", "which", "who", "whom", "whose",
    "why", "will", "with", "would", "you", "your",
};

struct word_ref {
    const char *p;
    size_t n;
};

static int cmp_stopword(const void *key, const void *elem)
{
    const struct word_ref *w = key;
    const char *s = *(const char *const *)elem;
    size_t m = strlen(s);
    int c = memcmp(w->p, s, w->n < m ? w->n : m);
    return c ? c : (w->n > m) - (w->n < m);
}

int fts_is_stopword(const char *w, size_t n)
{
    struct word_ref key = { w, n };
    return n > 0 && n <= 8 &&
           bsearch(&key, stopwords, sizeof stopwords / sizeof stopwords[0], sizeof stopwords[0],
                   cmp_stopword) != NULL;
}


struct qterms {
    struct lk_buf q;      /* the query being built */
    struct lk_buf seen;   /* "\x01term\x01" for every term kept, for de-duplication */
    int n;
    int drop_stopwords;
};

/* Adds one term (UTF-8 bytes, lower-cased already) unless seen or over the cap. */
static void add_term(struct qterms *qt, const char *t, size_t n)
{
    if (n == 0 || qt->n >= FTS_QUERY_MAX_TERMS)
        return;
    // de-duplicate: seen is "\x01t1\x01t2\x01..."; look for "\x01term\x01" (terms never
    // contain \x01: it is not a word character)
    struct lk_buf key = { 0 };
    lk_buf_put(&key, "\x01", 1);
    lk_buf_put(&key, t, n);
    lk_buf_put(&key, "\x01", 1);
    if (!qt->seen.n)
        lk_buf_put(&qt->seen, "\x01", 1);
    if (key.oom || qt->seen.oom) {
        lk_free(key.p);
        qt->q.oom = 1;
        return;
    }
    int dup = strstr(qt->seen.p, key.p) != NULL;
    if (!dup) {
        lk_buf_put(&qt->seen, key.p + 1, key.n - 1); // "term\x01"
        if (qt->n)
            lk_buf_put(&qt->q, " OR ", 4);
        lk_buf_put(&qt->q, "\"", 1);
        for (size_t i = 0; i < n; i++)
            lk_buf_put(&qt->q, t[i] == '"' ? "\"\"" : t + i, t[i] == '"' ? 2 : 1);
        lk_buf_put(&qt->q, "\"", 1);
        qt->n++;
    }
    lk_free(key.p);
}

/* Ends a run of word characters: word holds its lower-cased bytes, starts[] the byte offset
 * of each character (n_chars of them), cjk says whether the run is CJK. */
static void end_run(struct qterms *qt, enum fts_tokenizer tok, const struct lk_buf *word,
                    const size_t *starts, size_t n_chars, int cjk)
{
    if (n_chars == 0)
        return;
    if (tok != FTS_TOK_TRIGRAM) {
        if (n_chars <= FTS_TERM_MAX_CHARS && !(qt->drop_stopwords && fts_is_stopword(word->p, word->n)))
            add_term(qt, word->p, word->n);
        return;
    }
    if (n_chars < 3)
        return; // trigram cannot match fewer than 3 characters
    if (!cjk) {
        if (n_chars <= FTS_TERM_MAX_CHARS)
            add_term(qt, word->p, word->n);
        return;
    }
    // CJK under trigram: overlapping windows of 3 characters, so that a question shares
    // windows with a passage without having to be a substring of it
    for (size_t i = 0; i + 3 <= n_chars; i++) {
        size_t end = i + 3 < n_chars ? starts[i + 3] : word->n;
        add_term(qt, word->p + starts[i], end - starts[i]);
    }
}

int fts_query_build(const char *text, enum fts_tokenizer tok, char **out, struct lk_err *err)
{
    return fts_query_build_flags(text, tok, 0, out, err);
}

static int query_build(const char *text, enum fts_tokenizer tok, int drop_stopwords, char **out,
                       struct lk_err *err);

int fts_query_build_flags(const char *text, enum fts_tokenizer tok, unsigned flags, char **out,
                          struct lk_err *err)
{
    int drop = (flags & FTS_QUERY_STOPWORDS) && tok != FTS_TOK_TRIGRAM;
    int r = query_build(text, tok, drop, out, err);
    if (r || !drop || (*out)[0])
        return r;
    lk_free(*out); // nothing but stop words: keep them
    return query_build(text, tok, 0, out, err);
}

static int query_build(const char *text, enum fts_tokenizer tok, int drop_stopwords, char **out,
                       struct lk_err *err)
{
    *out = NULL;
    struct qterms qt = { .drop_stopwords = drop_stopwords };
    struct lk_buf word = { 0 };
    size_t len = text ? strlen(text) : 0, n_chars = 0, cap_starts = 0;
    size_t *starts = NULL; // byte offset in word of each of its characters
    int run_cjk = 0, oom = 0;
    lk_buf_put(&qt.q, "", 0); // "" even when no term is kept
    for (size_t i = 0; i <= len && !oom; ) {
        int32_t c = -1;
        size_t k = i < len ? next_char(text, i, len, &c) : 1;
        int w = c >= 0 && is_word(c);
        int cjk = w && ev_char_is_cjk(c);
        // a run ends at a separator, and (under trigram) where CJK meets non-CJK
        if (n_chars && (!w || (tok == FTS_TOK_TRIGRAM && cjk != run_cjk))) {
            end_run(&qt, tok, &word, starts, n_chars, run_cjk);
            word.n = 0;
            n_chars = 0;
        }
        if (w) {
            if (n_chars == cap_starts) {
                cap_starts = cap_starts ? cap_starts * 2 : 32;
                size_t *ns = lk_realloc(starts, sizeof *ns * cap_starts);
                if (!ns) {
                    oom = 1;
                    break;
                }
                starts = ns;
            }
            starts[n_chars++] = word.n;
            run_cjk = cjk;
            utf8proc_uint8_t enc[4];
            utf8proc_ssize_t m = utf8proc_encode_char(utf8proc_tolower(c), enc);
            if (m <= 0)
                m = utf8proc_encode_char(c, enc);
            lk_buf_put(&word, (const char *)enc, (size_t)m);
        }
        i += k;
    }
    oom = oom || word.oom || qt.q.oom || qt.seen.oom;
    lk_free(starts);
    lk_free(word.p);
    lk_free(qt.seen.p);
    if (oom) {
        lk_free(qt.q.p);
        return lk_errf(err, LK_ERR_NOMEM, "out of memory building a query");
    }
    *out = qt.q.p;
    return LK_OK;
}

// ---- building the index ----

static int sql_fail(sqlite3 *db, const char *path, const char *what, struct lk_err *err)
{
    int rc = db ? sqlite3_errcode(db) : SQLITE_ERROR;
    if (rc == SQLITE_NOTADB)
        return lk_errf(err, LK_ERR_FORMAT, "%s: not an SQLite database", path);
    if (rc == SQLITE_NOMEM)
        return lk_errf(err, LK_ERR_NOMEM, "%s: %s: out of memory", path, what);
    // the OS's reason (a read-only folder...); SQLite clears it for a full disk
    int se = (rc & 0xff) == SQLITE_FULL ? ENOSPC : db ? sqlite3_system_errno(db) : 0;
    return lk_errf(err, LK_ERR_IO, "%s: %s: %s%s%s%s", path, what, db ? sqlite3_errmsg(db) : "error",
                   se ? " (" : "", se ? strerror(se) : "", se ? ")" : "");
}

static int exec_sql(sqlite3 *db, const char *path, const char *sql, const char *what,
                    struct lk_err *err)
{
    if (sqlite3_exec(db, sql, NULL, NULL, NULL) != SQLITE_OK)
        return sql_fail(db, path, what, err);
    return LK_OK;
}

/* The string value of a required field, or an error naming file:line. */
static int json_field(const cJSON *o, const char *name, const char *file, long line,
                      const char **out, struct lk_err *err)
{
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, name);
    if (!v)
        return lk_errf(err, LK_ERR_FORMAT, "%s:%ld: missing field '%s'", file, line, name);
    if (!cJSON_IsString(v) || !v->valuestring)
        return lk_errf(err, LK_ERR_FORMAT, "%s:%ld: field '%s' is not a string", file, line, name);
    *out = v->valuestring;
    return LK_OK;
}

struct builder {
    sqlite3 *db;
    sqlite3_stmt *doc, *chunk, *find, *docfts;
    const char *docs_path, *tmp;
    const struct fts_settings *s;
    struct fts_build_stats st;
};

/* One JSONL line: parse, check, chunk, insert. */
static int build_line(struct builder *b, const char *buf, size_t n, long line, struct lk_err *err)
{
    cJSON *o = cJSON_ParseWithLength(buf, n);
    if (!o || !cJSON_IsObject(o)) {
        cJSON_Delete(o);
        return lk_errf(err, LK_ERR_FORMAT, "%s:%ld: not a JSON object (expected "
                       "{\"id\",\"title\",\"text\"})", b->docs_path, line);
    }
    const char *id = NULL, *title = NULL, *text = NULL;
    int r = json_field(o, "id", b->docs_path, line, &id, err);
    if (!r)
        r = json_field(o, "title", b->docs_path, line, &title, err);
    if (!r)
        r = json_field(o, "text", b->docs_path, line, &text, err);
    if (!r && !*id)
        r = lk_errf(err, LK_ERR_FORMAT, "%s:%ld: empty 'id'", b->docs_path, line);
    struct fts_chunk *ch = NULL;
    size_t nc = 0;
    if (!r)
        r = fts_chunk_text(text, b->s->chunk_tokens, b->s->overlap, &ch, &nc, err);
    // explicit rowids: document i is row i + 1 of docs and docfts, its chunks follow the
    // chunks of the documents before it
    sqlite3_int64 doc_row = b->st.n_docs + 1, first_chunk = b->st.n_chunks + 1;
    if (!r) {
        sqlite3_bind_text(b->doc, 1, id, -1, SQLITE_STATIC);
        sqlite3_bind_text(b->doc, 2, title, -1, SQLITE_STATIC);
        sqlite3_bind_int64(b->doc, 3, line);
        sqlite3_bind_int64(b->doc, 4, (sqlite3_int64)nc);
        sqlite3_bind_int64(b->doc, 5, first_chunk);
        sqlite3_bind_int64(b->doc, 6, doc_row);
        int rc = sqlite3_step(b->doc);
        sqlite3_reset(b->doc);
        if (rc == SQLITE_CONSTRAINT) {
            sqlite3_bind_text(b->find, 1, id, -1, SQLITE_STATIC);
            long first = sqlite3_step(b->find) == SQLITE_ROW ? (long)sqlite3_column_int64(b->find, 0) : 0;
            sqlite3_reset(b->find);
            r = lk_errf(err, LK_ERR_FORMAT, "%s:%ld: duplicate id '%s' (first on line %ld)",
                        b->docs_path, line, id, first);
        } else if (rc != SQLITE_DONE) {
            r = sql_fail(b->db, b->tmp, "writing the index", err);
        }
    }
    if (!r) {
        sqlite3_bind_int64(b->docfts, 1, doc_row);
        sqlite3_bind_text(b->docfts, 2, title, -1, SQLITE_STATIC);
        sqlite3_bind_text(b->docfts, 3, text, -1, SQLITE_STATIC);
        int rc = sqlite3_step(b->docfts);
        sqlite3_reset(b->docfts);
        if (rc != SQLITE_DONE)
            r = sql_fail(b->db, b->tmp, "writing the index", err);
    }
    for (size_t i = 0; !r && i < nc; i++) {
        sqlite3_bind_text(b->chunk, 1, id, -1, SQLITE_STATIC);
        sqlite3_bind_text(b->chunk, 2, title, -1, SQLITE_STATIC);
        sqlite3_bind_int64(b->chunk, 3, (sqlite3_int64)i);
        sqlite3_bind_text(b->chunk, 4, text + ch[i].off, (int)ch[i].len, SQLITE_STATIC);
        sqlite3_bind_int64(b->chunk, 5, first_chunk + (sqlite3_int64)i);
        int rc = sqlite3_step(b->chunk);
        sqlite3_reset(b->chunk);
        if (rc != SQLITE_DONE)
            r = sql_fail(b->db, b->tmp, "writing the index", err);
    }
    if (!r) {
        b->st.n_docs++;
        b->st.n_chunks += (int64_t)nc;
    }
    lk_free(ch);
    cJSON_Delete(o);
    return r;
}

static int put_meta(sqlite3 *db, const char *tmp, const char *key, const char *value,
                    struct lk_err *err)
{
    sqlite3_stmt *st;
    if (sqlite3_prepare_v2(db, "INSERT OR REPLACE INTO meta(key, value) VALUES(?1, ?2)", -1, &st,
                           NULL) != SQLITE_OK)
        return sql_fail(db, tmp, "writing meta", err);
    sqlite3_bind_text(st, 1, key, -1, SQLITE_STATIC);
    sqlite3_bind_text(st, 2, value, -1, SQLITE_STATIC);
    int rc = sqlite3_step(st);
    sqlite3_finalize(st);
    return rc == SQLITE_DONE ? LK_OK : sql_fail(db, tmp, "writing meta", err);
}

static int build_all(struct builder *b, FILE *f, struct lk_err *err)
{
    char sql[768];
    snprintf(sql, sizeof sql,
             "PRAGMA journal_mode = OFF; PRAGMA synchronous = OFF;"
             "CREATE TABLE meta(key TEXT PRIMARY KEY, value TEXT NOT NULL);"
             "CREATE TABLE docs(id TEXT PRIMARY KEY, title TEXT NOT NULL, line INTEGER NOT NULL,"
             " n_chunks INTEGER NOT NULL, first_chunk INTEGER NOT NULL);"
             "CREATE VIRTUAL TABLE docfts USING fts5(title, text, content = '', tokenize = '%s');"
             "CREATE VIRTUAL TABLE chunks USING fts5(doc_id UNINDEXED, title, chunk_no UNINDEXED,"
             " text, tokenize = '%s');"
             "BEGIN;",
             tokenize_arg(b->s->tokenizer), tokenize_arg(b->s->tokenizer));
    int r = exec_sql(b->db, b->tmp, sql, "creating the index", err);
    if (r)
        return r;
    if (sqlite3_prepare_v2(b->db, "INSERT INTO docs(id, title, line, n_chunks, first_chunk, rowid)"
                           " VALUES(?1, ?2, ?3, ?4, ?5, ?6)", -1, &b->doc, NULL) != SQLITE_OK ||
        sqlite3_prepare_v2(b->db, "INSERT INTO docfts(rowid, title, text) VALUES(?1, ?2, ?3)", -1,
                           &b->docfts, NULL) != SQLITE_OK ||
        sqlite3_prepare_v2(b->db, "INSERT INTO chunks(doc_id, title, chunk_no, text, rowid)"
                           " VALUES(?1, ?2, ?3, ?4, ?5)", -1, &b->chunk, NULL) != SQLITE_OK ||
        sqlite3_prepare_v2(b->db, "SELECT line FROM docs WHERE id = ?1", -1, &b->find,
                           NULL) != SQLITE_OK)
        return sql_fail(b->db, b->tmp, "preparing the index", err);

    char *buf = NULL;
    size_t cap = 0;
    long line = 0;
    ssize_t n;
    errno = 0;
    while (!r && (n = getline(&buf, &cap, f)) >= 0) {
        line++;
        size_t i = 0;
        while (i < (size_t)n && (buf[i] == ' ' || buf[i] == '\t' || buf[i] == '\r' || buf[i] == '\n'))
            i++;
        if (i == (size_t)n)
            continue; // blank line
        if (lk_interrupted) {
            r = lk_errf(err, LK_ERR_INTERRUPTED, "%s: interrupted at line %ld", b->docs_path, line);
            break;
        }
        r = build_line(b, buf, (size_t)n, line, err);
    }
    int bad = !r && ferror(f);
    free(buf); // getline's buffer comes from malloc
    if (bad)
        return lk_errf(err, LK_ERR_IO, "%s: read error after line %ld", b->docs_path, line);
    if (r)
        return r;
    if (b->st.n_docs == 0)
        return lk_errf(err, LK_ERR_FORMAT, "%s: no documents", b->docs_path);
    char v[64];
    r = put_meta(b->db, b->tmp, "format", FTS_FORMAT, err);
    snprintf(v, sizeof v, "%d", FTS_VERSION);
    r = r ? r : put_meta(b->db, b->tmp, "version", v, err);
    r = r ? r : put_meta(b->db, b->tmp, "tokenizer", fts_tokenizer_name(b->s->tokenizer), err);
    snprintf(v, sizeof v, "%d", b->s->chunk_tokens);
    r = r ? r : put_meta(b->db, b->tmp, "chunk_tokens", v, err);
    snprintf(v, sizeof v, "%d", b->s->overlap);
    r = r ? r : put_meta(b->db, b->tmp, "overlap", v, err);
    r = r ? r : put_meta(b->db, b->tmp, "source", b->docs_path, err);
    snprintf(v, sizeof v, "%lld", (long long)b->st.n_docs);
    r = r ? r : put_meta(b->db, b->tmp, "n_docs", v, err);
    snprintf(v, sizeof v, "%lld", (long long)b->st.n_chunks);
    r = r ? r : put_meta(b->db, b->tmp, "n_chunks", v, err);
    r = r ? r : exec_sql(b->db, b->tmp,
                         "INSERT INTO meta(key, value) VALUES('created_at',"
                         " strftime('%Y-%m-%dT%H:%M:%SZ', 'now'));"
                         "COMMIT;"
                         "INSERT INTO chunks(chunks) VALUES('optimize');"
                         "INSERT INTO docfts(docfts) VALUES('optimize');",
                         "finishing the index", err);
    return r;
}

int fts_index_build(const char *docs_path, const char *db_path, const struct fts_settings *s,
                    int overwrite, struct fts_build_stats *stats, struct lk_err *err)
{
    if (s->tokenizer < FTS_TOK_UNICODE61 || s->tokenizer > FTS_TOK_TRIGRAM)
        return lk_errf(err, LK_ERR_USAGE, "choose a tokenizer for the index");
    if (s->chunk_tokens <= 0 || s->overlap < 0 || s->overlap >= s->chunk_tokens)
        return lk_errf(err, LK_ERR_USAGE, "chunk size %d with overlap %d: need 0 <= overlap < "
                       "chunk size", s->chunk_tokens, s->overlap);
    if (lk_file_exists(db_path) && !overwrite)
        return lk_errf(err, LK_ERR_EXISTS, "%s: already exists (hint: --overwrite replaces it)",
                       db_path);
    FILE *f = fopen(docs_path, "r");
    if (!f)
        return lk_errf(err, errno == ENOENT ? LK_ERR_MISSING : LK_ERR_IO, "%s: cannot open: %s",
                       docs_path, strerror(errno));
    size_t tl = strlen(db_path) + 32;
    char *tmp = lk_malloc(tl);
    if (!tmp) {
        fclose(f);
        return lk_errf(err, LK_ERR_NOMEM, "out of memory");
    }
    snprintf(tmp, tl, "%s.tmp.%ld", db_path, (long)getpid());
    unlink(tmp); // a stale one from a crashed run with our pid
    int tfd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC, 0644); // SQLite would hide why it cannot
    if (tfd < 0 || close(tfd) != 0) {
        int e = errno;
        fclose(f);
        int r0 = lk_errf(err, LK_ERR_IO, "%s: cannot create: %s", tmp, strerror(e));
        lk_free(tmp);
        return r0;
    }

    struct builder b = { .docs_path = docs_path, .tmp = tmp, .s = s };
    int r = LK_OK;
    if (sqlite3_open_v2(tmp, &b.db, SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE, NULL) != SQLITE_OK)
        r = sql_fail(b.db, tmp, "creating", err);
    else
        r = build_all(&b, f, err);
    fclose(f);
    sqlite3_finalize(b.doc);
    sqlite3_finalize(b.chunk);
    sqlite3_finalize(b.find);
    sqlite3_finalize(b.docfts);
    if (b.db && sqlite3_close(b.db) != SQLITE_OK && !r)
        r = lk_errf(err, LK_ERR_IO, "%s: cannot close", tmp);
    if (!r) { // durable before it gets its name
        int fd = open(tmp, O_RDONLY);
        if (fd < 0 || fsync(fd) != 0)
            r = lk_errf(err, LK_ERR_IO, "%s: fsync failed: %s", tmp, strerror(errno));
        if (fd >= 0)
            close(fd);
    }
    if (!r && rename(tmp, db_path) != 0)
        r = lk_errf(err, LK_ERR_IO, "%s: cannot rename to '%s': %s", tmp, db_path, strerror(errno));
    if (r) {
        unlink(tmp);
    } else {
        char *dir = lk_strdup(db_path);
        if (dir) {
            char *slash = strrchr(dir, '/');
            if (slash)
                *slash = 0;
            lk_fsync_dir(slash ? (dir[0] ? dir : "/") : ".");
            lk_free(dir);
        }
        if (stats)
            *stats = b.st;
    }
    lk_free(tmp);
    return r;
}

// ---- opening and searching ----

void fts_close(struct fts_index *idx)
{
    if (!idx)
        return;
    sqlite3_finalize(idx->st);
    sqlite3_finalize(idx->st_hit);
    sqlite3_finalize(idx->st_docs);
    sqlite3_finalize(idx->st_doc);
    sqlite3_finalize(idx->st_best);
    if (idx->db)
        sqlite3_close(idx->db);
    lk_free(idx->path);
    lk_free(idx->source);
    lk_free(idx->created_at);
    memset(idx, 0, sizeof *idx);
}

/* Reads meta into idx; every key must be present and sane. */
static int read_meta(struct fts_index *idx, struct lk_err *err)
{
    sqlite3_stmt *st;
    int rc = sqlite3_prepare_v2(idx->db, "SELECT key, value FROM meta", -1, &st, NULL);
    if (rc != SQLITE_OK) {
        if (sqlite3_errcode(idx->db) == SQLITE_NOTADB)
            return sql_fail(idx->db, idx->path, "", err);
        return lk_errf(err, LK_ERR_FORMAT, "%s: not a lorakit search index (no meta table; "
                       "hint: build one with `lorakit index`)", idx->path);
    }
    int have_format = 0, version = -1;
    idx->settings.tokenizer = FTS_TOK_ANY;
    idx->settings.chunk_tokens = 0;
    idx->settings.overlap = -1;
    int r = LK_OK;
    while (!r && (rc = sqlite3_step(st)) == SQLITE_ROW) {
        const char *k = (const char *)sqlite3_column_text(st, 0);
        const char *v = (const char *)sqlite3_column_text(st, 1);
        if (!k || !v)
            continue;
        if (!strcmp(k, "format"))
            have_format = !strcmp(v, FTS_FORMAT);
        else if (!strcmp(k, "version"))
            version = atoi(v);
        else if (!strcmp(k, "tokenizer"))
            r = fts_tokenizer_parse(v, &idx->settings.tokenizer, err);
        else if (!strcmp(k, "chunk_tokens"))
            idx->settings.chunk_tokens = atoi(v);
        else if (!strcmp(k, "overlap"))
            idx->settings.overlap = atoi(v);
        else if (!strcmp(k, "n_docs"))
            idx->n_docs = atoll(v);
        else if (!strcmp(k, "n_chunks"))
            idx->n_chunks = atoll(v);
        else if (!strcmp(k, "source") && !(idx->source = lk_strdup(v)))
            r = lk_errf(err, LK_ERR_NOMEM, "out of memory");
        else if (!strcmp(k, "created_at") && !(idx->created_at = lk_strdup(v)))
            r = lk_errf(err, LK_ERR_NOMEM, "out of memory");
    }
    if (!r && rc != SQLITE_DONE)
        r = sql_fail(idx->db, idx->path, "reading meta", err);
    sqlite3_finalize(st);
    if (r)
        return r;
    if (!have_format)
        return lk_errf(err, LK_ERR_FORMAT, "%s: not a lorakit search index (format is not '%s')",
                       idx->path, FTS_FORMAT);
    if (version > FTS_VERSION)
        return lk_errf(err, LK_ERR_UNSUPPORTED, "%s: index version %d is newer than this lorakit "
                       "supports (%d)", idx->path, version, FTS_VERSION);
    if (version < 1 || idx->settings.tokenizer == FTS_TOK_ANY || idx->settings.chunk_tokens <= 0 ||
        idx->settings.overlap < 0)
        return lk_errf(err, LK_ERR_FORMAT, "%s: index meta table is incomplete", idx->path);
    if (version < FTS_VERSION)
        return lk_errf(err, LK_ERR_UNSUPPORTED, "%s: index version %d predates document ranking "
                       "(version %d) (hint: rebuild it with `lorakit index --overwrite`)", idx->path,
                       version, FTS_VERSION);
    return LK_OK;
}

int fts_open(struct fts_index *idx, const char *path, struct lk_err *err)
{
    memset(idx, 0, sizeof *idx);
    if (!lk_file_exists(path))
        return lk_errf(err, LK_ERR_MISSING, "%s: no such index (hint: build one with "
                       "`lorakit index`)", path);
    idx->path = lk_strdup(path);
    if (!idx->path)
        return lk_errf(err, LK_ERR_NOMEM, "out of memory");
    int r;
    if (sqlite3_open_v2(path, &idx->db, SQLITE_OPEN_READONLY, NULL) != SQLITE_OK) {
        r = sql_fail(idx->db, path, "opening", err);
        goto fail;
    }
    // The index never changes in place (a rebuild renames a new file over it), so the reader
    // keeps its shared lock instead of taking and dropping it for every statement.
    sqlite3_exec(idx->db, "PRAGMA locking_mode = EXCLUSIVE", NULL, NULL, NULL);
    if ((r = read_meta(idx, err)))
        goto fail;
    // Ranking selects only rowid and score: SQLite computes every selected column for every
    // matching row before sorting, and snippet() on thousands of rows would dominate. The
    // k winners then get their columns and snippet one by one (MATCH + rowid is a lookup).
    char sql[512];
    snprintf(sql, sizeof sql,
             "SELECT rowid, bm25(chunks, 0.0, %.3f, 0.0, 1.0) AS score, doc_id, chunk_no"
             " FROM chunks WHERE chunks MATCH ?1 ORDER BY score LIMIT ?2",
             FTS_TITLE_WEIGHT);
    if (sqlite3_prepare_v2(idx->db, sql, -1, &idx->st, NULL) != SQLITE_OK ||
        sqlite3_prepare_v2(idx->db,
                           "SELECT title, text, snippet(chunks, 3, '[', ']', '...', 16)"
                           " FROM chunks WHERE chunks MATCH ?1 AND rowid = ?2",
                           -1, &idx->st_hit, NULL) != SQLITE_OK ||
        sqlite3_prepare_v2(idx->db,
                           "SELECT rowid, bm25(docfts, ?3, 1.0) AS score FROM docfts"
                           " WHERE docfts MATCH ?1 ORDER BY score LIMIT ?2",
                           -1, &idx->st_docs, NULL) != SQLITE_OK ||
        sqlite3_prepare_v2(idx->db, "SELECT id, first_chunk, n_chunks FROM docs WHERE rowid = ?1", -1,
                           &idx->st_doc, NULL) != SQLITE_OK ||
        sqlite3_prepare_v2(idx->db,
                           "SELECT rowid, bm25(chunks, 0.0, ?4, 0.0, 1.0) AS score, chunk_no FROM chunks"
                           " WHERE chunks MATCH ?1 AND rowid BETWEEN ?2 AND ?3 ORDER BY score LIMIT 1",
                           -1, &idx->st_best, NULL) != SQLITE_OK) {
        r = sql_fail(idx->db, path, "preparing the search", err);
        goto fail;
    }
    return LK_OK;
fail:
    fts_close(idx);
    return r;
}

int fts_index_check(const struct fts_index *idx, const struct fts_settings *want,
                    struct lk_err *err)
{
    const struct fts_settings *h = &idx->settings;
    if ((want->tokenizer != FTS_TOK_ANY && want->tokenizer != h->tokenizer) ||
        (want->chunk_tokens > 0 && want->chunk_tokens != h->chunk_tokens) ||
        (want->overlap >= 0 && want->overlap != h->overlap))
        return lk_errf(err, LK_ERR_USAGE,
                       "%s: index was built with tokenizer %s, %d-token chunks, overlap %d; "
                       "asked for tokenizer %s, chunks %d, overlap %d (hint: rebuild with "
                       "`lorakit index --overwrite`)",
                       idx->path, fts_tokenizer_name(h->tokenizer), h->chunk_tokens, h->overlap,
                       fts_tokenizer_name(want->tokenizer), want->chunk_tokens, want->overlap);
    return LK_OK;
}

static void fts_hits_free_items(struct fts_hit *hits, int n)
{
    for (int i = 0; i < n; i++) {
        lk_free(hits[i].doc_id);
        lk_free(hits[i].title);
        lk_free(hits[i].text);
        lk_free(hits[i].snippet);
    }
}

void fts_hits_free(struct fts_hit *hits, int n)
{
    if (!hits)
        return;
    fts_hits_free_items(hits, n);
    lk_free(hits);
}

static char *col_dup(sqlite3_stmt *st, int i, int *oom)
{
    const unsigned char *t = sqlite3_column_text(st, i);
    char *s = lk_strdup(t ? (const char *)t : "");
    if (!s)
        *oom = 1;
    return s;
}

const char *const fts_rank_names[3] = { "lorakit", "plain-bm25", "chunks" };

/* A search in progress: the query, the hits so far, a sticky out-of-memory flag. */
struct search {
    struct fts_index *idx;
    const char *q;
    struct fts_hit *hits;
    int cnt, oom, full;
};

/* Reads the winner's title, text and snippet (MATCH + rowid is a lookup). */
static int hit_columns(struct search *s, struct fts_hit *h, sqlite3_int64 chunk_row)
{
    sqlite3_stmt *sh = s->idx->st_hit;
    sqlite3_bind_text(sh, 1, s->q, -1, SQLITE_STATIC);
    sqlite3_bind_int64(sh, 2, chunk_row);
    int rc = sqlite3_step(sh);
    if (rc == SQLITE_ROW) {
        h->title = col_dup(sh, 0, &s->oom);
        h->text = col_dup(sh, 1, &s->oom);
        h->snippet = col_dup(sh, 2, &s->oom);
        rc = SQLITE_DONE;
    } else if (rc == SQLITE_DONE) { // the chunk does not match (plain ranking's first chunk)
        h->title = lk_strdup("");
        h->text = lk_strdup("");
        h->snippet = lk_strdup("");
        s->oom |= !h->title || !h->text || !h->snippet;
    }
    sqlite3_reset(sh);
    sqlite3_clear_bindings(sh);
    return rc;
}

/* Version 1's ranking: the k best chunks. */
static int rank_chunks(struct search *s, int k)
{
    sqlite3_stmt *st = s->idx->st;
    sqlite3_bind_text(st, 1, s->q, -1, SQLITE_STATIC);
    sqlite3_bind_int(st, 2, k);
    int rc = SQLITE_DONE;
    while (s->cnt < k && !s->oom && (rc = sqlite3_step(st)) == SQLITE_ROW) {
        struct fts_hit *h = &s->hits[s->cnt++];
        h->score = -sqlite3_column_double(st, 1);
        h->doc_id = col_dup(st, 2, &s->oom);
        h->chunk_no = sqlite3_column_int64(st, 3);
        if (s->full && (rc = hit_columns(s, h, sqlite3_column_int64(st, 0))) != SQLITE_DONE)
            break;
    }
    if (rc == SQLITE_ROW || s->oom)
        rc = SQLITE_DONE; // stopped at k (or out of memory, reported by the caller)
    sqlite3_reset(st);
    sqlite3_clear_bindings(st);
    return rc;
}

/* Best score first; equal scores keep the document ranking's order (doc_rank). */
static int cmp_hit_score(const void *a, const void *b)
{
    const struct fts_hit *x = a, *y = b;
    if (x->score != y->score)
        return x->score < y->score ? 1 : -1;
    return (x->doc_rank > y->doc_rank) - (x->doc_rank < y->doc_rank);
}

/* Document ranking: the k best documents by BM25 over whole documents. best = 0: each hit is
 * the document's first chunk, scored by the document. best = 1: each hit is the document's
 * best chunk (BM25 over that document's chunks), scored by that chunk, for re-ranking. */
static int rank_docs(struct search *s, int k, double title_weight, int best)
{
    struct fts_index *idx = s->idx;
    sqlite3_stmt *st = idx->st_docs, *sd = idx->st_doc, *sb = idx->st_best;
    sqlite3_bind_text(st, 1, s->q, -1, SQLITE_STATIC);
    sqlite3_bind_int(st, 2, k);
    sqlite3_bind_double(st, 3, title_weight);
    int rc = SQLITE_DONE;
    while (s->cnt < k && !s->oom && (rc = sqlite3_step(st)) == SQLITE_ROW) {
        struct fts_hit *h = &s->hits[s->cnt++];
        h->score = -sqlite3_column_double(st, 1);
        sqlite3_bind_int64(sd, 1, sqlite3_column_int64(st, 0));
        if ((rc = sqlite3_step(sd)) != SQLITE_ROW) {
            rc = rc == SQLITE_DONE ? SQLITE_CORRUPT : rc; // a docfts row without its docs row
            sqlite3_reset(sd);
            break;
        }
        h->doc_id = col_dup(sd, 0, &s->oom);
        sqlite3_int64 first = sqlite3_column_int64(sd, 1), nc = sqlite3_column_int64(sd, 2);
        sqlite3_int64 row = first;
        h->chunk_no = 0;
        sqlite3_reset(sd);
        h->doc_rank = s->cnt;
        if (best) { // one chunk needs the lookup too: its score replaces the document's
            sqlite3_bind_text(sb, 1, s->q, -1, SQLITE_STATIC);
            sqlite3_bind_int64(sb, 2, first);
            sqlite3_bind_int64(sb, 3, first + nc - 1);
            sqlite3_bind_double(sb, 4, title_weight);
            if ((rc = sqlite3_step(sb)) == SQLITE_ROW) {
                row = sqlite3_column_int64(sb, 0);
                h->score = -sqlite3_column_double(sb, 1);
                h->chunk_no = sqlite3_column_int64(sb, 2);
            }
            sqlite3_reset(sb);
            if (rc != SQLITE_ROW && rc != SQLITE_DONE)
                break;
        }
        if (s->full && (rc = hit_columns(s, h, row)) != SQLITE_DONE)
            break;
    }
    if (rc == SQLITE_ROW || s->oom)
        rc = SQLITE_DONE; // stopped at k (or out of memory, reported by the caller)
    sqlite3_reset(st);
    sqlite3_clear_bindings(st);
    sqlite3_clear_bindings(sb);
    return rc;
}

int fts_search_ranked(struct fts_index *idx, const char *query_text, int k, enum fts_rank rank,
                      int full, struct fts_hit **out, int *n, struct lk_err *err)
{
    *out = NULL;
    *n = 0;
    if (k <= 0)
        return LK_OK;
    char *q;
    unsigned flags = rank == FTS_RANK_PLAIN ? 0 : FTS_QUERY_STOPWORDS;
    int r = fts_query_build_flags(query_text, idx->settings.tokenizer, flags, &q, err);
    if (r)
        return r;
    if (!q[0]) {
        lk_free(q);
        return LK_OK;
    }
    // lorakit's ranking re-orders at least FTS_RERANK_MIN candidate documents by their best
    // chunk, so its first results do not depend on k
    int cap = rank == FTS_RANK_DOCS && k < FTS_RERANK_MIN ? FTS_RERANK_MIN : k;
    struct search s = { idx, q, lk_calloc((size_t)cap, sizeof *s.hits), 0, 0, full };
    if (!s.hits) {
        lk_free(q);
        return lk_errf(err, LK_ERR_NOMEM, "out of memory");
    }
    int rc = rank == FTS_RANK_CHUNKS ? rank_chunks(&s, k)
             : rank == FTS_RANK_PLAIN ? rank_docs(&s, k, 1.0, 0)
                                      : rank_docs(&s, cap, FTS_TITLE_WEIGHT, 1);
    if (rank == FTS_RANK_DOCS && rc == SQLITE_DONE && !s.oom) {
        qsort(s.hits, (size_t)s.cnt, sizeof *s.hits, cmp_hit_score);
        if (s.cnt > k) { // the candidates beyond k
            fts_hits_free_items(s.hits + k, s.cnt - k);
            s.cnt = k;
        }
    }
    if (s.oom)
        r = lk_errf(err, LK_ERR_NOMEM, "out of memory");
    else if (rc != SQLITE_DONE)
        r = lk_errf(err, LK_ERR_IO, "%s: search failed: %s (query %s)", idx->path,
                    rc == SQLITE_CORRUPT ? "document table out of step with the index"
                                         : sqlite3_errmsg(idx->db), q);
    lk_free(q);
    if (r || s.cnt == 0) {
        fts_hits_free(s.hits, s.cnt);
        return r;
    }
    *out = s.hits;
    *n = s.cnt;
    return LK_OK;
}

int fts_search(struct fts_index *idx, const char *query_text, int k, struct fts_hit **out,
               int *n, struct lk_err *err)
{
    return fts_search_ranked(idx, query_text, k, FTS_RANK_DOCS, 1, out, n, err);
}

int fts_search_ids(struct fts_index *idx, const char *query_text, int k, struct fts_hit **out,
                   int *n, struct lk_err *err)
{
    return fts_search_ranked(idx, query_text, k, FTS_RANK_DOCS, 0, out, n, err);
}

// ---- recall ----

const int fts_recall_ks[3] = { 1, 5, 20 };

int fts_recall_measure(struct fts_index *idx, const char *const *questions,
                       const char *const *doc_ids, int64_t n, enum fts_rank rank,
                       struct fts_recall *out, struct lk_err *err)
{
    memset(out, 0, sizeof *out);
    int64_t found[3] = { 0 };
    double rr = 0;
    for (int64_t i = 0; i < n; i++) {
        if (lk_interrupted)
            return lk_errf(err, LK_ERR_INTERRUPTED, "interrupted after %lld of %lld questions",
                           (long long)i, (long long)n);
        // k = 5 (timed) gives recall@1 and @5, k = 20 recall@20 and the reciprocal rank: what
        // a caller asking for that k gets (lorakit's re-ranking makes the order depend on k)
        for (int pass = 0; pass < 2; pass++) {
            struct fts_hit *hits;
            int nh, k = pass ? FTS_RECALL_KMAX : 5;
            double t0 = lk_now();
            int r = fts_search_ranked(idx, questions[i], k, rank, 0, &hits, &nh, err);
            if (!pass)
                out->seconds += lk_now() - t0;
            if (r)
                return r;
            int at = 0; // rank of the first hit of the document, 1-based
            for (int j = 0; j < nh && !at; j++)
                if (!strcmp(hits[j].doc_id, doc_ids[i]))
                    at = j + 1;
            if (!pass) {
                found[0] += at == 1;
                found[1] += at >= 1;
                out->n_no_results += nh == 0;
            } else {
                found[2] += at >= 1;
                rr += at ? 1.0 / at : 0.0;
            }
            fts_hits_free(hits, nh);
        }
    }
    out->n_questions = n;
    for (int j = 0; j < 3 && n; j++)
        out->recall[j] = (double)found[j] / (double)n;
    out->mrr = n ? rr / (double)n : 0;
    return LK_OK;
}

