/*
 * lora_dora.c - DoRA's set-up (Liu et al. 2024, "DoRA: Weight-Decomposed Low-Rank Adaptation"):
 * each targeted linear's magnitude vector starts as the row norms of the adapted weight,
 * m = ||W + s B A||_row, as PEFT's DoRA layer does when it is created, so that the scale
 * g = m / ||W + s B A||_row starts at 1 and DoRA starts from what plain LoRA computes. The DoRA
 * forward and backward are model.c's
 * (y = b + g * (W x + s B A x), g = m / ||W + s B A||_row), the magnitudes' file format
 * lora_io.c's (lora_magnitude_vector), their merge merge.c's.
 */
#include <cblas.h>
#include <math.h>
#include <string.h>

#include "lora.h"
#include "model.h"
#include "ops.h"

int lora_init_dora_magnitude(struct lora *l, const struct model *m, struct lk_err *err)
{
    size_t wn = 0;
    for (int k = 0; k < l->n_mod; k++)
        if ((size_t)l->mod[k].out * l->mod[k].in > wn)
            wn = (size_t)l->mod[k].out * l->mod[k].in;
    float *Wm = lk_malloc(sizeof(float) * (wn ? wn : 1));
    if (!Wm)
        return lk_errf(err, LK_ERR_NOMEM, "out of memory");
    for (int k = 0; k < l->n_mod; k++) {
        struct lora_module *md = &l->mod[k];
        if (!md->mag)
            continue;
        op_mat_widen(Wm, lora_base_weight(m, md->layer, md->module), md->in, 0, md->out, 0, md->in);
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, md->out, md->in, md->R, md->scale, md->B, md->R,
                    md->A, md->in, 1.0f, Wm, md->in);
        for (int o = 0; o < md->out; o++) {
            double ss = 0;
            for (int i = 0; i < md->in; i++)
                ss += (double)Wm[(size_t)o * md->in + i] * Wm[(size_t)o * md->in + i];
            md->mag[o] = (float)sqrt(ss);
        }
    }
    lk_free(Wm);
    return LK_OK;
}
