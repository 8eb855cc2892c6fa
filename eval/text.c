/*
 * text.c - the character classes eval/fts.c and eval/metrics.c share (see text.h).
 */
#include "text.h"

#include <string.h>

#include <utf8proc.h>

#include "../libcore/lk.h"
#include "../libcore/tok.h"

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

char *ev_utf8_lossy(const char *s, size_t n)
{
    const unsigned char *u = (const unsigned char *)s;
    size_t cap = 3 * n + 1, o = 0; // a byte becomes at most the 3 bytes of U+FFFD
    char *out = lk_malloc(cap);
    if (!out)
        return NULL;
    for (size_t i = 0; i < n;) {
        int k = tok_utf8_char(u + i, n - i);
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
