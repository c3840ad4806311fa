"""Wall clock of `vqabench --headless --preset all` with the frozen-encoder cache and without it.

Runs the same session twice, one after the other on the same machine: first with
``--set encoder_cache=off`` (the encoders run in every step, as in the study's code), then
with the default ``auto`` (encoded once by the first run, reused by the other six). Each
session gets its own fresh cache folder, so each pays its own image preprocessing and the
cached one pays its encoding pass; both share one embedded base checkpoint, built first
and not timed. Prints a Markdown table with the ratio.

    python benchmarks/preset_all_cache.py                       # the embedded default, full size
    python benchmarks/preset_all_cache.py --epochs 1 --limit 500   # a quicker look
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def load_average() -> str:
    try:
        return " / ".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


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
    env.pop("TOGETHER_API_KEY", None)  # the offline judge in both sessions
    with tempfile.TemporaryDirectory(prefix="vqabench-preset-all-") as tmp:
        root = Path(tmp)
        sys.path.insert(0, str(REPO))
        from vqabench.engine.base_checkpoint import base_folder
        from vqabench.models.family import META_FILE
        from vqabench.spec import RunSpec

        samples = RunSpec.base_samples  # the presets' start
        folder = base_folder(root / "shared", seed=0, samples=samples)
        print(f"building the embedded base checkpoint once (not timed) in {folder}", file=sys.stderr)
        builder = [sys.executable, "-m", "vqabench.engine.base_checkpoint", str(folder), "--seed", "0"]
        builder += ["--samples", str(samples)]
        subprocess.run(
            builder,
            env=env,
            check=True,
            stdout=subprocess.DEVNULL,
        )
        assert (folder / META_FILE).exists()
        rows = []
        for label, setting in (("encoder_cache=off", ["--set", "encoder_cache=off"]), ("encoder cache (auto)", [])):
            work = root / label.split(" ")[0].replace("=", "-")
            (work / "cache").mkdir(parents=True)
            (work / "cache" / "base").symlink_to(folder.parent)
            cmd = [
                sys.executable,
                "-m",
                "vqabench.cli",
                "--headless",
                "--preset",
                "all",
                "--cache",
                str(work / "cache"),
            ]
            cmd += [*extra, *setting]
            load_before = load_average()
            start = time.perf_counter()
            proc = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True)
            seconds = time.perf_counter() - start
            if proc.returncode != 0:
                print(proc.stdout[-4000:], proc.stderr[-4000:], file=sys.stderr)
                raise SystemExit(f"{label}: vqabench exited with {proc.returncode}")
            done = [line for line in proc.stdout.splitlines() if "run(s) done" in line]
            print(f"{label}: {seconds:.1f} s ({done[-1].strip() if done else '?'})", file=sys.stderr)
            rows.append((label, seconds, load_before, load_average()))
    off = rows[0][1]
    command = " ".join(["vqabench --headless --preset all", *extra])
    machine = f"{platform.machine()} with {os.cpu_count()} CPUs, python {platform.python_version()}"
    print(f"`{command}` on {machine}, one session after the other\n")
    print("| Session | Wall clock [s] ↓ | Relative to encoder_cache=off | Load average before | Load average after |")
    print("|:--|--:|--:|--:|--:|")
    for label, seconds, before, after in rows:
        print(f"| {label} | {seconds:.1f} | {seconds / off:.2f} | {before} | {after} |")
    print(f"\nSpeed-up with the encoder cache: {off / rows[1][1]:.2f}x (target: at least 1.8x).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
