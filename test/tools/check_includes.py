#!/usr/bin/env python3
"""Checks the include rules of src/ (make include-check). The table below is the only
statement of the rules; docs/design.md shows it between the include-rules markers and
this script fails when that copy differs (--markdown prints the block to paste).

    python3 test/tools/check_includes.py [--markdown]

Every #include "..." of every file under src/ (bindings excluded) is resolved and must
be allowed: a file may include the files of its own folder, src/build_config.h and
include/lora.h, and the interface headers of the folders its row names. Rows are closed
under "may include" (what a folder may include, its includers may too), so a rule
never holds only through an intermediate header. Some third-party headers are confined
to one folder."""

import os
import re
import sys

ROOT = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
DESIGN = "docs/design.md"

# folder: (folders it may include, its headers others may include; None = all of them)
RULES = {
    "api": (["layer", "backend", "linalg", "io"], []),
    "layer": (["backend", "linalg"], None),
    "backend": (["linalg"], ["backend.h"]),
    "io": ([], None),
    "linalg": ([], None),
}
# Any file may include these.
COMMON = ["include/lora.h", "src/build_config.h"]
# Third-party headers (<...>) allowed only in one folder.
CONFINED = {"blis.h": "linalg", "cjson/cJSON.h": "io"}

# Violations of the rules above that changes in progress remove. They are reported but
# do not fail the check; empty this list when they are gone (the check says so).
KNOWN_VIOLATIONS = [
]

INCLUDE = re.compile(r'^[ \t]*#[ \t]*include[ \t]*([<"])([^">]+)[">]', re.M)


def markdown():
    lines = ["| folder | may include | headers other folders may include |",
             "|---|---|---|"]
    for folder, (allowed, interface) in RULES.items():
        may = ", ".join("`src/%s`" % a for a in allowed) or "nothing internal"
        if interface is None:
            ifc = "all its headers"
        elif interface:
            ifc = ", ".join("`%s`" % h for h in interface) + " only"
        else:
            ifc = "none"
        lines.append("| `src/%s` | %s | %s |" % (folder, may, ifc))
    lines.append("| every file | `include/lora.h`, `src/build_config.h` | |")
    confined = ", ".join("`<%s>` only in `src/%s`" % (h, f) for h, f in CONFINED.items())
    lines.append("")
    lines.append("Third-party headers: %s." % confined)
    return "\n".join(lines)


def strip_comments(text):
    return re.sub(r"/\*.*?\*/|//[^\n]*", lambda m: re.sub(r"[^\n]", " ", m.group(0)), text,
                  flags=re.S)


def check_table():
    errors = []
    for folder, (allowed, _) in RULES.items():
        for other in allowed:
            if other not in RULES:
                errors.append("rule for %s names unknown folder %s" % (folder, other))
                continue
            for further in RULES[other][0]:
                if further not in allowed and further != folder:
                    errors.append("rules not closed: %s may include %s, which may include %s"
                                  % (folder, other, further))
    return errors


def check_design():
    path = os.path.join(ROOT, DESIGN)
    with open(path, encoding="utf-8") as f:
        text = f.read()
    m = re.search(r"<!-- include-rules: begin -->\n(.*?)\n<!-- include-rules: end -->", text,
                  re.S)
    if not m:
        return ["%s has no <!-- include-rules: begin/end --> block" % DESIGN]
    if m.group(1).strip() != markdown().strip():
        return ["%s's include rules differ from test/tools/check_includes.py: replace the block "
                "with the output of `python3 test/tools/check_includes.py --markdown`" % DESIGN]
    return []


def main():
    if sys.argv[1:] == ["--markdown"]:
        print(markdown())
        return
    errors = check_table() + check_design()
    violations, files = [], 0
    for dirpath, dirnames, filenames in os.walk(os.path.join(ROOT, "src")):
        rel_dir = os.path.relpath(dirpath, ROOT)
        parts = rel_dir.split(os.sep)
        if len(parts) > 1 and parts[1] == "bindings":
            dirnames[:] = []
            continue
        for name in sorted(filenames):
            if not name.endswith((".c", ".h")):
                continue
            path = os.path.join(rel_dir, name)
            files += 1
            folder = parts[1] if len(parts) > 1 else None
            if folder is not None and folder not in RULES:
                errors.append("%s: folder src/%s has no row in RULES (test/tools/check_includes.py)"
                              % (path, folder))
                continue
            with open(os.path.join(ROOT, path), encoding="utf-8") as f:
                text = strip_comments(f.read())
            for kind, inc in INCLUDE.findall(text):
                if kind == "<":
                    owner = CONFINED.get(inc)
                    if owner is not None and owner != folder:
                        violations.append((path, "<%s>" % inc, "only src/%s may include it" % owner))
                    continue
                target = os.path.normpath(os.path.join(rel_dir, inc))
                if not os.path.exists(os.path.join(ROOT, target)):
                    errors.append("%s: #include \"%s\" does not exist" % (path, inc))
                    continue
                reason = forbidden(folder, target)
                if reason:
                    violations.append((path, target, reason))
    known = set(KNOWN_VIOLATIONS)
    seen = set()
    for path, target, reason in violations:
        if (path, target) in known:
            seen.add((path, target))
            print("include-check: known violation (KNOWN_VIOLATIONS): %s includes %s: %s"
                  % (path, target, reason))
        else:
            errors.append("%s includes %s: %s" % (path, target, reason))
    for path, target in sorted(known - seen):
        print("include-check: %s no longer includes %s: remove it from KNOWN_VIOLATIONS"
              % (path, target))
    if errors:
        for e in errors:
            print("include-check: " + e)
        sys.exit("include-check: %d problem(s); the rules are in test/tools/check_includes.py"
                 % len(errors))
    print("include-check: %d files under src/ follow the include rules of %s%s"
          % (files, DESIGN, " but the %d known violations above" % len(seen) if seen else ""))


def forbidden(folder, target):
    """Why a file of folder may not include target (None if it may)."""
    if target in COMMON:
        return None
    parts = target.split(os.sep)
    if parts[0] != "src" or len(parts) != 3:
        return "outside the library's folders"
    other, header = parts[1], parts[2]
    if other == folder:
        return None
    if folder is None:
        return "src/ top-level files include no folder"
    allowed = RULES[folder][0]
    if other not in allowed:
        return "src/%s may include only %s" % (
            folder, ", ".join("src/" + a for a in allowed) or "its own files")
    interface = RULES[other][1]
    if interface is not None and header not in interface:
        return "%s is private to src/%s (its interface: %s)" % (
            header, other, ", ".join(interface) or "none")
    return None


if __name__ == "__main__":
    main()
