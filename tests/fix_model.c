/* fix_model.c - see fix_model.h */
#include "fix_model.h"

#include <string.h>

static void base_cfg(struct cfg *c)
{
    memset(c, 0, sizeof *c);
    c->rms_norm_eps = 1e-6;
    c->rope_theta = 10000.0;
    c->initializer_range = 0.02;
    c->max_position_embeddings = 128;
    c->bos_token_id = c->eos_token_id = -1;
    snprintf(c->torch_dtype, sizeof c->torch_dtype, "float32");
}

static void dims(struct cfg *c, int C, int F, int L, int NH, int NKV, int HS, int V)
{
    c->hidden_size = C;
    c->intermediate_size = F;
    c->num_hidden_layers = L;
    c->num_attention_heads = NH;
    c->num_key_value_heads = NKV;
    c->head_dim = HS;
    c->vocab_size = V;
}

void fix_cfg_qwen2(struct cfg *c)
{
    base_cfg(c);
    c->arch = CFG_ARCH_QWEN2;
    snprintf(c->architecture, sizeof c->architecture, "Qwen2ForCausalLM");
    snprintf(c->model_type, sizeof c->model_type, "qwen2");
    dims(c, 16, 24, 2, 4, 2, 4, 37);
    c->tie_word_embeddings = 1;
    c->attention_bias = 1;
}

void fix_cfg_qwen2_wide(struct cfg *c)
{
    fix_cfg_qwen2(c);
    c->hidden_size = 64;
    c->intermediate_size = 132;
    c->num_attention_heads = 4;
    c->num_key_value_heads = 2;
    c->head_dim = 16;
}

void fix_cfg_llama(struct cfg *c)
{
    base_cfg(c);
    c->arch = CFG_ARCH_LLAMA;
    snprintf(c->architecture, sizeof c->architecture, "LlamaForCausalLM");
    snprintf(c->model_type, sizeof c->model_type, "llama");
    dims(c, 12, 20, 2, 2, 1, 6, 29);
    c->rope_theta = 500000.0;
    c->tie_word_embeddings = 0;
    c->attention_bias = 0;
}

void fix_cfg_qwen3(struct cfg *c)
{
    base_cfg(c);
    c->arch = CFG_ARCH_QWEN3;
    snprintf(c->architecture, sizeof c->architecture, "Qwen3ForCausalLM");
    snprintf(c->model_type, sizeof c->model_type, "qwen3");
    // heads x head_dim = 24, twice the hidden size, as Qwen3-0.6B's 16 x 128 against 1024
    dims(c, 12, 20, 2, 4, 2, 6, 31);
    c->rope_theta = 1000000.0;
    c->tie_word_embeddings = 1;
    c->attention_bias = 0;
    c->qk_norm = 1;
}

void fix_cfg_llama_bias(struct cfg *c)
{
    fix_cfg_llama(c);
    c->attention_bias = 1;
}

void fix_cfg_llama32(struct cfg *c)
{
    base_cfg(c);
    c->arch = CFG_ARCH_LLAMA;
    snprintf(c->architecture, sizeof c->architecture, "LlamaForCausalLM");
    snprintf(c->model_type, sizeof c->model_type, "llama");
    dims(c, 16, 24, 2, 2, 1, 8, 29);
    c->rms_norm_eps = 1e-5;
    c->rope_theta = 100.0;
    c->tie_word_embeddings = 1;
    c->attention_bias = 0;
    // wavelengths 2 pi / inv_freq = 6.3, 19.9, 62.8, 198.7 against the bands' edges 32/4 = 8 and
    // 32/1 = 32: one high-frequency (kept), one medium (interpolated), two low (divided by 8)
    c->rope_scaling = (struct cfg_rope_scaling){ CFG_ROPE_LLAMA3, 8.0, 1.0, 4.0, 32 };
}

int fix_model_random(struct model *m, const struct cfg *c, float std, uint64_t seed)
{
    int rc = model_init(m, c, NULL);
    if (rc)
        return rc;
    struct lk_rng rng;
    lk_rng_seed(&rng, seed);
    model_weights_randomize(&m->w, c, std, &rng);
    struct model_tensor *t;
    int n;
    if (model_weights_tensors(&m->w, c, &t, &n, NULL) == LK_OK) {
        for (int i = 0; i < n; i++)
            if (strstr(t[i].name, "norm"))
                for (size_t j = 0; j < t[i].numel; j++)
                    t[i].data[j] = 1.0f + 0.2f * lk_rng_normal(&rng);
        lk_free(t);
    }
    return LK_OK;
}

int fix_lora_random(struct lora *l, const struct cfg *c, unsigned targets, int R, double alpha,
                    int rslora, float dropout, uint64_t seed)
{
    return fix_lora_random_bias(l, c, targets, R, alpha, rslora, dropout, 0, seed);
}

int fix_lora_random_bias(struct lora *l, const struct cfg *c, unsigned targets, int R, double alpha,
                         int rslora, float dropout, int lora_bias, uint64_t seed)
{
    struct lora_config lc;
    lora_config_default(&lc);
    lc.targets = targets;
    lc.r = R;
    lc.alpha = alpha;
    lc.use_rslora = rslora;
    lc.dropout = dropout;
    lc.lora_bias = lora_bias;
    int rc = lora_init(l, &lc, c, NULL);
    if (rc)
        return rc;
    struct lk_rng rng;
    lk_rng_seed(&rng, seed);
    for (int i = 0; i < l->n_mod; i++) {
        struct lora_module *md = &l->mod[i];
        for (size_t j = 0; j < (size_t)md->R * md->in; j++)
            md->A[j] = 0.5f * lk_rng_normal(&rng);
        for (size_t j = 0; j < (size_t)md->out * md->R; j++)
            md->B[j] = 0.5f * lk_rng_normal(&rng);
        for (int j = 0; md->bias && j < md->out; j++)
            md->bias[j] = 0.3f * lk_rng_normal(&rng);
    }
    return LK_OK;
}

void fix_tokens(int *tok, int n, int V, uint64_t seed)
{
    struct lk_rng rng;
    lk_rng_seed(&rng, seed);
    for (int i = 0; i < n; i++)
        tok[i] = (int)(lk_rng_u64(&rng) % (uint64_t)V);
}
