/*
 * diff.c - the comparison engine of `lorakit diff`: opens two folders (models or adapters),
 * lines their tensors up by name and reports, per tensor, what changed: norms, spectrum,
 * effective and energy ranks; between two adapters the cosine and subspace similarity of
 * their changes; against a base the amplification factor and intruder dimensions.
 * One tensor at a time; low-rank changes stay in factor form (see diff.h for the rules).
 * Owns: the two opened sides, the base's weights, the per-tensor results.
 */
#include "diff.h"

#include <cJSON.h>
#include <cblas.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "cfg.h"
#include "lora.h"
#include "rdb.h"
#include "st.h"
#include "tensor.h"

static int imin(int a, int b)
{
    return a < b ? a : b;
}

static int nomem(struct lk_err *err, const char *what)
{
    return lk_errf(err, LK_ERR_NOMEM, "out of memory for %s", what);
}

// ---- options and names ----

void diff_opts_init(struct diff_opts *o)
{
    memset(o, 0, sizeof *o);
    o->n_energy = 3;
    o->energy[0] = 0.5;
    o->energy[1] = 0.9;
    o->energy[2] = 0.99;
    o->top = 5;
    o->intruder_k = DIFF_INTRUDER_K_DEFAULT;
    o->intruder_eps = DIFF_INTRUDER_EPS_DEFAULT;
    o->amplification = 1;
}

int diff_energy_parse(struct diff_opts *o, const char *s, struct lk_err *err)
{
    int n = 0;
    const char *p = s;
    while (*p) {
        char *end;
        double v = strtod(p, &end);
        if (end == p || (*end && *end != ',') || !(v > 0 && v <= 1))
            return lk_errf(err, LK_ERR_USAGE,
                           "option '--energy' wants fractions in (0, 1] like 0.5,0.9,0.99, got '%s'", s);
        if (n == DIFF_MAX_ENERGY)
            return lk_errf(err, LK_ERR_USAGE, "option '--energy' takes at most %d levels", DIFF_MAX_ENERGY);
        o->energy[n++] = v;
        p = *end ? end + 1 : end;
    }
    if (!n)
        return lk_errf(err, LK_ERR_USAGE, "option '--energy' wants at least one level");
    o->n_energy = n;
    return LK_OK;
}

const char *diff_kind_str(enum diff_kind k)
{
    switch (k) {
    case DIFF_MODEL_MODEL: return "model-model";
    case DIFF_ADAPTER_ADAPTER: return "adapter-adapter";
    case DIFF_BASE_ADAPTER: return "base-adapter";
    case DIFF_ADAPTER_MODEL: return "adapter-model";
    }
    return "?";
}

const char *diff_state_str(enum diff_state s)
{
    switch (s) {
    case DIFF_CHANGED: return "changed";
    case DIFF_UNCHANGED: return "unchanged";
    case DIFF_ONLY_A: return "only-a";
    case DIFF_ONLY_B: return "only-b";
    }
    return "?";
}

/* "model.layers.3.mlp.down_proj.weight" -> layer 3, module CFG_DOWN, is_bias 0. */
static void name_parse(const char *name, int *layer, int *module, int *is_bias)
{
    *layer = -1;
    *module = -1;
    *is_bias = 0;
    if (!strncmp(name, "model.layers.", 13)) {
        char *end;
        long l = strtol(name + 13, &end, 10);
        if (end != name + 13 && *end == '.' && l >= 0 && l < 1000000)
            *layer = (int)l;
    }
    const char *last = strrchr(name, '.');
    if (!last || *layer < 0)
        return;
    const char *prev = last;
    while (prev > name && prev[-1] != '.')
        prev--;
    char mod[32];
    size_t len = (size_t)(last - prev);
    if (len == 0 || len >= sizeof mod)
        return;
    memcpy(mod, prev, len);
    mod[len] = 0;
    *module = cfg_module_parse(mod);
    *is_bias = !strcmp(last + 1, "bias");
    if (*module >= 0 && !*is_bias && strcmp(last + 1, "weight"))
        *module = -1;
}

// ---- reading a weight tensor, whole or in row blocks ----

/* Rows of a [m, n] weight: from a safetensors tensor (viewed in place when F32 and aligned,
 * else converted into buf) or from a dense array. */
struct rowsrc {
    const struct st_tensor *t;
    const float *dense;
    int64_t m, n;
    float *buf;   /* owned: one block */
    size_t rows;  /* rows per block */
};

static int rowsrc_init(struct rowsrc *rs, const struct st_tensor *t, const float *dense, int64_t m,
                       int64_t n, struct lk_err *err)
{
    memset(rs, 0, sizeof *rs);
    rs->t = t;
    rs->dense = dense;
    rs->m = m;
    rs->n = n;
    rs->rows = n >= DIFF_ROW_BLOCK ? 1 : (size_t)(DIFF_ROW_BLOCK / n);
    if (rs->rows > (size_t)m)
        rs->rows = (size_t)m;
    if (t && !st_tensor_f32(t) && !(rs->buf = lk_falloc(rs->rows, (size_t)n)))
        return nomem(err, "a block of weight rows");
    return LK_OK;
}

static const float *rowsrc_get(struct rowsrc *rs, int64_t r0, int64_t nr)
{
    size_t off = (size_t)r0 * (size_t)rs->n;
    if (rs->dense)
        return rs->dense + off;
    const float *v = st_tensor_f32(rs->t);
    if (v)
        return v + off;
    size_t es = tensor_dtype_size(rs->t->dtype);
    tensor_to_f32(rs->buf, (const char *)rs->t->data + off * es, rs->t->dtype, (size_t)nr * (size_t)rs->n);
    return rs->buf;
}

static void rowsrc_release(struct rowsrc *rs)
{
    lk_free(rs->buf);
    rs->buf = NULL;
}

/* ‖W‖_F² of a stored tensor, streamed. */
static int tensor_fro2(const struct st_tensor *t, double *out, struct lk_err *err)
{
    int64_t n = t->ndim >= 2 ? t->shape[t->ndim - 1] : 1;
    int64_t m = n ? (int64_t)(t->numel / (size_t)n) : 0;
    *out = 0;
    if (!t->numel)
        return LK_OK;
    struct rowsrc rs;
    if (rowsrc_init(&rs, t, NULL, m, n, err))
        return err->code;
    double s = 0;
    for (int64_t r0 = 0; r0 < m; r0 += (int64_t)rs.rows) {
        int64_t nr = m - r0 < (int64_t)rs.rows ? m - r0 : (int64_t)rs.rows;
        const float *x = rowsrc_get(&rs, r0, nr);
        for (size_t i = 0; i < (size_t)(nr * n); i++)
            s += (double)x[i] * x[i];
    }
    rowsrc_release(&rs);
    *out = s;
    return LK_OK;
}

// ---- statistics of one change ----

static void tensor_blank(struct diff_tensor *t)
{
    memset(t, 0, sizeof *t);
    t->layer = t->module = -1;
    t->factor_rank = t->num_rank = t->amp_rank = t->intruders = -1;
    t->fro = t->w_fro = t->rel = t->spectral = t->stable_rank = t->eff_rank = NAN;
    t->cosine = t->fro_a = t->fro_b = t->amplification = t->intruder_min_cos = NAN;
    for (int i = 0; i < DIFF_MAX_ENERGY; i++)
        t->energy_rank[i] = -1;
}

static void set_norms(struct diff_tensor *t, double total, double w_fro2)
{
    t->fro = sqrt(total > 0 ? total : 0);
    t->w_fro = w_fro2 > 0 ? sqrt(w_fro2) : NAN;
    t->rel = t->fro / t->w_fro;
    t->has_stats = 1;
}

/* Spectrum figures from k singular values S (descending, all the non-zero ones of ΔW). */
static void set_spectrum(struct diff_tensor *t, const float *S, int k, double total, int m, int n,
                         const struct diff_opts *o)
{
    t->num_rank = total > 0 ? svd_numerical_rank(S, k, m, n) : 0;
    struct svd_metrics mt;
    svd_metrics_compute(S, t->num_rank, total, &mt);
    t->spectral = k ? S[0] : 0;
    t->stable_rank = mt.stable_rank;
    t->eff_rank = t->num_rank ? mt.effective_rank : 0;
    for (int i = 0; i < o->n_energy; i++)
        t->energy_rank[i] = total > 0 ? svd_energy_rank(S, k, total, o->energy[i]) : 0;
    t->n_top = imin(o->top, k);
    for (int i = 0; i < t->n_top; i++)
        t->top[i] = S[i];
}

int diff_dense_stats(int m, int n, const float *dW, double w_fro2, const struct diff_opts *o,
                     struct diff_tensor *t, struct lk_err *err)
{
    double total = svd_fro2(m, n, dW);
    if (!isfinite(total))
        return lk_errf(err, LK_ERR_NUMERIC, "change has a non-finite value");
    set_norms(t, total, w_fro2);
    if (n == 1 || m == 1) {
        t->spectral = t->fro;
        return LK_OK;
    }
    int p = imin(m, n);
    if (total <= 0) {
        set_spectrum(t, NULL, 0, 0, m, n, o);
        return LK_OK;
    }
    float *S = lk_falloc((size_t)p, 1);
    if (!S)
        return nomem(err, "singular values");
    int rc = svd_values(m, n, dW, S, err);
    if (!rc)
        set_spectrum(t, S, p, total, m, n, o);
    lk_free(S);
    return rc;
}

int diff_factor_stats(int m, int n, int r, float s, const float *B, const float *A,
                      double w_fro2, const struct diff_opts *o, struct diff_tensor *t,
                      float *out_U, float *out_Vt, struct lk_err *err)
{
    double total;
    if (svd_factor_fro2(m, n, r, s, B, A, &total, err))
        return err->code;
    if (!isfinite(total))
        return lk_errf(err, LK_ERR_NUMERIC, "change has a non-finite value");
    set_norms(t, total, w_fro2);
    t->from_factors = 1;
    t->factor_rank = r;
    if (total <= 0) {
        set_spectrum(t, NULL, 0, 0, m, n, o);
        return LK_OK;
    }
    float *U = out_U ? out_U : lk_falloc((size_t)m, (size_t)r);
    float *Vt = out_Vt ? out_Vt : lk_falloc((size_t)r, (size_t)n);
    float *S = lk_falloc((size_t)r, 1);
    int rc = LK_OK;
    if (!U || !Vt || !S)
        rc = nomem(err, "a factor SVD");
    else if (!(rc = svd_factor(m, n, r, s, B, A, r, U, S, Vt, err)))
        set_spectrum(t, S, r, total, m, n, o);
    if (!out_U)
        lk_free(U);
    if (!out_Vt)
        lk_free(Vt);
    lk_free(S);
    return rc;
}

/* Moves the first k columns of U [m, r] to the front, as a packed [m, k] (in place). */
static void cols_pack(float *U, int m, int r, int k)
{
    if (k == r)
        return;
    for (int i = 0; i < m; i++)
        memmove(U + (size_t)i * k, U + (size_t)i * r, (size_t)k * sizeof(float));
}

int diff_factor_pair(int m, int n, int r1, float s1, const float *B1, const float *A1, int r2,
                     float s2, const float *B2, const float *A2, struct diff_tensor *t,
                     struct lk_err *err)
{
    double f1, f2;
    if (svd_factor_fro2(m, n, r1, s1, B1, A1, &f1, err) ||
        svd_factor_fro2(m, n, r2, s2, B2, A2, &f2, err) ||
        svd_factor_cosine(m, n, r1, s1, B1, A1, r2, s2, B2, A2, &t->cosine, err))
        return err->code;
    t->fro_a = sqrt(f1);
    t->fro_b = sqrt(f2);
    if (!(f1 > 0) || !(f2 > 0))
        return LK_OK; // no directions to compare
    float *U1 = lk_falloc((size_t)m, (size_t)r1), *Vt1 = lk_falloc((size_t)r1, (size_t)n);
    float *U2 = lk_falloc((size_t)m, (size_t)r2), *Vt2 = lk_falloc((size_t)r2, (size_t)n);
    float *S1 = lk_falloc((size_t)r1, 1), *S2 = lk_falloc((size_t)r2, 1);
    int rc = LK_OK;
    if (!U1 || !Vt1 || !U2 || !Vt2 || !S1 || !S2) {
        rc = nomem(err, "singular vectors");
        goto done;
    }
    if ((rc = svd_factor(m, n, r1, s1, B1, A1, r1, U1, S1, Vt1, err)) ||
        (rc = svd_factor(m, n, r2, s2, B2, A2, r2, U2, S2, Vt2, err)))
        goto done;
    // only the numerically non-zero directions: the rest are arbitrary completions
    int k1 = svd_numerical_rank(S1, r1, m, n), k2 = svd_numerical_rank(S2, r2, m, n);
    if (k1 < 1 || k2 < 1)
        goto done;
    t->n_grid_a = svd_grid_sizes(k1, t->grid_a);
    t->n_grid_b = svd_grid_sizes(k2, t->grid_b);
    size_t ng = (size_t)t->n_grid_a * (size_t)t->n_grid_b;
    t->phi_right = lk_malloc(ng * sizeof(double));
    t->phi_left = lk_malloc(ng * sizeof(double));
    if (!t->phi_right || !t->phi_left) {
        rc = nomem(err, "a similarity grid");
        goto done;
    }
    cols_pack(U1, m, r1, k1);
    cols_pack(U2, m, r2, k2);
    if ((rc = svd_subspace_sim(n, k1, Vt1, SVD_BASIS_ROWS, k2, Vt2, SVD_BASIS_ROWS, t->phi_right, err)))
        goto done;
    rc = svd_subspace_sim(m, k1, U1, SVD_BASIS_COLS, k2, U2, SVD_BASIS_COLS, t->phi_left, err);
done:
    if (rc) {
        lk_free(t->phi_right);
        lk_free(t->phi_left);
        t->phi_right = t->phi_left = NULL;
        t->n_grid_a = t->n_grid_b = 0;
    }
    lk_free(U1);
    lk_free(Vt1);
    lk_free(U2);
    lk_free(Vt2);
    lk_free(S1);
    lk_free(S2);
    return rc;
}

/* ‖ΔW‖_F / ‖U_kᵀ W V_kᵀ‖_F with W read in row blocks: T = W V_kᵀ [m, k], then U_kᵀ T [k, k].
 * U has leading dimension ldu (its first k columns are used), Vt's first k rows. */
static int amp_core(struct rowsrc *rs, int m, int n, int k, const float *U, int ldu,
                    const float *Vt, double dw_fro, double *out, struct lk_err *err)
{
    float *T = lk_falloc((size_t)m, (size_t)k), *C = lk_falloc((size_t)k, (size_t)k);
    if (!T || !C) {
        lk_free(T);
        lk_free(C);
        return nomem(err, "the amplification");
    }
    for (int64_t r0 = 0; r0 < m; r0 += (int64_t)rs->rows) {
        int nr = (int)(m - r0 < (int64_t)rs->rows ? m - r0 : (int64_t)rs->rows);
        const float *W = rowsrc_get(rs, r0, nr);
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, nr, k, n, 1.0f, W, n, Vt, n, 0.0f,
                    T + (size_t)r0 * k, k);
    }
    cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, k, k, m, 1.0f, U, ldu, T, k, 0.0f, C, k);
    double p = sqrt(svd_fro2(k, k, C));
    *out = p > 0 ? dw_fro / p : INFINITY;
    lk_free(T);
    lk_free(C);
    return LK_OK;
}

int diff_amplification(int m, int n, const float *W, int r, const float *U, const float *Vt,
                       double dw_fro, double *out, struct lk_err *err)
{
    if (m < 1 || n < 1 || r < 1 || r > imin(m, n))
        return lk_errf(err, LK_ERR_SHAPE, "amplification: rank %d out of range for %d x %d", r, m, n);
    struct rowsrc rs;
    if (rowsrc_init(&rs, NULL, W, m, n, err))
        return err->code;
    int rc = amp_core(&rs, m, n, r, U, r, Vt, dw_fro, out, err);
    rowsrc_release(&rs);
    return rc;
}

int diff_intruders(int m, int n, const float *W, const float *W_tuned, int k, double eps,
                   int *out_count, double *out_min_cos, struct lk_err *err)
{
    int p = imin(m, n);
    if (m < 1 || n < 1 || k < 1)
        return lk_errf(err, LK_ERR_SHAPE, "intruders: bad shape %d x %d or k %d", m, n, k);
    if (k > p)
        k = p;
    float *Ub = lk_falloc((size_t)m, (size_t)p), *Sb = lk_falloc((size_t)p, 1);
    float *Vb = lk_falloc((size_t)p, (size_t)n);
    float *Ut = lk_falloc((size_t)m, (size_t)k), *St = lk_falloc((size_t)k, 1);
    float *Vtt = lk_falloc((size_t)k, (size_t)n), *C = lk_falloc((size_t)k, (size_t)p);
    int rc = LK_OK;
    if (!Ub || !Sb || !Vb || !Ut || !St || !Vtt || !C) {
        rc = nomem(err, "the intruder SVDs");
        goto done;
    }
    // every left singular vector of the base (PEFT compares with all of them), top k of the tuned
    struct svd_opts so;
    svd_opts_init(&so);
    if ((rc = svd_exact(m, n, W, p, Ub, Sb, Vb, err)) ||
        (rc = svd_truncated(m, n, W_tuned, k, &so, Ut, St, Vtt, NULL, err)))
        goto done;
    cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, k, p, m, 1.0f, Ut, k, Ub, p, 0.0f, C, p);
    int count = 0;
    double min_cos = INFINITY;
    for (int i = 0; i < k; i++) {
        double mx = 0;
        for (int j = 0; j < p; j++)
            mx = fmax(mx, fabs((double)C[(size_t)i * p + j]));
        count += mx < eps;
        min_cos = fmin(min_cos, mx);
    }
    *out_count = count;
    if (out_min_cos)
        *out_min_cos = min_cos;
done:
    lk_free(Ub);
    lk_free(Sb);
    lk_free(Vb);
    lk_free(Ut);
    lk_free(St);
    lk_free(Vtt);
    lk_free(C);
    return rc;
}

// ---- the two sides ----

struct diff_side {
    int is_adapter;
    char *dir;              /* owned */
    struct st_model st;     /* model side: its weights */
    int have_st;
    struct lora lora;       /* adapter side */
    int have_lora;
};

/* One tensor name of the union of both sides. */
struct entry {
    const char *name;             /* borrowed (st header, cfg_tensors array, lora extra, names) */
    int ndim;
    int64_t rows, cols;
    const struct st_tensor *t[2]; /* dense source per side, or NULL */
    int in[2];
    int zero_base;                /* a lora_B.bias where the base has no bias */
};

struct diff_priv {
    struct cfg cfg;               /* adapters: the base config */
    int have_cfg;
    struct st_model base;         /* adapters: the base's weights (when have_base_weights) */
    int have_base;
    struct cfg_tensor *ct;        /* owned: cfg_tensors (universe without base weights) */
    int n_ct;
    char **names;                 /* owned extra names (zero-base biases) */
    int n_names;
    struct entry *e;
    int n_e;
};

static int has_file(const char *dir, const char *name)
{
    char *p = lk_path_join(dir, name);
    int ok = p && lk_file_exists(p);
    lk_free(p);
    return ok;
}

static int has_weights(const char *dir)
{
    return has_file(dir, "model.safetensors") || has_file(dir, "model.safetensors.index.json");
}

static int same_dir(const char *a, const char *b)
{
    struct stat sa, sb;
    if (stat(a, &sa) || stat(b, &sb))
        return 0;
    return sa.st_dev == sb.st_dev && sa.st_ino == sb.st_ino;
}

static int side_open(struct diff_side *s, const char *dir, struct lk_err *err)
{
    memset(s, 0, sizeof *s);
    if (!lk_is_dir(dir))
        return lk_errf(err, LK_ERR_IO, "'%s' is not a folder (want a model or adapter folder)", dir);
    if (!(s->dir = lk_strdup(dir)))
        return nomem(err, "a path");
    if (has_file(dir, "adapter_config.json")) {
        s->is_adapter = 1;
        return LK_OK;
    }
    if (!has_file(dir, "config.json") && !has_weights(dir))
        return lk_errf(err, LK_ERR_MISSING,
                       "'%s' is neither a model folder (config.json) nor an adapter folder "
                       "(adapter_config.json)", dir);
    if (st_model_open(&s->st, dir, err))
        return err->code;
    s->have_st = 1;
    return LK_OK;
}

static void side_close(struct diff_side *s)
{
    if (!s)
        return;
    if (s->have_st)
        st_model_close(&s->st);
    if (s->have_lora)
        lora_release(&s->lora);
    lk_free(s->dir);
    memset(s, 0, sizeof *s);
}

/* The adapter's base folder: --base, else base_model_name_or_path as given or relative to the
 * adapter folder, when it holds config.json. NULL (no error) when none is found. */
static int base_resolve(const char *adapter_dir, const char *flag, char **out, struct lk_err *err)
{
    *out = NULL;
    if (flag) {
        if (!has_file(flag, "config.json"))
            return lk_errf(err, LK_ERR_MISSING, "--base '%s' has no config.json", flag);
        *out = lk_strdup(flag);
        return *out ? LK_OK : nomem(err, "a path");
    }
    struct lora_config lc;
    if (lora_config_load(&lc, adapter_dir, err))
        return err->code;
    if (lc.base_model[0]) {
        if (has_file(lc.base_model, "config.json"))
            *out = lk_strdup(lc.base_model);
        else if (lc.base_model[0] != '/') {
            char *p = lk_path_join(adapter_dir, lc.base_model);
            if (p && has_file(p, "config.json"))
                *out = p;
            else
                lk_free(p);
        }
    }
    lora_config_release(&lc);
    return LK_OK;
}

static int side_load_adapter(struct diff_side *s, const struct cfg *c, struct lk_err *err)
{
    if (lora_load(&s->lora, s->dir, c, err))
        return err->code;
    s->have_lora = 1;
    if (s->lora.cfg.use_dora)
        return lk_errf(err, LK_ERR_UNSUPPORTED,
                       "%s: DoRA adapters are not supported by diff (their change is not s*B*A)", s->dir);
    if (s->lora.head_A || s->lora.n_tok[0] || s->lora.n_tok[1])
        return lk_errf(err, LK_ERR_UNSUPPORTED, "%s: diff does not cover a LoRA on lm_head or trainable tokens; "
                       "merge the adapter (lorakit merge) and diff the merged model", s->dir);
    return LK_OK;
}

// ---- the union of tensor names ----

static int entry_cmp(const void *a, const void *b)
{
    return strcmp(((const struct entry *)a)->name, ((const struct entry *)b)->name);
}

static int entries_add(struct diff_priv *p, int *cap, const char *name, int side, int ndim,
                       const int64_t *shape, const struct st_tensor *t, struct lk_err *err)
{
    if (p->n_e == *cap) {
        int nc = *cap ? *cap * 2 : 256;
        struct entry *ne = lk_realloc(p->e, sizeof *ne * (size_t)nc);
        if (!ne)
            return nomem(err, "the tensor list");
        p->e = ne;
        *cap = nc;
    }
    struct entry *e = &p->e[p->n_e++];
    memset(e, 0, sizeof *e);
    e->name = name;
    e->ndim = ndim;
    e->rows = ndim >= 1 ? shape[0] : 1;
    int64_t cols = 1;
    for (int i = 1; i < ndim; i++)
        cols *= shape[i];
    e->cols = cols;
    e->t[side] = t;
    e->in[side] = 1;
    return LK_OK;
}

/* Adds side's universe: a model's tensors, or for an adapter the base's tensors (weights or,
 * without weights, the config's list) plus biases the adapter adds where the base has none. */
static int universe_add(struct diff *d, int side, int *cap, struct lk_err *err)
{
    struct diff_priv *p = d->priv;
    struct diff_side *s = side ? d->b : d->a, *other = side ? d->a : d->b;
    const struct st_model *st = s->have_st ? &s->st
                                : p->have_base ? &p->base
                                : d->kind == DIFF_BASE_ADAPTER ? &other->st
                                : NULL;
    if (st) {
        for (int f = 0; f < st->n_files; f++)
            for (int i = 0; i < st->files[f].n; i++) {
                const struct st_tensor *t = &st->files[f].t[i];
                if (entries_add(p, cap, t->name, side, t->ndim, t->shape, t, err))
                    return err->code;
            }
    } else {
        for (int i = 0; i < p->n_ct; i++)
            if (entries_add(p, cap, p->ct[i].name, side, p->ct[i].ndim, p->ct[i].shape, NULL, err))
                return err->code;
    }
    if (!s->is_adapter)
        return LK_OK;
    // lora_B.bias on a module whose base has no bias: the base value is zero
    const struct lora *l = &s->lora;
    for (int k = 0; k < l->n_mod; k++) {
        if (!l->mod[k].bias)
            continue;
        char path[96], name[128];
        cfg_module_path(l->mod[k].layer, (enum cfg_module)l->mod[k].module, path, sizeof path);
        snprintf(name, sizeof name, "%s.bias", path);
        int found = 0;
        for (int i = 0; i < p->n_e && !found; i++)
            found = !strcmp(p->e[i].name, name);
        if (found)
            continue;
        char **nn = lk_realloc(p->names, sizeof *nn * (size_t)(p->n_names + 1));
        if (!nn)
            return nomem(err, "names");
        p->names = nn;
        if (!(p->names[p->n_names] = lk_strdup(name)))
            return nomem(err, "names");
        int64_t shape[1] = { l->mod[k].out };
        if (entries_add(p, cap, p->names[p->n_names++], side, 1, shape, NULL, err))
            return err->code;
        p->e[p->n_e - 1].zero_base = 1;
    }
    return LK_OK;
}

/* Sorts by name and merges the two sides' rows of the same name. */
static int entries_merge(struct diff_priv *p, struct lk_err *err)
{
    qsort(p->e, (size_t)p->n_e, sizeof *p->e, entry_cmp);
    int w = 0;
    for (int i = 0; i < p->n_e; i++) {
        if (w > 0 && !strcmp(p->e[w - 1].name, p->e[i].name)) {
            struct entry *x = &p->e[w - 1], *y = &p->e[i];
            int side = y->in[0] ? 0 : 1;
            if (x->in[side])
                return lk_errf(err, LK_ERR_FORMAT, "tensor '%s' appears twice", x->name);
            if (x->rows != y->rows || x->cols != y->cols)
                return lk_errf(err, LK_ERR_SHAPE, "tensor '%s' is [%lld, %lld] in A but [%lld, %lld] in B",
                               x->name, (long long)(x->in[0] ? x->rows : y->rows),
                               (long long)(x->in[0] ? x->cols : y->cols),
                               (long long)(x->in[0] ? y->rows : x->rows),
                               (long long)(x->in[0] ? y->cols : x->cols));
            x->in[side] = 1;
            x->t[side] = y->t[side];
            x->zero_base |= y->zero_base;
        } else {
            p->e[w++] = p->e[i];
        }
    }
    p->n_e = w;
    return LK_OK;
}

// ---- opening ----

void diff_close(struct diff *d)
{
    if (!d)
        return;
    side_close(d->a);
    side_close(d->b);
    lk_free(d->a);
    lk_free(d->b);
    struct diff_priv *p = d->priv;
    if (p) {
        if (p->have_cfg)
            cfg_release(&p->cfg);
        if (p->have_base)
            st_model_close(&p->base);
        lk_free(p->ct);
        for (int i = 0; i < p->n_names; i++)
            lk_free(p->names[i]);
        lk_free(p->names);
        lk_free(p->e);
        lk_free(p);
    }
    for (int i = 0; i < d->n; i++) {
        lk_free(d->t[i].phi_right);
        lk_free(d->t[i].phi_left);
    }
    lk_free(d->t);
    lk_free(d->base_dir);
    memset(d, 0, sizeof *d);
}

/* Opens the adapter base's config and, when present, its weights. */
static int base_open(struct diff *d, int need_weights, struct lk_err *err)
{
    struct diff_priv *p = d->priv;
    if (cfg_load(&p->cfg, d->base_dir, err))
        return err->code;
    p->have_cfg = 1;
    if (has_weights(d->base_dir)) {
        if (st_model_open(&p->base, d->base_dir, err))
            return err->code;
        p->have_base = 1;
        d->have_base_weights = 1;
    } else if (need_weights) {
        return lk_errf(err, LK_ERR_MISSING,
                       "base '%s' has no weights (model.safetensors): base + adapter cannot be formed",
                       d->base_dir);
    } else {
        snprintf(d->note, sizeof d->note,
                 "base '%s' has no weights: relative changes are unknown", d->base_dir);
    }
    if (cfg_tensors(&p->cfg, &p->ct, &p->n_ct, err))
        return lk_err_prefix(err, "%s", d->base_dir);
    return LK_OK;
}

static int diff_open_inner(struct diff *d, const char *a, const char *b, const struct diff_opts *o,
                           struct lk_err *err)
{
    if (!(d->a = lk_calloc(1, sizeof *d->a)) || !(d->b = lk_calloc(1, sizeof *d->b)) ||
        !(d->priv = lk_calloc(1, sizeof(struct diff_priv))))
        return nomem(err, "the comparison");
    struct diff_priv *p = d->priv;
    if (side_open(d->a, a, err) || side_open(d->b, b, err))
        return err->code;
    int aa = d->a->is_adapter, ba = d->b->is_adapter;
    if (!aa && !ba) {
        d->kind = DIFF_MODEL_MODEL;
    } else if (aa && ba) {
        d->kind = DIFF_ADAPTER_ADAPTER;
        if (base_resolve(a, o->base, &d->base_dir, err))
            return err->code;
        if (!d->base_dir && base_resolve(b, NULL, &d->base_dir, err))
            return err->code;
        if (!d->base_dir)
            return lk_errf(err, LK_ERR_MISSING,
                           "cannot find the base of '%s' or '%s' (base_model_name_or_path is not a "
                           "local folder; give --base DIR)", a, b);
        if (base_open(d, 0, err) || side_load_adapter(d->a, &p->cfg, err) ||
            side_load_adapter(d->b, &p->cfg, err))
            return err->code;
    } else {
        struct diff_side *ad = aa ? d->a : d->b, *md = aa ? d->b : d->a;
        if (base_resolve(ad->dir, o->base, &d->base_dir, err))
            return err->code;
        if (!d->base_dir || same_dir(d->base_dir, md->dir)) {
            d->kind = DIFF_BASE_ADAPTER;
            if (!d->base_dir) {
                snprintf(d->note, sizeof d->note,
                         "the adapter's base was not found: '%s' is taken as its base", md->dir);
                if (!(d->base_dir = lk_strdup(md->dir)))
                    return nomem(err, "a path");
            }
            if (cfg_load(&p->cfg, md->dir, err))
                return err->code;
            p->have_cfg = 1;
            d->have_base_weights = 1;
            if (side_load_adapter(ad, &p->cfg, err))
                return err->code;
        } else {
            d->kind = DIFF_ADAPTER_MODEL;
            if (base_open(d, 1, err) || side_load_adapter(ad, &p->cfg, err))
                return err->code;
        }
    }
    int cap = 0;
    if (universe_add(d, 0, &cap, err) || universe_add(d, 1, &cap, err) || entries_merge(p, err))
        return err->code;
    // a bias the adapter adds where the base has none starts from zero on both sides
    if (d->kind != DIFF_ADAPTER_MODEL)
        for (int i = 0; i < p->n_e; i++)
            if (p->e[i].zero_base)
                p->e[i].in[0] = p->e[i].in[1] = 1;
    // a model compared with an adapter on it: one dense source for both sides
    if (d->kind == DIFF_BASE_ADAPTER)
        for (int i = 0; i < p->n_e; i++) {
            struct entry *e = &p->e[i];
            const struct st_tensor *t = e->t[0] ? e->t[0] : e->t[1];
            e->t[0] = e->t[1] = t;
        }
    return LK_OK;
}

int diff_open(struct diff *d, const char *a, const char *b, const struct diff_opts *o,
              struct lk_err *err)
{
    memset(d, 0, sizeof *d);
    int rc = diff_open_inner(d, a, b, o, err);
    if (rc)
        diff_close(d);
    return rc;
}

// ---- what an adapter does to one tensor ----

struct mods {
    const struct lora *l;
    const struct lora_module *fac;  /* s·B·A on this weight */
    const struct lora_module *bias; /* s·bias on this bias */
    const struct lora_extra *ext;   /* replaces the tensor */
    int embed;                      /* the embedding adapter applies */
};

static void mods_find(const struct diff_side *s, const struct entry *e, struct mods *m)
{
    memset(m, 0, sizeof *m);
    if (!s->is_adapter)
        return;
    const struct lora *l = &s->lora;
    m->l = l;
    for (int i = 0; i < l->n_extra; i++)
        if (!strcmp(l->extra[i].name, e->name))
            m->ext = &l->extra[i];
    int layer, module, is_bias;
    name_parse(e->name, &layer, &module, &is_bias);
    if (layer >= 0 && module >= 0 && layer < l->L) {
        const struct lora_module *md = lora_find(l, layer, module);
        if (md && !is_bias)
            m->fac = md;
        if (md && is_bias && md->bias)
            m->bias = md;
    }
    if (l->embed_A && !strcmp(e->name, "model.embed_tokens.weight"))
        m->embed = 1;
}

static int mods_any(const struct mods *m)
{
    return m->fac || m->bias || m->ext || m->embed;
}

static int floats_eq(const float *a, const float *b, size_t n)
{
    return !memcmp(a, b, n * sizeof(float));
}

/* Both adapters do exactly the same to this tensor. */
static int mods_equal(const struct mods *a, const struct mods *b)
{
    if (!!a->fac != !!b->fac || !!a->bias != !!b->bias || !!a->ext != !!b->ext || a->embed != b->embed)
        return 0;
    if (a->fac && (a->fac->R != b->fac->R || a->fac->scale != b->fac->scale ||
                   !floats_eq(a->fac->A, b->fac->A, (size_t)a->fac->R * a->fac->in) ||
                   !floats_eq(a->fac->B, b->fac->B, (size_t)a->fac->R * a->fac->out)))
        return 0;
    if (a->bias && (a->bias->scale != b->bias->scale ||
                    !floats_eq(a->bias->bias, b->bias->bias, (size_t)a->bias->out)))
        return 0;
    if (a->ext && !floats_eq(a->ext->data, b->ext->data,
                             (size_t)a->ext->shape[0] * (size_t)(a->ext->ndim > 1 ? a->ext->shape[1] : 1)))
        return 0;
    if (a->embed) {
        const struct lora *x = a->l, *y = b->l;
        if (x->embed_R != y->embed_R || x->embed_scale != y->embed_scale ||
            !floats_eq(x->embed_A, y->embed_A, (size_t)x->embed_R * x->embed_V) ||
            !floats_eq(x->embed_B, y->embed_B, (size_t)x->embed_R * x->embed_C))
            return 0;
    }
    return 1;
}

/* A factor form s·B·A [m, n] of an adapter's change to a 2-D tensor. */
struct fac {
    int r;
    float s;
    const float *B, *A;  /* B [m, r], A [r, n] */
    float *own;          /* owned: transposed embedding factors */
};

static int fac_get(const struct mods *m, struct fac *f, struct lk_err *err)
{
    memset(f, 0, sizeof *f);
    if (m->fac) {
        f->r = m->fac->R;
        f->s = m->fac->scale;
        f->B = m->fac->B;
        f->A = m->fac->A;
        return LK_OK;
    }
    // embedding: ΔE [V, C] = s·(B_e A_e)ᵀ = s·A_eᵀ B_eᵀ, A_e [R, V], B_e [C, R]
    const struct lora *l = m->l;
    int R = l->embed_R, V = l->embed_V, C = l->embed_C;
    if (!(f->own = lk_falloc((size_t)R, (size_t)V + (size_t)C)))
        return nomem(err, "embedding factors");
    float *Bt = f->own, *At = f->own + (size_t)V * R;
    for (int i = 0; i < R; i++)
        for (int v = 0; v < V; v++)
            Bt[(size_t)v * R + i] = l->embed_A[(size_t)i * V + v];
    for (int c = 0; c < C; c++)
        for (int i = 0; i < R; i++)
            At[(size_t)i * C + c] = l->embed_B[(size_t)c * R + i];
    f->r = R;
    f->s = l->embed_scale;
    f->B = Bt;
    f->A = At;
    return LK_OK;
}

/* Writes a side's value of a tensor into buf [rows * cols]: the dense source (or the
 * adapter's replacement, or zeros), plus the adapter's changes. LK_ERR_MISSING when the base
 * value is needed but its weights are not available. */
static int value_get(const struct entry *e, const struct st_tensor *t, const struct mods *m,
                     float *buf, struct lk_err *err)
{
    size_t n = (size_t)e->rows * (size_t)e->cols;
    if (m->ext)
        memcpy(buf, m->ext->data, n * sizeof(float));
    else if (t) {
        if (st_tensor_to_f32(t, buf, err))
            return err->code;
    } else if (e->zero_base)
        memset(buf, 0, n * sizeof(float));
    else
        return lk_errf(err, LK_ERR_MISSING, "the base weights are needed and were not found");
    int m_ = (int)e->rows, n_ = (int)e->cols;
    if (m->fac)
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, m_, n_, m->fac->R, m->fac->scale,
                    m->fac->B, m->fac->R, m->fac->A, n_, 1.0f, buf, n_);
    if (m->bias)
        for (size_t i = 0; i < n; i++)
            buf[i] += m->bias->scale * m->bias->bias[i];
    if (m->embed) {
        const struct lora *l = m->l;
        // buf [V, C] += s·A_eᵀ B_eᵀ
        cblas_sgemm(CblasRowMajor, CblasTrans, CblasTrans, l->embed_V, l->embed_C, l->embed_R,
                    l->embed_scale, l->embed_A, l->embed_V, l->embed_B, l->embed_R, 1.0f, buf,
                    l->embed_C);
    }
    return LK_OK;
}

// ---- comparing one tensor ----

/* ΔW = mods_B - mods_A in factor form, on a base shared by both sides. */
static int compare_factors(struct diff *d, const struct entry *e, const struct mods *ma,
                           const struct mods *mb, const struct diff_opts *o, struct diff_tensor *t,
                           struct lk_err *err)
{
    int m = (int)e->rows, n = (int)e->cols;
    struct fac fa = { 0 }, fb = { 0 };
    int ha = ma->fac || ma->embed, hb = mb->fac || mb->embed;
    float *Bc = NULL, *Ac = NULL, *U = NULL, *Vt = NULL, *dense = NULL;
    int rc = LK_OK;
    if ((ha && (rc = fac_get(ma, &fa, err))) || (hb && (rc = fac_get(mb, &fb, err))))
        goto done;
    // [s_B·B_B | -s_A·B_A] [A_B; A_A], scale folded into the left factor
    int r = fa.r + fb.r;
    if (!(Bc = lk_falloc((size_t)m, (size_t)r)) || !(Ac = lk_falloc((size_t)r, (size_t)n))) {
        rc = nomem(err, "the combined factors");
        goto done;
    }
    for (int i = 0; i < m; i++) {
        for (int j = 0; j < fb.r; j++)
            Bc[(size_t)i * r + j] = fb.s * fb.B[(size_t)i * fb.r + j];
        for (int j = 0; j < fa.r; j++)
            Bc[(size_t)i * r + fb.r + j] = -fa.s * fa.B[(size_t)i * fa.r + j];
    }
    if (fb.r)
        memcpy(Ac, fb.A, (size_t)fb.r * n * sizeof(float));
    if (fa.r)
        memcpy(Ac + (size_t)fb.r * n, fa.A, (size_t)fa.r * n * sizeof(float));
    const struct st_tensor *wt = e->t[0];
    double w_fro2 = NAN;
    if (wt && (rc = tensor_fro2(wt, &w_fro2, err)))
        goto done;
    if (r > imin(m, n)) {
        // rank above min(m, n): the dense matrix is no larger than its factors
        if (!(dense = lk_falloc((size_t)m, (size_t)n))) {
            rc = nomem(err, "a small change");
            goto done;
        }
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, m, n, r, 1.0f, Bc, r, Ac, n, 0.0f,
                    dense, n);
        rc = diff_dense_stats(m, n, dense, w_fro2, o, t, err);
        goto done;
    }
    int want_vec = d->kind == DIFF_BASE_ADAPTER && wt && t->module >= 0 && o->amplification;
    if (want_vec && (!(U = lk_falloc((size_t)m, (size_t)r)) || !(Vt = lk_falloc((size_t)r, (size_t)n)))) {
        rc = nomem(err, "singular vectors");
        goto done;
    }
    if ((rc = diff_factor_stats(m, n, r, 1.0f, Bc, Ac, w_fro2, o, t, U, Vt, err)))
        goto done;
    if (ha && hb && fa.r <= imin(m, n) && fb.r <= imin(m, n) &&
        (rc = diff_factor_pair(m, n, fa.r, fa.s, fa.B, fa.A, fb.r, fb.s, fb.B, fb.A, t, err)))
        goto done;
    if (want_vec && t->num_rank > 0) {
        struct rowsrc rs;
        if ((rc = rowsrc_init(&rs, wt, NULL, m, n, err)))
            goto done;
        t->amp_rank = t->num_rank;
        rc = amp_core(&rs, m, n, t->num_rank, U, r, Vt, t->fro, &t->amplification, err);
        rowsrc_release(&rs);
        if (rc)
            goto done;
    }
    if (d->kind == DIFF_BASE_ADAPTER && wt && t->module >= 0 && o->intruder_k > 0) {
        // the only dense step: W and W + s·B·A of the adapter, one SVD each
        const struct fac *f = ha ? &fa : &fb;
        float *W = lk_falloc((size_t)m, (size_t)n), *Wt = lk_falloc((size_t)m, (size_t)n);
        if (!W || !Wt) {
            lk_free(W);
            lk_free(Wt);
            rc = nomem(err, "the intruder check");
            goto done;
        }
        if (!(rc = st_tensor_to_f32(wt, W, err))) {
            memcpy(Wt, W, (size_t)m * n * sizeof(float));
            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, m, n, f->r, f->s, f->B, f->r,
                        f->A, n, 1.0f, Wt, n);
            rc = diff_intruders(m, n, W, Wt, o->intruder_k, o->intruder_eps, &t->intruders,
                                &t->intruder_min_cos, err);
        }
        lk_free(W);
        lk_free(Wt);
    }
done:
    lk_free(fa.own);
    lk_free(fb.own);
    lk_free(Bc);
    lk_free(Ac);
    lk_free(U);
    lk_free(Vt);
    lk_free(dense);
    return rc;
}

/* Both sides' values formed, ΔW = v_B - v_A. */
static int compare_dense(struct diff *d, const struct entry *e, const struct mods *ma,
                         const struct mods *mb, int same_src, const struct diff_opts *o,
                         struct diff_tensor *t, struct lk_err *err)
{
    const struct st_tensor *ta = e->t[0], *tb = e->t[1];
    // two stored tensors with the same bytes: unchanged without converting
    if (!mods_any(ma) && !mods_any(mb) && ta && tb && ta->dtype == tb->dtype &&
        ta->nbytes == tb->nbytes && !memcmp(ta->data, tb->data, ta->nbytes)) {
        t->state = DIFF_UNCHANGED;
        return LK_OK;
    }
    size_t n = (size_t)e->rows * (size_t)e->cols;
    int rows = (int)e->rows, cols = (int)e->cols;
    float *va = lk_falloc(n, 1), *vb = lk_falloc(n, 1);
    int rc = LK_OK;
    if (!va || !vb) {
        rc = nomem(err, "the tensor values");
        goto done;
    }
    if ((rc = value_get(e, ta, ma, va, err)) || (rc = value_get(e, tb, mb, vb, err)))
        goto done;
    if (floats_eq(va, vb, n)) {
        t->state = DIFF_UNCHANGED;
        goto done;
    }
    double w_fro2;
    if (same_src && ta && !e->zero_base) {
        if ((rc = tensor_fro2(ta, &w_fro2, err)))
            goto done;
    } else {
        w_fro2 = svd_fro2((int)n, 1, va);
    }
    int linear = e->ndim == 2 && t->module >= 0;
    if (d->kind == DIFF_MODEL_MODEL && linear && o->intruder_k > 0 &&
        (rc = diff_intruders(rows, cols, va, vb, o->intruder_k, o->intruder_eps, &t->intruders,
                             &t->intruder_min_cos, err)))
        goto done;
    for (size_t i = 0; i < n; i++)
        vb[i] -= va[i];
    if ((rc = diff_dense_stats(e->ndim == 2 ? rows : (int)n, e->ndim == 2 ? cols : 1, vb, w_fro2, o,
                               t, err)))
        goto done;
    int k = t->num_rank;
    if (d->kind == DIFF_MODEL_MODEL && linear && o->amplification && k >= 1 &&
        k <= DIFF_AMP_MAX_RANK && k <= imin(rows, cols) / 2) {
        float *U = lk_falloc((size_t)rows, (size_t)k), *S = lk_falloc((size_t)k, 1);
        float *Vt = lk_falloc((size_t)k, (size_t)cols);
        if (!U || !S || !Vt)
            rc = nomem(err, "singular vectors");
        else if (!(rc = svd_exact(rows, cols, vb, k, U, S, Vt, err))) {
            t->amp_rank = k;
            rc = diff_amplification(rows, cols, va, k, U, Vt, t->fro, &t->amplification, err);
        }
        lk_free(U);
        lk_free(S);
        lk_free(Vt);
    }
done:
    lk_free(va);
    lk_free(vb);
    return rc;
}

static int compare_entry(struct diff *d, const struct entry *e, const struct diff_opts *o,
                         struct diff_tensor *t, struct lk_err *err)
{
    tensor_blank(t);
    snprintf(t->name, sizeof t->name, "%s", e->name);
    int is_bias;
    name_parse(e->name, &t->layer, &t->module, &is_bias);
    t->ndim = e->ndim;
    t->rows = e->rows;
    t->cols = e->cols;
    if (!e->in[0] || !e->in[1]) {
        t->state = e->in[0] ? DIFF_ONLY_A : DIFF_ONLY_B;
        return LK_OK;
    }
    if (e->ndim < 1 || e->ndim > 2 || e->rows > INT32_MAX || e->cols > INT32_MAX)
        return lk_errf(err, LK_ERR_UNSUPPORTED, "tensor '%s' has %d dimensions (diff handles 1 and 2)",
                       e->name, e->ndim);
    struct mods ma, mb;
    mods_find(d->a, e, &ma);
    mods_find(d->b, e, &mb);
    t->adapted = (mods_any(&ma) ? 1 : 0) | (mods_any(&mb) ? 2 : 0);
    int same_src = d->kind == DIFF_ADAPTER_ADAPTER || d->kind == DIFF_BASE_ADAPTER;
    if (!same_src)
        return compare_dense(d, e, &ma, &mb, 0, o, t, err);
    if (!mods_any(&ma) && !mods_any(&mb)) {
        t->state = DIFF_UNCHANGED;
        return LK_OK;
    }
    if (mods_equal(&ma, &mb)) {
        // the same change on both sides: nothing to decompose; ΔW_A and ΔW_B coincide
        t->state = DIFF_UNCHANGED;
        if (ma.fac || ma.embed) {
            t->cosine = 1;
            t->n_grid_a = t->n_grid_b = 0;
        }
        return LK_OK;
    }
    int factorable = !ma.ext && !mb.ext && !ma.bias && !mb.bias && e->ndim == 2;
    if (factorable)
        return compare_factors(d, e, &ma, &mb, o, t, err);
    return compare_dense(d, e, &ma, &mb, 1, o, t, err);
}

int diff_compare(struct diff *d, const struct diff_opts *o, struct lk_err *err)
{
    struct diff_priv *p = d->priv;
    LK_ASSERT(p != NULL);
    if (!(d->t = lk_calloc((size_t)(p->n_e ? p->n_e : 1), sizeof *d->t)))
        return nomem(err, "the results");
    for (int i = 0; i < p->n_e; i++) {
        if (lk_interrupted)
            return lk_errf(err, LK_ERR_INTERRUPTED, "interrupted at tensor '%s'", p->e[i].name);
        if (o->progress)
            o->progress(o->progress_ctx, i, p->n_e, p->e[i].name);
        d->n = i + 1;
        if (compare_entry(d, &p->e[i], o, &d->t[i], err))
            return lk_err_prefix(err, "tensor '%s'", p->e[i].name);
    }
    if (o->progress)
        o->progress(o->progress_ctx, p->n_e, p->n_e, NULL);
    return LK_OK;
}

int diff_run(struct diff *d, const char *a, const char *b, const struct diff_opts *o,
             struct lk_err *err)
{
    if (diff_open(d, a, b, o, err))
        return err->code;
    return diff_compare(d, o, err);
}

// ---- summaries ----

static void group_add(struct diff_group *g, const struct diff_tensor *t)
{
    if (t->state == DIFF_UNCHANGED) {
        g->n_unchanged++;
        return;
    }
    if (t->state != DIFF_CHANGED) {
        g->n_only++;
        return;
    }
    g->n_changed++;
    if (!t->has_stats)
        return;
    g->fro2 += t->fro * t->fro;
    g->w_fro2 += isfinite(t->w_fro) ? t->w_fro * t->w_fro : NAN;
    if (isfinite(t->rel) && t->rel > g->max_rel)
        g->max_rel = t->rel;
    if (t->ndim == 2 && isfinite(t->eff_rank)) {
        g->eff_rank_sum += t->eff_rank;
        g->n_eff++;
    }
}

double diff_group_rel(const struct diff_group *g)
{
    return g->w_fro2 > 0 ? sqrt(g->fro2 / g->w_fro2) : NAN;
}

int diff_summarize(const struct diff *d, struct diff_summary *s, struct lk_err *err)
{
    memset(s, 0, sizeof *s);
    int L = 0;
    for (int i = 0; i < d->n; i++)
        if (d->t[i].layer + 1 > L)
            L = d->t[i].layer + 1;
    if (L && !(s->layer = lk_calloc((size_t)L, sizeof *s->layer)))
        return nomem(err, "the summary");
    s->n_layers = L;
    for (int i = 0; i < d->n; i++) {
        const struct diff_tensor *t = &d->t[i];
        group_add(&s->total, t);
        group_add(t->module >= 0 ? &s->module[t->module] : &s->other, t);
        if (t->layer >= 0)
            group_add(&s->layer[t->layer], t);
    }
    return LK_OK;
}

void diff_summary_release(struct diff_summary *s)
{
    if (!s)
        return;
    lk_free(s->layer);
    memset(s, 0, sizeof *s);
}

// ---- JSON ----

static void jnum(cJSON *o, const char *k, double v)
{
    if (isfinite(v))
        cJSON_AddNumberToObject(o, k, v);
    else
        cJSON_AddNullToObject(o, k);
}

static char *jprint(cJSON *o)
{
    char *s = o ? cJSON_PrintUnformatted(o) : NULL;
    char *r = s ? lk_strdup(s) : NULL;
    if (s)
        cJSON_free(s);
    cJSON_Delete(o);
    return r;
}

static cJSON *energy_obj(const struct diff_tensor *t, const struct diff_opts *o)
{
    cJSON *e = cJSON_CreateObject();
    for (int i = 0; e && i < o->n_energy; i++) {
        char k[32];
        snprintf(k, sizeof k, "%g", o->energy[i]);
        cJSON_AddNumberToObject(e, k, t->energy_rank[i]);
    }
    return e;
}

char *diff_energy_json(const struct diff_tensor *t, const struct diff_opts *o)
{
    if (!t->has_stats || t->num_rank < 0)
        return NULL;
    return jprint(energy_obj(t, o));
}

static cJSON *grid_obj(const struct diff_tensor *t, const double *phi)
{
    cJSON *g = cJSON_CreateObject();
    if (!g)
        return NULL;
    cJSON_AddItemToObject(g, "i", cJSON_CreateIntArray(t->grid_a, t->n_grid_a));
    cJSON_AddItemToObject(g, "j", cJSON_CreateIntArray(t->grid_b, t->n_grid_b));
    cJSON *rows = cJSON_AddArrayToObject(g, "phi");
    for (int a = 0; rows && a < t->n_grid_a; a++)
        cJSON_AddItemToArray(rows, cJSON_CreateDoubleArray(phi + (size_t)a * t->n_grid_b, t->n_grid_b));
    return g;
}

/* The fields of one tensor, into o (shared by the per-tensor JSON and the report). */
static void tensor_fields(cJSON *j, const struct diff_tensor *t, const struct diff_opts *o)
{
    cJSON_AddStringToObject(j, "state", diff_state_str(t->state));
    cJSON *sh = cJSON_AddArrayToObject(j, "shape");
    cJSON_AddItemToArray(sh, cJSON_CreateNumber((double)t->rows));
    if (t->ndim == 2)
        cJSON_AddItemToArray(sh, cJSON_CreateNumber((double)t->cols));
    if (t->layer >= 0)
        cJSON_AddNumberToObject(j, "layer", t->layer);
    if (t->module >= 0)
        cJSON_AddStringToObject(j, "module", cfg_module_names[t->module]);
    if (t->adapted)
        cJSON_AddStringToObject(j, "adapted", t->adapted == 3 ? "both" : t->adapted == 1 ? "a" : "b");
    if (t->has_stats) {
        cJSON_AddBoolToObject(j, "from_factors", t->from_factors);
        if (t->factor_rank >= 0)
            cJSON_AddNumberToObject(j, "factor_rank", t->factor_rank);
        jnum(j, "fro", t->fro);
        jnum(j, "w_fro", t->w_fro);
        jnum(j, "rel", t->rel);
        jnum(j, "spectral", t->spectral);
        if (t->num_rank >= 0) {
            jnum(j, "stable_rank", t->stable_rank);
            jnum(j, "eff_rank", t->eff_rank);
            cJSON_AddNumberToObject(j, "num_rank", t->num_rank);
            cJSON_AddItemToObject(j, "energy_ranks", energy_obj(t, o));
            cJSON_AddItemToObject(j, "top", cJSON_CreateDoubleArray(t->top, t->n_top));
        }
    }
    if (!isnan(t->cosine))
        jnum(j, "cosine", t->cosine);
    if (!isnan(t->fro_a)) {
        jnum(j, "fro_a", t->fro_a);
        jnum(j, "fro_b", t->fro_b);
    }
    if (t->phi_right)
        cJSON_AddItemToObject(j, "phi_right", grid_obj(t, t->phi_right));
    if (t->phi_left)
        cJSON_AddItemToObject(j, "phi_left", grid_obj(t, t->phi_left));
    if (t->amp_rank >= 0) {
        jnum(j, "amplification", t->amplification);
        cJSON_AddNumberToObject(j, "amp_rank", t->amp_rank);
    }
    if (t->intruders >= 0) {
        cJSON_AddNumberToObject(j, "intruders", t->intruders);
        jnum(j, "intruder_min_cos", t->intruder_min_cos);
    }
}

char *diff_tensor_json(const struct diff_tensor *t, const struct diff_opts *o)
{
    cJSON *j = cJSON_CreateObject();
    if (j)
        tensor_fields(j, t, o);
    return jprint(j);
}

static cJSON *group_obj(const struct diff_group *g)
{
    cJSON *j = cJSON_CreateObject();
    if (!j)
        return NULL;
    cJSON_AddNumberToObject(j, "changed", g->n_changed);
    cJSON_AddNumberToObject(j, "unchanged", g->n_unchanged);
    cJSON_AddNumberToObject(j, "one_side", g->n_only);
    jnum(j, "fro", sqrt(g->fro2));
    jnum(j, "rel", diff_group_rel(g));
    jnum(j, "max_rel", g->n_changed ? g->max_rel : NAN);
    jnum(j, "mean_eff_rank", g->n_eff ? g->eff_rank_sum / g->n_eff : NAN);
    return j;
}

cJSON *diff_summary_obj(const struct diff *d, const struct diff_summary *s)
{
    cJSON *j = cJSON_CreateObject();
    if (!j)
        return NULL;
    cJSON_AddStringToObject(j, "kind", diff_kind_str(d->kind));
    cJSON_AddItemToObject(j, "total", group_obj(&s->total));
    cJSON *m = cJSON_AddObjectToObject(j, "modules");
    for (int i = 0; m && i < CFG_N_MODULES; i++)
        if (s->module[i].n_changed + s->module[i].n_unchanged + s->module[i].n_only)
            cJSON_AddItemToObject(m, cfg_module_names[i], group_obj(&s->module[i]));
    cJSON_AddItemToObject(j, "other", group_obj(&s->other));
    cJSON *l = cJSON_AddArrayToObject(j, "layers");
    for (int i = 0; l && i < s->n_layers; i++)
        cJSON_AddItemToArray(l, group_obj(&s->layer[i]));
    return j;
}

/* What was compared: {"a", "b", "kind", "base" (when one is used)}, the start of the report and
 * of the run record's parameters. */
static cJSON *head_obj(const struct diff *d, const char *a, const char *b)
{
    cJSON *j = cJSON_CreateObject();
    cJSON_AddStringToObject(j, "a", a);
    cJSON_AddStringToObject(j, "b", b);
    cJSON_AddStringToObject(j, "kind", diff_kind_str(d->kind));
    if (d->base_dir)
        cJSON_AddStringToObject(j, "base", d->base_dir);
    return j;
}

cJSON *diff_params_obj(const struct diff *d, const char *a, const char *b, const struct diff_opts *o)
{
    cJSON *j = head_obj(d, a, b);
    if (!j)
        return NULL;
    cJSON_AddItemToObject(j, "energy", cJSON_CreateDoubleArray(o->energy, o->n_energy));
    cJSON_AddNumberToObject(j, "top", o->top);
    cJSON_AddNumberToObject(j, "intruder_k", o->intruder_k);
    cJSON_AddNumberToObject(j, "intruder_eps", o->intruder_eps);
    return j;
}

char *diff_report_json(const struct diff *d, const char *a, const char *b,
                       const struct diff_opts *o, const struct diff_summary *s)
{
    cJSON *j = head_obj(d, a, b);
    if (!j)
        return NULL;
    cJSON_AddStringToObject(j, "note", d->note);
    cJSON_AddItemToObject(j, "energy", cJSON_CreateDoubleArray(o->energy, o->n_energy));
    cJSON *arr = cJSON_AddArrayToObject(j, "tensors");
    for (int i = 0; arr && i < d->n; i++) {
        cJSON *t = cJSON_CreateObject();
        if (!t)
            break;
        cJSON_AddStringToObject(t, "name", d->t[i].name);
        tensor_fields(t, &d->t[i], o);
        cJSON_AddItemToArray(arr, t);
    }
    cJSON_AddItemToObject(j, "summary", diff_summary_obj(d, s));
    return jprint(j);
}

int diff_rdb_write(struct rdb *db, int64_t run_id, const struct diff *d,
                   const struct diff_opts *o, struct lk_err *err)
{
    for (int i = 0; i < d->n; i++) {
        const struct diff_tensor *t = &d->t[i];
        char *ej = diff_energy_json(t, o), *xj = diff_tensor_json(t, o);
        if (!xj) {
            lk_free(ej);
            return nomem(err, "JSON");
        }
        struct rdb_tensor_stat st = {
            .tensor = t->name,
            .rows = t->rows,
            .cols = t->cols,
            .rank = t->has_stats ? t->num_rank : -1,
            .fro_norm = t->has_stats ? t->fro : (t->state == DIFF_UNCHANGED ? 0 : NAN),
            .rel_change = t->has_stats ? t->rel : (t->state == DIFF_UNCHANGED ? 0 : NAN),
            .eff_rank = t->has_stats ? t->eff_rank : NAN,
            .energy_json = ej,
            .rel_error = NAN,
            .extra_json = xj,
        };
        int rc = rdb_tensor_stat(db, run_id, &st, err);
        lk_free(ej);
        lk_free(xj);
        if (rc)
            return rc;
    }
    return LK_OK;
}
