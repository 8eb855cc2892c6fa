/*
 * rdb.h - the runs database: one SQLite file (WAL mode) where every command records what
 * it did, so `lorakit dash` can show runs, including a training run that is still going.
 *
 * Writers (train, eval, merge, svd-compress, diff) use the rdb_* calls below. Readers (the
 * dashboard) may use the small read helpers at the end, or plain sqlite3 calls on
 * `struct rdb`.db against the schema documented here: the schema is the interface.
 *
 * Schema, version RDB_SCHEMA_VERSION (PRAGMA user_version):
 *
 *   runs(id INTEGER PRIMARY KEY,          -- rowid, returned by rdb_run_begin
 *        kind TEXT NOT NULL,              -- 'train', 'eval', 'merge', 'svd-compress', 'diff', ...
 *        name TEXT NOT NULL,              -- free text chosen by the user ('' when none)
 *        started_at TEXT NOT NULL,        -- ISO-8601 UTC, '2024-05-01T12:34:56Z'
 *        finished_at TEXT,                -- NULL while running
 *        status TEXT NOT NULL,            -- 'running' | 'done' | 'failed' | 'interrupted'
 *        model TEXT, data TEXT,           -- paths or names as given on the command line
 *        params_json TEXT,                -- the command's settings, a JSON object (or NULL)
 *        summary_json TEXT)               -- final figures, a JSON object (or NULL)
 *   train_steps(run_id, step, loss, lr, grad_norm, tokens_per_s, elapsed_s, eval_loss,
 *        PRIMARY KEY(run_id, step))       -- REALs; NULL where a value was not given (NAN)
 *   eval_results(run_id, mode, metric, value, lo, hi, n,
 *        PRIMARY KEY(run_id, mode, metric)) -- mode 'base'|'rag'|'ft'|'ft+rag'|...;
 *                                         -- lo/hi: 95% bootstrap CI (NULL if none), n items
 *   eval_items(run_id, item_id, mode, question, reference, answer, retrieved, scores_json,
 *        PRIMARY KEY(run_id, item_id, mode)) -- retrieved: text or JSON given by the caller
 *   tensor_stats(run_id, tensor, rows, cols, rank, fro_norm, rel_change, eff_rank,
 *        energy_json, rel_error, extra_json, PRIMARY KEY(run_id, tensor))
 *   eval_retention(run_id, system, kind, metric, base, value, diff, lo, hi, n, no_room,
 *        PRIMARY KEY(run_id, system, kind, metric)) -- an eval's systems against its base
 *                                         -- (eval/retain.h): kind 'learned' (metric 'f1',
 *                                         -- 'em', 'nll', 'acc' on the run's questions; diff =
 *                                         -- the gain) or 'forgot' (metric 'closed.f1',
 *                                         -- 'rag.em', 'text.nll', ...; diff = the forgetting);
 *                                         -- positive diff = learned / forgot; base and value the
 *                                         -- two means; lo/hi its 95% interval; no_room 1 when
 *                                         -- the base's own score leaves nothing to forget
 *
 * Every child table references runs(id) ON DELETE CASCADE (foreign keys are on in every
 * connection rdb_open makes), so deleting a run deletes its rows. Writing a row whose key
 * exists updates it: train_steps keeps the old value of a column given as NAN (so an eval
 * loss can be added to a step logged earlier); the other tables replace the row.
 *
 * Versions: 1 was the DESIGN.md sketch (no train_steps.eval_loss, eval_results.lo/hi/n,
 * tensor_stats.extra_json); 2 adds those columns; 3 adds eval_retention. rdb_open migrates an older file in one
 * transaction, refuses a newer one (LK_ERR_UNSUPPORTED) and refuses a file that is not an
 * SQLite database, or an SQLite database with other tables and no lorakit version
 * (LK_ERR_FORMAT).
 *
 * Writes: rdb_run_begin and rdb_run_finish commit at once (the dashboard sees them). The
 * per-row calls (rdb_train_step, rdb_eval_result, rdb_eval_item, rdb_eval_retention,
 * rdb_tensor_stat) join a
 * write transaction that is committed every RDB_BATCH_ROWS rows or RDB_BATCH_SECONDS
 * seconds, whichever comes first, and by rdb_flush, rdb_run_finish and rdb_close. So a
 * crash loses at most about a second of steps, and a reader waits at most that long for
 * new rows. All SQL uses bound parameters: names and texts are data, stored verbatim.
 * Errors are sticky per call only (each call returns a status and fills err).
 */
#ifndef LK_RDB_H
#define LK_RDB_H

#include <stdint.h>

#include "lk.h"

#define RDB_SCHEMA_VERSION 3
#define RDB_BATCH_ROWS 256
#define RDB_BATCH_SECONDS 1.0
#define RDB_BUSY_TIMEOUT_MS 5000

struct sqlite3;
struct sqlite3_stmt;

enum rdb_status { RDB_RUNNING = 0, RDB_DONE, RDB_FAILED, RDB_INTERRUPTED };

struct rdb {
    struct sqlite3 *db;           /* owned: the connection (readers may query it directly) */
    struct sqlite3_stmt *st_step; /* owned: prepared train_steps upsert, kept for speed */
    struct sqlite3_stmt *st_item; /* owned: prepared eval_items insert */
    char *path;                   /* owned: file name, for messages */
    int readonly;
    int in_tx;                    /* a batched write transaction is open */
    int pending;                  /* rows written in it */
    double tx_started;            /* lk_now() when it began */
};

/* Opens (creating the file and schema when missing) or migrates the runs database at path.
 * Sets WAL mode, a busy timeout of RDB_BUSY_TIMEOUT_MS and foreign keys. On failure the
 * struct is left zeroed (rdb_close is still harmless). */
int rdb_open(struct rdb *db, const char *path, struct lk_err *err);
/* Opens an existing database for reading only (the dashboard): no creation, no migration
 * (an older version is LK_ERR_UNSUPPORTED with a hint). */
int rdb_open_readonly(struct rdb *db, const char *path, struct lk_err *err);
/* Commits pending rows, finalizes statements, closes, zeroes the struct. NULL-safe and
 * harmless twice. A failed final commit is reported in err (may be NULL). */
int rdb_close(struct rdb *db, struct lk_err *err);
/* Commits the open batch of rows, if any. */
int rdb_flush(struct rdb *db, struct lk_err *err);

/* "running", "done", "failed", "interrupted" (the strings stored in runs.status). */
const char *rdb_status_str(enum rdb_status s);

/* Records a new run with status 'running' and started_at now; commits. Any text may be NULL
 * (name is stored as ''); params_json should be a JSON object (stored as given). */
int rdb_run_begin(struct rdb *db, const char *kind, const char *name, const char *model,
                  const char *data, const char *params_json, int64_t *out_run_id,
                  struct lk_err *err);
/* Sets status and finished_at (now) and summary_json (NULL keeps the old value); commits
 * everything pending. LK_ERR_MISSING when the run does not exist. */
int rdb_run_finish(struct rdb *db, int64_t run_id, enum rdb_status status,
                   const char *summary_json, struct lk_err *err);

/* One training step. Any value may be NAN (stored as NULL; on an existing step the old value
 * is kept). Cheap: a kept prepared statement inside a batched transaction. */
int rdb_train_step(struct rdb *db, int64_t run_id, int64_t step, double loss, double lr,
                   double grad_norm, double tokens_per_s, double elapsed_s, double eval_loss,
                   struct lk_err *err);
/* One aggregate figure of an eval run; lo/hi NAN when there is no interval, n items used. */
int rdb_eval_result(struct rdb *db, int64_t run_id, const char *mode, const char *metric,
                    double value, double lo, double hi, int64_t n, struct lk_err *err);
/* One question of an eval run in one mode. Texts may be NULL. */
int rdb_eval_item(struct rdb *db, int64_t run_id, const char *item_id, const char *mode,
                  const char *question, const char *reference, const char *answer,
                  const char *retrieved, const char *scores_json, struct lk_err *err);
/* One row of eval_retention (see the schema above); also what rdb_retention_load returns. */
struct rdb_retention {
    char system[32];         /* the system's name */
    char kind[8];            /* "learned" or "forgot" */
    char metric[48];
    double base, value;      /* the base's and the system's means (NAN: NULL) */
    double diff, lo, hi;     /* the gain or forgetting with its 95% interval */
    int64_t n;               /* items (-1: NULL) */
    int no_room;
};
int rdb_eval_retention(struct rdb *db, int64_t run_id, const struct rdb_retention *x, struct lk_err *err);
/* Statistics of one tensor (diff, svd-compress). rank < 0 and NAN values are stored as NULL. */
struct rdb_tensor_stat {
    const char *tensor;      /* borrowed: tensor name */
    int64_t rows, cols;
    int64_t rank;            /* rank of the adapter / truncation, or -1 */
    double fro_norm;         /* ||dW||_F */
    double rel_change;       /* ||dW||_F / ||W||_F */
    double eff_rank;         /* effective rank of dW */
    const char *energy_json; /* borrowed, may be NULL: e.g. ranks holding 50/90/99% energy */
    double rel_error;        /* svd-compress: ||dW - BA||_F / ||dW||_F */
    const char *extra_json;  /* borrowed, may be NULL: anything else, a JSON object */
};
int rdb_tensor_stat(struct rdb *db, int64_t run_id, const struct rdb_tensor_stat *s,
                    struct lk_err *err);

// ---- run records: the one way a command records itself ----

/* The default runs database of a command that writes `out`: runs.db in out's parent folder
 * ("runs.db" when out has no folder part). Heap string (caller lk_frees); NULL on OOM. */
char *rdb_default_path(const char *out);

/* One command's run from begin to finish. Recording never costs a run its outputs: when the
 * database cannot be opened or written, recording stops, `warning` says which run was not
 * recorded and why, and the command carries on; the caller prints the warning (libcore does
 * not print) with lk_cli_warn. A rec whose begin had path NULL records nothing, silently. */
struct rdb_rec {
    struct rdb db;       /* open while active; per-row calls (rdb_train_step, ...) use &rec->db */
    int64_t run_id;      /* valid while active */
    int active;          /* 1 from a successful begin until finish or drop */
    char kind[32];       /* for the warning */
    char warning[700];   /* non-empty once recording failed: print it */
};
struct cJSON;
/* Opens (creating) the database at path and records a 'running' run. params: a JSON object
 * built with cJSON (borrowed; NULL stores NULL). Returns LK_OK, or the status of a failure,
 * which has already been turned into `warning` (recording is then off). */
int rdb_rec_begin(struct rdb_rec *rec, const char *path, const char *kind, const char *name,
                  const char *model, const char *data, const struct cJSON *params);
/* Marks the run 'done' (rc LK_OK), 'interrupted' (LK_ERR_INTERRUPTED) or 'failed', with the
 * summary (a cJSON object, borrowed; NULL keeps none) and closes the database. Returns LK_OK
 * or the status of a failed write (then in `warning`). Harmless when not active. */
int rdb_rec_finish(struct rdb_rec *rec, int rc, const struct cJSON *summary);
/* Stops recording after a failed per-row write (err: what failed): closes the database, marks
 * the run failed if it still can, and fills `warning`. Returns err's code. */
int rdb_rec_drop(struct rdb_rec *rec, const struct lk_err *err);

// ---- reading (for the dashboard; plain SQL on db->db is fine too) ----

/* One row of runs. Strings are owned by the struct (NULL for SQL NULL). */
struct rdb_run {
    int64_t id;
    char *kind, *name, *started_at, *finished_at, *status, *model, *data;
    char *params_json, *summary_json;
};
/* All runs, newest first (by id), at most limit (<= 0: all). *out is an array of *n runs;
 * free it with rdb_runs_free. */
int rdb_runs_list(struct rdb *db, int limit, struct rdb_run **out, int *n, struct lk_err *err);
void rdb_runs_free(struct rdb_run *runs, int n);

/* The eval_retention rows of a run in the order written (a replaced row counts as written
 * last); *out is an lk_malloc'ed array of *n
 * (caller lk_frees; NULL and 0 when there is none). */
int rdb_retention_load(struct rdb *db, int64_t run_id, struct rdb_retention **out, int *n,
                       struct lk_err *err);

/* Train steps of a run with step > after_step (-1: all), in step order. Columns that are
 * NULL come back as NAN. *out is an lk_malloc'ed array of *n rows (caller lk_frees). */
struct rdb_step {
    int64_t step;
    double loss, lr, grad_norm, tokens_per_s, elapsed_s, eval_loss;
};
int rdb_train_steps_load(struct rdb *db, int64_t run_id, int64_t after_step,
                         struct rdb_step **out, int64_t *n, struct lk_err *err);

#endif
