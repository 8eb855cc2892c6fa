/*
 * test_datasets.c - the medworld generator (datasets/medworld.c), run as a program: same seed
 * same bytes, disjoint train/test phrasings, answers found verbatim in their documents, two
 * worlds that share no names, well-formed JSONL with the counts the manifest claims, and the
 * CLI's refusals. The binary comes from $MEDWORLD (set by `make test`), else build/opt/medworld.
 */
#include "test.h"

#include <cjson/cJSON.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "../libcore/lk.h"

static const char *const ds_files[] = { "docs.jsonl", "text.jsonl", "train_chat.jsonl",
                                        "train_alpaca.jsonl", "qa_train.jsonl", "qa_test.jsonl",
                                        "rc_train.jsonl", "rc_dialog.jsonl", "copy_drill.jsonl",
                                        "entities.jsonl", "manifest.json" };
#define DS_N_FILES ((int)(sizeof ds_files / sizeof ds_files[0]))
#define DS_SUFFIX " Answer in a full sentence."

static const char *ds_bin(void)
{
    const char *p = getenv("MEDWORLD");
    return p && *p ? p : "build/opt/medworld";
}

/* Generates a world into test_path(dir); 0 on success (else the test has failed). */
static int ds_gen(const char *world, long seed, const char *dir, const char *extra)
{
    if (access(ds_bin(), X_OK) != 0) {
        test_fail(__FILE__, __LINE__, "%s: not built (run through `make test`)", ds_bin());
        return -1;
    }
    int rc = test_sh("'%s' --world %s --seed %ld --out '%s' %s", ds_bin(), world, seed,
                     test_path(dir), extra ? extra : "");
    if (rc != 0) {
        test_fail(__FILE__, __LINE__, "medworld exited %d: %s", rc, test_output());
        return -1;
    }
    return 0;
}

// ---- JSONL loading ----

struct ds_jl {
    cJSON **v; /* owned: one parsed value per line */
    int n;
};

static void ds_jl_free(struct ds_jl *j)
{
    for (int i = 0; i < j->n; i++)
        cJSON_Delete(j->v[i]);
    free(j->v);
    memset(j, 0, sizeof *j);
}

/* Parses every line of dir/name with cJSON; a line that does not parse fails the test. */
static int ds_jl_load(struct ds_jl *j, const char *dir, const char *name)
{
    char path[1024];
    char *buf;
    size_t len;
    memset(j, 0, sizeof *j);
    snprintf(path, sizeof path, "%s/%s", test_path(dir), name);
    if (lk_read_file(path, &buf, &len, test_err()) != LK_OK) {
        test_fail(__FILE__, __LINE__, "%s", test_errmsg());
        return -1;
    }
    int lines = 0;
    for (size_t i = 0; i < len; i++)
        lines += buf[i] == '\n';
    j->v = calloc((size_t)lines + 1, sizeof *j->v);
    char *p = buf;
    int lineno = 0;
    while (*p) {
        char *nl = strchr(p, '\n');
        lineno++;
        if (!nl) {
            test_fail(__FILE__, __LINE__, "%s:%d: last line has no newline", path, lineno);
            break;
        }
        *nl = 0;
        cJSON *v = cJSON_Parse(p);
        if (!v || !cJSON_IsObject(v)) {
            test_fail(__FILE__, __LINE__, "%s:%d: not a JSON object: %.80s", path, lineno, p);
            cJSON_Delete(v);
            break;
        }
        j->v[j->n++] = v;
        p = nl + 1;
    }
    lk_free(buf);
    if (test_failed()) {
        ds_jl_free(j);
        return -1;
    }
    return 0;
}

/* The string field `key`, or NULL when absent, not a string or empty. */
static const char *ds_str(const cJSON *o, const char *key)
{
    const cJSON *f = cJSON_GetObjectItemCaseSensitive(o, key);
    return cJSON_IsString(f) && f->valuestring[0] ? f->valuestring : NULL;
}

/* Message k of a record of any length: its content if its role is role, else NULL. */
static const char *ds_turn(const cJSON *o, int k, const char *role)
{
    const cJSON *m = cJSON_GetObjectItemCaseSensitive(o, "messages");
    const cJSON *e = cJSON_IsArray(m) ? cJSON_GetArrayItem(m, k) : NULL;
    const char *r = e ? ds_str(e, "role") : NULL;
    return r && !strcmp(r, role) ? ds_str(e, "content") : NULL;
}

static int ds_turns(const cJSON *o)
{
    const cJSON *m = cJSON_GetObjectItemCaseSensitive(o, "messages");
    return cJSON_IsArray(m) ? cJSON_GetArraySize(m) : -1;
}

/* Message k of a two-message record (user, then assistant): its content, else NULL. */
static const char *ds_msg(const cJSON *o, int k)
{
    return ds_turns(o) == 2 ? ds_turn(o, k, k == 0 ? "user" : "assistant") : NULL;
}

static int ds_cmp_str(const void *a, const void *b)
{
    return strcmp(*(const char *const *)a, *(const char *const *)b);
}

/* Sorted array of the `key` strings of a JSONL file (borrowed from j). */
static const char **ds_sorted(const struct ds_jl *j, const char *key)
{
    const char **v = calloc((size_t)j->n + 1, sizeof *v);
    for (int i = 0; i < j->n; i++)
        v[i] = ds_str(j->v[i], key) ? ds_str(j->v[i], key) : "";
    qsort(v, (size_t)j->n, sizeof *v, ds_cmp_str);
    return v;
}

static int ds_has(const char **sorted, int n, const char *s)
{
    return bsearch(&s, sorted, (size_t)n, sizeof *sorted, ds_cmp_str) != NULL;
}

// ---- determinism ----

TEST(datasets_same_seed_same_bytes)
{
    if (ds_gen("background", 7, "a", NULL) || ds_gen("background", 7, "b", NULL))
        return;
    for (int i = 0; i < DS_N_FILES; i++)
        CHECK_MSG(test_sh("cmp '%s/%s' '%s/%s'", test_path("a"), ds_files[i], test_path("b"),
                          ds_files[i]) == 0, "%s differs: %s", ds_files[i], test_output());
    if (ds_gen("new", 7, "c", "--entities 12 --docs-per-entity 2") ||
        ds_gen("new", 7, "d", "--entities 12 --docs-per-entity 2"))
        return;
    CHECK_MSG(test_sh("diff -r '%s' '%s'", test_path("c"), test_path("d")) == 0, "%s", test_output());
}

TEST(datasets_other_seed_other_world)
{
    if (ds_gen("new", 7, "a", NULL) || ds_gen("new", 8, "b", NULL))
        return;
    CHECK(test_sh("cmp -s '%s/docs.jsonl' '%s/docs.jsonl'", test_path("a"), test_path("b")) == 1);
    CHECK(test_sh("cmp -s '%s/entities.jsonl' '%s/entities.jsonl'", test_path("a"),
                  test_path("b")) == 1);
    // not just renamed: the facts drawn from the shared vocabularies differ too
    CHECK(test_sh("cd '%s' && for w in a b; do grep -o -e '\"dose\":\"[^\"]*\"' "
                  "-e '\"interval\":\"[^\"]*\"' -e '\"symptom\":\"[^\"]*\"' $w/entities.jsonl "
                  "> $w.facts; done; test -s a.facts && cmp -s a.facts b.facts",
                  test_tmpdir()) == 1);
}

TEST(datasets_docs_per_entity_keeps_facts)
{
    if (ds_gen("new", 3, "a", "--docs-per-entity 1") || ds_gen("new", 3, "b", "--docs-per-entity 4"))
        return;
    CHECK_MSG(test_sh("cmp '%s/entities.jsonl' '%s/entities.jsonl'", test_path("a"),
                      test_path("b")) == 0, "%s", test_output());
    struct ds_jl d;
    if (ds_jl_load(&d, "b", "docs.jsonl"))
        return;
    CHECK_INT(d.n, 40 * 4);
    ds_jl_free(&d);
}

// ---- the split ----

static void ds_check_disjoint(const char *dir)
{
    struct ds_jl tr, te, chat, alp, rc = { 0 }, dlg = { 0 };
    if (ds_jl_load(&tr, dir, "qa_train.jsonl"))
        return;
    if (ds_jl_load(&te, dir, "qa_test.jsonl") || ds_jl_load(&chat, dir, "train_chat.jsonl") ||
        ds_jl_load(&alp, dir, "train_alpaca.jsonl"))
        return;
    char rcpath[1024];
    snprintf(rcpath, sizeof rcpath, "%s/rc_train.jsonl", test_path(dir));
    int has_rc = lk_file_exists(rcpath);
    if (has_rc && (ds_jl_load(&rc, dir, "rc_train.jsonl") || ds_jl_load(&dlg, dir, "rc_dialog.jsonl")))
        return;
    CHECK(tr.n > 0 && te.n > 0);
    CHECK_INT(tr.n, 2 * te.n); // 4 train and 2 test templates per fact
    const char **trq = ds_sorted(&tr, "question"), **teq = ds_sorted(&te, "question");
    const char **trt = ds_sorted(&tr, "template"), **tet = ds_sorted(&te, "template");
    // 1. no test question string is a training question; no template id is on both sides
    for (int i = 0; i < te.n; i++) {
        CHECK_MSG(!ds_has(trq, tr.n, teq[i]), "test question also in training: %s", teq[i]);
        CHECK_MSG(!ds_has(trt, tr.n, tet[i]), "template on both sides: %s", tet[i]);
        const char *dot = strrchr(tet[i], '.');
        CHECK_MSG(dot && (!strcmp(dot, ".4") || !strcmp(dot, ".5")), "test template %s", tet[i]);
    }
    for (int i = 0; i < tr.n; i++) {
        const char *dot = strrchr(trt[i], '.');
        CHECK_MSG(dot && dot[1] >= '0' && dot[1] <= '3' && !dot[2], "train template %s", trt[i]);
    }
    // 2. every training-file prompt is a training question (or one with the full-sentence
    //    suffix), never a test phrasing; chat and alpaca hold the same pairs
    CHECK_INT(chat.n, alp.n);
    int full = 0;
    for (int i = 0; i < chat.n; i++) {
        const char *u = ds_msg(chat.v[i], 0), *a = ds_msg(chat.v[i], 1);
        CHECK_MSG(u && a, "train_chat line %d malformed", i + 1);
        CHECK(!strcmp(u, ds_str(alp.v[i], "instruction")));
        CHECK(!strcmp(a, ds_str(alp.v[i], "output")));
        char q[1024];
        snprintf(q, sizeof q, "%s", u);
        size_t n = strlen(q), ns = strlen(DS_SUFFIX);
        if (n > ns && !strcmp(q + n - ns, DS_SUFFIX)) {
            q[n - ns] = 0;
            full++;
        }
        CHECK_MSG(ds_has(trq, tr.n, q) && !ds_has(teq, te.n, q), "not a training question: %s", u);
    }
    CHECK_INT(chat.n, tr.n + full);
    CHECK_INT(full, tr.n / 4); // one full-sentence answer per fact
    // 3. reading comprehension asks training phrasings only
    for (int i = 0; i < rc.n; i++) {
        const char *u = ds_msg(rc.v[i], 0);
        const char *q = u ? strstr(u, "\n\nQuestion: ") : NULL;
        CHECK_MSG(q, "rc line %d has no question", i + 1);
        q += strlen("\n\nQuestion: ");
        CHECK_MSG(ds_has(trq, tr.n, q) && !ds_has(teq, te.n, q), "rc question %s", q);
    }
    //    and so do the reading dialogs, in every turn
    for (int i = 0; i < dlg.n; i++)
        for (int k = 0; k < ds_turns(dlg.v[i]); k += 2) {
            const char *u = ds_turn(dlg.v[i], k, "user");
            const char *q = u ? strstr(u, "Question: ") : NULL;
            CHECK_MSG(q, "rc_dialog line %d turn %d has no question", i + 1, k);
            q += strlen("Question: ");
            CHECK_MSG(ds_has(trq, tr.n, q) && !ds_has(teq, te.n, q), "rc_dialog question %s", q);
        }
    free(trq);
    free(teq);
    free(trt);
    free(tet);
    ds_jl_free(&tr);
    ds_jl_free(&te);
    ds_jl_free(&chat);
    ds_jl_free(&alp);
    ds_jl_free(&rc);
    ds_jl_free(&dlg);
}

TEST(datasets_train_test_phrasings_disjoint)
{
    if (ds_gen("background", 1, "bg", NULL) || ds_gen("new", 2, "nw", NULL))
        return;
    ds_check_disjoint("bg");
    if (test_failed())
        return;
    ds_check_disjoint("nw");
}

// ---- facts ----

/* Every QA answer is verbatim in the document its doc_id names, and equals the entity's fact. */
static void ds_check_answers(const char *dir, const char *qa_file)
{
    struct ds_jl docs, qa, ents;
    if (ds_jl_load(&docs, dir, "docs.jsonl"))
        return;
    if (ds_jl_load(&qa, dir, qa_file) || ds_jl_load(&ents, dir, "entities.jsonl"))
        return;
    for (int i = 0; i < qa.n; i++) {
        const char *id = ds_str(qa.v[i], "id"), *q = ds_str(qa.v[i], "question");
        const char *a = ds_str(qa.v[i], "answer"), *did = ds_str(qa.v[i], "doc_id");
        const char *eid = ds_str(qa.v[i], "entity"), *attr = ds_str(qa.v[i], "attribute");
        CHECK_MSG(id && q && a && did && eid && attr, "%s line %d: missing field", qa_file, i + 1);
        const char *text = NULL;
        for (int k = 0; k < docs.n && !text; k++)
            if (!strcmp(ds_str(docs.v[k], "id"), did))
                text = ds_str(docs.v[k], "text");
        CHECK_MSG(text, "%s: doc_id '%s' not in docs.jsonl", id, did);
        CHECK_MSG(strstr(text, a), "%s: answer '%s' not in %s: %s", id, a, did, text);
        const cJSON *ent = NULL;
        for (int k = 0; k < ents.n && !ent; k++)
            if (!strcmp(ds_str(ents.v[k], "id"), eid))
                ent = ents.v[k];
        CHECK_MSG(ent, "%s: entity '%s' unknown", id, eid);
        CHECK_MSG(strstr(q, ds_str(ent, "name")), "%s: question does not name the entity", id);
        const char *fact = ds_str(cJSON_GetObjectItemCaseSensitive(ent, "facts"), attr);
        CHECK_MSG(fact && !strcmp(fact, a), "%s: answer '%s' is not the fact '%s'", id, a,
                  fact ? fact : "(none)");
    }
    ds_jl_free(&docs);
    ds_jl_free(&qa);
    ds_jl_free(&ents);
}

TEST(datasets_answers_in_their_documents)
{
    if (ds_gen("new", 2, "nw", NULL) || ds_gen("background", 1, "bg", "--entities 60"))
        return;
    ds_check_answers("nw", "qa_test.jsonl");
    ds_check_answers("nw", "qa_train.jsonl");
    ds_check_answers("bg", "qa_test.jsonl");
}

/* No invented name of world a (entity, maker, cause, target) appears in any text of world b. */
static void ds_check_no_shared_names(const char *a, const char *b)
{
    struct ds_jl ea, db;
    if (ds_jl_load(&ea, a, "entities.jsonl"))
        return;
    if (ds_jl_load(&db, b, "docs.jsonl"))
        return;
    static const char *const invented[] = { "cause", "target", "maker" };
    for (int i = 0; i < ea.n; i++) {
        const char *names[4] = { ds_str(ea.v[i], "name") };
        const cJSON *facts = cJSON_GetObjectItemCaseSensitive(ea.v[i], "facts");
        for (int k = 0; k < 3; k++)
            names[k + 1] = ds_str(facts, invented[k]);
        for (int k = 0; k < 4; k++) {
            if (!names[k])
                continue;
            for (int d = 0; d < db.n; d++)
                CHECK_MSG(!strstr(ds_str(db.v[d], "text"), names[k]),
                          "'%s' of %s appears in %s doc %s", names[k], a, b, ds_str(db.v[d], "id"));
        }
    }
    ds_jl_free(&ea);
    ds_jl_free(&db);
}

TEST(datasets_worlds_share_no_names)
{
    // the demo's seeds, and the same seed for both worlds (the name spaces, not the seeds,
    // keep the worlds apart)
    if (ds_gen("background", 1, "bg1", NULL) || ds_gen("new", 2, "nw2", NULL) ||
        ds_gen("background", 5, "bg5", NULL) || ds_gen("new", 5, "nw5", NULL))
        return;
    ds_check_no_shared_names("bg1", "nw2");
    if (!test_failed())
        ds_check_no_shared_names("nw2", "bg1");
    if (!test_failed())
        ds_check_no_shared_names("bg5", "nw5");
    if (!test_failed())
        ds_check_no_shared_names("nw5", "bg5");
    // and within a world every entity name is unique
    CHECK(test_sh("cd '%s' && grep -o '\"name\":\"[^\"]*\"' bg1/entities.jsonl | sort | uniq -d "
                  "| wc -l | grep -qx 0", test_tmpdir()) == 0);
}

// ---- formats ----

static void ds_check_formats(const char *dir, int background)
{
    char path[1024];
    snprintf(path, sizeof path, "%s/manifest.json", test_path(dir));
    char *buf;
    CHECK_OK(lk_read_file(path, &buf, NULL, test_err()));
    cJSON *man = cJSON_Parse(buf);
    lk_free(buf);
    CHECK_MSG(man, "manifest.json does not parse");
    struct ds_jl docs;
    if (ds_jl_load(&docs, dir, "docs.jsonl")) {
        cJSON_Delete(man);
        return;
    }
    CHECK(!strcmp(ds_str(man, "generator"), "medworld"));
    CHECK(!strcmp(ds_str(man, "world"), background ? "background" : "new"));
    const cJSON *files = cJSON_GetObjectItemCaseSensitive(man, "files");
    CHECK_INT(cJSON_GetArraySize(files), background ? 10 : 7);
    static const char *const required[][4] = {
        { "docs.jsonl", "id", "title", "text" },      { "text.jsonl", "text", NULL, NULL },
        { "train_chat.jsonl", NULL, NULL, NULL },     { "train_alpaca.jsonl", "instruction", "output", NULL },
        { "qa_train.jsonl", "id", "question", "answer" }, { "qa_test.jsonl", "id", "question", "answer" },
        { "rc_train.jsonl", NULL, NULL, NULL },       { "entities.jsonl", "id", "name", NULL },
        { "rc_dialog.jsonl", NULL, NULL, NULL },      { "copy_drill.jsonl", NULL, NULL, NULL },
    };
    for (int f = 0; f < 10; f++) {
        const char *name = required[f][0];
        snprintf(path, sizeof path, "%s/%s", test_path(dir), name);
        if (!background && (!strncmp(name, "rc_", 3) || !strcmp(name, "copy_drill.jsonl"))) {
            CHECK_MSG(!lk_file_exists(path), "%s in the new world", name);
            continue;
        }
        struct ds_jl j;
        if (ds_jl_load(&j, dir, name))
            break;
        // the manifest's count against an independent count of newlines
        const cJSON *cnt = cJSON_GetObjectItemCaseSensitive(files, name);
        CHECK_MSG(cJSON_IsNumber(cnt), "manifest has no count for %s", name);
        CHECK_INT(test_sh("wc -l < '%s' | tr -d ' ' | grep -qx %d", path, cnt->valueint), 0);
        CHECK_INT(j.n, cnt->valueint);
        CHECK(j.n > 0);
        for (int i = 0; i < j.n; i++) {
            for (int k = 1; k < 4; k++)
                CHECK_MSG(!required[f][k] || ds_str(j.v[i], required[f][k]),
                          "%s:%d: missing field '%s'", name, i + 1, required[f][k]);
            if (strstr(name, "qa_"))
                CHECK_MSG(ds_str(j.v[i], "doc_id"), "%s:%d: missing 'doc_id'", name, i + 1);
            if (!strcmp(name, "train_alpaca.jsonl"))
                CHECK(cJSON_IsString(cJSON_GetObjectItemCaseSensitive(j.v[i], "input")));
            if (!strcmp(name, "train_chat.jsonl") || !strcmp(name, "rc_train.jsonl"))
                CHECK_MSG(ds_msg(j.v[i], 0) && ds_msg(j.v[i], 1), "%s:%d: bad messages", name, i + 1);
            if (!strcmp(name, "rc_train.jsonl")) {
                // the documented prompt: "Context:\n<passages>\n\nQuestion: <q>", answer in it
                const char *u = ds_msg(j.v[i], 0), *a = ds_msg(j.v[i], 1);
                const char *q = strstr(u, "\n\nQuestion: ");
                CHECK_MSG(!strncmp(u, "Context:\n", 9) && q && !strstr(q + 1, "\n\nQuestion: "),
                          "rc_train.jsonl:%d: prompt format", i + 1);
                char *ctx = strndup(u, (size_t)(q - u));
                int found = strstr(ctx, a) != NULL;
                free(ctx);
                CHECK_MSG(found, "rc_train.jsonl:%d: answer not in the context", i + 1);
            }
            if (!strcmp(name, "copy_drill.jsonl")) {
                // "Repeat: a, b, c" -> "a, b, c": 3 to 6 distinct items, each a name or an
                // attribute value of this world (it occurs in one of its documents)
                const char *u = ds_msg(j.v[i], 0), *a = ds_msg(j.v[i], 1);
                CHECK_MSG(u && a && !strncmp(u, "Repeat: ", 8) && !strcmp(u + 8, a),
                          "copy_drill.jsonl:%d: not a drill", i + 1);
                if (!a)
                    continue;
                char *items = strdup(a), *save = NULL;
                int ni = 0;
                for (char *it = strtok_r(items, ",", &save); it; it = strtok_r(NULL, ",", &save)) {
                    while (*it == ' ')
                        it++;
                    ni++;
                    int found = 0;
                    for (int d = 0; d < docs.n && !found; d++)
                        found = strstr(ds_str(docs.v[d], "text"), it) != NULL;
                    CHECK_MSG(found, "copy_drill.jsonl:%d: '%s' is in no document", i + 1, it);
                }
                free(items);
                CHECK_MSG(ni >= 3 && ni <= 6, "copy_drill.jsonl:%d: %d items", i + 1, ni);
            }
            if (!strcmp(name, "rc_dialog.jsonl")) {
                // one context, then user/assistant turns: every attribute of the entity once
                // (5 for a condition, 8 for a drug), each answer in the context
                int nt = ds_turns(j.v[i]);
                CHECK_MSG(nt == 10 || nt == 16, "rc_dialog.jsonl:%d: %d messages", i + 1, nt);
                const char *u = ds_turn(j.v[i], 0, "user");
                const char *q = u ? strstr(u, "\n\nQuestion: ") : NULL;
                CHECK_MSG(u && !strncmp(u, "Context:\n", 9) && q && !strstr(q + 1, "\n\nQuestion: "),
                          "rc_dialog.jsonl:%d: prompt format", i + 1);
                if (!q)
                    continue;
                for (int k = 1; k < nt; k += 2) {
                    const char *a = ds_turn(j.v[i], k, "assistant");
                    const char *uk = ds_turn(j.v[i], k - 1, "user");
                    CHECK_MSG(a && uk && (k == 1 || !strncmp(uk, "Question: ", 10)),
                              "rc_dialog.jsonl:%d: turn %d", i + 1, k);
                    if (!a)
                        break;
                    const char *hit = strstr(u, a);
                    CHECK_MSG(hit && hit < q, "rc_dialog.jsonl:%d: answer '%s' not in the context", i + 1, a);
                }
            }
        }
        ds_jl_free(&j);
    }
    const cJSON *facts = cJSON_GetObjectItemCaseSensitive(man, "facts");
    const cJSON *qa = cJSON_GetObjectItemCaseSensitive(files, "qa_test.jsonl");
    CHECK(cJSON_IsNumber(facts) && cJSON_IsNumber(qa) && qa->valueint == 2 * facts->valueint);
    ds_jl_free(&docs);
    cJSON_Delete(man);
}

TEST(datasets_jsonl_wellformed_and_counted)
{
    if (ds_gen("background", 1, "bg", NULL) || ds_gen("new", 2, "nw", NULL))
        return;
    ds_check_formats("bg", 1);
    if (!test_failed())
        ds_check_formats("nw", 0);
    // the default sizes the data card documents
    CHECK_INT(test_sh("grep -q '\"entities\": 150' '%s/manifest.json'", test_path("bg")), 0);
    CHECK_INT(test_sh("grep -q '\"entities\": 40' '%s/manifest.json'", test_path("nw")), 0);
}

// ---- the command line ----

TEST(datasets_cli_refuses_and_replaces)
{
    CHECK_INT(test_sh("'%s' --help", ds_bin()), 0);
    CHECK(strstr(test_output(), "example:") && strstr(test_output(), "--overwrite"));
    char o[1024], mine[1024], empty[1024]; // test_path's buffers rotate: keep our own copies
    snprintf(o, sizeof o, "%s", test_path("w"));
    snprintf(mine, sizeof mine, "%s", test_path("mine"));
    snprintf(empty, sizeof empty, "%s", test_path("empty"));
    CHECK_INT(test_sh("'%s' --world new --out '%s'", ds_bin(), o), 2); // no seed
    CHECK(strstr(test_output(), "medworld: error: missing '--seed"));
    CHECK_INT(test_sh("'%s' --world old --seed 1 --out '%s'", ds_bin(), o), 2);
    CHECK_INT(test_sh("'%s' --world new --seed 1x --out '%s'", ds_bin(), o), 2);
    CHECK_INT(test_sh("'%s' --world new --seed 1 --entities abc --out '%s'", ds_bin(), o), 2);
    CHECK_INT(test_sh("'%s' --world new --seed 1 --docs-per-entity 9 --out '%s'", ds_bin(), o), 2);
    CHECK_INT(test_sh("'%s' --world new --seed 1 --bogus --out '%s'", ds_bin(), o), 2);
    CHECK(!lk_file_exists(o));
    // an existing output is kept unless --overwrite
    if (ds_gen("new", 1, "w", "--entities 8"))
        return;
    CHECK_INT(test_sh("cp '%s/docs.jsonl' '%s'", o, test_path("keep")), 0);
    CHECK_INT(test_sh("'%s' --world new --seed 9 --entities 8 --out '%s'", ds_bin(), o), 1);
    CHECK(strstr(test_output(), "exists and is not empty (use --overwrite"));
    CHECK_INT(test_sh("cmp '%s/docs.jsonl' '%s'", o, test_path("keep")), 0);
    CHECK_INT(test_sh("'%s' --world new --seed 9 --entities 8 --out '%s' --overwrite", ds_bin(), o), 0);
    CHECK_INT(test_sh("cmp -s '%s/docs.jsonl' '%s'", o, test_path("keep")), 1);
    CHECK_INT(test_sh("grep -q '\"seed\": 9' '%s/manifest.json'", o), 0);
    // a folder that is not ours is never replaced, even with --overwrite
    CHECK_INT(test_sh("mkdir '%s' && echo precious > '%s/notes.txt'", mine, mine), 0);
    CHECK_INT(test_sh("'%s' --world new --seed 1 --out '%s' --overwrite", ds_bin(), mine), 1);
    CHECK(strstr(test_output(), "not a medworld output folder"));
    CHECK_INT(test_sh("grep -qx precious '%s/notes.txt'", mine), 0);
    // an empty folder is fine; nothing temporary is left behind
    CHECK_INT(test_sh("mkdir '%s'", empty), 0);
    CHECK_INT(test_sh("'%s' --world new --seed 1 --entities 4 --out '%s' --overwrite", ds_bin(),
                      empty), 0);
    CHECK(lk_file_exists(test_path("empty/manifest.json")));
    CHECK_INT(test_sh("ls -A '%s' | grep -c -e '\\.tmp\\.' -e '\\.old\\.' | grep -qx 0",
                      test_tmpdir()), 0);
    // "dir/" is the folder dir (the temporary folder is its sibling, not its child)
    CHECK_INT(test_sh("'%s' --world new --seed 1 --entities 4 --out '%s/' --overwrite", ds_bin(),
                      empty), 0);
    CHECK_INT(test_sh("ls -A '%s' | grep -c -e '\\.tmp\\.' -e '\\.old\\.' | grep -qx 0",
                      test_tmpdir()), 0);
    CHECK_INT(test_sh("ls -A '%s' | grep -c . | grep -qx 8", empty), 0); // 7 JSONL files + manifest
    // an --out under a plain file fails cleanly
    CHECK_INT(test_sh("'%s' --world new --seed 1 --out '%s/sub'", ds_bin(), test_path("keep")), 1);
    CHECK(strstr(test_output(), "medworld: error: ") && strstr(test_output(), "keep"));
    // a nested --out is created with its parents
    if (ds_gen("background", 3, "deep/er/bg", "--entities 6 --docs-per-entity 1"))
        return;
    CHECK(lk_file_exists(test_path("deep/er/bg/rc_train.jsonl")));
}

// ---- pinned output ----

/* The bytes of a small world are pinned: an unintended change (a template, the RNG in libcore,
 * the stream layout) fails here. An intended one updates this hash and bumps MW_VERSION, since
 * the committed base model was trained on the older output. */
TEST(datasets_output_pinned)
{
    if (ds_gen("background", 42, "bg", "--entities 8 --docs-per-entity 2") ||
        ds_gen("new", 42, "nw", "--entities 8"))
        return;
    char cmd[4096];
    int n = snprintf(cmd, sizeof cmd, "cd '%s' && for w in bg nw; do for f in", test_tmpdir());
    for (int i = 0; i < DS_N_FILES; i++)
        n += snprintf(cmd + n, sizeof cmd - (size_t)n, " %s", ds_files[i]);
    snprintf(cmd + n, sizeof cmd - (size_t)n, "; do if [ -f $w/$f ]; then cat $w/$f; fi; done; "
             "done | sha256sum | cut -c1-64");
    CHECK_INT(test_sh("%s", cmd), 0);
    CHECK_MSG(!strncmp(test_output(),
                       "6ea3c92843d0c2138016f62996386bfcdaa40d6791651db6798fadd94902060f", 64),
              "medworld output changed: %s", test_output());
}
