/*
 * test_amx.c - the AMX products of ops_amx.c against a double-precision loop and against the
 * float32 (sgemm) path: every activation split exactly (a row of the identity gives each
 * activation back bit for bit), errors of float32 size, an output row the same bits for any
 * number of rows and threads (generate.c's batched steps rely on it), and the one-token kernel
 * (5 tokens x 3 parts a tile) likewise. Skipped, saying so, where the CPU or the kernel has no AMX.
 */
#include "test.h"

#include <omp.h>
#include <stdlib.h>
#include <string.h>

#include "../libcore/lk.h"
#include "../libcore/ops.h"
#include "../libcore/tensor.h"

#define NEED_AMX()                                                                                 \
    do {                                                                                           \
        if (!op_amx_active())                                                                      \
            SKIP("no AMX-BF16 here (or LORAKIT_AMX=0): the sgemm path runs instead");              \
    } while (0)

static uint16_t *rand_bf16(size_t n, struct lk_rng *rng)
{
    uint16_t *h = malloc(sizeof(uint16_t) * (n ? n : 1));
    for (size_t i = 0; i < n; i++)
        h[i] = tensor_f32_to_bf16(lk_rng_normal(rng));
    return h;
}

/* Activations with every bit of the float in use, over several binades. */
static float *rand_acts(size_t n, struct lk_rng *rng)
{
    float *v = malloc(sizeof(float) * (n ? n : 1));
    for (size_t i = 0; i < n; i++)
        v[i] = lk_rng_normal(rng) * ldexpf(1.0f, (int)(lk_rng_u64(rng) % 9) - 4);
    return v;
}

/* |got - ref| against the classical bound of a float32 dot product of K terms, K 2^-24 sum |x w|
 * (any order of additions, exact or once-rounded products): the worst element's ratio. */
static double bound_ratio(const float *got, const float *x, const uint16_t *w, const float *bias, int N, int IC,
                          int OC)
{
    double worst = 0;
    for (int t = 0; t < N; t++)
        for (int o = 0; o < OC; o++) {
            double s = bias ? bias[o] : 0, a = bias ? fabs(bias[o]) : 0;
            for (int k = 0; k < IC; k++) {
                double p = (double)x[(size_t)t * IC + k] * tensor_bf16_to_f32(w[(size_t)o * IC + k]);
                s += p;
                a += fabs(p);
            }
            double err = fabs(got[(size_t)t * OC + o] - s), lim = (IC + 2) * ldexp(1.0, -24) * a + 1e-30;
            worst = fmax(worst, err / lim);
        }
    return worst;
}

TEST(amx_rows_of_the_identity_give_each_activation_back_exactly)
{
    NEED_AMX();
    // w = [I I] / the rows of a 32 x 32 identity (twice over, 64 outputs): output o = x[o % 32]
    // exactly, only if the three bf16 parts hold all 24 bits of every activation
    enum { N = 21, IC = 32, OC = 64 };
    struct lk_rng rng;
    lk_rng_seed(&rng, 3);
    uint16_t w[OC * IC];
    for (int o = 0; o < OC; o++)
        for (int k = 0; k < IC; k++)
            w[o * IC + k] = tensor_f32_to_bf16(k == o % IC ? 1.0f : 0.0f);
    float *x = rand_acts((size_t)N * IC, &rng), out[N * OC];
    x[0] = 1.0f + ldexpf(1.0f, -23); // the last bit of the significand
    x[1] = -3.0f * ldexpf(1.0f, -20) + ldexpf(1.0f, -43);
    struct op_mat m = { .dtype = TENSOR_BF16, .h = w };
    CHECK(op_amx_fits(&m, IC, OC));
    CHECK_INT(op_amx_forward(out, x, &m, NULL, N, IC, OC), 1);
    for (int t = 0; t < N; t++)
        for (int o = 0; o < OC; o++)
            CHECK_MSG(out[t * OC + o] == x[t * IC + o % IC], "token %d output %d: %a, not %a", t, o, out[t * OC + o],
                      x[t * IC + o % IC]);
    // the one-token kernel likewise
    int oc = OC;
    const struct op_mat *wp = &m;
    float *o1 = out;
    op_amx_gemv = 1;
    CHECK_INT(op_amx_gemv_batch(1, &o1, &wp, NULL, &oc, x, IC, N), 1);
    op_amx_gemv = 0;
    for (int t = 0; t < N; t++)
        for (int o = 0; o < OC; o++)
            CHECK_MSG(out[t * OC + o] == x[t * IC + o % IC], "gemv token %d output %d: %a, not %a", t, o,
                      out[t * OC + o], x[t * IC + o % IC]);
    free(x);
}

TEST(amx_forward_is_float32_accurate_and_row_independent)
{
    NEED_AMX();
    // token counts around the blocks of 16 and their pairs; columns 1 to 28 blocks of 32; outputs
    // odd and even numbers of 16-row blocks
    int shapes[][3] = { { 1, 32, 16 }, { 5, 64, 48 }, { 16, 96, 32 }, { 17, 32, 160 }, { 33, 128, 80 },
                        { 70, 256, 144 }, { 40, 896, 112 } };
    struct lk_rng rng;
    lk_rng_seed(&rng, 11);
    for (size_t s = 0; s < sizeof shapes / sizeof shapes[0]; s++) {
        int N = shapes[s][0], IC = shapes[s][1], OC = shapes[s][2];
        uint16_t *w = rand_bf16((size_t)OC * IC, &rng);
        float *x = rand_acts((size_t)N * IC, &rng), *bias = rand_acts((size_t)OC, &rng);
        float *got = malloc(sizeof(float) * N * OC), *row = malloc(sizeof(float) * OC);
        float *sg = malloc(sizeof(float) * N * OC), *ref = malloc(sizeof(float) * N * OC);
        size_t sn = op_mat_scratch_floats(IC, OC, 2);
        float *scratch = malloc(sizeof(float) * sn);
        struct op_mat m = { .dtype = TENSOR_BF16, .h = w };
        for (int with_bias = 0; with_bias < 2; with_bias++) {
            const float *b = with_bias ? bias : NULL;
            op_mat_forward_naive(ref, x, &m, b, N, IC, OC);
            op_amx = 0; // the sgemm path on the widened weights
            op_mat_forward(sg, x, &m, b, N, IC, OC, scratch, sn);
            op_amx = 1;
            double rs = bound_ratio(sg, x, w, b, N, IC, OC);
            for (int nt = 1; nt <= 2; nt++) {
                omp_set_num_threads(nt);
                CHECK_INT(op_amx_forward(got, x, &m, b, N, IC, OC), 1);
                double ra = bound_ratio(got, x, w, b, N, IC, OC);
                CHECK_MSG(ra <= 1.0, "N %d IC %d OC %d bias %d threads %d: error %.3g of the float32 bound (sgemm %.3g)",
                          N, IC, OC, with_bias, nt, ra, rs);
                // op_mat_forward takes this path for these shapes (N > 1): the same bits
                if (N > 1) {
                    op_mat_forward(sg, x, &m, b, N, IC, OC, scratch, sn);
                    CHECK(!memcmp(sg, got, sizeof(float) * N * OC));
                }
                // each row alone gives the same bits as among the others
                for (int t = 0; t < N; t += (N > 8 ? 7 : 1)) {
                    CHECK_INT(op_amx_forward(row, x + (size_t)t * IC, &m, b, 1, IC, OC), 1);
                    CHECK_MSG(!memcmp(row, got + (size_t)t * OC, sizeof(float) * OC),
                              "N %d IC %d OC %d: row %d alone differs", N, IC, OC, t);
                }
            }
            // the whole against the double loop, as test_ops checks the other paths
            double mx = 0, big = 1;
            for (size_t i = 0; i < (size_t)N * OC; i++) {
                mx = fmax(mx, fabs((double)got[i] - ref[i]));
                big = fmax(big, fabs((double)ref[i]));
            }
            CHECK_MSG(mx / big < 1e-5, "N %d IC %d OC %d: error %g", N, IC, OC, mx / big);
        }
        free(w), free(x), free(bias), free(got), free(row), free(sg), free(ref), free(scratch);
    }
}

TEST(amx_one_token_products_match_double_and_any_batch)
{
    NEED_AMX();
    // three products of one input as q, k, v (one without bias), for 1 to 13 inputs
    enum { IC = 192, NB = 13 };
    int OC[3] = { 96, 32, 48 };
    struct lk_rng rng;
    lk_rng_seed(&rng, 17);
    uint16_t *w[3];
    struct op_mat m[3];
    const struct op_mat *wp[3];
    float *bias[3], *out[3], *one[3];
    for (int k = 0; k < 3; k++) {
        w[k] = rand_bf16((size_t)OC[k] * IC, &rng);
        m[k] = (struct op_mat){ .dtype = TENSOR_BF16, .h = w[k] };
        wp[k] = &m[k];
        bias[k] = k == 1 ? NULL : rand_acts((size_t)OC[k], &rng);
        out[k] = malloc(sizeof(float) * NB * OC[k]);
        one[k] = malloc(sizeof(float) * OC[k]);
    }
    float *x = rand_acts((size_t)NB * IC, &rng);
    op_amx_gemv = 0;
    CHECK_INT(op_amx_gemv_batch(3, out, wp, (const float *const *)bias, OC, x, IC, NB), 0); // off: not taken
    op_amx_gemv = 1;
    for (int nt = 1; nt <= 2; nt++) {
        omp_set_num_threads(nt);
        // through op_mat_gemv_batch, which hands them to the tile unit
        op_mat_gemv_batch(3, out, wp, (const float *const *)bias, OC, x, IC, NB);
        for (int k = 0; k < 3; k++) {
            double r = bound_ratio(out[k], x, w[k], bias[k], NB, IC, OC[k]);
            CHECK_MSG(r <= 1.0, "product %d threads %d: error %.3g of the float32 bound", k, nt, r);
        }
        for (int b = 0; b < NB; b++) {
            op_mat_gemv_many(3, one, wp, (const float *const *)bias, OC, x + (size_t)b * IC, IC);
            for (int k = 0; k < 3; k++)
                CHECK_MSG(!memcmp(one[k], out[k] + (size_t)b * OC[k], sizeof(float) * OC[k]),
                          "input %d of %d, product %d, threads %d: not the bits of the input alone", b, NB, k, nt);
        }
    }
    op_amx_gemv = 0;
    // a float32 matrix among them: the whole batch goes the AVX2 way
    float *wf = malloc(sizeof(float) * OC[1] * IC);
    for (int i = 0; i < OC[1] * IC; i++)
        wf[i] = tensor_bf16_to_f32(w[1][i]);
    struct op_mat mf = { .dtype = TENSOR_F32, .f = wf };
    const struct op_mat *mixed[3] = { wp[0], &mf, wp[2] };
    op_amx_gemv = 1;
    CHECK_INT(op_amx_gemv_batch(3, out, mixed, (const float *const *)bias, OC, x, IC, NB), 0);
    op_amx_gemv = 0;
    for (int k = 0; k < 3; k++)
        free(w[k]), free(bias[k]), free(out[k]), free(one[k]);
    free(x), free(wf);
}

TEST(amx_fits_only_bf16_in_whole_tiles)
{
    uint16_t h[64 * 48] = { 0 };
    float f[64 * 48] = { 0 };
    struct op_mat b = { .dtype = TENSOR_BF16, .h = h }, g = { .dtype = TENSOR_F16, .h = h };
    struct op_mat s = { .dtype = TENSOR_F32, .f = f };
    CHECK(!op_amx_fits(&g, 64, 48) && !op_amx_fits(&s, 64, 48));
    CHECK(!op_amx_fits(&b, 48, 64) && !op_amx_fits(&b, 64, 40) && !op_amx_fits(&b, 0, 16));
    int prev = op_amx;
    op_amx = 0;
    CHECK(!op_amx_fits(&b, 64, 48));
    op_amx = prev;
    if (!op_amx_active())
        SKIP("no AMX-BF16 here: only the refusals were checked");
    CHECK(op_amx_fits(&b, 64, 48));
}
