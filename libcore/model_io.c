/*
 * model_io.c - model folders in the Hugging Face layout: config.json plus model.safetensors
 * (or shards through model.safetensors.index.json), read into the float32 weight block and
 * written from it.
 */
#include "model.h"

#include <string.h>

#include "gguf.h"
#include "st.h"
#include "tensor.h"

int model_load(struct model *m, const char *dir, struct lk_err *err)
{
    if (gguf_is_file(dir)) // one GGUF file instead of a folder: gguf_model.c reads it
        return gguf_model_load(m, dir, err);
    memset(m, 0, sizeof *m);
    // the weights are opened before anything is sized from the config (which cfg_load has
    // bounded by them): a folder without weights is refused before model_init
    struct cfg c;
    int rc = cfg_load(&c, dir, err);
    if (rc)
        return rc;
    struct st_model sm;
    if ((rc = st_model_open(&sm, dir, err))) {
        cfg_release(&c);
        return rc;
    }
    rc = model_init(m, &c, err);
    m->cfg.json = c.json; // the model keeps the original text (for saving)
    if (rc) {
        cfg_release(&c);
        st_model_close(&sm);
        memset(m, 0, sizeof *m);
        return rc;
    }
    struct model_tensor *t = NULL;
    int n = 0;
    if ((rc = model_weights_tensors(&m->w, &m->cfg, &t, &n, err)))
        goto out;
    for (int i = 0; i < n && !rc; i++) {
        const struct st_tensor *s = st_model_find(&sm, t[i].name, NULL);
        if (!s) {
            rc = lk_errf(err, LK_ERR_MISSING, "%s: model has no tensor '%s'", dir, t[i].name);
            break;
        }
        if (s->ndim != t[i].ndim || s->shape[0] != t[i].shape[0] ||
            (t[i].ndim > 1 && s->shape[1] != t[i].shape[1])) {
            rc = lk_errf(err, LK_ERR_SHAPE, "%s: tensor '%s' has a shape that does not match config.json "
                         "(expected [%lld%s%lld])", dir, t[i].name, (long long)t[i].shape[0],
                         t[i].ndim > 1 ? ", " : "", t[i].ndim > 1 ? (long long)t[i].shape[1] : 0LL);
            break;
        }
        if (!tensor_dtype_is_float(s->dtype)) {
            rc = lk_errf(err, LK_ERR_FORMAT, "%s: tensor '%s' has dtype %s, expected F32, F16 or BF16", dir,
                         t[i].name, tensor_dtype_name(s->dtype));
            break;
        }
        rc = st_tensor_to_f32(s, t[i].data, err);
    }
out:
    lk_free(t);
    st_model_close(&sm);
    if (rc)
        model_release(m);
    return rc;
}

static const char *dtype_torch_name(int dtype)
{
    return dtype == TENSOR_BF16 ? "bfloat16" : dtype == TENSOR_F16 ? "float16" : "float32";
}

int model_weights_save_st(const struct model_weights *w, const struct cfg *c, const char *path,
                          int dtype, struct lk_err *err)
{
    if (dtype != TENSOR_F32 && dtype != TENSOR_BF16 && dtype != TENSOR_F16)
        return lk_errf(err, LK_ERR_USAGE, "model dtype must be F32, BF16 or F16");
    struct model_tensor *t;
    int n, rc;
    if ((rc = model_weights_tensors(w, c, &t, &n, err)))
        return rc;
    struct st_writer sw;
    if (!(rc = st_writer_init(&sw, path, err))) {
        st_writer_meta(&sw, "format", "pt");
        for (int i = 0; i < n; i++)
            st_writer_declare(&sw, t[i].name, (enum tensor_dtype)dtype, t[i].ndim, t[i].shape);
        st_writer_begin(&sw);
        for (int i = 0; i < n; i++)
            st_writer_write(&sw, t[i].data, TENSOR_F32);
        rc = st_writer_commit(&sw);
    }
    lk_free(t);
    return rc;
}

int model_save(const struct model *m, const char *dir, int dtype, struct lk_err *err)
{
    int rc = lk_mkdir_p(dir, err);
    if (rc)
        return rc;
    char *path = lk_path_join(dir, "model.safetensors");
    char *cpath = lk_path_join(dir, "config.json");
    if (!path || !cpath)
        rc = lk_errf(err, LK_ERR_NOMEM, "out of memory");
    if (!rc)
        rc = model_weights_save_st(&m->w, &m->cfg, path, dtype, err);
    if (!rc) {
        struct cfg c = m->cfg;
        snprintf(c.torch_dtype, sizeof c.torch_dtype, "%s", dtype_torch_name(dtype));
        rc = cfg_save(&c, cpath, err);
    }
    lk_free(path);
    lk_free(cpath);
    return rc;
}

int model_apply_extras(struct model *m, struct lora *l, struct lk_err *err)
{
    if (!l || !l->n_extra)
        return LK_OK;
    struct model_tensor *t;
    int n, rc = model_weights_tensors(&m->w, &m->cfg, &t, &n, err);
    if (rc)
        return rc;
    for (int k = 0; k < l->n_extra && !rc; k++) {
        const struct lora_extra *x = &l->extra[k];
        struct model_tensor *hit = NULL;
        for (int i = 0; i < n; i++)
            if (!strcmp(t[i].name, x->name))
                hit = &t[i];
        if (!hit && !strcmp(x->name, "lm_head.weight"))
            rc = lk_errf(err, LK_ERR_UNSUPPORTED,
                         "adapter replaces lm_head.weight but the base ties it to embed_tokens: "
                         "merge the adapter (which unties them) before running it");
        else if (!hit)
            rc = lk_errf(err, LK_ERR_MISSING, "adapter tensor '%s' is not a tensor of the model", x->name);
        else if (hit->shape[0] != x->shape[0] || hit->shape[1] != x->shape[1] || hit->ndim != x->ndim)
            rc = lk_errf(err, LK_ERR_SHAPE, "adapter tensor '%s' does not fit the model's shape", x->name);
        else if (!strcmp(x->name, "model.embed_tokens.weight") && m->cfg.tie_word_embeddings)
            rc = lk_errf(err, LK_ERR_UNSUPPORTED,
                         "adapter replaces embed_tokens, which the base ties to lm_head: merge it instead");
        else
            memcpy(hit->data, x->data, sizeof(float) * hit->numel);
    }
    lk_free(t);
    if (!rc)
        l->extras_applied = 1;
    return rc;
}
