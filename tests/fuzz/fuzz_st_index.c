/* fuzz_st_index.c - model.safetensors.index.json through st_model_open: the input is the
 * index; the folder holds two valid shards written once (x.weight [2,2], y.bias [2] in the
 * first; z.weight [3] in the second), so weight_map names, shard names (no '/', '..') and
 * tensors missing from a shard are exercised. */
#include "fuzz_util.h"

#include "../../libcore/st.h"

static void setup(void)
{
    static int done;
    if (done)
        return;
    done = 1;
    static const float v[4] = { 1, 2, 3, 4 };
    struct st_item a[2] = { { "x.weight", 2, { 2, 2 }, v }, { "y.bias", 1, { 2 }, v } };
    struct st_item b[1] = { { "z.weight", 1, { 3 }, v } };
    struct lk_err err = { 0 };
    char p[600];
    snprintf(p, sizeof p, "%s", fz_path("model-00001-of-00002.safetensors"));
    if (st_write_f32(p, a, 2, TENSOR_F32, &err))
        abort();
    snprintf(p, sizeof p, "%s", fz_path("model-00002-of-00002.safetensors"));
    if (st_write_f32(p, b, 1, TENSOR_BF16, &err))
        abort();
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    setup();
    fz_write(fz_path("model.safetensors.index.json"), data, size);
    struct st_model m;
    struct lk_err err = { 0 };
    int rc = st_model_open(&m, fz_dir(), &err);
    fz_check_err(rc, &err);
    if (!rc) {
        int n = st_model_count(&m);
        if (n < 0 || n > 3)
            abort();
        st_model_close(&m);
    }
    return 0;
}
