/*
 * lora_io.c - PEFT's adapter format: adapter_config.json (read with cJSON, written with keys
 * sorted and 2-space indents as PEFT's json.dumps(sort_keys=True, indent=2) does) and
 * adapter_model.safetensors (tensor names in ANCHORS.md §2). The one adapter reader: an
 * adapter is opened on its own (lora_file_open: the config validated, every tensor in the file
 * understood and the shapes of each module's tensors checked against each other), then bound to
 * a base (lora_file_bind: layers and shapes the base has, the values read into struct lora).
 * Anything else is refused with its name. Owns: while open, the mapped file and its index.
 */
#include "lora.h"

#include <cJSON.h>
#include <errno.h>
#include <math.h>
#include <regex.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
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
        if (lora_regex_check(e->string, key, path, err))
            return err ? err->code : LK_ERR_FORMAT;
        (*out)[*n].key = lk_strdup(e->string);
        (*out)[*n].value = e->valuedouble;
        if (!(*out)[*n].key)
            return lk_errf(err, LK_ERR_NOMEM, "out of memory");
        (*n)++;
    }
    return LK_OK;
}

/* Which of our modules a target_modules entry names ("q_proj", or a longer name ending in it). */
static int target_module_of(const char *s)
{
    const char *dot = strrchr(s, '.');
    return cfg_module_parse(dot ? dot + 1 : s);
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

/* The switches (use_rslora, use_dora, lora_bias), the names kept as written, and the settings
 * the engine cannot apply (fan_in_fan_out, a bias other than "none", layers_to_transform). */
static int config_flags(const cJSON *o, struct lora_config *lc, const char *path, struct lk_err *err)
{
    int fifo = 0;
    struct {
        const char *key;
        int *dst;
    } flag[] = { { "use_rslora", &lc->use_rslora }, { "use_dora", &lc->use_dora },
                 { "lora_bias", &lc->lora_bias }, { "fan_in_fan_out", &fifo } };
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
    v = cJSON_GetObjectItemCaseSensitive(o, "layers_to_transform");
    if (v && !cJSON_IsNull(v))
        return lk_errf(err, LK_ERR_UNSUPPORTED, "%s: layers_to_transform is not supported yet", path);
    return LK_OK;
}

/* target_modules as a list: each entry a projection name (or a path ending in one), or
 * embed_tokens. */
static int targets_list(const cJSON *v, struct lora_config *lc, const char *path, struct lk_err *err)
{
    const cJSON *e;
    cJSON_ArrayForEach(e, v)
    {
        if (!cJSON_IsString(e))
            return lk_errf(err, LK_ERR_FORMAT, "%s: target_modules must hold strings", path);
        if (!strcmp(e->valuestring, "embed_tokens")) {
            lc->target_embed = 1;
            continue;
        }
        int m = target_module_of(e->valuestring);
        if (m < 0)
            return lk_errf(err, LK_ERR_UNSUPPORTED,
                           "%s: target module '%s' is not a projection of a Llama/Qwen2 layer", path,
                           e->valuestring);
        lc->targets |= 1u << m;
    }
    return LK_OK;
}

/* target_modules as a string: "all-linear", or a regex that must match the whole module name
 * (PEFT: re.fullmatch), tried on each projection's path. */
static int targets_regex(const char *s, struct lora_config *lc, const char *path, struct lk_err *err)
{
    if (!strcmp(s, "all-linear")) {
        lc->targets = (1u << CFG_N_MODULES) - 1;
        return LK_OK;
    }
    int rc = lora_regex_check(s, "target_modules", path, err);
    if (rc)
        return rc;
    size_t n = strlen(s) + 8;
    char *rx = lk_malloc(n);
    if (!rx)
        return lk_errf(err, LK_ERR_NOMEM, "out of memory");
    snprintf(rx, n, "^(%s)$", s);
    regex_t re;
    int bad = regcomp(&re, rx, REG_EXTENDED | REG_NOSUB);
    lk_free(rx);
    if (bad)
        return lk_errf(err, LK_ERR_FORMAT, "%s: target_modules regex '%s' does not compile", path, s);
    for (int m = 0; m < CFG_N_MODULES; m++) {
        char name[96];
        cfg_module_path(0, (enum cfg_module)m, name, sizeof name);
        if (!regexec(&re, name, 0, NULL, 0))
            lc->targets |= 1u << m;
    }
    regfree(&re);
    return LK_OK;
}

static int config_modules_to_save(const cJSON *o, struct lora_config *lc, const char *path,
                                  struct lk_err *err)
{
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, "modules_to_save");
    if (!cJSON_IsArray(v))
        return LK_OK;
    int cnt = cJSON_GetArraySize(v);
    lc->modules_to_save = lk_calloc((size_t)cnt + 1, sizeof(char *));
    if (!lc->modules_to_save)
        return lk_errf(err, LK_ERR_NOMEM, "out of memory");
    const cJSON *e;
    cJSON_ArrayForEach(e, v)
    {
        if (!cJSON_IsString(e))
            return lk_errf(err, LK_ERR_FORMAT, "%s: modules_to_save must hold strings", path);
        if (!(lc->modules_to_save[lc->n_modules_to_save++] = lk_strdup(e->valuestring)))
            return lk_errf(err, LK_ERR_NOMEM, "out of memory");
    }
    return LK_OK;
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
    if (!rc) {
        v = cJSON_GetObjectItemCaseSensitive(o, "target_modules");
        if (cJSON_IsArray(v))
            rc = targets_list(v, lc, path, err);
        else if (cJSON_IsString(v))
            rc = targets_regex(v->valuestring, lc, path, err);
        else
            rc = lk_errf(err, LK_ERR_FORMAT, "%s: missing field 'target_modules'", path);
    }
    if (!rc)
        rc = patterns_read(o, "rank_pattern", &lc->rank_pattern, &lc->n_rank_pattern, path, err);
    if (!rc)
        rc = patterns_read(o, "alpha_pattern", &lc->alpha_pattern, &lc->n_alpha_pattern, path, err);
    if (!rc)
        rc = config_modules_to_save(o, lc, path, err);
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
    lk_afile_printf(&af, ",\n  \"bias\": \"none\",\n  \"fan_in_fan_out\": false,\n"
                         "  \"inference_mode\": true,\n  \"init_lora_weights\": ");
    if (!lc->init[0] || !strcmp(lc->init, "true"))
        lk_afile_printf(&af, "true");
    else
        json_str(&af, lc->init);
    lk_afile_printf(&af, ",\n  \"layers_pattern\": null,\n  \"layers_to_transform\": null,\n"
                         "  \"lora_alpha\": ");
    json_num(&af, lc->alpha);
    lk_afile_printf(&af, ",\n  \"lora_bias\": %s,\n  \"lora_dropout\": ", lc->lora_bias ? "true" : "false");
    json_num(&af, lc->dropout);
    lk_afile_printf(&af, ",\n  \"modules_to_save\": ");
    if (!lc->n_modules_to_save)
        lk_afile_printf(&af, "null");
    else {
        lk_afile_printf(&af, "[\n");
        for (int i = 0; i < lc->n_modules_to_save; i++) {
            lk_afile_printf(&af, "    ");
            json_str(&af, lc->modules_to_save[i]);
            lk_afile_printf(&af, i + 1 < lc->n_modules_to_save ? ",\n" : "\n");
        }
        lk_afile_printf(&af, "  ]");
    }
    lk_afile_printf(&af, ",\n  \"peft_type\": \"LORA\",\n  \"r\": %d,\n  \"rank_pattern\": ", lc->r);
    json_patterns(&af, lc->rank_pattern, lc->n_rank_pattern);
    lk_afile_printf(&af, ",\n  \"revision\": null,\n  \"target_modules\": [");
    // PEFT writes a set as a sorted list
    const char *names[CFG_N_MODULES + 1];
    int nn = 0;
    for (int m = 0; m < CFG_N_MODULES; m++)
        if (lc->targets & (1u << m))
            names[nn++] = cfg_module_names[m];
    if (lc->target_embed)
        names[nn++] = "embed_tokens";
    for (int i = 0; i < nn; i++)
        for (int j = i + 1; j < nn; j++)
            if (strcmp(names[j], names[i]) < 0) {
                const char *t = names[i];
                names[i] = names[j];
                names[j] = t;
            }
    for (int i = 0; i < nn; i++)
        lk_afile_printf(&af, "%s\n    \"%s\"", i ? "," : "", names[i]);
    lk_afile_printf(&af, "\n  ],\n  \"task_type\": \"CAUSAL_LM\",\n  \"use_dora\": %s,\n"
                         "  \"use_rslora\": %s\n}\n",
                    lc->use_dora ? "true" : "false", lc->use_rslora ? "true" : "false");
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
 * refuses tensors of a projection the config does not target. */
static int index_alloc(struct lora_file *lf, struct lk_err *err)
{
    const struct st_file *f = &lf->st;
    unsigned present = 0;
    int top = -1;
    for (int i = 0; i < f->n; i++) {
        int layer;
        const char *rest;
        int m = parse_layer_name(f->t[i].name, &layer, &rest);
        if (m < 0)
            continue;
        present |= 1u << m;
        top = layer > top ? layer : top;
    }
    for (int m = 0; m < CFG_N_MODULES; m++)
        if (present & ~lf->cfg.targets & (1u << m))
            return lk_errf(err, LK_ERR_FORMAT, "%s: holds '%s' tensors but adapter_config.json does not "
                           "list it in target_modules", lf->path, cfg_module_names[m]);
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
    if (t->ndim != 2)
        return lk_errf(err, LK_ERR_SHAPE, "%s: tensor '%s' must be 2-D", lf->path, t->name);
    const struct st_tensor *other = is_a ? lf->embed_B : lf->embed_A;
    if (!base && other && (is_a ? t->shape[0] != other->shape[1] : t->shape[1] != other->shape[0]))
        return err_embed_ranks(lf->path, err);
    *(is_a ? &lf->embed_A : &lf->embed_B) = t;
    return LK_OK;
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
            else if (strncmp(t->name, PEFT_PREFIX, strlen(PEFT_PREFIX)))
                rc = lk_errf(err, LK_ERR_FORMAT, "%s: unknown adapter tensor '%s'", lf->path, t->name);
            if (!rc)
                rc = check_float(t, lf->path, err);
        }
    return rc;
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
    if (!rc && (lf->embed_A != NULL) != (lf->embed_B != NULL))
        rc = lk_errf(err, LK_ERR_MISSING, "%s: embedding adapter needs both lora_embedding_A and _B", lf->path);
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

/* Tensor i of the file into l, checked against the base. */
static int bind_tensor(const struct lora_file *lf, const struct cfg *c, struct lora *l, int i,
                       struct lk_err *err)
{
    const struct st_tensor *t = &lf->st.t[i];
    if (t == lf->embed_A || t == lf->embed_B)
        return bind_embed(lf, c, l, t, err);
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
            if (pass == 0) {
                st_writer_declare(&w, PEFT_PREFIX "model.embed_tokens.lora_embedding_A", TENSOR_F32, 2, sa);
                st_writer_declare(&w, PEFT_PREFIX "model.embed_tokens.lora_embedding_B", TENSOR_F32, 2, sb);
            } else {
                st_writer_write(&w, l->embed_A, TENSOR_F32);
                st_writer_write(&w, l->embed_B, TENSOR_F32);
            }
        }
        for (int k = 0; k < l->n_extra && block == l->mem; k++) {
            snprintf(nm, sizeof nm, PEFT_PREFIX "%s", l->extra[k].name);
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
