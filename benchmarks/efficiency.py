"""Efficiency benchmark: what one training step of each method costs, side by side.

Runs SFT, ORPO, DPO with a copied reference and DPO with precomputed reference log-probs
(optionally IPO, KTO, SimPO) for the same number of steps on the same batches, in ONE
process, interleaved over several rounds so a noisy shared machine hits every method
alike. Prints a Markdown table: ms/step (median over rounds), ratio to SFT, samples/s,
peak memory during the steps, and reference-model memory.

    python benchmarks/efficiency.py                                   # embedded model, CPU
    python benchmarks/efficiency.py --model blip-vqa-base-random --device cuda --batch-size 16
    python benchmarks/efficiency.py --methods sft,sft+cache,dpo-copy,dpo-copy+cache   # the encoder cache

The step is the engine's own (vqabench.engine.trainer.MethodStep + AdamW), not a copy.
"""

from __future__ import annotations

import argparse
import copy
import gc
import platform
import statistics
import sys
import threading
import time
from dataclasses import dataclass

import torch

from vqabench import __version__
from vqabench.engine import model as blip
from vqabench.engine.data import easyvqa
from vqabench.engine.data.batching import encode
from vqabench.engine.reference import CopyReference, PrecomputedReference
from vqabench.engine.telemetry import process_rss_mib
from vqabench.engine.trainer import MethodStep, pick_device, synchronize
from vqabench.spec import DatasetSpec, RunSpec

#: (label, method, reference strategy)
VARIANTS = {
    "sft": ("SFT", "sft", None),
    "orpo": ("ORPO", "orpo", None),
    "dpo-copy": ("DPO (copy)", "dpo", "copy"),
    "dpo-precompute": ("DPO (precompute)", "dpo", "precompute"),
    "ipo-copy": ("IPO (copy)", "ipo", "copy"),
    "kto-copy": ("KTO (copy)", "kto", "copy"),
    "simpo": ("SimPO", "simpo", None),
}
#: "<variant>+cache": the same step reading the frozen-encoder cache (engine/encoder_cache.py).
CACHED = "+cache"
VARIANTS.update({f"{k}{CACHED}": (f"{label}, encoder cache", m, r) for k, (label, m, r) in list(VARIANTS.items())})
STUDY = {"orpo": 1.12, "dpo-copy": 1.50}  # the study's epoch-time ratios to SFT (one A6000)


class RssPeak:
    """Highest resident set size seen by a sampling thread while active (CPU runs)."""

    def __init__(self, interval: float = 0.01):
        self.interval, self.peak, self._stop = interval, 0.0, threading.Event()

    def __enter__(self) -> RssPeak:
        self.peak = process_rss_mib() or 0.0
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, process_rss_mib() or 0.0)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


@dataclass
class Measurement:
    ms_per_step: list[float]
    peak_mib: float
    reference_bytes: int
    setup_s: float


def build_start(model_name: str, seed: int) -> blip.LoadedModel:
    if model_name == "embedded":
        return blip.build_embedded(seed)
    if model_name == "blip-vqa-base-random":
        return blip.build_random_blip_vqa_base(seed)
    return blip.load_pretrained(model_name)


def measure(key: str, start: blip.LoadedModel, encoded, batches, args, device, encodings=None) -> Measurement:
    _, method, strategy = VARIANTS[key]
    encoded.encodings = encodings if key.endswith(CACHED) else None
    loaded = copy.copy(start)
    loaded.model = copy.deepcopy(start.model).to(device)
    spec = RunSpec(
        name=key,
        method=method,
        init_checkpoint="bench" if strategy else None,
        reference=strategy or "copy",
        batch_size=args.batch_size,
        lr=1e-5,
        train=args.train,
    )
    blip.freeze_for_training(loaded.model, spec.train)
    t0 = time.perf_counter()
    reference = None
    if strategy == "copy":
        reference = CopyReference(loaded, spec.train)
        reference.part.to(device)
    elif strategy == "precompute":
        reference = PrecomputedReference.build(
            loaded,
            encoded,
            batch_size=args.batch_size,
            device=device,
            cache_dir=None,
            checkpoint_key="bench",
            data_key="bench",
        )
    setup_s = time.perf_counter() - t0
    step = MethodStep(spec, loaded, encoded, reference)
    params = [p for p in loaded.model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=spec.lr)
    blip.set_train_mode(loaded.model, spec.train)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16)

    def one(rows):
        batch = encoded.batch("train", rows, device)
        with autocast:
            loss = step("train", batch).losses.mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    for rows in batches[: args.warmup]:
        one(rows)
    synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    with RssPeak() as rss:
        for rows in batches[args.warmup :]:
            t = time.perf_counter()
            one(rows)
            synchronize(device)
            times.append((time.perf_counter() - t) * 1000)
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else rss.peak
    ref_bytes = reference.resident_bytes if reference is not None else 0
    encoded.encodings = None
    return Measurement(times, peak, ref_bytes, setup_s)


def release(device: torch.device) -> None:
    """Free what the last variant left (its locals are gone once `measure` returns)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def build_encodings(start: blip.LoadedModel, encoded, args, device):
    """The frozen-encoder cache for the cached variants (in memory), and the one-off pass's seconds."""
    from vqabench.engine.cache import ArrayStore
    from vqabench.engine.encoder_cache import attach_encoder_cache

    model = start.model.to(device)
    info = attach_encoder_cache(
        start,
        encoded,
        data_fingerprint="bench",
        dtype="fp32",
        batch_size=args.batch_size,
        device=device,
        store=ArrayStore(None),
    )
    entry, encoded.encodings = encoded.encodings, None
    start.model = model.cpu()
    return entry, info.seconds


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="embedded", help="embedded | blip-vqa-base-random | a checkpoint path or hub id")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--steps", type=int, default=20, help="timed steps per method per round")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds; the median round is reported")
    p.add_argument("--methods", default="sft,orpo,dpo-copy,dpo-precompute", help=f"comma list of {', '.join(VARIANTS)}")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--train", default="decoder", choices=("decoder", "all"))
    p.add_argument("--bf16", action="store_true", help="bfloat16 autocast (GPU)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    args = p.parse_args(argv)
    keys = [k.strip() for k in args.methods.split(",") if k.strip()]
    unknown = [k for k in keys if k not in VARIANTS]
    if unknown:
        p.error(f"unknown method {unknown[0]!r}; choose from {', '.join(VARIANTS)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    torch.manual_seed(0)

    n_pairs = args.batch_size * (args.steps + args.warmup)
    data = easyvqa.load_splits(DatasetSpec(eval_size=args.batch_size, test_size=1), seed=0, limit=n_pairs)
    start = build_start(args.model, seed=0)
    encoded = encode(data, start, 32, 16)
    gen = torch.Generator().manual_seed(0)
    order = torch.randperm(len(data.train), generator=gen)
    batches = [order[i * args.batch_size : (i + 1) * args.batch_size] for i in range(args.steps + args.warmup)]

    encodings, encode_s = None, None
    if any(k.endswith(CACHED) for k in keys):
        encodings, encode_s = build_encodings(start, encoded, args, device)
    results: dict[str, list[Measurement]] = {k: [] for k in keys}
    for r in range(args.rounds):
        for k in keys if r % 2 == 0 else list(reversed(keys)):
            results[k].append(measure(k, start, encoded, batches, args, device, encodings))
            release(device)
            print(
                f"round {r + 1}/{args.rounds} {k}: {statistics.median(results[k][-1].ms_per_step):.1f} ms/step",
                file=sys.stderr,
            )

    def ms(k: str) -> float:
        return statistics.median(statistics.median(m.ms_per_step) for m in results[k])

    def spread(k: str) -> float:
        per_round = [statistics.median(m.ms_per_step) for m in results[k]]
        return (max(per_round) - min(per_round)) / 2

    base_key = "sft" if "sft" in keys else keys[0]
    base = ms(base_key)
    dev = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    )
    _, total = blip.count_parameters(start.model)
    mem_kind = "CUDA max allocated" if device.type == "cuda" else "process RSS"
    print(
        f"Device: {dev}; model: {start.source} ({total / 1e6:.1f}M parameters, trains {args.train}); "
        f"batch {args.batch_size}; {args.steps} timed steps x {args.rounds} interleaved rounds; "
        f"torch {torch.__version__}; vqabench {__version__}; {'bf16 autocast' if args.bf16 else 'fp32'}\n"
    )
    print(
        f"| Method | ms/step | Relative to {VARIANTS[base_key][0]} | samples/s | Peak memory [MiB] ({mem_kind}) "
        f"| Reference memory [MiB] | Reference setup [s] | Study's ratio |"
    )
    print("|:--|--:|--:|--:|--:|--:|--:|--:|")
    for k in keys:
        label = VARIANTS[k][0]
        m = ms(k)
        peak = max(x.peak_mib for x in results[k])
        ref = results[k][0].reference_bytes / 2**20
        setup = statistics.median(x.setup_s for x in results[k])
        study = f"{STUDY[k]:.2f}" if k in STUDY else ""
        rate = args.batch_size * 1000 / m
        print(
            f"| {label} | {m:.1f} ± {spread(k):.1f} | {m / base:.2f} | {rate:.1f} "
            f"| {peak:.0f} | {ref:.1f} | {setup:.2f} | {study} |"
        )
    print(
        "\nms/step: median over rounds of each round's median step; ± half the range across rounds. "
        "Reference setup: building the copy, or the one-off precompute pass over the data."
    )
    if encode_s is not None:
        pairs = sum(len(encoded.splits[n]) for n in ("train", "eval", "test"))
        print(
            f"Encoder cache: the cached variants read question encodings computed once, before the rounds, "
            f"in {encode_s:.2f} s for {pairs} pairs (train, eval and test splits); that one-off pass is not "
            f"in ms/step."
        )
        for k in keys:
            if k.endswith(CACHED) and k[: -len(CACHED)] in keys:
                print(f"{VARIANTS[k][0]} / {VARIANTS[k[: -len(CACHED)]][0]}: {ms(k) / ms(k[: -len(CACHED)]):.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
