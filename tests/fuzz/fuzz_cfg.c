/* fuzz_cfg.c - config.json (cfg_parse), then the tensor list and parameter count it implies. */
#include "fuzz_util.h"

#include "../../libcore/cfg.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    char *s = fz_cstr(data, size);
    struct cfg c;
    struct lk_err err = { 0 };
    int rc = cfg_parse(&c, s, "config.json", &err);
    fz_check_err(rc, &err);
    if (!rc) {
        struct cfg_tensor *t = NULL;
        int n = 0;
        struct lk_err e2 = { 0 };
        int r2 = cfg_tensors(&c, &t, &n, &e2);
        fz_check_err(r2, &e2);
        if (!r2)
            lk_free(t);
        if (cfg_param_count(&c) < 0)
            abort();
        cfg_release(&c);
    }
    free(s);
    return 0;
}
