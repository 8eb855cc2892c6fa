/*
 * lora_pissa.c - PiSSA initialisation (Meng et al. 2024) as PEFT's pissa_init does it:
 * W = U S V^T, A = sqrt(S_r / s) V_r^T, B = U_r sqrt(S_r / s), and the base keeps the
 * residual W - s B A. The trained adapter is saved as PEFT's conversion does
 * (path_initial_model_for_weight_conversion): dW = s (B A - B0 A0) as a rank-2r adapter
 * [A; A0], [B, -B0] with alpha doubled (times sqrt 2 with rsLoRA), so it applies to the
 * ORIGINAL base. Also lora_base_weight, the frozen W of a module (shared with lora_dora.c).
 * DoRA's set-up is in lora_dora.c.
 */
#include <cblas.h>
#include <math.h>
#include <string.h>

#include "lora.h"
#include "model.h"
#include "svd.h"
#include "tensor.h"

const struct op_mat *lora_base_weight(const struct model *m, int layer, int module)
{
    const struct model_layer *w = &m->w.layer[layer];
    const struct op_mat *p[CFG_N_MODULES] = { &w->wq, &w->wk, &w->wv, &w->wo, &w->wgate, &w->wup, &w->wdown };
    return p[module];
}

int lora_init_pissa(struct lora *l, struct model *m, struct lk_err *err)
{
    lk_free(l->init_mem);
    l->init_mem = NULL;
    struct svd_opts so;
    svd_opts_init(&so);
    for (int k = 0; k < l->n_mod; k++) {
        struct lora_module *md = &l->mod[k];
        int R = md->R, out = md->out, in = md->in;
        if (R > (out < in ? out : in))
            return lk_errf(err, LK_ERR_USAGE, "PiSSA rank %d exceeds the size of %s (%d x %d)", R,
                           cfg_module_names[md->module], out, in);
        const struct op_mat *Wm = lora_base_weight(m, md->layer, md->module);
        if (Wm->dtype != TENSOR_F32)
            return lk_errf(err, LK_ERR_UNSUPPORTED, "PiSSA rewrites the base weights, which are kept in %s here: "
                           "load them in float32 (hint: --weights f32)", tensor_dtype_name(Wm->dtype));
        float *W = Wm->f;
        float *U = lk_malloc(sizeof(float) * (size_t)out * R), *S = lk_malloc(sizeof(float) * (size_t)R);
        float *Vt = lk_malloc(sizeof(float) * (size_t)R * in);
        int rc = (!U || !S || !Vt) ? lk_errf(err, LK_ERR_NOMEM, "out of memory")
                                   : svd_truncated(out, in, W, R, &so, U, S, Vt, NULL, err);
        if (!rc) {
            for (int r = 0; r < R; r++) {
                float g = sqrtf(S[r] / md->scale);
                for (int i = 0; i < in; i++)
                    md->A[(size_t)r * in + i] = g * Vt[(size_t)r * in + i];
                for (int o = 0; o < out; o++)
                    md->B[(size_t)o * R + r] = g * U[(size_t)o * R + r];
            }
            // W <- W - s B A
            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, out, in, R, -md->scale, md->B, R, md->A,
                        in, 1.0f, W, in);
        }
        lk_free(U);
        lk_free(S);
        lk_free(Vt);
        if (rc)
            return rc;
    }
    l->init_mem = lk_malloc(sizeof(float) * (l->n ? l->n : 1));
    if (!l->init_mem)
        return lk_errf(err, LK_ERR_NOMEM, "out of memory");
    memcpy(l->init_mem, l->mem, sizeof(float) * l->n);
    return LK_OK;
}

int lora_save_pissa(const struct lora *l, const struct model *m, const char *dir, struct lk_err *err)
{
    if (!l->init_mem)
        return lk_errf(err, LK_ERR_USAGE, "adapter was not PiSSA-initialised");
    struct lora_config lc = l->cfg;
    lc.rank_pattern = lc.alpha_pattern = NULL;
    lc.n_rank_pattern = lc.n_alpha_pattern = 0;
    lc.modules_to_save = NULL;
    lc.n_modules_to_save = 0;
    lc.r = 2 * l->cfg.r;
    lc.alpha = l->cfg.use_rslora ? l->cfg.alpha * sqrt(2.0) : 2 * l->cfg.alpha;
    snprintf(lc.init, sizeof lc.init, "true");
    struct lora c2;
    int rc = lora_init(&c2, &lc, &m->cfg, err);
    if (rc)
        return rc;
    for (int k = 0; k < l->n_mod && !rc; k++) {
        const struct lora_module *md = &l->mod[k];
        struct lora_module *nd = lora_find(&c2, md->layer, md->module);
        if (!nd || nd->R != 2 * md->R) {
            rc = lk_errf(err, LK_ERR_SHAPE, "PiSSA conversion: adapter layout changed");
            break;
        }
        const float *A0 = l->init_mem + (md->A - l->mem), *B0 = l->init_mem + (md->B - l->mem);
        size_t na = (size_t)md->R * md->in;
        memcpy(nd->A, md->A, sizeof(float) * na);
        memcpy(nd->A + na, A0, sizeof(float) * na);
        for (int o = 0; o < md->out; o++)
            for (int r = 0; r < md->R; r++) {
                nd->B[(size_t)o * nd->R + r] = md->B[(size_t)o * md->R + r];
                nd->B[(size_t)o * nd->R + md->R + r] = -B0[(size_t)o * md->R + r];
            }
    }
    if (!rc)
        rc = lora_save(&c2, dir, err);
    lora_release(&c2);
    return rc;
}
