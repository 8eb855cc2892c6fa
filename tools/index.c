/*
 * index.c - `lorakit index`: build an FTS5 retrieval index from a JSONL file of documents.
 * The work is fts_index_build (eval/fts.c); this file parses flags and prints the summary.
 */
#include <stdio.h>

#include "../eval/fts.h"
#include "commands.h"
#include "opts.h"

int cmd_index(int argc, char **argv)
{
    const char *docs = NULL, *db = NULL, *tokenizer = "porter";
    long chunk = 200, overlap = 40;
    int overwrite = 0, help = 0;
    const struct opt opts[] = {
        { "docs", OPT_STR, &docs, "FILE.jsonl", "documents, one {\"id\",\"title\",\"text\"} per line" },
        { "db", OPT_STR, &db, "FILE", "index to write (built in a temp file, then renamed)" },
        { "chunk-tokens", OPT_INT, &chunk, "N", "tokens per chunk (default 200)" },
        { "overlap", OPT_INT, &overlap, "M", "tokens shared by consecutive chunks (default 40)" },
        { "fts-tokenizer", OPT_STR, &tokenizer, "NAME",
          "unicode61, porter (default; English stemming) or trigram (for Chinese)" },
        { "overwrite", OPT_FLAG, &overwrite, NULL, "replace an existing index" },
        { 0 },
    };
    const struct cmd_help h = {
        "index", "--docs FILE.jsonl --db FILE [options]",
        "Splits every document's text into chunks of about N tokens, consecutive chunks sharing\n"
        "M tokens, and indexes them in an SQLite FTS5 table (doc_id, title, chunk_no, text) for\n"
        "`lorakit search` and `lorakit eval`. A token is a whitespace-delimited word, or a single\n"
        "CJK/ideographic character, so Chinese text chunks sensibly. The tokenizer decides what\n"
        "matches: unicode61 (words), porter (words, English stems), trigram (any 3-character\n"
        "substring; needed for Chinese, which unicode61 does not segment). The settings are\n"
        "stored in the index. A broken line is an error naming file:line and leaves no index.",
        "  lorakit index --docs data/medquad/docs.jsonl --db medquad.fts\n"
        "  lorakit index --docs zh.jsonl --db zh.fts --fts-tokenizer trigram --chunk-tokens 300",
    };
    struct lk_err err = { 0 };
    if (opts_parse(argc, argv, opts, NULL, 0, NULL, &help, &err))
        return lk_cli_fail("index", &err);
    if (help) {
        opts_usage(stdout, &h, opts);
        return 0;
    }
    struct fts_settings s = { 0 };
    if (!docs || !db)
        lk_errf(&err, LK_ERR_USAGE, "--docs and --db are required (see --help)");
    else if (chunk <= 0 || chunk > 100000 || overlap < 0 || overlap >= chunk)
        lk_errf(&err, LK_ERR_USAGE, "need 0 <= --overlap < --chunk-tokens <= 100000 (got %ld, %ld)",
                overlap, chunk);
    else
        fts_tokenizer_parse(tokenizer, &s.tokenizer, &err);
    if (err.code)
        return lk_cli_fail("index", &err);
    s.chunk_tokens = (int)chunk;
    s.overlap = (int)overlap;
    lk_interrupt_install();
    struct fts_build_stats st;
    double t0 = lk_now();
    if (fts_index_build(docs, db, &s, overwrite, &st, &err))
        return lk_cli_fail("index", &err);
    printf("indexed %lld documents as %lld chunks into %s (tokenizer %s, %d-token chunks, "
           "overlap %d) in %.1f s\n", (long long)st.n_docs, (long long)st.n_chunks, db,
           fts_tokenizer_name(s.tokenizer), s.chunk_tokens, s.overlap, lk_now() - t0);
    return 0;
}
