/*
 * dash.h - `lorakit dash`, the ncurses dashboard over the runs database (libcore/rdb.h).
 *
 * Four files, each calling only those listed after it:
 *   - the application (tui/dash.c): the key loop, the runs list, terminal set-up and
 *     restoration. tools/dash.c parses flags and calls dash_run.
 *   - the run views (tui/views.c, declared in dash_app.h): one per kind of run.
 *   - the drawing kit (tui/draw.c, draw.h): text on the screen, colours, wrapping, string lists,
 *     formatters of run fields.
 *   - plotting (tui/plot.c, below): downsampling a series to min/max per column bucket, a
 *     braille canvas (U+2800 block, 2x4 dots per cell), number formatting for axes and
 *     horizontal bars in eighth blocks. Pure functions on memory: unit-tested without a terminal.
 */
#ifndef LK_DASH_H
#define LK_DASH_H

#include <stddef.h>
#include <stdint.h>

#include "../libcore/lk.h"

// ---- plotting (no terminal needed) ----

/* Min and max of y per column bucket. Column c covers x in [x0 + c*d, x0 + (c+1)*d) with
 * d = (x1 - x0) / ncols; x == x1 falls in the last column, x outside [x0, x1] and NAN y are
 * skipped. Buckets with no point get NAN in both outputs. x need not be sorted. When
 * x1 <= x0 every point goes to column 0. out_lo and out_hi hold ncols values each. */
void dash_downsample(const double *x, const double *y, int64_t n, double x0, double x1,
                     int ncols, double *out_lo, double *out_hi);

/* A braille canvas of w x h cells, i.e. 2w x 4h dots; dot (0, 0) is the top left. */
struct dash_canvas {
    int w, h;
    unsigned char *dots; /* owned: w*h braille dot masks (bit layout of U+2800) */
    unsigned char *tag;  /* owned: w*h, the last series tag drawn into each cell (0: none) */
};

int dash_canvas_init(struct dash_canvas *c, int w, int h, struct lk_err *err);
/* Frees the cells and zeroes the struct; NULL-safe, harmless twice. */
void dash_canvas_release(struct dash_canvas *c);
void dash_canvas_clear(struct dash_canvas *c);
/* Sets one dot (out-of-range dots are ignored) and tags its cell with tag (> 0). */
void dash_canvas_dot(struct dash_canvas *c, int px, int py, int tag);
/* Row of dots for value y on a scale [ymin, ymax] drawn over 4h dot rows (ymax at the top;
 * ymin == ymax puts every value in the middle). */
int dash_canvas_py(const struct dash_canvas *c, double y, double ymin, double ymax);
/* Column of dots for value x on a scale [xmin, xmax] drawn over 2w dot columns (xmin at the
 * left; xmin == xmax puts every value in the middle). */
int dash_canvas_px(const struct dash_canvas *c, double x, double xmin, double xmax);
/* A straight line of dots from (px0, py0) to (px1, py1), both ends included (Bresenham). */
void dash_canvas_segment(struct dash_canvas *c, int px0, int py0, int px1, int py1, int tag);
/* Draws a downsampled series: column px (0 .. 2w-1) gets a vertical run of dots from lo[px]
 * to hi[px], joined to the previous non-empty column so the curve is connected. NAN columns
 * are gaps that do not break the joining. lo/hi hold 2w values. */
void dash_canvas_series(struct dash_canvas *c, const double *lo, const double *hi, double ymin,
                        double ymax, int tag);
/* Writes the UTF-8 encoding of the braille cell U+2800 + mask into out (3 bytes + NUL). */
void dash_braille_utf8(unsigned mask, char out[4]);
/* Row `row` of the canvas as UTF-8 (every cell, blank cells as U+2800): for tests and for
 * drawing. Returns bytes written (without the NUL), or 0 when cap is too small. */
size_t dash_canvas_row_utf8(const struct dash_canvas *c, int row, char *out, size_t cap);

/* Axis and table numbers: "0" for zero, %.3e for |v| < 1e-3 or >= 1e6, %.1f from 1000, else
 * %.4f; "-" for NAN. Fits in 11 bytes. */
void dash_fmt_num(double v, char *buf, size_t n);

/* A horizontal bar of frac (clamped to [0, 1]) of width cells in full and eighth blocks
 * (U+2588, U+2589..U+258F), padded with spaces to width. Returns bytes written. */
size_t dash_bar_utf8(double frac, int width, char *out, size_t cap);

/* Display width (terminal columns) of a UTF-8 string; invalid bytes count 1. */
int dash_str_width(const char *s);

// ---- the application ----

struct dash_opts {
    const char *path;         /* borrowed: the runs database file */
    int64_t open_run;         /* > 0: open this run at start */
    int bench_first_draw;     /* draw once off-screen, print the time taken, exit */
};

/* Runs the dashboard until the user quits (or a signal). Returns the exit status: 0, 1 when
 * the database could not be read (the message is in err and was shown on screen), 128+sig
 * after SIGINT/SIGTERM/SIGHUP. The terminal is restored on every path. */
int dash_run(const struct dash_opts *o, struct lk_err *err);

#endif
