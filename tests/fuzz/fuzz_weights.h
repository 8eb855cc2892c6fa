/*
 * fuzz_weights.h - the fixed model.safetensors beside which fuzz_cfg reads each fuzzed
 * config.json (and hard_fuzz_regress replays the cfg.* fixtures): one U8 tensor "w" of 64 KiB,
 * the header padded with spaces to 8 KiB. cfg_load's bound by the weights (st_model_capacity)
 * then admits at most 167 tensors and 65,536 parameters: configs of up to 18 layers reach
 * cfg_tensors, larger ones must be refused before anything is sized from them.
 */
#ifndef LK_FUZZ_WEIGHTS_H
#define LK_FUZZ_WEIGHTS_H

#include <stdio.h>
#include <string.h>

#define FZ_WEIGHTS_HEADER 8192
#define FZ_WEIGHTS_DATA 65536

/* Writes the file to path (plain stdio); 0 on success. */
static inline int fz_weights_write(const char *path)
{
    static char h[FZ_WEIGHTS_HEADER];
    int k = snprintf(h, sizeof h, "{\"w\":{\"dtype\":\"U8\",\"shape\":[%d],\"data_offsets\":[0,%d]}}",
                     FZ_WEIGHTS_DATA, FZ_WEIGHTS_DATA);
    memset(h + k, ' ', sizeof h - (size_t)k);
    unsigned char len8[8] = { 0 };
    for (int i = 0; i < 8; i++)
        len8[i] = (unsigned char)((unsigned long long)FZ_WEIGHTS_HEADER >> (8 * i));
    FILE *f = fopen(path, "wb");
    if (!f)
        return -1;
    int bad = fwrite(len8, 1, 8, f) != 8 || fwrite(h, 1, sizeof h, f) != sizeof h;
    for (int i = 0; i < FZ_WEIGHTS_DATA && !bad; i++)
        bad = fputc(i & 255, f) == EOF;
    return fclose(f) || bad ? -1 : 0;
}

#endif
