/*
 * ref_model.h - a plain double-precision reference of the decoder with LoRA (Llama with rope
 * scaling, Qwen2, Qwen3 with q_norm / k_norm), written independently of libcore/model.c (naive
 * loops, no BLAS, no shared kernels, its own rotary frequencies), for checking the fast path's
 * logits and, through central differences, its gradients.
 */
#ifndef LK_REF_MODEL_H
#define LK_REF_MODEL_H

#include "../libcore/model.h"

/* Logits [B*T, V] in double (out owned by caller), and the mean loss over targets != -100
 * (or the sum times loss_scale when loss_scale > 0). Dropout (train) uses the same hash mask
 * as the engine, from m->dropout_seed. */
double ref_forward(const struct model *m, const struct lora *lora, const int *tokens, const int *pos,
                   const int *seg, const int *targets, int B, int T, double loss_scale, int train,
                   double *out_logits);

/* The rotary inverse frequencies [HS/2] of a config, in double, from the published formulas
 * (transformers' modeling_rope_utils.py: default, linear, llama3; dynamic is the default below
 * max_position_embeddings), written here apart from the engine's float32 kernels. */
void ref_rope_inv_freq(const struct cfg *c, double *out);

/* DoRA's norm is detached in the engine: the reference takes it from these factors (set it to a
 * copy of the adapter before perturbing parameters; NULL: from the adapter itself). */
extern const struct lora *ref_dora_frozen;

#endif
