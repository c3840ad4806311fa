"""How many trials of `vqabench tune --preset all` (the embedded model) fit in N minutes on the CPU,
with and without pruning, and how the eval objective improves with the trials spent.

Runs `vqabench tune`'s own core (vqabench.tune.session.tune_session) twice, pruning on and off,
each in a fresh results folder with its own SQLite study, after an untimed pass of one trial per
preset that fills the cache (so the first timed pass does not pay for it), and stops it at the deadline as Ctrl-C
would (the running trial is recorded failed, nothing else starts). The trial counts and the best
eval objective after each trial are read back from the Optuna studies. Prints Markdown tables for
benchmarks/record.py:

    python benchmarks/record.py tune -- python benchmarks/tune.py            # 10 minutes per pass
    python benchmarks/tune.py --minutes 1 --trials 2 --set limit=64          # a quicker look
"""

from __future__ import annotations

import argparse
import math
import shlex
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # the checkout's vqabench, also when run as a script


@dataclass
class PresetTrials:
    """One preset's study in one pass: its trials by state, their wall time, the best-so-far curve."""

    preset: str
    objective: str
    complete: int = 0
    pruned: int = 0
    failed: int = 0
    seconds: float = 0.0
    curve: list[float | None] = field(default_factory=list)

    @property
    def trials(self) -> int:
        return self.complete + self.pruned + self.failed


@dataclass
class Pass:
    prune: bool
    wall: float
    stopped: bool  # the deadline came before the budget was spent
    presets: list[PresetTrials]

    @property
    def trials(self) -> int:
        return sum(p.trials for p in self.presets)


def best_so_far(values: list[tuple[str, float | None]]) -> list[float | None]:
    """The lowest objective of the complete trials after each trial, in trial order."""
    best: float | None = None
    out: list[float | None] = []
    for state, value in values:
        if state == "COMPLETE" and value is not None and (best is None or value < best):
            best = value
        out.append(best)
    return out


def run_pass(args: argparse.Namespace, prune: bool, folder: Path) -> Pass:
    import optuna
    from optuna.trial import TrialState

    from vqabench.presets import Overrides
    from vqabench.tune.session import tune_session
    from vqabench.tune.study import Tuner, TuneSettings

    settings = TuneSettings(trials=args.trials, prune=prune, seed=args.seed)
    overrides = Overrides(epochs=args.epochs, settings=tuple(args.set))
    tuners: list[Tuner] = []
    deadline = threading.Event()

    def started(_session: Any, tuner: Tuner) -> None:
        tuners.append(tuner)

    def stop() -> None:
        deadline.set()
        if tuners:
            tuners[0].cancel()

    timer = threading.Timer(args.minutes * 60, stop)
    start = time.monotonic()
    timer.start()
    try:
        tune_session(
            args.preset,
            overrides,
            folder,
            settings,
            worker_cmd=shlex.split(args.worker_cmd) if args.worker_cmd else None,
            cache_dir=args.cache,
            command="benchmarks/tune.py",
            say=lambda line: print(f"[{'pruning' if prune else 'no pruning'}] {line}", file=sys.stderr, flush=True),
            on_start=started,
        )
    finally:
        timer.cancel()
    wall = time.monotonic() - start
    (tuner,) = tuners
    presets = []
    for spec in tuner.specs:
        try:
            study = optuna.load_study(storage=tuner.url, study_name=tuner.study_name(spec.name))
        except KeyError:  # never started: the deadline came first
            presets.append(PresetTrials(spec.name, tuner.spaces[spec.name].objective))
            continue
        trials = sorted(study.get_trials(deepcopy=False), key=lambda t: t.number)
        ended = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)]
        presets.append(
            PresetTrials(
                spec.name,
                str(study.user_attrs.get("objective", tuner.spaces[spec.name].objective)),
                complete=sum(1 for t in ended if t.state == TrialState.COMPLETE),
                pruned=sum(1 for t in ended if t.state == TrialState.PRUNED),
                failed=sum(1 for t in ended if t.state == TrialState.FAIL),
                seconds=sum(float(t.user_attrs.get("seconds") or 0.0) for t in ended),
                curve=best_so_far([(t.state.name, t.value) for t in ended]),
            )
        )
    return Pass(prune, wall, deadline.is_set(), presets)


def _number(value: float | None, digits: int) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{value:.{digits}f}"


def tables(passes: list[Pass], minutes: float) -> str:
    """The trials table and the curve table, in Markdown."""
    lines = [
        f"Trials of each preset in {minutes:g} min (`--trials` per preset is the budget; the deadline stops "
        "the running trial, which counts as failed):",
        "",
        "| Pruning | Preset | Objective | Trials | Complete | Pruned | Failed | s in trials | s per trial |",
        "|:--|:--|:--|--:|--:|--:|--:|--:|--:|",
    ]
    for one in passes:
        for p in one.presets:
            per = p.seconds / p.trials if p.trials else None
            lines.append(
                f"| {'on' if one.prune else 'off'} | {p.preset} | {p.objective} | {p.trials} | {p.complete} | "
                f"{p.pruned} | {p.failed} | {p.seconds:.1f} | {_number(per, 1)} |"
            )
    lines += ["", "| Pruning | Trials in all | Wall s | Ended by |", "|:--|--:|--:|:--|"]
    for one in passes:
        ended = "the deadline" if one.stopped else "the budget (every trial and tuned run done)"
        lines.append(f"| {'on' if one.prune else 'off'} | {one.trials} | {one.wall:.1f} | {ended} |")
    lines += [
        "",
        "Best eval objective after each trial spent (lower is better; n/a until a trial completes):",
        "",
        "| Pruning | Preset | Best after trial 1, 2, … |",
        "|:--|:--|:--|",
    ]
    for one in passes:
        for p in one.presets:
            curve = ", ".join(_number(v, 4) for v in p.curve) or "–"
            lines.append(f"| {'on' if one.prune else 'off'} | {p.preset} | {curve} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=10.0, help="time per pass (pruning on, then off)")
    parser.add_argument("--trials", type=int, default=20, help="trials per preset (the budget)")
    parser.add_argument("--preset", default="all")
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0, help="TPE's seed")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="as vqabench --set")
    parser.add_argument("--cache", default=None, help="the cache folder (default: vqabench's)")
    parser.add_argument("--results", default=None, help="keep the results here (default: a temporary folder)")
    parser.add_argument(
        "--no-warmup",
        dest="warmup",
        action="store_false",
        help="skip the untimed pass of one trial per preset that fills the cache before the timed passes",
    )
    parser.add_argument("--worker-cmd", help=argparse.SUPPRESS)  # a stand-in worker for tests
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="vqabench-tune-bench-") as tmp:
        root = Path(args.results) if args.results else Path(tmp)
        if args.warmup:  # fills the cache (base checkpoint, image arrays, encodings) so neither pass pays for it
            warm = argparse.Namespace(**{**vars(args), "trials": 1, "minutes": 24 * 60.0})
            run_pass(warm, False, root / "warm-up")
        passes = [run_pass(args, prune, root / ("pruning" if prune else "no-pruning")) for prune in (True, False)]
    print(tables(passes, args.minutes))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
