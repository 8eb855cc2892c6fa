/*
 * medworld.c - generator of a synthetic medical knowledge world, the data lorakit's demo
 * trains and evaluates on (see datasets/README.md, the data card).
 *
 * A world is a set of invented conditions and drugs whose attributes (indication, dose,
 * interval, contraindication, side effect, molecular target, year of approval, maker; symptom,
 * organ, cause, first-line drug, year first described) are drawn from a seeded RNG, so no model
 * can know them except from our documents. Every entity gets K documents in different styles
 * and fact orders, each holding all of its facts, and every fact gets 6 question phrasings:
 * templates 0-3 for training, 4-5 held out for testing.
 *
 * Determinism: one seeded xorshift64* stream per purpose (names, facts, documents, ...), integer
 * arithmetic only, no locale, no clock, no floating point: the same flags give the same bytes
 * on any machine. Two worlds can never share an invented name: every name is built around a
 * syllable stem, and a stem belongs to the background world or to the new world by the parity
 * of its hash, whatever the seeds.
 *
 * Output goes to "<out>.tmp.<pid>" (each file written atomically) and the folder is renamed
 * into place at the end, so DIR holds a complete world or nothing. Owns: everything it makes.
 */
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "../libcore/lk.h"

#define MW_VERSION "3"
#define MW_MAX_ENTITIES 2000
#define MW_N_STYLES 4  /* document styles per entity kind: the maximum --docs-per-entity */
#define MW_N_TEMPLATES 6
#define MW_N_TRAIN 4   /* question templates 0..3 are for training, 4..5 for testing */
#define MW_MAX_ATTRS 16 /* attributes of one kind, at most */
#define MW_NAME 64
#define MW_FULL_SUFFIX " Answer in a full sentence."

enum mw_world_id { MW_BACKGROUND = 0, MW_NEW = 1 };
static const char *const mw_world_names[] = { "background", "new" };
static const char *const mw_world_prefix[] = { "bg", "nw" };

// ---- rng: lk_rng (xorshift64*) seeded per purpose ----

static uint64_t mw_splitmix(uint64_t z)
{
    z += 0x9E3779B97F4A7C15ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

/* An independent stream for one purpose, so that e.g. --docs-per-entity does not move the facts. */
static void mw_rng_stream(struct lk_rng *r, uint64_t seed, int world, uint64_t stream)
{
    lk_rng_seed(r, mw_splitmix(mw_splitmix(seed) ^ mw_splitmix((uint64_t)world + 0x100)) ^ stream);
    for (int i = 0; i < 4; i++) // warm-up: nearby streams decorrelate after a few steps
        lk_rng_u64(r);
}

static unsigned mw_below(struct lk_rng *r, unsigned n)
{
    LK_ASSERT(n > 0);
    return (unsigned)(lk_rng_u64(r) % n);
}

static void mw_shuffle(struct lk_rng *r, int *v, int n)
{
    for (int i = n - 1; i > 0; i--) {
        int j = (int)mw_below(r, (unsigned)i + 1);
        int t = v[i];
        v[i] = v[j];
        v[j] = t;
    }
}

#define MW_LEN(a) ((int)(sizeof(a) / sizeof((a)[0])))
#define MW_PICK(r, a) ((a)[mw_below((r), (unsigned)MW_LEN(a))])

// ---- growable strings (libcore's lk_buf) ----

static void mw_buf_clear(struct lk_buf *b)
{
    b->n = 0;
    if (b->p)
        b->p[0] = 0;
}

/* A list of owned strings (records of one output file, in order). */
struct mw_lines {
    char **v; /* owned, each owned */
    size_t n, cap;
    int oom;
};

static void mw_lines_add(struct mw_lines *l, const struct lk_buf *b)
{
    if (l->oom || b->oom) {
        l->oom = 1;
        return;
    }
    if (l->n == l->cap) {
        size_t cap = l->cap ? 2 * l->cap : 256;
        char **v = lk_realloc(l->v, cap * sizeof *v);
        if (!v) {
            l->oom = 1;
            return;
        }
        l->v = v;
        l->cap = cap;
    }
    char *s = lk_strdup(b->p ? b->p : "");
    if (!s) {
        l->oom = 1;
        return;
    }
    l->v[l->n++] = s;
}

static void mw_lines_release(struct mw_lines *l)
{
    for (size_t i = 0; l->v && i < l->n; i++)
        lk_free(l->v[i]);
    lk_free(l->v);
    memset(l, 0, sizeof *l);
}

/* Reorders the lines with a seeded Fisher-Yates (training files should not come sorted). */
static void mw_lines_shuffle(struct mw_lines *l, struct lk_rng *r)
{
    for (size_t i = l->n; i > 1; i--) {
        size_t j = (size_t)(lk_rng_u64(r) % i);
        char *t = l->v[i - 1];
        l->v[i - 1] = l->v[j];
        l->v[j] = t;
    }
}

// ---- name space: syllable stems, unique in a world, partitioned between worlds ----

static const char *const mw_onsets[] = { "b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s",
                                         "t", "v", "z", "h", "j", "br", "dr", "gr", "kl", "pr",
                                         "tr", "st", "sk", "pl", "vr" };
static const char *const mw_vowels[] = { "a", "e", "i", "o", "u" };
static const char *const mw_codas[] = { "n", "r", "l", "s", "m", "x", "v", "k" };

/* An open-addressing set of the stems used in one world (lowercase). */
struct mw_names {
    char **slot;   /* owned: cap entries, NULL = empty; each string owned */
    size_t n, cap; /* cap is a power of two, kept at most half full */
    int world;     /* stems whose hash parity differs belong to the other world */
};

static uint64_t mw_hash(const char *s)
{
    uint64_t h = 0xcbf29ce484222325ull; // FNV-1a, then a finalizer so every bit depends on all
    for (; *s; s++)
        h = (h ^ (unsigned char)*s) * 0x100000001b3ull;
    return mw_splitmix(h);
}

static int mw_names_grow(struct mw_names *ns)
{
    size_t cap = ns->cap ? ns->cap * 2 : 1024;
    char **slot = lk_calloc(cap, sizeof *slot);
    if (!slot)
        return LK_ERR_NOMEM;
    for (size_t i = 0; i < ns->cap; i++) {
        if (!ns->slot[i])
            continue;
        size_t j = (size_t)mw_hash(ns->slot[i]) & (cap - 1);
        while (slot[j])
            j = (j + 1) & (cap - 1);
        slot[j] = ns->slot[i];
    }
    lk_free(ns->slot);
    ns->slot = slot;
    ns->cap = cap;
    return LK_OK;
}

/* 1 if the stem was free in this world (and is now taken), 0 if taken or the other world's. */
static int mw_names_claim(struct mw_names *ns, const char *stem, struct lk_err *err)
{
    uint64_t h = mw_hash(stem);
    if ((int)((h >> 32) & 1) != ns->world)
        return 0;
    if (2 * (ns->n + 1) > ns->cap && mw_names_grow(ns))
        return -lk_errf(err, LK_ERR_NOMEM, "out of memory");
    size_t j = (size_t)h & (ns->cap - 1);
    for (; ns->slot[j]; j = (j + 1) & (ns->cap - 1))
        if (!strcmp(ns->slot[j], stem))
            return 0;
    ns->slot[j] = lk_strdup(stem);
    if (!ns->slot[j])
        return -lk_errf(err, LK_ERR_NOMEM, "out of memory");
    ns->n++;
    return 1;
}

static void mw_names_release(struct mw_names *ns)
{
    for (size_t i = 0; ns->slot && i < ns->cap; i++)
        lk_free(ns->slot[i]);
    lk_free(ns->slot);
    memset(ns, 0, sizeof *ns);
}

/* Stem shapes: each syllable is onset + vowel; CVC adds a final consonant to the last one;
 * a gene is one closed syllable and a digit ("trav3"). */
enum mw_shape { MW_CV_CV, MW_CV_CVC, MW_CV_CV_CV, MW_GENE };

static void mw_stem_make(struct lk_rng *r, enum mw_shape shape, char *out, size_t cap)
{
    char s[MW_NAME] = "";
    int nsyl = shape == MW_CV_CV_CV ? 3 : shape == MW_GENE ? 1 : 2;
    for (int i = 0; i < nsyl; i++) {
        strcat(s, MW_PICK(r, mw_onsets));
        strcat(s, MW_PICK(r, mw_vowels));
    }
    if (shape == MW_CV_CVC || shape == MW_GENE)
        strcat(s, MW_PICK(r, mw_codas));
    if (shape == MW_GENE) {
        char digit[2] = { (char)('1' + mw_below(r, 9)), 0 };
        strcat(s, digit);
    }
    LK_ASSERT(strlen(s) < cap);
    memcpy(out, s, strlen(s) + 1);
}

/* A fresh stem of this world into out (lowercase). */
static int mw_stem_fresh(struct mw_names *ns, struct lk_rng *r, enum mw_shape shape, char *out,
                         size_t cap, struct lk_err *err)
{
    for (int tries = 0; tries < 200000; tries++) {
        mw_stem_make(r, shape, out, cap);
        int got = mw_names_claim(ns, out, err);
        if (got < 0)
            return err->code;
        if (got)
            return LK_OK;
    }
    return lk_errf(err, LK_ERR_USAGE, "name space exhausted (too many entities for one world)");
}

static void mw_capitalize(char *s)
{
    if (s[0] >= 'a' && s[0] <= 'z')
        s[0] = (char)(s[0] - 'a' + 'A');
}

static void mw_upper(char *s)
{
    for (; *s; s++)
        if (*s >= 'a' && *s <= 'z')
            *s = (char)(*s - 'a' + 'A');
}

// ---- attribute vocabularies (shared by both worlds: only the associations are invented) ----

static const char *const mw_drug_suffixes[] = { "tran", "vir", "zole", "mab", "pril", "lol",
                                                "fil", "dronate", "cillin", "statin", "tinib",
                                                "xane", "parin", "xaban", "lamide", "dipine",
                                                "sartan", "prazole", "triptan", "gliptin" };
static const char *const mw_cond_eponyms[] = { " syndrome", " disease", " fever", " palsy" };
static const char *const mw_cond_suffixes[] = { "itis", "osis", "emia", "opathy" };
static const char *const mw_company_kinds[] = { " Labs", " Pharma", " Therapeutics", " Biologics",
                                                " Pharmaceuticals", " Biotech", " Medical" };
static const char *const mw_genus_suffixes[] = { "myces", "bacter", "coccus", "virus", "monas",
                                                 "plasma", "spora", "bacillus" };
static const char *const mw_species_suffixes[] = { "lis", "ris", "nae", "ni", "tum", "nsis", "rum" };
static const char *const mw_target_kinds[] = { "receptor", "channel", "transporter" };
static const char *const mw_acts[][2] = { { "blocks", "blocking" }, { "inhibits", "inhibiting" },
                                          { "activates", "activating" } };
static const int mw_doses[] = { 1, 2, 5, 10, 20, 25, 40, 50, 75, 100, 125, 150, 200, 250, 300,
                                400, 500, 600, 750, 800, 1000 };
static const char *const mw_intervals[] = { "every 4 hours", "every 6 hours", "every 8 hours",
                                            "every 12 hours", "once a day", "every 36 hours",
                                            "every 48 hours", "every 72 hours", "twice a week",
                                            "once a week", "every two weeks", "once a month" };
static const char *const mw_side_effects[] = {
    "nausea", "dry mouth", "drowsiness", "headache", "dizziness", "insomnia", "constipation",
    "diarrhea", "skin rash", "hair loss", "weight gain", "muscle pain", "blurred vision",
    "tinnitus", "metallic taste", "hiccups", "flushing", "night sweats", "leg cramps", "heartburn",
    "nosebleeds", "low mood", "dry skin", "itching", "tremor", "fatigue", "palpitations",
    "loss of appetite", "ankle swelling", "vivid dreams", "sensitivity to sunlight", "yawning"
};
static const char *const mw_symptoms[] = {
    "fever", "joint pain", "dry cough", "chest pain", "night sweats", "blurred vision",
    "hair loss", "muscle weakness", "skin rash", "shortness of breath", "fatigue", "headache",
    "abdominal pain", "back pain", "dizziness", "nausea", "weight loss", "joint swelling",
    "hearing loss", "itching", "tremor", "palpitations", "confusion", "jaundice",
    "swollen ankles", "hoarseness", "numb fingers", "constant thirst", "muscle cramps",
    "nosebleeds", "insomnia", "double vision", "hiccups", "pale skin"
};
static const char *const mw_organs[] = {
    "liver", "kidneys", "heart", "lungs", "skin", "pancreas", "thyroid", "spleen", "stomach",
    "brain", "spinal cord", "eyes", "inner ear", "bone marrow", "joints", "colon", "bladder",
    "gallbladder", "adrenal glands", "lymph nodes"
};

// ---- the world ----

struct mw_cond {
    char name[MW_NAME];
    const char *symptom, *organ; /* borrowed: static vocabularies */
    char cause[MW_NAME];         /* the short answer: "Brevomyces tarnalis" or "KORV1 gene" */
    char causep[MW_NAME + 32];   /* the phrase documents use: "infection with ..." */
    int first_drug;              /* index into drugs; that drug's indication is this condition */
    int year;
};

struct mw_drug {
    char name[MW_NAME];
    int ind, contra;             /* indices into conds, different */
    char dose[16];               /* "40 mg" */
    const char *interval, *side; /* borrowed */
    char target[MW_NAME];        /* "DAVO-3 receptor" or "Dravikase" */
    char the_target[MW_NAME + 4];
    int act;                     /* index into mw_acts */
    int year;
    int maker;                   /* index into makers */
};

struct mw_world {
    int world;
    uint64_t seed;
    int n_cond, n_drug, n_maker, K;
    struct mw_cond *conds;       /* owned [n_cond] */
    struct mw_drug *drugs;       /* owned [n_drug] */
    char (*makers)[MW_NAME];     /* owned [n_maker] */
    char **docs;                 /* owned [(n_cond + n_drug) * K]: entity e's doc k at e*K+k */
    int *doc_style;              /* owned, same layout: the style used */
};

static int mw_world_build(struct mw_world *w, struct lk_err *err)
{
    struct mw_names ns = { .world = w->world };
    struct lk_rng rn, rf;
    char stem[16], stem2[16]; // stems are at most 3 syllables of 3 letters
    int rc = LK_OK;
    mw_rng_stream(&rn, w->seed, w->world, 1);
    mw_rng_stream(&rf, w->seed, w->world, 2);
    w->conds = lk_calloc((size_t)w->n_cond, sizeof *w->conds);
    w->drugs = lk_calloc((size_t)w->n_drug, sizeof *w->drugs);
    w->makers = lk_calloc((size_t)w->n_maker, sizeof *w->makers);
    int *perm = lk_malloc(sizeof(int) * (size_t)w->n_drug);
    if (!w->conds || !w->drugs || !w->makers || !perm) {
        rc = lk_errf(err, LK_ERR_NOMEM, "out of memory");
        goto done;
    }
    // 1. names: conditions, drugs, makers (the stems of one world never repeat)
    for (int i = 0; i < w->n_cond; i++) {
        if ((rc = mw_stem_fresh(&ns, &rn, MW_CV_CVC, stem, sizeof stem, err)))
            goto done;
        mw_capitalize(stem);
        if (mw_below(&rn, 2))
            snprintf(w->conds[i].name, MW_NAME, "%s%s", stem, MW_PICK(&rn, mw_cond_eponyms));
        else
            snprintf(w->conds[i].name, MW_NAME, "%s%s", stem, MW_PICK(&rn, mw_cond_suffixes));
    }
    for (int i = 0; i < w->n_drug; i++) {
        if ((rc = mw_stem_fresh(&ns, &rn, MW_CV_CV, stem, sizeof stem, err)))
            goto done;
        mw_capitalize(stem);
        snprintf(w->drugs[i].name, MW_NAME, "%s%s", stem, MW_PICK(&rn, mw_drug_suffixes));
    }
    for (int i = 0; i < w->n_maker; i++) {
        if ((rc = mw_stem_fresh(&ns, &rn, MW_CV_CV_CV, stem, sizeof stem, err)))
            goto done;
        mw_capitalize(stem);
        snprintf(w->makers[i], MW_NAME, "%s%s", stem, MW_PICK(&rn, mw_company_kinds));
    }
    // 2. conditions: cause (a pathogen or a gene), symptom, organ, year
    for (int i = 0; i < w->n_cond; i++) {
        struct mw_cond *c = &w->conds[i];
        if (mw_below(&rn, 5) < 3) {
            if ((rc = mw_stem_fresh(&ns, &rn, MW_CV_CV, stem, sizeof stem, err)) ||
                (rc = mw_stem_fresh(&ns, &rn, MW_CV_CV, stem2, sizeof stem2, err)))
                goto done;
            mw_capitalize(stem);
            snprintf(c->cause, MW_NAME, "%s%s %s%s", stem, MW_PICK(&rn, mw_genus_suffixes), stem2,
                     MW_PICK(&rn, mw_species_suffixes));
            snprintf(c->causep, sizeof c->causep, "infection with %s", c->cause);
        } else {
            if ((rc = mw_stem_fresh(&ns, &rn, MW_GENE, stem, sizeof stem, err)))
                goto done;
            mw_upper(stem);
            snprintf(c->cause, MW_NAME, "%s gene", stem);
            snprintf(c->causep, sizeof c->causep, "mutations in the %s", c->cause);
        }
        c->symptom = MW_PICK(&rf, mw_symptoms);
        c->organ = MW_PICK(&rf, mw_organs);
        c->year = 1840 + (int)mw_below(&rf, 150);
    }
    // 3. drugs: indication (every condition gets a first-line drug), the rest at random
    for (int i = 0; i < w->n_drug; i++)
        perm[i] = i;
    mw_shuffle(&rf, perm, w->n_drug);
    for (int k = 0; k < w->n_drug; k++) {
        struct mw_drug *d = &w->drugs[perm[k]];
        if (k < w->n_cond) {
            d->ind = k;
            w->conds[k].first_drug = perm[k];
        } else {
            d->ind = (int)mw_below(&rf, (unsigned)w->n_cond);
        }
    }
    for (int i = 0; i < w->n_drug; i++) {
        struct mw_drug *d = &w->drugs[i];
        d->contra = (d->ind + 1 + (int)mw_below(&rf, (unsigned)w->n_cond - 1)) % w->n_cond;
        snprintf(d->dose, sizeof d->dose, "%d mg", MW_PICK(&rf, mw_doses));
        d->interval = MW_PICK(&rf, mw_intervals);
        d->side = MW_PICK(&rf, mw_side_effects);
        d->act = (int)mw_below(&rf, (unsigned)MW_LEN(mw_acts));
        d->year = 1950 + (int)mw_below(&rf, 73);
        d->maker = (int)mw_below(&rf, (unsigned)w->n_maker);
        if (mw_below(&rn, 4) == 0) { // an enzyme: "Dravikase", no article
            if ((rc = mw_stem_fresh(&ns, &rn, MW_CV_CVC, stem, sizeof stem, err)))
                goto done;
            mw_capitalize(stem);
            snprintf(d->target, MW_NAME, "%sase", stem);
            snprintf(d->the_target, sizeof d->the_target, "%s", d->target);
        } else { // "DAVO-3 receptor"
            if ((rc = mw_stem_fresh(&ns, &rn, MW_CV_CV, stem, sizeof stem, err)))
                goto done;
            mw_upper(stem);
            snprintf(d->target, MW_NAME, "%s-%u %s", stem, 1 + mw_below(&rn, 9),
                     MW_PICK(&rn, mw_target_kinds));
            snprintf(d->the_target, sizeof d->the_target, "the %s", d->target);
        }
    }
done:
    lk_free(perm);
    mw_names_release(&ns);
    return rc;
}

static void mw_world_release(struct mw_world *w)
{
    int n = w->n_cond + w->n_drug;
    for (int i = 0; w->docs && i < n * w->K; i++)
        lk_free(w->docs[i]);
    lk_free(w->docs);
    lk_free(w->doc_style);
    lk_free(w->conds);
    lk_free(w->drugs);
    lk_free(w->makers);
    memset(w, 0, sizeof *w);
}

// ---- templates ----

/* The placeholder values of one entity: {name}, {dose}, ... */
struct mw_kv {
    const char *k, *v;
};
#define MW_MAX_KV 16

struct mw_vals {
    struct mw_kv kv[MW_MAX_KV];
    int n;
    char year[8];
};

static void mw_vals_add(struct mw_vals *v, const char *k, const char *val)
{
    LK_ASSERT(v->n < MW_MAX_KV);
    v->kv[v->n].k = k;
    v->kv[v->n].v = val;
    v->n++;
}

static const char *mw_vals_get(const struct mw_vals *v, const char *k, size_t klen)
{
    for (int i = 0; i < v->n; i++)
        if (strlen(v->kv[i].k) == klen && !strncmp(v->kv[i].k, k, klen))
            return v->kv[i].v;
    return NULL;
}

/* Appends tpl with each {key} replaced by its value; an unknown key is our bug. */
static void mw_fill(struct lk_buf *b, const char *tpl, const struct mw_vals *v)
{
    const char *p = tpl;
    while (*p) {
        const char *open = strchr(p, '{');
        if (!open) {
            lk_buf_puts(b, p);
            return;
        }
        lk_buf_put(b, p, (size_t)(open - p));
        const char *close = strchr(open, '}');
        LK_ASSERT(close != NULL);
        const char *val = mw_vals_get(v, open + 1, (size_t)(close - open - 1));
        LK_ASSERT(val != NULL);
        lk_buf_puts(b, val);
        p = close + 1;
    }
}

enum mw_kind { MW_COND = 0, MW_DRUG = 1 };
static const char *const mw_kind_names[] = { "condition", "drug" };
static const char *const mw_kind_ids[] = { "cond", "drug" };

/* One attribute: the placeholder holding its short answer, its questions, a full answer. */
struct mw_attr {
    const char *name;  /* field name in ids and records */
    const char *value; /* placeholder key of the short answer */
    const char *q[MW_N_TEMPLATES]; /* 0..3 train, 4..5 test */
    const char *full;  /* full-sentence answer */
};

static const struct mw_attr mw_cond_attrs[] = {
    { "symptom", "symptom",
      { "What is the main symptom of {name}?", "Which symptom is typical of {name}?",
        "What symptom do patients with {name} have?", "{name} usually presents with which symptom?",
        "What symptom is characteristic of {name}?", "Which symptom points to {name}?" },
      "The main symptom of {name} is {symptom}." },
    { "organ", "organ",
      { "Which organ does {name} affect?", "What organ is damaged in {name}?",
        "Which part of the body does {name} affect?", "{name} affects which organ?",
        "Which organ is involved in {name}?", "In which organ does {name} occur?" },
      "{name} affects the {organ}." },
    { "cause", "cause",
      { "What causes {name}?", "What is the cause of {name}?", "{name} is caused by what?",
        "What is behind {name}?",
        "What is the underlying cause of {name}?", "What gives rise to {name}?" },
      "{name} is caused by {causep}." },
    { "first_line_treatment", "treat",
      { "What is the first-line treatment for {name}?", "Which drug is used first for {name}?",
        "What medicine is given first for {name}?", "{name} is first treated with which drug?",
        "Which drug do doctors try first for {name}?", "What is the drug of choice for {name}?" },
      "The first-line treatment for {name} is {treat}." },
    { "year_described", "year",
      { "When was {name} first described?", "In what year was {name} first described?",
        "What year was {name} first reported?", "{name} was first described in which year?",
        "Which year saw the first description of {name}?",
        "When did doctors first describe {name}?" },
      "{name} was first described in {year}." },
};

static const struct mw_attr mw_drug_attrs[] = {
    { "indication", "ind",
      { "What is {name} used to treat?", "Which condition is {name} prescribed for?",
        "What disease does {name} treat?", "{name} is indicated for which condition?",
        "For what condition would a doctor prescribe {name}?", "What is the indication of {name}?" },
      "{name} is used to treat {ind}." },
    { "dose", "dose",
      { "What is the usual dose of {name}?", "How many milligrams of {name} are given per dose?",
        "What dose of {name} is standard?", "{name} is usually given at what dose?",
        "What is the standard single dose of {name} for adults?",
        "Tell me the recommended dose of {name}." },
      "The usual dose of {name} is {dose}." },
    { "interval", "int",
      { "How often is {name} taken?", "What is the dosing interval of {name}?",
        "How frequently should {name} be given?", "{name} is taken how often?",
        "At what interval are doses of {name} repeated?",
        "How often does a patient need to take {name}?" },
      "{name} is taken {int}." },
    { "contraindication", "contra",
      { "In which condition must {name} not be used?", "What is a contraindication of {name}?",
        "Which condition rules out the use of {name}?", "{name} is contraindicated in which condition?",
        "Which condition is a contraindication to {name}?",
        "In patients with which disease should {name} be avoided?" },
      "{name} must not be used in patients with {contra}." },
    { "side_effect", "side",
      { "What is a common side effect of {name}?", "Which side effect does {name} often cause?",
        "What adverse effect is reported with {name}?", "{name} commonly causes which side effect?",
        "What side effect should patients on {name} watch for?",
        "Name the typical adverse reaction to {name}." },
      "A common side effect of {name} is {side}." },
    { "target", "target",
      { "What is the molecular target of {name}?", "Which target does {name} act on?",
        "What does {name} act on in the body?", "{name} works on which molecular target?",
        "Through which target does {name} exert its effect?",
        "What is the mechanism of action of {name}?" },
      "{name} works by {acting} {the_target}." },
    { "approval_year", "year",
      { "In what year was {name} approved?", "When was {name} approved?",
        "What year did {name} receive approval?", "{name} was approved in which year?",
        "Which year saw the approval of {name}?", "When did regulators first approve {name}?" },
      "{name} was approved in {year}." },
    { "maker", "maker",
      { "Which company makes {name}?", "Who manufactures {name}?", "What company produces {name}?",
        "{name} is made by which company?",
        "Who is the maker of {name}?", "Name the manufacturer of {name}." },
      "{name} is made by {maker}." },
};

/* A document style: a title, an opening sentence, then body sentences in a shuffled order.
 * Together they must mention every attribute value (checked for every document made). */
struct mw_style {
    const char *title;
    const char *open;
    const char *body[8]; /* NULL-terminated */
};

static const struct mw_style mw_cond_styles[MW_N_STYLES] = {
    { "{name}: overview", "{name} is a disease that affects the {organ}.",
      { "The main symptom of {name} is {symptom}.", "{name} is caused by {causep}.",
        "The first-line treatment for {name} is {treat}.", "{name} was first described in {year}.",
        NULL } },
    { "{name}: clinical summary", "Clinical summary: {name}.",
      { "Organ affected: the {organ}.", "Presenting symptom: {symptom}.", "Cause: {causep}.",
        "First-line drug: {treat}.", "First described: {year}.", NULL } },
    { "The history of {name}", "{name} was first described in {year}.",
      { "Patients with {name} typically present with {symptom}.", "{name} damages the {organ}.",
        "Researchers later showed that {name} results from {causep}.",
        "Today doctors treat {name} first with {treat}.", NULL } },
    { "{name}: a guide for patients", "This guide explains {name}.",
      { "{name} is a condition of the {organ}.", "Most people with {name} notice {symptom}.",
        "{name} is caused by {causep}.",
        "For {name}, doctors usually start treatment with {treat}.",
        "{name} has been known since {year}.", NULL } },
};

static const struct mw_style mw_drug_styles[MW_N_STYLES] = {
    { "{name}: overview", "{name} is a prescription medicine.",
      { "{name} is used to treat {ind}.", "The usual dose of {name} is {dose}, taken {int}.",
        "{name} works by {acting} {the_target}.", "{name} is made by {maker}.",
        "{name} must not be given to patients with {contra}.",
        "A common side effect of {name} is {side}.", "{name} was approved in {year}.", NULL } },
    { "{name}: prescribing information", "Prescribing information for {name}, a product of {maker}.",
      { "Indication: {ind}.", "Dose: {dose} {int}.", "Mechanism: {name} {acts} {the_target}.",
        "Contraindication: {contra}.", "Most frequent adverse effect: {side}.",
        "Year of approval: {year}.", NULL } },
    { "The history of {name}", "{maker} developed {name}, and regulators approved it in {year}.",
      { "Doctors prescribe {name} for {ind}.", "Patients usually take {dose} of {name} {int}.",
        "In the body, {name} {acts} {the_target}.",
        "Because of the risk of harm, {name} is avoided in people who have {contra}.",
        "Many patients on {name} report {side}.", NULL } },
    { "{name}: patient leaflet", "This leaflet is about {name}.",
      { "{name} is a medicine for {ind}.",
        "Take {dose} of {name} {int}, unless your doctor says otherwise.",
        "Do not take {name} if you have {contra}.", "{name} can cause {side}.",
        "{name} acts on {the_target}.",
        "{name} is made by {maker} and was first approved in {year}.", NULL } },
};

/* Our invariant: the question templates of one entity kind are pairwise distinct, so a test
 * phrasing can never coincide with a training one. */
static void mw_templates_check(void)
{
    for (int kind = 0; kind < 2; kind++) {
        const struct mw_attr *t = kind ? mw_drug_attrs : mw_cond_attrs;
        int n = kind ? MW_LEN(mw_drug_attrs) : MW_LEN(mw_cond_attrs);
        for (int i = 0; i < n * MW_N_TEMPLATES; i++)
            for (int j = 0; j < i; j++)
                LK_ASSERT(strcmp(t[i / MW_N_TEMPLATES].q[i % MW_N_TEMPLATES],
                                 t[j / MW_N_TEMPLATES].q[j % MW_N_TEMPLATES]) != 0);
    }
}

static const struct mw_attr *mw_attrs(enum mw_kind kind, int *n)
{
    *n = kind == MW_DRUG ? MW_LEN(mw_drug_attrs) : MW_LEN(mw_cond_attrs);
    return kind == MW_DRUG ? mw_drug_attrs : mw_cond_attrs;
}

/* Entities are numbered conditions first, then drugs. */
static enum mw_kind mw_entity_kind(const struct mw_world *w, int e)
{
    return e < w->n_cond ? MW_COND : MW_DRUG;
}

static void mw_entity_vals(const struct mw_world *w, int e, struct mw_vals *v)
{
    memset(v, 0, sizeof *v);
    if (mw_entity_kind(w, e) == MW_COND) {
        const struct mw_cond *c = &w->conds[e];
        snprintf(v->year, sizeof v->year, "%d", c->year);
        mw_vals_add(v, "name", c->name);
        mw_vals_add(v, "symptom", c->symptom);
        mw_vals_add(v, "organ", c->organ);
        mw_vals_add(v, "cause", c->cause);
        mw_vals_add(v, "causep", c->causep);
        mw_vals_add(v, "treat", w->drugs[c->first_drug].name);
        mw_vals_add(v, "year", v->year);
    } else {
        const struct mw_drug *d = &w->drugs[e - w->n_cond];
        snprintf(v->year, sizeof v->year, "%d", d->year);
        mw_vals_add(v, "name", d->name);
        mw_vals_add(v, "ind", w->conds[d->ind].name);
        mw_vals_add(v, "dose", d->dose);
        mw_vals_add(v, "int", d->interval);
        mw_vals_add(v, "contra", w->conds[d->contra].name);
        mw_vals_add(v, "side", d->side);
        mw_vals_add(v, "target", d->target);
        mw_vals_add(v, "the_target", d->the_target);
        mw_vals_add(v, "acts", mw_acts[d->act][0]);
        mw_vals_add(v, "acting", mw_acts[d->act][1]);
        mw_vals_add(v, "year", v->year);
        mw_vals_add(v, "maker", w->makers[d->maker]);
    }
}

static const char *mw_value(const struct mw_vals *v, const struct mw_attr *a)
{
    const char *s = mw_vals_get(v, a->value, strlen(a->value));
    LK_ASSERT(s != NULL);
    return s;
}

static void mw_entity_id(const struct mw_world *w, int e, char *out, size_t cap)
{
    enum mw_kind kind = mw_entity_kind(w, e);
    int idx = kind == MW_COND ? e : e - w->n_cond;
    snprintf(out, cap, "%s-%s%04d", mw_world_prefix[w->world], mw_kind_ids[kind], idx + 1);
}

static void mw_doc_id(const struct mw_world *w, int e, int k, char *out, size_t cap)
{
    char eid[32];
    mw_entity_id(w, e, eid, sizeof eid);
    snprintf(out, cap, "%s-d%d", eid, k + 1);
}

/* The K documents of every entity: K distinct styles, body sentences shuffled per document. */
static int mw_world_docs(struct mw_world *w, struct lk_err *err)
{
    int n = w->n_cond + w->n_drug;
    w->docs = lk_calloc((size_t)n * (size_t)w->K, sizeof *w->docs);
    w->doc_style = lk_calloc((size_t)n * (size_t)w->K, sizeof *w->doc_style);
    if (!w->docs || !w->doc_style)
        return lk_errf(err, LK_ERR_NOMEM, "out of memory");
    struct lk_buf b = { 0 };
    for (int e = 0; e < n; e++) {
        struct lk_rng r;
        mw_rng_stream(&r, w->seed, w->world, 1000 + (uint64_t)e);
        enum mw_kind kind = mw_entity_kind(w, e);
        const struct mw_style *styles = kind == MW_DRUG ? mw_drug_styles : mw_cond_styles;
        struct mw_vals v;
        mw_entity_vals(w, e, &v);
        int sty[MW_N_STYLES];
        for (int i = 0; i < MW_N_STYLES; i++)
            sty[i] = i;
        mw_shuffle(&r, sty, MW_N_STYLES);
        for (int k = 0; k < w->K; k++) {
            const struct mw_style *s = &styles[sty[k]];
            int order[8], nb = 0;
            while (s->body[nb])
                nb++;
            for (int i = 0; i < nb; i++)
                order[i] = i;
            mw_shuffle(&r, order, nb);
            mw_buf_clear(&b);
            mw_fill(&b, s->open, &v);
            for (int i = 0; i < nb; i++) {
                lk_buf_puts(&b, " ");
                mw_fill(&b, s->body[order[i]], &v);
            }
            if (b.oom)
                break;
            // every document holds every fact of its entity, verbatim
            int na;
            const struct mw_attr *attrs = mw_attrs(kind, &na);
            for (int a = 0; a < na; a++)
                LK_ASSERT(strstr(b.p, mw_value(&v, &attrs[a])) != NULL);
            w->docs[e * w->K + k] = lk_strdup(b.p);
            w->doc_style[e * w->K + k] = sty[k];
            if (!w->docs[e * w->K + k])
                b.oom = 1;
        }
    }
    int oom = b.oom;
    lk_buf_release(&b);
    return oom ? lk_errf(err, LK_ERR_NOMEM, "out of memory") : LK_OK;
}

// ---- records ----

struct mw_out {
    struct mw_lines docs, text, chat, alpaca, qa_train, qa_test, rc, rc_dialog, drill, entities;
};

static void mw_out_release(struct mw_out *o)
{
    mw_lines_release(&o->docs);
    mw_lines_release(&o->text);
    mw_lines_release(&o->chat);
    mw_lines_release(&o->alpaca);
    mw_lines_release(&o->qa_train);
    mw_lines_release(&o->qa_test);
    mw_lines_release(&o->rc);
    mw_lines_release(&o->rc_dialog);
    mw_lines_release(&o->drill);
    mw_lines_release(&o->entities);
}

static void mw_rec_chat(struct lk_buf *b, const char *user, const char *assistant)
{
    mw_buf_clear(b);
    lk_buf_puts(b, "{\"messages\":[{\"role\":\"user\",\"content\":");
    lk_buf_json_str(b, user);
    lk_buf_puts(b, "},{\"role\":\"assistant\",\"content\":");
    lk_buf_json_str(b, assistant);
    lk_buf_puts(b, "}]}");
}

static void mw_rec_alpaca(struct lk_buf *b, const char *instruction, const char *output)
{
    mw_buf_clear(b);
    lk_buf_puts(b, "{\"instruction\":");
    lk_buf_json_str(b, instruction);
    lk_buf_puts(b, ",\"input\":\"\",\"output\":");
    lk_buf_json_str(b, output);
    lk_buf_puts(b, "}");
}

static void mw_rec_qa(struct lk_buf *b, const char *id, const char *q, const char *a,
                      const char *doc_id, const char *eid, const char *attr, const char *tmpl)
{
    mw_buf_clear(b);
    lk_buf_puts(b, "{\"id\":");
    lk_buf_json_str(b, id);
    lk_buf_puts(b, ",\"question\":");
    lk_buf_json_str(b, q);
    lk_buf_puts(b, ",\"answer\":");
    lk_buf_json_str(b, a);
    lk_buf_puts(b, ",\"doc_id\":");
    lk_buf_json_str(b, doc_id);
    lk_buf_puts(b, ",\"entity\":");
    lk_buf_json_str(b, eid);
    lk_buf_puts(b, ",\"attribute\":");
    lk_buf_json_str(b, attr);
    lk_buf_puts(b, ",\"template\":");
    lk_buf_json_str(b, tmpl);
    lk_buf_puts(b, "}");
}

/* The entity linked to e (a drug's indication, a condition's first-line drug): a realistic
 * distractor for reading comprehension, since retrieval finds it for the same names. */
static int mw_linked(const struct mw_world *w, int e)
{
    if (mw_entity_kind(w, e) == MW_COND)
        return w->n_cond + w->conds[e].first_drug;
    return w->drugs[e - w->n_cond].ind;
}

/* "Context:\n<p1>\n\n<p2>...\n\nQuestion: <q>": the prompt format the eval's rag mode uses. */
static void mw_rc_prompt(struct lk_buf *b, const char *const *passages, int np, const char *q)
{
    mw_buf_clear(b);
    lk_buf_puts(b, "Context:\n");
    for (int i = 0; i < np; i++) {
        if (i)
            lk_buf_puts(b, "\n\n");
        lk_buf_puts(b, passages[i]);
    }
    lk_buf_puts(b, "\n\nQuestion: ");
    lk_buf_puts(b, q);
}

/* Reading-comprehension dialogs (background worlds): for each document of each entity, a
 * context of that document and 0 to 2 distractors (the linked entity's and a random entity's
 * documents, in random order), then every attribute of the entity asked in turn, in random
 * order, each with a random training phrasing. The first turn is the rc_train prompt; later
 * turns are "Question: <q>". Every answer is in the gold document, so every assistant turn is
 * a lesson in reading, at several answers per context. Own RNG stream: the other files keep
 * their bytes. */
static void mw_world_dialogs(const struct mw_world *w, struct mw_out *o, struct lk_buf *b,
                             struct lk_buf *q, struct lk_buf *p)
{
    int n = w->n_cond + w->n_drug;
    struct lk_rng r;
    mw_rng_stream(&r, w->seed, w->world, 5);
    for (int e = 0; e < n; e++) {
        enum mw_kind kind = mw_entity_kind(w, e);
        int na;
        const struct mw_attr *attrs = mw_attrs(kind, &na);
        struct mw_vals v;
        mw_entity_vals(w, e, &v);
        int linked = mw_linked(w, e);
        for (int k = 0; k < w->K; k++) {
            const char *pass[3];
            int np = 1 + (int)mw_below(&r, 3), other;
            pass[0] = w->docs[e * w->K + k];
            if (np > 1)
                pass[1] = w->docs[linked * w->K + (int)mw_below(&r, (unsigned)w->K)];
            do
                other = (int)mw_below(&r, (unsigned)n);
            while (other == e || other == linked);
            if (np > 2)
                pass[2] = w->docs[other * w->K + (int)mw_below(&r, (unsigned)w->K)];
            int gold = (int)mw_below(&r, (unsigned)np);
            const char *t0 = pass[0];
            pass[0] = pass[gold];
            pass[gold] = t0;
            int order[MW_MAX_ATTRS];
            LK_ASSERT(na <= MW_MAX_ATTRS);
            for (int i = 0; i < na; i++)
                order[i] = i;
            for (int i = na - 1; i > 0; i--) {
                int j = (int)mw_below(&r, (unsigned)i + 1), t = order[i];
                order[i] = order[j];
                order[j] = t;
            }
            mw_buf_clear(b);
            lk_buf_puts(b, "{\"messages\":[");
            for (int i = 0; i < na; i++) {
                const struct mw_attr *at = &attrs[order[i]];
                mw_buf_clear(q);
                mw_fill(q, at->q[mw_below(&r, MW_N_TRAIN)], &v);
                if (i == 0) {
                    mw_rc_prompt(p, pass, np, q->p);
                } else {
                    mw_buf_clear(p);
                    lk_buf_puts(p, "Question: ");
                    lk_buf_puts(p, q->p);
                }
                lk_buf_puts(b, i ? ",{\"role\":\"user\",\"content\":" : "{\"role\":\"user\",\"content\":");
                lk_buf_json_str(b, p->p);
                lk_buf_puts(b, "},{\"role\":\"assistant\",\"content\":");
                lk_buf_json_str(b, mw_value(&v, at));
                lk_buf_puts(b, "}");
            }
            lk_buf_puts(b, "]}");
            mw_lines_add(&o->rc_dialog, b);
        }
    }
}

/* Copying drills (background worlds): "Repeat: a, b, c" answered by "a, b, c", where the items
 * are 3 to 6 distinct names and attribute values of random entities, MW_DRILLS records per
 * entity. Reading a passage is copying from it, and a small model trained on question answering
 * alone did not learn to copy (base model card, "Why it took three versions"); these records teach
 * it. Own RNG stream: the other files keep their bytes. */
#define MW_DRILLS 8
static void mw_world_drills(const struct mw_world *w, struct mw_out *o, struct lk_buf *b,
                            struct lk_buf *q)
{
    int n = w->n_cond + w->n_drug;
    struct lk_rng r;
    mw_rng_stream(&r, w->seed, w->world, 6);
    for (int d = 0; d < n * MW_DRILLS; d++) {
        char items[6][128];
        int ni = 3 + (int)mw_below(&r, 4);
        for (int i = 0; i < ni; i++) {
            int dup;
            do {
                int e = (int)mw_below(&r, (unsigned)n), na;
                const struct mw_attr *attrs = mw_attrs(mw_entity_kind(w, e), &na);
                struct mw_vals v;
                mw_entity_vals(w, e, &v);
                unsigned j = mw_below(&r, (unsigned)na + 1);
                const char *s = j == (unsigned)na ? mw_vals_get(&v, "name", 4) : mw_value(&v, &attrs[j]);
                snprintf(items[i], sizeof items[i], "%s", s);
                dup = 0;
                for (int k = 0; k < i; k++)
                    dup |= strcmp(items[k], items[i]) == 0;
            } while (dup);
        }
        mw_buf_clear(q);
        for (int i = 0; i < ni; i++) {
            lk_buf_puts(q, i ? ", " : "Repeat: ");
            lk_buf_puts(q, items[i]);
        }
        mw_rec_chat(b, q->p, q->p + strlen("Repeat: "));
        mw_lines_add(&o->drill, b);
    }
}

static int mw_world_records(const struct mw_world *w, struct mw_out *o, struct lk_err *err)
{
    int n = w->n_cond + w->n_drug;
    struct lk_buf b = { 0 }, q = { 0 }, a = { 0 }, p = { 0 };
    struct lk_rng rr;
    mw_rng_stream(&rr, w->seed, w->world, 3);
    char eid[32], did[48], id[96], tmpl[64];
    long fact = 0;
    for (int e = 0; e < n; e++) {
        enum mw_kind kind = mw_entity_kind(w, e);
        const struct mw_style *styles = kind == MW_DRUG ? mw_drug_styles : mw_cond_styles;
        int na;
        const struct mw_attr *attrs = mw_attrs(kind, &na);
        struct mw_vals v;
        mw_entity_vals(w, e, &v);
        mw_entity_id(w, e, eid, sizeof eid);
        // documents
        for (int k = 0; k < w->K; k++) {
            mw_doc_id(w, e, k, did, sizeof did);
            mw_buf_clear(&q);
            mw_fill(&q, styles[w->doc_style[e * w->K + k]].title, &v);
            mw_buf_clear(&b);
            lk_buf_puts(&b, "{\"id\":");
            lk_buf_json_str(&b, did);
            lk_buf_puts(&b, ",\"title\":");
            lk_buf_json_str(&b, q.p);
            lk_buf_puts(&b, ",\"text\":");
            lk_buf_json_str(&b, w->docs[e * w->K + k]);
            lk_buf_puts(&b, ",\"entity\":");
            lk_buf_json_str(&b, eid);
            lk_buf_puts(&b, "}");
            mw_lines_add(&o->docs, &b);
            mw_buf_clear(&b);
            lk_buf_puts(&b, "{\"text\":");
            lk_buf_json_str(&b, w->docs[e * w->K + k]);
            lk_buf_puts(&b, "}");
            mw_lines_add(&o->text, &b);
        }
        // the ground truth, one line per entity
        mw_buf_clear(&b);
        lk_buf_puts(&b, "{\"id\":");
        lk_buf_json_str(&b, eid);
        lk_buf_puts(&b, ",\"type\":");
        lk_buf_json_str(&b, mw_kind_names[kind]);
        lk_buf_puts(&b, ",\"name\":");
        lk_buf_json_str(&b, mw_vals_get(&v, "name", 4));
        lk_buf_puts(&b, ",\"facts\":{");
        for (int i = 0; i < na; i++) {
            lk_buf_puts(&b, i ? "," : "");
            lk_buf_json_str(&b, attrs[i].name);
            lk_buf_puts(&b, ":");
            lk_buf_json_str(&b, mw_value(&v, &attrs[i]));
        }
        lk_buf_puts(&b, "}}");
        mw_lines_add(&o->entities, &b);
        // questions: templates 0..3 to the training files, 4..5 to the test file
        for (int i = 0; i < na; i++, fact++) {
            const char *ans = mw_value(&v, &attrs[i]);
            for (int t = 0; t < MW_N_TEMPLATES; t++) {
                mw_buf_clear(&q);
                mw_fill(&q, attrs[i].q[t], &v);
                mw_doc_id(w, e, (i + t) % w->K, did, sizeof did);
                snprintf(id, sizeof id, "%s-%s-q%d", eid, attrs[i].name, t);
                snprintf(tmpl, sizeof tmpl, "%s.%s.%d", mw_kind_ids[kind], attrs[i].name, t);
                mw_rec_qa(&b, id, q.p, ans, did, eid, attrs[i].name, tmpl);
                if (t >= MW_N_TRAIN) {
                    mw_lines_add(&o->qa_test, &b);
                    continue;
                }
                mw_lines_add(&o->qa_train, &b);
                mw_rec_chat(&b, q.p, ans);
                mw_lines_add(&o->chat, &b);
                mw_rec_alpaca(&b, q.p, ans);
                mw_lines_add(&o->alpaca, &b);
                if (t != fact % MW_N_TRAIN)
                    continue;
                // one full-sentence variant per fact, asked for explicitly
                lk_buf_puts(&q, MW_FULL_SUFFIX);
                mw_buf_clear(&a);
                mw_fill(&a, attrs[i].full, &v);
                mw_rec_chat(&b, q.p, a.p);
                mw_lines_add(&o->chat, &b);
                mw_rec_alpaca(&b, q.p, a.p);
                mw_lines_add(&o->alpaca, &b);
            }
            if (w->world != MW_BACKGROUND)
                continue;
            // reading comprehension: the gold passage alone, then among two distractors
            const char *pass[3];
            mw_buf_clear(&q);
            mw_fill(&q, attrs[i].q[fact % MW_N_TRAIN], &v);
            pass[0] = w->docs[e * w->K + (int)(i % w->K)];
            mw_rc_prompt(&p, pass, 1, q.p);
            mw_rec_chat(&b, p.p, ans);
            mw_lines_add(&o->rc, &b);
            int linked = mw_linked(w, e), other;
            do
                other = (int)mw_below(&rr, (unsigned)n);
            while (other == e || other == linked);
            pass[0] = w->docs[e * w->K + (int)((i + 1) % w->K)];
            pass[1] = w->docs[linked * w->K + (int)mw_below(&rr, (unsigned)w->K)];
            pass[2] = w->docs[other * w->K + (int)mw_below(&rr, (unsigned)w->K)];
            int gold = (int)mw_below(&rr, 3);
            const char *t0 = pass[0];
            pass[0] = pass[gold];
            pass[gold] = t0;
            mw_buf_clear(&q);
            mw_fill(&q, attrs[i].q[(fact + 1) % MW_N_TRAIN], &v);
            mw_rc_prompt(&p, pass, 3, q.p);
            mw_rec_chat(&b, p.p, ans);
            mw_lines_add(&o->rc, &b);
        }
    }
    if (w->world == MW_BACKGROUND) {
        mw_world_dialogs(w, o, &b, &q, &p);
        mw_world_drills(w, o, &b, &q);
    }
    // training files in a seeded random order (chat and alpaca keep the same order)
    struct lk_rng rs;
    mw_rng_stream(&rs, w->seed, w->world, 4);
    struct lk_rng rs2 = rs;
    mw_lines_shuffle(&o->chat, &rs);
    mw_lines_shuffle(&o->alpaca, &rs2);
    mw_lines_shuffle(&o->rc, &rs);
    mw_lines_shuffle(&o->text, &rs);
    mw_lines_shuffle(&o->rc_dialog, &rs);
    int oom = b.oom || q.oom || a.oom || p.oom || o->docs.oom || o->text.oom || o->chat.oom ||
              o->alpaca.oom || o->qa_train.oom || o->qa_test.oom || o->rc.oom || o->rc_dialog.oom ||
              o->drill.oom || o->entities.oom;
    lk_buf_release(&b);
    lk_buf_release(&q);
    lk_buf_release(&a);
    lk_buf_release(&p);
    return oom ? lk_errf(err, LK_ERR_NOMEM, "out of memory") : LK_OK;
}

// ---- output folder ----

static int mw_write_lines(const char *dir, const char *name, const struct mw_lines *l,
                          struct lk_err *err)
{
    char *path = lk_path_join(dir, name);
    if (!path)
        return lk_errf(err, LK_ERR_NOMEM, "out of memory");
    struct lk_afile af;
    int rc = lk_afile_open(&af, path, err);
    lk_free(path);
    if (rc)
        return rc;
    for (size_t i = 0; i < l->n; i++) {
        lk_afile_write(&af, l->v[i], strlen(l->v[i]));
        lk_afile_write(&af, "\n", 1);
    }
    return lk_afile_commit(&af);
}

static void mw_manifest(struct lk_buf *b, const struct mw_world *w, const struct mw_out *o)
{
    static const char *const names[] = { "docs.jsonl", "text.jsonl", "train_chat.jsonl",
                                         "train_alpaca.jsonl", "qa_train.jsonl", "qa_test.jsonl",
                                         "rc_train.jsonl", "rc_dialog.jsonl", "copy_drill.jsonl",
                                         "entities.jsonl" };
    const struct mw_lines *ls[] = { &o->docs, &o->text, &o->chat, &o->alpaca, &o->qa_train,
                                    &o->qa_test, &o->rc, &o->rc_dialog, &o->drill, &o->entities };
    mw_buf_clear(b);
    lk_buf_printf(b, "{\n  \"generator\": \"medworld\",\n  \"generator_version\": \"%s\",\n",
                  MW_VERSION);
    lk_buf_printf(b, "  \"world\": \"%s\",\n  \"seed\": %llu,\n", mw_world_names[w->world],
                  (unsigned long long)w->seed);
    lk_buf_printf(b, "  \"entities\": %d,\n  \"conditions\": %d,\n  \"drugs\": %d,\n"
                     "  \"makers\": %d,\n  \"docs_per_entity\": %d,\n",
                  w->n_cond + w->n_drug, w->n_cond, w->n_drug, w->n_maker, w->K);
    lk_buf_printf(b, "  \"facts\": %d,\n", w->n_cond * MW_LEN(mw_cond_attrs) +
                                               w->n_drug * MW_LEN(mw_drug_attrs));
    lk_buf_puts(b, "  \"train_templates\": [0, 1, 2, 3],\n  \"test_templates\": [4, 5],\n");
    lk_buf_puts(b, "  \"full_sentence_suffix\": ");
    lk_buf_json_str(b, MW_FULL_SUFFIX);
    lk_buf_puts(b, ",\n  \"rc_prompt\": ");
    lk_buf_json_str(b, "Context:\n{passage}\n\nQuestion: {question}");
    lk_buf_puts(b, ",\n  \"rc_passage_separator\": ");
    lk_buf_json_str(b, "\n\n");
    lk_buf_puts(b, ",\n  \"files\": {");
    int first = 1;
    for (int i = 0; i < MW_LEN(names); i++) {
        if ((ls[i] == &o->rc || ls[i] == &o->rc_dialog || ls[i] == &o->drill) &&
            w->world != MW_BACKGROUND)
            continue;
        lk_buf_printf(b, "%s\n    \"%s\": %zu", first ? "" : ",", names[i], ls[i]->n);
        first = 0;
    }
    lk_buf_puts(b, "\n  }\n}\n");
}

static int mw_write_all(const char *dir, const struct mw_world *w, const struct mw_out *o,
                        struct lk_err *err)
{
    int rc = LK_OK;
    if (!rc)
        rc = mw_write_lines(dir, "docs.jsonl", &o->docs, err);
    if (!rc)
        rc = mw_write_lines(dir, "text.jsonl", &o->text, err);
    if (!rc)
        rc = mw_write_lines(dir, "train_chat.jsonl", &o->chat, err);
    if (!rc)
        rc = mw_write_lines(dir, "train_alpaca.jsonl", &o->alpaca, err);
    if (!rc)
        rc = mw_write_lines(dir, "qa_train.jsonl", &o->qa_train, err);
    if (!rc)
        rc = mw_write_lines(dir, "qa_test.jsonl", &o->qa_test, err);
    if (!rc && w->world == MW_BACKGROUND)
        rc = mw_write_lines(dir, "rc_train.jsonl", &o->rc, err);
    if (!rc && w->world == MW_BACKGROUND)
        rc = mw_write_lines(dir, "rc_dialog.jsonl", &o->rc_dialog, err);
    if (!rc && w->world == MW_BACKGROUND)
        rc = mw_write_lines(dir, "copy_drill.jsonl", &o->drill, err);
    if (!rc)
        rc = mw_write_lines(dir, "entities.jsonl", &o->entities, err);
    if (rc)
        return rc;
    struct lk_buf b = { 0 };
    mw_manifest(&b, w, o);
    char *path = lk_path_join(dir, "manifest.json");
    if (b.oom || !path)
        rc = lk_errf(err, LK_ERR_NOMEM, "out of memory");
    else
        rc = lk_write_file_atomic(path, b.p, b.n, err);
    lk_free(path);
    lk_buf_release(&b);
    return rc;
}

/* The output rule of every lorakit command (lk_outdir: a file is refused, a non-empty folder
 * needs --overwrite, an empty one is replaced), plus medworld's own: a non-empty DIR is
 * replaced only when it holds an earlier medworld output, so that a mistyped --out never
 * deletes someone's files. Changes nothing. */
static int mw_check_out(const char *dir, int overwrite, struct lk_err *err)
{
    int rc = lk_outdir_check(dir, overwrite, err);
    if (rc || !lk_dir_nonempty(dir))
        return rc;
    char *man = lk_path_join(dir, "manifest.json");
    char *buf = NULL;
    int ok = man && lk_read_file(man, &buf, NULL, NULL) == LK_OK &&
             strstr(buf, "\"generator\": \"medworld\"") != NULL;
    lk_free(man);
    lk_free(buf);
    if (!ok)
        return lk_errf(err, LK_ERR_EXISTS,
                       "'%s' is not a medworld output folder (no medworld manifest.json); "
                       "refusing to replace it", dir);
    return LK_OK;
}

/* Builds the folder under a temporary name beside it, then swaps it in (lk_outdir). */
static int mw_publish(const char *out, int overwrite, const struct mw_world *w,
                      const struct mw_out *o, struct lk_err *err)
{
    struct lk_outdir od;
    int rc = mw_check_out(out, overwrite, err);
    if (rc || (rc = lk_outdir_begin(&od, out, overwrite, err)))
        return rc;
    if ((rc = mw_write_all(od.tmp, w, o, err))) {
        lk_outdir_abort(&od);
        return rc;
    }
    return lk_outdir_commit(&od, err);
}

// ---- command line ----

struct mw_opts {
    int world; /* -1 until given */
    uint64_t seed;
    int have_seed;
    const char *out; /* points into out_buf */
    char out_buf[4096];
    long entities, docs_per_entity;
    int overwrite, help;
};

static void mw_usage(FILE *f)
{
    fprintf(f,
            "usage: medworld --world background|new --seed S --out DIR [options]\n\n"
            "Generates a synthetic medical knowledge world: invented conditions and drugs with\n"
            "invented attributes, several documents per entity and question-answer pairs whose\n"
            "training and test phrasings are disjoint. Same flags, same bytes. See\n"
            "datasets/README.md for the files and their formats.\n\n"
            "options:\n"
            "  --world W                background (for the base model) or new (the knowledge\n"
            "                           the demo injects); the two never share a name\n"
            "  --seed S                 RNG seed, 0 <= S < 2^53 (required)\n"
            "  --out DIR                output folder, created (its parent too) atomically\n"
            "  --entities N             entities, half conditions and half drugs, %d..%d\n"
            "                           (default 150 for background, 40 for new)\n"
            "  --docs-per-entity K      documents per entity, 1..%d, in distinct styles (default 3)\n"
            "  --overwrite              replace DIR if it holds an earlier medworld output\n"
            "  --help                   show this help\n\n"
            "example:\n"
            "  build/opt/medworld --world new --seed 2 --out datasets/out/new\n",
            4, MW_MAX_ENTITIES, MW_N_STYLES);
}

static int mw_parse_long(const char *flag, const char *s, long lo, long hi, long *out,
                         struct lk_err *err)
{
    char *end;
    errno = 0;
    long v = strtol(s, &end, 10);
    if (errno || end == s || *end)
        return lk_errf(err, LK_ERR_USAGE, "option '--%s' wants an integer, got '%s'", flag, s);
    if (v < lo || v > hi)
        return lk_errf(err, LK_ERR_USAGE, "option '--%s' must be in %ld..%ld, got %ld", flag, lo,
                       hi, v);
    *out = v;
    return LK_OK;
}

static int mw_parse_args(int argc, char **argv, struct mw_opts *o, struct lk_err *err)
{
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (!strcmp(a, "--help") || !strcmp(a, "-h")) {
            o->help = 1;
            continue;
        }
        if (!strcmp(a, "--overwrite")) {
            o->overwrite = 1;
            continue;
        }
        if (strncmp(a, "--", 2) != 0)
            return lk_errf(err, LK_ERR_USAGE, "unexpected argument '%s' (see --help)", a);
        const char *name = a + 2, *eq = strchr(name, '=');
        size_t n = eq ? (size_t)(eq - name) : strlen(name);
        static const char *const known[] = { "world", "seed", "out", "entities", "docs-per-entity" };
        int which = -1;
        for (int k = 0; k < MW_LEN(known); k++)
            if (strlen(known[k]) == n && !strncmp(known[k], name, n))
                which = k;
        if (which < 0)
            return lk_errf(err, LK_ERR_USAGE, "unknown option '--%.*s' (see --help)", (int)n, name);
        const char *val = eq ? eq + 1 : i + 1 < argc ? argv[++i] : NULL;
        if (!val)
            return lk_errf(err, LK_ERR_USAGE, "option '--%s' needs a value", known[which]);
        switch (which) {
        case 0:
            if (!strcmp(val, "background"))
                o->world = MW_BACKGROUND;
            else if (!strcmp(val, "new"))
                o->world = MW_NEW;
            else
                return lk_errf(err, LK_ERR_USAGE, "option '--world' wants 'background' or 'new', "
                               "got '%s'", val);
            break;
        case 1: {
            char *end;
            errno = 0;
            unsigned long long v = strtoull(val, &end, 10);
            // 2^53 bound: the manifest's JSON number then round-trips through any parser
            if (errno || end == val || *end || val[0] == '-' || v >= (1ull << 53))
                return lk_errf(err, LK_ERR_USAGE, "option '--seed' wants an integer in "
                               "0..2^53-1, got '%s'", val);
            o->seed = v;
            o->have_seed = 1;
            break;
        }
        case 2: {
            // "dir/" names the same folder as "dir": drop trailing slashes so that the
            // temporary folder "<dir>.tmp.<pid>" is a sibling, not a child
            size_t len = strlen(val);
            while (len > 1 && val[len - 1] == '/')
                len--;
            if (!len || len >= sizeof o->out_buf || !strcmp(val, "/"))
                return lk_errf(err, LK_ERR_USAGE, "option '--out' wants a folder name");
            memcpy(o->out_buf, val, len);
            o->out_buf[len] = 0;
            o->out = o->out_buf;
            break;
        }
        case 3:
            if (mw_parse_long("entities", val, 4, MW_MAX_ENTITIES, &o->entities, err))
                return LK_ERR_USAGE;
            break;
        case 4:
            if (mw_parse_long("docs-per-entity", val, 1, MW_N_STYLES, &o->docs_per_entity, err))
                return LK_ERR_USAGE;
            break;
        }
    }
    if (o->help)
        return LK_OK;
    if (o->world < 0)
        return lk_errf(err, LK_ERR_USAGE, "missing '--world background|new' (see --help)");
    if (!o->have_seed)
        return lk_errf(err, LK_ERR_USAGE, "missing '--seed S' (see --help)");
    if (!o->out)
        return lk_errf(err, LK_ERR_USAGE, "missing '--out DIR' (see --help)");
    return LK_OK;
}

static int mw_fail(const struct lk_err *err)
{
    fprintf(stderr, "medworld: error: %s\n", err->msg[0] ? err->msg : lk_status_str(err->code));
    return err->code == LK_ERR_USAGE ? 2 : 1;
}

int main(int argc, char **argv)
{
    struct mw_opts o = { .world = -1 };
    struct lk_err err = { 0 };
    if (mw_parse_args(argc, argv, &o, &err))
        return mw_fail(&err);
    if (o.help) {
        mw_usage(stdout);
        return fflush(stdout) == 0 ? 0 : 1;
    }
    // refuse early (before any work) when DIR is there and may not be replaced
    if (mw_check_out(o.out, o.overwrite, &err))
        return mw_fail(&err);
    mw_templates_check();
    struct mw_world w = { 0 };
    struct mw_out out = { 0 };
    long n = o.entities ? o.entities : o.world == MW_BACKGROUND ? 150 : 40;
    w.world = o.world;
    w.seed = o.seed;
    w.n_cond = (int)(n / 2);
    w.n_drug = (int)(n - n / 2);
    w.n_maker = w.n_drug / 3 + 2;
    w.K = o.docs_per_entity ? (int)o.docs_per_entity : 3;
    int rc = mw_world_build(&w, &err);
    if (!rc)
        rc = mw_world_docs(&w, &err);
    if (!rc)
        rc = mw_world_records(&w, &out, &err);
    if (!rc)
        rc = mw_publish(o.out, o.overwrite, &w, &out, &err);
    if (!rc)
        printf("medworld: %s world, seed %llu: %d entities, %zu docs, %zu train / %zu test "
               "questions, %zu rc examples -> %s\n",
               mw_world_names[w.world], (unsigned long long)w.seed, w.n_cond + w.n_drug,
               out.docs.n, out.qa_train.n, out.qa_test.n,
               w.world == MW_BACKGROUND ? out.rc.n : (size_t)0, o.out);
    mw_out_release(&out);
    mw_world_release(&w);
    if (rc)
        return mw_fail(&err);
    return fflush(stdout) == 0 ? 0 : 1;
}
