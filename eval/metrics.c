/*
 * metrics.c - SQuAD-style normalisation, EM, token F1, ROUGE-L and bootstrap intervals.
 * See metrics.h for the exact rules. Owns nothing beyond the buffers it returns.
 */
#include "metrics.h"

#include <stdlib.h>
#include <string.h>
#include <utf8proc.h>

#include "text.h"

// ---- characters ----

/* SQuAD deletes Python's string.punctuation; we also delete every Unicode punctuation. */
static int is_punct(int32_t c)
{
    if (c < 0x80)
        return c > 0x20 && c < 0x7f && strchr("!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~", (int)c);
    utf8proc_category_t k = utf8proc_category(c);
    return k >= UTF8PROC_CATEGORY_PC && k <= UTF8PROC_CATEGORY_PO;
}

// ---- tokens ----

void ev_tokens_release(struct ev_tokens *t)
{
    if (!t)
        return;
    lk_free(t->buf);
    lk_free(t->tok);
    memset(t, 0, sizeof *t);
}

/* Ends the token that starts at buf[start] (w is the write position): keeps it unless it is
 * empty or an article, then writes its NUL. Returns the new write position. */
static size_t token_end(char *buf, size_t start, size_t w, size_t *n_tok)
{
    size_t len = w - start;
    const char *t = buf + start;
    if (len == 0)
        return w;
    if ((len == 1 && t[0] == 'a') || (len == 2 && !memcmp(t, "an", 2)) ||
        (len == 3 && !memcmp(t, "the", 3)))
        return start; // SQuAD's remove_articles
    buf[w++] = 0;
    (*n_tok)++;
    return w;
}

int ev_tokenize(const char *s, struct ev_tokens *out, struct lk_err *err)
{
    memset(out, 0, sizeof *out);
    size_t len = s ? strlen(s) : 0;
    // Output bound: a character of b bytes becomes at most 4 bytes lower-cased plus one NUL,
    // and never more than 2b (ASCII stays ASCII; a 2-byte letter lowers to at most 3 bytes).
    size_t cap;
    if (lk_mul_size(len, 2, &cap))
        return lk_errf(err, LK_ERR_NOMEM, "text too long");
    char *buf = lk_malloc(cap + 1);
    if (!buf)
        return lk_errf(err, LK_ERR_NOMEM, "out of memory normalising %zu bytes", len);
    size_t w = 0, start = 0, n_tok = 0;
    const utf8proc_uint8_t *p = (const utf8proc_uint8_t *)s;
    size_t i = 0;
    while (i < len) {
        int32_t c;
        utf8proc_ssize_t k = utf8proc_iterate(p + i, (utf8proc_ssize_t)(len - i), &c);
        if (k <= 0) { // invalid UTF-8: drop the byte
            i++;
            continue;
        }
        i += (size_t)k;
        if (is_punct(c))
            continue;
        if (ev_char_is_space(c)) {
            w = token_end(buf, start, w, &n_tok);
            start = w;
            continue;
        }
        int32_t lc = utf8proc_tolower(c);
        utf8proc_uint8_t enc[4];
        utf8proc_ssize_t m = utf8proc_encode_char(lc, enc);
        if (m <= 0)
            m = utf8proc_encode_char(c, enc);
        if (ev_char_is_cjk(c)) {
            w = token_end(buf, start, w, &n_tok);
            start = w;
            memcpy(buf + w, enc, (size_t)m);
            w += (size_t)m;
            w = token_end(buf, start, w, &n_tok);
            start = w;
            continue;
        }
        memcpy(buf + w, enc, (size_t)m);
        w += (size_t)m;
    }
    w = token_end(buf, start, w, &n_tok);
    LK_ASSERT(w <= cap + 1);
    char **tok = lk_malloc(sizeof *tok * (n_tok ? n_tok : 1));
    if (!tok) {
        lk_free(buf);
        return lk_errf(err, LK_ERR_NOMEM, "out of memory normalising %zu bytes", len);
    }
    size_t off = 0;
    for (size_t t = 0; t < n_tok; t++) {
        tok[t] = buf + off;
        off += strlen(buf + off) + 1;
    }
    out->buf = buf;
    out->tok = tok;
    out->n = n_tok;
    return LK_OK;
}

int ev_normalize(const char *s, char **out, struct lk_err *err)
{
    struct ev_tokens t;
    *out = NULL;
    int r = ev_tokenize(s, &t, err);
    if (r)
        return r;
    size_t total = 0;
    for (size_t i = 0; i < t.n; i++)
        total += strlen(t.tok[i]) + 1;
    char *o = lk_malloc(total + 1);
    if (!o) {
        ev_tokens_release(&t);
        return lk_errf(err, LK_ERR_NOMEM, "out of memory");
    }
    size_t w = 0;
    for (size_t i = 0; i < t.n; i++) {
        if (i)
            o[w++] = ' ';
        size_t l = strlen(t.tok[i]);
        memcpy(o + w, t.tok[i], l);
        w += l;
    }
    o[w] = 0;
    ev_tokens_release(&t);
    *out = o;
    return LK_OK;
}

// ---- metrics ----

static int cmp_str(const void *a, const void *b)
{
    return strcmp(*(char *const *)a, *(char *const *)b);
}

int ev_f1_tokens(const struct ev_tokens *pred, const struct ev_tokens *ref, double *out,
                 struct lk_err *err)
{
    if (pred->n == 0 || ref->n == 0) {
        *out = pred->n == ref->n ? 1.0 : 0.0;
        return LK_OK;
    }
    // multiset intersection: sort both token lists and merge
    char **a = lk_malloc(sizeof *a * pred->n);
    char **b = lk_malloc(sizeof *b * ref->n);
    if (!a || !b) {
        lk_free(a);
        lk_free(b);
        return lk_errf(err, LK_ERR_NOMEM, "out of memory");
    }
    memcpy(a, pred->tok, sizeof *a * pred->n);
    memcpy(b, ref->tok, sizeof *b * ref->n);
    qsort(a, pred->n, sizeof *a, cmp_str);
    qsort(b, ref->n, sizeof *b, cmp_str);
    size_t i = 0, j = 0, common = 0;
    while (i < pred->n && j < ref->n) {
        int c = strcmp(a[i], b[j]);
        if (c == 0) {
            common++;
            i++;
            j++;
        } else if (c < 0) {
            i++;
        } else {
            j++;
        }
    }
    lk_free(a);
    lk_free(b);
    if (common == 0) {
        *out = 0.0;
        return LK_OK;
    }
    double p = (double)common / (double)pred->n, r = (double)common / (double)ref->n;
    *out = 2.0 * p * r / (p + r);
    return LK_OK;
}

int ev_rouge_l_tokens(const struct ev_tokens *pred, const struct ev_tokens *ref, double *out,
                      struct lk_err *err)
{
    if (pred->n == 0 || ref->n == 0) {
        *out = 0.0;
        return LK_OK;
    }
    // LCS by dynamic programming, one row of |ref| + 1 entries: row[j] = LCS(pred[..i], ref[..j])
    size_t m = ref->n;
    size_t *row = lk_calloc(m + 1, sizeof *row);
    if (!row)
        return lk_errf(err, LK_ERR_NOMEM, "out of memory");
    for (size_t i = 1; i <= pred->n; i++) {
        size_t diag = 0; // row[j-1] of the previous i
        for (size_t j = 1; j <= m; j++) {
            size_t up = row[j];
            if (!strcmp(pred->tok[i - 1], ref->tok[j - 1]))
                row[j] = diag + 1;
            else if (row[j - 1] > row[j])
                row[j] = row[j - 1];
            diag = up;
        }
    }
    size_t lcs = row[m];
    lk_free(row);
    if (lcs == 0) {
        *out = 0.0;
        return LK_OK;
    }
    double p = (double)lcs / (double)pred->n, r = (double)lcs / (double)ref->n;
    *out = 2.0 * p * r / (p + r);
    return LK_OK;
}

int ev_score(const char *pred, const char *ref, struct ev_scores *out, struct lk_err *err)
{
    struct ev_tokens p, r;
    int rc = ev_tokenize(pred, &p, err);
    if (rc)
        return rc;
    rc = ev_tokenize(ref, &r, err);
    if (rc) {
        ev_tokens_release(&p);
        return rc;
    }
    out->em = 0.0;
    if (p.n == r.n) {
        size_t i = 0;
        while (i < p.n && !strcmp(p.tok[i], r.tok[i]))
            i++;
        out->em = i == p.n ? 1.0 : 0.0;
    }
    rc = ev_f1_tokens(&p, &r, &out->f1, err);
    if (rc == LK_OK)
        rc = ev_rouge_l_tokens(&p, &r, &out->rouge_l, err);
    ev_tokens_release(&p);
    ev_tokens_release(&r);
    return rc;
}

// ---- bootstrap ----

static int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

/* numpy.percentile's default ("linear"): h = (B - 1) q, interpolate between floor and ceil. */
static double percentile_sorted(const double *v, int B, double q)
{
    double h = (B - 1) * q;
    int lo = (int)h;
    if (lo >= B - 1)
        return v[B - 1];
    return v[lo] + (h - lo) * (v[lo + 1] - v[lo]);
}

/* The shared core: x[i] (minus y[i] when y is given) resampled B times. */
static int bootstrap(const double *x, const double *y, size_t n, int B, struct lk_rng *rng,
                     struct ev_ci *out, struct lk_err *err)
{
    if (n == 0)
        return lk_errf(err, LK_ERR_USAGE, "bootstrap of an empty sample");
    if (B <= 0)
        B = EV_BOOTSTRAP_B;
    double *means = lk_malloc(sizeof *means * (size_t)B);
    if (!means)
        return lk_errf(err, LK_ERR_NOMEM, "out of memory");
    double s = 0;
    for (size_t i = 0; i < n; i++)
        s += y ? x[i] - y[i] : x[i];
    out->mean = s / (double)n;
    for (int b = 0; b < B; b++) {
        double t = 0;
        for (size_t i = 0; i < n; i++) {
            // modulo bias is below n / 2^64: negligible for any item count
            size_t k = (size_t)(lk_rng_u64(rng) % (uint64_t)n);
            t += y ? x[k] - y[k] : x[k];
        }
        means[b] = t / (double)n;
    }
    qsort(means, (size_t)B, sizeof *means, cmp_double);
    out->lo = percentile_sorted(means, B, 0.025);
    out->hi = percentile_sorted(means, B, 0.975);
    out->n = n;
    out->B = B;
    lk_free(means);
    return LK_OK;
}

int ev_bootstrap_mean(const double *x, size_t n, int B, struct lk_rng *rng, struct ev_ci *out,
                      struct lk_err *err)
{
    return bootstrap(x, NULL, n, B, rng, out, err);
}

int ev_bootstrap_paired(const double *a, const double *b, size_t n, int B, struct lk_rng *rng,
                        struct ev_ci *out, struct lk_err *err)
{
    return bootstrap(a, b, n, B, rng, out, err);
}
