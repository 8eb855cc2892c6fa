/*
 * test_merge.c - `lorakit merge` and libcore/merge.h against independent references: the
 * engine's base+adapter forward (f32 within 1e-5 relative), weights recomputed in double and
 * rounded once (bf16), the sum of adapter changes (cat, svd at full rank), TIES / DARE on
 * hand-worked 2x3 cases, subtract, sharded output with the base's shards and index, tied
 * embeddings untied, DoRA by hand, and every refusal leaving no output.
 */
#include "test.h"

#include <cJSON.h>
#include <dirent.h>
#include <fcntl.h>
#include <math.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "../libcore/lora.h"
#include "../libcore/merge.h"
#include "../libcore/model.h"
#include "../libcore/rdb.h"
#include "../libcore/st.h"
#include "../libcore/tensor.h"
#include "fix_model.h"

#define ALL_MODULES ((1u << CFG_N_MODULES) - 1)
#define QKV ((1u << CFG_Q) | (1u << CFG_K) | (1u << CFG_V))

// ---- helpers ----

/* test_path() rotates 8 buffers: paths kept across calls get their own. */
#define PATHVAR(var, name)                                                                         \
    char var[1024];                                                                                \
    snprintf(var, sizeof var, "%s/%s", test_tmpdir(), name)

/* A random tiny Qwen2 (tied, q/k/v biases) or Llama (untied) model folder. */
static int save_model(const char *dir, int llama, int dtype, uint64_t seed)
{
    struct cfg c;
    if (llama)
        fix_cfg_llama(&c);
    else
        fix_cfg_qwen2(&c);
    struct model m;
    int rc = fix_model_random(&m, &c, 0.3f, seed);
    if (!rc)
        rc = model_save(&m, dir, dtype, test_err());
    model_release(&m);
    return rc;
}

/* A random adapter (A, B ~ 0.5 N(0, 1), scaled down by k) saved to dir. */
static int save_adapter(const char *dir, const struct cfg *c, unsigned targets, int R, double alpha,
                        int rslora, int bias, uint64_t seed, float k)
{
    struct lora l;
    struct lora_config lc;
    lora_config_default(&lc);
    lc.targets = targets;
    lc.r = R;
    lc.alpha = alpha;
    lc.use_rslora = rslora;
    lc.lora_bias = bias;
    int rc = lora_init(&l, &lc, c, test_err());
    if (rc)
        return rc;
    struct lk_rng rng;
    lk_rng_seed(&rng, seed);
    for (size_t i = 0; i < l.n; i++)
        l.mem[i] = 0.5f * k * lk_rng_normal(&rng);
    rc = lora_save(&l, dir, test_err());
    lora_release(&l);
    return rc;
}

/* One tensor of a model folder in float32 (heap, caller frees), NULL if absent. */
static float *read_tensor(const char *dir, const char *name, size_t *n)
{
    struct st_model sm;
    if (st_model_open(&sm, dir, test_err()))
        return NULL;
    const struct st_tensor *t = st_model_find(&sm, name, NULL);
    float *out = t ? malloc(sizeof(float) * (t->numel ? t->numel : 1)) : NULL;
    if (out) {
        st_tensor_to_f32(t, out, test_err());
        if (n)
            *n = t->numel;
    }
    st_model_close(&sm);
    return out;
}

/* 1 when tensor `name` has the same dtype, shape and bytes in both folders. */
static int same_bytes(const char *a, const char *b, const char *name)
{
    struct st_model x, y;
    if (st_model_open(&x, a, test_err()))
        return 0;
    if (st_model_open(&y, b, test_err())) {
        st_model_close(&x);
        return 0;
    }
    const struct st_tensor *s = st_model_find(&x, name, NULL), *t = st_model_find(&y, name, NULL);
    int same = s && t && s->dtype == t->dtype && s->nbytes == t->nbytes && !memcmp(s->data, t->data, s->nbytes);
    st_model_close(&x);
    st_model_close(&y);
    return same;
}

#define PB 2
#define PT 6

/* Logits [PB * PT * V] of a model folder (with an adapter folder, or none). Heap. */
static float *logits_of(const char *dir, const char *adapter, int *V)
{
    struct model m;
    struct lora l = { 0 };
    if (model_load(&m, dir, test_err()))
        return NULL;
    float *out = NULL;
    int tok[PB * PT];
    fix_tokens(tok, PB * PT, m.cfg.vocab_size, 77);
    if (adapter && (lora_load(&l, adapter, &m.cfg, test_err()) || model_apply_extras(&m, &l, test_err())))
        goto done;
    if (model_plan(&m, PB, PT, 0, test_err()) ||
        model_forward(&m, adapter ? &l : NULL, tok, NULL, NULL, NULL, 0, NULL, test_err()))
        goto done;
    *V = m.cfg.vocab_size;
    size_t n = (size_t)PB * PT * (size_t)*V;
    out = malloc(sizeof(float) * n);
    memcpy(out, model_logits(&m), sizeof(float) * n);
done:
    lora_release(&l);
    model_release(&m);
    return out;
}

/* max |a - b| / max |b| */
static double rel_diff(const float *a, const float *b, size_t n)
{
    double mx = 0, big = 0;
    for (size_t i = 0; i < n; i++) {
        mx = fmax(mx, fabs((double)a[i] - b[i]));
        big = fmax(big, fabs((double)b[i]));
    }
    return mx / big;
}

static void opts_one(struct merge_opts *o, const char *model, const char *adapter, const char *out)
{
    memset(o, 0, sizeof *o);
    o->model = model;
    o->out = out;
    o->dtype = -1;
    o->n_adapters = 1;
    o->adapters[0].dir = adapter;
    o->adapters[0].weight = 1.0;
}

/* s * B * A of module (layer, m) of an adapter folder, in double, into out [rows * cols]. */
static int dense_delta(const char *adir, const struct cfg *c, int layer, int m, double w, double *out)
{
    struct lora l;
    if (lora_load(&l, adir, c, test_err()))
        return -1;
    const struct lora_module *md = lora_find(&l, layer, m);
    if (md)
        for (int o = 0; o < md->out; o++)
            for (int i = 0; i < md->in; i++) {
                double s = 0;
                for (int r = 0; r < md->R; r++)
                    s += (double)md->B[(size_t)o * md->R + r] * md->A[(size_t)r * md->in + i];
                out[(size_t)o * md->in + i] += w * md->scale * s;
            }
    lora_release(&l);
    return md ? 0 : -1;
}

/* No entry of dir's parent folder starts with the base name of dir (no output, no temp). */
static int no_output(const char *dir)
{
    char parent[1024];
    snprintf(parent, sizeof parent, "%s", dir);
    char *slash = strrchr(parent, '/');
    *slash = 0;
    const char *base = slash + 1;
    DIR *d = opendir(parent);
    struct dirent *e;
    int found = 0;
    while ((e = readdir(d)))
        found |= !strncmp(e->d_name, base, strlen(base));
    closedir(d);
    return !found;
}

// ---- exactness ----

TEST(merge_f32_equals_base_plus_adapter)
{
    PATHVAR(base, "base");
    PATHVAR(ad, "ad");
    PATHVAR(out, "out");
    CHECK_OK(save_model(base, 0, TENSOR_F32, 1));
    struct cfg c;
    fix_cfg_qwen2(&c);
    CHECK_OK(save_adapter(ad, &c, ALL_MODULES, 4, 8, 1, 0, 2, 0.5f));
    struct merge_opts o;
    opts_one(&o, base, ad, out);
    o.verify = 1;
    struct merge_report rep;
    CHECK_OK(merge_run(&o, &rep, test_err()));
    int V;
    float *ref = logits_of(base, ad, &V), *got = logits_of(out, NULL, &V), *plain = logits_of(base, NULL, &V);
    CHECK(ref && got && plain);
    size_t n = (size_t)PB * PT * V;
    double r = rel_diff(got, ref, n);
    CHECK_MSG(r <= 1e-5, "merged vs base+adapter: relative %g", r);
    CHECK(rel_diff(plain, ref, n) > 1e-2); // the adapter matters
    // the command's own check agrees, against the engine's forward
    CHECK(rep.verified && strstr(rep.verify_ref, "engine"));
    CHECK(rep.verify_max_rel <= 1e-5 && rep.round_max_abs == 0.0);
    // norms are copied byte for byte; projections are not
    CHECK(same_bytes(base, out, "model.norm.weight"));
    CHECK(same_bytes(base, out, "model.layers.1.post_attention_layernorm.weight"));
    CHECK(!same_bytes(base, out, "model.layers.0.mlp.down_proj.weight"));
    CHECK_INT(rep.n_changed, 2 * 7);
    free(ref);
    free(got);
    free(plain);
}

TEST(merge_bias_and_cli_with_runs_db)
{
    PATHVAR(base, "base");
    PATHVAR(ad, "ad");
    PATHVAR(out, "out");
    CHECK_OK(save_model(base, 0, TENSOR_F32, 3));
    struct cfg c;
    fix_cfg_qwen2(&c);
    CHECK_OK(save_adapter(ad, &c, QKV, 2, 4, 0, 1, 4, 0.5f)); // lora_B.bias on q/k/v
    CHECK_INT(test_sh("%s merge --model '%s' --adapter '%s' --out '%s' --verify --runs '%s/runs.db'",
                      test_lorakit(), base, ad, out, test_tmpdir()), 0);
    CHECK(strstr(test_output(), "verify: reference base+adapter"));
    int V;
    float *ref = logits_of(base, ad, &V), *got = logits_of(out, NULL, &V);
    CHECK(ref && got);
    CHECK(rel_diff(got, ref, (size_t)PB * PT * V) <= 1e-5);
    // the bias moved by s * bias_B exactly
    size_t nb;
    float *b0 = read_tensor(base, "model.layers.1.self_attn.k_proj.bias", &nb);
    float *b1 = read_tensor(out, "model.layers.1.self_attn.k_proj.bias", NULL);
    struct lora l;
    CHECK_OK(lora_load(&l, ad, &c, test_err()));
    const struct lora_module *md = lora_find(&l, 1, CFG_K);
    for (size_t i = 0; i < nb; i++)
        CHECK_NEAR(b1[i], b0[i] + md->scale * md->bias[i], 1e-6);
    lora_release(&l);
    // the run is recorded with its verify figures
    struct rdb db;
    CHECK_OK(rdb_open(&db, test_path("runs.db"), test_err()));
    struct rdb_run *runs;
    int nr;
    CHECK_OK(rdb_runs_list(&db, 0, &runs, &nr, test_err()));
    CHECK_INT(nr, 1);
    CHECK(!strcmp(runs[0].kind, "merge") && !strcmp(runs[0].status, "done"));
    CHECK(strstr(runs[0].params_json, "\"method\":\"linear\""));
    CHECK(strstr(runs[0].summary_json, "\"max_rel\""));
    rdb_runs_free(runs, nr);
    rdb_close(&db, NULL);
    free(ref);
    free(got);
    free(b0);
    free(b1);
}

TEST(merge_bf16_rounds_the_exact_merge_once)
{
    PATHVAR(base, "base");
    PATHVAR(ad, "ad");
    PATHVAR(out, "out");
    CHECK_OK(save_model(base, 1, TENSOR_BF16, 5));
    struct cfg c;
    fix_cfg_llama(&c);
    CHECK_OK(save_adapter(ad, &c, ALL_MODULES, 3, 6, 0, 0, 6, 0.3f));
    struct merge_opts o;
    opts_one(&o, base, ad, out);
    o.verify = 1;
    struct merge_report rep;
    CHECK_OK(merge_run(&o, &rep, test_err()));
    CHECK_INT(rep.out_dtype, TENSOR_BF16);
    // every changed weight is the exact value (double) rounded once to bf16
    for (int ly = 0; ly < c.num_hidden_layers; ly++)
        for (int m = 0; m < CFG_N_MODULES; m++) {
            char name[128];
            cfg_module_path(ly, (enum cfg_module)m, name, sizeof name);
            strcat(name, ".weight");
            size_t n;
            float *w0 = read_tensor(base, name, &n), *w1 = read_tensor(out, name, NULL);
            double *d = calloc(n, sizeof(double));
            CHECK(w0 && w1 && d);
            CHECK(dense_delta(ad, &c, ly, m, 1.0, d) == 0);
            for (size_t i = 0; i < n; i++) {
                double exact = (double)w0[i] + d[i];
                double tol = fabs(exact) * ldexp(1.0, -8) + 1e-6 * (fabs(w0[i]) + fabs(d[i]));
                CHECK_MSG(fabs(w1[i] - exact) <= tol, "%s[%zu]: %.9g vs exact %.9g", name, i, w1[i], exact);
                CHECK(tensor_bf16_to_f32(tensor_f32_to_bf16(w1[i])) == w1[i]);
            }
            free(w0);
            free(w1);
            free(d);
        }
    // logits: no further from base+adapter than rounding the exact weights alone
    CHECK(rep.verified && rep.round_max_abs > 0);
    CHECK_MSG(rep.verify_max_abs <= rep.round_max_abs * 1.05 + 1e-5, "merged %g vs rounding %g", rep.verify_max_abs,
              rep.round_max_abs);
    CHECK(same_bytes(base, out, "model.embed_tokens.weight") && same_bytes(base, out, "lm_head.weight"));
}

TEST(merge_subtract_returns_the_base)
{
    PATHVAR(base, "base");
    PATHVAR(ad, "ad");
    PATHVAR(m1, "m1");
    PATHVAR(m2, "m2");
    CHECK_OK(save_model(base, 0, TENSOR_F32, 7));
    struct cfg c;
    fix_cfg_qwen2(&c);
    CHECK_OK(save_adapter(ad, &c, ALL_MODULES, 4, 8, 0, 1 - 1, 8, 0.5f));
    CHECK_INT(test_sh("%s merge --model '%s' --adapter '%s' --out '%s'", test_lorakit(), base, ad, m1), 0);
    CHECK_INT(test_sh("%s merge --model '%s' --adapter '%s' --subtract --out '%s'", test_lorakit(), m1, ad, m2), 0);
    size_t n;
    float *w0 = read_tensor(base, "model.layers.0.mlp.up_proj.weight", &n);
    float *w1 = read_tensor(m1, "model.layers.0.mlp.up_proj.weight", NULL);
    float *w2 = read_tensor(m2, "model.layers.0.mlp.up_proj.weight", NULL);
    double moved = 0;
    for (size_t i = 0; i < n; i++) {
        moved = fmax(moved, fabs(w1[i] - w0[i]));
        CHECK_NEAR(w2[i], w0[i], 1e-5);
    }
    CHECK(moved > 1e-2);
    free(w0);
    free(w1);
    free(w2);
    // in bf16: back within a couple of bf16 roundings
    PATHVAR(b16, "b16");
    PATHVAR(n1, "n1");
    PATHVAR(n2, "n2");
    CHECK_OK(save_model(b16, 0, TENSOR_BF16, 7));
    CHECK_INT(test_sh("%s merge --model '%s' --adapter '%s' --out '%s'", test_lorakit(), b16, ad, n1), 0);
    CHECK_INT(test_sh("%s merge --model '%s' --adapter '%s' --subtract --out '%s'", test_lorakit(), n1, ad, n2), 0);
    w0 = read_tensor(b16, "model.layers.1.self_attn.o_proj.weight", &n);
    w1 = read_tensor(n1, "model.layers.1.self_attn.o_proj.weight", NULL);
    w2 = read_tensor(n2, "model.layers.1.self_attn.o_proj.weight", NULL);
    for (size_t i = 0; i < n; i++) // each rounding is at most 2^-8 of the larger of W and W'
        CHECK(fabs(w2[i] - w0[i]) <= ldexp(1.0, -7) * fmax(fabs(w0[i]), fabs(w1[i])) + 1e-6);
    free(w0);
    free(w1);
    free(w2);
}

// ---- several adapters ----

TEST(merge_cat_equals_sum_of_adapters)
{
    PATHVAR(base, "base");
    PATHVAR(a, "a");
    PATHVAR(b, "b");
    CHECK_OK(save_model(base, 1, TENSOR_F32, 9));
    struct cfg c;
    fix_cfg_llama(&c);
    CHECK_OK(save_adapter(a, &c, ALL_MODULES, 2, 4, 0, 0, 10, 0.5f));
    CHECK_OK(save_adapter(b, &c, (1u << CFG_Q) | (1u << CFG_DOWN), 3, 5, 1, 0, 11, 0.5f)); // rsLoRA
    // one adapter: the ranks concatenated; Delta W equals the sum of the two, module by module
    CHECK_INT(test_sh("%s merge --model '%s' --adapter '%s' --adapter '%s:1' --method cat --into-adapter --out '%s/cat'",
                      test_lorakit(), base, a, b, test_tmpdir()), 0);
    struct lora l;
    CHECK_OK(lora_load(&l, test_path("cat"), &c, test_err()));
    CHECK(!l.cfg.use_rslora);
    for (int ly = 0; ly < 2; ly++)
        for (int m = 0; m < CFG_N_MODULES; m++) {
            int64_t rows, cols;
            cfg_module_shape(&c, (enum cfg_module)m, &rows, &cols);
            double *want = calloc((size_t)(rows * cols), sizeof(double));
            double *got = calloc((size_t)(rows * cols), sizeof(double));
            CHECK(dense_delta(a, &c, ly, m, 1.0, want) == 0);
            dense_delta(b, &c, ly, m, 1.0, want);
            CHECK(dense_delta(test_path("cat"), &c, ly, m, 1.0, got) == 0);
            const struct lora_module *md = lora_find(&l, ly, m);
            CHECK_INT(md->R, (m == CFG_Q || m == CFG_DOWN) ? 5 : 2);
            CHECK_NEAR(md->scale, 1.0, 1e-7);
            for (int64_t i = 0; i < rows * cols; i++)
                CHECK_NEAR(got[i], want[i], 1e-5);
            free(want);
            free(got);
        }
    lora_release(&l);
    // merged into the model: logits equal the engine running the cat adapter
    CHECK_INT(test_sh("%s merge --model '%s' --adapter '%s' --adapter '%s' --method cat --out '%s/m'", test_lorakit(),
                      base, a, b, test_tmpdir()), 0);
    int V;
    float *ref = logits_of(base, test_path("cat"), &V), *got = logits_of(test_path("m"), NULL, &V);
    CHECK(ref && got);
    CHECK(rel_diff(got, ref, (size_t)PB * PT * V) <= 1e-5);
    free(ref);
    free(got);
}

TEST(merge_svd_full_rank_equals_linear)
{
    PATHVAR(base, "base");
    PATHVAR(a, "a");
    PATHVAR(b, "b");
    CHECK_OK(save_model(base, 1, TENSOR_F32, 12));
    struct cfg c;
    fix_cfg_llama(&c);
    CHECK_OK(save_adapter(a, &c, ALL_MODULES, 3, 6, 0, 0, 13, 0.5f));
    CHECK_OK(save_adapter(b, &c, ALL_MODULES, 3, 3, 0, 0, 14, 0.5f));
    CHECK_INT(test_sh("%s merge --model '%s' --adapter '%s:0.7' --adapter '%s:-0.4' --out '%s/lin'", test_lorakit(),
                      base, a, b, test_tmpdir()), 0);
    CHECK_INT(test_sh("%s merge --model '%s' --adapter '%s:0.7' --adapter '%s:-0.4' --method svd --rank 64 --out '%s/svd'",
                      test_lorakit(), base, a, b, test_tmpdir()), 0);
    // and the svd adapter at rank 6 = 3 + 3 holds the whole sum
    CHECK_INT(test_sh("%s merge --model '%s' --adapter '%s:0.7' --adapter '%s:-0.4' --method svd --rank 6 --into-adapter "
                      "--out '%s/svdad'", test_lorakit(), base, a, b, test_tmpdir()), 0);
    for (int m = 0; m < CFG_N_MODULES; m++) {
        char name[128];
        cfg_module_path(1, (enum cfg_module)m, name, sizeof name);
        strcat(name, ".weight");
        size_t n;
        float *w0 = read_tensor(base, name, &n), *wl = read_tensor(test_path("lin"), name, NULL);
        float *ws = read_tensor(test_path("svd"), name, NULL);
        double *want = calloc(n, sizeof(double)), *got = calloc(n, sizeof(double));
        dense_delta(a, &c, 1, m, 0.7, want);
        dense_delta(b, &c, 1, m, -0.4, want);
        CHECK(dense_delta(test_path("svdad"), &c, 1, m, 1.0, got) == 0);
        for (size_t i = 0; i < n; i++) {
            CHECK_NEAR(ws[i], wl[i], 1e-5);
            CHECK_NEAR(wl[i], w0[i] + want[i], 1e-5);
            CHECK_NEAR(got[i], want[i], 1e-4);
        }
        free(w0);
        free(wl);
        free(ws);
        free(want);
        free(got);
    }
}

TEST(merge_ties_matches_hand_computation)
{
    // D1 top 3 by magnitude: -4, 5, 3; D2: -3, 2, 1.5 (density 0.5 of 6 keeps 3)
    float d1[6] = { 1, -2, 3, -4, 5, 0.5f }, d2[6] = { 2, 1.5f, -1, -1.2f, -3, 0.25f };
    float *d[2] = { d1, d2 }, out[6];
    double w[2] = { 2, 1 };
    CHECK_OK(merge_combine(MERGE_TIES, 2, d, w, 6, 0.5, 0, out, test_err()));
    // trimmed: T1 = [0 0 3; -4 5 0], T2 = [2 1.5 0; 0 -3 0]; signs of T1 + T2: + + + - + (+ on 0)
    // disjoint weighted mean: [1*2, 1*1.5, 2*3; 2*-4, 2*5 (T2's -3 disagrees), 0]
    float want[6] = { 2, 1.5f, 6, -8, 10, 0 };
    for (int i = 0; i < 6; i++)
        CHECK_NEAR(out[i], want[i], 0);
    // two adapters agreeing on an entry: the mean, not the sum
    float e1[3] = { 4, -1, 2 }, e2[3] = { 2, 3, -6 };
    float *e[2] = { e1, e2 };
    double one[2] = { 1, 1 };
    CHECK_OK(merge_combine(MERGE_TIES, 2, e, one, 3, 1.0, 0, out, test_err()));
    // sums 6, 2, -4: entry 0 both +: (4 + 2) / 2; entry 1 +: only 3; entry 2 -: only -6
    CHECK_NEAR(out[0], 3, 0);
    CHECK_NEAR(out[1], 3, 0);
    CHECK_NEAR(out[2], -6, 0);
}

TEST(merge_dare_matches_hand_computation)
{
    float d1[6] = { 1, -2, 3, -4, 5, 6 }, d2[6] = { -1, 2, 3, 4, -5, 6 }, c1[6], c2[6], out[6];
    uint64_t seed = 1234;
    // the masks by the documented rule: element j of delta i kept when its uniform draw < 0.5
    int keep[2][6];
    for (int i = 0; i < 2; i++) {
        struct lk_rng r;
        lk_rng_seed(&r, merge_rng_seed(seed, i));
        for (int j = 0; j < 6; j++)
            keep[i][j] = lk_rng_uniform(&r) < 0.5f;
    }
    memcpy(c1, d1, sizeof c1);
    memcpy(c2, d2, sizeof c2);
    float *d[2] = { c1, c2 };
    double w[2] = { 1, 0.5 };
    CHECK_OK(merge_combine(MERGE_DARE_LINEAR, 2, d, w, 6, 0.5, seed, out, test_err()));
    for (int j = 0; j < 6; j++) // kept entries are doubled (1 / density), the rest dropped
        CHECK_NEAR(out[j], 1.0 * keep[0][j] * 2 * d1[j] + 0.5 * keep[1][j] * 2 * d2[j], 1e-6);
    memcpy(c1, d1, sizeof c1);
    memcpy(c2, d2, sizeof c2);
    CHECK_OK(merge_combine(MERGE_DARE_TIES, 2, d, w, 6, 0.5, seed, out, test_err()));
    for (int j = 0; j < 6; j++) {
        double t1 = keep[0][j] * 2 * d1[j], t2 = keep[1][j] * 2 * d2[j];
        int pos = t1 + t2 >= 0;
        double acc = 0;
        int cnt = 0;
        if ((pos && t1 > 0) || (!pos && t1 < 0))
            acc += t1, cnt++;
        if ((pos && t2 > 0) || (!pos && t2 < 0))
            acc += 0.5 * t2, cnt++;
        CHECK_NEAR(out[j], cnt ? acc / cnt : 0, 1e-6);
    }
    // density 1 keeps everything: dare_linear is linear
    memcpy(c1, d1, sizeof c1);
    memcpy(c2, d2, sizeof c2);
    CHECK_OK(merge_combine(MERGE_DARE_LINEAR, 2, d, w, 6, 1.0, seed, out, test_err()));
    for (int j = 0; j < 6; j++)
        CHECK_NEAR(out[j], d1[j] + 0.5 * d2[j], 1e-6);
    // the drop rate is density over many draws
    size_t n = 100000, kept = 0;
    float *big = malloc(sizeof(float) * n), *o2 = malloc(sizeof(float) * n);
    for (size_t j = 0; j < n; j++)
        big[j] = 1;
    double one = 1;
    CHECK_OK(merge_combine(MERGE_DARE_LINEAR, 1, &big, &one, n, 0.3, 5, o2, test_err()));
    for (size_t j = 0; j < n; j++)
        kept += o2[j] != 0;
    CHECK_NEAR((double)kept / n, 0.3, 0.01);
    free(big);
    free(o2);
}

TEST(merge_ties_model_runs_and_is_seeded)
{
    PATHVAR(base, "base");
    PATHVAR(a, "a");
    PATHVAR(b, "b");
    CHECK_OK(save_model(base, 1, TENSOR_F32, 15));
    struct cfg c;
    fix_cfg_llama(&c);
    CHECK_OK(save_adapter(a, &c, ALL_MODULES, 2, 4, 0, 0, 16, 0.5f));
    CHECK_OK(save_adapter(b, &c, ALL_MODULES, 2, 4, 0, 0, 17, 0.5f));
    for (int k = 0; k < 2; k++)
        CHECK_INT(test_sh("%s merge --model '%s' --adapter '%s' --adapter '%s' --method dare_ties --density 0.4 --seed 3 "
                          "--out '%s/d%d' --verify", test_lorakit(), base, a, b, test_tmpdir(), k), 0);
    CHECK(strstr(test_output(), "exact float32 merge in memory"));
    CHECK(same_bytes(test_path("d0"), test_path("d1"), "model.layers.0.mlp.gate_proj.weight"));
    // ties with one adapter at density 1/3: two thirds of the entries keep the base value
    CHECK_INT(test_sh("%s merge --model '%s' --adapter '%s' --method ties --density 0.3333333 --out '%s/t'",
                      test_lorakit(), base, a, test_tmpdir()), 0);
    size_t n;
    float *w0 = read_tensor(base, "model.layers.0.mlp.gate_proj.weight", &n);
    float *w1 = read_tensor(test_path("t"), "model.layers.0.mlp.gate_proj.weight", NULL);
    size_t same = 0;
    for (size_t i = 0; i < n; i++)
        same += w0[i] == w1[i];
    CHECK_INT(n - same, (size_t)(0.3333333 * n));
    free(w0);
    free(w1);
}

// ---- layout, ties, DoRA, export ----

TEST(merge_sharded_base_gives_same_shards_and_index)
{
    PATHVAR(base, "base");
    PATHVAR(out, "out");
    CHECK_INT(test_sh("%s init --preset tiny --dtype bf16 --seed 4 --shard-size 40KB --out '%s'", test_lorakit(), base), 0);
    struct cfg c;
    CHECK_OK(cfg_load(&c, base, test_err()));
    CHECK_OK(save_adapter(test_path("ad"), &c, (1u << CFG_V) | (1u << CFG_UP), 4, 4, 0, 0, 18, 0.1f));
    CHECK_INT(test_sh("%s merge --model '%s' --adapter '%s/ad' --out '%s'", test_lorakit(), base, test_tmpdir(), out), 0);
    struct st_model a, b;
    CHECK_OK(st_model_open(&a, base, test_err()));
    CHECK_OK(st_model_open(&b, out, test_err()));
    CHECK(a.sharded && b.sharded && a.n_files > 2);
    CHECK_INT(a.n_files, b.n_files);
    for (int f = 0; f < a.n_files; f++) {
        CHECK(!strcmp(strrchr(a.files[f].path, '/'), strrchr(b.files[f].path, '/')));
        CHECK_INT(a.files[f].n, b.files[f].n);
        for (int i = 0; i < a.files[f].n; i++) {
            const char *nm = a.files[f].t[i].name;
            int fb;
            CHECK(st_model_find(&b, nm, &fb) && fb == f);
            int changed = strstr(nm, "v_proj.weight") || strstr(nm, "up_proj.weight");
            CHECK_MSG(changed != same_bytes(base, out, nm), "tensor %s", nm);
        }
    }
    // the index: the same weight map, total_size = the data bytes
    char *text;
    char *ip = malloc(strlen(out) + 40);
    sprintf(ip, "%s/model.safetensors.index.json", out);
    CHECK_OK(lk_read_file(ip, &text, NULL, test_err()));
    cJSON *j = cJSON_Parse(text);
    size_t total = 0;
    for (int f = 0; f < b.n_files; f++)
        total += b.files[f].data_len;
    CHECK_INT((size_t)cJSON_GetObjectItem(cJSON_GetObjectItem(j, "metadata"), "total_size")->valuedouble, total);
    cJSON *wm = cJSON_GetObjectItem(j, "weight_map");
    CHECK_INT(cJSON_GetArraySize(wm), st_model_count(&a));
    cJSON_Delete(j);
    lk_free(text);
    free(ip);
    CHECK(lk_file_exists(test_path("out/generation_config.json")));
    st_model_close(&a);
    st_model_close(&b);
    cfg_release(&c);
}

TEST(merge_unties_embeddings_the_adapter_changes)
{
    PATHVAR(base, "base");
    PATHVAR(ad, "ad");
    PATHVAR(out, "out");
    CHECK_OK(save_model(base, 0, TENSOR_F32, 19));
    struct cfg c;
    fix_cfg_qwen2(&c);
    // an embedding adapter plus q_proj: only the input side changes under adapter inference
    struct lora l;
    struct lora_config lc;
    lora_config_default(&lc);
    lc.targets = 1u << CFG_Q;
    lc.target_embed = 1;
    lc.r = 2;
    lc.alpha = 4;
    CHECK_OK(lora_init(&l, &lc, &c, test_err()));
    struct lk_rng rng;
    lk_rng_seed(&rng, 20);
    for (size_t i = 0; i < l.n; i++)
        l.mem[i] = 0.3f * lk_rng_normal(&rng);
    l.embed_R = 2;
    l.embed_V = c.vocab_size;
    l.embed_C = c.hidden_size;
    l.embed_A = lk_malloc(sizeof(float) * 2 * c.vocab_size);
    l.embed_B = lk_malloc(sizeof(float) * 2 * c.hidden_size);
    for (int i = 0; i < 2 * c.vocab_size; i++)
        l.embed_A[i] = lk_rng_normal(&rng);
    for (int i = 0; i < 2 * c.hidden_size; i++)
        l.embed_B[i] = 0.3f * lk_rng_normal(&rng);
    CHECK_OK(lora_save(&l, ad, test_err()));
    lora_release(&l);
    CHECK_INT(test_sh("%s merge --model '%s' --adapter '%s' --out '%s' --verify", test_lorakit(), base, ad, out), 0);
    CHECK(strstr(test_output(), "tie_word_embeddings false"));
    struct cfg co;
    CHECK_OK(cfg_load(&co, out, test_err()));
    CHECK(!co.tie_word_embeddings);
    cfg_release(&co);
    size_t n;
    float *e0 = read_tensor(base, "model.embed_tokens.weight", &n);
    float *head = read_tensor(out, "lm_head.weight", NULL), *e1 = read_tensor(out, "model.embed_tokens.weight", NULL);
    CHECK(head && e1);
    CHECK(!memcmp(head, e0, n * sizeof(float))); // lm_head keeps the base embedding
    CHECK(memcmp(e1, e0, n * sizeof(float)));
    int V;
    float *ref = logits_of(base, ad, &V), *got = logits_of(out, NULL, &V);
    CHECK(ref && got);
    CHECK(rel_diff(got, ref, (size_t)PB * PT * V) <= 1e-5);
    free(e0);
    free(e1);
    free(head);
    free(ref);
    free(got);
    // modules_to_save lm_head on the tied base: lm_head replaced, embed_tokens byte for byte
    PATHVAR(ad2, "ad2");
    PATHVAR(out2, "out2");
    lora_config_default(&lc);
    lc.targets = 1u << CFG_V;
    lc.r = 2;
    lc.alpha = 2;
    char *mts[1] = { (char *)"lm_head" };
    lc.modules_to_save = mts;
    lc.n_modules_to_save = 1;
    CHECK_OK(lora_init(&l, &lc, &c, test_err()));
    l.extra = lk_calloc(1, sizeof *l.extra);
    l.n_extra = 1;
    l.extra[0].name = lk_strdup("lm_head.weight");
    l.extra[0].ndim = 2;
    l.extra[0].shape[0] = c.vocab_size;
    l.extra[0].shape[1] = c.hidden_size;
    l.extra[0].data = lk_malloc(sizeof(float) * n);
    for (size_t i = 0; i < n; i++)
        l.extra[0].data[i] = lk_rng_normal(&rng);
    float *want = malloc(sizeof(float) * n);
    memcpy(want, l.extra[0].data, sizeof(float) * n);
    CHECK_OK(lora_save(&l, ad2, test_err()));
    lora_release(&l);
    CHECK_INT(test_sh("%s merge --model '%s' --adapter '%s' --out '%s' --verify", test_lorakit(), base, ad2, out2), 0);
    // the engine runs a tied lm_head replacement too (untied in memory, issue 18): the reference
    // is base + adapter through model_apply_extras, and the merged model gives its logits
    CHECK(strstr(test_output(), "verify: reference base+adapter"));
    head = read_tensor(out2, "lm_head.weight", NULL);
    CHECK(head && !memcmp(head, want, n * sizeof(float)));
    CHECK(same_bytes(base, out2, "model.embed_tokens.weight"));
    ref = logits_of(base, ad2, &V);
    got = logits_of(out2, NULL, &V);
    CHECK(ref && got);
    CHECK(rel_diff(got, ref, (size_t)PB * PT * V) <= 1e-5);
    free(ref);
    free(got);
    free(head);
    free(want);
}

TEST(merge_dora_matches_hand_computation)
{
    PATHVAR(base, "base");
    PATHVAR(ad, "ad");
    PATHVAR(out, "out");
    CHECK_OK(save_model(base, 1, TENSOR_F32, 21));
    struct cfg c;
    fix_cfg_llama(&c);
    struct lora l;
    struct lora_config lc;
    lora_config_default(&lc);
    lc.targets = (1u << CFG_K) | (1u << CFG_GATE);
    lc.r = 2;
    lc.alpha = 3;
    lc.use_dora = 1;
    CHECK_OK(lora_init(&l, &lc, &c, test_err()));
    struct lk_rng rng;
    lk_rng_seed(&rng, 22);
    for (size_t i = 0; i < l.n; i++)
        l.mem[i] = 0.3f * lk_rng_normal(&rng);
    size_t tot = 0;
    for (int k = 0; k < l.n_mod; k++)
        tot += (size_t)l.mod[k].out;
    float *mag = lk_malloc(sizeof(float) * tot); // replaces the block's magnitudes; freed below
    CHECK(mag);
    l.mag_mem = mag;
    for (int k = 0, off = 0; k < l.n_mod; off += l.mod[k].out, k++)
        l.mod[k].mag = l.mag_mem + off;
    for (size_t i = 0; i < tot; i++)
        l.mag_mem[i] = 0.5f + lk_rng_uniform(&rng);
    CHECK_OK(lora_save(&l, ad, test_err()));
    CHECK_INT(test_sh("%s merge --model '%s' --adapter '%s' --out '%s' --verify", test_lorakit(), base, ad, out), 0);
    const struct lora_module *md = lora_find(&l, 1, CFG_GATE);
    size_t n;
    float *w0 = read_tensor(base, "model.layers.1.mlp.gate_proj.weight", &n);
    float *w1 = read_tensor(out, "model.layers.1.mlp.gate_proj.weight", NULL);
    for (int o = 0; o < md->out; o++) {
        double row[64], ss = 0;
        for (int i = 0; i < md->in; i++) {
            double s = 0;
            for (int r = 0; r < md->R; r++)
                s += (double)md->B[o * md->R + r] * md->A[r * md->in + i];
            row[i] = w0[o * md->in + i] + md->scale * s;
            ss += row[i] * row[i];
        }
        for (int i = 0; i < md->in; i++)
            CHECK_NEAR(w1[o * md->in + i], md->mag[o] * row[i] / sqrt(ss), 1e-6);
    }
    free(w0);
    free(w1);
    lora_release(&l);
    lk_free(mag);
    // DoRA cannot be combined or subtracted
    CHECK(test_sh("%s merge --model '%s' --adapter '%s' --adapter '%s' --out '%s/x'", test_lorakit(), base, ad, ad,
                  test_tmpdir()) == 1);
    CHECK(strstr(test_output(), "DoRA"));
}

TEST(merge_portable_export_folds_scale_and_drops_patterns)
{
    PATHVAR(base, "base");
    PATHVAR(ad, "ad");
    CHECK_OK(save_model(base, 1, TENSOR_F32, 23));
    struct cfg c;
    fix_cfg_llama(&c);
    struct lora l;
    struct lora_config lc;
    lora_config_default(&lc);
    lc.r = 4;
    lc.alpha = 6;
    lc.use_rslora = 1;
    char rk[] = "down_proj", ak[] = "q_proj";
    struct lora_pattern rp = { rk, 2 }, ap = { ak, 11 };
    lc.rank_pattern = &rp;
    lc.n_rank_pattern = 1;
    lc.alpha_pattern = &ap;
    lc.n_alpha_pattern = 1;
    CHECK_OK(lora_init(&l, &lc, &c, test_err()));
    struct lk_rng rng;
    lk_rng_seed(&rng, 24);
    for (size_t i = 0; i < l.n; i++)
        l.mem[i] = 0.3f * lk_rng_normal(&rng);
    CHECK_OK(lora_save(&l, ad, test_err()));
    lora_release(&l);
    CHECK_INT(test_sh("%s merge --model '%s' --adapter '%s' --method cat --into-adapter --portable --out '%s/p'",
                      test_lorakit(), base, ad, test_tmpdir()), 0);
    char *text;
    CHECK_OK(lk_read_file(test_path("p/adapter_config.json"), &text, NULL, test_err()));
    cJSON *j = cJSON_Parse(text);
    CHECK_INT(cJSON_GetObjectItem(j, "r")->valueint, 4);
    CHECK_INT(cJSON_GetObjectItem(j, "lora_alpha")->valueint, 4);
    CHECK(cJSON_IsFalse(cJSON_GetObjectItem(j, "use_rslora")));
    CHECK_INT(cJSON_GetArraySize(cJSON_GetObjectItem(j, "rank_pattern")), 0);
    CHECK_INT(cJSON_GetArraySize(cJSON_GetObjectItem(j, "alpha_pattern")), 0);
    cJSON_Delete(j);
    lk_free(text);
    for (int m = 0; m < CFG_N_MODULES; m++) {
        int64_t rows, cols;
        cfg_module_shape(&c, (enum cfg_module)m, &rows, &cols);
        double *want = calloc((size_t)(rows * cols), sizeof(double)), *got = calloc((size_t)(rows * cols), sizeof(double));
        CHECK(dense_delta(ad, &c, 0, m, 1.0, want) == 0);
        CHECK(dense_delta(test_path("p"), &c, 0, m, 1.0, got) == 0);
        for (int64_t i = 0; i < rows * cols; i++)
            CHECK_NEAR(got[i], want[i], 1e-5);
        free(want);
        free(got);
    }
}

// ---- refusals: a clear message and no output ----

TEST(merge_refusals_leave_no_output)
{
    PATHVAR(base, "base");
    PATHVAR(ad, "ad");
    PATHVAR(out, "merged");
    CHECK_OK(save_model(base, 0, TENSOR_F32, 25));
    struct cfg c, cl;
    fix_cfg_qwen2(&c);
    fix_cfg_llama(&cl);
    CHECK_OK(save_adapter(ad, &c, ALL_MODULES, 2, 4, 0, 0, 26, 0.5f));
    CHECK_OK(save_adapter(test_path("llama_ad"), &cl, QKV, 2, 4, 0, 0, 27, 0.5f));
    CHECK_OK(save_adapter(test_path("obias"), &c, 1u << CFG_O, 2, 4, 0, 1, 28, 0.5f));
    // a target module the base lacks
    CHECK_OK(save_adapter(test_path("badmod"), &c, 1u << CFG_Q, 2, 4, 0, 0, 29, 0.5f));
    char *text;
    CHECK_OK(lk_read_file(test_path("badmod/adapter_config.json"), &text, NULL, test_err()));
    char *q = strstr(text, "\"q_proj\"");
    CHECK(q);
    memcpy(q, "\"c_attn\"", 8);
    CHECK_OK(lk_write_file_atomic(test_path("badmod/adapter_config.json"), text, strlen(text), test_err()));
    lk_free(text);
    // lora_A rank 2, lora_B rank 3
    CHECK_OK(save_adapter(test_path("rk"), &c, 1u << CFG_Q, 2, 4, 0, 0, 30, 0.5f));
    {
        float a[2 * 16] = { 0 }, b[16 * 3] = { 0 };
        struct st_item it[4] = {
            { "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight", 2, { 2, 16 }, a },
            { "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight", 2, { 16, 3 }, b },
            { "base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight", 2, { 2, 16 }, a },
            { "base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight", 2, { 16, 3 }, b },
        };
        CHECK_OK(st_write_f32(test_path("rk/adapter_model.safetensors"), it, 4, TENSOR_F32, test_err()));
    }
    static const struct {
        const char *args, *msg;
        int code;
    } cases[] = {
        { "--adapter '%s/llama_ad'", "another base model", 1 },
        { "--adapter '%s/badmod'", "c_attn", 1 },
        { "--adapter '%s/rk'", "rank mismatch", 1 },
        { "--adapter '%s/obias'", "has no 'model.layers.0.self_attn.o_proj.bias'", 1 },
        { "--adapter '%s/ad' --rank 4", "--rank applies to --method svd", 2 },
        { "--adapter '%s/ad' --density 0.5", "--density applies to ties", 2 },
        { "--adapter '%s/ad' --method ties", "needs --density", 2 },
        { "--adapter '%s/ad' --method ties --density 0.5 --into-adapter", "--into-adapter needs --method cat or svd", 2 },
        { "--adapter '%s/ad' --portable", "--portable writes an adapter", 2 },
        { "--adapter '%s/ad' --method cat --subtract", "--subtract undoes a linear merge", 2 },
        { "--adapter '%s/ad' --method median", "unknown --method", 2 },
        { "--adapter '%s/ad' --dtype f8", "--dtype", 2 },
        { "--adapter '%s/nothing'", "adapter_config.json", 1 },
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        char args[512];
        snprintf(args, sizeof args, cases[i].args, test_tmpdir());
        int rc = test_sh("%s merge --model '%s' %s --out '%s'", test_lorakit(), base, args, out);
        CHECK_MSG(rc == cases[i].code, "case %zu (%s): exit %d: %s", i, args, rc, test_output());
        CHECK_MSG(strstr(test_output(), cases[i].msg) && strstr(test_output(), "lorakit merge: error:"),
                  "case %zu: message '%s' not in: %s", i, cases[i].msg, test_output());
        CHECK_MSG(no_output(out), "case %zu left output", i);
    }
    // an existing output without --overwrite is refused and left alone; with it, replaced
    CHECK_OK(lk_mkdir_p(out, test_err()));
    CHECK_INT(test_sh("echo precious > '%s/keep.txt'", out), 0);
    CHECK_INT(test_sh("%s merge --model '%s' --adapter '%s' --out '%s'", test_lorakit(), base, ad, out), 1);
    CHECK(strstr(test_output(), "--overwrite"));
    CHECK(!lk_file_exists(test_path("merged/config.json")));
    CHECK_INT(test_sh("%s merge --model '%s' --adapter '%s' --out '%s' --overwrite", test_lorakit(), base, ad, out), 0);
    CHECK(lk_file_exists(test_path("merged/config.json")));
    CHECK_INT(test_sh("%s merge --help", test_lorakit()), 0);
    CHECK(strstr(test_output(), "lorakit merge --model"));
}

/* Ctrl-C during a merge: exit 130 (the shell's 128 + SIGINT), "interrupted" on stderr, no output
 * folder and no temporary one left. The model is big enough (29M parameters, a TIES merge of
 * every linear) that the merge is still writing when the signal comes. */
TEST(merge_sigint_exits_130_and_leaves_nothing)
{
    PATHVAR(cfgp, "cfg.json");
    PATHVAR(base, "base");
    PATHVAR(ad, "ad");
    PATHVAR(out, "out");
    PATHVAR(errp, "err.txt");
    FILE *f = fopen(cfgp, "w");
    CHECK(f != NULL);
    fprintf(f, "{\"architectures\":[\"Qwen2ForCausalLM\"],\"model_type\":\"qwen2\",\"hidden_size\":512,"
               "\"intermediate_size\":1536,\"num_hidden_layers\":8,\"num_attention_heads\":4,"
               "\"num_key_value_heads\":2,\"vocab_size\":8192,\"tie_word_embeddings\":true,"
               "\"max_position_embeddings\":256,\"torch_dtype\":\"bfloat16\"}\n");
    fclose(f);
    CHECK_INT(test_sh("%s init --config '%s' --out '%s' --seed 1", test_lorakit(), cfgp, base), 0);
    struct cfg c;
    CHECK_OK(cfg_load(&c, base, test_err()));
    CHECK_OK(save_adapter(ad, &c, ALL_MODULES, 2, 4, 0, 0, 5, 0.1f));
    cfg_release(&c);
    pid_t pid = fork();
    if (pid == 0) {
        int fd = open(errp, O_WRONLY | O_CREAT | O_TRUNC, 0644);
        dup2(fd, 1);
        dup2(fd, 2);
        execl(test_lorakit(), "lorakit", "merge", "--model", base, "--adapter", ad, "--out", out, "--method",
              "ties", "--density", "0.5", "--threads", "1", (char *)NULL);
        _exit(127);
    }
    char tmp[1200];
    snprintf(tmp, sizeof tmp, "%s.tmp.%ld", out, (long)pid);
    int seen = 0, st = 0, done = 0;
    for (int i = 0; i < 20000 && !seen && !done; i++) {
        seen = lk_is_dir(tmp);
        done = waitpid(pid, &st, WNOHANG) == pid;
        struct timespec ts = { 0, 1000000 };
        nanosleep(&ts, NULL);
    }
    if (seen) {
        struct timespec ts = { 0, 30000000 }; // into the tensor loop
        nanosleep(&ts, NULL);
        kill(pid, SIGINT);
        waitpid(pid, &st, 0);
    } else if (!done) {
        kill(pid, SIGKILL);
        waitpid(pid, &st, 0);
        CHECK_MSG(0, "the merge made no temporary folder in 20 s");
    }
    if (WIFEXITED(st) && WEXITSTATUS(st) == 0)
        SKIP("the merge finished before it could be interrupted (machine too fast for this check)");
    char *msg = NULL;
    CHECK_OK(lk_read_file(errp, &msg, NULL, test_err()));
    CHECK_MSG(WIFEXITED(st) && WEXITSTATUS(st) == 130, "status %d: %s", st, msg);
    CHECK_MSG(strstr(msg, "lorakit merge: interrupted") && !strstr(msg, "error"), "stderr: %s", msg);
    lk_free(msg);
    CHECK(!lk_file_exists(out));
    CHECK(!lk_file_exists(tmp));
    CHECK_INT(test_sh("ls -A '%s' | grep -c -e '\\.tmp\\.' -e '\\.old\\.' | grep -qx 0", test_tmpdir()), 0);
}
