/*
 * test_gguf.c - GGUF export and llama.cpp itself as the test peer.
 *
 * Without the peer: the writer's bytes against the layout of ggml's docs/gguf.md built here by
 * hand, q8_0 against blocks worked by hand, the reader on truncated and corrupted files (every
 * failure names the file and the problem), the exported metadata against config.json and
 * tokenizer.json read independently, Llama's q/k permutation against convert_hf_to_gguf.py's
 * reshape/swapaxes written out as index arithmetic, bounded memory while streaming, and the
 * refusals (what llama.cpp or GGUF LoRA cannot express) with no output left behind.
 *
 * With the peer (node-llama-cpp 3.21.1, `make llama-ref`; skipped without it): the shipped base
 * model, an untied Llama model, a lorakit-trained LoRA (as GGUF LoRA on the base GGUF) and a
 * lorakit-merged model run in llama.cpp: token ids equal to `lorakit tokenize` on 140 texts
 * (special tokens, CRLF, CJK, emoji), greedy continuations equal to lorakit's, next-token
 * log-probabilities over the whole vocabulary within 1e-4 of `lorakit logits`; f16, bf16 and q8_0
 * measured (greedy agreement and log-prob error printed).
 */
#include "test.h"

#include <cjson/cJSON.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "../libcore/gguf.h"
#include "../libcore/lk.h"
#include "../libcore/lora.h"
#include "../libcore/model.h"
#include "../libcore/st.h"
#include "../libcore/tensor.h"
#include "../libcore/tok.h"
#include "fix_gguf.h"

// ---- format and conversion (no peer) ----

TEST(gguf_q8_0_hand_worked)
{
    // x_j = j / 2 for j = 0..31: amax 15.5, d = 15.5 / 127, q_j = round(j * 127 / 31)
    float x[32], back[32];
    uint8_t blk[GGUF_Q8_0_BYTES];
    for (int j = 0; j < 32; j++)
        x[j] = (float)j * 0.5f;
    CHECK_INT(gguf_from_f32(blk, GGUF_T_Q8_0, x, 32), GGUF_Q8_0_BYTES);
    CHECK_INT(blk[0] | blk[1] << 8, tensor_f32_to_f16(15.5f / 127.0f));
    for (int j = 0; j < 32; j++)
        CHECK_INT((int8_t)blk[2 + j], (2 * j * 127 + 31) / 62); // round(j * 127 / 31), never a tie
    gguf_to_f32(back, GGUF_T_Q8_0, blk, 32);
    float d = tensor_f16_to_f32(tensor_f32_to_f16(15.5f / 127.0f));
    for (int j = 0; j < 32; j++)
        CHECK(back[j] == d * (float)((2 * j * 127 + 31) / 62));
    // negative values round away from zero, like roundf; a zero block has d = 0 and q = 0
    for (int j = 0; j < 32; j++)
        x[j] = j == 0 ? -127.0f : j == 1 ? -0.5f : j == 2 ? 0.5f : j == 3 ? -1.5f : 0.0f;
    gguf_from_f32(blk, GGUF_T_Q8_0, x, 32);
    CHECK_INT(blk[0] | blk[1] << 8, tensor_f32_to_f16(1.0f));
    CHECK_INT((int8_t)blk[2], -127);
    CHECK_INT((int8_t)blk[3], -1);
    CHECK_INT((int8_t)blk[4], 1);
    CHECK_INT((int8_t)blk[5], -2);
    memset(x, 0, sizeof x);
    gguf_from_f32(blk, GGUF_T_Q8_0, x, 32);
    for (int j = 0; j < GGUF_Q8_0_BYTES; j++)
        CHECK_INT(blk[j], 0);
    // random blocks: every value within half a step (plus the f16 rounding of d) of the input
    struct lk_rng rng;
    lk_rng_seed(&rng, 3);
    for (int b = 0; b < 200; b++) {
        float amax = 0;
        for (int j = 0; j < 32; j++) {
            x[j] = lk_rng_normal(&rng) * (b % 7 + 1) * 0.01f;
            amax = fmaxf(amax, fabsf(x[j]));
        }
        gguf_from_f32(blk, GGUF_T_Q8_0, x, 32);
        gguf_to_f32(back, GGUF_T_Q8_0, blk, 32);
        float dd = tensor_f16_to_f32((uint16_t)(blk[0] | blk[1] << 8));
        for (int j = 0; j < 32; j++)
            CHECK(fabsf(back[j] - x[j]) <= dd / 2 + fabsf(dd - amax / 127) * 127 + 1e-7f);
    }
}

/* Appends little-endian integers and GGUF strings to a byte buffer (the expected file). */
static void le(struct lk_buf *b, uint64_t v, int n)
{
    for (int i = 0; i < n; i++) {
        char c = (char)(v >> (8 * i) & 0xff);
        lk_buf_put(b, &c, 1);
    }
}

static void gstr(struct lk_buf *b, const char *s)
{
    le(b, strlen(s), 8);
    lk_buf_puts(b, s);
}

/* A small file through the writer: one value of each kind the exporter uses, two tensors. */
static int write_small(const char *path, struct lk_err *err)
{
    struct gguf_writer w;
    const char *toks[] = { "a", "\xc4\xa0" "b" };
    int32_t types[] = { 1, 3 };
    float d0[3] = { 1.5f, -2.0f, 0.25f }, d1[64];
    for (int i = 0; i < 64; i++)
        d1[i] = (float)(i - 32) / 8;
    gguf_writer_init(&w, path, err);
    gguf_writer_str(&w, "general.architecture", "llama");
    gguf_writer_u32(&w, "llama.block_count", 7);
    gguf_writer_f32(&w, "llama.rope.freq_base", 10000.0f);
    gguf_writer_bool(&w, "tokenizer.ggml.add_bos_token", 1);
    gguf_writer_arr_str(&w, "tokenizer.ggml.tokens", toks, NULL, 2);
    gguf_writer_arr_i32(&w, "tokenizer.ggml.token_type", types, 2);
    int64_t ne0[1] = { 3 }, ne1[2] = { 32, 2 };
    gguf_writer_declare(&w, "a.weight", GGUF_T_F32, 1, ne0);
    gguf_writer_declare(&w, "b.weight", GGUF_T_Q8_0, 2, ne1);
    gguf_writer_begin(&w);
    gguf_writer_write(&w, d0, 3);
    gguf_writer_write(&w, d1, 32); // in two pieces of whole blocks
    gguf_writer_write(&w, d1 + 32, 32);
    return gguf_writer_commit(&w);
}

TEST(gguf_writer_bytes_match_spec)
{
    TMPPATH(path, "small.gguf");
    CHECK_OK(write_small(path, test_err()));
    // the expected bytes, built from the published layout
    struct lk_buf e = { 0 };
    lk_buf_put(&e, "GGUF", 4);
    le(&e, 3, 4);
    le(&e, 2, 8); // tensors
    le(&e, 6, 8); // keys
    gstr(&e, "general.architecture");
    le(&e, 8, 4);
    gstr(&e, "llama");
    gstr(&e, "llama.block_count");
    le(&e, 4, 4);
    le(&e, 7, 4);
    gstr(&e, "llama.rope.freq_base");
    le(&e, 6, 4);
    le(&e, 0x461c4000, 4); // 10000.0f
    gstr(&e, "tokenizer.ggml.add_bos_token");
    le(&e, 7, 4);
    le(&e, 1, 1);
    gstr(&e, "tokenizer.ggml.tokens");
    le(&e, 9, 4);
    le(&e, 8, 4);
    le(&e, 2, 8);
    gstr(&e, "a");
    gstr(&e, "\xc4\xa0" "b");
    gstr(&e, "tokenizer.ggml.token_type");
    le(&e, 9, 4);
    le(&e, 5, 4);
    le(&e, 2, 8);
    le(&e, 1, 4);
    le(&e, 3, 4);
    gstr(&e, "a.weight");
    le(&e, 1, 4);
    le(&e, 3, 8);
    le(&e, 0, 4);
    le(&e, 0, 8);
    gstr(&e, "b.weight");
    le(&e, 2, 4);
    le(&e, 32, 8);
    le(&e, 2, 8);
    le(&e, 8, 4);
    le(&e, 32, 8); // 12 bytes of a.weight padded to 32
    size_t header = e.n;
    char *buf;
    size_t n;
    CHECK_OK(lk_read_file(path, &buf, &n, test_err()));
    size_t data = (header + 31) / 32 * 32;
    // a.weight: 12 bytes padded to 32; b.weight: two q8_0 blocks, 68 bytes padded to 96
    int same = n == data + 32 + 96 && !memcmp(buf, e.p, header);
    for (size_t i = header; same && i < data; i++)
        same = buf[i] == 0;
    float f;
    memcpy(&f, buf + data + 4, 4);
    same = same && f == -2.0f && (unsigned char)buf[data + 32 + 2] == (unsigned char)(int8_t)-127;
    lk_free(buf);
    lk_buf_release(&e);
    CHECK_MSG(same, "small.gguf does not have the bytes of the published layout (%zu bytes)", n);
    // and the reader gives the values back
    struct gguf_file g;
    CHECK_OK(gguf_open(&g, path, test_err()));
    uint64_t u;
    double fl;
    int bo;
    char *s;
    CHECK_OK(gguf_get_uint(&g, "llama.block_count", &u, test_err()));
    CHECK_OK(gguf_get_float(&g, "llama.rope.freq_base", &fl, test_err()));
    CHECK_OK(gguf_get_bool(&g, "tokenizer.ggml.add_bos_token", &bo, test_err()));
    CHECK_OK(gguf_get_str(&g, "general.architecture", &s, test_err()));
    CHECK(u == 7 && fl == 10000.0 && bo == 1 && !strcmp(s, "llama"));
    lk_free(s);
    const struct gguf_kv *kv = gguf_find_kv(&g, "tokenizer.ggml.tokens");
    CHECK(kv && kv->n == 2 && gguf_arr_str(kv, 1).n == 3 && !memcmp(gguf_arr_str(kv, 1).p, "\xc4\xa0" "b", 3));
    CHECK(gguf_arr_num(gguf_find_kv(&g, "tokenizer.ggml.token_type"), 1) == 3);
    CHECK(gguf_get_uint(&g, "general.architecture", &u, test_err()) == LK_ERR_FORMAT);
    CHECK(strstr(test_errmsg(), "general.architecture") && strstr(test_errmsg(), "str"));
    const struct gguf_tensor *t = gguf_find_tensor(&g, "b.weight");
    float rows[64];
    CHECK(t && t->type == GGUF_T_Q8_0 && t->ne[0] == 32 && t->ne[1] == 2 && t->offset == 32);
    CHECK_OK(gguf_tensor_rows_f32(&g, t, 1, 1, rows, test_err()));
    CHECK_NEAR(rows[31], 31.0 / 8, 0.02);
    gguf_close(&g);
}

/* Every failure must be an error naming the file, never a crash or a silent success. */
static int expect_fail(const void *buf, size_t n, const char *want)
{
    struct gguf_file g;
    struct lk_err err = { 0 };
    if (gguf_open_buffer(&g, buf, n, "bad.gguf", &err) == LK_OK) {
        gguf_close(&g);
        fprintf(stderr, "    accepted (wanted '%s')\n", want);
        return 1;
    }
    if (!strstr(err.msg, "bad.gguf") || (want && !strstr(err.msg, want))) {
        fprintf(stderr, "    message '%s' (wanted '%s')\n", err.msg, want ? want : "the file name");
        return 1;
    }
    return 0;
}

TEST(gguf_reader_rejects_truncated_and_corrupt)
{
    TMPPATH(path, "small.gguf");
    CHECK_OK(write_small(path, test_err()));
    char *buf;
    size_t n;
    CHECK_OK(lk_read_file(path, &buf, &n, test_err()));
    struct gguf_file g;
    CHECK_OK(gguf_open_buffer(&g, buf, n, "ok.gguf", test_err()));
    size_t data = g.data_off, end = data + (size_t)g.t[1].offset + g.t[1].nbytes;
    gguf_close(&g);
    // every file cut before the end of the last tensor's data fails; the last tensor's padding
    // is not needed (llama.cpp reads only the bytes of each tensor either)
    for (size_t cut = 0; cut < end; cut++)
        CHECK_MSG(!expect_fail(buf, cut, NULL), "truncated at %zu of %zu", cut, n);
    for (size_t cut = end; cut < n; cut++) {
        CHECK_OK(gguf_open_buffer(&g, buf, cut, "ok.gguf", test_err()));
        gguf_close(&g);
    }
    // flipping any header bit: an error naming the file, or a file that still validates
    int rejected = 0;
    for (size_t i = 0; i < data; i++)
        for (int bit = 0; bit < 8; bit++) {
            buf[i] ^= (char)(1 << bit);
            struct lk_err err = { 0 };
            if (gguf_open_buffer(&g, buf, n, "bad.gguf", &err) == LK_OK) {
                for (int64_t k = 0; k < g.n_tensors; k++) { // still readable in bounds
                    if (!g.t[k].ne[0])
                        continue;
                    float *tmp = malloc(sizeof(float) * (g.t[k].numel + 1));
                    struct lk_err e2 = { 0 };
                    gguf_tensor_rows_f32(&g, &g.t[k], 0, (int64_t)(g.t[k].numel / (size_t)g.t[k].ne[0]), tmp, &e2);
                    free(tmp);
                }
                gguf_close(&g);
            } else {
                rejected++;
                CHECK_MSG(strstr(err.msg, "bad.gguf") != NULL, "byte %zu bit %d: '%s'", i, bit, err.msg);
            }
            buf[i] ^= (char)(1 << bit);
        }
    fprintf(stderr, "    %d of %zu single-bit header flips rejected, the rest still valid files\n", rejected, data * 8);
    CHECK(rejected > (int)data * 4);
    lk_free(buf);
}

/* A hand-made file: header, the given kv bytes, tensor infos, padding, data. */
static size_t mk(char *out, int nt, int nkv, const struct lk_buf *kv, const struct lk_buf *ti, size_t data_len)
{
    struct lk_buf b = { 0 };
    lk_buf_put(&b, "GGUF", 4);
    le(&b, 3, 4);
    le(&b, (uint64_t)nt, 8);
    le(&b, (uint64_t)nkv, 8);
    if (kv)
        lk_buf_put(&b, kv->p, kv->n);
    if (ti)
        lk_buf_put(&b, ti->p, ti->n);
    while (b.n % 32)
        le(&b, 0, 1);
    for (size_t i = 0; i < data_len; i++)
        le(&b, 0, 1);
    memcpy(out, b.p, b.n);
    size_t n = b.n;
    lk_buf_release(&b);
    return n;
}

/* One tensor info. */
static void tinfo(struct lk_buf *b, const char *name, int nd, const int64_t *ne, uint32_t type, uint64_t off)
{
    gstr(b, name);
    le(b, (uint64_t)nd, 4);
    for (int d = 0; d < nd; d++)
        le(b, (uint64_t)ne[d], 8);
    le(b, type, 4);
    le(b, off, 8);
}

TEST(gguf_reader_names_each_problem)
{
    static char f[4096];
    struct lk_buf kv = { 0 }, ti = { 0 };
    size_t n = mk(f, 0, 0, NULL, NULL, 0);
    memcpy(f, "GGUX", 4);
    CHECK(!expect_fail(f, n, "not a GGUF file"));
    n = mk(f, 0, 0, NULL, NULL, 0);
    f[4] = 1;
    CHECK(!expect_fail(f, n, "version 1"));
    n = mk(f, 0, 1000000, NULL, NULL, 0);
    CHECK(!expect_fail(f, n, "more than"));
    // one kv (repeated `times`): key, value type, then up to three little-endian fields
    static const struct {
        const char *key;
        uint32_t type;
        uint64_t v[3];
        int width[3], times;
        const char *want;
    } kvs[] = {
        { "k", 8, { 1ull << 40 }, { 8 }, 1, "past the end" }, // a string longer than the file
        { "b", 7, { 2 }, { 1 }, 1, "boolean byte 2" },
        { "arr", 9, { 9, 0 }, { 4, 8 }, 1, "arrays of arrays" },
        { "x", 13, { 0 }, { 0 }, 1, "invalid value type 13" },
        { "dup", 4, { 1 }, { 4 }, 2, "'dup' appears twice" },
        { "general.alignment", 4, { 0 }, { 4 }, 1, "not a power of two" },
        { "general.alignment", 4, { 48 }, { 4 }, 1, "not a power of two" },
        { "general.alignment", 5, { 32 }, { 4 }, 1, "must be a u32" },
    };
    for (size_t i = 0; i < sizeof kvs / sizeof kvs[0]; i++) {
        kv.n = 0;
        for (int r = 0; r < kvs[i].times; r++) {
            gstr(&kv, kvs[i].key);
            le(&kv, kvs[i].type, 4);
            for (int k = 0; k < 3 && kvs[i].width[k]; k++)
                le(&kv, kvs[i].v[k], kvs[i].width[k]);
        }
        n = mk(f, 0, kvs[i].times, &kv, NULL, 0);
        CHECK_MSG(!expect_fail(f, n, kvs[i].want), "kv case %zu", i);
    }
    // tensor infos
    int64_t ne[5] = { 4, 2, 1, 1, 1 };
    struct {
        const char *name;
        int nd;
        int64_t ne0;
        uint32_t type;
        uint64_t off;
        size_t data;
        const char *want;
    } cases[] = {
        { "t", 5, 4, 0, 0, 64, "5 dimensions" },
        { "t", 0, 4, 0, 0, 64, "0 dimensions" },
        { "t", 2, -1, 0, 0, 64, "too large" },
        { "t", 2, 4, 99, 0, 64, "ggml type 99" },
        { "t", 2, 16, 8, 0, 128, "not a multiple of 32" },
        { "t", 2, 4, 0, 8, 64, "not a multiple of the alignment" },
        { "t", 2, 4, 0, 32, 32, "past the end of the file" },
        { "", 2, 4, 0, 0, 64, "name of 0 bytes" },
        { "a-name-of-sixty-four-bytes-which-is-one-more-than-ggml-allows-xx", 2, 4, 0, 0, 64, "name of 64 bytes" },
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        ti.n = 0;
        ne[0] = cases[i].ne0;
        tinfo(&ti, cases[i].name, cases[i].nd, ne, cases[i].type, cases[i].off);
        n = mk(f, 1, 0, NULL, &ti, cases[i].data);
        CHECK_MSG(!expect_fail(f, n, cases[i].want), "case %zu", i);
    }
    ne[0] = 4;
    ti.n = 0;
    tinfo(&ti, "t", 2, ne, 0, 0);
    tinfo(&ti, "t", 2, ne, 0, 32);
    n = mk(f, 2, 0, NULL, &ti, 64);
    CHECK(!expect_fail(f, n, "'t' appears twice"));
    ti.n = 0;
    ne[1] = 4; // 64 bytes: the second tensor at 32 overlaps it
    tinfo(&ti, "t1", 2, ne, 0, 0);
    tinfo(&ti, "t2", 2, ne, 0, 32);
    n = mk(f, 2, 0, NULL, &ti, 128);
    CHECK(!expect_fail(f, n, "overlaps"));
    lk_buf_release(&kv);
    lk_buf_release(&ti);
    // a missing file and an empty one
    struct gguf_file g;
    CHECK(gguf_open(&g, test_path("none.gguf"), test_err()) == LK_ERR_MISSING);
    CHECK(fix_put_file(test_path("empty.gguf"), "", 0) == 0);
    CHECK(gguf_open(&g, test_path("empty.gguf"), test_err()) == LK_ERR_FORMAT);
    CHECK(strstr(test_errmsg(), "empty.gguf: empty file") != NULL);
}

TEST(gguf_reader_and_writer_survive_allocation_failures)
{
    // every allocation of the writer, then of the reader, failing in turn: a clean
    // LK_ERR_NOMEM (no file left behind) or the right answer, until the operation succeeds
    TMPPATH(path, "small.gguf");
    int ok = 0;
    for (long n = 1; n < 1000 && !ok; n++) {
        struct lk_err err = { 0 };
        lk_fail_countdown = n;
        int rc = write_small(path, &err);
        lk_fail_countdown = 0;
        CHECK_MSG(rc == LK_OK || rc == LK_ERR_NOMEM, "writer, countdown %ld: %d %s", n, rc, err.msg);
        CHECK_MSG(rc == LK_OK || !lk_file_exists(path), "writer, countdown %ld: a file was left", n);
        ok = rc == LK_OK;
    }
    CHECK(ok);
    char *buf;
    size_t len;
    CHECK_OK(lk_read_file(path, &buf, &len, test_err()));
    ok = 0;
    for (long n = 1; n < 1000 && !ok; n++) {
        struct gguf_file g;
        struct lk_err err = { 0 };
        lk_fail_countdown = n;
        int rc = gguf_open_buffer(&g, buf, len, "x.gguf", &err);
        lk_fail_countdown = 0;
        CHECK_MSG(rc == LK_OK || rc == LK_ERR_NOMEM, "reader, countdown %ld: %d %s", n, rc, err.msg);
        if (rc == LK_OK) {
            CHECK(g.n_tensors == 2 && g.n_kv == 6 && gguf_find_tensor(&g, "b.weight"));
            gguf_close(&g);
            ok = 1;
        }
    }
    lk_free(buf);
    CHECK(ok);
}

TEST(gguf_model_load_names_what_is_missing)
{
    // metadata of a 1-layer qwen2 and no tensors; then another architecture
    TMPPATH(path, "meta.gguf");
    struct gguf_writer w;
    struct lk_err err = { 0 };
    gguf_writer_init(&w, path, &err);
    gguf_writer_str(&w, "general.architecture", "qwen2");
    static const char *const keys[] = { "qwen2.embedding_length", "qwen2.feed_forward_length", "qwen2.block_count",
                                        "qwen2.attention.head_count", "qwen2.context_length" };
    static const uint32_t vals[] = { 32, 64, 1, 2, 64 };
    for (int i = 0; i < 5; i++)
        gguf_writer_u32(&w, keys[i], vals[i]);
    gguf_writer_f32(&w, "qwen2.rope.freq_base", 10000);
    gguf_writer_f32(&w, "qwen2.attention.layer_norm_rms_epsilon", 1e-6f);
    CHECK_OK(gguf_writer_commit(&w));
    struct model m;
    CHECK(gguf_model_load(&m, path, test_err()) == LK_ERR_FORMAT);
    CHECK(strstr(test_errmsg(), "meta.gguf: tensor 'token_embd.weight' is missing") != NULL);
    gguf_writer_init(&w, path, &err);
    gguf_writer_str(&w, "general.architecture", "gemma");
    CHECK_OK(gguf_writer_commit(&w));
    CHECK(gguf_model_load(&m, path, test_err()) == LK_ERR_UNSUPPORTED);
    CHECK(strstr(test_errmsg(), "architecture 'gemma' is not supported") != NULL);
}

TEST(gguf_convert_base_metadata)
{
    if (!lk_file_exists(BASE "/config.json"))
        SKIP("no %s (run from the repository root)", BASE);
    TMPPATH(out, "base.gguf");
    CHECK_INT(test_sh("%s convert --model " BASE " --out '%s'", test_lorakit(), out), 0);
    CHECK(strstr(test_output(), "qwen2, 50 tensors, 3100928 parameters, f32, tokenizer 'qwen2' (768 tokens)"));
    struct gguf_file g;
    CHECK_OK(gguf_open(&g, out, test_err()));
    CHECK(fix_has_str(&g, "general.architecture", "qwen2") && fix_has_str(&g, "general.type", "model"));
    CHECK(fix_has_str(&g, "general.name", "base-model") && fix_has_str(&g, "lorakit.version", GGUF_LORAKIT_VERSION));
    CHECK(fix_has_uint(&g, "general.file_type", 0) && fix_has_uint(&g, "general.alignment", 32));
    // hyper-parameters: datasets/base-model/config.json
    cJSON *cfg = fix_read_json(BASE "/config.json");
    static const char *const pairs[][2] = {
        { "qwen2.embedding_length", "hidden_size" },      { "qwen2.feed_forward_length", "intermediate_size" },
        { "qwen2.block_count", "num_hidden_layers" },     { "qwen2.attention.head_count", "num_attention_heads" },
        { "qwen2.attention.head_count_kv", "num_key_value_heads" }, { "qwen2.context_length", "max_position_embeddings" },
        { "qwen2.vocab_size", "vocab_size" },
    };
    for (size_t i = 0; i < sizeof pairs / sizeof pairs[0]; i++)
        CHECK(fix_has_uint(&g, pairs[i][0], (uint64_t)cJSON_GetObjectItem(cfg, pairs[i][1])->valuedouble));
    double theta, eps;
    CHECK_OK(gguf_get_float(&g, "qwen2.rope.freq_base", &theta, test_err()));
    CHECK_OK(gguf_get_float(&g, "qwen2.attention.layer_norm_rms_epsilon", &eps, test_err()));
    CHECK(theta == 10000 && eps == (double)1e-6f);
    CHECK(fix_has_uint(&g, "tokenizer.ggml.bos_token_id", 765) && fix_has_uint(&g, "tokenizer.ggml.eos_token_id", 767));
    cJSON_Delete(cfg);
    // tokenizer: every token as tokenizer.json writes it, the three specials control, merges in order
    cJSON *tj = fix_read_json(BASE "/tokenizer.json"), *tc = fix_read_json(BASE "/tokenizer_config.json"), *e;
    const struct gguf_kv *toks = gguf_find_kv(&g, "tokenizer.ggml.tokens");
    const struct gguf_kv *types = gguf_find_kv(&g, "tokenizer.ggml.token_type");
    const struct gguf_kv *merges = gguf_find_kv(&g, "tokenizer.ggml.merges");
    CHECK(toks && types && merges && toks->n == 768 && types->n == 768 && types->arr_type == GGUF_VT_INT32);
    int checked = 0;
    cJSON_ArrayForEach(e, cJSON_GetObjectItem(cJSON_GetObjectItem(tj, "model"), "vocab"))
    {
        struct gguf_str s = gguf_arr_str(toks, (uint64_t)e->valuedouble);
        CHECK_MSG(s.n == strlen(e->string) && !memcmp(s.p, e->string, s.n), "token %d", (int)e->valuedouble);
        CHECK(gguf_arr_num(types, (uint64_t)e->valuedouble) == 1);
        checked++;
    }
    cJSON_ArrayForEach(e, cJSON_GetObjectItem(tj, "added_tokens"))
    {
        const char *c = cJSON_GetObjectItem(e, "content")->valuestring;
        int id = (int)cJSON_GetObjectItem(e, "id")->valuedouble;
        CHECK(gguf_arr_str(toks, (uint64_t)id).n == strlen(c) && gguf_arr_num(types, (uint64_t)id) == 3);
        checked++;
    }
    CHECK_INT(checked, 768);
    const cJSON *mj = cJSON_GetObjectItem(cJSON_GetObjectItem(tj, "model"), "merges");
    CHECK_INT(merges->n, cJSON_GetArraySize(mj));
    uint64_t i = 0;
    cJSON_ArrayForEach(e, mj)
    {
        char want[64];
        snprintf(want, sizeof want, "%s %s", e->child->valuestring, e->child->next->valuestring);
        struct gguf_str s = gguf_arr_str(merges, i++);
        CHECK_MSG(s.n == strlen(want) && !memcmp(s.p, want, s.n), "merge %llu", (unsigned long long)i - 1);
    }
    CHECK(fix_has_str(&g, "tokenizer.ggml.model", "gpt2") && fix_has_str(&g, "tokenizer.ggml.pre", "qwen2"));
    CHECK(fix_has_uint(&g, "tokenizer.ggml.padding_token_id", 765)); // pad_token <|endoftext|>
    int add_bos = -1;
    CHECK_OK(gguf_get_bool(&g, "tokenizer.ggml.add_bos_token", &add_bos, test_err()));
    CHECK_INT(add_bos, 0);
    CHECK(fix_has_str(&g, "tokenizer.chat_template", cJSON_GetObjectItem(tc, "chat_template")->valuestring));
    cJSON_Delete(tj);
    cJSON_Delete(tc);
    // tensors: llama.cpp's names, ne reversed, f32, tied (no output.weight), data aligned
    CHECK_INT(g.n_tensors, 50);
    CHECK(gguf_find_tensor(&g, "output.weight") == NULL);
    const struct gguf_tensor *t = gguf_find_tensor(&g, "blk.3.attn_k.weight");
    CHECK(t && t->n_dims == 2 && t->ne[0] == 256 && t->ne[1] == 128 && t->type == GGUF_T_F32);
    CHECK(gguf_find_tensor(&g, "blk.0.attn_q.bias") && gguf_find_tensor(&g, "blk.2.ffn_norm.weight") &&
          gguf_find_tensor(&g, "output_norm.weight") && gguf_find_tensor(&g, "token_embd.weight"));
    for (int64_t k = 0; k < g.n_tensors; k++)
        CHECK((g.data_off + g.t[k].offset) % 32 == 0);
    gguf_close(&g);
}

TEST(gguf_llama_permutation_and_roundtrip)
{
    if (!lk_file_exists(BASE "/config.json"))
        SKIP("no %s (run from the repository root)", BASE);
    char dir[600];
    snprintf(dir, sizeof dir, "%s/llama", test_tmpdir());
    CHECK_INT(fix_make_llama(dir), 0);
    TMPPATH(out, "llama.gguf");
    CHECK_INT(test_sh("%s convert --model '%s' --out '%s'", test_lorakit(), dir, out), 0);
    CHECK(strstr(test_output(), "llama, 21 tensors") && strstr(test_output(), "tokenizer 'llama-bpe'"));
    struct model m;
    CHECK_OK(model_load(&m, dir, test_err()));
    struct gguf_file g;
    CHECK_OK(gguf_open(&g, out, test_err()));
    CHECK(fix_has_uint(&g, "llama.attention.key_length", 32) && fix_has_uint(&g, "llama.rope.dimension_count", 32));
    CHECK(gguf_find_tensor(&g, "output.weight") != NULL); // untied
    // q (4 heads) and k (2 heads) of layer 1: each row where the index formula puts it
    const struct gguf_tensor *tq = gguf_find_tensor(&g, "blk.1.attn_q.weight"), *tk = gguf_find_tensor(&g, "blk.1.attn_k.weight");
    CHECK(tq && tk && tq->ne[0] == 96 && tq->ne[1] == 128 && tk->ne[1] == 64);
    const float *q = (const float *)tq->data, *k = (const float *)tk->data;
    for (int64_t r = 0; r < 128; r++)
        CHECK(!memcmp(q + r * 96, m.w.layer[1].wq.f + fix_permuted_src_row(r, 32) * 96, 96 * sizeof(float)));
    for (int64_t r = 0; r < 64; r++)
        CHECK(!memcmp(k + r * 96, m.w.layer[1].wk.f + fix_permuted_src_row(r, 32) * 96, 96 * sizeof(float)));
    const struct gguf_tensor *tv = gguf_find_tensor(&g, "blk.1.attn_v.weight");
    CHECK(!memcmp(tv->data, m.w.layer[1].wv.f, 64 * 96 * sizeof(float))); // v is not permuted
    gguf_close(&g);
    // read back into lorakit: the same weights bit for bit, so the same logits
    struct model back;
    CHECK_OK(gguf_model_load(&back, out, test_err()));
    CHECK(back.w.n == m.w.n && !memcmp(back.w.mem, m.w.mem, m.w.n * sizeof(float)));
    CHECK(back.cfg.arch == CFG_ARCH_LLAMA && back.cfg.head_dim == 32 && !back.cfg.tie_word_embeddings);
    model_release(&back);
    model_release(&m);
    // q8_0 read back: every weight equals its dequantized block
    CHECK_INT(test_sh("%s convert --model '%s' --out '%s' --dtype q8_0 --overwrite", test_lorakit(), dir, out), 0);
    CHECK_OK(gguf_model_load(&back, out, test_err()));
    CHECK_OK(gguf_open(&g, out, test_err()));
    tv = gguf_find_tensor(&g, "blk.0.ffn_down.weight");
    CHECK(tv && tv->type == GGUF_T_Q8_0);
    float *deq = malloc(sizeof(float) * tv->numel);
    gguf_to_f32(deq, GGUF_T_Q8_0, tv->data, tv->numel);
    CHECK(!memcmp(deq, back.w.layer[0].wdown.f, tv->numel * sizeof(float)));
    free(deq);
    gguf_close(&g);
    model_release(&back);
}

TEST(gguf_tokenizer_read_back_from_gguf)
{
    if (!lk_file_exists(BASE "/config.json"))
        SKIP("no %s (run from the repository root)", BASE);
    TMPPATH(out, "base.gguf");
    TMPPATH(dir, "llama");
    TMPPATH(lout, "llama.gguf");
    CHECK_INT(test_sh("%s convert --model " BASE " --out '%s'", test_lorakit(), out), 0);
    CHECK_INT(fix_make_llama(dir), 0);
    CHECK_INT(test_sh("%s convert --model '%s' --out '%s'", test_lorakit(), dir, lout), 0);
    char **texts = fix_all_texts();
    int bad = fix_tok_roundtrip(BASE, out, texts, N_TEXTS) + fix_tok_roundtrip(dir, lout, texts, N_TEXTS);
    fix_free_texts(texts, N_TEXTS, NULL);
    CHECK_INT(bad, 0);
}

/* A rows source over a loaded model that records the largest request. */
struct probe_src {
    struct model *m;
    struct model_tensor *t;
    int n;
    int64_t max_rows_bytes;
};

static int probe_rows(void *ctx, const struct cfg_tensor *ct, int64_t row0, int64_t n, float *out, struct lk_err *err)
{
    struct probe_src *p = ctx;
    int64_t cols = ct->ndim == 2 ? ct->shape[1] : ct->shape[0];
    for (int i = 0; i < p->n; i++)
        if (!strcmp(p->t[i].name, ct->name)) {
            memcpy(out, p->t[i].data + row0 * cols, sizeof(float) * (size_t)(n * cols));
            if (n * cols * 4 > p->max_rows_bytes)
                p->max_rows_bytes = n * cols * 4;
            return LK_OK;
        }
    return lk_errf(err, LK_ERR_MISSING, "no tensor '%s'", ct->name);
}

TEST(gguf_export_streams_in_bounded_chunks)
{
    if (!lk_file_exists(BASE "/config.json"))
        SKIP("no %s (run from the repository root)", BASE);
    TMPPATH(a, "a.gguf");
    TMPPATH(b, "b.gguf");
    struct gguf_export x = { 0 };
    x.model_dir = BASE;
    x.dtype = GGUF_T_Q8_0;
    CHECK_OK(gguf_export_model(&x, a, NULL, test_err()));
    // the same file from a callback source in 16 KB chunks; no allocation as large as a tensor
    struct model m;
    struct probe_src p = { &m, NULL, 0, 0 };
    CHECK_OK(model_load(&m, BASE, test_err()));
    CHECK_OK(model_weights_tensors(&m.w, &m.cfg, &p.t, &p.n, test_err()));
    x.rows = probe_rows;
    x.rows_ctx = &p;
    x.chunk_bytes = 16384;
    lk_alloc_limit = SIZE_MAX;
    lk_alloc_largest = 0;
    int rc = gguf_export_model(&x, b, NULL, test_err());
    size_t largest = lk_alloc_largest;
    lk_alloc_limit = 0;
    CHECK_OK(rc);
    fprintf(stderr, "    largest allocation %zu bytes, largest chunk %lld bytes (the embedding is %d bytes in f32)\n",
            largest, (long long)p.max_rows_bytes, 768 * 256 * 4);
    CHECK(p.max_rows_bytes <= 16384 && largest < 768 * 256 * 4 / 4);
    char *ba, *bb;
    size_t na, nb;
    CHECK_OK(lk_read_file(a, &ba, &na, test_err()));
    CHECK_OK(lk_read_file(b, &bb, &nb, test_err()));
    int same = na == nb && !memcmp(ba, bb, na);
    lk_free(ba);
    lk_free(bb);
    lk_free(p.t);
    model_release(&m);
    CHECK_MSG(same, "chunked export differs from the whole-tensor one (%zu vs %zu bytes)", na, nb);
}

/* A convert that must fail: exit 1, the message holds want, nothing at out (no temp file). */
static int refused(const char *args, const char *out, const char *want)
{
    int rc = test_sh("%s convert %s", test_lorakit(), args);
    char pattern[700];
    snprintf(pattern, sizeof pattern, "ls '%s'* 2>/dev/null | grep -q .", out);
    int left = system(pattern) == 0;
    if (rc == 0 || !strstr(test_output(), want) || left) {
        fprintf(stderr, "    convert %s: exit %d, output '%s'%s (wanted '%s')\n", args, rc, test_output(),
                left ? ", a file was left" : "", want);
        return 0;
    }
    return 1;
}

TEST(gguf_convert_refuses_what_gguf_cannot_hold)
{
    if (!lk_file_exists(BASE "/config.json"))
        SKIP("no %s (run from the repository root)", BASE);
    const char *t = test_tmpdir();
    char args[1400], out[600], dir[600], ad[600];
    snprintf(out, sizeof out, "%s/out.gguf", t);
    // qwen2 with heads x head_dim != hidden (llama.cpp's qwen2 shapes q as [hidden, hidden])
    snprintf(dir, sizeof dir, "%s/q", t);
    TMPPATH(cfg, "q.json");
    static const char qj[] = "{\"architectures\":[\"Qwen2ForCausalLM\"],\"model_type\":\"qwen2\",\"hidden_size\":96,"
                             "\"intermediate_size\":64,\"num_hidden_layers\":1,\"num_attention_heads\":4,"
                             "\"num_key_value_heads\":2,\"head_dim\":32,\"vocab_size\":768,\"max_position_embeddings\":64,"
                             "\"rms_norm_eps\":1e-6,\"rope_theta\":10000,\"tie_word_embeddings\":true,"
                             "\"torch_dtype\":\"float32\"}";
    CHECK_INT(fix_put_file(cfg, qj, strlen(qj)), 0);
    CHECK_INT(test_sh("%s init --config '%s' --out '%s'", test_lorakit(), cfg, dir), 0);
    snprintf(args, sizeof args, "--model '%s' --out '%s'", dir, out);
    CHECK(refused(args, out, "llama.cpp's qwen2 loader assumes they are equal"));
    // no tokenizer; a tokenizer larger than the embedding
    CHECK_INT(test_sh("rm -rf '%s' && %s init --preset tiny --out '%s'", dir, test_lorakit(), dir), 0);
    CHECK(refused(args, out, "no tokenizer.json"));
    CHECK_INT(test_sh("cp " BASE "/tokenizer*.json '%s'/", dir), 0);
    CHECK(refused(args, out, "the tokenizer has 768 tokens, the model's embedding only 512 rows"));
    // a pre-tokenizer llama.cpp does not have (digits in pairs), and ignore_merges against it
    snprintf(dir, sizeof dir, "%s/b", t);
    snprintf(args, sizeof args, "--model '%s' --out '%s'", dir, out);
    CHECK_INT(test_sh("cp -r " BASE " '%s' && sed -i 's/p{N}|/p{N}{1,2}|/' '%s/tokenizer.json' && "
                      "grep -q 'p{N}{1,2}|' '%s/tokenizer.json'", dir, dir, dir), 0);
    CHECK(refused(args, out, "llama.cpp would split text differently"));
    CHECK_INT(test_sh("cp " BASE "/tokenizer.json '%s'/ && sed -i 's/\"ignore_merges\":[[:space:]]*false/\"ignore_merges\": true/' "
                      "'%s/tokenizer.json' && grep -q '\"ignore_merges\": true' '%s/tokenizer.json'", dir, dir, dir), 0);
    CHECK(refused(args, out, "ignore_merges is true but llama.cpp's 'qwen2' tokenizer applies merges"));
    // adapters GGUF LoRA cannot express: each named, with the hint to merge
    snprintf(ad, sizeof ad, "%s/dora", t);
    CHECK_INT(fix_train_adapter(BASE, ad, "--dora --targets q_proj,v_proj"), 0);
    snprintf(args, sizeof args, "--adapter '%s' --model " BASE " --out '%s'", ad, out);
    CHECK(refused(args, out, "a DoRA adapter (use_dora)"));
    CHECK(strstr(test_output(), "hint: merge it instead") != NULL);
    static const struct {
        int bias, embed, head;
        const char *want;
    } crafted[] = {
        { 1, 0, 0, "lora_B biases (lora_bias)" },
        { 0, 1, 0, "an embedding adapter" },
        { 0, 0, 1, "modules_to_save" },
    };
    for (size_t i = 0; i < sizeof crafted / sizeof crafted[0]; i++) {
        snprintf(ad, sizeof ad, "%s/crafted%zu", t, i);
        CHECK_INT(fix_craft_adapter(ad, crafted[i].bias, crafted[i].embed, crafted[i].head), 0);
        snprintf(args, sizeof args, "--adapter '%s' --model " BASE " --out '%s'", ad, out);
        CHECK_MSG(refused(args, out, crafted[i].want), "case %zu", i);
        CHECK(strstr(test_output(), "hint: merge it instead") != NULL);
    }
    // the plain crafted adapter converts (the refusals above are about the extras alone)
    snprintf(ad, sizeof ad, "%s/plain", t);
    CHECK_INT(fix_craft_adapter(ad, 0, 0, 0), 0);
    CHECK_INT(test_sh("%s convert --adapter '%s' --model " BASE " --out '%s'", test_lorakit(), ad, out), 0);
    CHECK(strstr(test_output(), "GGUF LoRA, 4 modules, alpha 4, f32"));
    CHECK(unlink(out) == 0);
    // flags
    snprintf(args, sizeof args, "--model " BASE " --out '%s' --dtype q4_0", out);
    CHECK(refused(args, out, "wants f32, f16, bf16 or q8_0"));
    snprintf(args, sizeof args, "--model " BASE " --out '%s/x.bin'", t);
    CHECK(refused(args, out, "must end in .gguf"));
    CHECK_INT(fix_put_file(out, "keep", 4), 0);
    CHECK(test_sh("%s convert --model " BASE " --out '%s'", test_lorakit(), out) == 1);
    CHECK(strstr(test_output(), "--overwrite replaces it") && fix_file_size(out) == 4);
}

TEST(gguf_lorakit_version_matches)
{
    CHECK_INT(test_sh("%s version", test_lorakit()), 0);
    char want[64];
    snprintf(want, sizeof want, "lorakit %s\n", GGUF_LORAKIT_VERSION);
    CHECK_MSG(!strcmp(test_output(), want), "`lorakit version` says '%s', lorakit.version is written as '%s'",
              test_output(), GGUF_LORAKIT_VERSION);
}

// ---- llama.cpp (node-llama-cpp) as the peer ----

TEST(gguf_llama_base_model_f32)
{
    NEED_PEER();
    TMPPATH(out, "base.gguf");
    CHECK_INT(test_sh("%s convert --model " BASE " --out '%s'", test_lorakit(), out), 0);
    double d;
    CHECK_INT(fix_check_in_llama(BASE, out, NULL, NULL, "base model f32", &d), 0);
    // llama.cpp's own GGUF parser (readGgufFileInfo) reads the file as ours does
    cJSON *o = fix_peer(fix_peer_run(out, NULL, NULL, 0, NULL, NULL, 1));
    CHECK(o != NULL);
    const cJSON *info = cJSON_GetObjectItem(o, "info"), *meta = cJSON_GetObjectItem(info, "metadata"), *e;
    struct gguf_file g;
    CHECK_OK(gguf_open(&g, out, test_err()));
    CHECK_INT(cJSON_GetArraySize(cJSON_GetObjectItem(info, "tensors")), g.n_tensors);
    int k = 0;
    cJSON_ArrayForEach(e, cJSON_GetObjectItem(info, "tensors"))
    {
        const struct gguf_tensor *t = &g.t[k++];
        const cJSON *dims = cJSON_GetObjectItem(e, "dims");
        CHECK(t->name.n == strlen(cJSON_GetObjectItem(e, "name")->valuestring) &&
              !memcmp(t->name.p, cJSON_GetObjectItem(e, "name")->valuestring, t->name.n));
        CHECK(cJSON_GetArraySize(dims) == t->n_dims && cJSON_GetArrayItem(dims, 0)->valuedouble == t->ne[0]);
        CHECK(cJSON_GetObjectItem(e, "offset")->valuedouble == (double)t->offset);
        CHECK(cJSON_GetObjectItem(e, "type")->valuedouble == t->type);
    }
    CHECK(!strcmp(cJSON_GetObjectItem(meta, "general.architecture")->valuestring, "qwen2"));
    CHECK(cJSON_GetObjectItem(meta, "qwen2.attention.head_count_kv")->valuedouble == 2);
    CHECK(cJSON_GetObjectItem(cJSON_GetObjectItem(meta, "tokenizer.ggml.tokens"), "length")->valuedouble == 768);
    CHECK(cJSON_IsFalse(cJSON_GetObjectItem(meta, "tokenizer.ggml.add_bos_token")));
    gguf_close(&g);
    cJSON_Delete(o);
}

TEST(gguf_llama_llama_model_f32)
{
    NEED_PEER();
    char dir[600];
    snprintf(dir, sizeof dir, "%s/llama", test_tmpdir());
    CHECK_INT(fix_make_llama(dir), 0);
    TMPPATH(out, "llama.gguf");
    CHECK_INT(test_sh("%s convert --model '%s' --out '%s'", test_lorakit(), dir, out), 0);
    double d;
    CHECK_INT(fix_check_in_llama(dir, out, NULL, NULL, "llama model f32 (untied, GQA, head_dim 32)", &d), 0);
    // with attention_bias: q/k/v and o_proj biases (llama.cpp's llama takes bq, bk, bv, bo
    // optionally; q and k biases permuted like the rows, attn_output.bias as it is)
    TMPPATH(bdir, "llama-bias");
    TMPPATH(bout, "llama-bias.gguf");
    CHECK_INT(fix_make_llama_bias(bdir, 1), 0);
    CHECK_INT(test_sh("%s convert --model '%s' --out '%s'", test_lorakit(), bdir, bout), 0);
    CHECK_MSG(strstr(test_output(), "llama, 29 tensors") != NULL, "%s", test_output());
    struct model m, back;
    CHECK_OK(model_load(&m, bdir, test_err()));
    double bo2 = 0;
    for (int l = 0; l < 2; l++)
        for (int i = 0; i < 96; i++)
            bo2 += (double)m.w.layer[l].bo[i] * m.w.layer[l].bo[i];
    CHECK_MSG(sqrt(bo2 / 192) > 0.05, "o_proj.bias is not there or near zero (rms %g)", sqrt(bo2 / 192));
    struct gguf_file g;
    CHECK_OK(gguf_open(&g, bout, test_err()));
    const struct gguf_tensor *tb = gguf_find_tensor(&g, "blk.1.attn_output.bias");
    CHECK(tb && tb->n_dims == 1 && tb->ne[0] == 96 && !memcmp(tb->data, m.w.layer[1].bo, 96 * sizeof(float)));
    gguf_close(&g);
    // the bias moves the logits far beyond the 1e-4 the peer is held to
    int tok[6] = { 5, 77, 300, 12, 640, 9 };
    float *a = malloc(sizeof(float) * 6 * 768);
    CHECK_OK(model_plan(&m, 1, 6, 0, test_err()));
    CHECK_OK(model_forward(&m, NULL, tok, NULL, NULL, NULL, 0, NULL, test_err()));
    memcpy(a, model_logits(&m), sizeof(float) * 6 * 768);
    // read back from the GGUF: the same weights bit for bit, the o_proj bias included
    CHECK_OK(gguf_model_load(&back, bout, test_err()));
    CHECK(back.w.layer[0].bo && back.w.n == m.w.n && !memcmp(back.w.mem, m.w.mem, m.w.n * sizeof(float)));
    model_release(&back);
    memset(m.w.layer[0].bo, 0, 96 * sizeof(float));
    memset(m.w.layer[1].bo, 0, 96 * sizeof(float));
    CHECK_OK(model_forward(&m, NULL, tok, NULL, NULL, NULL, 0, NULL, test_err()));
    double moved = 0;
    for (int i = 0; i < 6 * 768; i++)
        moved = fmax(moved, fabs(model_logits(&m)[i] - a[i]));
    CHECK_MSG(moved > 1e-2, "o_proj's bias moves the logits by %g only", moved);
    free(a);
    model_release(&m);
    CHECK_INT(fix_check_in_llama(bdir, bout, NULL, NULL, "llama model f32 with q/k/v/o_proj biases", &d), 0);
}

TEST(gguf_llama_base_model_dtypes)
{
    NEED_PEER();
    static const char *const dtypes[] = { "f32", "f16", "bf16", "q8_0" };
    char paths[4][600];
    cJSON *job = cJSON_CreateObject(), *runs = cJSON_AddArrayToObject(job, "runs");
    struct tok *tk = NULL;
    CHECK_OK(tok_load(&tk, BASE, test_err()));
    char **texts = fix_all_texts();
    struct tok_ids ids[N_TEXTS] = { 0 };
    for (int i = 0; i < N_TEXTS; i++)
        CHECK_OK(tok_encode(tk, texts[i], strlen(texts[i]), 1, &ids[i], test_err()));
    tok_free(tk);
    int32_t *prompts[NPROMPT], lens[NPROMPT], want[NPROMPT][NGEN];
    CHECK_INT(fix_pick_prompts(ids, N_TEXTS, prompts, lens), 0);
    CHECK_INT(fix_lk_greedy(BASE, NULL, prompts, lens, NPROMPT, want), 0);
    int V;
    double *lp = fix_lk_logprobs(BASE, NULL, prompts, NPROMPT, PLEN, &V);
    CHECK(lp != NULL);
    for (int i = 0; i < 4; i++) {
        snprintf(paths[i], sizeof paths[i], "%s/base-%s.gguf", test_tmpdir(), dtypes[i]);
        CHECK_INT(test_sh("%s convert --model " BASE " --out '%s' --dtype %s", test_lorakit(), paths[i], dtypes[i]), 0);
        cJSON_AddItemToArray(runs, fix_peer_run(paths[i], NULL, NULL, 0, prompts, lens, 0));
    }
    cJSON *o = fix_peer(job);
    CHECK(o != NULL);
    long size[4];
    double err[4];
    int same[4];
    for (int i = 0; i < 4; i++) {
        const cJSON *r = cJSON_GetArrayItem(cJSON_GetObjectItem(o, "runs"), i);
        size[i] = fix_file_size(paths[i]);
        same[i] = fix_greedy_agree(cJSON_GetObjectItem(r, "generate"), want, NPROMPT, dtypes[i], 0);
        err[i] = fix_lp_maxdiff(cJSON_GetObjectItem(r, "logprobs"), lp, NPROMPT, V);
        fprintf(stderr, "    base model %-4s: %9ld bytes, greedy %d/%d continuations equal to lorakit f32, "
                        "max |d log-prob| %.3g\n", dtypes[i], size[i], same[i], NPROMPT, err[i]);
    }
    // f32 exact to float rounding; the others agree on most prompts, with a measured error
    CHECK(same[0] == NPROMPT && err[0] >= 0 && err[0] <= 1e-4);
    for (int i = 1; i < 4; i++)
        CHECK_MSG(same[i] * 2 > NPROMPT && err[i] >= 0 && err[i] < 0.5, "%s", dtypes[i]);
    CHECK(size[3] < size[1] && size[1] == size[2] && size[1] < size[0]);
    free(lp);
    cJSON_Delete(o);
    fix_free_texts(texts, N_TEXTS, NULL);
    for (int i = 0; i < N_TEXTS; i++)
        tok_ids_release(&ids[i]);
}

/* Base GGUF + GGUF LoRA in llama.cpp against `lorakit logits --adapter` on the same prompts. */
static int check_lora(const char *model_dir, const char *adapter, const char *what, int folded)
{
    TMPPATH(base_gguf, "lbase.gguf");
    TMPPATH(lora_gguf, "lora.gguf");
    if (test_sh("%s convert --model '%s' --out '%s' --overwrite && %s convert --adapter '%s' --model '%s' --out '%s' "
                "--overwrite", test_lorakit(), model_dir, base_gguf, test_lorakit(), adapter, model_dir, lora_gguf)) {
        fprintf(stderr, "    convert: %s\n", test_output());
        return -1;
    }
    for (const char *l = test_output(); *l;) { // the two "wrote" lines, indented like the rest
        const char *nl = strchr(l, '\n');
        int len = nl ? (int)(nl - l) : (int)strlen(l);
        fprintf(stderr, "    %.*s\n", len, l);
        l += len + (nl != NULL);
    }
    if (!strstr(test_output(), "per-module scales folded into lora_b") != !folded)
        return -1;
    double d;
    if (fix_check_in_llama(model_dir, base_gguf, adapter, lora_gguf, what, &d))
        return -1;
    // the adapter must matter, or the comparison proves nothing
    int32_t row[PLEN], *rows[1] = { row };
    for (int i = 0; i < PLEN; i++)
        row[i] = 100 + 37 * i;
    int V;
    double *with = fix_lk_logprobs(model_dir, adapter, rows, 1, PLEN, &V);
    double *without = fix_lk_logprobs(model_dir, NULL, rows, 1, PLEN, &V);
    double effect = 0;
    for (int v = 0; with && without && v < V; v++)
        effect = fmax(effect, fabs(with[v] - without[v]));
    free(with);
    free(without);
    fprintf(stderr, "    the adapter moves log-probs by up to %.3g\n", effect);
    return effect > 0.05 ? 0 : -1;
}

TEST(gguf_llama_lora_adapter)
{
    NEED_PEER();
    // rsLoRA and an alpha_pattern: per-module scales llama.cpp does not know, folded into lora_b
    char ad[600];
    snprintf(ad, sizeof ad, "%s/ad", test_tmpdir());
    CHECK_INT(fix_train_adapter(BASE, ad, "--rslora"), 0);
    CHECK_INT(test_sh("sed -i 's/\"alpha_pattern\": {}/\"alpha_pattern\": {\"model.layers.1.mlp.down_proj\": 24}/' "
                      "'%s/adapter_config.json' && grep -q down_proj\\\": 24 '%s/adapter_config.json'", ad, ad), 0);
    CHECK_INT(check_lora(BASE, ad, "base + GGUF LoRA (rsLoRA, alpha_pattern)", 1), 0);
}

TEST(gguf_llama_lora_adapter_on_llama)
{
    NEED_PEER();
    char dir[600], ad[600];
    snprintf(dir, sizeof dir, "%s/llama", test_tmpdir());
    snprintf(ad, sizeof ad, "%s/ad", test_tmpdir());
    CHECK_INT(fix_make_llama(dir), 0);
    CHECK_INT(fix_train_adapter(dir, ad, ""), 0);
    CHECK_INT(check_lora(dir, ad, "llama + GGUF LoRA (q/k rows of B permuted)", 0), 0);
    // no folding here (alpha / r for every module): lora_b is the adapter's B, rows permuted
    struct lora l = { 0 };
    struct cfg c;
    CHECK_OK(cfg_load(&c, dir, test_err()));
    CHECK_OK(lora_load(&l, ad, &c, test_err()));
    struct gguf_file g;
    CHECK_OK(gguf_open(&g, test_path("lora.gguf"), test_err()));
    CHECK(fix_has_str(&g, "general.type", "adapter") && fix_has_str(&g, "adapter.type", "lora"));
    const struct lora_module *m = lora_find(&l, 1, CFG_K);
    const struct gguf_tensor *tb = gguf_find_tensor(&g, "blk.1.attn_k.weight.lora_b");
    CHECK(m && tb && tb->ne[0] == m->R && tb->ne[1] == m->out);
    for (int64_t r = 0; r < m->out; r++)
        CHECK(!memcmp((const float *)tb->data + r * m->R, m->B + fix_permuted_src_row(r, 32) * m->R,
                      sizeof(float) * (size_t)m->R));
    double alpha;
    CHECK_OK(gguf_get_float(&g, "adapter.lora.alpha", &alpha, test_err()));
    CHECK(alpha == 8);
    gguf_close(&g);
    lora_release(&l);
    cfg_release(&c);
}

TEST(gguf_llama_merged_model)
{
    NEED_PEER();
    char ad[600], merged[600];
    snprintf(ad, sizeof ad, "%s/ad", test_tmpdir());
    snprintf(merged, sizeof merged, "%s/merged", test_tmpdir());
    CHECK_INT(fix_train_adapter(BASE, ad, ""), 0);
    CHECK_INT(test_sh("%s merge --model " BASE " --adapter '%s' --out '%s'", test_lorakit(), ad, merged), 0);
    TMPPATH(out, "merged.gguf");
    CHECK_INT(test_sh("%s convert --model '%s' --out '%s'", test_lorakit(), merged, out), 0);
    double d;
    CHECK_INT(fix_check_in_llama(merged, out, NULL, NULL, "lorakit-merged model f32", &d), 0);
}

TEST(gguf_llama_qwen3_tokenizer)
{
    const char *tokdir = test_shared("data/tokenizers/qwen3");
    if (!tokdir)
        SKIP("no ../shared/data/tokenizers/qwen3");
    if (!fix_llama_ready())
        SKIP("node or build/llama (make llama-ref: npm node-llama-cpp 3.21.1) is not there");
    // a one-layer model of Qwen2.5's vocabulary (151,936 rows: the tokenizer's 151,669 ids and
    // [PAD] rows) with the official tokenizer: added tokens special and not, llama.cpp's own vectors
    char dir[600];
    snprintf(dir, sizeof dir, "%s/q", test_tmpdir());
    TMPPATH(cfg, "q.json");
    static const char qj[] = "{\"architectures\":[\"Qwen2ForCausalLM\"],\"model_type\":\"qwen2\",\"hidden_size\":32,"
                             "\"intermediate_size\":32,\"num_hidden_layers\":1,\"num_attention_heads\":2,"
                             "\"num_key_value_heads\":1,\"vocab_size\":151936,\"max_position_embeddings\":64,"
                             "\"rms_norm_eps\":1e-6,\"rope_theta\":1000000,\"tie_word_embeddings\":true,"
                             "\"torch_dtype\":\"bfloat16\",\"bos_token_id\":151643,\"eos_token_id\":151645}";
    CHECK_INT(fix_put_file(cfg, qj, strlen(qj)), 0);
    CHECK_INT(test_sh("%s init --config '%s' --out '%s' && cp '%s'/tokenizer*.json '%s'/", test_lorakit(), cfg, dir,
                      tokdir, dir), 0);
    TMPPATH(out, "q.gguf");
    CHECK_INT(test_sh("%s convert --model '%s' --out '%s'", test_lorakit(), dir, out), 0);
    struct gguf_file g;
    CHECK_OK(gguf_open(&g, out, test_err()));
    const struct gguf_kv *types = gguf_find_kv(&g, "tokenizer.ggml.token_type"), *toks = gguf_find_kv(&g, "tokenizer.ggml.tokens");
    CHECK(types && types->n == 151936);
    CHECK(gguf_arr_num(types, 151644) == 3 && gguf_arr_num(types, 151667) == 4 && gguf_arr_num(types, 151660) == 3);
    CHECK(gguf_arr_num(types, 151900) == 5 && gguf_arr_str(toks, 151900).n == 11 &&
          !memcmp(gguf_arr_str(toks, 151900).p, "[PAD151900]", 11));
    gguf_close(&g);
    // the 140 texts and llama.cpp's test vectors (split at its separator line)
    char **texts = fix_all_texts(), *vec = NULL;
    int n = N_TEXTS;
    size_t vn;
    char vpath[700];
    snprintf(vpath, sizeof vpath, "%s/llama.cpp-vectors/qwen2.inp", tokdir);
    if (lk_read_file(vpath, &vec, &vn, NULL) == LK_OK) {
        texts = realloc(texts, sizeof *texts * (size_t)(N_TEXTS + 64));
        for (char *s = vec; s && n < N_TEXTS + 64;) {
            char *sep = strstr(s, "\n__ggml_vocab_test__\n");
            if (sep)
                *sep = 0;
            if (*s)
                texts[n++] = strdup(s);
            s = sep ? sep + 21 : NULL;
        }
        lk_free(vec);
    }
    // in process: tok_encode with special tokens parsed is what `lorakit tokenize` runs, and the
    // 11 MB tokenizer would otherwise be loaded once per text
    struct tok_ids *ids = calloc((size_t)n, sizeof *ids);
    struct tok *tk = NULL;
    CHECK_OK(tok_load(&tk, dir, test_err()));
    for (int i = 0; i < n; i++)
        CHECK_OK(tok_encode(tk, texts[i], strlen(texts[i]), 1, &ids[i], test_err()));
    tok_free(tk);
    cJSON *o = fix_peer(fix_peer_run(out, NULL, texts, n, NULL, NULL, 0));
    CHECK(o != NULL);
    int bad = fix_compare_ids(cJSON_GetObjectItem(o, "tokenize"), texts, ids, n);
    fprintf(stderr, "    Qwen3 tokenizer in llama.cpp: %d/%d texts tokenized alike\n", n - bad, n);
    cJSON_Delete(o);
    bad += fix_tok_roundtrip(dir, out, texts, n); // and lorakit reads the tokenizer back from the GGUF
    fix_free_texts(texts, n, ids);
    CHECK_INT(bad, 0);
}
