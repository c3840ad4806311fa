"""Peak memory of a real run as the number of images grows: 1,000 against 10,000 images.

Makes N synthetic 384x384 JPEG images and a local preference JSONL (one question and a
chosen/rejected answer per image) in a temporary folder, then runs the real worker
(``python -m vqabench.engine.worker``) on it, in a subprocess per N, with the same model,
batch size and number of training pairs: ``limit`` caps training while the held-out test
split takes every other image, so every image goes through loading, the image cache and the
batches (the test answers are generated for all of them). The worker's peak resident set
size is the kernel's figure for the child (``ru_maxrss`` from ``wait4``), not a sample.

    python benchmarks/data_scale.py                           # 1,000 and 10,000 images
    python benchmarks/data_scale.py --counts 200,2000         # a quicker look

The model is the embedded small BLIP with its vision input set to 384x384 (blip-vqa-base's
image size, so every cached image is 384x384x3 bytes = 432 KiB, as in a real run) and 32x32
patches (144 image tokens, so the encoder stays cheap on 2 CPU cores), saved as a local
checkpoint; what grows is the data, not the model.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from PIL import Image, ImageDraw

REPO = Path(__file__).resolve().parent.parent
COLOURS = ["red", "green", "blue", "yellow", "teal", "brown", "gray", "black"]
SHAPES = ["circle", "rectangle", "triangle"]


def make_dataset(folder: Path, n: int, seed: int = 0) -> Path:
    """N distinct 384x384 JPEGs and a JSONL of preference rows that point at them."""
    rng = random.Random(seed)
    (folder / "images").mkdir(parents=True)
    with (folder / "pairs.jsonl").open("w") as fh:
        for i in range(n):
            colour, shape = rng.choice(COLOURS), rng.choice(SHAPES)
            image = Image.new("RGB", (384, 384), tuple(rng.randrange(256) for _ in range(3)))
            draw = ImageDraw.Draw(image)
            x, y, r = rng.randrange(60, 324), rng.randrange(60, 324), rng.randrange(20, 60)
            box = (x - r, y - r, x + r, y + r)
            {"circle": draw.ellipse, "rectangle": draw.rectangle}.get(shape, lambda b, fill: None)(box, fill=colour)
            if shape == "triangle":
                draw.polygon([(x, y - r), (x - r, y + r), (x + r, y + r)], fill=colour)
            draw.text((4, 4), str(i), fill="white")  # every image distinct
            image.save(folder / "images" / f"{i}.jpg", quality=90)
            wrong = rng.choice([c for c in COLOURS if c != colour])
            row = {"image": f"images/{i}.jpg", "question": f"what color is the {shape}?", "chosen": colour}
            fh.write(json.dumps({**row, "rejected": wrong}) + "\n")
    return folder / "pairs.jsonl"


def run_worker(spec: dict, folder: Path, pythonpath: str) -> dict:
    """Run the real worker on `spec`; its peak RSS (ru_maxrss), wall clock and epoch RSS figures."""
    path = folder / "spec.json"
    path.write_text(json.dumps(spec))
    env = {**os.environ, "PYTHONPATH": pythonpath}
    start = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", "vqabench.engine.worker", str(path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=env,
        cwd=pythonpath,  # `python -m` puts the working folder first on sys.path: run the code asked for
    )
    assert proc.stdout is not None
    events = [json.loads(line) for line in proc.stdout]
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    seconds = time.perf_counter() - start
    failed = [e for e in events if e["type"] == "run_failed"]
    if proc.returncode != 0 or failed:
        raise SystemExit(f"the worker failed: {failed[0]['message'] if failed else proc.returncode}")
    started = next(e for e in events if e["type"] == "run_started")
    epochs = [e for e in events if e["type"] == "epoch_end"]
    final = next(e for e in events if e["type"] == "eval")
    return {
        "peak_mib": usage.ru_maxrss / 1024,  # KiB on Linux
        "epoch_peak_mib": max(e["peak_rss_mib"] for e in epochs),
        "seconds": seconds,
        "sizes": started["data"]["sizes"],
        "tested": final["n"],
    }


def model_at(blip: Any, image_size: int, patch_size: int) -> Any:
    """The embedded small BLIP with a vision input of `image_size` pixels in `patch_size` patches."""
    from transformers import BlipForQuestionAnswering

    config = blip.embedded_config()
    config.vision_config.image_size, config.vision_config.patch_size = image_size, patch_size
    torch.manual_seed(0)
    model = BlipForQuestionAnswering(config)
    return dataclasses.replace(blip.build_embedded(seed=0), model=model, image_size=image_size)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--counts", default="1000,10000", help="comma list of image counts")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--limit", type=int, default=32, help="training pairs (the same for every count)")
    p.add_argument("--eval-size", type=int, default=32)
    p.add_argument("--image-size", type=int, default=384, help="the model's (and the image cache's) image side")
    p.add_argument("--patch-size", type=int, default=32)
    p.add_argument("--code", default=str(REPO), help="the vqabench source tree to run (e.g. an older checkout)")
    args = p.parse_args(argv)
    counts = [int(c) for c in args.counts.split(",")]
    sys.path.insert(0, args.code)
    from vqabench.models import blip, checkpoints

    results = []
    with tempfile.TemporaryDirectory(prefix="vqabench-data-scale-") as tmp:
        root = Path(tmp)
        checkpoint = root / "model"
        checkpoints.save_checkpoint(model_at(blip, args.image_size, args.patch_size), checkpoint)
        for n in counts:
            folder = root / f"n{n}"
            t0 = time.perf_counter()
            source = make_dataset(folder, n)
            made = time.perf_counter() - t0
            spec = {
                "name": f"scale-{n}",
                "method": "sft",
                "model": str(checkpoint),
                "dataset": {
                    "source": str(source),
                    "eval_size": args.eval_size,
                    "test_size": n - args.limit - args.eval_size,
                },
                "limit": args.limit,
                "epochs": 1,
                "batch_size": args.batch_size,
                "judge": {"name": "exact"},
                "cache_dir": str(folder / "cache"),
                "output_dir": str(folder / "out"),
            }
            result = run_worker(spec, folder, args.code)
            print(f"{n} images (made in {made:.0f} s): {result}", file=sys.stderr)
            results.append((n, result))
    code = Path(args.code).resolve()
    print(
        f"Worker peak RSS on {platform.machine()} ({os.cpu_count()} CPUs), code from {code}; "
        f"embedded BLIP at {args.image_size}x{args.image_size} pixels, batch {args.batch_size}, "
        f"{args.limit} training pairs, 1 epoch, "
        f"{args.eval_size} eval pairs, all other images in the test split.\n"
    )
    print("| Images | Train / eval / test pairs | Peak RSS [MiB] ↓ | Epoch peak RSS [MiB] | Wall clock [s] |")
    print("|--:|:--|--:|--:|--:|")
    for n, r in results:
        s = r["sizes"]
        print(
            f"| {n:,} | {s['train']} / {s['eval']} / {s['test']} | {r['peak_mib']:.0f} "
            f"| {r['epoch_peak_mib']:.0f} | {r['seconds']:.0f} |"
        )
    if len(results) >= 2:
        growth = results[-1][1]["peak_mib"] - results[0][1]["peak_mib"]
        verdict = "within" if growth < 300 else "above"
        print(
            f"\nPeak RSS grows by {growth:.0f} MiB from {results[0][0]:,} to {results[-1][0]:,} images "
            f"({verdict} the 300 MiB target)."
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
