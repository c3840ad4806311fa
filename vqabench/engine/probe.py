"""The interleaved step-cost probe: every preset's training step on the same batches, one process.

`vqabench probe` and ``benchmarks/efficiency.py`` both time steps here; there is no other
implementation of "time a step". One worker process loads the start model and a few batches
once, then runs ``rounds`` rounds; in each round every preset (in turn, the order reversed
every other round) gets a fresh copy of the start model, its reference (a frozen copy, or
the precompute pass: its setup cost), ``warmup`` untimed and ``steps`` timed training
steps through :meth:`vqabench.engine.trainer.Trainer.train_step`, the very step a run
takes. Anything else on the machine then lands on every preset alike.

Every preset starts from the same model: the start of the first preset that has none of its
own (for the embedded default, the embedded base checkpoint). A DPO preset's ``after`` is
not trained first: the probe measures what a step costs, not what it learns.
"""

from __future__ import annotations

import copy
import dataclasses
import gc
import os
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch

from vqabench import events as ev
from vqabench.engine.cache import ArrayStore, Entry
from vqabench.engine.data.batching import EncodedData
from vqabench.engine.devices import describe
from vqabench.engine.encoder_cache import attach_encoder_cache
from vqabench.engine.prepare import encode_for_run, load_model_and_data
from vqabench.engine.reference import AdapterReference, CopyReference, PrecomputedReference
from vqabench.engine.reference_choice import choose_reference, free_bytes, precomputed_table_bytes
from vqabench.engine.telemetry import peak_rss_since_reset_mib, release_free_memory, reset_peak_rss
from vqabench.engine.timing import StepClock, usable_cores
from vqabench.engine.trainer import Trainer, pick_device, synchronize
from vqabench.models import lora, parts, registry
from vqabench.models.family import LoadedModel, Savings
from vqabench.spec import ProbePlan, RunSpec, default_cache_dir

Emit = Callable[[ev.Event], None]


@dataclass
class Probe:
    """The loaded start model, the batches every preset steps through, and the device."""

    plan: ProbePlan
    start: LoadedModel
    encoded: EncodedData
    batches: list[torch.Tensor]
    device: torch.device
    cache_dir: Path
    encodings: Entry | None = None  # the frozen-encoder cache, for presets that use it (built once, in memory)


def prepare(plan: ProbePlan, emit: Emit) -> Probe:
    """Load the start model and just enough pairs for warmup + steps batches (and one eval batch)."""
    first = plan.specs[0]
    torch.manual_seed(first.seed)
    device = pick_device(first.device)
    cache_dir = Path(plan.cache_dir or first.cache_dir or default_cache_dir())
    bs = first.batch_size
    n_batches = plan.warmup + plan.steps
    dataset = dataclasses.replace(first.dataset, eval_size=bs, test_size=bs)
    start_spec = first.replace(dataset=dataset, limit=bs * n_batches, after=None)
    start_spec, start, data = load_model_and_data(start_spec, cache_dir, emit)
    _, encoded = encode_for_run(start_spec, data, start)
    order = torch.randperm(len(data.train), generator=torch.Generator().manual_seed(first.seed))
    batches = [order[i * bs : (i + 1) * bs] for i in range(n_batches)]
    batches = [b for b in batches if len(b)]
    encodings = None
    if any(spec.uses_encoder_cache for spec in plan.specs):  # every preset starts from `start`: one pass for all
        start.model.to(device)
        attach_encoder_cache(
            start,
            encoded,
            data_fingerprint=data.fingerprint,
            dtype=first.encoder_cache_dtype,
            batch_size=bs,
            device=device,
            store=ArrayStore(None),
            train=start_spec.train,
        )
        encodings, encoded.encodings = encoded.encodings, None
        # Back to the CPU: every preset deep-copies the start model onto the device itself, and a
        # start model left there would sit in every CUDA peak measured (a whole model: 31 GiB at 7B).
        start.model.to("cpu")
    return Probe(plan, start, encoded, batches, device, cache_dir, encodings)


def measure(probe: Probe, spec: RunSpec, round_number: int) -> ev.ProbeMeasured:
    """One preset's steps in one round: a fresh copy of the start model, its reference, the steps."""
    device, encoded = probe.device, probe.encoded
    spec = spec.replace(batch_size=probe.plan.specs[0].batch_size)
    spec = spec.with_default_train(registry.default_train_of(probe.start.family))
    if spec.needs_reference:  # "auto" resolves as a run's does, so the probe times the step a run would take
        pairs = sum(len(split.pairs) for split in encoded.splits.values())
        choice = choose_reference(
            spec.reference,
            train=spec.train,
            epochs=spec.epochs,
            table_bytes=precomputed_table_bytes(pairs),
            free=free_bytes(probe.cache_dir),
        )
        spec = spec.replace(reference=choice.chosen)
    loaded = copy.copy(probe.start)
    # This preset's switches; the features are cut where its `train` needs them, and the one
    # shared encoding pass serves it only when that is where the pass cut them.
    cut = loaded.family.projected_features(spec.train)
    loaded.savings = Savings(spec.shared_prompt, spec.answer_only_logits, projected_features=cut)
    same_cut = cut == probe.start.savings.projected_features
    encoded.encodings = probe.encodings if spec.uses_encoder_cache and same_cut else None
    loaded.model = copy.deepcopy(probe.start.model).to(device)
    parts.freeze_for_training(loaded, spec.train)
    started = time.perf_counter()
    reference: CopyReference | PrecomputedReference | AdapterReference | None = None
    if spec.needs_reference and spec.reference == "copy":
        reference = CopyReference(loaded, spec.train)
    elif spec.needs_reference and spec.reference == "precompute":
        reference = PrecomputedReference.build(
            loaded,
            encoded,
            batch_size=spec.batch_size,
            device=device,
            cache_dir=None,  # measured every round: the one-off pass a run pays
            checkpoint_key="probe",
            data_key="probe",
            precision="bf16" if probe.plan.bf16 else spec.precision,
        )
    if spec.train == "lora":  # as a run does: a copy or precomputed reference is taken before the adapters
        lora.attach(loaded, spec)
        if spec.needs_reference and spec.reference == "adapter":
            reference = AdapterReference(loaded)
    synchronize(device)
    setup_seconds = time.perf_counter() - started
    trainer = Trainer(spec, loaded, encoded, reference, device)
    parts.set_train_mode(loaded, spec.train)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if probe.plan.bf16 else nullcontext()

    def step(rows: torch.Tensor) -> None:
        with autocast:
            trainer.train_step(encoded.batch("train", rows, device))
        synchronize(device)

    warm, timed = probe.batches[: probe.plan.warmup], probe.batches[probe.plan.warmup :]
    for rows in warm:
        step(rows)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    else:
        reset_peak_rss()
    clock = StepClock(cores=torch.get_num_threads())
    clock.begin()
    for rows in timed:
        step(rows)
        clock.step_done()
    fields = clock.event_fields()
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if cuda else peak_rss_since_reset_mib()
    result = ev.ProbeMeasured(
        preset=spec.name,
        method=spec.method,
        round=round_number,
        step_ms=fields["step_ms"],
        peak_memory_mib=peak,
        memory_source="CUDA" if cuda else "RSS",
        reference_strategy=reference.strategy if reference is not None else None,
        reference_bytes=reference.resident_bytes if reference is not None else 0,
        setup_seconds=setup_seconds if reference is not None else 0.0,
        load_avg_max=fields["load_avg_max"],
    )
    encoded.encodings = None
    return result  # the copy, its reference and optimizer go with this frame; execute_probe frees them


def execute_probe(plan: ProbePlan, emit: Emit) -> list[ev.ProbeMeasured]:
    """Run the probe, emitting probe_started, progress and one probe_measured per preset and round."""
    plan.validate()
    probe = prepare(plan, emit)
    first = plan.specs[0]
    emit(
        ev.ProbeStarted(
            presets=[s.name for s in plan.specs],
            device=describe(probe.device),
            torch_version=torch.__version__,
            model_source=probe.start.source,
            batch_size=first.batch_size,
            steps=len(probe.batches) - min(plan.warmup, len(probe.batches)),
            warmup=plan.warmup,
            rounds=plan.rounds,
            cores=torch.get_num_threads(),
            pid=os.getpid(),
            machine_cores=usable_cores(),
        )
    )
    results: list[ev.ProbeMeasured] = []
    total = plan.rounds * len(plan.specs)
    for r in range(1, plan.rounds + 1):
        order = plan.specs if r % 2 else list(reversed(plan.specs))
        for spec in order:
            emit(ev.Progress(phase="probe", epoch=0, step=len(results), steps=total, message=f"round {r}: {spec.name}"))
            result = measure(probe, spec, r)
            gc.collect()
            if probe.device.type == "cuda":
                torch.cuda.empty_cache()
            release_free_memory()
            results.append(result)
            emit(result)
    return results
