/*
 * chat.h - chat templates: alpaca and chat records to token ids and labels, generation
 * prompts and stop ids, for chatml (Qwen2/2.5), qwen3, llama3 (3.0), llama3.2 (3.1 to 3.3) and
 * plain. The rendered text is what the model's own Jinja chat_template renders for the same
 * messages (tests/test_chat.c checks it against Jinja itself).
 *
 *   chatml: <|im_start|>system\n{sys}<|im_end|>\n<|im_start|>user\n{q}<|im_end|>\n
 *           <|im_start|>assistant\n{a}<|im_end|>\n
 *           (Qwen2.5's template adds the system turn "You are Qwen, created by Alibaba
 *           Cloud. You are a helpful assistant." when there is none; detected from the
 *           template text, so trained tokenizers get none)
 *   qwen3:  chatml, with Qwen3's think blocks: an assistant turn after the last user query
 *           that is the conversation's last turn (or has reasoning, written in its content as
 *           <think>...</think>) is written <think>\n{reasoning}\n</think>\n\n{a}, so a plain
 *           answer gets the empty block <think>\n\n</think>\n\n, which is the template's and
 *           masked like the prompt; earlier turns lose their reasoning. The generation prompt
 *           ends with assistant\n (enable_thinking, the template's default: "qwen3") or with
 *           the empty block (enable_thinking=false: "qwen3-nothink").
 *   llama3: <|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n{q}<|eot_id|>
 *           <|start_header_id|>assistant<|end_header_id|>\n\n{a}<|eot_id|>   (contents trimmed)
 *   llama3.2: llama3 opening with the system header Llama 3.1-3.3's templates always write:
 *           <|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: December
 *           2023\nToday Date: {date}\n\n{sys}<|eot_id|> (sys: the first message when it is a
 *           system one, else empty). {date} is the template's fixed date_string ("26 Jul 2024"):
 *           what it renders without strftime_now (transformers passes one: today's date).
 *   plain:  [bos]{sys}\n\n### Instruction:\n{q}\n\n### Response:\n{a}<eos>
 *
 * Labels are aligned with ids (labels[i] is the label of ids[i]; the trainer shifts):
 * the id itself where trained, CHAT_IGNORE (-100) elsewhere. Trained: each assistant
 * turn's content and its end-of-turn token, or everything with CHAT_TRAIN_ALL.
 * The prompt and each answer are tokenized apart: trained tokens are exactly
 * encode(answer) + end-of-turn, and the prompt's tokens match chat_prompt's. This equals
 * tokenizing the rendered text (Hugging Face) except where BPE would merge across the
 * header/answer boundary (an answer starting with a newline).
 */
#ifndef CHAT_H
#define CHAT_H

#include <stddef.h>
#include <stdint.h>

#include "lk.h"
#include "tok.h"

#define CHAT_IGNORE (-100)
#define CHAT_TRAIN_ALL 1 /* flag: labels on every token, prompt included */

enum chat_kind { CHAT_PLAIN, CHAT_CHATML, CHAT_LLAMA3, CHAT_QWEN3 };

/* A template bound to a tokenizer's ids (caller-owned; nothing to free). */
struct chat_fmt {
    enum chat_kind kind;
    const char *default_system; /* static string, or NULL: system turn added when none */
    int32_t bos;                /* prepended when >= 0 */
    int32_t start, hdr_end;     /* chatml: <|im_start|>; llama3: <|start_header_id|>, <|end_header_id|> */
    int32_t eot;                /* end of a turn: <|im_end|>, <|eot_id|>, or eos for plain */
    int32_t stop[4];            /* ids that end generation: eot, then eos and the like */
    int n_stop;
    int thinking;               /* qwen3: enable_thinking (1: the template's default) */
    char sys_header[96];        /* llama3.2: the system header's text before {sys}, else "" */
};

/* Chooses the template: name "chatml", "qwen3", "qwen3-nothink", "llama3", "llama3.2", "plain",
 * or NULL/"auto" to detect it from tokenizer_config.json's chat_template: <|im_start|> with
 * <think> is qwen3, else chatml; <|start_header_id|> with "Cutting Knowledge Date" is llama3.2
 * (its date_string read from the template), else llama3; no template: plain. Fails when the
 * tokenizer lacks a token the template needs. */
int chat_fmt_init(struct chat_fmt *f, const struct tok *t, const char *name, struct lk_err *err);
const char *chat_kind_name(enum chat_kind k);
/* The template's name as chat_fmt_init takes it ("qwen3-nothink", "llama3.2", ...). */
const char *chat_fmt_name(const struct chat_fmt *f);

struct chat_msg {
    const char *role;    /* borrowed: "system", "user" or "assistant" */
    const char *content; /* borrowed, UTF-8 */
};

/* ids and labels of one record (caller-owned struct; chat_seq_release frees). */
struct chat_seq {
    int32_t *ids;    /* owned [n] */
    int32_t *labels; /* owned [n]: ids[i] or CHAT_IGNORE */
    size_t n, cap;
};
void chat_seq_release(struct chat_seq *s);

/* Renders and tokenizes a conversation, replacing out's contents. A conversation with no
 * assistant turn is LK_ERR_FORMAT (nothing to train on). */
int chat_encode(struct tok *t, const struct chat_fmt *f, const struct chat_msg *msgs, int n, int flags,
                struct chat_seq *out, struct lk_err *err);
/* An alpaca record: user turn = instruction, plus "\n\n" + input when input is non-empty;
 * assistant turn = output. input may be NULL. */
int chat_encode_alpaca(struct tok *t, const struct chat_fmt *f, const char *instruction, const char *input,
                       const char *output, int flags, struct chat_seq *out, struct lk_err *err);
/* One JSON record, {"instruction", "input", "output"} or {"messages": [{"role",
 * "content"}]}; errors name the missing or wrong field (the caller adds file:line). */
int chat_encode_json(struct tok *t, const struct chat_fmt *f, const char *json, int flags,
                     struct chat_seq *out, struct lk_err *err);

/* The generation prompt: the conversation (no assistant turn needed; a trailing one is
 * left out) followed by the assistant header, replacing out's contents. */
int chat_prompt(struct tok *t, const struct chat_fmt *f, const struct chat_msg *msgs, int n,
                struct tok_ids *out, struct lk_err *err);
/* The same for one question (system may be NULL). */
int chat_prompt_user(struct tok *t, const struct chat_fmt *f, const char *system, const char *user,
                     struct tok_ids *out, struct lk_err *err);
/* The same from a JSON record (alpaca: instruction + input; chat: its messages). */
int chat_prompt_json(struct tok *t, const struct chat_fmt *f, const char *json, struct tok_ids *out,
                     struct lk_err *err);

/* 1 when id ends generation under f. */
int chat_is_stop(const struct chat_fmt *f, int32_t id);

#endif
