/*
 * model_io.c - model folders in the Hugging Face layout: config.json plus model.safetensors
 * (or shards through model.safetensors.index.json), read into the weight block (float32, or the
 * matrices in the file's bf16 / f16) and written from it; an adapter's changes to whole weights
 * applied at run time (model_apply_extras, untying a tied embedding in memory when the adapter
 * changes one side only).
 */
#ifndef _DEFAULT_SOURCE
#define _DEFAULT_SOURCE 1 /* madvise, MADV_DONTNEED */
#endif
#include "model.h"

#include <cblas.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "gguf.h"
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
    rc = model_init_dtype(m, &c, keep_dtype(&sm, &c, keep), err);
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

/* The op_mat behind a matrix of model_weights_tensors. */
static struct op_mat *weights_mat(struct model_weights *w, const struct cfg *c, const struct model_tensor *t)
{
    if (t->layer < 0)
        return !strcmp(t->name, "lm_head.weight") ? &w->lm_head : &w->embed;
    struct model_layer *ly = &w->layer[t->layer];
    struct op_mat *p[CFG_N_MODULES] = { &ly->wq, &ly->wk, &ly->wv, &ly->wo, &ly->wgate, &ly->wup, &ly->wdown };
    LK_ASSERT(t->module >= 0 && t->module < CFG_N_MODULES && t->layer < c->num_hidden_layers);
    return p[t->module];
}

/* Makes matrix mat (n values) float32 so that an adapter's float32 values can be written into
 * it: src given, mat takes src's values (in place when it is float32 already, else in a float32
 * copy the weights own); src NULL, a matrix kept in bf16 / f16 is widened into such a copy. While
 * the model is tied, lm_head follows the embedding. */
static int mat_set_f32(struct model *m, struct op_mat *mat, const float *src, size_t n, struct lk_err *err)
{
    float *tmp = NULL;
    int rc = LK_OK;
    if (mat->dtype == TENSOR_F32) {
        if (src)
            memcpy(mat->f, src, sizeof(float) * n);
        return LK_OK; // a tied lm_head shares the embedding's float32 block
    }
    if (!src) {
        if (!(tmp = lk_malloc(sizeof(float) * n)))
            return lk_errf(err, LK_ERR_NOMEM, "out of memory: a float32 copy of %zu weights", n);
        tensor_to_f32(tmp, mat->h, (enum tensor_dtype)mat->dtype, n);
        src = tmp;
    }
    rc = model_weights_own_f32(&m->w, mat, src, n, err);
    lk_free(tmp);
    if (!rc && m->cfg.tie_word_embeddings && mat == &m->w.embed)
        m->w.lm_head = m->w.embed;
    return rc;
}

int model_untie(struct model *m, struct lk_err *err)
{
    if (!m->cfg.tie_word_embeddings)
        return LK_OK;
    // lm_head gets a float32 copy of the embedding of its own (widened when kept in bf16 / f16);
    // every other weight stays where and as it is
    size_t n = (size_t)m->cfg.vocab_size * m->cfg.hidden_size;
    const float *src = m->w.embed.f;
    float *tmp = NULL;
    if (m->w.embed.dtype != TENSOR_F32) {
        if (!(tmp = lk_malloc(sizeof(float) * n)))
            return lk_errf(err, LK_ERR_NOMEM, "out of memory: a float32 copy of the embedding");
        tensor_to_f32(tmp, m->w.embed.h, (enum tensor_dtype)m->w.embed.dtype, n);
        src = tmp;
    }
    int rc = model_weights_own_f32(&m->w, &m->w.lm_head, src, n, err);
    lk_free(tmp);
    if (rc)
        return rc;
    m->cfg.tie_word_embeddings = 0;
    return LK_OK;
}

/* 1 when the adapter changes one of a tied embed_tokens / lm_head pair and not the other, as
 * PEFT runs it: a modules_to_save copy of one (a base_layer copy is the shared weight and keeps
 * them tied), a LoRA on lm_head, trainable tokens of lm_head. */
static int adapter_unties(const struct lora *l)
{
    for (int k = 0; k < l->n_extra; k++)
        if (!l->extra[k].base_layer &&
            (!strcmp(l->extra[k].name, "model.embed_tokens.weight") || !strcmp(l->extra[k].name, "lm_head.weight")))
            return 1;
    return l->head_A != NULL || l->n_tok[1] > 0;
}

/* Copies the adapter's full tensors into the weights t[n] (by name; a base_layer copy on a base
 * that was tied goes to lm_head too). */
static int apply_copies(struct model *m, const struct lora *l, struct model_tensor *t, int n, int was_tied,
                        struct lk_err *err)
{
    for (int k = 0; k < l->n_extra; k++) {
        const struct lora_extra *x = &l->extra[k];
        for (int pass = 0; pass < 2; pass++) {
            const char *name = pass ? "lm_head.weight" : x->name;
            if (pass && !(x->base_layer && was_tied && !m->cfg.tie_word_embeddings))
                break;
            struct model_tensor *hit = NULL;
            for (int i = 0; i < n; i++)
                if (!strcmp(t[i].name, name))
                    hit = &t[i];
            if (!hit)
                return lk_errf(err, LK_ERR_MISSING, "adapter tensor '%s' is not a tensor of the model", name);
            if (hit->shape[0] != x->shape[0] || hit->shape[1] != x->shape[1] || hit->ndim != x->ndim)
                return lk_errf(err, LK_ERR_SHAPE, "adapter tensor '%s' does not fit the model's shape", name);
            int rc = hit->ndim == 1 ? (memcpy(hit->data, x->data, sizeof(float) * hit->numel), LK_OK)
                                    : mat_set_f32(m, weights_mat(&m->w, &m->cfg, hit), x->data, hit->numel, err);
            if (rc)
                return rc;
        }
    }
    return LK_OK;
}

int model_apply_extras(struct model *m, struct lora *l, struct lk_err *err)
{
    if (!lora_changes_weights(l))
        return LK_OK;
    const struct cfg *c = &m->cfg;
    int was_tied = c->tie_word_embeddings, C = c->hidden_size, V = c->vocab_size, rc = LK_OK;

    if (l->n_tok[0] + l->n_tok[1] && l->tok_C != C)
        return lk_errf(err, LK_ERR_SHAPE, "adapter's trainable tokens do not fit the model's hidden size");
    if (l->head_A && (l->head_V != V || l->head_Cin != C))
        return lk_errf(err, LK_ERR_SHAPE, "adapter's LoRA on lm_head does not fit the model's shape");
    // 1. a tied pair the adapter changes on one side only is untied in memory, as merge unties it
    if (was_tied && adapter_unties(l) && (rc = model_untie(m, err)))
        return rc;
    // 2. modules_to_save and base_layer copies
    struct model_tensor *t;
    int n;
    if ((rc = model_weights_tensors(&m->w, &m->cfg, &t, &n, err)))
        return rc;
    rc = apply_copies(m, l, t, n, was_tied, err);
    lk_free(t);
    if (rc)
        return rc;
    // 3. trainable tokens: the rows themselves (PEFT's index_copy); embed_tokens' rows are lm_head's
    //    too when the base ties them (PEFT ties lm_head's token adapter to the embedding's). The
    //    rows are float32: a matrix kept in bf16 / f16 is widened into a copy first.
    size_t nvc = (size_t)V * C;
    if (l->n_tok[0] + l->n_tok[1] && ((rc = mat_set_f32(m, &m->w.embed, NULL, nvc, err)) ||
                                      (rc = mat_set_f32(m, &m->w.lm_head, NULL, nvc, err))))
        return rc;
    for (int k = 0; k < 2; k++)
        for (int i = 0; i < l->n_tok[k]; i++) {
            const float *row = l->tok_rows[k] + (size_t)i * C;
            size_t at = (size_t)l->tok_idx[k][i] * C;
            if (k == 1 || m->w.lm_head.f == m->w.embed.f || was_tied)
                memcpy(m->w.lm_head.f + at, row, sizeof(float) * C);
            if (k == 0)
                memcpy(m->w.embed.f + at, row, sizeof(float) * C);
        }
    // 4. the LoRA on lm_head, folded in: lm_head += s B A ([V, R] x [R, C]) (untied above, so
    //    lm_head is the float32 copy model_untie made, or one of its own)
    if (l->head_A && (rc = mat_set_f32(m, &m->w.lm_head, NULL, nvc, err)))
        return rc;
    if (l->head_A)
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, V, C, l->head_R, l->head_scale, l->head_B, l->head_R,
                    l->head_A, C, 1.0f, m->w.lm_head.f, C);
    l->extras_applied = 1;
    return LK_OK;
}
