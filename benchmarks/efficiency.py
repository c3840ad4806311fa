"""Efficiency benchmark: what one training step of each method costs, side by side.

A thin caller of the engine's step-cost probe (vqabench.engine.probe, the code behind
`vqabench probe`): SFT, ORPO, DPO with a copied reference and DPO with precomputed reference
log-probs (optionally IPO, KTO, SimPO) take the same batches, in ONE process, interleaved
over several rounds so a noisy shared machine hits every method alike. Prints the probe's
Markdown table: ms/step (median, p10 … p90), ratio to SFT with a 95% interval, samples/s,
peak memory during the steps, reference memory and reference setup cost.

    python benchmarks/efficiency.py                                   # embedded model, CPU
    python benchmarks/efficiency.py --model blip-vqa-base-random --device cuda --batch-size 16
    python benchmarks/efficiency.py --methods sft,sft+cache,dpo-copy,dpo-copy+cache   # the encoder cache

Unlike `vqabench probe` it takes methods rather than presets, and any model.
"""

from __future__ import annotations

import argparse
import sys

import torch

from vqabench import __version__
from vqabench.engine.probe import execute_probe
from vqabench.events import Event, ProbeMeasured, ProbeStarted
from vqabench.report import markdown_table, probe_table
from vqabench.spec import ProbePlan, RunSpec

#: name -> (method, reference strategy, train, precision); None: --train decides, fp32.
VARIANTS = {
    "sft": ("sft", None, None, None),
    "orpo": ("orpo", None, None, None),
    "dpo-copy": ("dpo", "copy", None, None),
    "dpo-precompute": ("dpo", "precompute", None, None),
    "ipo-copy": ("ipo", "copy", None, None),
    "kto-copy": ("kto", "copy", None, None),
    "simpo": ("simpo", None, None, None),
    "sft-bf16": ("sft", None, None, "bf16"),
    "sft-fp16": ("sft", None, None, "fp16"),
    "sft-lora": ("sft", None, "lora", None),
    "orpo-lora": ("orpo", None, "lora", None),
    "dpo-lora-adapter": ("dpo", "adapter", "lora", None),
    "dpo-lora-copy": ("dpo", "copy", "lora", None),
}
#: "<variant>+cache": the same step reading the frozen-encoder cache (engine/encoder_cache.py); the
#: others run the encoders in every step (encoder_cache = "off"), as the study's code does.
CACHED = "+cache"
VARIANTS.update({f"{k}{CACHED}": v for k, v in list(VARIANTS.items())})
STUDY = {"orpo": 1.12, "dpo-copy": 1.50}  # the study's epoch-time ratios to SFT (one A6000)


def variant_specs(keys: list[str], args: argparse.Namespace) -> list[RunSpec]:
    specs = []
    for key in keys:
        method, strategy, train, precision = VARIANTS[key]
        specs.append(
            RunSpec(
                name=key,
                method=method,
                model=args.model,
                reference=strategy or "copy",
                after="sft" if strategy else None,  # the probe starts every method from the same model
                batch_size=args.batch_size,
                lr=1e-5,
                train=train or args.train,
                precision=precision or "fp32",
                device=args.device,
                base_samples=args.base_samples,
                encoder_cache="on" if key.endswith(CACHED) else "off",
            )
        )
    return specs


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="embedded", help="embedded | blip-vqa-base-random | a checkpoint path or hub id")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--steps", type=int, default=20, help="timed steps per method per round")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds")
    p.add_argument("--methods", default="sft,orpo,dpo-copy,dpo-precompute", help=f"comma list of {', '.join(VARIANTS)}")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--train", default="decoder", choices=("decoder", "all"))
    p.add_argument("--bf16", action="store_true", help="bfloat16 autocast (GPU)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    p.add_argument(
        "--base-samples", type=int, default=RunSpec.base_samples, help="embedded model: samples of its base checkpoint"
    )
    p.add_argument("--cache", default=None, help="base checkpoint cache (default: vqabench's)")
    args = p.parse_args(argv)
    keys = [k.strip() for k in args.methods.split(",") if k.strip()]
    unknown = [k for k in keys if k not in VARIANTS]
    if unknown:
        p.error(f"unknown method {unknown[0]!r}; choose from {', '.join(VARIANTS)}")
    if args.threads:
        torch.set_num_threads(args.threads)

    started: list[ProbeStarted] = []
    measured: list[ProbeMeasured] = []

    def collect(event: Event) -> None:
        if isinstance(event, ProbeStarted):
            started.append(event)
        elif isinstance(event, ProbeMeasured):
            measured.append(event)
            median = sorted(event.step_ms)[len(event.step_ms) // 2]
            print(f"round {event.round}/{args.rounds} {event.preset}: {median:.1f} ms/step", file=sys.stderr)

    plan = ProbePlan(
        variant_specs(keys, args), steps=args.steps, rounds=args.rounds, warmup=args.warmup, bf16=args.bf16,
        cache_dir=args.cache,
    )  # fmt: skip
    execute_probe(plan, collect)
    table = probe_table(started[0], measured)
    print(
        f"vqabench {__version__}; trains {args.train}; {'bf16 autocast' if args.bf16 else 'fp32'}; "
        f"the study's epoch-time ratios to SFT (one A6000): "
        + ", ".join(f"{k} {v:.2f}" for k, v in STUDY.items() if k in keys)
        + "\n"
    )
    print("\n".join(markdown_table(table)))
    print()
    print("\n".join(table.notes))
    return 0


if __name__ == "__main__":
    sys.exit(main())
