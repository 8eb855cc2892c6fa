/*
 * test_mpi.c - data-parallel training over MPI (bin/lorakit-mpi, built by `make MPI=1`):
 * `mpirun -np 2` against one plain `lorakit train` process with the same global batch (loss
 * curve from the runs database, adapter tensors), resume with a different number of ranks in
 * both directions (checkpoints carry no per-rank state), a dead or hung rank stopping the
 * others with a message and a non-zero exit, SIGUSR1 stopping all ranks at one step with a
 * checkpoint. Skipped when lorakit-mpi (next to the lorakit under test) or mpirun is missing.
 */
#include "test.h"

#include <dirent.h>
#include <math.h>
#include <signal.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "../libcore/lk.h"
#include "../libcore/rdb.h"
#include "../libcore/st.h"
#include "../libcore/tensor.h"

/* mpirun on one machine, as root in CI containers, without ssh; ranks quiet about leaks under
 * ASan (Open MPI's own allocations). */
#define MPI_ENV                                                                                    \
    "OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMPI_MCA_plm=isolated "            \
    "OMPI_MCA_btl=self,vader OMPI_MCA_rmaps_base_oversubscribe=1 ASAN_OPTIONS=detect_leaks=0 "     \
    "OPENBLAS_NUM_THREADS=1"

/* The training settings every run shares: no dropout, one thread, an uneven split of the
 * global batch of 6 rows (3 x grad-accum 2) over 2 or 3 ranks, a constant schedule so a run
 * of 10 steps resumed to 20 follows the same schedule as a run of 20. */
#define TRAIN_ARGS                                                                                 \
    "--data '%s/d.jsonl' --batch 3 --grad-accum 2 --threads 1 --lr 1e-2 --schedule constant "      \
    "--seed 7 --rank 4 --alpha 8 --log-every 1"

static char g_mpi[1024];

/* NULL when MPI tests can run, else the reason to skip. */
static const char *mpi_missing(void)
{
    const char *l = test_lorakit();
    const char *slash = strrchr(l, '/');
    snprintf(g_mpi, sizeof g_mpi, "%.*s%s", slash ? (int)(slash - l + 1) : 0, l, "lorakit-mpi");
    if (access(g_mpi, X_OK) != 0)
        return "no lorakit-mpi next to the lorakit under test (build it with make MPI=1)";
    if (system("command -v mpirun >/dev/null 2>&1") != 0)
        return "mpirun is not installed (make deps MPI=1)";
    return NULL;
}

/* A tiny model and 48 pre-tokenized records of 6..40 tokens, a prompt part unlabelled. */
static int make_fixture(void)
{
    FILE *f = fopen(test_path("d.jsonl"), "w");
    if (!f)
        return -1;
    uint64_t s = 12345;
    for (int i = 0; i < 48; i++) {
        s = s * 6364136223846793005ull + 1442695040888963407ull;
        int n = 6 + (int)((s >> 33) % 35), p = 1 + (int)((s >> 20) % (uint64_t)(n / 2));
        int ids[64];
        fprintf(f, "{\"input_ids\":[");
        for (int k = 0; k < n; k++) {
            s = s * 6364136223846793005ull + 1442695040888963407ull;
            ids[k] = (int)((s >> 35) % 512);
            fprintf(f, "%s%d", k ? "," : "", ids[k]);
        }
        fprintf(f, "],\"labels\":[");
        for (int k = 0; k < n; k++)
            fprintf(f, "%s%d", k ? "," : "", k < p ? -100 : ids[k]);
        fprintf(f, "]}\n");
    }
    fclose(f);
    return test_sh("%s init --preset tiny --out '%s/m' --seed 3", test_lorakit(), test_tmpdir());
}

/* One training run: np 0 is plain lorakit, else mpirun -np np lorakit-mpi; output in tmpdir/out,
 * runs database tmpdir/runs.db, flag (may be NULL) given tmpdir/arg. */
static int train(int np, const char *out, const char *runs, long steps, const char *flag, const char *arg)
{
    char pre[2400];
    if (np > 0)
        snprintf(pre, sizeof pre, MPI_ENV " mpirun -np %d '%s'", np, g_mpi);
    else
        snprintf(pre, sizeof pre, "OPENBLAS_NUM_THREADS=1 '%s'", test_lorakit());
    char more[2400] = "";
    if (flag && arg)
        snprintf(more, sizeof more, "%s '%s/%s'", flag, test_tmpdir(), arg);
    else if (flag)
        snprintf(more, sizeof more, "%s", flag);
    return test_sh("%s train --model '%s/m' --out '%s/%s' --runs '%s/%s.db' --steps %ld " TRAIN_ARGS " %s", pre,
                   test_tmpdir(), test_tmpdir(), out, test_tmpdir(), runs, steps, test_tmpdir(), more);
}

/* The loss of steps 1..n (index step-1) of the newest run in tmpdir/<name>.db; returns the
 * number of steps, -1 on error. first_step: lowest step seen. */
static int losses(const char *name, double *loss, int n, long *first_step)
{
    char path[1024];
    snprintf(path, sizeof path, "%s/%s.db", test_tmpdir(), name);
    struct rdb db;
    struct rdb_run *runs = NULL;
    int nr = 0;
    if (rdb_open_readonly(&db, path, NULL))
        return -1;
    if (rdb_runs_list(&db, 0, &runs, &nr, NULL) || nr < 1) {
        rdb_close(&db, NULL);
        return -1;
    }
    struct rdb_step *st = NULL;
    int64_t ns = 0;
    int rc = rdb_train_steps_load(&db, runs[0].id, -1, &st, &ns, NULL);
    int runs_n = nr;
    rdb_runs_free(runs, nr);
    rdb_close(&db, NULL);
    if (rc)
        return -1;
    *first_step = ns ? (long)st[0].step : 0;
    for (int64_t i = 0; i < ns; i++)
        if (st[i].step >= 1 && st[i].step <= n)
            loss[st[i].step - 1] = st[i].loss;
    lk_free(st);
    return runs_n == 1 ? (int)ns : -2; // one run per database: rank 0 alone wrote it
}

/* max over tensors of max|a - b| / max|b| between two float32 safetensors files; -1 when
 * they do not hold the same tensors. */
static double st_maxrel(const char *a, const char *b)
{
    struct st_file fa, fb;
    if (st_open(&fa, a, NULL))
        return -1;
    if (st_open(&fb, b, NULL)) {
        st_close(&fa);
        return -1;
    }
    double worst = fa.n == fb.n && fa.n > 0 ? 0 : -1;
    for (int i = 0; i < fa.n && worst >= 0; i++) {
        const struct st_tensor *ta = &fa.t[i], *tb = st_find(&fb, ta->name);
        if (!tb || tb->numel != ta->numel || ta->dtype != TENSOR_F32 || tb->dtype != TENSOR_F32) {
            worst = -1;
            break;
        }
        const float *x = ta->data, *y = tb->data;
        double dmax = 0, ymax = 0;
        for (size_t k = 0; k < ta->numel; k++) {
            dmax = fmax(dmax, fabs((double)x[k] - y[k]));
            ymax = fmax(ymax, fabs((double)y[k]));
        }
        double r = ymax > 0 ? dmax / ymax : dmax;
        worst = fmax(worst, r);
    }
    st_close(&fa);
    st_close(&fb);
    return worst;
}

static double adapter_maxrel(const char *d1, const char *d2)
{
    char a[1024], b[1024];
    snprintf(a, sizeof a, "%s/%s/adapter_model.safetensors", test_tmpdir(), d1);
    snprintf(b, sizeof b, "%s/%s/adapter_model.safetensors", test_tmpdir(), d2);
    return st_maxrel(a, b);
}

/* Checks the losses of steps from..to of run `name` against `ref` (1e-5 relative). */
static int losses_match(const char *name, const double *ref, int from, int to, double *worst)
{
    double l[32];
    long first = 0;
    for (int i = 0; i < 32; i++)
        l[i] = NAN;
    int n = losses(name, l, 32, &first);
    if (n != to - from + 1 || first != from)
        return -1;
    for (int s = from; s <= to; s++) {
        double r = fabs(l[s - 1] - ref[s - 1]) / fabs(ref[s - 1]);
        if (!(r <= 1e-5))
            return s;
        *worst = fmax(*worst, r);
    }
    return 0;
}

TEST(mpi_two_ranks_match_one_process)
{
    const char *why = mpi_missing();
    if (why)
        SKIP("%s", why);
    CHECK_INT(make_fixture(), 0);
    CHECK_INT(train(0, "one", "one", 20, NULL, NULL), 0);
    CHECK_MSG(train(2, "two", "two", 20, NULL, NULL) == 0, "mpirun failed:\n%s", test_output());
    const char *o = test_output();
    CHECK(strstr(o, "lorakit-mpi: 2 ranks"));
    CHECK(strstr(o, "data parallel: 2 ranks, micro-batches of 2 rows per rank"));
    CHECK(strstr(o, "tok/s (2 ranks, ") && strstr(o, "/rank)"));
    // rank 0 alone prints: one plan line, one line per step
    const char *p = strstr(o, "plan: ");
    CHECK(p && !strstr(p + 1, "plan: "));
    p = strstr(o, "step 20/20");
    CHECK(p && !strstr(p + 1, "step 20/20"));
    double ref[32], worst = 0;
    long first = 0;
    CHECK_INT(losses("one", ref, 32, &first), 20);
    CHECK_MSG(fabs(ref[19] - ref[0]) > 0.05, "the loss hardly moved (%g -> %g)", ref[0], ref[19]);
    int bad = losses_match("two", ref, 1, 20, &worst);
    CHECK_MSG(bad == 0, "loss curve of 2 ranks differs from one process (at step %d)", bad);
    // AdamW amplifies rounding where a gradient is nearly zero (lora_A's gradient is exactly 0
    // at step 1, B being 0): the adapter matches to ~1e-4 of each tensor's largest entry
    double ad = adapter_maxrel("two", "one");
    printf("    2 ranks vs 1 process: loss max rel diff %.2e, adapter max rel diff %.2e\n", worst, ad);
    CHECK_MSG(ad >= 0 && ad < 1e-3, "adapter max relative difference %g", ad);
    // rank 0 alone wrote the output: the adapter, no leftovers of other ranks
    CHECK(lk_file_exists(test_path("two/adapter_config.json")));
    DIR *dp = opendir(test_path("two"));
    CHECK(dp);
    int entries = 0;
    for (struct dirent *e; (e = readdir(dp));)
        entries += e->d_name[0] != '.';
    closedir(dp);
    CHECK_INT(entries, 2);
}

TEST(mpi_resume_with_another_number_of_ranks)
{
    const char *why = mpi_missing();
    if (why)
        SKIP("%s", why);
    CHECK_INT(make_fixture(), 0);
    CHECK_INT(train(0, "ref", "ref", 20, NULL, NULL), 0);
    double ref[32], worst = 0;
    long first = 0;
    CHECK_INT(losses("ref", ref, 32, &first), 20);
    // 2 ranks for 10 steps, then 3 ranks from its checkpoint to step 20
    CHECK_MSG(train(2, "a", "a", 10, "--save-every 10", NULL) == 0, "mpirun failed:\n%s", test_output());
    CHECK(lk_file_exists(test_path("a/checkpoint-10/trainer_state.json")));
    CHECK_MSG(train(3, "a", "a2", 20, "--resume", "a") == 0, "resume with 3 ranks failed:\n%s", test_output());
    CHECK(strstr(test_output(), "data parallel: 3 ranks"));
    int bad = losses_match("a2", ref, 11, 20, &worst);
    CHECK_MSG(bad == 0, "2 -> 3 ranks: resumed loss differs (at step %d)", bad);
    double ad1 = adapter_maxrel("a", "ref");
    CHECK_MSG(ad1 >= 0 && ad1 < 1e-3, "2 -> 3 ranks: adapter max relative difference %g", ad1);
    // one process for 10 steps, then 2 ranks to step 20
    CHECK_INT(train(0, "b", "b", 10, "--save-every 10", NULL), 0);
    // the checkpoint of 2 ranks equals that of one process: no per-rank state in it
    char c1[1024], c2[1024];
    snprintf(c1, sizeof c1, "%s/a/checkpoint-10/optimizer.safetensors", test_tmpdir());
    snprintf(c2, sizeof c2, "%s/b/checkpoint-10/optimizer.safetensors", test_tmpdir());
    double mom = st_maxrel(c1, c2);
    CHECK_MSG(mom >= 0 && mom < 1e-3, "checkpoint moments: 2 ranks vs 1 process differ by %g", mom);
    CHECK_MSG(train(2, "b", "b2", 20, "--resume", "b") == 0, "resume with 2 ranks failed:\n%s", test_output());
    bad = losses_match("b2", ref, 11, 20, &worst);
    CHECK_MSG(bad == 0, "1 -> 2 ranks: resumed loss differs (at step %d)", bad);
    double ad2 = adapter_maxrel("b", "ref");
    CHECK_MSG(ad2 >= 0 && ad2 < 1e-3, "1 -> 2 ranks: adapter max relative difference %g", ad2);
    printf("    resumed 2->3 and 1->2 ranks: loss max rel diff %.2e, adapter %.2e / %.2e, moments %.2e\n",
           worst, ad1, ad2, mom);
}

// ---- a rank that dies or hangs ----

/* 1 when process pid has OMPI_COMM_WORLD_RANK=<rank> and LORAKIT_TEST_DIR=<tmpdir> in its
 * environment: a rank of this test's run. */
static int is_rank(long pid, int rank)
{
    char path[300], want[64], dir[1100];
    static char buf[1 << 16];
    snprintf(path, sizeof path, "/proc/%ld/environ", pid);
    snprintf(want, sizeof want, "OMPI_COMM_WORLD_RANK=%d", rank);
    snprintf(dir, sizeof dir, "LORAKIT_TEST_DIR=%s", test_tmpdir());
    FILE *f = fopen(path, "r");
    if (!f)
        return 0;
    size_t n = fread(buf, 1, sizeof buf - 1, f);
    fclose(f);
    buf[n] = 0;
    int has_rank = 0, has_dir = 0;
    for (size_t i = 0; i < n; i += strlen(buf + i) + 1) {
        has_rank |= !strcmp(buf + i, want);
        has_dir |= !strcmp(buf + i, dir);
    }
    return has_rank && has_dir;
}

/* The pid of the child of `parent` that is rank `rank` of this test's run. */
static pid_t rank_pid(pid_t parent, int rank)
{
    DIR *dp = opendir("/proc");
    if (!dp)
        return -1;
    pid_t found = -1;
    for (struct dirent *e; found < 0 && (e = readdir(dp));) {
        char path[300], buf[1024];
        long pid = strtol(e->d_name, NULL, 10);
        if (pid <= 0)
            continue;
        snprintf(path, sizeof path, "/proc/%ld/stat", pid);
        FILE *f = fopen(path, "r");
        if (!f)
            continue;
        size_t n = fread(buf, 1, sizeof buf - 1, f);
        fclose(f);
        buf[n] = 0;
        const char *rp = strrchr(buf, ')');
        long ppid = 0;
        char state;
        if (!rp || sscanf(rp + 1, " %c %ld", &state, &ppid) != 2 || ppid != parent)
            continue;
        if (is_rank(pid, rank))
            found = (pid_t)pid;
    }
    closedir(dp);
    return found;
}

/* Starts a long 2-rank run in the background (its own process group, output to log), waits
 * until step 3 is printed, sends sig to rank 1 (to_mpirun: to mpirun) and returns mpirun's
 * exit status (128+signal when signalled) and the seconds it took to exit after the signal;
 * -1 when it did not start, -2 when it did not exit within 30 s (then everything is killed). */
static int signal_run(int sig, int to_mpirun, const char *env, double *secs)
{
    char cmd[4096];
    const char *t = test_tmpdir();
    snprintf(cmd, sizeof cmd, "exec env " MPI_ENV " LORAKIT_TEST_DIR='%s' %s mpirun -np 2 '%s' train "
         "--model '%s/m' --out '%s/k' --runs '%s/k.db' --steps 1000000 --overwrite " TRAIN_ARGS
             " >'%s/k.log' 2>&1",
             t, env, g_mpi, t, t, t, t, t);
    pid_t mp = fork();
    if (mp < 0)
        return -1;
    if (mp == 0) {
        setpgid(0, 0);
        execl("/bin/sh", "sh", "-c", cmd, (char *)NULL);
        _exit(127);
    }
    pid_t r1 = -1;
    int status = 0, rc = -1;
    for (int i = 0; i < 600; i++) { // 60 s to start and take 3 steps
        char *log = NULL;
        lk_read_file(test_path("k.log"), &log, NULL, NULL);
        int ready = log && strstr(log, "step 3/");
        lk_free(log);
        if (ready && (r1 = rank_pid(mp, 1)) > 0)
            break;
        if (waitpid(mp, &status, WNOHANG) == mp)
            return -1;
        struct timespec ts = { 0, 100000000 };
        nanosleep(&ts, NULL);
    }
    if (r1 > 0) {
        kill(to_mpirun ? mp : r1, sig);
        double t0 = lk_now();
        rc = -2;
        while (lk_now() - t0 < 30) {
            if (waitpid(mp, &status, WNOHANG) == mp) {
                *secs = lk_now() - t0;
                rc = WIFSIGNALED(status) ? 128 + WTERMSIG(status) : WEXITSTATUS(status);
                break;
            }
            struct timespec ts = { 0, 50000000 };
            nanosleep(&ts, NULL);
        }
        if (is_rank(r1, 1))
            kill(r1, SIGKILL); // a stopped rank left behind
    }
    if (rc < 0 || r1 < 0) {
        kill(-mp, SIGKILL);
        kill(mp, SIGKILL);
        waitpid(mp, &status, 0);
    }
    test_sh("cat '%s/k.log'", test_tmpdir()); // into test_output()
    return rc;
}

TEST(mpi_dead_or_hung_rank_stops_the_others)
{
    const char *why = mpi_missing();
    if (why)
        SKIP("%s", why);
    if (!test_full())
        SKIP("needs LK_TEST_FULL=1 (two long mpirun runs)");
    CHECK_INT(make_fixture(), 0);
    double secs = 0;
    // killed: mpirun notices the death and stops rank 0
    int rc = signal_run(SIGKILL, 0, "", &secs);
    CHECK_MSG(rc > 0, "mpirun status %d after SIGKILL of rank 1:\n%s", rc, test_output());
    CHECK_MSG(secs < 15, "rank 0 took %.1f s to stop", secs);
    CHECK_MSG(strstr(test_output(), "rank 1") && strstr(test_output(), "signal 9"), "no message:\n%s",
              test_output());
    printf("    rank 1 killed: mpirun exited %d after %.1f s\n", rc, secs);
    // hung (stopped): rank 0's allreduce times out with lorakit's message, then MPI_Abort
    rc = signal_run(SIGSTOP, 0, "LORAKIT_MPI_TIMEOUT=2", &secs);
    CHECK_MSG(rc > 0, "mpirun status %d after SIGSTOP of rank 1:\n%s", rc, test_output());
    CHECK_MSG(secs < 15, "rank 0 took %.1f s to stop", secs);
    // rank 1 may stop before the gradient allreduce or between it and the stop-flag one: either
    // names the collective rank 0 was waiting in
    static const char pre[] = "lorakit train: error: rank 0 of 2: no answer from the other ranks for 2 s in the ";
    const char *tm = strstr(test_output(), pre);
    CHECK_MSG(tm && (!strncmp(tm + strlen(pre), "gradient allreduce of step ", 27) ||
                     !strncmp(tm + strlen(pre), "stop-flag allreduce of step ", 28)),
              "no timeout message:\n%s", test_output());
    printf("    rank 1 stopped: mpirun exited %d after %.1f s (timeout 2 s)\n", rc, secs);
    // SIGUSR1 to mpirun (forwarded to every rank): all stop after the same step, rank 0 saves
    rc = signal_run(SIGUSR1, 1, "", &secs);
    CHECK_MSG(rc == 130, "mpirun status %d after SIGUSR1:\n%s", rc, test_output());
    const char *o = test_output(), *p = strstr(o, "lorakit train: interrupted at step ");
    long step = 0;
    CHECK_MSG(p && sscanf(p, "lorakit train: interrupted at step %ld", &step) == 1, "%s", o);
    CHECK_MSG(!strstr(p + 1, "lorakit train: interrupted"), "more than one rank reported:\n%s", o);
    char ck[1200];
    snprintf(ck, sizeof ck, "%s/k/checkpoint-%ld/trainer_state.json", test_tmpdir(), step);
    CHECK_MSG(lk_file_exists(ck), "no checkpoint at step %ld:\n%s", step, o);
}
