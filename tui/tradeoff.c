/*
 * tradeoff.c - the eval view's learned-against-forgot chart (see dash_app.h): each system of a
 * run with retention figures (eval_retention, libcore/rdb.h) as one labelled mark on a braille
 * scatter, forgot across, learned up, each with its 95% interval as whiskers, and a legend with
 * the figures. Owns the rows it loads and the list of forgot metrics.
 */
#include <curses.h>
#include <math.h>
#include <stdio.h>
#include <string.h>

#include "dash_app.h"

void dash_tradeoff_release(struct dash_tradeoff *t)
{
    lk_free(t->rows);
    dash_strv_release(&t->forgot);
    int show = t->show, metric = t->metric;
    int64_t run = t->run;
    memset(t, 0, sizeof *t);
    t->show = show;
    t->metric = metric;
    t->run = run;
}

static int has_suffix(const char *s, const char *suf)
{
    size_t n = strlen(s), k = strlen(suf);
    return n >= k && !strcmp(s + n - k, suf);
}

/* The forgot metric shown first: a headline score read with retrieval that the base leaves room
 * to forget, else the closed-book one, else the texts' NLL, else the first. */
static int default_metric(const struct dash_tradeoff *t)
{
    int pick[3] = { -1, -1, -1 };
    for (int i = 0; i < t->forgot.n; i++) {
        const char *m = t->forgot.v[i];
        int room = 1;
        for (int r = 0; r < t->n; r++)
            if (!strcmp(t->rows[r].kind, "forgot") && !strcmp(t->rows[r].metric, m) && t->rows[r].no_room)
                room = 0;
        int score = has_suffix(m, ".f1") || has_suffix(m, ".acc");
        if (room && score && strncmp(m, "closed.", 7) && pick[0] < 0)
            pick[0] = i;
        else if (room && score && pick[1] < 0)
            pick[1] = i;
        else if (!strcmp(m, "text.nll") && pick[2] < 0)
            pick[2] = i;
    }
    for (int k = 0; k < 3; k++)
        if (pick[k] >= 0)
            return pick[k];
    return 0;
}

int dash_tradeoff_load(struct rdb *db, int64_t run_id, struct dash_tradeoff *t, struct lk_err *err)
{
    dash_tradeoff_release(t);
    int rc = rdb_retention_load(db, run_id, &t->rows, &t->n, err);
    if (rc)
        return rc;
    for (int i = 0; i < t->n; i++) {
        if (strcmp(t->rows[i].kind, "forgot"))
            continue;
        int seen = 0;
        for (int j = 0; j < t->forgot.n && !seen; j++)
            seen = !strcmp(t->forgot.v[j], t->rows[i].metric);
        if (!seen && dash_strv_push(&t->forgot, t->rows[i].metric))
            return lk_errf(err, LK_ERR_NOMEM, "out of memory reading retention figures");
    }
    if (t->run != run_id) { // a run opened afresh starts on the chart when it has one
        t->run = run_id;
        t->show = t->n > 0;
        t->metric = default_metric(t);
    }
    if (t->metric >= t->forgot.n)
        t->metric = 0;
    return LK_OK;
}

int dash_tradeoff_points(const struct rdb_retention *rows, int n, const char *metric, struct dash_point *out,
                         int max)
{
    int np = 0;
    for (int i = 0; i < n; i++) {
        int k = 0;
        while (k < np && strcmp(out[k].name, rows[i].system))
            k++;
        if (k == np) {
            if (np == max)
                continue;
            struct dash_point p = { rows[i].system, NAN, NAN, NAN, NAN, NAN, NAN, 0 };
            out[np++] = p;
        }
        struct dash_point *p = &out[k];
        const struct rdb_retention *r = &rows[i];
        // learned: F1, or accuracy when there is no F1 (every question multiple choice)
        if (!strcmp(r->kind, "learned") && (!strcmp(r->metric, "f1") || (!strcmp(r->metric, "acc") && isnan(p->y)))) {
            p->y = r->diff;
            p->ylo = r->lo;
            p->yhi = r->hi;
        } else if (!strcmp(r->kind, "forgot") && metric && !strcmp(r->metric, metric)) {
            p->x = r->diff;
            p->xlo = r->lo;
            p->xhi = r->hi;
            p->no_room = r->no_room;
        }
    }
    return np;
}

/* [lo, hi] covering 0 and every finite value given, widened a little so no mark sits on an edge. */
static void span(const double *v, int n, double *lo, double *hi)
{
    *lo = *hi = 0;
    for (int i = 0; i < n; i++)
        if (isfinite(v[i])) {
            *lo = v[i] < *lo ? v[i] : *lo;
            *hi = v[i] > *hi ? v[i] : *hi;
        }
    double pad = (*hi - *lo) * 0.08;
    if (pad <= 0)
        pad = 0.01;
    *lo -= pad;
    *hi += pad;
}

static const int palette[6] = { DASH_C_LOSS, DASH_C_EVAL, DASH_C_GOOD, DASH_C_LR, DASH_C_BAR, DASH_C_WARN };

/* The canvas: dotted zero lines, each system's whiskers, cells in the system's colour. */
static void plot_canvas(struct dash_app *a, struct dash_canvas *c, const struct dash_point *p, int np,
                        const double *xr, const double *yr, int y, int x0)
{
    int zx = dash_canvas_px(c, 0, xr[0], xr[1]), zy = dash_canvas_py(c, 0, yr[0], yr[1]);
    for (int py = 0; py < 4 * c->h; py += 2)
        dash_canvas_dot(c, zx, py, 9);
    for (int px = 0; px < 2 * c->w; px += 2)
        dash_canvas_dot(c, px, zy, 9);
    for (int i = 0; i < np; i++) {
        if (!isfinite(p[i].x) || !isfinite(p[i].y))
            continue;
        int px = dash_canvas_px(c, p[i].x, xr[0], xr[1]), py = dash_canvas_py(c, p[i].y, yr[0], yr[1]);
        if (isfinite(p[i].xlo) && isfinite(p[i].xhi))
            dash_canvas_segment(c, dash_canvas_px(c, p[i].xlo, xr[0], xr[1]), py,
                                dash_canvas_px(c, p[i].xhi, xr[0], xr[1]), py, i + 1);
        if (isfinite(p[i].ylo) && isfinite(p[i].yhi))
            dash_canvas_segment(c, px, dash_canvas_py(c, p[i].ylo, yr[0], yr[1]), px,
                                dash_canvas_py(c, p[i].yhi, yr[0], yr[1]), i + 1);
    }
    for (int r = 0; r < c->h; r++)
        for (int cx = 0; cx < c->w; cx++) {
            size_t k = (size_t)r * (size_t)c->w + (size_t)cx;
            if (!c->dots[k])
                continue;
            char cell[4];
            dash_braille_utf8(c->dots[k], cell);
            int pair = c->tag[k] == 9 ? DASH_C_DIM : palette[(c->tag[k] - 1) % 6];
            dash_attr_on(a->colors, pair, 0);
            mvaddstr(y + r, x0 + cx, cell);
            dash_attr_off(a->colors, pair, 0);
        }
}

/* 1 when cells [x0, x1) of row r are on the canvas and free in busy (then they are taken). */
static int take(unsigned char *busy, int w, int h, int r, int x0, int x1)
{
    if (r < 0 || r >= h || x0 < 0 || x1 > w)
        return 0;
    for (int x = x0; x < x1; x++)
        if (busy[r * w + x])
            return 0;
    memset(busy + r * w + x0, 1, (size_t)(x1 - x0));
    return 1;
}

/* The marks "●" and their labels, over the canvas: each label goes right of its mark, else left,
 * else on the row above or below, wherever it covers no other mark or label (else it is left
 * out: the legend below names every mark in its colour). */
static void plot_marks(struct dash_app *a, const struct dash_canvas *c, const struct dash_point *p, int np,
                       const double *xr, const double *yr, int y, int x0)
{
    unsigned char *busy = lk_calloc((size_t)c->w * (size_t)c->h, 1);
    int cx[16], cy[16];
    for (int i = 0; i < np; i++) {
        cx[i] = cy[i] = -1;
        if (!isfinite(p[i].x) || !isfinite(p[i].y))
            continue;
        cx[i] = dash_canvas_px(c, p[i].x, xr[0], xr[1]) / 2;
        cy[i] = dash_canvas_py(c, p[i].y, yr[0], yr[1]) / 4;
        if (busy)
            busy[cy[i] * c->w + cx[i]] = 1;
        dash_attr_on(a->colors, palette[i % 6], 1);
        mvaddstr(y + cy[i], x0 + cx[i], "\xe2\x97\x8f"); // ●
        dash_attr_off(a->colors, palette[i % 6], 1);
    }
    for (int i = 0; i < np && busy; i++) {
        if (cx[i] < 0)
            continue;
        int len = dash_str_width(p[i].name);
        const int tries[6][2] = { { 0, 2 }, { 0, -1 - len }, { -1, 0 }, { 1, 0 }, { -1, 1 - len }, { 1, 1 - len } };
        for (int k = 0; k < 6; k++) {
            int r = cy[i] + tries[k][0], x = cx[i] + tries[k][1];
            if (take(busy, c->w, c->h, r, x, x + len)) {
                dash_attr_on(a->colors, palette[i % 6], 1);
                dash_put(y + r, x0 + x, len, p[i].name);
                dash_attr_off(a->colors, palette[i % 6], 1);
                break;
            }
        }
    }
    lk_free(busy);
}

/* The legend: per system its figures. */
static void plot_legend(struct dash_app *a, const struct dash_point *p, int np, int y, int rows)
{
    for (int i = 0; i < np && i < rows; i++) {
        char l[64] = "-", f[64] = "-";
        if (isfinite(p[i].y))
            snprintf(l, sizeof l, "%+.3f [%+.3f, %+.3f]", p[i].y, p[i].ylo, p[i].yhi);
        if (isfinite(p[i].x))
            snprintf(f, sizeof f, "%+.3f [%+.3f, %+.3f]%s", p[i].x, p[i].xlo, p[i].xhi,
                     p[i].no_room ? " no room" : "");
        dash_attr_on(a->colors, palette[i % 6], 1);
        int u = dash_putf(y + i, 1, COLS - 1, "\xe2\x97\x8f %-12s", p[i].name);
        dash_attr_off(a->colors, palette[i % 6], 1);
        dash_putf(y + i, 1 + u, COLS - 1 - u, " learned %-25s forgot %s", l, f);
    }
}

void dash_tradeoff_draw(struct dash_app *a, const struct dash_tradeoff *t, int y, int h)
{
    struct dash_point p[16];
    const char *metric = t->forgot.n ? t->forgot.v[t->metric % t->forgot.n] : NULL;
    int np = dash_tradeoff_points(t->rows, t->n, metric, p, 16);
    if (a->pane == 1)
        attron(A_REVERSE);
    dash_attr_on(a->colors, DASH_C_HEAD, 1);
    dash_putf(y, 0, COLS, " learned (F1 gain over base, closed book) up, forgot %s across  (%d/%d, \xe2\x86\x90\xe2\x86\x92)",
              metric ? metric : "-", t->forgot.n ? t->metric % t->forgot.n + 1 : 0, t->forgot.n);
    dash_attr_off(a->colors, DASH_C_HEAD, 1);
    if (a->pane == 1)
        attroff(A_REVERSE);
    const int gutter = 8;
    int legend = h - 3 - np >= 4 ? np : 0, ch = h - 3 - legend, cw = COLS - gutter - 1;
    if (ch < 2 || cw < 8 || !np)
        return;
    double xs[48], ys[48], xr[2], yr[2];
    int k = 0;
    for (int i = 0; i < np; i++) {
        xs[k] = p[i].x, xs[k + 1] = p[i].xlo, xs[k + 2] = p[i].xhi;
        ys[k] = p[i].y, ys[k + 1] = p[i].ylo, ys[k + 2] = p[i].yhi;
        k += 3;
    }
    span(xs, k, &xr[0], &xr[1]);
    span(ys, k, &yr[0], &yr[1]);
    struct dash_canvas c;
    struct lk_err err = { 0 };
    if (dash_canvas_init(&c, cw, ch, &err))
        return;
    plot_canvas(a, &c, p, np, xr, yr, y + 1, gutter);
    plot_marks(a, &c, p, np, xr, yr, y + 1, gutter);
    char num[32];
    for (int r = 0; r < ch; r++) {
        if (r == 0 || r == ch - 1 || r == dash_canvas_py(&c, 0, yr[0], yr[1]) / 4) {
            dash_fmt_num(r == 0 ? yr[1] : r == ch - 1 ? yr[0] : 0, num, sizeof num);
            dash_putf(y + 1 + r, 0, gutter - 1, "%*s", gutter - 1, num);
        }
        mvaddstr(y + 1 + r, gutter - 1, "\xe2\x94\x82"); // │
    }
    int ya = y + 1 + ch;
    mvaddstr(ya, gutter - 1, "\xe2\x94\x94"); // └
    dash_fmt_num(xr[0], num, sizeof num);
    dash_put(ya, gutter, cw, num);
    dash_fmt_num(xr[1], num, sizeof num);
    dash_put(ya, gutter + cw - (int)strlen(num), (int)strlen(num), num);
    int zx = dash_canvas_px(&c, 0, xr[0], xr[1]) / 2, lmin = (int)strlen(num);
    dash_fmt_num(xr[0], num, sizeof num);
    if (zx > (int)strlen(num) && zx < cw - lmin - 1)
        dash_put(ya, gutter + zx, 1, "0");
    dash_put(ya + 1, gutter + cw / 2 - 8, 30, "forgot \xe2\x86\x92 (0: kept all)");
    dash_canvas_release(&c);
    plot_legend(a, p, np, ya + 2, legend);
}
