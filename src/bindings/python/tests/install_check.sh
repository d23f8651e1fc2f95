#!/bin/sh
# make check-python-install: pip-installs the package into a fresh venv, offline (no
# index, no build isolation: the system's setuptools builds it), then runs these tests
# from outside the source tree against the installed copy, with no LORA_LIBRARY set:
# the package must find liblora by the path it recorded at install time.
# Usage: install_check.sh PYTHON LIBRARY WORKDIR (LIBRARY: the liblora.so.N to record)
set -eu
py=$1 library=$2 work=$3
tests=$(cd "$(dirname "$0")" && pwd)
rm -rf "$work"
mkdir -p "$work"
if ! "$py" -m venv --system-site-packages "$work/venv" > "$work/venv.log" 2>&1; then
    echo "check-python-install: skipped ($py -m venv failed, see $work/venv.log;" \
         "Debian: apt-get install python3-venv)"
    exit 0
fi
# pip builds in the directory it is given: build a copy, keep the checkout clean.
cp -R "$tests/.." "$work/pkg"
rm -rf "$work/pkg/tests" "$work/pkg/build" "$work/pkg"/*.egg-info
LORA_LIBRARY=$library "$work/venv/bin/python" -m pip install -q --no-index \
    --no-build-isolation --disable-pip-version-check "$work/pkg"
rm -rf "$work/pkg"
cp -R "$tests" "$work/tests"
cd "$work"
echo "check-python-install: $work/venv (pip install, offline), pytest from $work"
env -u LORA_LIBRARY -u PYTHONPATH LORA_TEST_INSTALLED=1 PYTHONDONTWRITEBYTECODE=1 \
    "$work/venv/bin/python" -m pytest -q -p no:cacheprovider tests
