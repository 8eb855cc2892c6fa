/* test_dash.c - `lorakit dash`: the plotting helpers without a terminal (downsampling against a
 * brute-force reference, braille cells against the Unicode dot layout, eighth-block bars), and
 * the dashboard itself driven under tmux (send-keys, capture-pane) against a runs database
 * written by real `lorakit train` runs on a tiny model plus eval / diff / svd-compress /
 * merge runs filled by hand through the rdb_* API. What the screen shows is checked against
 * the database read with plain SQL, including the learned-against-forgot chart of an eval run
 * with retention figures. Tests needing tmux SKIP when it is missing. */
#include "test.h"

#include <math.h>
#include <signal.h>
#include <sqlite3.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "../libcore/lk.h"
#include "../libcore/rdb.h"
#include "../tui/dash.h"
#include "../tui/dash_app.h"

// ---- plotting, no terminal ----

TEST(dash_downsample_matches_bruteforce)
{
    // random x (unsorted, some outside the range), random y with NANs; every bucket's min/max
    // against a scan of all points for that bucket
    uint64_t s = 12345;
    enum { N = 5000, C = 37 };
    static double x[N], y[N], lo[C], hi[C];
    for (int i = 0; i < N; i++) {
        s = s * 6364136223846793005ULL + 1442695040888963407ULL;
        x[i] = (double)(s >> 40) / (double)(1 << 24) * 120.0 - 10.0; // [-10, 110)
        s = s * 6364136223846793005ULL + 1442695040888963407ULL;
        y[i] = (i % 17 == 0) ? NAN : (double)(s >> 40) / (double)(1 << 24) - 0.5;
    }
    x[0] = 100.0; // the right edge belongs to the last bucket
    y[0] = 7.0;
    dash_downsample(x, y, N, 0.0, 100.0, C, lo, hi);
    for (int c = 0; c < C; c++) {
        double a = 100.0 * c / C, b = 100.0 * (c + 1) / C;
        double rlo = NAN, rhi = NAN;
        for (int i = 0; i < N; i++) {
            int in = (x[i] >= a && x[i] < b) || (c == C - 1 && x[i] == 100.0);
            if (!in || isnan(y[i]))
                continue;
            if (isnan(rlo) || y[i] < rlo)
                rlo = y[i];
            if (isnan(rhi) || y[i] > rhi)
                rhi = y[i];
        }
        CHECK_MSG(isnan(rlo) == isnan(lo[c]), "bucket %d emptiness differs", c);
        if (!isnan(rlo)) {
            CHECK_NEAR(lo[c], rlo, 0);
            CHECK_NEAR(hi[c], rhi, 0);
        }
    }
    CHECK_NEAR(hi[C - 1], 7.0, 0);
}

TEST(dash_downsample_keeps_a_spike_in_100k_steps)
{
    enum { N = 100000, C = 138 };
    double *x = lk_malloc(sizeof(double) * N), *y = lk_malloc(sizeof(double) * N);
    double lo[C], hi[C];
    CHECK(x && y);
    for (int i = 0; i < N; i++) {
        x[i] = i + 1;
        y[i] = 2.0 + 0.5 * exp(-i / 20000.0);
    }
    y[54320] = 9.0; // step 54321
    y[77] = -1.0;
    dash_downsample(x, y, N, 1, N, C, lo, hi);
    double gmax = -INFINITY, gmin = INFINITY;
    int spike_col = -1;
    for (int c = 0; c < C; c++) {
        CHECK(!isnan(lo[c])); // dense data: no empty bucket
        if (hi[c] > gmax) {
            gmax = hi[c];
            spike_col = c;
        }
        gmin = fmin(gmin, lo[c]);
    }
    lk_free(x);
    lk_free(y);
    CHECK_NEAR(gmax, 9.0, 0);
    CHECK_NEAR(gmin, -1.0, 0);
    CHECK_INT(spike_col, (int)((54321.0 - 1) / (N - 1) * C));
}

/* The code point of the UTF-8 braille cell at byte offset k of s. */
static unsigned cp_at(const char *s, size_t k)
{
    const unsigned char *p = (const unsigned char *)s + k;
    return ((p[0] & 0x0fu) << 12) | ((p[1] & 0x3fu) << 6) | (p[2] & 0x3fu);
}

TEST(dash_braille_cells_follow_the_dot_layout)
{
    char u[4];
    dash_braille_utf8(0, u);
    CHECK(!strcmp(u, "\xe2\xa0\x80")); // U+2800 blank
    dash_braille_utf8(0xff, u);
    CHECK(!strcmp(u, "\xe2\xa3\xbf")); // U+28FF all eight dots

    struct dash_canvas c;
    struct lk_err err = { 0 };
    CHECK_OK(dash_canvas_init(&c, 3, 2, &err)); // 6 x 8 dots
    // Unicode braille: dots 1,2,3 = left column rows 0-2 (bits 0-2), dots 4,5,6 = right
    // column rows 0-2 (bits 3-5), dot 7 = left row 3 (bit 6), dot 8 = right row 3 (bit 7)
    dash_canvas_dot(&c, 0, 0, 1);
    dash_canvas_dot(&c, 1, 3, 1);
    dash_canvas_dot(&c, 2, 2, 1);
    dash_canvas_dot(&c, 5, 7, 2);
    dash_canvas_dot(&c, 6, 0, 1);  // outside: ignored
    dash_canvas_dot(&c, -1, 0, 1); // outside: ignored
    char row[64];
    CHECK_INT(dash_canvas_row_utf8(&c, 0, row, sizeof row), 9);
    CHECK_INT(cp_at(row, 0), 0x2800 + 0x01 + 0x80);
    CHECK_INT(cp_at(row, 3), 0x2800 + 0x04);
    CHECK_INT(cp_at(row, 6), 0x2800);
    CHECK_INT(dash_canvas_row_utf8(&c, 1, row, sizeof row), 9);
    CHECK_INT(cp_at(row, 6), 0x2800 + 0x80);
    CHECK_INT(c.tag[1 * 3 + 2], 2);

    // a constant series is one straight line at mid height over the whole width
    dash_canvas_clear(&c);
    double lo[6], hi[6];
    for (int i = 0; i < 6; i++)
        lo[i] = hi[i] = 3.0;
    dash_canvas_series(&c, lo, hi, 3.0, 3.0, 1);
    CHECK_INT(dash_canvas_py(&c, 3.0, 3.0, 3.0), 4); // row 4 of 8: top dot row of cell row 1
    for (int x = 0; x < 3; x++) {
        CHECK_INT(c.dots[x], 0);
        CHECK_INT(c.dots[3 + x], 0x01 | 0x08);
    }
    // a rising ramp: min at the bottom-left dot, max at the top-right dot, every column set
    dash_canvas_clear(&c);
    for (int i = 0; i < 6; i++)
        lo[i] = hi[i] = i;
    dash_canvas_series(&c, lo, hi, 0, 5, 1);
    CHECK(c.dots[1 * 3 + 0] & 0x40);  // (0, 7): bottom-left
    CHECK(c.dots[0 * 3 + 2] & 0x08);  // (5, 0): top-right
    for (int px = 0; px < 6; px++) {
        int any = 0;
        for (int py = 0; py < 8; py++) {
            static const unsigned char bit[4][2] = { { 1, 8 }, { 2, 16 }, { 4, 32 }, { 64, 128 } };
            any |= c.dots[(py / 4) * 3 + px / 2] & bit[py % 4][px % 2];
        }
        CHECK_MSG(any, "column %d empty", px);
    }
    dash_canvas_release(&c);
    dash_canvas_release(&c); // harmless twice
}

TEST(dash_bar_and_numbers)
{
    char b[256];
    // 10 cells, 0.55 -> 44 eighths: 5 full blocks and a half block U+258C, then spaces
    CHECK_INT(dash_bar_utf8(0.55, 10, b, sizeof b), 5 * 3 + 3 + 4);
    CHECK(!strncmp(b, "\xe2\x96\x88\xe2\x96\x88\xe2\x96\x88\xe2\x96\x88\xe2\x96\x88\xe2\x96\x8c    ", 22));
    dash_bar_utf8(1.0 / 80, 10, b, sizeof b); // one eighth: U+258F
    CHECK(!strncmp(b, "\xe2\x96\x8f", 3));
    dash_bar_utf8(NAN, 3, b, sizeof b);
    CHECK(!strcmp(b, "   "));
    dash_bar_utf8(7, 2, b, sizeof b); // clamped
    CHECK(!strcmp(b, "\xe2\x96\x88\xe2\x96\x88"));
    char n[32];
    dash_fmt_num(6.15123654, n, sizeof n);
    CHECK(!strcmp(n, "6.1512"));
    dash_fmt_num(5.478e-7, n, sizeof n);
    CHECK(!strcmp(n, "5.478e-07"));
    dash_fmt_num(0, n, sizeof n);
    CHECK(!strcmp(n, "0"));
    dash_fmt_num(NAN, n, sizeof n);
    CHECK(!strcmp(n, "-"));
    CHECK_INT(dash_str_width("a\xe2\xa3\xbf\xe6\x97\xa5"), 1 + 1 + 2); // braille 1, CJK 2
}

// ---- fixtures ----

/* stable_path() rotates 8 static buffers (test_sh uses one per call): keep our own copies. */
static const char *stable_path(const char *name)
{
    static char buf[8][700];
    static int k;
    char *b = buf[k++ % 8];
    snprintf(b, sizeof buf[0], "%s", test_path(name));
    return b;
}

/* A tiny model, pre-tokenized data and a 30-step training run (with eval loss) recorded in
 * db; returns 0 on success. */
static int fixture_train(const char *db, const char *name, long steps)
{
    const char *dir = test_tmpdir();
    char model[600], data[600];
    snprintf(model, sizeof model, "%s/tiny", dir);
    snprintf(data, sizeof data, "%s/d.jsonl", dir);
    if (!lk_file_exists(model) &&
        test_sh("%s init --preset tiny --out %s --seed 1", test_lorakit(), model) != 0)
        return 1;
    if (!lk_file_exists(data)) {
        FILE *f = fopen(data, "w");
        if (!f)
            return 1;
        uint64_t s = 7;
        for (int r = 0; r < 40; r++) {
            fprintf(f, "{\"input_ids\": [");
            for (int i = 0; i < 16; i++) {
                s = s * 6364136223846793005ULL + 1442695040888963407ULL;
                fprintf(f, "%s%d", i ? ", " : "", (int)((s >> 33) % 512));
            }
            fprintf(f, "]}\n");
        }
        fclose(f);
    }
    return test_sh("%s train --model %s --data %s --eval-data %s --eval-every 10 --out %s/%s --steps %ld"
                   " --batch 2 --seq 16 --threads 1 --runs %s --name %s --quiet",
                   test_lorakit(), model, data, data, dir, name, steps, db, name);
}

/* eval, diff, svd-compress and merge runs, by hand through the rdb_* API. */
static int fixture_hand(const char *path)
{
    struct lk_err err = { 0 };
    struct rdb db;
    int64_t id;
    if (rdb_open(&db, path, &err))
        return 1;
    int r = 0;
    // eval: 4 modes x 2 metrics with intervals, 3 questions
    static const char *const modes[4] = { "base", "rag", "ft", "ft+rag" };
    static const double em[4] = { 0.25, 0.40, 0.55, 0.70 }, f1[4] = { 0.312, 0.451, 0.603, 0.742 };
    r |= rdb_run_begin(&db, "eval", "med-eval", "tiny", "qa.jsonl", "{\"k\":3}", &id, &err);
    for (int m = 0; m < 4; m++) {
        r |= rdb_eval_result(&db, id, modes[m], "exact_match", em[m], em[m] - 0.15, em[m] + 0.125, 20, &err);
        r |= rdb_eval_result(&db, id, modes[m], "token_f1", f1[m], f1[m] - 0.1, f1[m] + 0.08, 20, &err);
    }
    // a paired difference, as eval writes them: a row below the modes, not a mode
    r |= rdb_eval_result(&db, id, "ft+rag - base", "token_f1", 0.43, 0.3, 0.55, 20, &err);
    static const char *const ans[4] = { "alpha-answer", "bravo-answer", "charlie-answer", "delta-answer" };
    for (int q = 1; q <= 3; q++) {
        char item[16], question[128], a[64];
        snprintf(item, sizeof item, "q%d", q);
        snprintf(question, sizeof question, "What does question number %d ask about glaucoma?", q);
        for (int m = 0; m < 4; m++) {
            snprintf(a, sizeof a, "%s %d", ans[m], q);
            int rag = m == 1 || m == 3;
            r |= rdb_eval_item(&db, id, item, modes[m], question, "the-reference-text", a,
                               rag ? "[{\"title\":\"doc7\",\"text\":\"passage-about-pressure\",\"score\":0.9}]" : NULL,
                               "{\"exact_match\":1,\"token_f1\":0.5}", &err);
        }
    }
    r |= rdb_run_finish(&db, id, RDB_DONE, "{\"verdict\":\"ft+rag beats base on token_f1 by 0.430\"}", &err);
    // diff: 3 layers x 2 tensors; per-layer max rel change 0.01, 0.04, 0.02
    static const double rel[3][2] = { { 0.01, 0.005 }, { 0.03, 0.04 }, { 0.02, 0.0125 } };
    r |= rdb_run_begin(&db, "diff", "ft-vs-base", "tiny", NULL, NULL, &id, &err);
    for (int l = 0; l < 3; l++)
        for (int k = 0; k < 2; k++) {
            char name[96];
            snprintf(name, sizeof name, "model.layers.%d.self_attn.%s_proj.weight", l, k ? "v" : "q");
            struct rdb_tensor_stat s = { name, 64, 64, -1, 0.5, rel[l][k], 3.5 + l, "{\"r50\":2,\"r90\":6}",
                                         NAN, NULL };
            r |= rdb_tensor_stat(&db, id, &s, &err);
        }
    r |= rdb_run_finish(&db, id, RDB_DONE, "{\"tensors\":6}", &err);
    // svd-compress: energy kept 0.8 / 0.9 per tensor, ranks 4 and 8
    r |= rdb_run_begin(&db, "svd-compress", "full-to-lora", "tiny", NULL, "{\"rank\":8}", &id, &err);
    for (int l = 0; l < 2; l++) {
        char name[96];
        snprintf(name, sizeof name, "model.layers.%d.mlp.down_proj.weight", l);
        struct rdb_tensor_stat s = { name, 64, 128, l ? 8 : 4, 0.3, 0.02, 5.0, l ? "{\"kept\":0.9}" : "{\"kept\":0.8}",
                                     0.1, NULL };
        r |= rdb_tensor_stat(&db, id, &s, &err);
    }
    r |= rdb_run_finish(&db, id, RDB_DONE, NULL, &err);
    // merge
    r |= rdb_run_begin(&db, "merge", "two-adapters", "tiny", NULL,
                       "{\"method\":\"ties\",\"inputs\":[\"lora-a\",\"lora-b\"],\"density\":0.5}", &id, &err);
    r |= rdb_run_finish(&db, id, RDB_DONE, "{\"verify\":{\"max_abs_diff\":1.5e-06,\"logits_match\":true}}", &err);
    r |= rdb_close(&db, &err);
    return r;
}

/* The full fixture: one trained run (id 1), then eval 2, diff 3, svd-compress 4, merge 5. */
static const char *fixture_all(void)
{
    const char *db = stable_path("runs.db");
    if (fixture_train(db, "tiny-lora", 30) || fixture_hand(db))
        return NULL;
    return db;
}

// ---- tmux ----

static char g_sock[64];
static char g_dir[600];

static int have_tmux(void)
{
    return test_sh("command -v tmux") == 0;
}

static void tmux_stop(void);

/* Starts `lorakit dash ARGS` in a fresh private tmux server at w x h. The wrapper records the
 * dash pid (the inner sh execs it) and its exit status. */
static int tmux_start(int w, int h, const char *args)
{
    tmux_stop();
    static int n_started;
    // a fresh socket per session: reusing one right after kill-server races with its exit
    snprintf(g_sock, sizeof g_sock, "lkdash%d_%d", (int)getpid(), n_started++);
    snprintf(g_dir, sizeof g_dir, "%s", test_tmpdir());
    char script[700];
    snprintf(script, sizeof script, "%s/dash.sh", g_dir);
    FILE *f = fopen(script, "w");
    if (!f)
        return 1;
    fprintf(f, "rm -f '%s/dash.exit'\n"
               "sh -c 'echo $$ > \"%s/dash.pid\"; exec \"$@\"' sh env LC_ALL=C.UTF-8 TERM=tmux-256color"
               ""
               " timeout --foreground 120 '%s' dash %s\n"
               "echo \"EXIT=$?\" > '%s/dash.exit'\n"
               "sleep 120\n",
            g_dir, g_dir, test_lorakit(), args, g_dir);
    fclose(f);
    int rc = 1;
    for (int attempt = 0; attempt < 3 && rc; attempt++)
        rc = test_sh("tmux -u -L %s -f /dev/null new-session -d -s t -x %d -y %d 'sh %s'", g_sock, w, h, script);
    return rc;
}

static void tmux_stop(void)
{
    if (g_sock[0])
        test_sh("tmux -L %s kill-server", g_sock);
    g_sock[0] = 0;
}

static char g_screen[65536];

static const char *screen(void)
{
    test_sh("tmux -u -L %s capture-pane -p -t t", g_sock);
    snprintf(g_screen, sizeof g_screen, "%s", test_output());
    return g_screen;
}

static double now_s(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

/* Waits until the screen shows needle (up to 8 s: sanitized builds are slower). */
static int wait_for(const char *needle)
{
    double t0 = now_s();
    while (now_s() - t0 < 8) {
        if (strstr(screen(), needle))
            return 1;
        test_sleep_ms(50);
    }
    return 0;
}

static int keys(const char *k)
{
    return test_sh("tmux -L %s send-keys -t t %s", g_sock, k);
}

/* The exit status written by the wrapper once dash is gone (-1 if it did not end in 8 s). */
static int wait_exit(void)
{
    char p[700];
    snprintf(p, sizeof p, "%s/dash.exit", g_dir);
    double t0 = now_s();
    while (now_s() - t0 < 8) {
        char *s = NULL;
        if (lk_read_file(p, &s, NULL, NULL) == LK_OK && s && !strncmp(s, "EXIT=", 5) && strchr(s, '\n')) {
            int v = atoi(s + 5);
            lk_free(s);
            return v;
        }
        lk_free(s);
        test_sleep_ms(50);
    }
    return -1;
}

/* Line i (0-based) of the last screen, copied into buf. */
static const char *screen_line(int i, char *buf, size_t n)
{
    const char *p = g_screen;
    for (int k = 0; k < i && p; k++) {
        p = strchr(p, '\n');
        if (p)
            p++;
    }
    buf[0] = 0;
    if (!p)
        return buf;
    size_t len = strcspn(p, "\n");
    if (len >= n)
        len = n - 1;
    memcpy(buf, p, len);
    buf[len] = 0;
    return buf;
}

static int count_lines(void)
{
    int n = 0;
    for (const char *p = g_screen; *p; p++)
        n += *p == '\n';
    return n;
}

static double sql_real(const char *db, const char *sql)
{
    sqlite3 *s = NULL;
    sqlite3_stmt *st;
    double v = NAN;
    if (sqlite3_open_v2(db, &s, SQLITE_OPEN_READONLY, NULL) == SQLITE_OK &&
        sqlite3_prepare_v2(s, sql, -1, &st, NULL) == SQLITE_OK) {
        if (sqlite3_step(st) == SQLITE_ROW && sqlite3_column_type(st, 0) != SQLITE_NULL)
            v = sqlite3_column_double(st, 0);
        sqlite3_finalize(st);
    }
    sqlite3_close(s);
    return v;
}

/* Half a unit of the last printed digit of a number as shown ("6.1512", "5.478e-07"). */
static double print_tol(const char *s)
{
    const char *dot = strchr(s, '.'), *e = strpbrk(s, "eE");
    int dec = 0;
    if (dot)
        for (const char *p = dot + 1; *p >= '0' && *p <= '9'; p++)
            dec++;
    int ex = e ? atoi(e + 1) : 0;
    return 0.5 * pow(10.0, ex - dec) * 1.000001;
}

/* The number left of the plot's axis line. */
static void axis_label(const char *line, char *out, size_t n)
{
    size_t k = strcspn(line, "\xe2");
    while (*line == ' ' && k) {
        line++;
        k--;
    }
    while (k && line[k - 1] == ' ')
        k--;
    if (k >= n)
        k = n - 1;
    memcpy(out, line, k);
    out[k] = 0;
}

// ---- the dashboard under tmux ----

static void runs_list_body(const char *db)
{
    char args[700];
    snprintf(args, sizeof args, "'%s'", db);
    CHECK_OK(tmux_start(80, 24, args));
    CHECK_MSG(wait_for("tiny-lora"), "runs list not shown:\n%s", g_screen);
    const char *s = screen();
    // every run, its kind and key figure: final loss from the summary, the verdict, the mean
    // energy kept (0.8, 0.9 -> 85%), the max rel change, the merge method
    char loss[32];
    snprintf(loss, sizeof loss, "loss %.4f", sql_real(db, "SELECT json_extract(summary_json, '$.final_loss')"
                                                          " FROM runs WHERE id = 1"));
    const char *want[] = { "train", "tiny-lora", "eval", "med-eval", "diff", "ft-vs-base", "svd-compress",
                           "full-to-lora", "merge", "two-adapters", loss, "ft+rag beats", "energy 85.00%",
                           "max rel 0.0400", "method ties", "done", "q quit", "Enter open" };
    for (size_t i = 0; i < sizeof want / sizeof want[0]; i++)
        CHECK_MSG(strstr(s, want[i]), "'%s' not on screen:\n%s", want[i], s);
    // newest first: merge (id 5) above train (id 1)
    CHECK(strstr(s, "two-adapters") < strstr(s, "tiny-lora"));
    keys("q");
    CHECK_INT(wait_exit(), 0);
}

TEST(dash_tmux_runs_list)
{
    if (!have_tmux())
        SKIP("tmux is not installed (make deps installs it)");
    const char *db = fixture_all();
    CHECK_MSG(db, "fixture failed: %s", test_output());
    runs_list_body(db);
    tmux_stop();
}

static void train_curve_body(const char *db)
{
    char args[700];
    snprintf(args, sizeof args, "'%s'", db);
    CHECK_OK(tmux_start(80, 24, args));
    CHECK(wait_for("tiny-lora"));
    keys("G"); // the oldest run is the train run, at the bottom
    keys("Enter");
    CHECK_MSG(wait_for("learning rate"), "train view not shown:\n%s", g_screen);
    screen();
    // find the loss plot: the label line, then the first canvas row (max), the row before
    // the axis (min), and the axis (first and last step)
    char line[1024], prev[1024] = "";
    int i = 0, n = count_lines();
    while (i < n && strncmp(screen_line(i, line, sizeof line), " loss", 5))
        i++;
    CHECK_MSG(i < n, "no loss plot:\n%s", g_screen);
    char top[64] = "", bot[64] = "";
    axis_label(screen_line(i + 1, line, sizeof line), top, sizeof top);
    int j = i + 1;
    while (j < n && !strstr(screen_line(j, line, sizeof line), "\xe2\x94\x94")) {
        snprintf(prev, sizeof prev, "%s", line);
        j++;
    }
    CHECK(j < n);
    axis_label(prev, bot, sizeof bot);
    long first = -1, last = -1;
    const char *axis = strstr(line, "\xe2\x94\x94") + 3;
    sscanf(axis, "%ld", &first);
    const char *lastnum = line + strlen(line);
    while (lastnum > axis && lastnum[-1] >= '0' && lastnum[-1] <= '9')
        lastnum--;
    last = atol(lastnum);
    double dbmax = sql_real(db, "SELECT max(v) FROM (SELECT loss v FROM train_steps WHERE run_id = 1"
                                " UNION ALL SELECT eval_loss FROM train_steps WHERE run_id = 1)");
    double dbmin = sql_real(db, "SELECT min(v) FROM (SELECT loss v FROM train_steps WHERE run_id = 1"
                                " UNION ALL SELECT eval_loss FROM train_steps WHERE run_id = 1)");
    CHECK_MSG(fabs(atof(top) - dbmax) <= print_tol(top), "axis max '%s' vs db %.9g", top, dbmax);
    CHECK_MSG(fabs(atof(bot) - dbmin) <= print_tol(bot), "axis min '%s' vs db %.9g", bot, dbmin);
    CHECK(dbmax > dbmin);
    CHECK_INT(first, (long)sql_real(db, "SELECT min(step) FROM train_steps WHERE run_id = 1"));
    CHECK_INT(last, (long)sql_real(db, "SELECT max(step) FROM train_steps WHERE run_id = 1"));
    CHECK_INT(last, 30);
    // braille cells drawn, eval loss legend, tokens/s, the parameters
    CHECK(strstr(g_screen, "\xe2\xa0") || strstr(g_screen, "\xe2\xa1") || strstr(g_screen, "\xe2\xa2"));
    CHECK(strstr(g_screen, "eval loss"));
    CHECK(strstr(g_screen, "tokens/s"));
    CHECK(strstr(g_screen, "rank=8"));
    CHECK(strstr(g_screen, "schedule=cosine"));
    // the learning-rate axis: max is the peak lr of the run
    double lrmax = sql_real(db, "SELECT max(lr) FROM train_steps WHERE run_id = 1");
    int k = j + 1;
    while (k < n && !strstr(screen_line(k, line, sizeof line), "learning rate"))
        k++;
    axis_label(screen_line(k + 1, line, sizeof line), top, sizeof top);
    CHECK_MSG(fabs(atof(top) - lrmax) <= print_tol(top), "lr axis max '%s' vs db %.9g", top, lrmax);
    keys("q");
    CHECK(wait_for("Enter open"));
    keys("q");
    CHECK_INT(wait_exit(), 0);
}

TEST(dash_tmux_train_curve_axes_match_db)
{
    if (!have_tmux())
        SKIP("tmux is not installed (make deps installs it)");
    const char *db = fixture_all();
    CHECK_MSG(db, "fixture failed: %s", test_output());
    train_curve_body(db);
    tmux_stop();
}

static void eval_body(const char *db)
{
    char args[700];
    snprintf(args, sizeof args, "'%s' --run 1", db);
    CHECK_OK(tmux_start(80, 24, args));
    CHECK_MSG(wait_for("verdict"), "eval view not shown:\n%s", g_screen);
    const char *s = screen();
    // the table: value [lo, hi] as in the database, verdict line, n
    const char *want[] = { "verdict: ft+rag beats base on token_f1 by 0.430", "exact_match", "token_f1",
                           "0.250 [0.100, 0.375]", "0.742 [0.642, 0.822]", "0.550 [0.400, 0.675]",
                           "ft+rag", "20", "questions (3)", "4 modes, 1 difference x 2 metrics",
                           "0.430 [0.300, 0.550]" };
    for (size_t i = 0; i < sizeof want / sizeof want[0]; i++)
        CHECK_MSG(strstr(s, want[i]), "'%s' not on screen:\n%s", want[i], s);
    // the rows are the modes in the standard order
    CHECK(strstr(s, "\nbase ") < strstr(s, "\nrag ") && strstr(s, "\nrag ") < strstr(s, "\nft "));
    // second question: answers side by side on one line, the reference, the passages
    keys("j");
    keys("Enter");
    CHECK_MSG(wait_for("question 2/3"), "question view not shown:\n%s", g_screen);
    s = screen();
    char line[1024];
    int found = 0;
    for (int i = 0; i < count_lines(); i++) {
        screen_line(i, line, sizeof line);
        if (strstr(line, "alpha-answer") && strstr(line, "bravo-answer") && strstr(line, "charlie-answer") &&
            strstr(line, "delta-answer"))
            found = 1;
    }
    CHECK_MSG(found, "answers not side by side:\n%s", s);
    CHECK(strstr(s, "question number 2"));
    CHECK(strstr(s, "the-reference-text"));
    CHECK_MSG(strstr(s, "passage-about-pres"), "no passage:\n%s", s);
    CHECK(strstr(s, "doc7"));
    // next question with the right arrow
    keys("Right");
    CHECK(wait_for("question 3/3"));
    CHECK(strstr(screen(), "alpha-answer 3"));
    keys("q");
    CHECK(wait_for("verdict"));
    keys("q");
    CHECK(wait_for("Enter open"));
    keys("q");
    CHECK_INT(wait_exit(), 0);
}

TEST(dash_tmux_eval_table_and_answers)
{
    if (!have_tmux())
        SKIP("tmux is not installed (make deps installs it)");
    const char *db = stable_path("runs.db");
    CHECK_OK(fixture_hand(db)); // eval 1, diff 2, svd-compress 3, merge 4
    eval_body(db);
    tmux_stop();
}

/* Full blocks (U+2588) in a line. */
static int full_blocks(const char *s)
{
    int n = 0;
    for (const char *p = s; (p = strstr(p, "\xe2\x96\x88")); p += 3)
        n++;
    return n;
}

static void bars_body(const char *db)
{
    char args[700];
    snprintf(args, sizeof args, "'%s' --run 2", db);
    CHECK_OK(tmux_start(80, 24, args));
    CHECK_MSG(wait_for("by layer"), "diff view not shown:\n%s", g_screen);
    screen();
    CHECK(strstr(g_screen, "max relative change"));
    CHECK(strstr(g_screen, "layers.1.self_attn.v_proj "));
    // bars: max rel change per layer 0.01, 0.04, 0.02 -> 1/4, full, 1/2 of the bar width
    int blocks[3] = { -1, -1, -1 };
    char line[1024];
    for (int i = 0; i < count_lines(); i++) {
        screen_line(i, line, sizeof line);
        int l;
        if (sscanf(line, "layer%d", &l) == 1 && l >= 0 && l < 3)
            blocks[l] = full_blocks(line);
    }
    int full = blocks[1];
    CHECK_MSG(full >= 40, "layer 1 bar has %d blocks:\n%s", full, g_screen);
    CHECK_MSG(abs(blocks[0] - full / 4) <= 1, "layer 0: %d blocks vs %d/4", blocks[0], full);
    CHECK_MSG(abs(blocks[2] - full / 2) <= 1, "layer 2: %d blocks vs %d/2", blocks[2], full);
    CHECK(strstr(g_screen, "0.0400"));
    // the next figure: energy kept has no data here -> empty bars; then rank
    keys("Right");
    CHECK(wait_for("mean energy kept"));
    keys("q");
    CHECK(wait_for("Enter open"));
    // svd-compress (id 3): energy kept per layer 0.8 and 0.9, on a 0..1 scale
    keys("/");
    keys("s v d");
    keys("Enter");
    keys("Enter");
    CHECK_MSG(wait_for("svd-compress #3"), "svd view not shown:\n%s", g_screen);
    screen();
    for (int i = 0; i < count_lines(); i++) {
        screen_line(i, line, sizeof line);
        int l;
        if (sscanf(line, "layer%d", &l) == 1 && l >= 0 && l < 2)
            blocks[l] = full_blocks(line);
    }
    // width 60 at 80 columns: 0.8 -> 48 blocks, 0.9 -> 54
    CHECK_MSG(blocks[0] == 48 && blocks[1] == 54, "energy bars %d %d:\n%s", blocks[0], blocks[1], g_screen);
    CHECK(strstr(g_screen, "0.8000") && strstr(g_screen, "0.9000"));
    keys("q");
    keys("q");
    CHECK_INT(wait_exit(), 0);
}

TEST(dash_tmux_layer_bars)
{
    if (!have_tmux())
        SKIP("tmux is not installed (make deps installs it)");
    const char *db = stable_path("runs.db");
    CHECK_OK(fixture_hand(db)); // eval 1, diff 2, svd-compress 3, merge 4
    bars_body(db);
    tmux_stop();
}

static void merge_filter_body(const char *db)
{
    char args[700];
    snprintf(args, sizeof args, "'%s'", db);
    CHECK_OK(tmux_start(80, 24, args));
    CHECK(wait_for("two-adapters"));
    // filter to the merge run, open it
    keys("/");
    keys("m e r g e");
    keys("Enter");
    CHECK(wait_for("[/merge]"));
    screen();
    CHECK_MSG(!strstr(g_screen, "med-eval") && strstr(g_screen, "two-adapters"), "filter:\n%s", g_screen);
    keys("Enter");
    CHECK_MSG(wait_for("method: ties"), "merge view:\n%s", g_screen);
    screen();
    CHECK(strstr(g_screen, "input 1: lora-a"));
    CHECK(strstr(g_screen, "input 2: lora-b"));
    CHECK(strstr(g_screen, "verify.max_abs_diff=1.5e-06"));
    CHECK(strstr(g_screen, "verify.logits_match=true"));
    keys("q");
    CHECK(wait_for("Enter open"));
    CHECK(strstr(screen(), "med-eval")); // back in the list, the filter cleared
    keys("q");
    CHECK_INT(wait_exit(), 0);
}

TEST(dash_tmux_merge_and_filter)
{
    if (!have_tmux())
        SKIP("tmux is not installed (make deps installs it)");
    const char *db = stable_path("runs.db");
    CHECK_OK(fixture_hand(db));
    merge_filter_body(db);
    tmux_stop();
}

static int dash_alive(void)
{
    char p[700];
    snprintf(p, sizeof p, "%s/dash.exit", g_dir);
    return !lk_file_exists(p);
}

static void resize_body(const char *db)
{
    char args[700], line[1024];
    snprintf(args, sizeof args, "'%s' --run 1", db);
    CHECK_OK(tmux_start(80, 24, args));
    CHECK(wait_for("learning rate"));
    static const int sizes[][2] = { { 120, 40 }, { 60, 20 }, { 30, 8 }, { 12, 3 }, { 80, 24 } };
    for (size_t i = 0; i < sizeof sizes / sizeof sizes[0]; i++) {
        int w = sizes[i][0], h = sizes[i][1];
        CHECK_OK(test_sh("tmux -L %s resize-window -t t -x %d -y %d", g_sock, w, h));
        double t0 = now_s();
        int ok = 0;
        while (!ok && now_s() - t0 < 8) {
            test_sleep_ms(100);
            screen();
            // laid out for the new size: the footer is on the last line
            ok = count_lines() == h && (h < 4 || !strncmp(screen_line(h - 1, line, sizeof line), "Tab pane", 8));
        }
        CHECK_MSG(ok, "not redrawn at %dx%d:\n%s", w, h, g_screen);
        CHECK_MSG(dash_alive(), "dash exited at %dx%d", w, h);
    }
    CHECK(wait_for("learning rate"));
    CHECK(strstr(g_screen, "\xe2\x94\x94")); // the axis again at 80x24
    keys("q");
    keys("q");
    CHECK_INT(wait_exit(), 0);
}

TEST(dash_tmux_survives_resize)
{
    if (!have_tmux())
        SKIP("tmux is not installed (make deps installs it)");
    const char *db = stable_path("runs.db");
    CHECK_MSG(fixture_train(db, "tiny-lora", 30) == 0, "train failed: %s", test_output());
    resize_body(db);
    tmux_stop();
}

/* The last step on the x axis of the loss plot, or -1. */
static long axis_last_step(void)
{
    char line[1024];
    for (int i = 0; i < count_lines(); i++) {
        screen_line(i, line, sizeof line);
        const char *ax = strstr(line, "\xe2\x94\x94");
        if (!ax)
            continue;
        const char *e = line + strlen(line);
        while (e > ax && e[-1] == ' ')
            e--;
        const char *b = e;
        while (b > ax && b[-1] >= '0' && b[-1] <= '9')
            b--;
        return b < e ? atol(b) : -1;
    }
    return -1;
}

static void live_body(const char *db, long *pid)
{
    const char *dir = test_tmpdir();
    // a long training run in the background, writing into the same database
    CHECK_OK(test_sh("%s train --model %s/tiny --data %s/d.jsonl --out %s/live --steps 1000000 --batch 2"
                     " --seq 16 --threads 1 --runs %s --name live-run --quiet >/dev/null 2>&1 &"
                     " echo $! > %s/train.pid",
                     test_lorakit(), dir, dir, dir, db, dir));
    char p[700], *s = NULL;
    snprintf(p, sizeof p, "%s/train.pid", dir);
    CHECK_OK(lk_read_file(p, &s, NULL, NULL));
    *pid = atol(s);
    lk_free(s);
    double t0 = now_s();
    while (now_s() - t0 < 10 && !(sql_real(db, "SELECT count(*) FROM train_steps WHERE run_id = 2") > 0))
        test_sleep_ms(50);
    CHECK_MSG(sql_real(db, "SELECT count(*) FROM train_steps WHERE run_id = 2") > 0, "no live steps");
    char args[700];
    snprintf(args, sizeof args, "'%s'", db);
    CHECK_OK(tmux_start(80, 24, args));
    CHECK(wait_for("live-run"));
    CHECK(strstr(screen(), "running"));
    keys("Enter"); // newest first: the live run is selected
    CHECK_MSG(wait_for("live: every 1s"), "live train view:\n%s", g_screen);
    CHECK(wait_for("\xe2\x94\x94"));
    long s1 = axis_last_step();
    CHECK(s1 > 0);
    // the view refreshes by itself once a second
    long s2 = s1;
    t0 = now_s();
    while (s2 <= s1 && now_s() - t0 < 8) {
        test_sleep_ms(200);
        screen();
        s2 = axis_last_step();
    }
    CHECK_MSG(s2 > s1, "no automatic refresh: step %ld then %ld", s1, s2);
    // and on r
    keys("r");
    test_sleep_ms(300);
    screen();
    long s3 = axis_last_step();
    CHECK(s3 >= s2);
    CHECK(s3 <= (long)sql_real(db, "SELECT max(step) FROM train_steps WHERE run_id = 2"));
    keys("q");
    keys("q");
    CHECK_INT(wait_exit(), 0);
}

TEST(dash_tmux_live_training_refreshes)
{
    if (!have_tmux())
        SKIP("tmux is not installed (make deps installs it)");
    const char *db = stable_path("runs.db");
    CHECK_MSG(fixture_train(db, "tiny-lora", 30) == 0, "train failed: %s", test_output());
    long pid = 0;
    live_body(db, &pid);
    if (pid > 0)
        kill((pid_t)pid, SIGKILL);
    tmux_stop();
}

static void bad_db_case(const char *path, const char *needle)
{
    char args[700];
    snprintf(args, sizeof args, "'%s'", path);
    CHECK_OK(tmux_start(80, 24, args));
    CHECK_MSG(wait_for(needle), "'%s' not shown for %s:\n%s", needle, path, g_screen);
    CHECK(strstr(g_screen, "cannot show the runs database"));
    keys("q");
    CHECK_INT(wait_exit(), 1);
    tmux_stop();
}

static void bad_dbs_body(void)
{
    bad_db_case(stable_path("missing.db"), "no such runs database");
    const char *corrupt = stable_path("corrupt.db");
    FILE *f = fopen(corrupt, "w");
    CHECK(f);
    for (int i = 0; i < 512; i++)
        fputs("this is not a database ", f);
    fclose(f);
    bad_db_case(corrupt, "not an SQLite");
    const char *empty = stable_path("empty.db");
    f = fopen(empty, "w");
    CHECK(f);
    fclose(f);
    bad_db_case(empty, "empty runs database");
    // a newer schema
    const char *newer = stable_path("newer.db");
    struct lk_err err = { 0 };
    struct rdb r;
    CHECK_OK(rdb_open(&r, newer, &err));
    CHECK(sqlite3_exec(r.db, "PRAGMA user_version = 99", NULL, NULL, NULL) == SQLITE_OK);
    CHECK_OK(rdb_close(&r, &err));
    bad_db_case(newer, "newer than this lorakit supports");
    // a valid database with no runs: a message, not an error
    const char *none = stable_path("none.db");
    CHECK_OK(rdb_open(&r, none, &err));
    CHECK_OK(rdb_close(&r, &err));
    char args[700];
    snprintf(args, sizeof args, "'%s'", none);
    CHECK_OK(tmux_start(80, 24, args));
    CHECK(wait_for("no runs in"));
    keys("q");
    CHECK_INT(wait_exit(), 0);
}

TEST(dash_tmux_bad_databases)
{
    if (!have_tmux())
        SKIP("tmux is not installed (make deps installs it)");
    bad_dbs_body();
    tmux_stop();
}

static void signal_body(const char *db)
{
    char args[700];
    snprintf(args, sizeof args, "'%s'", db);
    CHECK_OK(tmux_start(80, 24, args));
    CHECK(wait_for("two-adapters"));
    CHECK_OK(test_sh("tmux -L %s display -p -t t '#{alternate_on}'", g_sock));
    CHECK_MSG(test_output()[0] == '1', "alternate screen not on: %s", test_output());
    char p[700], *s = NULL;
    snprintf(p, sizeof p, "%s/dash.pid", g_dir);
    CHECK_OK(lk_read_file(p, &s, NULL, NULL));
    long pid = atol(s);
    lk_free(s);
    CHECK(pid > 0);
    kill((pid_t)pid, SIGTERM);
    CHECK_INT(wait_exit(), 128 + SIGTERM);
    // the terminal is back: normal screen, the wrapper's shell sees it
    CHECK_OK(test_sh("tmux -L %s display -p -t t '#{alternate_on}'", g_sock));
    CHECK_MSG(test_output()[0] == '0', "alternate screen still on: %s", test_output());
}

TEST(dash_tmux_signal_restores_terminal)
{
    if (!have_tmux())
        SKIP("tmux is not installed (make deps installs it)");
    const char *db = stable_path("runs.db");
    CHECK_OK(fixture_hand(db));
    signal_body(db);
    tmux_stop();
}

TEST(dash_cli_help_and_errors)
{
    CHECK_INT(test_sh("%s dash --help", test_lorakit()), 0);
    CHECK(strstr(test_output(), "lorakit dash runs.db"));
    CHECK(strstr(test_output(), "--run"));
    CHECK_INT(test_sh("%s dash --bogus", test_lorakit()), 2);
    CHECK(strstr(test_output(), "unknown option"));
    // not on a terminal: the database error is printed on exit
    CHECK_INT(test_sh("%s dash %s < /dev/null", test_lorakit(), stable_path("nope.db")), 1);
    CHECK(strstr(test_output(), "lorakit dash: error:") && strstr(test_output(), "no such runs database"));
    // off-screen first draw of a train run
    const char *db = stable_path("runs.db");
    CHECK_MSG(fixture_train(db, "tiny-lora", 30) == 0, "train failed: %s", test_output());
    CHECK_INT(test_sh("%s dash %s --run 1 --bench-first-draw < /dev/null", test_lorakit(), db), 0);
    CHECK(strstr(test_output(), "first_draw_ms=") && strstr(test_output(), "steps=30"));
}

/* The text of the first column of the first row of sql (static buffer), or "". */
static const char *sql_text(const char *db, const char *sql)
{
    static char out[1024];
    sqlite3 *s = NULL;
    sqlite3_stmt *st;
    out[0] = 0;
    if (sqlite3_open_v2(db, &s, SQLITE_OPEN_READONLY, NULL) == SQLITE_OK &&
        sqlite3_prepare_v2(s, sql, -1, &st, NULL) == SQLITE_OK) {
        if (sqlite3_step(st) == SQLITE_ROW && sqlite3_column_text(st, 0))
            snprintf(out, sizeof out, "%s", (const char *)sqlite3_column_text(st, 0));
        sqlite3_finalize(st);
    }
    sqlite3_close(s);
    return out;
}

/* Every kind of run written by the real commands (train, merge, svd-compress, diff, eval) on a
 * tiny model, then shown by dash: the list holds each, the eval view shows the verdict and the
 * mode table that eval itself stored. */
static void real_runs_body(const char *db)
{
    const char *d = test_tmpdir();
    FILE *f = fopen(test_path("text.txt"), "w"), *q = fopen(test_path("qa.jsonl"), "w");
    FILE *docs = fopen(test_path("docs.jsonl"), "w");
    CHECK(f && q && docs);
    for (int i = 0; i < 6; i++) {
        fprintf(f, "The code of item %d is %c. What is the code of item %d?\n", i, 'A' + i, i);
        fprintf(q, "{\"id\":\"q%d\",\"question\":\"What is the code of item %d?\",\"answer\":\"%c\",\"doc_id\":\"d%d\"}\n",
                i, i, 'A' + i, i);
        fprintf(docs, "{\"id\":\"d%d\",\"title\":\"item %d\",\"text\":\"The code of item %d is %c.\"}\n", i, i, i,
                'A' + i);
    }
    fclose(f);
    fclose(q);
    fclose(docs);
    CHECK_MSG(fixture_train(db, "real-lora", 10) == 0, "train: %s", test_output());
    CHECK_INT(test_sh("%s tokenizer train --text %s/text.txt --vocab 300 --out %s/tiny", test_lorakit(), d, d), 0);
    CHECK_MSG(test_sh("%s merge --model %s/tiny --adapter %s/real-lora --out %s/merged --runs %s",
                      test_lorakit(), d, d, d, db) == 0, "merge: %s", test_output());
    CHECK_MSG(test_sh("%s svd-compress --adapter %s/real-lora --rank 2 --out %s/comp --runs %s --name real-svd",
                      test_lorakit(), d, d, db) == 0, "svd-compress: %s", test_output());
    CHECK_MSG(test_sh("%s diff %s/tiny %s/real-lora --runs %s --name real-diff", test_lorakit(), d, d, db) == 0,
              "diff: %s", test_output());
    CHECK_MSG(test_sh("%s eval --model %s/tiny --adapter %s/real-lora --qa %s/qa.jsonl --docs %s/docs.jsonl "
                      "--k 1 --max-new 4 --threads 1 --runs %s --name real-eval --quiet",
                      test_lorakit(), d, d, d, d, db) == 0, "eval: %s", test_output());
    char args[700];
    snprintf(args, sizeof args, "'%s'", db);
    CHECK_OK(tmux_start(100, 30, args));
    CHECK_MSG(wait_for("real-eval"), "runs list not shown:\n%s", g_screen);
    const char *want[] = { "real-lora", "method linear", "real-svd", "real-diff", "real-eval", "train", "merge",
                           "svd-compress", "diff", "eval" };
    for (size_t i = 0; i < sizeof want / sizeof want[0]; i++)
        CHECK_MSG(strstr(screen(), want[i]), "'%s' not on screen:\n%s", want[i], g_screen);
    keys("q");
    CHECK_INT(wait_exit(), 0);
    tmux_stop();
    // the eval run's own view: its stored verdict and the EM of base as stored
    int id = (int)sql_real(db, "SELECT id FROM runs WHERE name = 'real-eval'");
    char verdict[64];
    snprintf(verdict, sizeof verdict, "%.40s", sql_text(db, "SELECT json_extract(summary_json, '$.verdict') "
                                                            "FROM runs WHERE name = 'real-eval'"));
    CHECK_MSG(verdict[0], "eval stored no verdict");
    snprintf(args, sizeof args, "'%s' --run %d", db, id);
    CHECK_OK(tmux_start(120, 30, args));
    CHECK_MSG(wait_for("verdict"), "eval view not shown:\n%s", g_screen);
    CHECK_MSG(strstr(screen(), verdict), "'%s' not on screen:\n%s", verdict, g_screen);
    char em[16];
    snprintf(em, sizeof em, "%.3f", sql_real(db, "SELECT value FROM eval_results WHERE run_id = (SELECT id FROM "
                                                 "runs WHERE name = 'real-eval') AND mode = 'base' AND metric = 'em'"));
    CHECK_MSG(strstr(screen(), em), "base EM %s not on screen:\n%s", em, g_screen);
    keys("q");
    keys("q");
    CHECK_INT(wait_exit(), 0);
}

TEST(dash_tmux_runs_from_the_real_commands)
{
    if (!have_tmux())
        SKIP("tmux is not installed (make deps installs it)");
    real_runs_body(stable_path("runs.db"));
    tmux_stop();
}

// ---- learned against forgot ----

/* The x scale and straight segments (the chart's whiskers), and the points read from
 * eval_retention rows: learned F1 up, forgot on the chosen metric across, per system. */
TEST(dash_tradeoff_points_and_scales)
{
    struct dash_canvas c;
    struct lk_err err = { 0 };
    CHECK_OK(dash_canvas_init(&c, 5, 2, &err)); // 10 x 8 dots
    CHECK_INT(dash_canvas_px(&c, -1, -1, 1), 0);
    CHECK_INT(dash_canvas_px(&c, 1, -1, 1), 9);
    CHECK_INT(dash_canvas_px(&c, 0, -1, 1), 5);   // 4.5 rounds away from zero
    CHECK_INT(dash_canvas_px(&c, 7, -1, 1), 9);   // clamped
    CHECK_INT(dash_canvas_px(&c, 0.3, 1, 1), 5);  // empty scale: the middle
    dash_canvas_segment(&c, 0, 3, 9, 3, 1);       // a horizontal whisker on dot row 3
    for (int x = 0; x < 5; x++)
        CHECK_INT(c.dots[x], 0x40 | 0x80);
    dash_canvas_clear(&c);
    dash_canvas_segment(&c, 4, 7, 4, 0, 2); // vertical, drawn bottom-up
    CHECK_INT(c.dots[2], 0x01 | 0x02 | 0x04 | 0x40);
    CHECK_INT(c.dots[5 + 2], 0x01 | 0x02 | 0x04 | 0x40);
    CHECK_INT(c.tag[2], 2);
    dash_canvas_release(&c);

    struct rdb_retention rows[6] = {
        { "lora", "forgot", "closed.em", 0, 0, 0, 0, 0, 10, 1 },
        { "lora", "forgot", "rag.f1", 0.5, 0.45, 0.05, 0.01, 0.09, 10, 0 },
        { "lora", "learned", "em", 0, 0.2, 0.2, 0.1, 0.3, 10, 0 },
        { "lora", "learned", "f1", 0, 0.3, 0.3, 0.2, 0.4, 10, 0 },
        { "full", "forgot", "rag.f1", 0.5, 0.3, 0.2, 0.15, 0.25, 10, 0 },
        { "mc", "learned", "acc", 0.25, 0.5, 0.25, 0.1, 0.4, 10, 0 },
    };
    struct dash_point p[4];
    int n = dash_tradeoff_points(rows, 6, "rag.f1", p, 4);
    CHECK_INT(n, 3);
    CHECK(!strcmp(p[0].name, "lora") && p[0].x == 0.05 && p[0].xlo == 0.01 && p[0].xhi == 0.09);
    CHECK(p[0].y == 0.3 && p[0].ylo == 0.2 && p[0].yhi == 0.4 && !p[0].no_room); // F1, not EM
    CHECK(!strcmp(p[1].name, "full") && p[1].x == 0.2 && isnan(p[1].y));          // no learned row
    CHECK(!strcmp(p[2].name, "mc") && p[2].y == 0.25 && isnan(p[2].x));            // accuracy
    n = dash_tradeoff_points(rows, 6, "closed.em", p, 1);
    CHECK(n == 1 && p[0].x == 0 && p[0].no_room);
}

/* An eval run of three systems with retention figures, by hand through the rdb_* API. */
static int fixture_tradeoff(const char *path)
{
    struct lk_err err = { 0 };
    struct rdb db;
    int64_t id;
    if (rdb_open(&db, path, &err))
        return 1;
    int r = rdb_run_begin(&db, "eval", "systems", "base", "qa.jsonl", NULL, &id, &err);
    static const char *const modes[4] = { "base", "rag", "lora", "full" };
    for (int m = 0; m < 4; m++)
        r |= rdb_eval_result(&db, id, modes[m], "f1", 0.1 * (m + 1), 0.05 * (m + 1), 0.15 * (m + 1), 50, &err);
    r |= rdb_eval_item(&db, id, "q1", "base", "Which symptom points to Forokemia?", "muscle cramps", "rash", NULL,
                       "{}", &err);
    static const struct {
        const char *sys;
        double learned, forgot_rag, forgot_text;
    } s[3] = { { "lora", 0.30, 0.05, 0.40 }, { "full", 0.45, 0.25, 0.10 }, { "tiny", 0.02, 0.01, 0.02 } };
    for (int i = 0; i < 3; i++) {
        struct rdb_retention l = { "", "learned", "f1", 0.01, 0.01 + s[i].learned, s[i].learned,
                                   s[i].learned - 0.03, s[i].learned + 0.03, 50, 0 };
        struct rdb_retention e = { "", "forgot", "closed.em", 0, 0, 0, 0, 0, 50, 1 };
        struct rdb_retention f = { "", "forgot", "rag.f1", 0.3, 0.3 - s[i].forgot_rag, s[i].forgot_rag,
                                   s[i].forgot_rag - 0.02, s[i].forgot_rag + 0.02, 50, 0 };
        struct rdb_retention t = { "", "forgot", "text.nll", 1.3, 1.3 + s[i].forgot_text, s[i].forgot_text,
                                   s[i].forgot_text - 0.01, s[i].forgot_text + 0.01, 50, 0 };
        struct rdb_retention *rows[4] = { &l, &e, &f, &t };
        for (int k = 0; k < 4; k++) {
            snprintf(rows[k]->system, sizeof rows[k]->system, "%s", s[i].sys);
            r |= rdb_eval_retention(&db, id, rows[k], &err);
        }
    }
    r |= rdb_run_finish(&db, id, RDB_DONE, "{\"verdict\":\"best on F1: full (0.40)\"}", &err);
    r |= rdb_close(&db, &err);
    return r;
}

/* Row and column (in characters) of the mark "●" whose label follows it on the chart (one cell
 * between them: a braille cell or a space), searched in rows [y_from, y_to); -1 if absent. */
static void mark_of(const char *label, int y_from, int y_to, int *row, int *col)
{
    char line[2048];
    *row = *col = -1;
    for (int i = y_from; i < y_to; i++) {
        screen_line(i, line, sizeof line);
        for (const char *p = strstr(line, label); p; p = strstr(p + 1, label)) {
            const char *m = p - 1; // the cell before the label: one byte, or a 3-byte code point
            if (m > line && (unsigned char)*m >= 0x80)
                m -= 2;
            if (m - 3 >= line && !strncmp(m - 3, "\xe2\x97\x8f", 3)) {
                *row = i;
                *col = dash_str_width(line) - dash_str_width(m - 3);
                return;
            }
        }
    }
}

static void tradeoff_body(const char *db)
{
    char args[700];
    snprintf(args, sizeof args, "'%s' --run 1", db);
    CHECK_OK(tmux_start(80, 24, args));
    CHECK_MSG(wait_for("forgot rag.f1 across"), "no chart:\n%s", g_screen);
    const char *s = screen();
    // the default forgot metric is rag.f1 (closed.em leaves no room); the legend holds the figures
    const char *want[] = { "learned +0.300 [+0.270, +0.330]   forgot +0.050 [+0.030, +0.070]",
                           "learned +0.450 [+0.420, +0.480]   forgot +0.250 [+0.230, +0.270]",
                           "learned +0.020 [-0.010, +0.050]   forgot +0.010 [-0.010, +0.030]", "c questions" };
    for (size_t i = 0; i < sizeof want / sizeof want[0]; i++)
        CHECK_MSG(strstr(s, want[i]), "'%s' not on screen:\n%s", want[i], s);
    // one labelled mark per system, placed by its figures: more learned is higher, more
    // forgotten is further right
    int top = 0, bottom = count_lines();
    char line[2048];
    for (int i = 0; i < count_lines(); i++) {
        screen_line(i, line, sizeof line);
        if (strstr(line, "forgot rag.f1 across"))
            top = i + 1;
        if (strstr(line, "\xe2\x94\x94")) // └: the x axis, below the chart
            bottom = i;
    }
    int rl, cl, rf, cf, rt, ct;
    mark_of("lora", top, bottom, &rl, &cl);
    mark_of("full", top, bottom, &rf, &cf);
    mark_of("tiny", top, bottom, &rt, &ct);
    CHECK_MSG(rl >= 0 && rf >= 0 && rt >= 0, "marks not found:\n%s", s);
    CHECK_MSG(rf < rl && rl < rt, "rows: full %d, lora %d, tiny %d", rf, rl, rt);
    CHECK_MSG(ct < cl && cl < cf, "columns: tiny %d, lora %d, full %d", ct, cl, cf);
    int braille = 0; // U+2800..U+28FF: E2 A0..A3 xx
    for (const unsigned char *p = (const unsigned char *)s; *p; p++)
        braille += p[0] == 0xe2 && p[1] >= 0xa0 && p[1] <= 0xa3 && p[2];
    CHECK_MSG(braille > 20, "%d braille cells:\n%s", braille, s);
    // → the next forgot metric: text.nll, where lora forgets most
    keys("Right");
    CHECK_MSG(wait_for("forgot text.nll across"), "metric did not change:\n%s", g_screen);
    mark_of("lora", top, bottom, &rl, &cl);
    mark_of("full", top, bottom, &rf, &cf);
    CHECK_MSG(cl > cf, "text.nll columns: lora %d, full %d\n%s", cl, cf, g_screen);
    // c: the questions in its place, and back
    keys("c");
    CHECK_MSG(wait_for("questions (1)"), "no questions:\n%s", g_screen);
    CHECK(strstr(screen(), "c chart"));
    keys("c");
    CHECK(wait_for("forgot text.nll across"));
    keys("q");
    CHECK(wait_for("Enter open"));
    keys("q");
    CHECK_INT(wait_exit(), 0);
}

TEST(dash_tmux_learned_against_forgot)
{
    if (!have_tmux())
        SKIP("tmux is not installed (make deps installs it)");
    const char *db = stable_path("runs.db");
    CHECK_OK(fixture_tradeoff(db));
    tradeoff_body(db);
    tmux_stop();
}
