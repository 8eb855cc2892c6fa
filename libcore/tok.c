/*
 * tok.c - load and run a byte-level BPE tokenizer.json (see tok.h).
 *
 * Encoding follows Hugging Face's pipeline: (1) added tokens are cut out of the raw text
 * (leftmost, longest first); (2) each remaining segment is NFC-normalized; (3) the
 * pre-tokenizer steps split it (Split with the file's regex, ByteLevel with its GPT-2
 * regex when use_regex); (4) each piece goes through BPE on its bytes, merges applied
 * lowest rank first, leftmost among equals (a binary heap over candidate pairs, so a
 * word of n bytes costs O(n log n) rather than a rescan per merge); (5) results of short
 * pieces are kept in a word cache. Tokens are stored as raw bytes (the GPT-2
 * byte-to-unicode alphabet undone at load), so decoding is concatenation.
 * Owns: the token table, vocab and merge hash maps, compiled regexes, the cache.
 */
#include "tok.h"

#define PCRE2_CODE_UNIT_WIDTH 8
#include <cjson/cJSON.h>
#include <pcre2.h>
#include <stdlib.h>
#include <string.h>
#include <utf8proc.h>

#include "gguf.h"

// ---- small containers ----

int tok_ids_push(struct tok_ids *a, int32_t id, struct lk_err *err)
{
    if (a->n == a->cap) {
        size_t cap = a->cap ? a->cap * 2 : 64;
        int32_t *v = lk_realloc(a->v, cap * sizeof *v);
        if (!v)
            return lk_errf(err, LK_ERR_NOMEM, "out of memory for %zu token ids", cap);
        a->v = v;
        a->cap = cap;
    }
    a->v[a->n++] = id;
    return LK_OK;
}

void tok_ids_release(struct tok_ids *a)
{
    if (!a)
        return;
    lk_free(a->v);
    memset(a, 0, sizeof *a);
}

static uint64_t hash_bytes(const void *p, size_t n)
{
    const unsigned char *s = p;
    uint64_t h = 1469598103934665603ull; // FNV-1a
    for (size_t i = 0; i < n; i++) {
        h ^= s[i];
        h *= 1099511628211ull;
    }
    return h ^ (h >> 29);
}

static uint64_t hash_u64(uint64_t x)
{
    x ^= x >> 33;
    x *= 0xff51afd7ed558ccdull;
    x ^= x >> 33;
    x *= 0xc4ceb9fe1a85ec53ull;
    x ^= x >> 33;
    return x;
}

static size_t pow2_at_least(size_t n)
{
    size_t c = 16;
    while (c < n)
        c <<= 1;
    return c;
}

// ---- the token table ----

struct tok_piece {
    uint32_t off, len; /* into tok->bytes */
    uint8_t present, special, added;
};

struct tok_added {
    char *s; /* owned: content */
    size_t len;
    int32_t id;
    uint8_t special, lstrip, rstrip;
};

enum step_kind { STEP_SPLIT, STEP_BYTELEVEL };
enum split_behavior { SPLIT_ISOLATED, SPLIT_REMOVED };

struct tok_step {
    enum step_kind kind;
    pcre2_code *re;           /* owned; for BYTELEVEL with use_regex, GPT-2's */
    pcre2_match_data *md;     /* owned */
    enum split_behavior behavior;
    int add_prefix_space;
};

#define TOK_MAX_STEPS 8
#define CACHE_MAX_WORD 64

struct cache_ent {
    uint64_t h;
    uint32_t key_off, key_len; /* into cache_mem */
    uint32_t ids_off, n_ids;   /* into cache_ids */
    uint8_t used;
};

struct tok {
    // token table
    int32_t n_ids;
    int32_t id_limit;         /* ids must be below it: a few listed tokens cannot size a huge table */
    struct tok_piece *pieces; /* owned [n_ids] */
    char *bytes;              /* owned: all tokens' raw bytes */
    size_t bytes_len, bytes_cap;
    // vocab map: raw bytes -> id (model vocab only); open addressing, -1 = empty
    int32_t *vmap;
    size_t vmap_cap;
    // merges: key (a << 32 | b) -> rank and result
    uint64_t *mkey; /* owned; UINT64_MAX = empty */
    int32_t *mrank, *mres;
    size_t mcap;
    int32_t byte_id[256];
    int ignore_merges;
    int nfc;
    struct tok_step steps[TOK_MAX_STEPS];
    int n_steps;
    struct tok_added *added; /* owned [n_added], sorted longest first */
    int n_added;
    uint8_t added_first[256];
    // tokenizer_config.json
    int32_t bos, eos, pad;
    int add_bos;
    char *chat_template; /* owned, may be NULL */
    // word cache
    struct cache_ent *cache;
    size_t cache_cap, cache_n;
    char *cache_mem;
    size_t cache_mem_len, cache_mem_cap;
    int32_t *cache_ids;
    size_t cache_ids_len, cache_ids_cap;
    // BPE scratch
    struct bpe_sym *syms;
    size_t syms_cap;
    struct bpe_cand *heap;
    size_t heap_cap;
    char *prefix_buf;
    size_t prefix_cap;
};

/* GPT-2's byte <-> unicode map: printable bytes map to themselves, the rest to 256+k. */
static void byte_unicode_tables(uint32_t b2u[256])
{
    int n = 0;
    for (int b = 0; b < 256; b++) {
        int keep = (b >= 33 && b <= 126) || (b >= 161 && b <= 172) || (b >= 174 && b <= 255);
        b2u[b] = keep ? (uint32_t)b : (uint32_t)(256 + n++);
    }
}

static int u2b_lookup(uint32_t cp)
{
    static int16_t u2b[512];
    static int init;
    if (!init) { // idempotent: racing threads write the same values
        uint32_t b2u[256];
        byte_unicode_tables(b2u);
        for (int i = 0; i < 512; i++)
            u2b[i] = -1;
        for (int b = 0; b < 256; b++)
            u2b[b2u[b]] = (int16_t)b;
        init = 1;
    }
    return cp < 512 ? u2b[cp] : -1;
}

/* Decodes one UTF-8 character at s (valid input assumed); returns its length. */
static int utf8_next(const unsigned char *s, size_t n, uint32_t *cp)
{
    utf8proc_int32_t c;
    utf8proc_ssize_t k = utf8proc_iterate(s, (utf8proc_ssize_t)n, &c);
    if (k <= 0) {
        *cp = 0xFFFD;
        return 1;
    }
    *cp = (uint32_t)c;
    return (int)k;
}

int tok_utf8_char(const unsigned char *s, size_t n)
{
    unsigned char c = s[0];
    if (c < 0x80)
        return 1;
    int len = c >= 0xC2 && c <= 0xDF ? 2 : c >= 0xE0 && c <= 0xEF ? 3 : c >= 0xF0 && c <= 0xF4 ? 4 : 0;
    if (!len)
        return -1;
    // the second byte's range depends on the first: no overlong forms, surrogates or > U+10FFFF
    unsigned char lo = 0x80, hi = 0xBF;
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

size_t tok_utf8_check(const char *str, size_t len)
{
    const unsigned char *s = (const unsigned char *)str;
    for (size_t i = 0; i < len;) {
        int k = tok_utf8_char(s + i, len - i);
        if (k < 0)
            return i + 1;
        i += (size_t)k;
    }
    return 0;
}

static int bytes_append(struct tok *t, const void *p, size_t n, uint32_t *off, struct lk_err *err)
{
    if (t->bytes_len + n > UINT32_MAX)
        return lk_errf(err, LK_ERR_FORMAT, "token strings too large");
    if (t->bytes_len + n > t->bytes_cap) {
        size_t cap = pow2_at_least(t->bytes_len + n + 1);
        char *b = lk_realloc(t->bytes, cap);
        if (!b)
            return lk_errf(err, LK_ERR_NOMEM, "out of memory for token strings");
        t->bytes = b;
        t->bytes_cap = cap;
    }
    memcpy(t->bytes + t->bytes_len, p, n);
    *off = (uint32_t)t->bytes_len;
    t->bytes_len += n;
    return LK_OK;
}

/* vocab map lookup: raw bytes -> id or -1 */
static int32_t vmap_get(const struct tok *t, const void *s, size_t n)
{
    if (!t->vmap_cap)
        return -1;
    size_t m = t->vmap_cap - 1;
    for (size_t i = hash_bytes(s, n) & m;; i = (i + 1) & m) {
        int32_t id = t->vmap[i];
        if (id < 0)
            return -1;
        const struct tok_piece *p = &t->pieces[id];
        if (p->len == n && !memcmp(t->bytes + p->off, s, n))
            return id;
    }
}

static void vmap_put(struct tok *t, int32_t id)
{
    const struct tok_piece *p = &t->pieces[id];
    size_t m = t->vmap_cap - 1;
    size_t i = hash_bytes(t->bytes + p->off, p->len) & m;
    while (t->vmap[i] >= 0)
        i = (i + 1) & m;
    t->vmap[i] = id;
}

static int merge_get(const struct tok *t, int32_t a, int32_t b, int32_t *rank, int32_t *res)
{
    uint64_t k = ((uint64_t)(uint32_t)a << 32) | (uint32_t)b;
    size_t m = t->mcap - 1;
    for (size_t i = hash_u64(k) & m;; i = (i + 1) & m) {
        if (t->mkey[i] == UINT64_MAX)
            return 0;
        if (t->mkey[i] == k) {
            *rank = t->mrank[i];
            *res = t->mres[i];
            return 1;
        }
    }
}

/* Adds a merge; a pair listed twice keeps its first (lowest) rank, as HF does. */
static void merge_put(struct tok *t, int32_t a, int32_t b, int32_t rank, int32_t res)
{
    uint64_t k = ((uint64_t)(uint32_t)a << 32) | (uint32_t)b;
    size_t m = t->mcap - 1;
    size_t i = hash_u64(k) & m;
    while (t->mkey[i] != UINT64_MAX) {
        if (t->mkey[i] == k)
            return;
        i = (i + 1) & m;
    }
    t->mkey[i] = k;
    t->mrank[i] = rank;
    t->mres[i] = res;
}

// ---- loading ----

/* Converts a vocab string in the byte-level alphabet to raw bytes (into buf, at least
 * strlen(s) bytes). Returns the byte count, or -1 if a character is outside the alphabet. */
static long bytelevel_to_raw(const char *s, size_t n, char *buf)
{
    size_t i = 0;
    long k = 0;
    while (i < n) {
        uint32_t cp;
        i += (size_t)utf8_next((const unsigned char *)s + i, n - i, &cp);
        int b = u2b_lookup(cp);
        if (b < 0)
            return -1;
        buf[k++] = (char)b;
    }
    return k;
}

static int ensure_ids(struct tok *t, int32_t id, struct lk_err *err)
{
    if (id < t->n_ids)
        return LK_OK;
    int32_t n = t->n_ids ? t->n_ids : 1024;
    while (n <= id)
        n *= 2;
    struct tok_piece *p = lk_realloc(t->pieces, (size_t)n * sizeof *p);
    if (!p)
        return lk_errf(err, LK_ERR_NOMEM, "out of memory for %d tokens", n);
    memset(p + t->n_ids, 0, (size_t)(n - t->n_ids) * sizeof *p);
    t->pieces = p;
    t->n_ids = n;
    return LK_OK;
}

static const char *json_str(const cJSON *o, const char *key)
{
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, key);
    return cJSON_IsString(v) ? v->valuestring : NULL;
}

static int json_bool(const cJSON *o, const char *key, int dflt)
{
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, key);
    if (cJSON_IsBool(v))
        return cJSON_IsTrue(v);
    return dflt;
}

static const char *GPT2_REGEX =
    "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+";

static int compile_re(const char *name, struct tok_step *st, const char *pat, int literal,
                      struct lk_err *err)
{
    int ec;
    PCRE2_SIZE eo;
    // the pattern comes from the file: PCRE2 must check its UTF-8 (NO_UTF_CHECK read out of bounds)
    uint32_t flags = PCRE2_UTF | PCRE2_UCP | (literal ? PCRE2_LITERAL : 0);
    st->re = pcre2_compile((PCRE2_SPTR)pat, PCRE2_ZERO_TERMINATED, flags, &ec, &eo, NULL);
    if (!st->re) {
        PCRE2_UCHAR msg[256];
        pcre2_get_error_message(ec, msg, sizeof msg);
        return lk_errf(err, LK_ERR_FORMAT, "%s: pre_tokenizer regex does not compile at offset %zu: %s",
                       name, (size_t)eo, (char *)msg);
    }
    pcre2_jit_compile(st->re, PCRE2_JIT_COMPLETE); // falls back to the interpreter if unavailable
    st->md = pcre2_match_data_create_from_pattern(st->re, NULL);
    if (!st->md)
        return lk_errf(err, LK_ERR_NOMEM, "out of memory for regex match data");
    return LK_OK;
}

static int load_pretok(struct tok *t, const char *name, const cJSON *pt, struct lk_err *err)
{
    const char *type = json_str(pt, "type");
    if (!type)
        return lk_errf(err, LK_ERR_FORMAT, "%s: pre_tokenizer has no 'type'", name);
    if (!strcmp(type, "Sequence")) {
        const cJSON *list = cJSON_GetObjectItemCaseSensitive(pt, "pretokenizers");
        if (!cJSON_IsArray(list))
            return lk_errf(err, LK_ERR_FORMAT, "%s: pre_tokenizer Sequence has no 'pretokenizers' list", name);
        const cJSON *e;
        cJSON_ArrayForEach(e, list)
        {
            int rc = load_pretok(t, name, e, err);
            if (rc)
                return rc;
        }
        return LK_OK;
    }
    if (t->n_steps == TOK_MAX_STEPS)
        return lk_errf(err, LK_ERR_UNSUPPORTED, "%s: too many pre-tokenizer steps", name);
    struct tok_step *st = &t->steps[t->n_steps];
    if (!strcmp(type, "Split")) {
        const cJSON *pat = cJSON_GetObjectItemCaseSensitive(pt, "pattern");
        const char *re = json_str(pat, "Regex"), *lit = json_str(pat, "String");
        const char *beh = json_str(pt, "behavior");
        if (!re && !lit)
            return lk_errf(err, LK_ERR_FORMAT, "%s: Split pre-tokenizer has no 'pattern' Regex or String", name);
        if (json_bool(pt, "invert", 0))
            return lk_errf(err, LK_ERR_UNSUPPORTED, "%s: Split with invert=true is not supported", name);
        if (beh && !strcmp(beh, "Isolated"))
            st->behavior = SPLIT_ISOLATED;
        else if (beh && !strcmp(beh, "Removed"))
            st->behavior = SPLIT_REMOVED;
        else
            return lk_errf(err, LK_ERR_UNSUPPORTED,
                           "%s: Split behavior '%s' is not supported (only Isolated and Removed)", name,
                           beh ? beh : "(none)");
        st->kind = STEP_SPLIT;
        t->n_steps++;
        return compile_re(name, st, re ? re : lit, !re, err);
    }
    if (!strcmp(type, "ByteLevel")) {
        st->kind = STEP_BYTELEVEL;
        st->add_prefix_space = json_bool(pt, "add_prefix_space", 1);
        t->n_steps++;
        if (json_bool(pt, "use_regex", 1)) {
            st->behavior = SPLIT_ISOLATED;
            return compile_re(name, st, GPT2_REGEX, 0, err);
        }
        return LK_OK;
    }
    return lk_errf(err, LK_ERR_UNSUPPORTED,
                   "%s: pre_tokenizer '%s' is not supported (only byte-level BPE: Split and ByteLevel)",
                   name, type);
}

static int load_normalizer(struct tok *t, const char *name, const cJSON *n, struct lk_err *err)
{
    if (!n || cJSON_IsNull(n))
        return LK_OK;
    const char *type = json_str(n, "type");
    if (type && !strcmp(type, "NFC")) {
        t->nfc = 1;
        return LK_OK;
    }
    if (type && !strcmp(type, "Sequence")) {
        const cJSON *e;
        cJSON_ArrayForEach(e, cJSON_GetObjectItemCaseSensitive(n, "normalizers"))
        {
            int rc = load_normalizer(t, name, e, err);
            if (rc)
                return rc;
        }
        return LK_OK;
    }
    return lk_errf(err, LK_ERR_UNSUPPORTED, "%s: normalizer '%s' is not supported (only NFC or none)", name,
                   type ? type : "(no type)");
}

static int cmp_added(const void *a, const void *b)
{
    const struct tok_added *x = a, *y = b;
    if (x->len != y->len)
        return x->len > y->len ? -1 : 1;
    return x->id < y->id ? -1 : x->id > y->id;
}

static int load_added(struct tok *t, const char *name, const cJSON *list, struct lk_err *err)
{
    if (!list || cJSON_IsNull(list))
        return LK_OK;
    int n = cJSON_GetArraySize(list);
    t->added = lk_calloc((size_t)n + 1, sizeof *t->added);
    if (!t->added)
        return lk_errf(err, LK_ERR_NOMEM, "out of memory for added tokens");
    const cJSON *e;
    cJSON_ArrayForEach(e, list)
    {
        const char *content = json_str(e, "content");
        const cJSON *idj = cJSON_GetObjectItemCaseSensitive(e, "id");
        if (!content || !*content || !cJSON_IsNumber(idj) || idj->valuedouble < 0 || idj->valuedouble >= t->id_limit)
            return lk_errf(err, LK_ERR_FORMAT, "%s: added_tokens[%d] needs a non-empty 'content' and an 'id'",
                           name, t->n_added);
        struct tok_added *a = &t->added[t->n_added++];
        a->len = strlen(content);
        a->s = lk_strdup(content);
        if (!a->s)
            return lk_errf(err, LK_ERR_NOMEM, "out of memory for added tokens");
        a->id = (int32_t)idj->valuedouble;
        a->special = (uint8_t)json_bool(e, "special", 0);
        a->lstrip = (uint8_t)json_bool(e, "lstrip", 0);
        a->rstrip = (uint8_t)json_bool(e, "rstrip", 0);
        int rc = ensure_ids(t, a->id, err);
        if (rc)
            return rc;
        struct tok_piece *p = &t->pieces[a->id];
        rc = bytes_append(t, a->s, a->len, &p->off, err);
        if (rc)
            return rc;
        p->len = (uint32_t)a->len;
        p->present = 1;
        p->added = 1;
        p->special = a->special;
        t->added_first[(unsigned char)a->s[0]] = 1;
    }
    qsort(t->added, (size_t)t->n_added, sizeof *t->added, cmp_added);
    return LK_OK;
}

static int load_model(struct tok *t, const char *name, const cJSON *m, struct lk_err *err)
{
    const char *type = json_str(m, "type");
    const cJSON *vocab = cJSON_GetObjectItemCaseSensitive(m, "vocab");
    const cJSON *merges = cJSON_GetObjectItemCaseSensitive(m, "merges");
    if (!type && cJSON_IsObject(vocab) && cJSON_IsArray(merges))
        type = "BPE"; // older files leave the type out
    if (!type)
        return lk_errf(err, LK_ERR_FORMAT, "%s: model has no 'type'", name);
    if (strcmp(type, "BPE"))
        return lk_errf(err, LK_ERR_UNSUPPORTED,
                       "%s: model type '%s' is not supported (only byte-level BPE: Qwen2, GPT-2, Llama 3)",
                       name, type);
    if (!cJSON_IsObject(vocab) || !cJSON_IsArray(merges))
        return lk_errf(err, LK_ERR_FORMAT, "%s: BPE model needs a 'vocab' object and a 'merges' list", name);
    if (json_bool(m, "byte_fallback", 0))
        return lk_errf(err, LK_ERR_UNSUPPORTED, "%s: BPE with byte_fallback is not supported", name);
    const char *csp = json_str(m, "continuing_subword_prefix"), *eow = json_str(m, "end_of_word_suffix");
    if ((csp && *csp) || (eow && *eow))
        return lk_errf(err, LK_ERR_UNSUPPORTED, "%s: BPE with subword prefixes/suffixes is not supported",
                       name);
    t->ignore_merges = json_bool(m, "ignore_merges", 0);

    int nv = cJSON_GetArraySize(vocab);
    t->vmap_cap = pow2_at_least((size_t)nv * 2 + 16);
    t->vmap = lk_malloc(t->vmap_cap * sizeof *t->vmap);
    if (!t->vmap)
        return lk_errf(err, LK_ERR_NOMEM, "out of memory for the vocab");
    memset(t->vmap, 0xff, t->vmap_cap * sizeof *t->vmap);
    char *buf = NULL;
    size_t buf_cap = 0;
    const cJSON *e;
    int rc = LK_OK;
    cJSON_ArrayForEach(e, vocab)
    {
        if (!cJSON_IsNumber(e) || e->valuedouble < 0 || e->valuedouble >= t->id_limit ||
            e->valuedouble != (double)(int32_t)e->valuedouble) {
            rc = lk_errf(err, LK_ERR_FORMAT, "%s: vocab entry '%s' has no valid id (an integer from 0 to %d)", name,
                         e->string, t->id_limit - 1);
            break;
        }
        int32_t id = (int32_t)e->valuedouble;
        size_t n = strlen(e->string);
        if (n + 1 > buf_cap) {
            buf_cap = pow2_at_least(n + 1);
            char *b = lk_realloc(buf, buf_cap);
            if (!b) {
                rc = lk_errf(err, LK_ERR_NOMEM, "out of memory");
                break;
            }
            buf = b;
        }
        long k = bytelevel_to_raw(e->string, n, buf);
        const char *src = k >= 0 ? buf : e->string; // not byte-level: keep the text as it is
        size_t len = k >= 0 ? (size_t)k : n;
        rc = ensure_ids(t, id, err);
        if (rc)
            break;
        struct tok_piece *p = &t->pieces[id];
        if (p->present && !p->added) {
            rc = lk_errf(err, LK_ERR_FORMAT, "%s: vocab id %d is given to two tokens", name, (int)id);
            break;
        }
        if (vmap_get(t, src, len) >= 0) {
            rc = lk_errf(err, LK_ERR_FORMAT, "%s: vocab token '%s' appears twice", name, e->string);
            break;
        }
        if (!p->present) {
            rc = bytes_append(t, src, len, &p->off, err);
            if (rc)
                break;
            p->len = (uint32_t)len;
            p->present = 1;
        }
        vmap_put(t, id);
    }
    lk_free(buf);
    if (rc)
        return rc;
    for (int b = 0; b < 256; b++) {
        char c = (char)b;
        t->byte_id[b] = vmap_get(t, &c, 1);
    }

    int nm = cJSON_GetArraySize(merges);
    t->mcap = pow2_at_least((size_t)nm * 2 + 16);
    t->mkey = lk_malloc(t->mcap * sizeof *t->mkey);
    t->mrank = lk_malloc(t->mcap * sizeof *t->mrank);
    t->mres = lk_malloc(t->mcap * sizeof *t->mres);
    if (!t->mkey || !t->mrank || !t->mres)
        return lk_errf(err, LK_ERR_NOMEM, "out of memory for %d merges", nm);
    memset(t->mkey, 0xff, t->mcap * sizeof *t->mkey);
    char *cat = NULL;
    size_t cat_cap = 0;
    int rank = 0;
    cJSON_ArrayForEach(e, merges)
    {
        const char *a = NULL, *b = NULL;
        size_t na = 0, nb = 0;
        if (cJSON_IsString(e)) { // "a b"
            const char *sp = strchr(e->valuestring, ' ');
            if (sp && !strchr(sp + 1, ' ')) {
                a = e->valuestring;
                na = (size_t)(sp - a);
                b = sp + 1;
                nb = strlen(b);
            }
        } else if (cJSON_IsArray(e) && cJSON_GetArraySize(e) == 2 && cJSON_IsString(e->child) &&
                   cJSON_IsString(e->child->next)) { // ["a", "b"]
            a = e->child->valuestring;
            b = e->child->next->valuestring;
            na = strlen(a);
            nb = strlen(b);
        }
        if (!a || !na || !nb) {
            rc = lk_errf(err, LK_ERR_FORMAT, "%s: merges[%d] is neither \"a b\" nor [\"a\", \"b\"]", name, rank);
            break;
        }
        if (2 * (na + nb + 1) > cat_cap) {
            cat_cap = pow2_at_least(2 * (na + nb + 1));
            char *c = lk_realloc(cat, cat_cap);
            if (!c) {
                rc = lk_errf(err, LK_ERR_NOMEM, "out of memory");
                break;
            }
            cat = c;
        }
        int32_t ids[3];
        const char *parts[3] = { a, b, cat };
        size_t lens[3] = { na, nb, na + nb };
        memcpy(cat, a, na);
        memcpy(cat + na, b, nb);
        char *raw = cat + cat_cap / 2; // second half of the scratch: raw bytes are never longer
        for (int j = 0; j < 3; j++) {
            long k = bytelevel_to_raw(parts[j], lens[j], raw);
            ids[j] = k >= 0 ? vmap_get(t, raw, (size_t)k) : vmap_get(t, parts[j], lens[j]);
        }
        for (int j = 0; j < 2; j++)
            if (ids[j] < 0) {
                rc = lk_errf(err, LK_ERR_FORMAT, "%s: merges[%d] names unknown token '%.*s'", name, rank,
                             (int)lens[j], parts[j]);
                break;
            }
        if (!rc && ids[2] < 0)
            rc = lk_errf(err, LK_ERR_FORMAT, "%s: merges[%d] ('%.*s' '%.*s') makes '%.*s', which is not in the vocab",
                         name, rank, (int)na, a, (int)nb, b, (int)(na + nb), cat);
        if (rc)
            break;
        merge_put(t, ids[0], ids[1], rank, ids[2]);
        rank++;
    }
    lk_free(cat);
    return rc;
}

/* A token named in tokenizer_config.json: a string or {"content": "..."}. */
static int32_t cfg_token(const struct tok *t, const cJSON *cfg, const char *key)
{
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(cfg, key);
    const char *s = cJSON_IsString(v) ? v->valuestring : json_str(v, "content");
    return s ? tok_find(t, s) : -1;
}

static int load_config(struct tok *t, const char *name, const char *cfg_json, struct lk_err *err)
{
    t->bos = t->eos = t->pad = -1;
    if (!cfg_json)
        return LK_OK;
    cJSON *cfg = cJSON_Parse(cfg_json);
    if (!cfg || !cJSON_IsObject(cfg)) {
        cJSON_Delete(cfg);
        return lk_errf(err, LK_ERR_FORMAT, "%s: tokenizer_config.json is not a JSON object", name);
    }
    t->bos = cfg_token(t, cfg, "bos_token");
    t->eos = cfg_token(t, cfg, "eos_token");
    t->pad = cfg_token(t, cfg, "pad_token");
    t->add_bos = json_bool(cfg, "add_bos_token", 0) && t->bos >= 0;
    const cJSON *ct = cJSON_GetObjectItemCaseSensitive(cfg, "chat_template");
    const char *tmpl = cJSON_IsString(ct) ? ct->valuestring : NULL;
    if (cJSON_IsArray(ct)) { // [{"name": "default", "template": "..."}, ...]
        const cJSON *e;
        cJSON_ArrayForEach(e, ct)
        {
            const char *nm = json_str(e, "name");
            if (!tmpl || (nm && !strcmp(nm, "default")))
                tmpl = json_str(e, "template");
        }
    }
    int rc = LK_OK;
    if (tmpl) {
        t->chat_template = lk_strdup(tmpl);
        if (!t->chat_template)
            rc = lk_errf(err, LK_ERR_NOMEM, "out of memory");
    }
    cJSON_Delete(cfg);
    return rc;
}

/* Line and column of byte offset off in s, for JSON error messages. */
static void line_col(const char *s, size_t off, int *line, int *col)
{
    *line = 1;
    *col = 1;
    for (size_t i = 0; i < off; i++) {
        if (s[i] == '\n') {
            (*line)++;
            *col = 1;
        } else {
            (*col)++;
        }
    }
}

int tok_load_json(struct tok **out, const char *json, size_t len, const char *cfg_json, const char *name,
                  struct lk_err *err)
{
    *out = NULL;
    const char *end = NULL;
    cJSON *root = cJSON_ParseWithLengthOpts(json, len, &end, 0);
    if (!root) {
        size_t off = end && end >= json && end <= json + len ? (size_t)(end - json) : len;
        int line, col;
        line_col(json, off, &line, &col);
        return lk_errf(err, LK_ERR_FORMAT, "%s:%d:%d: not valid JSON (truncated or malformed file?)", name,
                       line, col);
    }
    struct tok *t = lk_calloc(1, sizeof *t);
    if (!t) {
        cJSON_Delete(root);
        return lk_errf(err, LK_ERR_NOMEM, "out of memory");
    }
    int rc = LK_OK;
    const cJSON *model = cJSON_GetObjectItemCaseSensitive(root, "model");
    const cJSON *pt = cJSON_GetObjectItemCaseSensitive(root, "pre_tokenizer");
    const cJSON *dec = cJSON_GetObjectItemCaseSensitive(root, "decoder");
    if (!cJSON_IsObject(root) || !cJSON_IsObject(model))
        rc = lk_errf(err, LK_ERR_FORMAT, "%s: no 'model' object: not a tokenizer.json", name);
    if (!rc) {
        // ids are dense in practice: allow gaps, but not a table sized by one stray id
        double listed = (double)cJSON_GetArraySize(cJSON_GetObjectItemCaseSensitive(model, "vocab")) +
                        cJSON_GetArraySize(cJSON_GetObjectItemCaseSensitive(root, "added_tokens"));
        t->id_limit = 2 * listed + 65536 > 1e8 ? 100000000 : (int32_t)(2 * listed + 65536);
        rc = load_added(t, name, cJSON_GetObjectItemCaseSensitive(root, "added_tokens"), err);
    }
    if (!rc)
        rc = load_model(t, name, model, err);
    if (!rc)
        rc = load_normalizer(t, name, cJSON_GetObjectItemCaseSensitive(root, "normalizer"), err);
    if (!rc && !cJSON_IsObject(pt))
        rc = lk_errf(err, LK_ERR_UNSUPPORTED, "%s: no pre_tokenizer: only byte-level BPE is supported", name);
    if (!rc)
        rc = load_pretok(t, name, pt, err);
    if (!rc) {
        int bytelevel = 0;
        for (int i = 0; i < t->n_steps; i++)
            bytelevel |= t->steps[i].kind == STEP_BYTELEVEL;
        if (!bytelevel)
            rc = lk_errf(err, LK_ERR_UNSUPPORTED, "%s: pre_tokenizer has no ByteLevel step: only byte-level "
                                                  "BPE is supported", name);
    }
    if (!rc) {
        const char *dt = json_str(dec, "type");
        if (!dt || strcmp(dt, "ByteLevel"))
            rc = lk_errf(err, LK_ERR_UNSUPPORTED, "%s: decoder '%s' is not supported (only ByteLevel)", name,
                         dt ? dt : "(none)");
    }
    if (!rc)
        for (int b = 0; b < 256 && !rc; b++)
            if (t->byte_id[b] < 0)
                rc = lk_errf(err, LK_ERR_FORMAT, "%s: the vocab has no token for byte 0x%02x: not byte-level BPE",
                             name, b);
    cJSON_Delete(root);
    if (!rc)
        rc = load_config(t, name, cfg_json, err);
    if (rc) {
        tok_free(t);
        return rc;
    }
    *out = t;
    return LK_OK;
}

/* The tokenizer of a GGUF model file (its tokenizer.* metadata). */
static int tok_load_gguf(struct tok **out, const char *path, struct lk_err *err)
{
    struct gguf_file f;
    if (gguf_open(&f, path, err))
        return err->code;
    int rc = gguf_tok_load(out, &f, err);
    gguf_close(&f);
    return rc;
}

int tok_load(struct tok **out, const char *path, struct lk_err *err)
{
    *out = NULL;
    if (gguf_is_file(path))
        return tok_load_gguf(out, path, err);
    char *json_path, *cfg_path;
    if (lk_is_dir(path)) {
        json_path = lk_path_join(path, "tokenizer.json");
        cfg_path = lk_path_join(path, "tokenizer_config.json");
    } else {
        json_path = lk_strdup(path);
        const char *slash = strrchr(path, '/');
        char *dir = slash ? lk_strdup(path) : lk_strdup(".");
        if (dir && slash)
            dir[slash - path] = 0;
        cfg_path = dir ? lk_path_join(dir, "tokenizer_config.json") : NULL;
        lk_free(dir);
    }
    char *json = NULL, *cfg = NULL;
    size_t len = 0;
    int rc = LK_OK;
    if (!json_path || !cfg_path)
        rc = lk_errf(err, LK_ERR_NOMEM, "out of memory");
    if (!rc)
        rc = lk_read_file(json_path, &json, &len, err);
    if (!rc && lk_file_exists(cfg_path))
        rc = lk_read_file(cfg_path, &cfg, NULL, err);
    if (!rc)
        rc = tok_load_json(out, json, len, cfg, json_path, err);
    lk_free(json);
    lk_free(cfg);
    lk_free(json_path);
    lk_free(cfg_path);
    return rc;
}

void tok_free(struct tok *t)
{
    if (!t)
        return;
    for (int i = 0; i < t->n_steps; i++) {
        pcre2_match_data_free(t->steps[i].md);
        pcre2_code_free(t->steps[i].re);
    }
    for (int i = 0; i < t->n_added; i++)
        lk_free(t->added[i].s);
    lk_free(t->added);
    lk_free(t->pieces);
    lk_free(t->bytes);
    lk_free(t->vmap);
    lk_free(t->mkey);
    lk_free(t->mrank);
    lk_free(t->mres);
    lk_free(t->chat_template);
    lk_free(t->cache);
    lk_free(t->cache_mem);
    lk_free(t->cache_ids);
    lk_free(t->syms);
    lk_free(t->heap);
    lk_free(t->prefix_buf);
    lk_free(t);
}

// ---- BPE ----

struct bpe_sym {
    int32_t id;
    int32_t prev, next; /* -1 at the ends */
    int32_t alive;
};

struct bpe_cand {
    int32_t rank, pos, right, res;
};

static int cand_less(const struct bpe_cand *a, const struct bpe_cand *b)
{
    return a->rank != b->rank ? a->rank < b->rank : a->pos < b->pos;
}

static void heap_push(struct bpe_cand *h, size_t *n, struct bpe_cand c)
{
    size_t i = (*n)++;
    while (i > 0) {
        size_t p = (i - 1) / 2;
        if (!cand_less(&c, &h[p]))
            break;
        h[i] = h[p];
        i = p;
    }
    h[i] = c;
}

static struct bpe_cand heap_pop(struct bpe_cand *h, size_t *n)
{
    struct bpe_cand top = h[0], last = h[--(*n)];
    size_t i = 0;
    for (;;) {
        size_t l = 2 * i + 1, r = l + 1, m = i;
        const struct bpe_cand *best = &last;
        if (l < *n && cand_less(&h[l], best)) {
            m = l;
            best = &h[l];
        }
        if (r < *n && cand_less(&h[r], best))
            m = r;
        if (m == i)
            break;
        h[i] = h[m];
        i = m;
    }
    if (*n)
        h[i] = last;
    return top;
}

static void push_pair(struct tok *t, size_t *nh, int32_t pos)
{
    int32_t right = t->syms[pos].next;
    if (right < 0)
        return;
    int32_t rank, res;
    if (merge_get(t, t->syms[pos].id, t->syms[right].id, &rank, &res))
        heap_push(t->heap, nh, (struct bpe_cand){ rank, pos, right, res });
}

/* BPE of one piece (raw bytes), appending ids. */
static int bpe_word(struct tok *t, const unsigned char *s, size_t n, struct tok_ids *out, struct lk_err *err)
{
    if (t->ignore_merges) {
        int32_t id = vmap_get(t, s, n);
        if (id >= 0)
            return tok_ids_push(out, id, err);
    }
    if (n == 1)
        return tok_ids_push(out, t->byte_id[s[0]], err);
    if (n > t->syms_cap) {
        size_t cap = pow2_at_least(n);
        struct bpe_sym *sy = lk_realloc(t->syms, cap * sizeof *sy);
        if (!sy)
            return lk_errf(err, LK_ERR_NOMEM, "out of memory");
        t->syms = sy;
        struct bpe_cand *h = lk_realloc(t->heap, 3 * cap * sizeof *h);
        if (!h)
            return lk_errf(err, LK_ERR_NOMEM, "out of memory");
        t->heap = h;
        t->syms_cap = cap;
        t->heap_cap = 3 * cap;
    }
    for (size_t i = 0; i < n; i++)
        t->syms[i] = (struct bpe_sym){ t->byte_id[s[i]], (int32_t)i - 1, i + 1 < n ? (int32_t)i + 1 : -1, 1 };
    size_t nh = 0;
    for (size_t i = 0; i + 1 < n; i++)
        push_pair(t, &nh, (int32_t)i);
    // n - 1 pairs to start; each merge removes a symbol and pushes at most two more, so
    // at most 3 (n - 1) pushes in all: the heap (3n entries) cannot overflow. Stale
    // entries (a side already merged away or changed) are skipped when popped.
    while (nh) {
        struct bpe_cand c = heap_pop(t->heap, &nh);
        struct bpe_sym *a = &t->syms[c.pos];
        if (!a->alive || a->next != c.right)
            continue;
        struct bpe_sym *b = &t->syms[c.right];
        int32_t rank, res;
        if (!merge_get(t, a->id, b->id, &rank, &res) || rank != c.rank)
            continue;
        a->id = res;
        a->next = b->next;
        b->alive = 0;
        if (b->next >= 0)
            t->syms[b->next].prev = c.pos;
        LK_ASSERT(nh + 2 <= t->heap_cap);
        if (a->prev >= 0)
            push_pair(t, &nh, a->prev);
        push_pair(t, &nh, c.pos);
    }
    for (int32_t i = 0; i >= 0; i = t->syms[i].next) {
        int rc = tok_ids_push(out, t->syms[i].id, err);
        if (rc)
            return rc;
    }
    return LK_OK;
}

// ---- word cache ----

static int cache_get(struct tok *t, const void *s, size_t n, uint64_t h, struct tok_ids *out,
                     struct lk_err *err, int *hit)
{
    *hit = 0;
    if (!t->cache_cap)
        return LK_OK;
    size_t m = t->cache_cap - 1;
    for (size_t i = h & m; t->cache[i].used; i = (i + 1) & m) {
        const struct cache_ent *e = &t->cache[i];
        if (e->h == h && e->key_len == n && !memcmp(t->cache_mem + e->key_off, s, n)) {
            for (uint32_t k = 0; k < e->n_ids; k++) {
                int rc = tok_ids_push(out, t->cache_ids[e->ids_off + k], err);
                if (rc)
                    return rc;
            }
            *hit = 1;
            return LK_OK;
        }
    }
    return LK_OK;
}

/* Best effort: a failed allocation just skips caching. */
static void cache_put(struct tok *t, const void *s, size_t n, uint64_t h, const int32_t *ids, size_t nid)
{
    if (!t->cache_cap) {
        t->cache_cap = 1 << 16;
        t->cache = lk_calloc(t->cache_cap, sizeof *t->cache);
        t->cache_mem_cap = (size_t)1 << 20;
        t->cache_mem = lk_malloc(t->cache_mem_cap);
        t->cache_ids_cap = (size_t)1 << 18;
        t->cache_ids = lk_malloc(t->cache_ids_cap * sizeof *t->cache_ids);
        if (!t->cache || !t->cache_mem || !t->cache_ids) {
            lk_free(t->cache);
            lk_free(t->cache_mem);
            lk_free(t->cache_ids);
            t->cache = NULL;
            t->cache_mem = NULL;
            t->cache_ids = NULL;
            t->cache_cap = 0;
            return;
        }
    }
    if (t->cache_n + 1 > t->cache_cap / 2 || t->cache_mem_len + n > t->cache_mem_cap ||
        t->cache_ids_len + nid > t->cache_ids_cap) { // full: start over
        memset(t->cache, 0, t->cache_cap * sizeof *t->cache);
        t->cache_n = t->cache_mem_len = t->cache_ids_len = 0;
    }
    size_t m = t->cache_cap - 1, i = h & m;
    while (t->cache[i].used)
        i = (i + 1) & m;
    struct cache_ent *e = &t->cache[i];
    e->h = h;
    e->used = 1;
    e->key_off = (uint32_t)t->cache_mem_len;
    e->key_len = (uint32_t)n;
    memcpy(t->cache_mem + t->cache_mem_len, s, n);
    t->cache_mem_len += n;
    e->ids_off = (uint32_t)t->cache_ids_len;
    e->n_ids = (uint32_t)nid;
    memcpy(t->cache_ids + t->cache_ids_len, ids, nid * sizeof *ids);
    t->cache_ids_len += nid;
    t->cache_n++;
}

static int bpe_cached(struct tok *t, const unsigned char *s, size_t n, struct tok_ids *out, struct lk_err *err)
{
    if (!n)
        return LK_OK;
    if (n > CACHE_MAX_WORD)
        return bpe_word(t, s, n, out, err);
    uint64_t h = hash_bytes(s, n);
    int hit;
    int rc = cache_get(t, s, n, h, out, err, &hit);
    if (rc || hit)
        return rc;
    size_t start = out->n;
    rc = bpe_word(t, s, n, out, err);
    if (!rc)
        cache_put(t, s, n, h, out->v + start, out->n - start);
    return rc;
}

// ---- pre-tokenization ----

static int pretok(struct tok *t, int step, const char *s, size_t n, struct tok_ids *out, struct lk_err *err);

static int split_regex(struct tok *t, int step, struct tok_step *st, const char *s, size_t n,
                       struct tok_ids *out, struct lk_err *err)
{
    size_t pos = 0, prev = 0;
    while (pos < n) {
        int r = pcre2_match(st->re, (PCRE2_SPTR)s, n, pos, PCRE2_NO_UTF_CHECK, st->md, NULL);
        if (r == PCRE2_ERROR_NOMATCH)
            break;
        if (r < 0)
            return lk_errf(err, LK_ERR_FORMAT, "pre-tokenizer regex failed (PCRE2 error %d)", r);
        PCRE2_SIZE *ov = pcre2_get_ovector_pointer(st->md);
        size_t ms = ov[0], me = ov[1];
        if (me == ms) { // empty match: step one character
            pos = ms + 1;
            while (pos < n && ((unsigned char)s[pos] & 0xC0) == 0x80)
                pos++;
            continue;
        }
        int rc;
        if (ms > prev) { // the gap before the match is a piece in both behaviors
            rc = pretok(t, step + 1, s + prev, ms - prev, out, err);
            if (rc)
                return rc;
        }
        if (st->behavior == SPLIT_ISOLATED) {
            rc = pretok(t, step + 1, s + ms, me - ms, out, err);
            if (rc)
                return rc;
        }
        prev = pos = me;
    }
    if (prev < n)
        return pretok(t, step + 1, s + prev, n - prev, out, err);
    return LK_OK;
}

/* Runs pre-tokenizer steps [step..] on s and BPE on the resulting pieces. */
static int pretok(struct tok *t, int step, const char *s, size_t n, struct tok_ids *out, struct lk_err *err)
{
    if (!n)
        return LK_OK;
    if (step == t->n_steps)
        return bpe_cached(t, (const unsigned char *)s, n, out, err);
    struct tok_step *st = &t->steps[step];
    if (st->kind == STEP_BYTELEVEL && st->add_prefix_space && s[0] != ' ') {
        char *p = lk_malloc(n + 1);
        if (!p)
            return lk_errf(err, LK_ERR_NOMEM, "out of memory");
        p[0] = ' ';
        memcpy(p + 1, s, n);
        int rc = st->re ? split_regex(t, step, st, p, n + 1, out, err) : pretok(t, step + 1, p, n + 1, out, err);
        lk_free(p);
        return rc;
    }
    if (st->re)
        return split_regex(t, step, st, s, n, out, err);
    return pretok(t, step + 1, s, n, out, err);
}

int tok_nfc(const char *text, size_t len, char **out, size_t *out_len, struct lk_err *err)
{
    *out = NULL;
    size_t bad = tok_utf8_check(text, len);
    if (bad)
        return lk_errf(err, LK_ERR_FORMAT, "invalid UTF-8 at byte %zu", bad - 1);
    utf8proc_uint8_t *dst = NULL;
    utf8proc_ssize_t n = 0;
    int need = 0;
    for (size_t i = 0; i < len; i++)
        need |= (unsigned char)text[i] >= 0xCC; // below U+0300 everything is already NFC
    if (need)
        n = utf8proc_map((const utf8proc_uint8_t *)text, (utf8proc_ssize_t)len, &dst,
                         UTF8PROC_STABLE | UTF8PROC_COMPOSE);
    if (need && n < 0)
        return lk_errf(err, LK_ERR_FORMAT, "NFC failed: %s", utf8proc_errmsg(n));
    size_t m = need ? (size_t)n : len;
    char *r = lk_malloc(m + 1);
    if (!r) {
        free(dst);
        return lk_errf(err, LK_ERR_NOMEM, "out of memory");
    }
    memcpy(r, need ? (const char *)dst : text, m);
    r[m] = 0;
    free(dst);
    *out = r;
    if (out_len)
        *out_len = m;
    return LK_OK;
}

/* Normalizes one segment of text (no added tokens in it) and tokenizes it. */
static int encode_segment(struct tok *t, const char *s, size_t n, struct tok_ids *out, struct lk_err *err)
{
    if (!n)
        return LK_OK;
    int need = 0;
    if (t->nfc)
        for (size_t i = 0; i < n && !need; i++)
            need = (unsigned char)s[i] >= 0xCC;
    if (!need)
        return pretok(t, 0, s, n, out, err);
    utf8proc_uint8_t *dst = NULL;
    utf8proc_ssize_t m = utf8proc_map((const utf8proc_uint8_t *)s, (utf8proc_ssize_t)n, &dst,
                                      UTF8PROC_STABLE | UTF8PROC_COMPOSE);
    if (m < 0)
        return lk_errf(err, LK_ERR_FORMAT, "NFC failed: %s", utf8proc_errmsg(m));
    int rc = pretok(t, 0, (const char *)dst, (size_t)m, out, err);
    free(dst);
    return rc;
}

static int is_space(unsigned char c)
{
    return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\v' || c == '\f';
}

int tok_encode(struct tok *t, const char *text, size_t len, int parse_special, struct tok_ids *out,
               struct lk_err *err)
{
    size_t bad = tok_utf8_check(text, len);
    if (bad)
        return lk_errf(err, LK_ERR_FORMAT, "invalid UTF-8 at byte %zu (0x%02x)", bad - 1,
                       (unsigned char)text[bad - 1]);
    size_t seg = 0, i = 0;
    while (i < len) {
        const struct tok_added *hit = NULL;
        if (parse_special && t->added_first[(unsigned char)text[i]]) {
            for (int k = 0; k < t->n_added; k++) { // longest first
                const struct tok_added *a = &t->added[k];
                if (a->len <= len - i && !memcmp(text + i, a->s, a->len)) {
                    hit = a;
                    break;
                }
            }
        }
        if (!hit) {
            i++;
            continue;
        }
        size_t seg_end = i;
        if (hit->lstrip)
            while (seg_end > seg && is_space((unsigned char)text[seg_end - 1]))
                seg_end--;
        int rc = encode_segment(t, text + seg, seg_end - seg, out, err);
        if (!rc)
            rc = tok_ids_push(out, hit->id, err);
        if (rc)
            return rc;
        i += hit->len;
        if (hit->rstrip)
            while (i < len && is_space((unsigned char)text[i]))
                i++;
        seg = i;
    }
    return encode_segment(t, text + seg, len - seg, out, err);
}

// ---- decoding and lookups ----

int tok_decode(const struct tok *t, const int32_t *ids, size_t n, int skip_special, char **out, size_t *out_len,
               struct lk_err *err)
{
    *out = NULL;
    size_t total = 0;
    for (size_t i = 0; i < n; i++) {
        if (ids[i] < 0 || ids[i] >= t->n_ids || !t->pieces[ids[i]].present)
            return lk_errf(err, LK_ERR_FORMAT, "token id %d at position %zu is not in the vocabulary",
                           (int)ids[i], i);
        total += t->pieces[ids[i]].len;
    }
    char *s = lk_malloc(total + 1);
    if (!s)
        return lk_errf(err, LK_ERR_NOMEM, "out of memory");
    size_t k = 0;
    for (size_t i = 0; i < n; i++) {
        const struct tok_piece *p = &t->pieces[ids[i]];
        if (skip_special && p->special)
            continue;
        memcpy(s + k, t->bytes + p->off, p->len);
        k += p->len;
    }
    s[k] = 0;
    *out = s;
    if (out_len)
        *out_len = k;
    return LK_OK;
}

int32_t tok_find(const struct tok *t, const char *s)
{
    size_t n = strlen(s);
    for (int k = 0; k < t->n_added; k++)
        if (t->added[k].len == n && !memcmp(t->added[k].s, s, n))
            return t->added[k].id;
    return vmap_get(t, s, n);
}

const char *tok_piece(const struct tok *t, int32_t id, size_t *len)
{
    if (id < 0 || id >= t->n_ids || !t->pieces[id].present)
        return NULL;
    *len = t->pieces[id].len;
    return t->bytes + t->pieces[id].off;
}

int32_t tok_vocab_size(const struct tok *t)
{
    int32_t n = t->n_ids;
    while (n > 0 && !t->pieces[n - 1].present)
        n--;
    return n;
}

int tok_is_special(const struct tok *t, int32_t id)
{
    return id >= 0 && id < t->n_ids && t->pieces[id].special;
}

int32_t tok_bos(const struct tok *t) { return t->bos; }
int32_t tok_eos(const struct tok *t) { return t->eos; }
int32_t tok_pad(const struct tok *t) { return t->pad; }
int tok_add_bos(const struct tok *t) { return t->add_bos; }
const char *tok_chat_template(const struct tok *t) { return t->chat_template; }
