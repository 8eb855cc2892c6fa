/*
 * test_init.c - `lorakit init` and `lorakit info` end to end: layout, determinism, the
 * distributions drawn, shards, dtypes, the output-folder rules, usage errors, --json output.
 */
#include "test.h"

#include <cJSON.h>
#include <math.h>
#include <string.h>

#include "../libcore/cfg.h"
#include "../libcore/lk.h"
#include "../libcore/st.h"

TEST(init_tiny_layout_and_values)
{
    const char *dir = test_path("tiny");
    CHECK_INT(test_sh("%s init --preset tiny --out '%s' --seed 1", test_lorakit(), dir), 0);
    struct cfg c;
    CHECK_OK(cfg_load(&c, dir, test_err()));
    CHECK(c.hidden_size == 64 && c.intermediate_size == 176 && c.num_hidden_layers == 2);
    CHECK(c.num_attention_heads == 4 && c.num_key_value_heads == 2 && c.vocab_size == 512 && c.tie_word_embeddings);
    char *gen = lk_path_join(dir, "generation_config.json");
    CHECK(lk_file_exists(gen));
    lk_free(gen);
    struct st_model m;
    CHECK_OK(st_model_open(&m, dir, test_err()));
    CHECK(!m.sharded);
    CHECK(!strcmp(st_meta(&m.files[0], "format"), "pt"));
    struct cfg_tensor *want;
    int n;
    CHECK_OK(cfg_tensors(&c, &want, &n, test_err()));
    CHECK_INT(st_model_count(&m), n);
    static float buf[512 * 64];
    for (int i = 0; i < n; i++) {
        const struct st_tensor *t = st_model_find(&m, want[i].name, NULL);
        CHECK_MSG(t, "missing %s", want[i].name);
        CHECK(t->dtype == TENSOR_F32 && t->shape[0] == want[i].shape[0]);
        CHECK_OK(st_tensor_to_f32(t, buf, test_err()));
        double s = 0, s2 = 0;
        for (size_t j = 0; j < t->numel; j++) {
            s += buf[j];
            s2 += (double)buf[j] * buf[j];
        }
        double mean = s / (double)t->numel, sd = sqrt(s2 / (double)t->numel - mean * mean);
        if (want[i].kind == CFG_T_NORM) {
            CHECK_MSG(mean == 1.0 && sd == 0.0, "%s: norms are 1", want[i].name);
        } else { // weights and biases: normal(0, 0.02); biases have only 32..64 values
            double tol = want[i].kind == CFG_T_BIAS ? 0.4 : 0.1;
            CHECK_MSG(fabs(sd - 0.02) < 0.02 * tol, "%s: sd %g", want[i].name, sd);
            CHECK_MSG(fabs(mean) < 0.02 * 4 / sqrt((double)t->numel), "%s: mean %g", want[i].name, mean);
        }
    }
    lk_free(want);
    st_model_close(&m);
    cfg_release(&c);
    CHECK_INT(test_sh("%s info '%s'", test_lorakit(), dir), 0);
    CHECK(strstr(test_output(), "architecture: Qwen2ForCausalLM"));
    CHECK(strstr(test_output(), "parameters: 125504 "));
    CHECK(strstr(test_output(), "model.layers.1.self_attn.k_proj.bias"));
    CHECK_INT(test_sh("ls -A '%s' | wc -l", test_tmpdir()), 0);
    CHECK(strstr(test_output(), "2")); // tiny and out.txt: no temp folder left
}

TEST(init_same_seed_same_bytes)
{
    CHECK_INT(test_sh("%s init --preset tiny --out '%s' --seed 5 --dtype bf16", test_lorakit(), test_path("a")), 0);
    CHECK_INT(test_sh("%s init --preset tiny --out '%s' --seed 5 --dtype bf16", test_lorakit(), test_path("b")), 0);
    CHECK_INT(test_sh("%s init --preset tiny --out '%s' --seed 6 --dtype bf16", test_lorakit(), test_path("c")), 0);
    CHECK_INT(test_sh("cmp '%s/model.safetensors' '%s/model.safetensors'", test_path("a"), test_path("b")), 0);
    CHECK_INT(test_sh("cmp '%s/config.json' '%s/config.json'", test_path("a"), test_path("b")), 0);
    CHECK(test_sh("cmp -s '%s/model.safetensors' '%s/model.safetensors'", test_path("a"), test_path("c")) != 0);
}

TEST(init_dtypes_and_config_dtype)
{
    const char *dts[3] = { "f32", "bf16", "f16" }, *torch[3] = { "float32", "bfloat16", "float16" };
    enum tensor_dtype want[3] = { TENSOR_F32, TENSOR_BF16, TENSOR_F16 };
    for (int i = 0; i < 3; i++) {
        const char *dir = test_path(dts[i]);
        CHECK_INT(test_sh("%s init --preset llama-tiny --out '%s' --dtype %s", test_lorakit(), dir, dts[i]), 0);
        struct cfg c;
        struct st_model m;
        CHECK_OK(cfg_load(&c, dir, test_err()));
        CHECK(!strcmp(c.torch_dtype, torch[i]) && c.arch == CFG_ARCH_LLAMA && !c.tie_word_embeddings);
        CHECK_OK(st_model_open(&m, dir, test_err()));
        const struct st_tensor *t = st_model_find(&m, "lm_head.weight", NULL);
        CHECK(t && t->dtype == want[i]);
        CHECK(st_model_find(&m, "model.layers.0.self_attn.q_proj.bias", NULL) == NULL);
        st_model_close(&m);
        cfg_release(&c);
    }
    // the same seed in f32 and bf16: bf16 values are the f32 ones rounded once
    struct st_model a, b;
    CHECK_OK(st_model_open(&a, test_path("f32"), test_err()));
    CHECK_OK(st_model_open(&b, test_path("bf16"), test_err()));
    const struct st_tensor *ta = st_model_find(&a, "model.embed_tokens.weight", NULL);
    const struct st_tensor *tb = st_model_find(&b, "model.embed_tokens.weight", NULL);
    const float *fa = st_tensor_f32(ta);
    const uint16_t *hb = tb->data;
    CHECK(fa);
    for (size_t j = 0; j < ta->numel; j += 97)
        CHECK(fabsf(tensor_bf16_to_f32(hb[j]) - fa[j]) <= fabsf(fa[j]) * (1.0f / 256));
    st_model_close(&a);
    st_model_close(&b);
}

TEST(init_shards_with_index)
{
    const char *dir = test_path("sh");
    CHECK_INT(test_sh("%s init --preset tiny --out '%s' --shard-size 100KB", test_lorakit(), dir), 0);
    struct st_model m;
    CHECK_OK(st_model_open(&m, dir, test_err()));
    CHECK(m.sharded && m.n_files >= 4); // ~502 KB of f32 data in 100 KB shards
    CHECK_INT(st_model_count(&m), 26);
    for (int i = 0; i < m.n_files; i++) {
        size_t bytes = 0;
        for (int k = 0; k < m.files[i].n; k++)
            bytes += m.files[i].t[k].nbytes;
        CHECK(bytes <= 100000 || m.files[i].n == 1); // only a lone big tensor exceeds the limit
    }
    st_model_close(&m);
    CHECK_INT(test_sh("%s info '%s'", test_lorakit(), dir), 0);
    CHECK(strstr(test_output(), "(sharded)"));
    CHECK(strstr(test_output(), "model-00001-of-"));
}

TEST(init_from_config_keeps_fields)
{
    const char *cfgp = test_path("in.json");
    const char *text = "{\"architectures\":[\"LlamaForCausalLM\"],\"hidden_size\":32,\"intermediate_size\":64,"
                       "\"num_hidden_layers\":1,\"num_attention_heads\":2,\"vocab_size\":50,"
                       "\"initializer_range\":0.5,\"my_field\":\"kept\",\"torch_dtype\":\"float16\"}";
    CHECK_OK(lk_write_file_atomic(cfgp, text, strlen(text), test_err()));
    const char *dir = test_path("m");
    CHECK_INT(test_sh("%s init --config '%s' --out '%s'", test_lorakit(), cfgp, dir), 0);
    struct cfg c;
    CHECK_OK(cfg_load(&c, dir, test_err()));
    CHECK(strstr(c.json, "\"my_field\": \"kept\"") && !strcmp(c.torch_dtype, "float16"));
    cfg_release(&c);
    struct st_model m;
    CHECK_OK(st_model_open(&m, dir, test_err()));
    const struct st_tensor *t = st_model_find(&m, "model.embed_tokens.weight", NULL);
    CHECK(t->dtype == TENSOR_F16);
    float v[50 * 32];
    CHECK_OK(st_tensor_to_f32(t, v, test_err()));
    double s2 = 0;
    for (int i = 0; i < 50 * 32; i++)
        s2 += (double)v[i] * v[i];
    CHECK_NEAR(sqrt(s2 / (50 * 32)), 0.5, 0.1); // initializer_range from the config
    st_model_close(&m);
}

TEST(init_refuses_nonempty_out)
{
    const char *dir = test_path("o");
    CHECK_OK(lk_mkdir_p(dir, test_err()));
    CHECK_INT(test_sh("echo precious > '%s/keep.txt'", dir), 0);
    CHECK_INT(test_sh("%s init --preset tiny --out '%s'", test_lorakit(), dir), 1);
    CHECK(strstr(test_output(), "folder exists and is not empty (use --overwrite"));
    CHECK_INT(test_sh("cat '%s/keep.txt'", dir), 0);
    CHECK_INT(test_sh("%s init --preset tiny --out '%s' --overwrite", test_lorakit(), dir), 0);
    CHECK(!lk_file_exists(test_path("o/keep.txt")));
    CHECK(lk_file_exists(test_path("o/model.safetensors")));
    CHECK_INT(test_sh("ls -A '%s' | grep -c '\\.tmp\\.\\|\\.old\\.'", test_tmpdir()), 1); // nothing left over
    // an empty folder is fine; a file is not
    CHECK_OK(lk_mkdir_p(test_path("empty"), test_err()));
    CHECK_INT(test_sh("%s init --preset tiny --out '%s'", test_lorakit(), test_path("empty")), 0);
    CHECK_INT(test_sh("echo x > '%s'", test_path("afile")), 0);
    CHECK_INT(test_sh("%s init --preset tiny --out '%s'", test_lorakit(), test_path("afile")), 1);
    CHECK(strstr(test_output(), "exists and is not a folder"));
}

TEST(init_usage_errors)
{
    const char *k = test_lorakit();
    CHECK_INT(test_sh("%s init --preset tiny", k), 2);
    CHECK(strstr(test_output(), "missing --out"));
    CHECK_INT(test_sh("%s init --preset tiny --config x.json --out '%s'", k, test_path("x")), 2);
    CHECK_INT(test_sh("%s init --preset tiny --out '%s' --dtype f8", k, test_path("x")), 2);
    CHECK(strstr(test_output(), "'--dtype' wants f32, bf16 or f16"));
    CHECK_INT(test_sh("%s init --preset huge --out '%s'", k, test_path("x")), 2);
    CHECK(strstr(test_output(), "unknown preset 'huge'"));
    CHECK_INT(test_sh("%s init --preset tiny --out '%s' --shard-size 5XB", k, test_path("x")), 2);
    CHECK_INT(test_sh("%s init --preset tiny --out '%s' --seed abc", k, test_path("x")), 2);
    CHECK_INT(test_sh("%s init --config '%s' --out '%s'", k, test_path("nope.json"), test_path("x")), 1);
    CHECK(strstr(test_output(), "nope.json"));
    CHECK(!lk_file_exists(test_path("x")));
    CHECK_INT(test_sh("%s init --help", k), 0);
    CHECK(strstr(test_output(), "example:") && strstr(test_output(), "bias"));
    CHECK_INT(test_sh("%s info --help", k), 0);
    CHECK_INT(test_sh("%s info", k), 2);
    CHECK_INT(test_sh("%s info '%s'", k, test_path("nothing")), 1);
}

TEST(info_json_for_model_and_file)
{
    const char *dir = test_path("t");
    CHECK_INT(test_sh("%s init --preset tiny --out '%s' --dtype bf16 2>/dev/null", test_lorakit(), dir), 0);
    CHECK_INT(test_sh("%s info --json '%s' 2>/dev/null", test_lorakit(), dir), 0);
    cJSON *j = cJSON_Parse(test_output());
    CHECK(j);
    CHECK(cJSON_GetObjectItem(j, "parameters")->valuedouble == 125504);
    CHECK(!strcmp(cJSON_GetObjectItem(j, "dtype")->valuestring, "BF16"));
    CHECK(cJSON_GetArraySize(cJSON_GetObjectItem(j, "tensors")) == 26);
    cJSON_Delete(j);
    CHECK_INT(test_sh("%s info --json '%s/model.safetensors'", test_lorakit(), dir), 0);
    j = cJSON_Parse(test_output());
    CHECK(j && !strcmp(cJSON_GetObjectItem(cJSON_GetObjectItem(j, "metadata"), "format")->valuestring, "pt"));
    cJSON *t0 = cJSON_GetArrayItem(cJSON_GetObjectItem(j, "tensors"), 0);
    CHECK(!strcmp(cJSON_GetObjectItem(t0, "name")->valuestring, "model.embed_tokens.weight"));
    CHECK(cJSON_GetArrayItem(cJSON_GetObjectItem(t0, "shape"), 0)->valueint == 512);
    cJSON_Delete(j);
    CHECK_INT(test_sh("%s info '%s/model.safetensors'", test_lorakit(), dir), 0);
    CHECK(strstr(test_output(), "format: pt") && strstr(test_output(), "BF16"));
}

TEST(info_refuses_model_not_matching_config)
{
    // a llama-tiny config over tiny (Qwen2) weights: the biases are extra, lm_head is missing
    const char *dir = test_path("t");
    CHECK_INT(test_sh("%s init --preset tiny --out '%s'", test_lorakit(), dir), 0);
    struct cfg c;
    CHECK_OK(cfg_preset(&c, "llama-tiny", test_err()));
    CHECK_OK(cfg_save(&c, test_path("t/config.json"), test_err()));
    CHECK_INT(test_sh("%s info '%s'", test_lorakit(), dir), 1);
    CHECK(strstr(test_output(), "tensor 'lm_head.weight' is missing"));
    // a config whose dimensions disagree with the weights
    CHECK_OK(cfg_preset(&c, "tiny", test_err()));
    c.intermediate_size = 100;
    CHECK_OK(cfg_save(&c, test_path("t/config.json"), test_err()));
    CHECK_INT(test_sh("%s info '%s'", test_lorakit(), dir), 1);
    CHECK(strstr(test_output(), "tensor 'model.layers.0.mlp.gate_proj.weight' has shape [176, 64], the config implies [100, 64]"));
}
