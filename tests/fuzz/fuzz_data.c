/* fuzz_data.c - training JSONL through data_load (every format: chat, alpaca, text,
 * pre-tokenized), with a small byte-level BPE trained once at start-up. The first input byte
 * picks the options (train_on_prompt, skip_bad, template, maximum length); the rest is the
 * file. Every id and label of a loaded set must lie inside the vocabulary (or be -100). */
#include "fuzz_util.h"

#include "../../libcore/data.h"
#include "../../libcore/tok.h"

static struct tok *tk;

static void setup(void)
{
    if (tk)
        return;
    static const char text[] =
        "The patient has a fever and a cough. Take two tablets every day.\n"
        "Le patient a de la fi\xc3\xa8vre. \xe7\x97\x85\xe4\xba\xba\xe5\x8f\x91\xe7\x83\xad\xe3\x80\x82\n"
        "hello world hello world the the the of of and and\n";
    char tdir[600], tfile[600];
    snprintf(tfile, sizeof tfile, "%s", fz_path("corpus.txt"));
    snprintf(tdir, sizeof tdir, "%s", fz_path("tok"));
    fz_write(tfile, text, sizeof text - 1);
    const char *files[1] = { tfile };
    struct tok_train_opts o = { files, 1, 300, NULL, 0, 0 };
    struct lk_err err = { 0 };
    if (tok_train(&o, tdir, &err) || tok_load(&tk, tdir, &err)) {
        fprintf(stderr, "fuzz_data: %s\n", err.msg);
        abort();
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    setup();
    if (size < 1)
        return 0;
    static const char *const tmpl[8] = { NULL,    "chatml",        "llama3",   "plain",
                                         "qwen3", "qwen3-nothink", "llama3.2", "chatml" };
    static const int seqs[4] = { 0, 2, 16, 512 };
    struct data_opts o = { 0 };
    o.train_on_prompt = data[0] & 1;
    o.skip_bad = (data[0] >> 1) & 1;
    o.template_name = tmpl[((data[0] >> 2) & 3) | ((data[0] >> 4) & 4)];
    o.seq = seqs[(data[0] >> 4) & 3];
    o.vocab = tok_vocab_size(tk);
    const char *path = fz_path("data.jsonl");
    char p[600];
    snprintf(p, sizeof p, "%s", path);
    fz_write(p, data + 1, size - 1);
    struct data_set d;
    struct lk_err err = { 0 };
    int rc = data_load(&d, p, tk, &o, &err);
    fz_check_err(rc, &err);
    if (!rc) {
        for (size_t i = 0; i < d.n_tokens; i++) {
            if (d.ids[i] < 0 || d.ids[i] >= o.vocab)
                abort();
            if (d.labels[i] != -100 && (d.labels[i] < 0 || d.labels[i] >= o.vocab))
                abort();
        }
        data_release(&d);
    }
    return 0;
}
