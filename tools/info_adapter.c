/*
 * info_adapter.c - `lorakit info` on a PEFT adapter folder: its base, rank(s), alpha and
 * scale per module, target modules, and its parameter count as a share of the base's (the
 * figure the LoRA argument rests on). The adapter is read by libcore's one reader
 * (lora_file_open: no base needed, so a broken adapter is refused as every command refuses it).
 * The base's size comes from base_model_name_or_path when that is a local model folder;
 * otherwise the share is reported as unknown.
 */
#include <cJSON.h>
#include <math.h>
#include <stdio.h>
#include <string.h>

#include "../libcore/cfg.h"
#include "../libcore/lora.h"
#include "commands.h"
#include "opts.h"

int info_adapter(const char *dir, int json)
{
    struct lk_err err = { 0 };
    struct lora_file lf;
    if (lora_file_open(&lf, dir, &err))
        return lk_cli_fail("info", &err);
    const struct lora_config *lc = &lf.cfg;
    lk_cli_adapter_keys("info", dir, lc);
    // parameters from the tensors themselves, ranks from each module's lora_A
    size_t params = 0;
    for (int i = 0; i < lf.st.n; i++)
        params += lf.st.t[i].numel;
    int rmin = 1 << 30, rmax = 0, n_lin = lf.n_mod;
    for (int k = 0; k < lf.n_mod; k++) {
        int r = (int)lf.mod[k].R;
        rmin = r < rmin ? r : rmin;
        rmax = r > rmax ? r : rmax;
    }
    // the base, when it is a local folder
    struct cfg c;
    int have_base = lc->base_model[0] && cfg_load(&c, lc->base_model, NULL) == LK_OK;
    int64_t base_params = have_base ? cfg_param_count(&c) : -1;
    if (have_base)
        cfg_release(&c);
    double scale = lc->use_rslora ? lc->alpha / sqrt((double)lc->r) : lc->alpha / lc->r;
    // what is adapted: the projections (as selected), LoRA on the embedding and on lm_head
    char targets[512] = "";
    if (lc->target_regex)
        snprintf(targets, sizeof targets, "regex '%.200s'", lc->target_regex);
    for (int m = 0; m < CFG_N_MODULES + 2 && !lc->target_regex; m++)
        if (m < CFG_N_MODULES ? (lc->targets & (1u << m)) != 0 : m == CFG_N_MODULES ? lc->target_embed : lc->target_head) {
            strncat(targets, targets[0] ? "," : "", sizeof targets - strlen(targets) - 1);
            strncat(targets, m < CFG_N_MODULES ? cfg_module_names[m] : m == CFG_N_MODULES ? "embed_tokens" : "lm_head",
                    sizeof targets - strlen(targets) - 1);
        }
    // modules_to_save: the modules the entries matched are the copies the file holds
    int n_saved = 0;
    for (int i = 0; i < lf.st.n; i++) {
        const struct st_tensor *t = &lf.st.t[i];
        n_saved += lf.slot[i] < 0 && t != lf.embed_A && t != lf.embed_B && t != lf.head_A && t != lf.head_B &&
                   t != lf.base_layer[0] && t != lf.base_layer[1] && t != lf.tok[0] && t != lf.tok[1];
    }
    int n_tok = lc->n_token_idx[0] + lc->n_token_idx[1];
    if (json) {
        // target_modules: the names, or the regex as read (escaped by cJSON)
        cJSON *tjs = cJSON_CreateString(lc->target_regex ? lc->target_regex : targets);
        char *tj = tjs ? cJSON_PrintUnformatted(tjs) : NULL;
        cJSON_Delete(tjs);
        struct lk_buf jp = { 0 }, jb = { 0 }; // folder names may hold quotes or backslashes
        lk_buf_json_str(&jp, dir);
        lk_buf_json_str(&jb, lc->base_model);
        printf("{\"kind\":\"adapter\",\"path\":%s,\"base_model\":%s,\"r\":%d,\"lora_alpha\":%g,"
               "\"use_rslora\":%s,\"scale\":%.9g,\"rank_min\":%d,\"rank_max\":%d,\"modules\":%d,"
               "\"target_modules\":%s,\"embedding_lora\":%s,\"lm_head_lora\":%s,\"use_dora\":%s,"
               "\"lora_bias\":%s,\"rank_patterns\":%d,\"alpha_patterns\":%d,\"modules_to_save\":%d,"
               "\"modules_to_save_modules\":%d,\"trainable_tokens\":%d,\"params\":%zu,\"base_params\":%lld,"
               "\"share\":",
               jp.oom ? "null" : jp.p, jb.oom ? "null" : jb.p, lc->r, lc->alpha, lc->use_rslora ? "true" : "false", scale, n_lin ? rmin : 0,
               rmax, n_lin, tj ? tj : "null", lf.embed_A ? "true" : "false",
               lf.head_A ? "true" : "false", lc->use_dora ? "true" : "false", lc->lora_bias ? "true" : "false",
               lc->n_rank_pattern, lc->n_alpha_pattern, lc->n_modules_to_save, n_saved, n_tok, params,
               (long long)base_params);
        if (base_params > 0)
            printf("%.9g}\n", (double)params / (double)base_params);
        else
            printf("null}\n");
        cJSON_free(tj);
        lk_buf_release(&jp);
        lk_buf_release(&jb);
    } else {
        printf("adapter      %s\n", dir);
        printf("base         %s%s\n", lc->base_model[0] ? lc->base_model : "(not named)",
               have_base ? "" : " (not a local folder)");
        printf("type         LoRA%s%s%s\n", lc->use_dora ? " (DoRA)" : "", lc->use_rslora ? " (rsLoRA)" : "",
               lc->lora_bias ? " with lora_B.bias" : "");
        printf("rank         %d", lc->r);
        if (n_lin && (rmin != rmax || rmin != lc->r))
            printf(" (per module %d..%d from rank_pattern)", rmin, rmax);
        printf("\nalpha        %g (scale %.6g%s)\n", lc->alpha, scale, lc->n_alpha_pattern ? ", alpha_pattern varies it" : "");
        printf("targets      %s (%d adapted linears", targets, n_lin);
        if (lf.embed_A)
            printf(", LoRA on embed_tokens (rank %lld)", (long long)lf.embed_A->shape[0]);
        if (lf.head_A)
            printf(", LoRA on lm_head (rank %lld)", (long long)lf.head_A->shape[0]);
        printf(")\n");
        if (lc->exclude_regex || lc->n_exclude)
            printf("excluded     %s%s\n", lc->exclude_regex ? "regex " : "",
                   lc->exclude_regex ? lc->exclude_regex : lc->exclude[0]);
        if (lc->layers && lc->n_layers)
            printf("layers       %d listed in layers_to_transform\n", lc->n_layers);
        if (lc->n_modules_to_save)
            printf("modules_to_save %d entr%s matching %d module%s (full copies)\n", lc->n_modules_to_save,
                   lc->n_modules_to_save == 1 ? "y" : "ies", n_saved, n_saved == 1 ? "" : "s");
        if (n_tok)
            printf("trainable tokens %d (rows replaced)\n", n_tok);
        printf("parameters   %zu", params);
        if (base_params > 0)
            printf(" = %.3f%% of the base's %lld\n", 100.0 * (double)params / (double)base_params,
                   (long long)base_params);
        else
            printf(" (base size unknown)\n");
    }
    lora_file_close(&lf);
    return 0;
}
