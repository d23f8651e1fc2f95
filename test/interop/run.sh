#!/bin/sh
# make check-interop: liblora's GGUF adapters applied by real llama.cpp, the one that
# node-llama-cpp 3.21.1 ships (prebuilt libllama/libggml for linux-x64, and its
# llama.cpp source with convert_hf_to_gguf.py, convert_lora_to_gguf.py and gguf-py).
# See llama_interop.py for the checks and docs/format-gguf.md for the results.
#
#   sh test/interop/run.sh /path/to/liblora.so
#
# INTEROP_CACHE (default ~/.cache/liblora-interop): the npm install (83 MB) and the
# unpacked llama.cpp source, reused offline by later runs. INTEROP_WORK (default
# lib/interop): the test's files. Without npm or the network (and no cached install),
# without python3 + numpy + torch, or off linux-x64, the test is skipped with a message
# and exit status 0, unless INTEROP_REQUIRED=1 (then a skip fails).
set -eu

LIB=${1:?usage: run.sh /path/to/liblora.so}
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
CACHE=${INTEROP_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/liblora-interop}
WORK=${INTEROP_WORK:-$ROOT/lib/interop}
VERSION=3.21.1
PY=${INTEROP_PYTHON:-/usr/bin/python3}

skip() {
    echo "check-interop: SKIPPED: $*"
    [ "${INTEROP_REQUIRED:-0}" = 1 ] && exit 1
    exit 0
}

[ "$(uname -s)-$(uname -m)" = Linux-x86_64 ] || skip "node-llama-cpp's prebuilt llama.cpp used here is for linux-x64"

# Python: numpy and torch (the converters), sentencepiece (the test model's
# tokenizer), tqdm and yaml (gguf-py). Debian packages them; install what is missing.
py_ok() { "$PY" -c 'import numpy, torch, sentencepiece, tqdm, yaml' >/dev/null 2>&1; }
if ! py_ok && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "check-interop: apt-get install python3-numpy python3-torch python3-sentencepiece python3-tqdm python3-yaml"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q python3-numpy python3-torch \
        python3-sentencepiece python3-tqdm python3-yaml >/dev/null 2>&1 || true
fi
py_ok || skip "$PY lacks numpy, torch, sentencepiece, tqdm or yaml (Debian: python3-numpy python3-torch python3-sentencepiece python3-tqdm python3-yaml)"

# node-llama-cpp and its linux-x64 binaries, without install scripts (they would build
# or download llama.cpp) and without the other platforms' optional packages.
PKG=$CACHE/node_modules/node-llama-cpp
BINS=$CACHE/node_modules/@node-llama-cpp/linux-x64/bins/linux-x64
have_pkg() {
    [ -f "$BINS/libllama.v0.4.0.so" ] &&
        grep -q "\"version\": \"$VERSION\"" "$PKG/package.json" 2>/dev/null
}
if ! have_pkg; then
    command -v npm >/dev/null 2>&1 || skip "npm not found and no cached install in $CACHE"
    mkdir -p "$CACHE"
    echo "check-interop: npm install node-llama-cpp@$VERSION into $CACHE"
    npm install --prefix "$CACHE" --no-audit --no-fund --ignore-scripts --omit=optional \
        "node-llama-cpp@$VERSION" "@node-llama-cpp/linux-x64@$VERSION" >"$CACHE/npm.log" 2>&1 ||
        skip "npm install failed (no network?): see $CACHE/npm.log"
    have_pkg || skip "node-llama-cpp@$VERSION did not bring libllama.v0.4.0.so for linux-x64"
fi

# The llama.cpp source it was built from (a git bundle inside the package).
SRC=$CACHE/llama.cpp
if [ ! -f "$SRC/convert_hf_to_gguf.py" ]; then
    command -v git >/dev/null 2>&1 || skip "git is needed to unpack llama.cpp's source bundle"
    rm -rf "$SRC"
    git clone -q "$PKG/llama/gitRelease.bundle" "$SRC" 2>/dev/null ||
        skip "cannot unpack $PKG/llama/gitRelease.bundle"
fi

# The logits program, against that source's llama.h and the prebuilt libraries.
CC=${CC:-cc}
PROG=$CACHE/llama_logits
if [ ! -x "$PROG" ] || [ "$HERE/llama_logits.c" -nt "$PROG" ]; then
    "$CC" -std=c11 -O2 -Wall -Wextra -I "$SRC/include" -I "$SRC/ggml/include" \
        -o "$PROG" "$HERE/llama_logits.c" "$BINS/libllama.v0.4.0.so" \
        "$BINS/libggml.v0.4.0.so" "$BINS/libggml-base.so" -Wl,-rpath,"$BINS"
fi

echo "check-interop: llama.cpp of node-llama-cpp@$VERSION ($BINS)"
env LORA_LIBRARY="$LIB" LLAMA_BACKEND_DIR="$BINS" PYTHONDONTWRITEBYTECODE=1 \
    PYTHONPATH="$ROOT/src/bindings/python:$SRC/gguf-py:$HERE/shim" \
    "$PY" "$HERE/llama_interop.py" "$WORK" "$SRC" "$PROG"
