/*
 * batch.h - the harness's batched path (`--batch B`, B > 1: eval/batch.c) and the pieces of one
 * cell it shares with the one-question-at-a-time path of eval/harness.c.
 *
 * A cell (an item in a mode) is one sequence: its prompt is prefilled, the reference answer (or
 * each choice) is scored from the prompt's cache, then the greedy answer is decoded. The batched
 * path keeps B such sequences in flight, refilling a finished one's slot with the next cell
 * (continuous batching), and runs them together through gen_batch_forward (libcore/generate.h).
 * Both paths split prompts and continuations into the same chunks of EV_CHUNK tokens, so every
 * sequence gets the logits it gets alone: the same greedy answers, scores within float32
 * rounding of the stacked GEMMs.
 */
#ifndef LK_EV_BATCH_H
#define LK_EV_BATCH_H

#include "harness.h"
#include "retain.h"

#define EV_CHUNK 64 /* tokens per prefill or scoring chunk, in both paths */

/* The model and adapter a mode runs: the base, a system's (sys non-NULL), or c->tuned / c->lora. */
void ev_mode_model(const struct ev_config *c, const struct ev_system *sys, int n_sys, const struct ev_mode *mode,
                   const struct model **m, const struct lora **lora);
/* A cell's prompt (with up to mode->k of the item's nh hits) into prompt, and what the prompt
 * decides of the cell: recall@k, passages used, the retrieved JSON, answer@k, prompt_tokens (the
 * other scores are set to NAN). */
int ev_cell_prompt(const struct ev_config *c, const struct ev_item *it, const struct ev_mode *mode,
                   const struct fts_hit *hits, int nh, struct tok_ids *prompt, struct ev_cell *cell, struct lk_err *err);
/* The continuations a cell scores after a prompt of np tokens: each choice (multiple choice) or
 * the reference, tokenized into conts[j], n_tok[j] = its tokens cut to the context left
 * (max_ctx - np). A choice with no room left is LK_ERR_USAGE. conts has n_choices (or 1) entries. */
int ev_cell_conts(const struct ev_config *c, const struct ev_item *it, int np, struct tok_ids *conts, int *n_tok,
                  struct lk_err *err);
/* The cell's answer and scores from ll[j], the summed log-likelihood of continuation j (those
 * with n_tok[j] > 0), and gen, the greedy answer's ids (not multiple choice). */
int ev_cell_finish(const struct ev_config *c, const struct ev_item *it, const double *ll, const int *n_tok,
                   const struct tok_ids *gen, struct ev_cell *cell, struct lk_err *err);

/* ev_run_systems for c->batch > 1, once its checks have passed and r's cells and seconds are
 * allocated: every item x mode, cell and seconds as the one-at-a-time path fills them (a cell's
 * seconds are its share of the batched steps' time, by tokens). */
int ev_batch_cells(struct ev_run *r, const struct ev_config *c, const struct ev_system *systems, int n_systems,
                   const struct ev_qa *qa, const struct ev_mode *modes, int n_modes, int kmax, ev_progress_fn progress,
                   void *ctx, struct lk_err *err);
/* ev_text_run_all for c->batch > 1, r's arrays allocated. */
int ev_batch_texts(struct ev_text_run *r, const struct ev_config *c, const struct ev_system *systems, int n_systems,
                   const struct ev_text *t, ev_progress_fn progress, void *ctx, struct lk_err *err);

#endif
