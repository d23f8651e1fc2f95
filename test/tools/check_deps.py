#!/usr/bin/env python3
"""Checks the Makefile's header dependencies (make deps-check).

    python3 test/tools/check_deps.py OBJECT...

For each header under src/ and include/lora.h, makes it newer than every object,
asks `make -n OBJECT...` what it would compile, and puts the header's time back.
The answer must be exactly the sources that include the header, directly or through
other headers (found here by reading the #include lines, independently of the
compiler's .d files), once in each object directory. Run after the objects are built."""

import os
import re
import subprocess
import sys
import time

INCLUDE = re.compile(r'^[ \t]*#[ \t]*include[ \t]*"([^"]+)"', re.M)


def quoted_includes(path):
    with open(path, encoding="utf-8") as f:
        text = re.sub(r"/\*.*?\*/", "", f.read(), flags=re.S)
    result = set()
    for inc in INCLUDE.findall(text):
        for base in (os.path.dirname(path), "include"):
            cand = os.path.normpath(os.path.join(base, inc))
            if os.path.exists(cand):
                result.add(cand)
                break
    return result


def closure(path, memo):
    if path not in memo:
        memo[path] = set()
        found = set()
        for inc in quoted_includes(path):
            found |= {inc} | closure(inc, memo)
        memo[path] = found
    return memo[path]


def main():
    objects = sys.argv[1:]
    if not objects:
        sys.exit("usage: check_deps.py OBJECT...")
    make = os.environ.get("MAKE", "make")
    # object -> source, and the object directories (lib/obj/pic, lib/obj/static, ...)
    source_of, dirs = {}, set()
    for obj in objects:
        m = re.match(r"(.*)/([^/]+/[^/]+)\.o$", obj)  # <dir>/<folder>/<name>.o
        if not m:
            sys.exit("check_deps: cannot map %s to a source" % obj)
        source_of[obj] = "src/%s.c" % m.group(2)
        dirs.add(m.group(1))
    missing = [o for o in objects if not os.path.exists(o)]
    if missing:
        sys.exit("check_deps: build the objects first (missing %s)" % missing[0])
    memo = {}
    headers = sorted({h for s in set(source_of.values()) for h in closure(s, memo)})
    newest = max(os.path.getmtime(o) for o in objects)
    failures = 0
    for header in headers:
        expected = sorted(o for o, s in source_of.items() if header in closure(s, memo))
        saved = os.stat(header)
        try:
            stamp = max(newest, time.time()) + 2
            os.utime(header, (stamp, stamp))
            out = subprocess.run([make, "-n", "--no-print-directory"] + objects,
                                 capture_output=True, text=True, check=True).stdout
        finally:
            os.utime(header, ns=(saved.st_atime_ns, saved.st_mtime_ns))
        rebuilt = sorted(set(re.findall(r"-o (\S+\.o)\b", out)) & set(objects))
        if rebuilt != expected:
            failures += 1
            extra = sorted(set(rebuilt) - set(expected))
            lost = sorted(set(expected) - set(rebuilt))
            print("deps-check: %s: rebuilds %d objects, expected %d%s%s" % (
                header, len(rebuilt), len(expected),
                "; not including it: " + " ".join(extra) if extra else "",
                "; missed: " + " ".join(lost) if lost else ""))
    if failures:
        sys.exit("deps-check: %d of %d headers have wrong dependencies" % (failures, len(headers)))
    print("deps-check: each of %d headers rebuilds exactly its includers (%d objects in %s)"
          % (len(headers), len(objects), ", ".join(sorted(dirs))))


if __name__ == "__main__":
    main()
