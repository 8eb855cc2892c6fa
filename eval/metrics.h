/*
 * metrics.h - answer metrics for eval: SQuAD-style normalisation, exact match, token F1,
 * ROUGE-L, and seeded bootstrap confidence intervals.
 *
 * Normalisation follows the SQuAD v1.1 evaluation script (lower case, remove punctuation,
 * drop the articles a/an/the, collapse whitespace), made UTF-8 safe:
 *   - lower-casing is Unicode (utf8proc), so 'Ü' and 'ü' match; non-ASCII letters are kept;
 *   - punctuation is ASCII string.punctuation plus every Unicode P* character; it is deleted,
 *     not replaced by a space, as SQuAD does ("don't" -> "dont", "x-ray" -> "xray");
 *   - whitespace is Unicode whitespace; other control characters also separate tokens;
 *   - CJK ideographs, kana and bopomofo are one token per character (Chinese and Japanese have
 *     no spaces), so token F1 and ROUGE-L are character-level there, as in CMRC/DuReader
 *     (white space and CJK are eval/text.h's classes, the ones retrieval's chunking uses);
 *   - invalid UTF-8 bytes are dropped.
 * Exact match compares the normalised token sequences, so '高血压' equals '高 血 压'.
 */
#ifndef LK_METRICS_H
#define LK_METRICS_H

#include <stddef.h>

#include "../libcore/lk.h"

/* Normalised tokens of a text: tok[i] points into buf. */
struct ev_tokens {
    char *buf;  /* owned: NUL-separated token bytes */
    char **tok; /* owned: n pointers into buf */
    size_t n;
};

/* Splits s into normalised tokens (see above). out is filled; release with ev_tokens_release.
 * s may be NULL (no tokens). LK_ERR_NOMEM on allocation failure (out left empty). */
int ev_tokenize(const char *s, struct ev_tokens *out, struct lk_err *err);
void ev_tokens_release(struct ev_tokens *t);
/* The normalised text: tokens joined by one space, in a fresh lk_malloc'ed string. */
int ev_normalize(const char *s, char **out, struct lk_err *err);

/* Token F1 (SQuAD): multiset overlap; P = common/|pred|, R = common/|ref|, F1 = 2PR/(P+R).
 * If either side has no tokens: 1 when both are empty, else 0. */
int ev_f1_tokens(const struct ev_tokens *pred, const struct ev_tokens *ref, double *out,
                 struct lk_err *err);
/* ROUGE-L F-measure (beta = 1) from the longest common subsequence of tokens, as the
 * rouge-score package computes it: 0 when either side has no tokens. O(|pred|*|ref|) time,
 * O(|ref|) memory. */
int ev_rouge_l_tokens(const struct ev_tokens *pred, const struct ev_tokens *ref, double *out,
                      struct lk_err *err);

/* All three metrics of one answer against one reference (each in [0, 1]). */
struct ev_scores {
    double em, f1, rouge_l;
};
int ev_score(const char *pred, const char *ref, struct ev_scores *out, struct lk_err *err);

/* A 95% bootstrap percentile interval. */
struct ev_ci {
    double mean; /* the statistic on the original sample */
    double lo, hi;
    size_t n;    /* items */
    int B;       /* resamples */
};

#define EV_BOOTSTRAP_B 1000

/* 95% CI of the mean of x[0..n) by resampling items with replacement B times (B <= 0:
 * EV_BOOTSTRAP_B), percentiles 2.5 and 97.5 (linear interpolation between order statistics,
 * numpy's default). Randomness from rng (seed it and record the seed): the same seed gives
 * the same interval. n == 0 is LK_ERR_USAGE. */
int ev_bootstrap_mean(const double *x, size_t n, int B, struct lk_rng *rng, struct ev_ci *out,
                      struct lk_err *err);
/* 95% CI of mean(a[i] - b[i]): two modes scored on the same n items, resampling items (the
 * pairing is kept, so the common per-item difficulty cancels). */
int ev_bootstrap_paired(const double *a, const double *b, size_t n, int B, struct lk_rng *rng,
                        struct ev_ci *out, struct lk_err *err);

#endif
