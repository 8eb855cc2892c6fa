/*
 * adamw.h - AdamW with decoupled weight decay (Loshchilov & Hutter 2019), as torch.optim.AdamW:
 *   m = b1 m + (1 - b1) g;  v = b2 v + (1 - b2) g^2
 *   p -= lr * wd * p;  p -= lr * (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps)
 * over flat ranges of one parameter block (grads and moments share its layout), plus the
 * learning-rate schedules (warm-up, then cosine, linear or constant, as transformers' get_*_schedule_with_warmup).
 */
#ifndef LK_ADAMW_H
#define LK_ADAMW_H

#include <stddef.h>

struct adamw {
    float beta1, beta2, eps;
};

/* One step on n parameters; t is the 1-based step count. */
void adamw_step(const struct adamw *o, float *p, const float *g, float *m, float *v, size_t n,
                float lr, float weight_decay, long t);

enum adamw_schedule { ADAMW_COSINE = 0, ADAMW_LINEAR, ADAMW_CONSTANT };
/* Learning rate at 0-based step (before the step is taken). */
double adamw_lr(enum adamw_schedule s, double lr, long step, long warmup, long total);
int adamw_schedule_parse(const char *s); /* -1 when unknown */

/* Global L2 norm of n gradients (double accumulation). */
double adamw_grad_norm(const float *g, size_t n);

#endif
