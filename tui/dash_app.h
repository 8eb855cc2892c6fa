/*
 * dash_app.h - the dashboard's internal state, shared by tui/dash.c (the loop, the runs list,
 * drawing helpers) and tui/views.c (one view per run kind). Not a public API.
 */
#ifndef LK_DASH_APP_H
#define LK_DASH_APP_H

#include <stdint.h>

#include "../libcore/rdb.h"
#include "dash.h"

/* A growable array of owned strings. */
struct dash_strv {
    char **v; /* owned: n strings, each owned */
    int n, cap;
};
int dash_strv_push(struct dash_strv *s, const char *str);
int dash_strv_pushf(struct dash_strv *s, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
void dash_strv_release(struct dash_strv *s);

enum dash_view { DASH_LIST, DASH_RUN, DASH_QUESTION };

struct dash_train {
    int64_t n, cap;          /* steps loaded */
    double *x, *loss, *lr;   /* owned: [cap] step number, loss, learning rate (NAN if none) */
    double *tps, *elapsed;   /* owned: [cap] tokens/s, elapsed seconds */
    int64_t n_ev, cap_ev;
    double *ex, *ey;         /* owned: [cap_ev] steps that have an eval loss, and the values */
    int64_t last_step;       /* highest step loaded (-1: none) */
};

struct dash_eval {
    struct dash_strv modes, metrics;
    double *val, *lo, *hi;   /* owned: [n_modes * n_metrics], NAN when absent */
    int64_t *nn;             /* owned: [n_modes * n_metrics], -1 when absent */
    struct dash_strv item_ids, item_q;
    int col;                 /* first metric column shown */
};

struct dash_question {
    int idx;                 /* index into eval.item_ids */
    char *question, *reference; /* owned */
    struct dash_strv mode, answer, retrieved, scores;
};

struct dash_tensor {
    char *name;              /* owned */
    int64_t rows, cols, rank;
    double fro, rel_change, eff_rank, energy, rel_error;
    int layer;               /* from "layers.N.", -1 when none */
};

struct dash_layer {
    int layer;
    double rel_max, energy_mean, rank_mean;
};

struct dash_app {
    struct dash_opts o;
    struct rdb db;
    int have_db;
    char fatal[512];         /* the database cannot be read: shown instead of any view */
    char note[512];          /* a transient message (a failed refresh), shown above the footer */

    struct rdb_run *runs;    /* owned: newest first */
    int n_runs;
    struct dash_strv keys;   /* one key figure per run */
    int *vis;                /* owned: indices of runs passing the filter */
    int n_vis;

    char filter[64];
    int filtering;           /* the footer is a filter prompt */

    enum dash_view view;
    int sel, top;            /* runs list */
    int pane, n_panes;       /* focused pane in a run view */
    int64_t run_id;          /* the run open in DASH_RUN / DASH_QUESTION */

    // per-view data of the open run (released when another run is opened)
    struct dash_train train;
    struct dash_eval eval;
    struct dash_question q;
    struct dash_tensor *tensors;
    int n_tensors;
    struct dash_layer *layers;
    int n_layers;
    int bar_metric;          /* 0 rel change, 1 energy kept, 2 rank */
    struct dash_strv lines;  /* merge / other kinds: lines to show; train: parameters */
    int psel[2], ptop[2];    /* selection and scroll of two panes */
    int scroll;              /* question view */
    int colors;
};

// ---- dash.c: drawing helpers ----
enum { DASH_C_LOSS = 1, DASH_C_EVAL, DASH_C_GOOD, DASH_C_BAD, DASH_C_LR, DASH_C_HEAD, DASH_C_BAR,
       DASH_C_WARN, DASH_C_DIM };
/* Writes s at (y, x), control characters as spaces, cut to w columns. Returns columns used. */
int dash_put(int y, int x, int w, const char *s);
int dash_putf(int y, int x, int w, const char *fmt, ...) __attribute__((format(printf, 4, 5)));
void dash_attr_on(struct dash_app *a, int pair, int bold);
void dash_attr_off(struct dash_app *a, int pair, int bold);
/* Word-wraps s (newlines kept) to lines of at most w columns, appended to out. */
int dash_wrap(const char *s, int w, struct dash_strv *out);
/* The run open in a run view (NULL if it disappeared). */
const struct rdb_run *dash_cur_run(const struct dash_app *a);
/* JSON helpers on a JSON object text (NULL-safe): a number / a string field. */
double dash_json_num(const char *json, const char *key);
int dash_json_str(const char *json, const char *key, char *buf, size_t n);
/* "key=value" for every leaf of a JSON object (nested keys joined by '.'). */
int dash_json_flatten(const char *json, struct dash_strv *out);
/* Duration of a run in seconds (summary "seconds" if given, else from the timestamps; a
 * running run counts to now); NAN if unknown. */
double dash_run_seconds(const struct rdb_run *r);
void dash_fmt_duration(double s, char *buf, size_t n);

// ---- views.c ----
/* Loads everything the run view needs for run a->run_id (kind-specific). */
int dash_view_load(struct dash_app *a, struct lk_err *err);
/* Loads what changed of a live run (new train steps; other kinds reload). */
int dash_view_refresh(struct dash_app *a, struct lk_err *err);
void dash_view_release(struct dash_app *a);
void dash_view_draw(struct dash_app *a, int y0, int h);
/* Handles a key in the run or question view; returns 1 when used. */
int dash_view_key(struct dash_app *a, int ch);
const char *dash_view_footer(const struct dash_app *a);
int dash_question_open(struct dash_app *a, int idx, struct lk_err *err);
/* Energy kept of a tensor from its energy_json / extra_json (NAN if not given). */
double dash_energy_kept(const char *energy_json, const char *extra_json);

#endif
