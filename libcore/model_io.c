/*
 * model_io.c - model folders in the Hugging Face layout: config.json plus model.safetensors
 * (or shards through model.safetensors.index.json), read into the float32 weight block and
 * written from it; an adapter's changes to whole weights applied at run time (model_apply_extras,
 * untying a tied embedding in memory when the adapter changes one side only).
 */
#include "model.h"

#include <cblas.h>
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

int model_untie(struct model *m, struct lk_err *err)
{
    if (!m->cfg.tie_word_embeddings)
        return LK_OK;
    struct cfg c = m->cfg; // shallow: only read
    c.tie_word_embeddings = 0;
    struct model_weights w;
    struct model_tensor *src = NULL, *dst = NULL;
    int ns, nd, rc = model_weights_alloc(&w, &c, err);
    if (rc)
        return rc;
    if (!(rc = model_weights_tensors(&m->w, &m->cfg, &src, &ns, err)))
        rc = model_weights_tensors(&w, &c, &dst, &nd, err);
    for (int i = 0; !rc && i < nd; i++) {
        const char *want = strcmp(dst[i].name, "lm_head.weight") ? dst[i].name : "model.embed_tokens.weight";
        int hit = -1;
        for (int j = 0; j < ns && hit < 0; j++)
            if (!strcmp(src[j].name, want))
                hit = j;
        LK_ASSERT(hit >= 0 && src[hit].numel == dst[i].numel);
        memcpy(dst[i].data, src[hit].data, sizeof(float) * dst[i].numel);
    }
    lk_free(src);
    lk_free(dst);
    if (rc) {
        model_weights_release(&w);
        return rc;
    }
    model_weights_release(&m->w);
    m->w = w;
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
            memcpy(hit->data, x->data, sizeof(float) * hit->numel);
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
    //    too when the base ties them (PEFT ties lm_head's token adapter to the embedding's)
    for (int k = 0; k < 2; k++)
        for (int i = 0; i < l->n_tok[k]; i++) {
            const float *row = l->tok_rows[k] + (size_t)i * C;
            size_t at = (size_t)l->tok_idx[k][i] * C;
            if (k == 1 || m->w.lm_head == m->w.embed || was_tied)
                memcpy(m->w.lm_head + at, row, sizeof(float) * C);
            if (k == 0)
                memcpy(m->w.embed + at, row, sizeof(float) * C);
        }
    // 4. the LoRA on lm_head, folded in: lm_head += s B A ([V, R] x [R, C])
    if (l->head_A)
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, V, C, l->head_R, l->head_scale, l->head_B, l->head_R,
                    l->head_A, C, 1.0f, m->w.lm_head, C);
    l->extras_applied = 1;
    return LK_OK;
}
