/*
 * draw.h - the dashboard's drawing kit (tui/draw.c), shared by the runs list (tui/dash.c) and
 * the run views (tui/views.c): text on the curses screen, colours, wrapping, string lists and
 * the formatters of run fields. It depends on nothing of the application. Not a public API.
 */
#ifndef LK_DASH_DRAW_H
#define LK_DASH_DRAW_H

#include <stddef.h>

#include "../libcore/rdb.h"

/* A growable array of owned strings. */
struct dash_strv {
    char **v; /* owned: n strings, each owned */
    int n, cap;
};
int dash_strv_push(struct dash_strv *s, const char *str);
int dash_strv_pushf(struct dash_strv *s, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
void dash_strv_release(struct dash_strv *s);

/* Colour pairs (set up by the application when the terminal has colours). */
enum { DASH_C_LOSS = 1, DASH_C_EVAL, DASH_C_GOOD, DASH_C_BAD, DASH_C_LR, DASH_C_HEAD, DASH_C_BAR,
       DASH_C_WARN, DASH_C_DIM };
/* Writes s at (y, x), control characters as spaces, cut to w columns. Returns columns used. */
int dash_put(int y, int x, int w, const char *s);
int dash_putf(int y, int x, int w, const char *fmt, ...) __attribute__((format(printf, 4, 5)));
/* Colour pair `pair` (when colors is set and pair > 0) and bold (when bold) on / off. */
void dash_attr_on(int colors, int pair, int bold);
void dash_attr_off(int colors, int pair, int bold);
/* Word-wraps s (newlines kept) to lines of at most w columns, appended to out. */
int dash_wrap(const char *s, int w, struct dash_strv *out);
/* JSON helpers on a JSON object text (NULL-safe): a number / a string field. */
double dash_json_num(const char *json, const char *key);
int dash_json_str(const char *json, const char *key, char *buf, size_t n);
/* "key=value" for every leaf of a JSON object (nested keys joined by '.'). */
int dash_json_flatten(const char *json, struct dash_strv *out);
/* Duration of a run in seconds (summary "seconds" if given, else from the timestamps; a
 * running run counts to now); NAN if unknown. */
double dash_run_seconds(const struct rdb_run *r);
void dash_fmt_duration(double s, char *buf, size_t n);

#endif
