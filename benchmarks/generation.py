"""Greedy test-answer generation: the decoder's key/value cache against re-running the prefix.

Times the engine's own ``greedy_answers`` with ``use_cache=False`` (every step re-runs the
whole answer so far: the code before issue 11) and ``use_cache=True`` on the same batch, in
ONE process, interleaved over rounds, twice: with the image and question encoders run inside
the timed call (a run without the frozen-encoder cache) and from stored encodings (with it,
the default: test generation then only decodes). SEP is suppressed so every answer is exactly
``--tokens`` tokens long in every mode. Prints a Markdown table: ms per answer (median round,
± half the range) and the speed-up within each pair, and checks that every mode gives the
same answers.

The default batch of 32 is the one test generation uses (``max(batch_size, 32)`` in the
trainer). Decoding one token is bound by reading the decoder's weights, so a cached step costs
about the same at batch 2 as at 32, while re-running the prefix costs in proportion to the
batch: small batches understate what the cache saves in a run.

    python benchmarks/generation.py                                   # blip-vqa-base size, CPU
    python benchmarks/generation.py --batch-size 2 --rounds 3        # a quicker look
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
from vqabench.engine.generation import greedy_answers
from vqabench.engine.trainer import pick_device, synchronize
from vqabench.models import blip
from vqabench.models.blip import encode_questions
from vqabench.models.family import LoadedModel


def build(name: str, seed: int) -> LoadedModel:
    return blip.build_random_blip_vqa_base(seed) if name == "blip-vqa-base-random" else blip.build_embedded(seed)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="blip-vqa-base-random", choices=blip_models())
    parser.add_argument("--batch-size", type=int, default=32, help="test generation uses max(batch_size, 32)")
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

    with torch.no_grad():  # what the frozen-encoder cache hands to test generation
        encoded = encode_questions(model, pixels, q.input_ids, q.attention_mask)
    # (use_cache, encode): encode=True runs the image and question encoders inside the timed call
    # (a run without the encoder cache); encode=False decodes from the stored encodings (with it).
    variants = [(False, True), (True, True), (False, False), (True, False)]

    def run(use_cache: bool, encode: bool) -> tuple[float, list[str]]:
        synchronize(device)
        start = time.perf_counter()
        answers = greedy_answers(
            loaded,
            pixels,
            q.input_ids,
            q.attention_mask,
            args.tokens,
            use_cache=use_cache,
            features=None if encode else encoded,
        )
        synchronize(device)
        return (time.perf_counter() - start) * 1000 / args.batch_size, answers

    run(True, True)  # warm-up
    times: dict[tuple[bool, bool], list[float]] = {v: [] for v in variants}
    outputs: dict[tuple[bool, bool], list[str]] = {}
    for _ in range(args.rounds):
        for variant in variants:
            ms, outputs[variant] = run(*variant)
            times[variant].append(ms)

    print(
        f"{args.model}, batch {args.batch_size}, {args.tokens} new tokens per answer, {args.rounds} rounds; "
        f"{platform.machine()}, {torch.get_num_threads()} threads, device {device}, torch {torch.__version__}, "
        f"vqabench {__version__}"
    )
    print()
    print("| Question encoding | Generation | ms per answer ↓ | Relative |")
    print("|:--|:--|--:|--:|")
    for encode, where in ((True, "run per batch (no encoder cache)"), (False, "stored (encoder cache on)")):
        base = statistics.median(times[(False, encode)])
        for use_cache, label in ((False, "re-run prefix (before)"), (True, "KV cache (after)")):
            ms = times[(use_cache, encode)]
            med, spread = statistics.median(ms), (max(ms) - min(ms)) / 2
            print(f"| {where} | {label} | {med:,.1f} ± {spread:,.1f} | {base / med:.2f}× |")
    print()
    same = all(outputs[v] == outputs[variants[0]] for v in variants)
    print(f"answers identical in every mode: {'yes' if same else 'NO'}")
    return 0 if same else 1


def blip_models() -> list[str]:
    return ["blip-vqa-base-random", "embedded"]


if __name__ == "__main__":
    sys.exit(main())
