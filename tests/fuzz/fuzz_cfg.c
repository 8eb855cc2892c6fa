/* fuzz_cfg.c - config.json as a model folder's (cfg_load of a folder holding it beside the
 * fixed weights of fuzz_weights.h, so the bound by the weights is exercised), then the tensor
 * list and parameter count it implies. Nothing may be sized beyond what those weights can
 * hold: libFuzzer's -rss_limit_mb turns a config that escapes the bound into a finding. */
#include "fuzz_util.h"
#include "fuzz_weights.h"

#include "../../libcore/cfg.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    static char dir[600], cfgp[700];
    if (!dir[0]) {
        snprintf(dir, sizeof dir, "%s", fz_dir());
        snprintf(cfgp, sizeof cfgp, "%s/config.json", dir);
        char wp[700];
        snprintf(wp, sizeof wp, "%s/model.safetensors", dir);
        if (fz_weights_write(wp))
            abort();
    }
    fz_write(cfgp, data, size);
    struct cfg c;
    struct lk_err err = { 0 };
    int rc = cfg_load(&c, dir, &err);
    fz_check_err(rc, &err);
    if (!rc) {
        struct cfg_tensor *t = NULL;
        int n = 0;
        struct lk_err e2 = { 0 };
        int r2 = cfg_tensors(&c, &t, &n, &e2);
        fz_check_err(r2, &e2);
        if (!r2)
            lk_free(t);
        if (cfg_param_count(&c) < 0 || cfg_param_count(&c) > FZ_WEIGHTS_DATA)
            abort(); // the bound let through more parameters than the weights hold bytes
        cfg_release(&c);
    }
    return 0;
}
