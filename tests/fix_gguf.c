/* fix_gguf.c - helpers of the GGUF tests (declared and described in fix_gguf.h). */
#include "fix_gguf.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "../libcore/generate.h"
#include "../libcore/lk.h"
#include "../libcore/lora.h"
#include "../libcore/model.h"
#include "../libcore/st.h"
#include "test.h"

// ---- helpers ----

int fix_llama_ready(void)
{
    return lk_file_exists("build/llama/node_modules/node-llama-cpp/package.json") &&
           system("node --version >/dev/null 2>&1") == 0;
}


long fix_file_size(const char *path)
{
    struct stat sb;
    return stat(path, &sb) == 0 ? (long)sb.st_size : -1;
}

/* Writes text to path (test helper; plain stdio). */
int fix_put_file(const char *path, const char *text, size_t n)
{
    FILE *f = fopen(path, "wb");
    if (!f)
        return -1;
    int bad = n && fwrite(text, 1, n, f) != n;
    return fclose(f) || bad ? -1 : 0;
}

/* A JSON file (config.json, tokenizer.json, the peer's output) parsed here, independently of the
 * exporter; NULL when missing or broken. */
cJSON *fix_read_json(const char *path)
{
    char *text;
    size_t n;
    if (lk_read_file(path, &text, &n, NULL))
        return NULL;
    cJSON *j = cJSON_ParseWithLength(text, n);
    lk_free(text);
    return j;
}

/* Runs the peer on a job (cJSON, consumed); returns its output or NULL (with the reason printed). */
cJSON *fix_peer(cJSON *job)
{
    char *js = cJSON_PrintUnformatted(job);
    cJSON_Delete(job);
    TMPPATH(in, "peer_job.json");
    TMPPATH(out, "peer_out.json");
    int bad = !js || fix_put_file(in, js, strlen(js));
    free(js);
    if (bad || test_sh("node tests/llama_ref.mjs '%s' '%s'", in, out) != 0) {
        fprintf(stderr, "    llama.cpp peer failed: %s\n", test_output());
        return NULL;
    }
    return fix_read_json(out);
}

cJSON *fix_int_rows(int32_t *const *rows, const int *lens, int n)
{
    cJSON *a = cJSON_CreateArray();
    for (int i = 0; i < n; i++) {
        cJSON *r = cJSON_CreateArray();
        for (int k = 0; k < lens[i]; k++)
            cJSON_AddItemToArray(r, cJSON_CreateNumber(rows[i][k]));
        cJSON_AddItemToArray(a, r);
    }
    return a;
}

// ---- the texts: 35 kinds of input, each 4 ways ----

static const char *const base_texts[] = {
    "Hello world",
    "The patient has a fever and a cough.",
    "  leading spaces",
    "trailing spaces   ",
    "tabs\tand\tnewlines\n",
    "CRLF line one\r\nline two\r\n",
    "\r\n\r\n",
    "numbers 12345 and 3.14159, 1,000,000",
    "I'm sure he's done; we'll see. They've gone, you'd know, I'D SAY",
    "UPPER lower MiXeD",
    "\xe7\x97\x85\xe4\xba\xba\xe5\x8f\x91\xe7\x83\xa7\xe4\xba\x86\xef\xbc\x8c\xe8\xaf\xb7\xe5\xa4\x9a\xe5\x96\x9d\xe6"
    "\xb0\xb4\xe3\x80\x82",
    "\xe6\x97\xa5\xe6\x9c\xac\xe8\xaa\x9e\xe3\x81\xae\xe3\x83\x86\xe3\x82\xad\xe3\x82\xb9\xe3\x83\x88",
    "\xed\x95\x9c\xea\xb5\xad\xec\x96\xb4 \xeb\xac\xb8\xec\x9e\xa5",
    "emoji \xf0\x9f\x9a\x80\xf0\x9f\x94\xa5\xf0\x9f\x98\x80 and \xf0\x9f\x91\xa9\xe2\x80\x8d\xf0\x9f\x91\xa9\xe2\x80"
    "\x8d\xf0\x9f\x91\xa7 family",
    "flags \xf0\x9f\x87\xab\xf0\x9f\x87\xb7\xf0\x9f\x87\xa9\xf0\x9f\x87\xaa",
    "accents: caf\xc3\xa9, na\xc3\xafve, Z\xc3\xbcrich, S\xc3\xa3o Paulo",
    "\xce\x95\xce\xbb\xce\xbb\xce\xb7\xce\xbd\xce\xb9\xce\xba\xce\xac \xd1\x80\xd1\x83\xd1\x81\xd1\x81\xd0\xba\xd0\xb8"
    "\xd0\xb9",
    "\xd9\x85\xd8\xb1\xd8\xad\xd8\xa8\xd8\xa7 \xd8\xa8\xd8\xa7\xd9\x84\xd8\xb9\xd8\xa7\xd9\x84\xd9\x85",
    "\xe0\xa4\xb9\xe0\xa4\xbf\xe0\xa4\xa8\xe0\xa5\x8d\xe0\xa4\xa6\xe0\xa5\x80",
    "code: for (int i = 0; i < n; i++) { x += y[i]; }",
    "URL https://example.com/a?b=c&d=e#f",
    "<|im_start|>user\nWhat is glaucoma?<|im_end|>\n<|im_start|>assistant\n",
    "<|endoftext|>",
    "text<|im_end|>more",
    "<|im_start|><|im_end|>",
    "a <|im_start|> b",
    "punctuation!!! ??? ... --- ***",
    "quotes \"double\" 'single' \xc2\xab" "guillemets\xc2\xbb",
    "math: \xe2\x88\x91 x\xc2\xb2 \xe2\x89\xa4 \xe2\x88\x9ay",
    "mixed\xe4\xb8\xad\xe6\x96\x87" "and English",
    "   ",
    "\n",
    "x",
    "Fagramab is taken twice a day for glaucoma; rest is advised.",
    "  \t \r\n  mixed   whitespace\t\t",
};
_Static_assert(4 * sizeof base_texts / sizeof base_texts[0] == N_TEXTS, "N_TEXTS is 4 ways of each base text");

/* Text i: base text i/4 as it is, after a space, before a newline, after <|im_start|>. */
static char *text_at(int i)
{
    static const char *const pre[4] = { "", " ", "", "<|im_start|>" }, *const post[4] = { "", "", "\n", "" };
    const char *b = base_texts[i / 4];
    size_t n = strlen(pre[i % 4]) + strlen(b) + strlen(post[i % 4]) + 1;
    char *s = malloc(n);
    snprintf(s, n, "%s%s%s", pre[i % 4], b, post[i % 4]);
    return s;
}

/* `lorakit tokenize --json` of every text (one process per text, in one shell loop). */
int fix_lk_tokenize_all(const char *tokdir, char **texts, int n, struct tok_ids *out)
{
    char dir[512];
    snprintf(dir, sizeof dir, "%s/texts", test_tmpdir());
    if (lk_mkdir_p(dir, NULL))
        return -1;
    for (int i = 0; i < n; i++) {
        char p[600];
        snprintf(p, sizeof p, "%s/t%03d.txt", dir, i);
        if (fix_put_file(p, texts[i], strlen(texts[i])))
            return -1;
    }
    TMPPATH(res, "lk_tok.txt");
    if (test_sh("for f in '%s'/t*.txt; do %s tokenize --tokenizer '%s' --file \"$f\" --json || exit 1; done > '%s'",
                dir, test_lorakit(), tokdir, res) != 0) {
        fprintf(stderr, "    lorakit tokenize: %s\n", test_output());
        return -1;
    }
    char *buf;
    if (lk_read_file(res, &buf, NULL, NULL))
        return -1;
    int i = 0;
    for (char *line = buf; line && *line && i < n; i++) {
        char *nl = strchr(line, '\n');
        if (nl)
            *nl = 0;
        cJSON *a = cJSON_Parse(line), *e;
        cJSON_ArrayForEach(e, a) tok_ids_push(&out[i], (int32_t)e->valuedouble, NULL);
        cJSON_Delete(a);
        line = nl ? nl + 1 : NULL;
    }
    lk_free(buf);
    return i == n ? 0 : -1;
}

/* Ids of the peer's "tokenize" result against lorakit's: the count of texts that differ (the
 * first one printed). */
int fix_compare_ids(const cJSON *got, char **texts, const struct tok_ids *want, int n)
{
    int bad = 0;
    for (int i = 0; i < n; i++) {
        const cJSON *a = cJSON_GetArrayItem(got, i);
        int k = 0, same = cJSON_GetArraySize(a) == (int)want[i].n;
        for (const cJSON *e = a ? a->child : NULL; e && same; e = e->next, k++)
            same = (int32_t)e->valuedouble == want[i].v[k];
        if (!same && !bad++)
            fprintf(stderr, "    text %d '%s': llama.cpp gives %d ids, lorakit %zu\n", i, texts[i],
                    cJSON_GetArraySize(a), want[i].n);
    }
    return bad;
}

/* Tokenized texts: NPROMPT prompts of PLEN ids, from the texts with at least PLEN ids. */
int fix_pick_prompts(const struct tok_ids *ids, int n, int32_t *prompts[NPROMPT], int lens[NPROMPT])
{
    int k = 0;
    for (int i = 0; i < n && k < NPROMPT; i += 3)
        if (ids[i].n >= PLEN) {
            prompts[k] = ids[i].v;
            lens[k++] = PLEN;
        }
    return k == NPROMPT ? 0 : -1;
}

/* log softmax over the last position of each of B rows of `lorakit logits` [B, T, V]. */
double *fix_lk_logprobs(const char *model, const char *adapter, int32_t *const *rows, int B, int T, int *out_V)
{
    struct lk_buf arg = { 0 };
    for (int b = 0; b < B; b++)
        for (int t = 0; t < T; t++)
            lk_buf_printf(&arg, "%d%s", rows[b][t], t + 1 < T ? "," : b + 1 < B ? ";" : "");
    TMPPATH(out, "lk_logits.safetensors");
    char ad[600] = "";
    if (adapter)
        snprintf(ad, sizeof ad, "--adapter '%s'", adapter);
    int rc = test_sh("%s logits --model '%s' %s --tokens '%s' --out '%s'", test_lorakit(), model, ad, arg.p, out);
    lk_buf_release(&arg);
    if (rc) {
        fprintf(stderr, "    lorakit logits: %s\n", test_output());
        return NULL;
    }
    struct st_file f;
    struct lk_err err = { 0 };
    if (st_open(&f, out, &err))
        return NULL;
    const struct st_tensor *t = st_find(&f, "logits");
    int V = (int)t->shape[2];
    double *lp = malloc(sizeof *lp * (size_t)B * (size_t)V);
    float *all = malloc(sizeof *all * t->numel);
    st_tensor_to_f32(t, all, &err);
    for (int b = 0; b < B; b++) {
        const float *x = all + ((size_t)b * (size_t)T + (size_t)(T - 1)) * (size_t)V;
        double mx = -INFINITY, s = 0;
        for (int v = 0; v < V; v++)
            mx = fmax(mx, x[v]);
        for (int v = 0; v < V; v++)
            s += exp(x[v] - mx);
        for (int v = 0; v < V; v++)
            lp[(size_t)b * (size_t)V + (size_t)v] = x[v] - mx - log(s);
    }
    free(all);
    st_close(&f);
    *out_V = V;
    return lp;
}

/* Largest |lorakit - llama.cpp| over every prompt and the whole vocabulary; -1 when the peer's
 * vector is not the vocabulary's length or underflows where lorakit's value is not tiny. */
double fix_lp_maxdiff(const cJSON *peer_lp, const double *lp, int B, int V)
{
    double worst = 0;
    for (int b = 0; b < B; b++) {
        const cJSON *row = cJSON_GetArrayItem(peer_lp, b);
        if (cJSON_GetArraySize(row) != V)
            return -1;
        int v = 0;
        for (const cJSON *e = row->child; e; e = e->next, v++) {
            double mine = lp[(size_t)b * (size_t)V + (size_t)v];
            if (cJSON_IsNull(e)) { // the peer's float32 exp underflowed: lorakit's must be tiny too
                if (mine > -87)
                    return -1;
                continue;
            }
            worst = fmax(worst, fabs(mine - e->valuedouble));
        }
    }
    return worst;
}

/* lorakit's greedy continuation (KV cache, temperature 0, no stop token) of each prompt. */
int fix_lk_greedy(const char *model_dir, const char *adapter, int32_t *const *prompts, const int *lens, int n,
                  int32_t out[][NGEN])
{
    struct model m;
    struct lora l = { 0 };
    struct gen_cache gc = { 0 };
    struct lk_err err = { 0 };
    int rc = model_load(&m, model_dir, &err);
    if (rc)
        return rc;
    if (adapter && (rc = lora_load(&l, adapter, &m.cfg, &err)) == LK_OK)
        rc = model_apply_extras(&m, &l, &err);
    if (!rc)
        rc = gen_cache_init(&gc, &m.cfg, 128, 64, gen_lora_max_rank(adapter ? &l : NULL), &err);
    struct gen_opts o = { 0 };
    o.max_new = NGEN;
    o.top_p = 1;
    o.eos = -1;
    for (int i = 0; i < n && !rc; i++) {
        struct tok_ids ids = { 0 };
        rc = gen_run(&gc, &m, adapter ? &l : NULL, prompts[i], lens[i], &o, NULL, NULL, &ids, NULL, &err);
        for (int k = 0; !rc && k < NGEN; k++)
            out[i][k] = k < (int)ids.n ? ids.v[k] : -1;
        tok_ids_release(&ids);
    }
    if (rc)
        fprintf(stderr, "    lorakit greedy: %s\n", err.msg);
    gen_cache_release(&gc);
    lora_release(&l);
    model_release(&m);
    return rc;
}

/* Prompts whose peer continuation equals lorakit's (the first difference printed). */
int fix_greedy_agree(const cJSON *gen, int32_t want[][NGEN], int n, const char *what, int print)
{
    int same_n = 0;
    for (int i = 0; i < n; i++) {
        const cJSON *a = cJSON_GetArrayItem(gen, i);
        int k = 0, same = cJSON_GetArraySize(a) == NGEN;
        for (const cJSON *e = a ? a->child : NULL; e && same; e = e->next, k++)
            same = (int32_t)e->valuedouble == want[i][k];
        same_n += same;
        if (!same && print) {
            fprintf(stderr, "    %s: prompt %d continues differently in llama.cpp (from token %d)\n", what, i, k - 1);
            print = 0;
        }
    }
    return same_n;
}

/* A fresh copy of the texts (caller frees each and the array). */
char **fix_all_texts(void)
{
    char **t = malloc(sizeof *t * N_TEXTS);
    for (int i = 0; i < N_TEXTS; i++)
        t[i] = text_at(i);
    return t;
}

void fix_free_texts(char **t, int n, struct tok_ids *ids)
{
    for (int i = 0; i < n; i++) {
        free(t[i]);
        if (ids)
            tok_ids_release(&ids[i]);
    }
    free(t);
    free(ids);
}

static cJSON *str_array(char **v, int n)
{
    cJSON *a = cJSON_CreateArray();
    for (int i = 0; i < n; i++)
        cJSON_AddItemToArray(a, cJSON_CreateString(v[i]));
    return a;
}

/* A run of the peer: tokenize the texts (when given), greedy and log-probs on the prompts. */
cJSON *fix_peer_run(const char *gguf, const char *lora, char **texts, int n_texts, int32_t *const *prompts,
                    const int *lens, int info)
{
    cJSON *r = cJSON_CreateObject();
    cJSON_AddStringToObject(r, "model", gguf);
    if (lora)
        cJSON_AddStringToObject(r, "lora", lora);
    if (texts)
        cJSON_AddItemToObject(r, "tokenize", str_array(texts, n_texts));
    if (prompts) {
        cJSON_AddItemToObject(r, "generate", fix_int_rows(prompts, lens, NPROMPT));
        cJSON_AddNumberToObject(r, "n", NGEN);
        cJSON_AddItemToObject(r, "logprobs", fix_int_rows(prompts, lens, NPROMPT));
    }
    if (info)
        cJSON_AddBoolToObject(r, "info", 1);
    return r;
}

/* The acceptance on one model: f32 GGUF in llama.cpp against lorakit on the same folder (and
 * adapter): 140 texts' ids, greedy continuations, log-probs within 1e-4. */
int fix_check_in_llama(const char *model_dir, const char *gguf, const char *adapter, const char *lora_gguf,
                       const char *what, double *out_lp)
{
    char **texts = fix_all_texts();
    struct tok_ids *ids = calloc(N_TEXTS, sizeof *ids);
    int32_t *prompts[NPROMPT], lens[NPROMPT], want[NPROMPT][NGEN];
    int V = 0, bad = 0;
    double *lp = NULL;
    if (fix_lk_tokenize_all(model_dir, texts, N_TEXTS, ids) || fix_pick_prompts(ids, N_TEXTS, prompts, lens) ||
        fix_lk_greedy(model_dir, adapter, prompts, lens, NPROMPT, want) ||
        !(lp = fix_lk_logprobs(model_dir, adapter, prompts, NPROMPT, PLEN, &V))) {
        fix_free_texts(texts, N_TEXTS, ids);
        return -1;
    }
    cJSON *out = fix_peer(fix_peer_run(gguf, lora_gguf, texts, N_TEXTS, prompts, lens, 0));
    if (!out) {
        free(lp);
        fix_free_texts(texts, N_TEXTS, ids);
        return -1;
    }
    int tok_bad = fix_compare_ids(cJSON_GetObjectItem(out, "tokenize"), texts, ids, N_TEXTS);
    int same = fix_greedy_agree(cJSON_GetObjectItem(out, "generate"), want, NPROMPT, what, 1);
    double d = fix_lp_maxdiff(cJSON_GetObjectItem(out, "logprobs"), lp, NPROMPT, V);
    fprintf(stderr, "    %s in llama.cpp: %d/%d texts tokenized alike, %d/%d greedy continuations (%d tokens) "
                    "equal, max |d log-prob| %.3g over %d x %d\n",
            what, N_TEXTS - tok_bad, N_TEXTS, same, NPROMPT, NGEN, d, NPROMPT, V);
    bad = tok_bad || same != NPROMPT || d < 0 || d > 1e-4;
    *out_lp = d;
    cJSON_Delete(out);
    free(lp);
    fix_free_texts(texts, N_TEXTS, ids);
    return bad;
}

/* A Llama model (untied, GQA, head_dim 32 != hidden / heads; with attention_bias when asked: random
 * biases on q/k/v and o_proj, as `lorakit init` makes every tensor, std 0.1) with the
 * base model's vocabulary and a Llama 3 pre-tokenizer (its regex, ignore_merges): llama.cpp's
 * 'llama-bpe'. */
int fix_make_llama_bias(const char *dir, int bias)
{
    TMPPATH(cfg, "llama.json");
    char json[600];
    snprintf(json, sizeof json,
             "{\"architectures\":[\"LlamaForCausalLM\"],\"model_type\":\"llama\",\"hidden_size\":96,"
             "\"intermediate_size\":160,\"num_hidden_layers\":2,\"num_attention_heads\":4,\"num_key_value_heads\":2,"
             "\"head_dim\":32,\"vocab_size\":768,\"max_position_embeddings\":512,\"rms_norm_eps\":1e-5,"
             "\"rope_theta\":500000,\"tie_word_embeddings\":false,\"attention_bias\":%s,\"initializer_range\":0.1,"
             "\"torch_dtype\":\"float32\",\"bos_token_id\":765,\"eos_token_id\":767}", bias ? "true" : "false");
    if (fix_put_file(cfg, json, strlen(json)) ||
        test_sh("%s init --config '%s' --out '%s' --seed 7 && cp " BASE "/tokenizer_config.json '%s'/", test_lorakit(),
                cfg, dir, dir))
        return -1;
    char *text;
    size_t n;
    if (lk_read_file(BASE "/tokenizer.json", &text, &n, NULL))
        return -1;
    cJSON *t = cJSON_ParseWithLength(text, n);
    lk_free(text);
    cJSON *split = cJSON_GetArrayItem(cJSON_GetObjectItem(cJSON_GetObjectItem(t, "pre_tokenizer"), "pretokenizers"), 0);
    cJSON_ReplaceItemInObject(cJSON_GetObjectItem(split, "pattern"), "Regex",
                              cJSON_CreateString("(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|"
                                                 "\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|"
                                                 "\\s+(?!\\S)|\\s+"));
    cJSON_ReplaceItemInObject(cJSON_GetObjectItem(t, "model"), "ignore_merges", cJSON_CreateTrue());
    char *out = cJSON_Print(t), path[600];
    cJSON_Delete(t);
    snprintf(path, sizeof path, "%s/tokenizer.json", dir);
    int rc = fix_put_file(path, out, strlen(out));
    free(out);
    return rc;
}

int fix_make_llama(const char *dir)
{
    return fix_make_llama_bias(dir, 0);
}

/* A small LoRA trained on the model in a few steps with a high rate, so that it matters. */
int fix_train_adapter(const char *model, const char *out, const char *extra)
{
    TMPPATH(data, "train.jsonl");
    FILE *f = fopen(data, "w");
    if (!f)
        return -1;
    for (int i = 0; i < 32; i++)
        fprintf(f, "{\"text\": \"Patient %d takes fagramab twice a day for glaucoma; rest is advised.\"}\n", i);
    fclose(f);
    if (test_sh("%s train --model '%s' --data '%s' --out '%s' --rank 4 --alpha 8 --steps 8 --lr 0.01 --batch 4 "
                "--seq 32 --threads 1 --quiet --runs '%s/runs.db' %s",
                test_lorakit(), model, data, out, test_tmpdir(), extra) != 0) {
        fprintf(stderr, "    lorakit train: %s\n", test_output());
        return -1;
    }
    return 0;
}


/* The tokenizer rebuilt from a GGUF (gguf_tok_load) against the folder's: the same ids on the
 * texts, the same specials and template. Returns the number of differences. */
int fix_tok_roundtrip(const char *dir, const char *gguf, char **texts, int n)
{
    struct tok *a = NULL, *b = NULL;
    struct gguf_file g;
    struct lk_err err = { 0 };
    if (tok_load(&a, dir, &err) || gguf_open(&g, gguf, &err)) {
        fprintf(stderr, "    %s\n", err.msg);
        tok_free(a);
        return 1;
    }
    int rc = gguf_tok_load(&b, &g, &err), bad = 0;
    gguf_close(&g);
    if (rc) {
        fprintf(stderr, "    gguf_tok_load: %s\n", err.msg);
        tok_free(a);
        return 1;
    }
    for (int i = 0; i < n; i++) {
        struct tok_ids x = { 0 }, y = { 0 };
        tok_encode(a, texts[i], strlen(texts[i]), 1, &x, &err);
        tok_encode(b, texts[i], strlen(texts[i]), 1, &y, &err);
        if (x.n != y.n || memcmp(x.v, y.v, x.n * sizeof *x.v))
            bad += !bad ? fprintf(stderr, "    text %d differs with the tokenizer read back\n", i) > 0 : 1;
        tok_ids_release(&x);
        tok_ids_release(&y);
    }
    const char *ta = tok_chat_template(a), *tb = tok_chat_template(b);
    bad += tok_eos(a) != tok_eos(b) || tok_pad(a) != tok_pad(b) || tok_add_bos(a) != tok_add_bos(b);
    bad += (ta == NULL) != (tb == NULL) || (ta && strcmp(ta, tb));
    tok_free(a);
    tok_free(b);
    return bad;
}


int fix_has_str(const struct gguf_file *g, const char *key, const char *want)
{
    char *s = NULL;
    struct lk_err err = { 0 };
    int ok = gguf_get_str(g, key, &s, &err) == LK_OK && !strcmp(s, want);
    if (!ok)
        fprintf(stderr, "    %s: '%s', wanted '%s'\n", key, s ? s : err.msg, want);
    lk_free(s);
    return ok;
}

int fix_has_uint(const struct gguf_file *g, const char *key, uint64_t want)
{
    uint64_t v = 0;
    struct lk_err err = { 0 };
    int ok = gguf_get_uint(g, key, &v, &err) == LK_OK && v == want;
    if (!ok)
        fprintf(stderr, "    %s: %llu, wanted %llu %s\n", key, (unsigned long long)v, (unsigned long long)want,
                err.msg);
    return ok;
}


/* convert_hf_to_gguf.py's LlamaModel.permute, written out: w.reshape(heads, 2, HS/2, cols)
 * .swapaxes(1, 2).reshape(rows, cols), so the new row (h, j, s) is the old row (h, s, j). */
int64_t fix_permuted_src_row(int64_t r, int HS)
{
    int64_t h = r / HS, j = (r % HS) / 2, s = r % 2;
    return h * HS + s * (HS / 2) + j;
}

/* A PEFT adapter for the base model written by hand: rank 2 on every layer's q_proj, plus
 * lora_B biases, an embedding adapter or a modules_to_save lm_head when asked. */
int fix_craft_adapter(const char *dir, int bias, int embed, int save_head)
{
    static float a[2 * 768], b[256 * 2], bb[256], head[768 * 256];
    static char names[12][96];
    for (int i = 0; i < 2 * 768; i++)
        a[i] = 0.01f * (float)(i % 7);
    struct st_item it[16];
    int n = 0;
    for (int l = 0; l < 4; l++) {
        static const char *const kinds[3] = { "lora_A.weight", "lora_B.weight", "lora_B.bias" };
        for (int k = 0; k < (bias ? 3 : 2); k++) {
            snprintf(names[n], sizeof names[n], "base_model.model.model.layers.%d.self_attn.q_proj.%s", l, kinds[k]);
            it[n] = k == 0   ? (struct st_item){ names[n], 2, { 2, 256 }, a }
                    : k == 1 ? (struct st_item){ names[n], 2, { 256, 2 }, b }
                             : (struct st_item){ names[n], 1, { 256 }, bb };
            n++;
        }
    }
    if (embed) {
        it[n++] = (struct st_item){ "base_model.model.model.embed_tokens.lora_embedding_A", 2, { 2, 768 }, a };
        it[n++] = (struct st_item){ "base_model.model.model.embed_tokens.lora_embedding_B", 2, { 256, 2 }, b };
    }
    if (save_head)
        it[n++] = (struct st_item){ "base_model.model.lm_head.weight", 2, { 768, 256 }, head };
    char cfg[512], path[700];
    snprintf(cfg, sizeof cfg, "{\"peft_type\": \"LORA\", \"r\": 2, \"lora_alpha\": 4, \"target_modules\": "
             "[\"q_proj\"%s], \"lora_bias\": %s, \"modules_to_save\": %s}", embed ? ", \"embed_tokens\"" : "",
             bias ? "true" : "false", save_head ? "[\"lm_head\"]" : "null");
    struct lk_err err = { 0 };
    snprintf(path, sizeof path, "%s/adapter_config.json", dir);
    if (lk_mkdir_p(dir, &err) || fix_put_file(path, cfg, strlen(cfg)))
        return -1;
    snprintf(path, sizeof path, "%s/adapter_model.safetensors", dir);
    return st_write_f32(path, it, n, TENSOR_F32, &err);
}

/* One metadata value of src onto the writer (the types lorakit's files hold). */
static int copy_kv(struct gguf_writer *w, const struct gguf_kv *kv)
{
    char key[256];
    snprintf(key, sizeof key, "%.*s", (int)kv->key.n, kv->key.p);
    if (kv->type == GGUF_VT_STRING) {
        struct gguf_str s = gguf_arr_str(kv, 0);
        char *z = strndup(s.p, (size_t)s.n);
        int rc = gguf_writer_str(w, key, z);
        free(z);
        return rc;
    }
    if (kv->type == GGUF_VT_UINT32)
        return gguf_writer_u32(w, key, (uint32_t)gguf_arr_num(kv, 0));
    if (kv->type == GGUF_VT_FLOAT32)
        return gguf_writer_f32(w, key, (float)gguf_arr_num(kv, 0));
    if (kv->type == GGUF_VT_BOOL)
        return gguf_writer_bool(w, key, gguf_arr_num(kv, 0) != 0);
    if (kv->type != GGUF_VT_ARRAY || (kv->arr_type != GGUF_VT_STRING && kv->arr_type != GGUF_VT_INT32))
        return -1;
    size_t n = (size_t)kv->n;
    if (kv->arr_type == GGUF_VT_INT32) {
        int32_t *v = malloc(sizeof *v * (n + 1));
        for (size_t i = 0; i < n; i++)
            v[i] = (int32_t)gguf_arr_num(kv, i);
        int rc = gguf_writer_arr_i32(w, key, v, n);
        free(v);
        return rc;
    }
    const char **v = malloc(sizeof *v * (n + 1));
    size_t *lens = malloc(sizeof *lens * (n + 1));
    for (size_t i = 0; i < n; i++) {
        struct gguf_str s = gguf_arr_str(kv, i);
        v[i] = s.p;
        lens[i] = (size_t)s.n;
    }
    int rc = gguf_writer_arr_str(w, key, v, lens, n);
    free(v);
    free(lens);
    return rc;
}

int fix_gguf_copy(const char *src, const char *dst, const char *drop,
                  void (*edit)(const char *name, float *x, size_t n, void *ctx), void *ctx)
{
    struct gguf_file f;
    struct lk_err err = { 0 }, werr = { 0 };
    if (gguf_open(&f, src, &err)) {
        fprintf(stderr, "    %s\n", err.msg);
        return -1;
    }
    struct gguf_writer w;
    int bad = gguf_writer_init(&w, dst, &werr) != LK_OK;
    for (int64_t i = 0; i < f.n_kv && !bad; i++)
        if (!drop || f.kv[i].key.n < strlen(drop) || memcmp(f.kv[i].key.p, drop, strlen(drop)))
            bad = copy_kv(&w, &f.kv[i]) != 0;
    char name[GGUF_MAX_NAME];
    for (int64_t i = 0; i < f.n_tensors && !bad; i++) {
        snprintf(name, sizeof name, "%.*s", (int)f.t[i].name.n, f.t[i].name.p);
        bad = gguf_writer_declare(&w, name, f.t[i].type, f.t[i].n_dims, f.t[i].ne) != LK_OK;
    }
    bad = bad || gguf_writer_begin(&w) != LK_OK;
    for (int64_t i = 0; i < f.n_tensors && !bad; i++) {
        const struct gguf_tensor *t = &f.t[i];
        float *x = malloc(sizeof(float) * (t->numel + 1));
        snprintf(name, sizeof name, "%.*s", (int)t->name.n, t->name.p);
        bad = gguf_tensor_rows_f32(&f, t, 0, (int64_t)(t->numel / (size_t)t->ne[0]), x, &err) != LK_OK;
        if (!bad && edit)
            edit(name, x, t->numel, ctx);
        bad = bad || gguf_writer_write(&w, x, t->numel) != LK_OK;
        free(x);
    }
    if (bad) {
        fprintf(stderr, "    copy of %s failed: %s%s\n", src, err.msg, werr.msg);
        gguf_writer_abort(&w);
    } else if (gguf_writer_commit(&w)) {
        fprintf(stderr, "    copy of %s failed: %s\n", src, werr.msg);
        bad = 1;
    }
    gguf_close(&f);
    return bad ? -1 : 0;
}
