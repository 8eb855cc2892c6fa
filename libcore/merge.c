/*
 * merge.c - the streaming merge of LoRA adapters into a model folder, the combination methods
 * (linear, cat, svd, ties, dare_linear, dare_ties), combination into one PEFT adapter, and the
 * logits check of a merged model. Meaning and memory bounds are documented in merge.h.
 * Owns: the adapters it loads, one float32 work buffer (plus scratch for ties/dare/svd), the
 * temporary output folder until it is renamed into place.
 */
#include "merge.h"

#include <cJSON.h>
#include <cblas.h>
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <fcntl.h>
#include <unistd.h>

#include "cfg.h"
#include "gguf.h"
#include "lora.h"
#include "model.h"
#include "st.h"
#include "svd.h"
#include "tensor.h"

#define MERGE_COPY_CHUNK ((size_t)16 << 20) /* bytes copied (or elements converted) per step */

static const char *const method_names[] = { "linear", "cat", "svd", "ties", "dare_linear", "dare_ties" };

const char *merge_method_name(enum merge_method m)
{
    return (unsigned)m < sizeof method_names / sizeof method_names[0] ? method_names[m] : "?";
}

int merge_method_parse(const char *s)
{
    for (int i = 0; i < (int)(sizeof method_names / sizeof method_names[0]); i++)
        if (!strcmp(s, method_names[i]))
            return i;
    return -1;
}

static int method_is_ties(enum merge_method m)
{
    return m == MERGE_TIES || m == MERGE_DARE_TIES;
}

static int method_is_dare(enum merge_method m)
{
    return m == MERGE_DARE_LINEAR || m == MERGE_DARE_TIES;
}

// ---- the combination methods on dense task vectors ----

uint64_t merge_tensor_seed(uint64_t seed, const char *name)
{
    uint64_t h = 1469598103934665603ull ^ seed; // FNV-1a over the name, keyed by the seed
    for (const unsigned char *p = (const unsigned char *)name; *p; p++) {
        h ^= *p;
        h *= 1099511628211ull;
    }
    return h;
}

uint64_t merge_rng_seed(uint64_t tensor_seed, int i)
{
    return tensor_seed + 0x9e3779b97f4a7c15ull * (uint64_t)(i + 1);
}

/* The k-th largest (0-based) of a[n], reordering a (Hoare's selection). */
static float select_kth_largest(float *a, size_t n, size_t k)
{
    size_t lo = 0, hi = n - 1;
    while (lo < hi) {
        float piv = a[lo + (hi - lo) / 2];
        size_t i = lo, j = hi;
        while (i <= j) {
            while (a[i] > piv)
                i++;
            while (a[j] < piv)
                j--;
            if (i <= j) {
                float t = a[i];
                a[i] = a[j];
                a[j] = t;
                i++;
                if (j == 0)
                    break;
                j--;
            }
        }
        if (k <= j)
            hi = j;
        else if (k >= i)
            lo = i;
        else
            return a[k];
    }
    return a[k];
}

/* Keeps the k entries of largest magnitude (PEFT's magnitude_based_pruning: torch.topk of |d|,
 * k = int(density * numel)); ties at the threshold are kept in index order. */
static int trim_topk(float *d, size_t n, double density, struct lk_err *err)
{
    size_t k = (size_t)(density * (double)n);
    if (k >= n)
        return LK_OK;
    if (k == 0) {
        memset(d, 0, sizeof(float) * n);
        return LK_OK;
    }
    float *a = lk_malloc(sizeof(float) * n);
    if (!a)
        return lk_errf(err, LK_ERR_NOMEM, "out of memory (ties trim of %zu values)", n);
    for (size_t j = 0; j < n; j++)
        a[j] = fabsf(d[j]);
    float thr = select_kth_largest(a, n, k - 1);
    lk_free(a);
    size_t above = 0;
    for (size_t j = 0; j < n; j++)
        above += fabsf(d[j]) > thr;
    size_t at = k - above; // how many entries equal to the threshold are kept
    for (size_t j = 0; j < n; j++) {
        float m = fabsf(d[j]);
        if (m > thr)
            continue;
        if (m == thr && at > 0) {
            at--;
            continue;
        }
        d[j] = 0.0f;
    }
    return LK_OK;
}

int merge_combine(enum merge_method method, int n, float *const *deltas, const double *w,
                  size_t numel, double density, uint64_t seed, float *out, struct lk_err *err)
{
    if (method_is_dare(method) || method == MERGE_TIES) {
        if (!(density > 0.0 && density <= 1.0))
            return lk_errf(err, LK_ERR_USAGE, "density must be in (0, 1], got %g", density);
    }
    for (int i = 0; i < n; i++) {
        float *d = deltas[i];
        if (method_is_dare(method)) {
            // PEFT's random_pruning(rescale=True): tensor * bernoulli(density) / density
            struct lk_rng rng;
            lk_rng_seed(&rng, merge_rng_seed(seed, i));
            float dens = (float)density;
            for (size_t j = 0; j < numel; j++)
                d[j] = lk_rng_uniform(&rng) < dens ? d[j] / dens : 0.0f;
        } else if (method == MERGE_TIES) {
            int rc = trim_topk(d, numel, density, err);
            if (rc)
                return rc;
        }
    }
    if (!method_is_ties(method)) {
        for (size_t j = 0; j < numel; j++) {
            double s = 0;
            for (int i = 0; i < n; i++)
                s += w[i] * deltas[i][j];
            out[j] = (float)s;
        }
        return LK_OK;
    }
    // elect the sign from the (trimmed, unweighted) sum, then the disjoint weighted mean
    for (size_t j = 0; j < numel; j++) {
        double s = 0;
        for (int i = 0; i < n; i++)
            s += deltas[i][j];
        int pos = s >= 0;
        double acc = 0;
        int cnt = 0;
        for (int i = 0; i < n; i++) {
            float v = deltas[i][j];
            if ((pos && v > 0) || (!pos && v < 0)) {
                acc += w[i] * v;
                cnt++;
            }
        }
        out[j] = (float)(cnt ? acc / cnt : 0.0);
    }
    return LK_OK;
}

// ---- what changes a tensor ----

enum contrib_kind { C_LIN, C_EMB, C_BIAS, C_EXTRA, C_ROWS };

struct contrib {
    enum contrib_kind kind;
    int ad;              /* adapter index */
    double w;            /* weight, negated for --subtract */
    float s;             /* LoRA scale */
    int R;               /* LIN, EMB: rank; ROWS: rows */
    const float *A, *B;  /* LIN: A [R, in], B [out, R] (lm_head's LoRA too); EMB: A [R, V], B [C, R] */
    const float *v;      /* BIAS: lora_B.bias [out]; EXTRA: the replacement tensor; ROWS: rows [R, cols] */
    const float *mag;    /* DoRA magnitude [out] or NULL */
    const int *idx;      /* ROWS: the R row indices (trainable tokens) */
};

struct merge_ctx {
    const struct merge_opts *o;
    struct cfg cfg;      /* owned: the base's config.json */
    struct lora ad[MERGE_MAX_ADAPTERS]; /* owned */
    int n;
    int untie;           /* write lm_head.weight and tie_word_embeddings false */
    float *buf;          /* owned: the tensor being merged, float32 */
    size_t buf_cap;
    float *scr;          /* owned: dense deltas / SVD factors */
    size_t scr_cap;
    unsigned char *io;   /* owned: MERGE_COPY_CHUNK bytes read from the base */
    int gguf;            /* out is one GGUF file */
    int gguf_dtype;      /* its matrices' GGUF type (the base's resolved when o->gguf_dtype is -1) */
};

static int ensure(float **p, size_t *cap, size_t n, struct lk_err *err)
{
    if (n <= *cap)
        return LK_OK;
    float *q = lk_realloc(*p, sizeof(float) * (n ? n : 1));
    if (!q)
        return lk_errf(err, LK_ERR_NOMEM, "out of memory (a float32 buffer of %zu values)", n);
    *p = q;
    *cap = n;
    return LK_OK;
}

/* "model.layers.N.<part>.<module>.weight|bias" -> layer, module, is_bias; -1 if not one. */
static int parse_linear(const char *name, int L, int *layer, int *is_bias)
{
    if (strncmp(name, "model.layers.", 13))
        return -1;
    char *end;
    long l = strtol(name + 13, &end, 10);
    if (end == name + 13 || *end != '.' || l < 0 || l >= L)
        return -1;
    for (int m = 0; m < CFG_N_MODULES; m++) {
        char path[96];
        cfg_module_path((int)l, (enum cfg_module)m, path, sizeof path);
        size_t n = strlen(path);
        if (strncmp(name, path, n))
            continue;
        if (!strcmp(name + n, ".weight") || !strcmp(name + n, ".bias")) {
            *layer = (int)l;
            *is_bias = name[n + 1] == 'b';
            return m;
        }
    }
    return -1;
}

/* What adapter l (index i, weight w) does to embed_tokens or lm_head: the replacement copies,
 * trainable-token rows, the LoRA on lm_head (the embedding adapter is collect's). When the base
 * ties the two and the output unties them, lm_head.weight also takes what changes the shared
 * weight (base_layer copies, embed_tokens' tokens), as PEFT's tied adapters do. */
static int collect_embedding(const struct merge_ctx *x, const struct lora *l, int i, double w, const char *name,
                             struct contrib *out, int n, int cap)
{
    int head = !strcmp(name, "lm_head.weight"), shared = head && x->untie;
    for (int k = 0; k < l->n_extra && n < cap; k++) {
        const struct lora_extra *e = &l->extra[k];
        if (!strcmp(e->name, name) || (shared && e->base_layer && !strcmp(e->name, "model.embed_tokens.weight")))
            out[n++] = (struct contrib){ C_EXTRA, i, w, 1.0f, 0, NULL, NULL, e->data, NULL, NULL };
    }
    for (int k = 0; k < 2 && n < cap; k++)
        if (l->n_tok[k] && ((k == 0 && (!strcmp(name, "model.embed_tokens.weight") || shared)) || (k == 1 && head)))
            out[n++] = (struct contrib){ C_ROWS, i, w, 1.0f, l->n_tok[k], NULL, NULL, l->tok_rows[k], NULL,
                                         l->tok_idx[k] };
    if (l->head_A && head && n < cap)
        out[n++] = (struct contrib){ C_LIN, i, w, l->head_scale, l->head_R, l->head_A, l->head_B, NULL, NULL, NULL };
    return n;
}

/* Everything that changes the output tensor `name`; returns the count (<= cap). */
static int collect(const struct merge_ctx *x, const char *name, struct contrib *out, int cap)
{
    int n = 0, layer, is_bias;
    int m = parse_linear(name, x->cfg.num_hidden_layers, &layer, &is_bias);
    double sign = x->o->subtract ? -1.0 : 1.0;
    for (int i = 0; i < x->n && n < cap; i++) {
        const struct lora *l = &x->ad[i];
        double w = sign * x->o->adapters[i].weight;
        if (m >= 0) {
            const struct lora_module *md = lora_find(l, layer, m);
            if (md && !is_bias)
                out[n++] = (struct contrib){ C_LIN, i, w, md->scale, md->R, md->A, md->B, NULL, md->mag, NULL };
            else if (md && md->bias)
                out[n++] = (struct contrib){ C_BIAS, i, w, md->scale, 0, NULL, NULL, md->bias, NULL, NULL };
        }
        if (l->embed_A && !strcmp(name, "model.embed_tokens.weight") && n < cap)
            out[n++] = (struct contrib){ C_EMB, i, w, l->embed_scale, l->embed_R, l->embed_A, l->embed_B,
                                         NULL, NULL, NULL };
        n = collect_embedding(x, l, i, w, name, out, n, cap);
    }
    return n;
}

/* buf [rows, cols] += alpha * D of a LIN/EMB/BIAS contribution. */
static void delta_acc(const struct contrib *c, double alpha, float *buf, int64_t rows, int64_t cols)
{
    float a = (float)(alpha * c->s);
    if (c->kind == C_LIN)
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, (int)rows, (int)cols, c->R, a, c->B, c->R,
                    c->A, (int)cols, 1.0f, buf, (int)cols);
    else if (c->kind == C_EMB) // D = s (B A)^T = s A^T B^T: [V, C]
        cblas_sgemm(CblasRowMajor, CblasTrans, CblasTrans, (int)rows, (int)cols, c->R, a, c->A, (int)rows,
                    c->B, c->R, 1.0f, buf, (int)cols);
    else if (c->kind == C_BIAS)
        for (int64_t j = 0; j < rows * cols; j++)
            buf[j] += a * c->v[j];
}

/* d [rows of W, cols] += alpha * (the new rows - W's) on the rows of a ROWS contribution (d may
 * be W itself: then alpha 1 replaces the rows). */
static void rows_acc(const struct contrib *c, double alpha, const float *W, float *d, int64_t cols)
{
    for (int i = 0; i < c->R; i++)
        for (int64_t j = 0; j < cols; j++) {
            size_t at = (size_t)c->idx[i] * (size_t)cols + (size_t)j;
            d[at] += (float)(alpha * ((double)c->v[(size_t)i * (size_t)cols + (size_t)j] - W[at]));
        }
}

/* The dense task vector d of a contribution; W is the base tensor (for modules_to_save and
 * trainable tokens, which replace values). */
static void delta_dense(const struct contrib *c, const float *W, float *d, int64_t rows, int64_t cols)
{
    size_t n = (size_t)(rows * cols);
    if (c->kind == C_EXTRA) {
        for (size_t j = 0; j < n; j++)
            d[j] = c->v[j] - W[j];
        return;
    }
    memset(d, 0, sizeof(float) * n);
    if (c->kind == C_ROWS)
        rows_acc(c, 1.0, W, d, cols);
    else
        delta_acc(c, 1.0, d, rows, cols);
}

/* Changes buf [rows, cols] (the base tensor `name` in float32) in place. */
static int apply(struct merge_ctx *x, const char *name, float *buf, int64_t rows, int64_t cols,
                 struct lk_err *err)
{
    struct contrib c[MERGE_MAX_ADAPTERS * 6];
    int n = collect(x, name, c, (int)(sizeof c / sizeof c[0]));
    if (!n)
        return 0;
    size_t numel = (size_t)(rows * cols);
    enum merge_method method = x->o->method;
    if (method == MERGE_CAT || (method == MERGE_SVD && (cols == 1 || rows == 1)))
        method = MERGE_LINEAR; // cat is exact; a vector has nothing to truncate
    if (n == 1 && c[0].kind == C_EXTRA && c[0].w == 1.0 && (method == MERGE_LINEAR || method == MERGE_SVD)) {
        memcpy(buf, c[0].v, sizeof(float) * numel); // modules_to_save: the tensor is replaced
        return 1;
    }
    if (method == MERGE_LINEAR) {
        // modules_to_save task vectors first: they are relative to the base value
        int has_extra = 0;
        for (int i = 0; i < n; i++)
            has_extra |= c[i].kind == C_EXTRA;
        if (has_extra)
            for (size_t j = 0; j < numel; j++) {
                double base = buf[j], acc = base;
                for (int i = 0; i < n; i++)
                    if (c[i].kind == C_EXTRA)
                        acc += c[i].w * (c[i].v[j] - base);
                buf[j] = (float)acc;
            }
        for (int i = 0; i < n; i++) // trainable tokens: their rows replace the rows (weight 1)
            if (c[i].kind == C_ROWS)
                rows_acc(&c[i], c[i].w, buf, buf, cols);
        for (int i = 0; i < n; i++)
            delta_acc(&c[i], c[i].w, buf, rows, cols);
        if (n == 1 && c[0].mag) {
            // DoRA (PEFT dora.py): W' = m / ||W + D||_row * (W + D), norm over each output row
            for (int64_t o = 0; o < rows; o++) {
                float *r = buf + (size_t)o * (size_t)cols;
                double ss = 0;
                for (int64_t j = 0; j < cols; j++)
                    ss += (double)r[j] * r[j];
                float f = (float)(c[0].mag[o] / sqrt(ss));
                for (int64_t j = 0; j < cols; j++)
                    r[j] *= f;
            }
        }
        return 1;
    }
    if (method == MERGE_SVD) {
        int k = x->o->rank;
        if (k <= 0)
            for (int i = 0; i < n; i++)
                k = c[i].R > k ? c[i].R : k;
        if (k <= 0)
            k = 1;
        int kmax = (int)(rows < cols ? rows : cols);
        k = k > kmax ? kmax : k;
        size_t need = numel + (size_t)rows * (size_t)k + (size_t)k + (size_t)k * (size_t)cols;
        if (ensure(&x->scr, &x->scr_cap, need, err))
            return -1;
        float *M = x->scr, *U = M + numel, *S = U + (size_t)rows * k, *Vt = S + k;
        memset(M, 0, sizeof(float) * numel);
        for (int i = 0; i < n; i++) {
            if (c[i].kind == C_EXTRA)
                for (size_t j = 0; j < numel; j++)
                    M[j] += (float)(c[i].w * (c[i].v[j] - buf[j]));
            else if (c[i].kind == C_ROWS)
                rows_acc(&c[i], c[i].w, buf, M, cols);
            else
                delta_acc(&c[i], c[i].w, M, rows, cols);
        }
        struct svd_opts so;
        svd_opts_init(&so);
        so.seed = merge_tensor_seed(x->o->seed, name);
        if (svd_truncated((int)rows, (int)cols, M, k, &so, U, S, Vt, NULL, err))
            return -1;
        for (int64_t o = 0; o < rows; o++)
            for (int r = 0; r < k; r++)
                U[(size_t)o * k + r] *= S[r];
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, (int)rows, (int)cols, k, 1.0f, U, k, Vt,
                    (int)cols, 1.0f, buf, (int)cols);
        return 1;
    }
    // ties / dare: n dense task vectors, combined into one
    size_t need;
    if (lk_mul_size(numel, (size_t)n + 1, &need) || ensure(&x->scr, &x->scr_cap, need, err))
        return err->code ? -1 : (lk_errf(err, LK_ERR_NOMEM, "tensor '%s' too large", name), -1);
    float *d[MERGE_MAX_ADAPTERS * 6];
    double w[MERGE_MAX_ADAPTERS * 6];
    for (int i = 0; i < n; i++) {
        d[i] = x->scr + numel * (size_t)(i + 1);
        delta_dense(&c[i], buf, d[i], rows, cols);
        w[i] = c[i].w;
    }
    if (merge_combine(method, n, d, w, numel, x->o->density, merge_tensor_seed(x->o->seed, name), x->scr,
                      err))
        return -1;
    for (size_t j = 0; j < numel; j++)
        buf[j] += x->scr[j];
    return 1;
}

// ---- checks before anything is written ----

static int check_opts(const struct merge_opts *o, struct lk_err *err)
{
    if (!o->model || !o->out)
        return lk_errf(err, LK_ERR_USAGE, "--model and --out are required");
    if (o->n_adapters < 1 && !merge_out_is_gguf(o->out))
        return lk_errf(err, LK_ERR_USAGE, "give at least one --adapter DIR[:WEIGHT] (with no adapter, only a "
                       ".gguf --out makes sense: the model converted as it is)");
    if (o->n_adapters > MERGE_MAX_ADAPTERS)
        return lk_errf(err, LK_ERR_USAGE, "at most %d adapters", MERGE_MAX_ADAPTERS);
    if ((unsigned)o->method > MERGE_DARE_TIES)
        return lk_errf(err, LK_ERR_USAGE, "unknown merge method");
    int needs_density = o->method == MERGE_TIES || method_is_dare(o->method);
    if (o->density != 0 && !needs_density)
        return lk_errf(err, LK_ERR_USAGE, "--density applies to ties, dare_linear and dare_ties, not %s",
                       merge_method_name(o->method));
    if (needs_density && !(o->density > 0 && o->density <= 1))
        return lk_errf(err, LK_ERR_USAGE, "method %s needs --density D in (0, 1]", merge_method_name(o->method));
    if (o->rank != 0 && o->method != MERGE_SVD)
        return lk_errf(err, LK_ERR_USAGE, "--rank applies to --method svd only");
    if (o->rank < 0)
        return lk_errf(err, LK_ERR_USAGE, "--rank must be positive");
    if (o->into_adapter && o->method != MERGE_CAT && o->method != MERGE_SVD)
        return lk_errf(err, LK_ERR_USAGE, "--into-adapter needs --method cat or svd (%s has no exact "
                       "low-rank form)", merge_method_name(o->method));
    if (o->portable && !o->into_adapter)
        return lk_errf(err, LK_ERR_USAGE, "--portable writes an adapter: use it with --into-adapter");
    if (o->into_adapter && (o->dtype >= 0 || o->verify || o->subtract))
        return lk_errf(err, LK_ERR_USAGE, "--into-adapter writes a float32 adapter: --dtype, --verify and "
                       "--subtract do not apply");
    if (o->subtract && o->method != MERGE_LINEAR)
        return lk_errf(err, LK_ERR_USAGE, "--subtract undoes a linear merge: use --method linear");
    if (o->dtype >= 0 && o->dtype != TENSOR_F32 && o->dtype != TENSOR_F16 && o->dtype != TENSOR_BF16)
        return lk_errf(err, LK_ERR_USAGE, "output dtype must be f32, f16 or bf16");
    for (int i = 0; i < o->n_adapters; i++)
        if (!isfinite(o->adapters[i].weight))
            return lk_errf(err, LK_ERR_USAGE, "adapter '%s': weight must be a finite number", o->adapters[i].dir);
    return LK_OK;
}

/* A lora_B.bias on a layer the base has no bias for: accepted when it is exactly zero (svd-compress
 * writes zeros there, because PEFT's lora_bias gives every targeted module one), refused naming
 * the module otherwise: there is nothing to merge it into, in lorakit or in PEFT. */
static int check_bias(const struct lora_module *md, const struct st_model *sm, const char *dir, struct lk_err *err)
{
    char nm[128];
    cfg_module_path(md->layer, (enum cfg_module)md->module, nm, sizeof nm);
    size_t k = strlen(nm);
    snprintf(nm + k, sizeof nm - k, ".bias");
    if (st_model_find(sm, nm, NULL))
        return LK_OK;
    for (int r = 0; r < md->out; r++)
        if (md->bias[r] != 0.0f) {
            nm[k] = 0;
            return lk_errf(err, LK_ERR_UNSUPPORTED, "%s: adapter has a non-zero lora_B.bias for '%s' but the base has "
                           "no '%s.bias' to merge it into (PEFT's merge_and_unload refuses it too)", dir, nm, nm);
        }
    return LK_OK;
}

/* What the loaded adapters ask for that cannot be done; also finds whether to untie. */
static int check_adapters(struct merge_ctx *x, const struct st_model *sm, struct lk_err *err)
{
    const struct merge_opts *o = x->o;
    const struct cfg *c = &x->cfg;
    int changes_embed = 0, changes_head = 0;
    for (int i = 0; i < x->n; i++) {
        const struct lora *l = &x->ad[i];
        const char *dir = o->adapters[i].dir;
        if (l->mag_mem) {
            if (x->n > 1 || o->adapters[i].weight != 1.0 || o->subtract ||
                (o->method != MERGE_LINEAR && o->method != MERGE_CAT) || o->into_adapter)
                return lk_errf(err, LK_ERR_UNSUPPORTED, "%s: a DoRA adapter merges alone, with weight 1 and "
                               "method linear (its magnitude renormalises the whole row; it cannot be "
                               "subtracted or combined)", dir);
        }
        int rows = l->n_tok[0] + l->n_tok[1];
        if (o->subtract && (l->n_extra || rows))
            return lk_errf(err, LK_ERR_UNSUPPORTED, "%s: adapter replaces '%s' (%s): the base value is gone after a "
                           "merge and cannot be recovered by --subtract", dir,
                           l->n_extra ? l->extra[0].name : "token rows",
                           l->n_extra ? "modules_to_save" : "trainable_token_indices");
        if (o->into_adapter && (l->n_extra || l->embed_A || l->head_A || rows))
            return lk_errf(err, LK_ERR_UNSUPPORTED, "%s: --into-adapter combines the projection factors only; "
                           "this adapter also has %s", dir,
                           l->embed_A  ? "an embedding adapter"
                           : l->head_A ? "a LoRA on lm_head"
                           : rows      ? "trainable tokens"
                                       : "modules_to_save tensors");
        for (int k = 0; k < l->n_mod && !o->into_adapter; k++)
            if (l->mod[k].bias && check_bias(&l->mod[k], sm, dir, err))
                return err->code;
        // a base_layer copy and embed_tokens' token rows change the shared weight: no untie
        changes_embed |= l->embed_A != NULL;
        changes_head |= l->head_A != NULL || l->n_tok[1] > 0;
        for (int k = 0; k < l->n_extra; k++) {
            if (l->extra[k].base_layer)
                continue;
            changes_embed |= !strcmp(l->extra[k].name, "model.embed_tokens.weight");
            changes_head |= !strcmp(l->extra[k].name, "lm_head.weight");
        }
    }
    x->untie = !o->into_adapter && c->tie_word_embeddings && (changes_embed || changes_head) &&
               !st_model_find(sm, "lm_head.weight", NULL);
    return LK_OK;
}

/* Every tensor config.json implies must be in the base, with its shape (adapters were checked
 * against the config by lora_load). */
static int check_base(const struct merge_ctx *x, const struct st_model *sm, struct lk_err *err)
{
    struct cfg_tensor *ct;
    int n;
    if (cfg_tensors(&x->cfg, &ct, &n, err))
        return err->code;
    int rc = LK_OK;
    for (int i = 0; i < n && !rc; i++) {
        const struct st_tensor *t = st_model_find(sm, ct[i].name, NULL);
        if (!t)
            rc = lk_errf(err, LK_ERR_MISSING, "%s: base has no tensor '%s'", x->o->model, ct[i].name);
        else if (t->ndim != ct[i].ndim || t->shape[0] != ct[i].shape[0] ||
                 (t->ndim > 1 && t->shape[1] != ct[i].shape[1]))
            rc = lk_errf(err, LK_ERR_SHAPE, "%s: base tensor '%s' does not have the shape config.json implies",
                         x->o->model, ct[i].name);
        else if (!tensor_dtype_is_float(t->dtype))
            rc = lk_errf(err, LK_ERR_FORMAT, "%s: base tensor '%s' has dtype %s", x->o->model, ct[i].name,
                         tensor_dtype_name(t->dtype));
    }
    lk_free(ct);
    return rc;
}

// ---- writing a model folder ----

static enum tensor_dtype out_dtype(const struct merge_ctx *x, enum tensor_dtype src)
{
    if (x->gguf) // float32 into the GGUF exporter, which converts (round_gguf for verify)
        return TENSOR_F32;
    if (x->o->dtype < 0 || !tensor_dtype_is_float(src))
        return src;
    return (enum tensor_dtype)x->o->dtype;
}

/* n bytes at byte offset off of the base file fd into dst (pread: the data comes from the page
 * cache by copy, not through faults on the mapping, which cost about 20 us a page on a VM and
 * would count the whole model in the resident set). */
static int read_at(int fd, const struct st_file *f, const void *at, void *dst, size_t n, struct lk_err *err)
{
    off_t off = (off_t)((const unsigned char *)at - (const unsigned char *)f->map);
    unsigned char *d = dst;
    while (n) {
        ssize_t k = pread(fd, d, n, off);
        if (k < 0 && errno == EINTR)
            continue;
        if (k <= 0)
            return lk_errf(err, LK_ERR_IO, "%s: read failed: %s", f->path, k < 0 ? strerror(errno) : "short file");
        d += k;
        n -= (size_t)k;
        off += k;
    }
    return LK_OK;
}

/* Tensor t of file f (open as fd) into float32 dst [numel], through the io buffer. */
static int read_f32(struct merge_ctx *x, int fd, const struct st_file *f, const struct st_tensor *t, float *dst,
                    struct lk_err *err)
{
    size_t es = tensor_dtype_size(t->dtype), step = MERGE_COPY_CHUNK / es;
    const unsigned char *src = t->data;
    for (size_t done = 0; done < t->numel; done += step) {
        size_t k = t->numel - done < step ? t->numel - done : step;
        if (read_at(fd, f, src + done * es, x->io, k * es, err))
            return err->code;
        tensor_to_f32(dst + done, x->io, t->dtype, k);
    }
    return LK_OK;
}

/* Writes tensor `name` of the output from base tensor t of file f (open as fd). */
static int write_tensor(struct merge_ctx *x, struct st_writer *w, int fd, const struct st_file *f,
                        const struct st_tensor *t, const char *name, struct merge_report *rep,
                        struct lk_err *err)
{
    struct contrib tmp[MERGE_MAX_ADAPTERS * 6];
    int touched = collect(x, name, tmp, (int)(sizeof tmp / sizeof tmp[0])) > 0;
    enum tensor_dtype odt = out_dtype(x, t->dtype);
    size_t es = tensor_dtype_size(t->dtype);
    const unsigned char *src = t->data;
    if (!t->numel) {
        st_writer_write(w, src, t->dtype);
        rep->n_copied++;
        return err->code;
    }
    if (!touched) {
        // byte for byte when the dtype is kept, else converted; in chunks either way
        size_t step = MERGE_COPY_CHUNK / (odt == t->dtype ? es : sizeof(float));
        if (odt != t->dtype && ensure(&x->buf, &x->buf_cap, step, err))
            return err->code;
        for (size_t done = 0; done < t->numel && !err->code; done += step) {
            size_t k = t->numel - done < step ? t->numel - done : step;
            if (read_at(fd, f, src + done * es, x->io, k * es, err))
                return err->code;
            if (odt == t->dtype)
                st_writer_write_chunk(w, x->io, t->dtype, k);
            else {
                tensor_to_f32(x->buf, x->io, t->dtype, k);
                st_writer_write_chunk(w, x->buf, TENSOR_F32, k);
            }
        }
        rep->n_copied++;
        return err->code;
    }
    int64_t rows = t->shape[0], cols = t->ndim > 1 ? t->shape[1] : 1;
    if (ensure(&x->buf, &x->buf_cap, t->numel, err) || read_f32(x, fd, f, t, x->buf, err))
        return err->code;
    if (apply(x, name, x->buf, rows, cols, err) < 0)
        return err->code;
    st_writer_write(w, x->buf, TENSOR_F32); // rounded once, to the output dtype
    rep->n_changed++;
    return err->code;
}

static int cmp_str(const void *a, const void *b)
{
    return strcmp(*(char *const *)a, *(char *const *)b);
}

static const char *base_name(const char *path)
{
    const char *s = strrchr(path, '/');
    return s ? s + 1 : path;
}

/* model.safetensors.index.json for the shards written. */
static int write_index(const struct merge_ctx *x, const struct st_model *sm, const char *dir,
                       size_t total, struct lk_err *err)
{
    int n = st_model_count(sm) + x->untie, k = 0;
    char **keys = lk_calloc((size_t)n + 1, sizeof(char *));
    if (!keys)
        return lk_errf(err, LK_ERR_NOMEM, "out of memory");
    // keys are "name\0shard" packed in one string each, sorted by name
    int rc = LK_OK;
    for (int fi = 0; fi < sm->n_files && !rc; fi++)
        for (int i = 0; i <= sm->files[fi].n && !rc; i++) {
            const char *nm = i < sm->files[fi].n ? sm->files[fi].t[i].name
                                                 : (fi == sm->n_files - 1 && x->untie ? "lm_head.weight" : NULL);
            if (!nm)
                continue;
            const char *sh = base_name(sm->files[fi].path);
            size_t a = strlen(nm), b = strlen(sh);
            if (!(keys[k] = lk_malloc(a + b + 2)))
                rc = lk_errf(err, LK_ERR_NOMEM, "out of memory");
            else {
                memcpy(keys[k], nm, a + 1);
                memcpy(keys[k] + a + 1, sh, b + 1);
                k++;
            }
        }
    cJSON *root = NULL;
    if (!rc) {
        qsort(keys, (size_t)k, sizeof *keys, cmp_str);
        root = cJSON_CreateObject();
        cJSON *meta = cJSON_AddObjectToObject(root, "metadata");
        cJSON_AddNumberToObject(meta, "total_size", (double)total);
        cJSON *wm = cJSON_AddObjectToObject(root, "weight_map");
        for (int i = 0; i < k; i++)
            cJSON_AddStringToObject(wm, keys[i], keys[i] + strlen(keys[i]) + 1);
        char *text = cfg_json_print(root);
        char *path = lk_path_join(dir, "model.safetensors.index.json");
        rc = text && path ? lk_write_file_atomic(path, text, strlen(text), err)
                          : lk_errf(err, LK_ERR_NOMEM, "out of memory");
        lk_free(text);
        lk_free(path);
    }
    cJSON_Delete(root);
    for (int i = 0; i < k; i++)
        lk_free(keys[i]);
    lk_free(keys);
    return rc;
}

static int copy_aux(const struct merge_ctx *x, const char *dir, struct lk_err *err)
{
    static const char *const files[] = { "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                                         "special_tokens_map.json", "vocab.json", "merges.txt", "tokenizer.model",
                                         "added_tokens.json", "chat_template.json", "chat_template.jinja" };
    int rc = LK_OK;
    for (size_t i = 0; i < sizeof files / sizeof files[0] && !rc; i++) {
        char *src = lk_path_join(x->o->model, files[i]), *dst = lk_path_join(dir, files[i]);
        if (!src || !dst)
            rc = lk_errf(err, LK_ERR_NOMEM, "out of memory");
        else if (lk_file_exists(src))
            rc = lk_copy_file(src, dst, err);
        lk_free(src);
        lk_free(dst);
    }
    if (rc)
        return rc;
    // config.json: rewritten only when the dtype or the tie changes, else copied as it is
    char *src = lk_path_join(x->o->model, "config.json"), *dst = lk_path_join(dir, "config.json");
    if (!src || !dst)
        rc = lk_errf(err, LK_ERR_NOMEM, "out of memory");
    else if (x->o->dtype >= 0 || x->untie) {
        struct cfg c = x->cfg; // shallow: cfg_save only reads it
        if (x->o->dtype >= 0)
            snprintf(c.torch_dtype, sizeof c.torch_dtype, "%s",
                     x->o->dtype == TENSOR_BF16 ? "bfloat16" : x->o->dtype == TENSOR_F16 ? "float16" : "float32");
        if (x->untie)
            c.tie_word_embeddings = 0;
        rc = cfg_save(&c, dst, err);
    } else
        rc = lk_copy_file(src, dst, err);
    lk_free(src);
    lk_free(dst);
    return rc;
}

static int write_model(struct merge_ctx *x, const struct st_model *sm, const char *dir,
                       struct merge_report *rep, struct lk_err *err)
{
    int rc = copy_aux(x, dir, err);
    if (rc)
        return rc;
    int total = st_model_count(sm) + x->untie, done = 0, odt_seen = -2;
    size_t bytes = 0;
    const struct st_tensor *embed = NULL;
    int embed_file = -1;
    if (x->untie)
        embed = st_model_find(sm, "model.embed_tokens.weight", &embed_file);
    int *fds = lk_malloc(sizeof(int) * (size_t)sm->n_files);
    if (!x->io)
        x->io = lk_malloc(MERGE_COPY_CHUNK);
    if (!fds || !x->io) {
        lk_free(fds);
        return lk_errf(err, LK_ERR_NOMEM, "out of memory");
    }
    for (int fi = 0; fi < sm->n_files; fi++)
        if ((fds[fi] = open(sm->files[fi].path, O_RDONLY)) < 0 && !rc)
            rc = lk_errf(err, LK_ERR_IO, "%s: cannot open: %s", sm->files[fi].path, strerror(errno));
    for (int fi = 0; fi < sm->n_files && !rc; fi++) {
        const struct st_file *f = &sm->files[fi];
        int with_head = x->untie && fi == sm->n_files - 1;
        char *path = lk_path_join(dir, sm->sharded ? base_name(f->path) : "model.safetensors");
        if (!path) {
            rc = lk_errf(err, LK_ERR_NOMEM, "out of memory");
            break;
        }
        struct lk_err werr = { 0 };
        struct st_writer w;
        st_writer_init(&w, path, &werr);
        lk_free(path);
        if (!f->n_meta)
            st_writer_meta(&w, "format", "pt");
        for (int i = 0; i < f->n_meta; i++)
            st_writer_meta(&w, f->meta_key[i], f->meta_val[i]);
        for (int i = 0; i < f->n; i++) {
            enum tensor_dtype d = out_dtype(x, f->t[i].dtype);
            st_writer_declare(&w, f->t[i].name, d, f->t[i].ndim, f->t[i].shape);
            bytes += f->t[i].numel * tensor_dtype_size(d);
            if (tensor_dtype_is_float(f->t[i].dtype))
                odt_seen = odt_seen == -2 ? (int)d : odt_seen == (int)d ? odt_seen : -1;
        }
        if (with_head) {
            enum tensor_dtype d = out_dtype(x, embed->dtype);
            st_writer_declare(&w, "lm_head.weight", d, 2, embed->shape);
            bytes += embed->numel * tensor_dtype_size(d);
        }
        st_writer_begin(&w);
        for (int i = 0; i <= f->n && !werr.code; i++) {
            if (lk_interrupted) {
                lk_errf(&werr, LK_ERR_INTERRUPTED, "interrupted");
                break;
            }
            if (i == f->n && !with_head)
                break;
            const struct st_tensor *t = i < f->n ? &f->t[i] : embed;
            const char *name = i < f->n ? t->name : "lm_head.weight";
            int src = i < f->n ? fi : embed_file;
            write_tensor(x, &w, fds[src], &sm->files[src], t, name, rep, &werr);
            rep->n_tensors++;
            if (x->o->progress)
                x->o->progress(x->o->progress_ctx, ++done, total, name);
        }
        if (werr.code) {
            st_writer_abort(&w);
            *err = werr;
            rc = err->code;
        } else if ((rc = st_writer_commit(&w)))
            *err = werr;
    }
    for (int fi = 0; fi < sm->n_files; fi++)
        if (fds[fi] >= 0)
            close(fds[fi]);
    lk_free(fds);
    if (rc)
        return rc;
    rep->n_shards = sm->n_files;
    rep->out_dtype = odt_seen < 0 ? -1 : odt_seen;
    if (sm->sharded)
        rc = write_index(x, sm, dir, bytes, err);
    return rc;
}

// ---- writing one GGUF file (llama.cpp) ----

int merge_out_is_gguf(const char *out)
{
    size_t n = out ? strlen(out) : 0;
    return n >= 5 && !strcmp(out + n - 5, ".gguf");
}

/* The options a .gguf --out rules out. */
static int check_gguf_opts(const struct merge_opts *o, struct lk_err *err)
{
    int t = o->gguf_dtype;
    if (!merge_out_is_gguf(o->out))
        return LK_OK;
    if (o->into_adapter)
        return lk_errf(err, LK_ERR_USAGE, "--into-adapter writes a PEFT adapter folder, not a .gguf file (hint: "
                       "merge into an adapter folder, then lorakit convert --adapter DIR --model BASE --out "
                       "FILE.gguf writes it as a GGUF LoRA)");
    if (o->dtype >= 0)
        return lk_errf(err, LK_ERR_USAGE, "a .gguf --out takes a GGUF type (f32, f16, bf16, q8_0), not a "
                       "safetensors dtype");
    if (t >= 0 && t != GGUF_T_F32 && t != GGUF_T_F16 && t != GGUF_T_BF16 && t != GGUF_T_Q8_0)
        return lk_errf(err, LK_ERR_USAGE, "GGUF output type must be f32, f16, bf16 or q8_0");
    return LK_OK;
}

static int check_gguf_out(const struct merge_opts *o, struct lk_err *err)
{
    if (lk_is_dir(o->out))
        return lk_errf(err, LK_ERR_EXISTS, "--out '%s' is a folder", o->out);
    if (lk_file_exists(o->out) && !o->overwrite)
        return lk_errf(err, LK_ERR_EXISTS, "'%s' exists (hint: --overwrite replaces it)", o->out);
    return LK_OK;
}

/* The row source of the exporter: each tensor of the output as the folder writer would write
 * it, in float32. A changed tensor is merged whole into x->buf when its first rows are asked
 * for (the exporter asks in order) and handed out from there; an untouched one is read by
 * pread, just the rows asked for. */
struct gguf_sink {
    struct merge_ctx *x;
    const struct st_model *sm;
    int *fds;                 /* owned [sm->n_files] */
    struct merge_report *rep;
};

static int gguf_rows(void *ctx, const struct cfg_tensor *ct, int64_t row0, int64_t n, float *out, struct lk_err *err)
{
    struct gguf_sink *s = ctx;
    struct merge_ctx *x = s->x;
    int fi;
    const struct st_tensor *t = st_model_find(s->sm, ct->name, &fi);
    if (!t && !strcmp(ct->name, "lm_head.weight")) // untied: lm_head starts from the embedding
        t = st_model_find(s->sm, "model.embed_tokens.weight", &fi);
    LK_ASSERT(t != NULL); // check_base found every tensor of the config
    const struct st_file *f = &s->sm->files[fi];
    size_t cols = ct->ndim == 2 ? (size_t)ct->shape[1] : (size_t)ct->shape[0], es = tensor_dtype_size(t->dtype);
    struct contrib tmp[MERGE_MAX_ADAPTERS * 3];
    if (collect(x, ct->name, tmp, (int)(sizeof tmp / sizeof tmp[0])) > 0) {
        if (row0 == 0) {
            if (ensure(&x->buf, &x->buf_cap, t->numel, err) || read_f32(x, s->fds[fi], f, t, x->buf, err) ||
                apply(x, ct->name, x->buf, t->shape[0], t->ndim > 1 ? t->shape[1] : 1, err) < 0)
                return err->code;
            s->rep->n_changed++;
        }
        memcpy(out, x->buf + (size_t)row0 * cols, sizeof(float) * (size_t)n * cols);
        return LK_OK;
    }
    s->rep->n_copied += row0 == 0;
    const unsigned char *src = (const unsigned char *)t->data + (size_t)row0 * cols * es;
    size_t total = (size_t)n * cols, step = MERGE_COPY_CHUNK / es;
    for (size_t done = 0; done < total; done += step) {
        size_t k = total - done < step ? total - done : step;
        if (read_at(s->fds[fi], f, src + done * es, x->io, k * es, err))
            return err->code;
        tensor_to_f32(out + done, x->io, t->dtype, k);
    }
    return LK_OK;
}

/* general.name: the output file's name without .gguf. */
static void gguf_stem(const char *out, char *buf, size_t n)
{
    const char *b = base_name(out);
    snprintf(buf, n, "%.*s", (int)strlen(b) - 5, b);
}

static int write_gguf(struct merge_ctx *x, const struct st_model *sm, struct merge_report *rep, struct lk_err *err)
{
    const struct merge_opts *o = x->o;
    const struct st_tensor *emb = st_model_find(sm, "model.embed_tokens.weight", NULL);
    x->gguf_dtype = o->gguf_dtype >= 0              ? o->gguf_dtype
                    : emb->dtype == TENSOR_BF16 ? GGUF_T_BF16
                    : emb->dtype == TENSOR_F16  ? GGUF_T_F16
                                                : GGUF_T_F32;
    struct cfg c = x->cfg; // shallow: the exporter only reads it
    c.tie_word_embeddings = c.tie_word_embeddings && !x->untie;
    struct gguf_sink s = { x, sm, lk_malloc(sizeof(int) * (size_t)sm->n_files), rep };
    if (!x->io)
        x->io = lk_malloc(MERGE_COPY_CHUNK);
    if (!s.fds || !x->io) {
        lk_free(s.fds);
        return lk_errf(err, LK_ERR_NOMEM, "out of memory");
    }
    int rc = LK_OK;
    for (int fi = 0; fi < sm->n_files; fi++)
        if ((s.fds[fi] = open(sm->files[fi].path, O_RDONLY)) < 0 && !rc)
            rc = lk_errf(err, LK_ERR_IO, "%s: cannot open: %s", sm->files[fi].path, strerror(errno));
    const char *ads[MERGE_MAX_ADAPTERS];
    for (int i = 0; i < x->n; i++)
        ads[i] = o->adapters[i].dir;
    char name[256];
    gguf_stem(o->out, name, sizeof name);
    struct gguf_export gx = { o->model, &c, x->gguf_dtype, name, ads, x->n, x->n ? merge_method_name(o->method) : NULL,
                              gguf_rows, &s, 0, o->progress, o->progress_ctx };
    struct gguf_export_report gr;
    if (!rc)
        rc = gguf_export_model(&gx, o->out, &gr, err);
    for (int fi = 0; fi < sm->n_files; fi++)
        if (s.fds[fi] >= 0)
            close(s.fds[fi]);
    lk_free(s.fds);
    if (rc)
        return rc;
    rep->n_tensors = gr.n_tensors;
    rep->n_shards = 1;
    rep->gguf_dtype = x->gguf_dtype;
    rep->n_f32_fallback = gr.n_f32_fallback;
    rep->bytes = gr.bytes;
    return LK_OK;
}

/* For verify: the exact merged weights rounded as the GGUF file holds them (gguf_export_type:
 * matrices in the file's type, row by row, which is how q8_0 blocks fall; 1-D tensors f32). */
static int round_gguf(const struct merge_ctx *x, struct model *m, struct lk_err *err)
{
    struct model_tensor *t;
    int n, rc0 = model_weights_tensors(&m->w, &m->cfg, &t, &n, err);
    if (rc0)
        return rc0;
    void *blk = NULL;
    int rc = LK_OK;
    for (int i = 0; i < n && !rc; i++) {
        int64_t cols = t[i].ndim > 1 ? t[i].shape[1] : t[i].shape[0];
        int type = gguf_export_type(t[i].ndim, cols, x->gguf_dtype);
        if (type == GGUF_T_F32)
            continue;
        lk_free(blk);
        if (!(blk = lk_malloc(gguf_nbytes(type, (size_t)cols))))
            rc = lk_errf(err, LK_ERR_NOMEM, "out of memory");
        for (size_t r = 0; blk && r < t[i].numel / (size_t)cols; r++) {
            float *row = t[i].data + r * (size_t)cols;
            gguf_from_f32(blk, type, row, (size_t)cols);
            gguf_to_f32(row, type, blk, (size_t)cols);
        }
    }
    lk_free(blk);
    lk_free(t);
    return rc;
}

// ---- writing one adapter (cat, svd) ----

/* PEFT's pattern key for one module, dots escaped (matched as (.*\.)?(key)$). */
static void pattern_key(int layer, int module, char *buf, size_t n)
{
    char path[96];
    cfg_module_path(layer, (enum cfg_module)module, path, sizeof path);
    size_t k = 0;
    for (const char *p = path; *p && k + 3 < n; p++) {
        if (*p == '.')
            buf[k++] = '\\';
        buf[k++] = *p;
    }
    buf[k] = 0;
}

static int write_adapter(struct merge_ctx *x, const char *dir, struct merge_report *rep,
                         struct lk_err *err)
{
    const struct merge_opts *o = x->o;
    const struct cfg *c = &x->cfg;
    int L = c->num_hidden_layers, NM = L * CFG_N_MODULES;
    int *rank = lk_calloc((size_t)NM, sizeof(int));
    struct lora_pattern *pats = NULL;
    char *keys = NULL;
    struct lora nl = { 0 };
    int rc = LK_OK;
    if (!rank)
        return lk_errf(err, LK_ERR_NOMEM, "out of memory");
    // 1. the rank of every module of the combination
    unsigned targets = 0;
    int lora_bias = 0, rmax = 0;
    for (int s = 0; s < NM; s++) {
        int ly = s / CFG_N_MODULES, m = s % CFG_N_MODULES, sum = 0, big = 0;
        for (int i = 0; i < x->n; i++) {
            const struct lora_module *md = lora_find(&x->ad[i], ly, m);
            if (!md)
                continue;
            sum += md->R;
            big = md->R > big ? md->R : big;
            lora_bias |= md->bias != NULL;
        }
        if (!sum)
            continue;
        targets |= 1u << m;
        int64_t rows, cols;
        cfg_module_shape(c, (enum cfg_module)m, &rows, &cols);
        int k = o->method == MERGE_CAT ? sum : (o->rank ? o->rank : big);
        int kmax = (int)(rows < cols ? rows : cols);
        if (o->method == MERGE_SVD && k > kmax)
            k = kmax;
        rank[s] = k;
        rmax = k > rmax ? k : rmax;
    }
    // 2. the config: alpha = r everywhere (scale 1); per-module ranks as patterns unless portable,
    //    where every module is zero-padded to the largest rank
    struct lora_config lc;
    lora_config_default(&lc);
    lc.r = rmax;
    lc.alpha = rmax;
    lc.targets = targets;
    lc.lora_bias = lora_bias;
    snprintf(lc.base_model, sizeof lc.base_model, "%s", x->ad[0].cfg.base_model);
    int np = 0;
    if (!o->portable) {
        pats = lk_calloc((size_t)NM * 2 + 1, sizeof *pats);
        keys = lk_malloc((size_t)NM * 96 + 1);
        if (!pats || !keys) {
            rc = lk_errf(err, LK_ERR_NOMEM, "out of memory");
            goto out;
        }
        for (int s = 0; s < NM; s++)
            if (rank[s] && rank[s] != rmax) {
                char *k = keys + (size_t)np * 96;
                pattern_key(s / CFG_N_MODULES, s % CFG_N_MODULES, k, 96);
                pats[np] = (struct lora_pattern){ k, rank[s] };
                pats[NM + np] = (struct lora_pattern){ k, rank[s] };
                np++;
            }
        lc.rank_pattern = pats;
        lc.alpha_pattern = pats + NM;
        lc.n_rank_pattern = lc.n_alpha_pattern = np;
    }
    if ((rc = lora_init(&nl, &lc, c, err)))
        goto out;
    // 3. the factors
    for (int k = 0; k < nl.n_mod && !rc; k++) {
        struct lora_module *nm = &nl.mod[k];
        int s = nm->layer * CFG_N_MODULES + nm->module;
        LK_ASSERT(nm->R >= rank[s] && fabsf(nm->scale - 1.0f) < 1e-6f);
        if (o->method == MERGE_CAT) {
            // A = [A_1; A_2; ...], B = [w_1 s_1 B_1, w_2 s_2 B_2, ...] (PEFT folds w s into A;
            // the product is the same)
            int off = 0;
            for (int i = 0; i < x->n; i++) {
                const struct lora_module *md = lora_find(&x->ad[i], nm->layer, nm->module);
                if (!md)
                    continue;
                float f = (float)(o->adapters[i].weight * md->scale);
                memcpy(nm->A + (size_t)off * nm->in, md->A, sizeof(float) * (size_t)md->R * md->in);
                for (int r = 0; r < nm->out; r++)
                    for (int q = 0; q < md->R; q++)
                        nm->B[(size_t)r * nm->R + off + q] = f * md->B[(size_t)r * md->R + q];
                off += md->R;
            }
        } else {
            int kk = rank[s];
            size_t numel = (size_t)nm->out * nm->in;
            size_t need = numel + (size_t)nm->out * kk + kk + (size_t)kk * nm->in;
            if ((rc = ensure(&x->scr, &x->scr_cap, need, err)))
                break;
            float *M = x->scr, *U = M + numel, *S = U + (size_t)nm->out * kk, *Vt = S + kk;
            memset(M, 0, sizeof(float) * numel);
            for (int i = 0; i < x->n; i++) {
                const struct lora_module *md = lora_find(&x->ad[i], nm->layer, nm->module);
                if (md)
                    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, nm->out, nm->in, md->R,
                                (float)(o->adapters[i].weight * md->scale), md->B, md->R, md->A, nm->in, 1.0f,
                                M, nm->in);
            }
            char path[96];
            cfg_module_path(nm->layer, (enum cfg_module)nm->module, path, sizeof path);
            struct svd_opts so;
            svd_opts_init(&so);
            so.seed = merge_tensor_seed(o->seed, path);
            if ((rc = svd_truncated(nm->out, nm->in, M, kk, &so, U, S, Vt, NULL, err)))
                break;
            for (int r = 0; r < nm->out; r++)
                for (int q = 0; q < kk; q++)
                    nm->B[(size_t)r * nm->R + q] = U[(size_t)r * kk + q] * S[q];
            memcpy(nm->A, Vt, sizeof(float) * (size_t)kk * nm->in);
        }
        if (nm->bias)
            for (int i = 0; i < x->n; i++) {
                const struct lora_module *md = lora_find(&x->ad[i], nm->layer, nm->module);
                if (md && md->bias)
                    for (int r = 0; r < nm->out; r++)
                        nm->bias[r] += (float)(o->adapters[i].weight * md->scale) * md->bias[r];
            }
        if (o->progress)
            o->progress(o->progress_ctx, k + 1, nl.n_mod, "");
        if (!rc && lk_interrupted)
            rc = lk_errf(err, LK_ERR_INTERRUPTED, "interrupted");
    }
    if (!rc)
        rc = lora_save(&nl, dir, err);
    rep->rank = rmax;
    rep->n_tensors = nl.n_mod;
out:
    lora_release(&nl);
    lk_free(rank);
    lk_free(pats);
    lk_free(keys);
    return rc;
}

// ---- verify: logits of the merged output against the reference ----

#define PROBE_B 2
#define PROBE_T 8

static void probe_tokens(int *tok, int V)
{
    for (int b = 0; b < PROBE_B; b++)
        for (int t = 0; t < PROBE_T; t++)
            tok[b * PROBE_T + t] = (int)((7u + 31u * (unsigned)t + 101u * (unsigned)b * (unsigned)t + 13u * b) %
                                         (unsigned)V);
}

static void logits_diff(const float *a, const float *ref, size_t n, double *out_abs, double *out_rel)
{
    double mx = 0, big = 0;
    for (size_t i = 0; i < n; i++) {
        double d = fabs((double)a[i] - ref[i]);
        mx = d > mx ? d : mx;
        big = fabs(ref[i]) > big ? fabs(ref[i]) : big;
    }
    *out_abs = mx;
    *out_rel = big > 0 ? mx / big : mx;
}

/* The model the merge means, exactly, in float32 in memory: base read, changed by apply. */
static int exact_model(struct merge_ctx *x, const struct st_model *sm, struct model *m, struct lk_err *err)
{
    struct cfg c = x->cfg;
    c.json = NULL;
    if (x->untie)
        c.tie_word_embeddings = 0;
    int rc = model_init(m, &c, err);
    if (rc)
        return rc;
    struct model_tensor *t;
    int n;
    if ((rc = model_weights_tensors(&m->w, &m->cfg, &t, &n, err)))
        return rc;
    for (int i = 0; i < n && !rc; i++) {
        const struct st_tensor *s = st_model_find(sm, t[i].name, NULL);
        if (!s && !strcmp(t[i].name, "lm_head.weight"))
            s = st_model_find(sm, "model.embed_tokens.weight", NULL);
        if (!s) {
            rc = lk_errf(err, LK_ERR_MISSING, "%s: base has no tensor '%s'", x->o->model, t[i].name);
            break;
        }
        tensor_to_f32(t[i].data, s->data, s->dtype, s->numel);
        if (apply(x, t[i].name, t[i].data, t[i].shape[0], t[i].ndim > 1 ? t[i].shape[1] : 1, err) < 0)
            rc = err->code;
    }
    lk_free(t);
    if (rc)
        model_release(m);
    return rc;
}

static int forward_copy(struct model *m, const struct lora *l, const int *tok, float *out, struct lk_err *err)
{
    int rc = model_plan(m, PROBE_B, PROBE_T, 0, err);
    if (!rc)
        rc = model_forward(m, l, tok, NULL, NULL, NULL, 0, NULL, err);
    if (!rc)
        memcpy(out, model_logits(m), sizeof(float) * (size_t)PROBE_B * PROBE_T * (size_t)m->cfg.vocab_size);
    return rc;
}

/* Compares the merged model in folder `dir` with the references below (logits of probe tokens). */
static int verify(struct merge_ctx *x, const struct st_model *sm, const char *dir, struct merge_report *rep,
                  struct lk_err *err)
{
    int V = x->cfg.vocab_size, tok[PROBE_B * PROBE_T], amx = op_amx;
    size_t nl = (size_t)PROBE_B * PROBE_T * (size_t)V;
    probe_tokens(tok, V);
    // every model below through the same float32 kernels (bf16 weights would take the AMX path,
    // float32 ones sgemm: another order of additions), so that the rounded weights' logits and the
    // output file's differ by nothing when the file holds exactly those weights
    op_amx = 0;
    float *ref = lk_malloc(sizeof(float) * nl), *ex = lk_malloc(sizeof(float) * nl);
    float *rd = lk_malloc(sizeof(float) * nl), *got = lk_malloc(sizeof(float) * nl);
    int rc = LK_OK, have_ref = 0;
    struct model m = { 0 };
    if (!ref || !ex || !rd || !got) {
        rc = lk_errf(err, LK_ERR_NOMEM, "out of memory");
        goto out;
    }
    // 1. base + adapter through the engine, when it can run it as PEFT would (one adapter,
    //    weight 1, no DoRA); else the reference is the exact float32 merge below
    const struct merge_opts *o = x->o;
    if (x->n == 1 && o->adapters[0].weight == 1.0 && !o->subtract && !x->ad[0].mag_mem &&
        (o->method == MERGE_LINEAR || o->method == MERGE_CAT || o->method == MERGE_SVD)) {
        struct lk_err e2 = { 0 };
        int ok = model_load_keep(&m, o->model, MODEL_KEEP_FILE, &e2) == LK_OK; // as the engine runs it
        int saved = x->ad[0].extras_applied;
        if (ok && model_apply_extras(&m, &x->ad[0], &e2) == LK_OK && forward_copy(&m, &x->ad[0], tok, ref, &e2) == LK_OK)
            have_ref = 1;
        x->ad[0].extras_applied = saved;
        if (o->method == MERGE_SVD && o->rank) // a truncation is not the adapter any more
            have_ref = 0;
        model_release(&m);
    }
    snprintf(rep->verify_ref, sizeof rep->verify_ref, "%s",
             have_ref ? "base+adapter (engine forward)"
             : x->n   ? "exact float32 merge in memory"
                      : "the base in float32");
    // 2. the exact float32 merge, then the same weights rounded once to the output dtypes
    if ((rc = exact_model(x, sm, &m, err)))
        goto out;
    if ((rc = forward_copy(&m, NULL, tok, ex, err)))
        goto out;
    if (!have_ref)
        memcpy(ref, ex, sizeof(float) * nl);
    {
        struct model_tensor *t;
        int n;
        if ((rc = model_weights_tensors(&m.w, &m.cfg, &t, &n, err)))
            goto out;
        for (int i = 0; i < n; i++) {
            const struct st_tensor *s = st_model_find(sm, t[i].name, NULL);
            if (!s)
                s = st_model_find(sm, "model.embed_tokens.weight", NULL);
            enum tensor_dtype d = out_dtype(x, s->dtype);
            if (d == TENSOR_F32)
                continue;
            for (size_t j = 0; j < t[i].numel; j++) {
                uint16_t h = d == TENSOR_BF16 ? tensor_f32_to_bf16(t[i].data[j]) : tensor_f32_to_f16(t[i].data[j]);
                t[i].data[j] = d == TENSOR_BF16 ? tensor_bf16_to_f32(h) : tensor_f16_to_f32(h);
            }
        }
        lk_free(t);
    }
    if (x->gguf && (rc = round_gguf(x, &m, err)))
        goto out;
    if ((rc = forward_copy(&m, NULL, tok, rd, err)))
        goto out;
    model_release(&m);
    // 3. the merged output as any reader loads it (the engine's way; model_load reads a .gguf too)
    if ((rc = model_load_keep(&m, dir, MODEL_KEEP_FILE, err)) || (rc = forward_copy(&m, NULL, tok, got, err)))
        goto out;
    logits_diff(got, ref, nl, &rep->verify_max_abs, &rep->verify_max_rel);
    logits_diff(rd, ex, nl, &rep->round_max_abs, &rep->round_max_rel);
    rep->verified = 1;
out:
    op_amx = amx;
    model_release(&m);
    lk_free(ref);
    lk_free(ex);
    lk_free(rd);
    lk_free(got);
    return rc;
}

// ---- the whole run ----

int merge_run(const struct merge_opts *o, struct merge_report *rep_in, struct lk_err *err)
{
    struct merge_report rep_local;
    struct merge_report *rep = rep_in ? rep_in : &rep_local;
    memset(rep, 0, sizeof *rep);
    rep->verify_max_abs = rep->verify_max_rel = rep->round_max_abs = rep->round_max_rel = NAN;
    rep->out_dtype = -1;
    rep->gguf_dtype = -1;
    double t0 = lk_now();
    int rc = check_gguf_opts(o, err);
    if (rc || (rc = check_opts(o, err)))
        return rc;
    struct merge_ctx *x = lk_calloc(1, sizeof *x);
    if (!x)
        return lk_errf(err, LK_ERR_NOMEM, "out of memory");
    x->o = o;
    x->gguf = merge_out_is_gguf(o->out);
    struct st_model sm = { 0 };
    struct lk_outdir od = { 0 };
    int cfg_loaded = 0;
    if ((rc = cfg_load(&x->cfg, o->model, err)))
        goto out;
    cfg_loaded = 1;
    // the weights before the adapters: nothing is sized from a config without them
    if ((rc = st_model_open(&sm, o->model, err)))
        goto out;
    for (int i = 0; i < o->n_adapters; i++) {
        if ((rc = lora_load(&x->ad[i], o->adapters[i].dir, &x->cfg, err)))
            goto out;
        x->n++;
    }
    if ((rc = x->gguf ? check_gguf_out(o, err) : lk_outdir_check(o->out, o->overwrite, err)))
        goto out;
    if ((rc = check_base(x, &sm, err)) || (rc = check_adapters(x, &sm, err)))
        goto out;
    rep->untied = x->untie;
    if (x->gguf) { // one file, written to a temporary name and renamed by the exporter
        rc = write_gguf(x, &sm, rep, err);
    } else { // build beside --out, rename into place when complete
        if ((rc = lk_outdir_begin(&od, o->out, o->overwrite, err)))
            goto out;
        rc = o->into_adapter ? write_adapter(x, od.tmp, rep, err) : write_model(x, &sm, od.tmp, rep, err);
    }
    rep->seconds = lk_now() - t0;
    // a folder is verified before it takes its name, so a failed verification leaves the old
    // output in place (a GGUF is verified as the exporter renamed it)
    if (!rc && o->verify)
        rc = verify(x, &sm, x->gguf ? o->out : od.tmp, rep, err);
    if (!rc && !x->gguf)
        rc = lk_outdir_commit(&od, err);
out:
    lk_outdir_abort(&od);
    st_model_close(&sm);
    for (int i = 0; i < x->n; i++)
        lora_release(&x->ad[i]);
    if (cfg_loaded)
        cfg_release(&x->cfg);
    lk_free(x->buf);
    lk_free(x->scr);
    lk_free(x->io);
    lk_free(x);
    return rc;
}
