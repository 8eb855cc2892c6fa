/*
 * test_tok.c - the tokenizer, chat templates and the BPE trainer, checked against
 * independent references: llama.cpp's Qwen2 vectors (ids from Hugging Face's tokenizers),
 * the JavaScript implementation @huggingface/tokenizers (tests/tok_ref.mjs, installed by
 * `make node-ref` into build/node) on a few MB of varied text, utf8proc's NFC for
 * round trips, and hand-written renderings of each chat template.
 */
#include "test.h"

#include <cjson/cJSON.h>
#include <glob.h>
#include <stdlib.h>
#include <string.h>

#include "../libcore/chat.h"
#include "../libcore/lk.h"
#include "../libcore/tok.h"

// ---- helpers ----

struct texts {
    char **v; /* owned strings */
    size_t *len;
    int n, cap;
    size_t bytes;
};

static void texts_add(struct texts *t, const char *s, size_t n)
{
    if (!n)
        return;
    if (t->n == t->cap) {
        t->cap = t->cap ? t->cap * 2 : 256;
        t->v = realloc(t->v, (size_t)t->cap * sizeof *t->v);
        t->len = realloc(t->len, (size_t)t->cap * sizeof *t->len);
    }
    t->v[t->n] = malloc(n + 1);
    memcpy(t->v[t->n], s, n);
    t->v[t->n][n] = 0;
    t->len[t->n++] = n;
    t->bytes += n;
}

/* Adds s in chunks of at most ~max bytes, cut after a newline (never inside a character). */
static void texts_add_chunked(struct texts *t, const char *s, size_t n, size_t max)
{
    size_t i = 0;
    while (i < n) {
        size_t j = i + max < n ? i + max : n;
        if (j < n) {
            size_t k = j;
            while (k > i && s[k - 1] != '\n')
                k--;
            if (k > i)
                j = k;
            else
                while (j < n && ((unsigned char)s[j] & 0xC0) == 0x80)
                    j++;
        }
        texts_add(t, s + i, j - i);
        i = j;
    }
}

static void texts_free(struct texts *t)
{
    for (int i = 0; i < t->n; i++)
        free(t->v[i]);
    free(t->v);
    free(t->len);
    memset(t, 0, sizeof *t);
}

/* Up to max bytes of a file (cut at a newline), or nothing when it is absent. */
static void add_file(struct texts *t, const char *path, size_t max)
{
    char *buf;
    size_t n;
    if (!path || lk_read_file(path, &buf, &n, NULL))
        return;
    if (n > max) {
        n = max;
        while (n && buf[n - 1] != '\n')
            n--;
    }
    texts_add_chunked(t, buf, n, 16384);
    lk_free(buf);
}

/* The string fields of up to max bytes of a JSONL file's records, one text per record. */
static void add_jsonl(struct texts *t, const char *path, const char *const *fields, size_t max)
{
    char *buf;
    size_t n, used = 0;
    if (!path || lk_read_file(path, &buf, &n, NULL))
        return;
    for (char *line = buf; line && *line && used < max;) {
        char *nl = strchr(line, '\n');
        if (nl)
            *nl = 0;
        cJSON *o = cJSON_Parse(line);
        for (int f = 0; fields[f] && o; f++) {
            const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, fields[f]);
            if (cJSON_IsString(v)) {
                texts_add_chunked(t, v->valuestring, strlen(v->valuestring), 16384);
                used += strlen(v->valuestring);
            }
        }
        cJSON_Delete(o);
        line = nl ? nl + 1 : NULL;
    }
    lk_free(buf);
}

/* Texts made to hit the tokenizer's corners: whitespace runs, digits, contractions in
 * any case, emoji and other astral characters, decomposed characters (NFC), scripts,
 * special tokens inside words. Seeded, so the same every run. */
static void add_synthetic(struct texts *t, int n_texts)
{
    static const char *frag[] = {
        "Hello", " world", "I'm", "you're", "THEY'RE", "He'S", "can't", "CAN'T", "'ll", "'VE", "'d", "'M",
        "it's", "'s'", "''", "\t", "\t\t", " ", "  ", "   ", "        ", "\n", "\n\n", "\n\n\n", "\r\n", "\r",
        " \n", "\t\n ", "0", "7", "42", "2024", "12345678901234567890", "3.14159", "1,000,000", "-17", "1e-9",
        "０１２", "٣٤", "😀", "😀😀😀", "👨‍👩‍👧‍👦", "👍🏽", "🏳️‍🌈", "𝕳𝖊𝖑𝖑𝖔", "🀄", "𠀋𠀌", "e\xcc\x81",
        "A\xcc\x8a", "\xe1\x84\x80\xe1\x85\xa1", "café", "naïve", "Ω", "\xc2\xa0", "\xe3\x80\x80",
        "\xe2\x80\xa8", "\xe2\x80\x8b", "مرحبا", "Привет", "ภาษาไทย", "ភាសាខ្មែរ", "中文字符", "日本語の文章",
        "한국어", "…", "—", "«»", "$$$", "!!!", "???", "...", "```c\nint x = 0;\n```", "{\"a\": [1, 2]}",
        "<|im_start|>", "<|im_end|>", "<|endoftext|>", "<think>", "</think>", "<|im_start", "|>", "<|",
        "x<|im_end|>y", "\x0b", "\x0c", "#include <stdio.h>", "    return 0;", "a_b-c.d/e\\f", "@user",
        "https://example.org/a?b=1&c=2", "ÀÉÎÕÜ", "ǅ", "ﬁ", "Ⅻ", "½", "²", "\xf0\x9f\x98\x80\xcc\x81",
    };
    size_t nf = sizeof frag / sizeof frag[0];
    struct lk_rng r;
    lk_rng_seed(&r, 1234);
    char *buf = malloc(65536);
    for (int k = 0; k < n_texts; k++) {
        size_t n = 0;
        int parts = 20 + (int)(lk_rng_u64(&r) % 400);
        for (int p = 0; p < parts; p++) {
            const char *f = frag[lk_rng_u64(&r) % nf];
            size_t m = strlen(f);
            if (n + m + 1 >= 65536)
                break;
            memcpy(buf + n, f, m);
            n += m;
            if (lk_rng_u64(&r) % 3 == 0)
                buf[n++] = ' ';
        }
        texts_add(t, buf, n);
    }
    free(buf);
}

static void add_sources(struct texts *t)
{
    static const char *pats[] = { "libcore/*.[ch]", "tools/*.[ch]", "tests/*.[ch]", "Makefile" };
    for (size_t p = 0; p < sizeof pats / sizeof pats[0]; p++) {
        glob_t g;
        if (glob(pats[p], 0, NULL, &g) == 0)
            for (size_t i = 0; i < g.gl_pathc; i++)
                add_file(t, g.gl_pathv[i], 1 << 20);
        globfree(&g);
    }
}

static const char *QWEN = "data/tokenizers/qwen3/tokenizer.json";

/* The ~2 MB corpus for the Qwen checks (the shared data must be there). */
static void qwen_corpus(struct texts *t)
{
    static const char *qa[] = { "question", "answer", NULL };
    static const char *zh[] = { "title", "question", "answer", NULL };
    add_file(t, test_shared("data/standard-ebooks-en/valid.txt"), 520000);
    add_jsonl(t, test_shared("data/medquad/dev.jsonl"), qa, 600000);
    add_jsonl(t, test_shared("data/zh-medical/qa.jsonl"), zh, 600000);
    add_sources(t);
    add_synthetic(t, 200);
}

static int node_ready(void)
{
    return lk_file_exists("build/node/node_modules/@huggingface/tokenizers/package.json") &&
           system("node --version >/dev/null 2>&1") == 0;
}

/* Runs the reference on every text; out[i] gets its ids (caller releases). 0 on success. */
static int node_encode(const char *tokdir, const struct texts *t, struct tok_ids *out)
{
    const char *in = test_path("ref_in.jsonl"), *res = test_path("ref_out.jsonl");
    FILE *f = fopen(in, "w");
    if (!f)
        return -1;
    for (int i = 0; i < t->n; i++) {
        cJSON *s = cJSON_CreateString(t->v[i]);
        char *js = cJSON_PrintUnformatted(s);
        fprintf(f, "%s\n", js);
        free(js);
        cJSON_Delete(s);
    }
    fclose(f);
    if (test_sh("node tests/tok_ref.mjs '%s' '%s' '%s'", tokdir, in, res) != 0) {
        fprintf(stderr, "    node: %s\n", test_output());
        return -1;
    }
    char *buf;
    if (lk_read_file(res, &buf, NULL, NULL))
        return -1;
    int i = 0;
    for (char *line = buf; line && *line && i < t->n; i++) {
        char *nl = strchr(line, '\n');
        if (nl)
            *nl = 0;
        cJSON *a = cJSON_Parse(line);
        const cJSON *e;
        cJSON_ArrayForEach(e, a) tok_ids_push(&out[i], (int32_t)e->valuedouble, NULL);
        cJSON_Delete(a);
        line = nl ? nl + 1 : NULL;
    }
    lk_free(buf);
    return i == t->n ? 0 : -1;
}

/* Compares our ids with the reference's on every text; reports the first difference. */
static int compare_with_node(struct tok *tk, const char *tokdir, const struct texts *t)
{
    struct tok_ids *ref = calloc((size_t)t->n, sizeof *ref);
    int bad = node_encode(tokdir, t, ref) ? -1 : 0;
    if (bad)
        test_fail(__FILE__, __LINE__, "the node reference failed");
    for (int i = 0; i < t->n && !bad; i++) {
        struct tok_ids ids = { 0 };
        struct lk_err err = { 0 };
        if (tok_encode(tk, t->v[i], t->len[i], 1, &ids, &err)) {
            test_fail(__FILE__, __LINE__, "text %d: %s", i, err.msg);
            bad = 1;
        }
        size_t k = 0;
        while (!bad && k < ids.n && k < ref[i].n && ids.v[k] == ref[i].v[k])
            k++;
        if (!bad && (k < ids.n || k < ref[i].n)) {
            size_t lo = k > 3 ? k - 3 : 0;
            char *ours = NULL, *theirs = NULL;
            tok_decode(tk, ids.v + lo, (k + 3 < ids.n ? k + 3 : ids.n) - lo, 0, &ours, NULL, &err);
            tok_decode(tk, ref[i].v + lo, (k + 3 < ref[i].n ? k + 3 : ref[i].n) - lo, 0, &theirs, NULL, &err);
            test_fail(__FILE__, __LINE__, "text %d differs at token %zu (ours %d, reference %d): ours [%s] "
                      "reference [%s]", i, k, k < ids.n ? ids.v[k] : -1, k < ref[i].n ? ref[i].v[k] : -1,
                      ours ? ours : "", theirs ? theirs : "");
            lk_free(ours);
            lk_free(theirs);
            bad = 1;
        }
        tok_ids_release(&ids);
    }
    for (int i = 0; i < t->n; i++)
        tok_ids_release(&ref[i]);
    free(ref);
    return bad;
}

/* decode(encode(x)) == NFC(x) on every text. */
static int check_roundtrip(struct tok *tk, const struct texts *t)
{
    for (int i = 0; i < t->n; i++) {
        struct lk_err err = { 0 };
        struct tok_ids ids = { 0 };
        char *dec = NULL, *nfc = NULL;
        size_t nd = 0, nn = 0;
        int rc = tok_encode(tk, t->v[i], t->len[i], 1, &ids, &err);
        if (!rc)
            rc = tok_decode(tk, ids.v, ids.n, 0, &dec, &nd, &err);
        if (!rc)
            rc = tok_nfc(t->v[i], t->len[i], &nfc, &nn, &err);
        int same = !rc && nd == nn && !memcmp(dec, nfc, nn);
        if (!same)
            test_fail(__FILE__, __LINE__, "text %d: round trip differs (%s)", i, rc ? err.msg : "bytes");
        tok_ids_release(&ids);
        lk_free(dec);
        lk_free(nfc);
        if (!same)
            return 1;
    }
    return 0;
}

/* Trains a small tokenizer on the project's own sources and synthetic text into dir. */
static int train_small(const char *dir, int vocab, int llama3_specials, struct lk_err *err)
{
    struct texts t = { 0 };
    add_sources(&t);
    add_synthetic(&t, 40);
    const char *path = test_path("train.txt");
    FILE *f = fopen(path, "w");
    for (int i = 0; i < t.n; i++)
        fwrite(t.v[i], 1, t.len[i], f);
    fclose(f);
    texts_free(&t);
    static const char *l3[] = { "<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
                                "<|end_header_id|>", "<|eot_id|>" };
    const char *files[] = { path };
    struct tok_train_opts o = { files, 1, vocab, llama3_specials ? l3 : NULL, llama3_specials ? 5 : 0, 0 };
    return tok_train(&o, dir, err);
}

// ---- Qwen tokenizer ----

TEST(tok_qwen_llamacpp_vectors)
{
    const char *path = test_shared(QWEN);
    const char *inp = test_shared("data/tokenizers/qwen3/llama.cpp-vectors/qwen2.inp");
    const char *outp = test_shared("data/tokenizers/qwen3/llama.cpp-vectors/qwen2.out");
    if (!path || !inp || !outp)
        SKIP("shared/data/tokenizers/qwen3 is not there");
    struct lk_err *err = test_err();
    struct tok *tk;
    CHECK_OK(tok_load(&tk, path, err));
    char *in, *out;
    CHECK_OK(lk_read_file(inp, &in, NULL, err));
    CHECK_OK(lk_read_file(outp, &out, NULL, err));
    const char *sep = "\n__ggml_vocab_test__\n";
    char *p = in, *o = out;
    int n = 0;
    for (char *q; (q = strstr(p, sep)) != NULL; p = q + strlen(sep), n++) {
        char *nl = strchr(o, '\n');
        CHECK(nl);
        *nl = 0;
        struct tok_ids ids = { 0 };
        CHECK_OK(tok_encode(tk, p, (size_t)(q - p), 1, &ids, err));
        char got[16384];
        size_t k = 0;
        for (size_t i = 0; i < ids.n && k + 16 < sizeof got; i++)
            k += (size_t)snprintf(got + k, sizeof got - k, " %d", ids.v[i]);
        got[k] = 0;
        CHECK_MSG(!strcmp(got, o), "vector %d [%.*s]: got '%s', want '%s'", n, (int)(q - p), p, got, o);
        tok_ids_release(&ids);
        o = nl + 1;
    }
    CHECK_INT(n, 43);
    lk_free(in);
    lk_free(out);
    tok_free(tk);
}

TEST(tok_qwen_spot_checks_and_config)
{
    const char *path = test_shared(QWEN);
    if (!path)
        SKIP("shared/data/tokenizers/qwen3 is not there");
    struct lk_err *err = test_err();
    struct tok *tk;
    CHECK_OK(tok_load(&tk, path, err));
    struct tok_ids ids = { 0 };
    CHECK_OK(tok_encode(tk, "Hello world", 11, 1, &ids, err)); // from the shared README
    CHECK_INT(ids.n, 2);
    CHECK_INT(ids.v[0], 9707);
    CHECK_INT(ids.v[1], 1879);
    ids.n = 0;
    CHECK_OK(tok_encode(tk, "a<|im_end|>b", 12, 1, &ids, err));
    CHECK_INT(ids.n, 3);
    CHECK_INT(ids.v[1], 151645);
    ids.n = 0;
    CHECK_OK(tok_encode(tk, "a<|im_end|>b", 12, 0, &ids, err)); // as plain text
    CHECK(ids.n > 3);
    tok_ids_release(&ids);
    CHECK_INT(tok_eos(tk), 151645);
    CHECK_INT(tok_pad(tk), 151643);
    CHECK_INT(tok_bos(tk), -1);
    CHECK_INT(tok_vocab_size(tk), 151669);
    CHECK_INT(tok_find(tk, "<think>"), 151667);
    CHECK(tok_is_special(tk, 151644) && !tok_is_special(tk, 151667));
    int32_t sp[] = { 9707, 151645, 1879 };
    char *s;
    CHECK_OK(tok_decode(tk, sp, 3, 1, &s, NULL, err));
    CHECK(!strcmp(s, "Hello world"));
    lk_free(s);
    CHECK(tok_decode(tk, (int32_t[]){ 151700 }, 1, 0, &s, NULL, err) == LK_ERR_FORMAT);
    tok_free(tk);
}

TEST(tok_qwen_matches_node_reference)
{
    const char *path = test_shared(QWEN);
    if (!path)
        SKIP("shared/data/tokenizers/qwen3 is not there");
    if (!node_ready())
        SKIP("node or build/node (make node-ref: npm @huggingface/tokenizers) is not there");
    struct lk_err *err = test_err();
    struct tok *tk;
    CHECK_OK(tok_load(&tk, path, err));
    struct texts t = { 0 };
    qwen_corpus(&t);
    CHECK_MSG(t.bytes >= 2000000, "corpus has only %zu bytes", t.bytes);
    char dir[1024];
    snprintf(dir, sizeof dir, "%s", path);
    *strrchr(dir, '/') = 0;
    CHECK(!compare_with_node(tk, dir, &t));
    texts_free(&t);
    tok_free(tk);
}

TEST(tok_qwen_roundtrip_is_nfc)
{
    const char *path = test_shared(QWEN);
    if (!path)
        SKIP("shared/data/tokenizers/qwen3 is not there");
    struct tok *tk;
    CHECK_OK(tok_load(&tk, path, test_err()));
    struct texts t = { 0 };
    qwen_corpus(&t);
    CHECK(t.bytes >= 2000000);
    CHECK(!check_roundtrip(tk, &t));
    // and NFC does change some of it (the decomposed characters in the synthetic texts)
    char *nfc;
    size_t n;
    CHECK_OK(tok_nfc("e\xcc\x81", 3, &nfc, &n, test_err()));
    CHECK(n == 2 && !memcmp(nfc, "\xc3\xa9", 2));
    lk_free(nfc);
    texts_free(&t);
    tok_free(tk);
}

// ---- trainer ----

TEST(tok_train_loads_here_and_in_reference)
{
    struct lk_err *err = test_err();
    const char *dir = test_path("trained");
    CHECK_OK(train_small(dir, 1200, 0, err));
    struct tok *tk;
    CHECK_OK(tok_load(&tk, dir, err));
    CHECK_INT(tok_vocab_size(tk), 1200);
    CHECK_INT(tok_find(tk, "<|endoftext|>"), 1197);
    CHECK_INT(tok_find(tk, "<|im_end|>"), 1199);
    CHECK_INT(tok_eos(tk), 1199);
    struct chat_fmt f;
    CHECK_OK(chat_fmt_init(&f, tk, NULL, err)); // chatml detected from its template
    CHECK_INT(f.kind, CHAT_CHATML);
    CHECK(f.default_system == NULL);
    // deterministic: a second run writes the same bytes
    CHECK_OK(train_small(test_path("again"), 1200, 0, err));
    CHECK_INT(test_sh("cmp '%s/tokenizer.json' '%s/again/tokenizer.json'", dir, test_tmpdir()), 0);
    // compresses its training text
    char *buf;
    size_t n;
    CHECK_OK(lk_read_file(test_path("train.txt"), &buf, &n, err));
    struct tok_ids ids = { 0 };
    CHECK_OK(tok_encode(tk, buf, n, 1, &ids, err));
    CHECK_MSG(ids.n * 2 < n, "%zu tokens for %zu bytes", ids.n, n);
    tok_ids_release(&ids);
    struct texts t = { 0 };
    texts_add_chunked(&t, buf, n, 16384);
    lk_free(buf);
    CHECK(!check_roundtrip(tk, &t));
    if (!node_ready()) {
        texts_free(&t);
        tok_free(tk);
        SKIP("node or build/node (make node-ref) is not there; the trained tokenizer loaded here only");
    }
    CHECK(!compare_with_node(tk, dir, &t));
    texts_free(&t);
    tok_free(tk);
}

TEST(tok_merge_forms_agree)
{
    // merges as "a b" strings (Qwen2.5's files) and as ["a", "b"] pairs give the same ids
    struct lk_err *err = test_err();
    const char *dir = test_path("trained");
    CHECK_OK(train_small(dir, 700, 0, err));
    char *json;
    size_t n;
    char p[1100];
    snprintf(p, sizeof p, "%s/tokenizer.json", dir);
    CHECK_OK(lk_read_file(p, &json, &n, err));
    cJSON *root = cJSON_Parse(json);
    cJSON *merges = cJSON_GetObjectItem(cJSON_GetObjectItem(root, "model"), "merges");
    cJSON *strs = cJSON_CreateArray();
    const cJSON *e;
    cJSON_ArrayForEach(e, merges)
    {
        char s[512];
        snprintf(s, sizeof s, "%s %s", e->child->valuestring, e->child->next->valuestring);
        cJSON_AddItemToArray(strs, cJSON_CreateString(s));
    }
    cJSON_ReplaceItemInObject(cJSON_GetObjectItem(root, "model"), "merges", strs);
    char *json2 = cJSON_PrintUnformatted(root);
    struct tok *a, *b;
    CHECK_OK(tok_load_json(&a, json, n, NULL, "pairs", err));
    CHECK_OK(tok_load_json(&b, json2, strlen(json2), NULL, "strings", err));
    const char *text = "static int tok_encode(struct tok *t) { return 0; } // it's 2024 😀";
    struct tok_ids x = { 0 }, y = { 0 };
    CHECK_OK(tok_encode(a, text, strlen(text), 1, &x, err));
    CHECK_OK(tok_encode(b, text, strlen(text), 1, &y, err));
    CHECK(x.n == y.n && x.n > 5 && !memcmp(x.v, y.v, x.n * sizeof *x.v));
    tok_ids_release(&x);
    tok_ids_release(&y);
    tok_free(a);
    tok_free(b);
    free(json2);
    cJSON_Delete(root);
    lk_free(json);
}

// ---- bad input ----

TEST(tok_rejects_invalid_utf8)
{
    struct lk_err *err = test_err();
    CHECK_OK(train_small(test_path("t"), 400, 0, err));
    struct tok *tk;
    CHECK_OK(tok_load(&tk, test_path("t"), err));
    static const char *bad[] = { "ab\xff", "\xc3", "x\xc0\xaf", "\xed\xa0\x80", "\xf4\x90\x80\x80", "\xe2\x82" };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        struct tok_ids ids = { 0 };
        CHECK_INT(tok_encode(tk, bad[i], strlen(bad[i]), 1, &ids, err), LK_ERR_FORMAT);
        CHECK(strstr(err->msg, "invalid UTF-8 at byte") != NULL);
        tok_ids_release(&ids);
    }
    CHECK(strstr(err->msg, "byte 0") != NULL); // "\xe2\x82" fails at its first byte
    char *s;
    CHECK_INT(tok_nfc("\xff", 1, &s, NULL, err), LK_ERR_FORMAT);
    tok_free(tk);
}

TEST(tok_rejects_truncated_json)
{
    struct lk_err *err = test_err();
    CHECK_OK(train_small(test_path("t"), 400, 0, err));
    char *json;
    size_t n;
    char p[1100];
    snprintf(p, sizeof p, "%s/tokenizer.json", test_path("t"));
    CHECK_OK(lk_read_file(p, &json, &n, err));
    for (size_t cut = 0; cut < n; cut += 1 + cut / 7) { // many offsets, denser at the start
        struct tok *tk = NULL;
        int rc = tok_load_json(&tk, json, cut, NULL, "tokenizer.json", err);
        CHECK_MSG(rc == LK_ERR_FORMAT, "cut at %zu: status %d", cut, rc);
        CHECK(tk == NULL);
        CHECK(strstr(err->msg, "tokenizer.json:") != NULL && strstr(err->msg, "not valid JSON") != NULL);
    }
    // through the file loader too, naming the file
    const char *tp = test_path("trunc.json");
    CHECK_OK(lk_write_file_atomic(tp, json, n / 2, err));
    struct tok *tk;
    CHECK_INT(tok_load(&tk, tp, err), LK_ERR_FORMAT);
    CHECK(strstr(err->msg, "trunc.json") != NULL);
    lk_free(json);
}

TEST(tok_rejects_malformed_and_unsupported)
{
    struct lk_err *err = test_err();
    struct tok *tk;
    static const struct {
        const char *json, *want;
    } cases[] = {
        { "[1, 2]", "no 'model'" },
        { "{\"model\": {\"type\": \"Unigram\", \"vocab\": [[\"a\", 0.0]]}}", "'Unigram' is not supported" },
        { "{\"model\": {\"type\": \"WordPiece\", \"vocab\": {\"a\": 0}}}", "'WordPiece' is not supported" },
        { "{\"model\": {\"type\": \"BPE\", \"vocab\": {\"a\": 0}, \"merges\": []},"
          " \"pre_tokenizer\": {\"type\": \"Metaspace\"}}", "'Metaspace' is not supported" },
        { "{\"model\": {\"type\": \"BPE\", \"vocab\": {\"a\": 0}, \"merges\": []},"
          " \"pre_tokenizer\": {\"type\": \"ByteLevel\"}, \"decoder\": {\"type\": \"ByteLevel\"}}",
          "no token for byte 0x00" },
        { "{\"model\": {\"type\": \"BPE\", \"vocab\": {\"a\": \"x\"}, \"merges\": []}}", "no valid id" },
        { "{\"model\": {\"type\": \"BPE\", \"vocab\": {\"a\": 0}, \"merges\": [\"a\"]}}", "merges[0] is neither" },
        { "{\"model\": {\"type\": \"BPE\", \"vocab\": {\"a\": 0}, \"merges\": []}, \"normalizer\": "
          "{\"type\": \"Lowercase\"}, \"pre_tokenizer\": {\"type\": \"ByteLevel\"}}", "'Lowercase' is not supported" },
        { "{\"model\": {\"type\": \"BPE\", \"vocab\": {\"a\": 0}, \"merges\": []}, \"pre_tokenizer\": "
          "{\"type\": \"Split\", \"pattern\": {\"Regex\": \"(\"}, \"behavior\": \"Isolated\"}}", "does not compile" },
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        int rc = tok_load_json(&tk, cases[i].json, strlen(cases[i].json), NULL, "tj", err);
        CHECK_MSG(rc != LK_OK && strstr(err->msg, cases[i].want), "case %zu: rc %d, message '%s'", i, rc,
                  err->msg);
    }
}

TEST(tok_rejects_merge_with_unknown_token)
{
    struct lk_err *err = test_err();
    CHECK_OK(train_small(test_path("t"), 400, 0, err));
    char *json;
    size_t n;
    char p[1100];
    snprintf(p, sizeof p, "%s/tokenizer.json", test_path("t"));
    CHECK_OK(lk_read_file(p, &json, &n, err));
    cJSON *root = cJSON_Parse(json);
    cJSON *merges = cJSON_GetObjectItem(cJSON_GetObjectItem(root, "model"), "merges");
    CHECK(cJSON_ReplaceItemInArray(cJSON_GetArrayItem(merges, 3), 1, cJSON_CreateString("zzqq")));
    char *bad = cJSON_PrintUnformatted(root);
    struct tok *tk;
    CHECK_INT(tok_load_json(&tk, bad, strlen(bad), NULL, "tokenizer.json", err), LK_ERR_FORMAT);
    CHECK(strstr(err->msg, "merges[3] names unknown token 'zzqq'") != NULL);
    free(bad);
    // a merge whose result is not in the vocab
    const char *pair2[2] = { "q", "q" };
    CHECK(cJSON_ReplaceItemInArray(merges, 3, cJSON_CreateStringArray(pair2, 2)));
    bad = cJSON_PrintUnformatted(root);
    int rc = tok_load_json(&tk, bad, strlen(bad), NULL, "tokenizer.json", err);
    CHECK(rc == LK_ERR_FORMAT || rc == LK_OK); // "qq" may have been learned
    if (rc)
        CHECK(strstr(err->msg, "not in the vocab") != NULL);
    else
        tok_free(tk);
    free(bad);
    cJSON_Delete(root);
    lk_free(json);
}

// ---- chat templates ----

/* The expected layout, written out by hand: texts and special-token names, '+' marking
 * what is trained. */
struct want_part {
    const char *text;    /* text, or NULL */
    const char *special; /* token name, or NULL */
    int trained;
};

static void want_build(struct tok *tk, const struct want_part *w, struct chat_seq *out)
{
    out->n = 0;
    for (; w->text || w->special; w++) {
        struct tok_ids ids = { 0 };
        if (w->special)
            tok_ids_push(&ids, tok_find(tk, w->special), NULL);
        else
            tok_encode(tk, w->text, strlen(w->text), 1, &ids, NULL);
        for (size_t i = 0; i < ids.n; i++) {
            if (out->n == out->cap) {
                out->cap = out->cap ? out->cap * 2 : 256;
                out->ids = lk_realloc(out->ids, out->cap * sizeof *out->ids);
                out->labels = lk_realloc(out->labels, out->cap * sizeof *out->labels);
            }
            out->ids[out->n] = ids.v[i];
            out->labels[out->n++] = w->trained ? ids.v[i] : CHAT_IGNORE;
        }
        tok_ids_release(&ids);
    }
}

static int seq_equal(const struct chat_seq *a, const struct chat_seq *b)
{
    if (a->n != b->n) {
        fprintf(stderr, "    lengths %zu vs %zu\n", a->n, b->n);
        return 0;
    }
    for (size_t i = 0; i < a->n; i++)
        if (a->ids[i] != b->ids[i] || a->labels[i] != b->labels[i]) {
            fprintf(stderr, "    at %zu: id %d/%d label %d/%d\n", i, a->ids[i], b->ids[i], a->labels[i],
                    b->labels[i]);
            return 0;
        }
    return 1;
}

#define P(s) { s, NULL, 0 }
#define T(s) { s, NULL, 1 }
#define S(s) { NULL, s, 0 }
#define ST(s) { NULL, s, 1 }
#define END { NULL, NULL, 0 }

static const char *CHAT_REC = "{\"messages\": [{\"role\": \"system\", \"content\": \"Be brief.\"}, "
                              "{\"role\": \"user\", \"content\": \"What is 2+2?\"}, "
                              "{\"role\": \"assistant\", \"content\": \"It's 4.\"}, "
                              "{\"role\": \"user\", \"content\": \"And 3+3?\"}, "
                              "{\"role\": \"assistant\", \"content\": \"6\"}]}";
static const char *ALPACA_REC = "{\"instruction\": \"Add the numbers.\", \"input\": \"2 and 2\", \"output\": \"4\"}";

static void check_template(struct tok *tk, const char *name, const struct want_part *chat,
                           const struct want_part *alpaca, const struct want_part *prompt)
{
    struct lk_err *err = test_err();
    struct chat_fmt f;
    CHECK_OK(chat_fmt_init(&f, tk, name, err));
    struct chat_seq got = { 0 }, want = { 0 };
    CHECK_OK(chat_encode_json(tk, &f, CHAT_REC, 0, &got, err));
    want_build(tk, chat, &want);
    CHECK_MSG(seq_equal(&got, &want), "%s: chat record", name);
    CHECK_OK(chat_encode_json(tk, &f, ALPACA_REC, 0, &got, err));
    want_build(tk, alpaca, &want);
    CHECK_MSG(seq_equal(&got, &want), "%s: alpaca record", name);
    // train on everything: same ids, every label set
    CHECK_OK(chat_encode_json(tk, &f, ALPACA_REC, CHAT_TRAIN_ALL, &got, err));
    CHECK(got.n == want.n);
    for (size_t i = 0; i < got.n; i++)
        CHECK(got.labels[i] == got.ids[i] && got.ids[i] == want.ids[i]);
    // the generation prompt for the alpaca question
    struct tok_ids ids = { 0 };
    CHECK_OK(chat_prompt_json(tk, &f, ALPACA_REC, &ids, err));
    want_build(tk, prompt, &want);
    CHECK(ids.n == want.n && !memcmp(ids.v, want.ids, ids.n * sizeof *ids.v));
    CHECK(chat_is_stop(&f, f.eot) && !chat_is_stop(&f, ids.v[ids.n - 1]));
    // no assistant turn: an error
    CHECK_INT(chat_encode_json(tk, &f, "{\"messages\": [{\"role\": \"user\", \"content\": \"hi\"}]}", 0, &got, err),
              LK_ERR_FORMAT);
    CHECK(strstr(err->msg, "no assistant turn") != NULL);
    CHECK_INT(chat_encode_json(tk, &f, "{\"instruction\": \"hi\"}", 0, &got, err), LK_ERR_FORMAT);
    CHECK(strstr(err->msg, "'output'") != NULL);
    CHECK_INT(chat_encode_json(tk, &f, "{\"messages\": [{\"role\": \"bot\", \"content\": \"x\"}, "
                                       "{\"role\": \"assistant\", \"content\": \"y\"}]}", 0, &got, err),
              LK_ERR_FORMAT);
    CHECK(strstr(err->msg, "role 'bot'") != NULL);
    chat_seq_release(&got);
    chat_seq_release(&want);
    tok_ids_release(&ids);
}

TEST(tok_chat_chatml_labels)
{
    struct lk_err *err = test_err();
    CHECK_OK(train_small(test_path("t"), 600, 0, err));
    struct tok *tk;
    CHECK_OK(tok_load(&tk, test_path("t"), err));
    const struct want_part chat[] = {
        S("<|im_start|>"), P("system\nBe brief."), S("<|im_end|>"), P("\n"),
        S("<|im_start|>"), P("user\nWhat is 2+2?"), S("<|im_end|>"), P("\n"),
        S("<|im_start|>"), P("assistant\n"), T("It's 4."), ST("<|im_end|>"), P("\n"),
        S("<|im_start|>"), P("user\nAnd 3+3?"), S("<|im_end|>"), P("\n"),
        S("<|im_start|>"), P("assistant\n"), T("6"), ST("<|im_end|>"), P("\n"), END,
    };
    const struct want_part alpaca[] = {
        S("<|im_start|>"), P("user\nAdd the numbers.\n\n2 and 2"), S("<|im_end|>"), P("\n"),
        S("<|im_start|>"), P("assistant\n"), T("4"), ST("<|im_end|>"), P("\n"), END,
    };
    const struct want_part prompt[] = {
        S("<|im_start|>"), P("user\nAdd the numbers.\n\n2 and 2"), S("<|im_end|>"), P("\n"),
        S("<|im_start|>"), P("assistant\n"), END,
    };
    check_template(tk, "chatml", chat, alpaca, prompt);
    if (test_failed())
        return;
    struct chat_fmt f;
    CHECK_OK(chat_fmt_init(&f, tk, "chatml", err));
    CHECK(f.n_stop == 2 && f.stop[0] == tok_find(tk, "<|im_end|>") && f.stop[1] == tok_find(tk, "<|endoftext|>"));
    tok_free(tk);
}

TEST(tok_chat_qwen25_default_system)
{
    // Qwen2.5's template writes a system turn when there is none; detected from its text
    struct lk_err *err = test_err();
    CHECK_OK(train_small(test_path("t"), 500, 0, err));
    char p[1100];
    snprintf(p, sizeof p, "%s/tokenizer.json", test_path("t"));
    char *json;
    size_t n;
    CHECK_OK(lk_read_file(p, &json, &n, err));
    const char *cfg = "{\"eos_token\": \"<|im_end|>\", \"chat_template\": \"{%- if messages[0]['role'] == "
                      "'system' %}{{- '<|im_start|>system\\\\n' + messages[0]['content'] + '<|im_end|>\\\\n' }}"
                      "{%- else %}{{- '<|im_start|>system\\\\nYou are Qwen, created by Alibaba Cloud. You are a "
                      "helpful assistant.<|im_end|>\\\\n' }}{%- endif %}\"}";
    struct tok *tk;
    CHECK_OK(tok_load_json(&tk, json, n, cfg, "q25", err));
    struct chat_fmt f;
    CHECK_OK(chat_fmt_init(&f, tk, NULL, err));
    CHECK_INT(f.kind, CHAT_CHATML);
    CHECK(f.default_system && !strcmp(f.default_system, "You are Qwen, created by Alibaba Cloud. You are a "
                                                        "helpful assistant."));
    struct chat_seq got = { 0 }, want = { 0 };
    CHECK_OK(chat_encode_json(tk, &f, "{\"instruction\": \"Hi\", \"output\": \"Hello\"}", 0, &got, err));
    const struct want_part w[] = {
        S("<|im_start|>"), P("system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant."),
        S("<|im_end|>"), P("\n"), S("<|im_start|>"), P("user\nHi"), S("<|im_end|>"), P("\n"),
        S("<|im_start|>"), P("assistant\n"), T("Hello"), ST("<|im_end|>"), P("\n"), END,
    };
    want_build(tk, w, &want);
    CHECK(seq_equal(&got, &want));
    // an explicit system turn replaces it
    CHECK_OK(chat_encode_json(tk, &f, CHAT_REC, 0, &got, err));
    char *s;
    CHECK_OK(tok_decode(tk, got.ids, got.n, 0, &s, NULL, err));
    CHECK(strstr(s, "Alibaba") == NULL && strncmp(s, "<|im_start|>system\nBe brief.", 28) == 0);
    lk_free(s);
    chat_seq_release(&got);
    chat_seq_release(&want);
    tok_free(tk);
    lk_free(json);
}

TEST(tok_chat_llama3_labels)
{
    struct lk_err *err = test_err();
    CHECK_OK(train_small(test_path("t"), 600, 1, err));
    struct tok *tk;
    CHECK_OK(tok_load(&tk, test_path("t"), err));
    const struct want_part chat[] = {
        S("<|begin_of_text|>"),
        S("<|start_header_id|>"), P("system"), S("<|end_header_id|>"), P("\n\nBe brief."), S("<|eot_id|>"),
        S("<|start_header_id|>"), P("user"), S("<|end_header_id|>"), P("\n\nWhat is 2+2?"), S("<|eot_id|>"),
        S("<|start_header_id|>"), P("assistant"), S("<|end_header_id|>"), P("\n\n"), T("It's 4."), ST("<|eot_id|>"),
        S("<|start_header_id|>"), P("user"), S("<|end_header_id|>"), P("\n\nAnd 3+3?"), S("<|eot_id|>"),
        S("<|start_header_id|>"), P("assistant"), S("<|end_header_id|>"), P("\n\n"), T("6"), ST("<|eot_id|>"), END,
    };
    const struct want_part alpaca[] = {
        S("<|begin_of_text|>"),
        S("<|start_header_id|>"), P("user"), S("<|end_header_id|>"), P("\n\nAdd the numbers.\n\n2 and 2"),
        S("<|eot_id|>"),
        S("<|start_header_id|>"), P("assistant"), S("<|end_header_id|>"), P("\n\n"), T("4"), ST("<|eot_id|>"), END,
    };
    const struct want_part prompt[] = {
        S("<|begin_of_text|>"),
        S("<|start_header_id|>"), P("user"), S("<|end_header_id|>"), P("\n\nAdd the numbers.\n\n2 and 2"),
        S("<|eot_id|>"), S("<|start_header_id|>"), P("assistant"), S("<|end_header_id|>"), P("\n\n"), END,
    };
    check_template(tk, "llama3", chat, alpaca, prompt);
    tok_free(tk);
}

TEST(tok_chat_plain_labels)
{
    struct lk_err *err = test_err();
    CHECK_OK(train_small(test_path("t"), 600, 0, err));
    struct tok *tk;
    CHECK_OK(tok_load(&tk, test_path("t"), err));
    const struct want_part chat[] = {
        P("Be brief.\n\n### Instruction:\nWhat is 2+2?\n\n### Response:\n"), T("It's 4."), ST("<|im_end|>"),
        P("### Instruction:\nAnd 3+3?\n\n### Response:\n"), T("6"), ST("<|im_end|>"), END,
    };
    const struct want_part alpaca[] = {
        P("### Instruction:\nAdd the numbers.\n\n2 and 2\n\n### Response:\n"), T("4"), ST("<|im_end|>"), END,
    };
    const struct want_part prompt[] = {
        P("### Instruction:\nAdd the numbers.\n\n2 and 2\n\n### Response:\n"), END,
    };
    check_template(tk, "plain", chat, alpaca, prompt);
    tok_free(tk);
}

TEST(tok_chat_labels_are_exactly_the_answer)
{
    // labels cover the assistant content and its end-of-turn token, on real answers
    const char *path = test_shared(QWEN);
    if (!path)
        SKIP("shared/data/tokenizers/qwen3 is not there");
    struct lk_err *err = test_err();
    struct tok *tk;
    CHECK_OK(tok_load(&tk, path, err));
    static const char *names[] = { "chatml", "plain" };
    static const char *answers[] = { "Glaucoma is a group of diseases.", "  leading spaces\n\nand lines\n",
                                     "高血压病人可以口服党参的。", "\n\nstarts with newlines", "😀 ok" };
    for (int k = 0; k < 2; k++) {
        struct chat_fmt f;
        CHECK_OK(chat_fmt_init(&f, tk, names[k], err));
        for (size_t a = 0; a < sizeof answers / sizeof answers[0]; a++) {
            struct chat_seq s = { 0 };
            CHECK_OK(chat_encode_alpaca(tk, &f, "What is glaucoma?", NULL, answers[a], 0, &s, err));
            struct tok_ids want = { 0 };
            CHECK_OK(tok_encode(tk, answers[a], strlen(answers[a]), 1, &want, err));
            tok_ids_push(&want, f.eot, err);
            size_t first = 0, n_trained = 0, last = 0;
            while (first < s.n && s.labels[first] == CHAT_IGNORE)
                first++;
            for (size_t i = 0; i < s.n; i++)
                if (s.labels[i] != CHAT_IGNORE) {
                    n_trained++;
                    last = i;
                }
            CHECK_MSG(n_trained == want.n && last - first + 1 == n_trained,
                      "%s, answer %zu: %zu trained tokens, want %zu in one span", names[k], a, n_trained, want.n);
            for (size_t i = 0; i < want.n; i++)
                CHECK(s.labels[first + i] == want.v[i] && s.ids[first + i] == want.v[i]);
            chat_seq_release(&s);
            tok_ids_release(&want);
        }
    }
    tok_free(tk);
}

// ---- commands ----

TEST(tok_cli_train_and_tokenize)
{
    const char *lk = test_lorakit();
    struct lk_err *err = test_err();
    struct texts t = { 0 };
    add_sources(&t);
    FILE *f = fopen(test_path("a.txt"), "w");
    for (int i = 0; i < t.n; i++)
        fwrite(t.v[i], 1, t.len[i], f);
    fclose(f);
    texts_free(&t);
    CHECK_INT(test_sh("%s tokenizer train --text '%s' --vocab 500 --out '%s'", lk, test_path("a.txt"),
                      test_path("tk")), 0);
    struct tok *tk;
    CHECK_OK(tok_load(&tk, test_path("tk"), err));
    struct tok_ids ids = { 0 };
    CHECK_OK(tok_encode(tk, "int main(void)", 14, 1, &ids, err));
    char want[256];
    size_t k = 0;
    for (size_t i = 0; i < ids.n; i++)
        k += (size_t)snprintf(want + k, sizeof want - k, i ? " %d" : "%d", ids.v[i]);
    CHECK_INT(test_sh("%s tokenize --tokenizer '%s' --text 'int main(void)'", lk, test_path("tk")), 0);
    CHECK_MSG(!strncmp(test_output(), want, k) && test_output()[k] == '\n', "got '%s', want '%s'",
              test_output(), want);
    CHECK_INT(test_sh("%s tokenize --tokenizer '%s' --text '%s' --decode", lk, test_path("tk"), want), 0);
    CHECK(!strcmp(test_output(), "int main(void)\n"));
    CHECK_INT(test_sh("%s tokenize --tokenizer '%s' --text 'ab' --json", lk, test_path("tk")), 0);
    CHECK(test_output()[0] == '[');
    CHECK_INT(test_sh("%s tokenize --tokenizer '%s' --template chatml --text '{\"instruction\": \"Q\", "
                      "\"output\": \"A\"}'", lk, test_path("tk")), 0);
    CHECK_MSG(strstr(test_output(), "[[A<|im_end|>]]") != NULL, "got '%s'", test_output());
    // errors: a bad flag value, invalid UTF-8, a missing tokenizer, a record with no answer
    CHECK_INT(test_sh("%s tokenizer train --text '%s' --vocab abc --out x", lk, test_path("a.txt")), 2);
    CHECK_INT(test_sh("%s tokenize --tokenizer '%s' --text \"$(printf 'a\\377')\"", lk, test_path("tk")), 1);
    CHECK(strstr(test_output(), "lorakit tokenize: error: ") && strstr(test_output(), "invalid UTF-8"));
    CHECK_INT(test_sh("%s tokenize --tokenizer '%s/nope' --text a", lk, test_tmpdir()), 1);
    CHECK_INT(test_sh("%s tokenize --tokenizer '%s' --template chatml --text '{\"instruction\": \"Q\"}'", lk,
                      test_path("tk")), 1);
    CHECK_INT(test_sh("%s tokenize --help", lk), 0);
    CHECK(strstr(test_output(), "example") || strstr(test_output(), "Example"));
    CHECK_INT(test_sh("%s tokenizer --help", lk), 0);
    tok_ids_release(&ids);
    tok_free(tk);
}

TEST(tok_allocation_failures_are_clean)
{
    // every allocation of load, encode and a chat record fails in turn: the only outcomes
    // are success or LK_ERR_NOMEM (leaks show under SAN=1)
    struct lk_err *err = test_err();
    CHECK_OK(train_small(test_path("t"), 400, 0, err));
    char p[1100];
    snprintf(p, sizeof p, "%s/tokenizer.json", test_path("t"));
    char *json;
    size_t n;
    CHECK_OK(lk_read_file(p, &json, &n, err));
    const char *cfg = "{\"eos_token\": \"<|im_end|>\", \"chat_template\": \"<|im_start|>\"}";
    const char *text = "Hello <|im_end|> world, it's 2024 😀 e\xcc\x81";
    int ok = 0;
    for (long k = 1; k < 2000 && !ok; k++) {
        struct tok *tk = NULL;
        struct tok_ids ids = { 0 };
        struct chat_seq s = { 0 };
        struct chat_fmt f;
        lk_fail_countdown = k;
        int rc = tok_load_json(&tk, json, n, cfg, "t", err);
        if (!rc)
            rc = tok_encode(tk, text, strlen(text), 1, &ids, err);
        if (!rc)
            rc = chat_fmt_init(&f, tk, NULL, err);
        if (!rc)
            rc = chat_encode_json(tk, &f, "{\"instruction\": \"Q\", \"output\": \"A\"}", 0, &s, err);
        ok = lk_fail_countdown > 0; // the countdown never reached zero: nothing failed
        lk_fail_countdown = 0;
        CHECK_MSG(rc == LK_OK || rc == LK_ERR_NOMEM, "allocation %ld: status %d (%s)", k, rc, err->msg);
        CHECK(ok ? rc == LK_OK : 1);
        tok_ids_release(&ids);
        chat_seq_release(&s);
        tok_free(tk);
    }
    CHECK(ok);
    lk_free(json);
}

TEST(tok_other_byte_level_styles_match_reference)
{
    // the same vocab under GPT-2's pre-tokenizer (ByteLevel with its own regex, with and
    // without a prefix space) and Llama 3's (its Split regex, ignore_merges, no normalizer)
    if (!node_ready())
        SKIP("node or build/node (make node-ref) is not there");
    struct lk_err *err = test_err();
    const char *dir = test_path("trained");
    CHECK_OK(train_small(dir, 900, 0, err));
    char p[1200];
    snprintf(p, sizeof p, "%s/tokenizer.json", dir);
    char *json;
    size_t n;
    CHECK_OK(lk_read_file(p, &json, &n, err));
    static const char *variants[] = {
        "{\"type\": \"ByteLevel\", \"add_prefix_space\": false, \"trim_offsets\": true, \"use_regex\": true}",
        "{\"type\": \"ByteLevel\", \"add_prefix_space\": true, \"trim_offsets\": true, \"use_regex\": true}",
        "{\"type\": \"Sequence\", \"pretokenizers\": [{\"type\": \"Split\", \"pattern\": {\"Regex\": "
        "\"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\\\r\\\\n\\\\p{L}\\\\p{N}]?\\\\p{L}+|\\\\p{N}{1,3}| ?[^\\\\s\\\\p{L}"
        "\\\\p{N}]+[\\\\r\\\\n]*|\\\\s*[\\\\r\\\\n]+|\\\\s+(?!\\\\S)|\\\\s+\"}, \"behavior\": \"Isolated\", "
        "\"invert\": false}, {\"type\": \"ByteLevel\", \"add_prefix_space\": false, \"trim_offsets\": true, "
        "\"use_regex\": false}]}",
    };
    struct texts t = { 0 };
    add_synthetic(&t, 60);
    add_file(&t, "libcore/tok.c", 60000);
    for (size_t v = 0; v < sizeof variants / sizeof variants[0]; v++) {
        cJSON *root = cJSON_Parse(json);
        cJSON *pt = cJSON_Parse(variants[v]);
        CHECK_MSG(pt != NULL, "variant %zu is not JSON", v);
        CHECK(cJSON_ReplaceItemInObject(root, "pre_tokenizer", pt));
        if (v == 2) {
            cJSON_ReplaceItemInObject(root, "normalizer", cJSON_CreateNull());
            cJSON_ReplaceItemInObject(cJSON_GetObjectItem(root, "model"), "ignore_merges", cJSON_CreateTrue());
        }
        char *out = cJSON_PrintUnformatted(root);
        char vdir[1024];
        snprintf(vdir, sizeof vdir, "%s/v%zu", test_tmpdir(), v);
        CHECK_OK(lk_mkdir_p(vdir, err));
        snprintf(p, sizeof p, "%s/tokenizer.json", vdir);
        CHECK_OK(lk_write_file_atomic(p, out, strlen(out), err));
        struct tok *tk;
        CHECK_OK(tok_load(&tk, vdir, err));
        CHECK_MSG(!compare_with_node(tk, vdir, &t), "variant %zu", v);
        struct tok_ids ids = { 0 };
        CHECK_OK(tok_encode(tk, "Hello", 5, 1, &ids, err));
        size_t len;
        const char *first = tok_piece(tk, ids.v[0], &len);
        CHECK_MSG((first[0] == ' ') == (v == 1), "variant %zu: prefix space is %s", v, v == 1 ? "missing" : "there");
        tok_ids_release(&ids);
        tok_free(tk);
        free(out);
        cJSON_Delete(root);
    }
    texts_free(&t);
    lk_free(json);
}

// ---- the trainer's progress goes through a callback (libcore prints nothing) ----

struct progress_log {
    int n, first_stage, last_stage, last_merges, last_vocab, specials, monotone;
    size_t words;
};

static void log_progress(void *ctx, const struct tok_train_progress *p)
{
    struct progress_log *l = ctx;
    if (!l->n++) {
        l->first_stage = (int)p->stage;
        l->words = p->words;
    }
    if (p->stage != TOK_TRAIN_COUNTED)
        l->monotone &= p->merges >= l->last_merges && p->vocab == 256 + p->merges;
    l->last_stage = (int)p->stage;
    l->last_merges = p->merges;
    l->last_vocab = p->vocab;
    l->specials = p->specials;
}

TEST(tok_train_reports_progress_through_the_callback)
{
    const char *path = test_path("corpus.txt");
    FILE *f = fopen(path, "w");
    CHECK(f != NULL);
    struct lk_rng rng;
    lk_rng_seed(&rng, 7);
    for (int i = 0; i < 3000; i++) { // words of 3 to 8 letters from 14: many distinct, pairs repeat
        for (int w = 0; w < 8; w++) {
            int len = 3 + (int)(lk_rng_u64(&rng) % 6);
            fputc(' ', f);
            for (int k = 0; k < len; k++)
                fputc("etaoinshrdlucm"[lk_rng_u64(&rng) % 14], f);
        }
        fputc('\n', f);
    }
    fclose(f);
    const char *files[] = { path };
    struct progress_log log = { .monotone = 1 };
    const struct tok_train_hooks hooks = { &log, log_progress };
    struct tok_train_opts o = { files, 1, 1400, NULL, 0, &hooks };
    CHECK_OK(tok_train(&o, test_path("tok"), test_err()));
    CHECK_INT(log.first_stage, TOK_TRAIN_COUNTED);
    CHECK_INT(log.last_stage, TOK_TRAIN_DONE);
    CHECK_MSG(log.words > 1000 && log.monotone && log.specials == 3, "%zu words, monotone %d, %d specials", log.words,
              log.monotone, log.specials);
    CHECK_MSG(log.n >= 3 && log.last_merges >= 1000, "%d calls, %d merges", log.n, log.last_merges);
    // the figures are those of the file written: as many merges and ids
    char *text = NULL;
    CHECK_OK(lk_read_file(test_path("tok/tokenizer.json"), &text, NULL, test_err()));
    cJSON *j = cJSON_Parse(text);
    lk_free(text);
    CHECK(j != NULL);
    const cJSON *model = cJSON_GetObjectItem(j, "model");
    CHECK_INT(cJSON_GetArraySize(cJSON_GetObjectItem(model, "merges")), log.last_merges);
    CHECK_INT(cJSON_GetArraySize(cJSON_GetObjectItem(model, "vocab")), log.last_vocab);
    cJSON_Delete(j);
}
