/*
 * generate.c - the KV-cache forward (prefill a chunk, then one token at a time), sampling
 * (greedy, temperature, top-p) and the generation loop. The forward mirrors model.c's
 * model_forward step by step (same kernels, same order of additions), reading the weights of
 * struct model as they are kept (float32, or bf16 / f16 widened in the kernels: one token is a
 * fused widen-and-dot GEMV that reads each weight once); only attention differs, reading keys
 * and values from the cache. Owns: the cache block and its scratch.
 */
#include "generate.h"

#include <cblas.h>
#include <math.h>
#include <omp.h>
#include <stdlib.h>
#include <string.h>

#include "ops.h"

// ---- the cache ----

/* Carves the block; with base NULL only counts. */
static size_t cache_layout(struct gen_cache *gc, float *base)
{
    size_t off = 0, ch = (size_t)gc->chunk, T = (size_t)gc->T_max;
#define TAKE(n) (base ? base + (off += (n), off - (n)) : (off += (n), (float *)NULL))
    for (int l = 0; l < gc->L; l++) {
        gc->k[l] = TAKE(T * gc->KV);
        gc->v[l] = TAKE(T * gc->KV);
    }
    gc->x = TAKE(ch * gc->C);
    gc->ln = TAKE(ch * gc->C);
    gc->q = TAKE(ch * gc->Q);
    gc->kn = TAKE(ch * gc->KV);
    gc->vn = TAKE(ch * gc->KV);
    gc->atty = TAKE(ch * gc->Q);
    gc->x2 = TAKE(ch * gc->C);
    gc->gate = TAKE(ch * gc->F);
    gc->up = TAKE(ch * gc->F);
    gc->act = TAKE(ch * gc->F);
    gc->xa = TAKE(ch * (size_t)(gc->R > 0 ? gc->R : 1));
    gc->att = TAKE(ch * gc->NH * T);
    gc->lnf = TAKE(ch * gc->C);
    gc->logits = TAKE((size_t)gc->V);
#undef TAKE
    return off;
}

int gen_cache_init(struct gen_cache *gc, const struct cfg *c, int T_max, int chunk, int max_rank,
                   struct lk_err *err)
{
    memset(gc, 0, sizeof *gc);
    if (T_max <= 0 || chunk <= 0 || max_rank < 0)
        return lk_errf(err, LK_ERR_USAGE, "cache of %d positions in chunks of %d: both must be positive",
                       T_max, chunk);
    if (chunk > T_max)
        chunk = T_max;
    gc->L = c->num_hidden_layers;
    gc->T_max = T_max;
    gc->chunk = chunk;
    gc->C = c->hidden_size;
    gc->F = c->intermediate_size;
    gc->V = c->vocab_size;
    gc->NH = c->num_attention_heads;
    gc->NKV = c->num_key_value_heads;
    gc->HS = c->head_dim;
    gc->Q = gc->NH * gc->HS;
    gc->KV = gc->NKV * gc->HS;
    gc->R = max_rank;
    gc->k = lk_calloc((size_t)gc->L * 2 + 1, sizeof(float *));
    gc->pos = lk_calloc((size_t)chunk, sizeof(int));
    if (!gc->k || !gc->pos) {
        gen_cache_release(gc);
        return lk_errf(err, LK_ERR_NOMEM, "out of memory");
    }
    gc->v = gc->k + gc->L;
    size_t n = cache_layout(gc, NULL), bytes;
    if (lk_mul_size(n, sizeof(float), &bytes) || !(gc->mem = lk_malloc(bytes))) {
        int L = gc->L;
        gen_cache_release(gc);
        return lk_errf(err, LK_ERR_NOMEM, "out of memory: a KV cache of %d positions x %d layers needs %zu MB",
                       T_max, L, n * sizeof(float) >> 20);
    }
    cache_layout(gc, gc->mem);
    return LK_OK;
}

void gen_cache_release(struct gen_cache *gc)
{
    if (!gc)
        return;
    lk_free(gc->mem);
    lk_free(gc->k);
    lk_free(gc->pos);
    lk_free(gc->wtile);
    memset(gc, 0, sizeof *gc);
}

void gen_cache_truncate(struct gen_cache *gc, int n)
{
    LK_ASSERT(n >= 0 && n <= gc->n);
    gc->n = n;
}

int gen_lora_max_rank(const struct lora *l)
{
    int r = 0;
    for (int i = 0; l && i < l->n_mod; i++)
        if (l->mod[i].R > r)
            r = l->mod[i].R;
    return r;
}

// ---- forward ----

/* out[N, OC] = x[N, IC] @ A^T for a float32 LoRA factor. One token is a matrix-vector product:
 * sgemm would pack the whole matrix on every call, sgemv reads it once. (The model's own weight
 * matrices go through op_mat_forward, which does the same for one token.) */
static void lora_mul(float *out, const float *x, const float *w, int N, int IC, int OC)
{
    if (N != 1)
        op_matmul_forward(out, x, w, NULL, N, IC, OC);
    else
        cblas_sgemv(CblasRowMajor, CblasNoTrans, OC, IC, 1.0f, w, IC, x, 1, 0.0f, out, 1);
}

/* out[N, OC] += alpha * x @ w^T */
static void lora_mul_acc(float *out, const float *x, const float *w, float alpha, int N, int IC, int OC)
{
    if (N != 1)
        op_matmul_forward_acc(out, x, w, alpha, N, IC, OC);
    else
        cblas_sgemv(CblasRowMajor, CblasNoTrans, OC, IC, alpha, w, IC, x, 1, 1.0f, out, 1);
}

/* Dot product with 4 partial sums (a plain float reduction does not vectorize without
 * -ffast-math). */
static float dot(const float *a, const float *b, int n)
{
    float s0 = 0, s1 = 0, s2 = 0, s3 = 0;
    int i = 0;
    for (; i + 4 <= n; i += 4) {
        s0 += a[i] * b[i];
        s1 += a[i + 1] * b[i + 1];
        s2 += a[i + 2] * b[i + 2];
        s3 += a[i + 3] * b[i + 3];
    }
    for (; i < n; i++)
        s0 += a[i] * b[i];
    return (s0 + s1) + (s2 + s3);
}

/* out[N, out] += s * (x A^T) B^T + s * bias_B, as model.c's lora_forward_linear (no dropout) */
static void lora_linear(struct gen_cache *gc, const struct lora *lora, int layer, int module,
                        float *out, const float *x, int N)
{
    int slot = lora ? lora->index[layer * CFG_N_MODULES + module] : -1;
    if (slot < 0)
        return;
    const struct lora_module *md = &lora->mod[slot];
    lora_mul(gc->xa, x, md->A, N, md->in, md->R);
    lora_mul_acc(out, gc->xa, md->B, md->scale, N, md->R, md->out);
    if (md->bias)
        for (int t = 0; t < N; t++)
            for (int o = 0; o < md->out; o++)
                out[(size_t)t * md->out + o] += md->scale * md->bias[o];
}

/* Attention of the N chunk tokens (positions n0..n0+N-1) over cache positions 0..n0+i, with
 * the arithmetic of op_attention_forward (float scores, double softmax sum). A prefill chunk
 * (N >= 8) is two GEMMs per head over the cache (scores, then P V), the heads on the threads; a
 * single token runs the plain loops on OpenMP threads. */
static void softmax_causal_row(float *a, int t)
{
    float mx = -INFINITY;
    for (int t2 = 0; t2 <= t; t2++)
        if (a[t2] > mx)
            mx = a[t2];
    double sum = 0;
    for (int t2 = 0; t2 <= t; t2++) {
        float e = expf(a[t2] - mx);
        a[t2] = e;
        sum += e;
    }
    float inv = (float)(1.0 / sum);
    for (int t2 = 0; t2 <= t; t2++)
        a[t2] *= inv;
}

static void cache_attention(struct gen_cache *gc, int l, int n0, int N)
{
    int NH = gc->NH, HS = gc->HS, group = gc->NH / gc->NKV, T = gc->T_max;
    float scale = 1.0f / sqrtf((float)HS);
    size_t qs = (size_t)gc->Q, ks = (size_t)gc->KV;
    const float *K = gc->k[l], *Vc = gc->v[l];
    if (N >= 8) {
        int Tk = n0 + N; // keys and values 0..Tk-1
        int nt = (double)N * Tk * HS * NH < 262144.0 ? 1 : op_team(), prev = op_blas_serial_begin(nt);
#pragma omp parallel for num_threads(nt) schedule(static) if (nt > 1)
        for (int h = 0; h < NH; h++) {
            int kh = h / group;
            // rows of head h in att: (i * NH + h) * T, i.e. a [N, T] view with row stride NH * T
            float *P = gc->att + (size_t)h * T;
            int ldp = NH * T;
            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, N, Tk, HS, scale, gc->q + (size_t)h * HS,
                        (int)qs, K + (size_t)kh * HS, (int)ks, 0.0f, P, ldp);
            for (int i = 0; i < N; i++) {
                float *a = P + (size_t)i * ldp;
                softmax_causal_row(a, n0 + i);
                for (int t2 = n0 + i + 1; t2 < Tk; t2++)
                    a[t2] = 0.0f;
            }
            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, N, HS, Tk, 1.0f, P, ldp,
                        Vc + (size_t)kh * HS, (int)ks, 0.0f, gc->atty + (size_t)h * HS, (int)qs);
        }
        op_blas_serial_end(prev);
        return;
    }
    int nt = (double)N * NH * (n0 + N) * HS < 65536.0 ? 1 : op_team();
#pragma omp parallel for collapse(2) num_threads(nt) schedule(static) if (nt > 1)
    for (int i = 0; i < N; i++)
        for (int h = 0; h < NH; h++) {
            int kh = h / group, t = n0 + i;
            const float *qt = gc->q + (size_t)i * qs + (size_t)h * HS;
            float *a = gc->att + ((size_t)i * NH + h) * T;
            // 1. scores
            for (int t2 = 0; t2 <= t; t2++)
                a[t2] = dot(qt, K + (size_t)t2 * ks + (size_t)kh * HS, HS) * scale;
            // 2. softmax
            softmax_causal_row(a, t);
            // 3. weighted sum of values
            float *o = gc->atty + (size_t)i * qs + (size_t)h * HS;
            for (int j = 0; j < HS; j++)
                o[j] = 0.0f;
            for (int t2 = 0; t2 <= t; t2++) {
                float w = a[t2];
                const float *vt = Vc + (size_t)t2 * ks + (size_t)kh * HS; // vectorizes: no reduction
                for (int j = 0; j < HS; j++)
                    o[j] += w * vt[j];
            }
        }
}

/* One chunk of N <= gc->chunk tokens, already validated. */
static void forward_chunk(struct gen_cache *gc, const struct model *m, const struct lora *lora,
                          const int32_t *tokens, int N, float *out_logits)
{
    const struct cfg *c = &m->cfg;
    int C = gc->C, F = gc->F, V = gc->V, Q = gc->Q, KV = gc->KV, HS = gc->HS;
    int n0 = gc->n;
    float eps = (float)c->rms_norm_eps, *wt = gc->wtile;
    size_t wn = gc->wtile_n;
    for (int i = 0; i < N; i++)
        gc->pos[i] = n0 + i;
    // 0. embedding (+ embedding adapter)
    float *x = gc->x;
    for (int i = 0; i < N; i++)
        op_mat_widen(x + (size_t)i * C, &m->w.embed, C, tokens[i], tokens[i] + 1, 0, C);
    if (lora && lora->embed_A) {
        int R = lora->embed_R;
        for (int i = 0; i < N; i++)
            for (int ch = 0; ch < C; ch++) {
                double s = 0;
                for (int r = 0; r < R; r++)
                    s += (double)lora->embed_B[(size_t)ch * R + r] * lora->embed_A[(size_t)r * V + tokens[i]];
                x[(size_t)i * C + ch] += lora->embed_scale * (float)s;
            }
    }
    for (int l = 0; l < gc->L; l++) {
        const struct model_layer *w = &m->w.layer[l];
        // 1. ln1
        op_rmsnorm_forward(gc->ln, NULL, x, w->ln1, N, C, eps);
        // 2. q, k, v (+ LoRA); k and v go straight into the cache
        float *kc = gc->k[l] + (size_t)n0 * KV, *vc = gc->v[l] + (size_t)n0 * KV;
        if (N == 1) { // one token: the three GEMVs in one pass of the threads
            float *o3[3] = { gc->q, kc, vc };
            const struct op_mat *w3[3] = { &w->wq, &w->wk, &w->wv };
            const float *b3[3] = { w->bq, w->bk, w->bv };
            int n3[3] = { Q, KV, KV };
            op_mat_gemv_many(3, o3, w3, b3, n3, gc->ln, C);
        } else {
            op_mat_forward(gc->q, gc->ln, &w->wq, w->bq, N, C, Q, wt, wn);
            op_mat_forward(kc, gc->ln, &w->wk, w->bk, N, C, KV, wt, wn);
            op_mat_forward(vc, gc->ln, &w->wv, w->bv, N, C, KV, wt, wn);
        }
        lora_linear(gc, lora, l, CFG_Q, gc->q, gc->ln, N);
        lora_linear(gc, lora, l, CFG_K, kc, gc->ln, N);
        lora_linear(gc, lora, l, CFG_V, vc, gc->ln, N);
        // 2b. Qwen3: RMSNorm over each head of q and k, in place (the cache keeps normed keys)
        if (c->qk_norm) {
            op_rmsnorm_forward(gc->q, NULL, gc->q, w->q_norm, N * gc->NH, HS, eps);
            op_rmsnorm_forward(kc, NULL, kc, w->k_norm, N * gc->NKV, HS, eps);
        }
        // 3. rope
        op_rope_forward(gc->q, gc->pos, m->inv_freq, N, gc->NH, HS);
        op_rope_forward(kc, gc->pos, m->inv_freq, N, gc->NKV, HS);
        // 4. attention over the cache
        cache_attention(gc, l, n0, N);
        // 5. x2 = x + o_proj(atty)
        op_mat_forward(gc->x2, gc->atty, &w->wo, w->bo, N, Q, C, wt, wn);
        lora_linear(gc, lora, l, CFG_O, gc->x2, gc->atty, N);
        op_add(gc->x2, x, (size_t)N * C);
        // 6. ln2
        op_rmsnorm_forward(gc->ln, NULL, gc->x2, w->ln2, N, C, eps);
        // 7. act = silu(gate) * up
        if (N == 1) {
            float *o2[2] = { gc->gate, gc->up };
            const struct op_mat *w2[2] = { &w->wgate, &w->wup };
            int n2[2] = { F, F };
            op_mat_gemv_many(2, o2, w2, NULL, n2, gc->ln, C);
        } else {
            op_mat_forward(gc->gate, gc->ln, &w->wgate, NULL, N, C, F, wt, wn);
            op_mat_forward(gc->up, gc->ln, &w->wup, NULL, N, C, F, wt, wn);
        }
        lora_linear(gc, lora, l, CFG_GATE, gc->gate, gc->ln, N);
        lora_linear(gc, lora, l, CFG_UP, gc->up, gc->ln, N);
        op_swiglu_forward(gc->act, gc->gate, gc->up, (size_t)N * F);
        // 8. x = x2 + down(act)
        op_mat_forward(x, gc->act, &w->wdown, NULL, N, F, C, wt, wn);
        lora_linear(gc, lora, l, CFG_DOWN, x, gc->act, N);
        op_add(x, gc->x2, (size_t)N * C);
    }
    // 9. final norm and lm_head: every row when asked, else the last one only
    gc->n = n0 + N;
    if (out_logits) {
        op_rmsnorm_forward(gc->lnf, NULL, x, m->w.norm, N, C, eps);
        op_mat_forward(out_logits, gc->lnf, &m->w.lm_head, NULL, N, C, V, wt, wn);
        memcpy(gc->logits, out_logits + (size_t)(N - 1) * V, sizeof(float) * (size_t)V);
    } else {
        op_rmsnorm_forward(gc->lnf, NULL, x + (size_t)(N - 1) * C, m->w.norm, 1, C, eps);
        op_mat_forward(gc->logits, gc->lnf, &m->w.lm_head, NULL, 1, C, V, wt, wn);
    }
}

int gen_forward(struct gen_cache *gc, const struct model *m, const struct lora *lora,
                const int32_t *tokens, int N, float *out_logits, struct lk_err *err)
{
    const struct cfg *c = &m->cfg;
    if (N <= 0)
        return lk_errf(err, LK_ERR_USAGE, "gen_forward: no token to run");
    if (c->num_hidden_layers != gc->L || c->vocab_size != gc->V || c->hidden_size != gc->C ||
        c->num_key_value_heads * c->head_dim != gc->KV)
        return lk_errf(err, LK_ERR_SHAPE, "the KV cache was sized for another model");
    if (N > gc->T_max - gc->n)
        return lk_errf(err, LK_ERR_USAGE, "the KV cache holds %d positions: %d used, %d more do not fit",
                       gc->T_max, gc->n, N);
    if (N > cfg_rope_positions(c) - gc->n)
        return lk_errf(err, LK_ERR_UNSUPPORTED, "position %d is beyond the %d positions where rope_scaling "
                       "'dynamic' keeps its frequencies (transformers rescales them there: not supported)",
                       gc->n + N - 1, cfg_rope_positions(c));
    if (lora) {
        if (lora->L != gc->L)
            return lk_errf(err, LK_ERR_SHAPE, "adapter has %d layers, model has %d", lora->L, gc->L);
        if (lora->mag_mem)
            return lk_errf(err, LK_ERR_UNSUPPORTED, "DoRA adapters cannot be run by the engine yet: "
                           "merge them into the base (lorakit merge) and run the merged model");
        if (lora_changes_weights(lora) && !lora->extras_applied)
            return lk_errf(err, LK_ERR_USAGE, "adapter changes whole weights: model_apply_extras first");
        if (gen_lora_max_rank(lora) > gc->R)
            return lk_errf(err, LK_ERR_USAGE, "the KV cache was sized for LoRA rank %d, the adapter has %d",
                           gc->R, gen_lora_max_rank(lora));
    }
    for (int i = 0; i < N; i++)
        if (tokens[i] < 0 || tokens[i] >= gc->V)
            return lk_errf(err, LK_ERR_USAGE, "token id %d at position %d is outside the vocabulary [0, %d)",
                           (int)tokens[i], gc->n + i, gc->V);
    if (m->w.dtype != TENSOR_F32 && !gc->wtile) { // widening tiles for the prefill's GEMMs
        int big = gc->C;
        int dims[] = { gc->F, gc->Q, gc->V };
        for (size_t i = 0; i < sizeof dims / sizeof dims[0]; i++)
            big = dims[i] > big ? dims[i] : big;
        size_t n = op_mat_scratch_floats(big, big, omp_get_max_threads());
        if (!(gc->wtile = lk_falloc(n, 1)))
            return lk_errf(err, LK_ERR_NOMEM, "out of memory: widening tiles of %zu MB", n * sizeof(float) >> 20);
        gc->wtile_n = n;
    }
    // BLAS single-threaded: the kernels share the threads themselves (ops.h)
    int prev = op_blas_serial_begin(2);
    for (int i = 0; i < N; i += gc->chunk) {
        int n = N - i < gc->chunk ? N - i : gc->chunk;
        forward_chunk(gc, m, lora, tokens + i, n, out_logits ? out_logits + (size_t)i * gc->V : NULL);
    }
    op_blas_serial_end(prev);
    return LK_OK;
}

// ---- sampling ----

int gen_sampler_init(struct gen_sampler *s, int V, double temperature, double top_p, uint64_t seed,
                     struct lk_err *err)
{
    memset(s, 0, sizeof *s);
    if (!(top_p > 0 && top_p <= 1))
        return lk_errf(err, LK_ERR_USAGE, "top-p %g is outside (0, 1]", top_p);
    if (!(temperature >= 0) || !isfinite(temperature))
        return lk_errf(err, LK_ERR_USAGE, "temperature %g must be >= 0", temperature);
    s->temperature = temperature;
    s->top_p = top_p;
    s->V = V;
    lk_rng_seed(&s->rng, seed);
    if (temperature > 0 && !(s->buf = lk_malloc(sizeof *s->buf * (size_t)V)))
        return lk_errf(err, LK_ERR_NOMEM, "out of memory");
    return LK_OK;
}

void gen_sampler_release(struct gen_sampler *s)
{
    if (!s)
        return;
    lk_free(s->buf);
    memset(s, 0, sizeof *s);
}

int gen_argmax(const float *x, int n)
{
    int best = 0;
    for (int i = 1; i < n; i++)
        if (x[i] > x[best])
            best = i;
    return best;
}

double gen_logprob(const float *logits, int V, int32_t id)
{
    double mx = logits[gen_argmax(logits, V)], sum = 0;
    for (int i = 0; i < V; i++)
        sum += exp((double)logits[i] - mx);
    return (double)logits[id] - mx - log(sum);
}

static int prob_desc(const void *a, const void *b)
{
    const struct gen_prob *x = a, *y = b;
    if (x->p != y->p)
        return x->p < y->p ? 1 : -1;
    return (x->id > y->id) - (x->id < y->id);
}

int32_t gen_sample(struct gen_sampler *s, const float *logits)
{
    int V = s->V;
    if (s->temperature <= 0 || !s->buf)
        return gen_argmax(logits, V);
    double mx = logits[gen_argmax(logits, V)], sum = 0;
    for (int i = 0; i < V; i++) {
        float e = (float)exp(((double)logits[i] - mx) / s->temperature);
        s->buf[i].p = e;
        s->buf[i].id = i;
        sum += e;
    }
    int n = V;
    double mass = sum;
    if (s->top_p < 1) {
        qsort(s->buf, (size_t)V, sizeof *s->buf, prob_desc);
        double acc = 0;
        for (n = 0; n < V;) {
            acc += s->buf[n++].p;
            if (acc >= s->top_p * sum)
                break;
        }
        mass = acc;
    }
    double r = (double)lk_rng_uniform(&s->rng) * mass, acc = 0;
    for (int i = 0; i < n; i++) {
        acc += s->buf[i].p;
        if (r < acc)
            return s->buf[i].id;
    }
    return s->buf[n - 1].id; // rounding: the last kept id
}

// ---- the loop ----

static int is_stop(const struct gen_opts *o, int32_t id)
{
    return (o->fmt && chat_is_stop(o->fmt, id)) || (o->eos >= 0 && id == o->eos);
}

/* The sampling loop shared by both paths: next() advances by one token and returns the new
 * logits (or NULL with err filled). */
struct gen_step {
    struct gen_cache *gc;
    struct model *m;            /* for the no-cache path (model_forward needs it writable) */
    const struct model *cm;
    const struct lora *lora;
    int *seq;                   /* no-cache: the whole sequence so far */
    int len;
};

static const float *step_next(struct gen_step *st, int32_t id, struct lk_err *err)
{
    if (st->seq) {
        st->seq[st->len++] = id;
        if (model_plan(st->m, 1, st->len, 0, err) ||
            model_forward(st->m, st->lora, st->seq, NULL, NULL, NULL, 0, NULL, err))
            return NULL;
        return model_logits(st->m) + (size_t)(st->len - 1) * st->m->cfg.vocab_size;
    }
    if (gen_forward(st->gc, st->cm, st->lora, &id, 1, NULL, err))
        return NULL;
    return st->gc->logits;
}

static int sample_loop(struct gen_step *st, const float *logits, const struct gen_opts *o, int V,
                       gen_token_fn on_token, void *ctx, struct tok_ids *out, int *out_stop,
                       struct lk_err *err)
{
    if (out_stop)
        *out_stop = 0;
    int nv = o->n_vocab > 0 && o->n_vocab < V ? o->n_vocab : V;
    struct gen_sampler s;
    int rc = gen_sampler_init(&s, nv, o->temperature, o->top_p, o->seed, err);
    for (int step = 0; !rc && step < o->max_new; step++) {
        if (lk_interrupted) {
            rc = lk_errf(err, LK_ERR_INTERRUPTED, "interrupted");
            break;
        }
        int32_t id = gen_sample(&s, logits);
        if (is_stop(o, id)) {
            if (out_stop)
                *out_stop = 1;
            break;
        }
        if (out && (rc = tok_ids_push(out, id, err)))
            break;
        if (on_token && (rc = on_token(ctx, id))) {
            if (rc == 1)
                rc = LK_OK;
            break;
        }
        if (step + 1 == o->max_new)
            break;
        if (!(logits = step_next(st, id, err)))
            rc = err->code ? err->code : LK_ERR_USAGE;
    }
    gen_sampler_release(&s);
    return rc;
}

int gen_continue(struct gen_cache *gc, const struct model *m, const struct lora *lora,
                 const float *logits, const struct gen_opts *o, gen_token_fn on_token, void *ctx,
                 struct tok_ids *out, int *out_stop, struct lk_err *err)
{
    if (o->max_new < 0)
        return lk_errf(err, LK_ERR_USAGE, "max-new %d is negative", o->max_new);
    if (o->max_new > 0 && gc->n + o->max_new - 1 > gc->T_max)
        return lk_errf(err, LK_ERR_USAGE, "%d new tokens after %d do not fit a cache of %d positions",
                       o->max_new, gc->n, gc->T_max);
    struct gen_step st = { gc, NULL, m, lora, NULL, 0 };
    return sample_loop(&st, logits, o, m->cfg.vocab_size, on_token, ctx, out, out_stop, err);
}

int gen_run(struct gen_cache *gc, struct model *m, const struct lora *lora, const int32_t *prompt,
            int n_prompt, const struct gen_opts *o, gen_token_fn on_token, void *ctx,
            struct tok_ids *out, int *out_stop, struct lk_err *err)
{
    if (out_stop)
        *out_stop = 0;
    if (n_prompt <= 0)
        return lk_errf(err, LK_ERR_USAGE, "empty prompt: nothing to continue");
    if (o->max_new < 0)
        return lk_errf(err, LK_ERR_USAGE, "max-new %d is negative", o->max_new);
    int cap = o->no_cache ? m->cfg.max_position_embeddings : gc->T_max;
    if (cap > 0 && n_prompt + o->max_new > cap)
        return lk_errf(err, LK_ERR_USAGE, "prompt of %d tokens + %d new tokens exceeds the %d positions "
                       "available (shorten the prompt or --max-new)", n_prompt, o->max_new, cap);
    int rc;
    if (!o->no_cache) {
        gen_cache_truncate(gc, 0);
        if ((rc = gen_forward(gc, m, lora, prompt, n_prompt, NULL, err)))
            return rc;
        return gen_continue(gc, m, lora, gc->logits, o, on_token, ctx, out, out_stop, err);
    }
    struct gen_step st = { NULL, m, m, lora, NULL, n_prompt };
    st.seq = lk_malloc(sizeof(int) * (size_t)(n_prompt + o->max_new + 1));
    if (!st.seq)
        return lk_errf(err, LK_ERR_NOMEM, "out of memory");
    for (int i = 0; i < n_prompt; i++)
        st.seq[i] = prompt[i];
    rc = model_plan(m, 1, n_prompt, 0, err);
    if (!rc)
        rc = model_forward(m, lora, st.seq, NULL, NULL, NULL, 0, NULL, err);
    if (!rc)
        rc = sample_loop(&st, model_logits(m) + (size_t)(n_prompt - 1) * m->cfg.vocab_size, o,
                         m->cfg.vocab_size, on_token, ctx, out, out_stop, err);
    lk_free(st.seq);
    return rc;
}

size_t gen_utf8_complete(const char *s, size_t n)
{
    // walk back over at most 3 continuation bytes to the last lead byte
    size_t i = n, back = 0;
    while (i > 0 && back < 4 && ((unsigned char)s[i - 1] & 0xC0) == 0x80) {
        i--;
        back++;
    }
    if (i == 0)
        return back ? n : 0; // only continuation bytes: invalid, let them through
    unsigned char lead = (unsigned char)s[i - 1];
    size_t need;
    if (lead < 0x80)
        return n;
    else if ((lead & 0xE0) == 0xC0)
        need = 1;
    else if ((lead & 0xF0) == 0xE0)
        need = 2;
    else if ((lead & 0xF8) == 0xF0)
        need = 3;
    else
        return n; // invalid lead byte: nothing to wait for
    return back >= need ? n : i - 1;
}
