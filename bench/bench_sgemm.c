/*
 * bench_sgemm.c - the machine's measured single-precision GEMM peak through OpenBLAS, with the
 * thread count of OPENBLAS_NUM_THREADS: the denominator for "fraction of peak" in bench-train.
 * Prints one number, GFLOP/s (best of 5, 1536 x 1536 x 1536).
 */
#include <cblas.h>
#include <stdio.h>
#include <stdlib.h>

#include "../libcore/lk.h"

int main(void)
{
    int n = 1536;
    float *a = malloc(sizeof(float) * n * n), *b = malloc(sizeof(float) * n * n), *c = malloc(sizeof(float) * n * n);
    if (!a || !b || !c)
        return 1;
    for (int i = 0; i < n * n; i++) {
        a[i] = (float)(i % 7) * 0.1f;
        b[i] = (float)(i % 5) * 0.1f;
    }
    double best = 1e9;
    for (int r = 0; r < 5; r++) {
        double t = lk_now();
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, n, n, n, 1.0f, a, n, b, n, 0.0f, c, n);
        t = lk_now() - t;
        if (t < best)
            best = t;
    }
    printf("%.1f\n", 2.0 * n * n * n / best / 1e9);
    free(a);
    free(b);
    free(c);
    return 0;
}
