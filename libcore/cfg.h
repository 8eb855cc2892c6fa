/*
 * cfg.h - config.json of LlamaForCausalLM, Qwen2ForCausalLM and Qwen3ForCausalLM, through cJSON.
 * Rotary scaling is read as transformers reads it (rope_scaling, or transformers 5's
 * rope_parameters): types default, linear, llama3, and dynamic (exact only for positions below
 * max_position_embeddings, so longer ones are refused when run). A field lorakit does not
 * implement (another rope type, sliding-window attention switched on, a hidden_act other than
 * silu, attention/mlp bias settings we do not model) is refused with a message naming it, never
 * silently ignored.
 * Also: the list of weight tensors a config implies, with their names and shapes
 * (as transformers names them), shared by init, the model loader, merge and diff.
 */
#ifndef LK_CFG_H
#define LK_CFG_H

#include <stdint.h>

#include "lk.h"

enum cfg_arch { CFG_ARCH_LLAMA = 0, CFG_ARCH_QWEN2, CFG_ARCH_QWEN3 };

/* Rotary scaling types (transformers' modeling_rope_utils.py ROPE_INIT_FUNCTIONS). */
enum cfg_rope_type { CFG_ROPE_DEFAULT = 0, CFG_ROPE_LINEAR, CFG_ROPE_DYNAMIC, CFG_ROPE_LLAMA3 };

struct cfg_rope_scaling {
    enum cfg_rope_type type;
    double factor;              /* linear, dynamic, llama3 */
    double low_freq_factor;     /* llama3 */
    double high_freq_factor;    /* llama3 */
    int original_max_position_embeddings; /* llama3 (required); dynamic (optional, 0 when absent) */
};

struct cfg {
    enum cfg_arch arch;
    char architecture[64];      /* "Qwen2ForCausalLM" / "Qwen3ForCausalLM" / "LlamaForCausalLM" */
    char model_type[32];        /* "qwen2" / "qwen3" / "llama" */
    int hidden_size;            /* C */
    int intermediate_size;      /* F */
    int num_hidden_layers;      /* L */
    int num_attention_heads;    /* NH */
    int num_key_value_heads;    /* NKV */
    int head_dim;               /* HS = hidden_size / num_attention_heads unless given (Qwen3: 128) */
    int vocab_size;             /* V */
    int max_position_embeddings;
    double rms_norm_eps;
    double rope_theta;
    struct cfg_rope_scaling rope_scaling; /* type CFG_ROPE_DEFAULT when absent or null */
    double initializer_range;
    int tie_word_embeddings;
    int attention_bias;         /* 1 for Qwen2 (q/k/v biases), attention_bias for Llama (q/k/v and o_proj
                                   biases), 0 for Qwen3: which modules have one is cfg_module_bias's */
    int qk_norm;                /* Qwen3: RMSNorm over each head of q and k (weights [HS]) before rotary */
    int bos_token_id, eos_token_id; /* -1 when absent */
    char torch_dtype[16];       /* "float32", "bfloat16", "float16" */
    char *json;                 /* owned: the original text, so writers keep unknown fields */
};

/* path is config.json or a folder holding it (a GGUF file is refused, naming it: its config is
 * gguf_model_cfg's). A folder's weights (model.safetensors or the
 * sharded index), when present, are opened and must be able to hold what the config describes
 * (st_model_capacity), else LK_ERR_SHAPE: nothing is sized from a config its weights disprove. */
int cfg_load(struct cfg *c, const char *path, struct lk_err *err);
/* name is used in messages only. */
int cfg_parse(struct cfg *c, const char *text, const char *name, struct lk_err *err);
/* Writes config.json (atomically): the original JSON with our fields set to c's values. */
int cfg_save(const struct cfg *c, const char *path, struct lk_err *err);
void cfg_release(struct cfg *c);
/* Fills a small Qwen2 config (json NULL): the `tiny` preset of `lorakit init`: C 64, F 176,
 * L 2, NH 4, NKV 2, HS 16, V 512, tied embeddings, q/k/v biases, rope_theta 10000,
 * rms_norm_eps 1e-6, max_position_embeddings 1024, float32, no bos/eos (-1). */
void cfg_default_qwen2(struct cfg *c);
/* Fills c from a named preset ("tiny", "qwen2.5-0.5b", "qwen2-1.5b", "qwen3-0.6b", "llama3.2-1b",
 * "llama-tiny"): the dimensions of the published configs, json NULL. LK_ERR_USAGE naming the
 * presets when unknown. */
int cfg_preset(struct cfg *c, const char *name, struct lk_err *err);
extern const char *const cfg_preset_names[]; /* NULL-terminated */
/* Total parameter count the config implies (embeddings counted once when tied). */
int64_t cfg_param_count(const struct cfg *c);
/* Positions 0 .. n-1 for which the config's rotary embedding is what transformers computes:
 * INT_MAX except for rope type dynamic, whose frequencies transformers recomputes once a
 * sequence passes max_position_embeddings (or rope_scaling's original_max_position_embeddings
 * when smaller). */
int cfg_rope_positions(const struct cfg *c);
/* The rope type's name as config.json writes it ("default", "linear", "dynamic", "llama3"). */
const char *cfg_rope_type_name(enum cfg_rope_type t);

/* The one compatibility check between two configs that must describe the same network (a
 * base and its fine-tune, a base and the model an adapter was trained on): architecture and
 * every dimension; tie_word_embeddings too unless ignore_tie (a merge may untie a model).
 * other names the folder of b in the message: LK_ERR_SHAPE, "OTHER: config.json has FIELD
 * X, the base 'BASE' has Y (hint: ...)", the first differing field named. */
int cfg_check_same(const struct cfg *base, const struct cfg *b, const char *base_name, const char *other,
                   int ignore_tie, struct lk_err *err);

/* JSON text with 2-space indentation, like Python's json.dumps(indent=2) (keys in the order
 * given, integers without a fraction, other numbers in the shortest form that round-trips).
 * Returns a heap string (caller frees with lk_free), NULL on OOM. */
struct cJSON;
char *cfg_json_print(const struct cJSON *j);

enum cfg_tensor_kind {
    CFG_T_EMBED,   /* model.embed_tokens.weight [V, C] */
    CFG_T_NORM,    /* *_layernorm.weight, model.norm.weight [C]; Qwen3's self_attn.q_norm/k_norm [HS] */
    CFG_T_LINEAR,  /* *_proj.weight [out, in] */
    CFG_T_BIAS,    /* *_proj.bias [out] (cfg_module_bias) */
    CFG_T_LM_HEAD, /* lm_head.weight [V, C], absent when tied */
};

/* The seven LoRA-targetable linears, in this order (module index used across libcore). */
enum cfg_module { CFG_Q = 0, CFG_K, CFG_V, CFG_O, CFG_GATE, CFG_UP, CFG_DOWN, CFG_N_MODULES };
extern const char *const cfg_module_names[CFG_N_MODULES]; /* "q_proj", ... "down_proj" */
/* Shape [out, in] of a module's weight. */
void cfg_module_shape(const struct cfg *c, enum cfg_module m, int64_t *out_rows, int64_t *out_cols);
/* "model.layers.3.self_attn.q_proj" into buf. */
void cfg_module_path(int layer, enum cfg_module m, char *buf, size_t n);
/* 1 when module m has a bias: q/k/v with attention_bias; o_proj too for Llama (transformers'
 * LlamaAttention gives all four projections bias=config.attention_bias, Qwen2Attention only q/k/v). */
int cfg_module_bias(const struct cfg *c, enum cfg_module m);
/* Parses a module name like "q_proj" (-1 when unknown). */
int cfg_module_parse(const char *s);

struct cfg_tensor {
    char name[96];
    enum cfg_tensor_kind kind;
    int layer;                  /* -1 outside the layers */
    int module;                 /* enum cfg_module for LINEAR/BIAS, else -1 */
    int ndim;
    int64_t shape[2];
};
/* Every weight tensor the config implies, in transformers' order. Caller frees *out. */
int cfg_tensors(const struct cfg *c, struct cfg_tensor **out, int *n, struct lk_err *err);

#endif
