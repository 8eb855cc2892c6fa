/*
 * cfg.c - config.json of LlamaForCausalLM, Qwen2ForCausalLM and Qwen3ForCausalLM: parse with
 * transformers' defaults (rotary scaling included), refuse what lorakit does not model (naming
 * the field), save with our fields updated and unknown fields kept, and the list of weight
 * tensors a config implies. Owns: c->json.
 */
#include "cfg.h"

#include <cJSON.h>
#include <limits.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "gguf.h"
#include "st.h"

/* The parameter count in floating point (no overflow), counting lm_head even when tied and
 * every bias: an upper bound for the limit check. */
#define CFG_MAX_PARAMS 1e13
/* No published decoder has more than a few hundred layers; the bound keeps the tensor table
 * small even for a config without weights beside it, which the weights cannot bound (a diff of
 * two adapters on a config-only base). */
#define CFG_MAX_LAYERS 4096
static double cfg_param_estimate(const struct cfg *c)
{
    double C = c->hidden_size, F = c->intermediate_size, V = c->vocab_size, L = c->num_hidden_layers;
    double Q = (double)c->num_attention_heads * c->head_dim, KV = (double)c->num_key_value_heads * c->head_dim;
    return 2 * V * C + C + L * (2 * Q * C + 2 * KV * C + Q + 2 * KV + C + 3 * F * C + 2 * C + 2.0 * c->head_dim);
}

const char *const cfg_module_names[CFG_N_MODULES] = {
    "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
};

// ---- reading fields ----

/* The field, or NULL when absent or JSON null (transformers treats both as "use the default"). */
static const cJSON *cfg_get(const cJSON *root, const char *key)
{
    const cJSON *j = cJSON_GetObjectItemCaseSensitive(root, key);
    return cJSON_IsNull(j) ? NULL : j;
}

static int cfg_int(const cJSON *root, const char *key, int required, int def, int *out, const char *name,
                   struct lk_err *err)
{
    const cJSON *j = cfg_get(root, key);
    if (!j) {
        if (required)
            return lk_errf(err, LK_ERR_FORMAT, "%s: missing required field '%s'", name, key);
        *out = def;
        return LK_OK;
    }
    if (!cJSON_IsNumber(j) || j->valuedouble != floor(j->valuedouble) || fabs(j->valuedouble) > INT_MAX)
        return lk_errf(err, LK_ERR_FORMAT, "%s: field '%s' must be an integer", name, key);
    *out = (int)j->valuedouble;
    return LK_OK;
}

static int cfg_pos_int(const cJSON *root, const char *key, int required, int def, int *out,
                       const char *name, struct lk_err *err)
{
    int rc = cfg_int(root, key, required, def, out, name, err);
    if (!rc && *out <= 0)
        return lk_errf(err, LK_ERR_FORMAT, "%s: field '%s' must be positive, got %d", name, key, *out);
    return rc;
}

static int cfg_num(const cJSON *root, const char *key, double def, double *out, const char *name,
                   struct lk_err *err)
{
    const cJSON *j = cfg_get(root, key);
    if (!j) {
        *out = def;
        return LK_OK;
    }
    if (!cJSON_IsNumber(j) || !isfinite(j->valuedouble))
        return lk_errf(err, LK_ERR_FORMAT, "%s: field '%s' must be a number", name, key);
    *out = j->valuedouble;
    return LK_OK;
}

static int cfg_bool(const cJSON *root, const char *key, int def, int *out, const char *name,
                    struct lk_err *err)
{
    const cJSON *j = cfg_get(root, key);
    if (!j) {
        *out = def;
        return LK_OK;
    }
    if (!cJSON_IsBool(j))
        return lk_errf(err, LK_ERR_FORMAT, "%s: field '%s' must be true or false", name, key);
    *out = cJSON_IsTrue(j);
    return LK_OK;
}

/* A token id: an integer, the first of a list (Llama 3 lists several eos ids), or -1. */
static int cfg_token(const cJSON *root, const char *key, int *out, const char *name, struct lk_err *err)
{
    const cJSON *j = cfg_get(root, key);
    *out = -1;
    if (cJSON_IsArray(j))
        j = j->child;
    if (!j)
        return LK_OK;
    if (!cJSON_IsNumber(j) || j->valuedouble != floor(j->valuedouble) || j->valuedouble < 0 ||
        j->valuedouble > INT_MAX)
        return lk_errf(err, LK_ERR_FORMAT, "%s: field '%s' must be a token id", name, key);
    *out = (int)j->valuedouble;
    return LK_OK;
}

static void cfg_copy(char *dst, size_t n, const char *src)
{
    snprintf(dst, n, "%s", src);
}

/* The architectures lorakit models, with the model_type transformers pairs them with. */
static const struct {
    const char *architecture, *model_type;
    enum cfg_arch arch;
} cfg_archs[] = {
    { "LlamaForCausalLM", "llama", CFG_ARCH_LLAMA },
    { "Qwen2ForCausalLM", "qwen2", CFG_ARCH_QWEN2 },
    { "Qwen3ForCausalLM", "qwen3", CFG_ARCH_QWEN3 },
};
#define CFG_N_ARCHS (sizeof cfg_archs / sizeof cfg_archs[0])

const char *cfg_rope_type_name(enum cfg_rope_type t)
{
    static const char *const names[] = { "default", "linear", "dynamic", "llama3" };
    return (unsigned)t < sizeof names / sizeof names[0] ? names[t] : "?";
}

/* A positive finite number inside a rope object; required. */
static int cfg_rope_num(const cJSON *r, const char *key, const char *obj, const char *type, double *out,
                        const char *name, struct lk_err *err)
{
    const cJSON *j = cfg_get(r, key);
    if (!j)
        return lk_errf(err, LK_ERR_FORMAT, "%s: field '%s' of type '%s' needs '%s'", name, obj, type, key);
    if (!cJSON_IsNumber(j) || !isfinite(j->valuedouble) || !(j->valuedouble > 0))
        return lk_errf(err, LK_ERR_FORMAT, "%s: '%s.%s' must be a positive number", name, obj, key);
    *out = j->valuedouble;
    return LK_OK;
}

/*
 * Rotary settings: rope_theta, then the scaling in rope_scaling (transformers 4) or
 * rope_parameters (transformers 5, which also moves rope_theta there), read as
 * modeling_rope_utils.py reads them: the type in 'rope_type' (or the older 'type'); linear and
 * dynamic need 'factor'; llama3 needs 'factor', 'low_freq_factor', 'high_freq_factor' (larger)
 * and 'original_max_position_embeddings'. Every other type (yarn, longrope, ntk, ...) is
 * refused by name: its frequencies or attention factor are not implemented.
 */
static int cfg_parse_rope(struct cfg *c, const cJSON *root, const char *name, struct lk_err *err)
{
    struct cfg_rope_scaling *r = &c->rope_scaling;
    memset(r, 0, sizeof *r);
    const cJSON *rp = cfg_get(root, "rope_parameters"), *rs = cfg_get(root, "rope_scaling");
    const char *obj = "rope_scaling";
    int rc;
    if ((rc = cfg_num(root, "rope_theta", 10000.0, &c->rope_theta, name, err)))
        return rc;
    if (rp) {
        if (!cJSON_IsObject(rp))
            return lk_errf(err, LK_ERR_FORMAT, "%s: field 'rope_parameters' must be an object", name);
        if ((rc = cfg_num(rp, "rope_theta", c->rope_theta, &c->rope_theta, name, err)))
            return rc;
        if (!rs) {
            rs = rp;
            obj = "rope_parameters";
        }
    }
    if (!(c->rope_theta > 0))
        return lk_errf(err, LK_ERR_FORMAT, "%s: field 'rope_theta' must be positive", name);
    const cJSON *prf = cfg_get(root, "partial_rotary_factor");
    if (prf && (!cJSON_IsNumber(prf) || prf->valuedouble != 1.0))
        return lk_errf(err, LK_ERR_UNSUPPORTED, "%s: field 'partial_rotary_factor' is not 1: rotary embedding "
                       "on part of a head is not supported", name);
    if (!rs)
        return LK_OK;
    if (!cJSON_IsObject(rs))
        return lk_errf(err, LK_ERR_FORMAT, "%s: field '%s' must be an object or null", name, obj);
    const cJSON *t = cfg_get(rs, "rope_type");
    if (!t)
        t = cfg_get(rs, "type"); // the older key, which transformers still reads
    if (!t && rs == rp)
        return LK_OK; // rope_parameters holding rope_theta only
    if (!cJSON_IsString(t))
        return lk_errf(err, LK_ERR_FORMAT, "%s: field '%s' needs a 'rope_type' string", name, obj);
    const char *type = t->valuestring;
    if (!strcmp(type, "default"))
        return LK_OK;
    if (!strcmp(type, "linear"))
        r->type = CFG_ROPE_LINEAR;
    else if (!strcmp(type, "dynamic"))
        r->type = CFG_ROPE_DYNAMIC;
    else if (!strcmp(type, "llama3"))
        r->type = CFG_ROPE_LLAMA3;
    else
        return lk_errf(err, LK_ERR_UNSUPPORTED, "%s: field '%s' has rope type '%.32s', which is not supported "
                       "(supported: default, linear, dynamic, llama3)", name, obj, type);
    if ((rc = cfg_rope_num(rs, "factor", obj, type, &r->factor, name, err)))
        return rc;
    int need_orig = r->type == CFG_ROPE_LLAMA3;
    if (need_orig || cfg_get(rs, "original_max_position_embeddings")) {
        if (!cfg_get(rs, "original_max_position_embeddings"))
            return lk_errf(err, LK_ERR_FORMAT,
                           "%s: field '%s' of type '%s' needs 'original_max_position_embeddings'", name, obj, type);
        if ((rc = cfg_pos_int(rs, "original_max_position_embeddings", 1, 0, &r->original_max_position_embeddings,
                              name, err)))
            return rc;
    }
    if (r->type == CFG_ROPE_LLAMA3) {
        if ((rc = cfg_rope_num(rs, "low_freq_factor", obj, type, &r->low_freq_factor, name, err)) ||
            (rc = cfg_rope_num(rs, "high_freq_factor", obj, type, &r->high_freq_factor, name, err)))
            return rc;
        // the medium band interpolates over high - low: equal factors would divide by zero
        if (!(r->high_freq_factor > r->low_freq_factor))
            return lk_errf(err, LK_ERR_FORMAT,
                           "%s: '%s.high_freq_factor' %g must be larger than 'low_freq_factor' %g", name, obj,
                           r->high_freq_factor, r->low_freq_factor);
    }
    return LK_OK;
}

int cfg_rope_positions(const struct cfg *c)
{
    if (c->rope_scaling.type != CFG_ROPE_DYNAMIC)
        return INT_MAX;
    int n = c->max_position_embeddings, o = c->rope_scaling.original_max_position_embeddings;
    return o > 0 && o < n ? o : n;
}

/* Sliding-window attention, on for some layers, is not modelled: refused however it is asked for
 * (use_sliding_window, or layer_types naming another kind of layer). */
static int cfg_refuse_sliding(const cJSON *root, const char *name, struct lk_err *err)
{
    int b, rc;
    if ((rc = cfg_bool(root, "use_sliding_window", 0, &b, name, err)))
        return rc;
    if (b)
        return lk_errf(err, LK_ERR_UNSUPPORTED,
                       "%s: field 'use_sliding_window' is true: sliding-window attention is not supported", name);
    const cJSON *lt = cfg_get(root, "layer_types"), *e;
    if (lt && !cJSON_IsArray(lt))
        return lk_errf(err, LK_ERR_FORMAT, "%s: field 'layer_types' must be a list", name);
    cJSON_ArrayForEach(e, lt)
    {
        if (!cJSON_IsString(e) || strcmp(e->valuestring, "full_attention"))
            return lk_errf(err, LK_ERR_UNSUPPORTED, "%s: field 'layer_types' has '%.32s': only 'full_attention' "
                           "layers are supported", name, cJSON_IsString(e) ? e->valuestring : "not a string");
    }
    return LK_OK;
}

static int cfg_parse_root(struct cfg *c, const cJSON *root, const char *name, struct lk_err *err)
{
    if (!cJSON_IsObject(root))
        return lk_errf(err, LK_ERR_FORMAT, "%s: not a JSON object", name);
    // 1. architecture
    const cJSON *arch = cfg_get(root, "architectures");
    const cJSON *mt = cfg_get(root, "model_type");
    const char *a = NULL;
    if (cJSON_IsArray(arch) && cJSON_IsString(arch->child))
        a = arch->child->valuestring;
    else if (arch)
        return lk_errf(err, LK_ERR_FORMAT, "%s: field 'architectures' must be a list of names", name);
    size_t ai = 0;
    for (; !a && cJSON_IsString(mt) && ai < CFG_N_ARCHS; ai++) // no architectures: go by model_type
        if (!strcmp(mt->valuestring, cfg_archs[ai].model_type))
            a = cfg_archs[ai].architecture;
    if (!a && cJSON_IsString(mt))
        a = mt->valuestring;
    if (!a)
        return lk_errf(err, LK_ERR_FORMAT, "%s: missing required field 'architectures'", name);
    for (ai = 0; ai < CFG_N_ARCHS && strcmp(a, cfg_archs[ai].architecture); ai++)
        ;
    if (ai == CFG_N_ARCHS)
        return lk_errf(err, LK_ERR_UNSUPPORTED, "%s: unsupported architecture '%.64s' (supported: LlamaForCausalLM, "
                       "Qwen2ForCausalLM, Qwen3ForCausalLM)", name, a);
    c->arch = cfg_archs[ai].arch;
    cfg_copy(c->model_type, sizeof c->model_type, cfg_archs[ai].model_type);
    cfg_copy(c->architecture, sizeof c->architecture, a);
    int qwen = c->arch == CFG_ARCH_QWEN2 || c->arch == CFG_ARCH_QWEN3, qwen3 = c->arch == CFG_ARCH_QWEN3;
    // 2. dimensions (Qwen3Config's defaults: 32 kv heads and head_dim 128, whatever the hidden size)
    int rc;
    if ((rc = cfg_pos_int(root, "hidden_size", 1, 0, &c->hidden_size, name, err)) ||
        (rc = cfg_pos_int(root, "intermediate_size", 1, 0, &c->intermediate_size, name, err)) ||
        (rc = cfg_pos_int(root, "num_hidden_layers", 1, 0, &c->num_hidden_layers, name, err)) ||
        (rc = cfg_pos_int(root, "num_attention_heads", 1, 0, &c->num_attention_heads, name, err)) ||
        (rc = cfg_pos_int(root, "num_key_value_heads", 0, qwen3 ? 32 : c->num_attention_heads,
                          &c->num_key_value_heads, name, err)) ||
        (rc = cfg_pos_int(root, "vocab_size", 1, 0, &c->vocab_size, name, err)) ||
        (rc = cfg_pos_int(root, "max_position_embeddings", 0, qwen ? 32768 : 2048,
                          &c->max_position_embeddings, name, err)))
        return rc;
    if (cfg_get(root, "head_dim") || qwen3) {
        if ((rc = cfg_pos_int(root, "head_dim", 0, 128, &c->head_dim, name, err)))
            return rc;
    } else {
        if (c->hidden_size % c->num_attention_heads)
            return lk_errf(err, LK_ERR_FORMAT,
                           "%s: 'hidden_size' %d is not divisible by 'num_attention_heads' %d (and no 'head_dim')",
                           name, c->hidden_size, c->num_attention_heads);
        c->head_dim = c->hidden_size / c->num_attention_heads;
    }
    if (c->num_attention_heads % c->num_key_value_heads)
        return lk_errf(err, LK_ERR_FORMAT,
                       "%s: 'num_attention_heads' %d is not divisible by 'num_key_value_heads' %d", name,
                       c->num_attention_heads, c->num_key_value_heads);
    if ((int64_t)c->num_attention_heads * c->head_dim > INT_MAX)
        return lk_errf(err, LK_ERR_FORMAT, "%s: 'num_attention_heads' x 'head_dim' is too large", name);
    // every size below is a product of these: refuse what no allocation could hold (and what
    // would overflow the size arithmetic of cfg_param_count and the weight layout)
    double npar = cfg_param_estimate(c);
    if (npar > CFG_MAX_PARAMS)
        return lk_errf(err, LK_ERR_FORMAT, "%s: the dimensions describe %.3g parameters: too large (at most %.0e)",
                       name, npar, CFG_MAX_PARAMS);
    // 3. numbers with transformers' defaults
    if ((rc = cfg_num(root, "rms_norm_eps", 1e-6, &c->rms_norm_eps, name, err)) ||
        (rc = cfg_parse_rope(c, root, name, err)) ||
        (rc = cfg_num(root, "initializer_range", 0.02, &c->initializer_range, name, err)) ||
        (rc = cfg_bool(root, "tie_word_embeddings", 0, &c->tie_word_embeddings, name, err)) ||
        (rc = cfg_token(root, "bos_token_id", &c->bos_token_id, name, err)) ||
        (rc = cfg_token(root, "eos_token_id", &c->eos_token_id, name, err)))
        return rc;
    if (!(c->rms_norm_eps > 0))
        return lk_errf(err, LK_ERR_FORMAT, "%s: field 'rms_norm_eps' must be positive", name);
    // 4. what we refuse rather than silently ignore
    const cJSON *act = cfg_get(root, "hidden_act");
    if (act && (!cJSON_IsString(act) || strcmp(act->valuestring, "silu")))
        return lk_errf(err, LK_ERR_UNSUPPORTED, "%s: field 'hidden_act' is %s%.32s%s: only 'silu' is supported",
                       name, cJSON_IsString(act) ? "'" : "", cJSON_IsString(act) ? act->valuestring : "not a string",
                       cJSON_IsString(act) ? "'" : "");
    int b;
    if (qwen) {
        if ((rc = cfg_refuse_sliding(root, name, err)))
            return rc;
        c->attention_bias = !qwen3; // Qwen2 always has q/k/v biases
        c->qk_norm = qwen3;         // Qwen3: none, and RMSNorm on each head of q and k instead
        if (qwen3 && (rc = cfg_bool(root, "attention_bias", 0, &b, name, err)))
            return rc;
        if (qwen3 && b)
            return lk_errf(err, LK_ERR_UNSUPPORTED, "%s: field 'attention_bias' is true: Qwen3 with biases on "
                           "q/k/v/o_proj is not supported", name);
    } else {
        if ((rc = cfg_bool(root, "attention_bias", 0, &c->attention_bias, name, err)) ||
            (rc = cfg_bool(root, "mlp_bias", 0, &b, name, err)))
            return rc;
        if (b)
            return lk_errf(err, LK_ERR_UNSUPPORTED, "%s: field 'mlp_bias' is true: MLP biases are not supported",
                           name);
    }
    const cJSON *dt = cfg_get(root, "torch_dtype");
    if (!dt)
        dt = cfg_get(root, "dtype"); // transformers >= 4.56 writes "dtype"
    cfg_copy(c->torch_dtype, sizeof c->torch_dtype, cJSON_IsString(dt) ? dt->valuestring : "float32");
    return LK_OK;
}

int cfg_parse(struct cfg *c, const char *text, const char *name, struct lk_err *err)
{
    memset(c, 0, sizeof *c);
    cJSON *root = cJSON_Parse(text);
    if (!root)
        return lk_errf(err, LK_ERR_FORMAT, "%s: not valid JSON", name);
    int rc = cfg_parse_root(c, root, name, err);
    cJSON_Delete(root);
    if (!rc) {
        c->json = lk_strdup(text);
        if (!c->json)
            rc = lk_errf(err, LK_ERR_NOMEM, "out of memory");
    }
    if (rc)
        cfg_release(c);
    return rc;
}

/* 1 when a folder holds model weights (model.safetensors or the sharded index), -1 on OOM. */
static int cfg_has_weights(const char *dir)
{
    char *a = lk_path_join(dir, "model.safetensors"), *b = lk_path_join(dir, "model.safetensors.index.json");
    int r = !a || !b ? -1 : lk_file_exists(a) || lk_file_exists(b);
    lk_free(a);
    lk_free(b);
    return r;
}

/* What config.json describes must fit the weights beside it, checked before anything is sized
 * from the config: a 190-byte config.json asking for 7,171,000 layers of width 2 passes the
 * parameter limit, and beside an empty model.safetensors once cost 13 GB and two minutes before
 * any refusal. The bound (st_model_capacity) counts at least 2 + 9 tensors per layer (embedding,
 * final norm; per layer 7 linears, 2 norms) and cfg_param_count elements. A folder without
 * weights is not checked here: a caller that needs them opens them before sizing (model_load). */
static int cfg_fits_weights(const struct cfg *c, const char *dir, const char *name, struct lk_err *err)
{
    int has = cfg_has_weights(dir);
    if (has <= 0)
        return has < 0 ? lk_errf(err, LK_ERR_NOMEM, "out of memory") : LK_OK;
    struct st_model sm;
    int rc = st_model_open(&sm, dir, err);
    if (rc)
        return rc;
    uint64_t cap_t, cap_e;
    st_model_capacity(&sm, &cap_t, &cap_e);
    st_model_close(&sm);
    uint64_t need_t = 2 + (uint64_t)c->num_hidden_layers * (CFG_N_MODULES + 2);
    uint64_t need_e = (uint64_t)cfg_param_count(c);
    if (need_t > cap_t)
        return lk_errf(err, LK_ERR_SHAPE,
                       "%s: describes %d layers (at least %llu tensors), more than the weights in '%s' can "
                       "hold (at most %llu tensors in their headers): this config.json does not belong to them",
                       name, c->num_hidden_layers, (unsigned long long)need_t, dir, (unsigned long long)cap_t);
    if (need_e > cap_e)
        return lk_errf(err, LK_ERR_SHAPE,
                       "%s: describes %llu parameters, more than the weights in '%s' can hold (%llu bytes of "
                       "tensor data): this config.json does not belong to them (hint: quantized weights are "
                       "not supported)", name, (unsigned long long)need_e, dir, (unsigned long long)cap_e);
    return LK_OK;
}

int cfg_load(struct cfg *c, const char *path, struct lk_err *err)
{
    memset(c, 0, sizeof *c);
    if (gguf_is_file(path))
        return lk_errf(err, LK_ERR_UNSUPPORTED, "%s: a GGUF file, not a model folder: this needs config.json and "
                       "the safetensors (logits, generate, eval, tokenize and info read GGUF models)", path);
    int dir = lk_is_dir(path);
    char *p = dir ? lk_path_join(path, "config.json") : lk_strdup(path);
    if (!p)
        return lk_errf(err, LK_ERR_NOMEM, "out of memory");
    char *text;
    int rc = lk_read_file(p, &text, NULL, err);
    if (!rc) {
        rc = cfg_parse(c, text, p, err);
        lk_free(text);
    }
    if (!rc && dir && (rc = cfg_fits_weights(c, path, p, err)))
        cfg_release(c);
    lk_free(p);
    return rc;
}

void cfg_release(struct cfg *c)
{
    if (!c)
        return;
    lk_free(c->json);
    memset(c, 0, sizeof *c);
}

// ---- presets ----

const char *const cfg_preset_names[] = { "tiny", "qwen2.5-0.5b", "qwen2-1.5b", "qwen3-0.6b", "llama3.2-1b",
                                          "llama-tiny", NULL };

static void cfg_dims(struct cfg *c, int C, int F, int L, int NH, int NKV, int V)
{
    c->hidden_size = C;
    c->intermediate_size = F;
    c->num_hidden_layers = L;
    c->num_attention_heads = NH;
    c->num_key_value_heads = NKV;
    c->head_dim = C / NH;
    c->vocab_size = V;
}

void cfg_default_qwen2(struct cfg *c)
{
    memset(c, 0, sizeof *c);
    c->arch = CFG_ARCH_QWEN2;
    cfg_copy(c->architecture, sizeof c->architecture, "Qwen2ForCausalLM");
    cfg_copy(c->model_type, sizeof c->model_type, "qwen2");
    cfg_dims(c, 64, 176, 2, 4, 2, 512);
    c->max_position_embeddings = 1024;
    c->rms_norm_eps = 1e-6;
    c->rope_theta = 10000.0;
    c->initializer_range = 0.02;
    c->tie_word_embeddings = 1;
    c->attention_bias = 1;
    c->bos_token_id = c->eos_token_id = -1;
    cfg_copy(c->torch_dtype, sizeof c->torch_dtype, "float32");
}

static void cfg_set_arch(struct cfg *c, enum cfg_arch arch)
{
    for (size_t i = 0; i < CFG_N_ARCHS; i++)
        if (cfg_archs[i].arch == arch) {
            c->arch = arch;
            cfg_copy(c->architecture, sizeof c->architecture, cfg_archs[i].architecture);
            cfg_copy(c->model_type, sizeof c->model_type, cfg_archs[i].model_type);
        }
    c->attention_bias = arch == CFG_ARCH_QWEN2;
    c->qk_norm = arch == CFG_ARCH_QWEN3;
}

/* The published configs' numbers (Qwen/Qwen2.5-0.5B, Qwen/Qwen2-1.5B, Qwen/Qwen3-0.6B,
 * meta-llama/Llama-3.2-1B config.json); tiny and llama-tiny are the project's own. */
static const struct cfg_preset_row {
    const char *name;
    enum cfg_arch arch;
    int C, F, L, NH, NKV, HS, V, max_pos, tied, bos, eos;
    double eps, theta;
    struct cfg_rope_scaling rope;
    const char *dtype;
} cfg_presets[] = {
    { "tiny", CFG_ARCH_QWEN2, 64, 176, 2, 4, 2, 16, 512, 1024, 1, -1, -1, 1e-6, 1e4, { 0 }, "float32" },
    { "qwen2.5-0.5b", CFG_ARCH_QWEN2, 896, 4864, 24, 14, 2, 64, 151936, 32768, 1, 151643, 151643, 1e-6, 1e6, { 0 },
      "bfloat16" },
    { "qwen2-1.5b", CFG_ARCH_QWEN2, 1536, 8960, 28, 12, 2, 128, 151936, 131072, 1, 151643, 151643, 1e-6, 1e6, { 0 },
      "bfloat16" },
    // head_dim 128 although hidden / heads is 64
    { "qwen3-0.6b", CFG_ARCH_QWEN3, 1024, 3072, 28, 16, 8, 128, 151936, 40960, 1, 151643, 151645, 1e-6, 1e6, { 0 },
      "bfloat16" },
    { "llama3.2-1b", CFG_ARCH_LLAMA, 2048, 8192, 16, 32, 8, 64, 128256, 131072, 1, 128000, 128001, 1e-5, 5e5,
      { CFG_ROPE_LLAMA3, 32.0, 1.0, 4.0, 8192 }, "bfloat16" },
    { "llama-tiny", CFG_ARCH_LLAMA, 64, 176, 2, 4, 2, 16, 512, 1024, 0, -1, -1, 1e-5, 1e4, { 0 }, "float32" },
};

int cfg_preset(struct cfg *c, const char *name, struct lk_err *err)
{
    cfg_default_qwen2(c);
    for (size_t i = 0; i < sizeof cfg_presets / sizeof cfg_presets[0]; i++) {
        const struct cfg_preset_row *p = &cfg_presets[i];
        if (strcmp(name, p->name))
            continue;
        cfg_set_arch(c, p->arch);
        cfg_dims(c, p->C, p->F, p->L, p->NH, p->NKV, p->V);
        c->head_dim = p->HS;
        c->max_position_embeddings = p->max_pos;
        c->tie_word_embeddings = p->tied;
        c->bos_token_id = p->bos;
        c->eos_token_id = p->eos;
        c->rms_norm_eps = p->eps;
        c->rope_theta = p->theta;
        c->rope_scaling = p->rope;
        cfg_copy(c->torch_dtype, sizeof c->torch_dtype, p->dtype);
        return LK_OK;
    }
    return lk_errf(err, LK_ERR_USAGE, "unknown preset '%s' (presets: tiny, qwen2.5-0.5b, qwen2-1.5b, qwen3-0.6b, "
                   "llama3.2-1b, llama-tiny)", name);
}

// ---- saving ----

static void cfg_json_num(struct cJSON *root, const char *key, double v)
{
    cJSON *n = cJSON_CreateNumber(v);
    if (cJSON_GetObjectItemCaseSensitive(root, key))
        cJSON_ReplaceItemInObjectCaseSensitive(root, key, n);
    else
        cJSON_AddItemToObject(root, key, n);
}

static void cfg_json_set(struct cJSON *root, const char *key, cJSON *item)
{
    if (cJSON_GetObjectItemCaseSensitive(root, key))
        cJSON_ReplaceItemInObjectCaseSensitive(root, key, item);
    else
        cJSON_AddItemToObject(root, key, item);
}

static int cfg_cmp_item(const void *a, const void *b)
{
    return strcmp((*(cJSON *const *)a)->string, (*(cJSON *const *)b)->string);
}

/* Sorts an object's keys (as transformers' sort_keys=True does) for configs made from scratch. */
static int cfg_json_sort(cJSON *obj)
{
    int n = cJSON_GetArraySize(obj);
    if (n < 2)
        return 0;
    cJSON **v = lk_malloc(sizeof *v * (size_t)n);
    if (!v)
        return -1;
    int k = 0;
    for (cJSON *e = obj->child; e; e = e->next)
        v[k++] = e;
    qsort(v, (size_t)n, sizeof *v, cfg_cmp_item);
    for (int i = 0; i < n; i++) {
        v[i]->prev = i ? v[i - 1] : v[n - 1]; // cJSON keeps child->prev = last
        v[i]->next = i + 1 < n ? v[i + 1] : NULL;
    }
    obj->child = v[0];
    lk_free(v);
    return 0;
}

/* rope_scaling as transformers writes it (keys sorted), or null for the default rope. */
static cJSON *cfg_rope_json(const struct cfg_rope_scaling *r)
{
    if (r->type == CFG_ROPE_DEFAULT)
        return cJSON_CreateNull();
    cJSON *o = cJSON_CreateObject();
    cJSON_AddNumberToObject(o, "factor", r->factor);
    if (r->type == CFG_ROPE_LLAMA3) {
        cJSON_AddNumberToObject(o, "high_freq_factor", r->high_freq_factor);
        cJSON_AddNumberToObject(o, "low_freq_factor", r->low_freq_factor);
    }
    if (r->original_max_position_embeddings > 0)
        cJSON_AddNumberToObject(o, "original_max_position_embeddings", r->original_max_position_embeddings);
    cJSON_AddStringToObject(o, "rope_type", cfg_rope_type_name(r->type));
    return o;
}

int cfg_save(const struct cfg *c, const char *path, struct lk_err *err)
{
    cJSON *root = c->json ? cJSON_Parse(c->json) : cJSON_CreateObject();
    if (!root)
        return lk_errf(err, LK_ERR_NOMEM, "%s: cannot build the config JSON", path);
    cJSON *arch = cJSON_CreateArray();
    cJSON_AddItemToArray(arch, cJSON_CreateString(c->architecture));
    cfg_json_set(root, "architectures", arch);
    cfg_json_set(root, "model_type", cJSON_CreateString(c->model_type));
    cfg_json_num(root, "hidden_size", c->hidden_size);
    cfg_json_num(root, "intermediate_size", c->intermediate_size);
    cfg_json_num(root, "num_hidden_layers", c->num_hidden_layers);
    cfg_json_num(root, "num_attention_heads", c->num_attention_heads);
    cfg_json_num(root, "num_key_value_heads", c->num_key_value_heads);
    if (cJSON_GetObjectItemCaseSensitive(root, "head_dim") || c->head_dim * c->num_attention_heads != c->hidden_size ||
        c->arch == CFG_ARCH_QWEN3) // Qwen3's default head_dim is 128, not hidden / heads
        cfg_json_num(root, "head_dim", c->head_dim);
    cfg_json_num(root, "vocab_size", c->vocab_size);
    cfg_json_num(root, "max_position_embeddings", c->max_position_embeddings);
    cfg_json_num(root, "rms_norm_eps", c->rms_norm_eps);
    cJSON *rp = cJSON_GetObjectItemCaseSensitive(root, "rope_parameters");
    if (cJSON_IsObject(rp))
        cfg_json_num(rp, "rope_theta", c->rope_theta);
    else
        cfg_json_num(root, "rope_theta", c->rope_theta);
    cfg_json_num(root, "initializer_range", c->initializer_range);
    cfg_json_set(root, "tie_word_embeddings", cJSON_CreateBool(c->tie_word_embeddings));
    if (!cJSON_GetObjectItemCaseSensitive(root, "hidden_act"))
        cfg_json_set(root, "hidden_act", cJSON_CreateString("silu"));
    if (c->arch == CFG_ARCH_LLAMA || c->arch == CFG_ARCH_QWEN3)
        cfg_json_set(root, "attention_bias", cJSON_CreateBool(c->attention_bias));
    const char *tok[2] = { "bos_token_id", "eos_token_id" };
    int id[2] = { c->bos_token_id, c->eos_token_id };
    for (int i = 0; i < 2; i++) {
        cJSON *old = cJSON_GetObjectItemCaseSensitive(root, tok[i]);
        if (id[i] >= 0 && !cJSON_IsArray(old)) // a list of eos ids is kept as it was
            cfg_json_num(root, tok[i], id[i]);
    }
    if (cJSON_GetObjectItemCaseSensitive(root, "dtype") && !cJSON_GetObjectItemCaseSensitive(root, "torch_dtype"))
        cfg_json_set(root, "dtype", cJSON_CreateString(c->torch_dtype));
    else
        cfg_json_set(root, "torch_dtype", cJSON_CreateString(c->torch_dtype));
    if (!c->json) { // a loaded config keeps its own rope_scaling / rope_parameters untouched
        cfg_json_set(root, "rope_scaling", cfg_rope_json(&c->rope_scaling));
        if (c->arch != CFG_ARCH_LLAMA)
            cfg_json_set(root, "use_sliding_window", cJSON_CreateFalse());
        cfg_json_sort(root);
    }
    char *text = cfg_json_print(root);
    cJSON_Delete(root);
    if (!text)
        return lk_errf(err, LK_ERR_NOMEM, "out of memory");
    int rc = lk_write_file_atomic(path, text, strlen(text), err);
    lk_free(text);
    return rc;
}

// ---- a JSON printer with Python's layout ----

static void cb_indent(struct lk_buf *b, int depth)
{
    lk_buf_put(b, "\n", 1);
    for (int i = 0; i < depth; i++)
        lk_buf_put(b, "  ", 2);
}


static void cb_num(struct lk_buf *b, double v)
{
    char s[40];
    if (!isfinite(v)) {
        lk_buf_puts(b, "null"); // JSON has no Inf/NaN
        return;
    }
    if (v == floor(v) && fabs(v) < 1e15) {
        snprintf(s, sizeof s, "%.0f", v);
    } else {
        for (int prec = 15; prec <= 17; prec++) { // shortest form that reads back the same
            snprintf(s, sizeof s, "%.*g", prec, v);
            if (strtod(s, NULL) == v)
                break;
        }
    }
    lk_buf_puts(b, s);
}

static void cb_value(struct lk_buf *b, const cJSON *j, int depth)
{
    if (cJSON_IsNull(j)) {
        lk_buf_puts(b, "null");
    } else if (cJSON_IsTrue(j)) {
        lk_buf_puts(b, "true");
    } else if (cJSON_IsFalse(j)) {
        lk_buf_puts(b, "false");
    } else if (cJSON_IsNumber(j)) {
        cb_num(b, j->valuedouble);
    } else if (cJSON_IsString(j)) {
        lk_buf_json_str(b, j->valuestring);
    } else if (cJSON_IsArray(j) || cJSON_IsObject(j)) {
        int obj = cJSON_IsObject(j);
        lk_buf_puts(b, obj ? "{" : "[");
        if (!j->child) {
            lk_buf_puts(b, obj ? "}" : "]");
            return;
        }
        for (const cJSON *e = j->child; e; e = e->next) {
            cb_indent(b, depth + 1);
            if (obj) {
                lk_buf_json_str(b, e->string);
                lk_buf_puts(b, ": ");
            }
            cb_value(b, e, depth + 1);
            if (e->next)
                lk_buf_puts(b, ",");
        }
        cb_indent(b, depth);
        lk_buf_puts(b, obj ? "}" : "]");
    } else {
        lk_buf_puts(b, "null"); // raw/invalid items do not occur in parsed JSON
    }
}

char *cfg_json_print(const struct cJSON *j)
{
    struct lk_buf b = { 0 };
    cb_value(&b, j, 0);
    lk_buf_puts(&b, "\n");
    if (b.oom) {
        lk_free(b.p);
        return NULL;
    }
    return b.p;
}

// ---- tensors and modules ----

void cfg_module_shape(const struct cfg *c, enum cfg_module m, int64_t *out_rows, int64_t *out_cols)
{
    int64_t C = c->hidden_size, F = c->intermediate_size;
    int64_t Q = (int64_t)c->num_attention_heads * c->head_dim, KV = (int64_t)c->num_key_value_heads * c->head_dim;
    int64_t r = 0, k = 0;
    switch (m) {
    case CFG_Q: r = Q, k = C; break;
    case CFG_K:
    case CFG_V: r = KV, k = C; break;
    case CFG_O: r = C, k = Q; break;
    case CFG_GATE:
    case CFG_UP: r = F, k = C; break;
    case CFG_DOWN: r = C, k = F; break;
    case CFG_N_MODULES: LK_ASSERT(!"bad module");
    }
    *out_rows = r;
    *out_cols = k;
}

void cfg_module_path(int layer, enum cfg_module m, char *buf, size_t n)
{
    LK_ASSERT((int)m >= 0 && m < CFG_N_MODULES);
    snprintf(buf, n, "model.layers.%d.%s.%s", layer, m <= CFG_O ? "self_attn" : "mlp", cfg_module_names[m]);
}

int cfg_module_bias(const struct cfg *c, enum cfg_module m)
{
    if (!c->attention_bias)
        return 0;
    return m <= CFG_V || (m == CFG_O && c->arch == CFG_ARCH_LLAMA);
}

int cfg_module_parse(const char *s)
{
    for (int i = 0; i < CFG_N_MODULES; i++)
        if (!strcmp(s, cfg_module_names[i]))
            return i;
    return -1;
}

static void cfg_add(struct cfg_tensor *v, int *k, const char *name, enum cfg_tensor_kind kind, int layer,
                    int module, int ndim, int64_t s0, int64_t s1)
{
    struct cfg_tensor *t = &v[(*k)++];
    memset(t, 0, sizeof *t);
    snprintf(t->name, sizeof t->name, "%s", name);
    t->kind = kind;
    t->layer = layer;
    t->module = module;
    t->ndim = ndim;
    t->shape[0] = s0;
    t->shape[1] = s1;
}

int cfg_tensors(const struct cfg *c, struct cfg_tensor **out, int *n, struct lk_err *err)
{
    int L = c->num_hidden_layers;
    int per = CFG_N_MODULES + 2 + (c->qk_norm ? 2 : 0);
    for (int m = 0; m < CFG_N_MODULES; m++)
        per += cfg_module_bias(c, (enum cfg_module)m);
    if (L < 0 || L > CFG_MAX_LAYERS || L > (INT_MAX - 3) / per)
        return lk_errf(err, LK_ERR_FORMAT, "config.json: 'num_hidden_layers' %d is more than any model has "
                       "(at most %d)", L, CFG_MAX_LAYERS);
    int total = 3 + L * per;
    struct cfg_tensor *v = lk_calloc((size_t)total, sizeof *v);
    if (!v)
        return lk_errf(err, LK_ERR_NOMEM, "out of memory");
    int k = 0;
    int64_t C = c->hidden_size, V = c->vocab_size;
    char name[96], path[80];
    cfg_add(v, &k, "model.embed_tokens.weight", CFG_T_EMBED, -1, -1, 2, V, C);
    // per layer in module registration order: self_attn (q, k, v, o, then Qwen3's q_norm and
    // k_norm), mlp, then the two norms
    for (int l = 0; l < L; l++) {
        for (int m = 0; m < CFG_N_MODULES; m++) {
            int64_t rows, cols;
            cfg_module_shape(c, (enum cfg_module)m, &rows, &cols);
            cfg_module_path(l, (enum cfg_module)m, path, sizeof path);
            snprintf(name, sizeof name, "%s.weight", path);
            cfg_add(v, &k, name, CFG_T_LINEAR, l, m, 2, rows, cols);
            if (cfg_module_bias(c, (enum cfg_module)m)) {
                snprintf(name, sizeof name, "%s.bias", path);
                cfg_add(v, &k, name, CFG_T_BIAS, l, m, 1, rows, 0);
            }
            for (int qk = 0; m == CFG_O && c->qk_norm && qk < 2; qk++) {
                snprintf(name, sizeof name, "model.layers.%d.self_attn.%s_norm.weight", l, qk ? "k" : "q");
                cfg_add(v, &k, name, CFG_T_NORM, l, -1, 1, c->head_dim, 0);
            }
        }
        snprintf(name, sizeof name, "model.layers.%d.input_layernorm.weight", l);
        cfg_add(v, &k, name, CFG_T_NORM, l, -1, 1, C, 0);
        snprintf(name, sizeof name, "model.layers.%d.post_attention_layernorm.weight", l);
        cfg_add(v, &k, name, CFG_T_NORM, l, -1, 1, C, 0);
    }
    cfg_add(v, &k, "model.norm.weight", CFG_T_NORM, -1, -1, 1, C, 0);
    if (!c->tie_word_embeddings)
        cfg_add(v, &k, "lm_head.weight", CFG_T_LM_HEAD, -1, -1, 2, V, C);
    *out = v;
    *n = k;
    return LK_OK;
}

int64_t cfg_param_count(const struct cfg *c)
{
    if (cfg_param_estimate(c) > CFG_MAX_PARAMS) // no signed overflow on hand-made configs
        return INT64_MAX;
    int64_t C = c->hidden_size, V = c->vocab_size, p = V * C + C;
    for (int m = 0; m < CFG_N_MODULES; m++) {
        int64_t r, k;
        cfg_module_shape(c, (enum cfg_module)m, &r, &k);
        p += c->num_hidden_layers * r * k;
        if (cfg_module_bias(c, (enum cfg_module)m))
            p += c->num_hidden_layers * r;
    }
    p += c->num_hidden_layers * 2 * C;
    if (c->qk_norm)
        p += (int64_t)c->num_hidden_layers * 2 * c->head_dim;
    if (!c->tie_word_embeddings)
        p += V * C;
    return p;
}

// ---- compatibility ----

int cfg_check_same(const struct cfg *base, const struct cfg *b, const char *base_name, const char *other,
                   int ignore_tie, struct lk_err *err)
{
    const struct cfg *a = base;
    if (a->arch != b->arch || strcmp(a->architecture, b->architecture))
        return lk_errf(err, LK_ERR_SHAPE, "%s: config.json is a %s, the base '%s' is a %s "
                       "(hint: a fine-tune must have the base's architecture)", other, b->architecture,
                       base_name, a->architecture);
    struct {
        const char *name;
        int va, vb;
    } f[] = {
        { "hidden_size", a->hidden_size, b->hidden_size },
        { "intermediate_size", a->intermediate_size, b->intermediate_size },
        { "num_hidden_layers", a->num_hidden_layers, b->num_hidden_layers },
        { "num_attention_heads", a->num_attention_heads, b->num_attention_heads },
        { "num_key_value_heads", a->num_key_value_heads, b->num_key_value_heads },
        { "head_dim", a->head_dim, b->head_dim },
        { "vocab_size", a->vocab_size, b->vocab_size },
        { "attention_bias", a->attention_bias, b->attention_bias },
        { "tie_word_embeddings", a->tie_word_embeddings, ignore_tie ? a->tie_word_embeddings : b->tie_word_embeddings },
    };
    for (size_t i = 0; i < sizeof f / sizeof f[0]; i++)
        if (f[i].va != f[i].vb)
            return lk_errf(err, LK_ERR_SHAPE, "%s: config.json has %s %d, the base '%s' has %d "
                           "(hint: a fine-tune must have the base's architecture: made from another model?)",
                           other, f[i].name, f[i].vb, base_name, f[i].va);
    return LK_OK;
}
