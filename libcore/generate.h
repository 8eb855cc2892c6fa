/*
 * generate.h - incremental decoding with a KV cache, sampling, and the generation loop.
 *
 * The cache keeps, for every layer, the keys (after Qwen3's k_norm and the rotary embedding) and
 * values of every
 * token seen so far: k[l], v[l] [T_max, NKV*HS]. gen_forward runs a chunk of new tokens at
 * positions n..n+N-1 through the same weights as model_forward (struct model's layers,
 * inv_freq, the ops.h kernels, a LoRA adapter applied as y += s*B(A x) + s*bias_B), appends
 * their keys and values and attends over the whole cache: the prompt is prefilled in one
 * chunk, then every new token costs one position. Nothing of the prefix is recomputed.
 * The arithmetic follows model.c step by step, so logits agree with model_forward on the
 * full prefix to float rounding (tests/test_generate.c checks every position).
 *
 * gen_cache_truncate rewinds the cache (drops positions >= n): the eval harness scores
 * several continuations of one prompt (reference answer, multiple-choice options) without
 * prefilling the prompt again.
 */
#ifndef LK_GENERATE_H
#define LK_GENERATE_H

#include <stddef.h>
#include <stdint.h>

#include "chat.h"
#include "lk.h"
#include "lora.h"
#include "model.h"

struct gen_cache {
    int L, T_max, chunk;  /* layers, positions the cache holds, tokens per forward step */
    int n;                /* positions filled */
    int C, F, V, Q, KV, NH, NKV, HS, R; /* dimensions (R: largest LoRA rank it was sized for) */
    float *mem;           /* owned: the cache and the scratch below, one block */
    float **k, **v;       /* owned array [L] of pointers into mem: [T_max, KV] each */
    // scratch for one chunk of up to `chunk` tokens
    float *x, *ln, *q, *kn, *vn, *atty, *x2, *gate, *up, *act, *xa; /* [chunk, ...] */
    float *att;           /* [chunk * NH, T_max] attention weights */
    float *lnf;           /* [chunk, C] */
    float *logits;        /* [V]: logits of the last token of the last gen_forward */
    int *pos;             /* owned [chunk] */
    float *wtile;         /* owned: widening tiles for bf16 / f16 weights (first use) */
    size_t wtile_n;
};

/* Sizes a cache for model config c: T_max positions (at most max_position_embeddings is the
 * caller's business), chunks of up to `chunk` tokens per step (prefill longer prompts in
 * several steps), LoRA ranks up to max_rank (0 without an adapter). */
int gen_cache_init(struct gen_cache *gc, const struct cfg *c, int T_max, int chunk, int max_rank,
                   struct lk_err *err);
void gen_cache_release(struct gen_cache *gc); /* NULL-safe, harmless twice */
/* Forgets positions >= n (n <= gc->n): the next gen_forward continues at position n. */
void gen_cache_truncate(struct gen_cache *gc, int n);
/* Largest LoRA rank of an adapter (0 for NULL). */
int gen_lora_max_rank(const struct lora *l);

/* Runs tokens[0..N) at positions gc->n.. and appends them to the cache. The last token's
 * logits are left in gc->logits [V]; when out_logits is non-NULL every token's logits are
 * written there [N, V]. lora may be NULL (DoRA is refused; modules_to_save tensors must have
 * been applied by model_apply_extras, as for model_forward). Errors: the cache would overflow
 * (LK_ERR_USAGE, with the sizes), a token outside the vocabulary. The cache is unchanged on
 * error. */
int gen_forward(struct gen_cache *gc, const struct model *m, const struct lora *lora,
                const int32_t *tokens, int N, float *out_logits, struct lk_err *err);

// ---- batches: several sequences through the weights at once ----
/*
 * A batched step runs tokens of several sequences, each with its own KV cache (struct gen_seq),
 * through one pass over the weights: the eval harness decodes and scores many questions at a
 * time this way. A step is a list of runs, each a few tokens of one sequence at its next
 * positions. Every run gives what gen_forward gives for the same tokens run as one chunk on a
 * cache holding the same sequence:
 *   - a run of one token (decoding) goes through op_mat_gemv_batch with the other one-token runs:
 *     the fused GEMV's sums, bit for bit, with each weight read once for all of them;
 *   - the runs of n >= 2 tokens (prefill and scoring chunks) are stacked into one GEMM per weight
 *     matrix; OpenBLAS forms each output row's sums the same way whatever rows sit beside it
 *     (tests/test_generate.c checks the logits against gen_forward per sequence);
 *   - attention, LoRA (each run its own adapter) and the per-token kernels run per run, with the
 *     arguments gen_forward would give them.
 * So the logits of a run are gen_forward's for that chunk: with chunks split as gen_forward
 * splits them, a sequence decodes the same tokens alone or in a batch.
 */

/* One sequence of a batch: its keys (after k_norm and rope) and values per layer. */
struct gen_seq {
    int n;               /* positions filled */
    int cap;             /* positions the block holds */
    int L, KV;
    float *kv;           /* owned [L][2][cap][KV]: layer l's keys at kv + 2 l cap KV, its values next */
};

/* Makes room for `positions` positions (the first n are kept; a smaller request does nothing).
 * LK_ERR_NOMEM, the sequence unchanged, when it cannot. */
int gen_seq_reserve(struct gen_seq *s, const struct cfg *c, int positions, struct lk_err *err);
void gen_seq_release(struct gen_seq *s); /* NULL-safe, harmless twice */

struct lg_row;

/* One run of a step: tokens[0..n) of seq at positions seq->n... */
struct gen_brun {
    struct gen_seq *seq;        /* borrowed: room for n more positions (gen_seq_reserve); a sequence
                                 * may have several runs in a step, in position order */
    const struct lora *lora;    /* borrowed, may be NULL (as for gen_forward) */
    const int32_t *tokens;      /* borrowed [n] */
    int n;
    float *logits;              /* NULL, or the last token's logits [V], or every token's [n, V] with
                                 * all_logits */
    int all_logits;
    const int32_t *targets;     /* NULL, or [n]: lp[i] = gen_logprob(logits of token i, targets[i]) */
    double *lp;                 /* [n] with targets */
};

/* The shared scratch of batched steps: activations for up to rows_max tokens per step. */
struct gen_batch {
    int L, C, F, V, Q, KV, NH, NKV, HS, R;
    int rows_max;        /* tokens per step at most (the sum of the runs' n) */
    float *mem;          /* owned: the activations below, one block */
    float *x, *ln, *q, *kn, *vn, *atty, *x2, *gate, *up, *act, *xa; /* [rows_max, ...] */
    float *lnf;          /* [rows_max, C]: final-norm outputs of the tokens whose logits are asked */
    float *lg;           /* [GEN_LOGIT_ROWS, V]: logits of a block of tokens */
    struct lg_row *who;  /* owned [rows_max]: which run and token each row of lnf is */
    float *lpt;          /* owned (first use): per thread [kcap, tv] logits of a vocabulary tile */
    double *lpm;         /* owned: per thread each row's running max and sum, then target logits */
    int lp_nt, tv, kcap; /* threads lpt and lpm were sized for; vocabulary rows per tile; rows of a
                          * tile's logits (rows_max, or more for a padded product) */
    float *pad;          /* owned [pad_n]: small products padded with zero rows */
    size_t pad_n;
    int *pos, *n0, *row; /* owned [rows_max]: positions per token; first position and row per run */
    size_t *aoff;        /* owned [rows_max]: a one-token run's attention weights in att */
    float *att;          /* owned, grown as needed: attention weights */
    size_t att_n;
    float *wtile;        /* owned: widening tiles for bf16 / f16 weights (first use) */
    size_t wtile_n;
};

#define GEN_LOGIT_ROWS 64    /* logits computed per block of tokens */
#define GEN_STREAM_ROWS 2048 /* vocabulary rows per tile when only log-probabilities are asked */

/* Sizes the scratch for model config c, steps of up to rows_max tokens, LoRA ranks up to max_rank. */
int gen_batch_init(struct gen_batch *b, const struct cfg *c, int rows_max, int max_rank, struct lk_err *err);
void gen_batch_release(struct gen_batch *b); /* NULL-safe, harmless twice */

/* Runs one step: every run's tokens through the model (lora per run), their keys and values
 * appended to their sequences (seq->n advances by the run's n), the logits or log-probabilities
 * asked for written out. The checks of gen_forward apply to each run (room in the sequence,
 * tokens in the vocabulary, the adapter's shape and rank), plus the sum of the runs' n <=
 * rows_max; on error nothing has changed. */
int gen_batch_forward(struct gen_batch *b, const struct model *m, const struct gen_brun *runs, int n_runs,
                      struct lk_err *err);

// ---- sampling ----

struct gen_prob {
    float p;
    int32_t id;
};

struct gen_sampler {
    double temperature;   /* <= 0: greedy */
    double top_p;         /* (0, 1]: nucleus sampling; 1 = off */
    struct lk_rng rng;
    int V;
    struct gen_prob *buf; /* owned [V] scratch */
};
int gen_sampler_init(struct gen_sampler *s, int V, double temperature, double top_p, uint64_t seed,
                     struct lk_err *err);
void gen_sampler_release(struct gen_sampler *s);
/* Next token from logits[V]: the arg max (lowest id on ties) when greedy; else softmax of
 * logits / temperature, restricted to the smallest set of most probable ids whose mass
 * reaches top_p, sampled with the seeded rng. */
int32_t gen_sample(struct gen_sampler *s, const float *logits);
/* The arg max of x[n] (lowest index on ties). */
int gen_argmax(const float *x, int n);
/* log softmax(logits)[id], computed in double. */
double gen_logprob(const float *logits, int V, int32_t id);

// ---- the generation loop ----

struct gen_opts {
    int max_new;              /* tokens to generate at most */
    double temperature, top_p;
    uint64_t seed;
    const struct chat_fmt *fmt; /* borrowed, may be NULL: its stop ids end generation */
    int32_t eos;              /* also ends generation when >= 0 */
    int no_cache;             /* recompute the whole prefix with model_forward per token */
    int n_vocab;              /* > 0: only ids below it are generated (a tokenizer smaller than
                                 the embedding table); 0: the model's vocabulary */
};

/* Called with each generated token (stop tokens are not passed). A non-zero return stops
 * generation early (the value is returned by gen_run unless it is 1, which is a clean stop). */
typedef int (*gen_token_fn)(void *ctx, int32_t id);

/* Prefills prompt[0..n_prompt) into the (reset) cache, then samples up to o->max_new tokens,
 * stopping at a stop id or eos, appending generated ids (without the stop id) to out (may be
 * NULL) and calling on_token (may be NULL) for each. With o->no_cache the cache is unused
 * (gc may be NULL) and m is re-planned for B=1, T=prefix length at each step (this is the
 * slow baseline the benchmark and tests compare with). *out_stop (may be NULL) is set to 1
 * when a stop id ended generation, 0 when max_new did. Checks lk_interrupted per token. The
 * prompt plus max_new must fit the cache (LK_ERR_USAGE otherwise: shorten one or the other). */
int gen_run(struct gen_cache *gc, struct model *m, const struct lora *lora, const int32_t *prompt,
            int n_prompt, const struct gen_opts *o, gen_token_fn on_token, void *ctx,
            struct tok_ids *out, int *out_stop, struct lk_err *err);

/* Continues from the cache as it is: logits[V] are the next-token logits of its last position
 * (e.g. a copy of gc->logits saved after prefilling, before the cache was used for something
 * else and rewound). Same stopping rules and callbacks as gen_run; the cache must have room
 * for max_new - 1 more positions. */
int gen_continue(struct gen_cache *gc, const struct model *m, const struct lora *lora,
                 const float *logits, const struct gen_opts *o, gen_token_fn on_token, void *ctx,
                 struct tok_ids *out, int *out_stop, struct lk_err *err);

/* Length of the longest prefix of s[0..n) that does not end inside a UTF-8 sequence (a lead
 * byte whose continuation bytes have not all arrived yet): for streaming decoded text. */
size_t gen_utf8_complete(const char *s, size_t n);

#endif
