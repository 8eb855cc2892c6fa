/*
 * test_compress.c - svd-compress. Fine-tunes are built here with a known change (rank-k plus
 * noise, bias and norm changes) and written with model_save; the adapters made from them are
 * loaded back with lora_load and run with model_forward against the tuned model's logits. The
 * error against the Eckart-Young optimum is measured from the files (ΔW formed by the test,
 * spectrum by gesdd), rank reduction against the SVD of the formed product, and the CLI end to
 * end (table, --json, runs database, refusals).
 */
#include "test.h"

#include <cJSON.h>
#include <cblas.h>
#include <lapacke.h>
#include <math.h>
#include <regex.h>
#include <sqlite3.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "../libcore/compress.h"
#include "../libcore/lora.h"
#include "../libcore/model.h"
#include "../libcore/rdb.h"
#include "../libcore/st.h"
#include "../libcore/svd.h"
#include "fix_model.h"

// ---- fixtures ----

/* A unit vector of dimension d. */
static void unit(struct lk_rng *rng, float *v, int d)
{
    double s = 0;
    for (int i = 0; i < d; i++) {
        v[i] = lk_rng_normal(rng);
        s += (double)v[i] * v[i];
    }
    for (int i = 0; i < d; i++)
        v[i] = (float)(v[i] / sqrt(s));
}

struct change {
    int k;               /* rank of each linear's change (0: none); per module when kvar */
    int kvar;            /* 1: k + (layer * 7 + module) % 3 */
    float scale;         /* σ_1 of the change; σ_i = scale * (1 - 0.2 i) */
    float noise;         /* std of dense noise added on top */
    float bias;          /* std of q/k/v bias changes (0: none) */
    float other;         /* std of changes to lm_head, norms (0: none) */
};

/* tuned = base + the change, on every linear of the model. */
static void apply_change(struct model *t, const struct change *ch, uint64_t seed)
{
    struct lk_rng rng;
    lk_rng_seed(&rng, seed);
    struct model_tensor *ts;
    int n;
    LK_ASSERT(model_weights_tensors(&t->w, &t->cfg, &ts, &n, NULL) == 0);
    for (int i = 0; i < n; i++) {
        struct model_tensor *x = &ts[i];
        if (x->module >= 0 && !x->is_bias) {
            int m = (int)x->shape[0], c = (int)x->shape[1];
            int k = ch->k + (ch->kvar ? (x->layer * 7 + x->module) % 3 : 0);
            float *u = malloc(sizeof(float) * m), *v = malloc(sizeof(float) * c);
            for (int r = 0; r < k; r++) {
                unit(&rng, u, m);
                unit(&rng, v, c);
                float s = ch->scale * (1.0f - 0.2f * r);
                for (int a = 0; a < m; a++)
                    for (int b = 0; b < c; b++)
                        x->data[(size_t)a * c + b] += s * u[a] * v[b];
            }
            free(u);
            free(v);
            if (ch->noise > 0)
                for (size_t j = 0; j < x->numel; j++)
                    x->data[j] += ch->noise * lk_rng_normal(&rng);
        } else if (x->is_bias && ch->bias > 0) {
            for (size_t j = 0; j < x->numel; j++)
                x->data[j] += ch->bias * lk_rng_normal(&rng);
        } else if (x->module < 0 && ch->other > 0 && !strstr(x->name, "embed")) {
            for (size_t j = 0; j < x->numel; j++)
                x->data[j] += ch->other * lk_rng_normal(&rng);
        }
    }
    lk_free(ts);
}

/* Writes base ("b") and tuned ("t") folders in the test's folder; keeps the models. */
static int make_pair(const struct cfg *c, const struct change *ch, struct model *base, struct model *tuned)
{
    int rc = fix_model_random(base, c, 0.3f, 11);
    if (!rc)
        rc = fix_model_random(tuned, c, 0.3f, 11);
    if (rc)
        return rc;
    apply_change(tuned, ch, 12);
    if ((rc = model_save(base, test_path("b"), TENSOR_F32, test_err())))
        return rc;
    return model_save(tuned, test_path("t"), TENSOR_F32, test_err());
}

#define NB 2
#define NT 6

/* Logits of m (with lora, may be NULL) on fixed tokens, copied into out [NB*NT*V]. */
static int logits(struct model *m, const struct lora *l, float *out)
{
    int tok[NB * NT];
    fix_tokens(tok, NB * NT, m->cfg.vocab_size, 7);
    int rc = model_plan(m, NB, NT, 0, test_err());
    if (!rc)
        rc = model_forward(m, l, tok, NULL, NULL, NULL, 0, NULL, test_err());
    if (!rc)
        memcpy(out, model_logits(m), sizeof(float) * NB * NT * m->cfg.vocab_size);
    return rc;
}

static double dist(const float *a, const float *b, size_t n)
{
    double s = 0;
    for (size_t i = 0; i < n; i++)
        s += ((double)a[i] - b[i]) * ((double)a[i] - b[i]);
    return sqrt(s);
}

static double norm(const float *a, size_t n)
{
    double s = 0;
    for (size_t i = 0; i < n; i++)
        s += (double)a[i] * a[i];
    return sqrt(s);
}

// ---- the acceptance cases ----

TEST(cmp_energy_picks_the_known_rank_and_reproduces_logits)
{
    struct cfg c;
    fix_cfg_qwen2(&c);
    struct model base, tuned;
    struct change ch = { .k = 3, .scale = 1.0f, .noise = 0.002f };
    CHECK_OK(make_pair(&c, &ch, &base, &tuned));
    struct cmp_opts o;
    cmp_opts_init(&o);
    o.energy = 0.99;
    struct cmp_report rep;
    CHECK_OK(cmp_models(test_path("b"), test_path("t"), test_path("ad"), &o, &rep, test_err()));
    CHECK_INT(rep.n_linear, 7 * c.num_hidden_layers);
    double emax = 0;
    for (int i = 0; i < rep.n; i++) {
        CHECK_INT(rep.t[i].kind, CMP_LINEAR); // nothing else changed
        CHECK_MSG(rep.t[i].rank == 3, "%s: rank %d, want 3", rep.t[i].name, rep.t[i].rank);
        CHECK(rep.t[i].energy_kept >= 0.99 && rep.t[i].rel_error < 0.1);
        emax = fmax(emax, rep.t[i].rel_error);
    }
    CHECK_INT(rep.rank_common, 3);
    CHECK_INT(rep.n_rank_pattern, 0);
    CHECK(!rep.lora_bias);
    struct lora l;
    CHECK_OK(lora_load(&l, test_path("ad"), &c, test_err()));
    CHECK_INT(l.n_mod, 7 * c.num_hidden_layers);
    size_t nl = (size_t)NB * NT * c.vocab_size;
    float *l0 = malloc(sizeof(float) * nl), *l1 = malloc(sizeof(float) * nl), *la = malloc(sizeof(float) * nl);
    CHECK_OK(logits(&base, NULL, l0));
    CHECK_OK(logits(&tuned, NULL, l1));
    CHECK_OK(logits(&base, &l, la));
    // the adapter misses at most a fraction emax of each change; to first order the logits
    // then miss about that fraction of the change the fine-tune made to them
    double miss = dist(la, l1, nl), change = dist(l0, l1, nl);
    CHECK_MSG(miss <= 3 * emax * change + 1e-5 * norm(l1, nl), "logits miss %g, change %g, emax %g", miss,
              change, emax);
    CHECK(change > 0.1 * norm(l1, nl)); // the fine-tune did change the model
    // a rank-2 adapter (energy 0.5) misses visibly more: the check above can fail
    struct cmp_report r2;
    o.energy = 0.5;
    CHECK_OK(cmp_models(test_path("b"), test_path("t"), test_path("ad2"), &o, &r2, test_err()));
    struct lora l2;
    CHECK_OK(lora_load(&l2, test_path("ad2"), &c, test_err()));
    CHECK_OK(logits(&base, &l2, la));
    CHECK(dist(la, l1, nl) > 3 * miss);
    free(l0);
    free(l1);
    free(la);
    lora_release(&l);
    lora_release(&l2);
    cmp_report_release(&rep);
    cmp_report_release(&r2);
    model_release(&base);
    model_release(&tuned);
}

TEST(cmp_exact_low_rank_change_and_biases_match_logits_to_1e4)
{
    struct cfg c;
    fix_cfg_qwen2(&c);
    struct model base, tuned;
    struct change ch = { .k = 2, .scale = 0.8f, .bias = 0.1f };
    CHECK_OK(make_pair(&c, &ch, &base, &tuned));
    CHECK_INT(test_sh("%s svd-compress --base '%s' --tuned '%s' --out '%s' --rank 3 --quiet", test_lorakit(),
                      test_path("b"), test_path("t"), test_path("ad")), 0);
    CHECK(strstr(test_output(), "in lora_B.bias"));
    // adapter_config.json says lora_bias: true, r = alpha = 3
    char *text;
    size_t len;
    CHECK_OK(lk_read_file(test_path("ad/adapter_config.json"), &text, &len, test_err()));
    cJSON *j = cJSON_Parse(text);
    CHECK(j);
    CHECK(cJSON_IsTrue(cJSON_GetObjectItem(j, "lora_bias")));
    CHECK_INT(cJSON_GetObjectItem(j, "r")->valueint, 3);
    CHECK_INT(cJSON_GetObjectItem(j, "lora_alpha")->valueint, 3);
    cJSON_Delete(j);
    lk_free(text);
    struct lora l;
    CHECK_OK(lora_load(&l, test_path("ad"), &c, test_err()));
    // the q/k/v bias deltas are in lora_B.bias, the others are zero
    for (int k = 0; k < l.n_mod; k++) {
        struct lora_module *md = &l.mod[k];
        CHECK(md->bias && md->scale == 1.0f);
        const float *bb = md->module == CFG_Q ? base.w.layer[md->layer].bq : md->module == CFG_K ? base.w.layer[md->layer].bk
                          : md->module == CFG_V ? base.w.layer[md->layer].bv : NULL;
        const float *tb = md->module == CFG_Q ? tuned.w.layer[md->layer].bq : md->module == CFG_K ? tuned.w.layer[md->layer].bk
                          : md->module == CFG_V ? tuned.w.layer[md->layer].bv : NULL;
        for (int i = 0; i < md->out; i++)
            CHECK_NEAR(md->bias[i], bb ? tb[i] - bb[i] : 0.0f, 1e-6);
    }
    size_t nl = (size_t)NB * NT * c.vocab_size;
    float *l1 = malloc(sizeof(float) * nl), *la = malloc(sizeof(float) * nl), *l0 = malloc(sizeof(float) * nl);
    CHECK_OK(logits(&tuned, NULL, l1));
    CHECK_OK(logits(&base, &l, la));
    CHECK_OK(logits(&base, NULL, l0));
    double rel = dist(la, l1, nl) / norm(l1, nl);
    CHECK_MSG(rel <= 1e-4, "relative logits error %g", rel);
    CHECK(dist(l0, l1, nl) / norm(l1, nl) > 1e-2);
    free(l0);
    free(l1);
    free(la);
    lora_release(&l);
    model_release(&base);
    model_release(&tuned);
}

TEST(cmp_per_tensor_ranks_go_to_escaped_rank_patterns)
{
    struct cfg c;
    fix_cfg_qwen2(&c);
    struct model base, tuned;
    struct change ch = { .k = 1, .kvar = 1, .scale = 1.0f };
    CHECK_OK(make_pair(&c, &ch, &base, &tuned));
    struct cmp_opts o;
    cmp_opts_init(&o);
    o.energy = 0.999;
    struct cmp_report rep;
    CHECK_OK(cmp_models(test_path("b"), test_path("t"), test_path("ad"), &o, &rep, test_err()));
    CHECK(rep.n_rank_pattern > 0);
    struct lora l;
    CHECK_OK(lora_load(&l, test_path("ad"), &c, test_err()));
    for (int i = 0; i < rep.n; i++) {
        const struct cmp_tensor *t = &rep.t[i];
        CHECK_INT(t->rank, 1 + (t->layer * 7 + t->module) % 3);
        struct lora_module *md = lora_find(&l, t->layer, t->module);
        CHECK(md);
        CHECK_INT(md->R, t->rank);
        CHECK(md->scale == 1.0f); // alpha_pattern follows rank_pattern
    }
    // the keys are escaped full paths ...
    CHECK_INT(l.cfg.n_rank_pattern, rep.n_rank_pattern);
    for (int i = 0; i < l.cfg.n_rank_pattern; i++)
        CHECK(!strncmp(l.cfg.rank_pattern[i].key, "model\\.layers\\.", 15));
    // ... and each matches one module of a 12-layer model under PEFT's `(.*\.)?(key)$`
    char key[128];
    CHECK_OK(cmp_pattern_key("model.layers.1.mlp.down_proj", key, sizeof key));
    CHECK(!strcmp(key, "model\\.layers\\.1\\.mlp\\.down_proj"));
    char rx[256];
    snprintf(rx, sizeof rx, "^(.*\\.)?(%s)$", key);
    regex_t re;
    CHECK(regcomp(&re, rx, REG_EXTENDED | REG_NOSUB) == 0);
    int hits = 0;
    for (int ly = 0; ly < 12; ly++)
        for (int m = 0; m < CFG_N_MODULES; m++) {
            char p[96];
            cfg_module_path(ly, m, p, sizeof p);
            hits += regexec(&re, p, 0, NULL, 0) == 0;
        }
    CHECK(regexec(&re, "model.layers.1Xmlp.down_proj", 0, NULL, 0) != 0); // '.' is not a wildcard
    CHECK(regexec(&re, "base_model.model.model.layers.1.mlp.down_proj", 0, NULL, 0) == 0);
    regfree(&re);
    CHECK_INT(hits, 1);
    CHECK(cmp_pattern_key("a.b", key, 4) != 0); // too small a buffer is refused
    lora_release(&l);
    cmp_report_release(&rep);
    model_release(&base);
    model_release(&tuned);
}

TEST(cmp_sv_epsilon_and_max_rank_cap_ranks)
{
    struct cfg c;
    fix_cfg_qwen2(&c);
    struct model base, tuned;
    struct change ch = { .k = 3, .scale = 1.0f };
    CHECK_OK(make_pair(&c, &ch, &base, &tuned));
    struct cmp_opts o;
    cmp_opts_init(&o);
    o.rank = 8;
    o.sv_epsilon = 1e-3; // drops the float-rounding values beyond rank 3
    struct cmp_report rep;
    CHECK_OK(cmp_models(test_path("b"), test_path("t"), test_path("ad"), &o, &rep, test_err()));
    for (int i = 0; i < rep.n; i++) {
        CHECK_INT(rep.t[i].rank, 3);
        CHECK(rep.t[i].sigma_next <= 1e-3);
    }
    cmp_report_release(&rep);
    cmp_opts_init(&o);
    o.energy = 1.0;
    o.max_rank = 2;
    CHECK_OK(cmp_models(test_path("b"), test_path("t"), test_path("ad2"), &o, &rep, test_err()));
    for (int i = 0; i < rep.n; i++) {
        const struct cmp_tensor *t = &rep.t[i];
        CHECK_INT(t->rank, 2);
        // the third singular value is discarded: rel_error = σ_3 / ‖ΔW‖ for a rank-3 change
        CHECK_NEAR(t->rel_error, t->sigma_next / t->fro, 1e-4);
    }
    cmp_report_release(&rep);
    model_release(&base);
    model_release(&tuned);
}

/* Orthonormal rows: [r, d] (QR of a Gaussian d x r column-major matrix). */
static float *orth_rows(struct lk_rng *rng, int d, int r)
{
    float *Q = malloc(sizeof(float) * (size_t)d * r), *tau = malloc(sizeof(float) * (size_t)r);
    for (size_t i = 0; i < (size_t)d * r; i++)
        Q[i] = lk_rng_normal(rng);
    LAPACKE_sgeqrf(LAPACK_COL_MAJOR, d, r, Q, d, tau);
    LAPACKE_sorgqr(LAPACK_COL_MAJOR, d, r, r, Q, d, tau);
    free(tau);
    return Q;
}

/* The randomized path on a [rows, cols] linear (the q_proj or up_proj of a one-layer model
 * with hidden 896) whose change has σ_i = 0.3/i: the error of the stored B·A, measured by the
 * test from the files, within 1% of Eckart-Young's at rank 64. */
static void randomized_near_optimum(int up)
{
    struct cfg c;
    fix_cfg_qwen2(&c);
    c.hidden_size = 896;
    c.num_attention_heads = 14;
    c.num_key_value_heads = 2;
    c.head_dim = 64;
    c.intermediate_size = up ? 4864 : 32;
    c.num_hidden_layers = 1;
    c.vocab_size = 16;
    struct model base, tuned;
    CHECK_OK(fix_model_random(&base, &c, 0.02f, 1));
    CHECK_OK(fix_model_random(&tuned, &c, 0.02f, 1));
    float *W = up ? tuned.w.layer[0].wup.f : tuned.w.layer[0].wq.f;
    int m = up ? 4864 : 896, n = 896, mn = 896;
    struct lk_rng rng;
    lk_rng_seed(&rng, 5);
    float *Ut = orth_rows(&rng, m, mn), *Vt = orth_rows(&rng, n, mn);
    for (int i = 0; i < mn; i++)
        for (int a = 0; a < m; a++)
            Ut[(size_t)i * m + a] *= 0.3f / (float)(i + 1);
    float *D = malloc(sizeof(float) * (size_t)m * n);
    cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, m, n, mn, 1.0f, Ut, m, Vt, n, 0.0f, D, n);
    for (size_t i = 0; i < (size_t)m * n; i++)
        W[i] += D[i];
    free(Ut);
    free(Vt);
    CHECK_OK(model_save(&base, test_path("b"), TENSOR_F32, test_err()));
    CHECK_OK(model_save(&tuned, test_path("t"), TENSOR_F32, test_err()));
    // ΔW as stored (the files' rounding included), and its spectrum by gesdd
    const float *W0 = up ? base.w.layer[0].wup.f : base.w.layer[0].wq.f;
    for (size_t i = 0; i < (size_t)m * n; i++)
        D[i] = W[i] - W0[i];
    float *S = malloc(sizeof(float) * mn);
    CHECK_OK(svd_values(m, n, D, S, test_err()));
    double total = svd_fro2(m, n, D), opt = svd_trunc_error(S, 64, total);
    struct cmp_opts o;
    cmp_opts_init(&o);
    o.rank = 64;
    o.targets = 1u << (up ? CFG_UP : CFG_Q);
    o.svd.method = SVD_RANDOMIZED;
    struct cmp_report rep;
    CHECK_OK(cmp_models(test_path("b"), test_path("t"), test_path("ad"), &o, &rep, test_err()));
    CHECK_INT(rep.n_linear, 1);
    CHECK_INT(rep.t[0].method, SVD_RANDOMIZED);
    CHECK(rep.t[0].sigma_estimate);
    CHECK(rep.t[0].sigma_next <= S[64] * 1.0001 && rep.t[0].sigma_next >= 0.9 * S[64]);
    struct lora l;
    CHECK_OK(lora_load(&l, test_path("ad"), &c, test_err()));
    struct lora_module *md = lora_find(&l, 0, up ? CFG_UP : CFG_Q);
    CHECK(md && md->R == 64);
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, m, n, 64, -1.0f, md->B, 64, md->A, n, 1.0f, D, n);
    double got = sqrt(svd_fro2(m, n, D) / total);
    CHECK_MSG(got <= 1.01 * opt, "randomized error %g, optimum %g", got, opt);
    CHECK_NEAR(rep.t[0].rel_error, got, 1e-3);
    free(D);
    free(S);
    lora_release(&l);
    cmp_report_release(&rep);
    model_release(&base);
    model_release(&tuned);
}

TEST(cmp_randomized_within_1pct_of_optimum_896x896)
{
    randomized_near_optimum(0);
}

TEST(cmp_randomized_within_1pct_of_optimum_4864x896)
{
    if (!test_full())
        SKIP("full tier only (two 60 MB models)");
    randomized_near_optimum(1);
}

TEST(cmp_adapter_rank_reduction_equals_svd_of_the_product)
{
    struct cfg c;
    fix_cfg_qwen2(&c);
    struct lora in;
    CHECK_OK(fix_lora_random(&in, &c, (1u << CFG_N_MODULES) - 1, 6, 5.0, 1, 0.0f, 3));
    CHECK_OK(lora_save(&in, test_path("in"), test_err()));
    struct cmp_opts o;
    cmp_opts_init(&o);
    o.rank = 3;
    struct cmp_report rep;
    CHECK_OK(cmp_adapter(test_path("in"), test_path("out"), &o, &rep, test_err()));
    CHECK_INT(rep.n_linear, in.n_mod);
    struct lora red;
    CHECK_OK(lora_load(&red, test_path("out"), &c, test_err()));
    CHECK(!red.cfg.use_rslora);
    for (int k = 0; k < in.n_mod; k++) {
        const struct lora_module *a = &in.mod[k], *b = lora_find(&red, a->layer, a->module);
        CHECK(b && b->R == 3 && b->scale == 1.0f);
        int m = a->out, n = a->in, mn = m < n ? m : n;
        // the reference: s·B·A formed, its top 3 triplets by gesdd, U_3·S_3·Vt_3 formed
        float *P = malloc(sizeof(float) * m * n), *U = malloc(sizeof(float) * m * mn);
        float *S = malloc(sizeof(float) * mn), *Vt = malloc(sizeof(float) * mn * n);
        float *R = malloc(sizeof(float) * m * n), *Q = malloc(sizeof(float) * m * n);
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, m, n, a->R, a->scale, a->B, a->R, a->A, n, 0.0f, P, n);
        CHECK_OK(svd_exact(m, n, P, mn, U, S, Vt, test_err()));
        for (int i = 0; i < m; i++)
            for (int j = 0; j < 3; j++)
                U[i * mn + j] *= S[j];
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, m, n, 3, 1.0f, U, mn, Vt, n, 0.0f, R, n);
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, m, n, 3, 1.0f, b->B, 3, b->A, n, 0.0f, Q, n);
        double scale = S[0];
        for (int i = 0; i < m * n; i++)
            CHECK_MSG(fabs(Q[i] - R[i]) <= 1e-4 * scale, "module %d entry %d: %g vs %g", k, i, Q[i], R[i]);
        double kept = 0, tot = 0;
        for (int i = 0; i < mn; i++)
            tot += (double)S[i] * S[i], kept += i < 3 ? (double)S[i] * S[i] : 0;
        CHECK_NEAR(rep.t[k].energy_kept, kept / tot, 1e-4);
        CHECK_NEAR(rep.t[k].sigma_next, S[3], 1e-4 * scale);
        free(P);
        free(U);
        free(S);
        free(Vt);
        free(R);
        free(Q);
    }
    cmp_report_release(&rep);
    // by energy: 100% keeps rank 6 (never above the input's)
    cmp_opts_init(&o);
    o.energy = 1.0;
    CHECK_OK(cmp_adapter(test_path("in"), test_path("out6"), &o, &rep, test_err()));
    for (int k = 0; k < rep.n; k++)
        CHECK(rep.t[k].rank <= 6 && rep.t[k].rel_error < 1e-3);
    cmp_report_release(&rep);
    lora_release(&red);
    lora_release(&in);
}

TEST(cmp_adapter_rank_reduction_cli_keeps_bias_scaled)
{
    struct cfg c;
    fix_cfg_qwen2(&c);
    struct lora in;
    struct lora_config lc;
    lora_config_default(&lc);
    lc.r = 4;
    lc.alpha = 8; // scale 2
    lc.lora_bias = 1;
    CHECK_OK(lora_init(&in, &lc, &c, test_err()));
    struct lk_rng rng;
    lk_rng_seed(&rng, 4);
    for (size_t i = 0; i < in.n; i++)
        in.mem[i] = 0.3f * lk_rng_normal(&rng);
    CHECK_OK(lora_save(&in, test_path("in"), test_err()));
    CHECK_INT(test_sh("%s svd-compress --adapter '%s' --out '%s' --rank 4 --json --quiet", test_lorakit(),
                      test_path("in"), test_path("out")), 0);
    cJSON *j = cJSON_Parse(test_output());
    CHECK(j && cJSON_GetObjectItem(j, "totals"));
    cJSON_Delete(j);
    struct lora red;
    CHECK_OK(lora_load(&red, test_path("out"), &c, test_err()));
    // rank kept: the same change, scale 1, so the bias doubled
    struct model mb;
    CHECK_OK(fix_model_random(&mb, &c, 0.3f, 2));
    size_t nl = (size_t)NB * NT * c.vocab_size;
    float *la = malloc(sizeof(float) * nl), *lb = malloc(sizeof(float) * nl);
    CHECK_OK(logits(&mb, &in, la));
    CHECK_OK(logits(&mb, &red, lb));
    CHECK_MSG(dist(la, lb, nl) <= 1e-5 * norm(la, nl), "logits differ by %g", dist(la, lb, nl) / norm(la, nl));
    CHECK_NEAR(red.mod[0].bias[0], 2 * in.mod[0].bias[0], 1e-6);
    free(la);
    free(lb);
    lora_release(&red);
    lora_release(&in);
    model_release(&mb);
}

/* An adapter folder from raw pieces (q_proj of layer 0, rank 2, hidden 16) plus one tensor. */
static void write_raw_adapter(const char *dir, const char *config, const char *extra_name)
{
    static const float z[64];
    struct st_item it[3] = {
        { "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight", 2, { 2, 16 }, z },
        { "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight", 2, { 16, 2 }, z },
        { extra_name, 1, { 4 }, z },
    };
    CHECK_OK(lk_mkdir_p(dir, test_err()));
    char p[1024];
    snprintf(p, sizeof p, "%s/adapter_config.json", dir);
    CHECK_OK(lk_write_file_atomic(p, config, strlen(config), test_err()));
    snprintf(p, sizeof p, "%s/adapter_model.safetensors", dir);
    CHECK_OK(st_write_f32(p, it, extra_name ? 3 : 2, TENSOR_F32, test_err()));
}

TEST(cmp_adapter_reads_through_the_one_adapter_reader)
{
    static const char *cfg = "{\"peft_type\":\"LORA\",\"r\":2,\"lora_alpha\":4,\"target_modules\":[\"q_proj\"]}";
    struct cmp_opts o;
    cmp_opts_init(&o);
    o.rank = 1;
    struct cmp_report rep;
    struct lk_err err = { 0 };
    // a tensor the reader does not know: refused as lora_load refuses it, nothing written
    write_raw_adapter(test_path("junk"), cfg, "junk.weight");
    CHECK(cmp_adapter(test_path("junk"), test_path("out"), &o, &rep, &err) == LK_ERR_FORMAT);
    CHECK_MSG(strstr(err.msg, "junk/adapter_model.safetensors: unknown adapter tensor 'junk.weight'"), "%s", err.msg);
    cmp_report_release(&rep);
    CHECK(!lk_file_exists(test_path("out")));
    // a lora_B.bias the config does not announce
    memset(&err, 0, sizeof err);
    write_raw_adapter(test_path("bias"), cfg, "base_model.model.model.layers.0.self_attn.q_proj.lora_B.bias");
    CHECK(cmp_adapter(test_path("bias"), test_path("out"), &o, &rep, &err) == LK_ERR_FORMAT);
    CHECK_MSG(strstr(err.msg, "no \"lora_bias\": true"), "%s", err.msg);
    cmp_report_release(&rep);
    CHECK(!lk_file_exists(test_path("out")));
    // the same factors alone: reduced to rank 1
    write_raw_adapter(test_path("ok"), cfg, NULL);
    CHECK_OK(cmp_adapter(test_path("ok"), test_path("out"), &o, &rep, test_err()));
    CHECK_INT(rep.n_linear, 1);
    CHECK_INT(rep.t[0].rank, 1);
    cmp_report_release(&rep);
    struct lora_file lf;
    CHECK_OK(lora_file_open(&lf, test_path("out"), test_err()));
    CHECK(lf.n_mod == 1 && lf.mod[0].R == 1 && lf.mod[0].in == 16 && lf.mod[0].out == 16);
    lora_file_close(&lf);
}

TEST(cmp_keep_other_round_trip_and_report_of_what_is_left_out)
{
    struct cfg c;
    fix_cfg_llama(&c); // untied: lm_head can be a modules_to_save tensor
    struct model base, tuned;
    struct change ch = { .k = 2, .scale = 0.5f, .other = 0.05f };
    CHECK_OK(make_pair(&c, &ch, &base, &tuned));
    struct cmp_opts o;
    cmp_opts_init(&o);
    o.rank = 2;
    struct cmp_report rep;
    CHECK_OK(cmp_models(test_path("b"), test_path("t"), test_path("ad"), &o, &rep, test_err()));
    // lm_head, model.norm, two norms per layer: changed, listed, left out
    int other = 2 + 2 * c.num_hidden_layers;
    CHECK_INT(rep.n_other_changed, other);
    CHECK_INT(rep.n_left_out, other);
    cmp_report_release(&rep);
    struct lora l;
    CHECK_OK(lora_load(&l, test_path("ad"), &c, test_err()));
    CHECK_INT(l.n_extra, 0);
    lora_release(&l);
    o.keep_other = 1;
    CHECK_OK(cmp_models(test_path("b"), test_path("t"), test_path("ad2"), &o, &rep, test_err()));
    CHECK_INT(rep.n_left_out, 0);
    CHECK_OK(lora_load(&l, test_path("ad2"), &c, test_err()));
    CHECK_INT(l.n_extra, other);
    CHECK_INT(l.cfg.n_modules_to_save, other);
    int saw_head = 0;
    for (int i = 0; i < l.cfg.n_modules_to_save; i++)
        saw_head |= !strcmp(l.cfg.modules_to_save[i], "lm_head");
    CHECK(saw_head);
    size_t nl = (size_t)NB * NT * c.vocab_size;
    float *l1 = malloc(sizeof(float) * nl), *la = malloc(sizeof(float) * nl);
    CHECK_OK(logits(&tuned, NULL, l1));
    CHECK_OK(model_apply_extras(&base, &l, test_err()));
    CHECK_OK(logits(&base, &l, la));
    CHECK_MSG(dist(la, l1, nl) <= 1e-4 * norm(l1, nl), "relative logits error %g", dist(la, l1, nl) / norm(l1, nl));
    free(l1);
    free(la);
    lora_release(&l);
    cmp_report_release(&rep);
    model_release(&base);
    model_release(&tuned);
}

TEST(cmp_refuses_mismatched_models_and_existing_output)
{
    CHECK_INT(test_sh("%s init --preset tiny --seed 1 --out '%s'", test_lorakit(), test_path("b")), 0);
    CHECK_INT(test_sh("%s init --preset llama-tiny --seed 1 --out '%s'", test_lorakit(), test_path("l")), 0);
    CHECK_INT(test_sh("%s svd-compress --base '%s' --tuned '%s' --out '%s' --rank 2 --quiet", test_lorakit(),
                      test_path("b"), test_path("l"), test_path("ad")), 1);
    CHECK(strstr(test_output(), "LlamaForCausalLM"));
    CHECK(!lk_file_exists(test_path("ad")));
    // same config, one tensor missing from the tuned file
    struct st_file f;
    char *src = lk_path_join(test_path("b"), "model.safetensors");
    CHECK_OK(st_open(&f, src, test_err()));
    struct st_item *it = calloc((size_t)f.n, sizeof *it);
    float **bufs = calloc((size_t)f.n, sizeof *bufs);
    int ni = 0;
    for (int i = 0; i < f.n; i++) {
        if (!strcmp(f.t[i].name, "model.layers.1.mlp.up_proj.weight"))
            continue;
        bufs[ni] = malloc(sizeof(float) * f.t[i].numel);
        CHECK_OK(st_tensor_to_f32(&f.t[i], bufs[ni], test_err()));
        it[ni].name = f.t[i].name;
        it[ni].ndim = f.t[i].ndim;
        memcpy(it[ni].shape, f.t[i].shape, sizeof it[ni].shape);
        it[ni].data = bufs[ni];
        ni++;
    }
    CHECK_INT(test_sh("mkdir -p '%s' && cp '%s/config.json' '%s/'", test_path("t"), test_path("b"), test_path("t")), 0);
    char *dst = lk_path_join(test_path("t"), "model.safetensors");
    CHECK_OK(st_write_f32(dst, it, ni, TENSOR_F32, test_err()));
    st_close(&f);
    CHECK_INT(test_sh("%s svd-compress --base '%s' --tuned '%s' --out '%s' --rank 2 --quiet", test_lorakit(),
                      test_path("b"), test_path("t"), test_path("ad")), 1);
    CHECK(strstr(test_output(), "'model.layers.1.mlp.up_proj.weight' is missing"));
    CHECK(!lk_file_exists(test_path("ad")));
    // same model twice: nothing changed, nothing to compress
    CHECK_INT(test_sh("%s svd-compress --base '%s' --tuned '%s' --out '%s' --rank 2 --quiet", test_lorakit(),
                      test_path("b"), test_path("b"), test_path("ad")), 2);
    CHECK(strstr(test_output(), "nothing to compress"));
    // an existing output folder: refused without --overwrite, replaced with it
    CHECK_INT(test_sh("%s init --preset tiny --seed 2 --out '%s'", test_lorakit(), test_path("t2")), 0);
    CHECK_INT(test_sh("mkdir -p '%s' && echo x > '%s/keep'", test_path("ad"), test_path("ad")), 0);
    CHECK_INT(test_sh("%s svd-compress --base '%s' --tuned '%s' --out '%s' --rank 2 --quiet", test_lorakit(),
                      test_path("b"), test_path("t2"), test_path("ad")), 1);
    CHECK(strstr(test_output(), "--overwrite"));
    CHECK(lk_file_exists(test_path("ad/keep")));
    CHECK_INT(test_sh("%s svd-compress --base '%s' --tuned '%s' --out '%s' --rank 2 --quiet --overwrite",
                      test_lorakit(), test_path("b"), test_path("t2"), test_path("ad")), 0);
    CHECK(!lk_file_exists(test_path("ad/keep")));
    CHECK(lk_file_exists(test_path("ad/adapter_model.safetensors")));
    // usage errors
    CHECK_INT(test_sh("%s svd-compress --base '%s' --tuned '%s' --out '%s' --rank 2 --energy 0.5", test_lorakit(),
                      test_path("b"), test_path("t2"), test_path("x")), 2);
    CHECK_INT(test_sh("%s svd-compress --base '%s' --tuned '%s' --out '%s' --energy 1.5", test_lorakit(),
                      test_path("b"), test_path("t2"), test_path("x")), 2);
    CHECK_INT(test_sh("%s svd-compress --base '%s' --tuned '%s' --out '%s' --rank abc", test_lorakit(),
                      test_path("b"), test_path("t2"), test_path("x")), 2);
    for (int i = 0; i < ni; i++)
        free(bufs[i]);
    free(bufs);
    free(it);
    lk_free(src);
    lk_free(dst);
}

TEST(cmp_cli_prints_table_json_and_records_the_run)
{
    CHECK_INT(test_sh("%s init --preset tiny --seed 1 --out '%s'", test_lorakit(), test_path("b")), 0);
    CHECK_INT(test_sh("%s init --preset tiny --seed 2 --out '%s'", test_lorakit(), test_path("t")), 0);
    CHECK_INT(test_sh("%s svd-compress --help", test_lorakit()), 0);
    CHECK(strstr(test_output(), "--sv-epsilon") && strstr(test_output(), "lorakit svd-compress --base"));
    CHECK_INT(test_sh("%s svd-compress --base '%s' --tuned '%s' --out '%s' --energy 0.5 --targets q_proj,down_proj "
                      "--runs '%s' --quiet", test_lorakit(), test_path("b"), test_path("t"), test_path("ad"),
                      test_path("runs.db")), 0);
    const char *out = test_output();
    CHECK(strstr(out, "model.layers.1.mlp.down_proj.weight"));
    CHECK(strstr(out, "LEFT OUT (not in --targets)"));
    CHECK(strstr(out, "model.embed_tokens.weight") && strstr(out, "use --keep-other"));
    CHECK(strstr(out, "energy kept overall"));
    CHECK_INT(test_sh("%s svd-compress --base '%s' --tuned '%s' --out '%s' --rank 4 --json --runs '%s' --quiet",
                      test_lorakit(), test_path("b"), test_path("t"), test_path("ad2"), test_path("runs.db")), 0);
    cJSON *j = cJSON_Parse(test_output());
    CHECK(j);
    cJSON *tot = cJSON_GetObjectItem(j, "totals"), *ts = cJSON_GetObjectItem(j, "tensors");
    CHECK(tot && ts);
    int nt = cJSON_GetArraySize(ts);
    CHECK_INT(cJSON_GetObjectItem(tot, "linears")->valueint, 14);
    CHECK_INT(cJSON_GetObjectItem(tot, "adapter_params")->valuedouble,
              4 * 2 * (64 + 64 + 64 + 32 + 64 + 32 + 64 + 64 + 3 * (176 + 64)) + 2 * (64 + 32 + 32 + 64 + 176 + 176 + 64));
    cJSON_Delete(j);
    // the runs database: two runs of kind svd-compress, one row per reported tensor
    struct rdb db;
    CHECK_OK(rdb_open_readonly(&db, test_path("runs.db"), test_err()));
    struct rdb_run *runs;
    int n;
    CHECK_OK(rdb_runs_list(&db, 0, &runs, &n, test_err()));
    CHECK_INT(n, 2);
    CHECK(!strcmp(runs[0].kind, "svd-compress") && !strcmp(runs[0].status, "done"));
    CHECK(runs[0].summary_json && strstr(runs[0].summary_json, "energy_kept"));
    sqlite3_stmt *st;
    CHECK(sqlite3_prepare_v2(db.db, "SELECT count(*), sum(rank IS NOT NULL) FROM tensor_stats WHERE run_id = ?", -1,
                             &st, NULL) == SQLITE_OK);
    sqlite3_bind_int64(st, 1, runs[0].id);
    CHECK(sqlite3_step(st) == SQLITE_ROW);
    CHECK_INT(sqlite3_column_int(st, 0), nt);
    CHECK_INT(sqlite3_column_int(st, 1), 14);
    sqlite3_finalize(st);
    rdb_runs_free(runs, n);
    rdb_close(&db, NULL);
}

TEST(cmp_allocation_failures_are_clean)
{
    struct cfg c;
    fix_cfg_qwen2(&c);
    struct model base, tuned;
    struct change ch = { .k = 2, .scale = 0.5f, .bias = 0.1f, .other = 0.01f };
    CHECK_OK(make_pair(&c, &ch, &base, &tuned));
    struct lora in;
    CHECK_OK(fix_lora_random(&in, &c, (1u << CFG_N_MODULES) - 1, 4, 8.0, 0, 0.0f, 3));
    CHECK_OK(lora_save(&in, test_path("in"), test_err()));
    lora_release(&in);
    // the Nth allocation fails, for every N until a run makes fewer than N allocations: LK_ERR_NOMEM
    // and no output, or (a failure the code recovers from) the right result; leaks show under the
    // sanitizer build
    for (int which = 0; which < 2; which++) {
        int done = 0;
        for (long n = 1; n < 5000 && !done; n++) {
            struct cmp_opts o;
            cmp_opts_init(&o);
            o.energy = which ? 0.9 : 0;
            o.rank = which ? 0 : 2;
            o.keep_other = 1;
            o.overwrite = 1;
            struct cmp_report rep;
            struct lk_err e = { 0 };
            lk_fail_countdown = n;
            int rc = which ? cmp_adapter(test_path("in"), test_path("out"), &o, &rep, &e)
                           : cmp_models(test_path("b"), test_path("t"), test_path("out"), &o, &rep, &e);
            int injected = lk_fail_countdown == 0; // the countdown reached the Nth allocation
            lk_fail_countdown = 0;
            cmp_report_release(&rep);
            CHECK_MSG(rc == LK_OK || rc == LK_ERR_NOMEM, "allocation %ld: status %d: %s", n, rc, e.msg);
            char tmp[64];
            snprintf(tmp, sizeof tmp, "out.tmp.%ld", (long)getpid());
            CHECK_MSG(!lk_file_exists(test_path(tmp)), "allocation %ld: temporary folder left behind", n);
            snprintf(tmp, sizeof tmp, "out.old.%ld", (long)getpid()); // the replaced folder, removed
            CHECK_MSG(!lk_file_exists(test_path(tmp)), "allocation %ld: the old folder left behind", n);
            if (rc == LK_OK)
                CHECK_MSG(lk_file_exists(test_path("out/adapter_model.safetensors")),
                          "allocation %ld: success without the adapter", n);
            done = rc == LK_OK && !injected;
        }
        CHECK(done);
    }
    model_release(&base);
    model_release(&tuned);
}
