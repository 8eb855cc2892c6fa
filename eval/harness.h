/*
 * harness.h - the eval harness: the same questions in four modes, scored and summarised.
 *
 *   base    the base model, closed book (the question alone in the chat template)
 *   rag     the base model with the top-k FTS5 passages before the question
 *   ft      the tuned model (base + adapter, or a fine-tuned model folder), closed book
 *   ft+rag  the tuned model with the passages
 *
 * With several k (a sweep), the retrieval modes are named "rag@k" and "ft+rag@k" (k = 0 is
 * base / ft itself and is not repeated).
 *
 * The rag prompt is the user message
 *     "Context:\n<p1>\n\n<p2>...\n\nQuestion: <q>"
 * (passages: the chunks' text, best first, without titles): the format the project's base model
 * learned reading comprehension on (datasets/README.md). It must fit max_ctx - max_new tokens:
 * the lowest-ranked passages are dropped first; when even the best passage alone is too long,
 * it is cut (at a UTF-8 character boundary) to what fits.
 *
 * Per item and mode (struct ev_cell): the greedy answer (up to max_new tokens, stopping at the
 * template's end of turn or eos); exact match, token F1 and ROUGE-L against the reference after
 * SQuAD normalisation (eval/metrics.h); the teacher-forced negative log-likelihood per token of
 * the reference answer given the prompt (the answer's tokens, without end of turn); recall@k
 * when the item names its doc_id (any of the k retrieved chunks comes from that document);
 * answer@k, whether the normalised reference occurs in a passage of the prompt (whatever
 * document it came from; the best passage counts whole even when the prompt had to cut it).
 * Multiple-choice items ({question, choices, answer_index}) are scored as lm-evaluation-harness
 * does: the summed log-likelihood of each choice given the prompt, the highest (lowest index
 * on ties) is the answer, accuracy is 1 when it is answer_index. No sampling anywhere: results
 * are deterministic.
 *
 * The KV cache of libcore/generate.h serves all of it: the prompt is prefilled once, then the
 * reference answer and each choice are scored by rewinding the cache to the prompt's end.
 */
#ifndef LK_EV_HARNESS_H
#define LK_EV_HARNESS_H

#include <stddef.h>
#include <stdint.h>

#include "../libcore/chat.h"
#include "../libcore/generate.h"
#include "../libcore/lk.h"
#include "../libcore/lora.h"
#include "../libcore/model.h"
#include "../libcore/rdb.h"
#include "../libcore/tok.h"
#include "fts.h"
#include "metrics.h"

// ---- questions ----

struct ev_item {
    char *id;          /* owned: the "id" field (string or number), else "line N" */
    char *question;    /* owned */
    char *answer;      /* owned: the reference, or NULL for a multiple-choice item */
    char *doc_id;      /* owned: the source document, or NULL */
    char **choices;    /* owned [n_choices] (multiple choice), or NULL */
    int n_choices;
    int answer_index;  /* multiple choice: the right choice */
    int line;          /* 1-based line in the file */
};

struct ev_qa {
    struct ev_item *items; /* owned [n] */
    int n;
    int n_mc;              /* items that are multiple choice */
};

/* Reads a QA JSONL file: one object per line, {"question", "answer"} or {"question",
 * "choices": [strings, at least 2], "answer_index"}, optional "id" and "doc_id" (other fields
 * ignored, blank lines skipped). At most limit items (<= 0: all). A line that is not a JSON
 * object, a missing or mistyped field, an answer_index out of range or a duplicate id is
 * LK_ERR_FORMAT naming file:line. An empty file is an error too. */
int ev_qa_load(struct ev_qa *qa, const char *path, int limit, struct lk_err *err);
void ev_qa_release(struct ev_qa *qa); /* NULL-safe, harmless twice */

// ---- prompts ----

/* The rag user message for k passages (k = 0: the question alone), in a fresh lk_malloc'ed
 * string (NULL on OOM). */
char *ev_rag_text(const char *question, const char *const *passages, int k);

/* The chat prompt of a question with up to k passages, fitted into max_tokens as described
 * above. *out_used is the number of passages kept (the last one possibly cut). Fails
 * (LK_ERR_USAGE) only when the question alone does not fit. */
int ev_prompt_build(struct tok *tk, const struct chat_fmt *fmt, const char *question,
                    const char *const *passages, int k, int max_tokens, struct tok_ids *out,
                    int *out_used, struct lk_err *err);

// ---- modes ----

struct ev_mode {
    char name[32];     /* "base", "rag", "ft", "ft+rag", "rag@3", "lora+rag@3", ... */
    int tuned;         /* 0: the base; s + 1: the tuned system s (1 with one system) */
    int k;             /* passages (0: closed book) */
};

#define EV_MAX_K 32 /* values of k in one sweep */

/* Parses "3" or "0,1,3,5" into ks (room for EV_MAX_K): each k in [0, 64], at most EV_MAX_K of
 * them; LK_ERR_USAGE naming the bad value otherwise. */
int ev_k_parse(const char *s, int *ks, int *nk, struct lk_err *err);

/* Parses a comma-separated list of base, rag, ft, ft+rag and a list of k (ks[nk], each >= 0)
 * into modes, in the order base, rag..., ft, ft+rag... (only those listed). A single k names
 * the retrieval modes "rag"/"ft+rag"; several name them "rag@k"/"ft+rag@k" and skip k = 0.
 * *out is lk_malloc'ed. LK_ERR_USAGE for an unknown or repeated mode. */
int ev_modes_parse(const char *list, const int *ks, int nk, struct ev_mode **out, int *n,
                   struct lk_err *err);

/* The tuned modes (tuned = 1) repeated once per system (tuned = s + 1), named after it: "ft" becomes
 * "NAME", "ft+rag@3" "NAME+rag@3". Order: the base modes, then each system's modes in turn.
 * With the one system named "ft" the list is the input's. *out is lk_malloc'ed. */
int ev_modes_expand(const struct ev_mode *in, int n_in, const char *const *names, int n_sys,
                    struct ev_mode **out, int *n, struct lk_err *err);

// ---- systems ----

#define EV_SYS_NAME_MAX 24 /* bytes of a system name, NUL included */

/* One tuned system: a PEFT adapter on the base, or a model folder of the base's architecture.
 * --adapter and --tuned are the system named "ft". */
struct ev_system {
    char name[EV_SYS_NAME_MAX];
    const char *path;          /* borrowed: as given */
    int is_adapter;            /* 1: PATH holds adapter_config.json */
    struct model own;          /* owned: the model folder, or the base with the adapter's
                                * modules_to_save applied; empty otherwise */
    struct lora lora;          /* owned: the adapter (empty for a model folder) */
    const struct model *m;     /* the model it runs: &own, or the shared base */
    const struct lora *l;      /* &lora for an adapter, else NULL */
};

/* Parses "NAME=PATH" into s (name checked: 1 to 23 characters of [A-Za-z0-9_.-], not "base"
 * or "rag"; path non-empty). LK_ERR_USAGE naming the argument. */
int ev_system_parse(const char *arg, struct ev_system *s, struct lk_err *err);
/* Checks a system against the base before anything heavy is read (base_dir is the base's
 * folder, for messages): PATH with adapter_config.json is an adapter, loaded here (lora_load
 * checks its shapes against the base); PATH with config.json a model folder, whose config must
 * pass cfg_check_same with the base's. force: 0 detect, 1 adapter, 2 model folder. Errors name
 * the system ("system 'NAME': ...") unless it is "ft", whose messages stay those of --adapter
 * and --tuned. */
int ev_system_check(struct ev_system *s, int force, const struct model *base, const char *base_dir,
                    struct lk_err *err);
/* Loads what a checked system runs: a model folder's weights, or for an adapter that changes
 * whole weights (modules_to_save, LoRA on lm_head, trainable tokens: lora_changes_weights) a
 * private copy of the base (read again from base_dir) with them applied by model_apply_extras,
 * which unties a tied base as PEFT runs it and `lorakit merge` writes it; the base modes keep
 * the base. keep (enum model_keep) applies to a model folder; the private copy is float32.
 * Sets m, l. */
int ev_system_load(struct ev_system *s, const struct model *base, const char *base_dir, int keep,
                   struct lk_err *err);
void ev_system_release(struct ev_system *s); /* harmless twice */

// ---- running ----

struct ev_config {
    struct tok *tk;              /* borrowed */
    const struct chat_fmt *fmt;  /* borrowed */
    struct model *base;          /* borrowed */
    struct model *tuned;         /* borrowed: the tuned model (a folder, or the base with the adapter's
                                    whole-weight changes applied), or NULL (then base + lora) */
    const struct lora *lora;     /* borrowed: the adapter for the tuned modes (on tuned when set), or NULL */
    struct fts_index *idx;       /* borrowed: needed when a mode has k > 0 */
    int max_new;                 /* answer tokens generated at most */
    int max_ctx;                 /* positions a sequence may use (<= max_position_embeddings) */
    int batch;                   /* sequences in flight (eval/batch.h), at most EV_BATCH_MAX; 0 or 1:
                                    one question at a time, each cell prefilled, scored and decoded alone */
};

#define EV_BATCH_MAX 256     /* sequences in flight at most */
/* `lorakit eval --batch` unless given. Measured on 2026-12-05 with AMX (Qwen2.5-0.5B shape, bf16,
 * the first 4 MedQuAD dev questions x 4 modes, --max-new 32, 2 threads, idle machine): --batch 1
 * 74.8 s, 8 43.1 s, 16 39.9 s; on 8 questions 16 and 32 took the same time (178 and 176 s), 32 with
 * 330 MB more for the caches. A step holds at most 512 rows, so beyond 16 sequences more of them
 * only wait. */
#define EV_BATCH_DEFAULT 16

struct ev_cell {
    char *answer;                /* owned: the generated answer (or the chosen choice) */
    double em, f1, rouge_l;      /* NAN for multiple choice */
    double nll;                  /* per token of the reference (or right choice); NAN if none */
    double acc;                  /* multiple choice: 1 or 0, else NAN */
    double recall;               /* recall@k of doc_id; NAN without doc_id or retrieval */
    double has_answer;           /* answer@k: the reference is in the prompt's passages (1/0);
                                  * NAN closed book or multiple choice */
    int n_passages;              /* passages in the prompt */
    int prompt_tokens, answer_tokens;
    double *choice_ll;           /* owned [n_choices]: summed log-likelihoods, or NULL */
    char *retrieved;             /* owned JSON array of the passages used, or NULL */
    double seconds;
};

struct ev_run {
    int n_items, n_modes;
    const struct ev_mode *modes; /* borrowed [n_modes] */
    struct ev_cell *cells;       /* owned [n_items * n_modes], item-major */
    double *seconds;             /* owned [n_modes]: time spent per mode */
    double retrieval_seconds;
};

/* Progress: called after each item. */
typedef void (*ev_progress_fn)(void *ctx, int done, int total);

/* answer@k of one item: *out = 1 when the SQuAD-normalised reference answer occurs, on token
 * boundaries, in the normalised text of one of the n passages, else 0 (DPR's "has answer"). It
 * tells retrieval failures from reading failures whichever document the question came from.
 * An answer with no tokens is never found. */
int ev_has_answer(const char *answer, const char *const *passages, int n, double *out,
                  struct lk_err *err);

/* Runs every item in every mode. Retrieval (the question as the query, top max-k chunks) is
 * done once per item and shared by the retrieval modes. Checks lk_interrupted per item. On
 * failure r is still released by ev_run_release. The tuned modes run c->tuned or base +
 * c->lora. */
int ev_run_all(struct ev_run *r, const struct ev_config *c, const struct ev_qa *qa,
               const struct ev_mode *modes, int n_modes, ev_progress_fn progress, void *ctx,
               struct lk_err *err);
/* The same with several systems: a tuned mode (tuned = s + 1) runs systems[s] (c->tuned and
 * c->lora are unused). Every system answers the same items, with the same retrieval. */
int ev_run_systems(struct ev_run *r, const struct ev_config *c, const struct ev_system *systems,
                   int n_systems, const struct ev_qa *qa, const struct ev_mode *modes, int n_modes,
                   ev_progress_fn progress, void *ctx, struct lk_err *err);
void ev_run_release(struct ev_run *r);
/* The cell of item i in mode j. */
struct ev_cell *ev_run_cell(const struct ev_run *r, int i, int j);

// ---- summary ----

enum ev_metric { EV_EM = 0, EV_F1, EV_ROUGE_L, EV_NLL, EV_ACC, EV_RECALL, EV_HAS_ANSWER, EV_N_METRICS };
extern const char *const ev_metric_names[EV_N_METRICS];  /* "em", "f1", "rouge_l", ... */
extern const char *const ev_metric_labels[EV_N_METRICS]; /* "EM", "F1", "ROUGE-L", ... */

/* The value of a metric in a cell (NAN when it does not apply). */
double ev_cell_metric(const struct ev_cell *c, enum ev_metric m);

struct ev_stat {
    int mode;                    /* index into the run's modes */
    enum ev_metric metric;
    struct ev_ci ci;             /* mean with 95% bootstrap interval over the items it applies to */
};

struct ev_diff {
    int a, b;                    /* modes: the difference is a - b, paired on items */
    enum ev_metric metric;
    struct ev_ci ci;
};

struct ev_summary {
    struct ev_stat *stats;       /* owned [n_stats] */
    int n_stats;
    struct ev_diff *diffs;       /* owned [n_diffs] */
    int n_diffs;
    char verdict[1024];
    uint64_t seed;
};

/* Means and 95% bootstrap CIs per mode and metric (over the items where the metric applies),
 * the paired differences ft - rag and ft+rag - rag (each retrieval k), rag - base and
 * ft - base (with several systems, each system's S - rag, S+rag - rag and S - base), and the
 * verdict. One system: ev_verdict on F1 (accuracy when every item is multiple choice) between
 * ft and rag (the largest k), else rag and base, else ft and base. Several systems: for EM, F1
 * and NLL (accuracy and NLL for multiple choice) the best row, and the rows whose paired
 * interval against it includes 0 ("not separated from"); those best - other differences join
 * the diffs. */
int ev_summarize(const struct ev_run *r, uint64_t seed, struct ev_summary *s, struct lk_err *err);
void ev_summary_release(struct ev_summary *s);
/* The stat of (mode, metric), or NULL. */
const struct ev_stat *ev_summary_stat(const struct ev_summary *s, int mode, enum ev_metric m);
/* The difference a - b on metric m, or NULL. */
const struct ev_diff *ev_summary_diff(const struct ev_summary *s, int a, int b, enum ev_metric m);
/* The mode (tuned, system sys, k) of a run, or -1 (sys is ignored for untuned modes). */
int ev_run_find_mode(const struct ev_run *r, int tuned, int sys, int k);

/* Seeds rng for the statistic a - b on metric m of run r (b = -1: the mean of a). The seed
 * depends on (seed, the modes' places, m) only, so each interval is reproducible whatever else
 * is computed; with several systems every system's modes take the first system's places, so
 * every system is resampled on the same items with the same resamples. */
void ev_stat_rng(const struct ev_run *r, uint64_t seed, int a, int b, int m, struct lk_rng *rng);

/* One plain-language line about the paired difference d = a - b on n items:
 *   "rag beats ft on F1 by 0.21 ± 0.04 on 500 questions"   (interval excludes 0)
 *   "no clear difference between ft and rag on F1: ft − rag = 0.01 ± 0.04 (95% interval
 *    includes 0) on 500 questions"
 * "± h" is the half-width of the 95% interval. lower_better flips who "beats" (NLL). */
void ev_verdict(const char *a, const char *b, const char *metric_label, const struct ev_ci *d,
                int lower_better, char *buf, size_t n);

/* The summary as a JSON object (modes x metrics with lo/hi/n, seconds per mode, diffs,
 * verdict), a fresh lk_malloc'ed string (NULL on OOM). */
char *ev_summary_json(const struct ev_run *r, const struct ev_summary *s);
struct cJSON;
/* The same as a cJSON object (caller cJSON_Deletes; NULL on OOM): the run record's summary. */
struct cJSON *ev_summary_obj(const struct ev_run *r, const struct ev_summary *s);
/* {"mean", "lo", "hi", "n"} of an interval (NULL on OOM); non-finite numbers as null. */
struct cJSON *ev_ci_obj(const struct ev_ci *ci);
/* o[key] = v, or null when v is not finite. */
void ev_json_num(struct cJSON *o, const char *key, double v);

/* Writes eval_results (mode x metric with lo/hi/n; differences under the mode "a - b";
 * "seconds" per mode) and eval_items (per item x mode: question, reference, answer, retrieved
 * passages, scores_json) for run_id. */
int ev_record(struct rdb *db, int64_t run_id, const struct ev_qa *qa, const struct ev_run *r,
              const struct ev_summary *s, struct lk_err *err);

// ---- set-up: the inputs of a run, loaded and checked ----

/* What a run is asked for (borrowed strings, as given on the command line). */
struct ev_setup_opts {
    const char *model;     /* base model folder: config.json, safetensors, tokenizer.json */
    const char *adapter;   /* tuned = base + this PEFT adapter, or NULL */
    const char *tuned;     /* tuned = this model folder (the base's architecture), or NULL */
    const char *qa;        /* questions (ev_qa_load) */
    const char *docs;      /* documents JSONL, indexed for this run into a temporary index, or NULL */
    const char *index;     /* an index made by `lorakit index` (not with docs), or NULL */
    const char *modes;     /* "base,rag,ft,ft+rag" or a part; NULL: every mode the inputs allow */
    const char *k;         /* passages per question, "3" or a sweep "0,1,3,5" */
    const char *tmpl;      /* chat template name, or NULL: from the tokenizer */
    const char *fts_tok;   /* unicode61, porter, trigram, or NULL (docs: unicode61; index: any) */
    int limit;             /* only the first N questions (<= 0: all) */
    int max_new;           /* answer tokens at most */
    int chunk_tokens, overlap; /* how docs are chunked */
    /* Told (may be NULL) before docs are indexed, with the settings used. */
    void (*on_indexing)(void *ctx, const char *docs, const struct fts_settings *st);
    void *ctx;
    const char *const *systems; /* [n_systems] "NAME=PATH" (--system): PATH an adapter or a model folder */
    int n_systems;
    const char *retain;        /* QA from the domain the base knew (closed book, and rag with
                                * retain_docs), or NULL; --limit applies to it too */
    const char *retain_docs;   /* documents for retain's rag modes, indexed for this run, or NULL */
    const char *retain_text;   /* texts scored by NLL per token (eval/retain.h), or NULL */
    int keep;              /* enum model_keep: MODEL_KEEP_FILE keeps the file's bf16 / f16 weights */
    int batch;             /* ev_config.batch of the run (and of the retention runs) */
};

struct ev_text;

/* Everything ev_run_all needs; owned here, released by ev_setup_release. */
struct ev_setup {
    struct ev_mode *modes;  /* owned [n_modes] */
    int n_modes;
    int kmax, need_tuned;   /* the largest k of the modes; 1 when a mode uses the tuned model */
    enum fts_tokenizer ftok;
    struct ev_qa qa;
    struct model base;
    struct tok *tk;         /* owned */
    struct chat_fmt fmt;
    struct fts_index idx;
    char tmp_index[4200];   /* a docs index built for this run (removed on release), or "" */
    struct ev_config cfg;   /* points into this struct: ready after ev_setup_load */
    struct ev_system *systems; /* owned [n_systems]: "ft" (--adapter/--tuned) first, then --system;
                                * loaded when a mode or the retention needs them */
    int n_systems;
    const char **names;     /* owned [n_systems]: pointers to the systems' names */
    // retention (eval/retain.h): the retain questions' modes, index and config, the texts
    struct ev_mode *retain_modes; /* owned [n_retain_modes], or NULL without --retain */
    int n_retain_modes;
    struct ev_qa retain;
    struct fts_index retain_idx;
    char tmp_retain_index[4200];
    struct ev_config retain_cfg; /* cfg with the retain index */
    struct ev_text *text;   /* owned, or NULL without --retain-text */
};

/* Checks the request before anything is read: the k list, the modes (default: those the
 * inputs allow), that the modes have their inputs (rag: docs or index; ft: adapter, tuned or a
 * system), adapter XOR tuned, docs XOR index, the FTS tokenizer name, the system names (no
 * repeat; "ft" is --adapter/--tuned's), that retention has a system and retain_docs a retain
 * file. The tuned modes are repeated per system (ev_modes_expand). LK_ERR_USAGE. */
int ev_setup_parse(struct ev_setup *s, const struct ev_setup_opts *o, struct lk_err *err);
/* Loads and checks every input (after ev_setup_parse): the questions (and retain questions and
 * texts), the base model and its tokenizer (no more ids than the model's vocabulary), the chat
 * template, every system (each checked against the base by ev_system_check before any is
 * loaded), and the index (docs: built into a temporary file; index: its settings checked
 * against fts_tok; retain_docs: a second temporary index). Fills s->cfg and s->retain_cfg. */
int ev_setup_load(struct ev_setup *s, const struct ev_setup_opts *o, struct lk_err *err);
/* Frees everything, removes a temporary index; harmless twice and on a zeroed struct. */
void ev_setup_release(struct ev_setup *s);

#endif
