/*
 * dash_app.h - the dashboard's internal state, shared by tui/dash.c (the loop, the runs list)
 * and tui/views.c (one view per run kind, called by dash.c, never calling back). The drawing
 * kit both use is tui/draw.h. Not a public API.
 */
#ifndef LK_DASH_APP_H
#define LK_DASH_APP_H

#include <stdint.h>

#include "../libcore/rdb.h"
#include "dash.h"
#include "draw.h"

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

/* The learned-against-forgot chart of an eval run with retention figures (tui/tradeoff.c). */
struct dash_tradeoff {
    struct rdb_retention *rows; /* owned [n]: the run's eval_retention rows */
    int n;
    struct dash_strv forgot;  /* the forgot metrics, in first-seen order */
    int metric;               /* the one shown across (index into forgot) */
    int show;                 /* 1: the chart takes the questions' place (c toggles) */
    int64_t run;              /* the run show was set for (kept across reloads) */
};

/* One system on the chart: forgot (x) on the metric shown, learned (y), 95% intervals. */
struct dash_point {
    const char *name;         /* borrowed: the system's name */
    double x, xlo, xhi;       /* NAN when not recorded */
    double y, ylo, yhi;
    int no_room;
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
    struct dash_tradeoff tradeoff;
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

// ---- views.c (called by dash.c) ----
/* The run open in a run view (NULL if it disappeared). */
const struct rdb_run *dash_cur_run(const struct dash_app *a);
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

// ---- tradeoff.c (called by views.c) ----
/* Loads run_id's retention rows (none: t->n == 0). For a run not shown before, the chart is
 * shown when there are rows, with the forgot metric: a score read with retrieval that the base
 * leaves room to forget, else the closed-book one, else text.nll. */
int dash_tradeoff_load(struct rdb *db, int64_t run_id, struct dash_tradeoff *t, struct lk_err *err);
void dash_tradeoff_release(struct dash_tradeoff *t); /* keeps show, metric and run */
/* The systems' points from eval_retention rows: learned F1 (accuracy when there is no F1) up,
 * forgot on metric across; systems in first-seen order, at most max. Returns how many. Pure. */
int dash_tradeoff_points(const struct rdb_retention *rows, int n, const char *metric, struct dash_point *out,
                         int max);
/* Title, braille scatter (one labelled mark per system with its interval whiskers, dotted zero
 * lines, axes) and, when there is room, a legend with the figures; in rows y .. y + h - 1. */
void dash_tradeoff_draw(struct dash_app *a, const struct dash_tradeoff *t, int y, int h);

#endif
