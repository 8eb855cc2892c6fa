/*
 * test_peft.c - PEFT compatibility both ways (issue 18), one test per case of the issue.
 *
 * PEFT itself cannot run on the development machine. Adapters "written by PEFT" are therefore
 * fixtures written here field by field to PEFT 0.20's layout; next to each name and shape is
 * the file and function of huggingface/peft that produces it. The config is PEFT 0.20's full
 * LoraConfig key set, sorted as its json.dumps(sort_keys=True) writes it (peft_config_json).
 * Adapters lorakit writes are read back through the same reader and checked against the same
 * layout. Every number is checked against an independent reference built in the test: the
 * base's weights changed by hand (W + s B A in a plain double loop, rows replaced, copies) and
 * run with no adapter at all, or the fine-tuned model itself.
 */
#include "test.h"

#include <cJSON.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "../libcore/lora.h"
#include "../libcore/model.h"
#include "../libcore/st.h"
#include "fix_model.h"

#define PFX "base_model.model."

// ---- fixtures in PEFT's layout ----

static int cmp_key(const void *a, const void *b)
{
    return strcmp(*(char *const *)a, *(char *const *)b);
}

/* PEFT 0.20's LoraConfig as saved (peft/config.py PeftConfig.save_pretrained: asdict, sets as
 * lists, runtime_config dropped; the keys and defaults of peft/tuners/lora/config.py LoraConfig
 * and peft/config.py PeftConfig), with fields (a JSON object text) overriding them. Keys sorted.
 * Returns a heap string. */
static char *peft_config_json(const char *fields)
{
    static const char *const defaults =
        "{\"alora_invocation_tokens\":null,\"alpha_pattern\":{},\"arrow_config\":null,\"auto_mapping\":null,"
        "\"base_model_name_or_path\":null,\"bias\":\"none\",\"corda_config\":null,\"ensure_weight_tying\":false,"
        "\"eva_config\":null,\"exclude_modules\":null,\"fan_in_fan_out\":false,\"inference_mode\":true,"
        "\"init_lora_weights\":true,\"layer_replication\":null,\"layers_pattern\":null,"
        "\"layers_to_transform\":null,\"loftq_config\":{},\"lora_alpha\":8,\"lora_bias\":false,"
        "\"lora_dropout\":0.0,\"megatron_config\":null,\"megatron_core\":\"megatron.core\","
        "\"modules_to_save\":null,\"peft_type\":\"LORA\",\"peft_version\":\"0.20.0\",\"qalora_group_size\":16,"
        "\"r\":8,\"rank_pattern\":{},\"revision\":null,\"target_modules\":null,\"target_parameters\":null,"
        "\"task_type\":\"CAUSAL_LM\",\"trainable_token_indices\":null,\"use_dora\":false,\"use_qalora\":false,"
        "\"use_rslora\":false}";
    cJSON *o = cJSON_Parse(defaults), *f = cJSON_Parse(fields);
    LK_ASSERT(o && f);
    for (cJSON *e = f->child; e; e = e->next) {
        if (cJSON_GetObjectItemCaseSensitive(o, e->string))
            cJSON_ReplaceItemInObjectCaseSensitive(o, e->string, cJSON_Duplicate(e, 1));
        else
            cJSON_AddItemToObject(o, e->string, cJSON_Duplicate(e, 1));
    }
    // keys sorted, as json.dumps(sort_keys=True) writes them
    int n = cJSON_GetArraySize(o), k = 0;
    char **keys = malloc(sizeof(char *) * (size_t)n);
    for (cJSON *e = o->child; e; e = e->next)
        keys[k++] = e->string;
    qsort(keys, (size_t)n, sizeof *keys, cmp_key);
    cJSON *sorted = cJSON_CreateObject();
    for (int i = 0; i < n; i++) {
        cJSON *it = cJSON_DetachItemFromObjectCaseSensitive(o, keys[i]);
        cJSON_AddItemToObject(sorted, it->string, it);
    }
    free(keys);
    char *s = cJSON_Print(sorted);
    cJSON_Delete(sorted);
    cJSON_Delete(o);
    cJSON_Delete(f);
    return s;
}

/* An adapter folder as PEFT's save_pretrained writes it: adapter_config.json (fields over PEFT's
 * defaults) and adapter_model.safetensors (peft_model.py save_pretrained: safe_save_file with
 * metadata {"format": "pt"}; float32 tensors, as autocast_adapter_dtype keeps them). */
static int peft_write(const char *dir, const char *fields, const struct st_item *items, int n)
{
    struct lk_err err = { 0 };
    char *cfg = peft_config_json(fields), p[1024];
    int rc = lk_mkdir_p(dir, &err);
    snprintf(p, sizeof p, "%s/adapter_config.json", dir);
    if (!rc)
        rc = lk_write_file_atomic(p, cfg, strlen(cfg), &err);
    free(cfg);
    snprintf(p, sizeof p, "%s/adapter_model.safetensors", dir);
    return rc ? rc : st_write_f32(p, items, n, TENSOR_F32, &err);
}

/* n floats, normal(0, std), seeded (caller frees). */
static float *randn(size_t n, float std, uint64_t seed)
{
    struct lk_rng rng;
    lk_rng_seed(&rng, seed);
    float *v = malloc(sizeof(float) * (n ? n : 1));
    for (size_t i = 0; i < n; i++)
        v[i] = std * lk_rng_normal(&rng);
    return v;
}

/* The weight tensor `name` of m (points into m), or NULL. */
static float *wt(struct model *m, const char *name)
{
    struct model_tensor *t;
    int n;
    float *hit = NULL;
    if (model_weights_tensors(&m->w, &m->cfg, &t, &n, NULL))
        return NULL;
    for (int i = 0; i < n; i++)
        if (!strcmp(t[i].name, name))
            hit = t[i].data;
    lk_free(t);
    return hit;
}

/* W [out, in] += s B A, B [out, R], A [R, in], in double: the reference for every LoRA delta. */
static void add_ba(float *W, int out, int in, const float *B, const float *A, int R, double s)
{
    for (int o = 0; o < out; o++)
        for (int i = 0; i < in; i++) {
            double acc = 0;
            for (int r = 0; r < R; r++)
                acc += (double)B[(size_t)o * R + r] * A[(size_t)r * in + i];
            W[(size_t)o * in + i] = (float)(W[(size_t)o * in + i] + s * acc);
        }
}

/* dst: an untied model with src's weights (lm_head = src's embedding when src ties them),
 * copied by name here (not through model_untie, which is under test). */
static int copy_untied(const struct model *src, struct model *dst)
{
    struct cfg c = src->cfg;
    c.json = NULL;
    c.tie_word_embeddings = 0;
    int rc = model_init(dst, &c, NULL);
    struct model_tensor *ts, *td;
    int ns, nd;
    if (rc || model_weights_tensors(&src->w, &src->cfg, &ts, &ns, NULL))
        return -1;
    if (model_weights_tensors(&dst->w, &dst->cfg, &td, &nd, NULL))
        return -1;
    for (int i = 0; i < nd; i++) {
        const char *want = strcmp(td[i].name, "lm_head.weight") || !src->cfg.tie_word_embeddings
                               ? td[i].name : "model.embed_tokens.weight";
        for (int j = 0; j < ns; j++)
            if (!strcmp(ts[j].name, want))
                memcpy(td[i].data, ts[j].data, sizeof(float) * td[i].numel);
    }
    lk_free(ts);
    lk_free(td);
    return 0;
}

#define NB 2
#define NT 5
#define TOKENS "1,2,3,4,5;6,7,8,9,10"

/* Logits [NB, NT, V] of m (+ l) on TOKENS (caller frees). */
static float *run(struct model *m, const struct lora *l)
{
    int tok[NB * NT] = { 1, 2, 3, 4, 5, 6, 7, 8, 9, 10 };
    if (model_plan(m, NB, NT, 0, test_err()) || model_forward(m, l, tok, NULL, NULL, NULL, 0, NULL, test_err()))
        return NULL;
    size_t n = (size_t)NB * NT * m->cfg.vocab_size;
    float *v = malloc(sizeof(float) * n);
    memcpy(v, model_logits(m), sizeof(float) * n);
    return v;
}

/* `lorakit logits` of model (+ adapter, may be NULL) with more flags on TOKENS (caller frees),
 * NULL on failure (the output is in test_output()). */
static float *cli_logits_with(const char *model, const char *adapter, const char *flags)
{
    char ad[1100] = "";
    if (adapter)
        snprintf(ad, sizeof ad, "--adapter '%s'", adapter);
    const char *out = test_path("logits.safetensors");
    if (test_sh("%s logits --model '%s' %s %s --tokens '" TOKENS "' --out '%s'", test_lorakit(), model, ad, flags,
                out))
        return NULL;
    struct st_file f;
    if (st_open(&f, out, NULL))
        return NULL;
    const struct st_tensor *t = st_find(&f, "logits");
    float *v = t ? malloc(sizeof(float) * t->numel) : NULL;
    if (v)
        st_tensor_to_f32(t, v, NULL);
    st_close(&f);
    return v;
}

/* cli_logits_with without more flags. */
static float *cli_logits(const char *model, const char *adapter)
{
    return cli_logits_with(model, adapter, "");
}

/* max |a - b| / max(1, max |b|) over n. */
static double rel_err(const float *a, const float *b, size_t n)
{
    double mx = 0, big = 1;
    for (size_t i = 0; i < n; i++) {
        mx = fmax(mx, fabs((double)a[i] - b[i]));
        big = fmax(big, fabs((double)b[i]));
    }
    return mx / big;
}

/* A base model folder: a random model of c (seed), saved in float32. */
static int base_folder(const char *dir, const struct cfg *c, uint64_t seed, struct model *m)
{
    int rc = fix_model_random(m, c, 0.3f, seed);
    return rc ? rc : model_save(m, dir, TENSOR_F32, test_err());
}

/* The factors of one LoRA module of a fixture: A [R, in], B [out, R], written under the PEFT
 * name of (layer, module) (peft/tuners/lora/layer.py LoraLayer.update_layer: nn.Linear(in, r)
 * and nn.Linear(r, out), so weights [r, in] and [out, r]; save_and_load.py
 * get_peft_model_state_dict drops the adapter name). names holds the two names. */
static void lora_items(const struct cfg *c, int layer, int module, int R, uint64_t seed, char names[2][128],
                       struct st_item *it, float **A, float **B)
{
    int64_t out, in;
    cfg_module_shape(c, (enum cfg_module)module, &out, &in);
    char base[100];
    lora_peft_name(layer, module, base, sizeof base);
    snprintf(names[0], 128, "%s.lora_A.weight", base);
    snprintf(names[1], 128, "%s.lora_B.weight", base);
    *A = randn((size_t)R * in, 0.3f, seed);
    *B = randn((size_t)out * R, 0.3f, seed + 1);
    it[0] = (struct st_item){ names[0], 2, { R, in }, *A };
    it[1] = (struct st_item){ names[1], 2, { out, R }, *B };
}

#define P(var, name)                                                                               \
    char var[1024];                                                                                \
    snprintf(var, sizeof var, "%s", test_path(name))

/* Loads dir for c (with model_apply_extras on m) and returns the logits of m + adapter. */
static float *run_adapter(struct model *m, const char *dir)
{
    struct lora l;
    if (lora_load(&l, dir, &m->cfg, test_err()))
        return NULL;
    float *v = model_apply_extras(m, &l, test_err()) ? NULL : run(m, &l);
    lora_release(&l);
    return v;
}

// ---- case 4: target_modules as a regex ----

/* Python's re.fullmatch(rx, name), worked out by hand for each pair (PEFT's
 * tuners_utils.py check_target_module_exists -> match_target_against_key). */
static const struct {
    const char *rx, *name;
    int want;
} fullmatch[] = {
    { ".*\\.(q_proj|v_proj)", "model.layers.0.self_attn.q_proj", 1 },
    { ".*\\.(q_proj|v_proj)", "model.layers.0.self_attn.k_proj", 0 },
    { ".*\\.(q_proj|v_proj)", "lm_head", 0 },
    { "q_proj", "model.layers.0.self_attn.q_proj", 0 }, // a full match, not a suffix
    { "model\\.layers\\.\\d+\\.mlp\\.(up|down)_proj", "model.layers.12.mlp.down_proj", 1 },
    { "model\\.layers\\.\\d+\\.mlp\\.(up|down)_proj", "model.layers.1.mlp.gate_proj", 0 },
    { ".*layers\\.1\\..*_proj", "model.layers.1.self_attn.o_proj", 1 },
    { ".*layers\\.1\\..*_proj", "model.layers.11.self_attn.o_proj", 0 },
    { "(?:.*\\.)?o_proj", "model.layers.0.self_attn.o_proj", 1 },
    { ".*?v_proj", "model.layers.0.self_attn.v_proj", 1 },
    { "[\\w.]*\\.k_proj", "model.layers.3.self_attn.k_proj", 1 },
    { "[\\w]*\\.k_proj", "model.layers.3.self_attn.k_proj", 0 }, // \w has no dot
    { ".*\\.(embed_tokens|lm_head)", "model.embed_tokens", 1 },
    { ".*\\.(embed_tokens|lm_head)", "lm_head", 0 },
    { "lm_head|.*\\.q_proj", "lm_head", 1 },
    { "lm_head|.*\\.q_proj", "model.layers.0.self_attn.q_proj", 1 },
    { "model.layers.[01].mlp.gate_proj", "model.layers.1.mlp.gate_proj", 1 },
    { "model.layers.[01].mlp.gate_proj", "model.layers.2.mlp.gate_proj", 0 },
};

TEST(peft_case4_target_modules_regex_is_full_matched)
{
    // 1. the selection rule, pair by pair
    for (size_t i = 0; i < sizeof fullmatch / sizeof fullmatch[0]; i++) {
        struct lora_config c;
        lora_config_default(&c);
        c.target_regex = lk_strdup(fullmatch[i].rx);
        int got = lora_config_targets(&c, fullmatch[i].name);
        lora_config_release(&c);
        CHECK_MSG(got == fullmatch[i].want, "re.fullmatch(%s, %s): got %d", fullmatch[i].rx, fullmatch[i].name, got);
    }
    // 2. a fixture targeting q_proj and v_proj of layer 1 only: PEFT creates (and saves) exactly
    //    those two LoRA layers
    struct cfg c;
    fix_cfg_qwen2(&c);
    struct model base, ref;
    P(bdir, "b");
    CHECK_OK(base_folder(bdir, &c, 41, &base));
    char names[3][2][128];
    struct st_item it[6];
    float *A[3], *B[3];
    lora_items(&c, 1, CFG_Q, 2, 42, names[0], it, &A[0], &B[0]);
    lora_items(&c, 1, CFG_V, 2, 44, names[1], it + 2, &A[1], &B[1]);
    const char *fields = "{\"r\":2,\"lora_alpha\":4,\"target_modules\":\".*\\\\.layers\\\\.1\\\\.self_attn\\\\.(q_proj|v_proj)\"}";
    P(ad, "ad");
    CHECK_OK(peft_write(ad, fields, it, 4));
    struct lora l;
    CHECK_OK(lora_load(&l, ad, &c, test_err()));
    CHECK(l.n_mod == 2 && lora_find(&l, 1, CFG_Q) && lora_find(&l, 1, CFG_V) && !lora_find(&l, 0, CFG_Q));
    lora_release(&l);
    // 3. the numbers: base + adapter against the weights changed by hand (s = 4 / 2)
    CHECK_OK(model_load(&ref, bdir, test_err()));
    int64_t qo, qi, vo, vi;
    cfg_module_shape(&c, CFG_Q, &qo, &qi);
    cfg_module_shape(&c, CFG_V, &vo, &vi);
    add_ba(wt(&ref, "model.layers.1.self_attn.q_proj.weight"), (int)qo, (int)qi, B[0], A[0], 2, 2.0);
    add_ba(wt(&ref, "model.layers.1.self_attn.v_proj.weight"), (int)vo, (int)vi, B[1], A[1], 2, 2.0);
    float *want = run(&ref, NULL), *got = run_adapter(&base, ad);
    CHECK(want && got);
    size_t n = (size_t)NB * NT * c.vocab_size;
    CHECK_MSG(rel_err(got, want, n) < 1e-5, "regex adapter vs hand: %g", rel_err(got, want, n));
    free(want);
    free(got);
    // 4. a tensor of a module the regex does not match is refused, naming the module
    lora_items(&c, 0, CFG_Q, 2, 46, names[2], it + 4, &A[2], &B[2]);
    CHECK_OK(peft_write(ad, fields, it, 6));
    struct lk_err err = { 0 };
    CHECK(lora_load(&l, ad, &c, &err) == LK_ERR_FORMAT);
    CHECK_MSG(strstr(err.msg, "model.layers.0.self_attn.q_proj") && strstr(err.msg, "does not target"), "%s", err.msg);
    // 5. what Python's re has and POSIX does not is refused, naming the field
    CHECK_OK(peft_write(ad, "{\"r\":2,\"target_modules\":\"(?!.*k_proj).*_proj\"}", it, 4));
    CHECK(lora_load(&l, ad, &c, &err) == LK_ERR_UNSUPPORTED);
    CHECK_MSG(strstr(err.msg, "target_modules") && strstr(err.msg, "(?...)"), "%s", err.msg);
    for (int k = 0; k < 3; k++) {
        free(A[k]);
        free(B[k]);
    }
    model_release(&base);
    model_release(&ref);
}

// ---- case 5: exclude_modules ----

/* PEFT's check_target_module_exists: a list entry excludes the module it names or ends (after a
 * dot); a string is full-matched. */
TEST(peft_case5_exclude_modules_list_and_regex)
{
    struct lora_config lc;
    lora_config_default(&lc); // all seven projections, as "all-linear" reads
    char **ex = lk_calloc(3, sizeof *ex);
    ex[0] = lk_strdup("down_proj");
    ex[1] = lk_strdup("model.layers.0.self_attn.q_proj");
    ex[2] = lk_strdup("proj");
    lc.exclude = ex;
    lc.n_exclude = 3;
    CHECK(!lora_config_targets(&lc, "model.layers.1.mlp.down_proj"));
    CHECK(!lora_config_targets(&lc, "model.layers.0.self_attn.q_proj"));
    CHECK(lora_config_targets(&lc, "model.layers.1.self_attn.q_proj"));
    CHECK(lora_config_targets(&lc, "model.layers.0.self_attn.k_proj")); // "proj" is no ".proj" suffix
    lora_config_release(&lc);
    lora_config_default(&lc);
    lc.exclude_regex = lk_strdup(".*\\.layers\\.0\\..*");
    CHECK(!lora_config_targets(&lc, "model.layers.0.mlp.up_proj"));
    CHECK(lora_config_targets(&lc, "model.layers.1.mlp.up_proj"));
    lora_config_release(&lc);
    // a fixture: all-linear minus layer 0 (PEFT saves only the seven modules of layer 1)
    struct cfg c;
    fix_cfg_qwen2(&c);
    struct model base, ref;
    P(bdir, "b");
    CHECK_OK(base_folder(bdir, &c, 51, &base));
    CHECK_OK(model_load(&ref, bdir, test_err()));
    char names[8][2][128];
    struct st_item it[16];
    float *A[8], *B[8];
    for (int m = 0; m < CFG_N_MODULES; m++) {
        lora_items(&c, 1, m, 2, 60 + 2 * (uint64_t)m, names[m], it + 2 * m, &A[m], &B[m]);
        int64_t o, i;
        cfg_module_shape(&c, (enum cfg_module)m, &o, &i);
        char w[96];
        cfg_module_path(1, (enum cfg_module)m, w, sizeof w);
        strcat(w, ".weight");
        add_ba(wt(&ref, w), (int)o, (int)i, B[m], A[m], 2, 1.0); // lora_alpha 2, r 2
    }
    const char *fields = "{\"r\":2,\"lora_alpha\":2,\"target_modules\":\"all-linear\","
                         "\"exclude_modules\":\".*\\\\.layers\\\\.0\\\\..*\"}";
    P(ad, "ad");
    CHECK_OK(peft_write(ad, fields, it, 14));
    struct lora l;
    CHECK_OK(lora_load(&l, ad, &c, test_err()));
    CHECK_INT(l.n_mod, CFG_N_MODULES);
    for (int k = 0; k < l.n_mod; k++)
        CHECK_INT(l.mod[k].layer, 1);
    // written back by lorakit: the same selection, read through the same checks
    P(ad2, "ad2");
    CHECK_OK(lora_save(&l, ad2, test_err()));
    lora_release(&l);
    CHECK_OK(lora_load(&l, ad2, &c, test_err()));
    CHECK(l.n_mod == CFG_N_MODULES && l.cfg.exclude_regex && !strcmp(l.cfg.exclude_regex, ".*\\.layers\\.0\\..*"));
    lora_release(&l);
    float *want = run(&ref, NULL), *got = run_adapter(&base, ad);
    CHECK(want && got);
    size_t n = (size_t)NB * NT * c.vocab_size;
    CHECK_MSG(rel_err(got, want, n) < 1e-5, "exclude_modules adapter vs hand: %g", rel_err(got, want, n));
    free(got);
    // merged by the CLI: the same logits; `info` counts the seven modules and names the exclusion
    CHECK_INT(test_sh("%s merge --model '%s' --adapter '%s' --out '%s'", test_lorakit(), bdir, ad, test_path("mg")), 0);
    got = cli_logits(test_path("mg"), NULL);
    CHECK(got && rel_err(got, want, n) < 1e-5);
    CHECK_INT(test_sh("%s info '%s'", test_lorakit(), ad), 0);
    CHECK_MSG(strstr(test_output(), "(7 adapted linears)") && strstr(test_output(), "excluded     regex"), "%s",
              test_output());
    // the list form: a file that also holds the excluded layer-0 module is refused, named
    char n0[2][128];
    float *A0, *B0;
    lora_items(&c, 0, CFG_Q, 2, 70, n0, it + 14, &A0, &B0);
    CHECK_OK(peft_write(ad, "{\"r\":2,\"lora_alpha\":2,\"target_modules\":\"all-linear\","
                            "\"exclude_modules\":[\"model.layers.0.self_attn.q_proj\"]}", it, 16));
    struct lk_err err = { 0 };
    CHECK(lora_load(&l, ad, &c, &err) != LK_OK);
    CHECK_MSG(strstr(err.msg, "'model.layers.0.self_attn.q_proj'") && strstr(err.msg, "exclude_modules"), "%s", err.msg);
    free(A0);
    free(B0);
    free(want);
    free(got);
    for (int m = 0; m < CFG_N_MODULES; m++) {
        free(A[m]);
        free(B[m]);
    }
    model_release(&base);
    model_release(&ref);
}

// ---- case 6: LoRA on embed_tokens, saved with its base layer ----

/* embed [V, C] += s (B A)^T, A [R, V], B [C, R]: peft/tuners/lora/layer.py Embedding (forward:
 * base_layer(x) + (embedding(x, A^T) @ B^T) * scaling; get_delta_weight transposes B A). */
static void add_embed_delta(float *E, int V, int C, const float *A, const float *B, int R, double s)
{
    for (int v = 0; v < V; v++)
        for (int ch = 0; ch < C; ch++) {
            double acc = 0;
            for (int r = 0; r < R; r++)
                acc += (double)B[(size_t)ch * R + r] * A[(size_t)r * V + v];
            E[(size_t)v * C + ch] = (float)(E[(size_t)v * C + ch] + s * acc);
        }
}

TEST(peft_case6_embedding_lora_with_its_base_layer_copy)
{
    struct cfg c;
    fix_cfg_qwen2(&c); // tied: the embedding LoRA changes the input side only (PEFT's Embedding layer)
    int V = c.vocab_size, C = c.hidden_size, R = 2;
    size_t n = (size_t)NB * NT * V;
    struct model base;
    P(bdir, "b");
    CHECK_OK(base_folder(bdir, &c, 81, &base));
    float *A = randn((size_t)R * V, 0.3f, 82), *B = randn((size_t)C * R, 0.3f, 83);
    float *E = malloc(sizeof(float) * V * C);
    memcpy(E, base.w.embed.f, sizeof(float) * V * C);
    float *E2 = randn((size_t)V * C, 0.05f, 84);
    for (int i = 0; i < V * C; i++)
        E2[i] += E[i];
    for (int variant = 0; variant < 2; variant++) {
        // save_and_load.py get_peft_model_state_dict: embed_tokens in target_modules sets
        // save_embedding_layers, and the base layer of the LoRA-wrapped embedding is saved as
        // "model.embed_tokens.base_layer.weight" [V, C]: the base's weight (variant 0) or, when the
        // embedding was resized or trained, another one (variant 1), which PEFT loads in its place
        const float *bl = variant ? E2 : E;
        struct st_item it[3] = {
            { PFX "model.embed_tokens.lora_embedding_A", 2, { R, V }, A }, // Embedding.update_layer: [r, V]
            { PFX "model.embed_tokens.lora_embedding_B", 2, { C, R }, B }, // [C, r]
            { PFX "model.embed_tokens.base_layer.weight", 2, { V, C }, bl },
        };
        P(ad, "ad");
        CHECK_OK(peft_write(ad, "{\"r\":2,\"lora_alpha\":4,\"target_modules\":[\"embed_tokens\"]}", it, 3));
        // the reference: an untied copy whose embedding is base_layer + s (B A)^T and whose lm_head
        // is base_layer (the shared weight of the tied base)
        struct model ref, run_m;
        CHECK_OK(model_load(&run_m, bdir, test_err()));
        CHECK_OK(copy_untied(&run_m, &ref) == 0 ? LK_OK : -1);
        memcpy(ref.w.embed.f, bl, sizeof(float) * V * C);
        memcpy(ref.w.lm_head.f, bl, sizeof(float) * V * C);
        add_embed_delta(ref.w.embed.f, V, C, A, B, R, 2.0);
        float *want = run(&ref, NULL), *got = run_adapter(&run_m, ad);
        CHECK(want && got);
        CHECK_MSG(rel_err(got, want, n) < 1e-5, "variant %d: adapter vs hand %g", variant, rel_err(got, want, n));
        free(got);
        CHECK_INT(test_sh("%s merge --model '%s' --adapter '%s' --out '%s' --overwrite", test_lorakit(), bdir, ad,
                          test_path("mg")), 0);
        got = cli_logits(test_path("mg"), NULL);
        CHECK(got);
        CHECK_MSG(rel_err(got, want, n) < 1e-5, "variant %d: merged vs hand %g", variant, rel_err(got, want, n));
        free(got);
        got = cli_logits(bdir, ad);
        CHECK(got && rel_err(got, want, n) < 1e-5);
        free(got);
        free(want);
        model_release(&ref);
        model_release(&run_m);
    }
    free(A);
    free(B);
    free(E);
    free(E2);
    model_release(&base);
}

// ---- case 7: layers_to_transform, lm_head as a target, trainable tokens ----

TEST(peft_case7_layers_to_transform_with_layers_pattern)
{
    struct cfg c;
    fix_cfg_qwen2(&c);
    struct model base, ref;
    P(bdir, "b");
    CHECK_OK(base_folder(bdir, &c, 91, &base));
    CHECK_OK(model_load(&ref, bdir, test_err()));
    char names[2][2][128];
    struct st_item it[4];
    float *A[2], *B[2];
    int mods[2] = { CFG_Q, CFG_V };
    for (int k = 0; k < 2; k++) {
        lora_items(&c, 1, mods[k], 2, 92 + 2 * (uint64_t)k, names[k], it + 2 * k, &A[k], &B[k]);
        int64_t o, i;
        cfg_module_shape(&c, (enum cfg_module)mods[k], &o, &i);
        add_ba(wt(&ref, k ? "model.layers.1.self_attn.v_proj.weight" : "model.layers.1.self_attn.q_proj.weight"),
               (int)o, (int)i, B[k], A[k], 2, 2.0);
    }
    // tuners_utils.py check_target_module_exists: with a list target_modules, the layer index is
    // read after layers_pattern (re.match(rf".*?\.{pattern}\.(\d+)\.", key)) and must be in
    // layers_to_transform (an int or a list)
    P(ad, "ad");
    static const char *const ok[] = {
        "{\"r\":2,\"lora_alpha\":4,\"target_modules\":[\"q_proj\",\"v_proj\"],\"layers_to_transform\":[1],"
        "\"layers_pattern\":\"layers\"}",
        "{\"r\":2,\"lora_alpha\":4,\"target_modules\":[\"q_proj\",\"v_proj\"],\"layers_to_transform\":1}",
        "{\"r\":2,\"lora_alpha\":4,\"target_modules\":[\"q_proj\",\"v_proj\"],\"layers_to_transform\":[1, 5],"
        "\"layers_pattern\":[\"h\",\"layers\"]}",
    };
    size_t n = (size_t)NB * NT * c.vocab_size;
    float *want = run(&ref, NULL);
    CHECK(want);
    for (size_t v = 0; v < sizeof ok / sizeof ok[0]; v++) {
        CHECK_OK(peft_write(ad, ok[v], it, 4));
        struct lora l;
        CHECK_OK(lora_load(&l, ad, &c, test_err()));
        CHECK_MSG(l.n_mod == 2 && lora_find(&l, 1, CFG_Q) && lora_find(&l, 1, CFG_V), "config %zu", v);
        if (v == 0) { // written back by lorakit: the selection kept
            CHECK_OK(lora_save(&l, test_path("ad2"), test_err()));
            struct lora l2;
            CHECK_OK(lora_load(&l2, test_path("ad2"), &c, test_err()));
            CHECK(l2.n_mod == 2 && l2.cfg.n_layers == 1 && l2.cfg.layers[0] == 1 && l2.cfg.n_layers_pattern == 1);
            lora_release(&l2);
        }
        lora_release(&l);
        float *got = run_adapter(&base, ad);
        CHECK(got);
        CHECK_MSG(rel_err(got, want, n) < 1e-5, "config %zu vs hand: %g", v, rel_err(got, want, n));
        free(got);
    }
    // a layers_pattern that names no segment of these modules (GPT-2's "h"): nothing is targeted,
    // so the file's tensors are refused, named
    CHECK_OK(peft_write(ad, "{\"r\":2,\"target_modules\":[\"q_proj\",\"v_proj\"],\"layers_to_transform\":[1],"
                            "\"layers_pattern\":\"h\"}", it, 4));
    struct lora l;
    struct lk_err err = { 0 };
    CHECK(lora_load(&l, ad, &c, &err) == LK_ERR_FORMAT);
    CHECK_MSG(strstr(err.msg, "model.layers.1.self_attn.q_proj") && strstr(err.msg, "layers_to_transform"), "%s",
              err.msg);
    // layers_to_transform with a regex target_modules: PEFT's LoraConfig refuses the pair
    CHECK_OK(peft_write(ad, "{\"r\":2,\"target_modules\":\".*q_proj\",\"layers_to_transform\":[1]}", it, 4));
    CHECK(lora_load(&l, ad, &c, &err) == LK_ERR_FORMAT && strstr(err.msg, "layers_to_transform"));
    free(want);
    for (int k = 0; k < 2; k++) {
        free(A[k]);
        free(B[k]);
    }
    model_release(&base);
    model_release(&ref);
}

/* The reference for a LoRA on lm_head: lm_head [V, C] += s B A (an nn.Linear(C, V) like any
 * other: layer.py LoraLayer.update_layer); on a tied base PEFT wraps lm_head only, so the input
 * embedding keeps the base's values (an untied copy here). */
TEST(peft_case7_lm_head_as_a_lora_target)
{
    for (int tied = 0; tied < 2; tied++) {
        struct cfg c;
        if (tied)
            fix_cfg_qwen2(&c);
        else
            fix_cfg_llama(&c);
        int V = c.vocab_size, C = c.hidden_size, R = 2;
        size_t n = (size_t)NB * NT * V;
        struct model base, ref, m0;
        P(bdir, "b");
        CHECK_OK(base_folder(bdir, &c, 101 + (uint64_t)tied, &base));
        CHECK_OK(model_load(&m0, bdir, test_err()));
        CHECK_OK(copy_untied(&m0, &ref) == 0 ? LK_OK : -1);
        float *A = randn((size_t)R * C, 0.3f, 103), *B = randn((size_t)V * R, 0.3f, 104);
        char qn[2][128];
        float *qa, *qb;
        struct st_item it[5];
        lora_items(&c, 0, CFG_Q, R, 105, qn, it, &qa, &qb);
        int64_t qo, qi;
        cfg_module_shape(&c, CFG_Q, &qo, &qi);
        add_ba(wt(&ref, "model.layers.0.self_attn.q_proj.weight"), (int)qo, (int)qi, qb, qa, R, 2.0);
        const float *W = tied ? base.w.embed.f : base.w.lm_head.f;
        // save_and_load.py: lm_head in target_modules counts as an embedding layer there, so the
        // base layer under its LoRA is saved too: "lm_head.base_layer.weight" [V, C]
        it[2] = (struct st_item){ PFX "lm_head.lora_A.weight", 2, { R, C }, A };
        it[3] = (struct st_item){ PFX "lm_head.lora_B.weight", 2, { V, R }, B };
        it[4] = (struct st_item){ PFX "lm_head.base_layer.weight", 2, { V, C }, W };
        P(ad, "ad");
        // a list entry may be a whole module path: only layer 0's q_proj (key == entry)
        CHECK_OK(peft_write(ad, "{\"r\":2,\"lora_alpha\":4,\"target_modules\":[\"model.layers.0.self_attn.q_proj\","
                                "\"lm_head\"]}", it, 5));
        add_ba(ref.w.lm_head.f, V, C, B, A, R, 2.0);
        float *want = run(&ref, NULL), *got = run_adapter(&m0, ad);
        CHECK_MSG(want && got, "tied %d: %s", tied, test_errmsg());
        CHECK_MSG(rel_err(got, want, n) < 1e-5, "tied %d: run vs hand %g", tied, rel_err(got, want, n));
        CHECK(m0.cfg.tie_word_embeddings == 0); // untied in memory on the tied base
        free(got);
        CHECK_INT(test_sh("%s merge --model '%s' --adapter '%s' --out '%s' --overwrite", test_lorakit(), bdir, ad,
                          test_path("mg")), 0);
        char mp[1100];
        snprintf(mp, sizeof mp, "%s/model.safetensors", test_path("mg"));
        struct st_file f;
        CHECK_OK(st_open(&f, mp, test_err()));
        const struct st_tensor *h = st_find(&f, "lm_head.weight"), *e = st_find(&f, "model.embed_tokens.weight");
        CHECK(h && e);
        float *hv = malloc(sizeof(float) * V * C), *ev = malloc(sizeof(float) * V * C);
        st_tensor_to_f32(h, hv, NULL);
        st_tensor_to_f32(e, ev, NULL);
        st_close(&f);
        CHECK(rel_err(hv, ref.w.lm_head.f, (size_t)V * C) < 1e-6);
        CHECK(!memcmp(ev, base.w.embed.f, sizeof(float) * V * C)); // the input side untouched
        free(hv);
        free(ev);
        got = cli_logits(test_path("mg"), NULL);
        CHECK(got && rel_err(got, want, n) < 1e-5);
        free(got);
        got = cli_logits(bdir, ad);
        CHECK(got && rel_err(got, want, n) < 1e-5);
        free(got);
        // the rank reduction treats lm_head's pair like a projection's: rank 1 everywhere
        CHECK_INT(test_sh("%s svd-compress --adapter '%s' --out '%s' --rank 1 --quiet --overwrite", test_lorakit(), ad,
                          test_path("red")), 0);
        struct lora red;
        CHECK_OK(lora_load(&red, test_path("red"), &c, test_err()));
        CHECK(red.head_A && red.head_R == 1 && red.n_mod == 1 && red.mod[0].R == 1);
        lora_release(&red);
        free(want);
        free(A);
        free(B);
        free(qa);
        free(qb);
        model_release(&base);
        model_release(&ref);
        model_release(&m0);
    }
}

TEST(peft_case7_trainable_tokens)
{
    // list form on a tied base: the input embedding's rows (other.py set_additional_trainable_modules:
    // a list means the input embeddings, _get_input_embeddings_name), and PEFT ties lm_head's token
    // adapter to it (the same function, tied_adapter), so lm_head's rows change too
    struct cfg c;
    fix_cfg_qwen2(&c);
    int V = c.vocab_size, C = c.hidden_size;
    size_t n = (size_t)NB * NT * V;
    struct model base, ref, m0;
    P(bdir, "b");
    CHECK_OK(base_folder(bdir, &c, 111, &base));
    CHECK_OK(model_load(&m0, bdir, test_err()));
    CHECK_OK(model_load(&ref, bdir, test_err())); // tied, like the base
    float *rows = randn((size_t)2 * C, 0.3f, 112);
    // trainable_tokens/layer.py: trainable_tokens_delta holds the new rows themselves [n, C],
    // written with index_copy; TrainableTokensWrapper saves it as
    // "<module>.token_adapter.trainable_tokens_delta"
    // with a LoRA on layer 0's q_proj beside the tokens (PEFT refuses a config that adapts nothing)
    struct st_item it[3] = { { PFX "model.embed_tokens.token_adapter.trainable_tokens_delta", 2, { 2, C }, rows } };
    char qn[2][128];
    float *qa, *qb;
    lora_items(&c, 0, CFG_Q, 2, 115, qn, it + 1, &qa, &qb);
    int64_t qo, qi;
    cfg_module_shape(&c, CFG_Q, &qo, &qi);
    add_ba(wt(&ref, "model.layers.0.self_attn.q_proj.weight"), (int)qo, (int)qi, qb, qa, 2, 4.0); // alpha 8 (default)
    P(ad, "ad");
    CHECK_OK(peft_write(ad, "{\"r\":2,\"target_modules\":[\"model.layers.0.self_attn.q_proj\"],"
                            "\"trainable_token_indices\":[3, 7]}", it, 3));
    memcpy(ref.w.embed.f + 3 * C, rows, sizeof(float) * C); // the tied weight: lm_head too
    memcpy(ref.w.embed.f + 7 * C, rows + C, sizeof(float) * C);
    float *want = run(&ref, NULL), *got = run_adapter(&m0, ad);
    CHECK(want && got);
    CHECK_MSG(rel_err(got, want, n) < 1e-5, "tokens vs hand %g", rel_err(got, want, n));
    free(got);
    CHECK_INT(test_sh("%s merge --model '%s' --adapter '%s' --out '%s'", test_lorakit(), bdir, ad, test_path("mg")), 0);
    struct cfg cm;
    CHECK_OK(cfg_load(&cm, test_path("mg"), test_err()));
    CHECK(cm.tie_word_embeddings); // the shared weight changed: still tied
    cfg_release(&cm);
    got = cli_logits(test_path("mg"), NULL);
    CHECK(got && rel_err(got, want, n) < 1e-5);
    free(got);
    free(want);
    model_release(&ref);
    // dict form naming lm_head on an untied base: lm_head's rows only
    struct cfg cl;
    fix_cfg_llama(&cl);
    struct model lb, lref, lm0;
    P(ldir, "lb");
    CHECK_OK(base_folder(ldir, &cl, 113, &lb));
    CHECK_OK(model_load(&lm0, ldir, test_err()));
    CHECK_OK(model_load(&lref, ldir, test_err()));
    float *row = randn((size_t)cl.hidden_size, 0.3f, 114);
    struct st_item it2[3] = { { PFX "lm_head.token_adapter.trainable_tokens_delta", 2, { 1, cl.hidden_size }, row } };
    char qn2[2][128];
    float *qa2, *qb2;
    lora_items(&cl, 0, CFG_Q, 2, 116, qn2, it2 + 1, &qa2, &qb2);
    cfg_module_shape(&cl, CFG_Q, &qo, &qi);
    add_ba(wt(&lref, "model.layers.0.self_attn.q_proj.weight"), (int)qo, (int)qi, qb2, qa2, 2, 4.0);
    CHECK_OK(peft_write(ad, "{\"r\":2,\"target_modules\":[\"model.layers.0.self_attn.q_proj\"],"
                            "\"trainable_token_indices\":{\"lm_head\":[4]}}", it2, 3));
    memcpy(lref.w.lm_head.f + 4 * cl.hidden_size, row, sizeof(float) * cl.hidden_size);
    size_t nl = (size_t)NB * NT * cl.vocab_size;
    want = run(&lref, NULL);
    got = run_adapter(&lm0, ad);
    CHECK(want && got && rel_err(got, want, nl) < 1e-5);
    free(got);
    CHECK_INT(test_sh("%s merge --model '%s' --adapter '%s' --out '%s'", test_lorakit(), ldir, ad, test_path("mg2")), 0);
    got = cli_logits(test_path("mg2"), NULL);
    CHECK(got && rel_err(got, want, nl) < 1e-5);
    free(got);
    free(want);
    // refusals: a row count that is not the index count; an id outside the vocabulary
    struct lora l;
    struct lk_err err = { 0 };
    CHECK_OK(peft_write(ad, "{\"r\":2,\"target_modules\":[\"model.layers.0.self_attn.q_proj\"],"
                            "\"trainable_token_indices\":{\"lm_head\":[4, 5]}}", it2, 3));
    CHECK(lora_load(&l, ad, &cl, &err) == LK_ERR_SHAPE && strstr(err.msg, "one row per token"));
    CHECK_OK(peft_write(ad, "{\"r\":2,\"target_modules\":[\"model.layers.0.self_attn.q_proj\"],"
                            "\"trainable_token_indices\":{\"lm_head\":[400]}}", it2, 3));
    CHECK(lora_load(&l, ad, &cl, &err) == LK_ERR_SHAPE && strstr(err.msg, "holds token 400"));
    free(rows);
    free(row);
    free(qa);
    free(qb);
    free(qa2);
    free(qb2);
    model_release(&lb);
    model_release(&lref);
    model_release(&lm0);
    model_release(&base);
    model_release(&m0);
}

// ---- whole-weight changes over weights kept in bf16 ----

TEST(peft_extras_over_bf16_weights_match_float32)
{
    // a tied base saved in bf16: run with its matrices kept in bf16 (--weights file) and widened
    // to float32 (--weights f32); every kind of whole-weight change must give the same logits:
    // trainable tokens (rows of the shared embedding), a LoRA on lm_head (unties), an
    // embed_tokens modules_to_save copy (unties), an embedding base_layer copy (stays tied)
    struct cfg c;
    fix_cfg_qwen2(&c);
    int V = c.vocab_size, C = c.hidden_size, R = 2;
    struct model m;
    CHECK_OK(fix_model_random(&m, &c, 0.3f, 121));
    P(bdir, "b16");
    CHECK_OK(model_save(&m, bdir, TENSOR_BF16, test_err()));
    model_release(&m);
    float *rows = randn((size_t)2 * C, 0.3f, 122), *A = randn((size_t)R * C, 0.3f, 123);
    float *B = randn((size_t)V * R, 0.3f, 124), *E = randn((size_t)V * C, 0.3f, 125);
    char qn[2][128];
    float *qa, *qb;
    struct st_item q[2];
    lora_items(&c, 0, CFG_Q, R, 126, qn, q, &qa, &qb);
    static const char *const cfgs[4] = {
        "{\"r\":2,\"target_modules\":[\"model.layers.0.self_attn.q_proj\"],\"trainable_token_indices\":[3, 7]}",
        "{\"r\":2,\"lora_alpha\":4,\"target_modules\":[\"model.layers.0.self_attn.q_proj\",\"lm_head\"]}",
        "{\"r\":2,\"target_modules\":[\"model.layers.0.self_attn.q_proj\"],\"modules_to_save\":[\"embed_tokens\"]}",
        "{\"r\":2,\"lora_alpha\":4,\"target_modules\":[\"model.layers.0.self_attn.q_proj\",\"embed_tokens\"]}",
    };
    float *EA = randn((size_t)R * V, 0.3f, 127), *EB = randn((size_t)C * R, 0.3f, 128);
    struct st_item extra[4][3] = {
        { { PFX "model.embed_tokens.token_adapter.trainable_tokens_delta", 2, { 2, C }, rows } },
        { { PFX "lm_head.lora_A.weight", 2, { R, C }, A }, { PFX "lm_head.lora_B.weight", 2, { V, R }, B } },
        { { PFX "model.embed_tokens.weight", 2, { V, C }, E } }, // save_and_load.py drops "modules_to_save.default."
        { { PFX "model.embed_tokens.lora_embedding_A", 2, { R, V }, EA },
          { PFX "model.embed_tokens.lora_embedding_B", 2, { C, R }, EB },
          { PFX "model.embed_tokens.base_layer.weight", 2, { V, C }, E } },
    };
    int n_extra[4] = { 1, 2, 1, 3 };
    size_t n = (size_t)NB * NT * V;
    for (int k = 0; k < 4; k++) {
        struct st_item it[5] = { q[0], q[1] };
        for (int j = 0; j < n_extra[k]; j++)
            it[2 + j] = extra[k][j];
        P(ad, "ad16");
        CHECK_OK(peft_write(ad, cfgs[k], it, 2 + n_extra[k]));
        float *kept = cli_logits_with(bdir, ad, "--weights file");
        CHECK_MSG(kept, "case %d: %s", k, test_output());
        float *wide = cli_logits_with(bdir, ad, "--weights f32");
        CHECK_MSG(wide, "case %d: %s", k, test_output());
        float *base = cli_logits(bdir, NULL);
        CHECK(base);
        CHECK_MSG(rel_err(kept, wide, n) < 1e-5, "case %d: bf16-kept vs float32 %g", k, rel_err(kept, wide, n));
        CHECK_MSG(rel_err(kept, base, n) > 1e-3, "case %d: the adapter changed nothing", k);
        free(kept);
        free(wide);
        free(base);
    }
    free(rows);
    free(A);
    free(B);
    free(E);
    free(EA);
    free(EB);
    free(qa);
    free(qb);
}

// ---- cases 1 and 2: what svd-compress writes ----

/* A full fine-tune of m: every projection gets a dense change (full rank), the q/k/v biases one;
 * with all, the norms and the embedding (and an untied lm_head) change too. */
static void finetune(struct model *m, int all, uint64_t seed)
{
    struct lk_rng rng;
    lk_rng_seed(&rng, seed);
    struct model_tensor *t;
    int n;
    LK_ASSERT(model_weights_tensors(&m->w, &m->cfg, &t, &n, NULL) == 0);
    for (int i = 0; i < n; i++)
        if (t[i].module >= 0 || all)
            for (size_t j = 0; j < t[i].numel; j++)
                t[i].data[j] += 0.05f * lk_rng_normal(&rng);
    lk_free(t);
}

/* A safetensors tensor as float32 (caller frees), or NULL. */
static float *file_tensor(const char *dir, const char *file, const char *name, size_t *numel)
{
    char p[1200];
    snprintf(p, sizeof p, "%s/%s", dir, file);
    struct st_file f;
    if (st_open(&f, p, NULL))
        return NULL;
    const struct st_tensor *t = st_find(&f, name);
    float *v = t ? malloc(sizeof(float) * t->numel) : NULL;
    if (v)
        st_tensor_to_f32(t, v, NULL);
    if (numel)
        *numel = t ? t->numel : 0;
    st_close(&f);
    return v;
}

/* The adapter_config.json of dir, parsed (caller deletes). */
static cJSON *adapter_config(const char *dir)
{
    char p[1200], *text = NULL;
    snprintf(p, sizeof p, "%s/adapter_config.json", dir);
    if (lk_read_file(p, &text, NULL, NULL))
        return NULL;
    cJSON *o = cJSON_Parse(text);
    lk_free(text);
    return o;
}

TEST(peft_case1_compressed_lora_bias_merges_and_no_bias_leaves_it_out)
{
    struct cfg c;
    fix_cfg_qwen2(&c); // q/k/v biases
    struct model base, tuned;
    P(bdir, "b");
    P(tdir, "t");
    CHECK_OK(base_folder(bdir, &c, 121, &base));
    CHECK_OK(fix_model_random(&tuned, &c, 0.3f, 121));
    finetune(&tuned, 0, 122);
    CHECK_OK(model_save(&tuned, tdir, TENSOR_F32, test_err()));
    // full rank, so that the adapter is the fine-tune exactly
    P(ad, "ad");
    CHECK_INT(test_sh("%s svd-compress --base '%s' --tuned '%s' --out '%s' --rank 64 --quiet", test_lorakit(), bdir,
                      tdir, ad), 0);
    CHECK_MSG(strstr(test_output(), "merge_and_unload refuses lora_bias") && strstr(test_output(), "--no-bias"), "%s",
              test_output());
    // PEFT's layout: lora_bias gives EVERY targeted module a lora_B.bias (layer.py update_layer:
    // nn.Linear(r, out, bias=lora_bias)): the real deltas on q/k/v, zeros where the base has none
    cJSON *cj = adapter_config(ad);
    CHECK(cj && cJSON_IsTrue(cJSON_GetObjectItem(cj, "lora_bias")));
    cJSON_Delete(cj);
    for (int l = 0; l < 2; l++)
        for (int m = 0; m < CFG_N_MODULES; m++) {
            char nm[160], wn[128];
            lora_peft_name(l, m, nm, sizeof nm);
            strcat(nm, ".lora_B.bias");
            size_t nb;
            float *b = file_tensor(ad, "adapter_model.safetensors", nm, &nb);
            CHECK_MSG(b, "no %s", nm);
            cfg_module_path(l, (enum cfg_module)m, wn, sizeof wn);
            strcat(wn, ".bias");
            float *b0 = m <= CFG_V ? wt(&base, wn) : NULL, *b1 = m <= CFG_V ? wt(&tuned, wn) : NULL;
            for (size_t i = 0; i < nb; i++)
                CHECK_MSG(b[i] == (m <= CFG_V ? b1[i] - b0[i] : 0.0f), "%s[%zu] = %g", nm, i, b[i]);
            free(b);
        }
    // lorakit merge accepts the zeros (they were refused before), and the merge is the fine-tune
    CHECK_INT(test_sh("%s merge --model '%s' --adapter '%s' --out '%s'", test_lorakit(), bdir, ad, test_path("mg")), 0);
    float *want = cli_logits(tdir, NULL), *got = cli_logits(test_path("mg"), NULL);
    size_t n = (size_t)NB * NT * c.vocab_size;
    CHECK(want && got);
    CHECK_MSG(rel_err(got, want, n) <= 1e-4, "merged vs fine-tune: %g", rel_err(got, want, n));
    free(got);
    // a non-zero lora_B.bias on a layer without a bias stays refused, naming the module
    struct lora l;
    CHECK_OK(lora_load(&l, ad, &c, test_err()));
    lora_find(&l, 1, CFG_O)->bias[3] = 0.5f;
    CHECK_OK(lora_save(&l, test_path("ad_bad"), test_err()));
    lora_release(&l);
    CHECK_INT(test_sh("%s merge --model '%s' --adapter '%s' --out '%s'", test_lorakit(), bdir, test_path("ad_bad"),
                      test_path("mg_bad")), 1);
    CHECK_MSG(strstr(test_output(), "non-zero lora_B.bias for 'model.layers.1.self_attn.o_proj'"), "%s", test_output());
    CHECK(!lk_file_exists(test_path("mg_bad")));
    // --no-bias: no lora_bias, no lora_B.bias, each bias change listed with its size
    P(adn, "adn");
    CHECK_INT(test_sh("%s svd-compress --base '%s' --tuned '%s' --out '%s' --rank 64 --quiet --no-bias", test_lorakit(),
                      bdir, tdir, adn), 0);
    const char *out = test_output();
    int dropped = 0;
    for (const char *p = out; (p = strstr(p, "LEFT OUT (--no-bias)")); p++)
        dropped++;
    CHECK_MSG(dropped == 6 && !strstr(out, "merge_and_unload refuses"), "%d dropped:\n%s", dropped, out);
    // the figure printed for one of them is ||b_tuned - b_base|| / ||b_base||, computed here
    const char *row = strstr(out, "model.layers.0.self_attn.k_proj.bias");
    double printed = -1, d2 = 0, b2 = 0;
    CHECK(row && sscanf(strstr(row, "rel. change ") + 12, "%lf", &printed) == 1);
    float *kb0 = wt(&base, "model.layers.0.self_attn.k_proj.bias"), *kb1 = wt(&tuned, "model.layers.0.self_attn.k_proj.bias");
    for (int i = 0; i < 8; i++) {
        d2 += ((double)kb1[i] - kb0[i]) * ((double)kb1[i] - kb0[i]);
        b2 += (double)kb0[i] * kb0[i];
    }
    CHECK_NEAR(printed, sqrt(d2 / b2), 2e-3);
    cj = adapter_config(adn);
    CHECK(cj && cJSON_IsFalse(cJSON_GetObjectItem(cj, "lora_bias")));
    cJSON_Delete(cj);
    struct lora_file lf;
    CHECK_OK(lora_file_open(&lf, adn, test_err()));
    for (int i = 0; i < lf.st.n; i++)
        CHECK(!strstr(lf.st.t[i].name, "lora_B.bias"));
    lora_file_close(&lf);
    CHECK_INT(test_sh("%s merge --model '%s' --adapter '%s' --out '%s'", test_lorakit(), bdir, adn, test_path("mgn")), 0);
    float *bm = file_tensor(test_path("mgn"), "model.safetensors", "model.layers.0.self_attn.k_proj.bias", NULL);
    CHECK(bm && !memcmp(bm, kb0, sizeof(float) * 8)); // the base's bias, untouched
    free(bm);
    free(want);
    model_release(&base);
    model_release(&tuned);
}

TEST(peft_case2_full_rank_compression_reproduces_tied_and_untied_finetunes)
{
    for (int tied = 1; tied >= 0; tied--) {
        struct cfg c;
        if (tied)
            fix_cfg_qwen2(&c);
        else
            fix_cfg_llama(&c);
        int V = c.vocab_size, C = c.hidden_size;
        size_t n = (size_t)NB * NT * V;
        struct model base, tuned;
        P(bdir, "b");
        P(tdir, "t");
        P(ad, "ad");
        CHECK_OK(base_folder(bdir, &c, 131, &base));
        CHECK_OK(fix_model_random(&tuned, &c, 0.3f, 131));
        finetune(&tuned, 1, 132); // everything moves: embedding (and with it a tied lm_head), norms
        CHECK_OK(model_save(&tuned, tdir, TENSOR_F32, test_err()));
        CHECK_INT(test_sh("%s svd-compress --base '%s' --tuned '%s' --out '%s' --rank 64 --keep-other --quiet "
                          "--overwrite", test_lorakit(), bdir, tdir, ad), 0);
        float *want = cli_logits(tdir, NULL), *base_l = cli_logits(bdir, NULL), *got = cli_logits(bdir, ad);
        CHECK_MSG(want && base_l && got, "%s", test_output());
        CHECK_MSG(rel_err(base_l, want, n) > 1e-2, "the fine-tune moved the logits by %g only", rel_err(base_l, want, n));
        CHECK_MSG(rel_err(got, want, n) <= 1e-4, "tied %d: base + adapter vs fine-tune %g", tied, rel_err(got, want, n));
        free(got);
        // the file: on a tied base, embed_tokens AND lm_head copies (both the tuned embedding) with
        // ensure_weight_tying (PEFT's _check_tied_modules looks for these names in modules_to_save)
        cJSON *cj = adapter_config(ad);
        CHECK(cj && cJSON_IsBool(cJSON_GetObjectItem(cj, "ensure_weight_tying")));
        CHECK(cJSON_IsTrue(cJSON_GetObjectItem(cj, "ensure_weight_tying")) == tied);
        const cJSON *mts = cJSON_GetObjectItem(cj, "modules_to_save");
        int has_e = 0, has_h = 0;
        for (const cJSON *e = mts ? mts->child : NULL; e; e = e->next) {
            has_e |= !strcmp(e->valuestring, "embed_tokens");
            has_h |= !strcmp(e->valuestring, "lm_head");
        }
        CHECK(has_e && has_h);
        cJSON_Delete(cj);
        float *e = file_tensor(ad, "adapter_model.safetensors", PFX "model.embed_tokens.weight", NULL);
        float *h = file_tensor(ad, "adapter_model.safetensors", PFX "lm_head.weight", NULL);
        CHECK(e && h && !memcmp(e, tuned.w.embed.f, sizeof(float) * V * C) &&
              !memcmp(h, tuned.w.lm_head.f, sizeof(float) * V * C));
        free(e);
        free(h);
        // merged by lorakit: the fine-tune too
        CHECK_INT(test_sh("%s merge --model '%s' --adapter '%s' --out '%s' --overwrite", test_lorakit(), bdir, ad,
                          test_path("mg")), 0);
        got = cli_logits(test_path("mg"), NULL);
        CHECK(got && rel_err(got, want, n) <= 1e-4);
        free(got);
        if (tied) {
            // PEFT's reading of ensure_weight_tying: a copy of embed_tokens alone stands for lm_head
            // too; without it, lm_head keeps the base's values (the 0.585 gap)
            struct lora l;
            CHECK_OK(lora_load(&l, ad, &c, test_err()));
            int k = 0;
            for (int i = 0; i < l.n_extra; i++)
                if (strcmp(l.extra[i].name, "lm_head.weight"))
                    l.extra[k++] = l.extra[i];
                else {
                    lk_free(l.extra[i].name);
                    lk_free(l.extra[i].data);
                }
            l.n_extra = k;
            CHECK_OK(lora_save(&l, test_path("ad_one"), test_err()));
            lora_release(&l);
            got = cli_logits(bdir, test_path("ad_one"));
            CHECK(got && rel_err(got, want, n) <= 1e-4);
            free(got);
            // the same files with "ensure_weight_tying": false
            P(adu, "ad_untied");
            CHECK_INT(test_sh("cp -r '%s' '%s'", test_path("ad_one"), adu), 0);
            cj = adapter_config(adu);
            CHECK(cj);
            cJSON_ReplaceItemInObjectCaseSensitive(cj, "ensure_weight_tying", cJSON_CreateFalse());
            char *txt = cJSON_Print(cj), cp[1200];
            cJSON_Delete(cj);
            snprintf(cp, sizeof cp, "%s/adapter_config.json", adu);
            CHECK_OK(lk_write_file_atomic(cp, txt, strlen(txt), test_err()));
            free(txt);
            got = cli_logits(bdir, adu);
            CHECK(got);
            CHECK_MSG(rel_err(got, want, n) > 1e-3, "without tying: %g", rel_err(got, want, n));
            free(got);
        }
        free(want);
        free(base_l);
        model_release(&base);
        model_release(&tuned);
    }
}

// ---- case 3: logits, generate and eval run what merge handles ----

/* m/ in the test folder: the tiny preset (Qwen2, tied embeddings, biases) with a tokenizer trained
 * on text.txt, plus text.jsonl and qa.jsonl about the same facts. */
static int tiny_fixture(void)
{
    FILE *t = fopen(test_path("text.txt"), "w"), *j = fopen(test_path("text.jsonl"), "w");
    FILE *q = fopen(test_path("qa.jsonl"), "w");
    if (!t || !j || !q)
        return -1;
    for (int i = 0; i < 12; i++) {
        fprintf(t, "Item %d has code %c%d. The code of item %d is %c%d.\n", i, 'A' + i, i * 7 % 10, i, 'A' + i,
                i * 7 % 10);
        fprintf(j, "{\"text\":\"Item %d has code %c%d.\"}\n", i, 'A' + i, i * 7 % 10);
        if (i < 4)
            fprintf(q, "{\"id\":\"q%d\",\"question\":\"What is the code of item %d?\",\"answer\":\"%c%d\"}\n", i, i,
                    'A' + i, i * 7 % 10);
    }
    fclose(t);
    fclose(j);
    fclose(q);
    const char *d = test_tmpdir();
    return test_sh("%s init --preset tiny --out '%s/m' --seed 3 && %s tokenizer train --text '%s/text.txt' --vocab 300 "
                   "--out '%s/m'", test_lorakit(), d, test_lorakit(), d, d);
}

/* A metric's mean for a mode of `lorakit eval --json` ({"modes": {mode: {metric: {"mean"}}}}). */
static double eval_mean(const char *json, const char *mode, const char *metric)
{
    const char *brace = strchr(json, '{');
    cJSON *root = brace ? cJSON_Parse(brace) : NULL;
    const cJSON *m = cJSON_GetObjectItem(cJSON_GetObjectItem(root, "modes"), mode);
    const cJSON *v = cJSON_GetObjectItem(cJSON_GetObjectItem(m, metric), "mean");
    double x = cJSON_IsNumber(v) ? v->valuedouble : NAN;
    cJSON_Delete(root);
    return x;
}

TEST(peft_case3_tied_embedding_replacement_runs_in_logits_generate_and_eval)
{
    CHECK_MSG(tiny_fixture() == 0, "%s", test_output());
    P(mdir, "m");
    struct model base, ref;
    CHECK_OK(model_load(&base, mdir, test_err()));
    const struct cfg *c = &base.cfg;
    int V = c->vocab_size, C = c->hidden_size;
    // modules_to_save ["embed_tokens"] without ensure_weight_tying on the tied base: PEFT's
    // ModulesToSaveWrapper replaces the input embedding only (other.py; the copy is saved as
    // "model.embed_tokens.weight", adapter_state_dict dropping "modules_to_save.default.")
    float *E = randn((size_t)V * C, 0.3f, 141);
    char qn[2][128];
    float *qa, *qb;
    struct st_item it[3];
    lora_items(c, 0, CFG_Q, 2, 142, qn, it, &qa, &qb);
    it[2] = (struct st_item){ PFX "model.embed_tokens.weight", 2, { V, C }, E };
    const char *fields = "{\"r\":2,\"lora_alpha\":4,\"target_modules\":[\"model.layers.0.self_attn.q_proj\"],"
                         "\"modules_to_save\":[\"embed_tokens\"]}";
    P(ad, "ad");
    CHECK_OK(peft_write(ad, fields, it, 3));
    // 1. logits: the CLI runs it (it refused it before), against an untied copy changed by hand
    CHECK_OK(copy_untied(&base, &ref) == 0 ? LK_OK : -1);
    memcpy(ref.w.embed.f, E, sizeof(float) * V * C);
    int64_t qo, qi;
    cfg_module_shape(c, CFG_Q, &qo, &qi);
    add_ba(wt(&ref, "model.layers.0.self_attn.q_proj.weight"), (int)qo, (int)qi, qb, qa, 2, 2.0);
    float *want = run(&ref, NULL), *got = cli_logits(mdir, ad);
    size_t n = (size_t)NB * NT * V;
    CHECK_MSG(want && got, "%s", test_output());
    CHECK_MSG(rel_err(got, want, n) < 1e-5, "logits --adapter vs hand: %g", rel_err(got, want, n));
    free(got);
    free(want);
    // 2. generate and eval, with q_proj's B zero: base + adapter then has the merged model's weights
    //    exactly, so greedy text and eval figures must be the same, not just close
    memset(qb, 0, sizeof(float) * (size_t)qo * 2);
    P(adz, "adz");
    CHECK_OK(peft_write(adz, fields, it, 3));
    P(mz, "mz");
    CHECK_INT(test_sh("%s merge --model '%s' --adapter '%s' --out '%s'", test_lorakit(), mdir, adz, mz), 0);
    char gen_ad[4096], gen_mg[4096], gen_base[4096];
    const char *gcmd = "%s generate --model '%s' %s%s%s --prompt 'Item 3 has' --max-new 12 --threads 1";
    CHECK_INT(test_sh(gcmd, test_lorakit(), mdir, "--adapter '", adz, "'"), 0);
    snprintf(gen_ad, sizeof gen_ad, "%s", test_output());
    CHECK_INT(test_sh(gcmd, test_lorakit(), mz, "", "", ""), 0);
    snprintf(gen_mg, sizeof gen_mg, "%s", test_output());
    CHECK_INT(test_sh(gcmd, test_lorakit(), mdir, "", "", ""), 0);
    snprintf(gen_base, sizeof gen_base, "%s", test_output());
    CHECK_MSG(!strcmp(gen_ad, gen_mg), "generate with the adapter:\n%s\nmerged:\n%s", gen_ad, gen_mg);
    CHECK_MSG(strcmp(gen_ad, gen_base), "the adapter changed nothing:\n%s", gen_ad);
    const char *ecmd = "%s eval --model '%s' %s '%s' --qa '%s' --modes %s --max-new 4 --template plain --json --quiet "
                       "--threads 1 --runs '%s'";
    P(qa_path, "qa.jsonl");
    P(runs, "runs.db");
    CHECK_MSG(test_sh(ecmd, test_lorakit(), mdir, "--adapter", adz, qa_path, "base,ft", runs) == 0, "%s", test_output());
    double ft_ad = eval_mean(test_output(), "ft", "nll"), base_ad = eval_mean(test_output(), "base", "nll");
    CHECK_MSG(test_sh(ecmd, test_lorakit(), mdir, "--tuned", mz, qa_path, "base,ft", runs) == 0, "%s", test_output());
    double ft_mg = eval_mean(test_output(), "ft", "nll"), base_mg = eval_mean(test_output(), "base", "nll");
    CHECK_MSG(isfinite(ft_ad) && ft_ad == ft_mg, "ft NLL with the adapter %g, merged %g", ft_ad, ft_mg);
    // the base modes keep the base (the adapter runs on a copy) and differ from ft
    CHECK_MSG(base_ad == base_mg && ft_ad != base_ad, "base %g / %g, ft %g", base_ad, base_mg, ft_ad);
    free(E);
    free(qa);
    free(qb);
    model_release(&base);
    model_release(&ref);
}

// ---- case 8: info, unknown keys ----

TEST(peft_case8_info_counts_matched_modules_and_names_unknown_keys)
{
    struct cfg c;
    fix_cfg_llama(&c);
    struct model base;
    P(bdir, "b");
    CHECK_OK(base_folder(bdir, &c, 151, &base));
    // modules_to_save ["norm"]: PEFT wraps every module whose name ends in "norm" (other.py
    // _set_trainable: key.endswith(target_key)): four layer norms and model.norm, each saved as
    // "<module>.weight" (ModulesToSaveWrapper.adapter_state_dict)
    static const char *const norms[5] = { PFX "model.layers.0.input_layernorm.weight",
                                          PFX "model.layers.0.post_attention_layernorm.weight",
                                          PFX "model.layers.1.input_layernorm.weight",
                                          PFX "model.layers.1.post_attention_layernorm.weight", PFX "model.norm.weight" };
    float *nv = randn((size_t)c.hidden_size, 0.1f, 152);
    for (int i = 0; i < c.hidden_size; i++)
        nv[i] += 1.0f;
    struct st_item it[9];
    char qn[2][128];
    float *qa, *qb;
    lora_items(&c, 0, CFG_Q, 2, 153, qn, it, &qa, &qb);
    for (int i = 0; i < 5; i++)
        it[2 + i] = (struct st_item){ norms[i], 1, { c.hidden_size }, nv };
    float *A = randn((size_t)2 * c.vocab_size, 0.3f, 154), *B = randn((size_t)c.hidden_size * 2, 0.3f, 155);
    it[7] = (struct st_item){ PFX "model.embed_tokens.lora_embedding_A", 2, { 2, c.vocab_size }, A };
    it[8] = (struct st_item){ PFX "model.embed_tokens.lora_embedding_B", 2, { c.hidden_size, 2 }, B };
    P(ad, "ad");
    CHECK_OK(peft_write(ad, "{\"r\":2,\"target_modules\":[\"model.layers.0.self_attn.q_proj\",\"embed_tokens\"],"
                            "\"modules_to_save\":[\"norm\"],\"some_future_config\":null,\"use_fancy_new_thing\":true}",
                        it, 9));
    CHECK_INT(test_sh("%s info '%s'", test_lorakit(), ad), 0);
    const char *out = test_output();
    CHECK_MSG(strstr(out, "modules_to_save 1 entry matching 5 modules"), "%s", out);
    CHECK_MSG(strstr(out, "q_proj,embed_tokens (1 adapted linears, LoRA on embed_tokens (rank 2))"), "%s", out);
    CHECK_MSG(strstr(out, "warning:") && strstr(out, "adapter_config.json: unknown keys 'some_future_config', "
                                                     "'use_fancy_new_thing'"), "%s", out);
    CHECK_INT(test_sh("%s info --json '%s' 2>/dev/null", test_lorakit(), ad), 0);
    cJSON *j = cJSON_Parse(test_output());
    CHECK(j);
    CHECK_INT(cJSON_GetObjectItem(j, "modules_to_save_modules")->valueint, 5);
    CHECK(cJSON_IsTrue(cJSON_GetObjectItem(j, "embedding_lora")));
    cJSON_Delete(j);
    // the commands that run or merge it name the unknown keys too, and apply the five norms
    float *got = cli_logits(bdir, ad);
    CHECK(got && strstr(test_output(), "unknown keys 'some_future_config'"));
    free(got);
    CHECK_INT(test_sh("%s merge --model '%s' --adapter '%s' --out '%s'", test_lorakit(), bdir, ad, test_path("mg")), 0);
    CHECK(strstr(test_output(), "unknown keys 'some_future_config'"));
    for (int i = 0; i < 5; i++) {
        float *w = file_tensor(test_path("mg"), "model.safetensors", norms[i] + strlen(PFX), NULL);
        CHECK_MSG(w && !memcmp(w, nv, sizeof(float) * c.hidden_size), "%s not replaced", norms[i]);
        free(w);
    }
    // a field that changes what the adapter computes and that lorakit does not apply: refused, named
    CHECK_OK(peft_write(ad, "{\"r\":2,\"target_modules\":[\"model.layers.0.self_attn.q_proj\",\"embed_tokens\"],"
                            "\"modules_to_save\":[\"norm\"],\"target_parameters\":[\"mlp.experts.down_proj\"]}", it, 9));
    CHECK_INT(test_sh("%s info '%s'", test_lorakit(), ad), 1);
    CHECK_MSG(strstr(test_output(), "'target_parameters' is set"), "%s", test_output());
    free(nv);
    free(qa);
    free(qb);
    free(A);
    free(B);
    model_release(&base);
}

// ---- acceptance: every adapter lorakit writes merges ----

TEST(peft_every_adapter_lorakit_writes_merges)
{
    CHECK_MSG(tiny_fixture() == 0, "%s", test_output());
    const char *d = test_tmpdir(), *lk = test_lorakit();
    static const struct {
        const char *name, *flags;
    } trained[] = { { "lora", "" }, { "dora", "--dora" }, { "rslora", "--rslora" }, { "pissa", "--init pissa" },
                    { "full", "--full" } };
    for (size_t i = 0; i < sizeof trained / sizeof trained[0]; i++)
        CHECK_MSG(test_sh("%s train --model '%s/m' --data '%s/text.jsonl' --out '%s/%s' --steps 2 --batch 2 --seq 24 "
                          "--lr 1e-2 --quiet --runs '%s/runs.db' %s", lk, d, d, d, trained[i].name, d,
                          trained[i].flags) == 0, "train %s: %s", trained[i].name, test_output());
    CHECK_INT(test_sh("%s svd-compress --base '%s/m' --tuned '%s/full' --out '%s/svd' --rank 4 --quiet --runs '%s/runs.db'",
                      lk, d, d, d, d), 0);
    CHECK_INT(test_sh("%s svd-compress --base '%s/m' --tuned '%s/full' --out '%s/svd_keep' --rank 4 --keep-other --quiet "
                      "--runs '%s/runs.db'", lk, d, d, d, d), 0);
    CHECK_INT(test_sh("%s merge --model '%s/m' --adapter '%s/lora' --adapter '%s/rslora' --method cat --into-adapter "
                      "--out '%s/cat'", lk, d, d, d, d), 0);
    CHECK_INT(test_sh("%s merge --model '%s/m' --adapter '%s/lora' --adapter '%s/rslora' --method svd --rank 4 "
                      "--into-adapter --out '%s/svdm'", lk, d, d, d, d), 0);
    static const char *const adapters[] = { "lora", "dora", "rslora", "pissa", "svd", "svd_keep", "cat", "svdm" };
    for (size_t i = 0; i < sizeof adapters / sizeof adapters[0]; i++) {
        // read back through the same checks, then merged (with the logits check of --verify)
        char p[1200];
        snprintf(p, sizeof p, "%s/%s", d, adapters[i]);
        struct lora_file lf;
        CHECK_OK(lora_file_open(&lf, p, test_err()));
        lora_file_close(&lf);
        CHECK_MSG(test_sh("%s merge --model '%s/m' --adapter '%s' --out '%s/merged_%s' --verify", lk, d, p, d,
                          adapters[i]) == 0, "merge %s: %s", adapters[i], test_output());
        CHECK_MSG(strstr(test_output(), "verify:"), "%s", test_output());
    }
    // the compressed full fine-tune of this Qwen2 base: q/k/v biases moved, so lora_bias with
    // zeros on the other modules, merged above; with --keep-other its tied embedding is written
    // for both sides
    cJSON *cj = adapter_config(test_path("svd_keep"));
    CHECK(cj && cJSON_IsTrue(cJSON_GetObjectItem(cj, "lora_bias")) &&
          cJSON_IsTrue(cJSON_GetObjectItem(cj, "ensure_weight_tying")));
    cJSON_Delete(cj);
}

// ---- allocation failures in the reader and the run-time path ----

TEST(peft_reader_and_untie_allocation_failures_are_clean)
{
    struct cfg c;
    fix_cfg_qwen2(&c); // tied: the adapter below unties it
    int V = c.vocab_size, C = c.hidden_size;
    struct model base;
    P(bdir, "b");
    CHECK_OK(base_folder(bdir, &c, 161, &base));
    char qn[2][128];
    float *qa, *qb;
    struct st_item it[8];
    lora_items(&c, 1, CFG_Q, 2, 162, qn, it, &qa, &qb);
    float *A = randn((size_t)2 * C, 0.3f, 163), *B = randn((size_t)V * 2, 0.3f, 164);
    float *rows = randn((size_t)2 * C, 0.3f, 165), *nv = randn((size_t)C, 0.1f, 166);
    it[2] = (struct st_item){ PFX "lm_head.lora_A.weight", 2, { 2, C }, A };
    it[3] = (struct st_item){ PFX "lm_head.lora_B.weight", 2, { V, 2 }, B };
    it[4] = (struct st_item){ PFX "lm_head.base_layer.weight", 2, { V, C }, base.w.embed.f };
    it[5] = (struct st_item){ PFX "model.embed_tokens.token_adapter.trainable_tokens_delta", 2, { 2, C }, rows };
    it[6] = (struct st_item){ PFX "model.norm.weight", 1, { C }, nv };
    P(ad, "ad");
    CHECK_OK(peft_write(ad, "{\"r\":2,\"target_modules\":\"(?:lm_head|.*\\\\.layers\\\\.1\\\\.self_attn\\\\.q_proj)\","
                            "\"exclude_modules\":[\"k_proj\"],\"modules_to_save\":[\"model.norm\"],"
                            "\"trainable_token_indices\":[1, 2],\"unknown_new_key\":1}", it, 7));
    // the Nth allocation fails, for every N until a run succeeds: LK_ERR_NOMEM, nothing held (leaks
    // show under the sanitizer build), the model unchanged or fully changed
    int done = 0;
    for (long n = 1; n < 5000 && !done; n++) {
        struct model m;
        CHECK_OK(model_load(&m, bdir, test_err()));
        struct lora l;
        struct lk_err e = { 0 };
        lk_fail_countdown = n;
        int rc = lora_load(&l, ad, &c, &e);
        if (!rc) {
            rc = model_apply_extras(&m, &l, &e);
            lora_release(&l);
        }
        lk_fail_countdown = 0;
        CHECK_MSG(rc == LK_OK || rc == LK_ERR_NOMEM, "allocation %ld: status %d: %s", n, rc, e.msg);
        CHECK_MSG(rc || !m.cfg.tie_word_embeddings, "allocation %ld: applied but still tied", n);
        done = rc == LK_OK;
        model_release(&m);
    }
    CHECK(done);
    free(qa);
    free(qb);
    free(A);
    free(B);
    free(rows);
    free(nv);
    model_release(&base);
}
