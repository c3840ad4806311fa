"""Greedy test-answer generation: the decoder's key/value cache against re-running the prefix.

Times the engine's own ``greedy_answers`` with ``use_cache=False`` (every step re-runs the
whole answer so far: the code before issue 11) and ``use_cache=True`` on the same batch, in
ONE process, interleaved over rounds. SEP is suppressed so every answer is exactly
``--tokens`` tokens long in both modes; the question encoding is included in both. Prints a
Markdown table: ms per answer (median round, ± half the range) and the speed-up, and checks
that both modes give the same answers.

    python benchmarks/generation.py                                   # blip-vqa-base size, CPU
    python benchmarks/generation.py --model embedded --batch-size 32
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time

import torch

from vqabench import __version__
from vqabench.engine import model as blip
from vqabench.engine.generation import greedy_answers
from vqabench.engine.trainer import pick_device, synchronize


def build(name: str, seed: int) -> blip.LoadedModel:
    return blip.build_random_blip_vqa_base(seed) if name == "blip-vqa-base-random" else blip.build_embedded(seed)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="blip-vqa-base-random", choices=blip_models())
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args(argv)

    device = pick_device(args.device)
    loaded = build(args.model, seed=0)
    model = loaded.model.to(device).eval()
    with torch.no_grad():  # no SEP: every answer is exactly --tokens long in both modes
        model.text_decoder.cls.predictions.bias[loaded.sep_token_id] = -1e4
    questions = ["what is the man on the left holding in his hand and why?"] * args.batch_size
    q = loaded.tokenizer(questions, padding=True, return_tensors="pt").to(device)
    generator = torch.Generator().manual_seed(0)
    pixels = torch.randn(args.batch_size, 3, loaded.image_size, loaded.image_size, generator=generator).to(device)

    def run(use_cache: bool) -> tuple[float, list[str]]:
        synchronize(device)
        start = time.perf_counter()
        answers = greedy_answers(loaded, pixels, q.input_ids, q.attention_mask, args.tokens, use_cache=use_cache)
        synchronize(device)
        return (time.perf_counter() - start) * 1000 / args.batch_size, answers

    run(True)  # warm-up
    times: dict[bool, list[float]] = {False: [], True: []}
    outputs: dict[bool, list[str]] = {}
    for _ in range(args.rounds):
        for use_cache in (False, True):
            ms, outputs[use_cache] = run(use_cache)
            times[use_cache].append(ms)

    print(
        f"{args.model}, batch {args.batch_size}, {args.tokens} new tokens per answer, {args.rounds} rounds; "
        f"{platform.machine()}, {torch.get_num_threads()} threads, device {device}, torch {torch.__version__}, "
        f"vqabench {__version__}"
    )
    print()
    print("| Generation | ms per answer ↓ | Relative |")
    print("|:--|--:|--:|")
    base = statistics.median(times[False])
    for use_cache, label in ((False, "re-run prefix (before)"), (True, "KV cache (after)")):
        med = statistics.median(times[use_cache])
        spread = (max(times[use_cache]) - min(times[use_cache])) / 2
        print(f"| {label} | {med:,.1f} ± {spread:,.1f} | {base / med:.2f}× |")
    print()
    print(f"answers identical in both modes: {'yes' if outputs[True] == outputs[False] else 'NO'}")
    return 0 if outputs[True] == outputs[False] else 1


def blip_models() -> list[str]:
    return ["blip-vqa-base-random", "embedded"]


if __name__ == "__main__":
    sys.exit(main())
