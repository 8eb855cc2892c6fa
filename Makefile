# lorakit - build, dependencies, tests, benchmarks, demo.
#   make            build libcore/libcore.a and bin/lorakit (installs missing packages first)
#   make test       build and run every test (last line: N passed, N failed, N skipped)
#   make test SAN=1 the same under AddressSanitizer + UBSan (objects in build/san)
#   make demo       the whole pipeline on the project's own model and data
#   make bench      benchmarks (ratios against a comparison measured in the same run)
#   make deps       apt-get the Debian packages below when any is missing

CC      ?= cc
CSTD    = -std=c11 -D_POSIX_C_SOURCE=200809L
WARN    = -Wall -Wextra -Wshadow -Wstrict-prototypes -Wmissing-prototypes \
          -Wpointer-arith -Wvla -Wwrite-strings -Wformat-security \
          -Werror=implicit-function-declaration
WERROR ?= -Werror
CFLAGS ?= -O2 -g
OMP     = -fopenmp
SANFLAGS = -O1 -g -fsanitize=address,undefined -fno-sanitize-recover=all -fno-omit-frame-pointer

PKGS    = libopenblas-dev liblapacke-dev libsqlite3-dev libcjson-dev libncurses-dev \
          libpcre2-dev libutf8proc-dev pkg-config tmux python3-jinja2
# Include paths and libraries come from pkg-config (Debian ships a .pc for each). ncursesw's
# cflags (-D_DEFAULT_SOURCE -D_XOPEN_SOURCE=600) reach tui/ only, the one place that includes
# curses: everything else compiles at the POSIX level CSTD names. LDFLAGS is added to every link.
PKGCONF = sqlite3 libcjson libpcre2-8 libutf8proc openblas lapacke
INCS    = $(shell pkg-config --cflags $(PKGCONF) 2>/dev/null)
CURSES_CFLAGS = $(shell pkg-config --cflags ncursesw 2>/dev/null)
LIBS    = $(shell pkg-config --libs $(PKGCONF) ncursesw 2>/dev/null) -lm -lpthread

ifeq ($(SAN),1)
  OUT   = build/san
  ALL   = $(CSTD) $(WARN) $(WERROR) $(SANFLAGS) $(OMP) $(INCS)
  LDX   = -fsanitize=address,undefined $(OMP)
  LIB   = $(OUT)/libcore.a
  BIN   = $(OUT)/bin/lorakit
else
  OUT   = build/opt
  ALL   = $(CSTD) $(WARN) $(WERROR) $(CFLAGS) $(OMP) $(INCS)
  LDX   = $(OMP)
  LIB   = libcore/libcore.a
  BIN   = bin/lorakit
endif

# MPI=1: also bin/lorakit-mpi, data-parallel `train` over Open MPI (mpi/*.c, compiled with mpicc
# only; bin/lorakit keeps no MPI dependency). Its Debian packages are installed only with MPI=1.
MPI_PKGS  = libopenmpi-dev openmpi-bin
MPICC     = OMPI_CC=$(CC) mpicc
MPI_SRC   = $(sort $(wildcard mpi/*.c))
MPI_OBJ   = $(MPI_SRC:%.c=$(OUT)/%.o)
MPI_BIN   = $(dir $(BIN))lorakit-mpi
ifeq ($(MPI),1)
  PKGS   += $(MPI_PKGS)
endif

CORE_SRC  = $(sort $(wildcard libcore/*.c))
EVAL_SRC  = $(sort $(wildcard eval/*.c))
TUI_SRC   = $(sort $(wildcard tui/*.c))
TOOL_SRC  = $(sort $(wildcard tools/*.c))
TEST_SRC  = $(sort $(wildcard tests/test_*.c))
TEST_AUX  = $(sort $(wildcard tests/ref_*.c tests/fix_*.c))
CORE_OBJ  = $(CORE_SRC:%.c=$(OUT)/%.o)
APP_OBJ   = $(EVAL_SRC:%.c=$(OUT)/%.o) $(TUI_SRC:%.c=$(OUT)/%.o) $(TOOL_SRC:%.c=$(OUT)/%.o)
TEST_OBJ  = $(TEST_SRC:%.c=$(OUT)/%.o) $(TEST_AUX:%.c=$(OUT)/%.o) $(OUT)/tests/run.o
TESTBIN   = $(OUT)/tests/run
# app objects other than main(), linked into the test runner too
APPLIB_OBJ = $(filter-out $(OUT)/tools/lorakit.o,$(APP_OBJ))

.PHONY: all deps test bench demo clean fuzz check-deps base-model bench-svd bench-diff bench-merge \
        bench-compress
all: check-deps $(BIN)

# Installs the Debian packages when one is missing (dpkg-query is quick; apt only if needed).
check-deps:
	@missing=""; for p in $(PKGS); do dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "ok installed" || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then echo "installing:$$missing"; $(MAKE) --no-print-directory deps; fi

deps:
	@SUDO=""; [ "$$(id -u)" = 0 ] || SUDO=sudo; \
	$$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $(PKGS)

$(OUT)/%.o: %.c
	@mkdir -p $(dir $@)
	$(CC) $(ALL) -MMD -MP -c $< -o $@

$(OUT)/tui/%.o: tui/%.c
	@mkdir -p $(dir $@)
	$(CC) $(ALL) $(CURSES_CFLAGS) -MMD -MP -c $< -o $@

$(LIB): $(CORE_OBJ)
	@mkdir -p $(dir $@)
	rm -f $@
	ar rcs $@ $^

$(BIN): $(APP_OBJ) $(LIB)
	@mkdir -p $(dir $@)
	$(CC) $(LDX) $(LDFLAGS) -o $@ $(APP_OBJ) $(LIB) $(LIBS)

# The test registry: every `TEST(name)` line in tests/test_*.c, as X(name). Remade on every run
# (a removed test file changes no prerequisite's time) but replaced only when its text changes.
.PHONY: FORCE
$(OUT)/tests/registry.h: $(TEST_SRC) FORCE
	@mkdir -p $(dir $@)
	@grep -ho '^TEST([A-Za-z0-9_]*)' $(TEST_SRC) | sed 's/^TEST(\(.*\))/X(\1)/' > $@.tmp && \
	  { cmp -s $@.tmp $@ && rm -f $@.tmp || mv $@.tmp $@; }

$(OUT)/tests/run.o: tests/run.c $(OUT)/tests/registry.h
	@mkdir -p $(dir $@)
	$(CC) $(ALL) -I$(OUT)/tests -c tests/run.c -o $@

$(TESTBIN): $(TEST_OBJ) $(APPLIB_OBJ) $(LIB)
	$(CC) $(LDX) $(LDFLAGS) -o $@ $(TEST_OBJ) $(APPLIB_OBJ) $(LIB) $(LIBS)

# The synthetic medical worlds of the demo (datasets/README.md); generated, never committed.
MEDWORLD          = $(OUT)/medworld
MEDWORLD_BG_SEED  = 1
MEDWORLD_NEW_SEED = 2
DATASETS_OUT      = datasets/out
.PHONY: datasets
$(MEDWORLD): $(OUT)/datasets/medworld.o $(LIB)
	$(CC) $(LDX) $(LDFLAGS) -o $@ $(OUT)/datasets/medworld.o $(LIB) $(LIBS)

datasets: check-deps $(MEDWORLD)
	$(MEDWORLD) --world background --seed $(MEDWORLD_BG_SEED) --out $(DATASETS_OUT)/background --overwrite
	$(MEDWORLD) --world new --seed $(MEDWORLD_NEW_SEED) --out $(DATASETS_OUT)/new --overwrite

# T=prefix runs only the tests whose names start with it.
test: check-deps $(BIN) $(TESTBIN) $(MEDWORLD) node-ref $(OUT)/tests/faultshim.so
	OPENBLAS_NUM_THREADS=1 LORAKIT=$(CURDIR)/$(BIN) MEDWORLD=$(CURDIR)/$(MEDWORLD) \
	  LK_FAULTSHIM=$(CURDIR)/$(OUT)/tests/faultshim.so $(TESTBIN) $(T)

# Benchmarks: one program per bench/bench_<name>.c, run with the caller's OPENBLAS_NUM_THREADS.
bench: bench-svd bench-tok bench-train bench-diff bench-dash bench-merge bench-compress bench-eval bench-fts

bench-svd: check-deps $(LIB)
	@mkdir -p $(OUT)/bench
	$(CC) $(ALL) $(LDFLAGS) -o $(OUT)/bench/bench_svd bench/bench_svd.c $(LIB) $(LIBS)
	$(OUT)/bench/bench_svd

bench-diff: check-deps $(LIB) $(BIN)
	@mkdir -p $(OUT)/bench
	$(CC) $(ALL) $(LDFLAGS) -o $(OUT)/bench/bench_diff bench/bench_diff.c $(LIB) $(LIBS)
	$(OUT)/bench/bench_diff $(CURDIR)/$(BIN) $(OUT)/bench-diff
# Time to the first frame of `lorakit dash` on a 100,000-step training run against 1,000 steps.
.PHONY: bench-dash
bench-dash: check-deps $(LIB) $(BIN)
	@mkdir -p $(OUT)/bench
	$(CC) $(ALL) $(LDFLAGS) -o $(OUT)/bench/bench_dash bench/bench_dash.c $(LIB) $(LIBS)
	$(OUT)/bench/bench_dash $(BIN) $(OUT)/bench
# merge of a rank-16 adapter into a 3 GB bf16 qwen2-1.5b (made once in build/bench-merge, kept):
# peak RSS and time against cp of the same files. Needs about 10 GB of free disk.
bench-merge: check-deps $(LIB) $(BIN)
	@mkdir -p $(OUT)/bench
	$(CC) $(ALL) $(LDFLAGS) -o $(OUT)/bench/bench_merge bench/bench_merge.c $(LIB) $(LIBS)
	$(OUT)/bench/bench_merge $(CURDIR)/$(BIN) $(CURDIR)/build/bench-merge
# svd-compress end to end (randomized vs exact; a 0.5B-shaped fine-tune, BENCH_05B=0 skips it).
bench-compress: check-deps $(LIB) $(BIN)
	@mkdir -p $(OUT)/bench
	$(CC) $(ALL) $(LDFLAGS) -o $(OUT)/bench/bench_compress bench/bench_compress.c $(LIB) $(LIBS)
	$(OUT)/bench/bench_compress $(CURDIR)/$(BIN) $(CURDIR)/$(OUT)/bench/compress
# generation with/without the KV cache, and eval of 200 questions x 4 modes, on 2 threads; then
# the Qwen2.5-0.5B shape: prefill/decode against llama.cpp F16, eval s/question at --batch 1 and
# other batches on MedQuAD dev (BENCH_EVAL_QUESTIONS questions, default 10; BENCH_EVAL_BATCHES)
.PHONY: bench-eval
bench-eval: check-deps $(LIB) $(BIN) llama-ref
	@mkdir -p $(OUT)/bench
	$(CC) $(ALL) $(LDFLAGS) -o $(OUT)/bench/bench_eval bench/bench_eval.c $(LIB) $(LIBS)
	OPENBLAS_NUM_THREADS=2 OMP_NUM_THREADS=2 $(OUT)/bench/bench_eval $(CURDIR)/$(BIN)
	OPENBLAS_NUM_THREADS=2 OMP_NUM_THREADS=2 bench/bench_eval_05b.sh $(CURDIR)/$(BIN)

# The reference tokenizer (npm @huggingface/tokenizers) for tokenizer tests and benchmarks, in
# build/node. When npm is unreachable this says so and the tests that need it are skipped.
NODE_REF = build/node/node_modules/@huggingface/tokenizers/package.json
.PHONY: node-ref bench-tok
node-ref:
	@[ -f $(NODE_REF) ] || ! command -v npm >/dev/null || { mkdir -p build/node && \
	  timeout 180 npm install --prefix build/node --no-audit --no-fund --silent \
	  @huggingface/tokenizers@0.2.0 >/dev/null 2>&1 || echo "node-ref: npm install failed (tests needing it skip)"; }

bench-tok: check-deps $(LIB) node-ref
	@mkdir -p $(OUT)/bench
	$(CC) $(ALL) $(LDFLAGS) -o $(OUT)/bench/bench_tok bench/bench_tok.c $(LIB) $(LIBS)
	$(OUT)/bench/bench_tok "$${LK_SHARED:-../shared}"

# lorakit's own small base model, trained from scratch (datasets/base-model/README.md). Slow
# (about 65 minutes on 2 cores), so never part of `make` or `make test`; the demo uses the committed
# copy. Needs `make datasets`; datasets/base-model is replaced only when every step succeeded.
RC_EVAL = $(OUT)/rc_eval
$(RC_EVAL): $(OUT)/datasets/rc_eval.o $(LIB)
	$(CC) $(LDX) $(LDFLAGS) -o $@ $(OUT)/datasets/rc_eval.o $(LIB) $(LIBS)

base-model: datasets $(BIN) $(RC_EVAL)
	sh datasets/base_model.sh $(BIN) $(MEDWORLD) $(RC_EVAL) $(DATASETS_OUT) datasets/base-model build/base-model

clean:
	rm -rf build bin libcore/libcore.a

-include $(CORE_OBJ:.o=.d) $(APP_OBJ:.o=.d) $(TEST_OBJ:.o=.d) $(OUT)/datasets/medworld.d
-include $(CORE_OBJ:.o=.d) $(APP_OBJ:.o=.d) $(TEST_OBJ:.o=.d) $(MPI_OBJ:.o=.d)

# ---- MPI (make MPI=1): bin/lorakit-mpi, its test (tests/test_mpi.c skips without it), bench-mpi
$(OUT)/mpi/%.o: mpi/%.c | check-deps
	@mkdir -p $(dir $@)
	$(MPICC) $(ALL) -DLK_MPI -MMD -MP -c $< -o $@

$(MPI_BIN): $(MPI_OBJ) $(APPLIB_OBJ) $(LIB)
	@mkdir -p $(dir $@)
	$(MPICC) $(LDX) $(LDFLAGS) -o $@ $(MPI_OBJ) $(APPLIB_OBJ) $(LIB) $(LIBS)

ifeq ($(MPI),1)
all: $(MPI_BIN)
test: $(MPI_BIN)
else ifneq ($(wildcard $(MPI_BIN)),)
test: $(MPI_BIN)  # built earlier with MPI=1: the tests use it, keep it up to date
endif

# Tokens/s with 1 and 2 ranks (one per core) on the small config, and the scaling efficiency.
.PHONY: bench-mpi
bench-mpi:
	$(MAKE) --no-print-directory MPI=1 all
	bench/bench_mpi.sh $(CURDIR)/$(BIN) $(CURDIR)/$(MPI_BIN)

# Training throughput against plain PyTorch (Debian's python3-torch, installed by deps-bench).
.PHONY: bench-train deps-bench
deps-bench:
	@/usr/bin/python3 -c 'import torch' 2>/dev/null || { SUDO=""; [ "$$(id -u)" = 0 ] || SUDO=sudo; \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq python3-torch time; }

# 1 thread, 2 threads and 2 MPI ranks per config (BENCH_7B=1: also the Qwen2.5-7B shape, 16 GB of disk).
bench-train: check-deps $(BIN) deps-bench
	@mkdir -p $(OUT)/bench
	$(MAKE) --no-print-directory MPI=1 all
	$(CC) $(ALL) $(LDFLAGS) -o $(OUT)/bench/bench_sgemm bench/bench_sgemm.c $(LIB) $(LIBS)
	bench/bench_train.sh $(CURDIR)/$(BIN) $(OUT)/bench/bench_sgemm $(CURDIR)/$(MPI_BIN)

# The whole pipeline on the project's own base model and data (datasets/demo.sh).
demo: check-deps $(BIN) $(MEDWORLD)
	datasets/demo.sh demo

# ---- hardening: libFuzzer targets (tests/fuzz/fuzz_*.c) and the fault-injection shim ----
#   make fuzz                 builds build/fuzz (clang, ASan + UBSan + libFuzzer), seeds
#                             build/fuzz/corpus/<target> from the project's own fixtures (the
#                             corpora grow from run to run), runs each target FUZZ_SECONDS (600 =
#                             the issue's 10 minutes) from a new random seed each run, printed
#                             (FUZZ_SEED=N repeats a run; target i gets seed N + i), and prints
#                             executions per target. Every finding (build/fuzz/crash/<target>/)
#                             is kept as tests/fuzz-regress/<kind>.fuzz-<sha1>.hex, which make test
#                             replays (hard_fuzz_regress); the artifact then moves to crash/<t>/kept.
#   make fuzz FUZZ_ARGS="-seed=1 -runs=20000"
#                             CI's regression pass: a -seed in FUZZ_ARGS replaces the rotation.
#   make fuzz FUZZ_TARGETS="fuzz_cfg fuzz_st"
#                             only those targets.
#   make fuzz-build           only builds the targets.
FUZZ_PKGS    = clang-14 libclang-rt-14-dev libomp-14-dev
FUZZ_SECONDS ?= 600
FUZZ_CC      ?= clang
FUZZ_OUT     = build/fuzz
FUZZ_SAN     = -fsanitize=address,undefined -fno-sanitize-recover=all -fno-omit-frame-pointer
# The same code as the main build, OpenMP included (LLVM's libomp); fuzz runs one thread.
FUZZ_CFLAGS  = $(CSTD) $(WARN) $(WERROR) -O1 -g $(FUZZ_SAN) -fopenmp -fsanitize=fuzzer-no-link $(INCS)
FUZZ_ALL     = $(patsubst tests/fuzz/%.c,%,$(sort $(wildcard tests/fuzz/fuzz_*.c)))
FUZZ_TARGETS ?= $(FUZZ_ALL)
ifeq ($(origin FUZZ_SEED),undefined)
  FUZZ_SEED := $(shell date +%s)
endif
FUZZ_REGRESS = tests/fuzz-regress
FUZZ_OBJ     = $(CORE_SRC:%.c=$(FUZZ_OUT)/%.o) $(EVAL_SRC:%.c=$(FUZZ_OUT)/%.o)
.PHONY: fuzz fuzz-build fuzz-corpus fuzz-deps shim
fuzz-deps:
	@missing=""; for p in $(FUZZ_PKGS); do dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "ok installed" || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then SUDO=""; [ "$$(id -u)" = 0 ] || SUDO=sudo; echo "installing:$$missing"; \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $$missing; fi

$(FUZZ_OUT)/%.o: %.c
	@mkdir -p $(dir $@)
	$(FUZZ_CC) $(FUZZ_CFLAGS) -MMD -MP -c $< -o $@

$(FUZZ_OUT)/bin/%: tests/fuzz/%.c tests/fuzz/fuzz_util.h tests/fuzz/fuzz_weights.h $(FUZZ_OBJ)
	@mkdir -p $(dir $@)
	$(FUZZ_CC) $(CSTD) $(WARN) $(WERROR) -O1 -g $(FUZZ_SAN) -fopenmp -fsanitize=fuzzer $(INCS) $(LDFLAGS) -o $@ $< $(FUZZ_OBJ) $(LIBS)

fuzz-build: check-deps fuzz-deps $(FUZZ_TARGETS:%=$(FUZZ_OUT)/bin/%)

fuzz-corpus: $(BIN)
	tests/fuzz/seed.sh $(CURDIR)/$(BIN) $(FUZZ_OUT)/corpus

# One target: run it (from seed $(FUZZ_SEED) + its index unless FUZZ_ARGS names a seed), then
# keep each artifact as a regression fixture (fuzz_fts has no replay kind: its command is printed).
fuzz: fuzz-build fuzz-corpus
	@case "$(FUZZ_ARGS)" in *-seed=*) rot=0;; *) rot=1; echo "fuzz seed $(FUZZ_SEED) (FUZZ_SEED=$(FUZZ_SEED) make fuzz repeats this run)";; esac; \
	i=0; for t in $(FUZZ_TARGETS); do i=$$((i + 1)); mkdir -p $(FUZZ_OUT)/crash/$$t/kept $(FUZZ_OUT)/work/$$t; \
	  seed=""; [ $$rot = 0 ] || seed="-seed=$$(($(FUZZ_SEED) + i))"; \
	  echo "== $$t: $(FUZZ_SECONDS) s $$seed $(FUZZ_ARGS)"; \
	  ( cd $(FUZZ_OUT)/work/$$t && ASAN_OPTIONS=detect_leaks=1 OPENBLAS_NUM_THREADS=1 OMP_NUM_THREADS=1 \
	    ../../bin/$$t $$seed $(FUZZ_ARGS) -max_total_time=$(FUZZ_SECONDS) -timeout=20 -rss_limit_mb=2048 -max_len=65536 \
	    -artifact_prefix=../../crash/$$t/ ../../corpus/$$t ) > $(FUZZ_OUT)/$$t.log 2>&1; rc=$$?; \
	  grep -E '^(#[0-9]+\s+DONE|Done [0-9]+ runs)' $(FUZZ_OUT)/$$t.log | tail -2; \
	  if [ $$rc -ne 0 ]; then echo "$$t: FINDING (see $(FUZZ_OUT)/$$t.log, $(FUZZ_OUT)/crash/$$t/)"; fail=1; fi; \
	  for f in $(FUZZ_OUT)/crash/$$t/*; do [ -f "$$f" ] || continue; k=$${t#fuzz_}; \
	    if [ $$k = fts ]; then echo "  $$f: replay with $(FUZZ_OUT)/bin/$$t $$f (add its case to tests/test_fts.c)"; fail=1; continue; fi; \
	    r=$(FUZZ_REGRESS)/$$k.fuzz-$$(sha1sum < "$$f" | cut -c1-12).hex; \
	    { echo "# $$t $$(basename "$$f") $$seed $(FUZZ_ARGS)"; od -An -v -tx1 "$$f"; } > "$$r" && mv "$$f" $(FUZZ_OUT)/crash/$$t/kept/ && \
	      echo "  kept as $$r (make test replays it: hard_fuzz_regress)"; fail=1; \
	  done; \
	done; exit $${fail:-0}

# LD_PRELOAD fault injection for tests/test_hard.c (full disk, read-only destination).
SHIM = $(OUT)/tests/faultshim.so
shim: $(SHIM)
$(SHIM): tests/faultshim.c
	@mkdir -p $(dir $@)
	$(CC) $(CSTD) -D_GNU_SOURCE $(WARN) $(WERROR) -O1 -g -fPIC -shared $(LDFLAGS) -o $@ $< -ldl
.SECONDARY: $(FUZZ_OBJ)
-include $(FUZZ_OBJ:.o=.d)

# Retrieval on MedQuAD: document recall@5 and ms/query of lorakit's ranking against plain BM25,
# measured in the same run (needs ../shared/data/medquad; skipped without it).
.PHONY: bench-fts
bench-fts: check-deps $(BIN)
	bench/bench_fts.sh $(CURDIR)/$(BIN)

# ---- llama.cpp as a test peer (tests/llama_ref.mjs, tests/test_gguf.c): npm node-llama-cpp,
# pinned exactly, with its prebuilt CPU build of llama.cpp for this Linux platform only
# (--omit=optional leaves out the CUDA and Vulkan builds), in build/llama. No install scripts
# run, so nothing is downloaded or built from source. Without npm or the registry this says so
# and the tests that need the peer are skipped.
LLAMA_REF_VERSION = 3.21.1
LLAMA_REF = build/llama/node_modules/node-llama-cpp/package.json
.PHONY: llama-ref
llama-ref:
	@grep -qs '"version": "$(LLAMA_REF_VERSION)"' $(LLAMA_REF) || ! command -v npm >/dev/null || { \
	  rm -rf build/llama && mkdir -p build/llama && timeout 300 npm install --prefix build/llama \
	  --no-audit --no-fund --silent --ignore-scripts --omit=optional --save-exact \
	  node-llama-cpp@$(LLAMA_REF_VERSION) @node-llama-cpp/linux-$$(node -p process.arch)@$(LLAMA_REF_VERSION) \
	  >/dev/null 2>&1 || echo "llama-ref: npm install failed (tests needing llama.cpp skip)"; }
test: llama-ref
