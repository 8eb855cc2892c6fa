/*
 * model.c - the Llama / Qwen2 / Qwen3 decoder: weights in one block, activations in one block,
 * forward and exact backward (LoRA factors, or every weight for a full fine-tune).
 * Steps are numbered alike in forward and backward. See model.h for the definition.
 */
#ifndef _DEFAULT_SOURCE
#define _DEFAULT_SOURCE 1 /* madvise, MADV_HUGEPAGE */
#endif
#include "model.h"

#include <cblas.h>
#include <math.h>
#include <omp.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "ops.h"
#include "tensor.h"

// ---- weights ----

/* Walks the parameter table in block order (the size table): vectors come from the float32
 * block, matrices from the half block when the matrices are kept in bf16 / f16. */
struct wvisit {
    float *base;      /* NULL while counting */
    uint16_t *hbase;  /* NULL while counting (and for float32 matrices) */
    int dtype;        /* of the matrices */
    size_t off, hoff;
};

static float *wtake(struct wvisit *v, size_t n)
{
    float *p = v->base ? v->base + v->off : NULL;
    v->off += n;
    return p;
}

static struct op_mat mtake(struct wvisit *v, size_t n)
{
    struct op_mat m = { .dtype = v->dtype };
    if (v->dtype == TENSOR_F32) {
        m.f = wtake(v, n);
    } else {
        m.h = v->hbase ? v->hbase + v->hoff : NULL;
        v->hoff += n;
    }
    return m;
}

static void weights_layout(struct model_weights *w, const struct cfg *c, struct wvisit *v)
{
    size_t C = (size_t)c->hidden_size, F = (size_t)c->intermediate_size, V = (size_t)c->vocab_size;
    size_t Q = (size_t)c->num_attention_heads * c->head_dim;
    size_t KV = (size_t)c->num_key_value_heads * c->head_dim;
    w->embed = mtake(v, V * C);
    for (int l = 0; l < c->num_hidden_layers; l++) {
        struct model_layer *ly = w->layer ? &w->layer[l] : NULL;
        struct model_layer tmp;
        if (!ly)
            ly = &tmp;
        ly->ln1 = wtake(v, C);
        ly->wq = mtake(v, Q * C);
        ly->wk = mtake(v, KV * C);
        ly->wv = mtake(v, KV * C);
        ly->bq = cfg_module_bias(c, CFG_Q) ? wtake(v, Q) : NULL;
        ly->bk = cfg_module_bias(c, CFG_K) ? wtake(v, KV) : NULL;
        ly->bv = cfg_module_bias(c, CFG_V) ? wtake(v, KV) : NULL;
        ly->wo = mtake(v, C * Q);
        ly->bo = cfg_module_bias(c, CFG_O) ? wtake(v, C) : NULL;
        ly->q_norm = c->qk_norm ? wtake(v, (size_t)c->head_dim) : NULL;
        ly->k_norm = c->qk_norm ? wtake(v, (size_t)c->head_dim) : NULL;
        ly->ln2 = wtake(v, C);
        ly->wgate = mtake(v, F * C);
        ly->wup = mtake(v, F * C);
        ly->wdown = mtake(v, C * F);
    }
    w->norm = wtake(v, C);
    w->lm_head = c->tie_word_embeddings ? w->embed : mtake(v, V * C);
}

/* Asks for transparent huge pages on a large block before it is first written (best effort):
 * one TLB entry per 2 MB instead of per 4 KB. Decoding streams every weight once per token, and
 * measured here the GEMV reads 2 MB-paged weights at 26 GB/s against 22.5 on 4 KB pages (this
 * kernel gives huge pages on request only: transparent_hugepage=madvise). */
static void advise_huge(void *p, size_t bytes)
{
#ifdef MADV_HUGEPAGE
    long pg = sysconf(_SC_PAGESIZE);
    if (pg <= 0 || bytes < ((size_t)4 << 20))
        return;
    uintptr_t b = ((uintptr_t)p + (uintptr_t)pg - 1) & ~(uintptr_t)(pg - 1);
    uintptr_t e = ((uintptr_t)p + bytes) & ~(uintptr_t)(pg - 1);
    if (e > b)
        madvise((void *)b, e - b, MADV_HUGEPAGE);
#else
    (void)p;
    (void)bytes;
#endif
}

int model_weights_alloc_dtype(struct model_weights *w, const struct cfg *c, int dtype, struct lk_err *err)
{
    memset(w, 0, sizeof *w);
    LK_ASSERT(dtype == TENSOR_F32 || dtype == TENSOR_BF16 || dtype == TENSOR_F16);
    struct wvisit v = { .dtype = dtype };
    weights_layout(w, c, &v);
    w->layer = lk_calloc((size_t)c->num_hidden_layers, sizeof *w->layer);
    // the blocks start on a cache line, and so does every matrix in them (their sizes are
    // multiples of 64 bytes on the usual shapes): the AMX tiles load 64-byte rows, and a row across
    // two lines costs two loads. lk_calloc_aligned rather than lk_malloc and memset: the pages stay
    // untouched until the loader writes them (a memset first took 180 MB more peak RSS on the 0.5B
    // shape, the file's pages and the block's resident at once)
    size_t bytes, hbytes = 0;
    if (!w->layer || lk_mul_size(v.off, sizeof(float), &bytes) || !(w->mem = lk_calloc_aligned(bytes, &w->mem_raw)) ||
        (v.hoff && (lk_mul_size(v.hoff, sizeof(uint16_t), &hbytes) ||
                    !(w->hmem = lk_calloc_aligned(hbytes, &w->hmem_raw))))) {
        model_weights_release(w);
        return lk_errf(err, LK_ERR_NOMEM, "out of memory allocating %zu model parameters", v.off + v.hoff);
    }
    advise_huge(w->mem, bytes);
    advise_huge(w->hmem, hbytes);
    w->n = v.off;
    w->hn = v.hoff;
    w->dtype = dtype;
    v.base = w->mem;
    v.hbase = w->hmem;
    v.off = v.hoff = 0;
    weights_layout(w, c, &v);
    LK_ASSERT(v.off == w->n && v.hoff == w->hn);
    return LK_OK;
}

int model_weights_alloc(struct model_weights *w, const struct cfg *c, struct lk_err *err)
{
    return model_weights_alloc_dtype(w, c, TENSOR_F32, err);
}

void model_weights_release(struct model_weights *w)
{
    if (!w)
        return;
    lk_free(w->mem_raw);
    lk_free(w->hmem_raw);
    lk_free(w->layer);
    for (int i = 0; i < w->n_own; i++)
        lk_free(w->own[i]);
    lk_free(w->own);
    memset(w, 0, sizeof *w);
}

int model_weights_own_f32(struct model_weights *w, struct op_mat *mat, const float *src, size_t n,
                          struct lk_err *err)
{
    float **own = lk_realloc(w->own, sizeof *own * (size_t)(w->n_own + 1));
    if (!own)
        return lk_errf(err, LK_ERR_NOMEM, "out of memory");
    w->own = own;
    float *p = lk_malloc(sizeof(float) * (n ? n : 1));
    if (!p)
        return lk_errf(err, LK_ERR_NOMEM, "out of memory: a float32 copy of %zu weights", n);
    memcpy(p, src, sizeof(float) * n);
    w->own[w->n_own++] = p;
    mat->dtype = TENSOR_F32;
    mat->f = p;
    return LK_OK;
}

size_t model_param_count(const struct cfg *c)
{
    struct model_weights w = { 0 };
    struct wvisit v = { .dtype = TENSOR_F32 };
    weights_layout(&w, c, &v);
    return v.off;
}

static void tensor_add(struct model_tensor *t, int *k, const char *name, float *data, int ndim,
                       int64_t d0, int64_t d1, int layer, int module, int is_bias)
{
    struct model_tensor *x = &t[(*k)++];
    memset(x, 0, sizeof *x);
    snprintf(x->name, sizeof x->name, "%s", name);
    x->data = data;
    x->dtype = TENSOR_F32;
    x->ndim = ndim;
    x->shape[0] = d0;
    x->shape[1] = ndim > 1 ? d1 : 0;
    x->numel = (size_t)d0 * (size_t)(ndim > 1 ? d1 : 1);
    x->layer = layer;
    x->module = module;
    x->is_bias = is_bias;
}

/* A matrix: float32 data, or its bf16 / f16 bits. */
static void tensor_add_mat(struct model_tensor *t, int *k, const char *name, const struct op_mat *m,
                           int64_t d0, int64_t d1, int layer, int module)
{
    tensor_add(t, k, name, m->dtype == TENSOR_F32 ? m->f : NULL, 2, d0, d1, layer, module, 0);
    t[*k - 1].dtype = m->dtype;
    t[*k - 1].hdata = m->dtype == TENSOR_F32 ? NULL : m->h;
}

int model_weights_tensors(const struct model_weights *w, const struct cfg *c,
                          struct model_tensor **out, int *n, struct lk_err *err)
{
    int L = c->num_hidden_layers;
    int64_t C = c->hidden_size, F = c->intermediate_size, V = c->vocab_size;
    int64_t Q = (int64_t)c->num_attention_heads * c->head_dim;
    int64_t KV = (int64_t)c->num_key_value_heads * c->head_dim;
    struct model_tensor *t = lk_calloc((size_t)L * 15 + 3, sizeof *t);
    if (!t)
        return lk_errf(err, LK_ERR_NOMEM, "out of memory");
    int k = 0;
    char nm[96];
    tensor_add_mat(t, &k, "model.embed_tokens.weight", &w->embed, V, C, -1, -1);
    for (int l = 0; l < L; l++) {
        const struct model_layer *ly = &w->layer[l];
#define LAYER_T(suffix, p, nd, d0, d1, mod, isb)                                                   \
    snprintf(nm, sizeof nm, "model.layers.%d.%s", l, suffix);                                      \
    tensor_add(t, &k, nm, p, nd, d0, d1, l, mod, isb)
#define LAYER_M(suffix, p, d0, d1, mod)                                                            \
    snprintf(nm, sizeof nm, "model.layers.%d.%s", l, suffix);                                      \
    tensor_add_mat(t, &k, nm, &p, d0, d1, l, mod)
        LAYER_T("input_layernorm.weight", ly->ln1, 1, C, 0, -1, 0);
        LAYER_M("self_attn.q_proj.weight", ly->wq, Q, C, CFG_Q);
        LAYER_M("self_attn.k_proj.weight", ly->wk, KV, C, CFG_K);
        LAYER_M("self_attn.v_proj.weight", ly->wv, KV, C, CFG_V);
        if (ly->bq) {
            LAYER_T("self_attn.q_proj.bias", ly->bq, 1, Q, 0, CFG_Q, 1);
            LAYER_T("self_attn.k_proj.bias", ly->bk, 1, KV, 0, CFG_K, 1);
            LAYER_T("self_attn.v_proj.bias", ly->bv, 1, KV, 0, CFG_V, 1);
        }
        LAYER_M("self_attn.o_proj.weight", ly->wo, C, Q, CFG_O);
        if (ly->bo) {
            LAYER_T("self_attn.o_proj.bias", ly->bo, 1, C, 0, CFG_O, 1);
        }
        if (ly->q_norm) {
            LAYER_T("self_attn.q_norm.weight", ly->q_norm, 1, c->head_dim, 0, -1, 0);
            LAYER_T("self_attn.k_norm.weight", ly->k_norm, 1, c->head_dim, 0, -1, 0);
        }
        LAYER_T("post_attention_layernorm.weight", ly->ln2, 1, C, 0, -1, 0);
        LAYER_M("mlp.gate_proj.weight", ly->wgate, F, C, CFG_GATE);
        LAYER_M("mlp.up_proj.weight", ly->wup, F, C, CFG_UP);
        LAYER_M("mlp.down_proj.weight", ly->wdown, C, F, CFG_DOWN);
#undef LAYER_T
#undef LAYER_M
    }
    tensor_add(t, &k, "model.norm.weight", w->norm, 1, C, 0, -1, -1, 0);
    if (!c->tie_word_embeddings)
        tensor_add_mat(t, &k, "lm_head.weight", &w->lm_head, V, C, -1, -1);
    *out = t;
    *n = k;
    return LK_OK;
}

int model_weights_convert(struct model_weights *w, const struct cfg *c, int dtype, struct lk_err *err)
{
    struct model_weights nw;
    struct model_tensor *a = NULL, *b = NULL;
    int na, nb, rc = model_weights_alloc_dtype(&nw, c, dtype, err);
    if (!rc)
        rc = model_weights_tensors(w, c, &a, &na, err);
    if (!rc)
        rc = model_weights_tensors(&nw, c, &b, &nb, err);
    enum { CHUNK = 1 << 14 };
    float *buf = rc ? NULL : lk_malloc(sizeof(float) * CHUNK);
    if (!rc && !buf)
        rc = lk_errf(err, LK_ERR_NOMEM, "out of memory");
    for (int i = 0; !rc && i < na; i++) {
        LK_ASSERT(na == nb && a[i].numel == b[i].numel);
        // through float32 in chunks: widening is exact, narrowing rounds once
        for (size_t j = 0; j < a[i].numel; j += CHUNK) {
            size_t k = a[i].numel - j < CHUNK ? a[i].numel - j : CHUNK;
            if (a[i].data)
                memcpy(buf, a[i].data + j, sizeof(float) * k);
            else
                tensor_to_f32(buf, a[i].hdata + j, (enum tensor_dtype)a[i].dtype, k);
            if (b[i].data)
                memcpy(b[i].data + j, buf, sizeof(float) * k);
            else
                tensor_from_f32(b[i].hdata + j, (enum tensor_dtype)b[i].dtype, buf, k);
        }
    }
    lk_free(buf);
    lk_free(a);
    lk_free(b);
    if (rc) {
        model_weights_release(&nw);
        return rc;
    }
    model_weights_release(w);
    *w = nw;
    return LK_OK;
}

void model_weights_randomize(struct model_weights *w, const struct cfg *c, float std,
                             struct lk_rng *rng)
{
    struct model_tensor *t;
    int n;
    LK_ASSERT(w->dtype == TENSOR_F32);
    if (model_weights_tensors(w, c, &t, &n, NULL))
        return;
    for (int i = 0; i < n; i++) {
        int is_norm = strstr(t[i].name, "norm") != NULL;
        for (size_t j = 0; j < t[i].numel; j++)
            t[i].data[j] = is_norm ? 1.0f : std * lk_rng_normal(rng);
    }
    lk_free(t);
}

// ---- model ----

/* One lane: the activations of rows b0 .. b0+B-1 of the planned batch (model.h: threads). */
struct model_acts {
    float *mem;            /* owned: everything below points into it, but logits and the ints */
    size_t n;
    int train;
    int L;
    int B, T, b0;          /* this lane's rows of the batch, tokens per row */
    /* per layer (train) or one shared set (inference) */
    float **x;             /* [L+1] residual stream entering layer l: [BT, C] */
    float **ln1, **rstd1;  /* [BT, C], [BT] */
    float **q, **k, **v;   /* after rope: [BT, NH*HS], [BT, NKV*HS] */
    float **qp, **kp;      /* Qwen3: q, k as projected, before the per-head norm (else NULL) */
    float **rstdq, **rstdk; /* Qwen3: [BT*NH], [BT*NKV] per-head norm scales */
    float **att;           /* [B, NH, T, T] */
    float **atty;          /* attention output before o_proj [BT, NH*HS] */
    float **x2;            /* residual after attention [BT, C] */
    float **ln2, **rstd2;
    float **gate, **up, **act; /* [BT, F] */
    float *lnf, *rstdf;    /* [BT, C], [BT] */
    float *logits;         /* [BT, V] rows of the batch's logits; dlogits after a training forward */
    /* backward scratch (train) */
    float *dres, *dln, *dq, *dk, *dv, *datty, *dgate, *dup, *dact, *tmp;
    float *dqp, *dkp;      /* Qwen3: d(q, k before the per-head norm) */
    float *dpatt;          /* [npatt, T, T] attention backward scratch (one per thread) */
    int npatt;
    float *drop;           /* [BT, max(C, F, NH*HS)]: dropped LoRA input */
    int *pos, *tokens, *seg; /* this lane's rows of the batch's copies [BT] */
    int has_seg;
    /* lane 0 owns the whole batch's logits [B*T, V] and ints (pos, tokens, seg [3, B*T]) */
    float *logits_all;
    int *ints;
    /* widening tiles for bf16 / f16 weights (ops.h: op_mat_forward), owned, sized on first use */
    float *wtile;
    size_t wtile_n;
    /* lanes after the first: their own gradients, summed into the caller's after backward */
    float *lgrad;          /* owned [lora->n] */
    size_t lgrad_n;
    struct model_weights gw; /* owned: full fine-tune */
    double loss;           /* this lane's loss sum (forward with targets) */
    /* LoRA: A drop(x) per module [BT, R], owned, sized on first use */
    float *xa;
    size_t xa_n;
    float *dxa;            /* owned [BT, max R] */
    size_t dxa_n;
    float *lscr;           /* owned: op_lora_* scratch (transposed factors) */
    size_t lscr_n;
    /* DoRA (owned, sized on first use): per module g = m / ||W + sBA|| and the norms, the
     * merged weight of one module, and two [BT, wide] buffers for backward */
    float *dora_g, *dora_norm, *dora_w, *dora_u, *dora_du;
    size_t dora_gn, dora_wn, dora_un;
    size_t *dora_off;      /* owned [n_mod]: offset of each module's g / norm */
    size_t *xa_off;        /* owned [n_mod] */
    int xa_nmod;
};

int model_init_dtype(struct model *m, const struct cfg *c, int dtype, struct lk_err *err)
{
    memset(m, 0, sizeof *m);
    m->cfg = *c;
    m->cfg.json = NULL;
    if (c->head_dim % 2)
        return lk_errf(err, LK_ERR_UNSUPPORTED, "head_dim %d is odd: rotary embedding needs an even size",
                       c->head_dim);
    m->inv_freq = lk_malloc(sizeof(float) * (size_t)(c->head_dim / 2 + 1));
    if (!m->inv_freq)
        return lk_errf(err, LK_ERR_NOMEM, "out of memory");
    op_rope_inv_freq(m->inv_freq, c->head_dim, c->rope_theta);
    const struct cfg_rope_scaling *rs = &c->rope_scaling;
    if (rs->type == CFG_ROPE_LINEAR)
        op_rope_inv_freq_linear(m->inv_freq, c->head_dim / 2, rs->factor);
    else if (rs->type == CFG_ROPE_LLAMA3)
        op_rope_inv_freq_llama3(m->inv_freq, c->head_dim / 2, rs->factor, rs->low_freq_factor,
                                rs->high_freq_factor, rs->original_max_position_embeddings);
    // CFG_ROPE_DYNAMIC is the default rope below cfg_rope_positions (model_forward refuses beyond)
    int rc = model_weights_alloc_dtype(&m->w, c, dtype, err);
    if (rc) {
        lk_free(m->inv_freq);
        m->inv_freq = NULL;
    }
    return rc;
}

int model_init(struct model *m, const struct cfg *c, struct lk_err *err)
{
    return model_init_dtype(m, c, TENSOR_F32, err);
}

static void acts_free(struct model_acts *a)
{
    if (!a)
        return;
    lk_free(a->mem);
    lk_free(a->x);
    lk_free(a->xa);
    lk_free(a->dxa);
    lk_free(a->lscr);
    lk_free(a->dora_g);
    lk_free(a->dora_norm);
    lk_free(a->dora_w);
    lk_free(a->dora_u);
    lk_free(a->dora_du);
    lk_free(a->dora_off);
    lk_free(a->xa_off);
    lk_free(a->wtile);
    lk_free(a->lgrad);
    model_weights_release(&a->gw);
    lk_free(a->logits_all);
    lk_free(a->ints);
    memset(a, 0, sizeof *a);
}

static void lanes_free(struct model *m)
{
    for (int k = 0; m->acts && k < m->n_lanes; k++)
        acts_free(&m->acts[k]);
    lk_free(m->acts);
    m->acts = NULL;
    m->n_lanes = 0;
}

void model_release(struct model *m)
{
    if (!m)
        return;
    lanes_free(m);
    model_weights_release(&m->w);
    lk_free(m->inv_freq);
    cfg_release(&m->cfg);
    memset(m, 0, sizeof *m);
}

/* Carves a lane's block (B rows of T tokens); with base NULL only counts. */
static size_t acts_layout(struct model_acts *a, const struct cfg *c, int B, int T, int train,
                          float *base)
{
    size_t BT = (size_t)B * T, C = (size_t)c->hidden_size, F = (size_t)c->intermediate_size;
    size_t Q = (size_t)c->num_attention_heads * c->head_dim;
    size_t KV = (size_t)c->num_key_value_heads * c->head_dim;
    size_t NH = (size_t)c->num_attention_heads;
    size_t NKV = (size_t)c->num_key_value_heads;
    int L = c->num_hidden_layers, qkn = c->qk_norm;
    size_t off = 0;
#define TAKE(n) (base ? base + (off += (n), off - (n)) : (off += (n), (float *)NULL))
    // the residual stream: every layer's input kept for training; in inference one buffer
    for (int l = 0; l <= L; l++)
        a->x[l] = (train || l == 0) ? TAKE(BT * C) : a->x[0];
    int nsets = train ? L : 1;
    for (int l = 0; l < L; l++) {
        if (l < nsets) {
            a->ln1[l] = TAKE(BT * C);
            a->rstd1[l] = TAKE(BT);
            a->q[l] = TAKE(BT * Q);
            a->k[l] = TAKE(BT * KV);
            a->v[l] = TAKE(BT * KV);
            a->att[l] = TAKE((size_t)B * NH * T * T);
            a->atty[l] = TAKE(BT * Q);
            a->x2[l] = TAKE(BT * C);
            a->ln2[l] = TAKE(BT * C);
            a->rstd2[l] = TAKE(BT);
            a->gate[l] = TAKE(BT * F);
            a->up[l] = TAKE(BT * F);
            a->act[l] = TAKE(BT * F);
            a->qp[l] = qkn ? TAKE(BT * Q) : NULL;
            a->kp[l] = qkn ? TAKE(BT * KV) : NULL;
            a->rstdq[l] = qkn ? TAKE(BT * NH) : NULL;
            a->rstdk[l] = qkn ? TAKE(BT * NKV) : NULL;
        } else {
            a->ln1[l] = a->ln1[0];
            a->rstd1[l] = a->rstd1[0];
            a->q[l] = a->q[0];
            a->k[l] = a->k[0];
            a->v[l] = a->v[0];
            a->att[l] = a->att[0];
            a->atty[l] = a->atty[0];
            a->x2[l] = a->x2[0];
            a->ln2[l] = a->ln2[0];
            a->rstd2[l] = a->rstd2[0];
            a->gate[l] = a->gate[0];
            a->up[l] = a->up[0];
            a->act[l] = a->act[0];
            a->qp[l] = a->qp[0];
            a->kp[l] = a->kp[0];
            a->rstdq[l] = a->rstdq[0];
            a->rstdk[l] = a->rstdk[0];
        }
    }
    a->lnf = TAKE(BT * C);
    a->rstdf = TAKE(BT);
    size_t wide = C > F ? C : F;
    if (Q > wide)
        wide = Q;
    a->drop = TAKE(BT * wide);
    if (train) {
        a->dres = TAKE(BT * C);
        a->dln = TAKE(BT * C);
        a->dq = TAKE(BT * Q);
        a->dk = TAKE(BT * KV);
        a->dv = TAKE(BT * KV);
        a->datty = TAKE(BT * Q);
        a->dgate = TAKE(BT * F);
        a->dup = TAKE(BT * F);
        a->dact = TAKE(BT * F);
        a->tmp = TAKE(BT * wide);
        a->dpatt = TAKE((size_t)a->npatt * T * T);
        a->dqp = qkn ? TAKE(BT * Q) : NULL;
        a->dkp = qkn ? TAKE(BT * KV) : NULL;
    }
#undef TAKE
    return off;
}

/* Sizes lane a for rows b0 .. b0+B-1 (of T tokens) and carves its block. */
static int lane_plan(struct model_acts *a, const struct cfg *c, int b0, int B, int T, int train, int npatt,
                     struct lk_err *err)
{
    int L = c->num_hidden_layers;
    float **ptrs = lk_calloc((size_t)(L + 1) + 17 * (size_t)L, sizeof(float *));
    if (!ptrs)
        return lk_errf(err, LK_ERR_NOMEM, "out of memory");
    a->x = ptrs;
    float ***sets[] = { &a->ln1, &a->rstd1, &a->q, &a->k, &a->v, &a->att, &a->atty, &a->x2,
                        &a->ln2, &a->rstd2, &a->gate, &a->up, &a->act, &a->qp, &a->kp, &a->rstdq,
                        &a->rstdk };
    LK_ASSERT(sizeof sets / sizeof sets[0] == 17);
    for (size_t i = 0; i < sizeof sets / sizeof sets[0]; i++)
        *sets[i] = ptrs + (L + 1) + i * (size_t)L;
    a->B = B;
    a->T = T;
    a->b0 = b0;
    a->npatt = npatt;
    a->train = train;
    a->L = L;
    size_t n = acts_layout(a, c, B, T, train, NULL), bytes;
    if (lk_mul_size(n, sizeof(float), &bytes) || !(a->mem = lk_malloc(bytes)))
        return lk_errf(err, LK_ERR_NOMEM, "out of memory: activations for batch %d x %d tokens need %zu MB",
                       B, T, n * sizeof(float) >> 20);
    memset(a->mem, 0, bytes);
    a->n = n;
    acts_layout(a, c, B, T, train, a->mem);
    return LK_OK;
}

int model_plan(struct model *m, int B, int T, int train, struct lk_err *err)
{
    if (m->acts && m->B == B && m->T == T && m->train == train)
        return LK_OK;
    if (B <= 0 || T <= 0)
        return lk_errf(err, LK_ERR_USAGE, "batch %d and sequence length %d must be positive", B, T);
    lanes_free(m);
    const struct cfg *c = &m->cfg;
    int nl = omp_get_max_threads();
    if (nl > B)
        nl = B;
    if (nl < 1)
        nl = 1;
    size_t BT = (size_t)B * T, nlog;
    // one lane: the attention backward runs on every thread, each with its own [T, T] scratch
    int npatt = nl == 1 ? omp_get_max_threads() : 1;
    struct model_acts *lanes = lk_calloc((size_t)nl, sizeof *lanes);
    if (!lanes)
        return lk_errf(err, LK_ERR_NOMEM, "out of memory");
    m->acts = lanes;
    m->n_lanes = nl;
    int rc = LK_OK;
    if (lk_mul_size(BT, (size_t)c->vocab_size, &nlog) || !(lanes[0].logits_all = lk_falloc(nlog, 1)) ||
        !(lanes[0].ints = lk_calloc(3 * BT, sizeof(int))))
        rc = lk_errf(err, LK_ERR_NOMEM, "out of memory: logits of batch %d x %d tokens need %zu MB", B, T,
                     nlog * sizeof(float) >> 20);
    for (int k = 0, b0 = 0; k < nl && !rc; k++) {
        int rows = B / nl + (k < B % nl);
        struct model_acts *a = &lanes[k];
        rc = lane_plan(a, c, b0, rows, T, train, npatt, err);
        size_t r0 = (size_t)b0 * T;
        a->logits = lanes[0].logits_all + r0 * (size_t)c->vocab_size;
        a->pos = lanes[0].ints + r0;
        a->tokens = lanes[0].ints + BT + r0;
        a->seg = lanes[0].ints + 2 * BT + r0;
        b0 += rows;
    }
    if (rc) {
        lanes_free(m);
        return rc;
    }
    m->B = B;
    m->T = T;
    m->train = train;
    return LK_OK;
}

const float *model_logits(const struct model *m)
{
    return m->acts ? m->acts[0].logits_all : NULL;
}

// ---- LoRA on a linear ----

/* Sizes lane a's LoRA buffers for this adapter (xa, dxa, DoRA's) on first use. */
static int lora_xa_prepare(struct model_acts *a, const struct lora *lora, struct lk_err *err)
{
    size_t BT = (size_t)a->B * a->T, need = 0, maxr = 0;
    if (a->xa_nmod != lora->n_mod) {
        lk_free(a->xa_off);
        a->xa_off = lk_calloc((size_t)lora->n_mod + 1, sizeof(size_t));
        if (!a->xa_off)
            return lk_errf(err, LK_ERR_NOMEM, "out of memory");
        a->xa_nmod = lora->n_mod;
    }
    size_t scr = 0;
    for (int i = 0; i < lora->n_mod; i++) {
        const struct lora_module *md = &lora->mod[i];
        a->xa_off[i] = need;
        need += BT * (size_t)md->R;
        if ((size_t)md->R > maxr)
            maxr = (size_t)md->R;
        size_t k = op_lora_scratch_floats(md->R, md->in);
        scr = k > scr ? k : scr;
    }
    if (scr > a->lscr_n) {
        lk_free(a->lscr);
        a->lscr = lk_malloc(sizeof(float) * scr);
        a->lscr_n = a->lscr ? scr : 0;
        if (!a->lscr)
            return lk_errf(err, LK_ERR_NOMEM, "out of memory");
    }
    if (need > a->xa_n) {
        lk_free(a->xa);
        a->xa = lk_malloc(sizeof(float) * need);
        a->xa_n = a->xa ? need : 0;
        if (!a->xa)
            return lk_errf(err, LK_ERR_NOMEM, "out of memory");
    }
    if (lora->mag_mem) {
        size_t gn = 0, wn = 0, wide = 0;
        lk_free(a->dora_off);
        if (!(a->dora_off = lk_calloc((size_t)lora->n_mod + 1, sizeof(size_t))))
            return lk_errf(err, LK_ERR_NOMEM, "out of memory");
        for (int i = 0; i < lora->n_mod; i++) {
            const struct lora_module *md = &lora->mod[i];
            a->dora_off[i] = gn;
            gn += (size_t)md->out;
            if ((size_t)md->out * md->in > wn)
                wn = (size_t)md->out * md->in;
            if ((size_t)md->out > wide)
                wide = (size_t)md->out;
        }
        if (gn > a->dora_gn) {
            lk_free(a->dora_g);
            lk_free(a->dora_norm);
            a->dora_g = lk_malloc(sizeof(float) * gn);
            a->dora_norm = lk_malloc(sizeof(float) * gn);
            a->dora_gn = a->dora_g && a->dora_norm ? gn : 0;
        }
        if (wn > a->dora_wn) {
            lk_free(a->dora_w);
            a->dora_w = lk_malloc(sizeof(float) * wn);
            a->dora_wn = a->dora_w ? wn : 0;
        }
        if (a->train && BT * wide > a->dora_un) {
            lk_free(a->dora_u);
            lk_free(a->dora_du);
            a->dora_u = lk_malloc(sizeof(float) * BT * wide);
            a->dora_du = lk_malloc(sizeof(float) * BT * wide);
            a->dora_un = a->dora_u && a->dora_du ? BT * wide : 0;
        }
        if (!a->dora_gn || !a->dora_wn || (a->train && !a->dora_un))
            return lk_errf(err, LK_ERR_NOMEM, "out of memory for DoRA");
    }
    if (a->train && BT * maxr > a->dxa_n) {
        lk_free(a->dxa);
        a->dxa = lk_malloc(sizeof(float) * BT * maxr);
        a->dxa_n = a->dxa ? BT * maxr : 0;
        if (!a->dxa)
            return lk_errf(err, LK_ERR_NOMEM, "out of memory");
    }
    return LK_OK;
}

/* x_d = x * mask / (1 - p) into the drop buffer; returns x itself when no dropout applies. The
 * mask element of x[i] is indexed over the whole batch (the lane's first row is b0), so every
 * thread count draws the same mask. */
static const float *lora_dropped(const struct model *m, struct model_acts *a, const struct lora *lora, int slot,
                                 const float *x, int width)
{
    float p = (float)lora->cfg.dropout;
    if (!m->train || p <= 0.0f)
        return x;
    float keep = 1.0f / (1.0f - p);
    float *d = a->drop;
    size_t n = (size_t)a->B * a->T * width, i0 = (size_t)a->b0 * a->T * width;
    for (size_t i = 0; i < n; i++)
        d[i] = op_dropout_keep(m->dropout_seed, (uint64_t)slot, i0 + i, p) ? x[i] * keep : 0.0f;
    return d;
}

/* out[BT, out] += s * (drop(x) A^T) B^T + s * bias_B; for DoRA then
 * out = b + g * (out - b), g = m / ||W + s B A||_row (W [out, in], b the base bias or NULL). */
static void lora_forward_linear(const struct model *m, struct model_acts *a, const struct lora *lora, int layer,
                                int module, float *out, const float *x, const struct op_mat *W, const float *b)
{
    int slot = lora ? lora->index[layer * CFG_N_MODULES + module] : -1;
    if (slot < 0)
        return;
    const struct lora_module *md = &lora->mod[slot];
    int BT = a->B * a->T;
    float *xa = a->xa + a->xa_off[slot];
    const float *xd = lora_dropped(m, a, lora, slot, x, md->in);
    op_lora_down(xa, xd, md->A, BT, md->in, md->R, a->lscr);
    op_lora_up_acc(out, xa, md->B, md->scale, BT, md->R, md->out);
    if (md->bias)
        for (int t = 0; t < BT; t++)
            for (int o = 0; o < md->out; o++)
                out[(size_t)t * md->out + o] += md->scale * md->bias[o];
    if (md->mag) {
        float *Wm = a->dora_w, *g = a->dora_g + a->dora_off[slot], *nrm = a->dora_norm + a->dora_off[slot];
        // W + s B A, then its row norms (the norm is detached, as PEFT does)
        op_mat_widen(Wm, W, md->in, 0, md->out, 0, md->in);
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, md->out, md->in, md->R, md->scale, md->B,
                    md->R, md->A, md->in, 1.0f, Wm, md->in);
        for (int o = 0; o < md->out; o++) {
            double ss = 0;
            for (int i = 0; i < md->in; i++)
                ss += (double)Wm[(size_t)o * md->in + i] * Wm[(size_t)o * md->in + i];
            nrm[o] = (float)sqrt(ss);
            g[o] = md->mag[o] / nrm[o];
        }
        for (int t = 0; t < BT; t++)
            for (int o = 0; o < md->out; o++) {
                float *y = &out[(size_t)t * md->out + o];
                float bo = b ? b[o] : 0.0f;
                *y = bo + g[o] * (*y - bo);
            }
    }
}

/* DoRA's backward in front of a module's linear and LoRA backward: with y = b + g * u and
 * u = W x + s B A x (g detached): dm += sum_t dy * u / norm, and the module's own backward then
 * runs on du = g * dy, which this returns (dy itself for a plain LoRA module). */
static const float *dora_backward(const struct model *m, struct model_acts *a, const struct lora *lora,
                                  float *lora_grad, int layer, int module, const float *dy, const float *x)
{
    int slot = lora ? lora->index[layer * CFG_N_MODULES + module] : -1;
    if (slot < 0 || !lora->mod[slot].mag)
        return dy;
    const struct lora_module *md = &lora->mod[slot];
    int BT = a->B * a->T;
    const float *g = a->dora_g + a->dora_off[slot], *nrm = a->dora_norm + a->dora_off[slot];
    const struct model_layer *w = &m->w.layer[layer];
    const struct op_mat *W[CFG_N_MODULES] = { &w->wq, &w->wk, &w->wv, &w->wo, &w->wgate, &w->wup, &w->wdown };
    // recompute u = x W^T + s xa B^T
    float *u = a->dora_u, *du = a->dora_du;
    const float *xa = a->xa + a->xa_off[slot];
    op_mat_forward(u, x, W[module], NULL, BT, md->in, md->out, a->wtile, a->wtile_n);
    op_matmul_forward_acc(u, xa, md->B, md->scale, BT, md->R, md->out);
    if (lora_grad) {
        float *dm = lora_grad + (md->mag - lora->mem);
        for (int o = 0; o < md->out; o++) {
            double sacc = 0;
            for (int t = 0; t < BT; t++)
                sacc += (double)dy[(size_t)t * md->out + o] * u[(size_t)t * md->out + o];
            dm[o] += (float)(sacc / nrm[o]);
        }
    }
    for (int t = 0; t < BT; t++)
        for (int o = 0; o < md->out; o++)
            du[(size_t)t * md->out + o] = g[o] * dy[(size_t)t * md->out + o];
    return du;
}

/* Backward of lora_forward_linear: dA, dB (+dbias) accumulate into lora_grad; dx += ... */
static void lora_backward_linear(const struct model *m, struct model_acts *a, const struct lora *lora,
                                 float *lora_grad, int layer, int module, float *dx, const float *dout,
                                 const float *x)
{
    int slot = lora ? lora->index[layer * CFG_N_MODULES + module] : -1;
    if (slot < 0)
        return;
    const struct lora_module *md = &lora->mod[slot];
    int BT = a->B * a->T, R = md->R;
    const float *xa = a->xa + a->xa_off[slot];
    float *dxa = a->dxa;
    // forward 2: y += s * xa B^T   => dB += s dy^T xa;  dxa = s dy B;  dbias += s sum dy
    if (lora_grad) {
        op_lora_dB_acc(lora_grad + (md->B - lora->mem), dout, xa, md->scale, BT, md->out, R);
        if (md->bias) {
            float *db = lora_grad + (md->bias - lora->mem);
            for (int o = 0; o < md->out; o++) {
                double s = 0;
                for (int t = 0; t < BT; t++)
                    s += dout[(size_t)t * md->out + o];
                db[o] += md->scale * (float)s;
            }
        }
    }
    op_lora_dxa(dxa, dout, md->B, md->scale, BT, md->out, R);
    // forward 1: xa = x_d A^T, x_d = x * mask / (1 - p)  => dA += dxa^T x_d;  dx += (dxa A) * mask/(1-p)
    const float *xd = lora_dropped(m, a, lora, slot, x, md->in);
    if (lora_grad)
        op_lora_dA_acc(lora_grad + (md->A - lora->mem), dxa, xd, BT, md->in, R);
    float p = (float)lora->cfg.dropout;
    if (p <= 0.0f) {
        op_lora_dx_acc(dx, dxa, md->A, BT, md->in, R);
    } else {
        float *tmp = a->tmp;
        memset(tmp, 0, sizeof(float) * (size_t)BT * md->in);
        op_lora_dx_acc(tmp, dxa, md->A, BT, md->in, R);
        float keep = 1.0f / (1.0f - p);
        size_t n = (size_t)BT * md->in, i0 = (size_t)a->b0 * a->T * md->in;
        for (size_t i = 0; i < n; i++)
            if (op_dropout_keep(m->dropout_seed, (uint64_t)slot, i0 + i, p))
                dx[i] += tmp[i] * keep;
    }
}

// ---- forward ----

/* What a lane needs allocated before the threads start (nothing can fail inside a lane): LoRA
 * buffers, widening tiles for half weights, and (lanes after the first, training) the lane's own
 * gradient block. k is the lane's index. */
static int lane_prepare(struct model *m, struct model_acts *a, const struct lora *lora, int k, struct lk_err *err)
{
    const struct cfg *c = &m->cfg;
    if (lora && lora_xa_prepare(a, lora, err))
        return err->code;
    if (m->w.dtype != TENSOR_F32 && !a->wtile) {
        int big = c->hidden_size;
        int dims[] = { c->intermediate_size, c->num_attention_heads * c->head_dim, c->vocab_size };
        for (size_t i = 0; i < sizeof dims / sizeof dims[0]; i++)
            big = dims[i] > big ? dims[i] : big;
        size_t n = op_mat_scratch_floats(big, big, m->n_lanes == 1 ? omp_get_max_threads() : 1);
        if (!(a->wtile = lk_falloc(n, 1)))
            return lk_errf(err, LK_ERR_NOMEM, "out of memory: widening tiles of %zu MB", n * sizeof(float) >> 20);
        a->wtile_n = n;
    }
    if (!m->train || k == 0)
        return LK_OK;
    if (lora && a->lgrad_n < lora->n) {
        lk_free(a->lgrad);
        a->lgrad_n = 0;
        if (!(a->lgrad = lk_falloc(lora->n, 1)))
            return lk_errf(err, LK_ERR_NOMEM, "out of memory");
        a->lgrad_n = lora->n;
    }
    if (!lora && m->w.dtype == TENSOR_F32 && !a->gw.mem)
        return model_weights_alloc(&a->gw, c, err);
    return LK_OK;
}

/* The whole forward of one lane's rows (inputs validated and copied by model_forward); its loss
 * sum lands in a->loss. */
static void forward_lane(const struct model *m, struct model_acts *a, const struct lora *lora, const int *targets,
                         float loss_scale)
{
    const struct cfg *c = &m->cfg;
    int B = a->B, T = a->T, BT = B * T, L = c->num_hidden_layers;
    int C = c->hidden_size, F = c->intermediate_size, V = c->vocab_size, HS = c->head_dim;
    int NH = c->num_attention_heads, NKV = c->num_key_value_heads;
    int Q = NH * HS, KV = NKV * HS;
    float eps = (float)c->rms_norm_eps, *wt = a->wtile;
    size_t wn = a->wtile_n;
    const int *tokens = a->tokens, *sg = a->has_seg ? a->seg : NULL;

    // 0. embedding (+ embedding adapter: x[t] += s * B A[:, tok])
    float *x = a->x[0];
    for (int i = 0; i < BT; i++)
        op_mat_widen(x + (size_t)i * C, &m->w.embed, C, tokens[i], tokens[i] + 1, 0, C);
    if (lora && lora->embed_A) {
        int R = lora->embed_R;
        for (int i = 0; i < BT; i++)
            for (int ch = 0; ch < C; ch++) {
                double s = 0;
                for (int r = 0; r < R; r++)
                    s += (double)lora->embed_B[(size_t)ch * R + r] * lora->embed_A[(size_t)r * V + tokens[i]];
                x[(size_t)i * C + ch] += lora->embed_scale * (float)s;
            }
    }
    for (int l = 0; l < L; l++) {
        const struct model_layer *w = &m->w.layer[l];
        float *xin = a->x[l], *xout = a->x[l + 1];
        // 1. ln1 = rmsnorm(x) * w
        op_rmsnorm_forward(a->ln1[l], a->rstd1[l], xin, w->ln1, BT, C, eps);
        // 2. q, k, v projections (+ LoRA); with q/k norm, q and k land in qp and kp
        float *qx = c->qk_norm ? a->qp[l] : a->q[l], *kx = c->qk_norm ? a->kp[l] : a->k[l];
        op_mat_forward(qx, a->ln1[l], &w->wq, w->bq, BT, C, Q, wt, wn);
        op_mat_forward(kx, a->ln1[l], &w->wk, w->bk, BT, C, KV, wt, wn);
        op_mat_forward(a->v[l], a->ln1[l], &w->wv, w->bv, BT, C, KV, wt, wn);
        lora_forward_linear(m, a, lora, l, CFG_Q, qx, a->ln1[l], &w->wq, w->bq);
        lora_forward_linear(m, a, lora, l, CFG_K, kx, a->ln1[l], &w->wk, w->bk);
        lora_forward_linear(m, a, lora, l, CFG_V, a->v[l], a->ln1[l], &w->wv, w->bv);
        // 2b. Qwen3: RMSNorm over each head, q = rmsnorm(qp[t, h, :]) * q_norm, k likewise
        if (c->qk_norm) {
            op_rmsnorm_forward(a->q[l], a->rstdq[l], qx, w->q_norm, BT * NH, HS, eps);
            op_rmsnorm_forward(a->k[l], a->rstdk[l], kx, w->k_norm, BT * NKV, HS, eps);
        }
        // 3. rotary embedding on q and k
        op_rope_forward(a->q[l], a->pos, m->inv_freq, BT, NH, HS);
        op_rope_forward(a->k[l], a->pos, m->inv_freq, BT, NKV, HS);
        // 4. causal grouped-query attention
        op_attention_forward(a->atty[l], a->att[l], a->q[l], a->k[l], a->v[l], sg, B, T, NH, NKV, HS);
        // 5. x2 = x + o_proj(atty) (+ its bias: Llama with attention_bias)
        op_mat_forward(a->x2[l], a->atty[l], &w->wo, w->bo, BT, Q, C, wt, wn);
        lora_forward_linear(m, a, lora, l, CFG_O, a->x2[l], a->atty[l], &w->wo, w->bo);
        op_add(a->x2[l], xin, (size_t)BT * C);
        // 6. ln2 = rmsnorm(x2) * w
        op_rmsnorm_forward(a->ln2[l], a->rstd2[l], a->x2[l], w->ln2, BT, C, eps);
        // 7. act = silu(gate(ln2)) * up(ln2)
        op_mat_forward(a->gate[l], a->ln2[l], &w->wgate, NULL, BT, C, F, wt, wn);
        op_mat_forward(a->up[l], a->ln2[l], &w->wup, NULL, BT, C, F, wt, wn);
        lora_forward_linear(m, a, lora, l, CFG_GATE, a->gate[l], a->ln2[l], &w->wgate, NULL);
        lora_forward_linear(m, a, lora, l, CFG_UP, a->up[l], a->ln2[l], &w->wup, NULL);
        op_swiglu_forward(a->act[l], a->gate[l], a->up[l], (size_t)BT * F);
        // 8. xout = x2 + down(act)  (xout may alias xin in inference: xin is no longer needed)
        op_mat_forward(xout, a->act[l], &w->wdown, NULL, BT, F, C, wt, wn);
        lora_forward_linear(m, a, lora, l, CFG_DOWN, xout, a->act[l], &w->wdown, NULL);
        op_add(xout, a->x2[l], (size_t)BT * C);
    }
    // 9. final norm, lm_head
    op_rmsnorm_forward(a->lnf, a->rstdf, a->x[L], m->w.norm, BT, C, eps);
    op_mat_forward(a->logits, a->lnf, &m->w.lm_head, NULL, BT, C, V, wt, wn);
    // 10. loss; in training the logits become dlogits in place
    a->loss = targets ? op_crossentropy_forward_backward(m->train ? a->logits : NULL, a->logits,
                                                         targets + (size_t)a->b0 * T, BT, V, loss_scale)
                      : 0.0;
}

int model_forward(struct model *m, const struct lora *lora, const int *tokens, const int *pos,
                  const int *seg, const int *targets, float loss_scale, double *out_loss,
                  struct lk_err *err)
{
    const struct cfg *c = &m->cfg;
    if (!m->acts)
        return lk_errf(err, LK_ERR_USAGE, "model_forward before model_plan");
    int B = m->B, T = m->T, BT = B * T, L = c->num_hidden_layers, V = c->vocab_size;
    if (lora && lora->L != L)
        return lk_errf(err, LK_ERR_SHAPE, "adapter has %d layers, model has %d", lora->L, L);
    if (lora && lora->mag_mem && ((m->train && lora->cfg.dropout > 0) || lora->cfg.lora_bias))
        return lk_errf(err, LK_ERR_UNSUPPORTED, "DoRA with %s is not supported",
                       lora->cfg.lora_bias ? "lora_bias" : "dropout while training");
    if (lora && lora_changes_weights(lora) && !lora->extras_applied)
        return lk_errf(err, LK_ERR_USAGE, "adapter changes whole weights: model_apply_extras first");
    int npos = cfg_rope_positions(c);
    for (int i = 0; i < BT; i++) {
        if (tokens[i] < 0 || tokens[i] >= V)
            return lk_errf(err, LK_ERR_USAGE, "token id %d at position %d is outside the vocabulary [0, %d)",
                           tokens[i], i, V);
        if (pos && pos[i] < 0)
            return lk_errf(err, LK_ERR_USAGE, "negative position %d", pos[i]);
        if ((pos ? pos[i] : i % T) >= npos)
            return lk_errf(err, LK_ERR_UNSUPPORTED, "position %d is beyond the %d positions where rope_scaling "
                           "'dynamic' keeps its frequencies (transformers rescales them there: not supported)",
                           pos ? pos[i] : i % T, npos);
        if (targets && (targets[i] >= V || (targets[i] < 0 && targets[i] != -100)))
            return lk_errf(err, LK_ERR_USAGE, "target id %d at position %d is outside the vocabulary",
                           targets[i], i);
    }
    for (int k = 0; k < m->n_lanes; k++)
        if (lane_prepare(m, &m->acts[k], lora, k, err))
            return err->code;
    // the batch's ids, positions and segments (each lane reads its rows of them)
    struct model_acts *a0 = &m->acts[0];
    int *apos = a0->pos, *atok = a0->tokens, *aseg = a0->seg;
    memcpy(atok, tokens, sizeof(int) * (size_t)BT);
    for (int i = 0; i < BT; i++)
        apos[i] = pos ? pos[i] : i % T;
    if (seg)
        memcpy(aseg, seg, sizeof(int) * (size_t)BT);
    for (int k = 0; k < m->n_lanes; k++)
        m->acts[k].has_seg = seg != NULL;
    // 0-10 on every lane; BLAS single-threaded (the kernels share the threads themselves)
    int nl = m->n_lanes, prev = op_blas_serial_begin(2);
#pragma omp parallel for num_threads(nl) schedule(static, 1) if (nl > 1)
    for (int k = 0; k < nl; k++)
        forward_lane(m, &m->acts[k], lora, targets, loss_scale);
    op_blas_serial_end(prev);
    double loss = 0;
    for (int k = 0; k < nl; k++)
        loss += m->acts[k].loss;
    if (out_loss)
        *out_loss = loss;
    return LK_OK;
}

// ---- backward ----

/* A linear's backward: dinp = beta dinp + dout W (beta 0: the first term of dinp, written without
 * zeroing it first), and for a full fine-tune dW += dout^T inp, dbias += sum dout. */
static void linear_backward(struct model_acts *a, float *dinp, float beta, float *dw, float *dbias, const float *dout,
                            const float *inp, const struct op_mat *w, int N, int IC, int OC)
{
    op_mat_backward(dinp, dout, w, N, IC, OC, beta, a->wtile, a->wtile_n);
    if (dw || dbias)
        op_mat_backward_weight(dw, dbias, dout, inp, N, IC, OC);
}

/* The backward of one lane's rows, into lora_grad / g (the caller's for the first lane, the
 * lane's own for the others). */
static void backward_lane(const struct model *m, struct model_acts *a, const struct lora *lora, float *lora_grad,
                          struct model_weights *g)
{
    const struct cfg *c = &m->cfg;
    int B = a->B, T = a->T, BT = B * T, L = c->num_hidden_layers;
    int C = c->hidden_size, F = c->intermediate_size, V = c->vocab_size, HS = c->head_dim;
    int NH = c->num_attention_heads, NKV = c->num_key_value_heads;
    int Q = NH * HS, KV = NKV * HS;
    size_t nC = (size_t)BT * C;

    // 9. logits = lnf @ lm_head^T  => dlnf = dlogits @ lm_head, dlm_head += dlogits^T lnf
    linear_backward(a, a->dln, 0.0f, g ? g->lm_head.f : NULL, NULL, a->logits, a->lnf, &m->w.lm_head, BT, C, V);
    //    lnf = rmsnorm(x[L]) * norm
    memset(a->dres, 0, sizeof(float) * nC);
    op_rmsnorm_backward(a->dres, g ? g->norm : NULL, a->dln, a->x[L], m->w.norm, a->rstdf, BT, C);

    for (int l = L - 1; l >= 0; l--) {
        const struct model_layer *w = &m->w.layer[l];
        struct model_layer *gw = g ? &g->layer[l] : NULL;
        // 8. xout = x2 + down(act): dres is d(xout) and flows to x2 unchanged
        const float *dy = dora_backward(m, a, lora, lora_grad, l, CFG_DOWN, a->dres, a->act[l]);
        linear_backward(a, a->dact, 0.0f, gw ? gw->wdown.f : NULL, NULL, dy, a->act[l], &w->wdown, BT, F, C);
        lora_backward_linear(m, a, lora, lora_grad, l, CFG_DOWN, a->dact, dy, a->act[l]);
        // 7. act = silu(gate) * up (dgate and dup are written, not accumulated)
        op_swiglu_backward(a->dgate, a->dup, a->dact, a->gate[l], a->up[l], (size_t)BT * F);
        dy = dora_backward(m, a, lora, lora_grad, l, CFG_GATE, a->dgate, a->ln2[l]);
        linear_backward(a, a->dln, 0.0f, gw ? gw->wgate.f : NULL, NULL, dy, a->ln2[l], &w->wgate, BT, C, F);
        lora_backward_linear(m, a, lora, lora_grad, l, CFG_GATE, a->dln, dy, a->ln2[l]);
        dy = dora_backward(m, a, lora, lora_grad, l, CFG_UP, a->dup, a->ln2[l]);
        linear_backward(a, a->dln, 1.0f, gw ? gw->wup.f : NULL, NULL, dy, a->ln2[l], &w->wup, BT, C, F);
        lora_backward_linear(m, a, lora, lora_grad, l, CFG_UP, a->dln, dy, a->ln2[l]);
        // 6. ln2 = rmsnorm(x2) * w  => d(x2) += ...
        op_rmsnorm_backward(a->dres, gw ? gw->ln2 : NULL, a->dln, a->x2[l], w->ln2, a->rstd2[l], BT, C);
        // 5. x2 = x + o_proj(atty): dres is d(x2), flows to x unchanged
        dy = dora_backward(m, a, lora, lora_grad, l, CFG_O, a->dres, a->atty[l]);
        linear_backward(a, a->datty, 0.0f, gw ? gw->wo.f : NULL, gw ? gw->bo : NULL, dy, a->atty[l], &w->wo, BT, Q,
                        C);
        lora_backward_linear(m, a, lora, lora_grad, l, CFG_O, a->datty, dy, a->atty[l]);
        // 4. attention
        memset(a->dq, 0, sizeof(float) * (size_t)BT * Q);
        memset(a->dk, 0, sizeof(float) * (size_t)BT * KV);
        memset(a->dv, 0, sizeof(float) * (size_t)BT * KV);
        op_attention_backward(a->dq, a->dk, a->dv, a->datty, a->att[l], a->q[l], a->k[l], a->v[l], B, T,
                              NH, NKV, HS, a->dpatt, a->npatt);
        // 3. rope
        op_rope_backward(a->dq, a->pos, m->inv_freq, BT, NH, HS);
        op_rope_backward(a->dk, a->pos, m->inv_freq, BT, NKV, HS);
        // 2b. q = rmsnorm(qp) * q_norm per head  => d(qp), d(q_norm); k likewise
        const float *dqx = a->dq, *dkx = a->dk;
        if (c->qk_norm) {
            memset(a->dqp, 0, sizeof(float) * (size_t)BT * Q);
            memset(a->dkp, 0, sizeof(float) * (size_t)BT * KV);
            op_rmsnorm_backward(a->dqp, gw ? gw->q_norm : NULL, a->dq, a->qp[l], w->q_norm, a->rstdq[l],
                                BT * NH, HS);
            op_rmsnorm_backward(a->dkp, gw ? gw->k_norm : NULL, a->dk, a->kp[l], w->k_norm, a->rstdk[l],
                                BT * NKV, HS);
            dqx = a->dqp;
            dkx = a->dkp;
        }
        // 2. q, k, v projections
        dy = dora_backward(m, a, lora, lora_grad, l, CFG_Q, dqx, a->ln1[l]);
        linear_backward(a, a->dln, 0.0f, gw ? gw->wq.f : NULL, gw ? gw->bq : NULL, dy, a->ln1[l], &w->wq, BT, C, Q);
        lora_backward_linear(m, a, lora, lora_grad, l, CFG_Q, a->dln, dy, a->ln1[l]);
        dy = dora_backward(m, a, lora, lora_grad, l, CFG_K, dkx, a->ln1[l]);
        linear_backward(a, a->dln, 1.0f, gw ? gw->wk.f : NULL, gw ? gw->bk : NULL, dy, a->ln1[l], &w->wk, BT, C, KV);
        lora_backward_linear(m, a, lora, lora_grad, l, CFG_K, a->dln, dy, a->ln1[l]);
        dy = dora_backward(m, a, lora, lora_grad, l, CFG_V, a->dv, a->ln1[l]);
        linear_backward(a, a->dln, 1.0f, gw ? gw->wv.f : NULL, gw ? gw->bv : NULL, dy, a->ln1[l], &w->wv, BT, C, KV);
        lora_backward_linear(m, a, lora, lora_grad, l, CFG_V, a->dln, dy, a->ln1[l]);
        // 1. ln1 = rmsnorm(x) * w  => d(x) += ...
        op_rmsnorm_backward(a->dres, gw ? gw->ln1 : NULL, a->dln, a->x[l], w->ln1, a->rstd1[l], BT, C);
    }
    // 0. embedding rows (tied: the same block as lm_head, so both uses add up)
    if (g)
        for (int i = 0; i < BT; i++) {
            float *de = g->embed.f + (size_t)a->tokens[i] * C;
            const float *dr = a->dres + (size_t)i * C;
            for (int ch = 0; ch < C; ch++)
                de[ch] += dr[ch];
        }
}

/* dst[i] += the lanes' own gradients (lanes 1, 2, ... in order), split over the threads. */
static void lanes_sum(const struct model *m, float *dst, size_t n, int full)
{
    int nl = m->n_lanes;
#pragma omp parallel for num_threads(nl) schedule(static)
    for (size_t i = 0; i < n; i++) {
        float s = dst[i];
        for (int k = 1; k < nl; k++)
            s += full ? m->acts[k].gw.mem[i] : m->acts[k].lgrad[i];
        dst[i] = s;
    }
}

void model_backward(struct model *m, const struct lora *lora, float *lora_grad,
                    struct model_weights *grads)
{
    LK_ASSERT(m->acts && m->acts[0].train);
    LK_ASSERT(!grads || (m->w.dtype == TENSOR_F32 && !m->w.n_own)); // a full fine-tune trains float32
    int nl = m->n_lanes, prev = op_blas_serial_begin(2);
#pragma omp parallel for num_threads(nl) schedule(static, 1) if (nl > 1)
    for (int k = 0; k < nl; k++) {
        struct model_acts *a = &m->acts[k];
        float *lg = lora_grad;
        struct model_weights *g = grads;
        if (k > 0 && lg) {
            LK_ASSERT(a->lgrad && a->lgrad_n >= lora->n);
            lg = a->lgrad;
            memset(lg, 0, sizeof(float) * lora->n);
        }
        if (k > 0 && g) {
            LK_ASSERT(a->gw.mem && a->gw.n == grads->n);
            g = &a->gw;
            memset(g->mem, 0, sizeof(float) * g->n);
        }
        backward_lane(m, a, lora, lg, g);
    }
    if (nl > 1 && lora_grad)
        lanes_sum(m, lora_grad, lora->n, 0);
    if (nl > 1 && grads)
        lanes_sum(m, grads->mem, grads->n, 1);
    op_blas_serial_end(prev);
}
