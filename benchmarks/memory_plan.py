"""What each memory setting does to a real-size LoRA DPO step's estimated peak, with no GPU.

The Qwen2-VL-7B architecture (``qwen2-vl-7b-random``; any preset naming ``Qwen/Qwen2-VL-7B-Instruct``
is estimated as it) and the 2B, LoRA with the adapter reference, batch 8, features cached, as
``benchmarks/gpu_check.sh`` runs them on a GPU. Each row turns one more setting on, from fp32 with
every saving off to the configuration gpu_check.sh asserts at <= 40 GB. Every figure is
``vqabench.engine.memory_estimate.estimate_memory`` on the meta device (seconds, no memory): an
estimate to choose a GPU by, which the GPU run's measured CUDA peak checks (docs/telemetry.md).

    python benchmarks/memory_plan.py
"""

from __future__ import annotations

import argparse

from vqabench.engine.memory_estimate import GIB, estimate_memory
from vqabench.spec import DatasetSpec, RunSpec

#: (label, settings): each row adds one setting to the row before it.
STEPS: list[tuple[str, dict[str, object]]] = [
    (
        "fp32, shared prompt and answer-only logits off",
        {"precision": "fp32", "shared_prompt": False, "answer_only_logits": False},
    ),
    ("+ answer-only logits", {"answer_only_logits": True}),
    ("+ shared prompt (one prompt pass per pair)", {"shared_prompt": True}),
    ("+ bf16 (frozen Linears stored in bf16)", {"precision": "bf16"}),
    ('+ activation_checkpointing = "mlp"', {"activation_checkpointing": "mlp"}),
]
TERMS = ("weights", "autocast copies", "activations", "logits")


def spec_for(model: str, batch: int, settings: dict[str, object]) -> RunSpec:
    return RunSpec(
        name="dpo",
        method="dpo",
        model=model,
        train="lora",
        reference="adapter",
        batch_size=batch,
        device="cuda",
        encoder_cache="on",
        dataset=DatasetSpec(eval_size=64, test_size=200),
        **settings,  # type: ignore[arg-type]
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--models", default="qwen2-vl-7b-random,qwen2-vl-2b-random")
    args = p.parse_args(argv)
    columns = ["Model", "Settings", *(f"{t} [GiB]" for t in TERMS), "Estimated peak [GiB]", "[GB]"]
    rows = []
    for model in args.models.split(","):
        settings: dict[str, object] = {}
        for label, change in STEPS:
            settings.update(change)
            estimate = estimate_memory(spec_for(model, args.batch_size, settings))
            rows.append(
                [
                    model,
                    label,
                    *(f"{estimate.terms.get(t, 0) / GIB:.3f}" for t in TERMS),
                    f"{estimate.gib():.3f}",
                    f"{estimate.total / 1e9:.1f}",
                ]
            )
    print(
        f"LoRA DPO, adapter reference, batch {args.batch_size}, features cached; estimate_memory on the meta device\n"
    )
    print("| " + " | ".join(columns) + " |")
    print("|:--|:--|" + "--:|" * (len(columns) - 2))
    for row in rows:
        print("| " + " | ".join(row) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
