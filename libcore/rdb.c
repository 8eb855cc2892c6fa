/*
 * rdb.c - the runs database (SQLite, WAL). See rdb.h for the schema and the write model.
 * Owns: the connection, two kept prepared statements and the batched write transaction.
 * Every statement binds its values; the only SQL text built at run time is none at all.
 */
#include "rdb.h"

#include <cjson/cJSON.h>
#include <math.h>
#include <sqlite3.h>
#include <stdio.h>
#include <string.h>

// ---- schema ----

/* Version 1: the DESIGN.md sketch. Kept so that the migration path is real and tested. */
static const char SCHEMA_V1[] =
    "CREATE TABLE runs("
    " id INTEGER PRIMARY KEY,"
    " kind TEXT NOT NULL,"
    " name TEXT NOT NULL DEFAULT '',"
    " started_at TEXT NOT NULL,"
    " finished_at TEXT,"
    " status TEXT NOT NULL DEFAULT 'running'"
    "  CHECK(status IN ('running','done','failed','interrupted')),"
    " model TEXT, data TEXT, params_json TEXT, summary_json TEXT);"
    "CREATE TABLE train_steps("
    " run_id INTEGER NOT NULL REFERENCES runs(id) ON DELETE CASCADE,"
    " step INTEGER NOT NULL,"
    " loss REAL, lr REAL, grad_norm REAL, tokens_per_s REAL, elapsed_s REAL,"
    " PRIMARY KEY(run_id, step));"
    "CREATE TABLE eval_results("
    " run_id INTEGER NOT NULL REFERENCES runs(id) ON DELETE CASCADE,"
    " mode TEXT NOT NULL, metric TEXT NOT NULL, value REAL,"
    " PRIMARY KEY(run_id, mode, metric));"
    "CREATE TABLE eval_items("
    " run_id INTEGER NOT NULL REFERENCES runs(id) ON DELETE CASCADE,"
    " item_id TEXT NOT NULL, mode TEXT NOT NULL,"
    " question TEXT, reference TEXT, answer TEXT, retrieved TEXT, scores_json TEXT,"
    " PRIMARY KEY(run_id, item_id, mode));"
    "CREATE TABLE tensor_stats("
    " run_id INTEGER NOT NULL REFERENCES runs(id) ON DELETE CASCADE,"
    " tensor TEXT NOT NULL, rows INTEGER, cols INTEGER, rank INTEGER,"
    " fro_norm REAL, rel_change REAL, eff_rank REAL, energy_json TEXT, rel_error REAL,"
    " PRIMARY KEY(run_id, tensor));"
    "CREATE INDEX runs_kind ON runs(kind, id);";

/* Version 1 -> 2: eval loss per step, CI and n per result, free-form extra per tensor. */
static const char MIGRATE_V1_V2[] =
    "ALTER TABLE train_steps ADD COLUMN eval_loss REAL;"
    "ALTER TABLE eval_results ADD COLUMN lo REAL;"
    "ALTER TABLE eval_results ADD COLUMN hi REAL;"
    "ALTER TABLE eval_results ADD COLUMN n INTEGER;"
    "ALTER TABLE tensor_stats ADD COLUMN extra_json TEXT;";

/* Version 2 -> 3: what each system of an eval learned and forgot (eval/retain.h). */
static const char MIGRATE_V2_V3[] =
    "CREATE TABLE eval_retention("
    " run_id INTEGER NOT NULL REFERENCES runs(id) ON DELETE CASCADE,"
    " system TEXT NOT NULL, kind TEXT NOT NULL CHECK(kind IN ('learned','forgot')),"
    " metric TEXT NOT NULL, base REAL, value REAL, diff REAL, lo REAL, hi REAL, n INTEGER,"
    " no_room INTEGER NOT NULL DEFAULT 0,"
    " PRIMARY KEY(run_id, system, kind, metric));";

/* migrations[v] takes a database at version v to v + 1 (v = 0 is an empty file). */
static const char *const migrations[RDB_SCHEMA_VERSION] = { SCHEMA_V1, MIGRATE_V1_V2, MIGRATE_V2_V3 };

static const char SQL_STEP[] =
    "INSERT INTO train_steps(run_id, step, loss, lr, grad_norm, tokens_per_s, elapsed_s,"
    " eval_loss) VALUES(?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)"
    " ON CONFLICT(run_id, step) DO UPDATE SET"
    " loss = coalesce(excluded.loss, loss), lr = coalesce(excluded.lr, lr),"
    " grad_norm = coalesce(excluded.grad_norm, grad_norm),"
    " tokens_per_s = coalesce(excluded.tokens_per_s, tokens_per_s),"
    " elapsed_s = coalesce(excluded.elapsed_s, elapsed_s),"
    " eval_loss = coalesce(excluded.eval_loss, eval_loss)";

static const char SQL_ITEM[] =
    "INSERT OR REPLACE INTO eval_items(run_id, item_id, mode, question, reference, answer,"
    " retrieved, scores_json) VALUES(?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)";

#define NOW_UTC "strftime('%Y-%m-%dT%H:%M:%SZ', 'now')"

// ---- helpers ----

static int rdb_fail(struct rdb *db, struct lk_err *err, int rc, const char *what)
{
    const char *path = db && db->path ? db->path : "runs database";
    const char *msg = db && db->db ? sqlite3_errmsg(db->db) : sqlite3_errstr(rc);
    if ((rc & 0xff) == SQLITE_NOTADB)
        return lk_errf(err, LK_ERR_FORMAT, "%s: not an SQLite database (%s)", path, msg);
    if ((rc & 0xff) == SQLITE_BUSY || (rc & 0xff) == SQLITE_LOCKED)
        return lk_errf(err, LK_ERR_IO, "%s: %s: database is busy (%s)", path, what, msg);
    if ((rc & 0xff) == SQLITE_NOMEM)
        return lk_errf(err, LK_ERR_NOMEM, "%s: %s: out of memory", path, what);
    return lk_errf(err, LK_ERR_IO, "%s: %s: %s", path, what, msg);
}

static int rdb_exec(struct rdb *db, const char *sql, const char *what, struct lk_err *err)
{
    int rc = sqlite3_exec(db->db, sql, NULL, NULL, NULL);
    return rc == SQLITE_OK ? LK_OK : rdb_fail(db, err, rc, what);
}

/* Reads a one-integer pragma or query. */
static int rdb_query_int(struct rdb *db, const char *sql, int64_t *out, struct lk_err *err)
{
    sqlite3_stmt *st = NULL;
    int rc = sqlite3_prepare_v2(db->db, sql, -1, &st, NULL);
    if (rc == SQLITE_OK) {
        rc = sqlite3_step(st);
        if (rc == SQLITE_ROW) {
            *out = sqlite3_column_int64(st, 0);
            rc = SQLITE_OK;
        } else if (rc == SQLITE_DONE) {
            *out = 0;
            rc = SQLITE_OK;
        }
    }
    if (rc != SQLITE_OK) {
        int r = rdb_fail(db, err, rc, "reading the schema");
        sqlite3_finalize(st);
        return r;
    }
    sqlite3_finalize(st);
    return LK_OK;
}

static void bind_text(sqlite3_stmt *st, int i, const char *s)
{
    if (s)
        sqlite3_bind_text(st, i, s, -1, SQLITE_TRANSIENT);
    else
        sqlite3_bind_null(st, i);
}

static void bind_real(sqlite3_stmt *st, int i, double v)
{
    if (isfinite(v))
        sqlite3_bind_double(st, i, v);
    else if (isnan(v))
        sqlite3_bind_null(st, i);
    else
        sqlite3_bind_double(st, i, v); // +-inf is a value SQLite can store (e.g. a loss blew up)
}

static double column_real(sqlite3_stmt *st, int i)
{
    return sqlite3_column_type(st, i) == SQLITE_NULL ? NAN : sqlite3_column_double(st, i);
}

/* Runs a prepared statement that returns no rows; resets it (kept statements) or finalizes. */
static int rdb_step_done(struct rdb *db, sqlite3_stmt *st, int keep, const char *what,
                         struct lk_err *err)
{
    int rc = sqlite3_step(st);
    int r = rc == SQLITE_DONE ? LK_OK : rdb_fail(db, err, rc, what);
    if (keep) {
        sqlite3_reset(st);
        sqlite3_clear_bindings(st);
    } else {
        sqlite3_finalize(st);
    }
    return r;
}

static int rdb_prepare(struct rdb *db, const char *sql, sqlite3_stmt **st, struct lk_err *err)
{
    int rc = sqlite3_prepare_v2(db->db, sql, -1, st, NULL);
    if (rc != SQLITE_OK) {
        *st = NULL;
        return rdb_fail(db, err, rc, "preparing a statement");
    }
    return LK_OK;
}

// ---- batched writes ----

static int rdb_batch_begin(struct rdb *db, struct lk_err *err)
{
    if (db->readonly)
        return lk_errf(err, LK_ERR_USAGE, "%s: opened read-only", db->path);
    if (db->in_tx)
        return LK_OK;
    // IMMEDIATE takes the write lock now (waiting up to the busy timeout), so two writers
    // never deadlock upgrading a read transaction.
    int r = rdb_exec(db, "BEGIN IMMEDIATE", "starting a transaction", err);
    if (r)
        return r;
    db->in_tx = 1;
    db->pending = 0;
    db->tx_started = lk_now();
    return LK_OK;
}

/* After a row was written: commit when the batch is big or old enough. */
static int rdb_batch_row(struct rdb *db, struct lk_err *err)
{
    db->pending++;
    if (db->pending >= RDB_BATCH_ROWS || lk_now() - db->tx_started >= RDB_BATCH_SECONDS)
        return rdb_flush(db, err);
    return LK_OK;
}

int rdb_flush(struct rdb *db, struct lk_err *err)
{
    if (!db || !db->db || !db->in_tx)
        return LK_OK;
    int rc = sqlite3_exec(db->db, "COMMIT", NULL, NULL, NULL);
    if (rc != SQLITE_OK) {
        int r = rdb_fail(db, err, rc, "committing");
        // leave no half-open transaction behind: the rows of this batch are lost, said above
        sqlite3_exec(db->db, "ROLLBACK", NULL, NULL, NULL);
        db->in_tx = 0;
        return r;
    }
    db->in_tx = 0;
    db->pending = 0;
    return LK_OK;
}

// ---- open / close ----

static int rdb_migrate(struct rdb *db, int64_t version, struct lk_err *err)
{
    int r = rdb_exec(db, "BEGIN IMMEDIATE", "starting the schema migration", err);
    if (r)
        return r;
    // re-read inside the write lock: another process may have migrated meanwhile
    r = rdb_query_int(db, "PRAGMA user_version", &version, err);
    if (r == LK_OK && version == 0) {
        int64_t n_tables = 0;
        r = rdb_query_int(db, "SELECT count(*) FROM sqlite_schema", &n_tables, err);
        if (r == LK_OK && n_tables > 0)
            r = lk_errf(err, LK_ERR_FORMAT,
                        "%s: an SQLite database but not a lorakit runs database "
                        "(it has tables and no schema version)", db->path);
    }
    for (int64_t v = version; r == LK_OK && v < RDB_SCHEMA_VERSION; v++)
        r = rdb_exec(db, migrations[v], "migrating the schema", err);
    if (r == LK_OK && version < RDB_SCHEMA_VERSION) {
        char sql[64];
        // user_version cannot be a bound parameter; the value is our own constant
        snprintf(sql, sizeof sql, "PRAGMA user_version = %d", RDB_SCHEMA_VERSION);
        r = rdb_exec(db, sql, "setting the schema version", err);
    }
    if (r == LK_OK)
        return rdb_exec(db, "COMMIT", "committing the schema", err);
    sqlite3_exec(db->db, "ROLLBACK", NULL, NULL, NULL);
    return r;
}

static int rdb_open_flags(struct rdb *db, const char *path, int readonly, struct lk_err *err)
{
    memset(db, 0, sizeof *db);
    db->path = lk_strdup(path);
    if (!db->path)
        return lk_errf(err, LK_ERR_NOMEM, "out of memory");
    db->readonly = readonly;
    if (readonly && !lk_file_exists(path)) {
        rdb_close(db, NULL);
        return lk_errf(err, LK_ERR_MISSING, "%s: no such runs database", path);
    }
    int flags = readonly ? SQLITE_OPEN_READONLY : SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE;
    sqlite3 *s = NULL;
    int rc = sqlite3_open_v2(path, &s, flags, NULL);
    db->db = s;
    int r = LK_OK;
    if (rc != SQLITE_OK) {
        r = rdb_fail(db, err, rc, "opening");
        goto fail;
    }
    sqlite3_extended_result_codes(s, 1);
    sqlite3_busy_timeout(s, RDB_BUSY_TIMEOUT_MS);

    // The first read of the file: a file that is not a database fails here (SQLITE_NOTADB).
    int64_t version = 0;
    r = rdb_query_int(db, "PRAGMA user_version", &version, err);
    if (r)
        goto fail;
    if (version > RDB_SCHEMA_VERSION) {
        r = lk_errf(err, LK_ERR_UNSUPPORTED,
                    "%s: runs database schema version %lld is newer than this lorakit "
                    "supports (%d) (hint: use a newer lorakit, or another --runs)",
                    path, (long long)version, RDB_SCHEMA_VERSION);
        goto fail;
    }
    if (readonly) {
        if (version < RDB_SCHEMA_VERSION) {
            r = lk_errf(err, LK_ERR_UNSUPPORTED,
                        "%s: runs database schema version %lld is older than %d "
                        "(hint: any writing lorakit command migrates it)",
                        path, (long long)version, RDB_SCHEMA_VERSION);
            goto fail;
        }
    } else {
        // WAL: readers (the dashboard) never block the writer and see committed rows at once.
        sqlite3_stmt *st = NULL;
        r = rdb_prepare(db, "PRAGMA journal_mode = WAL", &st, err);
        if (r)
            goto fail;
        rc = sqlite3_step(st);
        const unsigned char *mode = rc == SQLITE_ROW ? sqlite3_column_text(st, 0) : NULL;
        int wal = mode && !strcmp((const char *)mode, "wal");
        sqlite3_finalize(st);
        if (!wal) {
            r = rc == SQLITE_ROW
                    ? lk_errf(err, LK_ERR_IO, "%s: cannot switch to WAL mode", path)
                    : rdb_fail(db, err, rc, "setting WAL mode");
            goto fail;
        }
        // NORMAL is durable across application crashes in WAL mode; only a power cut may
        // lose the last commits, which is fine for logs and keeps per-step commits cheap.
        if ((r = rdb_exec(db, "PRAGMA synchronous = NORMAL", "setting synchronous", err)))
            goto fail;
        if (version < RDB_SCHEMA_VERSION && (r = rdb_migrate(db, version, err)))
            goto fail;
    }
    if ((r = rdb_exec(db, "PRAGMA foreign_keys = ON", "enabling foreign keys", err)))
        goto fail;
    if (!readonly) {
        if ((r = rdb_prepare(db, SQL_STEP, &db->st_step, err)))
            goto fail;
        if ((r = rdb_prepare(db, SQL_ITEM, &db->st_item, err)))
            goto fail;
    }
    return LK_OK;
fail:
    rdb_close(db, NULL);
    return r;
}

int rdb_open(struct rdb *db, const char *path, struct lk_err *err)
{
    return rdb_open_flags(db, path, 0, err);
}

int rdb_open_readonly(struct rdb *db, const char *path, struct lk_err *err)
{
    return rdb_open_flags(db, path, 1, err);
}

int rdb_close(struct rdb *db, struct lk_err *err)
{
    if (!db)
        return LK_OK;
    int r = rdb_flush(db, err);
    sqlite3_finalize(db->st_step);
    sqlite3_finalize(db->st_item);
    if (db->db)
        sqlite3_close_v2(db->db);
    lk_free(db->path);
    memset(db, 0, sizeof *db);
    return r;
}

const char *rdb_status_str(enum rdb_status s)
{
    switch (s) {
    case RDB_RUNNING: return "running";
    case RDB_DONE: return "done";
    case RDB_FAILED: return "failed";
    case RDB_INTERRUPTED: return "interrupted";
    }
    return "failed";
}

// ---- runs ----

int rdb_run_begin(struct rdb *db, const char *kind, const char *name, const char *model,
                  const char *data, const char *params_json, int64_t *out_run_id,
                  struct lk_err *err)
{
    if (!kind || !*kind)
        return lk_errf(err, LK_ERR_USAGE, "%s: a run needs a kind", db->path);
    int rb = rdb_batch_begin(db, err);
    if (rb)
        return rb;
    sqlite3_stmt *st;
    int r = rdb_prepare(db,
                        "INSERT INTO runs(kind, name, started_at, status, model, data,"
                        " params_json) VALUES(?1, ?2, " NOW_UTC ", 'running', ?3, ?4, ?5)",
                        &st, err);
    if (r == LK_OK) {
        bind_text(st, 1, kind);
        bind_text(st, 2, name ? name : "");
        bind_text(st, 3, model);
        bind_text(st, 4, data);
        bind_text(st, 5, params_json);
        r = rdb_step_done(db, st, 0, "recording a run", err);
    }
    if (r == LK_OK)
        *out_run_id = sqlite3_last_insert_rowid(db->db);
    int rf = rdb_flush(db, err);
    return r ? r : rf;
}

int rdb_run_finish(struct rdb *db, int64_t run_id, enum rdb_status status,
                   const char *summary_json, struct lk_err *err)
{
    int rb = rdb_batch_begin(db, err);
    if (rb)
        return rb;
    sqlite3_stmt *st;
    int r = rdb_prepare(db,
                        "UPDATE runs SET status = ?2, finished_at = " NOW_UTC ","
                        " summary_json = coalesce(?3, summary_json) WHERE id = ?1",
                        &st, err);
    if (r == LK_OK) {
        sqlite3_bind_int64(st, 1, run_id);
        bind_text(st, 2, rdb_status_str(status));
        bind_text(st, 3, summary_json);
        r = rdb_step_done(db, st, 0, "finishing a run", err);
    }
    if (r == LK_OK && sqlite3_changes(db->db) == 0)
        r = lk_errf(err, LK_ERR_MISSING, "%s: no run with id %lld", db->path, (long long)run_id);
    int rf = rdb_flush(db, err);
    return r ? r : rf;
}

// ---- run records ----

char *rdb_default_path(const char *out)
{
    const char *slash = out ? strrchr(out, '/') : NULL;
    if (!slash)
        return lk_strdup("runs.db");
    size_t n = (size_t)(slash - out);
    char *s = lk_malloc(n + 16);
    if (s)
        snprintf(s, n + 16, "%.*s/runs.db", (int)n, out);
    return s;
}

static void rdb_rec_warn(struct rdb_rec *rec, const char *path, const struct lk_err *err)
{
    const char *why = err && err->msg[0] ? err->msg : lk_status_str(err ? err->code : LK_ERR_IO);
    if (rec->run_id > 0)
        snprintf(rec->warning, sizeof rec->warning, "%s run %lld not fully recorded in the runs database '%s': %s",
                 rec->kind, (long long)rec->run_id, path ? path : "?", why);
    else
        snprintf(rec->warning, sizeof rec->warning, "%s run not recorded in the runs database '%s': %s", rec->kind,
                 path ? path : "?", why);
}

int rdb_rec_begin(struct rdb_rec *rec, const char *path, const char *kind, const char *name,
                  const char *model, const char *data, const struct cJSON *params)
{
    memset(rec, 0, sizeof *rec);
    snprintf(rec->kind, sizeof rec->kind, "%s", kind);
    if (!path)
        return LK_OK;
    struct lk_err err = { 0 };
    char *pj = NULL;
    if (params && !(pj = cJSON_PrintUnformatted(params)))
        lk_errf(&err, LK_ERR_NOMEM, "out of memory");
    int rc = err.code;
    if (!rc)
        rc = rdb_open(&rec->db, path, &err);
    if (!rc && (rc = rdb_run_begin(&rec->db, kind, name, model, data, pj, &rec->run_id, &err)))
        rdb_close(&rec->db, NULL);
    cJSON_free(pj);
    if (rc) {
        rec->run_id = 0;
        rdb_rec_warn(rec, path, &err);
        return rc;
    }
    rec->active = 1;
    return LK_OK;
}

int rdb_rec_finish(struct rdb_rec *rec, int rc, const struct cJSON *summary)
{
    if (!rec->active)
        return LK_OK;
    struct lk_err err = { 0 };
    char *sj = NULL;
    if (summary && !(sj = cJSON_PrintUnformatted(summary)))
        lk_errf(&err, LK_ERR_NOMEM, "out of memory");
    enum rdb_status st = rc == LK_OK ? RDB_DONE : rc == LK_ERR_INTERRUPTED ? RDB_INTERRUPTED : RDB_FAILED;
    int w = rdb_run_finish(&rec->db, rec->run_id, st, sj, err.code ? NULL : &err);
    if (!w)
        w = err.code;
    cJSON_free(sj);
    struct lk_err e2 = { 0 };
    char *path = rec->db.path ? lk_strdup(rec->db.path) : NULL;
    int c = rdb_close(&rec->db, &e2);
    if (!w && c) {
        w = c;
        err = e2;
    }
    if (w)
        rdb_rec_warn(rec, path, &err);
    lk_free(path);
    rec->active = 0;
    return w;
}

int rdb_rec_drop(struct rdb_rec *rec, const struct lk_err *err)
{
    int code = err && err->code ? (int)err->code : LK_ERR_IO;
    if (!rec->active)
        return code;
    char *path = rec->db.path ? lk_strdup(rec->db.path) : NULL;
    rdb_run_finish(&rec->db, rec->run_id, RDB_FAILED, NULL, NULL);
    rdb_close(&rec->db, NULL);
    rdb_rec_warn(rec, path, err);
    lk_free(path);
    rec->active = 0;
    return code;
}

// ---- rows ----

int rdb_train_step(struct rdb *db, int64_t run_id, int64_t step, double loss, double lr,
                   double grad_norm, double tokens_per_s, double elapsed_s, double eval_loss,
                   struct lk_err *err)
{
    int rb = rdb_batch_begin(db, err);
    if (rb)
        return rb;
    sqlite3_stmt *st = db->st_step;
    sqlite3_bind_int64(st, 1, run_id);
    sqlite3_bind_int64(st, 2, step);
    bind_real(st, 3, loss);
    bind_real(st, 4, lr);
    bind_real(st, 5, grad_norm);
    bind_real(st, 6, tokens_per_s);
    bind_real(st, 7, elapsed_s);
    bind_real(st, 8, eval_loss);
    int r = rdb_step_done(db, st, 1, "recording a train step", err);
    if (r)
        return r;
    return rdb_batch_row(db, err);
}

int rdb_eval_result(struct rdb *db, int64_t run_id, const char *mode, const char *metric,
                    double value, double lo, double hi, int64_t n, struct lk_err *err)
{
    int rb = rdb_batch_begin(db, err);
    if (rb)
        return rb;
    sqlite3_stmt *st;
    int r = rdb_prepare(db,
                        "INSERT OR REPLACE INTO eval_results(run_id, mode, metric, value, lo,"
                        " hi, n) VALUES(?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                        &st, err);
    if (r)
        return r;
    sqlite3_bind_int64(st, 1, run_id);
    bind_text(st, 2, mode ? mode : "");
    bind_text(st, 3, metric ? metric : "");
    bind_real(st, 4, value);
    bind_real(st, 5, lo);
    bind_real(st, 6, hi);
    if (n >= 0)
        sqlite3_bind_int64(st, 7, n);
    else
        sqlite3_bind_null(st, 7);
    if ((r = rdb_step_done(db, st, 0, "recording an eval result", err)))
        return r;
    return rdb_batch_row(db, err);
}

int rdb_eval_item(struct rdb *db, int64_t run_id, const char *item_id, const char *mode,
                  const char *question, const char *reference, const char *answer,
                  const char *retrieved, const char *scores_json, struct lk_err *err)
{
    int rb = rdb_batch_begin(db, err);
    if (rb)
        return rb;
    sqlite3_stmt *st = db->st_item;
    sqlite3_bind_int64(st, 1, run_id);
    bind_text(st, 2, item_id ? item_id : "");
    bind_text(st, 3, mode ? mode : "");
    bind_text(st, 4, question);
    bind_text(st, 5, reference);
    bind_text(st, 6, answer);
    bind_text(st, 7, retrieved);
    bind_text(st, 8, scores_json);
    int r = rdb_step_done(db, st, 1, "recording an eval item", err);
    if (r)
        return r;
    return rdb_batch_row(db, err);
}

int rdb_tensor_stat(struct rdb *db, int64_t run_id, const struct rdb_tensor_stat *s,
                    struct lk_err *err)
{
    if (!s->tensor)
        return lk_errf(err, LK_ERR_USAGE, "%s: a tensor statistic needs a tensor name", db->path);
    int rb = rdb_batch_begin(db, err);
    if (rb)
        return rb;
    sqlite3_stmt *st;
    int r = rdb_prepare(db,
                        "INSERT OR REPLACE INTO tensor_stats(run_id, tensor, rows, cols, rank,"
                        " fro_norm, rel_change, eff_rank, energy_json, rel_error, extra_json)"
                        " VALUES(?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
                        &st, err);
    if (r)
        return r;
    sqlite3_bind_int64(st, 1, run_id);
    bind_text(st, 2, s->tensor);
    sqlite3_bind_int64(st, 3, s->rows);
    sqlite3_bind_int64(st, 4, s->cols);
    if (s->rank >= 0)
        sqlite3_bind_int64(st, 5, s->rank);
    else
        sqlite3_bind_null(st, 5);
    bind_real(st, 6, s->fro_norm);
    bind_real(st, 7, s->rel_change);
    bind_real(st, 8, s->eff_rank);
    bind_text(st, 9, s->energy_json);
    bind_real(st, 10, s->rel_error);
    bind_text(st, 11, s->extra_json);
    if ((r = rdb_step_done(db, st, 0, "recording a tensor statistic", err)))
        return r;
    return rdb_batch_row(db, err);
}

// ---- reading ----

static char *column_dup(sqlite3_stmt *st, int i, int *oom)
{
    const unsigned char *t = sqlite3_column_text(st, i);
    if (!t)
        return NULL;
    char *s = lk_strdup((const char *)t);
    if (!s)
        *oom = 1;
    return s;
}

void rdb_runs_free(struct rdb_run *runs, int n)
{
    if (!runs)
        return;
    for (int i = 0; i < n; i++) {
        struct rdb_run *r = &runs[i];
        lk_free(r->kind);
        lk_free(r->name);
        lk_free(r->started_at);
        lk_free(r->finished_at);
        lk_free(r->status);
        lk_free(r->model);
        lk_free(r->data);
        lk_free(r->params_json);
        lk_free(r->summary_json);
    }
    lk_free(runs);
}

int rdb_runs_list(struct rdb *db, int limit, struct rdb_run **out, int *n, struct lk_err *err)
{
    *out = NULL;
    *n = 0;
    sqlite3_stmt *st;
    int r = rdb_prepare(db,
                        "SELECT id, kind, name, started_at, finished_at, status, model, data,"
                        " params_json, summary_json FROM runs ORDER BY id DESC LIMIT ?1",
                        &st, err);
    if (r)
        return r;
    sqlite3_bind_int64(st, 1, limit > 0 ? limit : -1);
    struct rdb_run *runs = NULL;
    int cnt = 0, cap = 0, oom = 0, rc;
    while ((rc = sqlite3_step(st)) == SQLITE_ROW) {
        if (cnt == cap) {
            int ncap = cap ? cap * 2 : 16;
            struct rdb_run *nr = lk_realloc(runs, sizeof *runs * (size_t)ncap);
            if (!nr) {
                oom = 1;
                break;
            }
            runs = nr;
            cap = ncap;
        }
        struct rdb_run *x = &runs[cnt++];
        memset(x, 0, sizeof *x);
        x->id = sqlite3_column_int64(st, 0);
        x->kind = column_dup(st, 1, &oom);
        x->name = column_dup(st, 2, &oom);
        x->started_at = column_dup(st, 3, &oom);
        x->finished_at = column_dup(st, 4, &oom);
        x->status = column_dup(st, 5, &oom);
        x->model = column_dup(st, 6, &oom);
        x->data = column_dup(st, 7, &oom);
        x->params_json = column_dup(st, 8, &oom);
        x->summary_json = column_dup(st, 9, &oom);
        if (oom)
            break;
    }
    if (oom || (rc != SQLITE_DONE && rc != SQLITE_ROW)) {
        r = oom ? lk_errf(err, LK_ERR_NOMEM, "%s: out of memory listing runs", db->path)
                : rdb_fail(db, err, rc, "listing runs");
        sqlite3_finalize(st);
        rdb_runs_free(runs, cnt);
        return r;
    }
    sqlite3_finalize(st);
    *out = runs;
    *n = cnt;
    return LK_OK;
}

int rdb_eval_retention(struct rdb *db, int64_t run_id, const struct rdb_retention *x, struct lk_err *err)
{
    int r = rdb_batch_begin(db, err);
    if (r)
        return r;
    sqlite3_stmt *st;
    if ((r = rdb_prepare(db,
                         "INSERT OR REPLACE INTO eval_retention(run_id, system, kind, metric, base, value, diff,"
                         " lo, hi, n, no_room) VALUES(?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
                         &st, err)))
        return r;
    sqlite3_bind_int64(st, 1, run_id);
    bind_text(st, 2, x->system);
    bind_text(st, 3, x->kind);
    bind_text(st, 4, x->metric);
    bind_real(st, 5, x->base);
    bind_real(st, 6, x->value);
    bind_real(st, 7, x->diff);
    bind_real(st, 8, x->lo);
    bind_real(st, 9, x->hi);
    if (x->n >= 0)
        sqlite3_bind_int64(st, 10, x->n);
    else
        sqlite3_bind_null(st, 10);
    sqlite3_bind_int(st, 11, x->no_room != 0);
    if ((r = rdb_step_done(db, st, 0, "recording a retention figure", err)))
        return r;
    return rdb_batch_row(db, err);
}

static void retention_row(sqlite3_stmt *st, struct rdb_retention *x)
{
    memset(x, 0, sizeof *x);
    const unsigned char *t;
    if ((t = sqlite3_column_text(st, 0)))
        snprintf(x->system, sizeof x->system, "%s", (const char *)t);
    if ((t = sqlite3_column_text(st, 1)))
        snprintf(x->kind, sizeof x->kind, "%s", (const char *)t);
    if ((t = sqlite3_column_text(st, 2)))
        snprintf(x->metric, sizeof x->metric, "%s", (const char *)t);
    x->base = column_real(st, 3);
    x->value = column_real(st, 4);
    x->diff = column_real(st, 5);
    x->lo = column_real(st, 6);
    x->hi = column_real(st, 7);
    x->n = sqlite3_column_type(st, 8) == SQLITE_NULL ? -1 : sqlite3_column_int64(st, 8);
    x->no_room = sqlite3_column_int(st, 9);
}

int rdb_retention_load(struct rdb *db, int64_t run_id, struct rdb_retention **out, int *n, struct lk_err *err)
{
    *out = NULL;
    *n = 0;
    sqlite3_stmt *st;
    int r = rdb_prepare(db,
                        "SELECT system, kind, metric, base, value, diff, lo, hi, n, no_room FROM eval_retention"
                        " WHERE run_id = ?1 ORDER BY rowid",
                        &st, err);
    if (r)
        return r;
    sqlite3_bind_int64(st, 1, run_id);
    struct rdb_retention *rows = NULL;
    int cnt = 0, cap = 0, rc, oom = 0;
    while ((rc = sqlite3_step(st)) == SQLITE_ROW) {
        if (cnt == cap) {
            int ncap = cap ? cap * 2 : 32;
            struct rdb_retention *nr = lk_realloc(rows, sizeof *rows * (size_t)ncap);
            if (!nr) {
                oom = 1;
                break;
            }
            rows = nr;
            cap = ncap;
        }
        retention_row(st, &rows[cnt++]);
    }
    if (oom || rc != SQLITE_DONE) {
        r = oom ? lk_errf(err, LK_ERR_NOMEM, "%s: out of memory loading retention figures", db->path)
                : rdb_fail(db, err, rc, "loading retention figures");
        sqlite3_finalize(st);
        lk_free(rows);
        return r;
    }
    sqlite3_finalize(st);
    *out = rows;
    *n = cnt;
    return LK_OK;
}

int rdb_train_steps_load(struct rdb *db, int64_t run_id, int64_t after_step,
                         struct rdb_step **out, int64_t *n, struct lk_err *err)
{
    *out = NULL;
    *n = 0;
    sqlite3_stmt *st;
    int r = rdb_prepare(db,
                        "SELECT step, loss, lr, grad_norm, tokens_per_s, elapsed_s, eval_loss"
                        " FROM train_steps WHERE run_id = ?1 AND step > ?2 ORDER BY step",
                        &st, err);
    if (r)
        return r;
    sqlite3_bind_int64(st, 1, run_id);
    sqlite3_bind_int64(st, 2, after_step);
    struct rdb_step *rows = NULL;
    int64_t cnt = 0, cap = 0;
    int rc, oom = 0;
    while ((rc = sqlite3_step(st)) == SQLITE_ROW) {
        if (cnt == cap) {
            int64_t ncap = cap ? cap * 2 : 256;
            struct rdb_step *nr = lk_realloc(rows, sizeof *rows * (size_t)ncap);
            if (!nr) {
                oom = 1;
                break;
            }
            rows = nr;
            cap = ncap;
        }
        struct rdb_step *x = &rows[cnt++];
        x->step = sqlite3_column_int64(st, 0);
        x->loss = column_real(st, 1);
        x->lr = column_real(st, 2);
        x->grad_norm = column_real(st, 3);
        x->tokens_per_s = column_real(st, 4);
        x->elapsed_s = column_real(st, 5);
        x->eval_loss = column_real(st, 6);
    }
    if (oom || rc != SQLITE_DONE) {
        r = oom ? lk_errf(err, LK_ERR_NOMEM, "%s: out of memory loading steps", db->path)
                : rdb_fail(db, err, rc, "loading train steps");
        sqlite3_finalize(st);
        lk_free(rows);
        return r;
    }
    sqlite3_finalize(st);
    *out = rows;
    *n = cnt;
    return LK_OK;
}
