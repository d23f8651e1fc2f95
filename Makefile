# liblora build. `make` builds lib/liblora.a and lib/liblora.so.X.Y.Z; `make check`
# installs missing packages (.ci/install-deps.sh), builds and runs the tests;
# `make demo` does the same for the demo. See README.md.

VERSION_MAJOR := $(shell sed -n 's/^\#define LORA_VERSION_MAJOR \([0-9]*\).*/\1/p' include/lora.h)
VERSION_MINOR := $(shell sed -n 's/^\#define LORA_VERSION_MINOR \([0-9]*\).*/\1/p' include/lora.h)
VERSION_PATCH := $(shell sed -n 's/^\#define LORA_VERSION_PATCH \([0-9]*\).*/\1/p' include/lora.h)
VERSION := $(VERSION_MAJOR).$(VERSION_MINOR).$(VERSION_PATCH)
SONAME := liblora.so.$(VERSION_MAJOR)

PREFIX ?= /usr/local
LIBDIR ?= $(PREFIX)/lib
INCLUDEDIR ?= $(PREFIX)/include
PKGCONFIGDIR ?= $(LIBDIR)/pkgconfig
DESTDIR ?=

CC ?= cc
CFLAGS ?= -O2 -g
WARN := -Wall -Wextra -Wshadow -Wstrict-prototypes -Wmissing-prototypes
BASE_CFLAGS := -std=c11 -D_POSIX_C_SOURCE=200809L -fopenmp $(WARN)

# ---- BLIS: pkg-config if it has a .pc, else Debian's multiarch layout ----
# BLIS_LINK=static (default) links libblis.a into liblora.so, private to it, and lets
# the library pick BLIS's AVX-512 kernels; BLIS_LINK=shared uses libblis.so.
BLIS_LINK ?= static
MULTIARCH := $(shell $(CC) -print-multiarch 2>/dev/null)
BLIS_PC := $(shell pkg-config --exists blis 2>/dev/null && echo yes)
ifeq ($(BLIS_PC),yes)
  BLIS_CFLAGS ?= $(patsubst -I%,-isystem %,$(shell pkg-config --cflags blis))
  BLIS_LIBDIR ?= $(shell pkg-config --variable=libdir blis)
else
  BLIS_FLAVOUR_DIR := $(firstword $(wildcard /usr/include/$(MULTIARCH)/blis-openmp \
      /usr/include/$(MULTIARCH)/blis-pthread /usr/include/$(MULTIARCH)/blis-serial \
      /usr/include/blis))
  BLIS_CFLAGS ?= -isystem $(BLIS_FLAVOUR_DIR)
  BLIS_LIBDIR ?= $(patsubst /usr/include/%,/usr/lib/%,$(BLIS_FLAVOUR_DIR))
endif
ifeq ($(BLIS_LINK),static)
  BLIS_LIBS ?= -Wl,--exclude-libs,ALL $(BLIS_LIBDIR)/libblis.a
  BLIS_DEFS := -DLORA_BLIS_STATIC
  LIBS_PRIVATE := -lblis -lgomp -lm -lpthread
else
  BLIS_LIBS ?= -L$(BLIS_LIBDIR) -Wl,-rpath,$(BLIS_LIBDIR) -lblis
  BLIS_DEFS :=
  LIBS_PRIVATE := -lblis -lgomp -lm -lpthread
endif
# glibc's libmvec (vector expf for the exact backend's softmax); LIBMVEC=no to skip.
LIBMVEC ?= $(if $(wildcard $(shell $(CC) -print-file-name=libmvec.so)),yes,no)
ifeq ($(LIBMVEC),yes)
  BLIS_DEFS += -DLORA_HAVE_LIBMVEC
  MVEC_LIBS := -lmvec
  LIBS_PRIVATE += -lmvec
endif
# cJSON (Debian libcjson-dev) parses adapter_config.json and safetensors headers. Linked
# dynamically; the version script keeps liblora from re-exporting any of it.
CJSON_CFLAGS ?= $(patsubst -I%,-isystem %,$(shell pkg-config --cflags libcjson 2>/dev/null))
CJSON_LIBS ?= $(or $(shell pkg-config --libs libcjson 2>/dev/null),-lcjson)
LIBS_PRIVATE += $(CJSON_LIBS)
LIB_LDLIBS := $(BLIS_LIBS) -fopenmp $(MVEC_LIBS) $(CJSON_LIBS) -lm -lpthread

CHECK_CFLAGS ?= $(shell pkg-config --cflags check 2>/dev/null)
CHECK_LIBS ?= $(shell pkg-config --libs check 2>/dev/null)

# ---- sources ----
LIB_SRC := $(wildcard src/api/*.c src/layer/*.c src/backend/*.c src/linalg/*.c src/io/*.c)
PIC_OBJ := $(patsubst src/%.c,lib/obj/pic/%.o,$(LIB_SRC))
STATIC_OBJ := $(patsubst src/%.c,lib/obj/static/%.o,$(LIB_SRC))
LIB_CFLAGS := $(BASE_CFLAGS) $(BLIS_CFLAGS) $(BLIS_DEFS) $(CJSON_CFLAGS) -Iinclude -fvisibility=hidden

SHARED := lib/liblora.so.$(VERSION)
STATIC := lib/liblora.a

TEST_SRC := $(wildcard test/*.c)
TEST_BIN := lib/test/lora_tests
EXAMPLES := $(patsubst examples/%.c,lib/examples/%,$(wildcard examples/*.c))
BENCHES := $(patsubst test/bench/%.c,lib/bench/%,$(wildcard test/bench/*.c))
APP_CFLAGS := -std=c11 -D_POSIX_C_SOURCE=200809L $(WARN) -Iinclude
APP_LDLIBS := -Llib -Wl,-rpath,$(CURDIR)/lib -llora -lm

.PHONY: all lib check check-build demo deps install uninstall clean header-check \
        symbols-check examples bench
.PHONY: check-bindings check-python check-rust check-cpp check-mpi

all: lib
lib: $(SHARED) $(STATIC)

lib/obj/pic/%.o: src/%.c $(wildcard src/*/*.h) include/lora.h
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS) $(LIB_CFLAGS) -fPIC -c $< -o $@

# The static archive leaves BLIS to the final link (libblis.a or libblis.so alike), so
# it does not use the kernel-context lookup only libblis.a exports.
lib/obj/static/%.o: src/%.c $(wildcard src/*/*.h) include/lora.h
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS) $(filter-out -DLORA_BLIS_STATIC,$(LIB_CFLAGS)) -c $< -o $@

$(SHARED): $(PIC_OBJ) src/lora.map
	$(CC) -shared -Wl,-soname,$(SONAME) -Wl,--version-script=src/lora.map \
	    -Wl,--no-undefined -o $@ $(PIC_OBJ) $(LDFLAGS) $(LIB_LDLIBS)
	ln -sf liblora.so.$(VERSION) lib/$(SONAME)
	ln -sf $(SONAME) lib/liblora.so

$(STATIC): $(STATIC_OBJ)
	rm -f $@
	$(AR) rcs $@ $^

# Rebuilt every time: it records PREFIX/LIBDIR, which may differ between installs.
.PHONY: lib/lora.pc
lib/lora.pc: lora.pc.in include/lora.h
	sed -e 's|@PREFIX@|$(PREFIX)|' -e 's|@LIBDIR@|$(LIBDIR)|' \
	    -e 's|@INCLUDEDIR@|$(INCLUDEDIR)|' -e 's|@VERSION@|$(VERSION)|' \
	    -e 's|@LIBS_PRIVATE@|$(LIBS_PRIVATE)|' $< > $@

# ---- tests ----
$(TEST_BIN): $(TEST_SRC) $(wildcard test/*.h) $(SHARED)
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS) $(APP_CFLAGS) $(CHECK_CFLAGS) -Itest -o $@ $(TEST_SRC) \
	    $(APP_LDLIBS) $(CHECK_LIBS)

check-build: $(TEST_BIN) header-check symbols-check
	$(TEST_BIN)
	@$(MAKE) --no-print-directory check-bindings

# Public entry points: install what is missing first, then run in a fresh make so the
# probes above see the new packages.
check: deps
	@$(MAKE) --no-print-directory check-build

demo: deps
	@$(MAKE) --no-print-directory lib/examples/demo
	lib/examples/demo

deps:
	@sh .ci/install-deps.sh

# ---- examples ----
examples: $(EXAMPLES)
lib/examples/%: examples/%.c $(SHARED)
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS) $(APP_CFLAGS) -o $@ $< $(APP_LDLIBS)

# ---- bindings and the C++/MPI examples (docs/python.md, rust.md, cpp.md, mpi.md) ----
# check-bindings runs each part only when its toolchain is present (a message says what
# was skipped). PYTHON_CANDIDATES: interpreters tried in order for numpy + pytest.
PYTHON_CANDIDATES ?= python3 /usr/bin/python3
CARGO ?= cargo
MPICC ?= mpicc
MPIRUN ?= mpirun
CPP_EXAMPLE := lib/examples/cpp/example
MPI_EXAMPLE := lib/examples/mpi/train_mpi

check-bindings: check-python check-rust check-cpp check-mpi

check-python: $(SHARED)
	@py=""; for p in $(PYTHON_CANDIDATES); do \
	    if $$p -c 'import numpy, pytest' >/dev/null 2>&1; then py=$$p; break; fi; done; \
	if [ -z "$$py" ]; then \
	    echo "check-python: skipped (no python3 with numpy and pytest: apt-get install python3-numpy python3-pytest)"; \
	else \
	    echo "check-python: $$py -m pytest src/bindings/python/tests"; \
	    PYTHONDONTWRITEBYTECODE=1 LORA_LIBRARY=$(CURDIR)/lib/liblora.so \
	        $$py -m pytest -q -p no:cacheprovider src/bindings/python/tests; \
	fi

# Offline and dependency-free; build output goes to lib/rust (cleaned by make clean).
check-rust: $(SHARED)
	@cargo=$$(command -v $(CARGO) || { [ -x "$$HOME/.cargo/bin/cargo" ] && echo "$$HOME/.cargo/bin/cargo"; } || true); \
	if [ -z "$$cargo" ]; then \
	    echo "check-rust: skipped (cargo not found)"; \
	else \
	    echo "check-rust: cargo test --offline (src/bindings/rust)"; \
	    cd src/bindings/rust && CARGO_TARGET_DIR=$(CURDIR)/lib/rust LORA_LIB_DIR=$(CURDIR)/lib \
	        "$$cargo" test --offline -q; \
	fi

check-cpp: $(SHARED)
	@if command -v $(CXX) >/dev/null 2>&1; then \
	    $(MAKE) --no-print-directory $(CPP_EXAMPLE) && $(CPP_EXAMPLE); \
	else echo "check-cpp: skipped ($(CXX) not found)"; fi
$(CPP_EXAMPLE): examples/cpp/example.cpp examples/cpp/lora.hpp include/lora.h $(SHARED)
	@mkdir -p $(dir $@)
	$(CXX) -std=c++17 $(CFLAGS) -Wall -Wextra -Wpedantic -Werror -Iinclude -Iexamples/cpp \
	    -o $@ $< $(APP_LDLIBS)

check-mpi: $(SHARED)
	@if command -v $(MPICC) >/dev/null 2>&1 && command -v $(MPIRUN) >/dev/null 2>&1; then \
	    $(MAKE) --no-print-directory $(MPI_EXAMPLE) && sh examples/mpi/run_test.sh $(MPI_EXAMPLE); \
	else echo "check-mpi: skipped (mpicc/mpirun not found: apt-get install openmpi-bin libopenmpi-dev)"; fi
$(MPI_EXAMPLE): examples/mpi/train_mpi.c include/lora.h $(SHARED)
	@mkdir -p $(dir $@)
	$(MPICC) $(CFLAGS) $(APP_CFLAGS) -Werror -o $@ $< $(APP_LDLIBS)

# ---- benchmarks (not part of check): one program per test/bench/*.c ----
bench: deps
	@$(MAKE) --no-print-directory bench-run
bench-run: $(BENCHES)
	@for b in $(BENCHES); do echo "== $$b"; $$b || exit 1; done
	@if command -v gnuplot >/dev/null; then \
	    gnuplot -e "csv='lib/bench/poly.csv'; out='lib/bench/poly.png'" \
	        test/bench/poly_plot.gp 2>/dev/null && echo "wrote lib/bench/poly.png"; \
	else echo "gnuplot not found: no figure (apt-get install gnuplot-nox)"; fi
# Benchmarks may call BLIS themselves (a reference sgemm) with the library's BLIS flags.
BENCH_CFLAGS := -fopenmp $(BLIS_CFLAGS) $(BLIS_DEFS)
BENCH_LDLIBS := $(BLIS_LIBS) $(MVEC_LIBS) -lpthread
lib/bench/%: test/bench/%.c $(wildcard test/bench/*.h) $(SHARED)
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS) $(APP_CFLAGS) $(BENCH_CFLAGS) -Itest/bench -o $@ $< $(APP_LDLIBS) \
	    $(BENCH_LDLIBS)

# ---- ABI hygiene ----
header-check:
	@mkdir -p lib/obj
	printf '#include <lora.h>\nint main(void){return lora_version_number()==0;}\n' > lib/obj/hc.c
	$(CC) -std=c99 -Wall -Wextra -Wpedantic -Werror -Iinclude -fsyntax-only lib/obj/hc.c
	printf '#include <lora.h>\nint main(){return lora_version_number()==0;}\n' > lib/obj/hc.cpp
	$(CXX) -std=c++11 -Wall -Wextra -Wpedantic -Werror -Iinclude -fsyntax-only lib/obj/hc.cpp
	@echo "header-check: lora.h compiles alone as C99 and C++"

symbols-check: $(SHARED)
	@bad=$$(nm -D --defined-only $(SHARED) | awk '{print $$3}' | grep -v '^lora_' | grep -v '^LORA_' ); \
	if [ -n "$$bad" ]; then echo "symbols-check: non-lora symbols exported:"; echo "$$bad"; exit 1; fi; \
	echo "symbols-check: $$(nm -D --defined-only $(SHARED) | grep -c ' T lora_') lora_* functions, nothing else exported"

# ---- install ----
install: lib lib/lora.pc
	install -d $(DESTDIR)$(LIBDIR) $(DESTDIR)$(INCLUDEDIR) $(DESTDIR)$(PKGCONFIGDIR)
	install -m 644 include/lora.h $(DESTDIR)$(INCLUDEDIR)/lora.h
	install -m 755 $(SHARED) $(DESTDIR)$(LIBDIR)/
	ln -sf liblora.so.$(VERSION) $(DESTDIR)$(LIBDIR)/$(SONAME)
	ln -sf $(SONAME) $(DESTDIR)$(LIBDIR)/liblora.so
	install -m 644 $(STATIC) $(DESTDIR)$(LIBDIR)/
	install -m 644 lib/lora.pc $(DESTDIR)$(PKGCONFIGDIR)/lora.pc

uninstall:
	rm -f $(DESTDIR)$(INCLUDEDIR)/lora.h $(DESTDIR)$(LIBDIR)/liblora.so.$(VERSION) \
	    $(DESTDIR)$(LIBDIR)/$(SONAME) $(DESTDIR)$(LIBDIR)/liblora.so \
	    $(DESTDIR)$(LIBDIR)/liblora.a $(DESTDIR)$(PKGCONFIGDIR)/lora.pc

clean:
	rm -rf lib/obj lib/test lib/examples lib/bench lib/liblora.* lib/lora.pc lib/rust
	rm -rf lib/asan lib/tsan lib/fuzz lib/abi

include test/bench/calibrate.mk

# ---- reliability: check-asan, check-valgrind, check-tsan, fuzz, abi-check, abi-update
# (docs/reliability.md)
include test/reliability.mk
