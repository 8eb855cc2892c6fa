/*
 * text.h - the character classes that retrieval (eval/fts.c: chunking) and scoring
 * (eval/metrics.c: SQuAD-style tokens) share, so that a passage and an answer are cut into
 * tokens by the same rules: a CJK character is a token of its own (Chinese and Japanese have no
 * spaces), white space separates tokens. Characters are Unicode code points (utf8proc).
 */
#ifndef LK_EV_TEXT_H
#define LK_EV_TEXT_H

#include <stddef.h>
#include <stdint.h>

/* 1 for ideographs, kana and bopomofo: CJK radicals and Kangxi radicals U+2E80..2FDF,
 * hiragana and katakana U+3040..30FF, bopomofo U+3100..312F, bopomofo extended and the
 * katakana phonetic extension U+31A0..31FF, CJK extension A U+3400..4DBF, unified ideographs
 * U+4E00..9FFF, compatibility ideographs U+F900..FAFF, half-width katakana U+FF66..FF9F,
 * extensions B and later U+20000..3FFFF. Hangul is not (Korean separates words with spaces). */
int ev_char_is_cjk(int32_t c);

/* 1 for ASCII white space and control characters (<= U+0020, U+007F) and, above ASCII, the
 * Unicode categories Zs, Zl, Zp and Cc (U+00A0, U+3000, U+2028, U+0085...). Format characters
 * such as U+200B (category Cf) are not white space. */
int ev_char_is_space(int32_t c);

/* s[0..n) as valid UTF-8, as Hugging Face's decode and Python's bytes.decode("utf-8", "replace")
 * give it: each maximal ill-formed subsequence (a byte that cannot start a character, or the
 * valid start of a character cut short) becomes U+FFFD; overlong forms, surrogates and code
 * points above U+10FFFF are ill-formed. A new NUL-terminated heap string (lk_free), NULL when
 * out of memory. A model's answer is bytes; what eval stores, scores and prints is text. */
char *ev_utf8_lossy(const char *s, size_t n);

#endif
