/*
 * dash.c - `lorakit dash`: flags, then the ncurses dashboard of tui/dash.c.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../libcore/lk.h"
#include "../tui/dash.h"
#include "commands.h"
#include "opts.h"

static const struct cmd_help dash_help = {
    "dash",
    "[RUNS.db] [--run ID]",
    "Browses the runs database (default runs.db) in the terminal: the runs list with a key\n"
    "figure each, training curves (loss, eval loss, learning rate) that follow a running\n"
    "training live, the eval table with intervals and a per-question browser, per-tensor\n"
    "tables and bars by layer for svd-compress and diff, and the settings of merges.\n"
    "Keys: arrows or j/k move, Enter opens, Tab switches pane, / filters, r refreshes,\n"
    "q goes back or quits. --bench-first-draw draws one 80x24 frame off-screen and prints\n"
    "the time it took (for `make bench`).",
    "  lorakit dash runs.db\n"
    "  lorakit dash out/runs.db --run 3",
};

int cmd_dash(int argc, char **argv)
{
    long run = 0;
    int bench = 0, help = 0, n_pos = 0;
    const char *pos[1] = { NULL };
    struct lk_err err = { 0 };
    const struct opt opts[] = {
        { "run", OPT_INT, &run, "ID", "open this run at start (default: the runs list)" },
        { "bench-first-draw", OPT_FLAG, &bench, NULL, "draw one frame off-screen, print the time, exit" },
        { NULL, 0, NULL, NULL, NULL },
    };
    if (opts_parse(argc, argv, opts, pos, 1, &n_pos, &help, &err))
        return lk_cli_fail("dash", &err);
    if (help) {
        opts_usage(stdout, &dash_help, opts);
        return 0;
    }
    if (run < 0) {
        lk_errf(&err, LK_ERR_USAGE, "--run wants a run id >= 1, got %ld", run);
        return lk_cli_fail("dash", &err);
    }
    struct dash_opts o = { n_pos ? pos[0] : "runs.db", run, bench };
    int rc = dash_run(&o, &err);
    if (rc == 1 || rc == 2)
        fprintf(stderr, "lorakit dash: error: %s\n", err.msg);
    return rc;
}
