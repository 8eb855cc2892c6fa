/*
 * info.c - `lorakit info PATH [--json]`: describe a model folder (config, dtype, parameter
 * count, tensor table, checked against the tensors the config implies), a bare .safetensors
 * file (its validated header), an adapter folder (tools/info_adapter.c), or a GGUF file
 * (tools/info_gguf.c).
 */
#include <cJSON.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../libcore/cfg.h"
#include "../libcore/gguf.h"
#include "../libcore/lk.h"
#include "../libcore/st.h"
#include "commands.h"
#include "opts.h"

static const struct cmd_help info_help = {
    "info",
    "PATH [--json]",
    "Describes PATH: a model folder (config.json + model.safetensors or a sharded index):\n"
    "architecture, dimensions, dtype, parameter count and every tensor, checked against the\n"
    "tensors the config implies; a .safetensors file: its header (tensors, dtypes, shapes,\n"
    "metadata), fully validated; an adapter folder (adapter_config.json); a GGUF file:\n"
    "architecture and hyper-parameters as lorakit reads them, tokenizer, chat template, every\n"
    "metadata key and tensor (type, shape), or why lorakit cannot run it. Exits 1 with a\n"
    "message naming the file and tensor when something is malformed.",
    "  lorakit info models/tiny\n"
    "  lorakit info models/tiny/model.safetensors --json\n"
    "  lorakit info med.q8_0.gguf",
};

static void info_shape(char *buf, size_t n, int ndim, const int64_t *shape)
{
    size_t k = (size_t)snprintf(buf, n, "[");
    for (int d = 0; d < ndim && k < n; d++)
        k += (size_t)snprintf(buf + k, n - k, d ? ", %lld" : "%lld", (long long)shape[d]);
    if (k < n)
        snprintf(buf + k, n - k, "]");
}

static cJSON *info_json_tensor(const struct st_tensor *t)
{
    cJSON *o = cJSON_CreateObject();
    cJSON_AddStringToObject(o, "name", t->name);
    cJSON_AddStringToObject(o, "dtype", tensor_dtype_name(t->dtype));
    cJSON *s = cJSON_AddArrayToObject(o, "shape");
    for (int d = 0; d < t->ndim; d++)
        cJSON_AddItemToArray(s, cJSON_CreateNumber((double)t->shape[d]));
    return o;
}

void info_json_cfg(struct cJSON *o, const struct cfg *c)
{
    cJSON_AddStringToObject(o, "architecture", c->architecture);
    cJSON_AddStringToObject(o, "model_type", c->model_type);
    cJSON_AddNumberToObject(o, "hidden_size", c->hidden_size);
    cJSON_AddNumberToObject(o, "intermediate_size", c->intermediate_size);
    cJSON_AddNumberToObject(o, "num_hidden_layers", c->num_hidden_layers);
    cJSON_AddNumberToObject(o, "num_attention_heads", c->num_attention_heads);
    cJSON_AddNumberToObject(o, "num_key_value_heads", c->num_key_value_heads);
    cJSON_AddNumberToObject(o, "head_dim", c->head_dim);
    cJSON_AddNumberToObject(o, "vocab_size", c->vocab_size);
    cJSON_AddNumberToObject(o, "max_position_embeddings", c->max_position_embeddings);
    cJSON_AddNumberToObject(o, "rms_norm_eps", c->rms_norm_eps);
    cJSON_AddNumberToObject(o, "rope_theta", c->rope_theta);
    cJSON_AddStringToObject(o, "rope_scaling", cfg_rope_type_name(c->rope_scaling.type));
    cJSON_AddBoolToObject(o, "tie_word_embeddings", c->tie_word_embeddings);
    cJSON_AddBoolToObject(o, "attention_bias", c->attention_bias);
}

static void info_print_json(cJSON *root)
{
    char *text = cfg_json_print(root);
    if (text)
        fputs(text, stdout);
    lk_free(text);
    cJSON_Delete(root);
}

static void info_print_tensors(const struct st_file *f, int with_file)
{
    for (int i = 0; i < f->n; i++) {
        const struct st_tensor *t = &f->t[i];
        char shape[160];
        info_shape(shape, sizeof shape, t->ndim, t->shape);
        printf("  %-56s %-5s %s%s%s\n", t->name, tensor_dtype_name(t->dtype), shape, with_file ? "  " : "",
               with_file ? strrchr(f->path, '/') + 1 : "");
    }
}

// ---- a bare .safetensors file ----

static int info_file(const char *path, int json)
{
    struct st_file f;
    struct lk_err err = { 0 };
    if (st_open(&f, path, &err))
        return lk_cli_fail("info", &err);
    size_t params = 0;
    for (int i = 0; i < f.n; i++)
        params += f.t[i].numel;
    if (json) {
        cJSON *root = cJSON_CreateObject();
        cJSON_AddStringToObject(root, "kind", "safetensors");
        cJSON_AddStringToObject(root, "path", path);
        cJSON_AddNumberToObject(root, "header_bytes", (double)f.header_len);
        cJSON_AddNumberToObject(root, "data_bytes", (double)f.data_len);
        cJSON_AddNumberToObject(root, "elements", (double)params);
        cJSON *md = cJSON_AddObjectToObject(root, "metadata");
        for (int i = 0; i < f.n_meta; i++)
            cJSON_AddStringToObject(md, f.meta_key[i], f.meta_val[i]);
        cJSON *ts = cJSON_AddArrayToObject(root, "tensors");
        for (int i = 0; i < f.n; i++)
            cJSON_AddItemToArray(ts, info_json_tensor(&f.t[i]));
        info_print_json(root);
    } else {
        printf("file: %s\n", path);
        printf("header: %zu bytes, data: %zu bytes, %d tensors, %zu elements\n", f.header_len, f.data_len,
               f.n, params);
        if (f.n_meta) {
            printf("metadata:\n");
            for (int i = 0; i < f.n_meta; i++)
                printf("  %s: %s\n", f.meta_key[i], f.meta_val[i]);
        }
        printf("tensors:\n");
        info_print_tensors(&f, 0);
    }
    st_close(&f);
    return 0;
}

// ---- a model folder ----

/* The first problem between the config's tensor list and the files, or LK_OK. Tensors the config
 * does not name are reported on stderr as warnings (old checkpoints carry rotary inv_freq). */
static int info_check(const struct cfg *c, const struct st_model *m, const char *dir, struct lk_err *err)
{
    struct cfg_tensor *want;
    int n;
    if (cfg_tensors(c, &want, &n, err))
        return err->code;
    int rc = LK_OK;
    for (int i = 0; i < n && !rc; i++) {
        const struct st_tensor *t = st_model_find(m, want[i].name, NULL);
        if (!t) {
            rc = lk_errf(err, LK_ERR_MISSING, "%s: tensor '%s' is missing (the config implies it)", dir,
                         want[i].name);
            break;
        }
        int same = t->ndim == want[i].ndim;
        for (int d = 0; same && d < t->ndim; d++)
            same = t->shape[d] == want[i].shape[d];
        if (!same) {
            char got[160], exp[160];
            info_shape(got, sizeof got, t->ndim, t->shape);
            info_shape(exp, sizeof exp, want[i].ndim, want[i].shape);
            rc = lk_errf(err, LK_ERR_SHAPE, "%s: tensor '%s' has shape %s, the config implies %s", dir,
                         want[i].name, got, exp);
        }
    }
    for (int f = 0; f < m->n_files && !rc; f++)
        for (int k = 0; k < m->files[f].n; k++) {
            int known = 0;
            for (int i = 0; i < n && !known; i++)
                known = !strcmp(want[i].name, m->files[f].t[k].name);
            if (!known)
                fprintf(stderr, "lorakit info: warning: %s: tensor '%s' is not part of a %s model\n", dir,
                        m->files[f].t[k].name, c->architecture);
        }
    lk_free(want);
    return rc;
}

static int info_model(const char *dir, int json)
{
    struct cfg c;
    struct st_model m;
    struct lk_err err = { 0 };
    if (cfg_load(&c, dir, &err))
        return lk_cli_fail("info", &err);
    if (st_model_open(&m, dir, &err)) {
        cfg_release(&c);
        return lk_cli_fail("info", &err);
    }
    size_t params = 0, bytes = 0;
    int dcount[TENSOR_DTYPE_COUNT] = { 0 }, dmain = 0;
    for (int f = 0; f < m.n_files; f++)
        for (int k = 0; k < m.files[f].n; k++) {
            params += m.files[f].t[k].numel;
            bytes += m.files[f].t[k].nbytes;
            dcount[m.files[f].t[k].dtype]++;
        }
    for (int d = 0; d < TENSOR_DTYPE_COUNT; d++)
        if (dcount[d] > dcount[dmain])
            dmain = d;
    int mixed = 0;
    for (int d = 0; d < TENSOR_DTYPE_COUNT; d++)
        mixed += dcount[d] > 0;
    const char *dtype = mixed > 1 ? "mixed" : tensor_dtype_name((enum tensor_dtype)dmain);
    if (json) {
        cJSON *root = cJSON_CreateObject();
        cJSON_AddStringToObject(root, "kind", "model");
        cJSON_AddStringToObject(root, "path", dir);
        info_json_cfg(root, &c);
        cJSON_AddStringToObject(root, "torch_dtype", c.torch_dtype);
        cJSON_AddStringToObject(root, "dtype", dtype);
        cJSON_AddNumberToObject(root, "parameters", (double)params);
        cJSON_AddNumberToObject(root, "bytes", (double)bytes);
        cJSON *fs = cJSON_AddArrayToObject(root, "files");
        for (int f = 0; f < m.n_files; f++)
            cJSON_AddItemToArray(fs, cJSON_CreateString(strrchr(m.files[f].path, '/') + 1));
        cJSON *ts = cJSON_AddArrayToObject(root, "tensors");
        for (int f = 0; f < m.n_files; f++)
            for (int k = 0; k < m.files[f].n; k++)
                cJSON_AddItemToArray(ts, info_json_tensor(&m.files[f].t[k]));
        info_print_json(root);
    } else {
        printf("model: %s\n", dir);
        printf("architecture: %s (%s)\n", c.architecture, c.model_type);
        printf("dimensions: hidden %d, intermediate %d, layers %d, heads %d, kv heads %d, head dim %d, "
               "vocab %d\n", c.hidden_size, c.intermediate_size, c.num_hidden_layers, c.num_attention_heads,
               c.num_key_value_heads, c.head_dim, c.vocab_size);
        printf("rope_theta %.10g, rms_norm_eps %g, max positions %d, tied embeddings %s, attention biases %s\n",
               c.rope_theta, c.rms_norm_eps, c.max_position_embeddings, c.tie_word_embeddings ? "yes" : "no",
               cfg_module_bias(&c, CFG_O) ? "q/k/v/o_proj" : c.attention_bias ? "q/k/v_proj" : "none");
        printf("dtype: %s (config: %s)\n", dtype, c.torch_dtype);
        printf("parameters: %zu (%.1f M), %zu bytes in %d file%s%s\n", params, (double)params / 1e6, bytes,
               m.n_files, m.n_files == 1 ? "" : "s", m.sharded ? " (sharded)" : "");
        printf("tensors: %d\n", st_model_count(&m));
        for (int f = 0; f < m.n_files; f++)
            info_print_tensors(&m.files[f], m.sharded);
    }
    int rc = info_check(&c, &m, dir, &err);
    st_model_close(&m);
    cfg_release(&c);
    return rc ? lk_cli_fail("info", &err) : 0;
}

int cmd_info(int argc, char **argv)
{
    int json = 0, help = 0, np = 0;
    const char *pos[1];
    struct lk_err err = { 0 };
    const struct opt opts[] = {
        { "json", OPT_FLAG, &json, NULL, "print JSON instead of text" },
        { 0 },
    };
    if (opts_parse(argc, argv, opts, pos, 1, &np, &help, &err))
        return lk_cli_fail("info", &err);
    if (help) {
        opts_usage(stdout, &info_help, opts);
        return 0;
    }
    if (np != 1) {
        lk_errf(&err, LK_ERR_USAGE, "expected one PATH (see --help)");
        return lk_cli_fail("info", &err);
    }
    const char *path = pos[0];
    if (lk_is_dir(path)) {
        char *ac = lk_path_join(path, "adapter_config.json");
        int adapter = ac && lk_file_exists(ac);
        lk_free(ac);
        // adapter folders: tools/info_adapter.c
        if (adapter)
            return info_adapter(path, json);
        return info_model(path, json);
    }
    if (!lk_file_exists(path)) {
        lk_errf(&err, LK_ERR_MISSING, "%s: no such file or folder", path);
        return lk_cli_fail("info", &err);
    }
    return gguf_is_file(path) ? info_gguf(path, json) : info_file(path, json);
}
