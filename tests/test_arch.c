/*
 * test_arch.c - Qwen3 and Llama 3.2 through every command, end to end on tiny models made here
 * (`lorakit init --config` with a config written below, a tokenizer from `lorakit tokenizer
 * train`): a LoRA adapter trained (loss falls, PEFT tensor names), merged (--verify against the
 * adapter), evaluated (the tuned model answers what it was trained on; the base does not), and a
 * full fine-tune (q_norm / k_norm train) that svd-compress keeps with --keep-other and diff lists.
 * The Qwen3 config has heads x head_dim != hidden and GQA; the Llama one llama3 rope scaling with
 * an original context of 64 positions and frequencies in all three bands.
 */
#include "test.h"

#include <cJSON.h>
#include <stdlib.h>
#include <string.h>

#include "../libcore/lk.h"
#include "../libcore/model.h"
#include "../libcore/st.h"
#include "ref_model.h"

static const char *QWEN3_CFG =
    "{\"architectures\":[\"Qwen3ForCausalLM\"],\"model_type\":\"qwen3\",\"hidden_size\":64,"
    "\"intermediate_size\":128,\"num_hidden_layers\":2,\"num_attention_heads\":4,\"num_key_value_heads\":2,"
    "\"head_dim\":32,\"vocab_size\":320,\"rms_norm_eps\":1e-6,\"rope_theta\":1000000,\"attention_bias\":false,"
    "\"tie_word_embeddings\":true,\"max_position_embeddings\":256,\"initializer_range\":0.3,"
    "\"torch_dtype\":\"float32\"}\n";

/* head_dim 16, theta 500000: wavelengths 2 pi / inv_freq of 6.3, 32.4, 167, ... against the band
 * edges 64 / 4 = 16 and 64 / 1 = 64 (original context 64): one high, one medium, six low; the
 * templated records (Llama 3.2's system header included) run past position 64. */
static const char *LLAMA32_CFG =
    "{\"architectures\":[\"LlamaForCausalLM\"],\"model_type\":\"llama\",\"hidden_size\":64,"
    "\"intermediate_size\":128,\"num_hidden_layers\":2,\"num_attention_heads\":4,\"num_key_value_heads\":2,"
    "\"head_dim\":16,\"vocab_size\":320,\"rms_norm_eps\":1e-5,\"rope_theta\":500000.0,\"rope_scaling\":"
    "{\"factor\":32.0,\"high_freq_factor\":4.0,\"low_freq_factor\":1.0,\"original_max_position_embeddings\":64,"
    "\"rope_type\":\"llama3\"},\"attention_bias\":false,\"mlp_bias\":false,\"tie_word_embeddings\":true,"
    "\"max_position_embeddings\":256,\"initializer_range\":0.3,\"torch_dtype\":\"float32\"}\n";

/* Data, tokenizer and model in tmpdir: chat.jsonl (20 records), qa.jsonl and docs.jsonl (the
 * same 20 facts), m/ (model + tokenizer with the template's special tokens). */
static int make_fixture(const char *config, const char *specials)
{
    FILE *f = fopen(test_path("chat.jsonl"), "w"), *t = fopen(test_path("text.txt"), "w");
    FILE *q = fopen(test_path("qa.jsonl"), "w"), *d = fopen(test_path("docs.jsonl"), "w");
    FILE *c = fopen(test_path("cfg.json"), "w");
    if (!f || !t || !q || !d || !c)
        return -1;
    for (int i = 0; i < 20; i++) {
        char ans[64];
        snprintf(ans, sizeof ans, "Item %d has code %c%d%d.", i, 'A' + i, i * 7 % 10, i * 3 % 10);
        fprintf(f, "{\"messages\":[{\"role\":\"user\",\"content\":\"What is the code of item %d?\"},"
                   "{\"role\":\"assistant\",\"content\":\"%s\"}]}\n", i, ans);
        fprintf(q, "{\"id\":\"q%d\",\"question\":\"What is the code of item %d?\",\"answer\":\"%s\","
                   "\"doc_id\":\"d%d\"}\n", i, i, ans, i);
        fprintf(d, "{\"id\":\"d%d\",\"title\":\"item %d\",\"text\":\"%s\"}\n", i, i, ans);
        for (int k = 0; k < 3; k++)
            fprintf(t, "What is the code of item %d? %s\n", i, ans);
    }
    fputs(config, c);
    fclose(f);
    fclose(t);
    fclose(q);
    fclose(d);
    fclose(c);
    const char *dir = test_tmpdir();
    return test_sh("%s init --config '%s/cfg.json' --out '%s/m' --seed 1 && "
                   "%s tokenizer train --text '%s/text.txt' --vocab 300 --out '%s/m' %s",
                   test_lorakit(), dir, dir, test_lorakit(), dir, dir, specials);
}

/* The two losses of "done: N steps in Xs, loss A -> B" in the last output. */
static int done_losses(double *first, double *last)
{
    const char *p = strstr(test_output(), "done: ");
    p = p ? strstr(p, "loss ") : NULL;
    return p && sscanf(p, "loss %lf -> %lf", first, last) == 2 ? 0 : -1;
}

/* A metric of a mode in `lorakit eval --json`'s summary ({"modes": {"ft": {"em": {"mean": ...}}}}),
 * NAN when absent. */
static double eval_metric(const char *json, const char *mode, const char *metric)
{
    cJSON *root = cJSON_Parse(json);
    const cJSON *m = cJSON_GetObjectItem(cJSON_GetObjectItem(root, "modes"), mode);
    const cJSON *v = cJSON_GetObjectItem(cJSON_GetObjectItem(m, metric), "mean");
    double em = cJSON_IsNumber(v) ? v->valuedouble : NAN;
    cJSON_Delete(root);
    return em;
}

/* A tensor of a safetensors file as float32 (caller frees), or NULL. */
static float *read_tensor(const char *file, const char *name, size_t *n)
{
    struct st_file f;
    if (st_open(&f, file, NULL))
        return NULL;
    const struct st_tensor *t = st_find(&f, name);
    float *v = t ? malloc(sizeof(float) * t->numel) : NULL;
    if (v && st_tensor_to_f32(t, v, NULL)) {
        free(v);
        v = NULL;
    }
    *n = t ? t->numel : 0;
    st_close(&f);
    return v;
}

/* min_em: the exact match the tuned model must reach on its own training questions. */
static void arch_end_to_end(const char *config, const char *specials, const char *train_tmpl,
                            const char *eval_tmpl, int qk_norm, double max_loss, double min_em)
{
    const char *dir = test_tmpdir(), *lk = test_lorakit();
    CHECK_MSG(make_fixture(config, specials) == 0, "fixture: %s", test_output());
    CHECK_MSG(test_sh("%s info '%s/m'", lk, dir) == 0, "info: %s", test_output());
    CHECK_MSG(!strstr(test_output(), "warning"), "info warns: %s", test_output());
    CHECK(!qk_norm || strstr(test_output(), "model.layers.1.self_attn.k_norm.weight"));
    // 1. a LoRA adapter: overfits the 20 records
    CHECK_MSG(test_sh("%s train --model '%s/m' --data '%s/chat.jsonl' --out '%s/ad' --steps 200 --lr 1e-2 --rank 16 "
                      "--alpha 32 --batch 4 --threads 1 --template %s", lk, dir, dir, dir, train_tmpl) == 0,
              "train: %s", test_output());
    double a, b;
    CHECK_INT(done_losses(&a, &b), 0);
    CHECK_MSG(b < max_loss && a > 5, "LoRA loss %g -> %g: did not learn the records", a, b);
    // PEFT's tensor names for these models (the same module paths as Llama / Qwen2)
    char p[1200];
    snprintf(p, sizeof p, "%s/ad/adapter_model.safetensors", dir);
    size_t n;
    float *v = read_tensor(p, "base_model.model.model.layers.1.self_attn.k_proj.lora_A.weight", &n);
    CHECK_MSG(v && n == 16 * 64, "no k_proj lora_A of [16, 64] in %s", p);
    free(v);
    // 2. merged: the merged model's logits equal base + adapter (--verify), rope settings kept
    CHECK_MSG(test_sh("%s merge --model '%s/m' --adapter '%s/ad' --out '%s/merged' --verify", lk, dir, dir, dir) == 0,
              "merge: %s", test_output());
    struct model mm;
    snprintf(p, sizeof p, "%s/merged", dir);
    CHECK_OK(model_load(&mm, p, test_err()));
    CHECK(mm.cfg.qk_norm == qk_norm && mm.cfg.rope_scaling.type == (qk_norm ? CFG_ROPE_DEFAULT : CFG_ROPE_LLAMA3));
    model_release(&mm);
    // 3. evaluated: the tuned model answers its training questions, the base does not
    CHECK_MSG(test_sh("%s eval --model '%s/m' --adapter '%s/ad' --qa '%s/qa.jsonl' --docs '%s/docs.jsonl' --k 0 "
                      "--modes base,ft --max-new 16 --threads 1 --template %s --runs '%s/runs.db' --json --quiet",
                      lk, dir, dir, dir, dir, eval_tmpl, dir) == 0, "eval: %s", test_output());
    // (the answers' NLL under eval's prompt: low only if eval templates them as training did)
    double em_ft = eval_metric(test_output(), "ft", "em"), em_base = eval_metric(test_output(), "base", "em");
    double nll_ft = eval_metric(test_output(), "ft", "nll"), nll_base = eval_metric(test_output(), "base", "nll");
    fprintf(stderr, "    eval: exact match base %.2f, tuned %.2f; answer NLL base %.3f, tuned %.3f\n", em_base, em_ft,
            nll_base, nll_ft);
    CHECK_MSG(em_ft >= min_em && em_base < 0.2 && nll_ft < 0.1 * nll_base,
              "base: em %g nll %g, tuned: em %g nll %g\n%s", em_base, nll_base, em_ft, nll_ft, test_output());
    // 4. a full fine-tune: every weight trains, q_norm / k_norm included
    CHECK_MSG(test_sh("%s train --model '%s/m' --data '%s/chat.jsonl' --out '%s/full' --full --steps 60 --lr 3e-3 "
                      "--batch 4 --threads 1 --template %s", lk, dir, dir, dir, train_tmpl) == 0,
              "train --full: %s", test_output());
    CHECK_INT(done_losses(&a, &b), 0);
    CHECK_MSG(b < a * 0.5, "full fine-tune loss %g -> %g", a, b);
    if (qk_norm) {
        char base[1200];
        snprintf(base, sizeof base, "%s/m/model.safetensors", dir);
        snprintf(p, sizeof p, "%s/full/model.safetensors", dir);
        size_t n0, n1;
        float *w0 = read_tensor(base, "model.layers.0.self_attn.q_norm.weight", &n0);
        float *w1 = read_tensor(p, "model.layers.0.self_attn.q_norm.weight", &n1);
        CHECK(w0 && w1 && n0 == 32 && n1 == 32);
        double moved = 0;
        for (size_t i = 0; i < n0; i++)
            moved += fabs(w1[i] - w0[i]);
        free(w0);
        free(w1);
        CHECK_MSG(moved > 1e-3, "q_norm did not train (total change %g)", moved);
    }
    // 5. svd-compress keeps the norms with --keep-other; diff lists them
    CHECK_MSG(test_sh("%s svd-compress --base '%s/m' --tuned '%s/full' --out '%s/comp' --rank 4 --keep-other --quiet",
                      lk, dir, dir, dir) == 0, "svd-compress: %s", test_output());
    snprintf(p, sizeof p, "%s/comp/adapter_model.safetensors", dir);
    v = read_tensor(p, "base_model.model.model.layers.1.post_attention_layernorm.weight", &n);
    CHECK_MSG(v && n == 64, "no post_attention_layernorm kept in %s", p);
    free(v);
    if (qk_norm) {
        v = read_tensor(p, "base_model.model.model.layers.1.self_attn.k_norm.weight", &n);
        CHECK_MSG(v && n == 32, "no k_norm kept in %s", p);
        free(v);
    }
    CHECK_MSG(test_sh("%s diff '%s/m' '%s/full'", lk, dir, dir) == 0, "diff: %s", test_output());
    CHECK(strstr(test_output(), "layers.0.self_attn.q_proj") != NULL);
    CHECK_MSG(!qk_norm || strstr(test_output(), "q_norm"), "diff does not list q_norm:\n%s", test_output());
}

TEST(arch_qwen3_train_merge_eval_end_to_end)
{
    // Qwen3's template: trained with the empty think block masked, so evaluated with
    // enable_thinking=false (the prompt then ends with the same block)
    arch_end_to_end(QWEN3_CFG, "--special '<think>' --special '</think>'", "qwen3", "qwen3-nothink", 1, 0.05, 0.9);
}

TEST(arch_llama32_train_merge_eval_end_to_end)
{
    // Llama 3.2's template opens every record with the same ~70-token system header; a tiny Llama
    // (no q/k norm) then learns the codes to a loss of ~0.3 in 200 steps, not to zero: the check
    // is the loss and the answers' likelihood, not exact recall
    arch_end_to_end(LLAMA32_CFG, "--special '<|begin_of_text|>' --special '<|end_of_text|>' "
                                 "--special '<|start_header_id|>' --special '<|end_header_id|>' --special '<|eot_id|>'",
                    "llama3.2", "llama3.2", 0, 0.6, 0.0);
}

/* A LlamaForCausalLM with attention_bias as transformers saves it: the tensor names written out
 * here by hand (not from lorakit's tables), o_proj.bias among them, random values. with_o 0
 * leaves o_proj.bias out. */
static int write_llama_bias_folder(const char *dir, int with_o, float **out_bo)
{
    enum { C = 12, F = 20, L = 2, NH = 2, NKV = 1, HS = 6, V = 29 };
    char path[1200];
    snprintf(path, sizeof path, "%s/config.json", dir);
    FILE *f = fopen(path, "w");
    if (!f)
        return -1;
    fprintf(f, "{\"architectures\":[\"LlamaForCausalLM\"],\"model_type\":\"llama\",\"hidden_size\":%d,"
               "\"intermediate_size\":%d,\"num_hidden_layers\":%d,\"num_attention_heads\":%d,"
               "\"num_key_value_heads\":%d,\"head_dim\":%d,\"vocab_size\":%d,\"rms_norm_eps\":1e-5,"
               "\"rope_theta\":10000.0,\"attention_bias\":true,\"mlp_bias\":false,\"tie_word_embeddings\":false,"
               "\"max_position_embeddings\":64,\"torch_dtype\":\"float32\"}\n", C, F, L, NH, NKV, HS, V);
    fclose(f);
    struct { const char *fmt; int64_t r, c; } per[] = {
        { "model.layers.%d.input_layernorm.weight", C, 0 },
        { "model.layers.%d.self_attn.q_proj.weight", NH * HS, C }, { "model.layers.%d.self_attn.q_proj.bias", NH * HS, 0 },
        { "model.layers.%d.self_attn.k_proj.weight", NKV * HS, C }, { "model.layers.%d.self_attn.k_proj.bias", NKV * HS, 0 },
        { "model.layers.%d.self_attn.v_proj.weight", NKV * HS, C }, { "model.layers.%d.self_attn.v_proj.bias", NKV * HS, 0 },
        { "model.layers.%d.self_attn.o_proj.weight", C, NH * HS }, { "model.layers.%d.self_attn.o_proj.bias", C, 0 },
        { "model.layers.%d.post_attention_layernorm.weight", C, 0 },
        { "model.layers.%d.mlp.gate_proj.weight", F, C }, { "model.layers.%d.mlp.up_proj.weight", F, C },
        { "model.layers.%d.mlp.down_proj.weight", C, F },
    };
    enum { NPER = sizeof per / sizeof per[0] };
    struct st_item items[3 + L * NPER];
    char names[3 + L * NPER][96];
    float *vals[3 + L * NPER];
    int n = 0;
    struct lk_rng rng;
    lk_rng_seed(&rng, 77);
#define ITEM(NAME, R, K)                                                                                 \
    do {                                                                                                 \
        snprintf(names[n], sizeof names[n], "%s", NAME);                                                 \
        size_t cnt = (size_t)(R) * ((K) ? (size_t)(K) : 1u);                                             \
        vals[n] = malloc(sizeof(float) * cnt);                                                           \
        int norm = strstr(names[n], "norm") != NULL;                                                     \
        for (size_t j = 0; j < cnt; j++)                                                                 \
            vals[n][j] = norm ? 1.0f + 0.1f * lk_rng_normal(&rng) : 0.3f * lk_rng_normal(&rng);         \
        items[n] = (struct st_item){ names[n], (K) ? 2 : 1, { (R), (K) }, vals[n] };                     \
        n++;                                                                                             \
    } while (0)
    ITEM("model.embed_tokens.weight", V, C);
    for (int l = 0; l < L; l++)
        for (int k = 0; k < NPER; k++) {
            char nm[96];
            snprintf(nm, sizeof nm, per[k].fmt, l);
            if (!with_o && strstr(nm, "o_proj.bias"))
                continue;
            ITEM(nm, per[k].r, per[k].c);
            if (strstr(nm, "o_proj.bias") && out_bo)
                memcpy(out_bo[l], vals[n - 1], sizeof(float) * C);
        }
    ITEM("model.norm.weight", C, 0);
    ITEM("lm_head.weight", V, C);
#undef ITEM
    snprintf(path, sizeof path, "%s/model.safetensors", dir);
    int rc = st_write_f32(path, items, n, TENSOR_F32, test_err());
    for (int i = 0; i < n; i++)
        free(vals[i]);
    return rc;
}

TEST(arch_llama_attention_bias_folder_loads_o_proj_bias)
{
    // transformers' LlamaAttention: q/k/v_proj AND o_proj are nn.Linear(..., bias=config.attention_bias)
    const char *dir = test_tmpdir();
    char m1[1100], m2[1100];
    snprintf(m1, sizeof m1, "%s/bias", dir);
    snprintf(m2, sizeof m2, "%s/no-o-bias", dir);
    CHECK(test_sh("mkdir -p '%s' '%s'", m1, m2) == 0);
    float b0[12], b1[12], *bo[2] = { b0, b1 };
    CHECK_INT(write_llama_bias_folder(m1, 1, bo), 0);
    // every tensor is one the config implies: no warning about a tensor lorakit does not use
    CHECK_MSG(test_sh("%s info '%s'", test_lorakit(), m1) == 0, "info: %s", test_output());
    CHECK_MSG(!strstr(test_output(), "warning") && strstr(test_output(), "attention biases q/k/v/o_proj"),
              "info: %s", test_output());
    struct model m;
    CHECK_OK(model_load(&m, m1, test_err()));
    CHECK(m.w.layer[0].bo && m.w.layer[1].bo);
    CHECK(!memcmp(m.w.layer[0].bo, b0, sizeof b0) && !memcmp(m.w.layer[1].bo, b1, sizeof b1));
    // logits against the float64 reference (which adds the bias the model holds)
    int tok[2 * 9];
    for (int i = 0; i < 18; i++)
        tok[i] = (i * 7 + 3) % 29;
    CHECK_OK(model_plan(&m, 2, 9, 0, test_err()));
    CHECK_OK(model_forward(&m, NULL, tok, NULL, NULL, NULL, 0, NULL, test_err()));
    double ref[18 * 29], worst = 0, top = 0;
    ref_forward(&m, NULL, tok, NULL, NULL, NULL, 2, 9, 0, 0, ref);
    for (int i = 0; i < 18 * 29; i++) {
        worst = fmax(worst, fabs(model_logits(&m)[i] - ref[i]));
        top = fmax(top, fabs(ref[i]));
    }
    CHECK_MSG(worst / top < 1e-5, "logits differ from the reference by %g (rel)", worst / top);
    model_release(&m);
    // without o_proj.bias the folder is not what its config says: refused, the tensor named
    CHECK_INT(write_llama_bias_folder(m2, 0, NULL), 0);
    CHECK_INT(model_load(&m, m2, test_err()), LK_ERR_MISSING);
    CHECK_MSG(strstr(test_errmsg(), "model.layers.0.self_attn.o_proj.bias") != NULL, "%s", test_errmsg());
    CHECK(test_sh("%s info '%s'", test_lorakit(), m2) != 0 && strstr(test_output(), "o_proj.bias"));
}

TEST(arch_llama_attention_bias_full_compress_merge_diff)
{
    // o_proj.bias is a bias like q/k/v's: a full fine-tune trains it, svd-compress puts its change
    // in o_proj's lora_B.bias (the base now has a bias to add it to), merge adds it back, diff lists it
    const char *dir = test_tmpdir(), *lk = test_lorakit();
    char p[1200];
    snprintf(p, sizeof p, "%s/cfg.json", dir);
    FILE *f = fopen(p, "w");
    CHECK(f != NULL);
    fputs("{\"architectures\":[\"LlamaForCausalLM\"],\"model_type\":\"llama\",\"hidden_size\":64,"
          "\"intermediate_size\":128,\"num_hidden_layers\":2,\"num_attention_heads\":4,\"num_key_value_heads\":2,"
          "\"head_dim\":16,\"vocab_size\":320,\"rms_norm_eps\":1e-5,\"rope_theta\":500000.0,\"attention_bias\":true,"
          "\"tie_word_embeddings\":true,\"max_position_embeddings\":256,\"initializer_range\":0.3,"
          "\"torch_dtype\":\"float32\"}\n", f);
    fclose(f);
    snprintf(p, sizeof p, "%s/d.jsonl", dir);
    f = fopen(p, "w");
    CHECK(f != NULL);
    for (int i = 0; i < 20; i++)
        fprintf(f, "{\"input_ids\":[%d,%d,%d,7,8,9,10,11],\"labels\":[%d,%d,%d,7,8,9,10,11]}\n", i, i + 3, 2 * i, i,
                i + 3, 2 * i);
    fclose(f);
    CHECK_MSG(test_sh("%s init --config '%s/cfg.json' --out '%s/m' --seed 1 && "
                      "%s train --model '%s/m' --data '%s/d.jsonl' --out '%s/full' --full --steps 20 --lr 3e-3 "
                      "--batch 4 --threads 1 --quiet && "
                      "%s svd-compress --base '%s/m' --tuned '%s/full' --out '%s/comp' --rank 4 --quiet && "
                      "%s merge --model '%s/m' --adapter '%s/comp' --out '%s/merged' --verify",
                      lk, dir, dir, lk, dir, dir, dir, lk, dir, dir, dir, lk, dir, dir, dir) == 0,
              "%s", test_output());
    char base[1200], full[1200], comp[1200], merged[1200];
    snprintf(base, sizeof base, "%s/m/model.safetensors", dir);
    snprintf(full, sizeof full, "%s/full/model.safetensors", dir);
    snprintf(comp, sizeof comp, "%s/comp/adapter_model.safetensors", dir);
    snprintf(merged, sizeof merged, "%s/merged/model.safetensors", dir);
    size_t n0, n1, n2, n3;
    float *b0 = read_tensor(base, "model.layers.1.self_attn.o_proj.bias", &n0);
    float *b1 = read_tensor(full, "model.layers.1.self_attn.o_proj.bias", &n1);
    float *lb = read_tensor(comp, "base_model.model.model.layers.1.self_attn.o_proj.lora_B.bias", &n2);
    float *b3 = read_tensor(merged, "model.layers.1.self_attn.o_proj.bias", &n3);
    CHECK(b0 && b1 && lb && b3 && n0 == 64 && n1 == 64 && n2 == 64 && n3 == 64);
    double moved = 0, worst = 0, worst_m = 0;
    for (int i = 0; b0 && b1 && lb && b3 && i < 64; i++) {
        moved += fabs(b1[i] - b0[i]);
        worst = fmax(worst, fabs((double)lb[i] - (b1[i] - b0[i]))); // the adapter's scale is 1
        worst_m = fmax(worst_m, fabs((double)b3[i] - b1[i]));
    }
    CHECK_MSG(moved > 1e-3, "o_proj.bias did not train (total change %g)", moved);
    CHECK_MSG(worst < 1e-6 && worst_m < 1e-6, "lora_B.bias off the bias change by %g, merged bias off by %g", worst,
              worst_m);
    free(b0), free(b1), free(lb), free(b3);
    CHECK_MSG(test_sh("%s diff '%s/m' '%s/full'", lk, dir, dir) == 0, "diff: %s", test_output());
    CHECK_MSG(strstr(test_output(), "model.layers.0.self_attn.o_proj.bias") != NULL, "%s", test_output());
}
