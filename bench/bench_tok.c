/*
 * bench_tok.c - tokenizer encoding throughput on the Qwen tokenizer, single thread, against
 * the JavaScript reference (@huggingface/tokenizers via tests/tok_ref.mjs) in the same run.
 * Usage: bench_tok SHARED_DIR   (run by `make bench-tok` from the repository root)
 * The text: ~2.5 MB of English prose, English medical QA, Chinese medical QA and C sources,
 * encoded in 64 KB pieces cut at newlines (the same pieces for both).
 */
#include <glob.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../libcore/lk.h"
#include "../libcore/tok.h"

static char *corpus;
static size_t corpus_n, corpus_cap;

static void add(const char *path, size_t max)
{
    char *b;
    size_t n;
    if (lk_read_file(path, &b, &n, NULL))
        return;
    if (n > max) {
        n = max;
        while (n && b[n - 1] != '\n')
            n--;
    }
    if (corpus_n + n + 1 > corpus_cap) {
        corpus_cap = (corpus_n + n + 1) * 2;
        corpus = realloc(corpus, corpus_cap);
    }
    memcpy(corpus + corpus_n, b, n);
    corpus_n += n;
    corpus[corpus_n] = 0;
    lk_free(b);
}

/* One pass over the corpus in 64 KB pieces; returns seconds, sets *ntok. */
static double pass(struct tok *t, size_t *ntok)
{
    struct lk_err err = { 0 };
    struct tok_ids ids = { 0 };
    double t0 = lk_now();
    *ntok = 0;
    for (size_t i = 0; i < corpus_n;) {
        size_t j = i + 65536 < corpus_n ? i + 65536 : corpus_n;
        while (j < corpus_n && corpus[j - 1] != '\n')
            j++;
        ids.n = 0;
        if (tok_encode(t, corpus + i, j - i, 1, &ids, &err)) {
            fprintf(stderr, "bench_tok: %s\n", err.msg);
            exit(1);
        }
        *ntok += ids.n;
        i = j;
    }
    double dt = lk_now() - t0;
    tok_ids_release(&ids);
    return dt;
}

int main(int argc, char **argv)
{
    const char *shared = argc > 1 ? argv[1] : "../shared";
    char dir[1024], p[1200];
    snprintf(dir, sizeof dir, "%s/data/tokenizers/qwen3", shared);
    snprintf(p, sizeof p, "%s/tokenizer.json", dir);
    if (!lk_file_exists(p)) {
        printf("bench-tok: skipped: %s is not there (set LK_SHARED)\n", p);
        return 0;
    }
    snprintf(p, sizeof p, "%s/data/standard-ebooks-en/valid.txt", shared);
    add(p, 600000);
    snprintf(p, sizeof p, "%s/data/medquad/dev.jsonl", shared);
    add(p, 900000);
    snprintf(p, sizeof p, "%s/data/zh-medical/qa.jsonl", shared);
    add(p, 700000);
    glob_t g;
    if (glob("libcore/*.c", 0, NULL, &g) == 0)
        for (size_t i = 0; i < g.gl_pathc; i++)
            add(g.gl_pathv[i], 1 << 20);
    globfree(&g);
    struct lk_err err = { 0 };
    struct tok *t;
    double t0 = lk_now();
    if (tok_load(&t, dir, &err)) {
        fprintf(stderr, "bench_tok: %s\n", err.msg);
        return 1;
    }
    double load = lk_now() - t0;
    size_t ntok, ntok2;
    double cold = pass(t, &ntok), warm = pass(t, &ntok2);
    double mb = (double)corpus_n / 1e6;
    printf("bench-tok: Qwen3 tokenizer, %.2f MB of text (%zu tokens), 1 thread\n", mb, ntok);
    printf("  lorakit  load %.2fs, encode %.2f MB/s (cold word cache), %.2f MB/s (warm)\n", load, mb / cold,
           mb / warm);
    const char *tmp = "build/bench_tok_corpus.txt";
    if (lk_write_file_atomic(tmp, corpus, corpus_n, &err)) {
        fprintf(stderr, "bench_tok: %s\n", err.msg);
        return 1;
    }
    char cmd[2400];
    snprintf(cmd, sizeof cmd, "node tests/tok_ref.mjs '%s' --bench '%s' 2>/dev/null", dir, tmp);
    FILE *f = lk_file_exists("build/node/node_modules/@huggingface/tokenizers/package.json") ? popen(cmd, "r") : NULL;
    double ref = 0;
    long ref_tok = 0;
    if (f) {
        if (fscanf(f, "MB/s %lf tokens %ld", &ref, &ref_tok) != 2)
            ref = 0;
        pclose(f);
    }
    remove(tmp);
    if (ref > 0) {
        printf("  node @huggingface/tokenizers 0.2.0: encode %.2f MB/s (%ld tokens%s)\n", ref, ref_tok,
               (size_t)ref_tok == ntok ? ", same count" : ", COUNT DIFFERS");
        printf("  ratio lorakit/node: %.1fx (cold), %.1fx (warm)\n", mb / cold / ref, mb / warm / ref);
    } else {
        printf("  node reference: skipped (no node or build/node; make node-ref)\n");
    }
    tok_free(t);
    free(corpus);
    return 0;
}
