/*
 * views.c - the dashboard's run views, one per kind of run: training curves (braille loss,
 * eval loss and learning rate with axis labels), the eval table and per-question browser,
 * the per-tensor table with bars by layer (svd-compress, diff), and key/value pages for
 * merge and any other kind. Each view loads its rows with plain SQL on the read-only
 * connection (the schema in libcore/rdb.h is the interface) and keeps no statement or
 * transaction open between frames, so a writer in WAL mode is never held back.
 * Owns: the per-view data in struct dash_app (released by dash_view_release).
 */
#include <cJSON.h>
#include <curses.h>
#include <math.h>
#include <sqlite3.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "dash_app.h"

// ---- the open run ----

const struct rdb_run *dash_cur_run(const struct dash_app *a)
{
    for (int i = 0; i < a->n_runs; i++)
        if (a->runs[i].id == a->run_id)
            return &a->runs[i];
    return NULL;
}

// ---- SQL columns ----

static char *col_dup(sqlite3_stmt *st, int i)
{
    const unsigned char *t = sqlite3_column_text(st, i);
    return lk_strdup(t ? (const char *)t : "");
}

static double col_real(sqlite3_stmt *st, int i)
{
    return sqlite3_column_type(st, i) == SQLITE_NULL ? NAN : sqlite3_column_double(st, i);
}

static int sql_fail(struct dash_app *a, struct lk_err *err, const char *what)
{
    return lk_errf(err, LK_ERR_IO, "%s: %s: %s", a->o.path, what, sqlite3_errmsg(a->db.db));
}

double dash_energy_kept(const char *energy_json, const char *extra_json)
{
    // The schema leaves energy_json free-form; accepted: a bare number, or an object with
    // "kept" / "energy_kept"; extra_json may carry "energy_kept".
    double v = dash_json_num(extra_json, "energy_kept");
    if (isfinite(v))
        return v;
    if (energy_json) {
        cJSON *o = cJSON_Parse(energy_json);
        if (cJSON_IsNumber(o))
            v = o->valuedouble;
        cJSON_Delete(o);
        if (isfinite(v))
            return v;
    }
    v = dash_json_num(energy_json, "kept");
    return isfinite(v) ? v : dash_json_num(energy_json, "energy_kept");
}

// ---- release ----

static void train_release(struct dash_train *t)
{
    lk_free(t->x);
    lk_free(t->loss);
    lk_free(t->lr);
    lk_free(t->tps);
    lk_free(t->elapsed);
    lk_free(t->ex);
    lk_free(t->ey);
    memset(t, 0, sizeof *t);
    t->last_step = -1;
}

static void eval_release(struct dash_eval *e)
{
    dash_strv_release(&e->modes);
    dash_strv_release(&e->metrics);
    dash_strv_release(&e->item_ids);
    dash_strv_release(&e->item_q);
    lk_free(e->val);
    lk_free(e->lo);
    lk_free(e->hi);
    lk_free(e->nn);
    memset(e, 0, sizeof *e);
}

static void question_release(struct dash_question *q)
{
    lk_free(q->question);
    lk_free(q->reference);
    dash_strv_release(&q->mode);
    dash_strv_release(&q->answer);
    dash_strv_release(&q->retrieved);
    dash_strv_release(&q->scores);
    memset(q, 0, sizeof *q);
}

void dash_view_release(struct dash_app *a)
{
    train_release(&a->train);
    eval_release(&a->eval);
    dash_tradeoff_release(&a->tradeoff);
    question_release(&a->q);
    for (int i = 0; i < a->n_tensors; i++)
        lk_free(a->tensors[i].name);
    lk_free(a->tensors);
    a->tensors = NULL;
    a->n_tensors = 0;
    lk_free(a->layers);
    a->layers = NULL;
    a->n_layers = 0;
    dash_strv_release(&a->lines);
}

// ---- training ----

static int train_grow(struct dash_train *t, int64_t need)
{
    if (need <= t->cap)
        return LK_OK;
    int64_t ncap = t->cap ? t->cap : 1024;
    while (ncap < need)
        ncap *= 2;
    double **arrs[] = { &t->x, &t->loss, &t->lr, &t->tps, &t->elapsed };
    for (size_t i = 0; i < sizeof arrs / sizeof arrs[0]; i++) {
        double *p = lk_realloc(*arrs[i], sizeof(double) * (size_t)ncap);
        if (!p)
            return LK_ERR_NOMEM;
        *arrs[i] = p;
    }
    t->cap = ncap;
    return LK_OK;
}

static int train_push_eval(struct dash_train *t, double step, double v)
{
    if (t->n_ev == t->cap_ev) {
        int64_t nc = t->cap_ev ? t->cap_ev * 2 : 64;
        double *ex = lk_realloc(t->ex, sizeof(double) * (size_t)nc);
        if (!ex)
            return LK_ERR_NOMEM;
        t->ex = ex;
        double *ey = lk_realloc(t->ey, sizeof(double) * (size_t)nc);
        if (!ey)
            return LK_ERR_NOMEM;
        t->ey = ey;
        t->cap_ev = nc;
    }
    t->ex[t->n_ev] = step;
    t->ey[t->n_ev++] = v;
    return LK_OK;
}

/* Appends the steps after the last one loaded (all of them the first time). Plain SQL with
 * only the columns drawn, straight into the plot arrays: loading is what the first frame of
 * a long run costs (bench/bench_dash.c), so no intermediate array of rows. */
static int train_load_more(struct dash_app *a, struct lk_err *err)
{
    struct dash_train *t = &a->train;
    sqlite3_stmt *st;
    if (sqlite3_prepare_v2(a->db.db,
                           "SELECT step, loss, lr, tokens_per_s, elapsed_s, eval_loss FROM train_steps"
                           " WHERE run_id = ?1 AND step > ?2 ORDER BY step", -1, &st, NULL) != SQLITE_OK)
        return sql_fail(a, err, "reading train steps");
    sqlite3_bind_int64(st, 1, a->run_id);
    sqlite3_bind_int64(st, 2, t->last_step);
    int rc, oom = 0;
    while ((rc = sqlite3_step(st)) == SQLITE_ROW) {
        if (train_grow(t, t->n + 1)) {
            oom = 1;
            break;
        }
        int64_t k = t->n++;
        int64_t step = sqlite3_column_int64(st, 0);
        t->x[k] = (double)step;
        t->loss[k] = col_real(st, 1);
        t->lr[k] = col_real(st, 2);
        t->tps[k] = col_real(st, 3);
        t->elapsed[k] = col_real(st, 4);
        t->last_step = step;
        if (sqlite3_column_type(st, 5) != SQLITE_NULL && train_push_eval(t, (double)step, sqlite3_column_double(st, 5))) {
            oom = 1;
            break;
        }
    }
    sqlite3_finalize(st);
    if (oom)
        return lk_errf(err, LK_ERR_NOMEM, "out of memory for %lld steps", (long long)t->n);
    if (rc != SQLITE_DONE)
        return sql_fail(a, err, "reading train steps");
    return LK_OK;
}

static void series_range(const double *y, int64_t n, double *lo, double *hi)
{
    for (int64_t i = 0; i < n; i++) {
        if (isnan(y[i]))
            continue;
        if (isnan(*lo) || y[i] < *lo)
            *lo = y[i];
        if (isnan(*hi) || y[i] > *hi)
            *hi = y[i];
    }
}

/* One plot: a label row, h canvas rows with the y range at the left, an x axis row.
 * Series 2 (optional) is drawn over series 1 in its own colour. */
static void draw_plot(struct dash_app *a, int y, int h, const char *label, const double *x, int64_t n,
                      const double *y1, int pair1, const double *x2, const double *y2, int64_t n2,
                      int pair2, const char *label2)
{
    const int gutter = 11;
    int w = COLS - gutter - 1;
    if (w < 4 || h < 1)
        return;
    double ymin = NAN, ymax = NAN;
    series_range(y1, n, &ymin, &ymax);
    if (y2)
        series_range(y2, n2, &ymin, &ymax);
    int x0 = 0;
    dash_attr_on(a->colors, pair1, 1);
    x0 += dash_put(y, 1, COLS - 1, label);
    dash_attr_off(a->colors, pair1, 1);
    if (label2) {
        dash_attr_on(a->colors, pair2, 1);
        dash_put(y, x0 + 3, COLS - x0 - 3, label2);
        dash_attr_off(a->colors, pair2, 1);
    }
    if (n == 0 || isnan(ymin)) {
        dash_put(y + 1, gutter, w, "(no values yet)");
        return;
    }
    struct dash_canvas c;
    struct lk_err err = { 0 };
    double *lo = lk_malloc(sizeof(double) * (size_t)(4 * w));
    if (!lo || dash_canvas_init(&c, w, h, &err)) {
        lk_free(lo);
        return;
    }
    double *hi = lo + 2 * w;
    double xa = x[0], xb = x[n - 1];
    dash_downsample(x, y1, n, xa, xb, 2 * w, lo, hi);
    dash_canvas_series(&c, lo, hi, ymin, ymax, 1);
    if (y2 && n2) {
        dash_downsample(x2, y2, n2, xa, xb, 2 * w, lo, hi);
        dash_canvas_series(&c, lo, hi, ymin, ymax, 2);
    }
    char num[32];
    for (int r = 0; r < h; r++) {
        int yy = y + 1 + r;
        if (r == 0 || r == h - 1) {
            dash_fmt_num(r == 0 ? ymax : ymin, num, sizeof num);
            dash_putf(yy, 0, gutter - 1, "%*s", gutter - 1, num);
        }
        mvaddstr(yy, gutter - 1, "\xe2\x94\x82"); // │
        for (int cx = 0; cx < w; cx++) {
            size_t i = (size_t)r * (size_t)w + (size_t)cx;
            if (!c.dots[i])
                continue;
            char cell[4];
            dash_braille_utf8(c.dots[i], cell);
            int pair = c.tag[i] == 2 ? pair2 : pair1;
            dash_attr_on(a->colors, pair, 0);
            mvaddstr(yy, gutter + cx, cell);
            dash_attr_off(a->colors, pair, 0);
        }
    }
    // x axis: first and last step at the ends of the canvas
    char first[32], last[32];
    snprintf(first, sizeof first, "%.0f", xa);
    snprintf(last, sizeof last, "%.0f", xb);
    int ya = y + 1 + h;
    mvaddstr(ya, gutter - 1, "\xe2\x94\x94"); // └
    dash_put(ya, gutter, w, first);
    int lw = (int)strlen(last);
    dash_put(ya, gutter + w - lw, lw, last);
    dash_put(ya, gutter + w / 2 - 2, 4, "step");
    dash_canvas_release(&c);
    lk_free(lo);
}

static void draw_train(struct dash_app *a, const struct rdb_run *run, int y0, int h)
{
    struct dash_train *t = &a->train;
    char num[32], num2[32], dur[32];
    int y = y0;
    // title: what ran and how it went
    double first = NAN, last = NAN, tps_sum = 0, tps_last = NAN;
    int64_t tps_n = 0;
    for (int64_t i = 0; i < t->n; i++) {
        if (!isnan(t->loss[i])) {
            if (isnan(first))
                first = t->loss[i];
            last = t->loss[i];
        }
        if (!isnan(t->tps[i])) {
            tps_sum += t->tps[i];
            tps_n++;
            tps_last = t->tps[i];
        }
    }
    dash_fmt_num(first, num, sizeof num);
    dash_fmt_num(last, num2, sizeof num2);
    dash_fmt_duration(dash_run_seconds(run), dur, sizeof dur);
    attron(A_BOLD);
    int used = dash_putf(y, 0, COLS, "train #%lld %s  ", (long long)run->id, run->name);
    attroff(A_BOLD);
    int pair = !strcmp(run->status, "done") ? DASH_C_GOOD : !strcmp(run->status, "running") ? DASH_C_WARN : DASH_C_BAD;
    dash_attr_on(a->colors, pair, 1);
    used += dash_put(y, used, COLS - used, run->status);
    dash_attr_off(a->colors, pair, 1);
    double steps_planned = dash_json_num(run->params_json, "steps");
    char planned[32] = "";
    if (isfinite(steps_planned))
        snprintf(planned, sizeof planned, "/%.0f", steps_planned);
    dash_putf(y, used, COLS - used, "  step %lld%s  %s  loss %s -> %s", (long long)t->last_step,
              planned, dur, num, num2);
    y++;
    char tps[32], tpsl[32];
    dash_fmt_num(tps_n ? tps_sum / (double)tps_n : NAN, tps, sizeof tps);
    dash_fmt_num(tps_last, tpsl, sizeof tpsl);
    if (t->n_ev)
        dash_fmt_num(t->ey[t->n_ev - 1], num, sizeof num);
    dash_putf(y, 0, COLS, "tokens/s %s mean, %s last  %s%s  model %s  data %s", tps, tpsl,
              t->n_ev ? "eval loss " : "", t->n_ev ? num : "", run->model ? run->model : "-",
              run->data ? run->data : "-");
    y++;
    int avail = y0 + h - y;
    // parameters pane at the bottom, 3..8 rows
    struct dash_strv items = { 0 };
    int pw = COLS - 2;
    // flow "k=v" items into rows
    struct dash_strv prow = { 0 };
    char row[1024] = "";
    int rw = 0;
    for (int i = 0; i < a->lines.n; i++) {
        int iw = dash_str_width(a->lines.v[i]);
        if (rw && rw + 2 + iw > pw) {
            dash_strv_push(&prow, row);
            row[0] = 0;
            rw = 0;
        }
        size_t rl = strlen(row);
        snprintf(row + rl, sizeof row - rl, "%s%s", rw ? "  " : "", a->lines.v[i]);
        rw += (rw ? 2 : 0) + iw;
    }
    if (rw)
        dash_strv_push(&prow, row);
    dash_strv_release(&items);
    int ph = prow.n + 1;
    int cap = avail / 4 < 3 ? 3 : avail / 4;
    if (ph > cap)
        ph = cap;
    if (ph > 8)
        ph = 8;
    int plots = avail - ph;
    int lr_h = plots >= 12 ? plots * 2 / 5 : 0;
    int loss_h = plots - lr_h;
    if (loss_h >= 3) {
        draw_plot(a, y, loss_h - 2, "loss", t->x, t->n, t->loss, DASH_C_LOSS, t->ex, t->ey, t->n_ev,
                  DASH_C_EVAL, t->n_ev ? "eval loss" : NULL);
        y += loss_h;
    }
    if (lr_h >= 3) {
        draw_plot(a, y, lr_h - 2, "learning rate", t->x, t->n, t->lr, DASH_C_LR, NULL, NULL, 0, 0, NULL);
        y += lr_h;
    }
    if (a->pane == 1)
        attron(A_REVERSE);
    dash_putf(y, 0, COLS, " parameters (%d) ", a->lines.n);
    if (a->pane == 1)
        attroff(A_REVERSE);
    int rows = ph - 1;
    if (a->ptop[1] > prow.n - rows)
        a->ptop[1] = prow.n - rows > 0 ? prow.n - rows : 0;
    for (int i = 0; i < rows && a->ptop[1] + i < prow.n; i++)
        dash_put(y + 1 + i, 1, COLS - 1, prow.v[a->ptop[1] + i]);
    dash_strv_release(&prow);
}

// ---- eval ----

static int strv_find(const struct dash_strv *s, const char *x)
{
    for (int i = 0; i < s->n; i++)
        if (!strcmp(s->v[i], x))
            return i;
    return -1;
}

static int eval_load(struct dash_app *a, struct lk_err *err)
{
    struct dash_eval *e = &a->eval;
    int keep_col = e->col;
    eval_release(e);
    e->col = keep_col;
    sqlite3_stmt *st;
    // modes in their standard order, metrics in first-seen order
    if (sqlite3_prepare_v2(a->db.db,
                           "SELECT mode, metric, value, lo, hi, n FROM eval_results WHERE run_id = ?1"
                           " ORDER BY CASE WHEN mode = 'base' THEN 0 WHEN mode = 'rag' THEN 1 WHEN mode = 'ft'"
                           " THEN 2 WHEN mode = 'ft+rag' THEN 3 WHEN mode LIKE '% - %' THEN 5 ELSE 4 END, rowid",
                           -1, &st, NULL) != SQLITE_OK)
        return sql_fail(a, err, "reading eval results");
    sqlite3_bind_int64(st, 1, a->run_id);
    // two passes over a small result: collect names, then fill the matrix
    struct { char *mode, *metric; double v, lo, hi; int64_t n; } *rows = NULL;
    int nr = 0, cr = 0, rc;
    while ((rc = sqlite3_step(st)) == SQLITE_ROW) {
        if (nr == cr) {
            cr = cr ? 2 * cr : 32;
            void *p = lk_realloc(rows, sizeof *rows * (size_t)cr);
            if (!p)
                break;
            rows = p;
        }
        rows[nr].mode = col_dup(st, 0);
        rows[nr].metric = col_dup(st, 1);
        rows[nr].v = col_real(st, 2);
        rows[nr].lo = col_real(st, 3);
        rows[nr].hi = col_real(st, 4);
        rows[nr].n = sqlite3_column_type(st, 5) == SQLITE_NULL ? -1 : sqlite3_column_int64(st, 5);
        nr++;
    }
    sqlite3_finalize(st);
    int r = LK_OK;
    for (int i = 0; i < nr && !r; i++) {
        if (strv_find(&e->modes, rows[i].mode) < 0 && dash_strv_push(&e->modes, rows[i].mode))
            r = LK_ERR_NOMEM;
        if (strv_find(&e->metrics, rows[i].metric) < 0 && dash_strv_push(&e->metrics, rows[i].metric))
            r = LK_ERR_NOMEM;
    }
    size_t cells = (size_t)e->modes.n * (size_t)e->metrics.n;
    if (!r && cells) {
        e->val = lk_malloc(sizeof(double) * cells);
        e->lo = lk_malloc(sizeof(double) * cells);
        e->hi = lk_malloc(sizeof(double) * cells);
        e->nn = lk_malloc(sizeof(int64_t) * cells);
        if (!e->val || !e->lo || !e->hi || !e->nn)
            r = LK_ERR_NOMEM;
        for (size_t i = 0; !r && i < cells; i++) {
            e->val[i] = e->lo[i] = e->hi[i] = NAN;
            e->nn[i] = -1;
        }
        for (int i = 0; !r && i < nr; i++) {
            size_t k = (size_t)strv_find(&e->modes, rows[i].mode) * (size_t)e->metrics.n +
                       (size_t)strv_find(&e->metrics, rows[i].metric);
            e->val[k] = rows[i].v;
            e->lo[k] = rows[i].lo;
            e->hi[k] = rows[i].hi;
            e->nn[k] = rows[i].n;
        }
    }
    for (int i = 0; i < nr; i++) {
        lk_free(rows[i].mode);
        lk_free(rows[i].metric);
    }
    lk_free(rows);
    if (r)
        return lk_errf(err, LK_ERR_NOMEM, "out of memory reading eval results");
    if (rc != SQLITE_DONE && rc != SQLITE_ROW)
        return sql_fail(a, err, "reading eval results");
    // the questions, in the order they were recorded
    if (sqlite3_prepare_v2(a->db.db,
                           "SELECT item_id, max(question) FROM eval_items WHERE run_id = ?1"
                           " GROUP BY item_id ORDER BY min(rowid)", -1, &st, NULL) != SQLITE_OK)
        return sql_fail(a, err, "reading eval items");
    sqlite3_bind_int64(st, 1, a->run_id);
    while ((rc = sqlite3_step(st)) == SQLITE_ROW) {
        const unsigned char *id = sqlite3_column_text(st, 0), *q = sqlite3_column_text(st, 1);
        if (dash_strv_push(&e->item_ids, (const char *)id) ||
            dash_strv_push(&e->item_q, q ? (const char *)q : "")) {
            sqlite3_finalize(st);
            return lk_errf(err, LK_ERR_NOMEM, "out of memory reading eval items");
        }
    }
    sqlite3_finalize(st);
    if (rc != SQLITE_DONE)
        return sql_fail(a, err, "reading eval items");
    return LK_OK;
}

static int item_matches(const struct dash_app *a, int i)
{
    return !a->filter[0] || strstr(a->eval.item_ids.v[i], a->filter) ||
           strstr(a->eval.item_q.v[i], a->filter);
}

static void draw_eval(struct dash_app *a, const struct rdb_run *run, int y0, int h)
{
    struct dash_eval *e = &a->eval;
    int y = y0;
    attron(A_BOLD);
    int used = dash_putf(y, 0, COLS, "eval #%lld %s  ", (long long)run->id, run->name);
    attroff(A_BOLD);
    int n_modes = 0, n_diffs = 0; // the paired differences ("a - b") are rows, not modes
    for (int i = 0; i < e->modes.n; i++)
        strstr(e->modes.v[i], " - ") ? n_diffs++ : n_modes++;
    dash_putf(y, used, COLS - used, "%s  %d modes, %d difference%s x %d metrics  %d questions  model %s",
              run->status, n_modes, n_diffs, n_diffs == 1 ? "" : "s", e->metrics.n, e->item_ids.n,
              run->model ? run->model : "-");
    y++;
    char verdict[512];
    if (dash_json_str(run->summary_json, "verdict", verdict, sizeof verdict)) {
        dash_attr_on(a->colors, DASH_C_GOOD, 1);
        dash_putf(y, 0, COLS, "verdict: %s", verdict);
        dash_attr_off(a->colors, DASH_C_GOOD, 1);
    } else {
        dash_put(y, 0, COLS, "verdict: (none recorded)");
    }
    y++;
    // the table: modes down (then the differences "a - b"), metrics across, "value [lo, hi]";
    // beside the chart, the modes only
    int chart = a->tradeoff.n && a->tradeoff.show, w_mode = 9, n_rows = e->modes.n;
    for (int i = 0; i < e->modes.n; i++) {
        int diff = strstr(e->modes.v[i], " - ") != NULL, len = (int)strlen(e->modes.v[i]) + 1;
        if (!diff && len > w_mode)
            w_mode = len < 24 ? len : 24;
        if (diff && chart && n_rows == e->modes.n)
            n_rows = i;
    }
    const int w_n = 6, w_cell = 22;
    int ncol = (COLS - w_mode - w_n) / w_cell;
    if (ncol < 1)
        ncol = 1;
    if (e->col > e->metrics.n - ncol)
        e->col = e->metrics.n - ncol > 0 ? e->metrics.n - ncol : 0;
    if (a->pane == 0)
        attron(A_REVERSE);
    dash_put(y, 0, w_mode, "mode");
    dash_put(y, w_mode, w_n, "n");
    for (int j = 0; j < ncol && e->col + j < e->metrics.n; j++)
        dash_put(y, w_mode + w_n + j * w_cell, w_cell - 1, e->metrics.v[e->col + j]);
    if (a->pane == 0)
        attroff(A_REVERSE);
    if (e->col > 0 || e->col + ncol < e->metrics.n)
        dash_putf(y, COLS - 8, 8, " %s%d/%d%s", e->col > 0 ? "<" : "", e->col + 1, e->metrics.n,
                  e->col + ncol < e->metrics.n ? ">" : "");
    y++;
    int last = chart && y0 + h - 14 > y + 3 ? y0 + h - 14 : y0 + h - 3; // the chart keeps 14 rows
    for (int i = 0; i < n_rows && y < last; i++, y++) {
        dash_attr_on(a->colors, DASH_C_LOSS, 1);
        dash_put(y, 0, w_mode - 1, e->modes.v[i]);
        dash_attr_off(a->colors, DASH_C_LOSS, 1);
        int64_t nmax = -1;
        for (int j = 0; j < e->metrics.n; j++)
            if (e->nn[i * e->metrics.n + j] > nmax)
                nmax = e->nn[i * e->metrics.n + j];
        if (nmax >= 0)
            dash_putf(y, w_mode, w_n - 1, "%lld", (long long)nmax);
        for (int j = 0; j < ncol && e->col + j < e->metrics.n; j++) {
            size_t k = (size_t)i * (size_t)e->metrics.n + (size_t)(e->col + j);
            char cell[96];
            if (isnan(e->val[k]))
                snprintf(cell, sizeof cell, "-");
            else if (isnan(e->lo[k]) || isnan(e->hi[k]))
                snprintf(cell, sizeof cell, "%.3f", e->val[k]);
            else
                snprintf(cell, sizeof cell, "%.3f [%.3f, %.3f]", e->val[k], e->lo[k], e->hi[k]);
            dash_put(y, w_mode + w_n + j * w_cell, w_cell - 1, cell);
        }
    }
    y++;
    if (a->tradeoff.n && a->tradeoff.show) {
        dash_tradeoff_draw(a, &a->tradeoff, y, y0 + h - y);
        return;
    }
    // the questions
    int rows = y0 + h - y - 1;
    if (rows < 1)
        return;
    int *vis = lk_malloc(sizeof(int) * (size_t)(e->item_ids.n + 1));
    if (!vis)
        return;
    int nv = 0;
    for (int i = 0; i < e->item_ids.n; i++)
        if (item_matches(a, i))
            vis[nv++] = i;
    if (a->pane == 1)
        attron(A_REVERSE);
    dash_putf(y, 0, COLS, " questions (%d%s) - Enter to compare answers ", nv, a->filter[0] ? " matching" : "");
    if (a->pane == 1)
        attroff(A_REVERSE);
    y++;
    int *sel = &a->psel[1], *top = &a->ptop[1];
    if (*sel >= nv)
        *sel = nv ? nv - 1 : 0;
    if (*sel < *top)
        *top = *sel;
    if (*sel >= *top + rows)
        *top = *sel - rows + 1;
    for (int i = 0; i < rows && *top + i < nv; i++) {
        int k = vis[*top + i];
        int selected = *top + i == *sel && a->pane == 1;
        if (selected) {
            attron(A_REVERSE);
            mvhline(y + i, 0, ' ', COLS);
        }
        dash_put(y + i, 1, 10, e->item_ids.v[k]);
        dash_put(y + i, 12, COLS - 12, e->item_q.v[k]);
        if (selected)
            attroff(A_REVERSE);
    }
    lk_free(vis);
}

int dash_question_open(struct dash_app *a, int idx, struct lk_err *err)
{
    struct dash_question *q = &a->q;
    question_release(q);
    if (idx < 0 || idx >= a->eval.item_ids.n)
        return LK_OK;
    q->idx = idx;
    sqlite3_stmt *st;
    if (sqlite3_prepare_v2(a->db.db,
                           "SELECT mode, question, reference, answer, retrieved, scores_json"
                           " FROM eval_items WHERE run_id = ?1 AND item_id = ?2"
                           " ORDER BY CASE mode WHEN 'base' THEN 0 WHEN 'rag' THEN 1 WHEN 'ft' THEN 2"
                           " WHEN 'ft+rag' THEN 3 ELSE 4 END, mode", -1, &st, NULL) != SQLITE_OK)
        return sql_fail(a, err, "reading a question");
    sqlite3_bind_int64(st, 1, a->run_id);
    sqlite3_bind_text(st, 2, a->eval.item_ids.v[idx], -1, SQLITE_TRANSIENT);
    int rc, oom = 0;
    while ((rc = sqlite3_step(st)) == SQLITE_ROW) {
        if (!q->question && sqlite3_column_type(st, 1) != SQLITE_NULL)
            q->question = col_dup(st, 1);
        if (!q->reference && sqlite3_column_type(st, 2) != SQLITE_NULL)
            q->reference = col_dup(st, 2);
        const char *cols[4];
        for (int i = 0; i < 4; i++) {
            const unsigned char *t = sqlite3_column_text(st, i == 0 ? 0 : i + 2);
            cols[i] = t ? (const char *)t : "";
        }
        oom |= dash_strv_push(&q->mode, cols[0]) | dash_strv_push(&q->answer, cols[1]) |
               dash_strv_push(&q->retrieved, cols[2]) | dash_strv_push(&q->scores, cols[3]);
    }
    sqlite3_finalize(st);
    if (oom)
        return lk_errf(err, LK_ERR_NOMEM, "out of memory reading a question");
    if (rc != SQLITE_DONE)
        return sql_fail(a, err, "reading a question");
    return LK_OK;
}

/* Retrieved passages as display lines: a JSON array of strings or of objects with a text
 * field ("text", "passage", "content") and maybe "title"/"score"; anything else verbatim. */
static void passages(const char *ret, int w, struct dash_strv *out)
{
    if (!ret || !*ret)
        return;
    cJSON *o = cJSON_Parse(ret);
    if (!cJSON_IsArray(o)) {
        cJSON_Delete(o);
        dash_wrap(ret, w, out);
        return;
    }
    int k = 0;
    for (const cJSON *it = o->child; it; it = it->next) {
        char buf[4096];
        k++;
        if (cJSON_IsString(it)) {
            snprintf(buf, sizeof buf, "[%d] %s", k, it->valuestring);
        } else if (cJSON_IsObject(it)) {
            const char *keys[] = { "text", "passage", "content", "body" };
            const char *text = NULL, *title = NULL;
            for (int i = 0; i < 4 && !text; i++) {
                const cJSON *t = cJSON_GetObjectItemCaseSensitive(it, keys[i]);
                if (cJSON_IsString(t))
                    text = t->valuestring;
            }
            const cJSON *ti = cJSON_GetObjectItemCaseSensitive(it, "title");
            if (cJSON_IsString(ti))
                title = ti->valuestring;
            const cJSON *sc = cJSON_GetObjectItemCaseSensitive(it, "score");
            char s[32] = "";
            if (cJSON_IsNumber(sc))
                snprintf(s, sizeof s, " (%.3g)", sc->valuedouble);
            if (text)
                snprintf(buf, sizeof buf, "[%d]%s%s%s %s", k, title ? " " : "", title ? title : "", s, text);
            else {
                char *t = cJSON_PrintUnformatted(it);
                snprintf(buf, sizeof buf, "[%d] %s", k, t ? t : "");
                cJSON_free(t);
            }
        } else {
            char *t = cJSON_PrintUnformatted(it);
            snprintf(buf, sizeof buf, "[%d] %s", k, t ? t : "");
            cJSON_free(t);
        }
        dash_wrap(buf, w, out);
    }
    cJSON_Delete(o);
}

static void draw_question(struct dash_app *a, const struct rdb_run *run, int y0, int h)
{
    struct dash_question *q = &a->q;
    int y = y0;
    attron(A_BOLD);
    dash_putf(y, 0, COLS, "eval #%lld %s  question %d/%d  %s", (long long)run->id, run->name, q->idx + 1,
              a->eval.item_ids.n, a->eval.item_ids.n ? a->eval.item_ids.v[q->idx] : "");
    attroff(A_BOLD);
    y++;
    struct dash_strv l = { 0 };
    char buf[8192];
    snprintf(buf, sizeof buf, "Q: %s", q->question ? q->question : "");
    dash_wrap(buf, COLS - 1, &l);
    for (int i = 0; i < l.n && i < 4; i++)
        dash_put(y++, 0, COLS, l.v[i]);
    dash_strv_release(&l);
    snprintf(buf, sizeof buf, "reference: %s", q->reference ? q->reference : "");
    dash_wrap(buf, COLS - 1, &l);
    dash_attr_on(a->colors, DASH_C_GOOD, 0);
    for (int i = 0; i < l.n && i < 3; i++)
        dash_put(y++, 0, COLS, l.v[i]);
    dash_attr_off(a->colors, DASH_C_GOOD, 0);
    dash_strv_release(&l);
    int nm = q->mode.n;
    if (nm == 0) {
        dash_put(y + 1, 2, COLS - 2, "(no answers recorded for this question)");
        return;
    }
    // one column per mode, side by side: answer, scores, retrieved passages
    int cw = COLS / nm;
    if (cw < 8)
        cw = 8;
    int rows = y0 + h - y - 1;
    int maxlen = 0;
    struct dash_strv *cols = lk_calloc((size_t)nm, sizeof *cols);
    if (!cols)
        return;
    for (int m = 0; m < nm; m++) {
        dash_wrap(q->answer.v[m], cw - 2, &cols[m]);
        if (q->scores.v[m][0]) {
            struct dash_strv kv = { 0 };
            dash_json_flatten(q->scores.v[m], &kv);
            char line[1024] = "";
            for (int i = 0; i < kv.n; i++) {
                size_t ll = strlen(line);
                snprintf(line + ll, sizeof line - ll, "%s%s", i ? " " : "", kv.v[i]);
            }
            dash_strv_release(&kv);
            dash_strv_push(&cols[m], "");
            dash_wrap(line, cw - 2, &cols[m]);
        }
        if (q->retrieved.v[m][0]) {
            dash_strv_push(&cols[m], "");
            dash_strv_push(&cols[m], "retrieved:");
            passages(q->retrieved.v[m], cw - 2, &cols[m]);
        }
        if (cols[m].n > maxlen)
            maxlen = cols[m].n;
    }
    if (a->scroll > maxlen - rows)
        a->scroll = maxlen - rows > 0 ? maxlen - rows : 0;
    for (int m = 0; m < nm; m++) {
        dash_attr_on(a->colors, DASH_C_LOSS, 1);
        dash_put(y, m * cw, cw - 1, q->mode.v[m]);
        dash_attr_off(a->colors, DASH_C_LOSS, 1);
        for (int i = 0; i < rows - 1 && a->scroll + i < cols[m].n; i++) {
            const char *s = cols[m].v[a->scroll + i];
            int dim = !strcmp(s, "retrieved:");
            if (dim)
                dash_attr_on(a->colors, DASH_C_EVAL, 0);
            dash_put(y + 1 + i, m * cw, cw - 2, s);
            if (dim)
                dash_attr_off(a->colors, DASH_C_EVAL, 0);
        }
        if (m > 0)
            for (int i = 0; i < rows; i++)
                mvaddstr(y + i, m * cw - 1, "\xe2\x94\x82");
        dash_strv_release(&cols[m]);
    }
    lk_free(cols);
}

// ---- tensors (svd-compress, diff) ----

static int layer_of(const char *name)
{
    const char *p = strstr(name, "layers.");
    if (!p)
        p = strstr(name, "h.");
    if (!p)
        return -1;
    p = strchr(p, '.') + 1;
    if (*p < '0' || *p > '9')
        return -1;
    return atoi(p);
}

static int tensors_load(struct dash_app *a, struct lk_err *err)
{
    for (int i = 0; i < a->n_tensors; i++)
        lk_free(a->tensors[i].name);
    lk_free(a->tensors);
    lk_free(a->layers);
    a->tensors = NULL;
    a->layers = NULL;
    a->n_tensors = a->n_layers = 0;
    sqlite3_stmt *st;
    if (sqlite3_prepare_v2(a->db.db,
                           "SELECT tensor, rows, cols, rank, fro_norm, rel_change, eff_rank, energy_json,"
                           " rel_error, extra_json FROM tensor_stats WHERE run_id = ?1 ORDER BY rowid",
                           -1, &st, NULL) != SQLITE_OK)
        return sql_fail(a, err, "reading tensor statistics");
    sqlite3_bind_int64(st, 1, a->run_id);
    int cap = 0, rc, oom = 0;
    while ((rc = sqlite3_step(st)) == SQLITE_ROW) {
        if (a->n_tensors == cap) {
            cap = cap ? cap * 2 : 64;
            struct dash_tensor *p = lk_realloc(a->tensors, sizeof *p * (size_t)cap);
            if (!p) {
                oom = 1;
                break;
            }
            a->tensors = p;
        }
        struct dash_tensor *t = &a->tensors[a->n_tensors];
        t->name = col_dup(st, 0);
        if (!t->name) {
            oom = 1;
            break;
        }
        a->n_tensors++;
        t->rows = sqlite3_column_int64(st, 1);
        t->cols = sqlite3_column_int64(st, 2);
        t->rank = sqlite3_column_type(st, 3) == SQLITE_NULL ? -1 : sqlite3_column_int64(st, 3);
        t->fro = col_real(st, 4);
        t->rel_change = col_real(st, 5);
        t->eff_rank = col_real(st, 6);
        t->energy = dash_energy_kept((const char *)sqlite3_column_text(st, 7),
                                     (const char *)sqlite3_column_text(st, 9));
        t->rel_error = col_real(st, 8);
        t->layer = layer_of(t->name);
    }
    sqlite3_finalize(st);
    if (oom)
        return lk_errf(err, LK_ERR_NOMEM, "out of memory reading tensor statistics");
    if (rc != SQLITE_DONE)
        return sql_fail(a, err, "reading tensor statistics");
    // by layer: max relative change, mean energy kept, mean rank
    int maxl = -1;
    for (int i = 0; i < a->n_tensors; i++)
        if (a->tensors[i].layer > maxl)
            maxl = a->tensors[i].layer;
    if (maxl < 0)
        return LK_OK;
    if (maxl > 100000)
        maxl = 100000;
    a->layers = lk_calloc((size_t)maxl + 1, sizeof *a->layers);
    double *ecnt = lk_calloc((size_t)maxl + 1, sizeof(double) * 2);
    if (!a->layers || !ecnt) {
        lk_free(ecnt);
        return lk_errf(err, LK_ERR_NOMEM, "out of memory");
    }
    double *rcnt = ecnt + maxl + 1;
    a->n_layers = maxl + 1;
    for (int l = 0; l <= maxl; l++) {
        a->layers[l].layer = l;
        a->layers[l].rel_max = a->layers[l].energy_mean = a->layers[l].rank_mean = NAN;
    }
    for (int i = 0; i < a->n_tensors; i++) {
        const struct dash_tensor *t = &a->tensors[i];
        if (t->layer < 0 || t->layer > maxl)
            continue;
        struct dash_layer *L = &a->layers[t->layer];
        if (!isnan(t->rel_change) && (isnan(L->rel_max) || t->rel_change > L->rel_max))
            L->rel_max = t->rel_change;
        if (!isnan(t->energy)) {
            L->energy_mean = isnan(L->energy_mean) ? t->energy : L->energy_mean + t->energy;
            ecnt[t->layer]++;
        }
        if (t->rank >= 0) {
            L->rank_mean = isnan(L->rank_mean) ? (double)t->rank : L->rank_mean + (double)t->rank;
            rcnt[t->layer]++;
        }
    }
    for (int l = 0; l <= maxl; l++) {
        if (ecnt[l] > 0)
            a->layers[l].energy_mean /= ecnt[l];
        if (rcnt[l] > 0)
            a->layers[l].rank_mean /= rcnt[l];
    }
    lk_free(ecnt);
    return LK_OK;
}

static const char *const bar_names[3] = { "max relative change", "mean energy kept", "mean rank" };

static double layer_value(const struct dash_layer *L, int metric)
{
    return metric == 0 ? L->rel_max : metric == 1 ? L->energy_mean : L->rank_mean;
}

static int tensor_matches(const struct dash_app *a, int i)
{
    return !a->filter[0] || strstr(a->tensors[i].name, a->filter);
}

static const char *short_name(const char *n)
{
    const char *pre[] = { "base_model.model.model.", "base_model.model.", "model." };
    for (int i = 0; i < 3; i++)
        if (!strncmp(n, pre[i], strlen(pre[i])))
            return n + strlen(pre[i]);
    return n;
}

static void draw_tensors(struct dash_app *a, const struct rdb_run *run, int y0, int h)
{
    int y = y0;
    double maxrel = NAN;
    const char *maxname = "";
    for (int i = 0; i < a->n_tensors; i++)
        if (!isnan(a->tensors[i].rel_change) && (isnan(maxrel) || a->tensors[i].rel_change > maxrel)) {
            maxrel = a->tensors[i].rel_change;
            maxname = a->tensors[i].name;
        }
    char num[32];
    dash_fmt_num(maxrel, num, sizeof num);
    attron(A_BOLD);
    int used = dash_putf(y, 0, COLS, "%s #%lld %s  ", run->kind, (long long)run->id, run->name);
    attroff(A_BOLD);
    dash_putf(y, used, COLS - used, "%s  %d tensors  max rel change %s %s", run->status, a->n_tensors, num,
              short_name(maxname));
    y++;
    struct dash_strv sum = { 0 };
    dash_json_flatten(run->summary_json, &sum);
    char line[1024] = "";
    for (int i = 0; i < sum.n; i++) {
        size_t ll = strlen(line);
        snprintf(line + ll, sizeof line - ll, "%s%s", i ? "  " : "", sum.v[i]);
    }
    dash_strv_release(&sum);
    dash_put(y++, 0, COLS, line[0] ? line : "(no summary)");
    int avail = y0 + h - y;
    int bars_h = a->n_layers ? (avail / 2 < a->n_layers + 1 ? avail / 2 : a->n_layers + 1) : 0;
    if (bars_h < 3 && a->n_layers)
        bars_h = avail >= 6 ? 3 : 0;
    int table_h = avail - bars_h;
    // the table
    const int w_shape = 9, w_num = 8;
    int n_num = COLS >= 110 ? 5 : 4; // ||dW|| only when there is room
    int w_name = COLS - (1 + w_shape + 1 + 5) - n_num * (w_num + 1);
    if (w_name < 10)
        w_name = 10;
    if (a->pane == 0)
        attron(A_REVERSE);
    dash_putf(y, 0, COLS, "%-*.*s %*s %5s %*s %*s %*s %*s %*s", w_name, w_name, "tensor", w_shape, "shape", "rank",
              w_num, "rel.chg", w_num, "eff.rank", w_num, "energy", w_num, "rel.err", n_num > 4 ? w_num : 0,
              n_num > 4 ? "||dW||" : "");
    if (a->pane == 0)
        attroff(A_REVERSE);
    y++;
    int rows = table_h - 1;
    int *vis = lk_malloc(sizeof(int) * (size_t)(a->n_tensors + 1));
    if (!vis)
        return;
    int nv = 0;
    for (int i = 0; i < a->n_tensors; i++)
        if (tensor_matches(a, i))
            vis[nv++] = i;
    int *sel = &a->psel[0], *top = &a->ptop[0];
    if (*sel >= nv)
        *sel = nv ? nv - 1 : 0;
    if (*sel < *top)
        *top = *sel;
    if (*sel >= *top + rows)
        *top = *sel - rows + 1;
    for (int i = 0; i < rows && *top + i < nv; i++) {
        const struct dash_tensor *t = &a->tensors[vis[*top + i]];
        char shape[48], rank[24], c1[32], c2[32], c3[32], c4[32], c5[32];
        snprintf(shape, sizeof shape, "%lldx%lld", (long long)t->rows, (long long)t->cols);
        if (t->rank >= 0)
            snprintf(rank, sizeof rank, "%lld", (long long)t->rank);
        else
            snprintf(rank, sizeof rank, "-");
        dash_fmt_num(t->rel_change, c1, sizeof c1);
        dash_fmt_num(t->eff_rank, c2, sizeof c2);
        dash_fmt_num(t->energy, c3, sizeof c3);
        dash_fmt_num(t->rel_error, c4, sizeof c4);
        dash_fmt_num(t->fro, c5, sizeof c5);
        char nm[512];
        snprintf(nm, sizeof nm, "%s", short_name(t->name));
        size_t nl = strlen(nm);
        if (nl > 7 && !strcmp(nm + nl - 7, ".weight"))
            nm[nl -= 7] = 0;
        char namebuf[512];
        if ((int)nl > w_name) // keep the tail: the module name matters most
            snprintf(namebuf, sizeof namebuf, "~%s", nm + (nl - (size_t)(w_name - 1)));
        else
            snprintf(namebuf, sizeof namebuf, "%s", nm);
        int selected = *top + i == *sel && a->pane == 0;
        if (selected)
            attron(A_REVERSE);
        dash_putf(y + i, 0, COLS, "%-*.*s %*s %5s %*s %*s %*s %*s %*s", w_name, w_name, namebuf, w_shape, shape,
                  rank, w_num, c1, w_num, c2, w_num, c3, w_num, c4, n_num > 4 ? w_num : 0, n_num > 4 ? c5 : "");
        if (selected)
            attroff(A_REVERSE);
    }
    lk_free(vis);
    y += rows;
    if (bars_h < 2)
        return;
    // bars by layer
    int metric = a->bar_metric;
    double vmax = 0;
    for (int l = 0; l < a->n_layers; l++) {
        double v = layer_value(&a->layers[l], metric);
        if (!isnan(v) && v > vmax)
            vmax = v;
    }
    if (metric == 1 && vmax < 1)
        vmax = 1; // energy is a fraction: full bar = all of it
    if (a->pane == 1)
        attron(A_REVERSE);
    dash_putf(y, 0, COLS, " by layer: %s (full bar = %.4g)  <-/-> other figure ", bar_names[metric], vmax);
    if (a->pane == 1)
        attroff(A_REVERSE);
    y++;
    int brows = bars_h - 1;
    int *btop = &a->ptop[1];
    if (*btop > a->n_layers - brows)
        *btop = a->n_layers - brows > 0 ? a->n_layers - brows : 0;
    int bw = COLS - 8 - 12;
    if (bw < 4)
        bw = 4;
    for (int i = 0; i < brows && *btop + i < a->n_layers; i++) {
        const struct dash_layer *L = &a->layers[*btop + i];
        double v = layer_value(L, metric);
        char bar[1024];
        dash_bar_utf8(vmax > 0 && !isnan(v) ? v / vmax : 0, bw, bar, sizeof bar);
        dash_putf(y + i, 0, 8, "layer%3d", L->layer);
        dash_attr_on(a->colors, DASH_C_BAR, 0);
        dash_put(y + i, 8, bw, bar);
        dash_attr_off(a->colors, DASH_C_BAR, 0);
        dash_fmt_num(v, num, sizeof num);
        dash_putf(y + i, 8 + bw + 1, 11, "%s", num);
    }
}

// ---- merge and other kinds ----

static int lines_load(struct dash_app *a)
{
    const struct rdb_run *r = dash_cur_run(a);
    dash_strv_release(&a->lines);
    if (!r)
        return LK_OK;
    struct dash_strv *l = &a->lines;
    char method[256];
    if (dash_json_str(r->params_json, "method", method, sizeof method) ||
        dash_json_str(r->summary_json, "method", method, sizeof method))
        dash_strv_pushf(l, "method: %s", method);
    dash_strv_pushf(l, "model: %s", r->model ? r->model : "-");
    // inputs: a list in params ("inputs", "adapters"), else the data column
    int have_inputs = 0;
    cJSON *p = r->params_json ? cJSON_Parse(r->params_json) : NULL;
    const char *ik[] = { "inputs", "adapters", "adapter" };
    for (int i = 0; i < 3 && p && !have_inputs; i++) {
        const cJSON *in = cJSON_GetObjectItemCaseSensitive(p, ik[i]);
        if (cJSON_IsArray(in)) {
            int k = 0;
            for (const cJSON *it = in->child; it; it = it->next) {
                char *t = cJSON_IsString(it) ? NULL : cJSON_PrintUnformatted(it);
                dash_strv_pushf(l, "input %d: %s", ++k, t ? t : it->valuestring);
                cJSON_free(t);
            }
            have_inputs = k > 0;
        } else if (cJSON_IsString(in)) {
            dash_strv_pushf(l, "input: %s", in->valuestring);
            have_inputs = 1;
        }
    }
    cJSON_Delete(p);
    if (!have_inputs)
        dash_strv_pushf(l, "inputs: %s", r->data ? r->data : "-");
    dash_strv_push(l, "");
    dash_strv_push(l, "parameters:");
    dash_json_flatten(r->params_json, l);
    dash_strv_push(l, "");
    dash_strv_push(l, "summary and verify figures:");
    dash_json_flatten(r->summary_json, l);
    return LK_OK;
}

static void draw_lines(struct dash_app *a, const struct rdb_run *run, int y0, int h)
{
    attron(A_BOLD);
    int used = dash_putf(y0, 0, COLS, "%s #%lld %s  ", run->kind, (long long)run->id, run->name);
    attroff(A_BOLD);
    char dur[32];
    dash_fmt_duration(dash_run_seconds(run), dur, sizeof dur);
    dash_putf(y0, used, COLS - used, "%s  %s  started %s", run->status, dur, run->started_at);
    int rows = h - 1;
    int *top = &a->ptop[0];
    if (*top > a->lines.n - rows)
        *top = a->lines.n - rows > 0 ? a->lines.n - rows : 0;
    for (int i = 0; i < rows && *top + i < a->lines.n; i++) {
        const char *s = a->lines.v[*top + i];
        int head = s[0] && s[strlen(s) - 1] == ':';
        if (head)
            attron(A_BOLD);
        dash_put(y0 + 1 + i, 1, COLS - 1, s);
        if (head)
            attroff(A_BOLD);
    }
}

// ---- dispatch ----

static int is_kind(const struct rdb_run *r, const char *k)
{
    return r && r->kind && !strcmp(r->kind, k);
}

int dash_view_load(struct dash_app *a, struct lk_err *err)
{
    const struct rdb_run *r = dash_cur_run(a);
    if (!r)
        return lk_errf(err, LK_ERR_MISSING, "run %lld is no longer in %s", (long long)a->run_id, a->o.path);
    int qidx = a->view == DASH_QUESTION ? a->q.idx : -1;
    int keep_metric = a->bar_metric;
    dash_view_release(a);
    a->bar_metric = keep_metric;
    a->n_panes = 1;
    if (is_kind(r, "train")) {
        a->n_panes = 2;
        a->train.last_step = -1;
        dash_json_flatten(r->params_json, &a->lines);
        return train_load_more(a, err);
    }
    if (is_kind(r, "eval")) {
        a->n_panes = 2;
        int rc = eval_load(a, err);
        if (!rc)
            rc = dash_tradeoff_load(&a->db, a->run_id, &a->tradeoff, err);
        if (!rc && qidx >= 0)
            rc = dash_question_open(a, qidx, err);
        return rc;
    }
    if (is_kind(r, "svd-compress") || is_kind(r, "diff")) {
        a->n_panes = 2;
        return tensors_load(a, err);
    }
    return lines_load(a);
}

int dash_view_refresh(struct dash_app *a, struct lk_err *err)
{
    const struct rdb_run *r = dash_cur_run(a);
    if (is_kind(r, "train"))
        return train_load_more(a, err);
    return dash_view_load(a, err);
}

void dash_view_draw(struct dash_app *a, int y0, int h)
{
    const struct rdb_run *r = dash_cur_run(a);
    if (!r) {
        dash_putf(y0 + 1, 2, COLS - 2, "run %lld is no longer in the database (q: back)", (long long)a->run_id);
        return;
    }
    if (a->view == DASH_QUESTION)
        draw_question(a, r, y0, h);
    else if (is_kind(r, "train"))
        draw_train(a, r, y0, h);
    else if (is_kind(r, "eval"))
        draw_eval(a, r, y0, h);
    else if (is_kind(r, "svd-compress") || is_kind(r, "diff"))
        draw_tensors(a, r, y0, h);
    else
        draw_lines(a, r, y0, h);
}

const char *dash_view_footer(const struct dash_app *a)
{
    const struct rdb_run *r = dash_cur_run(a);
    int live = r && !strcmp(r->status, "running");
    if (a->view == DASH_QUESTION)
        return "↑↓/jk scroll  ←→/np question  r refresh  q back";
    if (is_kind(r, "train"))
        return live ? "Tab pane  ↑↓/jk scroll  r refresh (live: every 1s)  q back"
                    : "Tab pane  ↑↓/jk scroll  r refresh  q back";
    if (is_kind(r, "eval") && a->tradeoff.n)
        return a->tradeoff.show ? "Tab pane  ←→ metric columns / forgot metric  c questions  r refresh  q back"
                                : "Tab pane  ↑↓/jk move  ←→ metrics  Enter question  c chart  / filter  r refresh  q back";
    if (is_kind(r, "eval"))
        return "Tab pane  ↑↓/jk move  ←→ metrics  Enter question  / filter  r refresh  q back";
    if (is_kind(r, "svd-compress") || is_kind(r, "diff"))
        return "Tab pane  ↑↓/jk move  ←→ bar figure  / filter  r refresh  q back";
    return "↑↓/jk scroll  r refresh  q back";
}

int dash_view_key(struct dash_app *a, int ch)
{
    const struct rdb_run *r = dash_cur_run(a);
    if (!r)
        return 0;
    int page = LINES / 2 > 1 ? LINES / 2 : 1;
    int delta = 0;
    switch (ch) {
    case KEY_UP: case 'k': delta = -1; break;
    case KEY_DOWN: case 'j': delta = 1; break;
    case KEY_PPAGE: delta = -page; break;
    case KEY_NPAGE: delta = page; break;
    default: break;
    }
    if (a->view == DASH_QUESTION) {
        struct lk_err err = { 0 };
        int n = a->eval.item_ids.n;
        if (delta) {
            a->scroll += delta;
            if (a->scroll < 0)
                a->scroll = 0;
        } else if ((ch == KEY_RIGHT || ch == 'n') && a->q.idx + 1 < n) {
            a->scroll = 0;
            if (dash_question_open(a, a->q.idx + 1, &err))
                snprintf(a->note, sizeof a->note, "%s", err.msg);
        } else if ((ch == KEY_LEFT || ch == 'p') && a->q.idx > 0) {
            a->scroll = 0;
            if (dash_question_open(a, a->q.idx - 1, &err))
                snprintf(a->note, sizeof a->note, "%s", err.msg);
        }
        return 1;
    }
    if (ch == '\t' || ch == KEY_BTAB) {
        a->pane = (a->pane + 1) % (a->n_panes ? a->n_panes : 1);
        return 1;
    }
    if (ch == 0) { // the filter changed: start at the top
        a->psel[0] = a->psel[1] = a->ptop[0] = a->ptop[1] = 0;
        return 1;
    }
    int p = a->pane;
    if (is_kind(r, "eval")) {
        struct dash_tradeoff *t = &a->tradeoff;
        if (ch == 'c' && t->n) {
            t->show = !t->show;
            return 1;
        }
        if (t->n && t->show && p == 1 && t->forgot.n && (ch == KEY_RIGHT || ch == 'l' || ch == KEY_LEFT || ch == 'h')) {
            t->metric = (t->metric + (ch == KEY_RIGHT || ch == 'l' ? 1 : t->forgot.n - 1)) % t->forgot.n;
            return 1;
        }
        if (ch == KEY_RIGHT || ch == 'l') {
            a->eval.col++;
            return 1;
        }
        if (ch == KEY_LEFT || ch == 'h') {
            if (a->eval.col > 0)
                a->eval.col--;
            return 1;
        }
        if ((ch == '\n' || ch == '\r' || ch == KEY_ENTER) && a->eval.item_ids.n && !(t->n && t->show)) {
            // the selected question among those passing the filter
            int k = -1, seen = 0;
            for (int i = 0; i < a->eval.item_ids.n && k < 0; i++)
                if (item_matches(a, i) && seen++ == a->psel[1])
                    k = i;
            if (k >= 0) {
                struct lk_err err = { 0 };
                a->scroll = 0;
                if (dash_question_open(a, k, &err))
                    snprintf(a->note, sizeof a->note, "%s", err.msg);
                else
                    a->view = DASH_QUESTION;
            }
            return 1;
        }
        if (delta && p == 1) {
            a->psel[1] += delta;
            if (a->psel[1] < 0)
                a->psel[1] = 0;
        }
        return 1;
    }
    if (is_kind(r, "svd-compress") || is_kind(r, "diff")) {
        if (ch == KEY_RIGHT || ch == 'l')
            a->bar_metric = (a->bar_metric + 1) % 3;
        else if (ch == KEY_LEFT || ch == 'h')
            a->bar_metric = (a->bar_metric + 2) % 3;
        else if (delta && p == 0) {
            a->psel[0] += delta;
            if (a->psel[0] < 0)
                a->psel[0] = 0;
        } else if (delta && p == 1) {
            a->ptop[1] += delta;
            if (a->ptop[1] < 0)
                a->ptop[1] = 0;
        }
        return 1;
    }
    if (delta) { // train parameters pane, merge / other lines
        int k = is_kind(r, "train") ? 1 : 0;
        a->ptop[k] += delta;
        if (a->ptop[k] < 0)
            a->ptop[k] = 0;
    }
    return 1;
}
