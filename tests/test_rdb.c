/* test_rdb.c - the runs database: write through rdb_*, read back with plain SQL (an
 * independent path), WAL readers, schema versions, bad files and hostile strings. */
#include "test.h"

#include <math.h>
#include <sqlite3.h>
#include <string.h>

#include <cjson/cJSON.h>

#include "../libcore/rdb.h"

// ---- plain-SQL helpers (the independent reader) ----

static sqlite3 *raw_open(const char *path)
{
    sqlite3 *s = NULL;
    if (sqlite3_open_v2(path, &s, SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE, NULL) != SQLITE_OK) {
        sqlite3_close(s);
        return NULL;
    }
    return s;
}

/* First column of the first row as an integer (-999 on error or no row). */
static long long raw_int(sqlite3 *s, const char *sql)
{
    sqlite3_stmt *st;
    long long v = -999;
    if (sqlite3_prepare_v2(s, sql, -1, &st, NULL) != SQLITE_OK)
        return v;
    if (sqlite3_step(st) == SQLITE_ROW)
        v = sqlite3_column_int64(st, 0);
    sqlite3_finalize(st);
    return v;
}

/* First column of the first row as text, copied into buf ("<null>" / "<error>"). */
static const char *raw_text(sqlite3 *s, const char *sql, char *buf, size_t n)
{
    sqlite3_stmt *st;
    snprintf(buf, n, "<error>");
    if (sqlite3_prepare_v2(s, sql, -1, &st, NULL) != SQLITE_OK)
        return buf;
    if (sqlite3_step(st) == SQLITE_ROW) {
        const unsigned char *t = sqlite3_column_text(st, 0);
        snprintf(buf, n, "%s", t ? (const char *)t : "<null>");
    }
    sqlite3_finalize(st);
    return buf;
}

static double raw_real(sqlite3 *s, const char *sql)
{
    sqlite3_stmt *st;
    double v = -999;
    if (sqlite3_prepare_v2(s, sql, -1, &st, NULL) != SQLITE_OK)
        return v;
    if (sqlite3_step(st) == SQLITE_ROW)
        v = sqlite3_column_type(st, 0) == SQLITE_NULL ? NAN : sqlite3_column_double(st, 0);
    sqlite3_finalize(st);
    return v;
}

static int iso_utc(const char *t)
{
    // 2024-05-01T12:34:56Z
    if (strlen(t) != 20 || t[4] != '-' || t[7] != '-' || t[10] != 'T' || t[13] != ':' ||
        t[16] != ':' || t[19] != 'Z')
        return 0;
    return t[0] == '2';
}

// ---- tests ----

TEST(rdb_create_write_read_back)
{
    struct lk_err err = { 0 };
    struct rdb db;
    const char *path = test_path("runs.db");
    CHECK_OK(rdb_open(&db, path, &err));
    int64_t run;
    CHECK_OK(rdb_run_begin(&db, "train", "first", "models/m", "data/d.jsonl", "{\"rank\":8}",
                           &run, &err));
    CHECK(run > 0);
    // more steps than one batch, so both the size trigger and the final flush are used
    for (int s = 1; s <= 600; s++)
        CHECK_OK(rdb_train_step(&db, run, s, 3.0 - s * 0.001, 1e-3, 0.5, 1000 + s, s * 0.1,
                                s % 100 == 0 ? 2.5 : NAN, &err));
    CHECK_OK(rdb_eval_result(&db, run, "rag", "f1", 0.42, 0.40, 0.44, 1782, &err));
    CHECK_OK(rdb_eval_result(&db, run, "base", "em", 0.1, NAN, NAN, -1, &err));
    CHECK_OK(rdb_eval_item(&db, run, "q1", "rag", "what?", "ref", "ans", "[\"d1\"]",
                           "{\"f1\":1}", &err));
    struct rdb_tensor_stat ts = { .tensor = "model.layers.0.self_attn.q_proj.weight",
                                  .rows = 64, .cols = 32, .rank = -1, .fro_norm = 1.5,
                                  .rel_change = 0.01, .eff_rank = 7.5, .energy_json = "[1,2]",
                                  .rel_error = NAN, .extra_json = NULL };
    CHECK_OK(rdb_tensor_stat(&db, run, &ts, &err));
    CHECK_OK(rdb_run_finish(&db, run, RDB_DONE, "{\"loss\":2.4}", &err));
    CHECK_OK(rdb_close(&db, &err));
    CHECK_OK(rdb_close(&db, &err)); // harmless twice

    sqlite3 *s = raw_open(path);
    CHECK(s != NULL);
    char buf[256];
    CHECK_INT(raw_int(s, "PRAGMA user_version"), RDB_SCHEMA_VERSION);
    CHECK(!strcmp(raw_text(s, "PRAGMA journal_mode", buf, sizeof buf), "wal"));
    CHECK(!strcmp(raw_text(s, "SELECT status FROM runs", buf, sizeof buf), "done"));
    CHECK(!strcmp(raw_text(s, "SELECT kind || '|' || name || '|' || model || '|' || data || '|'"
                              " || params_json || '|' || summary_json FROM runs", buf, sizeof buf),
                  "train|first|models/m|data/d.jsonl|{\"rank\":8}|{\"loss\":2.4}"));
    CHECK(iso_utc(raw_text(s, "SELECT started_at FROM runs", buf, sizeof buf)));
    CHECK(iso_utc(raw_text(s, "SELECT finished_at FROM runs", buf, sizeof buf)));
    CHECK_INT(raw_int(s, "SELECT count(*) FROM train_steps"), 600);
    CHECK_NEAR(raw_real(s, "SELECT loss FROM train_steps WHERE step = 250"), 2.75, 1e-12);
    CHECK_NEAR(raw_real(s, "SELECT tokens_per_s FROM train_steps WHERE step = 600"), 1600, 1e-12);
    CHECK(isnan(raw_real(s, "SELECT eval_loss FROM train_steps WHERE step = 250")));
    CHECK_INT(raw_int(s, "SELECT count(*) FROM train_steps WHERE eval_loss = 2.5"), 6);
    CHECK_NEAR(raw_real(s, "SELECT hi FROM eval_results WHERE mode = 'rag'"), 0.44, 1e-12);
    CHECK_INT(raw_int(s, "SELECT n FROM eval_results WHERE mode = 'rag'"), 1782);
    CHECK(isnan(raw_real(s, "SELECT lo FROM eval_results WHERE mode = 'base'")));
    CHECK(isnan(raw_real(s, "SELECT n FROM eval_results WHERE mode = 'base'")));
    CHECK(!strcmp(raw_text(s, "SELECT answer || retrieved FROM eval_items", buf, sizeof buf),
                  "ans[\"d1\"]"));
    CHECK_INT(raw_int(s, "SELECT rows * 1000 + cols FROM tensor_stats"), 64032);
    CHECK(isnan(raw_real(s, "SELECT rank FROM tensor_stats")));
    CHECK(isnan(raw_real(s, "SELECT rel_error FROM tensor_stats")));
    CHECK_NEAR(raw_real(s, "SELECT eff_rank FROM tensor_stats"), 7.5, 0);
    // the cascade: deleting the run deletes its rows
    CHECK_INT(sqlite3_exec(s, "PRAGMA foreign_keys = ON; DELETE FROM runs", NULL, NULL, NULL), 0);
    CHECK_INT(raw_int(s, "SELECT count(*) FROM train_steps"), 0);
    sqlite3_close(s);
}

TEST(rdb_step_upsert_and_read_helpers)
{
    struct lk_err err = { 0 };
    struct rdb db;
    CHECK_OK(rdb_open(&db, test_path("runs.db"), &err));
    int64_t a, b;
    CHECK_OK(rdb_run_begin(&db, "train", NULL, NULL, NULL, NULL, &a, &err));
    CHECK_OK(rdb_run_begin(&db, "eval", "e", NULL, NULL, NULL, &b, &err));
    CHECK_OK(rdb_train_step(&db, a, 10, 2.0, 0.1, 1.0, 50, 3.0, NAN, &err));
    CHECK_OK(rdb_train_step(&db, a, 20, 1.5, 0.1, 1.0, 50, 6.0, NAN, &err));
    // the eval loss arrives later for step 10: the other values stay
    CHECK_OK(rdb_train_step(&db, a, 10, NAN, NAN, NAN, NAN, NAN, 2.2, &err));
    CHECK_OK(rdb_flush(&db, &err));
    struct rdb_step *st;
    int64_t n;
    CHECK_OK(rdb_train_steps_load(&db, a, -1, &st, &n, &err));
    CHECK_INT(n, 2);
    CHECK(st[0].step == 10 && st[0].loss == 2.0 && st[0].eval_loss == 2.2 && st[0].elapsed_s == 3.0);
    CHECK(st[1].step == 20 && isnan(st[1].eval_loss));
    lk_free(st);
    CHECK_OK(rdb_train_steps_load(&db, a, 10, &st, &n, &err)); // only newer ones
    CHECK_INT(n, 1);
    CHECK_INT(st[0].step, 20);
    lk_free(st);
    struct rdb_run *runs;
    int nr;
    CHECK_OK(rdb_runs_list(&db, 0, &runs, &nr, &err));
    CHECK_INT(nr, 2);
    CHECK(runs[0].id == b && !strcmp(runs[0].kind, "eval") && !strcmp(runs[0].status, "running"));
    CHECK(runs[1].id == a && !strcmp(runs[1].name, "") && runs[1].model == NULL &&
          runs[1].finished_at == NULL);
    rdb_runs_free(runs, nr);
    CHECK(rdb_run_finish(&db, 12345, RDB_FAILED, NULL, &err) == LK_ERR_MISSING);
    CHECK(strstr(err.msg, "12345") != NULL);
    CHECK_OK(rdb_run_finish(&db, a, RDB_INTERRUPTED, NULL, &err));
    CHECK_OK(rdb_close(&db, &err));
    struct rdb ro;
    CHECK_OK(rdb_open_readonly(&ro, test_path("runs.db"), &err));
    CHECK_OK(rdb_runs_list(&ro, 1, &runs, &nr, &err));
    CHECK_INT(nr, 1);
    rdb_runs_free(runs, nr);
    CHECK_OK(rdb_runs_list(&ro, 0, &runs, &nr, &err));
    CHECK(nr == 2 && !strcmp(runs[1].status, "interrupted"));
    rdb_runs_free(runs, nr);
    CHECK(rdb_train_step(&ro, a, 30, 1, 1, 1, 1, 1, 1, &err) != LK_OK); // read-only
    rdb_close(&ro, NULL);
    CHECK(rdb_open_readonly(&ro, test_path("absent.db"), &err) == LK_ERR_MISSING);
    CHECK(!lk_file_exists(test_path("absent.db")));
}

TEST(rdb_reader_while_writer_holds_transaction)
{
    struct lk_err err = { 0 };
    struct rdb db;
    const char *path = test_path("runs.db");
    CHECK_OK(rdb_open(&db, path, &err));
    int64_t run;
    CHECK_OK(rdb_run_begin(&db, "train", "live", NULL, NULL, NULL, &run, &err));
    for (int s = 0; s < 10; s++)
        CHECK_OK(rdb_train_step(&db, run, s, 1, 1, 1, 1, 1, NAN, &err));
    CHECK(db.in_tx); // the write transaction is open now

    // a second connection (the dashboard) reads without waiting and without SQLITE_BUSY
    sqlite3 *r = NULL;
    CHECK_INT(sqlite3_open_v2(path, &r, SQLITE_OPEN_READONLY, NULL), SQLITE_OK);
    sqlite3_busy_timeout(r, 0); // would fail at once if it had to wait
    CHECK_INT(raw_int(r, "SELECT count(*) FROM runs"), 1);
    CHECK_INT(raw_int(r, "SELECT count(*) FROM train_steps"), 0); // not committed yet
    CHECK_OK(rdb_flush(&db, &err));
    CHECK_INT(raw_int(r, "SELECT count(*) FROM train_steps"), 10);
    // and a second writer can open the file while the first keeps its connection
    struct rdb db2;
    CHECK_OK(rdb_open(&db2, path, &err));
    int64_t run2;
    CHECK_OK(rdb_run_begin(&db2, "eval", "other", NULL, NULL, NULL, &run2, &err));
    CHECK(run2 != run);
    rdb_close(&db2, NULL);
    CHECK_INT(raw_int(r, "SELECT count(*) FROM runs"), 2);
    sqlite3_close(r);
    CHECK_OK(rdb_close(&db, &err));
}

TEST(rdb_refuses_newer_schema)
{
    struct lk_err err = { 0 };
    const char *path = test_path("runs.db");
    struct rdb db;
    CHECK_OK(rdb_open(&db, path, &err));
    rdb_close(&db, NULL);
    sqlite3 *s = raw_open(path);
    CHECK_INT(sqlite3_exec(s, "PRAGMA user_version = 99", NULL, NULL, NULL), 0);
    sqlite3_close(s);
    CHECK(rdb_open(&db, path, &err) == LK_ERR_UNSUPPORTED);
    CHECK(strstr(err.msg, "newer") && strstr(err.msg, "99") && strstr(err.msg, path));
    CHECK(db.db == NULL);
    CHECK(rdb_open_readonly(&db, path, &err) == LK_ERR_UNSUPPORTED);
    s = raw_open(path);
    CHECK_INT(raw_int(s, "PRAGMA user_version"), 99); // untouched
    sqlite3_close(s);
}

TEST(rdb_refuses_files_that_are_not_runs_databases)
{
    struct lk_err err = { 0 };
    const char *path = test_path("notes.db");
    char junk[4096];
    for (size_t i = 0; i < sizeof junk; i++)
        junk[i] = "this is not an sqlite database\n"[i % 31];
    CHECK_OK(lk_write_file_atomic(path, junk, sizeof junk, &err));
    struct rdb db;
    CHECK(rdb_open(&db, path, &err) == LK_ERR_FORMAT);
    CHECK(strstr(err.msg, "not an SQLite database") && strstr(err.msg, path));
    char *back;
    size_t n;
    CHECK_OK(lk_read_file(path, &back, &n, &err));
    CHECK(n == sizeof junk && !memcmp(back, junk, n)); // not modified
    lk_free(back);
    CHECK(!lk_file_exists(test_path("notes.db-wal")));

    // an SQLite database of something else (no version, its own tables)
    const char *other = test_path("other.db");
    sqlite3 *s = raw_open(other);
    CHECK_INT(sqlite3_exec(s, "CREATE TABLE runs(x); INSERT INTO runs VALUES(1)", NULL, NULL,
                           NULL), 0);
    sqlite3_close(s);
    CHECK(rdb_open(&db, other, &err) == LK_ERR_FORMAT);
    CHECK(strstr(err.msg, "not a lorakit runs database") != NULL);
    s = raw_open(other);
    CHECK_INT(raw_int(s, "SELECT x FROM runs"), 1);
    sqlite3_close(s);
}

TEST(rdb_migrates_version_1)
{
    // A version-1 file as the DESIGN.md sketch had it, written here by hand.
    const char *path = test_path("old.db");
    sqlite3 *s = raw_open(path);
    CHECK(s != NULL);
    const char *v1 =
        "CREATE TABLE runs(id INTEGER PRIMARY KEY, kind TEXT NOT NULL, name TEXT NOT NULL"
        " DEFAULT '', started_at TEXT NOT NULL, finished_at TEXT, status TEXT NOT NULL,"
        " model TEXT, data TEXT, params_json TEXT, summary_json TEXT);"
        "CREATE TABLE train_steps(run_id INTEGER NOT NULL, step INTEGER NOT NULL, loss REAL,"
        " lr REAL, grad_norm REAL, tokens_per_s REAL, elapsed_s REAL, PRIMARY KEY(run_id, step));"
        "CREATE TABLE eval_results(run_id INTEGER NOT NULL, mode TEXT NOT NULL, metric TEXT NOT"
        " NULL, value REAL, PRIMARY KEY(run_id, mode, metric));"
        "CREATE TABLE eval_items(run_id INTEGER NOT NULL, item_id TEXT NOT NULL, mode TEXT NOT"
        " NULL, question TEXT, reference TEXT, answer TEXT, retrieved TEXT, scores_json TEXT,"
        " PRIMARY KEY(run_id, item_id, mode));"
        "CREATE TABLE tensor_stats(run_id INTEGER NOT NULL, tensor TEXT NOT NULL, rows INTEGER,"
        " cols INTEGER, rank INTEGER, fro_norm REAL, rel_change REAL, eff_rank REAL,"
        " energy_json TEXT, rel_error REAL, PRIMARY KEY(run_id, tensor));"
        "INSERT INTO runs VALUES(7, 'train', 'old', '2023-01-01T00:00:00Z', NULL, 'done',"
        " NULL, NULL, NULL, NULL);"
        "INSERT INTO train_steps VALUES(7, 1, 4.5, 0.1, 1, 1, 1);"
        "INSERT INTO eval_results VALUES(7, 'base', 'f1', 0.3);"
        "PRAGMA user_version = 1;";
    CHECK_INT(sqlite3_exec(s, v1, NULL, NULL, NULL), 0);
    sqlite3_close(s);

    struct lk_err err = { 0 };
    struct rdb ro;
    CHECK(rdb_open_readonly(&ro, path, &err) == LK_ERR_UNSUPPORTED); // readers do not migrate
    CHECK(strstr(err.msg, "older") != NULL);
    struct rdb db;
    CHECK_OK(rdb_open(&db, path, &err));
    CHECK_OK(rdb_train_step(&db, 7, 1, NAN, NAN, NAN, NAN, NAN, 4.0, &err));
    CHECK_OK(rdb_eval_result(&db, 7, "rag", "f1", 0.5, 0.4, 0.6, 10, &err));
    CHECK_OK(rdb_close(&db, &err));
    s = raw_open(path);
    CHECK_INT(raw_int(s, "PRAGMA user_version"), RDB_SCHEMA_VERSION);
    CHECK_NEAR(raw_real(s, "SELECT loss FROM train_steps WHERE run_id = 7"), 4.5, 0); // kept
    CHECK_NEAR(raw_real(s, "SELECT eval_loss FROM train_steps WHERE run_id = 7"), 4.0, 0);
    CHECK_NEAR(raw_real(s, "SELECT value FROM eval_results WHERE mode = 'base'"), 0.3, 0);
    CHECK_NEAR(raw_real(s, "SELECT lo FROM eval_results WHERE mode = 'rag'"), 0.4, 0);
    CHECK_INT(raw_int(s, "SELECT count(*) FROM pragma_table_info('tensor_stats')"
                         " WHERE name = 'extra_json'"), 1);
    sqlite3_close(s);
}

TEST(rdb_hostile_strings_stored_verbatim)
{
    static const char *const hostile[] = {
        "'; DROP TABLE runs; --",
        "\"quoted\" and 'single' and `back`",
        "Robert'); DELETE FROM train_steps WHERE (1=1",
        "\x01\x02\x1b[31mred\x1b[0m\t\r\n\x7f",
        "\xe4\xb8\xad\xe6\x96\x87 \xd8\xb9\xd8\xb1\xd8\xa8\xd9\x8a \xf0\x9f\x98\x80 %s %n ?1 :x @y $z",
        "",
    };
    const int nh = (int)(sizeof hostile / sizeof hostile[0]);
    struct lk_err err = { 0 };
    struct rdb db;
    const char *path = test_path("runs.db");
    CHECK_OK(rdb_open(&db, path, &err));
    for (int i = 0; i < nh; i++) {
        int64_t run;
        const char *h = hostile[i];
        CHECK_OK(rdb_run_begin(&db, h[0] ? h : "k", h, h, h, h, &run, &err));
        CHECK_OK(rdb_eval_item(&db, run, h, h, h, h, h, h, h, &err));
        CHECK_OK(rdb_eval_result(&db, run, h, h, 1, 0, 2, 3, &err));
        struct rdb_tensor_stat ts = { .tensor = h, .rank = 1, .energy_json = h, .extra_json = h };
        CHECK_OK(rdb_tensor_stat(&db, run, &ts, &err));
        CHECK_OK(rdb_run_finish(&db, run, RDB_DONE, h, &err));
    }
    struct rdb_run *runs;
    int nr;
    CHECK_OK(rdb_runs_list(&db, 0, &runs, &nr, &err));
    CHECK_INT(nr, nh);
    for (int i = 0; i < nh; i++) {
        const struct rdb_run *r = &runs[nh - 1 - i]; // newest first
        CHECK_MSG(!strcmp(r->name, hostile[i]) && !strcmp(r->model, hostile[i]) &&
                      !strcmp(r->params_json, hostile[i]) && !strcmp(r->summary_json, hostile[i]),
                  "hostile string %d not stored verbatim", i);
    }
    rdb_runs_free(runs, nr);
    CHECK_OK(rdb_close(&db, &err));

    // read back through plain SQL with bound comparisons: every column byte-identical
    sqlite3 *s = raw_open(path);
    const char *tables[] = { "eval_items", "eval_results", "tensor_stats" };
    const char *sql[] = {
        "SELECT count(*) FROM eval_items WHERE item_id = ?1 AND mode = ?1 AND question = ?1"
        " AND reference = ?1 AND answer = ?1 AND retrieved = ?1 AND scores_json = ?1",
        "SELECT count(*) FROM eval_results WHERE mode = ?1 AND metric = ?1",
        "SELECT count(*) FROM tensor_stats WHERE tensor = ?1 AND energy_json = ?1"
        " AND extra_json = ?1",
    };
    for (int t = 0; t < 3; t++)
        for (int i = 0; i < nh; i++) {
            sqlite3_stmt *st;
            CHECK_INT(sqlite3_prepare_v2(s, sql[t], -1, &st, NULL), SQLITE_OK);
            sqlite3_bind_text(st, 1, hostile[i], -1, SQLITE_STATIC);
            CHECK_INT(sqlite3_step(st), SQLITE_ROW);
            long long c = sqlite3_column_int64(st, 0);
            sqlite3_finalize(st);
            CHECK_MSG(c == 1, "%s: hostile string %d found %lld times", tables[t], i, c);
        }
    CHECK_INT(raw_int(s, "SELECT count(*) FROM sqlite_schema WHERE type = 'table'"), 6); // 6 since eval_retention
    sqlite3_close(s);
}

// ---- run records ----

TEST(rdb_rec_records_a_run_and_warns_instead_of_failing)
{
    char *p = rdb_default_path("some/dir/out");
    CHECK(p && !strcmp(p, "some/dir/runs.db"));
    lk_free(p);
    p = rdb_default_path("out");
    CHECK(p && !strcmp(p, "runs.db"));
    lk_free(p);

    // a run with hostile strings in its parameters: stored as JSON that parses back
    const char *db = test_path("runs.db");
    cJSON *params = cJSON_CreateObject();
    cJSON_AddStringToObject(params, "targets", "q_proj\",\"x\\\n");
    cJSON_AddNumberToObject(params, "rank", 8);
    struct rdb_rec rec;
    CHECK_OK(rdb_rec_begin(&rec, db, "train", "name", "model", "data", params));
    CHECK(rec.active && rec.run_id > 0 && !rec.warning[0]);
    CHECK_OK(rdb_train_step(&rec.db, rec.run_id, 1, 2.5, 1e-3, 1, 100, 0.1, NAN, test_err()));
    cJSON *sum = cJSON_CreateObject();
    cJSON_AddNumberToObject(sum, "steps", 1);
    CHECK_OK(rdb_rec_finish(&rec, LK_OK, sum));
    CHECK(!rec.active && !rec.warning[0]);
    CHECK_OK(rdb_rec_finish(&rec, LK_OK, sum)); // harmless when no longer active
    cJSON_Delete(sum);
    cJSON_Delete(params);
    sqlite3 *s = raw_open(db);
    char buf[256];
    CHECK(s);
    CHECK(!strcmp(raw_text(s, "SELECT status FROM runs", buf, sizeof buf), "done"));
    CHECK(!strcmp(raw_text(s, "SELECT json_extract(params_json, '$.targets') FROM runs", buf, sizeof buf),
                  "q_proj\",\"x\\\n"));
    CHECK(!strcmp(raw_text(s, "SELECT json_extract(summary_json, '$.steps') FROM runs", buf, sizeof buf), "1"));
    CHECK_INT(raw_int(s, "SELECT count(*) FROM train_steps"), 1);
    sqlite3_close(s);

    // an interrupted run is recorded as such
    CHECK_OK(rdb_rec_begin(&rec, db, "eval", NULL, NULL, NULL, NULL));
    CHECK_OK(rdb_rec_finish(&rec, LK_ERR_INTERRUPTED, NULL));
    s = raw_open(db);
    CHECK(!strcmp(raw_text(s, "SELECT status FROM runs WHERE kind = 'eval'", buf, sizeof buf), "interrupted"));
    sqlite3_close(s);

    // no path: nothing recorded, no warning
    CHECK_OK(rdb_rec_begin(&rec, NULL, "merge", NULL, NULL, NULL, NULL));
    CHECK(!rec.active && !rec.warning[0]);
    CHECK_OK(rdb_rec_finish(&rec, LK_OK, NULL));

    // a database that cannot be opened: a warning naming the kind and the file, nothing fails later
    CHECK_OK(lk_write_file_atomic(test_path("junk.db"), "not a database at all, just text......", 38, test_err()));
    CHECK(rdb_rec_begin(&rec, test_path("junk.db"), "diff", NULL, NULL, NULL, NULL) != LK_OK);
    CHECK(!rec.active && strstr(rec.warning, "diff run not recorded") && strstr(rec.warning, "junk.db"));
    CHECK_OK(rdb_rec_finish(&rec, LK_OK, NULL));

    // a failed row write drops the record with a warning that names the run
    CHECK_OK(rdb_rec_begin(&rec, db, "train", NULL, NULL, NULL, NULL));
    struct lk_err e = { 0 };
    lk_errf(&e, LK_ERR_IO, "disk full");
    CHECK_INT(rdb_rec_drop(&rec, &e), LK_ERR_IO);
    CHECK(!rec.active && strstr(rec.warning, "not fully recorded") && strstr(rec.warning, "disk full"));
    s = raw_open(db);
    CHECK_INT(raw_int(s, "SELECT count(*) FROM runs WHERE kind = 'train' AND status = 'failed'"), 1);
    sqlite3_close(s);
}

/* Version 2 -> 3: a version-2 file (version 1 by hand plus the 1 -> 2 columns) keeps its rows
 * and gains eval_retention; retention rows round-trip, NULLs come back as NAN / -1, a second
 * write of a key replaces the row, and deleting the run deletes them. */
TEST(rdb_migrates_version_2_and_retention_rows)
{
    const char *path = test_path("v2.db");
    sqlite3 *s = raw_open(path);
    CHECK(s != NULL);
    const char *v2 =
        "CREATE TABLE runs(id INTEGER PRIMARY KEY, kind TEXT NOT NULL, name TEXT NOT NULL"
        " DEFAULT '', started_at TEXT NOT NULL, finished_at TEXT, status TEXT NOT NULL,"
        " model TEXT, data TEXT, params_json TEXT, summary_json TEXT);"
        "CREATE TABLE train_steps(run_id INTEGER NOT NULL, step INTEGER NOT NULL, loss REAL,"
        " lr REAL, grad_norm REAL, tokens_per_s REAL, elapsed_s REAL, eval_loss REAL, PRIMARY KEY(run_id, step));"
        "CREATE TABLE eval_results(run_id INTEGER NOT NULL, mode TEXT NOT NULL, metric TEXT NOT"
        " NULL, value REAL, lo REAL, hi REAL, n INTEGER, PRIMARY KEY(run_id, mode, metric));"
        "CREATE TABLE eval_items(run_id INTEGER NOT NULL, item_id TEXT NOT NULL, mode TEXT NOT"
        " NULL, question TEXT, reference TEXT, answer TEXT, retrieved TEXT, scores_json TEXT,"
        " PRIMARY KEY(run_id, item_id, mode));"
        "CREATE TABLE tensor_stats(run_id INTEGER NOT NULL, tensor TEXT NOT NULL, rows INTEGER,"
        " cols INTEGER, rank INTEGER, fro_norm REAL, rel_change REAL, eff_rank REAL,"
        " energy_json TEXT, rel_error REAL, extra_json TEXT, PRIMARY KEY(run_id, tensor));"
        "INSERT INTO runs VALUES(3, 'eval', 'old', '2023-01-01T00:00:00Z', NULL, 'done',"
        " NULL, NULL, NULL, NULL);"
        "INSERT INTO eval_results VALUES(3, 'base', 'f1', 0.3, 0.2, 0.4, 10);"
        "PRAGMA user_version = 2;";
    CHECK_INT(sqlite3_exec(s, v2, NULL, NULL, NULL), 0);
    sqlite3_close(s);
    struct lk_err err = { 0 };
    struct rdb db;
    CHECK(rdb_open_readonly(&db, path, &err) == LK_ERR_UNSUPPORTED); // readers do not migrate
    CHECK_OK(rdb_open(&db, path, &err));
    int64_t id;
    CHECK_OK(rdb_run_begin(&db, "eval", "new", NULL, NULL, NULL, &id, &err));
    struct rdb_retention a = { "lora", "forgot", "rag.f1", 0.5, 0.4, 0.1, 0.05, 0.15, 200, 0 };
    struct rdb_retention b = { "full", "learned", "f1", 0.01, 0.3, 0.29, 0.2, 0.35, 200, 0 };
    struct rdb_retention c = { "full", "forgot", "closed.em", 0, 0, 0, NAN, NAN, -1, 1 };
    CHECK_OK(rdb_eval_retention(&db, id, &a, &err));
    CHECK_OK(rdb_eval_retention(&db, id, &b, &err));
    CHECK_OK(rdb_eval_retention(&db, id, &c, &err));
    a.diff = 0.12; // the same key again: replaced
    CHECK_OK(rdb_eval_retention(&db, id, &a, &err));
    struct rdb_retention bad = { "x", "gained", "f1", 0, 0, 0, 0, 0, 1, 0 }; // kind is checked
    CHECK(rdb_eval_retention(&db, id, &bad, &err) != LK_OK);
    CHECK_OK(rdb_close(&db, &err));
    s = raw_open(path);
    CHECK_INT(raw_int(s, "PRAGMA user_version"), RDB_SCHEMA_VERSION);
    CHECK_INT(RDB_SCHEMA_VERSION, 3);
    CHECK_NEAR(raw_real(s, "SELECT lo FROM eval_results WHERE run_id = 3"), 0.2, 0); // kept
    CHECK_INT(raw_int(s, "SELECT count(*) FROM eval_retention"), 3);
    CHECK_NEAR(raw_real(s, "SELECT diff FROM eval_retention WHERE system = 'lora'"), 0.12, 0);
    CHECK_INT(raw_int(s, "SELECT count(*) FROM eval_retention WHERE system = 'full' AND kind = 'forgot'"
                         " AND lo IS NULL AND n IS NULL AND no_room = 1"), 1);
    sqlite3_close(s);
    CHECK_OK(rdb_open_readonly(&db, path, &err));
    struct rdb_retention *rows;
    int n;
    CHECK_OK(rdb_retention_load(&db, id, &rows, &n, &err));
    CHECK_INT(n, 3); // in the order written; the replaced row counts as written last
    CHECK(!strcmp(rows[0].system, "full") && !strcmp(rows[0].kind, "learned") && !strcmp(rows[0].metric, "f1"));
    CHECK(rows[0].base == 0.01 && rows[0].value == 0.3 && rows[0].hi == 0.35 && rows[0].n == 200 && !rows[0].no_room);
    CHECK(isnan(rows[1].lo) && rows[1].n == -1 && rows[1].no_room == 1);
    CHECK(!strcmp(rows[2].system, "lora") && rows[2].diff == 0.12);
    lk_free(rows);
    CHECK_OK(rdb_retention_load(&db, 3, &rows, &n, &err)); // a run without any
    CHECK(n == 0 && rows == NULL);
    rdb_close(&db, NULL);
    s = raw_open(path);
    CHECK_INT(sqlite3_exec(s, "PRAGMA foreign_keys = ON; DELETE FROM runs WHERE id = 4", NULL, NULL, NULL), 0);
    CHECK_INT(raw_int(s, "SELECT count(*) FROM eval_retention"), 0);
    sqlite3_close(s);
}
