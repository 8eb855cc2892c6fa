/*
 * opts.c - flag parsing and help printing from one table per command. See opts.h.
 */
#include "opts.h"

#include <cblas.h>
#include <errno.h>
#include <math.h>
#include <omp.h>
#include <stdlib.h>
#include <string.h>

#include "../libcore/lora.h"
#include "../libcore/model.h"

static const struct opt *opts_find(const struct opt *opts, const char *name, size_t n)
{
    for (const struct opt *o = opts; o && o->name; o++)
        if (strlen(o->name) == n && !strncmp(o->name, name, n))
            return o;
    return NULL;
}

static int opts_set(const struct opt *o, const char *val, struct lk_err *err)
{
    char *end;
    switch (o->type) {
    case OPT_STR:
        *(const char **)o->dst = val;
        return LK_OK;
    case OPT_INT: {
        errno = 0;
        long v = strtol(val, &end, 10);
        if (errno || end == val || *end)
            return lk_errf(err, LK_ERR_USAGE, "option '--%s' wants an integer, got '%s'", o->name, val);
        *(long *)o->dst = v;
        return LK_OK;
    }
    case OPT_FLOAT: {
        errno = 0;
        double v = strtod(val, &end);
        if (errno || end == val || *end || !isfinite(v))
            return lk_errf(err, LK_ERR_USAGE, "option '--%s' wants a number, got '%s'", o->name, val);
        *(double *)o->dst = v;
        return LK_OK;
    }
    case OPT_LIST: {
        struct opt_list *l = o->dst;
        if (l->n >= (int)(sizeof l->v / sizeof l->v[0]))
            return lk_errf(err, LK_ERR_USAGE, "option '--%s' given too many times", o->name);
        l->v[l->n++] = val;
        return LK_OK;
    }
    case OPT_FLAG:
        *(int *)o->dst = 1;
        return LK_OK;
    }
    return LK_ERR_USAGE;
}

int opts_parse(int argc, char **argv, const struct opt *opts, const char **positional,
               int max_pos, int *n_pos, int *help, struct lk_err *err)
{
    int np = 0, only_pos = 0;
    if (help)
        *help = 0;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (!only_pos && (!strcmp(a, "--help") || !strcmp(a, "-h"))) {
            if (help)
                *help = 1;
            continue;
        }
        if (!only_pos && !strcmp(a, "--")) {
            only_pos = 1;
            continue;
        }
        if (!only_pos && a[0] == '-' && a[1] == '-' && a[2]) {
            const char *name = a + 2;
            const char *eq = strchr(name, '=');
            size_t n = eq ? (size_t)(eq - name) : strlen(name);
            const struct opt *o = opts_find(opts, name, n);
            if (!o)
                return lk_errf(err, LK_ERR_USAGE, "unknown option '--%.*s' (see --help)", (int)n, name);
            if (o->type == OPT_FLAG) {
                if (eq)
                    return lk_errf(err, LK_ERR_USAGE, "option '--%s' takes no value", o->name);
                opts_set(o, NULL, err);
                continue;
            }
            const char *val;
            if (eq)
                val = eq + 1;
            else if (i + 1 < argc)
                val = argv[++i];
            else
                return lk_errf(err, LK_ERR_USAGE, "option '--%s' needs a value", o->name);
            if (opts_set(o, val, err))
                return LK_ERR_USAGE;
            continue;
        }
        if (np >= max_pos)
            return lk_errf(err, LK_ERR_USAGE, "unexpected argument '%s' (see --help)", a);
        positional[np++] = a;
    }
    if (n_pos)
        *n_pos = np;
    return LK_OK;
}

void opts_usage(FILE *f, const struct cmd_help *h, const struct opt *opts)
{
    fprintf(f, "usage: lorakit %s %s\n\n", h->name, h->synopsis);
    if (h->about)
        fprintf(f, "%s\n\n", h->about);
    if (opts && opts->name) {
        fprintf(f, "options:\n");
        for (const struct opt *o = opts; o->name; o++) {
            char left[64];
            if (o->arg)
                snprintf(left, sizeof left, "--%s %s", o->name, o->arg);
            else
                snprintf(left, sizeof left, "--%s", o->name);
            fprintf(f, "  %-24s %s\n", left, o->help);
        }
        fprintf(f, "  %-24s %s\n", "--help", "show this help");
    }
    if (h->example)
        fprintf(f, "\nexample:\n%s\n", h->example);
}

int lk_cli_fail(const char *cmd, const struct lk_err *err)
{
    const char *msg = err->msg[0] ? err->msg : lk_status_str(err->code);
    if (err->code == LK_ERR_INTERRUPTED) { // Ctrl-C or SIGTERM: the shell's 128 + SIGINT
        fprintf(stderr, "lorakit %s: %s\n", cmd, msg);
        return 130;
    }
    fprintf(stderr, "lorakit %s: error: %s\n", cmd, msg);
    return err->code == LK_ERR_USAGE ? 2 : 1;
}

void lk_cli_warn(const char *cmd, const char *msg)
{
    if (msg && msg[0])
        fprintf(stderr, "lorakit %s: warning: %s\n", cmd, msg);
}

void lk_cli_adapter_keys(const char *cmd, const char *dir, const struct lora_config *lc)
{
    struct lora_config own;
    if (!lc) {
        if (lora_config_load(&own, dir, NULL) != LK_OK)
            return;
        lc = &own;
    }
    if (lc->unknown_keys)
        fprintf(stderr, "lorakit %s: warning: %s/adapter_config.json: unknown keys %s (fields of a newer PEFT?): "
                "ignored\n", cmd, dir, lc->unknown_keys);
    if (lc == &own)
        lora_config_release(&own);
}

void lk_cli_threads(long n)
{
    if (n > 0) {
        openblas_set_num_threads((int)n);
        omp_set_num_threads((int)n);
    }
}

int lk_cli_weights(const char *s, int def, int *keep, struct lk_err *err)
{
    if (!s)
        *keep = def;
    else if (!strcmp(s, "file"))
        *keep = MODEL_KEEP_FILE;
    else if (!strcmp(s, "f32"))
        *keep = MODEL_KEEP_F32;
    else
        return lk_errf(err, LK_ERR_USAGE, "unknown --weights '%s' (file: as the model file stores them; f32)", s);
    return LK_OK;
}

double lk_cli_round(double v, const char *fmt)
{
    char buf[64];
    if (!isfinite(v))
        return v;
    snprintf(buf, sizeof buf, fmt, v);
    return strtod(buf, NULL);
}

int opts_parse_longs(const char *s, long **out, int *n, struct lk_err *err)
{
    int cap = 16, k = 0;
    long *v = lk_malloc(sizeof(long) * (size_t)cap);
    if (!v)
        return lk_errf(err, LK_ERR_NOMEM, "out of memory");
    const char *p = s;
    while (*p) {
        char *end;
        errno = 0;
        long x = strtol(p, &end, 10);
        if (errno || end == p) {
            lk_free(v);
            return lk_errf(err, LK_ERR_USAGE, "bad integer list '%s'", s);
        }
        if (k == cap) {
            cap *= 2;
            long *nv = lk_realloc(v, sizeof(long) * (size_t)cap);
            if (!nv) {
                lk_free(v);
                return lk_errf(err, LK_ERR_NOMEM, "out of memory");
            }
            v = nv;
        }
        v[k++] = x;
        p = end;
        if (*p == ',')
            p++;
        else if (*p) {
            lk_free(v);
            return lk_errf(err, LK_ERR_USAGE, "bad integer list '%s'", s);
        }
    }
    *out = v;
    *n = k;
    return LK_OK;
}
