/*
 * gguf.h - the GGUF format (version 3) as llama.cpp reads it: a validated reader, a streaming
 * writer, the dtypes lorakit converts to and from (F32, F16, BF16, Q8_0), and on top of them the
 * export of a Hugging Face model folder or a PEFT adapter to GGUF (gguf_model.c) with its
 * tokenizer metadata (gguf_tok.c).
 *
 * File layout (ggml's docs/gguf.md; all integers little-endian):
 *   u32 magic "GGUF", u32 version 3, i64 n_tensors, i64 n_kv,
 *   n_kv x { string key, u32 value type, value },
 *   n_tensors x { string name, u32 n_dims, n_dims x i64 ne, u32 ggml type, u64 offset },
 *   zero padding to `general.alignment` (32 when absent), then the data area; a tensor's data
 *   starts at data + offset (a multiple of the alignment) and is padded to the alignment.
 * A string is u64 length + bytes (no NUL); an array is u32 element type, u64 count, elements
 * (arrays of arrays are refused, as in llama.cpp). ne[0] is the fastest-varying dimension, so a
 * transformers weight [rows, cols] is ne = {cols, rows}.
 *
 * gguf_open validates everything before anything is used (as st_open does for safetensors):
 * magic, version, counts bounded by what the file can hold, every string and array inside the
 * file, value types and booleans, unique non-empty keys, `general.alignment` a u32 power of
 * two, tensor names unique and shorter than 64 bytes, 1 to 4 dimensions, non-negative,
 * element count and byte size without overflow, a known ggml type whose block divides ne[0],
 * offsets aligned, inside the file and not overlapping. A failure names the file and the
 * problem ("m.gguf: tensor 'blk.0.attn_q.weight' data ends at byte 4128, past the end of the
 * file (4096 bytes)").
 */
#ifndef LK_GGUF_H
#define LK_GGUF_H

#include <stddef.h>
#include <stdint.h>

#include "cfg.h"
#include "lk.h"

struct model;

#define GGUF_VERSION 3
#define GGUF_ALIGNMENT 32
#define GGUF_MAX_DIMS 4
#define GGUF_MAX_NAME 64   /* ggml's GGML_MAX_NAME: names must be shorter */
#define GGUF_QK8_0 32      /* values per q8_0 block */
#define GGUF_Q8_0_BYTES 34 /* one f16 scale + 32 int8 */
/* The lorakit version written as `lorakit.version` (tests check it equals `lorakit version`). */
#define GGUF_LORAKIT_VERSION LK_VERSION

/* Metadata value types (gguf_type in ggml's gguf.h). */
enum gguf_vtype {
    GGUF_VT_UINT8 = 0,
    GGUF_VT_INT8,
    GGUF_VT_UINT16,
    GGUF_VT_INT16,
    GGUF_VT_UINT32,
    GGUF_VT_INT32,
    GGUF_VT_FLOAT32,
    GGUF_VT_BOOL,
    GGUF_VT_STRING,
    GGUF_VT_ARRAY,
    GGUF_VT_UINT64,
    GGUF_VT_INT64,
    GGUF_VT_FLOAT64,
    GGUF_VT_COUNT
};

/* ggml tensor types lorakit knows the layout of (ggml.h's enum ggml_type values). It reads and
 * writes F32, F16, BF16 and Q8_0; the others are only sized (so `info` can list any common
 * file) and refused on conversion. */
enum gguf_ttype {
    GGUF_T_F32 = 0,
    GGUF_T_F16 = 1,
    GGUF_T_Q4_0 = 2,
    GGUF_T_Q4_1 = 3,
    GGUF_T_Q5_0 = 6,
    GGUF_T_Q5_1 = 7,
    GGUF_T_Q8_0 = 8,
    GGUF_T_Q8_1 = 9,
    GGUF_T_Q2_K = 10,
    GGUF_T_Q3_K = 11,
    GGUF_T_Q4_K = 12,
    GGUF_T_Q5_K = 13,
    GGUF_T_Q6_K = 14,
    GGUF_T_Q8_K = 15,
    GGUF_T_I8 = 24,
    GGUF_T_I16 = 25,
    GGUF_T_I32 = 26,
    GGUF_T_I64 = 27,
    GGUF_T_F64 = 28,
    GGUF_T_BF16 = 30,
};
/* "f32", "q8_0", ...; NULL for a type lorakit does not know. */
const char *gguf_ttype_name(int type);
/* Values per block and bytes per block (0 when unknown). */
int gguf_ttype_block(int type);
size_t gguf_ttype_block_bytes(int type);
/* Parses the --dtype names "f32", "f16", "bf16", "q8_0"; -1 otherwise. */
int gguf_ttype_parse(const char *s);
/* general.file_type (llama.cpp's LLAMA_FTYPE) for a model written in dtype t. */
uint32_t gguf_ftype_of(int t);

// ---- dtype conversion ----

/* n float32 values into dst of ggml type t (F32, F16, BF16 round to nearest even; Q8_0 as
 * ggml's quantize_row_q8_0_ref: per block of 32, d = amax / 127, q = roundf(x / d) computed as
 * x * (1/d), d stored as f16; n must be a multiple of 32). Returns the bytes written. */
size_t gguf_from_f32(void *dst, int t, const float *src, size_t n);
/* n values of ggml type t (F32, F16, BF16, Q8_0; n a multiple of 32 for Q8_0) into float32. */
void gguf_to_f32(float *dst, int t, const void *src, size_t n);
/* Bytes of n values of type t (n a multiple of the block), 0 on overflow or unknown type. */
size_t gguf_nbytes(int t, size_t n);

// ---- reader ----

/* A string inside the file: not NUL-terminated. */
struct gguf_str {
    const char *p; /* points into the mapping */
    uint64_t n;
};

struct gguf_kv {
    struct gguf_str key;
    int type;              /* enum gguf_vtype; GGUF_VT_ARRAY for arrays */
    int arr_type;          /* element type of an array */
    uint64_t n;            /* array length (1 for a scalar) */
    const uint8_t *val;    /* points into the mapping: the scalar, the string, or the first element */
    uint64_t *str_off;     /* owned, string arrays only: offset of element i from val */
};

struct gguf_tensor {
    struct gguf_str name;
    int n_dims;
    int64_t ne[GGUF_MAX_DIMS]; /* ne[0] fastest; unused dimensions are 1 */
    int type;                  /* enum gguf_ttype */
    uint64_t offset;           /* from the data area */
    size_t numel, nbytes;
    const uint8_t *data;       /* points into the mapping */
};

struct gguf_file {
    char *path;                /* owned */
    void *map;                 /* owned mapping (NULL for gguf_open_buffer) */
    size_t map_len;
    const uint8_t *base;       /* the bytes: the mapping or the caller's buffer */
    uint32_t version;
    size_t alignment;
    size_t data_off;           /* start of the data area */
    int64_t n_kv, n_tensors;
    struct gguf_kv *kv;        /* owned [n_kv] */
    struct gguf_tensor *t;     /* owned [n_tensors] */
};

int gguf_open(struct gguf_file *f, const char *path, struct lk_err *err);
/* Same validation on a buffer (tests, fuzzing); the buffer must outlive f. */
int gguf_open_buffer(struct gguf_file *f, const void *buf, size_t len, const char *name, struct lk_err *err);
void gguf_close(struct gguf_file *f); /* harmless on a zeroed or closed struct */

/* Lookups by name (NULL when absent). */
const struct gguf_kv *gguf_find_kv(const struct gguf_file *f, const char *key);
const struct gguf_tensor *gguf_find_tensor(const struct gguf_file *f, const char *name);
/* Typed getters: LK_ERR_MISSING when absent, LK_ERR_FORMAT (naming key and type) when the
 * value has another type. gguf_get_uint accepts any unsigned or non-negative integer type;
 * gguf_get_float accepts f32 and f64. *out_s is a heap copy (caller lk_frees). */
int gguf_get_str(const struct gguf_file *f, const char *key, char **out_s, struct lk_err *err);
int gguf_get_uint(const struct gguf_file *f, const char *key, uint64_t *out, struct lk_err *err);
int gguf_get_float(const struct gguf_file *f, const char *key, double *out, struct lk_err *err);
int gguf_get_bool(const struct gguf_file *f, const char *key, int *out, struct lk_err *err);
/* Element i of a string array (i < kv->n). */
struct gguf_str gguf_arr_str(const struct gguf_kv *kv, uint64_t i);
/* Element i of a numeric array (or the scalar, i = 0) as a double. */
double gguf_arr_num(const struct gguf_kv *kv, uint64_t i);
/* "u32", "str", "arr[str,768]"... into buf. */
void gguf_kv_type_str(const struct gguf_kv *kv, char *buf, size_t n);

/* Rows [row0, row0 + nrows) of a tensor viewed as [ne[1]*ne[2]*ne[3], ne[0]] into float32 out
 * [nrows * ne[0]] (F32, F16, BF16, Q8_0; other types are LK_ERR_UNSUPPORTED, named). */
int gguf_tensor_rows_f32(const struct gguf_file *f, const struct gguf_tensor *t, int64_t row0,
                         int64_t nrows, float *out, struct lk_err *err);

// ---- writer: metadata, then every tensor's shape, then the data in the same order ----
/*
 * The header (metadata and every tensor's name, shape, type and offset) is computed before
 * any data is written, so the data streams out tensor by tensor (or in pieces of a tensor),
 * converted from float32 as it goes: memory is the header plus the caller's chunk. The file is
 * written to "<path>.tmp.<pid>" and renamed on commit (lk_afile). Errors are sticky on err
 * (which must start zeroed): a sequence of calls is checked once, at commit.
 */
struct gguf_wtensor {
    char name[GGUF_MAX_NAME];
    int n_dims;
    int64_t ne[GGUF_MAX_DIMS];
    int type;
    size_t numel, nbytes;
};

struct gguf_writer {
    struct lk_afile af;
    struct lk_err *err;        /* borrowed; sticky */
    struct lk_buf kv;          /* owned: the metadata, already serialized */
    int64_t n_kv;
    struct gguf_wtensor *t;    /* owned [cap] */
    int n, cap, next;          /* declared, capacity, next to write */
    size_t part;               /* values of tensor `next` already written */
    size_t written;            /* bytes of the data area written so far */
    void *scratch;             /* owned conversion buffer */
    size_t scratch_len;
    int begun;
};

int gguf_writer_init(struct gguf_writer *w, const char *path, struct lk_err *err);
/* Metadata (before begin). Keys must be unique (LK_ERR_USAGE otherwise). */
int gguf_writer_str(struct gguf_writer *w, const char *key, const char *val);
int gguf_writer_u32(struct gguf_writer *w, const char *key, uint32_t val);
int gguf_writer_f32(struct gguf_writer *w, const char *key, float val);
int gguf_writer_bool(struct gguf_writer *w, const char *key, int val);
/* n strings (each NUL-terminated); lens may be NULL, else the byte lengths. */
int gguf_writer_arr_str(struct gguf_writer *w, const char *key, const char *const *v, const size_t *lens,
                        size_t n);
int gguf_writer_arr_i32(struct gguf_writer *w, const char *key, const int32_t *v, size_t n);
/* Declares a tensor (ggml order: ne[0] fastest); declaration order = data order. */
int gguf_writer_declare(struct gguf_writer *w, const char *name, int type, int n_dims, const int64_t *ne);
/* Writes the header: magic, counts, metadata, tensor infos, padding. */
int gguf_writer_begin(struct gguf_writer *w);
/* The next n float32 values of the current tensor, converted to its type (for Q8_0, n must be
 * a multiple of 32). When a tensor is complete its padding is written and the next starts. */
int gguf_writer_write(struct gguf_writer *w, const float *src, size_t n);
/* Checks every tensor was written, flushes, fsyncs, renames. Frees the writer. */
int gguf_writer_commit(struct gguf_writer *w);
void gguf_writer_abort(struct gguf_writer *w); /* removes the temp file, frees; harmless twice */

// ---- tokenizer metadata (gguf_tok.c) ----
/*
 * tokenizer.ggml.* as convert_hf_to_gguf.py writes them for a byte-level BPE tokenizer
 * (tokenizer.json of the Qwen2 / Llama 3 / GPT-2 family, checked by tok_load first, so a GGUF
 * carries only tokenizers lorakit itself can run): model "gpt2"; pre "qwen2", "llama-bpe" or
 * "gpt-2", chosen from the pre-tokenizer regex (another regex is refused: llama.cpp would split
 * text differently); tokens as written in tokenizer.json (byte-level form), padded with
 * "[PAD<i>]" (type unused) up to the model's vocabulary; token types normal (1), control (3)
 * for special added tokens and those that look special ("<|...|>"), user-defined (4) for the
 * other added tokens; merges as "a b" strings; bos / eos / pad ids from tokenizer_config.json
 * (bos_token, eos_token, pad_token by content), else generation_config.json, else config.json;
 * add_bos_token from tokenizer_config.json (false when absent or without a bos id); the chat
 * template from tokenizer_config.json (or chat_template.jinja beside it).
 */
struct gguf_vocab {
    int32_t n;                 /* tokens written (the model's vocabulary) */
    char *text;                /* owned: every token, NUL-separated */
    size_t *off;               /* owned [n]: start of token i in text */
    size_t *len;               /* owned [n] */
    int32_t *type;             /* owned [n]: llama.cpp token types */
    int64_t n_merges;
    char *merge_text;          /* owned: "a b" strings, NUL-separated */
    size_t *merge_off, *merge_len; /* owned [n_merges] */
    char pre[16];              /* "qwen2", "llama-bpe", "gpt-2" */
    int32_t bos, eos, pad;     /* -1 when unset */
    int add_bos;
    char *chat_template;       /* owned, NULL when none */
};
/* Reads DIR/tokenizer.json (+ tokenizer_config.json, generation_config.json, config.json) for a
 * model of n_vocab tokens (a larger tokenizer is refused). */
int gguf_vocab_load(struct gguf_vocab *v, const char *dir, int32_t n_vocab, struct lk_err *err);
void gguf_vocab_release(struct gguf_vocab *v);
/* Adds the tokenizer.* metadata to a writer (before begin). */
int gguf_vocab_write(const struct gguf_vocab *v, struct gguf_writer *w);
/* The reverse, for `generate` on a .gguf: a lorakit tokenizer from a GGUF's tokenizer.* metadata
 * (gpt2 model with pre qwen2, llama-bpe or gpt-2; control and user-defined tokens become added
 * tokens, special for control; unused ones are left out; qwen2 gets Qwen's NFC normalizer),
 * through tok_load_json, so it is validated like a tokenizer.json. *out is freed with tok_free. */
struct tok;
int gguf_tok_load(struct tok **out, const struct gguf_file *f, struct lk_err *err);

// ---- models and adapters (gguf_model.c) ----

/* 1 when path names a GGUF file rather than a model folder: not a folder, and its name ends in
 * ".gguf" or its first bytes are the GGUF magic. The one test behind every "folder or .gguf"
 * decision (model_load, tok_load, cfg_load's refusal, `lorakit info`). */
int gguf_is_file(const char *path);

/* "llama", "qwen2" or "qwen3": general.architecture for config c. */
const char *gguf_arch_name(const struct cfg *c);
/* llama.cpp's name for a transformers tensor of config c into buf ("blk.3.attn_q.weight");
 * 0 on success, -1 for a tensor llama.cpp has no name for. */
int gguf_tensor_name(const struct cfg_tensor *t, char *buf, size_t n);
/* 1 when llama.cpp expects the rows of this tensor permuted (Llama's q and k projections and
 * their biases: llama.cpp rotates adjacent pairs, transformers rotates halves). heads is then
 * the number of heads the rows hold. */
int gguf_tensor_permuted(const struct cfg *c, const struct cfg_tensor *t, int *out_heads);
/* Permutes (or, with inverse, un-permutes) rows of one head block: x is [heads * HS, cols];
 * row h*HS + 2j + s of the output is row h*HS + s*HS/2 + j of the input (s in {0, 1}), as
 * convert_hf_to_gguf.py's LlamaModel.permute. tmp holds HS * cols floats. */
void gguf_permute_rows(float *x, int heads, int HS, int64_t cols, int inverse, float *tmp);
/* Refuses (LK_ERR_UNSUPPORTED, naming it) a config llama.cpp cannot express: a qwen2 without
 * q/k/v biases or with heads x head_dim != hidden, a qwen3 with biases, an odd head size,
 * rope_scaling dynamic, llama3 scaling outside the llama architecture. */
int gguf_cfg_check(const struct cfg *c, const char *name, struct lk_err *err);
/* llama3 rope scaling as llama.cpp's rope_freqs tensor: out[i] (head_dim / 2 of them) divides
 * llama.cpp's frequency theta^(-2i/HS) so that it equals lorakit's rescaled inv_freq[i].
 * Returns head_dim / 2, or 0 (out untouched) when the config has no llama3 scaling. */
int gguf_rope_freqs(const struct cfg *c, float *out);
/* The ggml type a transformers tensor (ndim, cols per row) is written in for dtype: 1-D tensors
 * stay F32, and so does a matrix whose rows are not whole q8_0 blocks. */
int gguf_export_type(int ndim, int64_t cols, int dtype);

/* The source of tensor values for the exporter: rows [row0, row0 + n) of transformers tensor t
 * ([rows, cols] row-major; a 1-D tensor [n] is one row of n) as float32 into out [n * cols].
 * The exporter asks for each tensor's rows in order, in chunks of about chunk_bytes; merge
 * passes its merged tensors through this. */
typedef int (*gguf_rows_fn)(void *ctx, const struct cfg_tensor *t, int64_t row0, int64_t n, float *out,
                            struct lk_err *err);

struct gguf_export {
    const char *model_dir;     /* borrowed: config.json and the tokenizer files (and the
                                  safetensors when rows is NULL) */
    const struct cfg *cfg;     /* borrowed, may be NULL (loaded from model_dir): the config of the
                                  model written (merge passes its output's, e.g. untied) */
    int dtype;                 /* GGUF_T_F32, F16, BF16 or Q8_0 for matrices; 1-D tensors stay F32,
                                  and a matrix whose rows are not a multiple of 32 stays F32 in Q8_0 */
    const char *name;          /* general.name; NULL: the folder's name */
    const char *const *adapters; /* borrowed, may be NULL: adapters merged (provenance) */
    int n_adapters;
    const char *merge_method;  /* may be NULL: provenance of a merge */
    gguf_rows_fn rows;         /* NULL: read the model folder's safetensors (pread, bounded) */
    void *rows_ctx;
    size_t chunk_bytes;        /* float32 bytes per read (0: 16 MB; tests use small values) */
    void (*progress)(void *ctx, int done, int total, const char *name); /* may be NULL */
    void *progress_ctx;
};

struct gguf_export_report {
    int n_tensors;
    int n_f32_fallback;        /* matrices kept f32 because their rows do not fit q8_0 blocks */
    int64_t n_params;
    uint64_t bytes;            /* file size */
    char arch[16];
    char pre[16];
    int32_t n_vocab;
};

/* Writes the model as one GGUF file (atomically; refusals before anything is written). */
int gguf_export_model(const struct gguf_export *x, const char *out_path, struct gguf_export_report *rep,
                      struct lk_err *err);

/* A PEFT adapter as a GGUF LoRA: general.type "adapter", adapter.type "lora",
 * adapter.lora.alpha, blk.N.<tensor>.weight.lora_a [ne: in, R] and .lora_b [ne: R, out] (Llama
 * q/k rows of B permuted like the base). llama.cpp scales every pair by alpha / R with R read
 * from the tensor, so per-module ranks and alphas (rank_pattern, alpha_pattern, rsLoRA) are
 * folded into B: B' = B * s_module * R_module / alpha. DoRA, lora_bias, modules_to_save and
 * embedding adapters cannot be expressed and are refused with the reason and the hint to merge.
 * dtype as for models (B's rows are R long, so Q8_0 keeps them F32 unless R % 32 == 0). */
struct gguf_lora_report {
    int n_modules;
    int n_folded;              /* modules whose B carries a folded scale */
    float alpha;
    uint64_t bytes;
};
int gguf_export_lora(const char *adapter_dir, const char *model_dir, int dtype, const char *out_path,
                     struct gguf_lora_report *rep, struct lk_err *err);

/* The config a GGUF model file describes (llama, qwen2 or qwen3 metadata; rope scaling from
 * {arch}.rope.scaling.*, or llama3 from lorakit.rope_scaling.* checked against rope_freqs, or
 * recovered from rope_freqs alone in a file from llama.cpp's converter), checked against the
 * tensors: every tensor it implies present with its shape and a type lorakit reads (f32, f16,
 * bf16, q8_0); the vocabulary is token_embd's rows. What lorakit cannot run is refused by name
 * (LK_ERR_UNSUPPORTED); inconsistent files are LK_ERR_FORMAT / SHAPE / MISSING. *out_ts (may
 * be NULL) gets the transformers tensor list (caller lk_frees). */
int gguf_model_cfg(const struct gguf_file *f, struct cfg *c, struct cfg_tensor **out_ts, int *out_nt,
                   struct lk_err *err);
/* Reads a GGUF model (gguf_model_cfg) back into a struct model: weights converted to float32,
 * Llama's q/k rows un-permuted. The reverse of gguf_export_model; model_load calls it for a
 * path gguf_is_file accepts, so `logits`, `generate`, `eval` and merge's --verify take a .gguf. */
int gguf_model_load(struct model *m, const char *path, struct lk_err *err);

#endif
