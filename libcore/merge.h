/*
 * merge.h - fold LoRA adapters into a model's weights, streaming tensor by tensor, or combine
 * several adapters into one PEFT adapter.
 *
 * Meaning (PEFT's LoraModel.add_weighted_adapter and merge_and_unload are the reference; see
 * ANCHORS.md "Math the C code must reproduce"). For a weight W [out, in] and adapters i with
 * weights w_i, scales s_i (alpha/r or alpha/sqrt r), factors B_i [out, R_i], A_i [R_i, in], the
 * task vector of adapter i is D_i = s_i B_i A_i (embedding adapters: D_i = s_i (B_i A_i)^T,
 * [V, C]; lora_B.bias: s_i bias_i; a modules_to_save tensor X_i: D_i = X_i - W) and:
 *   linear       W' = W + sum_i w_i D_i                       (PEFT's "svd" combination before
 *                                                              truncation, and "cat": exact)
 *   cat          the same W' (exact); --into-adapter concatenates the ranks:
 *                A = [A_1; A_2; ...], B = [w_1 s_1 B_1, w_2 s_2 B_2, ...], alpha = r = sum R_i
 *   svd          W' = W + trunc_k(sum_i w_i D_i), k = --rank (default: the largest R_i), capped
 *                at min(out, in); --into-adapter: B = U_k S_k, A = V_k^T, alpha = r = k
 *   ties         T_i = D_i trimmed to its top round_down(density * numel) magnitudes; elected
 *                sign e = sign(sum_i T_i) (+ on 0); W' = W + sum_i w_i T_i [sign T_i = e] /
 *                max(1, #{i: sign T_i = e})          (Yadav et al. 2023; PEFT merge_utils.ties)
 *   dare_linear  T_i = D_i * Bernoulli(density) / density; W' = W + sum_i w_i T_i (Yu et al. 2023)
 *   dare_ties    the random drop of dare, then TIES' sign election and disjoint mean
 * PEFT applies linear/ties/dare to the A and B factors separately (its "linear" then has cross
 * terms B_i A_j); merged into weights, lorakit applies them to the task vectors D_i, which is
 * what PEFT's *_svd variants do before their truncation and what the papers define.
 * DoRA (one adapter, weight 1): W' = m * (W + D) / ||W + D||_row. lora_B.bias merges into the
 * layer bias (where the base has none, an all-zero one is accepted and a non-zero one refused).
 * A modules_to_save or base_layer copy replaces the base tensor (one adapter carrying it with
 * weight 1, linear); otherwise it combines as the task vector X - W; trainable tokens do the same
 * on their rows; a LoRA on lm_head is a task vector like a projection's.
 *
 * Precision: each changed tensor is read into float32 (exact for F16/BF16), changed in float32
 * (cblas_sgemm into one reused buffer), and rounded once to the output dtype. Untouched tensors
 * are copied byte for byte when the dtype is kept. Memory: one float32 buffer for the largest
 * changed tensor (ties/dare/svd: n + 1 of them) plus the adapters and a 16 MB read buffer; the
 * base's data is read with pread (from the page cache), never faulted in through the mapping.
 *
 * Tied embeddings: when an adapter changes one side of embed_tokens / lm_head of a model whose
 * config ties them, the output is untied (lm_head.weight written, tie_word_embeddings false), so
 * each keeps the value adapter inference gives it (PEFT's embedding LoRA changes only the input
 * side); what changes the shared weight (a base_layer copy, embed_tokens' trainable tokens)
 * goes to both.
 */
#ifndef LK_MERGE_H
#define LK_MERGE_H

#include <stddef.h>
#include <stdint.h>

#include "lk.h"

#define MERGE_MAX_ADAPTERS 16

enum merge_method {
    MERGE_LINEAR = 0,
    MERGE_CAT,
    MERGE_SVD,
    MERGE_TIES,
    MERGE_DARE_LINEAR,
    MERGE_DARE_TIES,
};

/* "linear", "cat", ... ; parse returns -1 when unknown. */
const char *merge_method_name(enum merge_method m);
int merge_method_parse(const char *s);

struct merge_adapter {
    const char *dir;     /* borrowed */
    double weight;       /* w_i (1 unless given as DIR:WEIGHT) */
};

struct merge_opts {
    const char *model;           /* borrowed: base model folder */
    const char *out;             /* borrowed: output folder (model, or adapter with into_adapter) */
    int n_adapters;
    struct merge_adapter adapters[MERGE_MAX_ADAPTERS];
    enum merge_method method;
    double density;              /* ties/dare: fraction kept, in (0, 1]; 0 = not given */
    int rank;                    /* svd: target rank; 0 = not given (largest adapter rank) */
    int dtype;                   /* output dtype: -1 auto (each tensor keeps the base's), else
                                    TENSOR_F32 / TENSOR_F16 / TENSOR_BF16 */
    uint64_t seed;               /* dare's masks */
    int subtract;                /* W - sum w_i D_i (linear only): undo a merge */
    int overwrite;               /* replace an existing non-empty out */
    int into_adapter;            /* write one PEFT adapter (cat, svd) instead of a model */
    int portable;                /* with into_adapter: scale folded into B, alpha = r, one rank
                                    for every module (zero-padded), no rank/alpha patterns */
    int verify;                  /* after writing, compare logits (see merge_verify) */
    int gguf_dtype;              /* out ending in .gguf (merge_out_is_gguf): the GGUF type of the
                                    matrices (GGUF_T_F32 = 0, F16, BF16, Q8_0 of gguf.h), or -1 for
                                    the base's (its embedding's dtype); dtype must stay -1 then.
                                    Ignored for a folder out */
    /* Progress (may be NULL): called after each tensor or module. */
    void (*progress)(void *ctx, int done, int total, const char *name);
    void *progress_ctx;
};

/* What a merge did (filled by merge_run). */
struct merge_report {
    int n_tensors;           /* tensors written */
    int n_changed;           /* tensors computed in float32 */
    int n_copied;            /* tensors copied byte for byte */
    int n_shards;
    int untied;              /* lm_head untied from embed_tokens */
    int out_dtype;           /* -1 mixed/auto, else the dtype written */
    int rank;                /* into_adapter: the adapter's r */
    double seconds;
    /* verify (NAN when not run) */
    int verified;
    char verify_ref[96];     /* what the reference was */
    double verify_max_abs, verify_max_rel;     /* merged output vs reference */
    double round_max_abs, round_max_rel;       /* exact f32 merge vs it rounded to the dtype */
    /* a GGUF out */
    int gguf_dtype;          /* the matrices' GGUF type, -1 for a folder */
    int n_f32_fallback;      /* q8_0: matrices kept f32 (rows not whole blocks) */
    uint64_t bytes;          /* the file's size */
};

/* 1 when out names one GGUF file (it ends in ".gguf") rather than an output folder. */
int merge_out_is_gguf(const char *out);

/* Checks options and inputs, then merges (or combines, with into_adapter) into a temporary
 * folder beside o->out, renamed into place when complete (lk_outdir: a non-empty out needs
 * overwrite, an empty one is replaced, a file is refused); runs the verification when asked.
 * An out ending in .gguf is one GGUF file instead (gguf_export_model with the merged tensors as
 * its row source, so tensors still stream one at a time; written to a temporary name and
 * renamed; an existing file needs overwrite): every method and option applies except
 * into_adapter (and so portable), and with no adapters the model is converted as it is. What
 * llama.cpp cannot express is refused before anything is written (gguf_cfg_check). verify then
 * reads the file back through gguf_model_load and rounds the exact merge as the file's types do
 * (q8_0 blocks, f16, bf16; 1-D tensors f32).
 * Refusals (bad options, adapters that do not fit the base, an existing out, ...) return an
 * error before anything is written; a failure later, or LK_ERR_INTERRUPTED when lk_interrupted
 * is set (checked per tensor or module), removes the temporary folder. report may be NULL. */
int merge_run(const struct merge_opts *o, struct merge_report *report, struct lk_err *err);

/* Combines n task vectors of numel floats by method (TIES / DARE / linear; cat and svd are
 * linear here) with weights w[n] into out [numel] (overwritten). The deltas are modified in
 * place (trimmed / dropped). density in (0, 1] for ties and dare. DARE's mask for delta i uses
 * merge_rng_seed(seed, i): element j is kept when lk_rng_uniform() < density, drawn in order. */
int merge_combine(enum merge_method method, int n, float *const *deltas, const double *w,
                  size_t numel, double density, uint64_t seed, float *out, struct lk_err *err);
/* The RNG seed DARE uses for delta i of a tensor whose seed is tensor_seed. */
uint64_t merge_rng_seed(uint64_t tensor_seed, int i);
/* The per-tensor seed: a hash of the run seed and the tensor name (order-independent). */
uint64_t merge_tensor_seed(uint64_t seed, const char *name);

#endif
