/*
 * test_train.c - `lorakit train` end to end on tiny models the tests make themselves:
 * overfitting, the trained-on span, the global-batch loss, exact resume after SIGKILL,
 * --dump-grads against central differences, the saved adapter against the trainer's own
 * figures, and every bad input the issue names.
 */
#include "test.h"

#include <malloc.h>
#include <math.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "../libcore/chat.h"
#include "../libcore/data.h"
#include "../libcore/lora.h"
#include "../libcore/model.h"
#include "../libcore/st.h"
#include "../libcore/tok.h"
#include "../libcore/train.h"
#include "fix_model.h"
#include "ref_model.h"

/* 20 chat records, a tokenizer trained on them, and a tiny Qwen2 model using it, in tmpdir:
 * chat.jsonl, m/ (model + tokenizer). init_range scales the random weights. */
static int make_fixture(double init_range)
{
    FILE *f = fopen(test_path("chat.jsonl"), "w"), *t = fopen(test_path("text.txt"), "w");
    if (!f || !t)
        return -1;
    for (int i = 0; i < 20; i++) {
        fprintf(f, "{\"messages\":[{\"role\":\"user\",\"content\":\"What is the code of item %d?\"},"
                   "{\"role\":\"assistant\",\"content\":\"Item %d has code %c%d%d.\"}]}\n",
                i, i, 'A' + i, i * 7 % 10, i * 3 % 10);
        for (int k = 0; k < 3; k++)
            fprintf(t, "What is the code of item %d? Item %d has code %c%d%d.\n", i, i, 'A' + i, i * 7 % 10,
                    i * 3 % 10);
    }
    fclose(f);
    fclose(t);
    FILE *c = fopen(test_path("cfg.json"), "w");
    fprintf(c, "{\"architectures\":[\"Qwen2ForCausalLM\"],\"model_type\":\"qwen2\",\"hidden_size\":64,"
               "\"intermediate_size\":128,\"num_hidden_layers\":2,\"num_attention_heads\":4,"
               "\"num_key_value_heads\":2,\"vocab_size\":320,\"rms_norm_eps\":1e-6,\"rope_theta\":10000,"
               "\"tie_word_embeddings\":true,\"max_position_embeddings\":256,\"initializer_range\":%g,"
               "\"torch_dtype\":\"float32\"}\n", init_range);
    fclose(c);
    return test_sh("%s tokenizer train --text '%s/text.txt' --vocab 300 --out '%s/m' && "
                   "%s init --config '%s/cfg.json' --out '%s/m' --overwrite --seed 1 && "
                   "%s tokenizer train --text '%s/text.txt' --vocab 300 --out '%s/m'",
                   test_lorakit(), test_tmpdir(), test_tmpdir(), test_lorakit(), test_tmpdir(), test_tmpdir(),
                   test_lorakit(), test_tmpdir(), test_tmpdir());
}

/* The two losses of "done: N steps in Xs, loss A -> B" in the last output. */
static int done_losses(double *first, double *last)
{
    const char *p = strstr(test_output(), "done: ");
    if (!p)
        return -1;
    p = strstr(p, "loss ");
    return p && sscanf(p, "loss %lf -> %lf", first, last) == 2 ? 0 : -1;
}

TEST(train_lora_overfits_twenty_chat_records)
{
    CHECK_INT(make_fixture(0.3), 0);
    CHECK_INT(test_sh("%s train --model '%s/m' --data '%s/chat.jsonl' --out '%s/ad' --steps 200 --lr 1e-2 "
                      "--rank 16 --alpha 32 --batch 4 --threads 1", test_lorakit(), test_tmpdir(),
                      test_tmpdir(), test_tmpdir()), 0);
    double a, b;
    CHECK_INT(done_losses(&a, &b), 0);
    CHECK_MSG(b < 0.05, "final loss %g (first %g): did not overfit", b, a);
    CHECK(strstr(test_output(), "trainable params: ") && strstr(test_output(), "trainable%: "));
    CHECK(lk_file_exists(test_path("ad/adapter_model.safetensors")));
    CHECK(lk_file_exists(test_path("ad/adapter_config.json")));
    CHECK(!lk_file_exists(test_path("ad/checkpoint-150"))); // no periodic checkpoints asked for
    CHECK(lk_file_exists(test_path("runs.db")));
}

TEST(train_full_overfits_and_keeps_the_tie)
{
    CHECK_INT(make_fixture(0.02), 0);
    CHECK_INT(test_sh("%s train --model '%s/m' --data '%s/chat.jsonl' --out '%s/full' --full --steps 400 --warmup 20 "
                      "--lr 3e-3 --batch 4 --threads 1", test_lorakit(), test_tmpdir(), test_tmpdir(),
                      test_tmpdir()), 0);
    double a, b;
    CHECK_INT(done_losses(&a, &b), 0);
    CHECK_MSG(b < 0.05, "final loss %g (first %g): did not overfit", b, a);
    struct model m;
    CHECK_OK(model_load(&m, test_path("full"), test_err()));
    CHECK(m.cfg.tie_word_embeddings && m.w.lm_head.f == m.w.embed.f);
    struct st_file f;
    CHECK_OK(st_open(&f, test_path("full/model.safetensors"), test_err()));
    CHECK(st_find(&f, "lm_head.weight") == NULL); // tied: one tensor, as the config says
    st_close(&f);
    CHECK(lk_file_exists(test_path("full/tokenizer.json")));
    model_release(&m);
}

TEST(train_labels_are_exactly_the_assistant_text)
{
    CHECK_INT(make_fixture(0.02), 0);
    struct tok *tk;
    CHECK_OK(tok_load(&tk, test_path("m"), test_err()));
    struct data_set d;
    struct data_opts o = { 512, 0, 0, NULL, 0 };
    CHECK_OK(data_load(&d, test_path("chat.jsonl"), tk, &o, test_err()));
    CHECK_INT(d.n, 20);
    for (int i = 0; i < d.n; i++) {
        int32_t ids[256];
        int n = 0;
        for (int t = 0; t < d.ex[i].n; t++)
            if (d.ex[i].labels[t] != -100) {
                CHECK(d.ex[i].labels[t] == d.ex[i].ids[t]);
                ids[n++] = d.ex[i].labels[t];
            }
        char *text;
        size_t len;
        CHECK_OK(tok_decode(tk, ids, (size_t)n, 0, &text, &len, test_err()));
        char want[128];
        snprintf(want, sizeof want, "Item %d has code %c%d%d.<|im_end|>", i, 'A' + i, i * 7 % 10, i * 3 % 10);
        CHECK_MSG(!strcmp(text, want), "record %d trains on '%s', want '%s'", i, text, want);
        // and the trained span is contiguous and at the end (the assistant turn closes the record)
        int first = -1, last = -1;
        for (int t = 0; t < d.ex[i].n; t++)
            if (d.ex[i].labels[t] != -100) {
                if (first < 0)
                    first = t;
                last = t;
            }
        CHECK_INT(last - first + 1, n);
        lk_free(text);
    }
    data_release(&d);
    tok_free(tk);
}

/* Pre-tokenized records for tests that need no tokenizer: ids in [1, 30). */
static void write_pretokenized(const char *name, int n, int len, uint64_t seed)
{
    FILE *f = fopen(test_path(name), "w");
    struct lk_rng rng;
    lk_rng_seed(&rng, seed);
    for (int r = 0; r < n; r++) {
        int L = len - (int)(lk_rng_u64(&rng) % 3);
        fprintf(f, "{\"input_ids\":[");
        for (int i = 0; i < L; i++)
            fprintf(f, "%s%d", i ? "," : "", 1 + (int)(lk_rng_u64(&rng) % 29));
        fprintf(f, "],\"labels\":[");
        for (int i = 0; i < L; i++)
            fprintf(f, "%s%d", i ? "," : "", i < 2 ? -100 : 1 + (int)(lk_rng_u64(&rng) % 29));
        fprintf(f, "]}\n");
    }
    fclose(f);
}

TEST(train_resume_after_sigkill_gives_identical_bytes)
{
    CHECK_INT(test_sh("%s init --preset tiny --out '%s/m' --seed 2", test_lorakit(), test_tmpdir()), 0);
    write_pretokenized("d.jsonl", 24, 12, 5);
    const char *args = "--steps 30 --batch 2 --grad-accum 2 --lr 5e-3 --dropout 0.1 --threads 1 --quiet";
    CHECK_INT(test_sh("%s train --model '%s/m' --data '%s/d.jsonl' --out '%s/full' %s", test_lorakit(),
                      test_tmpdir(), test_tmpdir(), test_tmpdir(), args), 0);
    // the same run, killed with SIGKILL once checkpoint-10 exists, then resumed
    char cmd[2048];
    snprintf(cmd, sizeof cmd, "%s train --model '%s/m' --data '%s/d.jsonl' --out '%s/part' --save-every 10 %s",
             test_lorakit(), test_tmpdir(), test_tmpdir(), test_tmpdir(), args);
    pid_t pid = fork();
    if (pid == 0) {
        execl("/bin/sh", "sh", "-c", cmd, (char *)NULL);
        _exit(127);
    }
    int killed = 0;
    for (int i = 0; i < 3000 && !killed; i++) {
        if (lk_file_exists(test_path("part/checkpoint-10/trainer_state.json"))) {
            kill(pid, SIGKILL);
            killed = 1;
        }
        test_sleep_ms(2);
    }
    int st;
    waitpid(pid, &st, 0);
    if (!killed || !WIFSIGNALED(st))
        SKIP("the run finished before it could be killed (machine too fast for this check)");
    CHECK(!lk_file_exists(test_path("part/adapter_model.safetensors"))); // nothing final yet
    CHECK_INT(test_sh("%s train --model '%s/m' --data '%s/d.jsonl' --out '%s/part' --resume '%s/part' %s",
                      test_lorakit(), test_tmpdir(), test_tmpdir(), test_tmpdir(), test_tmpdir(), args), 0);
    CHECK_INT(test_sh("cmp '%s/full/adapter_model.safetensors' '%s/part/adapter_model.safetensors'",
                      test_tmpdir(), test_tmpdir()), 0);
}

/* Loss over the whole data set as the trainer defines it (one global batch holding every
 * record): sum of token losses / count, from the double reference. */
static double ref_data_loss(struct model *m, struct lora *l, const struct data_set *d)
{
    int T = d->max_len, N = d->n;
    int *tok = calloc((size_t)N * T, sizeof(int)), *tgt = calloc((size_t)N * T, sizeof(int));
    long count = 0;
    for (int r = 0; r < N; r++)
        for (int t = 0; t < T; t++) {
            const struct data_example *e = &d->ex[r];
            tok[r * T + t] = t < e->n ? e->ids[t] : 0;
            tgt[r * T + t] = t + 1 < e->n ? e->labels[t + 1] : -100;
            count += tgt[r * T + t] >= 0;
        }
    double loss = ref_forward(m, l, tok, NULL, NULL, tgt, N, T, 1.0 / (double)count, 0, NULL);
    free(tok);
    free(tgt);
    return loss;
}

TEST(train_dump_grads_match_central_differences)
{
    CHECK_INT(test_sh("%s init --preset tiny --out '%s/m' --seed 4 --dtype f32", test_lorakit(), test_tmpdir()), 0);
    write_pretokenized("d.jsonl", 6, 8, 7);
    struct model m;
    CHECK_OK(model_load(&m, test_path("m"), test_err()));
    // a random starting adapter so that both A and B have gradients
    struct lora l;
    CHECK_OK(fix_lora_random(&l, &m.cfg, (1u << CFG_Q) | (1u << CFG_V) | (1u << CFG_DOWN), 2, 4.0, 0, 0.0f, 8));
    for (size_t i = 0; i < l.n; i++)
        l.mem[i] *= 0.2f;
    CHECK_OK(lora_save(&l, test_path("start"), test_err()));
    // one global batch of all 6 records, split over micro-batches of 2 with grad-accum 3
    CHECK_INT(test_sh("%s train --model '%s/m' --data '%s/d.jsonl' --adapter '%s/start' --batch 2 --grad-accum 3 "
                      "--dump-grads '%s/g.safetensors' --threads 1 --quiet", test_lorakit(), test_tmpdir(),
                      test_tmpdir(), test_tmpdir(), test_tmpdir()), 0);
    struct st_file f;
    CHECK_OK(st_open(&f, test_path("g.safetensors"), test_err()));
    struct data_set d;
    struct data_opts o = { 512, 0, 0, NULL, 0 };
    CHECK_OK(data_load(&d, test_path("d.jsonl"), NULL, &o, test_err()));
    double worst = 0;
    for (int k = 0; k < l.n_mod; k++) {
        struct lora_module *md = &l.mod[k];
        char base[128], nm[160];
        lora_peft_name(md->layer, md->module, base, sizeof base);
        for (int which = 0; which < 2; which++) {
            snprintf(nm, sizeof nm, "%s.%s.weight", base, which ? "lora_B" : "lora_A");
            const struct st_tensor *t = st_find(&f, nm);
            CHECK_MSG(t != NULL, "missing gradient tensor %s", nm);
            float *p = which ? md->B : md->A;
            size_t n = which ? (size_t)md->out * md->R : (size_t)md->R * md->in;
            CHECK(t->numel == n);
            const float *g = (const float *)t->data;
            double num = 0, den = 0;
            for (size_t i = 0; i < n; i += n / 6 + 1) {
                float orig = p[i], h = 3e-4f;
                p[i] = orig + h;
                double up = ref_data_loss(&m, &l, &d);
                float pu = p[i];
                p[i] = orig - h;
                double dn = ref_data_loss(&m, &l, &d);
                float pd = p[i];
                p[i] = orig;
                double fd = (up - dn) / ((double)pu - (double)pd);
                float gi;
                memcpy(&gi, g + i, sizeof gi);
                num += (fd - gi) * (fd - gi);
                den += fd * fd;
            }
            double rel = sqrt(num / (den > 0 ? den : 1));
            if (rel > worst)
                worst = rel;
        }
    }
    fprintf(stderr, "    worst relative gradient error: %.3g\n", worst);
    CHECK_MSG(worst < 1e-3, "dumped gradients differ from central differences: %g", worst);
    st_close(&f);
    data_release(&d);
    lora_release(&l);
    model_release(&m);
}

TEST(train_grad_accumulation_normalises_over_the_global_batch)
{
    CHECK_INT(test_sh("%s init --preset tiny --out '%s/m' --seed 4 --dtype f32", test_lorakit(), test_tmpdir()), 0);
    write_pretokenized("d.jsonl", 4, 10, 9);
    struct model m;
    CHECK_OK(model_load(&m, test_path("m"), test_err()));
    struct lora l;
    CHECK_OK(fix_lora_random(&l, &m.cfg, 1u << CFG_O, 2, 4.0, 0, 0.0f, 10));
    CHECK_OK(lora_save(&l, test_path("start"), test_err()));
    for (int v = 0; v < 2; v++)
        CHECK_INT(test_sh("%s train --model '%s/m' --data '%s/d.jsonl' --adapter '%s/start' --batch %d --grad-accum %d "
                          "--dump-grads '%s/g%d.safetensors' --threads 1 --quiet", test_lorakit(), test_tmpdir(),
                          test_tmpdir(), test_tmpdir(), v ? 1 : 4, v ? 4 : 1, test_tmpdir(), v), 0);
    struct st_file a, b;
    CHECK_OK(st_open(&a, test_path("g0.safetensors"), test_err()));
    CHECK_OK(st_open(&b, test_path("g1.safetensors"), test_err()));
    CHECK_INT(a.n, b.n);
    for (int i = 0; i < a.n; i++) {
        const struct st_tensor *tb = st_find(&b, a.t[i].name);
        CHECK(tb && tb->numel == a.t[i].numel);
        const float *x = a.t[i].data, *y = tb->data;
        for (size_t j = 0; j < a.t[i].numel; j++)
            CHECK_NEAR(x[j], y[j], 1e-5);
    }
    st_close(&a);
    st_close(&b);
    lora_release(&l);
    model_release(&m);
}

TEST(train_saved_adapter_reproduces_the_trainers_eval_loss)
{
    CHECK_INT(test_sh("%s init --preset tiny --out '%s/m' --seed 6 --dtype f32", test_lorakit(), test_tmpdir()), 0);
    write_pretokenized("d.jsonl", 8, 10, 11);
    write_pretokenized("e.jsonl", 5, 9, 12);
    CHECK_INT(test_sh("%s train --model '%s/m' --data '%s/d.jsonl' --eval-data '%s/e.jsonl' --out '%s/ad' "
                      "--steps 6 --batch 4 --lr 1e-2 --threads 1 --log-every 1", test_lorakit(), test_tmpdir(),
                      test_tmpdir(), test_tmpdir(), test_tmpdir()), 0);
    const char *p = strstr(test_output(), "step 6/6");
    CHECK(p != NULL);
    p = strstr(p, "eval ");
    double trainer_eval;
    CHECK(p && sscanf(p, "eval %lf", &trainer_eval) == 1);
    struct model m;
    struct lora l;
    CHECK_OK(model_load(&m, test_path("m"), test_err()));
    CHECK_OK(lora_load(&l, test_path("ad"), &m.cfg, test_err()));
    struct data_set e;
    struct data_opts o = { 512, 0, 0, NULL, 0 };
    CHECK_OK(data_load(&e, test_path("e.jsonl"), NULL, &o, test_err()));
    double mine;
    CHECK_OK(train_eval_loss(&m, &l, &e, 4, &mine, test_err()));
    CHECK_NEAR(mine, trainer_eval, 1e-4); // printed with 4 decimals
    data_release(&e);
    lora_release(&l);
    model_release(&m);
}

// ---- bad input ----

TEST(train_reports_truncated_data_file_with_line)
{
    CHECK_INT(make_fixture(0.02), 0);
    // cut the last record in the middle of its JSON
    CHECK_INT(test_sh("head -c -30 '%s/chat.jsonl' > '%s/cut.jsonl'", test_tmpdir(), test_tmpdir()), 0);
    CHECK_INT(test_sh("%s train --model '%s/m' --data '%s/cut.jsonl' --out '%s/ad'", test_lorakit(),
                      test_tmpdir(), test_tmpdir(), test_tmpdir()), 1);
    CHECK_MSG(strstr(test_output(), "cut.jsonl:20: not a JSON object"), "output: %s", test_output());
    CHECK(!lk_file_exists(test_path("ad")));
    // with --skip-bad the line is skipped and counted
    CHECK_INT(test_sh("%s train --model '%s/m' --data '%s/cut.jsonl' --out '%s/ad' --skip-bad --steps 2 --threads 1",
                      test_lorakit(), test_tmpdir(), test_tmpdir(), test_tmpdir()), 0);
    CHECK(strstr(test_output(), "19 records") && strstr(test_output(), "1 broken lines skipped"));
}

TEST(train_refuses_empty_data_and_records_without_answers)
{
    CHECK_INT(make_fixture(0.02), 0);
    CHECK_INT(test_sh(": > '%s/empty.jsonl'; %s train --model '%s/m' --data '%s/empty.jsonl' --out '%s/ad'",
                      test_tmpdir(), test_lorakit(), test_tmpdir(), test_tmpdir(), test_tmpdir()), 1);
    CHECK(strstr(test_output(), "empty.jsonl: file is empty"));
    CHECK_INT(test_sh("printf '%%s\\n' '{\"messages\":[{\"role\":\"user\",\"content\":\"hi\"}]}' > '%s/noans.jsonl';"
                      "%s train --model '%s/m' --data '%s/noans.jsonl' --out '%s/ad'", test_tmpdir(), test_lorakit(),
                      test_tmpdir(), test_tmpdir(), test_tmpdir()), 1);
    CHECK_MSG(strstr(test_output(), "noans.jsonl:1:") && strstr(test_output(), "assistant"), "output: %s",
              test_output());
    CHECK_INT(test_sh("printf '\\n' > '%s/blank.jsonl'; cat '%s/chat.jsonl' >> '%s/blank.jsonl';"
                      "%s train --model '%s/m' --data '%s/blank.jsonl' --out '%s/ad'", test_tmpdir(), test_tmpdir(),
                      test_tmpdir(), test_lorakit(), test_tmpdir(), test_tmpdir(), test_tmpdir()), 1);
    CHECK(strstr(test_output(), "blank.jsonl:1: empty line"));
    CHECK(!lk_file_exists(test_path("ad")));
}

TEST(train_truncates_long_records_and_counts_them)
{
    CHECK_INT(make_fixture(0.02), 0);
    CHECK_INT(test_sh("%s train --model '%s/m' --data '%s/chat.jsonl' --out '%s/ad' --seq 36 --steps 2 --threads 1",
                      test_lorakit(), test_tmpdir(), test_tmpdir(), test_tmpdir()), 0);
    CHECK_MSG(strstr(test_output(), "20 truncated to 36 tokens"), "output: %s", test_output());
    CHECK(strstr(test_output(), "x 36 tokens"));
}

TEST(train_refuses_existing_output_without_overwrite)
{
    CHECK_INT(make_fixture(0.02), 0);
    const char *fmt = "%s train --model '%s/m' --data '%s/chat.jsonl' --out '%s/ad' --steps 2 --threads 1 %s";
    CHECK_INT(test_sh(fmt, test_lorakit(), test_tmpdir(), test_tmpdir(), test_tmpdir(), ""), 0);
    CHECK_INT(test_sh("cksum '%s/ad/adapter_model.safetensors' > '%s/sum1'", test_tmpdir(), test_tmpdir()), 0);
    CHECK_INT(test_sh(fmt, test_lorakit(), test_tmpdir(), test_tmpdir(), test_tmpdir(), "--seed 9"), 1);
    CHECK(strstr(test_output(), "output folder exists") && strstr(test_output(), "--overwrite"));
    CHECK_INT(test_sh("cksum '%s/ad/adapter_model.safetensors' | cmp - '%s/sum1'", test_tmpdir(), test_tmpdir()), 0);
    CHECK_INT(test_sh(fmt, test_lorakit(), test_tmpdir(), test_tmpdir(), test_tmpdir(), "--seed 9 --overwrite"), 0);
}

TEST(train_help_shows_defaults)
{
    CHECK_INT(test_sh("%s train --help", test_lorakit()), 0);
    CHECK(strstr(test_output(), "default 8") && strstr(test_output(), "default 16") &&
          strstr(test_output(), "2e-4"));
    CHECK_INT(test_sh("%s train --model x --data y --out z --rank abc", test_lorakit()), 2);
}

TEST(train_dora_writes_magnitudes_that_load_and_run)
{
    CHECK_INT(test_sh("%s init --preset tiny --out '%s/m' --seed 3 --dtype f32", test_lorakit(), test_tmpdir()), 0);
    write_pretokenized("d.jsonl", 8, 10, 13);
    CHECK_INT(test_sh("%s train --model '%s/m' --data '%s/d.jsonl' --out '%s/ad' --dora --steps 4 --lr 1e-2 "
                      "--threads 1", test_lorakit(), test_tmpdir(), test_tmpdir(), test_tmpdir()), 0);
    double a, b;
    CHECK_INT(done_losses(&a, &b), 0);
    CHECK_MSG(b < a, "DoRA training did not lower the loss: %g -> %g", a, b);
    struct model m;
    struct lora l;
    CHECK_OK(model_load(&m, test_path("m"), test_err()));
    CHECK_OK(lora_load(&l, test_path("ad"), &m.cfg, test_err()));
    CHECK(l.cfg.use_dora && l.mod[0].mag != NULL);
    // the magnitudes moved away from ||W|| (they are trained)
    struct lora_module *md = &l.mod[0];
    double moved = 0;
    const float *W = m.w.layer[md->layer].wq.f;
    for (int o = 0; o < md->out; o++) {
        double ss = 0;
        for (int i = 0; i < md->in; i++)
            ss += (double)W[(size_t)o * md->in + i] * W[(size_t)o * md->in + i];
        moved = fmax(moved, fabs(md->mag[o] - sqrt(ss)));
    }
    CHECK_MSG(moved > 1e-6, "magnitudes did not change");
    CHECK_INT(test_sh("%s logits --model '%s/m' --adapter '%s/ad' --tokens 1,2,3 --out '%s/l.st'", test_lorakit(),
                      test_tmpdir(), test_tmpdir(), test_tmpdir()), 0);
    CHECK_INT(test_sh("%s train --model '%s/m' --data '%s/d.jsonl' --out '%s/ad2' --dora --dropout 0.1 --steps 1",
                      test_lorakit(), test_tmpdir(), test_tmpdir(), test_tmpdir()), 2);
    lora_release(&l);
    model_release(&m);
}

TEST(train_unknown_dtype_is_a_usage_error)
{
    // checked with the other enum flags, before the model is even opened
    CHECK_INT(test_sh("%s train --model '%s/none' --data '%s/none.jsonl' --out '%s/o' --full --dtype f8",
                      test_lorakit(), test_tmpdir(), test_tmpdir(), test_tmpdir()), 2);
    CHECK_MSG(strstr(test_output(), "lorakit train: error: unknown --dtype 'f8' (auto, f32, bf16, f16)"), "%s",
              test_output());
    CHECK(!lk_file_exists(test_path("o")));
    CHECK_INT(test_sh("%s train --model '%s/none' --data '%s/none.jsonl' --out '%s/o' --init kaiming",
                      test_lorakit(), test_tmpdir(), test_tmpdir(), test_tmpdir()), 2);
    CHECK(strstr(test_output(), "unknown --init 'kaiming' (default, gaussian, pissa)"));
}

/* Bytes the process holds from malloc (0 under a sanitizer, whose allocator glibc does not see:
 * LeakSanitizer checks those builds). */
static size_t heap_in_use(void)
{
    struct mallinfo2 mi = mallinfo2();
    return mi.uordblks + mi.hblkhd;
}

/* The Nth allocation of a full fine-tune's train_run fails, for every N until the run succeeds:
 * LK_ERR_NOMEM each time and nothing kept (the gradient block once leaked when the weights-shaped
 * gradient could not be allocated). */
TEST(train_allocation_failures_leak_nothing)
{
    CHECK_INT(test_sh("%s init --preset tiny --out '%s/m' --seed 4 --dtype f32", test_lorakit(), test_tmpdir()), 0);
    write_pretokenized("d.jsonl", 6, 10, 3);
    struct model m;
    struct data_set d;
    struct data_opts dop = { 64, 0, 0, NULL, 0 };
    CHECK_OK(model_load(&m, test_path("m"), test_err()));
    CHECK_OK(data_load(&d, test_path("d.jsonl"), NULL, &dop, test_err()));
    struct train_opts o;
    train_opts_default(&o);
    o.steps = 1;
    o.batch = 2;
    o.seq = 16;
    struct train_state st;
    CHECK_OK(train_run(&o, &m, NULL, &d, NULL, NULL, NULL, &st, test_err())); // warm-up: BLAS, the plan
    size_t block = sizeof(float) * m.w.n;
    int done = 0;
    long n;
    for (n = 1; n < 1000 && !done; n++) {
        struct lk_err e = { 0 };
        size_t before = heap_in_use();
        lk_fail_countdown = n;
        int rc = train_run(&o, &m, NULL, &d, NULL, NULL, NULL, &st, &e);
        lk_fail_countdown = 0;
        size_t after = heap_in_use();
        done = rc == LK_OK;
        CHECK_MSG(done || rc == LK_ERR_NOMEM, "allocation %ld: status %d: %s", n, rc, e.msg);
        CHECK_MSG(after < before + block / 2, "allocation %ld failed and %zu bytes stayed allocated", n,
                  after - before);
    }
    CHECK_MSG(done, "no run succeeded after %ld failed allocations", n);
    data_release(&d);
    model_release(&m);
}
