/*
 * test_svd.c - the SVD module against independent references: a cyclic Jacobi eigensolver
 * in double for singular values, reconstructions and orthonormality computed in double
 * loops, matrices built from a known spectrum (so the Eckart-Young optimum is known exactly),
 * formed products for the factor form, closed-form expectations for metrics and φ.
 */
#include "test.h"

#include <cblas.h>
#include <lapacke.h>
#include <stdlib.h>
#include <string.h>

#include "../libcore/lk.h"
#include "../libcore/svd.h"

// ---- helpers (all test-owned buffers are freed with free()) ----

static float *randn(struct lk_rng *rng, size_t n, float scale)
{
    float *x = malloc(n * sizeof(float));
    for (size_t i = 0; i < n; i++)
        x[i] = scale * lk_rng_normal(rng);
    return x;
}

/* A random [d, r] row-major matrix with orthonormal columns (QR of a Gaussian, by LAPACKE's
 * row-major interface: a different code path from the library's). */
static float *rand_orth(struct lk_rng *rng, int d, int r)
{
    float *Q = randn(rng, (size_t)d * r, 1.0f);
    float *tau = malloc((size_t)r * sizeof(float));
    LAPACKE_sgeqrf(LAPACK_ROW_MAJOR, d, r, Q, r, tau);
    LAPACKE_sorgqr(LAPACK_ROW_MAJOR, d, r, r, Q, r, tau);
    free(tau);
    return Q;
}

/* A [m, n] = U·diag(sigma)·Vᵀ with random orthonormal U [m, mn], V [n, mn]. */
static float *from_spectrum(struct lk_rng *rng, int m, int n, const float *sigma)
{
    int mn = m < n ? m : n;
    float *U = rand_orth(rng, m, mn), *V = rand_orth(rng, n, mn);
    for (int i = 0; i < m; i++)
        for (int j = 0; j < mn; j++)
            U[(size_t)i * mn + j] *= sigma[j];
    float *A = malloc((size_t)m * n * sizeof(float));
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, m, n, mn, 1.0f, U, mn, V, mn, 0.0f, A, n);
    free(U);
    free(V);
    return A;
}

/* ‖A - U·diag(S)·Vt‖_F / ‖A‖_F, the product formed in double (small sizes). */
static double recon_err_ref(int m, int n, const float *A, int k, const float *U, const float *S,
                            const float *Vt)
{
    double num = 0, den = 0;
    for (int i = 0; i < m; i++)
        for (int j = 0; j < n; j++) {
            double v = 0;
            for (int t = 0; t < k; t++)
                v += (double)U[(size_t)i * k + t] * S[t] * Vt[(size_t)t * n + j];
            double a = A[(size_t)i * n + j];
            num += (a - v) * (a - v);
            den += a * a;
        }
    return den > 0 ? sqrt(num / den) : sqrt(num);
}

/* The same with sgemm, for big matrices. */
static double recon_err_blas(int m, int n, const float *A, int k, const float *U, const float *S,
                             const float *Vt)
{
    float *US = malloc((size_t)m * k * sizeof(float)), *P = malloc((size_t)m * n * sizeof(float));
    for (int i = 0; i < m; i++)
        for (int t = 0; t < k; t++)
            US[(size_t)i * k + t] = U[(size_t)i * k + t] * S[t];
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, m, n, k, 1.0f, US, k, Vt, n, 0.0f, P, n);
    double num = 0, den = 0;
    for (size_t i = 0; i < (size_t)m * n; i++) {
        double d = (double)A[i] - P[i];
        num += d * d;
        den += (double)A[i] * A[i];
    }
    free(US);
    free(P);
    return sqrt(num / den);
}

/* max |XᵀX - I| for the k vectors of X: columns of [d, k] (cols = 1) or rows of [k, d]. */
static double orth_err(int d, int k, const float *X, int cols)
{
    double worst = 0;
    for (int a = 0; a < k; a++)
        for (int b = 0; b < k; b++) {
            double v = 0;
            for (int t = 0; t < d; t++)
                v += cols ? (double)X[(size_t)t * k + a] * X[(size_t)t * k + b]
                          : (double)X[(size_t)a * d + t] * X[(size_t)b * d + t];
            v -= a == b;
            if (fabs(v) > worst)
                worst = fabs(v);
        }
    return worst;
}

static int cmp_desc(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? 1 : x > y ? -1 : 0;
}

/* Singular values of A [m, n] as sqrt of the eigenvalues of the smaller Gram matrix, by the
 * cyclic Jacobi method in double. out [min(m, n)], descending. */
static void jacobi_singular_values(int m, int n, const float *A, double *out)
{
    int N = m < n ? m : n;
    double *G = calloc((size_t)N * N, sizeof(double));
    for (int i = 0; i < N; i++)
        for (int j = 0; j < N; j++) {
            double v = 0;
            if (n <= m) // AᵀA
                for (int t = 0; t < m; t++)
                    v += (double)A[(size_t)t * n + i] * A[(size_t)t * n + j];
            else // AAᵀ
                for (int t = 0; t < n; t++)
                    v += (double)A[(size_t)i * n + t] * A[(size_t)j * n + t];
            G[(size_t)i * N + j] = v;
        }
    for (int sweep = 0; sweep < 100; sweep++) {
        double off = 0;
        for (int p = 0; p < N; p++)
            for (int q = p + 1; q < N; q++)
                off += G[(size_t)p * N + q] * G[(size_t)p * N + q];
        if (off < 1e-30)
            break;
        for (int p = 0; p < N; p++)
            for (int q = p + 1; q < N; q++) {
                double apq = G[(size_t)p * N + q];
                if (fabs(apq) < 1e-300)
                    continue;
                double theta = (G[(size_t)q * N + q] - G[(size_t)p * N + p]) / (2 * apq);
                double t = (theta >= 0 ? 1 : -1) / (fabs(theta) + sqrt(theta * theta + 1));
                double c = 1 / sqrt(t * t + 1), s = t * c;
                for (int k = 0; k < N; k++) { // G <- JᵀGJ, columns then rows
                    double gkp = G[(size_t)k * N + p], gkq = G[(size_t)k * N + q];
                    G[(size_t)k * N + p] = c * gkp - s * gkq;
                    G[(size_t)k * N + q] = s * gkp + c * gkq;
                }
                for (int k = 0; k < N; k++) {
                    double gpk = G[(size_t)p * N + k], gqk = G[(size_t)q * N + k];
                    G[(size_t)p * N + k] = c * gpk - s * gqk;
                    G[(size_t)q * N + k] = s * gpk + c * gqk;
                }
            }
    }
    for (int i = 0; i < N; i++)
        out[i] = sqrt(fmax(0.0, G[(size_t)i * N + i]));
    qsort(out, (size_t)N, sizeof(double), cmp_desc);
    free(G);
}

// ---- exact ----

TEST(svd_exact_matches_jacobi_on_awkward_shapes)
{
    static const int shapes[][2] = { { 1, 1 }, { 1, 7 }, { 7, 1 }, { 2, 3 }, { 13, 5 },
                                     { 5, 13 }, { 20, 20 }, { 31, 17 }, { 64, 9 }, { 9, 40 } };
    struct lk_rng rng;
    lk_rng_seed(&rng, 1);
    for (size_t c = 0; c < sizeof(shapes) / sizeof(shapes[0]); c++) {
        int m = shapes[c][0], n = shapes[c][1], mn = m < n ? m : n;
        float *A = randn(&rng, (size_t)m * n, 1.0f);
        float *A0 = malloc((size_t)m * n * sizeof(float));
        memcpy(A0, A, (size_t)m * n * sizeof(float));
        float *U = malloc((size_t)m * mn * sizeof(float)), *S = malloc((size_t)mn * sizeof(float));
        float *Vt = malloc((size_t)mn * n * sizeof(float)), *S2 = malloc((size_t)mn * sizeof(float));
        double *ref = malloc((size_t)mn * sizeof(double));
        CHECK_OK(svd_exact(m, n, A, mn, U, S, Vt, test_err()));
        CHECK(memcmp(A, A0, (size_t)m * n * sizeof(float)) == 0); // input untouched
        jacobi_singular_values(m, n, A, ref);
        for (int i = 0; i < mn; i++) {
            CHECK_MSG(fabs(S[i] - ref[i]) <= 1e-5 * ref[0], "%dx%d: S[%d] %g vs Jacobi %g", m, n, i,
                      S[i], ref[i]);
            CHECK(i == 0 || S[i] <= S[i - 1]);
        }
        double e = recon_err_ref(m, n, A, mn, U, S, Vt);
        CHECK_MSG(e < 1e-5, "%dx%d: reconstruction error %g", m, n, e);
        CHECK_MSG(orth_err(m, mn, U, 1) < 1e-5, "%dx%d: U not orthonormal", m, n);
        CHECK_MSG(orth_err(n, mn, Vt, 0) < 1e-5, "%dx%d: V not orthonormal", m, n);
        // values only: the same spectrum
        CHECK_OK(svd_values(m, n, A, S2, test_err()));
        for (int i = 0; i < mn; i++)
            CHECK_NEAR(S2[i], ref[i], 1e-5 * ref[0]);
        // truncation at k: error is the Eckart-Young optimum from the Jacobi spectrum
        int k = (mn + 1) / 2;
        CHECK_OK(svd_exact(m, n, A, k, U, S, Vt, test_err()));
        double tot = 0, rest = 0;
        for (int i = 0; i < mn; i++) {
            tot += ref[i] * ref[i];
            rest += i >= k ? ref[i] * ref[i] : 0;
        }
        CHECK_NEAR(recon_err_ref(m, n, A, k, U, S, Vt), sqrt(rest / tot), 1e-5);
        CHECK(orth_err(m, k, U, 1) < 1e-5 && orth_err(n, k, Vt, 0) < 1e-5);
        free(A);
        free(A0);
        free(U);
        free(S);
        free(Vt);
        free(S2);
        free(ref);
    }
}

TEST(svd_rejects_bad_rank_and_non_finite_input)
{
    float A[6] = { 1, 2, 3, 4, 5, 6 }, U[6], S[3], Vt[6];
    struct lk_err *err = test_err();
    CHECK_INT(svd_exact(2, 3, A, 0, U, S, Vt, err), LK_ERR_SHAPE);
    CHECK_INT(svd_exact(2, 3, A, 3, U, S, Vt, err), LK_ERR_SHAPE);
    CHECK(strstr(err->msg, "rank 3 out of range [1, 2]") != NULL);
    A[4] = NAN;
    CHECK_INT(svd_exact(2, 3, A, 2, U, S, Vt, err), LK_ERR_NUMERIC);
    CHECK(strstr(err->msg, "[1, 1]") != NULL);
    struct lk_rng rng;
    lk_rng_seed(&rng, 3);
    CHECK_INT(svd_randomized(2, 3, A, 1, 10, 2, &rng, U, S, Vt, err), LK_ERR_NUMERIC);
    CHECK_INT(svd_values(2, 3, A, S, err), LK_ERR_NUMERIC);
    A[4] = 5;
    struct svd_energy_info info;
    CHECK_INT(svd_truncated_energy(2, 3, A, 1.5, 2, NULL, U, S, Vt, &info, err), LK_ERR_USAGE);
    CHECK_INT(svd_truncated_energy(2, 3, A, 0.9, 3, NULL, U, S, Vt, &info, err), LK_ERR_SHAPE);
}

TEST(svd_survives_allocation_failures)
{
    struct lk_rng rng;
    lk_rng_seed(&rng, 4);
    int m = 40, n = 30, k = 5;
    float *A = randn(&rng, (size_t)m * n, 1.0f), *B = randn(&rng, (size_t)m * k, 1.0f);
    float *Af = randn(&rng, (size_t)k * n, 1.0f);
    float U[40 * 30], S[30], Vt[30 * 30];
    struct svd_energy_info info;
    struct svd_opts o;
    svd_opts_init(&o);
    o.method = SVD_RANDOMIZED;
    o.oversample = 2;
    o.power_iters = 1;
    int ok = 0, nomem = 0;
    for (long nth = 1; nth < 60; nth++) {
        for (int f = 0; f < 4; f++) {
            lk_fail_countdown = nth;
            int rc;
            if (f == 0)
                rc = svd_exact(m, n, A, k, U, S, Vt, test_err());
            else if (f == 1)
                rc = svd_truncated(m, n, A, k, &o, U, S, Vt, NULL, test_err());
            else if (f == 2)
                rc = svd_truncated_energy(m, n, A, 0.5, 12, &o, U, S, Vt, &info, test_err());
            else
                rc = svd_factor(m, n, k, 1.0f, B, Af, k, U, S, Vt, test_err());
            lk_fail_countdown = 0;
            CHECK_MSG(rc == LK_OK || rc == LK_ERR_NOMEM, "call %d, failing alloc %ld: %d", f, nth, rc);
            ok += rc == LK_OK;
            nomem += rc == LK_ERR_NOMEM;
        }
    }
    CHECK(nomem > 20); // failures were injected into every function
    CHECK(ok > 0);     // and the countdown eventually runs past every allocation
    free(A);
    free(B);
    free(Af);
}

// ---- randomized ----

/* Randomized vs exact vs the known optimum at rank r on an m x n matrix with σ_i = 1/i. */
static void check_randomized_near_optimal(int m, int n, int r)
{
    int mn = m < n ? m : n;
    struct lk_rng rng;
    lk_rng_seed(&rng, 42);
    float *sigma = malloc((size_t)mn * sizeof(float));
    double tot = 0, rest = 0;
    for (int i = 0; i < mn; i++) {
        sigma[i] = 1.0f / (float)(i + 1);
        tot += (double)sigma[i] * sigma[i];
        rest += i >= r ? (double)sigma[i] * sigma[i] : 0;
    }
    double opt = sqrt(rest / tot);
    float *A = from_spectrum(&rng, m, n, sigma);
    float *U = malloc((size_t)m * r * sizeof(float)), *S = malloc((size_t)r * sizeof(float));
    float *Vt = malloc((size_t)r * n * sizeof(float));
    struct svd_opts o;
    svd_opts_init(&o);
    o.seed = 7;
    enum svd_method used;
    CHECK_OK(svd_truncated(m, n, A, r, &o, U, S, Vt, &used, test_err()));
    CHECK_INT(used, SVD_RANDOMIZED); // the automatic choice at this shape and rank
    double e_rand = recon_err_blas(m, n, A, r, U, S, Vt);
    CHECK_MSG(e_rand <= 1.01 * opt, "randomized error %g vs optimum %g", e_rand, opt);
    CHECK_MSG(orth_err(m, r, U, 1) < 1e-4, "randomized U not orthonormal");
    // values never above the true ones (up to rounding); the leading half within 1%, the
    // tail (where the sketch has least room) within 5%
    for (int i = 0; i < r; i++)
        CHECK_MSG(S[i] <= sigma[i] * (1 + 1e-4) && S[i] >= sigma[i] * (i < r / 2 ? 0.99 : 0.95),
                  "S[%d] %g vs %g", i, S[i], sigma[i]);
    CHECK_OK(svd_exact(m, n, A, r, U, S, Vt, test_err()));
    double e_exact = recon_err_blas(m, n, A, r, U, S, Vt);
    CHECK_NEAR(e_exact, opt, 1e-3);
    CHECK(e_rand >= e_exact * (1 - 1e-4)); // nothing beats the optimum
    free(sigma);
    free(A);
    free(U);
    free(S);
    free(Vt);
}

TEST(svd_randomized_near_optimal_896x896)
{
    check_randomized_near_optimal(896, 896, 64);
}

TEST(svd_randomized_near_optimal_4864x896)
{
    if (!test_full())
        SKIP("full tier only (LK_TEST_FULL=1): builds and decomposes a 4864 x 896 matrix");
    check_randomized_near_optimal(4864, 896, 64);
}

TEST(svd_randomized_same_seed_same_result)
{
    struct lk_rng rng;
    lk_rng_seed(&rng, 9);
    int m = 150, n = 130, k = 8;
    float *A = randn(&rng, (size_t)m * n, 1.0f);
    float U1[150 * 8], S1[8], V1[8 * 130], U2[150 * 8], S2[8], V2[8 * 130];
    struct lk_rng r1, r2;
    lk_rng_seed(&r1, 5);
    lk_rng_seed(&r2, 5);
    CHECK_OK(svd_randomized(m, n, A, k, 10, 2, &r1, U1, S1, V1, test_err()));
    CHECK_OK(svd_randomized(m, n, A, k, 10, 2, &r2, U2, S2, V2, test_err()));
    CHECK(memcmp(S1, S2, sizeof(S1)) == 0 && memcmp(U1, U2, sizeof(U1)) == 0);
    // a sketch as wide as the matrix is exact: same values as gesdd
    float Se[8];
    CHECK_OK(svd_exact(m, n, A, k, U2, Se, V2, test_err()));
    CHECK_OK(svd_randomized(m, n, A, k, n, 0, &r1, U1, S1, V1, test_err()));
    for (int i = 0; i < k; i++)
        CHECK_NEAR(S1[i], Se[i], 1e-5);
    free(A);
}

// ---- energy ----

/* A [m, n] of exact rank k (σ spread over [1, 2]) plus Gaussian noise of the given scale. */
static float *rank_k_plus_noise(struct lk_rng *rng, int m, int n, int k, float noise)
{
    int mn = m < n ? m : n;
    float *sigma = calloc((size_t)mn, sizeof(float));
    for (int i = 0; i < k; i++)
        sigma[i] = 2.0f - (float)i / (float)k;
    float *A = from_spectrum(rng, m, n, sigma);
    for (size_t i = 0; i < (size_t)m * n; i++)
        A[i] += noise * lk_rng_normal(rng);
    free(sigma);
    return A;
}

TEST(svd_energy_finds_rank_k_exact_and_randomized)
{
    struct lk_rng rng;
    lk_rng_seed(&rng, 11);
    int m = 600, n = 400, k = 40, maxr = 100;
    float *A = rank_k_plus_noise(&rng, m, n, k, 1e-4f);
    float *U = malloc((size_t)m * maxr * sizeof(float)), *S = malloc((size_t)maxr * sizeof(float));
    float *Vt = malloc((size_t)maxr * n * sizeof(float));
    struct svd_opts o;
    svd_opts_init(&o);
    struct svd_energy_info info;

    // reference: all values by gesdd without vectors, and the optimum at rank k from them
    float *all = malloc((size_t)n * sizeof(float));
    CHECK_OK(svd_values(m, n, A, all, test_err()));
    double total = svd_fro2(m, n, A);
    double opt = svd_trunc_error(all, k, total); // the noise left out, ~5e-3 here
    CHECK(opt > 1e-3 && opt < 1e-2);
    CHECK_INT(svd_energy_rank(all, n, total, 0.99), k);
    int half = 0; // from the construction's σ_i = 2 - i/k (the noise is ~1e-4 of the energy)
    for (double cum = 0; cum < 0.5 * total; half++)
        cum += (2.0 - (double)half / k) * (2.0 - (double)half / k);
    CHECK_INT(svd_energy_rank(all, n, total, 0.5), half);
    CHECK_NEAR(svd_energy_kept(all, n, total), 1.0, 1e-5);

    o.method = SVD_EXACT;
    CHECK_OK(svd_truncated_energy(m, n, A, 0.99, maxr, &o, U, S, Vt, &info, test_err()));
    CHECK_INT(info.rank, k);
    CHECK_INT(info.method, SVD_EXACT);
    CHECK(info.reached && info.kept >= 0.99);
    CHECK_NEAR(info.total, total, 1e-12);
    CHECK_NEAR(recon_err_blas(m, n, A, k, U, S, Vt), opt, 1e-4);

    o.method = SVD_RANDOMIZED; // sketch 16, 32, then 64 reaches it
    CHECK_OK(svd_truncated_energy(m, n, A, 0.99, maxr, &o, U, S, Vt, &info, test_err()));
    CHECK_INT(info.rank, k);
    CHECK_INT(info.method, SVD_RANDOMIZED);
    CHECK_INT(info.attempts, 3);
    CHECK_INT(info.sketch_rank, 64);
    CHECK(info.reached && info.kept >= 0.99);
    CHECK(recon_err_blas(m, n, A, k, U, S, Vt) <= 1.01 * opt);
    CHECK(orth_err(m, k, U, 1) < 1e-4 && orth_err(n, k, Vt, 0) < 1e-4);

    // capped: max_rank below the rank needed
    o.method = SVD_AUTO;
    CHECK_OK(svd_truncated_energy(m, n, A, 0.99, 20, &o, U, S, Vt, &info, test_err()));
    CHECK_INT(info.rank, 20);
    CHECK(!info.reached && info.kept < 0.99);
    // the randomized cap (sketch 20 + 10 inside a flat band of 40 values, the hardest case
    // for a sketch) keeps a little less than the optimum, never more
    double best = svd_energy_kept(all, 20, info.total);
    CHECK_MSG(info.kept <= best + 1e-5 && info.kept >= 0.97 * best, "kept %g, optimum %g",
              info.kept, best);
    free(all);
    free(A);
    free(U);
    free(S);
    free(Vt);
}

TEST(svd_energy_of_zero_matrix_is_rank_zero)
{
    float A[12] = { 0 }, U[12], S[3], Vt[12];
    struct svd_energy_info info;
    CHECK_OK(svd_truncated_energy(4, 3, A, 0.9, 3, NULL, U, S, Vt, &info, test_err()));
    CHECK_INT(info.rank, 0);
    CHECK(info.reached);
    CHECK_NEAR(svd_trunc_error(S, 0, 0.0), 0.0, 0);
}

// ---- factor form ----

TEST(svd_factor_equals_svd_of_formed_product)
{
    static const int cases[][3] = { { 37, 23, 6 }, { 10, 50, 10 }, { 64, 64, 1 }, { 5, 5, 5 } };
    static const float scales[] = { 0.7f, -2.0f };
    struct lk_rng rng;
    lk_rng_seed(&rng, 21);
    for (size_t c = 0; c < sizeof(cases) / sizeof(cases[0]); c++)
        for (int si = 0; si < 2; si++) {
            int m = cases[c][0], n = cases[c][1], r = cases[c][2];
            float s = scales[si];
            float *B = randn(&rng, (size_t)m * r, 1.0f), *A = randn(&rng, (size_t)r * n, 0.3f);
            float *P = malloc((size_t)m * n * sizeof(float)); // s·B·A formed, in double
            for (int i = 0; i < m; i++)
                for (int j = 0; j < n; j++) {
                    double v = 0;
                    for (int t = 0; t < r; t++)
                        v += (double)B[(size_t)i * r + t] * A[(size_t)t * n + j];
                    P[(size_t)i * n + j] = (float)(s * v);
                }
            int mn = m < n ? m : n;
            double *ref = malloc((size_t)mn * sizeof(double));
            jacobi_singular_values(m, n, P, ref);
            float *U = malloc((size_t)m * r * sizeof(float)), *S = malloc((size_t)r * sizeof(float));
            float *Vt = malloc((size_t)r * n * sizeof(float));
            CHECK_OK(svd_factor(m, n, r, s, B, A, r, U, S, Vt, test_err()));
            for (int i = 0; i < r; i++)
                CHECK_MSG(fabs(S[i] - ref[i]) <= 1e-5 * ref[0], "%dx%d r%d: S[%d] %g vs %g", m, n,
                          r, i, S[i], ref[i]);
            CHECK_MSG(recon_err_ref(m, n, P, r, U, S, Vt) < 1e-5, "%dx%d r%d: product not rebuilt",
                      m, n, r);
            CHECK(orth_err(m, r, U, 1) < 1e-5 && orth_err(n, r, Vt, 0) < 1e-5);
            // top-k of the factor form = Eckart-Young truncation of the product
            if (r > 1) {
                int k = r / 2;
                CHECK_OK(svd_factor(m, n, r, s, B, A, k, U, S, Vt, test_err()));
                double tot = 0, rest = 0;
                for (int i = 0; i < mn; i++) {
                    tot += ref[i] * ref[i];
                    rest += i >= k ? ref[i] * ref[i] : 0;
                }
                CHECK_NEAR(recon_err_ref(m, n, P, k, U, S, Vt), sqrt(rest / tot), 1e-5);
            }
            double f2;
            CHECK_OK(svd_factor_fro2(m, n, r, s, B, A, &f2, test_err()));
            CHECK_NEAR(f2, svd_fro2(m, n, P), 1e-5);
            free(B);
            free(A);
            free(P);
            free(ref);
            free(U);
            free(S);
            free(Vt);
        }
    float B[4] = { 1, 2, 3, 4 }, A[4] = { 1, 0, 0, 1 }, U[4], S[2], Vt[4];
    CHECK_INT(svd_factor(2, 2, 3, 1.0f, B, A, 1, U, S, Vt, test_err()), LK_ERR_SHAPE);
}

TEST(svd_factor_cosine_of_scaled_negated_and_random)
{
    struct lk_rng rng;
    lk_rng_seed(&rng, 31);
    int m = 48, n = 40, r1 = 4, r2 = 7;
    float *B1 = randn(&rng, (size_t)m * r1, 1.0f), *A1 = randn(&rng, (size_t)r1 * n, 1.0f);
    float *B2 = randn(&rng, (size_t)m * r2, 1.0f), *A2 = randn(&rng, (size_t)r2 * n, 1.0f);
    double c;
    CHECK_OK(svd_factor_cosine(m, n, r1, 0.5f, B1, A1, r1, 3.0f, B1, A1, &c, test_err()));
    CHECK_NEAR(c, 1.0, 1e-9);
    CHECK_OK(svd_factor_cosine(m, n, r1, 0.5f, B1, A1, r1, -0.5f, B1, A1, &c, test_err()));
    CHECK_NEAR(c, -1.0, 1e-9);
    // a change that is only a scaling, written with different factors: (2B)(A/4) = 0.5·BA
    float *B1s = malloc((size_t)m * r1 * sizeof(float)), *A1s = malloc((size_t)r1 * n * sizeof(float));
    for (int i = 0; i < m * r1; i++)
        B1s[i] = 2 * B1[i];
    for (int i = 0; i < r1 * n; i++)
        A1s[i] = A1[i] / 4;
    CHECK_OK(svd_factor_cosine(m, n, r1, 1.0f, B1, A1, r1, 1.0f, B1s, A1s, &c, test_err()));
    CHECK_NEAR(c, 1.0, 1e-6);
    // two unrelated changes: against the cosine of the formed products, in double
    double xy = 0, xx = 0, yy = 0;
    for (int i = 0; i < m; i++)
        for (int j = 0; j < n; j++) {
            double x = 0, y = 0;
            for (int t = 0; t < r1; t++)
                x += (double)B1[i * r1 + t] * A1[t * n + j];
            for (int t = 0; t < r2; t++)
                y += (double)B2[i * r2 + t] * A2[t * n + j];
            xy += x * y;
            xx += x * x;
            yy += y * y;
        }
    CHECK_OK(svd_factor_cosine(m, n, r1, 1.5f, B1, A1, r2, 0.25f, B2, A2, &c, test_err()));
    CHECK_NEAR(c, xy / sqrt(xx * yy), 1e-9);
    CHECK(fabs(c) < 0.5); // and it is not trivially ±1
    double inner;
    CHECK_OK(svd_factor_inner(m, n, r1, 2.0f, B1, A1, r2, -1.0f, B2, A2, &inner, test_err()));
    CHECK_NEAR(inner, -2.0 * xy, 1e-9);
    free(B1);
    free(A1);
    free(B2);
    free(A2);
    free(B1s);
    free(A1s);
}

// ---- metrics ----

TEST(svd_metrics_rank3_and_flat_spectrum)
{
    struct lk_rng rng;
    lk_rng_seed(&rng, 41);
    int m = 40, n = 30;
    // rank 3: a sum of three random outer products with different weights
    float *A = calloc((size_t)m * n, sizeof(float));
    for (int t = 0; t < 3; t++) {
        float *x = randn(&rng, (size_t)m, 1.0f), *y = randn(&rng, (size_t)n, 1.0f);
        for (int i = 0; i < m; i++)
            for (int j = 0; j < n; j++)
                A[(size_t)i * n + j] += (float)(3 - t) * x[i] * y[j];
        free(x);
        free(y);
    }
    float S[30];
    double ref[30];
    CHECK_OK(svd_values(m, n, A, S, test_err()));
    jacobi_singular_values(m, n, A, ref);
    double total = svd_fro2(m, n, A);
    CHECK_INT(svd_numerical_rank(S, n, m, n), 3);
    CHECK_INT(svd_energy_rank(S, n, total, 1.0), 3);
    struct svd_metrics mt;
    svd_metrics_compute(S, svd_numerical_rank(S, n, m, n), total, &mt);
    CHECK(mt.effective_rank <= 3.0 && mt.effective_rank > 1.0);
    // against the definitions, from the independent spectrum
    double sum = ref[0] + ref[1] + ref[2], h = 0;
    for (int i = 0; i < 3; i++)
        h -= ref[i] / sum * log(ref[i] / sum);
    CHECK_NEAR(mt.effective_rank, exp(h), 1e-4);
    CHECK_NEAR(mt.fro, sqrt(total), 1e-12);
    CHECK_NEAR(mt.spectral, ref[0], 1e-5);
    CHECK_NEAR(mt.stable_rank, total / (ref[0] * ref[0]), 1e-4);
    CHECK_NEAR(svd_trunc_error(S, 1, total), sqrt((ref[1] * ref[1] + ref[2] * ref[2]) / total), 1e-5);
    CHECK_NEAR(svd_trunc_error(S, 3, total), 0.0, 1e-5);
    free(A);

    // identity-like: 3·I has a flat spectrum, effective and stable rank n
    int d = 25;
    float *I3 = calloc((size_t)d * d, sizeof(float)), Sd[25];
    for (int i = 0; i < d; i++)
        I3[(size_t)i * d + i] = 3.0f;
    CHECK_OK(svd_values(d, d, I3, Sd, test_err()));
    svd_metrics_compute(Sd, d, svd_fro2(d, d, I3), &mt);
    CHECK_NEAR(mt.effective_rank, (double)d, 1e-5);
    CHECK_NEAR(mt.stable_rank, (double)d, 1e-5);
    CHECK_NEAR(mt.spectral, 3.0, 1e-6);
    CHECK_INT(svd_energy_rank(Sd, d, svd_fro2(d, d, I3), 0.5), 13); // 13/25 is the first >= 1/2
    free(I3);
}

// ---- subspace similarity ----

TEST(svd_subspace_sim_grid_and_self_similarity)
{
    int sizes[SVD_GRID_MAX];
    CHECK_INT(svd_grid_sizes(16, sizes), 5);
    CHECK_INT(sizes[4], 16);
    CHECK_INT(svd_grid_sizes(12, sizes), 5); // 1 2 4 8 12
    CHECK_INT(sizes[4], 12);
    CHECK_INT(svd_grid_sizes(1, sizes), 1);

    struct lk_rng rng;
    lk_rng_seed(&rng, 51);
    int d = 64, r = 12;
    float *U = rand_orth(&rng, d, r);
    float *Ut = malloc((size_t)d * r * sizeof(float)); // the same basis stored as rows
    for (int i = 0; i < d; i++)
        for (int j = 0; j < r; j++)
            Ut[(size_t)j * d + i] = U[(size_t)i * r + j];
    double phi[25], phi2[25];
    CHECK_OK(svd_subspace_sim(d, r, U, SVD_BASIS_COLS, r, U, SVD_BASIS_COLS, phi, test_err()));
    // nested spans: ‖U[:, :i]ᵀU[:, :j]‖² = min(i, j), so φ = 1 everywhere, diagonal included
    for (int i = 0; i < 25; i++)
        CHECK_NEAR(phi[i], 1.0, 1e-5);
    CHECK_OK(svd_subspace_sim(d, r, Ut, SVD_BASIS_ROWS, r, U, SVD_BASIS_COLS, phi2, test_err()));
    for (int i = 0; i < 25; i++)
        CHECK_NEAR(phi2[i], phi[i], 1e-12);
    // orthogonal complements: φ = 0
    float *W = rand_orth(&rng, d, 2 * r);
    CHECK_OK(svd_subspace_sim(d, r, W, SVD_BASIS_COLS, r, W, SVD_BASIS_COLS, phi, test_err()));
    float *W2 = malloc((size_t)d * r * sizeof(float));
    for (int i = 0; i < d; i++)
        memcpy(W2 + (size_t)i * r, W + (size_t)i * 2 * r + r, (size_t)r * sizeof(float));
    float *W1 = malloc((size_t)d * r * sizeof(float));
    for (int i = 0; i < d; i++)
        memcpy(W1 + (size_t)i * r, W + (size_t)i * 2 * r, (size_t)r * sizeof(float));
    CHECK_OK(svd_subspace_sim(d, r, W1, SVD_BASIS_COLS, r, W2, SVD_BASIS_COLS, phi, test_err()));
    for (int i = 0; i < 25; i++)
        CHECK_NEAR(phi[i], 0.0, 1e-6);
    free(U);
    free(Ut);
    free(W);
    free(W1);
    free(W2);
}

/* For independent Haar-random bases every entry of U1ᵀU2 has mean square 1/d, so
 * E‖U1[:, :i]ᵀU2[:, :j]‖² = i·j/d and E φ(i, j) = i·j / (d·min(i, j)) = max(i, j)/d. */
TEST(svd_subspace_sim_of_random_bases_is_ij_over_d)
{
    int d = 256, r = 16, seeds = 32, sizes[SVD_GRID_MAX];
    int ns = svd_grid_sizes(r, sizes);
    double mean[25] = { 0 }, phi[25];
    struct lk_rng rng;
    lk_rng_seed(&rng, 61);
    for (int s = 0; s < seeds; s++) {
        float *U1 = rand_orth(&rng, d, r), *U2 = rand_orth(&rng, d, r);
        CHECK_OK(svd_subspace_sim(d, r, U1, SVD_BASIS_COLS, r, U2, SVD_BASIS_COLS, phi, test_err()));
        for (int t = 0; t < ns * ns; t++)
            mean[t] += phi[t] / seeds;
        free(U1);
        free(U2);
    }
    for (int a = 0; a < ns; a++)
        for (int b = 0; b < ns; b++) {
            double i = sizes[a], j = sizes[b], mn = fmin(i, j);
            double ij_over_d = mean[a * ns + b] * mn; // ‖·‖_F², the quantity i·j/d predicts
            double sd = sqrt(2 * i * j) / d / sqrt((double)seeds); // of the mean of ‖·‖_F²
            CHECK_MSG(fabs(ij_over_d - i * j / d) <= 4 * sd, "(%g, %g): ‖·‖² %g vs i·j/d %g", i, j,
                      ij_over_d, i * j / d);
            CHECK(mean[a * ns + b] < 0.15); // far from the 1 of shared directions
        }
}

TEST(svd_method_pick_by_shape_and_rank)
{
    struct svd_opts o;
    svd_opts_init(&o);
    CHECK_INT(o.oversample, 10);
    CHECK_INT(o.power_iters, 2);
    CHECK_INT(svd_method_pick(100, 5000, 5, &o), SVD_EXACT);      // short side < 128: cheap anyway
    CHECK_INT(svd_method_pick(4864, 896, 64, &o), SVD_RANDOMIZED); // 74 <= 896 / 4
    CHECK_INT(svd_method_pick(896, 4864, 64, NULL), SVD_RANDOMIZED);
    CHECK_INT(svd_method_pick(896, 896, 300, &o), SVD_EXACT);      // sketch 310 > 896 / 4
    o.method = SVD_EXACT;
    CHECK_INT(svd_method_pick(4864, 896, 64, &o), SVD_EXACT);      // forced wins
    o.method = SVD_RANDOMIZED;
    CHECK_INT(svd_method_pick(10, 10, 9, &o), SVD_RANDOMIZED);
}
