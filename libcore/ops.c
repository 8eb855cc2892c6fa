/*
 * ops.c - transformer kernels: linear (cblas_sgemm), RMSNorm, rotary embedding, causal
 * grouped-query attention, SwiGLU, cross-entropy, each with its backward. Float32 storage;
 * reductions in double where they feed a normaliser or a loss. Backward kernels accumulate.
 * Attention runs its (batch, kv-head) groups on OpenMP threads; the linears rely on
 * OpenBLAS's own threads.
 */
#include "ops.h"

#include <cblas.h>
#include <math.h>
#include <string.h>

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
    for (int n = 0; n < N; n++) {
        const float *x = inp + (size_t)n * C;
        float *y = out + (size_t)n * C;
        double ss = 0;
        for (int i = 0; i < C; i++)
            ss += (double)x[i] * x[i];
        float r = (float)(1.0 / sqrt(ss / C + eps));
        for (int i = 0; i < C; i++)
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
    for (int n = 0; n < N; n++) {
        const float *x = inp + (size_t)n * C, *dy = dout + (size_t)n * C;
        float r = rstd[n];
        double dot = 0;
        for (int i = 0; i < C; i++)
            dot += (double)dy[i] * w[i] * x[i];
        if (dw)
            for (int i = 0; i < C; i++)
                dw[i] += dy[i] * x[i] * r;
        if (dinp) {
            float *dx = dinp + (size_t)n * C;
            float c = (float)(dot * r * r * r / C);
            for (int i = 0; i < C; i++)
                dx[i] += r * w[i] * dy[i] - c * x[i];
        }
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

static void rope_rotate(float *x, const int *pos, const float *inv_freq, int N, int H, int HS,
                        float sign)
{
    int half = HS / 2;
    for (int n = 0; n < N; n++) {
        float p = (float)pos[n];
        for (int i = 0; i < half; i++) {
            float ang = p * inv_freq[i];
            float c = cosf(ang), s = sign * sinf(ang);
            for (int h = 0; h < H; h++) {
                float *v = x + ((size_t)n * H + h) * HS;
                float x1 = v[i], x2 = v[i + half];
                // q*cos + rotate_half(q)*sin, rotate_half(q) = cat(-q2, q1)
                v[i] = x1 * c - x2 * s;
                v[i + half] = x2 * c + x1 * s;
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

void op_attention_forward(float *out, float *att, const float *q, const float *k, const float *v,
                          const int *seg, int B, int T, int NH, int NKV, int HS)
{
    int group = NH / NKV;
    float scale = 1.0f / sqrtf((float)HS);
    size_t qs = (size_t)NH * HS, ks = (size_t)NKV * HS;
#pragma omp parallel for collapse(2) schedule(static)
    for (int b = 0; b < B; b++)
        for (int h = 0; h < NH; h++) {
            int kh = h / group;
            for (int t = 0; t < T; t++) {
                const float *qt = q + ((size_t)b * T + t) * qs + (size_t)h * HS;
                float *a = att + (((size_t)b * NH + h) * T + t) * T;
                int st = seg ? seg[(size_t)b * T + t] : 0;
                // 1. scores and max over allowed keys
                float mx = -INFINITY;
                for (int t2 = 0; t2 <= t; t2++) {
                    if (seg && seg[(size_t)b * T + t2] != st) {
                        a[t2] = -INFINITY;
                        continue;
                    }
                    const float *kt = k + ((size_t)b * T + t2) * ks + (size_t)kh * HS;
                    float s = 0;
                    for (int i = 0; i < HS; i++)
                        s += qt[i] * kt[i];
                    s *= scale;
                    a[t2] = s;
                    if (s > mx)
                        mx = s;
                }
                // 2. softmax (the diagonal is always allowed, so mx is finite)
                double sum = 0;
                for (int t2 = 0; t2 <= t; t2++) {
                    float e = a[t2] == -INFINITY ? 0.0f : expf(a[t2] - mx);
                    a[t2] = e;
                    sum += e;
                }
                float inv = (float)(1.0 / sum);
                for (int t2 = 0; t2 <= t; t2++)
                    a[t2] *= inv;
                for (int t2 = t + 1; t2 < T; t2++)
                    a[t2] = 0.0f;
                // 3. weighted sum of values
                float *o = out + ((size_t)b * T + t) * qs + (size_t)h * HS;
                for (int i = 0; i < HS; i++)
                    o[i] = 0.0f;
                for (int t2 = 0; t2 <= t; t2++) {
                    float w = a[t2];
                    if (w == 0.0f)
                        continue;
                    const float *vt = v + ((size_t)b * T + t2) * ks + (size_t)kh * HS;
                    for (int i = 0; i < HS; i++)
                        o[i] += w * vt[i];
                }
            }
        }
}

void op_attention_backward(float *dq, float *dk, float *dv, const float *dout, const float *att,
                           const float *q, const float *k, const float *v, int B, int T, int NH,
                           int NKV, int HS)
{
    int group = NH / NKV;
    float scale = 1.0f / sqrtf((float)HS);
    size_t qs = (size_t)NH * HS, ks = (size_t)NKV * HS;
    // dk, dv of one kv head are shared by its query heads: one thread owns a (b, kv head) group
#pragma omp parallel for collapse(2) schedule(static)
    for (int b = 0; b < B; b++)
        for (int kh = 0; kh < NKV; kh++) {
            for (int h = kh * group; h < (kh + 1) * group; h++)
                for (int t = 0; t < T; t++) {
                    const float *a = att + (((size_t)b * NH + h) * T + t) * T;
                    const float *dot_ = dout + ((size_t)b * T + t) * qs + (size_t)h * HS;
                    const float *qt = q + ((size_t)b * T + t) * qs + (size_t)h * HS;
                    float *dqt = dq + ((size_t)b * T + t) * qs + (size_t)h * HS;
                    // forward 3: o = sum_t2 a[t2] v[t2]  => da[t2] = dout . v[t2], dv[t2] += a dout
                    // forward 2: a = softmax(s)          => ds = a * (da - sum a*da)
                    // forward 1: s = scale q . k[t2]     => dq += ds scale k, dk[t2] += ds scale q
                    double sum_ada = 0;
                    for (int t2 = 0; t2 <= t; t2++) {
                        if (a[t2] == 0.0f)
                            continue;
                        const float *vt = v + ((size_t)b * T + t2) * ks + (size_t)kh * HS;
                        float da = 0;
                        for (int i = 0; i < HS; i++)
                            da += dot_[i] * vt[i];
                        sum_ada += (double)a[t2] * da;
                    }
                    for (int t2 = 0; t2 <= t; t2++) {
                        float w = a[t2];
                        if (w == 0.0f)
                            continue;
                        const float *vt = v + ((size_t)b * T + t2) * ks + (size_t)kh * HS;
                        const float *kt = k + ((size_t)b * T + t2) * ks + (size_t)kh * HS;
                        float *dvt = dv + ((size_t)b * T + t2) * ks + (size_t)kh * HS;
                        float *dkt = dk + ((size_t)b * T + t2) * ks + (size_t)kh * HS;
                        float da = 0;
                        for (int i = 0; i < HS; i++) {
                            da += dot_[i] * vt[i];
                            dvt[i] += w * dot_[i];
                        }
                        float ds = w * (da - (float)sum_ada) * scale;
                        for (int i = 0; i < HS; i++) {
                            dqt[i] += ds * kt[i];
                            dkt[i] += ds * qt[i];
                        }
                    }
                }
        }
}

// ---- SwiGLU ----

void op_swiglu_forward(float *out, const float *gate, const float *up, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        float g = gate[i];
        out[i] = g / (1.0f + expf(-g)) * up[i];
    }
}

void op_swiglu_backward(float *dgate, float *dup, const float *dout, const float *gate,
                        const float *up, size_t n)
{
    // forward was: out = silu(g) * u, silu(g) = g * sig(g), silu'(g) = sig(g) (1 + g (1 - sig(g)))
    for (size_t i = 0; i < n; i++) {
        float g = gate[i];
        float sg = 1.0f / (1.0f + expf(-g));
        float silu = g * sg;
        dup[i] += dout[i] * silu;
        dgate[i] += dout[i] * up[i] * sg * (1.0f + g * (1.0f - sg));
    }
}

// ---- cross-entropy ----

double op_crossentropy_forward_backward(float *dlogits, const float *logits, const int *targets,
                                        int N, int V, float scale)
{
    double total = 0;
    for (int n = 0; n < N; n++) {
        const float *x = logits + (size_t)n * V;
        float *dx = dlogits ? dlogits + (size_t)n * V : NULL;
        int y = targets[n];
        if (y < 0) {
            if (dx)
                memset(dx, 0, sizeof(float) * (size_t)V);
            continue;
        }
        float mx = x[0];
        for (int i = 1; i < V; i++)
            if (x[i] > mx)
                mx = x[i];
        double sum = 0;
        for (int i = 0; i < V; i++)
            sum += exp((double)x[i] - mx);
        double lse = mx + log(sum);
        total += lse - x[y];
        if (dx) {
            // loss = lse - x[y]  =>  dx[i] = softmax(x)[i] - [i == y]
            for (int i = 0; i < V; i++)
                dx[i] = (float)(exp((double)x[i] - lse)) * scale;
            dx[y] -= scale;
        }
    }
    return total;
}
