/*
 * st.h - the safetensors format: an mmap'd, fully validated reader, a streaming atomic
 * writer, and sharded checkpoints (model.safetensors.index.json).
 *
 * File layout: u64 little-endian header length N, N bytes of UTF-8 JSON
 * {name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__": {str: str}},
 * then the data area; offsets are relative to the byte after the header.
 *
 * st_open validates everything before any tensor is used: the header length lies within
 * the file, the JSON is well formed, each dtype is known, byte size = product(shape) x dtype
 * size (overflow-checked), every tensor lies inside the data area, tensors do not overlap,
 * names are unique, the data area is covered exactly (no gaps, no trailing bytes, as the
 * Rust safetensors crate requires), shape entries are non-negative integers, ndim <=
 * ST_MAX_DIMS, `__metadata__` holds only strings, the header is valid UTF-8 of at most
 * ST_MAX_HEADER bytes. A failure names the file and the problem, and the tensor when there
 * is one: "model.safetensors: tensor 'lm_head.weight' has unknown dtype 'F8_E4M3'".
 *
 * Alignment: data pointers are only as aligned as the file makes them. Our writer (like the
 * Python library) pads the header with spaces to a multiple of 8, so the data area starts
 * 8-aligned and a tensor is aligned when its offset is (the format allows no padding between
 * tensors). st_tensor_f32() gives an in-place view only when the pointer is 4-byte aligned;
 * tensor_to_f32 copes with any alignment.
 */
#ifndef LK_ST_H
#define LK_ST_H

#include <stddef.h>
#include <stdint.h>

#include "lk.h"
#include "tensor.h"

#define ST_MAX_DIMS 8
#define ST_MAX_HEADER ((size_t)100 << 20) /* 100 MB, as the Rust crate's limit */

struct st_tensor {
    char *name;                /* owned */
    enum tensor_dtype dtype;
    int ndim;
    int64_t shape[ST_MAX_DIMS];
    size_t numel;
    size_t nbytes;
    size_t offset;             /* begin, relative to the data area */
    const void *data;          /* points into the mapping */
};

struct st_file {
    char *path;                /* owned */
    void *map;                 /* owned mapping of the whole file (NULL for st_open_buffer) */
    size_t map_len;
    size_t header_len;
    const uint8_t *data;       /* points into the mapping: start of the data area */
    size_t data_len;
    int n;                     /* tensors, in header order */
    struct st_tensor *t;       /* owned array of n */
    int n_meta;                /* __metadata__ entries, kept in order */
    char **meta_key, **meta_val; /* owned arrays of n_meta owned strings */
    int *by_name;              /* owned: tensor indices sorted by name (st_find is a bsearch) */
};

int st_open(struct st_file *f, const char *path, struct lk_err *err);
/* Same validation on a buffer in memory (fuzzing, tests); the buffer must outlive f. */
int st_open_buffer(struct st_file *f, const void *buf, size_t len, const char *name, struct lk_err *err);
void st_close(struct st_file *f); /* harmless on a zeroed or closed struct */
const struct st_tensor *st_find(const struct st_file *f, const char *name);
const char *st_meta(const struct st_file *f, const char *key); /* NULL when absent */
/* Converts a tensor's data to float32 (F32/F16/BF16 and F64/I32/I64). out has numel floats. */
int st_tensor_to_f32(const struct st_tensor *t, float *out, struct lk_err *err);
/* An in-place float32 view of an F32 tensor (points into the mapping), or NULL when the tensor
 * is not F32 or its data is not 4-byte aligned (then use st_tensor_to_f32). */
const float *st_tensor_f32(const struct st_tensor *t);

// ---- a model's weights: model.safetensors, or shards listed by model.safetensors.index.json ----

struct st_model {
    char *dir;                 /* owned */
    int n_files;
    struct st_file *files;     /* owned array */
    int sharded;               /* 1 when read through an index */
};
/* Opens DIR/model.safetensors or DIR/model.safetensors.index.json (every shard it names,
 * each validated; the index must name only tensors that exist in the named shard; shard
 * names holding '/', '\\' or ".." are refused; a tensor in two shards is refused). When both
 * files exist, model.safetensors wins, as in transformers. */
int st_model_open(struct st_model *m, const char *dir, struct lk_err *err);
void st_model_close(struct st_model *m);
/* Finds a tensor in any file; out_file (may be NULL) gets the file index. */
const struct st_tensor *st_model_find(const struct st_model *m, const char *name, int *out_file);
/* Total tensor count over all files. */
int st_model_count(const struct st_model *m);
/* The most tensors and elements the files could hold, whatever their names, shapes and dtypes:
 * a tensor's header entry is at least ST_MIN_ENTRY bytes of JSON, and an element at least one
 * byte of data (U8, I8, BOOL). A bound, from the header and data-area sizes alone: a config that
 * asks for more cannot describe these weights, and is refused before anything is sized from it
 * (cfg_load); one that asks for a little more than the files hold passes, so that the reader's
 * own check can name the missing tensor. */
#define ST_MIN_ENTRY (sizeof "\"\":{\"dtype\":\"U8\",\"shape\":[],\"data_offsets\":[0,0]}" - 1)
void st_model_capacity(const struct st_model *m, uint64_t *out_tensors, uint64_t *out_elems);

// ---- writer: declare all tensors, then stream their data in declaration order ----

struct st_wtensor {
    char *name;                /* owned */
    enum tensor_dtype dtype;
    int ndim;
    int64_t shape[ST_MAX_DIMS];
    size_t nbytes;
};

struct st_writer {
    struct lk_afile af;        /* the temporary file, renamed on commit */
    struct lk_err *err;        /* borrowed; sticky: once set, calls are no-ops */
    int n, cap, next;          /* declared, capacity, next to write */
    struct st_wtensor *t;      /* owned */
    int n_meta;
    char **meta_key, **meta_val; /* owned */
    int begun;
    char *path;                /* owned */
    void *scratch;             /* owned conversion buffer */
    size_t scratch_len;
    size_t part;               /* elements of tensor `next` already written (chunked writes) */
};

/* err must not be NULL and must start zeroed: errors are sticky on it, so a sequence of
 * declare/write calls can be checked once, at commit. The file appears at path only on a
 * successful commit; temp file "<path>.tmp.<pid>" in the same folder until then. */
int st_writer_init(struct st_writer *w, const char *path, struct lk_err *err);
int st_writer_meta(struct st_writer *w, const char *key, const char *val);
/* Declares a tensor of the given output dtype and shape; order of declaration = data order. */
int st_writer_declare(struct st_writer *w, const char *name, enum tensor_dtype dtype, int ndim,
                      const int64_t *shape);
/* Writes the header (after all declarations) to the temporary file. */
int st_writer_begin(struct st_writer *w);
/* Writes the next declared tensor's data. src holds numel values of src_dtype: raw bytes are
 * copied when src_dtype equals the declared dtype, else F32 -> F16/BF16 (round to nearest even)
 * or F16/BF16 -> F32 conversion is done. */
int st_writer_write(struct st_writer *w, const void *src, enum tensor_dtype src_dtype);
/* Streams part of the next tensor: n more elements (row-major order) of src_dtype, converted as
 * above. The tensor is complete once its numel elements have been given; then the next
 * declared tensor starts. Lets init/merge stream a [V, C] embedding in bounded memory. */
int st_writer_write_chunk(struct st_writer *w, const void *src, enum tensor_dtype src_dtype, size_t n);
/* Checks every tensor was written, flushes, fsyncs, renames. Frees the writer. */
int st_writer_commit(struct st_writer *w);
void st_writer_abort(struct st_writer *w); /* removes the temp file, frees */

/* Convenience: write n float32 tensors in one call (dtype applies to all). */
struct st_item {
    const char *name;
    int ndim;
    int64_t shape[ST_MAX_DIMS];
    const float *data;
};
int st_write_f32(const char *path, const struct st_item *items, int n, enum tensor_dtype dtype,
                 struct lk_err *err);

// ---- sharded model writer: DIR/model.safetensors, or shards + model.safetensors.index.json ----
/*
 * The same declare / begin / write / commit sequence as st_writer, for a model folder.
 * begin assigns tensors to shards in declaration order: a new shard starts when adding the
 * next tensor would push the current shard's data past shard_size bytes (a tensor larger than
 * the limit gets a shard of its own; shard_size 0 means no limit). One shard is written as
 * DIR/model.safetensors with no index; several as DIR/model-00001-of-0000N.safetensors plus
 * DIR/model.safetensors.index.json ({"metadata": {"total_size": bytes}, "weight_map":
 * {tensor: shard}}, keys sorted, 2-space indent, as transformers writes it). Shards are
 * written one at a time, each atomically (temp name, fsync, rename); the index is written
 * last, so a reader never sees an index naming a missing shard. abort (or a failed commit)
 * removes the shards already renamed into DIR. DIR must exist; the caller should give a
 * fresh folder (init and merge write into a temporary folder renamed into place), since
 * stale files of the other layout are not removed. Errors are sticky on err, which must start
 * zeroed.
 */
struct st_model_writer {
    char *dir;                 /* owned */
    size_t shard_size;         /* bytes of tensor data per shard; 0 = one file */
    struct lk_err *err;        /* borrowed; sticky */
    int n, cap, next;          /* declared, capacity, next tensor to write */
    struct st_wtensor *t;      /* owned array of declarations */
    int *shard;                /* owned: shard index of each tensor (after begin) */
    int n_shards, cur;         /* shard count (after begin), shard open in w (-1 none) */
    struct st_writer w;        /* the shard being written */
    int n_meta;
    char **meta_key, **meta_val; /* owned: metadata written into every shard */
    char **done;               /* owned: paths of shards already committed (removed on abort) */
    int n_done;
    size_t part;               /* elements of tensor `next` already written */
    int begun;
};
int st_model_writer_init(struct st_model_writer *mw, const char *dir, size_t shard_size,
                         struct lk_err *err);
int st_model_writer_meta(struct st_model_writer *mw, const char *key, const char *val);
int st_model_writer_declare(struct st_model_writer *mw, const char *name, enum tensor_dtype dtype,
                            int ndim, const int64_t *shape);
int st_model_writer_begin(struct st_model_writer *mw);
/* Whole next tensor, or n elements of it; conversions as st_writer_write. */
int st_model_writer_write(struct st_model_writer *mw, const void *src, enum tensor_dtype src_dtype);
int st_model_writer_write_chunk(struct st_model_writer *mw, const void *src,
                                enum tensor_dtype src_dtype, size_t n);
/* Commits the last shard and writes the index (when sharded). Frees the writer. */
int st_model_writer_commit(struct st_model_writer *mw);
void st_model_writer_abort(struct st_model_writer *mw); /* removes everything written, frees */
/* The shard file name for shard i of n ("model.safetensors" when n == 1) into buf. */
void st_shard_name(int i, int n, char *buf, size_t len);

#endif
