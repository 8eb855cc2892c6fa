/* fix_gguf.h - helpers of the GGUF tests (tests/test_gguf*.c): files, the llama.cpp peer
 * (tests/llama_ref.mjs through node-llama-cpp), lorakit's own tokenization, greedy continuations
 * and log-probabilities to compare with it, and the models they run on. */
#ifndef LK_FIX_GGUF_H
#define LK_FIX_GGUF_H

#include <cjson/cJSON.h>
#include <stdint.h>

#include "../libcore/gguf.h"
#include "../libcore/tok.h"

#define BASE "datasets/base-model"
/* A path in this test's folder, in a local buffer (test_path's buffers rotate, and test_sh uses
 * one per call). */
#define TMPPATH(var, name)                                                                                   \
    char var[700];                                                                                           \
    snprintf(var, sizeof var, "%s/%s", test_tmpdir(), name)
#define NPROMPT 8
#define PLEN 12
#define NGEN 16
#define NEED_PEER()                                                                                          \
    do {                                                                                                     \
        if (!lk_file_exists(BASE "/config.json"))                                                            \
            SKIP("no %s (run from the repository root)", BASE);                                              \
        if (!fix_llama_ready())                                                                              \
            SKIP("node or build/llama (make llama-ref: npm node-llama-cpp 3.21.1) is not there");            \
    } while (0)
/* The test texts: 35 kinds of input, each 4 ways. */
#define N_TEXTS 140

/* 1 when node and build/llama (make llama-ref) are there. */
int fix_llama_ready(void);

/* The size of a file, -1 when it is not there. */
long fix_file_size(const char *path);

/* Writes text to path (test helper; plain stdio). */
int fix_put_file(const char *path, const char *text, size_t n);

/* A JSON file (config.json, tokenizer.json, the peer's output) parsed here, independently of the
 * exporter; NULL when missing or broken. */
cJSON *fix_read_json(const char *path);

/* Runs the peer on a job (cJSON, consumed); returns its output or NULL (with the reason printed). */
cJSON *fix_peer(cJSON *job);

/* n rows of ids as a JSON array of arrays. */
cJSON *fix_int_rows(int32_t *const *rows, const int *lens, int n);

/* `lorakit tokenize --json` of every text (one process per text, in one shell loop). */
int fix_lk_tokenize_all(const char *tokdir, char **texts, int n, struct tok_ids *out);

/* Ids of the peer's "tokenize" result against lorakit's: the count of texts that differ (the
 * first one printed). */
int fix_compare_ids(const cJSON *got, char **texts, const struct tok_ids *want, int n);

/* Tokenized texts: NPROMPT prompts of PLEN ids, from the texts with at least PLEN ids. */
int fix_pick_prompts(const struct tok_ids *ids, int n, int32_t *prompts[NPROMPT], int lens[NPROMPT]);

/* log softmax over the last position of each of B rows of `lorakit logits` [B, T, V]. */
double *fix_lk_logprobs(const char *model, const char *adapter, int32_t *const *rows, int B, int T, int *out_V);

/* Largest |lorakit - llama.cpp| over every prompt and the whole vocabulary; -1 when the peer's
 * vector is not the vocabulary's length or underflows where lorakit's value is not tiny. */
double fix_lp_maxdiff(const cJSON *peer_lp, const double *lp, int B, int V);

/* lorakit's greedy continuation (KV cache, temperature 0, no stop token) of each prompt. */
int fix_lk_greedy(const char *model_dir, const char *adapter, int32_t *const *prompts, const int *lens, int n,
                  int32_t out[][NGEN]);

/* Prompts whose peer continuation equals lorakit's (the first difference printed). */
int fix_greedy_agree(const cJSON *gen, int32_t want[][NGEN], int n, const char *what, int print);

/* A fresh copy of the texts (caller frees each and the array). */
char **fix_all_texts(void);

/* Frees n texts and the array, and the ids (and their array) when given. */
void fix_free_texts(char **t, int n, struct tok_ids *ids);

/* A run of the peer: tokenize the texts (when given), greedy and log-probs on the prompts. */
cJSON *fix_peer_run(const char *gguf, const char *lora, char **texts, int n_texts, int32_t *const *prompts,
                    const int *lens, int info);

/* The acceptance on one model: f32 GGUF in llama.cpp against lorakit on the same folder (and
 * adapter): 140 texts' ids, greedy continuations, log-probs within 1e-4. */
int fix_check_in_llama(const char *model_dir, const char *gguf, const char *adapter, const char *lora_gguf,
                       const char *what, double *out_lp);

/* A Llama model (untied, GQA, head_dim 32 != hidden / heads; attention_bias when asked: random
 * q/k/v and o_proj biases) with the
 * base model's vocabulary and a Llama 3 pre-tokenizer (its regex, ignore_merges): llama.cpp's
 * 'llama-bpe'. */
int fix_make_llama_bias(const char *dir, int bias);

/* The same without biases. */
int fix_make_llama(const char *dir);

/* A small LoRA trained on the model in a few steps with a high rate, so that it matters. */
int fix_train_adapter(const char *model, const char *out, const char *extra);

/* The tokenizer rebuilt from a GGUF (gguf_tok_load) against the folder's: the same ids on the
 * texts, the same specials and template. Returns the number of differences. */
int fix_tok_roundtrip(const char *dir, const char *gguf, char **texts, int n);

/* 1 when the file's key holds want (else the difference is printed). */
int fix_has_str(const struct gguf_file *g, const char *key, const char *want);
int fix_has_uint(const struct gguf_file *g, const char *key, uint64_t want);

/* convert_hf_to_gguf.py's LlamaModel.permute, written out: w.reshape(heads, 2, HS/2, cols)
 * .swapaxes(1, 2).reshape(rows, cols), so the new row (h, j, s) is the old row (h, s, j). */
int64_t fix_permuted_src_row(int64_t r, int HS);

/* A PEFT adapter for the base model written by hand: rank 2 on every layer's q_proj, plus
 * lora_B biases, an embedding adapter or a modules_to_save lm_head when asked. */
int fix_craft_adapter(const char *dir, int bias, int embed, int save_head);

/* Copies a GGUF file (the value types lorakit writes: strings, u32, f32, bools, string and i32
 * arrays) to dst through gguf_writer, without the keys that start with drop (may be NULL), each
 * tensor's float32 values passed through edit (may be NULL) and written back in its type. */
int fix_gguf_copy(const char *src, const char *dst, const char *drop,
                  void (*edit)(const char *name, float *x, size_t n, void *ctx), void *ctx);

#endif
