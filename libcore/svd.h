/*
 * svd.h - the one SVD module of lorakit: exact and randomized truncated SVD, rank choice by
 * energy, the SVD of a low-rank product s·B·A without forming it, spectral metrics and the
 * similarity of two changes (subspace similarity of Hu et al. 2021, cosine of ΔW's).
 * Used by svd-compress, diff, merge --method svd and PiSSA init.
 *
 * Conventions for the whole module:
 * - Matrices are row-major float32. A [m, n] has m rows of n floats.
 * - A truncated SVD of rank k gives U [m, k] (columns are the left singular vectors),
 *   S [k] (descending, >= 0) and Vt [k, n] (rows are the right singular vectors), so that
 *   A ≈ U·diag(S)·Vt. Signs of singular vector pairs are whatever LAPACK returns.
 * - Inputs are borrowed and never modified; outputs are caller-owned buffers of the stated
 *   size; scratch is allocated inside with lk_malloc and freed before returning.
 * - Sums, norms and energies are accumulated in double. "Energy" is a sum of σ²; the total
 *   energy of A is ‖A‖_F², always computed from A itself (svd_fro2), never from a truncated
 *   spectrum.
 * - Every function returning int returns LK_OK or an lk_status with err filled: LK_ERR_SHAPE
 *   for bad dimensions or ranks, LK_ERR_NOMEM, LK_ERR_NUMERIC for non-finite input or a
 *   LAPACK failure. On failure the output buffers hold unspecified values.
 */
#ifndef LK_SVD_H
#define LK_SVD_H

#include <stdint.h>

#include "lk.h"

// ---- exact (LAPACKE sgesdd) ----

/* Top k singular triplets of A [m, n] by sgesdd (divide and conquer, economy size),
 * 1 <= k <= min(m, n). out_U [m, k], out_S [k], out_Vt [k, n]. Needs about
 * (m + n + 2) * min(m, n) + m * n floats of scratch plus LAPACK's workspace. */
int svd_exact(int m, int n, const float *A, int k, float *out_U, float *out_S, float *out_Vt,
              struct lk_err *err);

/* All min(m, n) singular values of A [m, n], descending, into out_S [min(m, n)]
 * (sgesdd without vectors: several times cheaper than svd_exact). For spectra. */
int svd_values(int m, int n, const float *A, float *out_S, struct lk_err *err);

// ---- randomized (Halko, Martinsson & Tropp 2011, Algorithm 4.4 + 5.1) ----

#define SVD_OVERSAMPLE_DEFAULT 10
#define SVD_POWER_ITERS_DEFAULT 2

/* Top k singular triplets of A [m, n] from a Gaussian sketch of k + p columns (capped at
 * min(m, n)) refined by q power iterations, each multiplication by A or Aᵀ followed by a
 * QR re-orthonormalisation (sgeqrf + sorgqr), then an exact SVD of the small (k+p) x n
 * projection. rng is borrowed and advanced (same state, same result with a fixed thread
 * count). The singular values found are never above the true ones (they are those of QᵀA
 * for an orthonormal Q), so energies computed from them are lower bounds.
 * Scratch about l * (m + 3n + l) floats, l = min(k + p, min(m, n)). Outputs as svd_exact. */
int svd_randomized(int m, int n, const float *A, int k, int p, int q, struct lk_rng *rng,
                   float *out_U, float *out_S, float *out_Vt, struct lk_err *err);

// ---- automatic choice ----

enum svd_method {
    SVD_AUTO = 0,   /* svd_method_pick decides */
    SVD_EXACT,      /* always sgesdd */
    SVD_RANDOMIZED, /* always the sketch (still exact when k + p reaches min(m, n)) */
};

struct svd_opts {
    enum svd_method method;
    int oversample;  /* p, >= 0 */
    int power_iters; /* q, >= 0 */
    uint64_t seed;   /* seeds a fresh lk_rng for each call: per-call reproducible results */
};

/* Fills o with the defaults: SVD_AUTO, p = 10, q = 2, seed 0. */
void svd_opts_init(struct svd_opts *o);

/* The method SVD_AUTO uses for a rank-k SVD of an m x n matrix: randomized when the sketch
 * k + p is at most min(m, n) / SVD_SKETCH_FRACTION and min(m, n) >= SVD_RANDOMIZED_MIN_DIM,
 * exact otherwise (small matrices or sketches nearly as wide as the matrix, where gesdd is
 * as cheap and exact). Returns SVD_EXACT or SVD_RANDOMIZED; a forced o->method wins. */
#define SVD_SKETCH_FRACTION 4
#define SVD_RANDOMIZED_MIN_DIM 128
enum svd_method svd_method_pick(int m, int n, int k, const struct svd_opts *o);

/* Top k triplets by the method o picks (o NULL: defaults). Outputs as svd_exact.
 * If out_method is not NULL it receives the method used (SVD_EXACT or SVD_RANDOMIZED). */
int svd_truncated(int m, int n, const float *A, int k, const struct svd_opts *o,
                  float *out_U, float *out_S, float *out_Vt, enum svd_method *out_method,
                  struct lk_err *err);

// ---- energy ----

/* An energy fraction E counts as reached when kept >= E - SVD_ENERGY_SLACK: rounding alone
 * moves float σ² sums by ~1e-7 of the total, so "100%" must tolerate it (numerical rank). */
#define SVD_ENERGY_SLACK 1e-5

/* ‖A‖_F² of A [m, n], accumulated in double. Non-finite entries give a non-finite result. */
double svd_fro2(int m, int n, const float *A);

/* Smallest r in [0, k] whose top-r values keep a fraction E of total (S descending, k values),
 * or -1 when the k values do not reach it. total <= 0 (a zero matrix) gives 0. */
int svd_energy_rank(const float *S, int k, double total, double E);

/* Fraction of total kept by the top r values (r <= length of S); 1 when total <= 0. */
double svd_energy_kept(const float *S, int r, double total);

/* What svd_truncated_energy did. */
struct svd_energy_info {
    int rank;               /* r chosen: smallest keeping E, or max_rank when E needs more */
    double total;           /* ‖A‖_F², from A */
    double kept;            /* fraction of total kept by the r values returned */
    int reached;            /* 1 if the r values keep E (0 when capped by max_rank) */
    enum svd_method method; /* method of the final decomposition */
    int sketch_rank;        /* k of the last randomized attempt (0 if none) */
    int attempts;           /* decompositions computed (the sketch doubles each time) */
};

/* Smallest rank keeping a fraction E of ‖A‖_F², capped at max_rank (1 <= max_rank <=
 * min(m, n)), with its singular triplets. The exact path computes all values once. The
 * randomized path starts from a sketch of rank min(16, max_rank) and doubles it (capped at
 * max_rank) until the top r values found keep E of the directly computed total - certain,
 * because the values found are lower bounds of the true ones - and falls back to exact when
 * the sketch would approach min(m, n) (SVD_AUTO: when svd_method_pick says exact; a forced
 * SVD_RANDOMIZED: when k + p exceeds min(m, n) / 2). E must be in (0, 1]; a zero matrix gives
 * rank 0. Cost: at most about twice the final sketch. Outputs are sized for max_rank (out_U [m * max_rank], out_S [max_rank],
 * out_Vt [max_rank * n]); on return the first info->rank columns/values/rows are written
 * packed, as U [m, r], S [r], Vt [r, n]. out_info must not be NULL. */
int svd_truncated_energy(int m, int n, const float *A, double E, int max_rank,
                         const struct svd_opts *o, float *out_U, float *out_S, float *out_Vt,
                         struct svd_energy_info *out_info, struct lk_err *err);

// ---- low-rank factor form ----

/* SVD of s·B·A, B [m, r], A [r, n], without forming the m x n product: QR of B and of Aᵀ,
 * SVD of the r x r core s·R_B·R_Aᵀ, rotations back. Exact (up to rounding) and cheap:
 * O((m + n) r² + r³). Requires 1 <= k <= r <= min(m, n); gives the top k triplets:
 * out_U [m, k], out_S [k], out_Vt [k, n]. For adapter rank reduction and analysis. */
int svd_factor(int m, int n, int r, float s, const float *B, const float *A, int k,
               float *out_U, float *out_S, float *out_Vt, struct lk_err *err);

/* ‖s·B·A‖_F² from the factors: trace((BᵀB)(AAᵀ)), Gram matrices in double. */
int svd_factor_fro2(int m, int n, int r, float s, const float *B, const float *A,
                    double *out_fro2, struct lk_err *err);

/* Frobenius inner product <s1·B1·A1, s2·B2·A2> of two m x n changes given as factors
 * B1 [m, r1], A1 [r1, n], B2 [m, r2], A2 [r2, n]: s1·s2·trace((B1ᵀB2)(A2A1ᵀ)), all in double,
 * never forming m x n. */
int svd_factor_inner(int m, int n, int r1, float s1, const float *B1, const float *A1, int r2,
                     float s2, const float *B2, const float *A2, double *out_inner,
                     struct lk_err *err);

/* Cosine similarity <X, Y> / (‖X‖ ‖Y‖) of the two changes above; 0 if either is zero. */
int svd_factor_cosine(int m, int n, int r1, float s1, const float *B1, const float *A1, int r2,
                      float s2, const float *B2, const float *A2, double *out_cos,
                      struct lk_err *err);

// ---- spectral metrics ----

/* Metrics of a matrix from its singular values S [k] (descending) and total = ‖A‖_F²
 * (pass total < 0 to use Σσ² of the k values). Effective rank uses the k values given: pass
 * the full spectrum (svd_values) for the exact figure. */
struct svd_metrics {
    double fro;            /* ‖A‖_F = sqrt(total) */
    double spectral;       /* ‖A‖_2 = σ_1 */
    double stable_rank;    /* ‖A‖_F² / ‖A‖_2², 0 for a zero matrix */
    double effective_rank; /* exp(-Σ p_i log p_i), p_i = σ_i / Σσ (Roy & Vetterli 2007) */
};
void svd_metrics_compute(const float *S, int k, double total, struct svd_metrics *out);

/* Relative Frobenius error of the rank-r truncation, sqrt(discarded energy / total), with
 * discarded = total - Σ_{i<r} σ_i² clamped at 0 (Eckart-Young). 0 when total <= 0. */
double svd_trunc_error(const float *S, int r, double total);

/* Numerical rank: the count of σ_i > σ_1·max(m, n)·FLT_EPSILON (the rule of LAPACK's
 * xGELSS and numpy.linalg.matrix_rank). Values below it are float rounding of zeros: drop
 * them before svd_metrics_compute to get the effective rank of an exactly low-rank matrix. */
int svd_numerical_rank(const float *S, int k, int m, int n);

// ---- subspace similarity (Hu et al. 2021, LoRA §7, Eq. 4) ----

/* How a basis is stored: columns of a [d, r] matrix (U from an SVD) or rows of an [r, d]
 * matrix (Vt from an SVD, or a LoRA A). */
enum svd_basis {
    SVD_BASIS_COLS = 0,
    SVD_BASIS_ROWS,
};

#define SVD_GRID_MAX 32

/* The grid sizes {1, 2, 4, ..., r} (r appended when not a power of two) into
 * out_sizes [SVD_GRID_MAX]; returns how many. r < 1 gives 0. */
int svd_grid_sizes(int r, int *out_sizes);

/* φ(i, j) = ‖U1[:, :i]ᵀ U2[:, :j]‖_F² / min(i, j) for two orthonormal bases of dimension d,
 * U1 with r1 vectors, U2 with r2, each stored as layout says. In [0, 1]: 1 when one span
 * contains the other, about max(i, j) / d for independent random bases. Fills out_phi
 * [n1 * n2] row-major (n1 = svd_grid_sizes(r1), n2 = svd_grid_sizes(r2)), out_phi[a * n2 + b]
 * being φ(sizes1[a], sizes2[b]). One r1 x r2 product, then prefix sums in double. */
int svd_subspace_sim(int d, int r1, const float *U1, enum svd_basis layout1, int r2,
                     const float *U2, enum svd_basis layout2, double *out_phi,
                     struct lk_err *err);

#endif
