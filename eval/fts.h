/*
 * fts.h - retrieval for eval and `lorakit index`/`lorakit search`: documents split into
 * overlapping chunks, indexed in an SQLite FTS5 table, searched with BM25.
 *
 * Index file (an SQLite database, built in a temporary file and renamed when complete):
 *   meta(key TEXT PRIMARY KEY, value TEXT)   -- format 'lorakit-fts', version, tokenizer,
 *                                            -- chunk_tokens, overlap, source, n_docs,
 *                                            -- n_chunks, created_at (ISO-8601 UTC)
 *   docs(id TEXT PRIMARY KEY, title, line, n_chunks, first_chunk) -- one row per document;
 *                                            -- its chunks are the rows first_chunk ..
 *                                            -- first_chunk + n_chunks - 1 of chunks
 *   docfts USING fts5(title, text, content='', tokenize=...) -- whole documents, rowid =
 *                                            -- docs.rowid (contentless: ranking only)
 *   chunks USING fts5(doc_id UNINDEXED, title, chunk_no UNINDEXED, text, tokenize=...)
 * Version 1 had no docfts and no first_chunk: it is refused with a hint to rebuild.
 *
 * Chunking: a "token" is a run of non-whitespace characters, except that every CJK ideograph,
 * kana or bopomofo character is a token on its own (Chinese and Japanese have no spaces); the
 * classes are eval/text.h's, the ones answer scoring (metrics.h) uses.
 * A chunk is the original text from its first to its last token (inner whitespace and line
 * breaks kept): chunks of N tokens start every N - M tokens, the last one ends at the text's
 * end, so consecutive chunks share M tokens. A text of at most N tokens is one chunk; an
 * empty text is one empty chunk (the title is still searchable).
 *
 * Tokenizers: unicode61 (remove_diacritics 2; words, case-folded), porter (the same plus
 * English stemming), trigram (substrings of 3 characters, case-insensitive: the one that makes
 * Chinese searchable; unicode61 keeps a run of ideographs as one token, so it does not
 * segment Chinese).
 *
 * Ranking (fts_search), retrieve then re-rank: the best max(k, FTS_RERANK_MIN) DOCUMENTS by
 * bm25() over whole documents (docfts), with weight FTS_TITLE_WEIGHT on the title and 1 on
 * the text; each is represented by its best chunk (bm25 over that document's chunks, same
 * weights); the candidates are ordered by that chunk's score and the first k returned. So k
 * results are k distinct documents, found by all of their words (not only those that fall
 * in one chunk), and the first result is the best passage among them. English stop words are
 * dropped from the query (FTS_QUERY_STOPWORDS) for unicode61 and porter: they match almost
 * every row, cost most of the time, and barely change the ranking. A hit's score is -bm25 of
 * its chunk (higher is better). fts_search_ranked also offers, for
 * comparison, plain BM25 (whole documents, every query word, title weight 1) and the ranking
 * of version 1 (the top k chunks, which may repeat a document).
 *
 * Queries: see fts_query_build. No text, in any language, with any characters, can make the
 * MATCH fail or inject FTS5 syntax.
 */
#ifndef LK_FTS_H
#define LK_FTS_H

#include <stddef.h>
#include <stdint.h>

#include "../libcore/lk.h"

#define FTS_FORMAT "lorakit-fts"
#define FTS_VERSION 2
#define FTS_TITLE_WEIGHT 5.0  /* measured on MedQuAD dev: README, "Retrieval recall" */
#define FTS_RERANK_MIN 5      /* candidate documents re-ranked by their best chunk */
#define FTS_QUERY_MAX_TERMS 64   /* distinct terms kept from a query, in order */
#define FTS_TERM_MAX_CHARS 100   /* longer "words" are not words: dropped */

enum fts_tokenizer { FTS_TOK_ANY = -1, FTS_TOK_UNICODE61 = 0, FTS_TOK_PORTER, FTS_TOK_TRIGRAM };

/* "unicode61", "porter", "trigram" ("any" for FTS_TOK_ANY). */
const char *fts_tokenizer_name(enum fts_tokenizer t);
/* Parses a name as above; LK_ERR_USAGE naming the choices otherwise. */
int fts_tokenizer_parse(const char *name, enum fts_tokenizer *out, struct lk_err *err);

struct fts_settings {
    enum fts_tokenizer tokenizer;
    int chunk_tokens; /* N > 0 (default 200); 0 in a check means "any" */
    int overlap;      /* 0 <= M < N (default 40); -1 in a check means "any" */
};

// ---- chunking ----

struct fts_chunk {
    size_t off, len; /* byte span of the chunk in the text */
    size_t n_tokens;
};
/* Splits text into chunks as described above. *out is an lk_malloc'ed array of *n chunks
 * (caller lk_frees); *n >= 1. LK_ERR_USAGE for bad N/M. */
int fts_chunk_text(const char *text, int chunk_tokens, int overlap, struct fts_chunk **out,
                   size_t *n, struct lk_err *err);

// ---- building ----

struct fts_build_stats {
    int64_t n_docs, n_chunks;
};
/* Reads docs_path (JSONL, one {"id","title","text"} object per line; blank lines skipped;
 * other fields ignored) and writes the index to db_path: into "<db_path>.tmp.<pid>" first,
 * renamed when complete, so there is never a partial index under db_path. A broken line, a
 * missing or non-string field, an empty or duplicate id is an error naming file:line, and
 * leaves no file behind. db_path existing is LK_ERR_EXISTS unless overwrite. Checks
 * lk_interrupted between documents. stats may be NULL. */
int fts_index_build(const char *docs_path, const char *db_path, const struct fts_settings *s,
                    int overwrite, struct fts_build_stats *stats, struct lk_err *err);

// ---- searching ----

struct sqlite3;
struct sqlite3_stmt;

struct fts_index {
    struct sqlite3 *db;           /* owned, read-only connection */
    struct sqlite3_stmt *st;      /* owned: ranking (rowid, bm25) of the matching chunks */
    struct sqlite3_stmt *st_hit;  /* owned: one chunk's columns and snippet, by rowid */
    struct sqlite3_stmt *st_docs; /* owned: ranking of the matching documents, ?3 = title weight */
    struct sqlite3_stmt *st_doc;  /* owned: one document's id, first chunk and chunk count */
    struct sqlite3_stmt *st_best; /* owned: the best chunk in a range of chunk rowids */
    char *path;                   /* owned */
    struct fts_settings settings; /* from meta */
    char *source;                 /* owned: the docs file it was built from */
    char *created_at;             /* owned */
    int64_t n_docs, n_chunks;
};
/* Opens an index made by fts_index_build; a missing file, a file that is not an SQLite
 * database, or a database without a lorakit-fts meta table is a clear error. */
int fts_open(struct fts_index *idx, const char *path, struct lk_err *err);
/* NULL-safe, harmless twice. */
void fts_close(struct fts_index *idx);
/* LK_ERR_USAGE when the index was built with other settings than want (FTS_TOK_ANY,
 * chunk_tokens 0 and overlap -1 match anything), naming both. */
int fts_index_check(const struct fts_index *idx, const struct fts_settings *want,
                    struct lk_err *err);

/* Turns free text into a safe FTS5 query: the text is split into terms at every character
 * that is not a letter, number or combining mark (so operators' punctuation, quotes, column
 * filters' colons, ^, *, parentheses, + and - all disappear), each term is lower-cased and
 * written as an FTS5 string ("..." with any " doubled, so AND/OR/NOT/NEAR are plain words),
 * duplicates are dropped, at most FTS_QUERY_MAX_TERMS terms are kept, and terms are joined
 * with OR so that partial matches still rank. With trigram: runs of CJK characters become
 * their overlapping 3-character windows, and terms shorter than 3 characters are dropped
 * (trigram cannot match them). Invalid UTF-8 bytes are separators. *out is a fresh
 * lk_malloc'ed string, "" when no term is usable. */
int fts_query_build(const char *text, enum fts_tokenizer tok, char **out, struct lk_err *err);
/* The same with flags: FTS_QUERY_STOPWORDS drops English stop words (fts_is_stopword) under
 * unicode61 and porter, unless every term is one (then they are all kept, so "The Who" still
 * searches). */
enum { FTS_QUERY_STOPWORDS = 1 };
int fts_query_build_flags(const char *text, enum fts_tokenizer tok, unsigned flags, char **out,
                          struct lk_err *err);
/* 1 when the lower-case word (n bytes) is one of the English function words dropped from
 * queries: articles, pronouns, auxiliaries, prepositions, question words. */
int fts_is_stopword(const char *w, size_t n);

struct fts_hit {
    char *doc_id, *title; /* owned (title NULL from fts_search_ids) */
    char *text;           /* owned: the whole chunk */
    char *snippet;        /* owned: a short excerpt with matches in [brackets] */
    int64_t chunk_no;
    double score;         /* -bm25: higher is better */
    int doc_rank;         /* 0-based rank of the document before re-ranking (lorakit) */
};
/* The k best documents for free text query_text, each as its best chunk (see Ranking above;
 * the query goes through fts_query_build_flags with the index's tokenizer and
 * FTS_QUERY_STOPWORDS). A query without usable terms gives *n = 0, not an error. *out is an
 * array of *n hits (NULL when 0); free with fts_hits_free. */
int fts_search(struct fts_index *idx, const char *query_text, int k, struct fts_hit **out,
               int *n, struct lk_err *err);
/* The same ranking, filling only doc_id, chunk_no and score (title, text, snippet NULL):
 * for recall measurements, where the per-hit lookups would double the time. */
int fts_search_ids(struct fts_index *idx, const char *query_text, int k, struct fts_hit **out,
                   int *n, struct lk_err *err);

enum fts_rank {
    FTS_RANK_DOCS = 0, /* fts_search's ranking */
    FTS_RANK_PLAIN,    /* plain BM25 over whole documents: every query word, title weight 1;
                        * each hit is the document's first chunk */
    FTS_RANK_CHUNKS,   /* version 1: the k best chunks (a document may come several times) */
};
extern const char *const fts_rank_names[3]; /* "lorakit", "plain-bm25", "chunks" */
/* Any of the rankings above; full as for fts_search (else as fts_search_ids). */
int fts_search_ranked(struct fts_index *idx, const char *query_text, int k, enum fts_rank rank,
                      int full, struct fts_hit **out, int *n, struct lk_err *err);
void fts_hits_free(struct fts_hit *hits, int n);

// ---- recall ----

#define FTS_RECALL_KMAX 20
struct fts_recall {
    int64_t n_questions, n_no_results;
    double recall[3];  /* the share whose document is among the top 1, 5, 20 results */
    double mrr;        /* mean reciprocal rank within the top 20 (0 when absent) */
    double seconds;    /* in fts_search_ranked alone (k 5, ids only), for all questions */
};
extern const int fts_recall_ks[3]; /* 1, 5, 20 */
/* Searches each of the n questions with the ranking and finds doc_ids[i] among the results.
 * Checks lk_interrupted between questions. */
int fts_recall_measure(struct fts_index *idx, const char *const *questions,
                       const char *const *doc_ids, int64_t n, enum fts_rank rank,
                       struct fts_recall *out, struct lk_err *err);

#endif
