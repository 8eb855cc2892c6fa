/*
 * ref_model.c - the double-precision reference decoder (see ref_model.h). Everything is a
 * plain loop over the definitions in transformers' modeling_qwen2.py / modeling_qwen3.py /
 * modeling_llama.py and modeling_rope_utils.py.
 */
#include "ref_model.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "../libcore/ops.h"
#include "../libcore/tensor.h"

const struct lora *ref_dora_frozen;

static double *dz(size_t n)
{
    double *p = calloc(n ? n : 1, sizeof(double));
    if (!p)
        abort();
    return p;
}

/* y[N, out] = x[N, in] W^T + b  (+ s * B A drop(x) + s * lora_bias) */
/* A weight as the model keeps it (float32, or bf16 / f16 widened by tensor.h's scalar conversion,
 * not the engine's kernels). */
static double wat(const struct op_mat *W, size_t i)
{
    if (W->dtype == TENSOR_F32)
        return W->f[i];
    return W->dtype == TENSOR_BF16 ? tensor_bf16_to_f32(W->h[i]) : tensor_f16_to_f32(W->h[i]);
}

static void ref_linear(double *y, const double *x, const struct op_mat *W, const float *b, int N, int in,
                       int out, const struct lora *lora, int layer, int module, uint64_t seed,
                       int train)
{
    for (int n = 0; n < N; n++)
        for (int o = 0; o < out; o++) {
            double s = b ? b[o] : 0.0;
            for (int i = 0; i < in; i++)
                s += x[(size_t)n * in + i] * wat(W, (size_t)o * in + i);
            y[(size_t)n * out + o] = s;
        }
    const struct lora_module *md = lora ? lora_find(lora, layer, module) : NULL;
    if (!md)
        return;
    int slot = lora->index[layer * CFG_N_MODULES + module];
    double p = lora->cfg.dropout;
    double *xd = dz((size_t)N * in);
    int dropping = train && p > 0;
    double keepf = dropping ? (double)(1.0f / (1.0f - (float)p)) : 1.0; // the engine's float constant
    for (size_t i = 0; i < (size_t)N * in; i++) {
        int keep = !dropping || op_dropout_keep(seed, (uint64_t)slot, i, (float)p);
        xd[i] = keep ? x[i] * keepf : 0.0;
    }
    for (int n = 0; n < N; n++) {
        for (int o = 0; o < out; o++) {
            double acc = 0;
            for (int r = 0; r < md->R; r++) {
                double xa = 0;
                for (int i = 0; i < in; i++)
                    xa += (double)md->A[(size_t)r * in + i] * xd[(size_t)n * in + i];
                acc += (double)md->B[(size_t)o * md->R + r] * xa;
            }
            y[(size_t)n * out + o] += md->scale * acc + (md->bias ? md->scale * (double)md->bias[o] : 0.0);
        }
    }
    if (md->mag) {
        // DoRA: y = b + g (y - b), g = m / ||W + s B A||_row with the norm taken from the frozen
        // factors (ref_dora_frozen), since the engine detaches it as PEFT does
        const struct lora_module *fz = ref_dora_frozen ? lora_find(ref_dora_frozen, layer, module) : md;
        for (int o = 0; o < out; o++) {
            double ss = 0;
            for (int i = 0; i < in; i++) {
                double wv = wat(W, (size_t)o * in + i);
                for (int r = 0; r < fz->R; r++)
                    wv += fz->scale * (double)fz->B[(size_t)o * fz->R + r] * fz->A[(size_t)r * in + i];
                ss += wv * wv;
            }
            double g = md->mag[o] / sqrt(ss), bo = b ? b[o] : 0.0;
            for (int n = 0; n < N; n++)
                y[(size_t)n * out + o] = bo + g * (y[(size_t)n * out + o] - bo);
        }
    }
    free(xd);
}

static void ref_rmsnorm(double *y, const double *x, const float *w, int N, int C, double eps)
{
    for (int n = 0; n < N; n++) {
        double ss = 0;
        for (int i = 0; i < C; i++)
            ss += x[(size_t)n * C + i] * x[(size_t)n * C + i];
        double r = 1.0 / sqrt(ss / C + (double)(float)eps);
        for (int i = 0; i < C; i++)
            y[(size_t)n * C + i] = x[(size_t)n * C + i] * r * w[i];
    }
}

void ref_rope_inv_freq(const struct cfg *c, double *out)
{
    int dim = c->head_dim;
    const struct cfg_rope_scaling *r = &c->rope_scaling;
    for (int i = 0; i < dim / 2; i++) {
        // _compute_default_rope_parameters: 1 / base^(arange(0, dim, 2) / dim)
        double f = 1.0 / pow(c->rope_theta, (double)(2 * i) / dim);
        if (r->type == CFG_ROPE_LINEAR) {
            f /= r->factor;
        } else if (r->type == CFG_ROPE_LLAMA3) {
            // _compute_llama3_parameters, one frequency at a time
            double old_ctx = r->original_max_position_embeddings;
            double low_wavelen = old_ctx / r->low_freq_factor, high_wavelen = old_ctx / r->high_freq_factor;
            double wavelen = 2 * 3.14159265358979323846 / f;
            if (wavelen > low_wavelen) {
                f = f / r->factor;
            } else if (wavelen >= high_wavelen) {
                double smooth = (old_ctx / wavelen - r->low_freq_factor) / (r->high_freq_factor - r->low_freq_factor);
                f = (1 - smooth) * f / r->factor + smooth * f;
            }
        }
        out[i] = f;
    }
}

static void ref_rope(double *x, const int *pos, const double *inv_freq, int N, int H, int HS)
{
    int half = HS / 2;
    for (int n = 0; n < N; n++)
        for (int h = 0; h < H; h++) {
            double *v = x + ((size_t)n * H + h) * HS;
            for (int i = 0; i < half; i++) {
                double ang = pos[n] * inv_freq[i];
                double c = cos(ang), s = sin(ang);
                double x1 = v[i], x2 = v[i + half];
                v[i] = x1 * c - x2 * s;
                v[i + half] = x2 * c + x1 * s;
            }
        }
}

double ref_forward(const struct model *m, const struct lora *lora, const int *tokens, const int *pos_in,
                   const int *seg, const int *targets, int B, int T, double loss_scale, int train,
                   double *out_logits)
{
    const struct cfg *c = &m->cfg;
    int N = B * T, C = c->hidden_size, F = c->intermediate_size, V = c->vocab_size;
    int NH = c->num_attention_heads, NKV = c->num_key_value_heads, HS = c->head_dim;
    int Q = NH * HS, KV = NKV * HS, L = c->num_hidden_layers;
    uint64_t seed = m->dropout_seed;
    int *pos = malloc(sizeof(int) * (size_t)N);
    for (int b = 0; b < B; b++)
        for (int t = 0; t < T; t++)
            pos[b * T + t] = pos_in ? pos_in[b * T + t] : t;
    double *x = dz((size_t)N * C), *h = dz((size_t)N * C), *q = dz((size_t)N * Q);
    double *k = dz((size_t)N * KV), *v = dz((size_t)N * KV), *y = dz((size_t)N * Q);
    double *o = dz((size_t)N * C), *g = dz((size_t)N * F), *u = dz((size_t)N * F), *d = dz((size_t)N * C);
    double *inv_freq = dz((size_t)HS / 2);
    ref_rope_inv_freq(c, inv_freq);
    for (int n = 0; n < N; n++)
        for (int i = 0; i < C; i++)
            x[(size_t)n * C + i] = wat(&m->w.embed, (size_t)tokens[n] * C + i);
    for (int l = 0; l < L; l++) {
        const struct model_layer *w = &m->w.layer[l];
        ref_rmsnorm(h, x, w->ln1, N, C, c->rms_norm_eps);
        ref_linear(q, h, &w->wq, w->bq, N, C, Q, lora, l, CFG_Q, seed, train);
        ref_linear(k, h, &w->wk, w->bk, N, C, KV, lora, l, CFG_K, seed, train);
        ref_linear(v, h, &w->wv, w->bv, N, C, KV, lora, l, CFG_V, seed, train);
        if (c->qk_norm) { // Qwen3: q_norm / k_norm on each head, before the rotary embedding
            ref_rmsnorm(q, q, w->q_norm, N * NH, HS, c->rms_norm_eps);
            ref_rmsnorm(k, k, w->k_norm, N * NKV, HS, c->rms_norm_eps);
        }
        ref_rope(q, pos, inv_freq, N, NH, HS);
        ref_rope(k, pos, inv_freq, N, NKV, HS);
        // attention: head hh uses kv head hh / (NH / NKV)
        for (int b = 0; b < B; b++)
            for (int hh = 0; hh < NH; hh++) {
                int kh = hh / (NH / NKV);
                for (int t = 0; t < T; t++) {
                    double *sc = dz((size_t)T);
                    double mx = -1e300;
                    for (int t2 = 0; t2 <= t; t2++) {
                        if (seg && seg[b * T + t2] != seg[b * T + t])
                            continue;
                        double s = 0;
                        for (int i = 0; i < HS; i++)
                            s += q[((size_t)(b * T + t)) * Q + hh * HS + i] * k[((size_t)(b * T + t2)) * KV + kh * HS + i];
                        sc[t2] = s / sqrt((double)HS);
                        if (sc[t2] > mx)
                            mx = sc[t2];
                    }
                    double z = 0;
                    for (int t2 = 0; t2 <= t; t2++) {
                        if (seg && seg[b * T + t2] != seg[b * T + t]) {
                            sc[t2] = 0;
                            continue;
                        }
                        sc[t2] = exp(sc[t2] - mx);
                        z += sc[t2];
                    }
                    for (int i = 0; i < HS; i++) {
                        double s = 0;
                        for (int t2 = 0; t2 <= t; t2++)
                            s += sc[t2] / z * v[((size_t)(b * T + t2)) * KV + kh * HS + i];
                        y[((size_t)(b * T + t)) * Q + hh * HS + i] = s;
                    }
                    free(sc);
                }
            }
        ref_linear(o, y, &w->wo, w->bo, N, Q, C, lora, l, CFG_O, seed, train);
        for (size_t i = 0; i < (size_t)N * C; i++)
            x[i] += o[i];
        ref_rmsnorm(h, x, w->ln2, N, C, c->rms_norm_eps);
        ref_linear(g, h, &w->wgate, NULL, N, C, F, lora, l, CFG_GATE, seed, train);
        ref_linear(u, h, &w->wup, NULL, N, C, F, lora, l, CFG_UP, seed, train);
        for (size_t i = 0; i < (size_t)N * F; i++)
            g[i] = g[i] / (1.0 + exp(-g[i])) * u[i];
        ref_linear(d, g, &w->wdown, NULL, N, F, C, lora, l, CFG_DOWN, seed, train);
        for (size_t i = 0; i < (size_t)N * C; i++)
            x[i] += d[i];
    }
    ref_rmsnorm(h, x, m->w.norm, N, C, c->rms_norm_eps);
    double loss = 0;
    int count = 0;
    double *lg = out_logits ? out_logits : dz((size_t)N * V);
    for (int n = 0; n < N; n++) {
        for (int vv = 0; vv < V; vv++) {
            double s = 0;
            for (int i = 0; i < C; i++)
                s += h[(size_t)n * C + i] * wat(&m->w.lm_head, (size_t)vv * C + i);
            lg[(size_t)n * V + vv] = s;
        }
        if (targets && targets[n] >= 0) {
            double mx = -1e300, z = 0;
            for (int vv = 0; vv < V; vv++)
                if (lg[(size_t)n * V + vv] > mx)
                    mx = lg[(size_t)n * V + vv];
            for (int vv = 0; vv < V; vv++)
                z += exp(lg[(size_t)n * V + vv] - mx);
            loss += mx + log(z) - lg[(size_t)n * V + targets[n]];
            count++;
        }
    }
    if (!out_logits)
        free(lg);
    free(pos);
    free(inv_freq);
    free(x), free(h), free(q), free(k), free(v), free(y), free(o), free(g), free(u), free(d);
    if (!targets)
        return 0;
    return loss_scale > 0 ? loss * loss_scale : (count ? loss / count : 0);
}
