/*
 * diff.h - what a fine-tune changed, tensor by tensor: the comparison engine behind
 * `lorakit diff A B`. A and B are each a model folder (config.json + safetensors) or a PEFT
 * adapter folder (adapter_config.json); the change reported is always ΔW = W_B - W_A.
 *
 * Four kinds of comparison (enum diff_kind), decided by diff_open:
 * - model vs model: ΔW per tensor, both tensors streamed from st_model_open one at a time.
 * - adapter vs adapter (same base): ΔW = s_B·B_B·A_B - s_A·B_A·A_A, kept in factor form
 *   [s_B·B_B | -s_A·B_A]·[A_B; A_A] of rank r_A + r_B; plus the cosine of the two changes and
 *   the subspace similarity φ of Hu et al. 2021 (§7) over their singular vectors.
 * - a model against an adapter on that model (`diff BASE ADAPTER`, either order): ΔW = ±s·B·A
 *   from the factors; plus the amplification factor (Hu et al. 2021, Table 7) and the
 *   intruder dimensions (Shuttleworth et al. 2024) of the adapted weight.
 * - an adapter against another model: base + adapter (formed per tensor) vs that model.
 * The adapter's base is --base DIR, else base_model_name_or_path when it is a local folder
 * (as given, then relative to the adapter folder). A model compared with an adapter whose
 * base cannot be found is taken to be that base.
 *
 * Memory: one tensor at a time. Where ΔW has a rank-r factor form (r <= min(out, in)), no
 * out x in matrix is ever allocated for it: norms, spectrum, cosine and φ come from QR of the
 * factors (svd_factor*); the base weight, when needed for ‖W‖_F or the amplification, is read
 * in row blocks of at most DIFF_ROW_BLOCK floats. Only the intruder count needs dense W and
 * W + ΔW (one SVD each), and is skipped with intruder_k = 0.
 *
 * Definitions (per 2-D tensor; 1-D tensors get norms only):
 * - ‖ΔW‖_F, rel = ‖ΔW‖_F / ‖W‖_F where W is the reference weight: the base when both sides
 *   share one (adapter cases), else the A side. NAN when W is unknown (a base folder without
 *   weights).
 * - spectral ‖ΔW‖_2 = σ_1; stable rank ‖ΔW‖_F² / σ_1²; numerical rank (svd_numerical_rank);
 *   effective rank exp(H(σ/Σσ)) over the numerically non-zero values (Roy & Vetterli 2007);
 *   energy rank: smallest r whose σ_1..σ_r keep a fraction E of ‖ΔW‖_F²; top K values.
 * - φ(i, j) = ‖U_iᵀ V_j‖_F² / min(i, j) for i, j in {1, 2, 4, ..., k} (k appended), over the
 *   top right-singular vectors (input space, dimension in) and the top left-singular vectors
 *   (output space, dimension out) of the two ΔW's, k = each one's numerical rank. For two
 *   independent random bases E‖U_iᵀV_j‖_F² = i·j/d, so φ(i, j) ≈ max(i, j)/d (not i·j/d).
 * - amplification = ‖ΔW‖_F / ‖U_rᵀ W V_rᵀ‖_F, U_r, V_r the top-r singular vectors of ΔW
 *   (r its numerical rank), W the base weight. Model vs model: only when that rank is at
 *   most DIFF_AMP_MAX_RANK and at most min(out, in) / 2.
 * - intruders (PEFT's intruders.py): among the top intruder_k left singular vectors of the
 *   tuned W (base + ΔW; the B side for model vs model), those whose largest |cosine| with
 *   all min(out, in) left singular vectors of the base W is below intruder_eps.
 */
#ifndef LK_DIFF_H
#define LK_DIFF_H

#include <stdint.h>

#include "lk.h"
#include "svd.h"

#define DIFF_MAX_ENERGY 8
#define DIFF_MAX_TOP 64
#define DIFF_INTRUDER_K_DEFAULT 10
#define DIFF_INTRUDER_EPS_DEFAULT 0.5
#define DIFF_AMP_MAX_RANK 64
#define DIFF_ROW_BLOCK 65536 /* floats of W read at once when streaming rows */

struct diff_opts {
    int n_energy;
    double energy[DIFF_MAX_ENERGY]; /* fractions in (0, 1], default 0.5, 0.9, 0.99 */
    int top;                        /* K top singular values kept, 0..DIFF_MAX_TOP, default 5 */
    const char *base;               /* borrowed: --base DIR, or NULL */
    int intruder_k;                 /* default DIFF_INTRUDER_K_DEFAULT; 0 skips intruders */
    double intruder_eps;            /* default DIFF_INTRUDER_EPS_DEFAULT */
    int amplification;              /* 1 (default): compute it where defined */
    /* Called before tensor i (0-based) of n, and once with i == n at the end. May be NULL. */
    void (*progress)(void *ctx, int i, int n, const char *tensor);
    void *progress_ctx;
};

/* Fills o with the defaults above. */
void diff_opts_init(struct diff_opts *o);
/* Parses "0.5,0.9,0.99" into o->energy (each in (0, 1]). LK_ERR_USAGE naming the bad item. */
int diff_energy_parse(struct diff_opts *o, const char *s, struct lk_err *err);

enum diff_kind {
    DIFF_MODEL_MODEL = 0,
    DIFF_ADAPTER_ADAPTER,
    DIFF_BASE_ADAPTER,  /* a model and an adapter on it, either order */
    DIFF_ADAPTER_MODEL, /* base + adapter against another model, either order */
};
const char *diff_kind_str(enum diff_kind k); /* "model-model", ... */

enum diff_state {
    DIFF_CHANGED = 0,
    DIFF_UNCHANGED, /* identical values: no SVD was run */
    DIFF_ONLY_A,    /* tensor only in A */
    DIFF_ONLY_B,    /* tensor only in B */
};
const char *diff_state_str(enum diff_state s); /* "changed", "unchanged", "only-a", "only-b" */

/* The result for one tensor. Doubles are NAN and ints -1 when not computed. */
struct diff_tensor {
    char name[128];
    int layer;              /* model.layers.N..., else -1 */
    int module;             /* enum cfg_module of a projection weight or bias, else -1 */
    int ndim;
    int64_t rows, cols;     /* cols 1 for 1-D tensors */
    enum diff_state state;
    int has_stats;          /* the figures below are filled (CHANGED, computed) */
    int from_factors;       /* 1: computed from a rank-r factor form, never formed */
    int factor_rank;        /* r of that form (r_A + r_B for two adapters), else -1 */
    double fro, w_fro, rel;
    double spectral, stable_rank, eff_rank;
    int num_rank;
    int energy_rank[DIFF_MAX_ENERGY]; /* per diff_opts.energy */
    int n_top;
    double top[DIFF_MAX_TOP];
    /* two adapters: */
    double cosine;          /* <ΔW_A, ΔW_B> / (‖ΔW_A‖ ‖ΔW_B‖) */
    double fro_a, fro_b;    /* ‖ΔW_A‖_F, ‖ΔW_B‖_F */
    int adapted;            /* bit 0: A adapts this tensor, bit 1: B does */
    int n_grid_a, n_grid_b; /* grid sizes: φ is [n_grid_a, n_grid_b] row-major */
    int grid_a[SVD_GRID_MAX], grid_b[SVD_GRID_MAX];
    double *phi_right;      /* owned, or NULL: over right-singular vectors (input space) */
    double *phi_left;       /* owned, or NULL: over left-singular vectors (output space) */
    /* a fine-tune against its base: */
    double amplification;
    int amp_rank;
    int intruders;          /* -1 when not computed */
    double intruder_min_cos; /* smallest max-|cos| among the top-k tuned vectors */
};

struct diff_side; /* private: one opened folder */

struct diff {
    enum diff_kind kind;
    struct diff_side *a, *b; /* owned */
    char *base_dir;          /* owned: the adapter base in use, or NULL */
    int have_base_weights;   /* adapter cases: the base's weights could be read */
    char note[512];          /* what the caller should know (e.g. base assumed), or "" */
    int n;
    struct diff_tensor *t;   /* owned array of n, after diff_compare (in tensor-name order) */
    /* private */
    void *priv;
};

/* Opens A and B (folders), decides the kind, loads adapters and maps weights. Nothing is
 * computed yet. On failure d is released. */
int diff_open(struct diff *d, const char *a, const char *b, const struct diff_opts *o,
              struct lk_err *err);
/* Compares every tensor, one at a time, into d->t. Honors lk_interrupted
 * (LK_ERR_INTERRUPTED). An error names the tensor. */
int diff_compare(struct diff *d, const struct diff_opts *o, struct lk_err *err);
/* Frees everything; harmless twice or on a zeroed struct. */
void diff_close(struct diff *d);
/* diff_open + diff_compare. */
int diff_run(struct diff *d, const char *a, const char *b, const struct diff_opts *o,
             struct lk_err *err);

// ---- building blocks (also used by tests) ----

/* Statistics of a dense ΔW [m, n] (n = 1 for a vector: norms only): fills fro, spectral,
 * stable/effective/numerical rank, energy ranks, top values; rel from w_fro2 = ‖W‖_F² (pass
 * NAN when unknown). Sets has_stats. Runs svd_values on a copy. */
int diff_dense_stats(int m, int n, const float *dW, double w_fro2, const struct diff_opts *o,
                     struct diff_tensor *t, struct lk_err *err);
/* The same for ΔW = s·B·A, B [m, r], A [r, n], 1 <= r <= min(m, n), from the factors. When
 * out_U [m, r] / out_Vt [r, n] are not NULL they receive the singular vectors (the first
 * t->num_rank are meaningful). Never allocates m x n. */
int diff_factor_stats(int m, int n, int r, float s, const float *B, const float *A,
                      double w_fro2, const struct diff_opts *o, struct diff_tensor *t,
                      float *out_U, float *out_Vt, struct lk_err *err);
/* Cosine, ‖ΔW_1‖, ‖ΔW_2‖ and both φ grids of two changes s1·B1·A1 and s2·B2·A2 (each rank
 * r <= min(m, n)) into t (cosine, fro_a, fro_b, grids, phi_*). Never allocates m x n. */
int diff_factor_pair(int m, int n, int r1, float s1, const float *B1, const float *A1, int r2,
                     float s2, const float *B2, const float *A2, struct diff_tensor *t,
                     struct lk_err *err);
/* Amplification ‖ΔW‖_F / ‖U_rᵀ W V_rᵀ‖_F for W [m, n], U [m, r] (columns), Vt [r, n] (rows).
 * INFINITY when the projection is zero. */
int diff_amplification(int m, int n, const float *W, int r, const float *U, const float *Vt,
                       double dw_fro, double *out, struct lk_err *err);
/* Intruder dimensions of W_tuned against W (both [m, n]): count among the top k left singular
 * vectors of W_tuned of those whose max |cos| with every left singular vector of W is < eps.
 * out_min_cos (may be NULL) gets the smallest of those max-|cos| values. */
int diff_intruders(int m, int n, const float *W, const float *W_tuned, int k, double eps,
                   int *out_count, double *out_min_cos, struct lk_err *err);

// ---- summaries and output ----

/* Aggregate of a group of tensors: sums of squares, so rel = sqrt(fro2 / w_fro2). */
struct diff_group {
    int n_changed, n_unchanged, n_only;
    double fro2, w_fro2;    /* w_fro2 NAN when any member's W is unknown */
    double max_rel;
    double eff_rank_sum;    /* over changed 2-D tensors with stats */
    int n_eff;
};
struct diff_summary {
    struct diff_group total;
    struct diff_group module[7]; /* per enum cfg_module, weights and biases together */
    struct diff_group other;     /* embeddings, norms, lm_head */
    int n_layers;
    struct diff_group *layer;    /* owned [n_layers] */
};
int diff_summarize(const struct diff *d, struct diff_summary *out, struct lk_err *err);
void diff_summary_release(struct diff_summary *s);
/* rel of a group: sqrt(fro2 / w_fro2), NAN when unknown. */
double diff_group_rel(const struct diff_group *g);

/* JSON texts (heap strings, caller lk_frees; NULL on OOM). */
/* {"0.5": 3, "0.9": 5, ...} of a tensor (NULL when it has no spectrum). */
char *diff_energy_json(const struct diff_tensor *t, const struct diff_opts *o);
/* Everything else of a tensor: state, shape, spectrum, cosine, φ grids, amplification... */
char *diff_tensor_json(const struct diff_tensor *t, const struct diff_opts *o);
struct cJSON;
/* The summary (totals, per module, per layer) as one object (caller cJSON_Deletes; NULL on OOM). */
struct cJSON *diff_summary_obj(const struct diff *d, const struct diff_summary *s);
/* A run record's parameters: {"a", "b", "kind", "base", "energy", "top", "intruder_k",
 * "intruder_eps"} (caller cJSON_Deletes; NULL on OOM). */
struct cJSON *diff_params_obj(const struct diff *d, const char *a, const char *b, const struct diff_opts *o);
/* The whole report: {"kind", "a", "b", "note", "tensors": [...], "summary": {...}}. */
char *diff_report_json(const struct diff *d, const char *a, const char *b,
                       const struct diff_opts *o, const struct diff_summary *s);

struct rdb;
/* Stores one row per tensor (rdb_tensor_stat: rank = numerical rank, energy_json, extra_json
 * = diff_tensor_json) under run_id. */
int diff_rdb_write(struct rdb *db, int64_t run_id, const struct diff *d,
                   const struct diff_opts *o, struct lk_err *err);

#endif
