/* fuzz_tok.c - tokenizer.json (tok_load_json). Bytes after the first NUL, when there is one,
 * are tokenizer_config.json. A tokenizer that loads encodes and decodes a fixed text. */
#include "fuzz_util.h"

#include "../../libcore/tok.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    char *s = fz_cstr(data, size);
    size_t n = strlen(s);
    const char *cfgj = n < size ? s + n + 1 : NULL;
    struct tok *t = NULL;
    struct lk_err err = { 0 };
    int rc = tok_load_json(&t, s, n, cfgj, "tokenizer.json", &err);
    fz_check_err(rc, &err);
    if (!rc) {
        static const char text[] = "Hello wor\xc3\xa9ld <|im_end|> 12 \xe4\xb8\xad\xe6\x96\x87 \xf0\x9f\x98\x80!";
        struct tok_ids ids = { 0 };
        struct lk_err e2 = { 0 };
        int r2 = tok_encode(t, text, sizeof text - 1, 1, &ids, &e2);
        fz_check_err(r2, &e2);
        if (!r2) {
            for (size_t i = 0; i < ids.n; i++)
                if (ids.v[i] < 0 || ids.v[i] >= tok_vocab_size(t))
                    abort();
            char *out = NULL;
            size_t olen = 0;
            if (tok_decode(t, ids.v, ids.n, 0, &out, &olen, &e2) == LK_OK)
                lk_free(out);
        }
        tok_ids_release(&ids);
        tok_free(t);
    }
    free(s);
    return 0;
}
