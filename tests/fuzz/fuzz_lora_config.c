/* fuzz_lora_config.c - adapter_config.json through lora_config_load (it reads a folder: the
 * input is written to DIR/adapter_config.json), then lora_init on a tiny model config when
 * the rank is small enough to allocate quickly. */
#include "fuzz_util.h"

#include "../../libcore/cfg.h"
#include "../../libcore/lora.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    fz_write(fz_path("adapter_config.json"), data, size);
    struct lora_config lc;
    struct lk_err err = { 0 };
    int rc = lora_config_load(&lc, fz_dir(), &err);
    fz_check_err(rc, &err);
    if (rc)
        return 0;
    if (lc.r <= 64) {
        struct cfg c;
        cfg_default_qwen2(&c);
        struct lora l;
        memset(&l, 0, sizeof l);
        struct lk_err e2 = { 0 };
        int r2 = lora_init(&l, &lc, &c, &e2);
        fz_check_err(r2, &e2);
        if (!r2)
            lora_release(&l);
        cfg_release(&c);
    }
    lora_config_release(&lc);
    return 0;
}
