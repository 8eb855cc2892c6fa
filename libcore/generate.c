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

/* Dot product in float: 8 AVX2 lanes and a plain tail (a plain float reduction does not vectorize
 * without -ffast-math). */
static float dot(const float *a, const float *b, int n)
{
    float s;
    for (int i = (int)op_dotf_simd(a, b, (size_t)n, &s); i < n; i++)
        s += a[i] * b[i];
    return s;
}

/* out[N, out] += s * (x A^T) B^T + s * bias_B, as model.c's lora_forward_linear (no dropout);
 * xa is scratch [N, R] */
static void lora_linear(float *xa, const struct lora *lora, int layer, int module, float *out, const float *x,
                        int N)
{
    int slot = lora ? lora->index[layer * CFG_N_MODULES + module] : -1;
    if (slot < 0)
        return;
    const struct lora_module *md = &lora->mod[slot];
    lora_mul(xa, x, md->A, N, md->in, md->R);
    lora_mul_acc(out, xa, md->B, md->scale, N, md->R, md->out);
    if (md->bias)
        for (int t = 0; t < N; t++)
            for (int o = 0; o < md->out; o++)
                out[(size_t)t * md->out + o] += md->scale * md->bias[o];
}

/* Attention of the N chunk tokens (positions n0..n0+N-1) over cache positions 0..n0+i, with
 * the arithmetic of op_attention_forward (float scores, double softmax sum). A prefill chunk
 * (N >= 8) is two GEMMs over the cache (scores, then P V) per group of query heads sharing a
 * key/value head (per head without grouped queries), on the threads; a single token runs the
 * plain loops on OpenMP threads. */
static void softmax_causal_row(float *a, int t)
{
    int n = t + 1;
    float mx = -INFINITY;
    for (int t2 = (int)op_max_simd(a, (size_t)n, &mx); t2 < n; t2++)
        mx = a[t2] > mx ? a[t2] : mx;
    // e^(a - mx) and the sum in double: AVX2 blocks, plain tails (as ops.c's softmax rows)
    for (int t2 = (int)op_sub_simd(a, a, mx, (size_t)n); t2 < n; t2++)
        a[t2] -= mx;
    for (int t2 = (int)op_exp_simd(a, a, (size_t)n); t2 < n; t2++)
        a[t2] = expf(a[t2]);
    double sum;
    for (int t2 = (int)op_sum_simd(a, (size_t)n, &sum); t2 < n; t2++)
        sum += a[t2];
    float inv = (float)(1.0 / sum);
    for (int t2 = (int)op_scale_simd(a, inv, (size_t)n); t2 < n; t2++)
        a[t2] *= inv;
}

/* What the attention of one chunk reads and writes: its queries and outputs (rows Q apart), the
 * layer's cached keys and values (rows KV apart) and scratch for its weights. */
struct att_chunk {
    const float *q;      /* [N, Q] after rope */
    float *atty;         /* [N, Q] */
    const float *K, *V;  /* [n0 + N, KV] */
    float *att;          /* scratch: (i * NH + h) * ld + t2 */
    size_t ld;           /* >= n0 + N */
    int n0, N;
};

/* Head h of chunk row i: scores over keys 0..n0+i, softmax, weighted sum of values. */
static void attend_row(const struct att_chunk *a, int i, int h, int NH, int group, int HS, int Q, int KV)
{
    float scale = 1.0f / sqrtf((float)HS);
    int kh = h / group, t = a->n0 + i;
    const float *qt = a->q + (size_t)i * Q + (size_t)h * HS;
    float *w = a->att + ((size_t)i * NH + h) * a->ld;
    // 1. scores
    for (int t2 = 0; t2 <= t; t2++)
        w[t2] = dot(qt, a->K + (size_t)t2 * KV + (size_t)kh * HS, HS) * scale;
    // 2. softmax
    softmax_causal_row(w, t);
    // 3. weighted sum of values
    float *o = a->atty + (size_t)i * Q + (size_t)h * HS;
    for (int j = 0; j < HS; j++)
        o[j] = 0.0f;
    for (int t2 = 0; t2 <= t; t2++) {
        float p = w[t2];
        const float *vt = a->V + (size_t)t2 * KV + (size_t)kh * HS;
        for (int j = (int)op_axpy_simd(o, p, vt, (size_t)HS); j < HS; j++)
            o[j] += p * vt[j];
    }
}

/* M query rows (row r: position n0 + r % N, r / N a head of the group) against the cache's Tk =
 * n0 + N keys: scores P = scale q K^T (rows ldp apart), each row's causal softmax with the keys
 * after its position zeroed, then out = P V. K and V rows are KV apart, q rows ldq, out rows ldo. */
static void attend_gemms(int M, int N, int n0, int HS, float scale, const float *q, int ldq, const float *K,
                         const float *V, int KV, float *P, int ldp, float *out, int ldo)
{
    int Tk = n0 + N;
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, M, Tk, HS, scale, q, ldq, K, KV, 0.0f, P, ldp);
    for (int r = 0; r < M; r++) {
        float *w = P + (size_t)r * ldp;
        softmax_causal_row(w, n0 + r % N);
        for (int t2 = n0 + r % N + 1; t2 < Tk; t2++)
            w[t2] = 0.0f;
    }
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, M, HS, Tk, 1.0f, P, ldp, V, KV, 0.0f, out, ldo);
}

/* A prefill chunk with the query heads that share a key/value head stacked: one GEMM of
 * [G N, HS] x [HS, Tk] for their scores and one of [G N, Tk] x [Tk, HS] for their outputs (rows
 * (h - h0) N + i) instead of G GEMMs of N rows (Qwen2.5-0.5B: 7 heads a group, so 448 rows
 * against 64). A task is a kv head, or half of one's heads when there is a single kv head: fixed
 * by the model's shape, never by the threads, so that every run gets the same sums. Returns 0
 * without memory for the stacked rows (the caller runs the heads one by one). */
static int attend_stacked(const struct att_chunk *a, int NH, int NKV, int HS)
{
    int group = NH / NKV, N = a->N, n0 = a->n0, Q = NH * HS, KV = NKV * HS, Tk = n0 + N;
    float *qs = lk_malloc(sizeof(float) * 2 * (size_t)N * Q);
    if (!qs)
        return 0;
    float *os = qs + (size_t)N * Q, scale = 1.0f / sqrtf((float)HS);
    int parts = NKV == 1 && group > 1 ? 2 : 1, ntask = NKV * parts;
    int nt = (double)N * Tk * HS * NH < 262144.0 ? 1 : op_team(), prev = op_blas_serial_begin(nt);
#pragma omp parallel for num_threads(nt) schedule(static) if (nt > 1)
    for (int task = 0; task < ntask; task++) {
        int kh = task / parts, p = task % parts;
        int h0 = kh * group + group * p / parts, h1 = kh * group + group * (p + 1) / parts, M = (h1 - h0) * N;
        float *qb = qs + (size_t)h0 * N * HS, *ob = os + (size_t)h0 * N * HS, *P = a->att + (size_t)h0 * N * a->ld;
        for (int h = h0; h < h1; h++)
            for (int i = 0; i < N; i++)
                memcpy(qb + ((size_t)(h - h0) * N + i) * HS, a->q + (size_t)i * Q + (size_t)h * HS,
                       sizeof(float) * (size_t)HS);
        attend_gemms(M, N, n0, HS, scale, qb, HS, a->K + (size_t)kh * HS, a->V + (size_t)kh * HS, KV, P,
                     (int)a->ld, ob, HS);
        for (int h = h0; h < h1; h++)
            for (int i = 0; i < N; i++)
                memcpy(a->atty + (size_t)i * Q + (size_t)h * HS, ob + ((size_t)(h - h0) * N + i) * HS,
                       sizeof(float) * (size_t)HS);
    }
    op_blas_serial_end(prev);
    lk_free(qs);
    return 1;
}

static void attend_chunk(const struct att_chunk *a, int NH, int NKV, int HS)
{
    int group = NH / NKV, N = a->N, n0 = a->n0, Q = NH * HS, KV = NKV * HS;
    float scale = 1.0f / sqrtf((float)HS);
    if (N >= 8 && group > 1 && attend_stacked(a, NH, NKV, HS))
        return;
    if (N >= 8) {
        int Tk = n0 + N; // keys and values 0..Tk-1
        int nt = (double)N * Tk * HS * NH < 262144.0 ? 1 : op_team(), prev = op_blas_serial_begin(nt);
#pragma omp parallel for num_threads(nt) schedule(static) if (nt > 1)
        for (int h = 0; h < NH; h++) {
            int kh = h / group;
            // rows of head h in att: (i * NH + h) * ld, i.e. a [N, ld] view with row stride NH * ld
            float *P = a->att + (size_t)h * a->ld;
            int ldp = NH * (int)a->ld;
            attend_gemms(N, N, n0, HS, scale, a->q + (size_t)h * HS, Q, a->K + (size_t)kh * HS,
                         a->V + (size_t)kh * HS, KV, P, ldp, a->atty + (size_t)h * HS, Q);
        }
        op_blas_serial_end(prev);
        return;
    }
    int nt = (double)N * NH * (n0 + N) * HS < 65536.0 ? 1 : op_team();
#pragma omp parallel for collapse(2) num_threads(nt) schedule(static) if (nt > 1)
    for (int i = 0; i < N; i++)
        for (int h = 0; h < NH; h++)
            attend_row(a, i, h, NH, group, HS, Q, KV);
}

static void cache_attention(struct gen_cache *gc, int l, int n0, int N)
{
    struct att_chunk a = { gc->q, gc->atty, gc->k[l], gc->v[l], gc->att, (size_t)gc->T_max, n0, N };
    attend_chunk(&a, gc->NH, gc->NKV, gc->HS);
}

/* x[N, C] += the embedding adapter's rows for tokens[N] (nothing without one). */
static void embed_lora(float *x, const struct lora *lora, const int32_t *tokens, int N, int C, int V)
{
    if (!lora || !lora->embed_A)
        return;
    int R = lora->embed_R;
    for (int i = 0; i < N; i++)
        for (int ch = 0; ch < C; ch++) {
            double s = 0;
            for (int r = 0; r < R; r++)
                s += (double)lora->embed_B[(size_t)ch * R + r] * lora->embed_A[(size_t)r * V + tokens[i]];
            x[(size_t)i * C + ch] += lora->embed_scale * (float)s;
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
    embed_lora(x, lora, tokens, N, C, V);
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
        lora_linear(gc->xa, lora, l, CFG_Q, gc->q, gc->ln, N);
        lora_linear(gc->xa, lora, l, CFG_K, kc, gc->ln, N);
        lora_linear(gc->xa, lora, l, CFG_V, vc, gc->ln, N);
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
        lora_linear(gc->xa, lora, l, CFG_O, gc->x2, gc->atty, N);
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
        lora_linear(gc->xa, lora, l, CFG_GATE, gc->gate, gc->ln, N);
        lora_linear(gc->xa, lora, l, CFG_UP, gc->up, gc->ln, N);
        op_swiglu_forward(gc->act, gc->gate, gc->up, (size_t)N * F);
        // 8. x = x2 + down(act)
        op_mat_forward(x, gc->act, &w->wdown, NULL, N, F, C, wt, wn);
        lora_linear(gc->xa, lora, l, CFG_DOWN, x, gc->act, N);
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

// ---- batches ----

/* The batched GEMMs go through OpenBLAS, whose regular kernels form each output's sum in an order
 * that depends on K alone, never on how many rows come along. Small products are another matter:
 * OpenBLAS (0.3.x, SMALL_MATRIX_OPT) sends those with M N <= 1200 or M N K <= 10^6 to kernels that
 * sum in another order. A row's result would then depend on the rows stacked with it in a step.
 * So a product whose rows are fewer than gemm_rows_min is run with zero rows added up to it (a
 * margin above both limits): a row gets the same bits whatever else is in the step (the base and
 * a copy of it, or one adapter under two names, score alike), and the extra rows cost little,
 * since only small products get them. */
#define GEN_SMALL_MN 4096
#define GEN_SMALL_MNK 4194304.0
#define GEN_TILE_FLOATS (1 << 20) /* a widened tile of a matrix: 4 MB, as ops_mat.c's */

static int gemm_rows_min(int n_min, int K)
{
    double m1 = GEN_SMALL_MN / n_min + 1, m2 = GEN_SMALL_MNK / ((double)n_min * K) + 1;
    return (int)(m1 > m2 ? m1 : m2);
}

/* Rows per tile of an [OC, IC] matrix, and the fewest rows a product with it gets. */
static int gemm_tile(int IC, int OC, int *rows_min)
{
    int rows = GEN_TILE_FLOATS / IC > 1 ? GEN_TILE_FLOATS / IC : 1;
    rows = rows < OC ? rows : OC;
    int last = OC - (OC - 1) / rows * rows;
    *rows_min = gemm_rows_min(last < rows ? last : rows, IC);
    return rows;
}


/* What the k-th row of a block of logits is for. */
struct lg_row {
    const struct gen_brun *run;
    int i;       /* token of the run */
};

/* Which logits a run wants: every token's of a chunk, their log-probabilities only (LG_STREAM),
 * every token's logits (LG_EVERY), or the last token's, as gen_forward without out_logits (and
 * every token of a one-token run: LG_LAST); -1: none. */
enum { LG_STREAM, LG_EVERY, LG_LAST };

static int lg_kind(const struct gen_brun *r)
{
    if (r->n > 1 && r->all_logits)
        return LG_EVERY;
    if (r->n > 1 && r->targets)
        return LG_STREAM;
    return r->logits || r->targets ? LG_LAST : -1;
}

/* Room for the streamed log-probabilities of nt threads: per thread a [kcap, tv] block of logits
 * and each row's running maximum and sum. */
static int batch_stream_reserve(struct gen_batch *b, int nt, struct lk_err *err)
{
    if (nt <= b->lp_nt)
        return LK_OK;
    lk_free(b->lpt);
    lk_free(b->lpm);
    b->lp_nt = 0;
    b->lpt = lk_falloc((size_t)nt * b->kcap, (size_t)b->tv);
    b->lpm = lk_malloc(sizeof(double) * 2 * (size_t)nt * b->rows_max + sizeof(float) * (size_t)b->rows_max);
    if (!b->lpt || !b->lpm)
        return lk_errf(err, LK_ERR_NOMEM, "out of memory: logits of %d tokens", b->rows_max);
    b->lp_nt = nt;
    return LK_OK;
}


int gen_seq_reserve(struct gen_seq *s, const struct cfg *c, int positions, struct lk_err *err)
{
    int L = c->num_hidden_layers, KV = c->num_key_value_heads * c->head_dim;
    if (s->kv && (s->L != L || s->KV != KV))
        return lk_errf(err, LK_ERR_SHAPE, "the sequence's cache was sized for another model");
    if (positions <= s->cap)
        return LK_OK;
    size_t per = (size_t)2 * L * KV;
    float *kv = lk_falloc(per, (size_t)positions);
    if (!kv)
        return lk_errf(err, LK_ERR_NOMEM, "out of memory: a KV cache of %d positions x %d layers needs %zu MB",
                       positions, L, per * (size_t)positions * sizeof(float) >> 20);
    // block j (layer j / 2, keys or values) keeps its first n positions
    for (int j = 0; s->kv && j < 2 * L; j++)
        memcpy(kv + (size_t)j * positions * KV, s->kv + (size_t)j * s->cap * KV, sizeof(float) * (size_t)s->n * KV);
    lk_free(s->kv);
    s->kv = kv;
    s->cap = positions;
    s->L = L;
    s->KV = KV;
    return LK_OK;
}

void gen_seq_release(struct gen_seq *s)
{
    if (!s)
        return;
    lk_free(s->kv);
    memset(s, 0, sizeof *s);
}

static float *seq_k(const struct gen_seq *s, int l)
{
    return s->kv + (size_t)2 * l * s->cap * s->KV;
}

static float *seq_v(const struct gen_seq *s, int l)
{
    return s->kv + ((size_t)2 * l + 1) * s->cap * s->KV;
}

/* Carves the activations; with base NULL only counts. */
static size_t batch_layout(struct gen_batch *b, float *base)
{
    size_t off = 0, n = (size_t)b->rows_max, lr = GEN_LOGIT_ROWS;
#define TAKE(k) (base ? base + (off += (k), off - (k)) : (off += (k), (float *)NULL))
    b->x = TAKE(n * b->C);
    b->ln = TAKE(n * b->C);
    b->q = TAKE(n * b->Q);
    b->kn = TAKE(n * b->KV);
    b->vn = TAKE(n * b->KV);
    b->atty = TAKE(n * b->Q);
    b->x2 = TAKE(n * b->C);
    b->gate = TAKE(n * b->F);
    b->up = TAKE(n * b->F);
    b->act = TAKE(n * b->F);
    b->xa = TAKE(n * (size_t)(b->R > 0 ? b->R : 1));
    b->lnf = TAKE(n * b->C);
    b->lg = TAKE(lr * b->V);
#undef TAKE
    return off;
}

int gen_batch_init(struct gen_batch *b, const struct cfg *c, int rows_max, int max_rank, struct lk_err *err)
{
    memset(b, 0, sizeof *b);
    if (rows_max <= 0 || max_rank < 0)
        return lk_errf(err, LK_ERR_USAGE, "a batch of %d tokens per step: must be positive", rows_max);
    b->L = c->num_hidden_layers;
    b->C = c->hidden_size;
    b->F = c->intermediate_size;
    b->V = c->vocab_size;
    b->NH = c->num_attention_heads;
    b->NKV = c->num_key_value_heads;
    b->HS = c->head_dim;
    b->Q = b->NH * b->HS;
    b->KV = b->NKV * b->HS;
    b->R = max_rank;
    b->rows_max = rows_max;
    size_t n = batch_layout(b, NULL);
    b->mem = lk_falloc(n, 1);
    b->pos = lk_calloc((size_t)rows_max * 3, sizeof(int));
    b->aoff = lk_calloc((size_t)rows_max, sizeof(size_t));
    b->who = lk_calloc((size_t)rows_max, sizeof *b->who);
    if (!b->mem || !b->pos || !b->aoff || !b->who) {
        gen_batch_release(b);
        return lk_errf(err, LK_ERR_NOMEM, "out of memory: activations of a batch of %d tokens need %zu MB", rows_max,
                       n * sizeof(float) >> 20);
    }
    b->n0 = b->pos + rows_max;
    b->row = b->n0 + rows_max;
    batch_layout(b, b->mem);
    // the padded products: the largest [rows, IC + OC] any of the model's matrices may need (a
    // product of fewer than mr rows is padded to mr, whatever rows_max is)
    int dims[5][2] = { { b->C, b->Q }, { b->C, b->KV }, { b->Q, b->C }, { b->C, b->F }, { b->F, b->C } };
    size_t pad = 0;
    for (int i = 0; i < 5; i++) {
        int mr;
        gemm_tile(dims[i][0], dims[i][1], &mr);
        size_t need = (size_t)mr * (size_t)(dims[i][0] + dims[i][1]);
        pad = need > pad ? need : pad;
    }
    // the streamed log-probabilities: tiles of tv vocabulary rows, kcap rows at least
    b->tv = b->V < GEN_STREAM_ROWS ? b->V : GEN_STREAM_ROWS;
    b->tv = b->tv < GEN_TILE_FLOATS / b->C ? b->tv : (GEN_TILE_FLOATS / b->C > 0 ? GEN_TILE_FLOATS / b->C : 1);
    if (b->tv > 16 && b->tv < b->V)
        b->tv &= ~15; // whole AMX tiles (ops_amx.c) when V is a multiple of 16
    int last = b->V - (b->V - 1) / b->tv * b->tv, kmin = gemm_rows_min(last < b->tv ? last : b->tv, b->C);
    b->kcap = kmin > rows_max ? kmin : rows_max;
    pad = (size_t)b->kcap * b->C > pad ? (size_t)b->kcap * b->C : pad;
    b->pad_n = pad;
    if (pad && !(b->pad = lk_falloc(pad, 1))) {
        gen_batch_release(b);
        return lk_errf(err, LK_ERR_NOMEM, "out of memory");
    }
    return LK_OK;
}

void gen_batch_release(struct gen_batch *b)
{
    if (!b)
        return;
    lk_free(b->mem);
    lk_free(b->pos);
    lk_free(b->aoff);
    lk_free(b->who);
    lk_free(b->pad);
    lk_free(b->lpt);
    lk_free(b->lpm);
    lk_free(b->att);
    lk_free(b->wtile);
    memset(b, 0, sizeof *b);
}

/* The checks of gen_forward for one run at first position n0 (the sequence's positions filled
 * before the step plus its earlier runs in this step). */
static int brun_check(const struct gen_batch *b, const struct model *m, const struct gen_brun *r, int n0,
                      struct lk_err *err)
{
    const struct cfg *c = &m->cfg;
    if (r->n <= 0 || !r->seq || !r->tokens)
        return lk_errf(err, LK_ERR_USAGE, "gen_batch_forward: a run without tokens");
    if ((r->targets && !r->lp) || (r->seq->kv && (r->seq->L != b->L || r->seq->KV != b->KV)))
        return lk_errf(err, LK_ERR_USAGE, "gen_batch_forward: a run with targets and no lp, or a cache of another model");
    if (r->n > r->seq->cap - n0)
        return lk_errf(err, LK_ERR_USAGE, "the KV cache holds %d positions: %d used, %d more do not fit", r->seq->cap,
                       n0, r->n);
    if (r->n > cfg_rope_positions(c) - n0)
        return lk_errf(err, LK_ERR_UNSUPPORTED, "position %d is beyond the %d positions where rope_scaling "
                       "'dynamic' keeps its frequencies (transformers rescales them there: not supported)",
                       n0 + r->n - 1, cfg_rope_positions(c));
    const struct lora *lora = r->lora;
    if (lora) {
        if (lora->L != b->L)
            return lk_errf(err, LK_ERR_SHAPE, "adapter has %d layers, model has %d", lora->L, b->L);
        if (lora->mag_mem)
            return lk_errf(err, LK_ERR_UNSUPPORTED, "DoRA adapters cannot be run by the engine yet: "
                           "merge them into the base (lorakit merge) and run the merged model");
        if (lora_changes_weights(lora) && !lora->extras_applied)
            return lk_errf(err, LK_ERR_USAGE, "adapter changes whole weights: model_apply_extras first");
        if (gen_lora_max_rank(lora) > b->R)
            return lk_errf(err, LK_ERR_USAGE, "the batch was sized for LoRA rank %d, the adapter has %d", b->R,
                           gen_lora_max_rank(lora));
    }
    for (int i = 0; i < r->n; i++)
        if (r->tokens[i] < 0 || r->tokens[i] >= b->V)
            return lk_errf(err, LK_ERR_USAGE, "token id %d at position %d is outside the vocabulary [0, %d)",
                           (int)r->tokens[i], n0 + i, b->V);
    return LK_OK;
}

/* Attention scratch for the step: the largest chunk's [n, NH, n0 + n] (chunks of n >= 2, one
 * after the other) or all the one-token runs' [NH, n0 + 1] side by side (run j's at aoff[j]). */
static int batch_att_reserve(struct gen_batch *b, const struct gen_brun *runs, int n_runs, struct lk_err *err)
{
    size_t big = 0, ones = 0;
    for (int j = 0; j < n_runs; j++) {
        size_t Tk = (size_t)b->n0[j] + runs[j].n, need = (size_t)runs[j].n * b->NH * Tk;
        b->aoff[j] = ones;
        if (runs[j].n == 1)
            ones += need;
        else if (need > big)
            big = need;
    }
    size_t need = big > ones ? big : ones;
    if (need <= b->att_n)
        return LK_OK;
    lk_free(b->att);
    b->att_n = 0;
    if (!(b->att = lk_falloc(need, 1)))
        return lk_errf(err, LK_ERR_NOMEM, "out of memory: attention weights of %zu MB", need * sizeof(float) >> 20);
    b->att_n = need;
    return LK_OK;
}

/* Validates the step, fills n0 (first position) and row (first row: the runs of n >= 2 first, in
 * order, then the one-token runs) per run, pos per row; returns the rows of the first group in
 * *out_ra and all rows in *out_rows. */
static int batch_plan(struct gen_batch *b, const struct model *m, const struct gen_brun *runs, int n_runs,
                      int *out_ra, int *out_rows, struct lk_err *err)
{
    const struct cfg *c = &m->cfg;
    if (c->num_hidden_layers != b->L || c->vocab_size != b->V || c->hidden_size != b->C ||
        c->num_key_value_heads * c->head_dim != b->KV || c->intermediate_size != b->F)
        return lk_errf(err, LK_ERR_SHAPE, "the batch was sized for another model");
    if (n_runs > b->rows_max)
        return lk_errf(err, LK_ERR_USAGE, "%d runs in a batch of %d tokens", n_runs, b->rows_max);
    long rows = 0, ra = 0;
    for (int j = 0; j < n_runs; j++) {
        int n0 = runs[j].seq ? runs[j].seq->n : 0, rc;
        for (int i = 0; i < j; i++)
            if (runs[i].seq == runs[j].seq)
                n0 += runs[i].n;
        if ((rc = brun_check(b, m, &runs[j], n0, err)))
            return rc;
        b->n0[j] = n0;
        rows += runs[j].n;
        ra += runs[j].n > 1 ? runs[j].n : 0;
    }
    if (rows > b->rows_max)
        return lk_errf(err, LK_ERR_USAGE, "a step of %ld tokens in a batch of %d", rows, b->rows_max);
    int ga = 0, gb = (int)ra;
    for (int j = 0; j < n_runs; j++) {
        int *at = runs[j].n > 1 ? &ga : &gb;
        b->row[j] = *at;
        for (int i = 0; i < runs[j].n; i++)
            b->pos[*at + i] = b->n0[j] + i;
        *at += runs[j].n;
    }
    *out_ra = (int)ra;
    *out_rows = (int)rows;
    if (m->w.dtype != TENSOR_F32 && !b->wtile) { // widening tiles for the GEMMs
        int big = b->C, dims[] = { b->F, b->Q, b->V };
        for (size_t i = 0; i < sizeof dims / sizeof dims[0]; i++)
            big = dims[i] > big ? dims[i] : big;
        size_t n = op_mat_scratch_floats(big, big, omp_get_max_threads());
        if (!(b->wtile = lk_falloc(n, 1)))
            return lk_errf(err, LK_ERR_NOMEM, "out of memory: widening tiles of %zu MB", n * sizeof(float) >> 20);
        b->wtile_n = n;
    }
    int stream = 0;
    for (int j = 0; j < n_runs; j++)
        stream |= lg_kind(&runs[j]) == LG_STREAM;
    int rc = stream ? batch_stream_reserve(b, op_team(), err) : LK_OK;
    return rc ? rc : batch_att_reserve(b, runs, n_runs, err);
}

/* out[M, OC] = in[M, IC] @ w^T + bias, a row's sums independent of the other rows: the matrix in
 * fixed tiles (widened, or viewed in place), one sgemm per tile over all the rows, the rows padded
 * to gemm_rows_min (see above). */
static void batch_gemm(struct gen_batch *b, float *out, const float *in, const struct op_mat *w, const float *bias,
                       int M, int IC, int OC)
{
    if (op_amx_forward(out, in, w, bias, M, IC, OC))
        return;
    int mr, rows = gemm_tile(IC, OC, &mr), ntiles = (OC + rows - 1) / rows, Mp = M, ldo = OC;
    const float *A = in;
    float *Cm = out;
    if (M < mr) { // zero rows added: inputs then outputs in the pad buffer
        Mp = mr;
        float *pin = b->pad, *pout = b->pad + (size_t)Mp * IC;
        LK_ASSERT((size_t)Mp * (IC + OC) <= b->pad_n);
        memcpy(pin, in, sizeof(float) * (size_t)M * IC);
        memset(pin + (size_t)M * IC, 0, sizeof(float) * (size_t)(Mp - M) * IC);
        A = pin;
        Cm = pout;
    }
    int nt = (double)Mp * IC * OC < 262144.0 ? 1 : op_team();
    size_t per = (size_t)rows * IC;
    if (w->dtype != TENSOR_F32 && (size_t)nt * per > b->wtile_n)
        nt = (int)(b->wtile_n / per);
    nt = nt < ntiles ? nt : ntiles;
#pragma omp parallel for num_threads(nt) schedule(static) if (nt > 1)
    for (int k = 0; k < ntiles; k++) {
        int o0 = k * rows, o1 = o0 + rows < OC ? o0 + rows : OC;
        const float *wt = w->f + (size_t)o0 * IC;
        if (w->dtype != TENSOR_F32) {
            float *buf = b->wtile + (size_t)omp_get_thread_num() * per;
            op_mat_widen(buf, w, IC, o0, o1, 0, IC);
            wt = buf;
        }
        if (bias)
            for (int n = 0; n < Mp; n++)
                memcpy(Cm + (size_t)n * ldo + o0, bias + o0, sizeof(float) * (size_t)(o1 - o0));
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, Mp, o1 - o0, IC, 1.0f, A, IC, wt, IC, bias ? 1.0f : 0.0f,
                    Cm + o0, ldo);
    }
    if (Cm != out)
        memcpy(out, Cm, sizeof(float) * (size_t)M * OC);
}

/* nw products of the same input (q, k, v; gate, up; o; down) for every row: the rows [0, ra) of
 * the chunks one GEMM per matrix, the one-token rows [ra, rows) one batched GEMV of the nw
 * products together (as gen_forward runs one token). */
static void batch_proj(struct gen_batch *b, int nw, float *const *out, const struct op_mat *const *w,
                       const float *const *bias, const int *OC, const float *in, int IC, int ra, int rows)
{
    // AMX (ops.h): the chunks' rows in one product per matrix, the input packed once for the nw
    // matrices; the one-token rows among them while eval runs (op_amx_gemv: a row's sums there
    // are those it gets alone), so that the step reads the weights once
    int n_amx = op_amx_gemv ? rows : ra;
    if (n_amx > 0 && op_amx_many(nw, out, w, bias, OC, in, IC, n_amx))
        ra = n_amx;
    else
        for (int k = 0; ra > 0 && k < nw; k++)
            batch_gemm(b, out[k], in, w[k], bias ? bias[k] : NULL, ra, IC, OC[k]);
    if (rows > ra) {
        float *o[3];
        for (int k = 0; k < nw; k++)
            o[k] = out[k] + (size_t)ra * OC[k];
        op_mat_gemv_batch(nw, o, w, bias, OC, in + (size_t)ra * IC, IC, rows - ra);
    }
}

/* The adapter of each run on its rows: out[rows, OC] += LoRA(module)(in[rows, IC]). */
static void batch_lora(struct gen_batch *b, const struct gen_brun *runs, int n_runs, int l, int module, float *out,
                       int OC, const float *in, int IC)
{
    // the runs on the threads (each computes as gen_forward would, in its own rows of xa)
    int any = 0, R = b->R > 0 ? b->R : 1;
    for (int j = 0; j < n_runs; j++)
        any += runs[j].lora != NULL;
    int nt = any > 1 ? op_team() : 1;
#pragma omp parallel for num_threads(nt) schedule(dynamic, 1) if (nt > 1)
    for (int j = 0; j < n_runs; j++)
        lora_linear(b->xa + (size_t)b->row[j] * R, runs[j].lora, l, module, out + (size_t)b->row[j] * OC,
                    in + (size_t)b->row[j] * IC, runs[j].n);
}

/* Attention of every run over its sequence's cache: the chunks one after the other, each on the
 * threads as gen_forward runs it; the one-token runs together, (run, head) pairs on the threads. */
static void batch_attention(struct gen_batch *b, const struct gen_brun *runs, int n_runs, int l)
{
    int NH = b->NH, Q = b->Q;
    for (int j = 0; j < n_runs; j++) {
        if (runs[j].n == 1)
            continue;
        int r0 = b->row[j];
        struct att_chunk a = { b->q + (size_t)r0 * Q, b->atty + (size_t)r0 * Q, seq_k(runs[j].seq, l),
                               seq_v(runs[j].seq, l), b->att, (size_t)b->n0[j] + runs[j].n, b->n0[j], runs[j].n };
        attend_chunk(&a, NH, b->NKV, b->HS);
    }
    // one-token runs: run j's weights at b->att + offs, NH rows of n0 + 1
    int n1 = 0;
    for (int j = 0; j < n_runs; j++)
        n1 += runs[j].n == 1;
    if (!n1)
        return;
    double work = 0;
    for (int j = 0; j < n_runs; j++)
        if (runs[j].n == 1)
            work += (double)NH * (b->n0[j] + 1) * b->HS;
    int nt = work < 65536.0 ? 1 : op_team();
#pragma omp parallel for num_threads(nt) schedule(dynamic, 1) if (nt > 1)
    for (int jh = 0; jh < n_runs * NH; jh++) {
        int j = jh / NH, h = jh % NH;
        if (runs[j].n != 1)
            continue;
        int r0 = b->row[j];
        struct att_chunk a = { b->q + (size_t)r0 * Q, b->atty + (size_t)r0 * Q, seq_k(runs[j].seq, l),
                               seq_v(runs[j].seq, l), b->att + b->aoff[j], (size_t)b->n0[j] + 1, b->n0[j], 1 };
        attend_row(&a, 0, h, NH, NH / b->NKV, b->HS, Q, b->KV);
    }
}

/* Layer l for every row of the step (the steps of forward_chunk, per run where they must be). */
static void batch_layer(struct gen_batch *b, const struct model *m, const struct gen_brun *runs, int n_runs, int l,
                        int ra, int rows)
{
    const struct cfg *c = &m->cfg;
    const struct model_layer *w = &m->w.layer[l];
    int C = b->C, F = b->F, Q = b->Q, KV = b->KV, HS = b->HS;
    float eps = (float)c->rms_norm_eps;
    // 1. ln1
    op_rmsnorm_forward(b->ln, NULL, b->x, w->ln1, rows, C, eps);
    // 2. q, k, v (+ LoRA)
    float *o3[3] = { b->q, b->kn, b->vn };
    const struct op_mat *w3[3] = { &w->wq, &w->wk, &w->wv };
    const float *b3[3] = { w->bq, w->bk, w->bv };
    int n3[3] = { Q, KV, KV };
    batch_proj(b, 3, o3, w3, b3, n3, b->ln, C, ra, rows);
    batch_lora(b, runs, n_runs, l, CFG_Q, b->q, Q, b->ln, C);
    batch_lora(b, runs, n_runs, l, CFG_K, b->kn, KV, b->ln, C);
    batch_lora(b, runs, n_runs, l, CFG_V, b->vn, KV, b->ln, C);
    // 2b. Qwen3: RMSNorm over each head of q and k
    if (c->qk_norm) {
        op_rmsnorm_forward(b->q, NULL, b->q, w->q_norm, rows * b->NH, HS, eps);
        op_rmsnorm_forward(b->kn, NULL, b->kn, w->k_norm, rows * b->NKV, HS, eps);
    }
    // 3. rope, then the keys and values into each sequence's cache
    op_rope_forward(b->q, b->pos, m->inv_freq, rows, b->NH, HS);
    op_rope_forward(b->kn, b->pos, m->inv_freq, rows, b->NKV, HS);
    for (int j = 0; j < n_runs; j++) {
        size_t at = (size_t)b->n0[j] * KV, from = (size_t)b->row[j] * KV, n = (size_t)runs[j].n * KV;
        memcpy(seq_k(runs[j].seq, l) + at, b->kn + from, sizeof(float) * n);
        memcpy(seq_v(runs[j].seq, l) + at, b->vn + from, sizeof(float) * n);
    }
    // 4. attention over each cache
    batch_attention(b, runs, n_runs, l);
    // 5. x2 = x + o_proj(atty)
    float *o1[1] = { b->x2 };
    const struct op_mat *w1[1] = { &w->wo };
    const float *bo[1] = { w->bo }; // Llama with attention_bias: o_proj has one too
    int n1[1] = { C };
    batch_proj(b, 1, o1, w1, bo, n1, b->atty, Q, ra, rows);
    batch_lora(b, runs, n_runs, l, CFG_O, b->x2, C, b->atty, Q);
    op_add(b->x2, b->x, (size_t)rows * C);
    // 6. ln2
    op_rmsnorm_forward(b->ln, NULL, b->x2, w->ln2, rows, C, eps);
    // 7. act = silu(gate) * up, per run (the exp's vector blocks and tail fall where they fall for
    // the run alone)
    float *o2[2] = { b->gate, b->up };
    const struct op_mat *w2[2] = { &w->wgate, &w->wup };
    int n2[2] = { F, F };
    batch_proj(b, 2, o2, w2, NULL, n2, b->ln, C, ra, rows);
    batch_lora(b, runs, n_runs, l, CFG_GATE, b->gate, F, b->ln, C);
    batch_lora(b, runs, n_runs, l, CFG_UP, b->up, F, b->ln, C);
    for (int j = 0; j < n_runs; j++) {
        size_t at = (size_t)b->row[j] * F;
        op_swiglu_forward(b->act + at, b->gate + at, b->up + at, (size_t)runs[j].n * F);
    }
    // 8. x = x2 + down(act)
    o1[0] = b->x;
    w1[0] = &w->wdown;
    batch_proj(b, 1, o1, w1, NULL, n1, b->act, F, ra, rows);
    batch_lora(b, runs, n_runs, l, CFG_DOWN, b->x, C, b->act, F);
    op_add(b->x, b->x2, (size_t)rows * C);
}

/* A block of k rows whose final-norm outputs are in lnf: their logits in lg (a GEMM over the rows
 * of chunks, k >= 2, or the one-token GEMV batch), then each row's log-probability or copy. */
static void batch_logits_block(struct gen_batch *b, const struct model *m, const struct lg_row *who, int k, int gemm)
{
    int V = b->V;
    if (gemm) {
        LK_ASSERT(k >= 2);
        op_mat_forward(b->lg, b->lnf, &m->w.lm_head, NULL, k, b->C, V, b->wtile, b->wtile_n);
    } else {
        float *o[1] = { b->lg };
        const struct op_mat *w[1] = { &m->w.lm_head };
        op_mat_gemv_batch(1, o, w, NULL, &V, b->lnf, b->C, k);
    }
    int nt = k > 1 ? op_team() : 1;
#pragma omp parallel for num_threads(nt) schedule(static) if (nt > 1)
    for (int r = 0; r < k; r++) {
        const struct gen_brun *run = who[r].run;
        const float *row = b->lg + (size_t)r * V;
        if (run->targets)
            run->lp[who[r].i] = gen_logprob(row, V, run->targets[who[r].i]);
        if (run->logits)
            memcpy(run->logits + (run->all_logits ? (size_t)who[r].i * V : 0), row, sizeof(float) * (size_t)V);
    }
}

/* Each thread's share of the streamed log-probabilities: tiles t, t + nt, ... of tv vocabulary rows,
 * each widened once (into buf) for the k rows and multiplied by one GEMM (or, with the rows packed
 * in pk, multiplied on the AMX tile unit), then every row's maximum M and sum S of e^(l - M)
 * updated (S rescaled when M grows). */
static void stream_tiles(struct gen_batch *b, const struct op_mat *w, const struct lg_row *who, const float *A,
                         const uint16_t *pk, int k, int kp, int t, int nt, float *buf, double *M, double *S, float *tl)
{
    int V = b->V, C = b->C, tv = b->tv;
    float *out = b->lpt + (size_t)t * b->kcap * tv;
    for (int r = 0; r < k; r++) {
        M[r] = -INFINITY;
        S[r] = 0;
    }
    for (int v0 = t * tv; v0 < V; v0 += nt * tv) {
        int n = V - v0 < tv ? V - v0 : tv;
        if (pk) {
            op_amx_rows(out, (size_t)n, pk, k, w, C, v0, v0 + n, NULL);
        } else {
            const float *wt = w->f + (size_t)v0 * C;
            if (w->dtype != TENSOR_F32) {
                op_mat_widen(buf, w, C, v0, v0 + n, 0, C);
                wt = buf;
            }
            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, kp, n, C, 1.0f, A, C, wt, C, 0.0f, out, n);
        }
        for (int r = 0; r < k; r++) {
            const float *row = out + (size_t)r * n;
            double mt = op_max(row, (size_t)n);
            if (mt > M[r]) {
                S[r] *= exp(M[r] - mt);
                M[r] = mt;
            }
            S[r] += op_sum_exp(row, (size_t)n, M[r]);
            int id = who[r].run->targets[who[r].i];
            if (id >= v0 && id < v0 + n)
                tl[r] = row[id - v0];
        }
    }
}

/* The log-probabilities of the targets of k rows (final-norm outputs in lnf), without keeping
 * their logits: the lm_head in tiles, each widened once for all the rows (a block of logits rows
 * would widen the whole lm_head once per block). The logits are the GEMM's over the rows; log p =
 * l[target] - max - log(sum of e^(l - max)), as gen_logprob computes it, the sum formed in another
 * order (and merged over the threads): equal to double rounding. */
static void batch_stream(struct gen_batch *b, const struct model *m, const struct lg_row *who, int k)
{
    const struct op_mat *w = &m->w.lm_head;
    int C = b->C, tv = b->tv, ntiles = (b->V + tv - 1) / tv, nt = b->lp_nt < ntiles ? b->lp_nt : ntiles;
    size_t per = (size_t)tv * C;
    if (w->dtype != TENSOR_F32 && (size_t)nt * per > b->wtile_n)
        nt = (int)(b->wtile_n / per);
    // rows padded as batch_gemm pads them (the last tile is the narrowest)
    int last = b->V - (ntiles - 1) * tv, kp = gemm_rows_min(last < tv ? last : tv, C);
    const float *A = b->lnf;
    // AMX: the rows packed once for every tile (tiles of tv rows, a multiple of 16, as V must be)
    uint16_t *pk = tv % 16 == 0 && op_amx_fits(w, C, b->V) ? lk_malloc(op_amx_pack_size(k, C)) : NULL;
    if (pk) {
        op_amx_pack(pk, b->lnf, (size_t)C, k, C, nt);
        kp = k;
    } else if (kp > k) {
        LK_ASSERT(kp <= b->kcap && (size_t)kp * C <= b->pad_n);
        memcpy(b->pad, b->lnf, sizeof(float) * (size_t)k * C);
        memset(b->pad + (size_t)k * C, 0, sizeof(float) * (size_t)(kp - k) * C);
        A = b->pad;
    } else {
        kp = k;
    }
    double *M = b->lpm, *S = M + (size_t)b->lp_nt * b->rows_max;
    float *tl = (float *)(S + (size_t)b->lp_nt * b->rows_max);
#pragma omp parallel num_threads(nt) if (nt > 1)
    {
        int t = omp_get_thread_num();
        stream_tiles(b, w, who, A, pk, k, kp, t, omp_get_num_threads(), b->wtile + (size_t)t * per,
                     M + (size_t)t * b->rows_max, S + (size_t)t * b->rows_max, tl);
    }
    for (int r = 0; r < k; r++) { // merge the threads' sums, in thread order
        double mx = M[r], sum = 0;
        for (int t = 1; t < nt; t++)
            mx = M[(size_t)t * b->rows_max + r] > mx ? M[(size_t)t * b->rows_max + r] : mx;
        for (int t = 0; t < nt; t++)
            sum += S[(size_t)t * b->rows_max + r] * exp(M[(size_t)t * b->rows_max + r] - mx);
        who[r].run->lp[who[r].i] = (double)tl[r] - mx - log(sum);
    }
    lk_free(pk);
}

/* The logits asked for: the chunks' log-probabilities streamed (all their rows at once), the
 * chunks' every-token logits in GEMM blocks (as gen_forward computes a chunk's), then the last
 * token of the other runs that want logits and every one-token run (GEMVs, as gen_forward
 * computes a last token's). lg_rows is room for rows_max entries. */
static void batch_logits(struct gen_batch *b, const struct model *m, const struct gen_brun *runs, int n_runs,
                         struct lg_row *who)
{
    float eps = (float)m->cfg.rms_norm_eps;
    for (int kind = LG_STREAM; kind <= LG_LAST; kind++) {
        long total = 0, done = 0;
        for (int j = 0; j < n_runs; j++)
            if (lg_kind(&runs[j]) == kind)
                total += kind == LG_LAST ? 1 : runs[j].n;
        int k = 0, want = kind == LG_STREAM ? (int)total : 0;
        for (int j = 0; j < n_runs && total > 0; j++) {
            if (lg_kind(&runs[j]) != kind)
                continue;
            for (int i = kind == LG_LAST ? runs[j].n - 1 : 0; i < runs[j].n; i++) {
                if (k == 0 && kind != LG_STREAM) { // the next block: never one row for a GEMM
                    long left = total - done;
                    want = left < GEN_LOGIT_ROWS ? (int)left : GEN_LOGIT_ROWS;
                    if (kind == LG_EVERY && left - want == 1)
                        want--;
                }
                op_rmsnorm_forward(b->lnf + (size_t)k * b->C, NULL, b->x + ((size_t)b->row[j] + i) * b->C, m->w.norm,
                                   1, b->C, eps);
                who[k].run = &runs[j];
                who[k++].i = i;
                if (k == want) {
                    if (kind == LG_STREAM)
                        batch_stream(b, m, who, k);
                    else
                        batch_logits_block(b, m, who, k, kind == LG_EVERY);
                    done += k;
                    k = 0;
                }
            }
        }
    }
}

/* The embedding of every token (+ each run's embedding adapter). */
static void batch_embed(struct gen_batch *b, const struct model *m, const struct gen_brun *runs, int n_runs)
{
    for (int j = 0; j < n_runs; j++) {
        float *x = b->x + (size_t)b->row[j] * b->C;
        for (int i = 0; i < runs[j].n; i++)
            op_mat_widen(x + (size_t)i * b->C, &m->w.embed, b->C, runs[j].tokens[i], runs[j].tokens[i] + 1, 0, b->C);
        embed_lora(x, runs[j].lora, runs[j].tokens, runs[j].n, b->C, b->V);
    }
}

int gen_batch_forward(struct gen_batch *b, const struct model *m, const struct gen_brun *runs, int n_runs,
                      struct lk_err *err)
{
    int ra = 0, rows = 0, rc;
    if (n_runs <= 0)
        return LK_OK;
    if ((rc = batch_plan(b, m, runs, n_runs, &ra, &rows, err)))
        return rc;
    // BLAS single-threaded: the kernels share the threads themselves (ops.h)
    int prev = op_blas_serial_begin(2);
    batch_embed(b, m, runs, n_runs);
    for (int l = 0; l < b->L; l++)
        batch_layer(b, m, runs, n_runs, l, ra, rows);
    batch_logits(b, m, runs, n_runs, b->who);
    op_blas_serial_end(prev);
    for (int j = 0; j < n_runs; j++)
        runs[j].seq->n += runs[j].n;
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
