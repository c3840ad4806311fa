"""Wall clock of `vqabench --headless --preset all` on a first run and on a rerun, and where it goes.

The first session starts from an empty cache folder, so it builds the embedded base
checkpoint, writes the image cache and runs the encoding pass; the second is the same
command again on that cache. For each session the wall clock is split, from the stored
events, into the training steps (every epoch's timed steps), the rest of the time inside
the workers' `execute` (base checkpoint, data and caches, warm-up, eval, test answers,
judging) and the time outside it (interpreter start-up, imports, the host). Prints a
Markdown table; the targets are those of issue #22 on 2 idle cores.

    python benchmarks/preset_all_first_run.py
    python benchmarks/preset_all_first_run.py --epochs 1 --limit 500   # a quicker look
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TARGETS = {"first run (empty cache)": 100.0, "rerun (same cache)": 80.0}


@dataclass
class Session:
    label: str
    wall: float
    steps: float  # sum of every run's timed training steps
    in_workers: float  # sum of every run's total_seconds (inside execute)
    load_before: str
    load_after: str
    runs_done: str


def load_average() -> str:
    try:
        return " / ".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def stored_seconds(results: Path) -> tuple[float, float]:
    """(training-step seconds, seconds inside the workers) of the latest session in `results`."""
    sys.path.insert(0, str(REPO))
    from vqabench.store import ResultsStore

    with ResultsStore(results) as store:
        session = store.last_session()
        assert session is not None
        steps = inside = 0.0
        for run in store.runs(session.id):
            steps += sum(e.epoch_seconds for e in store.epochs(run.id))
            inside += run.finished.total_seconds if run.finished else 0.0
    return steps, inside


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, help="passed on to vqabench (default: the presets')")
    p.add_argument("--limit", type=int, help="passed on to vqabench (default: the presets')")
    p.add_argument("--set", dest="settings", action="append", default=[], metavar="KEY=VALUE")
    args = p.parse_args(argv)
    extra = [
        *(["--epochs", str(args.epochs)] if args.epochs else []),
        *(["--limit", str(args.limit)] if args.limit else []),
    ]
    for setting in args.settings:
        extra += ["--set", setting]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    env.pop("TOGETHER_API_KEY", None)  # the offline judge, as on a fresh machine
    sessions = []
    with tempfile.TemporaryDirectory(prefix="vqabench-first-run-") as tmp:
        work = Path(tmp)
        for label in TARGETS:
            results = work / "results"
            cmd = [sys.executable, "-m", "vqabench.cli", "--headless", "--preset", "all"]
            cmd += ["--cache", str(work / "cache"), "--results", str(results), *extra]
            before = load_average()
            start = time.perf_counter()
            proc = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True)
            wall = time.perf_counter() - start
            if proc.returncode != 0:
                print(proc.stdout[-4000:], proc.stderr[-4000:], file=sys.stderr)
                raise SystemExit(f"{label}: vqabench exited with {proc.returncode}")
            done = next((line.strip() for line in proc.stdout.splitlines() if "run(s) done" in line), "?")
            steps, inside = stored_seconds(results)
            sessions.append(Session(label, wall, steps, inside, before, load_average(), done))
            print(f"{label}: {wall:.1f} s ({done})", file=sys.stderr)
    command = " ".join(["vqabench --headless --preset all", *extra])
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    print(f"`{command}` on {platform.machine()} with {cores} cores, python {platform.python_version()}\n")
    print(
        "| Session | Wall clock [s] ↓ | Target [s] | Training steps | Rest of the workers' run | "
        "Start-up and host | Load average before | Load average after |"
    )
    print("|:--|--:|--:|--:|--:|--:|--:|--:|")
    for s in sessions:
        rest, outside = s.in_workers - s.steps, s.wall - s.in_workers
        print(
            f"| {s.label} | {s.wall:.1f} | {TARGETS[s.label]:.0f} | {s.steps:.1f} s ({s.steps / s.wall:.0%}) | "
            f"{rest:.1f} s ({rest / s.wall:.0%}) | {outside:.1f} s ({outside / s.wall:.0%}) | "
            f"{s.load_before} | {s.load_after} |"
        )
    print(
        "\nTraining steps: every epoch's timed steps, all runs. Rest of the workers' run: the rest of "
        "each worker's `execute` (on a first run the base checkpoint, image cache and encoding pass; "
        "warm-up, eval, test answers, judging). Start-up and host: interpreter start-up and imports "
        "of each worker, and the host between runs."
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
