/*
 * test_weights.c - frozen weights kept in the file's dtype (model_load_keep, model_weights_convert,
 * saving, modules_to_save copies over half weights, `--weights` on the commands) and the model's
 * lanes (the rows of a batch split over threads: the same logits, loss and gradients as one lane
 * within float32 rounding, and the same bits on every run with a fixed thread count).
 */
#include "test.h"

#include <math.h>
#include <omp.h>
#include <stdlib.h>
#include <string.h>

#include "../libcore/lora.h"
#include "../libcore/model.h"
#include "../libcore/st.h"
#include "../libcore/tensor.h"
#include "fix_model.h"

/* max |a - b| / max |b| */
static double rel_diff(const float *a, const float *b, size_t n)
{
    double mx = 0, ref = 0;
    for (size_t i = 0; i < n; i++) {
        mx = fmax(mx, fabs((double)a[i] - b[i]));
        ref = fmax(ref, fabs((double)b[i]));
    }
    return mx / (ref > 0 ? ref : 1);
}

/* A random llama-fixture model folder in dtype. */
static int save_random(const char *dir, int dtype, uint64_t seed)
{
    struct cfg c;
    struct model m;
    fix_cfg_llama(&c);
    int rc = fix_model_random(&m, &c, 0.3f, seed);
    if (!rc)
        rc = model_save(&m, dir, dtype, test_err());
    model_release(&m);
    return rc;
}

TEST(weights_load_keeps_the_file_dtype_bit_for_bit)
{
    static const int dtypes[] = { TENSOR_F32, TENSOR_BF16, TENSOR_F16 };
    for (size_t d = 0; d < 3; d++) {
        const char *dir = test_path(tensor_dtype_name(dtypes[d]));
        CHECK_OK(save_random(dir, dtypes[d], 3));
        struct model m, f;
        CHECK_OK(model_load_keep(&m, dir, MODEL_KEEP_FILE, test_err()));
        CHECK_OK(model_load(&f, dir, test_err()));
        CHECK_INT(m.w.dtype, dtypes[d]);
        CHECK_INT(f.w.dtype, TENSOR_F32);
        struct st_model sm;
        CHECK_OK(st_model_open(&sm, dir, test_err()));
        struct model_tensor *t, *tf;
        int n, nf;
        CHECK_OK(model_weights_tensors(&m.w, &m.cfg, &t, &n, test_err()));
        CHECK_OK(model_weights_tensors(&f.w, &f.cfg, &tf, &nf, test_err()));
        CHECK_INT(n, nf);
        for (int i = 0; i < n; i++) {
            const struct st_tensor *s = st_model_find(&sm, t[i].name, NULL);
            CHECK(s != NULL);
            if (t[i].ndim == 2 && dtypes[d] != TENSOR_F32) {
                // the file's bits, untouched; the float32 load holds exactly their widening
                CHECK(t[i].hdata && !t[i].data && t[i].dtype == dtypes[d]);
                CHECK(!memcmp(t[i].hdata, s->data, s->nbytes));
                float *wide = malloc(sizeof(float) * t[i].numel);
                tensor_to_f32(wide, t[i].hdata, (enum tensor_dtype)t[i].dtype, t[i].numel);
                CHECK(!memcmp(wide, tf[i].data, sizeof(float) * t[i].numel));
                free(wide);
            } else {
                CHECK(t[i].data && !t[i].hdata && !memcmp(t[i].data, tf[i].data, sizeof(float) * t[i].numel));
            }
        }
        // saved again in its own dtype: the same tensor bytes
        const char *again = test_path("again");
        CHECK_OK(model_save(&m, again, dtypes[d], test_err()));
        struct st_model sa;
        CHECK_OK(st_model_open(&sa, again, test_err()));
        for (int i = 0; i < n; i++) {
            const struct st_tensor *s = st_model_find(&sm, t[i].name, NULL), *a = st_model_find(&sa, t[i].name, NULL);
            CHECK(a && a->dtype == s->dtype && a->nbytes == s->nbytes && !memcmp(a->data, s->data, s->nbytes));
        }
        st_model_close(&sa);
        lk_rm_rf(again);
        st_model_close(&sm);
        lk_free(t);
        lk_free(tf);
        model_release(&m);
        model_release(&f);
    }
}

TEST(weights_mixed_file_dtypes_load_as_f32_and_convert_round_trips)
{
    // one projection in F32 among BF16 matrices: kept as float32 (nothing is rounded on load)
    struct cfg c;
    struct model m;
    fix_cfg_llama(&c);
    CHECK_OK(fix_model_random(&m, &c, 0.3f, 4));
    struct model_tensor *t;
    int n;
    CHECK_OK(model_weights_tensors(&m.w, &c, &t, &n, test_err()));
    const char *dir = test_path("mixed");
    CHECK_OK(lk_mkdir_p(dir, test_err()));
    CHECK_OK(cfg_save(&c, test_path("mixed/config.json"), test_err()));
    struct st_writer sw;
    CHECK_OK(st_writer_init(&sw, test_path("mixed/model.safetensors"), test_err()));
    for (int i = 0; i < n; i++)
        st_writer_declare(&sw, t[i].name, t[i].ndim == 2 && t[i].module != CFG_Q ? TENSOR_BF16 : TENSOR_F32,
                          t[i].ndim, t[i].shape);
    st_writer_begin(&sw);
    for (int i = 0; i < n; i++)
        st_writer_write(&sw, t[i].data, TENSOR_F32);
    CHECK_OK(st_writer_commit(&sw));
    struct model k;
    CHECK_OK(model_load_keep(&k, dir, MODEL_KEEP_FILE, test_err()));
    CHECK_INT(k.w.dtype, TENSOR_F32);
    model_release(&k);
    // f32 -> bf16 rounds once (to nearest even), bf16 -> f32 is exact
    struct model_weights w2;
    CHECK_OK(model_weights_alloc(&w2, &c, test_err()));
    memcpy(w2.mem, m.w.mem, sizeof(float) * m.w.n);
    CHECK_OK(model_weights_convert(&w2, &c, TENSOR_BF16, test_err()));
    CHECK_INT(w2.dtype, TENSOR_BF16);
    // both blocks start on a cache line (the AMX tile loads read 64-byte rows)
    CHECK((uintptr_t)w2.hmem % LK_ALIGN == 0 && (uintptr_t)w2.mem % LK_ALIGN == 0);
    CHECK(w2.layer[1].wup.h[5] == tensor_f32_to_bf16(m.w.layer[1].wup.f[5]));
    CHECK_OK(model_weights_convert(&w2, &c, TENSOR_F32, test_err()));
    struct model_tensor *t2;
    int n2;
    CHECK_OK(model_weights_tensors(&w2, &c, &t2, &n2, test_err()));
    for (int i = 0; i < n2; i++)
        for (size_t j = 0; j < t2[i].numel; j++) {
            float want = t[i].ndim == 2 ? tensor_bf16_to_f32(tensor_f32_to_bf16(t[i].data[j])) : t[i].data[j];
            CHECK_MSG(t2[i].data[j] == want, "%s[%zu]", t2[i].name, j); // norms and biases stay float32
        }
    lk_free(t2);
    model_weights_release(&w2);
    lk_free(t);
    model_release(&m);
}

TEST(weights_modules_to_save_over_bf16_weights_match_f32)
{
    struct cfg c;
    fix_cfg_llama(&c); // untied: lm_head may be replaced
    const char *dir = test_path("m");
    CHECK_OK(save_random(dir, TENSOR_BF16, 5));
    size_t n = (size_t)c.vocab_size * c.hidden_size;
    float *logits[2];
    int tok[8];
    fix_tokens(tok, 8, c.vocab_size, 6);
    for (int keep = 0; keep < 2; keep++) {
        struct model m;
        struct lora l;
        CHECK_OK(model_load_keep(&m, dir, keep ? MODEL_KEEP_FILE : MODEL_KEEP_F32, test_err()));
        CHECK_OK(fix_lora_random(&l, &c, 1u << CFG_V, 2, 2.0, 0, 0.0f, 7));
        l.extra = lk_calloc(1, sizeof *l.extra);
        l.n_extra = 1;
        l.extra[0].name = lk_strdup("lm_head.weight");
        l.extra[0].ndim = 2;
        l.extra[0].shape[0] = c.vocab_size;
        l.extra[0].shape[1] = c.hidden_size;
        l.extra[0].data = lk_malloc(sizeof(float) * n);
        struct lk_rng rng;
        lk_rng_seed(&rng, 8);
        for (size_t i = 0; i < n; i++)
            l.extra[0].data[i] = 0.1f * lk_rng_normal(&rng);
        CHECK_OK(model_apply_extras(&m, &l, test_err()));
        // the adapter's float32 copy replaces the bf16 head; the rest stays bf16
        CHECK(m.w.lm_head.dtype == TENSOR_F32 && !memcmp(m.w.lm_head.f, l.extra[0].data, sizeof(float) * n));
        CHECK_INT(m.w.layer[0].wq.dtype, keep ? TENSOR_BF16 : TENSOR_F32);
        CHECK_OK(model_plan(&m, 2, 4, 0, test_err()));
        CHECK_OK(model_forward(&m, &l, tok, NULL, NULL, NULL, 0, NULL, test_err()));
        logits[keep] = malloc(sizeof(float) * 8 * c.vocab_size);
        memcpy(logits[keep], model_logits(&m), sizeof(float) * 8 * c.vocab_size);
        lora_release(&l);
        model_release(&m); // frees the float32 copy it owns
    }
    double r = rel_diff(logits[1], logits[0], (size_t)8 * c.vocab_size);
    CHECK_MSG(r < 1e-5, "bf16-kept logits differ from float32 by %g", r);
    free(logits[0]);
    free(logits[1]);
}

TEST(weights_pissa_refuses_half_weights)
{
    struct cfg c;
    fix_cfg_llama(&c);
    struct model m;
    CHECK_OK(fix_model_random(&m, &c, 0.3f, 9));
    CHECK_OK(model_weights_convert(&m.w, &c, TENSOR_BF16, test_err()));
    struct lora l;
    CHECK_OK(fix_lora_random(&l, &c, 1u << CFG_Q, 2, 2.0, 0, 0.0f, 10));
    CHECK(lora_init_pissa(&l, &m, test_err()) == LK_ERR_UNSUPPORTED);
    CHECK(strstr(test_errmsg(), "--weights f32"));
    lora_release(&l);
    model_release(&m);
}

/* Logits, loss and gradients of B = 3 rows (LoRA with dropout, or every weight) with nt threads. */
struct lane_run {
    float *logits, *grad;
    size_t n_logits, n_grad;
    double loss;
};

static int lanes_run(const struct cfg *c, int full, int dtype, int nt, struct lane_run *out)
{
    struct model m;
    struct lora l = { 0 };
    int B = 3, T = 5, N = B * T, V = c->vocab_size, tok[15], tgt[15], rc;
    omp_set_num_threads(nt);
    if ((rc = fix_model_random(&m, c, 0.4f, 21)))
        return rc;
    if (dtype != TENSOR_F32 && (rc = model_weights_convert(&m.w, c, dtype, test_err())))
        return rc;
    if (!full && (rc = fix_lora_random(&l, c, (1u << CFG_N_MODULES) - 1, 2, 4.0, 0, 0.2f, 22)))
        return rc;
    fix_tokens(tok, N, V, 23);
    fix_tokens(tgt, N, V, 24);
    tgt[4] = -100;
    m.dropout_seed = 5;
    struct model_weights gw = { 0 };
    rc = model_plan(&m, B, T, 1, test_err());
    if (!rc && m.n_lanes != (nt < B ? nt : B))
        rc = LK_ERR_USAGE;
    if (!rc)
        rc = model_forward(&m, full ? NULL : &l, tok, NULL, NULL, tgt, 0.1f, &out->loss, test_err());
    out->n_logits = (size_t)N * V;
    out->logits = malloc(sizeof(float) * out->n_logits);
    if (!rc)
        memcpy(out->logits, model_logits(&m), sizeof(float) * out->n_logits); // dlogits here
    if (!rc && full)
        rc = model_weights_alloc(&gw, c, test_err());
    out->n_grad = full ? m.w.n : l.n;
    out->grad = calloc(out->n_grad, sizeof(float));
    if (!rc) {
        model_backward(&m, full ? NULL : &l, full ? NULL : out->grad, full ? &gw : NULL);
        if (full)
            memcpy(out->grad, gw.mem, sizeof(float) * gw.n);
    }
    model_weights_release(&gw);
    lora_release(&l);
    model_release(&m);
    return rc;
}

TEST(model_lanes_match_one_lane_and_repeat_bit_for_bit)
{
    int saved = omp_get_max_threads();
    struct cfg c;
    fix_cfg_qwen2(&c);
    for (int k = 0; k < 3 && !test_failed(); k++) {
        int full = k == 2, dtype = k == 1 ? TENSOR_BF16 : TENSOR_F32;
        struct lane_run one, two, three, again;
        CHECK_OK(lanes_run(&c, full, dtype, 1, &one));
        CHECK_OK(lanes_run(&c, full, dtype, 2, &two));   // lanes of 2 and 1 rows
        CHECK_OK(lanes_run(&c, full, dtype, 3, &three)); // one row each
        CHECK_OK(lanes_run(&c, full, dtype, 2, &again));
        CHECK_NEAR(two.loss, one.loss, 1e-6);
        CHECK_NEAR(three.loss, one.loss, 1e-6);
        CHECK(rel_diff(two.logits, one.logits, one.n_logits) < 1e-5);
        CHECK(rel_diff(three.logits, one.logits, one.n_logits) < 1e-5);
        double g2 = rel_diff(two.grad, one.grad, one.n_grad), g3 = rel_diff(three.grad, one.grad, one.n_grad);
        CHECK_MSG(g2 < 1e-5 && g3 < 1e-5, "%s gradients of 2 and 3 lanes differ from one lane by %g, %g",
                  full ? "full" : "LoRA", g2, g3);
        CHECK(one.grad[0] != 0 || one.grad[one.n_grad - 1] != 0);
        CHECK(again.loss == two.loss && !memcmp(again.grad, two.grad, sizeof(float) * two.n_grad));
        struct lane_run *r[4] = { &one, &two, &three, &again };
        for (int i = 0; i < 4; i++) {
            free(r[i]->logits);
            free(r[i]->grad);
        }
    }
    omp_set_num_threads(saved);
}

TEST(weights_flag_on_logits_generate_and_train)
{
    // own copies: test_path's buffers rotate, and test_sh uses one
    char dir[4096], lf[4096], l32[4096], data[4096], out[4096], runs[4096];
    snprintf(dir, sizeof dir, "%s", test_path("m"));
    snprintf(lf, sizeof lf, "%s", test_path("file.st"));
    snprintf(l32, sizeof l32, "%s", test_path("f32.st"));
    snprintf(data, sizeof data, "%s", test_path("d.jsonl"));
    snprintf(out, sizeof out, "%s", test_path("o"));
    snprintf(runs, sizeof runs, "%s", test_path("runs.db"));
    CHECK_OK(save_random(dir, TENSOR_BF16, 11));
    // logits: the bf16-kept engine against the float32 one
    CHECK_INT(test_sh("%s logits --model '%s' --tokens '1,2,3;4,5,6' --out '%s'", test_lorakit(), dir, lf), 0);
    CHECK_INT(test_sh("%s logits --model '%s' --tokens '1,2,3;4,5,6' --out '%s' --weights f32", test_lorakit(), dir,
                      l32), 0);
    struct st_file a, b;
    CHECK_OK(st_open(&a, lf, test_err()));
    CHECK_OK(st_open(&b, l32, test_err()));
    const struct st_tensor *ta = st_find(&a, "logits"), *tb = st_find(&b, "logits");
    CHECK(ta && tb && ta->numel == tb->numel);
    double r = rel_diff(st_tensor_f32(ta), st_tensor_f32(tb), ta->numel);
    CHECK_MSG(r < 1e-5, "logits --weights file vs f32: %g", r);
    st_close(&a);
    st_close(&b);
    CHECK_INT(test_sh("%s logits --model '%s' --tokens '1' --out '%s' --weights f64", test_lorakit(), dir, lf), 2);
    CHECK(strstr(test_output(), "unknown --weights 'f64'"));
    // train: a full fine-tune refuses bf16-kept weights, LoRA trains on them
    FILE *f = fopen(data, "w");
    CHECK(f != NULL);
    for (int i = 0; i < 6; i++)
        fprintf(f, "{\"input_ids\": [%d, %d, %d, %d, %d]}\n", i + 1, i + 2, 3, 4, i + 5);
    fclose(f);
    CHECK_INT(test_sh("%s train --model '%s' --data '%s' --out '%s' --full --weights file --quiet", test_lorakit(), dir,
                      data, out), 2);
    CHECK(strstr(test_output(), "float32 master weights"));
    double loss[2];
    for (int k = 0; k < 2; k++) {
        CHECK_INT(test_sh("%s train --model '%s' --data '%s' --out '%s' --steps 3 --batch 2 --weights %s "
                          "--runs '%s' --overwrite", test_lorakit(), dir, data, out, k ? "f32" : "file", runs), 0);
        const char *p = strstr(test_output(), "-> ");
        CHECK(p && sscanf(p + 3, "%lf", &loss[k]) == 1);
    }
    CHECK_MSG(fabs(loss[0] - loss[1]) < 1e-4 * fabs(loss[1]), "final loss file %g vs f32 %g", loss[0], loss[1]);
}

TEST(weights_generate_file_and_f32_give_the_same_greedy_text)
{
    FILE *t = fopen(test_path("text.txt"), "w");
    CHECK(t != NULL);
    for (int i = 0; i < 30; i++)
        fprintf(t, "The clinic number %d treats fever and cough. Question %d answer.\n", i, i);
    fclose(t);
    CHECK_INT(test_sh("%s init --preset tiny --out '%s/m' --seed 3 --dtype bf16 && "
                      "%s tokenizer train --text '%s/text.txt' --vocab 300 --out '%s/m'",
                      test_lorakit(), test_tmpdir(), test_lorakit(), test_tmpdir(), test_tmpdir()), 0);
    const char *cmd = "%s generate --model '%s/m' --chat 'What is treated?' --max-new 40 --weights %s "
                      "> '%s/%s.txt'";
    CHECK_INT(test_sh(cmd, test_lorakit(), test_tmpdir(), "file", test_tmpdir(), "file"), 0);
    CHECK_INT(test_sh(cmd, test_lorakit(), test_tmpdir(), "f32", test_tmpdir(), "f32"), 0);
    CHECK_INT(test_sh("cmp '%s/file.txt' '%s/f32.txt'", test_tmpdir(), test_tmpdir()), 0);
    CHECK_INT(test_sh("test -s '%s/file.txt'", test_tmpdir()), 0);
}
