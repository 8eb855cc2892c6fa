/*
 * test_lora.c - PEFT adapter files (read back bit-identical, checked against the published
 * layout field by field, every refusal), model folders (round trip, bf16 rounding), and
 * `lorakit logits` / `lorakit info` on adapters end to end.
 */
#include "test.h"

#include <cJSON.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "../libcore/lora.h"
#include "../libcore/model.h"
#include "../libcore/st.h"
#include "../libcore/tensor.h"
#include "fix_model.h"

static int make_lora(struct lora *l, const struct cfg *c, int with_patterns, uint64_t seed)
{
    struct lora_config lc;
    lora_config_default(&lc);
    lc.r = 4;
    lc.alpha = 8;
    lc.lora_bias = with_patterns;
    char rk[] = "model.layers.1.mlp.down_proj", ak[] = "down_proj";
    struct lora_pattern rp = { rk, 2 }, ap = { ak, 3 };
    if (with_patterns) {
        lc.rank_pattern = &rp;
        lc.n_rank_pattern = 1;
        lc.alpha_pattern = &ap;
        lc.n_alpha_pattern = 1;
    }
    snprintf(lc.base_model, sizeof lc.base_model, "some/base");
    int rc = lora_init(l, &lc, c, NULL);
    if (rc)
        return rc;
    struct lk_rng rng;
    lk_rng_seed(&rng, seed);
    for (size_t i = 0; i < l->n; i++)
        l->mem[i] = lk_rng_normal(&rng);
    return LK_OK;
}

TEST(lora_roundtrip_is_bit_identical_with_patterns_and_bias)
{
    struct cfg c;
    fix_cfg_qwen2(&c);
    struct lora a, b;
    CHECK_OK(make_lora(&a, &c, 1, 1));
    const char *dir = test_path("adapter");
    CHECK_OK(lora_save(&a, dir, test_err()));
    CHECK_OK(lora_load(&b, dir, &c, test_err()));
    CHECK_INT(a.n, b.n);
    CHECK_INT(a.n_mod, b.n_mod);
    CHECK(memcmp(a.mem, b.mem, sizeof(float) * a.n) == 0);
    for (int i = 0; i < a.n_mod; i++) {
        CHECK_INT(a.mod[i].R, b.mod[i].R);
        CHECK(a.mod[i].scale == b.mod[i].scale);
    }
    // the pattern applied: layer 1 down_proj has rank 2 and alpha 3; layer 0 down_proj alpha 3, rank 4
    struct lora_module *m1 = lora_find(&b, 1, CFG_DOWN), *m0 = lora_find(&b, 0, CFG_DOWN);
    CHECK(m1 && m0);
    CHECK_INT(m1->R, 2);
    CHECK_NEAR(m1->scale, 3.0 / 2, 1e-7);
    CHECK_INT(m0->R, 4);
    CHECK_NEAR(m0->scale, 3.0 / 4, 1e-7);
    CHECK_NEAR(lora_find(&b, 0, CFG_Q)->scale, 8.0 / 4, 1e-7);
    lora_release(&a);
    lora_release(&b);
}

TEST(lora_files_follow_the_peft_layout)
{
    struct cfg c;
    fix_cfg_qwen2(&c);
    struct lora a;
    CHECK_OK(make_lora(&a, &c, 0, 2));
    const char *dir = test_path("adapter");
    CHECK_OK(lora_save(&a, dir, test_err()));
    // adapter_config.json, read independently with cJSON
    char *text;
    CHECK_OK(lk_read_file(test_path("adapter/adapter_config.json"), &text, NULL, test_err()));
    cJSON *o = cJSON_Parse(text);
    CHECK(o != NULL);
    CHECK(!strcmp(cJSON_GetObjectItem(o, "peft_type")->valuestring, "LORA"));
    CHECK(!strcmp(cJSON_GetObjectItem(o, "task_type")->valuestring, "CAUSAL_LM"));
    CHECK(!strcmp(cJSON_GetObjectItem(o, "bias")->valuestring, "none"));
    CHECK_INT(cJSON_GetObjectItem(o, "r")->valueint, 4);
    CHECK_NEAR(cJSON_GetObjectItem(o, "lora_alpha")->valuedouble, 8, 0);
    CHECK(cJSON_IsFalse(cJSON_GetObjectItem(o, "use_rslora")));
    CHECK(!strcmp(cJSON_GetObjectItem(o, "base_model_name_or_path")->valuestring, "some/base"));
    const cJSON *tm = cJSON_GetObjectItem(o, "target_modules");
    CHECK_INT(cJSON_GetArraySize(tm), 7);
    const char *sorted[] = { "down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj" };
    for (int i = 0; i < 7; i++)
        CHECK(!strcmp(cJSON_GetArrayItem(tm, i)->valuestring, sorted[i]));
    // keys in sorted order, as PEFT's json.dumps(sort_keys=True) writes them
    const cJSON *prev = NULL;
    for (const cJSON *e = o->child; e; prev = e, e = e->next)
        if (prev)
            CHECK_MSG(strcmp(prev->string, e->string) < 0, "keys not sorted: %s before %s", prev->string, e->string);
    cJSON_Delete(o);
    lk_free(text);
    // adapter_model.safetensors: names, shapes, dtype, metadata
    struct st_file f;
    CHECK_OK(st_open(&f, test_path("adapter/adapter_model.safetensors"), test_err()));
    CHECK_INT(f.n, 2 * 7 * 2);
    CHECK(st_meta(&f, "format") && !strcmp(st_meta(&f, "format"), "pt"));
    const struct st_tensor *qa = st_find(&f, "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight");
    const struct st_tensor *kb = st_find(&f, "base_model.model.model.layers.1.self_attn.k_proj.lora_B.weight");
    const struct st_tensor *da = st_find(&f, "base_model.model.model.layers.1.mlp.down_proj.lora_A.weight");
    CHECK(qa && kb && da);
    CHECK(qa->dtype == TENSOR_F32 && qa->shape[0] == 4 && qa->shape[1] == c.hidden_size);
    CHECK(kb->shape[0] == c.num_key_value_heads * c.head_dim && kb->shape[1] == 4);
    CHECK(da->shape[0] == 4 && da->shape[1] == c.intermediate_size);
    st_close(&f);
    lora_release(&a);
}

/* Writes an adapter folder from raw pieces: a config text and tensors. */
static void write_adapter(const char *dir, const char *config, const struct st_item *items, int n)
{
    struct lk_err err = { 0 };
    lk_mkdir_p(dir, &err);
    char p[1024];
    snprintf(p, sizeof p, "%s/adapter_config.json", dir);
    lk_write_file_atomic(p, config, strlen(config), &err);
    snprintf(p, sizeof p, "%s/adapter_model.safetensors", dir);
    st_write_f32(p, items, n, TENSOR_F32, &err);
}

static float zeros[4096];
#define CFG_QONLY "{\"r\":2,\"lora_alpha\":4%s}"
#define STD ",\"peft_type\":\"LORA\",\"target_modules\":[\"q_proj\"]"
#define QA(l) "base_model.model.model.layers." #l ".self_attn.q_proj.lora_A.weight"
#define QB(l) "base_model.model.model.layers." #l ".self_attn.q_proj.lora_B.weight"

static void expect_adapter_refused(const char *config_extra, const struct st_item *items, int n, const char *want)
{
    struct cfg c;
    fix_cfg_qwen2(&c);
    char config[512];
    snprintf(config, sizeof config, CFG_QONLY, config_extra);
    write_adapter(test_path("bad"), config, items, n);
    struct lora l;
    struct lk_err err = { 0 };
    int rc = lora_load(&l, test_path("bad"), &c, &err);
    CHECK_MSG(rc != LK_OK, "adapter accepted, expected '%s'", want);
    CHECK_MSG(strstr(err.msg, want) && strstr(err.msg, "bad"), "message '%s' lacks '%s' or the path", err.msg, want);
}

TEST(lora_rejects_adapter_for_another_base)
{
    // hidden 12 (the Llama fixture) against a hidden-16 base
    struct st_item it[4] = { { QA(0), 2, { 2, 12 }, zeros }, { QB(0), 2, { 16, 2 }, zeros },
                             { QA(1), 2, { 2, 12 }, zeros }, { QB(1), 2, { 16, 2 }, zeros } };
    expect_adapter_refused(STD, it, 4, "another base model");
}

TEST(lora_rejects_rank_mismatch_between_a_and_b)
{
    struct st_item it[4] = { { QA(0), 2, { 2, 16 }, zeros }, { QB(0), 2, { 16, 3 }, zeros },
                             { QA(1), 2, { 2, 16 }, zeros }, { QB(1), 2, { 16, 2 }, zeros } };
    expect_adapter_refused(STD, it, 4, "rank mismatch");
}

TEST(lora_rejects_rank_other_than_config)
{
    struct st_item it[4] = { { QA(0), 2, { 3, 16 }, zeros }, { QB(0), 2, { 16, 3 }, zeros },
                             { QA(1), 2, { 3, 16 }, zeros }, { QB(1), 2, { 16, 3 }, zeros } };
    expect_adapter_refused(STD, it, 4, "rank 3");
}

TEST(lora_rejects_missing_tensor)
{
    struct st_item it[3] = { { QA(0), 2, { 2, 16 }, zeros }, { QB(0), 2, { 16, 2 }, zeros },
                             { QA(1), 2, { 2, 16 }, zeros } };
    expect_adapter_refused(STD, it, 3, "lora_B.weight");
}

TEST(lora_rejects_layer_the_base_lacks)
{
    struct st_item it[2] = { { QA(7), 2, { 2, 16 }, zeros }, { QB(7), 2, { 16, 2 }, zeros } };
    expect_adapter_refused(STD, it, 2, "layer 7");
}

TEST(lora_rejects_bias_without_lora_bias_flag)
{
    struct st_item it[5] = { { QA(0), 2, { 2, 16 }, zeros }, { QB(0), 2, { 16, 2 }, zeros },
                             { QA(1), 2, { 2, 16 }, zeros }, { QB(1), 2, { 16, 2 }, zeros },
                             { "base_model.model.model.layers.0.self_attn.q_proj.lora_B.bias", 1, { 16 }, zeros } };
    expect_adapter_refused(STD, it, 5, "lora_bias");
}

TEST(lora_rejects_unknown_tensor_and_module)
{
    struct st_item it[5] = { { QA(0), 2, { 2, 16 }, zeros }, { QB(0), 2, { 16, 2 }, zeros },
                             { QA(1), 2, { 2, 16 }, zeros }, { QB(1), 2, { 16, 2 }, zeros },
                             { "base_model.model.model.layers.0.self_attn.q_proj.lora_C.weight", 1, { 16 }, zeros } };
    expect_adapter_refused(STD, it, 5, "unknown adapter tensor");
    struct st_item it2[4] = { { QA(0), 2, { 2, 16 }, zeros }, { QB(0), 2, { 16, 2 }, zeros },
                              { QA(1), 2, { 2, 16 }, zeros }, { QB(1), 2, { 16, 2 }, zeros } };
    expect_adapter_refused(",\"peft_type\":\"LORA\",\"target_modules\":[\"q_proj\",\"c_attn\"]", it2, 4, "c_attn");
}

TEST(lora_rejects_other_peft_types_and_layer_subsets)
{
    struct st_item it[4] = { { QA(0), 2, { 2, 16 }, zeros }, { QB(0), 2, { 16, 2 }, zeros },
                             { QA(1), 2, { 2, 16 }, zeros }, { QB(1), 2, { 16, 2 }, zeros } };
    expect_adapter_refused(",\"peft_type\":\"IA3\",\"target_modules\":[\"q_proj\"]", it, 4, "IA3");
    // layers_to_transform is applied since issue 18: [0] selects layer 0 only, so layer 1's tensors
    // are refused as a module the config does not target
    expect_adapter_refused(STD ",\"layers_to_transform\":[0]", it, 4,
                           "'model.layers.1.self_attn.q_proj', which adapter_config.json does not target");
    expect_adapter_refused(STD ",\"fan_in_fan_out\":true", it, 4, "fan_in_fan_out");
    expect_adapter_refused(STD ",\"layer_replication\":[[0, 2]]", it, 4, "'layer_replication' is set");
}

/* lora_file_open on a folder written from raw pieces: expects the refusal want. */
static void expect_open_refused(const char *config_extra, const struct st_item *items, int n, const char *want)
{
    char config[512];
    snprintf(config, sizeof config, CFG_QONLY, config_extra);
    write_adapter(test_path("bad"), config, items, n);
    struct lora_file lf;
    struct lk_err err = { 0 };
    int rc = lora_file_open(&lf, test_path("bad"), &err);
    CHECK_MSG(rc != LK_OK, "adapter opened, expected '%s'", want);
    CHECK_MSG(strstr(err.msg, want) && strstr(err.msg, "bad/adapter_model.safetensors"),
              "message '%s' lacks '%s' or the path", err.msg, want);
    lora_file_close(&lf); // closed by the failure already: harmless
}

TEST(lora_file_opens_an_adapter_without_a_base_then_binds_it)
{
    struct cfg c;
    fix_cfg_qwen2(&c);
    struct lora a;
    CHECK_OK(make_lora(&a, &c, 1, 5)); // r 4, layer 1 down_proj rank 2, lora_B biases
    CHECK_OK(lora_save(&a, test_path("ad"), test_err()));
    struct lora_file lf;
    CHECK_OK(lora_file_open(&lf, test_path("ad"), test_err()));
    CHECK(lf.cfg.lora_bias && lf.cfg.r == 4 && lf.cfg.n_rank_pattern == 1);
    // [out, in] of q, k, v, o, gate, up, down for C 16, F 24, NH 4, NKV 2, HS 4, worked by hand
    static const int64_t want[CFG_N_MODULES][2] = { { 16, 16 }, { 8, 16 }, { 8, 16 }, { 16, 16 },
                                                    { 24, 16 }, { 24, 16 }, { 16, 24 } };
    CHECK_INT(lf.n_mod, 2 * CFG_N_MODULES);
    CHECK_INT(lf.st.n, 3 * 2 * CFG_N_MODULES);
    int seen[2][CFG_N_MODULES] = { { 0 } };
    for (int k = 0; k < lf.n_mod; k++) {
        const struct lora_file_module *md = &lf.mod[k];
        CHECK(md->layer >= 0 && md->layer < 2 && md->module >= 0 && md->module < CFG_N_MODULES);
        seen[md->layer][md->module]++;
        CHECK(md->A && md->B && md->bias && !md->mag);
        CHECK_INT(md->out, want[md->module][0]);
        CHECK_INT(md->in, want[md->module][1]);
        CHECK_INT(md->R, md->layer == 1 && md->module == CFG_DOWN ? 2 : 4);
        char nm[160];
        lora_peft_name(md->layer, md->module, nm, sizeof nm);
        CHECK(!strncmp(md->A->name, nm, strlen(nm)) && !strcmp(md->A->name + strlen(nm), ".lora_A.weight"));
        CHECK(!strncmp(md->B->name, nm, strlen(nm)) && !strcmp(md->B->name + strlen(nm), ".lora_B.weight"));
    }
    for (int l = 0; l < 2; l++)
        for (int m = 0; m < CFG_N_MODULES; m++)
            CHECK_INT(seen[l][m], 1);
    for (int i = 0; i < lf.st.n; i++) {
        CHECK(lf.slot[i] >= 0 && lf.slot[i] < lf.n_mod);
        const struct lora_file_module *md = &lf.mod[lf.slot[i]];
        CHECK(&lf.st.t[i] == md->A || &lf.st.t[i] == md->B || &lf.st.t[i] == md->bias);
    }
    // bound to its base: the adapter lora_load reads, bit for bit
    struct lora b;
    CHECK_OK(lora_file_bind(&lf, &c, &b, test_err()));
    CHECK(b.n == a.n && memcmp(a.mem, b.mem, sizeof(float) * a.n) == 0);
    // bound to another base: refused, and the open adapter stays usable
    struct cfg c2;
    fix_cfg_llama(&c2);
    struct lora x;
    struct lk_err err = { 0 };
    CHECK(lora_file_bind(&lf, &c2, &x, &err) == LK_ERR_SHAPE && strstr(err.msg, "another base model"));
    struct lora b2;
    CHECK_OK(lora_file_bind(&lf, &c, &b2, test_err()));
    CHECK(memcmp(a.mem, b2.mem, sizeof(float) * a.n) == 0);
    lora_file_close(&lf);
    lora_file_close(&lf); // harmless twice
    lora_release(&a);
    lora_release(&b);
    lora_release(&b2);
}

TEST(lora_file_refuses_shapes_that_disagree_without_a_base)
{
    // lora_B's rank is not lora_A's
    struct st_item it[4] = { { QA(0), 2, { 2, 16 }, zeros }, { QB(0), 2, { 16, 3 }, zeros },
                             { QA(1), 2, { 2, 16 }, zeros }, { QB(1), 2, { 16, 2 }, zeros } };
    expect_open_refused(STD, it, 4, "has rank 3 but lora_A has 2 (lora_A/lora_B rank mismatch)");
    // A and B agree on a rank the config does not give
    struct st_item r3[2] = { { QA(0), 2, { 3, 16 }, zeros }, { QB(0), 2, { 16, 3 }, zeros } };
    expect_open_refused(STD, r3, 2, "has rank 3, adapter_config.json says 2");
    // a factor with three dimensions
    struct st_item d3[2] = { { QA(0), 3, { 2, 16, 1 }, zeros }, { QB(0), 2, { 16, 2 }, zeros } };
    expect_open_refused(STD, d3, 2, "has 3 dimensions, expected 2");
    // a bias that is not lora_B's output size
    struct st_item bi[3] = { { QA(0), 2, { 2, 16 }, zeros }, { QB(0), 2, { 16, 2 }, zeros },
                             { "base_model.model.model.layers.0.self_attn.q_proj.lora_B.bias", 1, { 12 }, zeros } };
    expect_open_refused(STD ",\"lora_bias\":true", bi, 3, "expected [16]");
    // a lone lora_A
    expect_open_refused(STD, it, 1, "no 'base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight'");
    // embedding factors of two ranks
    struct st_item em[4] = { { QA(0), 2, { 2, 16 }, zeros }, { QB(0), 2, { 16, 2 }, zeros },
                             { "base_model.model.model.embed_tokens.lora_embedding_A", 2, { 2, 37 }, zeros },
                             { "base_model.model.model.embed_tokens.lora_embedding_B", 2, { 16, 3 }, zeros } };
    expect_open_refused(",\"peft_type\":\"LORA\",\"target_modules\":[\"q_proj\",\"embed_tokens\"]", em, 4,
                        "embedding adapter A and B ranks differ");
    // embedding factors the config does not target: PEFT would not load them
    expect_open_refused(STD, em, 4, "LoRA factor of embed_tokens, which adapter_config.json does not target");
    // factors that agree with each other but fit no base here: opened, refused when bound
    struct st_item ok[2] = { { QA(0), 2, { 2, 12 }, zeros }, { QB(0), 2, { 12, 2 }, zeros } };
    write_adapter(test_path("other"), "{\"r\":2,\"lora_alpha\":4" STD "}", ok, 2);
    struct lora_file lf;
    CHECK_OK(lora_file_open(&lf, test_path("other"), test_err()));
    CHECK(lf.n_mod == 1 && lf.mod[0].R == 2 && lf.mod[0].in == 12 && lf.mod[0].out == 12);
    struct cfg c;
    fix_cfg_qwen2(&c);
    struct lora l;
    struct lk_err err = { 0 };
    CHECK(lora_file_bind(&lf, &c, &l, &err) == LK_ERR_SHAPE && strstr(err.msg, "another base model"));
    lora_file_close(&lf);
}

TEST(model_folder_roundtrip_f32_exact_and_bf16_rounded_once)
{
    struct cfg c;
    fix_cfg_qwen2(&c);
    struct model a, b;
    CHECK_OK(fix_model_random(&a, &c, 0.3f, 5));
    CHECK_OK(model_save(&a, test_path("m32"), TENSOR_F32, test_err()));
    CHECK_OK(model_load(&b, test_path("m32"), test_err()));
    CHECK_INT(a.w.n, b.w.n);
    CHECK(memcmp(a.w.mem, b.w.mem, sizeof(float) * a.w.n) == 0);
    model_release(&b);
    CHECK_OK(model_save(&a, test_path("m16"), TENSOR_BF16, test_err()));
    CHECK_OK(model_load(&b, test_path("m16"), test_err()));
    CHECK(!strcmp(b.cfg.torch_dtype, "bfloat16"));
    for (size_t i = 0; i < a.w.n; i++)
        CHECK(b.w.mem[i] == tensor_bf16_to_f32(tensor_f32_to_bf16(a.w.mem[i])));
    model_release(&b);
    model_release(&a);
}

/* Reads the "logits" tensor [B, T, V] written by `lorakit logits`. */
static float *read_logits(const char *path, int64_t *shape)
{
    struct st_file f;
    if (st_open(&f, path, NULL))
        return NULL;
    const struct st_tensor *t = st_find(&f, "logits");
    float *out = NULL;
    if (t && t->ndim == 3) {
        memcpy(shape, t->shape, sizeof(int64_t) * 3);
        out = malloc(sizeof(float) * t->numel);
        st_tensor_to_f32(t, out, NULL);
    }
    st_close(&f);
    return out;
}

TEST(logits_cli_matches_in_process_forward_with_adapter)
{
    CHECK_INT(test_sh("%s init --preset tiny --dtype f32 --seed 3 --out '%s/m'", test_lorakit(), test_tmpdir()), 0);
    struct model m;
    CHECK_OK(model_load(&m, test_path("m"), test_err()));
    struct lora l;
    CHECK_OK(make_lora(&l, &m.cfg, 0, 9));
    for (size_t i = 0; i < l.n; i++)
        l.mem[i] *= 0.05f;
    CHECK_OK(lora_save(&l, test_path("ad"), test_err()));
    CHECK_INT(test_sh("%s logits --model '%s/m' --adapter '%s/ad' --tokens '1,2,3;4,5,6' --out '%s/l.safetensors'",
                      test_lorakit(), test_tmpdir(), test_tmpdir(), test_tmpdir()), 0);
    int64_t shape[3];
    float *got = read_logits(test_path("l.safetensors"), shape);
    CHECK(got != NULL);
    CHECK(shape[0] == 2 && shape[1] == 3 && shape[2] == m.cfg.vocab_size);
    int tok[6] = { 1, 2, 3, 4, 5, 6 };
    CHECK_OK(model_plan(&m, 2, 3, 0, test_err()));
    CHECK_OK(model_forward(&m, &l, tok, NULL, NULL, NULL, 0, NULL, test_err()));
    for (int i = 0; i < 6 * m.cfg.vocab_size; i++)
        CHECK(got[i] == model_logits(&m)[i]);
    // and the adapter changed something
    const float *with = model_logits(&m);
    float first = with[0];
    CHECK_OK(model_forward(&m, NULL, tok, NULL, NULL, NULL, 0, NULL, test_err()));
    CHECK(model_logits(&m)[0] != first);
    free(got);
    lora_release(&l);
    model_release(&m);
}

TEST(logits_cli_refuses_bad_tokens_and_mismatched_adapter)
{
    CHECK_INT(test_sh("%s init --preset tiny --out '%s/m'", test_lorakit(), test_tmpdir()), 0);
    CHECK_INT(test_sh("%s logits --model '%s/m' --tokens '1,2;3' --out '%s/l.st'", test_lorakit(),
                      test_tmpdir(), test_tmpdir()), 2);
    CHECK(strstr(test_output(), "different lengths"));
    CHECK_INT(test_sh("%s logits --model '%s/m' --tokens '1,99999' --out '%s/l.st'", test_lorakit(),
                      test_tmpdir(), test_tmpdir()), 2);
    CHECK(strstr(test_output(), "outside the vocabulary"));
    CHECK(!lk_file_exists(test_path("l.st")));
    // an adapter made for the Llama fixture against the tiny Qwen2 base
    struct cfg lc;
    fix_cfg_llama(&lc);
    struct lora l;
    CHECK_OK(make_lora(&l, &lc, 0, 1));
    CHECK_OK(lora_save(&l, test_path("ad"), test_err()));
    lora_release(&l);
    CHECK_INT(test_sh("%s logits --model '%s/m' --adapter '%s/ad' --tokens 1 --out '%s/l.st'", test_lorakit(),
                      test_tmpdir(), test_tmpdir(), test_tmpdir()), 1);
    CHECK(strstr(test_output(), "adapter_model.safetensors") && strstr(test_output(), "another base model"));
    CHECK(!lk_file_exists(test_path("l.st")));
}

TEST(info_reports_adapter_share_of_base)
{
    CHECK_INT(test_sh("%s init --preset tiny --out '%s/m'", test_lorakit(), test_tmpdir()), 0);
    struct cfg c;
    CHECK_OK(cfg_load(&c, test_path("m"), test_err()));
    struct lora l;
    CHECK_OK(make_lora(&l, &c, 0, 1));
    snprintf(l.cfg.base_model, sizeof l.cfg.base_model, "%s", test_path("m"));
    CHECK_OK(lora_save(&l, test_path("ad"), test_err()));
    CHECK_INT(test_sh("%s info --json '%s/ad'", test_lorakit(), test_tmpdir()), 0);
    cJSON *o = cJSON_Parse(test_output());
    CHECK(o != NULL);
    double share = cJSON_GetObjectItem(o, "share")->valuedouble;
    CHECK_NEAR(share, (double)l.n / (double)cfg_param_count(&c), 1e-9);
    CHECK_INT(cJSON_GetObjectItem(o, "params")->valuedouble, l.n);
    cJSON_Delete(o);
    CHECK_INT(test_sh("%s info '%s/ad'", test_lorakit(), test_tmpdir()), 0);
    CHECK(strstr(test_output(), "% of the base"));
    // a folder name with a quote and a backslash stays one JSON string
    char odd[1024];
    snprintf(odd, sizeof odd, "%s", test_path("a\"d\\x"));
    CHECK_INT(rename(test_path("ad"), odd), 0);
    CHECK_INT(test_sh("%s info --json %s", test_lorakit(), test_path("a\\\"d\\\\x")), 0);
    o = cJSON_Parse(test_output());
    CHECK_MSG(o != NULL, "not JSON: %s", test_output());
    const cJSON *path = cJSON_GetObjectItem(o, "path");
    CHECK(cJSON_IsString(path) && !strcmp(path->valuestring, odd));
    cJSON_Delete(o);
    lora_release(&l);
    cfg_release(&c);
}

TEST(lora_roundtrip_dora_embedding_and_modules_to_save)
{
    struct cfg c;
    fix_cfg_llama(&c); // untied: lm_head may be replaced
    struct model m;
    CHECK_OK(fix_model_random(&m, &c, 0.3f, 91));
    const char *dir = test_path("ad");
    // a DoRA adapter on q_proj and v_proj with an embedding adapter and a full lm_head copy
    struct st_item it[10];
    float *buf = calloc(200000, sizeof(float));
    struct lk_rng rng;
    lk_rng_seed(&rng, 92);
    for (int i = 0; i < 200000; i++)
        buf[i] = 0.1f * lk_rng_normal(&rng);
    int k = 0, R = 2;
    int64_t Q = c.num_attention_heads * c.head_dim, KV = c.num_key_value_heads * c.head_dim;
    char names[8][128];
    for (int l = 0; l < 2; l++) {
        snprintf(names[k], 128, "base_model.model.model.layers.%d.self_attn.q_proj.lora_A.weight", l);
        it[k] = (struct st_item){ names[k], 2, { R, c.hidden_size }, buf + 1000 * k }, k++;
        snprintf(names[k], 128, "base_model.model.model.layers.%d.self_attn.q_proj.lora_B.weight", l);
        it[k] = (struct st_item){ names[k], 2, { Q, R }, buf + 1000 * k }, k++;
        snprintf(names[k], 128, "base_model.model.model.layers.%d.self_attn.q_proj.lora_magnitude_vector", l);
        for (int o = 0; o < Q; o++)
            buf[1000 * k + o] = 1.0f + 0.1f * buf[1000 * k + o];
        it[k] = (struct st_item){ names[k], 1, { Q }, buf + 1000 * k }, k++;
    }
    it[k++] = (struct st_item){ "base_model.model.model.embed_tokens.lora_embedding_A", 2, { R, c.vocab_size }, buf + 10000 };
    it[k++] = (struct st_item){ "base_model.model.lm_head.weight", 2, { c.vocab_size, c.hidden_size }, buf + 20000 };
    (void)KV;
    write_adapter(dir, "{\"peft_type\":\"LORA\",\"r\":2,\"lora_alpha\":4,\"use_dora\":true,"
                       "\"target_modules\":[\"q_proj\",\"embed_tokens\"],\"modules_to_save\":[\"lm_head\"]}", it, k);
    // the embedding adapter needs its B too: written separately below would be a second file, so
    // check the refusal first, then add it
    struct lora l;
    struct lk_err err = { 0 };
    CHECK(lora_load(&l, dir, &c, &err) == LK_ERR_MISSING && strstr(err.msg, "lora_embedding"));
    it[k++] = (struct st_item){ "base_model.model.model.embed_tokens.lora_embedding_B", 2, { c.hidden_size, R }, buf + 30000 };
    write_adapter(dir, "{\"peft_type\":\"LORA\",\"r\":2,\"lora_alpha\":4,\"use_dora\":true,"
                       "\"target_modules\":[\"q_proj\",\"embed_tokens\"],\"modules_to_save\":[\"lm_head\"]}", it, k);
    CHECK_OK(lora_load(&l, dir, &c, test_err()));
    CHECK(l.cfg.use_dora && l.mod[0].mag && l.embed_A && l.embed_B && l.n_extra == 1);
    // written back and read again: the same floats
    CHECK_OK(lora_save(&l, test_path("ad2"), test_err()));
    struct lora l2;
    CHECK_OK(lora_load(&l2, test_path("ad2"), &c, test_err()));
    CHECK(l2.n == l.n && memcmp(l.mem, l2.mem, sizeof(float) * l.n) == 0);
    CHECK(memcmp(l.embed_A, l2.embed_A, sizeof(float) * (size_t)R * c.vocab_size) == 0);
    CHECK(memcmp(l.extra[0].data, l2.extra[0].data, sizeof(float) * (size_t)c.vocab_size * c.hidden_size) == 0);
    // the engine applies all of it: the forward runs only after the modules_to_save copy is applied
    int tok[4] = { 1, 2, 3, 4 };
    CHECK_OK(model_plan(&m, 1, 4, 0, test_err()));
    CHECK(model_forward(&m, &l2, tok, NULL, NULL, NULL, 0, NULL, test_err()) == LK_ERR_USAGE);
    CHECK_OK(model_apply_extras(&m, &l2, test_err()));
    CHECK_OK(model_forward(&m, &l2, tok, NULL, NULL, NULL, 0, NULL, test_err()));
    CHECK(memcmp(m.w.lm_head.f, l.extra[0].data, sizeof(float) * (size_t)c.vocab_size * c.hidden_size) == 0);
    free(buf);
    lora_release(&l);
    lora_release(&l2);
    model_release(&m);
}

TEST(lora_modules_to_save_on_tied_head_unties_the_model_in_memory)
{
    // issue 18 case 3: the engine once refused this adapter; it now unties the model in memory as
    // merge does: lm_head becomes the adapter's copy, embed_tokens keeps the base's values
    struct cfg c;
    fix_cfg_qwen2(&c); // tied
    struct model m;
    CHECK_OK(fix_model_random(&m, &c, 0.3f, 93));
    static float head[37 * 16], z[2 * 16];
    for (int i = 0; i < 37 * 16; i++)
        head[i] = 0.01f * (float)((i * 7) % 23) - 0.1f;
    float *embed0 = malloc(sizeof(float) * 37 * 16);
    memcpy(embed0, m.w.embed.f, sizeof(float) * 37 * 16);
    struct st_item it[5] = { { QA(0), 2, { 2, 16 }, z }, { QB(0), 2, { 16, 2 }, z }, { QA(1), 2, { 2, 16 }, z },
                             { QB(1), 2, { 16, 2 }, z }, { "base_model.model.lm_head.weight", 2, { 37, 16 }, head } };
    write_adapter(test_path("ad"), "{\"peft_type\":\"LORA\",\"r\":2,\"lora_alpha\":4,\"target_modules\":[\"q_proj\"],"
                                   "\"modules_to_save\":[\"lm_head\"]}", it, 5);
    struct lora l;
    CHECK_OK(lora_load(&l, test_path("ad"), &c, test_err()));
    CHECK_OK(model_apply_extras(&m, &l, test_err()));
    CHECK(!m.cfg.tie_word_embeddings && m.w.lm_head.f != m.w.embed.f);
    CHECK(!memcmp(m.w.lm_head.f, head, sizeof head));
    CHECK(!memcmp(m.w.embed.f, embed0, sizeof head));
    // the forward against an untied model built here by name (embed, lm_head = the copy)
    struct model ref, m0;
    CHECK_OK(fix_model_random(&m0, &c, 0.3f, 93));
    struct cfg cu = c;
    cu.tie_word_embeddings = 0;
    CHECK_OK(model_init(&ref, &cu, test_err()));
    struct model_tensor *ts, *td;
    int ns, nd;
    CHECK_OK(model_weights_tensors(&m0.w, &m0.cfg, &ts, &ns, test_err()));
    CHECK_OK(model_weights_tensors(&ref.w, &ref.cfg, &td, &nd, test_err()));
    CHECK_INT(nd, ns + 1);
    for (int i = 0; i < nd; i++)
        for (int j = 0; j < ns; j++)
            if (!strcmp(td[i].name, ts[j].name))
                memcpy(td[i].data, ts[j].data, sizeof(float) * td[i].numel);
    memcpy(ref.w.lm_head.f, head, sizeof head);
    lk_free(ts);
    lk_free(td);
    int tok[3] = { 1, 2, 3 };
    CHECK_OK(model_plan(&m, 1, 3, 0, test_err()));
    CHECK_OK(model_forward(&m, &l, tok, NULL, NULL, NULL, 0, NULL, test_err()));
    CHECK_OK(model_plan(&ref, 1, 3, 0, test_err()));
    CHECK_OK(model_forward(&ref, NULL, tok, NULL, NULL, NULL, 0, NULL, test_err()));
    for (int i = 0; i < 3 * 37; i++)
        CHECK(model_logits(&m)[i] == model_logits(&ref)[i]); // B of q_proj is zero: the same weights
    model_release(&ref);
    model_release(&m0);
    free(embed0);
    lora_release(&l);
    model_release(&m);
}

TEST(lora_pissa_saved_adapter_applies_to_the_original_base)
{
    struct cfg c;
    fix_cfg_qwen2(&c);
    struct model orig, res;
    CHECK_OK(fix_model_random(&orig, &c, 0.3f, 101));
    CHECK_OK(fix_model_random(&res, &c, 0.3f, 101)); // the same weights; becomes the residual
    struct lora_config lc;
    lora_config_default(&lc);
    lc.r = 2;
    lc.alpha = 4;
    struct lora l;
    CHECK_OK(lora_init(&l, &lc, &c, test_err()));
    CHECK_OK(lora_init_pissa(&l, &res, test_err()));
    int tok[6] = { 1, 5, 9, 2, 7, 3 };
    size_t n = (size_t)6 * c.vocab_size;
    float *ref = malloc(sizeof(float) * n);
    // right after init, residual + adapter is the original model
    CHECK_OK(model_plan(&orig, 1, 6, 0, test_err()));
    CHECK_OK(model_forward(&orig, NULL, tok, NULL, NULL, NULL, 0, NULL, test_err()));
    memcpy(ref, model_logits(&orig), sizeof(float) * n);
    CHECK_OK(model_plan(&res, 1, 6, 0, test_err()));
    CHECK_OK(model_forward(&res, &l, tok, NULL, NULL, NULL, 0, NULL, test_err()));
    for (size_t i = 0; i < n; i++)
        CHECK_NEAR(model_logits(&res)[i], ref[i], 1e-4);
    // "training": move the factors; the saved adapter (rank 2r, PEFT's conversion) applied to
    // the ORIGINAL base must give what residual + trained adapter gives
    struct lk_rng rng;
    lk_rng_seed(&rng, 102);
    for (size_t i = 0; i < l.n; i++)
        l.mem[i] += 0.05f * lk_rng_normal(&rng);
    CHECK_OK(model_forward(&res, &l, tok, NULL, NULL, NULL, 0, NULL, test_err()));
    memcpy(ref, model_logits(&res), sizeof(float) * n);
    CHECK_OK(lora_save_pissa(&l, &res, test_path("ad"), test_err()));
    struct lora saved;
    CHECK_OK(lora_load(&saved, test_path("ad"), &c, test_err()));
    CHECK_INT(saved.cfg.r, 4);
    CHECK_OK(model_forward(&orig, &saved, tok, NULL, NULL, NULL, 0, NULL, test_err()));
    double mx = 0, mref = 0;
    for (size_t i = 0; i < n; i++) {
        mx = fmax(mx, fabs((double)model_logits(&orig)[i] - ref[i]));
        mref = fmax(mref, fabs((double)ref[i]));
    }
    CHECK_MSG(mx / mref < 1e-4, "PiSSA adapter on the original base differs: max rel %g", mx / mref);
    free(ref);
    lora_release(&saved);
    lora_release(&l);
    model_release(&res);
    model_release(&orig);
}
