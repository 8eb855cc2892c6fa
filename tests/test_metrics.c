/* test_metrics.c - answer metrics on hand-worked cases (expected values worked out in the
 * comments), and the bootstrap against the normal approximation. */
#include "test.h"

#include <math.h>
#include <string.h>

#include "../eval/metrics.h"

static int norm_is(const char *in, const char *want)
{
    char *got = NULL;
    if (ev_normalize(in, &got, test_err()) != LK_OK)
        return 0;
    int ok = !strcmp(got, want);
    if (!ok)
        fprintf(stderr, "normalize('%s') = '%s', want '%s'\n", in, got, want);
    lk_free(got);
    return ok;
}

TEST(ev_normalize_squad_rules)
{
    // lower -> "the cat's  hat, a-ok!"; punctuation deleted -> "the cats  hat aok";
    // articles dropped, whitespace collapsed -> "cats hat aok"
    CHECK(norm_is("The Cat's  hat, a-OK!", "cats hat aok"));
    CHECK(norm_is("  A\tan\nTHE  ", ""));
    CHECK(norm_is("", ""));
    CHECK(norm_is("theme anatomy", "theme anatomy")); // articles only as whole words
    // Unicode lower-casing keeps non-ASCII letters: Ü -> ü, É -> é, ß stays
    CHECK(norm_is("\xc3\x9c" "BER Stra\xc3\x9f" "e \xc3\x89t\xc3\xa9", "\xc3\xbc" "ber stra\xc3\x9f" "e \xc3\xa9t\xc3\xa9"));
    // Chinese: one token per character; the full-width comma and question mark are P*
    // "高血压，是什么？" -> 高 血 压 是 什 么
    CHECK(norm_is("\xe9\xab\x98\xe8\xa1\x80\xe5\x8e\x8b\xef\xbc\x8c\xe6\x98\xaf\xe4\xbb\x80\xe4\xb9\x88\xef\xbc\x9f",
                  "\xe9\xab\x98 \xe8\xa1\x80 \xe5\x8e\x8b \xe6\x98\xaf \xe4\xbb\x80 \xe4\xb9\x88"));
    // mixed: "COVID-19疫苗" -> "covid19" then 疫, 苗
    CHECK(norm_is("COVID-19\xe7\x96\xab\xe8\x8b\x97", "covid19 \xe7\x96\xab \xe8\x8b\x97"));
    // curly quotes and em dash are Unicode punctuation; invalid bytes are dropped
    CHECK(norm_is("\xe2\x80\x9cwell\xe2\x80\x9d \xe2\x80\x94 ok\xff\xfe", "well ok"));
    CHECK(norm_is("a\x01" "b\x1b" "c", "b c")); // control characters separate; "a" is an article
}

TEST(ev_exact_match_f1_rouge_hand_worked)
{
    struct ev_scores s;
    // EM after normalisation
    CHECK_OK(ev_score("The answer.", "answer", &s, test_err()));
    CHECK(s.em == 1.0 && s.f1 == 1.0 && s.rouge_l == 1.0);
    CHECK_OK(ev_score("answer", "answers", &s, test_err()));
    CHECK(s.em == 0.0 && s.f1 == 0.0);
    // pred tokens: cat sat on mat (4); ref: cat sat on hat (4); common 3
    // P = R = 3/4, F1 = 0.75; LCS = "cat sat on" = 3 -> ROUGE-L = 0.75
    CHECK_OK(ev_score("the cat sat on the mat", "a cat sat on a hat", &s, test_err()));
    CHECK(s.em == 0.0);
    CHECK_NEAR(s.f1, 0.75, 1e-12);
    CHECK_NEAR(s.rouge_l, 0.75, 1e-12);
    // multiset: pred x x x y, ref x y y: common = min(3,1) + min(1,2) = 2
    // P = 2/4, R = 2/3, F1 = 2 (1/2)(2/3) / (1/2 + 2/3) = (2/3) / (7/6) = 4/7
    // LCS(x x x y, x y y) = "x y" = 2 -> the same P, R -> 4/7
    CHECK_OK(ev_score("x x x y", "x y y", &s, test_err()));
    CHECK_NEAR(s.f1, 4.0 / 7.0, 1e-12);
    CHECK_NEAR(s.rouge_l, 4.0 / 7.0, 1e-12);
    // order matters for ROUGE-L, not for F1: pred p q r, ref q p r s t
    // F1: common 3, P = 1, R = 3/5, F1 = 2 (3/5) / (8/5) = 3/4
    // LCS = "q r" (or "p r") = 2: P = 2/3, R = 2/5, F = (8/15) / (16/15) = 1/2
    CHECK_OK(ev_score("p q r", "q p r s t", &s, test_err()));
    CHECK_NEAR(s.f1, 0.75, 1e-12);
    CHECK_NEAR(s.rouge_l, 0.5, 1e-12);
    // empty sides: SQuAD F1 is 1 only when both are empty; rouge-score gives 0
    CHECK_OK(ev_score("", "the", &s, test_err()));
    CHECK(s.em == 1.0 && s.f1 == 1.0 && s.rouge_l == 0.0);
    CHECK_OK(ev_score("", "x", &s, test_err()));
    CHECK(s.em == 0.0 && s.f1 == 0.0 && s.rouge_l == 0.0);
    // Chinese character level: pred 高血压 (3 chars), ref 高血糖 (高 血 糖): common 2
    // P = R = 2/3, F1 = 2/3; LCS 高血 = 2 -> 2/3; EM ignores spaces between characters
    CHECK_OK(ev_score("\xe9\xab\x98\xe8\xa1\x80\xe5\x8e\x8b", "\xe9\xab\x98\xe8\xa1\x80\xe7\xb3\x96", &s, test_err()));
    CHECK_NEAR(s.f1, 2.0 / 3.0, 1e-12);
    CHECK_NEAR(s.rouge_l, 2.0 / 3.0, 1e-12);
    CHECK_OK(ev_score("\xe9\xab\x98\xe8\xa1\x80\xe5\x8e\x8b", "\xe9\xab\x98 \xe8\xa1\x80 \xe5\x8e\x8b", &s, test_err()));
    CHECK(s.em == 1.0);
}

TEST(ev_rouge_l_long_inputs)
{
    // LCS of "t0 t1 ... t1999" with itself reversed is 1 token; with itself, all 2000.
    size_t n = 2000;
    char *a = lk_malloc(n * 8), *b = lk_malloc(n * 8);
    CHECK(a && b);
    size_t wa = 0, wb = 0;
    for (size_t i = 0; i < n; i++) {
        wa += (size_t)sprintf(a + wa, "t%zu ", i);
        wb += (size_t)sprintf(b + wb, "t%zu ", n - 1 - i);
    }
    struct ev_scores s;
    CHECK_OK(ev_score(a, b, &s, test_err()));
    CHECK_NEAR(s.f1, 1.0, 1e-12);
    CHECK_NEAR(s.rouge_l, 1.0 / 2000.0, 1e-12);
    CHECK_OK(ev_score(a, a, &s, test_err()));
    CHECK_NEAR(s.rouge_l, 1.0, 1e-12);
    lk_free(a);
    lk_free(b);
}

static void bernoulli(double *x, size_t n, double p, uint64_t seed)
{
    struct lk_rng r;
    lk_rng_seed(&r, seed);
    for (size_t i = 0; i < n; i++)
        x[i] = lk_rng_uniform(&r) < p ? 1.0 : 0.0;
}

TEST(ev_bootstrap_reproducible_and_calibrated)
{
    size_t n = 2000;
    double *x = lk_malloc(sizeof *x * n);
    CHECK(x);
    bernoulli(x, n, 0.3, 11);
    struct lk_rng r1, r2, r3;
    struct ev_ci a, b, c;
    lk_rng_seed(&r1, 42);
    lk_rng_seed(&r2, 42);
    lk_rng_seed(&r3, 43);
    CHECK_OK(ev_bootstrap_mean(x, n, 0, &r1, &a, test_err()));
    CHECK_OK(ev_bootstrap_mean(x, n, 0, &r2, &b, test_err()));
    CHECK_OK(ev_bootstrap_mean(x, n, 0, &r3, &c, test_err()));
    CHECK_INT(a.B, EV_BOOTSTRAP_B);
    CHECK(a.lo == b.lo && a.hi == b.hi); // same seed, same interval, bit for bit
    CHECK(a.lo != c.lo || a.hi != c.hi); // another seed, another draw
    CHECK(a.lo <= a.mean && a.mean <= a.hi);
    // independent reference: normal approximation, half-width 1.96 sqrt(m (1 - m) / n)
    double m = a.mean, hw = 1.96 * sqrt(m * (1 - m) / (double)n);
    CHECK_NEAR((a.hi - a.lo) / 2, hw, 0.15 * hw / fmax(1.0, hw));
    CHECK_NEAR((a.hi + a.lo) / 2, m, 0.3 * hw);
    // the width shrinks like 1/sqrt(n): 100 items give about sqrt(20) = 4.5 times wider
    struct ev_ci small;
    CHECK_OK(ev_bootstrap_mean(x, 100, 0, &r1, &small, test_err()));
    double ratio = (small.hi - small.lo) / (a.hi - a.lo);
    CHECK_MSG(ratio > 3.0 && ratio < 6.5, "width ratio %g", ratio);
    // one item: no spread
    CHECK_OK(ev_bootstrap_mean(x, 1, 50, &r1, &small, test_err()));
    CHECK(small.lo == x[0] && small.hi == x[0]);
    CHECK(ev_bootstrap_mean(x, 0, 50, &r1, &small, test_err()) == LK_ERR_USAGE);
    lk_free(x);
}

TEST(ev_bootstrap_paired_difference)
{
    size_t n = 1000;
    double *a = lk_malloc(sizeof *a * n), *b = lk_malloc(sizeof *b * n);
    CHECK(a && b);
    // b = a - 0.1 exactly: every resample has mean difference 0.1
    struct lk_rng r;
    lk_rng_seed(&r, 5);
    for (size_t i = 0; i < n; i++) {
        a[i] = lk_rng_uniform(&r);
        b[i] = a[i] - 0.1;
    }
    struct ev_ci d, ua;
    CHECK_OK(ev_bootstrap_paired(a, b, n, 200, &r, &d, test_err()));
    CHECK_NEAR(d.mean, 0.1, 1e-9);
    CHECK_NEAR(d.lo, 0.1, 1e-9);
    CHECK_NEAR(d.hi, 0.1, 1e-9);
    // correlated noise: b = a + small noise - 0.05; pairing cancels a's spread, so the paired
    // interval is much narrower than the interval of a alone
    for (size_t i = 0; i < n; i++)
        b[i] = a[i] - 0.05 + 0.01 * lk_rng_normal(&r);
    CHECK_OK(ev_bootstrap_paired(a, b, n, 0, &r, &d, test_err()));
    CHECK_OK(ev_bootstrap_mean(a, n, 0, &r, &ua, test_err()));
    CHECK(d.lo <= d.mean && d.mean <= d.hi);
    CHECK(d.lo > 0.04 && d.hi < 0.06);
    CHECK((d.hi - d.lo) * 10 < ua.hi - ua.lo);
    lk_free(a);
    lk_free(b);
}
