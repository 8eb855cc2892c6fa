/*
 * test_model.c - the decoder against the double-precision reference (tests/ref_model.c):
 * kernels vs naive loops, logits vs the reference, LoRA and full gradients vs central
 * differences of the reference loss in double, packing, zero adapters, hand merging.
 */
#include "test.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "../libcore/model.h"
#include "../libcore/ops.h"
#include "../libcore/tensor.h"
#include "fix_model.h"
#include "ref_model.h"

TEST(ops_matmul_matches_naive_on_awkward_shapes)
{
    int shapes[][3] = { { 1, 1, 1 }, { 1, 7, 3 }, { 5, 1, 9 }, { 13, 17, 1 }, { 33, 65, 31 } };
    struct lk_rng rng;
    lk_rng_seed(&rng, 1);
    for (size_t s = 0; s < sizeof shapes / sizeof shapes[0]; s++) {
        int N = shapes[s][0], IC = shapes[s][1], OC = shapes[s][2];
        float *x = malloc(sizeof(float) * N * IC), *w = malloc(sizeof(float) * OC * IC);
        float *b = malloc(sizeof(float) * OC), *y1 = malloc(sizeof(float) * N * OC);
        float *y2 = malloc(sizeof(float) * N * OC);
        for (int i = 0; i < N * IC; i++)
            x[i] = lk_rng_normal(&rng);
        for (int i = 0; i < OC * IC; i++)
            w[i] = lk_rng_normal(&rng);
        for (int i = 0; i < OC; i++)
            b[i] = lk_rng_normal(&rng);
        op_matmul_forward(y1, x, w, b, N, IC, OC);
        op_matmul_forward_naive(y2, x, w, b, N, IC, OC);
        for (int i = 0; i < N * OC; i++)
            CHECK_NEAR(y1[i], y2[i], 1e-4);
        free(x), free(w), free(b), free(y1), free(y2);
    }
}

static void max_rel_logits(const float *got, const double *ref, size_t n, double *out)
{
    double mx = 0, mref = 0;
    for (size_t i = 0; i < n; i++) {
        double d = fabs((double)got[i] - ref[i]);
        if (d > mx)
            mx = d;
        if (fabs(ref[i]) > mref)
            mref = fabs(ref[i]);
    }
    *out = mx / (mref > 0 ? mref : 1);
}

/* The weight dtypes every parity check runs in: float32, and the matrices kept in bf16 and f16
 * (the reference reads the same kept values, widened by tensor.h's scalar conversions). */
static const int weight_dtypes[] = { TENSOR_F32, TENSOR_BF16, TENSOR_F16 };

/* Logits of B = 2 rows of T tokens against the reference: max |diff| / max |ref| below tol. */
static void check_logits_vs_ref_T_dtype(const struct cfg *c, int with_lora, int T, double tol, int dtype)
{
    struct model m;
    struct lora l = { 0 };
    CHECK_OK(fix_model_random(&m, c, 0.3f, 11));
    if (dtype != TENSOR_F32)
        CHECK_OK(model_weights_convert(&m.w, c, dtype, test_err()));
    CHECK_INT(m.w.dtype, dtype);
    if (with_lora)
        CHECK_OK(fix_lora_random(&l, c, (1u << CFG_N_MODULES) - 1, 3, 6.0, 0, 0.0f, 12));
    int B = 2, N = B * T, V = c->vocab_size;
    int *tok = malloc(sizeof(int) * N);
    fix_tokens(tok, N, V, 13);
    CHECK_OK(model_plan(&m, B, T, 0, test_err()));
    CHECK_OK(model_forward(&m, with_lora ? &l : NULL, tok, NULL, NULL, NULL, 0, NULL, test_err()));
    double *ref = malloc(sizeof(double) * N * V);
    ref_forward(&m, with_lora ? &l : NULL, tok, NULL, NULL, NULL, B, T, 0, 0, ref);
    double rel;
    max_rel_logits(model_logits(&m), ref, (size_t)N * V, &rel);
    CHECK_MSG(rel < tol, "%s weights: logits differ from the reference: max rel %g", tensor_dtype_name(dtype), rel);
    free(tok), free(ref);
    lora_release(&l);
    model_release(&m);
}

static void check_logits_vs_ref_T(const struct cfg *c, int with_lora, int T, double tol)
{
    for (size_t d = 0; d < 3 && !test_failed(); d++)
        check_logits_vs_ref_T_dtype(c, with_lora, T, tol, weight_dtypes[d]);
}

static void check_logits_vs_ref(const struct cfg *c, int with_lora)
{
    check_logits_vs_ref_T(c, with_lora, 7, 1e-5);
}

TEST(model_logits_match_reference_qwen2)
{
    struct cfg c;
    fix_cfg_qwen2(&c);
    check_logits_vs_ref(&c, 0);
    check_logits_vs_ref(&c, 1);
}

TEST(model_logits_match_reference_llama)
{
    struct cfg c;
    fix_cfg_llama(&c);
    check_logits_vs_ref(&c, 0);
    check_logits_vs_ref(&c, 1);
}

/* Central difference of the reference loss w.r.t. one stored float, with the values actually
 * stored: (f(x_up) - f(x_down)) / (x_up - x_down). */
struct gcase {
    struct model *m;
    struct lora *l;
    int *tok, *pos, *seg, *tgt;
    int B, T;
    double scale;
};

static double fd_at(struct gcase *g, float *p)
{
    float orig = *p;
    // h small: the reference is exact in double and the truncation error O(h^2) dominates
    float h = 3e-5f * fmaxf(1.0f, fabsf(orig));
    float up = orig + h, down = orig - h;
    *p = up;
    double fu = ref_forward(g->m, g->l, g->tok, g->pos, g->seg, g->tgt, g->B, g->T, g->scale, 1, NULL);
    *p = down;
    double fd = ref_forward(g->m, g->l, g->tok, g->pos, g->seg, g->tgt, g->B, g->T, g->scale, 1, NULL);
    *p = orig;
    return (fu - fd) / ((double)up - (double)down);
}

/* Compares analytic gradients of one tensor with central differences on a capped sample of
 * coordinates; returns the norm-wise relative error and reports the worst element. */
static double grad_check_tensor(struct gcase *g, float *param, const float *grad, size_t n,
                                const char *name, int max_samples)
{
    double num = 0, den = 0, worst = 0;
    size_t step = n > (size_t)max_samples ? n / (size_t)max_samples : 1;
    for (size_t i = 0; i < n; i += step) {
        double fd = fd_at(g, &param[i]);
        double d = fabs(fd - grad[i]);
        num += d * d;
        den += fd * fd;
        double rel = d / fmax(fabs(fd), 1e-6);
        if (fabs(fd) > 1e-5 && rel > worst)
            worst = rel;
    }
    double r = den > 0 ? sqrt(num / den) : sqrt(num);
    if (r > 1e-4)
        fprintf(stderr, "    %s: norm-wise rel error %.3g, worst element %.3g (gradient norm %.3g)\n", name, r, worst, sqrt(den));
    return r;
}

/* lbias: the adapter has lora_B.bias on every module (their gradients checked too). R: its rank
 * (8 and 16 take the register-tiled kernels of ops_lora.c, 2 cblas). */
static void gradient_check_T_dtype(const struct cfg *c, int full, int with_seg, float dropout, int rslora, int T,
                                   int dtype, int lbias, int R)
{
    struct model m;
    struct lora l = { 0 };
    CHECK_OK(fix_model_random(&m, c, 0.4f, 21));
    if (dtype != TENSOR_F32)
        CHECK_OK(model_weights_convert(&m.w, c, dtype, test_err()));
    if (!full)
        // alpha 4 sqrt(R / 2): s B A has the same size at every rank (alpha 4 at rank 2)
        CHECK_OK(fix_lora_random_bias(&l, c, (1u << CFG_N_MODULES) - 1, R, 4.0 * sqrt(R / 2.0), rslora, dropout,
                                      lbias, 22));
    int B = 2, N = B * T, V = c->vocab_size;
    int tok[2 * 64], tgt[2 * 64], pos[2 * 64], seg[2 * 64];
    LK_ASSERT(T >= 6 && T <= 64);
    fix_tokens(tok, N, V, 23);
    fix_tokens(tgt, N, V, 24);
    tgt[3] = tgt[N - 1] = -100;
    int count = 0;
    for (int i = 0; i < N; i++) {
        count += tgt[i] >= 0;
        // two packed records per row: positions restart, segments differ
        seg[i] = (i % T) < T - 2 ? 0 : 1;
        pos[i] = (i % T) < T - 2 ? i % T : i % T - (T - 2);
    }
    struct gcase g = { &m, full ? NULL : &l, tok, with_seg ? pos : NULL, with_seg ? seg : NULL,
                       tgt, B, T, 1.0 / count };
    m.dropout_seed = 99;
    CHECK_OK(model_plan(&m, B, T, 1, test_err()));
    double loss;
    CHECK_OK(model_forward(&m, g.l, tok, g.pos, g.seg, tgt, (float)g.scale, &loss, test_err()));
    double ref_loss = ref_forward(&m, g.l, tok, g.pos, g.seg, tgt, B, T, g.scale, 1, NULL);
    CHECK_NEAR(loss * g.scale, ref_loss, 1e-5);
    double worst = 0;
    if (!full) {
        float *grad = calloc(l.n, sizeof(float));
        model_backward(&m, &l, grad, NULL);
        for (int i = 0; i < l.n_mod; i++) {
            struct lora_module *md = &l.mod[i];
            char nm[64];
            snprintf(nm, sizeof nm, "L%d.%s.A", md->layer, cfg_module_names[md->module]);
            double e = grad_check_tensor(&g, md->A, grad + (md->A - l.mem), (size_t)md->R * md->in, nm, 12);
            worst = fmax(worst, e);
            snprintf(nm, sizeof nm, "L%d.%s.B", md->layer, cfg_module_names[md->module]);
            e = grad_check_tensor(&g, md->B, grad + (md->B - l.mem), (size_t)md->out * md->R, nm, 12);
            worst = fmax(worst, e);
            if (md->bias) {
                snprintf(nm, sizeof nm, "L%d.%s.bias", md->layer, cfg_module_names[md->module]);
                e = grad_check_tensor(&g, md->bias, grad + (md->bias - l.mem), (size_t)md->out, nm, 12);
                worst = fmax(worst, e);
            }
        }
        free(grad);
    } else {
        struct model_weights gw;
        CHECK_OK(model_weights_alloc(&gw, c, test_err()));
        model_backward(&m, NULL, NULL, &gw);
        struct model_tensor *pt, *gt;
        int n, n2;
        CHECK_OK(model_weights_tensors(&m.w, c, &pt, &n, test_err()));
        CHECK_OK(model_weights_tensors(&gw, c, &gt, &n2, test_err()));
        CHECK_INT(n, n2);
        for (int i = 0; i < n; i++) {
            double e = grad_check_tensor(&g, pt[i].data, gt[i].data, pt[i].numel, pt[i].name, 10);
            worst = fmax(worst, e);
        }
        lk_free(pt);
        lk_free(gt);
        model_weights_release(&gw);
    }
    fprintf(stderr, "    %s weights: worst norm-wise relative gradient error: %.3g\n", tensor_dtype_name(dtype), worst);
    CHECK_MSG(worst < 1e-3, "gradient check failed: worst relative error %g", worst);
    lora_release(&l);
    model_release(&m);
}

/* A full fine-tune trains float32 weights; LoRA runs over every kept dtype of the base. */
static void gradient_check_T(const struct cfg *c, int full, int with_seg, float dropout, int rslora, int T)
{
    for (size_t d = 0; d < (full ? 1u : 3u) && !test_failed(); d++)
        gradient_check_T_dtype(c, full, with_seg, dropout, rslora, T, weight_dtypes[d], 0, 2);
}

static void gradient_check(const struct cfg *c, int full, int with_seg, float dropout, int rslora)
{
    gradient_check_T(c, full, with_seg, dropout, rslora, 6);
}

TEST(model_grad_lora_qwen2)
{
    struct cfg c;
    fix_cfg_qwen2(&c);
    gradient_check(&c, 0, 0, 0.0f, 0);
}

TEST(model_grad_lora_qwen2_dropout_rslora_packed)
{
    struct cfg c;
    fix_cfg_qwen2(&c);
    gradient_check(&c, 0, 1, 0.25f, 1);
}

TEST(model_grad_lora_llama)
{
    struct cfg c;
    fix_cfg_llama(&c);
    gradient_check(&c, 0, 0, 0.0f, 0);
}

TEST(model_grad_full_qwen2_tied)
{
    struct cfg c;
    fix_cfg_qwen2(&c);
    gradient_check(&c, 1, 0, 0.0f, 0);
}

TEST(model_grad_full_llama_untied_packed)
{
    struct cfg c;
    fix_cfg_llama(&c);
    gradient_check(&c, 1, 1, 0.0f, 0);
}

// ---- Llama with attention_bias: q, k, v and o_proj have biases ----

TEST(model_logits_match_reference_llama_attention_bias)
{
    struct cfg c;
    fix_cfg_llama_bias(&c);
    CHECK(cfg_module_bias(&c, CFG_O) && cfg_module_bias(&c, CFG_Q) && !cfg_module_bias(&c, CFG_GATE));
    check_logits_vs_ref(&c, 0);
    check_logits_vs_ref(&c, 1);
    // Qwen2's attention_bias is q/k/v only (Qwen2Attention: o_proj bias=False)
    fix_cfg_qwen2(&c);
    CHECK(cfg_module_bias(&c, CFG_V) && !cfg_module_bias(&c, CFG_O));
}

TEST(model_o_proj_bias_changes_the_logits)
{
    // the engine and the reference could agree by both ignoring o_proj's bias: it must move the
    // output, by what the reference says
    struct cfg c;
    fix_cfg_llama_bias(&c);
    struct model m;
    CHECK_OK(fix_model_random(&m, &c, 0.3f, 61));
    CHECK(m.w.layer[1].bo != NULL && m.w.layer[0].bo != m.w.layer[1].bo);
    int tok[8], V = c.vocab_size;
    fix_tokens(tok, 8, V, 62);
    CHECK_OK(model_plan(&m, 1, 8, 0, test_err()));
    size_t n = (size_t)8 * V;
    float *a = malloc(sizeof(float) * n);
    double *ref = malloc(sizeof(double) * n);
    CHECK_OK(model_forward(&m, NULL, tok, NULL, NULL, NULL, 0, NULL, test_err()));
    memcpy(a, model_logits(&m), sizeof(float) * n);
    m.w.layer[1].bo[3] += 0.5f;
    CHECK_OK(model_forward(&m, NULL, tok, NULL, NULL, NULL, 0, NULL, test_err()));
    ref_forward(&m, NULL, tok, NULL, NULL, NULL, 1, 8, 0, 0, ref);
    double d = 0, rel;
    for (size_t i = 0; i < n; i++)
        d = fmax(d, fabs(model_logits(&m)[i] - a[i]));
    max_rel_logits(model_logits(&m), ref, n, &rel);
    CHECK_MSG(d > 1e-3, "o_proj's bias has no effect (%g)", d);
    CHECK_MSG(rel < 1e-5, "with o_proj's bias changed, logits differ from the reference by %g", rel);
    free(a);
    free(ref);
    model_release(&m);
}

TEST(model_grad_lora_llama_attention_bias)
{
    // with lora_B.bias on every module: o_proj's now adds to a base bias
    struct cfg c;
    fix_cfg_llama_bias(&c);
    for (size_t d = 0; d < 3 && !test_failed(); d++)
        gradient_check_T_dtype(&c, 0, 0, 0.0f, 0, 6, weight_dtypes[d], 1, 2);
}

TEST(model_grad_lora_rank8_and_16_register_kernels)
{
    // ranks that take ops_lora.c's AVX2 kernels (2 takes cblas), with dropout, packing and
    // lora_bias; widths 12, 20, 24 leave column tails
    struct cfg c;
    fix_cfg_llama_bias(&c);
    gradient_check_T_dtype(&c, 0, 1, 0.2f, 0, 13, TENSOR_F32, 1, 8);
    fix_cfg_qwen3(&c);
    gradient_check_T_dtype(&c, 0, 0, 0.0f, 1, 6, TENSOR_BF16, 0, 16);
}

TEST(model_grad_full_llama_attention_bias_packed)
{
    // every weight, the four biases included (model_weights_tensors lists o_proj.bias)
    struct cfg c;
    fix_cfg_llama_bias(&c);
    gradient_check(&c, 1, 1, 0.0f, 0);
}

TEST(model_zero_b_adapter_gives_base_logits_exactly)
{
    struct cfg c;
    fix_cfg_qwen2(&c);
    struct model m;
    struct lora l;
    CHECK_OK(fix_model_random(&m, &c, 0.3f, 31));
    CHECK_OK(fix_lora_random(&l, &c, (1u << CFG_N_MODULES) - 1, 4, 8.0, 0, 0.0f, 32));
    for (int i = 0; i < l.n_mod; i++)
        memset(l.mod[i].B, 0, sizeof(float) * (size_t)l.mod[i].out * l.mod[i].R);
    int tok[10];
    fix_tokens(tok, 10, c.vocab_size, 33);
    CHECK_OK(model_plan(&m, 2, 5, 0, test_err()));
    size_t n = (size_t)10 * c.vocab_size;
    float *base = malloc(sizeof(float) * n);
    CHECK_OK(model_forward(&m, NULL, tok, NULL, NULL, NULL, 0, NULL, test_err()));
    memcpy(base, model_logits(&m), sizeof(float) * n);
    CHECK_OK(model_forward(&m, &l, tok, NULL, NULL, NULL, 0, NULL, test_err()));
    CHECK(memcmp(base, model_logits(&m), sizeof(float) * n) == 0);
    free(base);
    lora_release(&l);
    model_release(&m);
}

TEST(model_hand_merge_matches_adapter_path)
{
    struct cfg c;
    fix_cfg_llama(&c);
    struct model m;
    struct lora l;
    CHECK_OK(fix_model_random(&m, &c, 0.3f, 41));
    CHECK_OK(fix_lora_random(&l, &c, (1u << CFG_N_MODULES) - 1, 3, 5.0, 0, 0.0f, 42));
    int tok[12];
    fix_tokens(tok, 12, c.vocab_size, 43);
    CHECK_OK(model_plan(&m, 2, 6, 0, test_err()));
    size_t n = (size_t)12 * c.vocab_size;
    float *with = malloc(sizeof(float) * n);
    CHECK_OK(model_forward(&m, &l, tok, NULL, NULL, NULL, 0, NULL, test_err()));
    memcpy(with, model_logits(&m), sizeof(float) * n);
    // W += s * B @ A by hand, in double
    struct model_tensor *t;
    int nt;
    CHECK_OK(model_weights_tensors(&m.w, &c, &t, &nt, test_err()));
    for (int i = 0; i < nt; i++) {
        if (t[i].module < 0 || t[i].is_bias)
            continue;
        struct lora_module *md = lora_find(&l, t[i].layer, t[i].module);
        CHECK(md != NULL);
        for (int o = 0; o < md->out; o++)
            for (int k = 0; k < md->in; k++) {
                double s = 0;
                for (int r = 0; r < md->R; r++)
                    s += (double)md->B[o * md->R + r] * md->A[r * md->in + k];
                t[i].data[(size_t)o * md->in + k] += (float)(md->scale * s);
            }
    }
    lk_free(t);
    CHECK_OK(model_forward(&m, NULL, tok, NULL, NULL, NULL, 0, NULL, test_err()));
    double mx = 0, mref = 0;
    for (size_t i = 0; i < n; i++) {
        mx = fmax(mx, fabs((double)model_logits(&m)[i] - with[i]));
        mref = fmax(mref, fabs((double)with[i]));
    }
    CHECK_MSG(mx / mref < 1e-5, "merged logits differ: max rel %g", mx / mref);
    free(with);
    lora_release(&l);
    model_release(&m);
}

TEST(model_packing_equals_separate_sequences)
{
    struct cfg c;
    fix_cfg_qwen2(&c);
    struct model m;
    CHECK_OK(fix_model_random(&m, &c, 0.3f, 51));
    int V = c.vocab_size;
    int a[3], b[4], packed[7], pos[7], seg[7];
    fix_tokens(a, 3, V, 52);
    fix_tokens(b, 4, V, 53);
    for (int i = 0; i < 7; i++) {
        packed[i] = i < 3 ? a[i] : b[i - 3];
        pos[i] = i < 3 ? i : i - 3;
        seg[i] = i < 3 ? 0 : 1;
    }
    float *lp = malloc(sizeof(float) * 7 * V);
    CHECK_OK(model_plan(&m, 1, 7, 0, test_err()));
    CHECK_OK(model_forward(&m, NULL, packed, pos, seg, NULL, 0, NULL, test_err()));
    memcpy(lp, model_logits(&m), sizeof(float) * 7 * V);
    CHECK_OK(model_plan(&m, 1, 4, 0, test_err()));
    CHECK_OK(model_forward(&m, NULL, b, NULL, NULL, NULL, 0, NULL, test_err()));
    for (int i = 0; i < 4 * V; i++)
        CHECK_NEAR(lp[3 * V + i], model_logits(&m)[i], 1e-5);
    CHECK_OK(model_plan(&m, 1, 3, 0, test_err()));
    CHECK_OK(model_forward(&m, NULL, a, NULL, NULL, NULL, 0, NULL, test_err()));
    for (int i = 0; i < 3 * V; i++)
        CHECK_NEAR(lp[i], model_logits(&m)[i], 1e-5);
    free(lp);
    model_release(&m);
}

TEST(model_rejects_out_of_range_tokens)
{
    struct cfg c;
    fix_cfg_qwen2(&c);
    struct model m;
    CHECK_OK(fix_model_random(&m, &c, 0.3f, 61));
    CHECK_OK(model_plan(&m, 1, 2, 0, test_err()));
    int tok[2] = { 1, c.vocab_size };
    CHECK(model_forward(&m, NULL, tok, NULL, NULL, NULL, 0, NULL, test_err()) == LK_ERR_USAGE);
    CHECK(strstr(test_errmsg(), "outside the vocabulary") != NULL);
    model_release(&m);
}

TEST(model_grad_dora_matches_reference_with_detached_norm)
{
    struct cfg c;
    fix_cfg_qwen2(&c);
    struct model m;
    CHECK_OK(fix_model_random(&m, &c, 0.4f, 71));
    struct lora_config lc;
    lora_config_default(&lc);
    lc.r = 2;
    lc.alpha = 4;
    lc.use_dora = 1;
    struct lora l, fz;
    CHECK_OK(lora_init(&l, &lc, &c, test_err()));
    struct lk_rng rng;
    lk_rng_seed(&rng, 72);
    for (int i = 0; i < l.n_mod; i++) {
        struct lora_module *md = &l.mod[i];
        for (size_t j = 0; j < (size_t)md->R * md->in; j++)
            md->A[j] = 0.5f * lk_rng_normal(&rng);
        for (size_t j = 0; j < (size_t)md->out * md->R; j++)
            md->B[j] = 0.5f * lk_rng_normal(&rng);
    }
    CHECK_OK(lora_init_dora_magnitude(&l, &m, test_err()));
    for (int i = 0; i < l.n_mod; i++)
        for (int o = 0; o < l.mod[i].out; o++)
            l.mod[i].mag[o] *= 1.0f + 0.3f * lk_rng_normal(&rng); // g away from 1
    CHECK_OK(lora_init(&fz, &lc, &c, test_err()));
    memcpy(fz.mem, l.mem, sizeof(float) * l.n);
    ref_dora_frozen = &fz;
    int B = 2, T = 5, N = B * T, V = c.vocab_size;
    int tok[10], tgt[10];
    fix_tokens(tok, N, V, 73);
    fix_tokens(tgt, N, V, 74);
    // logits first: engine against the reference
    CHECK_OK(model_plan(&m, B, T, 0, test_err()));
    CHECK_OK(model_forward(&m, &l, tok, NULL, NULL, NULL, 0, NULL, test_err()));
    double *ref = malloc(sizeof(double) * N * V), rel;
    ref_forward(&m, &l, tok, NULL, NULL, NULL, B, T, 0, 0, ref);
    max_rel_logits(model_logits(&m), ref, (size_t)N * V, &rel);
    CHECK_MSG(rel < 1e-5, "DoRA logits differ from the reference: %g", rel);
    free(ref);
    // a magnitude equal to the norm is the plain LoRA output: checked through g = 1 below
    struct gcase g = { &m, &l, tok, NULL, NULL, tgt, B, T, 1.0 / N };
    CHECK_OK(model_plan(&m, B, T, 1, test_err()));
    double loss;
    CHECK_OK(model_forward(&m, &l, tok, NULL, NULL, tgt, (float)g.scale, &loss, test_err()));
    float *grad = calloc(l.n, sizeof(float));
    model_backward(&m, &l, grad, NULL);
    double worst = 0;
    for (int i = 0; i < l.n_mod; i++) {
        struct lora_module *md = &l.mod[i];
        worst = fmax(worst, grad_check_tensor(&g, md->A, grad + (md->A - l.mem), (size_t)md->R * md->in, "A", 8));
        worst = fmax(worst, grad_check_tensor(&g, md->B, grad + (md->B - l.mem), (size_t)md->out * md->R, "B", 8));
        worst = fmax(worst, grad_check_tensor(&g, md->mag, grad + (md->mag - l.mem), (size_t)md->out, "m", 8));
    }
    fprintf(stderr, "    worst norm-wise relative gradient error: %.3g\n", worst);
    CHECK_MSG(worst < 1e-3, "DoRA gradient check failed: %g", worst);
    ref_dora_frozen = NULL;
    free(grad);
    lora_release(&fz);
    lora_release(&l);
    model_release(&m);
}

TEST(model_dora_with_magnitude_equal_to_norm_is_plain_lora)
{
    struct cfg c;
    fix_cfg_llama(&c);
    struct model m;
    CHECK_OK(fix_model_random(&m, &c, 0.3f, 81));
    struct lora plain, dora;
    CHECK_OK(fix_lora_random(&plain, &c, (1u << CFG_N_MODULES) - 1, 2, 4.0, 0, 0.0f, 82));
    struct lora_config lc = plain.cfg;
    lc.use_dora = 1;
    CHECK_OK(lora_init(&dora, &lc, &c, test_err()));
    for (int i = 0; i < plain.n_mod; i++) {
        memcpy(dora.mod[i].A, plain.mod[i].A, sizeof(float) * (size_t)plain.mod[i].R * plain.mod[i].in);
        memcpy(dora.mod[i].B, plain.mod[i].B, sizeof(float) * (size_t)plain.mod[i].out * plain.mod[i].R);
    }
    CHECK_OK(lora_init_dora_magnitude(&dora, &m, test_err()));
    int tok[8];
    fix_tokens(tok, 8, c.vocab_size, 83);
    CHECK_OK(model_plan(&m, 2, 4, 0, test_err()));
    size_t n = (size_t)8 * c.vocab_size;
    float *a = malloc(sizeof(float) * n);
    CHECK_OK(model_forward(&m, &plain, tok, NULL, NULL, NULL, 0, NULL, test_err()));
    memcpy(a, model_logits(&m), sizeof(float) * n);
    CHECK_OK(model_forward(&m, &dora, tok, NULL, NULL, NULL, 0, NULL, test_err()));
    for (size_t i = 0; i < n; i++)
        CHECK_NEAR(model_logits(&m)[i], a[i], 1e-5);
    free(a);
    lora_release(&plain);
    lora_release(&dora);
    model_release(&m);
}

// ---- Qwen3 (q_norm / k_norm, head_dim independent of hidden) and Llama 3.2 (llama3 rope) ----

/* Llama-3.2-1B's published rotary settings (head_dim 64, theta 500000, llama3: factor 32, low 1,
 * high 4, original 8192). */
static void cfg_llama32_1b_rope(struct cfg *c)
{
    fix_cfg_llama32(c);
    c->hidden_size = 128;
    c->num_attention_heads = 2;
    c->head_dim = 64;
    c->rope_theta = 500000.0;
    c->rope_scaling = (struct cfg_rope_scaling){ CFG_ROPE_LLAMA3, 32.0, 1.0, 4.0, 8192 };
}

/* The engine's float32 frequencies (model_init) against the published formula in double
 * (ref_rope_inv_freq); every band must hold at least one frequency. */
static void check_rope_bands(const struct cfg *c)
{
    struct model m;
    CHECK_OK(model_init(&m, c, test_err()));
    int n = c->head_dim / 2, band[3] = { 0, 0, 0 };
    double *ref = malloc(sizeof(double) * (size_t)n), worst = 0;
    ref_rope_inv_freq(c, ref);
    const struct cfg_rope_scaling *r = &c->rope_scaling;
    for (int i = 0; i < n; i++) {
        double wavelen = 2 * 3.14159265358979323846 * pow(c->rope_theta, (double)(2 * i) / c->head_dim);
        double lo = r->original_max_position_embeddings / r->low_freq_factor;
        double hi = r->original_max_position_embeddings / r->high_freq_factor;
        band[wavelen < hi ? 0 : wavelen > lo ? 2 : 1]++;
        worst = fmax(worst, fabs(m.inv_freq[i] - ref[i]) / ref[i]);
    }
    fprintf(stderr, "    %d high, %d medium, %d low frequencies; worst relative error %.3g\n", band[0], band[1],
            band[2], worst);
    CHECK_MSG(band[0] > 0 && band[1] > 0 && band[2] > 0, "a band is empty: %d %d %d", band[0], band[1], band[2]);
    CHECK_MSG(worst < 1e-6, "inv_freq differs from the published formula by %g (relative)", worst);
    free(ref);
    model_release(&m);
}

TEST(ops_rope_llama3_matches_published_formula_in_all_bands)
{
    struct cfg c;
    fix_cfg_llama32(&c);
    check_rope_bands(&c);
    if (test_failed())
        return;
    cfg_llama32_1b_rope(&c);
    check_rope_bands(&c);
    if (test_failed())
        return;
    // values worked from _compute_llama3_parameters by hand (Python floats), one per band
    double f[32];
    ref_rope_inv_freq(&c, f);
    CHECK_NEAR(f[0], 1.0, 1e-15);                       // high: kept
    CHECK_NEAR(f[16] / 0.00042955679655936815, 1, 1e-12); // medium: interpolated
    CHECK_NEAR(f[31] / 9.418306725434909e-08, 1, 1e-12);  // low: divided by 32
    fix_cfg_llama32(&c);
    ref_rope_inv_freq(&c, f);
    CHECK_NEAR(f[1] / 0.09583998588296266, 1, 1e-12);
    // linear: every frequency divided by the factor
    c.rope_scaling = (struct cfg_rope_scaling){ CFG_ROPE_LINEAR, 4.0, 0, 0, 0 };
    struct model m;
    CHECK_OK(model_init(&m, &c, test_err()));
    for (int i = 0; i < 4; i++)
        CHECK_NEAR(m.inv_freq[i], pow(100.0, -i / 4.0) / 4.0, 1e-6);
    model_release(&m);
}

TEST(model_logits_match_reference_qwen3)
{
    struct cfg c;
    fix_cfg_qwen3(&c);
    CHECK(c.num_attention_heads * c.head_dim != c.hidden_size && c.num_key_value_heads < c.num_attention_heads);
    check_logits_vs_ref(&c, 0);
    check_logits_vs_ref(&c, 1);
}

TEST(model_logits_match_reference_llama32_rope)
{
    // 40 positions: past every band edge (8, 32) and the original context (32). The engine's
    // angles are float32 products (as in transformers), the reference's exact: 1e-4 at 40 positions
    struct cfg c;
    fix_cfg_llama32(&c);
    check_logits_vs_ref_T(&c, 0, 40, 1e-4);
    check_logits_vs_ref_T(&c, 1, 40, 1e-4);
    c.rope_scaling = (struct cfg_rope_scaling){ CFG_ROPE_LINEAR, 2.5, 0, 0, 0 };
    check_logits_vs_ref_T(&c, 0, 40, 1e-4);
}

TEST(model_qk_norm_changes_the_logits)
{
    // the reference and the engine could agree by both skipping the norms: weights that are not
    // all 1 must change the output, and a scale on q's projection must not (the norm removes it)
    struct cfg c;
    fix_cfg_qwen3(&c);
    struct model m;
    CHECK_OK(fix_model_random(&m, &c, 0.3f, 91));
    int tok[8];
    fix_tokens(tok, 8, c.vocab_size, 92);
    CHECK_OK(model_plan(&m, 1, 8, 0, test_err()));
    size_t n = (size_t)8 * c.vocab_size;
    float *a = malloc(sizeof(float) * n);
    CHECK_OK(model_forward(&m, NULL, tok, NULL, NULL, NULL, 0, NULL, test_err()));
    memcpy(a, model_logits(&m), sizeof(float) * n);
    for (int i = 0; i < c.num_attention_heads * c.head_dim * c.hidden_size; i++)
        m.w.layer[0].wq.f[i] *= 3.0f;
    CHECK_OK(model_forward(&m, NULL, tok, NULL, NULL, NULL, 0, NULL, test_err()));
    double d = 0;
    for (size_t i = 0; i < n; i++)
        d = fmax(d, fabs(model_logits(&m)[i] - a[i]));
    CHECK_MSG(d < 1e-4, "scaling q_proj changed the logits by %g despite q_norm", d);
    m.w.layer[0].k_norm[1] += 0.5f;
    CHECK_OK(model_forward(&m, NULL, tok, NULL, NULL, NULL, 0, NULL, test_err()));
    d = 0;
    for (size_t i = 0; i < n; i++)
        d = fmax(d, fabs(model_logits(&m)[i] - a[i]));
    CHECK_MSG(d > 1e-3, "k_norm's weight has no effect (%g)", d);
    free(a);
    model_release(&m);
}

TEST(model_grad_lora_qwen3)
{
    struct cfg c;
    fix_cfg_qwen3(&c);
    gradient_check(&c, 0, 0, 0.0f, 0);
}

TEST(model_grad_full_qwen3_tied_packed)
{
    // every weight, q_norm and k_norm included, against central differences
    struct cfg c;
    fix_cfg_qwen3(&c);
    gradient_check(&c, 1, 1, 0.0f, 0);
}

TEST(model_grad_lora_llama32_rope)
{
    struct cfg c;
    fix_cfg_llama32(&c);
    gradient_check_T(&c, 0, 0, 0.0f, 0, 36);
}

TEST(model_grad_full_llama32_rope_tied)
{
    struct cfg c;
    fix_cfg_llama32(&c);
    gradient_check_T(&c, 1, 0, 0.0f, 0, 36);
}

TEST(model_dynamic_rope_is_default_below_max_and_refused_beyond)
{
    struct cfg c;
    fix_cfg_llama32(&c);
    c.rope_scaling.type = CFG_ROPE_DEFAULT;
    c.max_position_embeddings = 16;
    struct model a, b;
    CHECK_OK(fix_model_random(&a, &c, 0.3f, 95));
    c.rope_scaling = (struct cfg_rope_scaling){ CFG_ROPE_DYNAMIC, 4.0, 0, 0, 0 };
    CHECK_OK(fix_model_random(&b, &c, 0.3f, 95));
    int tok[17];
    fix_tokens(tok, 17, c.vocab_size, 96);
    CHECK_OK(model_plan(&a, 1, 16, 0, test_err()));
    CHECK_OK(model_plan(&b, 1, 16, 0, test_err()));
    CHECK_OK(model_forward(&a, NULL, tok, NULL, NULL, NULL, 0, NULL, test_err()));
    CHECK_OK(model_forward(&b, NULL, tok, NULL, NULL, NULL, 0, NULL, test_err()));
    CHECK(memcmp(model_logits(&a), model_logits(&b), sizeof(float) * 16 * (size_t)c.vocab_size) == 0);
    CHECK_OK(model_plan(&b, 1, 17, 0, test_err()));
    CHECK_INT(model_forward(&b, NULL, tok, NULL, NULL, NULL, 0, NULL, test_err()), LK_ERR_UNSUPPORTED);
    CHECK(strstr(test_errmsg(), "position 16") && strstr(test_errmsg(), "'dynamic'"));
    model_release(&a);
    model_release(&b);
}
