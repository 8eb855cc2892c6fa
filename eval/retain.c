/*
 * retain.c - learned against forgot (see retain.h): the texts of --retain-text, the retention
 * figures of each system with paired bootstrap intervals, their JSON and their rows in the
 * runs database. Owns the texts and the figures.
 */
#include "retain.h"

#include <cJSON.h>
#include <ctype.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

// ---- texts ----

void ev_text_release(struct ev_text *t)
{
    if (!t)
        return;
    for (int i = 0; i < t->n; i++)
        lk_free(t->v[i]);
    lk_free(t->v);
    lk_free(t->line);
    memset(t, 0, sizeof *t);
}

static int blank(const char *s)
{
    for (; *s; s++)
        if (!isspace((unsigned char)*s))
            return 0;
    return 1;
}

/* One line: the "text" of a JSON object (jsonl), or the line without its end (plain). */
static int text_line(const char *buf, size_t len, int jsonl, const char *path, int line, char **out,
                     struct lk_err *err)
{
    *out = NULL;
    if (!jsonl) {
        while (len && (buf[len - 1] == '\n' || buf[len - 1] == '\r'))
            len--;
        if (!(*out = lk_malloc(len + 1)))
            return lk_errf(err, LK_ERR_NOMEM, "out of memory");
        memcpy(*out, buf, len);
        (*out)[len] = 0;
        return LK_OK;
    }
    cJSON *o = cJSON_ParseWithLength(buf, len);
    const cJSON *v = cJSON_IsObject(o) ? cJSON_GetObjectItemCaseSensitive(o, "text") : NULL;
    int rc = LK_OK;
    if (!cJSON_IsObject(o))
        rc = lk_errf(err, LK_ERR_FORMAT, "%s:%d: not a JSON object (the file's first line is one)", path, line);
    else if (!cJSON_IsString(v) || !v->valuestring || blank(v->valuestring))
        rc = lk_errf(err, LK_ERR_FORMAT, "%s:%d: missing or empty string field 'text'", path, line);
    else if (!(*out = lk_strdup(v->valuestring)))
        rc = lk_errf(err, LK_ERR_NOMEM, "out of memory");
    cJSON_Delete(o);
    return rc;
}

int ev_text_load(struct ev_text *t, const char *path, int limit, struct lk_err *err)
{
    memset(t, 0, sizeof *t);
    t->path = path;
    FILE *f = fopen(path, "rb");
    if (!f)
        return lk_errf(err, LK_ERR_IO, "%s: cannot open the texts file", path);
    char *buf = NULL;
    size_t cap = 0;
    ssize_t n;
    int line = 0, rc = LK_OK, alloc = 0, jsonl = -1;
    while (!rc && (limit <= 0 || t->n < limit) && (n = getline(&buf, &cap, f)) >= 0) {
        line++;
        if (blank(buf))
            continue;
        if (jsonl < 0) {
            const char *p = buf;
            while (isspace((unsigned char)*p))
                p++;
            jsonl = *p == '{';
        }
        if (t->n == alloc) {
            alloc = alloc ? alloc * 2 : 64;
            char **v = lk_realloc(t->v, sizeof *v * (size_t)alloc);
            int *ln = v ? lk_realloc(t->line, sizeof *ln * (size_t)alloc) : NULL;
            if (v)
                t->v = v;
            if (ln)
                t->line = ln;
            if (!v || !ln) {
                rc = lk_errf(err, LK_ERR_NOMEM, "out of memory");
                break;
            }
        }
        if (!(rc = text_line(buf, (size_t)n, jsonl, path, line, &t->v[t->n], err)))
            t->line[t->n++] = line;
    }
    if (!rc && ferror(f))
        rc = lk_errf(err, LK_ERR_IO, "%s: read error", path);
    free(buf); // getline's buffer comes from malloc
    fclose(f);
    if (!rc && t->n == 0)
        rc = lk_errf(err, LK_ERR_FORMAT, "%s: no text in the file", path);
    if (rc)
        ev_text_release(t);
    t->path = path;
    return rc;
}

// ---- learned and forgot ----

/* Salts that keep the retention streams apart from the summary's (same seed otherwise). */
#define SALT_RETAIN 0x7265746169ull
#define SALT_TEXT 0x74657874ull

void ev_retention_release(struct ev_retention *r)
{
    if (!r)
        return;
    lk_free(r->f);
    lk_free(r->l);
    memset(r, 0, sizeof *r);
}

const struct ev_learned *ev_retention_learned(const struct ev_retention *r, int s, enum ev_metric m)
{
    for (int i = 0; i < r->n_l; i++)
        if (r->l[i].sys == s && r->l[i].metric == m)
            return &r->l[i];
    return NULL;
}

static double mean_of(const double *v, size_t n)
{
    double s = 0;
    for (size_t i = 0; i < n; i++)
        s += v[i];
    return n ? s / (double)n : NAN;
}

/* One forgetting figure from paired values (b: base, v: system, k items); positive = forgot. */
static int forget_add(struct ev_retention *r, int sys, const char *metric, int lower_better, const double *b,
                      const double *v, size_t k, struct lk_rng *rng, struct lk_err *err)
{
    struct ev_forget *f = &r->f[r->n_f];
    memset(f, 0, sizeof *f);
    f->sys = sys;
    snprintf(f->metric, sizeof f->metric, "%s", metric);
    f->base = mean_of(b, k);
    f->value = mean_of(v, k);
    f->no_room = !lower_better && f->base < EV_NO_ROOM;
    int rc = lower_better ? ev_bootstrap_paired(v, b, k, 0, rng, &f->forgetting, err)
                          : ev_bootstrap_paired(b, v, k, 0, rng, &f->forgetting, err);
    if (!rc)
        r->n_f++;
    return rc;
}

/* System sys on the retain questions: each of its modes against the base mode with the same k. */
static int forget_retain(struct ev_retention *r, const struct ev_run *rt, int sys, uint64_t seed, double *b,
                         double *v, struct lk_err *err)
{
    static const enum ev_metric ms[4] = { EV_EM, EV_F1, EV_NLL, EV_ACC };
    int rc = LK_OK;
    for (int j = 0; j < rt->n_modes && !rc; j++) {
        if (rt->modes[j].tuned != sys + 1)
            continue;
        int bj = ev_run_find_mode(rt, 0, 0, rt->modes[j].k);
        if (bj < 0)
            continue;
        for (int q = 0; q < 4 && !rc; q++) {
            size_t k = 0;
            for (int i = 0; i < rt->n_items; i++) {
                double x = ev_cell_metric(ev_run_cell(rt, i, bj), ms[q]), y = ev_cell_metric(ev_run_cell(rt, i, j), ms[q]);
                if (!isnan(x) && !isnan(y))
                    b[k] = x, v[k++] = y;
            }
            if (!k)
                continue;
            char name[48];
            snprintf(name, sizeof name, "%s.%s", rt->modes[j].k ? rt->modes[bj].name : "closed",
                     ev_metric_names[ms[q]]);
            struct lk_rng rng;
            ev_stat_rng(rt, seed ^ SALT_RETAIN, bj, j, ms[q], &rng);
            rc = forget_add(r, sys, name, ms[q] == EV_NLL, b, v, k, &rng, err);
        }
    }
    return rc;
}

/* System sys on the texts: NLL per token against the base's. */
static int forget_text(struct ev_retention *r, const struct ev_text_run *t, int sys, uint64_t seed, double *b,
                       double *v, struct lk_err *err)
{
    size_t k = 0;
    for (int i = 0; i < t->n_items; i++) {
        double x = t->nll[(size_t)i * t->n_models], y = t->nll[(size_t)i * t->n_models + 1 + sys];
        if (!isnan(x) && !isnan(y))
            b[k] = x, v[k++] = y;
    }
    if (!k)
        return LK_OK;
    struct lk_rng rng;
    lk_rng_seed(&rng, seed * 0x9E3779B97F4A7C15ull ^ SALT_TEXT);
    return forget_add(r, sys, "text.nll", 1, b, v, k, &rng, err);
}

/* System sys on the run's questions: S - base closed book, from the summary's differences. */
static void learned_add(struct ev_retention *r, const struct ev_run *m, const struct ev_summary *s, int sys)
{
    static const enum ev_metric ms[4] = { EV_EM, EV_F1, EV_ACC, EV_NLL };
    int base = ev_run_find_mode(m, 0, 0, 0), ft = ev_run_find_mode(m, 1, sys, 0);
    for (int q = 0; q < 4 && base >= 0 && ft >= 0; q++) {
        const struct ev_diff *d = ev_summary_diff(s, ft, base, ms[q]);
        const struct ev_stat *sb = ev_summary_stat(s, base, ms[q]), *sf = ev_summary_stat(s, ft, ms[q]);
        if (!d || !sb || !sf)
            continue;
        struct ev_learned *l = &r->l[r->n_l++];
        l->sys = sys;
        l->metric = ms[q];
        l->base = sb->ci.mean;
        l->value = sf->ci.mean;
        l->gain = d->ci;
        if (ms[q] == EV_NLL) { // lower is better: the gain is base - system
            l->gain.mean = -d->ci.mean;
            l->gain.lo = -d->ci.hi;
            l->gain.hi = -d->ci.lo;
        }
    }
}

int ev_retention_compute(const struct ev_run *main, const struct ev_summary *main_sum,
                         const struct ev_run *retain, const struct ev_text_run *text, int n_systems,
                         const char *const *names, uint64_t seed, struct ev_retention *out,
                         struct lk_err *err)
{
    memset(out, 0, sizeof *out);
    out->n_systems = n_systems;
    out->names = names;
    int n_rt = retain ? retain->n_modes : 0;
    size_t n = (size_t)(retain ? retain->n_items : 0) + (size_t)(text ? text->n_items : 0) + 1;
    out->f = lk_calloc((size_t)n_systems * (size_t)(4 * n_rt + 1) + 1, sizeof *out->f);
    out->l = lk_calloc((size_t)n_systems * 4 + 1, sizeof *out->l);
    double *b = lk_malloc(sizeof(double) * n), *v = lk_malloc(sizeof(double) * n);
    int rc = !out->f || !out->l || !b || !v ? lk_errf(err, LK_ERR_NOMEM, "out of memory") : LK_OK;
    for (int s = 0; s < n_systems && !rc; s++) {
        learned_add(out, main, main_sum, s);
        if (retain)
            rc = forget_retain(out, retain, s, seed, b, v, err);
        if (!rc && text)
            rc = forget_text(out, text, s, seed, b, v, err);
    }
    // the headline: F1, or accuracy when the run's questions are all multiple choice
    int base = ev_run_find_mode(main, 0, 0, 0);
    out->headline = base >= 0 && !ev_summary_stat(main_sum, base, EV_F1) && ev_summary_stat(main_sum, base, EV_ACC)
                        ? EV_ACC : EV_F1;
    lk_free(b);
    lk_free(v);
    if (rc)
        ev_retention_release(out);
    return rc;
}

// ---- JSON and the runs database ----

/* {system, metric, base, value, ci_key: {mean, lo, hi, n}, flag_key: flag} appended to list. */
static int json_row(cJSON *list, const char *sys, const char *metric, double base, double value, const char *ci_key,
                    const struct ev_ci *ci, const char *flag_key, int flag)
{
    cJSON *o = cJSON_CreateObject(), *c = ev_ci_obj(ci);
    if (!o || !c) {
        cJSON_Delete(o);
        cJSON_Delete(c);
        return LK_ERR_NOMEM;
    }
    cJSON_AddStringToObject(o, "system", sys);
    cJSON_AddStringToObject(o, "metric", metric);
    ev_json_num(o, "base", base);
    ev_json_num(o, "value", value);
    cJSON_AddItemToObject(o, ci_key, c);
    cJSON_AddBoolToObject(o, flag_key, flag);
    cJSON_AddItemToArray(list, o);
    return LK_OK;
}

int ev_retention_json(const struct ev_retention *r, cJSON *root)
{
    cJSON *ret = cJSON_AddArrayToObject(root, "retention"), *lea = cJSON_AddArrayToObject(root, "learned");
    int rc = !ret || !lea ? LK_ERR_NOMEM : LK_OK;
    for (int i = 0; i < r->n_f && !rc; i++) {
        const struct ev_forget *f = &r->f[i];
        rc = json_row(ret, r->names[f->sys], f->metric, f->base, f->value, "forgetting", &f->forgetting, "no_room",
                      f->no_room);
    }
    for (int i = 0; i < r->n_l && !rc; i++) {
        const struct ev_learned *l = &r->l[i];
        rc = json_row(lea, r->names[l->sys], ev_metric_names[l->metric], l->base, l->value, "gain", &l->gain,
                      "headline", l->metric == r->headline);
    }
    return rc;
}

static int record_row(struct rdb *db, int64_t run_id, const char *sys, const char *kind, const char *metric,
                      double base, double value, const struct ev_ci *ci, int no_room, struct lk_err *err)
{
    struct rdb_retention x;
    memset(&x, 0, sizeof x);
    snprintf(x.system, sizeof x.system, "%s", sys);
    snprintf(x.kind, sizeof x.kind, "%s", kind);
    snprintf(x.metric, sizeof x.metric, "%s", metric);
    x.base = base;
    x.value = value;
    x.diff = ci->mean;
    x.lo = ci->lo;
    x.hi = ci->hi;
    x.n = (int64_t)ci->n;
    x.no_room = no_room;
    return rdb_eval_retention(db, run_id, &x, err);
}

int ev_retention_record(struct rdb *db, int64_t run_id, const struct ev_retention *r, struct lk_err *err)
{
    int rc = LK_OK;
    for (int i = 0; i < r->n_f && !rc; i++) {
        const struct ev_forget *f = &r->f[i];
        rc = record_row(db, run_id, r->names[f->sys], "forgot", f->metric, f->base, f->value, &f->forgetting,
                        f->no_room, err);
    }
    for (int i = 0; i < r->n_l && !rc; i++) {
        const struct ev_learned *l = &r->l[i];
        rc = record_row(db, run_id, r->names[l->sys], "learned", ev_metric_names[l->metric], l->base, l->value,
                        &l->gain, 0, err);
    }
    return rc;
}
