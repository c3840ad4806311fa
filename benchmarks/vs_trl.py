"""vqabench's DPO step against TRL's DPOTrainer: the same model, pairs and batches, one process.

For each model (built-in random variants: the two tiny ones by default, SmolVLM-256M's
architecture with ``--size real``, Qwen2-VL-2B's added with ``--qwen2-vl-2b``) the sides run
in interleaved rounds (the order reversed every other round), each round from a fresh copy
of the same start model:

* vqabench, through the engine's step-cost probe (``vqabench.engine.probe.prepare`` and
  ``measure``, the code behind `vqabench probe`): DPO with a frozen copy as reference and
  the encoder cache on (the decoder trains, the vision tower is frozen); and DPO under LoRA
  with the adapter reference (adapters off) and the encoder cache on.
* TRL's ``DPOTrainer.train()`` on the same pairs in the same order (a sequential sampler),
  fp32 like vqabench, no gradient checkpointing: the same model copy with vqabench's own
  freezing (tower frozen, TRL's reference a frozen copy it makes itself); the same LoRA
  adapters (vqabench's ``lora.attach``; TRL's reference is a frozen copy of the adapter);
  and TRL's defaults (everything trained, gradient checkpointing on; still fp32, as bf16
  autocast on a CPU would change what is measured).

A TRL step is timed from ``on_step_begin`` to ``on_step_end``: forward, backward, clipping,
optimizer and scheduler, but not the collator, which tokenizes and processes the images of
every batch on the fly (TRL's design); leaving it out can only flatter TRL.

TRL needs a processor for a vision dataset. vqabench builds none (it lays prompts out with
the chat template and processes images itself, without torchvision), so one is made from
the tokenizer and the family's ``*ImageProcessorPil`` at vqabench's image size; the prompt
ids it writes are checked equal to vqabench's before anything is timed.

Peak RSS: the process's high-water mark (VmHWM), reset after the warmup steps and read after
the timed steps, the same points on both sides, after freed memory was handed back
(``release_free_memory``). Both sides share the process, so the peak includes the start
model and the data; "above start" subtracts the RSS read just before the side made its copy.

    python benchmarks/vs_trl.py                              # the two tiny models
    python benchmarks/vs_trl.py --size real --steps 5 --rounds 3 --batch-size 4
    python benchmarks/vs_trl.py --models qwen2-vl-2b-random --sides lora --start-on-disk /tmp --batch-size 2
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import math
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from vqabench import __version__
from vqabench.engine.data.records import DataSplits
from vqabench.engine.prepare import load_data
from vqabench.engine.probe import Probe, measure, prepare
from vqabench.engine.telemetry import (
    module_bytes,
    peak_rss_since_reset_mib,
    process_rss_mib,
    release_free_memory,
    reset_peak_rss,
)
from vqabench.models import lora, parts
from vqabench.models.causal import CausalVLMFamily
from vqabench.models.family import LoadedModel
from vqabench.report import ReportTable, markdown_table, word
from vqabench.spec import ProbePlan, RunSpec
from vqabench.stats import quantiles, ratio_ci

TINY = ("qwen2-vl-tiny-random", "idefics3-tiny-random")
REAL = ("smolvlm-256m-random",)
HEAVY = "qwen2-vl-2b-random"
NA = "–"


@dataclass(frozen=True)
class Side:
    name: str
    engine: str  # "vqabench" | "trl"
    train: str  # vqabench's train value: "lm" | "lora" | "all"
    reference: str
    versus: str | None = None  # vqabench sides: the TRL side this one is divided by
    gradient_checkpointing: bool = False


SIDES = (
    Side("TRL, tower frozen", "trl", "lm", "copy (TRL's)"),
    Side("vqabench, tower frozen", "vqabench", "lm", "copy, encoder cache", versus="TRL, tower frozen"),
    Side("TRL, LoRA", "trl", "lora", "adapter copy (TRL's)"),
    Side("vqabench, LoRA", "vqabench", "lora", "adapter, encoder cache", versus="TRL, LoRA"),
    Side("TRL defaults: all trained, grad. ckpt", "trl", "all", "copy (TRL's)", gradient_checkpointing=True),
)
VQABENCH_TOWER_FROZEN = "vqabench, tower frozen"  # also divided by TRL's defaults
# --sides: which pairings run. A real-size model whose tower-frozen pairing does not fit in memory
# (the start model, each side's copy, TRL's reference copy, gradients and Adam's moments, all fp32)
# can still be compared under LoRA.
SIDE_GROUPS = {
    "frozen": ("TRL, tower frozen", VQABENCH_TOWER_FROZEN),
    "lora": ("TRL, LoRA", "vqabench, LoRA"),
    "defaults": ("TRL defaults: all trained, grad. ckpt",),
}


def sides_for(groups: str) -> tuple[Side, ...]:
    """The sides of a comma list of SIDE_GROUPS names ("all": every side), in SIDES's order."""
    names = set(SIDE_GROUPS) if groups == "all" else {g.strip() for g in groups.split(",") if g.strip()}
    unknown = names - set(SIDE_GROUPS)
    if unknown or not names:
        named = ", ".join(sorted(unknown)) or "nothing"
        raise SystemExit(f"--sides names {named}; allowed: all or {', '.join(SIDE_GROUPS)}")
    if "defaults" in names and "frozen" not in names:
        raise SystemExit("--sides defaults divides vqabench's tower-frozen step by TRL's default one: add frozen")
    wanted = {side for g in names for side in SIDE_GROUPS[g]}
    return tuple(s for s in SIDES if s.name in wanted)


@dataclass
class Measured:
    step_ms: list[list[float]] = field(default_factory=list)  # one list per round
    peak_mib: list[float] = field(default_factory=list)
    above_mib: list[float] = field(default_factory=list)
    reference_mib: float = 0.0


def vqabench_spec(side: Side, model: str, args: argparse.Namespace) -> RunSpec:
    return RunSpec(
        name=side.name,
        method="dpo",
        model=model,
        reference="adapter" if side.train == "lora" else "copy",
        after="sft",  # the probe starts every side from the same model
        batch_size=args.batch_size,
        lr=1e-5,
        train=side.train,
        device="cpu",
        encoder_cache="on",
    )


def trl_processor(loaded: LoadedModel) -> Any:
    """A transformers processor for TRL, from the tokenizer and the family's PIL image processor.

    Qwen2VLProcessor insists on a video processor, whose class needs torchvision; an
    image-only subclass leaves it out (TRL's vision collator never passes videos).
    """
    import transformers

    image = loaded.image
    mean, std = list(image.mean), list(image.std)
    template = loaded.tokenizer.chat_template
    name = loaded.family.name
    if name == "qwen2-vl":
        vision = loaded.model.config.vision_config
        pixels = image.size * image.size
        processor = transformers.Qwen2VLImageProcessorPil(
            min_pixels=pixels,
            max_pixels=pixels,
            patch_size=vision.patch_size,
            temporal_patch_size=vision.temporal_patch_size,
            merge_size=vision.spatial_merge_size,
            image_mean=mean,
            image_std=std,
        )
        return image_only_qwen2_vl_processor()(processor, loaded.tokenizer, template)
    if name == "idefics3":
        tiles = transformers.Idefics3ImageProcessorPil(
            do_image_splitting=False,
            size={"longest_edge": image.size},
            max_image_size={"longest_edge": image.size},
            image_mean=mean,
            image_std=std,
        )
        return transformers.Idefics3Processor(
            image_processor=tiles,
            tokenizer=loaded.tokenizer,
            image_seq_len=loaded.facts["image_tokens"],
            chat_template=template,
        )
    raise SystemExit(f"vs_trl.py builds TRL processors for qwen2-vl and idefics3 models, not {name}.")


def image_only_qwen2_vl_processor() -> Any:
    """The class, made on demand (transformers is imported late)."""
    from transformers import ProcessorMixin, Qwen2VLProcessor

    class ImageOnly(Qwen2VLProcessor):
        def __init__(self, image_processor: Any = None, tokenizer: Any = None, chat_template: Any = None) -> None:
            self.image_token, self.video_token = "<|image_pad|>", "<|video_pad|>"
            self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
            self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)
            ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)

    return ImageOnly


def start_on_disk(probe: Probe, folder: str) -> None:
    """Back the start model's weights by a memory-mapped file instead of the process's own memory.

    Every side deep-copies the start model, so a resident start costs a whole model for the
    whole run; file-backed pages are dropped under memory pressure and read again when the next
    copy is made. What the copies, the steps and the references take is unchanged. The mapped
    pages count in RSS while they are resident, on both sides alike.
    """
    path = os.path.join(folder, "start.pt")
    model = probe.start.model
    torch.save(model.state_dict(), path)
    model.load_state_dict(torch.load(path, mmap=True, weights_only=True), assign=True)
    os.unlink(path)  # the mapping keeps the pages readable; the file goes when the process does
    if hasattr(model, "tie_weights"):
        model.tie_weights()  # assign=True gives tied parameters separate objects over one storage
    release_free_memory()


def probe_data(plan: ProbePlan, probe: Probe) -> DataSplits:
    """The pairs the probe loaded (prepare() keeps only their encoding): the same spec, the same call."""
    first = plan.specs[0]
    bs = first.batch_size
    dataset = dataclasses.replace(first.dataset, eval_size=bs, test_size=bs)
    spec = first.replace(dataset=dataset, limit=bs * (plan.warmup + plan.steps), after=None)
    return load_data(spec, probe.cache_dir)


def trl_rows(probe: Probe, data: DataSplits) -> list[dict[str, Any]]:
    """TRL's vision-preference rows, in the probe's batch order: image, templated prompt, answers + end token."""
    loaded = probe.start
    family = loaded.family
    assert isinstance(family, CausalVLMFamily), "TRL's DPOTrainer takes causal VLMs"
    tokenizer = loaded.tokenizer
    end = tokenizer.convert_ids_to_tokens(loaded.facts["end_id"])
    rows = []
    for batch in probe.batches:
        for i in batch.tolist():
            pair = data.train[i]
            messages = family.chat_messages(pair.question)
            prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            image = data.images[pair.image_id]
            rows.append(
                {"images": [image], "prompt": prompt, "chosen": pair.chosen + end, "rejected": pair.rejected + end}
            )
    return rows


def check_prompts(probe: Probe, processor: Any, rows: list[dict[str, Any]], data: DataSplits) -> None:
    """The processor writes vqabench's prompt and answer ids (image tokens expanded), or the comparison is off."""
    first = int(probe.batches[0][0])
    row = rows[0]
    ids = processor(images=[row["images"]], text=[row["prompt"]], add_special_tokens=False)["input_ids"][0]
    expected = probe.start.family.prompt_ids(probe.start, data.train[first].question)
    if list(ids) != expected:
        raise SystemExit(f"TRL's processor writes other prompt ids than vqabench: {list(ids)} != {expected}")
    loaded, pair = probe.start, data.train[first]
    for key, answer in (("chosen", pair.chosen), ("rejected", pair.rejected)):
        ids = processor(text=[row[key]], add_special_tokens=False)["input_ids"][0]  # as TRL's collator calls it
        expected = loaded.family.frame_answer(loaded, loaded.family.answer_ids(loaded, answer), complete=True)
        if list(ids) != expected:
            raise SystemExit(f"TRL's {key} ids differ from vqabench's: {list(ids)} != {expected}")


class _StepTimer:
    def __init__(self, warmup: int) -> None:
        self.warmup, self.started, self.done = warmup, 0.0, 0
        self.step_ms: list[float] = []
        self.peak: float | None = None

    def callback(self) -> Any:
        from transformers import TrainerCallback

        timer = self

        class Timer(TrainerCallback):
            def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
                if timer.done == timer.warmup:
                    reset_peak_rss()
                timer.started = time.perf_counter()

            def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
                elapsed = (time.perf_counter() - timer.started) * 1000
                if timer.done >= timer.warmup:
                    timer.step_ms.append(elapsed)
                timer.done += 1
                timer.peak = peak_rss_since_reset_mib()

        return Timer()


def trl_config(
    side: Side | None, args: argparse.Namespace, steps: int, out: str, beta: float, precompute: bool = False
) -> Any:
    from trl import DPOConfig

    return DPOConfig(
        output_dir=out,
        per_device_train_batch_size=args.batch_size,
        learning_rate=1e-5,
        beta=beta,
        max_steps=steps,
        max_length=None,
        bf16=False,
        use_cpu=True,
        gradient_checkpointing=bool(side and side.gradient_checkpointing),
        train_sampling_strategy="sequential",
        report_to="none",
        save_strategy="no",
        logging_steps=10**6,
        disable_tqdm=True,
        dataloader_num_workers=0,
        precompute_ref_log_probs=precompute,
        seed=args.seed,
    )


def trl_model(probe: Probe, side: Side, lora_spec: RunSpec) -> Any:
    loaded = copy.copy(probe.start)
    loaded.model = copy.deepcopy(probe.start.model)
    if side.train == "all":  # TRL's default: every parameter trains
        for p in loaded.model.parameters():
            p.requires_grad_(True)
        return loaded.model
    parts.freeze_for_training(loaded, side.train)
    if side.train == "lora":
        lora.attach(loaded, lora_spec)  # vqabench's adapters: the same targets, rank and alpha
    return loaded.model


def measure_trl(
    probe: Probe, side: Side, dataset: Any, processor: Any, args: argparse.Namespace
) -> tuple[list[float], float, float]:
    """TRL's timed steps, the peak RSS over them, and its reference's bytes in MiB (a model or an adapter)."""
    from transformers import PrinterCallback
    from trl import DPOTrainer

    timer = _StepTimer(args.warmup)
    reference = None
    if side.train != "lora":  # TRL would reload the reference by hub id; an in-memory model's is handed over
        reference = copy.deepcopy(probe.start.model).requires_grad_(False).eval()
    with tempfile.TemporaryDirectory() as out:
        trainer = DPOTrainer(
            model=trl_model(probe, side, probe.plan.specs[-1]),
            ref_model=reference,
            args=trl_config(side, args, args.warmup + args.steps, out, probe.plan.specs[0].resolved_beta),
            train_dataset=dataset,
            processing_class=processor,
            callbacks=[timer.callback()],
        )
        trainer.remove_callback(PrinterCallback)  # its per-run metrics dict is not this table
        if reference is not None:
            reference_bytes = module_bytes(reference)
        else:  # under LoRA, TRL's reference is a frozen copy of the adapter, named "ref"
            assert trainer.model is not None
            named = trainer.model.named_parameters()
            reference_bytes = sum(p.numel() * p.element_size() for n, p in named if ".ref." in n)
        trainer.train()
    if len(timer.step_ms) != args.steps or timer.peak is None:
        raise SystemExit(f"{side.name}: timed {len(timer.step_ms)} of {args.steps} steps")
    return timer.step_ms, timer.peak, reference_bytes / 2**20


def precompute_refusal(probe: Probe, dataset: Any, processor: Any, args: argparse.Namespace) -> str:
    """TRL's own words when asked to precompute reference log-probs on this vision data (tried, not assumed)."""
    from trl import DPOTrainer

    side = SIDES[0]
    with tempfile.TemporaryDirectory() as out:
        try:
            DPOTrainer(
                model=trl_model(probe, side, probe.plan.specs[-1]),
                args=trl_config(side, args, 1, out, probe.plan.specs[0].resolved_beta, precompute=True),
                train_dataset=dataset,
                processing_class=processor,
            )
        except ValueError as exc:
            return str(exc).strip()
    return ""


def compare(model: str, args: argparse.Namespace) -> tuple[ReportTable, str]:
    from datasets import Dataset

    sides = sides_for(args.sides)
    vq_sides = [s for s in sides if s.engine == "vqabench"]
    plan = ProbePlan(
        [vqabench_spec(s, model, args) for s in vq_sides], steps=args.steps, rounds=args.rounds, warmup=args.warmup
    )
    plan.validate()
    torch.manual_seed(args.seed)
    probe = prepare(plan, lambda event: None)
    if args.start_on_disk:
        start_on_disk(probe, args.start_on_disk)
    data = probe_data(plan, probe)
    rows = trl_rows(probe, data)
    processor = trl_processor(probe.start)
    check_prompts(probe, processor, rows, data)
    dataset = Dataset.from_list(rows)
    refusal = precompute_refusal(probe, dataset, processor, args)
    specs = {s.name: spec for s, spec in zip(vq_sides, plan.specs, strict=True)}
    results = {s.name: Measured() for s in sides}
    for r in range(1, args.rounds + 1):
        for side in sides if r % 2 else tuple(reversed(sides)):
            release_free_memory()
            before = process_rss_mib() or math.nan
            if side.engine == "vqabench":
                event = measure(probe, specs[side.name], r)
                step_ms, peak = list(event.step_ms), event.peak_memory_mib or math.nan
                reference_mib = event.reference_bytes / 2**20
            else:
                step_ms, peak, reference_mib = measure_trl(probe, side, dataset, processor, args)
            got = results[side.name]
            got.reference_mib = reference_mib
            got.step_ms.append(step_ms)
            got.peak_mib.append(peak)
            got.above_mib.append(peak - before)
            print(f"round {r}/{args.rounds} {model} {side.name}: {median(step_ms):.1f} ms/step", file=sys.stderr)
    return table(model, results, refusal), refusal


def median(values: list[float]) -> float:
    return quantiles(values, (0.5,))[0]


def ratio_text(a: list[list[float]], b: list[list[float]]) -> str:
    ratio = ratio_ci(a, b, "median", paired=True)
    text = f"{ratio.mean:.2f}"
    if ratio.low is not None and ratio.high is not None:
        text += f" [{ratio.low:.2f}, {ratio.high:.2f}]"
    return text


def table(model: str, results: dict[str, Measured], refusal: str) -> ReportTable:
    columns = ["Model", "Side", "Trains", "Reference", "ms/step (p10 … p90)", "vqabench ÷ TRL [95%]",
               "Reference [MiB]", "Peak RSS [MiB]", "Above start [MiB]"]  # fmt: skip
    rows = []
    for side in (s for s in SIDES if s.name in results):
        got = results[side.name]
        times = [ms for unit in got.step_ms for ms in unit]
        p10, mid, p90 = quantiles(times, (0.1, 0.5, 0.9))
        if side.versus:
            relative = ratio_text(got.step_ms, results[side.versus].step_ms)
        elif side.gradient_checkpointing:
            relative = ratio_text(results[VQABENCH_TOWER_FROZEN].step_ms, got.step_ms) + " (tower frozen ÷ this)"
        else:
            relative = NA
        trains = {"lm": "LM, tower + projector frozen", "lora": "LoRA, tower frozen", "all": "everything"}[side.train]
        timing = f"{mid:.1f} ({p10:.1f} … {p90:.1f})"
        memory = [f"{got.reference_mib:.1f}", f"{median(got.peak_mib):.0f}", f"{median(got.above_mib):.0f}"]
        rows.append([model, side.name, trains, side.reference, timing, relative, *memory])
    rows.append([model, "TRL, precomputed reference", "LM, tower + projector frozen", "precompute",
                 "cannot: refused for vision data" if refusal else "accepted", NA, NA, NA, NA])  # fmt: skip
    align = ["left"] * 4 + ["right"] * 5
    cells = [[word(text) for text in row] for row in rows]
    return ReportTable(title=f"vqabench vs TRL: {model}", columns=columns, align=align, cells=cells)


def models_for(args: argparse.Namespace) -> list[str]:
    if args.models:
        return [m.strip() for m in args.models.split(",") if m.strip()]
    chosen = list(TINY if args.size == "tiny" else REAL if args.size == "real" else TINY + REAL)
    return [*chosen, HEAVY] if args.qwen2_vl_2b else chosen


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", default="tiny", choices=("tiny", "real", "all"),
                   help=f"tiny: {', '.join(TINY)}; real: {', '.join(REAL)}; all: both")  # fmt: skip
    p.add_argument("--qwen2-vl-2b", action="store_true", help=f"also {HEAVY} (heavy on a small CPU)")
    p.add_argument("--models", default="", help="comma list of built-in qwen2-vl/idefics3 variants (overrides --size)")
    p.add_argument("--sides", default="all",
                   help=f"comma list of the pairings to run: {', '.join(SIDE_GROUPS)} (default all)")  # fmt: skip
    p.add_argument("--start-on-disk", default="", metavar="FOLDER",
                   help="keep the start model's weights memory-mapped from a file in FOLDER, not in RAM "
                        "(a model whose start and working copies do not fit together)")  # fmt: skip
    p.add_argument("--batch-size", type=int, default=8, help="pairs per step, both sides")
    p.add_argument("--steps", type=int, default=10, help="timed steps per side per round")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per side per round")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds (an interval needs 2 or more)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    p.add_argument("--seed", type=int, default=0, help="the random model's weights (and TRL's seed)")
    args = p.parse_args(argv)
    sides_for(args.sides)  # a bad --sides fails before any model is built
    try:
        import trl
    except ImportError:
        p.error("TRL is not installed: pip install 'vqabench[compare]'")
    if args.threads:
        torch.set_num_threads(args.threads)
    tables, refusal = [], ""
    for model in models_for(args):
        result, refusal = compare(model, args)
        tables.append(result)
    cells = [row for t in tables for row in t.cells]
    print(
        f"vqabench {__version__} vs TRL {trl.__version__}; CPU, {torch.get_num_threads()} threads, fp32; "
        f"batch {args.batch_size}, {args.steps} timed steps after {args.warmup} warmup, {args.rounds} rounds\n"
    )
    print("\n".join(markdown_table(dataclasses.replace(tables[0], title="vqabench vs TRL", cells=cells))))
    print()
    defaults = any(side.gradient_checkpointing for side in sides_for(args.sides))
    print(
        "vqabench ÷ TRL: the ratio of median ms/step, paired by round, with a 95% t-interval over rounds"
        + ("; the TRL defaults row divides vqabench's tower-frozen step by TRL's default one." if defaults else ".")
    )
    if refusal:
        print(f"TRL, asked for precompute_ref_log_probs=True on these pairs: {refusal!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
