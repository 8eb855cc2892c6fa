/*
 * test_generate.c - the KV-cache forward against model_forward on the full prefix (every
 * position, chunked prefill and single tokens, with and without an adapter, qwen2 and llama
 * fixtures), greedy generation with the cache against recomputing the prefix per token,
 * cache rewinding, sampling, UTF-8 streaming, and `lorakit generate` end to end.
 */
#include "test.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "../libcore/generate.h"
#include "../libcore/model.h"
#include "../libcore/tensor.h"
#include "fix_model.h"

/* max |a - b| / max |b| over n values */
static double rel_diff(const float *a, const float *b, size_t n)
{
    double mx = 0, mref = 0;
    for (size_t i = 0; i < n; i++) {
        double d = fabs((double)a[i] - b[i]);
        if (d > mx)
            mx = d;
        if (fabs(b[i]) > mref)
            mref = fabs(b[i]);
    }
    return mx / (mref > 0 ? mref : 1);
}

/* Prefill n_pre tokens in chunks of `chunk`, then one token at a time: every position's logits
 * must match model_forward's on the whole sequence (causal: row t depends on tokens 0..t) within
 * tol (relative to the row's largest logit). */
static void check_cache_vs_full_dtype(const struct cfg *c, int with_lora, int chunk, int n_pre, double tol,
                                      int dtype)
{
    struct model m;
    struct lora l = { 0 };
    CHECK_OK(fix_model_random(&m, c, 0.3f, 21));
    if (dtype != TENSOR_F32) // the matrices kept in bf16 / f16: one token is the fused GEMV
        CHECK_OK(model_weights_convert(&m.w, c, dtype, test_err()));
    if (with_lora)
        CHECK_OK(fix_lora_random(&l, c, (1u << CFG_N_MODULES) - 1, 3, 6.0, 0, 0.0f, 22));
    const struct lora *lp = with_lora ? &l : NULL;
    int T = 13, V = c->vocab_size;
    int tok[13];
    fix_tokens(tok, T, V, 23);
    CHECK_OK(model_plan(&m, 1, T, 0, test_err()));
    CHECK_OK(model_forward(&m, lp, tok, NULL, NULL, NULL, 0, NULL, test_err()));
    float *ref = malloc(sizeof(float) * (size_t)T * V), *got = malloc(sizeof(float) * (size_t)T * V);
    memcpy(ref, model_logits(&m), sizeof(float) * (size_t)T * V);
    struct gen_cache gc;
    CHECK_OK(gen_cache_init(&gc, c, 16, chunk, gen_lora_max_rank(lp), test_err()));
    int32_t t32[13];
    for (int i = 0; i < T; i++)
        t32[i] = tok[i];
    CHECK_OK(gen_forward(&gc, &m, lp, t32, n_pre, got, test_err()));
    CHECK_INT(gc.n, n_pre);
    for (int t = n_pre; t < T; t++) {
        CHECK_OK(gen_forward(&gc, &m, lp, t32 + t, 1, NULL, test_err()));
        memcpy(got + (size_t)t * V, gc.logits, sizeof(float) * (size_t)V);
    }
    for (int t = 0; t < T; t++) {
        double r = rel_diff(got + (size_t)t * V, ref + (size_t)t * V, (size_t)V);
        CHECK_MSG(r < tol, "%s weights, position %d: cached logits differ from model_forward by %g (rel)",
                  tensor_dtype_name(dtype), t, r);
    }
    // rewinding: drop the last 4 positions and run them again as one chunk
    gen_cache_truncate(&gc, T - 4);
    CHECK_OK(gen_forward(&gc, &m, lp, t32 + T - 4, 4, got, test_err()));
    for (int t = 0; t < 4; t++) {
        double r = rel_diff(got + (size_t)t * V, ref + (size_t)(T - 4 + t) * V, (size_t)V);
        CHECK_MSG(r < tol, "after rewinding, position %d differs by %g", T - 4 + t, r);
    }
    // a full cache refuses more tokens and is left unchanged
    CHECK_OK(gen_forward(&gc, &m, lp, t32, 3, NULL, test_err()));
    CHECK_INT(gc.n, 16);
    CHECK(gen_forward(&gc, &m, lp, t32, 1, NULL, test_err()) == LK_ERR_USAGE);
    CHECK_INT(gc.n, 16);
    int32_t bad = V;
    gen_cache_truncate(&gc, 0);
    CHECK(gen_forward(&gc, &m, lp, &bad, 1, NULL, test_err()) == LK_ERR_USAGE);
    CHECK_INT(gc.n, 0);
    gen_cache_release(&gc);
    gen_cache_release(&gc); // harmless twice
    free(ref);
    free(got);
    lora_release(&l);
    model_release(&m);
}

static void check_cache_vs_full_tol(const struct cfg *c, int with_lora, int chunk, int n_pre, double tol)
{
    static const int dtypes[] = { TENSOR_F32, TENSOR_BF16, TENSOR_F16 };
    for (size_t d = 0; d < 3 && !test_failed(); d++)
        check_cache_vs_full_dtype(c, with_lora, chunk, n_pre, tol, dtypes[d]);
}

static void check_cache_vs_full(const struct cfg *c, int with_lora, int chunk, int n_pre)
{
    check_cache_vs_full_tol(c, with_lora, chunk, n_pre, 1e-5);
}

TEST(gen_cache_matches_full_forward_qwen2)
{
    struct cfg c;
    fix_cfg_qwen2(&c);
    check_cache_vs_full(&c, 0, 16, 6);
    if (test_failed())
        return;
    check_cache_vs_full(&c, 0, 4, 9); // prefill in three chunks
}

TEST(gen_cache_matches_full_forward_qwen2_lora)
{
    struct cfg c;
    fix_cfg_qwen2(&c);
    check_cache_vs_full(&c, 1, 16, 5);
    if (test_failed())
        return;
    check_cache_vs_full(&c, 1, 3, 7);
}

TEST(gen_cache_matches_full_forward_llama)
{
    struct cfg c;
    fix_cfg_llama(&c);
    check_cache_vs_full(&c, 0, 16, 1);
    if (test_failed())
        return;
    check_cache_vs_full(&c, 0, 5, 12);
}

TEST(gen_cache_matches_full_forward_llama_lora)
{
    struct cfg c;
    fix_cfg_llama(&c);
    check_cache_vs_full(&c, 1, 16, 4);
    if (test_failed())
        return;
    check_cache_vs_full(&c, 1, 2, 8);
}

TEST(gen_cache_matches_full_forward_llama_attention_bias)
{
    // q/k/v and o_proj biases: the single-token GEMV and the chunked prefill add o_proj's too
    struct cfg c;
    fix_cfg_llama_bias(&c);
    check_cache_vs_full(&c, 0, 16, 1);
    if (test_failed())
        return;
    check_cache_vs_full(&c, 1, 3, 7);
}

TEST(gen_cache_matches_full_forward_qwen3)
{
    // the cache holds keys after k_norm and rope; q is normed per head on the way in
    struct cfg c;
    fix_cfg_qwen3(&c);
    check_cache_vs_full(&c, 0, 16, 6);
    if (test_failed())
        return;
    check_cache_vs_full(&c, 1, 4, 9);
    if (test_failed())
        return;
    check_cache_vs_full(&c, 1, 16, 1);
}

TEST(gen_cache_matches_full_forward_llama32_rope)
{
    // with this fixture's adapter, model_forward itself is 1e-5 to 5e-5 (relative) from the
    // float64 reference at some positions, with or without rope scaling: the float32 paths are
    // compared at the 1e-4
    struct cfg c;
    fix_cfg_llama32(&c);
    check_cache_vs_full_tol(&c, 0, 16, 5, 1e-4);
    if (test_failed())
        return;
    check_cache_vs_full_tol(&c, 1, 3, 7, 1e-4);
}

/* Greedy generation with the cache gives the same tokens as recomputing the prefix. */
static void check_greedy_same(const struct cfg *c, int with_lora, float std, int dtype)
{
    struct model m;
    struct lora l = { 0 };
    CHECK_OK(fix_model_random(&m, c, std, 31));
    if (dtype != TENSOR_F32)
        CHECK_OK(model_weights_convert(&m.w, c, dtype, test_err()));
    if (with_lora)
        CHECK_OK(fix_lora_random(&l, c, (1u << CFG_N_MODULES) - 1, 2, 4.0, 0, 0.0f, 32));
    const struct lora *lp = with_lora ? &l : NULL;
    int32_t prompt[5];
    int tok[5];
    fix_tokens(tok, 5, c->vocab_size, 33);
    for (int i = 0; i < 5; i++)
        prompt[i] = tok[i];
    struct gen_cache gc;
    CHECK_OK(gen_cache_init(&gc, c, 64, 8, gen_lora_max_rank(lp), test_err()));
    struct gen_opts o = { .max_new = 40, .temperature = 0, .top_p = 1, .eos = -1 };
    struct tok_ids a = { 0 }, b = { 0 };
    CHECK_OK(gen_run(&gc, &m, lp, prompt, 5, &o, NULL, NULL, &a, NULL, test_err()));
    o.no_cache = 1;
    CHECK_OK(gen_run(NULL, &m, lp, prompt, 5, &o, NULL, NULL, &b, NULL, test_err()));
    CHECK_INT(a.n, 40);
    CHECK_INT(b.n, 40);
    int distinct = 0;
    for (size_t i = 0; i < a.n; i++) {
        CHECK_MSG(a.v[i] == b.v[i], "token %zu: cache %d, recompute %d", i, a.v[i], b.v[i]);
        distinct += i == 0 || a.v[i] != a.v[i - 1];
    }
    CHECK_MSG(distinct > 3, "only %d changes in 40 tokens: a weak check", distinct);
    // eos stops: make the 3rd generated token the eos
    o.no_cache = 0;
    o.eos = a.v[2];
    struct tok_ids e = { 0 };
    int stopped;
    CHECK_OK(gen_run(&gc, &m, lp, prompt, 5, &o, NULL, NULL, &e, &stopped, test_err()));
    size_t first = 0;
    while (a.v[first] != o.eos)
        first++;
    CHECK_INT(e.n, first);
    CHECK_INT(stopped, 1);
    // prompt + max_new beyond the cache is refused
    o.max_new = 60;
    CHECK(gen_run(&gc, &m, lp, prompt, 5, &o, NULL, NULL, NULL, NULL, test_err()) == LK_ERR_USAGE);
    tok_ids_release(&a);
    tok_ids_release(&b);
    tok_ids_release(&e);
    gen_cache_release(&gc);
    lora_release(&l);
    model_release(&m);
}

/* check_greedy_same without and with an adapter, for two fixtures. */
static void check_greedy_two(void (*fix_a)(struct cfg *), void (*fix_b)(struct cfg *))
{
    struct cfg c;
    for (int k = 0; k < 8 && !test_failed(); k++) {
        ((k & 3) < 2 ? fix_a : fix_b)(&c);
        check_greedy_same(&c, k & 1, 0.5f, k < 4 ? TENSOR_F32 : TENSOR_BF16);
    }
}

TEST(gen_greedy_same_tokens_as_recompute)
{
    check_greedy_two(fix_cfg_qwen2, fix_cfg_llama);
}

TEST(gen_greedy_same_tokens_as_recompute_qwen3_llama32)
{
    // 45 positions: past the llama3 fixture's original context (32) and all its band edges
    check_greedy_two(fix_cfg_qwen3, fix_cfg_llama32);
}

TEST(gen_dynamic_rope_refuses_positions_beyond_max)
{
    struct cfg c;
    fix_cfg_llama32(&c);
    c.max_position_embeddings = 8;
    c.rope_scaling = (struct cfg_rope_scaling){ CFG_ROPE_DYNAMIC, 2.0, 0, 0, 0 };
    struct model m;
    CHECK_OK(fix_model_random(&m, &c, 0.3f, 41));
    struct gen_cache gc;
    CHECK_OK(gen_cache_init(&gc, &c, 16, 16, 0, test_err()));
    int32_t tok[9] = { 1, 2, 3, 4, 5, 6, 7, 8, 9 };
    CHECK_OK(gen_forward(&gc, &m, NULL, tok, 8, NULL, test_err()));
    CHECK_INT(gen_forward(&gc, &m, NULL, tok + 8, 1, NULL, test_err()), LK_ERR_UNSUPPORTED);
    CHECK(strstr(test_errmsg(), "'dynamic'") != NULL);
    CHECK_INT(gc.n, 8);
    gen_cache_release(&gc);
    model_release(&m);
}

TEST(gen_sampling)
{
    float logits[5] = { 1.0f, 3.0f, 0.5f, 3.0f, -2.0f };
    CHECK_INT(gen_argmax(logits, 5), 1); // lowest id on ties
    struct gen_sampler s;
    CHECK_OK(gen_sampler_init(&s, 5, 0, 1, 1, test_err()));
    CHECK_INT(gen_sample(&s, logits), 1);
    gen_sampler_release(&s);
    // temperature 1: frequencies follow the softmax
    CHECK_OK(gen_sampler_init(&s, 5, 1.0, 1.0, 7, test_err()));
    int count[5] = { 0 };
    int N = 20000;
    for (int i = 0; i < N; i++)
        count[gen_sample(&s, logits)]++;
    gen_sampler_release(&s);
    double z = 0;
    for (int i = 0; i < 5; i++)
        z += exp(logits[i]);
    for (int i = 0; i < 5; i++) {
        double p = exp(logits[i]) / z, se = sqrt(p * (1 - p) / N);
        CHECK_MSG(fabs((double)count[i] / N - p) < 5 * se + 1e-4, "id %d: frequency %g, softmax %g", i,
                  (double)count[i] / N, p);
    }
    // top-p 0.8: only ids 1 and 3 (each 0.44 of the mass) can come out; the same seed repeats
    int seq1[50], seq2[50];
    for (int rep = 0; rep < 2; rep++) {
        CHECK_OK(gen_sampler_init(&s, 5, 1.0, 0.8, 99, test_err()));
        for (int i = 0; i < 50; i++) {
            int id = gen_sample(&s, logits);
            CHECK_MSG(id == 1 || id == 3, "top-p sampled id %d", id);
            (rep ? seq2 : seq1)[i] = id;
        }
        gen_sampler_release(&s);
    }
    CHECK(memcmp(seq1, seq2, sizeof seq1) == 0);
    CHECK(gen_sampler_init(&s, 5, 1.0, 0.0, 1, test_err()) == LK_ERR_USAGE);
    CHECK(gen_sampler_init(&s, 5, -1.0, 1.0, 1, test_err()) == LK_ERR_USAGE);
    CHECK_NEAR(gen_logprob(logits, 5, 2), 0.5 - log(z), 1e-9);
}

TEST(gen_utf8_streaming_boundaries)
{
    const char *e = "a\xC3\xA9";          // "aé"
    CHECK_INT(gen_utf8_complete(e, 3), 3);
    CHECK_INT(gen_utf8_complete(e, 2), 1); // lead byte only: hold it
    const char *zh = "\xE4\xB8\xAD";       // 中
    CHECK_INT(gen_utf8_complete(zh, 1), 0);
    CHECK_INT(gen_utf8_complete(zh, 2), 0);
    CHECK_INT(gen_utf8_complete(zh, 3), 3);
    const char *emoji = "x\xF0\x9F\x98\x80"; // 😀
    CHECK_INT(gen_utf8_complete(emoji, 4), 1);
    CHECK_INT(gen_utf8_complete(emoji, 5), 5);
    CHECK_INT(gen_utf8_complete("abc", 3), 3);
    CHECK_INT(gen_utf8_complete("\x80\x80", 2), 2); // stray continuation bytes pass
    CHECK_INT(gen_utf8_complete("", 0), 0);
}

/* A tokenizer with multi-byte characters and a tiny model: `generate` streams the same text
 * with and without the cache, and refuses bad input. */
TEST(gen_cli_end_to_end)
{
    FILE *t = fopen(test_path("text.txt"), "w");
    CHECK(t != NULL);
    for (int i = 0; i < 30; i++)
        fprintf(t, "The café number %d serves 中文 tea and 😀 cakes. Question %d answer.\n", i, i);
    fclose(t);
    CHECK_INT(test_sh("%s init --preset tiny --out '%s/m' --seed 3 && "
                      "%s tokenizer train --text '%s/text.txt' --vocab 300 --out '%s/m'",
                      test_lorakit(), test_tmpdir(), test_lorakit(), test_tmpdir(), test_tmpdir()), 0);
    const char *cmd = "%s generate --model '%s/m' --chat 'What is served?' --max-new 30 --threads 1 %s "
                      "> '%s/%s' 2>'%s/err.txt'";
    CHECK_INT(test_sh(cmd, test_lorakit(), test_tmpdir(), "", test_tmpdir(), "a.txt", test_tmpdir()), 0);
    CHECK_INT(test_sh(cmd, test_lorakit(), test_tmpdir(), "--no-cache", test_tmpdir(), "b.txt", test_tmpdir()), 0);
    CHECK_INT(test_sh("cmp '%s/a.txt' '%s/b.txt'", test_tmpdir(), test_tmpdir()), 0);
    // the streamed text equals the decoded ids (--ids prints them on stderr)
    CHECK_INT(test_sh("%s generate --model '%s/m' --prompt 'The café' --max-new 25 --temperature 0.8 "
                      "--top-p 0.9 --seed 5 --threads 1 > '%s/c.txt'", test_lorakit(), test_tmpdir(),
                      test_tmpdir()), 0);
    CHECK_INT(test_sh("%s generate --model '%s/m' --prompt 'The café' --max-new 25 --temperature 0.8 "
                      "--top-p 0.9 --seed 5 --threads 1 > '%s/d.txt'", test_lorakit(), test_tmpdir(),
                      test_tmpdir()), 0);
    CHECK_INT(test_sh("cmp '%s/c.txt' '%s/d.txt'", test_tmpdir(), test_tmpdir()), 0);
    // bad input
    CHECK_INT(test_sh("%s generate --model '%s/m' --max-new 5", test_lorakit(), test_tmpdir()), 2);
    CHECK_INT(test_sh("%s generate --model '%s/m' --prompt a --chat b", test_lorakit(), test_tmpdir()), 2);
    CHECK_INT(test_sh("%s generate --model '%s/m' --prompt a --top-p 1.5", test_lorakit(), test_tmpdir()), 2);
    CHECK_INT(test_sh("%s generate --model '%s/nope' --prompt a", test_lorakit(), test_tmpdir()), 1);
    CHECK(strstr(test_output(), "lorakit generate: error:"));
    CHECK_INT(test_sh("%s generate --model '%s/m' --prompt a --max-new 2000", test_lorakit(), test_tmpdir()), 2);
    CHECK(strstr(test_output(), "exceeds"));
    CHECK_INT(test_sh("%s generate --help", test_lorakit()), 0);
    CHECK(strstr(test_output(), "--no-cache"));
}

// ---- batches ----

/* A run of the batch test: sequence s, n tokens, what it asks for. */
struct bt_run {
    int s, n;
    int every;   /* all_logits (every token's logits) */
    int targets; /* log-probabilities of the next tokens */
};

/* Four sequences of different lengths and adapters (none, l1, l2, l1) through batched steps that mix
 * chunks and single tokens (a sequence may have two runs in one step), against gen_forward per
 * sequence with the same chunks: the one-token runs equal bit for bit (the batched GEMV), the
 * chunks within float rounding (GEMMs over stacked rows), log-probabilities likewise. */
static void check_batch_vs_single(const struct cfg *c, int dtype)
{
    struct model m;
    struct lora l1 = { 0 }, l2 = { 0 };
    CHECK_OK(fix_model_random(&m, c, 0.4f, 61));
    if (dtype != TENSOR_F32)
        CHECK_OK(model_weights_convert(&m.w, c, dtype, test_err()));
    CHECK_OK(fix_lora_random(&l1, c, (1u << CFG_N_MODULES) - 1, 3, 6.0, 0, 0.0f, 62));
    CHECK_OK(fix_lora_random(&l2, c, (1u << CFG_Q) | (1u << CFG_DOWN), 2, 4.0, 0, 0.0f, 63));
    const struct lora *ad[4] = { NULL, &l1, &l2, &l1 };
    enum { NS = 4, T = 48 };
    int V = c->vocab_size, tok[NS][T];
    int32_t t32[NS][T];
    for (int s = 0; s < NS; s++) {
        fix_tokens(tok[s], T, V, 64 + (uint64_t)s);
        for (int i = 0; i < T; i++)
            t32[s][i] = tok[s][i];
    }
    // the steps: {s, n, every, targets}, n = 0 ends a step
    static const struct bt_run plan[] = {
        { 0, 9, 0, 0 }, { 1, 1, 0, 0 }, { 2, 2, 1, 0 }, { 3, 13, 0, 1 }, { 0, 5, 1, 0 }, { 0, 0, 0, 0 },
        { 0, 1, 0, 0 }, { 1, 7, 1, 0 }, { 2, 1, 0, 1 }, { 3, 1, 0, 0 }, { 3, 3, 0, 0 }, { 0, 0, 0, 0 },
        { 0, 1, 0, 0 }, { 1, 1, 0, 0 }, { 2, 20, 0, 1 }, { 3, 1, 1, 0 }, { 0, 0, 0, 0 },
        { 0, 1, 0, 0 }, { 1, 1, 0, 1 }, { 2, 1, 0, 0 }, { 3, 1, 0, 0 }, { 0, 0, 0, 0 },
    };
    int np = (int)(sizeof plan / sizeof plan[0]);
    struct gen_batch b;
    struct gen_seq seq[NS];
    struct gen_cache gc[NS];
    memset(seq, 0, sizeof seq);
    CHECK_OK(gen_batch_init(&b, c, 40, 3, test_err()));
    for (int s = 0; s < NS; s++) {
        CHECK_OK(gen_seq_reserve(&seq[s], c, 8, test_err())); // grown below, keeping what it holds
        CHECK_OK(gen_cache_init(&gc[s], c, T, 64, 3, test_err()));
    }
    float *got = malloc(sizeof(float) * 40 * V), *ref = malloc(sizeof(float) * 40 * V);
    double lp[40], lref[40];
    int32_t tg[40];
    int filled[NS] = { 0 }, exact_chunks = 0, chunks = 0;
    for (int a = 0, z; a < np && !test_failed(); a = z + 1) {
        struct gen_brun runs[8];
        int nr = 0, at[NS], rows = 0;
        memcpy(at, filled, sizeof at);
        for (z = a; plan[z].n; z++) {
            const struct bt_run *p = &plan[z];
            CHECK_OK(gen_seq_reserve(&seq[p->s], c, at[p->s] + p->n + 2, test_err()));
            struct gen_brun r = { &seq[p->s], ad[p->s], t32[p->s] + at[p->s], p->n, got + (size_t)rows * V,
                                  p->every, NULL, NULL };
            if (p->targets) {
                for (int i = 0; i < p->n; i++)
                    tg[rows + i] = t32[p->s][(at[p->s] + i + 1) % T];
                r.targets = tg + rows;
                r.lp = lp + rows;
            }
            runs[nr++] = r;
            at[p->s] += p->n;
            rows += p->n;
        }
        CHECK_OK(gen_batch_forward(&b, &m, runs, nr, test_err()));
        // the reference: each run through gen_forward on its own cache, in the same order
        for (int j = 0, row = 0; j < nr; row += runs[j].n, j++) {
            const struct bt_run *p = &plan[a + j];
            int every = p->every || (p->targets && p->n > 1);
            CHECK_OK(gen_forward(&gc[p->s], &m, ad[p->s], t32[p->s] + filled[p->s], p->n, every ? ref : NULL, test_err()));
            filled[p->s] += p->n;
            CHECK_INT(seq[p->s].n, at[p->s]);
            const float *want = every ? ref : gc[p->s].logits, *have = got + (size_t)row * V;
            int nrow = p->every ? p->n : 1;
            if (!p->every)
                have = got + (size_t)row * V; // the last token's logits went to the run's [V]
            if (p->n == 1) {
                CHECK_MSG(!memcmp(have, want, sizeof(float) * (size_t)V), "%s: one-token run %d of sequence %d is "
                          "not gen_forward's bit for bit", tensor_dtype_name(dtype), z, p->s);
            } else if (p->every || !p->targets) {
                double r = rel_diff(have, want, (size_t)nrow * V);
                CHECK_MSG(r < 1e-6, "%s: chunk of %d tokens of sequence %d differs from gen_forward by %g",
                          tensor_dtype_name(dtype), p->n, p->s, r);
                exact_chunks += !memcmp(have, want, sizeof(float) * (size_t)nrow * V);
                chunks++;
            }
            for (int i = 0; p->targets && i < p->n; i++) {
                lref[i] = gen_logprob(every ? ref + (size_t)i * V : gc[p->s].logits, V, runs[j].targets[i]);
                CHECK_NEAR(runs[j].lp[i], lref[i], 1e-12 * (1 + fabs(lref[i])));
            }
        }
    }
    CHECK_MSG(chunks > 0, "no chunk compared");
    if (exact_chunks < chunks) // allowed (float rounding), but worth knowing
        fprintf(stderr, "    (%s: %d of %d chunks bit-identical to gen_forward)\n", tensor_dtype_name(dtype),
                exact_chunks, chunks);
    // errors leave everything unchanged: no room, a token outside the vocabulary, too many tokens
    int32_t bad = V, ok = 1;
    struct gen_brun r = { &seq[0], NULL, &ok, 1, NULL, 0, NULL, NULL };
    int n0 = seq[0].n;
    r.n = seq[0].cap - n0 + 1;
    r.tokens = t32[0];
    CHECK(gen_batch_forward(&b, &m, &r, 1, test_err()) == LK_ERR_USAGE);
    r.n = 1;
    r.tokens = &bad;
    CHECK(gen_batch_forward(&b, &m, &r, 1, test_err()) == LK_ERR_USAGE);
    struct gen_brun two[2] = { r, r };
    two[0].tokens = two[1].tokens = t32[1];
    two[0].n = 30;
    two[1].n = 11;
    two[1].seq = &seq[1];
    CHECK_OK(gen_seq_reserve(&seq[0], c, n0 + 31, test_err()));
    CHECK_OK(gen_seq_reserve(&seq[1], c, seq[1].n + 31, test_err()));
    CHECK(gen_batch_forward(&b, &m, two, 2, test_err()) == LK_ERR_USAGE); // 41 > 40 tokens
    CHECK_INT(seq[0].n, n0);
    free(got);
    free(ref);
    for (int s = 0; s < NS; s++) {
        gen_seq_release(&seq[s]);
        gen_cache_release(&gc[s]);
    }
    gen_seq_release(&seq[0]); // harmless twice
    gen_batch_release(&b);
    gen_batch_release(&b);
    lora_release(&l1);
    lora_release(&l2);
    model_release(&m);
}

TEST(gen_batch_matches_gen_forward_per_sequence)
{
    void (*fix[6])(struct cfg *) = { fix_cfg_qwen2, fix_cfg_llama, fix_cfg_qwen3, fix_cfg_llama32, fix_cfg_qwen2,
                                     fix_cfg_llama_bias }; // the last: o_proj with a bias
    static const int dtypes[] = { TENSOR_F32, TENSOR_BF16, TENSOR_F16 };
    for (int f = 0; f < 6 && !test_failed(); f++)
        for (int d = 0; d < 3 && !test_failed(); d++) {
            struct cfg c;
            fix[f](&c);
            if (f == 4) // a vocabulary of several tiles for the streamed log-probabilities
                c.vocab_size = 2 * GEN_STREAM_ROWS + 301;
            check_batch_vs_single(&c, dtypes[d]);
        }
}

/* Small products are padded with zero rows (generate.c, batch_gemm) whatever the step's size: the
 * padding buffer must hold them when the scratch is sized for more rows than the padding needs
 * (the Qwen2.5-0.5B shape at 512 rows aborted there). A model whose products pad to about 1000
 * rows, scratch for 40, 1100 and 3000 rows, chunks of 2 and 3 tokens against gen_forward. */
TEST(gen_batch_pads_small_products_for_any_rows_max)
{
    struct cfg c;
    fix_cfg_qwen2_wide(&c);
    struct model m;
    CHECK_OK(fix_model_random(&m, &c, 0.4f, 71));
    CHECK_OK(model_weights_convert(&m.w, &c, TENSOR_BF16, test_err()));
    int V = c.vocab_size, tok[5];
    int32_t t32[5];
    fix_tokens(tok, 5, V, 72);
    for (int i = 0; i < 5; i++)
        t32[i] = tok[i];
    float *got = malloc(sizeof(float) * 3 * V), *ref = malloc(sizeof(float) * 3 * V);
    static const int rows_max[3] = { 40, 1100, 3000 };
    for (int k = 0; k < 3 && !test_failed(); k++) {
        struct gen_batch b;
        struct gen_seq seq = { 0 };
        struct gen_cache gc;
        CHECK_OK(gen_batch_init(&b, &c, rows_max[k], 0, test_err()));
        CHECK_OK(gen_seq_reserve(&seq, &c, 8, test_err()));
        CHECK_OK(gen_cache_init(&gc, &c, 8, 8, 0, test_err()));
        for (int a = 0, n = 2; a < 5; a += n, n++) {
            struct gen_brun r = { &seq, NULL, t32 + a, n, got, 1, NULL, NULL };
            CHECK_OK(gen_batch_forward(&b, &m, &r, 1, test_err()));
            CHECK_OK(gen_forward(&gc, &m, NULL, t32 + a, n, ref, test_err()));
            double d = rel_diff(got, ref, (size_t)n * V);
            CHECK_MSG(d < 1e-6, "rows_max %d, a chunk of %d: %g from gen_forward", rows_max[k], n, d);
        }
        gen_cache_release(&gc);
        gen_seq_release(&seq);
        gen_batch_release(&b);
    }
    free(got);
    free(ref);
    model_release(&m);
}
