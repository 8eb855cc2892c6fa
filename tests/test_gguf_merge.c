/*
 * test_gguf_merge.c - GGUF as an output of merge and an input of info / logits / generate, and
 * the Qwen3 and Llama 3.2 architectures in GGUF.
 *
 * Without the peer: `merge --out FILE.gguf` of the shipped base and a trained adapter against
 * `lorakit logits --model BASE --adapter A` (log-probs within 1e-4, greedy equal), every method
 * and option against the folder merge converted afterwards (tensor bytes equal), q8_0 blocks
 * against ggml's reference quantizer written here, each dtype's error reported by --verify and
 * equal to what rounding alone explains, the refusals (no file or temporary left), memory
 * bounded below the embedding's size while streaming; logits, generate, tokenize and info on a
 * .gguf against the folder; malformed, truncated and inconsistent files refused by name by
 * info and logits (exit 1, never a crash); rope_freqs against the llama3 formula in double, and
 * Llama 3.2's published parameters recovered from a rope_freqs tensor alone.
 *
 * With the peer (node-llama-cpp 3.21.1; skipped without it): the merged GGUF in llama.cpp
 * against lorakit's base + adapter, its f16 / bf16 / q8_0 variants measured; a tiny Qwen3 (heads x
 * head_dim != hidden, GQA, tied) and a tiny Llama 3.2 (llama3 rope scaling with an original
 * context of 64 positions, prompts of 80 tokens continued to 96, so every frequency band turns;
 * and linear scaling), converted, merged with a trained adapter, and with the adapter as a GGUF
 * LoRA: greedy continuations equal and log-probs within 1e-4 of lorakit's forward.
 */
#include "test.h"

#include <cjson/cJSON.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "../libcore/gguf.h"
#include "../libcore/lk.h"
#include "../libcore/lora.h"
#include "../libcore/merge.h"
#include "../libcore/model.h"
#include "../libcore/st.h"
#include "../libcore/tensor.h"
#include "../libcore/tok.h"
#include "fix_gguf.h"
#include "fix_model.h"

#define LONG_T 80

// ---- helpers ----

/* The figures of the last `merge --verify` output: max |dlogit| and the rounding part. */
static int verify_figures(double *out_max, double *out_round)
{
    const char *a = strstr(test_output(), "max |dlogit| "), *b = strstr(test_output(), "output dtype alone: ");
    return a && b && sscanf(a + 13, "%lf", out_max) == 1 && sscanf(b + 20, "%lf", out_round) == 1 ? 0 : -1;
}

/* A model folder from a config.json text (seeded random weights) with the base model's tokenizer. */
static int make_model(const char *dir, const char *json)
{
    char cfg[700];
    snprintf(cfg, sizeof cfg, "%s.json", dir);
    if (fix_put_file(cfg, json, strlen(json)) ||
        test_sh("%s init --config '%s' --out '%s' --seed 7 && cp " BASE "/tokenizer*.json '%s'/", test_lorakit(), cfg,
                dir, dir)) {
        fprintf(stderr, "    %s\n", test_output());
        return -1;
    }
    return 0;
}

/* A random PEFT adapter (rank R, alpha 2R) for the model folder dir, saved at ad. */
static int random_adapter(const char *dir, const char *ad, unsigned targets, int R, uint64_t seed)
{
    struct cfg c;
    struct lora l;
    int rc = cfg_load(&c, dir, test_err());
    if (rc)
        return rc;
    if ((rc = fix_lora_random(&l, &c, targets, R, 2.0 * R, 0, 0, seed)) == LK_OK) {
        rc = lora_save(&l, ad, test_err());
        lora_release(&l);
    }
    cfg_release(&c);
    return rc;
}

/* NPROMPT prompts of PLEN ids from the test texts tokenized by the base tokenizer (in process). */
static int base_prompts(int32_t *rows[NPROMPT], int lens[NPROMPT], struct tok_ids *ids)
{
    struct tok *tk = NULL;
    char **texts = fix_all_texts();
    int rc = tok_load(&tk, BASE, test_err());
    for (int i = 0; i < N_TEXTS && !rc; i++)
        rc = tok_encode(tk, texts[i], strlen(texts[i]), 1, &ids[i], test_err());
    tok_free(tk);
    fix_free_texts(texts, N_TEXTS, NULL);
    return rc || fix_pick_prompts(ids, N_TEXTS, rows, lens);
}

/* Every tensor of two GGUF files: the same names, types, shapes and bytes (metadata aside). */
static int same_tensors(const char *a, const char *b)
{
    struct gguf_file fa, fb;
    struct lk_err err = { 0 };
    if (gguf_open(&fa, a, &err) || gguf_open(&fb, b, &err)) {
        fprintf(stderr, "    %s\n", err.msg);
        return 0;
    }
    int same = fa.n_tensors == fb.n_tensors;
    for (int64_t i = 0; i < fa.n_tensors && same; i++) {
        const struct gguf_tensor *x = &fa.t[i];
        char nm[GGUF_MAX_NAME];
        snprintf(nm, sizeof nm, "%.*s", (int)x->name.n, x->name.p);
        const struct gguf_tensor *y = gguf_find_tensor(&fb, nm);
        same = y && y->type == x->type && y->n_dims == x->n_dims && !memcmp(y->ne, x->ne, sizeof x->ne) &&
               y->nbytes == x->nbytes && !memcmp(x->data, y->data, x->nbytes);
        if (!same)
            fprintf(stderr, "    tensor '%s' differs between %s and %s\n", nm, a, b);
    }
    gguf_close(&fa);
    gguf_close(&fb);
    return same;
}

/* ggml's quantize_row_q8_0_ref, written out from ggml-quants.c: per block of 32, d = max|x| / 127,
 * id = 1/d (0 when d is 0), q = roundf(x * id), d stored as f16. */
static void q8_0_ref(const float *x, size_t n, uint8_t *out)
{
    for (size_t b = 0; b < n / 32; b++, out += 34) {
        float amax = 0;
        for (int j = 0; j < 32; j++)
            amax = fmaxf(amax, fabsf(x[b * 32 + j]));
        float d = amax / 127.0f, id = d ? 1.0f / d : 0.0f;
        uint16_t h = tensor_f32_to_f16(d);
        out[0] = (uint8_t)(h & 0xff);
        out[1] = (uint8_t)(h >> 8);
        for (int j = 0; j < 32; j++)
            out[2 + j] = (uint8_t)(int8_t)roundf(x[b * 32 + j] * id);
    }
}

/* The llama3 rope_freqs factor of pair i in double: transformers' _compute_llama3_parameters
 * (the band of 2 pi / inv_freq against original / high and original / low) as the divisor
 * llama.cpp applies, inv_freq / inv_freq_scaled. */
static double llama3_factor(int i, int HS, double theta, double factor, double low, double high, double orig)
{
    double inv = pow(theta, -2.0 * i / HS), wavelen = 2 * 3.14159265358979323846 / inv;
    if (wavelen < orig / high)
        return 1;
    if (wavelen > orig / low)
        return factor;
    double smooth = (orig / wavelen - low) / (high - low);
    return 1 / ((1 - smooth) / factor + smooth);
}

// ---- merge --out FILE.gguf ----

TEST(gguf_merge_f32_equals_base_plus_adapter)
{
    if (!lk_file_exists(BASE "/config.json"))
        SKIP("no %s (run from the repository root)", BASE);
    TMPPATH(ad, "ad");
    TMPPATH(out, "merged.gguf");
    CHECK_INT(fix_train_adapter(BASE, ad, ""), 0);
    CHECK_INT(test_sh("%s merge --model " BASE " --adapter '%s' --out '%s' --dtype f32 --verify", test_lorakit(), ad,
                      out), 0);
    double vmax, vround;
    CHECK_MSG(strstr(test_output(), "one GGUF file") && verify_figures(&vmax, &vround) == 0, "%s", test_output());
    CHECK_MSG(vmax <= 1e-4 && vround == 0, "verify: %g, rounding %g", vmax, vround);
    CHECK_INT(test_sh("ls '%s'.tmp.* 2>/dev/null | grep -q .", out), 1); // no temporary left
    // `lorakit logits --model merged.gguf` against the base with the adapter, over the vocabulary
    int32_t *rows[NPROMPT], want[NPROMPT][NGEN], got[NPROMPT][NGEN];
    int lens[NPROMPT], V = 0, V2 = 0;
    struct tok_ids ids[N_TEXTS] = { 0 };
    CHECK_INT(base_prompts(rows, lens, ids), 0);
    double *ref = fix_lk_logprobs(BASE, ad, rows, NPROMPT, PLEN, &V), *mine = fix_lk_logprobs(out, NULL, rows, NPROMPT,
                                                                                              PLEN, &V2);
    double *plain = fix_lk_logprobs(BASE, NULL, rows, NPROMPT, PLEN, &V2);
    CHECK(ref && mine && plain && V == V2);
    double d = 0, effect = 0;
    for (size_t i = 0; i < (size_t)NPROMPT * (size_t)V; i++) {
        d = fmax(d, fabs(ref[i] - mine[i]));
        effect = fmax(effect, fabs(ref[i] - plain[i]));
    }
    fprintf(stderr, "    merged GGUF through lorakit logits: max |d log-prob| %.3g against base + adapter (the "
                    "adapter moves them by %.3g)\n", d, effect);
    CHECK(d <= 1e-4 && effect > 0.05);
    CHECK_INT(fix_lk_greedy(BASE, ad, rows, lens, NPROMPT, want), 0);
    CHECK_INT(fix_lk_greedy(out, NULL, rows, lens, NPROMPT, got), 0);
    CHECK(!memcmp(want, got, sizeof want));
    // provenance
    struct gguf_file g;
    CHECK_OK(gguf_open(&g, out, test_err()));
    CHECK(fix_has_str(&g, "general.name", "merged") && fix_has_str(&g, "lorakit.merge_method", "linear"));
    CHECK(fix_has_str(&g, "general.base_model.0.name", "base-model"));
    const struct gguf_kv *ads = gguf_find_kv(&g, "lorakit.adapters");
    CHECK(ads && ads->n == 1 && gguf_arr_str(ads, 0).n == strlen(ad));
    CHECK(!memcmp(gguf_arr_str(ads, 0).p, ad, strlen(ad)));
    for (int64_t i = 0; i < g.n_tensors; i++)
        CHECK(g.t[i].type == GGUF_T_F32);
    gguf_close(&g);
    free(ref);
    free(mine);
    free(plain);
    for (int i = 0; i < N_TEXTS; i++)
        tok_ids_release(&ids[i]);
}

TEST(gguf_merge_dtypes_report_their_error)
{
    if (!lk_file_exists(BASE "/config.json"))
        SKIP("no %s (run from the repository root)", BASE);
    TMPPATH(ad, "ad");
    CHECK_INT(fix_train_adapter(BASE, ad, ""), 0);
    static const char *const dtypes[] = { "f32", "f16", "bf16", "q8_0" };
    char path[4][700];
    double vmax[4], vround[4];
    for (int i = 0; i < 4; i++) {
        snprintf(path[i], sizeof path[i], "%s/m-%s.gguf", test_tmpdir(), dtypes[i]);
        CHECK_INT(test_sh("%s merge --model " BASE " --adapter '%s' --out '%s' --dtype %s --verify", test_lorakit(),
                          ad, path[i], dtypes[i]), 0);
        CHECK_MSG(verify_figures(&vmax[i], &vround[i]) == 0, "%s", test_output());
        fprintf(stderr, "    merge --dtype %-4s: %8ld bytes, verify max |dlogit| %.3g, of which the dtype's rounding "
                        "alone %.3g\n", dtypes[i], fix_file_size(path[i]), vmax[i], vround[i]);
        // the file holds exactly the rounded merge: the whole difference is the rounding, up to the
        // float32 difference between base + adapter and the exact merge (about 1e-5) and the three
        // digits printed
        CHECK_MSG(fabs(vmax[i] - vround[i]) <= 1e-4 + 0.01 * vround[i], "%s: %g vs %g", dtypes[i], vmax[i], vround[i]);
    }
    CHECK(vmax[1] > 0 && vmax[1] < vmax[2] && vmax[1] < vmax[3] && vmax[3] < 1);
    CHECK(fix_file_size(path[3]) < fix_file_size(path[2]) && fix_file_size(path[2]) == fix_file_size(path[1]) &&
          fix_file_size(path[1]) < fix_file_size(path[0]));
    // q8_0: each matrix whose rows are whole blocks holds ggml's reference blocks of the f32
    // merge; the rest (1-D, rows of 688) is f32 and equal to it
    struct gguf_file f32, q8;
    CHECK_OK(gguf_open(&f32, path[0], test_err()));
    CHECK_OK(gguf_open(&q8, path[3], test_err()));
    int n_q8 = 0;
    for (int64_t i = 0; i < f32.n_tensors; i++) {
        const struct gguf_tensor *a = &f32.t[i], *b = &q8.t[i];
        int blocks = a->n_dims == 2 && a->ne[0] % 32 == 0;
        CHECK(a->name.n == b->name.n && !memcmp(a->name.p, b->name.p, a->name.n));
        CHECK_INT(b->type, blocks ? GGUF_T_Q8_0 : GGUF_T_F32);
        if (!blocks) {
            CHECK(!memcmp(a->data, b->data, a->nbytes));
            continue;
        }
        uint8_t *want = malloc(b->nbytes);
        q8_0_ref((const float *)a->data, a->numel, want);
        CHECK_MSG(!memcmp(want, b->data, b->nbytes), "tensor %.*s", (int)a->name.n, a->name.p);
        free(want);
        n_q8++;
    }
    CHECK(n_q8 > 0);
    gguf_close(&f32);
    gguf_close(&q8);
}

/* The same options merged to a folder (f32) and converted, and merged straight to a .gguf. */
static int same_as_folder(const char *args, const char *tag)
{
    char dir[700], conv[700], direct[700];
    snprintf(dir, sizeof dir, "%s/m-%s", test_tmpdir(), tag);
    snprintf(conv, sizeof conv, "%s/m-%s-conv.gguf", test_tmpdir(), tag);
    snprintf(direct, sizeof direct, "%s/m-%s.gguf", test_tmpdir(), tag);
    if (test_sh("%s merge --model " BASE " %s --out '%s' --dtype f32 && %s convert --model '%s' --out '%s'",
                test_lorakit(), args, dir, test_lorakit(), dir, conv) ||
        test_sh("%s merge --model " BASE " %s --out '%s' --dtype f32", test_lorakit(), args, direct)) {
        fprintf(stderr, "    %s: %s\n", tag, test_output());
        return 0;
    }
    return same_tensors(conv, direct);
}

TEST(gguf_merge_methods_match_the_folder_merge)
{
    if (!lk_file_exists(BASE "/config.json"))
        SKIP("no %s (run from the repository root)", BASE);
    char a[700], b[700], dora[700], head[700], bias[700], args[3000];
    snprintf(a, sizeof a, "%s/a", test_tmpdir());
    snprintf(b, sizeof b, "%s/b", test_tmpdir());
    snprintf(dora, sizeof dora, "%s/dora", test_tmpdir());
    snprintf(head, sizeof head, "%s/head", test_tmpdir());
    snprintf(bias, sizeof bias, "%s/bias", test_tmpdir());
    CHECK_INT(fix_train_adapter(BASE, a, ""), 0);
    CHECK_INT(fix_train_adapter(BASE, b, "--seed 9 --targets q_proj,v_proj,down_proj --rslora"), 0);
    CHECK_INT(fix_train_adapter(BASE, dora, "--dora --targets q_proj,v_proj"), 0);
    CHECK_INT(fix_craft_adapter(head, 0, 0, 1), 0);
    CHECK_INT(fix_craft_adapter(bias, 1, 0, 0), 0);
    static const struct {
        const char *tag, *fmt;
    } cases[] = {
        { "ties", "--adapter '%1$s':0.7 --adapter '%2$s':0.3 --method ties --density 0.5" },
        { "dare", "--adapter '%1$s' --adapter '%2$s' --method dare_ties --density 0.6 --seed 5" },
        { "svd", "--adapter '%1$s' --adapter '%2$s' --method svd --rank 2" },
        { "cat", "--adapter '%1$s':2 --adapter '%2$s':-1 --method cat" },
        { "dora", "--adapter '%3$s'" },
        { "subtract", "--adapter '%1$s' --subtract" },
        { "bias", "--adapter '%5$s'" },
        { "untie", "--adapter '%4$s'" },
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        snprintf(args, sizeof args, cases[i].fmt, a, b, dora, head, bias);
        CHECK_MSG(same_as_folder(args, cases[i].tag), "%s", cases[i].tag);
    }
    // the untied one (the last) says so and carries its own output matrix
    CHECK(strstr(test_output(), "tie_word_embeddings false") != NULL);
    struct gguf_file g;
    char p[700];
    snprintf(p, sizeof p, "%s/m-untie.gguf", test_tmpdir());
    CHECK_OK(gguf_open(&g, p, test_err()));
    CHECK(gguf_find_tensor(&g, "output.weight") != NULL);
    gguf_close(&g);
    // with no adapter, the model as it is (the bf16 base: bf16 by default, bit for bit)
    TMPPATH(conv, "base.gguf");
    TMPPATH(direct, "base-merge.gguf");
    CHECK_INT(test_sh("%s convert --model " BASE " --out '%s' --dtype bf16 && %s merge --model " BASE " --out '%s'",
                      test_lorakit(), conv, test_lorakit(), direct), 0);
    CHECK(strstr(test_output(), "0 merged in float32") && strstr(test_output(), "bf16"));
    CHECK(same_tensors(conv, direct));
}

/* A merge that must fail: the exit status, the message holds want, nothing new at out. */
static int merge_refused(const char *args, const char *out, int status, const char *want)
{
    int rc = test_sh("%s merge %s", test_lorakit(), args);
    char pattern[800];
    snprintf(pattern, sizeof pattern, "ls -d '%s'.tmp.* 2>/dev/null | grep -q .", out);
    int left = system(pattern) == 0;
    if (rc != status || !strstr(test_output(), want) || left) {
        fprintf(stderr, "    merge %s: exit %d, output '%s'%s (wanted %d, '%s')\n", args, rc, test_output(),
                left ? ", a temporary was left" : "", status, want);
        return 0;
    }
    return 1;
}

TEST(gguf_merge_refuses_what_does_not_apply)
{
    if (!lk_file_exists(BASE "/config.json"))
        SKIP("no %s (run from the repository root)", BASE);
    char ad[700], out[700], args[2400], dir[700];
    snprintf(ad, sizeof ad, "%s/ad", test_tmpdir());
    snprintf(out, sizeof out, "%s/out.gguf", test_tmpdir());
    CHECK_INT(fix_train_adapter(BASE, ad, ""), 0);
    snprintf(args, sizeof args, "--model " BASE " --adapter '%s' --adapter '%s' --method cat --into-adapter --out '%s'",
             ad, ad, out);
    CHECK(merge_refused(args, out, 2, "--into-adapter writes a PEFT adapter folder, not a .gguf"));
    CHECK(!lk_file_exists(out));
    snprintf(args, sizeof args, "--model " BASE " --adapter '%s' --portable --out '%s'", ad, out);
    CHECK(merge_refused(args, out, 2, "--portable"));
    snprintf(args, sizeof args, "--model " BASE " --adapter '%s' --dtype q8_0 --out '%s/folder'", ad, test_tmpdir());
    CHECK(merge_refused(args, out, 2, "q8_0 is a GGUF type"));
    snprintf(args, sizeof args, "--model " BASE " --out '%s/folder'", test_tmpdir());
    CHECK(merge_refused(args, out, 2, "converts the model as it is"));
    snprintf(args, sizeof args, "--model " BASE " --adapter '%s' --dtype q4_0 --out '%s'", ad, out);
    CHECK(merge_refused(args, out, 2, "option '--dtype' wants"));
    // an existing file is kept unless --overwrite; a folder named like a file is refused
    CHECK_INT(fix_put_file(out, "keep", 4), 0);
    snprintf(args, sizeof args, "--model " BASE " --adapter '%s' --out '%s'", ad, out);
    CHECK(merge_refused(args, out, 1, "exists (hint: --overwrite replaces it)"));
    CHECK(fix_file_size(out) == 4);
    CHECK_INT(test_sh("%s merge %s --overwrite", test_lorakit(), args), 0);
    CHECK(fix_file_size(out) > 1000000);
    snprintf(dir, sizeof dir, "%s/dir.gguf", test_tmpdir());
    CHECK_INT(test_sh("mkdir '%s'", dir), 0);
    snprintf(args, sizeof args, "--model " BASE " --adapter '%s' --out '%s'", ad, dir);
    CHECK(merge_refused(args, dir, 1, "is a folder"));
    // a GGUF given as the base; models llama.cpp cannot express (before anything is written)
    snprintf(args, sizeof args, "--model '%s' --adapter '%s' --out '%s/x.gguf'", out, ad, test_tmpdir());
    CHECK(merge_refused(args, out, 1, "a GGUF file, not a model folder"));
    snprintf(dir, sizeof dir, "%s/dyn", test_tmpdir());
    CHECK_INT(make_model(dir, "{\"architectures\":[\"LlamaForCausalLM\"],\"hidden_size\":64,\"intermediate_size\":64,"
                              "\"num_hidden_layers\":1,\"num_attention_heads\":2,\"vocab_size\":768,"
                              "\"max_position_embeddings\":128,"
                              "\"rope_scaling\":{\"rope_type\":\"dynamic\",\"factor\":2},"
                              "\"tie_word_embeddings\":true,\"torch_dtype\":\"float32\"}"), 0);
    snprintf(out, sizeof out, "%s/dyn.gguf", test_tmpdir());
    snprintf(args, sizeof args, "--model '%s' --out '%s'", dir, out);
    CHECK(merge_refused(args, out, 1, "rope_scaling 'dynamic' cannot be expressed in GGUF"));
    CHECK(!lk_file_exists(out));
    snprintf(dir, sizeof dir, "%s/q3l3", test_tmpdir());
    CHECK_INT(make_model(dir, "{\"architectures\":[\"Qwen3ForCausalLM\"],\"hidden_size\":64,\"intermediate_size\":64,"
                              "\"num_hidden_layers\":1,\"num_attention_heads\":2,\"num_key_value_heads\":1,"
                              "\"head_dim\":32,\"vocab_size\":768,\"max_position_embeddings\":128,"
                              "\"rope_scaling\":{\"rope_type\":\"llama3\",\"factor\":8,\"low_freq_factor\":1,"
                              "\"high_freq_factor\":4,\"original_max_position_embeddings\":64},"
                              "\"tie_word_embeddings\":true,\"torch_dtype\":\"float32\"}"), 0);
    snprintf(args, sizeof args, "--model '%s' --out '%s'", dir, out);
    CHECK(merge_refused(args, out, 1, "rope_scaling 'llama3' on a qwen3 model"));
    CHECK(!lk_file_exists(out));
}

TEST(gguf_merge_streams_below_the_embedding_size)
{
    if (!lk_file_exists(BASE "/config.json"))
        SKIP("no %s (run from the repository root)", BASE);
    // an embedding of 32768 x 256 float32 (32 MB), larger than any buffer the merge may hold
    TMPPATH(dir, "big");
    TMPPATH(ad, "ad");
    TMPPATH(out, "big.gguf");
    CHECK_INT(make_model(dir, "{\"architectures\":[\"Qwen2ForCausalLM\"],\"hidden_size\":256,\"intermediate_size\":256,"
                              "\"num_hidden_layers\":1,\"num_attention_heads\":4,\"num_key_value_heads\":2,"
                              "\"vocab_size\":32768,\"max_position_embeddings\":128,\"tie_word_embeddings\":true,"
                              "\"torch_dtype\":\"float32\"}"), 0);
    CHECK_OK(random_adapter(dir, ad, (1u << CFG_Q) | (1u << CFG_DOWN), 4, 3));
    struct merge_opts o = { 0 };
    o.model = dir;
    o.out = out;
    o.n_adapters = 1;
    o.adapters[0] = (struct merge_adapter){ ad, 1.0 };
    o.dtype = -1;
    o.gguf_dtype = GGUF_T_Q8_0;
    struct merge_report rep;
    lk_alloc_limit = SIZE_MAX;
    lk_alloc_largest = 0;
    int rc = merge_run(&o, &rep, test_err());
    size_t largest = lk_alloc_largest;
    lk_alloc_limit = 0;
    CHECK_OK(rc);
    fprintf(stderr, "    largest allocation %zu bytes (the embedding is %d bytes in float32), %d tensors merged, "
                    "%d read as they are\n", largest, 32768 * 256 * 4, rep.n_changed, rep.n_copied);
    CHECK(largest <= ((size_t)16 << 20) + 4096 && largest < (size_t)32768 * 256 * 4);
    CHECK(rep.n_changed == 2 && rep.gguf_dtype == GGUF_T_Q8_0 && rep.bytes == (uint64_t)fix_file_size(out));
}

// ---- reading GGUF: logits, generate, tokenize, info ----

/* `lorakit logits` on the same ids for two models; 1 when the outputs are the same bytes. */
/* Bit for bit the same logits from two files of the same weights. In float32 against bf16 the
 * kernels must be the same too: LORAKIT_AMX=0 (bf16 weights would take the AMX path). */
static int same_logits(const char *a, const char *b)
{
    TMPPATH(la, "la.safetensors");
    TMPPATH(lb, "lb.safetensors");
    const char *ids = "1,2,3,40,50,60,700,8,9,10;11,12,13,14,15,16,17,18,19,20";
    if (test_sh("LORAKIT_AMX=0 %s logits --model '%s' --tokens '%s' --out '%s' && "
                "LORAKIT_AMX=0 %s logits --model '%s' --tokens '%s' --out '%s'",
                test_lorakit(), a, ids, la, test_lorakit(), b, ids, lb))
        return 0;
    return test_sh("cmp -s '%s' '%s'", la, lb) == 0;
}

TEST(gguf_logits_generate_tokenize_on_gguf)
{
    if (!lk_file_exists(BASE "/config.json"))
        SKIP("no %s (run from the repository root)", BASE);
    TMPPATH(f32, "base-f32.gguf");
    TMPPATH(bf16, "base-bf16.gguf");
    TMPPATH(q8, "base-q8_0.gguf");
    CHECK_INT(test_sh("%s convert --model " BASE " --out '%s' && "
                      "%s convert --model " BASE " --out '%s' --dtype bf16 && "
                      "%s convert --model " BASE " --out '%s' --dtype q8_0", test_lorakit(), f32, test_lorakit(), bf16,
                      test_lorakit(), q8), 0);
    // the bf16 base is exact in f32 and bf16: the same logits, bit for bit
    CHECK(same_logits(BASE, f32) && same_logits(BASE, bf16));
    // q8_0: the logits of the folder's model with each block dequantized here (d * q)
    struct model m;
    struct gguf_file g;
    CHECK_OK(model_load(&m, BASE, test_err()));
    CHECK_OK(gguf_open(&g, q8, test_err()));
    struct model_tensor *mt;
    struct cfg_tensor *ct;
    int n, nc;
    CHECK_OK(model_weights_tensors(&m.w, &m.cfg, &mt, &n, test_err()));
    CHECK_OK(cfg_tensors(&m.cfg, &ct, &nc, test_err()));
    CHECK_INT(n, nc);
    for (int i = 0; i < n; i++) {
        char nm[GGUF_MAX_NAME];
        int k = 0;
        while (k < nc && strcmp(ct[k].name, mt[i].name))
            k++;
        CHECK(k < nc && gguf_tensor_name(&ct[k], nm, sizeof nm) == 0);
        const struct gguf_tensor *t = gguf_find_tensor(&g, nm);
        CHECK_MSG(t && t->numel == mt[i].numel, "%s", nm);
        if (t->type != GGUF_T_Q8_0) {
            CHECK(t->type == GGUF_T_F32);
            memcpy(mt[i].data, t->data, t->nbytes);
            continue;
        }
        for (size_t b = 0; b < t->numel / 32; b++) {
            const uint8_t *blk = t->data + b * 34;
            float d = tensor_f16_to_f32((uint16_t)(blk[0] | blk[1] << 8));
            for (int j = 0; j < 32; j++)
                mt[i].data[b * 32 + j] = d * (float)(int8_t)blk[2 + j];
        }
    }
    lk_free(ct);
    lk_free(mt);
    gguf_close(&g);
    int ids[10] = { 1, 2, 3, 40, 50, 60, 700, 8, 9, 10 };
    CHECK_OK(model_plan(&m, 1, 10, 0, test_err()));
    CHECK_OK(model_forward(&m, NULL, ids, NULL, NULL, NULL, 0, NULL, test_err()));
    TMPPATH(lq, "lq.safetensors");
    CHECK_INT(test_sh("%s logits --model '%s' --tokens 1,2,3,40,50,60,700,8,9,10 --out '%s'", test_lorakit(), q8,
                      lq), 0);
    struct st_file sf;
    CHECK_OK(st_open(&sf, lq, test_err()));
    const struct st_tensor *lt = st_find(&sf, "logits");
    CHECK(lt && lt->dtype == TENSOR_F32 && lt->numel == (size_t)10 * (size_t)m.cfg.vocab_size);
    double worst = 0;
    for (size_t i = 0; i < lt->numel; i++)
        worst = fmax(worst, fabs((double)((const float *)lt->data)[i] - model_logits(&m)[i]));
    CHECK_MSG(worst <= 1e-5, "q8_0 logits differ from the blocks dequantized here by %g", worst);
    st_close(&sf);
    model_release(&m);
    // generate (raw and with the chat template from the file) and tokenize: as the folder
    char want[4096];
    CHECK_INT(test_sh("%s generate --model " BASE " --prompt 'Fagramab is' --max-new 16 && %s generate --model " BASE
                      " --chat 'What is glaucoma?' --max-new 16 && %s tokenize --tokenizer " BASE
                      " --text '<|im_start|>user\nHi<|im_end|> caf\xc3\xa9'", test_lorakit(), test_lorakit(),
                      test_lorakit()), 0);
    snprintf(want, sizeof want, "%s", test_output());
    CHECK_INT(test_sh("%s generate --model '%s' --prompt 'Fagramab is' --max-new 16 && %s generate --model '%s' "
                      "--chat 'What is glaucoma?' --max-new 16 && %s tokenize --tokenizer '%s' "
                      "--text '<|im_start|>user\nHi<|im_end|> caf\xc3\xa9'", test_lorakit(), f32, test_lorakit(), f32,
                      test_lorakit(), f32), 0);
    CHECK_MSG(!strcmp(want, test_output()), "folder:\n%s\ngguf:\n%s", want, test_output());
}

TEST(gguf_info_describes_the_file)
{
    if (!lk_file_exists(BASE "/config.json"))
        SKIP("no %s (run from the repository root)", BASE);
    TMPPATH(q8, "base.gguf");
    CHECK_INT(test_sh("%s convert --model " BASE " --out '%s' --dtype q8_0", test_lorakit(), q8), 0);
    cJSON *cfg = fix_read_json(BASE "/config.json"), *tc = fix_read_json(BASE "/tokenizer_config.json");
    CHECK(cfg && tc);
#define NUM(k) ((int)cJSON_GetObjectItem(cfg, k)->valuedouble)
    char line[400];
    snprintf(line, sizeof line, "dimensions: hidden %d, intermediate %d, layers %d, heads %d, kv heads %d, "
             "head dim %d, vocab %d\n", NUM("hidden_size"), NUM("intermediate_size"), NUM("num_hidden_layers"),
             NUM("num_attention_heads"), NUM("num_key_value_heads"), NUM("hidden_size") / NUM("num_attention_heads"),
             NUM("vocab_size"));
    CHECK_INT(test_sh("%s info '%s'", test_lorakit(), q8), 0);
    const char *o = test_output();
    CHECK_MSG(strstr(o, "architecture: qwen2 = Qwen2ForCausalLM") && strstr(o, line), "%s", o);
    CHECK(strstr(o, "tokenizer: gpt2, pre 'qwen2', 768 tokens") && strstr(o, "lorakit reads it"));
    const char *tmpl = cJSON_GetObjectItem(tc, "chat_template")->valuestring;
    CHECK(strstr(o, tmpl) != NULL);
    struct gguf_file g;
    CHECK_OK(gguf_open(&g, q8, test_err()));
    for (int64_t i = 0; i < g.n_tensors; i++) {
        char want[200];
        snprintf(want, sizeof want, "  %-40.*s %-5s [%lld", (int)g.t[i].name.n, g.t[i].name.p,
                 gguf_ttype_name(g.t[i].type), (long long)g.t[i].ne[0]);
        CHECK_MSG(strstr(o, want), "no line '%s'", want);
    }
    // --json: lorakit's reading of the config, every key and tensor
    CHECK_INT(test_sh("%s info '%s' --json", test_lorakit(), q8), 0);
    cJSON *j = cJSON_Parse(test_output()), *jc = cJSON_GetObjectItem(j, "config");
    CHECK(j && jc);
    static const char *const keys[] = { "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                                        "num_key_value_heads", "vocab_size", "max_position_embeddings" };
    for (size_t i = 0; i < sizeof keys / sizeof keys[0]; i++)
        CHECK_MSG(cJSON_GetObjectItem(jc, keys[i])->valuedouble == NUM(keys[i]), "%s", keys[i]);
#undef NUM
    CHECK_INT(cJSON_GetArraySize(cJSON_GetObjectItem(j, "tensors")), g.n_tensors);
    CHECK_INT(cJSON_GetArraySize(cJSON_GetObjectItem(j, "metadata")), g.n_kv);
    const cJSON *arch = cJSON_GetObjectItem(cJSON_GetObjectItem(j, "metadata"), "general.architecture");
    CHECK(arch && !strcmp(arch->valuestring, "qwen2"));
    gguf_close(&g);
    cJSON_Delete(j);
    cJSON_Delete(cfg);
    cJSON_Delete(tc);
    // a GGUF LoRA is described, and is no model for logits
    TMPPATH(ad, "ad");
    TMPPATH(lora, "ad.gguf");
    CHECK_INT(fix_craft_adapter(ad, 0, 0, 0), 0);
    CHECK_INT(test_sh("%s convert --adapter '%s' --model " BASE " --out '%s'", test_lorakit(), ad, lora), 0);
    CHECK_INT(test_sh("%s info '%s'", test_lorakit(), lora), 0);
    CHECK(strstr(test_output(), "lorakit cannot run this file: ") && strstr(test_output(), "general.type is 'adapter'") &&
          strstr(test_output(), "blk.3.attn_q.weight.lora_b"));
    CHECK_INT(test_sh("%s logits --model '%s' --tokens 1,2 --out '%s.st'", test_lorakit(), lora, lora), 1);
    CHECK(strstr(test_output(), "not a model (a GGUF LoRA"));
}

// ---- malformed files ----

/* info and logits on a file: their exit statuses; both outputs must name the file. */
static int run_both(const char *path, int *out_info, int *out_logits, char *msg, size_t n)
{
    *out_info = test_sh("%s info '%s'", test_lorakit(), path);
    int named = strstr(test_output(), path) != NULL;
    snprintf(msg, n, "%s", test_output());
    *out_logits = test_sh("%s logits --model '%s' --tokens 1,2,3 --out '%s.st'", test_lorakit(), path, path);
    named = named && strstr(test_output(), path) && strstr(test_output(), "lorakit logits: error: ");
    if (!named)
        fprintf(stderr, "    %s not named: %s / %s\n", path, msg, test_output());
    return named;
}

/* Offset just past key's name in a GGUF's bytes (the value type follows), or 0. */
static size_t key_end(const char *buf, size_t n, const char *key)
{
    size_t k = strlen(key);
    for (size_t i = 8; i + k + 4 < n; i++)
        if (!memcmp(buf + i, key, k) && (uint64_t)(unsigned char)buf[i - 8] == k)
            return i + k;
    return 0;
}

TEST(gguf_malformed_files_are_refused_by_name)
{
    if (!lk_file_exists(BASE "/config.json"))
        SKIP("no %s (run from the repository root)", BASE);
    TMPPATH(good, "good.gguf");
    TMPPATH(bad, "bad.gguf");
    CHECK_INT(test_sh("%s convert --model " BASE " --out '%s'", test_lorakit(), good), 0);
    char *buf, msg[2048];
    size_t n;
    CHECK_OK(lk_read_file(good, &buf, &n, test_err()));
    struct gguf_file g;
    CHECK_OK(gguf_open(&g, good, test_err()));
    size_t data0 = g.data_off;
    gguf_close(&g);
    // truncated anywhere: in the header, the metadata, the tensor table, the data
    size_t cuts[] = { 0, 3, 4, 7, 8, 15, 23, 24, 60, 200, 1000, 5000, 20000, data0 / 2, data0 - 1, data0, data0 + 1000,
                      n / 2, n - 33, n - 1 };
    for (size_t i = 0; i < sizeof cuts / sizeof cuts[0]; i++) {
        int ri, rl;
        CHECK_INT(fix_put_file(bad, buf, cuts[i]), 0);
        CHECK_MSG(run_both(bad, &ri, &rl, msg, sizeof msg) && ri == 1 && rl == 1, "cut at %zu: info %d, logits %d",
                  cuts[i], ri, rl);
    }
    struct {
        const char *key;   /* patch the value after this key (NULL: at offset) */
        size_t at;         /* offset of the patch from the key's end */
        const char *bytes; /* the bytes written there */
        size_t nb;
        int info;          /* info's exit status */
        const char *want;  /* in logits' message */
    } cases[] = {
        { NULL, 0, "GGUG", 4, 1, "not a GGUF file" },
        { NULL, 4, "\x01\0\0\0", 4, 1, "GGUF version 1 is not supported" },
        { "general.architecture", 12, "gemma", 5, 0, "architecture 'gemma' is not supported" },
        { "qwen2.feed_forward_length", 4, "\x58\x01\0\0", 4, 1, "the metadata implies [256, 344]" },
        { "qwen2.embedding_length", 4, "\0\0\0\0", 4, 1, "qwen2.embedding_length is 0" },
        { "qwen2.rope.freq_base", 0, "\x05\0\0\0", 4, 1, "expected a float" },
        { "qwen2.rope.dimension_count", 4, "\x20\0\0\0", 4, 0, "rotated whole" },
        { "blk.0.ffn_up.weight", 4 + 16, "\x1a\0\0\0", 4, 0, "has type i32" },
        { "tokenizer.ggml.tokens", 4 + 4, "\xff\xff\xff\xff\xff\xff\xff\x7f", 8, 1, "tokenizer.ggml.tokens" },
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        char *b = malloc(n);
        memcpy(b, buf, n);
        size_t at = cases[i].key ? key_end(b, n, cases[i].key) : 0;
        CHECK_MSG(!cases[i].key || at, "no key %s", cases[i].key);
        memcpy(b + at + cases[i].at, cases[i].bytes, cases[i].nb);
        CHECK_INT(fix_put_file(bad, b, n), 0);
        free(b);
        int ri, rl;
        CHECK_MSG(run_both(bad, &ri, &rl, msg, sizeof msg), "case %zu", i);
        CHECK_MSG(ri == cases[i].info && rl == 1 && strstr(test_output(), cases[i].want),
                  "case %zu: info %d (%s), logits %d: %s", i, ri, msg, rl, test_output());
        if (cases[i].info == 0) // described, with the reason lorakit cannot run it
            CHECK_MSG(strstr(msg, "lorakit cannot run this file: ") && strstr(msg, cases[i].want), "%s", msg);
    }
    lk_free(buf);
}

// ---- rope scaling and Qwen3 in GGUF (no peer) ----

static const char LLAMA32_PUBLISHED[] =
    "{\"architectures\":[\"LlamaForCausalLM\"],\"model_type\":\"llama\",\"hidden_size\":128,\"intermediate_size\":64,"
    "\"num_hidden_layers\":1,\"num_attention_heads\":2,\"num_key_value_heads\":1,\"head_dim\":64,\"vocab_size\":768,"
    "\"rms_norm_eps\":1e-5,\"rope_theta\":500000.0,\"rope_scaling\":{\"factor\":32.0,\"high_freq_factor\":4.0,"
    "\"low_freq_factor\":1.0,\"original_max_position_embeddings\":8192,\"rope_type\":\"llama3\"},"
    "\"tie_word_embeddings\":true,\"max_position_embeddings\":131072,\"torch_dtype\":\"float32\"}";

static void set_freqs(const char *name, float *x, size_t n, void *ctx)
{
    if (!strcmp(name, "rope_freqs.weight"))
        for (size_t i = 0; i < n; i++)
            x[i] = ((const float *)ctx)[i];
}

TEST(gguf_rope_freqs_written_and_read_back)
{
    if (!lk_file_exists(BASE "/config.json"))
        SKIP("no %s (run from the repository root)", BASE);
    TMPPATH(dir, "l32");
    TMPPATH(out, "l32.gguf");
    TMPPATH(bare, "bare.gguf");
    CHECK_INT(make_model(dir, LLAMA32_PUBLISHED), 0);
    CHECK_INT(test_sh("%s convert --model '%s' --out '%s'", test_lorakit(), dir, out), 0);
    // rope_freqs against the formula in double; bands: 1 for the high, 32 for the low, between
    struct gguf_file g;
    CHECK_OK(gguf_open(&g, out, test_err()));
    const struct gguf_tensor *rf = gguf_find_tensor(&g, "rope_freqs.weight");
    CHECK(rf && rf->type == GGUF_T_F32 && rf->n_dims == 1 && rf->ne[0] == 32);
    float conv[32]; // as convert_hf_to_gguf.py computes them (its own formula, here in double)
    int bands[3] = { 0 };
    for (int i = 0; i < 32; i++) {
        double want = llama3_factor(i, 64, 500000, 32, 1, 4, 8192), got = ((const float *)rf->data)[i];
        CHECK_MSG(fabs(got / want - 1) <= 1e-6, "pair %d: %.9g vs %.9g", i, got, want);
        bands[want == 1 ? 0 : want == 32 ? 2 : 1]++;
        conv[i] = (float)want;
    }
    CHECK(bands[0] > 0 && bands[1] > 0 && bands[2] > 0);
    struct cfg c;
    CHECK_OK(gguf_model_cfg(&g, &c, NULL, NULL, test_err()));
    CHECK(c.rope_scaling.type == CFG_ROPE_LLAMA3 && c.rope_scaling.factor == 32);
    CHECK(c.rope_scaling.low_freq_factor == 1 && c.rope_scaling.high_freq_factor == 4 &&
          c.rope_scaling.original_max_position_embeddings == 8192);
    gguf_close(&g);
    CHECK(same_logits(dir, out));
    // a file from llama.cpp's converter has rope_freqs alone: the parameters are recovered
    CHECK_INT(fix_gguf_copy(out, bare, "lorakit.rope_scaling", set_freqs, conv), 0);
    CHECK_OK(gguf_open(&g, bare, test_err()));
    CHECK(!gguf_find_kv(&g, "lorakit.rope_scaling.type"));
    memset(&c, 0, sizeof c);
    CHECK_OK(gguf_model_cfg(&g, &c, NULL, NULL, test_err()));
    gguf_close(&g);
    CHECK_MSG(c.rope_scaling.type == CFG_ROPE_LLAMA3 && c.rope_scaling.factor == 32 &&
              c.rope_scaling.low_freq_factor == 1 && c.rope_scaling.high_freq_factor == 4 &&
              c.rope_scaling.original_max_position_embeddings == 8192, "recovered %g %g %g %d", c.rope_scaling.factor,
              c.rope_scaling.low_freq_factor, c.rope_scaling.high_freq_factor,
              c.rope_scaling.original_max_position_embeddings);
    CHECK(same_logits(dir, bare));
    // factors that are no llama3 scaling, or that contradict lorakit.rope_scaling: refused by name
    float odd[32];
    for (int i = 0; i < 32; i++)
        odd[i] = i % 2 ? 3.0f : 1.0f;
    CHECK_INT(fix_gguf_copy(out, bare, "lorakit.rope_scaling", set_freqs, odd), 0);
    CHECK_INT(test_sh("%s logits --model '%s' --tokens 1,2 --out '%s.st'", test_lorakit(), bare, bare), 1);
    CHECK(strstr(test_output(), "holds per-dimension rotary factors that are not llama3 scaling"));
    conv[20] *= 1.01f;
    CHECK_INT(fix_gguf_copy(out, bare, NULL, set_freqs, conv), 0);
    CHECK_INT(test_sh("%s info '%s'", test_lorakit(), bare), 1);
    CHECK(strstr(test_output(), "does not hold the factors of lorakit.rope_scaling"));
    // linear scaling: llama.cpp's own keys
    TMPPATH(lin, "lin");
    TMPPATH(lout, "lin.gguf");
    CHECK_INT(make_model(lin, "{\"architectures\":[\"LlamaForCausalLM\"],\"hidden_size\":64,\"intermediate_size\":64,"
                              "\"num_hidden_layers\":1,\"num_attention_heads\":2,\"vocab_size\":768,"
                              "\"max_position_embeddings\":128,"
                              "\"rope_scaling\":{\"rope_type\":\"linear\",\"factor\":4},"
                              "\"tie_word_embeddings\":true,\"torch_dtype\":\"float32\"}"), 0);
    CHECK_INT(test_sh("%s convert --model '%s' --out '%s'", test_lorakit(), lin, lout), 0);
    CHECK_OK(gguf_open(&g, lout, test_err()));
    double factor;
    CHECK(fix_has_str(&g, "llama.rope.scaling.type", "linear") && !gguf_find_tensor(&g, "rope_freqs.weight"));
    CHECK_OK(gguf_get_float(&g, "llama.rope.scaling.factor", &factor, test_err()));
    CHECK(factor == 4);
    gguf_close(&g);
    CHECK(same_logits(lin, lout));
}

static const char QWEN3_TINY[] =
    "{\"architectures\":[\"Qwen3ForCausalLM\"],\"model_type\":\"qwen3\",\"hidden_size\":64,\"intermediate_size\":128,"
    "\"num_hidden_layers\":2,\"num_attention_heads\":4,\"num_key_value_heads\":2,\"head_dim\":32,\"vocab_size\":768,"
    "\"rms_norm_eps\":1e-6,\"rope_theta\":1000000,\"attention_bias\":false,\"tie_word_embeddings\":true,"
    "\"max_position_embeddings\":256,\"initializer_range\":0.3,\"torch_dtype\":\"float32\"}";

/* A Llama 3.2-shaped model (GQA, tied), %s its rope_scaling entry. */
static const char LLAMA_TINY_FMT[] =
    "{\"architectures\":[\"LlamaForCausalLM\"],\"model_type\":\"llama\",\"hidden_size\":64,\"intermediate_size\":128,"
    "\"num_hidden_layers\":2,\"num_attention_heads\":4,\"num_key_value_heads\":2,\"head_dim\":16,\"vocab_size\":768,"
    "\"rms_norm_eps\":1e-5,\"rope_theta\":500000.0,%s\"attention_bias\":false,\"tie_word_embeddings\":true,"
    "\"max_position_embeddings\":256,\"initializer_range\":0.3,\"torch_dtype\":\"float32\"}";
/* head_dim 16, theta 500000, original context 64: wavelengths 6.3 (high band, under 16), 32.4
 * (medium), 167 and up (low, over 64). */
static const char LLAMA3_SCALING[] =
    "\"rope_scaling\":{\"factor\":32.0,\"high_freq_factor\":4.0,\"low_freq_factor\":1.0,"
    "\"original_max_position_embeddings\":64,\"rope_type\":\"llama3\"},";

TEST(gguf_qwen3_written_and_read_back)
{
    if (!lk_file_exists(BASE "/config.json"))
        SKIP("no %s (run from the repository root)", BASE);
    TMPPATH(dir, "q3");
    TMPPATH(out, "q3.gguf");
    CHECK_INT(make_model(dir, QWEN3_TINY), 0);
    CHECK_INT(test_sh("%s convert --model '%s' --out '%s'", test_lorakit(), dir, out), 0);
    CHECK(strstr(test_output(), "qwen3, 24 tensors"));
    struct gguf_file g;
    CHECK_OK(gguf_open(&g, out, test_err()));
    CHECK(fix_has_str(&g, "general.architecture", "qwen3") && fix_has_uint(&g, "qwen3.attention.key_length", 32) &&
          fix_has_uint(&g, "qwen3.attention.value_length", 32) && fix_has_uint(&g, "qwen3.embedding_length", 64) &&
          fix_has_uint(&g, "qwen3.attention.head_count_kv", 2));
    const struct gguf_tensor *qn = gguf_find_tensor(&g, "blk.1.attn_q_norm.weight"),
                             *kn = gguf_find_tensor(&g, "blk.1.attn_k_norm.weight"),
                             *q = gguf_find_tensor(&g, "blk.1.attn_q.weight");
    CHECK(qn && kn && qn->n_dims == 1 && qn->ne[0] == 32 && kn->ne[0] == 32);
    CHECK(q && q->ne[0] == 64 && q->ne[1] == 128 && !gguf_find_tensor(&g, "blk.0.attn_q.bias"));
    CHECK(!gguf_find_tensor(&g, "output.weight"));
    // the q/k norms as they are (no permutation in qwen3), and the whole model back bit for bit
    struct model m, back;
    CHECK_OK(model_load(&m, dir, test_err()));
    CHECK(!memcmp(qn->data, m.w.layer[1].q_norm, 32 * sizeof(float)));
    CHECK(!memcmp(q->data, m.w.layer[1].wq.f, 128 * 64 * sizeof(float)));
    gguf_close(&g);
    CHECK_OK(model_load(&back, out, test_err()));
    CHECK(back.cfg.arch == CFG_ARCH_QWEN3 && back.cfg.qk_norm && back.cfg.head_dim == 32 && !back.cfg.attention_bias);
    CHECK(back.w.n == m.w.n && !memcmp(back.w.mem, m.w.mem, m.w.n * sizeof(float)));
    model_release(&back);
    model_release(&m);
    CHECK(same_logits(dir, out));
}

// ---- the peer ----

/* NPROMPT prompts of LONG_T ids: windows of the test texts' tokens run together. */
static int long_prompts(int32_t rows[NPROMPT][LONG_T])
{
    struct tok_ids ids[N_TEXTS] = { 0 }, all = { 0 };
    int32_t *r[NPROMPT];
    int lens[NPROMPT];
    if (base_prompts(r, lens, ids))
        return -1;
    for (int i = 0; i < N_TEXTS; i++)
        for (size_t k = 0; k < ids[i].n; k++)
            tok_ids_push(&all, ids[i].v[k], NULL);
    int ok = all.n >= (size_t)NPROMPT * LONG_T;
    for (int p = 0; p < NPROMPT && ok; p++)
        memcpy(rows[p], all.v + (size_t)p * LONG_T, sizeof rows[p]);
    for (int i = 0; i < N_TEXTS; i++)
        tok_ids_release(&ids[i]);
    tok_ids_release(&all);
    return ok ? 0 : -1;
}

/* The 140 texts and short prompts (fix_check_in_llama), then prompts of LONG_T tokens continued
 * by NGEN: greedy equal, log-probs within 1e-4. */
static int check_long_in_llama(const char *dir, const char *gguf, const char *adapter, const char *what)
{
    double d;
    if (fix_check_in_llama(dir, gguf, adapter, NULL, what, &d))
        return -1;
    int32_t rows[NPROMPT][LONG_T], *p[NPROMPT], want[NPROMPT][NGEN];
    int lens[NPROMPT], V;
    if (long_prompts(rows))
        return -1;
    for (int i = 0; i < NPROMPT; i++) {
        p[i] = rows[i];
        lens[i] = LONG_T;
    }
    double *lp = fix_lk_logprobs(dir, adapter, p, NPROMPT, LONG_T, &V);
    if (!lp || fix_lk_greedy(dir, adapter, p, lens, NPROMPT, want)) {
        free(lp);
        return -1;
    }
    cJSON *o = fix_peer(fix_peer_run(gguf, NULL, NULL, 0, p, lens, 0));
    int same = o ? fix_greedy_agree(cJSON_GetObjectItem(o, "generate"), want, NPROMPT, what, 1) : -1;
    d = o ? fix_lp_maxdiff(cJSON_GetObjectItem(o, "logprobs"), lp, NPROMPT, V) : -1;
    fprintf(stderr, "    %s, prompts of %d tokens: %d/%d greedy continuations equal (to position %d), max |d "
                    "log-prob| %.3g\n", what, LONG_T, same, NPROMPT, LONG_T + NGEN, d);
    cJSON_Delete(o);
    free(lp);
    return same == NPROMPT && d >= 0 && d <= 1e-4 ? 0 : -1;
}

TEST(gguf_llama_merged_gguf_f32)
{
    NEED_PEER();
    TMPPATH(ad, "ad");
    TMPPATH(out, "merged.gguf");
    CHECK_INT(fix_train_adapter(BASE, ad, ""), 0);
    CHECK_INT(test_sh("%s merge --model " BASE " --adapter '%s' --out '%s' --dtype f32", test_lorakit(), ad, out), 0);
    double d;
    CHECK_INT(fix_check_in_llama(BASE, out, ad, NULL, "merge --out FILE.gguf (f32) against base + adapter", &d), 0);
}

TEST(gguf_llama_merged_gguf_dtypes)
{
    NEED_PEER();
    TMPPATH(ad, "ad");
    CHECK_INT(fix_train_adapter(BASE, ad, ""), 0);
    int32_t *rows[NPROMPT], want[NPROMPT][NGEN];
    int lens[NPROMPT], V;
    struct tok_ids ids[N_TEXTS] = { 0 };
    CHECK_INT(base_prompts(rows, lens, ids), 0);
    CHECK_INT(fix_lk_greedy(BASE, ad, rows, lens, NPROMPT, want), 0);
    double *lp = fix_lk_logprobs(BASE, ad, rows, NPROMPT, PLEN, &V);
    CHECK(lp != NULL);
    static const char *const dtypes[] = { "f16", "bf16", "q8_0" };
    char path[3][700];
    cJSON *job = cJSON_CreateObject(), *runs = cJSON_AddArrayToObject(job, "runs");
    for (int i = 0; i < 3; i++) {
        snprintf(path[i], sizeof path[i], "%s/m-%s.gguf", test_tmpdir(), dtypes[i]);
        CHECK_INT(test_sh("%s merge --model " BASE " --adapter '%s' --out '%s' --dtype %s", test_lorakit(), ad,
                          path[i], dtypes[i]), 0);
        cJSON_AddItemToArray(runs, fix_peer_run(path[i], NULL, NULL, 0, rows, lens, 0));
    }
    cJSON *o = fix_peer(job);
    CHECK(o != NULL);
    // against lorakit's base + adapter (the file's error), and against lorakit reading the same
    // file (llama.cpp's kernels, which round activations to f16 / bf16 / q8_0 blocks too)
    for (int i = 0; i < 3; i++) {
        const cJSON *r = cJSON_GetArrayItem(cJSON_GetObjectItem(o, "runs"), i);
        int32_t file_want[NPROMPT][NGEN];
        double *file_lp = fix_lk_logprobs(path[i], NULL, rows, NPROMPT, PLEN, &V);
        CHECK(file_lp && fix_lk_greedy(path[i], NULL, rows, lens, NPROMPT, file_want) == 0);
        int same = fix_greedy_agree(cJSON_GetObjectItem(r, "generate"), want, NPROMPT, dtypes[i], 0);
        int same_file = fix_greedy_agree(cJSON_GetObjectItem(r, "generate"), file_want, NPROMPT, dtypes[i], 0);
        double err = fix_lp_maxdiff(cJSON_GetObjectItem(r, "logprobs"), lp, NPROMPT, V);
        double err_file = fix_lp_maxdiff(cJSON_GetObjectItem(r, "logprobs"), file_lp, NPROMPT, V);
        free(file_lp);
        fprintf(stderr, "    merged %-4s in llama.cpp: %8ld bytes; against lorakit's base + adapter: greedy %d/%d "
                        "equal, max |d log-prob| %.3g; against lorakit on the same file: %d/%d, %.3g\n", dtypes[i],
                fix_file_size(path[i]), same, NPROMPT, err, same_file, NPROMPT, err_file);
        CHECK_MSG(same_file * 2 > NPROMPT && err >= 0 && err < 0.5 && err_file >= 0 && err_file < 0.5, "%s",
                  dtypes[i]);
    }
    cJSON_Delete(o);
    free(lp);
    for (int i = 0; i < N_TEXTS; i++)
        tok_ids_release(&ids[i]);
}

/* One architecture in llama.cpp: converted, then merged with a trained adapter. */
static int arch_in_llama(const char *json, const char *tag, const char *desc)
{
    char dir[700], out[700], ad[700], merged[700], what[200];
    snprintf(dir, sizeof dir, "%s/%s", test_tmpdir(), tag);
    snprintf(out, sizeof out, "%s/%s.gguf", test_tmpdir(), tag);
    snprintf(ad, sizeof ad, "%s/%s-ad", test_tmpdir(), tag);
    snprintf(merged, sizeof merged, "%s/%s-merged.gguf", test_tmpdir(), tag);
    if (make_model(dir, json) || test_sh("%s convert --model '%s' --out '%s'", test_lorakit(), dir, out))
        return -1;
    snprintf(what, sizeof what, "%s f32", desc);
    if (check_long_in_llama(dir, out, NULL, what))
        return -1;
    if (fix_train_adapter(dir, ad, "") ||
        test_sh("%s merge --model '%s' --adapter '%s' --out '%s' --dtype f32", test_lorakit(), dir, ad, merged))
        return -1;
    snprintf(what, sizeof what, "%s merged with a LoRA (f32)", desc);
    if (check_long_in_llama(dir, merged, ad, what))
        return -1;
    // the adapter as a GGUF LoRA on the base GGUF
    char lora[700];
    double d;
    snprintf(lora, sizeof lora, "%s/%s-lora.gguf", test_tmpdir(), tag);
    snprintf(what, sizeof what, "%s + GGUF LoRA", desc);
    if (test_sh("%s convert --adapter '%s' --model '%s' --out '%s'", test_lorakit(), ad, dir, lora))
        return -1;
    return fix_check_in_llama(dir, out, ad, lora, what, &d);
}

TEST(gguf_llama_qwen3_model)
{
    NEED_PEER();
    CHECK_INT(arch_in_llama(QWEN3_TINY, "q3", "qwen3 (4 heads x 32 = 128 != hidden 64, GQA, tied)"), 0);
}

TEST(gguf_llama_llama32_rope_scaling)
{
    NEED_PEER();
    char json[2048];
    snprintf(json, sizeof json, LLAMA_TINY_FMT, LLAMA3_SCALING);
    CHECK_INT(arch_in_llama(json, "l32", "llama 3.2 (llama3 rope scaling, original context 64, tied)"), 0);
    // the scaling matters on these prompts: the same weights without it answer differently
    TMPPATH(dir, "unscaled");
    TMPPATH(scaled, "l32");
    snprintf(json, sizeof json, LLAMA_TINY_FMT, "");
    CHECK_INT(make_model(dir, json), 0);
    int32_t rows[NPROMPT][LONG_T], *r[NPROMPT];
    int V;
    CHECK_INT(long_prompts(rows), 0);
    for (int i = 0; i < NPROMPT; i++)
        r[i] = rows[i];
    double *a = fix_lk_logprobs(scaled, NULL, r, NPROMPT, LONG_T, &V);
    double *b = fix_lk_logprobs(dir, NULL, r, NPROMPT, LONG_T, &V);
    CHECK(a && b);
    double d = 0;
    for (size_t i = 0; i < (size_t)NPROMPT * (size_t)V; i++)
        d = fmax(d, fabs(a[i] - b[i]));
    fprintf(stderr, "    without the scaling the same weights move log-probs by up to %.3g\n", d);
    CHECK(d > 0.01);
    free(a);
    free(b);
    // linear scaling, through llama.cpp's rope.scaling keys
    snprintf(json, sizeof json, LLAMA_TINY_FMT, "\"rope_scaling\":{\"rope_type\":\"linear\",\"factor\":3.0},");
    CHECK_INT(arch_in_llama(json, "lin", "llama (linear rope scaling, factor 3)"), 0);
}

// ---- allocation failures ----

struct gguf_sweep {
    struct merge_opts o;
    char out[700];
    char ref[700];       /* the output of the run without faults */
    int have_ref;
};

static int gguf_sweep_op(void *ctx, struct lk_err *err)
{
    struct merge_report rep;
    return merge_run(&((struct gguf_sweep *)ctx)->o, &rep, err);
}

static int gguf_sweep_done(void *ctx, int rc)
{
    struct gguf_sweep *sw = ctx;
    if (test_sh("ls -a '%s' | grep -q '\\.tmp\\.'", test_tmpdir()) == 0) {
        test_fail(__FILE__, __LINE__, "merge (status %d) left a temporary file", rc);
        return -1;
    }
    if (!sw->have_ref) {
        sw->have_ref = 1;
        return rename(sw->o.out, sw->ref) ? -1 : 0;
    }
    if (rc != LK_OK && lk_file_exists(sw->o.out)) {
        test_fail(__FILE__, __LINE__, "a failed merge left '%s'", sw->o.out);
        return -1;
    }
    int same = rc != LK_OK || test_sh("cmp -s '%s' '%s'", sw->o.out, sw->ref) == 0;
    unlink(sw->o.out);
    if (!same)
        test_fail(__FILE__, __LINE__, "'%s' differs from the run without faults", sw->o.out);
    return same ? 0 : -1;
}

TEST(gguf_merge_survives_allocation_failures)
{
    if (!lk_file_exists(BASE "/config.json"))
        SKIP("no %s (run from the repository root)", BASE);
    TMPPATH(dir, "small");
    TMPPATH(ad, "ad");
    CHECK_INT(make_model(dir, "{\"architectures\":[\"LlamaForCausalLM\"],\"hidden_size\":32,\"intermediate_size\":64,"
                              "\"num_hidden_layers\":1,\"num_attention_heads\":2,\"num_key_value_heads\":1,"
                              "\"vocab_size\":768,\"max_position_embeddings\":64,\"tie_word_embeddings\":true,"
                              "\"torch_dtype\":\"bfloat16\"}"), 0);
    CHECK_OK(random_adapter(dir, ad, (1u << CFG_Q) | (1u << CFG_UP), 2, 5));
    struct gguf_sweep sw;
    memset(&sw, 0, sizeof sw);
    sw.o.model = dir;
    snprintf(sw.out, sizeof sw.out, "%s/out.gguf", test_tmpdir());
    sw.o.out = sw.out;
    sw.o.n_adapters = 1;
    sw.o.adapters[0] = (struct merge_adapter){ ad, 1.0 };
    sw.o.dtype = -1;
    sw.o.gguf_dtype = GGUF_T_Q8_0;
    snprintf(sw.ref, sizeof sw.ref, "%s/ref.gguf", test_tmpdir());
    long runs = ALLOC_SWEEP("merge_run to a .gguf (q8_0, llama q/k rows permuted)", gguf_sweep_op, gguf_sweep_done,
                            &sw, 50000);
    fprintf(stderr, "    allocations made to fail: %ld\n", runs);
    CHECK(runs > 20);
}
