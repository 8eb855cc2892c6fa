/* fix_model.h - tiny model configs and random models/adapters for tests (made in memory). */
#ifndef LK_FIX_MODEL_H
#define LK_FIX_MODEL_H

#include "../libcore/model.h"

/* Qwen2-like: C 16, 4 heads, 2 kv heads (2 query heads per kv head), HS 4, F 24, L 2, V 37,
 * q/k/v biases, tied embeddings. */
void fix_cfg_qwen2(struct cfg *c);
/* fix_cfg_qwen2 made wider: C 64, 4 heads x HS 16, 2 kv heads, F 132 (products large enough for
 * the batched steps' padding and tiling, generate.c). */
void fix_cfg_qwen2_wide(struct cfg *c);
/* Llama-like: C 12, 2 heads, 1 kv head, HS 6, F 20, L 2, V 29, no biases, untied. */
void fix_cfg_llama(struct cfg *c);
/* fix_cfg_llama with attention_bias: biases on q, k, v and o_proj (transformers' LlamaAttention). */
void fix_cfg_llama_bias(struct cfg *c);
/* Qwen3-like: C 12, 4 heads, 2 kv heads, HS 6 (heads x HS = 24 != C), F 20, L 2, V 31, no biases,
 * q_norm / k_norm, tied embeddings. */
void fix_cfg_qwen3(struct cfg *c);
/* Llama-3.2-like: C 16, 2 heads, 1 kv head, HS 8, F 24, L 2, V 29, tied, rope_theta 100 and llama3
 * rope scaling (factor 8, low 1, high 4, original 32): its four frequencies lie in all three bands. */
void fix_cfg_llama32(struct cfg *c);
/* model_init + random weights (std), norms randomised around 1 so their gradients matter. */
int fix_model_random(struct model *m, const struct cfg *c, float std, uint64_t seed);
/* An adapter on the given targets with random A and B (scale 1 / sqrt fan). */
int fix_lora_random(struct lora *l, const struct cfg *c, unsigned targets, int R, double alpha,
                    int rslora, float dropout, uint64_t seed);
/* The same with lora_B.bias on every module (lora_bias), random too. */
int fix_lora_random_bias(struct lora *l, const struct cfg *c, unsigned targets, int R, double alpha,
                         int rslora, float dropout, int lora_bias, uint64_t seed);
/* Random tokens in [0, V). */
void fix_tokens(int *tok, int n, int V, uint64_t seed);

#endif
