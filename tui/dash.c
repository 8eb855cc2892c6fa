/*
 * dash.c - `lorakit dash`, the application: terminal set-up and restoration, the key loop and
 * the runs list. The run views live in tui/views.c, the drawing kit they share in tui/draw.c,
 * the plotting in tui/plot.c; this file calls them, they never call back. Owns: the curses screen, the read-only connection to the runs database, the
 * list of runs. The terminal is restored on every exit path: normal quit, a database that
 * cannot be read, SIGINT/SIGTERM/SIGHUP (the handler only sets a flag; the loop wakes at
 * least once a second, since getch waits with a timeout) and anything calling exit().
 */
#include "dash.h"

#include <curses.h>
#include <locale.h>
#include <math.h>
#include <signal.h>
#include <sqlite3.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "dash_app.h"

// ---- the runs list ----

static double sql_real(struct dash_app *a, const char *sql, int64_t id)
{
    sqlite3_stmt *st;
    double v = NAN;
    if (sqlite3_prepare_v2(a->db.db, sql, -1, &st, NULL) != SQLITE_OK)
        return v;
    sqlite3_bind_int64(st, 1, id);
    if (sqlite3_step(st) == SQLITE_ROW && sqlite3_column_type(st, 0) != SQLITE_NULL)
        v = sqlite3_column_double(st, 0);
    sqlite3_finalize(st);
    return v;
}

/* The one figure shown for a run in the list, by kind. */
static void run_key(struct dash_app *a, const struct rdb_run *r, char *buf, size_t n)
{
    char num[32], s[256];
    buf[0] = 0;
    if (!strcmp(r->kind, "train")) {
        double v = dash_json_num(r->summary_json, "final_loss");
        if (!isfinite(v)) // still running (or failed): the last logged loss
            v = sql_real(a, "SELECT loss FROM train_steps WHERE run_id = ?1 AND loss IS NOT NULL"
                            " ORDER BY step DESC LIMIT 1", r->id);
        dash_fmt_num(v, num, sizeof num);
        snprintf(buf, n, "loss %s", num);
    } else if (!strcmp(r->kind, "eval")) {
        if (dash_json_str(r->summary_json, "verdict", s, sizeof s))
            snprintf(buf, n, "%s", s);
    } else if (!strcmp(r->kind, "svd-compress")) {
        double v = dash_json_num(r->summary_json, "energy_kept");
        if (!isfinite(v)) {
            // the mean over tensors of what each kept
            sqlite3_stmt *st;
            double sum = 0;
            int cnt = 0;
            if (sqlite3_prepare_v2(a->db.db, "SELECT energy_json, extra_json FROM tensor_stats"
                                             " WHERE run_id = ?1", -1, &st, NULL) == SQLITE_OK) {
                sqlite3_bind_int64(st, 1, r->id);
                while (sqlite3_step(st) == SQLITE_ROW) {
                    double e = dash_energy_kept((const char *)sqlite3_column_text(st, 0),
                                                (const char *)sqlite3_column_text(st, 1));
                    if (isfinite(e)) {
                        sum += e;
                        cnt++;
                    }
                }
                sqlite3_finalize(st);
            }
            v = cnt ? sum / cnt : NAN;
        }
        if (isfinite(v))
            snprintf(buf, n, "energy %.2f%%", 100 * v);
    } else if (!strcmp(r->kind, "diff")) {
        double v = sql_real(a, "SELECT max(rel_change) FROM tensor_stats WHERE run_id = ?1", r->id);
        dash_fmt_num(v, num, sizeof num);
        snprintf(buf, n, "max rel %s", num);
    } else if (!strcmp(r->kind, "merge")) {
        if (dash_json_str(r->params_json, "method", s, sizeof s) ||
            dash_json_str(r->summary_json, "method", s, sizeof s))
            snprintf(buf, n, "method %.200s", s);
    }
}

static int match_filter(const char *f, const struct rdb_run *r)
{
    if (!*f)
        return 1;
    const char *fields[] = { r->kind, r->name, r->status, r->model, r->data };
    for (size_t i = 0; i < sizeof fields / sizeof fields[0]; i++)
        if (fields[i] && strstr(fields[i], f))
            return 1;
    return 0;
}

static void apply_filter(struct dash_app *a)
{
    a->n_vis = 0;
    for (int i = 0; i < a->n_runs; i++)
        if (match_filter(a->filter, &a->runs[i]))
            a->vis[a->n_vis++] = i;
    if (a->sel >= a->n_vis)
        a->sel = a->n_vis ? a->n_vis - 1 : 0;
    if (a->sel < 0)
        a->sel = 0;
}

/* (Re)reads the runs; keeps the selected run selected. */
static int runs_reload(struct dash_app *a, struct lk_err *err)
{
    int64_t keep = a->n_vis ? a->runs[a->vis[a->sel]].id : -1;
    struct rdb_run *runs;
    int n;
    int r = rdb_runs_list(&a->db, 0, &runs, &n, err);
    if (r)
        return r;
    int *vis = lk_malloc(sizeof *vis * (size_t)(n ? n : 1));
    struct dash_strv keys = { 0 };
    if (!vis) {
        rdb_runs_free(runs, n);
        return lk_errf(err, LK_ERR_NOMEM, "out of memory");
    }
    for (int i = 0; i < n; i++) {
        char k[256];
        run_key(a, &runs[i], k, sizeof k);
        if (dash_strv_push(&keys, k)) {
            rdb_runs_free(runs, n);
            lk_free(vis);
            dash_strv_release(&keys);
            return lk_errf(err, LK_ERR_NOMEM, "out of memory");
        }
    }
    rdb_runs_free(a->runs, a->n_runs);
    lk_free(a->vis);
    dash_strv_release(&a->keys);
    a->runs = runs;
    a->n_runs = n;
    a->vis = vis;
    a->keys = keys;
    apply_filter(a);
    for (int i = 0; i < a->n_vis; i++)
        if (a->runs[a->vis[i]].id == keep)
            a->sel = i;
    return LK_OK;
}

static void status_color(struct dash_app *a, const char *status, int on)
{
    int pair = !strcmp(status, "done") ? DASH_C_GOOD
               : !strcmp(status, "running") ? DASH_C_WARN
               : DASH_C_BAD;
    if (on)
        dash_attr_on(a->colors, pair, 0);
    else
        dash_attr_off(a->colors, pair, 0);
}

static void draw_list(struct dash_app *a, int y0, int h)
{
    if (a->n_runs == 0) {
        dash_putf(y0 + 1, 2, COLS - 4, "no runs in %s yet", a->o.path);
        dash_put(y0 + 2, 2, COLS - 4, "train, eval, merge, svd-compress and diff record their runs here;");
        dash_put(y0 + 3, 2, COLS - 4, "press r to look again.");
        return;
    }
    int wide = COLS >= 110;
    int w_id = 4, w_kind = 12, w_status = 11, w_start = wide ? 19 : 11, w_dur = 7;
    int w_key = wide ? 30 : 16;
    int w_name = COLS - (w_id + w_kind + w_status + w_start + w_dur + w_key + 7);
    if (w_name < 6) {
        w_key -= 6 - w_name;
        w_name = 6;
    }
    int x_kind = w_id + 1, x_name = x_kind + w_kind + 1, x_status = x_name + w_name + 1;
    int x_start = x_status + w_status + 1, x_dur = x_start + w_start + 1, x_key = x_dur + w_dur + 1;
    attron(A_BOLD);
    dash_put(y0, 0, w_id, "  id");
    dash_put(y0, x_kind, w_kind, "kind");
    dash_put(y0, x_name, w_name, "name");
    dash_put(y0, x_status, w_status, "status");
    dash_put(y0, x_start, w_start, "started");
    dash_put(y0, x_dur, w_dur, "time");
    dash_put(y0, x_key, COLS - x_key, "key figure");
    attroff(A_BOLD);
    int rows = h - 1;
    if (rows < 1)
        return;
    if (a->sel < a->top)
        a->top = a->sel;
    if (a->sel >= a->top + rows)
        a->top = a->sel - rows + 1;
    if (a->n_vis == 0)
        dash_putf(y0 + 1, 2, COLS - 4, "no run matches '%s'", a->filter);
    for (int i = 0; i < rows && a->top + i < a->n_vis; i++) {
        int idx = a->vis[a->top + i];
        const struct rdb_run *r = &a->runs[idx];
        int y = y0 + 1 + i;
        int selected = a->top + i == a->sel;
        if (selected) {
            attron(A_REVERSE);
            mvhline(y, 0, ' ', COLS);
        }
        char dur[32], start[32];
        dash_fmt_duration(dash_run_seconds(r), dur, sizeof dur);
        // '2024-05-01T12:34:56Z' -> '2024-05-01 12:34:56' or '05-01 12:34'
        snprintf(start, sizeof start, "%s", r->started_at ? r->started_at : "");
        if (strlen(start) >= 19) {
            start[10] = ' ';
            start[19] = 0;
        }
        const char *st_show = wide || strlen(start) < 16 ? start : start + 5;
        char shortst[16];
        if (!wide && strlen(start) >= 16) {
            snprintf(shortst, sizeof shortst, "%.11s", st_show);
            st_show = shortst;
        }
        dash_putf(y, 0, w_id, "%4lld", (long long)r->id);
        dash_put(y, x_kind, w_kind, r->kind);
        dash_put(y, x_name, w_name, r->name);
        if (!selected)
            status_color(a, r->status, 1);
        dash_put(y, x_status, w_status, r->status);
        if (!selected)
            status_color(a, r->status, 0);
        dash_put(y, x_start, w_start, st_show);
        dash_put(y, x_dur, w_dur, dur);
        dash_put(y, x_key, COLS - x_key, a->keys.v[idx]);
        if (selected)
            attroff(A_REVERSE);
    }
}

// ---- opening the database ----

static void db_open(struct dash_app *a)
{
    struct lk_err err = { 0 };
    struct stat sb;
    a->fatal[0] = 0;
    if (stat(a->o.path, &sb) == 0 && S_ISREG(sb.st_mode) && sb.st_size == 0) {
        snprintf(a->fatal, sizeof a->fatal,
                 "empty runs database (no run recorded yet; train, eval, merge, svd-compress "
                 "and diff fill it): %s", a->o.path);
        return;
    }
    if (rdb_open_readonly(&a->db, a->o.path, &err)) {
        snprintf(a->fatal, sizeof a->fatal, "%s", err.msg);
        return;
    }
    a->have_db = 1;
    if (runs_reload(a, &err)) {
        snprintf(a->fatal, sizeof a->fatal, "%s", err.msg);
        rdb_close(&a->db, NULL);
        a->have_db = 0;
    }
}

// ---- signals and the terminal ----

static volatile sig_atomic_t dash_signal;
static int dash_curses_on;

static void on_signal(int sig)
{
    dash_signal = sig;
}

/* exit() from anywhere (a library, an assertion path that exits) still restores the screen. */
static void restore_at_exit(void)
{
    if (dash_curses_on && !isendwin())
        endwin();
}

static void curses_colors(struct dash_app *a)
{
    if (!has_colors())
        return;
    start_color();
    use_default_colors();
    init_pair(DASH_C_LOSS, COLOR_CYAN, -1);
    init_pair(DASH_C_EVAL, COLOR_YELLOW, -1);
    init_pair(DASH_C_GOOD, COLOR_GREEN, -1);
    init_pair(DASH_C_BAD, COLOR_RED, -1);
    init_pair(DASH_C_LR, COLOR_MAGENTA, -1);
    init_pair(DASH_C_HEAD, COLOR_BLACK, COLOR_CYAN);
    init_pair(DASH_C_BAR, COLOR_BLUE, -1);
    init_pair(DASH_C_WARN, COLOR_YELLOW, -1);
    init_pair(DASH_C_DIM, COLOR_WHITE, -1);
    a->colors = 1;
}

// ---- the frame ----

static const char *list_footer(void)
{
    return "↑↓/jk move  Enter open  / filter  r refresh  q quit";
}

static void draw(struct dash_app *a)
{
    erase();
    // header
    int running = 0;
    for (int i = 0; i < a->n_runs; i++)
        running += a->runs[i].status && !strcmp(a->runs[i].status, "running");
    if (a->colors)
        attron(COLOR_PAIR(DASH_C_HEAD));
    else
        attron(A_REVERSE);
    mvhline(0, 0, ' ', COLS);
    char head[512];
    if (a->fatal[0])
        snprintf(head, sizeof head, " lorakit dash  %s", a->o.path);
    else
        snprintf(head, sizeof head, " lorakit dash  %s  %d run%s%s%s", a->o.path, a->n_runs,
                 a->n_runs == 1 ? "" : "s", running ? "  live: " : "", running ? "" : "");
    int used = dash_put(0, 0, COLS, head);
    if (running && !a->fatal[0])
        dash_putf(0, used, COLS - used, "%d running", running);
    if (a->colors)
        attroff(COLOR_PAIR(DASH_C_HEAD));
    else
        attroff(A_REVERSE);

    int y0 = 1, h = LINES - 2 - (a->note[0] ? 1 : 0);
    if (a->fatal[0]) {
        dash_attr_on(a->colors, DASH_C_BAD, 1);
        dash_put(2, 2, COLS - 4, "cannot show the runs database:");
        dash_attr_off(a->colors, DASH_C_BAD, 1);
        struct dash_strv l = { 0 };
        dash_wrap(a->fatal, COLS - 4, &l);
        for (int i = 0; i < l.n && 3 + i < LINES - 1; i++)
            dash_put(3 + i, 2, COLS - 4, l.v[i]);
        dash_strv_release(&l);
        dash_put(LINES - 1, 0, COLS, "r retry  q quit");
        return;
    }
    if (a->view == DASH_LIST)
        draw_list(a, y0, h);
    else
        dash_view_draw(a, y0, h);
    if (a->note[0]) {
        dash_attr_on(a->colors, DASH_C_BAD, 0);
        dash_put(LINES - 2, 0, COLS, a->note);
        dash_attr_off(a->colors, DASH_C_BAD, 0);
    }
    // footer: the keys, or the filter prompt
    attron(A_REVERSE);
    mvhline(LINES - 1, 0, ' ', COLS);
    if (a->filtering) {
        dash_putf(LINES - 1, 0, COLS, "/%s", a->filter);
        attroff(A_REVERSE);
        dash_put(LINES - 1, COLS - 32 > 0 ? COLS - 32 : 0, 32, " Enter keep  Esc clear");
    } else {
        const char *f = a->view == DASH_LIST ? list_footer() : dash_view_footer(a);
        used = dash_put(LINES - 1, 0, COLS, f);
        if (a->filter[0] && used + 4 < COLS)
            dash_putf(LINES - 1, used + 2, COLS - used - 2, "[/%s]", a->filter);
        attroff(A_REVERSE);
    }
}

// ---- keys ----

static void open_run(struct dash_app *a, int64_t id)
{
    struct lk_err err = { 0 };
    dash_view_release(a);
    a->run_id = id;
    a->view = DASH_RUN;
    a->pane = 0;
    a->scroll = 0;
    a->filter[0] = 0;
    memset(a->psel, 0, sizeof a->psel);
    memset(a->ptop, 0, sizeof a->ptop);
    const struct rdb_run *r = dash_cur_run(a);
    // svd-compress is about what the truncation kept; diff about what changed
    a->bar_metric = r && !strcmp(r->kind, "svd-compress") ? 1 : 0;
    if (dash_view_load(a, &err))
        snprintf(a->note, sizeof a->note, "%s", err.msg);
    if (r && !strcmp(r->kind, "eval"))
        a->pane = 1; // the questions first: Enter opens one
}

static void refresh_all(struct dash_app *a, int full)
{
    struct lk_err err = { 0 };
    a->note[0] = 0;
    if (!a->have_db) {
        db_open(a);
        return;
    }
    int r = runs_reload(a, &err);
    if (r == LK_OK && a->view != DASH_LIST)
        r = full ? dash_view_load(a, &err) : dash_view_refresh(a, &err);
    if (r)
        snprintf(a->note, sizeof a->note, "refresh failed: %.480s", err.msg);
}

/* Returns 1 to quit. */
static int key(struct dash_app *a, int ch)
{
    if (a->filtering) {
        size_t n = strlen(a->filter);
        if (ch == '\n' || ch == KEY_ENTER || ch == '\r') {
            a->filtering = 0;
        } else if (ch == 27) {
            a->filtering = 0;
            a->filter[0] = 0;
        } else if (ch == KEY_BACKSPACE || ch == 127 || ch == 8) {
            if (n)
                a->filter[n - 1] = 0;
        } else if (ch >= 32 && ch < 127 && n + 1 < sizeof a->filter) {
            a->filter[n] = (char)ch;
            a->filter[n + 1] = 0;
        }
        if (a->view == DASH_LIST)
            apply_filter(a);
        else
            dash_view_key(a, 0); // re-apply the view's filter
        return 0;
    }
    if (ch == 'q' || ch == 'Q') {
        if (a->fatal[0] || a->view == DASH_LIST)
            return 1;
        if (a->view == DASH_QUESTION) {
            a->view = DASH_RUN;
            return 0;
        }
        a->view = DASH_LIST;
        a->filter[0] = 0;
        apply_filter(a);
        dash_view_release(a);
        return 0;
    }
    if (ch == 'r' || ch == 'R') {
        refresh_all(a, 1);
        return 0;
    }
    if (a->fatal[0])
        return 0;
    if (ch == '/' && a->view != DASH_QUESTION) {
        a->filtering = 1;
        return 0;
    }
    if (a->view != DASH_LIST) {
        dash_view_key(a, ch);
        return 0;
    }
    int page = LINES - 4 > 1 ? LINES - 4 : 1;
    switch (ch) {
    case KEY_UP: case 'k': a->sel--; break;
    case KEY_DOWN: case 'j': a->sel++; break;
    case KEY_PPAGE: a->sel -= page; break;
    case KEY_NPAGE: a->sel += page; break;
    case KEY_HOME: case 'g': a->sel = 0; break;
    case KEY_END: case 'G': a->sel = a->n_vis - 1; break;
    case '\n': case '\r': case KEY_ENTER: case KEY_RIGHT:
        if (a->n_vis)
            open_run(a, a->runs[a->vis[a->sel]].id);
        return 0;
    default: return 0;
    }
    if (a->sel >= a->n_vis)
        a->sel = a->n_vis - 1;
    if (a->sel < 0)
        a->sel = 0;
    return 0;
}

/* Live data: the list shows a running run, or the open run is running. */
static int live(const struct dash_app *a)
{
    if (!a->have_db)
        return 0;
    if (a->view != DASH_LIST) {
        const struct rdb_run *r = dash_cur_run(a);
        return r && r->status && !strcmp(r->status, "running");
    }
    for (int i = 0; i < a->n_runs; i++)
        if (a->runs[i].status && !strcmp(a->runs[i].status, "running"))
            return 1;
    return 0;
}

// ---- entry ----

static void app_release(struct dash_app *a)
{
    dash_view_release(a);
    rdb_runs_free(a->runs, a->n_runs);
    lk_free(a->vis);
    dash_strv_release(&a->keys);
    rdb_close(&a->db, NULL);
    memset(a, 0, sizeof *a);
}

int dash_run(const struct dash_opts *o, struct lk_err *err)
{
    double t0 = lk_now();
    struct dash_app *a = lk_calloc(1, sizeof *a);
    if (!a)
        return lk_errf(err, LK_ERR_NOMEM, "out of memory"), 1;
    a->o = *o;
    setlocale(LC_ALL, "");
    // One thread uses SQLite here: no per-call mutexes (they were a sixth of the time spent
    // loading a 100,000-step run). Must precede the first connection; harmless if too late.
    sqlite3_config(SQLITE_CONFIG_SINGLETHREAD);
    db_open(a);
    if (a->have_db && o->open_run > 0) {
        int found = 0;
        for (int i = 0; i < a->n_runs; i++)
            found |= a->runs[i].id == o->open_run;
        if (found)
            open_run(a, o->open_run);
        else
            snprintf(a->note, sizeof a->note, "no run with id %lld in %s", (long long)o->open_run,
                     o->path);
    }

    FILE *devnull = NULL;
    SCREEN *scr;
    if (o->bench_first_draw) {
        // off-screen: a real curses screen whose output goes nowhere, at 80x24
        devnull = fopen("/dev/null", "w");
        scr = devnull ? newterm("xterm-256color", devnull, stdin) : NULL;
    } else {
        if (!isatty(STDOUT_FILENO) || !isatty(STDIN_FILENO)) {
            int rc = a->fatal[0] ? lk_errf(err, LK_ERR_IO, "%s", a->fatal)
                                 : lk_errf(err, LK_ERR_USAGE, "the dashboard needs a terminal");
            app_release(a);
            lk_free(a);
            return rc == LK_ERR_USAGE ? 2 : 1;
        }
        scr = newterm(NULL, stdout, stdin);
    }
    if (!scr) {
        lk_errf(err, LK_ERR_IO, "cannot start the terminal (TERM='%s')",
                getenv("TERM") ? getenv("TERM") : "");
        if (devnull)
            fclose(devnull);
        app_release(a);
        lk_free(a);
        return 1;
    }
    dash_curses_on = 1;
    atexit(restore_at_exit);
    struct sigaction sa, old_int, old_term, old_hup;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_signal; // no SA_RESTART: a signal wakes getch at once
    sigemptyset(&sa.sa_mask);
    dash_signal = 0;
    sigaction(SIGINT, &sa, &old_int);
    sigaction(SIGTERM, &sa, &old_term);
    sigaction(SIGHUP, &sa, &old_hup);

    if (o->bench_first_draw)
        resize_term(24, 80);
    cbreak();
    noecho();
    keypad(stdscr, TRUE);
    curs_set(0);
    set_escdelay(25);
    curses_colors(a);
    timeout(1000); // poll once a second: live runs refresh, signals are noticed

    int status = 0;
    if (o->bench_first_draw) {
        draw(a);
        refresh();
        double ms = (lk_now() - t0) * 1000.0;
        endwin();
        int64_t steps = a->train.n;
        printf("first_draw_ms=%.3f steps=%lld\n", ms, (long long)steps);
    } else {
        for (;;) {
            draw(a);
            refresh();
            int ch = getch();
            if (dash_signal)
                break;
            if (ch == ERR) {
                if (live(a))
                    refresh_all(a, 0);
                continue;
            }
            if (ch == KEY_RESIZE)
                continue; // ncurses updated LINES/COLS; the next frame is laid out anew
            if (key(a, ch))
                break;
        }
        endwin();
    }
    delscreen(scr);
    dash_curses_on = 0;
    if (devnull)
        fclose(devnull);
    sigaction(SIGINT, &old_int, NULL);
    sigaction(SIGTERM, &old_term, NULL);
    sigaction(SIGHUP, &old_hup, NULL);

    if (dash_signal)
        status = 128 + (int)dash_signal;
    else if (a->fatal[0]) {
        lk_errf(err, LK_ERR_IO, "%s", a->fatal);
        status = 1;
    }
    app_release(a);
    lk_free(a);
    return status;
}
