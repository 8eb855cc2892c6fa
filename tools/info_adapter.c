/*
 * info_adapter.c - `lorakit info` on a PEFT adapter folder. TEMPORARY placeholder so the
 * build links: the lead replaces this file with the real implementation.
 */
#include <stdio.h>

#include "../libcore/lk.h"
#include "commands.h"
#include "opts.h"

int info_adapter(const char *dir, int json)
{
    struct lk_err err = { 0 };
    (void)json;
    lk_errf(&err, LK_ERR_UNSUPPORTED, "%s: adapter folders are not supported yet", dir);
    return lk_cli_fail("info", &err);
}
