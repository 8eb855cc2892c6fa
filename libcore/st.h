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
 * names are unique. A failure names the file and the problem.
 */
#ifndef LK_ST_H
#define LK_ST_H

#include <stddef.h>
#include <stdint.h>

#include "lk.h"
#include "tensor.h"

#define ST_MAX_DIMS 8

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
    void *map;                 /* owned mapping (NULL for an empty data area) */
    size_t map_len;
    size_t header_len;
    const uint8_t *data;       /* points into the mapping: start of the data area */
    size_t data_len;
    int n;                     /* tensors, in header order */
    struct st_tensor *t;       /* owned array of n */
    int n_meta;                /* __metadata__ entries, kept in order */
    char **meta_key, **meta_val; /* owned arrays of n_meta owned strings */
};

int st_open(struct st_file *f, const char *path, struct lk_err *err);
/* Same validation on a buffer in memory (fuzzing, tests); the buffer must outlive f. */
int st_open_buffer(struct st_file *f, const void *buf, size_t len, const char *name, struct lk_err *err);
void st_close(struct st_file *f); /* harmless on a zeroed or closed struct */
const struct st_tensor *st_find(const struct st_file *f, const char *name);
const char *st_meta(const struct st_file *f, const char *key); /* NULL when absent */
/* Converts a tensor's data to float32 (F32/F16/BF16 and F64/I32/I64). out has numel floats. */
int st_tensor_to_f32(const struct st_tensor *t, float *out, struct lk_err *err);

// ---- a model's weights: model.safetensors, or shards listed by model.safetensors.index.json ----

struct st_model {
    char *dir;                 /* owned */
    int n_files;
    struct st_file *files;     /* owned array */
    int sharded;               /* 1 when read through an index */
};
/* Opens DIR/model.safetensors or DIR/model.safetensors.index.json (every shard it names,
 * each validated; the index must name only tensors that exist in the named shard). */
int st_model_open(struct st_model *m, const char *dir, struct lk_err *err);
void st_model_close(struct st_model *m);
/* Finds a tensor in any file; out_file (may be NULL) gets the file index. */
const struct st_tensor *st_model_find(const struct st_model *m, const char *name, int *out_file);
/* Total tensor count over all files. */
int st_model_count(const struct st_model *m);

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
};

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

#endif
