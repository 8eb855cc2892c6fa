/* fuzz_adapter.c - adapter_model.safetensors through lora_load: names parsed into layers and
 * modules, shapes against the rank and the model, dtypes. The folder holds a fixed
 * adapter_config.json (r 2, q_proj and v_proj); the model is the 1-layer Qwen2 of seed.sh. */
#include "fuzz_util.h"

#include "../../libcore/cfg.h"
#include "../../libcore/lora.h"

static struct cfg c;

static void setup(void)
{
    static int done;
    if (done)
        return;
    done = 1;
    static const char cj[] =
        "{\"architectures\":[\"Qwen2ForCausalLM\"],\"model_type\":\"qwen2\",\"hidden_size\":8,"
        "\"intermediate_size\":16,\"num_hidden_layers\":1,\"num_attention_heads\":2,\"num_key_value_heads\":1,"
        "\"vocab_size\":16,\"max_position_embeddings\":64,\"tie_word_embeddings\":true}";
    struct lk_err err = { 0 };
    if (cfg_parse(&c, cj, "config.json", &err))
        abort();
    static const char ac[] = "{\"peft_type\":\"LORA\",\"r\":2,\"lora_alpha\":4,\"target_modules\":[\"q_proj\",\"v_proj\"]}";
    char p[600];
    snprintf(p, sizeof p, "%s", fz_path("adapter_config.json"));
    fz_write(p, ac, sizeof ac - 1);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    setup();
    fz_write(fz_path("adapter_model.safetensors"), data, size);
    struct lora l;
    memset(&l, 0, sizeof l);
    struct lk_err err = { 0 };
    int rc = lora_load(&l, fz_dir(), &c, &err);
    fz_check_err(rc, &err);
    lora_release(&l);
    return 0;
}
