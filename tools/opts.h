/*
 * opts.h - one flag table per command, used both to parse argv and to print --help,
 * so the two cannot drift (curl's option table). Numbers go through strtol/strtod,
 * fully checked: `--rank abc` is a usage error.
 */
#ifndef LK_OPTS_H
#define LK_OPTS_H

#include <stdio.h>

#include "../libcore/lk.h"

enum opt_type {
    OPT_STR,   /* const char **     */
    OPT_INT,   /* long *            */
    OPT_FLOAT, /* double *          */
    OPT_FLAG,  /* int *  (set to 1) */
    OPT_LIST,  /* struct opt_list * (repeatable; each use appends) */
};

struct opt_list {
    const char *v[64];
    int n;
};

struct opt {
    const char *name;  /* long name without dashes, e.g. "rank" */
    enum opt_type type;
    void *dst;
    const char *arg;   /* metavariable shown in help, e.g. "R"; NULL for flags */
    const char *help;  /* one line; mention the default */
};

struct cmd_help {
    const char *name;     /* "merge" */
    const char *synopsis; /* "--model DIR --adapter DIR --out DIR [options]" */
    const char *about;    /* a paragraph */
    const char *example;  /* one or more example lines */
};

/* Parses argv[1..] (argv[0] is the command name). Non-flag arguments are collected into
 * positional (at most max_pos); `--help`/`-h` sets *help. Returns LK_OK or LK_ERR_USAGE
 * with a message. */
int opts_parse(int argc, char **argv, const struct opt *opts, const char **positional,
               int max_pos, int *n_pos, int *help, struct lk_err *err);
void opts_usage(FILE *f, const struct cmd_help *h, const struct opt *opts);

/* The one CLI failure path: prints "lorakit CMD: error: MSG" on stderr and returns 2 for
 * usage errors, else 1; an interrupted run (LK_ERR_INTERRUPTED) prints "lorakit CMD: MSG" and
 * returns 130, as a shell does for SIGINT. */
int lk_cli_fail(const char *cmd, const struct lk_err *err);
/* Prints "lorakit CMD: warning: MSG" on stderr when msg is non-empty (e.g. rdb_rec.warning). */
void lk_cli_warn(const char *cmd, const char *msg);
/* Warns about adapter_config.json keys that PEFT 0.20's LoraConfig does not have (a newer
 * PEFT's fields, which lorakit ignores): "lorakit CMD: warning: DIR/adapter_config.json: ...".
 * lc is the config read by the command, or NULL: then DIR's config is read here (one that does
 * not load is left for the command's own reader to refuse). */
struct lora_config;
void lk_cli_adapter_keys(const char *cmd, const char *dir, const struct lora_config *lc);
/* --threads N of every command: OpenBLAS's and OpenMP's thread counts; N <= 0 keeps their
 * default (all cores, or OPENBLAS_NUM_THREADS / OMP_NUM_THREADS). */
void lk_cli_threads(long n);
/* --weights of the commands that run a model: "file" keeps the weight matrices in the file's
 * bf16 / f16 (widened in the kernels), "f32" widens them once at load (for comparison). s NULL:
 * def. Fills *keep with MODEL_KEEP_FILE or MODEL_KEEP_F32 (model.h). */
int lk_cli_weights(const char *s, int def, int *keep, struct lk_err *err);
/* v as printf's fmt ("%.6g", "%.3f") prints it, read back: for the numbers of a run record, so
 * that one built with cJSON stores the precision the record always had. NAN stays NAN (cJSON
 * writes null). */
double lk_cli_round(double v, const char *fmt);

/* Parses "1,2,3" into a long array (heap, caller frees). */
int opts_parse_longs(const char *s, long **out, int *n, struct lk_err *err);

#endif
