/*
 * test_basemodel.c - the committed base model (datasets/base-model, built by `make base-model`)
 * is what the demo and the model card say: a 3.1 M-parameter Qwen2 in bf16 whose tokenizer
 * matches it (the chatml template, eos <|im_end|>), under the 30 MB the issue allows.
 */
#include "test.h"

#include <sys/stat.h>

#include "../libcore/cfg.h"
#include "../libcore/chat.h"
#include "../libcore/lk.h"
#include "../libcore/model.h"
#include "../libcore/tok.h"

#define BASEMODEL_DIR "datasets/base-model"

TEST(basemodel_committed_folder)
{
    if (!lk_file_exists(BASEMODEL_DIR "/config.json"))
        SKIP("no %s (run from the repository root)", BASEMODEL_DIR);
    struct cfg c;
    CHECK_OK(cfg_load(&c, BASEMODEL_DIR, test_err()));
    CHECK(c.hidden_size == 256 && c.intermediate_size == 688 && c.num_hidden_layers == 4);
    CHECK(c.num_attention_heads == 4 && c.num_key_value_heads == 2 && c.tie_word_embeddings);
    CHECK_INT(model_param_count(&c), 3100928);
    struct stat sb;
    CHECK(stat(BASEMODEL_DIR "/model.safetensors", &sb) == 0);
    CHECK(sb.st_size < 30L * 1000 * 1000);
    CHECK(sb.st_size > 2L * 3100928 && sb.st_size < 2L * 3100928 + 65536); /* bf16 + the JSON header */
    struct tok *tk = NULL;
    CHECK_OK(tok_load(&tk, BASEMODEL_DIR, test_err()));
    int vocab = tok_vocab_size(tk), eos = tok_eos(tk), im_end = tok_find(tk, "<|im_end|>");
    struct chat_fmt f;
    int fmt_rc = chat_fmt_init(&f, tk, NULL, test_err());
    tok_free(tk);
    CHECK_INT(vocab, c.vocab_size);
    CHECK_INT(eos, im_end);
    CHECK_INT(fmt_rc, 0);
    CHECK_INT(f.kind, CHAT_CHATML);
    cfg_release(&c);
}
