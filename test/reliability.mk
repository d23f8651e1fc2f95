# Reliability checks (docs/reliability.md), included by the Makefile. Each builds its own
# instrumented library and test binary under lib/<check>/, apart from the normal build.
#   make check-asan       ASan + UBSan (gcc), every suite, -fno-sanitize-recover=all
#   make check-valgrind   memcheck on the normal test binary: zero errors, zero leaks
#   make check-tsan       ThreadSanitizer (gcc) on stress_suite, lora_apply's threads and
#                         const handles shared by threads (serving const_threads),
#                         library without OpenMP
#   make fuzz             libFuzzer (clang) targets in test/fuzz/, FUZZ_SECONDS each
#   make abi-check        abidiff + exported symbols against test/abi/ (abi-update)

RELIABILITY_PKGS := clang libclang-rt-14-dev abigail-tools valgrind
reliability-deps:
	@sh .ci/install-deps.sh $(RELIABILITY_PKGS)

# ---- sanitizer builds: lib/<name>/obj, lib/<name>/liblora.so, lib/<name>/lora_tests ----
# $(1) name, $(2) compiler, $(3) compile+link flags, $(4) library C flags
define SAN_BUILD
$(1)_OBJ := $$(patsubst src/%.c,lib/$(1)/obj/%.o,$$(LIB_SRC))
lib/$(1)/obj/%.o: src/%.c $$(OBJ_STAMP)
	@mkdir -p $$(dir $$@)
	$(2) $(3) $(4) $$(DEPFLAGS) -fPIC -c $$< -o $$@
-include $$($(1)_OBJ:.o=.d)
lib/$(1)/liblora.so: $$($(1)_OBJ) src/lora.map
	$(2) $(3) -shared -Wl,-soname,$$(SONAME) -Wl,--version-script=src/lora.map \
	    -o $$@ $$($(1)_OBJ) $$(LIB_LDLIBS)
	ln -sf liblora.so lib/$(1)/$$(SONAME)
lib/$(1)/lora_tests: $$(TEST_SRC) $$(wildcard test/*.h) lib/$(1)/liblora.so
	$(2) $(3) $$(APP_CFLAGS) $$(CHECK_CFLAGS) -Itest -o $$@ $$(TEST_SRC) \
	    -Llib/$(1) -Wl,-rpath,$$(CURDIR)/lib/$(1) -llora -lm $$(CHECK_LIBS)
endef

SAN_COMMON := -O1 -g -fno-omit-frame-pointer
ASAN_FLAGS := $(SAN_COMMON) -fsanitize=address,undefined -fno-sanitize-recover=all
$(eval $(call SAN_BUILD,asan,$(CC),$(ASAN_FLAGS),$(LIB_CFLAGS)))
# TSan: the library without OpenMP threads (-fopenmp-simd keeps only the simd pragmas;
# libgomp is not instrumented, so its barriers would read as races): the stress test's
# parallelism is the caller's own threads. target_clones become plain functions (their
# IFUNC resolvers run before the TSan runtime is up and crash it), so TSan sees the
# portable kernels.
TSAN_FLAGS := $(SAN_COMMON) -fsanitize=thread
TSAN_LIB_CFLAGS := $(filter-out -fopenmp,$(LIB_CFLAGS)) -fopenmp-simd -Wno-unknown-pragmas \
    -Wno-unused-variable -Wno-unused-but-set-variable '-Dtarget_clones(...)=unused'
$(eval $(call SAN_BUILD,tsan,$(CC),$(TSAN_FLAGS),$(TSAN_LIB_CFLAGS)))

ASAN_ENV := ASAN_OPTIONS=detect_leaks=1:abort_on_error=0:strict_string_checks=1:detect_stack_use_after_return=1 \
    UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
check-asan: deps
	@$(MAKE) --no-print-directory check-asan-run
check-asan-run: lib/asan/lora_tests
	$(ASAN_ENV) lib/asan/lora_tests

# Memcheck on the normal (-O2 -g) test binary, one process (CK_FORK=no) so leaks of
# every test are seen. Leaks of any kind but "still reachable" (libgomp's thread pool
# and BLIS's memory pools live until exit) are errors.
VALGRIND ?= valgrind
VALGRIND_FLAGS := --tool=memcheck --error-exitcode=99 --leak-check=full \
    --show-leak-kinds=definite,indirect,possible --errors-for-leak-kinds=definite,indirect,possible \
    --track-origins=yes --suppressions=test/valgrind.supp
check-valgrind: deps
	@sh .ci/install-deps.sh valgrind
	@$(MAKE) --no-print-directory check-valgrind-run
check-valgrind-run: $(TEST_BIN)
	CK_FORK=no $(VALGRIND) $(VALGRIND_FLAGS) $(TEST_BIN)

STRESS_THREADS ?= 8
STRESS_STEPS ?= 200
check-tsan: deps
	@$(MAKE) --no-print-directory check-tsan-run
check-tsan-run: lib/tsan/lora_tests
	CK_FORK=no CK_RUN_SUITE=stress STRESS_THREADS=$(STRESS_THREADS) STRESS_STEPS=$(STRESS_STEPS) \
	    TSAN_OPTIONS=halt_on_error=1:second_deadlock_stack=1 lib/tsan/lora_tests
	CK_FORK=no CK_RUN_SUITE=serving CK_RUN_CASE=apply \
	    TSAN_OPTIONS=halt_on_error=1:second_deadlock_stack=1 lib/tsan/lora_tests
	CK_FORK=no CK_RUN_SUITE=serving CK_RUN_CASE=const_threads \
	    TSAN_OPTIONS=halt_on_error=1:second_deadlock_stack=1 lib/tsan/lora_tests

# ---- fuzzing: one libFuzzer binary per test/fuzz/fuzz_*.c -------------------------------
# The library is built with clang, coverage and ASan+UBSan, without OpenMP (BLIS runs one
# thread; libgomp only satisfies libblis.a's references).
FUZZ_CC ?= clang
FUZZ_SECONDS ?= 60
FUZZ_TARGETS := $(patsubst test/fuzz/%.c,%,$(wildcard test/fuzz/fuzz_*.c))
FUZZ_LIB_FLAGS := -O1 -g -fno-omit-frame-pointer -fsanitize=fuzzer-no-link,address,undefined \
    -fno-sanitize-recover=all
FUZZ_GOMP := $(shell $(CC) -print-file-name=libgomp.so)
FUZZ_OBJ := $(patsubst src/%.c,lib/fuzz/obj/%.o,$(LIB_SRC))
lib/fuzz/obj/%.o: src/%.c $(OBJ_STAMP)
	@mkdir -p $(dir $@)
	$(FUZZ_CC) $(FUZZ_LIB_FLAGS) $(filter-out -fopenmp -Wmissing-prototypes,$(LIB_CFLAGS)) \
	    -Wno-unknown-pragmas -Wno-unused-variable -Wno-unused-command-line-argument \
	    $(DEPFLAGS) -c $< -o $@
-include $(FUZZ_OBJ:.o=.d)
lib/fuzz/%: test/fuzz/%.c test/fuzz/fuzz_common.h $(FUZZ_OBJ)
	$(FUZZ_CC) -O1 -g -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=all \
	    -std=c11 -D_POSIX_C_SOURCE=200809L -Iinclude -Itest/fuzz -o $@ $< $(FUZZ_OBJ) \
	    $(filter-out -fopenmp,$(LIB_LDLIBS)) $(FUZZ_GOMP)
fuzz-build: $(addprefix lib/fuzz/,$(FUZZ_TARGETS))
.SECONDARY: $(FUZZ_OBJ) # reached through the pattern rule above: keep them
# Regenerates the committed seed corpora test/fuzz/corpus_*/ (after a format change).
fuzz-seeds: $(SHARED)
	@mkdir -p lib/fuzz
	$(CC) $(CFLAGS) $(APP_CFLAGS) -o lib/fuzz/make_seeds test/fuzz/make_seeds.c $(APP_LDLIBS)
	rm -rf lib/fuzz/seeds && mkdir -p lib/fuzz/seeds && lib/fuzz/make_seeds lib/fuzz/seeds
	# Overwrites the generated seeds and keeps the rest (regression-* inputs found by fuzzing).
	for c in config gguf safetensors peft_json; do mkdir -p test/fuzz/corpus_$$c; \
	    cp lib/fuzz/seeds/corpus_$$c/* test/fuzz/corpus_$$c/; done
# Each target runs FUZZ_SECONDS on a copy of its seed corpus (the committed seeds stay
# as they are); crashes are written to lib/fuzz/crash-* and fail the run.
fuzz: reliability-deps
	@$(MAKE) --no-print-directory fuzz-run
fuzz-run: fuzz-build
	@set -e; for t in $(FUZZ_TARGETS); do \
	    seeds=test/fuzz/corpus_$${t#fuzz_}; work=lib/fuzz/corpus_$${t#fuzz_}; \
	    mkdir -p $$work; cp $$seeds/* $$work/ 2>/dev/null || true; \
	    echo "== $$t: $(FUZZ_SECONDS) s from $$seeds"; \
	    ASAN_OPTIONS=detect_leaks=1 lib/fuzz/$$t -max_total_time=$(FUZZ_SECONDS) \
	        -max_len=4096 -rss_limit_mb=2048 -timeout=10 -print_final_stats=1 \
	        -artifact_prefix=lib/fuzz/crash-$$t- $$work 2>lib/fuzz/$$t.log \
	        || { tail -n 60 lib/fuzz/$$t.log; exit 1; }; \
	    grep -E '^stat::(number_of_executed_units|peak_rss_mb)|^#[0-9]+.*DONE' lib/fuzz/$$t.log \
	        | tr '\n' ' '; echo; \
	done

# ---- ABI gate -------------------------------------------------------------------------
# The baseline test/abi/liblora.abi is abidw's description of a -g build of liblora.so
# with only the types of include/lora.h (opaque handles stay opaque); symbols.txt is its
# sorted exported-symbol list. abi-check fails on any difference: abidiff exit bit 8
# (incompatible change) and bit 4 (compatible but unrecorded change) alike. A deliberate
# change runs `make abi-update` and commits the new baseline with the change.
ABI_DIR := test/abi
ABI_LIB := lib/abi/liblora.so
ABI_OBJ := $(patsubst src/%.c,lib/abi/obj/%.o,$(LIB_SRC))
lib/abi/obj/%.o: src/%.c $(OBJ_STAMP)
	@mkdir -p $(dir $@)
	$(CC) -O0 -g $(LIB_CFLAGS) $(DEPFLAGS) -fPIC -c $< -o $@
-include $(ABI_OBJ:.o=.d)
$(ABI_LIB): $(ABI_OBJ) src/lora.map
	$(CC) -shared -Wl,-soname,$(SONAME) -Wl,--version-script=src/lora.map -o $@ $(ABI_OBJ) \
	    $(LIB_LDLIBS)
ABIDW_FLAGS := --headers-dir include --drop-private-types --no-corpus-path \
    --no-comp-dir-path --no-show-locs
lib/abi/current.abi: $(ABI_LIB)
	abidw $(ABIDW_FLAGS) --out-file $@ $(ABI_LIB)
lib/abi/symbols.txt: $(ABI_LIB)
	nm -D --defined-only $(ABI_LIB) | awk '{print $$3}' | LC_ALL=C sort > $@
abi-check: reliability-deps
	@$(MAKE) --no-print-directory abi-check-run
abi-check-run: lib/abi/current.abi lib/abi/symbols.txt
	@test -f $(ABI_DIR)/liblora.abi || { echo "abi-check: no baseline; run make abi-update"; exit 1; }
	@rc=0; abidiff --no-show-locs $(ABI_DIR)/liblora.abi lib/abi/current.abi > lib/abi/abidiff.txt || rc=$$?; \
	if [ $$((rc & 1)) -ne 0 ]; then cat lib/abi/abidiff.txt; echo "abi-check: abidiff failed ($$rc)"; exit 1; fi; \
	if [ $$((rc & 8)) -ne 0 ]; then cat lib/abi/abidiff.txt; \
	    echo "abi-check: INCOMPATIBLE ABI change (abidiff $$rc): needs a new SONAME, see docs/abi.md"; exit 1; fi; \
	if [ $$((rc & 4)) -ne 0 ]; then cat lib/abi/abidiff.txt; \
	    echo "abi-check: ABI changed but the baseline was not updated: make abi-update, commit test/abi/ with the change and a CHANGELOG line"; exit 1; fi
	@diff -u $(ABI_DIR)/symbols.txt lib/abi/symbols.txt || { \
	    echo "abi-check: exported symbols differ from $(ABI_DIR)/symbols.txt: make abi-update"; exit 1; }
	@echo "abi-check: ABI and $$(wc -l < $(ABI_DIR)/symbols.txt) exported symbols match $(ABI_DIR)/"
abi-update: reliability-deps
	@$(MAKE) --no-print-directory abi-update-run
abi-update-run: lib/abi/current.abi lib/abi/symbols.txt
	@mkdir -p $(ABI_DIR)
	cp lib/abi/current.abi $(ABI_DIR)/liblora.abi
	cp lib/abi/symbols.txt $(ABI_DIR)/symbols.txt
	@echo "abi-update: wrote $(ABI_DIR)/liblora.abi and $(ABI_DIR)/symbols.txt ($$(wc -l < $(ABI_DIR)/symbols.txt) symbols): commit them"

.PHONY: reliability-deps check-asan check-asan-run check-valgrind check-valgrind-run \
        check-tsan check-tsan-run fuzz fuzz-run fuzz-build fuzz-seeds abi-check abi-check-run \
        abi-update abi-update-run lib/abi/current.abi lib/abi/symbols.txt
