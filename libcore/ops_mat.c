/*
 * ops_mat.c - the linears on frozen weight matrices (struct op_mat, ops.h): float32, or bf16 /
 * f16 kept as the file stores them and widened to float32 inside the kernel.
 *
 * Three kernels, each with a plain reference beside it:
 * - the fused GEMV (one token: decoding): each weight is read once, widened in registers and
 *   multiplied into four row sums at a time; the rows are split over the threads;
 * - the forward of N rows: tiles of rows of the weight are widened into a scratch buffer (a
 *   float32 weight is used in place) and each tile is one sgemm, the tiles spread over the
 *   threads (each writes its own output columns);
 * - the input gradient: tiles of columns (each thread its own dinp columns) or, when the
 *   matrix is so tall that a column tile would be a sliver (lm_head), tiles of rows whose
 *   products the threads add into their own rows of dinp.
 * Threads: one OpenMP team (op_team(): 1 inside a model lane, which already has its thread);
 * OpenBLAS is called single-threaded from it (op_blas_serial_begin). A tile's arithmetic does
 * not depend on which thread computes it.
 *
 * SIMD: AVX2 + FMA + F16C through __attribute__((target)) with a run-time check
 * (__builtin_cpu_supports), since the build has no -march; plain C otherwise or when op_simd is 0.
 */
#include "ops.h"

#include <cblas.h>
#include <math.h>
#include <omp.h>
#include <pthread.h>
#include <string.h>

#include "lk.h"

#if defined(__x86_64__) && defined(__GNUC__)
#define OP_X86 1
#include <cpuid.h>
#include <immintrin.h>
#define OP_AVX2 __attribute__((target("avx2,fma,f16c")))
#endif

int op_simd = 1;

#ifdef OP_X86
static pthread_once_t cpu_once = PTHREAD_ONCE_INIT;
static int cpu_avx2; // AVX2, FMA and F16C: what the OP_AVX2 kernels use

/* Read once: CPUID is slow (a VM exit under a hypervisor), and op_simd_active runs per row.
 * F16C comes from leaf 1 because clang 14's __builtin_cpu_supports does not know it. */
static void cpu_probe(void)
{
    unsigned a, b, c, d;
    int f16c = __get_cpuid(1, &a, &b, &c, &d) && (c & bit_F16C);
    cpu_avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && f16c;
}
#endif

int op_simd_active(void)
{
#ifdef OP_X86
    pthread_once(&cpu_once, cpu_probe);
    return op_simd && cpu_avx2;
#else
    return 0;
#endif
}

int op_team(void)
{
    return omp_in_parallel() ? 1 : omp_get_max_threads();
}

int op_blas_serial_begin(int nt)
{
    if (nt <= 1)
        return 0;
    int prev = openblas_get_num_threads();
    if (prev > 1)
        openblas_set_num_threads(1);
    return prev;
}

void op_blas_serial_end(int prev)
{
    if (prev > 1)
        openblas_set_num_threads(prev);
}

// ---- widening ----

static inline float bf16_f32(uint16_t h)
{
    uint32_t u = (uint32_t)h << 16; // bf16 is the high half of a float32: exact
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

static inline float half_f32(uint16_t h, int dtype)
{
    return dtype == TENSOR_BF16 ? bf16_f32(h) : tensor_f16_to_f32(h);
}

static void widen_plain(float *dst, const uint16_t *src, size_t n, int dtype)
{
    if (dtype == TENSOR_BF16)
        for (size_t i = 0; i < n; i++)
            dst[i] = bf16_f32(src[i]);
    else
        for (size_t i = 0; i < n; i++)
            dst[i] = tensor_f16_to_f32(src[i]);
}

#ifdef OP_X86
OP_AVX2 static inline __m256 load8_bf16(const uint16_t *p)
{
    __m256i v = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(const void *)p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
}

OP_AVX2 static inline __m256 load8_f16(const uint16_t *p)
{
    return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(const void *)p));
}

OP_AVX2 static void widen_avx2(float *dst, const uint16_t *src, size_t n, int dtype)
{
    size_t i = 0;
    if (dtype == TENSOR_BF16)
        for (; i + 8 <= n; i += 8)
            _mm256_storeu_ps(dst + i, load8_bf16(src + i));
    else
        for (; i + 8 <= n; i += 8)
            _mm256_storeu_ps(dst + i, load8_f16(src + i));
    widen_plain(dst + i, src + i, n - i, dtype);
}
#endif

static void widen(float *dst, const uint16_t *src, size_t n, int dtype)
{
#ifdef OP_X86
    if (op_simd_active()) {
        widen_avx2(dst, src, n, dtype);
        return;
    }
#endif
    widen_plain(dst, src, n, dtype);
}

void op_mat_widen(float *dst, const struct op_mat *w, int cols, int r0, int r1, int c0, int c1)
{
    size_t n = (size_t)(c1 - c0);
    for (int r = r0; r < r1; r++) {
        float *d = dst + (size_t)(r - r0) * n;
        size_t off = (size_t)r * cols + (size_t)c0;
        if (w->dtype == TENSOR_F32)
            memcpy(d, w->f + off, sizeof(float) * n);
        else
            widen(d, w->h + off, n, w->dtype);
    }
}

// ---- exp for the elementwise kernels ----

#ifdef OP_X86
/* e^x for 8 floats (Cephes' expf): x = n ln2 + r, n = round(x log2 e), ln2 split in two so r is
 * exact; e^r by a degree-7 polynomial (relative error under 2 ulp against expf, tested), then
 * 2^n into the exponent. x is clamped to [-87.3, 88.7] first (e^x stays a normal float; below it
 * the result is about 1e-38 instead of a denormal or 0). min/max keep a NaN: it comes out NaN. */
OP_AVX2 static inline __m256 exp8(__m256 x)
{
    x = _mm256_max_ps(_mm256_set1_ps(-87.3f), _mm256_min_ps(_mm256_set1_ps(88.7f), x));
    __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                               _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.9875691500e-4f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
    p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
    __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

OP_AVX2 static size_t exp_avx2(float *dst, const float *src, size_t n)
{
    size_t i = 0;
    for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(dst + i, exp8(_mm256_loadu_ps(src + i)));
    return i;
}

OP_AVX2 static size_t swiglu_forward_avx2(float *out, const float *gate, const float *up, size_t n)
{
    size_t i = 0;
    __m256 one = _mm256_set1_ps(1.0f);
    for (; i + 8 <= n; i += 8) {
        __m256 g = _mm256_loadu_ps(gate + i);
        __m256 sg = _mm256_div_ps(one, _mm256_add_ps(one, exp8(_mm256_sub_ps(_mm256_setzero_ps(), g))));
        _mm256_storeu_ps(out + i, _mm256_mul_ps(_mm256_mul_ps(g, sg), _mm256_loadu_ps(up + i)));
    }
    return i;
}

OP_AVX2 static size_t swiglu_backward_avx2(float *dgate, float *dup, const float *dout, const float *gate,
                                           const float *up, size_t n)
{
    size_t i = 0;
    __m256 one = _mm256_set1_ps(1.0f);
    for (; i + 8 <= n; i += 8) {
        __m256 g = _mm256_loadu_ps(gate + i), d = _mm256_loadu_ps(dout + i);
        __m256 sg = _mm256_div_ps(one, _mm256_add_ps(one, exp8(_mm256_sub_ps(_mm256_setzero_ps(), g))));
        __m256 silu = _mm256_mul_ps(g, sg);
        _mm256_storeu_ps(dup + i, _mm256_mul_ps(d, silu));
        // sg (1 + g (1 - sg)), as the plain loop groups it
        __m256 dsilu = _mm256_mul_ps(sg, _mm256_add_ps(one, _mm256_mul_ps(g, _mm256_sub_ps(one, sg))));
        __m256 t = _mm256_mul_ps(_mm256_mul_ps(d, _mm256_loadu_ps(up + i)), dsilu);
        _mm256_storeu_ps(dgate + i, t);
    }
    return i;
}
#endif

size_t op_exp_simd(float *dst, const float *src, size_t n)
{
#ifdef OP_X86
    if (op_simd_active())
        return exp_avx2(dst, src, n);
#endif
    (void)dst;
    (void)src;
    (void)n;
    return 0;
}

size_t op_swiglu_forward_simd(float *out, const float *gate, const float *up, size_t n)
{
#ifdef OP_X86
    if (op_simd_active())
        return swiglu_forward_avx2(out, gate, up, n);
#endif
    (void)out;
    (void)gate;
    (void)up;
    (void)n;
    return 0;
}

size_t op_swiglu_backward_simd(float *dgate, float *dup, const float *dout, const float *gate, const float *up,
                               size_t n)
{
#ifdef OP_X86
    if (op_simd_active())
        return swiglu_backward_avx2(dgate, dup, dout, gate, up, n);
#endif
    (void)dgate;
    (void)dup;
    (void)dout;
    (void)gate;
    (void)up;
    (void)n;
    return 0;
}

// ---- log-sum-exp pieces ----

#ifdef OP_X86
/* e^x for 4 doubles: x = n ln2 + r (n = round(x log2 e), ln2 in two parts so r is exact to double
 * rounding, |r| <= 0.347), e^r by its Taylor series to degree 13 (the remainder is below 2e-16 of
 * the value), 2^n into the exponent. x is clamped to [-708, 709] (a normal double). */
OP_AVX2 static inline __m256d exp4d(__m256d x)
{
    x = _mm256_max_pd(_mm256_set1_pd(-708.0), _mm256_min_pd(_mm256_set1_pd(709.0), x));
    __m256d n = _mm256_round_pd(_mm256_mul_pd(x, _mm256_set1_pd(1.4426950408889634)),
                                _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256d r = _mm256_fnmadd_pd(n, _mm256_set1_pd(6.93147180369123816490e-01), x);
    r = _mm256_fnmadd_pd(n, _mm256_set1_pd(1.90821492927058770002e-10), r);
    static const double inv_fact[14] = { 1.0, 1.0, 1.0 / 2, 1.0 / 6, 1.0 / 24, 1.0 / 120, 1.0 / 720, 1.0 / 5040,
                                         1.0 / 40320, 1.0 / 362880, 1.0 / 3628800, 1.0 / 39916800,
                                         1.0 / 479001600, 1.0 / 6227020800.0 };
    __m256d p = _mm256_set1_pd(inv_fact[13]);
    for (int k = 12; k >= 0; k--)
        p = _mm256_fmadd_pd(p, r, _mm256_set1_pd(inv_fact[k]));
    __m256i e = _mm256_slli_epi64(_mm256_add_epi64(_mm256_cvtepi32_epi64(_mm256_cvtpd_epi32(n)),
                                                   _mm256_set1_epi64x(1023)), 52);
    return _mm256_mul_pd(p, _mm256_castsi256_pd(e));
}

OP_AVX2 static double sum_exp_avx2(const float *v, size_t n, double m, size_t *done)
{
    __m256d a = _mm256_setzero_pd(), b = a, mv = _mm256_set1_pd(m);
    size_t i = 0;
    for (; i + 8 <= n; i += 8) {
        a = _mm256_add_pd(a, exp4d(_mm256_sub_pd(_mm256_cvtps_pd(_mm_loadu_ps(v + i)), mv)));
        b = _mm256_add_pd(b, exp4d(_mm256_sub_pd(_mm256_cvtps_pd(_mm_loadu_ps(v + i + 4)), mv)));
    }
    double t[4];
    _mm256_storeu_pd(t, _mm256_add_pd(a, b));
    *done = i;
    return (t[0] + t[1]) + (t[2] + t[3]);
}

OP_AVX2 static float max_avx2(const float *v, size_t n, size_t *done)
{
    __m256 a = _mm256_set1_ps(-INFINITY);
    size_t i = 0;
    for (; i + 8 <= n; i += 8)
        a = _mm256_max_ps(a, _mm256_loadu_ps(v + i));
    float t[8], mx = -INFINITY;
    _mm256_storeu_ps(t, a);
    for (int k = 0; k < 8; k++)
        mx = t[k] > mx ? t[k] : mx;
    *done = i;
    return mx;
}
#endif

float op_max(const float *v, size_t n)
{
    size_t i = 0;
    float mx = -INFINITY;
#ifdef OP_X86
    if (op_simd_active())
        mx = max_avx2(v, n, &i);
#endif
    for (; i < n; i++)
        mx = v[i] > mx ? v[i] : mx;
    return mx;
}

double op_sum_exp(const float *v, size_t n, double m)
{
    size_t i = 0;
    double s = 0;
#ifdef OP_X86
    if (op_simd_active())
        s = sum_exp_avx2(v, n, m, &i);
#endif
    for (; i < n; i++)
        s += exp((double)v[i] - m);
    return s;
}

// ---- GEMV: one row of input ----

/* out[b * ldo + r] = W[r, :] . x[b * ldx + :] (+ bias[r]) for rows [r0, r1) and the nb inputs,
 * four partial sums per row. */
static void gemv_rows_plain(float *out, size_t ldo, const uint16_t *W, int dtype, const float *x, size_t ldx,
                            int nb, const float *bias, int r0, int r1, int IC)
{
    for (int r = r0; r < r1; r++) {
        const uint16_t *row = W + (size_t)r * IC;
        for (int b = 0; b < nb; b++) {
            const float *xb = x + (size_t)b * ldx;
            float s0 = 0, s1 = 0, s2 = 0, s3 = 0;
            int i = 0;
            for (; i + 4 <= IC; i += 4) {
                s0 += half_f32(row[i], dtype) * xb[i];
                s1 += half_f32(row[i + 1], dtype) * xb[i + 1];
                s2 += half_f32(row[i + 2], dtype) * xb[i + 2];
                s3 += half_f32(row[i + 3], dtype) * xb[i + 3];
            }
            for (; i < IC; i++)
                s0 += half_f32(row[i], dtype) * xb[i];
            out[(size_t)b * ldo + r] = ((s0 + s1) + (s2 + s3)) + (bias ? bias[r] : 0.0f);
        }
    }
}

#ifdef OP_X86
OP_AVX2 static inline float hsum8(__m256 v)
{
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* One row r of a 4-row group (w points at it) against inputs [b, b + m), m <= 4: each pair of
 * widened weight vectors serves the four inputs, whose sums are formed exactly as GEMV_AVX2 forms
 * a grouped row's for one input (two accumulators over alternate 8-column blocks, the 8-wide tail
 * into the first, then the plain tail), so every input gets its one-input result. Widening is the
 * bottleneck of the one-input kernel (a lane-crossing shuffle per 8 weights); here it is paid once
 * per four inputs. pf: a row to prefetch (NULL: none). */
#define GEMV_NB_AVX2(NAME, LOAD8, DT)                                                                   \
    OP_AVX2 static void NAME(float *out, size_t ldo, const uint16_t *w, const float *X, size_t ldx,     \
                             int b, int m, const float *bias, int r, int IC, const char *pf)            \
    {                                                                                                   \
        int i16 = IC & ~15, i8 = IC & ~7;                                                               \
        const float *x[4];                                                                              \
        for (int k = 0; k < 4; k++)                                                                     \
            x[k] = X + (size_t)(b + (k < m ? k : 0)) * ldx; /* spare lanes repeat input b */           \
        __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, c0 = a0, c1 = a0, c2 = a0, c3 = a0; \
        for (int i = 0; i < i16; i += 16) {                                                             \
            if (pf && (i & 31) == 0)                                                                    \
                _mm_prefetch(pf + 2 * (size_t)i, _MM_HINT_T0);                                          \
            __m256 wa = LOAD8(w + i), wb = LOAD8(w + i + 8);                                            \
            a0 = _mm256_fmadd_ps(wa, _mm256_loadu_ps(x[0] + i), a0);                                    \
            c0 = _mm256_fmadd_ps(wb, _mm256_loadu_ps(x[0] + i + 8), c0);                                \
            a1 = _mm256_fmadd_ps(wa, _mm256_loadu_ps(x[1] + i), a1);                                    \
            c1 = _mm256_fmadd_ps(wb, _mm256_loadu_ps(x[1] + i + 8), c1);                                \
            a2 = _mm256_fmadd_ps(wa, _mm256_loadu_ps(x[2] + i), a2);                                    \
            c2 = _mm256_fmadd_ps(wb, _mm256_loadu_ps(x[2] + i + 8), c2);                                \
            a3 = _mm256_fmadd_ps(wa, _mm256_loadu_ps(x[3] + i), a3);                                    \
            c3 = _mm256_fmadd_ps(wb, _mm256_loadu_ps(x[3] + i + 8), c3);                                \
        }                                                                                               \
        if (i16 < i8) {                                                                                 \
            __m256 wa = LOAD8(w + i16);                                                                 \
            a0 = _mm256_fmadd_ps(wa, _mm256_loadu_ps(x[0] + i16), a0);                                  \
            a1 = _mm256_fmadd_ps(wa, _mm256_loadu_ps(x[1] + i16), a1);                                  \
            a2 = _mm256_fmadd_ps(wa, _mm256_loadu_ps(x[2] + i16), a2);                                  \
            a3 = _mm256_fmadd_ps(wa, _mm256_loadu_ps(x[3] + i16), a3);                                  \
        }                                                                                               \
        float s[4] = { hsum8(_mm256_add_ps(a0, c0)), hsum8(_mm256_add_ps(a1, c1)),                     \
                       hsum8(_mm256_add_ps(a2, c2)), hsum8(_mm256_add_ps(a3, c3)) };                   \
        for (int k = 0; k < m; k++) {                                                                   \
            for (int i = i8; i < IC; i++)                                                               \
                s[k] += half_f32(w[i], DT) * x[k][i];                                                   \
            out[(size_t)(b + k) * ldo + r] = s[k] + (bias ? bias[r] : 0.0f);                           \
        }                                                                                               \
    }

/* Rows [r0, r1) for nb > 1 inputs: blocks of GEMV_BLOCK rows (read from memory once, then from
 * cache) against the inputs four at a time (kept in L1 over the block); the rows of whole groups of
 * four take the grouped rows' sums, the tail rows (r1 - r0) % 4 are left to the one-input loop. */
#define GEMV_BLOCK 32
#define GEMV_NB_BLOCKS(NAME)                                                                            \
    OP_AVX2 static int NAME##_blocks(float *out, size_t ldo, const uint16_t *W, const float *X,         \
                                     size_t ldx, int nb, const float *bias, int r0, int r1, int IC)     \
    {                                                                                                   \
        int rg = r0 + ((r1 - r0) & ~3);                                                                 \
        for (int rb = r0; rb < rg; rb += GEMV_BLOCK) {                                                  \
            int re = rb + GEMV_BLOCK < rg ? rb + GEMV_BLOCK : rg;                                       \
            for (int b = 0; b < nb; b += 4)                                                             \
                for (int r = rb; r < re; r++)                                                           \
                    NAME##_nb(out, ldo, W + (size_t)r * IC, X, ldx, b, nb - b < 4 ? nb - b : 4, bias, r,  \
                              IC, b ? NULL : (const char *)(W + (size_t)(r + GEMV_BLOCK) * IC));        \
        }                                                                                               \
        return rg;                                                                                      \
    }

/* Four rows at a time share each load of x, two accumulators per row (16 columns a step); each
 * weight is widened in a register and used once, and the next group of four rows is prefetched
 * column by column as this one is read (measured here: 10 GB/s from one core against 7 without
 * the prefetch, a plain read of memory being 11.5). Several inputs (nb > 1) go through the blocks
 * above first. The tail columns (IC % 16) take one 8-wide step and the plain path's arithmetic,
 * the tail rows (% 4) one row at a time. */
#define GEMV_AVX2(NAME, LOAD8, DT)                                                                      \
    GEMV_NB_AVX2(NAME##_nb, LOAD8, DT)                                                                  \
    GEMV_NB_BLOCKS(NAME)                                                                                \
    OP_AVX2 static void NAME(float *out, size_t ldo, const uint16_t *W, const float *X, size_t ldx,     \
                             int nb, const float *bias, int r0, int r1, int IC)                         \
    {                                                                                                   \
        int r = nb > 1 ? NAME##_blocks(out, ldo, W, X, ldx, nb, bias, r0, r1, IC) : r0;                \
        int i16 = IC & ~15, i8 = IC & ~7;                                                               \
        const float *x = X;                                                                             \
        for (; r + 4 <= r1; r += 4) {                                                                   \
            const uint16_t *w0 = W + (size_t)r * IC, *w1 = w0 + IC, *w2 = w1 + IC, *w3 = w2 + IC;      \
            const char *pf = (const char *)(w3 + IC); /* the next group (prefetch never faults) */     \
            __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, b0 = a0, b1 = a0, b2 = a0, b3 = a0; \
            for (int i = 0; i < i16; i += 16) {                                                         \
                __m256 x0 = _mm256_loadu_ps(x + i), x1 = _mm256_loadu_ps(x + i + 8);                    \
                _mm_prefetch(pf + 2 * (size_t)i, _MM_HINT_T0);                                          \
                _mm_prefetch(pf + 2 * ((size_t)IC + i), _MM_HINT_T0);                                   \
                _mm_prefetch(pf + 2 * (2 * (size_t)IC + i), _MM_HINT_T0);                               \
                _mm_prefetch(pf + 2 * (3 * (size_t)IC + i), _MM_HINT_T0);                               \
                a0 = _mm256_fmadd_ps(LOAD8(w0 + i), x0, a0);                                            \
                b0 = _mm256_fmadd_ps(LOAD8(w0 + i + 8), x1, b0);                                        \
                a1 = _mm256_fmadd_ps(LOAD8(w1 + i), x0, a1);                                            \
                b1 = _mm256_fmadd_ps(LOAD8(w1 + i + 8), x1, b1);                                        \
                a2 = _mm256_fmadd_ps(LOAD8(w2 + i), x0, a2);                                            \
                b2 = _mm256_fmadd_ps(LOAD8(w2 + i + 8), x1, b2);                                        \
                a3 = _mm256_fmadd_ps(LOAD8(w3 + i), x0, a3);                                            \
                b3 = _mm256_fmadd_ps(LOAD8(w3 + i + 8), x1, b3);                                        \
            }                                                                                           \
            if (i16 < i8) {                                                                             \
                __m256 xv = _mm256_loadu_ps(x + i16);                                                   \
                a0 = _mm256_fmadd_ps(LOAD8(w0 + i16), xv, a0);                                          \
                a1 = _mm256_fmadd_ps(LOAD8(w1 + i16), xv, a1);                                          \
                a2 = _mm256_fmadd_ps(LOAD8(w2 + i16), xv, a2);                                          \
                a3 = _mm256_fmadd_ps(LOAD8(w3 + i16), xv, a3);                                          \
            }                                                                                           \
            float s[4] = { hsum8(_mm256_add_ps(a0, b0)), hsum8(_mm256_add_ps(a1, b1)),                 \
                           hsum8(_mm256_add_ps(a2, b2)), hsum8(_mm256_add_ps(a3, b3)) };               \
            const uint16_t *wr[4] = { w0, w1, w2, w3 };                                                 \
            for (int k = 0; k < 4; k++) {                                                               \
                for (int i = i8; i < IC; i++)                                                           \
                    s[k] += half_f32(wr[k][i], DT) * x[i];                                              \
                out[r + k] = s[k] + (bias ? bias[r + k] : 0.0f);                                        \
            }                                                                                           \
        }                                                                                               \
        for (; r < r1; r++) {                                                                           \
            const uint16_t *w0 = W + (size_t)r * IC;                                                    \
            for (int nb_i = 0; nb_i < nb; nb_i++) {                                                     \
                x = X + (size_t)nb_i * ldx;                                                             \
                __m256 a0 = _mm256_setzero_ps();                                                        \
                for (int i = 0; i < i8; i += 8)                                                         \
                    a0 = _mm256_fmadd_ps(LOAD8(w0 + i), _mm256_loadu_ps(x + i), a0);                    \
                float s = hsum8(a0);                                                                    \
                for (int i = i8; i < IC; i++)                                                           \
                    s += half_f32(w0[i], DT) * x[i];                                                    \
                out[(size_t)nb_i * ldo + r] = s + (bias ? bias[r] : 0.0f);                              \
            }                                                                                           \
        }                                                                                               \
    }
GEMV_AVX2(gemv_rows_bf16_avx2, load8_bf16, TENSOR_BF16)
GEMV_AVX2(gemv_rows_f16_avx2, load8_f16, TENSOR_F16)
#undef GEMV_AVX2
#endif

static void gemv_rows(float *out, size_t ldo, const struct op_mat *w, const float *x, size_t ldx, int nb,
                      const float *bias, int r0, int r1, int IC)
{
#ifdef OP_X86
    if (op_simd_active()) {
        if (w->dtype == TENSOR_BF16)
            gemv_rows_bf16_avx2(out, ldo, w->h, x, ldx, nb, bias, r0, r1, IC);
        else
            gemv_rows_f16_avx2(out, ldo, w->h, x, ldx, nb, bias, r0, r1, IC);
        return;
    }
#endif
    gemv_rows_plain(out, ldo, w->h, w->dtype, x, ldx, nb, bias, r0, r1, IC);
}

/* Rows [r0, r1) of one product for the nb inputs x[nb, IC] (out [nb, OC]), on the calling thread. */
static void gemv_part(float *out, const struct op_mat *w, const float *x, int nb, const float *bias, int r0, int r1,
                      int IC, int OC)
{
    if (r0 >= r1)
        return;
    if (w->dtype != TENSOR_F32) {
        gemv_rows(out, (size_t)OC, w, x, (size_t)IC, nb, bias, r0, r1, IC);
        return;
    }
    // sgemm would pack the whole matrix for one row; sgemv reads it once (per input: these stay
    // the sums of one input alone)
    for (int b = 0; b < nb; b++) {
        float *o = out + (size_t)b * OC;
        if (bias)
            memcpy(o + r0, bias + r0, sizeof(float) * (size_t)(r1 - r0));
        cblas_sgemv(CblasRowMajor, CblasNoTrans, r1 - r0, IC, 1.0f, w->f + (size_t)r0 * IC, IC, x + (size_t)b * IC, 1,
                    bias ? 1.0f : 0.0f, o + r0, 1);
    }
}

void op_mat_gemv_batch(int n, float *const *out, const struct op_mat *const *w, const float *const *bias,
                       const int *OC, const float *x, int IC, int nb)
{
    if (op_amx_gemv_batch(n, out, w, bias, OC, x, IC, nb))
        return;
    long rows = 0;
    int f32 = 0;
    for (int k = 0; k < n; k++) {
        rows += OC[k];
        f32 |= w[k]->dtype == TENSOR_F32;
    }
    // memory-bound: below ~64K weights a second thread costs more to wake than it saves (the
    // partition depends on the weights only, never on nb)
    int nt = rows * IC < (1L << 16) ? 1 : op_team();
    int prev = f32 ? op_blas_serial_begin(nt) : 0;
#pragma omp parallel num_threads(nt) if (nt > 1)
    {
        // thread t reads rows [g0, g1) of the products stacked one after the other, one stretch of
        // memory per thread (handing out small tasks dynamically measured 10% slower: the
        // threads' streams then interleave); whole groups of four rows, so a row's sum does not
        // depend on the thread count
        long g0, g1, base = 0;
        op_rows_share(rows, 4, omp_get_thread_num(), omp_get_num_threads(), &g0, &g1);
        for (int k = 0; k < n; base += OC[k], k++) {
            long a = g0 > base ? g0 : base, b = g1 < base + OC[k] ? g1 : base + OC[k];
            if (a < b)
                gemv_part(out[k], w[k], x, nb, bias ? bias[k] : NULL, (int)(a - base), (int)(b - base), IC, OC[k]);
        }
    }
    op_blas_serial_end(prev);
}

void op_mat_gemv_many(int n, float *const *out, const struct op_mat *const *w, const float *const *bias,
                      const int *OC, const float *x, int IC)
{
    op_mat_gemv_batch(n, out, w, bias, OC, x, IC, 1);
}

void op_mat_gemv(float *out, const struct op_mat *w, const float *x, const float *bias, int OC, int IC)
{
    op_mat_gemv_many(1, &out, &w, &bias, &OC, x, IC);
}

// ---- many rows: tiles ----

/* 4 MB of float32 per thread and tile (this machine's per-core L2). Measured on the 0.5B shape's
 * LoRA training with bf16 weights: 2 MB tiles 86 tokens/s, 4 MB 89, 16 MB 89-90 (fewer tiles:
 * sgemm packs the input rows once per tile). */
#define TILE_FLOATS ((size_t)1 << 20)

size_t op_mat_scratch_floats(int IC, int OC, int nt)
{
    size_t big = (size_t)(IC > OC ? IC : OC);
    return (TILE_FLOATS > big ? TILE_FLOATS : big) * (size_t)(nt > 0 ? nt : 1);
}

static int ceil_div(int a, int b)
{
    return (a + b - 1) / b;
}

/* Tile size for splitting total rows (or columns) into tiles of at most cap, their number a
 * multiple of nt so that every thread gets as many (three tiles on two threads left one thread
 * idle a third of the time), and a multiple of 16 (the sgemm kernel's register block) when that
 * keeps the number of tiles. */
static int tile_size(int total, int cap, int nt)
{
    int ntiles = ceil_div(ceil_div(total, cap), nt) * nt;
    int size = ceil_div(total, ntiles), up = (size + 15) & ~15;
    return up <= cap && ceil_div(total, up) == ntiles ? up : size;
}

/* Threads for a product of N x IC x OC multiply-adds: below ~256K (tens of microseconds on one
 * core) waking a second thread costs more than it saves. */
static int gemm_team(int N, int IC, int OC)
{
    return (double)N * IC * OC < 262144.0 ? 1 : op_team();
}

/* A tile of rows [o0, o1) of w as float32 [o1 - o0, IC]: in place for float32, else widened. */
static const float *rows_tile(const struct op_mat *w, int IC, int o0, int o1, float *buf)
{
    if (w->dtype == TENSOR_F32)
        return w->f + (size_t)o0 * IC;
    op_mat_widen(buf, w, IC, o0, o1, 0, IC);
    return buf;
}

void op_mat_forward(float *out, const float *inp, const struct op_mat *w, const float *bias, int N, int IC,
                    int OC, float *scratch, size_t scratch_n)
{
    if (N == 1) {
        op_mat_gemv(out, w, inp, bias, OC, IC);
        return;
    }
    if (op_amx_forward(out, inp, w, bias, N, IC, OC))
        return;
    int nt = gemm_team(N, IC, OC), cap = OC; // float32: views, one tile per thread
    if (w->dtype != TENSOR_F32) {
        LK_ASSERT(scratch && scratch_n >= (size_t)IC);
        if ((size_t)nt * IC > scratch_n)
            nt = (int)(scratch_n / (size_t)IC);
        cap = (int)(scratch_n / (size_t)nt / (size_t)IC);
    }
    int rows = tile_size(OC, cap, nt), ntiles = ceil_div(OC, rows);
    if (nt > ntiles)
        nt = ntiles;
    size_t per = w->dtype == TENSOR_F32 ? 0 : scratch_n / (size_t)nt;
    int prev = op_blas_serial_begin(nt);
#pragma omp parallel for num_threads(nt) schedule(static) if (nt > 1)
    for (int k = 0; k < ntiles; k++) {
        int o0 = k * rows, o1 = o0 + rows < OC ? o0 + rows : OC;
        const float *wt = rows_tile(w, IC, o0, o1, scratch + (size_t)omp_get_thread_num() * per);
        if (bias)
            for (int n = 0; n < N; n++)
                memcpy(out + (size_t)n * OC + o0, bias + o0, sizeof(float) * (size_t)(o1 - o0));
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, N, o1 - o0, IC, 1.0f, inp, IC, wt, IC,
                    bias ? 1.0f : 0.0f, out + o0, OC);
    }
    op_blas_serial_end(prev);
}

/* dinp[:, c0:c1] = beta dinp[:, c0:c1] + dout @ w[:, c0:c1], a tile of columns per task: each writes
 * its own columns. */
static void backward_cols(float *dinp, const float *dout, const struct op_mat *w, int N, int IC, int OC,
                          float beta, float *scratch, size_t per, int cols, int nt)
{
    int ntiles = ceil_div(IC, cols);
#pragma omp parallel for num_threads(nt) schedule(static) if (nt > 1)
    for (int k = 0; k < ntiles; k++) {
        int c0 = k * cols, c1 = c0 + cols < IC ? c0 + cols : IC;
        const float *wt = w->f + c0;
        int ldw = IC;
        if (w->dtype != TENSOR_F32) {
            float *buf = scratch + (size_t)omp_get_thread_num() * per;
            op_mat_widen(buf, w, IC, 0, OC, c0, c1);
            wt = buf;
            ldw = c1 - c0;
        }
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, N, c1 - c0, OC, 1.0f, dout, OC, wt, ldw, beta,
                    dinp + c0, IC);
    }
}

/* dinp += dout[:, o0:o1] @ w[o0:o1, :] tile after tile of rows (the whole scratch is one shared
 * tile, widened by the team together); each thread adds the products into its own rows of dinp,
 * so the sum over tiles runs in the same order whatever the thread count. */
static void backward_rows(float *dinp, const float *dout, const struct op_mat *w, int N, int IC, int OC,
                          float beta, float *scratch, size_t scratch_n, int nt)
{
    int rows = (int)(scratch_n / (size_t)IC);
    if (rows > OC)
        rows = OC;
#pragma omp parallel num_threads(nt) if (nt > 1)
    {
        int t = omp_get_thread_num(), n = omp_get_num_threads();
        int n0 = (int)((long)N * t / n), n1 = (int)((long)N * (t + 1) / n);
        for (int o0 = 0; o0 < OC; o0 += rows) {
            int o1 = o0 + rows < OC ? o0 + rows : OC;
#pragma omp for schedule(static)
            for (int r = o0; r < o1; r++)
                op_mat_widen(scratch + (size_t)(r - o0) * IC, w, IC, r, r + 1, 0, IC);
            if (n1 > n0) // the first tile scales dinp by beta, the others add
                cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, n1 - n0, IC, o1 - o0, 1.0f,
                            dout + (size_t)n0 * OC + o0, OC, scratch, IC, o0 ? 1.0f : beta, dinp + (size_t)n0 * IC,
                            IC);
#pragma omp barrier
        }
    }
}

void op_mat_backward(float *dinp, const float *dout, const struct op_mat *w, int N, int IC, int OC, float beta,
                     float *scratch, size_t scratch_n)
{
    // forward was: out[n, o] = sum_i inp[n, i] w[o, i]  =>  dinp[n, i] += sum_o dout[n, o] w[o, i]
    int nt = gemm_team(N, IC, OC);
    int prev = op_blas_serial_begin(nt);
    if (w->dtype == TENSOR_F32) {
        backward_cols(dinp, dout, w, N, IC, OC, beta, NULL, 0, ceil_div(IC, nt), nt);
    } else {
        LK_ASSERT(scratch && scratch_n >= (size_t)(IC > OC ? IC : OC));
        size_t per = scratch_n / (size_t)nt;
        int cols = (int)(per / (size_t)OC);
        if (cols >= 32 || (cols >= 1 && (long)cols * nt >= IC))
            backward_cols(dinp, dout, w, N, IC, OC, beta, scratch, per, tile_size(IC, cols, nt), nt);
        else // a column tile would be a sliver (lm_head: OC is the vocabulary)
            backward_rows(dinp, dout, w, N, IC, OC, beta, scratch, scratch_n, nt);
    }
    op_blas_serial_end(prev);
}

void op_mat_backward_weight(float *dw, float *dbias, const float *dout, const float *inp, int N, int IC, int OC)
{
    // forward was: out[n, o] = sum_i inp[n, i] w[o, i] + bias[o]
    // so: dw[o, i] += sum_n dout[n, o] inp[n, i]; dbias[o] += sum_n dout[n, o]; rows o per thread
    int nt = gemm_team(N, IC, OC);
    int rows = ceil_div(OC, nt), prev = op_blas_serial_begin(nt);
#pragma omp parallel for num_threads(nt) schedule(static) if (nt > 1)
    for (int k = 0; k < nt; k++) {
        int o0 = k * rows, o1 = o0 + rows < OC ? o0 + rows : OC;
        if (o0 >= o1)
            continue;
        if (dw)
            cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, o1 - o0, IC, N, 1.0f, dout + o0, OC, inp, IC,
                        1.0f, dw + (size_t)o0 * IC, IC);
        if (dbias)
            for (int o = o0; o < o1; o++) {
                double s = 0;
                for (int n = 0; n < N; n++)
                    s += dout[(size_t)n * OC + o];
                dbias[o] += (float)s;
            }
    }
    op_blas_serial_end(prev);
}

// ---- references ----

static double mat_at(const struct op_mat *w, size_t i)
{
    if (w->dtype == TENSOR_F32)
        return w->f[i];
    return w->dtype == TENSOR_BF16 ? tensor_bf16_to_f32(w->h[i]) : tensor_f16_to_f32(w->h[i]);
}

void op_mat_forward_naive(float *out, const float *inp, const struct op_mat *w, const float *bias, int N,
                          int IC, int OC)
{
    for (int n = 0; n < N; n++)
        for (int o = 0; o < OC; o++) {
            double s = bias ? bias[o] : 0.0;
            for (int i = 0; i < IC; i++)
                s += (double)inp[(size_t)n * IC + i] * mat_at(w, (size_t)o * IC + i);
            out[(size_t)n * OC + o] = (float)s;
        }
}

void op_mat_backward_naive(float *dinp, const float *dout, const struct op_mat *w, int N, int IC, int OC)
{
    for (int n = 0; n < N; n++)
        for (int i = 0; i < IC; i++) {
            double s = 0;
            for (int o = 0; o < OC; o++)
                s += (double)dout[(size_t)n * OC + o] * mat_at(w, (size_t)o * IC + i);
            dinp[(size_t)n * IC + i] += (float)s;
        }
}
