/*
 * retain.h - what the tuned systems kept of what the base knew, next to what they learned.
 *
 * Fine-tuning on a new domain can cost the base some of what it knew (catastrophic forgetting;
 * Biderman et al. 2024, "LoRA Learns Less and Forgets Less", measured it against the gain). The
 * eval measures both on the same run:
 *
 *   learned    each system against the base on the run's questions (--qa, the new knowledge):
 *              gain = system - base, closed book (NLL: base - system), paired on the items
 *   forgot     each system against the base on questions from the domain the base knew
 *              (--retain, closed book, and with retrieval over --retain-docs, so reading counts
 *              too) and on plain text (--retain-text, NLL per token):
 *              forgetting = base - system (NLL: system - base), paired on the items
 *
 * Both signs are chosen so that a positive value means "learned" and "forgot" respectively.
 * Every figure is a mean with a 95% bootstrap interval (eval/metrics.h); every system is
 * resampled on the same items with the same resamples as every other, so two systems that
 * answer alike get the same interval, and a system identical to the base forgets exactly 0 with
 * an interval of zero width.
 *
 * A score the base itself barely has (closed-book EM or F1 below EV_NO_ROOM, as on a model that
 * reads rather than recalls) leaves no room to forget: such a row is flagged no_room, and the
 * report says that it measures nothing.
 */
#ifndef LK_EV_RETAIN_H
#define LK_EV_RETAIN_H

#include <stdint.h>

#include "harness.h"

#define EV_NO_ROOM 0.05 /* a base mean below this leaves no room to forget (EM, F1, accuracy) */

// ---- texts ----

/* Plain texts scored by NLL per token: a JSONL file of {"text": ...} objects (other fields
 * ignored), or any other text file, one text per non-blank line. Which one is decided by the
 * first non-blank line (a '{' starts JSONL). */
struct ev_text {
    char **v;          /* owned [n] */
    int *line;         /* owned [n]: 1-based line of each text */
    int n;
    const char *path;  /* borrowed: for messages */
};

/* At most limit texts (<= 0: all). A JSONL line that is not an object with a non-empty string
 * "text" is LK_ERR_FORMAT naming file:line; an empty file is an error too. */
int ev_text_load(struct ev_text *t, const char *path, int limit, struct lk_err *err);
void ev_text_release(struct ev_text *t); /* NULL-safe, harmless twice */

struct ev_text_run {
    int n_items, n_models;  /* models: 0 the base, 1 + s the system s */
    double *nll;            /* owned [n_items * n_models], item-major; NAN for a text with no token */
    int *tokens;            /* owned [n_items]: tokens scored */
    double seconds;
};

/* Scores every text under the base and every system (n_systems >= 1): the NLL per
 * token of the text's tokens (cut to the context less one), each given the ones before it,
 * after one end-of-text token (BOS when the tokenizer adds one). In eval/harness.c. */
int ev_text_run_all(struct ev_text_run *r, const struct ev_config *c, const struct ev_system *systems,
                    int n_systems, const struct ev_text *t, ev_progress_fn progress, void *ctx,
                    struct lk_err *err);
void ev_text_run_release(struct ev_text_run *r);

// ---- learned and forgot ----

/* One system on one retention metric. */
struct ev_forget {
    int sys;                 /* index of the system */
    char metric[48];         /* "closed.em", "rag.f1", "rag@3.nll", "text.nll", ... */
    double base, value;      /* means over the items, base and system */
    struct ev_ci forgetting; /* base - system (NLL: system - base), paired 95% bootstrap */
    int no_room;             /* the base's mean is below EV_NO_ROOM: nothing to forget */
};

/* One system's gain on the run's questions, closed book. */
struct ev_learned {
    int sys;
    enum ev_metric metric;   /* EV_EM, EV_F1, EV_ACC, EV_NLL */
    double base, value;
    struct ev_ci gain;       /* system - base (NLL: base - system), paired 95% bootstrap */
};

struct ev_retention {
    int n_systems;
    const char *const *names; /* borrowed [n_systems] */
    struct ev_forget *f;      /* owned [n_f]: by system, then retain mode, then metric, text last */
    int n_f;
    struct ev_learned *l;     /* owned [n_l]: by system, then metric */
    int n_l;
    enum ev_metric headline;  /* F1, or accuracy when every question is multiple choice */
};

/* The retention figures. main and main_sum: the run on --qa and its summary (learned is its
 * S - base difference, closed book: the same figure as in the summary's diffs); retain: the run
 * on --retain with modes base, rag@k..., and each system's (or NULL); text: the texts' run (or
 * NULL). Modes are matched by (tuned, sys, k). seed: the bootstrap seed; every forgetting
 * figure of one kind (retain mode and metric, or text) uses one random stream whatever the
 * system, so all systems are resampled alike. */
int ev_retention_compute(const struct ev_run *main, const struct ev_summary *main_sum,
                         const struct ev_run *retain, const struct ev_text_run *text, int n_systems,
                         const char *const *names, uint64_t seed, struct ev_retention *out,
                         struct lk_err *err);
void ev_retention_release(struct ev_retention *r);

/* The learned figure of system s on metric m, or NULL. */
const struct ev_learned *ev_retention_learned(const struct ev_retention *r, int s, enum ev_metric m);

struct cJSON;
/* Adds "retention": [{system, metric, base, value, forgetting: {mean, lo, hi, n}, no_room}] and
 * "learned": [{system, metric, base, value, gain: {mean, lo, hi, n}}] to a summary object. */
int ev_retention_json(const struct ev_retention *r, struct cJSON *root);
/* Writes one eval_retention row per figure (rdb_eval_retention). */
int ev_retention_record(struct rdb *db, int64_t run_id, const struct ev_retention *r, struct lk_err *err);

#endif
