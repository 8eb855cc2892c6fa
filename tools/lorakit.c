/*
 * lorakit.c - the entry point: a table of subcommands (git's builtins) and the dispatch.
 * Each subcommand lives in tools/<name>.c; see commands.h for the checklist.
 */
#include <errno.h>
#include <stdio.h>
#include <string.h>

#include "../libcore/lk.h"
#include "commands.h"

struct command {
    const char *name;
    int (*run)(int argc, char **argv); /* return value is the exit status */
    const char *summary;               /* shown by `lorakit --help` */
};

static int cmd_version(int argc, char **argv);

static const struct command commands[] = { /* keep sorted by name */
    { "convert", cmd_convert, "write a model (or a PEFT adapter) as a GGUF file for llama.cpp / Ollama" },
    { "dash",    cmd_dash,    "browse runs in the terminal" },
    { "diff",    cmd_diff,    "show what a fine-tune changed, tensor by tensor" },
    { "eval", cmd_eval, "compare base, retrieval (rag) and tuned models on questions" },
    { "generate", cmd_generate, "generate text with a KV cache, streamed" },
    { "index", cmd_index, "build an FTS5 retrieval index from documents" },
    { "info",    cmd_info,    "describe a model folder, adapter or .safetensors file" },
    { "init",    cmd_init,    "write a random model in the Hugging Face layout" },
    { "logits",  cmd_logits,  "write the float32 logits of token sequences to a .safetensors file" },
    { "merge",   cmd_merge,   "fold adapters into the weights, or combine them into one adapter" },
    { "search", cmd_search, "search an FTS5 index (BM25)" },
    { "svd-compress", cmd_svd_compress, "turn a full fine-tune into a LoRA adapter (or lower an adapter's rank)" },
    { "tokenize",  cmd_tokenize,  "text to token ids and back; chat templates with labels" },
    { "tokenizer", cmd_tokenizer, "train a byte-level BPE tokenizer (tokenizer train)" },
    { "train",   cmd_train,   "train a LoRA adapter or a full fine-tune" },
    { "version", cmd_version, "print the version" },
};

#define N_COMMANDS (sizeof commands / sizeof commands[0])

static int usage(FILE *f)
{
    fprintf(f, "usage: lorakit <command> [options]   (lorakit <command> --help for details)\n\n"
               "lorakit: low-rank adapters (LoRA) for Llama/Qwen2-family models, on a CPU.\n\n"
               "commands:\n");
    for (size_t i = 0; i < N_COMMANDS; i++)
        fprintf(f, "  %-14s %s\n", commands[i].name, commands[i].summary);
    return f == stdout ? 0 : 2;
}

/* The dispatcher flushes and checks stdout, so `lorakit x > full-disk` fails loudly (git). */
static int finish(int rc)
{
    if (fflush(stdout) != 0 || ferror(stdout)) {
        fprintf(stderr, "lorakit: error: writing to standard output failed: %s\n", strerror(errno));
        return rc ? rc : 1;
    }
    return rc;
}

static int cmd_version(int argc, char **argv)
{
    (void)argc;
    (void)argv;
    printf("lorakit %s\n", LK_VERSION);
    return 0;
}

int main(int argc, char **argv)
{
    if (argc < 2)
        return usage(stderr);
    const char *name = argv[1];
    if (!strcmp(name, "--help") || !strcmp(name, "-h") || !strcmp(name, "help"))
        return finish(usage(stdout));
    if (!strcmp(name, "--version"))
        return finish(cmd_version(argc - 1, argv + 1));
    for (size_t i = 0; i < N_COMMANDS; i++)
        if (!strcmp(commands[i].name, name))
            return finish(commands[i].run(argc - 1, argv + 1));
    fprintf(stderr, "lorakit: '%s' is not a lorakit command (see lorakit --help)\n", name);
    return 2;
}
