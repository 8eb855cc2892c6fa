/*
 * rc_eval.c - how well a model answers a medworld world's questions closed-book and from a
 * retrieved passage (datasets/base-model/README.md reports its output for the base model).
 *
 *   build/opt/rc_eval MODEL_DIR WORLD_DIR [--qa FILE] [--limit N] [--seed S]
 *
 * For each question of WORLD_DIR/qa_test.jsonl (the held-out phrasings) it scores the short
 * answer under three prompts, in the chat template of the model's tokenizer:
 *   closed-book   the question alone;
 *   gold passage  "Context:\n<gold doc>\n\nQuestion: <q>" (the RC format of datasets/README.md);
 *   3 passages    the gold document and two random documents of other entities of the same
 *                 world, in random order, joined by "\n\n".
 * Scores, teacher-forced in one forward pass per prompt:
 *   answer NLL    mean negative log-likelihood (nats) per answer token, <|im_end|> included;
 *   exact         every answer token and the end-of-turn token is the argmax given the correct
 *                 prefix, which is exactly "greedy decoding returns the answer and stops".
 * The distractors depend only on --seed. Threads: OMP_NUM_THREADS.
 */
#include <cjson/cJSON.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../libcore/chat.h"
#include "../libcore/lk.h"
#include "../libcore/model.h"
#include "../libcore/tok.h"

enum { RC_CLOSED, RC_GOLD, RC_THREE, RC_NCOND };
static const char *const rc_cond_name[RC_NCOND] = { "closed-book", "gold passage", "3 passages" };

struct rc_doc {
    char *id, *entity, *text; /* owned */
};

struct rc_score {
    double nll;   /* sum over answer tokens */
    long tokens;  /* answer tokens scored */
    int exact;    /* questions answered exactly */
    int n;        /* questions */
};

static char *rc_strdup(const char *s)
{
    size_t n = strlen(s) + 1;
    char *p = malloc(n);
    if (p)
        memcpy(p, s, n);
    return p;
}

static const char *rc_json_str(const cJSON *o, const char *key)
{
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, key);
    return cJSON_IsString(v) ? v->valuestring : NULL;
}

/* Reads docs.jsonl into *out (caller frees each field and the array). */
static int rc_docs_load(const char *path, struct rc_doc **out, int *out_n)
{
    FILE *f = fopen(path, "r");
    if (!f) {
        fprintf(stderr, "rc_eval: error: cannot open %s\n", path);
        return 1;
    }
    struct rc_doc *d = NULL;
    int n = 0, cap = 0, line = 0;
    char *buf = NULL;
    size_t bcap = 0;
    while (getline(&buf, &bcap, f) > 0) {
        line++;
        cJSON *o = cJSON_Parse(buf);
        const char *id = rc_json_str(o, "id"), *ent = rc_json_str(o, "entity"), *text = rc_json_str(o, "text");
        if (!id || !ent || !text) {
            fprintf(stderr, "rc_eval: error: %s:%d: expected {\"id\",\"entity\",\"text\"}\n", path, line);
            cJSON_Delete(o);
            free(buf);
            fclose(f);
            return 1;
        }
        if (n == cap) {
            cap = cap ? 2 * cap : 256;
            d = realloc(d, sizeof *d * (size_t)cap);
            if (!d)
                abort();
        }
        d[n++] = (struct rc_doc){ rc_strdup(id), rc_strdup(ent), rc_strdup(text) };
        cJSON_Delete(o);
    }
    free(buf);
    fclose(f);
    *out = d;
    *out_n = n;
    return 0;
}

/* Scores one prompt/answer pair: adds to s. Returns a status (err filled). */
static int rc_score_one(struct model *m, struct tok *tk, const struct chat_fmt *fmt, const char *user,
                        const char *answer, struct rc_score *s, struct lk_err *err)
{
    struct chat_msg msgs[2] = { { "user", user }, { "assistant", answer } };
    struct chat_seq seq = { 0 };
    int rc = chat_encode(tk, fmt, msgs, 2, 0, &seq, err);
    int T = (int)seq.n;
    int *ids = rc ? NULL : malloc(sizeof(int) * (size_t)T);
    if (!rc && !ids)
        rc = lk_errf(err, LK_ERR_NOMEM, "out of memory");
    if (!rc) {
        for (int t = 0; t < T; t++)
            ids[t] = seq.ids[t];
        rc = model_plan(m, 1, T, 0, err);
    }
    if (!rc)
        rc = model_forward(m, NULL, ids, NULL, NULL, NULL, 0, NULL, err);
    if (!rc) {
        int V = m->cfg.vocab_size, ok = 1;
        const float *logits = model_logits(m);
        for (int t = 1; t < T; t++) {
            if (seq.labels[t] == CHAT_IGNORE)
                continue;
            const float *z = logits + (size_t)(t - 1) * V;
            int best = 0;
            for (int v = 1; v < V; v++)
                if (z[v] > z[best])
                    best = v;
            double lse = 0;
            for (int v = 0; v < V; v++)
                lse += exp((double)z[v] - z[best]);
            s->nll += log(lse) + z[best] - z[seq.labels[t]];
            s->tokens++;
            ok &= best == seq.labels[t];
        }
        s->exact += ok;
        s->n++;
    }
    free(ids);
    chat_seq_release(&seq);
    return rc;
}

int main(int argc, char **argv)
{
    const char *model_dir = NULL, *world = NULL, *qa_name = "qa_test.jsonl";
    long limit = 0;
    uint64_t seed = 1;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--qa") && i + 1 < argc)
            qa_name = argv[++i];
        else if (!strcmp(argv[i], "--limit") && i + 1 < argc)
            limit = strtol(argv[++i], NULL, 10);
        else if (!strcmp(argv[i], "--seed") && i + 1 < argc)
            seed = strtoull(argv[++i], NULL, 10);
        else if (argv[i][0] != '-' && !model_dir)
            model_dir = argv[i];
        else if (argv[i][0] != '-' && !world)
            world = argv[i];
        else {
            model_dir = NULL;
            break;
        }
    }
    if (!model_dir || !world) {
        fprintf(stderr, "usage: rc_eval MODEL_DIR WORLD_DIR [--qa FILE] [--limit N] [--seed S]\n"
                        "Scores the short answers of WORLD_DIR/qa_test.jsonl closed-book, with the gold\n"
                        "passage and with 3 passages (teacher-forced answer NLL, greedy exact match).\n");
        return 2;
    }
    struct lk_err err = { 0 };
    struct model m = { 0 };
    struct tok *tk = NULL;
    struct chat_fmt fmt;
    int rc = model_load(&m, model_dir, &err);
    if (!rc)
        rc = tok_load(&tk, model_dir, &err);
    if (!rc)
        rc = chat_fmt_init(&fmt, tk, NULL, &err);
    if (rc) {
        fprintf(stderr, "rc_eval: error: %s\n", err.msg);
        return 1;
    }
    char path[4096];
    struct rc_doc *docs = NULL;
    int n_docs = 0;
    snprintf(path, sizeof path, "%s/docs.jsonl", world);
    if (rc_docs_load(path, &docs, &n_docs))
        return 1;
    snprintf(path, sizeof path, "%s/%s", world, qa_name);
    FILE *f = fopen(path, "r");
    if (!f) {
        fprintf(stderr, "rc_eval: error: cannot open %s\n", path);
        return 1;
    }
    struct lk_rng rng;
    lk_rng_seed(&rng, seed);
    struct rc_score sc[RC_NCOND] = { { 0 } };
    char *buf = NULL, *user = NULL;
    size_t bcap = 0, ucap = 0;
    int line = 0;
    while (!rc && getline(&buf, &bcap, f) > 0 && (!limit || line < limit)) {
        line++;
        cJSON *o = cJSON_Parse(buf);
        const char *q = rc_json_str(o, "question"), *a = rc_json_str(o, "answer"), *doc_id = rc_json_str(o, "doc_id");
        int gold = -1;
        for (int i = 0; doc_id && i < n_docs && gold < 0; i++)
            if (!strcmp(docs[i].id, doc_id))
                gold = i;
        if (!q || !a || gold < 0) {
            fprintf(stderr, "rc_eval: error: %s:%d: no question, answer or known doc_id\n", path, line);
            cJSON_Delete(o);
            rc = 1;
            break;
        }
        /* two distractors of other entities, then a random order of the three passages */
        int pick[3] = { gold, -1, -1 };
        for (int k = 1; k < 3; k++) {
            int j;
            do
                j = (int)(lk_rng_u64(&rng) % (uint64_t)n_docs);
            while (!strcmp(docs[j].entity, docs[gold].entity) || (k == 2 && !strcmp(docs[j].entity, docs[pick[1]].entity)));
            pick[k] = j;
        }
        for (int k = 2; k > 0; k--) {
            int j = (int)(lk_rng_u64(&rng) % (uint64_t)(k + 1)), t = pick[k];
            pick[k] = pick[j];
            pick[j] = t;
        }
        size_t need = strlen(q) + 64;
        for (int k = 0; k < 3; k++)
            need += strlen(docs[pick[k]].text) + 2;
        if (need > ucap) {
            ucap = need;
            user = realloc(user, ucap);
            if (!user)
                abort();
        }
        for (int c = 0; c < RC_NCOND && !rc; c++) {
            if (c == RC_CLOSED)
                snprintf(user, ucap, "%s", q);
            else if (c == RC_GOLD)
                snprintf(user, ucap, "Context:\n%s\n\nQuestion: %s", docs[gold].text, q);
            else
                snprintf(user, ucap, "Context:\n%s\n\n%s\n\n%s\n\nQuestion: %s", docs[pick[0]].text,
                         docs[pick[1]].text, docs[pick[2]].text, q);
            if ((rc = rc_score_one(&m, tk, &fmt, user, a, &sc[c], &err)))
                fprintf(stderr, "rc_eval: error: %s:%d: %s\n", path, line, err.msg);
        }
        cJSON_Delete(o);
    }
    fclose(f);
    if (!rc) {
        printf("rc_eval: %s on %s (%d questions)\n", model_dir, path, sc[0].n);
        printf("| prompt | answer NLL (nats/token) | greedy exact match |\n|---|---:|---:|\n");
        for (int c = 0; c < RC_NCOND; c++)
            printf("| %s | %.3f | %.1f%% (%d/%d) |\n", rc_cond_name[c],
                   sc[c].tokens ? sc[c].nll / (double)sc[c].tokens : NAN,
                   sc[c].n ? 100.0 * sc[c].exact / sc[c].n : 0.0, sc[c].exact, sc[c].n);
    }
    free(buf);
    free(user);
    for (int i = 0; i < n_docs; i++) {
        free(docs[i].id);
        free(docs[i].entity);
        free(docs[i].text);
    }
    free(docs);
    tok_free(tk);
    model_release(&m);
    return rc ? 1 : 0;
}
