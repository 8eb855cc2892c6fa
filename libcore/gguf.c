/*
 * gguf.c - the GGUF container: dtype conversion (F32, F16, BF16, Q8_0), the validating
 * reader (mmap'd file or a buffer) and the streaming writer. The model and adapter exporters
 * are in gguf_model.c, the tokenizer metadata in gguf_tok.c. Owns: the mapping and the kv and
 * tensor tables of a reader; the serialized metadata and tensor table of a writer.
 */
#include "gguf.h"

#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "tensor.h"

// ---- types ----

struct ttype_info {
    int type;
    const char *name;
    int block;
    size_t bytes;
};

/* Block sizes and bytes per block, from ggml's type_traits (ggml-common.h block structs). */
static const struct ttype_info ttypes[] = {
    { GGUF_T_F32, "f32", 1, 4 },       { GGUF_T_F16, "f16", 1, 2 },        { GGUF_T_Q4_0, "q4_0", 32, 18 },
    { GGUF_T_Q4_1, "q4_1", 32, 20 },   { GGUF_T_Q5_0, "q5_0", 32, 22 },    { GGUF_T_Q5_1, "q5_1", 32, 24 },
    { GGUF_T_Q8_0, "q8_0", 32, 34 },   { GGUF_T_Q8_1, "q8_1", 32, 36 },    { GGUF_T_Q2_K, "q2_K", 256, 84 },
    { GGUF_T_Q3_K, "q3_K", 256, 110 }, { GGUF_T_Q4_K, "q4_K", 256, 144 },  { GGUF_T_Q5_K, "q5_K", 256, 176 },
    { GGUF_T_Q6_K, "q6_K", 256, 210 }, { GGUF_T_Q8_K, "q8_K", 256, 292 },  { GGUF_T_I8, "i8", 1, 1 },
    { GGUF_T_I16, "i16", 1, 2 },       { GGUF_T_I32, "i32", 1, 4 },        { GGUF_T_I64, "i64", 1, 8 },
    { GGUF_T_F64, "f64", 1, 8 },       { GGUF_T_BF16, "bf16", 1, 2 },
};

static const struct ttype_info *ttype_find(int type)
{
    for (size_t i = 0; i < sizeof ttypes / sizeof ttypes[0]; i++)
        if (ttypes[i].type == type)
            return &ttypes[i];
    return NULL;
}

const char *gguf_ttype_name(int type)
{
    const struct ttype_info *ti = ttype_find(type);
    return ti ? ti->name : NULL;
}

int gguf_ttype_block(int type)
{
    const struct ttype_info *ti = ttype_find(type);
    return ti ? ti->block : 0;
}

size_t gguf_ttype_block_bytes(int type)
{
    const struct ttype_info *ti = ttype_find(type);
    return ti ? ti->bytes : 0;
}

int gguf_ttype_parse(const char *s)
{
    static const int writable[] = { GGUF_T_F32, GGUF_T_F16, GGUF_T_BF16, GGUF_T_Q8_0 };
    for (size_t i = 0; s && i < sizeof writable / sizeof writable[0]; i++)
        if (!strcmp(s, gguf_ttype_name(writable[i])))
            return writable[i];
    return -1;
}

uint32_t gguf_ftype_of(int t)
{
    switch (t) { // llama.cpp's enum llama_ftype
    case GGUF_T_F16: return 1;  // LLAMA_FTYPE_MOSTLY_F16
    case GGUF_T_Q8_0: return 7; // LLAMA_FTYPE_MOSTLY_Q8_0
    case GGUF_T_BF16: return 32; // LLAMA_FTYPE_MOSTLY_BF16
    default: return 0;          // LLAMA_FTYPE_ALL_F32
    }
}

size_t gguf_nbytes(int t, size_t n)
{
    const struct ttype_info *ti = ttype_find(t);
    size_t out;
    if (!ti || n % (size_t)ti->block || lk_mul_size(n / (size_t)ti->block, ti->bytes, &out))
        return 0;
    return out;
}

// ---- conversion ----

/* One q8_0 block: d = amax / 127 as an f16, q = roundf(x * (1/d)) (ggml's quantize_row_q8_0_ref,
 * gguf-py's quants.Q8_0: the reciprocal is taken of the unrounded float d). */
static void q8_0_block(uint8_t *dst, const float *x)
{
    float amax = 0;
    for (int j = 0; j < GGUF_QK8_0; j++)
        amax = fmaxf(amax, fabsf(x[j]));
    float d = amax / 127.0f, id = d != 0 ? 1.0f / d : 0.0f;
    uint16_t h = tensor_f32_to_f16(d);
    dst[0] = (uint8_t)(h & 0xff);
    dst[1] = (uint8_t)(h >> 8);
    for (int j = 0; j < GGUF_QK8_0; j++) {
        // roundf (halves away from zero) without the libm call: |v| <= 127.5, so the truncation
        // is exact in int and v - trunc(v) exact in float
        float v = x[j] * id;
        if (!(v > -128.0f && v < 128.0f)) // only NaN gets here (|v| <= 127 + rounding): 0, not UB
            v = 0.0f;
        int q = (int)v;
        float frac = v - (float)q;
        q += (frac >= 0.5f) - (frac <= -0.5f);
        dst[2 + j] = (uint8_t)(int8_t)q;
    }
}

size_t gguf_from_f32(void *dst, int t, const float *src, size_t n)
{
    switch (t) {
    case GGUF_T_F32:
        tensor_from_f32(dst, TENSOR_F32, src, n);
        return n * 4;
    case GGUF_T_F16:
        tensor_from_f32(dst, TENSOR_F16, src, n);
        return n * 2;
    case GGUF_T_BF16:
        tensor_from_f32(dst, TENSOR_BF16, src, n);
        return n * 2;
    case GGUF_T_Q8_0:
        LK_ASSERT(n % GGUF_QK8_0 == 0);
        // blocks are independent: spread over the cores (a merge quantizes the whole model)
#pragma omp parallel for schedule(static) if (n >= 65536)
        for (size_t b = 0; b < n / GGUF_QK8_0; b++)
            q8_0_block((uint8_t *)dst + b * GGUF_Q8_0_BYTES, src + b * GGUF_QK8_0);
        return n / GGUF_QK8_0 * GGUF_Q8_0_BYTES;
    default:
        LK_ASSERT(!"gguf_from_f32: type not writable");
        return 0;
    }
}

void gguf_to_f32(float *dst, int t, const void *src, size_t n)
{
    switch (t) {
    case GGUF_T_F32: tensor_to_f32(dst, src, TENSOR_F32, n); break;
    case GGUF_T_F16: tensor_to_f32(dst, src, TENSOR_F16, n); break;
    case GGUF_T_BF16: tensor_to_f32(dst, src, TENSOR_BF16, n); break;
    case GGUF_T_Q8_0:
        LK_ASSERT(n % GGUF_QK8_0 == 0);
        for (size_t b = 0; b < n / GGUF_QK8_0; b++) {
            const uint8_t *blk = (const uint8_t *)src + b * GGUF_Q8_0_BYTES;
            float d = tensor_f16_to_f32((uint16_t)(blk[0] | blk[1] << 8));
            for (int j = 0; j < GGUF_QK8_0; j++)
                dst[b * GGUF_QK8_0 + (size_t)j] = d * (float)(int8_t)blk[2 + j];
        }
        break;
    default: LK_ASSERT(!"gguf_to_f32: type not readable");
    }
}

// ---- reader ----

static const size_t vt_size[GGUF_VT_COUNT] = { 1, 1, 2, 2, 4, 4, 4, 1, 0, 0, 8, 8, 8 };
static const char *const vt_name[GGUF_VT_COUNT] = { "u8",  "i8",  "u16", "i16", "u32", "i32", "f32",
                                                    "bool", "str", "arr", "u64", "i64", "f64" };

/* A cursor over the bytes being validated; every read checks the bytes left first. */
struct cur {
    const uint8_t *p;
    size_t pos, len;
    const char *name;
    struct lk_err *err;
};

static uint64_t le64(const uint8_t *p)
{
    uint64_t v = 0;
    for (int i = 7; i >= 0; i--)
        v = v << 8 | p[i];
    return v;
}

static uint32_t le32(const uint8_t *p)
{
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

static size_t left(const struct cur *c)
{
    return c->len - c->pos;
}

static int need(struct cur *c, size_t n, const char *what)
{
    if (n > left(c))
        return lk_errf(c->err, LK_ERR_FORMAT, "%s: truncated: %s needs %zu bytes at offset %zu, the file has %zu",
                       c->name, what, n, c->pos, c->len);
    return LK_OK;
}

static int rd_u32(struct cur *c, uint32_t *v, const char *what)
{
    if (need(c, 4, what))
        return c->err->code;
    *v = le32(c->p + c->pos);
    c->pos += 4;
    return LK_OK;
}

static int rd_u64(struct cur *c, uint64_t *v, const char *what)
{
    if (need(c, 8, what))
        return c->err->code;
    *v = le64(c->p + c->pos);
    c->pos += 8;
    return LK_OK;
}

static int rd_str(struct cur *c, struct gguf_str *s, const char *what)
{
    uint64_t n;
    if (rd_u64(c, &n, what))
        return c->err->code;
    if (n > left(c))
        return lk_errf(c->err, LK_ERR_FORMAT, "%s: %s at offset %zu is %llu bytes long, past the end of the file",
                       c->name, what, c->pos - 8, (unsigned long long)n);
    s->p = (const char *)c->p + c->pos;
    s->n = n;
    c->pos += (size_t)n;
    return LK_OK;
}

/* Key and name texts go into messages: at most 64 bytes, control bytes as '?'. */
static const char *show(const struct gguf_str *s, char *buf, size_t n)
{
    size_t k = s->n < n - 1 ? (size_t)s->n : n - 1;
    for (size_t i = 0; i < k; i++)
        buf[i] = (unsigned char)s->p[i] < 32 || s->p[i] == 127 ? '?' : s->p[i];
    buf[k] = 0;
    return buf;
}

static int str_eq(const struct gguf_str *s, const char *z)
{
    size_t n = strlen(z);
    return s->n == n && !memcmp(s->p, z, n);
}

static int str_cmp(const struct gguf_str *a, const struct gguf_str *b)
{
    size_t n = a->n < b->n ? (size_t)a->n : (size_t)b->n;
    int c = memcmp(a->p, b->p, n);
    return c ? c : (a->n > b->n) - (a->n < b->n);
}

/* The value of one kv (type already read): scalars, strings, arrays of either. */
static int rd_value(struct cur *c, struct gguf_kv *kv, const char *key)
{
    if (kv->type == GGUF_VT_ARRAY) {
        uint32_t at;
        if (rd_u32(c, &at, "array type") || rd_u64(c, &kv->n, "array length"))
            return c->err->code;
        if (at >= GGUF_VT_COUNT || at == GGUF_VT_ARRAY)
            return lk_errf(c->err, LK_ERR_FORMAT, "%s: key '%s' is an array of invalid type %u%s", c->name, key,
                           (unsigned)at, at == GGUF_VT_ARRAY ? " (arrays of arrays are not allowed)" : "");
        kv->arr_type = (int)at;
    } else {
        kv->arr_type = kv->type;
        kv->n = 1;
    }
    kv->val = c->p + c->pos;
    if (kv->arr_type != GGUF_VT_STRING) {
        size_t es = vt_size[kv->arr_type];
        if (kv->n > left(c) / es)
            return lk_errf(c->err, LK_ERR_FORMAT, "%s: key '%s' has %llu values of %zu bytes, past the end of the file",
                           c->name, key, (unsigned long long)kv->n, es);
        if (kv->arr_type == GGUF_VT_BOOL)
            for (uint64_t i = 0; i < kv->n; i++)
                if (kv->val[i] > 1)
                    return lk_errf(c->err, LK_ERR_FORMAT, "%s: key '%s' has a boolean byte %u (must be 0 or 1)",
                                   c->name, key, kv->val[i]);
        c->pos += (size_t)kv->n * es;
        return LK_OK;
    }
    if (kv->n > left(c) / 8) // every string needs at least its 8-byte length
        return lk_errf(c->err, LK_ERR_FORMAT, "%s: key '%s' has %llu strings, more than the file can hold", c->name,
                       key, (unsigned long long)kv->n);
    if (kv->type == GGUF_VT_ARRAY) {
        kv->str_off = lk_malloc(sizeof *kv->str_off * (size_t)(kv->n ? kv->n : 1));
        if (!kv->str_off)
            return lk_errf(c->err, LK_ERR_NOMEM, "%s: out of memory for key '%s'", c->name, key);
    }
    for (uint64_t i = 0; i < kv->n; i++) {
        struct gguf_str s;
        if (kv->str_off)
            kv->str_off[i] = (uint64_t)(c->p + c->pos - kv->val);
        if (rd_str(c, &s, "a string value"))
            return lk_err_prefix(c->err, "key '%s'", key);
    }
    return LK_OK;
}

static int rd_kvs(struct gguf_file *f, struct cur *c)
{
    char kb[72];
    for (int64_t i = 0; i < f->n_kv; i++) {
        struct gguf_kv *kv = &f->kv[i];
        uint32_t type;
        if (rd_str(c, &kv->key, "a key") || rd_u32(c, &type, "a value type"))
            return c->err->code;
        show(&kv->key, kb, sizeof kb);
        if (kv->key.n == 0)
            return lk_errf(c->err, LK_ERR_FORMAT, "%s: key %lld is empty", c->name, (long long)i);
        if (type >= GGUF_VT_COUNT)
            return lk_errf(c->err, LK_ERR_FORMAT, "%s: key '%s' has invalid value type %u", c->name, kb, (unsigned)type);
        kv->type = (int)type;
        if (rd_value(c, kv, kb))
            return c->err->code;
    }
    return LK_OK;
}

static const struct gguf_file *sort_file; /* qsort has no context argument; readers are not threaded */

static int cmp_kv_idx(const void *a, const void *b)
{
    return str_cmp(&sort_file->kv[*(const int64_t *)a].key, &sort_file->kv[*(const int64_t *)b].key);
}

static int cmp_t_name(const void *a, const void *b)
{
    return str_cmp(&sort_file->t[*(const int64_t *)a].name, &sort_file->t[*(const int64_t *)b].name);
}

static int cmp_t_off(const void *a, const void *b)
{
    uint64_t x = sort_file->t[*(const int64_t *)a].offset, y = sort_file->t[*(const int64_t *)b].offset;
    return (x > y) - (x < y);
}

/* Indices 0..n-1 sorted by cmp over f (n may be 0); NULL on OOM. */
static int64_t *sorted_idx(const struct gguf_file *f, int64_t n, int (*cmp)(const void *, const void *))
{
    int64_t *ix = lk_malloc(sizeof *ix * (size_t)(n ? n : 1));
    if (!ix)
        return NULL;
    for (int64_t i = 0; i < n; i++)
        ix[i] = i;
    sort_file = f;
    qsort(ix, (size_t)n, sizeof *ix, cmp);
    return ix;
}

/* Sorts the indices of n entries with cmp; *out_dup is one whose entry equals the one before it
 * (a name that appears twice), or -1. */
static int find_dup(const struct gguf_file *f, int64_t n, int (*cmp)(const void *, const void *), struct cur *c,
                    int64_t *out_dup)
{
    int64_t *ix = sorted_idx(f, n, cmp);
    if (!ix)
        return lk_errf(c->err, LK_ERR_NOMEM, "%s: out of memory", c->name);
    *out_dup = -1;
    for (int64_t i = 1; i < n && *out_dup < 0; i++)
        if (!cmp(&ix[i], &ix[i - 1]))
            *out_dup = ix[i];
    lk_free(ix);
    return LK_OK;
}

static int check_keys(struct gguf_file *f, struct cur *c)
{
    char kb[72];
    int64_t d = -1;
    if (find_dup(f, f->n_kv, cmp_kv_idx, c, &d))
        return c->err->code;
    if (d >= 0)
        return lk_errf(c->err, LK_ERR_FORMAT, "%s: key '%s' appears twice", c->name, show(&f->kv[d].key, kb, sizeof kb));
    f->alignment = GGUF_ALIGNMENT;
    const struct gguf_kv *al = gguf_find_kv(f, "general.alignment");
    if (al) {
        if (al->type != GGUF_VT_UINT32)
            return lk_errf(c->err, LK_ERR_FORMAT, "%s: key 'general.alignment' must be a u32", c->name);
        uint32_t a = le32(al->val);
        if (a == 0 || (a & (a - 1)))
            return lk_errf(c->err, LK_ERR_FORMAT, "%s: general.alignment %u is not a power of two", c->name, (unsigned)a);
        f->alignment = a;
    }
    return LK_OK;
}

/* One tensor info: name, dims, type (sizes checked for overflow), offset. */
static int rd_tinfo(struct cur *c, struct gguf_tensor *t, int64_t i)
{
    char nb[72];
    uint32_t nd, type;
    if (rd_str(c, &t->name, "a tensor name"))
        return c->err->code;
    show(&t->name, nb, sizeof nb);
    if (t->name.n == 0 || t->name.n >= GGUF_MAX_NAME)
        return lk_errf(c->err, LK_ERR_FORMAT, "%s: tensor %lld has a name of %llu bytes (must be 1 to %d)", c->name,
                       (long long)i, (unsigned long long)t->name.n, GGUF_MAX_NAME - 1);
    if (rd_u32(c, &nd, "a dimension count"))
        return c->err->code;
    if (nd < 1 || nd > GGUF_MAX_DIMS)
        return lk_errf(c->err, LK_ERR_FORMAT, "%s: tensor '%s' has %u dimensions (must be 1 to %d)", c->name, nb,
                       (unsigned)nd, GGUF_MAX_DIMS);
    t->n_dims = (int)nd;
    size_t numel = 1;
    for (int d = 0; d < GGUF_MAX_DIMS; d++) {
        uint64_t v = 1;
        if (d < t->n_dims && rd_u64(c, &v, "a dimension"))
            return c->err->code;
        if (v > (uint64_t)INT64_MAX || lk_mul_size(numel, (size_t)v, &numel))
            return lk_errf(c->err, LK_ERR_FORMAT, "%s: tensor '%s' has a dimension or element count too large",
                           c->name, nb);
        t->ne[d] = (int64_t)v;
    }
    t->numel = numel;
    if (rd_u32(c, &type, "a tensor type") || rd_u64(c, &t->offset, "a tensor offset"))
        return c->err->code;
    const struct ttype_info *ti = ttype_find((int)type);
    if (!ti)
        return lk_errf(c->err, LK_ERR_UNSUPPORTED, "%s: tensor '%s' has ggml type %u, unknown to lorakit", c->name,
                       nb, (unsigned)type);
    t->type = (int)type;
    if (t->ne[0] % ti->block)
        return lk_errf(c->err, LK_ERR_FORMAT, "%s: tensor '%s' of type %s has rows of %lld values, not a multiple of %d",
                       c->name, nb, ti->name, (long long)t->ne[0], ti->block);
    if (lk_mul_size(numel / (size_t)ti->block, ti->bytes, &t->nbytes))
        return lk_errf(c->err, LK_ERR_FORMAT, "%s: tensor '%s' is too large", c->name, nb);
    return LK_OK;
}

/* Names unique; data aligned, inside the file, not overlapping. */
static int check_tensors(struct gguf_file *f, struct cur *c)
{
    char nb[72];
    int64_t d = -1;
    if (find_dup(f, f->n_tensors, cmp_t_name, c, &d))
        return c->err->code;
    if (d >= 0)
        return lk_errf(c->err, LK_ERR_FORMAT, "%s: tensor '%s' appears twice", c->name, show(&f->t[d].name, nb, sizeof nb));
    size_t room = c->len > f->data_off ? c->len - f->data_off : 0;
    for (int64_t i = 0; i < f->n_tensors; i++) {
        struct gguf_tensor *t = &f->t[i];
        show(&t->name, nb, sizeof nb);
        if (t->offset % f->alignment)
            return lk_errf(c->err, LK_ERR_FORMAT, "%s: tensor '%s' has offset %llu, not a multiple of the alignment %zu",
                           c->name, nb, (unsigned long long)t->offset, f->alignment);
        if (t->offset > room || t->nbytes > room - (size_t)t->offset)
            return lk_errf(c->err, LK_ERR_FORMAT, "%s: tensor '%s' data (%zu bytes at offset %llu of the data area) "
                           "ends past the end of the file (%zu bytes)", c->name, nb, t->nbytes,
                           (unsigned long long)t->offset, c->len);
        t->data = c->p + f->data_off + t->offset;
    }
    int64_t *ix = sorted_idx(f, f->n_tensors, cmp_t_off);
    if (!ix)
        return lk_errf(c->err, LK_ERR_NOMEM, "%s: out of memory", c->name);
    char nb2[72];
    int rc = LK_OK;
    for (int64_t i = 1; i < f->n_tensors && !rc; i++) {
        const struct gguf_tensor *a = &f->t[ix[i - 1]], *b = &f->t[ix[i]];
        if (b->offset < a->offset + a->nbytes)
            rc = lk_errf(c->err, LK_ERR_FORMAT, "%s: tensor '%s' (offset %llu) overlaps tensor '%s'", c->name,
                         show(&b->name, nb, sizeof nb), (unsigned long long)b->offset, show(&a->name, nb2, sizeof nb2));
    }
    lk_free(ix);
    return rc;
}

static int parse(struct gguf_file *f, struct cur *c)
{
    uint32_t magic;
    uint64_t nt, nkv;
    if (rd_u32(c, &magic, "the magic"))
        return c->err->code;
    if (magic != 0x46554747u)
        return lk_errf(c->err, LK_ERR_FORMAT, "%s: not a GGUF file (the first 4 bytes are not 'GGUF')", c->name);
    if (rd_u32(c, &f->version, "the version"))
        return c->err->code;
    if (f->version != 2 && f->version != 3)
        return lk_errf(c->err, LK_ERR_UNSUPPORTED, "%s: GGUF version %u is not supported (2 and 3 are)", c->name,
                       (unsigned)f->version);
    if (rd_u64(c, &nt, "the tensor count") || rd_u64(c, &nkv, "the key count"))
        return c->err->code;
    // smallest possible entries: a kv is 8 + 1 + 4 + 1 bytes, a tensor info 8 + 1 + 4 + 8 + 4 + 8
    if (nkv > left(c) / 14 || nt > left(c) / 33)
        return lk_errf(c->err, LK_ERR_FORMAT, "%s: header claims %llu keys and %llu tensors, more than %zu bytes can hold",
                       c->name, (unsigned long long)nkv, (unsigned long long)nt, c->len);
    f->n_kv = (int64_t)nkv;
    f->n_tensors = (int64_t)nt;
    f->kv = lk_calloc((size_t)nkv + 1, sizeof *f->kv);
    f->t = lk_calloc((size_t)nt + 1, sizeof *f->t);
    if (!f->kv || !f->t)
        return lk_errf(c->err, LK_ERR_NOMEM, "%s: out of memory", c->name);
    if (rd_kvs(f, c) || check_keys(f, c))
        return c->err->code;
    for (int64_t i = 0; i < f->n_tensors; i++)
        if (rd_tinfo(c, &f->t[i], i))
            return c->err->code;
    f->data_off = (c->pos + f->alignment - 1) / f->alignment * f->alignment;
    if (f->n_tensors > 0 && f->data_off > c->len)
        return lk_errf(c->err, LK_ERR_FORMAT, "%s: truncated: the data area would start at byte %zu, past the end (%zu)",
                       c->name, f->data_off, c->len);
    return check_tensors(f, c);
}

int gguf_open_buffer(struct gguf_file *f, const void *buf, size_t len, const char *name, struct lk_err *err)
{
    memset(f, 0, sizeof *f);
    f->path = lk_strdup(name);
    if (!f->path)
        return lk_errf(err, LK_ERR_NOMEM, "out of memory");
    f->base = buf;
    f->map_len = len;
    struct cur c = { buf, 0, len, f->path, err };
    int rc = parse(f, &c);
    if (rc)
        gguf_close(f);
    return rc;
}

int gguf_open(struct gguf_file *f, const char *path, struct lk_err *err)
{
    memset(f, 0, sizeof *f);
    int fd = open(path, O_RDONLY);
    if (fd < 0)
        return lk_errf(err, errno == ENOENT ? LK_ERR_MISSING : LK_ERR_IO, "%s: cannot open: %s", path, strerror(errno));
    struct stat st;
    if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
        close(fd);
        return lk_errf(err, LK_ERR_IO, "%s: not a regular file", path);
    }
    if (st.st_size == 0) {
        close(fd);
        return lk_errf(err, LK_ERR_FORMAT, "%s: empty file", path);
    }
    void *map = mmap(NULL, (size_t)st.st_size, PROT_READ, MAP_PRIVATE, fd, 0);
    close(fd);
    if (map == MAP_FAILED)
        return lk_errf(err, LK_ERR_IO, "%s: mmap failed: %s", path, strerror(errno));
    int rc = gguf_open_buffer(f, map, (size_t)st.st_size, path, err);
    if (rc) {
        munmap(map, (size_t)st.st_size);
        return rc;
    }
    f->map = map;
    return LK_OK;
}

void gguf_close(struct gguf_file *f)
{
    if (!f)
        return;
    if (f->kv)
        for (int64_t i = 0; i < f->n_kv; i++)
            lk_free(f->kv[i].str_off);
    lk_free(f->kv);
    lk_free(f->t);
    if (f->map)
        munmap(f->map, f->map_len);
    lk_free(f->path);
    memset(f, 0, sizeof *f);
}

const struct gguf_kv *gguf_find_kv(const struct gguf_file *f, const char *key)
{
    for (int64_t i = 0; i < f->n_kv; i++)
        if (str_eq(&f->kv[i].key, key))
            return &f->kv[i];
    return NULL;
}

const struct gguf_tensor *gguf_find_tensor(const struct gguf_file *f, const char *name)
{
    for (int64_t i = 0; i < f->n_tensors; i++)
        if (str_eq(&f->t[i].name, name))
            return &f->t[i];
    return NULL;
}

struct gguf_str gguf_arr_str(const struct gguf_kv *kv, uint64_t i)
{
    const uint8_t *p = kv->str_off ? kv->val + kv->str_off[i] : kv->val;
    struct gguf_str s = { (const char *)p + 8, le64(p) };
    return s;
}

double gguf_arr_num(const struct gguf_kv *kv, uint64_t i)
{
    const uint8_t *p = kv->val + i * vt_size[kv->arr_type];
    float f32;
    double f64;
    switch (kv->arr_type) {
    case GGUF_VT_UINT8: case GGUF_VT_BOOL: return p[0];
    case GGUF_VT_INT8: return (int8_t)p[0];
    case GGUF_VT_UINT16: return (uint16_t)(p[0] | p[1] << 8);
    case GGUF_VT_INT16: return (int16_t)(uint16_t)(p[0] | p[1] << 8);
    case GGUF_VT_UINT32: return le32(p);
    case GGUF_VT_INT32: return (int32_t)le32(p);
    case GGUF_VT_UINT64: return (double)le64(p);
    case GGUF_VT_INT64: return (double)(int64_t)le64(p);
    case GGUF_VT_FLOAT32: {
        uint32_t u = le32(p);
        memcpy(&f32, &u, 4);
        return f32;
    }
    case GGUF_VT_FLOAT64: {
        uint64_t u = le64(p);
        memcpy(&f64, &u, 8);
        return f64;
    }
    default: return NAN;
    }
}

void gguf_kv_type_str(const struct gguf_kv *kv, char *buf, size_t n)
{
    if (kv->type == GGUF_VT_ARRAY)
        snprintf(buf, n, "arr[%s,%llu]", vt_name[kv->arr_type], (unsigned long long)kv->n);
    else
        snprintf(buf, n, "%s", vt_name[kv->type]);
}

static int get_kv(const struct gguf_file *f, const char *key, const struct gguf_kv **out, struct lk_err *err)
{
    *out = gguf_find_kv(f, key);
    if (!*out)
        return lk_errf(err, LK_ERR_MISSING, "%s: key '%s' is missing", f->path, key);
    return LK_OK;
}

static int wrong_type(const struct gguf_file *f, const struct gguf_kv *kv, const char *key, const char *want,
                      struct lk_err *err)
{
    char tb[48];
    gguf_kv_type_str(kv, tb, sizeof tb);
    return lk_errf(err, LK_ERR_FORMAT, "%s: key '%s' is %s, expected %s", f->path, key, tb, want);
}

int gguf_get_str(const struct gguf_file *f, const char *key, char **out_s, struct lk_err *err)
{
    const struct gguf_kv *kv;
    if (get_kv(f, key, &kv, err))
        return err->code;
    if (kv->type != GGUF_VT_STRING)
        return wrong_type(f, kv, key, "a string", err);
    struct gguf_str s = gguf_arr_str(kv, 0);
    char *p = lk_malloc((size_t)s.n + 1);
    if (!p)
        return lk_errf(err, LK_ERR_NOMEM, "out of memory");
    memcpy(p, s.p, (size_t)s.n);
    p[s.n] = 0;
    *out_s = p;
    return LK_OK;
}

int gguf_get_uint(const struct gguf_file *f, const char *key, uint64_t *out, struct lk_err *err)
{
    const struct gguf_kv *kv;
    if (get_kv(f, key, &kv, err))
        return err->code;
    int t = kv->type;
    int is_int = t == GGUF_VT_UINT8 || t == GGUF_VT_INT8 || t == GGUF_VT_UINT16 || t == GGUF_VT_INT16 ||
                 t == GGUF_VT_UINT32 || t == GGUF_VT_INT32 || t == GGUF_VT_UINT64 || t == GGUF_VT_INT64;
    if (!is_int)
        return wrong_type(f, kv, key, "an integer", err);
    if (t == GGUF_VT_UINT64) {
        *out = le64(kv->val);
        return LK_OK;
    }
    double v = gguf_arr_num(kv, 0);
    if (v < 0)
        return lk_errf(err, LK_ERR_FORMAT, "%s: key '%s' is negative (%.0f)", f->path, key, v);
    *out = (uint64_t)v;
    return LK_OK;
}

int gguf_get_float(const struct gguf_file *f, const char *key, double *out, struct lk_err *err)
{
    const struct gguf_kv *kv;
    if (get_kv(f, key, &kv, err))
        return err->code;
    if (kv->type != GGUF_VT_FLOAT32 && kv->type != GGUF_VT_FLOAT64)
        return wrong_type(f, kv, key, "a float", err);
    *out = gguf_arr_num(kv, 0);
    return LK_OK;
}

int gguf_get_bool(const struct gguf_file *f, const char *key, int *out, struct lk_err *err)
{
    const struct gguf_kv *kv;
    if (get_kv(f, key, &kv, err))
        return err->code;
    if (kv->type != GGUF_VT_BOOL)
        return wrong_type(f, kv, key, "a bool", err);
    *out = kv->val[0];
    return LK_OK;
}

int gguf_tensor_rows_f32(const struct gguf_file *f, const struct gguf_tensor *t, int64_t row0, int64_t nrows,
                         float *out, struct lk_err *err)
{
    char nb[72];
    if (t->type != GGUF_T_F32 && t->type != GGUF_T_F16 && t->type != GGUF_T_BF16 && t->type != GGUF_T_Q8_0)
        return lk_errf(err, LK_ERR_UNSUPPORTED, "%s: tensor '%s' has type %s: lorakit reads f32, f16, bf16 and q8_0",
                       f->path, show(&t->name, nb, sizeof nb), gguf_ttype_name(t->type));
    int64_t rows = t->ne[0] ? (int64_t)(t->numel / (size_t)t->ne[0]) : 0;
    LK_ASSERT(row0 >= 0 && nrows >= 0 && row0 + nrows <= rows);
    size_t row_bytes = gguf_nbytes(t->type, (size_t)t->ne[0]);
    gguf_to_f32(out, t->type, t->data + (size_t)row0 * row_bytes, (size_t)(nrows * t->ne[0]));
    return LK_OK;
}

int gguf_is_file(const char *path)
{
    if (!path || lk_is_dir(path))
        return 0;
    size_t n = strlen(path);
    if (n >= 5 && !strcmp(path + n - 5, ".gguf"))
        return 1;
    FILE *fp = fopen(path, "rb");
    char magic[4];
    int yes = fp && fread(magic, 1, sizeof magic, fp) == sizeof magic && !memcmp(magic, "GGUF", 4);
    if (fp)
        fclose(fp);
    return yes;
}

// ---- writer ----

static void put_u32(struct lk_buf *b, uint32_t v)
{
    char x[4] = { (char)(v & 0xff), (char)(v >> 8 & 0xff), (char)(v >> 16 & 0xff), (char)(v >> 24) };
    lk_buf_put(b, x, 4);
}

static void put_u64(struct lk_buf *b, uint64_t v)
{
    char x[8];
    for (int i = 0; i < 8; i++)
        x[i] = (char)(v >> (8 * i) & 0xff);
    lk_buf_put(b, x, 8);
}

static void put_str(struct lk_buf *b, const char *s, size_t n)
{
    put_u64(b, n);
    lk_buf_put(b, s, n);
}

int gguf_writer_init(struct gguf_writer *w, const char *path, struct lk_err *err)
{
    memset(w, 0, sizeof *w);
    w->err = err;
    if (err->code)
        return err->code;
    return lk_afile_open(&w->af, path, err);
}

/* Starts a kv: checks state and uniqueness, writes the key and type. */
static int kv_begin(struct gguf_writer *w, const char *key, int type)
{
    if (w->err->code)
        return w->err->code;
    LK_ASSERT(!w->begun);
    size_t n = strlen(key);
    // keys are few (tens); a linear scan over the serialized buffer is the simple check
    for (size_t pos = 0; pos + 8 <= w->kv.n;) {
        uint64_t kn = le64((const uint8_t *)w->kv.p + pos);
        if (kn == n && !memcmp(w->kv.p + pos + 8, key, n))
            return lk_errf(w->err, LK_ERR_USAGE, "%s: key '%s' written twice", w->af.path, key);
        pos += 8 + (size_t)kn;
        uint32_t t = le32((const uint8_t *)w->kv.p + pos);
        pos += 4;
        if (t == GGUF_VT_STRING) {
            pos += 8 + (size_t)le64((const uint8_t *)w->kv.p + pos);
        } else if (t == GGUF_VT_ARRAY) {
            uint32_t at = le32((const uint8_t *)w->kv.p + pos);
            uint64_t cnt = le64((const uint8_t *)w->kv.p + pos + 4);
            pos += 12;
            if (at == GGUF_VT_STRING)
                for (uint64_t i = 0; i < cnt; i++)
                    pos += 8 + (size_t)le64((const uint8_t *)w->kv.p + pos);
            else
                pos += (size_t)cnt * vt_size[at];
        } else {
            pos += vt_size[t];
        }
    }
    put_str(&w->kv, key, n);
    put_u32(&w->kv, (uint32_t)type);
    w->n_kv++;
    return LK_OK;
}

static int kv_end(struct gguf_writer *w)
{
    if (w->kv.oom)
        return lk_errf(w->err, LK_ERR_NOMEM, "%s: out of memory for the metadata", w->af.path);
    return w->err->code;
}

int gguf_writer_str(struct gguf_writer *w, const char *key, const char *val)
{
    if (kv_begin(w, key, GGUF_VT_STRING))
        return w->err->code;
    put_str(&w->kv, val, strlen(val));
    return kv_end(w);
}

int gguf_writer_u32(struct gguf_writer *w, const char *key, uint32_t val)
{
    if (kv_begin(w, key, GGUF_VT_UINT32))
        return w->err->code;
    put_u32(&w->kv, val);
    return kv_end(w);
}

int gguf_writer_f32(struct gguf_writer *w, const char *key, float val)
{
    if (kv_begin(w, key, GGUF_VT_FLOAT32))
        return w->err->code;
    uint32_t u;
    memcpy(&u, &val, 4);
    put_u32(&w->kv, u);
    return kv_end(w);
}

int gguf_writer_bool(struct gguf_writer *w, const char *key, int val)
{
    if (kv_begin(w, key, GGUF_VT_BOOL))
        return w->err->code;
    char b = val ? 1 : 0;
    lk_buf_put(&w->kv, &b, 1);
    return kv_end(w);
}

int gguf_writer_arr_str(struct gguf_writer *w, const char *key, const char *const *v, const size_t *lens, size_t n)
{
    if (kv_begin(w, key, GGUF_VT_ARRAY))
        return w->err->code;
    put_u32(&w->kv, GGUF_VT_STRING);
    put_u64(&w->kv, n);
    for (size_t i = 0; i < n; i++)
        put_str(&w->kv, v[i], lens ? lens[i] : strlen(v[i]));
    return kv_end(w);
}

int gguf_writer_arr_i32(struct gguf_writer *w, const char *key, const int32_t *v, size_t n)
{
    if (kv_begin(w, key, GGUF_VT_ARRAY))
        return w->err->code;
    put_u32(&w->kv, GGUF_VT_INT32);
    put_u64(&w->kv, n);
    for (size_t i = 0; i < n; i++)
        put_u32(&w->kv, (uint32_t)v[i]);
    return kv_end(w);
}

int gguf_writer_declare(struct gguf_writer *w, const char *name, int type, int n_dims, const int64_t *ne)
{
    if (w->err->code)
        return w->err->code;
    LK_ASSERT(!w->begun && n_dims >= 1 && n_dims <= GGUF_MAX_DIMS);
    LK_ASSERT(type == GGUF_T_F32 || type == GGUF_T_F16 || type == GGUF_T_BF16 || type == GGUF_T_Q8_0);
    if (strlen(name) >= GGUF_MAX_NAME)
        return lk_errf(w->err, LK_ERR_USAGE, "%s: tensor name '%s' is %zu bytes; llama.cpp allows %d", w->af.path,
                       name, strlen(name), GGUF_MAX_NAME - 1);
    for (int i = 0; i < w->n; i++)
        if (!strcmp(w->t[i].name, name))
            return lk_errf(w->err, LK_ERR_USAGE, "%s: tensor '%s' declared twice", w->af.path, name);
    if (w->n == w->cap) {
        int cap = w->cap ? w->cap * 2 : 64;
        struct gguf_wtensor *t = lk_realloc(w->t, sizeof *t * (size_t)cap);
        if (!t)
            return lk_errf(w->err, LK_ERR_NOMEM, "out of memory");
        w->t = t;
        w->cap = cap;
    }
    struct gguf_wtensor *t = &w->t[w->n];
    memset(t, 0, sizeof *t);
    snprintf(t->name, sizeof t->name, "%s", name);
    t->n_dims = n_dims;
    t->type = type;
    size_t numel = 1;
    for (int d = 0; d < GGUF_MAX_DIMS; d++) {
        t->ne[d] = d < n_dims ? ne[d] : 1;
        if (t->ne[d] < 0 || lk_mul_size(numel, (size_t)t->ne[d], &numel))
            return lk_errf(w->err, LK_ERR_USAGE, "%s: tensor '%s' has a bad shape", w->af.path, name);
    }
    if (t->ne[0] % gguf_ttype_block(type))
        return lk_errf(w->err, LK_ERR_USAGE, "%s: tensor '%s' has rows of %lld values: %s needs a multiple of %d",
                       w->af.path, name, (long long)t->ne[0], gguf_ttype_name(type), gguf_ttype_block(type));
    t->numel = numel;
    t->nbytes = gguf_nbytes(type, numel);
    if (numel && !t->nbytes)
        return lk_errf(w->err, LK_ERR_USAGE, "%s: tensor '%s' is too large", w->af.path, name);
    w->n++;
    return LK_OK;
}

static size_t pad_to(size_t n, size_t a)
{
    return (n + a - 1) / a * a;
}

static int write_zeros(struct gguf_writer *w, size_t n)
{
    static const char zeros[GGUF_ALIGNMENT];
    LK_ASSERT(n <= sizeof zeros);
    return lk_afile_write(&w->af, zeros, n);
}

int gguf_writer_begin(struct gguf_writer *w)
{
    if (w->err->code)
        return w->err->code;
    LK_ASSERT(!w->begun);
    struct lk_buf h = { 0 };
    lk_buf_put(&h, "GGUF", 4);
    put_u32(&h, GGUF_VERSION);
    put_u64(&h, (uint64_t)w->n);
    put_u64(&h, (uint64_t)w->n_kv);
    lk_buf_put(&h, w->kv.p ? w->kv.p : "", w->kv.n);
    size_t off = 0;
    for (int i = 0; i < w->n; i++) {
        const struct gguf_wtensor *t = &w->t[i];
        put_str(&h, t->name, strlen(t->name));
        put_u32(&h, (uint32_t)t->n_dims);
        for (int d = 0; d < t->n_dims; d++)
            put_u64(&h, (uint64_t)t->ne[d]);
        put_u32(&h, (uint32_t)t->type);
        put_u64(&h, off);
        off += pad_to(t->nbytes, GGUF_ALIGNMENT);
    }
    if (h.oom) {
        lk_buf_release(&h);
        return lk_errf(w->err, LK_ERR_NOMEM, "%s: out of memory for the header", w->af.path);
    }
    lk_afile_write(&w->af, h.p, h.n);
    write_zeros(w, pad_to(h.n, GGUF_ALIGNMENT) - h.n);
    lk_buf_release(&h);
    w->begun = 1;
    return w->err->code;
}

/* Finishes tensors that are complete (and any following empty ones): padding, next. */
static void advance(struct gguf_writer *w)
{
    while (w->next < w->n && w->part == w->t[w->next].numel) {
        size_t nb = w->t[w->next].nbytes;
        write_zeros(w, pad_to(nb, GGUF_ALIGNMENT) - nb);
        w->written += pad_to(nb, GGUF_ALIGNMENT);
        w->next++;
        w->part = 0;
    }
}

int gguf_writer_write(struct gguf_writer *w, const float *src, size_t n)
{
    if (w->err->code)
        return w->err->code;
    LK_ASSERT(w->begun);
    advance(w);
    if (w->next >= w->n)
        return lk_errf(w->err, LK_ERR_USAGE, "%s: more data than the declared tensors hold", w->af.path);
    const struct gguf_wtensor *t = &w->t[w->next];
    if (n > t->numel - w->part)
        return lk_errf(w->err, LK_ERR_USAGE, "%s: tensor '%s' given %zu values, %zu left", w->af.path, t->name, n,
                       t->numel - w->part);
    if (t->type == GGUF_T_Q8_0 && n % GGUF_QK8_0)
        return lk_errf(w->err, LK_ERR_USAGE, "%s: tensor '%s' (q8_0) written in a piece of %zu values, not whole blocks",
                       w->af.path, t->name, n);
    size_t need_bytes = gguf_nbytes(t->type, n);
    if (need_bytes > w->scratch_len) {
        void *s = lk_realloc(w->scratch, need_bytes);
        if (!s)
            return lk_errf(w->err, LK_ERR_NOMEM, "out of memory");
        w->scratch = s;
        w->scratch_len = need_bytes;
    }
    size_t nb = gguf_from_f32(w->scratch, t->type, src, n);
    lk_afile_write(&w->af, w->scratch, nb);
    w->part += n;
    advance(w);
    return w->err->code;
}

static void writer_free(struct gguf_writer *w)
{
    lk_buf_release(&w->kv);
    lk_free(w->t);
    lk_free(w->scratch);
    w->t = NULL;
    w->scratch = NULL;
    w->n = w->cap = 0;
}

int gguf_writer_commit(struct gguf_writer *w)
{
    if (!w->err->code && !w->begun)
        gguf_writer_begin(w);
    if (!w->err->code)
        advance(w);
    if (!w->err->code && w->next < w->n)
        lk_errf(w->err, LK_ERR_USAGE, "%s: tensor '%s' was not written (%d of %d done)", w->af.path,
                w->t[w->next].name, w->next, w->n);
    if (w->err->code) {
        gguf_writer_abort(w);
        return w->err->code;
    }
    int rc = lk_afile_commit(&w->af);
    writer_free(w);
    return rc;
}

void gguf_writer_abort(struct gguf_writer *w)
{
    lk_afile_abort(&w->af);
    writer_free(w);
}
