/*
 * chat.c - chat templates (see chat.h). A conversation is rendered as a list of segments:
 * template tokens (by id) and text, each marked trained or not. Consecutive text segments
 * with the same flag are joined and tokenized as one string; the prompt and the answer are
 * tokenized apart (as LLaMA-Factory does), so the trained tokens are exactly
 * encode(answer) + end-of-turn, and the prompt's tokens are those of the generation
 * prompt at inference. (Hugging Face tokenizes the whole rendering at once; the two differ
 * only where BPE would merge across the header/answer boundary, e.g. an answer that
 * starts with a newline.)
 * Each template follows its Jinja source line by line (Qwen2.5's and Qwen3's chatml, Llama 3's
 * and 3.2's tokenizer_config.json chat_template); string operations are Python's (Jinja's trim
 * is str.strip(), whose whitespace includes Unicode spaces).
 * Owns: nothing beyond the chat_seq it fills.
 */
#include "chat.h"

#include <cjson/cJSON.h>
#include <string.h>

static const char *QWEN25_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant.";
/* Llama 3.1-3.3's templates: the date when strftime_now is not given, and the line before it */
static const char *LLAMA32_DATE = "26 Jul 2024";
static const char *LLAMA32_CUTOFF = "Cutting Knowledge Date: December 2023\n";

const char *chat_kind_name(enum chat_kind k)
{
    switch (k) {
    case CHAT_CHATML:
        return "chatml";
    case CHAT_LLAMA3:
        return "llama3";
    case CHAT_QWEN3:
        return "qwen3";
    case CHAT_PLAIN:
        return "plain";
    }
    return "?";
}

const char *chat_fmt_name(const struct chat_fmt *f)
{
    if (f->kind == CHAT_QWEN3 && !f->thinking)
        return "qwen3-nothink";
    if (f->kind == CHAT_LLAMA3 && f->sys_header[0])
        return "llama3.2";
    return chat_kind_name(f->kind);
}

/* The system header's text: the date_string a Llama 3.1+ template sets when none is given
 * ({%- set date_string = "..." %}), or the published one when there is no template. */
static void llama32_header(struct chat_fmt *f, const char *tmpl)
{
    const char *key = "set date_string = \"", *date = LLAMA32_DATE;
    size_t n = strlen(date);
    const char *p = tmpl ? strstr(tmpl, key) : NULL;
    if (p) {
        p += strlen(key);
        const char *q = strchr(p, '"');
        if (q && q - p < 32) {
            date = p;
            n = (size_t)(q - p);
        }
    }
    snprintf(f->sys_header, sizeof f->sys_header, "%sToday Date: %.*s\n\n", LLAMA32_CUTOFF, (int)n, date);
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
    int header = 0;
    f->thinking = 1;
    if (!name || !strcmp(name, "auto")) {
        if (tmpl && strstr(tmpl, "<|im_start|>")) {
            k = strstr(tmpl, "<think>") ? CHAT_QWEN3 : CHAT_CHATML;
        } else if (tmpl && strstr(tmpl, "<|start_header_id|>")) {
            k = CHAT_LLAMA3;
            header = strstr(tmpl, "Cutting Knowledge Date") != NULL;
        } else {
            k = CHAT_PLAIN;
        }
    } else if (!strcmp(name, "chatml")) {
        k = CHAT_CHATML;
    } else if (!strcmp(name, "qwen3") || !strcmp(name, "qwen3-nothink")) {
        k = CHAT_QWEN3;
        f->thinking = !strcmp(name, "qwen3");
    } else if (!strcmp(name, "llama3") || !strcmp(name, "llama3.2")) {
        k = CHAT_LLAMA3;
        header = !strcmp(name, "llama3.2");
    } else if (!strcmp(name, "plain")) {
        k = CHAT_PLAIN;
    } else {
        return lk_errf(err, LK_ERR_USAGE, "unknown chat template '%s' (chatml, qwen3, qwen3-nothink, llama3, "
                       "llama3.2, plain or auto)", name);
    }
    f->kind = k;
    if (header)
        llama32_header(f, tmpl);
    int rc = LK_OK;
    switch (k) {
    case CHAT_CHATML:
    case CHAT_QWEN3:
        rc = need_token(t, "<|im_start|>", &f->start, chat_kind_name(k), err);
        if (!rc)
            rc = need_token(t, "<|im_end|>", &f->eot, chat_kind_name(k), err);
        // Qwen2.5's template writes this system turn when the conversation has none.
        if (k == CHAT_CHATML && tmpl && strstr(tmpl, QWEN25_SYSTEM))
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

/* Bytes of the Python whitespace character (str.isspace) that s[0..n) is, or 0. */
static size_t py_space_len(const char *s, size_t n)
{
    const unsigned char *u = (const unsigned char *)s;
    if (n == 1)
        return (u[0] >= 0x09 && u[0] <= 0x0D) || (u[0] >= 0x1C && u[0] <= 0x20);
    if (n == 2)
        return u[0] == 0xC2 && (u[1] == 0x85 || u[1] == 0xA0) ? 2 : 0; // U+0085, U+00A0
    if (n != 3 || (u[0] & 0xF0) != 0xE0 || (u[1] & 0xC0) != 0x80 || (u[2] & 0xC0) != 0x80)
        return 0;
    unsigned cp = ((u[0] & 0x0Fu) << 12) | ((u[1] & 0x3Fu) << 6) | (u[2] & 0x3Fu);
    int sp = cp == 0x1680 || (cp >= 0x2000 && cp <= 0x200A) || cp == 0x2028 || cp == 0x2029 || cp == 0x202F ||
             cp == 0x205F || cp == 0x3000;
    return sp ? 3 : 0;
}

/* Python's str.strip() (chars NULL: whitespace) or str.strip(chars) on (*s, *n), in place;
 * which: 1 = the left end, 2 = the right end, 3 = both. */
static void py_strip(const char **s, size_t *n, const char *chars, int which)
{
    for (int more = which & 1; more && *n;) {
        size_t k = 0;
        for (size_t b = 1; b <= 3 && b <= *n && !k; b++)
            k = chars ? (b == 1 && strchr(chars, **s) ? 1 : 0) : py_space_len(*s, b);
        *s += k;
        *n -= k;
        more = k > 0;
    }
    for (int more = which & 2; more && *n;) {
        size_t k = 0;
        for (size_t b = 1; b <= 3 && b <= *n && !k; b++)
            k = chars ? (b == 1 && strchr(chars, (*s)[*n - 1]) ? 1 : 0) : py_space_len(*s + *n - b, b);
        *n -= k;
        more = k > 0;
    }
}

/* Llama 3's turn header: <|start_header_id|>role<|end_header_id|>\n\n */
static int llama3_header(const struct chat_fmt *f, struct segs *a, const char *role, struct lk_err *err)
{
    int rc = seg_tok(a, f->start, 0, err);
    if (!rc)
        rc = seg_text(a, role, 0, err);
    if (!rc)
        rc = seg_tok(a, f->hdr_end, 0, err);
    if (!rc)
        rc = seg_text(a, "\n\n", 0, err);
    return rc;
}

/* Renders one message; trained marks its content and end-of-turn token. */
static int render_msg(const struct chat_fmt *f, struct segs *a, const char *role, const char *content,
                      int trained, struct lk_err *err)
{
    int rc = LK_OK;
    size_t n = strlen(content);
    switch (f->kind) {
    case CHAT_CHATML:
    case CHAT_QWEN3:
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
        py_strip(&content, &n, NULL, 3); // the template writes message['content'] | trim
        rc = llama3_header(f, a, role, err);
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

/*
 * Qwen3's assistant turn, as its template writes it: reasoning given in the content as
 * <think>...</think> is split off (content: what follows the last </think>, less leading
 * newlines; reasoning: what precedes the first </think>, after the last <think> there, newlines
 * trimmed). With think (the last turn after the last user query, or one with reasoning) the
 * turn carries its think block, else the reasoning is dropped. An empty block is the template's,
 * not the answer's: it is masked like the prompt. The answer, its reasoning and <|im_end|> are
 * trained.
 */
static int render_qwen3_answer(const struct chat_fmt *f, struct segs *a, const char *content, int after_query,
                               int last, struct lk_err *err)
{
    const char *c = content, *r = "", *close = strstr(content, "</think>");
    size_t cn = strlen(content), rn = 0;
    if (close) {
        const char *lastc = close;
        for (const char *p = close; (p = strstr(p + 1, "</think>"));)
            lastc = p;
        c = lastc + strlen("</think>");
        cn = strlen(c);
        py_strip(&c, &cn, "\n", 1);
        r = content;
        rn = (size_t)(close - content);
        py_strip(&r, &rn, "\n", 2);
        const char *open = NULL;
        for (const char *p = r; (p = strstr(p, "<think>")) && p + strlen("<think>") <= r + rn; p++)
            open = p;
        if (open) {
            rn -= (size_t)(open + strlen("<think>") - r);
            r = open + strlen("<think>");
        }
        py_strip(&r, &rn, "\n", 1);
    }
    int think = after_query && (last || rn > 0);
    int rc = seg_tok(a, f->start, 0, err);
    if (!rc)
        rc = seg_text(a, "assistant\n", 0, err);
    if (!rc && think) {
        py_strip(&r, &rn, "\n", 3);
        py_strip(&c, &cn, "\n", 1);
        int rt = rn > 0;
        rc = seg_text(a, "<think>\n", rt, err);
        if (!rc)
            rc = seg_add(a, r, rn, -1, rt, err);
        if (!rc)
            rc = seg_text(a, "\n</think>\n\n", rt, err);
    }
    if (!rc)
        rc = seg_add(a, c, cn, -1, 1, err);
    if (!rc)
        rc = seg_tok(a, f->eot, 1, err);
    if (!rc)
        rc = seg_text(a, "\n", 0, err);
    return rc;
}

/* Index of the last user message that is a query (not a wrapped tool response), else n - 1: the
 * ns.last_query_index of Qwen3's template. */
static int qwen3_last_query(const struct chat_msg *msgs, int n)
{
    const char *open = "<tool_response>", *close = "</tool_response>";
    for (int i = n - 1; i >= 0; i--) {
        const char *s = msgs[i].content;
        size_t len = strlen(s), e = strlen(close);
        int tool = !strncmp(s, open, strlen(open)) && len >= e && !strcmp(s + len - e, close);
        if (!strcmp(msgs[i].role, "user") && !tool)
            return i;
    }
    return n - 1;
}

/* Llama 3.1-3.3: the system header every conversation opens with, holding the first message when
 * it is a system one (trimmed). */
static int render_llama32_system(const struct chat_fmt *f, struct segs *a, const char *sys, struct lk_err *err)
{
    size_t n = strlen(sys);
    py_strip(&sys, &n, NULL, 3);
    int rc = llama3_header(f, a, "system", err);
    if (!rc)
        rc = seg_text(a, f->sys_header, 0, err);
    if (!rc)
        rc = seg_add(a, sys, n, -1, 0, err);
    if (!rc)
        rc = seg_tok(a, f->eot, 0, err);
    return rc;
}

static int render_gen_header(const struct chat_fmt *f, struct segs *a, struct lk_err *err)
{
    int rc = LK_OK;
    switch (f->kind) {
    case CHAT_CHATML:
    case CHAT_QWEN3:
        rc = seg_tok(a, f->start, 0, err);
        if (!rc)
            rc = seg_text(a, "assistant\n", 0, err);
        if (!rc && f->kind == CHAT_QWEN3 && !f->thinking) // enable_thinking=false
            rc = seg_text(a, "<think>\n\n</think>\n\n", 0, err);
        break;
    case CHAT_LLAMA3:
        rc = llama3_header(f, a, "assistant", err);
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
    for (int i = 0; i < n && !rc; i++) {
        rc = check_role(msgs[i].role, i, err);
        if (!rc && !msgs[i].content)
            rc = lk_errf(err, LK_ERR_FORMAT, "messages[%d]: no 'content'", i);
    }
    int has_sys = n > 0 && !strcmp(msgs[0].role, "system"), first = 0;
    if (!rc && f->bos >= 0)
        rc = seg_tok(a, f->bos, 0, err);
    if (!rc && f->default_system && !has_sys)
        rc = render_msg(f, a, "system", f->default_system, 0, err);
    if (!rc && f->sys_header[0]) { // Llama 3.2: the first system message goes into the header
        rc = render_llama32_system(f, a, has_sys ? msgs[0].content : "", err);
        first = has_sys;
    }
    int last_query = f->kind == CHAT_QWEN3 ? qwen3_last_query(msgs, n) : n;
    for (int i = first; i < n && !rc; i++) {
        int answer = !strcmp(msgs[i].role, "assistant");
        if (answer && f->kind == CHAT_QWEN3)
            rc = render_qwen3_answer(f, a, msgs[i].content, i > last_query, i == n - 1, err);
        else
            rc = render_msg(f, a, msgs[i].role, msgs[i].content, answer, err);
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
