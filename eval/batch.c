/*
 * batch.c - the eval harness's batched path (see batch.h): cells and texts run as sequences, B at
 * a time, through gen_batch_forward.
 *
 * A sequence ("job") has a prompt, continuations to score from the prompt's end (the reference
 * answer, each choice, a text) and optionally a greedy answer to decode. Its slot holds its KV
 * cache and walks it through the stages: prompt (chunks of EV_CHUNK from position 0; the last
 * chunk leaves the next-token logits), each continuation (chunks of EV_CHUNK from the prompt's
 * end, every token's log-probability of the next; the cache rewound to the prompt afterwards),
 * then decoding (one token per step, greedy, the stop rules of gen_continue). This is the order
 * and the chunking of the one-at-a-time path, so each sequence gets the same logits.
 *
 * A step takes one token of every decoding slot and then chunks of the others, round robin, up to
 * EV_BATCH_ROWS tokens; the runs of each model go through one gen_batch_forward (the base and
 * every adapter on it share a pass). Jobs come model by model, so a step rarely mixes models.
 * When a slot's job finishes, its results are written and the slot takes the next job.
 * Owns: the slots (caches, logits) and the jobs in flight.
 */
#include "batch.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* Tokens per step at most. Prefill and scoring dominate an eval on a large model (hundreds of
 * reference tokens per cell against 32 generated): big GEMMs keep them near the sgemm peak, and
 * the widening of bf16 weights is paid once per 512 tokens instead of once per 64. */
#define EV_BATCH_ROWS 512

enum { ST_PROMPT, ST_CONT, ST_DECODE, ST_DONE };

struct ev_job {
    int item, mode;          /* the cell (item, mode), or the text (item, model: 0 the base, 1 + s) */
    const struct model *m;   /* borrowed */
    const struct lora *lora; /* borrowed, or NULL */
    struct tok_ids prompt;
    struct tok_ids *conts;   /* owned [n_cont] */
    int n_cont;
    int *n_tok;              /* owned [n_cont]: tokens scored of each (0: not scored) */
    double *ll;              /* owned [n_cont]: their summed log-likelihoods */
    int max_new;             /* answer tokens to decode (0: none) */
    struct tok_ids gen;      /* the answer's ids */
    double seconds;          /* preparation, share of the steps, finishing */
};

struct ev_slot {
    int busy;
    struct ev_job job;
    int stage, c, pos;       /* stage; continuation being scored; tokens of the stage's segment run */
    int planned;             /* tokens of the segment in the step being built */
    double lp0;              /* log p(first token of continuation c | prompt) */
    int32_t next;            /* decoding: the token to run */
    struct gen_seq seq;
    float *saved, *logits;   /* owned [V]: next-token logits after the prompt; after a decoded token */
    double *lp;              /* owned [lp_cap]: log-probabilities of a continuation's tokens 1.. */
    int lp_cap;
    int rows;                /* tokens in the current step */
};

/* Where the jobs come from and where their results go. */
struct ev_src {
    /* The next job (1), none left (0), or an error (< 0, err filled). */
    int (*next)(struct ev_src *src, struct ev_job *job, struct lk_err *err);
    /* Writes a finished job's results. */
    int (*finish)(struct ev_src *src, const struct ev_job *job, struct lk_err *err);
    const struct ev_config *c;
    int done, total;         /* jobs finished, jobs in all */
};

struct ev_sched {
    const struct ev_config *c;
    struct gen_batch gb;
    struct ev_slot *slots;   /* owned [B] */
    int B, V, nv, start;
    int32_t eos;
    struct gen_brun *runs, *sub; /* owned [EV_BATCH_ROWS] */
    int *run_slot;           /* owned [EV_BATCH_ROWS] */
};

static void job_release(struct ev_job *j)
{
    tok_ids_release(&j->prompt);
    for (int i = 0; j->conts && i < j->n_cont; i++)
        tok_ids_release(&j->conts[i]);
    lk_free(j->conts);
    lk_free(j->n_tok);
    lk_free(j->ll);
    tok_ids_release(&j->gen);
    memset(j, 0, sizeof *j);
}

/* Room for n continuations in a fresh job. */
static int job_conts(struct ev_job *j, int n, struct lk_err *err)
{
    j->conts = lk_calloc((size_t)n, sizeof *j->conts);
    j->n_tok = lk_calloc((size_t)n, sizeof *j->n_tok);
    j->ll = lk_calloc((size_t)n, sizeof *j->ll);
    if (!j->conts || !j->n_tok || !j->ll)
        return lk_errf(err, LK_ERR_NOMEM, "out of memory");
    j->n_cont = n;
    return LK_OK;
}

// ---- the scheduler ----

static int sched_init(struct ev_sched *s, const struct ev_config *c, int max_rank, struct lk_err *err)
{
    memset(s, 0, sizeof *s);
    if (c->batch < 2 || c->batch > EV_BATCH_MAX)
        return lk_errf(err, LK_ERR_USAGE, "a batch of %d sequences: give 2 to %d", c->batch, EV_BATCH_MAX);
    s->c = c;
    s->B = c->batch;
    s->V = c->base->cfg.vocab_size;
    int n = (int)tok_vocab_size(c->tk);
    s->nv = n > 0 && n < s->V ? n : s->V;
    s->eos = tok_eos(c->tk) >= 0 ? tok_eos(c->tk) : c->base->cfg.eos_token_id;
    int rc = gen_batch_init(&s->gb, &c->base->cfg, EV_BATCH_ROWS, max_rank, err);
    if (rc)
        return rc;
    s->slots = lk_calloc((size_t)s->B, sizeof *s->slots);
    s->runs = lk_calloc(EV_BATCH_ROWS, sizeof *s->runs);
    s->sub = lk_calloc(EV_BATCH_ROWS, sizeof *s->sub);
    s->run_slot = lk_calloc(EV_BATCH_ROWS, sizeof *s->run_slot);
    if (!s->slots || !s->runs || !s->sub || !s->run_slot)
        return lk_errf(err, LK_ERR_NOMEM, "out of memory");
    for (int i = 0; i < s->B; i++) {
        s->slots[i].saved = lk_falloc((size_t)s->V, 1);
        s->slots[i].logits = lk_falloc((size_t)s->V, 1);
        if (!s->slots[i].saved || !s->slots[i].logits)
            return lk_errf(err, LK_ERR_NOMEM, "out of memory: %d sequences of %d logits", s->B, s->V);
    }
    return LK_OK;
}

static void sched_release(struct ev_sched *s)
{
    for (int i = 0; s->slots && i < s->B; i++) {
        struct ev_slot *sl = &s->slots[i];
        job_release(&sl->job);
        gen_seq_release(&sl->seq);
        lk_free(sl->saved);
        lk_free(sl->logits);
        lk_free(sl->lp);
    }
    lk_free(s->slots);
    lk_free(s->runs);
    lk_free(s->sub);
    lk_free(s->run_slot);
    gen_batch_release(&s->gb);
    memset(s, 0, sizeof *s);
}

/* A decoded token: the stop rules of gen_continue (greedy). */
static int slot_token(struct ev_sched *s, struct ev_slot *sl, int32_t id, struct lk_err *err)
{
    const struct chat_fmt *fmt = s->c->fmt;
    if ((fmt && chat_is_stop(fmt, id)) || (s->eos >= 0 && id == s->eos)) {
        sl->stage = ST_DONE;
        return LK_OK;
    }
    int rc = tok_ids_push(&sl->job.gen, id, err);
    if (rc)
        return rc;
    if ((int)sl->job.gen.n >= sl->job.max_new)
        sl->stage = ST_DONE;
    sl->next = id;
    return LK_OK;
}

/* From the prompt's end: the next continuation with tokens to run (continuations of one token
 * need only the prompt's logits), then decoding, then done. */
static int slot_conts(struct ev_sched *s, struct ev_slot *sl, int from, struct lk_err *err)
{
    struct ev_job *j = &sl->job;
    for (int c = from; c < j->n_cont; c++) {
        if (j->n_tok[c] <= 0)
            continue;
        sl->lp0 = gen_logprob(sl->saved, s->V, j->conts[c].v[0]);
        if (j->n_tok[c] == 1) {
            j->ll[c] = sl->lp0;
            continue;
        }
        sl->stage = ST_CONT;
        sl->c = c;
        sl->pos = 0;
        return LK_OK;
    }
    if (j->max_new <= 0) {
        sl->stage = ST_DONE;
        return LK_OK;
    }
    sl->stage = ST_DECODE;
    return slot_token(s, sl, gen_argmax(sl->saved, s->nv), err);
}

/* Tokens the slot's stage still has to run, beyond what this step already takes. */
static int slot_left(const struct ev_slot *sl)
{
    if (sl->stage == ST_PROMPT)
        return (int)sl->job.prompt.n - sl->pos - sl->planned;
    if (sl->stage == ST_CONT)
        return sl->job.n_tok[sl->c] - 1 - sl->pos - sl->planned;
    return 0;
}

/* The slot's next chunk as a run. */
static struct gen_brun slot_chunk(struct ev_slot *sl, int k)
{
    struct ev_job *j = &sl->job;
    int at = sl->pos + sl->planned;
    struct gen_brun r = { &sl->seq, j->lora, NULL, k, NULL, 0, NULL, NULL };
    if (sl->stage == ST_PROMPT) {
        r.tokens = j->prompt.v + at;
        if (at + k == (int)j->prompt.n)
            r.logits = sl->saved; // the prompt's last token: the next-token logits
    } else {
        r.tokens = j->conts[sl->c].v + at;
        r.targets = r.tokens + 1;
        r.lp = sl->lp + at;
    }
    return r;
}

/* The runs of one step: a token of every decoding slot, then chunks round robin. */
static int sched_plan(struct ev_sched *s)
{
    int nr = 0, rows = 0;
    for (int i = 0; i < s->B; i++) {
        struct ev_slot *sl = &s->slots[i];
        sl->planned = sl->rows = 0;
        if (!sl->busy || sl->stage != ST_DECODE)
            continue;
        struct gen_brun r = { &sl->seq, sl->job.lora, &sl->next, 1, sl->logits, 0, NULL, NULL };
        s->run_slot[nr] = i;
        s->runs[nr++] = r;
        sl->rows = 1;
        rows++;
    }
    for (int more = 1; more;) {
        more = 0;
        for (int k = 0; k < s->B; k++) {
            int i = (s->start + k) % s->B;
            struct ev_slot *sl = &s->slots[i];
            int left = sl->busy ? slot_left(sl) : 0, n = left < EV_CHUNK ? left : EV_CHUNK;
            if (n <= 0 || rows + n > EV_BATCH_ROWS)
                continue;
            s->run_slot[nr] = i;
            s->runs[nr++] = slot_chunk(sl, n);
            sl->planned += n;
            sl->rows += n;
            rows += n;
            more = 1;
        }
    }
    s->start = (s->start + 1) % s->B;
    return nr;
}

/* Runs the step's runs, model by model (runs of one sequence keep their order). */
static int sched_forward(struct ev_sched *s, int nr, struct lk_err *err)
{
    int rc = LK_OK;
    for (int a = 0; a < nr && !rc; a++) {
        const struct model *m = s->slots[s->run_slot[a]].job.m;
        int seen = 0;
        for (int b = 0; b < a && !seen; b++)
            seen = s->slots[s->run_slot[b]].job.m == m;
        if (seen)
            continue;
        int ns = 0;
        for (int b = a; b < nr; b++)
            if (s->slots[s->run_slot[b]].job.m == m)
                s->sub[ns++] = s->runs[b];
        rc = gen_batch_forward(&s->gb, m, s->sub, ns, err);
    }
    return rc;
}

/* After a step: each slot that ran moves on. */
static int sched_advance(struct ev_sched *s, struct lk_err *err)
{
    int rc = LK_OK;
    for (int i = 0; i < s->B && !rc; i++) {
        struct ev_slot *sl = &s->slots[i];
        if (!sl->busy || !sl->rows)
            continue;
        struct ev_job *j = &sl->job;
        if (sl->stage == ST_DECODE) {
            rc = slot_token(s, sl, gen_argmax(sl->logits, s->nv), err);
            continue;
        }
        sl->pos += sl->planned;
        if (sl->stage == ST_PROMPT && sl->pos == (int)j->prompt.n) {
            rc = slot_conts(s, sl, 0, err);
        } else if (sl->stage == ST_CONT && sl->pos == j->n_tok[sl->c] - 1) {
            double ll = sl->lp0; // summed in token order, as score_continuation does
            for (int t = 0; t < sl->pos; t++)
                ll += sl->lp[t];
            j->ll[sl->c] = ll;
            sl->seq.n = (int)j->prompt.n; // rewind to the prompt's end
            rc = slot_conts(s, sl, sl->c + 1, err);
        }
    }
    return rc;
}

/* A fresh job into an idle slot: its cache and scratch sized for everything it will run. */
static int slot_start(struct ev_sched *s, struct ev_slot *sl, struct lk_err *err)
{
    struct ev_job *j = &sl->job;
    int np = (int)j->prompt.n, need = j->max_new - 1, lp = 1;
    for (int c = 0; c < j->n_cont; c++) {
        need = j->n_tok[c] - 1 > need ? j->n_tok[c] - 1 : need;
        lp = j->n_tok[c] > lp ? j->n_tok[c] : lp;
    }
    int rc = gen_seq_reserve(&sl->seq, &s->c->base->cfg, np + (need > 0 ? need : 0), err);
    if (rc)
        return rc;
    if (lp > sl->lp_cap) {
        lk_free(sl->lp);
        sl->lp_cap = 0;
        if (!(sl->lp = lk_malloc(sizeof(double) * (size_t)lp)))
            return lk_errf(err, LK_ERR_NOMEM, "out of memory");
        sl->lp_cap = lp;
    }
    sl->seq.n = 0;
    sl->stage = ST_PROMPT;
    sl->pos = sl->c = 0;
    sl->busy = 1;
    return LK_OK;
}

/* Idle slots take the next jobs; *out_busy is the number of busy slots. */
static int sched_fill(struct ev_sched *s, struct ev_src *src, int *out_busy, struct lk_err *err)
{
    int busy = 0, rc = LK_OK;
    for (int i = 0; i < s->B && !rc; i++) {
        struct ev_slot *sl = &s->slots[i];
        if (!sl->busy) {
            double t0 = lk_now();
            int got = src->next(src, &sl->job, err);
            if (got < 0)
                return err->code ? err->code : LK_ERR_USAGE;
            if (got == 0)
                continue;
            rc = slot_start(s, sl, err);
            sl->job.seconds += lk_now() - t0;
        }
        busy++;
    }
    *out_busy = busy;
    return rc;
}

/* Finished slots: results written, slots freed. */
static int sched_reap(struct ev_sched *s, struct ev_src *src, struct lk_err *err)
{
    for (int i = 0; i < s->B; i++) {
        struct ev_slot *sl = &s->slots[i];
        if (!sl->busy || sl->stage != ST_DONE)
            continue;
        int rc = src->finish(src, &sl->job, err);
        job_release(&sl->job);
        sl->busy = 0;
        src->done++;
        if (rc)
            return rc;
    }
    return LK_OK;
}

/* Runs every job of src through B slots. progress gets (done * per / total) with done counted
 * in jobs, per = jobs per reported unit. */
static int sched_run(struct ev_sched *s, struct ev_src *src, const char *what, int per, ev_progress_fn progress,
                     void *ctx, struct lk_err *err)
{
    int rc = LK_OK, busy = 0, last = -1;
    while (!rc) {
        if ((rc = sched_fill(s, src, &busy, err)) || !busy)
            break;
        if (lk_interrupted) {
            rc = lk_errf(err, LK_ERR_INTERRUPTED, "interrupted after %d of %d %s", src->done / per, src->total / per,
                         what);
            break;
        }
        int nr = sched_plan(s);
        LK_ASSERT(nr > 0);
        double t0 = lk_now();
        if ((rc = sched_forward(s, nr, err)))
            break;
        double dt = lk_now() - t0;
        int rows = 0;
        for (int i = 0; i < s->B; i++)
            rows += s->slots[i].rows;
        for (int i = 0; i < s->B; i++) // each job's share of the step, by tokens
            s->slots[i].job.seconds += dt * s->slots[i].rows / rows;
        if ((rc = sched_advance(s, err)) || (rc = sched_reap(s, src, err)))
            break;
        if (progress && src->done / per != last) {
            last = src->done / per;
            progress(ctx, last, src->total / per);
        }
    }
    return rc;
}

// ---- cells ----

struct cell_src {
    struct ev_src base;
    struct ev_run *r;
    const struct ev_system *sys;
    int n_sys;
    const struct ev_qa *qa;
    const struct ev_mode *modes;
    int n_modes;
    struct fts_hit **hits;          /* owned [n_items]: each item's retrieval */
    int *nh;                        /* owned [n_items] */
    const struct model **models;    /* owned [n_models]: the distinct models, in order of the modes */
    int n_models, g, i, j;          /* the next job: model g, item i, mode j */
};

static int cell_next(struct ev_src *src, struct ev_job *job, struct lk_err *err)
{
    struct cell_src *cs = (struct cell_src *)src;
    const struct ev_config *c = src->c;
    for (; cs->g < cs->n_models; cs->g++, cs->i = 0)
        for (; cs->i < cs->qa->n; cs->i++, cs->j = 0)
            for (; cs->j < cs->n_modes; cs->j++) {
                const struct model *m;
                const struct lora *lora;
                ev_mode_model(c, cs->sys, cs->n_sys, &cs->modes[cs->j], &m, &lora);
                if (m != cs->models[cs->g])
                    continue;
                const struct ev_item *it = &cs->qa->items[cs->i];
                struct ev_cell *cell = ev_run_cell(cs->r, cs->i, cs->j);
                memset(job, 0, sizeof *job);
                job->item = cs->i;
                job->mode = cs->j++;
                job->m = m;
                job->lora = lora;
                job->max_new = it->choices ? 0 : c->max_new;
                int rc = ev_cell_prompt(c, it, &cs->modes[job->mode], cs->hits[cs->i], cs->nh[cs->i], &job->prompt, cell,
                                        err);
                if (!rc)
                    rc = job_conts(job, it->choices ? it->n_choices : 1, err);
                if (!rc)
                    rc = ev_cell_conts(c, it, (int)job->prompt.n, job->conts, job->n_tok, err);
                if (rc) {
                    lk_err_prefix(err, "question '%s' (line %d), mode %s", it->id, it->line, cs->modes[job->mode].name);
                    job_release(job);
                    return -1;
                }
                return 1;
            }
    return 0;
}

static int cell_finish(struct ev_src *src, const struct ev_job *job, struct lk_err *err)
{
    struct cell_src *cs = (struct cell_src *)src;
    const struct ev_item *it = &cs->qa->items[job->item];
    struct ev_cell *cell = ev_run_cell(cs->r, job->item, job->mode);
    double t0 = lk_now();
    int rc = ev_cell_finish(src->c, it, job->ll, job->n_tok, &job->gen, cell, err);
    if (rc)
        return lk_err_prefix(err, "question '%s' (line %d), mode %s", it->id, it->line, cs->modes[job->mode].name);
    cell->seconds = job->seconds + (lk_now() - t0);
    cs->r->seconds[job->mode] += cell->seconds;
    return LK_OK;
}

/* The distinct models of the modes, in their order. */
static int cell_models(struct cell_src *cs, struct lk_err *err)
{
    if (!(cs->models = lk_calloc((size_t)cs->n_modes + 1, sizeof *cs->models)))
        return lk_errf(err, LK_ERR_NOMEM, "out of memory");
    for (int j = 0; j < cs->n_modes; j++) {
        const struct model *m;
        const struct lora *lora;
        ev_mode_model(cs->base.c, cs->sys, cs->n_sys, &cs->modes[j], &m, &lora);
        int seen = 0;
        for (int g = 0; g < cs->n_models; g++)
            seen |= cs->models[g] == m;
        if (!seen)
            cs->models[cs->n_models++] = m;
    }
    return LK_OK;
}

/* The largest adapter rank of the systems (or c->lora). */
static int max_rank(const struct ev_config *c, const struct ev_system *sys, int n_sys)
{
    int R = sys ? 0 : gen_lora_max_rank(c->lora);
    for (int s = 0; s < n_sys; s++)
        if (gen_lora_max_rank(sys[s].l) > R)
            R = gen_lora_max_rank(sys[s].l);
    return R;
}

int ev_batch_cells(struct ev_run *r, const struct ev_config *c, const struct ev_system *systems, int n_systems,
                   const struct ev_qa *qa, const struct ev_mode *modes, int n_modes, int kmax, ev_progress_fn progress,
                   void *ctx, struct lk_err *err)
{
    struct cell_src cs;
    memset(&cs, 0, sizeof cs);
    cs.base.next = cell_next;
    cs.base.finish = cell_finish;
    cs.base.c = c;
    cs.base.total = qa->n * n_modes;
    cs.r = r;
    cs.sys = systems;
    cs.n_sys = n_systems;
    cs.qa = qa;
    cs.modes = modes;
    cs.n_modes = n_modes;
    cs.hits = lk_calloc((size_t)qa->n + 1, sizeof *cs.hits);
    cs.nh = lk_calloc((size_t)qa->n + 1, sizeof *cs.nh);
    int rc = !cs.hits || !cs.nh ? lk_errf(err, LK_ERR_NOMEM, "out of memory") : cell_models(&cs, err);
    // retrieval first, once per item (the modes of an item run far apart)
    double t0 = lk_now();
    for (int i = 0; !rc && kmax > 0 && i < qa->n; i++)
        if ((rc = fts_search(c->idx, qa->items[i].question, kmax, &cs.hits[i], &cs.nh[i], err)))
            lk_err_prefix(err, "question '%s' (line %d)", qa->items[i].id, qa->items[i].line);
    r->retrieval_seconds += lk_now() - t0;
    struct ev_sched s;
    memset(&s, 0, sizeof s);
    if (!rc && !(rc = sched_init(&s, c, max_rank(c, systems, n_systems), err)))
        rc = sched_run(&s, &cs.base, "questions", n_modes, progress, ctx, err);
    sched_release(&s);
    for (int i = 0; cs.hits && i < qa->n; i++)
        fts_hits_free(cs.hits[i], cs.nh[i]);
    lk_free(cs.hits);
    lk_free(cs.nh);
    lk_free(cs.models);
    return rc;
}

// ---- texts ----

struct text_src {
    struct ev_src base;
    struct ev_text_run *r;
    const struct ev_system *sys;
    const struct ev_text *t;
    struct tok_ids toks;
    int32_t first;              /* the token before every text */
    int j, i;                   /* the next job: model j, text i */
};

static int text_next(struct ev_src *src, struct ev_job *job, struct lk_err *err)
{
    struct text_src *ts = (struct text_src *)src;
    const struct ev_config *c = src->c;
    for (; ts->j < ts->r->n_models; ts->j++, ts->i = 0)
        while (ts->i < ts->t->n) {
            int i = ts->i++;
            ts->toks.n = 0;
            int rc = tok_encode(c->tk, ts->t->v[i], strlen(ts->t->v[i]), 0, &ts->toks, err);
            int n = (int)ts->toks.n < c->max_ctx - 1 ? (int)ts->toks.n : c->max_ctx - 1;
            if (rc)
                return lk_err_prefix(err, "%s:%d", ts->t->path, ts->t->line[i]), -1;
            ts->r->tokens[i] = n;
            ts->r->nll[(size_t)i * ts->r->n_models + ts->j] = NAN;
            if (n <= 0) {
                src->done++; // nothing to score
                continue;
            }
            memset(job, 0, sizeof *job);
            job->item = i;
            job->mode = ts->j;
            job->m = ts->j ? ts->sys[ts->j - 1].m : c->base;
            job->lora = ts->j ? ts->sys[ts->j - 1].l : NULL;
            rc = tok_ids_push(&job->prompt, ts->first, err);
            if (!rc)
                rc = job_conts(job, 1, err);
            for (int k = 0; !rc && k < n; k++)
                rc = tok_ids_push(&job->conts[0], ts->toks.v[k], err);
            if (rc) {
                job_release(job);
                return -1;
            }
            job->n_tok[0] = n;
            return 1;
        }
    return 0;
}

static int text_finish(struct ev_src *src, const struct ev_job *job, struct lk_err *err)
{
    struct text_src *ts = (struct text_src *)src;
    (void)err;
    ts->r->nll[(size_t)job->item * ts->r->n_models + job->mode] = -job->ll[0] / job->n_tok[0];
    return LK_OK;
}

int ev_batch_texts(struct ev_text_run *r, const struct ev_config *c, const struct ev_system *systems, int n_systems,
                   const struct ev_text *t, ev_progress_fn progress, void *ctx, struct lk_err *err)
{
    struct text_src ts;
    memset(&ts, 0, sizeof ts);
    ts.base.next = text_next;
    ts.base.finish = text_finish;
    ts.base.c = c;
    ts.base.total = t->n * r->n_models;
    ts.r = r;
    ts.sys = systems;
    ts.t = t;
    int32_t eos = tok_eos(c->tk) >= 0 ? tok_eos(c->tk) : c->base->cfg.eos_token_id;
    ts.first = tok_add_bos(c->tk) && tok_bos(c->tk) >= 0 ? tok_bos(c->tk) : eos;
    double t0 = lk_now();
    struct ev_sched s;
    int rc = sched_init(&s, c, max_rank(c, systems, n_systems), err);
    if (!rc)
        rc = sched_run(&s, &ts.base, "texts", r->n_models, progress, ctx, err);
    sched_release(&s);
    tok_ids_release(&ts.toks);
    r->seconds = lk_now() - t0;
    return rc;
}
