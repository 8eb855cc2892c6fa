/*
 * ops_simd.c - AVX2 pieces of the row kernels of ops.c (RMSNorm, softmax, cross-entropy,
 * rotary embedding, residual): the build targets baseline x86-64 (no -march), so the plain
 * loops run one float at a time, and a sum the plain loop keeps in double is never vectorized
 * by the compiler (it may not reorder it). Measured on the small bench config (one lane of 2 x
 * 256 tokens): those loops took about 8% of a LoRA training step.
 *
 * Each function does the first k = n & ~7 elements with AVX2 (when op_simd_active()) and
 * returns k, or returns 0; the caller's plain loop does the rest (ops.h). Elementwise ones do
 * each element's arithmetic in the plain loop's order and rounding (no FMA contraction), so
 * their results are the plain loop's bit for bit; the reductions sum 8 floats at a time in four
 * double lanes (exact products, sums in another order than the plain loop's).
 */
#include "ops.h"

#include <string.h>

#if defined(__x86_64__) && defined(__GNUC__)
#define OPS_X86 1
#include <immintrin.h>
#define OPS_AVX2 __attribute__((target("avx2,fma")))

OPS_AVX2 static inline double hsum4d(__m256d v)
{
    __m128d s = _mm_add_pd(_mm256_castpd256_pd128(v), _mm256_extractf128_pd(v, 1));
    return _mm_cvtsd_f64(_mm_add_sd(s, _mm_unpackhi_pd(s, s)));
}

OPS_AVX2 static inline __m256d lo4(__m256 v)
{
    return _mm256_cvtps_pd(_mm256_castps256_ps128(v));
}

OPS_AVX2 static inline __m256d hi4(__m256 v)
{
    return _mm256_cvtps_pd(_mm256_extractf128_ps(v, 1));
}

OPS_AVX2 static size_t sumsq_avx2(const float *x, size_t n, double *out)
{
    __m256d a = _mm256_setzero_pd(), b = a;
    size_t i = 0;
    for (; i + 8 <= n; i += 8) {
        __m256 v = _mm256_loadu_ps(x + i);
        __m256d l = lo4(v), h = hi4(v);
        a = _mm256_add_pd(a, _mm256_mul_pd(l, l));
        b = _mm256_add_pd(b, _mm256_mul_pd(h, h));
    }
    *out = hsum4d(_mm256_add_pd(a, b));
    return i;
}

OPS_AVX2 static size_t dot_avx2(const float *p, const float *q, size_t n, double *out)
{
    __m256d a = _mm256_setzero_pd(), b = a;
    size_t i = 0;
    for (; i + 8 <= n; i += 8) {
        __m256 u = _mm256_loadu_ps(p + i), v = _mm256_loadu_ps(q + i);
        a = _mm256_add_pd(a, _mm256_mul_pd(lo4(u), lo4(v)));
        b = _mm256_add_pd(b, _mm256_mul_pd(hi4(u), hi4(v)));
    }
    *out = hsum4d(_mm256_add_pd(a, b));
    return i;
}

OPS_AVX2 static size_t dot3_avx2(const float *p, const float *q, const float *r, size_t n, double *out)
{
    __m256d a = _mm256_setzero_pd(), b = a;
    size_t i = 0;
    for (; i + 8 <= n; i += 8) {
        __m256 u = _mm256_loadu_ps(p + i), v = _mm256_loadu_ps(q + i), w = _mm256_loadu_ps(r + i);
        a = _mm256_add_pd(a, _mm256_mul_pd(_mm256_mul_pd(lo4(u), lo4(v)), lo4(w)));
        b = _mm256_add_pd(b, _mm256_mul_pd(_mm256_mul_pd(hi4(u), hi4(v)), hi4(w)));
    }
    *out = hsum4d(_mm256_add_pd(a, b));
    return i;
}

OPS_AVX2 static size_t sum_avx2(const float *x, size_t n, double *out)
{
    __m256d a = _mm256_setzero_pd(), b = a;
    size_t i = 0;
    for (; i + 8 <= n; i += 8) {
        __m256 v = _mm256_loadu_ps(x + i);
        a = _mm256_add_pd(a, lo4(v));
        b = _mm256_add_pd(b, hi4(v));
    }
    *out = hsum4d(_mm256_add_pd(a, b));
    return i;
}

OPS_AVX2 static size_t max_avx2(const float *x, size_t n, float *out)
{
    size_t i = 0;
    if (n < 8)
        return 0;
    __m256 m = _mm256_loadu_ps(x);
    for (i = 8; i + 8 <= n; i += 8)
        m = _mm256_max_ps(m, _mm256_loadu_ps(x + i));
    float v[8];
    _mm256_storeu_ps(v, m);
    float r = v[0];
    for (int k = 1; k < 8; k++)
        r = v[k] > r ? v[k] : r;
    *out = r;
    return i;
}

OPS_AVX2 static size_t scale_avx2(float *x, float s, size_t n)
{
    __m256 v = _mm256_set1_ps(s);
    size_t i = 0;
    for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(x + i, _mm256_mul_ps(_mm256_loadu_ps(x + i), v));
    return i;
}

OPS_AVX2 static size_t sub_avx2(float *dst, const float *x, float s, size_t n)
{
    __m256 v = _mm256_set1_ps(s);
    size_t i = 0;
    for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(dst + i, _mm256_sub_ps(_mm256_loadu_ps(x + i), v));
    return i;
}

OPS_AVX2 static size_t add_avx2(float *dst, const float *src, size_t n)
{
    size_t i = 0;
    for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(dst + i, _mm256_add_ps(_mm256_loadu_ps(dst + i), _mm256_loadu_ps(src + i)));
    return i;
}

OPS_AVX2 static size_t axpy_avx2(float *y, float a, const float *x, size_t n)
{
    __m256 av = _mm256_set1_ps(a);
    size_t i = 0;
    for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(y + i, _mm256_add_ps(_mm256_loadu_ps(y + i), _mm256_mul_ps(av, _mm256_loadu_ps(x + i))));
    return i;
}

/* Eight float lanes, then (l0 + l4) + ... as float: a float dot product in another order. */
OPS_AVX2 static size_t dotf_avx2(const float *a, const float *b, size_t n, float *out)
{
    __m256 s = _mm256_setzero_ps();
    size_t i = 0;
    for (; i + 8 <= n; i += 8)
        s = _mm256_add_ps(s, _mm256_mul_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i)));
    __m128 h = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
    h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    *out = _mm_cvtss_f32(_mm_add_ss(h, _mm_movehdup_ps(h)));
    return i;
}

OPS_AVX2 static size_t rmsnorm_row_avx2(float *y, const float *x, const float *w, float r, size_t n)
{
    __m256 rv = _mm256_set1_ps(r);
    size_t i = 0;
    for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(y + i, _mm256_mul_ps(_mm256_mul_ps(_mm256_loadu_ps(x + i), rv), _mm256_loadu_ps(w + i)));
    return i;
}

OPS_AVX2 static size_t rmsnorm_drow_avx2(float *dx, float *dw, const float *dy, const float *x, const float *w, float r,
                                         float c, size_t n)
{
    __m256 rv = _mm256_set1_ps(r), cv = _mm256_set1_ps(c);
    size_t i = 0;
    for (; i + 8 <= n; i += 8) {
        __m256 d = _mm256_loadu_ps(dy + i), xv = _mm256_loadu_ps(x + i);
        if (dw) // dw += dy x r
            _mm256_storeu_ps(dw + i, _mm256_add_ps(_mm256_loadu_ps(dw + i), _mm256_mul_ps(_mm256_mul_ps(d, xv), rv)));
        if (dx) { // dx += r w dy - c x
            __m256 t = _mm256_sub_ps(_mm256_mul_ps(_mm256_mul_ps(rv, _mm256_loadu_ps(w + i)), d), _mm256_mul_ps(cv, xv));
            _mm256_storeu_ps(dx + i, _mm256_add_ps(_mm256_loadu_ps(dx + i), t));
        }
    }
    return i;
}

OPS_AVX2 static size_t softmax_drow_avx2(float *d, const float *p, float dot, float scale, size_t n)
{
    __m256 dv = _mm256_set1_ps(dot), sv = _mm256_set1_ps(scale);
    size_t i = 0;
    for (; i + 8 <= n; i += 8) {
        __m256 t = _mm256_mul_ps(_mm256_loadu_ps(p + i), _mm256_sub_ps(_mm256_loadu_ps(d + i), dv));
        _mm256_storeu_ps(d + i, _mm256_mul_ps(t, sv));
    }
    return i;
}

OPS_AVX2 static size_t rope_row_avx2(float *v1, float *v2, const float *c, const float *s, size_t n)
{
    size_t i = 0;
    for (; i + 8 <= n; i += 8) {
        __m256 x1 = _mm256_loadu_ps(v1 + i), x2 = _mm256_loadu_ps(v2 + i);
        __m256 cv = _mm256_loadu_ps(c + i), sv = _mm256_loadu_ps(s + i);
        _mm256_storeu_ps(v1 + i, _mm256_sub_ps(_mm256_mul_ps(x1, cv), _mm256_mul_ps(x2, sv)));
        _mm256_storeu_ps(v2 + i, _mm256_add_ps(_mm256_mul_ps(x2, cv), _mm256_mul_ps(x1, sv)));
    }
    return i;
}
#endif

/* A call of f(args) when the AVX2 kernels are in use, else 0 (every argument used). */
#ifdef OPS_X86
#define OPS_CALL(f, ...) (op_simd_active() ? f(__VA_ARGS__) : 0)
#else
static inline int ops_unused(int d, ...)
{
    return d;
}
#define OPS_CALL(f, ...) ((size_t)ops_unused(0, __VA_ARGS__))
#endif

size_t op_sumsq_simd(const float *x, size_t n, double *out)
{
    *out = 0;
    return OPS_CALL(sumsq_avx2, x, n, out);
}

size_t op_dot_simd(const float *a, const float *b, size_t n, double *out)
{
    *out = 0;
    return OPS_CALL(dot_avx2, a, b, n, out);
}

size_t op_dot3_simd(const float *a, const float *b, const float *c, size_t n, double *out)
{
    *out = 0;
    return OPS_CALL(dot3_avx2, a, b, c, n, out);
}

size_t op_sum_simd(const float *x, size_t n, double *out)
{
    *out = 0;
    return OPS_CALL(sum_avx2, x, n, out);
}

size_t op_max_simd(const float *x, size_t n, float *out)
{
    return OPS_CALL(max_avx2, x, n, out);
}

size_t op_scale_simd(float *x, float s, size_t n)
{
    return OPS_CALL(scale_avx2, x, s, n);
}

size_t op_sub_simd(float *dst, const float *x, float s, size_t n)
{
    return OPS_CALL(sub_avx2, dst, x, s, n);
}

size_t op_add_simd(float *dst, const float *src, size_t n)
{
    return OPS_CALL(add_avx2, dst, src, n);
}

size_t op_axpy_simd(float *y, float a, const float *x, size_t n)
{
    return OPS_CALL(axpy_avx2, y, a, x, n);
}

size_t op_dotf_simd(const float *a, const float *b, size_t n, float *out)
{
    *out = 0;
    return OPS_CALL(dotf_avx2, a, b, n, out);
}

size_t op_rmsnorm_row_simd(float *y, const float *x, const float *w, float r, size_t n)
{
    return OPS_CALL(rmsnorm_row_avx2, y, x, w, r, n);
}

size_t op_rmsnorm_drow_simd(float *dx, float *dw, const float *dy, const float *x, const float *w, float r, float c,
                            size_t n)
{
    return OPS_CALL(rmsnorm_drow_avx2, dx, dw, dy, x, w, r, c, n);
}

size_t op_softmax_drow_simd(float *d, const float *p, float dot, float scale, size_t n)
{
    return OPS_CALL(softmax_drow_avx2, d, p, dot, scale, n);
}

size_t op_rope_row_simd(float *v1, float *v2, const float *c, const float *s, size_t n)
{
    return OPS_CALL(rope_row_avx2, v1, v2, c, s, n);
}
