/*
 * test_chat.c - the Qwen3 and Llama 3.2 chat templates. The peer is the model's own
 * tokenizer_config.json chat_template rendered by Jinja (tests/chat_ref.py, Debian's
 * python3-jinja2) for several conversations: the text lorakit's ids decode to must be the text
 * Jinja renders, and the ids those of tokenizing that text whole. Every tokenizer folder under
 * ../shared/data/tokenizers is checked, and so is each folder in $LK_CHAT_TEMPLATES (':'-separated:
 * a tokenizer_config.json, with or without its tokenizer.json), so that a published template can be
 * checked without adding it here. Besides: the labels (what is trained, the empty think block
 * masked), Llama 3.2's system header as its published template writes it, template detection,
 * and `lorakit tokenize --template` showing both.
 */
#include "test.h"

#include <cJSON.h>
#include <dirent.h>
#include <stdlib.h>
#include <string.h>

#include "../libcore/chat.h"
#include "../libcore/lk.h"
#include "../libcore/tok.h"

// ---- fixtures ----

/* A byte-level BPE trained on a little English, with the chat specials of both families (and
 * Qwen3's <think> tokens) after the BPE ids: dir/tokenizer.json, chatml template. */
static int train_tok(const char *dir)
{
    FILE *f = fopen(test_path("corpus.txt"), "w");
    if (!f)
        return -1;
    for (int i = 0; i < 30; i++)
        fprintf(f, "What is the capital of country %d? The capital of country %d is city %c%d. "
                   "Be brief: answer in one line, then stop.\n", i, i, 'A' + i % 26, i * 7 % 10);
    fclose(f);
    return test_sh("%s tokenizer train --text '%s' --vocab 420 --out '%s' --special '<think>' --special '</think>' "
                   "--special '<|begin_of_text|>' --special '<|end_of_text|>' --special '<|start_header_id|>' "
                   "--special '<|end_header_id|>' --special '<|eot_id|>'",
                   test_lorakit(), test_path("corpus.txt"), dir);
}

/* tok_load on dir's tokenizer.json, with cfg_json as tokenizer_config.json (NULL: the file's). */
static int load_with_config(struct tok **tk, const char *dir, const char *cfg_json)
{
    char *path = lk_path_join(dir, "tokenizer.json"), *json;
    size_t n;
    int rc = lk_read_file(path, &json, &n, test_err());
    lk_free(path);
    if (rc)
        return rc;
    rc = tok_load_json(tk, json, n, cfg_json, dir, test_err());
    lk_free(json);
    return rc;
}

/* The conversation's text as lorakit renders it: training layout when it ends with an assistant
 * turn, else the generation prompt. ids (and labels) kept in *out. */
static int render(struct tok *tk, const struct chat_fmt *f, const struct chat_msg *m, int n,
                  struct chat_seq *out, char **text)
{
    int rc;
    if (!strcmp(m[n - 1].role, "assistant")) {
        rc = chat_encode(tk, f, m, n, 0, out, test_err());
    } else {
        struct tok_ids ids = { 0 };
        rc = chat_prompt(tk, f, m, n, &ids, test_err());
        chat_seq_release(out);
        out->ids = ids.v;
        out->n = ids.n;
    }
    return rc ? rc : tok_decode(tk, out->ids, out->n, 0, text, NULL, test_err());
}

// ---- against Jinja ----

struct conv {
    const char *what;
    int n;
    struct chat_msg m[6];
    int boundary; /* an answer starting with a newline: ids may differ at the header/answer seam */
};

static const struct conv CONVS[] = {
    { "one question", 1, { { "user", "What is the capital of country 3?" } }, 0 },
    { "system and question", 2, { { "system", "Be brief." }, { "user", "Capital of country 4?" } }, 0 },
    { "one answer", 2, { { "user", "What is the capital of country 3?" }, { "assistant", "City D1." } }, 0 },
    { "multi-turn", 5,
      { { "system", "Be brief." }, { "user", "Capital of country 1?" }, { "assistant", "City B7." },
        { "user", "And country 2?" }, { "assistant", "City C4." } },
      0 },
    { "reasoning in answers", 4,
      { { "user", "Capital of country 1?" }, { "assistant", "<think>\nIt is listed.\n</think>\n\nCity B7." },
        { "user", "And country 2?" }, { "assistant", "<think>\n\nLook it up.\n\n</think>\n\nCity C4." } },
      0 },
    { "follow-up question", 3,
      { { "user", "Capital of country 1?" }, { "assistant", "<think>\nhm\n</think>\n\nCity B7." },
        { "user", "And country 2?" } },
      0 },
    { "whitespace to trim", 3,
      { { "system", "  Be brief.\n" }, { "user", "\t Capital of country 5? \xe3\x80\x80" },
        { "assistant", "\xc2\xa0" "City F5.\n\n" } },
      0 },
    { "later system turn", 4,
      { { "user", "Capital of country 1?" }, { "assistant", "City B7." }, { "system", "Now be verbose." },
        { "user", "Country 2?" } },
      0 },
    { "answer opening with newlines", 2, { { "user", "Capital?" }, { "assistant", "\n\nCity A0." } }, 1 },
};

static int write_messages(const struct conv *c, const char *path)
{
    cJSON *arr = cJSON_CreateArray();
    for (int i = 0; i < c->n; i++) {
        cJSON *o = cJSON_CreateObject();
        cJSON_AddStringToObject(o, "role", c->m[i].role);
        cJSON_AddStringToObject(o, "content", c->m[i].content);
        cJSON_AddItemToArray(arr, o);
    }
    char *s = cJSON_PrintUnformatted(arr);
    cJSON_Delete(arr);
    FILE *f = fopen(path, "w");
    int rc = f && s && fputs(s, f) >= 0 ? 0 : -1;
    if (f)
        fclose(f);
    free(s);
    return rc;
}

/* One folder: each conversation under each variant of its template (Qwen3: enable_thinking
 * undefined, false, true), lorakit against Jinja. Returns the number of renderings compared. */
static int check_folder(const char *dir, const char *trained)
{
    char *cfg_path = lk_path_join(dir, "tokenizer_config.json"), *cfg_text = NULL, *tok_json = lk_path_join(dir, "tokenizer.json");
    int compared = 0;
    struct tok *tk = NULL;
    if (lk_read_file(cfg_path, &cfg_text, NULL, test_err()))
        goto out;
    // the folder's own tokenizer, or the trained one with this folder's tokenizer_config.json
    if (lk_file_exists(tok_json) ? tok_load(&tk, dir, test_err()) : load_with_config(&tk, trained, cfg_text)) {
        test_fail(__FILE__, __LINE__, "%s: %s", dir, test_errmsg());
        goto out;
    }
    struct chat_fmt f;
    if (chat_fmt_init(&f, tk, NULL, test_err())) {
        test_fail(__FILE__, __LINE__, "%s: %s", dir, test_errmsg());
        goto out;
    }
    static const struct {
        const char *name, *think;
    } qwen3_variants[] = { { "qwen3", NULL }, { "qwen3-nothink", "0" }, { "qwen3", "1" } };
    int nv = f.kind == CHAT_QWEN3 ? 3 : 1;
    fprintf(stderr, "    %s: template detected as %s\n", dir, chat_fmt_name(&f));
    for (size_t c = 0; c < sizeof CONVS / sizeof CONVS[0]; c++) {
        const struct conv *cv = &CONVS[c];
        int gen = strcmp(cv->m[cv->n - 1].role, "assistant") != 0;
        if (write_messages(cv, test_path("messages.json"))) {
            test_fail(__FILE__, __LINE__, "cannot write messages.json");
            goto out;
        }
        for (int v = 0; v < nv; v++) {
            const char *think = f.kind == CHAT_QWEN3 ? qwen3_variants[v].think : NULL;
            if (f.kind == CHAT_QWEN3 && chat_fmt_init(&f, tk, qwen3_variants[v].name, test_err()))
                goto out;
            if (test_sh("/usr/bin/python3 tests/chat_ref.py '%s' '%s' %d %s > '%s'", cfg_path,
                        test_path("messages.json"), gen, think ? think : "", test_path("jinja.txt")) != 0) {
                test_fail(__FILE__, __LINE__, "%s, %s: Jinja failed: %s", dir, cv->what, test_output());
                goto out;
            }
            char *want, *got = NULL;
            size_t wn;
            struct chat_seq s = { 0 };
            struct tok_ids ids = { 0 };
            int ok = !lk_read_file(test_path("jinja.txt"), &want, &wn, test_err());
            ok = ok && !render(tk, &f, cv->m, cv->n, &s, &got);
            if (ok && strcmp(got, want))
                test_fail(__FILE__, __LINE__, "%s, %s (%s, enable_thinking %s): lorakit renders\n%s\n---- Jinja:\n%s",
                          dir, cv->what, chat_fmt_name(&f), think ? think : "undefined", got, want);
            // the ids: those of tokenizing Jinja's text whole (but at a newline seam)
            ok = ok && !tok_encode(tk, want, wn, 1, &ids, test_err());
            if (ok && !cv->boundary && (ids.n != s.n || memcmp(ids.v, s.ids, sizeof *ids.v * s.n)))
                test_fail(__FILE__, __LINE__, "%s, %s: %zu ids, tokenizing the Jinja text gives %zu (or others)",
                          dir, cv->what, s.n, ids.n);
            if (!ok)
                test_fail(__FILE__, __LINE__, "%s, %s: %s", dir, cv->what, test_errmsg());
            compared++;
            lk_free(want);
            lk_free(got);
            chat_seq_release(&s);
            tok_ids_release(&ids);
            if (test_failed())
                goto out;
        }
    }
out:
    tok_free(tk);
    lk_free(cfg_text);
    lk_free(cfg_path);
    lk_free(tok_json);
    return compared;
}

TEST(chat_templates_render_as_their_jinja_source)
{
    if (test_sh("/usr/bin/python3 -c 'import jinja2'") != 0)
        SKIP("Debian's python3-jinja2 is not installed (make deps installs it: apt-get install python3-jinja2)");
    const char *root = test_shared("data/tokenizers");
    const char *extra = getenv("LK_CHAT_TEMPLATES");
    if (!root && !(extra && *extra))
        SKIP("no tokenizer folders: ../shared/data/tokenizers is not there and $LK_CHAT_TEMPLATES is unset");
    CHECK_INT(train_tok(test_path("trained")), 0);
    char trained[1024];
    snprintf(trained, sizeof trained, "%s", test_path("trained"));
    int folders = 0, compared = 0;
    DIR *d = root ? opendir(root) : NULL;
    for (struct dirent *e; d && (e = readdir(d));) {
        char dir[1200], cfg[1300];
        snprintf(dir, sizeof dir, "%s/%s", root, e->d_name);
        snprintf(cfg, sizeof cfg, "%s/tokenizer_config.json", dir);
        if (e->d_name[0] == '.' || !lk_file_exists(cfg))
            continue;
        compared += check_folder(dir, trained);
        folders++;
        if (test_failed())
            break;
    }
    if (d)
        closedir(d);
    char *list = extra ? lk_strdup(extra) : NULL;
    for (char *p = list, *q; p && *p && !test_failed(); p = q ? q + 1 : NULL) {
        q = strchr(p, ':');
        if (q)
            *q = 0;
        compared += check_folder(p, trained);
        folders++;
    }
    lk_free(list);
    if (test_failed())
        return;
    fprintf(stderr, "    %d renderings in %d folders equal Jinja's\n", compared, folders);
    CHECK_MSG(compared >= 9, "only %d renderings compared", compared);
}

// ---- labels and layouts (no Jinja needed) ----

/* The decoded text of the trained tokens (labels != -100), in order. */
static char *trained_text(struct tok *tk, const struct chat_seq *s)
{
    int32_t *v = malloc(sizeof *v * (s->n + 1));
    size_t k = 0;
    for (size_t i = 0; i < s->n; i++)
        if (s->labels[i] != CHAT_IGNORE)
            v[k++] = s->labels[i];
    char *t = NULL;
    tok_decode(tk, v, k, 0, &t, NULL, NULL);
    free(v);
    return t;
}

/* The trained tokenizer in tmpdir/t and template name on it. */
static int setup(struct tok **tk, struct chat_fmt *f, const char *name)
{
    *tk = NULL;
    if (train_tok(test_path("t")) || tok_load(tk, test_path("t"), test_err()))
        return -1;
    return chat_fmt_init(f, *tk, name, test_err());
}

TEST(chat_qwen3_masks_the_empty_think_block)
{
    struct tok *tk;
    struct chat_fmt f;
    CHECK_OK(setup(&tk, &f, "qwen3"));
    struct chat_seq s = { 0 };
    char *text, *tr;
    // the last answer gets the template's empty block, masked; the earlier one gets none
    const struct chat_msg m[] = { { "user", "Q1?" }, { "assistant", "A1." }, { "user", "Q2?" }, { "assistant", "A2." } };
    CHECK_OK(render(tk, &f, m, 4, &s, &text));
    CHECK_MSG(!strcmp(text, "<|im_start|>user\nQ1?<|im_end|>\n<|im_start|>assistant\nA1.<|im_end|>\n"
                            "<|im_start|>user\nQ2?<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
                            "A2.<|im_end|>\n"), "%s", text);
    tr = trained_text(tk, &s);
    CHECK_MSG(!strcmp(tr, "A1.<|im_end|>A2.<|im_end|>"), "trained: %s", tr);
    lk_free(text);
    lk_free(tr);
    // reasoning is the model's own output: trained, block and all
    const struct chat_msg r[] = { { "user", "Q?" }, { "assistant", "<think>\nstep\n</think>\n\nA." } };
    CHECK_OK(render(tk, &f, r, 2, &s, &text));
    tr = trained_text(tk, &s);
    CHECK_MSG(!strcmp(tr, "<think>\nstep\n</think>\n\nA.<|im_end|>"), "trained: %s", tr);
    lk_free(text);
    lk_free(tr);
    // the generation prompt: open for thinking by default, the empty block with qwen3-nothink
    CHECK_OK(render(tk, &f, m, 3, &s, &text));
    CHECK(strlen(text) > 20 && !strcmp(text + strlen(text) - 22, "<|im_start|>assistant\n"));
    lk_free(text);
    CHECK_OK(chat_fmt_init(&f, tk, "qwen3-nothink", test_err()));
    CHECK(!strcmp(chat_fmt_name(&f), "qwen3-nothink") && !f.thinking);
    CHECK_OK(render(tk, &f, m, 3, &s, &text));
    const char *tail = "<|im_start|>assistant\n<think>\n\n</think>\n\n";
    CHECK(!strcmp(text + strlen(text) - strlen(tail), tail));
    lk_free(text);
    // the stops are chatml's
    CHECK(chat_is_stop(&f, tok_find(tk, "<|im_end|>")) && chat_is_stop(&f, tok_find(tk, "<|endoftext|>")));
    chat_seq_release(&s);
    tok_free(tk);
}

TEST(chat_llama32_system_header_as_published)
{
    // the layout of meta-llama/Llama-3.2-1B-Instruct's chat_template, written out by hand
    struct tok *tk;
    struct chat_fmt f;
    CHECK_OK(setup(&tk, &f, "llama3.2"));
    struct chat_seq s = { 0 };
    char *text, *tr;
    const struct chat_msg m[] = { { "system", " Be brief. " }, { "user", "Q?\n" }, { "assistant", "A." } };
    CHECK_OK(render(tk, &f, m, 3, &s, &text));
    CHECK_MSG(!strcmp(text, "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: "
                            "December 2023\nToday Date: 26 Jul 2024\n\nBe brief.<|eot_id|><|start_header_id|>user"
                            "<|end_header_id|>\n\nQ?<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\nA."
                            "<|eot_id|>"), "%s", text);
    tr = trained_text(tk, &s);
    CHECK_MSG(!strcmp(tr, "A.<|eot_id|>"), "trained: %s", tr);
    lk_free(text);
    lk_free(tr);
    // no system message: the header with an empty one; the generation prompt ends with the header
    CHECK_OK(render(tk, &f, m + 1, 1, &s, &text));
    CHECK_MSG(!strcmp(text, "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: "
                            "December 2023\nToday Date: 26 Jul 2024\n\n<|eot_id|><|start_header_id|>user"
                            "<|end_header_id|>\n\nQ?<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"),
              "%s", text);
    lk_free(text);
    // Llama 3.0's template ("llama3") has no header
    CHECK_OK(chat_fmt_init(&f, tk, "llama3", test_err()));
    CHECK_OK(render(tk, &f, m + 1, 1, &s, &text));
    CHECK(!strcmp(text, "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nQ?<|eot_id|>"
                        "<|start_header_id|>assistant<|end_header_id|>\n\n"));
    lk_free(text);
    chat_seq_release(&s);
    tok_free(tk);
}

TEST(chat_detects_qwen3_and_llama32_templates)
{
    CHECK_INT(train_tok(test_path("t")), 0);
    struct {
        const char *tmpl, *want;
    } cases[] = {
        { "{{ '<|im_start|>' }}{{ '<think>\\\\n\\\\n</think>' }}", "qwen3" },
        { "{{ '<|im_start|>' + message.role }}", "chatml" },
        { "{{ '<|start_header_id|>' }}", "llama3" },
        { "{%- set date_string = \\\"01 Jan 2030\\\" %}{{ '<|start_header_id|>' }}Cutting Knowledge Date", "llama3.2" },
        { "{{ messages }}", "plain" },
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        char cfg[400];
        snprintf(cfg, sizeof cfg, "{\"eos_token\": \"<|im_end|>\", \"chat_template\": \"%s\"}", cases[i].tmpl);
        struct tok *tk;
        CHECK_OK(load_with_config(&tk, test_path("t"), cfg));
        struct chat_fmt f;
        CHECK_OK(chat_fmt_init(&f, tk, "auto", test_err()));
        CHECK_MSG(!strcmp(chat_fmt_name(&f), cases[i].want), "template %zu detected as %s, want %s", i,
                  chat_fmt_name(&f), cases[i].want);
        if (!strcmp(cases[i].want, "llama3.2")) // the template's own date_string
            CHECK(strstr(f.sys_header, "Today Date: 01 Jan 2030\n\n") != NULL);
        tok_free(tk);
    }
    struct tok *tk;
    CHECK_OK(tok_load(&tk, test_path("t"), test_err()));
    struct chat_fmt f;
    CHECK_INT(chat_fmt_init(&f, tk, "qwen4", test_err()), LK_ERR_USAGE);
    CHECK(strstr(test_errmsg(), "qwen3-nothink") && strstr(test_errmsg(), "llama3.2"));
    tok_free(tk);
}

TEST(chat_cli_tokenize_shows_qwen3_and_llama32)
{
    CHECK_INT(train_tok(test_path("t")), 0);
    const char *rec = "{\"messages\": [{\"role\": \"user\", \"content\": \"Q?\"}, {\"role\": \"assistant\", "
                      "\"content\": \"A.\"}]}";
    CHECK_INT(test_sh("%s tokenize --tokenizer '%s' --template qwen3 --text '%s'", test_lorakit(), test_path("t"), rec),
              0);
    CHECK_MSG(strstr(test_output(), "<|im_start|>assistant\n<think>\n\n</think>\n\n[[A.<|im_end|>]]"), "%s",
              test_output());
    CHECK_INT(test_sh("%s tokenize --tokenizer '%s' --template llama3.2 --text '%s'", test_lorakit(), test_path("t"),
                      rec), 0);
    CHECK_MSG(strstr(test_output(), "Today Date: 26 Jul 2024\n\n<|eot_id|><|start_header_id|>user") &&
              strstr(test_output(), "<|end_header_id|>\n\n[[A.<|eot_id|>]]"), "%s", test_output());
    CHECK_INT(test_sh("%s tokenize --tokenizer '%s' --template qwen3-nothink --prompt --text '%s'", test_lorakit(),
                      test_path("t"), rec), 0);
}
