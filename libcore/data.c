/*
 * data.c - JSONL training data to ids and labels: every format of DESIGN.md, templated
 * through chat.c, truncated to the maximum length (counted), broken lines reported as
 * file:line (or skipped and counted with skip_bad). All records live in two int blocks.
 */
#include "data.h"

#include <cJSON.h>
#include <stdlib.h>
#include <string.h>

#include "chat.h"
#include "tok.h"

void data_release(struct data_set *d)
{
    if (!d)
        return;
    lk_free(d->ex);
    lk_free(d->ids);
    lk_free(d->labels);
    memset(d, 0, sizeof *d);
}

int data_add(struct data_set *d, const int *ids, const int *labels, int n, int seq)
{
    if (n <= 0)
        return LK_OK;
    int truncated = seq > 0 && n > seq;
    if (truncated)
        n = seq;
    if (d->n == d->cap_ex) {
        int nc = d->cap_ex ? d->cap_ex * 2 : 16;
        struct data_example *ne = lk_realloc(d->ex, sizeof *ne * (size_t)nc);
        if (!ne)
            return LK_ERR_NOMEM;
        d->ex = ne;
        d->cap_ex = nc;
    }
    size_t need = d->n_tokens + (size_t)n;
    if (need > d->cap_tokens) {
        size_t nc = d->cap_tokens ? d->cap_tokens : 1024;
        while (nc < need)
            nc *= 2;
        int *ni = lk_realloc(d->ids, sizeof(int) * nc);
        if (!ni)
            return LK_ERR_NOMEM;
        d->ids = ni;
        int *nl = lk_realloc(d->labels, sizeof(int) * nc);
        if (!nl)
            return LK_ERR_NOMEM;
        d->labels = nl;
        d->cap_tokens = nc;
        // re-point examples into the moved blocks
        size_t off = 0;
        for (int i = 0; i < d->n; i++) {
            d->ex[i].ids = d->ids + off;
            d->ex[i].labels = d->labels + off;
            off += (size_t)d->ex[i].n;
        }
    }
    int *di = d->ids + d->n_tokens, *dl = d->labels + d->n_tokens;
    memcpy(di, ids, sizeof(int) * (size_t)n);
    for (int i = 0; i < n; i++) {
        dl[i] = labels ? labels[i] : ids[i];
        if (i > 0 && dl[i] != -100)
            d->n_trained++;
    }
    struct data_example *e = &d->ex[d->n++];
    e->n = n;
    e->ids = di;
    e->labels = dl;
    e->truncated = truncated;
    d->n_tokens += (size_t)n;
    d->n_truncated += truncated;
    if (n > d->max_len)
        d->max_len = n;
    return LK_OK;
}

/* One record to ids/labels; returns LK_OK or a message without the file:line prefix. */
static int record_encode(const char *line, struct tok *tk, const struct chat_fmt *fmt, int flags,
                         int vocab, struct chat_seq *seq, struct lk_err *err)
{
    cJSON *o = cJSON_Parse(line);
    int rc = LK_OK;
    if (!o || !cJSON_IsObject(o)) {
        cJSON_Delete(o);
        return lk_errf(err, LK_ERR_FORMAT, "not a JSON object");
    }
    const cJSON *ii = cJSON_GetObjectItemCaseSensitive(o, "input_ids");
    const cJSON *tx = cJSON_GetObjectItemCaseSensitive(o, "text");
    if (ii) {
        const cJSON *lb = cJSON_GetObjectItemCaseSensitive(o, "labels");
        int n = cJSON_IsArray(ii) ? cJSON_GetArraySize(ii) : -1;
        if (n <= 0)
            rc = lk_errf(err, LK_ERR_FORMAT, "'input_ids' must be a non-empty array of token ids");
        else if (lb && (!cJSON_IsArray(lb) || cJSON_GetArraySize(lb) != n))
            rc = lk_errf(err, LK_ERR_FORMAT, "'labels' must be an array as long as 'input_ids' (%d)", n);
        else {
            chat_seq_release(seq);
            seq->ids = lk_malloc(sizeof(int32_t) * (size_t)n);
            seq->labels = lk_malloc(sizeof(int32_t) * (size_t)n);
            if (!seq->ids || !seq->labels)
                rc = lk_errf(err, LK_ERR_NOMEM, "out of memory");
            seq->n = seq->cap = (size_t)n;
            for (int i = 0; i < n && !rc; i++) {
                const cJSON *a = cJSON_GetArrayItem(ii, i), *b = lb ? cJSON_GetArrayItem(lb, i) : a;
                if (!cJSON_IsNumber(a) || a->valuedouble < 0 || a->valuedouble > 2147483647.0 ||
                    a->valuedouble != (double)(int)a->valuedouble)
                    rc = lk_errf(err, LK_ERR_FORMAT, "'input_ids'[%d] is not a token id", i);
                else if (!cJSON_IsNumber(b) || (b->valuedouble != -100 &&
                         (b->valuedouble < 0 || b->valuedouble > 2147483647.0 ||
                          b->valuedouble != (double)(int)b->valuedouble)))
                    rc = lk_errf(err, LK_ERR_FORMAT, "'labels'[%d] must be a token id or -100", i);
                else if (vocab > 0 && (a->valuedouble >= vocab || b->valuedouble >= vocab))
                    rc = lk_errf(err, LK_ERR_FORMAT, "'%s'[%d] = %.0f is outside the vocabulary (%d tokens)",
                                 a->valuedouble >= vocab ? "input_ids" : "labels", i,
                                 a->valuedouble >= vocab ? a->valuedouble : b->valuedouble, vocab);
                else {
                    seq->ids[i] = (int32_t)a->valuedouble;
                    seq->labels[i] = (int32_t)b->valuedouble;
                }
            }
        }
    } else if (tx) {
        if (!cJSON_IsString(tx))
            rc = lk_errf(err, LK_ERR_FORMAT, "'text' must be a string");
        else if (!tk)
            rc = lk_errf(err, LK_ERR_USAGE, "a tokenizer is needed for 'text' records");
        else if (!tx->valuestring[0])
            rc = lk_errf(err, LK_ERR_FORMAT, "'text' is empty");
        else {
            struct tok_ids ids = { 0 };
            rc = tok_encode(tk, tx->valuestring, strlen(tx->valuestring), 0, &ids, err);
            int32_t eos = tok_eos(tk);
            if (!rc && eos >= 0)
                rc = tok_ids_push(&ids, eos, err);
            if (!rc) {
                chat_seq_release(seq);
                seq->n = seq->cap = ids.n;
                seq->ids = ids.v;
                seq->labels = lk_malloc(sizeof(int32_t) * (ids.n ? ids.n : 1));
                if (!seq->labels)
                    rc = lk_errf(err, LK_ERR_NOMEM, "out of memory");
                else
                    memcpy(seq->labels, ids.v, sizeof(int32_t) * ids.n);
                ids.v = NULL;
            }
            tok_ids_release(&ids);
        }
    } else if (cJSON_GetObjectItemCaseSensitive(o, "messages") ||
               cJSON_GetObjectItemCaseSensitive(o, "instruction")) {
        if (!tk)
            rc = lk_errf(err, LK_ERR_USAGE, "a tokenizer is needed for chat and alpaca records");
        else
            rc = chat_encode_json(tk, fmt, line, flags, seq, err);
    } else
        rc = lk_errf(err, LK_ERR_FORMAT, "unknown record format: expected 'messages', 'instruction', "
                     "'text' or 'input_ids'");
    cJSON_Delete(o);
    return rc;
}

static int load_file(struct data_set *d, const char *path, struct tok *tk, const struct chat_fmt *fmt,
                     const struct data_opts *o, struct lk_err *err)
{
    char *buf;
    size_t len;
    int rc = lk_read_file(path, &buf, &len, err);
    if (rc)
        return rc;
    if (len == 0) {
        lk_free(buf);
        return lk_errf(err, LK_ERR_FORMAT, "%s: file is empty", path);
    }
    struct chat_seq seq = { 0 };
    int *tmp = NULL;
    size_t tmp_n = 0;
    long lineno = 0, records = 0;
    char *p = buf, *end = buf + len;
    while (p < end && !rc) {
        char *nl = memchr(p, '\n', (size_t)(end - p));
        char *stop = nl ? nl : end;
        lineno++;
        size_t ll = (size_t)(stop - p);
        if (ll && p[ll - 1] == '\r')
            ll--;
        int has_nul = memchr(p, 0, ll) != NULL;
        p[ll] = 0;
        struct lk_err le = { 0 };
        int lrc;
        if (!nl && ll == 0)
            break; // the end of a file that ends with a newline
        if (has_nul)
            lrc = lk_errf(&le, LK_ERR_FORMAT, "line holds a NUL byte");
        else if (!p[strspn(p, " \t\r")])
            lrc = lk_errf(&le, LK_ERR_FORMAT, "empty line");
        else
            lrc = record_encode(p, tk, fmt, o->train_on_prompt ? CHAT_TRAIN_ALL : 0, o->vocab, &seq, &le);
        for (size_t i = 0; !lrc && o->vocab > 0 && i < seq.n; i++)
            if (seq.ids[i] >= o->vocab || seq.labels[i] >= o->vocab) // a tokenizer larger than the model
                lrc = lk_errf(&le, LK_ERR_USAGE, "token id %d is outside the model's vocabulary (%d tokens)",
                              seq.ids[i] >= o->vocab ? seq.ids[i] : seq.labels[i], o->vocab);
        if (lrc == LK_ERR_NOMEM) {
            rc = lk_errf(err, LK_ERR_NOMEM, "%s:%ld: out of memory", path, lineno);
            break;
        }
        if (lrc) {
            if (o->skip_bad && lrc != LK_ERR_USAGE) {
                d->n_skipped++;
            } else {
                rc = lk_errf(err, lrc, "%s:%ld: %s%s", path, lineno, le.msg,
                             o->skip_bad ? "" : " (--skip-bad skips and counts broken lines)");
                break;
            }
        } else {
            if (seq.n > tmp_n) {
                lk_free(tmp);
                tmp = lk_malloc(sizeof(int) * 2 * seq.n);
                tmp_n = tmp ? seq.n : 0;
                if (!tmp) {
                    rc = lk_errf(err, LK_ERR_NOMEM, "out of memory");
                    break;
                }
            }
            for (size_t i = 0; i < seq.n; i++) {
                tmp[i] = seq.ids[i];
                tmp[seq.n + i] = seq.labels[i];
            }
            if (data_add(d, tmp, tmp + seq.n, (int)seq.n, o->seq) != LK_OK) {
                rc = lk_errf(err, LK_ERR_NOMEM, "out of memory");
                break;
            }
            records++;
        }
        p = stop + 1;
    }
    if (!rc && records == 0)
        rc = lk_errf(err, LK_ERR_FORMAT, "%s: no usable record", path);
    chat_seq_release(&seq);
    lk_free(tmp);
    lk_free(buf);
    return rc;
}

int data_load(struct data_set *d, const char *paths, struct tok *tk, const struct data_opts *o,
              struct lk_err *err)
{
    memset(d, 0, sizeof *d);
    struct chat_fmt fmt;
    int rc;
    if (tk && (rc = chat_fmt_init(&fmt, tk, o->template_name, err)))
        return rc;
    char *list = lk_strdup(paths);
    if (!list)
        return lk_errf(err, LK_ERR_NOMEM, "out of memory");
    rc = LK_OK;
    char *save = NULL;
    for (char *p = strtok_r(list, ",", &save); p && !rc; p = strtok_r(NULL, ",", &save))
        rc = load_file(d, p, tk, tk ? &fmt : NULL, o, err);
    lk_free(list);
    if (rc)
        data_release(d);
    return rc;
}
