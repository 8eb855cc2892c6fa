/*
 * test_tensor.c - dtype table and the f32 <-> bf16 / f16 conversions, against bit patterns
 * computed by hand and against a slow exact reference in double (nearest representable value,
 * ties to the even pattern), independent of the bit tricks in tensor.c.
 */
#include "test.h"

#include <float.h>
#include <math.h>
#include <string.h>

#include "../libcore/lk.h"
#include "../libcore/tensor.h"

static float fbits(uint32_t u)
{
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static uint32_t bitsf(float f)
{
    uint32_t u;
    memcpy(&u, &f, 4);
    return u;
}

// ---- the slow reference ----

/* Exact value of a finite f16 pattern, from the format's definition. */
static double ref_f16_value(uint16_t h)
{
    int e = (h >> 10) & 31, m = h & 1023;
    double v = e == 0 ? ldexp(m, -24) : ldexp(1024 + m, e - 25);
    return (h & 0x8000) ? -v : v;
}

/* Exact value of a finite bf16 pattern, from the format's definition (8 exponent bits, 7 mantissa). */
static double ref_bf16_value(uint16_t h)
{
    int e = (h >> 7) & 255, m = h & 127;
    double v = e == 0 ? ldexp(m, -133) : ldexp(128 + m, e - 134);
    return (h & 0x8000) ? -v : v;
}

/* Rounds finite |x| to the nearest of the increasing patterns 0..maxfin of a format (values given
 * by val), ties to the even pattern; beyond max, compares with the halfway point to the next
 * power step (which would be Inf). Binary search plus an exact midpoint compare in double. */
static uint16_t ref_round(double x, double (*val)(uint16_t), uint16_t maxfin, uint16_t inf)
{
    uint16_t sign = x < 0 || (x == 0 && signbit(x)) ? 0x8000 : 0;
    double a = fabs(x);
    double maxv = val(maxfin);
    double ulp_at_max = maxv - val((uint16_t)(maxfin - 1));
    if (a >= maxv + ulp_at_max / 2) // halfway to the next (unrepresentable) step: ties go to Inf
        return (uint16_t)(sign | inf);            // (maxfin is odd, so even = Inf)
    uint16_t lo = 0, hi = maxfin;                 // largest lo with val(lo) <= a
    while (lo < hi) {
        uint16_t mid = (uint16_t)((lo + hi + 1) / 2);
        if (val(mid) <= a)
            lo = mid;
        else
            hi = (uint16_t)(mid - 1);
    }
    if (lo == maxfin)
        return (uint16_t)(sign | lo);
    double mid = (val(lo) + val((uint16_t)(lo + 1))) / 2; // exact: both have few mantissa bits
    uint16_t r = lo;
    if (a > mid || (a == mid && (lo & 1)))
        r = (uint16_t)(lo + 1);
    return (uint16_t)(sign | r);
}

static uint16_t ref_f16(float f)
{
    return ref_round(f, ref_f16_value, 0x7BFF, 0x7C00);
}

static uint16_t ref_bf16(float f)
{
    return ref_round(f, ref_bf16_value, 0x7F7F, 0x7F80);
}

// ---- dtypes ----

TEST(tensor_dtype_table)
{
    const char *names[] = { "F32", "F16", "BF16", "I32", "I64", "F64", "U8", "I8", "BOOL", "I16" };
    size_t sizes[] = { 4, 2, 2, 4, 8, 8, 1, 1, 1, 2 };
    for (int i = 0; i < TENSOR_DTYPE_COUNT; i++) {
        CHECK(!strcmp(tensor_dtype_name((enum tensor_dtype)i), names[i]));
        CHECK_INT(tensor_dtype_parse(names[i]), i);
        CHECK_INT(tensor_dtype_size((enum tensor_dtype)i), sizes[i]);
    }
    CHECK_INT(tensor_dtype_parse("f32"), -1); // case matters in the safetensors header
    CHECK_INT(tensor_dtype_parse("F8_E4M3"), -1);
    CHECK_INT(tensor_dtype_parse(""), -1);
    CHECK(tensor_dtype_name(TENSOR_DTYPE_COUNT) == NULL);
    CHECK(tensor_dtype_is_float(TENSOR_BF16) && !tensor_dtype_is_float(TENSOR_I64));
}

// ---- bf16 ----

TEST(tensor_bf16_hand_computed)
{
    struct {
        uint32_t in;
        uint16_t out;
    } cases[] = {
        { 0x3F800000, 0x3F80 }, // 1.0
        { 0x3F808000, 0x3F80 }, // tie, kept lsb even: down
        { 0x3F818000, 0x3F82 }, // tie, kept lsb odd: up
        { 0x3F808001, 0x3F81 }, // just above the tie
        { 0x3F807FFF, 0x3F80 }, // just below the tie
        { 0xBF818000, 0xBF82 }, // negative tie rounds the magnitude
        { 0x3FFF8000, 0x4000 }, // tie, odd: carries into the exponent (1.99.. -> 2.0)
        { 0x7F7FFFFF, 0x7F80 }, // FLT_MAX overflows to Inf
        { 0x7F7F7FFF, 0x7F7F }, // largest finite bf16 stays
        { 0x7F7F8000, 0x7F80 }, // tie above max bf16 (odd) -> Inf
        { 0x7F800000, 0x7F80 }, // +Inf
        { 0xFF800000, 0xFF80 }, // -Inf
        { 0x7FC00000, 0x7FC0 }, // quiet NaN
        { 0x7F800001, 0x7FC0 }, // signalling NaN whose payload is in the dropped bits: stays NaN
        { 0xFF800001, 0xFFC0 }, // sign kept
        { 0x7FA00000, 0x7FE0 }, // payload kept, quiet bit set
        { 0x00800000, 0x0080 }, // min normal
        { 0x00000001, 0x0000 }, // f32 subnormal rounds to zero
        { 0x00008000, 0x0000 }, // tie to even zero
        { 0x00018000, 0x0002 }, // tie, odd: up
        { 0x80000000, 0x8000 }, // -0
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++)
        CHECK_MSG(tensor_f32_to_bf16(fbits(cases[i].in)) == cases[i].out, "bf16(0x%08X) = 0x%04X, want 0x%04X",
                  cases[i].in, tensor_f32_to_bf16(fbits(cases[i].in)), cases[i].out);
    CHECK(bitsf(tensor_bf16_to_f32(0x3F80)) == 0x3F800000);
    CHECK(bitsf(tensor_bf16_to_f32(0xFF80)) == 0xFF800000);
    CHECK(isnan(tensor_bf16_to_f32(0x7FC1)));
    CHECK(bitsf(tensor_bf16_to_f32(0x0001)) == 0x00010000); // bf16 subnormal stays exact
}

TEST(tensor_bf16_matches_exact_reference)
{
    // every bf16 pattern converts to its exact value
    for (uint32_t h = 0; h < 0x10000; h++) {
        uint16_t e = (h >> 7) & 255;
        if (e == 255)
            continue;
        CHECK_MSG((double)tensor_bf16_to_f32((uint16_t)h) == ref_bf16_value((uint16_t)h), "bf16 0x%04X", h);
    }
    // f32 -> bf16: around every midpoint and at random bit patterns
    struct lk_rng r;
    lk_rng_seed(&r, 1);
    for (int i = 0; i < 200000; i++) {
        uint32_t u = (uint32_t)lk_rng_u64(&r);
        if (i % 2)
            u = (u & 0xFFFF0000u) | 0x8000u | (uint32_t)((int)(i % 5) - 2); // near a tie
        float f = fbits(u);
        if (isnan(f) || isinf(f))
            continue;
        CHECK_MSG(tensor_f32_to_bf16(f) == ref_bf16(f), "bf16(0x%08X) = 0x%04X, ref 0x%04X", u,
                  tensor_f32_to_bf16(f), ref_bf16(f));
    }
}

// ---- f16 ----

TEST(tensor_f16_hand_computed)
{
    struct {
        float in;
        uint16_t out;
    } cases[] = {
        { 1.0f, 0x3C00 },
        { -2.0f, 0xC000 },
        { 65504.0f, 0x7BFF },               // max normal
        { 65519.0f, 0x7BFF },               // below the halfway point to 65536
        { 65520.0f, 0x7C00 },               // exactly halfway, 0x7BFF odd: to Inf
        { -65520.0f, 0xFC00 },
        { 1e10f, 0x7C00 },                  // overflow to Inf
        { 0x1p-14f, 0x0400 },               // min normal
        { 0x1p-24f, 0x0001 },               // min subnormal
        { 0x1p-25f, 0x0000 },               // tie between 0 and 2^-24: to even (0)
        { 0x1.8p-25f, 0x0001 },             // above the tie
        { 0x1.000002p-25f, 0x0001 },        // one f32 ulp above the tie
        { 3 * 0x1p-25f, 0x0002 },           // 1.5 units: tie, 1 is odd: up to 2
        { 5 * 0x1p-25f, 0x0002 },           // 2.5 units: tie, 2 is even: stays
        { 1023 * 0x1p-24f, 0x03FF },        // max subnormal
        { 1023.5f * 0x1p-24f, 0x0400 },     // tie at the subnormal/normal boundary: up to even 0x400
        { 1.0f + 0x1p-11f, 0x3C00 },        // normal tie, even: down
        { 1.0f + 3 * 0x1p-11f, 0x3C02 },    // normal tie, odd: up
        { 2.0f - 0x1p-12f, 0x4000 },        // rounds up across the binade
        { 1e-10f, 0x0000 },
        { -0.0f, 0x8000 },
        { -0x1p-24f, 0x8001 },
        { 0.1f, 0x2E66 },                   // 0.0999755859375
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++)
        CHECK_MSG(tensor_f32_to_f16(cases[i].in) == cases[i].out, "f16(%a) = 0x%04X, want 0x%04X",
                  (double)cases[i].in, tensor_f32_to_f16(cases[i].in), cases[i].out);
    CHECK(tensor_f32_to_f16(INFINITY) == 0x7C00);
    CHECK(tensor_f32_to_f16(-INFINITY) == 0xFC00);
    CHECK(tensor_f32_to_f16(fbits(0x7FC00000)) == 0x7E00);
    CHECK(tensor_f32_to_f16(fbits(0xFFC00000)) == 0xFE00);
    CHECK(tensor_f32_to_f16(fbits(0x7F800001)) == 0x7E00); // sNaN, payload below f16 bits: quiet NaN
    CHECK(bitsf(tensor_f16_to_f32(0x0001)) == 0x33800000);  // 2^-24
    CHECK(bitsf(tensor_f16_to_f32(0x03FF)) == 0x387FC000);  // max subnormal
    CHECK(bitsf(tensor_f16_to_f32(0x0400)) == 0x38800000);  // min normal
    CHECK(bitsf(tensor_f16_to_f32(0x7BFF)) == 0x477FE000);  // 65504
    CHECK(bitsf(tensor_f16_to_f32(0x8001)) == 0xB3800000);
    CHECK(bitsf(tensor_f16_to_f32(0x7C00)) == 0x7F800000);
    CHECK(bitsf(tensor_f16_to_f32(0xFC00)) == 0xFF800000);
    CHECK(bitsf(tensor_f16_to_f32(0x7E00)) == 0x7FC00000);
    CHECK(bitsf(tensor_f16_to_f32(0xFD01)) == 0xFFE02000); // signalling -NaN: quiet, payload kept
}

TEST(tensor_f16_matches_exact_reference)
{
    // every finite f16 converts to its exact value and back to itself
    for (uint32_t h = 0; h < 0x10000; h++) {
        if (((h >> 10) & 31) == 31)
            continue;
        float f = tensor_f16_to_f32((uint16_t)h);
        CHECK_MSG((double)f == ref_f16_value((uint16_t)h), "f16 0x%04X", h);
        CHECK_MSG(tensor_f32_to_f16(f) == h, "round trip 0x%04X", h);
    }
    // f32 -> f16 near every midpoint between consecutive halves (a few f32 ulps either side)
    for (uint32_t h = 0; h < 0x7BFF; h++) {
        float mid = (float)((ref_f16_value((uint16_t)h) + ref_f16_value((uint16_t)(h + 1))) / 2);
        for (int d = -2; d <= 2; d++) {
            float f = fbits(bitsf(mid) + (uint32_t)d);
            if (mid == 0)
                continue;
            CHECK_MSG(tensor_f32_to_f16(f) == ref_f16(f), "f16(%a) = 0x%04X, ref 0x%04X", (double)f,
                      tensor_f32_to_f16(f), ref_f16(f));
            CHECK(tensor_f32_to_f16(-f) == ref_f16(-f));
        }
    }
    // and random f32 patterns over the whole range
    struct lk_rng r;
    lk_rng_seed(&r, 2);
    for (int i = 0; i < 200000; i++) {
        uint32_t u = (uint32_t)lk_rng_u64(&r);
        if (i % 2) // concentrate on the f16 range (exponents 2^-26 .. 2^17)
            u = (u & 0x807FFFFFu) | ((uint32_t)(101 + (i / 2) % 43) << 23);
        float f = fbits(u);
        if (isnan(f) || isinf(f))
            continue;
        CHECK_MSG(tensor_f32_to_f16(f) == ref_f16(f), "f16(0x%08X) = 0x%04X, ref 0x%04X", u,
                  tensor_f32_to_f16(f), ref_f16(f));
    }
}

TEST(tensor_array_conversions)
{
    float src[5] = { 1.0f, -0.5f, 3.0f, 0x1p-24f, 65504.0f };
    uint16_t h[5];
    float back[5];
    tensor_from_f32(h, TENSOR_F16, src, 5);
    tensor_to_f32(back, h, TENSOR_F16, 5);
    for (int i = 0; i < 5; i++)
        CHECK(back[i] == src[i]);
    tensor_from_f32(h, TENSOR_BF16, src, 3);
    CHECK(h[0] == 0x3F80 && h[1] == 0xBF00 && h[2] == 0x4040);
    int64_t i64[2] = { -3, 1 << 20 };
    tensor_to_f32(back, i64, TENSOR_I64, 2);
    CHECK(back[0] == -3.0f && back[1] == 1048576.0f);
    double f64[2] = { 0.25, -1e300 };
    tensor_to_f32(back, f64, TENSOR_F64, 2);
    CHECK(back[0] == 0.25f && isinf(back[1]) && back[1] < 0);
    // unaligned source (a safetensors data area after an odd-length header)
    unsigned char buf[9];
    memcpy(buf + 1, src, 8);
    tensor_to_f32(back, buf + 1, TENSOR_F32, 2);
    CHECK(back[0] == 1.0f && back[1] == -0.5f);
}
