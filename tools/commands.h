/*
 * commands.h - the subcommands of lorakit.
 *
 * Adding a command (git's builtin.h checklist):
 *   1. write tools/<name>.c with `int cmd_<name>(int argc, char **argv)`;
 *   2. declare it below and add its row to the table in tools/lorakit.c (sorted by name);
 *   3. give it a flag table (tools/opts.h) so --help shows every flag and an example;
 *   4. add an end-to-end test in tests/ and a section in README.md.
 * argv[0] is the command name; the return value is the exit status (0 ok, 1 error, 2 usage).
 */
#ifndef LK_COMMANDS_H
#define LK_COMMANDS_H

int cmd_convert(int argc, char **argv);
int cmd_eval(int argc, char **argv);
int cmd_generate(int argc, char **argv);
int cmd_index(int argc, char **argv);
int cmd_diff(int argc, char **argv);
int cmd_dash(int argc, char **argv);
int cmd_info(int argc, char **argv);
int cmd_init(int argc, char **argv);
int cmd_logits(int argc, char **argv);
int cmd_search(int argc, char **argv);
int cmd_merge(int argc, char **argv);
int cmd_svd_compress(int argc, char **argv);
int cmd_tokenize(int argc, char **argv);
int cmd_tokenizer(int argc, char **argv);
int cmd_train(int argc, char **argv);

/* `lorakit info` on a PEFT adapter folder (tools/info_adapter.c): prints, returns the exit status. */
int info_adapter(const char *dir, int json);
/* `lorakit info` on a GGUF file (tools/info_gguf.c): prints, returns the exit status. */
int info_gguf(const char *path, int json);
/* A model config's fields (transformers' names) added to a JSON object (tools/info.c). */
struct cJSON;
struct cfg;
void info_json_cfg(struct cJSON *o, const struct cfg *c);

/* Data parallelism for cmd_train: bin/lorakit-mpi (mpi/lorakit_mpi.c) points this at its MPI
 * hooks before dispatch; NULL (one process) in bin/lorakit. Borrowed. */
struct train_dist;
extern const struct train_dist *train_cli_dist;

#endif
