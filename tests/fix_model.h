/* fix_model.h - tiny model configs and random models/adapters for tests (made in memory). */
#ifndef LK_FIX_MODEL_H
#define LK_FIX_MODEL_H

#include "../libcore/model.h"

/* Qwen2-like: C 16, 4 heads, 2 kv heads (2 query heads per kv head), HS 4, F 24, L 2, V 37,
 * q/k/v biases, tied embeddings. */
void fix_cfg_qwen2(struct cfg *c);
/* Llama-like: C 12, 2 heads, 1 kv head, HS 6, F 20, L 2, V 29, no biases, untied. */
void fix_cfg_llama(struct cfg *c);
/* model_init + random weights (std), norms randomised around 1 so their gradients matter. */
int fix_model_random(struct model *m, const struct cfg *c, float std, uint64_t seed);
/* An adapter on the given targets with random A and B (scale 1 / sqrt fan). */
int fix_lora_random(struct lora *l, const struct cfg *c, unsigned targets, int R, double alpha,
                    int rslora, float dropout, uint64_t seed);
/* Random tokens in [0, V). */
void fix_tokens(int *tok, int n, int V, uint64_t seed);

#endif
