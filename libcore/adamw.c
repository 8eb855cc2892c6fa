/*
 * adamw.c - AdamW and learning-rate schedules. See adamw.h.
 */
#include "adamw.h"

#include <math.h>
#include <string.h>

/* pi to double precision: C11 has no M_PI (it is an XSI extension of <math.h>) */
#define ADAMW_PI 3.14159265358979323846

void adamw_step(const struct adamw *o, float *p, const float *g, float *m, float *v, size_t n,
                float lr, float weight_decay, long t)
{
    double bc1 = 1.0 - pow(o->beta1, (double)t), bc2 = 1.0 - pow(o->beta2, (double)t);
    float step = (float)(lr / bc1);
    float bc2_sqrt = (float)sqrt(bc2);
    for (size_t i = 0; i < n; i++) {
        float gi = g[i];
        m[i] = o->beta1 * m[i] + (1.0f - o->beta1) * gi;
        v[i] = o->beta2 * v[i] + (1.0f - o->beta2) * gi * gi;
        p[i] -= lr * weight_decay * p[i];
        // torch: denom = sqrt(v) / sqrt(bc2) + eps; p -= (lr / bc1) * m / denom
        p[i] -= step * m[i] / (sqrtf(v[i]) / bc2_sqrt + o->eps);
    }
}

double adamw_lr(enum adamw_schedule s, double lr, long step, long warmup, long total)
{
    if (step < warmup)
        return lr * (double)step / (double)(warmup > 0 ? warmup : 1);
    if (s == ADAMW_CONSTANT)
        return lr;
    double span = (double)(total - warmup);
    double progress = span > 0 ? (double)(step - warmup) / span : 1.0;
    if (progress > 1)
        progress = 1;
    if (s == ADAMW_LINEAR)
        return lr * (1.0 - progress);
    return lr * 0.5 * (1.0 + cos(ADAMW_PI * progress));
}

int adamw_schedule_parse(const char *s)
{
    if (!strcmp(s, "cosine"))
        return ADAMW_COSINE;
    if (!strcmp(s, "linear"))
        return ADAMW_LINEAR;
    if (!strcmp(s, "constant"))
        return ADAMW_CONSTANT;
    return -1;
}

double adamw_grad_norm(const float *g, size_t n)
{
    double s = 0;
    for (size_t i = 0; i < n; i++)
        s += (double)g[i] * g[i];
    return sqrt(s);
}
