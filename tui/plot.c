/*
 * plot.c - terminal-free drawing for the dashboard: min/max downsampling per column, a
 * braille canvas, axis number formatting and eighth-block bars. See dash.h.
 * Owns: the canvas cells. Nothing here touches curses, so tests call it directly.
 */
#include "dash.h"

#include <math.h>
#include <stdio.h>
#include <string.h>
#include <utf8proc.h>

// ---- downsampling ----

void dash_downsample(const double *x, const double *y, int64_t n, double x0, double x1,
                     int ncols, double *out_lo, double *out_hi)
{
    for (int c = 0; c < ncols; c++)
        out_lo[c] = out_hi[c] = NAN;
    if (ncols <= 0)
        return;
    double span = x1 - x0;
    // One pass, O(n): a 100,000-step run costs a few hundred microseconds per redraw, so the
    // plot needs no cache and stays correct while rows arrive.
    for (int64_t i = 0; i < n; i++) {
        double v = y[i], xi = x[i];
        if (isnan(v) || isnan(xi) || xi < x0 || xi > x1)
            continue;
        int c = 0;
        if (span > 0) {
            double f = (xi - x0) / span * ncols;
            c = f >= ncols ? ncols - 1 : (int)f;
        }
        if (isnan(out_lo[c]) || v < out_lo[c])
            out_lo[c] = v;
        if (isnan(out_hi[c]) || v > out_hi[c])
            out_hi[c] = v;
    }
}

// ---- braille canvas ----

/* Bit of dot (column dx 0..1, row dy 0..3) in a braille cell: dots 1-2-3 and 4-5-6 run down
 * the two columns, dots 7 and 8 were added below them later, hence the irregular order. */
static const unsigned char braille_bit[4][2] = {
    { 0x01, 0x08 },
    { 0x02, 0x10 },
    { 0x04, 0x20 },
    { 0x40, 0x80 },
};

int dash_canvas_init(struct dash_canvas *c, int w, int h, struct lk_err *err)
{
    memset(c, 0, sizeof *c);
    if (w < 1 || h < 1)
        return lk_errf(err, LK_ERR_USAGE, "canvas of %d x %d cells", w, h);
    size_t n = (size_t)w * (size_t)h;
    c->dots = lk_calloc(n, 1);
    c->tag = lk_calloc(n, 1);
    if (!c->dots || !c->tag) {
        dash_canvas_release(c);
        return lk_errf(err, LK_ERR_NOMEM, "out of memory for a %d x %d canvas", w, h);
    }
    c->w = w;
    c->h = h;
    return LK_OK;
}

void dash_canvas_release(struct dash_canvas *c)
{
    if (!c)
        return;
    lk_free(c->dots);
    lk_free(c->tag);
    memset(c, 0, sizeof *c);
}

void dash_canvas_clear(struct dash_canvas *c)
{
    size_t n = (size_t)c->w * (size_t)c->h;
    memset(c->dots, 0, n);
    memset(c->tag, 0, n);
}

void dash_canvas_dot(struct dash_canvas *c, int px, int py, int tag)
{
    if (px < 0 || py < 0 || px >= 2 * c->w || py >= 4 * c->h)
        return;
    size_t i = (size_t)(py / 4) * (size_t)c->w + (size_t)(px / 2);
    c->dots[i] |= braille_bit[py % 4][px % 2];
    if (tag > 0)
        c->tag[i] = (unsigned char)tag;
}

int dash_canvas_py(const struct dash_canvas *c, double y, double ymin, double ymax)
{
    int rows = 4 * c->h;
    if (!(ymax > ymin))
        return rows / 2;
    double f = (ymax - y) / (ymax - ymin);
    int py = (int)lround(f * (rows - 1));
    return py < 0 ? 0 : py >= rows ? rows - 1 : py;
}

int dash_canvas_px(const struct dash_canvas *c, double x, double xmin, double xmax)
{
    int cols = 2 * c->w;
    if (!(xmax > xmin))
        return cols / 2;
    double f = (x - xmin) / (xmax - xmin);
    int px = (int)lround(f * (cols - 1));
    return px < 0 ? 0 : px >= cols ? cols - 1 : px;
}

static void canvas_vline(struct dash_canvas *c, int px, int a, int b, int tag)
{
    if (a > b) {
        int t = a;
        a = b;
        b = t;
    }
    for (int py = a; py <= b; py++)
        dash_canvas_dot(c, px, py, tag);
}

static void canvas_line(struct dash_canvas *c, int x0, int y0, int x1, int y1, int tag)
{
    // Bresenham, all octants
    int dx = x1 > x0 ? x1 - x0 : x0 - x1, sx = x0 < x1 ? 1 : -1;
    int dy = y1 > y0 ? y0 - y1 : y1 - y0, sy = y0 < y1 ? 1 : -1;
    int e = dx + dy;
    for (;;) {
        dash_canvas_dot(c, x0, y0, tag);
        if (x0 == x1 && y0 == y1)
            break;
        int e2 = 2 * e;
        if (e2 >= dy) {
            e += dy;
            x0 += sx;
        }
        if (e2 <= dx) {
            e += dx;
            y0 += sy;
        }
    }
}

void dash_canvas_segment(struct dash_canvas *c, int px0, int py0, int px1, int py1, int tag)
{
    canvas_line(c, px0, py0, px1, py1, tag);
}

void dash_canvas_series(struct dash_canvas *c, const double *lo, const double *hi, double ymin,
                        double ymax, int tag)
{
    int prev_px = -1, prev_top = 0, prev_bot = 0;
    for (int px = 0; px < 2 * c->w; px++) {
        if (isnan(lo[px]))
            continue;
        int top = dash_canvas_py(c, hi[px], ymin, ymax); // smaller py = higher value
        int bot = dash_canvas_py(c, lo[px], ymin, ymax);
        canvas_vline(c, px, top, bot, tag);
        if (prev_px >= 0) {
            // join the nearer ends of the two columns' ranges (a gap of empty buckets, as
            // when there are fewer points than columns, becomes a straight segment)
            int from, to;
            if (top > prev_bot) {
                from = prev_bot;
                to = top;
            } else if (bot < prev_top) {
                from = prev_top;
                to = bot;
            } else {
                from = to = (top > prev_top ? top : prev_top);
            }
            canvas_line(c, prev_px, from, px, to, tag);
        }
        prev_px = px;
        prev_top = top;
        prev_bot = bot;
    }
}

void dash_braille_utf8(unsigned mask, char out[4])
{
    unsigned cp = 0x2800 + (mask & 0xff);
    out[0] = (char)(0xe0 | (cp >> 12));
    out[1] = (char)(0x80 | ((cp >> 6) & 0x3f));
    out[2] = (char)(0x80 | (cp & 0x3f));
    out[3] = 0;
}

size_t dash_canvas_row_utf8(const struct dash_canvas *c, int row, char *out, size_t cap)
{
    if (row < 0 || row >= c->h || cap < (size_t)c->w * 3 + 1)
        return 0;
    size_t k = 0;
    for (int x = 0; x < c->w; x++) {
        dash_braille_utf8(c->dots[(size_t)row * (size_t)c->w + (size_t)x], out + k);
        k += 3;
    }
    out[k] = 0;
    return k;
}

// ---- numbers, bars, widths ----

void dash_fmt_num(double v, char *buf, size_t n)
{
    double a = fabs(v);
    if (isnan(v))
        snprintf(buf, n, "-");
    else if (v == 0)
        snprintf(buf, n, "0");
    else if (isinf(v))
        snprintf(buf, n, v > 0 ? "inf" : "-inf");
    else if (a < 1e-3 || a >= 1e6)
        snprintf(buf, n, "%.3e", v);
    else if (a >= 1000)
        snprintf(buf, n, "%.1f", v);
    else
        snprintf(buf, n, "%.4f", v);
}

size_t dash_bar_utf8(double frac, int width, char *out, size_t cap)
{
    if (width < 0 || cap < (size_t)width * 3 + 1) {
        if (cap)
            out[0] = 0;
        return 0;
    }
    if (!(frac > 0))
        frac = 0; // also NAN
    if (frac > 1)
        frac = 1;
    long eighths = lround(frac * width * 8);
    size_t k = 0;
    for (int i = 0; i < width; i++) {
        long e = eighths - 8L * i;
        if (e >= 8) {
            memcpy(out + k, "\xe2\x96\x88", 3); // U+2588 full block
            k += 3;
        } else if (e > 0) {
            // U+2589 is 7/8, down to U+258F for 1/8
            unsigned cp = 0x2588 + (unsigned)(8 - e);
            out[k++] = (char)(0xe0 | (cp >> 12));
            out[k++] = (char)(0x80 | ((cp >> 6) & 0x3f));
            out[k++] = (char)(0x80 | (cp & 0x3f));
        } else {
            out[k++] = ' ';
        }
    }
    out[k] = 0;
    return k;
}

int dash_str_width(const char *s)
{
    const utf8proc_uint8_t *p = (const utf8proc_uint8_t *)s;
    int w = 0;
    while (*p) {
        utf8proc_int32_t cp;
        utf8proc_ssize_t k = utf8proc_iterate(p, -1, &cp);
        if (k <= 0) {
            w++;
            p++;
            continue;
        }
        int cw = utf8proc_charwidth(cp);
        w += cw < 0 ? 1 : cw;
        p += k;
    }
    return w;
}
