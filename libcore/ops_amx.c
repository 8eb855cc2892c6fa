/*
 * ops_amx.c - products with bf16 weight matrices on the AMX tile unit (Intel Sapphire Rapids and
 * later), at the accuracy of a float32 sgemm.
 *
 * A float32 activation x is split exactly into three bf16 parts, x = h + m + l (h = bf16(x),
 * m = bf16(x - h), l = x - h - m: 8 + 8 + 8 significant bits hold the float's 24). A bf16 weight
 * times a bf16 part is exact in float32 (8 x 8 bits), so sum_k w[k] (h[k] + m[k] + l[k]) on the
 * tile unit (TDPBF16PS: float32 accumulation, round to nearest) is the float32 dot product of the
 * sgemm path with the additions in another order. Nothing is rounded to bf16 that was not bf16.
 *
 * The weight is the tile's A operand as it lies in memory (16 rows of w, 32 columns = 64 bytes
 * a row), so weights are never repacked; the activations are packed once per product into the B
 * operand's pair-interleaved layout, 16 tokens x 32 columns x 3 parts per block. A C tile holds
 * 16 outputs x 16 tokens and is transposed on its way out. Four C tiles (2 x 16 outputs, 2 x 16
 * tokens) accumulate over the columns; the token blocks are the outer loop so that their packed
 * activations stay in the L2 cache while the weights stream past.
 *
 * An output's sum depends on its token's row and its weight's row only (not on the number of
 * tokens, the padding or the threads), as the batched paths of generate.c require.
 */
#ifndef _DEFAULT_SOURCE
#define _DEFAULT_SOURCE /* syscall */
#endif
#include "ops.h"

#include <omp.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#include "lk.h"

int op_amx = 1;
int op_amx_gemv = 0;

#if defined(__x86_64__) && defined(__GNUC__) && defined(__linux__)
#include <cpuid.h>
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#define AMX_TARGET __attribute__((target("amx-tile,amx-bf16,avx512f,avx512bw,avx512dq,avx512vl,avx512bf16")))
#define ARCH_REQ_XCOMP_PERM 0x1023
#define XFEATURE_XTILEDATA 18
/* Tuned on the Qwen2.5-0.5B shapes (256 to 1024 tokens x 896 -> 4864, 4864 -> 896, 896 -> 151936,
 * 2 threads): packed tokens per chunk of the kernel's outer loop (384 KB to 1.5 MB within noise;
 * no chunks: 2/3 the speed at 4864 columns); how many column blocks ahead the weights are
 * prefetched (2: 750 GFLOP/s against 430 without; 1 or 3 within noise), further ahead for a
 * single block of tokens (less work per weight). */
#define AMX_CHUNK_BYTES (768 << 10)
#define AMX_PF 2
#define AMX_PF1 4
#define PK_BLOCK (3 * 512) /* uint16 per block of 16 tokens x 32 columns: three 1 KB tiles */

static pthread_once_t amx_once = PTHREAD_ONCE_INIT;
static int amx_ok;

/* CPUID says AMX-TILE, AMX-BF16, AVX512-BF16 (the packing), the kernel grants the tile state, and
 * LORAKIT_AMX is not "0". */
static void amx_probe(void)
{
    const char *env = getenv("LORAKIT_AMX");
    if (env && !strcmp(env, "0"))
        return;
    unsigned a, b, c, d, a1 = 0, b1, c1, d1;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d) || !(d & (1u << 24)) || !(d & (1u << 22)))
        return;
    if (a >= 1)
        __get_cpuid_count(7, 1, &a1, &b1, &c1, &d1);
    if (!(a1 & (1u << 5)) || !__builtin_cpu_supports("avx512f") || !__builtin_cpu_supports("avx512bw"))
        return;
    amx_ok = syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0;
}

int op_amx_active(void)
{
    pthread_once(&amx_once, amx_probe);
    return op_amx && amx_ok;
}

/* 16 x 16 32-bit elements: r[i] row i in, out[j] column j out. */
AMX_TARGET static void transpose16(__m512i out[16], const __m512i r[16])
{
    __m512i a[16], b[16];
    for (int i = 0; i < 8; i++) {
        a[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
        a[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
    }
    // b[4i + j], 128-bit lane L: column 4L + j of rows 4i..4i+3
    for (int i = 0; i < 4; i++) {
        b[4 * i] = _mm512_unpacklo_epi64(a[4 * i], a[4 * i + 2]);
        b[4 * i + 1] = _mm512_unpackhi_epi64(a[4 * i], a[4 * i + 2]);
        b[4 * i + 2] = _mm512_unpacklo_epi64(a[4 * i + 1], a[4 * i + 3]);
        b[4 * i + 3] = _mm512_unpackhi_epi64(a[4 * i + 1], a[4 * i + 3]);
    }
    for (int j = 0; j < 4; j++) {
        __m512i e0 = _mm512_shuffle_i32x4(b[j], b[4 + j], 0x88), e1 = _mm512_shuffle_i32x4(b[j], b[4 + j], 0xDD);
        __m512i f0 = _mm512_shuffle_i32x4(b[8 + j], b[12 + j], 0x88);
        __m512i f1 = _mm512_shuffle_i32x4(b[8 + j], b[12 + j], 0xDD);
        out[j] = _mm512_shuffle_i32x4(e0, f0, 0x88);
        out[8 + j] = _mm512_shuffle_i32x4(e0, f0, 0xDD);
        out[4 + j] = _mm512_shuffle_i32x4(e1, f1, 0x88);
        out[12 + j] = _mm512_shuffle_i32x4(e1, f1, 0xDD);
    }
}

/* 32 floats to bf16 (round to nearest even) and back, exactly. */
AMX_TARGET static __m512i to_bf16(__m512 lo, __m512 hi, __m512 *wlo, __m512 *whi)
{
    __m512i v = (__m512i)_mm512_cvtne2ps_pbh(hi, lo); // columns 0..15 from lo, 16..31 from hi
    *wlo = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_castsi512_si256(v)), 16));
    *whi = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_extracti64x4_epi64(v, 1)), 16));
    return v;
}

/* Token block tb (tokens 16 tb .. 16 tb + 15, zeros past N) of x into pk: per column block, the
 * three parts, each 16 rows (column pairs) x 16 tokens x 2; the two blocks of a pair (tb, tb + 1
 * for even tb) side by side column block by column block, one stream for the kernel. */
AMX_TARGET static void pack_block(uint16_t *pk, const float *x, size_t ldx, int N, int IC, int tb)
{
    int nkb = IC / 32;
    for (int kb = 0; kb < nkb; kb++) {
        __m512i part[3][16], t[16];
        for (int n = 0; n < 16; n++) {
            int tok = tb * 16 + n;
            __m512 lo = _mm512_setzero_ps(), hi = lo, wl, wh;
            if (tok < N) {
                lo = _mm512_loadu_ps(x + (size_t)tok * ldx + kb * 32);
                hi = _mm512_loadu_ps(x + (size_t)tok * ldx + kb * 32 + 16);
            }
            for (int p = 0; p < 3; p++) {
                part[p][n] = to_bf16(lo, hi, &wl, &wh);
                lo = _mm512_sub_ps(lo, wl); // exact: the rounding error of the part
                hi = _mm512_sub_ps(hi, wh);
            }
        }
        uint16_t *d = pk + (((size_t)(tb / 2) * nkb + kb) * 2 + (size_t)(tb & 1)) * PK_BLOCK;
        for (int p = 0; p < 3; p++) {
            transpose16(t, part[p]); // row r: column pair r of the 16 tokens
            for (int r = 0; r < 16; r++)
                _mm512_storeu_si512(d + p * 512 + r * 32, t[r]);
        }
    }
}

/* Writes C tile buffer c (16 outputs x 16 tokens) to out rows t0.. (at most nt tokens), columns
 * o.. (+ bias). */
AMX_TARGET static void store_tile(float *out, size_t ldo, const float *c, int nt, const float *bias)
{
    __m512i r[16], t[16];
    for (int i = 0; i < 16; i++)
        r[i] = _mm512_loadu_si512(c + i * 16);
    transpose16(t, r);
    __m512 b = bias ? _mm512_loadu_ps(bias) : _mm512_setzero_ps();
    for (int n = 0; n < nt; n++)
        _mm512_storeu_ps(out + (size_t)n * ldo, _mm512_add_ps(_mm512_castsi512_ps(t[n]), b));
}

struct tile_cfg {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
};

/* Eight tiles of 16 rows x 64 bytes, for the calling thread. */
AMX_TARGET static void tiles_config(void)
{
    struct tile_cfg cfg;
    memset(&cfg, 0, sizeof cfg);
    cfg.palette = 1;
    for (int i = 0; i < 8; i++) {
        cfg.colsb[i] = 64;
        cfg.rows[i] = 16;
    }
    _tile_loadconfig(&cfg);
}

/* The 2 x 2 C tiles of weight rows o.. and o + 16.. (pair; else o.. alone) by the token pair at
 * p0 (two blocks; else one), over every column block, into c. */
AMX_TARGET static void tiles_run(float c[4][256], const uint16_t *W, int IC, int o, int pair, const uint16_t *p0,
                                 int two)
{
    const uint16_t *w0 = W + (size_t)o * IC, *w1 = pair ? w0 + (size_t)16 * IC : w0;
    long lw = (long)IC * 2;
    int nkb = IC / 32;
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
    for (int kb = 0; kb < nkb; kb++) {
        // the weights' rows are far apart: the hardware prefetchers miss them
        int ahead = kb + (two ? AMX_PF : AMX_PF1);
        if (ahead < nkb)
            for (int r = 0; r < 16; r++) {
                _mm_prefetch((const char *)(w0 + (size_t)r * IC + ahead * 32), _MM_HINT_T0);
                _mm_prefetch((const char *)(w1 + (size_t)r * IC + ahead * 32), _MM_HINT_T0);
            }
        _tile_loadd(4, w0 + kb * 32, lw);
        _tile_loadd(5, w1 + kb * 32, lw);
        const uint16_t *b0 = p0 + (size_t)kb * 2 * PK_BLOCK, *b1 = b0 + PK_BLOCK;
        if (!two) { // one block of tokens: tiles 0 and 2
            for (int p = 0; p < 3; p++) {
                _tile_loadd(6, b0 + p * 512, 64);
                _tile_dpbf16ps(0, 4, 6);
                _tile_dpbf16ps(2, 5, 6);
            }
            continue;
        }
        for (int p = 0; p < 3; p++) {
            _tile_loadd(6, b0 + p * 512, 64);
            _tile_loadd(7, b1 + p * 512, 64);
            _tile_dpbf16ps(0, 4, 6);
            _tile_dpbf16ps(1, 4, 7);
            _tile_dpbf16ps(2, 5, 6);
            _tile_dpbf16ps(3, 5, 7);
        }
    }
    _tile_stored(0, c[0], 64);
    _tile_stored(1, c[1], 64);
    _tile_stored(2, c[2], 64);
    _tile_stored(3, c[3], 64);
}

/* out[t, o - o0] = x[t] . W[o] + bias[o] for the N packed tokens and rows [o0, o1). */
AMX_TARGET static void kernel(float *out, size_t ldo, const uint16_t *pk, int N, const uint16_t *W, int IC, int o0,
                              int o1, const float *bias)
{
    tiles_config();
    int ntb = (N + 15) / 16, nkb = IC / 32;
    float c[4][256] __attribute__((aligned(64)));
    // token blocks in chunks whose packed rows stay in the L2 cache, each pair of weight blocks
    // passing over a whole chunk
    int chunk = (int)(AMX_CHUNK_BYTES / ((size_t)IC * 6 * 32)) * 2;
    chunk = chunk > 2 ? chunk : 2;
    for (int tc = 0; tc < ntb; tc += chunk)
        for (int o = o0; o < o1; o += 32)
            for (int tb = tc; tb < ntb && tb < tc + chunk; tb += 2) { // tb even: its pair's blocks
                int two = tb + 1 < ntb, pair = o + 16 < o1;
                tiles_run(c, W, IC, o, pair, pk + (size_t)tb * nkb * PK_BLOCK, two);
                int n0 = N - tb * 16 < 16 ? N - tb * 16 : 16;
                int n1 = two ? (N - tb * 16 - 16 < 16 ? N - tb * 16 - 16 : 16) : 0;
                float *y = out + (size_t)tb * 16 * ldo + (o - o0);
                store_tile(y, ldo, c[0], n0, bias ? bias + o : NULL);
                store_tile(y + 16 * ldo, ldo, c[1], n1, bias ? bias + o : NULL);
                if (pair) {
                    store_tile(y + 16, ldo, c[2], n0, bias ? bias + o + 16 : NULL);
                    store_tile(y + 16 * ldo + 16, ldo, c[3], n1, bias ? bias + o + 16 : NULL);
                }
            }
    _tile_release();
}

int op_amx_fits(const struct op_mat *w, int IC, int OC)
{
    return w->dtype == TENSOR_BF16 && IC > 0 && IC % 32 == 0 && OC > 0 && OC % 16 == 0 && op_amx_active();
}

size_t op_amx_pack_size(int N, int IC)
{
    return (size_t)((N + 31) / 32 * 2) * (size_t)(IC / 32) * PK_BLOCK * sizeof(uint16_t);
}

void op_amx_pack(uint16_t *pk, const float *x, size_t ldx, int N, int IC, int nt)
{
    int ntb = (N + 31) / 32 * 2; // whole pairs of blocks: the kernel reads both of a pair
#pragma omp parallel for num_threads(nt) schedule(static) if (nt > 1)
    for (int tb = 0; tb < ntb; tb++)
        pack_block(pk, x, ldx, N, IC, tb);
}

void op_amx_rows(float *out, size_t ldo, const uint16_t *pk, int N, const struct op_mat *w, int IC, int o0, int o1,
                 const float *bias)
{
    LK_ASSERT(w->dtype == TENSOR_BF16 && IC % 32 == 0 && o0 % 16 == 0 && o1 % 16 == 0 && amx_ok);
    kernel(out, ldo, pk, N, w->h, IC, o0, o1, bias);
}

#else

int op_amx_active(void)
{
    return 0;
}

int op_amx_fits(const struct op_mat *w, int IC, int OC)
{
    (void)w, (void)IC, (void)OC;
    return 0;
}

size_t op_amx_pack_size(int N, int IC)
{
    return (size_t)N * (size_t)IC * 6;
}

void op_amx_pack(uint16_t *pk, const float *x, size_t ldx, int N, int IC, int nt)
{
    (void)pk, (void)x, (void)ldx, (void)N, (void)IC, (void)nt;
    LK_ASSERT(0 && "op_amx_pack without AMX");
}

void op_amx_rows(float *out, size_t ldo, const uint16_t *pk, int N, const struct op_mat *w, int IC, int o0, int o1,
                 const float *bias)
{
    (void)out, (void)ldo, (void)pk, (void)N, (void)w, (void)IC, (void)o0, (void)o1, (void)bias;
    LK_ASSERT(0 && "op_amx_rows without AMX");
}

#endif

int op_amx_many(int n, float *const *out, const struct op_mat *const *w, const float *const *bias, const int *OC,
                const float *x, int IC, int N)
{
    long rows = 0;
    for (int k = 0; k < n; k++) {
        if (!op_amx_fits(w[k], IC, OC[k]))
            return 0;
        rows += OC[k];
    }
    uint16_t *pk = N > 0 ? lk_malloc(op_amx_pack_size(N, IC)) : NULL;
    if (!pk)
        return 0;
    int nt = (double)N * rows * IC < 262144.0 ? 1 : op_team();
    op_amx_pack(pk, x, (size_t)IC, N, IC, nt);
#pragma omp parallel num_threads(nt) if (nt > 1)
    {
        // whole pairs of 16 rows a thread (a row's sums do not depend on which thread, or beside
        // which rows, it is computed)
        long g0, g1, base = 0;
        op_rows_share(rows, 32, omp_get_thread_num(), omp_get_num_threads(), &g0, &g1);
        for (int k = 0; k < n; base += OC[k], k++) {
            int a = (int)((g0 > base ? g0 : base) - base), b = (int)((g1 < base + OC[k] ? g1 : base + OC[k]) - base);
            if (a < b)
                op_amx_rows(out[k] + a, (size_t)OC[k], pk, N, w[k], IC, a, b, bias ? bias[k] : NULL);
        }
    }
    lk_free(pk);
    return 1;
}

int op_amx_forward(float *out, const float *inp, const struct op_mat *w, const float *bias, int N, int IC, int OC)
{
    return op_amx_many(1, &out, &w, &bias, &OC, inp, IC, N);
}

int op_amx_gemv_batch(int n, float *const *out, const struct op_mat *const *w, const float *const *bias,
                      const int *OC, const float *x, int IC, int nb)
{
    return op_amx_gemv && op_amx_many(n, out, w, bias, OC, x, IC, nb);
}
