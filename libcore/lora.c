/*
 * lora.c - LoRA factors in one block: configuration (ranks and alphas after PEFT's
 * rank_pattern / alpha_pattern), PEFT's module selection (lora_config_targets) with Python
 * regexes translated to POSIX ones, allocation, PEFT's initialisations, and the adapter a
 * training run starts from (lora_build). The on-disk PEFT format is in lora_io.c.
 */
#include "lora.h"

#include <math.h>
#include <regex.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "model.h"

void lora_config_default(struct lora_config *c)
{
    memset(c, 0, sizeof *c);
    c->r = 8;
    c->alpha = 16;
    c->dropout = 0.0;
    c->targets = (1u << CFG_N_MODULES) - 1;
    snprintf(c->bias, sizeof c->bias, "none");
    snprintf(c->init, sizeof c->init, "true");
}

static void patterns_free(struct lora_pattern *p, int n)
{
    for (int i = 0; i < n; i++)
        lk_free(p[i].key);
    lk_free(p);
}

static void strs_free(char **v, int n)
{
    for (int i = 0; i < n; i++)
        lk_free(v[i]);
    lk_free(v);
}

void lora_config_release(struct lora_config *c)
{
    if (!c)
        return;
    patterns_free(c->rank_pattern, c->n_rank_pattern);
    patterns_free(c->alpha_pattern, c->n_alpha_pattern);
    strs_free(c->modules_to_save, c->n_modules_to_save);
    strs_free(c->target_list, c->n_target_list);
    strs_free(c->exclude, c->n_exclude);
    strs_free(c->layers_pattern, c->n_layers_pattern);
    lk_free(c->target_regex);
    lk_free(c->exclude_regex);
    lk_free(c->layers);
    lk_free(c->token_idx[0]);
    lk_free(c->token_idx[1]);
    lk_free(c->unknown_keys);
    c->rank_pattern = c->alpha_pattern = NULL;
    c->modules_to_save = c->target_list = c->exclude = c->layers_pattern = NULL;
    c->target_regex = c->exclude_regex = c->unknown_keys = NULL;
    c->layers = c->token_idx[0] = c->token_idx[1] = NULL;
    c->n_rank_pattern = c->n_alpha_pattern = c->n_modules_to_save = c->n_target_list = c->n_exclude = 0;
    c->n_layers = c->n_layers_pattern = c->n_token_idx[0] = c->n_token_idx[1] = 0;
}

/* Copies of n strings (n + 1 slots, so that n 0 still allocates); the count made is in *got. */
static char **strs_dup(char *const *v, int n, int *got)
{
    *got = 0;
    if (!v)
        return NULL;
    char **d = lk_calloc((size_t)n + 1, sizeof(char *));
    for (int i = 0; d && i < n; i++) {
        if (!(d[i] = lk_strdup(v[i])))
            return d; // *got < n: the caller sees the failure
        (*got)++;
    }
    return d;
}

static struct lora_pattern *patterns_dup(const struct lora_pattern *p, int n, int *got)
{
    *got = 0;
    if (!n)
        return NULL;
    struct lora_pattern *d = lk_calloc((size_t)n, sizeof *d);
    for (int i = 0; d && i < n; i++) {
        d[i].value = p[i].value;
        if (!(d[i].key = lk_strdup(p[i].key)))
            return d;
        (*got)++;
    }
    return d;
}

static int *ints_dup(const int *v, int n)
{
    int *d = v ? lk_malloc(sizeof(int) * ((size_t)n + 1)) : NULL;
    if (d && n)
        memcpy(d, v, sizeof(int) * (size_t)n);
    return d;
}

int lora_config_copy(struct lora_config *dst, const struct lora_config *src, struct lk_err *err)
{
    *dst = *src;
    // every owned field starts NULL, so that a failure part way releases only what was made
    dst->rank_pattern = patterns_dup(src->rank_pattern, src->n_rank_pattern, &dst->n_rank_pattern);
    dst->alpha_pattern = patterns_dup(src->alpha_pattern, src->n_alpha_pattern, &dst->n_alpha_pattern);
    dst->modules_to_save = strs_dup(src->modules_to_save, src->n_modules_to_save, &dst->n_modules_to_save);
    dst->target_list = strs_dup(src->target_list, src->n_target_list, &dst->n_target_list);
    dst->exclude = strs_dup(src->exclude, src->n_exclude, &dst->n_exclude);
    dst->layers_pattern = strs_dup(src->layers_pattern, src->n_layers_pattern, &dst->n_layers_pattern);
    dst->target_regex = src->target_regex ? lk_strdup(src->target_regex) : NULL;
    dst->exclude_regex = src->exclude_regex ? lk_strdup(src->exclude_regex) : NULL;
    dst->unknown_keys = src->unknown_keys ? lk_strdup(src->unknown_keys) : NULL;
    dst->layers = ints_dup(src->layers, src->n_layers);
    for (int k = 0; k < 2; k++)
        dst->token_idx[k] = ints_dup(src->token_idx[k], src->n_token_idx[k]);
    int ok = dst->n_rank_pattern == src->n_rank_pattern && dst->n_alpha_pattern == src->n_alpha_pattern &&
             dst->n_modules_to_save == src->n_modules_to_save && dst->n_target_list == src->n_target_list &&
             dst->n_exclude == src->n_exclude && dst->n_layers_pattern == src->n_layers_pattern &&
             (!src->modules_to_save || dst->modules_to_save) && (!src->target_list || dst->target_list) &&
             (!src->exclude || dst->exclude) && (!src->layers_pattern || dst->layers_pattern) &&
             (!src->target_regex || dst->target_regex) && (!src->exclude_regex || dst->exclude_regex) &&
             (!src->unknown_keys || dst->unknown_keys) && (!src->layers || dst->layers) &&
             (!src->token_idx[0] || dst->token_idx[0]) && (!src->token_idx[1] || dst->token_idx[1]);
    if (ok)
        return LK_OK;
    lora_config_release(dst);
    return lk_errf(err, LK_ERR_NOMEM, "out of memory copying an adapter config");
}

int lora_regex_check(const char *rx, const char *what, const char *path, struct lk_err *err)
{
    // glibc's regcomp expands repeated quantifiers ("a+++", "(a{99}){99}") into trees that can
    // take gigabytes: PEFT's keys are module names, so refuse long patterns, stacked quantifiers
    // and large bounded repetitions up front
    size_t n = strlen(rx);
    if (n > 256)
        return lk_errf(err, LK_ERR_FORMAT, "%s: %s '%.40s...' is longer than 256 characters", path, what, rx);
    int prev_quant = 0, quants = 0, bounded = 0;
    for (size_t i = 0; i < n; i++) {
        char ch = rx[i];
        if (ch == '\\' && i + 1 < n) {
            i++;
            prev_quant = 0;
            continue;
        }
        int q = ch == '*' || ch == '+' || ch == '?' || ch == '{';
        if (q && prev_quant)
            return lk_errf(err, LK_ERR_FORMAT, "%s: %s '%s' stacks repetition operators", path, what, rx);
        if (ch == '{') {
            if (++bounded > 2) // nested bounded repetitions multiply
                return lk_errf(err, LK_ERR_FORMAT, "%s: %s '%s' has more than 2 bounded repetitions", path,
                               what, rx);
            char *end;
            long lo = strtol(rx + i + 1, &end, 10);
            if (lo > 16 || (*end == ',' && strtol(end + 1, NULL, 10) > 16))
                return lk_errf(err, LK_ERR_FORMAT, "%s: %s '%s' repeats more than 16 times", path, what, rx);
            const char *close = strchr(rx + i, '}');
            if (close)
                i = (size_t)(close - rx);
        }
        quants += q;
        prev_quant = q;
    }
    if (quants > 16)
        return lk_errf(err, LK_ERR_FORMAT, "%s: %s '%s' has more than 16 repetition operators", path, what, rx);
    return LK_OK;
}

// ---- PEFT's regexes (Python's re) as POSIX extended regexes ----

/* Appends s to out [cap] at *k; 0 when it does not fit. */
static int rx_put(char *out, size_t cap, size_t *k, const char *s)
{
    size_t n = strlen(s);
    if (*k + n + 1 > cap)
        return 0;
    memcpy(out + *k, s, n + 1);
    *k += n;
    return 1;
}

/* One escape "\c" inside [...]: what the bracket expression holds instead, or NULL. */
static const char *rx_class_escape(char c, char lit[3])
{
    switch (c) {
    case 'd': return "0-9";
    case 'w': return "A-Za-z0-9_";
    case 's': return " \t\n\r\f\v";
    case '\\': return "\\"; // a backslash is literal inside a POSIX bracket expression
    default:
        if (c && strchr("._:/,;!@#%&=<>'\"`~ *+?(){}|$", c)) {
            lit[0] = c;
            lit[1] = 0;
            return lit;
        }
        return NULL; // \] \- \^ and letters have no plain POSIX spelling here
    }
}

/* One escape "\c" outside brackets, or NULL when POSIX has nothing that means the same. */
static const char *rx_escape(char c, char two[3])
{
    switch (c) {
    case 'd': return "[0-9]";
    case 'D': return "[^0-9]";
    case 'w': return "[A-Za-z0-9_]";
    case 'W': return "[^A-Za-z0-9_]";
    case 's': return "[[:space:]]";
    case 'S': return "[^[:space:]]";
    case 'n': return "\n";
    case 't': return "\t";
    default:
        if (c && strchr(".[]()*+?{}|^$\\", c)) {
            two[0] = '\\';
            two[1] = c;
            two[2] = 0;
            return two;
        }
        if (c && strchr("_-/:,;!@#%&=<>'\"`~ ", c)) {
            two[0] = c;
            two[1] = 0;
            return two;
        }
        return NULL;
    }
}

/* Python regex -> POSIX ERE into out [cap]; *bad names the first construct with no POSIX
 * equivalent. Returns 0 on success, -1 (bad set) or -2 (too long). A match's existence is all
 * PEFT asks of these regexes, so lazy quantifiers become greedy ones. */
static int rx_translate(const char *py, char *out, size_t cap, const char **bad)
{
    size_t k = 0;
    int in_class = 0, class_start = 0;
    out[0] = 0;
    for (size_t i = 0; py[i]; i++) {
        char c = py[i], piece[3] = { c, 0, 0 };
        const char *put = piece;
        if (in_class) {
            if (c == '\\') {
                if (!(put = rx_class_escape(py[i + 1], piece))) {
                    *bad = "an escape inside [...]";
                    return -1;
                }
                i++;
            } else if (c == ']' && (int)i > class_start)
                in_class = 0;
        } else if (c == '\\') {
            if (!(put = rx_escape(py[i + 1], piece))) {
                *bad = py[i + 1] ? "an escape like \\A, \\Z, \\b or a back-reference" : "a trailing backslash";
                return -1;
            }
            i++;
        } else if (c == '(' && py[i + 1] == '?') {
            if (py[i + 2] != ':') {
                *bad = "a (?...) group (lookaround, named group or flags)";
                return -1;
            }
            put = "(";
            i += 2;
        } else if (c == '[') {
            in_class = 1;
            class_start = (int)i + 1 + (py[i + 1] == '^');
            if (py[i + 1] == '^') {
                put = "[^";
                i++;
            }
        } else if ((c == '*' || c == '+' || c == '?' || c == '}') && py[i + 1] == '?')
            i++; // lazy: the same set of strings matches
        if (!rx_put(out, cap, &k, put))
            return -2;
    }
    if (in_class) {
        *bad = "an unterminated [...]";
        return -1;
    }
    return 0;
}

int lora_regex_compile(regex_t *re, const char *py, const char *fmt, const char *what, const char *path,
                       struct lk_err *err)
{
    char body[1024], rx[1100];
    const char *bad = NULL;
    int t = strlen(py) > 256 ? -2 : rx_translate(py, body, sizeof body, &bad);
    if (t == -1)
        return lk_errf(err, LK_ERR_UNSUPPORTED, "%s: %s '%s' uses %s, which lorakit cannot evaluate "
                       "(PEFT's regexes are Python's; write it without)", path, what, py, bad);
    if (t == -2)
        return lk_errf(err, LK_ERR_FORMAT, "%s: %s '%.40s...' is longer than 256 characters", path, what, py);
    int rc = lora_regex_check(body, what, path, err);
    if (rc)
        return rc;
    snprintf(rx, sizeof rx, fmt, body);
    if (regcomp(re, rx, REG_EXTENDED | REG_NOSUB))
        return lk_errf(err, LK_ERR_FORMAT, "%s: %s '%s' is not a valid regular expression", path, what, py);
    return LK_OK;
}

/* name matches the Python regex py anchored as fmt says (0 when it does not compile). */
static int rx_match(const char *py, const char *fmt, const char *name)
{
    regex_t re;
    if (lora_regex_compile(&re, py, fmt, "regex", "", NULL) != LK_OK)
        return 0;
    int hit = regexec(&re, name, 0, NULL, 0) == 0;
    regfree(&re);
    return hit;
}

#define RX_FULL "^(%s)$"
#define RX_KEY "^(.*\\.)?(%s)$"

/* PEFT's get_pattern_key: the first key k with re.match(rf"(.*\.)?({k})$", name). Keys that
 * lora_regex_compile refuses never match (the reader refuses them first). */
static const struct lora_pattern *pattern_match(const struct lora_pattern *p, int n, const char *name)
{
    for (int i = 0; i < n; i++)
        if (rx_match(p[i].key, RX_KEY, name))
            return &p[i];
    return NULL;
}

// ---- which modules an adapter targets ----

/* PEFT's list entries: the module's own name, or a suffix after a dot. */
static int name_is_or_ends_with(const char *name, const char *e)
{
    size_t n = strlen(name), k = strlen(e);
    return !strcmp(name, e) || (n > k && name[n - k - 1] == '.' && !strcmp(name + n - k, e));
}

/* The layer index PEFT finds in name for layers_to_transform, or -1: with no layers_pattern the
 * first ".<segment>.<digits>." (re.match(r".*?\.[^.]*\.(\d+)\.")), else ".<pattern>.<digits>.".
 * Our module names have one numeric segment at most, so the pattern only decides whether. */
static int layer_index(const struct lora_config *c, const char *name)
{
    int idx = -1;
    for (const char *p = strchr(name, '.'); p && idx < 0; p = strchr(p + 1, '.')) {
        const char *q = strchr(p + 1, '.'), *d = q ? q + 1 : NULL, *e = d;
        while (e && *e >= '0' && *e <= '9')
            e++;
        if (d && e > d && *e == '.' && e - d < 9)
            idx = atoi(d);
    }
    if (idx < 0 || !c->n_layers_pattern)
        return idx;
    for (int i = 0; i < c->n_layers_pattern; i++)
        if (rx_match(c->layers_pattern[i], "^.*\\.(%s)\\.[0-9]+\\.", name))
            return idx;
    return -1;
}

int lora_config_targets(const struct lora_config *c, const char *name)
{
    // 1. exclude_modules: a regex full-matched, or list entries
    if (c->exclude_regex && rx_match(c->exclude_regex, RX_FULL, name))
        return 0;
    for (int i = 0; i < c->n_exclude; i++)
        if (name_is_or_ends_with(name, c->exclude[i]))
            return 0;
    // 2. a modules_to_save module is never also a LoRA target: re.match(rf"(^|.*\.){m}($|\..*)")
    for (int i = 0; i < c->n_modules_to_save; i++)
        if (rx_match(c->modules_to_save[i], "^(.*\\.)?(%s)(\\..*)?$", name))
            return 0;
    // 3. target_modules: a regex full-matched (layers_to_transform does not apply then)
    if (c->target_regex)
        return rx_match(c->target_regex, RX_FULL, name);
    int found = 0;
    if (c->target_list) {
        for (int i = 0; i < c->n_target_list && !found; i++)
            found = name_is_or_ends_with(name, c->target_list[i]);
    } else {
        const char *dot = strrchr(name, '.');
        int m = !strncmp(name, "model.layers.", 13) && dot ? cfg_module_parse(dot + 1) : -1;
        found = (m >= 0 && (c->targets & (1u << m))) || (c->target_embed && !strcmp(name, "model.embed_tokens")) ||
                (c->target_head && !strcmp(name, "lm_head"));
    }
    // 4. layers_to_transform (an empty list means every layer)
    if (found && c->layers && c->n_layers > 0) {
        int idx = layer_index(c, name);
        found = 0;
        for (int i = 0; i < c->n_layers && !found && idx >= 0; i++)
            found = c->layers[i] == idx;
    }
    return found;
}

int lora_changes_weights(const struct lora *l)
{
    return l && (l->n_extra || l->head_A || l->n_tok[0] || l->n_tok[1]);
}

void lora_config_module(const struct lora_config *c, const char *module_name, int *out_r,
                        double *out_alpha)
{
    const struct lora_pattern *pr = pattern_match(c->rank_pattern, c->n_rank_pattern, module_name);
    const struct lora_pattern *pa = pattern_match(c->alpha_pattern, c->n_alpha_pattern, module_name);
    *out_r = pr ? (int)pr->value : c->r;
    *out_alpha = pa ? pa->value : c->alpha;
}

int lora_targets_parse(const char *s, unsigned *out, struct lk_err *err)
{
    if (!strcmp(s, "all") || !strcmp(s, "all-linear")) {
        *out = (1u << CFG_N_MODULES) - 1;
        return LK_OK;
    }
    unsigned t = 0;
    const char *p = s;
    while (*p) {
        const char *e = strchr(p, ',');
        size_t n = e ? (size_t)(e - p) : strlen(p);
        char name[32];
        if (n == 0 || n >= sizeof name)
            return lk_errf(err, LK_ERR_USAGE, "bad target list '%s'", s);
        memcpy(name, p, n);
        name[n] = 0;
        int m = cfg_module_parse(name);
        if (m < 0)
            return lk_errf(err, LK_ERR_USAGE,
                           "unknown target module '%s' (known: q_proj k_proj v_proj o_proj gate_proj "
                           "up_proj down_proj, or all)", name);
        t |= 1u << m;
        p += n;
        if (*p == ',')
            p++;
    }
    if (!t)
        return lk_errf(err, LK_ERR_USAGE, "empty target list");
    *out = t;
    return LK_OK;
}

static void lora_layout(struct lora *l, const struct cfg *c, float *base, size_t *out_n)
{
    size_t off = 0;
    for (int i = 0; i < l->n_mod; i++) {
        struct lora_module *md = &l->mod[i];
        md->A = base ? base + off : NULL;
        off += (size_t)md->R * md->in;
        md->B = base ? base + off : NULL;
        off += (size_t)md->out * md->R;
    }
    if (l->cfg.lora_bias)
        for (int i = 0; i < l->n_mod; i++) {
            l->mod[i].bias = base ? base + off : NULL;
            off += (size_t)l->mod[i].out;
        }
    // DoRA magnitudes are trainable: they live in the block too (mag_mem points at the first)
    l->mag_mem = NULL;
    if (l->cfg.use_dora)
        for (int i = 0; i < l->n_mod; i++) {
            l->mod[i].mag = base ? base + off : NULL;
            if (i == 0)
                l->mag_mem = l->mod[i].mag;
            off += (size_t)l->mod[i].out;
        }
    (void)c;
    *out_n = off;
}

int lora_init(struct lora *l, const struct lora_config *lc, const struct cfg *c, struct lk_err *err)
{
    memset(l, 0, sizeof *l);
    // l owns a deep copy of the config
    if (lora_config_copy(&l->cfg, lc, err))
        return err ? err->code : LK_ERR_NOMEM;
    int L = c->num_hidden_layers;
    l->L = L;
    l->index = lk_malloc(sizeof(int) * ((size_t)L * CFG_N_MODULES + 1));
    l->mod = lk_calloc((size_t)(CFG_N_MODULES * L) + 1, sizeof *l->mod);
    if (!l->index || !l->mod)
        goto nomem;
    for (int i = 0; i < L * CFG_N_MODULES; i++)
        l->index[i] = -1;
    for (int ly = 0; ly < L; ly++)
        for (int m = 0; m < CFG_N_MODULES; m++) {
            char name[96];
            cfg_module_path(ly, (enum cfg_module)m, name, sizeof name);
            if (!lora_config_targets(&l->cfg, name))
                continue;
            struct lora_module *md = &l->mod[l->n_mod];
            int R;
            double alpha;
            lora_config_module(&l->cfg, name, &R, &alpha);
            if (R <= 0) {
                lora_release(l);
                return lk_errf(err, LK_ERR_USAGE, "rank %d for '%s' must be positive", R, name);
            }
            int64_t rows, cols;
            cfg_module_shape(c, (enum cfg_module)m, &rows, &cols);
            md->layer = ly;
            md->module = m;
            md->R = R;
            md->in = (int)cols;
            md->out = (int)rows;
            md->alpha = alpha;
            md->scale = (float)(lc->use_rslora ? alpha / sqrt((double)R) : alpha / R);
            l->index[ly * CFG_N_MODULES + m] = l->n_mod++;
        }
    size_t n;
    lora_layout(l, c, NULL, &n);
    if (!(l->mem = lk_calloc(n ? n : 1, sizeof(float))))
        goto nomem;
    l->n = n;
    lora_layout(l, c, l->mem, &n);
    return LK_OK;
nomem:
    lora_release(l);
    return lk_errf(err, LK_ERR_NOMEM, "out of memory allocating the adapter");
}

void lora_release(struct lora *l)
{
    if (!l)
        return;
    lora_config_release(&l->cfg);
    lk_free(l->mem);
    lk_free(l->mod);
    lk_free(l->index);
    for (int i = 0; i < l->n_extra; i++) {
        lk_free(l->extra[i].name);
        lk_free(l->extra[i].data);
    }
    lk_free(l->extra);
    lk_free(l->embed_A);
    lk_free(l->embed_B);
    lk_free(l->head_A);
    lk_free(l->head_B);
    for (int k = 0; k < 2; k++) {
        lk_free(l->tok_idx[k]);
        lk_free(l->tok_rows[k]);
    }
    lk_free(l->init_mem);
    memset(l, 0, sizeof *l);
}

void lora_init_weights(struct lora *l, int gaussian, struct lk_rng *rng)
{
    for (int i = 0; i < l->n_mod; i++) {
        struct lora_module *md = &l->mod[i];
        size_t na = (size_t)md->R * md->in;
        // kaiming_uniform(a = sqrt 5): bound = gain * sqrt(3 / fan_in), gain = sqrt(2 / (1 + 5))
        float bound = 1.0f / sqrtf((float)md->in);
        for (size_t j = 0; j < na; j++)
            md->A[j] = gaussian ? lk_rng_normal(rng) / (float)md->R
                                : (2.0f * lk_rng_uniform(rng) - 1.0f) * bound;
        memset(md->B, 0, sizeof(float) * (size_t)md->out * md->R);
        if (md->bias)
            memset(md->bias, 0, sizeof(float) * (size_t)md->out);
    }
}

struct lora_module *lora_find(const struct lora *l, int layer, int module)
{
    if (!l || layer < 0 || layer >= l->L || module < 0 || module >= CFG_N_MODULES)
        return NULL;
    int s = l->index[layer * CFG_N_MODULES + module];
    return s < 0 ? NULL : &l->mod[s];
}

void lora_peft_name(int layer, int module, char *buf, size_t n)
{
    char path[96];
    cfg_module_path(layer, (enum cfg_module)module, path, sizeof path);
    snprintf(buf, n, "base_model.model.%s", path);
}

size_t lora_param_count(const struct lora *l)
{
    return l->n;
}

// ---- the adapter a training run starts from ----

int lora_init_kind_parse(const char *s)
{
    static const char *const names[] = { "default", "gaussian", "pissa" };
    for (int i = 0; i < 3; i++)
        if (!strcmp(s, names[i]))
            return i;
    return -1;
}

int lora_build(struct lora *l, struct model *m, const struct lora_build_opts *o, struct lk_err *err)
{
    int rc;
    memset(l, 0, sizeof *l);
    if (o->from) {
        if ((rc = lora_load(l, o->from, &m->cfg, err)))
            return rc;
        if (lora_changes_weights(l) || l->embed_A) {
            lora_release(l);
            return lk_errf(err, LK_ERR_UNSUPPORTED, "%s: continued training of embedding, lm_head, trainable-token "
                           "or modules_to_save adapters is not supported", o->from);
        }
        l->cfg.dropout = o->dropout;
        return LK_OK;
    }
    struct lora_config lc;
    lora_config_default(&lc);
    lc.r = o->r;
    lc.alpha = o->alpha;
    lc.dropout = o->dropout;
    lc.use_rslora = o->use_rslora;
    lc.use_dora = o->use_dora;
    snprintf(lc.base_model, sizeof lc.base_model, "%s", o->base_model ? o->base_model : "");
    snprintf(lc.init, sizeof lc.init, "%s",
             o->init == LORA_INIT_GAUSSIAN ? "gaussian" : o->init == LORA_INIT_PISSA ? "pissa" : "true");
    if ((rc = lora_targets_parse(o->targets ? o->targets : "all", &lc.targets, err)) ||
        (rc = lora_init(l, &lc, &m->cfg, err)))
        return rc;
    struct lk_rng rng;
    lk_rng_seed(&rng, o->seed);
    if (o->init == LORA_INIT_PISSA)
        rc = lora_init_pissa(l, m, err);
    else
        lora_init_weights(l, o->init == LORA_INIT_GAUSSIAN, &rng);
    if (!rc && o->use_dora)
        rc = lora_init_dora_magnitude(l, m, err);
    if (rc)
        lora_release(l);
    return rc;
}
