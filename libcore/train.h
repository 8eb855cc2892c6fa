/*
 * train.h - the training loop: LoRA or full fine-tuning with AdamW, gradient accumulation,
 * warm-up and a schedule, global-norm clipping, held-out loss, atomic checkpoints and exact
 * resumption. The loss of a step is the mean next-token cross-entropy over ALL trained-on
 * tokens of the global batch (batch x grad_accum rows), as transformers computes it since 4.46.
 *
 * Determinism: the data order of step s is a function of (seed, s) alone (per-epoch
 * permutations), the dropout mask a hash of (seed, s, micro-batch), so a run resumed from a
 * checkpoint gives the same bytes as an uninterrupted one (same seed and thread count).
 */
#ifndef LK_TRAIN_H
#define LK_TRAIN_H

#include <stdint.h>

#include "adamw.h"
#include "data.h"
#include "lora.h"
#include "model.h"

/* Data parallelism (MPI or anything else): every rank runs train_run with the same options and
 * data; rank r processes its contiguous share of each global batch, then allreduce sums the
 * gradient block and the scalars (the loss sum) across ranks in place, so every rank takes the
 * same optimizer step. Only rank 0 writes checkpoints and gradient dumps. */
struct train_dist {
    int rank, size;
    void *ctx;
    int (*allreduce_sum)(void *ctx, float *buf, size_t n, double *scalars, int n_scalars,
                         struct lk_err *err);
};

struct train_opts {
    long steps;              /* total optimizer steps; 0: from epochs */
    double epochs;           /* used when steps == 0 */
    int batch;               /* rows per micro-batch */
    int grad_accum;          /* micro-batches per step */
    int seq;                 /* row length cap */
    int pack;                /* pack records into full rows (no attention across records) */
    double lr;
    double loraplus_ratio;   /* B (and lora_B.bias) learn at ratio x lr; 1 = plain LoRA */
    long warmup;             /* steps */
    enum adamw_schedule schedule;
    double weight_decay;
    double clip;             /* global-norm clip; 0 = off */
    struct adamw adam;
    uint64_t seed;
    long eval_every;         /* 0 = only at the end (when eval data is given) */
    long save_every;         /* 0 = no periodic checkpoints */
    const char *ckpt_dir;    /* where checkpoint-<step> folders go (NULL = no checkpoints) */
    const char *dump_grads;  /* write the first step's gradients here and stop */
    const struct train_dist *dist; /* NULL: one process */
};

void train_opts_default(struct train_opts *o);

struct train_progress {
    long step, total;        /* step just taken (1-based) */
    double loss, lr, grad_norm;
    double tokens_per_s, elapsed_s;
    double eval_loss;        /* NAN when not evaluated at this step */
    long tokens;             /* tokens processed so far (this process) */
};

struct train_hooks {
    void *ctx;
    void (*on_step)(void *ctx, const struct train_progress *p);
    void (*on_checkpoint)(void *ctx, long step, const char *dir);
};

struct train_state {
    long step;               /* optimizer steps taken */
    long total;              /* planned */
    int T;                   /* row length */
    int rows;                /* rows per epoch */
    double last_loss, last_eval_loss;
    double first_loss;
    double tokens_per_s;     /* row tokens per second over the steps after the first (warm-up) */
};

/* Plans rows and steps (fills st->total, st->rows, st->T) without training. */
int train_plan(const struct train_opts *o, const struct data_set *d, struct train_state *st,
               struct lk_err *err);

/* Trains lora (or, when lora is NULL, every weight of m) on d. resume_dir (may be NULL) is a
 * checkpoint folder to continue from. Returns LK_ERR_INTERRUPTED after SIGINT/SIGTERM (a
 * checkpoint is written first when ckpt_dir is set), LK_ERR_NUMERIC on a non-finite loss or
 * gradient (the last good checkpoint stays). */
int train_run(const struct train_opts *o, struct model *m, struct lora *lora,
              const struct data_set *d, const struct data_set *eval, const char *resume_dir,
              const struct train_hooks *h, struct train_state *st, struct lk_err *err);

/* Mean token loss of a data set (no dropout). */
int train_eval_loss(struct model *m, const struct lora *lora, const struct data_set *d, int batch,
                    double *out_loss, struct lk_err *err);

#endif
