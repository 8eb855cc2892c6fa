/*
 * init.c - `lorakit init`: a randomly initialised model in the Hugging Face layout
 * (config.json, generation_config.json, model.safetensors or shards + index), from a
 * config.json or a named preset. Weights stream tensor by tensor in chunks, so memory stays
 * small whatever the model size; the folder is built under a temporary name beside --out
 * and renamed into place when complete (lk_outdir).
 */
#include <cJSON.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "../libcore/cfg.h"
#include "../libcore/lk.h"
#include "../libcore/st.h"
#include "commands.h"
#include "opts.h"

#define INIT_CHUNK 65536 /* floats generated per step */

static const struct cmd_help init_help = {
    "init",
    "(--config CONFIG.json | --preset NAME) --out DIR [options]",
    "Writes a randomly initialised LlamaForCausalLM / Qwen2ForCausalLM model to DIR, in the\n"
    "Hugging Face layout: config.json (torch_dtype set from --dtype), generation_config.json,\n"
    "model.safetensors, or model-0000K-of-0000N.safetensors shards plus\n"
    "model.safetensors.index.json when --shard-size is exceeded. Linear weights, embeddings\n"
    "and lm_head are drawn from normal(0, initializer_range) (0.02 unless the config says\n"
    "otherwise) with the seeded generator; RMSNorm weights are 1; the attention biases (q/k/v,\n"
    "and o_proj for Llama with attention_bias) are also drawn from normal(0, initializer_range),\n"
    "not zero, so that fixtures exercise the bias path. The same seed gives the same bytes.\n"
    "Presets: tiny (Qwen2, hidden 64, 2 layers, vocab 512, tied), qwen2.5-0.5b, qwen2-1.5b,\n"
    "qwen3-0.6b, llama3.2-1b (the published dimensions), llama-tiny (Llama, untied, no\n"
    "biases). DIR must not exist or be empty unless --overwrite.",
    "  lorakit init --preset tiny --out models/tiny --seed 1\n"
    "  lorakit init --config Qwen2.5-0.5B/config.json --out /tmp/q05 --dtype bf16 --shard-size 500MB",
};

/* "123", "500MB" (10^6), "2GiB" (2^30) ... into bytes. */
static int init_parse_size(const char *s, size_t *out, struct lk_err *err)
{
    char *end;
    errno = 0;
    unsigned long long v = strtoull(s, &end, 10);
    if (errno || end == s || *s == '-')
        return lk_errf(err, LK_ERR_USAGE, "option '--shard-size' wants a byte count, got '%s'", s);
    static const struct {
        const char *suf;
        unsigned long long mul;
    } units[] = { { "", 1 },           { "B", 1 },          { "KB", 1000ull },       { "MB", 1000000ull },
                  { "GB", 1000000000ull }, { "KiB", 1ull << 10 }, { "MiB", 1ull << 20 }, { "GiB", 1ull << 30 } };
    for (size_t i = 0; i < sizeof units / sizeof units[0]; i++)
        if (!strcmp(end, units[i].suf)) {
            if (v > SIZE_MAX / units[i].mul)
                break;
            *out = (size_t)(v * units[i].mul);
            return LK_OK;
        }
    return lk_errf(err, LK_ERR_USAGE, "option '--shard-size' wants a byte count like 500MB, got '%s'", s);
}

static int init_dtype(const char *s, enum tensor_dtype *out, const char **torch)
{
    if (!strcmp(s, "f32") || !strcmp(s, "float32"))
        *out = TENSOR_F32, *torch = "float32";
    else if (!strcmp(s, "bf16") || !strcmp(s, "bfloat16"))
        *out = TENSOR_BF16, *torch = "bfloat16";
    else if (!strcmp(s, "f16") || !strcmp(s, "float16"))
        *out = TENSOR_F16, *torch = "float16";
    else
        return -1;
    return 0;
}

static int init_generation_config(const struct cfg *c, const char *dir, struct lk_err *err)
{
    cJSON *root = cJSON_CreateObject();
    cJSON_AddBoolToObject(root, "_from_model_config", 1);
    if (c->bos_token_id >= 0)
        cJSON_AddNumberToObject(root, "bos_token_id", c->bos_token_id);
    if (c->eos_token_id >= 0)
        cJSON_AddNumberToObject(root, "eos_token_id", c->eos_token_id);
    char *text = cfg_json_print(root);
    cJSON_Delete(root);
    char *path = lk_path_join(dir, "generation_config.json");
    int rc = text && path ? lk_write_file_atomic(path, text, strlen(text), err)
                          : lk_errf(err, LK_ERR_NOMEM, "out of memory");
    lk_free(text);
    lk_free(path);
    return rc;
}

/* Writes the weights of c into dir through the sharded writer, chunk by chunk. */
static int init_weights(const struct cfg *c, const char *dir, enum tensor_dtype dt, size_t shard,
                        uint64_t seed, struct lk_err *err)
{
    struct cfg_tensor *ts;
    int n;
    if (cfg_tensors(c, &ts, &n, err))
        return err->code;
    float *buf = lk_malloc(sizeof(float) * INIT_CHUNK);
    if (!buf) {
        lk_free(ts);
        return lk_errf(err, LK_ERR_NOMEM, "out of memory");
    }
    struct st_model_writer mw;
    st_model_writer_init(&mw, dir, shard, err);
    st_model_writer_meta(&mw, "format", "pt");
    char seedtxt[32];
    snprintf(seedtxt, sizeof seedtxt, "%llu", (unsigned long long)seed);
    st_model_writer_meta(&mw, "lorakit_init_seed", seedtxt);
    for (int i = 0; i < n; i++)
        st_model_writer_declare(&mw, ts[i].name, dt, ts[i].ndim, ts[i].shape);
    st_model_writer_begin(&mw);
    struct lk_rng rng;
    lk_rng_seed(&rng, seed);
    float sd = (float)c->initializer_range;
    int tty = isatty(2);
    for (int i = 0; i < n && !err->code; i++) {
        size_t numel = (size_t)ts[i].shape[0] * (size_t)(ts[i].ndim == 2 ? ts[i].shape[1] : 1);
        for (size_t done = 0; done < numel && !err->code; done += INIT_CHUNK) {
            if (lk_interrupted) {
                lk_errf(err, LK_ERR_INTERRUPTED, "interrupted");
                break;
            }
            size_t k = numel - done < INIT_CHUNK ? numel - done : INIT_CHUNK;
            for (size_t j = 0; j < k; j++)
                buf[j] = ts[i].kind == CFG_T_NORM ? 1.0f : sd * lk_rng_normal(&rng);
            st_model_writer_write_chunk(&mw, buf, TENSOR_F32, k);
        }
        if (tty)
            fprintf(stderr, "\rinit: %d/%d tensors", i + 1, n);
    }
    if (tty)
        fprintf(stderr, "\n");
    lk_free(buf);
    lk_free(ts);
    if (err->code) {
        st_model_writer_abort(&mw);
        return err->code;
    }
    return st_model_writer_commit(&mw);
}

int cmd_init(int argc, char **argv)
{
    const char *config = NULL, *preset = NULL, *out = NULL, *dtype_s = NULL, *shard_s = NULL;
    long seed = 0;
    int overwrite = 0, help = 0;
    struct lk_err err = { 0 };
    const struct opt opts[] = {
        { "config", OPT_STR, &config, "FILE", "config.json to initialise (or a folder holding it)" },
        { "preset", OPT_STR, &preset, "NAME", "tiny, qwen2.5-0.5b, qwen2-1.5b, qwen3-0.6b, llama3.2-1b or llama-tiny (instead of --config)" },
        { "out", OPT_STR, &out, "DIR", "output folder (must not exist or be empty)" },
        { "seed", OPT_INT, &seed, "S", "random seed (default 0); same seed, same bytes" },
        { "dtype", OPT_STR, &dtype_s, "T", "f32, bf16 or f16 (default: the config's torch_dtype)" },
        { "shard-size", OPT_STR, &shard_s, "BYTES", "start a new shard past this many bytes, e.g. 2GB (default: one file)" },
        { "overwrite", OPT_FLAG, &overwrite, NULL, "replace an existing non-empty --out folder" },
        { 0 },
    };
    if (opts_parse(argc, argv, opts, NULL, 0, NULL, &help, &err))
        return lk_cli_fail("init", &err);
    if (help) {
        opts_usage(stdout, &init_help, opts);
        return 0;
    }
    if (!out || (!config == !preset)) {
        lk_errf(&err, LK_ERR_USAGE, "%s", !out ? "missing --out DIR (see --help)"
                                                : "give exactly one of --config and --preset (see --help)");
        return lk_cli_fail("init", &err);
    }
    size_t shard = 0;
    if (shard_s && init_parse_size(shard_s, &shard, &err))
        return lk_cli_fail("init", &err);
    if (seed < 0) {
        lk_errf(&err, LK_ERR_USAGE, "option '--seed' must be non-negative");
        return lk_cli_fail("init", &err);
    }
    struct cfg c;
    if (config ? cfg_load(&c, config, &err) : cfg_preset(&c, preset, &err))
        return lk_cli_fail("init", &err);
    enum tensor_dtype dt;
    const char *torch;
    if (dtype_s ? init_dtype(dtype_s, &dt, &torch) : init_dtype(c.torch_dtype, &dt, &torch)) {
        if (dtype_s)
            lk_errf(&err, LK_ERR_USAGE, "option '--dtype' wants f32, bf16 or f16, got '%s'", dtype_s);
        else // a config saying "auto" or another type: float32, as transformers' default
            dt = TENSOR_F32, torch = "float32";
        if (dtype_s) {
            cfg_release(&c);
            return lk_cli_fail("init", &err);
        }
    }
    snprintf(c.torch_dtype, sizeof c.torch_dtype, "%s", torch);

    // the output folder: refuse a non-empty one unless --overwrite; build beside it
    struct lk_outdir od;
    char *cfgp = NULL;
    int rc = lk_outdir_begin(&od, out, overwrite, &err);
    if (rc)
        goto done;
    lk_interrupt_install();
    if (!(cfgp = lk_path_join(od.tmp, "config.json"))) {
        rc = lk_errf(&err, LK_ERR_NOMEM, "out of memory");
        goto done;
    }
    if ((rc = cfg_save(&c, cfgp, &err)) || (rc = init_generation_config(&c, od.tmp, &err)) ||
        (rc = init_weights(&c, od.tmp, dt, shard, (uint64_t)seed, &err)) || (rc = lk_outdir_commit(&od, &err)))
        goto done;
    printf("wrote %s: %s, %lld parameters, %s, seed %ld\n", out, c.architecture, (long long)cfg_param_count(&c),
           torch, seed);
done:
    lk_outdir_abort(&od);
    lk_free(cfgp);
    cfg_release(&c);
    return rc ? lk_cli_fail("init", &err) : 0;
}
