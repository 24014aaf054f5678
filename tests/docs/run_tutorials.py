#!/usr/bin/env python3
"""Runs the shell blocks of a tutorial (docs/tutorials/*.md) as a reader would.

Convention (docs/tutorials/README.md): a fenced ```sh block directly preceded
by the line `<!-- docs-test -->` is run; other blocks are for reading only.
`<!-- docs-test requires=PROG[,PROG...] -->` runs the block only when every
PROG is on PATH (e.g. stunet-convert, which needs libzip) and says so when it
skips. The marked blocks of one file run in order in ONE bash process
(`set -euo pipefail`), so `cd` and variables carry over from block to block,
inside a fresh temporary folder, with:

  PATH          the build's program folder first (--bin-dir)
  STUNET_SRC    the stunet checkout (--src)
  STUNET_BUILD  the configured build tree (--build)

Exit status: 0 when every block succeeded, 1 otherwise (the failing block is
printed), 2 for a tutorial without any marked block.

  python3 tests/docs/run_tutorials.py docs/tutorials/02-train.md \
      --bin-dir build/release/examples --src . --build build/release [--keep]
"""
import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

MARKER = re.compile(r"^<!--\s*docs-test(?P<args>[^>]*?)\s*-->\s*$")


def extract_blocks(text):
    """[(line number, requires list, code)] of the marked ```sh blocks."""
    lines = text.splitlines()
    blocks = []
    i = 0
    while i < len(lines):
        m = MARKER.match(lines[i].strip())
        if m:
            requires = []
            for arg in m.group("args").split():
                key, _, value = arg.partition("=")
                if key != "requires" or not value:
                    raise SystemExit(f"line {i + 1}: unknown docs-test argument '{arg}'")
                requires += [p for p in value.split(",") if p]
            j = i + 1
            while j < len(lines) and not lines[j].strip():
                j += 1
            if j >= len(lines) or lines[j].strip() not in ("```sh", "```bash"):
                raise SystemExit(f"line {i + 1}: <!-- docs-test --> must precede a ```sh block")
            k = j + 1
            while k < len(lines) and lines[k].strip() != "```":
                k += 1
            if k >= len(lines):
                raise SystemExit(f"line {j + 1}: unterminated ```sh block")
            blocks.append((j + 1, requires, "\n".join(lines[j + 1:k]) + "\n"))
            i = k + 1
        else:
            i += 1
    return blocks


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("tutorial")
    ap.add_argument("--bin-dir", action="append", default=[], help="prepended to PATH (repeatable)")
    ap.add_argument("--src", required=True, help="the stunet source tree (STUNET_SRC)")
    ap.add_argument("--build", required=True, help="the stunet build tree (STUNET_BUILD)")
    ap.add_argument("--keep", action="store_true", help="keep the temporary folder and print its path")
    a = ap.parse_args()

    name = os.path.basename(a.tutorial)
    with open(a.tutorial, encoding="utf-8") as f:
        blocks = extract_blocks(f.read())
    if not blocks:
        print(f"{name}: no <!-- docs-test --> block", file=sys.stderr)
        return 2

    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([os.path.abspath(d) for d in a.bin_dir] + [env.get("PATH", "")])
    env["STUNET_SRC"] = os.path.abspath(a.src)
    env["STUNET_BUILD"] = os.path.abspath(a.build)

    # One script: each block announces itself, so a failure names its line.
    script = ["set -euo pipefail"]
    ran = 0
    for line, requires, code in blocks:
        missing = [p for p in requires if shutil.which(p, path=env["PATH"]) is None]
        if missing:
            print(f"{name}:{line}: skipped (not built: {', '.join(missing)})")
            continue
        ran += 1
        script.append(f"echo '>>> {name}:{line}' >&2")
        script.append(code)
    if ran == 0:
        print(f"{name}: every block was skipped")
        return 0

    work = tempfile.mkdtemp(prefix="stunet-docs-")
    start = time.time()
    try:
        r = subprocess.run(["bash", "-c", "\n".join(script)], cwd=work, env=env)
    finally:
        if a.keep:
            print(f"{name}: kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    took = time.time() - start
    if r.returncode != 0:
        print(f"{name}: FAILED (exit {r.returncode}) after {took:.1f} s; the last '>>>' line names the block",
              file=sys.stderr)
        return 1
    print(f"{name}: {ran} block(s) passed in {took:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
