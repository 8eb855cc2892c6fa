/*
 * chat.c - chat templates (see chat.h). A conversation is rendered as a list of segments:
 * template tokens (by id) and text, each marked trained or not. Consecutive text segments
 * with the same flag are joined and tokenized as one string; the prompt and the answer are
 * tokenized apart (as LLaMA-Factory does), so the trained tokens are exactly
 * encode(answer) + end-of-turn, and the prompt's tokens are those of the generation
 * prompt at inference. (Hugging Face tokenizes the whole rendering at once; the two differ
 * only where BPE would merge across the header/answer boundary, e.g. an answer that
 * starts with a newline.)
 * Owns: nothing beyond the chat_seq it fills.
 */
#include "chat.h"

#include <cjson/cJSON.h>
#include <string.h>

static const char *QWEN25_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant.";

const char *chat_kind_name(enum chat_kind k)
{
    switch (k) {
    case CHAT_CHATML:
        return "chatml";
    case CHAT_LLAMA3:
        return "llama3";
    case CHAT_PLAIN:
        return "plain";
    }
    return "?";
}

static void add_stop(struct chat_fmt *f, int32_t id)
{
    if (id < 0 || f->n_stop == 4)
        return;
    for (int i = 0; i < f->n_stop; i++)
        if (f->stop[i] == id)
            return;
    f->stop[f->n_stop++] = id;
}

static int need_token(const struct tok *t, const char *s, int32_t *id, const char *tmpl, struct lk_err *err)
{
    *id = tok_find(t, s);
    if (*id < 0)
        return lk_errf(err, LK_ERR_MISSING, "the %s template needs token '%s', which this tokenizer lacks", tmpl, s);
    return LK_OK;
}

int chat_fmt_init(struct chat_fmt *f, const struct tok *t, const char *name, struct lk_err *err)
{
    memset(f, 0, sizeof *f);
    f->bos = f->start = f->hdr_end = f->eot = -1;
    const char *tmpl = tok_chat_template(t);
    enum chat_kind k;
    if (!name || !strcmp(name, "auto")) {
        if (tmpl && strstr(tmpl, "<|im_start|>"))
            k = CHAT_CHATML;
        else if (tmpl && strstr(tmpl, "<|start_header_id|>"))
            k = CHAT_LLAMA3;
        else
            k = CHAT_PLAIN;
    } else if (!strcmp(name, "chatml")) {
        k = CHAT_CHATML;
    } else if (!strcmp(name, "llama3")) {
        k = CHAT_LLAMA3;
    } else if (!strcmp(name, "plain")) {
        k = CHAT_PLAIN;
    } else {
        return lk_errf(err, LK_ERR_USAGE, "unknown chat template '%s' (chatml, llama3, plain or auto)", name);
    }
    f->kind = k;
    int rc = LK_OK;
    switch (k) {
    case CHAT_CHATML:
        rc = need_token(t, "<|im_start|>", &f->start, "chatml", err);
        if (!rc)
            rc = need_token(t, "<|im_end|>", &f->eot, "chatml", err);
        // Qwen2.5's template writes this system turn when the conversation has none.
        if (tmpl && strstr(tmpl, QWEN25_SYSTEM))
            f->default_system = QWEN25_SYSTEM;
        add_stop(f, f->eot);
        add_stop(f, tok_eos(t));
        add_stop(f, tok_find(t, "<|endoftext|>"));
        break;
    case CHAT_LLAMA3:
        rc = need_token(t, "<|start_header_id|>", &f->start, "llama3", err);
        if (!rc)
            rc = need_token(t, "<|end_header_id|>", &f->hdr_end, "llama3", err);
        if (!rc)
            rc = need_token(t, "<|eot_id|>", &f->eot, "llama3", err);
        f->bos = tok_bos(t) >= 0 ? tok_bos(t) : tok_find(t, "<|begin_of_text|>");
        add_stop(f, f->eot);
        add_stop(f, tok_eos(t));
        add_stop(f, tok_find(t, "<|end_of_text|>"));
        break;
    case CHAT_PLAIN:
        f->eot = tok_eos(t);
        if (f->eot < 0)
            f->eot = tok_find(t, "<|endoftext|>");
        if (f->eot < 0)
            rc = lk_errf(err, LK_ERR_MISSING, "the plain template needs an eos token "
                                              "(tokenizer_config.json 'eos_token')");
        f->bos = tok_add_bos(t) ? tok_bos(t) : -1;
        add_stop(f, f->eot);
        break;
    }
    return rc;
}

int chat_is_stop(const struct chat_fmt *f, int32_t id)
{
    for (int i = 0; i < f->n_stop; i++)
        if (f->stop[i] == id)
            return 1;
    return 0;
}

void chat_seq_release(struct chat_seq *s)
{
    if (!s)
        return;
    lk_free(s->ids);
    lk_free(s->labels);
    memset(s, 0, sizeof *s);
}

static int seq_push(struct chat_seq *s, int32_t id, int32_t label, struct lk_err *err)
{
    if (s->n == s->cap) {
        size_t cap = s->cap ? s->cap * 2 : 256;
        int32_t *a = lk_realloc(s->ids, cap * sizeof *a);
        if (!a)
            return lk_errf(err, LK_ERR_NOMEM, "out of memory");
        s->ids = a;
        int32_t *b = lk_realloc(s->labels, cap * sizeof *b);
        if (!b)
            return lk_errf(err, LK_ERR_NOMEM, "out of memory");
        s->labels = b;
        s->cap = cap;
    }
    s->ids[s->n] = id;
    s->labels[s->n] = label;
    s->n++;
    return LK_OK;
}

// ---- segments ----

struct seg {
    const char *s; /* borrowed text, or NULL for a token */
    size_t n;
    int32_t id;
    int trained;
};

struct segs {
    struct seg *v; /* owned */
    int n, cap;
};

static int seg_add(struct segs *a, const char *s, size_t n, int32_t id, int trained, struct lk_err *err)
{
    if (a->n == a->cap) {
        int cap = a->cap ? a->cap * 2 : 32;
        struct seg *v = lk_realloc(a->v, (size_t)cap * sizeof *v);
        if (!v)
            return lk_errf(err, LK_ERR_NOMEM, "out of memory");
        a->v = v;
        a->cap = cap;
    }
    a->v[a->n++] = (struct seg){ s, n, id, trained };
    return LK_OK;
}

static int seg_text(struct segs *a, const char *s, int trained, struct lk_err *err)
{
    return seg_add(a, s, strlen(s), -1, trained, err);
}

static int seg_tok(struct segs *a, int32_t id, int trained, struct lk_err *err)
{
    return seg_add(a, NULL, 0, id, trained, err);
}

static int is_ws(char c)
{
    return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\v' || c == '\f';
}

/* Renders one message; trained marks its content and end-of-turn token. */
static int render_msg(const struct chat_fmt *f, struct segs *a, const char *role, const char *content,
                      int trained, struct lk_err *err)
{
    int rc = LK_OK;
    size_t n = strlen(content);
    switch (f->kind) {
    case CHAT_CHATML:
        rc = seg_tok(a, f->start, 0, err);
        if (!rc)
            rc = seg_text(a, role, 0, err);
        if (!rc)
            rc = seg_text(a, "\n", 0, err);
        if (!rc)
            rc = seg_add(a, content, n, -1, trained, err);
        if (!rc)
            rc = seg_tok(a, f->eot, trained, err);
        if (!rc)
            rc = seg_text(a, "\n", 0, err);
        break;
    case CHAT_LLAMA3:
        while (n && is_ws(*content)) { // the template writes message['content'] | trim
            content++;
            n--;
        }
        while (n && is_ws(content[n - 1]))
            n--;
        rc = seg_tok(a, f->start, 0, err);
        if (!rc)
            rc = seg_text(a, role, 0, err);
        if (!rc)
            rc = seg_tok(a, f->hdr_end, 0, err);
        if (!rc)
            rc = seg_text(a, "\n\n", 0, err);
        if (!rc)
            rc = seg_add(a, content, n, -1, trained, err);
        if (!rc)
            rc = seg_tok(a, f->eot, trained, err);
        break;
    case CHAT_PLAIN:
        if (!strcmp(role, "system")) {
            rc = seg_add(a, content, n, -1, 0, err);
            if (!rc)
                rc = seg_text(a, "\n\n", 0, err);
        } else if (!strcmp(role, "user")) {
            rc = seg_text(a, "### Instruction:\n", 0, err);
            if (!rc)
                rc = seg_add(a, content, n, -1, 0, err);
            if (!rc)
                rc = seg_text(a, "\n\n", 0, err);
        } else {
            rc = seg_text(a, "### Response:\n", 0, err);
            if (!rc)
                rc = seg_add(a, content, n, -1, trained, err);
            if (!rc)
                rc = seg_tok(a, f->eot, trained, err);
        }
        break;
    }
    return rc;
}

static int render_gen_header(const struct chat_fmt *f, struct segs *a, struct lk_err *err)
{
    int rc = LK_OK;
    switch (f->kind) {
    case CHAT_CHATML:
        rc = seg_tok(a, f->start, 0, err);
        if (!rc)
            rc = seg_text(a, "assistant\n", 0, err);
        break;
    case CHAT_LLAMA3:
        rc = seg_tok(a, f->start, 0, err);
        if (!rc)
            rc = seg_text(a, "assistant", 0, err);
        if (!rc)
            rc = seg_tok(a, f->hdr_end, 0, err);
        if (!rc)
            rc = seg_text(a, "\n\n", 0, err);
        break;
    case CHAT_PLAIN:
        rc = seg_text(a, "### Response:\n", 0, err);
        break;
    }
    return rc;
}

static int check_role(const char *role, int i, struct lk_err *err)
{
    if (!role || (strcmp(role, "system") && strcmp(role, "user") && strcmp(role, "assistant")))
        return lk_errf(err, LK_ERR_FORMAT, "messages[%d]: role '%s' is not system, user or assistant", i,
                       role ? role : "(none)");
    return LK_OK;
}

/* Renders a conversation: n messages, then the assistant header when gen. */
static int render(const struct chat_fmt *f, const struct chat_msg *msgs, int n, int gen, struct segs *a,
                  struct lk_err *err)
{
    int rc = LK_OK;
    if (f->bos >= 0)
        rc = seg_tok(a, f->bos, 0, err);
    if (!rc && f->default_system && (n == 0 || strcmp(msgs[0].role, "system")))
        rc = render_msg(f, a, "system", f->default_system, 0, err);
    for (int i = 0; i < n && !rc; i++) {
        rc = check_role(msgs[i].role, i, err);
        if (!rc && !msgs[i].content)
            rc = lk_errf(err, LK_ERR_FORMAT, "messages[%d]: no 'content'", i);
        if (!rc)
            rc = render_msg(f, a, msgs[i].role, msgs[i].content, !strcmp(msgs[i].role, "assistant"), err);
    }
    if (!rc && gen)
        rc = render_gen_header(f, a, err);
    return rc;
}

/* Tokenizes segments [i, j) (all text, one trained flag) as one string. */
static int encode_run(struct tok *t, const struct seg *s, int i, int j, int all, struct chat_seq *out,
                      struct lk_err *err)
{
    size_t total = 0;
    for (int k = i; k < j; k++)
        total += s[k].n;
    char *buf = lk_malloc(total + 1);
    if (!buf)
        return lk_errf(err, LK_ERR_NOMEM, "out of memory");
    size_t off = 0;
    for (int k = i; k < j; k++) {
        memcpy(buf + off, s[k].s, s[k].n);
        off += s[k].n;
    }
    struct tok_ids ids = { 0 };
    int rc = tok_encode(t, buf, total, 1, &ids, err);
    for (size_t m = 0; m < ids.n && !rc; m++)
        rc = seq_push(out, ids.v[m], all || s[i].trained ? ids.v[m] : CHAT_IGNORE, err);
    tok_ids_release(&ids);
    lk_free(buf);
    return rc;
}

static int encode_segs(struct tok *t, const struct segs *a, int all, struct chat_seq *out, struct lk_err *err)
{
    out->n = 0;
    int rc = LK_OK;
    for (int i = 0; i < a->n && !rc;) {
        if (!a->v[i].s) {
            rc = seq_push(out, a->v[i].id, all || a->v[i].trained ? a->v[i].id : CHAT_IGNORE, err);
            i++;
            continue;
        }
        int j = i;
        while (j < a->n && a->v[j].s && a->v[j].trained == a->v[i].trained)
            j++;
        rc = encode_run(t, a->v, i, j, all, out, err);
        i = j;
    }
    return rc;
}

int chat_encode(struct tok *t, const struct chat_fmt *f, const struct chat_msg *msgs, int n, int flags,
                struct chat_seq *out, struct lk_err *err)
{
    int has_assistant = 0;
    for (int i = 0; i < n; i++)
        has_assistant |= msgs[i].role && !strcmp(msgs[i].role, "assistant");
    if (!has_assistant)
        return lk_errf(err, LK_ERR_FORMAT, "record has no assistant turn: nothing to train on");
    struct segs a = { 0 };
    int rc = render(f, msgs, n, 0, &a, err);
    if (!rc)
        rc = encode_segs(t, &a, flags & CHAT_TRAIN_ALL, out, err);
    lk_free(a.v);
    return rc;
}

int chat_prompt(struct tok *t, const struct chat_fmt *f, const struct chat_msg *msgs, int n, struct tok_ids *out,
                struct lk_err *err)
{
    if (n > 0 && msgs[n - 1].role && !strcmp(msgs[n - 1].role, "assistant"))
        n--; // the answer to be generated
    struct segs a = { 0 };
    struct chat_seq s = { 0 };
    int rc = render(f, msgs, n, 1, &a, err);
    if (!rc)
        rc = encode_segs(t, &a, 1, &s, err);
    out->n = 0;
    for (size_t i = 0; i < s.n && !rc; i++)
        rc = tok_ids_push(out, s.ids[i], err);
    chat_seq_release(&s);
    lk_free(a.v);
    return rc;
}

static char *alpaca_user(const char *instruction, const char *input, struct lk_err *err)
{
    size_t ni = strlen(instruction), nn = input ? strlen(input) : 0;
    char *u = lk_malloc(ni + nn + 3);
    if (!u) {
        lk_errf(err, LK_ERR_NOMEM, "out of memory");
        return NULL;
    }
    memcpy(u, instruction, ni);
    if (nn) {
        memcpy(u + ni, "\n\n", 2);
        memcpy(u + ni + 2, input, nn);
        ni += nn + 2;
    }
    u[ni] = 0;
    return u;
}

int chat_encode_alpaca(struct tok *t, const struct chat_fmt *f, const char *instruction, const char *input,
                       const char *output, int flags, struct chat_seq *out, struct lk_err *err)
{
    if (!instruction)
        return lk_errf(err, LK_ERR_FORMAT, "missing field 'instruction'");
    if (!output)
        return lk_errf(err, LK_ERR_FORMAT, "missing field 'output': no assistant turn to train on");
    char *u = alpaca_user(instruction, input, err);
    if (!u)
        return err->code;
    struct chat_msg m[2] = { { "user", u }, { "assistant", output } };
    int rc = chat_encode(t, f, m, 2, flags, out, err);
    lk_free(u);
    return rc;
}

int chat_prompt_user(struct tok *t, const struct chat_fmt *f, const char *system, const char *user,
                     struct tok_ids *out, struct lk_err *err)
{
    struct chat_msg m[2] = { { "system", system }, { "user", user } };
    return system ? chat_prompt(t, f, m, 2, out, err) : chat_prompt(t, f, m + 1, 1, out, err);
}

// ---- JSON records ----

static const char *jstr(const cJSON *o, const char *key, int *bad)
{
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, key);
    if (v && !cJSON_IsString(v) && !cJSON_IsNull(v))
        *bad = 1;
    return cJSON_IsString(v) ? v->valuestring : NULL;
}

/* Parses a record into messages (pointing into the cJSON tree; *msgs owned, lk_free). */
static int parse_record(const char *json, cJSON **root, struct chat_msg **msgs, int *n, char **owned,
                        struct lk_err *err)
{
    *root = cJSON_Parse(json);
    *msgs = NULL;
    *owned = NULL;
    *n = 0;
    if (!*root || !cJSON_IsObject(*root))
        return lk_errf(err, LK_ERR_FORMAT, "not a JSON object");
    const cJSON *list = cJSON_GetObjectItemCaseSensitive(*root, "messages");
    int bad = 0;
    if (list) {
        if (!cJSON_IsArray(list))
            return lk_errf(err, LK_ERR_FORMAT, "field 'messages' is not a list");
        int m = cJSON_GetArraySize(list);
        *msgs = lk_calloc((size_t)m + 1, sizeof **msgs);
        if (!*msgs)
            return lk_errf(err, LK_ERR_NOMEM, "out of memory");
        const cJSON *e;
        cJSON_ArrayForEach(e, list)
        {
            const char *role = jstr(e, "role", &bad), *content = jstr(e, "content", &bad);
            if (bad || !role || !content)
                return lk_errf(err, LK_ERR_FORMAT, "messages[%d] needs string fields 'role' and 'content'", *n);
            (*msgs)[(*n)++] = (struct chat_msg){ role, content };
        }
        return LK_OK;
    }
    const char *ins = jstr(*root, "instruction", &bad), *inp = jstr(*root, "input", &bad);
    const char *outp = jstr(*root, "output", &bad);
    if (bad)
        return lk_errf(err, LK_ERR_FORMAT, "fields 'instruction', 'input', 'output' must be strings");
    if (!ins)
        return lk_errf(err, LK_ERR_FORMAT, "missing field 'instruction' (or 'messages')");
    *owned = alpaca_user(ins, inp, err);
    *msgs = lk_calloc(2, sizeof **msgs);
    if (!*owned || !*msgs)
        return lk_errf(err, LK_ERR_NOMEM, "out of memory");
    (*msgs)[(*n)++] = (struct chat_msg){ "user", *owned };
    if (outp)
        (*msgs)[(*n)++] = (struct chat_msg){ "assistant", outp };
    return LK_OK;
}

int chat_encode_json(struct tok *t, const struct chat_fmt *f, const char *json, int flags, struct chat_seq *out,
                     struct lk_err *err)
{
    cJSON *root;
    struct chat_msg *msgs;
    char *owned;
    int n;
    int rc = parse_record(json, &root, &msgs, &n, &owned, err);
    if (!rc && !cJSON_GetObjectItemCaseSensitive(root, "messages") &&
        !cJSON_GetObjectItemCaseSensitive(root, "output"))
        rc = lk_errf(err, LK_ERR_FORMAT, "missing field 'output': no assistant turn to train on");
    if (!rc)
        rc = chat_encode(t, f, msgs, n, flags, out, err);
    lk_free(msgs);
    lk_free(owned);
    cJSON_Delete(root);
    return rc;
}

int chat_prompt_json(struct tok *t, const struct chat_fmt *f, const char *json, struct tok_ids *out,
                     struct lk_err *err)
{
    cJSON *root;
    struct chat_msg *msgs;
    char *owned;
    int n;
    int rc = parse_record(json, &root, &msgs, &n, &owned, err);
    if (!rc)
        rc = chat_prompt(t, f, msgs, n, out, err);
    lk_free(msgs);
    lk_free(owned);
    cJSON_Delete(root);
    return rc;
}
