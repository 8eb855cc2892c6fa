/*
 * lora_io.c - PEFT's adapter format: adapter_config.json (read with cJSON, written with keys
 * sorted and 2-space indents as PEFT's json.dumps(sort_keys=True, indent=2) does) and
 * adapter_model.safetensors (tensor names in ANCHORS.md §2). The one adapter reader: an
 * adapter is opened on its own (lora_file_open: the config validated, every tensor in the file
 * understood and the shapes of each module's tensors checked against each other), then bound to
 * a base (lora_file_bind: layers and shapes the base has, the values read into struct lora).
 * Which modules are adapted follows PEFT's selection rules (lora_config_targets, lora.c); the
 * fields lorakit cannot apply are refused by name, keys it does not know are listed for a
 * warning. Anything else is refused with its name. Owns: while open, the mapped file and its
 * index.
 */
#include "lora.h"

#include <cJSON.h>
#include <errno.h>
#include <math.h>
#include <regex.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <unistd.h>

#include "st.h"

#define PEFT_PREFIX "base_model.model."

// ---- adapter_config.json: read ----

static int json_number(const cJSON *o, const char *key, double *out)
{
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, key);
    if (!v || cJSON_IsNull(v))
        return 0;
    if (!cJSON_IsNumber(v))
        return -1;
    *out = v->valuedouble;
    return 1;
}

static int json_bool(const cJSON *o, const char *key, int *out)
{
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, key);
    if (!v || cJSON_IsNull(v))
        return 0;
    if (!cJSON_IsBool(v))
        return -1;
    *out = cJSON_IsTrue(v);
    return 1;
}

static int patterns_read(const cJSON *o, const char *key, struct lora_pattern **out, int *n,
                         const char *path, struct lk_err *err)
{
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, key);
    *out = NULL;
    *n = 0;
    if (!v || cJSON_IsNull(v))
        return LK_OK;
    if (!cJSON_IsObject(v))
        return lk_errf(err, LK_ERR_FORMAT, "%s: '%s' must be an object", path, key);
    int cnt = cJSON_GetArraySize(v);
    if (!cnt)
        return LK_OK;
    *out = lk_calloc((size_t)cnt, sizeof **out);
    if (!*out)
        return lk_errf(err, LK_ERR_NOMEM, "out of memory");
    const cJSON *e;
    cJSON_ArrayForEach(e, v)
    {
        if (!cJSON_IsNumber(e) || e->valuedouble <= 0)
            return lk_errf(err, LK_ERR_FORMAT, "%s: '%s' entry '%s' must be a positive number", path,
                           key, e->string);
        regex_t re;
        int rc = lora_regex_compile(&re, e->string, "^(.*\\.)?(%s)$", key, path, err);
        if (rc)
            return rc;
        regfree(&re);
        (*out)[*n].key = lk_strdup(e->string);
        (*out)[*n].value = e->valuedouble;
        if (!(*out)[*n].key)
            return lk_errf(err, LK_ERR_NOMEM, "out of memory");
        (*n)++;
    }
    return LK_OK;
}

/* PEFT's list match: e is the module's name or the end of it after a dot. */
static int name_is_or_ends_with_str(const char *name, const char *e)
{
    size_t n = strlen(name), k = strlen(e);
    return !strcmp(name, e) || (n > k && name[n - k - 1] == '.' && !strcmp(name + n - k, e));
}

/* r, lora_alpha and lora_dropout, each checked when present (PEFT's defaults otherwise). */
static int config_numbers(const cJSON *o, struct lora_config *lc, const char *path, struct lk_err *err)
{
    double r = 0, alpha = 0, dropout = 0;
    int has_r = json_number(o, "r", &r);
    if (has_r < 0)
        return lk_errf(err, LK_ERR_FORMAT, "%s: 'r' must be a number", path);
    if (has_r && !(r >= 1 && r <= 65536 && r == floor(r)))
        return lk_errf(err, LK_ERR_FORMAT, "%s: 'r' must be a positive integer", path);
    int has_alpha = json_number(o, "lora_alpha", &alpha);
    if (has_alpha < 0)
        return lk_errf(err, LK_ERR_FORMAT, "%s: 'lora_alpha' must be a number", path);
    if (has_alpha && !(alpha > 0))
        return lk_errf(err, LK_ERR_FORMAT, "%s: 'lora_alpha' must be positive", path);
    int has_dropout = json_number(o, "lora_dropout", &dropout);
    if (has_dropout < 0)
        return lk_errf(err, LK_ERR_FORMAT, "%s: 'lora_dropout' must be a number", path);
    if (has_dropout && !(dropout >= 0 && dropout < 1))
        return lk_errf(err, LK_ERR_FORMAT, "%s: 'lora_dropout' must be in [0, 1)", path);
    if (has_r)
        lc->r = (int)r;
    if (has_alpha)
        lc->alpha = alpha;
    if (has_dropout)
        lc->dropout = dropout;
    return LK_OK;
}

/* The switches (use_rslora, use_dora, lora_bias, ensure_weight_tying), the names kept as
 * written, and the settings the engine cannot apply (fan_in_fan_out, a bias other than "none"). */
static int config_flags(const cJSON *o, struct lora_config *lc, const char *path, struct lk_err *err)
{
    int fifo = 0;
    struct {
        const char *key;
        int *dst;
    } flag[] = { { "use_rslora", &lc->use_rslora }, { "use_dora", &lc->use_dora },
                 { "lora_bias", &lc->lora_bias }, { "fan_in_fan_out", &fifo },
                 { "ensure_weight_tying", &lc->ensure_weight_tying } };
    for (size_t i = 0; i < sizeof flag / sizeof flag[0]; i++) {
        int b, k = json_bool(o, flag[i].key, &b);
        if (k < 0)
            return lk_errf(err, LK_ERR_FORMAT, "%s: '%s' must be true or false", path, flag[i].key);
        if (k > 0)
            *flag[i].dst = b;
    }
    if (fifo)
        return lk_errf(err, LK_ERR_UNSUPPORTED, "%s: fan_in_fan_out is for GPT-2's Conv1D, not Llama/Qwen2",
                       path);
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, "bias");
    if (v && cJSON_IsString(v) && strcmp(v->valuestring, "none"))
        return lk_errf(err, LK_ERR_UNSUPPORTED, "%s: bias '%s' is not supported (only \"none\")", path,
                       v->valuestring);
    v = cJSON_GetObjectItemCaseSensitive(o, "base_model_name_or_path");
    if (v && cJSON_IsString(v))
        snprintf(lc->base_model, sizeof lc->base_model, "%s", v->valuestring);
    v = cJSON_GetObjectItemCaseSensitive(o, "init_lora_weights");
    if (v && cJSON_IsString(v))
        snprintf(lc->init, sizeof lc->init, "%s", v->valuestring);
    return LK_OK;
}

/* A JSON list of strings into an owned array (n + 1 slots); on failure the array holds what was
 * copied, counted in *n, so the config's release frees it. */
static int json_strings(const cJSON *v, char ***out, int *n, const char *key, const char *path,
                        struct lk_err *err)
{
    *out = lk_calloc((size_t)cJSON_GetArraySize(v) + 1, sizeof(char *));
    if (!*out)
        return lk_errf(err, LK_ERR_NOMEM, "out of memory");
    const cJSON *e;
    cJSON_ArrayForEach(e, v)
    {
        if (!cJSON_IsString(e))
            return lk_errf(err, LK_ERR_FORMAT, "%s: %s must hold strings", path, key);
        if (!((*out)[*n] = lk_strdup(e->valuestring)))
            return lk_errf(err, LK_ERR_NOMEM, "out of memory");
        (*n)++;
    }
    return LK_OK;
}

/* A regex PEFT would full-match: kept when lorakit can evaluate it. */
static int regex_keep(const char *s, char **dst, const char *key, const char *path, struct lk_err *err)
{
    regex_t re;
    int rc = lora_regex_compile(&re, s, "^(%s)$", key, path, err);
    if (rc)
        return rc;
    regfree(&re);
    if (!(*dst = lk_strdup(s)))
        return lk_errf(err, LK_ERR_NOMEM, "out of memory");
    return LK_OK;
}

/* target_modules: "all-linear" (PEFT: every linear but the output layer, i.e. the seven
 * projections), a regex full-matched against each module name, or a list of names (each a
 * projection, embed_tokens or lm_head, alone or as the end of a longer module path). The
 * bitmask records which projections are targeted in some layer, for writers and `info`. */
static int config_targets(const cJSON *o, struct lora_config *lc, const char *path, struct lk_err *err)
{
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, "target_modules");
    int rc;
    if (cJSON_IsString(v) && !strcasecmp(v->valuestring, "all-linear")) {
        lc->targets = (1u << CFG_N_MODULES) - 1;
        return LK_OK;
    }
    if (cJSON_IsString(v)) {
        if ((rc = regex_keep(v->valuestring, &lc->target_regex, "target_modules", path, err)))
            return rc;
        regex_t re; // compiled by regex_keep already: cannot fail here
        LK_ASSERT(lora_regex_compile(&re, lc->target_regex, "^(%s)$", "", "", NULL) == LK_OK);
        for (int layer = 0; layer < 128; layer++)
            for (int m = 0; m < CFG_N_MODULES; m++) {
                char name[96];
                cfg_module_path(layer, (enum cfg_module)m, name, sizeof name);
                if (!(lc->targets & (1u << m)) && !regexec(&re, name, 0, NULL, 0))
                    lc->targets |= 1u << m;
            }
        lc->target_embed = !regexec(&re, "model.embed_tokens", 0, NULL, 0);
        lc->target_head = !regexec(&re, "lm_head", 0, NULL, 0);
        regfree(&re);
        return LK_OK;
    }
    if (!cJSON_IsArray(v))
        return lk_errf(err, LK_ERR_FORMAT, "%s: missing field 'target_modules'", path);
    if ((rc = json_strings(v, &lc->target_list, &lc->n_target_list, "target_modules", path, err)))
        return rc;
    for (int i = 0; i < lc->n_target_list; i++) {
        const char *e = lc->target_list[i], *dot = strrchr(e, '.');
        const char *last = dot ? dot + 1 : e;
        int m = cfg_module_parse(last);
        if (m >= 0)
            lc->targets |= 1u << m;
        else if (!strcmp(last, "embed_tokens"))
            lc->target_embed = 1;
        else if (!strcmp(last, "lm_head"))
            lc->target_head = 1;
        else
            return lk_errf(err, LK_ERR_UNSUPPORTED,
                           "%s: target module '%s' is not a projection of a Llama/Qwen2 layer, embed_tokens or "
                           "lm_head", path, e);
    }
    return LK_OK;
}

/* exclude_modules: a regex (full match) or a list of names; layers_to_transform (an index or a
 * list) with layers_pattern (a name or a list). PEFT's LoraConfig refuses layers_to_transform
 * with a regex target_modules, and so does lorakit. */
static int config_selection(const cJSON *o, struct lora_config *lc, const char *path, struct lk_err *err)
{
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, "exclude_modules");
    int rc = LK_OK;
    if (cJSON_IsString(v))
        rc = regex_keep(v->valuestring, &lc->exclude_regex, "exclude_modules", path, err);
    else if (cJSON_IsArray(v))
        rc = json_strings(v, &lc->exclude, &lc->n_exclude, "exclude_modules", path, err);
    else if (v && !cJSON_IsNull(v))
        rc = lk_errf(err, LK_ERR_FORMAT, "%s: exclude_modules must be a string, a list or null", path);
    if (rc)
        return rc;
    v = cJSON_GetObjectItemCaseSensitive(o, "layers_to_transform");
    if (v && !cJSON_IsNull(v)) {
        int n = cJSON_IsArray(v) ? cJSON_GetArraySize(v) : 1;
        if (!cJSON_IsArray(v) && !cJSON_IsNumber(v))
            return lk_errf(err, LK_ERR_FORMAT, "%s: layers_to_transform must be a layer index or a list", path);
        if (!(lc->layers = lk_malloc(sizeof(int) * ((size_t)n + 1))))
            return lk_errf(err, LK_ERR_NOMEM, "out of memory");
        const cJSON *e = cJSON_IsArray(v) ? v->child : v;
        for (; e && lc->n_layers < n; e = e->next) {
            if (!cJSON_IsNumber(e) || e->valuedouble < 0 || e->valuedouble > 100000 ||
                e->valuedouble != floor(e->valuedouble))
                return lk_errf(err, LK_ERR_FORMAT, "%s: layers_to_transform must hold layer indices", path);
            lc->layers[lc->n_layers++] = (int)e->valuedouble;
        }
        if (lc->target_regex && lc->n_layers)
            return lk_errf(err, LK_ERR_FORMAT, "%s: layers_to_transform does not apply to a regex "
                           "target_modules (PEFT's LoraConfig refuses the pair)", path);
    }
    v = cJSON_GetObjectItemCaseSensitive(o, "layers_pattern");
    if (cJSON_IsString(v) && v->valuestring[0]) {
        cJSON *one = cJSON_CreateStringArray((const char *const[]){ v->valuestring }, 1);
        rc = one ? json_strings(one, &lc->layers_pattern, &lc->n_layers_pattern, "layers_pattern", path, err)
                 : lk_errf(err, LK_ERR_NOMEM, "out of memory");
        cJSON_Delete(one);
    } else if (cJSON_IsArray(v))
        rc = json_strings(v, &lc->layers_pattern, &lc->n_layers_pattern, "layers_pattern", path, err);
    for (int i = 0; i < lc->n_layers_pattern && !rc; i++) {
        regex_t re;
        if (!(rc = lora_regex_compile(&re, lc->layers_pattern[i], "^.*\\.(%s)\\.[0-9]+\\.", "layers_pattern",
                                      path, err)))
            regfree(&re);
    }
    return rc;
}

/* One list of trainable token ids, each in [0, 2^31). */
static int token_ids(const cJSON *v, int **out, int *n, const char *path, struct lk_err *err)
{
    if (!cJSON_IsArray(v))
        return lk_errf(err, LK_ERR_FORMAT, "%s: trainable_token_indices must list token ids", path);
    if (!(*out = lk_malloc(sizeof(int) * ((size_t)cJSON_GetArraySize(v) + 1))))
        return lk_errf(err, LK_ERR_NOMEM, "out of memory");
    const cJSON *e;
    cJSON_ArrayForEach(e, v)
    {
        if (!cJSON_IsNumber(e) || e->valuedouble < 0 || e->valuedouble > 2147483647.0 ||
            e->valuedouble != floor(e->valuedouble))
            return lk_errf(err, LK_ERR_FORMAT, "%s: trainable_token_indices must hold token ids", path);
        (*out)[(*n)++] = (int)e->valuedouble;
    }
    return LK_OK;
}

/* trainable_token_indices: a list (the input embedding's tokens) or {module: list} with modules
 * embed_tokens and lm_head (PEFT's TrainableTokensWrapper; their rows are
 * "<module>.token_adapter.trainable_tokens_delta"). */
static int config_tokens(const cJSON *o, struct lora_config *lc, const char *path, struct lk_err *err)
{
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, "trainable_token_indices");
    if (!v || cJSON_IsNull(v))
        return LK_OK;
    if (cJSON_IsArray(v))
        return token_ids(v, &lc->token_idx[0], &lc->n_token_idx[0], path, err);
    if (!cJSON_IsObject(v))
        return lk_errf(err, LK_ERR_FORMAT, "%s: trainable_token_indices must be a list or an object", path);
    const cJSON *e;
    cJSON_ArrayForEach(e, v)
    {
        int k = name_is_or_ends_with_str("model.embed_tokens", e->string) ? 0
                : name_is_or_ends_with_str("lm_head", e->string)          ? 1
                                                                          : -1;
        if (k < 0)
            return lk_errf(err, LK_ERR_UNSUPPORTED, "%s: trainable_token_indices names '%s'; lorakit applies "
                           "trainable tokens to embed_tokens and lm_head only", path, e->string);
        if (lc->token_idx[k])
            return lk_errf(err, LK_ERR_FORMAT, "%s: trainable_token_indices names '%s' twice", path, e->string);
        int rc = token_ids(e, &lc->token_idx[k], &lc->n_token_idx[k], path, err);
        if (rc)
            return rc;
    }
    return LK_OK;
}

/* PEFT 0.20's LoraConfig and PeftConfig fields. The ones that change what the adapter computes
 * and that lorakit does not implement are refused when set (not null, false or empty); the
 * initialisation-only ones are ignored, as they are once training is over. */
static const char *const known_keys[] = {
    "alora_invocation_tokens", "alpha_pattern", "arrow_config", "auto_mapping", "base_model_name_or_path",
    "bias", "corda_config", "ensure_weight_tying", "eva_config", "exclude_modules", "fan_in_fan_out",
    "inference_mode", "init_lora_weights", "kasa_config", "layer_replication", "layers_pattern",
    "layers_to_transform", "loftq_config", "lora_alpha", "lora_bias", "lora_dropout", "lora_ga_config",
    "megatron_config", "megatron_core", "modules_to_save", "monteclora_config", "peft_type", "peft_version",
    "qalora_group_size", "r", "rank_pattern", "revision", "runtime_config", "target_modules",
    "target_parameters", "task_type", "trainable_token_indices", "use_bdlora", "use_dora", "use_qalora",
    "use_rslora", "velora_config",
};
static const struct {
    const char *key, *what;
} refused_keys[] = {
    { "layer_replication", "layers built by replication" },
    { "target_parameters", "LoRA on parameters instead of modules" },
    { "alora_invocation_tokens", "activated LoRA (aLoRA)" },
    { "arrow_config", "Arrow routing between adapters" },
    { "use_bdlora", "block-diagonal LoRA (BD-LoRA)" },
    { "use_qalora", "QA-LoRA's pooled inputs" },
    { "velora_config", "VeLoRA" },
    { "monteclora_config", "MonteCLoRA" },
    { "kasa_config", "KaSA" },
};

/* A set field: not null, not false, not an empty object or list. */
static int json_set(const cJSON *v)
{
    return v && !cJSON_IsNull(v) && !cJSON_IsFalse(v) &&
           !((cJSON_IsObject(v) || cJSON_IsArray(v)) && cJSON_GetArraySize(v) == 0);
}

/* Refuses the set fields lorakit cannot apply; lists the keys it does not know in
 * lc->unknown_keys ("'a', 'b'"). */
static int config_keys(const cJSON *o, struct lora_config *lc, const char *path, struct lk_err *err)
{
    for (size_t i = 0; i < sizeof refused_keys / sizeof refused_keys[0]; i++)
        if (json_set(cJSON_GetObjectItemCaseSensitive(o, refused_keys[i].key)))
            return lk_errf(err, LK_ERR_UNSUPPORTED, "%s: '%s' is set (%s): lorakit cannot apply it; merge the "
                           "adapter with PEFT (merge_and_unload) and use the merged model", path,
                           refused_keys[i].key, refused_keys[i].what);
    size_t len = 0;
    const cJSON *e;
    cJSON_ArrayForEach(e, o)
    {
        int known = 0;
        for (size_t i = 0; i < sizeof known_keys / sizeof known_keys[0] && !known; i++)
            known = !strcmp(e->string, known_keys[i]);
        if (known || len > 400)
            continue;
        size_t add = strlen(e->string) + 4;
        char *nk = lk_realloc(lc->unknown_keys, len + add + 1);
        if (!nk)
            return lk_errf(err, LK_ERR_NOMEM, "out of memory");
        lc->unknown_keys = nk;
        snprintf(nk + len, add + 1, "%s'%.300s'", len ? ", " : "", e->string);
        len = strlen(nk);
    }
    return LK_OK;
}

static int config_modules_to_save(const cJSON *o, struct lora_config *lc, const char *path,
                                  struct lk_err *err)
{
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, "modules_to_save");
    if (!cJSON_IsArray(v))
        return LK_OK;
    int rc = json_strings(v, &lc->modules_to_save, &lc->n_modules_to_save, "modules_to_save", path, err);
    for (int i = 0; i < lc->n_modules_to_save && !rc; i++) {
        regex_t re; // PEFT inserts each name into a regex: (^|.*\.){m}($|\..*)
        if (!(rc = lora_regex_compile(&re, lc->modules_to_save[i], "^(.*\\.)?(%s)(\\..*)?$", "modules_to_save",
                                      path, err)))
            regfree(&re);
    }
    return rc;
}

/* Every field lorakit reads, in the order the checks report them. */
static int config_fields(const cJSON *o, struct lora_config *lc, const char *path, struct lk_err *err)
{
    if (!o || !cJSON_IsObject(o))
        return lk_errf(err, LK_ERR_FORMAT, "%s: not a JSON object", path);
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, "peft_type");
    if (!cJSON_IsString(v))
        return lk_errf(err, LK_ERR_FORMAT, "%s: missing field 'peft_type'", path);
    if (strcmp(v->valuestring, "LORA"))
        return lk_errf(err, LK_ERR_UNSUPPORTED, "%s: peft_type '%s' is not supported (only LORA)", path,
                       v->valuestring);
    int rc = config_numbers(o, lc, path, err);
    if (!rc)
        rc = config_flags(o, lc, path, err);
    if (!rc)
        rc = config_keys(o, lc, path, err);
    if (!rc)
        rc = config_modules_to_save(o, lc, path, err); // before the targets: they exclude these
    if (!rc)
        rc = config_targets(o, lc, path, err);
    if (!rc)
        rc = config_selection(o, lc, path, err);
    if (!rc)
        rc = config_tokens(o, lc, path, err);
    if (!rc)
        rc = patterns_read(o, "rank_pattern", &lc->rank_pattern, &lc->n_rank_pattern, path, err);
    if (!rc)
        rc = patterns_read(o, "alpha_pattern", &lc->alpha_pattern, &lc->n_alpha_pattern, path, err);
    return rc;
}

/* Parses the text of path (an adapter_config.json) into lc; on failure lc holds nothing. */
static int config_parse(struct lora_config *lc, const char *text, const char *path, struct lk_err *err)
{
    lora_config_default(lc);
    lc->r = 8;
    lc->alpha = 8; // PEFT's defaults when the file leaves them out
    lc->targets = 0;
    cJSON *o = cJSON_Parse(text);
    int rc = config_fields(o, lc, path, err);
    cJSON_Delete(o);
    if (rc)
        lora_config_release(lc);
    return rc;
}

/* DIR/adapter_config.json: its path and text (heap strings, caller frees both). */
static int config_read(const char *dir, char **out_path, char **out_text, struct lk_err *err)
{
    *out_text = NULL;
    *out_path = lk_path_join(dir, "adapter_config.json");
    if (!*out_path)
        return lk_errf(err, LK_ERR_NOMEM, "out of memory");
    int rc = lk_read_file(*out_path, out_text, NULL, err);
    if (rc) {
        lk_free(*out_path);
        *out_path = NULL;
    }
    return rc;
}

int lora_config_load(struct lora_config *lc, const char *dir, struct lk_err *err)
{
    char *path, *text;
    lora_config_default(lc);
    int rc = config_read(dir, &path, &text, err);
    if (rc)
        return rc;
    rc = config_parse(lc, text, path, err);
    lk_free(text);
    lk_free(path);
    return rc;
}

// ---- adapter_config.json: write ----

static void json_str(struct lk_afile *af, const char *s)
{
    lk_afile_printf(af, "\"");
    for (const unsigned char *p = (const unsigned char *)s; *p; p++) {
        if (*p == '"' || *p == '\\')
            lk_afile_printf(af, "\\%c", *p);
        else if (*p < 0x20)
            lk_afile_printf(af, "\\u%04x", *p);
        else
            lk_afile_printf(af, "%c", *p);
    }
    lk_afile_printf(af, "\"");
}

static void json_num(struct lk_afile *af, double v)
{
    if (v == floor(v) && fabs(v) < 1e15)
        lk_afile_printf(af, "%.0f", v);
    else
        lk_afile_printf(af, "%.17g", v);
}

static void json_patterns(struct lk_afile *af, const struct lora_pattern *p, int n)
{
    if (!n) {
        lk_afile_printf(af, "{}");
        return;
    }
    lk_afile_printf(af, "{\n");
    for (int i = 0; i < n; i++) {
        lk_afile_printf(af, "    ");
        json_str(af, p[i].key);
        lk_afile_printf(af, ": ");
        json_num(af, p[i].value);
        lk_afile_printf(af, i + 1 < n ? ",\n" : "\n");
    }
    lk_afile_printf(af, "  }");
}

/* A JSON list of strings, 2-space indents at depth 1 ("[]" when empty). sort: as PEFT writes
 * a set (target_modules). */
static void json_str_list(struct lk_afile *af, const char *const *v, int n, int sort)
{
    const char **tmp = lk_malloc(sizeof(char *) * ((size_t)n + 1));
    int k = n;
    if (!tmp) // written in the given order
        sort = 0;
    else
        memcpy(tmp, v, sizeof(char *) * (size_t)n);
    const char *const *w = tmp ? tmp : v;
    for (int i = 0; sort && i < k; i++)
        for (int j = i + 1; j < k; j++)
            if (strcmp(tmp[j], tmp[i]) < 0) {
                const char *t = tmp[i];
                tmp[i] = tmp[j];
                tmp[j] = t;
            }
    lk_afile_printf(af, "[");
    for (int i = 0; i < k; i++) {
        lk_afile_printf(af, "%s\n    ", i ? "," : "");
        json_str(af, w[i]);
    }
    lk_afile_printf(af, k ? "\n  ]" : "]");
    lk_free(tmp);
}

static void json_int_list(struct lk_afile *af, const int *v, int n, const char *indent)
{
    lk_afile_printf(af, "[");
    for (int i = 0; i < n; i++)
        lk_afile_printf(af, "%s\n%s  %d", i ? "," : "", indent, v[i]);
    lk_afile_printf(af, n ? "\n%s]" : "]", indent);
}

/* target_modules as read (a regex, or the list), else the projections, embed_tokens, lm_head. */
static void json_targets(struct lk_afile *af, const struct lora_config *lc)
{
    if (lc->target_regex) {
        json_str(af, lc->target_regex);
        return;
    }
    if (lc->target_list) {
        json_str_list(af, (const char *const *)lc->target_list, lc->n_target_list, 1);
        return;
    }
    const char *names[CFG_N_MODULES + 2];
    int nn = 0;
    for (int m = 0; m < CFG_N_MODULES; m++)
        if (lc->targets & (1u << m))
            names[nn++] = cfg_module_names[m];
    if (lc->target_embed)
        names[nn++] = "embed_tokens";
    if (lc->target_head)
        names[nn++] = "lm_head";
    json_str_list(af, names, nn, 1);
}

static int config_write(const struct lora_config *lc, const char *path, struct lk_err *err)
{
    struct lk_afile af;
    int rc = lk_afile_open(&af, path, err);
    if (rc)
        return rc;
    // keys in sorted order, as PEFT writes them
    lk_afile_printf(&af, "{\n  \"alpha_pattern\": ");
    json_patterns(&af, lc->alpha_pattern, lc->n_alpha_pattern);
    lk_afile_printf(&af, ",\n  \"base_model_name_or_path\": ");
    if (lc->base_model[0])
        json_str(&af, lc->base_model);
    else
        lk_afile_printf(&af, "null");
    lk_afile_printf(&af, ",\n  \"bias\": \"none\",\n  \"ensure_weight_tying\": %s,\n  \"exclude_modules\": ",
                    lc->ensure_weight_tying ? "true" : "false");
    if (lc->exclude_regex)
        json_str(&af, lc->exclude_regex);
    else if (lc->exclude)
        json_str_list(&af, (const char *const *)lc->exclude, lc->n_exclude, 0);
    else
        lk_afile_printf(&af, "null");
    lk_afile_printf(&af, ",\n  \"fan_in_fan_out\": false,\n  \"inference_mode\": true,\n  \"init_lora_weights\": ");
    if (!lc->init[0] || !strcmp(lc->init, "true"))
        lk_afile_printf(&af, "true");
    else
        json_str(&af, lc->init);
    lk_afile_printf(&af, ",\n  \"layers_pattern\": ");
    if (lc->layers_pattern)
        json_str_list(&af, (const char *const *)lc->layers_pattern, lc->n_layers_pattern, 0);
    else
        lk_afile_printf(&af, "null");
    lk_afile_printf(&af, ",\n  \"layers_to_transform\": ");
    if (lc->layers)
        json_int_list(&af, lc->layers, lc->n_layers, "  ");
    else
        lk_afile_printf(&af, "null");
    lk_afile_printf(&af, ",\n  \"lora_alpha\": ");
    json_num(&af, lc->alpha);
    lk_afile_printf(&af, ",\n  \"lora_bias\": %s,\n  \"lora_dropout\": ", lc->lora_bias ? "true" : "false");
    json_num(&af, lc->dropout);
    lk_afile_printf(&af, ",\n  \"modules_to_save\": ");
    if (!lc->n_modules_to_save)
        lk_afile_printf(&af, "null");
    else
        json_str_list(&af, (const char *const *)lc->modules_to_save, lc->n_modules_to_save, 0);
    lk_afile_printf(&af, ",\n  \"peft_type\": \"LORA\",\n  \"r\": %d,\n  \"rank_pattern\": ", lc->r);
    json_patterns(&af, lc->rank_pattern, lc->n_rank_pattern);
    lk_afile_printf(&af, ",\n  \"revision\": null,\n  \"target_modules\": ");
    json_targets(&af, lc);
    lk_afile_printf(&af, ",\n  \"task_type\": \"CAUSAL_LM\",\n  \"trainable_token_indices\": ");
    if (!lc->token_idx[0] && !lc->token_idx[1])
        lk_afile_printf(&af, "null");
    else {
        // PEFT keeps what the user gave: a list (the input embedding) or {module: list}
        lk_afile_printf(&af, "{");
        for (int k = 0, first = 1; k < 2; k++)
            if (lc->token_idx[k]) {
                lk_afile_printf(&af, "%s\n    \"%s\": ", first ? "" : ",", k ? "lm_head" : "embed_tokens");
                json_int_list(&af, lc->token_idx[k], lc->n_token_idx[k], "    ");
                first = 0;
            }
        lk_afile_printf(&af, "\n  }");
    }
    lk_afile_printf(&af, ",\n  \"use_dora\": %s,\n  \"use_rslora\": %s\n}\n", lc->use_dora ? "true" : "false",
                    lc->use_rslora ? "true" : "false");
    return lk_afile_commit(&af);
}

// ---- adapter_model.safetensors: names and shapes ----

/* Splits "base_model.model.model.layers.N.<part>.<module>.<rest>": returns the module and sets
 * layer and rest, or -1 when the name is not a layer projection tensor. */
static int parse_layer_name(const char *name, int *layer, const char **rest)
{
    const char *p = name;
    if (strncmp(p, PEFT_PREFIX "model.layers.", strlen(PEFT_PREFIX "model.layers.")))
        return -1;
    p += strlen(PEFT_PREFIX "model.layers.");
    char *end;
    long l = strtol(p, &end, 10);
    if (end == p || *end != '.' || l < 0 || l > 100000)
        return -1;
    p = end + 1;
    const char *part = !strncmp(p, "self_attn.", 10) ? p + 10 : !strncmp(p, "mlp.", 4) ? p + 4 : NULL;
    if (!part)
        return -1;
    const char *dot = strchr(part, '.');
    if (!dot)
        return -1;
    char mod[32];
    size_t n = (size_t)(dot - part);
    if (n >= sizeof mod)
        return -1;
    memcpy(mod, part, n);
    mod[n] = 0;
    int m = cfg_module_parse(mod);
    if (m < 0)
        return -1;
    // attention modules live under self_attn, MLP ones under mlp
    if ((m <= CFG_O) != (p[0] == 's'))
        return -1;
    *layer = (int)l;
    *rest = dot + 1;
    return m;
}

/* The tensor has ndim dimensions [d0] or [d0, d1]. */
static int check_shape(const struct st_tensor *t, int ndim, int64_t d0, int64_t d1, const char *path,
                       struct lk_err *err)
{
    if (t->ndim == ndim && t->shape[0] == d0 && (ndim == 1 || t->shape[1] == d1))
        return LK_OK;
    if (ndim == 1)
        return lk_errf(err, LK_ERR_SHAPE, "%s: tensor '%s' has shape %s, expected [%lld] "
                       "(hint: adapter trained for another base model?)",
                       path, t->name, t->ndim == 1 ? "[...]" : "of another rank", (long long)d0);
    return lk_errf(err, LK_ERR_SHAPE,
                   "%s: tensor '%s' has shape [%lld, %lld], expected [%lld, %lld] "
                   "(hint: adapter trained for another base model?)",
                   path, t->name, (long long)t->shape[0], (long long)(t->ndim > 1 ? t->shape[1] : 0),
                   (long long)d0, (long long)d1);
}

static int check_float(const struct st_tensor *t, const char *path, struct lk_err *err)
{
    if (!t || tensor_dtype_is_float(t->dtype))
        return LK_OK;
    return lk_errf(err, LK_ERR_FORMAT, "%s: tensor '%s' has dtype %s, expected a float type", path, t->name,
                   tensor_dtype_name(t->dtype));
}

static int load_f32(const struct st_tensor *t, float *dst, int ndim, int64_t d0, int64_t d1,
                    const char *path, struct lk_err *err)
{
    int rc = check_shape(t, ndim, d0, d1, path, err);
    return rc ? rc : st_tensor_to_f32(t, dst, err);
}

/* A lora_A whose rank is not the config's. */
static int err_rank_config(const char *path, const struct st_tensor *A, int R, struct lk_err *err)
{
    return lk_errf(err, LK_ERR_SHAPE, "%s: tensor '%s' has rank %lld, adapter_config.json says %d "
                   "(rank_pattern missing?)", path, A->name, (long long)A->shape[0], R);
}

/* A lora_B whose rank is not its lora_A's. */
static int err_rank_pair(const char *path, const struct st_tensor *B, int64_t R, struct lk_err *err)
{
    return lk_errf(err, LK_ERR_SHAPE, "%s: tensor '%s' has rank %lld but lora_A has %lld "
                   "(lora_A/lora_B rank mismatch)", path, B->name, (long long)B->shape[1], (long long)R);
}

/* A factor missing for a module target_modules lists. */
static int err_missing_factor(const char *path, int layer, int m, const char *which, struct lk_err *err)
{
    char nm[128];
    lora_peft_name(layer, m, nm, sizeof nm);
    return lk_errf(err, LK_ERR_MISSING, "%s: adapter has no '%s.%s' although target_modules lists '%s'", path,
                   nm, which, cfg_module_names[m]);
}

/* A tensor of a layer the base does not have (the first in the file's order). */
static int layers_check(const struct lora_file *lf, int L, struct lk_err *err)
{
    for (int i = 0; i < lf->st.n; i++) {
        int layer;
        const char *rest;
        if (parse_layer_name(lf->st.t[i].name, &layer, &rest) >= 0 && layer >= L)
            return lk_errf(err, LK_ERR_SHAPE, "%s: tensor '%s' is for layer %d, but the base has %d layers "
                           "(hint: adapter trained for another base model?)", lf->path, lf->st.t[i].name,
                           layer, L);
    }
    return LK_OK;
}

// ---- opening an adapter on its own ----

/* The module (layer, m) of the index, made on first use. */
static struct lora_file_module *module_at(struct lora_file *lf, int layer, int m)
{
    int *ix = &lf->index[layer * CFG_N_MODULES + m];
    if (*ix < 0) {
        *ix = lf->n_mod++;
        lf->mod[*ix].layer = layer;
        lf->mod[*ix].module = m;
    }
    return &lf->mod[*ix];
}

/* Sizes the index from the highest layer the names mention (parse_layer_name caps it), and
 * refuses tensors of a module the config does not target (lora_config_targets). */
static int index_alloc(struct lora_file *lf, struct lk_err *err)
{
    const struct st_file *f = &lf->st;
    int top = -1;
    for (int i = 0; i < f->n; i++) {
        int layer;
        const char *rest;
        int m = parse_layer_name(f->t[i].name, &layer, &rest);
        if (m < 0)
            continue;
        char name[96];
        cfg_module_path(layer, (enum cfg_module)m, name, sizeof name);
        if (!lora_config_targets(&lf->cfg, name))
            return lk_errf(err, LK_ERR_FORMAT, "%s: holds '%s' tensors for '%s', which adapter_config.json does "
                           "not target (target_modules, exclude_modules, layers_to_transform, modules_to_save)",
                           lf->path, cfg_module_names[m], name);
        top = layer > top ? layer : top;
    }
    lf->L = top + 1;
    lf->index = lk_malloc(sizeof(int) * ((size_t)lf->L * CFG_N_MODULES + 1));
    lf->slot = lk_malloc(sizeof(int) * ((size_t)f->n + 1));
    lf->mod = lk_calloc((size_t)f->n + 1, sizeof *lf->mod);
    if (!lf->index || !lf->slot || !lf->mod)
        return lk_errf(err, LK_ERR_NOMEM, "out of memory");
    for (int i = 0; i < lf->L * CFG_N_MODULES; i++)
        lf->index[i] = -1;
    for (int i = 0; i < f->n; i++)
        lf->slot[i] = -1;
    return LK_OK;
}

/* Tensor i of a layer projection: a factor, the lora_B bias or the DoRA magnitude. */
static int place_layer_tensor(struct lora_file *lf, int i, int layer, int m, const char *rest,
                              struct lk_err *err)
{
    const struct st_tensor *t = &lf->st.t[i];
    int role; // 0 lora_A, 1 lora_B, 2 bias, 3 magnitude
    if (!strcmp(rest, "lora_A.weight"))
        role = 0;
    else if (!strcmp(rest, "lora_B.weight"))
        role = 1;
    else if (!strcmp(rest, "lora_B.bias"))
        role = 2;
    else if (!strcmp(rest, "lora_magnitude_vector") || !strcmp(rest, "lora_magnitude_vector.weight"))
        role = 3;
    else
        return lk_errf(err, LK_ERR_FORMAT, "%s: unknown adapter tensor '%s'", lf->path, t->name);
    if (role == 2 && !lf->cfg.lora_bias)
        return lk_errf(err, LK_ERR_FORMAT, "%s: tensor '%s' is present but adapter_config.json has "
                       "no \"lora_bias\": true (PEFT would silently drop it)", lf->path, t->name);
    if (role == 3 && !lf->cfg.use_dora)
        return lk_errf(err, LK_ERR_FORMAT, "%s: tensor '%s' is a DoRA magnitude but use_dora is "
                       "not set", lf->path, t->name);
    struct lora_file_module *md = module_at(lf, layer, m);
    const struct st_tensor **dst[4] = { &md->A, &md->B, &md->bias, &md->mag };
    if (*dst[role]) {
        char nm[128];
        lora_peft_name(layer, m, nm, sizeof nm);
        return lk_errf(err, LK_ERR_FORMAT, "%s: duplicate tensors for '%s'", lf->path, nm);
    }
    *dst[role] = t;
    lf->slot[i] = (int)(md - lf->mod);
    return LK_OK;
}

static int err_embed_ranks(const char *path, struct lk_err *err)
{
    return lk_errf(err, LK_ERR_SHAPE, "%s: embedding adapter A and B ranks differ", path);
}

/* lora_embedding_A [R, V] or lora_embedding_B [C, R]: 2-D, one rank between them (checked by
 * lora_file_bind when there is a base). */
static int place_embed(struct lora_file *lf, const struct st_tensor *t, const struct cfg *base,
                       struct lk_err *err)
{
    int is_a = t->name[strlen(t->name) - 1] == 'A';
    if (!lora_config_targets(&lf->cfg, "model.embed_tokens")) // PEFT would not load it
        return lk_errf(err, LK_ERR_FORMAT, "%s: tensor '%s' is a LoRA factor of embed_tokens, which "
                       "adapter_config.json does not target", lf->path, t->name);
    if (t->ndim != 2)
        return lk_errf(err, LK_ERR_SHAPE, "%s: tensor '%s' must be 2-D", lf->path, t->name);
    const struct st_tensor *other = is_a ? lf->embed_B : lf->embed_A;
    if (!base && other && (is_a ? t->shape[0] != other->shape[1] : t->shape[1] != other->shape[0]))
        return err_embed_ranks(lf->path, err);
    *(is_a ? &lf->embed_A : &lf->embed_B) = t;
    return LK_OK;
}

/* The tensors of a LoRA-targeted embed_tokens (k 0) or lm_head (k 1) beyond its factors, and the
 * trainable-token rows: PEFT saves the base weight under a targeted embedding layer
 * ("<module>.base_layer.weight", save_and_load.py get_peft_model_state_dict) and a
 * TrainableTokensWrapper's rows as "<module>.token_adapter.trainable_tokens_delta". Returns 1
 * when t is one of them (placed, or refused in err), 0 when it is not. */
static int place_embedding_extra(struct lora_file *lf, const struct st_tensor *t, int *rc, struct lk_err *err)
{
    static const char *const mod[2] = { "model.embed_tokens", "lm_head" };
    static const char *const key[2] = { "embed_tokens", "lm_head" };
    for (int k = 0; k < 2; k++) {
        size_t n = strlen(PEFT_PREFIX) + strlen(mod[k]);
        if (strncmp(t->name, PEFT_PREFIX, strlen(PEFT_PREFIX)) || strncmp(t->name + strlen(PEFT_PREFIX), mod[k],
                                                                             strlen(mod[k])) || t->name[n] != '.')
            continue;
        const char *rest = t->name + n + 1;
        const struct st_tensor **dst = NULL;
        if (!strcmp(rest, "base_layer.weight")) {
            if (!lora_config_targets(&lf->cfg, mod[k]))
                *rc = lk_errf(err, LK_ERR_FORMAT, "%s: tensor '%s' is a base_layer copy but adapter_config.json "
                              "does not target %s (PEFT would not load it)", lf->path, t->name, key[k]);
            dst = &lf->base_layer[k];
        } else if (!strcmp(rest, "token_adapter.trainable_tokens_delta")) {
            if (!lf->cfg.token_idx[k])
                *rc = lk_errf(err, LK_ERR_FORMAT, "%s: tensor '%s' holds trainable tokens but "
                              "trainable_token_indices does not name %s", lf->path, t->name, key[k]);
            else if (t->ndim != 2 || t->shape[0] != lf->cfg.n_token_idx[k])
                *rc = lk_errf(err, LK_ERR_SHAPE, "%s: tensor '%s' must have one row per token of "
                              "trainable_token_indices (%d)", lf->path, t->name, lf->cfg.n_token_idx[k]);
            dst = &lf->tok[k];
        } else if (k == 1 && (!strcmp(rest, "lora_A.weight") || !strcmp(rest, "lora_B.weight"))) {
            if (!lora_config_targets(&lf->cfg, "lm_head"))
                *rc = lk_errf(err, LK_ERR_FORMAT, "%s: tensor '%s' is a LoRA factor of lm_head, which "
                              "adapter_config.json does not target", lf->path, t->name);
            else if (t->ndim != 2)
                *rc = lk_errf(err, LK_ERR_SHAPE, "%s: tensor '%s' has %d dimensions, expected 2", lf->path, t->name,
                              t->ndim);
            dst = rest[5] == 'A' ? &lf->head_A : &lf->head_B;
        } else if (k == 1 && (!strncmp(rest, "lora_B.bias", 11) || !strncmp(rest, "lora_magnitude_vector", 21)))
            *rc = lk_errf(err, LK_ERR_UNSUPPORTED, "%s: tensor '%s': a LoRA on lm_head with %s is not supported", lf->path,
                          t->name, rest[5] == 'B' ? "lora_bias" : "DoRA");
        else
            return 0;
        if (!*rc && dst && *dst)
            *rc = lk_errf(err, LK_ERR_FORMAT, "%s: duplicate tensor '%s'", lf->path, t->name);
        if (!*rc && dst)
            *dst = t;
        return 1;
    }
    return 0;
}

/* Every tensor is placed or refused. The lora_A factors go first, so that modules are numbered
 * in the order of their lora_A in the file. A "base_model.model.<name>" that is nothing else is
 * a modules_to_save copy (its name is checked against a base by lora_file_bind). */
static int tensors_place(struct lora_file *lf, const struct cfg *base, struct lk_err *err)
{
    int rc = LK_OK;
    for (int pass = 0; pass < 2 && !rc; pass++)
        for (int i = 0; i < lf->st.n && !rc; i++) {
            const struct st_tensor *t = &lf->st.t[i];
            int layer;
            const char *rest;
            int m = parse_layer_name(t->name, &layer, &rest);
            int is_a = m >= 0 && !strcmp(rest, "lora_A.weight");
            if (is_a != (pass == 0))
                continue;
            if (m >= 0)
                rc = place_layer_tensor(lf, i, layer, m, rest, err);
            else if (!strcmp(t->name, PEFT_PREFIX "model.embed_tokens.lora_embedding_A") ||
                     !strcmp(t->name, PEFT_PREFIX "model.embed_tokens.lora_embedding_B"))
                rc = place_embed(lf, t, base, err);
            else if (place_embedding_extra(lf, t, &rc, err))
                ;
            else if (strncmp(t->name, PEFT_PREFIX, strlen(PEFT_PREFIX)))
                rc = lk_errf(err, LK_ERR_FORMAT, "%s: unknown adapter tensor '%s'", lf->path, t->name);
            if (!rc)
                rc = check_float(t, lf->path, err);
        }
    return rc;
}

/* After every tensor is placed: the lm_head factors complete and of one rank, and a row tensor
 * for each module trainable_token_indices names. */
static int embedding_check(const struct lora_file *lf, struct lk_err *err)
{
    if ((lf->embed_A != NULL) != (lf->embed_B != NULL))
        return lk_errf(err, LK_ERR_MISSING, "%s: embedding adapter needs both lora_embedding_A and _B", lf->path);
    if ((lf->head_A != NULL) != (lf->head_B != NULL))
        return lk_errf(err, LK_ERR_MISSING, "%s: the LoRA on lm_head needs both lora_A and lora_B", lf->path);
    if (lf->head_A && lf->head_B->shape[1] != lf->head_A->shape[0])
        return err_rank_pair(lf->path, lf->head_B, lf->head_A->shape[0], err);
    if (lf->head_A) {
        int R;
        double alpha;
        lora_config_module(&lf->cfg, "lm_head", &R, &alpha);
        if (R > 0 && lf->head_A->shape[0] != R)
            return err_rank_config(lf->path, lf->head_A, R, err);
    }
    static const char *const key[2] = { "embed_tokens", "lm_head" };
    for (int k = 0; k < 2; k++)
        if (lf->cfg.token_idx[k] && !lf->tok[k])
            return lk_errf(err, LK_ERR_MISSING, "%s: trainable_token_indices names %s but the file has no "
                           "'%s%s.token_adapter.trainable_tokens_delta'", lf->path, key[k], PEFT_PREFIX,
                           k ? "lm_head" : "model.embed_tokens");
    return LK_OK;
}

/* One module: both factors, and the bias and magnitude the config asks for; without a base, also
 * their shapes against each other and the config: 2-D, the rank the config gives (after
 * rank_pattern), lora_B's rank equal to lora_A's, bias and magnitude [out]. With a base the shapes
 * are left to lora_file_bind, which names the shape the base expects. */
static int module_check(const struct lora_file *lf, struct lora_file_module *md, const struct cfg *base,
                        struct lk_err *err)
{
    const char *path = lf->path;
    char nm[128], mp[96];
    lora_peft_name(md->layer, md->module, nm, sizeof nm);
    if (!md->A || !md->B)
        return err_missing_factor(path, md->layer, md->module, md->A ? "lora_B.weight" : "lora_A.weight", err);
    if (lf->cfg.lora_bias && !md->bias)
        return lk_errf(err, LK_ERR_MISSING, "%s: lora_bias is set but '%s.lora_B.bias' is missing", path, nm);
    if (lf->cfg.use_dora && !md->mag)
        return lk_errf(err, LK_ERR_MISSING, "%s: use_dora is set but '%s.lora_magnitude_vector' is missing",
                       path, nm);
    const struct st_tensor *A = md->A, *B = md->B;
    md->R = A->shape[0];
    md->in = A->shape[1];
    md->out = B->shape[0];
    if (base)
        return LK_OK;
    if (A->ndim != 2 || B->ndim != 2)
        return lk_errf(err, LK_ERR_SHAPE, "%s: tensor '%s' has %d dimensions, expected 2", path,
                       A->ndim != 2 ? A->name : B->name, A->ndim != 2 ? A->ndim : B->ndim);
    int R;
    double alpha;
    cfg_module_path(md->layer, (enum cfg_module)md->module, mp, sizeof mp);
    lora_config_module(&lf->cfg, mp, &R, &alpha);
    // ranks from the file override nothing: they must equal what the config (and patterns) say
    // (a rank that is not positive is refused when the adapter is bound)
    if (R > 0 && A->shape[0] != R)
        return err_rank_config(path, A, R, err);
    if (B->shape[1] != A->shape[0])
        return err_rank_pair(path, B, A->shape[0], err);
    int rc = md->bias ? check_shape(md->bias, 1, md->out, 0, path, err) : LK_OK;
    if (!rc && md->mag)
        rc = check_shape(md->mag, 1, md->out, 0, path, err);
    return rc;
}

/* lora_file_open's steps. With a base (lora_load), its layers are checked as soon as the file
 * is open and the shapes are left to lora_file_bind, so that an adapter for another base is
 * named as such (with the shape the base expects) before anything the mismatch also upsets. */
static int file_open(struct lora_file *lf, const char *dir, const struct cfg *base, struct lk_err *err)
{
    memset(lf, 0, sizeof *lf);
    char *cpath;
    int rc = config_read(dir, &cpath, &lf->config_json, err);
    if (rc)
        return rc;
    rc = config_parse(&lf->cfg, lf->config_json, cpath, err);
    lk_free(cpath);
    if (!rc && !(lf->path = lk_path_join(dir, "adapter_model.safetensors")))
        rc = lk_errf(err, LK_ERR_NOMEM, "out of memory");
    if (!rc && !lk_file_exists(lf->path))
        rc = lk_errf(err, LK_ERR_MISSING, "%s: missing (only safetensors adapters are read; "
                     "adapter_model.bin is a pickle and is refused)", lf->path);
    if (!rc)
        rc = st_open(&lf->st, lf->path, err);
    if (!rc && base)
        rc = layers_check(lf, base->num_hidden_layers, err);
    if (!rc)
        rc = index_alloc(lf, err);
    if (!rc)
        rc = tensors_place(lf, base, err);
    for (int k = 0; k < lf->n_mod && !rc; k++)
        rc = module_check(lf, &lf->mod[k], base, err);
    if (!rc)
        rc = embedding_check(lf, err);
    if (rc)
        lora_file_close(lf);
    return rc;
}

int lora_file_open(struct lora_file *lf, const char *dir, struct lk_err *err)
{
    return file_open(lf, dir, NULL, err);
}

void lora_file_close(struct lora_file *lf)
{
    if (!lf)
        return;
    lora_config_release(&lf->cfg);
    st_close(&lf->st);
    lk_free(lf->config_json);
    lk_free(lf->path);
    lk_free(lf->index);
    lk_free(lf->slot);
    lk_free(lf->mod);
    memset(lf, 0, sizeof *lf);
}

// ---- binding an open adapter to a base ----

/* An embedding adapter factor, against the base's vocabulary and hidden size. */
static int bind_embed(const struct lora_file *lf, const struct cfg *c, struct lora *l, const struct st_tensor *t,
                      struct lk_err *err)
{
    int is_a = t == lf->embed_A;
    int64_t R = is_a ? t->shape[0] : t->shape[1];
    if (l->embed_R && l->embed_R != R)
        return err_embed_ranks(lf->path, err);
    int64_t d0 = is_a ? R : c->hidden_size, d1 = is_a ? c->vocab_size : R;
    int rc = check_shape(t, 2, d0, d1, lf->path, err);
    if (rc)
        return rc;
    float **dst = is_a ? &l->embed_A : &l->embed_B;
    if (!(*dst = lk_malloc(sizeof(float) * (t->numel ? t->numel : 1))))
        return lk_errf(err, LK_ERR_NOMEM, "out of memory");
    l->embed_R = (int)R;
    l->embed_V = c->vocab_size;
    l->embed_C = c->hidden_size;
    int r;
    double alpha;
    lora_config_module(&l->cfg, "model.embed_tokens", &r, &alpha);
    l->embed_scale = (float)(l->cfg.use_rslora ? alpha / sqrt((double)R) : alpha / (double)R);
    return st_tensor_to_f32(t, *dst, err);
}

int lora_extra_add(struct lora_extra **v, int *n, const char *name, int ndim, const int64_t shape[2],
                   float **out_data, struct lk_err *err)
{
    *out_data = NULL;
    struct lora_extra *nv = lk_realloc(*v, sizeof *nv * (size_t)(*n + 1));
    if (!nv)
        return lk_errf(err, LK_ERR_NOMEM, "out of memory");
    *v = nv;
    struct lora_extra *x = &nv[(*n)++];
    memset(x, 0, sizeof *x);
    x->ndim = ndim;
    x->shape[0] = shape[0];
    x->shape[1] = ndim > 1 ? shape[1] : 0;
    size_t numel;
    if (lk_mul_size((size_t)x->shape[0], (size_t)(ndim > 1 ? x->shape[1] : 1), &numel) ||
        numel > SIZE_MAX / sizeof(float))
        return lk_errf(err, LK_ERR_NOMEM, "out of memory (keeping '%s')", name);
    x->name = lk_strdup(name);
    x->data = lk_malloc(sizeof(float) * (numel ? numel : 1));
    if (!x->name || !x->data)
        return lk_errf(err, LK_ERR_NOMEM, "out of memory (keeping '%s')", name);
    *out_data = x->data;
    return LK_OK;
}

/* A modules_to_save copy "base_model.model.<name>": name is a tensor of the base (lm_head also
 * when the base ties it), with its shape. */
static int bind_extra(const struct lora_file *lf, const struct cfg *c, struct lora *l, const struct st_tensor *t,
                      struct lk_err *err)
{
    const char *mname = t->name + strlen(PEFT_PREFIX);
    struct cfg_tensor *ct;
    struct cfg_tensor hit = { .ndim = 0 }; // ndim 0: no such tensor
    int nct, rc = cfg_tensors(c, &ct, &nct, err);
    if (rc)
        return rc;
    for (int k = 0; k < nct; k++)
        if (!strcmp(ct[k].name, mname))
            hit = ct[k];
    lk_free(ct);
    if (!hit.ndim && !strcmp(mname, "lm_head.weight") && c->tie_word_embeddings) {
        hit.ndim = 2;
        hit.shape[0] = c->vocab_size;
        hit.shape[1] = c->hidden_size;
    }
    if (!hit.ndim)
        return lk_errf(err, LK_ERR_FORMAT, "%s: unknown adapter tensor '%s'", lf->path, t->name);
    if ((rc = check_shape(t, hit.ndim, hit.shape[0], hit.shape[1], lf->path, err)))
        return rc;
    float *data;
    rc = lora_extra_add(&l->extra, &l->n_extra, mname, hit.ndim, hit.shape, &data, err);
    return rc ? rc : st_tensor_to_f32(t, data, err);
}

/* A float copy of t [d0, d1] (checked) into a new buffer *dst. */
static int bind_copy(const struct lora_file *lf, const struct st_tensor *t, int64_t d0, int64_t d1, float **dst,
                     struct lk_err *err)
{
    int rc = check_shape(t, 2, d0, d1, lf->path, err);
    if (rc)
        return rc;
    if (!(*dst = lk_malloc(sizeof(float) * (t->numel ? t->numel : 1))))
        return lk_errf(err, LK_ERR_NOMEM, "out of memory");
    return st_tensor_to_f32(t, *dst, err);
}

/* The LoRA on lm_head: A [R, C], B [V, R], scale from the config's rank and alpha for "lm_head". */
static int bind_head(const struct lora_file *lf, const struct cfg *c, struct lora *l, const struct st_tensor *t,
                     struct lk_err *err)
{
    int is_a = t == lf->head_A;
    int64_t R = lf->head_A->shape[0];
    int rc = bind_copy(lf, t, is_a ? R : c->vocab_size, is_a ? c->hidden_size : R, is_a ? &l->head_A : &l->head_B,
                       err);
    if (rc)
        return rc;
    int r;
    double alpha;
    lora_config_module(&l->cfg, "lm_head", &r, &alpha);
    l->head_R = (int)R;
    l->head_V = c->vocab_size;
    l->head_Cin = c->hidden_size;
    l->head_scale = (float)(l->cfg.use_rslora ? alpha / sqrt((double)R) : alpha / (double)R);
    return LK_OK;
}

/* Trainable-token rows of embed_tokens (k 0) or lm_head (k 1): [n, C], ids inside the vocabulary. */
static int bind_tokens(const struct lora_file *lf, const struct cfg *c, struct lora *l, int k, struct lk_err *err)
{
    int n = lf->cfg.n_token_idx[k];
    for (int i = 0; i < n; i++)
        if (lf->cfg.token_idx[k][i] >= c->vocab_size)
            return lk_errf(err, LK_ERR_SHAPE, "%s: trainable_token_indices holds token %d, the base has %d "
                           "(hint: adapter trained for another base model?)", lf->path, lf->cfg.token_idx[k][i],
                           c->vocab_size);
    int rc = bind_copy(lf, lf->tok[k], n, c->hidden_size, &l->tok_rows[k], err);
    if (rc)
        return rc;
    if (!(l->tok_idx[k] = lk_malloc(sizeof(int) * ((size_t)n + 1))))
        return lk_errf(err, LK_ERR_NOMEM, "out of memory");
    memcpy(l->tok_idx[k], lf->cfg.token_idx[k], sizeof(int) * (size_t)n);
    l->n_tok[k] = n;
    l->tok_C = c->hidden_size;
    return LK_OK;
}

/* PEFT's base_layer copy of a targeted embed_tokens (k 0) or lm_head (k 1): it replaces the
 * weight under the LoRA. On a tied base both name the one shared weight, kept once. */
static int bind_base_layer(const struct lora_file *lf, const struct cfg *c, struct lora *l, int k,
                           struct lk_err *err)
{
    const struct st_tensor *t = lf->base_layer[k];
    int shared = c->tie_word_embeddings;
    int64_t shape[2] = { c->vocab_size, c->hidden_size };
    int rc = check_shape(t, 2, shape[0], shape[1], lf->path, err);
    if (rc || (shared && k == 1 && lf->base_layer[0]))
        return rc; // the embedding's copy is the same weight (PEFT saves the shared tensor twice)
    float *data;
    rc = lora_extra_add(&l->extra, &l->n_extra, k && !shared ? "lm_head.weight" : "model.embed_tokens.weight", 2,
                        shape, &data, err);
    if (!rc) {
        l->extra[l->n_extra - 1].base_layer = 1;
        rc = st_tensor_to_f32(t, data, err);
    }
    return rc;
}

/* The extra named name, or NULL (base_layer copies skipped). */
static struct lora_extra *extra_find(struct lora *l, const char *name)
{
    for (int i = 0; i < l->n_extra; i++)
        if (!l->extra[i].base_layer && !strcmp(l->extra[i].name, name))
            return &l->extra[i];
    return NULL;
}

/* A base that ties lm_head to embed_tokens: with ensure_weight_tying PEFT ties the
 * modules_to_save copies of the two (other.py, _check_tied_modules / _add_modules_to_tie), so a
 * copy of one stands for the other; it also ties a LoRA on one to the other, which lorakit does
 * not build: refused. */
static int bind_tied(const struct lora_file *lf, const struct cfg *c, struct lora *l, struct lk_err *err)
{
    if (!c->tie_word_embeddings || !l->cfg.ensure_weight_tying)
        return LK_OK;
    if (l->embed_A || l->head_A)
        return lk_errf(err, LK_ERR_UNSUPPORTED, "%s: ensure_weight_tying with a LoRA on %s of a base that ties "
                       "embed_tokens and lm_head is not supported (PEFT ties a second adapter to it): merge it "
                       "with PEFT", lf->path, l->embed_A ? "embed_tokens" : "lm_head");
    struct lora_extra *e = extra_find(l, "model.embed_tokens.weight"), *h = extra_find(l, "lm_head.weight");
    if ((e != NULL) == (h != NULL))
        return LK_OK;
    const struct lora_extra *src = e ? e : h;
    float *data;
    int64_t shape[2] = { src->shape[0], src->shape[1] };
    int at = (int)(src - l->extra);
    int rc = lora_extra_add(&l->extra, &l->n_extra, e ? "lm_head.weight" : "model.embed_tokens.weight", 2, shape,
                            &data, err);
    if (!rc) // lora_extra_add may move the array: src by index
        memcpy(data, l->extra[at].data, sizeof(float) * (size_t)(shape[0] * shape[1]));
    return rc;
}

/* What the file holds beyond the layer modules, into l: the LoRA on lm_head, base_layer copies,
 * trainable tokens; then the tied-embedding rules (bind_tied). */
static int bind_embedding_extras(const struct lora_file *lf, const struct cfg *c, struct lora *l,
                                 struct lk_err *err)
{
    int rc = LK_OK;
    if (lf->head_A)
        rc = bind_head(lf, c, l, lf->head_A, err);
    if (!rc && lf->head_B)
        rc = bind_head(lf, c, l, lf->head_B, err);
    for (int k = 0; k < 2 && !rc; k++) {
        if (lf->base_layer[k])
            rc = bind_base_layer(lf, c, l, k, err);
        if (!rc && lf->tok[k])
            rc = bind_tokens(lf, c, l, k, err);
    }
    return rc ? rc : bind_tied(lf, c, l, err);
}

/* Tensor i of the file into l, checked against the base. */
static int bind_tensor(const struct lora_file *lf, const struct cfg *c, struct lora *l, int i,
                       struct lk_err *err)
{
    const struct st_tensor *t = &lf->st.t[i];
    if (t == lf->embed_A || t == lf->embed_B)
        return bind_embed(lf, c, l, t, err);
    if (t == lf->head_A || t == lf->head_B || t == lf->base_layer[0] || t == lf->base_layer[1] ||
        t == lf->tok[0] || t == lf->tok[1])
        return LK_OK; // bind_embedding_extras
    if (lf->slot[i] < 0)
        return bind_extra(lf, c, l, t, err);
    const struct lora_file_module *fm = &lf->mod[lf->slot[i]];
    struct lora_module *md = lora_find(l, fm->layer, fm->module);
    LK_ASSERT(md);
    // a rank error is named as such when the other dimension fits the base
    if (t == fm->A && t->ndim == 2 && t->shape[1] == md->in && t->shape[0] != md->R)
        return err_rank_config(lf->path, t, md->R, err);
    if (t == fm->B && t->ndim == 2 && t->shape[0] == md->out && t->shape[1] != md->R)
        return err_rank_pair(lf->path, t, md->R, err);
    if (t == fm->A)
        return load_f32(t, md->A, 2, md->R, md->in, lf->path, err);
    if (t == fm->B)
        return load_f32(t, md->B, 2, md->out, md->R, lf->path, err);
    float *dst = t == fm->bias ? md->bias : md->mag; // the config that allowed the tensor made room
    LK_ASSERT(dst && (t == fm->bias || t == fm->mag));
    return load_f32(t, dst, 1, md->out, 0, lf->path, err);
}

int lora_file_bind(const struct lora_file *lf, const struct cfg *c, struct lora *l, struct lk_err *err)
{
    memset(l, 0, sizeof *l);
    int rc = layers_check(lf, c->num_hidden_layers, err);
    if (rc)
        return rc;
    rc = lora_init(l, &lf->cfg, c, err);
    for (int i = 0; i < lf->st.n && !rc; i++)
        rc = bind_tensor(lf, c, l, i, err);
    if (!rc)
        rc = bind_embedding_extras(lf, c, l, err);
    // nothing missing: every targeted projection of every layer of the base
    for (int k = 0; k < l->n_mod && !rc; k++) {
        const struct lora_module *md = &l->mod[k];
        if (md->layer >= lf->L || lf->index[md->layer * CFG_N_MODULES + md->module] < 0)
            rc = err_missing_factor(lf->path, md->layer, md->module, "lora_A.weight", err);
    }
    if (rc)
        lora_release(l);
    return rc;
}

int lora_load(struct lora *l, const char *dir, const struct cfg *c, struct lk_err *err)
{
    struct lora_file lf;
    memset(l, 0, sizeof *l);
    int rc = file_open(&lf, dir, c, err);
    if (!rc)
        rc = lora_file_bind(&lf, c, l, err);
    lora_file_close(&lf);
    return rc;
}

// ---- writing ----

/* Declares (pass 0) or writes (pass 1) a pair of 2-D float32 factors. */
static void write_pair(struct st_writer *w, int pass, const char *na, const char *nb, const int64_t sa[2],
                       const int64_t sb[2], const float *a, const float *b)
{
    if (pass == 0) {
        st_writer_declare(w, na, TENSOR_F32, 2, sa);
        st_writer_declare(w, nb, TENSOR_F32, 2, sb);
    } else {
        st_writer_write(w, a, TENSOR_F32);
        st_writer_write(w, b, TENSOR_F32);
    }
}

/* Writes the adapter's tensors (values from block, which has lora->mem's layout: the factors
 * themselves, or their gradients) under PEFT names. */
int lora_save_tensors(const struct lora *l, const float *block, const char *path, struct lk_err *err)
{
    struct st_writer w;
    int rc = st_writer_init(&w, path, err);
    if (rc)
        return rc;
    st_writer_meta(&w, "format", "pt");
    char nm[160];
#define AT(p) (block + ((p) - l->mem))
    for (int pass = 0; pass < 2; pass++) {
        for (int k = 0; k < l->n_mod; k++) {
            const struct lora_module *md = &l->mod[k];
            char base[128];
            lora_peft_name(md->layer, md->module, base, sizeof base);
            int64_t sa[2] = { md->R, md->in }, sb[2] = { md->out, md->R }, so[1] = { md->out };
            if (pass == 0) {
                snprintf(nm, sizeof nm, "%s.lora_A.weight", base);
                st_writer_declare(&w, nm, TENSOR_F32, 2, sa);
                snprintf(nm, sizeof nm, "%s.lora_B.weight", base);
                st_writer_declare(&w, nm, TENSOR_F32, 2, sb);
                if (md->bias) {
                    snprintf(nm, sizeof nm, "%s.lora_B.bias", base);
                    st_writer_declare(&w, nm, TENSOR_F32, 1, so);
                }
                if (md->mag) {
                    snprintf(nm, sizeof nm, "%s.lora_magnitude_vector", base);
                    st_writer_declare(&w, nm, TENSOR_F32, 1, so);
                }
            } else {
                st_writer_write(&w, AT(md->A), TENSOR_F32);
                st_writer_write(&w, AT(md->B), TENSOR_F32);
                if (md->bias)
                    st_writer_write(&w, AT(md->bias), TENSOR_F32);
                if (md->mag)
                    st_writer_write(&w, AT(md->mag), TENSOR_F32);
            }
        }
#undef AT
        if (l->embed_A && block == l->mem) {
            int64_t sa[2] = { l->embed_R, l->embed_V }, sb[2] = { l->embed_C, l->embed_R };
            write_pair(&w, pass, PEFT_PREFIX "model.embed_tokens.lora_embedding_A",
                       PEFT_PREFIX "model.embed_tokens.lora_embedding_B", sa, sb, l->embed_A, l->embed_B);
        }
        if (l->head_A && block == l->mem) {
            int64_t sa[2] = { l->head_R, l->head_Cin }, sb[2] = { l->head_V, l->head_R };
            write_pair(&w, pass, PEFT_PREFIX "lm_head.lora_A.weight", PEFT_PREFIX "lm_head.lora_B.weight", sa, sb,
                       l->head_A, l->head_B);
        }
        for (int k = 0; k < 2 && block == l->mem; k++) {
            if (!l->n_tok[k])
                continue;
            int64_t sr[2] = { l->n_tok[k], l->tok_C };
            if (pass == 0)
                st_writer_declare(&w, k ? PEFT_PREFIX "lm_head.token_adapter.trainable_tokens_delta"
                                        : PEFT_PREFIX "model.embed_tokens.token_adapter.trainable_tokens_delta",
                                  TENSOR_F32, 2, sr);
            else
                st_writer_write(&w, l->tok_rows[k], TENSOR_F32);
        }
        for (int k = 0; k < l->n_extra && block == l->mem; k++) {
            const char *xn = l->extra[k].name;
            size_t xl = strlen(xn);
            if (l->extra[k].base_layer && xl > 7) // "<module>.base_layer.weight"
                snprintf(nm, sizeof nm, PEFT_PREFIX "%.*s.base_layer.weight", (int)(xl - 7), xn);
            else
                snprintf(nm, sizeof nm, PEFT_PREFIX "%s", xn);
            if (pass == 0)
                st_writer_declare(&w, nm, TENSOR_F32, l->extra[k].ndim, l->extra[k].shape);
            else
                st_writer_write(&w, l->extra[k].data, TENSOR_F32);
        }
        if (pass == 0)
            st_writer_begin(&w);
    }
    return st_writer_commit(&w);
}

int lora_save(const struct lora *l, const char *dir, struct lk_err *err)
{
    int rc = lk_mkdir_p(dir, err);
    if (rc)
        return rc;
    char *path = lk_path_join(dir, "adapter_model.safetensors");
    char *cpath = lk_path_join(dir, "adapter_config.json");
    if (!path || !cpath)
        rc = lk_errf(err, LK_ERR_NOMEM, "out of memory");
    // adapter_config.json marks a complete adapter: it goes first and comes back last, so a
    // crash in between never pairs new weights with an old config
    if (!rc && unlink(cpath) != 0 && errno != ENOENT)
        rc = lk_errf(err, LK_ERR_IO, "%s: cannot replace: %s", cpath, strerror(errno));
    if (!rc)
        rc = lora_save_tensors(l, l->mem, path, err);
    if (!rc && (rc = config_write(&l->cfg, cpath, err)))
        unlink(path); // weights without their config are no adapter
    lk_free(path);
    lk_free(cpath);
    return rc;
}
