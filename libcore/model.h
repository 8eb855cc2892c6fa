/*
 * model.h - the Llama / Qwen2 / Qwen3 decoder, forward and backward, with LoRA, in float32.
 *
 * Exactly as transformers defines these models: token embedding; per layer RMSNorm
 * (normalise in float32, then multiply by the weight), q/k/v projections (with bias for
 * Qwen2 and for Llama with attention_bias), for Qwen3 an RMSNorm over each head of q and of k (q_norm, k_norm, weights [HS]),
 * rotary embedding (rotate_half, inv_freq = theta^(-2i/HS), rescaled for rope_scaling linear
 * or llama3), grouped-query causal attention with scale 1/sqrt(HS), o_proj (with bias for Llama
 * with attention_bias), residual, RMSNorm,
 * SwiGLU MLP down(silu(gate(x)) * up(x)), residual; final norm; lm_head (tied to embed_tokens
 * when tie_word_embeddings).
 *
 * Memory: weights in one block (struct model_weights; gradients of a full fine-tune use a
 * second block of the same layout), activations in one block per lane sized by model_plan(B, T).
 * The weight matrices may stay in the file's bf16 / f16 (model_load_keep): they are widened to
 * float32 inside the kernels (struct op_mat, ops.h), so every result is float32 arithmetic.
 *
 * Threads: model_plan splits the B rows of a batch into lanes, one per thread (at most B): each
 * lane runs the whole forward and backward of its rows with single-threaded BLAS, as separate
 * processes would, and the lanes' LoRA or weight gradients and losses are summed in lane order
 * afterwards, so a result depends on the thread count only through that order. With one lane
 * (B = 1, or one thread) the kernels themselves share the threads (ops.h: op_team).
 */
#ifndef LK_MODEL_H
#define LK_MODEL_H

#include <stddef.h>
#include <stdint.h>

#include "cfg.h"
#include "lk.h"
#include "lora.h"
#include "ops.h"

struct model_layer {
    float *ln1;               /* [C] */
    struct op_mat wq, wk, wv; /* [NH*HS, C], [NKV*HS, C], [NKV*HS, C] */
    float *bq, *bk, *bv;      /* biases, or NULL without attention_bias */
    struct op_mat wo;         /* [C, NH*HS] */
    float *bo;                /* [C]: Llama with attention_bias (cfg_module_bias), else NULL */
    float *q_norm, *k_norm;   /* [HS] each (Qwen3), or NULL */
    float *ln2;               /* [C] */
    struct op_mat wgate, wup; /* [F, C] */
    struct op_mat wdown;      /* [C, F] */
};

/* Every parameter. With dtype F32 all of them are in mem, in the size table's order (gradients
 * and optimizer moments of a full fine-tune reuse that layout). With dtype BF16 or F16 the
 * matrices (embeddings, projections, lm_head) are in hmem in that dtype, in the same order, and
 * mem holds only the norms and biases. */
struct model_weights {
    float *mem;               /* the float32 tensors */
    size_t n;                 /* floats in mem */
    int dtype;                /* of the matrices: TENSOR_F32, TENSOR_BF16 or TENSOR_F16 */
    uint16_t *hmem;           /* the matrices when dtype is BF16 / F16, else NULL */
    size_t hn;                /* values in hmem */
    void *mem_raw, *hmem_raw; /* owned: the blocks mem and hmem start in (on a cache line) */
    struct op_mat embed;      /* [V, C] */
    float *norm;              /* [C] */
    struct op_mat lm_head;    /* [V, C]; equals embed when tied */
    struct model_layer *layer; /* owned array [L], pointers into mem / hmem */
    float **own;              /* owned: float32 copies that replaced a matrix (model_weights_own_f32) */
    int n_own;
};

/* One named weight tensor of a model_weights block (transformers' names). */
struct model_tensor {
    char name[96];
    float *data;              /* points into the block (float32 tensors; NULL when hdata is set) */
    uint16_t *hdata;          /* a matrix kept in dtype BF16 / F16 (data is then NULL) */
    int dtype;                /* TENSOR_F32, or the dtype of hdata */
    int ndim;
    int64_t shape[2];
    size_t numel;
    int layer, module;        /* module: enum cfg_module for projection weights, else -1 */
    int is_bias;
};

struct model_acts;

struct model {
    struct cfg cfg;           /* owned copy (json NULL unless loaded) */
    struct model_weights w;
    float *inv_freq;          /* owned [HS/2], with the config's rope scaling applied */
    int B, T;                 /* planned shape (0 before model_plan) */
    int train;                /* 1: keep what backward needs and apply dropout */
    uint64_t dropout_seed;    /* changes per step; the mask is a hash of (seed, module, index) */
    struct model_acts *acts;  /* owned array of n_lanes lanes (NULL before model_plan) */
    int n_lanes;              /* threads the rows of a batch are split over (model_plan) */
};

/* Allocates zeroed weights for a config (c is copied; its json is not): float32, or with the
 * matrices in dtype BF16 / F16 (model_init_dtype). */
int model_init(struct model *m, const struct cfg *c, struct lk_err *err);
int model_init_dtype(struct model *m, const struct cfg *c, int dtype, struct lk_err *err);
/* Loads config.json and the weights (any of F32/F16/BF16, sharded or not) from a folder, every
 * tensor widened to float32 (the file's pages are dropped from memory tensor by tensor), or a
 * model from one GGUF file (gguf_is_file; gguf_model_load). */
int model_load(struct model *m, const char *dir, struct lk_err *err);
/* How model_load_keep keeps the weight matrices. */
enum model_keep {
    MODEL_KEEP_F32 = 0,       /* float32, as model_load */
    MODEL_KEEP_FILE,          /* the file's dtype when every matrix is BF16 (or every one F16);
                                 float32 otherwise. Norms and biases are always float32 */
};
int model_load_keep(struct model *m, const char *dir, enum model_keep keep, struct lk_err *err);
void model_release(struct model *m);

/* Zeroed weights, every tensor float32 (dtype F32), or the matrices in dtype BF16 / F16. */
int model_weights_alloc(struct model_weights *w, const struct cfg *c, struct lk_err *err);
int model_weights_alloc_dtype(struct model_weights *w, const struct cfg *c, int dtype, struct lk_err *err);
void model_weights_release(struct model_weights *w);
/* Converts the matrices to dtype in place (narrowing rounds to nearest even; widening is exact).
 * On failure w is unchanged. */
int model_weights_convert(struct model_weights *w, const struct cfg *c, int dtype, struct lk_err *err);
/* Points mat at a new float32 copy of src[0..n), owned by w (freed by model_weights_release):
 * for a tensor replaced by a float32 one while the others stay as they are (an adapter's
 * modules_to_save copy over bf16 weights, an lm_head untied from the embedding). */
int model_weights_own_f32(struct model_weights *w, struct op_mat *mat, const float *src, size_t n,
                          struct lk_err *err);
/* The named tensors of a block (lm_head only when untied). Caller frees *out. */
int model_weights_tensors(const struct model_weights *w, const struct cfg *c,
                          struct model_tensor **out, int *n, struct lk_err *err);
/* Random init: normal(0, std) for matrices and biases, norms at 1 (float32 weights only). */
void model_weights_randomize(struct model_weights *w, const struct cfg *c, float std,
                             struct lk_rng *rng);

/* Sizes the activations for batches of B sequences of T tokens (train: keep what backward
 * needs), in min(B, omp_get_max_threads()) lanes. A later call with another shape reallocates. */
int model_plan(struct model *m, int B, int T, int train, struct lk_err *err);

/* Runs the model on tokens[B*T]. pos (NULL: 0..T-1 per row) gives rotary positions, seg (NULL:
 * one segment per row) stops attention across packed records. Positions from
 * cfg_rope_positions(&m->cfg) on are refused (LK_ERR_UNSUPPORTED: dynamic rope scaling). When targets[B*T] is given
 * (next-token ids, -100 = not counted), returns the SUM of the token losses; with m->train the
 * logits buffer is then overwritten by d(loss * loss_scale)/d(logits) for model_backward.
 * Without targets returns 0 and the logits [B*T, V] are in model_logits(m). lora may be NULL.
 * Token ids outside [0, V) are an error (LK_ERR_USAGE). */
int model_forward(struct model *m, const struct lora *lora, const int *tokens, const int *pos,
                  const int *seg, const int *targets, float loss_scale, double *out_loss,
                  struct lk_err *err);
const float *model_logits(const struct model *m);
/* Backpropagates the last forward (train mode, with targets). Accumulates LoRA gradients into
 * lora_grad (same layout as lora->mem; NULL to skip) and, for a full fine-tune (float32 weights),
 * every weight's gradient into grads (same layout as m->w; NULL to skip). */
void model_backward(struct model *m, const struct lora *lora, float *lora_grad,
                    struct model_weights *grads);

/* Parameter count of the model (tied lm_head counted once). */
size_t model_param_count(const struct cfg *c);

#endif

// ---- model folders (model_io.c) ----

/* Writes config.json (torch_dtype set from dtype) and model.safetensors in dtype (F32, BF16 or
 * F16), into dir, each file atomically. c->json (if any) keeps unknown config fields. */
int model_save(const struct model *m, const char *dir, int dtype, struct lk_err *err);
/* Writes every tensor of a weights block (the weights, or their gradients) to one file. */
int model_weights_save_st(const struct model_weights *w, const struct cfg *c, const char *path,
                          int dtype, struct lk_err *err);
/* Applies what an adapter changes in whole weights, as PEFT runs it: modules_to_save copies and
 * base_layer copies replace their tensors, trainable-token rows replace theirs, a LoRA on lm_head
 * is folded in (lm_head += s B A). When the base ties lm_head to embed_tokens and the adapter
 * changes one side only (a copy of one, a LoRA on lm_head, lm_head's tokens), the model is first
 * untied in memory (model_untie), as `lorakit merge` unties it; a base_layer copy is the shared
 * weight and changes both. Marks the adapter as applied so that model_forward accepts it. A model
 * that runs without the adapter too needs its own copy. On failure (LK_ERR_NOMEM, or a shape the
 * model does not have) the weights may be partly changed: load the model again. */
int model_apply_extras(struct model *m, struct lora *l, struct lk_err *err);
/* Gives a tied model its own lm_head, a copy of embed_tokens (cfg.tie_word_embeddings becomes 0):
 * the weights are reallocated (pointers into the old block are invalid), activations kept.
 * Nothing to do on an untied model. */
int model_untie(struct model *m, struct lk_err *err);
