/* fuzz_st.c - the safetensors reader on a buffer (st_open_buffer): header length, JSON,
 * dtypes, shapes, offsets; then every small tensor converted to float32. */
#include "fuzz_util.h"

#include "../../libcore/st.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    struct st_file f;
    struct lk_err err = { 0 };
    int rc = st_open_buffer(&f, data, size, "fuzz.safetensors", &err);
    fz_check_err(rc, &err);
    if (rc)
        return 0;
    for (int i = 0; i < f.n; i++) {
        const struct st_tensor *t = &f.t[i];
        if (st_find(&f, t->name) == NULL)
            abort();
        if (t->numel > 4096)
            continue;
        float *out = malloc(sizeof(float) * (t->numel ? t->numel : 1));
        if (!out)
            abort();
        struct lk_err e2 = { 0 };
        fz_check_err(st_tensor_to_f32(t, out, &e2), &e2);
        free(out);
    }
    for (int i = 0; i < f.n_meta; i++)
        if (!st_meta(&f, f.meta_key[i]))
            abort();
    st_close(&f);
    return 0;
}
