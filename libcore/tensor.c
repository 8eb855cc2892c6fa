/*
 * tensor.c - dtype names and sizes, and the float conversions: f32 <-> bf16 and f32 <-> f16,
 * rounding to nearest even, NaN kept (quiet, sign kept), +-Inf kept, f16 subnormals both ways,
 * overflow to Inf. Pure integer bit manipulation, so the results do not depend on the FPU's
 * rounding mode or on compiler flags. Owns nothing.
 */
#include "tensor.h"

#include <string.h>

#include "lk.h"

static const struct {
    const char *name;
    size_t size;
} tensor_dtypes[TENSOR_DTYPE_COUNT] = {
    [TENSOR_F32] = { "F32", 4 }, [TENSOR_F16] = { "F16", 2 },   [TENSOR_BF16] = { "BF16", 2 },
    [TENSOR_I32] = { "I32", 4 }, [TENSOR_I64] = { "I64", 8 },   [TENSOR_F64] = { "F64", 8 },
    [TENSOR_U8] = { "U8", 1 },   [TENSOR_I8] = { "I8", 1 },     [TENSOR_BOOL] = { "BOOL", 1 },
    [TENSOR_I16] = { "I16", 2 },
};

const char *tensor_dtype_name(enum tensor_dtype d)
{
    if ((int)d < 0 || d >= TENSOR_DTYPE_COUNT)
        return NULL;
    return tensor_dtypes[d].name;
}

int tensor_dtype_parse(const char *s)
{
    for (int i = 0; i < TENSOR_DTYPE_COUNT; i++)
        if (!strcmp(s, tensor_dtypes[i].name))
            return i;
    return -1;
}

size_t tensor_dtype_size(enum tensor_dtype d)
{
    if ((int)d < 0 || d >= TENSOR_DTYPE_COUNT)
        return 0;
    return tensor_dtypes[d].size;
}

int tensor_dtype_is_float(enum tensor_dtype d)
{
    return d == TENSOR_F32 || d == TENSOR_F16 || d == TENSOR_BF16;
}

// ---- scalar conversions ----

static uint32_t f32_bits(float f)
{
    uint32_t u;
    memcpy(&u, &f, 4);
    return u;
}

static float bits_f32(uint32_t u)
{
    float f;
    memcpy(&f, &u, 4);
    return f;
}

float tensor_bf16_to_f32(uint16_t h)
{
    return bits_f32((uint32_t)h << 16); // bf16 is the top half of an f32: exact
}

uint16_t tensor_f32_to_bf16(float f)
{
    uint32_t u = f32_bits(f);
    if ((u & 0x7FFFFFFFu) > 0x7F800000u) // NaN: keep sign and top payload, force the quiet bit
        return (uint16_t)((u >> 16) | 0x0040u);
    // round to nearest even on the 16 dropped bits: adding 0x7FFF rounds halfway cases down,
    // plus the kept lsb rounds them up exactly when that lsb is odd. A carry into the exponent
    // is the correct next binade; FLT_MAX carries into 0x7F80 = Inf (overflow to Inf).
    u += 0x7FFFu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

float tensor_f16_to_f32(uint16_t h)
{
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    uint32_t exp = (h >> 10) & 0x1Fu, mant = h & 0x3FFu;
    if (exp == 0x1F) // Inf, or NaN made quiet with its payload kept
        return bits_f32(sign | 0x7F800000u | (mant << 13) | (mant ? 0x00400000u : 0));
    if (exp == 0) {
        if (mant == 0)
            return bits_f32(sign);
        // subnormal: mant * 2^-24; normalize so the leading 1 becomes the implicit bit
        int e = -14;
        while (!(mant & 0x400u)) {
            mant <<= 1;
            e--;
        }
        mant &= 0x3FFu;
        return bits_f32(sign | ((uint32_t)(e + 127) << 23) | (mant << 13));
    }
    return bits_f32(sign | ((exp + 112u) << 23) | (mant << 13)); // rebias 15 -> 127
}

/* Shifts m right by s bits (1 <= s <= 31), rounding to nearest even. */
static uint32_t shift_rne(uint32_t m, int s)
{
    uint32_t q = m >> s, rem = m & ((1u << s) - 1), half = 1u << (s - 1);
    if (rem > half || (rem == half && (q & 1u)))
        q++;
    return q;
}

uint16_t tensor_f32_to_f16(float f)
{
    uint32_t u = f32_bits(f);
    uint16_t sign = (uint16_t)((u >> 16) & 0x8000u);
    uint32_t a = u & 0x7FFFFFFFu;
    if (a > 0x7F800000u) // NaN: quiet, sign and top payload bits kept
        return (uint16_t)(sign | 0x7E00u | ((a >> 13) & 0x3FFu));
    if (a >= 0x477FF000u) // >= 65520 (halfway above 65504, ties to the even Inf), and Inf
        return (uint16_t)(sign | 0x7C00u);
    if (a >= 0x38800000u) // >= 2^-14: a normal half. Rebias the exponent, round 13 bits away;
        // a carry out of the mantissa correctly bumps the exponent.
        return (uint16_t)(sign | shift_rne(a - 0x38000000u, 13));
    // subnormal half (or zero): value = m * 2^(e-23) with the implicit bit, in units of 2^-24
    int e = (int)(a >> 23) - 127;
    int s = -e - 1; // m * 2^(e-23) / 2^-24 = m >> s
    if (s > 24)     // below 2^-25: rounds to zero (2^-25 itself is a tie, also to zero)
        return sign;
    uint32_t m = (a & 0x7FFFFFu) | 0x800000u;
    return (uint16_t)(sign | shift_rne(m, s)); // may round up to 0x0400, the smallest normal
}

// ---- arrays ----

void tensor_to_f32(float *dst, const void *src, enum tensor_dtype src_dtype, size_t n)
{
    const unsigned char *p = src; // may be unaligned (a safetensors header of odd length)
    switch (src_dtype) {
    case TENSOR_F32:
        memcpy(dst, src, n * 4);
        return;
    case TENSOR_BF16:
        for (size_t i = 0; i < n; i++) {
            uint16_t h;
            memcpy(&h, p + 2 * i, 2);
            dst[i] = tensor_bf16_to_f32(h);
        }
        return;
    case TENSOR_F16:
        for (size_t i = 0; i < n; i++) {
            uint16_t h;
            memcpy(&h, p + 2 * i, 2);
            dst[i] = tensor_f16_to_f32(h);
        }
        return;
    case TENSOR_F64:
        for (size_t i = 0; i < n; i++) {
            double d;
            memcpy(&d, p + 8 * i, 8);
            dst[i] = (float)d;
        }
        return;
    case TENSOR_I64:
        for (size_t i = 0; i < n; i++) {
            int64_t v;
            memcpy(&v, p + 8 * i, 8);
            dst[i] = (float)v;
        }
        return;
    case TENSOR_I32:
        for (size_t i = 0; i < n; i++) {
            int32_t v;
            memcpy(&v, p + 4 * i, 4);
            dst[i] = (float)v;
        }
        return;
    case TENSOR_I16:
        for (size_t i = 0; i < n; i++) {
            int16_t v;
            memcpy(&v, p + 2 * i, 2);
            dst[i] = (float)v;
        }
        return;
    case TENSOR_I8:
        for (size_t i = 0; i < n; i++)
            dst[i] = (float)(int8_t)p[i];
        return;
    case TENSOR_U8:
    case TENSOR_BOOL:
        for (size_t i = 0; i < n; i++)
            dst[i] = (float)p[i];
        return;
    case TENSOR_DTYPE_COUNT:
        break;
    }
    LK_ASSERT(!"tensor_to_f32: bad dtype");
}

void tensor_from_f32(void *dst, enum tensor_dtype dst_dtype, const float *src, size_t n)
{
    unsigned char *p = dst;
    switch (dst_dtype) {
    case TENSOR_F32:
        memcpy(dst, src, n * 4);
        return;
    case TENSOR_BF16:
        for (size_t i = 0; i < n; i++) {
            uint16_t h = tensor_f32_to_bf16(src[i]);
            memcpy(p + 2 * i, &h, 2);
        }
        return;
    case TENSOR_F16:
        for (size_t i = 0; i < n; i++) {
            uint16_t h = tensor_f32_to_f16(src[i]);
            memcpy(p + 2 * i, &h, 2);
        }
        return;
    default:
        break;
    }
    LK_ASSERT(!"tensor_from_f32: dtype must be F32, F16 or BF16");
}
