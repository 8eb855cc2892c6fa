/*
 * lora.h - LoRA adapters: the trainable factors in one block, and PEFT's on-disk format.
 *
 * A module k adapts the linear W [out, in] of (layer, module) as
 *     y = W x + b + s * B (A drop(x)) (+ s * bias_B),  A [R, in], B [out, R],
 * with s = alpha / R, or alpha / sqrt(R) with rsLoRA. DoRA (use_dora) instead computes
 *     y = b + g * (W x + s B A x),  g = m / ||W + s B A||_row  (detached, as PEFT does),
 * with the magnitude vector m [out] trainable. Ranks: R and alpha may differ per module
 * (PEFT's rank_pattern / alpha_pattern, keys matched as regexes against the end of the
 * module name). All A, B (and lora_B biases) live in one block `mem`; gradients and AdamW
 * moments use blocks of the same size and layout, so grad[i] belongs to mem[i].
 *
 * PEFT layout (adapter_config.json + adapter_model.safetensors):
 *   base_model.model.model.layers.N.self_attn.q_proj.lora_A.weight  [R, in]
 *   base_model.model.model.layers.N.self_attn.q_proj.lora_B.weight  [out, R]
 *   ...lora_B.bias [out] (lora_bias: true), ...lora_magnitude_vector [out] (DoRA),
 *   base_model.model.model.embed_tokens.lora_embedding_A [R, V] / lora_embedding_B [C, R],
 *   base_model.model.lm_head.lora_A.weight [R, C] / lora_B.weight [V, R] (lm_head a target),
 *   base_model.model.<module>.base_layer.weight [V, C] (the base under a LoRA-targeted embed_tokens
 *   or lm_head, as PEFT saves it), base_model.model.<module>.token_adapter.trainable_tokens_delta
 *   [n, C] (trainable_token_indices: the rows themselves),
 *   base_model.model.<name>.weight (modules_to_save: full copies).
 * Applied at run time by model_apply_extras (model.h) for what changes whole weights, and by
 * merge (merge.h) into the weights.
 */
#ifndef LK_LORA_H
#define LK_LORA_H

#include <regex.h>
#include <stddef.h>
#include <stdint.h>

#include "cfg.h"
#include "lk.h"
#include "st.h"

struct model;
struct op_mat;

struct lora_pattern {
    char *key;     /* owned regex (PEFT matches `(.*\.)?(key)$` against the module name) */
    double value;
};

/* What adapter_config.json says (the fields lorakit reads and writes). Which modules are
 * adapted follows PEFT's check_target_module_exists (tuners_utils.py): exclude_modules first,
 * then modules_to_save (never also a LoRA target), then target_modules (a list: a name equal to
 * the module's or ending in ".name"; a string: a regex that must match the whole module name),
 * and with a list, layers_to_transform picks layers by the index after layers_pattern.
 * lora_config_targets answers that question for one module name. */
struct lora_config {
    int r;
    double alpha;
    double dropout;
    int use_rslora;
    int use_dora;
    int lora_bias;
    unsigned targets;             /* bit m set: module m (enum cfg_module) is targeted (in some layer) */
    int target_embed;             /* embed_tokens targeted (LoRA on the input embedding) */
    int target_head;              /* lm_head targeted (LoRA on the output layer) */
    char **target_list;           /* owned: target_modules as the list read, or NULL (then targets,
                                     target_embed and target_head say what is targeted) */
    int n_target_list;
    char *target_regex;           /* owned: target_modules as a regex string, or NULL */
    char **exclude;               /* owned: exclude_modules as a list, or NULL */
    int n_exclude;
    char *exclude_regex;          /* owned: exclude_modules as a regex string, or NULL */
    int *layers;                  /* owned: layers_to_transform, or NULL (every layer) */
    int n_layers;
    char **layers_pattern;        /* owned: layers_pattern (NULL: any "<name>.<N>." segment) */
    int n_layers_pattern;
    int ensure_weight_tying;      /* PEFT ties adapters of tied embed_tokens / lm_head */
    int *token_idx[2];            /* owned: trainable_token_indices for embed_tokens [0], lm_head [1] */
    int n_token_idx[2];
    char *unknown_keys;           /* owned: keys PEFT's LoraConfig does not have, "'a', 'b'" (NULL:
                                     none); the command names them in a warning */
    char base_model[512];
    char bias[16];                /* "none" (the only value the engine applies) */
    char init[32];                /* init_lora_weights as written ("true", "gaussian", "pissa"...) */
    int n_rank_pattern, n_alpha_pattern;
    struct lora_pattern *rank_pattern, *alpha_pattern; /* owned */
    int n_modules_to_save;
    char **modules_to_save;       /* owned */
};

struct lora_module {
    int layer;
    int module;        /* enum cfg_module */
    int R;
    int in, out;
    double alpha;
    float scale;       /* alpha / R or alpha / sqrt(R) */
    float *A;          /* points into lora.mem: [R, in] */
    float *B;          /* points into lora.mem: [out, R] */
    float *bias;       /* points into lora.mem: [out], or NULL without lora_bias */
    float *mag;        /* points into lora.mem: DoRA magnitude [out], or NULL */
};

/* A full tensor carried by the adapter: a modules_to_save copy, or (shared) PEFT's copy of the
 * base weight under a LoRA on embed_tokens / lm_head ("...embed_tokens.base_layer.weight"). */
struct lora_extra {
    char *name;        /* owned: the model tensor name, e.g. "lm_head.weight" */
    int ndim;
    int64_t shape[2];
    float *data;       /* owned */
    int base_layer;    /* 1: a base_layer copy. On a tied base it is the one weight embed_tokens
                          and lm_head share (named "model.embed_tokens.weight"), so it replaces
                          both and never unties them */
};

struct lora {
    struct lora_config cfg;
    float *mem;                 /* owned: every A, B, bias */
    size_t n;                   /* floats in mem */
    int n_mod;
    struct lora_module *mod;    /* owned array */
    int *index;                 /* owned [L * CFG_N_MODULES]: module slot or -1 */
    int L;
    struct lora_extra *extra;   /* owned array (modules_to_save tensors) */
    int n_extra;
    int extras_applied;         /* set by model_apply_extras */
    float *embed_A, *embed_B;   /* owned: embedding adapter [R, V] and [C, R], or NULL */
    int embed_R, embed_V, embed_C;
    float embed_scale;
    float *head_A, *head_B;     /* owned: LoRA on lm_head, A [R, C] and B [V, R], or NULL */
    int head_R, head_V, head_Cin;
    float head_scale;
    int *tok_idx[2];            /* owned: trainable tokens of embed_tokens [0] / lm_head [1]: ids */
    float *tok_rows[2];         /* owned: their new rows [n_tok, C] (PEFT's trainable_tokens_delta
                                   holds the rows themselves, written with index_copy) */
    int n_tok[2];
    int tok_C;                  /* columns of the rows (the hidden size) */
    float *mag_mem;             /* points into mem: the first DoRA magnitude (use_dora), or NULL */
    float *init_mem;            /* owned: the PiSSA initial factors (mem's layout), or NULL */
};

/* Default config: r 8, alpha 16, dropout 0, all seven projections, bias "none". */
void lora_config_default(struct lora_config *c);
void lora_config_release(struct lora_config *c);
/* A deep copy of src into dst (dst's old contents are not freed). LK_ERR_NOMEM leaves dst
 * released. */
int lora_config_copy(struct lora_config *dst, const struct lora_config *src, struct lk_err *err);
/* 1 when PEFT would put a LoRA on the module named name ("model.layers.3.self_attn.q_proj",
 * "model.embed_tokens", "lm_head"): check_target_module_exists of tuners_utils.py (exclude_modules,
 * modules_to_save, target_modules list or full-match regex, layers_to_transform with
 * layers_pattern). A regex that does not compile matches nothing (the reader refuses it). */
int lora_config_targets(const struct lora_config *c, const char *name);
/* PEFT's regexes are Python's: compiles one into a POSIX extended regex, anchored as
 * fmt says ("^(%s)$": full match; "^(.*\\.)?(%s)$": PEFT's pattern-key match), translating \d \w
 * \s (and inside [...]), (?:...) and lazy quantifiers; lookarounds, named groups and flags are
 * refused (LK_ERR_UNSUPPORTED), as is what lora_regex_check refuses. what and path name it in
 * messages. On success the caller regfree()s re. */
int lora_regex_compile(regex_t *re, const char *py, const char *fmt, const char *what,
                       const char *path, struct lk_err *err);
/* 1 when the adapter changes weights of the model it runs on (modules_to_save copies, a LoRA on
 * lm_head, trainable tokens): model_apply_extras must run before model_forward. */
int lora_changes_weights(const struct lora *l);
/* Rank and alpha for one module name ("model.layers.3.mlp.down_proj") after the patterns. */
void lora_config_module(const struct lora_config *c, const char *module_name, int *out_r,
                        double *out_alpha);
/* Parses "q_proj,v_proj" or "all" into the targets bitmask. */
int lora_targets_parse(const char *s, unsigned *out, struct lk_err *err);

/* Refuses a regex (rank/alpha_pattern key, target_modules string) that glibc's regcomp could
 * expand into gigabytes: over 256 characters, stacked quantifiers, repetitions over 16 or more
 * than 2 bounded ones. what
 * and path name it in the message. */
int lora_regex_check(const char *rx, const char *what, const char *path, struct lk_err *err);
/* Allocates the factors for every targeted module of a model config (zeroed). */
int lora_init(struct lora *l, const struct lora_config *lc, const struct cfg *c, struct lk_err *err);
void lora_release(struct lora *l);
/* DoRA's set-up (lora_dora.c): the initial magnitudes m = ||W + s B A|| per output row (PEFT's
 * init). */
int lora_init_dora_magnitude(struct lora *l, const struct model *m, struct lk_err *err);
/* PEFT's default init: A ~ kaiming_uniform(a = sqrt 5) = U(-1/sqrt(in), 1/sqrt(in)), B = 0;
 * gaussian: A ~ N(0, 1/R), B = 0. */
void lora_init_weights(struct lora *l, int gaussian, struct lk_rng *rng);
/* Slot of (layer, module), or NULL. */
struct lora_module *lora_find(const struct lora *l, int layer, int module);

// ---- adapter folders: the one reader (lora_io.c) ----

/* Reads DIR/adapter_config.json alone (peft_type LORA required; PEFT's defaults r 8, alpha 8).
 * What the engine cannot apply (layers_to_transform, bias other than "none", fan_in_fan_out) is
 * refused. lc is released on failure. */
int lora_config_load(struct lora_config *lc, const char *dir, struct lk_err *err);

/* One adapted projection of an adapter file. */
struct lora_file_module {
    int layer, module;                  /* module: enum cfg_module */
    int64_t R, in, out;                 /* lora_A [R, in], lora_B [out, R] */
    const struct st_tensor *A, *B;      /* point into the file's table */
    const struct st_tensor *bias, *mag; /* lora_B.bias, DoRA magnitude: into the table, or NULL */
};

/* An adapter folder opened on its own, without a base model. Every tensor of the file is one of:
 * a tensor of a module in mod (slot[i] >= 0), embed_A / embed_B, or a modules_to_save copy
 * "base_model.model.<name>" (slot[i] -1; its name and shape are checked by lora_file_bind). */
struct lora_file {
    struct lora_config cfg;       /* adapter_config.json, validated */
    char *config_json;            /* owned: its text (a writer keeps the fields lorakit does not model) */
    char *path;                   /* owned: DIR/adapter_model.safetensors, as messages name it */
    struct st_file st;            /* owned: the tensors, mapped, in the file's order */
    int n_mod;
    struct lora_file_module *mod; /* owned: in the order of their lora_A in the file */
    int *slot;                    /* owned [st.n]: the module each tensor belongs to, or -1 */
    int L;                        /* 1 + the highest layer the names mention (0: none) */
    int *index;                   /* owned [L * CFG_N_MODULES]: the module of (layer, m), or -1 */
    const struct st_tensor *embed_A, *embed_B; /* lora_embedding_A [R, V] / _B [C, R], or NULL */
    const struct st_tensor *head_A, *head_B;   /* lm_head.lora_A.weight [R, C] / lora_B [V, R], or NULL */
    const struct st_tensor *base_layer[2];     /* embed_tokens / lm_head ".base_layer.weight" [V, C]:
                                                  PEFT's copy of a LoRA-targeted embedding layer */
    const struct st_tensor *tok[2];            /* embed_tokens / lm_head trainable_tokens_delta [n, C] */
};
/* Opens DIR (adapter_config.json + adapter_model.safetensors) without a base: the config as
 * lora_config_load reads it; every tensor named as PEFT names it and of a float dtype; each
 * module with both factors, 2-D, the config's rank (after rank_pattern), lora_B's rank equal to
 * lora_A's, lora_B.bias exactly when lora_bias and a magnitude exactly when use_dora, both [out];
 * no module the config does not target (lora_config_targets); the embedding and lm_head
 * adapters complete; base_layer copies only of targeted embedding layers; trainable-token rows
 * exactly for the modules trainable_token_indices names, one row per index. On failure lf is
 * closed (closing it again is harmless). */
int lora_file_open(struct lora_file *lf, const char *dir, struct lk_err *err);
/* Harmless on a zeroed or closed struct. */
void lora_file_close(struct lora_file *lf);
/* The second step: checks an open adapter against a base config (layers the base has, every
 * shape, modules_to_save names, token ids inside the vocabulary, every targeted projection of
 * every layer present) and reads it into l (release with lora_release; on failure l holds
 * nothing). lf stays open. On a base that ties lm_head to embed_tokens: a base_layer copy is the
 * shared weight; with ensure_weight_tying, a modules_to_save copy of one of the two stands for
 * the other too (PEFT ties their copies), and a LoRA on either is refused (PEFT ties a second
 * adapter to it, which lorakit does not build). lf stays open. */
int lora_file_bind(const struct lora_file *lf, const struct cfg *c, struct lora *l, struct lk_err *err);
/* lora_file_open, lora_file_bind, lora_file_close: an adapter folder read for a base config. */
int lora_load(struct lora *l, const char *dir, const struct cfg *c, struct lk_err *err);
/* Appends a modules_to_save tensor to the array *v of *n: name copied, shape [shape[0]] or
 * [shape[0], shape[1]], *out_data its floats (allocated, not filled). On failure (LK_ERR_NOMEM)
 * the array stays valid: an entry that was added is counted with its fields NULL or owned, so
 * releasing the array as usual frees everything. */
int lora_extra_add(struct lora_extra **v, int *n, const char *name, int ndim, const int64_t shape[2],
                   float **out_data, struct lk_err *err);
/* Writes an adapter folder atomically (both files to temp names, then renamed). */
int lora_save(const struct lora *l, const char *dir, struct lk_err *err);
/* Writes the tensors of a block with lora->mem's layout (the factors, or their gradients) under
 * PEFT names to one .safetensors file. */
int lora_save_tensors(const struct lora *l, const float *block, const char *path, struct lk_err *err);
/* The PEFT tensor name prefix for a module: "base_model.model.model.layers.3.mlp.down_proj". */
void lora_peft_name(int layer, int module, char *buf, size_t n);

struct model;
/* PiSSA init: A, B from the top-R singular triplets of each targeted W, and W replaced by
 * W - s B A in the model (lora_pissa.c). Keeps a copy of the initial factors. */
int lora_init_pissa(struct lora *l, struct model *m, struct lk_err *err);
/* Saves a PiSSA-trained adapter converted to apply to the original base: rank 2R. */
int lora_save_pissa(const struct lora *l, const struct model *m, const char *dir, struct lk_err *err);
/* The frozen weight W [out, in] of (layer, module) as the model keeps it: float32, or bf16 / f16
 * (lora_pissa.c; also used by lora_dora.c). Points into the model. */
const struct op_mat *lora_base_weight(const struct model *m, int layer, int module);

/* Trainable parameter count (A, B, biases). */
size_t lora_param_count(const struct lora *l);

// ---- the adapter a training run starts from (lora.c) ----

enum lora_init_kind { LORA_INIT_DEFAULT = 0, LORA_INIT_GAUSSIAN, LORA_INIT_PISSA };
/* "default", "gaussian", "pissa" -> the kind; -1 when unknown. */
int lora_init_kind_parse(const char *s);

/* How a trained adapter starts: a new one (rank, alpha, targets, init), or an existing adapter
 * (continued training). */
struct lora_build_opts {
    const char *from;          /* borrowed: continue this adapter folder, or NULL: a new one */
    int r;
    double alpha, dropout;
    int use_rslora, use_dora;
    const char *targets;       /* borrowed: "all" or a list like "q_proj,v_proj" */
    enum lora_init_kind init;
    uint64_t seed;             /* seeds the init's random draws */
    const char *base_model;    /* borrowed: written as base_model_name_or_path */
};
/* Builds the adapter to train on m. A new one is initialised as PEFT does (default: kaiming-
 * uniform A, zero B; gaussian; PiSSA, which also replaces each target W by W - s B A in m),
 * then DoRA's magnitudes from m when use_dora. `from` is loaded instead, its dropout set to
 * o->dropout; embedding and modules_to_save adapters are refused (LK_ERR_UNSUPPORTED). On
 * failure l is released. */
int lora_build(struct lora *l, struct model *m, const struct lora_build_opts *o, struct lk_err *err);

#endif
