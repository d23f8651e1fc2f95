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
# -fopenmp-simd: only the `omp simd` pragmas; the library's threads are its own pool.
BASE_CFLAGS := -std=c11 -D_POSIX_C_SOURCE=200809L -fopenmp-simd $(WARN)

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
# src/build_config.h derives the feature macros below when a build does not give them;
# the Makefile states them so that the probes here decide.
ifeq ($(BLIS_LINK),static)
  BLIS_LIBS ?= -Wl,--exclude-libs,ALL $(BLIS_LIBDIR)/libblis.a
  BLIS_DEFS := -DLORA_BLIS_STATIC
  LIBS_PRIVATE := -lblis -lgomp -lm -lpthread
else
  BLIS_LIBS ?= -L$(BLIS_LIBDIR) -Wl,-rpath,$(BLIS_LIBDIR) -lblis
  BLIS_DEFS := -DLORA_NO_BLIS_LOOKUP
  LIBS_PRIVATE := -lblis -lgomp -lm -lpthread
endif
# glibc's libmvec (vector expf for the exact backend's softmax); LIBMVEC=no to skip.
LIBMVEC ?= $(if $(wildcard $(shell $(CC) -print-file-name=libmvec.so)),yes,no)
ifeq ($(LIBMVEC),yes)
  BLIS_DEFS += -DLORA_HAVE_LIBMVEC
  MVEC_LIBS := -lmvec
  LIBS_PRIVATE += -lmvec
else
  BLIS_DEFS += -DLORA_NO_LIBMVEC
endif
# cJSON (Debian libcjson-dev) parses adapter_config.json and safetensors headers. Linked
# dynamically; the version script keeps liblora from re-exporting any of it.
CJSON_CFLAGS ?= $(patsubst -I%,-isystem %,$(shell pkg-config --cflags libcjson 2>/dev/null))
CJSON_LIBS ?= $(or $(shell pkg-config --libs libcjson 2>/dev/null),-lcjson)
LIBS_PRIVATE += $(CJSON_LIBS)
# -lgomp only satisfies libblis.a's references (Debian's BLIS is the OpenMP flavour;
# liblora runs it one thread per call, which starts no OpenMP thread).
LIB_LDLIBS := $(BLIS_LIBS) -lgomp $(MVEC_LIBS) $(CJSON_LIBS) -lm -lpthread

CHECK_CFLAGS ?= $(shell pkg-config --cflags check 2>/dev/null)
# threads_suite calls the library from inside an OpenMP team of its own.
CHECK_CFLAGS += -fopenmp
CHECK_LIBS ?= $(shell pkg-config --libs check 2>/dev/null)

# ---- sources ----
LIB_SRC := $(wildcard src/api/*.c src/layer/*.c src/backend/*.c src/linalg/*.c src/io/*.c)
PIC_OBJ := $(patsubst src/%.c,lib/obj/pic/%.o,$(LIB_SRC))
STATIC_OBJ := $(patsubst src/%.c,lib/obj/static/%.o,$(LIB_SRC))
LIB_CFLAGS := $(BASE_CFLAGS) $(BLIS_CFLAGS) $(BLIS_DEFS) $(CJSON_CFLAGS) -Iinclude -fvisibility=hidden
# Every object rule writes a .d file next to its object (headers it included, each also
# as an empty target so a deleted header is no error): touching a header rebuilds only
# the objects that include it. Objects also depend on OBJ_STAMP, created once, so that
# objects of a tree built before dependency files existed are rebuilt once.
DEPFLAGS := -MMD -MP
OBJ_STAMP := lib/obj/.depfiles

SHARED := lib/liblora.so.$(VERSION)
STATIC := lib/liblora.a

TEST_SRC := $(wildcard test/*.c)
TEST_BIN := lib/test/lora_tests
EXAMPLES := $(patsubst examples/%.c,lib/examples/%,$(wildcard examples/*.c))
BENCHES := $(patsubst test/bench/%.c,lib/bench/%,$(wildcard test/bench/*.c))
APP_CFLAGS := -std=c11 -D_POSIX_C_SOURCE=200809L $(WARN) -Iinclude
APP_LDLIBS := -Llib -Wl,-rpath,$(CURDIR)/lib -llora -lm

.PHONY: all lib check check-build check-c check-c-run demo deps install uninstall clean \
        header-check symbols-check static-symbols-check include-check deps-check \
        install-check amalgamation amalgamation-check check-vendor print-sources examples bench
.PHONY: serve-check check-bindings check-python check-python-install check-rust check-cpp check-mpi

all: lib
lib: $(SHARED) $(STATIC)

$(OBJ_STAMP):
	@mkdir -p $(dir $@) && touch $@

lib/obj/pic/%.o: src/%.c $(OBJ_STAMP)
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS) $(LIB_CFLAGS) $(DEPFLAGS) -fPIC -c $< -o $@

# The static archive leaves BLIS to the final link (libblis.a or libblis.so alike), so
# it reaches the kernel-context lookup only libblis.a exports through a weak reference
# (src/build_config.h): used when the program links libblis.a.
lib/obj/static/%.o: src/%.c $(OBJ_STAMP)
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS) $(filter-out -DLORA_BLIS_STATIC -DLORA_NO_BLIS_LOOKUP,$(LIB_CFLAGS)) \
	    $(DEPFLAGS) -c $< -o $@

-include $(PIC_OBJ:.o=.d) $(STATIC_OBJ:.o=.d)

$(SHARED): $(PIC_OBJ) src/lora.map
	$(CC) -shared -Wl,-soname,$(SONAME) -Wl,--version-script=src/lora.map \
	    -Wl,--no-undefined -o $@ $(PIC_OBJ) $(LDFLAGS) $(LIB_LDLIBS)
	ln -sf liblora.so.$(VERSION) lib/$(SONAME)
	ln -sf $(SONAME) lib/liblora.so

# One relocatable object (ld -r) with every symbol but the lora_* API made local: the
# objects are built with -fvisibility=hidden, and --localize-hidden turns those
# internals into file-local symbols, so a program linking liblora.a sees only lora_*
# (target_clones' ifunc symbols are not hidden, hence the keep-global list too).
LD ?= ld
OBJCOPY ?= objcopy
STATIC_ONE := lib/obj/liblora-static.o
$(STATIC): $(STATIC_OBJ)
	rm -f $@ $(STATIC_ONE)
	$(LD) -r -o $(STATIC_ONE) $^
	$(OBJCOPY) --localize-hidden --wildcard --keep-global-symbol='lora_*' $(STATIC_ONE)
	$(AR) rcs $@ $(STATIC_ONE)

# Rebuilt every time: it records PREFIX/LIBDIR, which may differ between installs.
# LIBDIR and INCLUDEDIR under PREFIX are written relative to ${prefix}, so
# `pkg-config --define-prefix` finds a tree that was moved after installation.
PC_LIBDIR := $(patsubst $(PREFIX)/%,$${prefix}/%,$(LIBDIR))
PC_INCLUDEDIR := $(patsubst $(PREFIX)/%,$${prefix}/%,$(INCLUDEDIR))
.PHONY: lib/lora.pc
lib/lora.pc: lora.pc.in include/lora.h
	@mkdir -p lib
	sed -e 's|@PREFIX@|$(PREFIX)|' -e 's|@LIBDIR@|$(PC_LIBDIR)|' \
	    -e 's|@INCLUDEDIR@|$(PC_INCLUDEDIR)|' -e 's|@VERSION@|$(VERSION)|' \
	    -e 's|@LIBS_PRIVATE@|$(LIBS_PRIVATE)|' $< > $@

# ---- tests ----
$(TEST_BIN): $(TEST_SRC) $(wildcard test/*.h) $(SHARED)
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS) $(APP_CFLAGS) $(CHECK_CFLAGS) -Itest -o $@ $(TEST_SRC) \
	    $(APP_LDLIBS) $(CHECK_LIBS)

check-c-run: $(TEST_BIN)
	$(TEST_BIN)

# deps-check alone first: it changes header times for a moment, which a parallel
# compile must not see.
check-build: check-c-run header-check symbols-check static-symbols-check include-check serve-check
	@$(MAKE) --no-print-directory deps-check
	@$(MAKE) --no-print-directory install-check amalgamation-check check-vendor
	@$(MAKE) --no-print-directory check-bindings

# Public entry points: install what is missing first, then run in a fresh make so the
# probes above see the new packages. check-c is the C suites alone (the inner loop).
check: deps
	@$(MAKE) --no-print-directory check-build
check-c: deps
	@$(MAKE) --no-print-directory check-c-run

demo: deps
	@$(MAKE) --no-print-directory lib/examples/demo
	lib/examples/demo

deps:
	@sh .ci/install-deps.sh

# ---- examples ----
examples: $(EXAMPLES)
# The continuous-batching example checks its batched outputs against each request alone.
serve-check: lib/examples/serve
	lib/examples/serve 12 128
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

check-bindings: check-python check-python-install check-rust check-cpp check-mpi

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

# pip install of the package into a venv (offline), tested from outside the tree.
check-python-install: $(SHARED)
	@py=""; for p in $(PYTHON_CANDIDATES); do \
	    if $$p -c 'import numpy, pytest' >/dev/null 2>&1; then py=$$p; break; fi; done; \
	if [ -z "$$py" ]; then echo "check-python-install: skipped (no python3 with numpy and pytest)"; \
	else sh src/bindings/python/tests/install_check.sh "$$py" $(CURDIR)/lib/$(SONAME) \
	    $(CURDIR)/lib/python-install; fi

# Offline and dependency-free; build output goes to lib/rust (cleaned by make clean).
check-rust: $(SHARED)
	@cargo=$$(command -v $(CARGO) || { [ -x "$$HOME/.cargo/bin/cargo" ] && echo "$$HOME/.cargo/bin/cargo"; } || true); \
	if [ -z "$$cargo" ]; then \
	    echo "check-rust: skipped (cargo not found)"; \
	else \
	    echo "check-rust: cargo test --offline (src/bindings/rust)"; \
	    cd src/bindings/rust && CARGO_TARGET_DIR=$(CURDIR)/lib/rust LORA_LIB_DIR=$(CURDIR)/lib \
	        "$$cargo" test --offline -q && \
	    echo "check-rust: cargo run --offline (a dependent crate, without LD_LIBRARY_PATH)" && \
	    cd dependent && env -u LD_LIBRARY_PATH CARGO_TARGET_DIR=$(CURDIR)/lib/rust/dependent \
	        LORA_LIB_DIR=$(CURDIR)/lib "$$cargo" run --offline -q; \
	fi

check-cpp: $(SHARED)
	@if command -v $(CXX) >/dev/null 2>&1; then \
	    $(MAKE) --no-print-directory $(CPP_EXAMPLE) $(CPP_CONSTANTS) && $(CPP_EXAMPLE) && \
	    $(CPP_CONSTANTS) include/lora.h; \
	else echo "check-cpp: skipped ($(CXX) not found)"; fi
$(CPP_EXAMPLE): examples/cpp/example.cpp examples/cpp/lora.hpp include/lora.h $(SHARED)
	@mkdir -p $(dir $@)
	$(CXX) -std=c++17 $(CFLAGS) -Wall -Wextra -Wpedantic -Werror -Iinclude -Iexamples/cpp \
	    -o $@ $< $(APP_LDLIBS)
# lora.hpp's enums and Config setters against the enums of lora.h.
CPP_CONSTANTS := lib/examples/cpp/constants_test
$(CPP_CONSTANTS): examples/cpp/constants_test.cpp examples/cpp/lora.hpp include/lora.h $(SHARED)
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

# ---- real llama.cpp as the consumer of liblora's GGUF (not part of check): node-llama-cpp's
# prebuilt llama.cpp and its converters (test/interop/run.sh, docs/format-gguf.md). Needs
# npm or a cached install, python3 with numpy and torch; skipped with a message otherwise.
.PHONY: check-interop
check-interop: $(SHARED)
	@sh test/interop/run.sh $(CURDIR)/lib/liblora.so

# ---- benchmarks (not part of check): one program per test/bench/*.c ----
bench: deps
	@$(MAKE) --no-print-directory bench-run
bench-run: $(BENCHES)
	@for b in $(BENCHES); do echo "== $$b"; $$b || exit 1; done
	@echo "== test/bench/bench_torch.py"; py=""; for p in $(PYTHON_CANDIDATES); do \
	    if $$p -c 'import numpy, torch' 2>/dev/null; then py=$$p; break; fi; done; \
	if [ -z "$$py" ]; then echo "bench_torch: skipped (no python3 with numpy and torch: apt-get install python3-torch)"; \
	else LORA_LIBRARY=$(CURDIR)/lib/liblora.so $$py test/bench/bench_torch.py || exit 1; fi
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

static-symbols-check: $(STATIC)
	@bad=$$(nm -g --defined-only $(STATIC) | awk 'NF == 3 {print $$3}' | grep -v '^lora_'); \
	if [ -n "$$bad" ]; then echo "static-symbols-check: liblora.a defines non-lora symbols:"; \
	    echo "$$bad"; exit 1; fi; \
	echo "static-symbols-check: liblora.a defines $$(nm -g --defined-only $(STATIC) | grep -c ' T lora_') lora_* functions, nothing else"

# ---- build checks (docs/design.md, docs/vendoring.md) ----
PYTHON ?= python3
include-check:
	@$(PYTHON) test/tools/check_includes.py

# Each header made newer in turn must rebuild exactly the objects including it.
deps-check: $(PIC_OBJ) $(STATIC_OBJ)
	@MAKE="$(MAKE)" $(PYTHON) test/tools/check_deps.py $(PIC_OBJ) $(STATIC_OBJ)

# Installs to a staging DESTDIR, moves the tree elsewhere, and builds examples/minimal.c
# from what `pkg-config --define-prefix` says there: once against liblora.so, once
# against liblora.a with the Libs.private (no liblora.so in the result).
IC_DIR := $(CURDIR)/lib/install-check
IC_PREFIX := /opt/lora-install-check
IC_MOVED := $(IC_DIR)/moved
IC_CFLAGS := $(filter-out -Iinclude,$(APP_CFLAGS))
IC_PC = PKG_CONFIG_PATH=$(IC_MOVED)/lib/pkgconfig pkg-config --define-prefix
install-check: lib
	@rm -rf $(IC_DIR)
	@$(MAKE) --no-print-directory install DESTDIR=$(IC_DIR)/stage PREFIX=$(IC_PREFIX) \
	    LIBDIR=$(IC_PREFIX)/lib INCLUDEDIR=$(IC_PREFIX)/include \
	    PKGCONFIGDIR=$(IC_PREFIX)/lib/pkgconfig >/dev/null
	@mv $(IC_DIR)/stage$(IC_PREFIX) $(IC_MOVED)
	@flags="$$($(IC_PC) --cflags --libs lora)"; \
	case "$$flags" in *$(IC_MOVED)/include*$(IC_MOVED)/lib*) ;; \
	    *) echo "install-check: pkg-config --define-prefix gave: $$flags"; exit 1;; esac; \
	set -x; $(CC) $(IC_CFLAGS) -o $(IC_DIR)/minimal examples/minimal.c $$flags \
	    -Wl,-rpath,$(IC_MOVED)/lib && $(IC_DIR)/minimal >/dev/null
	@flags="$$($(IC_PC) --static --cflags --libs lora | sed 's/-llora\b/-l:liblora.a/')"; \
	set -x; $(CC) $(IC_CFLAGS) -o $(IC_DIR)/minimal-static examples/minimal.c $$flags && \
	    $(IC_DIR)/minimal-static >/dev/null
	@if readelf -d $(IC_DIR)/minimal-static | grep -q 'liblora\.so'; then \
	    echo "install-check: minimal-static still needs liblora.so"; exit 1; fi
	@echo "install-check: relocated install found by pkg-config --define-prefix; examples/minimal runs against liblora.so and liblora.a"

# ---- vendoring (docs/vendoring.md): the source list and the amalgamation ----
print-sources:
	@echo $(LIB_SRC)

AMALG_DIR := lib/amalgamation
AMALG := $(AMALG_DIR)/liblora.c
amalgamation: $(AMALG)
$(AMALG): src/tools/amalgamate.py $(LIB_SRC) $(wildcard src/*.h src/*/*.h) include/lora.h
	$(PYTHON) src/tools/amalgamate.py -o $(AMALG_DIR) $(LIB_SRC)

# Built as a vendor would: `cc -c` with only BLIS's and cJSON's include flags (and the
# OpenMP flag while the library uses OpenMP), warnings as errors. Then: only lora_*
# defined, libmvec's vector expf used without any -D, and a program linking libblis.a
# gets the AVX-512 kernel context on CPUs that have it (test/vendor/probe.c).
AMALG_CHECK := lib/amalgamation/check
AMALG_OMP := $(filter -fopenmp%,$(BASE_CFLAGS))
AMALG_LIBS := $(BLIS_LIBDIR)/libblis.a $(filter-out -lblis,$(LIBS_PRIVATE))
amalgamation-check: $(AMALG)
	@mkdir -p $(AMALG_CHECK)
	$(CC) $(CFLAGS) $(WARN) -Werror $(AMALG_OMP) $(BLIS_CFLAGS) $(CJSON_CFLAGS) -c $(AMALG) \
	    -o $(AMALG_CHECK)/liblora.o
	@bad=$$(nm -g --defined-only $(AMALG_CHECK)/liblora.o | awk 'NF == 3 {print $$3}' | grep -v '^lora_'); \
	if [ -n "$$bad" ]; then echo "amalgamation-check: non-lora symbols defined:"; echo "$$bad"; exit 1; fi
	@if [ "$(LIBMVEC)" = yes ] && ! nm $(AMALG_CHECK)/liblora.o | grep -q '_ZGV.*expf'; then \
	    echo "amalgamation-check: libmvec's vector expf is not used"; exit 1; fi
	$(CC) $(filter-out -Iinclude,$(APP_CFLAGS)) -I$(AMALG_DIR) -o $(AMALG_CHECK)/minimal examples/minimal.c \
	    $(AMALG_CHECK)/liblora.o $(AMALG_LIBS)
	$(AMALG_CHECK)/minimal >/dev/null
	$(CC) $(CFLAGS) $(AMALG_OMP) $(BLIS_CFLAGS) $(CJSON_CFLAGS) -I$(AMALG_DIR) \
	    -o $(AMALG_CHECK)/probe test/vendor/probe.c $(AMALG_LIBS)
	$(AMALG_CHECK)/probe
	@echo "amalgamation-check: $(AMALG) builds alone, defines only lora_*, keeps the fast paths"
	@# The generator on test/amalgamate/: names two files both define stay apart.
	$(PYTHON) src/tools/amalgamate.py --root test/amalgamate -o $(AMALG_CHECK)/fixture
	$(CC) -std=c11 $(WARN) -Werror -I$(AMALG_CHECK)/fixture -o $(AMALG_CHECK)/fixture/test \
	    test/amalgamate/main.c $(AMALG_CHECK)/fixture/liblora.c
	$(AMALG_CHECK)/fixture/test

# A CMake project vendoring the amalgamation (test/vendor/CMakeLists.txt) runs
# examples/minimal.c; skipped when cmake is missing (.ci/run installs it).
CMAKE ?= cmake
check-vendor: $(AMALG)
	@if command -v $(CMAKE) >/dev/null 2>&1; then \
	    rm -rf lib/vendor && \
	    $(CMAKE) -S test/vendor -B lib/vendor -DLORA_AMALGAMATION_DIR=$(CURDIR)/$(AMALG_DIR) \
	        -DLORA_EXAMPLE=$(CURDIR)/examples/minimal.c >lib/vendor.log 2>&1 && \
	    $(CMAKE) --build lib/vendor >>lib/vendor.log 2>&1 && \
	    (cd lib/vendor && ctest --output-on-failure >>../vendor.log 2>&1) || \
	    { cat lib/vendor.log; echo "check-vendor: the CMake vendoring test failed"; exit 1; }; \
	    echo "check-vendor: a CMake project built the amalgamation and ran examples/minimal.c"; \
	else echo "check-vendor: skipped (cmake not found: apt-get install cmake)"; fi

# ---- install ----
install: lib lib/lora.pc
	install -d $(DESTDIR)$(LIBDIR) $(DESTDIR)$(INCLUDEDIR) $(DESTDIR)$(PKGCONFIGDIR)
	install -m 644 include/lora.h $(DESTDIR)$(INCLUDEDIR)/lora.h
	install -m 644 examples/cpp/lora.hpp $(DESTDIR)$(INCLUDEDIR)/lora.hpp
	install -m 755 $(SHARED) $(DESTDIR)$(LIBDIR)/
	ln -sf liblora.so.$(VERSION) $(DESTDIR)$(LIBDIR)/$(SONAME)
	ln -sf $(SONAME) $(DESTDIR)$(LIBDIR)/liblora.so
	install -m 644 $(STATIC) $(DESTDIR)$(LIBDIR)/
	install -m 644 lib/lora.pc $(DESTDIR)$(PKGCONFIGDIR)/lora.pc

uninstall:
	rm -f $(DESTDIR)$(INCLUDEDIR)/lora.h $(DESTDIR)$(INCLUDEDIR)/lora.hpp \
	    $(DESTDIR)$(LIBDIR)/liblora.so.$(VERSION) \
	    $(DESTDIR)$(LIBDIR)/$(SONAME) $(DESTDIR)$(LIBDIR)/liblora.so \
	    $(DESTDIR)$(LIBDIR)/liblora.a $(DESTDIR)$(PKGCONFIGDIR)/lora.pc

clean:
	rm -rf lib/obj lib/test lib/examples lib/bench lib/liblora.* lib/lora.pc lib/rust \
	    lib/python-install
	rm -rf lib/amalgamation lib/install-check lib/vendor lib/vendor.log
	rm -rf lib/asan lib/tsan lib/fuzz lib/abi

include test/bench/calibrate.mk

# ---- reliability: check-asan, check-valgrind, check-tsan, fuzz, abi-check, abi-update
# (docs/reliability.md)
include test/reliability.mk
include test/mutation/mutation.mk
