/*
 * bench_eval.c - generation and eval timings, through the lorakit binary (argv[1]).
 *
 * 1. Generation tokens/s with the KV cache against --no-cache (the whole prefix recomputed
 *    per token), in the same run, on the same model, prompt and greedy tokens (checked equal).
 * 2. `lorakit eval` of 200 questions x 4 modes (base, rag k=3, ft, ft+rag), target < 2 min.
 *
 * The model: datasets/base-model/ when it exists (the project's own small base model, with
 * the medworld questions and documents from datasets/out/new when present); otherwise a
 * `lorakit init` Qwen2 of about 5M parameters (hidden 256, 6 layers, vocab 2000) with a
 * tokenizer trained on generated documents. The tuned model is a LoRA adapter from a few
 * training steps: its quality does not matter for timing. Everything runs in a temp folder.
 * Threads: OPENBLAS_NUM_THREADS / OMP_NUM_THREADS as given (the Makefile target uses 2).
 * Exit status 1 when the eval takes 2 minutes or more, or the cached and recomputed tokens differ.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <unistd.h>

#include "../libcore/lk.h"

static const char *L;

/* CPU seconds (user + system) used by finished child processes so far. */
static double child_cpu(void)
{
    struct rusage u;
    if (getrusage(RUSAGE_CHILDREN, &u))
        return 0;
    return (double)u.ru_utime.tv_sec + u.ru_utime.tv_usec * 1e-6 + (double)u.ru_stime.tv_sec +
           u.ru_stime.tv_usec * 1e-6;
}
static char dir[256];

static int sh(const char *fmt, const char *a, const char *b)
{
    char cmd[4096];
    snprintf(cmd, sizeof cmd, fmt, a, b);
    int rc = system(cmd);
    if (rc != 0)
        fprintf(stderr, "bench_eval: command failed (%d): %s\n", rc, cmd);
    return rc;
}

static const char *const SYL[24] = { "bor", "ka", "mi", "tel", "ros", "vu", "pan", "di", "lek", "so", "mar", "tu",
                                     "gin", "fe", "lo", "zan", "pe", "ri", "dol", "nu", "ve", "sak", "om", "ti" };
static const char *const WORDS[16] = { "patients", "dose", "weekly", "liver", "treatment", "rare", "chronic",
                                       "tablet", "infusion", "adults", "children", "kidney", "symptom", "fever",
                                       "approved", "trial" };

/* 300 documents of about 60 words, 200 questions whose answer is in one of them. */
static int make_data(void)
{
    char p[512];
    snprintf(p, sizeof p, "%s/docs.jsonl", dir);
    FILE *d = fopen(p, "w");
    snprintf(p, sizeof p, "%s/qa.jsonl", dir);
    FILE *q = fopen(p, "w");
    snprintf(p, sizeof p, "%s/text.txt", dir);
    FILE *t = fopen(p, "w");
    snprintf(p, sizeof p, "%s/train.jsonl", dir);
    FILE *tr = fopen(p, "w");
    if (!d || !q || !t || !tr)
        return -1;
    struct lk_rng rng;
    lk_rng_seed(&rng, 7);
    for (int i = 0; i < 300; i++) {
        char name[32] = "", text[2048];
        for (int s = 0; s < 3; s++)
            strcat(name, SYL[lk_rng_u64(&rng) % 24]);
        int dose = 5 + (int)(lk_rng_u64(&rng) % 95);
        int off = snprintf(text, sizeof text, "%s%d is given at %d mg.", name, i, dose);
        for (int w = 0; w < 50; w++)
            off += snprintf(text + off, sizeof text - off, " %s", WORDS[lk_rng_u64(&rng) % 16]);
        fprintf(d, "{\"id\":\"d%d\",\"title\":\"%s%d\",\"text\":\"%s.\"}\n", i, name, i, text);
        fprintf(t, "%s.\nWhat is the dose of %s%d? %d mg\n", text, name, i, dose);
        if (i < 200)
            fprintf(q, "{\"id\":\"q%d\",\"question\":\"What is the dose of %s%d?\",\"answer\":\"%d mg\","
                       "\"doc_id\":\"d%d\"}\n", i, name, i, dose, i);
        else
            fprintf(tr, "{\"instruction\":\"What is the dose of %s%d?\",\"input\":\"\",\"output\":\"%d mg\"}\n",
                    name, i, dose);
    }
    return fclose(d) | fclose(q) | fclose(t) | fclose(tr);
}

/* Runs generate with --stats and returns tokens/s (parsed from stderr); out gets the text. */
static double gen_rate(const char *model, const char *extra, const char *outname, int *ntok)
{
    char cmd[2048], errp[512];
    snprintf(errp, sizeof errp, "%s/%s.err", dir, outname);
    snprintf(cmd, sizeof cmd, "%s generate --model '%s' --prompt 'What is the dose of borkami1? It is' "
             "--max-new 200 --stats %s > '%s/%s.txt' 2> '%s'", L, model, extra, dir, outname, errp);
    if (system(cmd) != 0)
        return -1;
    FILE *f = fopen(errp, "r");
    char line[512] = "";
    double rate = -1;
    while (f && fgets(line, sizeof line, f)) {
        const char *p = strstr(line, "generated ");
        double secs;
        if (p && sscanf(p, "generated %d tokens in %lfs (%lf", ntok, &secs, &rate) == 3)
            break;
    }
    if (f)
        fclose(f);
    return rate;
}

int main(int argc, char **argv)
{
    L = argc > 1 ? argv[1] : "bin/lorakit";
    setvbuf(stdout, NULL, _IOLBF, 0);
    const char *threads = getenv("OPENBLAS_NUM_THREADS");
    snprintf(dir, sizeof dir, "%s/lorakit-bench-eval-%ld", getenv("TMPDIR") ? getenv("TMPDIR") : "/tmp",
             (long)getpid());
    char model[512], qa[512], docs[512];
    if (sh("rm -rf '%s' && mkdir -p '%s'", dir, dir))
        return 1;
    int own = lk_file_exists("datasets/base-model/config.json");
    if (own) {
        snprintf(model, sizeof model, "datasets/base-model");
        printf("model: datasets/base-model (the project's base model)\n");
    } else {
        snprintf(model, sizeof model, "%s/m", dir);
        char cfg[512];
        snprintf(cfg, sizeof cfg, "%s/cfg.json", dir);
        FILE *c = fopen(cfg, "w");
        if (!c)
            return 1;
        fprintf(c, "{\"architectures\":[\"Qwen2ForCausalLM\"],\"model_type\":\"qwen2\",\"hidden_size\":256,"
                   "\"intermediate_size\":688,\"num_hidden_layers\":6,\"num_attention_heads\":4,"
                   "\"num_key_value_heads\":2,\"vocab_size\":2000,\"rms_norm_eps\":1e-6,\"rope_theta\":10000,"
                   "\"tie_word_embeddings\":true,\"max_position_embeddings\":512,\"initializer_range\":0.02,"
                   "\"torch_dtype\":\"float32\"}\n");
        fclose(c);
    }
    if (make_data())
        return 1;
    int med = own && lk_file_exists("datasets/out/new/qa_test.jsonl");
    snprintf(qa, sizeof qa, med ? "datasets/out/new/qa_test.jsonl" : "%s/qa.jsonl", dir);
    snprintf(docs, sizeof docs, med ? "datasets/out/new/docs.jsonl" : "%s/docs.jsonl", dir);
    if (!own) {
        char cmd[2048];
        snprintf(cmd, sizeof cmd, "%s init --config '%s/cfg.json' --out '%s' --seed 1 > /dev/null && "
                 "%s tokenizer train --text '%s/text.txt' --vocab 2000 --out '%s' > /dev/null 2>&1",
                 L, dir, model, L, dir, model);
        if (system(cmd))
            return 1;
        printf("model: lorakit init Qwen2, hidden 256, 6 layers, vocab 2000, about 4.9M parameters "
               "(datasets/base-model/ absent)\n");
    }
    printf("threads: OPENBLAS_NUM_THREADS=%s\n", threads ? threads : "(unset)");

    // 1. generation with and without the cache
    int n1 = 0, n2 = 0;
    double r1 = gen_rate(model, "", "cache", &n1), r2 = gen_rate(model, "--no-cache", "nocache", &n2);
    if (r1 < 0 || r2 < 0)
        return 1;
    char a[600], b[600];
    snprintf(a, sizeof a, "%s/cache.txt", dir);
    snprintf(b, sizeof b, "%s/nocache.txt", dir);
    int same = sh("cmp -s '%s' '%s'", a, b) == 0;
    printf("generate, %d tokens after a 12-token prompt: KV cache %.0f tokens/s, no cache %.0f tokens/s "
           "(%.1fx), same text: %s\n", n1, r1, r2, r1 / r2, same ? "yes" : "NO");

    // 2. eval, 200 questions x 4 modes
    char cmd[4096];
    snprintf(cmd, sizeof cmd, "%s train --model '%s' --data '%s/train.jsonl' --out '%s/ad' --steps 3 --rank 8 "
             "--runs '%s/runs.db' --quiet > /dev/null", L, model, dir, dir, dir);
    if (system(cmd))
        return 1;
    snprintf(cmd, sizeof cmd, "%s eval --model '%s' --adapter '%s/ad' --qa '%s' --docs '%s' --limit 200 --k 3 "
             "--max-new 8 --runs '%s/runs.db' --quiet > '%s/eval.txt'", L, model, dir, qa, docs, dir, dir);
    double t0 = lk_now(), c0 = child_cpu();
    int rc = system(cmd);
    double secs = lk_now() - t0, cpu = child_cpu() - c0;
    if (rc)
        return 1;
    snprintf(cmd, sizeof cmd, "cat '%s/eval.txt'", dir);
    if (system(cmd))
        return 1;
    printf("eval, 200 questions x 4 modes (base, rag k=3, ft, ft+rag), max-new 8: %.1f s wall, %.1f s CPU "
           "(target < 120 s wall): %s\n", secs, cpu, secs < 120 ? "ok" : "MISSED");
    double load[1] = { 0 };
    FILE *la = fopen("/proc/loadavg", "r");
    if (la) {
        if (fscanf(la, "%lf", &load[0]) != 1)
            load[0] = 0;
        fclose(la);
        printf("load average during the run: %.1f (other jobs share the cores; wall times scale with it)\n", load[0]);
    }
    sh("rm -rf '%s'%s", dir, "");
    return secs < 120 && same ? 0 : 1;
}
