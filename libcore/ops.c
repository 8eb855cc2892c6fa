/*
 * ops.c - transformer kernels: linear (cblas_sgemm), RMSNorm, rotary embedding, causal
 * grouped-query attention, SwiGLU, cross-entropy, each with its backward. Float32 storage;
 * reductions in double where they feed a normaliser or a loss. Backward kernels accumulate.
 * Linears and attention are GEMMs through OpenBLAS, called single-threaded: the kernels share
 * the threads themselves (ops.h), and the linears on weight matrices are in ops_mat.c.
 */
#include "ops.h"

#include <cblas.h>
#include <math.h>
#include <omp.h>
#include <string.h>

/* Threads for an elementwise or row-wise kernel over n values: below ~16K values the wake-up of
 * a second thread costs more than it saves. */
static int team_for(size_t n)
{
    return n < ((size_t)1 << 14) ? 1 : op_team();
}

// ---- linear ----

void op_matmul_forward(float *out, const float *inp, const float *w, const float *bias, int N, int IC,
                       int OC)
{
    // out[N, OC] = inp[N, IC] @ w[OC, IC]^T (+ bias)
    if (bias) {
        for (int n = 0; n < N; n++)
            memcpy(out + (size_t)n * OC, bias, sizeof(float) * (size_t)OC);
    }
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, N, OC, IC, 1.0f, inp, IC, w, IC,
                bias ? 1.0f : 0.0f, out, OC);
}

void op_matmul_forward_acc(float *out, const float *inp, const float *w, float alpha, int N, int IC,
                           int OC)
{
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, N, OC, IC, alpha, inp, IC, w, IC, 1.0f, out, OC);
}

void op_matmul_backward(float *dinp, float *dw, float *dbias, const float *dout, const float *inp,
                        const float *w, int N, int IC, int OC)
{
    // forward was: out[n, o] = sum_i inp[n, i] * w[o, i] + bias[o]
    // so: dinp[n, i] += sum_o dout[n, o] w[o, i]; dw[o, i] += sum_n dout[n, o] inp[n, i]
    if (dinp)
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, N, IC, OC, 1.0f, dout, OC, w, IC, 1.0f,
                    dinp, IC);
    if (dw)
        cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, OC, IC, N, 1.0f, dout, OC, inp, IC, 1.0f, dw,
                    IC);
    if (dbias) {
        for (int o = 0; o < OC; o++) {
            double s = 0;
            for (int n = 0; n < N; n++)
                s += dout[(size_t)n * OC + o];
            dbias[o] += (float)s;
        }
    }
}

void op_matmul_forward_naive(float *out, const float *inp, const float *w, const float *bias, int N,
                             int IC, int OC)
{
    for (int n = 0; n < N; n++)
        for (int o = 0; o < OC; o++) {
            double s = bias ? bias[o] : 0.0;
            for (int i = 0; i < IC; i++)
                s += (double)inp[(size_t)n * IC + i] * w[(size_t)o * IC + i];
            out[(size_t)n * OC + o] = (float)s;
        }
}

// ---- RMSNorm ----

void op_rmsnorm_forward(float *out, float *rstd, const float *inp, const float *w, int N, int C,
                        float eps)
{
    int nt = team_for((size_t)N * C);
#pragma omp parallel for num_threads(nt) schedule(static) if (nt > 1)
    for (int n = 0; n < N; n++) {
        const float *x = inp + (size_t)n * C;
        float *y = out + (size_t)n * C;
        double ss;
        for (int i = (int)op_sumsq_simd(x, (size_t)C, &ss); i < C; i++)
            ss += (double)x[i] * x[i];
        float r = (float)(1.0 / sqrt(ss / C + eps));
        for (int i = (int)op_rmsnorm_row_simd(y, x, w, r, (size_t)C); i < C; i++)
            y[i] = (x[i] * r) * w[i];
        if (rstd)
            rstd[n] = r;
    }
}

void op_rmsnorm_backward(float *dinp, float *dw, const float *dout, const float *inp, const float *w,
                         const float *rstd, int N, int C)
{
    // forward was: y[i] = x[i] * r * w[i], r = (mean(x^2) + eps)^(-1/2)
    // so: dw[i] += dy[i] * x[i] * r; dx[j] = r * w[j] dy[j] - (r^3 / C) x[j] sum_i dy[i] w[i] x[i]
    // (rows on several threads only without dw, which every row adds into)
    int nt = dw ? 1 : team_for((size_t)N * C);
#pragma omp parallel for num_threads(nt) schedule(static) if (nt > 1)
    for (int n = 0; n < N; n++) {
        const float *x = inp + (size_t)n * C, *dy = dout + (size_t)n * C;
        float r = rstd[n];
        double dot;
        for (int i = (int)op_dot3_simd(dy, w, x, (size_t)C, &dot); i < C; i++)
            dot += (double)dy[i] * w[i] * x[i];
        float c = (float)(dot * r * r * r / C), *dx = dinp ? dinp + (size_t)n * C : NULL;
        int k = (int)op_rmsnorm_drow_simd(dx, dw, dy, x, w, r, c, (size_t)C);
        if (dw)
            for (int i = k; i < C; i++)
                dw[i] += dy[i] * x[i] * r;
        if (dx)
            for (int i = k; i < C; i++)
                dx[i] += r * w[i] * dy[i] - c * x[i];
    }
}

// ---- rotary embedding ----

void op_rope_inv_freq(float *inv_freq, int HS, double theta)
{
    // transformers: 1.0 / (base ** (arange(0, dim, 2).float() / dim)), in float32
    for (int i = 0; i < HS / 2; i++) {
        float e = (float)(2 * i) / (float)HS;
        inv_freq[i] = 1.0f / powf((float)theta, e);
    }
}

void op_rope_inv_freq_linear(float *inv_freq, int n, double factor)
{
    // transformers: inv_freq /= factor (a float32 tensor by a Python float)
    for (int i = 0; i < n; i++)
        inv_freq[i] /= (float)factor;
}

void op_rope_inv_freq_llama3(float *inv_freq, int n, double factor, double low_freq_factor,
                             double high_freq_factor, double original_max)
{
    // each line is one line of _compute_llama3_parameters on float32 tensors; Python scalars are
    // computed in double and rounded to float32 where they meet a tensor, and scalar / tensor is
    // torch's reciprocal(tensor) * scalar
    const double two_pi = 6.283185307179586;
    float low_wavelen = (float)(original_max / low_freq_factor);
    float high_wavelen = (float)(original_max / high_freq_factor);
    float fac = (float)factor, low = (float)low_freq_factor, span = (float)(high_freq_factor - low_freq_factor);
    for (int i = 0; i < n; i++) {
        float f = inv_freq[i];
        float wavelen = (1.0f / f) * (float)two_pi;
        float llama = wavelen > low_wavelen ? f / fac : f;
        float smooth = ((1.0f / wavelen) * (float)original_max - low) / span;
        float smoothed = (1.0f - smooth) * llama / fac + smooth * llama;
        int medium = !(wavelen < high_wavelen) && !(wavelen > low_wavelen);
        inv_freq[i] = medium ? smoothed : llama;
    }
}

static void rope_rotate(float *x, const int *pos, const float *inv_freq, int N, int H, int HS,
                        float sign)
{
    enum { CH = 64 }; // frequencies per chunk: cos and sin on the stack, any head size
    int half = HS / 2, nt = team_for((size_t)N * H * HS);
#pragma omp parallel for num_threads(nt) schedule(static) if (nt > 1)
    for (int n = 0; n < N; n++) {
        float p = (float)pos[n], cs[CH], sn[CH];
        for (int i0 = 0; i0 < half; i0 += CH) {
            int m = half - i0 < CH ? half - i0 : CH;
            for (int i = 0; i < m; i++) {
                float ang = p * inv_freq[i0 + i];
                cs[i] = cosf(ang);
                sn[i] = sign * sinf(ang);
            }
            for (int h = 0; h < H; h++) {
                float *v1 = x + ((size_t)n * H + h) * HS + i0, *v2 = v1 + half;
                // q*cos + rotate_half(q)*sin, rotate_half(q) = cat(-q2, q1)
                for (int i = (int)op_rope_row_simd(v1, v2, cs, sn, (size_t)m); i < m; i++) {
                    float x1 = v1[i], x2 = v2[i];
                    v1[i] = x1 * cs[i] - x2 * sn[i];
                    v2[i] = x2 * cs[i] + x1 * sn[i];
                }
            }
        }
    }
}

void op_rope_forward(float *x, const int *pos, const float *inv_freq, int N, int H, int HS)
{
    rope_rotate(x, pos, inv_freq, N, H, HS, 1.0f);
}

void op_rope_backward(float *dx, const int *pos, const float *inv_freq, int N, int H, int HS)
{
    // forward was an orthogonal rotation y = R x, so dx = R^T dy: rotate by -angle
    rope_rotate(dx, pos, inv_freq, N, H, HS, -1.0f);
}

// ---- attention ----

/* Causal attention in blocks of query rows: the rows [t0, t1) of a block attend to keys
 * [0, t1) only, so the GEMMs skip most of the masked upper triangle (with blocks of 64 and
 * T = 256, 40% of the T x T products). */
#define ATT_BLOCK 64

/* Row t of P: a[0, n) (n = t + 1: the keys up to t) becomes softmax(a) with the keys of another
 * segment than t's (sg non-NULL) masked to exactly 0, and a[n, end) zeros (the rest of the block,
 * which the backward's GEMMs read; columns past the block are never read). */
static void softmax_row(float *a, int n, int end, const int *sg, int t)
{
    if (sg)
        for (int t2 = 0; t2 < n; t2++)
            if (sg[t2] != sg[t])
                a[t2] = -INFINITY;
    float mx = -INFINITY;
    int k = (int)op_max_simd(a, (size_t)n, &mx);
    for (int t2 = k; t2 < n; t2++)
        mx = a[t2] > mx ? a[t2] : mx;
    // e^(a - mx): AVX2 blocks, plain tail
    for (int t2 = (int)op_sub_simd(a, a, mx, (size_t)n); t2 < n; t2++)
        a[t2] -= mx;
    for (int t2 = (int)op_exp_simd(a, a, (size_t)n); t2 < n; t2++)
        a[t2] = expf(a[t2]);
    if (sg) // a masked key gets exactly 0 (the AVX2 exp clamps e^-inf to about 1e-38)
        for (int t2 = 0; t2 < n; t2++)
            if (sg[t2] != sg[t])
                a[t2] = 0.0f;
    double sum;
    for (int t2 = (int)op_sum_simd(a, (size_t)n, &sum); t2 < n; t2++)
        sum += a[t2];
    float inv = (float)(1.0 / sum);
    for (int t2 = (int)op_scale_simd(a, inv, (size_t)n); t2 < n; t2++)
        a[t2] *= inv;
    for (int t2 = n; t2 < end; t2++)
        a[t2] = 0.0f;
}

/* Each (batch, head), block by block, is two GEMMs on strided views of q, k, v (lda = NH*HS or
 * NKV*HS): S = scale q k^T, the causal (and segment) mask and P = softmax(S) in place, out = P v.
 * att keeps the whole P [T, T] (zeros above the diagonal) for the backward. The (b, h) pairs are
 * spread over the threads, each running single-threaded GEMMs. */
void op_attention_forward(float *out, float *att, const float *q, const float *k, const float *v,
                          const int *seg, int B, int T, int NH, int NKV, int HS)
{
    int group = NH / NKV, Q = NH * HS, KV = NKV * HS;
    float scale = 1.0f / sqrtf((float)HS);
    int nt = team_for((size_t)B * NH * T * T);
    int prev = op_blas_serial_begin(nt);
#pragma omp parallel for collapse(2) num_threads(nt) schedule(static) if (nt > 1)
    for (int b = 0; b < B; b++)
        for (int h = 0; h < NH; h++) {
            int kh = h / group;
            const float *qb = q + (size_t)b * T * Q + (size_t)h * HS;
            const float *kb = k + (size_t)b * T * KV + (size_t)kh * HS;
            const float *vb = v + (size_t)b * T * KV + (size_t)kh * HS;
            float *P = att + ((size_t)b * NH + h) * T * T, *ob = out + (size_t)b * T * Q + (size_t)h * HS;
            const int *sg = seg ? seg + (size_t)b * T : NULL;
            for (int t0 = 0; t0 < T; t0 += ATT_BLOCK) {
                int t1 = t0 + ATT_BLOCK < T ? t0 + ATT_BLOCK : T;
                // 1. S[t0:t1, 0:t1] = scale * q[t0:t1] k[0:t1]^T
                cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, t1 - t0, t1, HS, scale, qb + (size_t)t0 * Q, Q,
                            kb, KV, 0.0f, P + (size_t)t0 * T, T);
                // 2. causal (and segment) mask, softmax per row (AVX2 pieces, plain tails)
                for (int t = t0; t < t1; t++)
                    softmax_row(P + (size_t)t * T, t + 1, t1, sg, t);
                // 3. out[t0:t1] = P[t0:t1, 0:t1] v[0:t1]
                cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, t1 - t0, HS, t1, 1.0f, P + (size_t)t0 * T, T,
                            vb, KV, 0.0f, ob + (size_t)t0 * Q, Q);
            }
        }
    op_blas_serial_end(prev);
}

void op_attention_backward(float *dq, float *dk, float *dv, const float *dout, const float *att,
                           const float *q, const float *k, const float *v, int B, int T, int NH,
                           int NKV, int HS, float *scratch, int nscratch)
{
    int group = NH / NKV, Q = NH * HS, KV = NKV * HS;
    float scale = 1.0f / sqrtf((float)HS);
    int nt = team_for((size_t)B * NH * T * T);
    if (nt > nscratch)
        nt = nscratch;
    int prev = op_blas_serial_begin(nt);
#pragma omp parallel for num_threads(nt) schedule(static) if (nt > 1)
    for (int bk = 0; bk < B * NKV; bk++)
        for (int h = (bk % NKV) * group; h < (bk % NKV + 1) * group; h++) {
            int b = bk / NKV, kh = bk % NKV;
            float *dP = scratch + (size_t)omp_get_thread_num() * T * T; // [T, T]
            size_t qo = (size_t)b * T * Q + (size_t)h * HS, ko = (size_t)b * T * KV + (size_t)kh * HS;
            const float *P = att + ((size_t)b * NH + h) * T * T;
            // the forward's blocks: query rows [t0, t1) against keys [0, t1)
            for (int t0 = 0; t0 < T; t0 += ATT_BLOCK) {
                int t1 = t0 + ATT_BLOCK < T ? t0 + ATT_BLOCK : T, nb = t1 - t0;
                const float *Pb = P + (size_t)t0 * T, *db = dout + qo + (size_t)t0 * Q;
                float *dPb = dP + (size_t)t0 * T;
                // forward 3: out = P v      => dP = dout v^T;  dv += P^T dout
                cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, nb, t1, HS, 1.0f, db, Q, v + ko, KV, 0.0f, dPb,
                            T);
                cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, t1, HS, nb, 1.0f, Pb, T, db, Q, 1.0f, dv + ko,
                            KV);
                // forward 2: P = softmax(S)  => dS = P * (dP - sum_t2 P dP), times scale from forward 1
                for (int t = t0; t < t1; t++) {
                    const float *p = P + (size_t)t * T;
                    float *d = dP + (size_t)t * T;
                    double dot;
                    for (int t2 = (int)op_dot_simd(p, d, (size_t)t + 1, &dot); t2 <= t; t2++)
                        dot += (double)p[t2] * d[t2];
                    for (int t2 = (int)op_softmax_drow_simd(d, p, (float)dot, scale, (size_t)t + 1); t2 <= t; t2++)
                        d[t2] = p[t2] * (d[t2] - (float)dot) * scale;
                    for (int t2 = t + 1; t2 < t1; t2++)
                        d[t2] = 0.0f;
                }
                // forward 1: S = scale q k^T  => dq += dS k;  dk += dS^T q
                cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, nb, HS, t1, 1.0f, dPb, T, k + ko, KV, 1.0f,
                            dq + qo + (size_t)t0 * Q, Q);
                cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, t1, HS, nb, 1.0f, dPb, T, q + qo + (size_t)t0 * Q,
                            Q, 1.0f, dk + ko, KV);
            }
        }
    op_blas_serial_end(prev);
}

// ---- residual ----

void op_add(float *dst, const float *src, size_t n)
{
    int nt = team_for(n);
#pragma omp parallel num_threads(nt) if (nt > 1)
    {
        int t = omp_get_thread_num(), m = omp_get_num_threads();
        size_t i0 = n * (size_t)t / (size_t)m & ~(size_t)7, i1 = t == m - 1 ? n : n * (size_t)(t + 1) / (size_t)m & ~(size_t)7;
        for (size_t i = i0 + op_add_simd(dst + i0, src + i0, i1 - i0); i < i1; i++)
            dst[i] += src[i];
    }
}

// ---- SwiGLU ----

/* Elements [i0, i1) in plain C (the AVX2 part takes whole blocks of 8 before them). */
static void swiglu_forward_plain(float *out, const float *gate, const float *up, size_t i0, size_t i1)
{
    for (size_t i = i0; i < i1; i++) {
        float g = gate[i];
        out[i] = g * (1.0f / (1.0f + expf(-g))) * up[i];
    }
}

void op_swiglu_forward(float *out, const float *gate, const float *up, size_t n)
{
    int nt = team_for(n);
#pragma omp parallel num_threads(nt) if (nt > 1)
    {
        int t = omp_get_thread_num(), m = omp_get_num_threads();
        size_t i0 = n * (size_t)t / (size_t)m & ~(size_t)7, i1 = t == m - 1 ? n : n * (size_t)(t + 1) / (size_t)m & ~(size_t)7;
        size_t k = op_swiglu_forward_simd(out + i0, gate + i0, up + i0, i1 - i0);
        swiglu_forward_plain(out, gate, up, i0 + k, i1);
    }
}

void op_swiglu_backward(float *dgate, float *dup, const float *dout, const float *gate,
                        const float *up, size_t n)
{
    // forward was: out = silu(g) * u, silu(g) = g * sig(g), silu'(g) = sig(g) (1 + g (1 - sig(g)))
    int nt = team_for(n);
#pragma omp parallel num_threads(nt) if (nt > 1)
    {
        int t = omp_get_thread_num(), m = omp_get_num_threads();
        size_t i0 = n * (size_t)t / (size_t)m & ~(size_t)7, i1 = t == m - 1 ? n : n * (size_t)(t + 1) / (size_t)m & ~(size_t)7;
        size_t k = op_swiglu_backward_simd(dgate + i0, dup + i0, dout + i0, gate + i0, up + i0, i1 - i0);
        for (size_t i = i0 + k; i < i1; i++) {
            float g = gate[i];
            float sg = 1.0f / (1.0f + expf(-g));
            float silu = g * sg;
            dup[i] = dout[i] * silu;
            dgate[i] = dout[i] * up[i] * (sg * (1.0f + g * (1.0f - sg)));
        }
    }
}

// ---- cross-entropy ----

/* One row's -log p(target); dx (may alias x, may be NULL) as op_crossentropy_forward_backward. */
static double crossentropy_row(float *dx, const float *x, int y, int V, float scale)
{
    if (y < 0) {
        if (dx)
            memset(dx, 0, sizeof(float) * (size_t)V);
        return 0.0;
    }
    float mx = x[0], xy = x[y]; // read before dx (which may alias x) is written
    for (int i = (int)op_max_simd(x, (size_t)V, &mx); i < V; i++)
        if (x[i] > mx)
            mx = x[i];
    // exp in float (each term is in (0, 1]); the sum and the log in double
    double sum = 0;
    if (dx) {
        // x - mx into dx (which may alias x), then its exp in place: AVX2 blocks, plain tails
        for (int i = (int)op_sub_simd(dx, x, mx, (size_t)V); i < V; i++)
            dx[i] = x[i] - mx;
        for (int i = (int)op_exp_simd(dx, dx, (size_t)V); i < V; i++)
            dx[i] = expf(dx[i]);
        for (int i = (int)op_sum_simd(dx, (size_t)V, &sum); i < V; i++)
            sum += dx[i];
    } else {
        for (int i = 0; i < V; i++)
            sum += expf(x[i] - mx);
    }
    double lse = mx + log(sum);
    if (dx) {
        // loss = lse - x[y]  =>  dx[i] = softmax(x)[i] - [i == y]
        float inv = (float)(scale / sum);
        for (int i = (int)op_scale_simd(dx, inv, (size_t)V); i < V; i++)
            dx[i] *= inv;
        dx[y] -= scale;
    }
    return lse - xy;
}

double op_crossentropy_forward_backward(float *dlogits, const float *logits, const int *targets,
                                        int N, int V, float scale)
{
    // contiguous blocks of rows per thread, their sums added in thread order: deterministic
    enum { MAXT = 64 };
    double part[MAXT] = { 0 };
    int nt = team_for((size_t)N * V);
    if (nt > MAXT)
        nt = MAXT;
#pragma omp parallel num_threads(nt) if (nt > 1)
    {
        int t = omp_get_thread_num(), n = omp_get_num_threads();
        int r0 = (int)((long)N * t / n), r1 = (int)((long)N * (t + 1) / n);
        double s = 0;
        for (int r = r0; r < r1; r++)
            s += crossentropy_row(dlogits ? dlogits + (size_t)r * V : NULL, logits + (size_t)r * V, targets[r], V,
                                  scale);
        part[t] = s;
    }
    double total = 0;
    for (int t = 0; t < nt; t++)
        total += part[t];
    return total;
}
