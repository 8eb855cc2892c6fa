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
          libpcre2-dev libutf8proc-dev pkg-config
PKGCONF = sqlite3 libcjson libpcre2-8 libutf8proc ncursesw
INCS    = -I/usr/include/x86_64-linux-gnu/openblas-pthread -I/usr/include/openblas \
          $(shell pkg-config --cflags $(PKGCONF) 2>/dev/null)
LIBS    = $(shell pkg-config --libs $(PKGCONF) 2>/dev/null) -lopenblas -llapacke -lm -lpthread

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

.PHONY: all deps test bench demo clean fuzz check-deps base-model bench-svd
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

$(LIB): $(CORE_OBJ)
	@mkdir -p $(dir $@)
	rm -f $@
	ar rcs $@ $^

$(BIN): $(APP_OBJ) $(LIB)
	@mkdir -p $(dir $@)
	$(CC) $(LDX) -o $@ $(APP_OBJ) $(LIB) $(LIBS)

# The test registry: every `TEST(name)` line in tests/test_*.c, as X(name).
$(OUT)/tests/registry.h: $(TEST_SRC)
	@mkdir -p $(dir $@)
	grep -ho '^TEST([A-Za-z0-9_]*)' $(TEST_SRC) | sed 's/^TEST(\(.*\))/X(\1)/' > $@.tmp && mv $@.tmp $@

$(OUT)/tests/run.o: tests/run.c $(OUT)/tests/registry.h
	@mkdir -p $(dir $@)
	$(CC) $(ALL) -I$(OUT)/tests -c tests/run.c -o $@

$(TESTBIN): $(TEST_OBJ) $(APPLIB_OBJ) $(LIB)
	$(CC) $(LDX) -o $@ $(TEST_OBJ) $(APPLIB_OBJ) $(LIB) $(LIBS)

# T=prefix runs only the tests whose names start with it.
test: check-deps $(BIN) $(TESTBIN) node-ref
	OPENBLAS_NUM_THREADS=1 LORAKIT=$(CURDIR)/$(BIN) $(TESTBIN) $(T)

# Benchmarks: one program per bench/bench_<name>.c, run with the caller's OPENBLAS_NUM_THREADS.
bench: bench-svd bench-tok

bench-svd: check-deps $(LIB)
	@mkdir -p $(OUT)/bench
	$(CC) $(ALL) -o $(OUT)/bench/bench_svd bench/bench_svd.c $(LIB) $(LIBS)
	$(OUT)/bench/bench_svd

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
	$(CC) $(ALL) -o $(OUT)/bench/bench_tok bench/bench_tok.c $(LIB) $(LIBS)
	$(OUT)/bench/bench_tok "$${LK_SHARED:-../shared}"

# lorakit's own small base model, trained from scratch (datasets/base-model/README.md). Slow
# (10-35 minutes on 2 cores), so never part of `make` or `make test`; the demo uses the committed
# copy. Needs `make datasets`; datasets/base-model is replaced only when every step succeeded.
RC_EVAL = $(OUT)/rc_eval
$(RC_EVAL): $(OUT)/datasets/rc_eval.o $(LIB)
	$(CC) $(LDX) -o $@ $(OUT)/datasets/rc_eval.o $(LIB) $(LIBS)

base-model: datasets $(BIN) $(RC_EVAL)
	sh datasets/base_model.sh $(BIN) $(MEDWORLD) $(RC_EVAL) $(DATASETS_OUT) datasets/base-model build/base-model

clean:
	rm -rf build bin libcore/libcore.a

-include $(CORE_OBJ:.o=.d) $(APP_OBJ:.o=.d) $(TEST_OBJ:.o=.d)
