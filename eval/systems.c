/*
 * systems.c - the tuned systems of an eval run (see harness.h, "systems"): `--system NAME=PATH`
 * parsed and loaded against the base (a PEFT adapter or a model folder, detected), and the
 * tuned modes repeated once per system. Owns each system's adapter and private model copy.
 */
#include "harness.h"

#include <stdio.h>
#include <string.h>

// ---- modes ----

int ev_modes_expand(const struct ev_mode *in, int n_in, const char *const *names, int n_sys,
                    struct ev_mode **out, int *n, struct lk_err *err)
{
    *out = NULL;
    *n = 0;
    int n_base = 0, n_tuned = 0;
    for (int j = 0; j < n_in; j++)
        n_base += !in[j].tuned;
    n_tuned = n_in - n_base;
    struct ev_mode *m = lk_calloc((size_t)(n_base + n_tuned * (n_sys > 0 ? n_sys : 1)) + 1, sizeof *m);
    if (!m)
        return lk_errf(err, LK_ERR_NOMEM, "out of memory");
    int cnt = 0;
    for (int j = 0; j < n_in; j++)
        if (!in[j].tuned)
            m[cnt++] = in[j];
    for (int s = 0; s < n_sys; s++)
        for (int j = 0; j < n_in; j++) {
            if (!in[j].tuned)
                continue;
            m[cnt] = in[j];
            m[cnt].tuned = s + 1;
            // "ft" -> NAME, "ft+rag@3" -> NAME+rag@3 (the part after "ft" is kept)
            const char *rest = strncmp(in[j].name, "ft", 2) ? "" : in[j].name + 2;
            snprintf(m[cnt].name, sizeof m[cnt].name, "%s%s", names[s], rest);
            cnt++;
        }
    *out = m;
    *n = cnt;
    return LK_OK;
}

// ---- systems ----

static int name_ok(const char *s, size_t n)
{
    if (n == 0 || n >= EV_SYS_NAME_MAX)
        return 0;
    for (size_t i = 0; i < n; i++) {
        char c = s[i];
        if (!((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '_' ||
              c == '-' || c == '.'))
            return 0;
    }
    return !(n == 4 && !strncmp(s, "base", 4)) && !(n == 3 && !strncmp(s, "rag", 3));
}

int ev_system_parse(const char *arg, struct ev_system *s, struct lk_err *err)
{
    memset(s, 0, sizeof *s);
    const char *eq = strchr(arg, '=');
    if (!eq || !eq[1])
        return lk_errf(err, LK_ERR_USAGE, "option '--system' wants NAME=PATH, got '%s'", arg);
    size_t n = (size_t)(eq - arg);
    if (!name_ok(arg, n))
        return lk_errf(err, LK_ERR_USAGE, "--system '%s': the name must be 1 to %d characters of letters, "
                       "digits, '_', '-' and '.', and not 'base' or 'rag'", arg, EV_SYS_NAME_MAX - 1);
    memcpy(s->name, arg, n);
    s->name[n] = 0;
    s->path = eq + 1;
    return LK_OK;
}

/* The name prefix of a system's errors ("ft", the --adapter/--tuned shorthand, keeps the
 * messages it always had). */
static int sys_fail(const struct ev_system *s, struct lk_err *err)
{
    if (strcmp(s->name, "ft"))
        lk_err_prefix(err, "system '%s'", s->name);
    return err->code;
}

int ev_system_check(struct ev_system *s, int force, const struct model *base, const char *base_dir,
                    struct lk_err *err)
{
    int rc;
    char *ac = lk_path_join(s->path, "adapter_config.json"), *mc = lk_path_join(s->path, "config.json");
    if (!ac || !mc) {
        rc = lk_errf(err, LK_ERR_NOMEM, "out of memory");
    } else if (force == 1 || (force == 0 && lk_file_exists(ac))) {
        // lora_load checks every tensor against the base's shapes
        s->is_adapter = 1;
        if (!(rc = lora_load(&s->lora, s->path, &base->cfg, err)))
            s->l = &s->lora;
    } else if (force == 2 || lk_file_exists(mc)) {
        struct cfg c;
        if (!(rc = cfg_load(&c, s->path, err))) {
            rc = cfg_check_same(&base->cfg, &c, base_dir, s->path, 1, err);
            cfg_release(&c);
        }
    } else {
        rc = lk_errf(err, LK_ERR_MISSING, "%s: neither an adapter (adapter_config.json) nor a model folder "
                     "(config.json)", s->path);
    }
    lk_free(ac);
    lk_free(mc);
    return rc ? sys_fail(s, err) : LK_OK;
}

int ev_system_load(struct ev_system *s, const struct model *base, const char *base_dir, int keep,
                   struct lk_err *err)
{
    s->m = base;
    if (s->is_adapter && !lora_changes_weights(&s->lora))
        return LK_OK;
    // a model folder (its weights kept as asked); or an adapter that changes whole weights, on
    // a private float32 copy of the base that the adapter's tensors replace
    int rc = s->is_adapter ? model_load(&s->own, base_dir, err)
                           : model_load_keep(&s->own, s->path, (enum model_keep)keep, err);
    if (!rc && s->is_adapter)
        rc = model_apply_extras(&s->own, &s->lora, err);
    if (rc)
        return sys_fail(s, err);
    s->m = &s->own;
    return LK_OK;
}

void ev_system_release(struct ev_system *s)
{
    if (!s)
        return;
    lora_release(&s->lora);
    model_release(&s->own);
    s->m = NULL;
    s->l = NULL;
}
