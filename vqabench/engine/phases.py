"""A prepared run's phases: its reference, run_started, the epochs, and the test scores.

Each phase is one function that `vqabench.engine.run` calls in turn; they share a `Context`.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from vqabench import events as ev
from vqabench.engine import distributed
from vqabench.engine.answers import score_answers, score_eval_answers
from vqabench.engine.best_weights import BestWeights
from vqabench.engine.data.batching import EncodedData
from vqabench.engine.data.records import DataSplits
from vqabench.engine.devices import describe_all
from vqabench.engine.out_of_memory import explain_out_of_memory
from vqabench.engine.prepare import Prepared
from vqabench.engine.progress import Emit, Throttled
from vqabench.engine.reference import AdapterReference, CopyReference, PrecomputedReference
from vqabench.engine.reference_choice import ReferenceChoice, choose_reference, free_bytes, precomputed_table_bytes
from vqabench.engine.telemetry import Telemetry, module_bytes
from vqabench.engine.trainer import Reference, Trainer
from vqabench.models import checkpoints, lora, parts
from vqabench.models.family import LoadedModel
from vqabench.scoring import ScoreSummary, judge_with_cache
from vqabench.spec import RunSpec


@dataclass
class Context:
    """What every phase of one prepared run shares."""

    spec: RunSpec  # with the resolved token limits
    loaded: LoadedModel
    data: DataSplits
    encoded: EncodedData
    emit: Emit
    ranks: distributed.Ranks
    device: torch.device
    cache_dir: Path
    out_dir: Path
    progress: Throttled

    @property
    def best_dir(self) -> Path:
        return self.out_dir / "best"


@dataclass
class Started:
    """The trainer and telemetry that run_started announced, and the reference's resident bytes."""

    trainer: Trainer
    telemetry: Telemetry
    reference_bytes: int


@dataclass
class ReferenceSetup:
    """The reference phase's outcome: the reference (None if the method needs none), the seconds
    its precompute pass took, and which strategy was chosen and why (None without a reference)."""

    ref: Reference | None
    seconds: float | None
    choice: ReferenceChoice | None


def choose_run_reference(run: Context) -> ReferenceChoice:
    """The run's strategy: the preset's, or for "auto" the cheapest exact one (decided by every rank together)."""
    spec = run.spec
    pairs = sum(len(run.encoded.splits[name]) for name in ("train", "eval"))
    table_bytes = precomputed_table_bytes(pairs)
    free = free_bytes(run.cache_dir)
    if spec.reference == "auto" and not run.ranks.all(table_bytes <= free, run.device):
        free = -1  # it fits on some ranks' disks only: every rank keeps the same strategy
    return choose_reference(spec.reference, train=spec.train, epochs=spec.epochs, table_bytes=table_bytes, free=free)


def reference(run: Context) -> ReferenceSetup:
    """The reference model the objective compares against, built with the chosen strategy. A LoRA
    run's adapters are attached here, after a copy or precomputed reference has taken the start
    model (an adapter reference is the model itself)."""
    spec, loaded = run.spec, run.loaded
    ref: Reference | None = None
    seconds = None
    choice = choose_run_reference(run) if spec.needs_reference else None
    strategy = choice.chosen if choice is not None else None
    if spec.needs_reference:
        if strategy == "copy":
            ref = CopyReference(loaded, spec.train)
        elif strategy == "precompute":
            ckpt = spec.init_checkpoint
            start = (
                checkpoints.checkpoint_fingerprint(Path(ckpt))
                if ckpt
                else f"{spec.model}:{spec.seed}:{spec.base_samples}:{spec.dataset.seed}"
            )
            key = f"{start}|q{spec.max_question_tokens}|a{spec.max_answer_tokens}"
            with explain_out_of_memory("precomputing the reference log-probs", spec.batch_size):
                precomputed = PrecomputedReference.build(
                    loaded,
                    run.encoded,
                    batch_size=run.ranks.per_device_batch(spec.batch_size),
                    device=run.device,
                    cache_dir=run.cache_dir,
                    checkpoint_key=key,
                    data_key=run.data.fingerprint,
                    precision=spec.precision,
                    progress=run.progress.reporter("reference", "precomputing reference log-probs"),
                    ranks=run.ranks,
                )
            ref, seconds = precomputed, precomputed.seconds
    if spec.train == "lora":
        lora.attach(loaded, spec)
        if strategy == "adapter":
            ref = AdapterReference(loaded)
    return ReferenceSetup(ref, seconds, choice)


def start(run: Context, prepared: Prepared, reference_setup: ReferenceSetup) -> Started:
    """The trainer and telemetry, announced in run_started (its data section: sizes, quality, sources,
    the reference's choice)."""
    spec, loaded, data, device, ranks = run.spec, run.loaded, run.data, run.device, run.ranks
    ref, reference_seconds, choice = reference_setup.ref, reference_setup.seconds, reference_setup.choice
    trainer = Trainer(spec, loaded, run.encoded, ref, device, on_progress=run.progress, ranks=ranks)
    trainable, total = parts.count_parameters(loaded.model)
    ref_bytes = ref.resident_bytes if ref is not None else 0
    telemetry = Telemetry(str(device), interval=spec.telemetry_interval)
    run.progress.telemetry = telemetry.latest
    data_info = {
        "dataset": data.name,
        "sizes": data.sizes(),
        "quality": data.report.to_dict(),
        "fingerprint": data.fingerprint,
        "model_source": loaded.source,
        "model_family": loaded.family.name,
        "trainable_bytes": module_bytes(parts.trainable_part(loaded, spec.train))
        if spec.train != "lora"
        else sum(p.numel() * p.element_size() for p in loaded.model.parameters() if p.requires_grad),
        "reference_seconds": reference_seconds,
        "encoder_cache": prepared.encoder_cache,
        "reference_choice": choice.to_dict() if choice is not None and ref is not None else None,
        # frozen Linears stored in the autocast dtype (exact; engine/precision.py): which dtype, bytes saved
        "low_frozen_weights": {"dtype": spec.precision, "bytes_saved": trainer.low_frozen_bytes}
        if trainer.low_frozen_bytes
        else None,
    }
    run.emit(
        ev.RunStarted(
            run=spec.name,
            method=spec.method,
            config=spec.to_dict(),
            device=describe_all(device, ranks),
            torch_version=torch.__version__,
            trainable_params=trainable,
            total_params=total,
            reference_strategy=choice.chosen if choice is not None and ref is not None else None,
            reference_bytes=ref_bytes,
            epochs=spec.epochs,
            steps_per_epoch=trainer.steps_per_epoch,
            telemetry=telemetry.status,
            data=data_info,
            pid=os.getpid(),
            world_size=ranks.world_size,
            backend=ranks.backend,
            global_batch=spec.batch_size,
            per_device_batch=trainer.batch_size,
            train=spec.train,
            precision=spec.precision,
        )
    )
    return Started(trainer, telemetry, ref_bytes)


def base_answers(run: Context, started: Started) -> list[str] | None:
    """The starting model's test answers, for the report's "base" row (None when not asked for).

    Judged after training with the run's own answers, so no judge model is resident during the epochs.
    """
    if not (run.spec.score_base and run.spec.score_test and run.spec.init_checkpoint is None):
        return None
    with explain_out_of_memory("generating the starting model's test answers", run.spec.batch_size):
        return started.trainer.answers("test")


def train(run: Context, started: Started) -> float:
    """The epochs, one epoch_ended each; returns the timed training seconds.

    Leaves the best epoch's weights (lowest eval loss) in the model, saved to `run.best_dir`.
    """
    spec, loaded, ranks, trainer = run.spec, run.loaded, run.ranks, started.trainer
    if spec.eval_every_epoch and ranks.is_main:
        # Judging happens after every epoch: load the judge's model now, so it is resident from
        # the first epoch on and the per-epoch memory figures stay comparable.
        with judge_with_cache(spec.judge, run.cache_dir) as (judge, _):
            judge.prepare()
    train_seconds = 0.0
    best = BestWeights(parts.trainable_part(loaded, spec.train))
    with started.telemetry:
        trainer.warm_up()  # untimed, outside every window; training numbers are unchanged
        for epoch in range(1, spec.epochs + 1):
            result = trainer.run_epoch(epoch, started.telemetry)  # the window covers exactly the timed steps
            tel = result.telemetry
            train_seconds += result.epoch_seconds
            if result.is_best:
                best.keep()
                if ranks.is_main:
                    checkpoints.save_checkpoint(loaded, run.best_dir)
            ranks_memory = distributed.rank_memory(tel.event_fields(), ranks) if ranks.distributed else {}
            scored: ScoreSummary | None = None
            if spec.eval_every_epoch:
                with explain_out_of_memory(f"generating eval answers after epoch {epoch}", spec.batch_size):
                    answers = trainer.answers("eval", spec.eval_every_epoch)
            if spec.eval_every_epoch and ranks.is_main:
                pairs = run.encoded.splits["eval"].pairs[: len(answers)]
                scored = score_eval_answers(spec, pairs, answers, run.cache_dir, epoch)
            e = result.eval
            run.emit(
                ev.EpochEnded(
                    epoch=epoch,
                    epochs=spec.epochs,
                    train_loss=result.train_loss,
                    eval_loss=e.loss,
                    epoch_seconds=result.epoch_seconds,
                    eval_seconds=e.seconds,
                    samples_per_s=result.samples / result.epoch_seconds if result.epoch_seconds else 0.0,
                    lr=result.lr,
                    reference_bytes=started.reference_bytes,
                    chosen_logp=e.chosen_logp,
                    rejected_logp=e.rejected_logp,
                    reward_margin=e.reward_margin,
                    pref_accuracy=e.pref_accuracy,
                    is_best=result.is_best,
                    optimizer_state_bytes=trainer.optimizer_state_bytes,
                    **tel.event_fields(),
                    em=scored.em if scored else None,
                    f1=scored.f1 if scored else None,
                    judge_score=scored.judge_score if scored else None,
                    scored_n=scored.n if scored else None,
                    **ranks_memory,
                    **trainer.clock.event_fields(),
                )
            )
    best.restore()  # the test answers come from the best epoch (lowest eval loss)
    return train_seconds


def test(run: Context, started: Started, base: list[str] | None, train_seconds: float, t_start: float) -> None:
    """The best weights' test answers, judged and written (with the base row's), then run_finished.

    A tuning trial (``score_test`` false) has no test split: it reports run_finished only.
    """
    spec, trainer = run.spec, started.trainer
    if spec.score_test:
        with explain_out_of_memory("generating the test answers", spec.batch_size):
            answers = trainer.answers("test")
    if not run.ranks.is_main:  # rank 0 judges, writes the predictions and reports
        return
    if spec.score_test:
        pairs = run.encoded.splits["test"].pairs
        if base is not None:
            base_predictions = run.out_dir / "base-predictions.jsonl"
            base_summary = score_answers(spec, pairs, base, run.cache_dir, base_predictions, run.progress)
            run.emit(base_summary.to_event("base", str(base_predictions)))
        predictions = run.out_dir / "predictions.jsonl"
        summary = score_answers(spec, pairs, answers, run.cache_dir, predictions, run.progress)
        run.emit(summary.to_event("test", str(predictions)))
    run.emit(
        ev.RunFinished(
            best_epoch=trainer.best_epoch,
            best_eval_loss=trainer.best_loss,
            checkpoint=str(run.best_dir),
            total_seconds=time.perf_counter() - t_start,
            train_seconds=train_seconds,
        )
    )
