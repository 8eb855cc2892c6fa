/*
 * bench_compress.c - `lorakit svd-compress` end to end, timed as a child process (wall time
 * and peak RSS from wait4).
 *
 * 1. Randomized (r = 64) against exact gesdd, in the same run, on one-layer models whose only
 *    changed target is 4864 x 896 (up_proj, hidden 896) or 3584 x 3584 (q_proj, hidden 3584),
 *    the change being U·diag(σ)·Vᵀ with σ_i = 1/i (so exact gesdd gives the Eckart-Young
 *    optimum). Targets: randomized >= 5x faster, its relative error within 1% of exact's.
 * 2. A full fine-tune of the Qwen2.5-0.5B shape: base = `lorakit init --preset qwen2.5-0.5b
 *    --dtype bf16`; tuned = base + on every projection a rank-32 change with decaying column
 *    scales (‖ΔW‖_F about 5% of ‖W‖_F) + dense noise (1% of its energy), q/k/v biases
 *    nudged, written in bf16. Compressed to rank 64 on all projections, once. Reports time,
 *    peak RSS against the model's size, energy kept. Set BENCH_05B=0 to skip.
 * Usage: bench_compress LORAKIT WORKDIR. Exit status 1 when a target is missed.
 */
#define _DEFAULT_SOURCE /* wait4 (the child's peak RSS) is a BSD extension, not POSIX */
#include <cJSON.h>
#include <cblas.h>
#include <lapacke.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/time.h>
#include <sys/wait.h>
#include <unistd.h>

#include "../libcore/cfg.h"
#include "../libcore/lk.h"
#include "../libcore/model.h"
#include "../libcore/st.h"

static const char *lorakit, *work;

static void die(const char *what)
{
    fprintf(stderr, "bench_compress: %s\n", what);
    exit(1);
}

static float *xmalloc(size_t n)
{
    float *p = malloc(n * sizeof(float));
    if (!p)
        die("out of memory");
    return p;
}

/* Runs argv with stdout to out_path; wall seconds and peak RSS (MB) of the child. */
static int run(const char *const argv[], const char *out_path, double *secs, double *rss_mb)
{
    fflush(stdout); // else the child's freopen flushes our buffered output a second time
    double t0 = lk_now();
    pid_t pid = fork();
    if (pid < 0)
        die("fork failed");
    if (pid == 0) {
        if (out_path && !freopen(out_path, "w", stdout))
            _exit(127);
        execv(argv[0], (char *const *)argv); // execv's prototype predates const
        _exit(127);
    }
    int status;
    struct rusage ru;
    if (wait4(pid, &status, 0, &ru) < 0)
        die("wait4 failed");
    *secs = lk_now() - t0;
    *rss_mb = ru.ru_maxrss / 1024.0;
    return WIFEXITED(status) ? WEXITSTATUS(status) : 128;
}

static cJSON *read_json(const char *path)
{
    char *text;
    size_t len;
    if (lk_read_file(path, &text, &len, NULL))
        return NULL;
    cJSON *j = cJSON_Parse(text);
    lk_free(text);
    return j;
}

static void path(char *buf, size_t n, const char *name)
{
    snprintf(buf, n, "%s/%s", work, name);
}

// ---- 1. randomized vs exact on one changed tensor ----

/* r orthonormal vectors of dimension d as the rows of [r, d]. */
static float *rand_orth(struct lk_rng *rng, int d, int r)
{
    float *Q = xmalloc((size_t)d * r), *tau = xmalloc((size_t)r);
    for (size_t i = 0; i < (size_t)d * r; i++)
        Q[i] = lk_rng_normal(rng);
    LAPACKE_sgeqrf(LAPACK_COL_MAJOR, d, r, Q, d, tau);
    LAPACKE_sorgqr(LAPACK_COL_MAJOR, d, r, r, Q, d, tau);
    free(tau);
    return Q;
}

static int bench_shape(int hidden, int inter, int heads, int kv, int hs, int module)
{
    struct cfg c;
    cfg_default_qwen2(&c);
    c.hidden_size = hidden;
    c.intermediate_size = inter;
    c.num_attention_heads = heads;
    c.num_key_value_heads = kv;
    c.head_dim = hs;
    c.num_hidden_layers = 1;
    c.vocab_size = 64;
    struct model m;
    struct lk_err err = { 0 };
    if (model_init(&m, &c, &err))
        die(err.msg);
    struct lk_rng rng;
    lk_rng_seed(&rng, 1);
    model_weights_randomize(&m.w, &c, 0.02f, &rng);
    char b[512], t[512], out[512], js[512], runs[512];
    path(b, sizeof b, "shape_base");
    path(t, sizeof t, "shape_tuned");
    path(out, sizeof out, "shape_adapter");
    path(js, sizeof js, "shape.json");
    path(runs, sizeof runs, "runs.db");
    lk_rm_rf(b);
    lk_rm_rf(t);
    lk_mkdir_p(b, NULL);
    lk_mkdir_p(t, NULL);
    if (model_save(&m, b, TENSOR_F32, &err))
        die(err.msg);
    float *W = module == CFG_UP ? m.w.layer[0].wup.f : m.w.layer[0].wq.f;
    int rows = module == CFG_UP ? inter : heads * hs, cols = hidden, mn = rows < cols ? rows : cols;
    float *Ut = rand_orth(&rng, rows, mn), *Vt = rand_orth(&rng, cols, mn);
    for (int i = 0; i < mn; i++)
        cblas_sscal(rows, 1.0f / (float)(i + 1), Ut + (size_t)i * rows, 1);
    cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, rows, cols, mn, 1.0f, Ut, rows, Vt, cols, 1.0f, W, cols);
    free(Ut);
    free(Vt);
    if (model_save(&m, t, TENSOR_F32, &err))
        die(err.msg);
    model_release(&m);
    const char *method[2] = { "--exact", "--randomized" };
    double secs[2], rss[2], rel[2];
    for (int k = 0; k < 2; k++) {
        const char *argv[] = { lorakit, "svd-compress", "--base", b, "--tuned", t, "--out", out,
                         "--rank", "64", "--targets", cfg_module_names[module], method[k],
                         "--json", "--quiet", "--overwrite", "--runs", runs, NULL };
        if (run(argv, js, &secs[k], &rss[k]))
            die("svd-compress failed");
        cJSON *j = read_json(js);
        cJSON *ts = j ? cJSON_GetObjectItem(j, "tensors") : NULL;
        cJSON *t0 = ts ? cJSON_GetArrayItem(ts, 0) : NULL;
        if (!t0)
            die("no report");
        rel[k] = cJSON_GetObjectItem(t0, "rel_error")->valuedouble;
        cJSON_Delete(j);
    }
    double ratio = secs[0] / secs[1], excess = rel[1] / rel[0] - 1;
    int ok = ratio >= 5 && excess <= 0.01;
    printf("%5d x %-5d  exact %7.2f s (err %.5f)  randomized %6.2f s (err %.5f, +%.3f%%)  %5.1fx  "
           "peak RSS %.0f / %.0f MB  %s\n",
           rows, cols, secs[0], rel[0], secs[1], rel[1], 100 * excess, ratio, rss[0], rss[1], ok ? "ok" : "MISSED");
    lk_rm_rf(b);
    lk_rm_rf(t);
    lk_rm_rf(out);
    return ok;
}

// ---- 2. a full fine-tune of the 0.5B shape ----

/* Writes tuned = base + low-rank + noise (bf16) from the base folder, tensor by tensor. */
static void make_tuned(const char *base, const char *tuned)
{
    struct lk_err err = { 0 };
    struct cfg c;
    struct st_model sm;
    if (cfg_load(&c, base, &err) || st_model_open(&sm, base, &err))
        die(err.msg);
    struct cfg_tensor *ts;
    int n;
    if (cfg_tensors(&c, &ts, &n, &err))
        die(err.msg);
    lk_mkdir_p(tuned, NULL);
    char src[600], dst[600];
    snprintf(src, sizeof src, "%s/config.json", base);
    snprintf(dst, sizeof dst, "%s/config.json", tuned);
    if (lk_copy_file(src, dst, &err))
        die(err.msg);
    struct st_model_writer mw;
    st_model_writer_init(&mw, tuned, 0, &err);
    for (int i = 0; i < n; i++)
        st_model_writer_declare(&mw, ts[i].name, TENSOR_BF16, ts[i].ndim, ts[i].shape);
    st_model_writer_begin(&mw);
    struct lk_rng rng;
    lk_rng_seed(&rng, 42);
    const int K = 32;
    float *buf = NULL, *B = NULL, *A = NULL;
    size_t cap = 0;
    for (int i = 0; i < n && !err.code; i++) {
        const struct st_tensor *t = st_model_find(&sm, ts[i].name, NULL);
        if (!t)
            die("tensor missing in the base");
        if (ts[i].kind != CFG_T_LINEAR && ts[i].kind != CFG_T_BIAS) {
            st_model_writer_write(&mw, t->data, t->dtype);
            continue;
        }
        if (t->numel > cap) {
            free(buf);
            buf = xmalloc(cap = t->numel);
        }
        st_tensor_to_f32(t, buf, &err);
        double w2 = 0;
        for (size_t j = 0; j < t->numel; j++)
            w2 += (double)buf[j] * buf[j];
        if (ts[i].kind == CFG_T_BIAS) {
            for (size_t j = 0; j < t->numel; j++)
                buf[j] += 0.01f * lk_rng_normal(&rng);
        } else {
            int m = (int)ts[i].shape[0], k = (int)ts[i].shape[1];
            free(B);
            free(A);
            B = xmalloc((size_t)m * K);
            A = xmalloc((size_t)K * k);
            for (int r = 0; r < K; r++)
                for (int a = 0; a < m; a++)
                    B[(size_t)a * K + r] = lk_rng_normal(&rng) / (float)(r + 1);
            for (size_t j = 0; j < (size_t)K * k; j++)
                A[j] = lk_rng_normal(&rng);
            double d2 = 0; // ‖B·A‖_F² ≈ m k Σ 1/(r+1)²
            for (int r = 0; r < K; r++)
                d2 += (double)m * k / ((r + 1.0) * (r + 1.0));
            float s = (float)(0.05 * sqrt(w2 / d2));
            float noise = (float)(0.1 * 0.05 * sqrt(w2 / ((double)m * k)));
            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, m, k, K, s, B, K, A, k, 1.0f, buf, k);
            for (size_t j = 0; j < t->numel; j++)
                buf[j] += noise * lk_rng_normal(&rng);
        }
        st_model_writer_write(&mw, buf, TENSOR_F32);
    }
    free(buf);
    free(B);
    free(A);
    if (err.code || st_model_writer_commit(&mw))
        die(err.msg);
    lk_free(ts);
    st_model_close(&sm);
    cfg_release(&c);
}

static double dir_mb(const char *dir)
{
    char p[600];
    snprintf(p, sizeof p, "%s/model.safetensors", dir);
    struct stat st;
    return stat(p, &st) ? 0 : st.st_size / 1e6;
}

static int bench_05b(void)
{
    char b[512], t[512], out[512], js[512], runs[512];
    path(b, sizeof b, "q05_base");
    path(t, sizeof t, "q05_tuned");
    path(out, sizeof out, "q05_adapter");
    path(js, sizeof js, "q05.json");
    path(runs, sizeof runs, "runs.db");
    double secs, rss;
    if (!lk_is_dir(b)) {
        const char *argv[] = { lorakit, "init", "--preset", "qwen2.5-0.5b", "--dtype", "bf16", "--seed", "1",
                         "--out", b, NULL };
        if (run(argv, "/dev/null", &secs, &rss))
            die("lorakit init failed");
    }
    if (!lk_is_dir(t)) {
        double t0 = lk_now();
        make_tuned(b, t);
        fprintf(stderr, "bench_compress: built the 0.5B fine-tune in %.1f s\n", lk_now() - t0);
    }
    const char *argv[] = { lorakit, "svd-compress", "--base", b, "--tuned", t, "--out", out, "--rank", "64",
                     "--json", "--quiet", "--overwrite", "--runs", runs, NULL };
    if (run(argv, js, &secs, &rss))
        die("svd-compress failed on the 0.5B model");
    cJSON *j = read_json(js), *tot = j ? cJSON_GetObjectItem(j, "totals") : NULL;
    if (!tot)
        die("no report");
    double kept = cJSON_GetObjectItem(tot, "energy_kept")->valuedouble;
    double ap = cJSON_GetObjectItem(tot, "adapter_params")->valuedouble;
    double dp = cJSON_GetObjectItem(tot, "delta_params")->valuedouble;
    double mb = dir_mb(t);
    int ok = rss < 0.5 * mb;
    printf("qwen2.5-0.5b shape, bf16 (%.0f MB per model), rank 64 on all 168 projections: %.1f s, "
           "peak RSS %.0f MB (%.0f%% of one model), energy kept %.2f%%, adapter %.1fM params vs %.1fM in "
           "the delta  %s\n", mb, secs, rss, 100 * rss / mb, 100 * kept, ap / 1e6, dp / 1e6, ok ? "ok" : "MISSED");
    cJSON_Delete(j);
    return ok;
}

int main(int argc, char **argv)
{
    if (argc < 3) {
        fprintf(stderr, "usage: bench_compress LORAKIT WORKDIR\n");
        return 2;
    }
    lorakit = argv[1];
    work = argv[2];
    lk_mkdir_p(work, NULL);
    printf("svd-compress end to end, rank 64 (OPENBLAS_NUM_THREADS=%s)\n",
           getenv("OPENBLAS_NUM_THREADS") ? getenv("OPENBLAS_NUM_THREADS") : "unset");
    int ok = bench_shape(896, 4864, 14, 2, 64, CFG_UP);
    ok &= bench_shape(3584, 64, 28, 4, 128, CFG_Q);
    const char *q = getenv("BENCH_05B");
    if (!q || strcmp(q, "0"))
        ok &= bench_05b();
    return ok ? 0 : 1;
}
