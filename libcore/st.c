/*
 * st.c - read and write the safetensors format.
 * Reading maps the file and validates the whole header (length, UTF-8, JSON, dtypes, shapes,
 * offsets covering the data area exactly, unique names) before any tensor is used. Writing
 * streams data to a temporary file renamed on commit; the model writer splits a model into
 * shards and writes the index last. Owns: the mapping and the parsed header (st_file), the
 * declarations and temp files (st_writer, st_model_writer). See st.h.
 */
#include "st.h"

#include <cJSON.h>
#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

// ---- reading ----

static uint64_t st_le64(const uint8_t *p)
{
    uint64_t v = 0;
    for (int i = 7; i >= 0; i--)
        v = (v << 8) | p[i];
    return v;
}

/* Offset of the first invalid UTF-8 sequence (overlongs, surrogates and > U+10FFFF refused),
 * or n when the buffer is valid. */
static size_t st_utf8_bad(const uint8_t *s, size_t n)
{
    size_t i = 0;
    while (i < n) {
        uint8_t c = s[i];
        if (c < 0x80) {
            i++;
            continue;
        }
        int k;
        uint32_t cp, min;
        if ((c & 0xE0) == 0xC0) {
            k = 1, cp = c & 0x1F, min = 0x80;
        } else if ((c & 0xF0) == 0xE0) {
            k = 2, cp = c & 0x0F, min = 0x800;
        } else if ((c & 0xF8) == 0xF0) {
            k = 3, cp = c & 0x07, min = 0x10000;
        } else {
            return i;
        }
        if (n - i <= (size_t)k)
            return i;
        for (int j = 1; j <= k; j++) {
            if ((s[i + j] & 0xC0) != 0x80)
                return i;
            cp = (cp << 6) | (s[i + j] & 0x3F);
        }
        if (cp < min || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF))
            return i;
        i += (size_t)k + 1;
    }
    return n;
}

/* A JSON number that is an integer in [0, 2^53] (beyond that a double loses integers). */
static int st_json_uint(const cJSON *j, uint64_t *out)
{
    if (!cJSON_IsNumber(j))
        return -1;
    double d = j->valuedouble;
    if (!(d >= 0) || d > 9007199254740992.0 || d != floor(d))
        return -1;
    *out = (uint64_t)d;
    return 0;
}

static const struct st_file *g_sort_file; // qsort has no context argument in C11

static int st_cmp_name(const void *a, const void *b)
{
    const struct st_tensor *t = g_sort_file->t;
    return strcmp(t[*(const int *)a].name, t[*(const int *)b].name);
}

static int st_cmp_offset(const void *a, const void *b)
{
    const struct st_tensor *t = g_sort_file->t;
    const struct st_tensor *x = &t[*(const int *)a], *y = &t[*(const int *)b];
    if (x->offset != y->offset)
        return x->offset < y->offset ? -1 : 1;
    if (x->nbytes != y->nbytes)
        return x->nbytes < y->nbytes ? -1 : 1; // empty tensors first at a shared offset
    return 0;
}

/* Reads one tensor entry into t (name set by the caller). */
static int st_parse_entry(struct st_file *f, struct st_tensor *t, const cJSON *e, struct lk_err *err)
{
    const char *p = f->path, *nm = t->name;
    if (!cJSON_IsObject(e))
        return lk_errf(err, LK_ERR_FORMAT, "%s: tensor '%s' is not a JSON object", p, nm);
    const cJSON *jd = cJSON_GetObjectItemCaseSensitive(e, "dtype");
    const cJSON *js = cJSON_GetObjectItemCaseSensitive(e, "shape");
    const cJSON *jo = cJSON_GetObjectItemCaseSensitive(e, "data_offsets");
    if (!cJSON_IsString(jd))
        return lk_errf(err, LK_ERR_FORMAT, "%s: tensor '%s' has no 'dtype' string", p, nm);
    int dt = tensor_dtype_parse(jd->valuestring);
    if (dt < 0)
        return lk_errf(err, LK_ERR_FORMAT,
                       "%s: tensor '%s' has unknown dtype '%.32s' (supported: F32, F16, BF16, F64, "
                       "I64, I32, I16, I8, U8, BOOL)", p, nm, jd->valuestring);
    t->dtype = (enum tensor_dtype)dt;
    if (!cJSON_IsArray(js))
        return lk_errf(err, LK_ERR_FORMAT, "%s: tensor '%s' has no 'shape' array", p, nm);
    int nd = cJSON_GetArraySize(js);
    if (nd > ST_MAX_DIMS)
        return lk_errf(err, LK_ERR_FORMAT, "%s: tensor '%s' has %d dimensions (at most %d supported)",
                       p, nm, nd, ST_MAX_DIMS);
    t->ndim = nd;
    size_t numel = 1;
    int k = 0, overflow = 0;
    for (const cJSON *d = js->child; d; d = d->next, k++) {
        uint64_t v;
        if (st_json_uint(d, &v))
            return lk_errf(err, LK_ERR_FORMAT,
                           "%s: tensor '%s' has a bad shape: dimension %d is not a non-negative integer",
                           p, nm, k);
        t->shape[k] = (int64_t)v;
        if (v > SIZE_MAX || lk_mul_size(numel, (size_t)v, &numel))
            overflow = 1; // keep reading: a later 0 does not make an overflowing prefix valid
    }
    if (overflow || lk_mul_size(numel, tensor_dtype_size(t->dtype), &t->nbytes))
        return lk_errf(err, LK_ERR_FORMAT, "%s: tensor '%s' has a shape whose size overflows", p, nm);
    t->numel = numel;
    uint64_t b, en;
    if (!cJSON_IsArray(jo) || cJSON_GetArraySize(jo) != 2 || st_json_uint(jo->child, &b) ||
        st_json_uint(jo->child->next, &en))
        return lk_errf(err, LK_ERR_FORMAT,
                       "%s: tensor '%s' has no 'data_offsets' pair of non-negative integers", p, nm);
    if (b > en)
        return lk_errf(err, LK_ERR_FORMAT, "%s: tensor '%s' has data_offsets [%llu, %llu] with begin > end",
                       p, nm, (unsigned long long)b, (unsigned long long)en);
    if (en - b != t->nbytes)
        return lk_errf(err, LK_ERR_FORMAT,
                       "%s: tensor '%s' has %llu bytes of data but its dtype %s and shape need %zu",
                       p, nm, (unsigned long long)(en - b), tensor_dtype_name(t->dtype), t->nbytes);
    if (en > f->data_len)
        return lk_errf(err, LK_ERR_FORMAT,
                       "%s: tensor '%s' lies outside the data area (ends at byte %llu, data area is "
                       "%zu bytes; truncated file?)", p, nm, (unsigned long long)en, f->data_len);
    t->offset = (size_t)b;
    t->data = f->data + b;
    return LK_OK;
}

static int st_parse_meta(struct st_file *f, const cJSON *m, struct lk_err *err)
{
    if (!cJSON_IsObject(m))
        return lk_errf(err, LK_ERR_FORMAT, "%s: '__metadata__' is not a JSON object", f->path);
    int n = cJSON_GetArraySize(m);
    f->meta_key = lk_calloc((size_t)n + 1, sizeof(char *));
    f->meta_val = lk_calloc((size_t)n + 1, sizeof(char *));
    if (!f->meta_key || !f->meta_val)
        return lk_errf(err, LK_ERR_NOMEM, "%s: out of memory", f->path);
    for (const cJSON *e = m->child; e; e = e->next) {
        if (!cJSON_IsString(e))
            return lk_errf(err, LK_ERR_FORMAT, "%s: '__metadata__' value of '%s' is not a string",
                           f->path, e->string);
        f->meta_key[f->n_meta] = lk_strdup(e->string);
        f->meta_val[f->n_meta] = lk_strdup(e->valuestring);
        if (!f->meta_key[f->n_meta] || !f->meta_val[f->n_meta]) {
            f->n_meta++;
            return lk_errf(err, LK_ERR_NOMEM, "%s: out of memory", f->path);
        }
        f->n_meta++;
    }
    return LK_OK;
}

/* Everything after the file is in memory: f->path set, buf is the whole file. */
static int st_parse(struct st_file *f, const uint8_t *buf, size_t len, struct lk_err *err)
{
    const char *p = f->path;
    if (len < 8)
        return lk_errf(err, LK_ERR_FORMAT, "%s: file is %zu bytes, too short for a safetensors header",
                       p, len);
    uint64_t hl = st_le64(buf);
    if (hl == 0)
        return lk_errf(err, LK_ERR_FORMAT, "%s: header length is 0", p);
    if (hl > len - 8)
        return lk_errf(err, LK_ERR_FORMAT,
                       "%s: header length %llu exceeds the file (%zu bytes after the length; "
                       "truncated, or not a safetensors file?)", p, (unsigned long long)hl, len - 8);
    if (hl > ST_MAX_HEADER)
        return lk_errf(err, LK_ERR_FORMAT, "%s: header length %llu exceeds the %zu-byte limit", p,
                       (unsigned long long)hl, ST_MAX_HEADER);
    const uint8_t *h = buf + 8;
    f->header_len = (size_t)hl;
    f->data = h + hl;
    f->data_len = len - 8 - (size_t)hl;
    size_t bad = st_utf8_bad(h, (size_t)hl);
    if (bad < hl)
        return lk_errf(err, LK_ERR_FORMAT, "%s: header is not valid UTF-8 (byte %zu of the header)", p, bad);
    if (memchr(h, 0, (size_t)hl))
        return lk_errf(err, LK_ERR_FORMAT, "%s: header contains a NUL byte", p);
    const char *end = NULL;
    cJSON *root = cJSON_ParseWithLengthOpts((const char *)h, (size_t)hl, &end, 0);
    if (!root) {
        size_t at = end && end >= (const char *)h ? (size_t)(end - (const char *)h) : 0;
        return lk_errf(err, LK_ERR_FORMAT, "%s: header is not valid JSON (near byte %zu of the header)",
                       p, at);
    }
    int rc = LK_OK;
    for (const char *q = end; q < (const char *)h + hl; q++)
        if (*q != ' ' && *q != '\t' && *q != '\n' && *q != '\r') {
            rc = lk_errf(err, LK_ERR_FORMAT, "%s: header has trailing bytes after the JSON object", p);
            goto done;
        }
    if (!cJSON_IsObject(root)) {
        rc = lk_errf(err, LK_ERR_FORMAT, "%s: header is not a JSON object", p);
        goto done;
    }
    int n = 0, n_meta_obj = 0;
    for (const cJSON *e = root->child; e; e = e->next)
        if (strcmp(e->string, "__metadata__"))
            n++;
        else
            n_meta_obj++;
    if (n_meta_obj > 1) {
        rc = lk_errf(err, LK_ERR_FORMAT, "%s: duplicate '__metadata__'", p);
        goto done;
    }
    f->t = lk_calloc((size_t)n + 1, sizeof *f->t);
    f->by_name = lk_calloc((size_t)n + 1, sizeof(int));
    int *by_off = lk_calloc((size_t)n + 1, sizeof(int));
    if (!f->t || !f->by_name || !by_off) {
        lk_free(by_off);
        rc = lk_errf(err, LK_ERR_NOMEM, "%s: out of memory for %d tensors", p, n);
        goto done;
    }
    for (const cJSON *e = root->child; e; e = e->next) {
        if (!strcmp(e->string, "__metadata__")) {
            rc = st_parse_meta(f, e, err);
        } else {
            struct st_tensor *t = &f->t[f->n];
            t->name = lk_strdup(e->string);
            if (!t->name) {
                rc = lk_errf(err, LK_ERR_NOMEM, "%s: out of memory", p);
                break;
            }
            f->n++;
            rc = st_parse_entry(f, t, e, err);
        }
        if (rc)
            break;
    }
    if (rc) {
        lk_free(by_off);
        goto done;
    }
    // unique names, and the sorted index st_find uses
    for (int i = 0; i < f->n; i++)
        f->by_name[i] = by_off[i] = i;
    g_sort_file = f;
    qsort(f->by_name, (size_t)f->n, sizeof(int), st_cmp_name);
    qsort(by_off, (size_t)f->n, sizeof(int), st_cmp_offset);
    for (int i = 1; i < f->n && !rc; i++)
        if (!strcmp(f->t[f->by_name[i - 1]].name, f->t[f->by_name[i]].name))
            rc = lk_errf(err, LK_ERR_FORMAT, "%s: duplicate tensor '%s'", p, f->t[f->by_name[i]].name);
    // the data area is covered exactly: in offset order each tensor starts where the last ended
    size_t pos = 0;
    const char *prev = NULL;
    for (int i = 0; i < f->n && !rc; i++) {
        const struct st_tensor *t = &f->t[by_off[i]];
        if (t->offset < pos)
            rc = lk_errf(err, LK_ERR_FORMAT, "%s: tensors '%s' and '%s' overlap in the data area", p,
                         prev, t->name);
        else if (t->offset > pos)
            rc = lk_errf(err, LK_ERR_FORMAT,
                         "%s: bytes %zu..%zu of the data area belong to no tensor (before '%s')", p,
                         pos, t->offset, t->name);
        if (t->nbytes) {
            pos = t->offset + t->nbytes;
            prev = t->name;
        }
    }
    if (!rc && pos != f->data_len)
        rc = lk_errf(err, LK_ERR_FORMAT,
                     "%s: the data area has %zu trailing bytes not covered by any tensor", p,
                     f->data_len - pos);
    lk_free(by_off);
done:
    cJSON_Delete(root);
    return rc;
}

int st_open_buffer(struct st_file *f, const void *buf, size_t len, const char *name, struct lk_err *err)
{
    memset(f, 0, sizeof *f);
    f->path = lk_strdup(name);
    if (!f->path)
        return lk_errf(err, LK_ERR_NOMEM, "out of memory");
    int rc = st_parse(f, buf, len, err);
    if (rc)
        st_close(f);
    return rc;
}

int st_open(struct st_file *f, const char *path, struct lk_err *err)
{
    memset(f, 0, sizeof *f);
    int fd = open(path, O_RDONLY);
    if (fd < 0)
        return lk_errf(err, errno == ENOENT ? LK_ERR_MISSING : LK_ERR_IO, "%s: cannot open: %s", path,
                       strerror(errno));
    struct stat sb;
    if (fstat(fd, &sb) != 0 || !S_ISREG(sb.st_mode)) {
        close(fd);
        return lk_errf(err, LK_ERR_IO, "%s: not a regular file", path);
    }
    size_t len = (size_t)sb.st_size;
    if (len < 8) {
        close(fd);
        return lk_errf(err, LK_ERR_FORMAT, "%s: file is %zu bytes, too short for a safetensors header",
                       path, len);
    }
    void *map = mmap(NULL, len, PROT_READ, MAP_PRIVATE, fd, 0);
    int e = errno;
    close(fd);
    if (map == MAP_FAILED)
        return lk_errf(err, LK_ERR_IO, "%s: cannot map: %s", path, strerror(e));
    f->map = map;
    f->map_len = len;
    f->path = lk_strdup(path);
    if (!f->path) {
        st_close(f);
        return lk_errf(err, LK_ERR_NOMEM, "out of memory");
    }
    int rc = st_parse(f, map, len, err);
    if (rc)
        st_close(f);
    return rc;
}

void st_close(struct st_file *f)
{
    if (!f)
        return;
    if (f->map)
        munmap(f->map, f->map_len);
    for (int i = 0; i < f->n; i++)
        lk_free(f->t[i].name);
    lk_free(f->t);
    lk_free(f->by_name);
    for (int i = 0; i < f->n_meta; i++) {
        lk_free(f->meta_key[i]);
        lk_free(f->meta_val[i]);
    }
    lk_free(f->meta_key);
    lk_free(f->meta_val);
    lk_free(f->path);
    memset(f, 0, sizeof *f);
}

const struct st_tensor *st_find(const struct st_file *f, const char *name)
{
    int lo = 0, hi = f->n - 1;
    while (lo <= hi) {
        int mid = lo + (hi - lo) / 2;
        const struct st_tensor *t = &f->t[f->by_name[mid]];
        int c = strcmp(name, t->name);
        if (!c)
            return t;
        if (c < 0)
            hi = mid - 1;
        else
            lo = mid + 1;
    }
    return NULL;
}

const char *st_meta(const struct st_file *f, const char *key)
{
    for (int i = 0; i < f->n_meta; i++)
        if (!strcmp(f->meta_key[i], key))
            return f->meta_val[i];
    return NULL;
}

int st_tensor_to_f32(const struct st_tensor *t, float *out, struct lk_err *err)
{
    if ((int)t->dtype < 0 || t->dtype >= TENSOR_DTYPE_COUNT)
        return lk_errf(err, LK_ERR_FORMAT, "tensor '%s' has a bad dtype", t->name);
    tensor_to_f32(out, t->data, t->dtype, t->numel); // every dtype we parse converts
    return LK_OK;
}

const float *st_tensor_f32(const struct st_tensor *t)
{
    if (t->dtype != TENSOR_F32 || ((uintptr_t)t->data & 3u))
        return NULL;
    return (const float *)t->data;
}

// ---- a model folder ----

static int st_model_add(struct st_model *m, const char *file, struct lk_err *err)
{
    struct st_file *nf = lk_realloc(m->files, sizeof *nf * (size_t)(m->n_files + 1));
    if (!nf)
        return lk_errf(err, LK_ERR_NOMEM, "out of memory");
    m->files = nf;
    char *path = lk_path_join(m->dir, file);
    if (!path)
        return lk_errf(err, LK_ERR_NOMEM, "out of memory");
    int rc = st_open(&m->files[m->n_files], path, err);
    lk_free(path);
    if (rc)
        return rc;
    m->n_files++;
    return LK_OK;
}

static int st_model_index(struct st_model *m, const char *ipath, struct lk_err *err)
{
    char *text;
    size_t len;
    int rc = lk_read_file(ipath, &text, &len, err);
    if (rc)
        return rc;
    cJSON *root = cJSON_ParseWithLength(text, len);
    lk_free(text);
    if (!root)
        return lk_errf(err, LK_ERR_FORMAT, "%s: not valid JSON", ipath);
    const cJSON *wm = cJSON_GetObjectItemCaseSensitive(root, "weight_map");
    const cJSON *md = cJSON_GetObjectItemCaseSensitive(root, "metadata");
    if (!cJSON_IsObject(root)) {
        rc = lk_errf(err, LK_ERR_FORMAT, "%s: not a JSON object", ipath);
        goto done;
    }
    if (md && !cJSON_IsObject(md) && !cJSON_IsNull(md)) {
        rc = lk_errf(err, LK_ERR_FORMAT, "%s: 'metadata' is not an object", ipath);
        goto done;
    }
    if (!cJSON_IsObject(wm)) {
        rc = lk_errf(err, LK_ERR_FORMAT, "%s: no 'weight_map' object", ipath);
        goto done;
    }
    // open each shard once, in order of first mention; check its name first
    for (const cJSON *e = wm->child; e && !rc; e = e->next) {
        if (!cJSON_IsString(e)) {
            rc = lk_errf(err, LK_ERR_FORMAT, "%s: weight_map entry '%s' is not a file name string", ipath,
                         e->string);
            break;
        }
        const char *s = e->valuestring;
        if (!*s || strchr(s, '/') || strchr(s, '\\') || strstr(s, "..")) {
            rc = lk_errf(err, LK_ERR_FORMAT,
                         "%s: weight_map entry '%s' names shard '%s', which is not a plain file name in "
                         "the model folder", ipath, e->string, s);
            break;
        }
        int seen = 0;
        for (int i = 0; i < m->n_files && !seen; i++)
            seen = !strcmp(strrchr(m->files[i].path, '/') + 1, s);
        if (!seen) {
            rc = st_model_add(m, s, err);
            if (rc == LK_ERR_MISSING)
                lk_err_prefix(err, "%s: shard '%s' of tensor '%s' is missing", ipath, s, e->string);
        }
    }
    // every tensor the index names is in the shard it names
    for (const cJSON *e = wm->child; e && !rc; e = e->next) {
        const struct st_file *f = NULL;
        for (int i = 0; i < m->n_files && !f; i++)
            if (!strcmp(strrchr(m->files[i].path, '/') + 1, e->valuestring))
                f = &m->files[i];
        LK_ASSERT(f);
        if (!st_find(f, e->string))
            rc = lk_errf(err, LK_ERR_FORMAT, "%s: tensor '%s' is not in its shard '%s'", ipath, e->string,
                         e->valuestring);
    }
done:
    cJSON_Delete(root);
    return rc;
}

int st_model_open(struct st_model *m, const char *dir, struct lk_err *err)
{
    memset(m, 0, sizeof *m);
    m->dir = lk_strdup(dir);
    char *single = lk_path_join(dir, "model.safetensors");
    char *index = lk_path_join(dir, "model.safetensors.index.json");
    int rc = LK_OK;
    if (!m->dir || !single || !index) {
        rc = lk_errf(err, LK_ERR_NOMEM, "out of memory");
    } else if (lk_file_exists(single)) { // transformers prefers the single file too
        rc = st_model_add(m, "model.safetensors", err);
    } else if (lk_file_exists(index)) {
        m->sharded = 1;
        rc = st_model_index(m, index, err);
    } else if (!lk_is_dir(dir)) {
        rc = lk_errf(err, LK_ERR_MISSING, "%s: no such model folder", dir);
    } else {
        rc = lk_errf(err, LK_ERR_MISSING, "%s: no model.safetensors or model.safetensors.index.json", dir);
    }
    // a tensor in two shards would be ambiguous
    for (int i = 1; i < m->n_files && !rc; i++)
        for (int k = 0; k < m->files[i].n && !rc; k++)
            for (int j = 0; j < i && !rc; j++)
                if (st_find(&m->files[j], m->files[i].t[k].name))
                    rc = lk_errf(err, LK_ERR_FORMAT, "%s: tensor '%s' is in both '%s' and '%s'", dir,
                                 m->files[i].t[k].name, m->files[j].path, m->files[i].path);
    lk_free(single);
    lk_free(index);
    if (rc)
        st_model_close(m);
    return rc;
}

void st_model_close(struct st_model *m)
{
    if (!m)
        return;
    for (int i = 0; i < m->n_files; i++)
        st_close(&m->files[i]);
    lk_free(m->files);
    lk_free(m->dir);
    memset(m, 0, sizeof *m);
}

const struct st_tensor *st_model_find(const struct st_model *m, const char *name, int *out_file)
{
    for (int i = 0; i < m->n_files; i++) {
        const struct st_tensor *t = st_find(&m->files[i], name);
        if (t) {
            if (out_file)
                *out_file = i;
            return t;
        }
    }
    return NULL;
}

int st_model_count(const struct st_model *m)
{
    int n = 0;
    for (int i = 0; i < m->n_files; i++)
        n += m->files[i].n;
    return n;
}

void st_model_capacity(const struct st_model *m, uint64_t *out_tensors, uint64_t *out_elems)
{
    uint64_t t = 0, e = 0;
    for (int i = 0; i < m->n_files; i++) {
        t += m->files[i].header_len / ST_MIN_ENTRY;
        e += m->files[i].data_len;
    }
    *out_tensors = t;
    *out_elems = e;
}

// ---- writer ----

#define ST_CHUNK 65536 /* elements converted per step: bounds the scratch buffer */

static int st_failed(const struct lk_err *err)
{
    return err->code != LK_OK;
}

/* Checks a declaration and fills t (name duplicated). */
static int st_wtensor_set(struct st_wtensor *t, const char *name, enum tensor_dtype dtype, int ndim,
                          const int64_t *shape, const char *path, struct lk_err *err)
{
    memset(t, 0, sizeof *t);
    if (!strcmp(name, "__metadata__"))
        return lk_errf(err, LK_ERR_USAGE, "%s: '__metadata__' cannot be a tensor name", path);
    if (!tensor_dtype_name(dtype))
        return lk_errf(err, LK_ERR_USAGE, "%s: tensor '%s' has a bad dtype", path, name);
    if (ndim < 0 || ndim > ST_MAX_DIMS)
        return lk_errf(err, LK_ERR_USAGE, "%s: tensor '%s' has %d dimensions", path, name, ndim);
    size_t numel = 1;
    for (int i = 0; i < ndim; i++) {
        if (shape[i] < 0 || (uint64_t)shape[i] > SIZE_MAX || lk_mul_size(numel, (size_t)shape[i], &numel))
            return lk_errf(err, LK_ERR_SHAPE, "%s: tensor '%s' has a bad shape", path, name);
        t->shape[i] = shape[i];
    }
    if (lk_mul_size(numel, tensor_dtype_size(dtype), &t->nbytes))
        return lk_errf(err, LK_ERR_SHAPE, "%s: tensor '%s' is too large", path, name);
    t->dtype = dtype;
    t->ndim = ndim;
    t->name = lk_strdup(name);
    if (!t->name)
        return lk_errf(err, LK_ERR_NOMEM, "out of memory");
    return LK_OK;
}

static size_t st_wnumel(const struct st_wtensor *t)
{
    return t->nbytes / tensor_dtype_size(t->dtype);
}

static void st_writer_free(struct st_writer *w)
{
    for (int i = 0; i < w->n; i++)
        lk_free(w->t[i].name);
    lk_free(w->t);
    for (int i = 0; i < w->n_meta; i++) {
        lk_free(w->meta_key[i]);
        lk_free(w->meta_val[i]);
    }
    lk_free(w->meta_key);
    lk_free(w->meta_val);
    lk_free(w->path);
    lk_free(w->scratch);
    struct lk_err *err = w->err;
    memset(w, 0, sizeof *w);
    w->err = err;
}

int st_writer_init(struct st_writer *w, const char *path, struct lk_err *err)
{
    LK_ASSERT(err);
    memset(w, 0, sizeof *w);
    w->err = err;
    if (st_failed(err))
        return err->code;
    w->path = lk_strdup(path);
    if (!w->path)
        return lk_errf(err, LK_ERR_NOMEM, "out of memory");
    return LK_OK;
}

static int st_push_meta(int *n, char ***keys, char ***vals, const char *key, const char *val,
                        struct lk_err *err)
{
    for (int i = 0; i < *n; i++)
        if (!strcmp((*keys)[i], key)) { // a second value replaces the first
            char *v = lk_strdup(val);
            if (!v)
                return lk_errf(err, LK_ERR_NOMEM, "out of memory");
            lk_free((*vals)[i]);
            (*vals)[i] = v;
            return LK_OK;
        }
    char **nk = lk_realloc(*keys, sizeof(char *) * (size_t)(*n + 1));
    if (nk)
        *keys = nk;
    char **nv = lk_realloc(*vals, sizeof(char *) * (size_t)(*n + 1));
    if (nv)
        *vals = nv;
    if (!nk || !nv)
        return lk_errf(err, LK_ERR_NOMEM, "out of memory");
    (*keys)[*n] = lk_strdup(key);
    (*vals)[*n] = lk_strdup(val);
    (*n)++;
    if (!(*keys)[*n - 1] || !(*vals)[*n - 1])
        return lk_errf(err, LK_ERR_NOMEM, "out of memory");
    return LK_OK;
}

int st_writer_meta(struct st_writer *w, const char *key, const char *val)
{
    if (st_failed(w->err))
        return w->err->code;
    LK_ASSERT(!w->begun);
    return st_push_meta(&w->n_meta, &w->meta_key, &w->meta_val, key, val, w->err);
}

int st_writer_declare(struct st_writer *w, const char *name, enum tensor_dtype dtype, int ndim,
                      const int64_t *shape)
{
    if (st_failed(w->err))
        return w->err->code;
    LK_ASSERT(!w->begun);
    if (w->n == w->cap) {
        int cap = w->cap ? 2 * w->cap : 64;
        struct st_wtensor *t = lk_realloc(w->t, sizeof *t * (size_t)cap);
        if (!t)
            return lk_errf(w->err, LK_ERR_NOMEM, "out of memory");
        w->t = t;
        w->cap = cap;
    }
    int rc = st_wtensor_set(&w->t[w->n], name, dtype, ndim, shape, w->path, w->err);
    if (!rc)
        w->n++;
    return rc;
}

static const struct st_wtensor *g_sort_wt;

static int st_cmp_wname(const void *a, const void *b)
{
    return strcmp(g_sort_wt[*(const int *)a].name, g_sort_wt[*(const int *)b].name);
}

/* Names unique among n declarations (a writer bug the reader would refuse later). */
static int st_check_unique(const struct st_wtensor *t, int n, const char *path, struct lk_err *err)
{
    int *ix = lk_malloc(sizeof(int) * (size_t)(n + 1));
    if (!ix)
        return lk_errf(err, LK_ERR_NOMEM, "out of memory");
    for (int i = 0; i < n; i++)
        ix[i] = i;
    g_sort_wt = t;
    qsort(ix, (size_t)n, sizeof(int), st_cmp_wname);
    int rc = LK_OK;
    for (int i = 1; i < n && !rc; i++)
        if (!strcmp(t[ix[i - 1]].name, t[ix[i]].name))
            rc = lk_errf(err, LK_ERR_USAGE, "%s: tensor '%s' declared twice", path, t[ix[i]].name);
    lk_free(ix);
    return rc;
}

int st_writer_begin(struct st_writer *w)
{
    if (st_failed(w->err))
        return w->err->code;
    LK_ASSERT(!w->begun);
    int rc = st_check_unique(w->t, w->n, w->path, w->err);
    if (rc)
        return rc;
    // the header: metadata first (as the Python library writes it), tensors in declaration order
    struct lk_buf b = { 0 };
    lk_buf_puts(&b, "{");
    if (w->n_meta) {
        lk_buf_puts(&b, "\"__metadata__\":{");
        for (int i = 0; i < w->n_meta; i++) {
            if (i)
                lk_buf_puts(&b, ",");
            lk_buf_json_str(&b, w->meta_key[i]);
            lk_buf_puts(&b, ":");
            lk_buf_json_str(&b, w->meta_val[i]);
        }
        lk_buf_puts(&b, "}");
    }
    size_t off = 0;
    for (int i = 0; i < w->n; i++) {
        const struct st_wtensor *t = &w->t[i];
        if (i || w->n_meta)
            lk_buf_puts(&b, ",");
        lk_buf_json_str(&b, t->name);
        lk_buf_printf(&b, ":{\"dtype\":\"%s\",\"shape\":[", tensor_dtype_name(t->dtype));
        for (int d = 0; d < t->ndim; d++)
            lk_buf_printf(&b, d ? ",%lld" : "%lld", (long long)t->shape[d]);
        lk_buf_printf(&b, "],\"data_offsets\":[%zu,%zu]}", off, off + t->nbytes);
        off += t->nbytes;
    }
    lk_buf_puts(&b, "}");
    while (!b.oom && b.n % 8) // pad with spaces so the data area starts 8-aligned
        lk_buf_puts(&b, " ");
    if (b.oom) {
        lk_free(b.p);
        return lk_errf(w->err, LK_ERR_NOMEM, "out of memory");
    }
    w->scratch_len = (size_t)ST_CHUNK * 6; // F32 view + 16-bit view, for F16 <-> BF16
    w->scratch = lk_malloc(w->scratch_len);
    if (!w->scratch) {
        lk_free(b.p);
        return lk_errf(w->err, LK_ERR_NOMEM, "out of memory");
    }
    rc = lk_afile_open(&w->af, w->path, w->err);
    if (rc) {
        lk_free(b.p);
        return rc;
    }
    w->begun = 1;
    uint8_t len8[8];
    for (int i = 0; i < 8; i++)
        len8[i] = (uint8_t)((uint64_t)b.n >> (8 * i));
    lk_afile_write(&w->af, len8, 8);
    lk_afile_write(&w->af, b.p, b.n);
    lk_free(b.p);
    return w->err->code;
}

int st_writer_write_chunk(struct st_writer *w, const void *src, enum tensor_dtype src_dtype, size_t n)
{
    if (st_failed(w->err))
        return w->err->code;
    LK_ASSERT(w->begun);
    if (w->next >= w->n)
        return lk_errf(w->err, LK_ERR_USAGE, "%s: more tensors written than declared", w->path);
    const struct st_wtensor *t = &w->t[w->next];
    size_t numel = st_wnumel(t);
    if (n > numel - w->part)
        return lk_errf(w->err, LK_ERR_SHAPE, "%s: tensor '%s': %zu elements given, %zu left to write",
                       w->path, t->name, n, numel - w->part);
    enum tensor_dtype dt = t->dtype;
    const unsigned char *s = src;
    if (src_dtype == dt) {
        lk_afile_write(&w->af, s, n * tensor_dtype_size(dt));
    } else if (tensor_dtype_is_float(src_dtype) && tensor_dtype_is_float(dt)) {
        float *f32 = w->scratch;
        unsigned char *out16 = (unsigned char *)w->scratch + (size_t)ST_CHUNK * 4;
        size_t ss = tensor_dtype_size(src_dtype);
        for (size_t i = 0; i < n && !st_failed(w->err); i += ST_CHUNK) {
            size_t k = n - i < ST_CHUNK ? n - i : ST_CHUNK;
            const float *in;
            if (src_dtype == TENSOR_F32) {
                in = (const float *)(const void *)(s + i * 4);
            } else {
                tensor_to_f32(f32, s + i * ss, src_dtype, k);
                in = f32;
            }
            if (dt == TENSOR_F32) {
                lk_afile_write(&w->af, in, k * 4);
            } else {
                tensor_from_f32(out16, dt, in, k);
                lk_afile_write(&w->af, out16, k * 2);
            }
        }
    } else {
        return lk_errf(w->err, LK_ERR_USAGE, "%s: tensor '%s': cannot convert %s data to %s", w->path,
                       t->name, tensor_dtype_name(src_dtype), tensor_dtype_name(dt));
    }
    w->part += n;
    if (w->part == numel) {
        w->next++;
        w->part = 0;
    }
    return w->err->code;
}

int st_writer_write(struct st_writer *w, const void *src, enum tensor_dtype src_dtype)
{
    if (st_failed(w->err))
        return w->err->code;
    if (w->next >= w->n)
        return lk_errf(w->err, LK_ERR_USAGE, "%s: more tensors written than declared", w->path);
    if (w->part)
        return lk_errf(w->err, LK_ERR_USAGE, "%s: tensor '%s' is partly written", w->path,
                       w->t[w->next].name);
    return st_writer_write_chunk(w, src, src_dtype, st_wnumel(&w->t[w->next]));
}

int st_writer_commit(struct st_writer *w)
{
    int rc = w->err->code;
    if (!rc && !w->begun)
        rc = st_writer_begin(w); // committing with nothing begun writes an empty-data file
    if (!rc && w->next < w->n)
        rc = lk_errf(w->err, LK_ERR_USAGE, "%s: only %d of %d tensors were written", w->path, w->next,
                     w->n);
    if (rc) {
        st_writer_abort(w);
        return rc;
    }
    rc = lk_afile_commit(&w->af);
    st_writer_free(w);
    return rc;
}

void st_writer_abort(struct st_writer *w)
{
    if (w->begun)
        lk_afile_abort(&w->af);
    st_writer_free(w);
}

int st_write_f32(const char *path, const struct st_item *items, int n, enum tensor_dtype dtype,
                 struct lk_err *err)
{
    struct st_writer w;
    st_writer_init(&w, path, err);
    st_writer_meta(&w, "format", "pt");
    for (int i = 0; i < n; i++)
        st_writer_declare(&w, items[i].name, dtype, items[i].ndim, items[i].shape);
    st_writer_begin(&w);
    for (int i = 0; i < n; i++)
        st_writer_write(&w, items[i].data, TENSOR_F32);
    return st_writer_commit(&w);
}

// ---- sharded model writer ----

void st_shard_name(int i, int n, char *buf, size_t len)
{
    if (n <= 1)
        snprintf(buf, len, "model.safetensors");
    else
        snprintf(buf, len, "model-%05d-of-%05d.safetensors", i + 1, n);
}

static void st_model_writer_free(struct st_model_writer *mw)
{
    for (int i = 0; i < mw->n; i++)
        lk_free(mw->t[i].name);
    lk_free(mw->t);
    lk_free(mw->shard);
    for (int i = 0; i < mw->n_meta; i++) {
        lk_free(mw->meta_key[i]);
        lk_free(mw->meta_val[i]);
    }
    lk_free(mw->meta_key);
    lk_free(mw->meta_val);
    for (int i = 0; i < mw->n_done; i++)
        lk_free(mw->done[i]);
    lk_free(mw->done);
    lk_free(mw->dir);
    struct lk_err *err = mw->err;
    memset(mw, 0, sizeof *mw);
    mw->err = err;
    mw->cur = -1;
}

int st_model_writer_init(struct st_model_writer *mw, const char *dir, size_t shard_size,
                         struct lk_err *err)
{
    LK_ASSERT(err);
    memset(mw, 0, sizeof *mw);
    mw->err = err;
    mw->cur = -1;
    mw->shard_size = shard_size;
    if (st_failed(err))
        return err->code;
    mw->dir = lk_strdup(dir);
    if (!mw->dir)
        return lk_errf(err, LK_ERR_NOMEM, "out of memory");
    return LK_OK;
}

int st_model_writer_meta(struct st_model_writer *mw, const char *key, const char *val)
{
    if (st_failed(mw->err))
        return mw->err->code;
    LK_ASSERT(!mw->begun);
    return st_push_meta(&mw->n_meta, &mw->meta_key, &mw->meta_val, key, val, mw->err);
}

int st_model_writer_declare(struct st_model_writer *mw, const char *name, enum tensor_dtype dtype,
                            int ndim, const int64_t *shape)
{
    if (st_failed(mw->err))
        return mw->err->code;
    LK_ASSERT(!mw->begun);
    if (mw->n == mw->cap) {
        int cap = mw->cap ? 2 * mw->cap : 64;
        struct st_wtensor *t = lk_realloc(mw->t, sizeof *t * (size_t)cap);
        if (!t)
            return lk_errf(mw->err, LK_ERR_NOMEM, "out of memory");
        mw->t = t;
        mw->cap = cap;
    }
    int rc = st_wtensor_set(&mw->t[mw->n], name, dtype, ndim, shape, mw->dir, mw->err);
    if (!rc)
        mw->n++;
    return rc;
}

int st_model_writer_begin(struct st_model_writer *mw)
{
    if (st_failed(mw->err))
        return mw->err->code;
    LK_ASSERT(!mw->begun);
    int rc = st_check_unique(mw->t, mw->n, mw->dir, mw->err);
    if (rc)
        return rc;
    mw->shard = lk_calloc((size_t)mw->n + 1, sizeof(int));
    if (!mw->shard)
        return lk_errf(mw->err, LK_ERR_NOMEM, "out of memory");
    int s = 0;
    size_t used = 0;
    for (int i = 0; i < mw->n; i++) {
        size_t nb = mw->t[i].nbytes;
        if (mw->shard_size && used > 0 && (nb > mw->shard_size - used || used > mw->shard_size)) {
            s++;
            used = 0;
        }
        mw->shard[i] = s;
        used += nb;
    }
    mw->n_shards = s + 1;
    mw->begun = 1;
    return LK_OK;
}

/* Commits the open shard and remembers its path (removed again on abort). */
static int st_model_writer_close_shard(struct st_model_writer *mw)
{
    if (mw->cur < 0)
        return mw->err->code;
    char name[64];
    st_shard_name(mw->cur, mw->n_shards, name, sizeof name);
    char *path = lk_path_join(mw->dir, name);
    char **d = lk_realloc(mw->done, sizeof(char *) * (size_t)(mw->n_done + 1));
    if (!path || !d) {
        lk_free(path);
        if (d)
            mw->done = d;
        st_writer_abort(&mw->w);
        mw->cur = -1;
        return lk_errf(mw->err, LK_ERR_NOMEM, "out of memory");
    }
    mw->done = d;
    mw->cur = -1;
    int rc = st_writer_commit(&mw->w);
    if (rc) {
        lk_free(path);
        return rc;
    }
    mw->done[mw->n_done++] = path;
    return LK_OK;
}

static int st_model_writer_open_shard(struct st_model_writer *mw, int s)
{
    char name[64];
    st_shard_name(s, mw->n_shards, name, sizeof name);
    char *path = lk_path_join(mw->dir, name);
    if (!path)
        return lk_errf(mw->err, LK_ERR_NOMEM, "out of memory");
    st_writer_init(&mw->w, path, mw->err);
    lk_free(path);
    mw->cur = s;
    for (int i = 0; i < mw->n_meta; i++)
        st_writer_meta(&mw->w, mw->meta_key[i], mw->meta_val[i]);
    for (int i = 0; i < mw->n; i++)
        if (mw->shard[i] == s)
            st_writer_declare(&mw->w, mw->t[i].name, mw->t[i].dtype, mw->t[i].ndim, mw->t[i].shape);
    return st_writer_begin(&mw->w);
}

int st_model_writer_write_chunk(struct st_model_writer *mw, const void *src,
                                enum tensor_dtype src_dtype, size_t n)
{
    if (st_failed(mw->err))
        return mw->err->code;
    LK_ASSERT(mw->begun);
    if (mw->next >= mw->n)
        return lk_errf(mw->err, LK_ERR_USAGE, "%s: more tensors written than declared", mw->dir);
    int s = mw->shard[mw->next];
    if (s != mw->cur) {
        if (st_model_writer_close_shard(mw) || st_model_writer_open_shard(mw, s))
            return mw->err->code;
    }
    if (st_writer_write_chunk(&mw->w, src, src_dtype, n))
        return mw->err->code;
    mw->part += n;
    if (mw->part == st_wnumel(&mw->t[mw->next])) {
        mw->next++;
        mw->part = 0;
    }
    return LK_OK;
}

int st_model_writer_write(struct st_model_writer *mw, const void *src, enum tensor_dtype src_dtype)
{
    if (st_failed(mw->err))
        return mw->err->code;
    if (mw->next >= mw->n)
        return lk_errf(mw->err, LK_ERR_USAGE, "%s: more tensors written than declared", mw->dir);
    if (mw->part)
        return lk_errf(mw->err, LK_ERR_USAGE, "%s: tensor '%s' is partly written", mw->dir,
                       mw->t[mw->next].name);
    return st_model_writer_write_chunk(mw, src, src_dtype, st_wnumel(&mw->t[mw->next]));
}

/* model.safetensors.index.json as transformers writes it (keys sorted, 2-space indent). */
static int st_model_writer_index(struct st_model_writer *mw)
{
    int *ix = lk_malloc(sizeof(int) * (size_t)(mw->n + 1));
    if (!ix)
        return lk_errf(mw->err, LK_ERR_NOMEM, "out of memory");
    size_t total = 0;
    for (int i = 0; i < mw->n; i++) {
        ix[i] = i;
        total += mw->t[i].nbytes;
    }
    g_sort_wt = mw->t;
    qsort(ix, (size_t)mw->n, sizeof(int), st_cmp_wname);
    struct lk_buf b = { 0 };
    lk_buf_printf(&b, "{\n  \"metadata\": {\n    \"total_size\": %zu\n  },\n  \"weight_map\": {", total);
    for (int i = 0; i < mw->n; i++) {
        char name[64];
        st_shard_name(mw->shard[ix[i]], mw->n_shards, name, sizeof name);
        lk_buf_puts(&b, i ? ",\n    " : "\n    ");
        lk_buf_json_str(&b, mw->t[ix[i]].name);
        lk_buf_puts(&b, ": ");
        lk_buf_json_str(&b, name);
    }
    lk_buf_puts(&b, mw->n ? "\n  }\n}\n" : "}\n}\n");
    lk_free(ix);
    char *path = lk_path_join(mw->dir, "model.safetensors.index.json");
    if (b.oom || !path) {
        lk_free(b.p);
        lk_free(path);
        return lk_errf(mw->err, LK_ERR_NOMEM, "out of memory");
    }
    int rc = lk_write_file_atomic(path, b.p, b.n, mw->err);
    lk_free(b.p);
    lk_free(path);
    return rc;
}

int st_model_writer_commit(struct st_model_writer *mw)
{
    int rc = mw->err->code;
    if (!rc && !mw->begun)
        rc = st_model_writer_begin(mw);
    if (!rc && mw->next < mw->n)
        rc = lk_errf(mw->err, LK_ERR_USAGE, "%s: only %d of %d tensors were written", mw->dir, mw->next,
                     mw->n);
    if (!rc && mw->cur < 0 && mw->n_done == 0) // no tensors at all: still write an (empty) file
        rc = st_model_writer_open_shard(mw, 0);
    if (!rc)
        rc = st_model_writer_close_shard(mw);
    if (!rc && mw->n_shards > 1)
        rc = st_model_writer_index(mw);
    if (rc) {
        st_model_writer_abort(mw);
        return rc;
    }
    st_model_writer_free(mw);
    return LK_OK;
}

void st_model_writer_abort(struct st_model_writer *mw)
{
    if (mw->cur >= 0)
        st_writer_abort(&mw->w);
    for (int i = 0; i < mw->n_done; i++)
        unlink(mw->done[i]);
    st_model_writer_free(mw);
}
