/*
 * tokenizer.c - `lorakit tokenizer train`: learn a byte-level BPE tokenizer from text files
 * (see tok_train in libcore/tok.h).
 */
#include <stdio.h>
#include <string.h>

#include "../libcore/lk.h"
#include "../libcore/tok.h"
#include "commands.h"
#include "opts.h"

static const struct cmd_help tokenizer_help = {
    "tokenizer",
    "train --text FILE [--text FILE ...] --vocab N --out DIR [--special TOKEN ...]",
    "Learns a byte-level BPE tokenizer (Qwen2's pre-tokenizer regex, NFC, ByteLevel) from\n"
    "text files and writes DIR/tokenizer.json and DIR/tokenizer_config.json, readable here\n"
    "and by Hugging Face's tokenizers. N counts every id: 256 byte tokens, the merges, and\n"
    "the special tokens <|endoftext|>, <|im_start|>, <|im_end|> (plus any --special) at the\n"
    "end. eos is <|im_end|>, the chat template chatml. The same input gives the same files.",
    "  lorakit tokenizer train --text data/corpus.txt --vocab 8000 --out models/tok8k",
};

static void on_progress(void *ctx, const struct tok_train_progress *p)
{
    (void)ctx;
    if (p->stage == TOK_TRAIN_COUNTED)
        fprintf(stderr, "tokenizer train: %zu distinct words\n", p->words);
    else if (p->stage == TOK_TRAIN_MERGING)
        fprintf(stderr, "tokenizer train: %d merges\n", p->merges);
    else
        fprintf(stderr, "tokenizer train: %d merges, vocab %d + %d specials\n", p->merges, p->vocab, p->specials);
}

int cmd_tokenizer(int argc, char **argv)
{
    struct opt_list text = { 0 }, special = { 0 };
    long vocab = 0;
    const char *out = NULL;
    const struct opt opts[] = {
        { "text", OPT_LIST, &text, "FILE", "a UTF-8 text file to learn from (repeat for more)" },
        { "vocab", OPT_INT, &vocab, "N", "vocabulary size, specials included (at least 259)" },
        { "out", OPT_STR, &out, "DIR", "output folder (created)" },
        { "special", OPT_LIST, &special, "TOKEN", "one more special token (repeatable)" },
        { 0 },
    };
    struct lk_err err = { 0 };
    const char *pos[2];
    int n_pos = 0, help;
    if (opts_parse(argc, argv, opts, pos, 2, &n_pos, &help, &err))
        return lk_cli_fail("tokenizer", &err);
    if (help) {
        opts_usage(stdout, &tokenizer_help, opts);
        return 0;
    }
    if (n_pos != 1 || strcmp(pos[0], "train"))
        lk_errf(&err, LK_ERR_USAGE, "expected 'lorakit tokenizer train ...' (see --help)");
    else if (!text.n)
        lk_errf(&err, LK_ERR_USAGE, "--text FILE is required");
    else if (!out)
        lk_errf(&err, LK_ERR_USAGE, "--out DIR is required");
    else if (vocab < 259 || vocab > 10000000)
        lk_errf(&err, LK_ERR_USAGE, "--vocab wants a number from 259 to 10000000, got %ld", vocab);
    if (err.code)
        return lk_cli_fail("tokenizer", &err);
    const struct tok_train_hooks hooks = { NULL, on_progress };
    struct tok_train_opts o = { text.v, text.n, (int)vocab, special.v, special.n, &hooks };
    lk_interrupt_install();
    double t0 = lk_now();
    if (tok_train(&o, out, &err))
        return lk_cli_fail("tokenizer", &err);
    fprintf(stderr, "tokenizer train: wrote %s/tokenizer.json in %.1fs\n", out, lk_now() - t0);
    return 0;
}
