/*
 * lorakit_mpi.c - bin/lorakit-mpi (built by `make MPI=1` with mpicc; bin/lorakit has no MPI):
 * `mpirun -np N lorakit-mpi train ...` trains data-parallel. Every rank runs cmd_train with the
 * same arguments; train_run gives rank r its contiguous share of each global batch (--batch is
 * global) and calls the allreduce below once per step on the gradient block plus the loss sum,
 * so every rank takes the same AdamW step. Rank 0 alone prints, writes checkpoints, the output
 * and the runs database (tools/train.c, through train_cli_dist).
 *
 * Failures: the communicator returns errors (MPI_ERRORS_RETURN) instead of aborting inside MPI,
 * and every collective is non-blocking, polled against a deadline (LORAKIT_MPI_TIMEOUT seconds,
 * default 600). A rank that dies or hangs makes the others fail the step with a message naming
 * it; main then calls MPI_Abort so mpirun stops every rank (no hang). SIGUSR1, which mpirun
 * forwards to every rank, stops the run like Ctrl-C does for one process: all ranks agree at the
 * end of the step and rank 0 writes a checkpoint.
 */
#include <cblas.h>
#include <errno.h>
#include <mpi.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "../libcore/lk.h"
#include "../libcore/train.h"
#include "../tools/commands.h"

#define DIST_TIMEOUT_DEFAULT 600.0

struct dist_mpi {
    MPI_Comm comm;           /* owned: a duplicate of MPI_COMM_WORLD that returns errors */
    int rank, size;
    double timeout;          /* seconds a collective may wait for the other ranks */
    long n_steps;            /* gradient reductions completed (steps of this launch) */
};

static void mpi_msg(int code, char *buf, size_t n)
{
    char s[MPI_MAX_ERROR_STRING];
    int len = 0;
    if (MPI_Error_string(code, s, &len) != MPI_SUCCESS)
        snprintf(s, sizeof s, "MPI error %d", code);
    snprintf(buf, n, "%s", s);
}

/* Waits for the requests, polling so that a deadline can end the wait: a short spin with
 * sched_yield (an oversubscribed core stays usable), then 100 us sleeps. */
static int dist_wait(struct dist_mpi *d, MPI_Request *req, int n_req, const char *what, struct lk_err *err)
{
    double t0 = MPI_Wtime();
    for (long polls = 0;; polls++) {
        int done = 0;
        int rc = MPI_Testall(n_req, req, &done, MPI_STATUSES_IGNORE);
        if (rc != MPI_SUCCESS) {
            char s[MPI_MAX_ERROR_STRING + 1];
            mpi_msg(rc, s, sizeof s);
            return lk_errf(err, LK_ERR_IO, "rank %d of %d: the %s of step %ld (of this launch) failed: "
                           "%s; a rank probably died: stopping all ranks", d->rank, d->size, what,
                           d->n_steps + 1, s);
        }
        if (done)
            return LK_OK;
        double waited = MPI_Wtime() - t0;
        if (waited > d->timeout)
            return lk_errf(err, LK_ERR_IO, "rank %d of %d: no answer from the other ranks for %.0f s in the %s "
                           "of step %ld (of this launch): a rank died or hangs (LORAKIT_MPI_TIMEOUT sets the "
                           "limit); stopping all ranks", d->rank, d->size, waited, what, d->n_steps + 1);
        if (polls < 2000) {
            sched_yield();
        } else {
            struct timespec ts = { 0, 100000 };
            nanosleep(&ts, NULL);
        }
    }
}

/* struct train_dist's allreduce_sum: buf (float) and scalars (double) are summed in place on
 * every rank; both reductions are in flight together and waited for under one deadline. */
static int dist_allreduce_sum(void *ctx, float *buf, size_t n, double *scalars, int n_scalars,
                              struct lk_err *err)
{
    struct dist_mpi *d = ctx;
    MPI_Request req[8];
    int n_req = 0, rc = MPI_SUCCESS;
    const char *what = n ? "gradient allreduce" : "stop-flag allreduce";
    // counts are ints in MPI: large blocks go in pieces (a full fine-tune of a big model)
    const size_t piece = (size_t)1 << 30;
    for (size_t off = 0; off < n && rc == MPI_SUCCESS;) {
        size_t k = n - off < piece ? n - off : piece;
        if (n_req == 7) { // more than 7 GiB of floats: wait for what is in flight first
            if (dist_wait(d, req, n_req, what, err))
                return err->code;
            n_req = 0;
        }
        rc = MPI_Iallreduce(MPI_IN_PLACE, buf + off, (int)k, MPI_FLOAT, MPI_SUM, d->comm, &req[n_req]);
        if (rc == MPI_SUCCESS)
            n_req++;
        off += k;
    }
    if (rc == MPI_SUCCESS && n_scalars > 0) {
        rc = MPI_Iallreduce(MPI_IN_PLACE, scalars, n_scalars, MPI_DOUBLE, MPI_SUM, d->comm, &req[n_req]);
        if (rc == MPI_SUCCESS)
            n_req++;
    }
    if (rc != MPI_SUCCESS) {
        char s[MPI_MAX_ERROR_STRING + 1];
        mpi_msg(rc, s, sizeof s);
        return lk_errf(err, LK_ERR_IO, "rank %d of %d: cannot start the %s of step %ld: %s", d->rank, d->size,
                       what, d->n_steps + 1, s);
    }
    if (n_req && dist_wait(d, req, n_req, what, err))
        return err->code;
    if (n)
        d->n_steps++;
    return LK_OK;
}

static void on_usr1(int sig)
{
    (void)sig;
    lk_interrupted = 1;
}

static int usage(FILE *f)
{
    fprintf(f, "usage: mpirun [mpirun options] -np N lorakit-mpi train [train options]\n\n"
               "lorakit-mpi: `lorakit train` data-parallel over MPI. --batch is the global batch, split\n"
               "across the ranks; rank 0 prints and writes the output, checkpoints and runs database.\n"
               "Without mpirun (or with -np 1) it is plain `lorakit train`. Other commands: use lorakit.\n\n"
               "environment:\n"
               "  LORAKIT_MPI_TIMEOUT=S  seconds a rank waits for the others in a step's allreduce before\n"
               "                         it stops every rank (default %.0f; mpirun -x passes it on)\n"
               "signals:\n"
               "  SIGUSR1 to mpirun      stop after the current step; rank 0 writes a checkpoint\n\n"
               "example:\n"
               "  mpirun --bind-to core -np 2 lorakit-mpi train --model m --data d.jsonl --out ad --threads 1\n"
               "  mpirun --hostfile hosts -np 8 lorakit-mpi train --model m --data d.jsonl --out ad\n",
            DIST_TIMEOUT_DEFAULT);
    return f == stdout ? 0 : 2;
}

/* Default BLAS threads per rank when neither OPENBLAS_NUM_THREADS nor --threads says: the
 * host's cores shared by the ranks on this host. */
static void default_threads(MPI_Comm comm)
{
    if (getenv("OPENBLAS_NUM_THREADS") || getenv("OMP_NUM_THREADS"))
        return;
    MPI_Comm local;
    int local_size = 1;
    if (MPI_Comm_split_type(comm, MPI_COMM_TYPE_SHARED, 0, MPI_INFO_NULL, &local) == MPI_SUCCESS) {
        MPI_Comm_size(local, &local_size);
        MPI_Comm_free(&local);
    }
    long cores = sysconf(_SC_NPROCESSORS_ONLN);
    long t = cores / (local_size > 0 ? local_size : 1);
    openblas_set_num_threads(t < 1 ? 1 : (int)t);
}

int main(int argc, char **argv)
{
    if (argc < 2)
        return usage(stderr);
    if (!strcmp(argv[1], "--help") || !strcmp(argv[1], "-h") || !strcmp(argv[1], "help"))
        return usage(stdout);
    if (strcmp(argv[1], "train")) {
        fprintf(stderr, "lorakit-mpi: only 'train' runs under MPI; use lorakit %s\n", argv[1]);
        return 2;
    }
    int provided = 0;
    if (MPI_Init_thread(&argc, &argv, MPI_THREAD_FUNNELED, &provided) != MPI_SUCCESS) {
        fprintf(stderr, "lorakit-mpi: error: MPI_Init_thread failed\n");
        return 1;
    }
    struct dist_mpi d = { MPI_COMM_NULL, 0, 1, DIST_TIMEOUT_DEFAULT, 0 };
    MPI_Comm_set_errhandler(MPI_COMM_WORLD, MPI_ERRORS_RETURN);
    MPI_Comm_dup(MPI_COMM_WORLD, &d.comm);
    MPI_Comm_set_errhandler(d.comm, MPI_ERRORS_RETURN);
    MPI_Comm_rank(d.comm, &d.rank);
    MPI_Comm_size(d.comm, &d.size);
    const char *to = getenv("LORAKIT_MPI_TIMEOUT");
    if (to) {
        char *end;
        double v = strtod(to, &end);
        if (end == to || *end || !(v > 0)) {
            if (d.rank == 0)
                fprintf(stderr, "lorakit-mpi: error: LORAKIT_MPI_TIMEOUT='%s' is not a positive number of "
                        "seconds\n", to);
            MPI_Finalize();
            return 2;
        }
        d.timeout = v;
    }
    struct train_dist dist = { d.rank, d.size, &d, dist_allreduce_sum };
    if (d.size > 1) {
        train_cli_dist = &dist;
        default_threads(d.comm);
        struct sigaction sa;
        memset(&sa, 0, sizeof sa);
        sa.sa_handler = on_usr1;
        sigemptyset(&sa.sa_mask);
        sigaction(SIGUSR1, &sa, NULL);
        if (d.rank == 0) {
            char host[MPI_MAX_PROCESSOR_NAME];
            int len = 0;
            MPI_Get_processor_name(host, &len);
            fprintf(stderr, "lorakit-mpi: %d ranks (rank 0 on %s), collective timeout %.0f s\n", d.size, host,
                    d.timeout);
        }
    }
    int rc = cmd_train(argc - 1, argv + 1);
    if (fflush(stdout) != 0 || ferror(stdout)) {
        fprintf(stderr, "lorakit-mpi: error: writing to standard output failed: %s\n", strerror(errno));
        rc = rc ? rc : 1;
    }
    if (rc != 0 && rc != 2 && rc != 130 && d.size > 1) {
        // the other ranks may be waiting in a collective: mpirun stops all of them (usage errors
        // (2) come from the arguments, the same on every rank; 130: all ranks stopped together)
        fflush(stderr);
        MPI_Abort(MPI_COMM_WORLD, rc);
    }
    MPI_Comm_free(&d.comm);
    MPI_Finalize();
    return rc;
}
