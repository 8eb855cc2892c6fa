/*
 * svd.c - exact and randomized truncated SVD, energy-based rank choice, the SVD of a
 * low-rank product from its factors, spectral metrics and subspace similarity.
 *
 * Layout trick used throughout: a row-major [rows, cols] array is the column-major
 * cols x rows matrix of its transpose. LAPACK is called in column-major order on that
 * transpose, which avoids the copies LAPACKE's row-major wrappers make. Owns nothing
 * between calls: every scratch buffer is allocated and freed inside one function.
 */
#include "svd.h"

#include <cblas.h>
#include <float.h>
#include <lapacke.h>
#include <math.h>
#include <string.h>

static int imin(int a, int b)
{
    return a < b ? a : b;
}

static int nomem(struct lk_err *err, const char *what, int rows, int cols)
{
    return lk_errf(err, LK_ERR_NOMEM, "svd: out of memory for %s (%d x %d floats)", what, rows,
                   cols);
}

/* Copies A [m, n] to dst, checking every value is finite (LAPACK loops or returns garbage on
 * NaN/Inf, so a bad input gets a message naming the first bad entry). */
static int copy_finite(int m, int n, const float *A, float *dst, struct lk_err *err)
{
    for (int i = 0; i < m; i++) {
        const float *a = A + (size_t)i * n;
        float *d = dst + (size_t)i * n;
        for (int j = 0; j < n; j++) {
            if (!isfinite(a[j]))
                return lk_errf(err, LK_ERR_NUMERIC, "svd: matrix has a non-finite value at [%d, %d]",
                               i, j);
            d[j] = a[j];
        }
    }
    return LK_OK;
}

static int check_finite(int m, int n, const float *A, struct lk_err *err)
{
    if (isfinite(svd_fro2(m, n, A)))
        return LK_OK;
    for (int i = 0; i < m; i++)
        for (int j = 0; j < n; j++)
            if (!isfinite(A[(size_t)i * n + j]))
                return lk_errf(err, LK_ERR_NUMERIC, "svd: matrix has a non-finite value at [%d, %d]",
                               i, j);
    // finite entries whose squares overflow a double cannot happen for float input
    return lk_errf(err, LK_ERR_NUMERIC, "svd: matrix norm overflows");
}

static int check_shape(int m, int n, int k, struct lk_err *err)
{
    if (m < 1 || n < 1)
        return lk_errf(err, LK_ERR_SHAPE, "svd: bad matrix shape %d x %d", m, n);
    if (k < 1 || k > imin(m, n))
        return lk_errf(err, LK_ERR_SHAPE, "svd: rank %d out of range [1, %d] for a %d x %d matrix",
                       k, imin(m, n), m, n);
    return LK_OK;
}

// ---- LAPACK helpers ----

/* Workspace size from a query, rounded up: the float query result can be rounded down for
 * large sizes (older LAPACK returns lwork as a float). */
static lapack_int lwork_of(float q)
{
    return (lapack_int)((double)q * 1.0001) + 64;
}

/* Economy SVD of a row-major X [m, n], destroyed. S [min(m, n)]; with vectors (U != NULL)
 * U [m, mn] and Vt [mn, n] row-major.
 * Column-major, the array is Xᵀ (n x m) = V S Uᵀ: LAPACK's "u" is V, an n x mn column-major
 * array = row-major Vt [mn, n]; its "vt" is Uᵀ, mn x m column-major = row-major U [m, mn]. */
static int gesdd_rm(int m, int n, float *X, float *S, float *U, float *Vt, struct lk_err *err)
{
    int mn = imin(m, n);
    char jobz = U ? 'S' : 'N';
    lapack_int ldu = U ? n : 1, ldvt = U ? mn : 1;
    lapack_int *iwork = lk_malloc((size_t)8 * mn * sizeof(lapack_int));
    if (!iwork)
        return nomem(err, "svd integer workspace", 8, mn);
    float q = 0;
    lapack_int info = LAPACKE_sgesdd_work(LAPACK_COL_MAJOR, jobz, n, m, X, n, S, Vt, ldu, U, ldvt,
                                          &q, -1, iwork);
    if (info != 0) {
        lk_free(iwork);
        return lk_errf(err, LK_ERR_NUMERIC, "svd: sgesdd workspace query failed (info %d)",
                       (int)info);
    }
    lapack_int lwork = lwork_of(q);
    float *work = lk_falloc((size_t)lwork, 1);
    if (!work) {
        lk_free(iwork);
        return nomem(err, "svd workspace", (int)lwork, 1);
    }
    info = LAPACKE_sgesdd_work(LAPACK_COL_MAJOR, jobz, n, m, X, n, S, Vt, ldu, U, ldvt, work, lwork,
                               iwork);
    lk_free(work);
    lk_free(iwork);
    if (info > 0)
        return lk_errf(err, LK_ERR_NUMERIC, "svd: sgesdd did not converge on a %d x %d matrix", m, n);
    if (info < 0)
        return lk_errf(err, LK_ERR_NUMERIC, "svd: sgesdd rejected argument %d", (int)-info);
    return LK_OK;
}

/* Largest workspace sgeqrf + sorgqr need for a column-major rows x cols matrix (rows >= cols). */
static lapack_int qr_lwork(int rows, int cols, float *X, float *tau)
{
    float q1 = 0, q2 = 0;
    LAPACKE_sgeqrf_work(LAPACK_COL_MAJOR, rows, cols, X, rows, tau, &q1, -1);
    LAPACKE_sorgqr_work(LAPACK_COL_MAJOR, rows, cols, cols, X, rows, tau, &q2, -1);
    return lwork_of(q1 > q2 ? q1 : q2);
}

/* Replaces the column-major rows x cols X (rows >= cols) by the Q of its QR factorisation:
 * orthonormal columns spanning the same space. If R is not NULL it receives the cols x cols
 * upper triangle, row-major, in double. */
static int qr_orth(int rows, int cols, float *X, float *tau, float *work, lapack_int lwork,
                   double *R, struct lk_err *err)
{
    lapack_int info = LAPACKE_sgeqrf_work(LAPACK_COL_MAJOR, rows, cols, X, rows, tau, work, lwork);
    if (info != 0)
        return lk_errf(err, LK_ERR_NUMERIC, "svd: sgeqrf failed (info %d)", (int)info);
    if (R) {
        for (int i = 0; i < cols; i++)
            for (int j = 0; j < cols; j++)
                R[(size_t)i * cols + j] = j >= i ? X[i + (size_t)j * rows] : 0.0;
    }
    info = LAPACKE_sorgqr_work(LAPACK_COL_MAJOR, rows, cols, cols, X, rows, tau, work, lwork);
    if (info != 0)
        return lk_errf(err, LK_ERR_NUMERIC, "svd: sorgqr failed (info %d)", (int)info);
    return LK_OK;
}

// ---- exact ----

/* Full economy SVD of A [m, n] into freshly allocated U [m, mn], S [mn], Vt [mn, n] (caller
 * frees all three with lk_free; on failure all are NULL). */
static int exact_full(int m, int n, const float *A, float **out_U, float **out_S, float **out_Vt,
                      struct lk_err *err)
{
    int mn = imin(m, n);
    *out_U = *out_S = *out_Vt = NULL;
    float *X = lk_falloc((size_t)m, (size_t)n);
    float *U = lk_falloc((size_t)m, (size_t)mn);
    float *S = lk_falloc((size_t)mn, 1);
    float *Vt = lk_falloc((size_t)mn, (size_t)n);
    int rc;
    if (!X || !U || !S || !Vt)
        rc = nomem(err, "exact svd", m, n);
    else
        rc = copy_finite(m, n, A, X, err);
    if (rc == LK_OK)
        rc = gesdd_rm(m, n, X, S, U, Vt, err);
    lk_free(X);
    if (rc != LK_OK) {
        lk_free(U);
        lk_free(S);
        lk_free(Vt);
        return rc;
    }
    *out_U = U;
    *out_S = S;
    *out_Vt = Vt;
    return LK_OK;
}

/* Copies the first k columns of U [m, ld] into dst [m, k]. dst may alias U (k <= ld): rows
 * only move towards the start, in increasing order. */
static void pack_cols(int m, int ld, int k, const float *U, float *dst)
{
    for (int i = 0; i < m; i++)
        memmove(dst + (size_t)i * k, U + (size_t)i * ld, (size_t)k * sizeof(float));
}

int svd_exact(int m, int n, const float *A, int k, float *out_U, float *out_S, float *out_Vt,
              struct lk_err *err)
{
    if (check_shape(m, n, k, err) != LK_OK)
        return err->code;
    float *U, *S, *Vt;
    int rc = exact_full(m, n, A, &U, &S, &Vt, err);
    if (rc != LK_OK)
        return rc;
    int mn = imin(m, n);
    pack_cols(m, mn, k, U, out_U);
    memcpy(out_S, S, (size_t)k * sizeof(float));
    memcpy(out_Vt, Vt, (size_t)k * n * sizeof(float)); // the first k rows are contiguous
    lk_free(U);
    lk_free(S);
    lk_free(Vt);
    return LK_OK;
}

int svd_values(int m, int n, const float *A, float *out_S, struct lk_err *err)
{
    if (check_shape(m, n, 1, err) != LK_OK)
        return err->code;
    float *X = lk_falloc((size_t)m, (size_t)n);
    if (!X)
        return nomem(err, "svd values", m, n);
    int rc = copy_finite(m, n, A, X, err);
    if (rc == LK_OK)
        rc = gesdd_rm(m, n, X, out_S, NULL, NULL, err);
    lk_free(X);
    return rc;
}

// ---- randomized ----

int svd_randomized(int m, int n, const float *A, int k, int p, int q, struct lk_rng *rng,
                   float *out_U, float *out_S, float *out_Vt, struct lk_err *err)
{
    if (check_shape(m, n, k, err) != LK_OK)
        return err->code;
    if (p < 0 || q < 0)
        return lk_errf(err, LK_ERR_USAGE, "svd: oversampling %d and power iterations %d must be >= 0",
                       p, q);
    if (check_finite(m, n, A, err) != LK_OK)
        return err->code;
    int mn = imin(m, n);
    int l = imin(k + p, mn); // sketch width
    int big = m > n ? m : n;

    // Yt [l, m] is Y = A·Ω column-major (m x l), Zt [l, n] is Z = Aᵀ·Q column-major (n x l),
    // both QR-factored in place. Bm [l, n] = QᵀA; its SVD gives Ub [l, l], Sb [l], Vb [l, n].
    float *Yt = lk_falloc((size_t)l, (size_t)m);
    float *Zt = lk_falloc((size_t)l, (size_t)n);
    float *Bm = lk_falloc((size_t)l, (size_t)n);
    float *Ub = lk_falloc((size_t)l, (size_t)l);
    float *Sb = lk_falloc((size_t)l, 1);
    float *Vb = lk_falloc((size_t)l, (size_t)n);
    float *tau = lk_falloc((size_t)l, 1);
    float *work = NULL;
    int rc = LK_OK;
    if (!Yt || !Zt || !Bm || !Ub || !Sb || !Vb || !tau) {
        rc = nomem(err, "randomized svd sketch", l, m + n);
        goto done;
    }
    lapack_int lwork = qr_lwork(big, l, Yt, tau);
    work = lk_falloc((size_t)lwork, 1);
    if (!work) {
        rc = nomem(err, "qr workspace", (int)lwork, 1);
        goto done;
    }

    // 1. Gaussian test matrix Ω [n, l], stored transposed as Zt [l, n]
    for (size_t i = 0; i < (size_t)l * n; i++)
        Zt[i] = lk_rng_normal(rng);
    // 2. Y = A·Ω, i.e. Yt = Ωᵀ·Aᵀ; orthonormalise
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, l, m, n, 1.0f, Zt, n, A, n, 0.0f, Yt, m);
    rc = qr_orth(m, l, Yt, tau, work, lwork, NULL, err);
    // 3. power iterations (Halko et al. Algorithm 4.4): re-orthonormalise after every product,
    //    otherwise the columns collapse onto the top singular vector in float32
    for (int it = 0; it < q && rc == LK_OK; it++) {
        // Z = Aᵀ·Q, i.e. Zt = Qᵀ·A
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, l, n, m, 1.0f, Yt, m, A, n, 0.0f,
                    Zt, n);
        rc = qr_orth(n, l, Zt, tau, work, lwork, NULL, err);
        if (rc != LK_OK)
            break;
        // Y = A·Z, i.e. Yt = Zᵀ·Aᵀ
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, l, m, n, 1.0f, Zt, n, A, n, 0.0f, Yt,
                    m);
        rc = qr_orth(m, l, Yt, tau, work, lwork, NULL, err);
    }
    if (rc != LK_OK)
        goto done;
    // 4. B = Qᵀ·A [l, n] and its exact SVD (Algorithm 5.1)
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, l, n, m, 1.0f, Yt, m, A, n, 0.0f, Bm, n);
    rc = gesdd_rm(l, n, Bm, Sb, Ub, Vb, err); // l <= n, so min(l, n) = l
    if (rc != LK_OK)
        goto done;
    // 5. U = Q·Ub[:, :k] [m, k]; Q is Ytᵀ
    cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, m, k, l, 1.0f, Yt, m, Ub, l, 0.0f, out_U,
                k);
    memcpy(out_S, Sb, (size_t)k * sizeof(float));
    memcpy(out_Vt, Vb, (size_t)k * n * sizeof(float));
done:
    lk_free(Yt);
    lk_free(Zt);
    lk_free(Bm);
    lk_free(Ub);
    lk_free(Sb);
    lk_free(Vb);
    lk_free(tau);
    lk_free(work);
    return rc;
}

// ---- automatic choice ----

void svd_opts_init(struct svd_opts *o)
{
    memset(o, 0, sizeof(*o));
    o->method = SVD_AUTO;
    o->oversample = SVD_OVERSAMPLE_DEFAULT;
    o->power_iters = SVD_POWER_ITERS_DEFAULT;
}

enum svd_method svd_method_pick(int m, int n, int k, const struct svd_opts *o)
{
    if (o && o->method != SVD_AUTO)
        return o->method;
    int p = o ? o->oversample : SVD_OVERSAMPLE_DEFAULT;
    int mn = imin(m, n);
    // The sketch costs about (2q + 2)·2·m·n·(k + p) flops in large, efficient GEMMs; gesdd
    // about 4·m·n·mn + 8·mn³ in a bidiagonalisation that is half matrix-vector work. A sketch
    // up to a quarter of the short side is reliably faster; small matrices are cheap anyway.
    if (mn < SVD_RANDOMIZED_MIN_DIM || (long)(k + p) * SVD_SKETCH_FRACTION > mn)
        return SVD_EXACT;
    return SVD_RANDOMIZED;
}

int svd_truncated(int m, int n, const float *A, int k, const struct svd_opts *o,
                  float *out_U, float *out_S, float *out_Vt, enum svd_method *out_method,
                  struct lk_err *err)
{
    struct svd_opts def;
    if (!o) {
        svd_opts_init(&def);
        o = &def;
    }
    enum svd_method method = svd_method_pick(m, n, k, o);
    if (out_method)
        *out_method = method;
    if (method == SVD_EXACT)
        return svd_exact(m, n, A, k, out_U, out_S, out_Vt, err);
    struct lk_rng rng;
    lk_rng_seed(&rng, o->seed);
    return svd_randomized(m, n, A, k, o->oversample, o->power_iters, &rng, out_U, out_S, out_Vt,
                          err);
}

// ---- energy ----

double svd_fro2(int m, int n, const float *A)
{
    double total = 0;
    for (size_t i = 0; i < (size_t)m * n; i++)
        total += (double)A[i] * A[i];
    return total;
}

int svd_energy_rank(const float *S, int k, double total, double E)
{
    if (total <= 0 || E <= SVD_ENERGY_SLACK)
        return 0;
    double need = (E - SVD_ENERGY_SLACK) * total, cum = 0;
    for (int i = 0; i < k; i++) {
        cum += (double)S[i] * S[i];
        if (cum >= need)
            return i + 1;
    }
    return -1;
}

double svd_energy_kept(const float *S, int r, double total)
{
    if (total <= 0)
        return 1.0;
    double cum = 0;
    for (int i = 0; i < r; i++)
        cum += (double)S[i] * S[i];
    return cum / total;
}

int svd_truncated_energy(int m, int n, const float *A, double E, int max_rank,
                         const struct svd_opts *o, float *out_U, float *out_S, float *out_Vt,
                         struct svd_energy_info *out_info, struct lk_err *err)
{
    struct svd_opts def;
    if (!o) {
        svd_opts_init(&def);
        o = &def;
    }
    memset(out_info, 0, sizeof(*out_info));
    if (check_shape(m, n, max_rank, err) != LK_OK)
        return err->code;
    if (!(E > 0 && E <= 1))
        return lk_errf(err, LK_ERR_USAGE, "svd: energy fraction %g is not in (0, 1]", E);
    int mn = imin(m, n);
    double total = svd_fro2(m, n, A);
    if (!isfinite(total))
        return check_finite(m, n, A, err);
    out_info->total = total;
    if (total <= 0) { // a zero matrix: nothing to keep
        out_info->kept = 1.0;
        out_info->reached = 1;
        out_info->method = SVD_EXACT;
        return LK_OK;
    }

    // Randomized attempts: k = 16, 32, ... up to max_rank, each writing straight into the
    // caller's buffers (sized for max_rank) and repacked to the rank found.
    struct lk_rng rng;
    lk_rng_seed(&rng, o->seed);
    int k = imin(16, max_rank);
    while (svd_method_pick(m, n, k, o) == SVD_RANDOMIZED && o->method != SVD_EXACT) {
        // an explicit SVD_RANDOMIZED still falls back once the sketch would cover the matrix
        if (o->method == SVD_RANDOMIZED && (long)(k + o->oversample) * 2 > mn)
            break;
        int rc = svd_randomized(m, n, A, k, o->oversample, o->power_iters, &rng, out_U, out_S,
                                out_Vt, err);
        if (rc != LK_OK)
            return rc;
        out_info->attempts++;
        out_info->sketch_rank = k;
        int r = svd_energy_rank(out_S, k, total, E);
        if (r >= 0 || k == max_rank) {
            out_info->reached = r >= 0;
            if (r < 0)
                r = max_rank;
            pack_cols(m, k, r, out_U, out_U);
            out_info->rank = r;
            out_info->kept = svd_energy_kept(out_S, r, total);
            out_info->method = SVD_RANDOMIZED;
            return LK_OK;
        }
        k = imin(2 * k, max_rank);
    }

    // Exact: all values at once, then the top r of them.
    float *U, *S, *Vt;
    int rc = exact_full(m, n, A, &U, &S, &Vt, err);
    if (rc != LK_OK)
        return rc;
    out_info->attempts++;
    int r = svd_energy_rank(S, mn, total, E);
    out_info->reached = r >= 0 && r <= max_rank;
    if (r < 0 || r > max_rank)
        r = max_rank;
    pack_cols(m, mn, r, U, out_U);
    memcpy(out_S, S, (size_t)r * sizeof(float));
    memcpy(out_Vt, Vt, (size_t)r * n * sizeof(float));
    out_info->rank = r;
    out_info->kept = svd_energy_kept(S, r, total);
    out_info->method = SVD_EXACT;
    lk_free(U);
    lk_free(S);
    lk_free(Vt);
    return LK_OK;
}

// ---- low-rank factor form ----

/* Row-major X [rows, cols] in float to a fresh double array (caller frees). */
static double *to_double(int rows, int cols, const float *X)
{
    size_t n;
    if (lk_mul3_size((size_t)rows, (size_t)cols, sizeof(double), &n) != 0)
        return NULL;
    double *d = lk_malloc(n);
    if (d)
        for (size_t i = 0; i < (size_t)rows * cols; i++)
            d[i] = X[i];
    return d;
}

int svd_factor(int m, int n, int r, float s, const float *B, const float *A, int k,
               float *out_U, float *out_S, float *out_Vt, struct lk_err *err)
{
    if (m < 1 || n < 1 || r < 1 || r > imin(m, n))
        return lk_errf(err, LK_ERR_SHAPE, "svd: factor rank %d out of range [1, %d] for %d x %d", r,
                       imin(m, n), m, n);
    if (k < 1 || k > r)
        return lk_errf(err, LK_ERR_SHAPE, "svd: rank %d out of range [1, %d]", k, r);
    if (check_finite(m, r, B, err) != LK_OK || check_finite(r, n, A, err) != LK_OK)
        return err->code;
    // Bc: B column-major m x r (ld m), i.e. row-major Bᵀ [r, m]. Ac: A [r, n] row-major is
    // already Aᵀ column-major n x r (ld n). Both are QR-factored in place: B = QB·RB,
    // Aᵀ = QA·RA, so s·B·A = QB·(s·RB·RAᵀ)·QAᵀ and only the r x r core needs an SVD.
    int big = m > n ? m : n;
    float *Bc = lk_falloc((size_t)r, (size_t)m);
    float *Ac = lk_falloc((size_t)r, (size_t)n);
    float *C = lk_falloc((size_t)r, (size_t)r);
    float *Uc = lk_falloc((size_t)r, (size_t)r);
    float *Sc = lk_falloc((size_t)r, 1);
    float *Vc = lk_falloc((size_t)r, (size_t)r);
    float *tau = lk_falloc((size_t)r, 1);
    double *RB = lk_malloc((size_t)r * r * sizeof(double));
    double *RA = lk_malloc((size_t)r * r * sizeof(double));
    float *work = NULL;
    int rc = LK_OK;
    if (!Bc || !Ac || !C || !Uc || !Sc || !Vc || !tau || !RB || !RA) {
        rc = nomem(err, "factor svd", r, m + n);
        goto done;
    }
    lapack_int lwork = qr_lwork(big, r, Bc, tau);
    work = lk_falloc((size_t)lwork, 1);
    if (!work) {
        rc = nomem(err, "qr workspace", (int)lwork, 1);
        goto done;
    }
    for (int i = 0; i < m; i++)
        for (int j = 0; j < r; j++)
            Bc[i + (size_t)j * m] = B[(size_t)i * r + j];
    memcpy(Ac, A, (size_t)r * n * sizeof(float));
    rc = qr_orth(m, r, Bc, tau, work, lwork, RB, err);
    if (rc == LK_OK)
        rc = qr_orth(n, r, Ac, tau, work, lwork, RA, err);
    if (rc != LK_OK)
        goto done;
    // core C = s·RB·RAᵀ in double (both upper triangular: the sum starts at max(i, j))
    for (int i = 0; i < r; i++)
        for (int j = 0; j < r; j++) {
            double c = 0;
            for (int t = i > j ? i : j; t < r; t++)
                c += RB[(size_t)i * r + t] * RA[(size_t)j * r + t];
            C[(size_t)i * r + j] = (float)(s * c);
        }
    rc = gesdd_rm(r, r, C, Sc, Uc, Vc, err);
    if (rc != LK_OK)
        goto done;
    // U = QB·Uc[:, :k] (QB is Bcᵀ), Vt = Vc[:k, :]·QAᵀ (QAᵀ is Ac row-major [r, n])
    cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, m, k, r, 1.0f, Bc, m, Uc, r, 0.0f, out_U,
                k);
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, k, n, r, 1.0f, Vc, r, Ac, n, 0.0f,
                out_Vt, n);
    memcpy(out_S, Sc, (size_t)k * sizeof(float));
done:
    lk_free(Bc);
    lk_free(Ac);
    lk_free(C);
    lk_free(Uc);
    lk_free(Sc);
    lk_free(Vc);
    lk_free(tau);
    lk_free(RB);
    lk_free(RA);
    lk_free(work);
    return rc;
}

int svd_factor_inner(int m, int n, int r1, float s1, const float *B1, const float *A1, int r2,
                     float s2, const float *B2, const float *A2, double *out_inner,
                     struct lk_err *err)
{
    if (m < 1 || n < 1 || r1 < 1 || r2 < 1)
        return lk_errf(err, LK_ERR_SHAPE, "svd: bad factor shapes %d x %d with ranks %d, %d", m, n,
                       r1, r2);
    // <B1A1, B2A2> = trace(A1ᵀB1ᵀB2A2) = trace((B1ᵀB2)(A2A1ᵀ)): two small Gram products
    double *b1 = to_double(m, r1, B1), *b2 = to_double(m, r2, B2);
    double *a1 = to_double(r1, n, A1), *a2 = to_double(r2, n, A2);
    double *G = lk_malloc((size_t)r1 * r2 * sizeof(double));
    double *H = lk_malloc((size_t)r1 * r2 * sizeof(double));
    int rc = LK_OK;
    if (!b1 || !b2 || !a1 || !a2 || !G || !H) {
        rc = nomem(err, "factor inner product", m + n, r1 + r2);
    } else {
        // G = B1ᵀB2 [r1, r2], H = A2A1ᵀ [r2, r1]
        cblas_dgemm(CblasRowMajor, CblasTrans, CblasNoTrans, r1, r2, m, 1.0, b1, r1, b2, r2, 0.0, G,
                    r2);
        cblas_dgemm(CblasRowMajor, CblasNoTrans, CblasTrans, r2, r1, n, 1.0, a2, n, a1, n, 0.0, H,
                    r1);
        double t = 0;
        for (int a = 0; a < r1; a++)
            for (int b = 0; b < r2; b++)
                t += G[(size_t)a * r2 + b] * H[(size_t)b * r1 + a];
        *out_inner = (double)s1 * s2 * t;
    }
    lk_free(b1);
    lk_free(b2);
    lk_free(a1);
    lk_free(a2);
    lk_free(G);
    lk_free(H);
    return rc;
}

int svd_factor_fro2(int m, int n, int r, float s, const float *B, const float *A,
                    double *out_fro2, struct lk_err *err)
{
    return svd_factor_inner(m, n, r, s, B, A, r, s, B, A, out_fro2, err);
}

int svd_factor_cosine(int m, int n, int r1, float s1, const float *B1, const float *A1, int r2,
                      float s2, const float *B2, const float *A2, double *out_cos,
                      struct lk_err *err)
{
    double xy, xx, yy;
    if (svd_factor_inner(m, n, r1, s1, B1, A1, r2, s2, B2, A2, &xy, err) != LK_OK ||
        svd_factor_fro2(m, n, r1, s1, B1, A1, &xx, err) != LK_OK ||
        svd_factor_fro2(m, n, r2, s2, B2, A2, &yy, err) != LK_OK)
        return err->code;
    if (!(xx > 0 && yy > 0)) {
        *out_cos = 0;
        return LK_OK;
    }
    double c = xy / (sqrt(xx) * sqrt(yy));
    *out_cos = c > 1 ? 1 : c < -1 ? -1 : c; // rounding can step just outside [-1, 1]
    return LK_OK;
}

// ---- spectral metrics ----

void svd_metrics_compute(const float *S, int k, double total, struct svd_metrics *out)
{
    memset(out, 0, sizeof(*out));
    double sum = 0, sum2 = 0;
    for (int i = 0; i < k; i++) {
        sum += S[i];
        sum2 += (double)S[i] * S[i];
    }
    if (total < 0)
        total = sum2;
    out->fro = sqrt(total);
    out->spectral = k > 0 ? S[0] : 0;
    if (out->spectral > 0)
        out->stable_rank = total / (out->spectral * out->spectral);
    if (sum > 0) {
        double h = 0;
        for (int i = 0; i < k; i++) {
            double p = S[i] / sum;
            if (p > 0)
                h -= p * log(p);
        }
        out->effective_rank = exp(h);
    }
}

double svd_trunc_error(const float *S, int r, double total)
{
    if (total <= 0)
        return 0;
    double kept = 0;
    for (int i = 0; i < r; i++)
        kept += (double)S[i] * S[i];
    double rest = total - kept;
    return rest > 0 ? sqrt(rest / total) : 0;
}

int svd_numerical_rank(const float *S, int k, int m, int n)
{
    if (k < 1 || !(S[0] > 0))
        return 0;
    double tol = (double)S[0] * (m > n ? m : n) * FLT_EPSILON;
    int r = 0;
    while (r < k && S[r] > tol)
        r++;
    return r;
}

// ---- subspace similarity ----

int svd_grid_sizes(int r, int *out_sizes)
{
    int n = 0;
    for (long s = 1; s <= r && n < SVD_GRID_MAX; s *= 2)
        out_sizes[n++] = (int)s;
    if (n > 0 && out_sizes[n - 1] != r && n < SVD_GRID_MAX)
        out_sizes[n++] = r;
    return n;
}

int svd_subspace_sim(int d, int r1, const float *U1, enum svd_basis layout1, int r2,
                     const float *U2, enum svd_basis layout2, double *out_phi,
                     struct lk_err *err)
{
    if (d < 1 || r1 < 1 || r2 < 1 || r1 > d || r2 > d)
        return lk_errf(err, LK_ERR_SHAPE, "svd: bases of %d and %d vectors in dimension %d", r1, r2,
                       d);
    // M = U1ᵀ·U2 [r1, r2], in double (to_double keeps the stored layout)
    double *u1 = to_double(layout1 == SVD_BASIS_COLS ? d : r1, layout1 == SVD_BASIS_COLS ? r1 : d, U1);
    double *u2 = to_double(layout2 == SVD_BASIS_COLS ? d : r2, layout2 == SVD_BASIS_COLS ? r2 : d, U2);
    double *M = lk_malloc((size_t)r1 * r2 * sizeof(double));
    int rc = LK_OK;
    if (!u1 || !u2 || !M) {
        rc = nomem(err, "subspace similarity", d, r1 + r2);
        goto done;
    }
    if (layout1 == SVD_BASIS_COLS && layout2 == SVD_BASIS_COLS)
        cblas_dgemm(CblasRowMajor, CblasTrans, CblasNoTrans, r1, r2, d, 1.0, u1, r1, u2, r2, 0.0, M, r2);
    else if (layout1 == SVD_BASIS_COLS)
        cblas_dgemm(CblasRowMajor, CblasTrans, CblasTrans, r1, r2, d, 1.0, u1, r1, u2, d, 0.0, M, r2);
    else if (layout2 == SVD_BASIS_COLS)
        cblas_dgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, r1, r2, d, 1.0, u1, d, u2, r2, 0.0, M,
                    r2);
    else
        cblas_dgemm(CblasRowMajor, CblasNoTrans, CblasTrans, r1, r2, d, 1.0, u1, d, u2, d, 0.0, M, r2);
    // 2-D prefix sums of M² in place: M[a][b] = Σ_{a' <= a, b' <= b} M[a'][b']²
    for (int a = 0; a < r1; a++)
        for (int b = 0; b < r2; b++) {
            double v = M[(size_t)a * r2 + b];
            v *= v;
            if (a > 0)
                v += M[(size_t)(a - 1) * r2 + b];
            if (b > 0)
                v += M[(size_t)a * r2 + b - 1];
            if (a > 0 && b > 0)
                v -= M[(size_t)(a - 1) * r2 + b - 1];
            M[(size_t)a * r2 + b] = v;
        }
    int s1[SVD_GRID_MAX], s2[SVD_GRID_MAX];
    int n1 = svd_grid_sizes(r1, s1), n2 = svd_grid_sizes(r2, s2);
    for (int a = 0; a < n1; a++)
        for (int b = 0; b < n2; b++) {
            int i = s1[a], j = s2[b];
            out_phi[(size_t)a * n2 + b] = M[(size_t)(i - 1) * r2 + (j - 1)] / (i < j ? i : j);
        }
done:
    lk_free(u1);
    lk_free(u2);
    lk_free(M);
    return rc;
}
