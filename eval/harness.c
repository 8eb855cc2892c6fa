/*
 * harness.c - the eval harness (see harness.h): QA loading, rag prompts fitted to the context,
 * per-item scoring in base / rag / ft / ft+rag modes over one shared KV cache, bootstrap
 * summary, verdict, JSON and the runs database, and the set-up of a run (inputs loaded and
 * checked). Owns: the items, the cells, the summary, the set-up's models and index.
 */
#include "harness.h"

#include "batch.h"
#include "retain.h"
#include "text.h"

#include <cJSON.h>
#include <ctype.h>
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

const char *const ev_metric_names[EV_N_METRICS] = { "em",  "f1",     "rouge_l",   "nll",
                                                    "acc", "recall", "has_answer" };
const char *const ev_metric_labels[EV_N_METRICS] = { "EM",       "F1",       "ROUGE-L", "NLL/token",
                                                     "accuracy", "recall@k", "answer@k" };

// ---- questions ----

static void item_release(struct ev_item *it)
{
    lk_free(it->id);
    lk_free(it->question);
    lk_free(it->answer);
    lk_free(it->doc_id);
    for (int i = 0; i < it->n_choices; i++)
        lk_free(it->choices[i]);
    lk_free(it->choices);
    memset(it, 0, sizeof *it);
}

void ev_qa_release(struct ev_qa *qa)
{
    if (!qa)
        return;
    for (int i = 0; i < qa->n; i++)
        item_release(&qa->items[i]);
    lk_free(qa->items);
    memset(qa, 0, sizeof *qa);
}

/* A string field: *out a fresh copy, or NULL when absent and optional. */
static int str_field(const cJSON *o, const char *name, int required, char **out, const char *path,
                     int line, struct lk_err *err)
{
    *out = NULL;
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, name);
    if (!v || cJSON_IsNull(v)) {
        if (required)
            return lk_errf(err, LK_ERR_FORMAT, "%s:%d: missing field '%s'", path, line, name);
        return LK_OK;
    }
    if (!cJSON_IsString(v) || !v->valuestring)
        return lk_errf(err, LK_ERR_FORMAT, "%s:%d: field '%s' must be a string", path, line, name);
    if (!(*out = lk_strdup(v->valuestring)))
        return lk_errf(err, LK_ERR_NOMEM, "out of memory");
    return LK_OK;
}

static int is_blank(const char *s)
{
    for (; *s; s++)
        if (!isspace((unsigned char)*s))
            return 0;
    return 1;
}

static int parse_item(const char *text, size_t len, const char *path, int line, struct ev_item *it,
                      struct lk_err *err)
{
    memset(it, 0, sizeof *it);
    it->line = line;
    cJSON *o = cJSON_ParseWithLength(text, len);
    if (!o || !cJSON_IsObject(o)) {
        cJSON_Delete(o);
        return lk_errf(err, LK_ERR_FORMAT, "%s:%d: not a JSON object", path, line);
    }
    int rc = str_field(o, "question", 1, &it->question, path, line, err);
    if (!rc && is_blank(it->question))
        rc = lk_errf(err, LK_ERR_FORMAT, "%s:%d: field 'question' is empty", path, line);
    if (!rc)
        rc = str_field(o, "doc_id", 0, &it->doc_id, path, line, err);
    const cJSON *id = cJSON_GetObjectItemCaseSensitive(o, "id");
    if (!rc) {
        char buf[64];
        if (!id || cJSON_IsNull(id)) {
            snprintf(buf, sizeof buf, "line %d", line);
            it->id = lk_strdup(buf);
        } else if (cJSON_IsString(id) && id->valuestring) {
            it->id = lk_strdup(id->valuestring);
        } else if (cJSON_IsNumber(id)) {
            snprintf(buf, sizeof buf, "%.17g", id->valuedouble);
            it->id = lk_strdup(buf);
        } else {
            rc = lk_errf(err, LK_ERR_FORMAT, "%s:%d: field 'id' must be a string or a number", path, line);
        }
        if (!rc && !it->id)
            rc = lk_errf(err, LK_ERR_NOMEM, "out of memory");
    }
    const cJSON *ch = cJSON_GetObjectItemCaseSensitive(o, "choices");
    if (!rc && ch && !cJSON_IsNull(ch)) {
        // multiple choice
        int n = cJSON_IsArray(ch) ? cJSON_GetArraySize(ch) : -1;
        if (n < 2)
            rc = lk_errf(err, LK_ERR_FORMAT, "%s:%d: field 'choices' must be a list of at least 2 strings",
                         path, line);
        if (!rc && !(it->choices = lk_calloc((size_t)n, sizeof(char *))))
            rc = lk_errf(err, LK_ERR_NOMEM, "out of memory");
        for (int i = 0; !rc && i < n; i++) {
            const cJSON *c = cJSON_GetArrayItem(ch, i);
            if (!cJSON_IsString(c) || !c->valuestring || !c->valuestring[0])
                rc = lk_errf(err, LK_ERR_FORMAT, "%s:%d: choice %d must be a non-empty string", path, line, i);
            else if (!(it->choices[i] = lk_strdup(c->valuestring)))
                rc = lk_errf(err, LK_ERR_NOMEM, "out of memory");
            it->n_choices = i + 1;
        }
        const cJSON *ai = cJSON_GetObjectItemCaseSensitive(o, "answer_index");
        if (!rc && !ai)
            rc = lk_errf(err, LK_ERR_FORMAT, "%s:%d: missing field 'answer_index' (items with 'choices' "
                         "need it)", path, line);
        if (!rc && (!cJSON_IsNumber(ai) || ai->valuedouble != floor(ai->valuedouble) || ai->valuedouble < 0 ||
                    ai->valuedouble >= n))
            rc = lk_errf(err, LK_ERR_FORMAT, "%s:%d: field 'answer_index' must be an integer in [0, %d)", path,
                         line, n);
        if (!rc)
            it->answer_index = (int)ai->valuedouble;
    } else if (!rc) {
        rc = str_field(o, "answer", 1, &it->answer, path, line, err);
        if (rc && err->code == LK_ERR_FORMAT && !cJSON_GetObjectItemCaseSensitive(o, "answer"))
            lk_errf(err, LK_ERR_FORMAT, "%s:%d: missing field 'answer' (or 'choices' and 'answer_index')",
                    path, line);
    }
    cJSON_Delete(o);
    if (rc)
        item_release(it);
    return rc;
}

int ev_qa_load(struct ev_qa *qa, const char *path, int limit, struct lk_err *err)
{
    memset(qa, 0, sizeof *qa);
    FILE *f = fopen(path, "rb");
    if (!f)
        return lk_errf(err, LK_ERR_IO, "%s: cannot open the questions file", path);
    char *buf = NULL;
    size_t cap = 0;
    ssize_t n;
    int line = 0, rc = LK_OK, alloc = 0;
    while (!rc && (limit <= 0 || qa->n < limit) && (n = getline(&buf, &cap, f)) >= 0) {
        line++;
        if (is_blank(buf))
            continue;
        if (qa->n == alloc) {
            alloc = alloc ? alloc * 2 : 64;
            struct ev_item *p = lk_realloc(qa->items, sizeof *p * (size_t)alloc);
            if (!p) {
                rc = lk_errf(err, LK_ERR_NOMEM, "out of memory");
                break;
            }
            qa->items = p;
        }
        struct ev_item *it = &qa->items[qa->n];
        if ((rc = parse_item(buf, (size_t)n, path, line, it, err)))
            break;
        qa->n++;
        qa->n_mc += it->choices != NULL;
        for (int i = 0; i < qa->n - 1; i++)
            if (!strcmp(qa->items[i].id, it->id)) {
                rc = lk_errf(err, LK_ERR_FORMAT, "%s:%d: duplicate id '%s' (first on line %d)", path, line, it->id,
                             qa->items[i].line);
                break;
            }
    }
    if (!rc && ferror(f))
        rc = lk_errf(err, LK_ERR_IO, "%s: read error", path);
    free(buf); // getline's buffer comes from malloc
    fclose(f);
    if (!rc && qa->n == 0)
        rc = lk_errf(err, LK_ERR_FORMAT, "%s: no question in the file", path);
    if (rc)
        ev_qa_release(qa);
    return rc;
}

// ---- prompts ----

char *ev_rag_text(const char *question, const char *const *passages, int k)
{
    size_t n = strlen(question) + 32;
    for (int i = 0; i < k; i++)
        n += strlen(passages[i]) + 2;
    char *s = lk_malloc(n);
    if (!s)
        return NULL;
    if (k == 0) {
        memcpy(s, question, strlen(question) + 1);
        return s;
    }
    size_t off = (size_t)snprintf(s, n, "Context:\n");
    for (int i = 0; i < k; i++)
        off += (size_t)snprintf(s + off, n - off, "%s%s", i ? "\n\n" : "", passages[i]);
    snprintf(s + off, n - off, "\n\nQuestion: %s", question);
    return s;
}

/* The prompt with passages[0..k) where the last one is cut to cut_len bytes (SIZE_MAX: whole). */
static int prompt_try(struct tok *tk, const struct chat_fmt *fmt, const char *question,
                      const char *const *passages, int k, size_t cut_len, struct tok_ids *out,
                      struct lk_err *err)
{
    const char *ps[64];
    char *cut = NULL;
    LK_ASSERT(k <= 64);
    for (int i = 0; i < k; i++)
        ps[i] = passages[i];
    if (k > 0 && cut_len != SIZE_MAX) {
        if (!(cut = lk_malloc(cut_len + 1)))
            return lk_errf(err, LK_ERR_NOMEM, "out of memory");
        memcpy(cut, passages[k - 1], cut_len);
        cut[cut_len] = 0;
        ps[k - 1] = cut;
    }
    char *text = ev_rag_text(question, ps, k);
    lk_free(cut);
    if (!text)
        return lk_errf(err, LK_ERR_NOMEM, "out of memory");
    out->n = 0;
    int rc = chat_prompt_user(tk, fmt, NULL, text, out, err);
    lk_free(text);
    return rc;
}

int ev_prompt_build(struct tok *tk, const struct chat_fmt *fmt, const char *question,
                    const char *const *passages, int k, int max_tokens, struct tok_ids *out,
                    int *out_used, struct lk_err *err)
{
    int rc;
    *out_used = 0;
    if (k > 64)
        k = 64;
    // 1. drop the lowest-ranked passages until the prompt fits
    for (int n = k; n >= 1; n--) {
        if ((rc = prompt_try(tk, fmt, question, passages, n, SIZE_MAX, out, err)))
            return rc;
        if ((int)out->n <= max_tokens) {
            *out_used = n;
            return LK_OK;
        }
    }
    // 2. the best passage alone is too long: cut it to the longest prefix that fits
    if (k >= 1) {
        size_t lo = 0, hi = strlen(passages[0]); // lo fits (if anything does), hi does not
        if ((rc = prompt_try(tk, fmt, question, passages, 1, 0, out, err)))
            return rc;
        if ((int)out->n <= max_tokens) {
            while (hi - lo > 1) {
                size_t mid = lo + (hi - lo) / 2;
                while (mid > lo && ((unsigned char)passages[0][mid] & 0xC0) == 0x80)
                    mid--; // a character boundary
                if (mid == lo)
                    break;
                if ((rc = prompt_try(tk, fmt, question, passages, 1, mid, out, err)))
                    return rc;
                if ((int)out->n <= max_tokens)
                    lo = mid;
                else
                    hi = mid;
            }
            if (lo > 0) {
                if ((rc = prompt_try(tk, fmt, question, passages, 1, lo, out, err)))
                    return rc;
                *out_used = 1;
                return LK_OK;
            }
        }
    }
    // 3. the question alone
    if ((rc = prompt_try(tk, fmt, question, passages, 0, SIZE_MAX, out, err)))
        return rc;
    if ((int)out->n > max_tokens)
        return lk_errf(err, LK_ERR_USAGE, "the question alone takes %zu tokens, more than the %d the "
                       "context leaves for the prompt (lower --max-new)", out->n, max_tokens);
    return LK_OK;
}

// ---- modes ----

int ev_k_parse(const char *s, int *ks, int *nk, struct lk_err *err)
{
    *nk = 0;
    for (const char *p = s;;) {
        char *end;
        errno = 0;
        long v = strtol(p, &end, 10);
        if (errno || end == p || (*end && *end != ','))
            return lk_errf(err, LK_ERR_USAGE, "option '--k' wants integers like 3 or 0,1,3,5, got '%s'", s);
        if (v < 0 || v > 64)
            return lk_errf(err, LK_ERR_USAGE, "k %ld is outside [0, 64]", v);
        if (*nk == EV_MAX_K)
            return lk_errf(err, LK_ERR_USAGE, "give 1 to %d values of k", EV_MAX_K);
        ks[(*nk)++] = (int)v;
        if (!*end || !end[1])
            return LK_OK;
        p = end + 1;
    }
}

int ev_modes_parse(const char *list, const int *ks, int nk, struct ev_mode **out, int *n,
                   struct lk_err *err)
{
    *out = NULL;
    *n = 0;
    int want[4] = { 0 }; // base, rag, ft, ft+rag
    static const char *const names[4] = { "base", "rag", "ft", "ft+rag" };
    char *copy = lk_strdup(list);
    if (!copy)
        return lk_errf(err, LK_ERR_NOMEM, "out of memory");
    char *save = NULL;
    int rc = LK_OK;
    for (char *t = strtok_r(copy, ",", &save); t && !rc; t = strtok_r(NULL, ",", &save)) {
        while (*t == ' ')
            t++;
        int j = 0;
        while (j < 4 && strcmp(t, names[j]))
            j++;
        if (j == 4)
            rc = lk_errf(err, LK_ERR_USAGE, "unknown mode '%s' (base, rag, ft, ft+rag)", t);
        else if (want[j]++)
            rc = lk_errf(err, LK_ERR_USAGE, "mode '%s' is listed twice", t);
    }
    lk_free(copy);
    if (rc)
        return rc;
    if (!want[0] && !want[1] && !want[2] && !want[3])
        return lk_errf(err, LK_ERR_USAGE, "no mode given");
    if (nk <= 0 || nk > 32)
        return lk_errf(err, LK_ERR_USAGE, "give 1 to 32 values of k");
    for (int i = 0; i < nk; i++) {
        if (ks[i] < 0 || ks[i] > 64)
            return lk_errf(err, LK_ERR_USAGE, "k %d is outside [0, 64]", ks[i]);
        for (int j = 0; j < i; j++)
            if (ks[j] == ks[i])
                return lk_errf(err, LK_ERR_USAGE, "k %d is listed twice", ks[i]);
    }
    if (nk == 1 && ks[0] == 0 && (want[1] || want[3]))
        return lk_errf(err, LK_ERR_USAGE, "retrieval modes need k >= 1");
    struct ev_mode *m = lk_calloc((size_t)(2 + 2 * nk), sizeof *m);
    if (!m)
        return lk_errf(err, LK_ERR_NOMEM, "out of memory");
    int cnt = 0;
    for (int tuned = 0; tuned < 2; tuned++) {
        if (want[2 * tuned]) {
            snprintf(m[cnt].name, sizeof m[cnt].name, "%s", tuned ? "ft" : "base");
            m[cnt].tuned = tuned;
            m[cnt++].k = 0;
        }
        if (!want[2 * tuned + 1])
            continue;
        for (int i = 0; i < nk; i++) {
            if (ks[i] == 0)
                continue;
            if (nk == 1)
                snprintf(m[cnt].name, sizeof m[cnt].name, "%s", tuned ? "ft+rag" : "rag");
            else
                snprintf(m[cnt].name, sizeof m[cnt].name, "%s@%d", tuned ? "ft+rag" : "rag", ks[i]);
            m[cnt].tuned = tuned;
            m[cnt++].k = ks[i];
        }
    }
    *out = m;
    *n = cnt;
    return LK_OK;
}

// ---- running ----

struct ev_cell *ev_run_cell(const struct ev_run *r, int i, int j)
{
    return &r->cells[(size_t)i * r->n_modes + j];
}

void ev_run_release(struct ev_run *r)
{
    if (!r)
        return;
    for (size_t i = 0; r->cells && i < (size_t)r->n_items * r->n_modes; i++) {
        lk_free(r->cells[i].answer);
        lk_free(r->cells[i].choice_ll);
        lk_free(r->cells[i].retrieved);
    }
    lk_free(r->cells);
    lk_free(r->seconds);
    memset(r, 0, sizeof *r);
}

/* What one run of the harness needs besides the config. */
struct ev_ctx {
    const struct ev_config *c;
    const struct ev_system *sys; /* borrowed [n_sys], or NULL: c->tuned / c->lora */
    int n_sys;
    struct gen_cache gc;
    float *saved;      /* [V]: next-token logits at the prompt's end */
    float *chunk;      /* [gc.chunk, V] */
    struct tok_ids prompt, toks, gen;
    struct tok_ids *conts; /* [conts_cap]: the continuations a cell scores */
    int *n_tok;        /* [conts_cap]: their tokens scored */
    double *ll;        /* [conts_cap]: their summed log-likelihoods */
    int conts_cap;
    int32_t eos;
};

/* Sum of log p(toks[i] | prompt, toks[<i]) for a cache holding the prompt (np positions, next
 * logits in x->saved); the cache is rewound to np afterwards. */
static int score_continuation(struct ev_ctx *x, const struct model *m, const struct lora *lora, int np,
                              const int32_t *toks, int n, double *out, struct lk_err *err)
{
    int V = m->cfg.vocab_size;
    double s = gen_logprob(x->saved, V, toks[0]);
    int rc = LK_OK;
    for (int a = 0; a < n - 1 && !rc; a += x->gc.chunk) {
        int b = a + x->gc.chunk < n - 1 ? a + x->gc.chunk : n - 1;
        rc = gen_forward(&x->gc, m, lora, toks + a, b - a, x->chunk, err);
        for (int i = a; !rc && i < b; i++)
            s += gen_logprob(x->chunk + (size_t)(i - a) * V, V, toks[i + 1]);
    }
    gen_cache_truncate(&x->gc, np);
    *out = s;
    return rc;
}

static char *trimmed_copy(const char *s)
{
    while (*s && isspace((unsigned char)*s))
        s++;
    size_t n = strlen(s);
    while (n && isspace((unsigned char)s[n - 1]))
        n--;
    char *r = lk_malloc(n + 1);
    if (r) {
        memcpy(r, s, n);
        r[n] = 0;
    }
    return r;
}

static char *retrieved_json(const struct fts_hit *hits, int n, int used)
{
    cJSON *a = cJSON_CreateArray();
    for (int i = 0; a && i < n; i++) {
        cJSON *o = cJSON_CreateObject();
        if (!o)
            break;
        cJSON_AddStringToObject(o, "doc_id", hits[i].doc_id ? hits[i].doc_id : "");
        cJSON_AddNumberToObject(o, "chunk_no", (double)hits[i].chunk_no);
        cJSON_AddNumberToObject(o, "score", hits[i].score);
        cJSON_AddBoolToObject(o, "in_prompt", i < used);
        cJSON_AddStringToObject(o, "text", hits[i].text ? hits[i].text : "");
        cJSON_AddItemToArray(a, o);
    }
    char *s = a ? cJSON_PrintUnformatted(a) : NULL;
    cJSON_Delete(a);
    char *r = s ? lk_strdup(s) : NULL;
    free(s);
    return r;
}

int ev_has_answer(const char *answer, const char *const *passages, int n, double *out,
                  struct lk_err *err)
{
    char *a = NULL;
    int rc = ev_normalize(answer, &a, err);
    *out = 0;
    size_t la = a ? strlen(a) : 0;
    for (int i = 0; !rc && la && i < n && *out == 0; i++) {
        char *p = NULL;
        if ((rc = ev_normalize(passages[i], &p, err)))
            break;
        // tokens are joined by single spaces: a match must start and end at one
        for (const char *h = strstr(p, a); h; h = strstr(h + 1, a))
            if ((h == p || h[-1] == ' ') && (h[la] == '\0' || h[la] == ' ')) {
                *out = 1;
                break;
            }
        lk_free(p);
    }
    lk_free(a);
    return rc;
}

void ev_mode_model(const struct ev_config *c, const struct ev_system *sys, int n_sys, const struct ev_mode *mode,
                   const struct model **m, const struct lora **lora)
{
    *m = c->base;
    *lora = NULL;
    if (!mode->tuned)
        return;
    if (sys) {
        LK_ASSERT(mode->tuned >= 1 && mode->tuned <= n_sys);
        *m = sys[mode->tuned - 1].m;
        *lora = sys[mode->tuned - 1].l;
        return;
    }
    // one tuned model: a model folder, base + adapter, or (an adapter that changes whole
    // weights) a copy of the base with them applied + the adapter
    if (c->tuned)
        *m = c->tuned;
    *lora = c->lora;
}

int ev_cell_prompt(const struct ev_config *c, const struct ev_item *it, const struct ev_mode *mode,
                   const struct fts_hit *hits, int nh, struct tok_ids *prompt, struct ev_cell *cell, struct lk_err *err)
{
    int rc;
    cell->em = cell->f1 = cell->rouge_l = cell->nll = cell->acc = cell->recall = cell->has_answer = NAN;
    int k = mode->k < nh ? mode->k : nh;
    const char *ps[64];
    for (int i = 0; i < k && i < 64; i++)
        ps[i] = hits[i].text ? hits[i].text : "";
    if (mode->k > 0 && it->doc_id) {
        cell->recall = 0;
        for (int i = 0; i < k; i++)
            if (hits[i].doc_id && !strcmp(hits[i].doc_id, it->doc_id))
                cell->recall = 1;
    }
    int budget = c->max_ctx - c->max_new;
    if ((rc = ev_prompt_build(c->tk, c->fmt, it->question, ps, k, budget, prompt, &cell->n_passages, err)))
        return rc;
    if (mode->k > 0 && !(cell->retrieved = retrieved_json(hits, k, cell->n_passages)))
        return lk_errf(err, LK_ERR_NOMEM, "out of memory");
    if (mode->k > 0 && !it->choices && it->answer &&
        (rc = ev_has_answer(it->answer, ps, cell->n_passages, &cell->has_answer, err)))
        return rc;
    cell->prompt_tokens = (int)prompt->n;
    return LK_OK;
}

int ev_cell_conts(const struct ev_config *c, const struct ev_item *it, int np, struct tok_ids *conts, int *n_tok,
                  struct lk_err *err)
{
    int room = c->max_ctx - np, n_cont = it->choices ? it->n_choices : 1;
    for (int j = 0; j < n_cont; j++) {
        const char *text = it->choices ? it->choices[j] : it->answer;
        conts[j].n = 0;
        int rc = tok_encode(c->tk, text, strlen(text), 0, &conts[j], err);
        if (rc)
            return rc;
        n_tok[j] = (int)conts[j].n < room ? (int)conts[j].n : room;
        if (it->choices && n_tok[j] <= 0)
            return lk_errf(err, LK_ERR_USAGE, "item '%s': no room left for choice %d after the prompt", it->id, j);
    }
    return LK_OK;
}

int ev_cell_finish(const struct ev_config *c, const struct ev_item *it, const double *ll, const int *n_tok,
                   const struct tok_ids *gen, struct ev_cell *cell, struct lk_err *err)
{
    int rc;
    if (it->choices) {
        int best = 0;
        for (int j = 0; j < it->n_choices; j++)
            if (ll[j] > ll[best])
                best = j;
        if (!(cell->choice_ll = lk_calloc((size_t)it->n_choices, sizeof(double))))
            return lk_errf(err, LK_ERR_NOMEM, "out of memory");
        memcpy(cell->choice_ll, ll, sizeof(double) * (size_t)it->n_choices);
        cell->acc = best == it->answer_index;
        cell->nll = -ll[it->answer_index] / n_tok[it->answer_index];
        cell->answer_tokens = n_tok[it->answer_index];
        if (!(cell->answer = lk_strdup(it->choices[best])))
            return lk_errf(err, LK_ERR_NOMEM, "out of memory");
        return LK_OK;
    }
    // the reference's NLL per token, the greedy answer and its scores
    cell->answer_tokens = n_tok[0];
    if (n_tok[0] > 0)
        cell->nll = -ll[0] / n_tok[0];
    char *bytes, *text;
    size_t nb;
    if ((rc = tok_decode(c->tk, gen->v, gen->n, 1, &bytes, &nb, err)))
        return rc;
    text = ev_utf8_lossy(bytes, nb); // stray bytes of a token split mid-character: U+FFFD
    lk_free(bytes);
    cell->answer = text ? trimmed_copy(text) : NULL;
    lk_free(text);
    if (!cell->answer)
        return lk_errf(err, LK_ERR_NOMEM, "out of memory");
    struct ev_scores sc;
    if ((rc = ev_score(cell->answer, it->answer, &sc, err)))
        return rc;
    cell->em = sc.em;
    cell->f1 = sc.f1;
    cell->rouge_l = sc.rouge_l;
    return LK_OK;
}

/* Room for n continuations in x->conts, x->n_tok, x->ll (entries past conts_cap own nothing). */
static int ctx_conts(struct ev_ctx *x, int n, struct lk_err *err)
{
    if (n <= x->conts_cap)
        return LK_OK;
    struct tok_ids *t = lk_realloc(x->conts, sizeof *t * (size_t)n);
    if (!t)
        return lk_errf(err, LK_ERR_NOMEM, "out of memory");
    x->conts = t;
    memset(t + x->conts_cap, 0, sizeof *t * (size_t)(n - x->conts_cap));
    int *nt = lk_realloc(x->n_tok, sizeof *nt * (size_t)n);
    if (!nt)
        return lk_errf(err, LK_ERR_NOMEM, "out of memory");
    x->n_tok = nt;
    double *ll = lk_realloc(x->ll, sizeof *ll * (size_t)n);
    if (!ll)
        return lk_errf(err, LK_ERR_NOMEM, "out of memory");
    x->ll = ll;
    x->conts_cap = n;
    return LK_OK;
}

/* One item in one mode: prompt (with up to mode->k of the item's hits), answer, scores. */
static int run_cell(struct ev_ctx *x, const struct ev_item *it, const struct ev_mode *mode,
                    const struct fts_hit *hits, int nh, struct ev_cell *cell, struct lk_err *err)
{
    const struct ev_config *c = x->c;
    double t0 = lk_now();
    const struct model *m;
    const struct lora *lora;
    ev_mode_model(c, x->sys, x->n_sys, mode, &m, &lora);
    int V = m->cfg.vocab_size, rc, n_cont = it->choices ? it->n_choices : 1;
    if ((rc = ev_cell_prompt(c, it, mode, hits, nh, &x->prompt, cell, err)))
        return rc;
    int np = (int)x->prompt.n;
    gen_cache_truncate(&x->gc, 0);
    if ((rc = gen_forward(&x->gc, m, lora, x->prompt.v, np, NULL, err)))
        return rc;
    memcpy(x->saved, x->gc.logits, sizeof(float) * (size_t)V);
    if ((rc = ctx_conts(x, n_cont, err)) || (rc = ev_cell_conts(c, it, np, x->conts, x->n_tok, err)))
        return rc;
    // the choices' or the reference's log-likelihood, each from the prompt's cache
    for (int j = 0; j < n_cont; j++)
        if (x->n_tok[j] > 0 && (rc = score_continuation(x, m, lora, np, x->conts[j].v, x->n_tok[j], &x->ll[j], err)))
            return rc;
    x->gen.n = 0;
    if (!it->choices) { // the greedy answer
        struct gen_opts o = { c->max_new, 0, 1, 0, c->fmt, x->eos, 0, (int)tok_vocab_size(c->tk) };
        if ((rc = gen_continue(&x->gc, m, lora, x->saved, &o, NULL, NULL, &x->gen, NULL, err)))
            return rc;
    }
    if ((rc = ev_cell_finish(c, it, x->ll, x->n_tok, &x->gen, cell, err)))
        return rc;
    cell->seconds = lk_now() - t0;
    return LK_OK;
}

/* The generation state shared by every item: a KV cache sized for the largest adapter rank. */
static int ctx_init(struct ev_ctx *x, const struct ev_config *c, const struct ev_system *sys, int n_sys,
                    struct lk_err *err)
{
    memset(x, 0, sizeof *x);
    x->c = c;
    x->sys = sys;
    x->n_sys = n_sys;
    int V = c->base->cfg.vocab_size, R = sys ? 0 : gen_lora_max_rank(c->lora);
    for (int s = 0; s < n_sys; s++)
        if (gen_lora_max_rank(sys[s].l) > R)
            R = gen_lora_max_rank(sys[s].l);
    x->eos = tok_eos(c->tk) >= 0 ? tok_eos(c->tk) : c->base->cfg.eos_token_id;
    int rc = gen_cache_init(&x->gc, &c->base->cfg, c->max_ctx, EV_CHUNK, R, err);
    if (!rc) {
        x->saved = lk_malloc(sizeof(float) * (size_t)V);
        x->chunk = lk_malloc(sizeof(float) * (size_t)V * (size_t)x->gc.chunk);
        if (!x->saved || !x->chunk)
            rc = lk_errf(err, LK_ERR_NOMEM, "out of memory");
    }
    return rc;
}

static void ctx_release(struct ev_ctx *x)
{
    lk_free(x->saved);
    lk_free(x->chunk);
    tok_ids_release(&x->prompt);
    tok_ids_release(&x->toks);
    tok_ids_release(&x->gen);
    for (int i = 0; i < x->conts_cap; i++)
        tok_ids_release(&x->conts[i]);
    lk_free(x->conts);
    lk_free(x->n_tok);
    lk_free(x->ll);
    gen_cache_release(&x->gc);
    memset(x, 0, sizeof *x);
}

/* One item in every mode: the retrieval (the question as the query, top kmax chunks) done once
 * and shared by the retrieval modes, then each mode's cell (row[j], time added to seconds[j]).
 * The unit a batched evaluation would group. */
static int run_item(struct ev_ctx *x, const struct ev_item *it, const struct ev_mode *modes, int n_modes,
                    int kmax, struct ev_cell *row, double *seconds, double *retrieval_seconds,
                    struct lk_err *err)
{
    struct fts_hit *hits = NULL;
    int nh = 0, rc = LK_OK;
    if (kmax > 0) {
        double t0 = lk_now();
        rc = fts_search(x->c->idx, it->question, kmax, &hits, &nh, err);
        *retrieval_seconds += lk_now() - t0;
    }
    for (int j = 0; !rc && j < n_modes; j++) {
        rc = run_cell(x, it, &modes[j], hits, nh, &row[j], err);
        if (rc)
            lk_err_prefix(err, "question '%s' (line %d), mode %s", it->id, it->line, modes[j].name);
        seconds[j] += row[j].seconds;
    }
    fts_hits_free(hits, nh);
    return rc;
}

int ev_run_all(struct ev_run *r, const struct ev_config *c, const struct ev_qa *qa,
               const struct ev_mode *modes, int n_modes, ev_progress_fn progress, void *ctx,
               struct lk_err *err)
{
    return ev_run_systems(r, c, NULL, 0, qa, modes, n_modes, progress, ctx, err);
}

static int run_systems(struct ev_run *r, const struct ev_config *c, const struct ev_system *systems, int n_systems,
                       const struct ev_qa *qa, const struct ev_mode *modes, int n_modes, ev_progress_fn progress,
                       void *ctx, struct lk_err *err)
{
    memset(r, 0, sizeof *r);
    int kmax = 0, need_tuned = 0;
    for (int j = 0; j < n_modes; j++) {
        if (modes[j].k > kmax)
            kmax = modes[j].k;
        need_tuned |= modes[j].tuned;
        if (systems && (modes[j].tuned < 0 || modes[j].tuned > n_systems))
            return lk_errf(err, LK_ERR_USAGE, "mode %s names system %d of %d", modes[j].name, modes[j].tuned,
                           n_systems);
    }
    if (need_tuned && !c->tuned && !c->lora && !systems)
        return lk_errf(err, LK_ERR_USAGE, "the ft modes need a tuned model (--adapter or --tuned)");
    if (kmax > 0 && !c->idx)
        return lk_errf(err, LK_ERR_USAGE, "the rag modes need documents (--docs or --index)");
    if (c->max_new < 1 || c->max_ctx <= c->max_new)
        return lk_errf(err, LK_ERR_USAGE, "max-new %d leaves no room in a context of %d positions", c->max_new,
                       c->max_ctx);
    r->n_items = qa->n;
    r->n_modes = n_modes;
    r->modes = modes;
    r->cells = lk_calloc((size_t)qa->n * (size_t)n_modes, sizeof *r->cells);
    r->seconds = lk_calloc((size_t)n_modes, sizeof(double));
    if (!r->cells || !r->seconds)
        return lk_errf(err, LK_ERR_NOMEM, "out of memory");
    if (c->batch > 1)
        return ev_batch_cells(r, c, systems, n_systems, qa, modes, n_modes, kmax, progress, ctx, err);
    struct ev_ctx x;
    int rc = ctx_init(&x, c, systems, n_systems, err);
    for (int i = 0; !rc && i < qa->n; i++) {
        if (lk_interrupted) {
            rc = lk_errf(err, LK_ERR_INTERRUPTED, "interrupted after %d of %d questions", i, qa->n);
            break;
        }
        rc = run_item(&x, &qa->items[i], modes, n_modes, kmax, ev_run_cell(r, i, 0), r->seconds,
                      &r->retrieval_seconds, err);
        if (progress)
            progress(ctx, i + 1, qa->n);
    }
    ctx_release(&x);
    return rc;
}

/* One-token rows on the tile unit while eval runs (op_amx_gemv, ops.h): both paths then decode with
 * the same kernel, and the batched path's many one-token rows a step go faster. */
int ev_run_systems(struct ev_run *r, const struct ev_config *c, const struct ev_system *systems,
                   int n_systems, const struct ev_qa *qa, const struct ev_mode *modes, int n_modes,
                   ev_progress_fn progress, void *ctx, struct lk_err *err)
{
    int prev = op_amx_gemv;
    op_amx_gemv = 1;
    int rc = run_systems(r, c, systems, n_systems, qa, modes, n_modes, progress, ctx, err);
    op_amx_gemv = prev;
    return rc;
}

// ---- texts: NLL per token ----

/* NLL per token of one text under (m, lora): its tokens (at most the context less one), each
 * given the ones before it, after one end-of-text token (BOS when the tokenizer adds one), as
 * lm-evaluation-harness's rolling log-likelihood does. NAN for a text with no token. */
static int text_item(struct ev_ctx *x, const struct model *m, const struct lora *lora, const char *text,
                     double *out, int *out_tokens, struct lk_err *err)
{
    const struct ev_config *c = x->c;
    *out = NAN;
    x->toks.n = 0;
    int rc = tok_encode(c->tk, text, strlen(text), 0, &x->toks, err);
    int n = (int)x->toks.n < x->gc.T_max - 1 ? (int)x->toks.n : x->gc.T_max - 1;
    *out_tokens = n;
    if (rc || n <= 0)
        return rc;
    int32_t first = tok_add_bos(c->tk) && tok_bos(c->tk) >= 0 ? tok_bos(c->tk) : x->eos;
    gen_cache_truncate(&x->gc, 0);
    if ((rc = gen_forward(&x->gc, m, lora, &first, 1, NULL, err)))
        return rc;
    memcpy(x->saved, x->gc.logits, sizeof(float) * (size_t)m->cfg.vocab_size);
    double ll;
    if ((rc = score_continuation(x, m, lora, 1, x->toks.v, n, &ll, err)))
        return rc;
    *out = -ll / n;
    return LK_OK;
}

static int text_run_all(struct ev_text_run *r, const struct ev_config *c, const struct ev_system *systems,
                        int n_systems, const struct ev_text *t, ev_progress_fn progress, void *ctx, struct lk_err *err)
{
    memset(r, 0, sizeof *r);
    r->n_items = t->n;
    r->n_models = 1 + n_systems;
    size_t n = (size_t)t->n * (size_t)r->n_models;
    r->nll = lk_malloc(sizeof(double) * (n ? n : 1));
    r->tokens = lk_calloc((size_t)t->n + 1, sizeof(int));
    if (!r->nll || !r->tokens)
        return lk_errf(err, LK_ERR_NOMEM, "out of memory");
    if (c->batch > 1)
        return ev_batch_texts(r, c, systems, n_systems, t, progress, ctx, err);
    struct ev_ctx x;
    int rc = ctx_init(&x, c, systems, n_systems, err);
    double t0 = lk_now();
    for (int i = 0; !rc && i < t->n; i++) {
        if (lk_interrupted) {
            rc = lk_errf(err, LK_ERR_INTERRUPTED, "interrupted after %d of %d texts", i, t->n);
            break;
        }
        for (int j = 0; !rc && j < r->n_models; j++) {
            const struct model *m = j ? systems[j - 1].m : c->base;
            const struct lora *l = j ? systems[j - 1].l : NULL;
            rc = text_item(&x, m, l, t->v[i], &r->nll[(size_t)i * r->n_models + j], &r->tokens[i], err);
            if (rc)
                lk_err_prefix(err, "%s:%d", t->path, t->line[i]);
        }
        if (progress)
            progress(ctx, i + 1, t->n);
    }
    r->seconds = lk_now() - t0;
    ctx_release(&x);
    return rc;
}

int ev_text_run_all(struct ev_text_run *r, const struct ev_config *c, const struct ev_system *systems,
                    int n_systems, const struct ev_text *t, ev_progress_fn progress, void *ctx,
                    struct lk_err *err)
{
    int prev = op_amx_gemv; // as ev_run_systems
    op_amx_gemv = 1;
    int rc = text_run_all(r, c, systems, n_systems, t, progress, ctx, err);
    op_amx_gemv = prev;
    return rc;
}

void ev_text_run_release(struct ev_text_run *r)
{
    if (!r)
        return;
    lk_free(r->nll);
    lk_free(r->tokens);
    memset(r, 0, sizeof *r);
}

// ---- summary ----

double ev_cell_metric(const struct ev_cell *c, enum ev_metric m)
{
    switch (m) {
    case EV_EM: return c->em;
    case EV_F1: return c->f1;
    case EV_ROUGE_L: return c->rouge_l;
    case EV_NLL: return c->nll;
    case EV_ACC: return c->acc;
    case EV_RECALL: return c->recall;
    case EV_HAS_ANSWER: return c->has_answer;
    default: return NAN;
    }
}

void ev_summary_release(struct ev_summary *s)
{
    if (!s)
        return;
    lk_free(s->stats);
    lk_free(s->diffs);
    memset(s, 0, sizeof *s);
}

const struct ev_stat *ev_summary_stat(const struct ev_summary *s, int mode, enum ev_metric m)
{
    for (int i = 0; i < s->n_stats; i++)
        if (s->stats[i].mode == mode && s->stats[i].metric == m)
            return &s->stats[i];
    return NULL;
}

const struct ev_diff *ev_summary_diff(const struct ev_summary *s, int a, int b, enum ev_metric m)
{
    for (int i = 0; i < s->n_diffs; i++)
        if (s->diffs[i].a == a && s->diffs[i].b == b && s->diffs[i].metric == m)
            return &s->diffs[i];
    return NULL;
}

/* A seed per (a, b, metric), so each interval is reproducible whatever else is computed. */
static void stat_rng(struct lk_rng *rng, uint64_t seed, int a, int b, int m)
{
    lk_rng_seed(rng, seed * 0x9E3779B97F4A7C15ull + (uint64_t)(a + 1) * 1000003u + (uint64_t)(b + 1) * 1009u +
                         (uint64_t)m + 1);
}

/* 1 when the run has more than one system. */
static int multi_sys(const struct ev_run *r)
{
    for (int j = 0; j < r->n_modes; j++)
        if (r->modes[j].tuned > 1)
            return 1;
    return 0;
}

/* The place of mode j that seeds its statistics: with several systems each system's modes take
 * the first system's places (base modes keep theirs), so every system is resampled alike; with
 * one system it is j itself, as it always was. */
static int seed_index(const struct ev_run *r, int j)
{
    if (!multi_sys(r))
        return j;
    int n_base = 0, before = 0;
    for (int i = 0; i < r->n_modes; i++) {
        n_base += !r->modes[i].tuned;
        if (i < j && r->modes[i].tuned == r->modes[j].tuned)
            before++;
    }
    return r->modes[j].tuned ? n_base + before : before;
}

void ev_stat_rng(const struct ev_run *r, uint64_t seed, int a, int b, int m, struct lk_rng *rng)
{
    stat_rng(rng, seed, seed_index(r, a), b < 0 ? -1 : seed_index(r, b), m);
}

static const char *fmt_num(double v, char *buf, size_t n)
{
    snprintf(buf, n, fabs(v) >= 0.005 || v == 0 ? "%.2f" : "%.2g", v);
    return buf;
}

void ev_verdict(const char *a, const char *b, const char *metric_label, const struct ev_ci *d,
                int lower_better, char *buf, size_t n)
{
    double h = (d->hi - d->lo) / 2, mean = d->mean;
    char m1[32], m2[32];
    const char *q = d->n == 1 ? "question" : "questions";
    if (d->lo > 0 || d->hi < 0) {
        int a_wins = (mean > 0) != (lower_better != 0);
        snprintf(buf, n, "%s beats %s on %s by %s ± %s on %zu %s", a_wins ? a : b, a_wins ? b : a, metric_label,
                 fmt_num(fabs(mean), m1, sizeof m1), fmt_num(h, m2, sizeof m2), d->n, q);
    } else {
        snprintf(buf, n, "no clear difference between %s and %s on %s: %s − %s = %s ± %s (95%% interval "
                 "includes 0) on %zu %s", a, b, metric_label, a, b, fmt_num(mean, m1, sizeof m1),
                 fmt_num(h, m2, sizeof m2), d->n, q);
    }
}

int ev_run_find_mode(const struct ev_run *r, int tuned, int sys, int k)
{
    for (int j = 0; j < r->n_modes; j++)
        if (r->modes[j].tuned == (tuned ? sys + 1 : 0) && r->modes[j].k == k)
            return j;
    return -1;
}

static int find_mode(const struct ev_run *r, int tuned, int k)
{
    return ev_run_find_mode(r, tuned, 0, k);
}

/* Means and intervals of every (mode, metric) that applies to some item; a holds n values. */
static int summarize_stats(const struct ev_run *r, uint64_t seed, struct ev_summary *s, double *a,
                           struct lk_err *err)
{
    int rc = LK_OK;
    for (int j = 0; j < r->n_modes && !rc; j++)
        for (int m = 0; m < EV_N_METRICS && !rc; m++) {
            size_t k = 0;
            for (int i = 0; i < r->n_items; i++) {
                double v = ev_cell_metric(ev_run_cell(r, i, j), (enum ev_metric)m);
                if (!isnan(v))
                    a[k++] = v;
            }
            if (!k)
                continue;
            struct lk_rng rng;
            ev_stat_rng(r, seed, j, -1, m, &rng);
            struct ev_stat *st = &s->stats[s->n_stats];
            st->mode = j;
            st->metric = (enum ev_metric)m;
            if (!(rc = ev_bootstrap_mean(a, k, 0, &rng, &st->ci, err)))
                s->n_stats++;
        }
    return rc;
}

/* The paired difference pa - pb on metric m over the items where both apply, appended to
 * s->diffs (which has room); nothing when no item has both. a, b hold n values. */
static int add_diff(const struct ev_run *r, uint64_t seed, struct ev_summary *s, int pa, int pb,
                    enum ev_metric m, double *a, double *b, struct lk_err *err)
{
    size_t k = 0;
    for (int i = 0; i < r->n_items; i++) {
        double x = ev_cell_metric(ev_run_cell(r, i, pa), m), y = ev_cell_metric(ev_run_cell(r, i, pb), m);
        if (!isnan(x) && !isnan(y)) {
            a[k] = x;
            b[k++] = y;
        }
    }
    if (!k)
        return LK_OK;
    struct lk_rng rng;
    ev_stat_rng(r, seed, pa, pb, m, &rng);
    struct ev_diff *d = &s->diffs[s->n_diffs];
    d->a = pa;
    d->b = pb;
    d->metric = m;
    int rc = ev_bootstrap_paired(a, b, k, 0, &rng, &d->ci, err);
    if (!rc)
        s->n_diffs++;
    return rc;
}

/* The pairs compared, in order: for each rag@k, each system's (S, rag@k) and (S+rag@k, rag@k),
 * then (rag@k, base); then each system's (S, base). With one system: ft - rag@k, ft+rag@k -
 * rag@k, rag@k - base, ft - base, as always. *out is lk_malloc'ed [*np][2]. */
static int summary_pairs(const struct ev_run *r, int (**out)[2], int *np, struct lk_err *err)
{
    int n_sys = 0, base = find_mode(r, 0, 0), cnt = 0;
    for (int j = 0; j < r->n_modes; j++)
        if (r->modes[j].tuned > n_sys)
            n_sys = r->modes[j].tuned;
    int(*p)[2] = lk_malloc(sizeof *p * (size_t)(r->n_modes * (2 * n_sys + 1) + n_sys + 1));
    if (!(*out = p))
        return lk_errf(err, LK_ERR_NOMEM, "out of memory");
    for (int j = 0; j < r->n_modes; j++) {
        if (r->modes[j].tuned || r->modes[j].k == 0)
            continue;
        for (int sy = 0; sy < n_sys; sy++) {
            int ft = ev_run_find_mode(r, 1, sy, 0), ftrag = ev_run_find_mode(r, 1, sy, r->modes[j].k);
            if (ft >= 0)
                p[cnt][0] = ft, p[cnt++][1] = j;
            if (ftrag >= 0)
                p[cnt][0] = ftrag, p[cnt++][1] = j;
        }
        if (base >= 0)
            p[cnt][0] = j, p[cnt++][1] = base;
    }
    for (int sy = 0; sy < n_sys; sy++) {
        int ft = ev_run_find_mode(r, 1, sy, 0);
        if (ft >= 0 && base >= 0)
            p[cnt][0] = ft, p[cnt++][1] = base;
    }
    *np = cnt;
    return LK_OK;
}

/* One system: the verdict between ft and the largest-k rag, else rag and base, else ft and base. */
static void verdict_single(const struct ev_run *r, struct ev_summary *s, enum ev_metric vm)
{
    int base = find_mode(r, 0, 0), ft = find_mode(r, 1, 0), rag = -1;
    for (int j = 0; j < r->n_modes; j++)
        if (!r->modes[j].tuned && r->modes[j].k > 0 && (rag < 0 || r->modes[j].k > r->modes[rag].k))
            rag = j;
    int va = -1, vb = -1;
    if (ft >= 0 && rag >= 0)
        va = ft, vb = rag;
    else if (rag >= 0 && base >= 0)
        va = rag, vb = base;
    else if (ft >= 0 && base >= 0)
        va = ft, vb = base;
    const struct ev_diff *d = va >= 0 ? ev_summary_diff(s, va, vb, vm) : NULL;
    if (d)
        ev_verdict(r->modes[va].name, r->modes[vb].name, ev_metric_labels[vm], &d->ci, 0, s->verdict,
                   sizeof s->verdict);
    else
        snprintf(s->verdict, sizeof s->verdict, "no comparison: run at least two of base, rag and ft");
}

/* The best mode on metric m (highest mean; lowest for NLL), or -1. */
static int best_mode(const struct ev_run *r, const struct ev_summary *s, enum ev_metric m)
{
    int best = -1;
    double bv = 0;
    for (int j = 0; j < r->n_modes; j++) {
        const struct ev_stat *st = ev_summary_stat(s, j, m);
        if (st && (best < 0 || (m == EV_NLL ? st->ci.mean < bv : st->ci.mean > bv)))
            best = j, bv = st->ci.mean;
    }
    return best;
}

/* One clause of the verdict with several systems: the best mode on m and the modes its paired
 * interval cannot separate from it (best - other computed here when not already a pair). */
static int verdict_metric(const struct ev_run *r, uint64_t seed, struct ev_summary *s, enum ev_metric m,
                          double *a, double *b, struct lk_buf *out, struct lk_err *err)
{
    int best = best_mode(r, s, m), tied = 0, rc = LK_OK;
    if (best < 0)
        return LK_OK;
    char m1[32];
    lk_buf_printf(out, "%sbest on %s: %s (%s)", out->n ? "; " : "", ev_metric_labels[m], r->modes[best].name,
                  fmt_num(ev_summary_stat(s, best, m)->ci.mean, m1, sizeof m1));
    for (int j = 0; j < r->n_modes && !rc; j++) {
        if (j == best || !ev_summary_stat(s, j, m))
            continue;
        // the pair may already be there, either way round: its interval excludes 0 or not alike
        const struct ev_diff *d = ev_summary_diff(s, best, j, m);
        if (!d)
            d = ev_summary_diff(s, j, best, m);
        if (!d) {
            int before = s->n_diffs;
            if ((rc = add_diff(r, seed, s, best, j, m, a, b, err)) || s->n_diffs == before)
                continue;
            d = &s->diffs[s->n_diffs - 1];
        }
        if (d->ci.lo > 0 || d->ci.hi < 0)
            continue;
        if (tied < 4)
            lk_buf_printf(out, "%s%s", tied ? ", " : ", not separated from ", r->modes[j].name);
        tied++;
    }
    if (tied > 4)
        lk_buf_printf(out, " and %d more", tied - 4);
    lk_buf_printf(out, tied ? " (paired 95%% intervals include 0)" : ", ahead of every other row (paired 95%% "
                  "intervals exclude 0)");
    return rc;
}

/* Several systems: the best row per metric (EM, F1, NLL; accuracy and NLL when every item is
 * multiple choice), and which rows its interval cannot separate from it. */
static int verdict_multi(const struct ev_run *r, uint64_t seed, struct ev_summary *s, int any_qa,
                         double *a, double *b, struct lk_err *err)
{
    static const enum ev_metric qa_m[3] = { EV_EM, EV_F1, EV_NLL }, mc_m[2] = { EV_ACC, EV_NLL };
    struct lk_buf out = { 0 };
    int rc = LK_OK;
    for (int i = 0; i < (any_qa ? 3 : 2) && !rc; i++)
        rc = verdict_metric(r, seed, s, any_qa ? qa_m[i] : mc_m[i], a, b, &out, err);
    if (!rc && out.oom)
        rc = lk_errf(err, LK_ERR_NOMEM, "out of memory");
    if (!rc)
        snprintf(s->verdict, sizeof s->verdict, "%s", out.n ? out.p : "no comparison: nothing was scored");
    lk_buf_release(&out);
    return rc;
}

int ev_summarize(const struct ev_run *r, uint64_t seed, struct ev_summary *s, struct lk_err *err)
{
    memset(s, 0, sizeof *s);
    s->seed = seed;
    size_t n = (size_t)r->n_items;
    int(*pairs)[2] = NULL, np = 0;
    double *a = lk_malloc(sizeof(double) * (n + 1)), *b = lk_malloc(sizeof(double) * (n + 1));
    s->stats = lk_calloc((size_t)r->n_modes * EV_N_METRICS + 1, sizeof *s->stats);
    int rc = !a || !b || !s->stats ? lk_errf(err, LK_ERR_NOMEM, "out of memory") : LK_OK;
    if (!rc)
        rc = summary_pairs(r, &pairs, &np, err);
    // room for every pair, and for the verdict's best - other on up to three metrics
    if (!rc && !(s->diffs = lk_calloc((size_t)(np + 3 * r->n_modes) * EV_N_METRICS + 1, sizeof *s->diffs)))
        rc = lk_errf(err, LK_ERR_NOMEM, "out of memory");
    if (!rc)
        rc = summarize_stats(r, seed, s, a, err);
    for (int p = 0; p < np && !rc; p++)
        for (int m = 0; m < EV_N_METRICS && !rc; m++)
            if (m != EV_RECALL && m != EV_HAS_ANSWER)
                rc = add_diff(r, seed, s, pairs[p][0], pairs[p][1], (enum ev_metric)m, a, b, err);
    // the verdict: F1 (accuracy when every item is multiple choice)
    int any_qa = 0;
    for (size_t i = 0; i < n && r->n_modes; i++)
        any_qa |= !isnan(ev_run_cell(r, (int)i, 0)->f1);
    if (!rc && multi_sys(r))
        rc = verdict_multi(r, seed, s, any_qa, a, b, err);
    else if (!rc)
        verdict_single(r, s, any_qa ? EV_F1 : EV_ACC);
    lk_free(pairs);
    lk_free(a);
    lk_free(b);
    if (rc)
        ev_summary_release(s);
    return rc;
}

void ev_json_num(cJSON *o, const char *key, double v)
{
    if (isfinite(v))
        cJSON_AddNumberToObject(o, key, v);
    else
        cJSON_AddNullToObject(o, key);
}

cJSON *ev_ci_obj(const struct ev_ci *ci)
{
    cJSON *o = cJSON_CreateObject();
    if (o) {
        ev_json_num(o, "mean", ci->mean);
        ev_json_num(o, "lo", ci->lo);
        ev_json_num(o, "hi", ci->hi);
        cJSON_AddNumberToObject(o, "n", (double)ci->n);
    }
    return o;
}

static char *json_take(cJSON *o)
{
    char *s = o ? cJSON_PrintUnformatted(o) : NULL;
    cJSON_Delete(o);
    char *r = s ? lk_strdup(s) : NULL;
    free(s);
    return r;
}

char *ev_summary_json(const struct ev_run *r, const struct ev_summary *s)
{
    return json_take(ev_summary_obj(r, s));
}

cJSON *ev_summary_obj(const struct ev_run *r, const struct ev_summary *s)
{
    cJSON *root = cJSON_CreateObject();
    if (!root)
        return NULL;
    cJSON_AddNumberToObject(root, "n_items", r->n_items);
    cJSON_AddNumberToObject(root, "seed", (double)s->seed);
    cJSON *modes = cJSON_AddObjectToObject(root, "modes");
    for (int j = 0; modes && j < r->n_modes; j++) {
        cJSON *mo = cJSON_AddObjectToObject(modes, r->modes[j].name);
        if (!mo)
            break;
        cJSON_AddBoolToObject(mo, "tuned", r->modes[j].tuned);
        cJSON_AddNumberToObject(mo, "k", r->modes[j].k);
        for (int m = 0; m < EV_N_METRICS; m++) {
            const struct ev_stat *st = ev_summary_stat(s, j, (enum ev_metric)m);
            if (st)
                cJSON_AddItemToObject(mo, ev_metric_names[m], ev_ci_obj(&st->ci));
        }
        ev_json_num(mo, "seconds", r->seconds[j]);
    }
    ev_json_num(root, "retrieval_seconds", r->retrieval_seconds);
    cJSON *diffs = cJSON_AddArrayToObject(root, "diffs");
    for (int i = 0; diffs && i < s->n_diffs; i++) {
        const struct ev_diff *d = &s->diffs[i];
        cJSON *o = ev_ci_obj(&d->ci);
        if (!o)
            break;
        cJSON_AddStringToObject(o, "a", r->modes[d->a].name);
        cJSON_AddStringToObject(o, "b", r->modes[d->b].name);
        cJSON_AddStringToObject(o, "metric", ev_metric_names[d->metric]);
        cJSON_AddItemToArray(diffs, o);
    }
    cJSON_AddStringToObject(root, "verdict", s->verdict);
    return root;
}

static char *cell_json(const struct ev_item *it, const struct ev_cell *c)
{
    cJSON *o = cJSON_CreateObject();
    if (!o)
        return NULL;
    for (int m = 0; m < EV_N_METRICS; m++) {
        double v = ev_cell_metric(c, (enum ev_metric)m);
        if (!isnan(v))
            ev_json_num(o, ev_metric_names[m], v);
    }
    if (c->choice_ll) {
        cJSON *a = cJSON_AddArrayToObject(o, "choice_ll");
        for (int i = 0; a && i < it->n_choices; i++)
            cJSON_AddItemToArray(a, cJSON_CreateNumber(c->choice_ll[i]));
    }
    cJSON_AddNumberToObject(o, "n_passages", c->n_passages);
    cJSON_AddNumberToObject(o, "prompt_tokens", c->prompt_tokens);
    cJSON_AddNumberToObject(o, "answer_tokens", c->answer_tokens);
    ev_json_num(o, "seconds", c->seconds);
    return json_take(o);
}

int ev_record(struct rdb *db, int64_t run_id, const struct ev_qa *qa, const struct ev_run *r,
              const struct ev_summary *s, struct lk_err *err)
{
    int rc = LK_OK;
    for (int i = 0; i < s->n_stats && !rc; i++) {
        const struct ev_stat *st = &s->stats[i];
        rc = rdb_eval_result(db, run_id, r->modes[st->mode].name, ev_metric_names[st->metric], st->ci.mean,
                             st->ci.lo, st->ci.hi, (int64_t)st->ci.n, err);
    }
    for (int i = 0; i < s->n_diffs && !rc; i++) {
        const struct ev_diff *d = &s->diffs[i];
        char name[80];
        snprintf(name, sizeof name, "%s - %s", r->modes[d->a].name, r->modes[d->b].name);
        rc = rdb_eval_result(db, run_id, name, ev_metric_names[d->metric], d->ci.mean, d->ci.lo, d->ci.hi,
                             (int64_t)d->ci.n, err);
    }
    for (int j = 0; j < r->n_modes && !rc; j++)
        rc = rdb_eval_result(db, run_id, r->modes[j].name, "seconds", r->seconds[j], NAN, NAN, r->n_items, err);
    for (int i = 0; i < r->n_items && !rc; i++) {
        const struct ev_item *it = &qa->items[i];
        const char *ref = it->choices ? it->choices[it->answer_index] : it->answer;
        for (int j = 0; j < r->n_modes && !rc; j++) {
            const struct ev_cell *c = ev_run_cell(r, i, j);
            char *sj = cell_json(it, c);
            if (!sj)
                return lk_errf(err, LK_ERR_NOMEM, "out of memory");
            rc = rdb_eval_item(db, run_id, it->id, r->modes[j].name, it->question, ref, c->answer, c->retrieved,
                               sj, err);
            lk_free(sj);
        }
    }
    return rc;
}

// ---- set-up ----

/* The systems asked for: "ft" (--adapter or --tuned) first, then each --system, no name twice. */
static int setup_systems_parse(struct ev_setup *s, const struct ev_setup_opts *o, struct lk_err *err)
{
    int n = (o->adapter || o->tuned) + o->n_systems;
    s->systems = lk_calloc((size_t)n + 1, sizeof *s->systems);
    s->names = lk_calloc((size_t)n + 1, sizeof *s->names);
    if (!s->systems || !s->names)
        return lk_errf(err, LK_ERR_NOMEM, "out of memory");
    if (o->adapter || o->tuned) {
        snprintf(s->systems[0].name, sizeof s->systems[0].name, "ft");
        s->systems[0].path = o->adapter ? o->adapter : o->tuned;
        s->names[s->n_systems++] = s->systems[0].name;
    }
    for (int i = 0; i < o->n_systems; i++) {
        struct ev_system *sy = &s->systems[s->n_systems];
        int rc = ev_system_parse(o->systems[i], sy, err);
        if (rc)
            return rc;
        for (int j = 0; j < s->n_systems; j++)
            if (!strcmp(s->names[j], sy->name))
                return lk_errf(err, LK_ERR_USAGE, "system '%s' is given twice%s", sy->name,
                               strcmp(sy->name, "ft") ? "" : " (--adapter and --tuned are the system 'ft')");
        s->names[s->n_systems++] = sy->name;
    }
    return LK_OK;
}

/* The modes of the retain questions: base and each system, closed book, and with retrieval
 * over retain_docs at every k of the run. */
static int setup_retain_modes(struct ev_setup *s, const struct ev_setup_opts *o, const int *ks, int nk,
                              struct lk_err *err)
{
    if (o->retain_docs && !o->retain)
        return lk_errf(err, LK_ERR_USAGE, "--retain-docs needs --retain (the questions to retrieve for)");
    if ((o->retain || o->retain_text) && !s->n_systems)
        return lk_errf(err, LK_ERR_USAGE, "--retain and --retain-text compare systems with the base: give "
                       "--adapter, --tuned or --system");
    if (!o->retain)
        return LK_OK;
    struct ev_mode *m = NULL;
    int n = 0, rc = ev_modes_parse(o->retain_docs ? "base,rag,ft,ft+rag" : "base,ft", ks, nk, &m, &n, err);
    if (rc)
        return lk_err_prefix(err, "--retain-docs");
    rc = ev_modes_expand(m, n, s->names, s->n_systems, &s->retain_modes, &s->n_retain_modes, err);
    lk_free(m);
    return rc;
}

int ev_setup_parse(struct ev_setup *s, const struct ev_setup_opts *o, struct lk_err *err)
{
    memset(s, 0, sizeof *s);
    if ((o->adapter && o->tuned) || (o->docs && o->index))
        return lk_errf(err, LK_ERR_USAGE, "give --adapter or --tuned, and --docs or --index, not both");
    int ks[EV_MAX_K], nk, rc;
    if ((rc = ev_k_parse(o->k, ks, &nk, err)) || (rc = setup_systems_parse(s, o, err)))
        return rc;
    int have_docs = o->docs || o->index, have_tuned = s->n_systems > 0;
    char deflist[32];
    snprintf(deflist, sizeof deflist, "base%s%s%s", have_docs ? ",rag" : "", have_tuned ? ",ft" : "",
             have_docs && have_tuned ? ",ft+rag" : "");
    struct ev_mode *m = NULL;
    int n = 0;
    if ((rc = ev_modes_parse(o->modes ? o->modes : deflist, ks, nk, &m, &n, err)))
        return rc;
    if (have_tuned)
        rc = ev_modes_expand(m, n, s->names, s->n_systems, &s->modes, &s->n_modes, err);
    else
        s->modes = m, s->n_modes = n, m = NULL;
    lk_free(m);
    if (rc)
        return rc;
    for (int j = 0; j < s->n_modes; j++) {
        s->kmax = s->modes[j].k > s->kmax ? s->modes[j].k : s->kmax;
        s->need_tuned |= s->modes[j].tuned;
    }
    if (s->kmax > 0 && !have_docs)
        return lk_errf(err, LK_ERR_USAGE, "the rag modes need --docs or --index");
    if (s->need_tuned && !have_tuned)
        return lk_errf(err, LK_ERR_USAGE, "the ft modes need --adapter, --tuned or --system");
    if ((rc = setup_retain_modes(s, o, ks, nk, err)))
        return rc;
    s->ftok = FTS_TOK_ANY;
    return o->fts_tok ? fts_tokenizer_parse(o->fts_tok, &s->ftok, err) : LK_OK;
}

/* An index of docs built for this run into a temporary file named after the process and tag. */
static int build_index(const struct ev_setup *s, const struct ev_setup_opts *o, const char *docs,
                       const char *tag, char *tmp, size_t tmp_n, struct fts_index *idx, struct lk_err *err)
{
    const char *td = getenv("TMPDIR");
    snprintf(tmp, tmp_n, "%s/lorakit-eval-%ld%s.fts", td && *td ? td : "/tmp", (long)getpid(), tag);
    struct fts_settings st = { s->ftok == FTS_TOK_ANY ? FTS_TOK_UNICODE61 : s->ftok, o->chunk_tokens, o->overlap };
    if (o->on_indexing)
        o->on_indexing(o->ctx, docs, &st);
    int rc = fts_index_build(docs, tmp, &st, 1, NULL, err);
    return rc ? rc : fts_open(idx, tmp, err);
}

/* The retrieval index: docs indexed into a temporary file, or an index whose settings match. */
static int setup_index(struct ev_setup *s, const struct ev_setup_opts *o, struct lk_err *err)
{
    if (o->index) {
        struct fts_settings want = { s->ftok, 0, -1 };
        int rc = fts_open(&s->idx, o->index, err);
        if (!rc && fts_index_check(&s->idx, &want, err))
            rc = err->code = LK_ERR_FORMAT; // the index is bad input, not a bad flag
        return rc;
    }
    return build_index(s, o, o->docs, "", s->tmp_index, sizeof s->tmp_index, &s->idx, err);
}

/* Every system checked against the base before any is loaded, so a misfit is refused before
 * any work. --adapter is an adapter and --tuned a model folder, whatever they hold. */
static int setup_systems(struct ev_setup *s, const struct ev_setup_opts *o, struct lk_err *err)
{
    int rc = LK_OK;
    for (int i = 0; i < s->n_systems && !rc; i++) {
        int force = i == 0 && (o->adapter || o->tuned) ? (o->adapter ? 1 : 2) : 0;
        rc = ev_system_check(&s->systems[i], force, &s->base, o->model, err);
    }
    for (int i = 0; i < s->n_systems && !rc; i++)
        rc = ev_system_load(&s->systems[i], &s->base, o->model, o->keep, err);
    return rc;
}

/* The retention inputs: retain questions (and their index), texts. */
static int setup_retain(struct ev_setup *s, const struct ev_setup_opts *o, struct lk_err *err)
{
    int rc = LK_OK;
    if (o->retain_text) {
        if (!(s->text = lk_calloc(1, sizeof *s->text)))
            return lk_errf(err, LK_ERR_NOMEM, "out of memory");
        if ((rc = ev_text_load(s->text, o->retain_text, o->limit, err)))
            return rc;
    }
    if (o->retain && (rc = ev_qa_load(&s->retain, o->retain, o->limit, err)))
        return rc;
    return LK_OK;
}

int ev_setup_load(struct ev_setup *s, const struct ev_setup_opts *o, struct lk_err *err)
{
    int rc;
    if ((rc = ev_qa_load(&s->qa, o->qa, o->limit, err)) || (rc = setup_retain(s, o, err)))
        return rc;
    if ((rc = model_load_keep(&s->base, o->model, (enum model_keep)o->keep, err)) ||
        (rc = tok_load(&s->tk, o->model, err)))
        return rc;
    if (tok_vocab_size(s->tk) > s->base.cfg.vocab_size)
        return lk_errf(err, LK_ERR_SHAPE, "%s: the tokenizer has %d ids, the model's vocabulary %d", o->model,
                       (int)tok_vocab_size(s->tk), s->base.cfg.vocab_size);
    if ((rc = chat_fmt_init(&s->fmt, s->tk, o->tmpl, err)))
        return rc;
    if ((s->need_tuned || o->retain || o->retain_text) && (rc = setup_systems(s, o, err)))
        return rc;
    if (s->kmax > 0) {
        if ((rc = setup_index(s, o, err)))
            return rc;
        s->cfg.idx = &s->idx;
    }
    int maxpos = s->base.cfg.max_position_embeddings;
    s->cfg.tk = s->tk;
    s->cfg.fmt = &s->fmt;
    s->cfg.base = &s->base;
    s->cfg.max_new = o->max_new;
    s->cfg.max_ctx = maxpos > 0 ? maxpos : 2048;
    s->cfg.batch = o->batch;
    s->retain_cfg = s->cfg;
    s->retain_cfg.idx = NULL;
    if (o->retain_docs) {
        if ((rc = build_index(s, o, o->retain_docs, "-retain", s->tmp_retain_index, sizeof s->tmp_retain_index,
                              &s->retain_idx, err)))
            return rc;
        s->retain_cfg.idx = &s->retain_idx;
    }
    return LK_OK;
}

void ev_setup_release(struct ev_setup *s)
{
    fts_close(&s->idx);
    if (s->tmp_index[0])
        unlink(s->tmp_index);
    fts_close(&s->retain_idx);
    if (s->tmp_retain_index[0])
        unlink(s->tmp_retain_index);
    ev_qa_release(&s->qa);
    ev_qa_release(&s->retain);
    ev_text_release(s->text);
    lk_free(s->text);
    tok_free(s->tk);
    for (int i = 0; s->systems && i < s->n_systems; i++)
        ev_system_release(&s->systems[i]);
    lk_free(s->systems);
    lk_free(s->names);
    model_release(&s->base);
    lk_free(s->modes);
    lk_free(s->retain_modes);
    memset(s, 0, sizeof *s);
}
