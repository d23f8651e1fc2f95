#!/usr/bin/env python3
"""Mutation testing of liblora's C suites (docs/reliability.md, "Mutation testing").

Each mutant in test/mutation/mutants.txt replaces one exact snippet of one file under
src/ (the snippet must occur exactly once, so mutants survive line moves; a snippet
that no longer matches is reported as STALE, never skipped silently). Every mutant is
applied to a scratch copy of the tree, the library is rebuilt and the C suites run:
first the mutant's hint suite (fast), then, if that passed, every C suite (`make
check-c` when the Makefile has it, else the suite binary). A run stops at the first
failing test. Killed: some test failed (or crashed, or timed out). Survived: all
passed. A mutant that does not compile is STILLBORN (not counted).

Score = killed / (mutants run - stillborn - marked equivalent that survived).
"""
import argparse
import os
import queue
import shutil
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
LIST = os.path.join(ROOT, "test", "mutation", "mutants.txt")
TEST_BIN = "lib/test/lora_tests"


class Mutant:
    def __init__(self, mid, line):
        self.id, self.line = mid, line
        self.file = self.desc = self.find = self.replace = None
        self.suite = None
        self.equivalent = None
        self.status = None  # KILLED SURVIVED STILLBORN STALE AMBIGUOUS
        self.detail = ""
        self.seconds = 0.0


def unescape(s):
    out, i = [], 0
    while i < len(s):
        if s[i] == "\\" and i + 1 < len(s):
            out.append({"n": "\n", "t": "\t", "\\": "\\"}.get(s[i + 1], "\\" + s[i + 1]))
            i += 2
        else:
            out.append(s[i])
            i += 1
    return "".join(out)


def parse(path):
    """Blocks of `key: value` lines, each opened by `[id]`. Values are taken verbatim
    after ': ' (\\n, \\t, \\\\ escapes); '#' lines are comments."""
    mutants, cur, ids = [], None, set()
    with open(path, encoding="utf-8") as f:
        for no, raw in enumerate(f, 1):
            line = raw.rstrip("\n")
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            if line.startswith("[") and line.endswith("]"):
                mid = line[1:-1]
                if mid in ids:
                    sys.exit(f"{path}:{no}: duplicate id {mid}")
                ids.add(mid)
                cur = Mutant(mid, no)
                mutants.append(cur)
                continue
            key, sep, value = line.partition(": ")
            if not sep or cur is None or key not in (
                    "file", "desc", "find", "replace", "suite", "equivalent"):
                sys.exit(f"{path}:{no}: expected [id] or key: value, got {line!r}")
            setattr(cur, key, unescape(value) if key in ("find", "replace") else value)
    for m in mutants:
        if not (m.file and m.desc and m.find is not None and m.replace is not None):
            sys.exit(f"{path}:{m.line}: [{m.id}] needs file, desc, find and replace")
        if m.find == m.replace:
            sys.exit(f"{path}:{m.line}: [{m.id}] replace equals find")
    return mutants


def anchor(m, root):
    """Sets STALE / AMBIGUOUS when the snippet does not occur exactly once."""
    path = os.path.join(root, m.file)
    if not os.path.isfile(path):
        m.status, m.detail = "STALE", "file missing"
        return False
    n = open(path, encoding="utf-8").read().count(m.find)
    if n != 1:
        m.status = "STALE" if n == 0 else "AMBIGUOUS"
        m.detail = f"snippet found {n} times"
        return False
    return True


def tree_files(root):
    out = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=root,
                         check=True, capture_output=True).stdout
    return [p for p in out.decode().split("\0") if p and os.path.isfile(os.path.join(root, p))]


def make_scratch(root, dest):
    for rel in tree_files(root):
        if rel.startswith("lib/"):
            continue
        d = os.path.join(dest, rel)
        os.makedirs(os.path.dirname(d), exist_ok=True)
        shutil.copy2(os.path.join(root, rel), d)


def has_target(tree, target):
    r = subprocess.run(["make", "-n", "-C", tree, target], capture_output=True, text=True)
    return r.returncode == 0


def run_tests(tree, cmd, timeout, env_extra):
    """Runs cmd in tree; stops at the first failing test (Check's log file). Returns
    (passed, detail)."""
    log = os.path.join(tree, "lib", "mutation-check.log")
    if os.path.exists(log):
        os.remove(log)
    # Check's per-test timeouts stretched: a loaded machine must not read as a kill.
    env = dict(os.environ, CK_LOG_FILE_NAME=log, **env_extra)
    env.setdefault("CK_TIMEOUT_MULTIPLIER", "4")
    p = subprocess.Popen(cmd, cwd=tree, env=env, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL, start_new_session=True)
    start, first_fail = time.time(), None
    while p.poll() is None:
        time.sleep(0.5)
        if os.path.exists(log):
            with open(log, errors="replace") as f:
                for line in f:
                    parts = line.split(":")
                    if len(parts) > 4 and parts[2] in ("F", "E"):
                        first_fail = line.strip()
                        break
        if first_fail or time.time() - start > timeout:
            os.killpg(p.pid, 9)
            p.wait()
            return False, first_fail or f"timeout after {timeout} s"
    if p.returncode != 0:
        detail = "exit status %d" % p.returncode
        if os.path.exists(log):
            with open(log, errors="replace") as f:
                fails = [l.strip() for l in f if len(l.split(":")) > 4 and l.split(":")[2] in ("F", "E")]
            if fails:
                detail = fails[0]
        return False, detail
    return True, ""


def build(tree, library_only=False):
    """Builds the library (and the suite binary unless library_only). A mutant only
    changes src/: the suite binary links the shared library at run time, so it is
    marked up to date instead of being recompiled for every mutant."""
    targets = ["lib"] if library_only else ["lib", TEST_BIN]
    r = subprocess.run(["make", "-C", tree] + targets, capture_output=True, text=True)
    if r.returncode == 0 and library_only and os.path.exists(os.path.join(tree, TEST_BIN)):
        os.utime(os.path.join(tree, TEST_BIN))
    return r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]


def full_cmd(tree):
    if has_target(tree, "check-c"):
        return ["make", "--no-print-directory", "check-c"]
    return ["sh", "-c", f"make --no-print-directory {TEST_BIN} && {TEST_BIN}"]


def run_mutant(m, tree, timeout, full_only, only_suites=None):
    path = os.path.join(tree, m.file)
    original = open(path, encoding="utf-8").read()
    t0 = time.time()
    try:
        with open(path, "w", encoding="utf-8") as f:
            f.write(original.replace(m.find, m.replace, 1))
        ok, log = build(tree, library_only=True)
        if not ok:
            m.status, m.detail = "STILLBORN", log.strip().splitlines()[-1] if log.strip() else ""
            return
        if only_suites:  # --suites: these suites decide alone
            for suite in only_suites:
                passed, detail = run_tests(tree, [TEST_BIN], timeout, {"CK_RUN_SUITE": suite})
                if not passed:
                    m.status, m.detail = "KILLED", detail
                    return
            m.status, m.detail = "SURVIVED", ""
            return
        if m.suite and not full_only:
            for suite in m.suite.split(","):
                passed, detail = run_tests(tree, [TEST_BIN], timeout,
                                           {"CK_RUN_SUITE": suite.strip()})
                if not passed:
                    m.status, m.detail = "KILLED", detail
                    return
        passed, detail = run_tests(tree, full_cmd(tree), timeout, {})
        m.status, m.detail = ("SURVIVED", "") if passed else ("KILLED", detail)
    finally:
        with open(path, "w", encoding="utf-8") as f:
            f.write(original)
        m.seconds = time.time() - t0


def short(detail):
    # "file:line:F:tcase:test:iter: message" -> "test (file:line)"
    parts = detail.split(":", 6)
    if len(parts) >= 6 and parts[2] in ("F", "E"):
        return f"{parts[4]} ({os.path.basename(parts[0])}:{parts[1]})"
    return detail[:120]


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--list", default=LIST)
    ap.add_argument("--jobs", type=int, default=2, help="parallel mutant builds (at most 2)")
    ap.add_argument("--only", default="", help="comma-separated mutant ids")
    ap.add_argument("--anchors", action="store_true",
                    help="only check that every snippet matches exactly once")
    ap.add_argument("--full", action="store_true",
                    help="skip the hint suites, always run every C suite")
    ap.add_argument("--suites", default="",
                    help="comma-separated suites: run only these (which tests kill what)")
    ap.add_argument("--timeout", type=int, default=900, help="seconds per test run")
    ap.add_argument("--min-score", type=float, default=95.0)
    ap.add_argument("--keep", action="store_true", help="keep the scratch trees")
    args = ap.parse_args()
    jobs = max(1, min(args.jobs, 2))

    mutants = parse(args.list)
    if args.only:
        want = set(args.only.split(","))
        unknown = want - {m.id for m in mutants}
        if unknown:
            sys.exit("unknown mutant ids: " + ", ".join(sorted(unknown)))
        mutants = [m for m in mutants if m.id in want]
    runnable = [m for m in mutants if anchor(m, ROOT)]
    bad = [m for m in mutants if m.status in ("STALE", "AMBIGUOUS")]
    for m in bad:
        print(f"{m.status:9} {m.id} ({m.file}: {m.detail}) -- re-anchor its snippet")
    if args.anchors:
        print(f"{len(runnable)} of {len(mutants)} mutants anchored")
        return 1 if bad else 0

    start = time.time()
    base = tempfile.mkdtemp(prefix="liblora-mutate.")
    trees = [os.path.join(base, f"tree{j}") for j in range(jobs)]
    print(f"scratch trees under {base}; building the unmutated tree ...", flush=True)
    for t in trees:
        make_scratch(ROOT, t)
    results = [None] * jobs

    def build_into(j):
        results[j] = build(trees[j])

    builders = [threading.Thread(target=build_into, args=(j,)) for j in range(jobs)]
    for th in builders:
        th.start()
    for th in builders:
        th.join()
    if not all(ok for ok, _ in results):
        print("the unmutated tree does not build:\n" + results[0][1])
        return 2
    only_suites = [x for x in args.suites.split(",") if x]
    for suite in only_suites or [None]:
        cmd = [TEST_BIN] if suite else full_cmd(trees[0])
        passed, detail = run_tests(trees[0], cmd, args.timeout,
                                   {"CK_RUN_SUITE": suite} if suite else {})
        if not passed:
            break
    if not passed:
        print("the unmutated tree fails its tests: " + detail)
        return 2
    print(f"unmutated tree passes ({time.time() - start:.0f} s); {len(runnable)} mutants, "
          f"{jobs} jobs", flush=True)

    work = queue.Queue()
    for m in runnable:
        work.put(m)
    lock, done = threading.Lock(), [0]

    def worker(tree):
        while True:
            try:
                m = work.get_nowait()
            except queue.Empty:
                return
            run_mutant(m, tree, args.timeout, args.full, only_suites)
            with lock:
                done[0] += 1
                note = short(m.detail) if m.status == "KILLED" else m.detail
                eq = " (marked equivalent)" if m.equivalent else ""
                print(f"[{done[0]}/{len(runnable)}] {m.status:9} {m.id}{eq} "
                      f"{m.seconds:.0f}s {note}", flush=True)

    threads = [threading.Thread(target=worker, args=(t,)) for t in trees]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    if not args.keep:
        shutil.rmtree(base, ignore_errors=True)

    killed = [m for m in runnable if m.status == "KILLED"]
    survived = [m for m in runnable if m.status == "SURVIVED"]
    stillborn = [m for m in runnable if m.status == "STILLBORN"]
    eq_survived = [m for m in survived if m.equivalent]
    eq_killed = [m for m in killed if m.equivalent]
    live = [m for m in survived if not m.equivalent]
    counted = len(killed) + len(live)
    score = 100.0 * len(killed) / counted if counted else 100.0
    print()
    print(f"mutants: {len(mutants)} listed, {len(runnable)} run, {len(killed)} killed, "
          f"{len(survived)} survived ({len(eq_survived)} marked equivalent), "
          f"{len(stillborn)} stillborn, {len(bad)} stale or ambiguous")
    print(f"score: {len(killed)}/{counted} = {score:.1f}% of non-equivalent mutants killed "
          f"(time {time.time() - start:.0f} s)")
    for m in live:
        print(f"  SURVIVOR {m.id}: {m.file}: {m.desc}")
    for m in eq_survived:
        print(f"  equivalent {m.id}: {m.equivalent}")
    for m in eq_killed:
        print(f"  marked equivalent but KILLED (fix the list) {m.id}: {short(m.detail)}")
    for m in stillborn:
        print(f"  stillborn {m.id}: {m.detail}")
    for m in bad:
        print(f"  {m.status.lower()} {m.id}: {m.file}: {m.detail}")
    return 0 if score >= args.min_score and not bad and not eq_killed else 1


if __name__ == "__main__":
    sys.exit(main())
