#!/usr/bin/env python3
"""Writes liblora as one C file (docs/vendoring.md): OUT/liblora.c and OUT/lora.h.

    python3 src/tools/amalgamate.py [-o lib/amalgamation] [--root DIR] [src/x/y.c ...]

Sources default to src/*/*.c (bindings excluded), in layer order: linalg, backend,
layer, api, io. Every private header is inlined where it is first included, and
include/lora.h at the top, so `cc -c liblora.c` needs only the BLIS and cJSON include
flags. What the separate compilation kept apart is kept apart here:

- functions and variables with external linkage that are not the public API (declared
  with LORA_API in include/lora.h) become static, so the object defines only lora_*;
- file-scope names defined in more than one source file (static functions and
  variables, typedefs, tags, enumerators) are renamed for the length of each file with
  `#define name name_<file>` ... `#undef name`;
- every macro a source file defines is #undef'd after it.

The feature macros are not decided here: src/build_config.h derives them from the
compiler and target inside the amalgamation as in any other build."""

import argparse
import glob
import os
import re
import sys

ROOT = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
LAYER_ORDER = ["linalg", "backend", "layer", "api", "io"]
IDENT = re.compile(r"[A-Za-z_]\w*")
ATTRIBUTE_WORDS = {"__attribute__", "__attribute", "_Alignas", "alignas", "__declspec",
                   "__typeof__", "typeof", "_Static_assert", "static_assert", "sizeof",
                   "__asm__", "asm"}
KEYWORDS = {"static", "extern", "const", "volatile", "restrict", "inline", "__inline__",
            "unsigned", "signed", "int", "char", "short", "long", "float", "double",
            "void", "struct", "union", "enum", "typedef", "_Bool", "_Thread_local",
            "register", "auto", "_Noreturn"} | ATTRIBUTE_WORDS


def fail(msg):
    sys.exit("amalgamate: " + msg)


def blank_comments_and_literals(text):
    """Same length and line breaks as text; comments and string/char literals blanked,
    so offsets found in the result apply to text."""
    out = list(text)
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if text.startswith("/*", i):
            j = text.find("*/", i + 2)
            j = n if j < 0 else j + 2
        elif text.startswith("//", i):
            j = text.find("\n", i)
            j = n if j < 0 else j
        elif c in "\"'":
            j = i + 1
            while j < n and text[j] != c:
                j += 2 if text[j] == "\\" else 1
            j += 1
            for k in range(i + 1, min(j - 1, n)):
                if out[k] != "\n":
                    out[k] = " "
            i = j
            continue
        else:
            i += 1
            continue
        for k in range(i, j):
            if out[k] != "\n":
                out[k] = " "
        i = j
    return "".join(out)


def directives(clean):
    """(start, end, text) of each preprocessor line, continuations joined."""
    result = []
    for m in re.finditer(r"(?m)^[ \t]*#(?:[^\n\\]|\\.|\\\n)*", clean):
        result.append((m.start(), m.end(), m.group(0)))
    return result


def c_tokens(clean):
    """Tokens (text, offset) outside preprocessor lines."""
    code = list(clean)
    for start, end, _ in directives(clean):
        for k in range(start, end):
            if code[k] != "\n":
                code[k] = " "
    code = "".join(code)
    return [(m.group(0), m.start()) for m in
            re.finditer(r"[A-Za-z_]\w*|\d[\w.]*|->|\.\.\.|[^\s\w]", code)]


def top_level_units(tokens):
    """Splits file-scope tokens into declarations: lists of (text, offset, depth) where
    depth counts the (), [] and {} around the token inside the declaration, plus
    whether the unit is a function definition (its body is not included)."""
    units, cur, depth, i = [], [], 0, 0
    while i < len(tokens):
        t, off = tokens[i]
        if depth == 0 and t == "{" and cur and is_function_head(cur):
            nest, j = 0, i
            while j < len(tokens):  # skip the body
                if tokens[j][0] == "{":
                    nest += 1
                elif tokens[j][0] == "}":
                    nest -= 1
                    if nest == 0:
                        break
                j += 1
            if nest != 0:
                fail("unbalanced braces after offset %d" % off)
            units.append((cur, True))
            cur, i = [], j + 1
            continue
        if t in "([{":
            cur.append((t, off, depth))
            depth += 1
        elif t in ")]}":
            depth -= 1
            cur.append((t, off, depth))
        elif t == ";" and depth == 0:
            if cur:
                units.append((cur, False))
            cur = []
        else:
            cur.append((t, off, depth))
        i += 1
    if depth != 0 or cur:
        fail("unbalanced file (depth %d at end)" % depth)
    return units


def declarator_parens(unit):
    """Indexes of the depth-0 '(' that open a parameter list (not attributes)."""
    result = []
    for k, (t, _, d) in enumerate(unit):
        if t == "=" and d == 0:
            break
        if t == "(" and d == 0 and k > 0:
            prev = unit[k - 1][0]
            if IDENT.fullmatch(prev) and prev not in ATTRIBUTE_WORDS:
                result.append(k)
    return result


def is_function_head(unit):
    words = [t for t, _, d in unit if d == 0]
    if "=" in words or words[:1] == ["typedef"]:
        return False
    if words and words[0] in ("struct", "union", "enum") and unit[-1][0] != ")":
        return False
    return bool(declarator_parens(unit))


def unit_names(unit, is_def):
    """(kind, name) pairs a file-scope unit declares. kind: 'function', 'variable',
    'typedef', 'tag', 'enumerator'."""
    names = []
    words0 = [t for t, _, d in unit if d == 0]
    for k, (t, _, d) in enumerate(unit):  # tags defined here, enumerators
        if t in ("struct", "union", "enum") and k + 2 < len(unit):
            name, brace = unit[k + 1][0], unit[k + 2][0]
            if IDENT.fullmatch(name) and brace == "{":
                names.append(("tag", name))
        if t == "enum":
            j = k + 1
            while j < len(unit) and unit[j][0] != "{":
                if unit[j][0] in (";", ","):
                    break
                j += 1
            if j < len(unit) and unit[j][0] == "{":
                base = unit[j][2] + 1
                expect = True
                for t2, _, d2 in unit[j + 1:]:
                    if d2 < base:
                        break
                    if d2 == base and expect and IDENT.fullmatch(t2):
                        names.append(("enumerator", t2))
                        expect = False
                    elif d2 == base and t2 == ",":
                        expect = True
    if not words0:
        return names
    if words0[0] == "typedef":
        ids = [t for t in words0 if IDENT.fullmatch(t) and t not in KEYWORDS]
        if words0[-1] == ")" or not ids or unit[-1][0] == ")":
            # typedef T (*name)(args): the name is inside the first paren group
            for k, (t, _, d) in enumerate(unit):
                if t == "(" and d == 0:
                    inner = [u for u, _, d2 in unit[k + 1:] if d2 == 1 and IDENT.fullmatch(u)]
                    if inner:
                        names.append(("typedef", inner[-1]))
                    break
        else:
            names.append(("typedef", ids[-1]))
        return names
    parens = declarator_parens(unit)
    if parens:
        names.append(("function", unit[parens[-1] - 1][0]))
        return names
    # variables: split at depth-0 commas; the name is the last identifier before '=' or '['
    decl, cut = [], False
    for t, _, d in unit + [(",", 0, 0)]:
        if d == 0 and t == ",":
            ids = [u for u in decl if IDENT.fullmatch(u) and u not in KEYWORDS]
            if ids and not (decl and decl[-1] == "}" and not ids):
                names.append(("variable", ids[-1]))
            decl, cut = [], False
        elif d == 0 and t in ("=", "["):
            cut = True
        elif d == 0 and not cut and t not in "{}":
            decl.append(t)
    if words0[0] in ("struct", "union", "enum") and len(names) and words0[-1] == "}":
        names = [n for n in names if n[0] != "variable"]
    return names


class Source:
    def __init__(self, path, parse=True):
        self.path = path
        with open(os.path.join(ROOT, path), encoding="utf-8") as f:
            self.text = f.read()
        self.clean = blank_comments_and_literals(self.text)
        try:
            self.units = top_level_units(c_tokens(self.clean)) if parse else []
        except SystemExit as e:
            if path.endswith(".c"):
                fail("%s: %s" % (path, e))
            self.units = []  # a fragment (X-macro list): declares nothing to rewrite
        self.macros = []
        dirs = [d.strip() for _, _, d in directives(self.clean)]
        guard = re.match(r"#\s*ifndef\s+(\w+)$", dirs[0]) if dirs else None
        self.guarded = bool(dirs) and (re.match(r"#\s*pragma\s+once", dirs[0]) is not None or (
            guard is not None and len(dirs) > 1 and
            re.match(r"#\s*define\s+%s\b" % guard.group(1), dirs[1]) is not None))
        for _, _, d in directives(self.clean):
            m = re.match(r"\s*#\s*define\s+([A-Za-z_]\w*)", d)
            if m and m.group(1) not in self.macros:
                self.macros.append(m.group(1))

    def declared(self):
        """(kind, name, storage, first token offset, is_definition) per declaration."""
        result = []
        for unit, is_def in self.units:
            words0 = [t for t, _, d in unit if d == 0]
            storage = "static" if "static" in words0 else ("extern" if "extern" in words0 else "")
            for kind, name in unit_names(unit, is_def):
                has_init = "=" in words0
                result.append((kind, name, storage, unit[0][1],
                               is_def or (kind == "variable" and storage != "extern"
                                          and (has_init or storage == ""))))
        return result


def resolve(including, inc):
    path = os.path.normpath(os.path.join(os.path.dirname(including), inc))
    if os.path.exists(os.path.join(ROOT, path)):
        return path
    alt = os.path.normpath(os.path.join("include", inc))
    if os.path.exists(os.path.join(ROOT, alt)):
        return alt
    fail("%s: cannot find \"%s\"" % (including, inc))


FEATURE_MACRO = re.compile(r"(?m)^[ \t]*#[ \t]*define[ \t]+(_[A-Z_]*_SOURCE)\b[^\n]*$")
QUOTE_INCLUDE = re.compile(r'(?m)^[ \t]*#[ \t]*include[ \t]*"([^"]+)"[^\n]*$')


def quote_includes(src_text, clean):
    """Matches of #include "..." lines that are not inside comments."""
    return [m for m in QUOTE_INCLUDE.finditer(src_text)
            if clean[m.start():m.end()].lstrip().startswith("#")]


def make_static(src, internal):
    """src's text with 'static' in front of every file-scope declaration of an internal
    name that lacks it ('extern' replaced)."""
    edits = []
    for unit, is_def in src.units:
        names = [n for k, n in unit_names(unit, is_def) if k in ("function", "variable")]
        if not any(n in internal for n in names):
            continue
        words0 = [(t, off) for t, off, d in unit if d == 0]
        if any(t == "static" for t, _ in words0):
            continue
        ext = [off for t, off in words0 if t == "extern"]
        if ext:
            edits.append((ext[0], len("extern"), "LORA_PRIVATE"))
        else:
            edits.append((unit[0][1], 0, "LORA_PRIVATE "))
    text = src.text
    for off, length, repl in sorted(edits, reverse=True):
        text = text[:off] + repl + text[off + length:]
    return text


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-o", "--out", default="lib/amalgamation")
    ap.add_argument("--root", help="the tree to read (default: this one); for the tests")
    ap.add_argument("sources", nargs="*")
    args = ap.parse_args()
    global ROOT
    if args.root:
        ROOT = os.path.abspath(args.root)
    sources = args.sources or sorted(glob.glob("src/*/*.c", root_dir=ROOT))
    sources = [os.path.normpath(s) for s in sources if not s.startswith("src/bindings/")]
    sources.sort(key=lambda s: (LAYER_ORDER.index(s.split("/")[1])
                                if s.split("/")[1] in LAYER_ORDER else len(LAYER_ORDER), s))

    public_header = Source("include/lora.h", parse=False)
    public = set(re.findall(r"LORA_API[^;{]*?\b([A-Za-z_]\w*)\s*\(", public_header.clean))

    headers = {}
    parsed = {s: Source(s) for s in sources}

    def walk(path):
        src = parsed.get(path) or headers.get(path)
        if src is None:
            src = headers[path] = Source(path)
        for m in quote_includes(src.text, src.clean):
            h = resolve(path, m.group(1))
            if h not in headers and h != "include/lora.h":
                headers[h] = Source(h)
                walk(h)
    for s in sources:
        walk(s)

    # Internal names with external linkage: defined without static in a source file,
    # not part of the public API.
    internal = set()
    file_scope = {}
    for s in sources:
        names = set()
        for kind, name, storage, _, is_def in parsed[s].declared():
            if kind in ("function", "variable") and is_def and storage != "static":
                if name not in public:
                    internal.add(name)
                continue
            if kind in ("function", "variable") and storage != "static":
                continue  # a declaration of something defined elsewhere
            names.add(name)
        file_scope[s] = names
    header_names = set()
    for h in headers.values():
        header_names |= set(IDENT.findall(h.clean))
    header_macros = set()
    for h in list(headers.values()) + [public_header]:
        header_macros |= set(h.macros)
    owners = {}
    for s in sources:
        for name in file_scope[s]:
            owners.setdefault(name, []).append(s)
    colliding = {n for n, files in owners.items() if len(files) > 1}
    for n in sorted(colliding):
        if n in header_names:
            fail("%s is file-local in %s but also appears in a header" % (n, ", ".join(owners[n])))
    for s in sources:
        clash = set(parsed[s].macros) & header_macros
        if clash:
            fail("%s defines macros also defined in a header: %s" % (s, ", ".join(sorted(clash))))

    version = ".".join(re.search(r"#define LORA_VERSION_%s (\d+)" % p, public_header.text).group(1)
                       for p in ("MAJOR", "MINOR", "PATCH"))
    out = []
    emitted = {"include/lora.h"}

    def emit_file(path, text):
        out.append('#line 1 "%s"\n' % path)
        pos = 0
        clean = blank_comments_and_literals(text)
        for m in quote_includes(text, clean):
            out.append(text[pos:m.start()])
            h = resolve(path, m.group(1))
            line = text.count("\n", 0, m.end()) + 2
            if h in emitted and (h == "include/lora.h" or headers[h].guarded):
                out.append("/* #include \"%s\": above */" % h)
            else:  # the first time, or each time for a header meant to be included again
                emitted.add(h)
                out.append("/* #include \"%s\" */\n" % h)
                emit_file(h, make_static(headers[h], internal))
                out.append('#line %d "%s"' % (line, path))
            pos = m.end()
        out.append(text[pos:])
        if not text.endswith("\n"):
            out.append("\n")

    out.append("/* liblora %s as one C file, written by src/tools/amalgamate.py from %d sources:\n"
               " * do not edit. Build: cc -std=c11 -O2 -c liblora.c <BLIS and cJSON -I flags>\n"
               " * (-fopenmp while the library uses OpenMP); link with BLIS, cJSON, -lm.\n"
               " * See docs/vendoring.md. */\n" % (version, len(sources)))
    # Feature-test macros act only before the first system header: a source file's own
    # go to the top (and out of the file), the Makefile's _POSIX_C_SOURCE after them.
    features = {}
    for s in sources:
        for m in FEATURE_MACRO.finditer(parsed[s].text):
            if parsed[s].clean[m.start():m.end()].lstrip().startswith("#"):
                features.setdefault(m.group(1), m.group(0).strip())
    for name, line in features.items():
        out.append("#ifndef %s\n%s\n#endif\n" % (name, line))
    out.append("#ifndef _POSIX_C_SOURCE\n#define _POSIX_C_SOURCE 200809L\n#endif\n")
    out.append("#define LORA_AMALGAMATION 1\n")
    out.append("/* Internal functions and variables: static here (some may go unused). */\n"
               "#if defined(__GNUC__)\n#define LORA_PRIVATE static __attribute__((unused))\n"
               "#else\n#define LORA_PRIVATE static\n#endif\n")
    emit_file("include/lora.h", public_header.text)
    for s in sources:
        stem = os.path.splitext(s)[0].split("/", 1)[1].replace("/", "_")
        mine = sorted(colliding & file_scope[s])
        out.append("\n/* ==== %s ==== */\n" % s)
        out.extend("#define %s %s_%s\n" % (n, n, stem) for n in mine)
        body = FEATURE_MACRO.sub(lambda m: "/* %s: at the top */" % m.group(1),
                                 make_static(parsed[s], internal))
        emit_file(s, body)
        out.extend("#undef %s\n" % n for n in parsed[s].macros + mine if n not in features)

    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "liblora.c"), "w", encoding="utf-8") as f:
        f.write("".join(out))
    with open(os.path.join(args.out, "lora.h"), "w", encoding="utf-8") as f:
        f.write(public_header.text)
    print("amalgamate: %s/liblora.c from %d sources and %d headers; %d internal names made "
          "static; renamed per file: %s" % (args.out, len(sources), len(headers), len(internal),
                                            ", ".join(sorted(colliding)) or "none"))


if __name__ == "__main__":
    main()
