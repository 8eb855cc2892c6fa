/*
 * test_ops.c - the weight-matrix kernels of ops_mat.c against plain references: widening (AVX2
 * vs plain C vs tensor.h's scalar conversions, every bit pattern), the fused GEMV, the tiled
 * forward and input gradient (float32, bf16, f16; awkward shapes; scratch so small that every
 * tile path runs; one and two threads), each against a double-precision loop.
 */
#include "test.h"

#include <math.h>
#include <omp.h>
#include <stdlib.h>
#include <string.h>

#include "../libcore/lk.h"
#include "../libcore/ops.h"
#include "../libcore/tensor.h"

static const int dtypes[] = { TENSOR_F32, TENSOR_BF16, TENSOR_F16 };

/* A random [rows, cols] matrix in dtype (values rounded to it); owned storage in *store. */
static struct op_mat rand_mat(int dtype, size_t n, struct lk_rng *rng, void **store)
{
    struct op_mat w = { .dtype = dtype };
    if (dtype == TENSOR_F32) {
        w.f = malloc(sizeof(float) * (n ? n : 1));
        for (size_t i = 0; i < n; i++)
            w.f[i] = lk_rng_normal(rng);
        *store = w.f;
    } else {
        w.h = malloc(sizeof(uint16_t) * (n ? n : 1));
        for (size_t i = 0; i < n; i++) {
            float v = lk_rng_normal(rng);
            w.h[i] = dtype == TENSOR_BF16 ? tensor_f32_to_bf16(v) : tensor_f32_to_f16(v);
        }
        *store = w.h;
    }
    return w;
}

static float *rand_vec(size_t n, struct lk_rng *rng)
{
    float *v = malloc(sizeof(float) * (n ? n : 1));
    for (size_t i = 0; i < n; i++)
        v[i] = lk_rng_normal(rng);
    return v;
}

/* max |a - b| / max(1, max |b|) */
static double max_err(const float *a, const float *b, size_t n)
{
    double mx = 0, ref = 1;
    for (size_t i = 0; i < n; i++) {
        mx = fmax(mx, fabs((double)a[i] - b[i]));
        ref = fmax(ref, fabs((double)b[i]));
    }
    return mx / ref;
}

TEST(ops_widen_simd_and_plain_match_scalar_conversion_on_every_bit_pattern)
{
    enum { N = 65536 + 13 }; // odd length: the vector loop's tail runs too
    uint16_t *h = malloc(sizeof(uint16_t) * N);
    float *a = malloc(sizeof(float) * N), *b = malloc(sizeof(float) * N);
    for (int i = 0; i < N; i++)
        h[i] = (uint16_t)(i * 7 + 3); // every pattern (7 is odd), shifted
    for (size_t d = 1; d < 3; d++) {
        struct op_mat w = { .dtype = dtypes[d], .h = h };
        for (int simd = 0; simd < 2; simd++) {
            op_simd = simd;
            op_mat_widen(a, &w, N, 0, 1, 0, N);
            for (int i = 0; i < N; i++) {
                b[i] = dtypes[d] == TENSOR_BF16 ? tensor_bf16_to_f32(h[i]) : tensor_f16_to_f32(h[i]);
                int same = memcmp(&a[i], &b[i], sizeof(float)) == 0 || (isnan(a[i]) && isnan(b[i]));
                CHECK_MSG(same, "%s widening of 0x%04x (simd %d): %a vs %a", tensor_dtype_name(dtypes[d]),
                          h[i], simd, a[i], b[i]);
            }
        }
        // a block out of the middle of a matrix
        op_simd = 1;
        op_mat_widen(a, &w, 301, 3, 9, 17, 290);
        for (int r = 3; r < 9; r++)
            for (int c = 17; c < 290; c++) {
                uint16_t x = h[r * 301 + c];
                float v = dtypes[d] == TENSOR_BF16 ? tensor_bf16_to_f32(x) : tensor_f16_to_f32(x);
                CHECK(memcmp(&a[(r - 3) * 273 + (c - 17)], &v, sizeof v) == 0 || isnan(v));
            }
    }
    op_simd = 1;
    free(h), free(a), free(b);
}

TEST(ops_gemv_simd_and_plain_match_naive_on_awkward_shapes)
{
    // rows not a multiple of 4, columns not a multiple of 8, and a size past the threading threshold
    int shapes[][2] = { { 1, 1 }, { 1, 9 }, { 3, 7 }, { 5, 8 }, { 7, 17 }, { 6, 25 }, { 9, 33 }, { 4, 64 },
                        { 515, 131 } };
    struct lk_rng rng;
    lk_rng_seed(&rng, 5);
    for (size_t s = 0; s < sizeof shapes / sizeof shapes[0]; s++)
        for (size_t d = 0; d < 3; d++) {
            int OC = shapes[s][0], IC = shapes[s][1];
            void *store;
            struct op_mat w = rand_mat(dtypes[d], (size_t)OC * IC, &rng, &store);
            float *x = rand_vec((size_t)IC, &rng), *bias = rand_vec((size_t)OC, &rng);
            float *ref = malloc(sizeof(float) * OC), *got = malloc(sizeof(float) * OC);
            for (int with_bias = 0; with_bias < 2; with_bias++) {
                op_mat_forward_naive(ref, x, &w, with_bias ? bias : NULL, 1, IC, OC);
                for (int simd = 0; simd < 2; simd++)
                    for (int nt = 1; nt <= 2; nt++) {
                        op_simd = simd;
                        omp_set_num_threads(nt);
                        op_mat_gemv(got, &w, x, with_bias ? bias : NULL, OC, IC);
                        double e = max_err(got, ref, (size_t)OC);
                        CHECK_MSG(e < 1e-5, "gemv %s %dx%d simd %d threads %d bias %d: error %g",
                                  tensor_dtype_name(dtypes[d]), OC, IC, simd, nt, with_bias, e);
                    }
            }
            op_simd = 1;
            free(store), free(x), free(bias), free(ref), free(got);
        }
}

/* Forward and input gradient of one shape in one dtype, with scratch of scratch_n floats, on one
 * and two threads, against the double loops; each run twice must give the same bits. */
static void check_mat_kernels(int dtype, int N, int IC, int OC, size_t scratch_n, struct lk_rng *rng)
{
    void *store;
    struct op_mat w = rand_mat(dtype, (size_t)OC * IC, rng, &store);
    float *inp = rand_vec((size_t)N * IC, rng), *bias = rand_vec((size_t)OC, rng);
    float *dout = rand_vec((size_t)N * OC, rng), *dinp0 = rand_vec((size_t)N * IC, rng);
    float *ref = malloc(sizeof(float) * N * OC), *got = malloc(sizeof(float) * N * OC);
    float *again = malloc(sizeof(float) * N * OC);
    float *dref = malloc(sizeof(float) * N * IC), *dgot = malloc(sizeof(float) * N * IC);
    float *dagain = malloc(sizeof(float) * N * IC);
    float *scratch = malloc(sizeof(float) * scratch_n);
    op_mat_forward_naive(ref, inp, &w, bias, N, IC, OC);
    memcpy(dref, dinp0, sizeof(float) * N * IC);
    op_mat_backward_naive(dref, dout, &w, N, IC, OC);
    for (int nt = 1; nt <= 2; nt++) {
        omp_set_num_threads(nt);
        op_mat_forward(got, inp, &w, bias, N, IC, OC, scratch, scratch_n);
        op_mat_forward(again, inp, &w, bias, N, IC, OC, scratch, scratch_n);
        double e = max_err(got, ref, (size_t)N * OC);
        CHECK_MSG(e < 1e-5, "forward %s N %d IC %d OC %d scratch %zu threads %d: error %g",
                  tensor_dtype_name(dtype), N, IC, OC, scratch_n, nt, e);
        CHECK_MSG(!memcmp(got, again, sizeof(float) * N * OC), "forward is not deterministic");
        memcpy(dgot, dinp0, sizeof(float) * N * IC);
        memcpy(dagain, dinp0, sizeof(float) * N * IC);
        op_mat_backward(dgot, dout, &w, N, IC, OC, 1.0f, scratch, scratch_n);
        op_mat_backward(dagain, dout, &w, N, IC, OC, 1.0f, scratch, scratch_n);
        e = max_err(dgot, dref, (size_t)N * IC);
        CHECK_MSG(e < 1e-5, "backward %s N %d IC %d OC %d scratch %zu threads %d: error %g",
                  tensor_dtype_name(dtype), N, IC, OC, scratch_n, nt, e);
        CHECK_MSG(!memcmp(dgot, dagain, sizeof(float) * N * IC), "backward is not deterministic");
        // beta 0 writes: whatever dinp held (NaN here) is gone, the product alone remains
        for (size_t i = 0; i < (size_t)N * IC; i++)
            dagain[i] = NAN;
        op_mat_backward(dagain, dout, &w, N, IC, OC, 0.0f, scratch, scratch_n);
        for (size_t i = 0; i < (size_t)N * IC; i++)
            dagain[i] += dinp0[i];
        e = max_err(dagain, dref, (size_t)N * IC);
        CHECK_MSG(e < 1e-5, "backward (beta 0) %s N %d IC %d OC %d scratch %zu threads %d: error %g",
                  tensor_dtype_name(dtype), N, IC, OC, scratch_n, nt, e);
    }
    free(store), free(inp), free(bias), free(dout), free(dinp0), free(ref), free(got), free(again);
    free(dref), free(dgot), free(dagain), free(scratch);
}

TEST(ops_mat_forward_backward_match_naive_in_every_tiling)
{
    int shapes[][3] = { { 1, 1, 1 }, { 1, 7, 3 }, { 5, 1, 9 }, { 13, 17, 1 }, { 33, 65, 31 }, { 3, 24, 300 },
                        { 2, 5, 77 } };
    struct lk_rng rng;
    lk_rng_seed(&rng, 9);
    int saved = omp_get_max_threads();
    for (size_t s = 0; s < sizeof shapes / sizeof shapes[0]; s++)
        for (size_t d = 0; d < 3; d++) {
            int N = shapes[s][0], IC = shapes[s][1], OC = shapes[s][2];
            size_t big = (size_t)(IC > OC ? IC : OC);
            // the smallest scratch (one row or column per tile; OC >> IC takes the row tiles of
            // the input gradient), a few tiles, and the default (one tile per thread)
            size_t sizes[3] = { big, 3 * big + 1, op_mat_scratch_floats(IC, OC, 2) };
            for (int k = 0; k < 3; k++) {
                check_mat_kernels(dtypes[d], N, IC, OC, sizes[k], &rng);
                if (test_failed())
                    break;
            }
            if (test_failed())
                break;
        }
    omp_set_num_threads(saved);
}

TEST(ops_gemv_many_equals_one_gemv_per_matrix)
{
    // three products of one x, sizes around the threads' split, mixed dtypes and biases
    struct lk_rng rng;
    lk_rng_seed(&rng, 13);
    int IC = 37, OC[3] = { 5, 1030, 7 };
    void *store[3];
    struct op_mat w[3];
    float *out[3], *ref[3], *bias[3];
    for (int k = 0; k < 3; k++) {
        w[k] = rand_mat(dtypes[k], (size_t)OC[k] * IC, &rng, &store[k]);
        out[k] = malloc(sizeof(float) * OC[k]);
        ref[k] = malloc(sizeof(float) * OC[k]);
        bias[k] = k == 1 ? NULL : rand_vec((size_t)OC[k], &rng);
    }
    float *x = rand_vec((size_t)IC, &rng);
    const struct op_mat *wp[3] = { &w[0], &w[1], &w[2] };
    const float *bp[3] = { bias[0], bias[1], bias[2] };
    for (int nt = 1; nt <= 3; nt++) {
        omp_set_num_threads(nt);
        op_mat_gemv_many(3, out, wp, bp, OC, x, IC);
        for (int k = 0; k < 3; k++) {
            op_mat_gemv(ref[k], &w[k], x, bias[k], OC[k], IC);
            CHECK_MSG(!memcmp(out[k], ref[k], sizeof(float) * OC[k]), "product %d, %d threads", k, nt);
        }
    }
    for (int k = 0; k < 3; k++)
        free(store[k]), free(out[k]), free(ref[k]), free(bias[k]);
    free(x);
}

TEST(ops_gemv_batch_equals_gemv_many_per_input)
{
    // nb inputs at once must give each input's one-input sums bit for bit: two products (q, k
    // style) of awkward sizes (rows not a multiple of 4, columns not a multiple of 16 or 8), one
    // past the threading threshold; every dtype, AVX2 and plain, one and two threads; and with
    // the widening buffer's allocation failing (each input widens again)
    int shapes[][3] = { { 7, 5, 37 }, { 130, 9, 40 }, { 516, 3, 131 }, { 64, 6, 16 } };
    struct lk_rng rng;
    lk_rng_seed(&rng, 17);
    int saved = omp_get_max_threads();
    for (size_t s = 0; s < sizeof shapes / sizeof shapes[0] && !test_failed(); s++)
        for (size_t d = 0; d < 3 && !test_failed(); d++) {
            int OC[2] = { shapes[s][0], shapes[s][1] }, IC = shapes[s][2], nbmax = 5;
            void *store[2];
            struct op_mat w[2] = { rand_mat(dtypes[d], (size_t)OC[0] * IC, &rng, &store[0]),
                                   rand_mat(dtypes[d], (size_t)OC[1] * IC, &rng, &store[1]) };
            const struct op_mat *wp[2] = { &w[0], &w[1] };
            float *bias = rand_vec((size_t)OC[0], &rng), *x = rand_vec((size_t)nbmax * IC, &rng);
            const float *bp[2] = { bias, NULL };
            float *got[2], *one[2], *ref = malloc(sizeof(float) * OC[0]);
            for (int k = 0; k < 2; k++) {
                got[k] = malloc(sizeof(float) * nbmax * OC[k]);
                one[k] = malloc(sizeof(float) * OC[k]);
            }
            for (int simd = 0; simd < 2; simd++)
                for (int nt = 1; nt <= 2; nt++)
                    for (int fail = 0; fail < 2; fail++) {
                        op_simd = simd;
                        omp_set_num_threads(nt);
                        lk_fail_countdown = fail; // 1: the first allocation (the widening buffer) fails
                        op_mat_gemv_batch(2, got, wp, bp, OC, x, IC, nbmax);
                        lk_fail_countdown = 0;
                        for (int b = 0; b < nbmax; b++) {
                            float *o1[2] = { one[0], one[1] };
                            op_mat_gemv_many(2, o1, wp, bp, OC, x + (size_t)b * IC, IC);
                            for (int k = 0; k < 2; k++)
                                CHECK_MSG(!memcmp(got[k] + (size_t)b * OC[k], one[k], sizeof(float) * OC[k]),
                                          "%s %dx%d product %d input %d simd %d threads %d fail %d: not the one-input sums",
                                          tensor_dtype_name(dtypes[d]), OC[k], IC, k, b, simd, nt, fail);
                            op_mat_forward_naive(ref, x + (size_t)b * IC, &w[0], bias, 1, IC, OC[0]);
                            CHECK(max_err(got[0] + (size_t)b * OC[0], ref, (size_t)OC[0]) < 1e-5);
                        }
                    }
            op_simd = 1;
            for (int k = 0; k < 2; k++)
                free(store[k]), free(got[k]), free(one[k]);
            free(bias), free(x), free(ref);
        }
    omp_set_num_threads(saved);
}

TEST(ops_sum_exp_and_max_match_plain_double)
{
    // logit-like rows (spread over tens of units, as a language model's are), lengths around the
    // vector widths, against exp() summed in long double (either order of summing 151,936 doubles
    // drifts by up to about 1e-13 from it); AVX2 and plain
    struct lk_rng rng;
    lk_rng_seed(&rng, 19);
    size_t lens[] = { 0, 1, 3, 7, 8, 9, 17, 1000, 151936 };
    for (size_t k = 0; k < sizeof lens / sizeof lens[0]; k++) {
        size_t n = lens[k];
        float *v = rand_vec(n, &rng);
        for (size_t i = 0; i < n; i++)
            v[i] *= 8.0f;
        if (n > 5)
            v[n / 2] = 40.0f, v[3] = -300.0f; // a clear maximum and a term near underflow
        float mx = -INFINITY;
        long double acc = 0;
        for (size_t i = 0; i < n; i++)
            mx = v[i] > mx ? v[i] : mx;
        for (size_t i = 0; i < n; i++)
            acc += exp((double)v[i] - mx);
        double ref = (double)acc;
        for (int simd = 0; simd < 2; simd++) {
            op_simd = simd;
            CHECK(op_max(v, n) == mx);
            double got = op_sum_exp(v, n, mx);
            CHECK_MSG(fabs(got - ref) <= 3e-13 * ref || (n == 0 && got == 0), "n %zu simd %d: %.17g vs %.17g", n,
                      simd, got, ref);
        }
        op_simd = 1;
        free(v);
    }
    // each exponential on its own, across the range (one term per call)
    for (double x = -700; x <= 0; x += 0.37) {
        float f = (float)x;
        double e = op_sum_exp(&f, 1, 0.0); // the plain tail: n < 8
        float f8[8] = { f, f, f, f, f, f, f, f };
        double e8 = op_sum_exp(f8, 8, 0.0) / 8;
        CHECK_MSG(e == exp((double)f) && fabs(e8 - e) <= 4e-16 * e, "e^%g: %.17g vs %.17g", (double)f, e8, e);
    }
}

/* Causal grouped-query attention in double, and its backward, as plain loops over (b, h, t, t2). */
static void attention_naive(double *out, double *dq, double *dk, double *dv, const float *q, const float *k,
                            const float *v, const float *dout, const int *seg, int B, int T, int NH, int NKV, int HS)
{
    int group = NH / NKV, Q = NH * HS, KV = NKV * HS;
    double scale = 1.0 / sqrt((double)HS), *p = malloc(sizeof(double) * T), *dp = malloc(sizeof(double) * T);
    for (int b = 0; b < B; b++)
        for (int h = 0; h < NH; h++)
            for (int t = 0; t < T; t++) {
                const float *qt = q + ((size_t)b * T + t) * Q + h * HS;
                double mx = -INFINITY, sum = 0, dot = 0;
                for (int t2 = 0; t2 <= t; t2++) {
                    const float *kt = k + ((size_t)b * T + t2) * KV + h / group * HS;
                    double s = 0;
                    for (int i = 0; i < HS; i++)
                        s += (double)qt[i] * kt[i];
                    p[t2] = seg && seg[b * T + t2] != seg[b * T + t] ? -INFINITY : s * scale;
                    mx = fmax(mx, p[t2]);
                }
                for (int t2 = 0; t2 <= t; t2++)
                    sum += p[t2] = exp(p[t2] - mx);
                for (int i = 0; i < HS; i++) {
                    double o = 0;
                    for (int t2 = 0; t2 <= t; t2++)
                        o += p[t2] / sum * v[((size_t)b * T + t2) * KV + h / group * HS + i];
                    out[((size_t)b * T + t) * Q + h * HS + i] = o;
                }
                // backward of the row: dP = dout v^T, dS = P (dP - P.dP) scale, dq += dS k, dk += dS q
                const float *dt = dout + ((size_t)b * T + t) * Q + h * HS;
                for (int t2 = 0; t2 <= t; t2++) {
                    p[t2] /= sum;
                    double s = 0;
                    for (int i = 0; i < HS; i++)
                        s += (double)dt[i] * v[((size_t)b * T + t2) * KV + h / group * HS + i];
                    dp[t2] = s;
                    dot += p[t2] * s;
                }
                for (int t2 = 0; t2 <= t; t2++) {
                    double ds = p[t2] * (dp[t2] - dot) * scale;
                    size_t kr = ((size_t)b * T + t2) * KV + h / group * HS;
                    for (int i = 0; i < HS; i++) {
                        dq[((size_t)b * T + t) * Q + h * HS + i] += ds * k[kr + i];
                        dk[kr + i] += ds * qt[i];
                        dv[kr + i] += p[t2] * dt[i];
                    }
                }
            }
    free(p);
    free(dp);
}

TEST(ops_attention_blocks_match_naive_loops)
{
    // T = 150: blocks of 64, 64 and a ragged 22; two packed segments in the second row
    int B = 2, T = 150, NH = 4, NKV = 2, HS = 6, Q = NH * HS, KV = NKV * HS, N = B * T;
    struct lk_rng rng;
    lk_rng_seed(&rng, 17);
    float *q = rand_vec((size_t)N * Q, &rng), *k = rand_vec((size_t)N * KV, &rng), *v = rand_vec((size_t)N * KV, &rng);
    float *dout = rand_vec((size_t)N * Q, &rng), *out = malloc(sizeof(float) * N * Q);
    float *att = malloc(sizeof(float) * B * NH * T * T), *scratch = malloc(sizeof(float) * 2 * T * T);
    float *dq = calloc((size_t)N * Q, sizeof(float)), *dk = calloc((size_t)N * KV, sizeof(float));
    float *dv = calloc((size_t)N * KV, sizeof(float));
    double *ro = calloc((size_t)N * Q, sizeof(double)), *rq = calloc((size_t)N * Q, sizeof(double));
    double *rk = calloc((size_t)N * KV, sizeof(double)), *rv = calloc((size_t)N * KV, sizeof(double));
    int *seg = malloc(sizeof(int) * N);
    for (int i = 0; i < N; i++)
        seg[i] = i >= T && i % T >= 97;
    attention_naive(ro, rq, rk, rv, q, k, v, dout, seg, B, T, NH, NKV, HS);
    op_attention_forward(out, att, q, k, v, seg, B, T, NH, NKV, HS);
    op_attention_backward(dq, dk, dv, dout, att, q, k, v, B, T, NH, NKV, HS, scratch, 2);
    double e[4] = { 0 };
    for (int i = 0; i < N * Q; i++) {
        e[0] = fmax(e[0], fabs(out[i] - ro[i]));
        e[1] = fmax(e[1], fabs(dq[i] - rq[i]));
    }
    for (int i = 0; i < N * KV; i++) {
        e[2] = fmax(e[2], fabs(dk[i] - rk[i]));
        e[3] = fmax(e[3], fabs(dv[i] - rv[i]));
    }
    CHECK_MSG(e[0] < 1e-5 && e[1] < 1e-5 && e[2] < 1e-5 && e[3] < 1e-5, "out %g dq %g dk %g dv %g", e[0], e[1],
              e[2], e[3]);
    free(q), free(k), free(v), free(dout), free(out), free(att), free(scratch), free(dq), free(dk), free(dv);
    free(ro), free(rq), free(rk), free(rv), free(seg);
}

/* Distance in units in the last place between two finite floats of the same sign. */
static long ulps(float a, float b)
{
    int32_t ia, ib;
    memcpy(&ia, &a, 4);
    memcpy(&ib, &b, 4);
    return labs((long)ia - (long)ib);
}

TEST(ops_simd_exp_and_swiglu_match_the_plain_loops)
{
    if (!op_simd_active())
        SKIP("no AVX2 on this CPU: only the plain loops run");
    // exp over [-87, 88] in small steps and the edges: within 2 ulp of expf; NaN stays NaN
    enum { N = 200003 };
    float *x = malloc(sizeof(float) * N), *e = malloc(sizeof(float) * N);
    for (int i = 0; i < N; i++)
        x[i] = -87.0f + 175.0f * (float)i / (N - 1);
    x[7] = 0.0f;
    x[8] = -1e-30f;
    x[9] = NAN;
    size_t k = op_exp_simd(e, x, N);
    CHECK(k == (N & ~7));
    long worst = 0;
    for (size_t i = 0; i < k; i++) {
        if (i == 9) {
            CHECK(isnan(e[i]));
            continue;
        }
        long u = ulps(e[i], expf(x[i]));
        worst = u > worst ? u : worst;
    }
    CHECK_MSG(worst <= 2, "exp: %ld ulp from expf", worst);
    CHECK(op_exp_simd(e, x, 7) == 0);
    // SwiGLU forward and backward, AVX2 against plain C, n not a multiple of 8
    struct lk_rng rng;
    lk_rng_seed(&rng, 19);
    size_t n = 1003;
    float *g = rand_vec(n, &rng), *u = rand_vec(n, &rng), *d = rand_vec(n, &rng);
    for (size_t i = 0; i < n; i++)
        g[i] *= 8.0f; // well into both tails of the sigmoid
    float *o[2], *dg[2], *du[2];
    for (int simd = 0; simd < 2; simd++) {
        op_simd = simd;
        o[simd] = malloc(sizeof(float) * n);
        dg[simd] = malloc(sizeof(float) * n);
        du[simd] = malloc(sizeof(float) * n);
        for (size_t i = 0; i < n; i++) // written, not accumulated
            dg[simd][i] = du[simd][i] = NAN;
        op_swiglu_forward(o[simd], g, u, n);
        op_swiglu_backward(dg[simd], du[simd], d, g, u, n);
    }
    op_simd = 1;
    CHECK(max_err(o[1], o[0], n) < 1e-6 && max_err(dg[1], dg[0], n) < 1e-6 && max_err(du[1], du[0], n) < 1e-6);
    for (int simd = 0; simd < 2; simd++)
        free(o[simd]), free(dg[simd]), free(du[simd]);
    free(x), free(e), free(g), free(u), free(d);
}

/* The six rank-R products of a LoRA linear (ops_lora.c) against double loops: R 8 and 16 (xa and
 * dxa on the register-tiled AVX2 kernels) and 5 (cblas), rows and widths that leave tails (12-row tiles,
 * 8-wide columns), AVX2 and plain, one to three threads (the result may not depend on it). */
TEST(ops_lora_products_match_naive_loops)
{
    static const int shapes[][4] = { { 1, 3, 17, 8 }, { 13, 17, 40, 8 }, { 37, 40, 9, 16 }, { 64, 24, 33, 5 },
                                     { 300, 70, 130, 8 }, { 700, 96, 200, 8 } };
    struct lk_rng rng;
    lk_rng_seed(&rng, 23);
    int saved = omp_get_max_threads();
    for (size_t s = 0; s < sizeof shapes / sizeof shapes[0]; s++) {
        int N = shapes[s][0], IC = shapes[s][1], OC = shapes[s][2], R = shapes[s][3];
        float *x = rand_vec((size_t)N * IC, &rng), *A = rand_vec((size_t)R * IC, &rng);
        float *B = rand_vec((size_t)OC * R, &rng), *dout = rand_vec((size_t)N * OC, &rng);
        float *out0 = rand_vec((size_t)N * OC, &rng), *dx0 = rand_vec((size_t)N * IC, &rng);
        float *dA0 = rand_vec((size_t)R * IC, &rng), *dB0 = rand_vec((size_t)OC * R, &rng);
        float *xa = malloc(sizeof(float) * N * R), *dxa = malloc(sizeof(float) * N * R);
        float *rxa = malloc(sizeof(float) * N * R), *rdxa = malloc(sizeof(float) * N * R);
        float *out = malloc(sizeof(float) * N * OC), *rout = malloc(sizeof(float) * N * OC);
        float *dx = malloc(sizeof(float) * N * IC), *rdx = malloc(sizeof(float) * N * IC);
        float *dA = malloc(sizeof(float) * R * IC), *rdA = malloc(sizeof(float) * R * IC);
        float *dB = malloc(sizeof(float) * OC * R), *rdB = malloc(sizeof(float) * OC * R);
        float *scr = malloc(sizeof(float) * op_lora_scratch_floats(R, IC));
        float *keep[5] = { 0 };
        // the references, on the same inputs (xa and dxa from the references themselves)
        memcpy(rout, out0, sizeof(float) * N * OC);
        memcpy(rdx, dx0, sizeof(float) * N * IC);
        memcpy(rdA, dA0, sizeof(float) * R * IC);
        memcpy(rdB, dB0, sizeof(float) * OC * R);
        op_lora_down_naive(rxa, x, A, N, IC, R);
        op_lora_up_acc_naive(rout, rxa, B, 0.75f, N, R, OC);
        op_lora_dxa_naive(rdxa, dout, B, 0.75f, N, OC, R);
        op_lora_dB_acc_naive(rdB, dout, rxa, 0.75f, N, OC, R);
        op_lora_dA_acc_naive(rdA, rdxa, x, N, IC, R);
        op_lora_dx_acc_naive(rdx, rdxa, A, N, IC, R);
        for (int simd = 0; simd < 2 && !test_failed(); simd++)
            for (int nt = 1; nt <= 3 && !test_failed(); nt++) {
                op_simd = simd;
                omp_set_num_threads(nt);
                memcpy(out, out0, sizeof(float) * N * OC);
                memcpy(dx, dx0, sizeof(float) * N * IC);
                memcpy(dA, dA0, sizeof(float) * R * IC);
                memcpy(dB, dB0, sizeof(float) * OC * R);
                op_lora_down(xa, x, A, N, IC, R, scr);
                op_lora_up_acc(out, rxa, B, 0.75f, N, R, OC);
                op_lora_dxa(dxa, dout, B, 0.75f, N, OC, R);
                op_lora_dB_acc(dB, dout, rxa, 0.75f, N, OC, R);
                op_lora_dA_acc(dA, rdxa, x, N, IC, R);
                op_lora_dx_acc(dx, rdxa, A, N, IC, R);
                double e[6] = { max_err(xa, rxa, (size_t)N * R), max_err(out, rout, (size_t)N * OC),
                                max_err(dxa, rdxa, (size_t)N * R), max_err(dB, rdB, (size_t)OC * R),
                                max_err(dA, rdA, (size_t)R * IC), max_err(dx, rdx, (size_t)N * IC) };
                for (int k = 0; k < 6; k++)
                    CHECK_MSG(e[k] < 2e-6, "N %d IC %d OC %d R %d, %s, %d threads: product %d off by %g", N, IC, OC,
                              R, simd ? "avx2" : "plain", nt, k, e[k]);
                // the same bits whatever the thread count
                if (nt == 1) {
                    float *cur[5] = { xa, out, dB, dA, dx };
                    size_t len[5] = { (size_t)N * R, (size_t)N * OC, (size_t)OC * R, (size_t)R * IC, (size_t)N * IC };
                    for (int k = 0; k < 5; k++) {
                        free(keep[k]);
                        keep[k] = malloc(sizeof(float) * len[k]);
                        memcpy(keep[k], cur[k], sizeof(float) * len[k]);
                    }
                } else {
                    CHECK(!memcmp(keep[0], xa, sizeof(float) * N * R) && !memcmp(keep[1], out, sizeof(float) * N * OC) &&
                          !memcmp(keep[2], dB, sizeof(float) * OC * R) && !memcmp(keep[3], dA, sizeof(float) * R * IC) &&
                          !memcmp(keep[4], dx, sizeof(float) * N * IC));
                }
            }
        op_simd = 1;
        omp_set_num_threads(saved);
        for (int k = 0; k < 5; k++)
            free(keep[k]);
        free(x), free(A), free(B), free(dout), free(out0), free(dx0), free(dA0), free(dB0), free(xa), free(dxa);
        free(rxa), free(rdxa), free(out), free(rout), free(dx), free(rdx), free(dA), free(rdA), free(dB), free(rdB);
        free(scr);
    }
}

/* The row kernels of ops.c with their AVX2 pieces (ops_simd.c) against the same kernels on the
 * plain loops alone: RMSNorm forward and backward (with and without the weight gradient),
 * cross-entropy, rotary embedding and the residual add on widths that leave tails; the
 * elementwise ones bit for bit, those with a sum within float rounding. */
TEST(ops_row_kernels_simd_match_the_plain_loops)
{
    if (!op_simd_active())
        SKIP("no AVX2 on this CPU: only the plain loops run");
    struct lk_rng rng;
    lk_rng_seed(&rng, 29);
    int N = 7, C = 1003, H = 3, HS = 2 * 37 + 2 * 64; // rope: two chunks of 64 frequencies and a tail
    float *x = rand_vec((size_t)N * C, &rng), *w = rand_vec((size_t)C, &rng), *dy = rand_vec((size_t)N * C, &rng);
    float *q0 = rand_vec((size_t)N * H * HS, &rng), *inv = malloc(sizeof(float) * HS / 2);
    int pos[7] = { 0, 1, 5, 77, 300, 1024, 4095 }, tg[7] = { 3, -100, 0, 1002, 17, 500, 999 };
    op_rope_inv_freq(inv, HS, 10000.0);
    float *y[2], *r[2], *dx[2], *dw[2], *dx2[2], *q[2], *a[2], *lg[2];
    double loss[2];
    for (int simd = 0; simd < 2; simd++) {
        op_simd = simd;
        y[simd] = malloc(sizeof(float) * N * C), r[simd] = malloc(sizeof(float) * N);
        dx[simd] = calloc((size_t)N * C, sizeof(float)), dw[simd] = calloc((size_t)C, sizeof(float));
        dx2[simd] = calloc((size_t)N * C, sizeof(float));
        op_rmsnorm_forward(y[simd], r[simd], x, w, N, C, 1e-6f);
        op_rmsnorm_backward(dx[simd], dw[simd], dy, x, w, r[simd], N, C);
        op_rmsnorm_backward(dx2[simd], NULL, dy, x, w, r[simd], N, C);
        q[simd] = malloc(sizeof(float) * N * H * HS);
        memcpy(q[simd], q0, sizeof(float) * N * H * HS);
        op_rope_forward(q[simd], pos, inv, N, H, HS);
        a[simd] = malloc(sizeof(float) * N * C);
        memcpy(a[simd], x, sizeof(float) * N * C);
        op_add(a[simd], dy, (size_t)N * C);
        lg[simd] = malloc(sizeof(float) * N * C);
        memcpy(lg[simd], x, sizeof(float) * N * C);
        loss[simd] = op_crossentropy_forward_backward(lg[simd], lg[simd], tg, N, C, 0.25f);
    }
    op_simd = 1;
    CHECK(!memcmp(q[0], q[1], sizeof(float) * N * H * HS) && !memcmp(a[0], a[1], sizeof(float) * N * C));
    CHECK_MSG(max_err(y[1], y[0], (size_t)N * C) < 1e-6 && max_err(r[1], r[0], (size_t)N) < 1e-6,
              "rmsnorm forward");
    CHECK_MSG(max_err(dx[1], dx[0], (size_t)N * C) < 1e-6 && max_err(dw[1], dw[0], (size_t)C) < 1e-6 &&
              max_err(dx2[1], dx2[0], (size_t)N * C) < 1e-6, "rmsnorm backward");
    CHECK_MSG(fabs(loss[1] - loss[0]) < 1e-9 * fabs(loss[0]) && max_err(lg[1], lg[0], (size_t)N * C) < 1e-7,
              "cross-entropy: loss %.17g against %.17g", loss[1], loss[0]);
    // the rotation itself, against double trigonometry (positions up to 4095)
    double worst = 0;
    for (int n = 0; n < N; n++)
        for (int h = 0; h < H; h++)
            for (int i = 0; i < HS / 2; i++) {
                const float *v = q0 + ((size_t)n * H + h) * HS;
                double ang = (double)((float)pos[n] * inv[i]), c = cos(ang), s = sin(ang);
                double e1 = v[i] * c - v[i + HS / 2] * s, e2 = v[i + HS / 2] * c + v[i] * s;
                const float *g = q[1] + ((size_t)n * H + h) * HS;
                worst = fmax(worst, fmax(fabs(g[i] - e1), fabs(g[i + HS / 2] - e2)));
            }
    CHECK_MSG(worst < 1e-5, "rope off by %g", worst);
    for (int s = 0; s < 2; s++)
        free(y[s]), free(r[s]), free(dx[s]), free(dw[s]), free(dx2[s]), free(q[s]), free(a[s]), free(lg[s]);
    free(x), free(w), free(dy), free(q0), free(inv);
}
