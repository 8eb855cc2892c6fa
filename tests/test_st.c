/*
 * test_st.c - the safetensors reader, writer and sharded models. Malformed files each get a
 * test (the reader must refuse them with a message naming the file, and `lorakit info` must
 * exit 1 with that message, not crash); written files are checked byte for byte against the
 * published format (parsed here by hand, not through st.c) and read back bit-identical.
 */
#include "test.h"

#include <cJSON.h>
#include <dirent.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "../libcore/lk.h"
#include "../libcore/st.h"

// ---- helpers ----

/* Writes u64 LE strlen(header), header, then data_len bytes 0, 1, 2, ... to test_path(name). */
static const char *write_raw(const char *name, const char *header, size_t data_len)
{
    const char *p = test_path(name);
    size_t hl = strlen(header);
    FILE *f = fopen(p, "wb");
    unsigned char len8[8];
    for (int i = 0; i < 8; i++)
        len8[i] = (unsigned char)((uint64_t)hl >> (8 * i));
    fwrite(len8, 1, 8, f);
    fwrite(header, 1, hl, f);
    for (size_t i = 0; i < data_len; i++)
        fputc((int)(i & 255), f);
    fclose(f);
    return p;
}

/* st_open must fail with a message holding the path and want; lorakit info must exit 1 with it. */
static int expect_refused(const char *path, const char *want)
{
    struct st_file f;
    struct lk_err err = { 0 };
    int rc = st_open(&f, path, &err);
    if (rc == LK_OK) {
        st_close(&f);
        test_fail(__FILE__, __LINE__, "%s: accepted, expected '%s'", path, want);
        return 0;
    }
    if (!strstr(err.msg, path) || !strstr(err.msg, want)) {
        test_fail(__FILE__, __LINE__, "message '%s' lacks the path or '%s'", err.msg, want);
        return 0;
    }
    int st = test_sh("%s info '%s'", test_lorakit(), path);
    if (st != 1 || !strstr(test_output(), want) || !strstr(test_output(), "lorakit info: error: ")) {
        test_fail(__FILE__, __LINE__, "lorakit info exit %d, output: %s", st, test_output());
        return 0;
    }
    // the same file as a model's weights: `lorakit logits` exits 1 naming it, writes nothing
    st = test_sh("mkdir -p '%s/m' && printf '%%s' '{\"architectures\":[\"Qwen2ForCausalLM\"],"
                 "\"model_type\":\"qwen2\",\"hidden_size\":8,\"intermediate_size\":16,"
                 "\"num_hidden_layers\":1,\"num_attention_heads\":2,\"num_key_value_heads\":1,"
                 "\"vocab_size\":16,\"rms_norm_eps\":1e-6,\"tie_word_embeddings\":true}' > '%s/m/config.json' "
                 "&& cp '%s' '%s/m/model.safetensors'",
                 test_tmpdir(), test_tmpdir(), path, test_tmpdir());
    if (st != 0) {
        test_fail(__FILE__, __LINE__, "fixture: %s", test_output());
        return 0;
    }
    st = test_sh("%s logits --model '%s/m' --tokens 1,2 --out '%s/logits.safetensors'", test_lorakit(),
                 test_tmpdir(), test_tmpdir());
    if (st != 1 || !strstr(test_output(), want) || !strstr(test_output(), "model.safetensors") ||
        !strstr(test_output(), "lorakit logits: error: ") || lk_file_exists(test_path("logits.safetensors"))) {
        test_fail(__FILE__, __LINE__, "lorakit logits exit %d, output: %s", st, test_output());
        return 0;
    }
    return 1;
}

#define REFUSED(header, data_len, want)                                                            \
    do {                                                                                           \
        if (!expect_refused(write_raw("bad.safetensors", header, data_len), want))                 \
            return;                                                                                \
    } while (0)

static const char *GOOD = "{\"a\":{\"dtype\":\"F32\",\"shape\":[2,2],\"data_offsets\":[0,16]},"
                          "\"b\":{\"dtype\":\"BF16\",\"shape\":[3],\"data_offsets\":[16,22]}}";

TEST(st_reads_hand_made_file)
{
    const char *p = write_raw("ok.safetensors", GOOD, 22);
    struct st_file f;
    CHECK_OK(st_open(&f, p, test_err()));
    CHECK_INT(f.n, 2);
    const struct st_tensor *a = st_find(&f, "a"), *b = st_find(&f, "b");
    CHECK(a && b && !st_find(&f, "c"));
    CHECK(a->dtype == TENSOR_F32 && a->ndim == 2 && a->shape[0] == 2 && a->numel == 4);
    CHECK(b->dtype == TENSOR_BF16 && b->offset == 16 && b->nbytes == 6);
    CHECK(((const unsigned char *)b->data)[0] == 16); // data byte i holds i
    CHECK(f.header_len == strlen(GOOD) && f.data_len == 22);
    st_close(&f);
    st_close(&f); // harmless twice
}

// ---- malformed files: one test each ----

TEST(st_rejects_header_length_beyond_file)
{
    const char *p = write_raw("bad.safetensors", GOOD, 22);
    FILE *fp = fopen(p, "r+b");
    unsigned char big[8] = { 0xFF, 0xFF, 0, 0, 0, 0, 0, 0 }; // 65535 > file size
    fwrite(big, 1, 8, fp);
    fclose(fp);
    CHECK(expect_refused(p, "header length 65535 exceeds the file"));
    fp = fopen(p, "r+b");
    unsigned char huge[8] = { 0, 0, 0, 0, 0, 0, 0, 0x80 }; // 2^63
    fwrite(huge, 1, 8, fp);
    fclose(fp);
    CHECK(expect_refused(p, "exceeds the file"));
}

TEST(st_rejects_header_length_zero)
{
    REFUSED("", 4, "header length is 0");
}

TEST(st_rejects_file_shorter_than_length)
{
    const char *p = test_path("short.safetensors");
    FILE *fp = fopen(p, "wb");
    fwrite("\x02\0\0", 1, 3, fp);
    fclose(fp);
    CHECK(expect_refused(p, "too short"));
}

TEST(st_rejects_truncation_at_every_offset)
{
    const char *p = write_raw("ok.safetensors", GOOD, 22);
    char *buf;
    size_t len;
    CHECK_OK(lk_read_file(p, &buf, &len, test_err()));
    for (size_t cut = 0; cut < len; cut++) {
        struct st_file f;
        struct lk_err err = { 0 };
        CHECK_MSG(st_open_buffer(&f, buf, cut, "cut.safetensors", &err) != LK_OK, "accepted cut at %zu", cut);
        CHECK_MSG(!strncmp(err.msg, "cut.safetensors: ", 17), "cut %zu: %s", cut, err.msg);
    }
    // and a few of them through the CLI, from files on disk
    for (size_t cut = 0; cut < len; cut += 13) {
        FILE *fp = fopen(test_path("cut.safetensors"), "wb");
        fwrite(buf, 1, cut, fp);
        fclose(fp);
        CHECK_INT(test_sh("%s info '%s'", test_lorakit(), test_path("cut.safetensors")), 1);
        CHECK(strstr(test_output(), "cut.safetensors: ") != NULL);
    }
    lk_free(buf);
}

TEST(st_rejects_non_json_header)
{
    REFUSED("{\"a\":{\"dtype\":\"F32\",", 0, "header is not valid JSON");
}

TEST(st_rejects_header_not_object)
{
    REFUSED("[1, 2, 3]", 0, "header is not a JSON object");
}

TEST(st_rejects_entry_not_object)
{
    REFUSED("{\"w\": 3}", 0, "tensor 'w' is not a JSON object");
}

TEST(st_rejects_trailing_bytes_after_json)
{
    REFUSED("{}  x", 0, "trailing bytes after the JSON object");
}

TEST(st_rejects_invalid_utf8)
{
    REFUSED("{\"\xC3\x28\":{}}", 0, "not valid UTF-8");
}

TEST(st_rejects_unknown_dtype)
{
    REFUSED("{\"w\":{\"dtype\":\"F8_E4M3\",\"shape\":[2],\"data_offsets\":[0,2]}}", 2,
            "tensor 'w' has unknown dtype 'F8_E4M3'");
}

TEST(st_rejects_missing_dtype)
{
    REFUSED("{\"w\":{\"dtype\":4,\"shape\":[2],\"data_offsets\":[0,2]}}", 2, "tensor 'w' has no 'dtype' string");
}

TEST(st_rejects_negative_shape)
{
    REFUSED("{\"w\":{\"dtype\":\"U8\",\"shape\":[-2],\"data_offsets\":[0,2]}}", 2,
            "tensor 'w' has a bad shape: dimension 0 is not a non-negative integer");
}

TEST(st_rejects_non_integer_shape)
{
    REFUSED("{\"w\":{\"dtype\":\"U8\",\"shape\":[1, 2.5],\"data_offsets\":[0,2]}}", 2,
            "tensor 'w' has a bad shape: dimension 1");
    REFUSED("{\"w\":{\"dtype\":\"U8\",\"shape\":[\"2\"],\"data_offsets\":[0,2]}}", 2, "dimension 0");
    REFUSED("{\"w\":{\"dtype\":\"U8\",\"shape\":2,\"data_offsets\":[0,2]}}", 2, "has no 'shape' array");
}

TEST(st_rejects_too_many_dims)
{
    REFUSED("{\"w\":{\"dtype\":\"U8\",\"shape\":[1,1,1,1,1,1,1,1,1],\"data_offsets\":[0,1]}}", 1,
            "tensor 'w' has 9 dimensions");
}

TEST(st_rejects_bad_data_offsets)
{
    REFUSED("{\"w\":{\"dtype\":\"U8\",\"shape\":[2],\"data_offsets\":[0]}}", 2, "no 'data_offsets' pair");
    REFUSED("{\"w\":{\"dtype\":\"U8\",\"shape\":[0],\"data_offsets\":[2,1]}}", 2, "begin > end");
}

TEST(st_rejects_size_mismatch)
{
    REFUSED("{\"w\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,6]}}", 6,
            "tensor 'w' has 6 bytes of data but its dtype F32 and shape need 8");
}

TEST(st_rejects_offsets_outside_data)
{
    REFUSED("{\"w\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]}}", 7,
            "tensor 'w' lies outside the data area");
}

TEST(st_rejects_overlapping_tensors)
{
    REFUSED("{\"x\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]},"
            "\"y\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[4,12]}}",
            12, "tensors 'x' and 'y' overlap");
}

TEST(st_rejects_gap_between_tensors)
{
    REFUSED("{\"x\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]},"
            "\"y\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[8,12]}}",
            12, "bytes 4..8 of the data area belong to no tensor");
}

TEST(st_rejects_trailing_data)
{
    REFUSED("{\"x\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]}}", 9,
            "the data area has 5 trailing bytes not covered by any tensor");
}

TEST(st_rejects_duplicate_names)
{
    REFUSED("{\"x\":{\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[0,1]},"
            "\"x\":{\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[1,2]}}",
            2, "duplicate tensor 'x'");
}

TEST(st_rejects_shape_product_overflow)
{
    // 2^32 * 2^32 elements overflow size_t; the trailing 0 must not hide it
    REFUSED("{\"x\":{\"dtype\":\"U8\",\"shape\":[4294967296,4294967296,0],\"data_offsets\":[0,0]}}", 0,
            "tensor 'x' has a shape whose size overflows");
    // numel fits but numel * 8 bytes does not
    REFUSED("{\"x\":{\"dtype\":\"F64\",\"shape\":[2147483648,2147483648],\"data_offsets\":[0,0]}}", 0,
            "size overflows");
}

TEST(st_rejects_bad_metadata)
{
    REFUSED("{\"__metadata__\":{\"format\":1}}", 0, "'__metadata__' value of 'format' is not a string");
    REFUSED("{\"__metadata__\":[]}", 0, "'__metadata__' is not a JSON object");
}

TEST(st_accepts_empty_and_scalar_tensors)
{
    // a scalar (shape []) and an empty tensor sharing the offset of the next one
    const char *p = write_raw("ok.safetensors",
                              "{\"__metadata__\":{\"format\":\"pt\"},\"s\":{\"dtype\":\"F32\",\"shape\":[],"
                              "\"data_offsets\":[0,4]},\"e\":{\"dtype\":\"F16\",\"shape\":[0,3],"
                              "\"data_offsets\":[4,4]},\"t\":{\"dtype\":\"U8\",\"shape\":[1],"
                              "\"data_offsets\":[4,5]}}", 5);
    struct st_file f;
    CHECK_OK(st_open(&f, p, test_err()));
    CHECK_INT(f.n, 3);
    CHECK(!strcmp(st_meta(&f, "format"), "pt") && st_meta(&f, "x") == NULL);
    CHECK(st_find(&f, "s")->numel == 1 && st_find(&f, "e")->numel == 0);
    st_close(&f);
}

// ---- writing ----

TEST(st_writer_matches_published_bytes)
{
    // What the Python safetensors library writes for save_file({"a": tensor([1., 2.])},
    // metadata={"format": "pt"}): compact JSON, metadata first, spaces up to a multiple of 8.
    const char *hdr = "{\"__metadata__\":{\"format\":\"pt\"},\"a\":{\"dtype\":\"F32\",\"shape\":[2],"
                      "\"data_offsets\":[0,8]}}";
    size_t hl = strlen(hdr), padded = (hl + 7) / 8 * 8;
    unsigned char want[256] = { 0 };
    for (int i = 0; i < 8; i++)
        want[i] = (unsigned char)((uint64_t)padded >> (8 * i));
    memcpy(want + 8, hdr, hl);
    memset(want + 8 + hl, ' ', padded - hl);
    const unsigned char data[8] = { 0, 0, 0x80, 0x3F, 0, 0, 0, 0x40 }; // 1.0f, 2.0f little-endian
    memcpy(want + 8 + padded, data, 8);
    float v[2] = { 1, 2 };
    struct st_item it = { "a", 1, { 2 }, v };
    CHECK_OK(st_write_f32(test_path("a.safetensors"), &it, 1, TENSOR_F32, test_err()));
    char *buf;
    size_t len;
    CHECK_OK(lk_read_file(test_path("a.safetensors"), &buf, &len, test_err()));
    CHECK_INT(len, 8 + padded + 8);
    CHECK(!memcmp(buf, want, len));
    lk_free(buf);
}

static const float SPECIAL[] = { 1.0f, -2.5f, 0x1p-24f, 65504.0f, 1e-3f, -0.0f, 3.14159f, 1e6f, 0.1f };
#define N_SPECIAL (sizeof SPECIAL / sizeof SPECIAL[0])

TEST(st_roundtrip_is_bit_identical)
{
    // three dtypes plus metadata; the on-disk layout parsed here with cJSON, independently of st.c
    uint16_t bf[N_SPECIAL], hf[N_SPECIAL];
    for (size_t i = 0; i < N_SPECIAL; i++) {
        bf[i] = (uint16_t)(0x3F00 + 7 * i); // arbitrary bit patterns, written raw
        hf[i] = (uint16_t)(0x3C00 + 11 * i);
    }
    const char *p = test_path("rt.safetensors");
    struct st_writer w;
    struct lk_err err = { 0 };
    int64_t s3x3[2] = { 3, 3 }, s9[1] = { 9 };
    CHECK_OK(st_writer_init(&w, p, &err));
    st_writer_meta(&w, "format", "pt");
    st_writer_meta(&w, "note", "quote \" and\nnewline");
    st_writer_declare(&w, "f32", TENSOR_F32, 2, s3x3);
    st_writer_declare(&w, "bf16", TENSOR_BF16, 1, s9);
    st_writer_declare(&w, "f16", TENSOR_F16, 1, s9);
    CHECK_OK(st_writer_begin(&w));
    CHECK(!lk_file_exists(p)); // only the temporary file exists until commit
    st_writer_write(&w, SPECIAL, TENSOR_F32);
    st_writer_write(&w, bf, TENSOR_BF16);
    st_writer_write(&w, hf, TENSOR_F16);
    CHECK_OK(st_writer_commit(&w));
    // read back through st.c
    struct st_file f;
    CHECK_OK(st_open(&f, p, &err));
    CHECK(!memcmp(st_find(&f, "f32")->data, SPECIAL, sizeof SPECIAL));
    CHECK(!memcmp(st_find(&f, "bf16")->data, bf, sizeof bf));
    CHECK(!memcmp(st_find(&f, "f16")->data, hf, sizeof hf));
    CHECK(!strcmp(st_meta(&f, "note"), "quote \" and\nnewline"));
    CHECK(st_tensor_f32(st_find(&f, "f32")) != NULL); // aligned: an in-place view
    CHECK(st_tensor_f32(st_find(&f, "bf16")) == NULL);
    st_close(&f);
    // and by hand against the format
    char *buf;
    size_t len;
    CHECK_OK(lk_read_file(p, &buf, &len, &err));
    uint64_t hl = 0;
    for (int i = 7; i >= 0; i--)
        hl = (hl << 8) | (unsigned char)buf[i];
    CHECK(hl % 8 == 0 && 8 + hl <= len);
    CHECK(buf[8] == '{');
    cJSON *root = cJSON_ParseWithLength(buf + 8, (size_t)hl);
    CHECK(root && cJSON_IsObject(root));
    CHECK(!strcmp(root->child->string, "__metadata__")); // metadata comes first
    const char *names[3] = { "f32", "bf16", "f16" }, *dts[3] = { "F32", "BF16", "F16" };
    size_t sizes[3] = { 36, 18, 18 }, off = 0;
    const void *want[3] = { SPECIAL, bf, hf };
    for (int i = 0; i < 3; i++) {
        cJSON *e = cJSON_GetObjectItemCaseSensitive(root, names[i]);
        CHECK(e && !strcmp(cJSON_GetObjectItemCaseSensitive(e, "dtype")->valuestring, dts[i]));
        cJSON *o = cJSON_GetObjectItemCaseSensitive(e, "data_offsets");
        CHECK(cJSON_GetArraySize(o) == 2);
        CHECK((size_t)o->child->valuedouble == off && (size_t)o->child->next->valuedouble == off + sizes[i]);
        CHECK(!memcmp(buf + 8 + hl + off, want[i], sizes[i]));
        off += sizes[i];
    }
    CHECK(8 + hl + off == len);
    cJSON *sh = cJSON_GetObjectItemCaseSensitive(cJSON_GetObjectItemCaseSensitive(root, "f32"), "shape");
    CHECK(cJSON_GetArraySize(sh) == 2 && sh->child->valueint == 3);
    cJSON_Delete(root);
    lk_free(buf);
}

TEST(st_writer_converts_and_streams_chunks)
{
    // F32 source declared BF16/F16, written whole and in uneven chunks: same bytes; the values are
    // the hand-computed patterns of tensor_test (1.0, -2.5, 2^-24 ...)
    const char *p = test_path("c.safetensors");
    struct st_writer w;
    struct lk_err err = { 0 };
    int64_t s9[1] = { 9 };
    st_writer_init(&w, p, &err);
    st_writer_declare(&w, "b", TENSOR_BF16, 1, s9);
    st_writer_declare(&w, "h", TENSOR_F16, 1, s9);
    st_writer_declare(&w, "hb", TENSOR_BF16, 1, s9);
    st_writer_begin(&w);
    st_writer_write(&w, SPECIAL, TENSOR_F32);
    st_writer_write_chunk(&w, SPECIAL, TENSOR_F32, 4);
    st_writer_write_chunk(&w, SPECIAL + 4, TENSOR_F32, 0);
    st_writer_write_chunk(&w, SPECIAL + 4, TENSOR_F32, 5);
    uint16_t h16[N_SPECIAL] = { 0x3C00, 0xC100 }; // 1.0, -2.5 in f16: F16 source -> BF16 file
    st_writer_write(&w, h16, TENSOR_F16);
    CHECK_OK(st_writer_commit(&w));
    struct st_file f;
    CHECK_OK(st_open(&f, p, &err));
    const uint16_t *b = st_find(&f, "b")->data, *h = st_find(&f, "h")->data, *hb = st_find(&f, "hb")->data;
    CHECK(b[0] == 0x3F80 && b[1] == 0xC020 && b[2] == 0x3380);
    CHECK(h[0] == 0x3C00 && h[1] == 0xC100 && h[2] == 0x0001 && h[3] == 0x7BFF && h[5] == 0x8000);
    CHECK(hb[0] == 0x3F80 && hb[1] == 0xC020 && hb[2] == 0);
    float back[N_SPECIAL];
    CHECK_OK(st_tensor_to_f32(st_find(&f, "h"), back, &err));
    CHECK(back[3] == 65504.0f && back[2] == 0x1p-24f);
    st_close(&f);
}

TEST(st_writer_incomplete_leaves_nothing)
{
    const char *p = test_path("inc.safetensors");
    struct st_writer w;
    struct lk_err err = { 0 };
    int64_t s2[1] = { 2 };
    float v[2] = { 1, 2 };
    st_writer_init(&w, p, &err);
    st_writer_declare(&w, "a", TENSOR_F32, 1, s2);
    st_writer_declare(&w, "b", TENSOR_F32, 1, s2);
    st_writer_begin(&w);
    st_writer_write(&w, v, TENSOR_F32);
    CHECK(st_writer_commit(&w) != LK_OK);
    CHECK(strstr(err.msg, "only 1 of 2 tensors") && strstr(err.msg, "inc.safetensors"));
    CHECK(!lk_file_exists(p));
    CHECK_INT(test_sh("ls -A '%s' | grep -c tmp", test_tmpdir()), 1); // no temp file left
    // duplicate declarations are refused at begin, and too many elements in a chunk
    struct lk_err e2 = { 0 };
    st_writer_init(&w, p, &e2);
    st_writer_declare(&w, "a", TENSOR_F32, 1, s2);
    st_writer_declare(&w, "a", TENSOR_F32, 1, s2);
    CHECK(st_writer_begin(&w) != LK_OK && strstr(e2.msg, "declared twice"));
    st_writer_abort(&w);
    struct lk_err e3 = { 0 };
    st_writer_init(&w, p, &e3);
    st_writer_declare(&w, "a", TENSOR_F32, 1, s2);
    st_writer_begin(&w);
    CHECK(st_writer_write_chunk(&w, v, TENSOR_F32, 3) == LK_ERR_SHAPE);
    st_writer_abort(&w);
    CHECK(!lk_file_exists(p));
}

// ---- sharded models ----

/* Writes n tensors "t.K" of K+1 x 4 floats (value K*100 + i) through the model writer. */
static int write_model(const char *dir, int n, size_t shard_size, struct lk_err *err)
{
    struct st_model_writer mw;
    st_model_writer_init(&mw, dir, shard_size, err);
    st_model_writer_meta(&mw, "format", "pt");
    for (int k = 0; k < n; k++) {
        char name[32];
        snprintf(name, sizeof name, "t.%d", k);
        int64_t shape[2] = { k + 1, 4 };
        st_model_writer_declare(&mw, name, TENSOR_F32, 2, shape);
    }
    st_model_writer_begin(&mw);
    float buf[64];
    for (int k = 0; k < n; k++) {
        for (int i = 0; i < (k + 1) * 4; i++)
            buf[i] = (float)(k * 100 + i);
        if (k % 2)
            st_model_writer_write(&mw, buf, TENSOR_F32);
        else { // in two chunks
            st_model_writer_write_chunk(&mw, buf, TENSOR_F32, 3);
            st_model_writer_write_chunk(&mw, buf + 3, TENSOR_F32, (size_t)(k + 1) * 4 - 3);
        }
    }
    return st_model_writer_commit(&mw);
}

TEST(st_model_writer_shards_and_index)
{
    const char *dir = test_tmpdir();
    // tensors of 16, 32, 48, 64, 80 bytes; limit 64: [16 32] [48] [64] [80]
    CHECK_OK(write_model(dir, 5, 64, test_err()));
    CHECK(!lk_file_exists(test_path("model.safetensors")));
    CHECK(lk_file_exists(test_path("model-00001-of-00004.safetensors")));
    CHECK(lk_file_exists(test_path("model-00004-of-00004.safetensors")));
    char *idx;
    CHECK_OK(lk_read_file(test_path("model.safetensors.index.json"), &idx, NULL, test_err()));
    cJSON *root = cJSON_Parse(idx);
    CHECK(root);
    cJSON *md = cJSON_GetObjectItemCaseSensitive(root, "metadata");
    CHECK(cJSON_GetObjectItemCaseSensitive(md, "total_size")->valuedouble == 240);
    cJSON *wm = cJSON_GetObjectItemCaseSensitive(root, "weight_map");
    CHECK(!strcmp(cJSON_GetObjectItemCaseSensitive(wm, "t.1")->valuestring, "model-00001-of-00004.safetensors"));
    CHECK(!strcmp(cJSON_GetObjectItemCaseSensitive(wm, "t.2")->valuestring, "model-00002-of-00004.safetensors"));
    CHECK(!strcmp(cJSON_GetObjectItemCaseSensitive(wm, "t.4")->valuestring, "model-00004-of-00004.safetensors"));
    CHECK(strstr(idx, "{\n  \"metadata\": {\n    \"total_size\": 240\n  },\n  \"weight_map\": {\n    \"t.0\""));
    cJSON_Delete(root);
    lk_free(idx);
    struct st_model m;
    CHECK_OK(st_model_open(&m, dir, test_err()));
    CHECK(m.sharded && m.n_files == 4 && st_model_count(&m) == 5);
    for (int k = 0; k < 5; k++) {
        char name[32];
        snprintf(name, sizeof name, "t.%d", k);
        int fi = -1;
        const struct st_tensor *t = st_model_find(&m, name, &fi);
        CHECK(t && t->shape[0] == k + 1 && fi == (k < 2 ? 0 : k - 1));
        float v[64];
        CHECK_OK(st_tensor_to_f32(t, v, test_err()));
        for (int i = 0; i < (k + 1) * 4; i++)
            CHECK(v[i] == (float)(k * 100 + i));
        CHECK(!strcmp(st_meta(&m.files[fi], "format"), "pt"));
    }
    st_model_close(&m);
}

TEST(st_model_writer_single_file_without_limit)
{
    CHECK_OK(write_model(test_tmpdir(), 3, 0, test_err()));
    CHECK(lk_file_exists(test_path("model.safetensors")));
    CHECK(!lk_file_exists(test_path("model.safetensors.index.json")));
    struct st_model m;
    CHECK_OK(st_model_open(&m, test_tmpdir(), test_err()));
    CHECK(!m.sharded && m.n_files == 1 && st_model_count(&m) == 3);
    st_model_close(&m);
}

TEST(st_model_writer_abort_removes_shards)
{
    struct st_model_writer mw;
    struct lk_err err = { 0 };
    float v[8] = { 0 };
    int64_t s[1] = { 8 };
    st_model_writer_init(&mw, test_tmpdir(), 32, &err);
    st_model_writer_declare(&mw, "a", TENSOR_F32, 1, s);
    st_model_writer_declare(&mw, "b", TENSOR_F32, 1, s);
    st_model_writer_begin(&mw);
    st_model_writer_write(&mw, v, TENSOR_F32);
    st_model_writer_write(&mw, v, TENSOR_F32); // shard 1 committed when shard 2 opens
    CHECK(lk_file_exists(test_path("model-00001-of-00002.safetensors")));
    st_model_writer_abort(&mw);
    CHECK_INT(test_sh("ls -A '%s' | grep -c safetensors", test_tmpdir()), 1); // grep finds none
}

/* A two-shard model in test_tmpdir()/m, returning the folder. */
static const char *sharded_fixture(void)
{
    const char *dir = test_path("m");
    lk_mkdir_p(dir, NULL);
    if (write_model(dir, 3, 50, test_err()))
        return NULL;
    return dir;
}

static int expect_model_refused(const char *dir, const char *want)
{
    struct st_model m;
    struct lk_err err = { 0 };
    if (st_model_open(&m, dir, &err) == LK_OK) {
        st_model_close(&m);
        test_fail(__FILE__, __LINE__, "accepted, expected '%s'", want);
        return 0;
    }
    if (!strstr(err.msg, want) || !strstr(err.msg, dir)) {
        test_fail(__FILE__, __LINE__, "message '%s' lacks '%s' or the folder", err.msg, want);
        return 0;
    }
    return 1;
}

static void write_index(const char *dir, const char *text)
{
    char *p = lk_path_join(dir, "model.safetensors.index.json");
    lk_write_file_atomic(p, text, strlen(text), NULL);
    lk_free(p);
}

TEST(st_model_rejects_bad_index_json)
{
    const char *dir = sharded_fixture();
    CHECK(dir);
    write_index(dir, "{\"weight_map\": {\"t.0\": ");
    CHECK(expect_model_refused(dir, "model.safetensors.index.json: not valid JSON"));
    write_index(dir, "{\"metadata\": {}}");
    CHECK(expect_model_refused(dir, "no 'weight_map' object"));
    write_index(dir, "{\"weight_map\": {\"t.0\": 5}}");
    CHECK(expect_model_refused(dir, "weight_map entry 't.0' is not a file name string"));
}

TEST(st_model_rejects_missing_shard)
{
    const char *dir = sharded_fixture();
    CHECK(dir);
    write_index(dir, "{\"weight_map\": {\"t.0\": \"model-00009-of-00009.safetensors\"}}");
    CHECK(expect_model_refused(dir, "shard 'model-00009-of-00009.safetensors' of tensor 't.0' is missing"));
}

TEST(st_model_rejects_tensor_not_in_shard)
{
    const char *dir = sharded_fixture();
    CHECK(dir);
    write_index(dir, "{\"weight_map\": {\"t.0\": \"model-00001-of-00002.safetensors\","
                     " \"t.2\": \"model-00001-of-00002.safetensors\"}}");
    CHECK(expect_model_refused(dir, "tensor 't.2' is not in its shard 'model-00001-of-00002.safetensors'"));
    write_index(dir, "{\"weight_map\": {\"nope\": \"model-00002-of-00002.safetensors\"}}");
    CHECK(expect_model_refused(dir, "tensor 'nope' is not in its shard"));
}

TEST(st_model_rejects_path_traversal)
{
    const char *dir = sharded_fixture();
    CHECK(dir);
    // a valid safetensors file outside the model folder must not be reachable
    float v[4] = { 0 };
    struct st_item it = { "t.0", 2, { 1, 4 }, v };
    CHECK_OK(st_write_f32(test_path("outside.safetensors"), &it, 1, TENSOR_F32, test_err()));
    write_index(dir, "{\"weight_map\": {\"t.0\": \"../outside.safetensors\"}}");
    CHECK(expect_model_refused(dir, "not a plain file name"));
    char abs[1100];
    snprintf(abs, sizeof abs, "{\"weight_map\": {\"t.0\": \"%s\"}}", test_path("outside.safetensors"));
    write_index(dir, abs);
    CHECK(expect_model_refused(dir, "not a plain file name"));
    write_index(dir, "{\"weight_map\": {\"t.0\": \"..\"}}");
    CHECK(expect_model_refused(dir, "not a plain file name"));
}

TEST(st_model_rejects_bad_shard_and_missing_folder)
{
    const char *dir = sharded_fixture();
    CHECK(dir);
    char *shard = lk_path_join(dir, "model-00002-of-00002.safetensors");
    CHECK(truncate(shard, 20) == 0);
    CHECK(expect_model_refused(dir, "model-00002-of-00002.safetensors: "));
    lk_free(shard);
    CHECK(expect_model_refused(test_path("nothing"), "no such model folder"));
    CHECK(expect_model_refused(test_tmpdir(), "no model.safetensors or model.safetensors.index.json"));
}

// ---- allocation failure ----

struct st_sweep {
    const char *buf, *path, *dir; /* the buffer and file of one small file; a sharded folder */
    size_t len;
    struct st_file f;             /* what the operation opened */
    struct st_model m;
};

static int sweep_open_buffer(void *ctx, struct lk_err *err)
{
    struct st_sweep *sw = ctx;
    return st_open_buffer(&sw->f, sw->buf, sw->len, "x", err);
}

static int sweep_open_file(void *ctx, struct lk_err *err)
{
    struct st_sweep *sw = ctx;
    return st_open(&sw->f, sw->path, err);
}

/* After an open: the two tensors and the metadata of the file; closed. */
static int sweep_file_done(void *ctx, int rc)
{
    struct st_sweep *sw = ctx;
    const struct st_file *f = &sw->f;
    const struct st_tensor *b = st_find(f, "b");
    int bad = rc == LK_OK && (f->n != 2 || !b || b->numel != 2 || !st_find(f, "a") || !st_meta(f, "format") ||
                              strcmp(st_meta(f, "format"), "pt"));
    st_close(&sw->f);
    if (bad)
        test_fail(__FILE__, __LINE__, "opened under allocation failures, but the file reads wrong");
    return bad ? -1 : 0;
}

static int sweep_model_open(void *ctx, struct lk_err *err)
{
    struct st_sweep *sw = ctx;
    return st_model_open(&sw->m, sw->dir, err);
}

static int sweep_model_done(void *ctx, int rc)
{
    struct st_sweep *sw = ctx;
    const struct st_model *m = &sw->m;
    const struct st_tensor *t = rc == LK_OK ? st_model_find(m, "t.4", NULL) : NULL;
    float v[20];
    int bad = rc == LK_OK && (!m->sharded || m->n_files != 4 || st_model_count(m) != 5 || !t ||
                              st_tensor_to_f32(t, v, NULL) || v[19] != 419.0f);
    st_model_close(&sw->m);
    if (bad)
        test_fail(__FILE__, __LINE__, "opened under allocation failures, but the model reads wrong");
    return bad ? -1 : 0;
}

/* Entries in a folder (plain libc: no lk_malloc inside a sweep's operation); with rm, removes
 * the files too. */
static int dir_entries(const char *dir, int rm)
{
    DIR *d = opendir(dir);
    if (!d)
        return -1;
    int n = 0;
    struct dirent *e;
    char p[2048];
    while ((e = readdir(d)))
        if (strcmp(e->d_name, ".") && strcmp(e->d_name, "..")) {
            n++;
            snprintf(p, sizeof p, "%s/%s", dir, e->d_name);
            if (rm)
                unlink(p);
        }
    closedir(d);
    return n;
}

/* The model writer: on failure nothing of the folder may remain (shards renamed in included). */
static int sweep_model_write(void *ctx, struct lk_err *err)
{
    const struct st_sweep *sw = ctx;
    return write_model(sw->dir, 5, 64, err);
}

static int sweep_write_done(void *ctx, int rc)
{
    const struct st_sweep *sw = ctx;
    if (rc != LK_OK && dir_entries(sw->dir, 0) != 0) {
        test_fail(__FILE__, __LINE__, "a failed write left %d files behind", dir_entries(sw->dir, 0));
        return -1;
    }
    if (rc == LK_OK && dir_entries(sw->dir, 1) != 5) { // 4 shards and the index, removed
        test_fail(__FILE__, __LINE__, "the model was written without its 4 shards and index");
        return -1;
    }
    return 0;
}

TEST(st_open_survives_allocation_failures)
{
    // every allocation of each reader fails in turn, until a run completes with none failing:
    // only LK_OK (right contents) or LK_ERR_NOMEM, nothing left allocated
    const char *hdr = "{\"__metadata__\":{\"format\":\"pt\"},\"a\":{\"dtype\":\"F32\",\"shape\":[1],"
                      "\"data_offsets\":[0,4]},\"b\":{\"dtype\":\"U8\",\"shape\":[2],\"data_offsets\":[4,6]}}";
    struct st_sweep sw = { 0 };
    char *buf;
    sw.path = write_raw("ok.safetensors", hdr, 6);
    CHECK_OK(lk_read_file(sw.path, &buf, &sw.len, test_err()));
    sw.buf = buf;
    long n1 = ALLOC_SWEEP("st_open_buffer", sweep_open_buffer, sweep_file_done, &sw, 1000);
    long n2 = ALLOC_SWEEP("st_open", sweep_open_file, sweep_file_done, &sw, 1000);
    lk_free(buf);
    CHECK(n1 >= 8 && n2 >= n1); // path, tensors, names, sorted index, metadata: all were reached
    char dir[1024];
    snprintf(dir, sizeof dir, "%s", test_path("m"));
    CHECK_OK(lk_mkdir_p(dir, test_err()));
    CHECK_OK(write_model(dir, 5, 64, test_err()));
    sw.dir = dir;
    long n3 = ALLOC_SWEEP("st_model_open (index, 4 shards)", sweep_model_open, sweep_model_done, &sw, 5000);
    CHECK(n3 > 4 * n1);
    CHECK(dir_entries(dir, 1) == 5);
    long n4 = ALLOC_SWEEP("st_model_writer (4 shards)", sweep_model_write, sweep_write_done, &sw, 5000);
    CHECK(n4 > 20);
    fprintf(stderr, "    allocations made to fail: st_open_buffer %ld, st_open %ld, st_model_open %ld, "
            "st_model_writer %ld\n", n1, n2, n3, n4);
}
