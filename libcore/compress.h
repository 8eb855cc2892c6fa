/*
 * compress.h - svd-compress: a full fine-tune turned into a LoRA adapter by truncated SVD
 * of each change ΔW = W_tuned - W_base, and the rank reduction of an existing adapter.
 *
 * Full fine-tune (cmp_models): the two model folders are read tensor by tensor (each linear
 * converted to float32 into two buffers reused for every tensor, mapped pages dropped after
 * use), so memory is about two of the largest linear plus the adapter being built. For each
 * target linear [out, in]: the top singular triplets of ΔW (svd.h: exact sgesdd, or the
 * randomized sketch of Halko et al.), rank R, or per tensor the smallest rank keeping a
 * fraction E of ‖ΔW‖_F² (capped by max_rank), then singular values <= sv_epsilon dropped.
 * The factors split the values evenly, B = U_r·sqrt(S_r) [out, r], A = sqrt(S_r)·V_rᵀ
 * [r, in], with alpha = r (scale 1), so B·A is the rank-r truncation itself. Ranks that differ
 * from the config's r go to PEFT's rank_pattern / alpha_pattern under the escaped full module
 * path ("model\.layers\.3\.mlp\.down_proj"), which matches that one module only.
 * Bias deltas of target q/k/v projections (Qwen2) go to lora_B.bias with lora_bias: true
 * (PEFT adds s·lora_B.bias, s = 1 here). PEFT's lora_bias gives every targeted module a
 * lora_B.bias, so the modules without a bias (o_proj, the MLP) get zeros: PEFT runs such an
 * adapter but its merge_and_unload refuses lora_bias on a layer without a bias (lorakit merge
 * accepts the zeros); no_bias leaves the bias deltas out instead (rel_error 1 on their rows).
 * Changed tensors outside the targets (embeddings, lm_head, norms, other linears and biases) are
 * listed with their relative change; keep_other stores embeddings, lm_head and norms as
 * modules_to_save (full float32 copies; embed_tokens and lm_head under those short names, the
 * ones PEFT's weight tying recognises). On a base that ties lm_head to embed_tokens, a changed
 * embedding is written twice, as embed_tokens.weight and lm_head.weight, with
 * ensure_weight_tying: true, so that PEFT changes the output layer too, as the fine-tune did.
 * The output folder is written under a temporary name beside it and renamed into place.
 *
 * Adapter rank reduction (cmp_adapter): each pair lora_A / lora_B (and lora_embedding_A / _B)
 * is re-factored from the SVD of s·B·A computed from the factors (svd_factor: QR of B and Aᵀ,
 * SVD of the small core), never forming out x in; other tensors are copied (lora_B.bias
 * multiplied by the old scale, since the new scale is 1). DoRA adapters are refused.
 *
 * Library code: nothing is printed; progress goes through a callback.
 */
#ifndef LK_COMPRESS_H
#define LK_COMPRESS_H

#include <stdint.h>

#include "lk.h"
#include "svd.h"

struct cmp_opts {
    int rank;           /* fixed rank R >= 1, or 0 when energy is used */
    double energy;      /* fraction E in (0, 1] of ‖ΔW‖_F² to keep per tensor, or 0 */
    int max_rank;       /* caps the rank of every tensor (0: no cap beyond min(out, in)) */
    double sv_epsilon;  /* singular values <= this are dropped (0: none) */
    unsigned targets;   /* bit m: module m (enum cfg_module) is compressed; 0 means all */
    int keep_other;     /* store changed embeddings / lm_head / norms as modules_to_save */
    int no_bias;        /* leave the q/k/v bias deltas out (no lora_bias): an adapter any tool can
                           merge, at the cost each left-out bias's row reports */
    int overwrite;      /* replace an existing non-empty output folder */
    struct svd_opts svd; /* method, oversampling, power iterations, seed */
    /* Called after each tensor (done of total), from the calling thread; may be NULL. */
    void (*progress)(void *ctx, int done, int total, const char *tensor);
    void *progress_ctx;
};

/* Defaults: no rank or energy (the caller sets one), no cap, no epsilon, all seven
 * projections, svd_opts_init. */
void cmp_opts_init(struct cmp_opts *o);

enum cmp_kind {
    CMP_LINEAR = 0, /* a target linear: compressed to factors */
    CMP_BIAS,       /* a target q/k/v bias: its delta is lora_B.bias */
    CMP_OTHER,      /* anything else that changed */
};

/* One line of the report. */
struct cmp_tensor {
    char name[128];       /* model tensor name ("model.layers.0.mlp.up_proj.weight"), or the
                             adapter module name for cmp_adapter */
    enum cmp_kind kind;
    int layer, module;    /* -1 when not a layer projection */
    int64_t rows, cols;   /* cols is 1 for a vector */
    int rank;             /* CMP_LINEAR: rank kept (0: nothing; stored as a zero rank-1 pair) */
    enum svd_method method; /* SVD used (CMP_LINEAR) */
    double fro;           /* ‖ΔW‖_F */
    double base_fro;      /* ‖W_base‖_F (cmp_adapter: 0) */
    double energy_kept;   /* fraction of ‖ΔW‖_F² kept by the stored tensor (1 for a zero ΔW;
                             1 or 0 for a vector stored or left out) */
    double rel_error;     /* ‖ΔW - stored‖_F / ‖ΔW‖_F = sqrt(discarded / ‖ΔW‖_F²), exact: the
                             discarded energy is ‖ΔW‖_F² (from ΔW itself) minus the kept σ² */
    double sigma_next;    /* largest discarded singular value σ_{r+1} (0 when none) */
    int sigma_estimate;   /* 1: sigma_next is an estimate (randomized path: a lower bound of
                             ‖ΔW - B·A‖_2 by power iteration, or σ_{r+1} of the sketch) */
    int stored;           /* 1: the change is in the adapter (factors, bias, modules_to_save) */
    double seconds;       /* time spent on this tensor */
};

struct cmp_report {
    int n;
    struct cmp_tensor *t;   /* owned array of n, in the models' tensor order: every target
                               linear, changed target biases, other changed tensors */
    int n_linear;           /* target linears */
    int rank_common;        /* the config's r (most frequent rank); others in rank_pattern */
    int n_rank_pattern;     /* modules whose rank differs from it */
    int lora_bias;          /* 1 when lora_B.bias was written */
    int n_other_changed;    /* CMP_OTHER entries */
    int n_left_out;         /* changed tensors the adapter does not carry */
    int64_t adapter_params; /* floats written: factors, biases, modules_to_save */
    int64_t delta_params;   /* what a full delta of the same tensors holds (out*in per linear,
                               plus biases and modules_to_save stored) */
    int64_t input_params;   /* cmp_adapter: factor floats of the input adapter */
    double energy_total;    /* Σ ‖ΔW‖_F² over target linears */
    double energy_kept;     /* Σ of the energy kept: energy_kept / energy_total overall */
    double seconds;
};
void cmp_report_release(struct cmp_report *r);

/* Compresses the fine-tune tuned_dir of base_dir into the PEFT adapter folder out_dir.
 * Both folders need config.json and model.safetensors (or shards + index) of the same
 * architecture and shapes; a difference is an error naming the field or tensor. Refuses an
 * existing non-empty out_dir unless o->overwrite (LK_ERR_EXISTS). Fills rep (release with
 * cmp_report_release, also after a failure). LK_ERR_INTERRUPTED when lk_interrupted is set. */
int cmp_models(const char *base_dir, const char *tuned_dir, const char *out_dir,
               const struct cmp_opts *o, struct cmp_report *rep, struct lk_err *err);

/* Reduces the rank of the adapter in in_dir to o->rank (or by o->energy, capped by
 * o->max_rank; never above a module's current rank) into out_dir, exactly. */
int cmp_adapter(const char *in_dir, const char *out_dir, const struct cmp_opts *o,
                struct cmp_report *rep, struct lk_err *err);

/* The report as JSON text: {"totals": {...}, "tensors": [...]} (tensors omitted when
 * with_tensors is 0: the runs database's summary). Heap string, caller lk_frees; NULL on OOM. */
char *cmp_report_json(const struct cmp_report *r, int with_tensors);

/* The rank_pattern key for a module path: regex metacharacters escaped with '\', so that
 * PEFT's `(.*\.)?(key)$` matches that module only. Returns 0, or -1 when buf is too small. */
int cmp_pattern_key(const char *module_path, char *buf, size_t n);

#endif
