"""Record a benchmark's output in docs/benchmarks.md verbatim, with commit, machine and command.

    python benchmarks/record.py NAME -- COMMAND [ARG ...]

runs COMMAND, and replaces what lies between ``<!-- record: NAME -->`` and
``<!-- /record: NAME -->`` in docs/benchmarks.md (a new section at the end when there are
no such markers) with: the command, the commit (``-dirty`` when tracked files other than
the doc itself differ from it), the machine (host, processor, cores, torch), the date, the
1-minute load average before and after, and the command's standard output exactly as printed. Nothing in
between is typed by hand, so a figure in the docs always has the run that printed it.
Standard error (progress lines) goes to the terminal. ``--fenced`` puts the output in a
code block (for output that is not Markdown); ``--doc PATH`` records into another file.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import shlex
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DOC = REPO / "docs" / "benchmarks.md"


def commit(doc: Path) -> str:
    """The short commit hash, with -dirty when tracked files were changed since.

    The doc being recorded into does not count: record.py itself changes it, so recording
    several sections one after another would otherwise mark all but the first dirty.
    """

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, check=True).stdout

    try:
        head = git("rev-parse", "--short", "HEAD").strip()
        top = Path(git("rev-parse", "--show-toplevel").strip())
        entries = iter(git("status", "--porcelain", "-z", "--untracked-files=no").split("\0"))
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    changed = []
    for entry in entries:
        if entry:
            changed.append((top / entry[3:]).resolve())
            if entry[0] in "RC":  # a rename or copy: its source path follows
                next(entries, None)
    dirty = [path for path in changed if path != doc.resolve()]
    return head + ("-dirty" if dirty else "")


def machine() -> str:
    """Host, processor, usable cores and torch version (when installed)."""
    try:
        import torch

        torch_version = f"torch {torch.__version__}"
    except ImportError:
        torch_version = "no torch"
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{platform.node()} ({platform.processor() or platform.machine()}, {cores} cores, {torch_version})"


def load() -> str:
    try:
        return f"{os.getloadavg()[0]:.1f}"
    except (AttributeError, OSError):
        return "n/a"


def block(name: str, command: list[str], output: str, before: str, after: str, fenced: bool, doc: Path) -> str:
    date = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    body = output.rstrip("\n")
    if fenced:
        body = f"```text\n{body}\n```"
    return (
        f"<!-- record: {name} -->\n"
        f"Recorded by `benchmarks/record.py` on {date}: commit {commit(doc)}, machine {machine()}; "
        f"1-minute load average {before} before and {after} after the run.\n\n"
        f"    {shlex.join(command)}\n\n"
        f"{body}\n"
        f"<!-- /record: {name} -->"
    )


def insert(text: str, name: str, recorded: str) -> str:
    """The document with the NAME section replaced (or appended under a heading)."""
    pattern = re.compile(rf"<!-- record: {re.escape(name)} -->.*?<!-- /record: {re.escape(name)} -->", re.S)
    if pattern.search(text):
        return pattern.sub(lambda _: recorded, text, count=1)
    return text.rstrip("\n") + f"\n\n## {name}\n\n{recorded}\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], usage="%(prog)s [--fenced] [--doc PATH] NAME -- COMMAND ..."
    )
    p.add_argument("name", help="the section's marker name, e.g. probe-embedded")
    p.add_argument("--fenced", action="store_true", help="put the output in a code block")
    p.add_argument("--doc", type=Path, default=DOC, help="the Markdown file to record into")
    if "--" not in argv:
        p.error("give the command to record after --")
    split = argv.index("--")
    args, command = p.parse_args(argv[:split]), argv[split + 1 :]
    if not command:
        p.error("give the command to record after --")
    before = load()
    proc = subprocess.run(command, cwd=REPO, stdout=subprocess.PIPE, text=True)
    after = load()
    if proc.returncode != 0:
        print(
            f"record.py: {shlex.join(command)} exited with {proc.returncode}; {args.doc} is unchanged.", file=sys.stderr
        )
        return proc.returncode
    recorded = block(args.name, command, proc.stdout, before, after, args.fenced, args.doc)
    args.doc.write_text(insert(args.doc.read_text(encoding="utf-8"), args.name, recorded), encoding="utf-8")
    print(f"record.py: recorded '{args.name}' in {args.doc}.", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
