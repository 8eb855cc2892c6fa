/*
 * ops.h - the transformer's kernels, in forward/backward pairs (llm.c's layout).
 * Arguments: outputs first, then inputs and weights, then dimensions. N = rows (tokens),
 * C = channels. Backward kernels ACCUMULATE (+=) into every gradient buffer they are given;
 * the caller zeroes gradients once per step. A NULL gradient pointer means "not needed".
 * Every fast path has a plain reference beside it (op_*_naive), which the tests compare.
 * Threads: outside an OpenMP region each kernel splits its rows (or heads) over op_team()
 * threads, a split that never changes what is added to what; inside one (a lane of the model)
 * it runs on the calling thread. BLAS is called single-threaded from a team.
 */
#ifndef LK_OPS_H
#define LK_OPS_H

#include <stddef.h>
#include <stdint.h>

#include "tensor.h"

// ---- linear: out[N, OC] = inp[N, IC] @ w[OC, IC]^T + bias[OC] ----
void op_matmul_forward(float *out, const float *inp, const float *w, const float *bias, int N, int IC,
                       int OC);
/* out += inp @ w^T (no bias): used for the LoRA paths. */
void op_matmul_forward_acc(float *out, const float *inp, const float *w, float alpha, int N, int IC,
                           int OC);
void op_matmul_backward(float *dinp, float *dw, float *dbias, const float *dout, const float *inp,
                        const float *w, int N, int IC, int OC);
void op_matmul_forward_naive(float *out, const float *inp, const float *w, const float *bias, int N,
                             int IC, int OC);

// ---- frozen weight matrices (ops_mat.c): float32, or the file's bf16 / f16 widened in the kernels ----
/* A weight matrix [rows, cols], row-major, as kept in memory. With dtype BF16 or F16 the kernels
 * below widen it to float32 a tile at a time (AVX2 + F16C when the CPU has them, else plain C) and
 * compute in float32, so their results are the float32 kernels' on the widened values, up to the
 * order of additions. Which member is valid follows dtype. */
struct op_mat {
    int dtype;                /* TENSOR_F32, TENSOR_BF16 or TENSOR_F16 */
    union {
        float *f;             /* dtype F32 */
        uint16_t *h;          /* dtype BF16 / F16: the bits as the file stores them */
    };
};

/* 1 (default): use the AVX2 kernels when the CPU has AVX2, FMA and F16C; 0: the plain C ones
 * (tests compare the two). */
extern int op_simd;
/* 1 when the AVX2 kernels are in use (op_simd and the CPU supports them). */
int op_simd_active(void);

/* Threads a kernel called here may use: 1 inside an active OpenMP region (a lane of the model
 * already has its thread), else omp_get_max_threads(). */
int op_team(void);
/* OpenBLAS must not run its own threads under an OpenMP team (each would oversubscribe the
 * cores): before a region of nt > 1 threads that calls BLAS, begin sets OpenBLAS to one thread
 * and returns the previous count; end restores it (both no-ops for nt <= 1). Call outside
 * regions only. */
int op_blas_serial_begin(int nt);
void op_blas_serial_end(int prev);

/* Thread t of m's stretch [*g0, *g1) of `rows` rows (of products stacked one after the other), in
 * whole units: one stretch of memory per thread, and a row's sums never depend on the thread
 * count. */
static inline void op_rows_share(long rows, long unit, int t, int m, long *g0, long *g1)
{
    long per = ((rows + m - 1) / m + unit - 1) / unit * unit;
    *g0 = t * per < rows ? t * per : rows;
    *g1 = *g0 + per < rows ? *g0 + per : rows;
}
/* Widens rows [r0, r1) x columns [c0, c1) of w (cols columns per row) into dst, contiguous
 * [(r1 - r0), (c1 - c0)]. */
void op_mat_widen(float *dst, const struct op_mat *w, int cols, int r0, int r1, int c0, int c1);
/* Scratch floats the two kernels below want for widening tiles with nt threads (any smaller
 * size of at least max(IC, OC) works, with smaller tiles; float32 weights need none). */
size_t op_mat_scratch_floats(int IC, int OC, int nt);
/* out[N, OC] = inp[N, IC] @ w^T + bias. One row (N = 1) is a fused widen-and-dot GEMV reading
 * each weight once, threaded over output rows; more rows widen tiles of rows of w into scratch
 * and run sgemm on each, the tiles spread over op_team() threads. */
void op_mat_forward(float *out, const float *inp, const struct op_mat *w, const float *bias, int N,
                    int IC, int OC, float *scratch, size_t scratch_n);
/* The AMX path of that product (ops_amx.c), taken by op_mat_forward and generate.c's GEMMs when
 * op_amx_fits: bf16 weights on the tile unit with each float32 activation split exactly into three
 * bf16 parts, so every product is exact and the sums are float32 as sgemm's (another order).
 * An output depends only on its token's row and its weight's row (not on N or the threads).
 * op_amx: 1 (default) to use it when the CPU has AMX-BF16 and AVX512-BF16 and Linux grants the tile
 * state; 0 never (tests compare the two; LORAKIT_AMX=0 in the environment does the same). */
extern int op_amx;
int op_amx_active(void);
/* 1 when the AMX path takes w [OC, IC]: bf16, IC a multiple of 32, OC of 16, op_amx_active(). */
int op_amx_fits(const struct op_mat *w, int IC, int OC);
/* Bytes of N packed rows of IC activations; op_amx_pack packs x[N, ldx] (nt threads). */
size_t op_amx_pack_size(int N, int IC);
void op_amx_pack(uint16_t *pk, const float *x, size_t ldx, int N, int IC, int nt);
/* out[t, o - o0] (rows ldo apart) = x[t] . w[o] + bias[o] (bias NULL: 0) for the N packed rows and
 * o in [o0, o1), both multiples of 16; one thread. */
void op_amx_rows(float *out, size_t ldo, const uint16_t *pk, int N, const struct op_mat *w, int IC, int o0, int o1,
                 const float *bias);
/* op_mat_gemv_batch's products on the tile unit when op_amx_gemv is 1 and every w[k] op_amx_fits:
 * 1, or 0 when the path does not apply (nothing written). An input row's outputs are those of
 * op_amx_forward: the same for any nb, and the same as among the rows of a prefill chunk, so a
 * batched step can run its one-token rows in its chunks' GEMMs (one pass over the weights).
 * op_amx_gemv is 0 by default: one stream of decoding reads the weights faster through the AVX2
 * GEMV (0.5B shape: 23 against 18 tokens/s); eval sets it for its run, so that --batch 1 and
 * --batch B decode with the same kernel. */
extern int op_amx_gemv;
int op_amx_gemv_batch(int n, float *const *out, const struct op_mat *const *w, const float *const *bias,
                      const int *OC, const float *x, int IC, int nb);
/* out[N, OC] = inp @ w^T + bias on op_team() threads: 1, or 0 when the path does not apply (or
 * the packing buffer could not be allocated) and nothing was written. */
int op_amx_forward(float *out, const float *inp, const struct op_mat *w, const float *bias, int N, int IC, int OC);
/* n such products of the same x[N, IC] (q, k, v; gate, up), x packed once and the products' rows
 * shared out over the threads together: out[k][N, OC[k]] = x @ w[k]^T + bias[k] (bias NULL, or
 * any bias[k] NULL, for none); 1, or 0 as op_amx_forward (every w[k] must fit). */
int op_amx_many(int n, float *const *out, const struct op_mat *const *w, const float *const *bias, const int *OC,
                const float *x, int IC, int N);
/* dinp[N, IC] = beta dinp + dout[N, OC] @ w (the input gradient of the linear above): beta 1
 * accumulates, beta 0 writes (dinp need not be initialised: no separate pass to zero it). */
void op_mat_backward(float *dinp, const float *dout, const struct op_mat *w, int N, int IC, int OC, float beta,
                     float *scratch, size_t scratch_n);
/* out[OC] = w[OC, IC] @ x + bias (bias may be NULL): the fused GEMV alone. */
void op_mat_gemv(float *out, const struct op_mat *w, const float *x, const float *bias, int OC,
                 int IC);
/* n such products of the same x in one pass of the threads (q, k, v; gate, up): out[k][OC[k]] =
 * w[k] @ x + bias[k] (bias NULL, or any bias[k] NULL, for none). */
void op_mat_gemv_many(int n, float *const *out, const struct op_mat *const *w, const float *const *bias,
                      const int *OC, const float *x, int IC);
/* The same for nb inputs at once, x[nb, IC]: out[k] is [nb, OC[k]], and row b of it equals, bit for
 * bit, what op_mat_gemv_many gives for input b alone (the same rows per thread and the same sums:
 * a batched decode step answers as one token would). bf16 / f16 weights are read from memory
 * once for all the inputs (each group of rows stays in cache while the inputs pass over it);
 * float32 ones go through sgemv once per input. */
void op_mat_gemv_batch(int n, float *const *out, const struct op_mat *const *w, const float *const *bias,
                       const int *OC, const float *x, int IC, int nb);
/* The weight gradient of the same linear (float32 weights: a full fine-tune): dw[OC, IC] +=
 * dout^T inp, dbias[OC] += sum over rows of dout (either may be NULL), the output rows split
 * over op_team() threads. */
void op_mat_backward_weight(float *dw, float *dbias, const float *dout, const float *inp, int N, int IC,
                            int OC);
/* References for the tests: every weight widened with tensor.h's scalar conversions, sums in
 * double. dinp accumulates as in op_mat_backward. */
void op_mat_forward_naive(float *out, const float *inp, const struct op_mat *w, const float *bias,
                          int N, int IC, int OC);
void op_mat_backward_naive(float *dinp, const float *dout, const struct op_mat *w, int N, int IC,
                           int OC);

// ---- the rank-R products of a LoRA linear (ops_lora.c) ----
/* y = W x + s B (A x): A [R, IC], B [OC, R], xa = x A^T [N, R]. xa and dxa take register-tiled
 * AVX2 kernels when R is a multiple of 8 (op_simd_active), rows split over op_team() threads,
 * each output summed by one thread in a fixed order; the rest, and other ranks, cblas_sgemm.
 * scratch: op_lora_scratch_floats(R, IC) floats (A transposed). *_naive: double references. */
size_t op_lora_scratch_floats(int R, int IC);
/* xa[N, R] = x[N, IC] A^T */
void op_lora_down(float *xa, const float *x, const float *A, int N, int IC, int R, float *scratch);
/* out[N, OC] += s xa B^T */
void op_lora_up_acc(float *out, const float *xa, const float *B, float s, int N, int R, int OC);
/* dxa[N, R] = s dout[N, OC] B */
void op_lora_dxa(float *dxa, const float *dout, const float *B, float s, int N, int OC, int R);
/* dB[OC, R] += s dout^T xa */
void op_lora_dB_acc(float *dB, const float *dout, const float *xa, float s, int N, int OC, int R);
/* dA[R, IC] += dxa^T x */
void op_lora_dA_acc(float *dA, const float *dxa, const float *x, int N, int IC, int R);
/* dx[N, IC] += dxa A */
void op_lora_dx_acc(float *dx, const float *dxa, const float *A, int N, int IC, int R);
void op_lora_down_naive(float *xa, const float *x, const float *A, int N, int IC, int R);
void op_lora_up_acc_naive(float *out, const float *xa, const float *B, float s, int N, int R, int OC);
void op_lora_dxa_naive(float *dxa, const float *dout, const float *B, float s, int N, int OC, int R);
void op_lora_dB_acc_naive(float *dB, const float *dout, const float *xa, float s, int N, int OC, int R);
void op_lora_dA_acc_naive(float *dA, const float *dxa, const float *x, int N, int IC, int R);
void op_lora_dx_acc_naive(float *dx, const float *dxa, const float *A, int N, int IC, int R);

// ---- RMSNorm: out = inp * rstd * w, rstd = 1/sqrt(mean(inp^2) + eps) per row ----
/* Qwen3's q_norm / k_norm normalise each head of q [N, H*HS] on its own: the same kernels on the
 * [N*H, HS] view (rows = N*H, C = HS, w = the [HS] weight shared by every head). out may alias
 * inp in the forward (each row is read in full before it is written). */
void op_rmsnorm_forward(float *out, float *rstd, const float *inp, const float *w, int N, int C,
                        float eps);
void op_rmsnorm_backward(float *dinp, float *dw, const float *dout, const float *inp, const float *w,
                         const float *rstd, int N, int C);

// ---- rotary embedding, rotate_half convention, in place on x[N, H, HS] ----
/* inv_freq[HS/2] = theta^(-2i/HS) rounded to float32 (as transformers computes it). */
void op_rope_inv_freq(float *inv_freq, int HS, double theta);
/* Rotary scaling of inv_freq[n] in place, in float32 as transformers computes it in
 * modeling_rope_utils.py (both keep the attention scaling at 1):
 * linear (_compute_linear_scaling_rope_parameters): inv_freq / factor.
 * llama3 (_compute_llama3_parameters): with wavelen = 2 pi / inv_freq, a frequency whose wavelength
 * is longer than original_max / low_freq_factor is divided by factor, one shorter than
 * original_max / high_freq_factor is kept, and one between is interpolated with
 * s = (original_max / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor):
 * (1 - s) * inv_freq / factor + s * inv_freq. */
void op_rope_inv_freq_linear(float *inv_freq, int n, double factor);
void op_rope_inv_freq_llama3(float *inv_freq, int n, double factor, double low_freq_factor,
                             double high_freq_factor, double original_max);
void op_rope_forward(float *x, const int *pos, const float *inv_freq, int N, int H, int HS);
/* The backward of a rotation is the rotation by the negative angle, in place on dx. */
void op_rope_backward(float *dx, const int *pos, const float *inv_freq, int N, int H, int HS);

// ---- causal grouped-query attention ----
/* q[B*T, NH*HS], k, v [B*T, NKV*HS] (after rope); out[B*T, NH*HS]; att[B, NH, T, T] holds the
 * softmax probabilities for backward. seg[B*T] (may be NULL): a token attends only to earlier
 * tokens of the same segment (packing). */
void op_attention_forward(float *out, float *att, const float *q, const float *k, const float *v,
                          const int *seg, int B, int T, int NH, int NKV, int HS);
/* scratch: nscratch blocks of [T, T] floats; up to nscratch threads run the (batch, kv head)
 * groups (each group's query heads add into the same dk, dv rows, so a group stays on one). */
void op_attention_backward(float *dq, float *dk, float *dv, const float *dout, const float *att,
                           const float *q, const float *k, const float *v, int B, int T, int NH,
                           int NKV, int HS, float *scratch, int nscratch);

// ---- AVX2 pieces of the elementwise kernels (ops_mat.c) ----
/* Each does the first k elements (a multiple of 8) with AVX2 when op_simd_active() and returns
 * k (0 otherwise), leaving the rest to the caller's plain loop. Their exp is Cephes' polynomial
 * (within 2 ulp of expf, tested), clamped to e^[-87.3, 88.7]. */
size_t op_exp_simd(float *dst, const float *src, size_t n);
size_t op_swiglu_forward_simd(float *out, const float *gate, const float *up, size_t n);
size_t op_swiglu_backward_simd(float *dgate, float *dup, const float *dout, const float *gate,
                               const float *up, size_t n);

// ---- log-sum-exp pieces (ops_mat.c), for log-probabilities over a large vocabulary ----
/* The largest of v[n] (-INFINITY for n = 0; v without NaN). */
float op_max(const float *v, size_t n);
/* The sum of e^((double)v[i] - m) over v[n], in double. With AVX2 the exponentials are computed
 * 4 at a time in double (Taylor series after the ln2 range reduction: within a few ulp of exp,
 * tested) and summed in another order than the plain loop: the result agrees with it to about
 * 1e-15 relative. The arguments must stay above -708 for full accuracy (smaller terms are taken
 * as e^-708); m is normally the maximum, so every term is at most 1. */
double op_sum_exp(const float *v, size_t n, double m);

/* Row pieces (ops_simd.c), the same convention: the first k = n & ~7 elements with AVX2, k
 * returned (0 without AVX2). Elementwise ones give the plain loop's bits; the sums (*out, in
 * double; 0 when k is 0) add the same exact products in another order. */
size_t op_sumsq_simd(const float *x, size_t n, double *out);                      /* sum x^2 */
size_t op_dot_simd(const float *a, const float *b, size_t n, double *out);        /* sum a b */
size_t op_dot3_simd(const float *a, const float *b, const float *c, size_t n, double *out); /* sum (a b) c */
size_t op_sum_simd(const float *x, size_t n, double *out);                        /* sum x */
size_t op_max_simd(const float *x, size_t n, float *out);                         /* max x (*out set when k > 0) */
size_t op_scale_simd(float *x, float s, size_t n);                                /* x *= s */
size_t op_sub_simd(float *dst, const float *x, float s, size_t n);                /* dst = x - s */
size_t op_add_simd(float *dst, const float *src, size_t n);                       /* dst += src */
size_t op_axpy_simd(float *y, float a, const float *x, size_t n);                 /* y += a x */
size_t op_dotf_simd(const float *a, const float *b, size_t n, float *out);        /* sum a b, in float */
size_t op_rmsnorm_row_simd(float *y, const float *x, const float *w, float r, size_t n); /* y = (x r) w */
/* dw += (dy x) r (dw may be NULL); dx += (r w) dy - c x (dx may be NULL) */
size_t op_rmsnorm_drow_simd(float *dx, float *dw, const float *dy, const float *x, const float *w, float r, float c,
                            size_t n);
size_t op_softmax_drow_simd(float *d, const float *p, float dot, float scale, size_t n); /* d = p (d - dot) scale */
/* v1[i], v2[i] = v1[i] c[i] - v2[i] s[i], v2[i] c[i] + v1[i] s[i] (the two halves of a head) */
size_t op_rope_row_simd(float *v1, float *v2, const float *c, const float *s, size_t n);

// ---- residual: dst[i] += src[i] ----
void op_add(float *dst, const float *src, size_t n);

// ---- SwiGLU: out = silu(gate) * up ----
void op_swiglu_forward(float *out, const float *gate, const float *up, size_t n);
/* Writes (does not accumulate) dgate and dup: they are never needed before. */
void op_swiglu_backward(float *dgate, float *dup, const float *dout, const float *gate,
                        const float *up, size_t n);

// ---- cross-entropy over logits[N, V] with targets[N] (-100 = ignored) ----
/* Returns the SUM of -log p(target) over counted rows (double); when dlogits is non-NULL it is
 * overwritten with (softmax - onehot) * scale for counted rows and 0 for ignored rows
 * (dlogits may alias logits). */
double op_crossentropy_forward_backward(float *dlogits, const float *logits, const int *targets,
                                        int N, int V, float scale);

// ---- dropout mask from a counter-based hash (no storage, identical in backward) ----
/* 1 when element i of the stream (seed, stream) is kept, for drop probability p. */
static inline int op_dropout_keep(uint64_t seed, uint64_t stream, uint64_t i, float p)
{
    uint64_t z = seed ^ (stream * 0x9E3779B97F4A7C15ull) ^ (i * 0xD1B54A32D192ED03ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    z ^= z >> 31;
    return (float)(z >> 40) / 16777216.0f >= p;
}

#endif
