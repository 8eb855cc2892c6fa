/* fuzz_fts.c - the FTS5 query builder (fts_query_build): the first byte picks the tokenizer,
 * the rest is the user's text. The built query must be accepted by SQLite: it is run with
 * MATCH against an in-memory FTS5 table of the same tokenizer; any error is a finding. */
#include "fuzz_util.h"

#include <sqlite3.h>

#include "../../eval/fts.h"

static sqlite3 *db;
static sqlite3_stmt *st[3];

static void setup(void)
{
    if (db)
        return;
    if (sqlite3_open(":memory:", &db) != SQLITE_OK)
        abort();
    static const char *const sql =
        "CREATE VIRTUAL TABLE t0 USING fts5(title, text, tokenize='unicode61 remove_diacritics 2');"
        "CREATE VIRTUAL TABLE t1 USING fts5(title, text, tokenize='porter unicode61 remove_diacritics 2');"
        "CREATE VIRTUAL TABLE t2 USING fts5(title, text, tokenize='trigram');"
        "INSERT INTO t0 VALUES('Fever', 'The patient has a fever and a cough; or not. NEAR and AND');"
        "INSERT INTO t1 VALUES('Fever', 'The patient has a fever and a cough; or not. NEAR and AND');"
        "INSERT INTO t2 VALUES('Fever', 'The patient has a fever and a cough; or not. NEAR and AND');"
        "INSERT INTO t0 VALUES('\xe7\x97\x85', '\xe7\x97\x85\xe4\xba\xba\xe5\x8f\x91\xe7\x83\xad caf\xc3\xa9');"
        "INSERT INTO t1 VALUES('\xe7\x97\x85', '\xe7\x97\x85\xe4\xba\xba\xe5\x8f\x91\xe7\x83\xad caf\xc3\xa9');"
        "INSERT INTO t2 VALUES('\xe7\x97\x85', '\xe7\x97\x85\xe4\xba\xba\xe5\x8f\x91\xe7\x83\xad caf\xc3\xa9');";
    if (sqlite3_exec(db, sql, NULL, NULL, NULL) != SQLITE_OK)
        abort();
    for (int i = 0; i < 3; i++) {
        char q[128];
        snprintf(q, sizeof q, "SELECT rowid, bm25(t%d) FROM t%d WHERE t%d MATCH ?1 ORDER BY bm25(t%d)", i, i,
                 i, i);
        if (sqlite3_prepare_v2(db, q, -1, &st[i], NULL) != SQLITE_OK)
            abort();
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    setup();
    if (size < 1)
        return 0;
    int k = data[0] % 3;
    enum fts_tokenizer tok = k == 0 ? FTS_TOK_UNICODE61 : k == 1 ? FTS_TOK_PORTER : FTS_TOK_TRIGRAM;
    char *text = fz_cstr(data + 1, size - 1);
    char *q = NULL;
    struct lk_err err = { 0 };
    int rc = fts_query_build(text, tok, &q, &err);
    fz_check_err(rc, &err);
    if (!rc) {
        if (!q)
            abort();
        if (q[0]) {
            sqlite3_stmt *s = st[k];
            sqlite3_reset(s);
            sqlite3_bind_text(s, 1, q, -1, SQLITE_TRANSIENT);
            int r;
            while ((r = sqlite3_step(s)) == SQLITE_ROW)
                ;
            if (r != SQLITE_DONE) {
                fprintf(stderr, "fuzz_fts: SQLite refused the built query '%s': %s\n", q, sqlite3_errmsg(db));
                abort();
            }
            sqlite3_reset(s);
        }
        lk_free(q);
    }
    free(text);
    return 0;
}
