/*
 * train.c - the training loop (see train.h): rows (one record each, or packed records),
 * per-epoch permutations from the seed, micro-batches, the global-batch loss normaliser,
 * AdamW over the trainable block, clipping, checkpoints and resumption.
 */
#include "train.h"

#include <cJSON.h>
#include <dirent.h>
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "st.h"
#include "tensor.h"

void train_opts_default(struct train_opts *o)
{
    memset(o, 0, sizeof *o);
    o->epochs = 1;
    o->batch = 4;
    o->grad_accum = 1;
    o->seq = 512;
    o->lr = 2e-4;
    o->loraplus_ratio = 1.0;
    o->schedule = ADAMW_COSINE;
    o->weight_decay = 0.0;
    o->clip = 1.0;
    o->adam.beta1 = 0.9f;
    o->adam.beta2 = 0.999f;
    o->adam.eps = 1e-8f;
    o->seed = 42;
}

// ---- rows ----

/* Row r holds the records ex[start[r] .. start[r] + count[r]) of the data set. */
struct rows {
    int n, T;
    int *start, *count, *ex; /* owned */
};

static void rows_release(struct rows *r)
{
    lk_free(r->start);
    lk_free(r->count);
    lk_free(r->ex);
    memset(r, 0, sizeof *r);
}

static int rows_build(struct rows *r, const struct data_set *d, int seq, int pack, struct lk_err *err)
{
    memset(r, 0, sizeof *r);
    if (d->n == 0)
        return lk_errf(err, LK_ERR_USAGE, "the data set is empty");
    int T = d->max_len < seq ? d->max_len : seq;
    if (pack)
        T = seq < (int)d->n_tokens ? seq : (int)d->n_tokens;
    if (T < 2)
        T = 2;
    r->T = T;
    r->start = lk_malloc(sizeof(int) * (size_t)d->n);
    r->count = lk_malloc(sizeof(int) * (size_t)d->n);
    r->ex = lk_malloc(sizeof(int) * (size_t)d->n);
    if (!r->start || !r->count || !r->ex) {
        rows_release(r);
        return lk_errf(err, LK_ERR_NOMEM, "out of memory");
    }
    int used = 0;
    for (int i = 0; i < d->n; i++) {
        int len = d->ex[i].n < T ? d->ex[i].n : T;
        r->ex[i] = i;
        if (pack && r->n > 0 && used + len <= T) {
            r->count[r->n - 1]++;
            used += len;
            continue;
        }
        r->start[r->n] = i;
        r->count[r->n] = 1;
        r->n++;
        used = len;
    }
    return LK_OK;
}

/* Fills one row: tokens, targets (next-token labels, -100 at record ends and padding), positions
 * and segments. Returns the number of counted targets. */
static int row_fill(const struct rows *r, const struct data_set *d, int row, int *tok, int *tgt,
                    int *pos, int *seg)
{
    int T = r->T, t = 0, counted = 0;
    for (int k = 0; k < r->count[row] && t < T; k++) {
        const struct data_example *e = &d->ex[r->ex[r->start[row] + k]];
        int len = e->n < T - t ? e->n : T - t;
        for (int i = 0; i < len; i++, t++) {
            tok[t] = e->ids[i];
            tgt[t] = i + 1 < len ? e->labels[i + 1] : -100;
            counted += tgt[t] >= 0;
            pos[t] = i;
            seg[t] = k;
        }
    }
    for (; t < T; t++) {
        tok[t] = 0;
        tgt[t] = -100;
        pos[t] = t;
        seg[t] = r->count[row]; // padding: its own segment
    }
    return counted;
}

static void permute(int *p, int n, uint64_t seed, long epoch)
{
    struct lk_rng rng;
    lk_rng_seed(&rng, seed * 0x9E3779B97F4A7C15ull + (uint64_t)epoch + 1);
    for (int i = 0; i < n; i++)
        p[i] = i;
    for (int i = n - 1; i > 0; i--) {
        int j = (int)(lk_rng_u64(&rng) % (uint64_t)(i + 1));
        int t = p[i];
        p[i] = p[j];
        p[j] = t;
    }
}

int train_plan(const struct train_opts *o, const struct data_set *d, struct train_state *st,
               struct lk_err *err)
{
    if (o->batch <= 0 || o->grad_accum <= 0 || o->seq < 2)
        return lk_errf(err, LK_ERR_USAGE, "batch, grad-accum must be positive and seq at least 2");
    struct rows r;
    int rc = rows_build(&r, d, o->seq, o->pack, err);
    if (rc)
        return rc;
    long gb = (long)o->batch * o->grad_accum;
    long spe = (r.n + gb - 1) / gb;
    memset(st, 0, sizeof *st);
    st->rows = r.n;
    st->T = r.T;
    st->total = o->steps > 0 ? o->steps : (long)ceil(o->epochs * (double)spe);
    if (st->total < 1)
        st->total = 1;
    rows_release(&r);
    return LK_OK;
}

// ---- checkpoints ----

static int write_state(const char *dir, long step, const struct train_opts *o, long total,
                       double loss, struct lk_err *err)
{
    char *p = lk_path_join(dir, "trainer_state.json");
    if (!p)
        return lk_errf(err, LK_ERR_NOMEM, "out of memory");
    char buf[512];
    int n = snprintf(buf, sizeof buf,
                     "{\n  \"step\": %ld,\n  \"total_steps\": %ld,\n  \"seed\": %llu,\n"
                     "  \"loss\": %.9g\n}\n",
                     step, total, (unsigned long long)o->seed, isfinite(loss) ? loss : 0.0);
    int rc = lk_write_file_atomic(p, buf, (size_t)n, err);
    lk_free(p);
    return rc;
}

static int write_moments(const char *dir, const float *mo, const float *vo, size_t n, struct lk_err *err)
{
    char *p = lk_path_join(dir, "optimizer.safetensors");
    if (!p)
        return lk_errf(err, LK_ERR_NOMEM, "out of memory");
    struct st_item items[2] = { { "exp_avg", 1, { (int64_t)n }, mo }, { "exp_avg_sq", 1, { (int64_t)n }, vo } };
    int rc = st_write_f32(p, items, 2, TENSOR_F32, err);
    lk_free(p);
    return rc;
}

/* Removes a checkpoint folder so that a crash midway never leaves a partial checkpoint-N behind:
 * first renamed to a hidden temporary name (atomic), then deleted. */
static void checkpoint_remove(const char *ckpt_dir, const char *path)
{
    char old[4200];
    snprintf(old, sizeof old, "%s/.checkpoint-old.tmp.%ld", ckpt_dir, (long)getpid());
    lk_rm_rf(old);
    if (rename(path, old) == 0)
        lk_rm_rf(old);
    else if (errno != ENOENT)
        lk_rm_rf(path);
}

/* Writes ckpt_dir/checkpoint-<step> through a temporary folder renamed into place; removes the
 * previous checkpoint afterwards. */
static int checkpoint_save(const struct train_opts *o, struct model *m, const struct lora *lora,
                           const float *mo, const float *vo, size_t n, long step, long total,
                           double loss, char *out_path, size_t out_n, struct lk_err *err)
{
    char tmp[4096], fin[4096];
    snprintf(tmp, sizeof tmp, "%s/.checkpoint-%ld.tmp.%ld", o->ckpt_dir, step, (long)getpid());
    snprintf(fin, sizeof fin, "%s/checkpoint-%ld", o->ckpt_dir, step);
    lk_rm_rf(tmp);
    int rc = lk_mkdir_p(tmp, err);
    if (!rc)
        rc = lora ? lora_save(lora, tmp, err) : model_save(m, tmp, TENSOR_F32, err);
    if (!rc)
        rc = write_moments(tmp, mo, vo, n, err);
    if (!rc)
        rc = write_state(tmp, step, o, total, loss, err);
    if (!rc) {
        lk_fsync_dir(tmp);
        checkpoint_remove(o->ckpt_dir, fin);
        if (rename(tmp, fin) != 0)
            rc = lk_errf(err, LK_ERR_IO, "%s: cannot rename checkpoint into place: %s", fin, strerror(errno));
        else
            lk_fsync_dir(o->ckpt_dir);
    }
    if (rc) {
        lk_rm_rf(tmp);
        return rc;
    }
    // keep only the newest checkpoint
    if (out_path && out_path[0] && strcmp(out_path, fin))
        checkpoint_remove(o->ckpt_dir, out_path);
    if (out_path)
        snprintf(out_path, out_n, "%s", fin);
    return LK_OK;
}

/* DIR is a checkpoint folder, or a folder holding checkpoint-N folders (the newest is used). */
static int checkpoint_find(const char *dir, char *out, size_t n, struct lk_err *err)
{
    char probe[4400];
    snprintf(probe, sizeof probe, "%s/trainer_state.json", dir);
    if (lk_file_exists(probe)) {
        snprintf(out, n, "%s", dir);
        return LK_OK;
    }
    DIR *dp = opendir(dir);
    if (!dp)
        return lk_errf(err, LK_ERR_MISSING, "%s: no such checkpoint folder", dir);
    long best = -1;
    struct dirent *e;
    while ((e = readdir(dp))) {
        char *end;
        if (strncmp(e->d_name, "checkpoint-", 11))
            continue;
        long s = strtol(e->d_name + 11, &end, 10);
        if (end != e->d_name + 11 && !*end && s > best)
            best = s;
    }
    closedir(dp);
    if (best < 0)
        return lk_errf(err, LK_ERR_MISSING, "%s: no checkpoint found (expected trainer_state.json or "
                       "checkpoint-N folders)", dir);
    snprintf(out, n, "%s/checkpoint-%ld", dir, best);
    return LK_OK;
}

static int checkpoint_load(const char *dir, struct model *m, struct lora *lora, float *mo, float *vo,
                           size_t n, long *out_step, struct lk_err *err)
{
    char path[4400];
    char *text = NULL;
    snprintf(path, sizeof path, "%s/trainer_state.json", dir);
    int rc = lk_read_file(path, &text, NULL, err);
    if (rc)
        return rc;
    cJSON *o = cJSON_Parse(text);
    lk_free(text);
    const cJSON *s = o ? cJSON_GetObjectItemCaseSensitive(o, "step") : NULL;
    if (!cJSON_IsNumber(s) || s->valuedouble < 0) {
        cJSON_Delete(o);
        return lk_errf(err, LK_ERR_FORMAT, "%s: missing or bad 'step'", path);
    }
    *out_step = (long)s->valuedouble;
    cJSON_Delete(o);
    // parameters
    if (lora) {
        struct lora saved;
        if ((rc = lora_load(&saved, dir, &m->cfg, err)))
            return rc;
        if (saved.n != lora->n) {
            lora_release(&saved);
            return lk_errf(err, LK_ERR_SHAPE, "%s: checkpoint adapter does not match this run's adapter "
                           "(rank or targets differ)", dir);
        }
        memcpy(lora->mem, saved.mem, sizeof(float) * lora->n);
        lora_release(&saved);
    } else {
        struct model saved;
        if ((rc = model_load(&saved, dir, err)))
            return rc;
        if (saved.w.n != m->w.n) {
            model_release(&saved);
            return lk_errf(err, LK_ERR_SHAPE, "%s: checkpoint model does not match this run's model", dir);
        }
        memcpy(m->w.mem, saved.w.mem, sizeof(float) * m->w.n);
        model_release(&saved);
    }
    // moments
    snprintf(path, sizeof path, "%s/optimizer.safetensors", dir);
    struct st_file f;
    if ((rc = st_open(&f, path, err)))
        return rc;
    const struct st_tensor *tm = st_find(&f, "exp_avg"), *tv = st_find(&f, "exp_avg_sq");
    if (!tm || !tv || tm->numel != n || tv->numel != n || tm->dtype != TENSOR_F32 || tv->dtype != TENSOR_F32)
        rc = lk_errf(err, LK_ERR_FORMAT, "%s: optimizer moments missing or of the wrong size", path);
    else {
        memcpy(mo, tm->data, sizeof(float) * n);
        memcpy(vo, tv->data, sizeof(float) * n);
    }
    st_close(&f);
    return rc;
}

// ---- evaluation ----

int train_eval_loss(struct model *m, const struct lora *lora, const struct data_set *d, int batch,
                    double *out_loss, struct lk_err *err)
{
    struct rows r;
    int rc = rows_build(&r, d, m->T > 0 ? m->T : d->max_len, 0, err);
    if (rc)
        return rc;
    if (!m->acts || m->T < r.T || m->B < 1)
        rc = model_plan(m, batch, r.T, 0, err);
    if (rc) {
        rows_release(&r);
        return rc;
    }
    int B = m->B, T = m->T;
    size_t BT = (size_t)B * T;
    int *tok = lk_malloc(sizeof(int) * 4 * BT);
    if (!tok) {
        rows_release(&r);
        return lk_errf(err, LK_ERR_NOMEM, "out of memory");
    }
    int *tgt = tok + BT, *pos = tok + 2 * BT, *seg = tok + 3 * BT;
    struct rows rr = r;
    rr.T = T;
    double sum = 0;
    long count = 0;
    int was_train = m->train;
    m->train = 0; // no dropout, logits kept (the activation plan stays as it is)
    for (int i = 0; i < r.n && !rc; i += B) {
        for (int b = 0; b < B; b++) {
            if (i + b < r.n)
                count += row_fill(&rr, d, i + b, tok + b * T, tgt + b * T, pos + b * T, seg + b * T);
            else
                for (int t = 0; t < T; t++) {
                    tok[b * T + t] = 0;
                    tgt[b * T + t] = -100;
                }
        }
        double l;
        rc = model_forward(m, lora, tok, NULL, NULL, tgt, 1.0f, &l, err);
        sum += l;
    }
    m->train = was_train;
    lk_free(tok);
    rows_release(&r);
    if (!rc)
        *out_loss = count ? sum / (double)count : NAN;
    return rc;
}

// ---- the loop ----

static uint64_t mix(uint64_t a, uint64_t b)
{
    uint64_t z = a * 0x9E3779B97F4A7C15ull ^ (b + 0x632BE59BD9B4E019ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

/* The loop's state: the rows and their order, one micro-batch of ids, the gradient block and
 * AdamW's moments (all of the trainable block's size and layout). */
struct loop {
    struct rows r;
    const struct train_dist *dist; /* NULL: one process */
    int rank, nranks;
    int B, T;                 /* this rank's micro-batch rows, row length */
    long gb, spe;             /* rows per global batch, steps per epoch */
    float *P;                 /* borrowed: the trainable block (lora->mem or the weights) */
    size_t n;                 /* floats in it */
    float *grad, *mo, *vo;    /* owned (grad: gw.mem for a full fine-tune) */
    struct model_weights gw;  /* full fine-tune: the gradient block with the weights' layout */
    struct model_tensor *mt;  /* owned: full fine-tune, the named tensors of the block */
    int n_mt;
    int *perm, *ibuf;         /* owned: the epoch's order; tok, tgt, pos, seg of one micro-batch */
    char last_ckpt[4096];     /* the newest checkpoint folder, or "" */
};

static void loop_release(struct loop *x, const struct lora *lora)
{
    if (lora)
        lk_free(x->grad);
    model_weights_release(&x->gw);
    lk_free(x->mo);
    lk_free(x->vo);
    lk_free(x->perm);
    lk_free(x->ibuf);
    lk_free(x->mt);
    rows_release(&x->r);
}

static int loop_init(struct loop *x, const struct train_opts *o, struct model *m, const struct lora *lora,
                     const struct data_set *d, struct lk_err *err)
{
    memset(x, 0, sizeof *x);
    int rc = rows_build(&x->r, d, o->seq, o->pack, err);
    if (rc)
        return rc;
    x->dist = o->dist && o->dist->size > 1 ? o->dist : NULL;
    x->rank = x->dist ? x->dist->rank : 0;
    x->nranks = x->dist ? x->dist->size : 1;
    // --batch is global: each rank runs micro-batches of batch / size rows (rounded up)
    x->B = (o->batch + x->nranks - 1) / x->nranks;
    x->T = x->r.T;
    x->gb = (long)o->batch * o->grad_accum;
    x->spe = (x->r.n + x->gb - 1) / x->gb;
    if (!lora && (m->w.dtype != TENSOR_F32 || m->w.n_own))
        return lk_errf(err, LK_ERR_USAGE, "a full fine-tune trains float32 master weights: load the model "
                       "in float32 (model_load)");
    x->P = lora ? lora->mem : m->w.mem;
    x->n = lora ? lora->n : m->w.n;
    size_t BT = (size_t)x->B * x->T;
    x->mo = lk_calloc(x->n, sizeof(float));
    x->vo = lk_calloc(x->n, sizeof(float));
    x->perm = lk_malloc(sizeof(int) * (size_t)x->r.n);
    x->ibuf = lk_malloc(sizeof(int) * 4 * BT);
    if (lora)
        x->grad = lk_calloc(x->n, sizeof(float));
    if (!x->mo || !x->vo || !x->perm || !x->ibuf || (lora && !x->grad))
        return lk_errf(err, LK_ERR_NOMEM, "out of memory: optimizer state for %zu parameters", x->n);
    if (!lora) {
        // the full fine-tune's gradient block has the weights' layout: a weights struct over it
        if ((rc = model_weights_alloc(&x->gw, &m->cfg, err)))
            return rc;
        x->grad = x->gw.mem;
        if ((rc = model_weights_tensors(&m->w, &m->cfg, &x->mt, &x->n_mt, err)))
            return rc;
    }
    return model_plan(m, x->B, x->T, 1, err);
}

/* Restores the step, the trainable block and the moments from a checkpoint. */
static int loop_resume(struct loop *x, const struct train_opts *o, struct model *m, struct lora *lora,
                       const char *resume_dir, const struct train_state *st, long *step, struct lk_err *err)
{
    char dir[4096];
    int rc = checkpoint_find(resume_dir, dir, sizeof dir, err);
    if (!rc)
        rc = checkpoint_load(dir, m, lora, x->mo, x->vo, x->n, step, err);
    if (rc)
        return rc;
    if (*step > st->total)
        return lk_errf(err, LK_ERR_USAGE, "%s: checkpoint is at step %ld, past this run's %ld steps", dir, *step,
                       st->total);
    if (o->ckpt_dir)
        snprintf(x->last_ckpt, sizeof x->last_ckpt, "%s", dir);
    return LK_OK;
}

/* One step's gradient into x->grad (summed over ranks): 1. the normaliser, every counted target
 * of the global batch; 2. micro-batches over this rank's contiguous share [lo, hi) of it.
 * *out_loss is the step's mean token loss; *out_rows the rows of the global batch. */
static int step_gradient(struct loop *x, const struct train_opts *o, struct model *m, const struct lora *lora,
                         const struct data_set *d, long step, double *out_loss, int *out_rows, long *tokens,
                         struct lk_err *err)
{
    int B = x->B, T = x->T;
    size_t BT = (size_t)B * T;
    int *tok = x->ibuf, *tgt = x->ibuf + BT, *pos = x->ibuf + 2 * BT, *seg = x->ibuf + 3 * BT;
    long idx = step % x->spe;
    int first = (int)(idx * x->gb), last = first + (int)x->gb > x->r.n ? x->r.n : first + (int)x->gb;
    long count = 0;
    for (int i = first; i < last; i++)
        count += row_fill(&x->r, d, x->perm[i], tok, tgt, pos, seg);
    memset(x->grad, 0, sizeof(float) * x->n);
    double sum = 0;
    int share = (last - first + x->nranks - 1) / x->nranks;
    int lo = first + x->rank * share, hi = lo + share > last ? last : lo + share;
    if (lo > hi)
        lo = hi;
    for (int mb = 0; mb * B < hi - lo; mb++) {
        for (int b = 0; b < B; b++) {
            int i = lo + mb * B + b;
            if (i < hi)
                row_fill(&x->r, d, x->perm[i], tok + b * T, tgt + b * T, pos + b * T, seg + b * T);
            else
                for (int t = 0; t < T; t++) {
                    tok[b * T + t] = 0;
                    tgt[b * T + t] = -100;
                    pos[b * T + t] = t;
                    seg[b * T + t] = 0;
                }
        }
        m->dropout_seed = mix(mix(o->seed, (uint64_t)step), (uint64_t)mb);
        double l;
        int rc = model_forward(m, lora, tok, o->pack ? pos : NULL, o->pack ? seg : NULL, tgt,
                               count ? 1.0f / (float)count : 0.0f, &l, err);
        if (rc)
            return rc;
        model_backward(m, lora, lora ? x->grad : NULL, lora ? NULL : &x->gw);
        sum += l;
        *tokens += (long)BT;
    }
    if (x->dist) {
        int rc = x->dist->allreduce_sum(x->dist->ctx, x->grad, x->n, &sum, 1, err);
        if (rc)
            return rc;
    }
    *out_loss = count ? sum / (double)count : 0.0;
    *out_rows = last - first;
    return LK_OK;
}

/* 3. AdamW on every trainable tensor at learning rate lr (LoRA+: B, the magnitudes and lora_B
 * biases at ratio x lr; no weight decay on biases and norms), step t (1-based). */
static void step_update(struct loop *x, const struct train_opts *o, const struct lora *lora, double lr, long t)
{
    float *P = x->P, *g = x->grad, *mo = x->mo, *vo = x->vo;
    float wd = (float)o->weight_decay, lr_b = (float)(lr * o->loraplus_ratio);
    if (!lora) {
        // transformers' Trainer default: no decay on biases and norms
        for (int k = 0; k < x->n_mt; k++) {
            size_t off = (size_t)(x->mt[k].data - P);
            int decay = !x->mt[k].is_bias && x->mt[k].ndim == 2;
            adamw_step(&o->adam, x->mt[k].data, g + off, mo + off, vo + off, x->mt[k].numel, (float)lr,
                       decay ? wd : 0.0f, t);
        }
        return;
    }
    for (int k = 0; k < lora->n_mod; k++) {
        struct lora_module *md = &lora->mod[k];
        size_t na = (size_t)md->R * md->in, nb = (size_t)md->out * md->R;
        size_t oa = (size_t)(md->A - P), ob = (size_t)(md->B - P);
        adamw_step(&o->adam, md->A, g + oa, mo + oa, vo + oa, na, (float)lr, wd, t);
        adamw_step(&o->adam, md->B, g + ob, mo + ob, vo + ob, nb, lr_b, wd, t);
        if (md->mag) { // PEFT's LoRA+ puts 1-D adapter parameters (the magnitudes) with B
            size_t om = (size_t)(md->mag - P);
            adamw_step(&o->adam, md->mag, g + om, mo + om, vo + om, (size_t)md->out, lr_b, wd, t);
        }
        if (md->bias) {
            size_t oc = (size_t)(md->bias - P);
            adamw_step(&o->adam, md->bias, g + oc, mo + oc, vo + oc, (size_t)md->out, lr_b, 0.0f, t);
        }
    }
}

/* 4. After step (0-based) was taken: held-out loss, progress, checkpoints; LK_ERR_INTERRUPTED
 * once every rank has seen SIGINT/SIGTERM (after the checkpoint). */
static int step_after(struct loop *x, const struct train_opts *o, struct model *m, const struct lora *lora,
                      const struct data_set *eval, const struct train_hooks *h, struct train_state *st,
                      struct train_progress *p, long step, struct lk_err *err)
{
    int rc;
    int want_eval = eval && eval->n && ((o->eval_every && (step + 1) % o->eval_every == 0) || step + 1 == st->total);
    if (want_eval) {
        if ((rc = train_eval_loss(m, lora, eval, x->B, &p->eval_loss, err)))
            return rc;
        st->last_eval_loss = p->eval_loss;
    }
    if (h && h->on_step)
        h->on_step(h->ctx, p);
    int stop = lk_interrupted;
    if (x->dist) { // every rank stops together when any of them was interrupted
        double flag = stop;
        if ((rc = x->dist->allreduce_sum(x->dist->ctx, NULL, 0, &flag, 1, err)))
            return rc;
        stop = flag > 0;
    }
    if (x->rank == 0 && o->ckpt_dir && ((o->save_every && (step + 1) % o->save_every == 0) || stop)) {
        if ((rc = checkpoint_save(o, m, lora, x->mo, x->vo, x->n, step + 1, st->total, p->loss, x->last_ckpt,
                                  sizeof x->last_ckpt, err)))
            return rc;
        if (h && h->on_checkpoint)
            h->on_checkpoint(h->ctx, step + 1, x->last_ckpt);
    }
    if (stop)
        return lk_errf(err, LK_ERR_INTERRUPTED, "interrupted at step %ld%s%s", step + 1,
                       x->last_ckpt[0] ? "; resume from " : "", x->last_ckpt);
    return LK_OK;
}

/* The gradient of the first step, written to o->dump_grads (rank 0) instead of a step. */
static int dump_grads(struct loop *x, const struct train_opts *o, struct model *m, const struct lora *lora,
                      struct lk_err *err)
{
    if (x->rank != 0)
        return LK_OK;
    return lora ? lora_save_tensors(lora, x->grad, o->dump_grads, err)
                : model_weights_save_st(&x->gw, &m->cfg, o->dump_grads, TENSOR_F32, err);
}

int train_run(const struct train_opts *o, struct model *m, struct lora *lora,
              const struct data_set *d, const struct data_set *eval, const char *resume_dir,
              const struct train_hooks *h, struct train_state *st, struct lk_err *err)
{
    struct loop x;
    int rc = train_plan(o, d, st, err);
    if (rc)
        return rc;
    long step = 0;
    if ((rc = loop_init(&x, o, m, lora, d, err)) || (resume_dir && (rc = loop_resume(&x, o, m, lora, resume_dir, st,
                                                                                       &step, err)))) {
        loop_release(&x, lora);
        return rc;
    }
    long cur_epoch = -1, tokens = 0, tokens_after_first = 0, step0 = step;
    double t0 = lk_now(), t_first = 0;
    st->first_loss = NAN;
    for (; step < st->total && !rc; step++) {
        if (step / x.spe != cur_epoch) {
            cur_epoch = step / x.spe;
            permute(x.perm, x.r.n, o->seed, cur_epoch);
        }
        double ts = lk_now(), loss;
        int rows;
        if ((rc = step_gradient(&x, o, m, lora, d, step, &loss, &rows, &tokens, err)))
            break;
        double gnorm = adamw_grad_norm(x.grad, x.n);
        if (o->dump_grads) {
            st->last_loss = loss;
            rc = dump_grads(&x, o, m, lora, err);
            break;
        }
        if (!isfinite(loss) || !isfinite(gnorm)) {
            rc = lk_errf(err, LK_ERR_NUMERIC, "step %ld: the %s is not finite (%g); stopping%s%s", step + 1,
                         isfinite(loss) ? "gradient norm" : "loss", isfinite(loss) ? gnorm : loss,
                         x.last_ckpt[0] ? ", the last good checkpoint is " : "", x.last_ckpt);
            break;
        }
        if (o->clip > 0 && gnorm > o->clip) {
            float c = (float)(o->clip / gnorm);
            for (size_t i = 0; i < x.n; i++)
                x.grad[i] *= c;
        }
        double lr = adamw_lr(o->schedule, o->lr, step, o->warmup, st->total);
        step_update(&x, o, lora, lr, step + 1);
        if (isnan(st->first_loss))
            st->first_loss = loss;
        if (step == step0)
            t_first = lk_now();
        else {
            tokens_after_first += (long)rows * x.T;
            st->tokens_per_s = (double)tokens_after_first / (lk_now() - t_first);
        }
        st->last_loss = loss;
        st->step = step + 1;
        double now = lk_now();
        struct train_progress p = { step + 1, st->total, loss, lr, gnorm, 0, now - t0, NAN, tokens };
        p.tokens_per_s = (double)rows * x.T / (now - ts > 1e-9 ? now - ts : 1e-9);
        rc = step_after(&x, o, m, lora, eval, h, st, &p, step, err);
    }
    loop_release(&x, lora);
    return rc;
}
