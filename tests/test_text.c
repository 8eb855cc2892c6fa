/*
 * test_text.c - the character classes retrieval and scoring share (eval/text.h): each class
 * against a table written by hand from the Unicode charts, and fts's chunker and metrics'
 * tokenizer cutting the same text into the same number of tokens; the lossy UTF-8 decoding of
 * answers against hand-worked cases and Python's bytes.decode("utf-8", "replace").
 */
#include "test.h"

#include <stdlib.h>
#include <string.h>

#include "../eval/fts.h"
#include "../eval/metrics.h"
#include "../eval/text.h"
#include "../libcore/tok.h"

/* Code points with their class by the Unicode charts: 1 CJK (a token of its own), 2 space (a
 * separator), 0 anything else (part of a word). */
static const struct {
    int32_t c;
    int cls;
    const char *what;
} chars[] = {
    { 0x4E2D, 1, "CJK ideograph 中" },       { 0x9FA5, 1, "CJK ideograph 龥" },
    { 0x3400, 1, "CJK extension A" },        { 0x20000, 1, "CJK extension B" },
    { 0xF900, 1, "CJK compatibility" },      { 0x2F00, 1, "Kangxi radical" },
    { 0x3042, 1, "hiragana あ" },            { 0x30A2, 1, "katakana ア" },
    { 0x30FC, 1, "katakana long vowel ー" }, { 0x3105, 1, "bopomofo ㄅ" },
    { 0xFF76, 1, "half-width katakana ｶ" },  { 0xAC00, 0, "hangul syllable 가" },
    { 0xD55C, 0, "hangul syllable 한" },     { 0x1100, 0, "hangul jamo ᄀ" },
    { 0xFF21, 0, "fullwidth Latin Ａ" },     { 0xFF10, 0, "fullwidth digit ０" },
    { 0x0041, 0, "ASCII A" },                { 0x00E9, 0, "Latin é" },
    { 0x0416, 0, "Cyrillic Ж" },             { 0x0020, 2, "ASCII space" },
    { 0x0009, 2, "tab" },                    { 0x000A, 2, "line feed" },
    { 0x000D, 2, "carriage return" },        { 0x00A0, 2, "no-break space" },
    { 0x3000, 2, "ideographic space" },      { 0x2003, 2, "em space" },
    { 0x2028, 2, "line separator" },         { 0x2029, 2, "paragraph separator" },
    { 0x0085, 2, "next line (Cc)" },         { 0x200B, 0, "zero-width space (Cf)" },
};
#define N_CHARS ((int)(sizeof chars / sizeof chars[0]))

static size_t utf8_put(int32_t c, char *out)
{
    if (c < 0x80) {
        out[0] = (char)c;
        return 1;
    }
    if (c < 0x800) {
        out[0] = (char)(0xC0 | (c >> 6));
        out[1] = (char)(0x80 | (c & 0x3F));
        return 2;
    }
    if (c < 0x10000) {
        out[0] = (char)(0xE0 | (c >> 12));
        out[1] = (char)(0x80 | ((c >> 6) & 0x3F));
        out[2] = (char)(0x80 | (c & 0x3F));
        return 3;
    }
    out[0] = (char)(0xF0 | (c >> 18));
    out[1] = (char)(0x80 | ((c >> 12) & 0x3F));
    out[2] = (char)(0x80 | ((c >> 6) & 0x3F));
    out[3] = (char)(0x80 | (c & 0x3F));
    return 4;
}

TEST(text_classes_match_the_unicode_charts)
{
    for (int i = 0; i < N_CHARS; i++) {
        CHECK_MSG(ev_char_is_cjk(chars[i].c) == (chars[i].cls == 1), "U+%04X %s: cjk %d", (unsigned)chars[i].c,
                  chars[i].what, ev_char_is_cjk(chars[i].c));
        CHECK_MSG(ev_char_is_space(chars[i].c) == (chars[i].cls == 2), "U+%04X %s: space %d", (unsigned)chars[i].c,
                  chars[i].what, ev_char_is_space(chars[i].c));
    }
    // the ends of each CJK range, and one past them
    static const int32_t in[] = { 0x2E80, 0x2FDF, 0x3040, 0x30FF, 0x3100, 0x312F, 0x31A0, 0x31FF, 0x3400,
                                  0x4DBF, 0x4E00, 0x9FFF, 0xF900, 0xFAFF, 0xFF66, 0xFF9F, 0x20000, 0x3FFFF };
    static const int32_t out[] = { 0x2E7F, 0x2FE0, 0x303F, 0x3130, 0x319F, 0x3200, 0x33FF, 0x4DC0, 0x4DFF,
                                   0xA000, 0xF8FF, 0xFB00, 0xFF65, 0xFFA0, 0x1FFFF, 0x40000 };
    for (size_t i = 0; i < sizeof in / sizeof in[0]; i++)
        CHECK_MSG(ev_char_is_cjk(in[i]), "U+%04X should be CJK", (unsigned)in[i]);
    for (size_t i = 0; i < sizeof out / sizeof out[0]; i++)
        CHECK_MSG(!ev_char_is_cjk(out[i]), "U+%04X should not be CJK", (unsigned)out[i]);
}

/* Tokens of text by fts's chunker (one chunk holds them all) and by metrics' tokenizer. */
static void count_tokens(const char *text, size_t *out_fts, size_t *out_ev)
{
    struct fts_chunk *ch = NULL;
    size_t n = 0;
    CHECK_OK(fts_chunk_text(text, 1000, 0, &ch, &n, test_err()));
    CHECK_INT(n, 1);
    *out_fts = ch[0].n_tokens;
    lk_free(ch);
    struct ev_tokens t;
    CHECK_OK(ev_tokenize(text, &t, test_err()));
    *out_ev = t.n;
    ev_tokens_release(&t);
}

TEST(text_fts_chunks_and_metrics_tokens_agree)
{
    // "x<c>y": a separator makes two tokens, a CJK character three, anything else one
    for (int i = 0; i < N_CHARS; i++) {
        char text[16];
        size_t k = 0;
        text[k++] = 'x';
        k += utf8_put(chars[i].c, text + k);
        text[k++] = 'y';
        text[k] = 0;
        size_t want = chars[i].cls == 1 ? 3 : chars[i].cls == 2 ? 2 : 1, nf, ne;
        count_tokens(text, &nf, &ne);
        CHECK_MSG(nf == want && ne == want, "U+%04X %s: fts %zu tokens, metrics %zu, expected %zu",
                  (unsigned)chars[i].c, chars[i].what, nf, ne, want);
    }
    // a mixed passage: 高血压 (3), "is" "treated" (2), ｶﾘｳﾑ (4), 한국어 (1), "ＡＢＣ" (1), "x" (1)
    const char *mixed = "高血压\u3000is\ttreated\u00a0ｶﾘｳﾑ 한국어 ＡＢＣ\u2028x";
    size_t nf, ne;
    count_tokens(mixed, &nf, &ne);
    CHECK_INT(nf, 12);
    CHECK_INT(ne, 12);
}

TEST(text_utf8_lossy_and_strict_check_match_python)
{
    // hand-worked: one U+FFFD per maximal ill-formed subsequence
    static const struct {
        const char *in, *want;
    } cases[] = {
        { "plain ascii", "plain ascii" },
        { "\xc3\xa9\xe4\xb8\xad\xf0\x9f\x98\x80", "\xc3\xa9\xe4\xb8\xad\xf0\x9f\x98\x80" }, // é中😀
        { "a\xff" "b", "a\xef\xbf\xbd" "b" },
        { "\xe2\x82", "\xef\xbf\xbd" },                       // a 3-byte character cut short: one
        { "\xe2\x82" "a", "\xef\xbf\xbd" "a" },
        { "\xf0\x9f\x98", "\xef\xbf\xbd" },                   // a 4-byte one at the end
        { "\xed\xa0\x80", "\xef\xbf\xbd\xef\xbf\xbd\xef\xbf\xbd" }, // a surrogate: three
        { "\xc0\xaf", "\xef\xbf\xbd\xef\xbf\xbd" },           // overlong '/': two
        { "\xf4\x90\x80\x80", "\xef\xbf\xbd\xef\xbf\xbd\xef\xbf\xbd\xef\xbf\xbd" }, // above U+10FFFF
        { "\x80x", "\xef\xbf\xbd" "x" },                      // a lone continuation byte
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        char *got = ev_utf8_lossy(cases[i].in, strlen(cases[i].in));
        CHECK(got != NULL);
        CHECK_MSG(!strcmp(got, cases[i].want), "case %zu: got '%s', want '%s'", i, got, cases[i].want);
        lk_free(got);
    }
    // random bytes biased to UTF-8 lead and continuation bytes, against Python's decoder
    FILE *f = fopen(test_path("bytes.hex"), "w");
    CHECK(f != NULL);
    struct lk_rng r;
    lk_rng_seed(&r, 77);
    static const unsigned char pool[] = { 'a', ' ', 0x80, 0x8f, 0x90, 0x9f, 0xa0, 0xbf, 0xc0, 0xc2, 0xdf, 0xe0,
                                          0xe1, 0xed, 0xee, 0xef, 0xf0, 0xf1, 0xf4, 0xf5, 0xff };
    unsigned char buf[300][12];
    size_t len[300];
    for (int k = 0; k < 300; k++) {
        len[k] = 1 + (size_t)(lk_rng_uniform(&r) * 11);
        for (size_t j = 0; j < len[k]; j++) {
            buf[k][j] = pool[(size_t)(lk_rng_uniform(&r) * sizeof pool) % sizeof pool];
            fprintf(f, "%02x", buf[k][j]);
        }
        fputc('\n', f);
    }
    CHECK_INT(fclose(f), 0);
    // each line: the replaced text, and where strict decoding fails (-1: valid)
    f = fopen(test_path("lossy.py"), "w");
    CHECK(f != NULL);
    fputs("import sys\n"
          "for l in open(sys.argv[1]):\n"
          "    b = bytes.fromhex(l.strip())\n"
          "    try:\n"
          "        b.decode('utf-8'); bad = -1\n"
          "    except UnicodeDecodeError as e:\n"
          "        bad = e.start\n"
          "    print(b.decode('utf-8', 'replace').encode().hex(), bad)\n",
          f);
    CHECK_INT(fclose(f), 0);
    int rc = test_sh("python3 '%s' '%s'", test_path("lossy.py"), test_path("bytes.hex"));
    if (rc == 127)
        SKIP("python3 is not installed (the hand-worked cases above ran)");
    CHECK_INT(rc, 0);
    const char *p = test_output();
    for (int k = 0; k < 300; k++) {
        char *got = ev_utf8_lossy((const char *)buf[k], len[k]);
        CHECK(got != NULL);
        char hex[80] = "";
        for (size_t j = 0; got[j]; j++)
            snprintf(hex + 2 * j, sizeof hex - 2 * j, "%02x", (unsigned char)got[j]);
        const char *sp = strchr(p, ' ');
        CHECK(sp != NULL);
        CHECK_MSG((size_t)(sp - p) == strlen(hex) && !strncmp(p, hex, strlen(hex)), "line %d: lorakit %s, python %.*s",
                  k, hex, (int)(sp - p), p);
        // the tokenizer's strict check shares the per-character validator: the same first bad byte
        long bad = strtol(sp + 1, NULL, 10);
        CHECK_MSG((long)tok_utf8_check((const char *)buf[k], len[k]) == bad + 1, "line %d: tok_utf8_check %zu, python %ld",
                  k, tok_utf8_check((const char *)buf[k], len[k]), bad);
        p = strchr(sp, '\n');
        CHECK(p != NULL);
        p++;
        lk_free(got);
    }
}
