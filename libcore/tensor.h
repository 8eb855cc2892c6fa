/*
 * tensor.h - dtypes and conversions. Conversions to bf16/f16 round to nearest even and keep
 * NaN (quiet) and +-Inf; f16 handles subnormals both ways.
 */
#ifndef LK_TENSOR_H
#define LK_TENSOR_H

#include <stddef.h>
#include <stdint.h>

enum tensor_dtype {
    TENSOR_F32 = 0,
    TENSOR_F16,
    TENSOR_BF16,
    TENSOR_I32,
    TENSOR_I64,
    TENSOR_F64,
    TENSOR_U8,
    TENSOR_I8,
    TENSOR_BOOL,
    TENSOR_I16,
    TENSOR_DTYPE_COUNT
};

/* "F32", "BF16", ... as in the safetensors header; NULL for an unknown value. */
const char *tensor_dtype_name(enum tensor_dtype d);
/* Parses a safetensors dtype string; -1 when unknown. */
int tensor_dtype_parse(const char *s);
size_t tensor_dtype_size(enum tensor_dtype d);
/* 1 for F32, F16, BF16 (the dtypes lorakit computes with). */
int tensor_dtype_is_float(enum tensor_dtype d);

float tensor_bf16_to_f32(uint16_t h);
uint16_t tensor_f32_to_bf16(float f);
float tensor_f16_to_f32(uint16_t h);
uint16_t tensor_f32_to_f16(float f);

/* n elements of src (F32, F16 or BF16; also F64/I32/I64 read) into float32 dst. */
void tensor_to_f32(float *dst, const void *src, enum tensor_dtype src_dtype, size_t n);
/* n float32 values into dst of dtype F32, F16 or BF16, rounding once. */
void tensor_from_f32(void *dst, enum tensor_dtype dst_dtype, const float *src, size_t n);

#endif
