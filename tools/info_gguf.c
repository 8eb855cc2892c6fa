/*
 * info_gguf.c - `lorakit info FILE.gguf`: a GGUF file as lorakit reads it. The file is opened
 * by libcore's validating reader (gguf_open: a truncated or corrupted file is refused, naming it
 * and the problem), then described: the architecture and hyper-parameters in lorakit's terms
 * (gguf_model_cfg, which also checks every tensor the metadata implies), provenance, the
 * tokenizer (model, pre-tokenizer, token counts by type, merges, special ids, add_bos; rebuilt
 * with gguf_tok_load, as `generate` would), the chat template, every metadata key and every
 * tensor with its type and shape (ne order, fastest first, as llama.cpp prints them). A file
 * lorakit cannot run (another architecture, k-quants) is still listed, with the reason; an
 * inconsistent one (a tensor missing or of the wrong shape) exits 1 after the listing.
 */
#include <cJSON.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../libcore/cfg.h"
#include "../libcore/gguf.h"
#include "../libcore/tok.h"
#include "commands.h"
#include "opts.h"

/* What lorakit makes of the file: the config (or the reason it cannot run it) and the tokenizer. */
struct gguf_view {
    struct cfg c;
    int cfg_ok;
    struct lk_err cfg_err;     /* why not, when !cfg_ok */
    struct tok *tk;            /* owned, NULL when the tokenizer cannot be rebuilt */
    struct lk_err tok_err;
    int64_t n_params;
    int n_type[6];             /* tokens by llama.cpp type 0..5 */
};

/* A metadata string (a heap copy, "" when absent or not a string). */
static char *meta_str(const struct gguf_file *f, const char *key)
{
    char *s = NULL;
    const struct gguf_kv *kv = gguf_find_kv(f, key);
    if (!kv || kv->type != GGUF_VT_STRING || gguf_get_str(f, key, &s, NULL))
        return lk_strdup("");
    return s;
}

static void view_init(struct gguf_view *v, const struct gguf_file *f)
{
    memset(v, 0, sizeof *v);
    v->cfg_ok = gguf_model_cfg(f, &v->c, NULL, NULL, &v->cfg_err) == LK_OK;
    for (int64_t i = 0; i < f->n_tensors && !v->cfg_ok; i++) // the model's, else every tensor's elements
        v->n_params += (int64_t)f->t[i].numel;
    if (v->cfg_ok)
        v->n_params = cfg_param_count(&v->c);
    if (gguf_find_kv(f, "tokenizer.ggml.model"))
        gguf_tok_load(&v->tk, f, &v->tok_err);
    const struct gguf_kv *types = gguf_find_kv(f, "tokenizer.ggml.token_type");
    for (uint64_t i = 0; types && types->type == GGUF_VT_ARRAY && types->arr_type != GGUF_VT_STRING && i < types->n;
         i++) {
        double t = gguf_arr_num(types, i);
        v->n_type[t >= 0 && t <= 5 ? (int)t : 0]++;
    }
}

static long long arr_len(const struct gguf_file *f, const char *key)
{
    const struct gguf_kv *kv = gguf_find_kv(f, key);
    return kv && kv->type == GGUF_VT_ARRAY ? (long long)kv->n : -1;
}

/* A token id and its text from the metadata ("2 '<|im_end|>'", or "-"). */
static void token_label(const struct gguf_file *f, const char *key, char *buf, size_t n)
{
    uint64_t id;
    const struct gguf_kv *toks = gguf_find_kv(f, "tokenizer.ggml.tokens");
    if (!gguf_find_kv(f, key) || gguf_get_uint(f, key, &id, NULL)) {
        snprintf(buf, n, "-");
        return;
    }
    if (toks && toks->type == GGUF_VT_ARRAY && toks->arr_type == GGUF_VT_STRING && id < toks->n) {
        struct gguf_str s = gguf_arr_str(toks, id);
        snprintf(buf, n, "%llu '%.*s'", (unsigned long long)id, (int)(s.n < 40 ? s.n : 40), s.p);
    } else {
        snprintf(buf, n, "%llu", (unsigned long long)id);
    }
}

/* Up to 60 bytes of a string into buf, quoted, control characters as spaces. */
static size_t put_quoted(char *buf, size_t n, struct gguf_str s)
{
    size_t k = 0, m = s.n > 60 ? 60 : (size_t)s.n;
    if (k + 1 < n)
        buf[k++] = '\'';
    for (size_t i = 0; i < m && k + 1 < n; i++)
        buf[k++] = (unsigned char)s.p[i] < 32 ? ' ' : s.p[i];
    k += (size_t)snprintf(buf + k, n - k, "'%s", s.n > 60 ? "..." : "");
    return k < n ? k : n - 1;
}

/* One metadata value, shortened for the listing (strings to 60 bytes, arrays to 4 elements). */
static void kv_value(const struct gguf_kv *kv, char *buf, size_t n)
{
    int arr = kv->type == GGUF_VT_ARRAY;
    uint64_t shown = arr ? (kv->n < 4 ? kv->n : 4) : 1;
    size_t k = arr ? (size_t)snprintf(buf, n, "[") : 0;
    buf[k] = 0;
    for (uint64_t i = 0; i < shown && k + 8 < n; i++) {
        if (i)
            k += (size_t)snprintf(buf + k, n - k, ", ");
        if (kv->arr_type == GGUF_VT_STRING)
            k += put_quoted(buf + k, n - k, gguf_arr_str(kv, i));
        else if (kv->arr_type == GGUF_VT_BOOL)
            k += (size_t)snprintf(buf + k, n - k, "%s", gguf_arr_num(kv, i) ? "true" : "false");
        else
            k += (size_t)snprintf(buf + k, n - k, "%.10g", gguf_arr_num(kv, i));
    }
    if (arr && k + 1 < n)
        snprintf(buf + k, n - k, "%s]", kv->n > shown ? ", ..." : "");
}

static void print_model(const struct gguf_file *f, const struct gguf_view *v)
{
    const struct cfg *c = &v->c;
    char *arch = meta_str(f, "general.architecture"), *name = meta_str(f, "general.name");
    printf("gguf: %s (version %u, %lld tensors, %lld metadata keys, alignment %zu, %zu bytes)\n", f->path,
           f->version, (long long)f->n_tensors, (long long)f->n_kv, f->alignment, f->map_len);
    printf("architecture: %s%s%s, name '%s'\n", arch[0] ? arch : "(none)", v->cfg_ok ? " = " : "",
           v->cfg_ok ? c->architecture : "", name);
    if (v->cfg_ok) {
        const struct cfg_rope_scaling *r = &c->rope_scaling;
        printf("dimensions: hidden %d, intermediate %d, layers %d, heads %d, kv heads %d, head dim %d, vocab %d\n",
               c->hidden_size, c->intermediate_size, c->num_hidden_layers, c->num_attention_heads,
               c->num_key_value_heads, c->head_dim, c->vocab_size);
        printf("rope_theta %.10g, rope scaling %s", c->rope_theta, cfg_rope_type_name(r->type));
        if (r->type == CFG_ROPE_LINEAR)
            printf(" (factor %g)", r->factor);
        else if (r->type == CFG_ROPE_LLAMA3)
            printf(" (factor %g, low_freq_factor %g, high_freq_factor %g, original %d positions; rope_freqs)",
                   r->factor, r->low_freq_factor, r->high_freq_factor, r->original_max_position_embeddings);
        printf(", rms_norm_eps %g, context %d\n", c->rms_norm_eps, c->max_position_embeddings);
        printf("tied embeddings %s, attention biases %s, q/k norm %s\n", c->tie_word_embeddings ? "yes" : "no",
               cfg_module_bias(c, CFG_O) ? "q/k/v/output" : c->attention_bias ? "q/k/v" : "none",
               c->qk_norm ? "yes" : "no");
    } else {
        printf("lorakit cannot run this file: %s\n", v->cfg_err.msg);
    }
    printf("parameters: %lld (%.1f M)\n", (long long)v->n_params, (double)v->n_params / 1e6);
    lk_free(arch);
    lk_free(name);
}

static void print_tokenizer(const struct gguf_file *f, const struct gguf_view *v)
{
    char *model = meta_str(f, "tokenizer.ggml.model"), *pre = meta_str(f, "tokenizer.ggml.pre");
    char bos[64], eos[64], pad[64];
    int add_bos = 0;
    token_label(f, "tokenizer.ggml.bos_token_id", bos, sizeof bos);
    token_label(f, "tokenizer.ggml.eos_token_id", eos, sizeof eos);
    token_label(f, "tokenizer.ggml.padding_token_id", pad, sizeof pad);
    if (gguf_find_kv(f, "tokenizer.ggml.add_bos_token"))
        gguf_get_bool(f, "tokenizer.ggml.add_bos_token", &add_bos, NULL);
    if (!model[0]) {
        printf("tokenizer: none\n");
    } else {
        printf("tokenizer: %s, pre '%s', %lld tokens (%d normal, %d control, %d user-defined, %d unused), "
               "%lld merges\n", model, pre, arr_len(f, "tokenizer.ggml.tokens"), v->n_type[1], v->n_type[3],
               v->n_type[4], v->n_type[5], arr_len(f, "tokenizer.ggml.merges"));
        printf("  bos %s, eos %s, padding %s, add_bos %s; %s\n", bos, eos, pad, add_bos ? "yes" : "no",
               v->tk ? "lorakit reads it (generate, tokenize)" : v->tok_err.msg);
    }
    char *tmpl = meta_str(f, "tokenizer.chat_template");
    if (tmpl[0])
        printf("chat template (%zu bytes):\n%s%s", strlen(tmpl), tmpl, tmpl[strlen(tmpl) - 1] == '\n' ? "" : "\n");
    else
        printf("chat template: none\n");
    lk_free(tmpl);
    lk_free(model);
    lk_free(pre);
}

static void print_lists(const struct gguf_file *f)
{
    char tb[48], val[400];
    printf("metadata:\n");
    for (int64_t i = 0; i < f->n_kv; i++) {
        const struct gguf_kv *kv = &f->kv[i];
        gguf_kv_type_str(kv, tb, sizeof tb);
        kv_value(kv, val, sizeof val);
        printf("  %-48.*s %-16s %s\n", (int)kv->key.n, kv->key.p, tb, val);
    }
    printf("tensors (shape as ne: fastest dimension first):\n");
    for (int64_t i = 0; i < f->n_tensors; i++) {
        const struct gguf_tensor *t = &f->t[i];
        char shape[128];
        size_t k = (size_t)snprintf(shape, sizeof shape, "[");
        for (int d = 0; d < t->n_dims; d++)
            k += (size_t)snprintf(shape + k, sizeof shape - k, d ? ", %lld" : "%lld", (long long)t->ne[d]);
        snprintf(shape + k, sizeof shape - k, "]");
        printf("  %-40.*s %-5s %s\n", (int)t->name.n, t->name.p, gguf_ttype_name(t->type), shape);
    }
}

static cJSON *kv_json(const struct gguf_kv *kv)
{
    if (kv->type == GGUF_VT_ARRAY) { // arrays: the type and length (tokens and merges are long)
        char tb[48];
        gguf_kv_type_str(kv, tb, sizeof tb);
        cJSON *o = cJSON_CreateObject();
        cJSON_AddStringToObject(o, "type", tb);
        cJSON_AddNumberToObject(o, "length", (double)kv->n);
        return o;
    }
    if (kv->type == GGUF_VT_STRING) {
        struct gguf_str s = gguf_arr_str(kv, 0);
        char *z = lk_malloc((size_t)s.n + 1);
        if (!z)
            return cJSON_CreateNull();
        memcpy(z, s.p, (size_t)s.n);
        z[s.n] = 0;
        cJSON *j = cJSON_CreateString(z);
        lk_free(z);
        return j;
    }
    return kv->type == GGUF_VT_BOOL ? cJSON_CreateBool(kv->val[0]) : cJSON_CreateNumber(gguf_arr_num(kv, 0));
}

static void print_json(const struct gguf_file *f, const struct gguf_view *v)
{
    cJSON *root = cJSON_CreateObject(), *md, *ts;
    cJSON_AddStringToObject(root, "kind", "gguf");
    cJSON_AddStringToObject(root, "path", f->path);
    cJSON_AddNumberToObject(root, "version", f->version);
    cJSON_AddNumberToObject(root, "bytes", (double)f->map_len);
    cJSON_AddNumberToObject(root, "parameters", (double)v->n_params);
    if (v->cfg_ok) {
        info_json_cfg(cJSON_AddObjectToObject(root, "config"), &v->c);
    } else {
        cJSON_AddStringToObject(root, "unsupported", v->cfg_err.msg);
    }
    cJSON_AddBoolToObject(root, "tokenizer_readable", v->tk != NULL);
    md = cJSON_AddObjectToObject(root, "metadata");
    for (int64_t i = 0; i < f->n_kv; i++) {
        char key[256];
        snprintf(key, sizeof key, "%.*s", (int)f->kv[i].key.n, f->kv[i].key.p);
        cJSON_AddItemToObject(md, key, kv_json(&f->kv[i]));
    }
    ts = cJSON_AddArrayToObject(root, "tensors");
    for (int64_t i = 0; i < f->n_tensors; i++) {
        const struct gguf_tensor *t = &f->t[i];
        cJSON *o = cJSON_CreateObject(), *ne;
        char nm[GGUF_MAX_NAME];
        snprintf(nm, sizeof nm, "%.*s", (int)t->name.n, t->name.p);
        cJSON_AddStringToObject(o, "name", nm);
        cJSON_AddStringToObject(o, "type", gguf_ttype_name(t->type));
        ne = cJSON_AddArrayToObject(o, "ne");
        for (int d = 0; d < t->n_dims; d++)
            cJSON_AddItemToArray(ne, cJSON_CreateNumber((double)t->ne[d]));
        cJSON_AddItemToArray(ts, o);
    }
    char *text = cfg_json_print(root);
    if (text)
        fputs(text, stdout);
    lk_free(text);
    cJSON_Delete(root);
}

int info_gguf(const char *path, int json)
{
    struct gguf_file f;
    struct lk_err err = { 0 };
    if (gguf_open(&f, path, &err))
        return lk_cli_fail("info", &err);
    struct gguf_view v;
    view_init(&v, &f);
    if (json) {
        print_json(&f, &v);
    } else {
        print_model(&f, &v);
        print_tokenizer(&f, &v);
        print_lists(&f);
    }
    // a file lorakit does not run is described; one that contradicts itself is an error
    int bad = !v.cfg_ok && v.cfg_err.code != LK_ERR_UNSUPPORTED;
    if (!bad && v.tok_err.code && v.tok_err.code != LK_ERR_UNSUPPORTED) {
        bad = 1;
        v.cfg_err = v.tok_err;
    }
    cfg_release(&v.c);
    tok_free(v.tk);
    gguf_close(&f);
    return bad ? lk_cli_fail("info", &v.cfg_err) : 0;
}
