/* fuzz_gguf.c - the GGUF reader on a buffer (gguf_open_buffer): header counts, strings, value
 * types, arrays, tensor infos, offsets; then every value and string element read back, the
 * typed getters on the keys lorakit uses, every small tensor converted to float32, the model
 * config read from the metadata and checked against the tensors (gguf_model_cfg: architectures,
 * head sizes, rope scaling, rope_freqs), and the tokenizer rebuilt from it (gguf_tok_load). */
#include "fuzz_util.h"

#include "../../libcore/gguf.h"
#include "../../libcore/tok.h"

static const char *const keys[] = { "general.architecture", "general.alignment", "qwen2.block_count",
                                    "llama.rope.freq_base", "tokenizer.ggml.add_bos_token", "tokenizer.ggml.tokens",
                                    "lorakit.rope_scaling.factor", "qwen3.attention.key_length" };

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    struct gguf_file f;
    struct lk_err err = { 0 };
    int rc = gguf_open_buffer(&f, data, size, "fuzz.gguf", &err);
    fz_check_err(rc, &err);
    if (rc)
        return 0;
    volatile double sink = 0;
    char tb[64];
    for (int64_t i = 0; i < f.n_kv; i++) {
        const struct gguf_kv *kv = &f.kv[i];
        gguf_kv_type_str(kv, tb, sizeof tb);
        for (uint64_t k = 0; k < kv->n && k < 4096; k++) {
            if (kv->arr_type == GGUF_VT_STRING) {
                struct gguf_str s = gguf_arr_str(kv, k);
                if (s.n && (s.p < (const char *)data || s.p + s.n > (const char *)data + size))
                    abort();
                sink += s.n ? (unsigned char)s.p[s.n - 1] : 0;
            } else {
                sink += gguf_arr_num(kv, k);
            }
        }
    }
    for (size_t i = 0; i < sizeof keys / sizeof keys[0]; i++) {
        char *s = NULL;
        uint64_t u;
        double d;
        int b;
        struct lk_err e2 = { 0 };
        if (gguf_find_kv(&f, keys[i])) {
            if (gguf_get_str(&f, keys[i], &s, &e2) == LK_OK)
                lk_free(s);
            fz_check_err(e2.code, &e2);
            e2.code = LK_OK;
            e2.msg[0] = 0;
            fz_check_err(gguf_get_uint(&f, keys[i], &u, &e2), &e2);
            e2.msg[0] = 0;
            fz_check_err(gguf_get_float(&f, keys[i], &d, &e2), &e2);
            e2.msg[0] = 0;
            fz_check_err(gguf_get_bool(&f, keys[i], &b, &e2), &e2);
        }
    }
    for (int64_t i = 0; i < f.n_tensors; i++) {
        const struct gguf_tensor *t = &f.t[i];
        char name[GGUF_MAX_NAME];
        memcpy(name, t->name.p, (size_t)t->name.n);
        name[t->name.n] = 0;
        if (!memchr(name, 0, (size_t)t->name.n) && gguf_find_tensor(&f, name) != t)
            abort(); // names are unique, so the lookup finds this one
        if (t->data < data || t->nbytes > (size_t)(data + size - t->data))
            abort(); // validated: every tensor lies inside the buffer
        if (t->numel > 4096 || t->ne[0] == 0)
            continue;
        float *out = malloc(sizeof(float) * (t->numel + 1));
        if (!out)
            abort();
        struct lk_err e2 = { 0 };
        fz_check_err(gguf_tensor_rows_f32(&f, t, 0, (int64_t)(t->numel / (size_t)t->ne[0]), out, &e2), &e2);
        free(out);
    }
    struct cfg c;
    struct lk_err e3 = { 0 };
    fz_check_err(gguf_model_cfg(&f, &c, NULL, NULL, &e3), &e3);
    cfg_release(&c);
    struct tok *tk = NULL;
    e3 = (struct lk_err){ 0 };
    if (gguf_find_kv(&f, "tokenizer.ggml.model"))
        fz_check_err(gguf_tok_load(&tk, &f, &e3), &e3);
    tok_free(tk);
    (void)sink;
    gguf_close(&f);
    return 0;
}
