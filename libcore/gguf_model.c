/*
 * gguf_model.c - Hugging Face models and PEFT adapters as GGUF files for llama.cpp, and GGUF
 * models read back into lorakit.
 *
 * What llama.cpp's loader expects (llama-arch.cpp names, llama-model.cpp hyper-parameters,
 * convert_hf_to_gguf.py for the conventions): general.architecture "qwen2", "qwen3" or "llama"
 * and the {arch}.* hyper-parameters (the head size as attention.key_length / value_length, so
 * Qwen3's heads x head_dim may differ from the hidden size); tensors token_embd, blk.N.attn_norm,
 * attn_q/k/v (+ .bias), Qwen3's attn_q_norm / attn_k_norm, attn_output (+ .bias for llama with
 * attention_bias: llama.cpp's llama loads bo as an optional tensor), ffn_norm,
 * ffn_gate/up/down, output_norm, and output unless the embeddings are tied (llama.cpp then
 * reuses token_embd); for llama, the rows of q and k (and their biases) permuted per head so
 * that llama.cpp's rotation of adjacent pairs equals transformers' rotate_half. ne is the
 * reverse of the transformers shape. Rotary scaling: linear as {arch}.rope.scaling.type /
 * factor; llama3 as llama.cpp's rope_freqs tensor (one divisor per dimension pair, which only
 * its llama graph applies), with the parameters also kept as lorakit.rope_scaling.* so the file
 * reads back into the same config; dynamic is refused (llama.cpp has no such scaling).
 *
 * The exporter streams: the header (metadata, tokenizer, every tensor's shape and offset) is
 * written first, then each tensor in chunks of rows read from its source (the model folder's
 * safetensors by pread, or the caller's callback), permuted and converted as they pass. Memory:
 * the tokenizer tables, one chunk of float32 and its converted bytes.
 */
#include "gguf.h"

#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "lora.h"
#include "model.h"
#include "ops.h"
#include "st.h"
#include "tensor.h"

#define CHUNK_DEFAULT ((size_t)16 << 20)

static const char *const module_gguf[CFG_N_MODULES] = { "attn_q",   "attn_k", "attn_v",  "attn_output",
                                                        "ffn_gate", "ffn_up", "ffn_down" };

int gguf_tensor_name(const struct cfg_tensor *t, char *buf, size_t n)
{
    switch (t->kind) {
    case CFG_T_EMBED: snprintf(buf, n, "token_embd.weight"); return 0;
    case CFG_T_LM_HEAD: snprintf(buf, n, "output.weight"); return 0;
    case CFG_T_LINEAR:
    case CFG_T_BIAS:
        if (t->module < 0 || t->module >= CFG_N_MODULES)
            return -1;
        snprintf(buf, n, "blk.%d.%s.%s", t->layer, module_gguf[t->module], t->kind == CFG_T_BIAS ? "bias" : "weight");
        return 0;
    case CFG_T_NORM:
        if (t->layer < 0)
            snprintf(buf, n, "output_norm.weight");
        else if (strstr(t->name, ".input_layernorm."))
            snprintf(buf, n, "blk.%d.attn_norm.weight", t->layer);
        else if (strstr(t->name, ".post_attention_layernorm."))
            snprintf(buf, n, "blk.%d.ffn_norm.weight", t->layer);
        else if (strstr(t->name, ".self_attn.q_norm."))
            snprintf(buf, n, "blk.%d.attn_q_norm.weight", t->layer);
        else if (strstr(t->name, ".self_attn.k_norm."))
            snprintf(buf, n, "blk.%d.attn_k_norm.weight", t->layer);
        else
            return -1;
        return 0;
    }
    return -1;
}

int gguf_tensor_permuted(const struct cfg *c, const struct cfg_tensor *t, int *out_heads)
{
    if (c->arch != CFG_ARCH_LLAMA || (t->kind != CFG_T_LINEAR && t->kind != CFG_T_BIAS) ||
        (t->module != CFG_Q && t->module != CFG_K))
        return 0;
    *out_heads = t->module == CFG_Q ? c->num_attention_heads : c->num_key_value_heads;
    return 1;
}

void gguf_permute_rows(float *x, int heads, int HS, int64_t cols, int inverse, float *tmp)
{
    size_t row = (size_t)cols * sizeof(float);
    for (int h = 0; h < heads; h++) {
        float *blk = x + (size_t)h * (size_t)HS * (size_t)cols;
        memcpy(tmp, blk, row * (size_t)HS);
        for (int j = 0; j < HS / 2; j++)
            for (int s = 0; s < 2; s++) {
                size_t pair = (size_t)(2 * j + s), half = (size_t)(s * (HS / 2) + j);
                size_t dst = inverse ? half : pair, src = inverse ? pair : half;
                memcpy(blk + dst * (size_t)cols, tmp + src * (size_t)cols, row);
            }
    }
}

const char *gguf_arch_name(const struct cfg *c)
{
    return c->arch == CFG_ARCH_LLAMA ? "llama" : c->arch == CFG_ARCH_QWEN3 ? "qwen3" : "qwen2";
}

int gguf_cfg_check(const struct cfg *c, const char *name, struct lk_err *err)
{
    const char *arch = gguf_arch_name(c);
    if (c->arch == CFG_ARCH_QWEN2 && !c->attention_bias)
        return lk_errf(err, LK_ERR_UNSUPPORTED, "%s: a qwen2 model without q/k/v biases: llama.cpp's qwen2 requires them",
                       name);
    if (c->arch == CFG_ARCH_QWEN3 && c->attention_bias)
        return lk_errf(err, LK_ERR_UNSUPPORTED, "%s: a qwen3 model with q/k/v biases (attention_bias): llama.cpp's "
                       "qwen3 has none", name);
    if (c->arch == CFG_ARCH_QWEN2 && (int64_t)c->num_attention_heads * c->head_dim != c->hidden_size)
        return lk_errf(err, LK_ERR_UNSUPPORTED, "%s: qwen2 with head_dim %d x %d heads != hidden_size %d: llama.cpp's "
                       "qwen2 loader assumes they are equal", name, c->head_dim, c->num_attention_heads,
                       c->hidden_size);
    if (c->head_dim % 2)
        return lk_errf(err, LK_ERR_UNSUPPORTED, "%s: head_dim %d is odd: rotary embedding needs pairs", name,
                       c->head_dim);
    const struct cfg_rope_scaling *r = &c->rope_scaling;
    if (r->type == CFG_ROPE_DYNAMIC)
        return lk_errf(err, LK_ERR_UNSUPPORTED, "%s: rope_scaling 'dynamic' cannot be expressed in GGUF: llama.cpp has "
                       "no dynamic rotary scaling and would run positions past %d unscaled", name,
                       cfg_rope_positions(c));
    if (r->type == CFG_ROPE_LLAMA3 && c->arch != CFG_ARCH_LLAMA)
        return lk_errf(err, LK_ERR_UNSUPPORTED, "%s: rope_scaling 'llama3' on a %s model: llama.cpp applies "
                       "per-dimension rotary factors (rope_freqs) in its llama architecture only", name, arch);
    return LK_OK;
}

int gguf_rope_freqs(const struct cfg *c, float *out)
{
    const struct cfg_rope_scaling *r = &c->rope_scaling;
    if (r->type != CFG_ROPE_LLAMA3)
        return 0;
    // llama.cpp rotates dimension pair i by pos * theta^(-2i/HS) / rope_freqs[i]; lorakit by
    // pos * inv_freq[i] with the llama3 rescaling applied: the factor is their ratio
    op_rope_inv_freq(out, c->head_dim, c->rope_theta);
    for (int i = 0; i < c->head_dim / 2; i++) {
        float scaled = out[i];
        op_rope_inv_freq_llama3(&scaled, 1, r->factor, r->low_freq_factor, r->high_freq_factor,
                                r->original_max_position_embeddings);
        out[i] = (float)((double)out[i] / scaled);
    }
    return c->head_dim / 2;
}

/* The last component of a path, without trailing slashes, into buf. */
static void base_name(const char *path, char *buf, size_t n)
{
    size_t len = strlen(path);
    while (len > 1 && path[len - 1] == '/')
        len--;
    size_t start = len;
    while (start > 0 && path[start - 1] != '/')
        start--;
    snprintf(buf, n, "%.*s", (int)(len - start), path + start);
}

static uint64_t file_bytes(const char *path)
{
    struct stat sb;
    return stat(path, &sb) == 0 ? (uint64_t)sb.st_size : 0;
}

int gguf_export_type(int ndim, int64_t cols, int dtype)
{
    if (ndim < 2 || (dtype == GGUF_T_Q8_0 && cols % GGUF_QK8_0))
        return GGUF_T_F32; // 1-D stays f32; q8_0 needs rows of whole blocks
    return dtype;
}

// ---- the default source: the model folder's safetensors, read with pread ----

struct st_src {
    struct st_model sm;
    int *fd;          /* owned [sm.n_files] */
    void *io;         /* owned read buffer */
    size_t io_cap;
};

static void st_src_close(struct st_src *s)
{
    for (int i = 0; s->fd && i < s->sm.n_files; i++)
        if (s->fd[i] >= 0)
            close(s->fd[i]);
    lk_free(s->fd);
    lk_free(s->io);
    st_model_close(&s->sm);
    memset(s, 0, sizeof *s);
}

/* Opens the folder's weights and checks every tensor the config implies is there, float, and
 * of the right shape (before anything is written). */
static int st_src_open(struct st_src *s, const char *dir, const struct cfg_tensor *ts, int nt, struct lk_err *err)
{
    memset(s, 0, sizeof *s);
    if (st_model_open(&s->sm, dir, err))
        return err->code;
    for (int i = 0; i < nt; i++) {
        const struct st_tensor *t = st_model_find(&s->sm, ts[i].name, NULL);
        int64_t numel = ts[i].ndim == 2 ? ts[i].shape[0] * ts[i].shape[1] : ts[i].shape[0];
        if (!t)
            return lk_errf(err, LK_ERR_MISSING, "%s: tensor '%s' is missing from the weights", dir, ts[i].name);
        if (!tensor_dtype_is_float(t->dtype))
            return lk_errf(err, LK_ERR_FORMAT, "%s: tensor '%s' has dtype %s (expected F32, F16 or BF16)", dir,
                           ts[i].name, tensor_dtype_name(t->dtype));
        if (t->ndim != ts[i].ndim || (size_t)numel != t->numel || t->shape[0] != ts[i].shape[0])
            return lk_errf(err, LK_ERR_SHAPE, "%s: tensor '%s' does not have the shape config.json implies", dir,
                           ts[i].name);
    }
    s->fd = lk_malloc(sizeof *s->fd * (size_t)s->sm.n_files);
    if (!s->fd)
        return lk_errf(err, LK_ERR_NOMEM, "out of memory");
    for (int i = 0; i < s->sm.n_files; i++)
        s->fd[i] = -1;
    for (int i = 0; i < s->sm.n_files; i++) {
        s->fd[i] = open(s->sm.files[i].path, O_RDONLY);
        if (s->fd[i] < 0)
            return lk_errf(err, LK_ERR_IO, "%s: cannot open: %s", s->sm.files[i].path, strerror(errno));
    }
    return LK_OK;
}

/* Rows of a safetensors tensor by pread (the page cache is copied, never faulted in through the
 * mapping, so the resident set stays at one chunk). */
static int st_src_rows(void *ctx, const struct cfg_tensor *ct, int64_t row0, int64_t n, float *out,
                       struct lk_err *err)
{
    struct st_src *s = ctx;
    int fi;
    const struct st_tensor *t = st_model_find(&s->sm, ct->name, &fi);
    const struct st_file *f = &s->sm.files[fi];
    size_t cols = ct->ndim == 2 ? (size_t)ct->shape[1] : (size_t)ct->shape[0], es = tensor_dtype_size(t->dtype);
    size_t nb = (size_t)n * cols * es;
    if (nb > s->io_cap) {
        void *p = lk_realloc(s->io, nb);
        if (!p)
            return lk_errf(err, LK_ERR_NOMEM, "out of memory");
        s->io = p;
        s->io_cap = nb;
    }
    off_t off = (off_t)((const unsigned char *)t->data - (const unsigned char *)f->map) + (off_t)((size_t)row0 * cols * es);
    for (size_t done = 0; done < nb;) {
        ssize_t k = pread(s->fd[fi], (char *)s->io + done, nb - done, off + (off_t)done);
        if (k < 0 && errno == EINTR)
            continue;
        if (k <= 0)
            return lk_errf(err, LK_ERR_IO, "%s: read failed: %s", f->path, k < 0 ? strerror(errno) : "short file");
        done += (size_t)k;
    }
    tensor_to_f32(out, s->io, t->dtype, (size_t)n * cols);
    return LK_OK;
}

// ---- model export ----

struct exporter {
    const struct gguf_export *x;
    const struct cfg *c;
    struct cfg_tensor *ts;   /* owned [nt] */
    int nt;
    int *type;               /* owned [nt]: the ggml type of each */
    float *buf, *tmp;        /* owned: one chunk of rows; one head block for the permutation */
    size_t buf_cap, tmp_cap;
};

static int grow(float **p, size_t *cap, size_t n, struct lk_err *err)
{
    if (n <= *cap)
        return LK_OK;
    float *q = lk_realloc(*p, n * sizeof(float));
    if (!q)
        return lk_errf(err, LK_ERR_NOMEM, "out of memory for a buffer of %zu floats", n);
    *p = q;
    *cap = n;
    return LK_OK;
}

static void write_meta(struct gguf_writer *w, const struct exporter *e, const char *arch, const char *name)
{
    const struct cfg *c = e->c;
    char k[96];
#define KEY(s) (snprintf(k, sizeof k, "%s." s, arch), k)
    gguf_writer_str(w, "general.architecture", arch);
    gguf_writer_str(w, "general.type", "model");
    gguf_writer_str(w, "general.name", name);
    gguf_writer_u32(w, "general.file_type", gguf_ftype_of(e->x->dtype));
    gguf_writer_u32(w, "general.quantization_version", 2);
    gguf_writer_u32(w, "general.alignment", GGUF_ALIGNMENT);
    gguf_writer_u32(w, KEY("vocab_size"), (uint32_t)c->vocab_size);
    gguf_writer_u32(w, KEY("context_length"), (uint32_t)c->max_position_embeddings);
    gguf_writer_u32(w, KEY("embedding_length"), (uint32_t)c->hidden_size);
    gguf_writer_u32(w, KEY("block_count"), (uint32_t)c->num_hidden_layers);
    gguf_writer_u32(w, KEY("feed_forward_length"), (uint32_t)c->intermediate_size);
    gguf_writer_u32(w, KEY("attention.head_count"), (uint32_t)c->num_attention_heads);
    gguf_writer_u32(w, KEY("attention.head_count_kv"), (uint32_t)c->num_key_value_heads);
    gguf_writer_u32(w, KEY("attention.key_length"), (uint32_t)c->head_dim);
    gguf_writer_u32(w, KEY("attention.value_length"), (uint32_t)c->head_dim);
    gguf_writer_u32(w, KEY("rope.dimension_count"), (uint32_t)c->head_dim);
    gguf_writer_f32(w, KEY("rope.freq_base"), (float)c->rope_theta);
    gguf_writer_f32(w, KEY("attention.layer_norm_rms_epsilon"), (float)c->rms_norm_eps);
    const struct cfg_rope_scaling *r = &c->rope_scaling;
    if (r->type == CFG_ROPE_LINEAR) { // llama.cpp: every frequency times 1 / factor
        gguf_writer_str(w, KEY("rope.scaling.type"), "linear");
        gguf_writer_f32(w, KEY("rope.scaling.factor"), (float)r->factor);
    }
#undef KEY
    if (r->type == CFG_ROPE_LLAMA3) { // llama.cpp reads the rope_freqs tensor; these let lorakit read it back
        gguf_writer_str(w, "lorakit.rope_scaling.type", "llama3");
        gguf_writer_f32(w, "lorakit.rope_scaling.factor", (float)r->factor);
        gguf_writer_f32(w, "lorakit.rope_scaling.low_freq_factor", (float)r->low_freq_factor);
        gguf_writer_f32(w, "lorakit.rope_scaling.high_freq_factor", (float)r->high_freq_factor);
        gguf_writer_u32(w, "lorakit.rope_scaling.original_max_position_embeddings",
                        (uint32_t)r->original_max_position_embeddings);
    }
    gguf_writer_str(w, "lorakit.version", GGUF_LORAKIT_VERSION);
    if (e->x->n_adapters > 0) { // a merge: the base and what was merged into it
        char base[256];
        base_name(e->x->model_dir, base, sizeof base);
        gguf_writer_u32(w, "general.base_model.count", 1);
        gguf_writer_str(w, "general.base_model.0.name", base);
        gguf_writer_arr_str(w, "lorakit.adapters", e->x->adapters, NULL, (size_t)e->x->n_adapters);
        if (e->x->merge_method)
            gguf_writer_str(w, "lorakit.merge_method", e->x->merge_method);
    }
}

/* Streams tensor i: chunks of rows from the source, permuted for llama's q/k, converted. */
static int write_tensor(struct exporter *e, struct gguf_writer *w, gguf_rows_fn rows_fn, void *ctx, int i,
                        struct lk_err *err)
{
    const struct cfg_tensor *t = &e->ts[i];
    int heads = 0, perm = gguf_tensor_permuted(e->c, t, &heads), HS = e->c->head_dim;
    int64_t rows = t->ndim == 2 ? t->shape[0] : 1, cols = t->ndim == 2 ? t->shape[1] : t->shape[0];
    size_t chunk = e->x->chunk_bytes ? e->x->chunk_bytes : CHUNK_DEFAULT;
    int64_t step = (int64_t)(chunk / sizeof(float) / (size_t)(cols ? cols : 1));
    if (perm && t->ndim == 2)
        step = step / HS * HS; // whole heads: the permutation stays inside a chunk
    if (step < (perm && t->ndim == 2 ? HS : 1))
        step = perm && t->ndim == 2 ? HS : 1;
    if (step > rows)
        step = rows;
    if (grow(&e->buf, &e->buf_cap, (size_t)(step * cols), err) ||
        (perm && grow(&e->tmp, &e->tmp_cap, (size_t)HS * (size_t)(t->ndim == 2 ? cols : 1), err)))
        return err->code;
    for (int64_t r = 0; r < rows && !err->code; r += step) {
        int64_t n = rows - r < step ? rows - r : step;
        if (rows_fn(ctx, t, r, n, e->buf, err))
            return err->code;
        if (perm && t->ndim == 2)
            gguf_permute_rows(e->buf, (int)(n / HS), HS, cols, 0, e->tmp);
        else if (perm) // a bias [heads * HS] is a column of rows
            gguf_permute_rows(e->buf, heads, HS, 1, 0, e->tmp);
        gguf_writer_write(w, e->buf, (size_t)(n * cols));
    }
    return err->code;
}

/* Checks, then the writer: metadata, tokenizer, tensor table, data. */
static int export_run(struct exporter *e, const char *out_path, const struct gguf_vocab *v, gguf_rows_fn rows_fn,
                      void *ctx, struct gguf_export_report *rep, struct lk_err *err)
{
    const char *arch = gguf_arch_name(e->c);
    char name[256], gname[GGUF_MAX_NAME];
    base_name(e->x->model_dir, name, sizeof name);
    struct gguf_writer w;
    if (gguf_writer_init(&w, out_path, err))
        return err->code;
    write_meta(&w, e, arch, e->x->name ? e->x->name : name);
    gguf_vocab_write(v, &w);
    // llama3 rope scaling: per-dimension factors first, as convert_hf_to_gguf.py writes them
    float *freqs = lk_falloc((size_t)e->c->head_dim / 2 + 1, 1);
    int64_t nf = freqs ? gguf_rope_freqs(e->c, freqs) : 0;
    if (!freqs)
        lk_errf(err, LK_ERR_NOMEM, "out of memory");
    if (nf)
        gguf_writer_declare(&w, "rope_freqs.weight", GGUF_T_F32, 1, &nf);
    for (int i = 0; i < e->nt && !err->code; i++) {
        const struct cfg_tensor *t = &e->ts[i];
        int64_t ne[2] = { t->ndim == 2 ? t->shape[1] : t->shape[0], t->shape[0] };
        LK_ASSERT(gguf_tensor_name(t, gname, sizeof gname) == 0);
        gguf_writer_declare(&w, gname, e->type[i], t->ndim, ne);
        rep->n_params += t->ndim == 2 ? t->shape[0] * t->shape[1] : t->shape[0];
    }
    gguf_writer_begin(&w);
    if (nf)
        gguf_writer_write(&w, freqs, (size_t)nf);
    lk_free(freqs);
    for (int i = 0; i < e->nt && !err->code; i++) {
        if (lk_interrupted)
            lk_errf(err, LK_ERR_INTERRUPTED, "interrupted: %s not written", out_path);
        else if (write_tensor(e, &w, rows_fn, ctx, i, err) == LK_OK && e->x->progress)
            e->x->progress(e->x->progress_ctx, i + 1, e->nt, e->ts[i].name);
    }
    if (err->code) {
        gguf_writer_abort(&w);
        return err->code;
    }
    if (gguf_writer_commit(&w))
        return err->code;
    rep->n_tensors = e->nt + (nf > 0);
    snprintf(rep->arch, sizeof rep->arch, "%s", arch);
    snprintf(rep->pre, sizeof rep->pre, "%s", v->pre);
    rep->n_vocab = v->n;
    rep->bytes = file_bytes(out_path);
    return LK_OK;
}

int gguf_export_model(const struct gguf_export *x, const char *out_path, struct gguf_export_report *rep_in,
                      struct lk_err *err)
{
    struct gguf_export_report rep_local, *rep = rep_in ? rep_in : &rep_local;
    memset(rep, 0, sizeof *rep);
    *err = (struct lk_err){ 0 }; // the writer's errors are sticky on err: it starts clean
    struct exporter e = { x, x->cfg, NULL, 0, NULL, NULL, NULL, 0, 0 };
    struct cfg own = { 0 };
    struct st_src src = { 0 };
    struct gguf_vocab v = { 0 };
    if (x->dtype != GGUF_T_F32 && x->dtype != GGUF_T_F16 && x->dtype != GGUF_T_BF16 && x->dtype != GGUF_T_Q8_0)
        return lk_errf(err, LK_ERR_USAGE, "GGUF dtype %d is not one of f32, f16, bf16, q8_0", x->dtype);
    int rc = LK_OK;
    if (!e.c && (rc = cfg_load(&own, x->model_dir, err)) == LK_OK)
        e.c = &own;
    if (!rc)
        rc = gguf_cfg_check(e.c, x->model_dir, err);
    if (!rc)
        rc = cfg_tensors(e.c, &e.ts, &e.nt, err);
    if (!rc && !(e.type = lk_malloc(sizeof *e.type * (size_t)(e.nt + 1))))
        rc = lk_errf(err, LK_ERR_NOMEM, "out of memory");
    for (int i = 0; !rc && i < e.nt; i++) {
        e.type[i] = gguf_export_type(e.ts[i].ndim, e.ts[i].shape[1], x->dtype);
        rep->n_f32_fallback += e.ts[i].ndim == 2 && e.type[i] != x->dtype;
    }
    if (!rc && !x->rows)
        rc = st_src_open(&src, x->model_dir, e.ts, e.nt, err);
    if (!rc)
        rc = gguf_vocab_load(&v, x->model_dir, e.c->vocab_size, err);
    if (!rc)
        rc = export_run(&e, out_path, &v, x->rows ? x->rows : st_src_rows, x->rows ? x->rows_ctx : &src, rep, err);
    gguf_vocab_release(&v);
    st_src_close(&src);
    lk_free(e.ts);
    lk_free(e.type);
    lk_free(e.buf);
    lk_free(e.tmp);
    cfg_release(&own);
    return rc;
}

// ---- adapters ----

static int lora_refuse(const struct lora *l, const char *dir, struct lk_err *err)
{
    const char *what = NULL;
    if (l->cfg.use_dora)
        what = "a DoRA adapter (use_dora): llama.cpp's LoRA has no magnitude vector";
    else if (l->cfg.lora_bias)
        what = "an adapter with lora_B biases (lora_bias): llama.cpp's LoRA has no bias term";
    else if (l->cfg.n_modules_to_save > 0 || l->n_extra > 0)
        what = "an adapter with modules_to_save: llama.cpp's LoRA holds only low-rank pairs";
    else if (l->cfg.target_embed || l->embed_A)
        what = "an embedding adapter (embed_tokens): lorakit does not write llama.cpp's token_embd LoRA";
    if (!what)
        return LK_OK;
    return lk_errf(err, LK_ERR_UNSUPPORTED, "%s: %s cannot be a GGUF LoRA (hint: merge it instead: lorakit merge "
                   "--model BASE --adapter %s --out MERGED, then lorakit convert --model MERGED --out FILE.gguf)",
                   dir, what, dir);
}

/* Every A and B, converted (B scaled by factor and permuted like the base's rows). */
static int lora_write(struct gguf_writer *w, const struct lora *l, const struct cfg *c, float alpha, struct lk_err *err)
{
    float *buf = NULL, *tmp = NULL;
    size_t cap = 0, tcap = 0;
    for (int k = 0; k < l->n_mod && !err->code; k++) {
        const struct lora_module *m = &l->mod[k];
        gguf_writer_write(w, m->A, (size_t)m->R * (size_t)m->in);
        double factor = alpha > 0 ? (double)m->scale * m->R / alpha : m->scale;
        if (grow(&buf, &cap, (size_t)m->out * (size_t)m->R, err) || grow(&tmp, &tcap, (size_t)c->head_dim * (size_t)m->R, err))
            break;
        for (size_t i = 0; i < (size_t)m->out * (size_t)m->R; i++)
            buf[i] = fabs(factor - 1) > 0 ? (float)(m->B[i] * factor) : m->B[i];
        struct cfg_tensor ct = { "", CFG_T_LINEAR, m->layer, m->module, 2, { m->out, m->in } };
        int heads;
        if (gguf_tensor_permuted(c, &ct, &heads))
            gguf_permute_rows(buf, heads, c->head_dim, m->R, 0, tmp);
        gguf_writer_write(w, buf, (size_t)m->out * (size_t)m->R);
    }
    lk_free(buf);
    lk_free(tmp);
    return err->code;
}

int gguf_export_lora(const char *adapter_dir, const char *model_dir, int dtype, const char *out_path,
                     struct gguf_lora_report *rep_in, struct lk_err *err)
{
    struct gguf_lora_report rep_local, *rep = rep_in ? rep_in : &rep_local;
    memset(rep, 0, sizeof *rep);
    *err = (struct lk_err){ 0 }; // the writer's errors are sticky on err: it starts clean
    if (dtype != GGUF_T_F32 && dtype != GGUF_T_F16 && dtype != GGUF_T_BF16 && dtype != GGUF_T_Q8_0)
        return lk_errf(err, LK_ERR_USAGE, "GGUF dtype %d is not one of f32, f16, bf16, q8_0", dtype);
    struct cfg c = { 0 };
    struct lora l = { 0 };
    struct gguf_writer w;
    if (cfg_load(&c, model_dir, err) || gguf_cfg_check(&c, model_dir, err) || lora_load(&l, adapter_dir, &c, err) ||
        lora_refuse(&l, adapter_dir, err)) {
        lora_release(&l);
        cfg_release(&c);
        return err->code;
    }
    float alpha = (float)l.cfg.alpha;
    char name[256], tn[GGUF_MAX_NAME];
    base_name(adapter_dir, name, sizeof name);
    if (gguf_writer_init(&w, out_path, err) == LK_OK) {
        gguf_writer_str(&w, "general.architecture", gguf_arch_name(&c));
        gguf_writer_str(&w, "general.type", "adapter");
        gguf_writer_str(&w, "general.name", name);
        gguf_writer_str(&w, "adapter.type", "lora");
        gguf_writer_f32(&w, "adapter.lora.alpha", alpha);
        gguf_writer_u32(&w, "general.alignment", GGUF_ALIGNMENT);
        gguf_writer_str(&w, "lorakit.version", GGUF_LORAKIT_VERSION);
        for (int k = 0; k < l.n_mod; k++) {
            const struct lora_module *m = &l.mod[k];
            int64_t nea[2] = { m->in, m->R }, neb[2] = { m->R, m->out };
            int ta = dtype == GGUF_T_Q8_0 && m->in % GGUF_QK8_0 ? GGUF_T_F32 : dtype;
            int tb = dtype == GGUF_T_Q8_0 && m->R % GGUF_QK8_0 ? GGUF_T_F32 : dtype;
            snprintf(tn, sizeof tn, "blk.%d.%s.weight.lora_a", m->layer, module_gguf[m->module]);
            gguf_writer_declare(&w, tn, ta, 2, nea);
            snprintf(tn, sizeof tn, "blk.%d.%s.weight.lora_b", m->layer, module_gguf[m->module]);
            gguf_writer_declare(&w, tn, tb, 2, neb);
            double factor = alpha > 0 ? (double)m->scale * m->R / alpha : m->scale;
            rep->n_folded += fabs(factor - 1) > 0;
        }
        gguf_writer_begin(&w);
        lora_write(&w, &l, &c, alpha, err);
        if (err->code)
            gguf_writer_abort(&w);
        else
            gguf_writer_commit(&w);
    }
    rep->n_modules = l.n_mod;
    rep->alpha = alpha;
    if (!err->code)
        rep->bytes = file_bytes(out_path);
    lora_release(&l);
    cfg_release(&c);
    return err->code;
}

// ---- reading a GGUF model back ----

static int load_u32(const struct gguf_file *f, const char *arch, const char *key, int *out, int required,
                    struct lk_err *err)
{
    char k[96];
    uint64_t v;
    snprintf(k, sizeof k, "%s.%s", arch, key);
    if (!required && !gguf_find_kv(f, k))
        return LK_OK;
    if (gguf_get_uint(f, k, &v, err))
        return err->code;
    if (v == 0 || v > (1u << 30))
        return lk_errf(err, LK_ERR_FORMAT, "%s: %s is %llu", f->path, k, (unsigned long long)v);
    *out = (int)v;
    return LK_OK;
}

/* general.architecture: llama, qwen2 or qwen3 (as transformers names them in c). */
static int read_arch(const struct gguf_file *f, struct cfg *c, char *arch, size_t n, struct lk_err *err)
{
    static const struct {
        const char *gguf, *architecture;
        enum cfg_arch arch;
    } archs[] = { { "llama", "LlamaForCausalLM", CFG_ARCH_LLAMA },
                  { "qwen2", "Qwen2ForCausalLM", CFG_ARCH_QWEN2 },
                  { "qwen3", "Qwen3ForCausalLM", CFG_ARCH_QWEN3 } };
    char *a = NULL;
    if (gguf_get_str(f, "general.architecture", &a, err))
        return err->code;
    size_t i = 0, n_archs = sizeof archs / sizeof archs[0];
    while (i < n_archs && strcmp(a, archs[i].gguf))
        i++;
    int rc = i < n_archs ? LK_OK
                         : lk_errf(err, LK_ERR_UNSUPPORTED, "%s: architecture '%.32s' is not supported (llama, qwen2 "
                                   "and qwen3 are)", f->path, a);
    lk_free(a);
    if (rc)
        return rc;
    c->arch = archs[i].arch;
    c->qk_norm = c->arch == CFG_ARCH_QWEN3;
    snprintf(c->architecture, sizeof c->architecture, "%s", archs[i].architecture);
    snprintf(c->model_type, sizeof c->model_type, "%s", archs[i].gguf);
    snprintf(arch, n, "%s", archs[i].gguf);
    return LK_OK;
}

/* A float that must be finite and above lo. */
static int load_float(const struct gguf_file *f, const char *key, double lo, double *out, struct lk_err *err)
{
    if (gguf_get_float(f, key, out, err))
        return err->code;
    if (!isfinite(*out) || !(*out > lo))
        return lk_errf(err, LK_ERR_FORMAT, "%s: %s is %g (must be finite and above %g)", f->path, key, *out, lo);
    return LK_OK;
}

/* Rotary scaling as llama.cpp reads it: {arch}.rope.scaling.type ("linear" when absent) and
 * .factor (or the older rope.scale_linear; 0 or absent: none); type "none" never scales;
 * yarn, longrope and the rest are refused by name. llama3 scaling is a rope_freqs tensor in
 * llama.cpp; lorakit also writes its parameters as lorakit.rope_scaling.* (check_rope_freqs). */
static int read_rope(const struct gguf_file *f, const char *arch, struct cfg *c, struct lk_err *err)
{
    struct cfg_rope_scaling *r = &c->rope_scaling;
    char k[96], *type = NULL;
    double factor = 0;
    int rc = LK_OK;
    snprintf(k, sizeof k, "%s.rope.scaling.type", arch);
    if (gguf_find_kv(f, k) && (rc = gguf_get_str(f, k, &type, err)))
        return rc;
    snprintf(k, sizeof k, "%s.rope.scaling.factor", arch);
    if (!gguf_find_kv(f, k))
        snprintf(k, sizeof k, "%s.rope.scale_linear", arch);
    if (gguf_find_kv(f, k) && (rc = gguf_get_float(f, k, &factor, err)) == LK_OK && (!isfinite(factor) || factor < 0))
        rc = lk_errf(err, LK_ERR_FORMAT, "%s: %s is %g", f->path, k, factor);
    if (!rc && type && strcmp(type, "none") && strcmp(type, "linear"))
        rc = lk_errf(err, LK_ERR_UNSUPPORTED, "%s: rope scaling type '%.32s' is not supported (none and linear are; "
                     "llama3 as rope_freqs)", f->path, type);
    if (!rc && (!type || !strcmp(type, "linear")) && factor != 0 && factor != 1) {
        r->type = CFG_ROPE_LINEAR;
        r->factor = factor;
    }
    lk_free(type);
    type = NULL;
    if (rc || !gguf_find_kv(f, "lorakit.rope_scaling.type"))
        return rc;
    uint64_t orig;
    if (gguf_get_str(f, "lorakit.rope_scaling.type", &type, err))
        return err->code;
    if (strcmp(type, "llama3") || r->type != CFG_ROPE_DEFAULT)
        rc = lk_errf(err, LK_ERR_FORMAT, "%s: lorakit.rope_scaling.type '%.32s' with rope scaling '%s' (only llama3, "
                     "alone, is written there)", f->path, type, cfg_rope_type_name(r->type));
    lk_free(type);
    if (rc || load_float(f, "lorakit.rope_scaling.factor", 0, &r->factor, err) ||
        load_float(f, "lorakit.rope_scaling.low_freq_factor", 0, &r->low_freq_factor, err) ||
        load_float(f, "lorakit.rope_scaling.high_freq_factor", r->low_freq_factor, &r->high_freq_factor, err) ||
        gguf_get_uint(f, "lorakit.rope_scaling.original_max_position_embeddings", &orig, err))
        return err->code;
    if (orig < 1 || orig > (1u << 30))
        return lk_errf(err, LK_ERR_FORMAT, "%s: lorakit.rope_scaling.original_max_position_embeddings is %llu",
                       f->path, (unsigned long long)orig);
    r->type = CFG_ROPE_LLAMA3;
    r->original_max_position_embeddings = (int)orig;
    return LK_OK;
}

/* The hyper-parameters of a GGUF's metadata (checked against its tensors by check_shapes). */
static int gguf_cfg(const struct gguf_file *f, struct cfg *c, struct lk_err *err)
{
    char arch[16], k[96], *type = NULL;
    int rot = 0, vlen = 0;
    cfg_default_qwen2(c);
    const struct gguf_kv *gt = gguf_find_kv(f, "general.type");
    int rc = gt && gt->type == GGUF_VT_STRING ? gguf_get_str(f, "general.type", &type, err) : LK_OK;
    if (!rc && type && strcmp(type, "model"))
        rc = lk_errf(err, LK_ERR_UNSUPPORTED, "%s: general.type is '%.32s', not a model%s", f->path, type,
                     strcmp(type, "adapter") ? "" : " (a GGUF LoRA: llama.cpp applies it to its base with --lora)");
    lk_free(type);
    if (rc || read_arch(f, c, arch, sizeof arch, err))
        return err->code;
    if (load_u32(f, arch, "embedding_length", &c->hidden_size, 1, err) ||
        load_u32(f, arch, "feed_forward_length", &c->intermediate_size, 1, err) ||
        load_u32(f, arch, "block_count", &c->num_hidden_layers, 1, err) ||
        load_u32(f, arch, "attention.head_count", &c->num_attention_heads, 1, err) ||
        load_u32(f, arch, "context_length", &c->max_position_embeddings, 1, err))
        return err->code;
    c->num_key_value_heads = c->num_attention_heads;
    c->head_dim = c->hidden_size / c->num_attention_heads;
    if (load_u32(f, arch, "attention.head_count_kv", &c->num_key_value_heads, 0, err) ||
        load_u32(f, arch, "attention.key_length", &c->head_dim, 0, err))
        return err->code;
    vlen = rot = c->head_dim;
    if (load_u32(f, arch, "attention.value_length", &vlen, 0, err) ||
        load_u32(f, arch, "rope.dimension_count", &rot, 0, err))
        return err->code;
    if (vlen != c->head_dim || rot != c->head_dim)
        return lk_errf(err, LK_ERR_UNSUPPORTED, "%s: key length %d, value length %d, rotary dimensions %d: lorakit "
                       "needs one head size, rotated whole", f->path, c->head_dim, vlen, rot);
    snprintf(k, sizeof k, "%s.rope.freq_base", arch);
    if (load_float(f, k, 0, &c->rope_theta, err))
        return err->code;
    snprintf(k, sizeof k, "%s.attention.layer_norm_rms_epsilon", arch);
    if (load_float(f, k, -1e-30, &c->rms_norm_eps, err))
        return err->code;
    if (c->num_attention_heads % c->num_key_value_heads || c->head_dim % 2)
        return lk_errf(err, LK_ERR_FORMAT, "%s: %d heads, %d kv heads, head size %d do not fit", f->path,
                       c->num_attention_heads, c->num_key_value_heads, c->head_dim);
    return read_rope(f, arch, c, err);
}

/* Shapes of every tensor the config implies, checked in the file (so nothing is sized from
 * the metadata alone); the vocabulary comes from token_embd. */
static int check_shapes(const struct gguf_file *f, struct cfg *c, struct cfg_tensor **ts, int *nt, struct lk_err *err)
{
    const struct gguf_tensor *emb = gguf_find_tensor(f, "token_embd.weight");
    if (!emb || emb->n_dims != 2 || emb->ne[0] != c->hidden_size || emb->ne[1] < 1 || emb->ne[1] > INT32_MAX)
        return lk_errf(err, LK_ERR_FORMAT, "%s: tensor 'token_embd.weight' is missing or not [%d, vocab]", f->path,
                       c->hidden_size);
    c->vocab_size = (int)emb->ne[1];
    c->tie_word_embeddings = gguf_find_tensor(f, "output.weight") == NULL;
    c->attention_bias = c->arch == CFG_ARCH_QWEN2 || gguf_find_tensor(f, "blk.0.attn_q.bias") != NULL;
    // llama: transformers' attention_bias gives q, k, v and o_proj a bias, all four or none
    int obias = gguf_find_tensor(f, "blk.0.attn_output.bias") != NULL;
    if (c->arch == CFG_ARCH_LLAMA && obias != c->attention_bias)
        return lk_errf(err, LK_ERR_UNSUPPORTED, "%s: a llama model with %s: lorakit models LlamaForCausalLM's "
                       "attention_bias, a bias on all four attention projections or on none", f->path,
                       obias ? "a bias on attn_output but none on attn_q" : "biases on attn_q/k/v but none on attn_output");
    snprintf(c->torch_dtype, sizeof c->torch_dtype, "float32");
    if (gguf_cfg_check(c, f->path, err) || cfg_tensors(c, ts, nt, err))
        return err->code;
    char nm[GGUF_MAX_NAME];
    for (int i = 0; i < *nt; i++) {
        const struct cfg_tensor *t = &(*ts)[i];
        LK_ASSERT(gguf_tensor_name(t, nm, sizeof nm) == 0);
        const struct gguf_tensor *g = gguf_find_tensor(f, nm);
        int64_t want0 = t->ndim == 2 ? t->shape[1] : t->shape[0], want1 = t->ndim == 2 ? t->shape[0] : 1;
        if (!g)
            return lk_errf(err, LK_ERR_MISSING, "%s: tensor '%s' is missing", f->path, nm);
        if (g->n_dims != t->ndim || g->ne[0] != want0 || g->ne[1] != want1)
            return lk_errf(err, LK_ERR_SHAPE, "%s: tensor '%s' is [%lld, %lld], the metadata implies [%lld, %lld]",
                           f->path, nm, (long long)g->ne[0], (long long)g->ne[1], (long long)want0, (long long)want1);
        if (g->type != GGUF_T_F32 && g->type != GGUF_T_F16 && g->type != GGUF_T_BF16 && g->type != GGUF_T_Q8_0)
            return lk_errf(err, LK_ERR_UNSUPPORTED, "%s: tensor '%s' has type %s: lorakit reads f32, f16, bf16, q8_0",
                           f->path, nm, gguf_ttype_name(g->type));
    }
    return LK_OK;
}

/* Largest |a_i / b_i - 1| over n values. */
static double max_rel(const float *a, const float *b, int n)
{
    double worst = 0;
    for (int i = 0; i < n; i++)
        worst = fmax(worst, fabs((double)a[i] / b[i] - 1));
    return worst;
}

/* llama3 parameters from rope_freqs factors alone (a file from llama.cpp's converter): the low
 * band's factor is the largest; in the medium band 1/f = (1 - s)/factor + s with
 * s = (orig/wavelen - low)/(high - low), a line in 1/wavelen fitted here with low = 1 (the
 * scaling is unchanged when orig, low and high are multiplied together). Kept only if the
 * parameters reproduce every factor within 1e-4. */
static int fit_llama3(const float *ff, int n, struct cfg *c, float *tmp)
{
    struct cfg_rope_scaling *r = &c->rope_scaling;
    double F = 1, sx = 0, sy = 0, sxx = 0, sxy = 0;
    for (int i = 0; i < n; i++)
        F = fmax(F, ff[i]);
    op_rope_inv_freq(tmp, c->head_dim, c->rope_theta);
    int m = 0;
    for (int i = 0; i < n && F > 1; i++)
        if (ff[i] > 1 + 1e-5 && ff[i] < F * (1 - 1e-5)) { // medium band
            double x = tmp[i] / 6.283185307179586, y = (1 / (double)ff[i] - 1 / F) / (1 - 1 / F);
            sx += x, sy += y, sxx += x * x, sxy += x * y, m++;
        }
    if (m < 2 || !(m * sxx - sx * sx > 0))
        return -1;
    double a = (m * sxy - sx * sy) / (m * sxx - sx * sx), b = (a * sx - sy) / m; // y = a x - b
    if (!(a > 0 && b > 0))
        return -1;
    *r = (struct cfg_rope_scaling){ CFG_ROPE_LLAMA3, F, 1, 1 + 1 / b, (int)lround(a / b) };
    for (int snap = 1; snap >= 0; snap--) { // round numbers first (Llama 3: high_freq_factor 4)
        if (snap)
            r->high_freq_factor = fabs(r->high_freq_factor - round(r->high_freq_factor)) < 1e-3
                                      ? round(r->high_freq_factor) : r->high_freq_factor;
        else
            r->high_freq_factor = 1 + 1 / b;
        if (r->original_max_position_embeddings >= 1 && gguf_rope_freqs(c, tmp) == n && max_rel(tmp, ff, n) <= 1e-4)
            return 0;
    }
    return -1;
}

/* The rope_freqs tensor against the config: equal to the factors of lorakit.rope_scaling, or,
 * in a file without those keys, llama3 parameters recovered from it; else refused. */
static int check_rope_freqs(const struct gguf_file *f, struct cfg *c, struct lk_err *err)
{
    const struct gguf_tensor *t = gguf_find_tensor(f, "rope_freqs.weight");
    int n = c->head_dim / 2, llama3 = c->rope_scaling.type == CFG_ROPE_LLAMA3;
    if (!t && !llama3)
        return LK_OK;
    if (!t)
        return lk_errf(err, LK_ERR_MISSING, "%s: lorakit.rope_scaling.type is llama3 but tensor 'rope_freqs.weight' "
                       "is missing", f->path);
    if (t->type != GGUF_T_F32 || t->n_dims != 1 || t->ne[0] != n)
        return lk_errf(err, LK_ERR_SHAPE, "%s: tensor 'rope_freqs.weight' is not %d float32 values (head size / 2)",
                       f->path, n);
    float *want = lk_falloc((size_t)n, 1);
    if (!want)
        return lk_errf(err, LK_ERR_NOMEM, "out of memory");
    const float *got = (const float *)t->data;
    int rc = LK_OK;
    for (int i = 0; i < n && !rc; i++)
        if (!isfinite(got[i]) || !(got[i] > 0))
            rc = lk_errf(err, LK_ERR_FORMAT, "%s: rope_freqs.weight[%d] is %g", f->path, i, (double)got[i]);
    if (!rc && llama3 && (gguf_rope_freqs(c, want) != n || max_rel(want, got, n) > 1e-6))
        rc = lk_errf(err, LK_ERR_FORMAT, "%s: tensor 'rope_freqs.weight' does not hold the factors of "
                     "lorakit.rope_scaling (llama3)", f->path);
    if (!rc && !llama3 && (c->arch != CFG_ARCH_LLAMA || c->rope_scaling.type != CFG_ROPE_DEFAULT))
        rc = lk_errf(err, LK_ERR_UNSUPPORTED, "%s: tensor 'rope_freqs.weight' on a %s model with rope scaling '%s': "
                     "not supported", f->path, c->model_type, cfg_rope_type_name(c->rope_scaling.type));
    else if (!rc && !llama3 && fit_llama3(got, n, c, want) != 0)
        rc = lk_errf(err, LK_ERR_UNSUPPORTED, "%s: tensor 'rope_freqs.weight' holds per-dimension rotary factors that "
                     "are not llama3 scaling: not supported", f->path);
    lk_free(want);
    return rc;
}

int gguf_model_cfg(const struct gguf_file *f, struct cfg *c, struct cfg_tensor **out_ts, int *out_nt,
                   struct lk_err *err)
{
    struct cfg_tensor *ts = NULL;
    int nt = 0;
    if (out_ts)
        *out_ts = NULL;
    if (gguf_cfg(f, c, err) || check_shapes(f, c, &ts, &nt, err) || check_rope_freqs(f, c, err)) {
        lk_free(ts);
        return err->code;
    }
    if (out_ts) {
        *out_ts = ts;
        *out_nt = nt;
    } else {
        lk_free(ts);
    }
    return LK_OK;
}

int gguf_model_load(struct model *m, const char *path, struct lk_err *err)
{
    memset(m, 0, sizeof *m);
    struct gguf_file f;
    struct cfg c;
    struct cfg_tensor *ts = NULL;
    struct model_tensor *mt = NULL;
    float *tmp = NULL;
    int nt = 0, nm = 0;
    if (gguf_open(&f, path, err))
        return err->code;
    int rc = gguf_model_cfg(&f, &c, &ts, &nt, err);
    if (!rc)
        rc = model_init(m, &c, err);
    if (!rc)
        rc = model_weights_tensors(&m->w, &m->cfg, &mt, &nm, err);
    if (!rc && !(tmp = lk_falloc((size_t)c.head_dim, (size_t)c.hidden_size + 1)))
        rc = lk_errf(err, LK_ERR_NOMEM, "out of memory");
    for (int i = 0; !rc && i < nt; i++) {
        char gname[GGUF_MAX_NAME];
        gguf_tensor_name(&ts[i], gname, sizeof gname);
        const struct gguf_tensor *g = gguf_find_tensor(&f, gname);
        int j = 0, heads;
        while (j < nm && strcmp(mt[j].name, ts[i].name))
            j++;
        LK_ASSERT(j < nm && mt[j].numel == g->numel);
        rc = gguf_tensor_rows_f32(&f, g, 0, (int64_t)(g->numel / (size_t)g->ne[0]), mt[j].data, err);
        if (!rc && gguf_tensor_permuted(&c, &ts[i], &heads))
            gguf_permute_rows(mt[j].data, heads, c.head_dim, ts[i].ndim == 2 ? ts[i].shape[1] : 1, 1, tmp);
    }
    lk_free(tmp);
    lk_free(mt);
    lk_free(ts);
    gguf_close(&f);
    if (rc)
        model_release(m);
    return rc;
}
