/*
 * lora.c - LoRA factors in one block: configuration (ranks and alphas after PEFT's
 * rank_pattern / alpha_pattern), allocation, PEFT's initialisations, and the adapter a
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

void lora_config_release(struct lora_config *c)
{
    if (!c)
        return;
    patterns_free(c->rank_pattern, c->n_rank_pattern);
    patterns_free(c->alpha_pattern, c->n_alpha_pattern);
    for (int i = 0; i < c->n_modules_to_save; i++)
        lk_free(c->modules_to_save[i]);
    lk_free(c->modules_to_save);
    c->rank_pattern = c->alpha_pattern = NULL;
    c->modules_to_save = NULL;
    c->n_rank_pattern = c->n_alpha_pattern = c->n_modules_to_save = 0;
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

/* PEFT's get_pattern_key: the first key k with re.match(rf"(.*\.)?({k})$", name). Keys that
 * lora_regex_check refuses never match. */
static const struct lora_pattern *pattern_match(const struct lora_pattern *p, int n, const char *name)
{
    for (int i = 0; i < n; i++) {
        if (lora_regex_check(p[i].key, "pattern", "", NULL) != LK_OK)
            continue;
        size_t len = strlen(p[i].key) + 16;
        char *rx = lk_malloc(len);
        if (!rx)
            return NULL;
        snprintf(rx, len, "^(.*\\.)?(%s)$", p[i].key);
        regex_t re;
        int ok = regcomp(&re, rx, REG_EXTENDED | REG_NOSUB) == 0;
        lk_free(rx);
        if (!ok)
            continue;
        int hit = regexec(&re, name, 0, NULL, 0) == 0;
        regfree(&re);
        if (hit)
            return &p[i];
    }
    return NULL;
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
    l->cfg = *lc;
    // the patterns and modules_to_save lists are deep-copied so that l owns its config
    l->cfg.rank_pattern = l->cfg.alpha_pattern = NULL;
    l->cfg.modules_to_save = NULL;
    l->cfg.n_rank_pattern = l->cfg.n_alpha_pattern = l->cfg.n_modules_to_save = 0;
    struct {
        const struct lora_pattern *src;
        int n;
        struct lora_pattern **dst;
        int *dn;
    } pats[2] = { { lc->rank_pattern, lc->n_rank_pattern, &l->cfg.rank_pattern, &l->cfg.n_rank_pattern },
                  { lc->alpha_pattern, lc->n_alpha_pattern, &l->cfg.alpha_pattern, &l->cfg.n_alpha_pattern } };
    for (int k = 0; k < 2; k++) {
        if (!pats[k].n)
            continue;
        *pats[k].dst = lk_calloc((size_t)pats[k].n, sizeof(struct lora_pattern));
        if (!*pats[k].dst)
            goto nomem;
        for (int i = 0; i < pats[k].n; i++) {
            (*pats[k].dst)[i].key = lk_strdup(pats[k].src[i].key);
            (*pats[k].dst)[i].value = pats[k].src[i].value;
            (*pats[k].dn)++;
            if (!(*pats[k].dst)[i].key)
                goto nomem;
        }
    }
    if (lc->n_modules_to_save) {
        l->cfg.modules_to_save = lk_calloc((size_t)lc->n_modules_to_save, sizeof(char *));
        if (!l->cfg.modules_to_save)
            goto nomem;
        for (int i = 0; i < lc->n_modules_to_save; i++) {
            l->cfg.modules_to_save[i] = lk_strdup(lc->modules_to_save[i]);
            l->cfg.n_modules_to_save++;
            if (!l->cfg.modules_to_save[i])
                goto nomem;
        }
    }
    int L = c->num_hidden_layers, nmod = 0;
    for (int m = 0; m < CFG_N_MODULES; m++)
        if (lc->targets & (1u << m))
            nmod++;
    l->L = L;
    l->index = lk_malloc(sizeof(int) * (size_t)L * CFG_N_MODULES);
    l->mod = lk_calloc((size_t)(nmod * L) + 1, sizeof *l->mod);
    if (!l->index || !l->mod)
        goto nomem;
    for (int i = 0; i < L * CFG_N_MODULES; i++)
        l->index[i] = -1;
    for (int ly = 0; ly < L; ly++)
        for (int m = 0; m < CFG_N_MODULES; m++) {
            if (!(lc->targets & (1u << m)))
                continue;
            struct lora_module *md = &l->mod[l->n_mod];
            char name[96];
            cfg_module_path(ly, (enum cfg_module)m, name, sizeof name);
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
        if (l->n_extra || l->embed_A) {
            lora_release(l);
            return lk_errf(err, LK_ERR_UNSUPPORTED, "%s: continued training of embedding or modules_to_save "
                           "adapters is not supported", o->from);
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
