/*
 * tok.h - the byte-level BPE tokenizer of Hugging Face's tokenizer.json, as used by
 * Qwen2/Qwen2.5/Qwen3, GPT-2 and Llama 3: NFC normalizer (utf8proc), Split pre-tokenizer
 * (the file's regex run by PCRE2 in UTF+UCP mode) and ByteLevel, a BPE model with ranked
 * merges, added tokens matched before splitting, the ByteLevel decoder. Anything else in
 * a tokenizer.json (Unigram, WordPiece, Metaspace, ...) is refused with a message.
 * tokenizer_config.json (beside it, optional) gives bos/eos/pad and the chat template.
 *
 * Also the trainer (tok_train.c): byte-level BPE learned from text files, written as a
 * tokenizer.json + tokenizer_config.json of the same family (Qwen2's regex, chatml).
 */
#ifndef TOK_H
#define TOK_H

#include <stddef.h>
#include <stdint.h>

#include "lk.h"

struct tok; /* opaque; one per loaded tokenizer */

/* A growable array of token ids (caller-owned struct; tok_ids_release frees the data). */
struct tok_ids {
    int32_t *v; /* owned */
    size_t n, cap;
};
int tok_ids_push(struct tok_ids *a, int32_t id, struct lk_err *err);
void tok_ids_release(struct tok_ids *a);

/* Loads a tokenizer. path is a folder holding tokenizer.json (and maybe
 * tokenizer_config.json), the tokenizer.json file itself (tokenizer_config.json is then
 * looked for beside it), or a GGUF model file (gguf_is_file: its tokenizer.* metadata, through
 * gguf_tok_load). On success *out is a new tokenizer freed with tok_free. */
int tok_load(struct tok **out, const char *path, struct lk_err *err);
/* Loads from memory; cfg_json may be NULL. name is used in messages. */
int tok_load_json(struct tok **out, const char *json, size_t len, const char *cfg_json,
                  const char *name, struct lk_err *err);
void tok_free(struct tok *t); /* NULL is fine */

/* Encodes len bytes of UTF-8 text, appending ids to out. With parse_special, added tokens
 * written in the text (e.g. "<|im_end|>") become their ids, as Hugging Face does; without,
 * they are ordinary text. No BOS/EOS is added. Invalid UTF-8 is LK_ERR_FORMAT with the
 * byte offset. Not thread-safe: the tokenizer keeps a word cache (one tok per thread). */
int tok_encode(struct tok *t, const char *text, size_t len, int parse_special, struct tok_ids *out,
               struct lk_err *err);

/* Decodes ids into a new NUL-terminated heap string (*out, caller lk_frees; its length in
 * *out_len when not NULL). skip_special drops special added tokens. An id outside the
 * vocabulary is LK_ERR_FORMAT. The bytes are what the tokens hold: a prefix of a
 * sequence may end inside a UTF-8 character. */
int tok_decode(const struct tok *t, const int32_t *ids, size_t n, int skip_special, char **out,
               size_t *out_len, struct lk_err *err);

/* The id of a token given by its text (an added token's content, or a vocab token in
 * its raw bytes), or -1. */
int32_t tok_find(const struct tok *t, const char *s);
/* The bytes of one token (borrowed, not NUL-terminated; *len set), or NULL for a bad id. */
const char *tok_piece(const struct tok *t, int32_t id, size_t *len);
/* 1 + the largest id: the embedding rows needed (the model's may be larger). */
int32_t tok_vocab_size(const struct tok *t);
int tok_is_special(const struct tok *t, int32_t id);

/* From tokenizer_config.json: ids of bos/eos/pad (-1 when not set), whether BOS is added,
 * the chat template text (borrowed; NULL when none). */
int32_t tok_bos(const struct tok *t);
int32_t tok_eos(const struct tok *t);
int32_t tok_pad(const struct tok *t);
int tok_add_bos(const struct tok *t);
const char *tok_chat_template(const struct tok *t);

/* NFC of UTF-8 text as the tokenizer's normalizer computes it (utf8proc), into a new heap
 * string (caller lk_frees). For tests and callers comparing decode(encode(x)). */
int tok_nfc(const char *text, size_t len, char **out, size_t *out_len, struct lk_err *err);
/* 0 when s[0..len) is valid UTF-8, else the offset of the first bad byte + 1. */
size_t tok_utf8_check(const char *s, size_t len);
/* The length of the well-formed character at s[0..n) (n >= 1), or -(bytes of its maximal
 * ill-formed subpart, at least 1) when it is ill-formed: Unicode's table of well-formed byte
 * sequences (3.9), the unit that decoders replace by one U+FFFD. */
int tok_utf8_char(const unsigned char *s, size_t n);

// ---- training (tok_train.c) ----
enum tok_train_stage { TOK_TRAIN_COUNTED = 0, TOK_TRAIN_MERGING, TOK_TRAIN_DONE };
/* Where a training run is: the words were counted, every 1000 merges, the merges ended. */
struct tok_train_progress {
    enum tok_train_stage stage;
    size_t words;             /* distinct words */
    int merges;               /* merges so far */
    int vocab;                /* ids so far: 256 bytes + merges (specials come after) */
    int specials;
};
/* Progress of a training run (libcore prints nothing: the caller does). */
struct tok_train_hooks {
    void *ctx;
    void (*progress)(void *ctx, const struct tok_train_progress *p);
};
struct tok_train_opts {
    const char *const *files; /* borrowed: text files read whole */
    int n_files;
    int vocab_size;           /* total, including the 256 byte tokens and the specials */
    const char *const *extra_specials; /* borrowed, may be NULL: more added special tokens */
    int n_extra_specials;
    const struct tok_train_hooks *hooks; /* borrowed, may be NULL: progress */
};
/* Learns a byte-level BPE and writes out_dir/tokenizer.json and tokenizer_config.json
 * (atomically; out_dir is created). Specials <|endoftext|>, <|im_start|>, <|im_end|> come
 * after the BPE ids; the chat template is chatml. Deterministic: same input, same files.
 * Stops early (fewer merges) when no pair occurs twice; LK_ERR_INTERRUPTED (nothing written)
 * when lk_interrupted is set during the merges. */
int tok_train(const struct tok_train_opts *o, const char *out_dir, struct lk_err *err);

#endif
