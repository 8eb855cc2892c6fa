/*
 * model.c - the Llama / Qwen2 / Qwen3 decoder: weights in one block, activations in one block,
 * forward and exact backward (LoRA factors, or every weight for a full fine-tune).
 * Steps are numbered alike in forward and backward. See model.h for the definition.
 */
#include "model.h"

#include <cblas.h>
#include <math.h>
#include <string.h>

#include "ops.h"

// ---- weights ----

/* Walks the parameter table: calls visit for each tensor in block order (the size table). */
struct wvisit {
    float *base;   /* NULL while counting */
    size_t off;
};

static float *wtake(struct wvisit *v, size_t n)
{
    float *p = v->base ? v->base + v->off : NULL;
    v->off += n;
    return p;
}

static void weights_layout(struct model_weights *w, const struct cfg *c, struct wvisit *v)
{
    size_t C = (size_t)c->hidden_size, F = (size_t)c->intermediate_size, V = (size_t)c->vocab_size;
    size_t Q = (size_t)c->num_attention_heads * c->head_dim;
    size_t KV = (size_t)c->num_key_value_heads * c->head_dim;
    w->embed = wtake(v, V * C);
    for (int l = 0; l < c->num_hidden_layers; l++) {
        struct model_layer *ly = w->layer ? &w->layer[l] : NULL;
        struct model_layer tmp;
        if (!ly)
            ly = &tmp;
        ly->ln1 = wtake(v, C);
        ly->wq = wtake(v, Q * C);
        ly->wk = wtake(v, KV * C);
        ly->wv = wtake(v, KV * C);
        ly->bq = c->attention_bias ? wtake(v, Q) : NULL;
        ly->bk = c->attention_bias ? wtake(v, KV) : NULL;
        ly->bv = c->attention_bias ? wtake(v, KV) : NULL;
        ly->wo = wtake(v, C * Q);
        ly->q_norm = c->qk_norm ? wtake(v, (size_t)c->head_dim) : NULL;
        ly->k_norm = c->qk_norm ? wtake(v, (size_t)c->head_dim) : NULL;
        ly->ln2 = wtake(v, C);
        ly->wgate = wtake(v, F * C);
        ly->wup = wtake(v, F * C);
        ly->wdown = wtake(v, C * F);
    }
    w->norm = wtake(v, C);
    w->lm_head = c->tie_word_embeddings ? w->embed : wtake(v, V * C);
}

int model_weights_alloc(struct model_weights *w, const struct cfg *c, struct lk_err *err)
{
    memset(w, 0, sizeof *w);
    struct wvisit v = { 0 };
    weights_layout(w, c, &v);
    w->layer = lk_calloc((size_t)c->num_hidden_layers, sizeof *w->layer);
    size_t bytes;
    if (!w->layer || lk_mul_size(v.off, sizeof(float), &bytes) ||
        !(w->mem = lk_calloc(v.off, sizeof(float)))) {
        lk_free(w->layer);
        w->layer = NULL;
        return lk_errf(err, LK_ERR_NOMEM, "out of memory allocating %zu model parameters", v.off);
    }
    w->n = v.off;
    v.base = w->mem;
    v.off = 0;
    weights_layout(w, c, &v);
    LK_ASSERT(v.off == w->n);
    return LK_OK;
}

void model_weights_release(struct model_weights *w)
{
    if (!w)
        return;
    lk_free(w->mem);
    lk_free(w->layer);
    memset(w, 0, sizeof *w);
}

size_t model_param_count(const struct cfg *c)
{
    struct model_weights w = { 0 };
    struct wvisit v = { 0 };
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
    x->ndim = ndim;
    x->shape[0] = d0;
    x->shape[1] = ndim > 1 ? d1 : 0;
    x->numel = (size_t)d0 * (size_t)(ndim > 1 ? d1 : 1);
    x->layer = layer;
    x->module = module;
    x->is_bias = is_bias;
}

int model_weights_tensors(const struct model_weights *w, const struct cfg *c,
                          struct model_tensor **out, int *n, struct lk_err *err)
{
    int L = c->num_hidden_layers;
    int64_t C = c->hidden_size, F = c->intermediate_size, V = c->vocab_size;
    int64_t Q = (int64_t)c->num_attention_heads * c->head_dim;
    int64_t KV = (int64_t)c->num_key_value_heads * c->head_dim;
    struct model_tensor *t = lk_calloc((size_t)L * 14 + 3, sizeof *t);
    if (!t)
        return lk_errf(err, LK_ERR_NOMEM, "out of memory");
    int k = 0;
    char nm[96];
    tensor_add(t, &k, "model.embed_tokens.weight", w->embed, 2, V, C, -1, -1, 0);
    for (int l = 0; l < L; l++) {
        const struct model_layer *ly = &w->layer[l];
#define LAYER_T(suffix, p, nd, d0, d1, mod, isb)                                                   \
    snprintf(nm, sizeof nm, "model.layers.%d.%s", l, suffix);                                      \
    tensor_add(t, &k, nm, p, nd, d0, d1, l, mod, isb)
        LAYER_T("input_layernorm.weight", ly->ln1, 1, C, 0, -1, 0);
        LAYER_T("self_attn.q_proj.weight", ly->wq, 2, Q, C, CFG_Q, 0);
        LAYER_T("self_attn.k_proj.weight", ly->wk, 2, KV, C, CFG_K, 0);
        LAYER_T("self_attn.v_proj.weight", ly->wv, 2, KV, C, CFG_V, 0);
        if (ly->bq) {
            LAYER_T("self_attn.q_proj.bias", ly->bq, 1, Q, 0, CFG_Q, 1);
            LAYER_T("self_attn.k_proj.bias", ly->bk, 1, KV, 0, CFG_K, 1);
            LAYER_T("self_attn.v_proj.bias", ly->bv, 1, KV, 0, CFG_V, 1);
        }
        LAYER_T("self_attn.o_proj.weight", ly->wo, 2, C, Q, CFG_O, 0);
        if (ly->q_norm) {
            LAYER_T("self_attn.q_norm.weight", ly->q_norm, 1, c->head_dim, 0, -1, 0);
            LAYER_T("self_attn.k_norm.weight", ly->k_norm, 1, c->head_dim, 0, -1, 0);
        }
        LAYER_T("post_attention_layernorm.weight", ly->ln2, 1, C, 0, -1, 0);
        LAYER_T("mlp.gate_proj.weight", ly->wgate, 2, F, C, CFG_GATE, 0);
        LAYER_T("mlp.up_proj.weight", ly->wup, 2, F, C, CFG_UP, 0);
        LAYER_T("mlp.down_proj.weight", ly->wdown, 2, C, F, CFG_DOWN, 0);
#undef LAYER_T
    }
    tensor_add(t, &k, "model.norm.weight", w->norm, 1, C, 0, -1, -1, 0);
    if (!c->tie_word_embeddings)
        tensor_add(t, &k, "lm_head.weight", w->lm_head, 2, V, C, -1, -1, 0);
    *out = t;
    *n = k;
    return LK_OK;
}

void model_weights_randomize(struct model_weights *w, const struct cfg *c, float std,
                             struct lk_rng *rng)
{
    struct model_tensor *t;
    int n;
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

struct model_acts {
    float *mem;            /* owned: everything below points into it */
    size_t n;
    int train;
    int L;
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
    float *logits;         /* [BT, V]; dlogits after a training forward */
    /* backward scratch (train) */
    float *dres, *dln, *dq, *dk, *dv, *datty, *dgate, *dup, *dact, *tmp;
    float *dqp, *dkp;      /* Qwen3: d(q, k before the per-head norm) */
    float *dpatt;          /* [T, T] attention backward scratch */
    float *drop;           /* [BT, max(C, F, NH*HS)]: dropped LoRA input */
    int *pos, *tokens, *seg; /* owned copies [BT] */
    int has_seg;
    /* LoRA: A drop(x) per module [BT, R], owned, sized on first use */
    float *xa;
    size_t xa_n;
    float *dxa;            /* owned [BT, max R] */
    size_t dxa_n;
    /* DoRA (owned, sized on first use): per module g = m / ||W + sBA|| and the norms, the
     * merged weight of one module, and two [BT, wide] buffers for backward */
    float *dora_g, *dora_norm, *dora_w, *dora_u, *dora_du;
    size_t dora_gn, dora_wn, dora_un;
    size_t *dora_off;      /* owned [n_mod]: offset of each module's g / norm */
    size_t *xa_off;        /* owned [n_mod] */
    int xa_nmod;
};

int model_init(struct model *m, const struct cfg *c, struct lk_err *err)
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
    int rc = model_weights_alloc(&m->w, c, err);
    if (rc) {
        lk_free(m->inv_freq);
        m->inv_freq = NULL;
    }
    return rc;
}

static void acts_free(struct model_acts *a)
{
    if (!a)
        return;
    lk_free(a->mem);
    lk_free(a->x);
    lk_free(a->xa);
    lk_free(a->dxa);
    lk_free(a->dora_g);
    lk_free(a->dora_norm);
    lk_free(a->dora_w);
    lk_free(a->dora_u);
    lk_free(a->dora_du);
    lk_free(a->dora_off);
    lk_free(a->xa_off);
    lk_free(a->pos); // tokens and seg share this block
    lk_free(a);
}

void model_release(struct model *m)
{
    if (!m)
        return;
    acts_free(m->acts);
    model_weights_release(&m->w);
    lk_free(m->inv_freq);
    cfg_release(&m->cfg);
    memset(m, 0, sizeof *m);
}

/* Carves the activation block; with base NULL only counts. */
static size_t acts_layout(struct model_acts *a, const struct cfg *c, int B, int T, int train,
                          float *base)
{
    size_t BT = (size_t)B * T, C = (size_t)c->hidden_size, F = (size_t)c->intermediate_size;
    size_t Q = (size_t)c->num_attention_heads * c->head_dim;
    size_t KV = (size_t)c->num_key_value_heads * c->head_dim;
    size_t V = (size_t)c->vocab_size, NH = (size_t)c->num_attention_heads;
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
    a->logits = TAKE(BT * V);
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
        a->dpatt = TAKE((size_t)T * T);
        a->dqp = qkn ? TAKE(BT * Q) : NULL;
        a->dkp = qkn ? TAKE(BT * KV) : NULL;
    }
#undef TAKE
    return off;
}

int model_plan(struct model *m, int B, int T, int train, struct lk_err *err)
{
    if (m->acts && m->B == B && m->T == T && m->train == train)
        return LK_OK;
    if (B <= 0 || T <= 0)
        return lk_errf(err, LK_ERR_USAGE, "batch %d and sequence length %d must be positive", B, T);
    acts_free(m->acts);
    m->acts = NULL;
    const struct cfg *c = &m->cfg;
    int L = c->num_hidden_layers;
    struct model_acts *a = lk_calloc(1, sizeof *a);
    float **ptrs = lk_calloc((size_t)(L + 1) + 17 * (size_t)L, sizeof(float *));
    size_t BT = (size_t)B * T;
    int *ints = lk_calloc(3 * BT, sizeof(int));
    if (!a || !ptrs || !ints) {
        lk_free(a);
        lk_free(ptrs);
        lk_free(ints);
        return lk_errf(err, LK_ERR_NOMEM, "out of memory");
    }
    a->x = ptrs;
    float ***sets[] = { &a->ln1, &a->rstd1, &a->q, &a->k, &a->v, &a->att, &a->atty, &a->x2,
                        &a->ln2, &a->rstd2, &a->gate, &a->up, &a->act, &a->qp, &a->kp, &a->rstdq,
                        &a->rstdk };
    LK_ASSERT(sizeof sets / sizeof sets[0] == 17);
    for (size_t i = 0; i < sizeof sets / sizeof sets[0]; i++)
        *sets[i] = ptrs + (L + 1) + i * (size_t)L;
    a->pos = ints;
    a->tokens = NULL;
    a->seg = NULL;
    size_t n = acts_layout(a, c, B, T, train, NULL);
    size_t bytes;
    if (lk_mul_size(n, sizeof(float), &bytes) || !(a->mem = lk_malloc(bytes))) {
        lk_free(ptrs);
        lk_free(ints);
        lk_free(a);
        return lk_errf(err, LK_ERR_NOMEM, "out of memory: activations for batch %d x %d tokens need %zu MB",
                       B, T, n * sizeof(float) >> 20);
    }
    memset(a->mem, 0, bytes);
    a->n = n;
    a->train = train;
    a->L = L;
    acts_layout(a, c, B, T, train, a->mem);
    // pos, tokens and seg share one int block owned through pos
    a->tokens = ints + BT;
    a->seg = ints + 2 * BT;
    m->acts = a;
    m->B = B;
    m->T = T;
    m->train = train;
    return LK_OK;
}

const float *model_logits(const struct model *m)
{
    return m->acts ? m->acts->logits : NULL;
}

// ---- LoRA on a linear ----

static int lora_xa_prepare(struct model *m, const struct lora *lora, struct lk_err *err)
{
    struct model_acts *a = m->acts;
    size_t BT = (size_t)m->B * m->T, need = 0, maxr = 0;
    if (a->xa_nmod != lora->n_mod) {
        lk_free(a->xa_off);
        a->xa_off = lk_calloc((size_t)lora->n_mod + 1, sizeof(size_t));
        if (!a->xa_off)
            return lk_errf(err, LK_ERR_NOMEM, "out of memory");
        a->xa_nmod = lora->n_mod;
    }
    for (int i = 0; i < lora->n_mod; i++) {
        a->xa_off[i] = need;
        need += BT * (size_t)lora->mod[i].R;
        if ((size_t)lora->mod[i].R > maxr)
            maxr = (size_t)lora->mod[i].R;
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

/* x_d = x * mask / (1 - p) into the drop buffer; returns x itself when no dropout applies. */
static const float *lora_dropped(struct model *m, const struct lora *lora, int slot, const float *x,
                                 size_t n)
{
    float p = (float)lora->cfg.dropout;
    if (!m->train || p <= 0.0f)
        return x;
    float keep = 1.0f / (1.0f - p);
    float *d = m->acts->drop;
    for (size_t i = 0; i < n; i++)
        d[i] = op_dropout_keep(m->dropout_seed, (uint64_t)slot, i, p) ? x[i] * keep : 0.0f;
    return d;
}

/* out[BT, out] += s * (drop(x) A^T) B^T + s * bias_B; for DoRA then
 * out = b + g * (out - b), g = m / ||W + s B A||_row (W [out, in], b the base bias or NULL). */
static void lora_forward_linear(struct model *m, const struct lora *lora, int layer, int module,
                                float *out, const float *x, const float *W, const float *b)
{
    int slot = lora ? lora->index[layer * CFG_N_MODULES + module] : -1;
    if (slot < 0)
        return;
    const struct lora_module *md = &lora->mod[slot];
    int BT = m->B * m->T;
    float *xa = m->acts->xa + m->acts->xa_off[slot];
    const float *xd = lora_dropped(m, lora, slot, x, (size_t)BT * md->in);
    op_matmul_forward(xa, xd, md->A, NULL, BT, md->in, md->R);
    op_matmul_forward_acc(out, xa, md->B, md->scale, BT, md->R, md->out);
    if (md->bias)
        for (int t = 0; t < BT; t++)
            for (int o = 0; o < md->out; o++)
                out[(size_t)t * md->out + o] += md->scale * md->bias[o];
    if (md->mag) {
        struct model_acts *a = m->acts;
        float *Wm = a->dora_w, *g = a->dora_g + a->dora_off[slot], *nrm = a->dora_norm + a->dora_off[slot];
        // W + s B A, then its row norms (the norm is detached, as PEFT does)
        memcpy(Wm, W, sizeof(float) * (size_t)md->out * md->in);
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
static const float *dora_backward(struct model *m, const struct lora *lora, float *lora_grad, int layer,
                                  int module, const float *dy, const float *x)
{
    int slot = lora ? lora->index[layer * CFG_N_MODULES + module] : -1;
    if (slot < 0 || !lora->mod[slot].mag)
        return dy;
    const struct lora_module *md = &lora->mod[slot];
    struct model_acts *a = m->acts;
    int BT = m->B * m->T;
    const float *g = a->dora_g + a->dora_off[slot], *nrm = a->dora_norm + a->dora_off[slot];
    const struct model_layer *w = &m->w.layer[layer];
    const float *W[CFG_N_MODULES] = { w->wq, w->wk, w->wv, w->wo, w->wgate, w->wup, w->wdown };
    // recompute u = x W^T + s xa B^T
    float *u = a->dora_u, *du = a->dora_du;
    const float *xa = a->xa + a->xa_off[slot];
    op_matmul_forward(u, x, W[module], NULL, BT, md->in, md->out);
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
static void lora_backward_linear(struct model *m, const struct lora *lora, float *lora_grad,
                                 int layer, int module, float *dx, const float *dout, const float *x)
{
    int slot = lora ? lora->index[layer * CFG_N_MODULES + module] : -1;
    if (slot < 0)
        return;
    const struct lora_module *md = &lora->mod[slot];
    struct model_acts *a = m->acts;
    int BT = m->B * m->T, R = md->R;
    const float *xa = a->xa + a->xa_off[slot];
    float *dxa = a->dxa;
    // forward 2: y += s * xa B^T   => dB += s dy^T xa;  dxa = s dy B;  dbias += s sum dy
    if (lora_grad) {
        float *dB = lora_grad + (md->B - lora->mem);
        cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, md->out, R, BT, md->scale, dout,
                    md->out, xa, R, 1.0f, dB, R);
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
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, BT, R, md->out, md->scale, dout, md->out,
                md->B, R, 0.0f, dxa, R);
    // forward 1: xa = x_d A^T, x_d = x * mask / (1 - p)  => dA += dxa^T x_d;  dx += (dxa A) * mask/(1-p)
    const float *xd = lora_dropped(m, lora, slot, x, (size_t)BT * md->in);
    if (lora_grad) {
        float *dA = lora_grad + (md->A - lora->mem);
        cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, R, md->in, BT, 1.0f, dxa, R, xd, md->in,
                    1.0f, dA, md->in);
    }
    float p = (float)lora->cfg.dropout;
    if (p <= 0.0f) {
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, BT, md->in, R, 1.0f, dxa, R, md->A,
                    md->in, 1.0f, dx, md->in);
    } else {
        float *tmp = a->tmp;
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, BT, md->in, R, 1.0f, dxa, R, md->A,
                    md->in, 0.0f, tmp, md->in);
        float keep = 1.0f / (1.0f - p);
        size_t n = (size_t)BT * md->in;
        for (size_t i = 0; i < n; i++)
            if (op_dropout_keep(m->dropout_seed, (uint64_t)slot, i, p))
                dx[i] += tmp[i] * keep;
    }
}

// ---- forward ----

int model_forward(struct model *m, const struct lora *lora, const int *tokens, const int *pos,
                  const int *seg, const int *targets, float loss_scale, double *out_loss,
                  struct lk_err *err)
{
    const struct cfg *c = &m->cfg;
    struct model_acts *a = m->acts;
    if (!a)
        return lk_errf(err, LK_ERR_USAGE, "model_forward before model_plan");
    int B = m->B, T = m->T, BT = B * T, L = c->num_hidden_layers;
    int C = c->hidden_size, F = c->intermediate_size, V = c->vocab_size, HS = c->head_dim;
    int NH = c->num_attention_heads, NKV = c->num_key_value_heads;
    int Q = NH * HS, KV = NKV * HS;
    float eps = (float)c->rms_norm_eps;
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
    }
    if (lora && lora_xa_prepare(m, lora, err))
        return err->code;
    memcpy(a->tokens, tokens, sizeof(int) * (size_t)BT);
    for (int b = 0; b < B; b++)
        for (int t = 0; t < T; t++)
            a->pos[b * T + t] = pos ? pos[b * T + t] : t;
    a->has_seg = seg != NULL;
    if (seg)
        memcpy(a->seg, seg, sizeof(int) * (size_t)BT);
    const int *sg = seg ? a->seg : NULL;

    // 0. embedding (+ embedding adapter: x[t] += s * B A[:, tok])
    float *x = a->x[0];
    for (int i = 0; i < BT; i++)
        memcpy(x + (size_t)i * C, m->w.embed + (size_t)tokens[i] * C, sizeof(float) * (size_t)C);
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
        op_matmul_forward(qx, a->ln1[l], w->wq, w->bq, BT, C, Q);
        op_matmul_forward(kx, a->ln1[l], w->wk, w->bk, BT, C, KV);
        op_matmul_forward(a->v[l], a->ln1[l], w->wv, w->bv, BT, C, KV);
        lora_forward_linear(m, lora, l, CFG_Q, qx, a->ln1[l], w->wq, w->bq);
        lora_forward_linear(m, lora, l, CFG_K, kx, a->ln1[l], w->wk, w->bk);
        lora_forward_linear(m, lora, l, CFG_V, a->v[l], a->ln1[l], w->wv, w->bv);
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
        // 5. x2 = x + o_proj(atty)
        op_matmul_forward(a->x2[l], a->atty[l], w->wo, NULL, BT, Q, C);
        lora_forward_linear(m, lora, l, CFG_O, a->x2[l], a->atty[l], w->wo, NULL);
        for (size_t i = 0; i < (size_t)BT * C; i++)
            a->x2[l][i] += xin[i];
        // 6. ln2 = rmsnorm(x2) * w
        op_rmsnorm_forward(a->ln2[l], a->rstd2[l], a->x2[l], w->ln2, BT, C, eps);
        // 7. act = silu(gate(ln2)) * up(ln2)
        op_matmul_forward(a->gate[l], a->ln2[l], w->wgate, NULL, BT, C, F);
        op_matmul_forward(a->up[l], a->ln2[l], w->wup, NULL, BT, C, F);
        lora_forward_linear(m, lora, l, CFG_GATE, a->gate[l], a->ln2[l], w->wgate, NULL);
        lora_forward_linear(m, lora, l, CFG_UP, a->up[l], a->ln2[l], w->wup, NULL);
        op_swiglu_forward(a->act[l], a->gate[l], a->up[l], (size_t)BT * F);
        // 8. xout = x2 + down(act)  (xout may alias xin in inference: xin is no longer needed)
        op_matmul_forward(xout, a->act[l], w->wdown, NULL, BT, F, C);
        lora_forward_linear(m, lora, l, CFG_DOWN, xout, a->act[l], w->wdown, NULL);
        for (size_t i = 0; i < (size_t)BT * C; i++)
            xout[i] += a->x2[l][i];
    }
    // 9. final norm, lm_head
    op_rmsnorm_forward(a->lnf, a->rstdf, a->x[L], m->w.norm, BT, C, eps);
    op_matmul_forward(a->logits, a->lnf, m->w.lm_head, NULL, BT, C, V);
    double loss = 0;
    if (targets) {
        for (int i = 0; i < BT; i++)
            if (targets[i] >= V || targets[i] < -100 || (targets[i] < 0 && targets[i] != -100))
                return lk_errf(err, LK_ERR_USAGE, "target id %d at position %d is outside the vocabulary",
                               targets[i], i);
        // 10. loss; in training the logits become dlogits in place
        loss = op_crossentropy_forward_backward(m->train ? a->logits : NULL, a->logits, targets, BT, V,
                                                loss_scale);
    }
    if (out_loss)
        *out_loss = loss;
    return LK_OK;
}

// ---- backward ----

void model_backward(struct model *m, const struct lora *lora, float *lora_grad,
                    struct model_weights *grads)
{
    const struct cfg *c = &m->cfg;
    struct model_acts *a = m->acts;
    LK_ASSERT(a && a->train);
    int B = m->B, T = m->T, BT = B * T, L = c->num_hidden_layers;
    int C = c->hidden_size, F = c->intermediate_size, V = c->vocab_size, HS = c->head_dim;
    int NH = c->num_attention_heads, NKV = c->num_key_value_heads;
    int Q = NH * HS, KV = NKV * HS;
    struct model_weights *g = grads;
    size_t nC = (size_t)BT * C;

    // 9. logits = lnf @ lm_head^T  => dlnf = dlogits @ lm_head, dlm_head += dlogits^T lnf
    memset(a->dln, 0, sizeof(float) * nC);
    op_matmul_backward(a->dln, g ? g->lm_head : NULL, NULL, a->logits, a->lnf, m->w.lm_head, BT, C, V);
    //    lnf = rmsnorm(x[L]) * norm
    memset(a->dres, 0, sizeof(float) * nC);
    op_rmsnorm_backward(a->dres, g ? g->norm : NULL, a->dln, a->x[L], m->w.norm, a->rstdf, BT, C);

    for (int l = L - 1; l >= 0; l--) {
        const struct model_layer *w = &m->w.layer[l];
        struct model_layer *gw = g ? &g->layer[l] : NULL;
        // 8. xout = x2 + down(act): dres is d(xout) and flows to x2 unchanged
        memset(a->dact, 0, sizeof(float) * (size_t)BT * F);
        const float *dy = dora_backward(m, lora, lora_grad, l, CFG_DOWN, a->dres, a->act[l]);
        op_matmul_backward(a->dact, gw ? gw->wdown : NULL, NULL, dy, a->act[l], w->wdown, BT, F, C);
        lora_backward_linear(m, lora, lora_grad, l, CFG_DOWN, a->dact, dy, a->act[l]);
        // 7. act = silu(gate) * up
        memset(a->dgate, 0, sizeof(float) * (size_t)BT * F);
        memset(a->dup, 0, sizeof(float) * (size_t)BT * F);
        op_swiglu_backward(a->dgate, a->dup, a->dact, a->gate[l], a->up[l], (size_t)BT * F);
        memset(a->dln, 0, sizeof(float) * nC);
        dy = dora_backward(m, lora, lora_grad, l, CFG_GATE, a->dgate, a->ln2[l]);
        op_matmul_backward(a->dln, gw ? gw->wgate : NULL, NULL, dy, a->ln2[l], w->wgate, BT, C, F);
        lora_backward_linear(m, lora, lora_grad, l, CFG_GATE, a->dln, dy, a->ln2[l]);
        dy = dora_backward(m, lora, lora_grad, l, CFG_UP, a->dup, a->ln2[l]);
        op_matmul_backward(a->dln, gw ? gw->wup : NULL, NULL, dy, a->ln2[l], w->wup, BT, C, F);
        lora_backward_linear(m, lora, lora_grad, l, CFG_UP, a->dln, dy, a->ln2[l]);
        // 6. ln2 = rmsnorm(x2) * w  => d(x2) += ...
        op_rmsnorm_backward(a->dres, gw ? gw->ln2 : NULL, a->dln, a->x2[l], w->ln2, a->rstd2[l], BT, C);
        // 5. x2 = x + o_proj(atty): dres is d(x2), flows to x unchanged
        memset(a->datty, 0, sizeof(float) * (size_t)BT * Q);
        dy = dora_backward(m, lora, lora_grad, l, CFG_O, a->dres, a->atty[l]);
        op_matmul_backward(a->datty, gw ? gw->wo : NULL, NULL, dy, a->atty[l], w->wo, BT, Q, C);
        lora_backward_linear(m, lora, lora_grad, l, CFG_O, a->datty, dy, a->atty[l]);
        // 4. attention
        memset(a->dq, 0, sizeof(float) * (size_t)BT * Q);
        memset(a->dk, 0, sizeof(float) * (size_t)BT * KV);
        memset(a->dv, 0, sizeof(float) * (size_t)BT * KV);
        op_attention_backward(a->dq, a->dk, a->dv, a->datty, a->att[l], a->q[l], a->k[l], a->v[l], B, T,
                              NH, NKV, HS, a->dpatt);
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
        memset(a->dln, 0, sizeof(float) * nC);
        dy = dora_backward(m, lora, lora_grad, l, CFG_Q, dqx, a->ln1[l]);
        op_matmul_backward(a->dln, gw ? gw->wq : NULL, gw ? gw->bq : NULL, dy, a->ln1[l], w->wq, BT, C, Q);
        lora_backward_linear(m, lora, lora_grad, l, CFG_Q, a->dln, dy, a->ln1[l]);
        dy = dora_backward(m, lora, lora_grad, l, CFG_K, dkx, a->ln1[l]);
        op_matmul_backward(a->dln, gw ? gw->wk : NULL, gw ? gw->bk : NULL, dy, a->ln1[l], w->wk, BT, C, KV);
        lora_backward_linear(m, lora, lora_grad, l, CFG_K, a->dln, dy, a->ln1[l]);
        dy = dora_backward(m, lora, lora_grad, l, CFG_V, a->dv, a->ln1[l]);
        op_matmul_backward(a->dln, gw ? gw->wv : NULL, gw ? gw->bv : NULL, dy, a->ln1[l], w->wv, BT, C, KV);
        lora_backward_linear(m, lora, lora_grad, l, CFG_V, a->dln, dy, a->ln1[l]);
        // 1. ln1 = rmsnorm(x) * w  => d(x) += ...
        op_rmsnorm_backward(a->dres, gw ? gw->ln1 : NULL, a->dln, a->x[l], w->ln1, a->rstd1[l], BT, C);
    }
    // 0. embedding rows (tied: the same block as lm_head, so both uses add up)
    if (g)
        for (int i = 0; i < BT; i++) {
            float *de = g->embed + (size_t)a->tokens[i] * C;
            const float *dr = a->dres + (size_t)i * C;
            for (int ch = 0; ch < C; ch++)
                de[ch] += dr[ch];
        }
}
