/*
 * bench_dash.c - time to the first frame of `lorakit dash` on a training run of 100,000
 * steps against one of 1,000 steps, in the same run. The database is written here through
 * the rdb_* API (a loss curve with noise, a cosine learning rate, an eval loss every 500
 * steps); each figure is the median of 7 runs of `lorakit dash DB --run ID
 * --bench-first-draw`, which opens the database, loads the run, downsamples and draws one
 * 80x24 frame off-screen, then prints the time since start (process start included).
 * Target: the 100k run draws in under 1 s on a loaded 2-core machine; the plot itself is
 * downsampled per column (O(steps), about a millisecond), so the cost is reading the rows.
 * Usage: bench_dash LORAKIT_BINARY WORK_DIR. Exit status 1 if the target is missed.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../libcore/lk.h"
#include "../libcore/rdb.h"

static int write_run(struct rdb *db, long steps, int64_t *id, struct lk_err *err)
{
    char name[64];
    snprintf(name, sizeof name, "bench-%ld", steps);
    if (rdb_run_begin(db, "train", name, "bench", "bench.jsonl", "{\"lr\":0.0002}", id, err))
        return 1;
    uint64_t s = 42;
    for (long i = 1; i <= steps; i++) {
        s = s * 6364136223846793005ULL + 1442695040888963407ULL;
        double noise = ((double)(s >> 11) / 9007199254740992.0 - 0.5) * 0.2;
        double loss = 2.0 + 4.0 * exp(-(double)i / (steps / 5.0)) + noise;
        double lr = 2e-4 * 0.5 * (1 + cos(3.14159265358979323846 * (double)i / (double)steps));
        double ev = i % 500 == 0 ? loss + 0.1 : NAN;
        if (rdb_train_step(db, *id, i, loss, lr, 1.0, 30000.0, i * 0.01, ev, err))
            return 1;
    }
    return rdb_run_finish(db, *id, RDB_DONE, "{\"final_loss\":2.0}", err) ? 1 : 0;
}

static int cmp(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

/* Median first-draw time in ms of 7 runs; NAN on failure. */
static double first_draw(const char *bin, const char *db, int64_t id, long *steps)
{
    double t[7];
    for (int k = 0; k < 7; k++) {
        char cmd[2048];
        snprintf(cmd, sizeof cmd, "TERM=xterm-256color '%s' dash '%s' --run %lld --bench-first-draw </dev/null",
                 bin, db, (long long)id);
        FILE *p = popen(cmd, "r");
        if (!p)
            return NAN;
        char line[256] = "";
        double ms = NAN;
        while (fgets(line, sizeof line, p))
            if (sscanf(line, "first_draw_ms=%lf steps=%ld", &ms, steps) == 2)
                break;
        if (pclose(p) != 0 || isnan(ms))
            return NAN;
        t[k] = ms;
    }
    qsort(t, 7, sizeof t[0], cmp);
    return t[3];
}

int main(int argc, char **argv)
{
    if (argc < 3) {
        fprintf(stderr, "usage: bench_dash LORAKIT WORKDIR\n");
        return 2;
    }
    char path[1024];
    snprintf(path, sizeof path, "%s/bench_dash.db", argv[2]);
    remove(path);
    char side[1100];
    snprintf(side, sizeof side, "%s-wal", path);
    remove(side);
    snprintf(side, sizeof side, "%s-shm", path);
    remove(side);
    struct lk_err err = { 0 };
    struct rdb db;
    int64_t small, big;
    double t0 = lk_now();
    if (rdb_open(&db, path, &err) || write_run(&db, 1000, &small, &err) || write_run(&db, 100000, &big, &err) ||
        rdb_close(&db, &err)) {
        fprintf(stderr, "bench_dash: %s\n", err.msg);
        return 1;
    }
    printf("bench_dash: wrote 101,000 steps in %.2f s (%s)\n", lk_now() - t0, path);
    long n_small = 0, n_big = 0;
    double ms_small = first_draw(argv[1], path, small, &n_small);
    double ms_big = first_draw(argv[1], path, big, &n_big);
    if (isnan(ms_small) || isnan(ms_big)) {
        fprintf(stderr, "bench_dash: lorakit dash --bench-first-draw failed\n");
        return 1;
    }
    printf("first draw, 80x24, median of 7:\n");
    printf("  %7ld steps  %8.2f ms\n", n_small, ms_small);
    printf("  %7ld steps  %8.2f ms   (%.1fx the 1,000-step run for %ldx the steps)\n", n_big, ms_big,
           ms_big / ms_small, n_big / (n_small ? n_small : 1));
    int ok = ms_big < 1000.0;
    printf("target: 100,000 steps under 1000 ms: %s\n", ok ? "met" : "MISSED");
    return ok ? 0 : 1;
}
