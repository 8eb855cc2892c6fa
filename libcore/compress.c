/*
 * compress.c - svd-compress: full fine-tune -> LoRA adapter by truncated SVD of each ΔW, and
 * exact rank reduction of an adapter from its factors. The numerics are svd.h's; this file
 * streams the models, picks ranks, lays out the PEFT adapter and reports what was kept. The
 * configs are compared by cfg_check_same, an input adapter is read by lora_io.c's reader
 * (lora_file_open), the output folder is written through lk_outdir. Each entry point is a short
 * list of named steps. Owns: the per-call scratch buffers, the factors until they are copied
 * into struct lora.
 */
// madvise(MADV_DONTNEED) is not in POSIX (posix_madvise's DONTNEED is a no-op in glibc): it
// is what lets a streamed pass over a mapped model keep its resident size small. (The
// pkg-config flags of some libraries already define it.)
#ifndef _DEFAULT_SOURCE
#define _DEFAULT_SOURCE
#endif

#include "compress.h"

#include <cJSON.h>
#include <cblas.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "cfg.h"
#include "lora.h"
#include "st.h"
#include "tensor.h"

#define PEFT_PREFIX "base_model.model."
#define CMP_POWER_ITERS 12 /* power iterations estimating ‖ΔW - B·A‖_2 on the randomized path */

void cmp_opts_init(struct cmp_opts *o)
{
    memset(o, 0, sizeof *o);
    o->targets = (1u << CFG_N_MODULES) - 1;
    svd_opts_init(&o->svd);
}

void cmp_report_release(struct cmp_report *r)
{
    if (!r)
        return;
    lk_free(r->t);
    memset(r, 0, sizeof *r);
}

int cmp_pattern_key(const char *module_path, char *buf, size_t n)
{
    size_t j = 0;
    for (const char *p = module_path; *p; p++) {
        if (strchr("\\.^$|?*+()[]{}", *p)) {
            if (j + 1 >= n)
                return -1;
            buf[j++] = '\\';
        }
        if (j + 1 >= n)
            return -1;
        buf[j++] = *p;
    }
    if (j >= n)
        return -1;
    buf[j] = 0;
    return 0;
}

// ---- small helpers ----

/* A float buffer grown on demand (one per role, reused across tensors). */
struct cmp_buf {
    float *p;   /* owned */
    size_t cap; /* floats */
};

static int buf_reserve(struct cmp_buf *b, size_t n, struct lk_err *err)
{
    if (n <= b->cap)
        return LK_OK;
    size_t bytes;
    if (lk_mul_size(n, sizeof(float), &bytes))
        return lk_errf(err, LK_ERR_NOMEM, "tensor too large");
    float *p = lk_realloc(b->p, bytes);
    if (!p)
        return lk_errf(err, LK_ERR_NOMEM, "out of memory (%zu floats of scratch)", n);
    b->p = p;
    b->cap = n;
    return LK_OK;
}

static void buf_release(struct cmp_buf *b)
{
    lk_free(b->p);
    b->p = NULL;
    b->cap = 0;
}

/* Drops the mapped pages of [p, p + n) from the resident set: the file stays mapped and is
 * read again on a later access. Only pages wholly inside the range are dropped. */
static void drop_pages(const void *p, size_t n)
{
    long ps = sysconf(_SC_PAGESIZE);
    if (ps <= 0 || n == 0)
        return;
    uintptr_t a = (uintptr_t)p, e = a + n;
    uintptr_t lo = (a + (uintptr_t)ps - 1) & ~((uintptr_t)ps - 1), hi = e & ~((uintptr_t)ps - 1);
    if (hi > lo)
        madvise((void *)lo, hi - lo, MADV_DONTNEED);
}

static int report_add(struct cmp_report *r, struct cmp_tensor **out, struct lk_err *err)
{
    struct cmp_tensor *t = lk_realloc(r->t, sizeof *t * (size_t)(r->n + 1));
    if (!t)
        return lk_errf(err, LK_ERR_NOMEM, "out of memory");
    r->t = t;
    *out = &t[r->n++];
    memset(*out, 0, sizeof **out);
    (*out)->layer = (*out)->module = -1;
    (*out)->cols = 1;
    return LK_OK;
}

// ---- one matrix: rank choice and factors ----

/* Estimates ‖D - U_r·diag(S_r)·Vt_r‖_2 by power iteration on the residual (never formed), from
 * a seeded Gaussian start. A lower bound of the true norm, usually within a few percent; for
 * an exact truncation the norm is σ_{r+1}. x [n], y [m], t [r] are scratch. */
static double residual_norm2(int m, int n, const float *D, int r, const float *U, int ldu,
                             const float *S, const float *Vt, uint64_t seed, float *x, float *y,
                             float *t)
{
    struct lk_rng rng;
    lk_rng_seed(&rng, seed ^ 0x5eedu);
    for (int j = 0; j < n; j++)
        x[j] = lk_rng_normal(&rng);
    double best = 0;
    for (int it = 0; it < CMP_POWER_ITERS; it++) {
        float nx = cblas_snrm2(n, x, 1);
        if (!(nx > 0))
            break;
        cblas_sscal(n, 1.0f / nx, x, 1);
        // y = R x = D x - U (S .* (Vt x))
        cblas_sgemv(CblasRowMajor, CblasNoTrans, m, n, 1.0f, D, n, x, 1, 0.0f, y, 1);
        if (r > 0) {
            cblas_sgemv(CblasRowMajor, CblasNoTrans, r, n, 1.0f, Vt, n, x, 1, 0.0f, t, 1);
            for (int i = 0; i < r; i++)
                t[i] *= S[i];
            cblas_sgemv(CblasRowMajor, CblasNoTrans, m, r, -1.0f, U, ldu, t, 1, 1.0f, y, 1);
        }
        double ny = cblas_snrm2(m, y, 1);
        if (ny > best)
            best = ny;
        // x = Rᵀ y = Dᵀ y - Vtᵀ (S .* (Uᵀ y))
        cblas_sgemv(CblasRowMajor, CblasTrans, m, n, 1.0f, D, n, y, 1, 0.0f, x, 1);
        if (r > 0) {
            cblas_sgemv(CblasRowMajor, CblasTrans, m, r, 1.0f, U, ldu, y, 1, 0.0f, t, 1);
            for (int i = 0; i < r; i++)
                t[i] *= S[i];
            cblas_sgemv(CblasRowMajor, CblasTrans, r, n, -1.0f, Vt, n, t, 1, 1.0f, x, 1);
        }
    }
    return best;
}

struct cmp_scratch {
    struct cmp_buf U, S, Vt, x, y, t;
};

static void scratch_release(struct cmp_scratch *s)
{
    buf_release(&s->U);
    buf_release(&s->S);
    buf_release(&s->Vt);
    buf_release(&s->x);
    buf_release(&s->y);
    buf_release(&s->t);
}

/* B [m, r] = U[:, :r]·sqrt(S), A [r, n] = sqrt(S)·Vt[:r, :] into fresh buffers (NULL when r
 * is 0). U has leading dimension ldu. */
static int split_factors(int m, int n, int r, const float *U, int ldu, const float *S,
                         const float *Vt, float **out_B, float **out_A, struct lk_err *err)
{
    *out_B = *out_A = NULL;
    if (r == 0)
        return LK_OK;
    float *B = lk_malloc(sizeof(float) * (size_t)m * r), *A = lk_malloc(sizeof(float) * (size_t)r * n);
    if (!B || !A) {
        lk_free(B);
        lk_free(A);
        return lk_errf(err, LK_ERR_NOMEM, "out of memory (factors of rank %d)", r);
    }
    for (int j = 0; j < r; j++) {
        float q = sqrtf(S[j]);
        for (int i = 0; i < m; i++)
            B[(size_t)i * r + j] = U[(size_t)i * ldu + j] * q;
        for (int i = 0; i < n; i++)
            A[(size_t)j * n + i] = Vt[(size_t)j * n + i] * q;
    }
    *out_B = B;
    *out_A = A;
    return LK_OK;
}

/* Truncated SVD of D [m, n] by the options, the rank chosen, the factors and the statistics
 * (rank, method, energy_kept, rel_error, sigma_next, fro) into ts. */
static int factorize(int m, int n, const float *D, const struct cmp_opts *o, uint64_t seed,
                     struct cmp_scratch *s, struct cmp_tensor *ts, float **out_B, float **out_A,
                     struct lk_err *err)
{
    *out_B = *out_A = NULL;
    int mn = m < n ? m : n;
    double total = svd_fro2(m, n, D);
    ts->fro = sqrt(total);
    ts->rank = 0;
    ts->energy_kept = 1;
    ts->method = SVD_EXACT;
    if (!isfinite(total))
        return lk_errf(err, LK_ERR_NUMERIC, "the change has non-finite values");
    if (total <= 0)
        return LK_OK;
    int cap = o->max_rank > 0 && o->max_rank < mn ? o->max_rank : mn;
    struct svd_opts so = o->svd;
    so.seed = seed;
    int rc, r, ldu;
    double sigma_next = 0;
    int estimate = 0;
    const float *S;
    if (o->energy > 0 && svd_method_pick(m, n, cap < 16 ? cap : 16, &so) == SVD_EXACT) {
        // exact: the whole spectrum, so σ_{r+1} is known exactly
        if ((rc = buf_reserve(&s->U, (size_t)m * mn, err)) || (rc = buf_reserve(&s->S, (size_t)mn, err)) ||
            (rc = buf_reserve(&s->Vt, (size_t)mn * n, err)))
            return rc;
        if ((rc = svd_exact(m, n, D, mn, s->U.p, s->S.p, s->Vt.p, err)))
            return rc;
        r = svd_energy_rank(s->S.p, mn, total, o->energy);
        if (r < 0 || r > cap)
            r = cap;
        ldu = mn;
        sigma_next = r < mn ? s->S.p[r] : 0;
        ts->method = SVD_EXACT;
    } else if (o->energy > 0) {
        // randomized, sketch grown until the energy is certainly reached (svd.h)
        if ((rc = buf_reserve(&s->U, (size_t)m * cap, err)) || (rc = buf_reserve(&s->S, (size_t)cap, err)) ||
            (rc = buf_reserve(&s->Vt, (size_t)cap * n, err)))
            return rc;
        struct svd_energy_info info;
        if ((rc = svd_truncated_energy(m, n, D, o->energy, cap, &so, s->U.p, s->S.p, s->Vt.p, &info, err)))
            return rc;
        r = info.rank;
        ldu = r;
        ts->method = info.method;
        sigma_next = -1; // estimated below, after the epsilon cut
        estimate = 1;
    } else {
        // fixed rank: one more triplet than kept gives σ_{r+1} (an estimate when randomized)
        int k = o->rank < cap ? o->rank : cap;
        int kq = k < mn ? k + 1 : k;
        if ((rc = buf_reserve(&s->U, (size_t)m * kq, err)) || (rc = buf_reserve(&s->S, (size_t)kq, err)) ||
            (rc = buf_reserve(&s->Vt, (size_t)kq * n, err)))
            return rc;
        enum svd_method used;
        if ((rc = svd_truncated(m, n, D, kq, &so, s->U.p, s->S.p, s->Vt.p, &used, err)))
            return rc;
        r = k;
        ldu = kq;
        sigma_next = kq > k ? s->S.p[k] : 0;
        estimate = used == SVD_RANDOMIZED;
        ts->method = used;
    }
    S = s->S.p;
    // --sv-epsilon: drop the values at or below ε (the largest dropped one is then σ_{r+1})
    if (o->sv_epsilon > 0)
        while (r > 0 && S[r - 1] <= o->sv_epsilon) {
            sigma_next = S[r - 1];
            r--;
        }
    if (sigma_next < 0) {
        if (r >= mn)
            sigma_next = 0;
        else {
            if ((rc = buf_reserve(&s->x, (size_t)n, err)) || (rc = buf_reserve(&s->y, (size_t)m, err)) ||
                (rc = buf_reserve(&s->t, (size_t)(r > 0 ? r : 1), err)))
                return rc;
            sigma_next = residual_norm2(m, n, D, r, s->U.p, ldu, S, s->Vt.p, seed, s->x.p, s->y.p, s->t.p);
        }
    }
    ts->rank = r;
    ts->energy_kept = svd_energy_kept(S, r, total);
    if (ts->energy_kept > 1)
        ts->energy_kept = 1;
    ts->rel_error = svd_trunc_error(S, r, total);
    ts->sigma_next = sigma_next;
    ts->sigma_estimate = estimate && r < mn;
    return split_factors(m, n, r, s->U.p, ldu, S, s->Vt.p, out_B, out_A, err);
}

// ---- full fine-tune: reading ----

/* The tensor ct of a model folder, present with the shape the config implies, float dtype. */
static int find_tensor(const struct st_model *sm, const char *dir, const struct cfg_tensor *ct,
                       const struct st_tensor **out, struct lk_err *err)
{
    const struct st_tensor *t = st_model_find(sm, ct->name, NULL);
    if (!t)
        return lk_errf(err, LK_ERR_MISSING, "%s: tensor '%s' is missing", dir, ct->name);
    int ok = t->ndim == ct->ndim && t->shape[0] == ct->shape[0] && (ct->ndim < 2 || t->shape[1] == ct->shape[1]);
    if (!ok) {
        char got[64] = "", want[64];
        for (int i = 0; i < t->ndim && i < 4; i++)
            snprintf(got + strlen(got), sizeof got - strlen(got), "%s%lld", i ? ", " : "", (long long)t->shape[i]);
        snprintf(want, sizeof want, ct->ndim == 2 ? "%lld, %lld" : "%lld", (long long)ct->shape[0],
                 (long long)ct->shape[1]);
        return lk_errf(err, LK_ERR_SHAPE, "%s: tensor '%s' has shape [%s], config.json implies [%s] "
                       "(hint: the two models must have the same shapes)", dir, ct->name, got, want);
    }
    if (!tensor_dtype_is_float(t->dtype))
        return lk_errf(err, LK_ERR_FORMAT, "%s: tensor '%s' has dtype %s (F32, F16 or BF16 expected)", dir,
                       ct->name, tensor_dtype_name(t->dtype));
    *out = t;
    return LK_OK;
}

/* ‖tuned - base‖_F² and ‖base‖_F² of a tensor, in chunks through a and b (cap floats each),
 * dropping the mapped pages behind. */
static void diff_chunked(const struct st_tensor *tb, const struct st_tensor *tt, float *a, float *b,
                         size_t cap, double *out_d2, double *out_b2)
{
    size_t eb = tensor_dtype_size(tb->dtype), et = tensor_dtype_size(tt->dtype);
    double d2 = 0, b2 = 0;
    for (size_t off = 0; off < tb->numel; off += cap) {
        size_t k = tb->numel - off < cap ? tb->numel - off : cap;
        tensor_to_f32(a, (const char *)tb->data + off * eb, tb->dtype, k);
        tensor_to_f32(b, (const char *)tt->data + off * et, tt->dtype, k);
        for (size_t i = 0; i < k; i++) {
            double d = (double)b[i] - a[i];
            d2 += d * d;
            b2 += (double)a[i] * a[i];
        }
        drop_pages((const char *)tb->data + off * eb, k * eb);
        drop_pages((const char *)tt->data + off * et, k * et);
    }
    *out_d2 = d2;
    *out_b2 = b2;
}

// ---- full fine-tune: the adapter ----

struct cmp_fac {
    float *B, *A; /* owned: [out, r], [r, in]; NULL when r is 0 */
    int r;
    float *dbias; /* owned: bias delta [out], or NULL when unchanged */
};

static int most_frequent_rank(const int *ranks, int n)
{
    int best = 1, best_n = 0;
    for (int i = 0; i < n; i++) {
        int c = 0;
        for (int j = 0; j < n; j++)
            c += ranks[j] == ranks[i];
        if (c > best_n || (c == best_n && ranks[i] > best))
            best = ranks[i], best_n = c;
    }
    return best;
}

/* On a base that ties lm_head to embed_tokens, a fine-tune that changed the embedding changed
 * the output layer with it. PEFT's modules_to_save copy of embed_tokens replaces the input side
 * only, so the copy is also stored as lm_head.weight and the config sets ensure_weight_tying
 * (PEFT ties the two copies; lorakit's reader does the same). *added is 1 when it was. */
static int tie_copy(struct lora_extra **extra, int *n_extra, int *added, struct lk_err *err)
{
    int at = -1;
    for (int i = 0; i < *n_extra; i++)
        if (!strcmp((*extra)[i].name, "model.embed_tokens.weight"))
            at = i;
    if (at < 0)
        return LK_OK;
    int64_t shape[2] = { (*extra)[at].shape[0], (*extra)[at].shape[1] };
    float *data;
    int rc = lora_extra_add(extra, n_extra, "lm_head.weight", 2, shape, &data, err);
    if (rc)
        return rc;
    memcpy(data, (*extra)[at].data, sizeof(float) * (size_t)(shape[0] * shape[1]));
    *added = 1;
    return LK_OK;
}

/* Builds the struct lora from the factors (taking the extras' data) and saves it into dir. */
static int build_adapter(const struct cfg *c, const char *base_dir, unsigned targets, struct cmp_fac *fac,
                         struct lora_extra *extra, int n_extra, struct cmp_report *rep, const char *dir,
                         struct lk_err *err)
{
    int L = c->num_hidden_layers, rc = LK_OK;
    // 1. module types with no change at all are left out of target_modules
    unsigned used = 0;
    int any_bias = 0;
    for (int l = 0; l < L; l++)
        for (int m = 0; m < CFG_N_MODULES; m++) {
            struct cmp_fac *f = &fac[l * CFG_N_MODULES + m];
            if ((targets & (1u << m)) && (f->r > 0 || f->dbias))
                used |= 1u << m;
            any_bias |= f->dbias != NULL;
        }
    if (!used) {
        for (int i = 0; i < n_extra; i++) {
            lk_free(extra[i].name);
            lk_free(extra[i].data);
        }
        lk_free(extra);
        return lk_errf(err, LK_ERR_USAGE, "no target linear changed between the two models: nothing to "
                       "compress (hint: check --targets, --sv-epsilon, or that --tuned differs from --base)");
    }
    // 2. ranks: the most frequent one is r, the others go to rank_pattern / alpha_pattern
    int *ranks = lk_malloc(sizeof(int) * (size_t)(L * CFG_N_MODULES + 1));
    struct lora_pattern *rp = lk_calloc((size_t)(L * CFG_N_MODULES + 1), sizeof *rp);
    struct lora_pattern *ap = lk_calloc((size_t)(L * CFG_N_MODULES + 1), sizeof *ap);
    // a tied base: a changed embedding is the output layer's too (see tie_copy)
    int tied_copy = 0;
    if (c->tie_word_embeddings && (rc = tie_copy(&extra, &n_extra, &tied_copy, err))) {
        for (int i = 0; i < n_extra; i++) {
            lk_free(extra[i].name);
            lk_free(extra[i].data);
        }
        lk_free(extra);
        return rc;
    }
    char **mts = lk_calloc((size_t)n_extra + 1, sizeof(char *));
    struct lora_config lc;
    lora_config_default(&lc);
    struct lora l;
    memset(&l, 0, sizeof l);
    int nr = 0, np = 0, nm = 0;
    if (!ranks || !rp || !ap || !mts) {
        rc = lk_errf(err, LK_ERR_NOMEM, "out of memory");
        goto out;
    }
    for (int ly = 0; ly < L; ly++)
        for (int m = 0; m < CFG_N_MODULES; m++)
            if (used & (1u << m)) {
                int r = fac[ly * CFG_N_MODULES + m].r;
                ranks[nr++] = r > 0 ? r : 1;
            }
    int common = most_frequent_rank(ranks, nr);
    for (int ly = 0; ly < L; ly++)
        for (int m = 0; m < CFG_N_MODULES; m++) {
            if (!(used & (1u << m)))
                continue;
            int r = fac[ly * CFG_N_MODULES + m].r > 0 ? fac[ly * CFG_N_MODULES + m].r : 1;
            if (r == common)
                continue;
            char path[96], key[192];
            cfg_module_path(ly, (enum cfg_module)m, path, sizeof path);
            LK_ASSERT(cmp_pattern_key(path, key, sizeof key) == 0);
            rp[np].key = lk_strdup(key);
            ap[np].key = lk_strdup(key);
            rp[np].value = ap[np].value = r;
            np++;
            if (!rp[np - 1].key || !ap[np - 1].key) {
                rc = lk_errf(err, LK_ERR_NOMEM, "out of memory");
                goto out;
            }
        }
    for (int i = 0; i < n_extra; i++) {
        // PEFT matches modules_to_save entries as name suffixes: the full module path is exact;
        // embed_tokens and lm_head go by those names, which PEFT's weight tying looks for
        const char *nmx = extra[i].name;
        size_t len = strlen(nmx);
        if (!strcmp(nmx, "model.embed_tokens.weight"))
            nmx += 6, len -= 6;
        if (len > 7 && !strcmp(nmx + len - 7, ".weight"))
            len -= 7;
        if (!(mts[nm] = lk_malloc(len + 1))) {
            rc = lk_errf(err, LK_ERR_NOMEM, "out of memory");
            goto out;
        }
        memcpy(mts[nm], nmx, len);
        mts[nm++][len] = 0;
    }
    lc.r = common;
    lc.alpha = common;
    lc.targets = used;
    lc.lora_bias = any_bias;
    snprintf(lc.base_model, sizeof lc.base_model, "%s", base_dir);
    lc.rank_pattern = rp;
    lc.alpha_pattern = ap;
    lc.n_rank_pattern = lc.n_alpha_pattern = np;
    lc.modules_to_save = mts;
    lc.n_modules_to_save = nm;
    lc.ensure_weight_tying = tied_copy;
    if ((rc = lora_init(&l, &lc, c, err)))
        goto out;
    // 3. the factors, module by module (each freed once copied)
    for (int k = 0; k < l.n_mod; k++) {
        struct lora_module *md = &l.mod[k];
        struct cmp_fac *f = &fac[md->layer * CFG_N_MODULES + md->module];
        LK_ASSERT(md->R == (f->r > 0 ? f->r : 1) && md->scale == 1.0f);
        if (f->r > 0) {
            memcpy(md->A, f->A, sizeof(float) * (size_t)f->r * md->in);
            memcpy(md->B, f->B, sizeof(float) * (size_t)md->out * f->r);
        }
        if (md->bias && f->dbias)
            memcpy(md->bias, f->dbias, sizeof(float) * (size_t)md->out);
        lk_free(f->A);
        lk_free(f->B);
        lk_free(f->dbias);
        f->A = f->B = f->dbias = NULL;
    }
    l.extra = extra;
    l.n_extra = n_extra;
    extra = NULL;
    n_extra = 0;
    rep->rank_common = common;
    rep->n_rank_pattern = np;
    rep->lora_bias = any_bias;
    rep->adapter_params = (int64_t)lora_param_count(&l);
    for (int i = 0; i < l.n_extra; i++)
        rep->adapter_params += l.extra[i].shape[0] * (l.extra[i].ndim > 1 ? l.extra[i].shape[1] : 1);
    rc = lora_save(&l, dir, err);
out:
    for (int i = 0; i < n_extra; i++) {
        lk_free(extra[i].name);
        lk_free(extra[i].data);
    }
    lk_free(extra);
    lora_release(&l);
    for (int i = 0; i < np; i++) {
        lk_free(rp[i].key);
        lk_free(ap[i].key);
    }
    for (int i = 0; i < nm; i++)
        lk_free(mts[i]);
    lk_free(mts);
    lk_free(rp);
    lk_free(ap);
    lk_free(ranks);
    return rc;
}

// ---- full fine-tune: the steps ----

/* The two models of a full fine-tune, checked against each other: one architecture, every
 * tensor the config implies present in both with its shape. */
struct cmp_pair {
    struct cfg cb, ct;                 /* owned: the base's and the fine-tune's config */
    struct st_model mb, mt;            /* owned: their weights, mapped */
    struct cfg_tensor *ts;             /* owned: the nt tensors the config implies */
    int nt;
    const struct st_tensor **pb, **pt; /* owned arrays of nt: each tensor in mb and mt */
    size_t maxlin;                     /* floats of the largest linear */
};

static void pair_close(struct cmp_pair *p)
{
    st_model_close(&p->mb);
    st_model_close(&p->mt);
    cfg_release(&p->cb);
    cfg_release(&p->ct);
    lk_free(p->ts);
    lk_free(p->pb);
    lk_free(p->pt);
    memset(p, 0, sizeof *p);
}

/* Step 1: the configs agree (cfg_check_same) and every tensor is in both files. */
static int pair_open(struct cmp_pair *p, const char *base_dir, const char *tuned_dir, struct lk_err *err)
{
    memset(p, 0, sizeof *p);
    int rc = cfg_load(&p->cb, base_dir, err);
    if (!rc)
        rc = cfg_load(&p->ct, tuned_dir, err);
    if (!rc)
        rc = cfg_check_same(&p->cb, &p->ct, base_dir, tuned_dir, 0, err);
    if (!rc)
        rc = st_model_open(&p->mb, base_dir, err);
    if (!rc)
        rc = st_model_open(&p->mt, tuned_dir, err);
    if (!rc)
        rc = cfg_tensors(&p->cb, &p->ts, &p->nt, err);
    if (rc)
        return rc;
    p->pb = lk_calloc((size_t)p->nt + 1, sizeof *p->pb);
    p->pt = lk_calloc((size_t)p->nt + 1, sizeof *p->pt);
    if (!p->pb || !p->pt)
        return lk_errf(err, LK_ERR_NOMEM, "out of memory");
    for (int i = 0; i < p->nt && !rc; i++) {
        rc = find_tensor(&p->mb, base_dir, &p->ts[i], &p->pb[i], err);
        if (!rc)
            rc = find_tensor(&p->mt, tuned_dir, &p->ts[i], &p->pt[i], err);
        if (!rc && p->ts[i].kind == CFG_T_LINEAR && p->pb[i]->numel > p->maxlin)
            p->maxlin = p->pb[i]->numel;
    }
    return rc;
}

/* What the tensor loop builds, and the buffers it reuses for every tensor. */
struct cmp_work {
    int L;
    struct cmp_fac *fac;      /* owned [L * CFG_N_MODULES]: factors and bias delta per module */
    struct lora_extra *extra; /* owned array of n_extra: modules_to_save copies */
    int n_extra;
    struct cmp_buf bb, bt;    /* two buffers of the largest linear (other tensors in chunks) */
    size_t cap;               /* floats in each */
    struct cmp_scratch sc;
};

static void work_buffers_release(struct cmp_work *w)
{
    buf_release(&w->bb);
    buf_release(&w->bt);
    scratch_release(&w->sc);
}

static void work_release(struct cmp_work *w)
{
    for (int i = 0; i < w->n_extra; i++) {
        lk_free(w->extra[i].name);
        lk_free(w->extra[i].data);
    }
    lk_free(w->extra);
    if (w->fac)
        for (int i = 0; i < w->L * CFG_N_MODULES; i++) {
            lk_free(w->fac[i].A);
            lk_free(w->fac[i].B);
            lk_free(w->fac[i].dbias);
        }
    lk_free(w->fac);
    work_buffers_release(w);
    memset(w, 0, sizeof *w);
}

static int work_init(struct cmp_work *w, const struct cmp_pair *p, struct lk_err *err)
{
    memset(w, 0, sizeof *w);
    w->L = p->cb.num_hidden_layers;
    w->fac = lk_calloc((size_t)(w->L * CFG_N_MODULES) + 1, sizeof *w->fac);
    if (!w->fac)
        return lk_errf(err, LK_ERR_NOMEM, "out of memory");
    w->cap = p->maxlin > ((size_t)1 << 16) ? p->maxlin : ((size_t)1 << 16);
    int rc = buf_reserve(&w->bb, w->cap, err);
    return rc ? rc : buf_reserve(&w->bt, w->cap, err);
}

/* A report row for model tensor c. */
static int row_add(struct cmp_report *rep, const struct cfg_tensor *c, struct cmp_tensor **out, struct lk_err *err)
{
    int rc = report_add(rep, out, err);
    if (rc)
        return rc;
    snprintf((*out)->name, sizeof (*out)->name, "%s", c->name);
    (*out)->layer = c->layer;
    (*out)->module = c->module;
    (*out)->rows = c->shape[0];
    (*out)->cols = c->ndim == 2 ? c->shape[1] : 1;
    return LK_OK;
}

/* Step 2, a target linear: ΔW formed in bt, its truncated SVD into the module's factors. */
static int step_linear(const struct cmp_pair *p, struct cmp_work *w, int i, const struct cmp_opts *o,
                       const char *tuned_dir, struct cmp_report *rep, struct lk_err *err)
{
    const struct cfg_tensor *c = &p->ts[i];
    const struct st_tensor *tb = p->pb[i], *tt = p->pt[i];
    int m = (int)c->shape[0], n = (int)c->shape[1];
    float *W = w->bb.p, *D = w->bt.p;
    int rc = st_tensor_to_f32(tb, W, err);
    if (!rc)
        rc = st_tensor_to_f32(tt, D, err);
    if (rc)
        return rc;
    drop_pages(tb->data, tb->nbytes);
    drop_pages(tt->data, tt->nbytes);
    double b2 = 0;
    for (size_t j = 0; j < tb->numel; j++) {
        b2 += (double)W[j] * W[j];
        D[j] -= W[j];
    }
    struct cmp_tensor *row;
    if ((rc = row_add(rep, c, &row, err)))
        return rc;
    row->kind = CMP_LINEAR;
    row->base_fro = sqrt(b2);
    struct cmp_fac *f = &w->fac[c->layer * CFG_N_MODULES + c->module];
    uint64_t seed = o->svd.seed + 0x9e3779b97f4a7c15ull * (uint64_t)(i + 1);
    if ((rc = factorize(m, n, D, o, seed, &w->sc, row, &f->B, &f->A, err))) {
        lk_err_prefix(err, "%s: tensor '%s'", tuned_dir, c->name);
        return rc;
    }
    f->r = row->rank;
    row->stored = 1;
    rep->n_linear++;
    rep->delta_params += (int64_t)m * n;
    rep->energy_total += row->fro * row->fro;
    rep->energy_kept += row->fro * row->fro * row->energy_kept;
    return LK_OK;
}

/* A changed embedding, norm or lm_head kept whole as a modules_to_save copy. */
static int keep_extra(const struct cfg_tensor *c, const struct st_tensor *tt, struct cmp_work *w, struct lk_err *err)
{
    float *data;
    int rc = lora_extra_add(&w->extra, &w->n_extra, c->name, c->ndim, c->shape, &data, err);
    if (rc)
        return rc;
    tensor_to_f32(data, tt->data, tt->dtype, tt->numel);
    drop_pages(tt->data, tt->nbytes);
    return LK_OK;
}

/* Step 2, any other tensor: a report row when it changed; a target bias's delta becomes
 * lora_B.bias; with keep_other an embedding, norm or lm_head is kept whole. */
static int step_other(const struct cmp_pair *p, struct cmp_work *w, int i, const struct cmp_opts *o,
                      int target, struct cmp_report *rep, struct lk_err *err)
{
    const struct cfg_tensor *c = &p->ts[i];
    const struct st_tensor *tb = p->pb[i], *tt = p->pt[i];
    double d2, b2;
    diff_chunked(tb, tt, w->bb.p, w->bt.p, w->cap, &d2, &b2);
    if (!(d2 > 0))
        return LK_OK;
    struct cmp_tensor *row;
    int rc = row_add(rep, c, &row, err);
    if (rc)
        return rc;
    row->fro = sqrt(d2);
    row->base_fro = sqrt(b2);
    row->sigma_next = NAN;
    if (c->kind == CFG_T_BIAS && target && o->no_bias) {
        // left out on request: the adapter then carries nothing for it (error 1 relative)
        row->kind = CMP_BIAS;
        row->rel_error = 1;
        rep->n_left_out++;
        rep->delta_params += (int64_t)tb->numel;
        return LK_OK;
    }
    if (c->kind == CFG_T_BIAS && target) {
        // the delta goes to lora_B.bias (applied as s·bias_B, s = 1)
        struct cmp_fac *f = &w->fac[c->layer * CFG_N_MODULES + c->module];
        if (!(f->dbias = lk_malloc(sizeof(float) * tb->numel)))
            return lk_errf(err, LK_ERR_NOMEM, "out of memory");
        tensor_to_f32(w->bb.p, tb->data, tb->dtype, tb->numel);
        tensor_to_f32(f->dbias, tt->data, tt->dtype, tt->numel);
        for (size_t j = 0; j < tb->numel; j++)
            f->dbias[j] -= w->bb.p[j];
        row->kind = CMP_BIAS;
        row->stored = 1;
        row->energy_kept = 1;
        rep->delta_params += (int64_t)tb->numel;
        return LK_OK;
    }
    row->kind = CMP_OTHER;
    rep->n_other_changed++;
    // embeddings, lm_head and norms can be modules_to_save; a linear or bias of a module
    // outside the targets cannot (it would shadow the LoRA layer)
    int savable = c->kind == CFG_T_EMBED || c->kind == CFG_T_NORM || c->kind == CFG_T_LM_HEAD;
    if (o->keep_other && savable) {
        if ((rc = keep_extra(c, tt, w, err)))
            return rc;
        row->stored = 1;
        rep->delta_params += (int64_t)tt->numel;
    } else
        rep->n_left_out++;
    row->energy_kept = row->stored;
    row->rel_error = row->stored ? 0 : 1;
    return LK_OK;
}

static int opts_check(const struct cmp_opts *o, struct lk_err *err)
{
    if ((o->rank > 0) == (o->energy > 0))
        return lk_errf(err, LK_ERR_USAGE, "give exactly one of a rank and an energy fraction");
    if (o->energy > 1)
        return lk_errf(err, LK_ERR_USAGE, "energy fraction %g is not in (0, 1]", o->energy);
    return LK_OK;
}

int cmp_models(const char *base_dir, const char *tuned_dir, const char *out_dir,
               const struct cmp_opts *o, struct cmp_report *rep, struct lk_err *err)
{
    memset(rep, 0, sizeof *rep);
    int rc = opts_check(o, err);
    if (rc)
        return rc;
    double t0 = lk_now();
    unsigned targets = o->targets ? o->targets : (1u << CFG_N_MODULES) - 1;
    struct cmp_pair p;
    struct cmp_work w;
    struct lk_outdir od;
    memset(&w, 0, sizeof w);
    memset(&od, 0, sizeof od);
    // 1. the two models; the output folder; the buffers
    rc = pair_open(&p, base_dir, tuned_dir, err);
    if (!rc)
        rc = lk_outdir_begin(&od, out_dir, o->overwrite, err);
    if (!rc)
        rc = work_init(&w, &p, err);
    // 2. tensor by tensor
    for (int i = 0; i < p.nt && !rc; i++) {
        const struct cfg_tensor *c = &p.ts[i];
        double t1 = lk_now();
        int target = c->module >= 0 && (targets & (1u << c->module));
        if (lk_interrupted)
            rc = lk_errf(err, LK_ERR_INTERRUPTED, "interrupted");
        else if (c->kind == CFG_T_LINEAR && target)
            rc = step_linear(&p, &w, i, o, tuned_dir, rep, err);
        else
            rc = step_other(&p, &w, i, o, target, rep, err);
        if (!rc && rep->n && !strcmp(rep->t[rep->n - 1].name, c->name))
            rep->t[rep->n - 1].seconds = lk_now() - t1;
        if (!rc && o->progress)
            o->progress(o->progress_ctx, i + 1, p.nt, c->name);
    }
    // 3. the adapter, into the temporary folder (the models and buffers released first), then
    // renamed into place
    if (!rc) {
        st_model_close(&p.mb);
        st_model_close(&p.mt);
        work_buffers_release(&w);
        rc = build_adapter(&p.cb, base_dir, targets, w.fac, w.extra, w.n_extra, rep, od.tmp, err);
        w.extra = NULL; // taken by build_adapter
        w.n_extra = 0;
        if (!rc)
            rc = lk_outdir_commit(&od, err);
        rep->seconds = lk_now() - t0;
    }
    lk_outdir_abort(&od);
    work_release(&w);
    pair_close(&p);
    return rc;
}

// ---- adapter rank reduction ----

/* One A/B pair of the input adapter. */
struct red_mod {
    char prefix[160];        /* tensor name before ".lora_A.weight" / ".lora_embedding_A" */
    const struct st_tensor *A, *B; /* point into the input file */
    const struct st_tensor *bias;  /* lora_B.bias: points into the input file, or NULL */
    int m, n, R, r;          /* out, in, input rank, new rank */
    float s;                 /* input scale */
    float *nB, *nA;          /* owned: new factors [m, max(r, 1)], [max(r, 1), n] */
};

static const char *ends_with(const char *s, const char *suf)
{
    size_t a = strlen(s), b = strlen(suf);
    return a >= b && !strcmp(s + a - b, suf) ? s + a - b : NULL;
}

/* The module name PEFT's patterns match: a tensor prefix without "base_model.model.". */
static const char *module_name(const char *prefix)
{
    return prefix + (strncmp(prefix, PEFT_PREFIX, strlen(PEFT_PREFIX)) ? 0 : strlen(PEFT_PREFIX));
}

/* Sets a number member of a JSON object (replacing it, or adding it). */
static int json_set(cJSON *o, const char *key, cJSON *v)
{
    if (!v)
        return -1;
    if (cJSON_GetObjectItemCaseSensitive(o, key))
        return cJSON_ReplaceItemInObjectCaseSensitive(o, key, v) ? 0 : -1;
    return cJSON_AddItemToObject(o, key, v) ? 0 : -1;
}

/* The re-factoring of one module: SVD of s·B·A from the factors, rank choice, new factors. */
static int reduce_module(struct red_mod *md, const struct cmp_opts *o, struct cmp_tensor *row,
                         struct lk_err *err)
{
    int m = md->m, n = md->n, R = md->R, rc;
    float *A = lk_malloc(sizeof(float) * (size_t)R * n), *B = lk_malloc(sizeof(float) * (size_t)m * R);
    float *U = lk_malloc(sizeof(float) * (size_t)m * R), *S = lk_malloc(sizeof(float) * (size_t)R);
    float *Vt = lk_malloc(sizeof(float) * (size_t)R * n);
    if (!A || !B || !U || !S || !Vt) {
        rc = lk_errf(err, LK_ERR_NOMEM, "out of memory");
        goto out;
    }
    if ((rc = st_tensor_to_f32(md->A, A, err)) || (rc = st_tensor_to_f32(md->B, B, err)))
        goto out;
    double total;
    if ((rc = svd_factor_fro2(m, n, R, md->s, B, A, &total, err)) ||
        (rc = svd_factor(m, n, R, md->s, B, A, R, U, S, Vt, err)))
        goto out;
    int cap = o->max_rank > 0 && o->max_rank < R ? o->max_rank : R, r;
    if (o->energy > 0) {
        r = total > 0 ? svd_energy_rank(S, R, total, o->energy) : 0;
        if (r < 0 || r > cap)
            r = cap;
    } else
        r = o->rank < cap ? o->rank : cap;
    double sigma_next = r < R ? S[r] : 0;
    if (o->sv_epsilon > 0)
        while (r > 0 && S[r - 1] <= o->sv_epsilon)
            sigma_next = S[--r];
    md->r = r;
    row->rank = r;
    row->method = SVD_EXACT;
    row->fro = sqrt(total);
    row->energy_kept = total > 0 ? fmin(1.0, svd_energy_kept(S, r, total)) : 1;
    row->rel_error = svd_trunc_error(S, r, total);
    row->sigma_next = sigma_next;
    row->stored = 1;
    if (r > 0)
        rc = split_factors(m, n, r, U, R, S, Vt, &md->nB, &md->nA, err);
    else if (!(md->nB = lk_calloc((size_t)m, sizeof(float))) || !(md->nA = lk_calloc((size_t)n, sizeof(float))))
        rc = lk_errf(err, LK_ERR_NOMEM, "out of memory");
out:
    lk_free(A);
    lk_free(B);
    lk_free(U);
    lk_free(S);
    lk_free(Vt);
    return rc;
}

/* Step 1: the A/B pairs of an adapter read by lora_file_open (its layer modules and embedding
 * adapter, in the order of their A in the file), with their scale. *out is an owned array of *n. */
static int red_collect(const struct lora_file *lf, struct red_mod **out, int *n, struct lk_err *err)
{
    const char *path = lf->path;
    struct red_mod *mods = lk_calloc((size_t)lf->st.n + 1, sizeof *mods);
    *out = mods;
    *n = 0;
    if (!mods)
        return lk_errf(err, LK_ERR_NOMEM, "out of memory");
    for (int i = 0; i < lf->st.n; i++) {
        const struct st_tensor *t = &lf->st.t[i];
        const struct lora_file_module *fm = lf->slot[i] >= 0 ? &lf->mod[lf->slot[i]] : NULL;
        int head = t == lf->head_A; // a LoRA on lm_head: a pair like a projection's
        if (!(fm && t == fm->A) && t != lf->embed_A && !head)
            continue;
        struct red_mod *md = &mods[*n];
        const char *suf = fm || head ? ends_with(t->name, ".lora_A.weight") : ends_with(t->name, ".lora_embedding_A");
        size_t pl = (size_t)(suf - t->name);
        if (pl >= sizeof md->prefix)
            return lk_errf(err, LK_ERR_FORMAT, "%s: tensor name '%s' is too long", path, t->name);
        memcpy(md->prefix, t->name, pl);
        md->prefix[pl] = 0;
        md->A = t;
        md->B = fm ? fm->B : head ? lf->head_B : lf->embed_B;
        md->bias = fm ? fm->bias : NULL;
        if (t->shape[0] < 1)
            return lk_errf(err, LK_ERR_SHAPE, "%s: '%s' and '%s' are not a [R, in] / [out, R] pair", path,
                           t->name, md->B->name);
        md->R = (int)t->shape[0];
        md->n = (int)t->shape[1];
        md->m = (int)md->B->shape[0];
        if (md->R > md->m || md->R > md->n)
            return lk_errf(err, LK_ERR_SHAPE, "%s: '%s' has rank %d above its dimensions %d x %d", path,
                           t->name, md->R, md->m, md->n);
        int rconf;
        double alpha;
        lora_config_module(&lf->cfg, module_name(md->prefix), &rconf, &alpha);
        md->s = (float)(lf->cfg.use_rslora ? alpha / sqrt((double)md->R) : alpha / md->R);
        (*n)++;
    }
    if (!*n)
        return lk_errf(err, LK_ERR_FORMAT, "%s: no lora_A / lora_B pairs", path);
    return LK_OK;
}

/* Step 2: every module re-factored, a report row each; *out_common is the new config's r (the
 * most frequent rank). */
static int red_reduce(struct red_mod *mods, int nmod, const struct cmp_opts *o, const char *path,
                      struct cmp_report *rep, int *out_common, struct lk_err *err)
{
    int *ranks = lk_malloc(sizeof(int) * (size_t)nmod);
    if (!ranks)
        return lk_errf(err, LK_ERR_NOMEM, "out of memory");
    int rc = LK_OK;
    for (int k = 0; k < nmod && !rc; k++) {
        struct red_mod *md = &mods[k];
        double t1 = lk_now();
        struct cmp_tensor *row;
        if (lk_interrupted)
            rc = lk_errf(err, LK_ERR_INTERRUPTED, "interrupted");
        else if (!(rc = report_add(rep, &row, err))) {
            snprintf(row->name, sizeof row->name, "%s", module_name(md->prefix));
            row->kind = CMP_LINEAR;
            row->rows = md->m;
            row->cols = md->n;
            if ((rc = reduce_module(md, o, row, err)))
                lk_err_prefix(err, "%s: '%s'", path, md->A->name);
            row->seconds = lk_now() - t1;
            ranks[k] = md->r > 0 ? md->r : 1;
            rep->n_linear++;
            rep->input_params += (int64_t)md->R * (md->m + md->n);
            rep->delta_params += (int64_t)md->m * md->n;
            rep->energy_total += row->fro * row->fro;
            rep->energy_kept += row->fro * row->fro * row->energy_kept;
        }
        if (o->progress)
            o->progress(o->progress_ctx, k + 1, nmod, md->prefix);
    }
    *out_common = rc ? 1 : most_frequent_rank(ranks, nmod);
    lk_free(ranks);
    return rc;
}

/* The pair a tensor belongs to and its role in it: 1 lora_A, 2 lora_B, 3 lora_B.bias (0 and
 * NULL: copied as it is). */
static struct red_mod *red_role(struct red_mod *mods, int nmod, const struct st_tensor *t, int *role)
{
    *role = 0;
    for (int k = 0; k < nmod; k++) {
        *role = t == mods[k].A ? 1 : t == mods[k].B ? 2 : t == mods[k].bias ? 3 : 0;
        if (*role)
            return &mods[k];
    }
    return NULL;
}

/* Step 3: adapter_model.safetensors in dir, tensors in the input's order: the new factors,
 * biases scaled by the old scale, the rest copied. */
static int red_write_tensors(const struct lora_file *lf, struct red_mod *mods, int nmod, const char *dir,
                             struct cmp_report *rep, struct lk_err *err)
{
    char *path = lk_path_join(dir, "adapter_model.safetensors");
    if (!path)
        return lk_errf(err, LK_ERR_NOMEM, "out of memory");
    struct st_writer w;
    st_writer_init(&w, path, err);
    lk_free(path);
    st_writer_meta(&w, "format", "pt");
    for (int pass = 0; pass < 2 && !err->code; pass++) {
        for (int i = 0; i < lf->st.n && !err->code; i++) {
            const struct st_tensor *t = &lf->st.t[i];
            int role;
            struct red_mod *hit = red_role(mods, nmod, t, &role);
            int r = hit && hit->r > 0 ? hit->r : 1;
            if (pass == 0) {
                if (role == 1)
                    st_writer_declare(&w, t->name, TENSOR_F32, 2, (int64_t[]){ r, hit->n });
                else if (role == 2)
                    st_writer_declare(&w, t->name, TENSOR_F32, 2, (int64_t[]){ hit->m, r });
                else
                    st_writer_declare(&w, t->name, role == 3 ? TENSOR_F32 : t->dtype, t->ndim, t->shape);
                rep->adapter_params += role == 1 ? (int64_t)r * hit->n : role == 2 ? (int64_t)hit->m * r
                                                                                    : (int64_t)t->numel;
                if (role == 0 || role == 3)
                    rep->input_params += (int64_t)t->numel;
                continue;
            }
            if (role == 1)
                st_writer_write(&w, hit->nA, TENSOR_F32);
            else if (role == 2)
                st_writer_write(&w, hit->nB, TENSOR_F32);
            else if (role == 3) {
                // PEFT adds s·lora_B.bias; the new scale is 1, so the stored bias takes the old s
                float *b = lk_malloc(sizeof(float) * (t->numel ? t->numel : 1));
                if (!b) {
                    lk_errf(err, LK_ERR_NOMEM, "out of memory");
                    break;
                }
                st_tensor_to_f32(t, b, err);
                for (size_t j = 0; j < t->numel; j++)
                    b[j] *= hit->s;
                st_writer_write(&w, b, TENSOR_F32);
                lk_free(b);
            } else
                st_writer_write(&w, t->data, t->dtype);
        }
        if (pass == 0)
            st_writer_begin(&w);
    }
    if (err->code) {
        st_writer_abort(&w);
        return err->code;
    }
    return st_writer_commit(&w);
}

/* Step 4: adapter_config.json in dir: the input's JSON (root) with the new ranks, alpha = r
 * (scale 1), no rsLoRA. *out_np: the rank_pattern entries written. */
static int red_write_config(cJSON *root, const struct red_mod *mods, int nmod, int common, const char *dir,
                            int *out_np, struct lk_err *err)
{
    cJSON *rpat = cJSON_CreateObject(), *apat = cJSON_CreateObject();
    int np = 0;
    for (int k = 0; k < nmod && rpat && apat; k++) {
        int r = mods[k].r > 0 ? mods[k].r : 1;
        if (r == common)
            continue;
        char key[400];
        LK_ASSERT(cmp_pattern_key(module_name(mods[k].prefix), key, sizeof key) == 0);
        cJSON_AddNumberToObject(rpat, key, r);
        cJSON_AddNumberToObject(apat, key, r);
        np++;
    }
    *out_np = np;
    char *text = NULL, *path = NULL;
    int rc = LK_OK;
    if (json_set(root, "r", cJSON_CreateNumber(common)) || json_set(root, "lora_alpha", cJSON_CreateNumber(common)) ||
        json_set(root, "use_rslora", cJSON_CreateFalse()) || json_set(root, "rank_pattern", rpat) ||
        json_set(root, "alpha_pattern", apat) || !(text = cfg_json_print(root)) ||
        !(path = lk_path_join(dir, "adapter_config.json")))
        rc = lk_errf(err, LK_ERR_NOMEM, "out of memory");
    else
        rc = lk_write_file_atomic(path, text, strlen(text), err);
    lk_free(text);
    lk_free(path);
    return rc;
}

int cmp_adapter(const char *in_dir, const char *out_dir, const struct cmp_opts *o,
                struct cmp_report *rep, struct lk_err *err)
{
    memset(rep, 0, sizeof *rep);
    int rc = opts_check(o, err);
    if (rc)
        return rc;
    double t0 = lk_now();
    struct lora_file lf;
    struct lk_outdir od;
    memset(&od, 0, sizeof od);
    struct red_mod *mods = NULL;
    int nmod = 0, common = 1, np = 0;
    cJSON *root = NULL;
    // 1. the adapter, through libcore's one reader; its pairs; the output folder
    rc = lora_file_open(&lf, in_dir, err);
    if (!rc && lf.cfg.use_dora) {
        char *cpath = lk_path_join(in_dir, "adapter_config.json");
        rc = lk_errf(err, LK_ERR_UNSUPPORTED, "%s: a DoRA adapter cannot be reduced exactly (its magnitude "
                     "normalises W + ΔW, which changes with the rank)", cpath ? cpath : in_dir);
        lk_free(cpath);
    }
    if (!rc)
        rc = red_collect(&lf, &mods, &nmod, err);
    if (!rc && !(root = cJSON_Parse(lf.config_json)))
        rc = lk_errf(err, LK_ERR_NOMEM, "out of memory");
    if (!rc)
        rc = lk_outdir_begin(&od, out_dir, o->overwrite, err);
    // 2. every module re-factored; 3. the tensors; 4. the config; then renamed into place
    if (!rc)
        rc = red_reduce(mods, nmod, o, lf.path, rep, &common, err);
    if (!rc)
        rc = red_write_tensors(&lf, mods, nmod, od.tmp, rep, err);
    if (!rc)
        rc = red_write_config(root, mods, nmod, common, od.tmp, &np, err);
    if (!rc) {
        rep->rank_common = common;
        rep->n_rank_pattern = np;
        rep->lora_bias = lf.cfg.lora_bias;
        rc = lk_outdir_commit(&od, err);
        rep->seconds = lk_now() - t0;
    }
    lk_outdir_abort(&od);
    for (int k = 0; k < nmod; k++) {
        lk_free(mods[k].nA);
        lk_free(mods[k].nB);
    }
    lk_free(mods);
    cJSON_Delete(root);
    lora_file_close(&lf);
    return rc;
}

// ---- the report as JSON ----

static const char *kind_name(enum cmp_kind k)
{
    return k == CMP_LINEAR ? "linear" : k == CMP_BIAS ? "bias" : "other";
}

/* cJSON prints NaN as null; finite numbers as given. */
char *cmp_report_json(const struct cmp_report *r, int with_tensors)
{
    cJSON *root = cJSON_CreateObject(), *tot = cJSON_AddObjectToObject(root, "totals");
    if (!root || !tot) {
        cJSON_Delete(root);
        return NULL;
    }
    cJSON_AddNumberToObject(tot, "linears", r->n_linear);
    cJSON_AddNumberToObject(tot, "rank", r->rank_common);
    cJSON_AddNumberToObject(tot, "rank_pattern_entries", r->n_rank_pattern);
    cJSON_AddBoolToObject(tot, "lora_bias", r->lora_bias);
    cJSON_AddNumberToObject(tot, "adapter_params", (double)r->adapter_params);
    cJSON_AddNumberToObject(tot, "delta_params", (double)r->delta_params);
    if (r->input_params)
        cJSON_AddNumberToObject(tot, "input_params", (double)r->input_params);
    cJSON_AddNumberToObject(tot, "param_ratio",
                            r->delta_params ? (double)r->adapter_params / (double)r->delta_params : 0);
    cJSON_AddNumberToObject(tot, "energy_total", r->energy_total);
    cJSON_AddNumberToObject(tot, "energy_kept", r->energy_total > 0 ? r->energy_kept / r->energy_total : 1);
    cJSON_AddNumberToObject(tot, "other_changed", r->n_other_changed);
    cJSON_AddNumberToObject(tot, "left_out", r->n_left_out);
    cJSON_AddNumberToObject(tot, "seconds", r->seconds);
    if (with_tensors) {
        cJSON *arr = cJSON_AddArrayToObject(root, "tensors");
        for (int i = 0; arr && i < r->n; i++) {
            const struct cmp_tensor *t = &r->t[i];
            cJSON *o = cJSON_CreateObject();
            if (!o)
                break;
            cJSON_AddItemToArray(arr, o);
            cJSON_AddStringToObject(o, "name", t->name);
            cJSON_AddStringToObject(o, "kind", kind_name(t->kind));
            double shp[2] = { (double)t->rows, (double)t->cols };
            cJSON_AddItemToObject(o, "shape", cJSON_CreateDoubleArray(shp, t->cols > 1 || t->kind == CMP_LINEAR ? 2 : 1));
            if (t->kind == CMP_LINEAR) {
                cJSON_AddNumberToObject(o, "rank", t->rank);
                cJSON_AddStringToObject(o, "method", t->method == SVD_RANDOMIZED ? "randomized" : "exact");
                cJSON_AddNumberToObject(o, "sigma_next", t->sigma_next);
                cJSON_AddBoolToObject(o, "sigma_next_estimate", t->sigma_estimate);
            }
            cJSON_AddNumberToObject(o, "fro", t->fro);
            if (t->base_fro > 0)
                cJSON_AddNumberToObject(o, "rel_change", t->fro / t->base_fro);
            cJSON_AddNumberToObject(o, "energy_kept", t->energy_kept);
            cJSON_AddNumberToObject(o, "rel_error", t->rel_error);
            cJSON_AddBoolToObject(o, "stored", t->stored);
            cJSON_AddNumberToObject(o, "seconds", t->seconds);
        }
    }
    char *s = cfg_json_print(root);
    cJSON_Delete(root);
    return s;
}
