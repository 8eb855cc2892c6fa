/*
 * test_cfg.c - config.json: real-looking Qwen2.5-0.5B, Qwen3-0.6B and Llama-3.2-1B configs
 * (parameter counts checked against the published 494,032,768, 596,049,920 and 1,235,814,400),
 * transformers' defaults, rope scaling as transformers reads it, every refusal naming its field,
 * saving with unknown fields kept, the tensor list / module helpers, a config bounded by the
 * weights beside it (the hostile config fuzz_cfg found), and cfg_load under allocation failures.
 */
#include "test.h"

#include <cJSON.h>
#include <limits.h>
#include <string.h>

#include "../libcore/cfg.h"
#include "../libcore/lk.h"
#include "../libcore/st.h"

static const char *QWEN05 =
    "{\n  \"architectures\": [\"Qwen2ForCausalLM\"],\n  \"attention_dropout\": 0.0,\n"
    "  \"bos_token_id\": 151643,\n  \"eos_token_id\": 151643,\n  \"hidden_act\": \"silu\",\n"
    "  \"hidden_size\": 896,\n  \"initializer_range\": 0.02,\n  \"intermediate_size\": 4864,\n"
    "  \"max_position_embeddings\": 32768,\n  \"max_window_layers\": 24,\n  \"model_type\": \"qwen2\",\n"
    "  \"num_attention_heads\": 14,\n  \"num_hidden_layers\": 24,\n  \"num_key_value_heads\": 2,\n"
    "  \"rms_norm_eps\": 1e-06,\n  \"rope_scaling\": null,\n  \"rope_theta\": 1000000.0,\n"
    "  \"sliding_window\": 32768,\n  \"tie_word_embeddings\": true,\n  \"torch_dtype\": \"bfloat16\",\n"
    "  \"transformers_version\": \"4.40.1\",\n  \"use_cache\": true,\n  \"use_mrope\": false,\n"
    "  \"use_sliding_window\": false,\n  \"vocab_size\": 151936\n}\n";

TEST(cfg_parses_qwen25_05b)
{
    struct cfg c;
    CHECK_OK(cfg_parse(&c, QWEN05, "config.json", test_err()));
    CHECK(c.arch == CFG_ARCH_QWEN2 && !strcmp(c.architecture, "Qwen2ForCausalLM"));
    CHECK_INT(c.hidden_size, 896);
    CHECK_INT(c.intermediate_size, 4864);
    CHECK_INT(c.num_hidden_layers, 24);
    CHECK_INT(c.num_attention_heads, 14);
    CHECK_INT(c.num_key_value_heads, 2);
    CHECK_INT(c.head_dim, 64);
    CHECK_INT(c.vocab_size, 151936);
    CHECK_INT(c.max_position_embeddings, 32768);
    CHECK(c.rms_norm_eps == 1e-6 && c.rope_theta == 1e6 && c.initializer_range == 0.02);
    CHECK(c.tie_word_embeddings && c.attention_bias);
    CHECK(c.bos_token_id == 151643 && c.eos_token_id == 151643);
    CHECK(!strcmp(c.torch_dtype, "bfloat16"));
    CHECK_INT(cfg_param_count(&c), 494032768); // the published size of Qwen2.5-0.5B
    struct cfg_tensor *t;
    int n;
    CHECK_OK(cfg_tensors(&c, &t, &n, test_err()));
    CHECK_INT(n, 1 + 24 * 12 + 1); // embed, 24 x (7 linears + 3 biases + 2 norms), final norm; tied
    CHECK(!strcmp(t[0].name, "model.embed_tokens.weight") && t[0].shape[0] == 151936 && t[0].shape[1] == 896);
    CHECK(!strcmp(t[1].name, "model.layers.0.self_attn.q_proj.weight") && t[1].shape[0] == 896);
    CHECK(!strcmp(t[2].name, "model.layers.0.self_attn.q_proj.bias") && t[2].ndim == 1 && t[2].kind == CFG_T_BIAS);
    CHECK(!strcmp(t[3].name, "model.layers.0.self_attn.k_proj.weight") && t[3].shape[0] == 128 && t[3].shape[1] == 896);
    CHECK(!strcmp(t[7].name, "model.layers.0.self_attn.o_proj.weight") && t[7].module == CFG_O);
    CHECK(!strcmp(t[10].name, "model.layers.0.mlp.down_proj.weight") && t[10].shape[0] == 896 && t[10].shape[1] == 4864);
    CHECK(!strcmp(t[11].name, "model.layers.0.input_layernorm.weight") && t[11].kind == CFG_T_NORM);
    CHECK(!strcmp(t[12].name, "model.layers.0.post_attention_layernorm.weight") && t[12].layer == 0);
    CHECK(!strcmp(t[n - 1].name, "model.norm.weight") && t[n - 1].layer == -1);
    int64_t sum = 0;
    for (int i = 0; i < n; i++)
        sum += t[i].shape[0] * (t[i].ndim == 2 ? t[i].shape[1] : 1);
    CHECK_INT(sum, 494032768);
    lk_free(t);
    cfg_release(&c);
    cfg_release(&c);
}

TEST(cfg_llama_defaults_and_untied_head)
{
    struct cfg c;
    CHECK_OK(cfg_parse(&c, "{\"architectures\":[\"LlamaForCausalLM\"],\"hidden_size\":64,\"intermediate_size\":128,"
                           "\"num_hidden_layers\":1,\"num_attention_heads\":4,\"vocab_size\":100}",
                       "config.json", test_err()));
    CHECK(c.arch == CFG_ARCH_LLAMA && c.num_key_value_heads == 4 && c.head_dim == 16);
    CHECK(c.rms_norm_eps == 1e-6 && c.rope_theta == 10000.0 && c.initializer_range == 0.02);
    CHECK(!c.tie_word_embeddings && !c.attention_bias && c.bos_token_id == -1);
    CHECK_INT(c.max_position_embeddings, 2048);
    struct cfg_tensor *t;
    int n;
    CHECK_OK(cfg_tensors(&c, &t, &n, test_err()));
    CHECK_INT(n, 1 + 9 + 2); // no biases, plus lm_head
    CHECK(!strcmp(t[n - 1].name, "lm_head.weight") && t[n - 1].kind == CFG_T_LM_HEAD && t[n - 1].shape[0] == 100);
    lk_free(t);
    cfg_release(&c);
    // attention_bias, explicit head_dim (not hidden / heads), eos as a list, model_type only
    CHECK_OK(cfg_parse(&c, "{\"model_type\":\"llama\",\"hidden_size\":64,\"intermediate_size\":128,"
                           "\"num_hidden_layers\":1,\"num_attention_heads\":4,\"num_key_value_heads\":1,"
                           "\"head_dim\":32,\"vocab_size\":100,\"attention_bias\":true,\"eos_token_id\":[7,9]}",
                       "config.json", test_err()));
    CHECK(c.attention_bias && c.head_dim == 32 && c.eos_token_id == 7);
    int64_t r, k;
    cfg_module_shape(&c, CFG_Q, &r, &k);
    CHECK(r == 128 && k == 64);
    cfg_module_shape(&c, CFG_V, &r, &k);
    CHECK(r == 32 && k == 64);
    cfg_module_shape(&c, CFG_O, &r, &k);
    CHECK(r == 64 && k == 128);
    cfg_release(&c);
}

TEST(cfg_module_helpers)
{
    char buf[96];
    cfg_module_path(3, CFG_Q, buf, sizeof buf);
    CHECK(!strcmp(buf, "model.layers.3.self_attn.q_proj"));
    cfg_module_path(11, CFG_DOWN, buf, sizeof buf);
    CHECK(!strcmp(buf, "model.layers.11.mlp.down_proj"));
    CHECK_INT(cfg_module_parse("gate_proj"), CFG_GATE);
    CHECK_INT(cfg_module_parse("lm_head"), -1);
    struct cfg c;
    cfg_default_qwen2(&c);
    int64_t r, k;
    cfg_module_shape(&c, CFG_UP, &r, &k);
    CHECK(r == 176 && k == 64);
    CHECK(c.tie_word_embeddings && c.attention_bias && c.json == NULL);
}

/* cfg_parse must refuse text with a message naming the file and containing want. */
static int refused(const char *text, const char *want)
{
    struct cfg c;
    struct lk_err err = { 0 };
    if (cfg_parse(&c, text, "cfg/config.json", &err) == LK_OK) {
        cfg_release(&c);
        test_fail(__FILE__, __LINE__, "accepted, expected '%s'", want);
        return 0;
    }
    if (strncmp(err.msg, "cfg/config.json: ", 17) || !strstr(err.msg, want)) {
        test_fail(__FILE__, __LINE__, "message '%s' lacks the file or '%s'", err.msg, want);
        return 0;
    }
    return 1;
}

#define BASE "\"hidden_size\":64,\"intermediate_size\":128,\"num_hidden_layers\":1,\"vocab_size\":100"
#define QW "{\"architectures\":[\"Qwen2ForCausalLM\"]," BASE
#define LL "{\"architectures\":[\"LlamaForCausalLM\"]," BASE

TEST(cfg_refuses_rope_scaling)
{
    // issue 22: linear, dynamic and llama3 are read; every other type is refused by name
    CHECK(refused(QW ",\"num_attention_heads\":4,\"rope_scaling\":{\"type\":\"yarn\",\"factor\":4}}",
                  "field 'rope_scaling' has rope type 'yarn', which is not supported"));
    CHECK(refused(LL ",\"num_attention_heads\":4,\"rope_scaling\":{\"rope_type\":\"longrope\",\"factor\":4}}",
                  "rope type 'longrope'"));
    CHECK(refused(LL ",\"num_attention_heads\":4,\"rope_parameters\":{\"rope_type\":\"yarn\",\"factor\":4}}",
                  "field 'rope_parameters' has rope type 'yarn'"));
    CHECK(refused(LL ",\"num_attention_heads\":4,\"rope_scaling\":\"linear\"}", "'rope_scaling'"));
    CHECK(refused(LL ",\"num_attention_heads\":4,\"rope_scaling\":0}", "'rope_scaling'"));
    CHECK(refused(LL ",\"num_attention_heads\":4,\"rope_scaling\":{\"factor\":4}}", "needs a 'rope_type'"));
    CHECK(refused(LL ",\"num_attention_heads\":4,\"rope_scaling\":{\"rope_type\":\"linear\"}}",
                  "field 'rope_scaling' of type 'linear' needs 'factor'"));
    CHECK(refused(LL ",\"num_attention_heads\":4,\"rope_scaling\":{\"rope_type\":\"linear\",\"factor\":0}}",
                  "'rope_scaling.factor' must be a positive number"));
    CHECK(refused(LL ",\"num_attention_heads\":4,\"rope_scaling\":{\"rope_type\":\"llama3\",\"factor\":8,"
                  "\"low_freq_factor\":1,\"high_freq_factor\":4}}", "needs 'original_max_position_embeddings'"));
    CHECK(refused(LL ",\"num_attention_heads\":4,\"rope_scaling\":{\"rope_type\":\"llama3\",\"factor\":8,"
                  "\"high_freq_factor\":4,\"original_max_position_embeddings\":64}}", "needs 'low_freq_factor'"));
    CHECK(refused(LL ",\"num_attention_heads\":4,\"rope_scaling\":{\"rope_type\":\"llama3\",\"factor\":8,"
                  "\"low_freq_factor\":4,\"high_freq_factor\":4,\"original_max_position_embeddings\":64}}",
                  "'rope_scaling.high_freq_factor' 4 must be larger than 'low_freq_factor' 4"));
    CHECK(refused(LL ",\"num_attention_heads\":4,\"partial_rotary_factor\":0.5}", "'partial_rotary_factor'"));
}

TEST(cfg_reads_rope_scaling_as_transformers_does)
{
    struct cfg c;
    CHECK_OK(cfg_parse(&c, LL ",\"num_attention_heads\":4,\"rope_scaling\":{\"type\":\"linear\",\"factor\":2.5}}",
                       "c", test_err())); // the older 'type' key
    CHECK(c.rope_scaling.type == CFG_ROPE_LINEAR && c.rope_scaling.factor == 2.5);
    CHECK_INT(cfg_rope_positions(&c), INT_MAX);
    cfg_release(&c);
    CHECK_OK(cfg_parse(&c, LL ",\"num_attention_heads\":4,\"max_position_embeddings\":512,"
                           "\"rope_scaling\":{\"rope_type\":\"dynamic\",\"factor\":2}}", "c", test_err()));
    CHECK(c.rope_scaling.type == CFG_ROPE_DYNAMIC && c.rope_scaling.factor == 2);
    CHECK_INT(cfg_rope_positions(&c), 512); // exact below max_position_embeddings only
    cfg_release(&c);
    CHECK_OK(cfg_parse(&c, LL ",\"num_attention_heads\":4,\"rope_scaling\":{\"rope_type\":\"default\"}}", "c",
                       test_err()));
    CHECK(c.rope_scaling.type == CFG_ROPE_DEFAULT);
    cfg_release(&c);
    // transformers 5: rope_theta and the scaling both in rope_parameters
    CHECK_OK(cfg_parse(&c, LL ",\"num_attention_heads\":4,\"rope_parameters\":{\"rope_theta\":500000.0,"
                           "\"rope_type\":\"llama3\",\"factor\":32.0,\"low_freq_factor\":1.0,"
                           "\"high_freq_factor\":4.0,\"original_max_position_embeddings\":8192}}", "c", test_err()));
    CHECK(c.rope_theta == 500000.0 && c.rope_scaling.type == CFG_ROPE_LLAMA3 && c.rope_scaling.factor == 32);
    CHECK(c.rope_scaling.low_freq_factor == 1 && c.rope_scaling.high_freq_factor == 4);
    CHECK_INT(c.rope_scaling.original_max_position_embeddings, 8192);
    cfg_release(&c);
    CHECK_OK(cfg_parse(&c, LL ",\"num_attention_heads\":4,\"rope_parameters\":{\"rope_theta\":1000.0,"
                           "\"rope_type\":\"default\"}}", "c", test_err()));
    CHECK(c.rope_theta == 1000.0 && c.rope_scaling.type == CFG_ROPE_DEFAULT);
    cfg_release(&c);
}

static const char *QWEN3_06B =
    "{\n  \"architectures\": [\"Qwen3ForCausalLM\"],\n  \"attention_bias\": false,\n  \"attention_dropout\": 0.0,\n"
    "  \"bos_token_id\": 151643,\n  \"eos_token_id\": 151645,\n  \"head_dim\": 128,\n  \"hidden_act\": \"silu\",\n"
    "  \"hidden_size\": 1024,\n  \"initializer_range\": 0.02,\n  \"intermediate_size\": 3072,\n"
    "  \"max_position_embeddings\": 40960,\n  \"max_window_layers\": 28,\n  \"model_type\": \"qwen3\",\n"
    "  \"num_attention_heads\": 16,\n  \"num_hidden_layers\": 28,\n  \"num_key_value_heads\": 8,\n"
    "  \"rms_norm_eps\": 1e-06,\n  \"rope_scaling\": null,\n  \"rope_theta\": 1000000,\n"
    "  \"sliding_window\": null,\n  \"tie_word_embeddings\": true,\n  \"torch_dtype\": \"bfloat16\",\n"
    "  \"transformers_version\": \"4.51.0\",\n  \"use_cache\": true,\n  \"use_sliding_window\": false,\n"
    "  \"vocab_size\": 151936\n}\n";

static const char *LLAMA32_1B =
    "{\n  \"architectures\": [\"LlamaForCausalLM\"],\n  \"attention_bias\": false,\n  \"attention_dropout\": 0.0,\n"
    "  \"bos_token_id\": 128000,\n  \"eos_token_id\": 128001,\n  \"head_dim\": 64,\n  \"hidden_act\": \"silu\",\n"
    "  \"hidden_size\": 2048,\n  \"initializer_range\": 0.02,\n  \"intermediate_size\": 8192,\n"
    "  \"max_position_embeddings\": 131072,\n  \"mlp_bias\": false,\n  \"model_type\": \"llama\",\n"
    "  \"num_attention_heads\": 32,\n  \"num_hidden_layers\": 16,\n  \"num_key_value_heads\": 8,\n"
    "  \"pretraining_tp\": 1,\n  \"rms_norm_eps\": 1e-05,\n  \"rope_scaling\": {\n    \"factor\": 32.0,\n"
    "    \"high_freq_factor\": 4.0,\n    \"low_freq_factor\": 1.0,\n    \"original_max_position_embeddings\": 8192,\n"
    "    \"rope_type\": \"llama3\"\n  },\n  \"rope_theta\": 500000.0,\n  \"tie_word_embeddings\": true,\n"
    "  \"torch_dtype\": \"bfloat16\",\n  \"transformers_version\": \"4.45.0.dev0\",\n  \"use_cache\": true,\n"
    "  \"vocab_size\": 128256\n}\n";

static int64_t tensors_sum(const struct cfg *c, int *out_n)
{
    struct cfg_tensor *t;
    int64_t sum = 0;
    if (cfg_tensors(c, &t, out_n, NULL))
        return -1;
    for (int i = 0; i < *out_n; i++)
        sum += t[i].shape[0] * (t[i].ndim == 2 ? t[i].shape[1] : 1);
    lk_free(t);
    return sum;
}

TEST(cfg_parses_qwen3_06b)
{
    struct cfg c;
    CHECK_OK(cfg_parse(&c, QWEN3_06B, "config.json", test_err()));
    CHECK(c.arch == CFG_ARCH_QWEN3 && !strcmp(c.model_type, "qwen3"));
    CHECK(c.head_dim == 128 && c.num_attention_heads * c.head_dim == 2 * c.hidden_size);
    CHECK(c.qk_norm && !c.attention_bias && c.tie_word_embeddings && c.rope_scaling.type == CFG_ROPE_DEFAULT);
    CHECK(c.eos_token_id == 151645 && c.rope_theta == 1e6 && c.max_position_embeddings == 40960);
    CHECK_INT(cfg_param_count(&c), 596049920); // Qwen3-0.6B's published count (tied)
    int n;
    CHECK_INT(tensors_sum(&c, &n), 596049920);
    CHECK_INT(n, 1 + 28 * 11 + 1); // embed, 28 x (7 linears + q_norm + k_norm + 2 norms), norm
    struct cfg_tensor *t;
    CHECK_OK(cfg_tensors(&c, &t, &n, test_err()));
    // transformers' registration order: q, k, v, o, q_norm, k_norm, mlp, then the layer norms
    CHECK(!strcmp(t[4].name, "model.layers.0.self_attn.o_proj.weight") && t[4].shape[0] == 1024 &&
          t[4].shape[1] == 2048);
    CHECK(!strcmp(t[5].name, "model.layers.0.self_attn.q_norm.weight") && t[5].ndim == 1 && t[5].shape[0] == 128 &&
          t[5].kind == CFG_T_NORM && t[5].module == -1 && t[5].layer == 0);
    CHECK(!strcmp(t[6].name, "model.layers.0.self_attn.k_norm.weight") && t[6].shape[0] == 128);
    CHECK(!strcmp(t[7].name, "model.layers.0.mlp.gate_proj.weight"));
    lk_free(t);
    cfg_release(&c);
    // without head_dim Qwen3Config says 128, whatever hidden / heads is; 32 kv heads by default
    CHECK_OK(cfg_parse(&c, "{\"model_type\":\"qwen3\"," BASE ",\"num_attention_heads\":32}", "c", test_err()));
    CHECK(c.arch == CFG_ARCH_QWEN3 && c.head_dim == 128 && c.num_key_value_heads == 32 &&
          !strcmp(c.architecture, "Qwen3ForCausalLM"));
    cfg_release(&c);
}

TEST(cfg_refuses_what_qwen3_does_not_model)
{
#define Q3 "{\"architectures\":[\"Qwen3ForCausalLM\"]," BASE ",\"num_attention_heads\":4,\"num_key_value_heads\":2," \
           "\"head_dim\":16"
    CHECK(refused(Q3 ",\"attention_bias\":true}", "field 'attention_bias' is true"));
    CHECK(refused(Q3 ",\"use_sliding_window\":true}", "field 'use_sliding_window' is true"));
    CHECK(refused(Q3 ",\"layer_types\":[\"sliding_attention\"]}", "field 'layer_types' has 'sliding_attention'"));
    CHECK(refused(Q3 ",\"rope_scaling\":{\"rope_type\":\"yarn\",\"factor\":4,"
                  "\"original_max_position_embeddings\":32768}}", "rope type 'yarn'"));
    struct cfg c;
    CHECK_OK(cfg_parse(&c, Q3 ",\"layer_types\":[\"full_attention\"]}", "c", test_err()));
    cfg_release(&c);
#undef Q3
}

TEST(cfg_parses_llama32_1b)
{
    struct cfg c;
    CHECK_OK(cfg_parse(&c, LLAMA32_1B, "config.json", test_err()));
    CHECK(c.arch == CFG_ARCH_LLAMA && !c.qk_norm && !c.attention_bias && c.tie_word_embeddings);
    CHECK(c.head_dim == 64 && c.rope_theta == 500000.0 && c.rms_norm_eps == 1e-5);
    const struct cfg_rope_scaling *r = &c.rope_scaling;
    CHECK(r->type == CFG_ROPE_LLAMA3 && r->factor == 32 && r->low_freq_factor == 1 && r->high_freq_factor == 4);
    CHECK_INT(r->original_max_position_embeddings, 8192);
    CHECK_INT(cfg_param_count(&c), 1235814400); // Llama-3.2-1B's published count (tied)
    int n;
    CHECK_INT(tensors_sum(&c, &n), 1235814400);
    // saved again: the rope_scaling object is kept as it was
    CHECK_OK(cfg_save(&c, test_path("config.json"), test_err()));
    cfg_release(&c);
    CHECK_OK(cfg_load(&c, test_tmpdir(), test_err()));
    CHECK(c.rope_scaling.type == CFG_ROPE_LLAMA3 && c.rope_scaling.factor == 32);
    cfg_release(&c);
}

TEST(cfg_presets_qwen3_and_llama32_have_the_published_shapes)
{
    const char *names[] = { "qwen3-0.6b", "llama3.2-1b" };
    const char *texts[] = { QWEN3_06B, LLAMA32_1B };
    const int64_t counts[] = { 596049920, 1235814400 };
    for (int i = 0; i < 2; i++) {
        struct cfg p, pub, back;
        CHECK_OK(cfg_preset(&p, names[i], test_err()));
        CHECK_OK(cfg_parse(&pub, texts[i], "published", test_err()));
        CHECK_INT(cfg_param_count(&p), counts[i]);
        CHECK_OK(cfg_check_same(&pub, &p, "published", names[i], 0, test_err()));
        CHECK(p.qk_norm == pub.qk_norm && p.rope_theta == pub.rope_theta && p.rms_norm_eps == pub.rms_norm_eps);
        CHECK(p.max_position_embeddings == pub.max_position_embeddings && p.eos_token_id == pub.eos_token_id);
        CHECK(!memcmp(&p.rope_scaling, &pub.rope_scaling, sizeof p.rope_scaling));
        // written from scratch and read back: the same network, rope scaling included
        CHECK_OK(cfg_save(&p, test_path("config.json"), test_err()));
        CHECK_OK(cfg_load(&back, test_tmpdir(), test_err()));
        CHECK_OK(cfg_check_same(&pub, &back, "published", "saved", 0, test_err()));
        CHECK(back.qk_norm == pub.qk_norm && !memcmp(&back.rope_scaling, &pub.rope_scaling, sizeof p.rope_scaling));
        cfg_release(&back);
        cfg_release(&pub);
    }
}

TEST(cfg_refuses_sliding_window)
{
    CHECK(refused(QW ",\"num_attention_heads\":4,\"use_sliding_window\":true}", "field 'use_sliding_window' is true"));
}

TEST(cfg_refuses_hidden_act)
{
    CHECK(refused(LL ",\"num_attention_heads\":4,\"hidden_act\":\"gelu\"}", "field 'hidden_act' is 'gelu'"));
}

TEST(cfg_refuses_mlp_bias)
{
    CHECK(refused(LL ",\"num_attention_heads\":4,\"mlp_bias\":true}", "field 'mlp_bias' is true"));
}

TEST(cfg_refuses_missing_field)
{
    CHECK(refused(QW "}", "missing required field 'num_attention_heads'"));
    CHECK(refused("{\"architectures\":[\"Qwen2ForCausalLM\"],\"hidden_size\":64}",
                  "missing required field 'intermediate_size'"));
    CHECK(refused("{\"hidden_size\":64}", "missing required field 'architectures'"));
}

TEST(cfg_refuses_non_positive_sizes)
{
    CHECK(refused(QW ",\"num_attention_heads\":0}", "field 'num_attention_heads' must be positive"));
    CHECK(refused(QW ",\"num_attention_heads\":4,\"num_key_value_heads\":-2}", "'num_key_value_heads' must be positive"));
    CHECK(refused(QW ",\"num_attention_heads\":4.5}", "field 'num_attention_heads' must be an integer"));
    CHECK(refused(QW ",\"num_attention_heads\":\"4\"}", "must be an integer"));
}

TEST(cfg_refuses_indivisible_heads)
{
    CHECK(refused(QW ",\"num_attention_heads\":5}", "'hidden_size' 64 is not divisible by 'num_attention_heads' 5"));
    CHECK(refused(QW ",\"num_attention_heads\":4,\"num_key_value_heads\":3}",
                  "'num_attention_heads' 4 is not divisible by 'num_key_value_heads' 3"));
    // with head_dim given, hidden need not divide
    struct cfg c;
    CHECK_OK(cfg_parse(&c, QW ",\"num_attention_heads\":5,\"head_dim\":16}", "c", test_err()));
    cfg_release(&c);
}

TEST(cfg_refuses_unknown_architecture)
{
    CHECK(refused("{\"architectures\":[\"MistralForCausalLM\"]," BASE ",\"num_attention_heads\":4}",
                  "unsupported architecture 'MistralForCausalLM' (supported: LlamaForCausalLM, Qwen2ForCausalLM, "
                  "Qwen3ForCausalLM)"));
    CHECK(refused("{\"model_type\":\"gemma\"," BASE ",\"num_attention_heads\":4}", "unsupported architecture 'gemma'"));
}

TEST(cfg_refuses_bad_json)
{
    CHECK(refused("{\"hidden_size\": ", "not valid JSON"));
    CHECK(refused("[1]", "not a JSON object"));
    CHECK(refused(QW ",\"num_attention_heads\":4,\"tie_word_embeddings\":1}", "'tie_word_embeddings' must be true or false"));
}

TEST(cfg_save_keeps_unknown_fields)
{
    struct cfg c;
    CHECK_OK(cfg_parse(&c, QWEN05, "config.json", test_err()));
    snprintf(c.torch_dtype, sizeof c.torch_dtype, "float32");
    c.tie_word_embeddings = 0;
    const char *p = test_path("config.json");
    CHECK_OK(cfg_save(&c, p, test_err()));
    cfg_release(&c);
    char *text;
    CHECK_OK(lk_read_file(p, &text, NULL, test_err()));
    const char *head = "{\n  \"architectures\": [\n    \"Qwen2ForCausalLM\"\n  ],\n  \"attention_dropout\": 0,\n";
    CHECK(!strncmp(text, head, strlen(head))); // order kept, 2-space indent
    CHECK(strstr(text, "\n  \"torch_dtype\": \"float32\",\n"));
    CHECK(strstr(text, "\n  \"tie_word_embeddings\": false,\n"));
    CHECK(strstr(text, "\n  \"rms_norm_eps\": 1e-06,\n"));
    CHECK(strstr(text, "\n  \"transformers_version\": \"4.40.1\",\n")); // unknown fields kept
    CHECK(strstr(text, "\n  \"max_window_layers\": 24,\n"));
    CHECK(strstr(text, "\n  \"rope_scaling\": null,\n"));
    cJSON *j = cJSON_Parse(text);
    CHECK(j && cJSON_GetObjectItem(j, "sliding_window")->valueint == 32768);
    cJSON_Delete(j);
    CHECK_OK(cfg_parse(&c, text, "again", test_err()));
    CHECK(!c.tie_word_embeddings && c.hidden_size == 896 && c.rope_theta == 1e6);
    cfg_release(&c);
    lk_free(text);
    CHECK_INT(test_sh("ls -A '%s' | grep -c tmp", test_tmpdir()), 1); // no temp file left
}

TEST(cfg_save_from_scratch_roundtrips)
{
    struct cfg c, d;
    CHECK_OK(cfg_preset(&c, "llama-tiny", test_err()));
    CHECK_OK(cfg_save(&c, test_path("config.json"), test_err()));
    CHECK_OK(cfg_load(&d, test_tmpdir(), test_err())); // a folder holding config.json
    CHECK(d.arch == CFG_ARCH_LLAMA && !d.tie_word_embeddings && !d.attention_bias);
    CHECK(d.hidden_size == c.hidden_size && d.num_key_value_heads == c.num_key_value_heads);
    CHECK(d.rms_norm_eps == c.rms_norm_eps && d.rope_theta == c.rope_theta);
    CHECK(!strcmp(d.torch_dtype, "float32"));
    cfg_release(&d);
    struct lk_err err = { 0 };
    CHECK(cfg_preset(&c, "gpt2", &err) == LK_ERR_USAGE && strstr(err.msg, "tiny, qwen2.5-0.5b"));
    CHECK_OK(cfg_preset(&c, "qwen2-1.5b", test_err()));
    CHECK(c.hidden_size == 1536 && c.num_attention_heads == 12 && c.head_dim == 128 && c.num_hidden_layers == 28);
    CHECK(c.intermediate_size == 8960 && c.vocab_size == 151936 && c.tie_word_embeddings);
    CHECK_INT(cfg_param_count(&c), 1543714304); // Qwen2-1.5B's published parameter count
}

TEST(cfg_check_same_names_the_first_difference)
{
    struct cfg a, b;
    cfg_default_qwen2(&a);
    cfg_default_qwen2(&b);
    struct lk_err err = { 0 };
    CHECK_OK(cfg_check_same(&a, &b, "base", "tuned", 0, &err));
    b.num_key_value_heads = 4;
    CHECK_INT(cfg_check_same(&a, &b, "base", "tuned", 0, &err), LK_ERR_SHAPE);
    CHECK(strstr(err.msg, "tuned: config.json has num_key_value_heads 4, the base 'base' has 2"));
    cfg_default_qwen2(&b);
    b.tie_word_embeddings = 0; // a merge may untie: ignored only when asked
    CHECK_INT(cfg_check_same(&a, &b, "base", "tuned", 0, &err), LK_ERR_SHAPE);
    CHECK(strstr(err.msg, "tie_word_embeddings 0"));
    CHECK_OK(cfg_check_same(&a, &b, "base", "tuned", 1, &err));
    struct lk_err e2 = { 0 };
    CHECK_OK(cfg_preset(&b, "llama-tiny", &e2));
    CHECK_INT(cfg_check_same(&a, &b, "base", "tuned", 1, &err), LK_ERR_SHAPE);
    CHECK(strstr(err.msg, "is a LlamaForCausalLM") && strstr(err.msg, "Qwen2ForCausalLM"));
}

// ---- config.json bounded by the weights beside it ----

/* A model folder: config.json text and n tensors "t.K" of k floats each (n = 0: a file of no
 * tensors; n < 0: no weights file). */
static int bounded_dir(const char *dir, const char *config, int n, int k)
{
    char p[1100];
    if (lk_mkdir_p(dir, test_err()))
        return -1;
    snprintf(p, sizeof p, "%s/config.json", dir);
    if (lk_write_file_atomic(p, config, strlen(config), test_err()))
        return -1;
    if (n < 0)
        return 0;
    static float data[64];
    static char names[64][16];
    struct st_item it[64];
    for (int i = 0; i < n && i < 64; i++) {
        snprintf(names[i], sizeof names[i], "t.%d", i);
        it[i] = (struct st_item){ names[i], 1, { k }, data };
    }
    snprintf(p, sizeof p, "%s/model.safetensors", dir);
    return st_write_f32(p, it, n, TENSOR_F32, test_err());
}

#define QWEN_HEAD "{\"architectures\":[\"Qwen2ForCausalLM\"],\"model_type\":\"qwen2\","

TEST(cfg_load_bounds_the_config_by_its_weights)
{
    // layers, vocabulary and heads beyond what the weights could hold, each refused by cfg_load
    // before anything is sized from them; the message names config.json and the folder
    static const struct {
        const char *config;
        int n, k;
        const char *want;
    } bad[] = {
        { QWEN_HEAD "\"hidden_size\":2,\"intermediate_size\":2,\"num_hidden_layers\":7171000,"
          "\"num_attention_heads\":1,\"num_key_value_heads\":1,\"vocab_size\":2}", 0, 0,
          "describes 7171000 layers (at least 64539002 tensors)" },
        { QWEN_HEAD "\"hidden_size\":1,\"intermediate_size\":1,\"num_hidden_layers\":1,"
          "\"num_attention_heads\":1,\"vocab_size\":1000000000}", 16, 4, "describes 2000000013 parameters" },
        { QWEN_HEAD "\"hidden_size\":1,\"intermediate_size\":1,\"num_hidden_layers\":1,"
          "\"num_attention_heads\":100000000,\"num_key_value_heads\":1,\"head_dim\":1,\"vocab_size\":1}", 16, 4,
          "describes 300000012 parameters" },
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        char dir[1024];
        snprintf(dir, sizeof dir, "%s/bad%zu", test_tmpdir(), i);
        CHECK_OK(bounded_dir(dir, bad[i].config, bad[i].n, bad[i].k));
        struct cfg c;
        struct lk_err err = { 0 };
        CHECK_INT(cfg_load(&c, dir, &err), LK_ERR_SHAPE);
        CHECK_MSG(strstr(err.msg, bad[i].want) && strstr(err.msg, "config.json") && strstr(err.msg, dir),
                  "case %zu: %s", i, err.msg);
        // the same text parses on its own (cfg_parse sizes nothing), and a config.json given by
        // path is not bounded (init makes the model a config describes)
        char p[1100];
        snprintf(p, sizeof p, "%s/config.json", dir);
        CHECK_OK(cfg_load(&c, p, test_err()));
        cfg_release(&c);
    }
    // what fits loads; a config asking for a little more than the weights hold passes the bound,
    // so that the reader's own check names the missing tensor
    const char *tiny = QWEN_HEAD "\"hidden_size\":2,\"intermediate_size\":2,\"num_hidden_layers\":1,"
                       "\"num_attention_heads\":1,\"vocab_size\":2,\"tie_word_embeddings\":true}";
    struct cfg c;
    char dir[1024];
    snprintf(dir, sizeof dir, "%s/fits", test_tmpdir());
    CHECK_OK(bounded_dir(dir, tiny, 14, 4)); // 14 tensors: the 14 the config implies
    CHECK_OK(cfg_load(&c, dir, test_err()));
    CHECK_INT(c.num_hidden_layers, 1);
    cfg_release(&c);
    snprintf(dir, sizeof dir, "%s/short", test_tmpdir());
    CHECK_OK(bounded_dir(dir, tiny, 12, 4)); // two tensors short of the 14
    CHECK_OK(cfg_load(&c, dir, test_err()));
    cfg_release(&c);
    // no weights: nothing to bound by (whoever needs the weights opens them before sizing)
    snprintf(dir, sizeof dir, "%s/none", test_tmpdir());
    CHECK_OK(bounded_dir(dir, bad[0].config, -1, 0));
    CHECK_OK(cfg_load(&c, dir, test_err()));
    cfg_release(&c);
}

struct cfg_sweep {
    const char *path;
    struct cfg c;
};

static int sweep_cfg_load(void *ctx, struct lk_err *err)
{
    struct cfg_sweep *sw = ctx;
    return cfg_load(&sw->c, sw->path, err);
}

static int sweep_cfg_done(void *ctx, int rc)
{
    struct cfg_sweep *sw = ctx;
    const struct cfg *c = &sw->c;
    int bad = rc == LK_OK && (c->hidden_size != 64 || c->num_hidden_layers != 2 || !c->json ||
                              !strstr(c->json, "Qwen2ForCausalLM"));
    cfg_release(&sw->c);
    if (bad)
        test_fail(__FILE__, __LINE__, "loaded under allocation failures, but the config reads wrong");
    return bad ? -1 : 0;
}

TEST(cfg_load_survives_allocation_failures)
{
    // a model folder (the config is checked against the sharded weights: index and shards are
    // opened too) and a config.json given by path
    char dir[1024], p[1100];
    snprintf(dir, sizeof dir, "%s/m", test_tmpdir());
    CHECK_INT(test_sh("%s init --preset tiny --seed 1 --shard-size 200000 --out '%s'", test_lorakit(), dir), 0);
    snprintf(p, sizeof p, "%s/model.safetensors.index.json", dir);
    CHECK_MSG(lk_file_exists(p), "not sharded: %s", test_output());
    struct cfg_sweep sw = { dir, { 0 } };
    long n1 = ALLOC_SWEEP("cfg_load (model folder)", sweep_cfg_load, sweep_cfg_done, &sw, 5000);
    snprintf(p, sizeof p, "%s/config.json", dir);
    sw.path = p;
    long n2 = ALLOC_SWEEP("cfg_load (config.json)", sweep_cfg_load, sweep_cfg_done, &sw, 1000);
    CHECK(n2 >= 3 && n1 > n2 + 20); // the path, the text, its copy; then the shards
    fprintf(stderr, "    allocations made to fail: cfg_load of a sharded folder %ld, of a file %ld\n", n1, n2);
}

TEST(cfg_refuses_absurd_layer_counts_without_weights)
{
    // the fuzz_cfg finding's config, with no weights beside it to bound it: the tensor table
    // is refused instead of sized (a diff of two adapters on a config-only base asks for it)
    struct cfg c;
    struct lk_err err = { 0 };
    const char *text = "{\"architectures\":[\"Qwen2ForCausalLM\"],\"hidden_size\":8,\"intermediate_size\":8,"
                       "\"num_hidden_layers\":7171000,\"num_attention_heads\":2,\"num_key_value_heads\":1,"
                       "\"vocab_size\":8}";
    CHECK_OK(cfg_parse(&c, text, "config.json", &err));
    struct cfg_tensor *t = NULL;
    int n = 0;
    CHECK_INT(cfg_tensors(&c, &t, &n, &err), LK_ERR_FORMAT);
    CHECK(t == NULL && strstr(err.msg, "num_hidden_layers") && strstr(err.msg, "7171000"));
    cfg_release(&c);
}
