/*
 * tok_train.c - learn a byte-level BPE from text and write it as tokenizer.json (see tok.h).
 *
 * Text is NFC-normalized and split by Qwen2's regex (special-token strings cut out first);
 * distinct pieces are counted. Each piece starts as its bytes; ids 0..255 are the bytes in
 * GPT-2's byte-to-unicode order (as in Qwen's vocab). Then, merge by merge, the most
 * frequent adjacent pair (ties: smaller ids first) becomes a new token. Pair counts are
 * kept incrementally: each pair knows the words it occurs in, so a merge touches only
 * those words and adjusts the counts of their pairs; a max-heap with lazy re-insertion
 * finds the best pair (the scheme of Hugging Face's BpeTrainer).
 * Owns: everything it allocates, freed before returning.
 */
#include "tok.h"

#define PCRE2_CODE_UNIT_WIDTH 8
#include <cjson/cJSON.h>
#include <pcre2.h>
#include <stdlib.h>
#include <string.h>

static const char *QWEN2_REGEX = "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| "
                                 "?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+";

static const char *CHATML_TEMPLATE =
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + "
    "'<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";

static const char *BASE_SPECIALS[] = { "<|endoftext|>", "<|im_start|>", "<|im_end|>" };

struct ivec {
    int32_t *v;
    uint32_t n, cap;
};

static int ivec_push(struct ivec *a, int32_t x)
{
    if (a->n == a->cap) {
        uint32_t cap = a->cap ? a->cap * 2 : 4;
        int32_t *v = lk_realloc(a->v, cap * sizeof *v);
        if (!v)
            return -1;
        a->v = v;
        a->cap = cap;
    }
    a->v[a->n++] = x;
    return 0;
}

struct heap_ent {
    int64_t count;
    int32_t pair;
};

struct trainer {
    // words: distinct pieces
    size_t n_words, cap_words;
    int64_t *wcount;
    uint32_t *woff, *wlen; /* into syms */
    int32_t *syms;
    size_t n_syms, cap_syms;
    uint32_t *wstamp;
    // word map (bytes -> word) during counting
    uint64_t *wm_hash;
    int32_t *wm_word;
    size_t wm_cap;
    char *wbytes; /* bytes of each word, for the map */
    size_t n_wbytes, cap_wbytes;
    uint32_t *wboff;
    // tokens
    int32_t n_tok;
    char **tok_bytes; /* owned [n_tok] */
    uint32_t *tok_len;
    int32_t *merge_a, *merge_b;
    int n_merges;
    // pairs
    uint64_t *pm_key; /* UINT64_MAX empty */
    int32_t *pm_idx;
    size_t pm_cap;
    int32_t n_pairs, cap_pairs;
    int32_t *pa, *pb;
    int64_t *pcount;
    struct ivec *pwhere;
    uint32_t *pstamp;
    struct heap_ent *heap;
    size_t n_heap, cap_heap;
};

static uint64_t hash64(const void *p, size_t n)
{
    const unsigned char *s = p;
    uint64_t h = 1469598103934665603ull;
    for (size_t i = 0; i < n; i++) {
        h ^= s[i];
        h *= 1099511628211ull;
    }
    return h ^ (h >> 31);
}

static uint64_t mix64(uint64_t x)
{
    x ^= x >> 33;
    x *= 0xff51afd7ed558ccdull;
    x ^= x >> 33;
    return x;
}

static int grow(void **p, size_t *cap, size_t need, size_t elem)
{
    if (need <= *cap)
        return 0;
    size_t c = *cap ? *cap : 1024;
    while (c < need)
        c *= 2;
    void *q = lk_realloc(*p, c * elem);
    if (!q)
        return -1;
    *p = q;
    *cap = c;
    return 0;
}

// ---- counting words ----

static int wm_rehash(struct trainer *tr)
{
    size_t cap = tr->wm_cap ? tr->wm_cap * 2 : 1 << 16;
    uint64_t *h = lk_malloc(cap * sizeof *h);
    int32_t *w = lk_malloc(cap * sizeof *w);
    if (!h || !w) {
        lk_free(h);
        lk_free(w);
        return -1;
    }
    memset(w, 0xff, cap * sizeof *w);
    for (size_t i = 0; i < tr->wm_cap; i++) {
        if (tr->wm_word[i] < 0)
            continue;
        size_t j = tr->wm_hash[i] & (cap - 1);
        while (w[j] >= 0)
            j = (j + 1) & (cap - 1);
        h[j] = tr->wm_hash[i];
        w[j] = tr->wm_word[i];
    }
    lk_free(tr->wm_hash);
    lk_free(tr->wm_word);
    tr->wm_hash = h;
    tr->wm_word = w;
    tr->wm_cap = cap;
    return 0;
}

static int add_word(struct trainer *tr, const char *s, size_t n)
{
    if ((tr->n_words + 1) * 2 > tr->wm_cap && wm_rehash(tr))
        return -1;
    uint64_t h = hash64(s, n);
    size_t m = tr->wm_cap - 1, i = h & m;
    for (; tr->wm_word[i] >= 0; i = (i + 1) & m) {
        int32_t w = tr->wm_word[i];
        if (tr->wm_hash[i] == h && tr->wlen[w] == n && !memcmp(tr->wbytes + tr->wboff[w], s, n)) {
            tr->wcount[w]++;
            return 0;
        }
    }
    size_t w = tr->n_words;
    if (w >= INT32_MAX || tr->n_wbytes + n > UINT32_MAX)
        return -1;
    size_t cw = tr->cap_words;
    if (grow((void **)&tr->wcount, &cw, w + 1, sizeof *tr->wcount))
        return -1;
    cw = tr->cap_words;
    if (grow((void **)&tr->woff, &cw, w + 1, sizeof *tr->woff))
        return -1;
    cw = tr->cap_words;
    if (grow((void **)&tr->wlen, &cw, w + 1, sizeof *tr->wlen))
        return -1;
    cw = tr->cap_words;
    if (grow((void **)&tr->wboff, &cw, w + 1, sizeof *tr->wboff))
        return -1;
    tr->cap_words = cw;
    if (grow((void **)&tr->wbytes, &tr->cap_wbytes, tr->n_wbytes + n, 1))
        return -1;
    memcpy(tr->wbytes + tr->n_wbytes, s, n);
    tr->wboff[w] = (uint32_t)tr->n_wbytes;
    tr->n_wbytes += n;
    tr->wlen[w] = (uint32_t)n;
    tr->wcount[w] = 1;
    tr->wm_hash[i] = h;
    tr->wm_word[i] = (int32_t)w;
    tr->n_words++;
    return 0;
}

static int count_text(struct trainer *tr, pcre2_code *re, pcre2_match_data *md, const char *s, size_t n,
                      struct lk_err *err)
{
    size_t pos = 0, prev = 0;
    while (pos < n) {
        int r = pcre2_match(re, (PCRE2_SPTR)s, n, pos, PCRE2_NO_UTF_CHECK, md, NULL);
        if (r == PCRE2_ERROR_NOMATCH)
            break;
        if (r < 0)
            return lk_errf(err, LK_ERR_FORMAT, "regex failed (PCRE2 error %d)", r);
        PCRE2_SIZE *ov = pcre2_get_ovector_pointer(md);
        if (ov[1] == ov[0]) {
            pos = ov[0] + 1;
            while (pos < n && ((unsigned char)s[pos] & 0xC0) == 0x80)
                pos++;
            continue;
        }
        if ((ov[0] > prev && add_word(tr, s + prev, ov[0] - prev)) || add_word(tr, s + ov[0], ov[1] - ov[0]))
            return lk_errf(err, LK_ERR_NOMEM, "out of memory counting words");
        prev = pos = ov[1];
    }
    if (prev < n && add_word(tr, s + prev, n - prev))
        return lk_errf(err, LK_ERR_NOMEM, "out of memory counting words");
    return LK_OK;
}

// ---- pairs ----

static int32_t pair_get(struct trainer *tr, int32_t a, int32_t b, int create)
{
    uint64_t k = ((uint64_t)(uint32_t)a << 32) | (uint32_t)b;
    if (create && ((size_t)tr->n_pairs + 1) * 2 > tr->pm_cap) {
        size_t cap = tr->pm_cap ? tr->pm_cap * 2 : 1 << 16;
        uint64_t *key = lk_malloc(cap * sizeof *key);
        int32_t *idx = lk_malloc(cap * sizeof *idx);
        if (!key || !idx) {
            lk_free(key);
            lk_free(idx);
            return -2;
        }
        memset(key, 0xff, cap * sizeof *key);
        for (size_t i = 0; i < tr->pm_cap; i++) {
            if (tr->pm_key[i] == UINT64_MAX)
                continue;
            size_t j = mix64(tr->pm_key[i]) & (cap - 1);
            while (key[j] != UINT64_MAX)
                j = (j + 1) & (cap - 1);
            key[j] = tr->pm_key[i];
            idx[j] = tr->pm_idx[i];
        }
        lk_free(tr->pm_key);
        lk_free(tr->pm_idx);
        tr->pm_key = key;
        tr->pm_idx = idx;
        tr->pm_cap = cap;
    }
    if (!tr->pm_cap)
        return -1;
    size_t m = tr->pm_cap - 1, i = mix64(k) & m;
    for (; tr->pm_key[i] != UINT64_MAX; i = (i + 1) & m)
        if (tr->pm_key[i] == k)
            return tr->pm_idx[i];
    if (!create)
        return -1;
    int32_t p = tr->n_pairs;
    if (p == tr->cap_pairs) {
        int32_t cap = tr->cap_pairs ? tr->cap_pairs * 2 : 1 << 14;
        int32_t *na = lk_realloc(tr->pa, (size_t)cap * sizeof *na);
        if (na)
            tr->pa = na;
        int32_t *nb = lk_realloc(tr->pb, (size_t)cap * sizeof *nb);
        if (nb)
            tr->pb = nb;
        int64_t *nc = lk_realloc(tr->pcount, (size_t)cap * sizeof *nc);
        if (nc)
            tr->pcount = nc;
        struct ivec *nw = lk_realloc(tr->pwhere, (size_t)cap * sizeof *nw);
        if (nw)
            tr->pwhere = nw;
        uint32_t *ns = lk_realloc(tr->pstamp, (size_t)cap * sizeof *ns);
        if (ns)
            tr->pstamp = ns;
        if (!na || !nb || !nc || !nw || !ns)
            return -2;
        tr->cap_pairs = cap;
    }
    tr->pm_key[i] = k;
    tr->pm_idx[i] = p;
    tr->pa[p] = a;
    tr->pb[p] = b;
    tr->pcount[p] = 0;
    tr->pwhere[p] = (struct ivec){ 0 };
    tr->pstamp[p] = 0;
    tr->n_pairs++;
    return p;
}

/* heap order: larger count first; ties: smaller (a, b) first */
static int heap_before(const struct trainer *tr, const struct heap_ent *x, const struct heap_ent *y)
{
    if (x->count != y->count)
        return x->count > y->count;
    if (tr->pa[x->pair] != tr->pa[y->pair])
        return tr->pa[x->pair] < tr->pa[y->pair];
    return tr->pb[x->pair] < tr->pb[y->pair];
}

static int heap_push(struct trainer *tr, int64_t count, int32_t pair)
{
    if (grow((void **)&tr->heap, &tr->cap_heap, tr->n_heap + 1, sizeof *tr->heap))
        return -1;
    struct heap_ent e = { count, pair };
    size_t i = tr->n_heap++;
    while (i > 0) {
        size_t p = (i - 1) / 2;
        if (!heap_before(tr, &e, &tr->heap[p]))
            break;
        tr->heap[i] = tr->heap[p];
        i = p;
    }
    tr->heap[i] = e;
    return 0;
}

static struct heap_ent heap_pop(struct trainer *tr)
{
    struct heap_ent top = tr->heap[0], last = tr->heap[--tr->n_heap];
    size_t i = 0, n = tr->n_heap;
    for (;;) {
        size_t l = 2 * i + 1, r = l + 1, m = i;
        const struct heap_ent *best = &last;
        if (l < n && heap_before(tr, &tr->heap[l], best)) {
            m = l;
            best = &tr->heap[l];
        }
        if (r < n && heap_before(tr, &tr->heap[r], best))
            m = r;
        if (m == i)
            break;
        tr->heap[i] = tr->heap[m];
        i = m;
    }
    if (n)
        tr->heap[i] = last;
    return top;
}

/* Adds delta to the count of (a, b) occurring in word w; new occurrences record w. */
static int pair_add(struct trainer *tr, int32_t a, int32_t b, int64_t delta, int32_t w)
{
    int32_t p = pair_get(tr, a, b, delta > 0);
    if (p == -2)
        return -1;
    if (p < 0)
        return 0;
    tr->pcount[p] += delta;
    if (delta > 0) {
        struct ivec *v = &tr->pwhere[p];
        if ((!v->n || v->v[v->n - 1] != w) && ivec_push(v, w))
            return -1;
    }
    return 0;
}

// ---- output ----

static void byte_order(int32_t id_of_byte[256], uint32_t b2u[256])
{
    int n = 0;
    for (int b = 0; b < 256; b++) {
        int keep = (b >= 33 && b <= 126) || (b >= 161 && b <= 172) || (b >= 174 && b <= 255);
        b2u[b] = keep ? (uint32_t)b : (uint32_t)(256 + n++);
    }
    // ids in the order of the mapped characters (GPT-2's bs list: printable first)
    int id = 0;
    for (uint32_t cp = 0; cp < 512; cp++)
        for (int b = 0; b < 256; b++)
            if (b2u[b] == cp)
                id_of_byte[b] = id++;
}

/* The byte-level text of raw bytes: a new heap string. */
static char *to_bytelevel(const uint32_t b2u[256], const char *s, size_t n)
{
    char *o = lk_malloc(2 * n + 1), *p = o;
    if (!o)
        return NULL;
    for (size_t i = 0; i < n; i++) {
        uint32_t cp = b2u[(unsigned char)s[i]];
        if (cp < 0x80) {
            *p++ = (char)cp;
        } else {
            *p++ = (char)(0xC0 | (cp >> 6));
            *p++ = (char)(0x80 | (cp & 0x3F));
        }
    }
    *p = 0;
    return o;
}

static cJSON *bytelevel_obj(const char *type)
{
    cJSON *o = cJSON_CreateObject();
    cJSON_AddStringToObject(o, "type", type);
    cJSON_AddBoolToObject(o, "add_prefix_space", 0);
    cJSON_AddBoolToObject(o, "trim_offsets", 0);
    cJSON_AddBoolToObject(o, "use_regex", 0);
    return o;
}

static cJSON *added_token_obj(int32_t id, const char *content)
{
    cJSON *a = cJSON_CreateObject();
    cJSON_AddNumberToObject(a, "id", id);
    cJSON_AddStringToObject(a, "content", content);
    cJSON_AddBoolToObject(a, "single_word", 0);
    cJSON_AddBoolToObject(a, "lstrip", 0);
    cJSON_AddBoolToObject(a, "rstrip", 0);
    cJSON_AddBoolToObject(a, "normalized", 0);
    cJSON_AddBoolToObject(a, "special", 1);
    return a;
}

static int write_files(struct trainer *tr, const char *const *specials, int n_specials, const char *dir,
                       struct lk_err *err)
{
    uint32_t b2u[256];
    int32_t id_of_byte[256];
    byte_order(id_of_byte, b2u);
    cJSON *root = cJSON_CreateObject(), *cfg = cJSON_CreateObject();
    cJSON_AddStringToObject(root, "version", "1.0");
    cJSON_AddNullToObject(root, "truncation");
    cJSON_AddNullToObject(root, "padding");
    cJSON *added = cJSON_AddArrayToObject(root, "added_tokens");
    cJSON *decoder = cJSON_CreateObject();
    for (int i = 0; i < n_specials; i++) {
        cJSON_AddItemToArray(added, added_token_obj(tr->n_tok + i, specials[i]));
        char key[16];
        snprintf(key, sizeof key, "%d", tr->n_tok + i);
        cJSON *d = added_token_obj(tr->n_tok + i, specials[i]);
        cJSON_DeleteItemFromObject(d, "id");
        cJSON_AddItemToObject(decoder, key, d);
    }
    cJSON *norm = cJSON_AddObjectToObject(root, "normalizer");
    cJSON_AddStringToObject(norm, "type", "NFC");
    cJSON *pt = cJSON_AddObjectToObject(root, "pre_tokenizer");
    cJSON_AddStringToObject(pt, "type", "Sequence");
    cJSON *pts = cJSON_AddArrayToObject(pt, "pretokenizers");
    cJSON *split = cJSON_CreateObject();
    cJSON_AddStringToObject(split, "type", "Split");
    cJSON *pat = cJSON_AddObjectToObject(split, "pattern");
    cJSON_AddStringToObject(pat, "Regex", QWEN2_REGEX);
    cJSON_AddStringToObject(split, "behavior", "Isolated");
    cJSON_AddBoolToObject(split, "invert", 0);
    cJSON_AddItemToArray(pts, split);
    cJSON_AddItemToArray(pts, bytelevel_obj("ByteLevel"));
    cJSON_AddItemToObject(root, "post_processor", bytelevel_obj("ByteLevel"));
    cJSON_AddItemToObject(root, "decoder", bytelevel_obj("ByteLevel"));
    cJSON *model = cJSON_AddObjectToObject(root, "model");
    cJSON_AddStringToObject(model, "type", "BPE");
    cJSON_AddNullToObject(model, "dropout");
    cJSON_AddNullToObject(model, "unk_token");
    cJSON_AddNullToObject(model, "continuing_subword_prefix");
    cJSON_AddNullToObject(model, "end_of_word_suffix");
    cJSON_AddBoolToObject(model, "fuse_unk", 0);
    cJSON_AddBoolToObject(model, "byte_fallback", 0);
    cJSON_AddBoolToObject(model, "ignore_merges", 0);
    cJSON *vocab = cJSON_AddObjectToObject(model, "vocab");
    cJSON *merges = cJSON_AddArrayToObject(model, "merges");
    char **bl = lk_calloc((size_t)tr->n_tok, sizeof *bl);
    int rc = bl ? LK_OK : lk_errf(err, LK_ERR_NOMEM, "out of memory");
    for (int32_t i = 0; i < tr->n_tok && !rc; i++) {
        bl[i] = to_bytelevel(b2u, tr->tok_bytes[i], tr->tok_len[i]);
        if (!bl[i])
            rc = lk_errf(err, LK_ERR_NOMEM, "out of memory");
        else
            cJSON_AddNumberToObject(vocab, bl[i], i);
    }
    for (int i = 0; i < tr->n_merges && !rc; i++) {
        const char *pair[2] = { bl[tr->merge_a[i]], bl[tr->merge_b[i]] };
        cJSON_AddItemToArray(merges, cJSON_CreateStringArray(pair, 2));
    }
    if (bl)
        for (int32_t i = 0; i < tr->n_tok; i++)
            lk_free(bl[i]);
    lk_free(bl);

    cJSON_AddBoolToObject(cfg, "add_bos_token", 0);
    cJSON_AddBoolToObject(cfg, "add_prefix_space", 0);
    cJSON_AddItemToObject(cfg, "added_tokens_decoder", decoder);
    cJSON_AddNullToObject(cfg, "bos_token");
    cJSON_AddStringToObject(cfg, "chat_template", CHATML_TEMPLATE);
    cJSON_AddBoolToObject(cfg, "clean_up_tokenization_spaces", 0);
    cJSON_AddStringToObject(cfg, "eos_token", "<|im_end|>");
    cJSON_AddStringToObject(cfg, "errors", "replace");
    cJSON_AddNumberToObject(cfg, "model_max_length", 32768);
    cJSON_AddStringToObject(cfg, "pad_token", "<|endoftext|>");
    cJSON_AddBoolToObject(cfg, "split_special_tokens", 0);
    cJSON_AddStringToObject(cfg, "tokenizer_class", "Qwen2Tokenizer");
    cJSON_AddNullToObject(cfg, "unk_token");

    char *js = rc ? NULL : cJSON_Print(root), *cs = rc ? NULL : cJSON_Print(cfg);
    char *p1 = lk_path_join(dir, "tokenizer.json"), *p2 = lk_path_join(dir, "tokenizer_config.json");
    if (!rc && (!js || !cs || !p1 || !p2))
        rc = lk_errf(err, LK_ERR_NOMEM, "out of memory writing the tokenizer");
    if (!rc)
        rc = lk_mkdir_p(dir, err);
    if (!rc)
        rc = lk_write_file_atomic(p1, js, strlen(js), err);
    if (!rc)
        rc = lk_write_file_atomic(p2, cs, strlen(cs), err);
    free(js);
    free(cs);
    lk_free(p1);
    lk_free(p2);
    cJSON_Delete(root);
    cJSON_Delete(cfg);
    return rc;
}

// ---- the trainer ----

static void trainer_release(struct trainer *tr)
{
    lk_free(tr->wcount);
    lk_free(tr->woff);
    lk_free(tr->wlen);
    lk_free(tr->syms);
    lk_free(tr->wstamp);
    lk_free(tr->wm_hash);
    lk_free(tr->wm_word);
    lk_free(tr->wbytes);
    lk_free(tr->wboff);
    for (int32_t i = 0; i < tr->n_tok && tr->tok_bytes; i++)
        lk_free(tr->tok_bytes[i]);
    lk_free(tr->tok_bytes);
    lk_free(tr->tok_len);
    lk_free(tr->merge_a);
    lk_free(tr->merge_b);
    lk_free(tr->pm_key);
    lk_free(tr->pm_idx);
    for (int32_t i = 0; i < tr->n_pairs; i++)
        lk_free(tr->pwhere[i].v);
    lk_free(tr->pa);
    lk_free(tr->pb);
    lk_free(tr->pcount);
    lk_free(tr->pwhere);
    lk_free(tr->pstamp);
    lk_free(tr->heap);
}

/* Reads, normalizes and counts one file, skipping special-token strings. */
static int count_file(struct trainer *tr, pcre2_code *re, pcre2_match_data *md, const char *path,
                      const char *const *specials, int n_specials, struct lk_err *err)
{
    char *raw, *text;
    size_t n;
    int rc = lk_read_file(path, &raw, &n, err);
    if (rc)
        return rc;
    rc = tok_nfc(raw, n, &text, &n, err);
    lk_free(raw);
    if (rc)
        return lk_err_prefix(err, "%s", path);
    unsigned char first[256] = { 0 };
    for (int k = 0; k < n_specials; k++)
        first[(unsigned char)specials[k][0]] = 1;
    size_t seg = 0;
    for (size_t i = 0; i < n && !rc; i++) {
        if (!first[(unsigned char)text[i]])
            continue;
        for (int k = 0; k < n_specials; k++) {
            size_t m = strlen(specials[k]);
            if (m <= n - i && !memcmp(text + i, specials[k], m)) {
                rc = count_text(tr, re, md, text + seg, i - seg, err);
                seg = i + m;
                i = seg - 1;
                break;
            }
        }
    }
    if (!rc)
        rc = count_text(tr, re, md, text + seg, n - seg, err);
    lk_free(text);
    return rc;
}

static void progress(const struct tok_train_opts *o, const struct trainer *tr, int stage, int n_specials)
{
    if (o->hooks && o->hooks->progress) {
        struct tok_train_progress p = { (enum tok_train_stage)stage, tr->n_words, tr->n_merges, tr->n_tok,
                                         n_specials };
        o->hooks->progress(o->hooks->ctx, &p);
    }
}

/* 1. The distinct words of every file (NFC, split by the pre-tokenizer regex) and their counts. */
static int count_all(struct trainer *tr, const struct tok_train_opts *o, const char *const *specials,
                     int n_specials, struct lk_err *err)
{
    int ec;
    PCRE2_SIZE eo;
    pcre2_code *re = pcre2_compile((PCRE2_SPTR)QWEN2_REGEX, PCRE2_ZERO_TERMINATED,
                                   PCRE2_UTF | PCRE2_UCP | PCRE2_NO_UTF_CHECK, &ec, &eo, NULL);
    if (!re)
        return lk_errf(err, LK_ERR_FORMAT, "the split regex does not compile");
    pcre2_jit_compile(re, PCRE2_JIT_COMPLETE);
    pcre2_match_data *md = pcre2_match_data_create_from_pattern(re, NULL);
    int rc = md ? LK_OK : lk_errf(err, LK_ERR_NOMEM, "out of memory");
    if (!rc && wm_rehash(tr))
        rc = lk_errf(err, LK_ERR_NOMEM, "out of memory");
    for (int f = 0; f < o->n_files && !rc; f++)
        rc = count_file(tr, re, md, o->files[f], specials, n_specials, err);
    pcre2_match_data_free(md);
    pcre2_code_free(re);
    return rc;
}

/* 2. The 256 byte tokens, every word as byte tokens, the pair counts and the heap of pairs. */
static int init_symbols(struct trainer *tr, int n_merges_max, struct lk_err *err)
{
    int32_t id_of_byte[256];
    uint32_t b2u[256];
    byte_order(id_of_byte, b2u);
    size_t cap_tok = (size_t)256 + (size_t)n_merges_max;
    tr->tok_bytes = lk_calloc(cap_tok, sizeof *tr->tok_bytes);
    tr->tok_len = lk_calloc(cap_tok, sizeof *tr->tok_len);
    tr->merge_a = lk_calloc((size_t)n_merges_max + 1, sizeof *tr->merge_a);
    tr->merge_b = lk_calloc((size_t)n_merges_max + 1, sizeof *tr->merge_b);
    tr->syms = lk_malloc((tr->n_wbytes + 1) * sizeof *tr->syms);
    tr->wstamp = lk_calloc(tr->n_words + 1, sizeof *tr->wstamp);
    if (!tr->tok_bytes || !tr->tok_len || !tr->merge_a || !tr->merge_b || !tr->syms || !tr->wstamp)
        return lk_errf(err, LK_ERR_NOMEM, "out of memory");
    for (int b = 0; b < 256; b++) {
        int32_t id = id_of_byte[b];
        tr->tok_bytes[id] = lk_malloc(1);
        if (!tr->tok_bytes[id])
            return lk_errf(err, LK_ERR_NOMEM, "out of memory");
        tr->tok_bytes[id][0] = (char)b;
        tr->tok_len[id] = 1;
        tr->n_tok++;
    }
    for (size_t w = 0; w < tr->n_words; w++) {
        tr->woff[w] = tr->wboff[w];
        for (uint32_t k = 0; k < tr->wlen[w]; k++)
            tr->syms[tr->woff[w] + k] = id_of_byte[(unsigned char)tr->wbytes[tr->wboff[w] + k]];
        for (uint32_t k = 0; k + 1 < tr->wlen[w]; k++) {
            const int32_t *s = tr->syms + tr->woff[w];
            if (pair_add(tr, s[k], s[k + 1], tr->wcount[w], (int32_t)w))
                return lk_errf(err, LK_ERR_NOMEM, "out of memory counting pairs");
        }
    }
    for (int32_t p = 0; p < tr->n_pairs; p++)
        if (tr->pcount[p] > 0 && heap_push(tr, tr->pcount[p], p))
            return lk_errf(err, LK_ERR_NOMEM, "out of memory");
    return LK_OK;
}

/* Scratch of one merge: pairs whose count changed, a word's new symbols. */
struct merge_scratch {
    struct ivec touched;
    int32_t *tmp;
    size_t tmp_cap;
    uint32_t stamp;
};

/* Replaces pair a b by token c in word w (when it still has it), moving the pair counts; the
 * pairs with c go to x->touched. */
static int merge_word(struct trainer *tr, struct merge_scratch *x, int32_t w, int32_t a, int32_t b, int32_t c,
                      struct lk_err *err)
{
    int32_t *s = tr->syms + tr->woff[w];
    uint32_t n = tr->wlen[w];
    int found = 0;
    for (uint32_t k = 0; k + 1 < n && !found; k++)
        found = s[k] == a && s[k + 1] == b;
    if (!found)
        return LK_OK; // an old entry: the word no longer has the pair
    if (n > x->tmp_cap) {
        int32_t *t2 = lk_realloc(x->tmp, n * 2 * sizeof *t2);
        if (!t2)
            return lk_errf(err, LK_ERR_NOMEM, "out of memory");
        x->tmp = t2;
        x->tmp_cap = n * 2;
    }
    int64_t cnt = tr->wcount[w];
    int fail = 0;
    for (uint32_t k = 0; k + 1 < n; k++)
        fail |= pair_add(tr, s[k], s[k + 1], -cnt, w);
    uint32_t m = 0;
    for (uint32_t k = 0; k < n;) {
        if (k + 1 < n && s[k] == a && s[k + 1] == b) {
            x->tmp[m++] = c;
            k += 2;
        } else {
            x->tmp[m++] = s[k++];
        }
    }
    memcpy(s, x->tmp, m * sizeof *s);
    tr->wlen[w] = m;
    for (uint32_t k = 0; k + 1 < m; k++) {
        fail |= pair_add(tr, s[k], s[k + 1], cnt, w);
        if (s[k] == c || s[k + 1] == c) {
            int32_t q = pair_get(tr, s[k], s[k + 1], 0);
            if (q >= 0 && tr->pstamp[q] != x->stamp) {
                tr->pstamp[q] = x->stamp;
                fail |= ivec_push(&x->touched, q);
            }
        }
    }
    return fail ? lk_errf(err, LK_ERR_NOMEM, "out of memory") : LK_OK;
}

/* 3. One merge: the pair p becomes a new token, in every word that has it. */
static int merge_pair(struct trainer *tr, struct merge_scratch *x, int32_t p, struct lk_err *err)
{
    int32_t a = tr->pa[p], b = tr->pb[p], c = tr->n_tok;
    tr->tok_len[c] = tr->tok_len[a] + tr->tok_len[b];
    tr->tok_bytes[c] = lk_malloc(tr->tok_len[c]);
    if (!tr->tok_bytes[c])
        return lk_errf(err, LK_ERR_NOMEM, "out of memory");
    memcpy(tr->tok_bytes[c], tr->tok_bytes[a], tr->tok_len[a]);
    memcpy(tr->tok_bytes[c] + tr->tok_len[a], tr->tok_bytes[b], tr->tok_len[b]);
    tr->n_tok++;
    tr->merge_a[tr->n_merges] = a;
    tr->merge_b[tr->n_merges] = b;
    tr->n_merges++;
    x->stamp++;
    x->touched.n = 0;
    // p's word list is not appended to below (new pairs all contain c), so it is stable
    int32_t *list = tr->pwhere[p].v;
    uint32_t nlist = tr->pwhere[p].n;
    int rc = LK_OK;
    for (uint32_t li = 0; li < nlist && !rc; li++) {
        int32_t w = list[li];
        if (tr->wstamp[w] == x->stamp)
            continue;
        tr->wstamp[w] = x->stamp;
        rc = merge_word(tr, x, w, a, b, c, err);
    }
    for (uint32_t i = 0; i < x->touched.n && !rc; i++) {
        int32_t q = x->touched.v[i];
        if (tr->pcount[q] > 0 && heap_push(tr, tr->pcount[q], q))
            rc = lk_errf(err, LK_ERR_NOMEM, "out of memory");
    }
    return rc;
}

static int train(struct trainer *tr, const struct tok_train_opts *o, const char *const *specials, int n_specials,
                 const char *dir, struct lk_err *err)
{
    int n_merges_max = o->vocab_size - 256 - n_specials;
    if (n_merges_max < 0)
        return lk_errf(err, LK_ERR_USAGE, "vocab size %d is too small: 256 byte tokens and %d specials need %d",
                       o->vocab_size, n_specials, 256 + n_specials);
    int rc = count_all(tr, o, specials, n_specials, err);
    if (rc)
        return rc;
    progress(o, tr, TOK_TRAIN_COUNTED, n_specials);
    if ((rc = init_symbols(tr, n_merges_max, err)))
        return rc;
    struct merge_scratch x = { 0 };
    while (tr->n_merges < n_merges_max && tr->n_heap && !rc) {
        struct heap_ent top = heap_pop(tr);
        int32_t p = top.pair;
        if (top.count != tr->pcount[p]) { // stale: counts only fell since it was pushed
            if (tr->pcount[p] > 0 && heap_push(tr, tr->pcount[p], p))
                rc = lk_errf(err, LK_ERR_NOMEM, "out of memory");
            continue;
        }
        if (top.count < 2)
            break; // nothing repeats: more merges would only memorize single words
        if (lk_interrupted) {
            rc = lk_errf(err, LK_ERR_INTERRUPTED, "interrupted after %d merges", tr->n_merges);
            break;
        }
        rc = merge_pair(tr, &x, p, err);
        if (!rc && tr->n_merges % 1000 == 0)
            progress(o, tr, TOK_TRAIN_MERGING, n_specials);
    }
    lk_free(x.touched.v);
    lk_free(x.tmp);
    if (rc)
        return rc;
    progress(o, tr, TOK_TRAIN_DONE, n_specials);
    return write_files(tr, specials, n_specials, dir, err);
}

int tok_train(const struct tok_train_opts *o, const char *out_dir, struct lk_err *err)
{
    if (o->n_files < 1)
        return lk_errf(err, LK_ERR_USAGE, "no training text given");
    if (o->n_extra_specials < 0 || o->n_extra_specials > 64)
        return lk_errf(err, LK_ERR_USAGE, "too many extra special tokens");
    const char *specials[3 + 64];
    int n_specials = 0;
    for (int i = 0; i < 3; i++)
        specials[n_specials++] = BASE_SPECIALS[i];
    for (int i = 0; i < o->n_extra_specials; i++)
        specials[n_specials++] = o->extra_specials[i];
    struct trainer tr = { 0 };
    int rc = train(&tr, o, specials, n_specials, out_dir, err);
    trainer_release(&tr);
    return rc;
}
