"""One training run inside the worker: data → model → reference → epochs → test scores.

Everything is reported as events through `emit`; nothing here writes to stdout.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

import torch

from vqabench import events as ev
from vqabench import metrics
from vqabench.engine import distributed
from vqabench.engine.base_checkpoint import ensure_base_checkpoint
from vqabench.engine.best_weights import BestWeights
from vqabench.engine.cache import ArrayStore
from vqabench.engine.data import easyvqa
from vqabench.engine.data.batching import EncodedData, TextEncoder, encode
from vqabench.engine.data.records import DataError, DataSplits
from vqabench.engine.data.token_limits import resolve_token_limits
from vqabench.engine.encoder_cache import attach_encoder_cache
from vqabench.engine.out_of_memory import explain_out_of_memory
from vqabench.engine.precision import check_precision
from vqabench.engine.reference import AdapterReference, CopyReference, PrecomputedReference, assign_mismatched
from vqabench.engine.telemetry import Telemetry, module_bytes
from vqabench.engine.trainer import Reference, Trainer
from vqabench.judges import JudgeError, JudgeItem
from vqabench.models import checkpoints, lora, parts, registry
from vqabench.models.family import LoadedModel, ModelError
from vqabench.scoring import ScoreSummary, judge_with_cache, score_items
from vqabench.spec import RunSpec, default_cache_dir

log = logging.getLogger(__name__)
Emit = Callable[[ev.Event], None]


class Throttled:
    """Progress events at most every `interval` seconds (always the last step), with the latest
    telemetry sample once `telemetry` is set (a function returning Progress's telemetry fields)."""

    def __init__(self, emit: Emit, interval: float = 0.25):
        self.emit, self.interval, self.last = emit, interval, 0.0
        self.telemetry: Callable[[], dict[str, float | None]] | None = None

    def __call__(self, phase: str, epoch: int, step: int, steps: int, loss: float | None, message: str = "") -> None:
        now = time.monotonic()
        if step >= steps or now - self.last >= self.interval:
            self.last = now
            sample = self.telemetry() if self.telemetry is not None else {}
            self.emit(
                ev.Progress(
                    phase=phase, epoch=epoch, step=step, steps=steps, running_loss=loss, message=message, **sample
                )
            )


def load_data(spec: RunSpec, cache_dir: Path) -> DataSplits:
    if spec.dataset.source == "easyvqa":
        return easyvqa.load_splits(spec.dataset, seed=spec.dataset.seed, limit=spec.limit)
    from vqabench.engine.data.hub import load_splits

    return load_splits(spec.dataset, seed=spec.dataset.seed, limit=spec.limit, cache_dir=cache_dir / "datasets")


def load_model_and_data(spec: RunSpec, cache_dir: Path, emit: Emit) -> tuple[LoadedModel, DataSplits]:
    """The starting model (init checkpoint, embedded base, built-in variant or hub) and the data.

    Raises ModelError when the model's family cannot train the spec's ``train`` value.
    """
    loaded: LoadedModel | None = None
    if spec.init_checkpoint is not None:
        if not Path(spec.init_checkpoint).is_dir():
            raise ModelError(
                f"the starting checkpoint '{spec.init_checkpoint}' does not exist; "
                f"run the preset named in 'after' first."
            )
        loaded = checkpoints.load_pretrained(spec.init_checkpoint)
    elif spec.model != "embedded" and registry.variant(spec.model) is None:
        loaded = checkpoints.load_pretrained(spec.model)
    data = load_data(spec, cache_dir)
    if loaded is None and spec.model == "embedded":
        # Always made from easy-VQA's base split, whatever the fine-tuning data, so it is the
        # same "pretrained" model for every dataset. Built on the CPU whatever the run's device,
        # so it is the same bytes everywhere and its cache key holds.
        folder = ensure_base_checkpoint(
            seed=spec.dataset.seed, samples=spec.base_samples, cache_dir=cache_dir, emit=emit
        )
        loaded = checkpoints.load_pretrained(str(folder))
    elif loaded is None:  # a built-in variant; a tiny one trains its tokenizer on the run's own text
        loaded = checkpoints.build_variant(spec.model, spec.seed, texts=fitting_texts(data))
    loaded.family.check_train(spec.train)
    return loaded, data


def fitting_texts(data: DataSplits) -> list[str]:
    """The questions and answers a tokenizer may be trained on: the train and eval splits, never test."""
    return [t for p in (*data.train, *data.eval) for t in (p.question, p.chosen, p.rejected) if t]


def execute(spec: RunSpec, emit: Emit) -> None:
    """Run one spec end to end, emitting events; raises on failure (the worker reports it)."""
    t_start = time.perf_counter()
    torch.manual_seed(spec.seed)
    ranks, device = distributed.start(spec.device)
    try:
        check_precision(spec.precision, device)
        with distributed.NodePreparation(ranks) as preparation:
            _execute(spec, emit if ranks.is_main else _silent, ranks, device, t_start, preparation)
    finally:
        distributed.finish(ranks)


def encode_for_run(
    spec: RunSpec,
    data: DataSplits,
    loaded: LoadedModel,
    store: ArrayStore | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[RunSpec, EncodedData]:
    """Resolve the token limits from the data (recorded in its quality report), encode it, fix KTO's pairing.

    Images go to the array cache in `store` (None: kept in memory). Returns the spec with
    integer limits, and the encoded data.
    """
    text = TextEncoder(loaded)
    if not spec.lora_targets:  # the family's defaults, recorded in run_started's config
        spec = spec.replace(lora_targets=list(loaded.family.lora_targets))
    limits = resolve_token_limits(
        data,
        question_setting=spec.max_question_tokens,
        answer_setting=spec.max_answer_tokens,
        question_length=text.question_length,
        answer_length=text.answer_length,
        question_cap=loaded.question_token_cap,
        answer_cap=loaded.answer_token_cap,
        prompts_can_be_cut=loaded.family.prompts_can_be_cut,
    )
    spec = spec.replace(max_question_tokens=limits.question, max_answer_tokens=limits.answer)
    encoded = encode(
        data, loaded, limits.question, limits.answer, text, store=store, num_workers=spec.num_workers, progress=progress
    )
    assign_mismatched(encoded, spec.batch_size, spec.dataset.seed)
    return spec, encoded


def _silent(event: ev.Event) -> None:
    """Ranks other than 0 report nothing: one run, one event stream."""


def _execute(
    spec: RunSpec,
    emit: Emit,
    ranks: distributed.Ranks,
    device: torch.device,
    t_start: float,
    preparation: distributed.NodePreparation,
) -> None:
    cache_dir = Path(spec.cache_dir) if spec.cache_dir else default_cache_dir()
    out_dir = Path(spec.output_dir) if spec.output_dir else Path("vqabench-results") / "runs" / spec.name
    out_dir.mkdir(parents=True, exist_ok=True)
    progress = Throttled(emit)

    # Each node's first process builds the base checkpoint and fills the caches, while the others
    # wait for it outside any collective (preparing has no time limit; a collective has one).
    preparation.begin()
    loaded, data = load_model_and_data(spec, cache_dir, emit)
    with explain_out_of_memory(f"moving the model to {device}", spec.batch_size):
        loaded.model.to(device)
    store = ArrayStore(cache_dir / "arrays")
    # From here on the run uses the resolved limits; run_started's data keeps the settings.
    spec, encoded = encode_for_run(
        spec,
        data,
        loaded,
        store=store,
        progress=lambda i, n: progress("images", 0, i, n, None, "writing preprocessed images to the cache"),
    )
    encoder_cache: dict[str, object] = {"on": False}
    if spec.uses_encoder_cache:
        with explain_out_of_memory("encoding the images and questions once", spec.batch_size):
            info = attach_encoder_cache(
                loaded,
                encoded,
                data_fingerprint=data.fingerprint,
                dtype=spec.encoder_cache_dtype,
                batch_size=spec.batch_size,
                device=device,
                store=store,
                train=spec.train,
                progress=lambda i, n: progress("encode", 0, i, n, None, "encoding images and questions once"),
            )
        emit(ev.EncoderCached(**info.to_dict()))
        encoder_cache = {"on": True, **info.to_dict()}
    preparation.done()  # caches complete, every process has its data: collectives may start
    torch.manual_seed(spec.seed)  # dropout and shuffling vary with the run seed only

    reference: Reference | None = None
    reference_seconds = None
    if spec.needs_reference:
        if spec.reference == "copy":
            reference = CopyReference(loaded, spec.train)
        elif spec.reference == "precompute":
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
                    encoded,
                    batch_size=ranks.per_device_batch(spec.batch_size),
                    device=device,
                    cache_dir=cache_dir,
                    checkpoint_key=key,
                    data_key=data.fingerprint,
                    precision=spec.precision,
                    progress=lambda i, n: progress("reference", 0, i, n, None, "precomputing reference log-probs"),
                    ranks=ranks,
                )
            reference, reference_seconds = precomputed, precomputed.seconds
    if spec.train == "lora":  # after a copy or precomputed reference has taken the start model
        lora.attach(loaded, spec)
        if spec.needs_reference and spec.reference == "adapter":
            reference = AdapterReference(loaded)
    trainer = Trainer(spec, loaded, encoded, reference, device, on_progress=progress, ranks=ranks)
    trainable, total = parts.count_parameters(loaded.model)
    ref_bytes = reference.resident_bytes if reference is not None else 0
    telemetry = Telemetry(str(device), interval=spec.telemetry_interval)
    progress.telemetry = telemetry.latest
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
        "encoder_cache": encoder_cache,
    }
    emit(
        ev.RunStarted(
            run=spec.name,
            method=spec.method,
            config=spec.to_dict(),
            device=_describe_all(device, ranks),
            torch_version=torch.__version__,
            trainable_params=trainable,
            total_params=total,
            reference_strategy=spec.reference if reference is not None else None,
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

    base_answers: list[str] | None = None
    if spec.score_base and spec.init_checkpoint is None:
        # The starting model's test answers, for the report's "base" row; judged after training
        # with the run's own answers, so no judge model is resident during the epochs.
        with explain_out_of_memory("generating the starting model's test answers", spec.batch_size):
            base_answers = trainer.answers("test")
    if spec.eval_every_epoch and ranks.is_main:
        # Judging happens after every epoch: load the judge's model now, so it is resident from
        # the first epoch on and the per-epoch memory figures stay comparable.
        with judge_with_cache(spec.judge, cache_dir) as (judge, _):
            judge.prepare()
    best_dir = out_dir / "best"
    train_seconds = 0.0
    best = BestWeights(parts.trainable_part(loaded, spec.train))
    with telemetry:
        trainer.warm_up()  # untimed, outside every window; training numbers are unchanged
        for epoch in range(1, spec.epochs + 1):
            result = trainer.run_epoch(epoch, telemetry)  # the window covers exactly the timed steps
            tel = result.telemetry
            train_seconds += result.epoch_seconds
            if result.is_best:
                best.keep()
                if ranks.is_main:
                    checkpoints.save_checkpoint(loaded, best_dir)
            ranks_memory = distributed.rank_memory(tel.event_fields(), ranks) if ranks.distributed else {}
            scored: ScoreSummary | None = None
            if spec.eval_every_epoch:
                with explain_out_of_memory(f"generating eval answers after epoch {epoch}", spec.batch_size):
                    answers = trainer.answers("eval", spec.eval_every_epoch)
            if spec.eval_every_epoch and ranks.is_main:
                eval_items = judge_items_of(encoded.splits["eval"].pairs[: len(answers)], answers)
                try:
                    scored = score_items(eval_items, spec.judge, cache_dir, with_intervals=False)
                except JudgeError as exc:
                    log.error("judging epoch %d's eval answers failed: %s", epoch, exc)
                    scored = score_items(eval_items, None, cache_dir, with_intervals=False)
            e = result.eval
            emit(
                ev.EpochEnded(
                    epoch=epoch,
                    epochs=spec.epochs,
                    train_loss=result.train_loss,
                    eval_loss=e.loss,
                    epoch_seconds=result.epoch_seconds,
                    eval_seconds=e.seconds,
                    samples_per_s=result.samples / result.epoch_seconds if result.epoch_seconds else 0.0,
                    lr=result.lr,
                    reference_bytes=ref_bytes,
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
    with explain_out_of_memory("generating the test answers", spec.batch_size):
        answers = trainer.answers("test")
    if not ranks.is_main:  # rank 0 judges, writes the predictions and reports
        return
    pairs = encoded.splits["test"].pairs
    if base_answers is not None:
        base = score_answers(spec, pairs, base_answers, cache_dir, out_dir / "base-predictions.jsonl", progress)
        emit(base.to_event("base", str(out_dir / "base-predictions.jsonl")))
    predictions = out_dir / "predictions.jsonl"
    summary = score_answers(spec, pairs, answers, cache_dir, predictions, progress)
    emit(summary.to_event("test", str(predictions)))
    emit(
        ev.RunFinished(
            best_epoch=trainer.best_epoch,
            best_eval_loss=trainer.best_loss,
            checkpoint=str(best_dir),
            total_seconds=time.perf_counter() - t_start,
            train_seconds=train_seconds,
        )
    )


def score_answers(
    spec: RunSpec, pairs: list, answers: list[str], cache_dir: Path, predictions: Path, progress: Throttled
) -> ScoreSummary:
    """Score test answers with the run's judge and write them, one JSON line per question, to `predictions`.

    A judge failure keeps EM and F1 (the answers can be judged later with `vqabench judge --run ID`).
    """
    items = judge_items_of(pairs, answers)
    try:
        summary = score_items(
            items, spec.judge, cache_dir, progress=lambda i, n: progress("judge", 0, i, n, None, "judging test answers")
        )
    except JudgeError as exc:
        # Training and answers are sound: keep them (and the runs that start from this one).
        log.error("judging the test answers failed: %s", exc)
        summary = score_items(items, None, cache_dir)
        summary.extra["judge_error"] = str(exc)
    with predictions.open("w") as fh:
        for i, (pair, answer) in enumerate(zip(pairs, answers, strict=True)):
            row = {
                "image_id": pair.image_id,
                "question": pair.question,
                "reference": pair.chosen,
                "prediction": answer,
                "em": metrics.exact_match(answer, pair.chosen),
                "f1": metrics.token_f1(answer, pair.chosen),
            }
            if i < len(summary.verdicts):
                row["verdict"] = summary.verdicts[i]
            fh.write(json.dumps(row) + "\n")
    return summary


def judge_items_of(pairs: list, answers: list[str]) -> list[JudgeItem]:
    return [JudgeItem(p.question, p.chosen, a) for p, a in zip(pairs, answers, strict=True)]


def _describe(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    import platform

    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def _describe_all(device: torch.device, ranks: distributed.Ranks) -> str:
    """The device, the GPUs the runner placed the run on, and the processes that share the work."""
    text = _describe(device)
    placed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if device.type == "cuda" and placed:
        text += f", CUDA_VISIBLE_DEVICES={placed}"
    if ranks.distributed:
        text += f", {ranks.world_size} processes ({ranks.backend})"
    return text


__all__ = ["DataError", "execute"]
