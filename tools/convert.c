/*
 * convert.c - `lorakit convert`: a Hugging Face model folder as one GGUF file for llama.cpp /
 * Ollama / LM Studio (weights, tokenizer, chat template), or a PEFT adapter as a GGUF LoRA.
 * Parses flags, calls gguf_export_model / gguf_export_lora (libcore/gguf.h), prints.
 */
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#include "../libcore/gguf.h"
#include "commands.h"
#include "opts.h"

static const struct cmd_help convert_help = {
    "convert",
    "--model DIR --out FILE.gguf [--dtype f32|f16|bf16|q8_0]   or   --adapter DIR --model DIR --out FILE.gguf",
    "Writes a model folder as one GGUF v3 file as llama.cpp loads it: general.architecture qwen2\n"
    "or llama with its hyper-parameters, llama.cpp's tensor names (Llama's q/k rows permuted for\n"
    "its rotary convention), the tokenizer (tokens, types, merges, bos/eos/pad, add_bos) and the\n"
    "chat template. Tensors stream one at a time (memory: the tokenizer and a 16 MB chunk).\n"
    "--dtype applies to the matrices; norms and biases stay f32, and in q8_0 (blocks of 32\n"
    "values with one f16 scale) a matrix whose rows are not a multiple of 32 stays f32.\n"
    "With --adapter, writes the PEFT adapter as a GGUF LoRA for that base (general.type adapter,\n"
    "adapter.lora.alpha, blk.N.*.weight.lora_a / lora_b; per-module ranks and alphas and rsLoRA\n"
    "folded into B). DoRA, lora_bias, modules_to_save and embedding adapters cannot be GGUF LoRA\n"
    "and are refused: merge them into the model instead. The file appears only when complete.",
    "  lorakit convert --model qwen-med --out qwen-med.q8_0.gguf --dtype q8_0\n"
    "  lorakit convert --adapter runs/med --model qwen --out med-lora.gguf",
};

static void progress(void *ctx, int done, int total, const char *name)
{
    (void)ctx;
    fprintf(stderr, "\rconvert: %d/%d %-60.60s", done, total, name);
    if (done == total)
        fprintf(stderr, "\n");
}

static double mb(uint64_t bytes)
{
    return (double)bytes / 1e6;
}

int cmd_convert(int argc, char **argv)
{
    const char *model = NULL, *adapter = NULL, *out = NULL, *dtype_s = NULL, *name = NULL;
    int overwrite = 0, quiet = 0, help = 0;
    const struct opt opts[] = {
        { "model", OPT_STR, &model, "DIR", "model folder (config.json, safetensors, tokenizer.json)" },
        { "adapter", OPT_STR, &adapter, "DIR", "write this PEFT adapter as a GGUF LoRA for --model" },
        { "out", OPT_STR, &out, "FILE", "output .gguf file" },
        { "dtype", OPT_STR, &dtype_s, "T", "f32 (default), f16, bf16 or q8_0 for the matrices" },
        { "name", OPT_STR, &name, "NAME", "general.name (default: the folder's name)" },
        { "overwrite", OPT_FLAG, &overwrite, NULL, "replace an existing --out file" },
        { "quiet", OPT_FLAG, &quiet, NULL, "no progress output" },
        { 0 },
    };
    struct lk_err err = { 0 };
    if (opts_parse(argc, argv, opts, NULL, 0, NULL, &help, &err))
        return lk_cli_fail("convert", &err);
    if (help) {
        opts_usage(stdout, &convert_help, opts);
        return 0;
    }
    int dtype = dtype_s ? gguf_ttype_parse(dtype_s) : GGUF_T_F32;
    size_t n = out ? strlen(out) : 0;
    if (!model || !out)
        lk_errf(&err, LK_ERR_USAGE, "--model and --out are required (see --help)");
    else if (dtype < 0)
        lk_errf(&err, LK_ERR_USAGE, "option '--dtype' wants f32, f16, bf16 or q8_0, got '%s'", dtype_s);
    else if (n < 5 || strcmp(out + n - 5, ".gguf"))
        lk_errf(&err, LK_ERR_USAGE, "--out '%s' must end in .gguf", out);
    else if (lk_is_dir(out))
        lk_errf(&err, LK_ERR_EXISTS, "--out '%s' is a folder", out);
    else if (lk_file_exists(out) && !overwrite)
        lk_errf(&err, LK_ERR_EXISTS, "'%s' exists (hint: --overwrite replaces it)", out);
    if (err.code)
        return lk_cli_fail("convert", &err);
    lk_interrupt_install();
    if (adapter) {
        struct gguf_lora_report r;
        if (gguf_export_lora(adapter, model, dtype, out, &r, &err))
            return lk_cli_fail("convert", &err);
        printf("wrote %s: GGUF LoRA, %d modules, alpha %g, %s%s, %.2f MB\n", out, r.n_modules, (double)r.alpha,
               gguf_ttype_name(dtype), r.n_folded ? " (per-module scales folded into lora_b)" : "", mb(r.bytes));
        return 0;
    }
    struct gguf_export x = { 0 };
    x.model_dir = model;
    x.dtype = dtype;
    x.name = name;
    if (!quiet && isatty(2))
        x.progress = progress;
    struct gguf_export_report r;
    if (gguf_export_model(&x, out, &r, &err))
        return lk_cli_fail("convert", &err);
    printf("wrote %s: %s, %d tensors, %lld parameters, %s, tokenizer '%s' (%d tokens), %.2f MB\n", out, r.arch,
           r.n_tensors, (long long)r.n_params, gguf_ttype_name(dtype), r.pre, (int)r.n_vocab, mb(r.bytes));
    if (r.n_f32_fallback)
        printf("note: %d matrices kept f32 (rows not a multiple of 32, the q8_0 block)\n", r.n_f32_fallback);
    return 0;
}
