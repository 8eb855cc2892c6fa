/*
 * text.c - the character classes eval/fts.c and eval/metrics.c share (see text.h).
 */
#include "text.h"

#include <string.h>

#include <utf8proc.h>

#include "../libcore/lk.h"

int ev_char_is_cjk(int32_t c)
{
    return (c >= 0x2E80 && c <= 0x2FDF) ||   // CJK radicals, Kangxi radicals
           (c >= 0x3040 && c <= 0x30FF) ||   // hiragana, katakana
           (c >= 0x3100 && c <= 0x312F) ||   // bopomofo
           (c >= 0x31A0 && c <= 0x31FF) ||   // bopomofo extended, katakana extension
           (c >= 0x3400 && c <= 0x4DBF) ||   // CJK extension A
           (c >= 0x4E00 && c <= 0x9FFF) ||   // CJK unified ideographs
           (c >= 0xF900 && c <= 0xFAFF) ||   // CJK compatibility ideographs
           (c >= 0xFF66 && c <= 0xFF9F) ||   // half-width katakana
           (c >= 0x20000 && c <= 0x3FFFF);   // extensions B..H
}

int ev_char_is_space(int32_t c)
{
    if (c < 0x80)
        return c <= 0x20 || c == 0x7f; // ASCII whitespace and control characters
    utf8proc_category_t k = utf8proc_category(c);
    return k == UTF8PROC_CATEGORY_ZS || k == UTF8PROC_CATEGORY_ZL || k == UTF8PROC_CATEGORY_ZP ||
           k == UTF8PROC_CATEGORY_CC;
}

/* The length of the well-formed character at s[0..n), or -(bytes of its longest valid prefix,
 * at least 1) when it is ill-formed (Unicode's table of well-formed byte sequences, 3.9). */
static int utf8_char(const unsigned char *s, size_t n)
{
    unsigned char c = s[0];
    if (c < 0x80)
        return 1;
    int len = c >= 0xC2 && c <= 0xDF ? 2 : c >= 0xE0 && c <= 0xEF ? 3 : c >= 0xF0 && c <= 0xF4 ? 4 : 0;
    if (!len)
        return -1;
    unsigned char lo = 0x80, hi = 0xBF; // the second byte's range depends on the first
    if (c == 0xE0)
        lo = 0xA0;
    else if (c == 0xED)
        hi = 0x9F;
    else if (c == 0xF0)
        lo = 0x90;
    else if (c == 0xF4)
        hi = 0x8F;
    for (int j = 1; j < len; j++) {
        if ((size_t)j >= n || s[j] < (j == 1 ? lo : 0x80) || s[j] > (j == 1 ? hi : 0xBF))
            return -j;
    }
    return len;
}

char *ev_utf8_lossy(const char *s, size_t n)
{
    const unsigned char *u = (const unsigned char *)s;
    size_t cap = 3 * n + 1, o = 0; // a byte becomes at most the 3 bytes of U+FFFD
    char *out = lk_malloc(cap);
    if (!out)
        return NULL;
    for (size_t i = 0; i < n;) {
        int k = utf8_char(u + i, n - i);
        if (k > 0) {
            memcpy(out + o, s + i, (size_t)k);
            o += (size_t)k;
            i += (size_t)k;
        } else {
            memcpy(out + o, "\xEF\xBF\xBD", 3);
            o += 3;
            i += (size_t)-k;
        }
    }
    out[o] = 0;
    return out;
}
