/*
 * tokenize.c - `lorakit tokenize`: text to token ids and back with a tokenizer.json, and
 * chat templates shown with the trained-on span marked.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../libcore/chat.h"
#include "../libcore/lk.h"
#include "../libcore/tok.h"
#include "commands.h"
#include "opts.h"

struct tokenize_opts {
    const char *tokenizer, *text, *file, *tmpl;
    int json, decode, prompt, train_all, no_special;
};

static const struct cmd_help tokenize_help = {
    "tokenize",
    "--tokenizer DIR (--text S | --file F) [--json] [--decode] [--template NAME [--prompt]]",
    "Prints the token ids of a text (no BOS/EOS added; special-token strings such as\n"
    "<|im_end|> become their ids unless --no-special). With --decode the input is a list of\n"
    "ids and the text is printed. With --template the input is a JSON record, alpaca\n"
    "{\"instruction\",\"input\",\"output\"} or chat {\"messages\":[{\"role\",\"content\"}]} (with\n"
    "--file, one record per line), shown as the templated text with the trained-on tokens\n"
    "between [[ and ]] (with --json: input_ids and labels, -100 = not trained on).",
    "  lorakit tokenize --tokenizer models/qwen --text 'Hello world'\n"
    "  lorakit tokenize --tokenizer models/qwen --text '9707 1879' --decode\n"
    "  lorakit tokenize --tokenizer models/qwen --template chatml \\\n"
    "      --text '{\"instruction\": \"What is glaucoma?\", \"output\": \"An eye disease.\"}'",
};

static int print_ids(const int32_t *v, size_t n, int json)
{
    fputs(json ? "[" : "", stdout);
    for (size_t i = 0; i < n; i++)
        printf(i ? (json ? ", %d" : " %d") : "%d", v[i]);
    fputs(json ? "]\n" : "\n", stdout);
    return 0;
}

/* ids written as "1 2 3", "1,2,3" or "[1, 2, 3]" */
static int parse_ids(const char *s, struct tok_ids *out, struct lk_err *err)
{
    const char *p = s;
    while (*p) {
        if (strchr(" \t\r\n,[]", *p)) {
            p++;
            continue;
        }
        char *end;
        long v = strtol(p, &end, 10);
        if (end == p || v < 0 || v > INT32_MAX)
            return lk_errf(err, LK_ERR_USAGE, "--decode wants token ids, found '%.20s'", p);
        if (tok_ids_push(out, (int32_t)v, err))
            return err->code;
        p = end;
    }
    return LK_OK;
}

/* The templated sequence as text, trained-on tokens between [[ and ]]. */
static int print_marked(const struct tok *tk, const struct chat_seq *s, struct lk_err *err)
{
    size_t i = 0;
    while (i < s->n) {
        int trained = s->labels[i] != CHAT_IGNORE;
        size_t j = i;
        while (j < s->n && (s->labels[j] != CHAT_IGNORE) == trained)
            j++;
        char *txt;
        size_t n;
        if (tok_decode(tk, s->ids + i, j - i, 0, &txt, &n, err))
            return err->code;
        printf("%s%.*s%s", trained ? "[[" : "", (int)n, txt, trained ? "]]" : "");
        lk_free(txt);
        i = j;
    }
    printf("\n");
    return LK_OK;
}

static int run_template(struct tok *tk, const struct tokenize_opts *o, const char *input, struct lk_err *err)
{
    struct chat_fmt f;
    if (chat_fmt_init(&f, tk, o->tmpl, err))
        return err->code;
    struct chat_seq s = { 0 };
    struct tok_ids ids = { 0 };
    int rc = LK_OK, line = 0;
    char *copy = lk_strdup(input);
    if (!copy)
        return lk_errf(err, LK_ERR_NOMEM, "out of memory");
    for (char *p = copy; p && !rc;) {
        char *nl = o->file ? strchr(p, '\n') : NULL;
        if (nl)
            *nl = 0;
        line++;
        if (strspn(p, " \t\r\n") != strlen(p)) {
            if (o->prompt) {
                rc = chat_prompt_json(tk, &f, p, &ids, err);
                if (!rc)
                    print_ids(ids.v, ids.n, o->json);
            } else {
                rc = chat_encode_json(tk, &f, p, o->train_all ? CHAT_TRAIN_ALL : 0, &s, err);
                if (!rc && o->json) {
                    printf("{\"input_ids\": ");
                    fputs("[", stdout);
                    for (size_t i = 0; i < s.n; i++)
                        printf(i ? ", %d" : "%d", s.ids[i]);
                    printf("], \"labels\": [");
                    for (size_t i = 0; i < s.n; i++)
                        printf(i ? ", %d" : "%d", s.labels[i]);
                    printf("]}\n");
                } else if (!rc) {
                    rc = print_marked(tk, &s, err);
                }
            }
            if (rc && o->file)
                lk_err_prefix(err, "%s:%d", o->file, line);
        }
        p = nl ? nl + 1 : NULL;
    }
    lk_free(copy);
    chat_seq_release(&s);
    tok_ids_release(&ids);
    return rc;
}

int cmd_tokenize(int argc, char **argv)
{
    struct tokenize_opts o = { 0 };
    const struct opt opts[] = {
        { "tokenizer", OPT_STR, &o.tokenizer, "DIR", "folder with tokenizer.json (or the file itself, or a .gguf)" },
        { "text", OPT_STR, &o.text, "S", "the input text (or ids with --decode, a record with --template)" },
        { "file", OPT_STR, &o.file, "F", "read the input from a file instead" },
        { "json", OPT_FLAG, &o.json, NULL, "print JSON (a list of ids; input_ids and labels)" },
        { "decode", OPT_FLAG, &o.decode, NULL, "the input is token ids: print their text" },
        { "template", OPT_STR, &o.tmpl, "NAME", "chatml, qwen3, qwen3-nothink, llama3, llama3.2, plain or auto (from tokenizer_config.json)" },
        { "prompt", OPT_FLAG, &o.prompt, NULL, "with --template: print the generation prompt's ids" },
        { "train-all", OPT_FLAG, &o.train_all, NULL, "with --template: train on every token, prompt too" },
        { "no-special", OPT_FLAG, &o.no_special, NULL, "special-token strings in the text stay plain text" },
        { 0 },
    };
    struct lk_err err = { 0 };
    int help;
    if (opts_parse(argc, argv, opts, NULL, 0, NULL, &help, &err))
        return lk_cli_fail("tokenize", &err);
    if (help) {
        opts_usage(stdout, &tokenize_help, opts);
        return 0;
    }
    if (!o.tokenizer)
        lk_errf(&err, LK_ERR_USAGE, "--tokenizer DIR is required");
    else if (!o.text == !o.file)
        lk_errf(&err, LK_ERR_USAGE, "give one of --text S or --file F");
    else if (o.decode && o.tmpl)
        lk_errf(&err, LK_ERR_USAGE, "--decode and --template do not go together");
    if (err.code)
        return lk_cli_fail("tokenize", &err);

    char *buf = NULL;
    size_t len = o.text ? strlen(o.text) : 0;
    if (o.file && lk_read_file(o.file, &buf, &len, &err))
        return lk_cli_fail("tokenize", &err);
    const char *input = o.file ? buf : o.text;
    struct tok *tk = NULL;
    struct tok_ids ids = { 0 };
    int rc = tok_load(&tk, o.tokenizer, &err);
    if (!rc && o.decode) {
        char *txt;
        size_t n;
        rc = parse_ids(input, &ids, &err);
        if (!rc)
            rc = tok_decode(tk, ids.v, ids.n, 0, &txt, &n, &err);
        if (!rc) {
            fwrite(txt, 1, n, stdout);
            fputc('\n', stdout);
            lk_free(txt);
        }
    } else if (!rc && o.tmpl) {
        rc = run_template(tk, &o, input, &err);
    } else if (!rc) {
        rc = tok_encode(tk, input, len, !o.no_special, &ids, &err);
        if (!rc)
            print_ids(ids.v, ids.n, o.json);
    }
    tok_ids_release(&ids);
    tok_free(tk);
    lk_free(buf);
    return rc ? lk_cli_fail("tokenize", &err) : 0;
}
