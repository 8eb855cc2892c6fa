/*
 * ops_lora.c - the rank-R products of a LoRA linear (ops.h: op_lora_*), forward and backward.
 *
 * With R = 8 (PEFT's default) each is a skinny GEMM: one side R wide, the other the whole
 * activation or weight. OpenBLAS runs those at 20 to 40 GFLOP/s here (it packs both operands of
 * a product that reads each value once or twice), against 145 for the frozen linears; on the
 * small bench config the six LoRA products of a layer took 13% of the time of its frozen GEMMs.
 *
 * Two of them have an R-wide output read along contiguous rows: xa = x A^T and dxa = s dout B.
 * For those, C[m, 0:R] = alpha * sum_k X[m, k] Y[k, 0:R] is register-tiled: a tile of 12 rows
 * by 8 columns is 12 accumulators, and each k loads one row of Y (8 floats: a row of A^T, or of
 * B as it is stored) and broadcasts 12 values of X, so the loads (2 a cycle) keep the FMAs busy.
 * Measured (one thread, 512 rows, R 8): x A^T 0.067 ms against OpenBLAS's 0.109 at 512 x 512,
 * 0.125 against 0.171 at 896 wide; dout B 0.155 against 0.254 at 1376, 0.535 against 0.896 at
 * 4864. The other four stay on cblas_sgemm, where the same kind of kernel measured slower: the
 * rank updates (out += s xa B^T, dx += dxa A) are one load-bound pass over the big operand either
 * way, and the reductions over the rows (dB = s dout^T xa, dA = dxa^T x) read their big operand
 * down its columns.
 *
 * AVX2 + FMA through __attribute__((target)) with a run-time check (op_simd_active), for R a
 * multiple of 8; any other rank, or op_simd 0, takes cblas_sgemm (the plain path).
 * op_lora_*_naive are the references for the tests (double sums). Every output value is summed
 * by one thread in a fixed order, so the rows may be split over op_team() threads without
 * changing a bit.
 */
#include "ops.h"

#include <cblas.h>
#include <omp.h>
#include <string.h>

#if defined(__x86_64__) && defined(__GNUC__)
#define OPL_X86 1
#include <immintrin.h>
#define OPL_AVX2 __attribute__((target("avx2,fma")))
#endif

/* Threads for n multiply-adds (as gemm_team in ops_mat.c: below ~256K, one). */
static int lora_team(double n)
{
    return n < 262144.0 ? 1 : op_team();
}

static int use_simd(int R)
{
    return R > 0 && R % 8 == 0 && op_simd_active();
}

/* dst[c, r] = src[r, c] for src [rows, cols]. */
static void transpose(float *dst, const float *src, int rows, int cols)
{
    for (int r = 0; r < rows; r++)
        for (int c = 0; c < cols; c++)
            dst[(size_t)c * rows + r] = src[(size_t)r * cols + c];
}

#ifdef OPL_X86
/* One 8-column block of rows [m, m + 12): C[m + j, 0:8] = alpha * sum_k X[m + j, k] Y[k, 0:8]
 * (X rows ldx apart, Y rows ldy, C rows ldc). */
#define NARROW_FMA(j) c##j = _mm256_fmadd_ps(_mm256_broadcast_ss(x + (size_t)(j) * ldx), y, c##j)
#define NARROW_PUT(j) _mm256_storeu_ps(C + (size_t)(j) * ldc, _mm256_mul_ps(a, c##j))
OPL_AVX2 static void narrow12(float *C, size_t ldc, const float *X, size_t ldx, const float *Y, size_t ldy, int K,
                              float alpha)
{
    __m256 c0 = _mm256_setzero_ps(), c1 = c0, c2 = c0, c3 = c0, c4 = c0, c5 = c0, c6 = c0, c7 = c0, c8 = c0,
           c9 = c0, c10 = c0, c11 = c0;
    for (int k = 0; k < K; k++) {
        __m256 y = _mm256_loadu_ps(Y + (size_t)k * ldy);
        const float *x = X + k;
        NARROW_FMA(0); NARROW_FMA(1); NARROW_FMA(2); NARROW_FMA(3); NARROW_FMA(4); NARROW_FMA(5);
        NARROW_FMA(6); NARROW_FMA(7); NARROW_FMA(8); NARROW_FMA(9); NARROW_FMA(10); NARROW_FMA(11);
    }
    __m256 a = _mm256_set1_ps(alpha);
    NARROW_PUT(0); NARROW_PUT(1); NARROW_PUT(2); NARROW_PUT(3); NARROW_PUT(4); NARROW_PUT(5);
    NARROW_PUT(6); NARROW_PUT(7); NARROW_PUT(8); NARROW_PUT(9); NARROW_PUT(10); NARROW_PUT(11);
}
#undef NARROW_FMA
#undef NARROW_PUT

/* The same for mr < 12 rows (the tail), one row at a time: the same sums in the same order. */
OPL_AVX2 static void narrow_rows(float *C, size_t ldc, const float *X, size_t ldx, const float *Y, size_t ldy,
                                 int K, float alpha, int mr)
{
    for (int j = 0; j < mr; j++) {
        __m256 c = _mm256_setzero_ps();
        for (int k = 0; k < K; k++)
            c = _mm256_fmadd_ps(_mm256_broadcast_ss(X + (size_t)j * ldx + k), _mm256_loadu_ps(Y + (size_t)k * ldy), c);
        _mm256_storeu_ps(C + (size_t)j * ldc, _mm256_mul_ps(_mm256_set1_ps(alpha), c));
    }
}

/* Rows [m0, m1) of C [M, R], every 8-column block of R. */
OPL_AVX2 static void narrow_avx2(float *C, const float *X, size_t ldx, const float *Y, int R, int K, int m0, int m1,
                                 float alpha)
{
    for (int rc = 0; rc < R; rc += 8) {
        int m = m0;
        for (; m + 12 <= m1; m += 12)
            narrow12(C + (size_t)m * R + rc, (size_t)R, X + (size_t)m * ldx, ldx, Y + rc, (size_t)R, K, alpha);
        if (m < m1)
            narrow_rows(C + (size_t)m * R + rc, (size_t)R, X + (size_t)m * ldx, ldx, Y + rc, (size_t)R, K, alpha,
                        m1 - m);
    }
}
#endif

/* C[M, R] = alpha * X[M, K] Y[K, R] (X rows ldx apart), the rows split over the threads in
 * contiguous blocks of 12. */
static void narrow(float *C, const float *X, size_t ldx, const float *Y, int R, int K, int M, float alpha)
{
#ifdef OPL_X86
    int nt = lora_team((double)M * K * R), tiles = (M + 11) / 12;
#pragma omp parallel for num_threads(nt) schedule(static) if (nt > 1)
    for (int t = 0; t < nt; t++) {
        int m0 = (int)((long)tiles * t / nt) * 12, m1 = (int)((long)tiles * (t + 1) / nt) * 12;
        if (m1 > M)
            m1 = M;
        if (m0 < m1)
            narrow_avx2(C, X, ldx, Y, R, K, m0, m1, alpha);
    }
#else
    (void)C, (void)X, (void)ldx, (void)Y, (void)R, (void)K, (void)M, (void)alpha;
    LK_ASSERT(!"no AVX2 kernels in this build");
#endif
}

size_t op_lora_scratch_floats(int R, int IC)
{
    return (size_t)R * (size_t)IC;
}

void op_lora_down(float *xa, const float *x, const float *A, int N, int IC, int R, float *scratch)
{
    if (!use_simd(R)) {
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, N, R, IC, 1.0f, x, IC, A, IC, 0.0f, xa, R);
        return;
    }
    transpose(scratch, A, R, IC); // A^T [IC, R]: row i holds the R values that multiply x[n, i]
    narrow(xa, x, (size_t)IC, scratch, R, IC, N, 1.0f);
}

void op_lora_up_acc(float *out, const float *xa, const float *B, float s, int N, int R, int OC)
{
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, N, OC, R, s, xa, R, B, R, 1.0f, out, OC);
}

void op_lora_dxa(float *dxa, const float *dout, const float *B, float s, int N, int OC, int R)
{
    if (!use_simd(R)) {
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, N, R, OC, s, dout, OC, B, R, 0.0f, dxa, R);
        return;
    }
    narrow(dxa, dout, (size_t)OC, B, R, OC, N, s);
}

void op_lora_dB_acc(float *dB, const float *dout, const float *xa, float s, int N, int OC, int R)
{
    cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, OC, R, N, s, dout, OC, xa, R, 1.0f, dB, R);
}

void op_lora_dA_acc(float *dA, const float *dxa, const float *x, int N, int IC, int R)
{
    cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, R, IC, N, 1.0f, dxa, R, x, IC, 1.0f, dA, IC);
}

void op_lora_dx_acc(float *dx, const float *dxa, const float *A, int N, int IC, int R)
{
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, N, IC, R, 1.0f, dxa, R, A, IC, 1.0f, dx, IC);
}

// ---- references (double sums) ----

void op_lora_down_naive(float *xa, const float *x, const float *A, int N, int IC, int R)
{
    for (int n = 0; n < N; n++)
        for (int r = 0; r < R; r++) {
            double s = 0;
            for (int i = 0; i < IC; i++)
                s += (double)x[(size_t)n * IC + i] * A[(size_t)r * IC + i];
            xa[(size_t)n * R + r] = (float)s;
        }
}

void op_lora_up_acc_naive(float *out, const float *xa, const float *B, float s, int N, int R, int OC)
{
    for (int n = 0; n < N; n++)
        for (int o = 0; o < OC; o++) {
            double a = 0;
            for (int r = 0; r < R; r++)
                a += (double)xa[(size_t)n * R + r] * B[(size_t)o * R + r];
            out[(size_t)n * OC + o] += (float)(s * a);
        }
}

void op_lora_dxa_naive(float *dxa, const float *dout, const float *B, float s, int N, int OC, int R)
{
    for (int n = 0; n < N; n++)
        for (int r = 0; r < R; r++) {
            double a = 0;
            for (int o = 0; o < OC; o++)
                a += (double)dout[(size_t)n * OC + o] * B[(size_t)o * R + r];
            dxa[(size_t)n * R + r] = (float)(s * a);
        }
}

void op_lora_dB_acc_naive(float *dB, const float *dout, const float *xa, float s, int N, int OC, int R)
{
    for (int o = 0; o < OC; o++)
        for (int r = 0; r < R; r++) {
            double a = 0;
            for (int n = 0; n < N; n++)
                a += (double)dout[(size_t)n * OC + o] * xa[(size_t)n * R + r];
            dB[(size_t)o * R + r] += (float)(s * a);
        }
}

void op_lora_dA_acc_naive(float *dA, const float *dxa, const float *x, int N, int IC, int R)
{
    for (int r = 0; r < R; r++)
        for (int i = 0; i < IC; i++) {
            double a = 0;
            for (int n = 0; n < N; n++)
                a += (double)dxa[(size_t)n * R + r] * x[(size_t)n * IC + i];
            dA[(size_t)r * IC + i] += (float)a;
        }
}

void op_lora_dx_acc_naive(float *dx, const float *dxa, const float *A, int N, int IC, int R)
{
    for (int n = 0; n < N; n++)
        for (int i = 0; i < IC; i++) {
            double a = 0;
            for (int r = 0; r < R; r++)
                a += (double)dxa[(size_t)n * R + r] * A[(size_t)r * IC + i];
            dx[(size_t)n * IC + i] += (float)a;
        }
}
