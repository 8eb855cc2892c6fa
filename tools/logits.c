/*
 * logits.c - `lorakit logits`: run token sequences through a model (and adapter) and write the
 * float32 logits [B, T, V] as tensor "logits", so anyone can check parity with another
 * implementation.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../libcore/lora.h"
#include "../libcore/model.h"
#include "../libcore/st.h"
#include "commands.h"
#include "opts.h"

static const struct cmd_help logits_help = {
    "logits",
    "--model DIR [--adapter DIR] --tokens 1,2,3[;4,5,6] --out FILE.safetensors",
    "Runs the model (with the adapter, if given) on B token sequences of equal length T and writes\n"
    "the float32 logits [B, T, V] as the tensor \"logits\" of a .safetensors file.",
    "  lorakit logits --model qwen-tiny --adapter out/adapter --tokens '1,2,3;4,5,6' --out logits.safetensors",
};

/* "1,2,3;4,5,6" into B rows of T ids (all rows the same length). */
static int parse_token_rows(const char *s, int **out, int *B, int *T, struct lk_err *err)
{
    char *copy = lk_strdup(s);
    if (!copy)
        return lk_errf(err, LK_ERR_NOMEM, "out of memory");
    int cap = 64, n = 0, rows = 0, width = -1;
    int *ids = lk_malloc(sizeof(int) * (size_t)cap);
    int rc = LK_OK;
    char *save = NULL;
    for (char *row = strtok_r(copy, ";", &save); row && !rc; row = strtok_r(NULL, ";", &save)) {
        long *v;
        int k;
        if ((rc = opts_parse_longs(row, &v, &k, err)))
            break;
        if (k == 0)
            rc = lk_errf(err, LK_ERR_USAGE, "--tokens: empty sequence");
        else if (width >= 0 && k != width)
            rc = lk_errf(err, LK_ERR_USAGE, "--tokens: sequences have different lengths (%d and %d)", width, k);
        for (int i = 0; i < k && !rc; i++) {
            if (v[i] < 0 || v[i] > 0x7fffffff) {
                rc = lk_errf(err, LK_ERR_USAGE, "--tokens: bad token id %ld", v[i]);
                break;
            }
            if (n == cap) {
                cap *= 2;
                int *nv = lk_realloc(ids, sizeof(int) * (size_t)cap);
                if (!nv) {
                    rc = lk_errf(err, LK_ERR_NOMEM, "out of memory");
                    break;
                }
                ids = nv;
            }
            ids[n++] = (int)v[i];
        }
        width = k;
        rows++;
        lk_free(v);
    }
    lk_free(copy);
    if (!rc && rows == 0)
        rc = lk_errf(err, LK_ERR_USAGE, "--tokens: no sequence given");
    if (rc) {
        lk_free(ids);
        return rc;
    }
    *out = ids;
    *B = rows;
    *T = width;
    return LK_OK;
}

int cmd_logits(int argc, char **argv)
{
    const char *model_dir = NULL, *adapter = NULL, *tokens = NULL, *out = NULL, *weights = NULL;
    long threads = 0;
    int keep;
    const struct opt opts[] = {
        { "model", OPT_STR, &model_dir, "DIR", "model folder (config.json + safetensors) or .gguf file" },
        { "adapter", OPT_STR, &adapter, "DIR", "PEFT LoRA adapter folder to apply" },
        { "tokens", OPT_STR, &tokens, "IDS", "comma-separated ids; ';' separates sequences" },
        { "out", OPT_STR, &out, "FILE", "output .safetensors file" },
        { "threads", OPT_INT, &threads, "N", "threads (default: all cores)" },
        { "weights", OPT_STR, &weights, "W", "file (the file's bf16/f16 kept in memory; default) or f32" },
        { 0 },
    };
    struct lk_err err = { 0 };
    int help;
    if (opts_parse(argc, argv, opts, NULL, 0, NULL, &help, &err))
        return lk_cli_fail("logits", &err);
    if (help) {
        opts_usage(stdout, &logits_help, opts);
        return 0;
    }
    if (!model_dir || !tokens || !out) {
        lk_errf(&err, LK_ERR_USAGE, "--model, --tokens and --out are required (see --help)");
        return lk_cli_fail("logits", &err);
    }
    if (threads < 0 || threads > 4096)
        lk_errf(&err, LK_ERR_USAGE, "option '--threads' must be in 0..4096");
    if (err.code || lk_cli_weights(weights, MODEL_KEEP_FILE, &keep, &err))
        return lk_cli_fail("logits", &err);
    lk_cli_threads(threads);
    int *ids = NULL, B = 0, T = 0;
    if (parse_token_rows(tokens, &ids, &B, &T, &err))
        return lk_cli_fail("logits", &err);
    struct model m;
    struct lora l = { 0 };
    int rc = model_load_keep(&m, model_dir, (enum model_keep)keep, &err);
    if (rc) {
        lk_free(ids);
        return lk_cli_fail("logits", &err);
    }
    if (adapter && (rc = lora_load(&l, adapter, &m.cfg, &err)) == LK_OK) {
        lk_cli_adapter_keys("logits", adapter, &l.cfg);
        rc = model_apply_extras(&m, &l, &err);
    }
    if (!rc)
        rc = model_plan(&m, B, T, 0, &err);
    if (!rc)
        rc = model_forward(&m, adapter ? &l : NULL, ids, NULL, NULL, NULL, 0, NULL, &err);
    if (!rc) {
        struct st_item it = { "logits", 3, { B, T, m.cfg.vocab_size }, model_logits(&m) };
        rc = st_write_f32(out, &it, 1, TENSOR_F32, &err);
    }
    int V = m.cfg.vocab_size;
    lk_free(ids);
    lora_release(&l);
    model_release(&m);
    if (rc)
        return lk_cli_fail("logits", &err);
    fprintf(stderr, "wrote logits [%d, %d, %d] to %s\n", B, T, V, out);
    return 0;
}
