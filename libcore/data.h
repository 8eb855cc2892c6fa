/*
 * data.h - training data: JSONL records turned into token ids and labels (-100 = not trained
 * on), in one block. Formats (DESIGN.md): alpaca {"instruction","input","output"}, chat
 * {"messages":[{"role","content"}]}, plain {"text"}, pre-tokenized {"input_ids","labels"}.
 * Labels follow transformers' convention: labels[t] is the id expected AT position t (the model
 * predicts it from positions < t), so the targets of position t are labels[t + 1].
 */
#ifndef LK_DATA_H
#define LK_DATA_H

#include <stddef.h>

#include "lk.h"

struct tok;

struct data_example {
    int n;          /* tokens (after truncation) */
    int *ids;       /* points into data_set.ids */
    int *labels;    /* points into data_set.labels */
    int truncated;  /* 1 when the record was cut to the maximum length */
};

struct data_set {
    int n;
    struct data_example *ex; /* owned */
    int *ids, *labels;       /* owned blocks */
    size_t n_tokens;         /* after truncation */
    size_t n_trained;        /* positions whose label counts (excluding position 0) */
    int n_truncated;
    int n_skipped;           /* broken lines skipped with skip_bad */
    int max_len;
    size_t cap_tokens;       /* allocated ints in ids and labels */
    int cap_ex;              /* allocated examples */
};

struct data_opts {
    int seq;                 /* maximum length: longer records are truncated (and counted) */
    int skip_bad;            /* skip broken lines (counted) instead of failing */
    int train_on_prompt;     /* labels on every token, not just the assistant's */
    const char *template_name; /* "chatml", "llama3", "plain" or NULL (from the tokenizer) */
    int vocab;               /* > 0: every id and label must be below it (else file:line error) */
};

/* Loads one or more JSONL files (comma-separated list). tk may be NULL when every record is
 * pre-tokenized. A broken line is reported as "file:line: problem". */
int data_load(struct data_set *d, const char *paths, struct tok *tk, const struct data_opts *o,
              struct lk_err *err);
/* Adds one example (copies ids/labels; labels NULL = train on all). */
int data_add(struct data_set *d, const int *ids, const int *labels, int n, int seq);
void data_release(struct data_set *d);

#endif
