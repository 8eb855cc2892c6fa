/*
 * lora_io.c - PEFT's adapter format: adapter_config.json (read with cJSON, written with keys
 * sorted and 2-space indents as PEFT's json.dumps(sort_keys=True, indent=2) does) and
 * adapter_model.safetensors (tensor names in ANCHORS.md §2). Every tensor in the file must be
 * understood and must fit the base model; anything else is refused with its name.
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

int lora_config_load(struct lora_config *lc, const char *dir, struct lk_err *err)
{
    char *path = lk_path_join(dir, "adapter_config.json"), *text = NULL;
    if (!path)
        return lk_errf(err, LK_ERR_NOMEM, "out of memory");
    int rc = lk_read_file(path, &text, NULL, err);
    if (rc) {
        lk_free(path);
        return rc;
    }
    lora_config_default(lc);
    lc->r = 8;
    lc->alpha = 8; // PEFT's defaults when the file leaves them out
    lc->targets = 0;
    cJSON *o = cJSON_Parse(text);
    lk_free(text);
    double d;
    int b;
    const cJSON *v;
    if (!o || !cJSON_IsObject(o)) {
        rc = lk_errf(err, LK_ERR_FORMAT, "%s: not a JSON object", path);
        goto done;
    }
    v = cJSON_GetObjectItemCaseSensitive(o, "peft_type");
    if (!cJSON_IsString(v)) {
        rc = lk_errf(err, LK_ERR_FORMAT, "%s: missing field 'peft_type'", path);
        goto done;
    }
    if (strcmp(v->valuestring, "LORA")) {
        rc = lk_errf(err, LK_ERR_UNSUPPORTED, "%s: peft_type '%s' is not supported (only LORA)", path,
                     v->valuestring);
        goto done;
    }
#define NUM(key, dst, cond, what)                                                                  \
    switch (json_number(o, key, &d)) {                                                             \
    case -1:                                                                                       \
        rc = lk_errf(err, LK_ERR_FORMAT, "%s: '%s' must be a number", path, key);                  \
        goto done;                                                                                 \
    case 1:                                                                                        \
        if (!(cond)) {                                                                             \
            rc = lk_errf(err, LK_ERR_FORMAT, "%s: '%s' %s", path, key, what);                      \
            goto done;                                                                             \
        }                                                                                          \
        dst;                                                                                       \
    }
    NUM("r", lc->r = (int)d, d >= 1 && d <= 65536 && d == floor(d), "must be a positive integer");
    NUM("lora_alpha", lc->alpha = d, d > 0, "must be positive");
    NUM("lora_dropout", lc->dropout = d, d >= 0 && d < 1, "must be in [0, 1)");
#undef NUM
#define BOOL(key, dst)                                                                             \
    if (json_bool(o, key, &b) < 0) {                                                               \
        rc = lk_errf(err, LK_ERR_FORMAT, "%s: '%s' must be true or false", path, key);             \
        goto done;                                                                                 \
    } else if (json_bool(o, key, &b) > 0)                                                          \
        dst = b;
    BOOL("use_rslora", lc->use_rslora);
    BOOL("use_dora", lc->use_dora);
    BOOL("lora_bias", lc->lora_bias);
    int fifo = 0;
    BOOL("fan_in_fan_out", fifo);
#undef BOOL
    if (fifo) {
        rc = lk_errf(err, LK_ERR_UNSUPPORTED, "%s: fan_in_fan_out is for GPT-2's Conv1D, not Llama/Qwen2",
                     path);
        goto done;
    }
    v = cJSON_GetObjectItemCaseSensitive(o, "bias");
    if (v && cJSON_IsString(v)) {
        if (strcmp(v->valuestring, "none")) {
            rc = lk_errf(err, LK_ERR_UNSUPPORTED, "%s: bias '%s' is not supported (only \"none\")", path,
                         v->valuestring);
            goto done;
        }
    }
    v = cJSON_GetObjectItemCaseSensitive(o, "base_model_name_or_path");
    if (v && cJSON_IsString(v))
        snprintf(lc->base_model, sizeof lc->base_model, "%s", v->valuestring);
    v = cJSON_GetObjectItemCaseSensitive(o, "init_lora_weights");
    if (v && cJSON_IsString(v))
        snprintf(lc->init, sizeof lc->init, "%s", v->valuestring);
    v = cJSON_GetObjectItemCaseSensitive(o, "layers_to_transform");
    if (v && !cJSON_IsNull(v)) {
        rc = lk_errf(err, LK_ERR_UNSUPPORTED, "%s: layers_to_transform is not supported yet", path);
        goto done;
    }
    v = cJSON_GetObjectItemCaseSensitive(o, "target_modules");
    if (cJSON_IsArray(v)) {
        const cJSON *e;
        cJSON_ArrayForEach(e, v)
        {
            if (!cJSON_IsString(e)) {
                rc = lk_errf(err, LK_ERR_FORMAT, "%s: target_modules must hold strings", path);
                goto done;
            }
            if (!strcmp(e->valuestring, "embed_tokens")) {
                lc->target_embed = 1;
                continue;
            }
            int m = target_module_of(e->valuestring);
            if (m < 0) {
                rc = lk_errf(err, LK_ERR_UNSUPPORTED,
                             "%s: target module '%s' is not a projection of a Llama/Qwen2 layer", path,
                             e->valuestring);
                goto done;
            }
            lc->targets |= 1u << m;
        }
    } else if (cJSON_IsString(v)) {
        if (!strcmp(v->valuestring, "all-linear"))
            lc->targets = (1u << CFG_N_MODULES) - 1;
        else {
            // a string is a regex that must match the whole module name (PEFT: re.fullmatch)
            if ((rc = lora_regex_check(v->valuestring, "target_modules", path, err)))
                goto done;
            size_t n = strlen(v->valuestring) + 8;
            char *rx = lk_malloc(n);
            regex_t re;
            if (!rx) {
                rc = lk_errf(err, LK_ERR_NOMEM, "out of memory");
                goto done;
            }
            snprintf(rx, n, "^(%s)$", v->valuestring);
            int bad = regcomp(&re, rx, REG_EXTENDED | REG_NOSUB);
            lk_free(rx);
            if (bad) {
                rc = lk_errf(err, LK_ERR_FORMAT, "%s: target_modules regex '%s' does not compile", path,
                             v->valuestring);
                goto done;
            }
            for (int m = 0; m < CFG_N_MODULES; m++) {
                char name[96];
                cfg_module_path(0, (enum cfg_module)m, name, sizeof name);
                if (!regexec(&re, name, 0, NULL, 0))
                    lc->targets |= 1u << m;
            }
            regfree(&re);
        }
    } else {
        rc = lk_errf(err, LK_ERR_FORMAT, "%s: missing field 'target_modules'", path);
        goto done;
    }
    if ((rc = patterns_read(o, "rank_pattern", &lc->rank_pattern, &lc->n_rank_pattern, path, err)))
        goto done;
    if ((rc = patterns_read(o, "alpha_pattern", &lc->alpha_pattern, &lc->n_alpha_pattern, path, err)))
        goto done;
    v = cJSON_GetObjectItemCaseSensitive(o, "modules_to_save");
    if (cJSON_IsArray(v)) {
        int cnt = cJSON_GetArraySize(v);
        lc->modules_to_save = lk_calloc((size_t)cnt + 1, sizeof(char *));
        if (!lc->modules_to_save) {
            rc = lk_errf(err, LK_ERR_NOMEM, "out of memory");
            goto done;
        }
        const cJSON *e;
        cJSON_ArrayForEach(e, v)
        {
            if (!cJSON_IsString(e)) {
                rc = lk_errf(err, LK_ERR_FORMAT, "%s: modules_to_save must hold strings", path);
                goto done;
            }
            if (!(lc->modules_to_save[lc->n_modules_to_save++] = lk_strdup(e->valuestring))) {
                rc = lk_errf(err, LK_ERR_NOMEM, "out of memory");
                goto done;
            }
        }
    }
    rc = LK_OK;
done:
    cJSON_Delete(o);
    lk_free(path);
    if (rc)
        lora_config_release(lc);
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

// ---- tensors ----

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

static int load_f32(const struct st_tensor *t, float *dst, int ndim, int64_t d0, int64_t d1,
                    const char *path, struct lk_err *err)
{
    if (t->ndim != ndim || t->shape[0] != d0 || (ndim > 1 && t->shape[1] != d1)) {
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
    if (!tensor_dtype_is_float(t->dtype))
        return lk_errf(err, LK_ERR_FORMAT, "%s: tensor '%s' has dtype %s, expected a float type", path,
                       t->name, tensor_dtype_name(t->dtype));
    return st_tensor_to_f32(t, dst, err);
}

int lora_load(struct lora *l, const char *dir, const struct cfg *c, struct lk_err *err)
{
    memset(l, 0, sizeof *l);
    struct lora_config lc;
    int rc = lora_config_load(&lc, dir, err);
    if (rc)
        return rc;
    char *path = lk_path_join(dir, "adapter_model.safetensors");
    struct st_file f = { 0 };
    if (!path) {
        lora_config_release(&lc);
        return lk_errf(err, LK_ERR_NOMEM, "out of memory");
    }
    if (!lk_file_exists(path)) {
        rc = lk_errf(err, LK_ERR_MISSING, "%s: missing (only safetensors adapters are read; "
                     "adapter_model.bin is a pickle and is refused)", path);
        goto out;
    }
    if ((rc = st_open(&f, path, err)))
        goto out;
    // 1. which layers/modules the file holds, and their ranks (from lora_A's shape)
    int L = c->num_hidden_layers;
    unsigned present = 0;
    for (int i = 0; i < f.n; i++) {
        int layer;
        const char *rest;
        int m = parse_layer_name(f.t[i].name, &layer, &rest);
        if (m < 0)
            continue;
        if (layer >= L) {
            rc = lk_errf(err, LK_ERR_SHAPE, "%s: tensor '%s' is for layer %d, but the base has %d layers "
                         "(hint: adapter trained for another base model?)", path, f.t[i].name, layer, L);
            goto out;
        }
        present |= 1u << m;
    }
    if (present & ~lc.targets) {
        for (int m = 0; m < CFG_N_MODULES; m++)
            if ((present & ~lc.targets) & (1u << m)) {
                rc = lk_errf(err, LK_ERR_FORMAT, "%s: holds '%s' tensors but adapter_config.json does not "
                             "list it in target_modules", path, cfg_module_names[m]);
                goto out;
            }
    }
    // ranks from the file override nothing: they must equal what the config (and patterns) say
    if ((rc = lora_init(l, &lc, c, err)))
        goto out;
    // 2. every tensor in the file is placed or refused
    int placed = 0;
    int *seen = lk_calloc((size_t)l->n_mod * 3 + 1, sizeof(int));
    if (!seen) {
        rc = lk_errf(err, LK_ERR_NOMEM, "out of memory");
        goto out;
    }
    for (int i = 0; i < f.n && !rc; i++) {
        const struct st_tensor *t = &f.t[i];
        int layer;
        const char *rest;
        int m = parse_layer_name(t->name, &layer, &rest);
        if (m >= 0) {
            struct lora_module *md = lora_find(l, layer, m);
            LK_ASSERT(md);
            int slot = (int)(md - l->mod);
            if (!strcmp(rest, "lora_A.weight")) {
                if (t->ndim == 2 && t->shape[1] == md->in && t->shape[0] != md->R)
                    rc = lk_errf(err, LK_ERR_SHAPE, "%s: tensor '%s' has rank %lld, adapter_config.json says %d "
                                 "(rank_pattern missing?)", path, t->name, (long long)t->shape[0], md->R);
                else
                    rc = load_f32(t, md->A, 2, md->R, md->in, path, err);
                seen[slot * 3]++;
            } else if (!strcmp(rest, "lora_B.weight")) {
                if (t->ndim == 2 && t->shape[0] == md->out && t->shape[1] != md->R)
                    rc = lk_errf(err, LK_ERR_SHAPE, "%s: tensor '%s' has rank %lld but lora_A has %d "
                                 "(lora_A/lora_B rank mismatch)", path, t->name, (long long)t->shape[1], md->R);
                else
                    rc = load_f32(t, md->B, 2, md->out, md->R, path, err);
                seen[slot * 3 + 1]++;
            } else if (!strcmp(rest, "lora_B.bias")) {
                if (!md->bias)
                    rc = lk_errf(err, LK_ERR_FORMAT, "%s: tensor '%s' is present but adapter_config.json has "
                                 "no \"lora_bias\": true (PEFT would silently drop it)", path, t->name);
                else
                    rc = load_f32(t, md->bias, 1, md->out, 0, path, err);
                seen[slot * 3 + 2]++;
            } else if (!strcmp(rest, "lora_magnitude_vector") ||
                       !strcmp(rest, "lora_magnitude_vector.weight")) {
                if (!lc.use_dora)
                    rc = lk_errf(err, LK_ERR_FORMAT, "%s: tensor '%s' is a DoRA magnitude but use_dora is "
                                 "not set", path, t->name);
                else {
                    seen[slot * 3 + 2] += 1 << 8; // magnitudes counted apart from biases
                    rc = load_f32(t, md->mag, 1, md->out, 0, path, err);
                }
            } else
                rc = lk_errf(err, LK_ERR_FORMAT, "%s: unknown adapter tensor '%s'", path, t->name);
            placed++;
            continue;
        }
        if (!strcmp(t->name, PEFT_PREFIX "model.embed_tokens.lora_embedding_A") ||
            !strcmp(t->name, PEFT_PREFIX "model.embed_tokens.lora_embedding_B")) {
            int is_a = t->name[strlen(t->name) - 1] == 'A';
            if (t->ndim != 2) {
                rc = lk_errf(err, LK_ERR_SHAPE, "%s: tensor '%s' must be 2-D", path, t->name);
                break;
            }
            int R = (int)(is_a ? t->shape[0] : t->shape[1]);
            if (l->embed_R && l->embed_R != R) {
                rc = lk_errf(err, LK_ERR_SHAPE, "%s: embedding adapter A and B ranks differ", path);
                break;
            }
            l->embed_R = R;
            l->embed_V = c->vocab_size;
            l->embed_C = c->hidden_size;
            float **dst = is_a ? &l->embed_A : &l->embed_B;
            int64_t d0 = is_a ? R : c->hidden_size, d1 = is_a ? c->vocab_size : R;
            if (!(*dst = lk_malloc(sizeof(float) * (size_t)(d0 * d1 > 0 ? d0 * d1 : 1)))) {
                rc = lk_errf(err, LK_ERR_NOMEM, "out of memory");
                break;
            }
            rc = load_f32(t, *dst, 2, d0, d1, path, err);
            int r;
            double alpha;
            lora_config_module(&l->cfg, "model.embed_tokens", &r, &alpha);
            l->embed_scale = (float)(l->cfg.use_rslora ? alpha / sqrt((double)R) : alpha / R);
            continue;
        }
        // modules_to_save: base_model.model.<model tensor name>, a full copy
        if (!strncmp(t->name, PEFT_PREFIX, strlen(PEFT_PREFIX))) {
            const char *mname = t->name + strlen(PEFT_PREFIX);
            struct cfg_tensor *ct;
            int nct;
            if ((rc = cfg_tensors(c, &ct, &nct, err)))
                break;
            const struct cfg_tensor *hit = NULL;
            for (int k = 0; k < nct; k++)
                if (!strcmp(ct[k].name, mname))
                    hit = &ct[k];
            if (!hit && !strcmp(mname, "lm_head.weight") && c->tie_word_embeddings) {
                static struct cfg_tensor lm;
                memset(&lm, 0, sizeof lm);
                snprintf(lm.name, sizeof lm.name, "lm_head.weight");
                lm.ndim = 2;
                lm.shape[0] = c->vocab_size;
                lm.shape[1] = c->hidden_size;
                hit = &lm;
            }
            if (!hit) {
                lk_free(ct);
                rc = lk_errf(err, LK_ERR_FORMAT, "%s: unknown adapter tensor '%s'", path, t->name);
                break;
            }
            struct lora_extra *nx = lk_realloc(l->extra, sizeof *nx * (size_t)(l->n_extra + 1));
            if (!nx) {
                lk_free(ct);
                rc = lk_errf(err, LK_ERR_NOMEM, "out of memory");
                break;
            }
            l->extra = nx;
            struct lora_extra *x = &l->extra[l->n_extra++];
            memset(x, 0, sizeof *x);
            x->name = lk_strdup(mname);
            x->ndim = hit->ndim;
            x->shape[0] = hit->shape[0];
            x->shape[1] = hit->shape[1];
            size_t numel = (size_t)hit->shape[0] * (size_t)(hit->ndim > 1 ? hit->shape[1] : 1);
            x->data = lk_malloc(sizeof(float) * numel);
            lk_free(ct);
            if (!x->name || !x->data) {
                rc = lk_errf(err, LK_ERR_NOMEM, "out of memory");
                break;
            }
            rc = load_f32(t, x->data, x->ndim, x->shape[0], x->shape[1], path, err);
            continue;
        }
        rc = lk_errf(err, LK_ERR_FORMAT, "%s: unknown adapter tensor '%s'", path, t->name);
    }
    // 3. nothing missing
    for (int k = 0; k < l->n_mod && !rc; k++) {
        char nm[128];
        lora_peft_name(l->mod[k].layer, l->mod[k].module, nm, sizeof nm);
        if (!seen[k * 3] || !seen[k * 3 + 1])
            rc = lk_errf(err, LK_ERR_MISSING, "%s: adapter has no '%s.%s' although target_modules lists "
                         "'%s'", path, nm, seen[k * 3] ? "lora_B.weight" : "lora_A.weight",
                         cfg_module_names[l->mod[k].module]);
        else if (seen[k * 3] > 1 || seen[k * 3 + 1] > 1)
            rc = lk_errf(err, LK_ERR_FORMAT, "%s: duplicate tensors for '%s'", path, nm);
        else if (l->mod[k].bias && !(seen[k * 3 + 2] & 0xff))
            rc = lk_errf(err, LK_ERR_MISSING, "%s: lora_bias is set but '%s.lora_B.bias' is missing", path, nm);
        else if (lc.use_dora && !(seen[k * 3 + 2] >> 8))
            rc = lk_errf(err, LK_ERR_MISSING, "%s: use_dora is set but '%s.lora_magnitude_vector' is missing",
                         path, nm);
    }
    if (!rc && (l->embed_A != NULL) != (l->embed_B != NULL))
        rc = lk_errf(err, LK_ERR_MISSING, "%s: embedding adapter needs both lora_embedding_A and _B", path);
    (void)placed;
    lk_free(seen);
out:
    st_close(&f);
    lk_free(path);
    lora_config_release(&lc);
    if (rc)
        lora_release(l);
    return rc;
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
