/*
 * gguf_tok.c - the tokenizer.* metadata of a GGUF model, from a Hugging Face tokenizer folder.
 *
 * The tokenizer is first loaded with tok_load, so a GGUF only ever carries a tokenizer that
 * lorakit runs itself (byte-level BPE), and the token texts, special flags, bos / eos / pad ids,
 * add_bos and the chat template come from it. What tok.h does not expose is read from
 * tokenizer.json here: the merges (in rank order), which ids are added tokens, and the
 * pre-tokenizer's regex and ignore_merges flag, which choose llama.cpp's `tokenizer.ggml.pre`.
 * gguf_tok_load goes the other way: a tokenizer.json and tokenizer_config.json rebuilt from a
 * GGUF's metadata and loaded with tok_load_json.
 * Owns: the token and merge tables of a struct gguf_vocab.
 */
#include "gguf.h"

#include <cjson/cJSON.h>
#include <stdio.h>
#include <string.h>

#include "tok.h"

/* llama.cpp's token types (llama.h: enum llama_token_type). */
enum { TT_NORMAL = 1, TT_CONTROL = 3, TT_USER_DEFINED = 4, TT_UNUSED = 5 };

/* The Split regexes of the tokenizers llama.cpp implements, as tokenizer.json writes them. */
static const char QWEN2_RE[] = "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+"
                               "[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+";
static const char LLAMA3_RE[] = "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+"
                                "[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+";

struct added {
    int32_t id;
    int special;
};

struct tok_json {
    cJSON *root;         /* owned */
    struct added *added; /* owned */
    int n_added;
};

static const cJSON *jget(const cJSON *o, const char *k)
{
    return cJSON_GetObjectItemCaseSensitive(o, k);
}

static int jbool(const cJSON *o, const char *k, int dflt)
{
    const cJSON *v = jget(o, k);
    return cJSON_IsBool(v) ? cJSON_IsTrue(v) : dflt;
}

/* The Split regex and ByteLevel settings of the pre-tokenizer: the regex (NULL for GPT-2's
 * built-in one, used by ByteLevel with use_regex) or an error naming what llama.cpp lacks. */
static int find_regex(const char *path, const cJSON *pt, const char **out_re, struct lk_err *err)
{
    *out_re = NULL;
    const char *type = cJSON_GetStringValue(jget(pt, "type"));
    const cJSON *list = type && !strcmp(type, "Sequence") ? jget(pt, "pretokenizers") : NULL;
    int n = list ? cJSON_GetArraySize(list) : 1, n_split = 0, bytelevel = 0;
    for (int i = 0; i < n; i++) {
        const cJSON *e = list ? cJSON_GetArrayItem(list, i) : pt;
        const char *et = cJSON_GetStringValue(jget(e, "type"));
        if (et && !strcmp(et, "Split")) {
            const char *beh = cJSON_GetStringValue(jget(e, "behavior"));
            if (!beh || strcmp(beh, "Isolated") || jbool(e, "invert", 0))
                return lk_errf(err, LK_ERR_UNSUPPORTED, "%s: a Split pre-tokenizer that is not 'Isolated': llama.cpp "
                               "keeps every piece", path);
            *out_re = cJSON_GetStringValue(jget(jget(e, "pattern"), "Regex"));
            n_split++;
        } else if (et && !strcmp(et, "ByteLevel")) {
            bytelevel++;
            if (jbool(e, "add_prefix_space", 1))
                return lk_errf(err, LK_ERR_UNSUPPORTED, "%s: ByteLevel with add_prefix_space: llama.cpp's BPE "
                               "tokenizer adds no prefix space", path);
            if (jbool(e, "use_regex", 1))
                n_split++;
        }
    }
    if (n_split != 1 || bytelevel != 1 || (*out_re == NULL) == (list && n > 1))
        return lk_errf(err, LK_ERR_UNSUPPORTED, "%s: pre-tokenizer is not one regex split and ByteLevel: llama.cpp "
                       "has no equivalent", path);
    return LK_OK;
}

/* tokenizer.ggml.pre from the pre-tokenizer regex, checked against the model's ignore_merges. */
static int pick_pre(const char *path, const cJSON *root, char *pre, size_t n, struct lk_err *err)
{
    const char *re;
    if (find_regex(path, jget(root, "pre_tokenizer"), &re, err))
        return err->code;
    int ignore = jbool(jget(root, "model"), "ignore_merges", 0), want_ignore = 0;
    if (!re)
        snprintf(pre, n, "gpt-2");
    else if (!strcmp(re, QWEN2_RE))
        snprintf(pre, n, "qwen2");
    else if (!strcmp(re, LLAMA3_RE)) {
        snprintf(pre, n, "llama-bpe");
        want_ignore = 1; // llama.cpp sets ignore_merges for this pre-tokenizer
    } else
        return lk_errf(err, LK_ERR_UNSUPPORTED, "%s: the pre-tokenizer regex is not Qwen2's, Llama 3's or GPT-2's: "
                       "llama.cpp would split text differently", path);
    if (ignore != want_ignore)
        return lk_errf(err, LK_ERR_UNSUPPORTED, "%s: ignore_merges is %s but llama.cpp's '%s' tokenizer %s merges "
                       "for whole words", path, ignore ? "true" : "false", pre, want_ignore ? "ignores" : "applies");
    return LK_OK;
}

static int read_json(struct tok_json *tj, const char *path, struct lk_err *err)
{
    char *text;
    size_t len;
    if (lk_read_file(path, &text, &len, err))
        return err->code;
    tj->root = cJSON_ParseWithLength(text, len);
    lk_free(text);
    if (!tj->root)
        return lk_errf(err, LK_ERR_FORMAT, "%s: not valid JSON", path);
    const cJSON *list = jget(tj->root, "added_tokens"), *e;
    int n = cJSON_GetArraySize(list);
    tj->added = lk_calloc((size_t)n + 1, sizeof *tj->added);
    if (!tj->added)
        return lk_errf(err, LK_ERR_NOMEM, "out of memory");
    cJSON_ArrayForEach(e, list)
    {
        const cJSON *id = jget(e, "id");
        if (cJSON_IsNumber(id)) { // tok_load already checked ids and contents
            tj->added[tj->n_added].id = (int32_t)id->valuedouble;
            tj->added[tj->n_added++].special = jbool(e, "special", 0);
        }
    }
    return LK_OK;
}

static const struct added *find_added(const struct tok_json *tj, int32_t id)
{
    for (int i = 0; i < tj->n_added; i++)
        if (tj->added[i].id == id)
            return &tj->added[i];
    return NULL;
}

/* A token text into buf as tokenizer.json writes it: each raw byte as GPT-2's byte-level
 * code point (printable bytes as themselves, the others at 256 + k), UTF-8 encoded. */
static void bytelevel_put(struct lk_buf *b, const char *raw, size_t n)
{
    static uint32_t b2u[256];
    if (!b2u['A']) {
        int k = 0;
        for (int c = 0; c < 256; c++) {
            int keep = (c >= 33 && c <= 126) || (c >= 161 && c <= 172) || (c >= 174 && c <= 255);
            b2u[c] = keep ? (uint32_t)c : (uint32_t)(256 + k++);
        }
    }
    for (size_t i = 0; i < n; i++) {
        uint32_t cp = b2u[(unsigned char)raw[i]];
        char u[2];
        if (cp < 0x80) {
            u[0] = (char)cp;
            lk_buf_put(b, u, 1);
        } else { // every code point here is below 0x800: two bytes
            u[0] = (char)(0xc0 | cp >> 6);
            u[1] = (char)(0x80 | (cp & 0x3f));
            lk_buf_put(b, u, 2);
        }
    }
}

/* "<|...|>" and similar texts llama.cpp's converter treats as control even when not special. */
static int looks_special(const char *s, size_t n)
{
    return n >= 4 && !memcmp(s, "<|", 2) && !memcmp(s + n - 2, "|>", 2);
}

static int fill_tokens(struct gguf_vocab *v, const struct tok *tk, const struct tok_json *tj, struct lk_err *err)
{
    struct lk_buf b = { 0 };
    v->off = lk_malloc(sizeof *v->off * (size_t)v->n);
    v->len = lk_malloc(sizeof *v->len * (size_t)v->n);
    v->type = lk_malloc(sizeof *v->type * (size_t)v->n);
    if (!v->off || !v->len || !v->type)
        return lk_errf(err, LK_ERR_NOMEM, "out of memory for %d tokens", (int)v->n);
    for (int32_t i = 0; i < v->n; i++) {
        size_t n, start = b.n;
        const char *p = tok_piece(tk, i, &n);
        const struct added *a = p ? find_added(tj, i) : NULL;
        if (!p) { // a hole in the ids, or the embedding rows past the tokenizer: as the converter
            lk_buf_printf(&b, "[PAD%d]", (int)i);
            v->type[i] = TT_UNUSED;
        } else if (a) {
            lk_buf_put(&b, p, n);
            v->type[i] = a->special || looks_special(p, n) ? TT_CONTROL : TT_USER_DEFINED;
        } else {
            bytelevel_put(&b, p, n);
            v->type[i] = TT_NORMAL;
        }
        v->off[i] = start;
        v->len[i] = b.n - start;
        lk_buf_put(&b, "", 1); // NUL separator (lk_buf_put keeps a terminator; this keeps the 0)
    }
    if (b.oom) {
        lk_buf_release(&b);
        return lk_errf(err, LK_ERR_NOMEM, "out of memory for the token texts");
    }
    v->text = b.p;
    return LK_OK;
}

static int fill_merges(struct gguf_vocab *v, const char *path, const cJSON *merges, struct lk_err *err)
{
    struct lk_buf b = { 0 };
    v->n_merges = cJSON_GetArraySize(merges);
    v->merge_off = lk_malloc(sizeof *v->merge_off * (size_t)(v->n_merges + 1));
    v->merge_len = lk_malloc(sizeof *v->merge_len * (size_t)(v->n_merges + 1));
    if (!v->merge_off || !v->merge_len)
        return lk_errf(err, LK_ERR_NOMEM, "out of memory for %lld merges", (long long)v->n_merges);
    int64_t i = 0;
    const cJSON *e;
    cJSON_ArrayForEach(e, merges)
    {
        size_t start = b.n;
        if (cJSON_IsString(e)) {
            lk_buf_puts(&b, e->valuestring);
        } else if (cJSON_GetArraySize(e) == 2 && cJSON_IsString(e->child) && cJSON_IsString(e->child->next)) {
            // ["a", "b"] (tokenizers >= 0.20): joined as "a b", a space inside a part written as
            // U+0120 so the pair stays unambiguous (gguf-py's SpecialVocab does the same)
            for (const cJSON *part = e->child; part; part = part->next) {
                for (const char *s = part->valuestring; *s; s++) {
                    if (*s == ' ')
                        lk_buf_put(&b, "\xc4\xa0", 2);
                    else
                        lk_buf_put(&b, s, 1);
                }
                if (part == e->child)
                    lk_buf_put(&b, " ", 1);
            }
        } else {
            lk_buf_release(&b);
            return lk_errf(err, LK_ERR_FORMAT, "%s: merges[%lld] is neither \"a b\" nor [\"a\", \"b\"]", path, (long long)i);
        }
        v->merge_off[i] = start;
        v->merge_len[i] = b.n - start;
        lk_buf_put(&b, "", 1);
        i++;
    }
    if (b.oom) {
        lk_buf_release(&b);
        return lk_errf(err, LK_ERR_NOMEM, "out of memory for the merges");
    }
    v->merge_text = b.p;
    return LK_OK;
}

/* An id field of a JSON config file (a number, or the first of a list as generation_config.json
 * may give for eos), or -1. */
static int32_t cfg_id(const char *dir, const char *file, const char *key, int32_t n_vocab)
{
    char *path = lk_path_join(dir, file), *text = NULL;
    size_t len;
    struct lk_err e = { 0 };
    int32_t id = -1;
    if (path && lk_file_exists(path) && lk_read_file(path, &text, &len, &e) == LK_OK) {
        cJSON *root = cJSON_ParseWithLength(text, len);
        const cJSON *v = jget(root, key);
        if (cJSON_IsArray(v))
            v = cJSON_GetArrayItem(v, 0);
        if (cJSON_IsNumber(v) && v->valuedouble >= 0 && v->valuedouble < n_vocab)
            id = (int32_t)v->valuedouble;
        cJSON_Delete(root);
    }
    lk_free(text);
    lk_free(path);
    return id;
}

static int fill_specials(struct gguf_vocab *v, const struct tok *tk, const char *dir, struct lk_err *err)
{
    static const char *const files[] = { "generation_config.json", "config.json" };
    v->bos = tok_bos(tk);
    v->eos = tok_eos(tk);
    v->pad = tok_pad(tk);
    for (int i = 0; i < 2; i++) { // tokenizer_config.json first, then these, as the converter
        if (v->bos < 0)
            v->bos = cfg_id(dir, files[i], "bos_token_id", v->n);
        if (v->eos < 0)
            v->eos = cfg_id(dir, files[i], "eos_token_id", v->n);
        if (v->pad < 0)
            v->pad = cfg_id(dir, files[i], "pad_token_id", v->n);
    }
    // lorakit adds BOS only when tokenizer_config.json asks and names it: llama.cpp does the same
    v->add_bos = tok_add_bos(tk);
    const char *tmpl = tok_chat_template(tk);
    char *jinja = lk_path_join(dir, "chat_template.jinja");
    if (!jinja)
        return lk_errf(err, LK_ERR_NOMEM, "out of memory");
    if (tmpl) {
        v->chat_template = lk_strdup(tmpl);
    } else if (lk_file_exists(jinja)) {
        size_t len;
        if (lk_read_file(jinja, &v->chat_template, &len, err)) {
            lk_free(jinja);
            return err->code;
        }
    }
    lk_free(jinja);
    if (tmpl && !v->chat_template)
        return lk_errf(err, LK_ERR_NOMEM, "out of memory");
    return LK_OK;
}

int gguf_vocab_load(struct gguf_vocab *v, const char *dir, int32_t n_vocab, struct lk_err *err)
{
    memset(v, 0, sizeof *v);
    v->bos = v->eos = v->pad = -1;
    struct tok *tk = NULL;
    struct tok_json tj = { 0 };
    char *path = lk_path_join(dir, "tokenizer.json");
    if (!path)
        return lk_errf(err, LK_ERR_NOMEM, "out of memory");
    int rc = LK_OK;
    if (!lk_file_exists(path))
        rc = lk_errf(err, LK_ERR_MISSING, "%s: no tokenizer.json: a GGUF model carries its tokenizer (hint: copy "
                     "tokenizer.json and tokenizer_config.json into the model folder)", dir);
    if (!rc)
        rc = tok_load(&tk, dir, err);
    if (!rc && tok_vocab_size(tk) > n_vocab)
        rc = lk_errf(err, LK_ERR_SHAPE, "%s: the tokenizer has %d tokens, the model's embedding only %d rows", path,
                     (int)tok_vocab_size(tk), (int)n_vocab);
    if (!rc)
        rc = read_json(&tj, path, err);
    if (!rc)
        rc = pick_pre(path, tj.root, v->pre, sizeof v->pre, err);
    if (!rc) {
        v->n = n_vocab;
        rc = fill_tokens(v, tk, &tj, err);
    }
    if (!rc)
        rc = fill_merges(v, path, jget(jget(tj.root, "model"), "merges"), err);
    if (!rc)
        rc = fill_specials(v, tk, dir, err);
    cJSON_Delete(tj.root);
    lk_free(tj.added);
    tok_free(tk);
    lk_free(path);
    if (rc)
        gguf_vocab_release(v);
    return rc;
}

void gguf_vocab_release(struct gguf_vocab *v)
{
    if (!v)
        return;
    lk_free(v->text);
    lk_free(v->off);
    lk_free(v->len);
    lk_free(v->type);
    lk_free(v->merge_text);
    lk_free(v->merge_off);
    lk_free(v->merge_len);
    lk_free(v->chat_template);
    memset(v, 0, sizeof *v);
    v->bos = v->eos = v->pad = -1;
}

/* n strings of a NUL-separated table as an array of pointers (caller frees the array). */
static const char **ptrs(const char *text, const size_t *off, int64_t n)
{
    const char **p = lk_malloc(sizeof *p * (size_t)(n ? n : 1));
    for (int64_t i = 0; p && i < n; i++)
        p[i] = text + off[i];
    return p;
}

int gguf_vocab_write(const struct gguf_vocab *v, struct gguf_writer *w)
{
    if (w->err->code)
        return w->err->code;
    const char **tokens = ptrs(v->text, v->off, v->n), **merges = ptrs(v->merge_text, v->merge_off, v->n_merges);
    if (!tokens || !merges) {
        lk_free(tokens);
        lk_free(merges);
        return lk_errf(w->err, LK_ERR_NOMEM, "out of memory");
    }
    gguf_writer_str(w, "tokenizer.ggml.model", "gpt2");
    gguf_writer_str(w, "tokenizer.ggml.pre", v->pre);
    gguf_writer_arr_str(w, "tokenizer.ggml.tokens", tokens, v->len, (size_t)v->n);
    gguf_writer_arr_i32(w, "tokenizer.ggml.token_type", v->type, (size_t)v->n);
    gguf_writer_arr_str(w, "tokenizer.ggml.merges", merges, v->merge_len, (size_t)v->n_merges);
    if (v->bos >= 0)
        gguf_writer_u32(w, "tokenizer.ggml.bos_token_id", (uint32_t)v->bos);
    if (v->eos >= 0)
        gguf_writer_u32(w, "tokenizer.ggml.eos_token_id", (uint32_t)v->eos);
    if (v->pad >= 0)
        gguf_writer_u32(w, "tokenizer.ggml.padding_token_id", (uint32_t)v->pad);
    gguf_writer_bool(w, "tokenizer.ggml.add_bos_token", v->add_bos);
    if (v->chat_template)
        gguf_writer_str(w, "tokenizer.chat_template", v->chat_template);
    lk_free(tokens);
    lk_free(merges);
    return w->err->code;
}

// ---- GGUF metadata back to a tokenizer ----

/* tokenizer.json's pre_tokenizer for a llama.cpp pre name (NULL when lorakit has none). */
static cJSON *pretok_json(const char *pre)
{
    const char *re = !strcmp(pre, "qwen2") ? QWEN2_RE : !strcmp(pre, "llama-bpe") ? LLAMA3_RE : NULL;
    if (!re && strcmp(pre, "gpt-2"))
        return NULL;
    cJSON *bl = cJSON_CreateObject();
    cJSON_AddStringToObject(bl, "type", "ByteLevel");
    cJSON_AddBoolToObject(bl, "add_prefix_space", 0);
    cJSON_AddBoolToObject(bl, "use_regex", re == NULL);
    if (!re)
        return bl;
    cJSON *split = cJSON_CreateObject(), *seq = cJSON_CreateObject(), *list = cJSON_CreateArray();
    cJSON_AddStringToObject(split, "type", "Split");
    cJSON_AddStringToObject(cJSON_AddObjectToObject(split, "pattern"), "Regex", re);
    cJSON_AddStringToObject(split, "behavior", "Isolated");
    cJSON_AddStringToObject(seq, "type", "Sequence");
    cJSON_AddItemToArray(list, split);
    cJSON_AddItemToArray(list, bl);
    cJSON_AddItemToObject(seq, "pretokenizers", list);
    return seq;
}

/* A GGUF string as a NUL-terminated heap copy (NULL on OOM). */
static char *zstr(struct gguf_str s)
{
    char *p = lk_malloc((size_t)s.n + 1);
    if (p) {
        memcpy(p, s.p, (size_t)s.n);
        p[s.n] = 0;
    }
    return p;
}

/* The vocab, added tokens and merges of tokenizer.json into root. */
static int tok_tables(cJSON *root, const struct gguf_file *f, const char *pre, struct lk_err *err)
{
    const struct gguf_kv *toks = gguf_find_kv(f, "tokenizer.ggml.tokens"), *types = gguf_find_kv(f, "tokenizer.ggml.token_type");
    const struct gguf_kv *merges = gguf_find_kv(f, "tokenizer.ggml.merges");
    if (!toks || toks->arr_type != GGUF_VT_STRING || !merges || merges->arr_type != GGUF_VT_STRING)
        return lk_errf(err, LK_ERR_MISSING, "%s: no tokenizer.ggml.tokens or merges (string arrays)", f->path);
    if (types && (types->type != GGUF_VT_ARRAY || types->n != toks->n))
        return lk_errf(err, LK_ERR_FORMAT, "%s: tokenizer.ggml.token_type does not match the tokens", f->path);
    cJSON *model = cJSON_AddObjectToObject(root, "model"), *vocab = cJSON_AddObjectToObject(model, "vocab");
    cJSON *added = cJSON_AddArrayToObject(root, "added_tokens"), *ml = cJSON_AddArrayToObject(model, "merges");
    cJSON_AddStringToObject(model, "type", "BPE");
    cJSON_AddBoolToObject(model, "ignore_merges", !strcmp(pre, "llama-bpe"));
    for (uint64_t i = 0; i < toks->n; i++) {
        int type = types ? (int)gguf_arr_num(types, i) : TT_NORMAL;
        char *s = zstr(gguf_arr_str(toks, i));
        if (!s)
            return lk_errf(err, LK_ERR_NOMEM, "out of memory");
        if (type == TT_CONTROL || type == TT_USER_DEFINED) {
            cJSON *a = cJSON_CreateObject();
            cJSON_AddNumberToObject(a, "id", (double)i);
            cJSON_AddStringToObject(a, "content", s);
            cJSON_AddBoolToObject(a, "special", type == TT_CONTROL);
            cJSON_AddItemToArray(added, a);
        } else if (type != TT_UNUSED) {
            cJSON_AddNumberToObject(vocab, s, (double)i);
        }
        lk_free(s);
    }
    for (uint64_t i = 0; i < merges->n; i++) {
        char *s = zstr(gguf_arr_str(merges, i));
        if (!s)
            return lk_errf(err, LK_ERR_NOMEM, "out of memory");
        cJSON_AddItemToArray(ml, cJSON_CreateString(s));
        lk_free(s);
    }
    return LK_OK;
}

/* tokenizer_config.json: bos / eos / pad by content, add_bos_token, the chat template. */
static cJSON *tok_config(const struct gguf_file *f)
{
    static const char *const keys[][2] = { { "tokenizer.ggml.bos_token_id", "bos_token" },
                                           { "tokenizer.ggml.eos_token_id", "eos_token" },
                                           { "tokenizer.ggml.padding_token_id", "pad_token" } };
    const struct gguf_kv *toks = gguf_find_kv(f, "tokenizer.ggml.tokens");
    cJSON *cfg = cJSON_CreateObject();
    struct lk_err e = { 0 };
    for (int i = 0; i < 3; i++) {
        uint64_t id;
        if (gguf_find_kv(f, keys[i][0]) && gguf_get_uint(f, keys[i][0], &id, &e) == LK_OK && id < toks->n) {
            char *s = zstr(gguf_arr_str(toks, id));
            if (s)
                cJSON_AddStringToObject(cfg, keys[i][1], s);
            lk_free(s);
        }
    }
    int add_bos = 0;
    if (gguf_find_kv(f, "tokenizer.ggml.add_bos_token"))
        gguf_get_bool(f, "tokenizer.ggml.add_bos_token", &add_bos, &e);
    cJSON_AddBoolToObject(cfg, "add_bos_token", add_bos);
    char *tmpl = NULL;
    if (gguf_find_kv(f, "tokenizer.chat_template") && gguf_get_str(f, "tokenizer.chat_template", &tmpl, &e) == LK_OK)
        cJSON_AddStringToObject(cfg, "chat_template", tmpl);
    lk_free(tmpl);
    return cfg;
}

int gguf_tok_load(struct tok **out, const struct gguf_file *f, struct lk_err *err)
{
    *out = NULL;
    char *model = NULL, *pre = NULL;
    if (gguf_get_str(f, "tokenizer.ggml.model", &model, err))
        return err->code;
    int rc = strcmp(model, "gpt2") ? lk_errf(err, LK_ERR_UNSUPPORTED, "%s: tokenizer model '%.32s' is not supported "
                                             "(only gpt2, byte-level BPE)", f->path, model) : LK_OK;
    if (!rc)
        rc = gguf_get_str(f, "tokenizer.ggml.pre", &pre, err);
    cJSON *root = cJSON_CreateObject(), *pt = rc ? NULL : pretok_json(pre), *cfg = NULL;
    if (!rc && !pt)
        rc = lk_errf(err, LK_ERR_UNSUPPORTED, "%s: pre-tokenizer '%.32s' is not supported (qwen2, llama-bpe, gpt-2)",
                     f->path, pre);
    if (!rc)
        rc = tok_tables(root, f, pre, err);
    char *json = NULL, *cfg_json = NULL;
    if (!rc) {
        cJSON_AddItemToObject(root, "pre_tokenizer", pt);
        pt = NULL;
        if (!strcmp(pre, "qwen2"))
            cJSON_AddStringToObject(cJSON_AddObjectToObject(root, "normalizer"), "type", "NFC");
        cJSON_AddStringToObject(cJSON_AddObjectToObject(root, "decoder"), "type", "ByteLevel");
        cfg = tok_config(f);
        json = cJSON_PrintUnformatted(root);
        cfg_json = cfg ? cJSON_PrintUnformatted(cfg) : NULL;
        if (!json || !cfg_json)
            rc = lk_errf(err, LK_ERR_NOMEM, "out of memory");
    }
    if (!rc)
        rc = tok_load_json(out, json, strlen(json), cfg_json, f->path, err);
    cJSON_free(json);
    cJSON_free(cfg_json);
    cJSON_Delete(cfg);
    cJSON_Delete(pt);
    cJSON_Delete(root);
    lk_free(model);
    lk_free(pre);
    return rc;
}
