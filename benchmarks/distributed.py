"""One run on 1 process × 2 threads against 2 processes × 1 thread (torchrun + DDP, gloo), on the CPU.

Both train the same SFT run (same data, seed and global batch) with the real worker, started
by the command line the runner builds (vqabench/launch.py). The two set-ups alternate over
``--rounds`` rounds so a busy shared machine slows both alike; the table gives the median
over rounds of each round's mean epoch time (training steps only, eval excluded) and of
samples/s (every process's samples), with ± half the range across rounds.

    python benchmarks/distributed.py --limit 512 --batch-size 32 --epochs 2 --rounds 2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from vqabench import events as ev
from vqabench.launch import launch_command
from vqabench.spec import spec_from_dict

#: The comparison the issue asks for, plus one process on one thread: it separates what the
#: second process brings from what OpenMP's second thread costs on a busy machine.
SETUPS = {"1 process × 2 threads": (1, 2), "2 processes × 1 thread": (2, 1), "1 process × 1 thread": (1, 1)}


def one_run(spec: dict, folder: Path, processes: int, threads: int) -> tuple[float, float]:
    """(mean epoch seconds, mean samples/s) of one run."""
    data = dict(spec, name=f"p{processes}", nproc_per_node=processes, output_dir=str(folder / f"p{processes}"))
    path = folder / f"p{processes}.json"
    path.write_text(json.dumps(data))
    command = launch_command(spec_from_dict(data), [sys.executable, "-m", "vqabench.engine.worker"], path)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    proc = subprocess.run(command, capture_output=True, text=True, env=env, timeout=3600)
    if proc.returncode != 0:
        raise SystemExit(f"the {processes}-process run failed:\n{proc.stderr[-3000:]}")
    epochs = [e for e in map(ev.parse_event, proc.stdout.splitlines()) if isinstance(e, ev.EpochEnded)]
    return statistics.mean(e.epoch_seconds for e in epochs), statistics.mean(e.samples_per_s for e in epochs)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--limit", type=int, default=512, help="training pairs")
    p.add_argument("--batch-size", type=int, default=32, help="the global batch")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--rounds", type=int, default=2)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        from vqabench.models import blip, checkpoints

        checkpoint = folder / "start"
        checkpoints.save_checkpoint(blip.build_embedded(0), checkpoint)  # no base-checkpoint build in the timings
        spec = {
            "method": "sft",
            "epochs": args.epochs,
            "limit": args.limit,
            "batch_size": args.batch_size,
            "init_checkpoint": str(checkpoint),
            "dataset": {"eval_size": 64, "test_size": 32},
            "judge": {"name": "exact"},
            "cache_dir": str(folder / "cache"),
            "device": "cpu",
        }
        results: dict[str, list[tuple[float, float]]] = {name: [] for name in SETUPS}
        started = time.perf_counter()
        for _ in range(args.rounds):
            for name, (processes, threads) in SETUPS.items():
                results[name].append(one_run(spec, folder, processes, threads))
        wall = time.perf_counter() - started
    base = statistics.median(s for s, _ in results[next(iter(SETUPS))])
    print(
        f"SFT, embedded model, {args.limit} train pairs, global batch {args.batch_size}, {args.epochs} epochs, "
        f"{args.rounds} interleaved rounds ({wall:.0f} s in all)\n"
    )
    print("| Set-up | Epoch time [s] ↓ | Relative | Samples/s ↑ |")
    print("|:--|--:|--:|--:|")
    for name, rows in results.items():
        seconds, rates = [s for s, _ in rows], [r for _, r in rows]
        half = (max(seconds) - min(seconds)) / 2
        rate_half = (max(rates) - min(rates)) / 2
        print(
            f"| {name} | {statistics.median(seconds):.2f} ± {half:.2f} | {statistics.median(seconds) / base:.2f} "
            f"| {statistics.median(rates):.1f} ± {rate_half:.1f} |"
        )


if __name__ == "__main__":
    main()
