/*
 * test_diff.c - `lorakit diff` on constructed cases with known answers: a rank-3 change with a
 * chosen spectrum, identical and one-sided tensors, the subspace similarity of an adapter with
 * itself and of independent random adapters (against the random-subspace expectation), cosine
 * of a pure scaling, the amplification factor against a dense double-precision reference,
 * intruder dimensions, the factor paths under an allocation-size limit below one out x in
 * matrix, and the command end to end (table, JSON, runs database, usage errors).
 */
#include "test.h"

#include <cblas.h>
#include <cJSON.h>
#include <math.h>
#include <sqlite3.h>
#include <stdlib.h>
#include <string.h>

#include "../libcore/diff.h"
#include "../libcore/lora.h"
#include "../libcore/model.h"
#include "../libcore/st.h"
#include "../libcore/svd.h"
#include "fix_model.h"

static void randn(float *x, size_t n, struct lk_rng *rng, float scale)
{
    for (size_t i = 0; i < n; i++)
        x[i] = scale * lk_rng_normal(rng);
}

/* k orthonormal vectors of length d (Gram-Schmidt in double), as rows of out [k, d]. */
static void orthonormal_rows(float *out, int k, int d, struct lk_rng *rng)
{
    double *v = calloc((size_t)k * d, sizeof *v);
    for (int i = 0; i < k; i++) {
        double *x = v + (size_t)i * d;
        for (int j = 0; j < d; j++)
            x[j] = lk_rng_normal(rng);
        for (int p = 0; p < i; p++) {
            double dot = 0, *y = v + (size_t)p * d;
            for (int j = 0; j < d; j++)
                dot += x[j] * y[j];
            for (int j = 0; j < d; j++)
                x[j] -= dot * y[j];
        }
        double nn = 0;
        for (int j = 0; j < d; j++)
            nn += x[j] * x[j];
        for (int j = 0; j < d; j++) {
            x[j] /= sqrt(nn);
            out[(size_t)i * d + j] = (float)x[j];
        }
    }
    free(v);
}

static const struct diff_tensor *find_t(const struct diff *d, const char *name)
{
    for (int i = 0; i < d->n; i++)
        if (!strcmp(d->t[i].name, name))
            return &d->t[i];
    return NULL;
}

// ---- model vs model ----

#define QN "model.layers.0.self_attn.q_proj.weight"

TEST(diff_rank3_delta_reports_rank_3_and_missing_tensors)
{
    // W [48, 40] random; B's W = W + U diag(3, 2, 1) Vᵀ with orthonormal U, V: a known spectrum
    enum { M = 48, N = 40 };
    struct lk_rng rng;
    lk_rng_seed(&rng, 7);
    float *W = malloc(sizeof(float) * M * N), *W2 = malloc(sizeof(float) * M * N);
    float U[3 * M], V[3 * N], bias[M], only[6];
    randn(W, M * N, &rng, 0.1f);
    randn(bias, M, &rng, 1);
    randn(only, 6, &rng, 1);
    orthonormal_rows(U, 3, M, &rng);
    orthonormal_rows(V, 3, N, &rng);
    const double s[3] = { 3, 2, 1 };
    double dfro2 = 0, wfro2 = 0;
    for (int i = 0; i < M; i++)
        for (int j = 0; j < N; j++) {
            double dv = 0;
            for (int k = 0; k < 3; k++)
                dv += s[k] * U[k * M + i] * V[k * N + j];
            W2[i * N + j] = (float)(W[i * N + j] + dv);
            double dd = (double)W2[i * N + j] - W[i * N + j]; // the change actually stored
            dfro2 += dd * dd;
            wfro2 += (double)W[i * N + j] * W[i * N + j];
        }
    const char *a = test_path("a"), *b = test_path("b");
    CHECK_OK(lk_mkdir_p(a, test_err()));
    CHECK_OK(lk_mkdir_p(b, test_err()));
    struct st_item ia[] = {
        { QN, 2, { M, N }, W },
        { "model.layers.0.self_attn.q_proj.bias", 1, { M }, bias },
        { "only_a.weight", 2, { 2, 3 }, only },
    };
    struct st_item ib[] = {
        { QN, 2, { M, N }, W2 },
        { "model.layers.0.self_attn.q_proj.bias", 1, { M }, bias },
        { "only_b.weight", 1, { 6 }, only },
    };
    char *pa = lk_path_join(a, "model.safetensors"), *pb = lk_path_join(b, "model.safetensors");
    CHECK_OK(st_write_f32(pa, ia, 3, TENSOR_F32, test_err()));
    CHECK_OK(st_write_f32(pb, ib, 3, TENSOR_F32, test_err()));
    lk_free(pa);
    lk_free(pb);

    struct diff_opts o;
    diff_opts_init(&o);
    CHECK_OK(diff_energy_parse(&o, "0.5,0.9,1", test_err()));
    struct diff d;
    CHECK_OK(diff_run(&d, a, b, &o, test_err()));
    CHECK_INT(d.kind, DIFF_MODEL_MODEL);
    CHECK_INT(d.n, 4);
    const struct diff_tensor *t = find_t(&d, QN);
    CHECK(t && t->state == DIFF_CHANGED && t->has_stats && !t->from_factors);
    CHECK_INT(t->num_rank, 3);
    // energies 9, 4, 1 of 14: 64%, 93%, 100%
    CHECK_INT(t->energy_rank[0], 1);
    CHECK_INT(t->energy_rank[1], 2);
    CHECK_INT(t->energy_rank[2], 3);
    CHECK(t->eff_rank <= 3.0 + 1e-6);
    double H = 0;
    for (int k = 0; k < 3; k++)
        H -= s[k] / 6 * log(s[k] / 6);
    CHECK_NEAR(t->eff_rank, exp(H), 1e-4);
    CHECK_NEAR(t->fro, sqrt(dfro2), 1e-5);
    CHECK_NEAR(t->rel, sqrt(dfro2 / wfro2), 1e-5);
    CHECK_NEAR(t->spectral, 3, 1e-4);
    CHECK_NEAR(t->stable_rank, 14.0 / 9.0, 1e-4);
    CHECK_INT(t->n_top, 5);
    CHECK_NEAR(t->top[1], 2, 1e-4);
    CHECK_NEAR(t->top[2], 1, 1e-4);
    CHECK(t->top[3] < 1e-4);
    // rank 3 <= min/2: the amplification is defined; W is random so nothing intrudes into
    // its top directions from a change this large? (only its existence is checked here)
    CHECK_INT(t->amp_rank, 3);
    CHECK(t->intruders >= 0);
    CHECK_INT(find_t(&d, "model.layers.0.self_attn.q_proj.bias")->state, DIFF_UNCHANGED);
    CHECK_INT(find_t(&d, "only_a.weight")->state, DIFF_ONLY_A);
    CHECK_INT(find_t(&d, "only_b.weight")->state, DIFF_ONLY_B);
    diff_close(&d);
    free(W);
    free(W2);

    // the command lists the one-sided tensors and the totals
    CHECK_INT(test_sh("%s diff %s %s --energy 0.5,0.9,1", test_lorakit(), a, b), 0);
    CHECK(strstr(test_output(), "only in A  only_a.weight"));
    CHECK(strstr(test_output(), "only in B  only_b.weight"));
    CHECK(strstr(test_output(), "4 tensors: 1 changed, 1 unchanged, 2 on one side only"));
}

TEST(diff_identical_models_report_no_change)
{
    const char *a = test_path("m1"), *b = test_path("m2");
    CHECK_INT(test_sh("%s init --preset tiny --out %s --seed 3", test_lorakit(), a), 0);
    CHECK_INT(test_sh("%s init --preset tiny --out %s --seed 3", test_lorakit(), b), 0);
    struct diff_opts o;
    diff_opts_init(&o);
    struct diff d;
    CHECK_OK(diff_run(&d, a, b, &o, test_err()));
    CHECK(d.n > 10);
    for (int i = 0; i < d.n; i++)
        CHECK_MSG(d.t[i].state == DIFF_UNCHANGED && !d.t[i].has_stats, "%s is %s", d.t[i].name,
                  diff_state_str(d.t[i].state));
    struct diff_summary s;
    CHECK_OK(diff_summarize(&d, &s, test_err()));
    CHECK_INT(s.total.n_changed, 0);
    CHECK_INT(s.total.n_unchanged, d.n);
    diff_summary_release(&s);
    diff_close(&d);
    CHECK_INT(test_sh("%s diff %s %s", test_lorakit(), a, b), 0);
    CHECK(strstr(test_output(), " 0 changed, "));
}

// ---- two adapters, from the factors ----

TEST(diff_phi_of_a_change_with_itself_is_one_and_scaling_gives_cosine_one)
{
    enum { M = 60, N = 50, R = 8 };
    struct lk_rng rng;
    lk_rng_seed(&rng, 11);
    float B[M * R], A[R * N];
    randn(B, M * R, &rng, 1);
    randn(A, R * N, &rng, 1);
    struct diff_tensor t;
    memset(&t, 0, sizeof t);
    CHECK_OK(diff_factor_pair(M, N, R, 0.5f, B, A, R, 0.5f, B, A, &t, test_err()));
    CHECK_NEAR(t.cosine, 1, 1e-6);
    CHECK_INT(t.n_grid_a, 4); // 1, 2, 4, 8
    CHECK_INT(t.n_grid_b, 4);
    for (int i = 0; i < 4; i++) {
        CHECK_NEAR(t.phi_right[i * 4 + i], 1, 1e-5);
        CHECK_NEAR(t.phi_left[i * 4 + i], 1, 1e-5);
    }
    lk_free(t.phi_right);
    lk_free(t.phi_left);
    // the same change scaled (by alpha, or inside B): cosine 1
    float B2[M * R];
    for (int i = 0; i < M * R; i++)
        B2[i] = 3 * B[i];
    memset(&t, 0, sizeof t);
    CHECK_OK(diff_factor_pair(M, N, R, 0.5f, B, A, R, 2.0f, B2, A, &t, test_err()));
    CHECK_NEAR(t.cosine, 1, 1e-6);
    CHECK_NEAR(t.fro_b / t.fro_a, 12, 1e-5);
    lk_free(t.phi_right);
    lk_free(t.phi_left);
}

TEST(diff_phi_of_independent_random_adapters_matches_random_subspaces)
{
    // Two independent random rank-r changes in dimension d: E‖U_iᵀV_j‖_F² = i·j/d, so
    // φ(i, j) = ‖U_iᵀV_j‖_F² / min(i, j) ≈ max(i, j)/d (the "i·j/d" is the former).
    // Averaged over trials, both are checked within 15%.
    enum { D = 256, R = 16, TRIALS = 12 };
    struct lk_rng rng;
    lk_rng_seed(&rng, 5);
    float *B1 = malloc(sizeof(float) * D * R), *A1 = malloc(sizeof(float) * R * D);
    float *B2 = malloc(sizeof(float) * D * R), *A2 = malloc(sizeof(float) * R * D);
    double sum[5][5] = { { 0 } };
    int sizes[SVD_GRID_MAX];
    CHECK_INT(svd_grid_sizes(R, sizes), 5);
    for (int tr = 0; tr < TRIALS; tr++) {
        randn(B1, D * R, &rng, 1);
        randn(A1, R * D, &rng, 1);
        randn(B2, D * R, &rng, 1);
        randn(A2, R * D, &rng, 1);
        struct diff_tensor t;
        memset(&t, 0, sizeof t);
        CHECK_OK(diff_factor_pair(D, D, R, 1, B1, A1, R, 1, B2, A2, &t, test_err()));
        CHECK_INT(t.n_grid_a, 5);
        for (int a = 0; a < 5; a++)
            for (int b = 0; b < 5; b++)
                sum[a][b] += t.phi_right[a * 5 + b] / TRIALS;
        CHECK(fabs(t.cosine) < 0.2);
        lk_free(t.phi_right);
        lk_free(t.phi_left);
    }
    for (int a = 2; a < 5; a++)
        for (int b = 2; b < 5; b++) {
            double i = sizes[a], j = sizes[b];
            double phi = sum[a][b], overlap = phi * fmin(i, j);
            CHECK_MSG(fabs(phi - fmax(i, j) / D) < 0.15 * fmax(i, j) / D, "phi(%g,%g) = %g, want ~%g", i, j,
                      phi, fmax(i, j) / D);
            CHECK_MSG(fabs(overlap - i * j / D) < 0.15 * i * j / D, "|U_i'V_j|^2 (%g,%g) = %g, want ~%g", i,
                      j, overlap, i * j / D);
        }
    free(B1);
    free(A1);
    free(B2);
    free(A2);
}

/* Base (random tiny model) in dir/base, adapters written by the caller. */
static int save_base(const char *dir, const struct cfg *c, uint64_t seed)
{
    struct model m;
    int rc = fix_model_random(&m, c, 0.05f, seed);
    if (!rc)
        rc = model_save(&m, dir, TENSOR_F32, test_err());
    model_release(&m);
    return rc;
}

static int save_adapter(struct lora *l, const char *base, const char *dir)
{
    snprintf(l->cfg.base_model, sizeof l->cfg.base_model, "%s", base);
    return lora_save(l, dir, test_err());
}

TEST(diff_adapters_reparametrized_scaled_and_identical)
{
    struct cfg c;
    fix_cfg_qwen2(&c);
    const char *base = test_path("base");
    CHECK_OK(save_base(base, &c, 1));
    unsigned tg = (1u << CFG_Q) | (1u << CFG_V) | (1u << CFG_DOWN);
    struct lora l1, l2, l3;
    CHECK_OK(fix_lora_random(&l1, &c, tg, 4, 8, 0, 0, 21));
    CHECK_OK(fix_lora_random(&l2, &c, tg, 4, 8, 0, 0, 21));
    CHECK_OK(fix_lora_random(&l3, &c, tg, 4, 16, 0, 0, 21)); // alpha doubled: the same change x2
    // l2: B·D and D⁻¹·A, the same ΔW from other factors
    for (int k = 0; k < l2.n_mod; k++) {
        struct lora_module *md = &l2.mod[k];
        for (int i = 0; i < md->R; i++) {
            float dk = 0.5f + (float)i;
            for (int o = 0; o < md->out; o++)
                md->B[(size_t)o * md->R + i] *= dk;
            for (int j = 0; j < md->in; j++)
                md->A[(size_t)i * md->in + j] /= dk;
        }
    }
    const char *p1 = test_path("a1"), *p2 = test_path("a2"), *p3 = test_path("a3");
    CHECK_OK(save_adapter(&l1, base, p1));
    CHECK_OK(save_adapter(&l2, base, p2));
    CHECK_OK(save_adapter(&l3, base, p3));
    struct diff_opts o;
    diff_opts_init(&o);
    struct diff d;

    CHECK_OK(diff_run(&d, p1, p2, &o, test_err()));
    CHECK_INT(d.kind, DIFF_ADAPTER_ADAPTER);
    CHECK(d.have_base_weights);
    int n_adapted = 0;
    for (int i = 0; i < d.n; i++) {
        const struct diff_tensor *t = &d.t[i];
        if (!t->adapted) {
            CHECK_INT(t->state, DIFF_UNCHANGED);
            continue;
        }
        n_adapted++;
        CHECK(t->from_factors && t->factor_rank == 8);
        CHECK_MSG(t->rel < 1e-5, "%s: rel %g", t->name, t->rel);
        CHECK_NEAR(t->cosine, 1, 1e-5);
        CHECK(t->phi_right && t->n_grid_a == 3 && t->n_grid_b == 3);
        for (int a = 0; a < 3; a++)
            CHECK_MSG(t->phi_right[a * 3 + a] > 0.999, "%s phi(%d) = %g", t->name, a, t->phi_right[a * 3 + a]);
    }
    CHECK_INT(n_adapted, 3 * c.num_hidden_layers);
    diff_close(&d);

    CHECK_OK(diff_run(&d, p1, p3, &o, test_err()));
    for (int i = 0; i < d.n; i++)
        if (d.t[i].adapted) {
            CHECK_NEAR(d.t[i].cosine, 1, 1e-5);
            CHECK_NEAR(d.t[i].fro_b, 2 * d.t[i].fro_a, 1e-5);
            CHECK_NEAR(d.t[i].fro, d.t[i].fro_a, 1e-4); // 2ΔW - ΔW
        }
    diff_close(&d);

    CHECK_OK(diff_run(&d, p1, p1, &o, test_err()));
    for (int i = 0; i < d.n; i++) {
        CHECK_INT(d.t[i].state, DIFF_UNCHANGED);
        if (d.t[i].adapted)
            CHECK_NEAR(d.t[i].cosine, 1, 0);
    }
    diff_close(&d);
    lora_release(&l1);
    lora_release(&l2);
    lora_release(&l3);
}

// ---- amplification and intruders, against references ----

TEST(diff_amplification_aligned_small_random_large)
{
    enum { M = 48, N = 40 };
    // W = Σ σ_i e_i e_iᵀ, σ_i = 10·0.8^i: singular vectors are the canonical basis
    float *W = calloc(M * N, sizeof(float));
    for (int i = 0; i < N; i++)
        W[i * N + i] = 10.0f * powf(0.8f, (float)i);
    // aligned: ΔW = 2 e0 e0ᵀ + 1 e1 e1ᵀ -> U_rᵀ W V_rᵀ = diag(σ0, σ1)
    float B[M * 2] = { 0 }, A[2 * N] = { 0 };
    B[0 * 2 + 0] = 2;
    B[1 * 2 + 1] = 1;
    A[0 * N + 0] = 1;
    A[1 * N + 1] = 1;
    struct diff_opts o;
    diff_opts_init(&o);
    struct diff_tensor t;
    float U[M * 2], Vt[2 * N];
    memset(&t, 0, sizeof t);
    CHECK_OK(diff_factor_stats(M, N, 2, 1.0f, B, A, NAN, &o, &t, U, Vt, test_err()));
    CHECK_INT(t.num_rank, 2);
    double aligned;
    CHECK_OK(diff_amplification(M, N, W, 2, U, Vt, t.fro, &aligned, test_err()));
    CHECK_NEAR(aligned, sqrt(5.0) / sqrt(100.0 + 64.0), 1e-5);

    // random: compare with a dense reference (ΔW formed here, its SVD by sgesdd, products in double)
    struct lk_rng rng;
    lk_rng_seed(&rng, 3);
    randn(B, M * 2, &rng, 1);
    randn(A, 2 * N, &rng, 1);
    memset(&t, 0, sizeof t);
    CHECK_OK(diff_factor_stats(M, N, 2, 1.0f, B, A, NAN, &o, &t, U, Vt, test_err()));
    double amp;
    CHECK_OK(diff_amplification(M, N, W, 2, U, Vt, t.fro, &amp, test_err()));
    float *dW = malloc(sizeof(float) * M * N), U2[M * 2], S2[2], V2[2 * N];
    for (int i = 0; i < M; i++)
        for (int j = 0; j < N; j++)
            dW[i * N + j] = B[i * 2] * A[j] + B[i * 2 + 1] * A[N + j];
    CHECK_OK(svd_exact(M, N, dW, 2, U2, S2, V2, test_err()));
    double p2 = 0, f2 = 0;
    for (int a = 0; a < 2; a++)
        for (int b = 0; b < 2; b++) {
            double s = 0;
            for (int i = 0; i < M; i++)
                for (int j = 0; j < N; j++)
                    s += (double)U2[i * 2 + a] * W[i * N + j] * V2[b * N + j];
            p2 += s * s;
        }
    for (int i = 0; i < M * N; i++)
        f2 += (double)dW[i] * dW[i];
    CHECK_NEAR(amp, sqrt(f2) / sqrt(p2), 1e-3);
    CHECK_MSG(amp > 5 * aligned, "random %g vs aligned %g", amp, aligned);
    free(W);
    free(dW);
}

TEST(diff_intruders_zero_for_identical_positive_for_replaced_direction)
{
    enum { M = 64, N = 48 };
    float *W = calloc(M * N, sizeof(float)), *W2 = malloc(sizeof(float) * M * N);
    for (int i = 0; i < N; i++)
        W[i * N + i] = 10.0f - 0.2f * (float)i; // distinct values: the vectors are defined
    int count = -1;
    double minc;
    CHECK_OK(diff_intruders(M, N, W, W, 10, 0.5, &count, &minc, test_err()));
    CHECK_INT(count, 0);
    CHECK_NEAR(minc, 1, 1e-4);
    // replace the top direction e0 e0ᵀ by x yᵀ, x and y random unit vectors
    struct lk_rng rng;
    lk_rng_seed(&rng, 9);
    float x[M], y[N];
    orthonormal_rows(x, 1, M, &rng);
    orthonormal_rows(y, 1, N, &rng);
    memcpy(W2, W, sizeof(float) * M * N);
    W2[0] = 0;
    for (int i = 0; i < M; i++)
        for (int j = 0; j < N; j++)
            W2[i * N + j] += 10.0f * x[i] * y[j];
    CHECK_OK(diff_intruders(M, N, W, W2, 10, 0.5, &count, &minc, test_err()));
    CHECK_MSG(count >= 1 && count <= 2, "count %d", count);
    CHECK(minc < 0.5);
    free(W);
    free(W2);
}

// ---- never out x in: an allocation-size limit below one matrix ----

TEST(diff_factor_paths_never_allocate_out_by_in)
{
    // q_proj and v_proj are [1024, 1024]: 4 MB each as float; the limit is a quarter of that
    struct cfg c;
    fix_cfg_llama(&c);
    c.hidden_size = 1024;
    c.num_attention_heads = c.num_key_value_heads = 8;
    c.head_dim = 128;
    c.intermediate_size = 8;
    c.num_hidden_layers = 1;
    c.vocab_size = 8;
    const char *base = test_path("base");
    CHECK_OK(save_base(base, &c, 2));
    unsigned tg = (1u << CFG_Q) | (1u << CFG_V);
    struct lora l1, l2;
    CHECK_OK(fix_lora_random(&l1, &c, tg, 4, 8, 0, 0, 1));
    CHECK_OK(fix_lora_random(&l2, &c, tg, 4, 8, 0, 0, 2));
    const char *p1 = test_path("a1"), *p2 = test_path("a2");
    CHECK_OK(save_adapter(&l1, base, p1));
    CHECK_OK(save_adapter(&l2, base, p2));
    lora_release(&l1);
    lora_release(&l2);
    const size_t limit = (size_t)1024 * 1024 * sizeof(float) / 4;

    struct diff_opts o;
    diff_opts_init(&o);
    o.intruder_k = 0; // the one dense step, checked below
    struct diff d;
    // adapter vs adapter
    CHECK_OK(diff_open(&d, p1, p2, &o, test_err()));
    lk_alloc_limit = limit;
    lk_alloc_largest = 0;
    int rc = diff_compare(&d, &o, test_err());
    size_t largest = lk_alloc_largest;
    lk_alloc_limit = 0;
    CHECK_OK(rc);
    CHECK_MSG(largest <= limit, "largest allocation %zu", largest);
    const struct diff_tensor *t = find_t(&d, QN);
    CHECK(t && t->from_factors && t->num_rank == 8 && isfinite(t->rel) && isfinite(t->cosine) && t->phi_right);
    diff_close(&d);
    // base vs adapter, with the amplification (W read in row blocks)
    CHECK_OK(diff_open(&d, base, p1, &o, test_err()));
    CHECK_INT(d.kind, DIFF_BASE_ADAPTER);
    lk_alloc_limit = limit;
    rc = diff_compare(&d, &o, test_err());
    lk_alloc_limit = 0;
    CHECK_OK(rc);
    t = find_t(&d, QN);
    CHECK(t && t->from_factors && t->num_rank == 4 && t->amp_rank == 4 && isfinite(t->amplification));
    diff_close(&d);
    // control: the intruder check forms W + ΔW, so the same limit must refuse it
    o.intruder_k = 10;
    CHECK_OK(diff_open(&d, base, p1, &o, test_err()));
    lk_alloc_limit = limit;
    rc = diff_compare(&d, &o, test_err());
    lk_alloc_limit = 0;
    CHECK_INT(rc, LK_ERR_NOMEM);
    diff_close(&d);
}

// ---- the command ----

TEST(diff_cli_base_vs_adapter_json_and_runs_db)
{
    struct cfg c;
    fix_cfg_qwen2(&c);
    const char *base = test_path("base"), *ad = test_path("ad"), *db = test_path("runs.db");
    CHECK_OK(save_base(base, &c, 4));
    struct lora l;
    CHECK_OK(fix_lora_random(&l, &c, (1u << CFG_Q) | (1u << CFG_UP), 2, 4, 0, 0, 8));
    CHECK_OK(save_adapter(&l, base, ad));
    lora_release(&l);
    CHECK_INT(test_sh("%s diff %s %s --json --top 2 --runs %s", test_lorakit(), base, ad, db), 0);
    cJSON *j = cJSON_Parse(test_output());
    CHECK(j);
    CHECK(!strcmp(cJSON_GetObjectItem(j, "kind")->valuestring, "base-adapter"));
    int n_changed = 0, n = 0;
    cJSON *t;
    cJSON_ArrayForEach(t, cJSON_GetObjectItem(j, "tensors"))
    {
        n++;
        if (strcmp(cJSON_GetObjectItem(t, "state")->valuestring, "changed"))
            continue;
        n_changed++;
        CHECK(cJSON_IsTrue(cJSON_GetObjectItem(t, "from_factors")));
        CHECK_INT(cJSON_GetObjectItem(t, "num_rank")->valueint, 2);
        CHECK_INT(cJSON_GetArraySize(cJSON_GetObjectItem(t, "top")), 2);
        CHECK(cJSON_GetObjectItem(t, "amplification") && cJSON_GetObjectItem(t, "intruders"));
    }
    CHECK_INT(n_changed, 2 * c.num_hidden_layers);
    cJSON_Delete(j);
    sqlite3 *s;
    CHECK(sqlite3_open(db, &s) == SQLITE_OK);
    sqlite3_stmt *st;
    CHECK(sqlite3_prepare_v2(s, "SELECT (SELECT count(*) FROM tensor_stats), (SELECT count(*) FROM "
                                "tensor_stats WHERE energy_json IS NOT NULL AND extra_json LIKE '%amplification%'), "
                                "kind, status, summary_json FROM runs",
                             -1, &st, NULL) == SQLITE_OK);
    CHECK(sqlite3_step(st) == SQLITE_ROW);
    CHECK_INT(sqlite3_column_int(st, 0), n);
    CHECK_INT(sqlite3_column_int(st, 1), n_changed);
    CHECK(!strcmp((const char *)sqlite3_column_text(st, 2), "diff"));
    CHECK(!strcmp((const char *)sqlite3_column_text(st, 3), "done"));
    CHECK(strstr((const char *)sqlite3_column_text(st, 4), "\"total\""));
    sqlite3_finalize(st);
    sqlite3_close(s);
    // the table: the adapted tensors sorted first, the summaries
    CHECK_INT(test_sh("%s diff %s %s", test_lorakit(), base, ad), 0);
    CHECK(strstr(test_output(), "by module"));
    CHECK(strstr(test_output(), "by layer"));
    CHECK(strstr(test_output(), "  total "));
}

TEST(diff_cli_usage_and_bad_input)
{
    CHECK_INT(test_sh("%s diff --help", test_lorakit()), 0);
    CHECK(strstr(test_output(), "lorakit diff"));
    CHECK_INT(test_sh("%s diff onlyone", test_lorakit()), 2);
    CHECK_INT(test_sh("%s diff a b --energy 0.5,x", test_lorakit()), 2);
    CHECK(strstr(test_output(), "--energy"));
    CHECK_INT(test_sh("%s diff a b --top 1000", test_lorakit()), 2);
    const char *e = test_path("empty");
    CHECK_OK(lk_mkdir_p(e, test_err()));
    CHECK_INT(test_sh("%s diff %s %s", test_lorakit(), e, e), 1);
    CHECK(strstr(test_output(), "neither a model folder"));
    CHECK_INT(test_sh("%s diff %s/nope %s", test_lorakit(), e, e), 1);
}

TEST(diff_adapter_against_its_merged_model_is_rounding_only)
{
    // base + adapter (formed per tensor by diff) against a model holding base + s·B·A merged
    // here in double: only float rounding differs; a tensor the adapter leaves is unchanged
    struct cfg c;
    fix_cfg_llama(&c);
    const char *base = test_path("base"), *ad = test_path("ad"), *merged = test_path("merged");
    struct model m;
    CHECK_OK(fix_model_random(&m, &c, 0.05f, 6));
    CHECK_OK(model_save(&m, base, TENSOR_F32, test_err()));
    struct lora l;
    CHECK_OK(fix_lora_random(&l, &c, 1u << CFG_O, 3, 6, 0, 0, 4));
    CHECK_OK(save_adapter(&l, base, ad));
    for (int k = 0; k < l.n_mod; k++) {
        const struct lora_module *md = &l.mod[k];
        float *W = m.w.layer[md->layer].wo.f;
        for (int i = 0; i < md->out; i++)
            for (int j = 0; j < md->in; j++) {
                double s = 0;
                for (int r = 0; r < md->R; r++)
                    s += (double)md->B[i * md->R + r] * md->A[r * md->in + j];
                W[i * md->in + j] = (float)(W[i * md->in + j] + md->scale * s);
            }
    }
    CHECK_OK(model_save(&m, merged, TENSOR_F32, test_err()));
    model_release(&m);
    lora_release(&l);
    struct diff_opts o;
    diff_opts_init(&o);
    struct diff d;
    CHECK_OK(diff_run(&d, ad, merged, &o, test_err()));
    CHECK_INT(d.kind, DIFF_ADAPTER_MODEL);
    for (int i = 0; i < d.n; i++) {
        const struct diff_tensor *t = &d.t[i];
        if (t->module == CFG_O)
            CHECK_MSG(t->state == DIFF_UNCHANGED || t->rel < 1e-5, "%s: rel %g", t->name, t->rel);
        else
            CHECK_MSG(t->state == DIFF_UNCHANGED, "%s is %s", t->name, diff_state_str(t->state));
    }
    diff_close(&d);
}
