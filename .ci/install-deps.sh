#!/bin/sh
# Installs the Debian/Ubuntu packages liblora needs to build and test, when missing.
# Idempotent: prints what it checks and installs only what is absent.
# Usage: sh .ci/install-deps.sh [extra-package ...]
set -eu
pkgs="gcc g++ make pkg-config libblis-dev check libcjson-dev $*"
if ! command -v dpkg-query >/dev/null 2>&1; then
    echo "install-deps: not a Debian-based system; install BLIS, Check, cJSON and pkg-config yourself"
    exit 0
fi
missing=""
for p in $pkgs; do
    if dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
        :
    else
        missing="$missing $p"
    fi
done
if [ -z "$missing" ]; then
    echo "install-deps: all present ($pkgs)"
    exit 0
fi
echo "install-deps: installing:$missing"
if [ "$(id -u)" -eq 0 ]; then
    SUDO=""
elif command -v sudo >/dev/null 2>&1; then
    SUDO="sudo"
else
    echo "install-deps: need root or sudo to install:$missing" >&2
    exit 1
fi
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends $missing
echo "install-deps: done"
