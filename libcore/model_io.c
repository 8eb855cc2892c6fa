/*
 * model_io.c - model folders in the Hugging Face layout: config.json plus model.safetensors
 * (or shards through model.safetensors.index.json), read into the weight block (float32, or the
 * matrices in the file's bf16 / f16) and written from it.
 */
#ifndef _DEFAULT_SOURCE
#define _DEFAULT_SOURCE 1 /* madvise, MADV_DONTNEED */
#endif
#include "model.h"

#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "st.h"
#include "tensor.h"

/* Drops a tensor's pages of the (read-only, private) file mapping once it has been copied, so
 * that loading never holds the file and the copy at once: the pages are clean and come back from
 * the file if read again. Only whole pages inside the tensor are dropped. */
static void drop_pages(const struct st_tensor *s)
{
    long pg = sysconf(_SC_PAGESIZE);
    if (pg <= 0)
        return;
    uintptr_t b = (uintptr_t)s->data, e = b + s->nbytes;
    b = (b + (uintptr_t)pg - 1) & ~(uintptr_t)(pg - 1);
    e &= ~(uintptr_t)(pg - 1);
    if (e > b)
        madvise((void *)b, e - b, MADV_DONTNEED);
}

/* The dtype to keep the matrices in: the file's when every matrix has that half dtype. */
static int keep_dtype(const struct st_model *sm, const struct cfg *c, enum model_keep keep)
{
    struct cfg_tensor *t;
    int n, dtype = -1;
    if (keep != MODEL_KEEP_FILE || cfg_tensors(c, &t, &n, NULL))
        return TENSOR_F32;
    for (int i = 0; i < n; i++) {
        if (t[i].ndim != 2)
            continue;
        const struct st_tensor *s = st_model_find(sm, t[i].name, NULL);
        if (!s && !strcmp(t[i].name, "lm_head.weight")) // tied: lm_head is the embedding
            continue;
        int d = s && (s->dtype == TENSOR_BF16 || s->dtype == TENSOR_F16) ? (int)s->dtype : TENSOR_F32;
        dtype = dtype < 0 || dtype == d ? d : TENSOR_F32;
    }
    lk_free(t);
    return dtype < 0 ? TENSOR_F32 : dtype;
}

int model_load_keep(struct model *m, const char *dir, enum model_keep keep, struct lk_err *err)
{
    memset(m, 0, sizeof *m);
    struct cfg c;
    int rc = cfg_load(&c, dir, err);
    if (rc)
        return rc;
    struct st_model sm;
    if ((rc = st_model_open(&sm, dir, err))) {
        cfg_release(&c);
        return rc;
    }
    rc = model_init_dtype(m, &c, keep_dtype(&sm, &c, keep), err);
    m->cfg.json = c.json; // the model keeps the original text (for saving)
    if (rc) {
        cfg_release(&c);
        memset(m, 0, sizeof *m);
        st_model_close(&sm);
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
        if (t[i].hdata) // kept as the file stores it (keep_dtype checked the dtype)
            memcpy(t[i].hdata, s->data, s->nbytes);
        else
            rc = st_tensor_to_f32(s, t[i].data, err);
        drop_pages(s);
    }
out:
    lk_free(t);
    st_model_close(&sm);
    if (rc)
        model_release(m);
    return rc;
}

int model_load(struct model *m, const char *dir, struct lk_err *err)
{
    return model_load_keep(m, dir, MODEL_KEEP_F32, err);
}

static const char *dtype_torch_name(int dtype)
{
    return dtype == TENSOR_BF16 ? "bfloat16" : dtype == TENSOR_F16 ? "float16" : "float32";
}

/* Writes one tensor as dtype: a bf16 / f16 matrix is copied as it is when dtype matches, else
 * widened (exactly) to float32 a chunk at a time on the way (the writer rounds once to dtype). */
static void save_tensor(struct st_writer *sw, const struct model_tensor *t, int dtype)
{
    if (!t->hdata) {
        st_writer_write(sw, t->data, TENSOR_F32);
        return;
    }
    if (t->dtype == dtype) {
        st_writer_write(sw, t->hdata, (enum tensor_dtype)dtype);
        return;
    }
    float buf[1024]; // 4 KB on the stack
    for (size_t j = 0; j < t->numel; j += 1024) {
        size_t k = t->numel - j < 1024 ? t->numel - j : 1024;
        tensor_to_f32(buf, t->hdata + j, (enum tensor_dtype)t->dtype, k);
        st_writer_write_chunk(sw, buf, TENSOR_F32, k);
    }
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
            save_tensor(&sw, &t[i], dtype);
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

/* The op_mat of the weights that a matrix of model_weights_tensors describes. */
static struct op_mat *weights_mat(struct model_weights *w, const struct cfg *c, const struct model_tensor *t)
{
    if (t->layer < 0)
        return !strcmp(t->name, "lm_head.weight") ? &w->lm_head : &w->embed;
    struct model_layer *ly = &w->layer[t->layer];
    struct op_mat *p[CFG_N_MODULES] = { &ly->wq, &ly->wk, &ly->wv, &ly->wo, &ly->wgate, &ly->wup, &ly->wdown };
    LK_ASSERT(t->module >= 0 && t->module < CFG_N_MODULES && t->layer < c->num_hidden_layers);
    return p[t->module];
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
        else if (hit->data)
            memcpy(hit->data, x->data, sizeof(float) * hit->numel);
        else // a matrix kept in bf16 / f16: the adapter's float32 copy replaces it
            rc = model_weights_own_f32(&m->w, weights_mat(&m->w, &m->cfg, hit), x->data, hit->numel, err);
    }
    lk_free(t);
    if (!rc)
        l->extras_applied = 1;
    return rc;
}
