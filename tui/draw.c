/*
 * draw.c - the dashboard's drawing kit: text put on the curses screen (UTF-8 cut to a width,
 * control characters blanked), colours, word wrapping, growable string lists, and the small
 * formatters of run fields (JSON members, durations) that the runs list (tui/dash.c) and the
 * run views (tui/views.c) share. It knows nothing of the application: it calls only curses,
 * utf8proc, cJSON and plot.c's dash_str_width.
 */
#include "draw.h"

#include <cJSON.h>
#include <curses.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <time.h>
#include <utf8proc.h>

#include "dash.h"

// ---- strings ----

int dash_strv_push(struct dash_strv *s, const char *str)
{
    if (s->n == s->cap) {
        int ncap = s->cap ? s->cap * 2 : 16;
        char **nv = lk_realloc(s->v, sizeof *nv * (size_t)ncap);
        if (!nv)
            return LK_ERR_NOMEM;
        s->v = nv;
        s->cap = ncap;
    }
    char *d = lk_strdup(str ? str : "");
    if (!d)
        return LK_ERR_NOMEM;
    s->v[s->n++] = d;
    return LK_OK;
}

int dash_strv_pushf(struct dash_strv *s, const char *fmt, ...)
{
    char buf[2048];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(buf, sizeof buf, fmt, ap);
    va_end(ap);
    return dash_strv_push(s, buf);
}

void dash_strv_release(struct dash_strv *s)
{
    if (!s)
        return;
    for (int i = 0; i < s->n; i++)
        lk_free(s->v[i]);
    lk_free(s->v);
    memset(s, 0, sizeof *s);
}

/* Bytes of the longest prefix of s that fits in w columns (at least one character when
 * w > 0, so wrapping always progresses). Stops at '\n'. */
static size_t utf8_fit(const char *s, int w, int *out_w)
{
    const utf8proc_uint8_t *p = (const utf8proc_uint8_t *)s;
    size_t k = 0;
    int used = 0;
    while (p[k] && p[k] != '\n') {
        utf8proc_int32_t cp;
        utf8proc_ssize_t len = utf8proc_iterate(p + k, -1, &cp);
        int cw = 1;
        if (len <= 0)
            len = 1;
        else if ((cw = utf8proc_charwidth(cp)) < 0)
            cw = 1;
        if (used + cw > w && k > 0)
            break;
        if (used + cw > w && w <= 0)
            break;
        used += cw;
        k += (size_t)len;
    }
    if (out_w)
        *out_w = used;
    return k;
}

int dash_put(int y, int x, int w, const char *s)
{
    if (!s || w <= 0 || y < 0 || y >= LINES || x >= COLS)
        return 0;
    if (x + w > COLS)
        w = COLS - x;
    char buf[4096];
    const utf8proc_uint8_t *p = (const utf8proc_uint8_t *)s;
    size_t k = 0;
    int used = 0;
    while (*p && k + 8 < sizeof buf) {
        utf8proc_int32_t cp;
        utf8proc_ssize_t len = utf8proc_iterate(p, -1, &cp);
        if (len <= 0) { // invalid UTF-8: show a replacement, never raw bytes
            if (used + 1 > w)
                break;
            buf[k++] = '?';
            used++;
            p++;
            continue;
        }
        int cw = utf8proc_charwidth(cp);
        utf8proc_category_t cat = utf8proc_category(cp);
        if (cp < 0x20 || cp == 0x7f || cat == UTF8PROC_CATEGORY_CC) {
            if (used + 1 > w)
                break;
            buf[k++] = ' ';
            used++;
        } else {
            if (cw < 0)
                cw = 1;
            if (used + cw > w)
                break;
            memcpy(buf + k, p, (size_t)len);
            k += (size_t)len;
            used += cw;
        }
        p += len;
    }
    buf[k] = 0;
    mvaddstr(y, x, buf);
    return used;
}

int dash_putf(int y, int x, int w, const char *fmt, ...)
{
    char buf[2048];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(buf, sizeof buf, fmt, ap);
    va_end(ap);
    return dash_put(y, x, w, buf);
}

void dash_attr_on(int colors, int pair, int bold)
{
    if (colors && pair)
        attron(COLOR_PAIR(pair));
    if (bold)
        attron(A_BOLD);
}

void dash_attr_off(int colors, int pair, int bold)
{
    if (colors && pair)
        attroff(COLOR_PAIR(pair));
    if (bold)
        attroff(A_BOLD);
}

int dash_wrap(const char *s, int w, struct dash_strv *out)
{
    if (w < 1)
        w = 1;
    if (!s)
        return LK_OK;
    char line[4096];
    while (1) {
        // one paragraph (up to '\n'), greedy word wrap
        const char *p = s;
        while (*p == ' ')
            p++;
        if (!*p && *s != '\n' && s != p)
            break;
        size_t ln = 0;
        int lw = 0;
        while (*p && *p != '\n') {
            const char *ws = p;
            while (*p && *p != ' ' && *p != '\n')
                p++;
            size_t wl = (size_t)(p - ws);
            char word[1024];
            if (wl >= sizeof word)
                wl = sizeof word - 1;
            memcpy(word, ws, wl);
            word[wl] = 0;
            int ww = dash_str_width(word);
            if (ln && lw + 1 + ww <= w) {
                line[ln++] = ' ';
                memcpy(line + ln, word, wl);
                ln += wl;
                lw += 1 + ww;
            } else {
                if (ln) {
                    line[ln] = 0;
                    if (dash_strv_push(out, line))
                        return LK_ERR_NOMEM;
                    ln = 0;
                    lw = 0;
                }
                const char *q = word;
                while (*q) { // a word longer than the line is cut
                    int cw;
                    size_t b = utf8_fit(q, w, &cw);
                    if (!q[b]) {
                        memcpy(line, q, b);
                        ln = b;
                        lw = cw;
                        break;
                    }
                    memcpy(line, q, b);
                    line[b] = 0;
                    if (dash_strv_push(out, line))
                        return LK_ERR_NOMEM;
                    q += b;
                }
            }
            while (*p == ' ')
                p++;
            if (ln + 1100 > sizeof line) { // very long lines: flush early, keep memory bounded
                line[ln] = 0;
                if (dash_strv_push(out, line))
                    return LK_ERR_NOMEM;
                ln = 0;
                lw = 0;
            }
        }
        line[ln] = 0;
        if (dash_strv_push(out, line))
            return LK_ERR_NOMEM;
        if (*p != '\n')
            break;
        s = p + 1;
    }
    return LK_OK;
}

// ---- JSON and time ----

double dash_json_num(const char *json, const char *key)
{
    double v = NAN;
    cJSON *o = json ? cJSON_Parse(json) : NULL;
    const cJSON *it = o ? cJSON_GetObjectItemCaseSensitive(o, key) : NULL;
    if (cJSON_IsNumber(it))
        v = it->valuedouble;
    cJSON_Delete(o);
    return v;
}

int dash_json_str(const char *json, const char *key, char *buf, size_t n)
{
    buf[0] = 0;
    cJSON *o = json ? cJSON_Parse(json) : NULL;
    const cJSON *it = o ? cJSON_GetObjectItemCaseSensitive(o, key) : NULL;
    int ok = 0;
    if (cJSON_IsString(it) && it->valuestring) {
        snprintf(buf, n, "%s", it->valuestring);
        ok = 1;
    } else if (cJSON_IsNumber(it)) {
        snprintf(buf, n, "%g", it->valuedouble);
        ok = 1;
    }
    cJSON_Delete(o);
    return ok;
}

static int flatten(const cJSON *o, const char *prefix, struct dash_strv *out)
{
    for (const cJSON *it = o->child; it; it = it->next) {
        char key[256];
        if (it->string)
            snprintf(key, sizeof key, "%s%s%s", prefix, *prefix ? "." : "", it->string);
        else
            snprintf(key, sizeof key, "%s", prefix);
        if (cJSON_IsObject(it)) {
            if (flatten(it, key, out))
                return LK_ERR_NOMEM;
            continue;
        }
        int r;
        if (cJSON_IsString(it)) {
            r = dash_strv_pushf(out, "%s=%s", key, it->valuestring ? it->valuestring : "");
        } else if (cJSON_IsNumber(it)) {
            char num[32];
            double v = it->valuedouble;
            if (v == floor(v) && fabs(v) < 1e15)
                snprintf(num, sizeof num, "%.0f", v);
            else
                snprintf(num, sizeof num, "%.6g", v);
            r = dash_strv_pushf(out, "%s=%s", key, num);
        } else {
            char *t = cJSON_PrintUnformatted(it);
            r = dash_strv_pushf(out, "%s=%s", key, t ? t : "?");
            cJSON_free(t);
        }
        if (r)
            return r;
    }
    return LK_OK;
}

int dash_json_flatten(const char *json, struct dash_strv *out)
{
    if (!json || !*json)
        return LK_OK;
    cJSON *o = cJSON_Parse(json);
    if (!o)
        return dash_strv_pushf(out, "(not JSON) %s", json);
    int r = cJSON_IsObject(o) ? flatten(o, "", out) : dash_strv_pushf(out, "%s", json);
    cJSON_Delete(o);
    return r;
}

/* Seconds since the epoch of "YYYY-MM-DDTHH:MM:SSZ" (UTC), or NAN. Days from the civil
 * date as in Howard Hinnant's algorithm, so no timegm (not POSIX). */
static double iso_to_epoch(const char *t)
{
    int Y, M, D, h, m, s;
    if (!t || sscanf(t, "%4d-%2d-%2dT%2d:%2d:%2d", &Y, &M, &D, &h, &m, &s) != 6)
        return NAN;
    Y -= M <= 2;
    long era = (Y >= 0 ? Y : Y - 399) / 400;
    long yoe = Y - era * 400;
    long doy = (153 * (M + (M > 2 ? -3 : 9)) + 2) / 5 + D - 1;
    long doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    long days = era * 146097 + doe - 719468;
    return (double)days * 86400.0 + h * 3600.0 + m * 60.0 + s;
}

double dash_run_seconds(const struct rdb_run *r)
{
    double s = dash_json_num(r->summary_json, "seconds");
    if (isfinite(s) && r->finished_at)
        return s;
    double t0 = iso_to_epoch(r->started_at);
    double t1 = r->finished_at ? iso_to_epoch(r->finished_at) : (double)time(NULL);
    return isfinite(t0) && isfinite(t1) && t1 >= t0 ? t1 - t0 : NAN;
}

void dash_fmt_duration(double s, char *buf, size_t n)
{
    if (!isfinite(s))
        snprintf(buf, n, "-");
    else if (s < 10)
        snprintf(buf, n, "%.1fs", s);
    else if (s < 60)
        snprintf(buf, n, "%.0fs", s);
    else if (s < 3600)
        snprintf(buf, n, "%dm%02ds", (int)(s / 60), (int)fmod(s, 60));
    else
        snprintf(buf, n, "%dh%02dm", (int)(s / 3600), (int)fmod(s / 60, 60));
}
