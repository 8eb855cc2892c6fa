/*
 * test_oom.c - allocation failure through the adapter reader and merge (STYLE 7: "the only
 * acceptable results are the right answer or LK_ERR_NOMEM with nothing leaked"). Each operation
 * runs with its 1st, 2nd, 3rd, ... allocation failing until a run completes with none failing
 * (ALLOC_SWEEP): lora_load with its base's config.json read by cfg_load, for a plain adapter and
 * for one with DoRA magnitudes, an embedding adapter and a modules_to_save copy; merge_run of a
 * tiny model and an adapter, of two adapters by TIES, and (full tier) with --verify's logits check. A success must give what a run without
 * faults gave (bit for bit), a failure must leave no output and no temporary folder.
 */
#include "test.h"

#include <dirent.h>
#include <stdlib.h>
#include <string.h>

#include "../libcore/cfg.h"
#include "../libcore/lk.h"
#include "../libcore/lora.h"
#include "../libcore/merge.h"
#include "../libcore/model.h"
#include "../libcore/st.h"
#include "fix_model.h"

#define PATHVAR(var, name)                                                                         \
    char var[1024];                                                                                \
    snprintf(var, sizeof var, "%s/%s", test_tmpdir(), name)

/* A random tiny model of config c saved to dir (float32). */
static int save_model(const char *dir, const struct cfg *c, uint64_t seed)
{
    struct model m;
    int rc = fix_model_random(&m, c, 0.3f, seed);
    if (!rc)
        rc = model_save(&m, dir, TENSOR_F32, test_err());
    model_release(&m);
    return rc;
}

/* A random adapter on targets (rank R, rsLoRA) saved to dir. */
static int save_lora(const char *dir, const struct cfg *c, unsigned targets, uint64_t seed)
{
    struct lora l;
    int rc = fix_lora_random(&l, c, targets, 2, 4.0, 1, 0.0f, seed);
    if (!rc)
        rc = lora_save(&l, dir, test_err());
    lora_release(&l);
    return rc;
}

/* A DoRA adapter on q_proj with an embedding adapter and a full lm_head copy (modules_to_save),
 * written tensor by tensor in PEFT's names. */
static int save_dora(const char *dir, const struct cfg *c)
{
    int R = 2, Q = c->num_attention_heads * c->head_dim, C = c->hidden_size, V = c->vocab_size;
    float *buf = malloc(sizeof(float) * 40000);
    if (!buf)
        return -1;
    struct lk_rng rng;
    lk_rng_seed(&rng, 5);
    for (int i = 0; i < 40000; i++)
        buf[i] = 1.0f + 0.1f * lk_rng_normal(&rng); // magnitudes near 1; A, B, copies alike
    struct st_item it[10];
    char names[6][128];
    int k = 0;
    for (int l = 0; l < c->num_hidden_layers; l++) {
        const char *kinds[3] = { "lora_A.weight", "lora_B.weight", "lora_magnitude_vector" };
        for (int j = 0; j < 3; j++) {
            snprintf(names[k], sizeof names[k], "base_model.model.model.layers.%d.self_attn.q_proj.%s", l,
                     kinds[j]);
            it[k] = j == 0 ? (struct st_item){ names[k], 2, { R, C }, buf + 1000 * k }
                  : j == 1 ? (struct st_item){ names[k], 2, { Q, R }, buf + 1000 * k }
                           : (struct st_item){ names[k], 1, { Q }, buf + 1000 * k };
            k++;
        }
    }
    it[k++] = (struct st_item){ "base_model.model.model.embed_tokens.lora_embedding_A", 2, { R, V }, buf + 10000 };
    it[k++] = (struct st_item){ "base_model.model.model.embed_tokens.lora_embedding_B", 2, { C, R }, buf + 20000 };
    it[k++] = (struct st_item){ "base_model.model.lm_head.weight", 2, { V, C }, buf + 30000 };
    const char *config = "{\"peft_type\":\"LORA\",\"r\":2,\"lora_alpha\":4,\"use_dora\":true,"
                         "\"target_modules\":[\"q_proj\",\"embed_tokens\"],\"modules_to_save\":[\"lm_head\"]}";
    char p[1100];
    int rc = lk_mkdir_p(dir, test_err());
    snprintf(p, sizeof p, "%s/adapter_config.json", dir);
    if (!rc)
        rc = lk_write_file_atomic(p, config, strlen(config), test_err());
    snprintf(p, sizeof p, "%s/adapter_model.safetensors", dir);
    if (!rc)
        rc = st_write_f32(p, it, k, TENSOR_F32, test_err());
    free(buf);
    return rc;
}

// ---- lora_load ----

struct lora_sweep {
    const char *base, *adapter;
    struct cfg c;
    struct lora l, ref; /* what the run loaded; what a run without faults loaded */
    int have_ref;
};

static int sweep_lora_load(void *ctx, struct lk_err *err)
{
    struct lora_sweep *sw = ctx;
    int rc = cfg_load(&sw->c, sw->base, err);
    if (!rc && (rc = lora_load(&sw->l, sw->adapter, &sw->c, err)))
        cfg_release(&sw->c);
    return rc;
}

/* The same floats as the reference: the block, the embedding factors, the copies. */
static int lora_same(const struct lora *a, const struct lora *b)
{
    if (a->n != b->n || a->n_mod != b->n_mod || memcmp(a->mem, b->mem, sizeof(float) * a->n) ||
        !a->embed_A != !b->embed_A || a->n_extra != b->n_extra)
        return 0;
    size_t ne = (size_t)a->embed_R * (size_t)a->embed_V;
    if (a->embed_A && (memcmp(a->embed_A, b->embed_A, sizeof(float) * ne) ||
                       memcmp(a->embed_B, b->embed_B, sizeof(float) * (size_t)a->embed_R * a->embed_C)))
        return 0;
    for (int i = 0; i < a->n_extra; i++)
        if (strcmp(a->extra[i].name, b->extra[i].name) ||
            memcmp(a->extra[i].data, b->extra[i].data, sizeof(float) * (size_t)a->extra[i].shape[0] *
                                                         (size_t)a->extra[i].shape[1]))
            return 0;
    return 1;
}

static int sweep_lora_done(void *ctx, int rc)
{
    struct lora_sweep *sw = ctx;
    if (rc != LK_OK)
        return 0; // a failed load released everything itself: the live count will say
    int bad = 0;
    if (!sw->have_ref) {
        sw->ref = sw->l; // the run without faults: the reference, kept until the end
        sw->have_ref = 1;
    } else {
        bad = !lora_same(&sw->l, &sw->ref);
        lora_release(&sw->l);
    }
    cfg_release(&sw->c);
    if (bad)
        test_fail(__FILE__, __LINE__, "%s: loaded under allocation failures, but not the same adapter", sw->adapter);
    return bad ? -1 : 0;
}

TEST(oom_lora_load)
{
    struct cfg c;
    fix_cfg_llama(&c); // untied: lm_head can be a modules_to_save copy
    PATHVAR(base, "base");
    PATHVAR(plain, "plain");
    PATHVAR(dora, "dora");
    CHECK_OK(save_model(base, &c, 1));
    CHECK_OK(save_lora(plain, &c, (1u << CFG_N_MODULES) - 1, 2));
    CHECK_OK(save_dora(dora, &c));
    const char *ads[2] = { plain, dora };
    long runs[2];
    for (int i = 0; i < 2; i++) {
        struct lora_sweep sw;
        memset(&sw, 0, sizeof sw);
        sw.base = base;
        sw.adapter = ads[i];
        runs[i] = ALLOC_SWEEP(ads[i], sweep_lora_load, sweep_lora_done, &sw, 5000);
        int extras = sw.ref.n_extra == i && !sw.ref.embed_A == !i && sw.ref.cfg.use_dora == i;
        lora_release(&sw.ref);
        CHECK(runs[i] > 0);
        CHECK_MSG(extras, "adapter %d: not the adapter written", i);
    }
    CHECK(runs[1] > runs[0] / 2);
    fprintf(stderr, "    allocations made to fail: plain adapter %ld, DoRA + embedding + modules_to_save %ld\n",
            runs[0], runs[1]);
}

// ---- merge_run ----

struct merge_sweep {
    struct merge_opts o;
    char ref[1024];    /* the output of the run without faults */
    int have_ref;
};

static int sweep_merge(void *ctx, struct lk_err *err)
{
    struct merge_sweep *sw = ctx;
    struct merge_report rep;
    return merge_run(&sw->o, &rep, err);
}

/* 1 when two files have the same bytes. */
static int same_file(const char *a, const char *b)
{
    char *x = NULL, *y = NULL;
    size_t nx = 0, ny = 0;
    int eq = !lk_read_file(a, &x, &nx, NULL) && !lk_read_file(b, &y, &ny, NULL) && nx == ny && !memcmp(x, y, nx);
    lk_free(x);
    lk_free(y);
    return eq;
}

/* Entries of the test folder whose names hold ".tmp." or ".old" (what a merge builds beside
 * --out), counted with plain libc. */
static int leftovers(void)
{
    DIR *d = opendir(test_tmpdir());
    int n = 0;
    struct dirent *e;
    while (d && (e = readdir(d)))
        n += strstr(e->d_name, ".tmp.") || strstr(e->d_name, ".old");
    if (d)
        closedir(d);
    return n;
}

/* 1 when out holds exactly what the reference run wrote. */
static int same_output(const char *out, const char *ref)
{
    static const char *const files[] = { "model.safetensors", "config.json", "adapter_model.safetensors",
                                         "adapter_config.json" };
    for (size_t i = 0; i < sizeof files / sizeof files[0]; i++) {
        char a[1100], b[1100];
        snprintf(a, sizeof a, "%s/%s", out, files[i]);
        snprintf(b, sizeof b, "%s/%s", ref, files[i]);
        if (lk_file_exists(a) != lk_file_exists(b) || (lk_file_exists(a) && !same_file(a, b))) {
            test_fail(__FILE__, __LINE__, "%s: %s differs from the run without faults", out, files[i]);
            return 0;
        }
    }
    return 1;
}

static int sweep_merge_done(void *ctx, int rc)
{
    struct merge_sweep *sw = ctx;
    const char *out = sw->o.out;
    if (leftovers()) {
        test_fail(__FILE__, __LINE__, "merge (status %d) left a temporary folder beside --out", rc);
        return -1;
    }
    if (!sw->have_ref) { // the run without faults: its output is the reference
        sw->have_ref = 1;
        return rename(out, sw->ref) ? -1 : 0;
    }
    if (rc != LK_OK && lk_file_exists(out) && !sw->o.verify) {
        test_fail(__FILE__, __LINE__, "a failed merge left '%s'", out);
        return -1;
    }
    // --verify runs on the output once it is in place: when only the verification failed, the
    // output stays, and must then be complete
    if (rc == LK_OK && !lk_file_exists(out)) {
        test_fail(__FILE__, __LINE__, "merge succeeded without writing '%s'", out);
        return -1;
    }
    int ok = !lk_file_exists(out) || same_output(out, sw->ref);
    lk_rm_rf(out);
    return ok ? 0 : -1;
}

TEST(oom_merge)
{
    struct cfg c;
    fix_cfg_qwen2(&c);
    PATHVAR(base, "base");
    PATHVAR(a1, "a1");
    PATHVAR(a2, "a2");
    PATHVAR(out, "out");
    CHECK_OK(save_model(base, &c, 3));
    CHECK_OK(save_lora(a1, &c, (1u << CFG_Q) | (1u << CFG_V) | (1u << CFG_DOWN), 4));
    CHECK_OK(save_lora(a2, &c, (1u << CFG_Q) | (1u << CFG_UP), 5));
    long runs[3] = { 0, 0, 0 };
    for (int k = 0; k < 3; k++) {
        if (k == 2 && !test_full())
            break; // --verify loads and runs the model each time: the full tier (CI) only
        struct merge_sweep sw;
        memset(&sw, 0, sizeof sw);
        sw.o.model = base;
        sw.o.out = out;
        sw.o.dtype = -1;
        sw.o.adapters[0] = (struct merge_adapter){ a1, 1.0 };
        sw.o.n_adapters = 1;
        sw.o.verify = k == 2; // the logits of the merged model against base + adapter
        if (k == 1) { // two adapters by TIES, written as a model in bf16
            sw.o.adapters[1] = (struct merge_adapter){ a2, 0.5 };
            sw.o.n_adapters = 2;
            sw.o.method = MERGE_TIES;
            sw.o.density = 0.5;
            sw.o.dtype = TENSOR_BF16;
        }
        snprintf(sw.ref, sizeof sw.ref, "%s/ref%d", test_tmpdir(), k);
        static const char *const what[3] = { "merge_run (linear)", "merge_run (ties, 2 adapters)",
                                             "merge_run (linear, --verify)" };
        runs[k] = ALLOC_SWEEP(what[k], sweep_merge, sweep_merge_done, &sw, 20000);
        CHECK(runs[k] > 20);
    }
    CHECK(!test_full() || runs[2] > runs[0] + 50);
    fprintf(stderr, "    allocations made to fail: linear merge %ld, TIES of two adapters %ld, linear with "
            "--verify %ld%s\n", runs[0], runs[1], runs[2], test_full() ? "" : " (full tier only)");
}
